/* The module cache behind the instance pool: parse once, share, evict only idle modules. */
#include "testing.h"

#include "../src/core/modules.h"

static engine_module_t *load(const char *tag, uint8_t **bytes, size_t *len, uint8_t digest[32])
{
    *bytes = malloc(64);
    *len = fake_module(tag, *bytes, 64);
    sha256(*bytes, *len, digest);
    char err[80];
    return engine_load(*bytes, *len, err, sizeof err);
}

static void shares_a_parsed_module_by_digest(void **state)
{
    (void)state;
    fake_engine_reset();
    module_cache_t cache;
    modules_init(&cache);
    uint8_t *bytes, digest[32];
    size_t len;
    engine_module_t *m = load("a", &bytes, &len, digest);
    assert_null(modules_acquire(&cache, digest));
    bool duplicate;
    module_entry_t *e = modules_insert(&cache, digest, m, bytes, len, &duplicate);
    assert_non_null(e);
    assert_false(duplicate);
    module_entry_t *again = modules_acquire(&cache, digest);
    assert_ptr_equal(again, e);
    assert_int_equal(e->refs, 2);

    /* Another thread parsed the same module meanwhile: the cached one wins. */
    uint8_t *bytes2, digest2[32];
    size_t len2;
    engine_module_t *m2 = load("a", &bytes2, &len2, digest2);
    module_entry_t *dup = modules_insert(&cache, digest2, m2, bytes2, len2, &duplicate);
    assert_ptr_equal(dup, e);
    assert_true(duplicate);
    engine_unload(m2);
    free(bytes2);

    modules_release(&cache, e);
    modules_release(&cache, e);
    modules_release(&cache, e);
    assert_int_equal(e->refs, 0);
    modules_clear(&cache);
    assert_int_equal(fake_engine.loads, fake_engine.unloads);
}

static void evicts_the_least_recently_used_idle_module(void **state)
{
    (void)state;
    fake_engine_reset();
    module_cache_t cache;
    modules_init(&cache);
    module_entry_t *entries[PROPLET_MODULE_CACHE];
    uint8_t digests[PROPLET_MODULE_CACHE][32];
    bool duplicate;
    for (int i = 0; i < PROPLET_MODULE_CACHE; i++) {
        char tag[8];
        snprintf(tag, sizeof tag, "m%d", i);
        uint8_t *bytes;
        size_t len;
        engine_module_t *m = load(tag, &bytes, &len, digests[i]);
        entries[i] = modules_insert(&cache, digests[i], m, bytes, len, &duplicate);
        assert_non_null(entries[i]);
    }
    /* All in use: a new module is not cached and the caller keeps it. */
    uint8_t *bytes, digest[32];
    size_t len;
    engine_module_t *extra = load("extra", &bytes, &len, digest);
    assert_null(modules_insert(&cache, digest, extra, bytes, len, &duplicate));

    /* Release two; the older of them makes room. */
    modules_release(&cache, entries[2]);
    modules_release(&cache, entries[1]);
    module_entry_t *e = modules_insert(&cache, digest, extra, bytes, len, &duplicate);
    assert_non_null(e);
    assert_null(modules_acquire(&cache, digests[1]));
    module_entry_t *kept = modules_acquire(&cache, digests[2]);
    assert_non_null(kept);
    modules_release(&cache, kept);
    assert_int_equal(fake_engine.unloads, 1);

    assert_int_equal(modules_evict_idle(&cache), 1);
    modules_clear(&cache);
    assert_int_equal(fake_engine.loads, fake_engine.unloads);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(shares_a_parsed_module_by_digest),
        cmocka_unit_test(evicts_the_least_recently_used_idle_module),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

/* Chunk reassembly: any order, duplicates, with and without the announced size, and every way
 * a transfer can go wrong. */
#include "testing.h"

#include "../src/core/assembler.h"

#define MODULE_LEN 23

static uint8_t module[MODULE_LEN];
static char encoded[8][64];

/* Chunk idx of `module` split into pieces of `chunk` bytes (core.protocol.split_chunks). */
static chunk_msg_t piece(uint32_t idx, size_t chunk, bool with_size)
{
    uint32_t total = (uint32_t)((MODULE_LEN + chunk - 1) / chunk);
    size_t start = idx * chunk;
    size_t len = start + chunk <= MODULE_LEN ? chunk : MODULE_LEN - start;
    b64_encode(module + start, len, encoded[idx]);
    chunk_msg_t c;
    memset(&c, 0, sizeof c);
    snprintf(c.app_name, sizeof c.app_name, "blob:m");
    c.chunk_idx = idx;
    c.total_chunks = total;
    c.data_b64 = encoded[idx];
    c.data_b64_len = strlen(encoded[idx]);
    c.size = with_size ? MODULE_LEN : 0;
    return c;
}

static int setup(void **state)
{
    (void)state;
    for (size_t i = 0; i < MODULE_LEN; i++)
        module[i] = (uint8_t)(i * 7 + 1);
    return 0;
}

static void expect_module(assembler_t *a)
{
    assert_int_equal(a->state, ASSEMBLY_COMPLETE);
    size_t len;
    uint8_t *out = assembler_take(a, &len);
    assert_non_null(out);
    assert_int_equal(len, MODULE_LEN);
    assert_memory_equal(out, module, MODULE_LEN);
    free(out);
    assembler_reset(a);
}

/* Feed chunks in the given order; every order must give the same module. */
static void assemble(const uint32_t *order, size_t n, size_t chunk, bool with_size, size_t max)
{
    assembler_t a;
    assembler_begin(&a, "blob:m", max);
    for (size_t i = 0; i < n; i++) {
        chunk_msg_t c = piece(order[i], chunk, with_size);
        assembly_state_t st = assembler_add(&a, &c);
        assert_int_equal(st, i + 1 == n ? ASSEMBLY_COMPLETE : ASSEMBLY_WAITING);
    }
    expect_module(&a);
}

static void assembles_in_any_order_with_or_without_size(void **state)
{
    (void)state;
    const uint32_t in_order[] = {0, 1, 2};
    const uint32_t last_first[] = {2, 0, 1};
    const uint32_t reversed[] = {2, 1, 0};
    for (int with_size = 0; with_size < 2; with_size++) {
        assemble(in_order, 3, 10, with_size, 64);
        assemble(last_first, 3, 10, with_size, 64);
        assemble(reversed, 3, 10, with_size, 64);
    }
    const uint32_t single[] = {0};
    assemble(single, 1, 64, true, 64);
    assemble(single, 1, 64, false, 64);
    /* Without a size the buffer is max_bytes: exactly the module still fits. */
    assemble(last_first, 3, 10, false, MODULE_LEN);
}

/* Binary chunks (registry/server/binary) carry the bytes themselves; JSON ones may be mixed in
 * (a resume answered by a server that ignores the encoding). */
static void assembles_binary_chunks_and_mixes_them_with_json_ones(void **state)
{
    (void)state;
    assembler_t a;
    assembler_begin(&a, "blob:m", 64);
    const uint32_t order[] = {2, 0, 1};
    for (size_t i = 0; i < 3; i++) {
        chunk_msg_t c = piece(order[i], 10, true);
        if (order[i] != 1) {
            size_t start = order[i] * 10;
            c.binary = true;
            c.data_raw = module + start;
            c.data_raw_len = start + 10 > MODULE_LEN ? MODULE_LEN - start : 10;
            c.data_b64 = NULL;
            c.data_b64_len = 0;
        }
        assert_int_equal(assembler_add(&a, &c), i == 2 ? ASSEMBLY_COMPLETE : ASSEMBLY_WAITING);
    }
    expect_module(&a);
}

static void ignores_duplicates_and_lists_what_is_missing(void **state)
{
    (void)state;
    assembler_t a;
    assembler_begin(&a, "blob:m", 64);
    uint32_t missing[8];
    assert_int_equal(assembler_missing(&a, missing, 8), 0);
    chunk_msg_t c1 = piece(1, 10, true);
    assert_int_equal(assembler_add(&a, &c1), ASSEMBLY_WAITING);
    assert_int_equal(assembler_add(&a, &c1), ASSEMBLY_WAITING);
    assert_int_equal(a.received_count, 1);
    assert_int_equal(assembler_missing(&a, missing, 8), 2);
    assert_int_equal(missing[0], 0);
    assert_int_equal(missing[1], 2);
    assert_int_equal(assembler_missing(&a, missing, 1), 1);
    chunk_msg_t c0 = piece(0, 10, true), c2 = piece(2, 10, true);
    assembler_add(&a, &c2);
    assert_int_equal(assembler_add(&a, &c0), ASSEMBLY_COMPLETE);
    /* A late duplicate changes nothing. */
    assert_int_equal(assembler_add(&a, &c1), ASSEMBLY_COMPLETE);
    expect_module(&a);
}

static void expect_failure_of(assembler_t *a, const chunk_msg_t *c, const char *needle, bool too_large)
{
    assert_int_equal(assembler_add(a, c), ASSEMBLY_FAILED);
    if (strstr(assembler_error(a), needle) == NULL)
        fail_msg("error '%s' does not mention '%s'", assembler_error(a), needle);
    assert_null(a->buf);
    /* Only a module too large for this proplet may go to another: a broken transfer fails. */
    assert_int_equal(a->too_large, too_large);
    assembler_reset(a);
}

static void expect_failure(assembler_t *a, const chunk_msg_t *c, const char *needle)
{
    expect_failure_of(a, c, needle, false);
}

static void expect_too_large(assembler_t *a, const chunk_msg_t *c, const char *needle)
{
    expect_failure_of(a, c, needle, true);
}

static void refuses_a_module_larger_than_the_limit(void **state)
{
    (void)state;
    assembler_t a;
    assembler_begin(&a, "blob:m", 16);
    chunk_msg_t c = piece(0, 10, true);
    expect_too_large(&a, &c, "the module blob:m is 23 bytes but this proplet holds at most 16");
    /* Without an announced size, the first full chunk shows that the rest cannot fit. */
    assembler_begin(&a, "blob:m", 16);
    chunk_msg_t c0 = piece(0, 10, false);
    expect_too_large(&a, &c0, "add up to more than this proplet's 16-byte module limit");
    /* ... and a stashed last chunk that turns out not to fit is refused too. */
    assembler_begin(&a, "blob:m", 22);
    chunk_msg_t last = piece(2, 10, false);
    assert_int_equal(assembler_add(&a, &last), ASSEMBLY_WAITING);
    chunk_msg_t first = piece(0, 10, false);
    expect_too_large(&a, &first, "do not fit this proplet's 22-byte module limit");
}

static void fails_on_inconsistent_chunks(void **state)
{
    (void)state;
    assembler_t a;
    chunk_msg_t c0 = piece(0, 10, true);

    assembler_begin(&a, "blob:m", 64);
    assembler_add(&a, &c0);
    chunk_msg_t other_total = piece(1, 10, true);
    other_total.total_chunks = 4;
    expect_failure(&a, &other_total, "disagree on total_chunks");

    assembler_begin(&a, "blob:m", 64);
    assembler_add(&a, &c0);
    chunk_msg_t short_middle = piece(1, 5, true);
    short_middle.total_chunks = 3;
    expect_failure(&a, &short_middle, "has 5 bytes where the others have 10");

    assembler_begin(&a, "blob:m", 64);
    chunk_msg_t bad_b64 = piece(0, 10, true);
    bad_b64.data_b64 = "not base64!";
    bad_b64.data_b64_len = strlen(bad_b64.data_b64);
    expect_failure(&a, &bad_b64, "not valid standard base64");

    assembler_begin(&a, "blob:m", 64);
    chunk_msg_t refused = piece(0, 10, false);
    snprintf(refused.error, sizeof refused.error, "no task has this module");
    expect_failure(&a, &refused, "the registry could not serve blob:m: no task has this module");

    assembler_begin(&a, "blob:m", 64);
    chunk_msg_t too_many = piece(0, 10, false);
    too_many.total_chunks = PROPLET_MAX_CHUNKS + 1;
    expect_too_large(&a, &too_many, "raise the manager's chunk_size");

    assembler_begin(&a, "blob:m", 64);
    chunk_msg_t lying_size = piece(2, 10, true);
    lying_size.size = 24;
    expect_failure(&a, &lying_size, "does not match its announced size");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup(assembles_in_any_order_with_or_without_size, setup),
        cmocka_unit_test_setup(assembles_binary_chunks_and_mixes_them_with_json_ones, setup),
        cmocka_unit_test_setup(ignores_duplicates_and_lists_what_is_missing, setup),
        cmocka_unit_test_setup(refuses_a_module_larger_than_the_limit, setup),
        cmocka_unit_test_setup(fails_on_inconsistent_chunks, setup),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

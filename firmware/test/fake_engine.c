/* A fake engine for the unit tests, plus the fake port: deterministic, single-threaded.
 *
 * Every module exports the same functions:
 *   add(i32, i32) -> i32      the sum
 *   half(f64) -> f64          x / 2
 *   pair() -> (i32, f32)      7, 0.1
 *   trap() -> ()              traps with "unreachable"
 *   burn() -> ()              runs out of fuel
 *   block() -> i32            runs fake_engine.during_call, then reports an interrupt if one came
 *   vec(v128) -> ()           a parameter type tasks cannot provide
 * A module is the wasm header followed by a tag; the tag "invalid" fails to load.
 */
#include "testing.h"

#include "../src/core/engine.h"

fake_engine_t fake_engine;

struct engine_module {
    int unused;
};

struct engine_instance {
    int interrupted;
    uint64_t memory_bytes;
};

void fake_engine_reset(void)
{
    memset(&fake_engine, 0, sizeof fake_engine);
}

size_t fake_module(const char *tag, uint8_t *out, size_t cap)
{
    static const uint8_t header[8] = {0, 'a', 's', 'm', 1, 0, 0, 0};
    size_t n = strlen(tag);
    if (cap < sizeof header + n)
        return 0;
    memcpy(out, header, sizeof header);
    memcpy(out + sizeof header, tag, n);
    return sizeof header + n;
}

const char *engine_name(void)
{
    return "fake";
}

bool engine_init(const engine_config_t *config, char *err, size_t err_len)
{
    (void)config;
    (void)err;
    (void)err_len;
    return true;
}

void engine_shutdown(void)
{
}

void engine_thread_begin(void)
{
}

void engine_thread_end(void)
{
}

engine_module_t *engine_load(uint8_t *bytes, size_t len, char *err, size_t err_len)
{
    if (len < 8 || memcmp(bytes, "\0asm", 4) != 0) {
        snprintf(err, err_len, "magic header not detected");
        return NULL;
    }
    if (len >= 15 && memcmp(bytes + 8, "invalid", 7) == 0) {
        snprintf(err, err_len, "section out of bounds");
        return NULL;
    }
    fake_engine.loads++;
    return calloc(1, sizeof(engine_module_t));
}

void engine_unload(engine_module_t *module)
{
    if (module == NULL)
        return;
    fake_engine.unloads++;
    free(module);
}

engine_instance_t *engine_instantiate(engine_module_t *module, const engine_limits_t *limits,
                                      engine_status_t *status, char *err, size_t err_len)
{
    (void)module;
    fake_engine.last_fuel = limits->fuel;
    fake_engine.last_memory_bytes = limits->memory_bytes;
    if (fake_engine.fail_instantiations > 0) {
        fake_engine.fail_instantiations--;
        *status = ENGINE_NO_MEMORY;
        snprintf(err, err_len, "allocate memory failed");
        return NULL;
    }
    fake_engine.instantiations++;
    fake_engine.live_instances++;
    engine_instance_t *inst = calloc(1, sizeof *inst);
    inst->memory_bytes = 65536;
    *status = ENGINE_OK;
    return inst;
}

static bool set_sig(engine_signature_t *sig, size_t np, const wasm_type_t *p, size_t nr,
                    const wasm_type_t *r)
{
    sig->param_count = np;
    sig->result_count = nr;
    for (size_t i = 0; i < np; i++)
        sig->params[i] = p[i];
    for (size_t i = 0; i < nr; i++)
        sig->results[i] = r[i];
    return true;
}

bool engine_signature(engine_instance_t *instance, const char *name, engine_signature_t *sig,
                      char *err, size_t err_len)
{
    (void)instance;
    static const wasm_type_t i32x2[] = {WASM_TYPE_I32, WASM_TYPE_I32};
    static const wasm_type_t f64[] = {WASM_TYPE_F64};
    static const wasm_type_t i32f32[] = {WASM_TYPE_I32, WASM_TYPE_F32};
    static const wasm_type_t v128[] = {WASM_TYPE_V128};
    if (strcmp(name, "add") == 0)
        return set_sig(sig, 2, i32x2, 1, i32x2);
    if (strcmp(name, "half") == 0)
        return set_sig(sig, 1, f64, 1, f64);
    if (strcmp(name, "pair") == 0)
        return set_sig(sig, 0, NULL, 2, i32f32);
    if (strcmp(name, "trap") == 0 || strcmp(name, "burn") == 0)
        return set_sig(sig, 0, NULL, 0, NULL);
    if (strcmp(name, "block") == 0)
        return set_sig(sig, 0, NULL, 1, i32x2);
    if (strcmp(name, "vec") == 0)
        return set_sig(sig, 1, v128, 0, NULL);
    snprintf(err, err_len, "the module has no export named '%s'", name);
    return false;
}

engine_status_t engine_call(engine_instance_t *instance, const char *name,
                            const wasm_value_t *args, size_t arg_count, wasm_value_t *results,
                            size_t result_count, char *err, size_t err_len)
{
    (void)arg_count;
    (void)result_count;
    if (strcmp(name, "add") == 0) {
        results[0].type = WASM_TYPE_I32;
        results[0].of.i32 = (int32_t)((uint32_t)args[0].of.i32 + (uint32_t)args[1].of.i32);
        return ENGINE_OK;
    }
    if (strcmp(name, "half") == 0) {
        results[0].type = WASM_TYPE_F64;
        results[0].of.f64 = args[0].of.f64 / 2;
        return ENGINE_OK;
    }
    if (strcmp(name, "pair") == 0) {
        results[0].type = WASM_TYPE_I32;
        results[0].of.i32 = 7;
        results[1].type = WASM_TYPE_F32;
        results[1].of.f32 = 0.1f;
        return ENGINE_OK;
    }
    if (strcmp(name, "trap") == 0) {
        snprintf(err, err_len, "unreachable");
        return ENGINE_TRAP;
    }
    if (strcmp(name, "burn") == 0) {
        snprintf(err, err_len, "all fuel consumed");
        return ENGINE_OUT_OF_FUEL;
    }
    if (strcmp(name, "block") == 0) {
        if (fake_engine.during_call != NULL)
            fake_engine.during_call();
        if (instance->interrupted) {
            snprintf(err, err_len, "interrupted");
            return ENGINE_INTERRUPTED;
        }
        results[0].type = WASM_TYPE_I32;
        results[0].of.i32 = 1;
        return ENGINE_OK;
    }
    snprintf(err, err_len, "no export '%s'", name);
    return ENGINE_ERROR;
}

void engine_interrupt(engine_instance_t *instance)
{
    instance->interrupted = 1;
}

uint64_t engine_memory_bytes(engine_instance_t *instance)
{
    return instance->memory_bytes;
}

void engine_destroy(engine_instance_t *instance)
{
    if (instance == NULL)
        return;
    fake_engine.live_instances--;
    free(instance);
}

bool engine_arena(uint64_t *total_bytes, uint64_t *free_bytes)
{
    *total_bytes = 0;
    *free_bytes = 0;
    return false;
}

/* ------------------------------------------------------------------------------------------
 * the fake port */

fake_port_t fake;

static bool fake_publish(void *ctx, const char *topic, const char *payload, size_t len)
{
    (void)ctx;
    assert_int_equal(fake.lock_depth, 0); /* never publish under the lock */
    if (fake.offline || fake.count == RECORDED_MAX)
        return false;
    recorded_t *r = &fake.messages[fake.count++];
    snprintf(r->topic, sizeof r->topic, "%s", topic);
    snprintf(r->payload, sizeof r->payload, "%.*s", (int)len, payload);
    if (fake.after_publish != NULL)
        fake.after_publish(topic);
    return true;
}

static void fake_lock(void *ctx)
{
    (void)ctx;
    assert_int_equal(fake.lock_depth, 0); /* the core never nests its lock */
    fake.lock_depth++;
}

static void fake_unlock(void *ctx)
{
    (void)ctx;
    assert_int_equal(fake.lock_depth, 1);
    fake.lock_depth--;
}

static void fake_wake(void *ctx)
{
    (void)ctx;
    fake.wakes++;
}

static uint64_t fake_now(void *ctx)
{
    (void)ctx;
    return fake.now;
}

static bool fake_wall_clock(void *ctx, char *out, size_t len)
{
    (void)ctx;
    snprintf(out, len, "2026-01-02T03:04:05.000Z");
    return true;
}

static uint64_t fake_cpu(void *ctx)
{
    (void)ctx;
    return fake.cpu_us += 250;
}

static void fake_sample(void *ctx, proplet_sample_t *out)
{
    (void)ctx;
    out->heap_total_bytes = 300000;
    out->heap_free_bytes = 120000;
    out->heap_largest_free_block = 90000;
}

static void fake_address(void *ctx, char *out, size_t len)
{
    (void)ctx;
    snprintf(out, len, "192.0.2.7");
}

proplet_port_t fake_port_make(void)
{
    proplet_port_t port = {NULL, fake_publish, fake_lock, fake_unlock, fake_wake, fake_now,
                           fake_wall_clock, fake_cpu, fake_sample, fake_address, NULL};
    return port;
}

void fake_port_reset(void)
{
    memset(&fake, 0, sizeof fake);
    fake.now = 1000;
}

const char *fake_published(const char *suffix, size_t n)
{
    size_t len = strlen(suffix);
    for (size_t i = 0; i < fake.count; i++) {
        size_t tlen = strlen(fake.messages[i].topic);
        if (tlen >= len && strcmp(fake.messages[i].topic + tlen - len, suffix) == 0 && n-- == 0)
            return fake.messages[i].payload;
    }
    return NULL;
}

size_t fake_count(const char *suffix)
{
    size_t count = 0;
    while (fake_published(suffix, count) != NULL)
        count++;
    return count;
}

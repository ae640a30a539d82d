#include "bench.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cJSON.h"
#include "engine.h"

/* Arguments and expected results of the kernels, computed the way the wasm code does. */
#define CPU_ARG 20000
#define MEM_ROUNDS 2

static int32_t expected_cpu(int32_t n)
{
    uint32_t acc = 0;
    for (uint32_t k = (uint32_t)n; k != 0; k--)
        acc = acc * 31u + k;
    int32_t out;
    memcpy(&out, &acc, sizeof out);
    return out;
}

static int32_t expected_mem(int32_t rounds)
{
    uint32_t sum = 0;
    for (uint32_t r = (uint32_t)rounds; r != 0; r--)
        for (uint32_t addr = 0; addr < 65536u; addr += 4)
            sum += addr + r;
    int32_t out;
    memcpy(&out, &sum, sizeof out);
    return out;
}

bool bench_run(const char *kind, const bench_options_t *options, bench_result_t *out, char *err,
               size_t err_len)
{
    unsigned max_instances = options->max_instances;
    memset(out, 0, sizeof *out);
    bool cpu = strcmp(kind, "cpu") == 0;
    out->kind = cpu ? "cpu" : "mem";
    const unsigned char *wasm = cpu ? bench_cpu_wasm : bench_mem_wasm;
    size_t wasm_len = cpu ? bench_cpu_wasm_len : bench_mem_wasm_len;
    int32_t arg = cpu ? CPU_ARG : MEM_ROUNDS;
    int32_t expected = cpu ? expected_cpu(arg) : expected_mem(arg);
    if (max_instances > BENCH_MAX_INSTANCES)
        max_instances = BENCH_MAX_INSTANCES;

    /* WAMR may write into the bytes it loads, so it gets a private copy. */
    uint8_t *bytes = malloc(wasm_len);
    if (bytes == NULL) {
        snprintf(err, err_len, "out of memory for the %zu-byte module", wasm_len);
        return false;
    }
    memcpy(bytes, wasm, wasm_len);
    engine_module_t *module = engine_load(bytes, wasm_len, err, err_len);
    if (module == NULL) {
        free(bytes);
        return false;
    }
    uint64_t ignored;
    out->arena_known = engine_arena(&out->arena_total_bytes, &out->arena_free_before);
    out->heap_known = options->heap_free != NULL;
    if (out->heap_known)
        out->heap_free_before = options->heap_free();

    engine_instance_t *instances[BENCH_MAX_INSTANCES];
    engine_limits_t limits = {options->stack_bytes, options->memory_bytes, 0};
    snprintf(out->stopped_by, sizeof out->stopped_by, "reached the limit of %u instances",
             max_instances);
    while (out->instances < max_instances) {
        engine_status_t status;
        char why[sizeof out->stopped_by] = "";
        engine_instance_t *inst = engine_instantiate(module, &limits, &status, why, sizeof why);
        if (inst == NULL) {
            snprintf(out->stopped_by, sizeof out->stopped_by, "%s", why);
            break;
        }
        instances[out->instances++] = inst;
    }
    if (out->arena_known)
        engine_arena(&ignored, &out->arena_free_after);
    if (out->heap_known)
        out->heap_free_after = options->heap_free();

    const char *export_name = cpu ? "cpu" : "mem";
    uint64_t started = options->cpu_us();
    for (unsigned i = 0; i < out->instances; i++) {
        wasm_value_t args[1] = {{WASM_TYPE_I32, {.i32 = arg}}};
        wasm_value_t result;
        char why[120];
        if (engine_call(instances[i], export_name, args, 1, &result, 1, why, sizeof why)
                == ENGINE_OK
            && result.type == WASM_TYPE_I32 && result.of.i32 == expected)
            out->calls_ok++;
    }
    if (out->instances > 0)
        out->cpu_us_per_call = (options->cpu_us() - started) / out->instances;

    for (unsigned i = 0; i < out->instances; i++)
        engine_destroy(instances[i]);
    engine_unload(module);
    free(bytes);
    return true;
}

size_t bench_format(const bench_result_t *r, char *buf, size_t cap)
{
    cJSON *root = cJSON_CreateObject();
    if (root == NULL)
        return 0;
    cJSON_AddStringToObject(root, "kind", r->kind);
    cJSON_AddNumberToObject(root, "instances", r->instances);
    cJSON_AddNumberToObject(root, "calls_ok", r->calls_ok);
    if (r->arena_known) {
        cJSON_AddNumberToObject(root, "arena_total_bytes", (double)r->arena_total_bytes);
        cJSON_AddNumberToObject(root, "arena_free_before_bytes", (double)r->arena_free_before);
        cJSON_AddNumberToObject(root, "arena_free_bytes", (double)r->arena_free_after);
        if (r->instances > 0)
            cJSON_AddNumberToObject(
                root, "bytes_per_instance",
                (double)((r->arena_free_before - r->arena_free_after) / r->instances));
    } else {
        cJSON_AddNullToObject(root, "arena_free_bytes");
    }
    if (r->heap_known) {
        cJSON_AddNumberToObject(root, "heap_free_before_bytes", (double)r->heap_free_before);
        cJSON_AddNumberToObject(root, "heap_free_bytes", (double)r->heap_free_after);
    }
    cJSON_AddNumberToObject(root, "cpu_us_per_call", (double)r->cpu_us_per_call);
    cJSON_AddStringToObject(root, "stopped_by", r->stopped_by);
    size_t n = 0;
    if (cap <= 0x7fffffff && cJSON_PrintPreallocated(root, buf, (int)cap, false))
        n = strlen(buf);
    cJSON_Delete(root);
    return n;
}

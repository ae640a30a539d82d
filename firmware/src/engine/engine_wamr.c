/* The device engine: WAMR's classic interpreter (no JIT on Xtensa), with all of WAMR's memory
 * (modules, instances, operand stacks, linear memories) in one fixed arena so the wasm side
 * cannot starve Wi-Fi and MQTT of heap.
 *
 * Written against WAMR 2.4's wasm_export.h (the component espressif/wasm-micro-runtime, see
 * src/idf_component.yml). Interruption uses wasm_runtime_terminate(), which reaches a running
 * loop only with WAMR's thread manager (CONFIG_WAMR_ENABLE_LIB_PTHREAD, see sdkconfig.defaults):
 * the interpreter then checks for termination at every branch.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "wasm_export.h"

#include "../core/engine.h"

struct engine_module {
    wasm_module_t module;
};

struct engine_instance {
    wasm_module_inst_t inst;
    wasm_exec_env_t env;
    volatile bool interrupted;
};

static void *arena;

const char *engine_name(void)
{
    return "wamr";
}

bool engine_init(const engine_config_t *config, char *err, size_t err_len)
{
    if (config->arena_bytes == 0 || config->arena_bytes > UINT32_MAX) {
        snprintf(err, err_len, "the wasm arena size must be set (and below 4 GiB)");
        return false;
    }
    arena = malloc(config->arena_bytes);
    if (arena == NULL) {
        snprintf(err, err_len, "cannot allocate the %u-byte wasm arena; lower PROPLET_WASM_ARENA_BYTES",
                 (unsigned)config->arena_bytes);
        return false;
    }
    RuntimeInitArgs args;
    memset(&args, 0, sizeof args);
    args.mem_alloc_type = Alloc_With_Pool;
    args.mem_alloc_option.pool.heap_buf = arena;
    args.mem_alloc_option.pool.heap_size = (uint32_t)config->arena_bytes;
    args.running_mode = Mode_Interp;
    if (!wasm_runtime_full_init(&args)) {
        free(arena);
        arena = NULL;
        snprintf(err, err_len, "WAMR failed to initialise");
        return false;
    }
    return true;
}

void engine_shutdown(void)
{
    wasm_runtime_destroy();
    free(arena);
    arena = NULL;
}

void engine_thread_begin(void)
{
    /* Threads WAMR did not create must register before calling wasm. */
    wasm_runtime_init_thread_env();
}

void engine_thread_end(void)
{
    wasm_runtime_destroy_thread_env();
}

engine_module_t *engine_load(uint8_t *bytes, size_t len, char *err, size_t err_len)
{
    engine_module_t *out = wasm_runtime_malloc(sizeof *out);
    if (out == NULL) {
        snprintf(err, err_len, "the wasm arena is full");
        return NULL;
    }
    out->module = wasm_runtime_load(bytes, (uint32_t)len, err, (uint32_t)err_len);
    if (out->module == NULL) {
        wasm_runtime_free(out);
        return NULL;
    }
    return out;
}

void engine_unload(engine_module_t *module)
{
    if (module == NULL)
        return;
    wasm_runtime_unload(module->module);
    wasm_runtime_free(module);
}

/* WAMR reports allocation failures as "allocate memory failed" and the like. */
static bool about_memory(const char *text)
{
    return strstr(text, "allocate") != NULL || strstr(text, "out of memory") != NULL
           || strstr(text, "memory size") != NULL;
}

engine_instance_t *engine_instantiate(engine_module_t *module, const engine_limits_t *limits,
                                      engine_status_t *status, char *err, size_t err_len)
{
    *status = ENGINE_ERROR;
    engine_instance_t *inst = wasm_runtime_malloc(sizeof *inst);
    if (inst == NULL) {
        *status = ENGINE_NO_MEMORY;
        snprintf(err, err_len, "the wasm arena is full");
        return NULL;
    }
    memset(inst, 0, sizeof *inst);
    InstantiationArgs args;
    memset(&args, 0, sizeof args);
    args.default_stack_size = limits->stack_bytes;
    args.host_managed_heap_size = 0; /* no host heap: modules manage their own memory */
    if (limits->memory_bytes > 0) {
        uint64_t pages = limits->memory_bytes / 65536u;
        args.max_memory_pages = pages == 0 ? 1 : pages > 65536u ? 65536u : (uint32_t)pages;
    }
    inst->inst = wasm_runtime_instantiate_ex(module->module, &args, err, (uint32_t)err_len);
    if (inst->inst == NULL) {
        if (about_memory(err))
            *status = ENGINE_NO_MEMORY;
        wasm_runtime_free(inst);
        return NULL;
    }
    inst->env = wasm_runtime_create_exec_env(inst->inst, limits->stack_bytes);
    if (inst->env == NULL) {
        snprintf(err, err_len, "no room for a %u-byte wasm stack in the arena",
                 (unsigned)limits->stack_bytes);
        *status = ENGINE_NO_MEMORY;
        wasm_runtime_deinstantiate(inst->inst);
        wasm_runtime_free(inst);
        return NULL;
    }
#if defined(PROPLET_WAMR_INSTRUCTION_METERING) && PROPLET_WAMR_INSTRUCTION_METERING
    /* WAMR counts interpreted instructions; -1 is unlimited. */
    wasm_runtime_set_instruction_count_limit(
        inst->env, limits->fuel == 0 ? -1 : limits->fuel > 0x7fffffffu ? 0x7fffffff : (int)limits->fuel);
#endif
    *status = ENGINE_OK;
    return inst;
}

static wasm_type_t to_wasm_type(wasm_valkind_t kind)
{
    switch (kind) {
    case WASM_I32: return WASM_TYPE_I32;
    case WASM_I64: return WASM_TYPE_I64;
    case WASM_F32: return WASM_TYPE_F32;
    case WASM_F64: return WASM_TYPE_F64;
    case WASM_V128: return WASM_TYPE_V128;
    case WASM_FUNCREF: return WASM_TYPE_FUNCREF;
    case WASM_EXTERNREF: return WASM_TYPE_EXTERNREF;
    default: return WASM_TYPE_OTHER;
    }
}

bool engine_signature(engine_instance_t *inst, const char *export_name, engine_signature_t *sig,
                      char *err, size_t err_len)
{
    wasm_function_inst_t func = wasm_runtime_lookup_function(inst->inst, export_name);
    if (func == NULL) {
        snprintf(err, err_len, "the module has no export named '%s'", export_name);
        return false;
    }
    uint32_t params = wasm_func_get_param_count(func, inst->inst);
    uint32_t results = wasm_func_get_result_count(func, inst->inst);
    if (params > PROPLET_PARAMS_MAX || results > PROPLET_RESULTS_MAX) {
        snprintf(err, err_len,
                 "the export '%s' has %u parameters and %u results; this proplet supports at most "
                 "%d and %d",
                 export_name, (unsigned)params, (unsigned)results, PROPLET_PARAMS_MAX,
                 PROPLET_RESULTS_MAX);
        return false;
    }
    wasm_valkind_t kinds[PROPLET_PARAMS_MAX > PROPLET_RESULTS_MAX ? PROPLET_PARAMS_MAX : PROPLET_RESULTS_MAX];
    wasm_func_get_param_types(func, inst->inst, kinds);
    for (uint32_t i = 0; i < params; i++)
        sig->params[i] = to_wasm_type(kinds[i]);
    wasm_func_get_result_types(func, inst->inst, kinds);
    for (uint32_t i = 0; i < results; i++)
        sig->results[i] = to_wasm_type(kinds[i]);
    sig->param_count = params;
    sig->result_count = results;
    return true;
}

engine_status_t engine_call(engine_instance_t *inst, const char *export_name,
                            const wasm_value_t *args, size_t arg_count, wasm_value_t *results,
                            size_t result_count, char *err, size_t err_len)
{
    if (inst->interrupted) {
        snprintf(err, err_len, "interrupted");
        return ENGINE_INTERRUPTED;
    }
    wasm_function_inst_t func = wasm_runtime_lookup_function(inst->inst, export_name);
    if (func == NULL) {
        snprintf(err, err_len, "the module has no export named '%s'", export_name);
        return ENGINE_ERROR;
    }
    wasm_val_t in[PROPLET_PARAMS_MAX];
    wasm_val_t out[PROPLET_RESULTS_MAX];
    memset(in, 0, sizeof in);
    memset(out, 0, sizeof out);
    for (size_t i = 0; i < arg_count; i++) {
        switch (args[i].type) {
        case WASM_TYPE_I32: in[i].kind = WASM_I32; in[i].of.i32 = args[i].of.i32; break;
        case WASM_TYPE_I64: in[i].kind = WASM_I64; in[i].of.i64 = args[i].of.i64; break;
        case WASM_TYPE_F32: in[i].kind = WASM_F32; in[i].of.f32 = args[i].of.f32; break;
        case WASM_TYPE_F64: in[i].kind = WASM_F64; in[i].of.f64 = args[i].of.f64; break;
        default:
            snprintf(err, err_len, "parameter %u has a type tasks cannot pass", (unsigned)i);
            return ENGINE_ERROR;
        }
    }
    if (!wasm_runtime_call_wasm_a(inst->env, func, (uint32_t)result_count, out, (uint32_t)arg_count, in)) {
        const char *exception = wasm_runtime_get_exception(inst->inst);
        if (exception == NULL)
            exception = "unknown failure";
        /* "Exception: integer divide by zero" -> "integer divide by zero", as wasmtime words it. */
        if (strncmp(exception, "Exception: ", 11) == 0)
            exception += 11;
        snprintf(err, err_len, "%s", exception);
        wasm_runtime_clear_exception(inst->inst);
        if (inst->interrupted || strstr(err, "terminated") != NULL)
            return ENGINE_INTERRUPTED;
        if (strstr(err, "instruction limit") != NULL)
            return ENGINE_OUT_OF_FUEL;
        if (about_memory(err))
            return ENGINE_NO_MEMORY;
        return ENGINE_TRAP;
    }
    for (size_t i = 0; i < result_count; i++) {
        switch (out[i].kind) {
        case WASM_I32: results[i].type = WASM_TYPE_I32; results[i].of.i32 = out[i].of.i32; break;
        case WASM_I64: results[i].type = WASM_TYPE_I64; results[i].of.i64 = out[i].of.i64; break;
        case WASM_F32: results[i].type = WASM_TYPE_F32; results[i].of.f32 = out[i].of.f32; break;
        case WASM_F64: results[i].type = WASM_TYPE_F64; results[i].of.f64 = out[i].of.f64; break;
        default:
            snprintf(err, err_len, "result %u has a type the proplet cannot report", (unsigned)i);
            return ENGINE_ERROR;
        }
    }
    return ENGINE_OK;
}

void engine_interrupt(engine_instance_t *inst)
{
    inst->interrupted = true;
    wasm_runtime_terminate(inst->inst);
}

uint64_t engine_memory_bytes(engine_instance_t *inst)
{
    wasm_memory_inst_t memory = wasm_runtime_get_default_memory(inst->inst);
    if (memory == NULL)
        return 0;
    return wasm_memory_get_cur_page_count(memory) * wasm_memory_get_bytes_per_page(memory);
}

void engine_destroy(engine_instance_t *inst)
{
    if (inst == NULL)
        return;
    wasm_runtime_destroy_exec_env(inst->env);
    wasm_runtime_deinstantiate(inst->inst);
    wasm_runtime_free(inst);
}

bool engine_arena(uint64_t *total_bytes, uint64_t *free_bytes)
{
    mem_alloc_info_t info;
    if (arena == NULL || !wasm_runtime_get_mem_alloc_info(&info)) {
        *total_bytes = 0;
        *free_bytes = 0;
        return false;
    }
    *total_bytes = info.total_size;
    *free_bytes = info.total_free_size;
    return true;
}

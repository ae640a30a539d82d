/* The host engine: the wasmtime C library from the wasmtime Python wheel.
 *
 * One wasm engine with epoch interruption and fuel; one store per instance, with its own
 * memory limit and fuel. A ticker thread advances the epoch every EPOCH_TICK_MS, and each
 * store's deadline callback ends the call when its instance was interrupted, so a stop or a
 * time limit lands within a tick even in a tight loop.
 */
#define _POSIX_C_SOURCE 200809L

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../core/engine.h"
#include "wasmtime_c_api.h"

#define EPOCH_TICK_MS 5
#define DEFAULT_MAX_STACK (512 * 1024)

struct engine_module {
    wasmtime_module_t *module;
};

struct engine_instance {
    wasmtime_store_t *store;
    wasmtime_context_t *context;
    wasmtime_instance_t instance;
    int interrupted; /* written by other threads: accessed with __atomic builtins */
};

static wasm_engine_t *engine;
static pthread_t ticker;
static int ticker_running;

const char *engine_name(void)
{
    return "wasmtime-c-api";
}

static void *tick(void *unused)
{
    (void)unused;
    struct timespec period = {0, EPOCH_TICK_MS * 1000000L};
    while (__atomic_load_n(&ticker_running, __ATOMIC_ACQUIRE)) {
        nanosleep(&period, NULL);
        wasmtime_engine_increment_epoch(engine);
    }
    return NULL;
}

bool engine_init(const engine_config_t *config, char *err, size_t err_len)
{
    wasm_config_t *cfg = wasm_config_new();
    if (cfg == NULL) {
        snprintf(err, err_len, "wasmtime could not create a configuration");
        return false;
    }
    wasmtime_config_epoch_interruption_set(cfg, true);
    wasmtime_config_consume_fuel_set(cfg, true);
    wasmtime_config_max_wasm_stack_set(
        cfg, config->max_stack_bytes > 0 ? config->max_stack_bytes : DEFAULT_MAX_STACK);
    engine = wasm_engine_new_with_config(cfg);
    if (engine == NULL) {
        snprintf(err, err_len, "wasmtime could not create an engine");
        return false;
    }
    __atomic_store_n(&ticker_running, 1, __ATOMIC_RELEASE);
    if (pthread_create(&ticker, NULL, tick, NULL) != 0) {
        snprintf(err, err_len, "could not start the epoch ticker thread");
        wasm_engine_delete(engine);
        engine = NULL;
        return false;
    }
    return true;
}

void engine_shutdown(void)
{
    if (engine == NULL)
        return;
    __atomic_store_n(&ticker_running, 0, __ATOMIC_RELEASE);
    pthread_join(ticker, NULL);
    wasm_engine_delete(engine);
    engine = NULL;
}

void engine_thread_begin(void)
{
}

void engine_thread_end(void)
{
}

/* Copy a wasm byte vector's text (it may or may not end in a NUL) and free the vector. */
static void take_message(wasm_byte_vec_t *vec, char *out, size_t out_len)
{
    size_t n = vec->size;
    if (n > 0 && vec->data[n - 1] == '\0')
        n--;
    /* Keep the first line: wasmtime appends a wasm backtrace after it. */
    for (size_t i = 0; i < n; i++)
        if (vec->data[i] == '\n') {
            n = i;
            break;
        }
    snprintf(out, out_len, "%.*s", (int)n, vec->data);
    wasm_byte_vec_delete(vec);
}

static void error_text(wasmtime_error_t *error, char *out, size_t out_len)
{
    wasm_name_t message;
    wasmtime_error_message(error, &message);
    take_message(&message, out, out_len);
    wasmtime_error_delete(error);
}

engine_module_t *engine_load(uint8_t *bytes, size_t len, char *err, size_t err_len)
{
    wasmtime_module_t *module = NULL;
    wasmtime_error_t *error = wasmtime_module_new(engine, bytes, len, &module);
    if (error != NULL) {
        error_text(error, err, err_len);
        return NULL;
    }
    /* The proplet links no host functions, so a module with imports cannot run here; say which
     * one, rather than wasmtime's "expected N imports, found 0". */
    wasm_importtype_vec_t imports;
    wasmtime_module_imports(module, &imports);
    if (imports.size > 0) {
        const wasm_name_t *mod = wasm_importtype_module(imports.data[0]);
        const wasm_name_t *name = wasm_importtype_name(imports.data[0]);
        snprintf(err, err_len,
                 "the module imports %.*s.%.*s%s; the embedded proplet provides no imports "
                 "(no WASI), so export the function to call and import nothing",
                 (int)mod->size, mod->data, (int)name->size, name->data,
                 imports.size > 1 ? " and more" : "");
        wasm_importtype_vec_delete(&imports);
        wasmtime_module_delete(module);
        return NULL;
    }
    wasm_importtype_vec_delete(&imports);
    engine_module_t *out = malloc(sizeof *out);
    if (out == NULL) {
        snprintf(err, err_len, "out of memory");
        wasmtime_module_delete(module);
        return NULL;
    }
    out->module = module;
    return out;
}

void engine_unload(engine_module_t *module)
{
    if (module == NULL)
        return;
    wasmtime_module_delete(module->module);
    free(module);
}

static wasmtime_error_t *on_epoch(wasmtime_context_t *context, void *data, uint64_t *delta,
                                  wasmtime_update_deadline_kind_t *kind)
{
    (void)context;
    engine_instance_t *inst = data;
    if (__atomic_load_n(&inst->interrupted, __ATOMIC_ACQUIRE))
        return wasmtime_error_new("interrupted by the proplet");
    *delta = 1;
    *kind = WASMTIME_UPDATE_DEADLINE_CONTINUE;
    return NULL;
}

static void trap_text(wasm_trap_t *trap, char *out, size_t out_len)
{
    wasm_message_t message;
    wasm_trap_message(trap, &message);
    take_message(&message, out, out_len);
}

engine_instance_t *engine_instantiate(engine_module_t *module, const engine_limits_t *limits,
                                      engine_status_t *status, char *err, size_t err_len)
{
    *status = ENGINE_ERROR;
    engine_instance_t *inst = calloc(1, sizeof *inst);
    if (inst == NULL) {
        *status = ENGINE_NO_MEMORY;
        snprintf(err, err_len, "out of memory");
        return NULL;
    }
    inst->store = wasmtime_store_new(engine, NULL, NULL);
    if (inst->store == NULL) {
        free(inst);
        *status = ENGINE_NO_MEMORY;
        snprintf(err, err_len, "out of memory");
        return NULL;
    }
    inst->context = wasmtime_store_context(inst->store);
    wasmtime_store_limiter(inst->store,
                           limits->memory_bytes > 0 && limits->memory_bytes < INT64_MAX
                               ? (int64_t)limits->memory_bytes
                               : -1,
                           -1, -1, -1, -1);
    wasmtime_error_t *error =
        wasmtime_context_set_fuel(inst->context, limits->fuel > 0 ? limits->fuel : UINT64_MAX);
    if (error == NULL) {
        wasmtime_store_epoch_deadline_callback(inst->store, on_epoch, inst, NULL);
        wasmtime_context_set_epoch_deadline(inst->context, 1);
        wasm_trap_t *trap = NULL;
        error = wasmtime_instance_new(inst->context, module->module, NULL, 0, &inst->instance,
                                      &trap);
        if (error == NULL && trap == NULL)
            return inst;
        if (trap != NULL) {
            trap_text(trap, err, err_len);
            wasm_trap_delete(trap);
            *status = ENGINE_TRAP;
        }
    }
    if (error != NULL) {
        error_text(error, err, err_len);
        /* wasmtime's limiter refusal: "memory minimum size of N pages exceeds memory limits" */
        if (strstr(err, "memory limits") != NULL || strstr(err, "out of memory") != NULL)
            *status = ENGINE_NO_MEMORY;
    }
    wasmtime_store_delete(inst->store);
    free(inst);
    return NULL;
}

static bool to_wasm_type(wasm_valkind_t kind, wasm_type_t *out)
{
    switch (kind) {
    case WASM_I32: *out = WASM_TYPE_I32; return true;
    case WASM_I64: *out = WASM_TYPE_I64; return true;
    case WASM_F32: *out = WASM_TYPE_F32; return true;
    case WASM_F64: *out = WASM_TYPE_F64; return true;
    case WASM_V128: *out = WASM_TYPE_V128; return true;
    case WASM_FUNCREF: *out = WASM_TYPE_FUNCREF; return true;
    case WASM_EXTERNREF: *out = WASM_TYPE_EXTERNREF; return true;
    default: *out = WASM_TYPE_OTHER; return true;
    }
}

static bool find_func(engine_instance_t *inst, const char *name, wasmtime_func_t *func, char *err,
                      size_t err_len)
{
    wasmtime_extern_t item;
    if (!wasmtime_instance_export_get(inst->context, &inst->instance, name, strlen(name), &item)) {
        snprintf(err, err_len, "the module has no export named '%s'", name);
        return false;
    }
    if (item.kind != WASMTIME_EXTERN_FUNC) {
        snprintf(err, err_len, "the export '%s' is not a function", name);
        return false;
    }
    *func = item.of.func;
    return true;
}

bool engine_signature(engine_instance_t *inst, const char *export_name, engine_signature_t *sig,
                      char *err, size_t err_len)
{
    wasmtime_func_t func;
    if (!find_func(inst, export_name, &func, err, err_len))
        return false;
    wasm_functype_t *type = wasmtime_func_type(inst->context, &func);
    const wasm_valtype_vec_t *params = wasm_functype_params(type);
    const wasm_valtype_vec_t *results = wasm_functype_results(type);
    bool ok = params->size <= PROPLET_PARAMS_MAX && results->size <= PROPLET_RESULTS_MAX;
    if (!ok) {
        snprintf(err, err_len,
                 "the export '%s' has %zu parameters and %zu results; this proplet supports at "
                 "most %d and %d",
                 export_name, params->size, results->size, PROPLET_PARAMS_MAX, PROPLET_RESULTS_MAX);
    } else {
        sig->param_count = params->size;
        sig->result_count = results->size;
        for (size_t i = 0; i < params->size; i++)
            to_wasm_type(wasm_valtype_kind(params->data[i]), &sig->params[i]);
        for (size_t i = 0; i < results->size; i++)
            to_wasm_type(wasm_valtype_kind(results->data[i]), &sig->results[i]);
    }
    wasm_functype_delete(type);
    return ok;
}

/* Trap codes worded as WAMR words them (engine_wamr.c), so both proplets report alike. */
static const char *trap_name(wasmtime_trap_code_t code)
{
    switch (code) {
    case WASMTIME_TRAP_CODE_STACK_OVERFLOW: return "wasm stack overflow";
    case WASMTIME_TRAP_CODE_MEMORY_OUT_OF_BOUNDS: return "out of bounds memory access";
    case WASMTIME_TRAP_CODE_INTEGER_OVERFLOW: return "integer overflow";
    case WASMTIME_TRAP_CODE_INTEGER_DIVISION_BY_ZERO: return "integer divide by zero";
    case WASMTIME_TRAP_CODE_UNREACHABLE_CODE_REACHED: return "unreachable";
    default: return NULL;
    }
}

engine_status_t engine_call(engine_instance_t *inst, const char *export_name,
                            const wasm_value_t *args, size_t arg_count, wasm_value_t *results,
                            size_t result_count, char *err, size_t err_len)
{
    if (__atomic_load_n(&inst->interrupted, __ATOMIC_ACQUIRE)) {
        snprintf(err, err_len, "interrupted");
        return ENGINE_INTERRUPTED;
    }
    wasmtime_func_t func;
    if (!find_func(inst, export_name, &func, err, err_len))
        return ENGINE_ERROR;
    wasmtime_val_t in[PROPLET_PARAMS_MAX];
    wasmtime_val_t out[PROPLET_RESULTS_MAX];
    if (arg_count > PROPLET_PARAMS_MAX || result_count > PROPLET_RESULTS_MAX) {
        snprintf(err, err_len, "too many parameters or results");
        return ENGINE_ERROR;
    }
    memset(in, 0, sizeof in);
    memset(out, 0, sizeof out);
    for (size_t i = 0; i < arg_count; i++) {
        switch (args[i].type) {
        case WASM_TYPE_I32: in[i].kind = WASMTIME_I32; in[i].of.i32 = args[i].of.i32; break;
        case WASM_TYPE_I64: in[i].kind = WASMTIME_I64; in[i].of.i64 = args[i].of.i64; break;
        case WASM_TYPE_F32: in[i].kind = WASMTIME_F32; in[i].of.f32 = args[i].of.f32; break;
        case WASM_TYPE_F64: in[i].kind = WASMTIME_F64; in[i].of.f64 = args[i].of.f64; break;
        default:
            snprintf(err, err_len, "parameter %zu has a type tasks cannot pass", i);
            return ENGINE_ERROR;
        }
    }
    wasm_trap_t *trap = NULL;
    wasmtime_error_t *error =
        wasmtime_func_call(inst->context, &func, in, arg_count, out, result_count, &trap);
    bool interrupted = __atomic_load_n(&inst->interrupted, __ATOMIC_ACQUIRE);
    if (error != NULL) {
        error_text(error, err, err_len);
        return interrupted ? ENGINE_INTERRUPTED : ENGINE_ERROR;
    }
    if (trap != NULL) {
        wasmtime_trap_code_t code = 0;
        bool has_code = wasmtime_trap_code(trap, &code);
        const char *name = has_code ? trap_name(code) : NULL;
        if (name != NULL)
            snprintf(err, err_len, "%s", name);
        else
            trap_text(trap, err, err_len);
        wasm_trap_delete(trap);
        if (interrupted || (has_code && code == WASMTIME_TRAP_CODE_INTERRUPT))
            return ENGINE_INTERRUPTED;
        if (has_code && code == WASMTIME_TRAP_CODE_OUT_OF_FUEL)
            return ENGINE_OUT_OF_FUEL;
        return ENGINE_TRAP;
    }
    for (size_t i = 0; i < result_count; i++) {
        switch (out[i].kind) {
        case WASMTIME_I32: results[i].type = WASM_TYPE_I32; results[i].of.i32 = out[i].of.i32; break;
        case WASMTIME_I64: results[i].type = WASM_TYPE_I64; results[i].of.i64 = out[i].of.i64; break;
        case WASMTIME_F32: results[i].type = WASM_TYPE_F32; results[i].of.f32 = out[i].of.f32; break;
        case WASMTIME_F64: results[i].type = WASM_TYPE_F64; results[i].of.f64 = out[i].of.f64; break;
        default:
            snprintf(err, err_len, "result %zu has a type the proplet cannot report", i);
            return ENGINE_ERROR;
        }
    }
    return ENGINE_OK;
}

void engine_interrupt(engine_instance_t *inst)
{
    __atomic_store_n(&inst->interrupted, 1, __ATOMIC_RELEASE);
}

uint64_t engine_memory_bytes(engine_instance_t *inst)
{
    wasmtime_extern_t item;
    char *name;
    size_t name_len;
    for (size_t i = 0;
         wasmtime_instance_export_nth(inst->context, &inst->instance, i, &name, &name_len, &item);
         i++)
        if (item.kind == WASMTIME_EXTERN_MEMORY)
            return wasmtime_memory_data_size(inst->context, &item.of.memory);
    return 0;
}

void engine_destroy(engine_instance_t *inst)
{
    if (inst == NULL)
        return;
    wasmtime_store_delete(inst->store);
    free(inst);
}

bool engine_arena(uint64_t *total_bytes, uint64_t *free_bytes)
{
    *total_bytes = 0;
    *free_bytes = 0;
    return false;
}

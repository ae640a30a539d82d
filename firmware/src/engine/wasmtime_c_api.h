/* Declarations of the parts of the wasmtime 50 C API the host engine uses.
 *
 * No wasm.h or wasmtime.h ships with the wasmtime Python wheel (whose _libwasmtime.so we link),
 * and wabt's wasm.h is an older, ABI-incompatible revision. These declarations follow the
 * wasmtime 50 headers; the struct layouts match the ctypes bindings generated from them
 * (wasmtime/_bindings.py in the same wheel). Only what engine_wasmtime.c calls is declared.
 *
 * The standard wasm.h store cannot be interrupted or limited (with epoch interruption on, a
 * wasm_store_t traps at once and has no deadline setter), so stores, instances and calls use
 * the wasmtime_* API; config, engine, types, traps and byte vectors use the standard one.
 */
#ifndef PROPLET_WASMTIME_C_API_H
#define PROPLET_WASMTIME_C_API_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* ---- wasm.h (standard C API) ---- */

typedef struct wasm_config_t wasm_config_t;
typedef struct wasm_engine_t wasm_engine_t;
typedef struct wasm_trap_t wasm_trap_t;
typedef struct wasm_functype_t wasm_functype_t;
typedef struct wasm_valtype_t wasm_valtype_t;
typedef struct wasm_importtype_t wasm_importtype_t;

typedef uint8_t wasm_valkind_t;
enum { WASM_I32 = 0, WASM_I64 = 1, WASM_F32 = 2, WASM_F64 = 3, WASM_V128 = 4,
       WASM_EXTERNREF = 128, WASM_FUNCREF = 129 };

typedef struct {
    size_t size;
    char *data;
} wasm_byte_vec_t;
typedef wasm_byte_vec_t wasm_name_t;
typedef wasm_byte_vec_t wasm_message_t;

typedef struct {
    size_t size;
    wasm_valtype_t **data;
} wasm_valtype_vec_t;

typedef struct {
    size_t size;
    wasm_importtype_t **data;
} wasm_importtype_vec_t;

wasm_config_t *wasm_config_new(void);
wasm_engine_t *wasm_engine_new_with_config(wasm_config_t *config); /* takes the config */
void wasm_engine_delete(wasm_engine_t *engine);
void wasm_byte_vec_delete(wasm_byte_vec_t *vec);
void wasm_trap_message(const wasm_trap_t *trap, wasm_message_t *out);
void wasm_trap_delete(wasm_trap_t *trap);
const wasm_valtype_vec_t *wasm_functype_params(const wasm_functype_t *type);
const wasm_valtype_vec_t *wasm_functype_results(const wasm_functype_t *type);
void wasm_functype_delete(wasm_functype_t *type);
wasm_valkind_t wasm_valtype_kind(const wasm_valtype_t *type);
const wasm_name_t *wasm_importtype_module(const wasm_importtype_t *type);
const wasm_name_t *wasm_importtype_name(const wasm_importtype_t *type);
void wasm_importtype_vec_delete(wasm_importtype_vec_t *vec);

/* ---- wasmtime.h ---- */

typedef struct wasmtime_error wasmtime_error_t;
typedef struct wasmtime_store wasmtime_store_t;
typedef struct wasmtime_context wasmtime_context_t;
typedef struct wasmtime_module wasmtime_module_t;

typedef uint8_t wasmtime_trap_code_t;
enum { WASMTIME_TRAP_CODE_STACK_OVERFLOW = 0, WASMTIME_TRAP_CODE_MEMORY_OUT_OF_BOUNDS = 1,
       WASMTIME_TRAP_CODE_INTEGER_OVERFLOW = 6, WASMTIME_TRAP_CODE_INTEGER_DIVISION_BY_ZERO = 7,
       WASMTIME_TRAP_CODE_UNREACHABLE_CODE_REACHED = 9, WASMTIME_TRAP_CODE_INTERRUPT = 10,
       WASMTIME_TRAP_CODE_OUT_OF_FUEL = 11 };

typedef uint8_t wasmtime_update_deadline_kind_t;
enum { WASMTIME_UPDATE_DEADLINE_CONTINUE = 0 };

typedef struct {
    uint64_t store_id;
    size_t private_;
} wasmtime_instance_t;

typedef struct {
    uint64_t store_id;
    void *private_;
} wasmtime_func_t;

/* The largest members (globals, tags, anyref) are 24 bytes with 8-byte alignment; the
 * padding member reproduces that size and alignment. */
/* Layout {{u64 store_id, u32}, u32}: 24 bytes. */
typedef struct {
    struct {
        uint64_t store_id;
        uint32_t private1_;
    } inner_;
    uint32_t private2_;
} wasmtime_memory_t;

typedef uint8_t wasmtime_extern_kind_t;
enum { WASMTIME_EXTERN_FUNC = 0, WASMTIME_EXTERN_MEMORY = 3 };
typedef union {
    wasmtime_func_t func;
    wasmtime_memory_t memory;
    uint64_t padding_[3];
} wasmtime_extern_union_t;
typedef struct {
    wasmtime_extern_kind_t kind;
    wasmtime_extern_union_t of;
} wasmtime_extern_t;

typedef uint8_t wasmtime_valkind_t;
enum { WASMTIME_I32 = 0, WASMTIME_I64 = 1, WASMTIME_F32 = 2, WASMTIME_F64 = 3 };
typedef union {
    int32_t i32;
    int64_t i64;
    float f32;
    double f64;
    uint64_t padding_[3];
} wasmtime_valunion_t;
typedef struct {
    wasmtime_valkind_t kind;
    wasmtime_valunion_t of;
} wasmtime_val_t;

void wasmtime_config_epoch_interruption_set(wasm_config_t *config, bool enable);
void wasmtime_config_consume_fuel_set(wasm_config_t *config, bool enable);
void wasmtime_config_max_wasm_stack_set(wasm_config_t *config, size_t size);
void wasmtime_engine_increment_epoch(wasm_engine_t *engine);

wasmtime_error_t *wasmtime_error_new(const char *message);
void wasmtime_error_message(const wasmtime_error_t *error, wasm_name_t *message);
void wasmtime_error_delete(wasmtime_error_t *error);
bool wasmtime_trap_code(const wasm_trap_t *trap, wasmtime_trap_code_t *code);

wasmtime_error_t *wasmtime_module_new(wasm_engine_t *engine, const uint8_t *wasm, size_t len,
                                      wasmtime_module_t **out);
void wasmtime_module_delete(wasmtime_module_t *module);
void wasmtime_module_imports(const wasmtime_module_t *module, wasm_importtype_vec_t *out);

wasmtime_store_t *wasmtime_store_new(wasm_engine_t *engine, void *data, void (*finalizer)(void *));
wasmtime_context_t *wasmtime_store_context(wasmtime_store_t *store);
void wasmtime_store_delete(wasmtime_store_t *store);
void wasmtime_store_limiter(wasmtime_store_t *store, int64_t memory_size, int64_t table_elements,
                            int64_t instances, int64_t tables, int64_t memories);
void wasmtime_store_epoch_deadline_callback(
    wasmtime_store_t *store,
    wasmtime_error_t *(*func)(wasmtime_context_t *context, void *data, uint64_t *epoch_deadline_delta,
                              wasmtime_update_deadline_kind_t *update_kind),
    void *data, void (*finalizer)(void *));
void wasmtime_context_set_epoch_deadline(wasmtime_context_t *context, uint64_t ticks_beyond_current);
wasmtime_error_t *wasmtime_context_set_fuel(wasmtime_context_t *context, uint64_t fuel);

wasmtime_error_t *wasmtime_instance_new(wasmtime_context_t *store, const wasmtime_module_t *module,
                                        const wasmtime_extern_t *imports, size_t nimports,
                                        wasmtime_instance_t *instance, wasm_trap_t **trap);
bool wasmtime_instance_export_get(wasmtime_context_t *store, const wasmtime_instance_t *instance,
                                  const char *name, size_t name_len, wasmtime_extern_t *item);
wasm_functype_t *wasmtime_func_type(const wasmtime_context_t *store, const wasmtime_func_t *func);
bool wasmtime_instance_export_nth(wasmtime_context_t *store, const wasmtime_instance_t *instance,
                                  size_t index, char **name, size_t *name_len,
                                  wasmtime_extern_t *item);
size_t wasmtime_memory_data_size(const wasmtime_context_t *store, const wasmtime_memory_t *memory);
wasmtime_error_t *wasmtime_func_call(wasmtime_context_t *store, const wasmtime_func_t *func,
                                     const wasmtime_val_t *args, size_t nargs,
                                     wasmtime_val_t *results, size_t nresults, wasm_trap_t **trap);

/* The layouts above must match wasmtime's (C99 has no static_assert: a negative array size
 * fails the build instead). */
typedef char wasmtime_val_is_32_bytes[sizeof(wasmtime_val_t) == 32 ? 1 : -1];
typedef char wasmtime_extern_is_32_bytes[sizeof(wasmtime_extern_t) == 32 ? 1 : -1];
typedef char wasmtime_memory_is_24_bytes[sizeof(wasmtime_memory_t) == 24 ? 1 : -1];
typedef char wasmtime_instance_is_16_bytes[sizeof(wasmtime_instance_t) == 16 ? 1 : -1];

#endif

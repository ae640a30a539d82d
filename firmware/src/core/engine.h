/* The wasm engine behind the proplet: WAMR on the device (engine/engine_wamr.c), the wasmtime
 * C library on the host (engine/engine_wasmtime.c).
 *
 * A module is parsed once and instantiated many times; each instance has its own stack,
 * memory and fuel limits. Except for engine_interrupt(), an instance is used by one thread.
 */
#ifndef PROPLET_ENGINE_H
#define PROPLET_ENGINE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "limits.h"
#include "wasmval.h"

typedef struct engine_module engine_module_t;
typedef struct engine_instance engine_instance_t;

typedef struct {
    /* Bytes for the engine's own allocator (WAMR's pool: modules, instances, linear memory).
     * 0: the engine allocates from the system heap. */
    size_t arena_bytes;
    /* Largest wasm operand/call stack of one call (engines that fix it per engine). */
    uint32_t max_stack_bytes;
} engine_config_t;

typedef struct {
    uint32_t stack_bytes;  /* wasm stack of this instance; 0: engine default */
    uint64_t memory_bytes; /* largest linear memory; 0: engine default */
    uint64_t fuel;         /* instruction budget; 0: unlimited */
} engine_limits_t;

typedef enum {
    ENGINE_OK,
    ENGINE_TRAP,          /* the module trapped; the message names the trap */
    ENGINE_INTERRUPTED,   /* engine_interrupt() was called */
    ENGINE_OUT_OF_FUEL,   /* the fuel budget ran out */
    ENGINE_NO_MEMORY,     /* the engine could not allocate what the module needs */
    ENGINE_ERROR          /* anything else; the message says what */
} engine_status_t;

typedef struct {
    size_t param_count;
    wasm_type_t params[PROPLET_PARAMS_MAX];
    size_t result_count;
    wasm_type_t results[PROPLET_RESULTS_MAX];
} engine_signature_t;

/* Engine name for the discovery metadata ("wamr", "wasmtime-c-api"). */
const char *engine_name(void);

bool engine_init(const engine_config_t *config, char *err, size_t err_len);
void engine_shutdown(void);

/* Every thread that calls into the engine (the workers) brackets its life with these. */
void engine_thread_begin(void);
void engine_thread_end(void);

/* Parse and validate a module. `bytes` must stay valid and unmodified by the caller until
 * engine_unload() (WAMR keeps pointers into it). */
engine_module_t *engine_load(uint8_t *bytes, size_t len, char *err, size_t err_len);
void engine_unload(engine_module_t *module);

engine_instance_t *engine_instantiate(engine_module_t *module, const engine_limits_t *limits,
                                      engine_status_t *status, char *err, size_t err_len);

/* Parameter and result types of an exported function. False (with err) when the module has no
 * such export, it is not a function, or its signature exceeds the bounds above. */
bool engine_signature(engine_instance_t *instance, const char *export_name,
                      engine_signature_t *sig, char *err, size_t err_len);

engine_status_t engine_call(engine_instance_t *instance, const char *export_name,
                            const wasm_value_t *args, size_t arg_count, wasm_value_t *results,
                            size_t result_count, char *err, size_t err_len);

/* Make a running (or the next) engine_call on this instance stop with ENGINE_INTERRUPTED.
 * Safe to call from another thread while the call runs. */
void engine_interrupt(engine_instance_t *instance);

/* Current linear memory size of the instance in bytes (0 when it has none). */
uint64_t engine_memory_bytes(engine_instance_t *instance);

void engine_destroy(engine_instance_t *instance);

/* The engine's arena, when it has one: false when it allocates from the system heap. */
bool engine_arena(uint64_t *total_bytes, uint64_t *free_bytes);

#endif

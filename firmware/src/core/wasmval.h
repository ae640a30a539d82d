/* Task inputs to wasm values and wasm results to the `results` string.
 *
 * This is the C side of the wire contract in core/wasmvalues.py: the same task gives
 * byte-identical results on the Python and the embedded proplet. See that module for the rules.
 */
#ifndef PROPLET_WASMVAL_H
#define PROPLET_WASMVAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef enum {
    WASM_TYPE_I32,
    WASM_TYPE_I64,
    WASM_TYPE_F32,
    WASM_TYPE_F64,
    WASM_TYPE_V128,
    WASM_TYPE_FUNCREF,
    WASM_TYPE_EXTERNREF,
    WASM_TYPE_OTHER
} wasm_type_t;

typedef struct {
    wasm_type_t type;
    union {
        int32_t i32;
        int64_t i64;
        float f32;
        double f64;
    } of;
} wasm_value_t;

/* "i32", "f64", "v128", ...: the names wasmtime and core/wasmvalues.py use. */
const char *wasm_type_name(wasm_type_t type);

/* Convert input `index` (its text) to a value of `type`. On failure writes the same message as
 * core.wasmvalues.parse_input into err and returns false. */
bool wasm_parse_input(const char *text, wasm_type_t type, size_t index, wasm_value_t *out,
                      char *err, size_t err_len);

/* Format one value as core.wasmvalues.format_value does. False when out is too small or the
 * type cannot be formatted. */
bool wasm_format_value(const wasm_value_t *value, char *out, size_t out_len);

/* Comma-joined format of several values ("" for none). False when out is too small. */
bool wasm_format_results(const wasm_value_t *values, size_t count, char *out, size_t out_len);

/* Python's repr() of an ASCII-ish string, for error messages that match the Python proplet. */
void wasm_py_repr(const char *text, char *out, size_t out_len);

#endif

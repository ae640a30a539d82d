/* A wasi:http/proxy handler written against the component model's canonical ABI by hand (no
 * bindings generator, no libc), so the component is a few KB and `wasmtime serve` starts in
 * milliseconds. It answers every request with 200 and "hello from wasi:http at <path>\n".
 * Built with: clang --target=wasm32-wasi -O2 -nostdlib -Wl,--no-entry, then embedded with the
 * wasi:http@0.2.12 WIT and turned into a component (tests/wasmfixtures.py). */
#include <stdint.h>

#define EXPORT(name) __attribute__((export_name(name)))
#define IMPORT(module, name) __attribute__((import_module(module), import_name(name)))
#define HTTP "wasi:http/types@0.2.12"
#define IO "wasi:io/streams@0.2.12"

IMPORT(HTTP, "[constructor]fields") int32_t fields_new(void);
IMPORT(HTTP, "[constructor]outgoing-response") int32_t outgoing_response_new(int32_t headers);
IMPORT(HTTP, "[method]outgoing-response.body") void outgoing_response_body(int32_t self, void *ret);
IMPORT(HTTP, "[method]outgoing-body.write") void outgoing_body_write(int32_t self, void *ret);
IMPORT(HTTP, "[static]outgoing-body.finish")
void outgoing_body_finish(int32_t body, int32_t has_trailers, int32_t trailers, void *ret);
/* (param, result<outgoing-response, error-code>) flattened: ok is tag 0 + handle, the rest is
 * the error-code payload's slots, unused here. */
IMPORT(HTTP, "[static]response-outparam.set")
void response_outparam_set(int32_t param, int32_t tag, int32_t response, int32_t e1, int64_t e2,
                           int32_t e3, int32_t e4, int32_t e5, int32_t e6);
IMPORT(HTTP, "[method]incoming-request.path-with-query") void path_with_query(int32_t self, void *ret);
IMPORT(HTTP, "[resource-drop]incoming-request") void incoming_request_drop(int32_t self);
IMPORT(IO, "[method]output-stream.blocking-write-and-flush")
void blocking_write_and_flush(int32_t self, const void *data, uint32_t len, void *ret);
IMPORT(IO, "[resource-drop]output-stream") void output_stream_drop(int32_t self);

extern unsigned char __heap_base;
static uintptr_t heap_top;

EXPORT("cabi_realloc")
void *cabi_realloc(void *old, uint32_t old_size, uint32_t align, uint32_t new_size) {
    if (heap_top == 0) heap_top = (uintptr_t)&__heap_base;
    heap_top = (heap_top + align - 1) & ~(uintptr_t)(align - 1);
    uintptr_t need = heap_top + new_size;
    uintptr_t have = __builtin_wasm_memory_size(0) * 65536u;
    if (need > have && __builtin_wasm_memory_grow(0, (need - have + 65535u) / 65536u) == (uintptr_t)-1)
        __builtin_trap();
    unsigned char *out = (unsigned char *)heap_top;
    for (uint32_t i = 0; old && i < old_size && i < new_size; i++) out[i] = ((unsigned char *)old)[i];
    heap_top = need;
    return out;
}

/* Large enough for any of the result layouts above (error-code is the largest: 40 bytes). */
static _Alignas(8) unsigned char ret[64];
static unsigned char body[512];

EXPORT("wasi:http/incoming-handler@0.2.12#handle")
void handle(int32_t request, int32_t outparam) {
    uint32_t n = 0;
    static const char prefix[] = "hello from wasi:http at ";
    for (const char *p = prefix; *p; p++) body[n++] = (unsigned char)*p;
    path_with_query(request, ret);
    if (ret[0] == 1) { /* some(string): pointer at 4, length at 8 */
        const unsigned char *path = (const unsigned char *)(uintptr_t)*(uint32_t *)(ret + 4);
        uint32_t len = *(uint32_t *)(ret + 8);
        for (uint32_t i = 0; i < len && n < sizeof body - 1; i++) body[n++] = path[i];
    }
    body[n++] = '\n';
    incoming_request_drop(request);

    int32_t response = outgoing_response_new(fields_new());
    outgoing_response_body(response, ret);
    int32_t outgoing = *(int32_t *)(ret + 4);
    response_outparam_set(outparam, 0, response, 0, 0, 0, 0, 0, 0);

    outgoing_body_write(outgoing, ret);
    int32_t stream = *(int32_t *)(ret + 4);
    blocking_write_and_flush(stream, body, n, ret);
    output_stream_drop(stream);
    outgoing_body_finish(outgoing, 0, 0, ret);
}

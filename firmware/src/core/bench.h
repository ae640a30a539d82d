/* The resident-instance benchmark: how many instances of a CPU-bound and of a memory-bound
 * module fit at once, what is left of the engine's arena, and what one call costs.
 *
 * The module is parsed once and instantiated until the engine refuses (or max_instances);
 * every instance is then called and its result checked. On the device the arena is WAMR's
 * pool; the host (wasmtime) has no arena and stops at max_instances.
 */
#ifndef PROPLET_BENCH_H
#define PROPLET_BENCH_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define BENCH_MAX_INSTANCES 64

extern const unsigned char bench_cpu_wasm[];
extern const size_t bench_cpu_wasm_len;
extern const unsigned char bench_mem_wasm[];
extern const size_t bench_mem_wasm_len;

typedef struct {
    const char *kind;         /* "cpu" or "mem" */
    unsigned instances;       /* resident at once */
    unsigned calls_ok;        /* instances whose call returned the expected value */
    bool arena_known;
    uint64_t arena_total_bytes;
    uint64_t arena_free_before; /* after parsing, before instantiating */
    uint64_t arena_free_after;  /* with every instance resident */
    bool heap_known;            /* the system heap, where the engine allocates outside its arena */
    uint64_t heap_free_before;
    uint64_t heap_free_after;
    uint64_t cpu_us_per_call;
    char stopped_by[160];       /* why no further instance was made */
} bench_result_t;

typedef struct {
    unsigned max_instances;
    uint32_t stack_bytes;
    uint64_t memory_bytes;
    uint64_t (*cpu_us)(void);    /* the calling thread's CPU time in microseconds */
    uint64_t (*heap_free)(void); /* free system heap in bytes; NULL when not meaningful */
} bench_options_t;

bool bench_run(const char *kind, const bench_options_t *options, bench_result_t *out, char *err,
               size_t err_len);

/* One JSON object on one line ("BENCH " is prefixed by the caller). */
size_t bench_format(const bench_result_t *r, char *buf, size_t cap);

#endif

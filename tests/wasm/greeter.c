/* Core module behind the greeter component (greeter.wit), written against the component model's
 * canonical ABI by hand so no bindings generator is needed: strings arrive as (pointer, length),
 * string results are returned through a pointer to a (pointer, length) pair, memory comes from
 * cabi_realloc. Built without libc: clang -nostdlib -Wl,--no-entry. */
#include <stdint.h>

#define EXPORT(name) __attribute__((export_name(name)))

extern unsigned char __heap_base;
static uintptr_t heap_top;

/* Bump allocator: each call gets a fresh instance, so nothing is ever freed. */
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

static uint32_t ret_area[2];

static uint32_t *return_string(const unsigned char *s, uint32_t len) {
    ret_area[0] = (uint32_t)(uintptr_t)s;
    ret_area[1] = len;
    return ret_area;
}

EXPORT("propeller:test/api#greet")
uint32_t *greet(const unsigned char *name, uint32_t len) {
    static const char prefix[] = "Hello, ";
    unsigned char *out = cabi_realloc(0, 0, 1, (uint32_t)sizeof prefix - 1 + len + 1);
    uint32_t n = 0;
    for (const char *p = prefix; *p; p++) out[n++] = (unsigned char)*p;
    for (uint32_t i = 0; i < len; i++) out[n++] = name[i];
    out[n++] = '!';
    return return_string(out, n);
}

EXPORT("propeller:test/api#add")
int32_t add(int32_t a, int32_t b) { return a + b; }

EXPORT("propeller:test/api#is-even")
int32_t is_even(uint64_t n) { return (n & 1) == 0; }

/* Counts occurrences of a char given as a Unicode scalar value (ASCII only: enough for tests). */
EXPORT("propeller:test/api#count-char")
uint32_t count_char(const unsigned char *s, uint32_t len, uint32_t c) {
    uint32_t count = 0;
    for (uint32_t i = 0; i < len; i++) count += s[i] == c;
    return count;
}

EXPORT("propeller:test/api#half")
double half(double x) { return x / 2; }

EXPORT("propeller:test/api#spin")
void spin(void) {
    for (;;) __asm__ volatile("");
}

EXPORT("propeller:test/api#fail")
void fail(void) { __builtin_trap(); }

/* Reads any byte of linear memory: past its end the guest must trap, whoever allocated it. */
EXPORT("propeller:test/api#peek")
uint32_t peek(uint32_t offset) { return *(volatile unsigned char *)(uintptr_t)offset; }

EXPORT("shout")
uint32_t *shout(const unsigned char *s, uint32_t len) {
    unsigned char *out = cabi_realloc(0, 0, 1, len);
    for (uint32_t i = 0; i < len; i++) out[i] = (s[i] >= 'a' && s[i] <= 'z') ? s[i] - 32 : s[i];
    return return_string(out, len);
}

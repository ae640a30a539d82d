/* WASI reactor (built with -mexec-model=reactor): `_initialize` runs the constructor, which sets
 * `base`; add_base only gives the right answer if the runtime called `_initialize` first. */
#include <stdint.h>

static int32_t base;

__attribute__((constructor)) static void init(void) { base = 40; }

__attribute__((export_name("add_base"))) int32_t add_base(int32_t x) { return base + x; }

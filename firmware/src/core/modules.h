/* The instance pool's module side: each module is parsed once (keyed by its sha256) and then
 * instantiated by every task that runs it, each instance with its own limits.
 *
 * Bounded to PROPLET_MODULE_CACHE entries. Not thread-safe: the proplet calls it under its
 * lock, and parses modules (engine_load) outside the lock.
 */
#ifndef PROPLET_MODULES_H
#define PROPLET_MODULES_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "digest.h"
#include "engine.h"
#include "limits.h"

typedef struct {
    bool used;
    uint8_t digest[SHA256_BYTES];
    engine_module_t *module;
    uint8_t *bytes; /* owned: WAMR keeps pointers into the module bytes */
    size_t len;
    unsigned refs;
    uint64_t last_used;
} module_entry_t;

typedef struct {
    module_entry_t entries[PROPLET_MODULE_CACHE];
    uint64_t clock;
} module_cache_t;

void modules_init(module_cache_t *cache);

/* The parsed module with this digest, with a reference taken; NULL when not cached. */
module_entry_t *modules_acquire(module_cache_t *cache, const uint8_t digest[SHA256_BYTES]);

/* Keep a module the caller parsed: the cache takes ownership of module and bytes and returns
 * the entry with a reference taken. When another thread cached the same digest meanwhile,
 * that entry is returned and *duplicate is set: the caller unloads its own copy. NULL when
 * every entry is in use: the caller keeps ownership and unloads after its task. */
module_entry_t *modules_insert(module_cache_t *cache, const uint8_t digest[SHA256_BYTES],
                               engine_module_t *module, uint8_t *bytes, size_t len,
                               bool *duplicate);

void modules_release(module_cache_t *cache, module_entry_t *entry);

/* Unload every module no task uses (to make room after an out-of-memory). Returns how many. */
size_t modules_evict_idle(module_cache_t *cache);

/* Unload everything (shutdown). */
void modules_clear(module_cache_t *cache);

#endif

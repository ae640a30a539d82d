#include "modules.h"

#include <stdlib.h>
#include <string.h>

void modules_init(module_cache_t *cache)
{
    memset(cache, 0, sizeof *cache);
}

static void drop(module_entry_t *e)
{
    engine_unload(e->module);
    free(e->bytes);
    memset(e, 0, sizeof *e);
}

module_entry_t *modules_acquire(module_cache_t *cache, const uint8_t digest[SHA256_BYTES])
{
    for (size_t i = 0; i < PROPLET_MODULE_CACHE; i++) {
        module_entry_t *e = &cache->entries[i];
        if (e->used && memcmp(e->digest, digest, SHA256_BYTES) == 0) {
            e->refs++;
            e->last_used = ++cache->clock;
            return e;
        }
    }
    return NULL;
}

module_entry_t *modules_insert(module_cache_t *cache, const uint8_t digest[SHA256_BYTES],
                               engine_module_t *module, uint8_t *bytes, size_t len,
                               bool *duplicate)
{
    *duplicate = false;
    module_entry_t *existing = modules_acquire(cache, digest);
    if (existing != NULL) {
        *duplicate = true;
        return existing;
    }
    module_entry_t *slot = NULL;
    for (size_t i = 0; i < PROPLET_MODULE_CACHE && slot == NULL; i++)
        if (!cache->entries[i].used)
            slot = &cache->entries[i];
    if (slot == NULL) {
        /* Evict the least recently used module that no task is running. */
        for (size_t i = 0; i < PROPLET_MODULE_CACHE; i++) {
            module_entry_t *e = &cache->entries[i];
            if (e->refs == 0 && (slot == NULL || e->last_used < slot->last_used))
                slot = e;
        }
        if (slot == NULL)
            return NULL;
        drop(slot);
    }
    slot->used = true;
    memcpy(slot->digest, digest, SHA256_BYTES);
    slot->module = module;
    slot->bytes = bytes;
    slot->len = len;
    slot->refs = 1;
    slot->last_used = ++cache->clock;
    return slot;
}

void modules_release(module_cache_t *cache, module_entry_t *entry)
{
    (void)cache;
    if (entry != NULL && entry->refs > 0)
        entry->refs--;
}

size_t modules_evict_idle(module_cache_t *cache)
{
    size_t evicted = 0;
    for (size_t i = 0; i < PROPLET_MODULE_CACHE; i++) {
        module_entry_t *e = &cache->entries[i];
        if (e->used && e->refs == 0) {
            drop(e);
            evicted++;
        }
    }
    return evicted;
}

void modules_clear(module_cache_t *cache)
{
    for (size_t i = 0; i < PROPLET_MODULE_CACHE; i++)
        if (cache->entries[i].used)
            drop(&cache->entries[i]);
}

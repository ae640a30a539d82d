/* Shared helpers of the unit tests: cmocka, a base64 encoder, and a fake port that records
 * what the proplet publishes. */
#ifndef PROPLET_TESTING_H
#define PROPLET_TESTING_H

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "../src/core/proplet.h"

/* ---- fake_engine.c ---- */

typedef void (*fake_hook_t)(void);

typedef struct {
    unsigned loads;
    unsigned unloads;
    unsigned instantiations;
    unsigned live_instances;
    unsigned fail_instantiations; /* the next N instantiations fail with ENGINE_NO_MEMORY */
    fake_hook_t during_call;      /* runs inside engine_call of the "block" export */
    uint64_t last_fuel;
    uint64_t last_memory_bytes;
} fake_engine_t;

extern fake_engine_t fake_engine;
void fake_engine_reset(void);

/* A module the fake engine accepts: the wasm magic and version, then `tag` (which makes
 * modules with different tags have different digests). */
size_t fake_module(const char *tag, uint8_t *out, size_t cap);

/* ---- base64 (tests only: the firmware never encodes) ---- */

static inline void b64_encode(const uint8_t *data, size_t len, char *out)
{
    static const char alphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t o = 0;
    for (size_t i = 0; i < len; i += 3) {
        uint32_t v = (uint32_t)data[i] << 16;
        if (i + 1 < len)
            v |= (uint32_t)data[i + 1] << 8;
        if (i + 2 < len)
            v |= data[i + 2];
        out[o++] = alphabet[(v >> 18) & 63];
        out[o++] = alphabet[(v >> 12) & 63];
        out[o++] = i + 1 < len ? alphabet[(v >> 6) & 63] : '=';
        out[o++] = i + 2 < len ? alphabet[v & 63] : '=';
    }
    out[o] = '\0';
}

/* ---- the proplet the proplet tests drive: "dev-1" in domain acme, channel ch ---- */

#define TEST_PREFIX "m/acme/c/ch/"

static inline proplet_config_t test_config(void)
{
    proplet_config_t cfg = {
        .proplet_id = "dev-1",
        .domain = "acme",
        .channel = "ch",
        .slots = 2,
        .max_module_bytes = 4096,
        .stack_bytes = 8192,
        .max_memory_bytes = 1 << 20,
        .heartbeat_ms = 10000,
        .metrics_ms = 30000,
        .default_timeout_ms = 0,
        .fetch_retry_ms = 2000,
        .fetch_retries = 2,
        .cpu_mhz = 240,
        .os = "test",
        .cpu_arch = "none",
    };
    return cfg;
}

/* `payload` on the proplet's topic `suffix`, as the MQTT client hands it over. */
static inline void test_deliver(proplet_t *p, const char *suffix, const char *payload)
{
    char topic[PROPLET_TOPIC_MAX + 1];
    snprintf(topic, sizeof topic, TEST_PREFIX "%s", suffix);
    proplet_on_message(p, topic, strlen(topic), payload, strlen(payload));
}

static inline void expect_contains(const char *text, const char *needle)
{
    if (text == NULL)
        fail_msg("expected a message containing '%s', got none", needle);
    if (strstr(text, needle) == NULL)
        fail_msg("'%s' does not contain '%s'", text, needle);
}

/* ---- a fake port: single-threaded, records publishes ---- */

#define RECORDED_MAX 64

typedef struct {
    char topic[PROPLET_TOPIC_MAX + 1];
    char payload[PROPLET_MSG_MAX + 1];
} recorded_t;

typedef struct {
    recorded_t messages[RECORDED_MAX];
    size_t count;
    uint64_t now;
    int lock_depth;
    unsigned wakes;
    uint64_t cpu_us;
    /* Runs after each recorded publish, outside the lock (another thread acting meanwhile). */
    void (*after_publish)(const char *topic);
    /* The broker is unreachable: publishes fail (and are not recorded). */
    bool offline;
} fake_port_t;

extern fake_port_t fake;

proplet_port_t fake_port_make(void);
void fake_port_reset(void);
/* The n-th recorded message on a topic suffix (0 = first), NULL when there is none. */
const char *fake_published(const char *suffix, size_t n);
size_t fake_count(const char *suffix);

#endif

#include "proplet.h"

#include <ctype.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "b64.h"

const char *const proplet_subscriptions[PROPLET_SUBSCRIPTION_COUNT] = {
    TOPIC_START, TOPIC_STOP, TOPIC_RESULT_ACK, TOPIC_DISCOVER, TOPIC_REGISTRY_CHUNK,
    TOPIC_REGISTRY_CHUNK_BINARY};

static const char *const capabilities[] = {"task_state", "result_ack"};

/* The chunk encoding to ask for: raw bytes unless they recently never arrived. */
static const char *chunk_encoding(const proplet_t *p, uint64_t now)
{
    return now < p->json_chunks_until_ms ? NULL : CHUNK_ENCODING_BINARY;
}

/* ------------------------------------------------------------------------------------------
 * small helpers */

static void plog(proplet_t *p, int level, const char *fmt, ...)
{
    if (p->port.log == NULL)
        return;
    char line[PROPLET_ERROR_TEXT_MAX + 128];
    va_list args;
    va_start(args, fmt);
    vsnprintf(line, sizeof line, fmt, args);
    va_end(args);
    p->port.log(p->port.ctx, level, line);
}

static void lock(proplet_t *p)
{
    p->port.lock(p->port.ctx);
}

static void unlock(proplet_t *p)
{
    p->port.unlock(p->port.ctx);
}

static uint64_t now_ms(proplet_t *p)
{
    return p->port.now_ms(p->port.ctx);
}

static void copy_text(char *dst, size_t cap, const char *src)
{
    snprintf(dst, cap, "%s", src != NULL ? src : "");
}

bool proplet_topic(const proplet_t *p, const char *suffix, char *out, size_t len)
{
    int n = snprintf(out, len, "%s%s", p->prefix, suffix);
    return n > 0 && (size_t)n < len;
}

/* Publish outside the lock; a message that cannot be encoded (len 0) is logged, not sent.
 * False when it did not go out. */
static bool send(proplet_t *p, const char *suffix, const char *payload, size_t len)
{
    char topic[PROPLET_TOPIC_MAX + 1];
    if (len == 0) {
        plog(p, PROPLET_LOG_ERROR, "a %s message did not fit %d bytes and was not sent", suffix,
             PROPLET_MSG_MAX);
        return false;
    }
    if (!proplet_topic(p, suffix, topic, sizeof topic))
        return false;
    if (!p->port.publish(p->port.ctx, topic, payload, len)) {
        plog(p, PROPLET_LOG_WARN, "publishing on %s failed; the MQTT client is not connected",
             topic);
        return false;
    }
    return true;
}

static void timestamp(proplet_t *p, char *out, size_t len)
{
    out[0] = '\0';
    if (p->port.wall_clock == NULL || !p->port.wall_clock(p->port.ctx, out, len))
        out[0] = '\0';
}

/* The facts needed to answer about a task once the lock is released. */
typedef struct {
    char id[PROPLET_ID_MAX + 1];
    uint32_t attempt;
    char traceparent[PROPLET_TRACEPARENT_MAX + 1];
} task_ref_t;

static void ref_from_task(task_ref_t *ref, const start_msg_t *task)
{
    memcpy(ref->id, task->id, sizeof ref->id);
    ref->attempt = task->attempt;
    memcpy(ref->traceparent, task->traceparent, sizeof ref->traceparent);
}

static bool send_result(proplet_t *p, const task_ref_t *ref, const char *results,
                        const char *error, char *buf)
{
    result_msg_t msg = {ref->id, p->cfg.proplet_id, results, error, ref->attempt,
                        ref->traceparent};
    return send(p, TOPIC_RESULTS, buf, protocol_encode_result(&msg, buf, PROPLET_MSG_MAX));
}

static void send_task_state(proplet_t *p, const task_ref_t *ref, const char *state,
                            const char *reason, char *buf)
{
    task_state_msg_t msg = {ref->id, p->cfg.proplet_id, state, ref->attempt, reason,
                            ref->traceparent};
    send(p, TOPIC_TASK_STATE, buf, protocol_encode_task_state(&msg, buf, PROPLET_MSG_MAX));
}

/* Whether the proplet still owes the manager this result: not acknowledged and, when the manager
 * does not acknowledge at all, not sent yet. Under the lock. */
static bool owed(const proplet_t *p, const recent_task_t *r)
{
    return r->unconfirmed && (p->acks_seen || r->sent_ms == 0);
}

/* Under the lock. `sent`: the result went out (the broker took it). `dropped_id` gets the id of
 * an unconfirmed result pushed out to make room ("" if none), for the caller to log once unlocked. */
static void remember_finished(proplet_t *p, const task_ref_t *ref, const char *results,
                              const char *error, bool sent, char dropped_id[PROPLET_ID_MAX + 1])
{
    recent_task_t *r = &p->recent[p->recent_next];
    dropped_id[0] = '\0';
    if (r->id[0] != '\0' && owed(p, r)) {
        p->counters.results_dropped++;
        memcpy(dropped_id, r->id, sizeof r->id);
    }
    uint64_t now = now_ms(p);
    r->unconfirmed = true;
    r->finished_ms = now;
    r->sent_ms = sent ? now : 0;
    memcpy(r->id, ref->id, sizeof r->id);
    r->attempt = ref->attempt;
    memcpy(r->traceparent, ref->traceparent, sizeof r->traceparent);
    copy_text(r->results, sizeof r->results, results);
    copy_text(r->error, sizeof r->error, error);
    p->recent_next = (p->recent_next + 1) % PROPLET_RECENT_TASKS;
}

static const recent_task_t *finished_recently(const proplet_t *p, const char *id, uint32_t attempt)
{
    for (size_t i = 0; i < PROPLET_RECENT_TASKS; i++)
        if (p->recent[i].id[0] != '\0' && p->recent[i].attempt == attempt
            && strcmp(p->recent[i].id, id) == 0)
            return &p->recent[i];
    return NULL;
}

/* Return a slot to the pool, freeing what it holds. Under the lock. */
static void free_slot(slot_t *s)
{
    free(s->module);
    assembler_reset(&s->assembler);
    memset(s, 0, sizeof *s);
}

/* Under the lock: the task in s is done; its outcome goes out before the slot is freed. */
static void begin_report(slot_t *s, task_ref_t *ref)
{
    ref_from_task(ref, &s->task);
    s->state = SLOT_REPORTING;
}

/* Publish a task's outcome, then free its slot (the caller does not hold the lock). */
static void finish_report(proplet_t *p, slot_t *s, const task_ref_t *ref, const char *results,
                          const char *error, char *buf)
{
    bool failed = error != NULL && error[0] != '\0';
    bool sent = send_result(p, ref, failed ? "" : results, error, buf);
    char dropped_id[PROPLET_ID_MAX + 1];
    lock(p);
    remember_finished(p, ref, failed ? "" : results, error, sent, dropped_id);
    if (failed)
        p->counters.tasks_failed++;
    else
        p->counters.tasks_completed++;
    free_slot(s);
    unlock(p);
    /* Logged here, not under the lock: a device's log writes to the UART and may block. */
    if (dropped_id[0] != '\0')
        plog(p, PROPLET_LOG_ERROR,
             "the result of task %s was never confirmed and is dropped: more than %d tasks finished "
             "before the manager had it (the manager retries or fails the task)", dropped_id,
             PROPLET_RECENT_TASKS);
}

static slot_t *find_task(proplet_t *p, const char *id)
{
    for (unsigned i = 0; i < p->cfg.slots; i++)
        if (p->slots[i].state != SLOT_FREE && strcmp(p->slots[i].task.id, id) == 0)
            return &p->slots[i];
    return NULL;
}

unsigned proplet_busy_slots(proplet_t *p)
{
    unsigned busy = 0;
    lock(p);
    for (unsigned i = 0; i < p->cfg.slots; i++)
        busy += p->slots[i].state != SLOT_FREE;
    unlock(p);
    return busy;
}

/* ------------------------------------------------------------------------------------------
 * lifecycle */

bool proplet_init(proplet_t *p, const proplet_config_t *cfg, const proplet_port_t *port,
                  char *err, size_t err_len)
{
    memset(p, 0, sizeof *p);
    p->cfg = *cfg;
    p->port = *port;
    if (cfg->proplet_id[0] == '\0' || cfg->domain[0] == '\0' || cfg->channel[0] == '\0') {
        snprintf(err, err_len, "the proplet id, domain and channel must all be set");
        return false;
    }
    if (cfg->slots == 0 || cfg->slots > PROPLET_MAX_SLOTS) {
        snprintf(err, err_len, "the pool size must be between 1 and %d, got %u",
                 PROPLET_MAX_SLOTS, cfg->slots);
        return false;
    }
    int n = snprintf(p->prefix, sizeof p->prefix, "m/%s/c/%s/", cfg->domain, cfg->channel);
    /* The longest suffix must still fit behind the prefix. */
    if (n < 0 || (size_t)n + strlen(TOPIC_TASK_METRICS) >= sizeof p->prefix) {
        snprintf(err, err_len, "the domain and channel names are too long for a topic");
        return false;
    }
    if (cfg->trusted_keys.count > PROPLET_TRUSTED_KEYS_MAX) {
        snprintf(err, err_len, "too many trusted keys: this proplet holds at most %d",
                 PROPLET_TRUSTED_KEYS_MAX);
        return false;
    }
    if (cfg->trusted_keys.count > 0 && !ed25519_init()) {
        snprintf(err, err_len, "the Ed25519 library could not be initialised, so module "
                               "signatures cannot be checked");
        return false;
    }
    modules_init(&p->modules);
    return true;
}

bool proplet_last_will(const proplet_t *p, char *topic, size_t topic_len, char *payload,
                       size_t payload_len, size_t *payload_written)
{
    alive_msg_t msg = {p->cfg.proplet_id, "offline", PROPLET_NAMESPACE, NULL, 0};
    *payload_written = protocol_encode_alive(&msg, payload, payload_len);
    return *payload_written > 0 && proplet_topic(p, TOPIC_ALIVE, topic, topic_len);
}

static void send_alive(proplet_t *p, char *buf)
{
    /* Tasks in slots, and finished ones whose result has not gone out yet: the manager must not
     * take a task it does not see here for lost while its result waits for the broker. */
    const char *running[PROPLET_MAX_SLOTS + PROPLET_RECENT_TASKS];
    char ids[PROPLET_MAX_SLOTS + PROPLET_RECENT_TASKS][PROPLET_ID_MAX + 1];
    size_t count = 0;
    lock(p);
    for (unsigned i = 0; i < p->cfg.slots; i++) {
        if (p->slots[i].state == SLOT_FREE)
            continue;
        memcpy(ids[count], p->slots[i].task.id, sizeof ids[count]);
        running[count] = ids[count];
        count++;
    }
    for (size_t i = 0; i < PROPLET_RECENT_TASKS; i++) {
        if (!owed(p, &p->recent[i]))
            continue;
        memcpy(ids[count], p->recent[i].id, sizeof ids[count]);
        running[count] = ids[count];
        count++;
    }
    unlock(p);
    alive_msg_t msg = {p->cfg.proplet_id, "alive", PROPLET_NAMESPACE, running, count};
    send(p, TOPIC_ALIVE, buf, protocol_encode_alive(&msg, buf, PROPLET_MSG_MAX));
}

/* The discovery (create): who this proplet is and what it can do, capabilities included. The
 * caller passes its own thread's buffer. */
static void send_discovery(proplet_t *p, char *buf)
{
    char ip[48] = "";
    if (p->port.network_address != NULL)
        p->port.network_address(p->port.ctx, ip, sizeof ip);
    discovery_msg_t msg = {
        .proplet_id = p->cfg.proplet_id,
        .namespace_ = PROPLET_NAMESPACE,
        .description = p->cfg.description,
        .os = p->cfg.os,
        .hostname = p->cfg.hostname,
        .cpu_arch = p->cfg.cpu_arch,
        .ip = ip,
        .wasm_runtime = engine_name(),
        .proplet_version = PROPLET_VERSION,
        .total_memory_bytes = p->cfg.total_memory_bytes,
        .max_concurrent_tasks = p->cfg.slots,
        .heartbeat_interval_s = p->cfg.heartbeat_ms / 1000.0,
        .max_module_bytes = p->cfg.max_module_bytes,
        .capabilities = capabilities,
        .capability_count = sizeof capabilities / sizeof capabilities[0],
    };
    send(p, TOPIC_CREATE, buf, protocol_encode_discovery(&msg, buf, PROPLET_MSG_MAX));
}

/* Send again the results the manager may not have: after a connect (`reconnected`) every one not
 * acknowledged (without acknowledgements, the recent ones and those never sent), otherwise those
 * sent but unacknowledged for PROPLET_RESULT_RESEND_MS (a result that could not go out at all
 * waits for the connect: trying it on every tick would only log failures). Oldest first; stops at
 * the first that does not go out.
 *
 * On the timer, the discovery goes out again before the first due result, at most once per
 * PROPLET_RESULT_RESEND_MS: a manager that confirmed results before and now lets them wait may know
 * this proplet only from its heartbeats (it was deleted while online, or the manager started on a
 * new database), and without the discovery's capabilities it never confirms. */
static void resend_results(proplet_t *p, char *buf, bool reconnected)
{
    for (size_t n = 0; n < PROPLET_RECENT_TASKS; n++) {
        size_t i = (p->recent_next + n) % PROPLET_RECENT_TASKS;
        task_ref_t ref;
        char results[PROPLET_RESULT_TEXT_MAX + 1], error[PROPLET_ERROR_TEXT_MAX + 1];
        lock(p);
        recent_task_t *r = &p->recent[i];
        uint64_t now = now_ms(p);
        bool due = r->id[0] != '\0' && r->unconfirmed
                   && (reconnected ? p->acks_seen || r->sent_ms == 0
                                         || now - r->finished_ms < PROPLET_UNCONFIRMED_TTL_MS
                                   : p->connected && p->acks_seen && r->sent_ms != 0
                                         && now - r->sent_ms >= PROPLET_RESULT_RESEND_MS);
        /* Claimed under the lock: a connect on the MQTT thread announces too. */
        bool rediscover = due && !reconnected && now - p->discovery_ms >= PROPLET_RESULT_RESEND_MS;
        if (rediscover)
            p->discovery_ms = now;
        if (due) {
            memcpy(ref.id, r->id, sizeof ref.id);
            ref.attempt = r->attempt;
            memcpy(ref.traceparent, r->traceparent, sizeof ref.traceparent);
            memcpy(results, r->results, sizeof results);
            memcpy(error, r->error, sizeof error);
        }
        unlock(p);
        if (!due)
            continue;
        if (rediscover) {
            plog(p, PROPLET_LOG_INFO, "announcing this proplet again: the result of task %s waits "
                 "unconfirmed (does the manager know this proplet only from its heartbeats?)", ref.id);
            send_discovery(p, buf);
        }
        bool sent = send_result(p, &ref, results, error[0] != '\0' ? error : NULL, buf);
        if (!sent)
            return; /* disconnected: the next connect tries again */
        lock(p);
        if (r->attempt == ref.attempt && strcmp(r->id, ref.id) == 0)
            r->sent_ms = now_ms(p);
        p->counters.results_resent++;
        unlock(p);
        plog(p, PROPLET_LOG_INFO, "sent the result of task %s again (not confirmed by the manager yet)",
             ref.id);
    }
}

void proplet_on_disconnected(proplet_t *p)
{
    lock(p);
    p->connected = false;
    unlock(p);
}

void proplet_on_connected(proplet_t *p)
{
    lock(p);
    p->connected = true;
    p->discovery_ms = now_ms(p);
    unlock(p);
    char *buf = p->inbound_out[0];
    send_discovery(p, buf);
    resend_results(p, buf, true);
    send_alive(p, buf);
    lock(p);
    p->announced = true;
    p->next_heartbeat_ms = now_ms(p) + p->cfg.heartbeat_ms;
    unlock(p);
}

/* ------------------------------------------------------------------------------------------
 * start */

typedef enum {
    START_CONFIRMED, /* already held: confirm it again (the first confirmation may be lost) */
    START_RESENT,    /* already finished: send its result again */
    START_ADOPTED,   /* already held: now on the newer attempt */
    START_ACCEPTED, /* in a slot */
    START_REJECTED, /* transient refusal: the manager may send it elsewhere */
    START_UNSUPPORTED, /* never runs here, may elsewhere: task_state unsupported (our manager) */
    START_FAILED    /* the task cannot run here: failed result */
} start_outcome_t;

typedef struct {
    start_outcome_t outcome;
    task_ref_t ref;
    char results[PROPLET_RESULT_TEXT_MAX + 1];
    char text[PROPLET_ERROR_TEXT_MAX + 1];
    bool fetch;
    char app_name[PROPLET_APP_NAME_MAX + 1];
    bool ready;
} start_decision_t;

static void decide_with(start_decision_t *d, start_outcome_t outcome, const char *fmt, va_list args)
{
    vsnprintf(d->text, sizeof d->text, fmt, args);
    d->outcome = outcome;
}

static void decide_failed(start_decision_t *d, const char *fmt, ...)
{
    va_list args;
    va_start(args, fmt);
    decide_with(d, START_FAILED, fmt, args);
    va_end(args);
}

/* Whether a task that cannot run on this proplet, for what the proplet is (a component, a module
 * too large for it, a latent task), is answered with task_state `unsupported`, which this project's
 * manager takes to send it to another proplet (or to fail it, if it is pinned here). Upstream's
 * manager reads no task_state and numbers no attempts: it gets a failed result, as does each
 * proplet's answer to a broadcast. */
static bool may_go_elsewhere(uint32_t attempt, bool broadcast)
{
    return attempt > 0 && !broadcast;
}

/* The task never runs here, but may on another proplet. */
static void decide_cannot_run(start_decision_t *d, const start_msg_t *m, const char *fmt, ...)
{
    va_list args;
    va_start(args, fmt);
    bool elsewhere = may_go_elsewhere(m->attempt, m->broadcast);
    decide_with(d, elsewhere ? START_UNSUPPORTED : START_FAILED, fmt, args);
    va_end(args);
}

/* Whether an image_url is fetched over HTTP(S), as core.domain.is_http_url tells. */
static bool is_http_url(const char *url)
{
    static const char *const schemes[] = {"http://", "https://"};
    for (size_t s = 0; s < sizeof schemes / sizeof schemes[0]; s++) {
        size_t i = 0;
        while (schemes[s][i] != '\0' && tolower((unsigned char)url[i]) == schemes[s][i])
            i++;
        if (schemes[s][i] == '\0')
            return true;
    }
    return false;
}

/* A WebAssembly component rather than a core module, as core.domain.is_component tells: the
 * preamble's version is 0x0d (0x0a in older encodings) and its layer 1. */
static bool is_component(const uint8_t *module, size_t len)
{
    return len >= 8 && memcmp(module, "\0asm", 4) == 0 && (module[4] == 0x0d || module[4] == 0x0a)
           && module[6] == 0x01 && module[7] == 0x00;
}

/* A LEB128 u32 at *pos, advancing it; false past `end` or over 32 bits. */
static bool read_u32(const uint8_t *m, size_t end, size_t *pos, uint32_t *out)
{
    uint32_t value = 0;
    for (unsigned shift = 0; shift < 35; shift += 7) {
        if (*pos >= end)
            return false;
        uint8_t byte = m[(*pos)++];
        value |= (uint32_t)(byte & 0x7f) << shift;
        if ((byte & 0x80) == 0) {
            *out = value;
            return true;
        }
    }
    return false;
}

/* Whether a core module imports anything, naming its first import ("module.name") in `what`.
 * The embedded proplet links no host functions (no WASI, no libc on the device): such a module
 * cannot run here, but can on a proplet with WASI. Sections are walked, not validated: a module
 * that does not parse is left to the engine, which says why. */
static bool first_import(const uint8_t *m, size_t len, char *what, size_t what_len)
{
    size_t pos = 8;
    while (pos < len) {
        uint8_t id = m[pos++];
        uint32_t size;
        if (!read_u32(m, len, &pos, &size) || size > len - pos)
            return false;
        if (id != 2) {
            pos += size;
            continue;
        }
        size_t end = pos + size;
        uint32_t count, module_len, name_len;
        if (!read_u32(m, end, &pos, &count) || count == 0
            || !read_u32(m, end, &pos, &module_len) || module_len > end - pos)
            return false;
        size_t module_at = pos;
        pos += module_len;
        if (!read_u32(m, end, &pos, &name_len) || name_len > end - pos)
            return false;
        snprintf(what, what_len, "%.*s.%.*s%s", (int)module_len, (const char *)m + module_at,
                 (int)name_len, (const char *)m + pos, count > 1 ? " and more" : "");
        return true;
    }
    return false;
}

#define IMPORTS_REFUSAL                                                                            \
    "the module imports %s; the embedded proplet provides no imports (no WASI), so export the "    \
    "function to call and import nothing, or run the task on a proplet with WASI"

#define COMPONENT_REFUSAL                                                                         \
    "the module is a WebAssembly component; this proplet runs core modules only: run the task on " \
    "a proplet that runs components"

/* Decode the inline module into its own buffer, bounded by max_module_bytes. */
static bool decode_inline(proplet_t *p, const start_msg_t *m, uint8_t **out, size_t *out_len,
                          start_decision_t *d)
{
    size_t len;
    if (!b64_decoded_len(m->file_b64, m->file_b64_len, &len)) {
        decide_failed(d, "field 'file' is not valid standard base64");
        return false;
    }
    if (len > p->cfg.max_module_bytes) {
        decide_cannot_run(d, m,
                          "the module is %zu bytes but this proplet holds at most %zu; use a smaller "
                          "module or run the task on a proplet with more memory",
                          len, p->cfg.max_module_bytes);
        return false;
    }
    uint8_t *buf = malloc(len > 0 ? len : 1);
    if (buf == NULL) {
        decide_cannot_run(d, m, "out of memory: cannot hold the %zu-byte module", len);
        return false;
    }
    if (!b64_decode(m->file_b64, m->file_b64_len, buf, len, out_len)) {
        free(buf);
        decide_failed(d, "field 'file' is not valid standard base64");
        return false;
    }
    if (is_component(buf, *out_len)) {
        free(buf);
        decide_cannot_run(d, m, COMPONENT_REFUSAL);
        return false;
    }
    char import[PROPLET_ERROR_TEXT_MAX / 2];
    if (first_import(buf, *out_len, import, sizeof import)) {
        free(buf);
        decide_cannot_run(d, m, IMPORTS_REFUSAL, import);
        return false;
    }
    *out = buf;
    return true;
}

/* Under the lock: what to do with a start addressed to this proplet. `untrusted` is why its
 * signature does not pass (signature_check_start), "" when it does. */
static void decide_start(proplet_t *p, const start_msg_t *m, const char *untrusted,
                         start_decision_t *d)
{
    memset(d, 0, sizeof *d);
    ref_from_task(&d->ref, m);
    slot_t *held = find_task(p, m->id);
    if (held != NULL && held->state == SLOT_REPORTING && m->attempt > held->task.attempt) {
        /* The previous attempt's result is already on its way: too late to adopt. */
        snprintf(d->text, sizeof d->text, "task %s is finishing its attempt %u; send it again",
                 m->id, (unsigned)held->task.attempt);
        d->outcome = START_REJECTED;
        return;
    }
    if (held != NULL) {
        /* QoS 1 redelivery, or the manager re-sent a start it saw no confirmation of: never
         * run twice, confirm again. When the manager moved the task to a newer attempt, keep
         * running it and answer for that attempt, so the result is not dropped as stale. */
        if (m->attempt > held->task.attempt) {
            held->task.attempt = m->attempt;
            memcpy(held->task.traceparent, m->traceparent, sizeof held->task.traceparent);
            d->outcome = START_ADOPTED;
        } else {
            d->outcome = START_CONFIRMED;
        }
        ref_from_task(&d->ref, &held->task);
        return;
    }
    const recent_task_t *done = m->attempt > 0 ? finished_recently(p, m->id, m->attempt) : NULL;
    if (done != NULL) {
        /* The result may have been lost on the way: send it again rather than run again. */
        memcpy(d->ref.traceparent, done->traceparent, sizeof d->ref.traceparent);
        memcpy(d->results, done->results, sizeof d->results);
        memcpy(d->text, done->error, sizeof d->text);
        d->outcome = START_RESENT;
        return;
    }
    /* Permanent refusals are not `rejected`, which the manager takes as "busy" and sends again:
     * what this proplet can never run goes elsewhere (decide_cannot_run), and a module no key
     * here trusts fails. */
    if (untrusted[0] != '\0') {
        decide_failed(d, "%s", untrusted);
        return;
    }
    if (m->latent) {
        decide_cannot_run(d, m, "latent tasks (deploy, then invoke) are not supported by the "
                                "embedded proplet; run the task on a Python proplet");
        return;
    }
    if (m->encrypted) {
        decide_cannot_run(d, m,
                          "encrypted tasks need a TEE, which the embedded proplet does not have");
        return;
    }
    if (m->file_b64_len == 0 && is_http_url(m->image_url)) {
        /* Asked for in chunks, an HTTP URL is answered by no one: the task failed after the
         * fetch's retries, while a proplet that downloads over HTTP could run it. */
        decide_cannot_run(d, m, "the embedded proplet takes modules in chunks over MQTT only, not from an "
                                "HTTP URL: run the task on a proplet that downloads it, or push the module "
                                "to a registry and give its OCI reference");
        return;
    }
    slot_t *slot = NULL;
    for (unsigned i = 0; i < p->cfg.slots && slot == NULL; i++)
        if (p->slots[i].state == SLOT_FREE)
            slot = &p->slots[i];
    if (slot == NULL) {
        snprintf(d->text, sizeof d->text, "all %u task slots of this proplet are busy",
                 p->cfg.slots);
        d->outcome = m->broadcast ? START_FAILED : START_REJECTED;
        return;
    }
    uint8_t *module = NULL;
    size_t module_len = 0;
    if (m->file_b64_len > 0 && !decode_inline(p, m, &module, &module_len, d))
        return;

    memset(slot, 0, sizeof *slot);
    slot->task = *m;
    slot->task.json = NULL;
    slot->task.file_b64 = NULL;
    slot->task.file_b64_len = 0;
    slot->accepted_ms = now_ms(p);
    slot->last_progress_ms = slot->accepted_ms;
    uint64_t timeout_ms = m->limits.timeout_s > 0 ? (uint64_t)(m->limits.timeout_s * 1000.0 + 0.5)
                                                  : p->cfg.default_timeout_ms;
    slot->deadline_ms = timeout_ms > 0 ? slot->accepted_ms + timeout_ms : 0;
    if (module != NULL) {
        slot->module = module;
        slot->module_len = module_len;
        slot->state = SLOT_READY;
        d->ready = true;
    } else {
        assembler_begin(&slot->assembler, m->image_url, p->cfg.max_module_bytes);
        slot->state = SLOT_FETCHING;
        slot->fetch_requests = 1;
        d->fetch = true;
        memcpy(d->app_name, m->image_url, sizeof d->app_name);
    }
    d->outcome = START_ACCEPTED;
}

/* Whether this proplet holds the task: a garbled copy of its start must not fail it. */
static bool holds(proplet_t *p, const char *id)
{
    lock(p);
    bool held = find_task(p, id) != NULL;
    unlock(p);
    return held;
}

/* A message of the MQTT thread that does not parse: counted and logged, then dropped. */
static void note_invalid(proplet_t *p, const char *kind, const protocol_error_t *perr)
{
    p->counters.messages_invalid++;
    plog(p, PROPLET_LOG_WARN, "invalid %s message: %s", kind, perr->reason);
}

static void handle_start(proplet_t *p, const char *payload, size_t len)
{
    start_msg_t *m = &p->inbound_start;
    protocol_error_t perr;
    char *buf = p->inbound_out[0];
    if (!protocol_parse_start(payload, len, m, &perr)) {
        note_invalid(p, "start", &perr);
        if (perr.has_id && protocol_targets(perr.proplet_id, perr.broadcast, p->cfg.proplet_id)
            && !holds(p, perr.id)) {
            task_ref_t ref = {{0}, perr.attempt, {0}};
            memcpy(ref.id, perr.id, sizeof ref.id);
            char error[PROPLET_ERROR_TEXT_MAX + 1];
            snprintf(error, sizeof error, "the start message is invalid: %s", perr.reason);
            send_result(p, &ref, "", error, buf);
        }
        return;
    }
    if (!protocol_targets(m->proplet_id, m->broadcast, p->cfg.proplet_id)) {
        protocol_start_release(m);
        return;
    }
    /* Checked before the lock (a verification takes milliseconds on a device) and before any
     * fetch; decide_start only applies it to a start it would act on, so a copy of a start that
     * is already held or finished never fails that task. */
    char untrusted[PROPLET_ERROR_TEXT_MAX + 1] = "";
    signature_check_start(&p->cfg.trusted_keys, m, untrusted, sizeof untrusted);
    start_decision_t d;
    lock(p);
    /* A start with an attempt comes from this project's manager, which acknowledges every result
     * (upstream's has no attempts and acknowledges none): results are sent again until confirmed
     * from now on, not once. Waiting for the first acknowledgement instead lost a task's result
     * resent on a reconnect before the manager had subscribed again on the restarted broker. */
    if (m->attempt > 0)
        p->acks_seen = true;
    decide_start(p, m, untrusted, &d);
    unlock(p);
    protocol_start_release(m);

    switch (d.outcome) {
    case START_CONFIRMED:
        plog(p, PROPLET_LOG_DEBUG, "task %s is already here; confirming it again", d.ref.id);
        send_task_state(p, &d.ref, "running", NULL, buf);
        return;
    case START_RESENT:
        plog(p, PROPLET_LOG_INFO, "task %s already finished; sending its result again", d.ref.id);
        send_result(p, &d.ref, d.text[0] != '\0' ? "" : d.results, d.text, buf);
        return;
    case START_ADOPTED:
        plog(p, PROPLET_LOG_INFO, "task %s continues as attempt %u", d.ref.id,
             (unsigned)d.ref.attempt);
        send_task_state(p, &d.ref, "running", NULL, buf);
        return;
    case START_REJECTED:
        plog(p, PROPLET_LOG_WARN, "refusing task %s: %s", d.ref.id, d.text);
        send_task_state(p, &d.ref, "rejected", d.text, buf);
        return;
    case START_UNSUPPORTED:
        plog(p, PROPLET_LOG_WARN, "task %s cannot run here; the manager is told so: %s", d.ref.id,
             d.text);
        lock(p);
        p->counters.tasks_unsupported++;
        unlock(p);
        send_task_state(p, &d.ref, "unsupported", d.text, buf);
        return;
    case START_FAILED:
        plog(p, PROPLET_LOG_WARN, "task %s failed: %s", d.ref.id, d.text);
        lock(p);
        p->counters.tasks_failed++;
        unlock(p);
        send_result(p, &d.ref, "", d.text, buf);
        return;
    case START_ACCEPTED:
        break;
    }
    plog(p, PROPLET_LOG_INFO, "task %s accepted%s", d.ref.id,
         d.fetch ? ", fetching its module" : "");
    send_task_state(p, &d.ref, "running", NULL, buf);
    if (d.fetch) {
        registry_request_t req = {d.app_name, NULL, 0, p->cfg.proplet_id, chunk_encoding(p, now_ms(p))};
        send(p, TOPIC_REGISTRY_REQUEST, buf,
             protocol_encode_registry_request(&req, buf, PROPLET_MSG_MAX));
    }
    if (d.ready)
        p->port.wake_worker(p->port.ctx);
}

void proplet_on_oversized_message(proplet_t *p, const char *topic, size_t topic_len,
                                  const char *head, size_t head_len, const char *tail,
                                  size_t tail_len, size_t total_len)
{
    lock(p);
    p->counters.messages_oversized++;
    unlock(p);
    size_t prefix_len = strlen(p->prefix);
    bool is_start = topic_len == prefix_len + strlen(TOPIC_START)
                    && memcmp(topic, p->prefix, prefix_len) == 0
                    && memcmp(topic + prefix_len, TOPIC_START, strlen(TOPIC_START)) == 0;
    plog(p, PROPLET_LOG_WARN, "dropped a %zu-byte message on %.*s: larger than the receive buffer",
         total_len, (int)topic_len, topic);
    protocol_error_t peek;
    if (!is_start || !protocol_peek_oversized_start(head, head_len, tail, tail_len, &peek)
        || !protocol_targets(peek.proplet_id, peek.broadcast, p->cfg.proplet_id) || holds(p, peek.id))
        return;
    task_ref_t ref = {{0}, peek.attempt, {0}};
    memcpy(ref.id, peek.id, sizeof ref.id);
    char error[PROPLET_ERROR_TEXT_MAX + 1];
    snprintf(error, sizeof error,
             "the start message is %zu bytes, more than this proplet can receive; set the "
             "manager's inline_limit lower so the module is sent in chunks",
             total_len);
    send_result(p, &ref, "", error, p->inbound_out[0]);
}

/* ------------------------------------------------------------------------------------------
 * stop */

static void handle_stop(proplet_t *p, const char *payload, size_t len)
{
    stop_msg_t m;
    protocol_error_t perr;
    if (!protocol_parse_stop(payload, len, &m, &perr)) {
        note_invalid(p, "stop", &perr);
        return;
    }
    /* Upstream's device ignores the target and stops tasks meant for others (defect 48). */
    if (!protocol_targets(m.proplet_id, m.broadcast, p->cfg.proplet_id))
        return;
    bool stopped_waiting = false;
    task_ref_t ref;
    lock(p);
    slot_t *s = find_task(p, m.id);
    if (s != NULL && s->state == SLOT_RUNNING) {
        /* The worker reports the stopped task when the engine call returns. */
        if (s->stop == STOP_NONE)
            s->stop = STOP_REQUESTED;
        if (s->instance != NULL)
            engine_interrupt(s->instance);
    } else if (s != NULL && s->state != SLOT_REPORTING) {
        begin_report(s, &ref);
        stopped_waiting = true;
    }
    unlock(p);
    if (s == NULL) {
        plog(p, PROPLET_LOG_DEBUG, "stop for task %s, which this proplet does not hold", m.id);
        return;
    }
    plog(p, PROPLET_LOG_INFO, "stopping task %s", m.id);
    if (stopped_waiting)
        finish_report(p, s, &ref, "", "stopped by request", p->inbound_out[0]);
}

/* ------------------------------------------------------------------------------------------
 * chunks */

/* The fetched module is one this proplet cannot run: our manager sends the task to another
 * proplet (task_state `unsupported`), and nothing is remembered as finished here. */
static void finish_unsupported(proplet_t *p, slot_t *s, const task_ref_t *ref, const char *why,
                               char *buf)
{
    plog(p, PROPLET_LOG_WARN, "task %s cannot run here; the manager is told so: %s", ref->id, why);
    send_task_state(p, ref, "unsupported", why, buf);
    lock(p);
    p->counters.tasks_unsupported++;
    free_slot(s);
    unlock(p);
}

static void handle_chunk(proplet_t *p, const char *payload, size_t len, bool binary)
{
    chunk_msg_t *c = &p->inbound_chunk;
    protocol_error_t perr;
    bool parsed = binary ? protocol_parse_binary_chunk(payload, len, c, &perr)
                         : protocol_parse_chunk(payload, len, c, &perr);
    if (!parsed) {
        note_invalid(p, "chunk", &perr);
        return;
    }
    /* One slot at a time, so no slot waits on another slot's decoding. */
    for (unsigned i = 0; i < p->cfg.slots; i++) {
        bool failed = false, ready = false, elsewhere = false;
        task_ref_t ref;
        char error[PROPLET_ERROR_TEXT_MAX + 1];
        lock(p);
        slot_t *s = &p->slots[i];
        if (s->state == SLOT_FETCHING && strcmp(s->assembler.app_name, c->app_name) == 0) {
            uint32_t before = s->assembler.received_count;
            assembly_state_t st = assembler_add(&s->assembler, c);
            if (s->assembler.received_count != before)
                s->last_progress_ms = now_ms(p);
            if (st == ASSEMBLY_COMPLETE) {
                s->module = assembler_take(&s->assembler, &s->module_len);
                char import[PROPLET_ERROR_TEXT_MAX / 2];
                bool component = is_component(s->module, s->module_len);
                if (component || first_import(s->module, s->module_len, import, sizeof import)) {
                    /* Placed here by a manager that did not know the module (a URL or an OCI
                     * reference): only once its bytes are here does the kind show. */
                    if (component)
                        copy_text(error, sizeof error, COMPONENT_REFUSAL);
                    else
                        snprintf(error, sizeof error, IMPORTS_REFUSAL, import);
                    begin_report(s, &ref);
                    failed = true;
                    elsewhere = may_go_elsewhere(s->task.attempt, s->task.broadcast);
                } else {
                    s->state = SLOT_READY;
                    ready = true;
                }
            } else if (st == ASSEMBLY_FAILED) {
                copy_text(error, sizeof error, assembler_error(&s->assembler));
                begin_report(s, &ref);
                failed = true;
                elsewhere = s->assembler.too_large
                            && may_go_elsewhere(s->task.attempt, s->task.broadcast);
            }
        }
        unlock(p);
        if (failed && elsewhere) {
            finish_unsupported(p, s, &ref, error, p->inbound_out[0]);
        } else if (failed) {
            plog(p, PROPLET_LOG_WARN, "task %s failed: %s", ref.id, error);
            finish_report(p, s, &ref, "", error, p->inbound_out[0]);
        }
        if (ready)
            p->port.wake_worker(p->port.ctx);
    }
    protocol_chunk_release(c);
}

/* Whether `payload` may name this proplet: its id, in quotes, somewhere in it. Acknowledgements
 * for the whole fleet arrive on one topic, one message per proplet; parsing each with cJSON costs a
 * device far more than this scan. An id that JSON would escape is never ruled out here. */
static bool may_name_this_proplet(const proplet_t *p, const char *payload, size_t len)
{
    const char *id = p->cfg.proplet_id;
    size_t id_len = strlen(id);
    for (size_t i = 0; i < id_len; i++)
        if (id[i] == '"' || id[i] == '\\' || (unsigned char)id[i] < 0x20)
            return true;
    for (size_t i = 0; id_len > 0 && i + id_len + 2 <= len; i++)
        if (payload[i] == '"' && payload[i + id_len + 1] == '"'
            && memcmp(payload + i + 1, id, id_len) == 0)
            return true;
    return false;
}

static void handle_result_ack(proplet_t *p, const char *payload, size_t len)
{
    result_ack_msg_t m;
    protocol_error_t perr;
    if (!may_name_this_proplet(p, payload, len))
        return;
    if (!protocol_parse_result_ack(payload, len, &m, &perr)) {
        note_invalid(p, "result_ack", &perr);
        return;
    }
    if (strcmp(m.proplet_id, p->cfg.proplet_id) != 0)
        return;
    lock(p);
    p->acks_seen = true;
    for (size_t a = 0; a < m.count; a++)
        for (size_t i = 0; i < PROPLET_RECENT_TASKS; i++) {
            recent_task_t *r = &p->recent[i];
            if ((m.acks[a].attempt == 0 || m.acks[a].attempt == r->attempt)
                && strcmp(r->id, m.acks[a].task_id) == 0)
                r->unconfirmed = false;
        }
    unlock(p);
}

/* A manager that started after this proplet announced (with it, at boot, or later on a new
 * database) asks for the discovery again; answered at most once per PROPLET_DISCOVER_ANSWER_MIN_MS
 * (managers of a fleet starting together), even right after a connect's own discovery: that one may
 * be what the manager missed. */
static void handle_discover(proplet_t *p)
{
    lock(p);
    uint64_t now = now_ms(p);
    bool answer = !p->discover_answered || now - p->discover_answered_ms >= PROPLET_DISCOVER_ANSWER_MIN_MS;
    if (answer) {
        p->discover_answered = true;
        p->discover_answered_ms = p->discovery_ms = now;
    }
    unlock(p);
    if (answer)
        send_discovery(p, p->inbound_out[0]);
}

void proplet_on_message(proplet_t *p, const char *topic, size_t topic_len, const char *payload,
                        size_t len)
{
    size_t prefix_len = strlen(p->prefix);
    if (topic_len <= prefix_len || memcmp(topic, p->prefix, prefix_len) != 0)
        return;
    const char *suffix = topic + prefix_len;
    size_t suffix_len = topic_len - prefix_len;
#define IS(s) (suffix_len == strlen(s) && memcmp(suffix, s, suffix_len) == 0)
    if (IS(TOPIC_START))
        handle_start(p, payload, len);
    else if (IS(TOPIC_STOP))
        handle_stop(p, payload, len);
    else if (IS(TOPIC_RESULT_ACK))
        handle_result_ack(p, payload, len);
    else if (IS(TOPIC_DISCOVER))
        handle_discover(p);
    else if (IS(TOPIC_REGISTRY_CHUNK))
        handle_chunk(p, payload, len, false);
    else if (IS(TOPIC_REGISTRY_CHUNK_BINARY))
        handle_chunk(p, payload, len, true);
#undef IS
}

/* ------------------------------------------------------------------------------------------
 * running a task (worker threads) */

typedef struct {
    char results[PROPLET_RESULT_TEXT_MAX + 1];
    char error[PROPLET_ERROR_TEXT_MAX + 1];
    uint64_t cpu_us;
    uint64_t memory_bytes;
} run_outcome_t;

static void outcome_error(run_outcome_t *out, const char *fmt, ...)
{
    va_list args;
    va_start(args, fmt);
    vsnprintf(out->error, sizeof out->error, fmt, args);
    va_end(args);
}

/* The parsed module for the slot's bytes, from the cache or freshly parsed. On success either
 * *entry is set (cached; release it) or *own is set (uncached; unload it and free *own_bytes). */
static bool obtain_module(proplet_t *p, slot_t *s, const uint8_t digest[SHA256_BYTES],
                          module_entry_t **entry, engine_module_t **own, uint8_t **own_bytes,
                          run_outcome_t *out)
{
    *entry = NULL;
    *own = NULL;
    *own_bytes = NULL;
    lock(p);
    *entry = modules_acquire(&p->modules, digest);
    unlock(p);
    if (*entry != NULL) {
        /* Parsed before: this task's copy of the bytes is not needed. */
        free(s->module);
        s->module = NULL;
        return true;
    }
    char err[PROPLET_ERROR_TEXT_MAX + 1] = "";
    engine_module_t *module = engine_load(s->module, s->module_len, err, sizeof err);
    if (module == NULL) {
        outcome_error(out, "the module is not valid WebAssembly: %s", err);
        return false;
    }
    uint8_t *bytes = s->module;
    s->module = NULL;
    bool duplicate = false;
    lock(p);
    *entry = modules_insert(&p->modules, digest, module, bytes, s->module_len, &duplicate);
    unlock(p);
    if (*entry == NULL) {
        *own = module;
        *own_bytes = bytes;
    } else if (duplicate) {
        engine_unload(module);
        free(bytes);
    }
    return true;
}

static engine_instance_t *instantiate(proplet_t *p, slot_t *s, engine_module_t *module,
                                      run_outcome_t *out)
{
    engine_limits_t limits = {p->cfg.stack_bytes, p->cfg.max_memory_bytes, s->task.limits.fuel};
    if (s->task.limits.memory_bytes > 0 && s->task.limits.memory_bytes < limits.memory_bytes)
        limits.memory_bytes = s->task.limits.memory_bytes;
    engine_status_t status = ENGINE_OK;
    char err[PROPLET_ERROR_TEXT_MAX + 1] = "";
    engine_instance_t *inst = engine_instantiate(module, &limits, &status, err, sizeof err);
    if (inst == NULL && status == ENGINE_NO_MEMORY) {
        /* Modules no task uses hold arena memory: drop them and try once more. */
        lock(p);
        size_t evicted = modules_evict_idle(&p->modules);
        unlock(p);
        if (evicted > 0)
            inst = engine_instantiate(module, &limits, &status, err, sizeof err);
    }
    if (inst == NULL) {
        if (status == ENGINE_NO_MEMORY)
            outcome_error(out,
                          "not enough memory on this proplet to instantiate the module (%s); run "
                          "fewer tasks at once or use a module that needs less memory",
                          err);
        else
            outcome_error(out, "the module could not be instantiated: %s", err);
    }
    return inst;
}

static void describe_stop(const slot_t *s, stop_reason_t stop, run_outcome_t *out)
{
    switch (stop) {
    case STOP_REQUESTED:
        outcome_error(out, "stopped by request");
        break;
    case STOP_TIMEOUT:
        outcome_error(out,
                      "exceeded its time limit of %.3g s; raise limits.timeout_s or make the "
                      "export finish sooner",
                      (double)(s->deadline_ms - s->accepted_ms) / 1000.0);
        break;
    case STOP_SHUTDOWN:
        outcome_error(out, "the proplet shut down while the task ran");
        break;
    case STOP_NONE:
        break;
    }
}

static void call_export(proplet_t *p, slot_t *s, engine_instance_t *inst, run_outcome_t *out)
{
    const start_msg_t *t = &s->task;
    engine_signature_t sig;
    char err[PROPLET_ERROR_TEXT_MAX + 1] = "";
    if (!engine_signature(inst, t->name, &sig, err, sizeof err)) {
        outcome_error(out, "%s", err);
        return;
    }
    if (sig.param_count != t->input_count) {
        outcome_error(out, "the export '%s' takes %zu parameters but the task has %zu inputs",
                      t->name, sig.param_count, t->input_count);
        return;
    }
    wasm_value_t args[PROPLET_PARAMS_MAX];
    for (size_t i = 0; i < sig.param_count; i++)
        if (!wasm_parse_input(t->inputs[i], sig.params[i], i, &args[i], out->error,
                              sizeof out->error))
            return;
    wasm_value_t results[PROPLET_RESULTS_MAX];
    uint64_t cpu_before = p->port.thread_cpu_us(p->port.ctx);
    engine_status_t status = engine_call(inst, t->name, args, sig.param_count, results,
                                         sig.result_count, err, sizeof err);
    out->cpu_us = p->port.thread_cpu_us(p->port.ctx) - cpu_before;
    out->memory_bytes = engine_memory_bytes(inst);
    lock(p);
    s->instance = NULL;
    stop_reason_t stop = s->stop;
    unlock(p);
    if (stop != STOP_NONE && status != ENGINE_OK) {
        describe_stop(s, stop, out);
        return;
    }
    switch (status) {
    case ENGINE_OK:
        if (!wasm_format_results(results, sig.result_count, out->results, sizeof out->results))
            outcome_error(out, "the results of '%s' do not fit the %d-byte results field",
                          t->name, PROPLET_RESULT_TEXT_MAX);
        return;
    case ENGINE_TRAP:
        outcome_error(out, "the export '%s' trapped: %s", t->name, err);
        return;
    case ENGINE_OUT_OF_FUEL:
        outcome_error(out,
                      "exceeded its fuel budget of %llu; raise limits.fuel or make the export "
                      "do less work",
                      (unsigned long long)t->limits.fuel);
        return;
    case ENGINE_NO_MEMORY:
        outcome_error(out, "the export '%s' ran out of memory: %s", t->name, err);
        return;
    case ENGINE_INTERRUPTED:
        outcome_error(out, "the export '%s' was interrupted", t->name);
        return;
    case ENGINE_ERROR:
        outcome_error(out, "running the export '%s' failed: %s", t->name, err);
        return;
    }
}

static void execute(proplet_t *p, slot_t *s, run_outcome_t *out)
{
    uint8_t digest[SHA256_BYTES];
    sha256(s->module, s->module_len, digest);
    if (s->task.has_digest && memcmp(digest, s->task.wasm_digest, SHA256_BYTES) != 0) {
        char got[DIGEST_TEXT_SIZE], want[DIGEST_TEXT_SIZE];
        digest_format(digest, got);
        digest_format(s->task.wasm_digest, want);
        outcome_error(out,
                      "the module's digest %s does not match the task's wasm_digest %s; the "
                      "module was corrupted or the wrong artifact was served",
                      got, want);
        return;
    }
    if (s->assembler.has_digest && memcmp(digest, s->assembler.digest, SHA256_BYTES) != 0) {
        outcome_error(out, "the reassembled module does not match the digest its chunks carried; "
                           "the transfer was corrupted");
        return;
    }
    module_entry_t *entry;
    engine_module_t *own;
    uint8_t *own_bytes;
    if (!obtain_module(p, s, digest, &entry, &own, &own_bytes, out))
        return;
    engine_module_t *module = entry != NULL ? entry->module : own;
    engine_instance_t *inst = instantiate(p, s, module, out);
    if (inst != NULL) {
        lock(p);
        stop_reason_t stop = s->stop;
        if (stop == STOP_NONE)
            s->instance = inst;
        unlock(p);
        if (stop != STOP_NONE)
            describe_stop(s, stop, out);
        else
            call_export(p, s, inst, out);
        engine_destroy(inst);
    }
    if (entry != NULL) {
        lock(p);
        modules_release(&p->modules, entry);
        unlock(p);
    } else {
        engine_unload(own);
        free(own_bytes);
    }
}

static void report(proplet_t *p, slot_t *s, const task_ref_t *ref, const run_outcome_t *out,
                   uint64_t wall_ms)
{
    char buf[PROPLET_MSG_MAX];
    finish_report(p, s, ref, out->results, out->error, buf);
    char ts[40];
    timestamp(p, ts, sizeof ts);
    double wall_s = (double)wall_ms / 1000.0;
    task_metrics_msg_t m = {
        .task_id = ref->id,
        .proplet_id = p->cfg.proplet_id,
        .timestamp = ts,
        .wall_seconds = wall_s,
        .cpu_time_us = out->cpu_us,
        .cpu_cycles = out->cpu_us * p->cfg.cpu_mhz,
        .memory_bytes = out->memory_bytes,
        .cpu_percent = wall_ms > 0 ? (double)out->cpu_us / 10.0 / (double)wall_ms : 0.0,
    };
    send(p, TOPIC_TASK_METRICS, buf, protocol_encode_task_metrics(&m, buf, PROPLET_MSG_MAX));
}

bool proplet_run_next(proplet_t *p)
{
    lock(p);
    slot_t *s = NULL;
    for (unsigned i = 0; i < p->cfg.slots; i++) {
        slot_t *c = &p->slots[i];
        if (c->state == SLOT_READY && (s == NULL || c->accepted_ms < s->accepted_ms))
            s = c;
    }
    if (s != NULL)
        s->state = SLOT_RUNNING;
    stop_reason_t stop = s != NULL ? s->stop : STOP_NONE;
    unlock(p);
    if (s == NULL)
        return false;

    run_outcome_t out;
    memset(&out, 0, sizeof out);
    if (stop != STOP_NONE)
        describe_stop(s, stop, &out);
    else
        execute(p, s, &out);

    task_ref_t ref;
    lock(p);
    begin_report(s, &ref);
    uint64_t wall_ms = now_ms(p) - s->accepted_ms;
    unlock(p);
    if (out.error[0] != '\0')
        plog(p, PROPLET_LOG_WARN, "task %s failed: %s", ref.id, out.error);
    else
        plog(p, PROPLET_LOG_INFO, "task %s completed: %s", ref.id, out.results);
    report(p, s, &ref, &out, wall_ms);
    return true;
}

/* ------------------------------------------------------------------------------------------
 * timers */

static void send_metrics(proplet_t *p, char *buf)
{
    proplet_sample_t sample;
    memset(&sample, 0, sizeof sample);
    p->port.sample(p->port.ctx, &sample);
    engine_arena(&sample.arena_total_bytes, &sample.arena_free_bytes);
    char ts[40];
    timestamp(p, ts, sizeof ts);
    metrics_msg_t msg = {p->cfg.proplet_id, PROPLET_NAMESPACE, ts, &sample,
                         proplet_busy_slots(p)};
    send(p, TOPIC_METRICS, buf, protocol_encode_metrics(&msg, buf, PROPLET_MSG_MAX));
}

/* Under the lock: check one slot's time limit and chunk transfer. */
static void tick_slot(proplet_t *p, slot_t *s, uint64_t now, task_ref_t *failed_ref,
                      char *failed_error, size_t *request_len, char fell_back_for[PROPLET_ID_MAX + 1])
{
    *request_len = 0;
    fell_back_for[0] = '\0';
    failed_error[0] = '\0';
    bool overdue = s->deadline_ms > 0 && now >= s->deadline_ms;
    if (s->state == SLOT_RUNNING) {
        if (overdue && s->stop == STOP_NONE) {
            s->stop = STOP_TIMEOUT;
            if (s->instance != NULL)
                engine_interrupt(s->instance);
        }
        return;
    }
    if (s->state != SLOT_FETCHING)
        return;
    const assembler_t *a = &s->assembler;
    if (overdue) {
        snprintf(failed_error, PROPLET_ERROR_TEXT_MAX + 1,
                 "exceeded its time limit while fetching %s (%u of %u chunks arrived); raise "
                 "limits.timeout_s",
                 a->app_name, (unsigned)a->received_count, (unsigned)a->total);
    } else if (now - s->last_progress_ms >= p->cfg.fetch_retry_ms) {
        if (s->fetch_requests > p->cfg.fetch_retries) {
            snprintf(failed_error, PROPLET_ERROR_TEXT_MAX + 1,
                     "timed out waiting for the chunks of %s (%u of %u arrived after %u "
                     "requests); check that the manager or proxy serving it is running",
                     a->app_name, (unsigned)a->received_count, (unsigned)a->total,
                     s->fetch_requests);
        } else {
            if (a->total == 0 && chunk_encoding(p, now) != NULL) {
                /* Nothing at all arrived for a request for binary chunks: most likely a broker
                 * ACL drops registry/server/binary. Upstream's JSON chunks for a while (the
                 * caller logs it, outside the lock). */
                p->json_chunks_until_ms = now + PROPLET_JSON_CHUNKS_MS;
                memcpy(fell_back_for, s->task.id, PROPLET_ID_MAX + 1);
            }
            /* Resume: name only the chunks still missing (all of them before the first). */
            uint32_t missing[PROPLET_MISSING_PER_REQUEST];
            size_t count = assembler_missing(a, missing, PROPLET_MISSING_PER_REQUEST);
            registry_request_t req = {a->app_name, missing, count, p->cfg.proplet_id,
                                      chunk_encoding(p, now)};
            *request_len = protocol_encode_registry_request(&req, p->tick_out[1], PROPLET_MSG_MAX);
            s->fetch_requests++;
            s->last_progress_ms = now;
        }
    }
    if (failed_error[0] != '\0')
        begin_report(s, failed_ref);
}

void proplet_tick(proplet_t *p)
{
    for (unsigned i = 0; i < p->cfg.slots; i++) {
        task_ref_t ref;
        char error[PROPLET_ERROR_TEXT_MAX + 1];
        size_t request_len;
        char fell_back_for[PROPLET_ID_MAX + 1];
        lock(p);
        tick_slot(p, &p->slots[i], now_ms(p), &ref, error, &request_len, fell_back_for);
        unlock(p);
        /* Logged once unlocked: a device's log writes to the UART and may block. */
        if (fell_back_for[0] != '\0')
            plog(p, PROPLET_LOG_WARN,
                 "no binary chunk arrived for task %s; asking for JSON chunks for the next %u s "
                 "(does the broker's ACL let registry/server/binary through?)", fell_back_for,
                 (unsigned)(PROPLET_JSON_CHUNKS_MS / 1000u));
        if (request_len > 0)
            send(p, TOPIC_REGISTRY_REQUEST, p->tick_out[1], request_len);
        if (error[0] != '\0') {
            plog(p, PROPLET_LOG_WARN, "task %s failed: %s", ref.id, error);
            finish_report(p, &p->slots[i], &ref, "", error, p->tick_out[0]);
        }
    }
    lock(p);
    uint64_t now = now_ms(p);
    bool announced = p->announced;
    bool heartbeat = announced && now >= p->next_heartbeat_ms;
    bool metrics = announced && p->cfg.metrics_ms > 0 && now >= p->next_metrics_ms;
    if (heartbeat)
        p->next_heartbeat_ms = now + p->cfg.heartbeat_ms;
    if (metrics)
        p->next_metrics_ms = now + p->cfg.metrics_ms;
    unlock(p);
    if (announced)
        resend_results(p, p->tick_out[0], false);
    if (heartbeat)
        send_alive(p, p->tick_out[0]);
    if (metrics)
        send_metrics(p, p->tick_out[0]);
}

void proplet_shutdown(proplet_t *p)
{
    lock(p);
    for (unsigned i = 0; i < p->cfg.slots; i++) {
        slot_t *s = &p->slots[i];
        if (s->state == SLOT_RUNNING) {
            s->stop = STOP_SHUTDOWN;
            if (s->instance != NULL)
                engine_interrupt(s->instance);
        } else if (s->state != SLOT_FREE) {
            s->stop = STOP_SHUTDOWN;
        }
    }
    unlock(p);
}

void proplet_destroy(proplet_t *p)
{
    lock(p);
    for (unsigned i = 0; i < p->cfg.slots; i++)
        if (p->slots[i].state != SLOT_FREE)
            free_slot(&p->slots[i]);
    modules_clear(&p->modules);
    unlock(p);
}

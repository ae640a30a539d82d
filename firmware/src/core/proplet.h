/* The embedded proplet: task slots, module delivery (inline or chunked), the instance pool and
 * everything it tells the manager. Portable: the port supplies MQTT, threads and clocks.
 *
 * Threads: the port's MQTT thread calls proplet_on_connected/on_message, one timer thread calls
 * proplet_tick, and `slots` worker threads call proplet_run_next. Tasks never run in the MQTT
 * thread. All shared state is guarded by the port's lock; nothing is published while it is
 * held, because a port's publish may take the MQTT client's own lock.
 */
#ifndef PROPLET_PROPLET_H
#define PROPLET_PROPLET_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "assembler.h"
#include "engine.h"
#include "limits.h"
#include "modules.h"
#include "protocol.h"
#include "signature.h"

#define PROPLET_VERSION "0.1.0"
#define PROPLET_NAMESPACE "embedded"

enum { PROPLET_LOG_ERROR, PROPLET_LOG_WARN, PROPLET_LOG_INFO, PROPLET_LOG_DEBUG };

typedef struct {
    void *ctx;
    /* Publish at QoS 1, not retained. Thread-safe, never calls back into the proplet. */
    bool (*publish)(void *ctx, const char *topic, const char *payload, size_t len);
    void (*lock)(void *ctx);
    void (*unlock)(void *ctx);
    /* A task became ready to run: wake one worker. */
    void (*wake_worker)(void *ctx);
    /* Monotonic milliseconds. */
    uint64_t (*now_ms)(void *ctx);
    /* UTC wall-clock time as RFC 3339 into out; false while the clock is not set. */
    bool (*wall_clock)(void *ctx, char *out, size_t len);
    /* CPU time the calling thread has used, in microseconds. */
    uint64_t (*thread_cpu_us)(void *ctx);
    void (*sample)(void *ctx, proplet_sample_t *out);
    /* The address other hosts reach this proplet at, "" when unknown. */
    void (*network_address)(void *ctx, char *out, size_t len);
    void (*log)(void *ctx, int level, const char *message);
} proplet_port_t;

typedef struct {
    char proplet_id[PROPLET_ID_MAX + 1];
    char domain[PROPLET_NAME_MAX + 1];
    char channel[PROPLET_NAME_MAX + 1];
    unsigned slots;               /* pool size, 1..PROPLET_MAX_SLOTS */
    size_t max_module_bytes;      /* largest module accepted, inline or chunked */
    uint32_t stack_bytes;         /* wasm stack of each instance */
    uint64_t max_memory_bytes;    /* linear memory cap of each instance */
    uint32_t heartbeat_ms;
    uint32_t metrics_ms;
    uint32_t default_timeout_ms;  /* for tasks without limits.timeout_s; 0: none */
    uint32_t fetch_retry_ms;      /* ask again for missing chunks after this long without one */
    unsigned fetch_retries;       /* then give up */
    uint32_t cpu_mhz;             /* CPU cycles = CPU time x MHz; 0: not reported */
    const char *description;
    const char *os;
    const char *hostname;
    const char *cpu_arch;
    uint64_t total_memory_bytes;
    /* With at least one key, only starts whose digest one of them signed are run (signature.h). */
    trusted_keys_t trusted_keys;
} proplet_config_t;

/* REPORTING: the outcome is being published. The slot is still held (and listed in
 * heartbeats) until then, so no heartbeat can tell the manager the task vanished before its
 * result arrives. */
typedef enum { SLOT_FREE, SLOT_FETCHING, SLOT_READY, SLOT_RUNNING, SLOT_REPORTING } slot_state_t;
typedef enum { STOP_NONE, STOP_REQUESTED, STOP_TIMEOUT, STOP_SHUTDOWN } stop_reason_t;

typedef struct {
    slot_state_t state;
    start_msg_t task; /* file and json pointers are never kept */
    uint8_t *module;
    size_t module_len;
    assembler_t assembler;
    uint64_t accepted_ms;
    uint64_t deadline_ms; /* 0: none */
    uint64_t last_progress_ms;
    unsigned fetch_requests;
    stop_reason_t stop;
    engine_instance_t *instance; /* while engine_call may run */
} slot_t;

/* A finished task, kept so a repeated start is answered with its result instead of a rerun. */
typedef struct {
    char id[PROPLET_ID_MAX + 1];
    uint32_t attempt;
    char traceparent[PROPLET_TRACEPARENT_MAX + 1];
    char results[PROPLET_RESULT_TEXT_MAX + 1];
    char error[PROPLET_ERROR_TEXT_MAX + 1];
    /* The manager has not acknowledged storing the result (result_ack) yet. */
    bool unconfirmed;
    uint64_t finished_ms;
    uint64_t sent_ms; /* when it last went out; 0: never (the broker was unreachable) */
} recent_task_t;

typedef struct {
    uint32_t tasks_completed;
    uint32_t tasks_failed;
    uint32_t tasks_unsupported; /* answered task_state unsupported: another proplet may run them */
    uint32_t messages_invalid;
    uint32_t messages_oversized;
    uint32_t results_resent;  /* published again: after a reconnect, or not acknowledged in time */
    uint32_t results_dropped; /* still owed, then pushed out by newer ones (PROPLET_RECENT_TASKS) */
} proplet_counters_t;

typedef struct proplet {
    proplet_config_t cfg;
    proplet_port_t port;
    char prefix[PROPLET_TOPIC_MAX + 1];
    slot_t slots[PROPLET_MAX_SLOTS];
    module_cache_t modules;
    recent_task_t recent[PROPLET_RECENT_TASKS];
    size_t recent_next;
    bool announced; /* heartbeats and metrics only follow the first announcement */
    /* Binary chunks (registry/server/binary) never arrived for a transfer that asked for them (a
     * broker ACL that predates the topic drops them, or the server was down): ask for upstream's
     * JSON chunks until this time (now_ms), then for binary ones again. 0: binary. */
    uint64_t json_chunks_until_ms;
    /* The manager acknowledges results (ours does, upstream's does not): an unacknowledged result
     * is sent again every PROPLET_RESULT_RESEND_MS. Without, each result is sent once (and again
     * after a reconnect, if it is recent), so an upstream manager is not flooded with repeats. */
    bool acks_seen;
    /* Between proplet_on_connected and proplet_on_disconnected. Both ports take publishes while
     * disconnected (into a bounded buffer): timed resends wait for the connection, or each would
     * add another copy to that buffer. */
    bool connected;
    /* When the discovery last went out (on a connect, or again because results waited unconfirmed):
     * the timed one goes out at most once per PROPLET_RESULT_RESEND_MS. */
    uint64_t discovery_ms;
    /* When the discovery last went out at a manager's request (TOPIC_DISCOVER), if ever. */
    bool discover_answered;
    uint64_t discover_answered_ms;
    uint64_t next_heartbeat_ms;
    uint64_t next_metrics_ms;
    proplet_counters_t counters;
    /* Scratch of the MQTT thread and of the timer thread (each used by one thread only). */
    start_msg_t inbound_start;
    chunk_msg_t inbound_chunk;
    char inbound_out[2][PROPLET_MSG_MAX];
    char tick_out[2][PROPLET_MSG_MAX];
} proplet_t;

/* Topic suffixes the port subscribes to on every (re)connect. */
#define PROPLET_SUBSCRIPTION_COUNT 6
extern const char *const proplet_subscriptions[PROPLET_SUBSCRIPTION_COUNT];

/* False (with err) when the configuration is unusable (names too long, no slots...). */
bool proplet_init(proplet_t *p, const proplet_config_t *cfg, const proplet_port_t *port,
                  char *err, size_t err_len);

/* Full topic for a suffix; false when it does not fit. */
bool proplet_topic(const proplet_t *p, const char *suffix, char *out, size_t len);

/* The Last Will the port registers before connecting: {"proplet_id","status":"offline",...}. */
bool proplet_last_will(const proplet_t *p, char *topic, size_t topic_len, char *payload,
                       size_t payload_len, size_t *payload_written);

/* After every (re)connect and re-subscribe: announce (discovery) and heartbeat at once. */
void proplet_on_connected(proplet_t *p);

/* The connection to the broker was lost (the port reconnects by itself). */
void proplet_on_disconnected(proplet_t *p);

void proplet_on_message(proplet_t *p, const char *topic, size_t topic_len, const char *payload,
                        size_t len);

/* A message the port could not buffer whole (larger than its receive buffer): head and tail
 * are its first and last bytes. A start is refused by name when its id can be found. */
void proplet_on_oversized_message(proplet_t *p, const char *topic, size_t topic_len,
                                  const char *head, size_t head_len, const char *tail,
                                  size_t tail_len, size_t total_len);

/* Worker: run one ready task to completion and report it. False when none was ready. */
bool proplet_run_next(proplet_t *p);

/* Timer (every 100-250 ms): heartbeats, metrics, time limits, chunk retries. */
void proplet_tick(proplet_t *p);

/* Stop everything (running tasks are interrupted). Workers return after their current task. */
void proplet_shutdown(proplet_t *p);

/* After the workers have stopped: free modules and buffers. */
void proplet_destroy(proplet_t *p);

/* Tasks currently held (fetching, ready or running). */
unsigned proplet_busy_slots(proplet_t *p);

#endif

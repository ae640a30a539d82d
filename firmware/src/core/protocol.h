/* The wire protocol (core/protocol.py), the subset the embedded proplet speaks.
 *
 * Decoders read only the fields the proplet uses, ignore unknown fields, and reject a message
 * whose used fields are missing or mistyped with a reason naming the field (as
 * core.protocol.InvalidMessage does). Encoders write the same keys in the same order as the
 * Python encoders with cJSON's compact printer, so the bytes match orjson's.
 */
#ifndef PROPLET_PROTOCOL_H
#define PROPLET_PROTOCOL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "digest.h"
#include "limits.h"

/* Topic suffixes after "m/{domain}/c/{channel}/" (core/topics.py). */
#define TOPIC_START "control/manager/start"
#define TOPIC_STOP "control/manager/stop"
#define TOPIC_CREATE "control/proplet/create"
#define TOPIC_ALIVE "control/proplet/alive"
#define TOPIC_RESULTS "control/proplet/results"
#define TOPIC_METRICS "control/proplet/metrics"
#define TOPIC_TASK_METRICS "control/proplet/task_metrics"
#define TOPIC_TASK_STATE "control/proplet/task_state"
#define TOPIC_REGISTRY_REQUEST "registry/proplet"
#define TOPIC_RESULT_ACK "control/manager/result_ack"
/* Extension: a manager that has just subscribed asks proplets to announce themselves again. */
#define TOPIC_DISCOVER "control/manager/discover"
#define TOPIC_REGISTRY_CHUNK "registry/server"
/* Extension: chunks as a JSON header line, '\n', then the raw bytes (asked for with
 * "encoding":"binary"); a quarter fewer bytes on the air and no base64 to decode. */
#define TOPIC_REGISTRY_CHUNK_BINARY "registry/server/binary"
#define CHUNK_ENCODING_BINARY "binary"
/* The header line of a binary chunk ends within this many bytes (as the manager's decoder). */
#define PROTOCOL_BINARY_HEAD_MAX 65536

#define PROTOCOL_REASON_MAX 160

/* Extension: `wasm_signature`, the manager's Ed25519 signature of `wasm_digest` (core/signing.py),
 * as standard base64: 88 characters for its 64 bytes. Anything else is refused naming the field. */
#define ED25519_SIGNATURE_BYTES 64
#define ED25519_PUBLIC_KEY_BYTES 32
#define SIGNATURE_B64_LEN 88

typedef struct {
    /* Why the message was refused, naming the field. */
    char reason[PROTOCOL_REASON_MAX];
    /* A refused start still names its task when `id` was usable: the proplet can then answer
     * with a failed result instead of leaving the task running forever (upstream defect 45). */
    bool has_id;
    char id[PROPLET_ID_MAX + 1];
    char proplet_id[PROPLET_ID_MAX + 1];
    bool broadcast;
    uint32_t attempt;
} protocol_error_t;

typedef struct {
    double timeout_s;      /* 0: none */
    uint64_t fuel;         /* 0: none */
    uint64_t memory_bytes; /* 0: none */
} task_limits_t;

typedef struct {
    char id[PROPLET_ID_MAX + 1];
    char name[PROPLET_EXPORT_NAME_MAX + 1];
    char image_url[PROPLET_APP_NAME_MAX + 1];
    char proplet_id[PROPLET_ID_MAX + 1];
    bool broadcast;
    bool daemon;
    bool latent;
    bool encrypted;
    size_t input_count;
    char inputs[PROPLET_INPUTS_MAX][PROPLET_INPUT_TEXT_MAX + 1];
    bool has_digest;
    uint8_t wasm_digest[SHA256_BYTES];
    bool has_signature;
    uint8_t wasm_signature[ED25519_SIGNATURE_BYTES];
    task_limits_t limits;
    uint32_t attempt;
    char traceparent[PROPLET_TRACEPARENT_MAX + 1];
    /* The base64 `file`, pointing into the parsed JSON: valid until protocol_start_release(). */
    const char *file_b64;
    size_t file_b64_len;
    void *json;
} start_msg_t;

typedef struct {
    char id[PROPLET_ID_MAX + 1];
    char proplet_id[PROPLET_ID_MAX + 1];
    bool broadcast;
} stop_msg_t;

typedef struct {
    char app_name[PROPLET_APP_NAME_MAX + 1];
    uint32_t chunk_idx;
    uint32_t total_chunks;
    /* base64 `data`, pointing into the parsed JSON: valid until protocol_chunk_release(). */
    const char *data_b64;
    size_t data_b64_len;
    /* A binary chunk's raw bytes instead, pointing into the payload (valid while it is). */
    bool binary;
    const uint8_t *data_raw;
    size_t data_raw_len;
    bool has_digest;
    uint8_t digest[SHA256_BYTES];
    uint64_t size; /* 0: not sent */
    char error[PROPLET_ERROR_TEXT_MAX + 1];
    void *json;
} chunk_msg_t;

/* Extension: the manager stored these results ({"task_id","proplet_id","attempt","more":[[id,
 * attempt],...]}). Acknowledgements beyond PROTOCOL_ACKS_MAX in one message are not read: those
 * results are sent again, and acknowledged again. */
#define PROTOCOL_ACKS_MAX 16

typedef struct {
    char task_id[PROPLET_ID_MAX + 1];
    uint32_t attempt; /* 0: whichever attempt the proplet holds */
} result_ack_t;

typedef struct {
    char proplet_id[PROPLET_ID_MAX + 1];
    result_ack_t acks[PROTOCOL_ACKS_MAX];
    size_t count;
} result_ack_msg_t;

bool protocol_parse_result_ack(const char *payload, size_t len, result_ack_msg_t *out,
                               protocol_error_t *err);

/* Whether a start or stop for `target_id`/`broadcast` is meant for proplet `self_id`. */
bool protocol_targets(const char *target_id, bool broadcast, const char *self_id);

bool protocol_parse_start(const char *payload, size_t len, start_msg_t *out, protocol_error_t *err);
void protocol_start_release(start_msg_t *msg);

bool protocol_parse_stop(const char *payload, size_t len, stop_msg_t *out, protocol_error_t *err);

bool protocol_parse_chunk(const char *payload, size_t len, chunk_msg_t *out, protocol_error_t *err);
/* A chunk from registry/server/binary: the header's fields, the bytes after its line as data. */
bool protocol_parse_binary_chunk(const char *payload, size_t len, chunk_msg_t *out,
                                 protocol_error_t *err);
void protocol_chunk_release(chunk_msg_t *msg);

/* A start too large to receive whole (larger than the port's message buffer): find its id,
 * target and attempt in the first and last bytes, so the proplet can refuse it by name.
 * The manager writes `id` first and the target fields after `file`. */
bool protocol_peek_oversized_start(const char *head, size_t head_len, const char *tail,
                                   size_t tail_len, protocol_error_t *out);

/* ---- encoders: each writes compact JSON into buf and returns its length, or 0 when it does
 * not fit (nothing useful can be sent then). */

typedef struct {
    const char *task_id;
    const char *proplet_id;
    const char *results;
    const char *error; /* NULL or "": JSON null */
    uint32_t attempt;  /* 0: left out */
    const char *traceparent;
} result_msg_t;

size_t protocol_encode_result(const result_msg_t *msg, char *buf, size_t cap);

typedef struct {
    const char *task_id;
    const char *proplet_id;
    const char *state; /* "running" or "rejected" */
    uint32_t attempt;
    const char *reason;
    const char *traceparent;
} task_state_msg_t;

size_t protocol_encode_task_state(const task_state_msg_t *msg, char *buf, size_t cap);

typedef struct {
    const char *proplet_id;
    const char *status; /* "alive" or "offline" */
    const char *namespace_;
    const char *const *running;
    size_t running_count;
} alive_msg_t;

size_t protocol_encode_alive(const alive_msg_t *msg, char *buf, size_t cap);

typedef struct {
    const char *app_name;
    const uint32_t *missing;
    size_t missing_count;
    const char *proplet_id;
    const char *encoding; /* NULL or "": upstream's JSON chunks; CHUNK_ENCODING_BINARY */
} registry_request_t;

size_t protocol_encode_registry_request(const registry_request_t *msg, char *buf, size_t cap);

typedef struct {
    const char *proplet_id;
    const char *namespace_;
    const char *description;
    const char *os;
    const char *hostname;
    const char *cpu_arch;
    const char *ip;
    const char *wasm_runtime;
    const char *proplet_version;
    uint64_t total_memory_bytes;
    unsigned max_concurrent_tasks;
    double heartbeat_interval_s;
    uint64_t max_module_bytes;
    const char *const *capabilities;
    size_t capability_count;
} discovery_msg_t;

size_t protocol_encode_discovery(const discovery_msg_t *msg, char *buf, size_t cap);

typedef struct {
    uint64_t heap_total_bytes;
    uint64_t heap_free_bytes;
    uint64_t heap_min_free_bytes;
    uint64_t heap_largest_free_block;
    uint64_t arena_total_bytes; /* 0: the engine has no fixed arena */
    uint64_t arena_free_bytes;
    uint64_t rss_bytes;
    double cpu_user_seconds;
    double cpu_system_seconds;
    double cpu_percent;
} proplet_sample_t;

typedef struct {
    const char *proplet_id;
    const char *namespace_;
    const char *timestamp; /* RFC 3339, or NULL when the wall clock is unknown */
    const proplet_sample_t *sample;
    unsigned tasks_running;
} metrics_msg_t;

size_t protocol_encode_metrics(const metrics_msg_t *msg, char *buf, size_t cap);

typedef struct {
    const char *task_id;
    const char *proplet_id;
    const char *timestamp;
    double wall_seconds;
    uint64_t cpu_time_us;
    uint64_t cpu_cycles; /* 0: unknown on this port */
    uint64_t memory_bytes;
    double cpu_percent;
} task_metrics_msg_t;

size_t protocol_encode_task_metrics(const task_metrics_msg_t *msg, char *buf, size_t cap);

#endif

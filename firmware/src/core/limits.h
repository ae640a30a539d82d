/* Compile-time bounds of the portable core. Every buffer in the core is sized from these.
 *
 * A port may override any of them with -D (platformio.ini build_flags, the host Makefile).
 * What happens past each bound is stated next to it.
 */
#ifndef PROPLET_LIMITS_H
#define PROPLET_LIMITS_H

/* Task ids are UUIDs (36 bytes); proplet ids are chosen by the operator.
 * Longer: the start message is refused as invalid. */
#ifndef PROPLET_ID_MAX
#define PROPLET_ID_MAX 64
#endif

/* Export names. Longer: invalid start. */
#ifndef PROPLET_EXPORT_NAME_MAX
#define PROPLET_EXPORT_NAME_MAX 64
#endif

/* image_url / app_name ("blob:sha256:<64 hex>" is 76 bytes; OCI refs are longer).
 * Longer: invalid start; chunks with such a name are ignored. */
#ifndef PROPLET_APP_NAME_MAX
#define PROPLET_APP_NAME_MAX 200
#endif

/* Task inputs: count and length of each. More or longer: invalid start. */
#ifndef PROPLET_INPUTS_MAX
#define PROPLET_INPUTS_MAX 16
#endif
#ifndef PROPLET_INPUT_TEXT_MAX
#define PROPLET_INPUT_TEXT_MAX 80
#endif

/* Results an export may return. More: the task fails with a clear error. */
#ifndef PROPLET_RESULTS_MAX
#define PROPLET_RESULTS_MAX 8
#endif

/* The formatted `results` string. Longer: the task fails with a clear error. */
#ifndef PROPLET_RESULT_TEXT_MAX
#define PROPLET_RESULT_TEXT_MAX 512
#endif

/* Error and reason texts sent to the manager. Longer: truncated. */
#ifndef PROPLET_ERROR_TEXT_MAX
#define PROPLET_ERROR_TEXT_MAX 300
#endif

/* W3C traceparent is 55 bytes. Longer: not echoed. */
#ifndef PROPLET_TRACEPARENT_MAX
#define PROPLET_TRACEPARENT_MAX 64
#endif

/* Upper bound of task slots; the runtime slot count (the pool size announced as
 * max_concurrent_tasks) is at most this. */
#ifndef PROPLET_MAX_SLOTS
#define PROPLET_MAX_SLOTS 8
#endif

/* Chunks per module. More: the transfer fails ("raise the manager's chunk_size"). */
#ifndef PROPLET_MAX_CHUNKS
#define PROPLET_MAX_CHUNKS 512
#endif

/* Chunk indexes named in one resumed registry request; the rest are asked for next time. */
#ifndef PROPLET_MISSING_PER_REQUEST
#define PROPLET_MISSING_PER_REQUEST 64
#endif

/* Parsed modules kept for reuse (keyed by sha256). Full: the least recently used idle one is
 * unloaded; when all are in use, the task runs with a private copy. */
#ifndef PROPLET_MODULE_CACHE
#define PROPLET_MODULE_CACHE 4
#endif

/* Finished tasks remembered (with their result, about 950 bytes each) so a redelivered or
 * re-sent start is answered with the result instead of running again. Full: the oldest is
 * forgotten, and a start for it after that runs again. */
#ifndef PROPLET_RECENT_TASKS
#define PROPLET_RECENT_TASKS 4
#endif

/* Ed25519 public keys a proplet trusts for module signatures (PROPLET_TRUSTED_KEYS on the host
 * build, the provisioned trusted_keys on a device). More: the configuration is refused. */
#ifndef PROPLET_TRUSTED_KEYS_MAX
#define PROPLET_TRUSTED_KEYS_MAX 4
#endif

/* Domain and channel names, and whole topics. Longer: configuration is refused. */
#ifndef PROPLET_NAME_MAX
#define PROPLET_NAME_MAX 64
#endif
#ifndef PROPLET_TOPIC_MAX
#define PROPLET_TOPIC_MAX 200
#endif

/* One outgoing message (results, task_state, registry request, discovery, metrics).
 * Larger: the encoder reports it and nothing is sent (results are bounded well below). */
#ifndef PROPLET_MSG_MAX
#define PROPLET_MSG_MAX 1536
#endif

/* Wasm value types a signature may have; more parameters than this: the task fails. */
#ifndef PROPLET_PARAMS_MAX
#define PROPLET_PARAMS_MAX 16
#endif

/* How long the proplet asks for upstream's JSON chunks after binary ones never arrived (a broker
 * ACL dropping registry/server/binary, or the server being down at the time); then binary again. */
#ifndef PROPLET_JSON_CHUNKS_MS
#define PROPLET_JSON_CHUNKS_MS (10u * 60u * 1000u)
#endif

/* A result the manager has not acknowledged is sent again this often (once it acknowledges at
 * all), and, without acknowledgements, after a reconnect only if it is this recent. */
#ifndef PROPLET_RESULT_RESEND_MS
#define PROPLET_RESULT_RESEND_MS 5000
#endif
#ifndef PROPLET_UNCONFIRMED_TTL_MS
#define PROPLET_UNCONFIRMED_TTL_MS 60000
#endif

/* Requests to announce again (control/manager/discover) closer together than this get one answer. */
#ifndef PROPLET_DISCOVER_ANSWER_MIN_MS
#define PROPLET_DISCOVER_ANSWER_MIN_MS 1000
#endif

#endif

#include "protocol.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "b64.h"
#include "cJSON.h"

/* ------------------------------------------------------------------------------------------
 * field readers: each sets err->reason naming the field, as core.protocol._Reader does */

static bool refuse(protocol_error_t *err, const char *fmt, ...)
{
    va_list args;
    va_start(args, fmt);
    vsnprintf(err->reason, sizeof err->reason, fmt, args);
    va_end(args);
    return false;
}

static const char *json_type_name(const cJSON *item)
{
    if (cJSON_IsBool(item))
        return "bool";
    if (cJSON_IsNumber(item))
        return fmod(item->valuedouble, 1.0) == 0.0 ? "int" : "float";
    if (cJSON_IsString(item))
        return "str";
    if (cJSON_IsArray(item))
        return "list";
    if (cJSON_IsObject(item))
        return "dict";
    return "null";
}

/* JSON null counts as absent, as obj.get() does in Python. */
static const cJSON *field(const cJSON *obj, const char *key)
{
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(obj, key);
    return cJSON_IsNull(item) ? NULL : item;
}

static bool read_str(const cJSON *obj, const char *key, bool required, char *out, size_t cap,
                     protocol_error_t *err)
{
    const cJSON *item = field(obj, key);
    out[0] = '\0';
    if (item == NULL)
        return required ? refuse(err, "missing required field '%s'", key) : true;
    if (!cJSON_IsString(item))
        return refuse(err, "field '%s' must be a string, got %s", key, json_type_name(item));
    size_t len = strlen(item->valuestring);
    if (required && len == 0)
        return refuse(err, "field '%s' must not be empty", key);
    if (len >= cap)
        return refuse(err, "field '%s' is longer than %zu bytes", key, cap - 1);
    memcpy(out, item->valuestring, len + 1);
    return true;
}

static bool read_bool(const cJSON *obj, const char *key, bool *out, protocol_error_t *err)
{
    const cJSON *item = field(obj, key);
    *out = false;
    if (item == NULL)
        return true;
    if (!cJSON_IsBool(item))
        return refuse(err, "field '%s' must be a boolean, got %s", key, json_type_name(item));
    *out = cJSON_IsTrue(item);
    return true;
}

/* Integers as Go sends them may be exact floats (3.0); anything else is refused. */
static bool read_uint(const cJSON *obj, const char *key, bool required, uint64_t minimum,
                      uint64_t maximum, uint64_t *out, protocol_error_t *err)
{
    const cJSON *item = field(obj, key);
    *out = 0;
    if (item == NULL)
        return required ? refuse(err, "missing required field '%s'", key) : true;
    if (!cJSON_IsNumber(item) || fmod(item->valuedouble, 1.0) != 0.0)
        return refuse(err, "field '%s' must be an integer, got %s", key, json_type_name(item));
    double value = item->valuedouble;
    if (value < (double)minimum)
        return refuse(err, "field '%s' must be at least %llu, got %.0f", key,
                      (unsigned long long)minimum, value);
    if (value > (double)maximum)
        return refuse(err, "field '%s' is too large (%.0f)", key, value);
    *out = (uint64_t)value;
    return true;
}

static bool read_digest(const cJSON *obj, const char *key, bool *has, uint8_t out[SHA256_BYTES],
                        protocol_error_t *err)
{
    char text[DIGEST_TEXT_SIZE + 1];
    *has = false;
    const cJSON *item = field(obj, key);
    if (item != NULL && cJSON_IsString(item) && strlen(item->valuestring) > DIGEST_TEXT_SIZE)
        return refuse(err, "field '%s' must look like sha256:<64 hex digits>", key);
    if (!read_str(obj, key, false, text, sizeof text, err))
        return false;
    if (text[0] == '\0')
        return true;
    if (!digest_parse(text, out))
        return refuse(err, "field '%s' must look like sha256:<64 hex digits>", key);
    *has = true;
    return true;
}

/* Strict: standard base64 of exactly 64 bytes, or absent / "" (unsigned). The length is checked
 * before decoding, so an oversized value costs nothing. */
static bool read_signature(const cJSON *obj, start_msg_t *out, protocol_error_t *err)
{
    static const char *const key = "wasm_signature";
    out->has_signature = false;
    const cJSON *item = field(obj, key);
    if (item == NULL)
        return true;
    if (!cJSON_IsString(item))
        return refuse(err, "field '%s' must be a string, got %s", key, json_type_name(item));
    size_t len = strlen(item->valuestring);
    if (len == 0)
        return true;
    size_t decoded = 0;
    if (len != SIGNATURE_B64_LEN
        || !b64_decode(item->valuestring, len, out->wasm_signature, sizeof out->wasm_signature,
                       &decoded)
        || decoded != ED25519_SIGNATURE_BYTES)
        return refuse(err, "field '%s' must be the standard base64 of a %d-byte Ed25519 signature",
                      key, ED25519_SIGNATURE_BYTES);
    out->has_signature = true;
    return true;
}

/* A start input that arrived as a JSON number keeps its literal text (upstream FlexStrings).
 * cJSON keeps only the double, so an integral value prints without a fraction ("5"), which is
 * orjson's text for JSON integers. */
static void number_as_text(double value, char *out, size_t cap)
{
    if (value == trunc(value) && fabs(value) < 9007199254740992.0) {
        snprintf(out, cap, "%.0f", value);
        return;
    }
    for (int precision = 1; precision <= 17; precision++) {
        snprintf(out, cap, "%.*g", precision, value);
        if (strtod(out, NULL) == value)
            return;
    }
}

static bool read_inputs(const cJSON *obj, start_msg_t *out, protocol_error_t *err)
{
    const cJSON *list = field(obj, "inputs");
    out->input_count = 0;
    if (list == NULL)
        return true;
    if (!cJSON_IsArray(list))
        return refuse(err, "field 'inputs' must be a list, got %s", json_type_name(list));
    int count = cJSON_GetArraySize(list);
    if (count > PROPLET_INPUTS_MAX)
        return refuse(err, "the task has %d inputs; this proplet accepts at most %d", count,
                      PROPLET_INPUTS_MAX);
    size_t i = 0;
    const cJSON *item;
    cJSON_ArrayForEach(item, list)
    {
        char *slot = out->inputs[i];
        if (cJSON_IsString(item)) {
            size_t len = strlen(item->valuestring);
            if (len > PROPLET_INPUT_TEXT_MAX)
                return refuse(err, "field 'inputs[%zu]' is longer than %d bytes", i,
                              PROPLET_INPUT_TEXT_MAX);
            memcpy(slot, item->valuestring, len + 1);
        } else if (cJSON_IsNumber(item)) {
            number_as_text(item->valuedouble, slot, PROPLET_INPUT_TEXT_MAX + 1);
        } else {
            return refuse(err, "field 'inputs[%zu]' must be a string, got %s", i,
                          json_type_name(item));
        }
        i++;
    }
    out->input_count = i;
    return true;
}

static bool read_limits(const cJSON *obj, task_limits_t *out, protocol_error_t *err)
{
    memset(out, 0, sizeof *out);
    const cJSON *limits = field(obj, "limits");
    if (limits == NULL)
        return true;
    if (!cJSON_IsObject(limits))
        return refuse(err, "field 'limits' must be an object, got %s", json_type_name(limits));
    const cJSON *timeout = field(limits, "timeout_s");
    if (timeout != NULL) {
        if (!cJSON_IsNumber(timeout) || !(timeout->valuedouble > 0))
            return refuse(err, "field 'limits.timeout_s' must be a positive number");
        out->timeout_s = timeout->valuedouble;
    }
    const char *names[2] = {"fuel", "memory_bytes"};
    uint64_t *targets[2] = {&out->fuel, &out->memory_bytes};
    for (int i = 0; i < 2; i++) {
        const cJSON *item = field(limits, names[i]);
        if (item == NULL)
            continue;
        if (!cJSON_IsNumber(item) || fmod(item->valuedouble, 1.0) != 0.0 || item->valuedouble <= 0
            || item->valuedouble >= 18446744073709551616.0)
            return refuse(err, "field 'limits.%s' must be a positive integer", names[i]);
        *targets[i] = (uint64_t)item->valuedouble;
    }
    return true;
}

static cJSON *parse_object(const char *payload, size_t len, protocol_error_t *err)
{
    cJSON *root = cJSON_ParseWithLength(payload, len);
    if (root == NULL) {
        refuse(err, "not valid JSON");
        return NULL;
    }
    if (!cJSON_IsObject(root)) {
        refuse(err, "expected a JSON object, got %s", json_type_name(root));
        cJSON_Delete(root);
        return NULL;
    }
    return root;
}

bool protocol_targets(const char *target_id, bool broadcast, const char *self_id)
{
    return broadcast || target_id[0] == '\0' || strcmp(target_id, self_id) == 0;
}

static bool parse_start_fields(const cJSON *root, start_msg_t *out, protocol_error_t *err)
{
    uint64_t number;
    if (!read_str(root, "id", true, out->id, sizeof out->id, err))
        return false;
    /* From here on a refusal can still be answered by task id. */
    err->has_id = true;
    memcpy(err->id, out->id, sizeof err->id);
    char proplet_id[PROPLET_ID_MAX + 1];
    bool broadcast = false;
    protocol_error_t ignored;
    memset(&ignored, 0, sizeof ignored);
    if (read_str(root, "proplet_id", false, proplet_id, sizeof proplet_id, &ignored))
        memcpy(err->proplet_id, proplet_id, sizeof err->proplet_id);
    if (read_bool(root, "broadcast", &broadcast, &ignored))
        err->broadcast = broadcast;
    if (read_uint(root, "attempt", false, 0, UINT32_MAX, &number, &ignored))
        err->attempt = (uint32_t)number;

    if (!read_str(root, "name", true, out->name, sizeof out->name, err)
        || !read_str(root, "image_url", false, out->image_url, sizeof out->image_url, err)
        || !read_str(root, "proplet_id", false, out->proplet_id, sizeof out->proplet_id, err)
        || !read_bool(root, "broadcast", &out->broadcast, err)
        || !read_bool(root, "daemon", &out->daemon, err)
        || !read_bool(root, "latent", &out->latent, err)
        || !read_bool(root, "encrypted", &out->encrypted, err) || !read_inputs(root, out, err)
        || !read_digest(root, "wasm_digest", &out->has_digest, out->wasm_digest, err)
        || !read_signature(root, out, err) || !read_limits(root, &out->limits, err))
        return false;
    if (!read_uint(root, "attempt", false, 0, UINT32_MAX, &number, err))
        return false;
    out->attempt = (uint32_t)number;

    const cJSON *trace = field(root, "traceparent");
    if (trace != NULL && !cJSON_IsString(trace))
        return refuse(err, "field 'traceparent' must be a string, got %s", json_type_name(trace));
    /* An over-long traceparent is not echoed rather than failing the task. */
    if (trace != NULL && strlen(trace->valuestring) <= PROPLET_TRACEPARENT_MAX)
        memcpy(out->traceparent, trace->valuestring, strlen(trace->valuestring) + 1);

    const cJSON *file = field(root, "file");
    if (file != NULL) {
        if (!cJSON_IsString(file))
            return refuse(err, "field 'file' must be a string, got %s", json_type_name(file));
        out->file_b64 = file->valuestring;
        out->file_b64_len = strlen(file->valuestring);
    }
    if (out->encrypted) {
        if (out->image_url[0] == '\0')
            return refuse(err, "an encrypted task needs 'image_url'");
        if (out->file_b64_len > 0)
            return refuse(err, "an encrypted task must not carry 'file'");
    } else if (out->file_b64_len == 0 && out->image_url[0] == '\0') {
        return refuse(err, "one of 'file' or 'image_url' is required");
    }
    return true;
}

bool protocol_parse_start(const char *payload, size_t len, start_msg_t *out, protocol_error_t *err)
{
    memset(out, 0, sizeof *out);
    memset(err, 0, sizeof *err);
    cJSON *root = parse_object(payload, len, err);
    if (root == NULL)
        return false;
    if (!parse_start_fields(root, out, err)) {
        cJSON_Delete(root);
        out->json = NULL;
        out->file_b64 = NULL;
        out->file_b64_len = 0;
        return false;
    }
    out->json = root;
    return true;
}

void protocol_start_release(start_msg_t *msg)
{
    cJSON_Delete(msg->json);
    msg->json = NULL;
    msg->file_b64 = NULL;
    msg->file_b64_len = 0;
}

bool protocol_parse_stop(const char *payload, size_t len, stop_msg_t *out, protocol_error_t *err)
{
    memset(out, 0, sizeof *out);
    memset(err, 0, sizeof *err);
    cJSON *root = parse_object(payload, len, err);
    if (root == NULL)
        return false;
    bool ok = read_str(root, "id", true, out->id, sizeof out->id, err)
              && read_str(root, "proplet_id", false, out->proplet_id, sizeof out->proplet_id, err)
              && read_bool(root, "broadcast", &out->broadcast, err);
    cJSON_Delete(root);
    return ok;
}

static bool parse_chunk_fields(const cJSON *root, chunk_msg_t *out, protocol_error_t *err)
{
    uint64_t total, idx;
    if (!read_uint(root, "total_chunks", true, 1, UINT32_MAX, &total, err)
        || !read_uint(root, "chunk_idx", true, 0, UINT32_MAX, &idx, err))
        return false;
    if (idx >= total)
        return refuse(err, "chunk_idx %llu is not below total_chunks %llu",
                      (unsigned long long)idx, (unsigned long long)total);
    out->chunk_idx = (uint32_t)idx;
    out->total_chunks = (uint32_t)total;
    if (!read_digest(root, "digest", &out->has_digest, out->digest, err)
        || !read_str(root, "app_name", true, out->app_name, sizeof out->app_name, err)
        || !read_uint(root, "size", false, 0, UINT64_MAX >> 11, &out->size, err))
        return false;
    const cJSON *data = field(root, "data");
    if (data != NULL) {
        if (!cJSON_IsString(data))
            return refuse(err, "field 'data' must be a string, got %s", json_type_name(data));
        out->data_b64 = data->valuestring;
        out->data_b64_len = strlen(data->valuestring);
    }
    const cJSON *error = field(root, "error");
    if (error != NULL) {
        if (!cJSON_IsString(error))
            return refuse(err, "field 'error' must be a string, got %s", json_type_name(error));
        /* The registry's explanation is shown to the user; a long one is cut. */
        snprintf(out->error, sizeof out->error, "%s", error->valuestring);
    }
    return true;
}

bool protocol_parse_chunk(const char *payload, size_t len, chunk_msg_t *out, protocol_error_t *err)
{
    memset(out, 0, sizeof *out);
    memset(err, 0, sizeof *err);
    cJSON *root = parse_object(payload, len, err);
    if (root == NULL)
        return false;
    if (!parse_chunk_fields(root, out, err)) {
        cJSON_Delete(root);
        out->data_b64 = NULL;
        out->data_b64_len = 0;
        return false;
    }
    out->json = root;
    return true;
}

bool protocol_parse_result_ack(const char *payload, size_t len, result_ack_msg_t *out,
                               protocol_error_t *err)
{
    memset(out, 0, sizeof *out);
    memset(err, 0, sizeof *err);
    cJSON *root = parse_object(payload, len, err);
    if (root == NULL)
        return false;
    uint64_t attempt = 0;
    bool ok = read_str(root, "task_id", true, out->acks[0].task_id, sizeof out->acks[0].task_id, err)
              && read_str(root, "proplet_id", true, out->proplet_id, sizeof out->proplet_id, err)
              && read_uint(root, "attempt", false, 0, UINT32_MAX, &attempt, err);
    out->acks[0].attempt = (uint32_t)attempt;
    out->count = 1;
    const cJSON *more = ok ? field(root, "more") : NULL;
    if (more != NULL && !cJSON_IsArray(more))
        ok = refuse(err, "field 'more' must be a list, got %s", json_type_name(more));
    const cJSON *pairs = ok ? more : NULL, *pair;
    cJSON_ArrayForEach(pair, pairs) {
        const cJSON *id = cJSON_GetArrayItem(pair, 0), *n = cJSON_GetArrayItem(pair, 1);
        if (!cJSON_IsArray(pair) || cJSON_GetArraySize(pair) != 2 || !cJSON_IsString(id)
            || !cJSON_IsNumber(n) || n->valuedouble < 0 || n->valuedouble > UINT32_MAX
            || n->valuedouble != (double)(uint32_t)n->valuedouble) {
            ok = refuse(err, "field 'more' must hold [task_id, attempt] pairs");
            break;
        }
        if (out->count == PROTOCOL_ACKS_MAX || strlen(id->valuestring) > PROPLET_ID_MAX)
            continue;
        result_ack_t *ack = &out->acks[out->count++];
        memcpy(ack->task_id, id->valuestring, strlen(id->valuestring) + 1);
        ack->attempt = (uint32_t)n->valuedouble;
    }
    cJSON_Delete(root);
    return ok;
}

bool protocol_parse_binary_chunk(const char *payload, size_t len, chunk_msg_t *out,
                                 protocol_error_t *err)
{
    memset(out, 0, sizeof *out);
    memset(err, 0, sizeof *err);
    size_t head_max = len < PROTOCOL_BINARY_HEAD_MAX ? len : PROTOCOL_BINARY_HEAD_MAX;
    const char *newline = memchr(payload, '\n', head_max);
    if (newline == NULL)
        return refuse(err, "a binary chunk must start with a JSON header line ended by a newline");
    size_t head_len = (size_t)(newline - payload);
    cJSON *root = parse_object(payload, head_len, err);
    if (root == NULL)
        return false;
    if (field(root, "data") != NULL) {
        cJSON_Delete(root);
        return refuse(err, "a binary chunk carries its data after the header line, not in a 'data' field");
    }
    if (!parse_chunk_fields(root, out, err)) {
        cJSON_Delete(root);
        return false;
    }
    out->binary = true;
    out->data_raw = (const uint8_t *)newline + 1;
    out->data_raw_len = len - head_len - 1;
    out->json = root;
    return true;
}

void protocol_chunk_release(chunk_msg_t *msg)
{
    cJSON_Delete(msg->json);
    msg->json = NULL;
    msg->data_b64 = NULL;
    msg->data_b64_len = 0;
    msg->data_raw = NULL;
    msg->data_raw_len = 0;
}

/* The value of "key":"..." in text; false when absent or escaped (ids never need escapes). */
static bool find_string_value(const char *text, size_t len, const char *key, bool last,
                              char *out, size_t cap)
{
    char pattern[32];
    int plen = snprintf(pattern, sizeof pattern, "\"%s\":\"", key);
    const char *found = NULL;
    for (size_t i = 0; i + (size_t)plen <= len; i++) {
        if (memcmp(text + i, pattern, (size_t)plen) == 0) {
            found = text + i + plen;
            if (!last)
                break;
        }
    }
    if (found == NULL)
        return false;
    size_t n = 0;
    while (found + n < text + len && found[n] != '"') {
        if (found[n] == '\\' || n + 1 >= cap)
            return false;
        n++;
    }
    if (found + n >= text + len)
        return false;
    memcpy(out, found, n);
    out[n] = '\0';
    return true;
}

bool protocol_peek_oversized_start(const char *head, size_t head_len, const char *tail,
                                   size_t tail_len, protocol_error_t *out)
{
    memset(out, 0, sizeof *out);
    static const char prefix[] = "{\"id\":\"";
    if (head_len < sizeof prefix - 1 || memcmp(head, prefix, sizeof prefix - 1) != 0)
        return false;
    if (!find_string_value(head, head_len, "id", false, out->id, sizeof out->id)
        || out->id[0] == '\0')
        return false;
    out->has_id = true;
    find_string_value(tail, tail_len, "proplet_id", true, out->proplet_id, sizeof out->proplet_id);
    static const char broadcast[] = "\"broadcast\":true";
    for (size_t i = 0; i + sizeof broadcast - 1 <= tail_len; i++)
        if (memcmp(tail + i, broadcast, sizeof broadcast - 1) == 0)
            out->broadcast = true;
    static const char attempt[] = "\"attempt\":";
    for (size_t i = 0; i + sizeof attempt - 1 < tail_len; i++) {
        if (memcmp(tail + i, attempt, sizeof attempt - 1) != 0)
            continue;
        uint32_t value = 0;
        for (size_t k = i + sizeof attempt - 1; k < tail_len && tail[k] >= '0' && tail[k] <= '9'
                                                 && value < 100000000u;
             k++)
            value = value * 10 + (uint32_t)(tail[k] - '0');
        out->attempt = value;
    }
    return true;
}

/* ------------------------------------------------------------------------------------------
 * encoders */

static size_t print(cJSON *root, char *buf, size_t cap)
{
    /* cJSON's size estimate is not exact, so a print may fail a few bytes short of cap;
     * PROPLET_MSG_MAX leaves ample room over any message the proplet sends. */
    size_t written = 0;
    if (root != NULL && cap > 0 && cap <= INT32_MAX
        && cJSON_PrintPreallocated(root, buf, (int)cap, false))
        written = strlen(buf);
    cJSON_Delete(root);
    return written;
}

static bool put_str(cJSON *obj, const char *key, const char *value)
{
    return cJSON_AddStringToObject(obj, key, value != NULL ? value : "") != NULL;
}

static bool put_str_if(cJSON *obj, const char *key, const char *value)
{
    return value == NULL || value[0] == '\0' || put_str(obj, key, value);
}

static bool put_num(cJSON *obj, const char *key, double value)
{
    return cJSON_AddNumberToObject(obj, key, value) != NULL;
}

size_t protocol_encode_result(const result_msg_t *msg, char *buf, size_t cap)
{
    cJSON *root = cJSON_CreateObject();
    bool ok = root != NULL && put_str(root, "task_id", msg->task_id)
              && put_str_if(root, "proplet_id", msg->proplet_id)
              && put_str(root, "results", msg->results);
    if (ok)
        ok = msg->error != NULL && msg->error[0] != '\0'
                 ? put_str(root, "error", msg->error)
                 : cJSON_AddNullToObject(root, "error") != NULL;
    if (ok && msg->attempt > 0)
        ok = put_num(root, "attempt", msg->attempt);
    if (ok)
        ok = put_str_if(root, "traceparent", msg->traceparent);
    if (!ok) {
        cJSON_Delete(root);
        return 0;
    }
    return print(root, buf, cap);
}

size_t protocol_encode_task_state(const task_state_msg_t *msg, char *buf, size_t cap)
{
    cJSON *root = cJSON_CreateObject();
    bool ok = root != NULL && put_str(root, "task_id", msg->task_id)
              && put_str(root, "proplet_id", msg->proplet_id) && put_str(root, "state", msg->state);
    if (ok && msg->attempt > 0)
        ok = put_num(root, "attempt", msg->attempt);
    ok = ok && put_str_if(root, "reason", msg->reason)
         && put_str_if(root, "traceparent", msg->traceparent);
    if (!ok) {
        cJSON_Delete(root);
        return 0;
    }
    return print(root, buf, cap);
}

size_t protocol_encode_alive(const alive_msg_t *msg, char *buf, size_t cap)
{
    cJSON *root = cJSON_CreateObject();
    bool ok = root != NULL && put_str(root, "proplet_id", msg->proplet_id)
              && put_str(root, "status", msg->status)
              && put_str_if(root, "namespace", msg->namespace_);
    if (ok && msg->running_count > 0) {
        cJSON *running = cJSON_AddArrayToObject(root, "running");
        ok = running != NULL;
        for (size_t i = 0; ok && i < msg->running_count; i++) {
            cJSON *id = cJSON_CreateString(msg->running[i]);
            ok = id != NULL && cJSON_AddItemToArray(running, id);
        }
    }
    if (!ok) {
        cJSON_Delete(root);
        return 0;
    }
    return print(root, buf, cap);
}

size_t protocol_encode_registry_request(const registry_request_t *msg, char *buf, size_t cap)
{
    cJSON *root = cJSON_CreateObject();
    bool ok = root != NULL && put_str(root, "app_name", msg->app_name);
    if (ok && msg->missing_count > 0) {
        cJSON *missing = cJSON_AddArrayToObject(root, "missing");
        ok = missing != NULL;
        for (size_t i = 0; ok && i < msg->missing_count; i++) {
            cJSON *idx = cJSON_CreateNumber(msg->missing[i]);
            ok = idx != NULL && cJSON_AddItemToArray(missing, idx);
        }
    }
    ok = ok && put_str_if(root, "proplet_id", msg->proplet_id);
    ok = ok && put_str_if(root, "encoding", msg->encoding);
    if (!ok) {
        cJSON_Delete(root);
        return 0;
    }
    return print(root, buf, cap);
}

size_t protocol_encode_discovery(const discovery_msg_t *msg, char *buf, size_t cap)
{
    cJSON *root = cJSON_CreateObject();
    cJSON *meta = root != NULL ? cJSON_CreateObject() : NULL;
    bool ok = meta != NULL && put_str(root, "proplet_id", msg->proplet_id)
              && put_str(root, "namespace", msg->namespace_)
              && cJSON_AddItemToObject(root, "metadata", meta);
    if (!ok) {
        cJSON_Delete(meta);
        cJSON_Delete(root);
        return 0;
    }
    ok = put_str_if(meta, "description", msg->description)
         && put_str(meta, "environment", "embedded") && put_str_if(meta, "os", msg->os)
         && put_str_if(meta, "hostname", msg->hostname)
         && put_str_if(meta, "cpu_arch", msg->cpu_arch) && put_str_if(meta, "ip", msg->ip)
         && put_num(meta, "total_memory_bytes", (double)msg->total_memory_bytes)
         && put_str(meta, "proplet_version", msg->proplet_version)
         && put_str(meta, "wasm_runtime", msg->wasm_runtime)
         && put_num(meta, "max_concurrent_tasks", msg->max_concurrent_tasks)
         && put_num(meta, "heartbeat_interval", msg->heartbeat_interval_s)
         && put_num(meta, "max_module_bytes", (double)msg->max_module_bytes);
    if (ok) {
        cJSON *caps = cJSON_AddArrayToObject(meta, "capabilities");
        ok = caps != NULL;
        for (size_t i = 0; ok && i < msg->capability_count; i++) {
            cJSON *cap_item = cJSON_CreateString(msg->capabilities[i]);
            ok = cap_item != NULL && cJSON_AddItemToArray(caps, cap_item);
        }
    }
    if (!ok) {
        cJSON_Delete(root);
        return 0;
    }
    return print(root, buf, cap);
}

static bool put_timestamp(cJSON *obj, const char *timestamp)
{
    if (timestamp == NULL || timestamp[0] == '\0')
        return cJSON_AddNullToObject(obj, "timestamp") != NULL;
    return put_str(obj, "timestamp", timestamp);
}

size_t protocol_encode_metrics(const metrics_msg_t *msg, char *buf, size_t cap)
{
    const proplet_sample_t *s = msg->sample;
    cJSON *root = cJSON_CreateObject();
    bool ok = root != NULL && put_str(root, "proplet_id", msg->proplet_id)
              && put_str(root, "namespace", msg->namespace_)
              && put_timestamp(root, msg->timestamp);
    cJSON *cpu = ok ? cJSON_AddObjectToObject(root, "cpu_metrics") : NULL;
    ok = cpu != NULL && put_num(cpu, "user_seconds", s->cpu_user_seconds)
         && put_num(cpu, "system_seconds", s->cpu_system_seconds)
         && put_num(cpu, "percent", s->cpu_percent);
    cJSON *mem = ok ? cJSON_AddObjectToObject(root, "memory_metrics") : NULL;
    uint64_t used = s->heap_total_bytes - s->heap_free_bytes;
    ok = mem != NULL && put_num(mem, "rss_bytes", (double)s->rss_bytes)
         && put_num(mem, "heap_alloc_bytes", (double)used)
         && put_num(mem, "heap_sys_bytes", (double)s->heap_total_bytes)
         && put_num(mem, "heap_inuse_bytes", (double)used)
         && put_num(mem, "heap_free_bytes", (double)s->heap_free_bytes)
         && put_num(mem, "heap_min_free_bytes", (double)s->heap_min_free_bytes)
         && put_num(mem, "heap_largest_free_block_bytes", (double)s->heap_largest_free_block)
         && put_num(mem, "wasm_arena_total_bytes", (double)s->arena_total_bytes)
         && put_num(mem, "wasm_arena_free_bytes", (double)s->arena_free_bytes)
         && put_num(root, "tasks_running", msg->tasks_running);
    if (!ok) {
        cJSON_Delete(root);
        return 0;
    }
    return print(root, buf, cap);
}

size_t protocol_encode_task_metrics(const task_metrics_msg_t *msg, char *buf, size_t cap)
{
    cJSON *root = cJSON_CreateObject();
    bool ok = root != NULL && put_str(root, "task_id", msg->task_id)
              && put_str(root, "proplet_id", msg->proplet_id);
    cJSON *m = ok ? cJSON_AddObjectToObject(root, "metrics") : NULL;
    ok = m != NULL && put_num(m, "cpu_percent", msg->cpu_percent)
         && put_num(m, "memory_bytes", (double)msg->memory_bytes)
         && put_num(m, "memory_percent", 0) && put_num(m, "disk_read_bytes", 0)
         && put_num(m, "disk_write_bytes", 0) && put_num(m, "uptime_seconds", msg->wall_seconds)
         && put_num(m, "thread_count", 1) && put_num(m, "file_descriptor_count", 0)
         && put_num(m, "cpu_time_us", (double)msg->cpu_time_us)
         && put_num(m, "cpu_cycles", (double)msg->cpu_cycles)
         && cJSON_AddNullToObject(root, "aggregated") != NULL
         && put_timestamp(root, msg->timestamp);
    if (!ok) {
        cJSON_Delete(root);
        return 0;
    }
    return print(root, buf, cap);
}

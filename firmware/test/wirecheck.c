/* The C side of the wire cross-checks (tests/firmware/test_wire.py): one JSON request per
 * line on stdin, one answer per line on stdout, so Python can compare thousands of generated
 * cases with core/protocol.py and core/wasmvalues.py.
 *
 *   {"op":"format","type":"f32","bits":"3dcccccd"}           -> 0.1
 *   {"op":"parse","type":"i32","text":" 7","index":0}        -> {"ok":true,"bits":"00000007"}
 *   {"op":"result"|"task_state"|"alive"|"registry_request", ...fields} -> the encoded message
 *   {"op":"start"|"chunk"|"stop","payload":"<message>"}     -> what the decoder made of it
 *   {"op":"binary_chunk","payload":"<base64 of the message>"} -> the same, with data_hex
 *   {"op":"result_ack","payload":"<message>"}                 -> proplet_id and [task_id, attempt] acks
 *   {"op":"trust","pems":["<PEM>",...],"payload":"<start>"}   -> {"ok":..,"error":..}: the start
 *                                                   checked against those keys (signature.h)
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cJSON.h"

#include "../src/core/b64.h"
#include "../src/core/protocol.h"
#include "../src/core/signature.h"
#include "../src/core/wasmval.h"

#define LINE_MAX_BYTES (1 << 20)

static wasm_type_t type_named(const char *name)
{
    const wasm_type_t types[] = {WASM_TYPE_I32, WASM_TYPE_I64, WASM_TYPE_F32, WASM_TYPE_F64,
                                 WASM_TYPE_V128, WASM_TYPE_FUNCREF, WASM_TYPE_EXTERNREF};
    for (size_t i = 0; i < sizeof types / sizeof types[0]; i++)
        if (strcmp(name, wasm_type_name(types[i])) == 0)
            return types[i];
    return WASM_TYPE_OTHER;
}

static const char *str(const cJSON *req, const char *key)
{
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(req, key);
    return cJSON_IsString(item) ? item->valuestring : NULL;
}

static double num(const cJSON *req, const char *key)
{
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(req, key);
    return cJSON_IsNumber(item) ? item->valuedouble : 0;
}

static void print_json(cJSON *answer)
{
    char *text = cJSON_PrintUnformatted(answer);
    puts(text != NULL ? text : "null");
    free(text);
    cJSON_Delete(answer);
}

static void op_format(const cJSON *req)
{
    wasm_value_t v;
    v.type = type_named(str(req, "type"));
    uint64_t bits = strtoull(str(req, "bits"), NULL, 16);
    if (v.type == WASM_TYPE_I32 || v.type == WASM_TYPE_F32) {
        uint32_t narrow = (uint32_t)bits;
        memcpy(&v.of, &narrow, sizeof narrow);
    } else {
        memcpy(&v.of, &bits, sizeof bits);
    }
    char out[64];
    puts(wasm_format_value(&v, out, sizeof out) ? out : "ERROR");
}

static void op_parse(const cJSON *req)
{
    wasm_value_t v;
    char err[PROPLET_ERROR_TEXT_MAX + 1];
    cJSON *answer = cJSON_CreateObject();
    wasm_type_t type = type_named(str(req, "type"));
    if (wasm_parse_input(str(req, "text"), type, (size_t)num(req, "index"), &v, err, sizeof err)) {
        char hex[17];
        if (type == WASM_TYPE_I32 || type == WASM_TYPE_F32) {
            uint32_t bits;
            memcpy(&bits, &v.of, sizeof bits);
            snprintf(hex, sizeof hex, "%08" PRIx32, bits);
        } else {
            uint64_t bits;
            memcpy(&bits, &v.of, sizeof bits);
            snprintf(hex, sizeof hex, "%016" PRIx64, bits);
        }
        cJSON_AddTrueToObject(answer, "ok");
        cJSON_AddStringToObject(answer, "bits", hex);
    } else {
        cJSON_AddFalseToObject(answer, "ok");
        cJSON_AddStringToObject(answer, "error", err);
    }
    print_json(answer);
}

static void op_encode(const cJSON *req, const char *op)
{
    char buf[PROPLET_MSG_MAX * 4];
    size_t n = 0;
    uint32_t attempt = (uint32_t)num(req, "attempt");
    if (strcmp(op, "result") == 0) {
        result_msg_t m = {str(req, "task_id"), str(req, "proplet_id"), str(req, "results"),
                          str(req, "error"), attempt, str(req, "traceparent")};
        n = protocol_encode_result(&m, buf, sizeof buf);
    } else if (strcmp(op, "task_state") == 0) {
        task_state_msg_t m = {str(req, "task_id"), str(req, "proplet_id"), str(req, "state"),
                              attempt, str(req, "reason"), str(req, "traceparent")};
        n = protocol_encode_task_state(&m, buf, sizeof buf);
    } else if (strcmp(op, "alive") == 0) {
        const char *running[PROPLET_MAX_SLOTS];
        size_t count = 0;
        const cJSON *item;
        cJSON_ArrayForEach(item, cJSON_GetObjectItemCaseSensitive(req, "running"))
            if (count < PROPLET_MAX_SLOTS)
                running[count++] = item->valuestring;
        alive_msg_t m = {str(req, "proplet_id"), str(req, "status"), str(req, "namespace"),
                         running, count};
        n = protocol_encode_alive(&m, buf, sizeof buf);
    } else if (strcmp(op, "registry_request") == 0) {
        uint32_t missing[PROPLET_MISSING_PER_REQUEST];
        size_t count = 0;
        const cJSON *item;
        cJSON_ArrayForEach(item, cJSON_GetObjectItemCaseSensitive(req, "missing"))
            if (count < PROPLET_MISSING_PER_REQUEST)
                missing[count++] = (uint32_t)item->valuedouble;
        registry_request_t m = {str(req, "app_name"), missing, count, str(req, "proplet_id"),
                                str(req, "encoding")};
        n = protocol_encode_registry_request(&m, buf, sizeof buf);
    }
    puts(n > 0 ? buf : "ERROR");
}

static void add_digest(cJSON *answer, bool has, const uint8_t *digest)
{
    char text[DIGEST_TEXT_SIZE] = "";
    if (has)
        digest_format(digest, text);
    cJSON_AddStringToObject(answer, "digest", text);
}

static void op_decode(const cJSON *req, const char *op)
{
    const char *payload = str(req, "payload");
    size_t len = strlen(payload);
    cJSON *answer = cJSON_CreateObject();
    protocol_error_t err;
    bool ok;
    if (strcmp(op, "start") == 0) {
        start_msg_t m;
        ok = protocol_parse_start(payload, len, &m, &err);
        if (ok) {
            cJSON_AddStringToObject(answer, "id", m.id);
            cJSON_AddStringToObject(answer, "name", m.name);
            cJSON_AddStringToObject(answer, "image_url", m.image_url);
            cJSON_AddStringToObject(answer, "proplet_id", m.proplet_id);
            cJSON_AddBoolToObject(answer, "broadcast", m.broadcast);
            cJSON *inputs = cJSON_AddArrayToObject(answer, "inputs");
            for (size_t i = 0; i < m.input_count; i++)
                cJSON_AddItemToArray(inputs, cJSON_CreateString(m.inputs[i]));
            add_digest(answer, m.has_digest, m.wasm_digest);
            char signature[2 * ED25519_SIGNATURE_BYTES + 1] = "";
            for (size_t i = 0; m.has_signature && i < ED25519_SIGNATURE_BYTES; i++)
                snprintf(signature + 2 * i, 3, "%02x", m.wasm_signature[i]);
            cJSON_AddStringToObject(answer, "signature_hex", signature);
            cJSON_AddNumberToObject(answer, "attempt", m.attempt);
            /* As text: cJSON prints numbers with 15 significant digits when that reads back
             * within an epsilon, which would hide a decoding difference. */
            char timeout[32];
            snprintf(timeout, sizeof timeout, "%.17g", m.limits.timeout_s);
            cJSON_AddStringToObject(answer, "timeout_s", timeout);
            char number[32];
            snprintf(number, sizeof number, "%" PRIu64, m.limits.fuel);
            cJSON_AddStringToObject(answer, "fuel", number);
            snprintf(number, sizeof number, "%" PRIu64, m.limits.memory_bytes);
            cJSON_AddStringToObject(answer, "memory_bytes", number);
            cJSON_AddStringToObject(answer, "traceparent", m.traceparent);
            cJSON_AddNumberToObject(answer, "file_b64_len", (double)m.file_b64_len);
            protocol_start_release(&m);
        }
    } else if (strcmp(op, "result_ack") == 0) {
        result_ack_msg_t m;
        ok = protocol_parse_result_ack(payload, len, &m, &err);
        if (ok) {
            cJSON_AddStringToObject(answer, "proplet_id", m.proplet_id);
            cJSON *acks = cJSON_AddArrayToObject(answer, "acks");
            for (size_t i = 0; i < m.count; i++) {
                cJSON *pair = cJSON_CreateArray();
                cJSON_AddItemToArray(pair, cJSON_CreateString(m.acks[i].task_id));
                cJSON_AddItemToArray(pair, cJSON_CreateNumber(m.acks[i].attempt));
                cJSON_AddItemToArray(acks, pair);
            }
        }
    } else if (strcmp(op, "chunk") == 0 || strcmp(op, "binary_chunk") == 0) {
        chunk_msg_t c;
        bool binary = strcmp(op, "binary_chunk") == 0;
        /* A binary chunk comes base64-encoded: this protocol is lines of JSON. */
        uint8_t *raw = NULL;
        size_t raw_len = 0;
        if (binary) {
            b64_decoded_len(payload, len, &raw_len);
            raw = malloc(raw_len + 1);
            if (raw == NULL || !b64_decode(payload, len, raw, raw_len + 1, &raw_len)) {
                puts("ERROR binary_chunk payload is not base64");
                free(raw);
                cJSON_Delete(answer);
                return;
            }
        }
        ok = binary ? protocol_parse_binary_chunk((const char *)raw, raw_len, &c, &err)
                    : protocol_parse_chunk(payload, len, &c, &err);
        if (ok && binary) {
            char *hex = malloc(c.data_raw_len * 2 + 1);
            for (size_t i = 0; hex != NULL && i < c.data_raw_len; i++)
                snprintf(hex + 2 * i, 3, "%02x", c.data_raw[i]);
            if (hex != NULL) {
                hex[c.data_raw_len * 2] = '\0';
                cJSON_AddStringToObject(answer, "data_hex", hex);
            }
            free(hex);
        }
        if (ok) {
            cJSON_AddStringToObject(answer, "app_name", c.app_name);
            cJSON_AddNumberToObject(answer, "chunk_idx", c.chunk_idx);
            cJSON_AddNumberToObject(answer, "total_chunks", c.total_chunks);
            char size[32];
            snprintf(size, sizeof size, "%" PRIu64, c.size);
            cJSON_AddStringToObject(answer, "size", size);
            add_digest(answer, c.has_digest, c.digest);
            cJSON_AddStringToObject(answer, "error", c.error);
            cJSON_AddNumberToObject(answer, "data_b64_len", (double)c.data_b64_len);
            protocol_chunk_release(&c);
        }
        free(raw);
    } else {
        stop_msg_t s;
        ok = protocol_parse_stop(payload, len, &s, &err);
        if (ok) {
            cJSON_AddStringToObject(answer, "id", s.id);
            cJSON_AddStringToObject(answer, "proplet_id", s.proplet_id);
            cJSON_AddBoolToObject(answer, "broadcast", s.broadcast);
        }
    }
    cJSON_AddBoolToObject(answer, "ok", ok);
    if (!ok)
        cJSON_AddStringToObject(answer, "reason", err.reason);
    print_json(answer);
}

static void op_trust(const cJSON *req)
{
    cJSON *answer = cJSON_CreateObject();
    trusted_keys_t keys;
    memset(&keys, 0, sizeof keys);
    bool ok = ed25519_init();
    const char *error = ok ? "" : "ed25519_init failed";
    const cJSON *pem;
    cJSON_ArrayForEach(pem, cJSON_GetObjectItemCaseSensitive(req, "pems"))
    {
        uint8_t key[ED25519_PUBLIC_KEY_BYTES];
        if (ok && !(cJSON_IsString(pem)
                    && trusted_key_parse_pem(pem->valuestring, strlen(pem->valuestring), key)
                    && trusted_keys_add(&keys, key))) {
            ok = false;
            error = "a key is not an Ed25519 public key, or there are too many";
        }
    }
    char reason[PROPLET_ERROR_TEXT_MAX + 1] = "";
    start_msg_t m;
    protocol_error_t err;
    const char *payload = str(req, "payload");
    if (ok && !protocol_parse_start(payload, strlen(payload), &m, &err)) {
        ok = false;
        snprintf(reason, sizeof reason, "the start message is invalid: %s", err.reason);
        error = reason;
    } else if (ok) {
        ok = signature_check_start(&keys, &m, reason, sizeof reason);
        error = reason;
        protocol_start_release(&m);
    }
    cJSON_AddBoolToObject(answer, "ok", ok);
    cJSON_AddStringToObject(answer, "error", error);
    print_json(answer);
}

int main(void)
{
    static char line[LINE_MAX_BYTES];
    while (fgets(line, sizeof line, stdin) != NULL) {
        cJSON *req = cJSON_Parse(line);
        const char *op = req != NULL ? str(req, "op") : NULL;
        if (op == NULL)
            puts("ERROR bad request");
        else if (strcmp(op, "format") == 0)
            op_format(req);
        else if (strcmp(op, "parse") == 0)
            op_parse(req);
        else if (strcmp(op, "start") == 0 || strcmp(op, "chunk") == 0 || strcmp(op, "binary_chunk") == 0
                 || strcmp(op, "result_ack") == 0 || strcmp(op, "stop") == 0)
            op_decode(req, op);
        else if (strcmp(op, "trust") == 0)
            op_trust(req);
        else
            op_encode(req, op);
        cJSON_Delete(req);
        fflush(stdout);
    }
    return 0;
}

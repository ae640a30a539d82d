/* Decoding the manager's messages and encoding the proplet's, byte for byte as core/protocol.py
 * does (the expected strings below were produced by core.protocol's encoders). */
#include "testing.h"

#include "../src/core/protocol.h"

#define START(extra) "{\"id\":\"t-1\",\"name\":\"add\",\"state\":2,\"file\":\"AGFzbQEAAAA=\"" extra "}"

static bool parse_start(const char *json, start_msg_t *m, protocol_error_t *err)
{
    return protocol_parse_start(json, strlen(json), m, err);
}

static void parses_the_managers_start(void **state)
{
    (void)state;
    const char *json =
        "{\"id\":\"t-1\",\"name\":\"add\",\"state\":2,\"file\":\"AGFzbQEAAAA=\",\"inputs\":[\"2\","
        "\"40\"],\"cli_args\":null,\"broadcast\":false,\"daemon\":false,\"latent\":false,"
        "\"encrypted\":false,\"env\":{\"A\":\"b\"},\"proplet_id\":\"dev-1\",\"wasm_digest\":"
        "\"sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855\",\"limits\":"
        "{\"timeout_s\":2.5,\"fuel\":1000,\"memory_bytes\":65536},\"attempt\":3,\"traceparent\":"
        "\"00-aa-bb-01\",\"unknown\":[1,2]}";
    start_msg_t m;
    protocol_error_t err;
    assert_true(parse_start(json, &m, &err));
    assert_string_equal(m.id, "t-1");
    assert_string_equal(m.name, "add");
    assert_string_equal(m.proplet_id, "dev-1");
    assert_int_equal(m.input_count, 2);
    assert_string_equal(m.inputs[1], "40");
    assert_true(m.has_digest);
    assert_int_equal(m.wasm_digest[0], 0xe3);
    assert_true(m.limits.timeout_s == 2.5);
    assert_int_equal(m.limits.fuel, 1000);
    assert_int_equal(m.limits.memory_bytes, 65536);
    assert_int_equal(m.attempt, 3);
    assert_string_equal(m.traceparent, "00-aa-bb-01");
    assert_int_equal(m.file_b64_len, 12);
    assert_memory_equal(m.file_b64, "AGFzbQEAAAA=", 12);
    protocol_start_release(&m);
}

static void keeps_numeric_inputs_as_their_text(void **state)
{
    (void)state;
    start_msg_t m;
    protocol_error_t err;
    assert_true(parse_start(START(",\"inputs\":[5,-3,1.5,\"x\"],\"attempt\":2.0"), &m, &err));
    assert_string_equal(m.inputs[0], "5");
    assert_string_equal(m.inputs[1], "-3");
    assert_string_equal(m.inputs[2], "1.5");
    assert_string_equal(m.inputs[3], "x");
    assert_int_equal(m.attempt, 2);
    protocol_start_release(&m);
}

static void expect_refused(const char *json, const char *reason, bool has_id)
{
    start_msg_t m;
    protocol_error_t err;
    assert_false(parse_start(json, &m, &err));
    assert_string_equal(err.reason, reason);
    assert_int_equal(err.has_id, has_id);
    assert_null(m.json);
}

static void refuses_bad_starts_naming_the_field(void **state)
{
    (void)state;
    expect_refused("{", "not valid JSON", false);
    expect_refused("[1]", "expected a JSON object, got list", false);
    expect_refused("{\"name\":\"add\"}", "missing required field 'id'", false);
    expect_refused("{\"id\":7}", "field 'id' must be a string, got int", false);
    expect_refused("{\"id\":\"\"}", "field 'id' must not be empty", false);
    expect_refused("{\"id\":\"t-1\",\"name\":null,\"file\":\"QQ==\"}", "missing required field 'name'", true);
    expect_refused("{\"id\":\"t-1\",\"name\":\"add\"}", "one of 'file' or 'image_url' is required", true);
    expect_refused(START(",\"broadcast\":\"yes\""), "field 'broadcast' must be a boolean, got str", true);
    expect_refused(START(",\"inputs\":[true]"), "field 'inputs[0]' must be a string, got bool", true);
    expect_refused(START(",\"inputs\":\"1\""), "field 'inputs' must be a list, got str", true);
    expect_refused(START(",\"wasm_digest\":\"md5:00\""),
                   "field 'wasm_digest' must look like sha256:<64 hex digits>", true);
    expect_refused(START(",\"limits\":{\"timeout_s\":0}"), "field 'limits.timeout_s' must be a positive number", true);
    expect_refused(START(",\"limits\":{\"fuel\":1.5}"), "field 'limits.fuel' must be a positive integer", true);
    expect_refused(START(",\"attempt\":-1"), "field 'attempt' must be at least 0, got -1", true);
    expect_refused(START(",\"encrypted\":true"), "an encrypted task needs 'image_url'", true);
    expect_refused("{\"id\":\"t-1\",\"name\":\"add\",\"file\":\"\",\"image_url\":\"\"}",
                   "one of 'file' or 'image_url' is required", true);
}

static void a_refused_start_still_names_its_task_and_target(void **state)
{
    (void)state;
    start_msg_t m;
    protocol_error_t err;
    assert_false(parse_start("{\"id\":\"t-9\",\"name\":\"\",\"proplet_id\":\"dev-2\",\"attempt\":4,\"file\":\"QQ==\"}",
                             &m, &err));
    assert_true(err.has_id);
    assert_string_equal(err.id, "t-9");
    assert_string_equal(err.proplet_id, "dev-2");
    assert_int_equal(err.attempt, 4);
}

static void bounds_inputs_and_ids(void **state)
{
    (void)state;
    char json[4096];
    char many[1024] = "";
    for (int i = 0; i <= PROPLET_INPUTS_MAX; i++)
        strcat(many, i == 0 ? "\"1\"" : ",\"1\"");
    snprintf(json, sizeof json, START(",\"inputs\":[%s]"), many);
    expect_refused(json, "the task has 17 inputs; this proplet accepts at most 16", true);
    char long_id[PROPLET_ID_MAX + 2];
    memset(long_id, 'x', sizeof long_id - 1);
    long_id[sizeof long_id - 1] = '\0';
    snprintf(json, sizeof json, "{\"id\":\"%s\",\"name\":\"a\",\"file\":\"QQ==\"}", long_id);
    expect_refused(json, "field 'id' is longer than 64 bytes", false);
}

static void targets_follow_upstreams_rule(void **state)
{
    (void)state;
    assert_true(protocol_targets("", false, "dev-1"));
    assert_true(protocol_targets("dev-1", false, "dev-1"));
    assert_false(protocol_targets("dev-2", false, "dev-1"));
    assert_true(protocol_targets("dev-2", true, "dev-1"));
}

static void parses_stops(void **state)
{
    (void)state;
    stop_msg_t m;
    protocol_error_t err;
    const char *json = "{\"id\":\"t-1\",\"broadcast\":false,\"proplet_id\":\"dev-1\",\"traceparent\":\"x\"}";
    assert_true(protocol_parse_stop(json, strlen(json), &m, &err));
    assert_string_equal(m.id, "t-1");
    assert_string_equal(m.proplet_id, "dev-1");
    json = "{\"name\":\"t-1\",\"state\":\"1\"}";
    assert_false(protocol_parse_stop(json, strlen(json), &m, &err));
    assert_string_equal(err.reason, "missing required field 'id'");
}

static void parses_chunks_and_refuses_bad_indexes(void **state)
{
    (void)state;
    chunk_msg_t c;
    protocol_error_t err;
    const char *json = "{\"app_name\":\"blob:x\",\"chunk_idx\":1,\"total_chunks\":3,\"data\":\"QUJD\","
                       "\"digest\":\"sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855\","
                       "\"size\":9}";
    assert_true(protocol_parse_chunk(json, strlen(json), &c, &err));
    assert_string_equal(c.app_name, "blob:x");
    assert_int_equal(c.chunk_idx, 1);
    assert_int_equal(c.total_chunks, 3);
    assert_int_equal(c.size, 9);
    assert_true(c.has_digest);
    assert_int_equal(c.data_b64_len, 4);
    protocol_chunk_release(&c);

    const struct {
        const char *json;
        const char *reason;
    } bad[] = {
        {"{\"app_name\":\"a\",\"chunk_idx\":3,\"total_chunks\":3}", "chunk_idx 3 is not below total_chunks 3"},
        {"{\"app_name\":\"a\",\"chunk_idx\":0,\"total_chunks\":0}", "field 'total_chunks' must be at least 1, got 0"},
        {"{\"app_name\":\"a\",\"chunk_idx\":-1,\"total_chunks\":2}", "field 'chunk_idx' must be at least 0, got -1"},
        {"{\"app_name\":\"a\",\"total_chunks\":2}", "missing required field 'chunk_idx'"},
        {"{\"chunk_idx\":0,\"total_chunks\":1}", "missing required field 'app_name'"},
        {"{\"app_name\":\"a\",\"chunk_idx\":0,\"total_chunks\":1,\"data\":5}", "field 'data' must be a string, got int"},
        {"{\"app_name\":\"a\",\"chunk_idx\":0.5,\"total_chunks\":1}", "field 'chunk_idx' must be an integer, got float"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        assert_false(protocol_parse_chunk(bad[i].json, strlen(bad[i].json), &c, &err));
        assert_string_equal(err.reason, bad[i].reason);
    }
}

static void parses_binary_chunks_leaving_their_bytes_in_place(void **state)
{
    (void)state;
    chunk_msg_t c;
    protocol_error_t err;
    /* The header line, a newline, then raw bytes that may hold anything, newlines and NULs too. */
    static const char payload[] = "{\"app_name\":\"blob:x\",\"chunk_idx\":0,\"total_chunks\":2,\"size\":6}\n"
                                  "\n\0AB\xff";
    size_t len = sizeof payload - 1;
    assert_true(protocol_parse_binary_chunk(payload, len, &c, &err));
    assert_true(c.binary);
    assert_string_equal(c.app_name, "blob:x");
    assert_int_equal(c.total_chunks, 2);
    assert_int_equal(c.size, 6);
    assert_int_equal(c.data_raw_len, 5);
    assert_ptr_equal(c.data_raw, (const uint8_t *)payload + len - 5);
    assert_memory_equal(c.data_raw, "\n\0AB\xff", 5);
    assert_null(c.data_b64);
    protocol_chunk_release(&c);
    assert_null(c.data_raw);

    const struct {
        const char *payload;
        const char *reason;
    } bad[] = {
        {"{\"app_name\":\"a\",\"chunk_idx\":0,\"total_chunks\":1}",
         "a binary chunk must start with a JSON header line ended by a newline"},
        {"{\"app_name\":\"a\",\"chunk_idx\":0,\"total_chunks\":1,\"data\":\"QQ==\"}\nA",
         "a binary chunk carries its data after the header line, not in a 'data' field"},
        {"{\"app_name\":\"a\",\"chunk_idx\":2,\"total_chunks\":2}\nA", "chunk_idx 2 is not below total_chunks 2"},
        {"[1]\nA", "expected a JSON object, got list"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        assert_false(protocol_parse_binary_chunk(bad[i].payload, strlen(bad[i].payload), &c, &err));
        assert_string_equal(err.reason, bad[i].reason);
    }
}

static void parses_result_acks(void **state)
{
    (void)state;
    result_ack_msg_t m;
    protocol_error_t err;
    const char *json = "{\"task_id\":\"a\",\"proplet_id\":\"dev-1\",\"attempt\":2,\"more\":[[\"b\",0],[\"c\",7]]}";
    assert_true(protocol_parse_result_ack(json, strlen(json), &m, &err));
    assert_string_equal(m.proplet_id, "dev-1");
    assert_int_equal(m.count, 3);
    assert_string_equal(m.acks[0].task_id, "a");
    assert_int_equal(m.acks[0].attempt, 2);
    assert_string_equal(m.acks[2].task_id, "c");
    assert_int_equal(m.acks[2].attempt, 7);
    const char *bad[] = {
        "{\"proplet_id\":\"dev-1\"}",
        "{\"task_id\":\"a\",\"proplet_id\":\"dev-1\",\"more\":{}}",
        "{\"task_id\":\"a\",\"proplet_id\":\"dev-1\",\"more\":[[\"b\",-1]]}",
        "{\"task_id\":\"a\",\"proplet_id\":\"dev-1\",\"more\":[[\"b\"]]}",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        assert_false(protocol_parse_result_ack(bad[i], strlen(bad[i]), &m, &err));
}

static void encodes_results_like_the_python_side(void **state)
{
    (void)state;
    char buf[PROPLET_MSG_MAX];
    result_msg_t ok = {"t-1", "dev-1", "42", NULL, 3, "00-abc"};
    assert_int_not_equal(protocol_encode_result(&ok, buf, sizeof buf), 0);
    assert_string_equal(buf, "{\"task_id\":\"t-1\",\"proplet_id\":\"dev-1\",\"results\":\"42\","
                             "\"error\":null,\"attempt\":3,\"traceparent\":\"00-abc\"}");
    result_msg_t failed = {"t-1", "dev-1", "", "boom \"x\"\n\xc3\xa9\x01", 0, ""};
    assert_int_not_equal(protocol_encode_result(&failed, buf, sizeof buf), 0);
    assert_string_equal(buf, "{\"task_id\":\"t-1\",\"proplet_id\":\"dev-1\",\"results\":\"\","
                             "\"error\":\"boom \\\"x\\\"\\n\xc3\xa9\\u0001\"}");
    char tiny[20];
    assert_int_equal(protocol_encode_result(&ok, tiny, sizeof tiny), 0);
}

static void encodes_the_other_messages_like_the_python_side(void **state)
{
    (void)state;
    char buf[PROPLET_MSG_MAX];
    task_state_msg_t ts = {"t-1", "dev-1", "rejected", 2, "busy", NULL};
    protocol_encode_task_state(&ts, buf, sizeof buf);
    assert_string_equal(buf, "{\"task_id\":\"t-1\",\"proplet_id\":\"dev-1\",\"state\":\"rejected\","
                             "\"attempt\":2,\"reason\":\"busy\"}");
    const char *running[] = {"a", "b"};
    alive_msg_t alive = {"dev-1", "alive", "embedded", running, 2};
    protocol_encode_alive(&alive, buf, sizeof buf);
    assert_string_equal(buf, "{\"proplet_id\":\"dev-1\",\"status\":\"alive\",\"namespace\":"
                             "\"embedded\",\"running\":[\"a\",\"b\"]}");
    alive_msg_t will = {"dev-1", "offline", "embedded", NULL, 0};
    protocol_encode_alive(&will, buf, sizeof buf);
    assert_string_equal(buf, "{\"proplet_id\":\"dev-1\",\"status\":\"offline\",\"namespace\":\"embedded\"}");
    uint32_t missing[] = {1, 5};
    registry_request_t req = {"blob:sha256:00", missing, 2, "dev-1", NULL};
    protocol_encode_registry_request(&req, buf, sizeof buf);
    assert_string_equal(buf, "{\"app_name\":\"blob:sha256:00\",\"missing\":[1,5],\"proplet_id\":\"dev-1\"}");
    registry_request_t binary = {"blob:sha256:00", NULL, 0, "dev-1", CHUNK_ENCODING_BINARY};
    protocol_encode_registry_request(&binary, buf, sizeof buf);
    assert_string_equal(buf, "{\"app_name\":\"blob:sha256:00\",\"proplet_id\":\"dev-1\",\"encoding\":\"binary\"}");
}

static void encodes_discovery_with_the_pool_size_and_capabilities(void **state)
{
    (void)state;
    char buf[PROPLET_MSG_MAX];
    const char *caps[] = {"task_state"};
    discovery_msg_t d = {.proplet_id = "dev-1", .namespace_ = "embedded", .os = "esp-idf",
                         .cpu_arch = "xtensa", .wasm_runtime = "wamr", .proplet_version = "0.1.0",
                         .total_memory_bytes = 524288, .max_concurrent_tasks = 4,
                         .heartbeat_interval_s = 2.5, .max_module_bytes = 65536,
                         .capabilities = caps, .capability_count = 1};
    assert_int_not_equal(protocol_encode_discovery(&d, buf, sizeof buf), 0);
    assert_string_equal(buf, "{\"proplet_id\":\"dev-1\",\"namespace\":\"embedded\",\"metadata\":{"
                             "\"environment\":\"embedded\",\"os\":\"esp-idf\",\"cpu_arch\":\"xtensa\","
                             "\"total_memory_bytes\":524288,\"proplet_version\":\"0.1.0\","
                             "\"wasm_runtime\":\"wamr\",\"max_concurrent_tasks\":4,"
                             "\"heartbeat_interval\":2.5,\"max_module_bytes\":65536,"
                             "\"capabilities\":[\"task_state\"]}}");
}

static void peeks_into_an_oversized_start(void **state)
{
    (void)state;
    const char *head = "{\"id\":\"t-7\",\"name\":\"add\",\"state\":2,\"file\":\"AGFzbQEAAAA";
    const char *tail = "AAA=\",\"broadcast\":false,\"proplet_id\":\"dev-1\",\"attempt\":12,\"traceparent\":\"x\"}";
    protocol_error_t peek;
    assert_true(protocol_peek_oversized_start(head, strlen(head), tail, strlen(tail), &peek));
    assert_string_equal(peek.id, "t-7");
    assert_string_equal(peek.proplet_id, "dev-1");
    assert_int_equal(peek.attempt, 12);
    assert_false(peek.broadcast);
    assert_false(protocol_peek_oversized_start("{\"name\":\"x\"", 11, tail, strlen(tail), &peek));
    assert_false(protocol_peek_oversized_start("{\"id\":\"t\\\"", 10, tail, strlen(tail), &peek));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(parses_the_managers_start),
        cmocka_unit_test(keeps_numeric_inputs_as_their_text),
        cmocka_unit_test(refuses_bad_starts_naming_the_field),
        cmocka_unit_test(a_refused_start_still_names_its_task_and_target),
        cmocka_unit_test(bounds_inputs_and_ids),
        cmocka_unit_test(targets_follow_upstreams_rule),
        cmocka_unit_test(parses_stops),
        cmocka_unit_test(parses_chunks_and_refuses_bad_indexes),
        cmocka_unit_test(parses_binary_chunks_leaving_their_bytes_in_place),
        cmocka_unit_test(parses_result_acks),
        cmocka_unit_test(encodes_results_like_the_python_side),
        cmocka_unit_test(encodes_the_other_messages_like_the_python_side),
        cmocka_unit_test(encodes_discovery_with_the_pool_size_and_capabilities),
        cmocka_unit_test(peeks_into_an_oversized_start),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

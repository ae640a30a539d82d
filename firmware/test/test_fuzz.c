/* Fuzz-style tests: malformed JSON, bad base64, random and hostile chunk streams, random lines.
 * Deterministic (a fixed-seed generator) so a failure reproduces; AddressSanitizer and UBSan
 * turn any out-of-bounds access or undefined behaviour into a failure. */
#include "testing.h"

#include "../src/core/assembler.h"
#include "../src/core/b64.h"
#include "../src/core/provision.h"
#include "../src/core/wasmval.h"

static uint64_t rng_state;

static uint32_t next(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (uint32_t)(rng_state >> 11);
}

static uint32_t below(uint32_t n)
{
    return n == 0 ? 0 : next() % n;
}

static void random_bytes(char *out, size_t len, const char *alphabet)
{
    size_t n = alphabet != NULL ? strlen(alphabet) : 0;
    for (size_t i = 0; i < len; i++)
        out[i] = n > 0 ? alphabet[below((uint32_t)n)] : (char)below(256);
}

/* Random edits of a valid message: flips, deletions, insertions, truncation. */
static size_t mutate(const char *src, char *out, size_t cap)
{
    static const char json_bits[] = "{}[]\":,0123456789-+.eE truefalsnul\\u";
    size_t len = strlen(src);
    if (len >= cap)
        len = cap - 1;
    memcpy(out, src, len);
    unsigned edits = 1 + below(6);
    for (unsigned e = 0; e < edits && len > 0; e++) {
        size_t at = below((uint32_t)len);
        switch (below(4)) {
        case 0: out[at] = json_bits[below(sizeof json_bits - 1)]; break;
        case 1: memmove(out + at, out + at + 1, len - at - 1); len--; break;
        case 2:
            if (len + 1 < cap) {
                memmove(out + at + 1, out + at, len - at);
                out[at] = json_bits[below(sizeof json_bits - 1)];
                len++;
            }
            break;
        default: len = at; break;
        }
    }
    out[len] = '\0';
    return len;
}

static proplet_t proplet;

static void make_proplet(void)
{
    fake_engine_reset();
    fake_port_reset();
    proplet_config_t cfg = {.proplet_id = "dev-1", .domain = "d", .channel = "c", .slots = 3,
                            .max_module_bytes = 2048, .heartbeat_ms = 1000, .fetch_retry_ms = 100,
                            .fetch_retries = 1, .default_timeout_ms = 5000};
    proplet_port_t port = fake_port_make();
    char err[80];
    assert_true(proplet_init(&proplet, &cfg, &port, err, sizeof err));
}

static void deliver(const char *suffix, const char *payload, size_t len)
{
    char topic[PROPLET_TOPIC_MAX + 1];
    snprintf(topic, sizeof topic, "m/d/c/c/%s", suffix);
    /* The recorder holds RECORDED_MAX messages; keep room for this round's answers. */
    if (fake.count > RECORDED_MAX - 8)
        fake.count = 0;
    proplet_on_message(&proplet, topic, strlen(topic), payload, len);
}

static void drain(void)
{
    while (proplet_run_next(&proplet)) {
    }
    fake.now += 10000;
    proplet_tick(&proplet);
    fake.count = 0;
}

static void random_bytes_on_every_topic(void **state)
{
    (void)state;
    rng_state = 0x9e3779b97f4a7c15u;
    make_proplet();
    const char *topics[] = {TOPIC_START, TOPIC_STOP, TOPIC_REGISTRY_CHUNK, "control/proplet/alive"};
    char buf[512];
    for (int i = 0; i < 20000; i++) {
        size_t len = below(sizeof buf);
        random_bytes(buf, len, i % 2 ? NULL : "{}[]\":,abc019 \\");
        deliver(topics[below(4)], buf, len);
    }
    drain();
    assert_int_equal(proplet_busy_slots(&proplet), 0);
    proplet_destroy(&proplet);
    assert_int_equal(fake_engine.loads, fake_engine.unloads);
}

static void mutated_valid_messages(void **state)
{
    (void)state;
    rng_state = 0x1234567u;
    make_proplet();
    uint8_t module[32];
    size_t module_len = fake_module("m", module, sizeof module);
    char b64[64];
    b64_encode(module, module_len, b64);
    char start[1024], chunk[512], stop[128];
    snprintf(start, sizeof start,
             "{\"id\":\"t-1\",\"name\":\"add\",\"file\":\"%s\",\"inputs\":[\"1\",2],\"proplet_id\":"
             "\"dev-1\",\"limits\":{\"timeout_s\":1,\"fuel\":9,\"memory_bytes\":65536},"
             "\"wasm_digest\":\"sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855\","
             "\"attempt\":1,\"traceparent\":\"00-x\"}",
             b64);
    snprintf(chunk, sizeof chunk,
             "{\"app_name\":\"blob:a\",\"chunk_idx\":0,\"total_chunks\":1,\"data\":\"%s\",\"size\":%zu}",
             b64, module_len);
    snprintf(stop, sizeof stop, "{\"id\":\"t-1\",\"proplet_id\":\"dev-1\"}");
    const char *fetch = "{\"id\":\"t-2\",\"name\":\"add\",\"image_url\":\"blob:a\",\"inputs\":[\"1\",\"2\"]}";
    char buf[1100];
    for (int i = 0; i < 20000; i++) {
        switch (below(4)) {
        case 0: deliver(TOPIC_START, buf, mutate(start, buf, sizeof buf)); break;
        case 1:
            deliver(TOPIC_START, fetch, strlen(fetch));
            deliver(TOPIC_REGISTRY_CHUNK, buf, mutate(chunk, buf, sizeof buf));
            break;
        case 2: deliver(TOPIC_STOP, buf, mutate(stop, buf, sizeof buf)); break;
        default:
            if (below(2))
                proplet_run_next(&proplet);
            fake.now += below(400);
            proplet_tick(&proplet);
            break;
        }
        assert_true(proplet_busy_slots(&proplet) <= 3);
    }
    drain();
    assert_int_equal(proplet_busy_slots(&proplet), 0);
    /* The mutations must leave enough valid messages to reach the deep paths. */
    print_message("completed %u, failed %u, invalid %u\n", proplet.counters.tasks_completed,
                  proplet.counters.tasks_failed, proplet.counters.messages_invalid);
    assert_true(proplet.counters.tasks_completed > 20);
    assert_true(proplet.counters.tasks_failed > 100);
    proplet_destroy(&proplet);
    assert_int_equal(fake_engine.live_instances, 0);
    assert_int_equal(fake_engine.loads, fake_engine.unloads);
}

static void hostile_chunk_streams(void **state)
{
    (void)state;
    rng_state = 0xfeedfaceu;
    uint8_t module[700];
    for (size_t i = 0; i < sizeof module; i++)
        module[i] = (uint8_t)next();
    for (int round = 0; round < 3000; round++) {
        size_t max = 64 + below(900);
        assembler_t a;
        assembler_begin(&a, "blob:z", max);
        size_t module_len = 1 + below(sizeof module);
        size_t piece = 1 + below(200);
        uint32_t total = (uint32_t)((module_len + piece - 1) / piece);
        bool honest = below(3) != 0;
        bool with_size = below(2);
        for (int k = 0; k < 80 && a.state == ASSEMBLY_WAITING; k++) {
            chunk_msg_t c;
            memset(&c, 0, sizeof c);
            snprintf(c.app_name, sizeof c.app_name, "blob:z");
            c.chunk_idx = honest ? below(total) : below(total + 2);
            c.total_chunks = honest || below(4) ? total : 1 + below(PROPLET_MAX_CHUNKS + 10);
            if (c.chunk_idx >= c.total_chunks)
                c.chunk_idx = c.total_chunks - 1; /* the decoder never lets idx >= total through */
            size_t start = (size_t)c.chunk_idx * piece;
            size_t len = start >= module_len ? 0 : (start + piece <= module_len ? piece : module_len - start);
            if (!honest && below(3) == 0)
                len = below(300);
            char b64[512];
            uint8_t data[300];
            for (size_t i = 0; i < len; i++)
                data[i] = start + i < module_len ? module[start + i] : (uint8_t)next();
            b64_encode(data, len, b64);
            if (!honest && below(8) == 0)
                b64[below((uint32_t)strlen(b64) + 1)] = '*';
            c.data_b64 = b64;
            c.data_b64_len = strlen(b64);
            c.size = with_size ? (honest ? module_len : below(2000)) : 0;
            assembler_add(&a, &c);
        }
        if (a.state == ASSEMBLY_COMPLETE && honest) {
            size_t len;
            uint8_t *out = assembler_take(&a, &len);
            assert_int_equal(len, module_len);
            assert_memory_equal(out, module, module_len);
            free(out);
        }
        assembler_reset(&a);
    }
}

static void random_base64(void **state)
{
    (void)state;
    rng_state = 42;
    char text[64];
    uint8_t out[48];
    for (int i = 0; i < 100000; i++) {
        size_t len = below(sizeof text);
        random_bytes(text, len, "ABCxyz019+/=-_ \n");
        size_t expected, got;
        bool valid = b64_decoded_len(text, len, &expected);
        size_t cap = below(sizeof out + 1);
        bool decoded = b64_decode(text, len, out, cap, &got);
        assert_true(!decoded || (valid && got == expected && got <= cap));
    }
}

static void random_inputs_and_values(void **state)
{
    (void)state;
    rng_state = 7;
    char text[PROPLET_INPUT_TEXT_MAX + 1];
    char err[PROPLET_ERROR_TEXT_MAX + 1];
    char out[64];
    for (int i = 0; i < 100000; i++) {
        size_t len = below(sizeof text);
        random_bytes(text, len, i % 3 ? "0123456789+-.eEinfaINF \t'\"\\x" : NULL);
        text[len] = '\0';
        wasm_value_t v;
        wasm_type_t type = (wasm_type_t)below(WASM_TYPE_OTHER + 1);
        if (wasm_parse_input(text, type, below(20), &v, err, sizeof err))
            assert_true(wasm_format_value(&v, out, sizeof out));
        /* Every bit pattern formats: NaN payloads, subnormals, both zeros. */
        uint64_t bits = (uint64_t)next() << 32 | next();
        wasm_value_t raw = {(wasm_type_t)below(4), {.i64 = 0}};
        memcpy(&raw.of, &bits, raw.type == WASM_TYPE_I32 || raw.type == WASM_TYPE_F32 ? 4 : 8);
        assert_true(wasm_format_value(&raw, out, sizeof out));
    }
}

static void random_provisioning_lines_and_peeks(void **state)
{
    (void)state;
    rng_state = 99;
    proplet_settings_t settings;
    memset(&settings, 0, sizeof settings);
    char line[PROVISION_LINE_MAX + 40], reply[1024], tail[300];
    const char *verbs[] = {"SET ", "GET ", "LIST", "HELLO", "ERASE", "set wifi_ssid ", "SET mqtt_url "};
    for (int i = 0; i < 50000; i++) {
        size_t prefix = strlen(strcpy(line, verbs[below(7)]));
        size_t len = below(sizeof line - prefix - 1);
        random_bytes(line + prefix, len, i % 2 ? "abc_=:/ \r\n0" : NULL);
        line[prefix + len] = '\0';
        provision_handle_line(&settings, below(2), line, reply, below(2) ? sizeof reply : 8);
        size_t tail_len = below(sizeof tail);
        random_bytes(tail, tail_len, "\"proplet_id:broadcast:true,attempt0123456789");
        protocol_error_t peek;
        protocol_peek_oversized_start(line, strlen(line), tail, tail_len, &peek);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(random_bytes_on_every_topic),
        cmocka_unit_test(mutated_valid_messages),
        cmocka_unit_test(hostile_chunk_streams),
        cmocka_unit_test(random_base64),
        cmocka_unit_test(random_inputs_and_values),
        cmocka_unit_test(random_provisioning_lines_and_peeks),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

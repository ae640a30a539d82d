/* The proplet core against a fake engine and a fake port: what it runs, what it refuses, and
 * every message it sends about it. */
#include "testing.h"

#define PREFIX TEST_PREFIX

static proplet_t proplet;
static proplet_t *const p = &proplet;
static char module_b64[128];
static uint8_t module_bytes[64];
static size_t module_len;

static int setup(void **state)
{
    (void)state;
    fake_engine_reset();
    fake_port_reset();
    proplet_config_t cfg = test_config();
    proplet_port_t port = fake_port_make();
    char err[100];
    assert_true(proplet_init(p, &cfg, &port, err, sizeof err));
    module_len = fake_module("add", module_bytes, sizeof module_bytes);
    b64_encode(module_bytes, module_len, module_b64);
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    proplet_destroy(p);
    assert_int_equal(fake_engine.live_instances, 0);
    assert_int_equal(fake_engine.loads, fake_engine.unloads);
    return 0;
}

static void deliver(const char *suffix, const char *payload)
{
    test_deliver(p, suffix, payload);
}

/* A start for `name` with the fake module inline; extra is spliced into the JSON object. */
static void start_attempt(const char *id, const char *name, const char *inputs, unsigned attempt,
                          const char *extra)
{
    char json[2048];
    snprintf(json, sizeof json,
             "{\"id\":\"%s\",\"name\":\"%s\",\"state\":2,\"file\":\"%s\",\"inputs\":[%s],"
             "\"broadcast\":false,\"proplet_id\":\"dev-1\",\"attempt\":%u%s}",
             id, name, module_b64, inputs, attempt, extra);
    deliver(TOPIC_START, json);
}

static void start(const char *id, const char *name, const char *inputs, const char *extra)
{
    start_attempt(id, name, inputs, 1, extra);
}

/* A start as upstream's manager sends it: no attempt (and it never acknowledges results). */
static void upstream_start(const char *id, const char *name, const char *inputs)
{
    char json[2048];
    snprintf(json, sizeof json,
             "{\"id\":\"%s\",\"name\":\"%s\",\"state\":2,\"file\":\"%s\",\"inputs\":[%s],"
             "\"broadcast\":false,\"proplet_id\":\"dev-1\"}",
             id, name, module_b64, inputs);
    deliver(TOPIC_START, json);
}

static void runs_an_inline_task_and_reports_it(void **state)
{
    (void)state;
    start("t-1", "add", "\"2\",\"40\"", ",\"traceparent\":\"00-aa-bb-01\"");
    assert_string_equal(fake_published(TOPIC_TASK_STATE, 0),
                        "{\"task_id\":\"t-1\",\"proplet_id\":\"dev-1\",\"state\":\"running\","
                        "\"attempt\":1,\"traceparent\":\"00-aa-bb-01\"}");
    assert_int_equal(fake.wakes, 1);
    assert_int_equal(proplet_busy_slots(p), 1);
    assert_true(proplet_run_next(p));
    assert_false(proplet_run_next(p));
    assert_string_equal(fake_published(TOPIC_RESULTS, 0),
                        "{\"task_id\":\"t-1\",\"proplet_id\":\"dev-1\",\"results\":\"42\","
                        "\"error\":null,\"attempt\":1,\"traceparent\":\"00-aa-bb-01\"}");
    expect_contains(fake_published(TOPIC_TASK_METRICS, 0), "\"cpu_cycles\":60000");
    assert_int_equal(proplet_busy_slots(p), 0);
}

static void ignores_tasks_for_other_proplets_and_takes_broadcasts(void **state)
{
    (void)state;
    char json[1024];
    snprintf(json, sizeof json, "{\"id\":\"t-2\",\"name\":\"add\",\"file\":\"%s\",\"proplet_id\":\"dev-2\"}",
             module_b64);
    deliver(TOPIC_START, json);
    assert_int_equal(fake.count, 0);
    snprintf(json, sizeof json,
             "{\"id\":\"t-3\",\"name\":\"pair\",\"file\":\"%s\",\"broadcast\":true}", module_b64);
    deliver(TOPIC_START, json);
    assert_true(proplet_run_next(p));
    expect_contains(fake_published(TOPIC_RESULTS, 0), "\"results\":\"7,0.1\"");
}

static void answers_an_invalid_start_with_a_failed_result(void **state)
{
    (void)state;
    deliver(TOPIC_START, "{\"id\":\"t-4\",\"name\":\"add\",\"proplet_id\":\"dev-1\"}");
    assert_string_equal(fake_published(TOPIC_RESULTS, 0),
                        "{\"task_id\":\"t-4\",\"proplet_id\":\"dev-1\",\"results\":\"\",\"error\":"
                        "\"the start message is invalid: one of 'file' or 'image_url' is required\"}");
    /* Not ours, or not even JSON: nothing to answer. */
    deliver(TOPIC_START, "{\"id\":\"t-5\",\"name\":\"add\",\"proplet_id\":\"dev-2\"}");
    deliver(TOPIC_START, "{\"id\":");
    assert_int_equal(fake.count, 1);
    /* A garbled copy of a start this proplet already runs does not fail the task. */
    start("t-4b", "add", "\"1\",\"1\"", "");
    deliver(TOPIC_START, "{\"id\":\"t-4b\",\"name\":\"add\",\"proplet_id\":\"dev-1\"}");
    assert_int_equal(fake_count(TOPIC_RESULTS), 1);
    assert_true(proplet_run_next(p));
    expect_contains(fake_published(TOPIC_RESULTS, 1), "\"results\":\"2\"");
    assert_int_equal(p->counters.messages_invalid, 4);
}

static void runs_each_attempt_once(void **state)
{
    (void)state;
    start("t-6", "add", "\"1\",\"1\"", "");
    /* A redelivered (or re-sent) start is confirmed again, never run twice. */
    start("t-6", "add", "\"1\",\"1\"", "");
    assert_int_equal(fake_count(TOPIC_TASK_STATE), 2);
    assert_string_equal(fake_published(TOPIC_TASK_STATE, 0), fake_published(TOPIC_TASK_STATE, 1));
    /* The manager moved the task to attempt 2: the same slot now answers for it. */
    start_attempt("t-6", "add", "\"1\",\"1\"", 2, "");
    expect_contains(fake_published(TOPIC_TASK_STATE, 2), "\"attempt\":2");
    assert_true(proplet_run_next(p));
    assert_false(proplet_run_next(p));
    expect_contains(fake_published(TOPIC_RESULTS, 0), "\"attempt\":2");
    /* A late start of the finished attempt gets the same result again without a second run. */
    start_attempt("t-6", "add", "\"1\",\"1\"", 2, "");
    assert_false(proplet_run_next(p));
    assert_int_equal(fake_count(TOPIC_RESULTS), 2);
    assert_string_equal(fake_published(TOPIC_RESULTS, 0), fake_published(TOPIC_RESULTS, 1));
    assert_int_equal(fake_engine.instantiations, 1);
}

static void heartbeat_while_the_result_goes_out(const char *topic)
{
    if (strstr(topic, TOPIC_RESULTS) == NULL)
        return;
    fake.after_publish = NULL;
    fake.now += 10000;
    proplet_tick(p);
}

static void holds_the_slot_until_the_result_is_out(void **state)
{
    (void)state;
    proplet_on_connected(p);
    start("t-6b", "add", "\"1\",\"1\"", "");
    /* The timer thread heartbeats just as the worker publishes the result: the heartbeat must
     * still list the task, or the manager would think it vanished before its result came. */
    fake.after_publish = heartbeat_while_the_result_goes_out;
    assert_true(proplet_run_next(p));
    assert_string_equal(fake_published(TOPIC_ALIVE, 1),
                        "{\"proplet_id\":\"dev-1\",\"status\":\"alive\",\"namespace\":\"embedded\","
                        "\"running\":[\"t-6b\"]}");
    /* Once reported the slot is free again, and heartbeats list the task until the manager
     * confirms the result (a start with an attempt is from a manager that does): it may take a
     * heartbeat in before the result. */
    fake.now += 10000;
    proplet_tick(p);
    assert_string_equal(fake_published(TOPIC_ALIVE, 2),
                        "{\"proplet_id\":\"dev-1\",\"status\":\"alive\",\"namespace\":\"embedded\","
                        "\"running\":[\"t-6b\"]}");
    deliver(TOPIC_RESULT_ACK, "{\"task_id\":\"t-6b\",\"proplet_id\":\"dev-1\",\"attempt\":1}");
    fake.now += 10000;
    proplet_tick(p);
    assert_string_equal(fake_published(TOPIC_ALIVE, fake_count(TOPIC_ALIVE) - 1),
                        "{\"proplet_id\":\"dev-1\",\"status\":\"alive\",\"namespace\":\"embedded\"}");
}

static void refuses_when_every_slot_is_busy(void **state)
{
    (void)state;
    start("t-7", "add", "\"1\",\"1\"", "");
    start("t-8", "add", "\"1\",\"1\"", "");
    start("t-9", "add", "\"1\",\"1\"", "");
    assert_string_equal(fake_published(TOPIC_TASK_STATE, 2),
                        "{\"task_id\":\"t-9\",\"proplet_id\":\"dev-1\",\"state\":\"rejected\","
                        "\"attempt\":1,\"reason\":\"all 2 task slots of this proplet are busy\"}");
    /* A broadcast cannot be placed elsewhere: it fails instead. */
    char json[1024];
    snprintf(json, sizeof json, "{\"id\":\"t-10\",\"name\":\"add\",\"file\":\"%s\",\"broadcast\":true}",
             module_b64);
    deliver(TOPIC_START, json);
    expect_contains(fake_published(TOPIC_RESULTS, 0), "all 2 task slots of this proplet are busy");
    while (proplet_run_next(p)) {
    }
}

/* A start naming this proplet with the module inline: `file` (base64), `more` spliced into the JSON. */
static void start_with_file(const char *id, const char *file_b64, const char *more)
{
    static char json[8000];
    snprintf(json, sizeof json,
             "{\"id\":\"%s\",\"name\":\"add\",\"file\":\"%s\",\"inputs\":[\"1\",\"1\"],"
             "\"proplet_id\":\"dev-1\"%s}",
             id, file_b64, more);
    deliver(TOPIC_START, json);
}

/* The preamble of a WebAssembly component (layer 1), base64. */
#define COMPONENT_B64 "AGFzbQ0AAQA="

/* What this proplet can never run (a latent task, a module over its limit, a component) may run on
 * another proplet: this project's manager, which numbers attempts, is told so with task_state
 * `unsupported` and sends the task elsewhere (or fails it, if it is pinned here). Before, the task
 * failed here while another proplet could have run it. */
static void answers_unsupported_for_tasks_it_can_never_run(void **state)
{
    (void)state;
    static char big_b64[7000];
    uint8_t big[5000];
    memset(big, 0, sizeof big);
    b64_encode(big, sizeof big, big_b64);

    start("t-11", "add", "\"1\",\"1\"", ",\"latent\":true");
    start_with_file("t-12", big_b64, ",\"attempt\":1");
    start_with_file("t-13", COMPONENT_B64, ",\"attempt\":1");
    const char *expected[] = {"latent tasks (deploy, then invoke) are not supported",
                              "the module is 5000 bytes but this proplet holds at most 4096",
                              "the module is a WebAssembly component; this proplet runs core modules only"};
    for (size_t i = 0; i < 3; i++) {
        const char *said = fake_published(TOPIC_TASK_STATE, i);
        expect_contains(said, "\"state\":\"unsupported\"");
        expect_contains(said, expected[i]);
        expect_contains(said, "\"attempt\":1");
    }
    assert_int_equal(fake_count(TOPIC_RESULTS), 0);
    assert_int_equal(p->counters.tasks_unsupported, 3);
    assert_int_equal(p->counters.tasks_failed, 0);
    assert_int_equal(proplet_busy_slots(p), 0);
    /* Nothing is remembered as run: the same start again is answered the same way. */
    start_with_file("t-13", COMPONENT_B64, ",\"attempt\":1");
    expect_contains(fake_published(TOPIC_TASK_STATE, 3), "\"state\":\"unsupported\"");

    /* A broken start is the task's fault, not this proplet's: failed wherever it goes. */
    start_with_file("t-14", "AGFz*QEAAAA=", ",\"attempt\":1");
    expect_contains(fake_published(TOPIC_RESULTS, 0), "field 'file' is not valid standard base64");
    /* A component in the older encoding (version 0x0a) is one too, as core.domain.is_component says. */
    start_with_file("t-14b", "AGFzbQoAAQA=", ",\"attempt\":1");
    expect_contains(fake_published(TOPIC_TASK_STATE, 4), "the module is a WebAssembly component");
}

/* Upstream's manager reads no task_state (and numbers no attempts), and a broadcast's answer is
 * this proplet's own: both get a failed result saying why, as before. */
static void fails_for_upstream_and_broadcasts_what_it_can_never_run(void **state)
{
    (void)state;
    start_with_file("t-15", module_b64, ",\"latent\":true");
    expect_contains(fake_published(TOPIC_RESULTS, 0), "latent tasks (deploy, then invoke) are not supported");
    start_with_file("t-16", COMPONENT_B64, "");
    expect_contains(fake_published(TOPIC_RESULTS, 1), "the module is a WebAssembly component");
    start_with_file("t-17", COMPONENT_B64, ",\"attempt\":1,\"broadcast\":true");
    expect_contains(fake_published(TOPIC_RESULTS, 2), "the module is a WebAssembly component");
    assert_int_equal(p->counters.tasks_unsupported, 0);
    assert_int_equal(p->counters.tasks_failed, 3);
    for (size_t i = 0; i < fake_count(TOPIC_TASK_STATE); i++)
        assert_null(strstr(fake_published(TOPIC_TASK_STATE, i), "unsupported"));
    assert_int_equal(proplet_busy_slots(p), 0);
}

static void reports_what_went_wrong_in_the_module(void **state)
{
    (void)state;
    const struct {
        const char *name;
        const char *inputs;
        const char *extra;
        const char *error;
    } cases[] = {
        {"trap", "", "", "the export 'trap' trapped: unreachable"},
        {"burn", "", ",\"limits\":{\"fuel\":500}", "exceeded its fuel budget of 500"},
        {"nope", "", "", "the module has no export named 'nope'"},
        {"add", "\"1\"", "", "the export 'add' takes 2 parameters but the task has 1 inputs"},
        {"add", "\"1\",\"x\"", "", "input 1 ('x') is not an integer, but the parameter is i32"},
        {"vec", "\"1\"", "", "parameter 0 has type v128, which a task input cannot provide"},
        {"add", "\"1\",\"1\"",
         ",\"wasm_digest\":\"sha256:0000000000000000000000000000000000000000000000000000000000000000\"",
         "does not match the task's wasm_digest sha256:0000"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char id[16];
        snprintf(id, sizeof id, "t-e%zu", i);
        start(id, cases[i].name, cases[i].inputs, cases[i].extra);
        assert_true(proplet_run_next(p));
        const char *result = fake_published(TOPIC_RESULTS, i);
        expect_contains(result, cases[i].error);
        expect_contains(result, "\"results\":\"\"");
    }
}

static void passes_the_task_limits_to_the_engine(void **state)
{
    (void)state;
    start("t-14", "half", "\"5\"", ",\"limits\":{\"fuel\":777,\"memory_bytes\":131072}");
    assert_true(proplet_run_next(p));
    expect_contains(fake_published(TOPIC_RESULTS, 0), "\"results\":\"2.5\"");
    assert_int_equal(fake_engine.last_fuel, 777);
    assert_int_equal(fake_engine.last_memory_bytes, 131072);
    /* A task may lower the memory cap, never raise it past the proplet's. */
    start("t-15", "half", "\"5\"", ",\"limits\":{\"memory_bytes\":1073741824}");
    assert_true(proplet_run_next(p));
    assert_int_equal(fake_engine.last_memory_bytes, 1 << 20);
}

static void rejects_a_module_that_does_not_load(void **state)
{
    (void)state;
    uint8_t bad[32];
    size_t len = fake_module("invalid", bad, sizeof bad);
    char b64[64];
    b64_encode(bad, len, b64);
    char json[512];
    snprintf(json, sizeof json, "{\"id\":\"t-16\",\"name\":\"add\",\"file\":\"%s\"}", b64);
    deliver(TOPIC_START, json);
    assert_true(proplet_run_next(p));
    expect_contains(fake_published(TOPIC_RESULTS, 0),
                    "the module is not valid WebAssembly: section out of bounds");
}

static void parses_a_module_once_for_many_tasks(void **state)
{
    (void)state;
    for (int i = 0; i < 5; i++) {
        char id[16];
        snprintf(id, sizeof id, "t-p%d", i);
        start(id, "add", "\"1\",\"2\"", "");
        assert_true(proplet_run_next(p));
    }
    assert_int_equal(fake_engine.loads, 1);
    assert_int_equal(fake_engine.instantiations, 5);
    assert_int_equal(fake_count(TOPIC_RESULTS), 5);
}

static void frees_idle_modules_when_instantiation_runs_out_of_memory(void **state)
{
    (void)state;
    /* Cache a different module first, then make the next instantiation fail once. */
    uint8_t other[32];
    size_t len = fake_module("other", other, sizeof other);
    char b64[64], json[512];
    b64_encode(other, len, b64);
    snprintf(json, sizeof json, "{\"id\":\"t-17\",\"name\":\"add\",\"file\":\"%s\",\"inputs\":[\"1\",\"1\"]}", b64);
    deliver(TOPIC_START, json);
    assert_true(proplet_run_next(p));
    fake_engine.fail_instantiations = 1;
    start("t-18", "add", "\"1\",\"1\"", "");
    assert_true(proplet_run_next(p));
    expect_contains(fake_published(TOPIC_RESULTS, 1), "\"results\":\"2\"");
    assert_int_equal(fake_engine.unloads, 1);

    fake_engine.fail_instantiations = 2;
    start("t-19", "add", "\"1\",\"1\"", "");
    assert_true(proplet_run_next(p));
    expect_contains(fake_published(TOPIC_RESULTS, 2),
                    "not enough memory on this proplet to instantiate the module (allocate memory failed)");
}

static void chunk(const char *app, uint32_t idx, uint32_t total, const uint8_t *data, size_t len,
                  size_t size)
{
    char b64[256], json[512];
    b64_encode(data, len, b64);
    snprintf(json, sizeof json,
             "{\"app_name\":\"%s\",\"chunk_idx\":%u,\"total_chunks\":%u,\"data\":\"%s\",\"size\":%zu}",
             app, (unsigned)idx, (unsigned)total, b64, size);
    deliver(TOPIC_REGISTRY_CHUNK, json);
}

/* A chunk on registry/server/binary: the header line, '\n', the raw bytes (NULs and all). */
static void binary_chunk(const char *app, uint32_t idx, uint32_t total, const uint8_t *data, size_t len,
                         size_t size)
{
    char payload[512], topic[PROPLET_TOPIC_MAX + 1];
    int head = snprintf(payload, sizeof payload,
                        "{\"app_name\":\"%s\",\"chunk_idx\":%u,\"total_chunks\":%u,\"size\":%zu}\n", app,
                        (unsigned)idx, (unsigned)total, size);
    assert_true(head > 0 && (size_t)head + len <= sizeof payload);
    memcpy(payload + head, data, len);
    snprintf(topic, sizeof topic, PREFIX "%s", TOPIC_REGISTRY_CHUNK_BINARY);
    proplet_on_message(p, topic, strlen(topic), payload, (size_t)head + len);
}

static void fetches_a_chunked_module(void **state)
{
    (void)state;
    deliver(TOPIC_START, "{\"id\":\"t-20\",\"name\":\"add\",\"image_url\":\"blob:mod\",\"inputs\":[\"20\",\"22\"],"
                         "\"proplet_id\":\"dev-1\",\"attempt\":1}");
    assert_string_equal(fake_published(TOPIC_REGISTRY_REQUEST, 0),
                        "{\"app_name\":\"blob:mod\",\"proplet_id\":\"dev-1\",\"encoding\":\"binary\"}");
    expect_contains(fake_published(TOPIC_TASK_STATE, 0), "\"state\":\"running\"");
    assert_false(proplet_run_next(p));
    /* Another artifact's chunks are not ours to keep. */
    binary_chunk("blob:other", 0, 1, module_bytes, module_len, module_len);
    assert_false(proplet_run_next(p));
    binary_chunk("blob:mod", 1, 2, module_bytes + 6, module_len - 6, module_len);
    assert_false(proplet_run_next(p));
    /* A server that ignores the encoding answers in JSON (a resume, say): read just the same. */
    chunk("blob:mod", 0, 2, module_bytes, 6, module_len);
    assert_int_equal(fake.wakes, 1);
    assert_true(proplet_run_next(p));
    expect_contains(fake_published(TOPIC_RESULTS, 0), "\"results\":\"42\"");
}

/* A module fetched in chunks shows what it is only as it arrives (the manager did not know it: an
 * OCI reference): one over the limit, or a component, goes back to our manager as `unsupported`. */
static void answers_unsupported_for_a_fetched_module_it_cannot_run(void **state)
{
    (void)state;
    static const uint8_t component[8] = {0x00, 0x61, 0x73, 0x6d, 0x0d, 0x00, 0x01, 0x00};
    deliver(TOPIC_START, "{\"id\":\"t-21\",\"name\":\"run\",\"image_url\":\"reg/app:1\","
                         "\"proplet_id\":\"dev-1\",\"attempt\":2}");
    binary_chunk("reg/app:1", 0, 1, component, sizeof component, sizeof component);
    const char *said = fake_published(TOPIC_TASK_STATE, 1); /* after its "running" */
    expect_contains(said, "\"state\":\"unsupported\"");
    expect_contains(said, "\"attempt\":2");
    expect_contains(said, "the module is a WebAssembly component");

    uint8_t big[5000];
    memset(big, 0, sizeof big);
    deliver(TOPIC_START, "{\"id\":\"t-22\",\"name\":\"add\",\"image_url\":\"reg/big:1\","
                         "\"proplet_id\":\"dev-1\",\"attempt\":1}");
    binary_chunk("reg/big:1", 0, 2, big, 100, sizeof big); /* its announced size is enough */
    said = fake_published(TOPIC_TASK_STATE, 3);
    expect_contains(said, "\"state\":\"unsupported\"");
    expect_contains(said, "is 5000 bytes but this proplet holds at most 4096");

    /* A transfer that went wrong is not this proplet's limit: the task fails. */
    deliver(TOPIC_START, "{\"id\":\"t-23\",\"name\":\"add\",\"image_url\":\"reg/gone:1\","
                         "\"proplet_id\":\"dev-1\",\"attempt\":1}");
    deliver(TOPIC_REGISTRY_CHUNK, "{\"app_name\":\"reg/gone:1\",\"chunk_idx\":0,\"total_chunks\":1,"
                                  "\"data\":\"\",\"error\":\"no such tag\"}");
    expect_contains(fake_published(TOPIC_RESULTS, 0), "no such tag");
    assert_int_equal(fake_count(TOPIC_RESULTS), 1);
    assert_int_equal(p->counters.tasks_unsupported, 2);
    assert_int_equal(proplet_busy_slots(p), 0);
}

/* A module that imports something (WASI, as every wasm32-wasi program does) cannot run on this
 * proplet, which links no host functions: inline or fetched, it goes to a proplet with WASI. */
static void answers_unsupported_for_a_module_with_imports(void **state)
{
    (void)state;
    static const uint8_t wasi[] = {
        0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00,                /* preamble */
        0x01, 0x04, 0x01, 0x60, 0x00, 0x00,                            /* type () -> () */
        0x02, 0x23, 0x01, 0x16, 'w', 'a', 's', 'i', '_', 's', 'n', 'a', 'p', 's', 'h', 'o', 't', '_',
        'p', 'r', 'e', 'v', 'i', 'e', 'w', '1', 0x08, 'f', 'd', '_', 'w', 'r', 'i', 't', 'e', 0x00,
        0x00, /* import wasi_snapshot_preview1.fd_write, a function of type 0 */
    };
    char b64[128];
    b64_encode(wasi, sizeof wasi, b64);
    start_with_file("t-18", b64, ",\"attempt\":1");
    const char *said = fake_published(TOPIC_TASK_STATE, 0);
    expect_contains(said, "\"state\":\"unsupported\"");
    expect_contains(said, "the module imports wasi_snapshot_preview1.fd_write; the embedded proplet provides "
                          "no imports (no WASI)");
    deliver(TOPIC_START, "{\"id\":\"t-19\",\"name\":\"_start\",\"image_url\":\"reg/hello:1\","
                         "\"proplet_id\":\"dev-1\",\"attempt\":1}");
    binary_chunk("reg/hello:1", 0, 1, wasi, sizeof wasi, sizeof wasi);
    said = fake_published(TOPIC_TASK_STATE, 2); /* after its "running" */
    expect_contains(said, "\"state\":\"unsupported\"");
    expect_contains(said, "imports wasi_snapshot_preview1.fd_write");
    assert_int_equal(fake_count(TOPIC_RESULTS), 0);
    /* The modules of the other tests import nothing, and run. */
    start("t-20", "add", "\"1\",\"2\"", "");
    assert_true(proplet_run_next(p));
    expect_contains(fake_published(TOPIC_RESULTS, 0), "\"results\":\"3\"");
}

/* An HTTP URL: the proplet fetches in chunks over MQTT only, which no one answers for a URL (the
 * task failed after the fetch's retries). Our manager is told at once; upstream's gets the reason. */
static void answers_unsupported_for_a_module_at_an_http_url(void **state)
{
    (void)state;
    deliver(TOPIC_START, "{\"id\":\"t-24\",\"name\":\"add\",\"image_url\":\"HTTPS://web.lan/add.wasm\","
                         "\"proplet_id\":\"dev-1\",\"attempt\":1}");
    const char *said = fake_published(TOPIC_TASK_STATE, 0);
    expect_contains(said, "\"state\":\"unsupported\"");
    expect_contains(said, "takes modules in chunks over MQTT only, not from an HTTP URL");
    assert_int_equal(fake_count(TOPIC_REGISTRY_REQUEST), 0);
    deliver(TOPIC_START, "{\"id\":\"t-25\",\"name\":\"add\",\"image_url\":\"http://web.lan/add.wasm\","
                         "\"proplet_id\":\"dev-1\"}");
    expect_contains(fake_published(TOPIC_RESULTS, 0), "not from an HTTP URL");
    /* An OCI reference that merely contains "http" is fetched in chunks as before. */
    deliver(TOPIC_START, "{\"id\":\"t-26\",\"name\":\"add\",\"image_url\":\"reg.lan/httpd:1\","
                         "\"proplet_id\":\"dev-1\",\"attempt\":1}");
    assert_int_equal(fake_count(TOPIC_REGISTRY_REQUEST), 1);
    assert_int_equal(proplet_busy_slots(p), 1);
}

/* The broker drops away while tasks finish: their results are kept and sent on the next connect;
 * more than the proplet can keep push the oldest out, counted and logged. */
static void keeps_results_the_broker_did_not_take_until_it_is_back(void **state)
{
    (void)state;
    proplet_on_connected(p);
    /* Upstream's manager: its starts have no attempt, and it acknowledges nothing. */
    upstream_start("t-30", "add", "\"1\",\"2\"");
    fake.offline = true;
    assert_true(proplet_run_next(p));
    assert_int_equal(fake_count(TOPIC_RESULTS), 0);
    /* Until its result is out, heartbeats still list the task: the manager must not take it for lost. */
    fake.offline = false;
    fake.now += 60000;
    proplet_tick(p);
    expect_contains(fake_published(TOPIC_ALIVE, fake_count(TOPIC_ALIVE) - 1), "\"running\":[\"t-30\"]");
    size_t alive_before = fake_count(TOPIC_ALIVE);
    proplet_on_connected(p);
    /* On a connect the result goes out before the heartbeat, which then no longer lists it. */
    assert_string_equal(fake_published(TOPIC_ALIVE, alive_before),
                        "{\"proplet_id\":\"dev-1\",\"status\":\"alive\",\"namespace\":\"embedded\"}");
    assert_string_equal(fake_published(TOPIC_RESULTS, 0),
                        "{\"task_id\":\"t-30\",\"proplet_id\":\"dev-1\",\"results\":\"3\","
                        "\"error\":null}");
    assert_int_equal(p->counters.results_resent, 1);
    /* Sent once, to a manager that does not acknowledge: once it is no longer recent, a later
     * reconnect has nothing more to send. */
    fake.now += PROPLET_UNCONFIRMED_TTL_MS;
    proplet_on_connected(p);
    assert_int_equal(fake_count(TOPIC_RESULTS), 1);

    fake.offline = true;
    char id[16];
    for (int i = 0; i < PROPLET_RECENT_TASKS + 1; i++) {
        snprintf(id, sizeof id, "t-4%d", i);
        fake.offline = false;
        upstream_start(id, "add", "\"1\",\"1\"");
        fake.offline = true;
        assert_true(proplet_run_next(p));
    }
    assert_int_equal(p->counters.results_dropped, 1);
    fake.offline = false;
    proplet_on_connected(p);
    assert_int_equal(fake_count(TOPIC_RESULTS), 1 + PROPLET_RECENT_TASKS);
    /* Oldest first, the very first one pushed out. */
    expect_contains(fake_published(TOPIC_RESULTS, 1), "\"task_id\":\"t-41\"");
    snprintf(id, sizeof id, "\"task_id\":\"t-4%d\"", PROPLET_RECENT_TASKS);
    expect_contains(fake_published(TOPIC_RESULTS, PROPLET_RECENT_TASKS), id);
}

/* A start with an attempt is from this project's manager, which acknowledges every result: before
 * its first acknowledgement, a result finished while the broker was away is listed in heartbeats and
 * sent again until confirmed. Sent only once on the reconnect, it was lost when the manager had not
 * subscribed again yet on the restarted broker, and the task failed as lost. */
static void a_manager_that_sends_attempts_gets_a_result_again_until_it_confirms(void **state)
{
    (void)state;
    proplet_on_connected(p);
    start("t-35", "add", "\"3\",\"4\"", "");
    fake.offline = true;
    assert_true(proplet_run_next(p));
    fake.offline = false;
    size_t alive_before = fake_count(TOPIC_ALIVE);
    proplet_on_connected(p);
    assert_int_equal(fake_count(TOPIC_RESULTS), 1); /* on the connect */
    expect_contains(fake_published(TOPIC_ALIVE, alive_before), "\"running\":[\"t-35\"]");
    fake.now += PROPLET_RESULT_RESEND_MS;
    proplet_tick(p);
    assert_int_equal(fake_count(TOPIC_RESULTS), 2); /* the timer, as nothing confirmed it */
    deliver(TOPIC_RESULT_ACK, "{\"task_id\":\"t-35\",\"proplet_id\":\"dev-1\",\"attempt\":1}");
    fake.now += PROPLET_RESULT_RESEND_MS;
    proplet_tick(p);
    assert_int_equal(fake_count(TOPIC_RESULTS), 2);
}

/* With a manager that acknowledges (result_ack, ours), a result is sent again until it is. */
static void sends_a_result_again_until_the_manager_acknowledges_it(void **state)
{
    (void)state;
    proplet_on_connected(p);
    expect_contains(fake_published(TOPIC_CREATE, 0), "\"result_ack\"");
    start("t-50", "add", "\"1\",\"1\"", "");
    assert_true(proplet_run_next(p));
    start("t-51", "add", "\"2\",\"2\"", "");
    assert_true(proplet_run_next(p));
    assert_int_equal(fake_count(TOPIC_RESULTS), 2);
    /* Not ours, then malformed: neither counts as an acknowledgement. One for another proplet is
     * not even parsed: malformed, it is not counted as invalid here. */
    deliver(TOPIC_RESULT_ACK, "{\"task_id\":\"t-50\",\"proplet_id\":\"dev-2\",\"attempt\":1}");
    deliver(TOPIC_RESULT_ACK, "{\"task_id\":\"t-50\",\"proplet_id\":\"dev-2\",\"more\":[[1,2]]}");
    deliver(TOPIC_RESULT_ACK, "{\"task_id\":\"t-50\",\"proplet_id\":\"dev-12\",\"more\":[[1,2]]}");
    assert_int_equal(p->counters.messages_invalid, 0);
    deliver(TOPIC_RESULT_ACK, "{\"task_id\":\"t-50\",\"proplet_id\":\"dev-1\",\"more\":[[1,2]]}");
    assert_int_equal(p->counters.messages_invalid, 1);
    /* Those confirmed nothing: both go out again (the starts' attempts say the manager confirms). */
    fake.now += PROPLET_RESULT_RESEND_MS;
    proplet_tick(p);
    assert_int_equal(fake_count(TOPIC_RESULTS), 4);
    deliver(TOPIC_RESULT_ACK, "{\"task_id\":\"t-50\",\"proplet_id\":\"dev-1\",\"attempt\":1}");
    /* t-51 is not confirmed: heartbeats list it, and it goes out again. */
    fake.now += PROPLET_RESULT_RESEND_MS;
    proplet_tick(p);
    assert_int_equal(fake_count(TOPIC_RESULTS), 5);
    expect_contains(fake_published(TOPIC_RESULTS, 4), "\"task_id\":\"t-51\"");
    expect_contains(fake_published(TOPIC_ALIVE, fake_count(TOPIC_ALIVE) - 1), "\"running\":[\"t-51\"]");
    deliver(TOPIC_RESULT_ACK, "{\"task_id\":\"t-0\",\"proplet_id\":\"dev-1\",\"attempt\":1,"
                              "\"more\":[[\"t-51\",1]]}");
    size_t beats = fake_count(TOPIC_ALIVE);
    fake.now += 2 * PROPLET_RESULT_RESEND_MS; /* a heartbeat is due too */
    proplet_tick(p);
    assert_int_equal(fake_count(TOPIC_RESULTS), 5);
    assert_int_equal(fake_count(TOPIC_ALIVE), beats + 1);
    assert_null(strstr(fake_published(TOPIC_ALIVE, beats), "running"));
    proplet_on_connected(p);
    assert_int_equal(fake_count(TOPIC_RESULTS), 5); /* both confirmed: nothing to send again */
}

/* The ports take publishes while disconnected (into a bounded buffer): an unconfirmed result is not
 * sent again on a timer then, only once on the next connect. */
static void does_not_resend_on_a_timer_while_disconnected(void **state)
{
    (void)state;
    proplet_on_connected(p);
    start("t-52", "add", "\"1\",\"1\"", "");
    assert_true(proplet_run_next(p));
    deliver(TOPIC_RESULT_ACK, "{\"task_id\":\"t-0\",\"proplet_id\":\"dev-1\",\"attempt\":1}");
    assert_int_equal(fake_count(TOPIC_RESULTS), 1);
    proplet_on_disconnected(p);
    for (int i = 0; i < 5; i++) {
        fake.now += PROPLET_RESULT_RESEND_MS;
        proplet_tick(p);
    }
    assert_int_equal(fake_count(TOPIC_RESULTS), 1);
    proplet_on_connected(p);
    assert_int_equal(fake_count(TOPIC_RESULTS), 2);
    expect_contains(fake_published(TOPIC_RESULTS, 1), "\"task_id\":\"t-52\"");
    fake.now += PROPLET_RESULT_RESEND_MS;
    proplet_tick(p);
    assert_int_equal(fake_count(TOPIC_RESULTS), 3); /* connected again: the timer resumes */
}

/* A manager that confirmed results before and now lets one wait may know this proplet only from its
 * heartbeats (deleted while online, or a manager on a new database): without the discovery's
 * capabilities it never confirms. A result waiting its resend period makes the proplet announce
 * itself again before sending it, at most once per period. */
static void announces_itself_again_when_a_result_waits_unconfirmed(void **state)
{
    (void)state;
    proplet_on_connected(p);
    assert_int_equal(fake_count(TOPIC_CREATE), 1);
    start("t-53", "add", "\"1\",\"1\"", "");
    assert_true(proplet_run_next(p));
    deliver(TOPIC_RESULT_ACK, "{\"task_id\":\"t-0\",\"proplet_id\":\"dev-1\",\"attempt\":1}");
    proplet_tick(p);
    assert_int_equal(fake_count(TOPIC_CREATE), 1); /* nothing waits long enough yet */
    size_t before = fake.count;
    fake.now += PROPLET_RESULT_RESEND_MS;
    proplet_tick(p);
    assert_int_equal(fake_count(TOPIC_CREATE), 2);
    expect_contains(fake_published(TOPIC_CREATE, 1), "\"capabilities\":[\"task_state\",\"result_ack\"]");
    /* The discovery goes out first, so the manager knows the proplet confirms results. */
    assert_string_equal(fake.messages[before].topic, PREFIX "control/proplet/create");
    assert_string_equal(fake.messages[before + 1].topic, PREFIX "control/proplet/results");
    /* Two results due together bring one discovery; ticks within the period bring none. */
    start("t-54", "add", "\"2\",\"2\"", "");
    assert_true(proplet_run_next(p));
    fake.now += PROPLET_RESULT_RESEND_MS / 2;
    proplet_tick(p);
    assert_int_equal(fake_count(TOPIC_CREATE), 2);
    fake.now += PROPLET_RESULT_RESEND_MS / 2;
    proplet_tick(p);
    assert_int_equal(fake_count(TOPIC_CREATE), 3);
    assert_int_equal(fake_count(TOPIC_RESULTS), 5);
    fake.now += PROPLET_RESULT_RESEND_MS - 1;
    proplet_tick(p);
    assert_int_equal(fake_count(TOPIC_CREATE), 3);
    fake.now += 1;
    proplet_tick(p);
    assert_int_equal(fake_count(TOPIC_CREATE), 4);
    assert_int_equal(fake_count(TOPIC_RESULTS), 7);
    /* Confirmed: nothing waits, so no more discoveries. */
    deliver(TOPIC_RESULT_ACK, "{\"task_id\":\"t-53\",\"proplet_id\":\"dev-1\",\"attempt\":1,"
                              "\"more\":[[\"t-54\",1]]}");
    for (int i = 0; i < 3; i++) {
        fake.now += PROPLET_RESULT_RESEND_MS;
        proplet_tick(p);
    }
    assert_int_equal(fake_count(TOPIC_CREATE), 4);
    assert_int_equal(fake_count(TOPIC_RESULTS), 7);
}

static void announces_itself_again_when_a_manager_asks(void **state)
{
    (void)state;
    proplet_on_connected(p);
    assert_int_equal(fake_count(TOPIC_CREATE), 1);
    /* A manager that started after the connect's discovery asks: answered at once, even so soon. */
    deliver(TOPIC_DISCOVER, "{}");
    assert_int_equal(fake_count(TOPIC_CREATE), 2);
    expect_contains(fake_published(TOPIC_CREATE, 1), "\"capabilities\":[\"task_state\",\"result_ack\"]");
    /* Managers starting together: one answer per PROPLET_DISCOVER_ANSWER_MIN_MS. */
    deliver(TOPIC_DISCOVER, "{}");
    fake.now += PROPLET_DISCOVER_ANSWER_MIN_MS - 1;
    deliver(TOPIC_DISCOVER, "anything: the payload is not read");
    assert_int_equal(fake_count(TOPIC_CREATE), 2);
    fake.now += 1;
    deliver(TOPIC_DISCOVER, "{}");
    assert_int_equal(fake_count(TOPIC_CREATE), 3);
    /* Subscribed on every connect, with the other topics. */
    bool subscribed = false;
    for (size_t i = 0; i < PROPLET_SUBSCRIPTION_COUNT; i++)
        subscribed = subscribed || strcmp(proplet_subscriptions[i], TOPIC_DISCOVER) == 0;
    assert_true(subscribed);
}

static void asks_for_json_chunks_once_binary_ones_never_arrived(void **state)
{
    (void)state;
    deliver(TOPIC_START, "{\"id\":\"t-22\",\"name\":\"add\",\"image_url\":\"blob:acl\",\"inputs\":[\"1\",\"2\"]}");
    expect_contains(fake_published(TOPIC_REGISTRY_REQUEST, 0), "\"encoding\":\"binary\"");
    fake.now += 2000;
    proplet_tick(p);
    /* Nothing came (a broker ACL dropping registry/server/binary): ask again, in JSON. */
    assert_string_equal(fake_published(TOPIC_REGISTRY_REQUEST, 1), "{\"app_name\":\"blob:acl\",\"proplet_id\":\"dev-1\"}");
    chunk("blob:acl", 0, 1, module_bytes, module_len, module_len);
    assert_true(proplet_run_next(p));
    expect_contains(fake_published(TOPIC_RESULTS, 0), "\"results\":\"3\"");
    /* And for a while: the next transfer asks for JSON at once. */
    deliver(TOPIC_START, "{\"id\":\"t-23\",\"name\":\"add\",\"image_url\":\"blob:next\",\"inputs\":[\"1\",\"2\"]}");
    assert_string_equal(fake_published(TOPIC_REGISTRY_REQUEST, 2), "{\"app_name\":\"blob:next\",\"proplet_id\":\"dev-1\"}");
    chunk("blob:next", 0, 1, module_bytes, module_len, module_len);
    assert_true(proplet_run_next(p));
    /* Not for ever: the server may only have been down. Binary again once the time is up. */
    fake.now += PROPLET_JSON_CHUNKS_MS;
    deliver(TOPIC_START, "{\"id\":\"t-24\",\"name\":\"add\",\"image_url\":\"blob:later\",\"inputs\":[\"1\",\"2\"]}");
    expect_contains(fake_published(TOPIC_REGISTRY_REQUEST, 3), "\"encoding\":\"binary\"");
}

static void asks_again_for_missing_chunks_then_gives_up(void **state)
{
    (void)state;
    deliver(TOPIC_START, "{\"id\":\"t-21\",\"name\":\"add\",\"image_url\":\"blob:slow\",\"inputs\":[\"1\",\"1\"]}");
    chunk("blob:slow", 1, 3, module_bytes + 4, 4, 12);
    fake.now += 2000;
    proplet_tick(p);
    assert_string_equal(fake_published(TOPIC_REGISTRY_REQUEST, 1),
                        "{\"app_name\":\"blob:slow\",\"missing\":[0,2],\"proplet_id\":\"dev-1\","
                        "\"encoding\":\"binary\"}");
    fake.now += 2000;
    proplet_tick(p);
    assert_int_equal(fake_count(TOPIC_REGISTRY_REQUEST), 3);
    fake.now += 2000;
    proplet_tick(p);
    expect_contains(fake_published(TOPIC_RESULTS, 0),
                    "timed out waiting for the chunks of blob:slow (1 of 3 arrived after 3 requests)");
    assert_int_equal(proplet_busy_slots(p), 0);
}

static void fails_at_once_when_the_registry_cannot_serve(void **state)
{
    (void)state;
    deliver(TOPIC_START, "{\"id\":\"t-22\",\"name\":\"add\",\"image_url\":\"blob:gone\"}");
    deliver(TOPIC_REGISTRY_CHUNK, "{\"app_name\":\"blob:gone\",\"chunk_idx\":0,\"total_chunks\":1,"
                                  "\"data\":\"\",\"error\":\"no task of this manager has it\"}");
    expect_contains(fake_published(TOPIC_RESULTS, 0),
                    "the registry could not serve blob:gone: no task of this manager has it");
    assert_int_equal(proplet_busy_slots(p), 0);
}

static void stops_a_waiting_task_at_once(void **state)
{
    (void)state;
    deliver(TOPIC_START, "{\"id\":\"t-23\",\"name\":\"add\",\"image_url\":\"blob:x\"}");
    deliver(TOPIC_STOP, "{\"id\":\"t-23\",\"proplet_id\":\"dev-2\"}");
    assert_int_equal(proplet_busy_slots(p), 1);
    deliver(TOPIC_STOP, "{\"id\":\"t-23\",\"proplet_id\":\"dev-1\"}");
    assert_int_equal(proplet_busy_slots(p), 0);
    assert_string_equal(fake_published(TOPIC_RESULTS, 0),
                        "{\"task_id\":\"t-23\",\"proplet_id\":\"dev-1\",\"results\":\"\","
                        "\"error\":\"stopped by request\"}");
}

static void stop_during_the_call(void)
{
    deliver(TOPIC_STOP, "{\"id\":\"t-24\",\"broadcast\":false,\"proplet_id\":\"dev-1\"}");
}

static void interrupts_a_running_task_on_stop(void **state)
{
    (void)state;
    start("t-24", "block", "", "");
    fake_engine.during_call = stop_during_the_call;
    assert_true(proplet_run_next(p));
    expect_contains(fake_published(TOPIC_RESULTS, 0), "\"error\":\"stopped by request\"");
}

static void time_passes_during_the_call(void)
{
    fake.now += 2500;
    proplet_tick(p);
}

static void interrupts_a_task_past_its_time_limit(void **state)
{
    (void)state;
    start("t-25", "block", "", ",\"limits\":{\"timeout_s\":2}");
    fake_engine.during_call = time_passes_during_the_call;
    assert_true(proplet_run_next(p));
    expect_contains(fake_published(TOPIC_RESULTS, 0),
                    "exceeded its time limit of 2 s; raise limits.timeout_s");
}

static void announces_itself_and_heartbeats(void **state)
{
    (void)state;
    proplet_tick(p); /* nothing before the first announcement */
    assert_int_equal(fake.count, 0);
    proplet_on_connected(p);
    const char *discovery = fake_published(TOPIC_CREATE, 0);
    expect_contains(discovery, "\"proplet_id\":\"dev-1\",\"namespace\":\"embedded\"");
    expect_contains(discovery, "\"max_concurrent_tasks\":2");
    expect_contains(discovery, "\"heartbeat_interval\":10");
    expect_contains(discovery, "\"capabilities\":[\"task_state\",\"result_ack\"]");
    expect_contains(discovery, "\"wasm_runtime\":\"fake\"");
    expect_contains(discovery, "\"ip\":\"192.0.2.7\"");
    assert_string_equal(fake_published(TOPIC_ALIVE, 0),
                        "{\"proplet_id\":\"dev-1\",\"status\":\"alive\",\"namespace\":\"embedded\"}");
    start("t-26", "add", "\"1\",\"1\"", "");
    proplet_tick(p); /* not due yet */
    assert_int_equal(fake_count(TOPIC_ALIVE), 1);
    fake.now += 10000;
    proplet_tick(p);
    assert_string_equal(fake_published(TOPIC_ALIVE, 1),
                        "{\"proplet_id\":\"dev-1\",\"status\":\"alive\",\"namespace\":\"embedded\","
                        "\"running\":[\"t-26\"]}");
    expect_contains(fake_published(TOPIC_METRICS, 0), "\"heap_free_bytes\":120000");
    while (proplet_run_next(p)) {
    }
    char topic[PROPLET_TOPIC_MAX + 1], payload[200];
    size_t len;
    assert_true(proplet_last_will(p, topic, sizeof topic, payload, sizeof payload, &len));
    assert_string_equal(topic, PREFIX "control/proplet/alive");
    assert_string_equal(payload, "{\"proplet_id\":\"dev-1\",\"status\":\"offline\",\"namespace\":\"embedded\"}");
}

static void refuses_an_oversized_start_by_name(void **state)
{
    (void)state;
    const char *head = "{\"id\":\"t-27\",\"name\":\"add\",\"file\":\"AAAA";
    const char *tail = "AAAA\",\"proplet_id\":\"dev-1\",\"attempt\":3}";
    char topic[] = PREFIX "control/manager/start";
    proplet_on_oversized_message(p, topic, strlen(topic), head, strlen(head), tail, strlen(tail),
                                 900000);
    expect_contains(fake_published(TOPIC_RESULTS, 0), "\"task_id\":\"t-27\"");
    expect_contains(fake_published(TOPIC_RESULTS, 0), "set the manager's inline_limit lower");
    expect_contains(fake_published(TOPIC_RESULTS, 0), "\"attempt\":3");
    /* Someone else's oversized start is only counted. */
    const char *other = "AAAA\",\"proplet_id\":\"dev-2\"}";
    proplet_on_oversized_message(p, topic, strlen(topic), head, strlen(head), other, strlen(other),
                                 900000);
    assert_int_equal(fake_count(TOPIC_RESULTS), 1);
    assert_int_equal(p->counters.messages_oversized, 2);
}

static void refuses_a_bad_configuration(void **state)
{
    (void)state;
    proplet_t other;
    proplet_config_t cfg = {.proplet_id = "x", .domain = "d", .channel = "c", .slots = 0};
    proplet_port_t port = fake_port_make();
    char err[100];
    assert_false(proplet_init(&other, &cfg, &port, err, sizeof err));
    assert_string_equal(err, "the pool size must be between 1 and 8, got 0");
    cfg.slots = 1;
    cfg.proplet_id[0] = '\0';
    assert_false(proplet_init(&other, &cfg, &port, err, sizeof err));
}

#define TEST(name) cmocka_unit_test_setup_teardown(name, setup, teardown)

int main(void)
{
    const struct CMUnitTest tests[] = {
        TEST(runs_an_inline_task_and_reports_it),
        TEST(ignores_tasks_for_other_proplets_and_takes_broadcasts),
        TEST(answers_an_invalid_start_with_a_failed_result),
        TEST(runs_each_attempt_once),
        TEST(holds_the_slot_until_the_result_is_out),
        TEST(refuses_when_every_slot_is_busy),
        TEST(answers_unsupported_for_tasks_it_can_never_run),
        TEST(fails_for_upstream_and_broadcasts_what_it_can_never_run),
        TEST(answers_unsupported_for_a_module_with_imports),
        TEST(reports_what_went_wrong_in_the_module),
        TEST(passes_the_task_limits_to_the_engine),
        TEST(rejects_a_module_that_does_not_load),
        TEST(parses_a_module_once_for_many_tasks),
        TEST(frees_idle_modules_when_instantiation_runs_out_of_memory),
        TEST(fetches_a_chunked_module),
        TEST(answers_unsupported_for_a_fetched_module_it_cannot_run),
        TEST(answers_unsupported_for_a_module_at_an_http_url),
        TEST(keeps_results_the_broker_did_not_take_until_it_is_back),
        TEST(a_manager_that_sends_attempts_gets_a_result_again_until_it_confirms),
        TEST(sends_a_result_again_until_the_manager_acknowledges_it),
        TEST(does_not_resend_on_a_timer_while_disconnected),
        TEST(announces_itself_again_when_a_result_waits_unconfirmed),
        TEST(announces_itself_again_when_a_manager_asks),
        TEST(asks_for_json_chunks_once_binary_ones_never_arrived),
        TEST(asks_again_for_missing_chunks_then_gives_up),
        TEST(fails_at_once_when_the_registry_cannot_serve),
        TEST(stops_a_waiting_task_at_once),
        TEST(interrupts_a_running_task_on_stop),
        TEST(interrupts_a_task_past_its_time_limit),
        TEST(announces_itself_and_heartbeats),
        TEST(refuses_an_oversized_start_by_name),
        TEST(refuses_a_bad_configuration),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

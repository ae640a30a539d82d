/* Module signatures: `wasm_signature` as decoded, trusted keys as configured, and a proplet with
 * keys running only what one of them signed. The keys and signatures are real ones, made here with
 * libsodium as the manager makes them with core/signing.py (Ed25519 over the digest's text). */
#include <sodium.h>

#include "testing.h"

#include "../src/core/signature.h"

#define PREFIX TEST_PREFIX

static uint8_t trusted_pk[crypto_sign_PUBLICKEYBYTES], trusted_sk[crypto_sign_SECRETKEYBYTES];
static uint8_t other_pk[crypto_sign_PUBLICKEYBYTES], other_sk[crypto_sign_SECRETKEYBYTES];

static proplet_t proplet;
static proplet_t *const p = &proplet;
static uint8_t module_bytes[64];
static size_t module_len;
static char module_b64[128];
static char module_digest[DIGEST_TEXT_SIZE];

static const uint8_t spki_prefix[12] = {0x30, 0x2a, 0x30, 0x05, 0x06, 0x03,
                                        0x2b, 0x65, 0x70, 0x03, 0x21, 0x00};

/* What core.signing.sign_digest sends: base64 of the signature of the digest's text. */
static void sign_text(const char *text, const uint8_t *secret_key, char out[SIGNATURE_B64_LEN + 1])
{
    uint8_t sig[crypto_sign_BYTES];
    crypto_sign_detached(sig, NULL, (const uint8_t *)text, strlen(text), secret_key);
    b64_encode(sig, sizeof sig, out);
}

/* The body line of the key's PEM file (SubjectPublicKeyInfo DER, base64). */
static void spki_b64(const uint8_t *public_key, char out[64])
{
    uint8_t der[sizeof spki_prefix + crypto_sign_PUBLICKEYBYTES];
    memcpy(der, spki_prefix, sizeof spki_prefix);
    memcpy(der + sizeof spki_prefix, public_key, crypto_sign_PUBLICKEYBYTES);
    b64_encode(der, sizeof der, out);
}

static int make_keys(void **state)
{
    (void)state;
    assert_true(sodium_init() >= 0);
    crypto_sign_keypair(trusted_pk, trusted_sk);
    crypto_sign_keypair(other_pk, other_sk);
    return 0;
}

static void init_proplet(bool with_key)
{
    fake_engine_reset();
    fake_port_reset();
    proplet_config_t cfg = test_config();
    if (with_key)
        assert_true(trusted_keys_add(&cfg.trusted_keys, trusted_pk));
    proplet_port_t port = fake_port_make();
    char err[100];
    assert_true(proplet_init(p, &cfg, &port, err, sizeof err));
    module_len = fake_module("add", module_bytes, sizeof module_bytes);
    b64_encode(module_bytes, module_len, module_b64);
    uint8_t digest[SHA256_BYTES];
    sha256(module_bytes, module_len, digest);
    digest_format(digest, module_digest);
}

static int trusting(void **state)
{
    (void)state;
    init_proplet(true);
    return 0;
}

static int trusting_nothing(void **state)
{
    (void)state;
    init_proplet(false);
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    proplet_destroy(p);
    assert_int_equal(fake_engine.live_instances, 0);
    return 0;
}

static void deliver(const char *suffix, const char *payload)
{
    test_deliver(p, suffix, payload);
}

/* A start of the fake module's "add" with 2 and 40; digest and signature left out when NULL. */
static void start(const char *id, const char *digest, const char *signature)
{
    char extra[512] = "";
    if (digest != NULL)
        snprintf(extra + strlen(extra), sizeof extra - strlen(extra), ",\"wasm_digest\":\"%s\"", digest);
    if (signature != NULL)
        snprintf(extra + strlen(extra), sizeof extra - strlen(extra), ",\"wasm_signature\":\"%s\"",
                 signature);
    char json[2048];
    snprintf(json, sizeof json,
             "{\"id\":\"%s\",\"name\":\"add\",\"state\":2,\"file\":\"%s\",\"inputs\":[\"2\",\"40\"],"
             "\"proplet_id\":\"dev-1\",\"attempt\":1%s}",
             id, module_b64, extra);
    deliver(TOPIC_START, json);
}

static void expect_failed_result(size_t n, const char *id, const char *error)
{
    char expected[PROPLET_MSG_MAX];
    snprintf(expected, sizeof expected,
             "{\"task_id\":\"%s\",\"proplet_id\":\"dev-1\",\"results\":\"\",\"error\":\"%s\","
             "\"attempt\":1}",
             id, error);
    assert_string_equal(fake_published(TOPIC_RESULTS, n), expected);
}

/* ---- wasm_signature as the decoder reads it */

static void decodes_the_managers_signature(void **state)
{
    (void)state;
    char signature[SIGNATURE_B64_LEN + 1];
    sign_text(module_digest, trusted_sk, signature);
    char json[1024];
    snprintf(json, sizeof json,
             "{\"id\":\"t-1\",\"name\":\"add\",\"file\":\"QQ==\",\"wasm_digest\":\"%s\","
             "\"wasm_signature\":\"%s\"}",
             module_digest, signature);
    start_msg_t m;
    protocol_error_t err;
    assert_true(protocol_parse_start(json, strlen(json), &m, &err));
    assert_true(m.has_signature);
    uint8_t raw[crypto_sign_BYTES];
    crypto_sign_detached(raw, NULL, (const uint8_t *)module_digest, strlen(module_digest), trusted_sk);
    assert_memory_equal(m.wasm_signature, raw, sizeof raw);
    protocol_start_release(&m);
    /* Absent, null and "" all mean unsigned, as core.protocol reads them. */
    const char *unsigned_starts[] = {
        "{\"id\":\"t-1\",\"name\":\"add\",\"file\":\"QQ==\"}",
        "{\"id\":\"t-1\",\"name\":\"add\",\"file\":\"QQ==\",\"wasm_signature\":null}",
        "{\"id\":\"t-1\",\"name\":\"add\",\"file\":\"QQ==\",\"wasm_signature\":\"\"}",
    };
    for (size_t i = 0; i < sizeof unsigned_starts / sizeof unsigned_starts[0]; i++) {
        assert_true(protocol_parse_start(unsigned_starts[i], strlen(unsigned_starts[i]), &m, &err));
        assert_false(m.has_signature);
        protocol_start_release(&m);
    }
}

static void refuses_a_malformed_signature_naming_the_field(void **state)
{
    (void)state;
    uint8_t bytes[70];
    memset(bytes, 0x5a, sizeof bytes);
    char short_sig[128], long_sig[128], unpadded[128], stars[SIGNATURE_B64_LEN + 1];
    b64_encode(bytes, 63, short_sig); /* 84 characters */
    b64_encode(bytes, 65, long_sig);  /* 88 characters, like a real one */
    b64_encode(bytes, 66, unpadded);  /* 88 characters, no padding */
    memset(stars, '*', SIGNATURE_B64_LEN);
    stars[SIGNATURE_B64_LEN] = '\0';
    static char huge[4000];
    memset(huge, 'A', sizeof huge - 1);
    huge[sizeof huge - 1] = '\0';
    const char *values[] = {"!!!", stars, short_sig, long_sig, unpadded, huge};
    for (size_t i = 0; i < sizeof values / sizeof values[0]; i++) {
        static char json[8192];
        snprintf(json, sizeof json,
                 "{\"id\":\"t-1\",\"name\":\"add\",\"file\":\"QQ==\",\"wasm_signature\":\"%s\"}",
                 values[i]);
        start_msg_t m;
        protocol_error_t err;
        assert_false(protocol_parse_start(json, strlen(json), &m, &err));
        assert_string_equal(err.reason, "field 'wasm_signature' must be the standard base64 of a "
                                        "64-byte Ed25519 signature");
        assert_true(err.has_id);
    }
    const char *typed = "{\"id\":\"t-1\",\"name\":\"add\",\"file\":\"QQ==\",\"wasm_signature\":7}";
    start_msg_t m;
    protocol_error_t err;
    assert_false(protocol_parse_start(typed, strlen(typed), &m, &err));
    assert_string_equal(err.reason, "field 'wasm_signature' must be a string, got int");
}

/* ---- trusted keys as configured */

static void reads_keys_as_raw_bytes_pem_bodies_and_pem_files(void **state)
{
    (void)state;
    char raw[64], body[80];
    b64_encode(trusted_pk, sizeof trusted_pk, raw);
    spki_b64(trusted_pk, body);
    assert_int_equal(strlen(raw), 44);
    assert_int_equal(strlen(body), 60);
    /* The PEM body is the DER prefix's base64 followed by the raw key's. */
    assert_string_equal(body + 16, raw);
    uint8_t key[ED25519_PUBLIC_KEY_BYTES];
    assert_true(trusted_key_parse(raw, strlen(raw), key));
    assert_memory_equal(key, trusted_pk, sizeof key);
    memset(key, 0, sizeof key);
    assert_true(trusted_key_parse(body, strlen(body), key));
    assert_memory_equal(key, trusted_pk, sizeof key);

    char pem[256];
    snprintf(pem, sizeof pem, "-----BEGIN PUBLIC KEY-----\r\n%s\r\n-----END PUBLIC KEY-----\r\n", body);
    memset(key, 0, sizeof key);
    assert_true(trusted_key_parse_pem(pem, strlen(pem), key));
    assert_memory_equal(key, trusted_pk, sizeof key);

    /* A private key, another algorithm's key (X25519, OID 1.3.101.110), or a cut one: refused. */
    snprintf(pem, sizeof pem, "-----BEGIN PRIVATE KEY-----\n%s\n-----END PRIVATE KEY-----\n", body);
    assert_false(trusted_key_parse_pem(pem, strlen(pem), key));
    uint8_t x25519[44];
    memcpy(x25519, spki_prefix, sizeof spki_prefix);
    x25519[8] = 0x6e;
    memcpy(x25519 + sizeof spki_prefix, trusted_pk, sizeof trusted_pk);
    char x25519_body[80];
    b64_encode(x25519, sizeof x25519, x25519_body);
    assert_false(trusted_key_parse(x25519_body, strlen(x25519_body), key));
    snprintf(pem, sizeof pem, "-----BEGIN PUBLIC KEY-----\n%s\n-----END PUBLIC KEY-----\n", x25519_body);
    assert_false(trusted_key_parse_pem(pem, strlen(pem), key));
    snprintf(pem, sizeof pem, "-----BEGIN PUBLIC KEY-----\n%.40s\n-----END PUBLIC KEY-----\n", body);
    assert_false(trusted_key_parse_pem(pem, strlen(pem), key));
    snprintf(pem, sizeof pem, "-----BEGIN PUBLIC KEY-----\n%s%s\n-----END PUBLIC KEY-----\n", body, body);
    assert_false(trusted_key_parse_pem(pem, strlen(pem), key));
    assert_false(trusted_key_parse_pem("", 0, key));
    assert_false(trusted_key_parse(raw, 43, key));
    assert_false(trusted_key_parse("not a key at all, certainly not one at all!!", 44, key));
}

static void reads_the_trusted_keys_setting(void **state)
{
    (void)state;
    char raw[64], other_body[80], setting[512];
    b64_encode(trusted_pk, sizeof trusted_pk, raw);
    spki_b64(other_pk, other_body);
    trusted_keys_t keys;
    char err[200] = "";
    snprintf(setting, sizeof setting, " %s , %s,%s", raw, other_body, raw);
    assert_true(trusted_keys_parse(setting, &keys, err, sizeof err));
    assert_int_equal(keys.count, 2); /* the repeated key counts once */
    assert_memory_equal(keys.keys[0], trusted_pk, sizeof trusted_pk);
    assert_memory_equal(keys.keys[1], other_pk, sizeof other_pk);
    assert_true(trusted_keys_parse("", &keys, err, sizeof err));
    assert_int_equal(keys.count, 0);

    snprintf(setting, sizeof setting, "%s,%.43s", raw, raw);
    assert_false(trusted_keys_parse(setting, &keys, err, sizeof err));
    assert_string_equal(err, "trusted key 2 is not an Ed25519 public key: give the base64 of its 32 "
                             "bytes, or the body line of its PEM file");
    assert_int_equal(keys.count, 0);

    setting[0] = '\0';
    for (int i = 0; i <= PROPLET_TRUSTED_KEYS_MAX; i++) {
        uint8_t key[ED25519_PUBLIC_KEY_BYTES];
        memset(key, i + 1, sizeof key);
        char text[64];
        b64_encode(key, sizeof key, text);
        snprintf(setting + strlen(setting), sizeof setting - strlen(setting), "%s%s", i ? "," : "", text);
    }
    assert_false(trusted_keys_parse(setting, &keys, err, sizeof err));
    assert_string_equal(err, "too many trusted keys: this proplet holds at most 4");
}

static void refuses_too_many_keys_in_the_configuration(void **state)
{
    (void)state;
    proplet_t other;
    proplet_config_t cfg = {.proplet_id = "x", .domain = "d", .channel = "c", .slots = 1};
    cfg.trusted_keys.count = PROPLET_TRUSTED_KEYS_MAX + 1;
    proplet_port_t port = fake_port_make();
    char err[100];
    assert_false(proplet_init(&other, &cfg, &port, err, sizeof err));
    assert_string_equal(err, "too many trusted keys: this proplet holds at most 4");
}

/* ---- the proplet */

static void runs_a_module_signed_by_a_trusted_key(void **state)
{
    (void)state;
    char signature[SIGNATURE_B64_LEN + 1];
    sign_text(module_digest, trusted_sk, signature);
    start("t-ok", module_digest, signature);
    expect_contains(fake_published(TOPIC_TASK_STATE, 0), "\"state\":\"running\"");
    assert_true(proplet_run_next(p));
    assert_string_equal(fake_published(TOPIC_RESULTS, 0),
                        "{\"task_id\":\"t-ok\",\"proplet_id\":\"dev-1\",\"results\":\"42\","
                        "\"error\":null,\"attempt\":1}");
}

static void refuses_what_no_trusted_key_signed_before_running_it(void **state)
{
    (void)state;
    char by_other[SIGNATURE_B64_LEN + 1], of_other_digest[SIGNATURE_B64_LEN + 1];
    sign_text(module_digest, other_sk, by_other);
    const char *zeros = "sha256:0000000000000000000000000000000000000000000000000000000000000000";
    sign_text(zeros, trusted_sk, of_other_digest);
    char tampered[DIGEST_TEXT_SIZE];
    memcpy(tampered, module_digest, sizeof tampered);
    tampered[7] = tampered[7] == 'a' ? 'b' : 'a';
    char good[SIGNATURE_B64_LEN + 1];
    sign_text(module_digest, trusted_sk, good);

    char not_trusted[PROPLET_ERROR_TEXT_MAX + 1], tampered_error[PROPLET_ERROR_TEXT_MAX + 1];
    char unsigned_error[PROPLET_ERROR_TEXT_MAX + 1];
    const char *trust_hint = " is not from a key this proplet trusts; check its trusted keys "
                             "(PROPLET_TRUSTED_KEYS, or trusted_keys on a device) against the "
                             "manager's MANAGER_SIGNING_KEY";
    snprintf(not_trusted, sizeof not_trusted, "the signature of module %s%s", module_digest, trust_hint);
    snprintf(tampered_error, sizeof tampered_error, "the signature of module %s%s", tampered, trust_hint);
    snprintf(unsigned_error, sizeof unsigned_error,
             "the module %s is not signed, and this proplet only runs signed modules; configure "
             "MANAGER_SIGNING_KEY on the manager",
             module_digest);
    const struct {
        const char *id;
        const char *digest;
        const char *signature;
        const char *error;
    } cases[] = {
        {"t-other-key", module_digest, by_other, not_trusted},
        {"t-other-digest", module_digest, of_other_digest, not_trusted},
        {"t-tampered", tampered, good, tampered_error},
        {"t-unsigned", module_digest, NULL, unsigned_error},
        {"t-no-digest", NULL, good,
         "the start names no module digest, so its signature cannot be checked; create the task "
         "with its digest (propeller tasks create --digest sha256:<hex>, or wasm_digest in the REST "
         "body or a job file), or with the module inline"},
        {"t-garbled", module_digest, "c2lnbmF0dXJl",
         "the start message is invalid: field 'wasm_signature' must be the standard base64 of a "
         "64-byte Ed25519 signature"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        start(cases[i].id, cases[i].digest, cases[i].signature);
        expect_failed_result(i, cases[i].id, cases[i].error);
    }
    /* Nothing was confirmed, loaded or run, and no slot is held. */
    assert_int_equal(fake_count(TOPIC_TASK_STATE), 0);
    assert_false(proplet_run_next(p));
    assert_int_equal(fake_engine.loads, 0);
    assert_int_equal(proplet_busy_slots(p), 0);
    assert_int_equal(p->counters.tasks_failed, 5); /* the garbled one counts as an invalid message */
}

static void checks_the_signature_before_asking_for_chunks(void **state)
{
    (void)state;
    char by_other[SIGNATURE_B64_LEN + 1], good[SIGNATURE_B64_LEN + 1];
    sign_text(module_digest, other_sk, by_other);
    sign_text(module_digest, trusted_sk, good);
    const char *signatures[] = {by_other, good};
    for (size_t i = 0; i < 2; i++) {
        char json[1024];
        snprintf(json, sizeof json,
                 "{\"id\":\"t-chunked-%zu\",\"name\":\"add\",\"image_url\":\"blob:%s\",\"inputs\":"
                 "[\"2\",\"40\"],\"wasm_digest\":\"%s\",\"wasm_signature\":\"%s\"}",
                 i, module_digest, module_digest, signatures[i]);
        deliver(TOPIC_START, json);
    }
    /* The foreign-signed one failed at once; only the trusted one asked for its module. */
    expect_contains(fake_published(TOPIC_RESULTS, 0), "\"task_id\":\"t-chunked-0\"");
    expect_contains(fake_published(TOPIC_RESULTS, 0), "is not from a key this proplet trusts");
    assert_int_equal(fake_count(TOPIC_REGISTRY_REQUEST), 1);
    assert_int_equal(proplet_busy_slots(p), 1);
}

static void a_signed_digest_still_needs_the_bytes_to_match(void **state)
{
    (void)state;
    /* Another module's digest, properly signed: the start passes, the bytes do not. */
    uint8_t other_module[64];
    size_t other_len = fake_module("other", other_module, sizeof other_module);
    uint8_t digest[SHA256_BYTES];
    sha256(other_module, other_len, digest);
    char other_digest[DIGEST_TEXT_SIZE], signature[SIGNATURE_B64_LEN + 1];
    digest_format(digest, other_digest);
    sign_text(other_digest, trusted_sk, signature);
    start("t-swapped", other_digest, signature);
    assert_true(proplet_run_next(p));
    expect_contains(fake_published(TOPIC_RESULTS, 0), "does not match the task's wasm_digest");
    assert_int_equal(fake_engine.loads, 0);
}

static void a_copy_of_a_held_start_does_not_fail_the_task(void **state)
{
    (void)state;
    char signature[SIGNATURE_B64_LEN + 1];
    sign_text(module_digest, trusted_sk, signature);
    start("t-held", module_digest, signature);
    /* A copy without its signature (a proxy that drops the field, say) confirms, never fails. */
    start("t-held", module_digest, NULL);
    assert_int_equal(fake_count(TOPIC_TASK_STATE), 2);
    assert_int_equal(fake_count(TOPIC_RESULTS), 0);
    assert_true(proplet_run_next(p));
    expect_contains(fake_published(TOPIC_RESULTS, 0), "\"results\":\"42\"");
    assert_int_equal(fake_count(TOPIC_RESULTS), 1);
}

static void without_trusted_keys_nothing_is_checked(void **state)
{
    (void)state;
    char by_other[SIGNATURE_B64_LEN + 1];
    sign_text(module_digest, other_sk, by_other);
    start("t-plain", NULL, NULL);
    start("t-foreign", module_digest, by_other);
    assert_true(proplet_run_next(p));
    assert_true(proplet_run_next(p));
    expect_contains(fake_published(TOPIC_RESULTS, 0), "\"results\":\"42\"");
    expect_contains(fake_published(TOPIC_RESULTS, 1), "\"results\":\"42\"");
}

#define TRUSTING(name) cmocka_unit_test_setup_teardown(name, trusting, teardown)

int main(void)
{
    const struct CMUnitTest tests[] = {
        TRUSTING(decodes_the_managers_signature),
        cmocka_unit_test(refuses_a_malformed_signature_naming_the_field),
        cmocka_unit_test(reads_keys_as_raw_bytes_pem_bodies_and_pem_files),
        cmocka_unit_test(reads_the_trusted_keys_setting),
        cmocka_unit_test(refuses_too_many_keys_in_the_configuration),
        TRUSTING(runs_a_module_signed_by_a_trusted_key),
        TRUSTING(refuses_what_no_trusted_key_signed_before_running_it),
        TRUSTING(checks_the_signature_before_asking_for_chunks),
        TRUSTING(a_signed_digest_still_needs_the_bytes_to_match),
        TRUSTING(a_copy_of_a_held_start_does_not_fail_the_task),
        cmocka_unit_test_setup_teardown(without_trusted_keys_nothing_is_checked, trusting_nothing,
                                        teardown),
    };
    return cmocka_run_group_tests(tests, make_keys, NULL);
}

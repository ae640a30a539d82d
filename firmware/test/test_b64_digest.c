/* Strict base64 decoding, and sha256 with its wire form. */
#include "testing.h"

#include "../src/core/b64.h"
#include "../src/core/digest.h"

static void decodes_standard_base64_with_padding(void **state)
{
    (void)state;
    uint8_t out[16];
    size_t len;
    assert_true(b64_decode("", 0, out, sizeof out, &len));
    assert_int_equal(len, 0);
    assert_true(b64_decode("QQ==", 4, out, sizeof out, &len));
    assert_int_equal(len, 1);
    assert_int_equal(out[0], 'A');
    assert_true(b64_decode("AGFzbQEAAAA=", 12, out, sizeof out, &len));
    assert_int_equal(len, 8);
    assert_memory_equal(out, "\0asm\1\0\0\0", 8);
    assert_true(b64_decoded_len("+/+/", 4, &len));
    assert_int_equal(len, 3);
}

static void refuses_anything_not_strict_base64(void **state)
{
    (void)state;
    uint8_t out[16];
    size_t len;
    const char *bad[] = {"QQ", "QQ=", "Q===", "QQ=A", "QQ-_", "QQ ==", "=QQQ", "QQ\n=="};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        assert_false(b64_decode(bad[i], strlen(bad[i]), out, sizeof out, &len));
    /* Valid, but the output buffer is too small. */
    assert_false(b64_decode("QUJD", 4, out, 2, &len));
}

static void sha256_matches_the_fips_vectors(void **state)
{
    (void)state;
    uint8_t d[SHA256_BYTES];
    char text[DIGEST_TEXT_SIZE];
    sha256("", 0, d);
    digest_format(d, text);
    assert_string_equal(text, "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    sha256("abc", 3, d);
    digest_format(d, text);
    assert_string_equal(text, "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    const char *two_blocks = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
    sha256(two_blocks, strlen(two_blocks), d);
    digest_format(d, text);
    assert_string_equal(text, "sha256:248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
    static uint8_t million[1000000];
    memset(million, 'a', sizeof million);
    sha256(million, sizeof million, d);
    digest_format(d, text);
    assert_string_equal(text, "sha256:cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
}

static void parses_only_lowercase_sha256_digests(void **state)
{
    (void)state;
    uint8_t d[SHA256_BYTES], again[SHA256_BYTES];
    char text[DIGEST_TEXT_SIZE];
    sha256("abc", 3, d);
    digest_format(d, text);
    assert_true(digest_parse(text, again));
    assert_memory_equal(d, again, SHA256_BYTES);
    assert_false(digest_parse("sha256:BA7816BF8F01CFEA414140DE5DAE2223B00361A396177A9CB410FF61F20015AD", again));
    assert_false(digest_parse("sha512:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad", again));
    assert_false(digest_parse("sha256:ba78", again));
    assert_false(digest_parse("", again));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(decodes_standard_base64_with_padding),
        cmocka_unit_test(refuses_anything_not_strict_base64),
        cmocka_unit_test(sha256_matches_the_fips_vectors),
        cmocka_unit_test(parses_only_lowercase_sha256_digests),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

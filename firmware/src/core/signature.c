#include "signature.h"

#include <stdio.h>
#include <string.h>

#include "b64.h"
#include "digest.h"

/* DER of an Ed25519 SubjectPublicKeyInfo up to the key (RFC 8410): SEQUENCE, AlgorithmIdentifier
 * with OID 1.3.101.112, BIT STRING of 33 bytes (no unused bits), then the 32 bytes of the key.
 * Twelve bytes are exactly sixteen base64 characters, so the PEM body is this prefix's base64
 * followed by the base64 of the raw key. */
static const uint8_t spki_prefix[12] = {0x30, 0x2a, 0x30, 0x05, 0x06, 0x03,
                                        0x2b, 0x65, 0x70, 0x03, 0x21, 0x00};
#define SPKI_BYTES (sizeof spki_prefix + ED25519_PUBLIC_KEY_BYTES)
#define RAW_KEY_B64_LEN 44
#define SPKI_B64_LEN 60

bool trusted_key_parse(const char *text, size_t len, uint8_t out[ED25519_PUBLIC_KEY_BYTES])
{
    uint8_t der[SPKI_BYTES];
    size_t decoded = 0;
    if (len == RAW_KEY_B64_LEN) {
        if (!b64_decode(text, len, der, sizeof der, &decoded) || decoded != ED25519_PUBLIC_KEY_BYTES)
            return false;
        memcpy(out, der, ED25519_PUBLIC_KEY_BYTES);
        return true;
    }
    if (len != SPKI_B64_LEN || !b64_decode(text, len, der, sizeof der, &decoded)
        || decoded != SPKI_BYTES || memcmp(der, spki_prefix, sizeof spki_prefix) != 0)
        return false;
    memcpy(out, der + sizeof spki_prefix, ED25519_PUBLIC_KEY_BYTES);
    return true;
}

static const char *find(const char *text, size_t len, const char *needle)
{
    size_t n = strlen(needle);
    for (size_t i = 0; i + n <= len; i++)
        if (memcmp(text + i, needle, n) == 0)
            return text + i;
    return NULL;
}

bool trusted_key_parse_pem(const char *pem, size_t len, uint8_t out[ED25519_PUBLIC_KEY_BYTES])
{
    static const char begin[] = "-----BEGIN PUBLIC KEY-----";
    static const char end[] = "-----END PUBLIC KEY-----";
    const char *body = find(pem, len, begin);
    if (body == NULL)
        return false;
    body += sizeof begin - 1;
    const char *stop = find(body, len - (size_t)(body - pem), end);
    if (stop == NULL)
        return false;
    /* The body without its line breaks; longer than an Ed25519 key's: some other key. */
    char b64[SPKI_B64_LEN + 1];
    size_t n = 0;
    for (const char *c = body; c < stop; c++) {
        if (*c == '\n' || *c == '\r' || *c == ' ' || *c == '\t')
            continue;
        if (n == SPKI_B64_LEN)
            return false;
        b64[n++] = *c;
    }
    return n == SPKI_B64_LEN && trusted_key_parse(b64, n, out);
}

bool trusted_keys_add(trusted_keys_t *keys, const uint8_t key[ED25519_PUBLIC_KEY_BYTES])
{
    for (size_t i = 0; i < keys->count; i++)
        if (memcmp(keys->keys[i], key, ED25519_PUBLIC_KEY_BYTES) == 0)
            return true;
    if (keys->count >= PROPLET_TRUSTED_KEYS_MAX)
        return false;
    memcpy(keys->keys[keys->count++], key, ED25519_PUBLIC_KEY_BYTES);
    return true;
}

bool trusted_keys_parse(const char *text, trusted_keys_t *out, char *err, size_t err_len)
{
    memset(out, 0, sizeof *out);
    size_t position = 0;
    const char *c = text;
    while (*c != '\0') {
        while (*c == ' ' || *c == ',')
            c++;
        if (*c == '\0')
            break;
        const char *start = c;
        while (*c != '\0' && *c != ',' && *c != ' ')
            c++;
        position++;
        uint8_t key[ED25519_PUBLIC_KEY_BYTES];
        if (!trusted_key_parse(start, (size_t)(c - start), key)) {
            snprintf(err, err_len,
                     "trusted key %zu is not an Ed25519 public key: give the base64 of its 32 bytes, "
                     "or the body line of its PEM file",
                     position);
            memset(out, 0, sizeof *out);
            return false;
        }
        if (!trusted_keys_add(out, key)) {
            snprintf(err, err_len, "too many trusted keys: this proplet holds at most %d",
                     PROPLET_TRUSTED_KEYS_MAX);
            memset(out, 0, sizeof *out);
            return false;
        }
    }
    return true;
}

bool signature_check_start(const trusted_keys_t *keys, const start_msg_t *m, char *err,
                           size_t err_len)
{
    if (keys->count == 0)
        return true;
    if (!m->has_digest) {
        snprintf(err, err_len,
                 "the start names no module digest, so its signature cannot be checked; create the "
                 "task with its digest (propeller tasks create --digest sha256:<hex>, or wasm_digest "
                 "in the REST body or a job file), or with the module inline");
        return false;
    }
    char digest[DIGEST_TEXT_SIZE];
    digest_format(m->wasm_digest, digest);
    if (!m->has_signature) {
        snprintf(err, err_len,
                 "the module %s is not signed, and this proplet only runs signed modules; configure "
                 "MANAGER_SIGNING_KEY on the manager",
                 digest);
        return false;
    }
    /* The manager signs the digest's text exactly as it sends it (digest_parse only takes the
     * lowercase form, so formatting it again gives the same bytes). */
    for (size_t i = 0; i < keys->count; i++)
        if (ed25519_verify(keys->keys[i], (const uint8_t *)digest, strlen(digest),
                           m->wasm_signature))
            return true;
    snprintf(err, err_len,
             "the signature of module %s is not from a key this proplet trusts; check its trusted "
             "keys (PROPLET_TRUSTED_KEYS, or trusted_keys on a device) against the manager's "
             "MANAGER_SIGNING_KEY",
             digest);
    return false;
}

/* Ed25519 signatures over module digests, as core/signing.py makes and the Python proplet checks.
 *
 * The manager signs the text of the module's digest ("sha256:<64 hex>", 71 bytes) and sends the
 * signature as standard base64 in the start's `wasm_signature`. A proplet holding trusted public
 * keys refuses any start whose digest is missing, unsigned or signed by another key, before it
 * fetches or runs anything; the bytes it then gets must have that digest (proplet.c checks them).
 * Without trusted keys nothing is checked.
 *
 * The verification itself is one port function, like sha256() in digest.h, so the core holds no
 * cryptography of its own.
 */
#ifndef PROPLET_SIGNATURE_H
#define PROPLET_SIGNATURE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "limits.h"
#include "protocol.h"

/* ED25519_PUBLIC_KEY_BYTES and ED25519_SIGNATURE_BYTES come from protocol.h. */

/* Implemented by the port (lib/ed25519_sodium.c: libsodium, on the host and on the device).
 * ed25519_init prepares the library (sodium_init) and may be called more than once. */
bool ed25519_init(void);
bool ed25519_verify(const uint8_t pub[ED25519_PUBLIC_KEY_BYTES], const uint8_t *msg, size_t len,
                    const uint8_t sig[ED25519_SIGNATURE_BYTES]);

typedef struct {
    uint8_t keys[PROPLET_TRUSTED_KEYS_MAX][ED25519_PUBLIC_KEY_BYTES];
    size_t count;
} trusted_keys_t;

/* One key as text: standard base64 of its 32 raw bytes (44 characters), or of the 44-byte DER
 * SubjectPublicKeyInfo (60 characters: the body line of the PEM file `propeller keys generate`
 * writes). False for anything else, including keys of other algorithms. */
bool trusted_key_parse(const char *text, size_t len, uint8_t out[ED25519_PUBLIC_KEY_BYTES]);

/* A PEM file's text ("-----BEGIN PUBLIC KEY-----", the base64 body, "-----END PUBLIC KEY-----").
 * False when it is not an Ed25519 public key. */
bool trusted_key_parse_pem(const char *pem, size_t len, uint8_t out[ED25519_PUBLIC_KEY_BYTES]);

/* Add a key; false (nothing added) when PROPLET_TRUSTED_KEYS_MAX are held already. A key held
 * already is not added twice. */
bool trusted_keys_add(trusted_keys_t *keys, const uint8_t key[ED25519_PUBLIC_KEY_BYTES]);

/* The `trusted_keys` setting: keys as trusted_key_parse reads them, separated by commas (spaces
 * around them are ignored); "" is no keys. False with the reason in err. */
bool trusted_keys_parse(const char *text, trusted_keys_t *out, char *err, size_t err_len);

/* Whether a start may go on under these keys (always, when there are none). When not, err says
 * why in core/signing.py's words. */
bool signature_check_start(const trusted_keys_t *keys, const start_msg_t *m, char *err,
                           size_t err_len);

#endif

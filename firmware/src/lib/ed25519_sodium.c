/* Ed25519 verification through libsodium, on both builds: Debian's libsodium-dev on the host,
 * the espressif/libsodium component (src/idf_component.yml) on the device. */
#include <sodium.h>

#include "../core/signature.h"

/* The core's sizes are libsodium's. */
typedef char public_key_size_matches[crypto_sign_PUBLICKEYBYTES == ED25519_PUBLIC_KEY_BYTES ? 1 : -1];
typedef char signature_size_matches[crypto_sign_BYTES == ED25519_SIGNATURE_BYTES ? 1 : -1];

bool ed25519_init(void)
{
    /* 0 the first time, 1 when already done, -1 when the library cannot be used. */
    return sodium_init() >= 0;
}

bool ed25519_verify(const uint8_t pub[ED25519_PUBLIC_KEY_BYTES], const uint8_t *msg, size_t len,
                    const uint8_t sig[ED25519_SIGNATURE_BYTES])
{
    return crypto_sign_verify_detached(sig, msg, len, pub) == 0;
}

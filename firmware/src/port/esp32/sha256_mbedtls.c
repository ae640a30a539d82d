/* sha256 on the device: mbedtls, which ESP-IDF backs with the SHA accelerator. */
#include "mbedtls/sha256.h"

#include "../../core/digest.h"

void sha256(const void *data, size_t len, uint8_t out[SHA256_BYTES])
{
    mbedtls_sha256((const unsigned char *)data, len, out, 0);
}

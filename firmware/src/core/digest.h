/* sha256 behind one function, so the device uses mbedtls (hardware accelerated) and the host
 * its own small implementation, plus the "sha256:<64 hex>" text form used on the wire.
 */
#ifndef PROPLET_DIGEST_H
#define PROPLET_DIGEST_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define SHA256_BYTES 32
/* "sha256:" + 64 hex digits + terminator */
#define DIGEST_TEXT_SIZE 72

/* Implemented by the port (port/esp32/sha256_mbedtls.c, lib/sha256.c on the host). */
void sha256(const void *data, size_t len, uint8_t out[SHA256_BYTES]);

void digest_format(const uint8_t digest[SHA256_BYTES], char out[DIGEST_TEXT_SIZE]);

/* Strict parse of "sha256:" followed by 64 lowercase hex digits (what the manager sends). */
bool digest_parse(const char *text, uint8_t out[SHA256_BYTES]);

#endif

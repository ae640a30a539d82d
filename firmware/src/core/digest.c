#include "digest.h"

#include <string.h>

static const char hex_digits[] = "0123456789abcdef";

void digest_format(const uint8_t digest[SHA256_BYTES], char out[DIGEST_TEXT_SIZE])
{
    memcpy(out, "sha256:", 7);
    for (size_t i = 0; i < SHA256_BYTES; i++) {
        out[7 + 2 * i] = hex_digits[digest[i] >> 4];
        out[8 + 2 * i] = hex_digits[digest[i] & 0x0f];
    }
    out[7 + 2 * SHA256_BYTES] = '\0';
}

static int hex_value(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    return -1;
}

bool digest_parse(const char *text, uint8_t out[SHA256_BYTES])
{
    if (strncmp(text, "sha256:", 7) != 0 || strlen(text) != 7 + 2 * SHA256_BYTES)
        return false;
    for (size_t i = 0; i < SHA256_BYTES; i++) {
        int hi = hex_value(text[7 + 2 * i]);
        int lo = hex_value(text[8 + 2 * i]);
        if (hi < 0 || lo < 0)
            return false;
        out[i] = (uint8_t)(hi << 4 | lo);
    }
    return true;
}

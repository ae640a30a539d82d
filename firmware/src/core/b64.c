#include "b64.h"

static int sextet(unsigned char c)
{
    if (c >= 'A' && c <= 'Z')
        return c - 'A';
    if (c >= 'a' && c <= 'z')
        return c - 'a' + 26;
    if (c >= '0' && c <= '9')
        return c - '0' + 52;
    if (c == '+')
        return 62;
    if (c == '/')
        return 63;
    return -1;
}

bool b64_decoded_len(const char *text, size_t text_len, size_t *out_len)
{
    if (text_len % 4 != 0)
        return false;
    size_t padding = 0;
    if (text_len > 0 && text[text_len - 1] == '=')
        padding++;
    if (text_len > 1 && text[text_len - 2] == '=')
        padding++;
    for (size_t i = 0; i < text_len - padding; i++)
        if (sextet((unsigned char)text[i]) < 0)
            return false;
    *out_len = text_len / 4 * 3 - padding;
    return true;
}

bool b64_decode(const char *text, size_t text_len, uint8_t *out, size_t out_cap, size_t *out_len)
{
    size_t expected;
    if (!b64_decoded_len(text, text_len, &expected) || expected > out_cap)
        return false;
    size_t n = 0;
    for (size_t i = 0; i < text_len; i += 4) {
        int a = sextet((unsigned char)text[i]);
        int b = sextet((unsigned char)text[i + 1]);
        /* Padding positions decode as zero; b64_decoded_len already checked where '=' may be. */
        int c = text[i + 2] == '=' ? 0 : sextet((unsigned char)text[i + 2]);
        int d = text[i + 3] == '=' ? 0 : sextet((unsigned char)text[i + 3]);
        if (a < 0 || b < 0 || c < 0 || d < 0)
            return false;
        uint32_t group = ((uint32_t)a << 18) | ((uint32_t)b << 12) | ((uint32_t)c << 6) | (uint32_t)d;
        const uint8_t bytes[3] = {(uint8_t)(group >> 16), (uint8_t)(group >> 8), (uint8_t)group};
        for (int k = 0; k < 3 && n < expected; k++)
            out[n++] = bytes[k];
    }
    *out_len = n;
    return true;
}

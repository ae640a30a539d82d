/* Standard base64 with padding (RFC 4648 section 4), decoding only: what arrives in `file` and
 * in chunk `data`. Strict like Python's b64decode(validate=True): the length is a multiple of
 * four, only the alphabet is allowed, and '=' appears only as one or two final characters.
 */
#ifndef PROPLET_B64_H
#define PROPLET_B64_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Decoded length of valid input, or false when the text is not valid base64. */
bool b64_decoded_len(const char *text, size_t text_len, size_t *out_len);

/* Decode into out (at least b64_decoded_len bytes). False on invalid input or a short buffer. */
bool b64_decode(const char *text, size_t text_len, uint8_t *out, size_t out_cap, size_t *out_len);

#endif

/* Reassembly of a module sent in chunks on registry/server, into one bounded buffer.
 *
 * Chunks may arrive in any order and more than once (QoS 1, resumed transfers, another
 * proplet's request for the same artifact). The buffer is allocated once, at the first chunk:
 * the announced `size` when the sender gives it (our manager does), else max_bytes. A chunk's
 * place follows from its index: every chunk but the last has the same length.
 */
#ifndef PROPLET_ASSEMBLER_H
#define PROPLET_ASSEMBLER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "digest.h"
#include "limits.h"
#include "protocol.h"

typedef enum {
    ASSEMBLY_WAITING,  /* more chunks needed */
    ASSEMBLY_COMPLETE, /* assembler_take() gives the module */
    ASSEMBLY_FAILED    /* assembler_error() says why; the transfer cannot finish */
} assembly_state_t;

typedef struct {
    char app_name[PROPLET_APP_NAME_MAX + 1];
    size_t max_bytes;
    assembly_state_t state;
    uint8_t *buf;
    size_t cap;
    uint32_t total;    /* 0 until the first chunk */
    uint64_t size;     /* announced size, 0 when not sent */
    size_t chunk_len;  /* length of every chunk but the last, 0 until known */
    size_t last_len;   /* length of the last chunk, 0 until it arrived */
    bool last_stashed; /* the last chunk waits at the end of buf until chunk_len is known */
    uint32_t received_count;
    uint8_t received[(PROPLET_MAX_CHUNKS + 7) / 8];
    bool has_digest;
    uint8_t digest[SHA256_BYTES];
    size_t length; /* module length once complete */
    /* Failed because the module is more than this proplet can hold (its size, its number of
     * chunks, or the memory for it), not because the transfer went wrong: a proplet with more
     * room may run it. */
    bool too_large;
    char error[PROPLET_ERROR_TEXT_MAX + 1];
} assembler_t;

void assembler_begin(assembler_t *a, const char *app_name, size_t max_bytes);

/* Add one chunk already known to be for a->app_name. Duplicates are ignored. */
assembly_state_t assembler_add(assembler_t *a, const chunk_msg_t *chunk);

/* Indexes still missing, lowest first, at most max of them (all when nothing arrived yet: 0). */
size_t assembler_missing(const assembler_t *a, uint32_t *out, size_t max);

/* The complete module; the caller owns (and frees) it afterwards. */
uint8_t *assembler_take(assembler_t *a, size_t *len);

const char *assembler_error(const assembler_t *a);

/* Free whatever is held and forget the transfer. */
void assembler_reset(assembler_t *a);

#endif

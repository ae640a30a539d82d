#include "assembler.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "b64.h"

void assembler_begin(assembler_t *a, const char *app_name, size_t max_bytes)
{
    memset(a, 0, sizeof *a);
    snprintf(a->app_name, sizeof a->app_name, "%s", app_name);
    a->max_bytes = max_bytes;
    a->state = ASSEMBLY_WAITING;
}

void assembler_reset(assembler_t *a)
{
    free(a->buf);
    memset(a, 0, sizeof *a);
}

const char *assembler_error(const assembler_t *a)
{
    return a->error;
}

static assembly_state_t fail(assembler_t *a, const char *fmt, ...)
{
    va_list args;
    va_start(args, fmt);
    vsnprintf(a->error, sizeof a->error, fmt, args);
    va_end(args);
    free(a->buf);
    a->buf = NULL;
    a->state = ASSEMBLY_FAILED;
    return a->state;
}

#define fail_too_large(a, ...) ((a)->too_large = true, fail((a), __VA_ARGS__))

static bool is_received(const assembler_t *a, uint32_t idx)
{
    return (a->received[idx / 8] >> (idx % 8)) & 1u;
}

/* The first chunk fixes the transfer's shape and allocates the buffer. */
static assembly_state_t start_transfer(assembler_t *a, const chunk_msg_t *c)
{
    if (c->total_chunks > PROPLET_MAX_CHUNKS)
        return fail_too_large(a,
                    "%s is split into %u chunks; this proplet accepts at most %d (raise the "
                    "manager's chunk_size)",
                    a->app_name, (unsigned)c->total_chunks, PROPLET_MAX_CHUNKS);
    if (c->size > a->max_bytes)
        return fail_too_large(a,
                    "the module %s is %llu bytes but this proplet holds at most %zu; use a "
                    "smaller module or run the task on a proplet with more memory",
                    a->app_name, (unsigned long long)c->size, a->max_bytes);
    a->total = c->total_chunks;
    a->size = c->size;
    a->cap = c->size > 0 ? (size_t)c->size : a->max_bytes;
    a->buf = malloc(a->cap > 0 ? a->cap : 1);
    if (a->buf == NULL)
        return fail_too_large(a, "out of memory: cannot hold the %zu-byte module %s", a->cap,
                              a->app_name);
    return ASSEMBLY_WAITING;
}

/* Where chunk idx of data_len bytes goes, or fails the transfer when the chunks disagree. */
static bool place(assembler_t *a, uint32_t idx, size_t data_len, size_t *offset)
{
    const uint64_t others = (uint64_t)a->total - 1;
    if (data_len == 0 && a->total > 1) {
        fail(a, "chunk %u of %s is empty", (unsigned)idx, a->app_name);
        return false;
    }
    if (a->total == 1) {
        *offset = 0;
    } else if (idx < a->total - 1) {
        if (a->chunk_len == 0) {
            a->chunk_len = data_len;
            uint64_t before_last = others * data_len;
            bool fits = a->size > 0 ? before_last < a->size && a->size <= before_last + data_len
                                    : before_last < a->cap;
            if (!fits) {
                if (a->size == 0) /* no size announced: the module is longer than the buffer */
                    fail_too_large(a, "the chunks of %s add up to more than this proplet's "
                                      "%zu-byte module limit", a->app_name, a->cap);
                else
                    fail(a, "the chunks of %s do not add up to their announced size",
                         a->app_name);
                return false;
            }
            if (a->last_stashed) {
                uint64_t final = before_last;
                if (a->last_len > data_len) {
                    fail(a, "the last chunk of %s does not fit the others", a->app_name);
                    return false;
                }
                if (final + a->last_len > a->cap) {
                    fail_too_large(a, "the chunks of %s do not fit this proplet's %zu-byte module "
                                      "limit", a->app_name, a->cap);
                    return false;
                }
                memmove(a->buf + final, a->buf + a->cap - a->last_len, a->last_len);
                a->last_stashed = false;
            }
        } else if (data_len != a->chunk_len) {
            fail(a, "chunk %u of %s has %zu bytes where the others have %zu", (unsigned)idx,
                 a->app_name, data_len, a->chunk_len);
            return false;
        }
        *offset = (size_t)idx * a->chunk_len;
    } else {
        a->last_len = data_len;
        if (a->chunk_len > 0) {
            if (data_len > a->chunk_len) {
                fail(a, "the last chunk of %s is longer than the others", a->app_name);
                return false;
            }
            *offset = (size_t)(others * a->chunk_len);
        } else if (a->size > 0) {
            if (data_len > a->size || (a->size - data_len) % others != 0
                || (a->size - data_len) / others < data_len) {
                fail(a, "the last chunk of %s does not match its announced size", a->app_name);
                return false;
            }
            a->chunk_len = (size_t)((a->size - data_len) / others);
            *offset = (size_t)(a->size - data_len);
        } else {
            /* Its place depends on the other chunks' length: keep it at the end for now. */
            if (data_len > a->cap) {
                fail_too_large(a, "chunk %u of %s is larger than this proplet's %zu-byte module "
                                  "limit", (unsigned)idx, a->app_name, a->cap);
                return false;
            }
            a->last_stashed = true;
            *offset = a->cap - data_len;
        }
    }
    if (*offset > a->cap || data_len > a->cap - *offset) {
        fail_too_large(a, "chunk %u of %s does not fit this proplet's %zu-byte module limit",
                       (unsigned)idx, a->app_name, a->cap);
        return false;
    }
    return true;
}

assembly_state_t assembler_add(assembler_t *a, const chunk_msg_t *c)
{
    if (a->state != ASSEMBLY_WAITING)
        return a->state;
    if (c->error[0] != '\0')
        return fail(a, "the registry could not serve %s: %s", a->app_name, c->error);
    if (a->total == 0 && start_transfer(a, c) != ASSEMBLY_WAITING)
        return a->state;
    if (c->total_chunks != a->total)
        return fail(a, "the chunks of %s disagree on total_chunks (%u, then %u)", a->app_name,
                    (unsigned)a->total, (unsigned)c->total_chunks);
    if (c->size != a->size)
        return fail(a, "the chunks of %s disagree on the module size", a->app_name);
    if (c->has_digest) {
        if (a->has_digest && memcmp(a->digest, c->digest, SHA256_BYTES) != 0)
            return fail(a, "the chunks of %s disagree on the module digest", a->app_name);
        memcpy(a->digest, c->digest, SHA256_BYTES);
        a->has_digest = true;
    }
    if (is_received(a, c->chunk_idx))
        return a->state;

    size_t data_len = c->data_raw_len;
    if (!c->binary
        && !b64_decoded_len(c->data_b64 != NULL ? c->data_b64 : "", c->data_b64_len, &data_len))
        return fail(a, "chunk %u of %s is not valid standard base64", (unsigned)c->chunk_idx,
                    a->app_name);
    size_t offset;
    if (!place(a, c->chunk_idx, data_len, &offset))
        return a->state;
    size_t written;
    if (c->binary) {
        if (data_len > 0)
            memcpy(a->buf + offset, c->data_raw, data_len);
    } else if (data_len > 0
               && !b64_decode(c->data_b64, c->data_b64_len, a->buf + offset, a->cap - offset,
                              &written)) {
        return fail(a, "chunk %u of %s could not be decoded", (unsigned)c->chunk_idx, a->app_name);
    }

    a->received[c->chunk_idx / 8] |= (uint8_t)(1u << (c->chunk_idx % 8));
    a->received_count++;
    if (a->received_count < a->total)
        return a->state;

    a->length = a->total == 1 ? data_len : (size_t)(a->total - 1) * a->chunk_len + a->last_len;
    if (a->size > 0 && a->length != a->size)
        return fail(a, "%s arrived with %zu bytes but was announced with %llu", a->app_name,
                    a->length, (unsigned long long)a->size);
    a->state = ASSEMBLY_COMPLETE;
    return a->state;
}

size_t assembler_missing(const assembler_t *a, uint32_t *out, size_t max)
{
    size_t n = 0;
    for (uint32_t idx = 0; idx < a->total && n < max; idx++)
        if (!is_received(a, idx))
            out[n++] = idx;
    return n;
}

uint8_t *assembler_take(assembler_t *a, size_t *len)
{
    if (a->state != ASSEMBLY_COMPLETE)
        return NULL;
    uint8_t *module = a->buf;
    *len = a->length;
    a->buf = NULL;
    return module;
}

#include "wasmval.h"

#include "limits.h"

#include <ctype.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Room for Python's repr() of an input: every byte may become a 4-byte escape. */
#define PROPLET_REPR_MAX (PROPLET_INPUT_TEXT_MAX * 4 + 3)
/* Longest float literal converted; start messages bound inputs well below it. */
#define PROPLET_NUMBER_TEXT_MAX 128

const char *wasm_type_name(wasm_type_t type)
{
    switch (type) {
    case WASM_TYPE_I32: return "i32";
    case WASM_TYPE_I64: return "i64";
    case WASM_TYPE_F32: return "f32";
    case WASM_TYPE_F64: return "f64";
    case WASM_TYPE_V128: return "v128";
    case WASM_TYPE_FUNCREF: return "funcref";
    case WASM_TYPE_EXTERNREF: return "externref";
    case WASM_TYPE_OTHER: break;
    }
    return "an unsupported type";
}

/* A non-printable Unicode character Python's repr() escapes (C1 controls, separators, format
 * characters), decoded from the UTF-8 at p; 0 for anything shown as is. *extra is the number of
 * continuation bytes. */
static uint32_t unicode_hidden(const unsigned char *p, size_t *extra)
{
    uint32_t cp;
    size_t more;
    if (p[0] >= 0xc2 && p[0] <= 0xdf && (p[1] & 0xc0) == 0x80) {
        cp = (uint32_t)(p[0] & 0x1f) << 6 | (p[1] & 0x3f);
        more = 1;
    } else if (p[0] >= 0xe0 && p[0] <= 0xef && (p[1] & 0xc0) == 0x80 && (p[2] & 0xc0) == 0x80) {
        cp = (uint32_t)(p[0] & 0x0f) << 12 | (uint32_t)(p[1] & 0x3f) << 6 | (p[2] & 0x3f);
        more = 2;
    } else {
        return 0;
    }
    bool hidden = (cp >= 0x80 && cp <= 0xa0) || cp == 0xad || cp == 0x1680
                  || (cp >= 0x2000 && cp <= 0x200f) || (cp >= 0x2028 && cp <= 0x202f)
                  || (cp >= 0x205f && cp <= 0x2064) || cp == 0x3000 || cp == 0xfeff;
    if (!hidden)
        return 0;
    *extra = more;
    return cp;
}

void wasm_py_repr(const char *text, char *out, size_t out_len)
{
    if (out_len == 0)
        return;
    /* Python prefers single quotes and switches to double quotes only to avoid escaping. */
    char quote = (strchr(text, '\'') != NULL && strchr(text, '"') == NULL) ? '"' : '\'';
    size_t n = 0;
    /* Leave room for the closing quote and the terminator. */
    size_t room = out_len - 1;
#define PUT(c)                    \
    do {                          \
        if (n + 1 < room)         \
            out[n++] = (char)(c); \
    } while (0)
    PUT(quote);
    for (const unsigned char *p = (const unsigned char *)text; *p; p++) {
        char esc[8];
        const char *seq = NULL;
        size_t extra = 0;
        uint32_t cp = unicode_hidden(p, &extra);
        if (cp != 0) {
            snprintf(esc, sizeof esc, cp < 0x100 ? "\\x%02x" : "\\u%04x", (unsigned)cp);
            seq = esc;
        }
        if (*p == '\\')
            seq = "\\\\";
        else if (*p == (unsigned char)quote)
            seq = quote == '\'' ? "\\'" : "\\\"";
        else if (*p == '\t')
            seq = "\\t";
        else if (*p == '\n')
            seq = "\\n";
        else if (*p == '\r')
            seq = "\\r";
        else if (*p < 0x20 || *p == 0x7f) {
            snprintf(esc, sizeof esc, "\\x%02x", *p);
            seq = esc;
        }
        if (seq == NULL) {
            PUT(*p);
            continue;
        }
        size_t len = strlen(seq);
        if (n + len + 1 >= room)
            break;
        memcpy(out + n, seq, len);
        n += len;
        p += extra;
    }
#undef PUT
    out[n++] = quote;
    out[n] = '\0';
}

/* UTF-8 encodings of the non-ASCII characters Python's str.strip() removes. */
static const char *const unicode_spaces[] = {
    "\xc2\x85", "\xc2\xa0", "\xe1\x9a\x80", "\xe2\x80\x80", "\xe2\x80\x81", "\xe2\x80\x82",
    "\xe2\x80\x83", "\xe2\x80\x84", "\xe2\x80\x85", "\xe2\x80\x86", "\xe2\x80\x87",
    "\xe2\x80\x88", "\xe2\x80\x89", "\xe2\x80\x8a", "\xe2\x80\xa8", "\xe2\x80\xa9",
    "\xe2\x80\xaf", "\xe2\x81\x9f", "\xe3\x80\x80",
};

/* Length of the whitespace character Python's str.strip() removes at s[0..n), 0 if none. */
static size_t space_at(const char *s, size_t n, bool at_end)
{
    unsigned char c = (unsigned char)(at_end ? s[n - 1] : s[0]);
    if (c == ' ' || (c >= '\t' && c <= '\r') || (c >= 0x1c && c <= 0x1f))
        return 1;
    for (size_t i = 0; i < sizeof unicode_spaces / sizeof unicode_spaces[0]; i++) {
        size_t len = strlen(unicode_spaces[i]);
        if (len <= n && memcmp(at_end ? s + n - len : s, unicode_spaces[i], len) == 0)
            return len;
    }
    return 0;
}

static void strip(const char *text, const char **start, size_t *len)
{
    const char *s = text;
    size_t n = strlen(s), k;
    while (n > 0 && (k = space_at(s, n, false)) > 0) {
        s += k;
        n -= k;
    }
    while (n > 0 && (k = space_at(s, n, true)) > 0)
        n -= k;
    *start = s;
    *len = n;
}

/* ^[+-]?[0-9]+$ */
static bool is_int_literal(const char *s, size_t n)
{
    size_t i = 0;
    if (i < n && (s[i] == '+' || s[i] == '-'))
        i++;
    if (i == n)
        return false;
    for (; i < n; i++)
        if (s[i] < '0' || s[i] > '9')
            return false;
    return true;
}

/* ^[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?$ */
static bool is_float_literal(const char *s, size_t n)
{
    size_t i = 0, digits = 0;
    if (i < n && (s[i] == '+' || s[i] == '-'))
        i++;
    while (i < n && s[i] >= '0' && s[i] <= '9') {
        i++;
        digits++;
    }
    if (i < n && s[i] == '.') {
        i++;
        while (i < n && s[i] >= '0' && s[i] <= '9') {
            i++;
            digits++;
        }
    }
    if (digits == 0)
        return false;
    if (i < n && (s[i] == 'e' || s[i] == 'E')) {
        i++;
        if (i < n && (s[i] == '+' || s[i] == '-'))
            i++;
        size_t exp_digits = 0;
        while (i < n && s[i] >= '0' && s[i] <= '9') {
            i++;
            exp_digits++;
        }
        if (exp_digits == 0)
            return false;
    }
    return i == n;
}

static bool equals_ignore_case(const char *s, size_t n, const char *word)
{
    size_t w = strlen(word);
    if (w != n)
        return false;
    for (size_t i = 0; i < n; i++)
        if (tolower((unsigned char)s[i]) != word[i])
            return false;
    return true;
}

static bool fail(char *err, size_t err_len, const char *text, size_t index, const char *what,
                 wasm_type_t type)
{
    char repr[PROPLET_REPR_MAX];
    wasm_py_repr(text, repr, sizeof repr);
    if (strcmp(what, "fit") == 0)
        snprintf(err, err_len, "input %zu (%s) does not fit in %s", index, repr,
                 wasm_type_name(type));
    else
        snprintf(err, err_len, "input %zu (%s) is not %s, but the parameter is %s", index, repr,
                 what, wasm_type_name(type));
    return false;
}

static bool parse_int(const char *text, const char *s, size_t n, wasm_type_t type, size_t index,
                      wasm_value_t *out, char *err, size_t err_len)
{
    if (!is_int_literal(s, n))
        return fail(err, err_len, text, index, "an integer", type);
    bool negative = s[0] == '-';
    size_t i = (s[0] == '+' || s[0] == '-') ? 1 : 0;
    uint64_t magnitude = 0;
    for (; i < n; i++) {
        uint64_t digit = (uint64_t)(s[i] - '0');
        if (magnitude > (UINT64_MAX - digit) / 10)
            return fail(err, err_len, text, index, "fit", type);
        magnitude = magnitude * 10 + digit;
    }
    /* The accepted range is [-2^(bits-1), 2^bits - 1]; the upper half wraps to negative. */
    if (type == WASM_TYPE_I32) {
        if (negative ? magnitude > 0x80000000u : magnitude > 0xffffffffu)
            return fail(err, err_len, text, index, "fit", type);
        uint32_t bits = negative ? (uint32_t)(0u - (uint32_t)magnitude) : (uint32_t)magnitude;
        out->type = type;
        memcpy(&out->of.i32, &bits, sizeof bits);
    } else {
        if (negative && magnitude > 0x8000000000000000u)
            return fail(err, err_len, text, index, "fit", type);
        uint64_t bits = negative ? (uint64_t)0 - magnitude : magnitude;
        out->type = type;
        memcpy(&out->of.i64, &bits, sizeof bits);
    }
    return true;
}

static bool parse_float(const char *text, const char *s, size_t n, wasm_type_t type,
                        size_t index, wasm_value_t *out, char *err, size_t err_len)
{
    double value;
    if (equals_ignore_case(s, n, "inf") || equals_ignore_case(s, n, "+inf")
        || equals_ignore_case(s, n, "infinity") || equals_ignore_case(s, n, "+infinity")) {
        value = INFINITY;
    } else if (equals_ignore_case(s, n, "-inf") || equals_ignore_case(s, n, "-infinity")) {
        value = -INFINITY;
    } else if (equals_ignore_case(s, n, "nan") || equals_ignore_case(s, n, "+nan")
               || equals_ignore_case(s, n, "-nan")) {
        value = NAN;
    } else {
        if (!is_float_literal(s, n) || n >= PROPLET_NUMBER_TEXT_MAX)
            return fail(err, err_len, text, index, "a number", type);
        char buf[PROPLET_NUMBER_TEXT_MAX];
        memcpy(buf, s, n);
        buf[n] = '\0';
        /* Decimal to double, then (for f32) double to float: the same two roundings as
         * Python's float() followed by struct.pack("<f"). */
        value = strtod(buf, NULL);
    }
    out->type = type;
    if (type == WASM_TYPE_F32)
        out->of.f32 = (float)value;
    else
        out->of.f64 = value;
    return true;
}

bool wasm_parse_input(const char *text, wasm_type_t type, size_t index, wasm_value_t *out,
                      char *err, size_t err_len)
{
    const char *s;
    size_t n;
    strip(text, &s, &n);
    switch (type) {
    case WASM_TYPE_I32:
    case WASM_TYPE_I64:
        return parse_int(text, s, n, type, index, out, err, err_len);
    case WASM_TYPE_F32:
    case WASM_TYPE_F64:
        return parse_float(text, s, n, type, index, out, err, err_len);
    default:
        snprintf(err, err_len, "parameter %zu has type %s, which a task input cannot provide",
                 index, wasm_type_name(type));
        return false;
    }
}

/* Shortest "%.{p}g" that reads back to the same value (p = 1..max). */
static bool format_shortest(double value, int max_precision, bool single, char *out,
                            size_t out_len)
{
    for (int precision = 1; precision <= max_precision; precision++) {
        int n = snprintf(out, out_len, "%.*g", precision, value);
        if (n < 0 || (size_t)n >= out_len)
            return false;
        double back = strtod(out, NULL);
        if (single ? (float)back == (float)value : back == value)
            return true;
    }
    int n = snprintf(out, out_len, "%.*g", max_precision, value);
    return n >= 0 && (size_t)n < out_len;
}

static bool format_float(double value, bool single, char *out, size_t out_len)
{
    const char *special = NULL;
    if (isnan(value))
        special = "NaN";
    else if (isinf(value))
        special = value > 0 ? "inf" : "-inf";
    if (special != NULL) {
        int n = snprintf(out, out_len, "%s", special);
        return n >= 0 && (size_t)n < out_len;
    }
    if (value == trunc(value) && fabs(value) < 1e16) {
        int n = snprintf(out, out_len, "%.0f", value);
        return n >= 0 && (size_t)n < out_len;
    }
    return format_shortest(value, single ? 9 : 17, single, out, out_len);
}

bool wasm_format_value(const wasm_value_t *value, char *out, size_t out_len)
{
    int n;
    switch (value->type) {
    case WASM_TYPE_I32:
        n = snprintf(out, out_len, "%ld", (long)value->of.i32);
        return n >= 0 && (size_t)n < out_len;
    case WASM_TYPE_I64:
        n = snprintf(out, out_len, "%lld", (long long)value->of.i64);
        return n >= 0 && (size_t)n < out_len;
    case WASM_TYPE_F32:
        return format_float((double)value->of.f32, true, out, out_len);
    case WASM_TYPE_F64:
        return format_float(value->of.f64, false, out, out_len);
    default:
        return false;
    }
}

bool wasm_format_results(const wasm_value_t *values, size_t count, char *out, size_t out_len)
{
    if (out_len == 0)
        return false;
    size_t used = 0;
    out[0] = '\0';
    for (size_t i = 0; i < count; i++) {
        if (i > 0) {
            if (used + 1 >= out_len)
                return false;
            out[used++] = ',';
            out[used] = '\0';
        }
        if (!wasm_format_value(&values[i], out + used, out_len - used))
            return false;
        used += strlen(out + used);
    }
    return true;
}

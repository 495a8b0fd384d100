/* SPDX-License-Identifier: MIT */
/*
 * validate.c -- the rules de_record applies to text it is given, and the
 * quoting used to name a bad value in an error message.
 *
 * Every check here is total: it accepts any byte string (NULL included,
 * where that makes sense) and never reads past the given length, so a
 * caller can run it on untrusted input before anything else.
 */
#include "internal.h"

#include <stdio.h>
#include <string.h>

/* Length of the UTF-8 sequence starting at s (at most avail bytes), or 0
 * when it is not a valid, shortest-form encoding of a scalar value. */
static size_t utf8_seq_len(const unsigned char *s, size_t avail)
{
    unsigned char c = s[0];
    size_t n, i;
    uint32_t cp;

    if (c < 0x80)
        return 1;
    if (c >= 0xc2 && c <= 0xdf) {
        n = 2;
        cp = c & 0x1f;
    } else if (c >= 0xe0 && c <= 0xef) {
        n = 3;
        cp = c & 0x0f;
    } else if (c >= 0xf0 && c <= 0xf4) {
        n = 4;
        cp = c & 0x07;
    } else {
        return 0;
    }
    if (n > avail)
        return 0;
    for (i = 1; i < n; i++) {
        if ((s[i] & 0xc0) != 0x80)
            return 0;
        cp = (cp << 6) | (s[i] & 0x3f);
    }
    if ((n == 3 && cp < 0x800) || (n == 4 && cp < 0x10000) || cp > 0x10ffff ||
        (cp >= 0xd800 && cp <= 0xdfff))
        return 0;
    return n;
}

size_t de__utf8_valid_prefix(const char *s, size_t len)
{
    const unsigned char *p = (const unsigned char *)s;
    size_t i = 0, n;

    while (i < len) {
        n = utf8_seq_len(p + i, len - i);
        if (n == 0)
            return i;
        i += n;
    }
    return len;
}

char *de__quote(char *buf, size_t bufsize, const char *s, size_t len)
{
    const unsigned char *p = (const unsigned char *)s;
    size_t i = 0, o = 0, n;
    /* Room kept for "...'" and the NUL. */
    size_t limit = bufsize > 6 ? bufsize - 6 : 0;

    if (bufsize < 8) {
        if (bufsize)
            buf[0] = '\0';
        return buf;
    }
    if (s == NULL) {
        snprintf(buf, bufsize, "(null)");
        return buf;
    }
    if (len == (size_t)-1)
        len = strlen(s);
    buf[o++] = '\'';
    while (i < len) {
        n = utf8_seq_len(p + i, len - i);
        if (n == 1 && (p[i] < 0x20 || p[i] == 0x7f))
            n = 0;
        if (n == 2 && p[i] == 0xc2 && p[i + 1] < 0xa0)
            n = 0; /* C1 control */
        if (n == 0) {
            if (o + 4 > limit)
                break;
            snprintf(buf + o, bufsize - o, "\\x%02x", p[i]);
            o += 4;
            i++;
            continue;
        }
        if (o + n > limit)
            break;
        memcpy(buf + o, p + i, n);
        o += n;
        i += n;
    }
    if (i < len) {
        memcpy(buf + o, "...", 3);
        o += 3;
    }
    buf[o++] = '\'';
    buf[o] = '\0';
    return buf;
}

bool de__is_ident(const char *s)
{
    size_t i;

    if (s == NULL || !(s[0] >= 'a' && s[0] <= 'z'))
        return false;
    for (i = 1; s[i]; i++) {
        char c = s[i];
        if (i >= DE__IDENT_MAX)
            return false;
        if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_'))
            return false;
    }
    return true;
}

bool de__is_clean_utf8(const char *s, size_t len)
{
    const unsigned char *p = (const unsigned char *)s;
    size_t i = 0, n;

    if (s == NULL || len == 0)
        return false;
    while (i < len) {
        n = utf8_seq_len(p + i, len - i);
        if (n == 0)
            return false;
        if (n == 1 && (p[i] < 0x20 || p[i] == 0x7f))
            return false;
        if (n == 2 && p[i] == 0xc2 && p[i + 1] < 0xa0)
            return false; /* U+0080..U+009F, the C1 controls */
        i += n;
    }
    return true;
}

bool de__is_event_id(const char *s)
{
    size_t i;

    if (s == NULL || s[0] == '\0')
        return false;
    for (i = 0; s[i]; i++) {
        if (i >= DE__EVENT_ID_MAX)
            return false;
        if (s[i] <= 0x20 || s[i] >= 0x7f)
            return false;
    }
    return true;
}

static bool is_lower_hex(const char *s, size_t n, bool *all_zero)
{
    size_t i;

    *all_zero = true;
    for (i = 0; i < n; i++) {
        char c = s[i];
        if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f')))
            return false;
        if (c != '0')
            *all_zero = false;
    }
    return true;
}

/*
 * W3C Trace Context, level 1: "00-<trace-id 32 hex>-<parent-id 16 hex>-
 * <flags 2 hex>", lowercase; ids not all zero; version ff is invalid.  A
 * later version may append "-..." fields after the 55 characters version
 * 00 has, and the spec tells parsers to accept it.
 */
bool de__is_traceparent(const char *s)
{
    size_t len;
    bool zero;

    if (s == NULL)
        return false;
    len = strlen(s);
    if (len < 55)
        return false;
    if (!is_lower_hex(s, 2, &zero) || strncmp(s, "ff", 2) == 0)
        return false;
    if (s[2] != '-' || s[35] != '-' || s[52] != '-')
        return false;
    if (!is_lower_hex(s + 3, 32, &zero) || zero)
        return false;
    if (!is_lower_hex(s + 36, 16, &zero) || zero)
        return false;
    if (!is_lower_hex(s + 53, 2, &zero))
        return false;
    if (strncmp(s, "00", 2) == 0)
        return len == 55;
    if (len > 55 && s[55] != '-')
        return false;
    for (size_t i = 55; i < len; i++)
        if (s[i] < 0x21 || s[i] > 0x7e)
            return false;
    return true;
}

bool de__is_tracestate(const char *s)
{
    size_t i;

    if (s == NULL)
        return false;
    for (i = 0; s[i]; i++) {
        if (i >= DE__TRACESTATE_MAX)
            return false;
        if (s[i] < 0x20 || s[i] > 0x7e)
            return false;
    }
    return true;
}

/*
 * JSON (RFC 8259) validation without building a tree: the consumer checks
 * every record's value is a JSON object, and a full parse into jansson
 * values showed as 8% of its time.  Depth is capped (as jansson caps it)
 * so that hostile input cannot exhaust the stack.
 */
#define JSON_MAX_DEPTH 512

struct jv {
    const unsigned char *p, *end;
};

static void jv_ws(struct jv *j)
{
    while (j->p < j->end &&
           (*j->p == ' ' || *j->p == '\t' || *j->p == '\n' || *j->p == '\r'))
        j->p++;
}

static bool jv_lit(struct jv *j, const char *lit)
{
    size_t n = strlen(lit);

    if ((size_t)(j->end - j->p) < n || memcmp(j->p, lit, n) != 0)
        return false;
    j->p += n;
    return true;
}

static bool jv_hex4(struct jv *j, unsigned *out)
{
    unsigned v = 0;

    if (j->end - j->p < 4)
        return false;
    for (int i = 0; i < 4; i++) {
        unsigned char c = *j->p++;
        v <<= 4;
        if (c >= '0' && c <= '9')
            v |= (unsigned)(c - '0');
        else if (c >= 'a' && c <= 'f')
            v |= (unsigned)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F')
            v |= (unsigned)(c - 'A' + 10);
        else
            return false;
    }
    *out = v;
    return true;
}

static bool jv_string(struct jv *j)
{
    if (j->p >= j->end || *j->p != '"')
        return false;
    j->p++;
    while (j->p < j->end) {
        unsigned char c = *j->p;
        size_t n;
        if (c == '"') {
            j->p++;
            return true;
        }
        if (c < 0x20)
            return false;
        if (c == '\\') {
            unsigned u, lo;
            if (++j->p >= j->end)
                return false;
            c = *j->p++;
            if (c == 'u') {
                if (!jv_hex4(j, &u))
                    return false;
                if (u >= 0xdc00 && u <= 0xdfff)
                    return false; /* a lone low surrogate */
                if (u >= 0xd800 && u <= 0xdbff) {
                    if (j->end - j->p < 6 || j->p[0] != '\\' || j->p[1] != 'u')
                        return false;
                    j->p += 2;
                    if (!jv_hex4(j, &lo) || lo < 0xdc00 || lo > 0xdfff)
                        return false;
                }
            } else if (!strchr("\"\\/bfnrt", c) || c == '\0') {
                return false;
            }
            continue;
        }
        n = utf8_seq_len(j->p, (size_t)(j->end - j->p));
        if (n == 0)
            return false;
        j->p += n;
    }
    return false;
}

static bool jv_digits(struct jv *j)
{
    const unsigned char *start = j->p;

    while (j->p < j->end && *j->p >= '0' && *j->p <= '9')
        j->p++;
    return j->p > start;
}

static bool jv_number(struct jv *j)
{
    if (j->p < j->end && *j->p == '-')
        j->p++;
    if (j->p < j->end && *j->p == '0')
        j->p++;
    else if (!jv_digits(j))
        return false;
    if (j->p < j->end && *j->p == '.') {
        j->p++;
        if (!jv_digits(j))
            return false;
    }
    if (j->p < j->end && (*j->p == 'e' || *j->p == 'E')) {
        j->p++;
        if (j->p < j->end && (*j->p == '+' || *j->p == '-'))
            j->p++;
        if (!jv_digits(j))
            return false;
    }
    return true;
}

static bool jv_value(struct jv *j, int depth);

static bool jv_container(struct jv *j, int depth, bool object)
{
    char close = object ? '}' : ']';

    if (depth > JSON_MAX_DEPTH)
        return false;
    j->p++; /* '{' or '[' */
    jv_ws(j);
    if (j->p < j->end && *j->p == close) {
        j->p++;
        return true;
    }
    for (;;) {
        if (object) {
            if (!jv_string(j))
                return false;
            jv_ws(j);
            if (j->p >= j->end || *j->p != ':')
                return false;
            j->p++;
        }
        if (!jv_value(j, depth + 1))
            return false;
        jv_ws(j);
        if (j->p >= j->end)
            return false;
        if (*j->p == close) {
            j->p++;
            return true;
        }
        if (*j->p != ',')
            return false;
        j->p++;
        jv_ws(j);
    }
}

static bool jv_value(struct jv *j, int depth)
{
    jv_ws(j);
    if (j->p >= j->end)
        return false;
    switch (*j->p) {
    case '{': return jv_container(j, depth, true);
    case '[': return jv_container(j, depth, false);
    case '"': return jv_string(j);
    case 't': return jv_lit(j, "true");
    case 'f': return jv_lit(j, "false");
    case 'n': return jv_lit(j, "null");
    default: return jv_number(j);
    }
}

bool de__json_is_object(const char *s, size_t len)
{
    struct jv j = {(const unsigned char *)s, (const unsigned char *)s + len};

    jv_ws(&j);
    if (j.p >= j.end || *j.p != '{' || !jv_container(&j, 1, true))
        return false;
    jv_ws(&j);
    return j.p == j.end;
}

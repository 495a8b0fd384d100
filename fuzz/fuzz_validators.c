/* SPDX-License-Identifier: MIT */
/*
 * fuzz_validators.c -- the identifier, subject id, event id and trace
 * context validators (lib/validate.c) against reference definitions
 * written here straight from their documented rules.
 */
#include "internal.h"

#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* [a-z][a-z0-9_]*, 1..64 bytes. */
static bool ref_ident(const char *s, size_t n)
{
    if (n == 0 || n > DE__IDENT_MAX || !(s[0] >= 'a' && s[0] <= 'z'))
        return false;
    for (size_t i = 1; i < n; i++)
        if (!((s[i] >= 'a' && s[i] <= 'z') || (s[i] >= '0' && s[i] <= '9') ||
              s[i] == '_'))
            return false;
    return true;
}

/* 1..36 printable ASCII characters without spaces. */
static bool ref_event_id(const char *s, size_t n)
{
    if (n == 0 || n > DE__EVENT_ID_MAX)
        return false;
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)s[i] < 0x21 || (unsigned char)s[i] > 0x7e)
            return false;
    return true;
}

/* Decodes one code point per RFC 3629 (shortest form, no surrogates, at
 * most U+10FFFF); 0 when the bytes are not UTF-8. */
static size_t ref_utf8(const unsigned char *p, size_t n, unsigned long *cp)
{
    size_t len;
    unsigned long c, min;

    if (p[0] < 0x80) {
        *cp = p[0];
        return 1;
    }
    if (p[0] >= 0xc0 && p[0] < 0xe0)
        len = 2, c = p[0] & 0x1f, min = 0x80;
    else if (p[0] >= 0xe0 && p[0] < 0xf0)
        len = 3, c = p[0] & 0x0f, min = 0x800;
    else if (p[0] >= 0xf0 && p[0] < 0xf8)
        len = 4, c = p[0] & 0x07, min = 0x10000;
    else
        return 0;
    if (len > n)
        return 0;
    for (size_t i = 1; i < len; i++) {
        if ((p[i] & 0xc0) != 0x80)
            return 0;
        c = (c << 6) | (p[i] & 0x3f);
    }
    if (c < min || c > 0x10ffff || (c >= 0xd800 && c <= 0xdfff))
        return 0;
    *cp = c;
    return len;
}

/* Non-empty UTF-8 without C0 controls, DEL, C1 controls or the
 * bidirectional formatting controls. */
static bool ref_clean_utf8(const unsigned char *p, size_t n)
{
    unsigned long cp;
    size_t k;

    if (n == 0)
        return false;
    for (size_t i = 0; i < n; i += k) {
        if ((k = ref_utf8(p + i, n - i, &cp)) == 0)
            return false;
        if (cp < 0x20 || (cp >= 0x7f && cp < 0xa0))
            return false;
        if (cp == 0x61c || cp == 0x200e || cp == 0x200f ||
            (cp >= 0x202a && cp <= 0x202e) || (cp >= 0x2066 && cp <= 0x2069))
            return false;
    }
    return true;
}

static bool hex(const char *s, size_t n, bool *zero)
{
    *zero = true;
    for (size_t i = 0; i < n; i++) {
        if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f')))
            return false;
        *zero &= s[i] == '0';
    }
    return true;
}

/* W3C Trace Context level 1 traceparent. */
static bool ref_traceparent(const char *s, size_t n)
{
    bool z;

    if (n < 55 || s[2] != '-' || s[35] != '-' || s[52] != '-')
        return false;
    if (!hex(s, 2, &z) || (s[0] == 'f' && s[1] == 'f'))
        return false;
    if (!hex(s + 3, 32, &z) || z || !hex(s + 36, 16, &z) || z ||
        !hex(s + 53, 2, &z))
        return false;
    if (s[0] == '0' && s[1] == '0')
        return n == 55;
    if (n > 55 && s[55] != '-')
        return false;
    for (size_t i = 55; i < n; i++)
        if ((unsigned char)s[i] < 0x21 || (unsigned char)s[i] > 0x7e)
            return false;
    return true;
}

/* Printable ASCII (spaces allowed), at most 512 bytes. */
static bool ref_tracestate(const char *s, size_t n)
{
    if (n > DE__TRACESTATE_MAX)
        return false;
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)s[i] < 0x20 || (unsigned char)s[i] > 0x7e)
            return false;
    return true;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *s = malloc(size + 1);
    size_t n;

    if (s == NULL)
        return 0;
    memcpy(s, data, size);
    s[size] = '\0';
    n = strlen(s); /* the C-string validators see up to the first NUL */
    if (de__is_ident(s) != ref_ident(s, n))
        abort();
    if (de__is_event_id(s) != ref_event_id(s, n))
        abort();
    if (de__is_traceparent(s) != ref_traceparent(s, n))
        abort();
    if (de__is_tracestate(s) != ref_tracestate(s, n))
        abort();
    if (de__is_clean_utf8(s, size) !=
        ref_clean_utf8((const unsigned char *)data, size))
        abort();
    free(s);
    return 0;
}

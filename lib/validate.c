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
#include <stdlib.h>
#include <string.h>

size_t de__utf8_seq_len(const unsigned char *s, size_t avail)
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

/* Whether the n-byte sequence at s is one of Unicode's bidirectional
 * formatting controls (U+061C, U+200E, U+200F, U+202A..U+202E,
 * U+2066..U+2069): invisible, they reorder the text around them on
 * screen, so that an id or a log line reads as something else. */
static bool is_bidi(const unsigned char *s, size_t n)
{
    if (n == 2)
        return s[0] == 0xd8 && s[1] == 0x9c;
    if (n != 3 || s[0] != 0xe2)
        return false;
    if (s[1] == 0x80)
        return s[2] == 0x8e || s[2] == 0x8f || (s[2] >= 0xaa && s[2] <= 0xae);
    return s[1] == 0x81 && s[2] >= 0xa6 && s[2] <= 0xa9;
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
        n = de__utf8_seq_len(p + i, len - i);
        if (n == 1 && (p[i] < 0x20 || p[i] == 0x7f))
            n = 0;
        if (n == 2 && p[i] == 0xc2 && p[i + 1] < 0xa0)
            n = 0; /* C1 control */
        if (n > 1 && is_bidi(p + i, n))
            n = 0; /* its bytes escaped one by one */
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
        /* Printable ASCII, the common case, without a call per byte. */
        if (p[i] >= 0x20 && p[i] < 0x7f) {
            i++;
            continue;
        }
        n = de__utf8_seq_len(p + i, len - i);
        if (n == 0)
            return false;
        if (n == 1 && (p[i] < 0x20 || p[i] == 0x7f))
            return false;
        if (n == 2 && p[i] == 0xc2 && p[i + 1] < 0xa0)
            return false; /* U+0080..U+009F, the C1 controls */
        if (is_bidi(p + i, n))
            return false;
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
 * JSON validation without building a tree, one rule for every payload the
 * library handles -- what de_record accepts, the consumer accepts from
 * any producer (docs/OVERVIEW.md, "Payloads"):
 *
 *  - RFC 8259 JSON text, UTF-8 without a byte-order mark, whose top level
 *    is an object;
 *  - member names unique within each object, compared after unescaping
 *    (I-JSON, RFC 7493: "a" and "\u0061" are the same name) -- readers in
 *    other languages disagree on which of two duplicates wins;
 *  - nesting at most DE__JSON_MAX_DEPTH levels, so hostile input cannot
 *    exhaust the stack;
 *  - numbers of any size, kept exactly as written.
 *
 * It does not allocate for objects of up to NAMES_INLINE members; larger
 * ones get a hash table, so that a payload with a million members is
 * checked in linear time.
 */
#define NAMES_INLINE 8

struct jv {
    const unsigned char *start, *p, *end;
    de__json_error *err;
};

static bool jv_fail(struct jv *j, const char *what)
{
    if (j->err != NULL && j->err->what == NULL) {
        j->err->what = what;
        j->err->offset = (size_t)(j->p - j->start);
    }
    return false;
}

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
        return jv_fail(j, "an invalid literal");
    j->p += n;
    return true;
}

static bool hex4(const unsigned char *p, unsigned *out)
{
    unsigned v = 0;

    for (int i = 0; i < 4; i++) {
        unsigned char c = p[i];
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

/* Checks a string; *body and *n receive what is between the quotes, *esc
 * whether it has escapes. */
static bool jv_string(struct jv *j, const unsigned char **body, size_t *n,
                      bool *esc)
{
    if (j->p >= j->end || *j->p != '"')
        return jv_fail(j, "a string was expected");
    *body = ++j->p;
    *esc = false;
    while (j->p < j->end) {
        unsigned char c = *j->p;
        size_t k;
        if (c == '"') {
            *n = (size_t)(j->p - *body);
            j->p++;
            return true;
        }
        if (c < 0x20)
            return jv_fail(j, "a control character in a string");
        if (c == '\\') {
            unsigned u, lo;
            *esc = true;
            if (++j->p >= j->end)
                break;
            c = *j->p++;
            if (c == 'u') {
                if (j->end - j->p < 4 || !hex4(j->p, &u))
                    return jv_fail(j, "a bad \\u escape");
                j->p += 4;
                if (u >= 0xdc00 && u <= 0xdfff)
                    return jv_fail(j, "a lone low surrogate");
                if (u >= 0xd800 && u <= 0xdbff) {
                    if (j->end - j->p < 6 || j->p[0] != '\\' ||
                        j->p[1] != 'u' || !hex4(j->p + 2, &lo) || lo < 0xdc00 ||
                        lo > 0xdfff)
                        return jv_fail(j, "a lone high surrogate");
                    j->p += 6;
                }
            } else if (c == '\0' || !strchr("\"\\/bfnrt", c)) {
                return jv_fail(j, "a bad escape");
            }
            continue;
        }
        k = de__utf8_seq_len(j->p, (size_t)(j->end - j->p));
        if (k == 0)
            return jv_fail(j, "invalid UTF-8");
        j->p += k;
    }
    return jv_fail(j, "an unterminated string");
}

/* The next code point of a checked string body. */
static const unsigned char *next_cp(const unsigned char *p, uint32_t *cp)
{
    static const char from[] = "\"\\/bfnrt", to[] = "\"\\/\b\f\n\r\t";
    unsigned u, lo;
    size_t n;

    if (*p != '\\') {
        n = de__utf8_seq_len(p, 4);
        *cp = n == 1 ? p[0] : (uint32_t)(p[0] & (0xff >> (n + 1)));
        for (size_t i = 1; i < n; i++)
            *cp = (*cp << 6) | (p[i] & 0x3f);
        return p + n;
    }
    if (p[1] != 'u') {
        *cp = (uint32_t)to[strchr(from, p[1]) - from];
        return p + 2;
    }
    (void)hex4(p + 2, &u); /* checked by jv_string */
    if (u >= 0xd800 && u <= 0xdbff) {
        (void)hex4(p + 8, &lo);
        *cp = 0x10000 + ((u - 0xd800) << 10) + (lo - 0xdc00);
        return p + 12;
    }
    *cp = u;
    return p + 6;
}

typedef struct jname {
    const unsigned char *p;
    size_t n;
    uint32_t hash;
    bool esc;
} jname;

static uint32_t name_hash(const unsigned char *p, size_t n)
{
    const unsigned char *end = p + n;
    uint32_t h = 2166136261u, cp;

    /* Over code points, so that an escaped and a literal spelling of one
     * name hash alike. */
    while (p < end) {
        p = next_cp(p, &cp);
        h = (h ^ cp) * 16777619u;
    }
    return h ^ (h >> 15);
}

static bool name_eq(const jname *a, const jname *b)
{
    const unsigned char *p = a->p, *q = b->p;
    uint32_t x, y;

    if (!a->esc && !b->esc)
        return a->n == b->n && memcmp(a->p, b->p, a->n) == 0;
    while (p < a->p + a->n && q < b->p + b->n) {
        p = next_cp(p, &x);
        q = next_cp(q, &y);
        if (x != y)
            return false;
    }
    return p == a->p + a->n && q == b->p + b->n;
}

/* The member names of one object. */
typedef struct jnames {
    jname inl[NAMES_INLINE];
    jname *tab;    /* open addressing, once past NAMES_INLINE */
    size_t n, cap; /* names seen; table size (a power of two) */
} jnames;

static bool tab_insert(jname *tab, size_t cap, const jname *nm)
{
    for (size_t i = nm->hash & (cap - 1);; i = (i + 1) & (cap - 1)) {
        if (tab[i].p == NULL) {
            tab[i] = *nm;
            return true;
        }
        if (tab[i].hash == nm->hash && name_eq(&tab[i], nm))
            return false;
    }
}

/* Adds a name; false (with the error set) when it is there already. */
static bool names_add(struct jv *j, jnames *ns, const jname *nm)
{
    if (ns->tab == NULL) {
        for (size_t i = 0; i < ns->n; i++)
            if (ns->inl[i].hash == nm->hash && name_eq(&ns->inl[i], nm))
                return jv_fail(j, "a duplicate member name");
        if (ns->n < NAMES_INLINE) {
            ns->inl[ns->n++] = *nm;
            return true;
        }
    }
    if (ns->tab == NULL || (ns->n + 1) * 2 > ns->cap) {
        size_t cap = ns->cap ? ns->cap * 2 : 4 * NAMES_INLINE;
        jname *t = calloc(cap, sizeof *t);
        if (t == NULL)
            return jv_fail(j, "out of memory");
        for (size_t i = 0; ns->tab == NULL && i < ns->n; i++)
            (void)tab_insert(t, cap, &ns->inl[i]);
        for (size_t i = 0; ns->tab != NULL && i < ns->cap; i++)
            if (ns->tab[i].p != NULL)
                (void)tab_insert(t, cap, &ns->tab[i]);
        free(ns->tab);
        ns->tab = t;
        ns->cap = cap;
    }
    if (!tab_insert(ns->tab, ns->cap, nm))
        return jv_fail(j, "a duplicate member name");
    ns->n++;
    return true;
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
        return jv_fail(j, "an unexpected character");
    if (j->p < j->end && *j->p == '.') {
        j->p++;
        if (!jv_digits(j))
            return jv_fail(j, "a bad number");
    }
    if (j->p < j->end && (*j->p == 'e' || *j->p == 'E')) {
        j->p++;
        if (j->p < j->end && (*j->p == '+' || *j->p == '-'))
            j->p++;
        if (!jv_digits(j))
            return jv_fail(j, "a bad number");
    }
    return true;
}

static bool jv_value(struct jv *j, int depth);

static bool jv_container(struct jv *j, int depth, bool object)
{
    char close = object ? '}' : ']';
    jnames names;
    jname nm;
    bool ok = false;

    if (depth > DE__JSON_MAX_DEPTH)
        return jv_fail(j, "nesting deeper than the limit");
    names.n = names.cap = 0;
    names.tab = NULL;
    j->p++; /* '{' or '[' */
    jv_ws(j);
    if (j->p < j->end && *j->p == close) {
        j->p++;
        return true;
    }
    for (;;) {
        if (object) {
            if (!jv_string(j, &nm.p, &nm.n, &nm.esc))
                break;
            nm.hash = name_hash(nm.p, nm.n);
            if (!names_add(j, &names, &nm))
                break;
            jv_ws(j);
            if (j->p >= j->end || *j->p != ':') {
                jv_fail(j, "':' was expected");
                break;
            }
            j->p++;
        }
        if (!jv_value(j, depth + 1))
            break;
        jv_ws(j);
        if (j->p >= j->end) {
            jv_fail(j, "the text ended early");
            break;
        }
        if (*j->p == close) {
            j->p++;
            ok = true;
            break;
        }
        if (*j->p != ',') {
            jv_fail(j, "',' was expected");
            break;
        }
        j->p++;
        jv_ws(j);
    }
    free(names.tab);
    return ok;
}

static bool jv_value(struct jv *j, int depth)
{
    const unsigned char *b;
    size_t n;
    bool esc;

    jv_ws(j);
    if (j->p >= j->end)
        return jv_fail(j, "the text ended early");
    switch (*j->p) {
    case '{': return jv_container(j, depth, true);
    case '[': return jv_container(j, depth, false);
    case '"': return jv_string(j, &b, &n, &esc);
    case 't': return jv_lit(j, "true");
    case 'f': return jv_lit(j, "false");
    case 'n': return jv_lit(j, "null");
    default: return jv_number(j);
    }
}

bool de__json_check(const char *s, size_t len, de__json_error *err)
{
    struct jv j = {(const unsigned char *)s, (const unsigned char *)s,
                   (const unsigned char *)s + len, err};

    if (err != NULL) {
        err->what = NULL;
        err->offset = 0;
        err->not_object = false;
    }
    jv_ws(&j);
    if (j.p >= j.end || *j.p != '{') {
        /* Valid JSON that is not an object, or not JSON at all? */
        if (jv_value(&j, 1)) {
            jv_ws(&j);
            if (j.p == j.end && err != NULL)
                err->not_object = true;
            j.p = j.start;
            return jv_fail(&j, "not an object");
        }
        return false;
    }
    if (!jv_container(&j, 1, true))
        return false;
    jv_ws(&j);
    if (j.p != j.end)
        return jv_fail(&j, "text after the object");
    return true;
}

bool de__json_is_object(const char *s, size_t len)
{
    return de__json_check(s, len, NULL);
}

/* ---- names and URIs ----------------------------------------------------- */

bool de__is_type_name(const char *s, size_t n)
{
    if (s == NULL || n == 0 || n > DE__NAME_MAX)
        return false;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
              (c >= '0' && c <= '9') || c == '.' || c == '_' || c == '-'))
            return false;
    }
    return true;
}

bool de__is_action_name(const char *s, size_t n)
{
    if (s == NULL || n == 0 || n > DE__ACTION_MAX || !de__is_clean_utf8(s, n))
        return false;
    for (size_t i = 0; i < n; i++)
        if (s[i] == ' ')
            return false;
    return true;
}

static bool uri_unreserved(unsigned char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
           (c >= '0' && c <= '9') || c == '-' || c == '.' || c == '_' ||
           c == '~';
}

static bool uri_sub_delim(unsigned char c)
{
    return c != '\0' && strchr("!$&'()*+,;=", c) != NULL;
}

static bool is_hex(unsigned char c)
{
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') ||
           (c >= 'A' && c <= 'F');
}

/* Characters [p, end) each one of `extra`, unreserved, sub-delims or a
 * percent-encoding. */
static bool uri_chars(const unsigned char *p, const unsigned char *end,
                      const char *extra)
{
    while (p < end) {
        if (*p == '%') {
            if (end - p < 3 || !is_hex(p[1]) || !is_hex(p[2]))
                return false;
            p += 3;
            continue;
        }
        if (!uri_unreserved(*p) && !uri_sub_delim(*p) &&
            (*p == '\0' || strchr(extra, *p) == NULL))
            return false;
        p++;
    }
    return true;
}

/* authority = [ userinfo "@" ] host [ ":" port ] */
static bool uri_authority(const unsigned char *p, const unsigned char *end)
{
    const unsigned char *at = NULL, *host, *q;

    for (q = p; q < end; q++)
        if (*q == '@')
            at = q;
    if (at != NULL && !uri_chars(p, at, ":"))
        return false;
    host = at ? at + 1 : p;
    if (host < end && *host == '[') {
        /* IP-literal: IPv6 or IPvFuture, checked for its characters. */
        for (q = host + 1; q < end && *q != ']'; q++)
            if (!is_hex(*q) && *q != ':' && *q != '.' && *q != 'v' &&
                *q != 'V' && !uri_unreserved(*q) && !uri_sub_delim(*q))
                return false;
        if (q >= end || q == host + 1)
            return false;
        q++;
    } else {
        for (q = host; q < end && *q != ':'; q++)
            ;
        if (!uri_chars(host, q, ""))
            return false;
    }
    if (q < end) {
        if (*q != ':')
            return false;
        for (q++; q < end; q++)
            if (*q < '0' || *q > '9')
                return false;
    }
    return true;
}

/*
 * RFC 3986, section 4.1: URI-reference = URI / relative-ref.  A scheme is
 * ALPHA *( ALPHA / DIGIT / "+" / "-" / "." ) before the first ':', which
 * must come before any '/', '?' or '#' (otherwise the reference is
 * relative, and its first segment must not hold a ':').  Then "//"
 * authority, a path of pchars and '/', "?" query and "#" fragment of
 * pchars, '/' and '?'.  ASCII only (an IRI's other characters must be
 * percent-encoded).
 */
bool de__is_uri_reference(const char *s, size_t n)
{
    const unsigned char *p = (const unsigned char *)s, *end = p + n, *q;
    const unsigned char *path_end, *query, *frag;

    if (s == NULL)
        return false;
    for (q = p; q < end && *q != ':' && *q != '/' && *q != '?' && *q != '#';
         q++)
        ;
    if (q < end && *q == ':') {
        /* A scheme. */
        if (q == p || !((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z')))
            return false;
        for (const unsigned char *c = p + 1; c < q; c++)
            if (!((*c >= 'a' && *c <= 'z') || (*c >= 'A' && *c <= 'Z') ||
                  (*c >= '0' && *c <= '9') || *c == '+' || *c == '-' ||
                  *c == '.'))
                return false;
        p = q + 1;
    }
    for (frag = p; frag < end && *frag != '#'; frag++)
        ;
    for (query = p; query < frag && *query != '?'; query++)
        ;
    path_end = query;
    if (path_end - p >= 2 && p[0] == '/' && p[1] == '/') {
        const unsigned char *a = p + 2;
        for (q = a; q < path_end && *q != '/'; q++)
            ;
        if (!uri_authority(a, q))
            return false;
        p = q;
    }
    if (!uri_chars(p, path_end, ":@/"))
        return false;
    if (query < frag && !uri_chars(query + 1, frag, ":@/?"))
        return false;
    if (frag < end && !uri_chars(frag + 1, end, ":@/?"))
        return false;
    return true;
}

/* ---- JSON members, for CloudEvents in structured mode --------------------
 * Only ever run on text de__json_check accepted, so they need no checks of
 * their own beyond staying inside it. */

bool de__json_members(const char *s, size_t len, de__json_member_fn fn,
                      void *ctx)
{
    struct jv j = {(const unsigned char *)s, (const unsigned char *)s,
                   (const unsigned char *)s + len, NULL};
    de__json_member m;

    jv_ws(&j);
    if (j.p >= j.end || *j.p != '{')
        return false;
    j.p++;
    jv_ws(&j);
    while (j.p < j.end && *j.p != '}') {
        const unsigned char *body, *v;
        size_t n;
        bool esc;
        if (!jv_string(&j, &body, &n, &esc))
            return false;
        m.name = (const char *)body - 1;
        m.name_len = n + 2;
        jv_ws(&j);
        j.p++; /* ':' */
        jv_ws(&j);
        v = j.p;
        if (!jv_value(&j, 1))
            return false;
        m.value = (const char *)v;
        m.value_len = (size_t)(j.p - v);
        if (!fn(ctx, &m))
            return false;
        jv_ws(&j);
        if (j.p < j.end && *j.p == ',') {
            j.p++;
            jv_ws(&j);
        }
    }
    return true;
}

size_t de__json_unescape(const char *raw, size_t n, char *out)
{
    const unsigned char *p = (const unsigned char *)raw + 1;
    const unsigned char *end = (const unsigned char *)raw + n - 1;
    size_t o = 0;
    uint32_t cp;

    if (n < 2 || raw[0] != '"')
        return (size_t)-1;
    while (p < end) {
        p = next_cp(p, &cp);
        if (cp < 0x80) {
            out[o++] = (char)cp;
        } else if (cp < 0x800) {
            out[o++] = (char)(0xc0 | (cp >> 6));
            out[o++] = (char)(0x80 | (cp & 0x3f));
        } else if (cp < 0x10000) {
            out[o++] = (char)(0xe0 | (cp >> 12));
            out[o++] = (char)(0x80 | ((cp >> 6) & 0x3f));
            out[o++] = (char)(0x80 | (cp & 0x3f));
        } else {
            out[o++] = (char)(0xf0 | (cp >> 18));
            out[o++] = (char)(0x80 | ((cp >> 12) & 0x3f));
            out[o++] = (char)(0x80 | ((cp >> 6) & 0x3f));
            out[o++] = (char)(0x80 | (cp & 0x3f));
        }
    }
    out[o] = '\0';
    return o;
}

/* SPDX-License-Identifier: MIT */
/*
 * contract.c -- event contracts: a documented subset of JSON Schema
 * (draft 2020-12) compiled once into a tree of C structs, then checked
 * against each payload.
 *
 * The check runs on the host's commit path, so whatever can be decided
 * once is decided when compiling: every keyword is type-checked (anything
 * outside the subset is refused, so a typo cannot silently weaken a
 * contract), properties are sorted for binary search, enums become a
 * sorted string table plus sorted numbers, patterns are compiled, and
 * $ref becomes a pointer.  A check allocates nothing and renders no path
 * unless it fails.
 *
 * Invariants: a compiled schema is never modified, so several threads may
 * check against one schema at once (glibc's regexec takes its own lock
 * around the automaton states it caches).  The node graph, followed
 * through $ref, is acyclic and at most DE__SCHEMA_DEPTH_MAX deep, which
 * bounds every recursion here.  Nodes borrow strings from the parsed
 * document, which lives as long as the schema.
 */
#include "contract.h"

#include <assert.h>
#include <locale.h>
#include <pthread.h>
#include <regex.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- types, numbers and values ---------------------------------------- */

enum {
    T_NULL = 1u << 0,
    T_BOOLEAN = 1u << 1,
    T_OBJECT = 1u << 2,
    T_ARRAY = 1u << 3,
    T_NUMBER = 1u << 4,
    T_STRING = 1u << 5,
    T_INTEGER = 1u << 6,
};

/* In the order messages list them. */
static const struct {
    const char *name;
    unsigned bit;
    const char *noun;
} type_names[] = {
    {"object", T_OBJECT, "an object"}, {"array", T_ARRAY, "an array"},
    {"string", T_STRING, "a string"},  {"integer", T_INTEGER, "an integer"},
    {"number", T_NUMBER, "a number"},  {"boolean", T_BOOLEAN, "a boolean"},
    {"null", T_NULL, "null"},
};

/* 2^63: doubles at or beyond it are integral and outside json_int_t. */
#define TWO_POW_63 9223372036854775808.0

static bool real_is_integral(double d)
{
    if (d != d)
        return false; /* NaN; jansson never makes one */
    if (d >= TWO_POW_63 || d < -TWO_POW_63)
        return d - d == 0; /* finite: integral; infinite: not */
    return (double)(json_int_t)d == d;
}

/* A JSON number kept exactly as jansson parsed it. */
typedef struct num {
    bool is_int;
    json_int_t i;
    double d;
} num;

static num num_of(const json_t *v)
{
    num n = {0};

    if (json_is_integer(v)) {
        n.is_int = true;
        n.i = json_integer_value(v);
    } else {
        n.d = json_real_value(v);
    }
    return n;
}

/* The sign of i - d, exactly (no rounding of i to a double). */
static int cmp_int_real(json_int_t i, double d)
{
    json_int_t t;

    if (d >= TWO_POW_63)
        return -1;
    if (d < -TWO_POW_63)
        return 1;
    t = (json_int_t)d; /* exact: |d| < 2^63, truncated toward zero */
    if (i != t)
        return i < t ? -1 : 1;
    if (d > (double)t)
        return -1;
    if (d < (double)t)
        return 1;
    return 0;
}

/* Numbers compare by value: 2020-12 says 1 and 1.0 are the same. */
static int num_cmp(const num *a, const num *b)
{
    if (a->is_int && b->is_int)
        return (a->i > b->i) - (a->i < b->i);
    if (a->is_int)
        return cmp_int_real(a->i, b->d);
    if (b->is_int)
        return -cmp_int_real(b->i, a->d);
    return (a->d > b->d) - (a->d < b->d);
}

/* Byte-wise order with the shorter prefix first; keys may hold NUL. */
static int key_cmp(const char *a, size_t alen, const char *b, size_t blen)
{
    int c = memcmp(a, b, alen < blen ? alen : blen);

    if (c != 0)
        return c;
    return (alen > blen) - (alen < blen);
}

/* JSON Schema equality: numbers by value, objects regardless of member
 * order.  Depth is bounded by jansson's parser on at least one side. */
static bool same_value(const json_t *a, const json_t *b)
{
    if (json_is_number(a) && json_is_number(b)) {
        num x = num_of(a), y = num_of(b);
        return num_cmp(&x, &y) == 0;
    }
    if (json_typeof(a) != json_typeof(b))
        return false;
    switch (json_typeof(a)) {
    case JSON_STRING:
        return key_cmp(json_string_value(a), json_string_length(a),
                       json_string_value(b), json_string_length(b)) == 0;
    case JSON_ARRAY:
        if (json_array_size(a) != json_array_size(b))
            return false;
        for (size_t i = 0; i < json_array_size(a); i++)
            if (!same_value(json_array_get(a, i), json_array_get(b, i)))
                return false;
        return true;
    case JSON_OBJECT: {
        const char *k;
        size_t klen;
        json_t *va, *vb;
        if (json_object_size(a) != json_object_size(b))
            return false;
        /* The foreach macros want a mutable object; nothing is changed. */
        json_object_keylen_foreach((json_t *)(uintptr_t)a, k, klen, va)
        {
            vb = json_object_getn(b, k, klen);
            if (vb == NULL || !same_value(va, vb))
                return false;
        }
        return true;
    }
    default: return true; /* true, false, null */
    }
}

/* ---- values and paths in messages -------------------------------------- */

struct dump_buf {
    char *p;
    size_t size, len;
    bool cut;
};

/* json_dump_callback sink keeping the first bytes, then stopping. */
static int dump_sink(const char *buf, size_t n, void *data)
{
    struct dump_buf *d = data;
    size_t room = d->size - 1 - d->len;

    if (n > room) {
        memcpy(d->p + d->len, buf, room);
        d->len += room;
        d->cut = true;
        return -1;
    }
    memcpy(d->p + d->len, buf, n);
    d->len += n;
    return 0;
}

/* The shortest of jansson's renderings that reads back as d: "1.5", not
 * "1.5000000000000000".  jansson, not printf, so the host's LC_NUMERIC
 * cannot turn the point into a comma. */
static void format_real(char *buf, size_t size, double d)
{
    json_t *r = json_real(d), *back;
    bool done = false;

    for (int prec = 15; r != NULL && prec <= 17 && !done; prec++) {
        struct dump_buf db = {buf, size, 0, false};
        if (json_dump_callback(r, dump_sink, &db,
                               JSON_ENCODE_ANY | JSON_REAL_PRECISION(prec)) !=
            0)
            break;
        buf[db.len] = '\0';
        back = json_loadb(buf, db.len, JSON_DECODE_ANY, NULL);
        done = prec == 17 || (json_is_real(back) && json_real_value(back) == d);
        json_decref(back);
    }
    json_decref(r);
    if (!done)
        snprintf(buf, size, "%.17g", d);
}

/* Writes v as a message shows it: strings quoted and escaped by
 * de__quote, numbers as JSON, arrays and objects as compact JSON, quoted
 * and cut to DE__QUOTE_MAX. */
static const char *describe(char *buf, size_t size, const json_t *v)
{
    char raw[2 * DE__QUOTE_MAX];
    struct dump_buf d = {raw, sizeof raw, 0, false};

    switch (json_typeof(v)) {
    case JSON_STRING:
        return de__quote(buf, size, json_string_value(v),
                         json_string_length(v));
    case JSON_INTEGER:
        snprintf(buf, size, "%" JSON_INTEGER_FORMAT, json_integer_value(v));
        return buf;
    case JSON_REAL: format_real(buf, size, json_real_value(v)); return buf;
    case JSON_TRUE: snprintf(buf, size, "true"); return buf;
    case JSON_FALSE: snprintf(buf, size, "false"); return buf;
    case JSON_NULL: snprintf(buf, size, "null"); return buf;
    default:
        /* raw holds more than a quote shows, so de__quote marks a cut
         * dump with "...". */
        json_dump_callback(v, dump_sink, &d, JSON_COMPACT);
        return de__quote(buf, size, raw, d.len);
    }
}

#define DESCRIBE(v) describe((char[DE__QUOTE_MAX]){0}, DE__QUOTE_MAX, (v))

/*
 * A location, as a chain of segments from the leaf up, kept on the stack
 * of the recursion that walks it; rendered only for a message.
 */
typedef struct seg {
    const struct seg *up;
    const char *key; /* NULL: an array element */
    size_t n;        /* the key's length, or the element's index */
} seg;

#define PATH_TEXT_MAX 400 /* a longer path keeps its tail: "$...x.y" */
#define KEY_TEXT_MAX 64   /* a longer key is cut with "..." */

static bool is_path_ident(const char *k, size_t n)
{
    if (n == 0 || n > KEY_TEXT_MAX || (k[0] >= '0' && k[0] <= '9'))
        return false;
    for (size_t i = 0; i < n; i++) {
        char c = k[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
              (c >= '0' && c <= '9') || c == '_' || c == '$'))
            return false;
    }
    return true;
}

/* One segment as ".name", "['other key']" or "[3]"; returns its length. */
static size_t seg_text(char *out, size_t size, const seg *s)
{
    size_t o = 0, i = 0;

    if (s->key == NULL)
        return (size_t)snprintf(out, size, "[%zu]", s->n);
    if (is_path_ident(s->key, s->n))
        return (size_t)snprintf(out, size, ".%.*s", (int)s->n, s->key);
    assert(size >= KEY_TEXT_MAX * 4 + 8);
    out[o++] = '[';
    out[o++] = '\'';
    while (i < s->n && i < KEY_TEXT_MAX) {
        unsigned char c = (unsigned char)s->key[i];
        if (c == '\'' || c == '\\') {
            out[o++] = '\\';
            out[o++] = (char)c;
        } else if (c < 0x20 || c == 0x7f) {
            o += (size_t)snprintf(out + o, size - o, "\\x%02x", c);
        } else {
            out[o++] = (char)c;
        }
        i++;
    }
    if (i < s->n) {
        /* Cut at a character boundary (keys are valid UTF-8). */
        while (o > 2 && (out[o - 1] & 0xc0) == 0x80)
            o--;
        if (o > 2 && (unsigned char)out[o - 1] >= 0xc0)
            o--;
        memcpy(out + o, "...", 3);
        o += 3;
    }
    out[o++] = '\'';
    out[o++] = ']';
    out[o] = '\0';
    return o;
}

typedef struct path_text {
    char s[PATH_TEXT_MAX + 8];
} path_text;

/* The path of leaf from "$", tail kept when long.  Returned by value so a
 * message can write pathstr(at).s in its argument list. */
static path_text pathstr(const seg *leaf)
{
    path_text p;
    char tmp[PATH_TEXT_MAX], one[KEY_TEXT_MAX * 4 + 8];
    size_t pos = sizeof tmp, n;
    bool elided = false;

    tmp[--pos] = '\0';
    for (const seg *s = leaf; s != NULL; s = s->up) {
        n = seg_text(one, sizeof one, s);
        if (n >= pos) {
            elided = true;
            break;
        }
        pos -= n;
        memcpy(tmp + pos, one, n);
    }
    snprintf(p.s, sizeof p.s, "$%s%s", elided ? "..." : "", tmp + pos);
    return p;
}

/* ---- the compiled form ------------------------------------------------- */

typedef struct strv {
    const char *s;
    size_t n;
} strv;

enum { L_NULL = 1, L_TRUE = 2, L_FALSE = 4 };

/* The values an enum or const allows. */
typedef struct vset {
    strv *strs; /* sorted by key_cmp */
    size_t nstrs;
    num *nums; /* sorted by num_cmp */
    size_t nnums;
    const json_t **others; /* arrays and objects */
    size_t nothers;
    unsigned lits;     /* L_* */
    const json_t *src; /* the enum array or the const value, for messages */
    bool is_const;
} vset;

typedef struct pattern {
    regex_t re;
    const char *src; /* as written, for messages */
    size_t len;
} pattern;

enum { F_NONE, F_DATE_TIME, F_UUID };
enum { B_MIN, B_XMIN, B_MAX, B_XMAX, B_COUNT };
static const char *const bound_kw[B_COUNT] = {"minimum", "exclusiveMinimum",
                                              "maximum", "exclusiveMaximum"};
static const char *const bound_op[B_COUNT] = {">=", ">", "<=", "<"};

typedef struct node node;

typedef struct prop {
    const char *name;
    size_t len;
    node *schema;
    bool required;
} prop;

struct node {
    node *next_alloc; /* every node of a schema, for freeing */
    unsigned types;   /* T_* bits; 0 allows every type */
    bool never;       /* the schema `false` */
    bool additional;  /* additionalProperties (objects only) */
    node *ref;        /* $ref: this node stands for that one */
    vset *vals;       /* enum or const, or NULL */
    /* strings */
    uint64_t min_len, max_len; /* code points; max UINT64_MAX if absent */
    int format;
    pattern *pat;
    /* numbers */
    unsigned bounds; /* 1 << B_* for each bound given */
    num bound[B_COUNT];
    /* arrays */
    node *items; /* NULL: any element */
    uint64_t min_items, max_items;
    /* objects */
    prop *props; /* as declared */
    size_t nprops;
    uint32_t *by_name; /* indexes into props, sorted by name */
    strv *required;    /* as listed */
    size_t nrequired;
    size_t nrequired_declared; /* how many of them props declares */
    /* compiling only */
    const char *def_name; /* set on a $defs entry, for cycle messages */
    int mark;             /* 0 unvisited, 1 on the DFS path, 2 done */
    int height;           /* levels from here down, through $ref */
};

typedef struct def {
    const char *name;
    size_t len;
    node *n;
} def;

struct de__schema {
    json_t *doc;
    const node *top;
    node *nodes;
    def *defs; /* sorted by name */
    size_t ndefs;
    const char *id;
    char *canonical;
};

/* ---- formats ------------------------------------------------------------ */

static int digits(const char *s, int n)
{
    int v = 0;

    for (int i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9')
            return -1;
        v = v * 10 + (s[i] - '0');
    }
    return v;
}

static int days_in_month(int y, int m)
{
    static const int days[12] = {31, 28, 31, 30, 31, 30,
                                 31, 31, 30, 31, 30, 31};
    bool leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;

    return m == 2 && leap ? 29 : days[m - 1];
}

/*
 * RFC 3339 section 5.6 date-time: "YYYY-MM-DDTHH:MM:SS[.frac](Z|+HH:MM)",
 * 'T' and 'Z' in either case, a real calendar date, and a leap second
 * (:60) only where it can occur: at 23:59 UTC once the offset is applied
 * (as the JSON Schema test suite reads it).
 */
static bool is_date_time(const char *s, size_t n)
{
    int y, mo, d, h, mi, sec, off = 0, oh, om;
    size_t i = 19;

    if (n < 20 || s[4] != '-' || s[7] != '-' ||
        (s[10] != 'T' && s[10] != 't') || s[13] != ':' || s[16] != ':')
        return false;
    y = digits(s, 4);
    mo = digits(s + 5, 2);
    d = digits(s + 8, 2);
    h = digits(s + 11, 2);
    mi = digits(s + 14, 2);
    sec = digits(s + 17, 2);
    if (y < 0 || mo < 1 || mo > 12 || d < 1 || d > days_in_month(y, mo) ||
        h < 0 || h > 23 || mi < 0 || mi > 59 || sec < 0 || sec > 60)
        return false;
    if (s[i] == '.') {
        size_t start = ++i;
        while (i < n && s[i] >= '0' && s[i] <= '9')
            i++;
        if (i == start)
            return false;
    }
    if (i < n && (s[i] == 'Z' || s[i] == 'z')) {
        i++;
    } else if (i < n && (s[i] == '+' || s[i] == '-')) {
        if (n - i != 6 || s[i + 3] != ':')
            return false;
        oh = digits(s + i + 1, 2);
        om = digits(s + i + 4, 2);
        if (oh < 0 || oh > 23 || om < 0 || om > 59)
            return false;
        off = (s[i] == '+' ? 1 : -1) * (oh * 60 + om);
        i += 6;
    } else {
        return false;
    }
    if (i != n)
        return false;
    if (sec == 60 && ((h * 60 + mi - off) % 1440 + 1440) % 1440 != 23 * 60 + 59)
        return false;
    return true;
}

/* RFC 9562 (4122) text form: 8-4-4-4-12 hex digits, either case, any
 * version and variant (as JSON Schema's "uuid" format). */
static bool is_uuid(const char *s, size_t n)
{
    if (n != 36)
        return false;
    for (size_t i = 0; i < 36; i++) {
        char c = s[i];
        if (i == 8 || i == 13 || i == 18 || i == 23) {
            if (c != '-')
                return false;
        } else if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') ||
                     (c >= 'A' && c <= 'F'))) {
            return false;
        }
    }
    return true;
}

/* ---- patterns ------------------------------------------------------------ */

/*
 * Patterns are POSIX extended regular expressions run by glibc in the
 * C.UTF-8 locale, whatever locale the host set: so "." is one code point
 * and ranges are code point ranges.  The locale is made once and never
 * freed.
 */
static pthread_once_t utf8_once = PTHREAD_ONCE_INIT;
static locale_t utf8_locale;

static void utf8_locale_init(void)
{
    utf8_locale =
        newlocale(LC_CTYPE_MASK | LC_COLLATE_MASK, "C.UTF-8", (locale_t)0);
}

/* "contract schema: 'pattern' at <path> <why>: '<pattern>'" */
static de_err pattern_fail(const seg *at, const char *p, size_t n,
                           const char *fmt, ...) DE__PRINTF(4, 5);

static de_err pattern_fail(const seg *at, const char *p, size_t n,
                           const char *fmt, ...)
{
    char why[256], q[DE__QUOTE_MAX];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(why, sizeof why, fmt, ap);
    va_end(ap);
    return de__fail(DE_ERR_CONTRACT, "contract schema: 'pattern' at %s %s: %s",
                    pathstr(at).s, why, de__quote(q, sizeof q, p, n));
}

/* A top-level alternative of a pattern: p[start..end), and whether it
 * starts with '^'. */
typedef struct alt {
    size_t start, end;
    bool anchored;
} alt;

#define ALTS_MAX (DE__PATTERN_MAX / 2 + 1)

/*
 * Refuses what glibc would accept with a meaning other than the author's
 * or at a cost we do not bound: back-references (they need backtracking),
 * escapes other than of punctuation (glibc reads "\d" as "d"), a backslash
 * in a bracket expression (literal in POSIX), "(?" groups, unbalanced
 * parentheses (the pattern is wrapped in a group), anchors other than '^'
 * first and '$' last in a top-level alternative (see pattern_compile), and
 * patterns that expand to more than DE__PATTERN_SIZE_MAX positions once
 * {m,n} is unrolled (glibc compiles {m,n} as copies, in time superlinear
 * in their number).  The syntax itself is left to regcomp.  Fills alts
 * with the top-level alternatives.
 */
static de_err pattern_scan(const seg *at, const char *p, size_t n, alt *alts,
                           size_t *nalts)
{
    /* One frame per open group: positions so far, and the last atom's
     * size (what a quantifier multiplies). */
    struct {
        uint64_t sum, last;
    } fr[DE__PATTERN_MAX / 2 + 2];
    int top = 0;
    size_t i = 0;
    static const char hints[] = "dDwWsS";
    static const char *const hint_text[] = {"[0-9]",        "[^0-9]",
                                            "[A-Za-z0-9_]", "[^A-Za-z0-9_]",
                                            "[[:space:]]",  "[^[:space:]]"};

    fr[0].sum = fr[0].last = 0;
    *nalts = 1;
    alts[0].start = 0;
    alts[0].anchored = n > 0 && p[0] == '^';
    while (i < n) {
        unsigned char c = (unsigned char)p[i];
        uint64_t atom = 0;
        switch (c) {
        case '\\': {
            unsigned char e = i + 1 < n ? (unsigned char)p[i + 1] : 0;
            const char *h = e ? strchr(hints, e) : NULL;
            if (e == 0)
                return pattern_fail(at, p, n, "ends with a lone backslash");
            if (e >= '1' && e <= '9')
                return pattern_fail(at, p, n,
                                    "uses the back-reference '\\%c', which "
                                    "is not supported (it needs a "
                                    "backtracking matcher)",
                                    e);
            if (h != NULL)
                return pattern_fail(at, p, n,
                                    "uses '\\%c', which POSIX ERE does not "
                                    "have; write %s",
                                    e, hint_text[h - hints]);
            if (strchr(".[](){}*+?^$|\\/-", e) == NULL)
                return pattern_fail(at, p, n,
                                    "escapes a character that is not "
                                    "punctuation (at byte %zu); POSIX ERE "
                                    "only escapes .[](){}*+?^$|\\ (plus / "
                                    "and -)",
                                    i);
            atom = 1;
            i += 2;
            break;
        }
        case '[': {
            size_t j = i + 1;
            if (j < n && p[j] == '^')
                j++;
            if (j < n && p[j] == ']')
                j++; /* a literal ']' first */
            for (;;) {
                if (j >= n)
                    return pattern_fail(at, p, n,
                                        "has an unterminated bracket "
                                        "expression");
                if (p[j] == ']')
                    break;
                if (p[j] == '\\')
                    return pattern_fail(at, p, n,
                                        "has a backslash inside a bracket "
                                        "expression, where POSIX ERE reads "
                                        "it literally; put ']' first and "
                                        "'-' last instead of escaping them");
                if (p[j] == '[' && j + 1 < n &&
                    (p[j + 1] == '.' || p[j + 1] == '=')) {
                    return pattern_fail(at, p, n,
                                        "uses a collating element or "
                                        "equivalence class ('[%c'), which "
                                        "is not supported",
                                        p[j + 1]);
                }
                if (p[j] == '[' && j + 1 < n && p[j + 1] == ':') {
                    const char *end = NULL;
                    for (size_t k = j + 2; k + 1 < n; k++)
                        if (p[k] == ':' && p[k + 1] == ']') {
                            end = p + k;
                            break;
                        }
                    if (end == NULL)
                        return pattern_fail(at, p, n,
                                            "has an unterminated character "
                                            "class ('[:')");
                    j = (size_t)(end - p) + 2;
                    continue;
                }
                j++;
            }
            atom = 1;
            i = j + 1;
            break;
        }
        case '(':
            if (i + 1 < n && p[i + 1] == '?')
                return pattern_fail(at, p, n,
                                    "uses '(?', which POSIX ERE does not "
                                    "have (no non-capturing groups, "
                                    "lookaround or flags)");
            assert(top + 1 < (int)DE__ARRAY_LEN(fr));
            top++;
            fr[top].sum = fr[top].last = 0;
            i++;
            break;
        case ')':
            if (top == 0)
                return pattern_fail(at, p, n, "has an unmatched ')'");
            atom = fr[top].sum ? fr[top].sum : 1;
            top--;
            i++;
            break;
        case '|':
            fr[top].last = 0;
            if (top == 0) {
                assert(*nalts < ALTS_MAX);
                alts[*nalts - 1].end = i;
                alts[*nalts].start = i + 1;
                alts[(*nalts)++].anchored = i + 1 < n && p[i + 1] == '^';
            }
            i++;
            break;
        case '+':
            /* glibc compiles x+ as x x*. */
            fr[top].sum += fr[top].last;
            fr[top].last *= 2;
            i++;
            break;
        case '{': {
            size_t j = i + 1;
            uint64_t lo = 0, hi;
            bool has_lo = false, open = false;
            while (j < n && p[j] >= '0' && p[j] <= '9' && lo <= 100000) {
                lo = lo * 10 + (uint64_t)(p[j++] - '0');
                has_lo = true;
            }
            hi = lo;
            if (j < n && p[j] == ',') {
                j++;
                open = true;
                if (j < n && p[j] >= '0' && p[j] <= '9') {
                    open = false;
                    hi = 0;
                    while (j < n && p[j] >= '0' && p[j] <= '9' && hi <= 100000)
                        hi = hi * 10 + (uint64_t)(p[j++] - '0');
                }
            }
            if (j >= n || p[j] != '}') {
                /* Not an interval; regcomp refuses it. */
                atom = 1;
                i++;
                break;
            }
            if (!has_lo)
                return pattern_fail(at, p, n,
                                    "has an interval without a lower bound "
                                    "('{,'); write {0,n}");
            if (lo > DE__PATTERN_REPEAT_MAX || hi > DE__PATTERN_REPEAT_MAX)
                return pattern_fail(at, p, n,
                                    "repeats up to %llu times, over the "
                                    "limit of %d",
                                    (unsigned long long)(hi > lo ? hi : lo),
                                    DE__PATTERN_REPEAT_MAX);
            if (open)
                hi = lo + 1; /* x{m,} is m copies and a star */
            if (hi == 0)
                hi = 1;
            fr[top].sum += fr[top].last * (hi - 1);
            fr[top].last *= hi;
            i = j + 1;
            break;
        }
        case '^':
            if (top != 0 || i != alts[*nalts - 1].start)
                return pattern_fail(at, p, n,
                                    "uses '^' inside (at byte %zu); an "
                                    "anchor may only start the pattern or "
                                    "a top-level alternative, e.g. "
                                    "'^(a|b)c'",
                                    i);
            i++;
            break;
        case '$':
            if (top != 0 || (i + 1 < n && p[i + 1] != '|'))
                return pattern_fail(at, p, n,
                                    "uses '$' inside (at byte %zu); an "
                                    "anchor may only end the pattern or a "
                                    "top-level alternative, e.g. "
                                    "'a(b|c)$'",
                                    i);
            i++;
            break;
        case '*':
        case '?': i++; break;
        default:
            /* One position per character, not per UTF-8 byte. */
            if ((c & 0xc0) != 0x80)
                atom = 1;
            i++;
            break;
        }
        if (atom) {
            fr[top].sum += atom;
            fr[top].last = atom;
        }
        /* Checked at every step, so no sum can overflow. */
        for (int k = 0; k <= top; k++)
            if (fr[k].sum > DE__PATTERN_SIZE_MAX)
                return pattern_fail(at, p, n,
                                    "expands to more than %d positions "
                                    "once its repetitions are unrolled; "
                                    "simplify it",
                                    DE__PATTERN_SIZE_MAX);
    }
    if (top != 0)
        return pattern_fail(at, p, n, "has an unmatched '('");
    alts[*nalts - 1].end = n;
    return DE_OK;
}

/*
 * JSON Schema searches: a pattern matches if it matches anywhere.  glibc's
 * regexec searches by trying each start position in turn, which is
 * quadratic in the subject ("(.*a){20}b" took 3 s on 8 KiB).  So the
 * pattern is compiled anchored, where the automaton tries every start in
 * one pass: "^(.|[^.])*(P)".  (.|[^.]) is any character, NUL included
 * ("." alone excludes NUL).
 *
 * Anchors need care: glibc's automaton takes the place after a consumed
 * newline for a line start even without REG_NEWLINE, so "^" behind that
 * prefix would match after "\n".  pattern_scan allows '^' only at the
 * start of a top-level alternative (anywhere else it could only match
 * after an empty prefix anyway), and those alternatives are compiled
 * apart, where nothing comes before them: "^(A1|A2)|^(.|[^.])*(U1|U2)".
 */
static const char search_prefix[] = "^(.|[^.])*(";

/* Appends the alternatives of p with anchored == which, '|'-separated. */
static size_t join_alts(char *out, const char *p, const alt *alts, size_t nalts,
                        bool which)
{
    size_t o = 0;

    for (size_t i = 0; i < nalts; i++) {
        if (alts[i].anchored != which)
            continue;
        if (o > 0)
            out[o++] = '|';
        memcpy(out + o, p + alts[i].start, alts[i].end - alts[i].start);
        o += alts[i].end - alts[i].start;
    }
    return o;
}

static de_err pattern_compile(const seg *at, const json_t *v, pattern **out)
{
    const char *p = json_string_value(v);
    size_t n = json_string_length(v), nalts, o = 0, nanch = 0;
    alt alts[ALTS_MAX];
    pattern *pat = NULL;
    char *full = NULL, msg[128];
    locale_t old;
    de_err err;
    int rc;

    *out = NULL;
    if (n > DE__PATTERN_MAX)
        return pattern_fail(at, p, n, "is %zu bytes, over the limit of %d", n,
                            DE__PATTERN_MAX);
    if ((err = pattern_scan(at, p, n, alts, &nalts)) != DE_OK)
        return err;
    pthread_once(&utf8_once, utf8_locale_init);
    if (utf8_locale == (locale_t)0)
        return pattern_fail(at, p, n,
                            "cannot be compiled: the C.UTF-8 locale is not "
                            "available (glibc 2.35 or later has it built "
                            "in)");
    for (size_t i = 0; i < nalts; i++)
        nanch += alts[i].anchored;
    pat = calloc(1, sizeof *pat);
    full = malloc(n + sizeof search_prefix + 8);
    if (pat == NULL || full == NULL) {
        err = de__fail(DE_ERR_NOMEM, "out of memory compiling a pattern");
        goto fail;
    }
    if (nanch > 0) {
        memcpy(full, "^(", 2);
        o = 2 + join_alts(full + 2, p, alts, nalts, true);
        full[o++] = ')';
    }
    if (nanch < nalts) {
        if (o > 0)
            full[o++] = '|';
        memcpy(full + o, search_prefix, sizeof search_prefix - 1);
        o += sizeof search_prefix - 1;
        o += join_alts(full + o, p, alts, nalts, false);
        full[o++] = ')';
    }
    full[o] = '\0';
    old = uselocale(utf8_locale);
    rc = regcomp(&pat->re, full, REG_EXTENDED | REG_NOSUB);
    uselocale(old);
    if (rc != 0) {
        regerror(rc, &pat->re, msg, sizeof msg);
        err = rc == REG_ESPACE
                  ? de__fail(DE_ERR_NOMEM, "out of memory compiling a pattern")
                  : pattern_fail(at, p, n,
                                 "is not a valid POSIX extended regular "
                                 "expression (%s)",
                                 msg);
        goto fail;
    }
    free(full);
    pat->src = p;
    pat->len = n;
    *out = pat;
    return DE_OK;
fail:
    free(full);
    free(pat);
    return err;
}

static void pattern_free(pattern *pat)
{
    if (pat == NULL)
        return;
    regfree(&pat->re);
    free(pat);
}

/* 1 on a match, 0 on none, -1 when the engine ran out of memory. */
static int pattern_match(const pattern *pat, const char *s, size_t n)
{
    /* REG_STARTEND: the subject's length is given, so a NUL inside it is
     * a character like any other. */
    regmatch_t m[1] = {{0, (regoff_t)n}};
    locale_t old = uselocale(utf8_locale);
    int rc = regexec(&pat->re, s, 0, m, REG_STARTEND);

    uselocale(old);
    return rc == 0 ? 1 : rc == REG_NOMATCH ? 0 : -1;
}

/* A bound or enum number as a message shows it. */
static const char *num_text(char *buf, size_t size, const num *x)
{
    if (x->is_int)
        snprintf(buf, size, "%" JSON_INTEGER_FORMAT, x->i);
    else
        format_real(buf, size, x->d);
    return buf;
}

#define NUM_TEXT(x) num_text((char[DE__QUOTE_MAX]){0}, DE__QUOTE_MAX, (x))

/* ---- compiling ------------------------------------------------------------
 */

enum kw {
    K_SCHEMA,
    K_ID,
    K_DEFS,
    K_REF,
    K_TYPE,
    K_PROPERTIES,
    K_REQUIRED,
    K_ADDITIONAL,
    K_ENUM,
    K_CONST,
    K_MINLENGTH,
    K_MAXLENGTH,
    K_PATTERN,
    K_FORMAT,
    K_MINIMUM,
    K_XMINIMUM,
    K_MAXIMUM,
    K_XMAXIMUM,
    K_ITEMS,
    K_MINITEMS,
    K_MAXITEMS,
    K_DESCRIPTION,
    K_TITLE,
    K_EXAMPLES,
    K_DEPRECATED,
    K_COUNT
};

static const char *const kw_names[K_COUNT] = {
    [K_SCHEMA] = "$schema",
    [K_ID] = "$id",
    [K_DEFS] = "$defs",
    [K_REF] = "$ref",
    [K_TYPE] = "type",
    [K_PROPERTIES] = "properties",
    [K_REQUIRED] = "required",
    [K_ADDITIONAL] = "additionalProperties",
    [K_ENUM] = "enum",
    [K_CONST] = "const",
    [K_MINLENGTH] = "minLength",
    [K_MAXLENGTH] = "maxLength",
    [K_PATTERN] = "pattern",
    [K_FORMAT] = "format",
    [K_MINIMUM] = "minimum",
    [K_XMINIMUM] = "exclusiveMinimum",
    [K_MAXIMUM] = "maximum",
    [K_XMAXIMUM] = "exclusiveMaximum",
    [K_ITEMS] = "items",
    [K_MINITEMS] = "minItems",
    [K_MAXITEMS] = "maxItems",
    [K_DESCRIPTION] = "description",
    [K_TITLE] = "title",
    [K_EXAMPLES] = "examples",
    [K_DEPRECATED] = "deprecated",
};

/* Which instance type each type-specific keyword applies to. */
static unsigned kw_applies_to(enum kw k)
{
    switch (k) {
    case K_PROPERTIES:
    case K_REQUIRED:
    case K_ADDITIONAL: return T_OBJECT;
    case K_MINLENGTH:
    case K_MAXLENGTH:
    case K_PATTERN:
    case K_FORMAT: return T_STRING;
    case K_MINIMUM:
    case K_XMINIMUM:
    case K_MAXIMUM:
    case K_XMAXIMUM: return T_NUMBER | T_INTEGER;
    case K_ITEMS:
    case K_MINITEMS:
    case K_MAXITEMS: return T_ARRAY;
    default: return 0;
    }
}

static bool kw_is_annotation(enum kw k)
{
    return k == K_DESCRIPTION || k == K_TITLE || k == K_EXAMPLES ||
           k == K_DEPRECATED;
}

typedef struct cc {
    de__schema *s;
} cc;

/* "contract schema: '<kw>' at <path> <rest>" */
static de_err kfail(const seg *at, enum kw k, const char *fmt, ...)
    DE__PRINTF(3, 4);

static de_err kfail(const seg *at, enum kw k, const char *fmt, ...)
{
    char rest[640];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(rest, sizeof rest, fmt, ap);
    va_end(ap);
    return de__fail(DE_ERR_CONTRACT, "contract schema: '%s' at %s %s",
                    kw_names[k], pathstr(at).s, rest);
}

static de_err nomem(void)
{
    return de__fail(DE_ERR_NOMEM, "out of memory compiling a contract schema");
}

static node *new_node(cc *c)
{
    node *n = calloc(1, sizeof *n);

    if (n == NULL)
        return NULL;
    n->max_len = UINT64_MAX;
    n->max_items = UINT64_MAX;
    n->next_alloc = c->s->nodes;
    c->s->nodes = n;
    return n;
}

static bool type_allows(unsigned types, const json_t *v);

/* A non-negative integer keyword (2.0 counts: 2020-12 integers). */
static de_err get_count(const seg *at, enum kw k, const json_t *v,
                        uint64_t *out)
{
    if (json_is_integer(v) && json_integer_value(v) >= 0) {
        *out = (uint64_t)json_integer_value(v);
        return DE_OK;
    }
    if (json_is_real(v) && json_real_value(v) >= 0 &&
        json_real_value(v) <= 9007199254740992.0 &&
        real_is_integral(json_real_value(v))) {
        *out = (uint64_t)json_real_value(v);
        return DE_OK;
    }
    return kfail(at, k, "must be a non-negative integer, got %s", DESCRIBE(v));
}

static de_err compile_types(const seg *at, const json_t *v, unsigned *out)
{
    const json_t *e;
    size_t i, t;

    *out = 0;
    if (json_is_string(v) || json_is_array(v)) {
        size_t count = json_is_array(v) ? json_array_size(v) : 1;
        if (count == 0)
            return kfail(at, K_TYPE, "must not be an empty array");
        for (i = 0; i < count; i++) {
            e = json_is_array(v) ? json_array_get(v, i) : v;
            for (t = 0; t < DE__ARRAY_LEN(type_names); t++)
                if (json_is_string(e) &&
                    strcmp(json_string_value(e), type_names[t].name) == 0)
                    break;
            if (t == DE__ARRAY_LEN(type_names))
                return kfail(at, K_TYPE,
                             "must name object, array, string, integer, "
                             "number, boolean or null, got %s",
                             DESCRIBE(e));
            if (*out & type_names[t].bit)
                return kfail(at, K_TYPE, "lists %s twice", DESCRIBE(e));
            *out |= type_names[t].bit;
        }
        return DE_OK;
    }
    return kfail(at, K_TYPE, "must be a type name or an array of them, got %s",
                 DESCRIBE(v));
}

static int strv_cmp(const void *a, const void *b)
{
    const strv *x = a, *y = b;

    return key_cmp(x->s, x->n, y->s, y->n);
}

static int num_qcmp(const void *a, const void *b)
{
    return num_cmp(a, b);
}

static void vset_free(vset *vs)
{
    if (vs == NULL)
        return;
    free(vs->strs);
    free(vs->nums);
    free(vs->others);
    free(vs);
}

/* The first value of an enum array equal to an earlier one (only called
 * once a duplicate is known, so the quadratic scan is on the error path,
 * and it names the same value whatever order qsort left). */
static const json_t *first_repeat(const json_t *list)
{
    for (size_t i = 1; i < json_array_size(list); i++)
        for (size_t j = 0; j < i; j++)
            if (same_value(json_array_get(list, j), json_array_get(list, i)))
                return json_array_get(list, i);
    return NULL;
}

/* enum (list, an array) or const (one value): split by kind and sorted,
 * each value allowed by the schema's type, none listed twice. */
static de_err compile_vset(const seg *at, enum kw k, const json_t *src,
                           unsigned types, vset **out)
{
    bool is_const = k == K_CONST;
    size_t count = is_const ? 1 : json_array_size(src), i, j;
    vset *vs;
    de_err err;

    *out = NULL;
    if (!is_const) {
        if (!json_is_array(src))
            return kfail(at, k, "must be an array, got %s", DESCRIBE(src));
        if (count == 0)
            return kfail(at, k,
                         "must list at least one value (an empty enum "
                         "allows nothing)");
        if (count > DE__SCHEMA_ENUM_MAX)
            return kfail(at, k, "has %zu values, over the limit of %d", count,
                         DE__SCHEMA_ENUM_MAX);
    }
    vs = calloc(1, sizeof *vs);
    if (vs == NULL)
        return nomem();
    vs->src = src;
    vs->is_const = is_const;
    vs->strs = calloc(count, sizeof *vs->strs);
    vs->nums = calloc(count, sizeof *vs->nums);
    vs->others = calloc(count, sizeof *vs->others);
    if (vs->strs == NULL || vs->nums == NULL || vs->others == NULL) {
        err = nomem();
        goto fail;
    }
    for (i = 0; i < count; i++) {
        const json_t *v = is_const ? src : json_array_get(src, i);
        unsigned lit = 0;
        if (types != 0 && !type_allows(types, v)) {
            err = kfail(at, k,
                        "%s %s, which 'type' does not allow (it could "
                        "never be accepted)",
                        is_const ? "is" : "lists", DESCRIBE(v));
            goto fail;
        }
        switch (json_typeof(v)) {
        case JSON_STRING:
            vs->strs[vs->nstrs].s = json_string_value(v);
            vs->strs[vs->nstrs++].n = json_string_length(v);
            break;
        case JSON_INTEGER:
        case JSON_REAL: vs->nums[vs->nnums++] = num_of(v); break;
        case JSON_NULL: lit = L_NULL; break;
        case JSON_TRUE: lit = L_TRUE; break;
        case JSON_FALSE: lit = L_FALSE; break;
        default:
            for (j = 0; j < vs->nothers; j++)
                if (same_value(vs->others[j], v))
                    break;
            if (j < vs->nothers) {
                err = kfail(at, k, "lists %s twice", DESCRIBE(v));
                goto fail;
            }
            vs->others[vs->nothers++] = v;
            break;
        }
        if (lit & vs->lits) {
            err = kfail(at, k, "lists %s twice", DESCRIBE(v));
            goto fail;
        }
        vs->lits |= lit;
    }
    qsort(vs->strs, vs->nstrs, sizeof *vs->strs, strv_cmp);
    qsort(vs->nums, vs->nnums, sizeof *vs->nums, num_qcmp);
    for (i = 1; i < vs->nstrs || i < vs->nnums; i++)
        if ((i < vs->nstrs && strv_cmp(&vs->strs[i - 1], &vs->strs[i]) == 0) ||
            (i < vs->nnums && num_cmp(&vs->nums[i - 1], &vs->nums[i]) == 0)) {
            const json_t *again = first_repeat(src);
            assert(again != NULL);
            err = kfail(at, k, "lists %s twice%s", DESCRIBE(again),
                        json_is_number(again)
                            ? " (numbers compare by value: 1 and 1.0 are "
                              "equal)"
                            : "");
            goto fail;
        }
    *out = vs;
    return DE_OK;
fail:
    vset_free(vs);
    return err;
}

static int def_cmp(const void *a, const void *b)
{
    const def *x = a, *y = b;

    return key_cmp(x->name, x->len, y->name, y->len);
}

static const def *find_def(const de__schema *s, const char *name, size_t len)
{
    size_t lo = 0, hi = s->ndefs;

    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = key_cmp(name, len, s->defs[mid].name, s->defs[mid].len);
        if (c == 0)
            return &s->defs[mid];
        if (c < 0)
            hi = mid;
        else
            lo = mid + 1;
    }
    return NULL;
}

static int hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* "#/$defs/<name>": the name is a JSON Pointer token (~0 is '~', ~1 is
 * '/') inside a URI fragment (%XX escapes). */
static de_err compile_ref(cc *c, const seg *at, const json_t *v, node *n)
{
    static const char prefix[] = "#/$defs/";
    const char *r = json_string_value(v);
    size_t len = json_string_length(v), o = 0;
    char *name = NULL;
    const def *d;
    de_err err;

    if (!json_is_string(v))
        return kfail(at, K_REF, "must be a string, got %s", DESCRIBE(v));
    if (len <= sizeof prefix - 1 || memcmp(r, prefix, sizeof prefix - 1) != 0)
        return kfail(at, K_REF,
                     "must be '#/$defs/<name>' (only local definitions are "
                     "supported), got %s",
                     DESCRIBE(v));
    name = malloc(len);
    if (name == NULL)
        return nomem();
    for (size_t i = sizeof prefix - 1; i < len; i++) {
        char ch = r[i];
        if (ch == '%') {
            int hi = i + 2 < len ? hexval(r[i + 1]) : -1;
            int lo = hi >= 0 ? hexval(r[i + 2]) : -1;
            if (lo < 0) {
                err = kfail(at, K_REF, "has a bad %%-escape: %s", DESCRIBE(v));
                goto fail;
            }
            ch = (char)(hi * 16 + lo);
            i += 2;
        }
        if (ch == '/') {
            err = kfail(at, K_REF,
                        "must name a definition itself ('#/$defs/<name>'), "
                        "not a place inside one: %s",
                        DESCRIBE(v));
            goto fail;
        }
        if (ch == '~') {
            char e = i + 1 < len ? r[i + 1] : 0;
            if (e != '0' && e != '1') {
                err = kfail(at, K_REF,
                            "has a '~' that is not ~0 or ~1 (JSON "
                            "Pointer): %s",
                            DESCRIBE(v));
                goto fail;
            }
            ch = e == '0' ? '~' : '/';
            i++;
        }
        name[o++] = ch;
    }
    d = find_def(c->s, name, o);
    if (d == NULL) {
        err = kfail(at, K_REF, "points to %s, which $defs does not define",
                    DESCRIBE(v));
        goto fail;
    }
    n->ref = d->n;
    free(name);
    return DE_OK;
fail:
    free(name);
    return err;
}

static de_err compile_schema(cc *c, const json_t *j, const seg *at, int depth,
                             node *n);

/* A subschema at `at`, one level below its parent. */
static de_err compile_child(cc *c, const json_t *j, const seg *at, int depth,
                            node **out)
{
    node *n = new_node(c);

    *out = n;
    if (n == NULL)
        return nomem();
    return compile_schema(c, j, at, depth, n);
}

static de_err compile_id(cc *c, const seg *at, const json_t *v)
{
    const char *id = json_string_value(v);
    size_t len = json_string_length(v);
    const char *hash;

    if (!json_is_string(v) || len == 0)
        return kfail(at, K_ID, "must be a non-empty URI string, got %s",
                     DESCRIBE(v));
    if (len > DE__SCHEMA_ID_MAX)
        return kfail(at, K_ID, "is %zu bytes, over the limit of %d: %s", len,
                     DE__SCHEMA_ID_MAX, DESCRIBE(v));
    /* RFC 3986 URI-reference characters, %XX escapes complete. */
    for (size_t i = 0; i < len; i++) {
        char ch = id[i];
        bool ok = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') ||
                  (ch >= '0' && ch <= '9') ||
                  (ch != '\0' && strchr("-._~:/?#[]@!$&'()*+,;=", ch));
        if (ch == '%')
            ok =
                i + 2 < len && hexval(id[i + 1]) >= 0 && hexval(id[i + 2]) >= 0;
        if (!ok)
            return kfail(at, K_ID,
                         "must be a URI reference (RFC 3986: no spaces or "
                         "other characters outside it), got %s",
                         DESCRIBE(v));
    }
    hash = memchr(id, '#', len);
    if (hash != NULL && hash != id + len - 1)
        return kfail(at, K_ID,
                     "must not have a fragment (draft 2020-12), got %s",
                     DESCRIBE(v));
    c->s->id = id;
    return DE_OK;
}

static de_err compile_defs(cc *c, const seg *at, const json_t *v)
{
    const char *k;
    size_t klen, i = 0;
    json_t *sub;
    de_err err;
    seg dseg = {at, "$defs", 5};

    if (!json_is_object(v))
        return kfail(at, K_DEFS, "must be an object of schemas, got %s",
                     DESCRIBE(v));
    c->s->ndefs = json_object_size(v);
    c->s->defs = calloc(c->s->ndefs ? c->s->ndefs : 1, sizeof *c->s->defs);
    if (c->s->defs == NULL)
        return nomem();
    /* Every entry exists before any is compiled, so that entries may
     * refer to each other in any order. */
    json_object_keylen_foreach((json_t *)(uintptr_t)v, k, klen, sub)
    {
        def *d = &c->s->defs[i++];
        d->name = k;
        d->len = klen;
        d->n = new_node(c);
        if (d->n == NULL)
            return nomem();
        d->n->def_name = k;
    }
    qsort(c->s->defs, c->s->ndefs, sizeof *c->s->defs, def_cmp);
    json_object_keylen_foreach((json_t *)(uintptr_t)v, k, klen, sub)
    {
        seg s = {&dseg, k, klen};
        node *n = find_def(c->s, k, klen)->n;
        if ((err = compile_schema(c, sub, &s, 2, n)) != DE_OK)
            return err;
    }
    return DE_OK;
}

static de_err compile_object_kws(cc *c, const json_t *const *kw, const seg *at,
                                 int depth, node *n)
{
    const json_t *v;
    const char *k;
    size_t klen, i;
    json_t *sub;
    de_err err;
    seg pseg = {at, "properties", 10};

    n->additional = false; /* this library's default: see CONTRACTS.md */
    if ((v = kw[K_ADDITIONAL]) != NULL) {
        if (!json_is_boolean(v))
            return kfail(at, K_ADDITIONAL,
                         "must be true or false (schemas are not "
                         "supported here), got %s",
                         DESCRIBE(v));
        n->additional = json_is_true(v);
    }
    if ((v = kw[K_PROPERTIES]) != NULL) {
        if (!json_is_object(v))
            return kfail(at, K_PROPERTIES,
                         "must be an object of schemas, got %s", DESCRIBE(v));
        n->nprops = json_object_size(v);
        n->props = calloc(n->nprops ? n->nprops : 1, sizeof *n->props);
        n->by_name = calloc(n->nprops ? n->nprops : 1, sizeof *n->by_name);
        if (n->props == NULL || n->by_name == NULL)
            return nomem();
        i = 0;
        json_object_keylen_foreach((json_t *)(uintptr_t)v, k, klen, sub)
        {
            seg s = {&pseg, k, klen};
            node *child;
            n->props[i].name = k;
            n->props[i].len = klen;
            n->by_name[i] = (uint32_t)i;
            if ((err = compile_child(c, sub, &s, depth + 1, &child)) != DE_OK)
                return err;
            n->props[i++].schema = child;
        }
        /* Insertion sort by name: compile time only, and it keeps the
         * code free of a qsort context. */
        for (i = 1; i < n->nprops; i++) {
            uint32_t x = n->by_name[i];
            size_t j = i;
            while (j > 0 && key_cmp(n->props[n->by_name[j - 1]].name,
                                    n->props[n->by_name[j - 1]].len,
                                    n->props[x].name, n->props[x].len) > 0) {
                n->by_name[j] = n->by_name[j - 1];
                j--;
            }
            n->by_name[j] = x;
        }
    }
    if ((v = kw[K_REQUIRED]) != NULL) {
        if (!json_is_array(v))
            return kfail(at, K_REQUIRED,
                         "must be an array of property names, got %s",
                         DESCRIBE(v));
        n->nrequired = json_array_size(v);
        n->required =
            calloc(n->nrequired ? n->nrequired : 1, sizeof *n->required);
        if (n->required == NULL)
            return nomem();
        for (i = 0; i < n->nrequired; i++) {
            const json_t *e = json_array_get(v, i);
            strv *r = &n->required[i];
            prop *p = NULL;
            if (!json_is_string(e))
                return kfail(at, K_REQUIRED,
                             "must list property names (strings), got %s",
                             DESCRIBE(e));
            r->s = json_string_value(e);
            r->n = json_string_length(e);
            for (size_t j = 0; j < i; j++)
                if (strv_cmp(r, &n->required[j]) == 0)
                    return kfail(at, K_REQUIRED, "lists %s twice", DESCRIBE(e));
            for (size_t j = 0; j < n->nprops; j++)
                if (key_cmp(r->s, r->n, n->props[j].name, n->props[j].len) == 0)
                    p = &n->props[j];
            if (p == NULL && !n->additional)
                return kfail(at, K_REQUIRED,
                             "lists %s, which 'properties' does not "
                             "declare; with additionalProperties false no "
                             "payload could ever satisfy this contract",
                             DESCRIBE(e));
            if (p != NULL && p->schema->never)
                return kfail(at, K_REQUIRED,
                             "lists %s, whose schema is false; no payload "
                             "could ever satisfy this contract",
                             DESCRIBE(e));
            if (p != NULL) {
                p->required = true;
                n->nrequired_declared++;
            }
        }
    }
    return DE_OK;
}

static de_err compile_string_kws(const json_t *const *kw, const seg *at,
                                 node *n)
{
    const json_t *v;
    de_err err;

    if (kw[K_MINLENGTH] != NULL &&
        (err = get_count(at, K_MINLENGTH, kw[K_MINLENGTH], &n->min_len)) !=
            DE_OK)
        return err;
    if (kw[K_MAXLENGTH] != NULL &&
        (err = get_count(at, K_MAXLENGTH, kw[K_MAXLENGTH], &n->max_len)) !=
            DE_OK)
        return err;
    if (n->min_len > n->max_len)
        return kfail(at, K_MINLENGTH,
                     "is %llu, over maxLength %llu; no string could ever "
                     "satisfy both",
                     (unsigned long long)n->min_len,
                     (unsigned long long)n->max_len);
    if ((v = kw[K_FORMAT]) != NULL) {
        const char *f = json_string_value(v);
        if (json_is_string(v) && strcmp(f, "date-time") == 0)
            n->format = F_DATE_TIME;
        else if (json_is_string(v) && strcmp(f, "uuid") == 0)
            n->format = F_UUID;
        else
            return kfail(at, K_FORMAT,
                         "must be \"date-time\" or \"uuid\" (the formats "
                         "this library checks), got %s",
                         DESCRIBE(v));
    }
    if ((v = kw[K_PATTERN]) != NULL) {
        if (!json_is_string(v))
            return kfail(at, K_PATTERN, "must be a string, got %s",
                         DESCRIBE(v));
        if ((err = pattern_compile(at, v, &n->pat)) != DE_OK)
            return err;
    }
    return DE_OK;
}

static de_err compile_number_kws(const json_t *const *kw, const seg *at,
                                 node *n)
{
    static const enum kw order[B_COUNT] = {K_MINIMUM, K_XMINIMUM, K_MAXIMUM,
                                           K_XMAXIMUM};
    int lo, hi;

    for (int b = 0; b < B_COUNT; b++) {
        const json_t *v = kw[order[b]];
        if (v == NULL)
            continue;
        if (!json_is_number(v))
            return kfail(at, order[b], "must be a number%s, got %s",
                         b == B_XMIN || b == B_XMAX
                             ? " (draft 2020-12 style, not a boolean)"
                             : "",
                         DESCRIBE(v));
        n->bound[b] = num_of(v);
        n->bounds |= 1u << b;
    }
    /* A lower bound above an upper one would refuse every number. */
    for (lo = B_MIN; lo <= B_XMIN; lo++)
        for (hi = B_MAX; hi <= B_XMAX; hi++) {
            int cmp;
            if (!(n->bounds & (1u << lo)) || !(n->bounds & (1u << hi)))
                continue;
            cmp = num_cmp(&n->bound[lo], &n->bound[hi]);
            if (cmp > 0 || (cmp == 0 && (lo == B_XMIN || hi == B_XMAX)))
                return kfail(at, order[lo],
                             "is %s but '%s' is %s; no number could ever "
                             "satisfy both",
                             NUM_TEXT(&n->bound[lo]), kw_names[order[hi]],
                             NUM_TEXT(&n->bound[hi]));
        }
    return DE_OK;
}

static de_err compile_array_kws(cc *c, const json_t *const *kw, const seg *at,
                                int depth, node *n)
{
    de_err err;
    seg iseg = {at, "items", 5};
    node *child;

    if (kw[K_MINITEMS] != NULL &&
        (err = get_count(at, K_MINITEMS, kw[K_MINITEMS], &n->min_items)) !=
            DE_OK)
        return err;
    if (kw[K_MAXITEMS] != NULL &&
        (err = get_count(at, K_MAXITEMS, kw[K_MAXITEMS], &n->max_items)) !=
            DE_OK)
        return err;
    if (n->min_items > n->max_items)
        return kfail(at, K_MINITEMS,
                     "is %llu, over maxItems %llu; no array could ever "
                     "satisfy both",
                     (unsigned long long)n->min_items,
                     (unsigned long long)n->max_items);
    if (kw[K_ITEMS] != NULL) {
        if (json_is_array(kw[K_ITEMS]))
            return kfail(at, K_ITEMS,
                         "must be one schema (the array form is "
                         "prefixItems, which is not supported)");
        if ((err = compile_child(c, kw[K_ITEMS], &iseg, depth + 1, &child)) !=
            DE_OK)
            return err;
        n->items = child;
    }
    return DE_OK;
}

static const char draft_2020_12[] =
    "https://json-schema.org/draft/2020-12/schema";

/* $schema naming draft 2020-12, with or without an empty fragment. */
static bool is_draft_2020_12(const json_t *v)
{
    const char *s = json_string_value(v);
    size_t n = sizeof draft_2020_12 - 1;

    return s != NULL && strncmp(s, draft_2020_12, n) == 0 &&
           (s[n] == '\0' || strcmp(s + n, "#") == 0);
}

/* Compiles schema j (at `at`, `depth` levels down, the top being 1) into
 * n, which the caller allocated. */
static de_err compile_schema(cc *c, const json_t *j, const seg *at, int depth,
                             node *n)
{
    const json_t *kw[K_COUNT] = {0};
    const char *k;
    json_t *v;
    bool top = depth == 1;
    de_err err;
    int i;

    if (depth > DE__SCHEMA_DEPTH_MAX)
        return de__fail(DE_ERR_CONTRACT,
                        "contract schema: the schema at %s is nested more "
                        "than %d levels deep",
                        pathstr(at).s, DE__SCHEMA_DEPTH_MAX);
    if (json_is_boolean(j) && !top) {
        n->never = json_is_false(j);
        return DE_OK;
    }
    if (!json_is_object(j))
        return de__fail(DE_ERR_CONTRACT,
                        "contract schema: the schema at %s must be a JSON "
                        "object%s, got %s",
                        pathstr(at).s, top ? "" : " or true/false",
                        DESCRIBE(j));
    json_object_foreach((json_t *)(uintptr_t)j, k, v)
    {
        for (i = 0; i < K_COUNT; i++)
            if (strcmp(k, kw_names[i]) == 0)
                break;
        if (i == K_COUNT)
            return de__fail(
                DE_ERR_CONTRACT,
                "contract schema: unsupported keyword %s at %s",
                de__quote((char[DE__QUOTE_MAX]){0}, DE__QUOTE_MAX, k, -1),
                pathstr(at).s);
        if (!top && (i == K_SCHEMA || i == K_ID || i == K_DEFS))
            return kfail(at, (enum kw)i,
                         "is only allowed at the top level of a contract");
        kw[i] = v;
    }

    /* Annotations: checked for type, otherwise ignored. */
    for (i = K_DESCRIPTION; i <= K_TITLE; i++)
        if (kw[i] != NULL && !json_is_string(kw[i]))
            return kfail(at, (enum kw)i, "must be a string, got %s",
                         DESCRIBE(kw[i]));
    if (kw[K_EXAMPLES] != NULL && !json_is_array(kw[K_EXAMPLES]))
        return kfail(at, K_EXAMPLES, "must be an array, got %s",
                     DESCRIBE(kw[K_EXAMPLES]));
    if (kw[K_DEPRECATED] != NULL && !json_is_boolean(kw[K_DEPRECATED]))
        return kfail(at, K_DEPRECATED, "must be true or false, got %s",
                     DESCRIBE(kw[K_DEPRECATED]));

    if (top) {
        if (kw[K_SCHEMA] != NULL && !is_draft_2020_12(kw[K_SCHEMA]))
            return kfail(at, K_SCHEMA,
                         "names %s; only draft 2020-12 (%s) is supported",
                         DESCRIBE(kw[K_SCHEMA]), draft_2020_12);
        if (kw[K_ID] != NULL && (err = compile_id(c, at, kw[K_ID])) != DE_OK)
            return err;
        if (kw[K_DEFS] != NULL &&
            (err = compile_defs(c, at, kw[K_DEFS])) != DE_OK)
            return err;
    }

    if (kw[K_REF] != NULL && top)
        return kfail(at, K_REF,
                     "cannot stand for the top level, which must say "
                     "\"type\": \"object\" itself");
    if (kw[K_REF] != NULL) {
        /* $ref with assertions beside it would combine two object schemas,
         * each with additionalProperties false by default: no payload
         * could satisfy both.  So $ref stands alone. */
        for (i = 0; i < K_COUNT; i++)
            if (kw[i] != NULL && i != K_REF && !kw_is_annotation((enum kw)i))
                return kfail(at, K_REF,
                             "cannot be combined with '%s' (only "
                             "description, title, examples and deprecated "
                             "may sit beside it)",
                             kw_names[i]);
        return compile_ref(c, at, kw[K_REF], n);
    }

    if (kw[K_TYPE] != NULL &&
        (err = compile_types(at, kw[K_TYPE], &n->types)) != DE_OK)
        return err;
    if (top && n->types != T_OBJECT)
        return de__fail(DE_ERR_CONTRACT,
                        "contract schema: the top level must say \"type\": "
                        "\"object\" (a payload is a JSON object), got %s",
                        kw[K_TYPE] ? DESCRIBE(kw[K_TYPE]) : "no 'type'");
    /* A type-specific keyword without its type would be skipped silently
     * by every other type ({"minLength": 3} accepts 42). */
    for (i = 0; i < K_COUNT; i++) {
        unsigned need = kw_applies_to((enum kw)i);
        if (kw[i] != NULL && need != 0 && !(n->types & need))
            return kfail(at, (enum kw)i,
                         "needs 'type' to include \"%s\" (it applies to "
                         "%s only, and any other value would skip it)",
                         need == T_OBJECT   ? "object"
                         : need == T_STRING ? "string"
                         : need == T_ARRAY  ? "array"
                                            : "number\" or \"integer",
                         need == T_OBJECT   ? "objects"
                         : need == T_STRING ? "strings"
                         : need == T_ARRAY  ? "arrays"
                                            : "numbers");
    }
    if (kw[K_CONST] != NULL && kw[K_ENUM] != NULL)
        return kfail(at, K_CONST,
                     "cannot be combined with 'enum' (use one of them)");
    for (i = K_ENUM; i <= K_CONST; i++)
        if (kw[i] != NULL && (err = compile_vset(at, (enum kw)i, kw[i],
                                                 n->types, &n->vals)) != DE_OK)
            return err;
    if ((err = compile_string_kws(kw, at, n)) != DE_OK)
        return err;
    if ((err = compile_number_kws(kw, at, n)) != DE_OK)
        return err;
    if ((err = compile_array_kws(c, kw, at, depth, n)) != DE_OK)
        return err;
    if ((n->types & T_OBJECT) &&
        (err = compile_object_kws(c, kw, at, depth, n)) != DE_OK)
        return err;
    return DE_OK;
}

/*
 * Walks the graph through $ref: refuses a cycle (a recursive contract
 * could only be checked by unbounded recursion) and nesting deeper than
 * DE__SCHEMA_DEPTH_MAX once $ref is followed.  Each node is measured once;
 * the walk itself never goes deeper than the limit.
 */
typedef struct walk {
    const node *path[DE__SCHEMA_DEPTH_MAX + 2]; /* $defs entries entered */
    int npath;
} walk;

/* "contract schema: <what>: #/$defs/a -> #/$defs/b [-> last]", the
 * $defs entries on the walk's path from `from` on. */
static de_err ref_chain_fail(const walk *w, int from, const node *last,
                             const char *what)
{
    char chain[512];
    size_t o = 0;

    chain[0] = '\0';
    for (int i = from; i < w->npath && o < sizeof chain - 80; i++)
        o += (size_t)snprintf(chain + o, sizeof chain - o, "%s#/$defs/%.64s",
                              o ? " -> " : "", w->path[i]->def_name);
    if (last != NULL && o < sizeof chain - 80)
        snprintf(chain + o, sizeof chain - o, "%s#/$defs/%.64s",
                 o ? " -> " : "", last->def_name);
    return de__fail(DE_ERR_CONTRACT, "contract schema: %s: %s", what, chain);
}

static de_err measure(walk *w, node *n, int level)
{
    node *kids[2];
    char what[128];
    int h = 0;
    de_err err;

    if (n->mark == 1) {
        /* Only a $ref leads back to a node on the path, and a $ref always
         * leads to a $defs entry, so n is on w->path. */
        int from = 0;
        for (int i = 0; i < w->npath; i++)
            if (w->path[i] == n)
                from = i;
        return ref_chain_fail(w, from, n,
                              "'$ref' makes a cycle (recursive contracts "
                              "are not supported)");
    }
    if ((n->mark == 2 && level - 1 + n->height > DE__SCHEMA_DEPTH_MAX) ||
        level > DE__SCHEMA_DEPTH_MAX) {
        snprintf(what, sizeof what,
                 "following '$ref' nests the schema more than %d levels "
                 "deep, through",
                 DE__SCHEMA_DEPTH_MAX);
        return ref_chain_fail(w, 0, n->def_name ? n : NULL, what);
    }
    if (n->mark == 2)
        return DE_OK;
    n->mark = 1;
    if (n->def_name != NULL)
        w->path[w->npath++] = n;
    kids[0] = n->ref;
    kids[1] = n->items;
    for (size_t i = 0; i < 2 + n->nprops; i++) {
        node *k = i < 2 ? kids[i] : n->props[i - 2].schema;
        if (k == NULL)
            continue;
        if ((err = measure(w, k, level + 1)) != DE_OK)
            return err;
        if (k->height > h)
            h = k->height;
    }
    if (n->def_name != NULL)
        w->npath--;
    n->mark = 2;
    n->height = h + 1;
    return DE_OK;
}

de_err de__schema_compile(const char *schema_json, size_t len, de__schema **out)
{
    de__schema *s = NULL;
    json_error_t jerr;
    cc c;
    walk w;
    node *top;
    de_err err;

    assert(out != NULL);
    *out = NULL;
    if (schema_json == NULL)
        return de__fail(DE_ERR_CONTRACT, "contract schema: missing (NULL)");
    if (len > DE__SCHEMA_MAX_BYTES)
        return de__fail(DE_ERR_CONTRACT,
                        "contract schema: %zu bytes, over the limit of %d", len,
                        DE__SCHEMA_MAX_BYTES);
    s = calloc(1, sizeof *s);
    if (s == NULL)
        return nomem();
    c.s = s;
    s->doc = json_loadb(schema_json, len, JSON_REJECT_DUPLICATES, &jerr);
    if (s->doc == NULL) {
        err = de__fail(DE_ERR_CONTRACT,
                       "contract schema: not valid JSON (%s at line %d, "
                       "column %d)",
                       jerr.text, jerr.line, jerr.column);
        goto fail;
    }
    top = new_node(&c);
    if (top == NULL) {
        err = nomem();
        goto fail;
    }
    s->top = top;
    if ((err = compile_schema(&c, s->doc, NULL, 1, top)) != DE_OK)
        goto fail;
    w.npath = 0;
    if ((err = measure(&w, top, 1)) != DE_OK)
        goto fail;
    /* Unused definitions too: a cycle is a mistake wherever it is. */
    for (size_t i = 0; i < s->ndefs; i++)
        if ((err = measure(&w, s->defs[i].n, 2)) != DE_OK)
            goto fail;
    s->canonical = json_dumps(s->doc, JSON_SORT_KEYS | JSON_COMPACT);
    if (s->canonical == NULL) {
        err = nomem();
        goto fail;
    }
    *out = s;
    return DE_OK;
fail:
    de__schema_free(s);
    return err;
}

const char *de__schema_id(const de__schema *s)
{
    return s->id;
}

const char *de__schema_canonical(const de__schema *s)
{
    return s->canonical;
}

void de__schema_free(de__schema *s)
{
    if (s == NULL)
        return;
    while (s->nodes != NULL) {
        node *n = s->nodes;
        s->nodes = n->next_alloc;
        vset_free(n->vals);
        pattern_free(n->pat);
        free(n->props);
        free(n->by_name);
        free(n->required);
        free(n);
    }
    free(s->defs);
    free(s->canonical);
    json_decref(s->doc);
    free(s);
}

/* ---- checking -------------------------------------------------------------
 */

static unsigned kind_of(const json_t *v)
{
    switch (json_typeof(v)) {
    case JSON_OBJECT: return T_OBJECT;
    case JSON_ARRAY: return T_ARRAY;
    case JSON_STRING: return T_STRING;
    case JSON_INTEGER: return T_INTEGER | T_NUMBER;
    case JSON_REAL:
        /* 2020-12: 1.0 is an integer. */
        return real_is_integral(json_real_value(v)) ? T_INTEGER | T_NUMBER
                                                    : T_NUMBER;
    case JSON_TRUE:
    case JSON_FALSE: return T_BOOLEAN;
    case JSON_NULL: return T_NULL;
    }
    return 0;
}

static bool type_allows(unsigned types, const json_t *v)
{
    return types == 0 || (types & kind_of(v)) != 0;
}

static bool vset_has(const vset *vs, const json_t *v)
{
    size_t lo = 0, hi;

    switch (json_typeof(v)) {
    case JSON_STRING: {
        strv key = {json_string_value(v), json_string_length(v)};
        return bsearch(&key, vs->strs, vs->nstrs, sizeof *vs->strs, strv_cmp) !=
               NULL;
    }
    case JSON_INTEGER:
    case JSON_REAL: {
        num key = num_of(v);
        hi = vs->nnums;
        while (lo < hi) {
            size_t mid = lo + (hi - lo) / 2;
            int c = num_cmp(&key, &vs->nums[mid]);
            if (c == 0)
                return true;
            if (c < 0)
                hi = mid;
            else
                lo = mid + 1;
        }
        return false;
    }
    case JSON_NULL: return (vs->lits & L_NULL) != 0;
    case JSON_TRUE: return (vs->lits & L_TRUE) != 0;
    case JSON_FALSE: return (vs->lits & L_FALSE) != 0;
    default:
        for (size_t i = 0; i < vs->nothers; i++)
            if (same_value(vs->others[i], v))
                return true;
        return false;
    }
}

typedef struct vctx {
    const char *label;
} vctx;

/* "<label>: <path> <rule>" */
static de_err vfail(const vctx *c, const seg *at, const char *fmt, ...)
    DE__PRINTF(3, 4);

static de_err vfail(const vctx *c, const seg *at, const char *fmt, ...)
{
    char rule[640];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(rule, sizeof rule, fmt, ap);
    va_end(ap);
    return de__fail(DE_ERR_CONTRACT, "%.200s: %s %s", c->label, pathstr(at).s,
                    rule);
}

static de_err fail_type(const vctx *c, const seg *at, unsigned types,
                        const json_t *v)
{
    char want[128];
    size_t o = 0, count = 0, i, seen = 0;

    if ((types & T_NUMBER) && (types & T_INTEGER))
        types &= ~(unsigned)T_INTEGER; /* "a number" says it */
    for (i = 0; i < DE__ARRAY_LEN(type_names); i++)
        count += (types & type_names[i].bit) != 0;
    want[0] = '\0';
    for (i = 0; i < DE__ARRAY_LEN(type_names); i++) {
        if (!(types & type_names[i].bit))
            continue;
        seen++;
        o += (size_t)snprintf(want + o, sizeof want - o, "%s%s",
                              seen == 1       ? ""
                              : seen == count ? " or "
                                              : ", ",
                              type_names[i].noun);
    }
    return vfail(c, at, "must be %s, got %s", want, DESCRIBE(v));
}

static de_err fail_vals(const vctx *c, const seg *at, const vset *vs,
                        const json_t *v)
{
    char list[240], q[DE__QUOTE_MAX];
    size_t o = 0, count, i;

    if (vs->is_const)
        return vfail(c, at, "must be %s (const), got %s",
                     describe(q, sizeof q, vs->src), DESCRIBE(v));
    count = json_array_size(vs->src);
    list[0] = '\0';
    for (i = 0; i < count; i++) {
        describe(q, sizeof q, json_array_get(vs->src, i));
        if (o + strlen(q) + 2 + 24 > sizeof list)
            break;
        o += (size_t)snprintf(list + o, sizeof list - o, "%s%s", i ? ", " : "",
                              q);
    }
    if (i < count)
        snprintf(list + o, sizeof list - o, ", ... (%zu values)", count);
    return vfail(c, at, "must be one of %s, got %s", list, DESCRIBE(v));
}

static de_err check(const vctx *c, const node *n, const json_t *v,
                    const seg *at);

static size_t count_code_points(const char *s, size_t len)
{
    size_t cps = 0;

    for (size_t i = 0; i < len; i++)
        cps += ((unsigned char)s[i] & 0xc0) != 0x80;
    return cps;
}

static de_err check_string(const vctx *c, const node *n, const json_t *v,
                           const seg *at)
{
    const char *s = json_string_value(v);
    size_t len = json_string_length(v);
    char q[DE__QUOTE_MAX];

    /* A code point takes 1 to 4 bytes: count only when the byte length
     * cannot decide. */
    if ((n->min_len != 0 && len / 4 < n->min_len) || len > n->max_len) {
        uint64_t cps = count_code_points(s, len);
        if (cps < n->min_len)
            return vfail(c, at,
                         "must be at least %llu characters long "
                         "(minLength), got %s (%llu)",
                         (unsigned long long)n->min_len,
                         de__quote(q, sizeof q, s, len),
                         (unsigned long long)cps);
        if (cps > n->max_len)
            return vfail(c, at,
                         "must be at most %llu characters long "
                         "(maxLength), got %s (%llu)",
                         (unsigned long long)n->max_len,
                         de__quote(q, sizeof q, s, len),
                         (unsigned long long)cps);
    }
    if (n->format == F_DATE_TIME && !is_date_time(s, len))
        return vfail(c, at, "must be an RFC 3339 date-time (format), got %s",
                     de__quote(q, sizeof q, s, len));
    if (n->format == F_UUID && !is_uuid(s, len))
        return vfail(c, at,
                     "must be a UUID, 8-4-4-4-12 hex digits (format), "
                     "got %s",
                     de__quote(q, sizeof q, s, len));
    if (n->pat != NULL) {
        char p[DE__QUOTE_MAX];
        int m;
        /* The pattern as written, without de__quote's quotes. */
        de__quote(p, sizeof p, n->pat->src, n->pat->len);
        p[strlen(p) - 1] = '\0';
        if (len > DE__PATTERN_SUBJECT_MAX)
            return vfail(c, at,
                         "is too long to check against %s (pattern checks "
                         "at most %d bytes), got %zu bytes: %s",
                         p + 1, DE__PATTERN_SUBJECT_MAX, len,
                         de__quote(q, sizeof q, s, len));
        m = pattern_match(n->pat, s, len);
        if (m < 0)
            return de__fail(DE_ERR_NOMEM,
                            "%.200s: out of memory matching %s against %s",
                            c->label, pathstr(at).s, p + 1);
        if (m == 0)
            return vfail(c, at, "must match %s, got %s", p + 1,
                         de__quote(q, sizeof q, s, len));
    }
    return DE_OK;
}

static de_err check_number(const vctx *c, const node *n, const json_t *v,
                           const seg *at)
{
    num x = num_of(v);

    for (int b = 0; b < B_COUNT; b++) {
        int cmp;
        bool ok;
        if (!(n->bounds & (1u << b)))
            continue;
        cmp = num_cmp(&x, &n->bound[b]);
        ok = b == B_MIN    ? cmp >= 0
             : b == B_XMIN ? cmp > 0
             : b == B_MAX  ? cmp <= 0
                           : cmp < 0;
        if (!ok) {
            return vfail(c, at, "must be %s %s (%s), got %s", bound_op[b],
                         NUM_TEXT(&n->bound[b]), bound_kw[b], DESCRIBE(v));
        }
    }
    return DE_OK;
}

static de_err check_array(const vctx *c, const node *n, const json_t *v,
                          const seg *at)
{
    size_t size = json_array_size(v);
    de_err err;

    if (size < n->min_items)
        return vfail(c, at,
                     "must have at least %llu element%s (minItems), got %zu",
                     (unsigned long long)n->min_items,
                     n->min_items == 1 ? "" : "s", size);
    if (size > n->max_items)
        return vfail(c, at,
                     "must have at most %llu element%s (maxItems), got %zu",
                     (unsigned long long)n->max_items,
                     n->max_items == 1 ? "" : "s", size);
    if (n->items == NULL)
        return DE_OK;
    for (size_t i = 0; i < size; i++) {
        seg s = {at, NULL, i};
        if ((err = check(c, n->items, json_array_get(v, i), &s)) != DE_OK)
            return err;
    }
    return DE_OK;
}

/* The declared property named key, or NULL.  Payloads usually list their
 * members in the order the contract declares them, so the one after the
 * last match is tried before the binary search. */
static const prop *find_prop(const node *n, const char *key, size_t len,
                             size_t *hint)
{
    size_t lo = 0, hi = n->nprops;

    if (*hint < n->nprops && n->props[*hint].len == len &&
        memcmp(n->props[*hint].name, key, len) == 0)
        return &n->props[(*hint)++];
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        const prop *p = &n->props[n->by_name[mid]];
        int cmp = key_cmp(key, len, p->name, p->len);
        if (cmp == 0) {
            *hint = (size_t)n->by_name[mid] + 1;
            return p;
        }
        if (cmp < 0)
            hi = mid;
        else
            lo = mid + 1;
    }
    return NULL;
}

/* Members in the payload's order, then missing required ones in the
 * order 'required' lists them. */
static de_err check_object(const vctx *c, const node *n, const json_t *v,
                           const seg *at)
{
    json_t *obj = (json_t *)(uintptr_t)v; /* jansson iterates non-const */
    size_t seen_required = 0, hint = 0;
    de_err err;

    for (void *it = json_object_iter(obj); it != NULL;
         it = json_object_iter_next(obj, it)) {
        const char *key = json_object_iter_key(it);
        size_t len = json_object_iter_key_len(it);
        seg s = {at, key, len};
        const prop *p = find_prop(n, key, len, &hint);
        if (p == NULL) {
            if (!n->additional)
                return vfail(c, &s,
                             "is not allowed (additionalProperties is "
                             "false)");
            continue;
        }
        seen_required += p->required;
        if ((err = check(c, p->schema, json_object_iter_value(it), &s)) !=
            DE_OK)
            return err;
    }
    if (seen_required < n->nrequired_declared ||
        n->nrequired > n->nrequired_declared) {
        for (size_t i = 0; i < n->nrequired; i++) {
            if (json_object_getn(v, n->required[i].s, n->required[i].n) ==
                NULL) {
                seg s = {at, n->required[i].s, n->required[i].n};
                return vfail(c, &s, "is required");
            }
        }
    }
    return DE_OK;
}

static de_err check(const vctx *c, const node *n, const json_t *v,
                    const seg *at)
{
    while (n->ref != NULL)
        n = n->ref;
    if (n->never)
        return vfail(c, at, "is not allowed (its schema is false)");
    if (!type_allows(n->types, v))
        return fail_type(c, at, n->types, v);
    if (n->vals != NULL && !vset_has(n->vals, v))
        return fail_vals(c, at, n->vals, v);
    switch (json_typeof(v)) {
    case JSON_STRING: return check_string(c, n, v, at);
    case JSON_INTEGER:
    case JSON_REAL: return n->bounds ? check_number(c, n, v, at) : DE_OK;
    case JSON_ARRAY: return check_array(c, n, v, at);
    case JSON_OBJECT:
        /* Only a schema that says "object" has properties, required and
         * the additionalProperties default; {} accepts any object. */
        return (n->types & T_OBJECT) ? check_object(c, n, v, at) : DE_OK;
    default: return DE_OK;
    }
}

de_err de__schema_validate(const de__schema *s, const json_t *instance,
                           const char *label)
{
    vctx c;

    assert(s != NULL && instance != NULL);
    c.label = label != NULL ? label : "payload";
    return check(&c, s->top, instance, NULL);
}

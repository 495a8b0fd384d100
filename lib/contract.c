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
 * sorted string table plus sorted numbers, patterns become linear-time
 * automata, and $ref becomes a pointer.  A check renders no path and
 * allocates nothing unless it fails (or runs a pattern over 256
 * instructions).
 *
 * Invariants: a compiled schema is never modified (a pattern check keeps
 * its state on the stack), so several threads may check against one
 * schema at once.  The node graph, followed through $ref, is acyclic and
 * at most DE__CONTRACT_DEPTH_MAX deep, which bounds every recursion here.
 * Nodes borrow strings from the parsed document, which lives as long as
 * the schema.
 */
#include "contract.h"

#include <assert.h>
#include <locale.h>
#include <pthread.h>
#include <regex.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <wctype.h>

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

typedef struct pattern pattern; /* a compiled pattern (see below) */

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

struct de__contract {
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

static de_err nomem(void);

/* ---- patterns ------------------------------------------------------------ */

/*
 * Patterns are POSIX extended regular expressions with glibc's meaning in
 * the C.UTF-8 locale, whatever locale the host set: "." is one code point
 * (any but NUL), ranges are code point ranges, [:classes:] are glibc's
 * C.UTF-8 ones.  glibc's regcomp must accept every pattern too (it is the
 * authority on the dialect), and the tests check matches against glibc's
 * regexec.
 *
 * Matching is not left to regexec, though.  Measured on glibc 2.36: its
 * unanchored search retries every start position ("(.*a){20}b" took 3 s
 * on 8 KiB), and its lazily built automaton keeps every state it builds:
 * "a.{255}c" against random 1 KiB strings of a and b took 330 ms each
 * and grew the process by 4.6 MB each, without bound.  On the host's
 * commit path that is a denial of service.  So a pattern is compiled into
 * a Thompson NFA and run as a set of states (a Pike VM without captures):
 * each subject character advances every live instruction at most once,
 * so a check takes at most DE__PATTERN_SIZE_MAX x DE__PATTERN_SUBJECT_MAX
 * steps, in memory proportional to the pattern, keeping nothing.
 *
 * Anchors: '^' may only start and '$' only end a top-level alternative.
 * Anywhere else they could only match an empty prefix or suffix, and
 * glibc's automaton even takes the place after a newline for a line start
 * (so its answers would differ from POSIX's).
 */
static pthread_once_t utf8_once = PTHREAD_ONCE_INIT;
static locale_t utf8_locale; /* made once, never freed */

/* The POSIX classes, in the order of the bits in rx_set.classes. */
static const char *const class_names[] = {"alnum", "alpha", "blank", "cntrl",
                                          "digit", "graph", "lower", "print",
                                          "punct", "space", "upper", "xdigit"};
static wctype_t class_types[DE__ARRAY_LEN(class_names)];

static void utf8_locale_init(void)
{
    utf8_locale =
        newlocale(LC_CTYPE_MASK | LC_COLLATE_MASK, "C.UTF-8", (locale_t)0);
    for (size_t i = 0; utf8_locale && i < DE__ARRAY_LEN(class_names); i++)
        class_types[i] = wctype_l(class_names[i], utf8_locale);
}

/* Above every code point: what an invalid byte in a subject decodes to. */
#define RX_NOT_A_CHAR 0x110000u

/* A bracket expression. */
typedef struct rx_set {
    uint32_t ascii[4]; /* the answer for U+0000..U+007F, negation applied */
    uint32_t *ranges;  /* lo, hi pairs of code points */
    size_t nranges;
    uint16_t classes; /* 1 << index in class_names */
    bool negate;
} rx_set;

/* Membership by the ranges and classes, before negation. */
static bool set_lists(const rx_set *set, uint32_t c)
{
    for (size_t i = 0; i < set->nranges; i++)
        if (c >= set->ranges[2 * i] && c <= set->ranges[2 * i + 1])
            return true;
    for (size_t i = 0; i < DE__ARRAY_LEN(class_names); i++)
        if ((set->classes & (1u << i)) && c < RX_NOT_A_CHAR &&
            iswctype_l((wint_t)c, class_types[i], utf8_locale))
            return true;
    return false;
}

static bool set_has(const rx_set *set, uint32_t c)
{
    if (c < 0x80)
        return (set->ascii[c / 32] >> (c % 32)) & 1;
    return set_lists(set, c) != set->negate;
}

enum { RX_CHAR, RX_ANY, RX_SET, RX_SPLIT, RX_JMP, RX_BOL, RX_EOL, RX_MATCH };

typedef struct rx_inst {
    uint8_t op;
    uint16_t x, y; /* SPLIT: both targets; JMP: x; SET: x is the set */
    uint32_t c;    /* CHAR */
} rx_inst;

struct pattern {
    rx_inst *prog; /* starts at prog[0], ends with RX_MATCH */
    size_t nprog;
    rx_set *sets;
    size_t nsets;
    bool anchored;   /* every top-level alternative starts with '^' */
    const char *src; /* as written, for messages */
    size_t len;
};

/* The parsed pattern, before {m,n} is unrolled into instructions. */
typedef struct rx_ast rx_ast;
struct rx_ast {
    enum {
        A_EMPTY,
        A_CHAR,
        A_ANY,
        A_SET,
        A_BOL,
        A_EOL,
        A_CAT,
        A_ALT,
        A_REPEAT
    } kind;
    uint32_t c;    /* A_CHAR: the code point; A_SET: the set's index */
    rx_ast *a, *b; /* A_CAT, A_ALT; A_REPEAT repeats a */
    int min, max;  /* A_REPEAT; max -1 is unbounded */
};

typedef struct rx_parse {
    const seg *at;
    const char *p;
    size_t n, i;
    int depth;        /* open groups */
    size_t alt_start; /* where the current top-level alternative starts */
    size_t alts, anchored_alts;
    rx_ast *nodes; /* an arena: at most 2 nodes per pattern byte, plus 2 */
    size_t nnodes, node_cap;
    rx_set *sets; /* at most one per 2 pattern bytes */
    size_t nsets, set_cap;
    de_err err; /* set with the first refusal */
} rx_parse;

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

/* Records the parser's refusal; NULL, for its returns. */
static rx_ast *rx_fail(rx_parse *ps, const char *fmt, ...) DE__PRINTF(2, 3);

static rx_ast *rx_fail(rx_parse *ps, const char *fmt, ...)
{
    char why[256];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(why, sizeof why, fmt, ap);
    va_end(ap);
    ps->err = pattern_fail(ps->at, ps->p, ps->n, "%s", why);
    return NULL;
}

/* The code point at s[0..n) and its length in bytes. */
static uint32_t utf8_decode(const char *s, size_t n, size_t *len)
{
    const unsigned char *u = (const unsigned char *)s;
    uint32_t c;

    *len = 1;
    if (u[0] < 0x80)
        return u[0];
    *len = de__utf8_seq_len(u, n);
    if (*len == 0) {
        *len = 1;
        return RX_NOT_A_CHAR; /* jansson's strings are valid UTF-8 */
    }
    c = u[0] & (0x7fu >> *len);
    for (size_t i = 1; i < *len; i++)
        c = (c << 6) | (u[i] & 0x3fu);
    return c;
}

static rx_ast *rx_node(rx_parse *ps, int kind)
{
    rx_ast *a;

    assert(ps->nnodes < ps->node_cap);
    a = &ps->nodes[ps->nnodes++];
    memset(a, 0, sizeof *a);
    a->kind = kind;
    return a;
}

static bool set_add_range(rx_set *set, uint32_t lo, uint32_t hi)
{
    uint32_t *r = realloc(set->ranges, (set->nranges + 1) * 2 * sizeof *r);

    if (r == NULL)
        return false;
    set->ranges = r;
    r[set->nranges * 2] = lo;
    r[set->nranges * 2 + 1] = hi;
    set->nranges++;
    return true;
}

static rx_ast *rx_pair(rx_parse *ps, int kind, rx_ast *a, rx_ast *b)
{
    rx_ast *r = rx_node(ps, kind);

    r->a = a;
    r->b = b;
    return r;
}

/* A bracket expression, at p[i] == '['; the rules are glibc's. */
static rx_ast *parse_bracket(rx_parse *ps)
{
    const char *p = ps->p;
    size_t n = ps->n, i = ps->i + 1, len, start;
    bool first = true;
    rx_set *set;
    rx_ast *a;

    assert(ps->nsets < ps->set_cap);
    set = &ps->sets[ps->nsets++];
    if (i < n && p[i] == '^') {
        set->negate = true;
        i++;
    }
    for (;;) {
        uint32_t lo, hi;
        if (i >= n)
            return rx_fail(ps, "has an unterminated bracket expression");
        if (p[i] == ']' && !first)
            break;
        first = false;
        if (p[i] == '\\')
            return rx_fail(ps, "has a backslash inside a bracket "
                               "expression, where POSIX ERE reads it "
                               "literally; put ']' first and '-' last "
                               "instead of escaping them");
        if (p[i] == '[' && i + 1 < n && (p[i + 1] == '.' || p[i + 1] == '='))
            return rx_fail(ps,
                           "uses a collating element or equivalence class "
                           "('[%c'), which is not supported",
                           p[i + 1]);
        if (p[i] == '[' && i + 1 < n && p[i + 1] == ':') {
            size_t k = i + 2, c;
            while (k + 1 < n && !(p[k] == ':' && p[k + 1] == ']'))
                k++;
            if (k + 1 >= n)
                return rx_fail(ps, "has an unterminated character class "
                                   "('[:')");
            for (c = 0; c < DE__ARRAY_LEN(class_names); c++)
                if (strlen(class_names[c]) == k - i - 2 &&
                    memcmp(class_names[c], p + i + 2, k - i - 2) == 0)
                    break;
            if (c == DE__ARRAY_LEN(class_names))
                return rx_fail(
                    ps, "names an unknown character class '[:%.*s:]'",
                    (int)(k - i - 2 > 32 ? 32 : k - i - 2), p + i + 2);
            set->classes |= (uint16_t)(1u << c);
            i = k + 2;
            if (i + 1 < n && p[i] == '-' && p[i + 1] != ']')
                return rx_fail(ps,
                               "starts a range with a character class "
                               "(at byte %zu)",
                               i);
            continue;
        }
        start = i;
        lo = hi = utf8_decode(p + i, n - i, &len);
        i += len;
        if (i + 1 < n && p[i] == '-' && p[i + 1] != ']') {
            if (p[i + 1] == '[')
                return rx_fail(ps, "ends a range with '[' (at byte %zu)",
                               i + 1);
            hi = utf8_decode(p + i + 1, n - i - 1, &len);
            if (lo >= 0x80 || hi >= 0x80)
                return rx_fail(ps,
                               "has a range with a non-ASCII end (at byte "
                               "%zu), which glibc cannot collate in "
                               "C.UTF-8; list the characters instead",
                               start);
            if (hi < lo)
                return rx_fail(ps, "has a backwards range (at byte %zu)",
                               start);
            i += 1 + len;
            if (i + 1 < n && p[i] == '-' && p[i + 1] != ']')
                return rx_fail(ps,
                               "has a '-' right after a range (at byte "
                               "%zu); put a literal '-' last",
                               i);
        }
        if (!set_add_range(set, lo, hi)) {
            ps->err = nomem();
            return NULL;
        }
    }
    for (uint32_t c = 0; c < 0x80; c++)
        if (set_lists(set, c) != set->negate)
            set->ascii[c / 32] |= 1u << (c % 32);
    ps->i = i + 1;
    a = rx_node(ps, A_SET);
    a->c = (uint32_t)(ps->nsets - 1);
    return a;
}

static rx_ast *parse_alt(rx_parse *ps);

/* One atom: a character, ".", a bracket expression, a group, an anchor. */
static rx_ast *parse_atom(rx_parse *ps)
{
    static const char hints[] = "dDwWsS";
    static const char *const hint_text[] = {"[0-9]",        "[^0-9]",
                                            "[A-Za-z0-9_]", "[^A-Za-z0-9_]",
                                            "[[:space:]]",  "[^[:space:]]"};
    const char *p = ps->p;
    size_t n = ps->n, i = ps->i, len;
    rx_ast *a;

    switch (p[i]) {
    case '(':
        if (i + 1 < n && p[i + 1] == '?')
            return rx_fail(ps, "uses '(?', which POSIX ERE does not have "
                               "(no non-capturing groups, lookaround or "
                               "flags)");
        ps->i++;
        ps->depth++;
        a = parse_alt(ps);
        if (a == NULL)
            return NULL;
        if (ps->i >= n)
            return rx_fail(ps, "has an unmatched '('");
        ps->i++; /* ')' */
        ps->depth--;
        return a;
    case '[': return parse_bracket(ps);
    case '.': ps->i++; return rx_node(ps, A_ANY);
    case '^':
        if (ps->depth != 0 || i != ps->alt_start)
            return rx_fail(ps,
                           "uses '^' inside (at byte %zu); an anchor may "
                           "only start the pattern or a top-level "
                           "alternative, e.g. '^(a|b)c'",
                           i);
        ps->anchored_alts++;
        ps->i++;
        return rx_node(ps, A_BOL);
    case '$':
        if (ps->depth != 0 || (i + 1 < n && p[i + 1] != '|'))
            return rx_fail(ps,
                           "uses '$' inside (at byte %zu); an anchor may "
                           "only end the pattern or a top-level "
                           "alternative, e.g. 'a(b|c)$'",
                           i);
        ps->i++;
        return rx_node(ps, A_EOL);
    case '*':
    case '+':
    case '?':
    case '{':
        return rx_fail(ps, "has '%c' with nothing to repeat (at byte %zu)",
                       p[i], i);
    case '\\': {
        char e = i + 1 < n ? p[i + 1] : '\0';
        const char *h = e ? strchr(hints, e) : NULL;
        if (e == '\0')
            return rx_fail(ps, "ends with a lone backslash");
        if (e >= '1' && e <= '9')
            return rx_fail(ps,
                           "uses the back-reference '\\%c', which is not "
                           "supported (it needs a backtracking matcher)",
                           e);
        if (h != NULL)
            return rx_fail(ps,
                           "uses '\\%c', which POSIX ERE does not have; "
                           "write %s",
                           e, hint_text[h - hints]);
        if (strchr(".[](){}*+?^$|\\/-", e) == NULL)
            return rx_fail(ps,
                           "escapes a character that is not punctuation "
                           "(at byte %zu); POSIX ERE only escapes "
                           ".[](){}*+?^$|\\ (plus / and -)",
                           i);
        ps->i += 2;
        a = rx_node(ps, A_CHAR);
        a->c = (unsigned char)e;
        return a;
    }
    default:
        a = rx_node(ps, A_CHAR);
        a->c = utf8_decode(p + i, n - i, &len);
        ps->i += len;
        return a;
    }
}

/* "{m}", "{m,}" or "{m,n}" at p[i] == '{'. */
static bool parse_interval(rx_parse *ps, int *min, int *max)
{
    const char *p = ps->p;
    size_t n = ps->n, i = ps->i + 1;
    long lo = -1, hi;

    while (i < n && p[i] >= '0' && p[i] <= '9' && lo < 100000)
        lo = (lo < 0 ? 0 : lo * 10) + (p[i++] - '0');
    hi = lo;
    if (i < n && p[i] == ',') {
        hi = -1;
        for (i++; i < n && p[i] >= '0' && p[i] <= '9' && hi < 100000; i++)
            hi = (hi < 0 ? 0 : hi * 10) + (p[i] - '0');
    }
    if (lo < 0 && p[ps->i + 1] == ',' && i < n && p[i] == '}') {
        rx_fail(ps, "has an interval without a lower bound ('{,'); "
                    "write {0,n}");
        return false;
    }
    if (lo < 0 || i >= n || p[i] != '}') {
        rx_fail(ps,
                "has a '{' that does not start an interval {m}, "
                "{m,} or {m,n} (at byte %zu)",
                ps->i);
        return false;
    }
    if (lo > DE__PATTERN_REPEAT_MAX || hi > DE__PATTERN_REPEAT_MAX) {
        rx_fail(ps, "repeats up to %ld times, over the limit of %d",
                hi > lo ? hi : lo, DE__PATTERN_REPEAT_MAX);
        return false;
    }
    if (hi >= 0 && hi < lo) {
        rx_fail(ps,
                "has an interval {%ld,%ld} whose bounds are "
                "backwards",
                lo, hi);
        return false;
    }
    *min = (int)lo;
    *max = (int)hi;
    ps->i = i + 1;
    return true;
}

/* An atom and the quantifiers after it (glibc allows several: a+?). */
static rx_ast *parse_repeat(rx_parse *ps)
{
    rx_ast *a = parse_atom(ps);

    while (a != NULL && ps->i < ps->n && strchr("*+?{", ps->p[ps->i])) {
        rx_ast *r;
        int min = 0, max = -1;
        if (a->kind == A_BOL || a->kind == A_EOL)
            return rx_fail(ps, "repeats an anchor (at byte %zu)", ps->i);
        switch (ps->p[ps->i]) {
        case '*': ps->i++; break;
        case '+':
            min = 1;
            ps->i++;
            break;
        case '?':
            max = 1;
            ps->i++;
            break;
        default:
            if (!parse_interval(ps, &min, &max))
                return NULL;
        }
        r = rx_node(ps, A_REPEAT);
        r->a = a;
        r->min = min;
        r->max = max;
        a = r;
    }
    return a;
}

static rx_ast *parse_cat(rx_parse *ps)
{
    rx_ast *a = rx_node(ps, A_EMPTY), *b;

    while (ps->i < ps->n && ps->p[ps->i] != '|' && ps->p[ps->i] != ')') {
        if ((b = parse_repeat(ps)) == NULL)
            return NULL;
        a = a->kind == A_EMPTY ? b : rx_pair(ps, A_CAT, a, b);
    }
    return a;
}

static rx_ast *parse_alt(rx_parse *ps)
{
    rx_ast *a, *b;

    if (ps->depth == 0) {
        ps->alts++;
        ps->alt_start = ps->i;
    }
    if ((a = parse_cat(ps)) == NULL)
        return NULL;
    while (ps->i < ps->n && ps->p[ps->i] == '|') {
        ps->i++;
        if (ps->depth == 0) {
            ps->alts++;
            ps->alt_start = ps->i;
        }
        if ((b = parse_cat(ps)) == NULL)
            return NULL;
        a = rx_pair(ps, A_ALT, a, b);
    }
    if (ps->i < ps->n && ps->p[ps->i] == ')' && ps->depth == 0)
        return rx_fail(ps, "has an unmatched ')'");
    return a;
}

/* Instructions a compiles to, or more than DE__PATTERN_SIZE_MAX. */
static size_t rx_size(const rx_ast *a)
{
    const size_t over = DE__PATTERN_SIZE_MAX + 1;
    size_t s, t;

    switch (a->kind) {
    case A_EMPTY: return 0;
    case A_CAT:
    case A_ALT:
        s = rx_size(a->a);
        t = rx_size(a->b);
        return s + t + (a->kind == A_ALT ? 2 : 0) > over
                   ? over
                   : s + t + (a->kind == A_ALT ? 2 : 0);
    case A_REPEAT:
        s = rx_size(a->a);
        /* a{m,n}: m copies, then n - m optional ones (a split each); a{m,}:
         * m copies and a loop (a split and a jump). */
        t = (size_t)a->min * s +
            (a->max < 0 ? s + 2 : (size_t)(a->max - a->min) * (s + 1));
        return s >= over || t > over ? over : t;
    default: return 1;
    }
}

static size_t rx_emit(pattern *pat, const rx_ast *a, size_t pc);

/* a, optionally (a split around it), at pc; returns the next pc. */
static size_t rx_emit_optional(pattern *pat, const rx_ast *a, size_t pc)
{
    size_t split = pc, end = rx_emit(pat, a, pc + 1);

    pat->prog[split] =
        (rx_inst){RX_SPLIT, (uint16_t)(split + 1), (uint16_t)end, 0};
    return end;
}

static size_t rx_emit(pattern *pat, const rx_ast *a, size_t pc)
{
    rx_inst *in = &pat->prog[pc];
    size_t l1, l2;

    switch (a->kind) {
    case A_EMPTY: return pc;
    case A_CHAR: *in = (rx_inst){RX_CHAR, 0, 0, a->c}; return pc + 1;
    case A_ANY: *in = (rx_inst){RX_ANY, 0, 0, 0}; return pc + 1;
    case A_SET: *in = (rx_inst){RX_SET, (uint16_t)a->c, 0, 0}; return pc + 1;
    case A_BOL: *in = (rx_inst){RX_BOL, 0, 0, 0}; return pc + 1;
    case A_EOL: *in = (rx_inst){RX_EOL, 0, 0, 0}; return pc + 1;
    case A_CAT: return rx_emit(pat, a->b, rx_emit(pat, a->a, pc));
    case A_ALT:
        /* split L1, L2; L1: a; jmp end; L2: b; end: */
        l1 = rx_emit(pat, a->a, pc + 1);
        l2 = rx_emit(pat, a->b, l1 + 1);
        pat->prog[pc] =
            (rx_inst){RX_SPLIT, (uint16_t)(pc + 1), (uint16_t)(l1 + 1), 0};
        pat->prog[l1] = (rx_inst){RX_JMP, (uint16_t)l2, 0, 0};
        return l2;
    case A_REPEAT:
        for (int k = 0; k < a->min; k++)
            pc = rx_emit(pat, a->a, pc);
        if (a->max < 0) {
            /* L: split body, end; body: a; jmp L; end: */
            l1 = rx_emit(pat, a->a, pc + 1);
            pat->prog[pc] =
                (rx_inst){RX_SPLIT, (uint16_t)(pc + 1), (uint16_t)(l1 + 1), 0};
            pat->prog[l1] = (rx_inst){RX_JMP, (uint16_t)pc, 0, 0};
            return l1 + 1;
        }
        for (int k = a->min; k < a->max; k++)
            pc = rx_emit_optional(pat, a->a, pc);
        return pc;
    }
    return pc;
}

static void pattern_free(pattern *pat)
{
    if (pat == NULL)
        return;
    for (size_t i = 0; i < pat->nsets; i++)
        free(pat->sets[i].ranges);
    free(pat->sets);
    free(pat->prog);
    free(pat);
}

/* Parses, checks and compiles pattern string v. */
static de_err pattern_compile(const seg *at, const json_t *v, pattern **out)
{
    const char *p = json_string_value(v);
    size_t n = json_string_length(v), size;
    rx_parse ps = {0};
    pattern *pat = NULL;
    rx_ast *ast;
    regex_t re;
    char msg[128];
    locale_t old;
    int rc;

    *out = NULL;
    if (n > DE__PATTERN_MAX)
        return pattern_fail(at, p, n, "is %zu bytes, over the limit of %d", n,
                            DE__PATTERN_MAX);
    pthread_once(&utf8_once, utf8_locale_init);
    if (utf8_locale == (locale_t)0)
        return pattern_fail(at, p, n,
                            "cannot be compiled: the C.UTF-8 locale is not "
                            "available (glibc 2.35 or later has it built "
                            "in)");
    ps.at = at;
    ps.p = p;
    ps.n = n;
    ps.node_cap = 2 * n + 2;
    ps.set_cap = n / 2 + 1;
    ps.nodes = calloc(ps.node_cap, sizeof *ps.nodes);
    ps.sets = calloc(ps.set_cap, sizeof *ps.sets);
    pat = calloc(1, sizeof *pat);
    if (ps.nodes == NULL || ps.sets == NULL || pat == NULL) {
        free(ps.sets);
        ps.err = nomem();
        goto fail;
    }
    /* The sets (and the ranges the parser adds) are pat's from here. */
    pat->sets = ps.sets;
    ast = parse_alt(&ps);
    pat->nsets = ps.nsets;
    if (ast == NULL)
        goto fail;
    assert(ps.i == n && ps.depth == 0);
    size = rx_size(ast);
    if (size > DE__PATTERN_SIZE_MAX) {
        ps.err = pattern_fail(at, p, n,
                              "expands to more than %d instructions once "
                              "its repetitions are unrolled; simplify it",
                              DE__PATTERN_SIZE_MAX);
        goto fail;
    }
    /* glibc must read it the same way: a last check of the dialect. */
    old = uselocale(utf8_locale);
    rc = regcomp(&re, p, REG_EXTENDED | REG_NOSUB);
    uselocale(old);
    if (rc != 0) {
        regerror(rc, &re, msg, sizeof msg);
        ps.err = rc == REG_ESPACE
                     ? nomem()
                     : pattern_fail(at, p, n,
                                    "is not a valid POSIX extended regular "
                                    "expression (%s)",
                                    msg);
        goto fail;
    }
    regfree(&re);
    pat->nprog = size + 1;
    pat->prog = calloc(pat->nprog, sizeof *pat->prog);
    if (pat->prog == NULL) {
        ps.err = nomem();
        goto fail;
    }
    size = rx_emit(pat, ast, 0);
    assert(size == pat->nprog - 1);
    pat->prog[size] = (rx_inst){RX_MATCH, 0, 0, 0};
    pat->anchored = ps.anchored_alts == ps.alts;
    pat->src = p;
    pat->len = n;
    free(ps.nodes);
    *out = pat;
    return DE_OK;
fail:
    pattern_free(pat);
    free(ps.nodes);
    return ps.err;
}

/* The state of one match: the instructions live at the current and the
 * next subject position, deduplicated by mark[pc] == gen. */
typedef struct rx_run {
    const pattern *pat;
    uint32_t *mark;
    uint16_t *list[2];
    size_t count[2];
    uint16_t *stack;
    uint32_t gen;
} rx_run;

/* Adds pc, and what it reaches without consuming, at subject position pos
 * of n to list `to`.  True once RX_MATCH is reached. */
static bool rx_add(rx_run *r, int to, size_t pc0, size_t pos, size_t n)
{
    size_t sp = 0;

    r->stack[sp++] = (uint16_t)pc0;
    while (sp > 0) {
        uint16_t pc = r->stack[--sp];
        const rx_inst *in = &r->pat->prog[pc];
        if (r->mark[pc] == r->gen)
            continue;
        r->mark[pc] = r->gen;
        switch (in->op) {
        case RX_MATCH: return true;
        case RX_JMP: r->stack[sp++] = in->x; break;
        case RX_SPLIT:
            r->stack[sp++] = in->y;
            r->stack[sp++] = in->x;
            break;
        case RX_BOL:
            if (pos == 0)
                r->stack[sp++] = (uint16_t)(pc + 1);
            break;
        case RX_EOL:
            if (pos == n)
                r->stack[sp++] = (uint16_t)(pc + 1);
            break;
        default: r->list[to][r->count[to]++] = pc; break;
        }
    }
    return false;
}

static bool rx_step_ok(const pattern *pat, const rx_inst *in, uint32_t c)
{
    switch (in->op) {
    case RX_CHAR: return in->c == c;
    case RX_ANY: return c != 0; /* glibc's "." does not match NUL */
    default: return set_has(&pat->sets[in->x], c);
    }
}

/* Most instructions matched with the work arrays on the stack. */
#define RX_STACK_PROG 256

/* 1 when pat matches somewhere in s[0..n), 0 when not, -1 when out of
 * memory. */
static int pattern_match(const pattern *pat, const char *s, size_t n)
{
    /* mark, two lists and the closure stack (each pc pushed at most
     * twice per closure, so 2 * m + 1 entries). */
    uint32_t mark_buf[RX_STACK_PROG];
    uint16_t list_buf[RX_STACK_PROG * 4 + 2];
    size_t m = pat->nprog, pos = 0, len;
    void *heap = NULL;
    rx_run r;
    int cur = 0, found = 0;

    r.pat = pat;
    if (m <= RX_STACK_PROG) {
        r.mark = mark_buf;
        r.list[0] = list_buf;
    } else {
        heap = malloc(m * sizeof *r.mark + (4 * m + 2) * sizeof(uint16_t));
        if (heap == NULL)
            return -1;
        r.mark = heap;
        r.list[0] = (uint16_t *)(r.mark + m);
    }
    r.list[1] = r.list[0] + m;
    r.stack = r.list[1] + m;
    memset(r.mark, 0, m * sizeof *r.mark);
    r.gen = 1;
    r.count[0] = 0;
    if (rx_add(&r, 0, 0, 0, n)) {
        found = 1;
        goto done;
    }
    while (pos < n) {
        uint32_t c = utf8_decode(s + pos, n - pos, &len);
        int nxt = cur ^ 1;
        r.gen++;
        r.count[nxt] = 0;
        pos += len;
        for (size_t k = 0; k < r.count[cur]; k++) {
            uint16_t pc = r.list[cur][k];
            if (rx_step_ok(pat, &pat->prog[pc], c) &&
                rx_add(&r, nxt, pc + 1u, pos, n)) {
                found = 1;
                goto done;
            }
        }
        /* A search: a match may also start here, unless every
         * alternative is anchored at the start. */
        if (!pat->anchored && rx_add(&r, nxt, 0, pos, n)) {
            found = 1;
            goto done;
        }
        if (r.count[nxt] == 0 && pat->anchored)
            break;
        cur = nxt;
    }
done:
    free(heap);
    return found;
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
    de__contract *s;
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
        if (count > DE__CONTRACT_ENUM_MAX)
            return kfail(at, k, "has %zu values, over the limit of %d", count,
                         DE__CONTRACT_ENUM_MAX);
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

static const def *find_def(const de__contract *s, const char *name, size_t len)
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
    if (len > DE__CONTRACT_ID_MAX)
        return kfail(at, K_ID, "is %zu bytes, over the limit of %d: %s", len,
                     DE__CONTRACT_ID_MAX, DESCRIBE(v));
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

    if (depth > DE__CONTRACT_DEPTH_MAX)
        return de__fail(DE_ERR_CONTRACT,
                        "contract schema: the schema at %s is nested more "
                        "than %d levels deep",
                        pathstr(at).s, DE__CONTRACT_DEPTH_MAX);
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
 * DE__CONTRACT_DEPTH_MAX once $ref is followed.  Each node is measured once;
 * the walk itself never goes deeper than the limit.
 */
typedef struct walk {
    const node *path[DE__CONTRACT_DEPTH_MAX + 2]; /* $defs entries entered */
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
    if ((n->mark == 2 && level - 1 + n->height > DE__CONTRACT_DEPTH_MAX) ||
        level > DE__CONTRACT_DEPTH_MAX) {
        snprintf(what, sizeof what,
                 "following '$ref' nests the schema more than %d levels "
                 "deep, through",
                 DE__CONTRACT_DEPTH_MAX);
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

de_err de__contract_compile(const char *schema_json, size_t len,
                            de__contract **out)
{
    de__contract *s = NULL;
    json_error_t jerr;
    cc c;
    walk w;
    node *top;
    de_err err;

    assert(out != NULL);
    *out = NULL;
    if (schema_json == NULL)
        return de__fail(DE_ERR_CONTRACT, "contract schema: missing (NULL)");
    if (len > DE__CONTRACT_MAX_BYTES)
        return de__fail(DE_ERR_CONTRACT,
                        "contract schema: %zu bytes, over the limit of %d", len,
                        DE__CONTRACT_MAX_BYTES);
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
    de__contract_free(s);
    return err;
}

const char *de__contract_id(const de__contract *s)
{
    return s->id;
}

const char *de__contract_canonical(const de__contract *s)
{
    return s->canonical;
}

void de__contract_free(de__contract *s)
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
        int m =
            len > DE__PATTERN_SUBJECT_MAX ? 2 : pattern_match(n->pat, s, len);
        if (m == 1)
            return DE_OK;
        /* The pattern as written, without de__quote's quotes. */
        de__quote(p, sizeof p, n->pat->src, n->pat->len);
        p[strlen(p) - 1] = '\0';
        if (m == 2)
            return vfail(c, at,
                         "is too long to check against %s (pattern checks "
                         "at most %d bytes), got %zu bytes: %s",
                         p + 1, DE__PATTERN_SUBJECT_MAX, len,
                         de__quote(q, sizeof q, s, len));
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

de_err de__contract_validate(const de__contract *s, const json_t *instance,
                             const char *label)
{
    vctx c;

    assert(s != NULL && instance != NULL);
    c.label = label != NULL ? label : "payload";
    return check(&c, s->top, instance, NULL);
}

/* SPDX-License-Identifier: MIT */
/*
 * envelope.c -- the wire format: how big a record gets on Kafka.
 *
 * Records are CloudEvents 1.0 in Kafka's binary content mode (see
 * docs/OVERVIEW.md): key = subject id, value = payload, attributes as ce_*
 * headers.  de_record must refuse a record the broker would refuse, before
 * it is committed, so the size computed here is an upper bound of what any
 * relay writes for the event: every varint at its widest, the longest
 * source and type prefix the configuration allows, a 20-digit sequence.
 */
#include "internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

/* A record batch's fixed header (Kafka message format v2). */
#define BATCH_OVERHEAD 61
/* length, attributes, timestamp delta, offset delta, key length, value
 * length, header count: varints at their widest. */
#define RECORD_OVERHEAD (5 + 1 + 10 + 5 + 5 + 5 + 5)

static size_t header(const char *name, size_t value_len)
{
    return 5 + strlen(name) + 5 + value_len;
}

size_t de__record_max_size(size_t subject_type_len, size_t subject_id_len,
                           size_t action_len, int version, size_t payload_len,
                           size_t traceparent_len, size_t tracestate_len,
                           size_t dataschema_len)
{
    size_t type_len = DE__TYPE_PREFIX_MAX + subject_type_len + 1 + action_len +
                      (version > 0 ? 2 + 10 : 0);
    size_t n = BATCH_OVERHEAD + RECORD_OVERHEAD + subject_id_len + payload_len;

    n += header(DE__H_SPECVERSION, 3);
    n += header(DE__H_ID, DE__EVENT_ID_MAX);
    n += header(DE__H_SOURCE, DE__SOURCE_MAX);
    n += header(DE__H_TYPE, type_len);
    n += header(DE__H_SUBJECT, subject_id_len);
    n += header(DE__H_TIME, DE__RFC3339_LEN);
    n += header(DE__H_CONTENT_TYPE, strlen("application/json"));
    n += header(DE__H_PARTITIONKEY, subject_id_len);
    n += header(DE__H_SUBJECTSEQ, 20);
    n += header(DE__H_SUBJECTEPOCH, 20);
    n += header(DE__H_SUBJECTTYPE, subject_type_len);
    n += header(DE__H_ACTION, action_len);
    if (dataschema_len)
        n += header(DE__H_DATASCHEMA, dataschema_len);
    if (traceparent_len)
        n += header(DE__H_TRACEPARENT, traceparent_len);
    if (tracestate_len)
        n += header(DE__H_TRACESTATE, tracestate_len);
    /* Counted whether or not this outbox's relays sign (event.hmac.key is
     * theirs to set): "<key id>:<64 hex digits>". */
    n += header(DE__H_HMAC, DE__HMAC_ID_MAX + 1 + 64);
    return n;
}

/* Writes v in decimal at p; returns the length.  (The relay formats two
 * numbers per record; snprintf showed in its profile.) */
static size_t put_uint(char *p, uint64_t v)
{
    char tmp[24];
    size_t n = 0, i;

    do {
        tmp[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    for (i = 0; i < n; i++)
        p[i] = tmp[n - 1 - i];
    return n;
}

static size_t put_str(char *p, const char *s)
{
    size_t n = strlen(s);

    memcpy(p, s, n);
    return n;
}

void de__envelope_type(char *buf, size_t size, const char *prefix,
                       const char *subject_type, const char *action,
                       int version)
{
    size_t o;

    /* prefix, type and action are bounded by validation; stay safe if a
     * caller passes a small buffer anyway. */
    if (strlen(prefix) + strlen(subject_type) + strlen(action) + 16 > size) {
        snprintf(buf, size, "%s%s.%s", prefix, subject_type, action);
        return;
    }
    o = put_str(buf, prefix);
    o += put_str(buf + o, subject_type);
    buf[o++] = '.';
    o += put_str(buf + o, action);
    if (version > 0) {
        buf[o++] = '.';
        buf[o++] = 'v';
        o += put_uint(buf + o, (uint64_t)version);
    }
    buf[o] = '\0';
}

void de__topic_name(char *buf, size_t size, const char *template_,
                    const char *subject_type)
{
    static const char ph[] = "{subject_type}";
    size_t o = 0;

    for (const char *p = template_; *p && o + 1 < size;) {
        if (strncmp(p, ph, sizeof ph - 1) == 0) {
            size_t n = strlen(subject_type);
            if (o + n >= size)
                break;
            memcpy(buf + o, subject_type, n);
            o += n;
            p += sizeof ph - 1;
        } else {
            buf[o++] = *p++;
        }
    }
    buf[o] = '\0';
}

static rd_kafka_resp_err_t add(rd_kafka_headers_t *h, const char *name,
                               const char *value, ssize_t len)
{
    return rd_kafka_header_add(h, name, -1, value, len);
}

rd_kafka_headers_t *de__envelope_headers(const de__row *row, int64_t epoch,
                                         int64_t seq, const char *source,
                                         const char *type_prefix)
{
    rd_kafka_headers_t *h = rd_kafka_headers_new(15);
    char type[DE__TYPE_PREFIX_MAX + 2 * DE__IDENT_MAX + 16];
    char time[DE__RFC3339_LEN + 1], seqbuf[24], epochbuf[24];
    ssize_t sid_len = (ssize_t)row->subject_id_len;

    if (h == NULL)
        return NULL;
    de__envelope_type(type, sizeof type, type_prefix, row->subject_type,
                      row->action, row->version);
    de__rfc3339_ms(row->occurred_at_ms, time);
    seqbuf[put_uint(seqbuf, (uint64_t)seq)] = '\0';
    epochbuf[put_uint(epochbuf, (uint64_t)epoch)] = '\0';
    if (add(h, DE__H_SPECVERSION, "1.0", 3) ||
        add(h, DE__H_ID, row->event_id, -1) ||
        add(h, DE__H_SOURCE, source, -1) || add(h, DE__H_TYPE, type, -1) ||
        add(h, DE__H_SUBJECT, row->subject_id, sid_len) ||
        add(h, DE__H_TIME, time, DE__RFC3339_LEN) ||
        add(h, DE__H_CONTENT_TYPE, "application/json", 16) ||
        add(h, DE__H_PARTITIONKEY, row->subject_id, sid_len) ||
        add(h, DE__H_SUBJECTSEQ, seqbuf, -1) ||
        (epoch > 0 && add(h, DE__H_SUBJECTEPOCH, epochbuf, -1)) ||
        add(h, DE__H_SUBJECTTYPE, row->subject_type, -1) ||
        add(h, DE__H_ACTION, row->action, -1) ||
        (row->dataschema && add(h, DE__H_DATASCHEMA, row->dataschema, -1)) ||
        (row->traceparent && add(h, DE__H_TRACEPARENT, row->traceparent, -1)) ||
        (row->tracestate && add(h, DE__H_TRACESTATE, row->tracestate, -1))) {
        rd_kafka_headers_destroy(h);
        return NULL;
    }
    return h;
}

/* ---- decoding, for consumers ------------------------------------------ */

void de__decoded_free(de__decoded *d)
{
    DE__VEC_FREE(d->hdrs);
    free(d->buf);
    free(d->scratch);
    d->buf = d->scratch = NULL;
    d->cap = d->scratch_cap = 0;
}

/* Copies n bytes plus a NUL into d->buf at *off; returns the copy. */
static const char *stash(de__decoded *d, size_t *off, const void *p, size_t n)
{
    char *dst = d->buf + *off;

    memcpy(dst, p, n);
    dst[n] = '\0';
    *off += n + 1;
    return dst;
}

struct hval {
    const char *p;
    size_t n;
    bool str; /* structured mode: the JSON value was a string */
};

/* The attributes of one event, in either mode. */
struct attrs {
    struct hval spec, id, source, type, subject, time, pkey, seq, epoch, stype,
        action, tp, ts, ctype, data, data64;
};

de_err de__row_check(const de__row *row)
{
    de_event ev;
    const char *payload;
    size_t len;

    if (row->event_id == NULL || !de__is_event_id(row->event_id))
        return de__fail(DE_ERR_ARG,
                        "the row has no valid event_id (1 to %d printable "
                        "ASCII characters)",
                        DE__EVENT_ID_MAX);
    if (row->subject_id == NULL ||
        strlen(row->subject_id) != row->subject_id_len)
        return de__fail(DE_ERR_ARG, "its subject_id holds a NUL byte");
    if (row->payload == NULL || strlen(row->payload) != row->payload_len)
        return de__fail(DE_ERR_PAYLOAD, "its payload holds a NUL byte");
    if (row->dataschema != NULL &&
        (strlen(row->dataschema) > DE__CE_TEXT_MAX ||
         !de__is_uri_reference(row->dataschema, strlen(row->dataschema))))
        return de__fail(DE_ERR_ARG,
                        "its dataschema is not a URI reference of at most %d "
                        "bytes",
                        DE__CE_TEXT_MAX);
    memset(&ev, 0, sizeof ev);
    ev.subject_type = row->subject_type;
    ev.subject_id = row->subject_id;
    ev.action = row->action;
    ev.payload = row->payload;
    ev.occurred_at_ms = row->occurred_at_ms;
    ev.event_id = row->event_id;
    ev.traceparent = row->traceparent;
    ev.tracestate = row->tracestate;
    ev.version = row->version;
    return de__event_check(&ev, 0, &payload, &len);
}

bool de__parse_count(const char *s, size_t n, int64_t *out)
{
    int64_t v = 0;

    if (n == 0 || n > 18 || s[0] == '0')
        return false;
    for (size_t i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9')
            return false;
        v = v * 10 + (s[i] - '0');
    }
    *out = v;
    return true;
}

/* The slot of a CloudEvents attribute by its name (without "ce_"). */
static struct hval *slot_for(struct attrs *a, const char *k, size_t n)
{
#define IS(lit) (n == sizeof lit - 1 && memcmp(k, lit, n) == 0)
    switch (n ? k[0] : 0) {
    case 'a': return IS("action") ? &a->action : NULL;
    case 'd':
        return IS("data")              ? &a->data
               : IS("data_base64")     ? &a->data64
               : IS("datacontenttype") ? &a->ctype
                                       : NULL;
    case 'i': return IS("id") ? &a->id : NULL;
    case 'p': return IS("partitionkey") ? &a->pkey : NULL;
    case 's':
        return IS("specversion")    ? &a->spec
               : IS("source")       ? &a->source
               : IS("subject")      ? &a->subject
               : IS("subjectseq")   ? &a->seq
               : IS("subjectepoch") ? &a->epoch
               : IS("subjecttype")  ? &a->stype
                                    : NULL;
    case 't':
        return IS("type")          ? &a->type
               : IS("time")        ? &a->time
               : IS("traceparent") ? &a->tp
               : IS("tracestate")  ? &a->ts
                                   : NULL;
    default: return NULL;
    }
#undef IS
}

/* Structured mode: one member of the event object.  String values are
 * unescaped into d->scratch; others are kept as raw JSON text. */
struct walk {
    struct attrs *a;
    de__decoded *d;
    size_t off;
};

static bool take_member(void *ctx, const de__json_member *m)
{
    struct walk *w = ctx;
    char name[32];
    struct hval *slot;
    size_t n;

    if (m->name_len > sizeof name + 1)
        return true; /* no attribute of ours is that long */
    n = de__json_unescape(m->name, m->name_len, name);
    if ((slot = slot_for(w->a, name, n)) == NULL)
        return true;
    if (slot == &w->a->data || m->value[0] != '"') {
        slot->p = m->value;
        slot->n = m->value_len;
        slot->str = false;
        return true;
    }
    slot->p = w->d->scratch + w->off;
    slot->n = de__json_unescape(m->value, m->value_len, w->d->scratch + w->off);
    slot->str = true;
    w->off += slot->n + 1;
    return true;
}

/* Whether a content type is one of CloudEvents' structured JSON ones. */
static bool is_structured(const struct hval *ct, bool *batch)
{
    static const char st[] = "application/cloudevents";
    size_t n = sizeof st - 1;

    *batch = false;
    if (ct->p == NULL || ct->n < n || strncasecmp(ct->p, st, n) != 0)
        return false;
    if (ct->n >= n + 11 && strncasecmp(ct->p + n, "-batch+json", 11) == 0) {
        *batch = true;
        return true;
    }
    return ct->n >= n + 5 && strncasecmp(ct->p + n, "+json", 5) == 0 &&
           (ct->n == n + 5 || ct->p[n + 5] == ';' || ct->p[n + 5] == ' ');
}

/* A text attribute: present, 1..max bytes of UTF-8 without controls (in
 * structured mode, a JSON string). */
static bool text_ok(const struct hval *h, size_t max)
{
    return h->p != NULL && h->str && h->n > 0 && h->n <= max &&
           de__is_clean_utf8(h->p, h->n);
}

/* A text attribute checked by one of de_record's validators, which take
 * NUL-terminated text: no NUL inside, at most DE__TRACESTATE_MAX bytes. */
static bool c_text_ok(const struct hval *h, bool (*valid)(const char *))
{
    char tmp[DE__TRACESTATE_MAX + 1];

    if (!h->str || h->n >= sizeof tmp || memchr(h->p, '\0', h->n) != NULL)
        return false;
    memcpy(tmp, h->p, h->n);
    tmp[h->n] = '\0';
    return valid(tmp);
}

#define WHY(...) (snprintf(why, why_size, __VA_ARGS__), false)

bool de__raw_of(const rd_kafka_message_t *m, de__decoded *d, de__raw *r)
{
    rd_kafka_headers_t *h = NULL;
    rd_kafka_timestamp_type_t tst;

    d->hdrs.n = 0;
    rd_kafka_message_headers(m, &h);
    for (size_t i = 0; h != NULL; i++) {
        de__header x;
        if (rd_kafka_header_get_all(h, i, &x.name, &x.value, &x.size) !=
            RD_KAFKA_RESP_ERR_NO_ERROR)
            break;
        if (!DE__VEC_PUSH(d->hdrs, x))
            return false;
    }
    r->topic = rd_kafka_topic_name(m->rkt);
    r->partition = m->partition;
    r->offset = m->offset;
    r->key = m->key;
    r->key_len = m->key_len;
    r->value = m->payload;
    r->len = m->len;
    r->timestamp_ms = rd_kafka_message_timestamp(m, &tst);
    r->headers = d->hdrs.v;
    r->nheaders = d->hdrs.n;
    return true;
}

size_t de__raw_size(const de__raw *r)
{
    size_t n = r->key_len + r->len;

    for (size_t i = 0; i < r->nheaders; i++)
        n += strlen(r->headers[i].name) + r->headers[i].size;
    return n;
}

bool de__envelope_decode(const rd_kafka_message_t *m, const char *tmpl,
                         de__decoded *d, char *why, size_t why_size)
{
    de__raw r;

    if (!de__raw_of(m, d, &r))
        return WHY("out of memory");
    return de__raw_decode(&r, tmpl, d, why, why_size);
}

/* Buffers past this are given back once a record needs less: one outlier
 * must not keep its memory for the consumer's lifetime. */
#define DECODE_KEEP (256 * 1024)

/* Makes *buf at least need bytes; a buffer grown past DECODE_KEEP by an
 * outlier shrinks back when need is under it. */
static bool fit(char **buf, size_t *cap, size_t need)
{
    size_t want = need;
    char *nb;

    if (need <= *cap && (*cap <= DECODE_KEEP || need > DECODE_KEEP))
        return true;
    if (need <= DECODE_KEEP)
        want = DECODE_KEEP < *cap ? DECODE_KEEP : need;
    if ((nb = realloc(*buf, want)) == NULL)
        return need <= *cap; /* keeping the larger one is fine */
    *buf = nb;
    *cap = want;
    return true;
}

size_t de__decoded_capacity(const de__decoded *d)
{
    return d->cap + d->scratch_cap;
}

bool de__raw_decode(const de__raw *r, const char *tmpl, de__decoded *d,
                    char *why, size_t why_size)
{
    struct attrs a;
    const struct hval *subj;
    de_event_view *v = &d->view;
    const char *topic = r->topic, *payload = "{}";
    size_t need, off = 0, payload_len = 2, stype_len = 0;
    const char *stype_p = NULL, *action_p;
    size_t action_n;
    int64_t seqv = 0, epochv = 0, timev;
    bool structured, batch;
    char q[DE__QUOTE_MAX], q2[DE__QUOTE_MAX];
    de__json_error je;

    memset(&a, 0, sizeof a);
    /* One pass over the headers (the last of a repeated name wins, as
     * rd_kafka_header_get_last would have it). */
    for (size_t i = 0; i < r->nheaders; i++) {
        const char *name = r->headers[i].name;
        const void *val = r->headers[i].value;
        size_t size = r->headers[i].size;
        struct hval *slot = NULL;
        if (name[0] == 'c' && name[1] == 'e' && name[2] == '_')
            slot = slot_for(&a, name + 3, strlen(name + 3));
        else if (strcmp(name, DE__H_TRACEPARENT) == 0)
            slot = &a.tp;
        else if (strcmp(name, DE__H_TRACESTATE) == 0)
            slot = &a.ts;
        else if (strcasecmp(name, DE__H_CONTENT_TYPE) == 0)
            slot = &a.ctype;
        if (slot != NULL && slot != &a.data && slot != &a.data64 &&
            val != NULL) {
            slot->p = val;
            slot->n = size;
            slot->str = true;
        }
    }
    structured = is_structured(&a.ctype, &batch);
    if (batch)
        return WHY("a batch of CloudEvents (content-type %s): batched mode "
                   "is not supported",
                   de__quote(q, sizeof q, a.ctype.p, a.ctype.n));
    if (structured) {
        /* Structured mode: the attributes are members of the value. */
        struct attrs from_headers = a;
        struct walk w = {&a, d, 0};
        if (r->value == NULL || !de__json_check(r->value, r->len, &je))
            return WHY("structured-mode value (content-type %s) is not a "
                       "JSON object: %s at byte %zu",
                       de__quote(q, sizeof q, a.ctype.p, a.ctype.n),
                       r->value == NULL ? "no value"
                       : je.what        ? je.what
                                        : "invalid",
                       r->value == NULL ? (size_t)0 : je.offset);
        if (!fit(&d->scratch, &d->scratch_cap, r->len + 1))
            return WHY("out of memory");
        memset(&a, 0, sizeof a);
        (void)de__json_members(r->value, r->len, take_member, &w);
        if (a.tp.p == NULL)
            a.tp = from_headers.tp;
        if (a.ts.p == NULL)
            a.ts = from_headers.ts;
        if (a.data64.p != NULL)
            return WHY("data_base64 (binary data) in event %s: the data "
                       "must be a JSON object",
                       de__quote(q, sizeof q, a.id.p, a.id.n));
        if (a.data.p != NULL &&
            !(a.data.n == 4 && memcmp(a.data.p, "null", 4) == 0)) {
            if (a.data.p[0] != '{')
                return WHY("data of event %s is not a JSON object: %s",
                           de__quote(q, sizeof q, a.id.p, a.id.n),
                           de__quote(q2, sizeof q2, a.data.p, a.data.n));
            payload = a.data.p;
            payload_len = a.data.n;
        }
    }
    if (a.spec.p == NULL)
        return WHY("no ce_specversion: not a CloudEvent");
    if (a.spec.n != 3 || memcmp(a.spec.p, "1.0", 3) != 0)
        return WHY("ce_specversion %s: only CloudEvents 1.0 is understood",
                   de__quote(q, sizeof q, a.spec.p, a.spec.n));
    if (!text_ok(&a.id, DE__CE_ID_MAX))
        return WHY("ce_id %s missing or not 1..%d bytes of text",
                   de__quote(q, sizeof q, a.id.p, a.id.n), DE__CE_ID_MAX);
    if (!text_ok(&a.source, DE__CE_TEXT_MAX))
        return WHY("ce_source %s missing or not 1..%d bytes of text",
                   de__quote(q, sizeof q, a.source.p, a.source.n),
                   DE__CE_TEXT_MAX);
    if (!text_ok(&a.type, DE__CE_TEXT_MAX))
        return WHY("ce_type %s missing or not 1..%d bytes of text",
                   de__quote(q, sizeof q, a.type.p, a.type.n), DE__CE_TEXT_MAX);
    /* The subject: ce_subject, else ce_partitionkey, else the key. */
    subj = a.subject.p ? &a.subject : a.pkey.p ? &a.pkey : NULL;
    if (subj != NULL) {
        if (!text_ok(subj, DE__SUBJECT_ID_MAX))
            return WHY("%s %s is not 1..%d bytes of text",
                       subj == &a.subject ? "ce_subject" : "ce_partitionkey",
                       de__quote(q, sizeof q, subj->p, subj->n),
                       DE__SUBJECT_ID_MAX);
    } else if (r->key == NULL || r->key_len == 0 ||
               r->key_len > DE__SUBJECT_ID_MAX ||
               !de__is_clean_utf8(r->key, r->key_len)) {
        return WHY("no subject: no ce_subject, no ce_partitionkey, and the "
                   "key %s is not 1..%d bytes of text",
                   r->key ? de__quote(q, sizeof q, r->key, r->key_len)
                          : "(none)",
                   DE__SUBJECT_ID_MAX);
    }
    if (a.time.p == NULL) {
        /* Documented fallback: the record's timestamp. */
        timev = r->timestamp_ms;
    } else if (!a.time.str ||
               !de__parse_rfc3339_ms(a.time.p, a.time.n, &timev)) {
        return WHY("ce_time %s is not an RFC 3339 date-time",
                   de__quote(q, sizeof q, a.time.p, a.time.n));
    }
    if (a.seq.p != NULL && !de__parse_count(a.seq.p, a.seq.n, &seqv))
        return WHY("ce_subjectseq %s is not a positive decimal",
                   de__quote(q, sizeof q, a.seq.p, a.seq.n));
    if (a.epoch.p != NULL) {
        if (a.seq.p == NULL)
            return WHY("ce_subjectepoch without ce_subjectseq");
        if (!de__parse_count(a.epoch.p, a.epoch.n, &epochv))
            return WHY("ce_subjectepoch %s is not a positive decimal",
                       de__quote(q, sizeof q, a.epoch.p, a.epoch.n));
    }
    if (a.stype.p != NULL) {
        if (!de__is_type_name(a.stype.p, a.stype.n))
            return WHY("ce_subjecttype %s is not 1..%d of [A-Za-z0-9._-]",
                       de__quote(q, sizeof q, a.stype.p, a.stype.n),
                       DE__NAME_MAX);
        stype_p = a.stype.p;
        stype_len = a.stype.n;
    } else {
        /* The topic's subject type by topic.template, else the topic. */
        de__topic_subject_type(tmpl, topic, &stype_p, &stype_len);
    }
    if (a.action.p != NULL) {
        action_p = a.action.p;
        action_n = a.action.n;
    } else {
        /* The last part of ce_type: com.example.delivery.picked-up */
        const char *dot = memrchr(a.type.p, '.', a.type.n);
        action_p = dot ? dot + 1 : a.type.p;
        action_n = a.type.n - (size_t)(action_p - a.type.p);
    }
    if (!de__is_action_name(action_p, action_n))
        return WHY("%s %s is not an action (1..%d bytes of text without "
                   "spaces)",
                   a.action.p ? "ce_action" : "the end of ce_type",
                   de__quote(q, sizeof q, action_p, action_n), DE__ACTION_MAX);

    /* Trace context: de_record's rules, so that a handler passing it on
     * never forwards what a producer of ours could not have written. */
    if (a.tp.p != NULL && !c_text_ok(&a.tp, de__is_traceparent))
        return WHY("traceparent %s is not a W3C traceparent",
                   de__quote(q, sizeof q, a.tp.p, a.tp.n));
    if (a.ts.p != NULL && !c_text_ok(&a.ts, de__is_tracestate))
        return WHY("tracestate %s is not at most %d bytes of printable ASCII",
                   de__quote(q, sizeof q, a.ts.p, a.ts.n), DE__TRACESTATE_MAX);

    if (!structured && r->value != NULL && r->len > 0) {
        /* Binary mode: the value is the data. */
        if (!de__json_check(r->value, r->len, &je))
            return WHY("the value is not a JSON object: %s at byte %zu",
                       je.not_object ? "not an object"
                       : je.what     ? je.what
                                     : "invalid",
                       je.offset);
        payload = r->value;
        payload_len = r->len;
    }

    need = a.id.n + stype_len + action_n + DE__SUBJECT_ID_MAX + a.type.n +
           a.source.n + payload_len + a.tp.n + a.ts.n + strlen(topic) + 16;
    if (!fit(&d->buf, &d->cap, need))
        return WHY("out of memory");
    v->event_id = stash(d, &off, a.id.p, a.id.n);
    v->subject_type = stash(d, &off, stype_p, stype_len);
    v->action = stash(d, &off, action_p, action_n);
    v->subject_id = subj ? stash(d, &off, subj->p, subj->n)
                         : stash(d, &off, r->key, r->key_len);
    v->type = stash(d, &off, a.type.p, a.type.n);
    v->source = stash(d, &off, a.source.p, a.source.n);
    v->payload = stash(d, &off, payload, payload_len);
    v->payload_len = payload_len;
    v->traceparent = a.tp.p ? stash(d, &off, a.tp.p, a.tp.n) : NULL;
    v->tracestate = a.ts.p ? stash(d, &off, a.ts.p, a.ts.n) : NULL;
    v->topic = stash(d, &off, topic, strlen(topic));
    v->subject_seq = seqv;
    v->subject_epoch = epochv;
    v->occurred_at_ms = timev;
    v->partition = r->partition;
    v->offset = r->offset;
    return true;
}

void de__topic_subject_type(const char *tmpl, const char *topic,
                            const char **out, size_t *len)
{
    static const char ph[] = "{subject_type}";
    const char *at = tmpl ? strstr(tmpl, ph) : NULL;
    size_t tn = strlen(topic);

    *out = topic;
    *len = tn;
    if (at != NULL) {
        size_t pre = (size_t)(at - tmpl), post = strlen(at + sizeof ph - 1);
        if (tn > pre + post && strncmp(topic, tmpl, pre) == 0 &&
            strcmp(topic + tn - post, at + sizeof ph - 1) == 0) {
            *out = topic + pre;
            *len = tn - pre - post;
        }
    }
}

/* ---- integrity --------------------------------------------------------- */

/* Whether the consumer reads header `name`: what the MAC covers. */
static bool signed_header(const char *name)
{
    return strncmp(name, "ce_", 3) == 0 ||
           strcmp(name, DE__H_TRACEPARENT) == 0 ||
           strcmp(name, DE__H_TRACESTATE) == 0 ||
           strcasecmp(name, DE__H_CONTENT_TYPE) == 0;
}

static void mac_len(de__hmac *m, uint32_t n)
{
    unsigned char b[4] = {(unsigned char)(n >> 24), (unsigned char)(n >> 16),
                          (unsigned char)(n >> 8), (unsigned char)n};

    de__hmac_update(m, b, 4);
}

static void mac_bytes(de__hmac *m, const void *p, size_t n)
{
    mac_len(m, (uint32_t)n);
    if (n > 0)
        de__hmac_update(m, p, n);
}

/*
 * The canonical encoding (docs/SECURITY.md, "Integrity check"), with
 * u32(n) a 4-byte big-endian length:
 *
 *   "de-hmac-v1" u32(key) key u32(count) { u32(name) name u32(value)
 *   value }... u32(value) value
 *
 * over the signed headers in record order; an absent key or value is
 * empty, a header without a value has length 0xffffffff and no bytes.
 */
void de__record_mac(const de__hmac_key *k, const void *key, size_t key_len,
                    const de__header *h, size_t nh, const void *value,
                    size_t len, unsigned char out[32])
{
    de__hmac m = k->start;
    uint32_t count = 0;

    for (size_t i = 0; i < nh; i++)
        count += signed_header(h[i].name);
    de__hmac_update(&m, "de-hmac-v1", 10);
    mac_bytes(&m, key, key ? key_len : 0);
    mac_len(&m, count);
    for (size_t i = 0; i < nh; i++) {
        if (!signed_header(h[i].name))
            continue;
        mac_bytes(&m, h[i].name, strlen(h[i].name));
        if (h[i].value == NULL)
            mac_len(&m, UINT32_C(0xffffffff));
        else
            mac_bytes(&m, h[i].value, h[i].size);
    }
    mac_bytes(&m, value, value ? len : 0);
    de__hmac_final(&m, out);
}

bool de__envelope_sign(rd_kafka_headers_t *h, const de__hmac_key *k,
                       const void *key, size_t key_len, const void *value,
                       size_t len)
{
    de__header hs[24];
    size_t n = 0;
    unsigned char mac[32];
    char text[DE__HMAC_ID_MAX + 2 + 64 + 1];
    size_t idn = strlen(k->id);

    while (n < DE__ARRAY_LEN(hs) &&
           rd_kafka_header_get_all(h, n, &hs[n].name, &hs[n].value,
                                   &hs[n].size) == RD_KAFKA_RESP_ERR_NO_ERROR)
        n++;
    if (n == DE__ARRAY_LEN(hs))
        return false; /* more than the relay ever writes */
    de__record_mac(k, key, key_len, hs, n, value, len, mac);
    memcpy(text, k->id, idn);
    text[idn] = ':';
    de__hex(mac, sizeof mac, text + idn + 1);
    return rd_kafka_header_add(h, DE__H_HMAC, -1, text, -1) ==
           RD_KAFKA_RESP_ERR_NO_ERROR;
}

/* Compares without an early exit, so that timing tells nothing. */
static bool same_bytes(const char *a, const char *b, size_t n)
{
    unsigned char d = 0;

    for (size_t i = 0; i < n; i++)
        d |= (unsigned char)(a[i] ^ b[i]);
    return d == 0;
}

bool de__raw_verify(const de__raw *r, const de__hmac_keyring *kr, char *why,
                    size_t why_size)
{
    const de__header *sig = NULL;
    const char *colon;
    const de__hmac_key *k = NULL;
    unsigned char mac[32];
    char hex[65], q[DE__QUOTE_MAX];
    size_t idn;

    for (size_t i = 0; i < r->nheaders; i++) {
        if (strcmp(r->headers[i].name, DE__H_HMAC) != 0)
            continue;
        if (sig != NULL)
            return WHY("two %s headers: a record carries one", DE__H_HMAC);
        sig = &r->headers[i];
    }
    if (sig == NULL || sig->value == NULL)
        return WHY("no %s header: the record is not signed, and "
                   "event.hmac.key requires it",
                   DE__H_HMAC);
    colon = memchr(sig->value, ':', sig->size);
    idn = colon ? (size_t)(colon - (const char *)sig->value) : 0;
    if (colon == NULL || sig->size != idn + 1 + 64)
        return WHY("%s %s is not <key id>:<64 hex digits>", DE__H_HMAC,
                   de__quote(q, sizeof q, sig->value, sig->size));
    for (size_t i = 0; i < kr->n && k == NULL; i++)
        if (strlen(kr->keys[i].id) == idn &&
            memcmp(kr->keys[i].id, sig->value, idn) == 0)
            k = &kr->keys[i];
    if (k == NULL)
        return WHY("%s names key id %s, which event.hmac.key does not hold",
                   DE__H_HMAC, de__quote(q, sizeof q, sig->value, idn));
    de__record_mac(k, r->key, r->key_len, r->headers, r->nheaders, r->value,
                   r->len, mac);
    de__hex(mac, sizeof mac, hex);
    if (!same_bytes(hex, colon + 1, 64))
        return WHY("%s does not match: the key, a signed header or the value "
                   "was changed, or the record was signed with another "
                   "secret under key id %s",
                   DE__H_HMAC, de__quote(q, sizeof q, k->id, (size_t)-1));
    return true;
}

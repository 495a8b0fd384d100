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
    free(d->buf);
    d->buf = NULL;
    d->cap = 0;
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
    const void *p;
    size_t n;
};

/* An identifier of [a-z][a-z0-9_]*, as de_record enforces. */
static bool is_ident_n(const char *s, size_t n)
{
    if (n == 0 || n > DE__IDENT_MAX || s[0] < 'a' || s[0] > 'z')
        return false;
    for (size_t i = 1; i < n; i++)
        if (!((s[i] >= 'a' && s[i] <= 'z') || (s[i] >= '0' && s[i] <= '9') ||
              s[i] == '_'))
            return false;
    return true;
}

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

bool de__envelope_decode(const rd_kafka_message_t *m, de__decoded *d, char *why,
                         size_t why_size)
{
    rd_kafka_headers_t *h = NULL;
    struct hval spec, id, seq, epoch, stype, action, type, source, tp, ts;
    rd_kafka_timestamp_type_t tst;
    de_event_view *v = &d->view;
    size_t need, off = 0;
    int64_t seqv, epochv = 0;

    rd_kafka_message_headers(m, &h);
    /* One pass over the headers (the last of a repeated name wins, as
     * rd_kafka_header_get_last would have it). */
    memset(&spec, 0, sizeof spec);
    id = seq = epoch = stype = action = type = source = tp = ts = spec;
    for (size_t i = 0; h != NULL; i++) {
        const char *name;
        const void *val;
        size_t size;
        struct hval *slot = NULL;
        if (rd_kafka_header_get_all(h, i, &name, &val, &size) !=
            RD_KAFKA_RESP_ERR_NO_ERROR)
            break;
        if (strncmp(name, "ce_", 3) == 0) {
            const char *k = name + 3;
            if (strcmp(k, "specversion") == 0)
                slot = &spec;
            else if (strcmp(k, "id") == 0)
                slot = &id;
            else if (strcmp(k, "subjectseq") == 0)
                slot = &seq;
            else if (strcmp(k, "subjectepoch") == 0)
                slot = &epoch;
            else if (strcmp(k, "subjecttype") == 0)
                slot = &stype;
            else if (strcmp(k, "action") == 0)
                slot = &action;
            else if (strcmp(k, "type") == 0)
                slot = &type;
            else if (strcmp(k, "source") == 0)
                slot = &source;
        } else if (strcmp(name, DE__H_TRACEPARENT) == 0) {
            slot = &tp;
        } else if (strcmp(name, DE__H_TRACESTATE) == 0) {
            slot = &ts;
        }
        if (slot != NULL && val != NULL) {
            slot->p = val;
            slot->n = size;
        }
    }
    if (spec.p == NULL || spec.n != 3 || memcmp(spec.p, "1.0", 3) != 0) {
        snprintf(why, why_size,
                 "no ce_specversion 1.0 header: not a "
                 "CloudEvents record of ours");
        return false;
    }
    if (id.p == NULL || id.n == 0) {
        snprintf(why, why_size, "no ce_id header");
        return false;
    }
    if (seq.p == NULL || !de__parse_count(seq.p, seq.n, &seqv)) {
        snprintf(why, why_size,
                 "ce_subjectseq missing or not a positive "
                 "decimal");
        return false;
    }
    if (epoch.p != NULL && !de__parse_count(epoch.p, epoch.n, &epochv)) {
        snprintf(why, why_size, "ce_subjectepoch not a positive decimal");
        return false;
    }
    if (stype.p == NULL || !is_ident_n(stype.p, stype.n)) {
        snprintf(why, why_size,
                 "ce_subjecttype missing or not an "
                 "identifier");
        return false;
    }
    if (action.p == NULL || !is_ident_n(action.p, action.n)) {
        snprintf(why, why_size, "ce_action missing or not an identifier");
        return false;
    }
    if (m->key == NULL || m->key_len == 0 ||
        !de__is_clean_utf8(m->key, m->key_len)) {
        snprintf(why, why_size, "no key (the subject id)");
        return false;
    }
    if (m->payload == NULL) {
        snprintf(why, why_size, "no value (the payload)");
        return false;
    }
    if (!de__json_is_object(m->payload, m->len)) {
        snprintf(why, why_size, "the value is not a JSON object");
        return false;
    }

    need = id.n + stype.n + action.n + m->key_len + type.n + source.n + m->len +
           tp.n + ts.n + strlen(rd_kafka_topic_name(m->rkt)) + 16;
    if (need > d->cap) {
        char *nb = realloc(d->buf, need);
        if (nb == NULL) {
            snprintf(why, why_size, "out of memory");
            return false;
        }
        d->buf = nb;
        d->cap = need;
    }
    v->event_id = stash(d, &off, id.p, id.n);
    v->subject_type = stash(d, &off, stype.p, stype.n);
    v->action = stash(d, &off, action.p, action.n);
    v->subject_id = stash(d, &off, m->key, m->key_len);
    v->type = stash(d, &off, type.p ? type.p : "", type.n);
    v->source = stash(d, &off, source.p ? source.p : "", source.n);
    v->payload = stash(d, &off, m->payload, m->len);
    v->payload_len = m->len;
    v->traceparent = tp.p ? stash(d, &off, tp.p, tp.n) : NULL;
    v->tracestate = ts.p ? stash(d, &off, ts.p, ts.n) : NULL;
    v->topic = stash(d, &off, rd_kafka_topic_name(m->rkt),
                     strlen(rd_kafka_topic_name(m->rkt)));
    v->subject_seq = seqv;
    v->subject_epoch = epochv;
    v->occurred_at_ms = rd_kafka_message_timestamp(m, &tst);
    v->partition = m->partition;
    v->offset = m->offset;
    return true;
}

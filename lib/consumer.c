/* SPDX-License-Identifier: MIT */
/*
 * consumer.c -- effectively-once consumption into the consumer's database:
 * SQLite (inbox_sqlite.c), or PostgreSQL through the same seam
 * (de__consumer_kind and lib/pg/inbox_pg.c).
 *
 * A librdkafka consumer-group member reads our CloudEvents records and
 * applies each, through the handler registered for its subject type and
 * action, inside a transaction on the consumer's own database that also
 * updates the inbox: the last applied ce_subjectseq of the subject.
 *
 *  - seq <= last: a duplicate (a relay resend, a redelivery after a
 *    crash or rebalance): skipped -- unless seq == last and the ce_id
 *    differs from the one applied with that number: then two events
 *    carry one number (a restored producer, a second producer on the
 *    subject), a conflict: dead-lettered and the subject parked, never
 *    dropped as a duplicate.
 *  - seq == last + 1: applied.
 *  - seq > last + 1: a gap, handled by consumer.on.gap (park or apply).
 *
 * Kafka offsets are committed only after the database commit, so a crash
 * anywhere means redelivery, never loss, and the inbox absorbs the
 * redelivery.  The inbox lives in the database, read under BEGIN
 * IMMEDIATE, so consumers of one group sharing the database stay
 * exactly-once across rebalances.
 *
 * A failing handler rolls back its own savepoint only; the event is held
 * in memory and retried with backoff (its partition's committed offset
 * stays before it), later events of its subject wait behind it, other
 * subjects go on.  After consumer.max.attempts the event is written to
 * de_dead_letter, the subject is parked (a flag in its inbox row), and its
 * later events are stored there too, in order, until de_consumer_release
 * or de_consumer_skip.  Records that are not ours are dead-lettered as
 * 'foreign' and never stop anything.
 *
 * A transaction the database aborts for a conflict with another one (on
 * PostgreSQL a deadlock or a serialization failure: the inbox's conflict
 * op) is not any event's failure: it is rolled back, what it changed in
 * memory undone, and run again with the same events (run_again), a few
 * times before the call gives up with DE_ERR_DB.
 *
 * Invariant: every message read is, when its offset is committed, either
 * applied, a duplicate, or stored in de_dead_letter -- in the same
 * transaction that precedes the commit.
 */
#include "inbox.h"

#include <inttypes.h>
#include <jansson.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct handler {
    char *ce_type;      /* non-NULL: a handler by ce_type */
    char *subject_type; /* else by subject type ... */
    char *action;       /* ... and action (NULL: any) */
    de__fnptr fn;       /* called through kind->call, which knows its type */
    void *ctx;
} handler;

/* A subject whose event failed and is being retried, with the messages
 * held behind it (all of one partition, in offset order). */
typedef struct retrying {
    char *subject_type, *subject_id;
    DE__VEC(rd_kafka_message_t *) msgs;
    int attempts;
    int64_t next_at_ms;
    char error[600];
} retrying;

/* Progress per assigned partition: everything before next_offset is
 * applied, a duplicate or stored (but see held messages). */
typedef struct progress {
    char *topic;
    int32_t partition;
    int64_t next_offset; /* -1: nothing processed yet */
    int64_t committed;   /* last offset committed, -1 none */
} progress;

enum gap_policy { GAP_PARK, GAP_APPLY };

struct de_consumer {
    void *conn; /* the database handlers write to: sqlite3 *, PGconn * */
    const de__consumer_kind *kind;
    de_conf *conf;
    rd_kafka_t *rk;
    de__inbox *ib; /* the inbox and dead letters in db */
    DE__VEC(handler) handlers;
    DE__VEC(retrying *) retry;
    DE__VEC(progress) parts;
    DE__VEC(rd_kafka_message_t *) batch;
    /* apply_batch's scratch, kept between batches (calloc per batch cost
     * malloc_consolidate on every call): the fate of each message and the
     * subject ("type\0id") of each one waiting for a retry. */
    uint8_t *fate;
    char **ftype;
    size_t fate_cap;
    /* Subjects whose gap filled by itself: released after the commit,
     * as "type\0id". */
    DE__VEC(char *) refilled;
    const char *tmpl;     /* topic.template, for subject types */
    de__rk_bridge bridge; /* the consumer's opaque */
    bool subscribed;
    bool fatal;
    /* Handlers run in savepoints only in careful mode: a batch runs
     * without them, and is redone with them if a handler fails. */
    bool careful;
    int64_t max_attempts, backoff_ms, backoff_max_ms, batch_size;
    int64_t forget_ms;        /* consumer.subject.forget.ms; 0: never */
    int64_t id_forget_ms;     /* consumer.id.forget.ms */
    int64_t next_forget_ms;   /* monotonic */
    int64_t next_requests_ms; /* monotonic: next look at de_consumer_request */
    enum gap_policy gap;
    /* Trust (docs/SECURITY.md): consumer.sources split at its commas
     * ("" none: every source), consumer.seq.max.jump (0: no limit),
     * consumer.record.max.bytes, event.hmac.key (no keys: no check). */
    char *sources;
    size_t nsources;
    int64_t max_jump, record_max;
    int64_t dl_retention_ms; /* consumer.dead.letter.retention.ms; 0 keep */
    de__hmac_keyring hmac;
    de__decoded dec;
    de_consumer_stats stats;
    int handled; /* applied during the current call */
};

#define clog_(c, level, ...)                                                   \
    de__logp((c)->conf, (level), "consumer: ", __VA_ARGS__)

/* ---- opening --------------------------------------------------------- */

/* Properties the consumer's guarantees depend on, and why. */
static const de__rk_owned owned[] = {
    {"enable.auto.commit", "false",
     "offsets are committed only after the database commit"},
    {"enable.auto.offset.store", "false",
     "offsets are stored only after the database commit"},
};

/* A fatal consumer error (the error callback, on the polling thread). */
static void on_fatal(void *owner, rd_kafka_resp_err_t err, const char *why)
{
    de_consumer *c = owner;

    (void)err;
    (void)why; /* logged by the bridge */
    c->fatal = true;
}

static void rebalance(rd_kafka_t *rk, rd_kafka_resp_err_t err,
                      rd_kafka_topic_partition_list_t *parts, void *opaque);

const char *de__consumer_group(const de_consumer *c)
{
    const char *g = "";

    (void)de__conf_rdkafka_get(c->conf, "group.id", &g);
    return g;
}

/* librdkafka's statistics (inside de_consumer_poll): the user's statistics
 * callback, with the counters as of now (parked_subjects as of the last
 * de_consumer_stats_get). */
static void on_stats(void *owner, const char *json, size_t len)
{
    de_consumer *c = owner;
    void *ctx;
    de_stats_fn fn = de__conf_stats_cb(c->conf, &ctx);
    size_t n = 0;
    char *doc =
        de__stats_doc(de__consumer_stats_json(&c->stats, de__consumer_group(c)),
                      json, len, &n);

    if (doc == NULL) {
        clog_(c, DE_LOG_WARNING, "statistics skipped: out of memory");
        return;
    }
    fn(ctx, doc, n);
    free(doc);
}

static de_err make_kafka(de_consumer *c)
{
    static const de__rk_prop defaults[] = {
        /* Events must not be missed: a new group starts at the
         * beginning. */
        {"auto.offset.reset", "earliest"},
        /* librdkafka's 45 s would make a restarted member wait that long
         * for its partitions. */
        {"session.timeout.ms", "6000"},
        {"heartbeat.interval.ms", "1500"},
        {"client.id", "deliveryevents-consumer"},
        {"enable.partition.eof", "false"},
    };
    rd_kafka_conf_t *kc;
    const char *v;
    de_err err;

    if (!de__conf_rdkafka_get(c->conf, "group.id", &v))
        return de__fail(DE_ERR_CONFIG, "the consumer needs group.id (its "
                                       "consumer group)");
    c->bridge.conf = c->conf;
    snprintf(c->bridge.prefix, sizeof c->bridge.prefix, "consumer: ");
    c->bridge.owner = c;
    c->bridge.on_fatal = on_fatal;
    {
        void *ctx;
        if (de__conf_stats_cb(c->conf, &ctx) != NULL)
            c->bridge.on_stats = on_stats;
    }
    atomic_store(&c->bridge.brokers_up, -1);
    if ((err = de__rk_conf(c->conf, "consumer", defaults,
                           DE__ARRAY_LEN(defaults), owned, DE__ARRAY_LEN(owned),
                           &c->bridge, &kc)) != DE_OK)
        return err;
    rd_kafka_conf_set_rebalance_cb(kc, rebalance);
    if ((err = de__rk_new(RD_KAFKA_CONSUMER, kc, "consumer", &c->rk)) != DE_OK)
        return err;
    /* Everything, log lines included, is served by de_consumer_poll. */
    if (rd_kafka_poll_set_consumer(c->rk) != RD_KAFKA_RESP_ERR_NO_ERROR)
        return de__fail(DE_ERR_KAFKA, "consumer: cannot redirect its queue");
    return DE_OK;
}

/* consumer.sources as NUL-separated names in c->sources. */
static de_err read_sources(de_consumer *c)
{
    const char *s = de__conf_str(c->conf, DE__K_CONSUMER_SOURCES);

    if (s[0] == '\0')
        return DE_OK;
    if ((c->sources = strdup(s)) == NULL)
        return de__fail(DE_ERR_NOMEM, "out of memory opening the consumer");
    c->nsources = 1;
    for (char *p = c->sources; *p; p++)
        if (*p == ',') {
            *p = '\0';
            c->nsources++;
        }
    return DE_OK;
}

static de_err read_hmac_keys(de_consumer *c)
{
    char why[200];

    /* The value passed de_conf_set: only memory can fail here. */
    if (!de__hmac_keyring_parse(de__conf_str(c->conf, DE__K_EVENT_HMAC_KEY),
                                &c->hmac, why, sizeof why))
        return de__fail(DE_ERR_NOMEM, "event.hmac.key: %s", why);
    return DE_OK;
}

/* SQLite's half of the consumer: its inbox (inbox_sqlite.c) and its
 * handlers' type. */
static de_err open_sqlite_inbox(void *conn, const de_conf *conf,
                                de__inbox **out)
{
    return de__inbox_open_sqlite(
        conn, de__conf_int(conf, DE__K_OUTBOX_BUSY_TIMEOUT_MS), out);
}

static de_err call_sqlite(de__fnptr fn, void *conn, const de_event_view *v,
                          void *ctx)
{
    return ((de_handler_fn)fn)(conn, v, ctx);
}

static const de__consumer_kind sqlite_kind = {
    .on_fn = "de_consumer_on",
    .on_type_fn = "de_consumer_on_type",
    .open_inbox = open_sqlite_inbox,
    .call = call_sqlite,
};

de_err de_consumer_open(sqlite3 *db, const de_conf *conf, de_consumer **out)
{
    de_err err;

    if (out != NULL)
        *out = NULL;
    if ((err = de__check_connection(db, out == NULL, "de_consumer_open",
                                    "its inbox must survive a "
                                    "restart")) != DE_OK)
        return err;
    return de__consumer_open(db, &sqlite_kind, conf, out);
}

de_err de__consumer_open(void *conn, const de__consumer_kind *kind,
                         const de_conf *conf, de_consumer **out)
{
    de_consumer *c = NULL;
    const char *gap;
    de_err err;

    *out = NULL;
    c = calloc(1, sizeof *c);
    if (c == NULL)
        return de__fail(DE_ERR_NOMEM, "out of memory opening the consumer");
    c->conn = conn;
    c->kind = kind;
    c->conf = de__conf_dup(conf);
    if (c->conf == NULL) {
        err = de__fail(DE_ERR_NOMEM, "out of memory copying the configuration");
        goto fail;
    }
    c->max_attempts = de__conf_int(c->conf, DE__K_CONSUMER_MAX_ATTEMPTS);
    c->backoff_ms = de__conf_int(c->conf, DE__K_CONSUMER_RETRY_BACKOFF_MS);
    c->backoff_max_ms =
        de__conf_int(c->conf, DE__K_CONSUMER_RETRY_BACKOFF_MAX_MS);
    c->batch_size = de__conf_int(c->conf, DE__K_CONSUMER_BATCH_SIZE);
    c->forget_ms = de__conf_int(c->conf, DE__K_CONSUMER_SUBJECT_FORGET_MS);
    c->id_forget_ms = de__conf_int(c->conf, DE__K_CONSUMER_ID_FORGET_MS);
    c->tmpl = de__conf_str(c->conf, DE__K_TOPIC_TEMPLATE);
    gap = de__conf_str(c->conf, DE__K_CONSUMER_ON_GAP);
    c->gap = strcmp(gap, "apply") == 0 ? GAP_APPLY : GAP_PARK;
    c->max_jump = de__conf_int(c->conf, DE__K_CONSUMER_SEQ_MAX_JUMP);
    c->record_max = de__conf_int(c->conf, DE__K_CONSUMER_RECORD_MAX_BYTES);
    c->dl_retention_ms =
        de__conf_int(c->conf, DE__K_CONSUMER_DEAD_LETTER_RETENTION_MS);
    if ((err = read_sources(c)) != DE_OK || (err = read_hmac_keys(c)) != DE_OK)
        goto fail;
    if ((err = kind->open_inbox(conn, c->conf, &c->ib)) != DE_OK)
        goto fail;
    if ((err = make_kafka(c)) != DE_OK)
        goto fail;
    *out = c;
    return DE_OK;
fail:
    de_consumer_close(c);
    return err;
}

/* Adds a handler (strings copied) unless one is registered for the same
 * ce_type, or the same subject type and action. */
static de_err add_handler(de_consumer *c, const char *ce_type,
                          const char *subject_type, const char *action,
                          de__fnptr fn, void *ctx)
{
    handler h = {NULL, NULL, NULL, fn, ctx};

    if (c->subscribed)
        return de__fail(DE_ERR_STATE, "registering a handler after the first "
                                      "de_consumer_poll: register handlers "
                                      "first");
    for (size_t i = 0; i < c->handlers.n; i++) {
        handler *o = &c->handlers.v[i];
        bool same =
            ce_type
                ? o->ce_type && strcmp(o->ce_type, ce_type) == 0
                : o->ce_type == NULL &&
                      strcmp(o->subject_type, subject_type) == 0 &&
                      ((o->action == NULL && action == NULL) ||
                       (o->action && action && strcmp(o->action, action) == 0));
        if (same)
            return ce_type ? de__fail(DE_ERR_ARG,
                                      "a handler for ce_type '%s' is already "
                                      "registered",
                                      ce_type)
                           : de__fail(DE_ERR_ARG,
                                      "a handler for %s.%s is already "
                                      "registered",
                                      subject_type, action ? action : "*");
    }
    h.ce_type = ce_type ? strdup(ce_type) : NULL;
    h.subject_type = subject_type ? strdup(subject_type) : NULL;
    h.action = action ? strdup(action) : NULL;
    if ((ce_type && h.ce_type == NULL) ||
        (subject_type && h.subject_type == NULL) ||
        (action && h.action == NULL) || !DE__VEC_PUSH(c->handlers, h)) {
        free(h.ce_type);
        free(h.subject_type);
        free(h.action);
        return de__fail(DE_ERR_NOMEM, "out of memory registering a handler");
    }
    return DE_OK;
}

/* A consumer whose handlers are registered with another function
 * (another database's handler type): use instead names it. */
static de_err wrong_kind(const char *who, const char *use)
{
    return de__fail(DE_ERR_ARG,
                    "%s cannot register a handler on this consumer: its "
                    "handlers write to another kind of database; use %s",
                    who, use);
}

de_err de__consumer_on(de_consumer *c, const char *who,
                       const char *subject_type, const char *action,
                       de__fnptr fn, void *ctx)
{
    char q[DE__QUOTE_MAX];

    if (c == NULL || fn == NULL)
        return de__fail(DE_ERR_ARG,
                        "%s needs a consumer and a handler (got NULL %s)", who,
                        c == NULL ? "consumer" : "fn");
    if (strcmp(c->kind->on_fn, who) != 0)
        return wrong_kind(who, c->kind->on_fn);
    if (subject_type == NULL ||
        !de__is_type_name(subject_type, strlen(subject_type)))
        return de__fail(
            DE_ERR_ARG, "subject_type %s must be 1..%d of [A-Za-z0-9._-]",
            de__quote(q, sizeof q, subject_type, (size_t)-1), DE__NAME_MAX);
    if (action != NULL && !de__is_action_name(action, strlen(action)))
        return de__fail(DE_ERR_ARG,
                        "action %s must be 1..%d bytes of UTF-8 without "
                        "control characters or spaces, or NULL",
                        de__quote(q, sizeof q, action, (size_t)-1),
                        DE__ACTION_MAX);
    return add_handler(c, NULL, subject_type, action, fn, ctx);
}

de_err de_consumer_on(de_consumer *c, const char *subject_type,
                      const char *action, de_handler_fn fn, void *ctx)
{
    return de__consumer_on(c, "de_consumer_on", subject_type, action,
                           (de__fnptr)fn, ctx);
}

de_err de__consumer_on_type(de_consumer *c, const char *who,
                            const char *ce_type, de__fnptr fn, void *ctx)
{
    char q[DE__QUOTE_MAX];

    if (c == NULL || fn == NULL)
        return de__fail(DE_ERR_ARG,
                        "%s needs a consumer and a handler (got NULL %s)", who,
                        c == NULL ? "consumer" : "fn");
    if (strcmp(c->kind->on_type_fn, who) != 0)
        return wrong_kind(who, c->kind->on_type_fn);
    if (ce_type == NULL || ce_type[0] == '\0' ||
        strlen(ce_type) > DE__CE_TEXT_MAX ||
        !de__is_clean_utf8(ce_type, strlen(ce_type)))
        return de__fail(DE_ERR_ARG,
                        "ce_type %s must be 1..%d bytes of UTF-8 without "
                        "control characters",
                        de__quote(q, sizeof q, ce_type, (size_t)-1),
                        DE__CE_TEXT_MAX);
    return add_handler(c, ce_type, NULL, NULL, fn, ctx);
}

de_err de_consumer_on_type(de_consumer *c, const char *ce_type,
                           de_handler_fn fn, void *ctx)
{
    return de__consumer_on_type(c, "de_consumer_on_type", ce_type,
                                (de__fnptr)fn, ctx);
}

/* The handler for an event: by its ce_type, else by its subject type and
 * action, else by its subject type alone. */
static const handler *find_handler(de_consumer *c, const de_event_view *v)
{
    const handler *any = NULL, *pair = NULL;

    for (size_t i = 0; i < c->handlers.n; i++) {
        const handler *h = &c->handlers.v[i];
        if (h->ce_type != NULL) {
            if (strcmp(h->ce_type, v->type) == 0)
                return h;
            continue;
        }
        if (strcmp(h->subject_type, v->subject_type) != 0)
            continue;
        if (h->action == NULL)
            any = h;
        else if (strcmp(h->action, v->action) == 0)
            pair = h;
    }
    return pair ? pair : any;
}

/* ---- offsets ---------------------------------------------------------- */

static progress *progress_for(de_consumer *c, const char *topic,
                              int32_t partition)
{
    progress p;

    for (size_t i = 0; i < c->parts.n; i++)
        if (c->parts.v[i].partition == partition &&
            strcmp(c->parts.v[i].topic, topic) == 0)
            return &c->parts.v[i];
    p.topic = strdup(topic);
    p.partition = partition;
    p.next_offset = -1;
    p.committed = -1;
    if (p.topic == NULL || !DE__VEC_PUSH(c->parts, p)) {
        free(p.topic);
        return NULL;
    }
    return &c->parts.v[c->parts.n - 1];
}

/* The offset a partition may be committed at: its progress, but never
 * past a message still held for a retry. */
static int64_t commit_point(de_consumer *c, const progress *p)
{
    int64_t at = p->next_offset;

    for (size_t i = 0; i < c->retry.n; i++) {
        retrying *r = c->retry.v[i];
        for (size_t j = 0; j < r->msgs.n; j++) {
            rd_kafka_message_t *m = r->msgs.v[j];
            if (m->partition == p->partition && m->offset < at &&
                strcmp(rd_kafka_topic_name(m->rkt), p->topic) == 0)
                at = m->offset;
        }
    }
    return at;
}

/* Commits every partition's progress (async unless sync).  A failure is
 * logged; nothing is lost by it (uncommitted offsets are read again and
 * the inbox absorbs them), but a synchronous one is returned. */
static de_err commit_offsets(de_consumer *c, bool sync)
{
    rd_kafka_topic_partition_list_t *l =
        rd_kafka_topic_partition_list_new((int)c->parts.n + 1);
    rd_kafka_resp_err_t err;

    for (size_t i = 0; i < c->parts.n; i++) {
        progress *p = &c->parts.v[i];
        int64_t at = commit_point(c, p);
        if (at < 0 || at == p->committed)
            continue;
        rd_kafka_topic_partition_list_add(l, p->topic, p->partition)->offset =
            at;
        p->committed = at;
    }
    err = l->cnt > 0 ? rd_kafka_commit(c->rk, l, sync ? 0 : 1)
                     : RD_KAFKA_RESP_ERR_NO_ERROR;
    rd_kafka_topic_partition_list_destroy(l);
    if (err == RD_KAFKA_RESP_ERR_NO_ERROR ||
        err == RD_KAFKA_RESP_ERR__NO_OFFSET)
        return DE_OK;
    clog_(c, DE_LOG_WARNING,
          "committing offsets failed: %s (the events are read again and "
          "skipped as duplicates)",
          rd_kafka_err2str(err));
    return de__fail(DE_ERR_KAFKA,
                    "consumer: committing offsets failed: %s (nothing is "
                    "lost: the events are read again and skipped as "
                    "duplicates)",
                    rd_kafka_err2str(err));
}

static void note_processed(de_consumer *c, const rd_kafka_message_t *m)
{
    progress *p = progress_for(c, rd_kafka_topic_name(m->rkt), m->partition);

    if (p != NULL && m->offset + 1 > p->next_offset)
        p->next_offset = m->offset + 1;
}

/* ---- applying --------------------------------------------------------- */

static void free_retrying(retrying *r)
{
    if (r == NULL)
        return;
    for (size_t i = 0; i < r->msgs.n; i++)
        rd_kafka_message_destroy(r->msgs.v[i]);
    DE__VEC_FREE(r->msgs);
    free(r->subject_type);
    free(r->subject_id);
    free(r);
}

static retrying *find_retrying(de_consumer *c, const char *type, const char *id)
{
    for (size_t i = 0; i < c->retry.n; i++)
        if (strcmp(c->retry.v[i]->subject_type, type) == 0 &&
            strcmp(c->retry.v[i]->subject_id, id) == 0)
            return c->retry.v[i];
    return NULL;
}

/* The inbox's operations, on the consumer's inbox. */
#define IB(c, op, ...) ((c)->ib->ops->op((c)->ib, __VA_ARGS__))
#define IB0(c, op) ((c)->ib->ops->op((c)->ib))

/* What a foreign dead letter keeps of an oversized record: a record
 * anyone can write must not grow the consumer's database by its size.
 * Beyond these, the first bytes are kept with the SHA-256 of the whole. */
#define FOREIGN_VALUE_KEEP 65536
#define FOREIGN_PART_KEEP 1024

static json_t *header_value(const void *val, size_t size, bool bounded);

/* A cut header value: {"prefix": <its first bytes, as header_value
 * gives them>, "bytes": size, "sha256": "..."}. */
static json_t *cut_header_value(const void *val, size_t size)
{
    unsigned char d[32];
    char hex[65];
    size_t keep = FOREIGN_PART_KEEP;

    /* Cut on a UTF-8 boundary, so that a text stays a text. */
    while (keep > 0 && (((const unsigned char *)val)[keep] & 0xc0) == 0x80)
        keep--;
    de__sha256_digest(val, size, d);
    de__hex(d, sizeof d, hex);
    return json_pack("{s:o,s:I,s:s}", "prefix", header_value(val, keep, false),
                     "bytes", (json_int_t)size, "sha256", hex);
}

/* A header value for de_dead_letter.record_headers: a JSON string when it
 * is UTF-8, else {"base64": "..."}; null for a header without a value;
 * bounded (a foreign record): one over FOREIGN_PART_KEEP bytes cut. */
static json_t *header_value(const void *val, size_t size, bool bounded)
{
    static const char b64[] =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    const unsigned char *p = val;
    json_t *j;
    char *out;
    size_t o = 0;

    if (val == NULL)
        return json_null();
    if (bounded && size > FOREIGN_PART_KEEP)
        return cut_header_value(val, size);
    if ((j = json_stringn(val, size)) != NULL)
        return j;
    if ((out = malloc(size / 3 * 4 + 5)) == NULL)
        return NULL;
    for (size_t i = 0; i < size; i += 3) {
        uint32_t w = (uint32_t)p[i] << 16;
        if (i + 1 < size)
            w |= (uint32_t)p[i + 1] << 8;
        if (i + 2 < size)
            w |= p[i + 2];
        out[o++] = b64[w >> 18];
        out[o++] = b64[(w >> 12) & 63];
        out[o++] = i + 1 < size ? b64[(w >> 6) & 63] : '=';
        out[o++] = i + 2 < size ? b64[w & 63] : '=';
    }
    out[o] = '\0';
    j = json_pack("{s:s}", "base64", out);
    free(out);
    return j;
}

/* A record's headers as JSON, in order: [["name", value], ...]; NULL when
 * it has none (or out of memory: the dead letter then lacks them, and the
 * log says so). */
static char *headers_json(de_consumer *c, const rd_kafka_message_t *m,
                          bool bounded)
{
    rd_kafka_headers_t *h = NULL;
    json_t *a;
    char *text = NULL;

    if (rd_kafka_message_headers(m, &h) != RD_KAFKA_RESP_ERR_NO_ERROR ||
        h == NULL || (a = json_array()) == NULL)
        return NULL;
    for (size_t i = 0;; i++) {
        const char *name;
        const void *val;
        size_t size;
        json_t *pair;
        if (rd_kafka_header_get_all(h, i, &name, &val, &size) !=
            RD_KAFKA_RESP_ERR_NO_ERROR)
            break;
        pair = json_pack("[s%o]", name, strlen(name),
                         header_value(val, size, bounded));
        if (pair == NULL || json_array_append_new(a, pair) != 0)
            goto done;
    }
    text = json_dumps(a, JSON_COMPACT | JSON_ENSURE_ASCII);
done:
    json_decref(a);
    if (text == NULL)
        clog_(c, DE_LOG_WARNING,
              "out of memory keeping the headers of %s [%d] @%lld in its "
              "dead letter",
              rd_kafka_topic_name(m->rkt), (int)m->partition,
              (long long)m->offset);
    return text;
}

/* Cuts a foreign record's part to keep bytes, saying so (with the
 * SHA-256 of the whole) at the end of error. */
static void cut_part(const char *what, const void *p, size_t *len, size_t keep,
                     char *error, size_t error_size)
{
    unsigned char d[32];
    char hex[65];
    size_t at = strlen(error);

    if (p == NULL || *len <= keep)
        return;
    de__sha256_digest(p, *len, d);
    de__hex(d, sizeof d, hex);
    snprintf(error + at, error_size - at,
             "; %s of %zu bytes cut to its first %zu (sha256 %s)", what, *len,
             keep, hex);
    *len = keep;
}

/* Stores the record m (and the event v read from it, NULL for a record
 * that is not a usable event) in de_dead_letter, whole -- but for a
 * foreign one, which anyone able to write the topic can make as large as
 * Kafka allows, only the first bytes of an oversized key, value or header
 * value, with the SHA-256 of each in the error.  *id (may be NULL)
 * receives the dead letter's id. */
static de_err dead_letter(de_consumer *c, const char *kind,
                          const rd_kafka_message_t *m, const de_event_view *v,
                          const char *error, int attempts, int64_t *id)
{
    bool bounded = strcmp(kind, "foreign") == 0;
    rd_kafka_timestamp_type_t tst;
    de__dl_origin o = {rd_kafka_topic_name(m->rkt),
                       m->partition,
                       m->offset,
                       m->payload,
                       m->len,
                       m->key,
                       m->key_len,
                       headers_json(c, m, bounded),
                       rd_kafka_message_timestamp(m, &tst)};
    char why[800];
    de_err err;

    if (bounded) {
        snprintf(why, sizeof why, "%s", error);
        cut_part("the key", o.key, &o.key_len, FOREIGN_PART_KEEP, why,
                 sizeof why);
        cut_part("the value", o.value, &o.value_len, FOREIGN_VALUE_KEEP, why,
                 sizeof why);
        if (o.value_len < m->len)
            v = NULL; /* its payload column would hold the whole value */
        error = why;
    }
    err = IB(c, dl_insert, kind, &o, v, error, attempts, id);
    free((char *)(uintptr_t)o.headers);
    return err;
}

/* The handler said no, or ended the transaction it must not end. */
static de_err handler_failed(de_consumer *c, const de_event_view *v, de_err rc,
                             uint64_t serial, char *error, size_t error_size)
{
    /* Only a message set during the handler's call explains its failure;
     * an older one would mislead the log and the dead letter. */
    bool fresh = de__errmsg_serial() != serial;

    if (!IB0(c, in_txn))
        return de__fail(DE_ERR_DB,
                        "consumer: the handler for %s (%s.%s) ended the "
                        "transaction; handlers must not COMMIT or ROLLBACK",
                        v->type, v->subject_type, v->action);
    snprintf(error, error_size, "handler for %s (%s.%s) returned %s%s%s",
             v->type, v->subject_type, v->action, de_err_name(rc),
             fresh ? ": " : "", fresh ? de_errmsg() : "");
    return DE__HANDLER_FAILED;
}

/* What an applied event leaves in the inbox. */
enum record {
    REC_NONE, /* nothing: claimed already, or a released conflict that
                 does not move the subject on */
    REC_PUT,  /* its number, as the subject's last */
    REC_SEEN, /* its (ce_source, ce_id): an event without a number */
    REC_CLAIM /* its number, claimed (careful mode) */
};

/* run_handler: the event was taken by another transaction (another
 * consumer of the database) before this one could claim it. */
#define DE__TAKEN ((de_err)110)

/* Runs the handler (in a savepoint in careful mode) and records the event
 * in the inbox as rec says.  REC_SEEN and REC_CLAIM take the event
 * *before* the handler runs, inside its savepoint, so that a failing
 * handler gives it back: a consumer sharing the database that is applying
 * the same event holds its inbox row (or id) until it commits, the claim
 * waits for that and then finds it taken.  A read of the inbox instead
 * would not wait (on PostgreSQL, READ COMMITTED: it sees the state
 * before the other's commit), and the handler would apply the event a
 * second time.  DE_OK: applied; DE__TAKEN: taken by another transaction,
 * nothing done; DE__HANDLER_FAILED: the handler failed (why in error),
 * its effects undone; DE__REDO: the handler failed outside careful mode
 * -- the caller must roll the whole batch back and redo it carefully;
 * anything else: a database failure of the whole transaction. */
static de_err run_handler(de_consumer *c, const de_event_view *v,
                          enum record rec, char *error, size_t error_size)
{
    const handler *h = find_handler(c, v);
    uint64_t serial = de__errmsg_serial();
    bool sp = c->careful && h != NULL, claimed = true;
    de_err rc = DE_OK, err;

    if (sp && (rc = IB0(c, savepoint)) != DE_OK)
        return rc;
    if (rec == REC_SEEN)
        rc = IB(c, seen_claim, v, &claimed);
    else if (rec == REC_CLAIM)
        rc = IB(c, claim, v, &claimed);
    if (rc != DE_OK)
        return rc;
    if (!claimed)
        return sp && (rc = IB0(c, release)) != DE_OK ? rc : DE__TAKEN;
    if (h != NULL) {
        rc = c->kind->call(h->fn, c->conn, v, h->ctx);
        if (rc != DE_OK && IB0(c, conflict) != NULL)
            /* Not the event's failure: the server aborted the whole
             * transaction for a conflict with another one, which
             * run_again answers by running it again. */
            return de__fail(DE_ERR_DB,
                            "consumer: the handler for %s (%s.%s) failed "
                            "with SQLSTATE %s",
                            v->type, v->subject_type, v->action,
                            IB0(c, conflict));
        if (rc != DE_OK) {
            if (!c->careful)
                return IB0(c, in_txn) ? DE__REDO
                                      : handler_failed(c, v, rc, serial, error,
                                                       error_size);
            if ((err = IB0(c, rollback_to)) != DE_OK ||
                (err = IB0(c, release)) != DE_OK)
                return err;
            return handler_failed(c, v, rc, serial, error, error_size);
        }
        if (!IB0(c, in_txn))
            return handler_failed(c, v, DE_ERR_STATE, serial, error,
                                  error_size);
        if (sp && (rc = IB0(c, release)) != DE_OK)
            return rc;
    }
    if (rec == REC_PUT &&
        (rc = IB(c, put, v->subject_type, v->subject_id, v->subject_epoch,
                 v->subject_seq, v->event_id, v->source)) != DE_OK)
        return rc;
    c->stats.applied++;
    c->handled++;
    return DE_OK;
}

/* What became of a message inside the transaction. */
enum outcome { O_DONE, O_RETRY, O_DB_ERROR, O_REDO };

/* Parks a subject behind a dead letter (kind failed, gap or conflict):
 * this event is the one a release or skip acts on first. */
static de_err park(de_consumer *c, const rd_kafka_message_t *m,
                   const de_event_view *v, const char *kind, const char *error,
                   int attempts)
{
    int64_t id = 0;
    de_err err;

    if ((err = dead_letter(c, kind, m, v, error, attempts, &id)) != DE_OK ||
        (err = IB(c, park, v->subject_type, v->subject_id, true, id)) != DE_OK)
        return err;
    clog_(c, DE_LOG_ERR,
          "%s %s parked at event %s (ce_subjectseq %lld, %s, %s [%d] @%lld): "
          "%s; its later events wait in de_dead_letter until "
          "de_consumer_release or de_consumer_skip",
          v->subject_type, v->subject_id, v->event_id,
          (long long)v->subject_seq, kind, v->topic, (int)v->partition,
          (long long)v->offset, error);
    return DE_OK;
}

/* Where a numbered event stands against its subject's inbox entry, the
 * subject's park aside. */
enum verdict { V_NEXT, V_DUPLICATE, V_CONFLICT, V_GAP };

static enum verdict classify(const de_event_view *v, const de__inbox_entry *e,
                             char *error, size_t error_size)
{
    bool renumbered = false;
    int64_t last = e->seq;
    const char *last_id = e->last_id;

    if (e->source[0] != '\0' && strcmp(e->source, v->source) != 0) {
        /* One owner per numbered subject: a second producer's numbers
         * would displace the owner's (its 5 applied, the owner's 5 then
         * taken for a duplicate). */
        char q1[DE__QUOTE_MAX], q2[DE__QUOTE_MAX], q3[DE__QUOTE_MAX];
        snprintf(error, error_size,
                 "conflict: event %s from ce_source %s numbers a subject "
                 "that ce_source %s numbers (ce_subjectseq %lld; the "
                 "subject is at %lld): one producer per numbered subject",
                 de__quote(q1, sizeof q1, v->event_id, (size_t)-1),
                 de__quote(q2, sizeof q2, v->source, (size_t)-1),
                 de__quote(q3, sizeof q3, e->source, (size_t)-1),
                 (long long)v->subject_seq, (long long)e->seq);
        return V_CONFLICT;
    }
    if (v->subject_epoch < e->epoch)
        /* From a numbering the subject has left: Kafka keeps a subject's
         * order, so every event of it came before the newer numbering's
         * first, and this one is read again. */
        return V_DUPLICATE;
    if (v->subject_epoch > e->epoch) {
        /* A new numbering (the subject was idle and forgotten by the
         * relay): it starts at 1. */
        renumbered = e->seq > 0;
        last = 0;
        last_id = "";
    }
    if (v->subject_seq == last && last_id[0] != '\0' &&
        strcmp(last_id, v->event_id) != 0) {
        /* Two events with one number: never drop one as a duplicate. */
        snprintf(error, error_size,
                 "conflict: ce_subjectseq %lld was applied as event %s, "
                 "and event %s carries the same number (a producer "
                 "restored from an older state, or a second producer of "
                 "this subject)",
                 (long long)v->subject_seq, last_id, v->event_id);
        return V_CONFLICT;
    }
    if (v->subject_seq <= last)
        return V_DUPLICATE;
    if (v->subject_seq > last + 1) {
        snprintf(error, error_size,
                 "gap: ce_subjectseq %lld after %lld%s (events %lld..%lld "
                 "never arrived)",
                 (long long)v->subject_seq, (long long)last,
                 renumbered ? " in a new numbering (ce_subjectepoch)" : "",
                 (long long)last + 1, (long long)v->subject_seq - 1);
        return V_GAP;
    }
    return V_NEXT;
}

/* Remembers a subject whose gap filled by itself, for a release after
 * the commit. */
static bool note_refilled(de_consumer *c, const de_event_view *v)
{
    size_t lt = strlen(v->subject_type), li = strlen(v->subject_id);
    char *k;

    for (size_t i = 0; i < c->refilled.n; i++)
        if (strcmp(c->refilled.v[i], v->subject_type) == 0 &&
            strcmp(c->refilled.v[i] + lt + 1, v->subject_id) == 0)
            return true;
    if ((k = malloc(lt + li + 2)) == NULL)
        return false;
    memcpy(k, v->subject_type, lt + 1);
    memcpy(k + lt + 1, v->subject_id, li + 1);
    if (!DE__VEC_PUSH(c->refilled, k)) {
        free(k);
        return false;
    }
    return true;
}

/* Stores an event of a parked subject behind its park, once. */
static enum outcome wait_behind(de_consumer *c, const rd_kafka_message_t *m,
                                const de_event_view *v, const char *kind,
                                const char *error)
{
    bool has;

    if (IB(c, dl_has, v, &has) != DE_OK ||
        (!has && dead_letter(c, kind, m, v, error, 0, NULL) != DE_OK))
        return O_DB_ERROR;
    if (!has && strcmp(kind, "conflict") == 0) {
        c->stats.dead_lettered++;
        c->stats.conflicts++;
    }
    return O_DONE;
}

/* Whether a numbered event jumps further above its subject's last number
 * than consumer.seq.max.jump allows (why in error).  The last number is
 * the inbox's in the event's numbering, 0 for a subject the inbox does
 * not remember there: never seen, forgotten, or a newer numbering. */
static bool too_far(const de_consumer *c, const de_event_view *v,
                    const de__inbox_entry *e, char *error, size_t error_size)
{
    int64_t last = v->subject_epoch == e->epoch ? e->seq : 0;

    if (c->max_jump == 0 || v->subject_seq - last <= c->max_jump)
        return false;
    snprintf(error, error_size,
             "implausible: ce_subjectseq %lld of event %s jumps %lld above "
             "the subject's last number %lld, more than "
             "consumer.seq.max.jump (%lld): taken for a forged or broken "
             "record, never applied",
             (long long)v->subject_seq, v->event_id,
             (long long)(v->subject_seq - last), (long long)last,
             (long long)c->max_jump);
    return true;
}

/* Dead-letters an event as foreign without touching its subject: it is
 * not applied, parks nothing and moves no number. */
static enum outcome untrusted(de_consumer *c, const rd_kafka_message_t *m,
                              const de_event_view *v, const char *error)
{
    c->stats.foreign++;
    clog_(c, DE_LOG_WARNING,
          "%s %s: record at %s [%d] @%lld: %s; stored in de_dead_letter as "
          "foreign",
          v->subject_type, v->subject_id, v->topic, (int)v->partition,
          (long long)v->offset, error);
    return dead_letter(c, "foreign", m, v, error, 0, NULL) == DE_OK
               ? O_DONE
               : O_DB_ERROR;
}

/* Applies one decoded event inside the open transaction. */
static enum outcome apply_one(de_consumer *c, const rd_kafka_message_t *m,
                              const de_event_view *v, int attempts, char *error,
                              size_t error_size)
{
    de__inbox_entry e;
    bool claimed = false, seen;
    enum record rec = REC_PUT;
    enum verdict vd;
    de_err err;

    error[0] = '\0';
    if (v->subject_seq == 0) {
        /* No number: applied once by (ce_source, ce_id), in the order
         * read. */
        if (IB(c, seen, v, &seen) != DE_OK)
            return O_DB_ERROR;
        if (seen) {
            c->stats.duplicates++;
            return O_DONE;
        }
        if (IB(c, get, v->subject_type, v->subject_id, &e) != DE_OK)
            return O_DB_ERROR;
        if (e.parked)
            return wait_behind(c, m, v, "waiting",
                               "waiting behind a parked event");
        rec = REC_SEEN;
        goto run;
    }
    /* In careful mode the claim must be undone with the handler's
     * effects, so run_handler makes it inside the handler's savepoint;
     * not taken there, the event is classified as below. */
    if (c->careful) {
        err = run_handler(c, v, REC_CLAIM, error, error_size);
        if (err != DE__TAKEN)
            goto ran;
    } else if (IB(c, claim, v, &claimed) != DE_OK) {
        return O_DB_ERROR;
    }
    if (claimed) {
        rec = REC_NONE;
        goto run;
    }
    if (IB(c, get, v->subject_type, v->subject_id, &e) != DE_OK)
        return O_DB_ERROR;
    vd = classify(v, &e, error, error_size);
    if (vd == V_GAP && too_far(c, v, &e, error, error_size))
        return untrusted(c, m, v, error);
    if (vd == V_DUPLICATE) {
        c->stats.duplicates++;
        return O_DONE;
    }
    if (e.parked) {
        if (vd == V_CONFLICT)
            return wait_behind(c, m, v, "conflict", error);
        if (vd == V_NEXT && strcmp(e.park_kind, "gap") == 0 &&
            de__number_after(e.park_epoch, e.park_seq, v->subject_epoch,
                             v->subject_seq)) {
            /* It fills the gap the subject is parked on: apply it, and
             * once the parked event is next, release the subject. */
            if (e.park_epoch == v->subject_epoch &&
                e.park_seq == v->subject_seq + 1 && !note_refilled(c, v)) {
                de__fail(DE_ERR_NOMEM, "consumer: out of memory");
                return O_DB_ERROR;
            }
            goto run;
        }
        return wait_behind(c, m, v, "waiting", "waiting behind a parked event");
    }
    if (vd == V_CONFLICT) {
        if (park(c, m, v, "conflict", error, 0) != DE_OK)
            return O_DB_ERROR;
        c->stats.dead_lettered++;
        c->stats.conflicts++;
        return O_DONE;
    }
    if (vd == V_GAP) {
        c->stats.gaps++;
        if (c->gap == GAP_PARK) {
            if (park(c, m, v, "gap", error, 0) != DE_OK)
                return O_DB_ERROR;
            return O_DONE;
        }
        clog_(c, DE_LOG_WARNING,
              "%s %s: %s; applying it (consumer.on.gap=apply)", v->subject_type,
              v->subject_id, error);
    }
run:
    err = run_handler(c, v, rec, error, error_size);
ran:
    if (err == DE__TAKEN) { /* its id, by another transaction */
        c->stats.duplicates++;
        return O_DONE;
    }
    if (err == DE_OK)
        return O_DONE;
    if (err == DE__REDO)
        return O_REDO;
    if (err != DE__HANDLER_FAILED)
        return O_DB_ERROR;
    c->stats.retries++;
    if (attempts + 1 >= c->max_attempts) {
        if (park(c, m, v, "failed", error, attempts + 1) != DE_OK)
            return O_DB_ERROR;
        c->stats.dead_lettered++;
        return O_DONE;
    }
    return O_RETRY;
}

/* Whether v's ce_source may number subjects (consumer.sources). */
static bool source_trusted(const de_consumer *c, const de_event_view *v)
{
    const char *s = c->sources;

    if (c->nsources == 0 || v->subject_seq == 0)
        return true;
    for (size_t i = 0; i < c->nsources; i++, s += strlen(s) + 1)
        if (strcmp(s, v->source) == 0)
            return true;
    return false;
}

/* Whether some handler may take events of v's subject type: only those
 * subjects get inbox rows.  A handler by ce_type may take any. */
static bool type_handled(const de_consumer *c, const de_event_view *v)
{
    for (size_t i = 0; i < c->handlers.n; i++) {
        const handler *h = &c->handlers.v[i];
        if (h->ce_type != NULL || strcmp(h->subject_type, v->subject_type) == 0)
            return true;
    }
    return false;
}

/*
 * Decodes a message and admits it: *ours false (and a 'foreign' dead
 * letter: the record, with the reason) when it is larger than
 * consumer.record.max.bytes, fails the integrity check
 * (event.hmac.key), is not a usable CloudEvent, or is a numbered event
 * of a source consumer.sources does not list -- checked in that order,
 * before anything is applied; *ours false without a dead letter for an
 * event no handler can take (no inbox row for its subject).
 */
static enum outcome decode_or_park(de_consumer *c, rd_kafka_message_t *m,
                                   bool *ours)
{
    char why[400], q[DE__QUOTE_MAX];
    de__raw r;
    size_t size;

    *ours = false;
    if (!de__raw_of(m, &c->dec, &r)) {
        snprintf(why, sizeof why, "out of memory reading its headers");
    } else if ((size = de__raw_size(&r)) > (uint64_t)c->record_max) {
        snprintf(why, sizeof why,
                 "the record is %zu bytes (key, value, header names and "
                 "values), over consumer.record.max.bytes (%lld)",
                 size, (long long)c->record_max);
    } else if (c->hmac.n > 0 &&
               !de__raw_verify(&r, &c->hmac, why, sizeof why)) {
        /* why says it */
    } else if (!de__raw_decode(&r, c->tmpl, &c->dec, why, sizeof why)) {
        /* why says it */
    } else if (!source_trusted(c, &c->dec.view)) {
        snprintf(why, sizeof why,
                 "untrusted: ce_source %s is not in consumer.sources, and "
                 "only those may number subjects (event %s, ce_subjectseq "
                 "%lld)",
                 de__quote(q, sizeof q, c->dec.view.source, (size_t)-1),
                 c->dec.view.event_id, (long long)c->dec.view.subject_seq);
    } else if (!type_handled(c, &c->dec.view)) {
        return O_DONE; /* nothing to apply, nothing to remember */
    } else {
        *ours = true;
        return O_DONE;
    }
    c->stats.foreign++;
    clog_(c, DE_LOG_WARNING,
          "record at %s [%d] @%lld is not a usable CloudEvent (%s); stored "
          "in de_dead_letter as foreign",
          rd_kafka_topic_name(m->rkt), (int)m->partition, (long long)m->offset,
          why);
    return dead_letter(c, "foreign", m, NULL, why, 0, NULL) == DE_OK
               ? O_DONE
               : O_DB_ERROR;
}

static int64_t backoff_for(de_consumer *c, int attempts)
{
    int64_t b = c->backoff_ms;

    for (int i = 1; i < attempts && b < c->backoff_max_ms; i++)
        b *= 2;
    return b > c->backoff_max_ms ? c->backoff_max_ms : b;
}

/* Moves a message into the subject's retry list (the list takes it). */
static bool hold(de_consumer *c, rd_kafka_message_t *m, const char *type,
                 const char *id, int attempts, const char *error)
{
    retrying *r = find_retrying(c, type, id);

    if (r == NULL) {
        r = calloc(1, sizeof *r);
        if (r == NULL || (r->subject_type = strdup(type)) == NULL ||
            (r->subject_id = strdup(id)) == NULL ||
            !DE__VEC_PUSH(c->retry, r)) {
            free_retrying(r);
            return false;
        }
        r->attempts = attempts;
        r->next_at_ms = de__mono_ms() + backoff_for(c, attempts);
        snprintf(r->error, sizeof r->error, "%s", error);
    }
    return DE__VEC_PUSH(r->msgs, m);
}

/* What a transaction changes in the consumer's memory as it runs, taken
 * before it: a run that is rolled back leaves none of it changed (the
 * inbox's caches are cleared by its rollback).  Offsets and the retry
 * lists change only after a commit. */
typedef struct run_mark {
    de_consumer_stats stats;
    int handled;
    size_t refilled;
} run_mark;

static void mark_run(const de_consumer *c, run_mark *m)
{
    m->stats = c->stats;
    m->handled = c->handled;
    m->refilled = c->refilled.n;
}

/* Undoes in memory what a rolled-back run did -- but the count of
 * transactions run again, which counts runs, not what they did. */
static void undo_run(de_consumer *c, const run_mark *m)
{
    uint64_t txn_retries = c->stats.txn_retries;

    c->stats = m->stats;
    c->stats.txn_retries = txn_retries;
    c->handled = m->handled;
    while (c->refilled.n > m->refilled)
        free(c->refilled.v[--c->refilled.n]);
}

/* A transaction the database aborted for a conflict with another (a
 * deadlock, a serialization failure: the inbox's conflict op) is run
 * again inside the call, CONFLICT_RUNS times in all at most, each time
 * after a random pause of 1 ms up to a bound that doubles from 8 ms to
 * CONFLICT_PAUSE_MAX_MS: the other transaction finishes meanwhile, and
 * two that deadlocked each other do not meet again in step. */
#define CONFLICT_RUNS 5
#define CONFLICT_PAUSE_MAX_MS 50

static void pause_ms(int64_t ms)
{
    struct timespec ts = {(time_t)(ms / 1000), (long)(ms % 1000) * 1000000};

    while (nanosleep(&ts, &ts) != 0)
        ;
}

/*
 * Called when a transaction failed with *err, before it is rolled back;
 * what names the transaction for the log ("a batch of 12 records").
 * true: it failed for a conflict and may run again -- it is rolled back,
 * memory undone to m, counted (txn_retries), paused for; the caller
 * resets its own scratch and runs it again.  false: anything else, or
 * the conflict met CONFLICT_RUNS times, when *err becomes DE_ERR_DB
 * naming the SQLSTATE and the retries; the caller fails as before.
 * *runs counts the runs a conflict ended (0 before the first).
 */
static bool run_again(de_consumer *c, const run_mark *m, int *runs,
                      const char *what, de_err *err)
{
    const char *conflict = *err == DE_ERR_DB ? IB0(c, conflict) : NULL;
    char state[6], why[600];
    int64_t bound, pause;

    if (conflict == NULL)
        return false;
    snprintf(state, sizeof state, "%s", conflict);
    snprintf(why, sizeof why, "%s", de_errmsg());
    IB0(c, rollback); /* its locks go: the other transaction goes on */
    undo_run(c, m);
    if (++*runs >= CONFLICT_RUNS) {
        *err = de__fail(DE_ERR_DB,
                        "consumer: %s failed with SQLSTATE %s (%s) and was "
                        "retried %d times, failing the same way each time; "
                        "rolled back, its records are read again: %s",
                        what, state,
                        strcmp(state, "40P01") == 0 ? "a deadlock"
                                                    : "a serialization failure",
                        *runs - 1, why);
        clog_(c, DE_LOG_WARNING, "%s", de_errmsg());
        return false;
    }
    bound = (int64_t)8 << (*runs - 1);
    if (bound > CONFLICT_PAUSE_MAX_MS)
        bound = CONFLICT_PAUSE_MAX_MS;
    pause = 1 + (int64_t)(de__random64() % (uint64_t)bound);
    c->stats.txn_retries++;
    clog_(c, DE_LOG_INFO,
          "%s rolled back: SQLSTATE %s, a conflict with another transaction; "
          "running it again in %lld ms (retry %d of %d): %s",
          what, state, (long long)pause, *runs, CONFLICT_RUNS - 1, why);
    pause_ms(pause);
    return true;
}

/*
 * Applies a batch in one transaction.  Messages that must wait for a
 * retry are moved to the retry lists (after the commit); the rest are
 * destroyed.  On a database failure nothing is kept: the batch is rolled
 * back and the consumer seeks back so that it is read again.
 */
/* Reads a partition again from m (its committed offset will not pass
 * it): m could not be kept for a retry. */
static void rewind_to(de_consumer *c, const rd_kafka_message_t *m)
{
    rd_kafka_topic_partition_list_t *l = rd_kafka_topic_partition_list_new(1);
    progress *p = progress_for(c, rd_kafka_topic_name(m->rkt), m->partition);
    rd_kafka_error_t *e;

    if (p != NULL && p->next_offset > m->offset)
        p->next_offset = m->offset;
    rd_kafka_topic_partition_list_add(l, rd_kafka_topic_name(m->rkt),
                                      m->partition)
        ->offset = m->offset;
    if ((e = rd_kafka_seek_partitions(c->rk, l, 1000)) != NULL) {
        clog_(c, DE_LOG_WARNING,
              "seeking back failed: %s (the events are "
              "read again after a restart)",
              rd_kafka_error_string(e));
        rd_kafka_error_destroy(e);
    }
    rd_kafka_topic_partition_list_destroy(l);
}

/* Whether an earlier message of m's partition was rewound (read again). */
static bool rewound(rd_kafka_message_t **msgs, const uint8_t *fate, size_t i)
{
    for (size_t j = 0; j < i; j++)
        if (fate[j] == O_DB_ERROR && msgs[j]->partition == msgs[i]->partition &&
            msgs[j]->rkt == msgs[i]->rkt)
            return true;
    return false;
}

/* "type\0id": a subject as the batch remembers the ones waiting for a
 * retry. */
static char *subject_key(const de_event_view *v)
{
    size_t lt = strlen(v->subject_type), li = strlen(v->subject_id);
    char *k = malloc(lt + li + 2);

    if (k != NULL) {
        memcpy(k, v->subject_type, lt + 1);
        memcpy(k + lt + 1, v->subject_id, li + 1);
    }
    return k;
}

/* Whether an earlier message of the batch, of the same subject (subject
 * type and id, as decoded: not the key, which another producer may not
 * use for the subject), is waiting for a retry. */
static bool behind_failed(const uint8_t *fate, char **fsubj, size_t i,
                          const de_event_view *v)
{
    size_t lt = strlen(v->subject_type);

    for (size_t j = 0; j < i; j++)
        if (fate[j] == O_RETRY && fsubj[j] != NULL &&
            memcmp(fsubj[j], v->subject_type, lt + 1) == 0 &&
            strcmp(fsubj[j] + lt + 1, v->subject_id) == 0)
            return true;
    return false;
}

static de_err apply_batch(de_consumer *c)
{
    size_t n = c->batch.n;
    rd_kafka_message_t **msgs = c->batch.v;
    uint8_t *fate;
    char error[600], **ftype, what[64];
    de_err err = DE_OK;
    run_mark mark;
    int conflicts = 0;
    bool any_retry = false;

    if (n == 0)
        return DE_OK;
    mark_run(c, &mark);
    if (n > c->fate_cap) {
        uint8_t *nf = realloc(c->fate, n);
        char **nt = nf ? realloc(c->ftype, n * sizeof *nt) : NULL;
        if (nf != NULL)
            c->fate = nf;
        if (nt == NULL) {
            /* Nothing applied: the batch is read again. */
            err = de__fail(DE_ERR_NOMEM, "consumer: out of memory");
            fate = NULL;
            ftype = NULL;
            goto rewind;
        }
        c->ftype = nt;
        c->fate_cap = n;
    }
    fate = c->fate;
    ftype = c->ftype;
    memset(ftype, 0, n * sizeof *ftype);
again:
    /* A run again (rolled back: O_REDO, or a conflict) starts afresh. */
    memset(fate, 0, n);
    for (size_t j = 0; j < n; j++) {
        free(ftype[j]);
        ftype[j] = NULL;
    }
    any_retry = false;
    if ((err = IB0(c, begin)) != DE_OK)
        goto rewind;
    for (size_t i = 0; i < n; i++) {
        rd_kafka_message_t *m = msgs[i];
        enum outcome o;
        bool ours;

        if ((o = decode_or_park(c, m, &ours)) == O_DB_ERROR)
            goto fail;
        if (!ours)
            continue;
        if (find_retrying(c, c->dec.view.subject_type,
                          c->dec.view.subject_id) != NULL) {
            fate[i] = O_RETRY; /* behind a retry, in order */
            continue;
        }
        /* An earlier message of this subject in this batch failed. */
        if (any_retry && behind_failed(fate, ftype, i, &c->dec.view)) {
            fate[i] = O_RETRY;
            if ((ftype[i] = subject_key(&c->dec.view)) == NULL)
                goto nomem;
            continue;
        }
        o = apply_one(c, m, &c->dec.view, 0, error, sizeof error);
        if (o == O_DB_ERROR)
            goto fail;
        if (o == O_REDO) {
            /* A handler failed with no savepoint around it: undo the
             * batch and apply it again, carefully. */
            IB0(c, rollback);
            undo_run(c, &mark);
            c->careful = true;
            goto again;
        }
        fate[i] = (uint8_t)o;
        if (o == O_RETRY && (ftype[i] = subject_key(&c->dec.view)) == NULL)
            goto nomem;
        any_retry |= o == O_RETRY;
        if (o == O_RETRY)
            clog_(c, DE_LOG_WARNING, "%s %s seq %lld: %s (retrying)",
                  c->dec.view.subject_type, c->dec.view.subject_id,
                  (long long)c->dec.view.subject_seq, error);
    }
    if ((err = IB0(c, commit)) != DE_OK)
        goto fail_rolled;
    c->stats.batches++;
    c->careful = false;
    /* Now the outcome is durable: hold the retries, account the rest. */
    for (size_t i = 0; i < n; i++) {
        rd_kafka_message_t *m = msgs[i];
        if (fate[i] == O_RETRY) {
            de__decoded *d = &c->dec;
            char why[300];
            if (de__envelope_decode(m, c->tmpl, d, why, sizeof why) &&
                hold(c, m, d->view.subject_type, d->view.subject_id, 1,
                     "handler failed"))
                continue;
            /* Not kept: read it again rather than let the committed
             * offset pass it (later messages of its partition are read
             * again too, and skipped as duplicates). */
            rewind_to(c, m);
            fate[i] = O_DB_ERROR;
            rd_kafka_message_destroy(m);
            continue;
        }
        if (!rewound(msgs, fate, i))
            note_processed(c, m);
        rd_kafka_message_destroy(m);
    }
    goto done;
nomem:
    err = de__fail(DE_ERR_NOMEM, "consumer: out of memory");
    goto fail_rolled;
fail:
    /* The failing operation set the message. */
    err = DE_ERR_DB;
fail_rolled:
    snprintf(what, sizeof what, "a batch of %zu record%s", n,
             n == 1 ? "" : "s");
    if (run_again(c, &mark, &conflicts, what, &err))
        goto again; /* in the same mode: careful if it was */
    IB0(c, rollback);
rewind:
    c->careful = false;
    /* Read the batch again from its first message in each partition. */
    undo_run(c, &mark);
    for (size_t i = n; i-- > 0;) {
        rd_kafka_message_t *m = msgs[i];
        rd_kafka_topic_partition_list_t *l =
            rd_kafka_topic_partition_list_new(1);
        rd_kafka_topic_partition_list_add(l, rd_kafka_topic_name(m->rkt),
                                          m->partition)
            ->offset = m->offset;
        {
            rd_kafka_error_t *e = rd_kafka_seek_partitions(c->rk, l, 1000);
            if (e != NULL) {
                clog_(c, DE_LOG_WARNING,
                      "seeking back failed: %s (the events are read again "
                      "after a restart)",
                      rd_kafka_error_string(e));
                rd_kafka_error_destroy(e);
            }
        }
        rd_kafka_topic_partition_list_destroy(l);
        rd_kafka_message_destroy(m);
    }
done:
    c->batch.n = 0;
    for (size_t i = 0; ftype != NULL && i < n; i++) {
        free(ftype[i]);
        ftype[i] = NULL;
    }
    return err;
}

/* Retries subjects whose backoff elapsed, in one transaction each. */
static de_err run_retries(de_consumer *c)
{
    int64_t now = de__mono_ms();
    char error[600], what[DE__QUOTE_MAX * 2 + 32];
    int conflicts = 0; /* runs of retry k a conflict ended */
    run_mark mark;
    de_err err;

    c->careful = true; /* retries are where handlers fail */
    for (size_t k = 0; k < c->retry.n;) {
        retrying *r = c->retry.v[k];
        size_t done = 0;
        bool again = false;
        char why[300];

        if (r->next_at_ms > now) {
            k++;
            continue;
        }
        mark_run(c, &mark);
        if ((err = IB0(c, begin)) != DE_OK) {
            c->careful = false;
            return err;
        }
        for (; done < r->msgs.n; done++) {
            rd_kafka_message_t *m = r->msgs.v[done];
            enum outcome o;
            if (!de__envelope_decode(m, c->tmpl, &c->dec, why, sizeof why))
                continue; /* cannot happen: decoded before */
            /* The first held event carries the subject's failures; the
             * ones behind it have not failed yet. */
            o = apply_one(c, m, &c->dec.view, done == 0 ? r->attempts : 0,
                          error, sizeof error);
            if (o == O_DB_ERROR)
                break; /* the failing operation said why */
            if (o == O_RETRY) {
                again = true;
                break;
            }
        }
        err = done < r->msgs.n && !again ? DE_ERR_DB : IB0(c, commit);
        if (err != DE_OK) {
            snprintf(what, sizeof what, "the retry of %s %s", r->subject_type,
                     r->subject_id);
            if (run_again(c, &mark, &conflicts, what, &err))
                continue; /* the same subject's retry, afresh */
            IB0(c, rollback);
            undo_run(c, &mark);
            c->careful = false;
            return err;
        }
        conflicts = 0;
        c->stats.batches++;
        for (size_t i = 0; i < done; i++) {
            note_processed(c, r->msgs.v[i]);
            rd_kafka_message_destroy(r->msgs.v[i]);
        }
        memmove(r->msgs.v, r->msgs.v + done,
                (r->msgs.n - done) * sizeof *r->msgs.v);
        r->msgs.n -= done;
        if (again) {
            r->attempts = done == 0 ? r->attempts + 1 : 1;
            r->next_at_ms = now + backoff_for(c, r->attempts);
            snprintf(r->error, sizeof r->error, "%s", error);
            clog_(c, DE_LOG_WARNING, "%s %s: attempt %d failed: %s",
                  r->subject_type, r->subject_id, r->attempts, error);
            k++;
            continue;
        }
        /* Applied (or parked) up to its last held message. */
        free_retrying(r);
        c->retry.v[k] = c->retry.v[--c->retry.n];
    }
    c->careful = false;
    return DE_OK;
}

/* ---- rebalances ------------------------------------------------------- */

static bool in_list(const rd_kafka_topic_partition_list_t *l, const char *topic,
                    int32_t partition)
{
    for (int i = 0; i < l->cnt; i++)
        if (l->elems[i].partition == partition &&
            strcmp(l->elems[i].topic, topic) == 0)
            return true;
    return false;
}

/* Takes (parts) or gives back (NULL) partitions: incrementally under the
 * cooperative protocol (cooperative-sticky), where librdkafka refuses a
 * full assign, else the whole assignment.  A failure is logged. */
static void assign(de_consumer *c, rd_kafka_t *rk,
                   rd_kafka_topic_partition_list_t *parts, bool take)
{
    bool coop = strcmp(rd_kafka_rebalance_protocol(rk), "COOPERATIVE") == 0;
    rd_kafka_error_t *e = NULL;
    rd_kafka_resp_err_t ae = RD_KAFKA_RESP_ERR_NO_ERROR;

    if (coop)
        e = take ? rd_kafka_incremental_assign(rk, parts)
                 : rd_kafka_incremental_unassign(rk, parts);
    else
        ae = rd_kafka_assign(rk, take ? parts : NULL);
    if (e != NULL || ae != RD_KAFKA_RESP_ERR_NO_ERROR) {
        clog_(c, DE_LOG_ERR, "%s %d partitions failed: %s",
              take ? "taking" : "giving back", parts->cnt,
              e ? rd_kafka_error_string(e) : rd_kafka_err2str(ae));
        rd_kafka_error_destroy(e);
    }
}

static void rebalance(rd_kafka_t *rk, rd_kafka_resp_err_t err,
                      rd_kafka_topic_partition_list_t *parts, void *opaque)
{
    de_consumer *c = ((de__rk_bridge *)opaque)->owner;

    if (err == RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS) {
        assign(c, rk, parts, true);
        return;
    }
    /* Revoked: finish what was read, commit it, and forget the partitions
     * (held retries included: the next owner reads them again from the
     * committed offset, which never passed them). */
    /* A failure here is logged and read again after the rebalance. */
    (void)apply_batch(c);
    (void)commit_offsets(c, true);
    for (size_t k = 0; k < c->retry.n;) {
        retrying *r = c->retry.v[k];
        if (r->msgs.n > 0 &&
            in_list(parts, rd_kafka_topic_name(r->msgs.v[0]->rkt),
                    r->msgs.v[0]->partition)) {
            free_retrying(r);
            c->retry.v[k] = c->retry.v[--c->retry.n];
        } else {
            k++;
        }
    }
    for (size_t i = 0; i < c->parts.n;) {
        if (in_list(parts, c->parts.v[i].topic, c->parts.v[i].partition)) {
            free(c->parts.v[i].topic);
            c->parts.v[i] = c->parts.v[--c->parts.n];
        } else {
            i++;
        }
    }
    assign(c, rk, parts, false);
}

/* ---- forgetting -------------------------------------------------------- */

static de_err serve_requests(de_consumer *c);
static de_err release_refilled(de_consumer *c);

/* Subjects looked at per round, and how often a round runs. */
#define FORGET_SLICE 2000
#define FORGET_EVERY_MS 1000

/* Forgets, a slice at a time in a transaction of its own, the inbox rows
 * of subjects not applied to for consumer.subject.forget.ms: by then the
 * relay has forgotten them too, and their next event opens a new
 * numbering, which needs no memory of the old one.  Also the ids of
 * consumer.id.forget.ms, and dead letters past
 * consumer.dead.letter.retention.ms that park nothing. */
static de_err forget_idle(de_consumer *c)
{
    int64_t now = de__mono_ms(), n = 0, ids = 0, dls = 0;
    de_err err;

    if (now < c->next_forget_ms)
        return DE_OK;
    c->next_forget_ms = now + FORGET_EVERY_MS;
    if ((err = IB0(c, begin)) != DE_OK)
        return err;
    if ((c->forget_ms > 0 && (err = IB(c, forget, de__now_ms() - c->forget_ms,
                                       FORGET_SLICE, &n)) != DE_OK) ||
        (err = IB(c, forget_ids, de__now_ms() - c->id_forget_ms, FORGET_SLICE,
                  &ids)) != DE_OK ||
        (c->dl_retention_ms > 0 &&
         (err = IB(c, dl_forget, de__now_ms() - c->dl_retention_ms,
                   FORGET_SLICE, &dls)) != DE_OK) ||
        (err = IB0(c, commit)) != DE_OK) {
        IB0(c, rollback);
        return err;
    }
    c->stats.forgotten += (uint64_t)n;
    c->stats.ids_forgotten += (uint64_t)ids;
    if (dls > 0)
        clog_(c, DE_LOG_INFO,
              "deleted %lld dead letters older than "
              "consumer.dead.letter.retention.ms that parked nothing",
              (long long)dls);
    return DE_OK;
}

/* ---- polling ---------------------------------------------------------- */

static de_err subscribe(de_consumer *c)
{
    const char *topics = de__conf_str(c->conf, DE__K_CONSUMER_TOPICS);
    rd_kafka_topic_partition_list_t *l = rd_kafka_topic_partition_list_new(8);
    rd_kafka_resp_err_t err;
    char name[256];

    if (topics[0] != '\0') {
        char *copy = strdup(topics), *save = NULL, *t;
        for (t = strtok_r(copy, ",", &save); t; t = strtok_r(NULL, ",", &save))
            if (*t)
                rd_kafka_topic_partition_list_add(l, t, RD_KAFKA_PARTITION_UA);
        free(copy);
    } else {
        for (size_t i = 0; i < c->handlers.n; i++) {
            if (c->handlers.v[i].subject_type == NULL)
                continue; /* by ce_type: its topics are consumer.topics */
            de__topic_name(name, sizeof name,
                           de__conf_str(c->conf, DE__K_TOPIC_TEMPLATE),
                           c->handlers.v[i].subject_type);
            if (rd_kafka_topic_partition_list_find(
                    l, name, RD_KAFKA_PARTITION_UA) == NULL)
                rd_kafka_topic_partition_list_add(l, name,
                                                  RD_KAFKA_PARTITION_UA);
        }
    }
    if (l->cnt == 0) {
        rd_kafka_topic_partition_list_destroy(l);
        return de__fail(DE_ERR_CONFIG,
                        "the consumer has no topics: set consumer.topics "
                        "(needed with handlers registered by ce_type "
                        "only) or register a handler with de_consumer_on");
    }
    err = rd_kafka_subscribe(c->rk, l);
    rd_kafka_topic_partition_list_destroy(l);
    if (err)
        return de__fail(DE_ERR_KAFKA, "subscribing failed: %s",
                        rd_kafka_err2str(err));
    c->subscribed = true;
    return DE_OK;
}

/* Whether the inbox's connection is gone, which only the host can mend
 * (a PostgreSQL connection the server dropped; see inbox.h). */
static bool connection_lost(de_consumer *c)
{
    return c->ib->ops->lost != NULL && c->ib->ops->lost(c->ib);
}

/* What a poll makes of its upkeep's result (forgetting, release
 * requests; err from the step called `what`; batch: whether this poll
 * committed a batch before it): a failure is logged and
 * retried at the next poll.  A lost connection fails the poll -- so that
 * a consumer with nothing to apply still tells its host to reset it --
 * unless this poll committed a batch: DE_ERR_DB says nothing of the
 * batch was applied, so that poll returns DE_OK and the next one fails
 * before it reads anything. */
static de_err upkeep_failed(de_consumer *c, bool batch, de_err err,
                            const char *what)
{
    if (err == DE_OK)
        return DE_OK;
    if (connection_lost(c))
        return batch ? DE_OK : err;
    clog_(c, DE_LOG_WARNING, "%s failed: %s (retrying)", what, de_errmsg());
    return DE_OK;
}

de_err de_consumer_poll(de_consumer *c, int timeout_ms, int *handled)
{
    rd_kafka_message_t *m;
    de_err err = DE_OK;
    int64_t first_wait = timeout_ms;
    bool batch;

    if (handled)
        *handled = 0;
    if (c == NULL)
        return de__fail(DE_ERR_ARG, "de_consumer_poll needs a consumer "
                                    "(got NULL)");
    c->handled = 0;
    if (connection_lost(c))
        return de__fail(DE_ERR_DB, "consumer: the connection to the database "
                                   "is lost: reset it (PQreset) and poll "
                                   "again; nothing was read");
    if (!c->subscribed && (err = subscribe(c)) != DE_OK)
        return err;
    if (c->fatal)
        return de__fail(DE_ERR_KAFKA, "the consumer hit a fatal error; close "
                                      "and reopen it");
    if ((err = run_retries(c)) != DE_OK || (err = release_refilled(c)) != DE_OK)
        return err;
    /* Do not sleep past a retry that is due. */
    for (size_t i = 0; i < c->retry.n; i++) {
        int64_t left = c->retry.v[i]->next_at_ms - de__mono_ms();
        if (left < first_wait)
            first_wait = left < 0 ? 0 : left;
    }
    c->batch.n = 0;
    m = rd_kafka_consumer_poll(c->rk, (int)first_wait);
    while (m != NULL) {
        if (m->err) {
            if (m->err != RD_KAFKA_RESP_ERR__PARTITION_EOF)
                clog_(c, DE_LOG_WARNING, "consume error: %s",
                      rd_kafka_message_errstr(m));
            rd_kafka_message_destroy(m);
        } else if (!DE__VEC_PUSH(c->batch, m)) {
            rd_kafka_message_destroy(m);
            err = de__fail(DE_ERR_NOMEM, "consumer: out of memory");
            break;
        }
        if ((int64_t)c->batch.n >= c->batch_size)
            break;
        m = rd_kafka_consumer_poll(c->rk, 0);
    }
    batch = c->batch.n > 0;
    if (err == DE_OK)
        err = apply_batch(c);
    else
        (void)apply_batch(c);       /* the first failure is the one returned */
    (void)commit_offsets(c, false); /* asynchronous: fails only later */
    if (err == DE_OK)
        err = release_refilled(c);
    if (err == DE_OK)
        err =
            upkeep_failed(c, batch, forget_idle(c), "forgetting idle subjects");
    if (err == DE_OK)
        err = upkeep_failed(c, batch, serve_requests(c), "release requests");
    if (handled)
        *handled = c->handled;
    return err;
}

/* ---- release and skip ------------------------------------------------- */

/* Applies a parked event (recording it as rec says) and marks it
 * applied; if the handler fails again, the subject stays parked on it
 * (*stuck). */
static de_err apply_parked(de_consumer *c, de__dead_letter *dl, enum record rec,
                           bool *stuck)
{
    const de_event_view *v = &dl->view;
    char error[600];
    de_err err = run_handler(c, v, rec, error, sizeof error);

    if (err == DE__TAKEN) { /* its id, applied meanwhile by another */
        c->stats.duplicates++;
        return IB(c, dl_done, dl->id, "duplicate");
    }
    if (err == DE__HANDLER_FAILED) {
        if ((err = IB(c, dl_fail, dl->id, error)) != DE_OK ||
            (err = IB(c, park, v->subject_type, v->subject_id, true, dl->id)) !=
                DE_OK)
            return err;
        clog_(c, DE_LOG_ERR, "%s %s stays parked: %s", v->subject_type,
              v->subject_id, error);
        *stuck = true;
        return DE_OK;
    }
    return err == DE_OK ? IB(c, dl_done, dl->id, "applied") : err;
}

/* The first parked event of a release or skip (the one that parked the
 * subject): skipped, or applied whatever it is -- a gap accepted, a
 * conflict taken as the real event of its own it is (the subject moves on
 * only if its number is after the last).  *stuck when its handler failed
 * again. */
static de_err unpark_first(de_consumer *c, de__dead_letter *dl,
                           const de__inbox_entry *e, bool skip, bool *stuck)
{
    const de_event_view *v = &dl->view;
    bool after = de__number_after(v->subject_epoch, v->subject_seq, e->epoch,
                                  e->seq),
         conflict = dl->kind && strcmp(dl->kind, "conflict") == 0, claimed,
         seen = false;
    enum record rec = v->subject_seq == 0 ? REC_SEEN
                      : after && (!conflict || e->source[0] == '\0' ||
                                  strcmp(e->source, v->source) == 0)
                          ? REC_PUT
                          : REC_NONE;
    de_err err;

    if (skip) {
        /* As if applied -- but a conflict skipped leaves the subject as
         * its owner numbered it. */
        if ((err = IB(c, dl_done, dl->id, "skipped")) != DE_OK)
            return err;
        if (rec == REC_SEEN)
            return IB(c, seen_claim, v, &claimed);
        if (rec == REC_PUT)
            return IB(c, put, v->subject_type, v->subject_id, v->subject_epoch,
                      v->subject_seq, v->event_id, v->source);
        return DE_OK;
    }
    if (v->subject_seq == 0 && (err = IB(c, seen, v, &seen)) != DE_OK)
        return err;
    if (v->subject_seq > 0 ? !after && !conflict : seen) {
        /* Applied meanwhile (read again and applied by another member). */
        c->stats.duplicates++;
        return IB(c, dl_done, dl->id, "duplicate");
    }
    return apply_parked(c, dl, rec, stuck);
}

/* A parked event after the first: taken as if it arrived now -- a
 * duplicate, the next event, or a gap or conflict that parks the subject
 * again on it (*stuck). */
static de_err unpark_next(de_consumer *c, de__dead_letter *dl,
                          const de__inbox_entry *e, bool *stuck)
{
    const de_event_view *v = &dl->view;
    enum verdict vd = V_NEXT;
    char error[600];
    bool seen = false;
    de_err err;

    error[0] = '\0';
    if (v->subject_seq == 0) {
        if ((err = IB(c, seen, v, &seen)) != DE_OK)
            return err;
        vd = seen ? V_DUPLICATE : V_NEXT;
    } else {
        vd = classify(v, e, error, sizeof error);
    }
    if (vd == V_DUPLICATE) {
        c->stats.duplicates++;
        return IB(c, dl_done, dl->id, "duplicate");
    }
    if (vd == V_CONFLICT || (vd == V_GAP && c->gap == GAP_PARK)) {
        if (vd == V_CONFLICT) {
            c->stats.conflicts++;
            c->stats.dead_lettered++;
        } else {
            c->stats.gaps++;
        }
        if ((err = IB(c, dl_repark, dl->id,
                      vd == V_CONFLICT ? "conflict" : "gap", error)) != DE_OK ||
            (err = IB(c, park, v->subject_type, v->subject_id, true, dl->id)) !=
                DE_OK)
            return err;
        clog_(c, DE_LOG_ERR, "%s %s parked again: %s", v->subject_type,
              v->subject_id, error);
        *stuck = true;
        return DE_OK;
    }
    if (vd == V_GAP)
        c->stats.gaps++;
    return apply_parked(c, dl, v->subject_seq == 0 ? REC_SEEN : REC_PUT, stuck);
}

enum unpark_how {
    UNPARK_RELEASE,
    UNPARK_SKIP,
    UNPARK_REFILLED /* only if its gap filled: the parked event is next */
};

/* Releases a parked subject in one transaction: first the event that
 * parked it (skipped, or applied whatever it is), then the events that
 * waited behind it, in order, each taken as if it arrived now. */
static de_err unpark(de_consumer *c, const char *type, const char *id,
                     enum unpark_how how)
{
    char q1[DE__QUOTE_MAX], q2[DE__QUOTE_MAX], what[DE__QUOTE_MAX * 2 + 32];
    bool first, stuck;
    de__inbox_entry e;
    int64_t first_id;
    int conflicts = 0;
    run_mark mark;
    de_err err;

    if (c == NULL || type == NULL || id == NULL)
        return de__fail(DE_ERR_ARG, "release/skip needs a consumer, a "
                                    "subject type and a subject id");
    mark_run(c, &mark);
again:
    first = true;
    stuck = false;
    if ((err = IB0(c, begin)) != DE_OK)
        return err;
    c->careful = true;
    if ((err = IB(c, get, type, id, &e)) != DE_OK)
        goto fail;
    first_id = e.park_id;
    if (how == UNPARK_REFILLED &&
        !(e.parked && strcmp(e.park_kind, "gap") == 0 &&
          e.park_epoch == e.epoch && e.park_seq == e.seq + 1)) {
        /* Not filled after all (the transaction that filled it rolled
         * back): nothing to do. */
        IB0(c, rollback);
        c->careful = false;
        return DE_OK;
    }
    /* Lift the flag so that the events are taken rather than parked
     * again. */
    if ((err = IB(c, park, type, id, false, 0)) != DE_OK)
        goto fail;
    /* One parked event at a time: each one handled leaves the 'parked'
     * state, so the next read moves on. */
    while (!stuck) {
        de__dead_letter dl;
        bool found;

        if ((err = IB(c, dl_next, type, id, first ? first_id : 0, &dl,
                      &found)) != DE_OK)
            goto fail;
        if (!found)
            break;
        if ((err = IB(c, get, type, id, &e)) == DE_OK)
            err = first ? unpark_first(c, &dl, &e, how == UNPARK_SKIP, &stuck)
                        : unpark_next(c, &dl, &e, &stuck);
        first = false;
        de__dead_letter_free(&dl);
        if (err != DE_OK)
            goto fail;
    }
    if ((err = IB0(c, commit)) != DE_OK)
        goto fail;
    c->careful = false;
    clog_(c, DE_LOG_NOTICE, "%s %s %s", de__quote(q1, sizeof q1, type, -1),
          de__quote(q2, sizeof q2, id, -1),
          stuck ? "is still parked" : "released");
    return DE_OK;
fail:
    /* The failing operation set the message; nothing of it is kept. */
    snprintf(what, sizeof what, "the %s of %s %s",
             how == UNPARK_SKIP ? "skip" : "release",
             de__quote(q1, sizeof q1, type, -1),
             de__quote(q2, sizeof q2, id, -1));
    if (run_again(c, &mark, &conflicts, what, &err))
        goto again;
    IB0(c, rollback);
    undo_run(c, &mark);
    c->careful = false;
    return err;
}

/* Releases the subjects whose gap filled by itself during the last
 * transaction: the event parked on the gap is next now. */
static de_err release_refilled(de_consumer *c)
{
    de_err err = DE_OK;

    for (size_t i = 0; i < c->refilled.n; i++) {
        char *k = c->refilled.v[i];
        if (err == DE_OK) {
            clog_(c, DE_LOG_NOTICE,
                  "%s %s: the gap it was parked on filled; releasing it", k,
                  k + strlen(k) + 1);
            err = unpark(c, k, k + strlen(k) + 1, UNPARK_REFILLED);
        }
        free(k);
    }
    c->refilled.n = 0;
    return err;
}

/* How often de_consumer_poll looks for requests, and how many it serves
 * at a time. */
#define REQUESTS_EVERY_MS 500
#define REQUESTS_PER_ROUND 16

/* Serves releases and skips asked from outside the process (`deliveryevents
 * release`), with this consumer's handlers, answering each with what
 * happened.  A request is answered after it is done: one interrupted
 * between the two is done again, and finds the subject no longer parked. */
static de_err serve_requests(de_consumer *c)
{
    int64_t now = de__mono_ms();
    de_err err = DE_OK;

    if (now < c->next_requests_ms)
        return DE_OK;
    c->next_requests_ms = now + REQUESTS_EVERY_MS;
    for (int i = 0; i < REQUESTS_PER_ROUND && err == DE_OK; i++) {
        de__request rq;
        de__inbox_entry e;
        char result[700];
        uint64_t applied = c->stats.applied;
        bool found;

        if ((err = IB(c, request_next, &rq, &found)) != DE_OK || !found)
            break;
        if ((err = IB(c, get, rq.type, rq.subject_id, &e)) != DE_OK)
            break;
        if (!e.parked) {
            snprintf(result, sizeof result, "not parked");
        } else if (unpark(c, rq.type, rq.subject_id,
                          rq.skip ? UNPARK_SKIP : UNPARK_RELEASE) != DE_OK) {
            snprintf(result, sizeof result, "failed: %s", de_errmsg());
        } else if ((err = IB(c, get, rq.type, rq.subject_id, &e)) != DE_OK) {
            break;
        } else if (e.parked) {
            snprintf(result, sizeof result,
                     "still parked: the handler failed again (see "
                     "de_dead_letter)");
        } else {
            snprintf(result, sizeof result, "%s: %" PRIu64 " events applied",
                     rq.skip ? "skipped" : "released",
                     c->stats.applied - applied);
        }
        if ((err = IB0(c, begin)) != DE_OK)
            break;
        if ((err = IB(c, request_done, rq.id, result)) != DE_OK ||
            (err = IB0(c, commit)) != DE_OK)
            IB0(c, rollback);
    }
    return err;
}

de_err de_consumer_release(de_consumer *c, const char *subject_type,
                           const char *subject_id)
{
    return unpark(c, subject_type, subject_id, UNPARK_RELEASE);
}

de_err de_consumer_skip(de_consumer *c, const char *subject_type,
                        const char *subject_id)
{
    return unpark(c, subject_type, subject_id, UNPARK_SKIP);
}

de_err de_consumer_stats_get(de_consumer *c, de_consumer_stats *out)
{
    int64_t parked;
    de_err err;

    if (c == NULL || out == NULL)
        return de__fail(DE_ERR_ARG, "de_consumer_stats_get needs a consumer "
                                    "and an out pointer");
    if ((err = IB(c, parked_count, &parked)) != DE_OK)
        return err;
    c->stats.parked_subjects = (uint64_t)parked;
    *out = c->stats;
    return DE_OK;
}

de_err de_consumer_close(de_consumer *c)
{
    de_err err = DE_OK;

    if (c == NULL)
        return DE_OK;
    if (c->rk != NULL) {
        if (c->subscribed) {
            rd_kafka_resp_err_t e;
            err = commit_offsets(c, true);
            if ((e = rd_kafka_consumer_close(c->rk)) !=
                    RD_KAFKA_RESP_ERR_NO_ERROR &&
                err == DE_OK)
                err = de__fail(DE_ERR_KAFKA,
                               "consumer: leaving the group failed: %s "
                               "(its partitions move after "
                               "session.timeout.ms)",
                               rd_kafka_err2str(e));
        }
    }
    /* Every message released before the handle: one kept would keep its
     * partition, and rd_kafka_destroy would wait for it. */
    for (size_t i = 0; i < c->batch.n; i++)
        rd_kafka_message_destroy(c->batch.v[i]);
    free(c->batch.v);
    free(c->fate);
    free(c->ftype);
    if (c->rk != NULL) {
        /* Bounded: librdkafka 2.0 can hang here after a broker outage
         * (see de__rk_destroy_within). */
        (void)de__rk_destroy_within(c->rk, 10000, c->conf, "consumer");
    }
    for (size_t i = 0; i < c->refilled.n; i++)
        free(c->refilled.v[i]);
    free(c->refilled.v);
    for (size_t i = 0; i < c->retry.n; i++)
        free_retrying(c->retry.v[i]);
    free(c->retry.v);
    for (size_t i = 0; i < c->parts.n; i++)
        free(c->parts.v[i].topic);
    free(c->parts.v);
    for (size_t i = 0; i < c->handlers.n; i++) {
        free(c->handlers.v[i].ce_type);
        free(c->handlers.v[i].subject_type);
        free(c->handlers.v[i].action);
    }
    free(c->handlers.v);
    if (c->ib != NULL)
        IB0(c, close);
    de__decoded_free(&c->dec);
    free(c->sources);
    de__hmac_keyring_free(&c->hmac);
    de_conf_destroy(c->conf);
    free(c);
    return err;
}

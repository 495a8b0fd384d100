/* SPDX-License-Identifier: MIT */
/*
 * consumer.c -- effectively-once consumption into the consumer's SQLite.
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
 * Invariant: every message read is, when its offset is committed, either
 * applied, a duplicate, or stored in de_dead_letter -- in the same
 * transaction that precedes the commit.
 */
#include "inbox.h"

#include <inttypes.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct handler {
    char *subject_type;
    char *action; /* NULL: any */
    de_handler_fn fn;
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
    sqlite3 *db;
    de_conf *conf;
    rd_kafka_t *rk;
    de__inbox *ib; /* the inbox and dead letters in db */
    DE__VEC(handler) handlers;
    DE__VEC(retrying *) retry;
    DE__VEC(progress) parts;
    DE__VEC(rd_kafka_message_t *) batch;
    de__rk_bridge bridge; /* the consumer's opaque */
    bool subscribed;
    bool fatal;
    /* Handlers run in savepoints only in careful mode: a batch runs
     * without them, and is redone with them if a handler fails. */
    bool careful;
    int64_t max_attempts, backoff_ms, backoff_max_ms, batch_size;
    int64_t forget_ms;        /* consumer.subject.forget.ms; 0: never */
    int64_t next_forget_ms;   /* monotonic */
    int64_t next_requests_ms; /* monotonic: next look at de_consumer_request */
    enum gap_policy gap;
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

de_err de_consumer_open(sqlite3 *db, const de_conf *conf, de_consumer **out)
{
    de_consumer *c = NULL;
    const char *gap;
    de_err err;

    if (out != NULL)
        *out = NULL;
    if ((err = de__check_connection(db, out == NULL, "de_consumer_open",
                                    "its inbox must survive a "
                                    "restart")) != DE_OK)
        return err;
    c = calloc(1, sizeof *c);
    if (c == NULL)
        return de__fail(DE_ERR_NOMEM, "out of memory opening the consumer");
    c->db = db;
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
    gap = de__conf_str(c->conf, DE__K_CONSUMER_ON_GAP);
    c->gap = strcmp(gap, "apply") == 0 ? GAP_APPLY : GAP_PARK;
    if ((err = de__inbox_open_sqlite(
             db, de__conf_int(c->conf, DE__K_OUTBOX_BUSY_TIMEOUT_MS),
             &c->ib)) != DE_OK)
        goto fail;
    if ((err = make_kafka(c)) != DE_OK)
        goto fail;
    *out = c;
    return DE_OK;
fail:
    de_consumer_close(c);
    return err;
}

de_err de_consumer_on(de_consumer *c, const char *subject_type,
                      const char *action, de_handler_fn fn, void *ctx)
{
    char q[DE__QUOTE_MAX];
    handler h;

    if (c == NULL || fn == NULL)
        return de__fail(DE_ERR_ARG,
                        "de_consumer_on needs a consumer and a "
                        "handler (got NULL %s)",
                        c == NULL ? "consumer" : "fn");
    if (!de__is_ident(subject_type))
        return de__fail(DE_ERR_ARG,
                        "subject_type %s must be a lowercase identifier",
                        de__quote(q, sizeof q, subject_type, -1));
    if (action != NULL && !de__is_ident(action))
        return de__fail(DE_ERR_ARG,
                        "action %s must be a lowercase identifier or NULL",
                        de__quote(q, sizeof q, action, -1));
    if (c->subscribed)
        return de__fail(DE_ERR_STATE, "de_consumer_on after the first "
                                      "de_consumer_poll: register handlers "
                                      "first");
    for (size_t i = 0; i < c->handlers.n; i++) {
        handler *o = &c->handlers.v[i];
        if (strcmp(o->subject_type, subject_type) == 0 &&
            ((o->action == NULL && action == NULL) ||
             (o->action && action && strcmp(o->action, action) == 0)))
            return de__fail(DE_ERR_ARG,
                            "a handler for %s.%s is already registered",
                            subject_type, action ? action : "*");
    }
    h.subject_type = strdup(subject_type);
    h.action = action ? strdup(action) : NULL;
    h.fn = fn;
    h.ctx = ctx;
    if (h.subject_type == NULL || (action && h.action == NULL) ||
        !DE__VEC_PUSH(c->handlers, h)) {
        free(h.subject_type);
        free(h.action);
        return de__fail(DE_ERR_NOMEM, "out of memory registering a handler");
    }
    return DE_OK;
}

static const handler *find_handler(de_consumer *c, const char *type,
                                   const char *action)
{
    const handler *any = NULL;

    for (size_t i = 0; i < c->handlers.n; i++) {
        const handler *h = &c->handlers.v[i];
        if (strcmp(h->subject_type, type) != 0)
            continue;
        if (h->action == NULL)
            any = h;
        else if (strcmp(h->action, action) == 0)
            return h;
    }
    return any;
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

/* Stores an event (or a foreign record, v NULL) in de_dead_letter. */
static de_err dead_letter(de_consumer *c, const char *kind,
                          const rd_kafka_message_t *m, const de_event_view *v,
                          const char *error, int attempts)
{
    de__dl_origin o = {rd_kafka_topic_name(m->rkt), m->partition, m->offset,
                       m->payload, m->len};

    return IB(c, dl_insert, kind, &o, v, error, attempts);
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
                        "consumer: the handler for %s.%s ended the "
                        "transaction; handlers must not COMMIT or ROLLBACK",
                        v->subject_type, v->action);
    snprintf(error, error_size, "handler for %s.%s returned %s%s%s",
             v->subject_type, v->action, de_err_name(rc), fresh ? ": " : "",
             fresh ? de_errmsg() : "");
    return DE__HANDLER_FAILED;
}

/* Runs the handler (in a savepoint in careful mode) and, unless claimed
 * already, records the event in the inbox.  DE_OK: applied;
 * DE__HANDLER_FAILED: the handler failed (why in error), its effects
 * undone; DE__REDO: the handler failed outside careful mode -- the caller
 * must roll the whole batch back and redo it carefully; anything else: a
 * database failure of the whole transaction. */
static de_err run_handler(de_consumer *c, const de_event_view *v, bool claimed,
                          char *error, size_t error_size)
{
    const handler *h = find_handler(c, v->subject_type, v->action);
    uint64_t serial = de__errmsg_serial();
    de_err rc = DE_OK, err;

    if (h != NULL) {
        if (c->careful && (rc = IB0(c, savepoint)) != DE_OK)
            return rc;
        rc = h->fn(c->db, v, h->ctx);
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
        if (c->careful && (rc = IB0(c, release)) != DE_OK)
            return rc;
    }
    if (!claimed &&
        (rc = IB(c, put, v->subject_type, v->subject_id, v->subject_epoch,
                 v->subject_seq, v->event_id)) != DE_OK)
        return rc;
    c->stats.applied++;
    c->handled++;
    return DE_OK;
}

/* What became of a message inside the transaction. */
enum outcome { O_DONE, O_RETRY, O_DB_ERROR, O_REDO };

/* Parks a subject behind a dead letter (kind failed or gap). */
static de_err park(de_consumer *c, const rd_kafka_message_t *m,
                   const de_event_view *v, const char *kind, const char *error,
                   int attempts)
{
    de_err err;

    if ((err = dead_letter(c, kind, m, v, error, attempts)) != DE_OK ||
        (err = IB(c, park, v->subject_type, v->subject_id, true)) != DE_OK)
        return err;
    clog_(c, DE_LOG_ERR,
          "%s %s parked at ce_subjectseq %lld (%s, %s [%d] @%lld): %s; its "
          "later events wait in de_dead_letter until de_consumer_release "
          "or de_consumer_skip",
          v->subject_type, v->subject_id, (long long)v->subject_seq, kind,
          v->topic, (int)v->partition, (long long)v->offset, error);
    return DE_OK;
}

/* Applies one decoded event inside the open transaction. */
static enum outcome apply_one(de_consumer *c, const rd_kafka_message_t *m,
                              const de_event_view *v, int attempts, char *error,
                              size_t error_size)
{
    de__inbox_entry e;
    bool claimed = false, has, renumbered = false;
    int64_t last;
    de_err err;

    error[0] = '\0';
    /* In careful mode the claim must be undone with the handler's
     * effects, so it is made inside the handler's savepoint: classify
     * with a read instead. */
    if (!c->careful && IB(c, claim, v, &claimed) != DE_OK)
        return O_DB_ERROR;
    if (claimed)
        goto run;
    if (IB(c, get, v->subject_type, v->subject_id, &e) != DE_OK)
        return O_DB_ERROR;
    if (v->subject_epoch < e.epoch) {
        /* From a numbering the subject has left: Kafka keeps a subject's
         * order, so every event of it came before the newer numbering's
         * first, and this one is read again. */
        c->stats.duplicates++;
        return O_DONE;
    }
    if (v->subject_epoch > e.epoch) {
        /* A new numbering (the subject was idle and forgotten by the
         * relay): it starts at 1. */
        renumbered = e.seq > 0;
        e.seq = 0;
        e.last_id[0] = '\0';
    }
    last = e.seq;
    if (v->subject_seq == last && e.last_id[0] != '\0' &&
        strcmp(e.last_id, v->event_id) != 0) {
        /* Two events with one number: never drop one as a duplicate. */
        snprintf(error, error_size,
                 "conflict: ce_subjectseq %lld was applied as event %s, "
                 "and event %s carries the same number (a producer "
                 "restored from an older state, or a second producer of "
                 "this subject)",
                 (long long)v->subject_seq, e.last_id, v->event_id);
        has = false;
        if (e.parked && IB(c, dl_has, v, &has) != DE_OK)
            return O_DB_ERROR;
        if (!has) {
            if (park(c, m, v, "conflict", error, 0) != DE_OK)
                return O_DB_ERROR;
            c->stats.dead_lettered++;
            c->stats.conflicts++;
        }
        return O_DONE;
    }
    if (v->subject_seq <= last) {
        c->stats.duplicates++;
        return O_DONE;
    }
    if (e.parked) {
        /* Waits behind the subject's dead letter, in order. */
        if (IB(c, dl_has, v, &has) != DE_OK ||
            (!has && dead_letter(c, "waiting", m, v,
                                 "waiting behind a parked event", 0) != DE_OK))
            return O_DB_ERROR;
        return O_DONE;
    }
    if (v->subject_seq > last + 1) {
        c->stats.gaps++;
        snprintf(error, error_size,
                 "gap: ce_subjectseq %lld after %lld%s (events %lld..%lld "
                 "never arrived)",
                 (long long)v->subject_seq, (long long)last,
                 renumbered ? " in a new numbering (ce_subjectepoch)" : "",
                 (long long)last + 1, (long long)v->subject_seq - 1);
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
    err = run_handler(c, v, claimed, error, error_size);
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

/* Decodes a message; false (and a 'foreign' dead letter) if not ours. */
static enum outcome decode_or_park(de_consumer *c, rd_kafka_message_t *m,
                                   bool *ours)
{
    char why[300];

    *ours = de__envelope_decode(m, &c->dec, why, sizeof why);
    if (*ours)
        return O_DONE;
    c->stats.foreign++;
    clog_(c, DE_LOG_WARNING,
          "record at %s [%d] @%lld is not one of ours (%s); stored in "
          "de_dead_letter as foreign",
          rd_kafka_topic_name(m->rkt), (int)m->partition, (long long)m->offset,
          why);
    return dead_letter(c, "foreign", m, NULL, why, 0) == DE_OK ? O_DONE
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

/* Whether an earlier message of the batch, of the same subject (topic,
 * subject type, key), is waiting for a retry. */
static bool behind_failed(rd_kafka_message_t **msgs, const uint8_t *fate,
                          char **ftype, size_t i, const char *type)
{
    const rd_kafka_message_t *m = msgs[i];

    for (size_t j = 0; j < i; j++)
        if (fate[j] == O_RETRY && ftype[j] != NULL &&
            msgs[j]->partition == m->partition && msgs[j]->rkt == m->rkt &&
            msgs[j]->key_len == m->key_len &&
            memcmp(msgs[j]->key, m->key, m->key_len) == 0 &&
            strcmp(ftype[j], type) == 0)
            return true;
    return false;
}

static de_err apply_batch(de_consumer *c)
{
    size_t n = c->batch.n;
    rd_kafka_message_t **msgs = c->batch.v;
    uint8_t *fate;
    char error[600], **ftype;
    de_err err = DE_OK;
    de_consumer_stats saved = c->stats;
    int saved_handled = c->handled;
    bool any_retry = false;

    if (n == 0)
        return DE_OK;
    fate = calloc(n, 1);
    ftype = calloc(n, sizeof *ftype); /* subject types of the retries */
    if (fate == NULL || ftype == NULL) {
        free(fate);
        free(ftype);
        return de__fail(DE_ERR_NOMEM, "consumer: out of memory");
    }
redo:
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
        if (any_retry &&
            behind_failed(msgs, fate, ftype, i, c->dec.view.subject_type)) {
            fate[i] = O_RETRY;
            if ((ftype[i] = strdup(c->dec.view.subject_type)) == NULL)
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
            c->stats = saved;
            c->handled = saved_handled;
            memset(fate, 0, n);
            for (size_t j = 0; j < n; j++) {
                free(ftype[j]);
                ftype[j] = NULL;
            }
            any_retry = false;
            c->careful = true;
            goto redo;
        }
        fate[i] = (uint8_t)o;
        if (o == O_RETRY &&
            (ftype[i] = strdup(c->dec.view.subject_type)) == NULL)
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
            if (de__envelope_decode(m, d, why, sizeof why) &&
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
    IB0(c, rollback);
rewind:
    c->careful = false;
    /* Read the batch again from its first message in each partition. */
    c->stats = saved;
    c->handled = saved_handled;
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
    for (size_t i = 0; i < n; i++)
        free(ftype[i]);
    free(ftype);
    free(fate);
    return err;
}

/* Retries subjects whose backoff elapsed, in one transaction each. */
static de_err run_retries(de_consumer *c)
{
    int64_t now = de__mono_ms();
    char error[600];
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
        if ((err = IB0(c, begin)) != DE_OK) {
            c->careful = false;
            return err;
        }
        for (; done < r->msgs.n; done++) {
            rd_kafka_message_t *m = r->msgs.v[done];
            enum outcome o;
            if (!de__envelope_decode(m, &c->dec, why, sizeof why))
                continue; /* cannot happen: decoded before */
            /* The first held event carries the subject's failures; the
             * ones behind it have not failed yet. */
            o = apply_one(c, m, &c->dec.view, done == 0 ? r->attempts : 0,
                          error, sizeof error);
            if (o == O_DB_ERROR) {
                IB0(c, rollback);
                c->careful = false;
                return DE_ERR_DB; /* the failing operation said why */
            }
            if (o == O_RETRY) {
                again = true;
                break;
            }
        }
        if ((err = IB0(c, commit)) != DE_OK) {
            IB0(c, rollback);
            c->careful = false;
            return err;
        }
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

static void rebalance(rd_kafka_t *rk, rd_kafka_resp_err_t err,
                      rd_kafka_topic_partition_list_t *parts, void *opaque)
{
    de_consumer *c = ((de__rk_bridge *)opaque)->owner;

    if (err == RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS) {
        rd_kafka_assign(rk, parts);
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
    rd_kafka_assign(rk, NULL);
}

/* ---- forgetting -------------------------------------------------------- */

static de_err serve_requests(de_consumer *c);

/* Subjects looked at per round, and how often a round runs. */
#define FORGET_SLICE 2000
#define FORGET_EVERY_MS 1000

/* Forgets, a slice at a time in a transaction of its own, the inbox rows
 * of subjects not applied to for consumer.subject.forget.ms: by then the
 * relay has forgotten them too, and their next event opens a new
 * numbering, which needs no memory of the old one. */
static de_err forget_idle(de_consumer *c)
{
    int64_t now = de__mono_ms(), n = 0;
    de_err err;

    if (c->forget_ms <= 0 || now < c->next_forget_ms)
        return DE_OK;
    c->next_forget_ms = now + FORGET_EVERY_MS;
    if ((err = IB0(c, begin)) != DE_OK)
        return err;
    if ((err = IB(c, forget, de__now_ms() - c->forget_ms, FORGET_SLICE, &n)) !=
            DE_OK ||
        (err = IB0(c, commit)) != DE_OK) {
        IB0(c, rollback);
        return err;
    }
    c->stats.forgotten += (uint64_t)n;
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
                        "the consumer has no topics: set consumer.topics or "
                        "register a handler with de_consumer_on");
    }
    err = rd_kafka_subscribe(c->rk, l);
    rd_kafka_topic_partition_list_destroy(l);
    if (err)
        return de__fail(DE_ERR_KAFKA, "subscribing failed: %s",
                        rd_kafka_err2str(err));
    c->subscribed = true;
    return DE_OK;
}

de_err de_consumer_poll(de_consumer *c, int timeout_ms, int *handled)
{
    rd_kafka_message_t *m;
    de_err err = DE_OK;
    int64_t first_wait = timeout_ms;

    if (handled)
        *handled = 0;
    if (c == NULL)
        return de__fail(DE_ERR_ARG, "de_consumer_poll needs a consumer "
                                    "(got NULL)");
    c->handled = 0;
    if (!c->subscribed && (err = subscribe(c)) != DE_OK)
        return err;
    if (c->fatal)
        return de__fail(DE_ERR_KAFKA, "the consumer hit a fatal error; close "
                                      "and reopen it");
    if ((err = run_retries(c)) != DE_OK)
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
    if (err == DE_OK)
        err = apply_batch(c);
    else
        (void)apply_batch(c);       /* the first failure is the one returned */
    (void)commit_offsets(c, false); /* asynchronous: fails only later */
    if (err == DE_OK && forget_idle(c) != DE_OK)
        clog_(c, DE_LOG_WARNING,
              "forgetting idle subjects failed: %s "
              "(retrying)",
              de_errmsg());
    if (err == DE_OK && serve_requests(c) != DE_OK)
        clog_(c, DE_LOG_WARNING, "release requests failed: %s (retrying)",
              de_errmsg());
    if (handled)
        *handled = c->handled;
    return err;
}

/* ---- release and skip ------------------------------------------------- */

/* Re-applies a subject's parked events in order; skip_first drops the
 * first one.  Runs in one transaction. */
static de_err unpark(de_consumer *c, const char *type, const char *id,
                     bool skip_first)
{
    char error[600], q1[DE__QUOTE_MAX], q2[DE__QUOTE_MAX];
    bool first = true, stuck = false;
    de_err err;

    if (c == NULL || type == NULL || id == NULL)
        return de__fail(DE_ERR_ARG, "release/skip needs a consumer, a "
                                    "subject type and a subject id");
    if ((err = IB0(c, begin)) != DE_OK)
        return err;
    c->careful = true;
    /* Lift the flag so that apply_one applies rather than parks again. */
    if ((err = IB(c, park, type, id, false)) != DE_OK)
        goto fail;
    /* One parked event at a time, the lowest first: each one handled
     * leaves the 'parked' state, so the next read moves on. */
    while (!stuck) {
        de__dead_letter dl;
        const de_event_view *v = &dl.view;
        de__inbox_entry e;
        bool found;

        if ((err = IB(c, dl_next, type, id, &dl, &found)) != DE_OK)
            goto fail;
        if (!found)
            break;
        if (first && skip_first) {
            if ((err = IB(c, dl_done, dl.id, "skipped")) == DE_OK)
                err = IB(c, put, type, id, v->subject_epoch, v->subject_seq,
                         v->event_id);
        } else if ((err = IB(c, get, type, id, &e)) == DE_OK) {
            /* A conflict released: the operator says it is a real event
             * of its own, although its number was taken. */
            if (de__number_after(v->subject_epoch, v->subject_seq, e.epoch,
                                 e.seq) ||
                (dl.kind && strcmp(dl.kind, "conflict") == 0 &&
                 v->subject_epoch == e.epoch &&
                 strcmp(e.last_id, v->event_id) != 0)) {
                /* Released means "go on": a gap is accepted here. */
                err = run_handler(c, v, false, error, sizeof error);
                if (err == DE__HANDLER_FAILED &&
                    (err = IB(c, dl_fail, dl.id, error)) == DE_OK &&
                    (err = IB(c, park, type, id, true)) == DE_OK) {
                    clog_(c, DE_LOG_ERR, "%s %s stays parked: %s", type, id,
                          error);
                    stuck = true;
                }
            } else {
                c->stats.duplicates++;
            }
            if (err == DE_OK && !stuck)
                err = IB(c, dl_done, dl.id, "applied");
        }
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
    IB0(c, rollback);
    c->careful = false;
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
        } else if (unpark(c, rq.type, rq.subject_id, rq.skip) != DE_OK) {
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
    return unpark(c, subject_type, subject_id, false);
}

de_err de_consumer_skip(de_consumer *c, const char *subject_type,
                        const char *subject_id)
{
    return unpark(c, subject_type, subject_id, true);
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
        rd_kafka_destroy(c->rk);
    }
    for (size_t i = 0; i < c->batch.n; i++)
        rd_kafka_message_destroy(c->batch.v[i]);
    free(c->batch.v);
    for (size_t i = 0; i < c->retry.n; i++)
        free_retrying(c->retry.v[i]);
    free(c->retry.v);
    for (size_t i = 0; i < c->parts.n; i++)
        free(c->parts.v[i].topic);
    free(c->parts.v);
    for (size_t i = 0; i < c->handlers.n; i++) {
        free(c->handlers.v[i].subject_type);
        free(c->handlers.v[i].action);
    }
    free(c->handlers.v);
    if (c->ib != NULL)
        IB0(c, close);
    de__decoded_free(&c->dec);
    de_conf_destroy(c->conf);
    free(c);
    return err;
}

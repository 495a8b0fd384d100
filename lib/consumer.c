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
#include "internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define CONSUMER_SCHEMA_VERSION 2

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
    rd_kafka_message_t **msgs;
    size_t n, cap;
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

enum {
    Q_BEGIN,
    Q_COMMIT,
    Q_ROLLBACK,
    Q_SAVEPOINT,
    Q_RELEASE,
    Q_ROLLBACK_TO,
    Q_INBOX_GET,
    Q_INBOX_PUT,
    Q_INBOX_PARK,
    Q_INBOX_CLAIM,
    Q_INBOX_FIRST,
    Q_DL_INSERT,
    Q_DL_HAS,
    Q_DL_PARKED,
    Q_DL_DONE,
    Q_DL_FAIL,
    Q_PARKED_COUNT,
    Q_COUNT
};

static const char *const sql[Q_COUNT] = {
    [Q_BEGIN] = "BEGIN IMMEDIATE",
    [Q_COMMIT] = "COMMIT",
    [Q_ROLLBACK] = "ROLLBACK",
    [Q_SAVEPOINT] = "SAVEPOINT de_event",
    [Q_RELEASE] = "RELEASE de_event",
    [Q_ROLLBACK_TO] = "ROLLBACK TO de_event",
    [Q_INBOX_GET] = "SELECT last_seq, parked, last_event_id FROM "
                    "main.de_inbox WHERE subject_type = ?1 AND "
                    "subject_id = ?2",
    [Q_INBOX_PUT] = "INSERT INTO main.de_inbox(subject_type, subject_id, "
                    "last_seq, parked, updated_ms, last_event_id) VALUES "
                    "(?1, ?2, ?3, 0, ?4, ?5) ON CONFLICT(subject_type, "
                    "subject_id) DO UPDATE SET last_seq = excluded.last_seq, "
                    "parked = 0, updated_ms = excluded.updated_ms, "
                    "last_event_id = excluded.last_event_id",
    [Q_INBOX_PARK] = "INSERT INTO main.de_inbox(subject_type, subject_id, "
                     "last_seq, parked, updated_ms) VALUES (?1, ?2, 0, ?3, ?4) "
                     "ON CONFLICT(subject_type, subject_id) DO UPDATE SET "
                     "parked = excluded.parked, updated_ms = "
                     "excluded.updated_ms",
    /* The next event of a known subject: advance in one statement. */
    [Q_INBOX_CLAIM] = "UPDATE main.de_inbox SET last_seq = ?3, updated_ms = "
                      "?4, last_event_id = ?5 WHERE subject_type = ?1 AND "
                      "subject_id = ?2 AND last_seq = ?3 - 1 AND parked = 0",
    /* The first event of a subject never seen. */
    [Q_INBOX_FIRST] = "INSERT OR IGNORE INTO main.de_inbox(subject_type, "
                      "subject_id, last_seq, parked, updated_ms, "
                      "last_event_id) VALUES (?1, ?2, 1, 0, ?4, ?5)",
    [Q_DL_INSERT] =
        "INSERT INTO main.de_dead_letter(kind, state, topic, partition, "
        "offset, subject_type, subject_id, seq, event_id, action, type, "
        "source, occurred_at_ms, traceparent, tracestate, payload, error, "
        "attempts, parked_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, "
        "?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19)",
    [Q_DL_HAS] = "SELECT 1 FROM main.de_dead_letter WHERE subject_type = ?1 "
                 "AND subject_id = ?2 AND seq = ?3 AND state = 'parked'",
    [Q_DL_PARKED] = "SELECT id, kind, topic, partition, offset, seq, "
                    "event_id, action, type, source, occurred_at_ms, "
                    "traceparent, tracestate, payload, attempts "
                    "FROM main.de_dead_letter WHERE subject_type = ?1 AND "
                    "subject_id = ?2 AND state = 'parked' "
                    "ORDER BY seq, id LIMIT 1",
    [Q_DL_DONE] = "UPDATE main.de_dead_letter SET state = ?2 WHERE id = ?1",
    [Q_DL_FAIL] = "UPDATE main.de_dead_letter SET kind = 'failed', "
                  "attempts = attempts + 1, error = ?2 WHERE id = ?1",
    [Q_PARKED_COUNT] = "SELECT count(*) FROM main.de_inbox WHERE parked = 1",
};

static const char schema_sql[] =
    "CREATE TABLE IF NOT EXISTS main.de_consumer_meta("
    "  key TEXT PRIMARY KEY, value) WITHOUT ROWID;"
    "CREATE TABLE IF NOT EXISTS main.de_inbox("
    "  subject_type TEXT NOT NULL, subject_id TEXT NOT NULL,"
    "  last_seq INTEGER NOT NULL, parked INTEGER NOT NULL DEFAULT 0,"
    "  updated_ms INTEGER NOT NULL, last_event_id TEXT,"
    "  PRIMARY KEY(subject_type, subject_id)) WITHOUT ROWID;"
    "CREATE INDEX IF NOT EXISTS main.de_inbox_parked ON de_inbox(parked)"
    "  WHERE parked = 1;"
    "CREATE TABLE IF NOT EXISTS main.de_dead_letter("
    "  id INTEGER PRIMARY KEY,"
    "  kind TEXT NOT NULL,"  /* failed, waiting, gap, conflict, foreign */
    "  state TEXT NOT NULL," /* parked, applied, skipped, foreign */
    "  topic TEXT, partition INTEGER, offset INTEGER,"
    "  subject_type TEXT, subject_id TEXT, seq INTEGER, event_id TEXT,"
    "  action TEXT, type TEXT, source TEXT, occurred_at_ms INTEGER,"
    "  traceparent TEXT, tracestate TEXT, payload BLOB, error TEXT,"
    "  attempts INTEGER NOT NULL DEFAULT 0, parked_ms INTEGER NOT NULL);"
    "CREATE INDEX IF NOT EXISTS main.de_dead_letter_subject"
    "  ON de_dead_letter(subject_type, subject_id, seq)"
    "  WHERE state = 'parked';";

#define VEC(T)                                                                 \
    struct {                                                                   \
        T *v;                                                                  \
        size_t n, cap;                                                         \
    }

struct de_consumer {
    sqlite3 *db;
    de_conf *conf;
    rd_kafka_t *rk;
    sqlite3_stmt *q[Q_COUNT];
    VEC(handler) handlers;
    VEC(retrying *) retry;
    VEC(progress) parts;
    VEC(rd_kafka_message_t *) batch;
    bool subscribed;
    bool fatal;
    /* Handlers run in savepoints only in careful mode: a batch runs
     * without them, and is redone with them if a handler fails. */
    bool careful;
    int64_t max_attempts, backoff_ms, backoff_max_ms, batch_size;
    enum gap_policy gap;
    de__decoded dec;
    de_consumer_stats stats;
    int handled; /* applied during the current call */
};

static int64_t now_ms(void)
{
    return de__now_ms();
}

static int64_t mono_ms(void)
{
    return de__mono_us() / 1000;
}

static bool vgrow(void **v, size_t *cap, size_t size)
{
    size_t ncap = *cap ? *cap * 2 : 8;
    void *n = realloc(*v, ncap * size);

    if (n == NULL)
        return false;
    *v = n;
    *cap = ncap;
    return true;
}

#define VPUSH(vec, item)                                                       \
    (((vec).n < (vec).cap ||                                                   \
      vgrow((void **)&(vec).v, &(vec).cap, sizeof(*(vec).v)))                  \
         ? ((vec).v[(vec).n++] = (item), true)                                 \
         : false)

static void clog_(de_consumer *c, int level, const char *fmt, ...)
    DE__PRINTF(3, 4);
static void clog_(de_consumer *c, int level, const char *fmt, ...)
{
    char line[900];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    de__log(c->conf, level, "consumer: %s", line);
}

/* Steps a statement without rows and resets it. */
static int step(de_consumer *c, int which)
{
    int rc = sqlite3_step(c->q[which]);

    sqlite3_reset(c->q[which]);
    sqlite3_clear_bindings(c->q[which]);
    return rc;
}

/* ---- opening --------------------------------------------------------- */

static const struct owned {
    const char *key, *value, *why;
} owned[] = {
    {"enable.auto.commit", "false",
     "offsets are committed only after the database commit"},
    {"enable.auto.offset.store", "false",
     "offsets are stored only after the database commit"},
};

static void on_rdkafka_log(const rd_kafka_t *rk, int level, const char *fac,
                           const char *buf)
{
    de_consumer *c = rd_kafka_opaque(rk);

    de__log(c->conf, level, "librdkafka: %s: %s", fac, buf);
}

static void on_error(rd_kafka_t *rk, int err, const char *reason, void *opaque)
{
    de_consumer *c = opaque;
    char fatal[256];

    if (err == RD_KAFKA_RESP_ERR__FATAL) {
        rd_kafka_fatal_error(rk, fatal, sizeof fatal);
        clog_(c, DE_LOG_ERR, "fatal consumer error: %s", fatal);
        c->fatal = true;
        return;
    }
    clog_(c, DE_LOG_INFO, "kafka: %s: %s",
          rd_kafka_err2name((rd_kafka_resp_err_t)err), reason);
}

static void rebalance(rd_kafka_t *rk, rd_kafka_resp_err_t err,
                      rd_kafka_topic_partition_list_t *parts, void *opaque);

static de_err make_kafka(de_consumer *c)
{
    rd_kafka_conf_t *kc = rd_kafka_conf_new();
    char errstr[512];
    const char *v;
    static const char *const defaults[][2] = {
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

    if (!de__conf_rdkafka_get(c->conf, "group.id", &v)) {
        rd_kafka_conf_destroy(kc);
        return de__fail(DE_ERR_CONFIG, "the consumer needs group.id (its "
                                       "consumer group)");
    }
    for (size_t i = 0; i < DE__ARRAY_LEN(owned); i++)
        if (de__conf_rdkafka_get(c->conf, owned[i].key, &v) &&
            strcmp(v, owned[i].value) != 0) {
            rd_kafka_conf_destroy(kc);
            return de__fail(DE_ERR_CONFIG,
                            "%s=%s is not allowed for the consumer: it keeps "
                            "%s=%s because %s",
                            owned[i].key, v, owned[i].key, owned[i].value,
                            owned[i].why);
        }
    for (size_t i = 0; i < DE__ARRAY_LEN(defaults); i++)
        rd_kafka_conf_set(kc, defaults[i][0], defaults[i][1], errstr,
                          sizeof errstr);
    if (de__conf_apply_rdkafka(c->conf, kc) != DE_OK) {
        rd_kafka_conf_destroy(kc);
        return DE_ERR_CONFIG;
    }
    for (size_t i = 0; i < DE__ARRAY_LEN(owned); i++)
        rd_kafka_conf_set(kc, owned[i].key, owned[i].value, errstr,
                          sizeof errstr);
    rd_kafka_conf_set_opaque(kc, c);
    rd_kafka_conf_set_log_cb(kc, on_rdkafka_log);
    rd_kafka_conf_set_error_cb(kc, on_error);
    rd_kafka_conf_set_rebalance_cb(kc, rebalance);
    c->rk = rd_kafka_new(RD_KAFKA_CONSUMER, kc, errstr, sizeof errstr);
    if (c->rk == NULL) {
        rd_kafka_conf_destroy(kc);
        return de__fail(DE_ERR_CONFIG,
                        "librdkafka refused the consumer configuration: %s",
                        errstr);
    }
    rd_kafka_poll_set_consumer(c->rk);
    return DE_OK;
}

static de_err ensure_schema(de_consumer *c)
{
    sqlite3_stmt *st = NULL;
    int64_t version = 0;
    char buf[160];
    de_err err;

    if ((err = de__exec(c->db, "BEGIN IMMEDIATE")) != DE_OK)
        return err;
    if ((err = de__exec(c->db, schema_sql)) != DE_OK)
        goto fail;
    if (sqlite3_prepare_v2(c->db,
                           "SELECT value FROM main.de_consumer_meta WHERE "
                           "key = 'schema_version'",
                           -1, &st, NULL) != SQLITE_OK) {
        err = de__fail_db(c->db, "cannot read the consumer schema version");
        goto fail;
    }
    if (sqlite3_step(st) == SQLITE_ROW)
        version = sqlite3_column_int64(st, 0);
    sqlite3_finalize(st);
    /* 1 -> 2: the inbox remembers the ce_id applied with each number. */
    if (version == 1 &&
        (err = de__exec(c->db, "ALTER TABLE main.de_inbox ADD COLUMN "
                               "last_event_id TEXT")) != DE_OK)
        goto fail;
    if (version > CONSUMER_SCHEMA_VERSION) {
        err = de__fail(DE_ERR_STATE,
                       "database '%s' has consumer schema version %lld, "
                       "newer than the %d this libdeliveryevents %s "
                       "understands",
                       sqlite3_db_filename(c->db, "main"), (long long)version,
                       CONSUMER_SCHEMA_VERSION, de_version());
        goto fail;
    }
    snprintf(buf, sizeof buf,
             "INSERT OR REPLACE INTO main.de_consumer_meta VALUES "
             "('schema_version', %d)",
             CONSUMER_SCHEMA_VERSION);
    if ((err = de__exec(c->db, buf)) != DE_OK ||
        (err = de__exec(c->db, "COMMIT")) != DE_OK)
        goto fail;
    return DE_OK;
fail:
    sqlite3_exec(c->db, "ROLLBACK", NULL, NULL, NULL);
    return err;
}

de_err de_consumer_open(sqlite3 *db, const de_conf *conf, de_consumer **out)
{
    de_consumer *c = NULL;
    const char *path, *gap;
    de_err err;

    if (out != NULL)
        *out = NULL;
    if (db == NULL || out == NULL)
        return de__fail(DE_ERR_ARG,
                        "de_consumer_open needs a connection and "
                        "an out pointer (got NULL %s)",
                        db == NULL ? "db" : "out");
    path = sqlite3_db_filename(db, "main");
    if (path == NULL || path[0] == '\0')
        return de__fail(DE_ERR_ARG,
                        "the consumer's database is in memory or temporary; "
                        "its inbox must survive a restart");
    if (sqlite3_db_readonly(db, "main") == 1)
        return de__fail(DE_ERR_ARG, "database '%s' is open read-only", path);
    if (!sqlite3_get_autocommit(db))
        return de__fail(DE_ERR_STATE,
                        "de_consumer_open was called inside a "
                        "transaction on '%s'",
                        path);
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
    gap = de__conf_str(c->conf, DE__K_CONSUMER_ON_GAP);
    c->gap = strcmp(gap, "apply") == 0 ? GAP_APPLY : GAP_PARK;
    if ((err = de__prepare_connection(
             db, de__conf_int(c->conf, DE__K_OUTBOX_BUSY_TIMEOUT_MS))) != DE_OK)
        goto fail;
    if ((err = ensure_schema(c)) != DE_OK)
        goto fail;
    for (int i = 0; i < Q_COUNT; i++)
        if (sqlite3_prepare_v3(db, sql[i], -1, SQLITE_PREPARE_PERSISTENT,
                               &c->q[i], NULL) != SQLITE_OK) {
            err = de__fail_db(db, "cannot prepare '%s'", sql[i]);
            goto fail;
        }
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
        !VPUSH(c->handlers, h)) {
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
    if (p.topic == NULL || !VPUSH(c->parts, p)) {
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
        for (size_t j = 0; j < r->n; j++) {
            rd_kafka_message_t *m = r->msgs[j];
            if (m->partition == p->partition && m->offset < at &&
                strcmp(rd_kafka_topic_name(m->rkt), p->topic) == 0)
                at = m->offset;
        }
    }
    return at;
}

/* Commits every partition's progress (async unless sync). */
static void commit_offsets(de_consumer *c, bool sync)
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
    if (l->cnt > 0) {
        err = rd_kafka_commit(c->rk, l, sync ? 0 : 1);
        if (err && err != RD_KAFKA_RESP_ERR__NO_OFFSET)
            clog_(c, DE_LOG_WARNING,
                  "committing offsets failed: %s (the events are read "
                  "again and skipped as duplicates)",
                  rd_kafka_err2str(err));
    }
    rd_kafka_topic_partition_list_destroy(l);
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
    for (size_t i = 0; i < r->n; i++)
        rd_kafka_message_destroy(r->msgs[i]);
    free(r->msgs);
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

/* Inbox state of a subject, read inside the transaction. */
static de_err inbox_get(de_consumer *c, const char *type, const char *id,
                        int64_t *last, bool *parked, char *last_id,
                        size_t last_id_size)
{
    sqlite3_stmt *q = c->q[Q_INBOX_GET];
    const unsigned char *lid;
    int rc;

    *last = 0;
    *parked = false;
    last_id[0] = '\0';
    sqlite3_bind_text(q, 1, type, -1, SQLITE_STATIC);
    sqlite3_bind_text(q, 2, id, -1, SQLITE_STATIC);
    rc = sqlite3_step(q);
    if (rc == SQLITE_ROW) {
        *last = sqlite3_column_int64(q, 0);
        *parked = sqlite3_column_int(q, 1) != 0;
        if ((lid = sqlite3_column_text(q, 2)) != NULL)
            snprintf(last_id, last_id_size, "%s", (const char *)lid);
    }
    sqlite3_reset(q);
    sqlite3_clear_bindings(q);
    if (rc != SQLITE_ROW && rc != SQLITE_DONE)
        return de__fail_db(c->db, "consumer: reading the inbox");
    return DE_OK;
}

static de_err inbox_put(de_consumer *c, const char *type, const char *id,
                        int64_t seq, const char *event_id)
{
    sqlite3_stmt *q = c->q[Q_INBOX_PUT];

    sqlite3_bind_text(q, 1, type, -1, SQLITE_STATIC);
    sqlite3_bind_text(q, 2, id, -1, SQLITE_STATIC);
    sqlite3_bind_int64(q, 3, seq);
    sqlite3_bind_int64(q, 4, now_ms());
    sqlite3_bind_text(q, 5, event_id, -1, SQLITE_STATIC);
    if (step(c, Q_INBOX_PUT) != SQLITE_DONE)
        return de__fail_db(c->db, "consumer: updating the inbox");
    return DE_OK;
}

static de_err inbox_park(de_consumer *c, const char *type, const char *id,
                         bool parked)
{
    sqlite3_stmt *q = c->q[Q_INBOX_PARK];

    sqlite3_bind_text(q, 1, type, -1, SQLITE_STATIC);
    sqlite3_bind_text(q, 2, id, -1, SQLITE_STATIC);
    sqlite3_bind_int(q, 3, parked ? 1 : 0);
    sqlite3_bind_int64(q, 4, now_ms());
    if (step(c, Q_INBOX_PARK) != SQLITE_DONE)
        return de__fail_db(c->db, "consumer: parking a subject");
    return DE_OK;
}

/* Stores an event (or a foreign record) in de_dead_letter. */
static de_err dead_letter(de_consumer *c, const char *kind,
                          const rd_kafka_message_t *m, const de_event_view *v,
                          const char *error, int attempts)
{
    sqlite3_stmt *q = c->q[Q_DL_INSERT];

    sqlite3_bind_text(q, 1, kind, -1, SQLITE_STATIC);
    sqlite3_bind_text(q, 2, strcmp(kind, "foreign") == 0 ? "foreign" : "parked",
                      -1, SQLITE_STATIC);
    sqlite3_bind_text(q, 3, rd_kafka_topic_name(m->rkt), -1, SQLITE_STATIC);
    sqlite3_bind_int(q, 4, m->partition);
    sqlite3_bind_int64(q, 5, m->offset);
    if (v != NULL) {
        sqlite3_bind_text(q, 6, v->subject_type, -1, SQLITE_STATIC);
        sqlite3_bind_text(q, 7, v->subject_id, -1, SQLITE_STATIC);
        sqlite3_bind_int64(q, 8, v->subject_seq);
        sqlite3_bind_text(q, 9, v->event_id, -1, SQLITE_STATIC);
        sqlite3_bind_text(q, 10, v->action, -1, SQLITE_STATIC);
        sqlite3_bind_text(q, 11, v->type, -1, SQLITE_STATIC);
        sqlite3_bind_text(q, 12, v->source, -1, SQLITE_STATIC);
        sqlite3_bind_int64(q, 13, v->occurred_at_ms);
        if (v->traceparent)
            sqlite3_bind_text(q, 14, v->traceparent, -1, SQLITE_STATIC);
        if (v->tracestate)
            sqlite3_bind_text(q, 15, v->tracestate, -1, SQLITE_STATIC);
    }
    if (m->payload)
        sqlite3_bind_blob(q, 16, m->payload, (int)m->len, SQLITE_STATIC);
    sqlite3_bind_text(q, 17, error, -1, SQLITE_STATIC);
    sqlite3_bind_int(q, 18, attempts);
    sqlite3_bind_int64(q, 19, now_ms());
    if (step(c, Q_DL_INSERT) != SQLITE_DONE)
        return de__fail_db(c->db, "consumer: writing a dead letter");
    return DE_OK;
}

static bool already_parked(de_consumer *c, const de_event_view *v)
{
    sqlite3_stmt *q = c->q[Q_DL_HAS];
    bool has;

    sqlite3_bind_text(q, 1, v->subject_type, -1, SQLITE_STATIC);
    sqlite3_bind_text(q, 2, v->subject_id, -1, SQLITE_STATIC);
    sqlite3_bind_int64(q, 3, v->subject_seq);
    has = sqlite3_step(q) == SQLITE_ROW;
    sqlite3_reset(q);
    sqlite3_clear_bindings(q);
    return has;
}

/* Takes the subject's next place in the inbox when v is exactly the next
 * event (the common case, one statement); false when it is not, and the
 * caller looks closer. */
static bool claim(de_consumer *c, const de_event_view *v, bool *db_error)
{
    int which = Q_INBOX_CLAIM;

    *db_error = false;
    for (int pass = 0; pass < 2; pass++) {
        sqlite3_stmt *q = c->q[which];
        sqlite3_bind_text(q, 1, v->subject_type, -1, SQLITE_STATIC);
        sqlite3_bind_text(q, 2, v->subject_id, -1, SQLITE_STATIC);
        sqlite3_bind_int64(q, 3, v->subject_seq);
        sqlite3_bind_int64(q, 4, now_ms());
        sqlite3_bind_text(q, 5, v->event_id, -1, SQLITE_STATIC);
        if (step(c, which) != SQLITE_DONE) {
            *db_error = true;
            de__fail_db(c->db, "consumer: updating the inbox");
            return false;
        }
        if (sqlite3_changes(c->db) == 1)
            return true;
        if (v->subject_seq != 1)
            return false;
        which = Q_INBOX_FIRST;
    }
    return false;
}

/* The handler said no, or ended the transaction it must not end. */
static de_err handler_failed(de_consumer *c, const de_event_view *v, de_err rc,
                             char *error, size_t error_size)
{
    if (sqlite3_get_autocommit(c->db))
        return de__fail(DE_ERR_DB,
                        "consumer: the handler for %s.%s ended the "
                        "transaction; handlers must not COMMIT or ROLLBACK",
                        v->subject_type, v->action);
    snprintf(error, error_size, "handler for %s.%s returned %s%s%s",
             v->subject_type, v->action, de_err_name(rc),
             de_errmsg()[0] ? ": " : "", de_errmsg());
    return DE_ERR_ARG;
}

/* Runs the handler (in a savepoint in careful mode) and, unless claimed
 * already, records the event in the inbox.  DE_OK: applied; DE_ERR_ARG:
 * the handler failed (why in error), its effects undone; DE_ERR_TIMEOUT:
 * the handler failed outside careful mode -- the caller must roll the
 * whole batch back and redo it carefully; anything else: a database
 * failure of the whole transaction. */
static de_err run_handler(de_consumer *c, const de_event_view *v, bool claimed,
                          char *error, size_t error_size)
{
    const handler *h = find_handler(c, v->subject_type, v->action);
    de_err rc = DE_OK;

    if (h != NULL) {
        if (c->careful && step(c, Q_SAVEPOINT) != SQLITE_DONE)
            return de__fail_db(c->db, "consumer: savepoint");
        rc = h->fn(c->db, v, h->ctx);
        if (rc != DE_OK) {
            if (!c->careful)
                return sqlite3_get_autocommit(c->db)
                           ? handler_failed(c, v, rc, error, error_size)
                           : DE_ERR_TIMEOUT;
            if (step(c, Q_ROLLBACK_TO) != SQLITE_DONE ||
                step(c, Q_RELEASE) != SQLITE_DONE)
                return de__fail_db(c->db, "consumer: rolling back an event");
            return handler_failed(c, v, rc, error, error_size);
        }
        if (sqlite3_get_autocommit(c->db))
            return handler_failed(c, v, DE_ERR_STATE, error, error_size);
        if (c->careful && step(c, Q_RELEASE) != SQLITE_DONE)
            return de__fail_db(c->db, "consumer: releasing a savepoint");
    }
    if (!claimed && (rc = inbox_put(c, v->subject_type, v->subject_id,
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
        (err = inbox_park(c, v->subject_type, v->subject_id, true)) != DE_OK)
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
    int64_t last;
    bool parked, claimed, dberr;
    char last_id[DE__EVENT_ID_MAX + 1];
    de_err err;

    error[0] = '\0';
    /* In careful mode the claim must be undone with the handler's
     * effects, so it is made inside the handler's savepoint: classify
     * with a read instead. */
    claimed = !c->careful && claim(c, v, &dberr);
    if (!c->careful && dberr)
        return O_DB_ERROR;
    if (claimed)
        goto run;
    if (inbox_get(c, v->subject_type, v->subject_id, &last, &parked, last_id,
                  sizeof last_id) != DE_OK)
        return O_DB_ERROR;
    if (v->subject_seq == last && last_id[0] != '\0' &&
        strcmp(last_id, v->event_id) != 0) {
        /* Two events with one number: never drop one as a duplicate. */
        snprintf(error, error_size,
                 "conflict: ce_subjectseq %lld was applied as event %s, "
                 "and event %s carries the same number (a producer "
                 "restored from an older state, or a second producer of "
                 "this subject)",
                 (long long)v->subject_seq, last_id, v->event_id);
        if (!parked || !already_parked(c, v)) {
            if (park(c, m, v, "conflict", error, 0) != DE_OK)
                return O_DB_ERROR;
            c->stats.dead_lettered++;
        }
        return O_DONE;
    }
    if (v->subject_seq <= last) {
        c->stats.duplicates++;
        return O_DONE;
    }
    if (parked) {
        /* Waits behind the subject's dead letter, in order. */
        if (!already_parked(c, v) &&
            dead_letter(c, "waiting", m, v, "waiting behind a parked event",
                        0) != DE_OK)
            return O_DB_ERROR;
        return O_DONE;
    }
    if (v->subject_seq > last + 1) {
        c->stats.gaps++;
        snprintf(error, error_size,
                 "gap: ce_subjectseq %lld after %lld (events %lld..%lld "
                 "never arrived)",
                 (long long)v->subject_seq, (long long)last,
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
    if (err == DE_ERR_TIMEOUT)
        return O_REDO;
    if (err != DE_ERR_ARG)
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
            (r->subject_id = strdup(id)) == NULL || !VPUSH(c->retry, r)) {
            free_retrying(r);
            return false;
        }
        r->attempts = attempts;
        r->next_at_ms = mono_ms() + backoff_for(c, attempts);
        snprintf(r->error, sizeof r->error, "%s", error);
    }
    if (r->n == r->cap && !vgrow((void **)&r->msgs, &r->cap, sizeof *r->msgs))
        return false;
    r->msgs[r->n++] = m;
    return true;
}

/*
 * Applies a batch in one transaction.  Messages that must wait for a
 * retry are moved to the retry lists (after the commit); the rest are
 * destroyed.  On a database failure nothing is kept: the batch is rolled
 * back and the consumer seeks back so that it is read again.
 */
static de_err apply_batch(de_consumer *c)
{
    size_t n = c->batch.n;
    rd_kafka_message_t **msgs = c->batch.v;
    uint8_t *fate;
    char error[600];
    de_err err = DE_OK;
    de_consumer_stats saved = c->stats;
    int saved_handled = c->handled;
    bool any_retry = false;

    if (n == 0)
        return DE_OK;
    fate = calloc(n, 1);
    if (fate == NULL)
        return de__fail(DE_ERR_NOMEM, "consumer: out of memory");
redo:
    if (step(c, Q_BEGIN) != SQLITE_DONE) {
        err = de__fail_db(c->db, "consumer: cannot begin a transaction");
        goto rewind;
    }
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
        for (size_t j = 0; any_retry && j < i; j++) {
            if (fate[j] == O_RETRY && msgs[j]->partition == m->partition &&
                msgs[j]->key_len == m->key_len &&
                memcmp(msgs[j]->key, m->key, m->key_len) == 0) {
                fate[i] = O_RETRY;
                break;
            }
        }
        if (fate[i] == O_RETRY)
            continue;
        o = apply_one(c, m, &c->dec.view, 0, error, sizeof error);
        if (o == O_DB_ERROR)
            goto fail;
        if (o == O_REDO) {
            /* A handler failed with no savepoint around it: undo the
             * batch and apply it again, carefully. */
            step(c, Q_ROLLBACK);
            c->stats = saved;
            c->handled = saved_handled;
            memset(fate, 0, n);
            any_retry = false;
            c->careful = true;
            goto redo;
        }
        fate[i] = (uint8_t)o;
        any_retry |= o == O_RETRY;
        if (o == O_RETRY)
            clog_(c, DE_LOG_WARNING, "%s %s seq %lld: %s (retrying)",
                  c->dec.view.subject_type, c->dec.view.subject_id,
                  (long long)c->dec.view.subject_seq, error);
    }
    if (step(c, Q_COMMIT) != SQLITE_DONE) {
        err = de__fail_db(c->db, "consumer: cannot commit a batch");
        goto fail_rolled;
    }
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
        }
        note_processed(c, m);
        rd_kafka_message_destroy(m);
    }
    c->batch.n = 0;
    free(fate);
    return DE_OK;
fail:
    err = de__fail_db(c->db, "consumer: applying a batch failed");
fail_rolled:
    step(c, Q_ROLLBACK);
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
        rd_kafka_seek_partitions(c->rk, l, 1000);
        rd_kafka_topic_partition_list_destroy(l);
        rd_kafka_message_destroy(m);
    }
    c->batch.n = 0;
    free(fate);
    return err;
}

/* Retries subjects whose backoff elapsed, in one transaction each. */
static de_err run_retries(de_consumer *c)
{
    int64_t now = mono_ms();
    char error[600];

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
        if (step(c, Q_BEGIN) != SQLITE_DONE) {
            c->careful = false;
            return de__fail_db(c->db, "consumer: cannot begin a retry");
        }
        for (; done < r->n; done++) {
            rd_kafka_message_t *m = r->msgs[done];
            enum outcome o;
            if (!de__envelope_decode(m, &c->dec, why, sizeof why))
                continue; /* cannot happen: decoded before */
            /* The first held event carries the subject's failures; the
             * ones behind it have not failed yet. */
            o = apply_one(c, m, &c->dec.view, done == 0 ? r->attempts : 0,
                          error, sizeof error);
            if (o == O_DB_ERROR) {
                step(c, Q_ROLLBACK);
                c->careful = false;
                return de__fail_db(c->db, "consumer: retry failed");
            }
            if (o == O_RETRY) {
                again = true;
                break;
            }
        }
        if (step(c, Q_COMMIT) != SQLITE_DONE) {
            step(c, Q_ROLLBACK);
            c->careful = false;
            return de__fail_db(c->db, "consumer: cannot commit a retry");
        }
        c->stats.batches++;
        for (size_t i = 0; i < done; i++) {
            note_processed(c, r->msgs[i]);
            rd_kafka_message_destroy(r->msgs[i]);
        }
        memmove(r->msgs, r->msgs + done, (r->n - done) * sizeof *r->msgs);
        r->n -= done;
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
    de_consumer *c = opaque;

    if (err == RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS) {
        rd_kafka_assign(rk, parts);
        return;
    }
    /* Revoked: finish what was read, commit it, and forget the partitions
     * (held retries included: the next owner reads them again from the
     * committed offset, which never passed them). */
    apply_batch(c);
    commit_offsets(c, true);
    for (size_t k = 0; k < c->retry.n;) {
        retrying *r = c->retry.v[k];
        if (r->n > 0 && in_list(parts, rd_kafka_topic_name(r->msgs[0]->rkt),
                                r->msgs[0]->partition)) {
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
        int64_t left = c->retry.v[i]->next_at_ms - mono_ms();
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
        } else if (!VPUSH(c->batch, m)) {
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
        apply_batch(c);
    commit_offsets(c, false);
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
    char last_id[DE__EVENT_ID_MAX + 1];
    bool first = true, stuck = false;
    sqlite3_stmt *q;
    int rc;

    if (c == NULL || type == NULL || id == NULL)
        return de__fail(DE_ERR_ARG, "release/skip needs a consumer, a "
                                    "subject type and a subject id");
    q = c->q[Q_DL_PARKED];
    if (step(c, Q_BEGIN) != SQLITE_DONE)
        return de__fail_db(c->db, "consumer: cannot begin");
    c->careful = true;
    /* Lift the flag so that apply_one applies rather than parks again. */
    if (inbox_park(c, type, id, false) != DE_OK)
        goto fail;
    /* One parked event at a time, the lowest first: each one handled
     * leaves the 'parked' state, so the query moves on (and nothing is
     * changed under a running SELECT). */
    for (;;) {
        char *col[13] = {0};
        int64_t dl, last;
        de_event_view v;
        bool parked;
        de_err err;

        sqlite3_bind_text(q, 1, type, -1, SQLITE_TRANSIENT);
        sqlite3_bind_text(q, 2, id, -1, SQLITE_TRANSIENT);
        rc = sqlite3_step(q);
        if (rc != SQLITE_ROW) {
            sqlite3_reset(q);
            sqlite3_clear_bindings(q);
            if (rc != SQLITE_DONE)
                goto fail;
            break;
        }
        memset(&v, 0, sizeof v);
        dl = sqlite3_column_int64(q, 0);
        for (int i = 1; i <= 13; i++)
            if (sqlite3_column_type(q, i) != SQLITE_NULL)
                col[i - 1] = strdup((const char *)sqlite3_column_text(q, i));
        v.partition = sqlite3_column_int(q, 3);
        v.offset = sqlite3_column_int64(q, 4);
        v.subject_seq = sqlite3_column_int64(q, 5);
        v.occurred_at_ms = sqlite3_column_int64(q, 10);
        sqlite3_reset(q);
        sqlite3_clear_bindings(q);
        v.subject_type = type;
        v.subject_id = id;
        v.topic = col[1];
        v.event_id = col[5];
        v.action = col[6];
        v.type = col[7] ? col[7] : "";
        v.source = col[8] ? col[8] : "";
        v.traceparent = col[10];
        v.tracestate = col[11];
        v.payload = col[12] ? col[12] : "{}";
        v.payload_len = strlen(v.payload);
        err = DE_OK;
        if (first && skip_first) {
            sqlite3_bind_int64(c->q[Q_DL_DONE], 1, dl);
            sqlite3_bind_text(c->q[Q_DL_DONE], 2, "skipped", -1, SQLITE_STATIC);
            if (step(c, Q_DL_DONE) != SQLITE_DONE ||
                inbox_put(c, type, id, v.subject_seq, v.event_id) != DE_OK)
                err = DE_ERR_DB;
        } else if ((err = inbox_get(c, type, id, &last, &parked, last_id,
                                    sizeof last_id)) == DE_OK) {
            /* A conflict released: the operator says it is a real event
             * of its own, although its number was taken. */
            if (v.subject_seq > last ||
                (col[0] && strcmp(col[0], "conflict") == 0 &&
                 strcmp(last_id, v.event_id ? v.event_id : "") != 0)) {
                /* Released means "go on": a gap is accepted here. */
                err = run_handler(c, &v, false, error, sizeof error);
                if (err == DE_ERR_ARG) {
                    sqlite3_bind_int64(c->q[Q_DL_FAIL], 1, dl);
                    sqlite3_bind_text(c->q[Q_DL_FAIL], 2, error, -1,
                                      SQLITE_STATIC);
                    err = step(c, Q_DL_FAIL) == SQLITE_DONE &&
                                  inbox_park(c, type, id, true) == DE_OK
                              ? DE_OK
                              : DE_ERR_DB;
                    if (err == DE_OK) {
                        clog_(c, DE_LOG_ERR, "%s %s stays parked: %s", type, id,
                              error);
                        stuck = true;
                    }
                }
            } else {
                c->stats.duplicates++;
            }
            if (err == DE_OK && !stuck) {
                sqlite3_bind_int64(c->q[Q_DL_DONE], 1, dl);
                sqlite3_bind_text(c->q[Q_DL_DONE], 2, "applied", -1,
                                  SQLITE_STATIC);
                if (step(c, Q_DL_DONE) != SQLITE_DONE)
                    err = DE_ERR_DB;
            }
        }
        first = false;
        for (int i = 0; i < 13; i++)
            free(col[i]);
        if (err != DE_OK)
            goto fail;
        if (stuck)
            break;
    }
    if (step(c, Q_COMMIT) != SQLITE_DONE)
        goto fail;
    c->careful = false;
    clog_(c, DE_LOG_NOTICE, "%s %s %s", de__quote(q1, sizeof q1, type, -1),
          de__quote(q2, sizeof q2, id, -1),
          stuck ? "is still parked" : "released");
    return DE_OK;
fail:
    sqlite3_reset(q);
    sqlite3_clear_bindings(q);
    {
        de_err e =
            de__fail_db(c->db, "consumer: releasing %s %s failed", type, id);
        step(c, Q_ROLLBACK);
        return e;
    }
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
    sqlite3_stmt *q;

    if (c == NULL || out == NULL)
        return de__fail(DE_ERR_ARG, "de_consumer_stats_get needs a consumer "
                                    "and an out pointer");
    q = c->q[Q_PARKED_COUNT];
    if (sqlite3_step(q) == SQLITE_ROW)
        c->stats.parked_subjects = (uint64_t)sqlite3_column_int64(q, 0);
    sqlite3_reset(q);
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
            commit_offsets(c, true);
            rd_kafka_consumer_close(c->rk);
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
    for (int i = 0; i < Q_COUNT; i++)
        sqlite3_finalize(c->q[i]);
    de__decoded_free(&c->dec);
    de_conf_destroy(c->conf);
    free(c);
    return err;
}

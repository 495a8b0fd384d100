/* SPDX-License-Identifier: MIT */
/*
 * relay.c -- the bundled relay: one thread, its own SQLite connection and
 * its own idempotent librdkafka producer, publishing the outbox to Kafka in
 * commit (position) order with each subject's events numbered 1, 2, 3, ...
 *
 * How the guarantees are kept:
 *
 *  Order.  Rows are read in position order and produced in that order
 *  with the subject id as the key, so a subject's events share a
 *  partition; the idempotent producer keeps their order through retries.
 *  ce_subjectseq is assigned at read time from per-subject counters.
 *
 *  No loss.  The durable cursor (relay_state.c) only moves past rows that
 *  Kafka acknowledged -- a contiguous watermark over the ring of rows in
 *  flight -- or that are held back behind a blocked subject (and recorded
 *  as such in the same transaction).  Rows are deleted from the outbox
 *  only below a cursor that is on disk (fsynced), and the row at the
 *  cursor is never deleted, so rowids (positions) never go back.
 *
 *  Same ids and sequence numbers on resend.  The counters are persisted
 *  with the cursor and describe exactly the rows at or below it; a relay
 *  that restarts from the cursor (after a crash, a producer restart, a
 *  lease change) therefore assigns every later row the same number again.
 *
 *  Producer failures.  A fatal producer error or any delivery error purges
 *  the producer (nothing queued after the failure is written), drains it,
 *  replaces it, and replays from the watermark.  A message refused for a
 *  reason of its own (authorization, size, ...) blocks its subject: the
 *  subject's later events are held back, in order, and resent when the
 *  subject is retried; other subjects keep flowing.
 *
 *  Promptness.  The thread sleeps in poll(2) on one eventfd, written by
 *  the host's WAL hook when a transaction that recorded events commits,
 *  by librdkafka when delivery reports arrive, and by the API; it wakes
 *  every relay.poll.interval.ms to notice writers in other processes.
 *
 * Threading: everything below runs on the relay thread except the public
 * functions at the end, which talk to it through r->mu, r->cond and the
 * eventfd.
 */
#include "relay_recover.h"

#include <assert.h>
#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

/* Tags of resent held-back events carry this bit; ring tags do not. */
#define REPLAY_TAG (UINT64_C(1) << 62)
/* Consecutive non-specific failures of one subject's event before the
 * subject is blocked rather than retried forever. */
#define MAX_COLLATERAL_FAILS 5
/* Subject entries kept in memory before idle ones are dropped. */
#define SUBJECT_CACHE 200000
/* A read that catches up with fewer rows than this is "low load": the
 * rows are sent at once instead of lingering for a batch. */
#define LOW_LOAD_ROWS 64
/* Rows deleted from the outbox per transaction. */
#define CLEANUP_CHUNK 1000
/* How often an idle relay raises the marks of partitions it does not
 * publish to (so that topic retention never overtakes them). */
#define MARK_REFRESH_MS 60000

/* ---- subjects ------------------------------------------------------------ */

typedef struct subj {
    struct subj *hnext;
    uint64_t hash;
    int64_t assigned;   /* seq of the last event read                      */
    int64_t acked;      /* seq of the last event at or below the watermark */
    int64_t persisted;  /* seq in the state file                           */
    uint32_t ring_refs; /* ring slots holding this subject                 */
    uint32_t replaying; /* held-back events resent and not yet acked       */
    uint32_t fails;     /* consecutive collateral failures                 */
    bool dirty;         /* acked != persisted, queued in r->dirty          */
    bool blocked;
    bool in_blocked_list;
    int64_t blocked_from; /* first held-back position                      */
    int64_t retry_at_ms;  /* next automatic retry (monotonic ms)           */
    char *error;          /* why it is blocked                             */
    size_t type_len, id_len;
    char key[]; /* subject_type NUL subject_id NUL */
} subj;

#define SUBJ_TYPE(s) ((s)->key)
#define SUBJ_ID(s) ((s)->key + (s)->type_len + 1)

enum slot_state { SLOT_INFLIGHT, SLOT_ACKED, SLOT_PARKED, SLOT_FAILED };

typedef struct slot {
    uint64_t tag;
    int64_t position;
    int64_t recorded_at_ms;
    int64_t seq;
    subj *s;
    int64_t offset;    /* where Kafka stored it, once acknowledged; -1 */
    int32_t partition; /* likewise */
    uint32_t topic;    /* index in r->topics */
    uint8_t state;
    rd_kafka_resp_err_t err;
} slot;

typedef struct replay {
    uint64_t tag;
    int64_t position;
    subj *s;
    bool done;
} replay;

typedef struct park {
    int64_t position;
    int64_t seq;
    subj *s;
} park;

/* A subject type's topic.  Entries live as long as the relay; the
 * producer's handle is replaced with the producer. */
typedef struct topic {
    char *subject_type;
    char *name;
    rd_kafka_topic_t *rkt; /* NULL until the current producer needs it */
    bool registered;       /* its marks are on disk: publishing may begin */
    int32_t nparts;        /* partitions with a known offset below */
    int64_t *seen;   /* per partition: past the last acknowledged event at or
                        below the watermark (0: none seen) */
    int64_t *marked; /* per partition: as written in the state file */
} topic;

#define VEC(T)                                                                 \
    struct {                                                                   \
        T *v;                                                                  \
        size_t n, cap;                                                         \
    }

struct de_relay {
    /* ---- set at start, read-only after ---- */
    de_conf *conf;
    char *db_path;
    char *state_path;
    char owner[64];
    char outbox_id[37];
    int wake_fd;
    de__link *link;
    pthread_t thread;
    const char *source, *type_prefix, *topic_template;
    int64_t batch_size, cap, poll_ms, ckpt_ms, lease_ms, retry_ms, cleanup_ms,
        retention_ms;
    bool continue_unverifiable; /* relay.recovery.unverifiable=continue */

    /* ---- shared with API threads, under mu ---- */
    pthread_mutex_t mu;
    pthread_cond_t cond;
    bool stop_req;
    int64_t stop_deadline_us; /* monotonic; INT64_MAX = none */
    uint64_t flush_req, flush_done;
    bool retry_req;
    bool finished;
    de_err stop_result;
    char fail_msg[600]; /* why the thread refused to publish (DE_ERR_STATE) */
    de_relay_stats stats;

    /* ---- relay thread only ---- */
    sqlite3 *db; /* the relay's connection to the outbox database */
    sqlite3_stmt *q_read, *q_max, *q_one, *q_delete, *q_floor, *q_scan, *q_dv;
    de__rstate *st;
    rd_kafka_t *rk;
    rd_kafka_queue_t *mainq;
    VEC(topic) topics;
    bool active;
    bool need_restart;
    bool lease_lost;
    int64_t last_beat_ms; /* wall clock of the last renewed lease */
    int64_t next_beat_us; /* monotonic */
    int64_t next_ckpt_us;
    int64_t next_cleanup_us;
    int64_t next_standby_us;
    int64_t restart_backoff_ms;
    int64_t last_restart_us;
    /* the ring of rows read and not yet below the watermark */
    slot *ring;
    uint64_t head_tag; /* tag of ring[head]; tags are consecutive */
    int64_t count;
    int64_t read_pos;    /* last position read */
    int64_t done_pos;    /* watermark: everything <= is acked or parked */
    int64_t durable_pos; /* cursor in the state file */
    int64_t deleted_upto;
    int64_t max_pos;      /* highest position seen in the outbox */
    bool more_rows;       /* the last read filled its batch */
    int64_t last_read;    /* rows the last read produced */
    bool woken;           /* the eventfd fired, or state was reset: read */
    int64_t data_version; /* PRAGMA data_version at the last read */
    bool dirty_pos;       /* done_pos moved since the last checkpoint */
    /* subjects */
    subj **buckets;
    size_t nbuckets, nsubj;
    VEC(subj *) dirty;
    VEC(subj *) blocked;
    VEC(park) parks;      /* held back, to write at the next checkpoint */
    VEC(int64_t) unparks; /* resent and acked, to delete likewise */
    VEC(replay) replays;
    uint64_t next_replay_tag;
    /* what Kafka already held at activation (relay_recover.c) */
    int64_t recover_upto; /* rows up to here may have landed already */
    int64_t landed;       /* events found there; 0: no look-ups needed */
    uint64_t skipped;     /* rows not sent again: they were on Kafka */
    int64_t next_mark_refresh_us;
    int64_t register_retry_us; /* registering a topic failed: not before */
    bool register_pending;     /* read again when register_retry_us passes */
    bool refused;              /* cannot verify Kafka: never publishes */
    int64_t held_back;         /* events held back, as of the last checkpoint */
    int64_t parked_min;        /* lowest held-back position; 0 = none */
    int64_t flush_target;
    uint64_t flush_taken;
    int64_t stop_target;
    bool stop_target_set;
    /* counters for stats */
    uint64_t published, restarts, deleted, nread;
    char last_error[256];
    int64_t last_error_ms;
};

/* ---- small helpers --------------------------------------------------- */

static int64_t mono_ms(void)
{
    return de__mono_us() / 1000;
}

#define VEC_PUSH(vec, item)                                                    \
    (((vec).n < (vec).cap ||                                                   \
      vec_grow((void **)&(vec).v, &(vec).cap, sizeof(*(vec).v)))               \
         ? ((vec).v[(vec).n++] = (item), true)                                 \
         : false)

static bool vec_grow(void **v, size_t *cap, size_t size)
{
    size_t ncap = *cap ? *cap * 2 : 16;
    void *n = realloc(*v, ncap * size);

    if (n == NULL)
        return false;
    *v = n;
    *cap = ncap;
    return true;
}

static void rlog(de_relay *r, int level, const char *fmt, ...) DE__PRINTF(3, 4);
static void rlog(de_relay *r, int level, const char *fmt, ...)
{
    char line[900];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    de__log(r->conf, level, "relay %s: %s", r->db_path, line);
}

static void set_error(de_relay *r, const char *fmt, ...) DE__PRINTF(2, 3);
static void set_error(de_relay *r, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(r->last_error, sizeof r->last_error, fmt, ap);
    va_end(ap);
    r->last_error_ms = de__now_ms();
}

static void wake(de_relay *r)
{
    static const uint64_t one = 1;

    (void)!write(r->wake_fd, &one, sizeof one);
}

/* ---- the subject table ----------------------------------------------- */

static uint64_t hash_key(const char *type, size_t type_len, const char *id,
                         size_t id_len)
{
    uint64_t h = UINT64_C(14695981039346656037);

    for (size_t i = 0; i < type_len; i++)
        h = (h ^ (unsigned char)type[i]) * UINT64_C(1099511628211);
    h = (h ^ 0xff) * UINT64_C(1099511628211);
    for (size_t i = 0; i < id_len; i++)
        h = (h ^ (unsigned char)id[i]) * UINT64_C(1099511628211);
    return h ^ (h >> 29);
}

static bool subj_grow(de_relay *r)
{
    size_t n = r->nbuckets ? r->nbuckets * 2 : 4096;
    subj **b = calloc(n, sizeof *b);

    if (b == NULL)
        return false;
    for (size_t i = 0; i < r->nbuckets; i++) {
        subj *s = r->buckets[i], *next;
        for (; s; s = next) {
            next = s->hnext;
            s->hnext = b[s->hash & (n - 1)];
            b[s->hash & (n - 1)] = s;
        }
    }
    free(r->buckets);
    r->buckets = b;
    r->nbuckets = n;
    return true;
}

static void subj_free(subj *s)
{
    free(s->error);
    free(s);
}

/* Finds or loads a subject's entry; NULL with the message set on error. */
static subj *subj_get(de_relay *r, const char *type, const char *id,
                      size_t id_len)
{
    size_t type_len = strlen(type);
    uint64_t h = hash_key(type, type_len, id, id_len);
    subj *s;
    int64_t seq;

    if (r->nbuckets) {
        for (s = r->buckets[h & (r->nbuckets - 1)]; s; s = s->hnext)
            if (s->hash == h && s->id_len == id_len &&
                s->type_len == type_len &&
                memcmp(SUBJ_ID(s), id, id_len) == 0 &&
                memcmp(SUBJ_TYPE(s), type, type_len) == 0)
                return s;
    }
    if (r->nsubj >= r->nbuckets / 2 && !subj_grow(r)) {
        de__fail(DE_ERR_NOMEM, "out of memory in the subject table");
        return NULL;
    }
    s = calloc(1, sizeof *s + type_len + id_len + 2);
    if (s == NULL) {
        de__fail(DE_ERR_NOMEM, "out of memory in the subject table");
        return NULL;
    }
    s->hash = h;
    s->type_len = type_len;
    s->id_len = id_len;
    memcpy(s->key, type, type_len + 1);
    memcpy(s->key + type_len + 1, id, id_len);
    s->key[type_len + 1 + id_len] = '\0';
    if (de__rstate_get_seq(r->st, SUBJ_TYPE(s), SUBJ_ID(s), &seq) != DE_OK) {
        free(s);
        return NULL;
    }
    s->assigned = s->acked = s->persisted = seq;
    s->hnext = r->buckets[h & (r->nbuckets - 1)];
    r->buckets[h & (r->nbuckets - 1)] = s;
    r->nsubj++;
    return s;
}

static bool subj_idle(const subj *s)
{
    return !s->dirty && !s->blocked && !s->in_blocked_list &&
           s->ring_refs == 0 && s->replaying == 0 &&
           s->assigned == s->persisted;
}

/* Drops idle entries when the table is large; they reload on demand. */
static void subj_sweep(de_relay *r, bool all)
{
    if (!all && r->nsubj <= SUBJECT_CACHE)
        return;
    for (size_t i = 0; i < r->nbuckets; i++) {
        subj **pp = &r->buckets[i];
        while (*pp) {
            subj *s = *pp;
            if (all || subj_idle(s)) {
                *pp = s->hnext;
                subj_free(s);
                r->nsubj--;
            } else {
                pp = &s->hnext;
            }
        }
    }
}

static void mark_dirty(de_relay *r, subj *s)
{
    if (!s->dirty && VEC_PUSH(r->dirty, s))
        s->dirty = true;
}

static void block_subject(de_relay *r, subj *s, int64_t position,
                          const char *why, int64_t retry_in_ms)
{
    if (!s->blocked || position < s->blocked_from)
        s->blocked_from = position;
    if (!s->blocked)
        rlog(r, DE_LOG_ERR,
             "%s %s is blocked at position %lld: %s; its later events wait "
             "behind it, other subjects keep flowing; retrying in %lld ms "
             "(or call de_relay_retry_blocked)",
             SUBJ_TYPE(s), SUBJ_ID(s), (long long)position, why,
             (long long)retry_in_ms);
    s->blocked = true;
    free(s->error);
    s->error = strdup(why);
    s->retry_at_ms = mono_ms() + retry_in_ms;
    if (!s->in_blocked_list && VEC_PUSH(r->blocked, s))
        s->in_blocked_list = true;
}

/* ---- statements on the outbox database -------------------------------- */

static const char read_cols[] =
    "position, event_id, subject_type, subject_id, action, version, "
    "occurred_at_ms, recorded_at_ms, payload, traceparent, tracestate";

static void row_from(sqlite3_stmt *q, de__row *row)
{
    row->position = sqlite3_column_int64(q, 0);
    row->event_id = (const char *)sqlite3_column_text(q, 1);
    row->subject_type = (const char *)sqlite3_column_text(q, 2);
    row->subject_id = (const char *)sqlite3_column_text(q, 3);
    row->subject_id_len = (size_t)sqlite3_column_bytes(q, 3);
    row->action = (const char *)sqlite3_column_text(q, 4);
    row->version = sqlite3_column_int(q, 5);
    row->occurred_at_ms = sqlite3_column_int64(q, 6);
    row->recorded_at_ms = sqlite3_column_int64(q, 7);
    row->payload = (const char *)sqlite3_column_text(q, 8);
    row->payload_len = (size_t)sqlite3_column_bytes(q, 8);
    row->traceparent = (const char *)sqlite3_column_text(q, 9);
    row->tracestate = (const char *)sqlite3_column_text(q, 10);
}

static de_err prepare_all(de_relay *r)
{
    char sql[512];
    struct {
        sqlite3_stmt **st;
        const char *sql;
    } list[] = {
        {&r->q_read, NULL},
        {&r->q_one, NULL},
        {&r->q_max, "SELECT max(position) FROM main.de_outbox"},
        {&r->q_delete, "DELETE FROM main.de_outbox WHERE position >= ?1 AND "
                       "position <= ?2"},
        /* Only ever rises: a stale relay resumed after a pause must not
         * lower it. */
        {&r->q_floor, "INSERT INTO main.de_meta(key, value) VALUES "
                      "('relay_deleted_upto', ?1) ON CONFLICT(key) DO UPDATE "
                      "SET value = max(value, excluded.value)"},
        {&r->q_scan, "SELECT position, recorded_at_ms FROM main.de_outbox "
                     "WHERE position > ?1 AND position <= ?2 "
                     "ORDER BY position LIMIT ?3"},
        {&r->q_dv, "PRAGMA data_version"},
    };

    for (size_t i = 0; i < DE__ARRAY_LEN(list); i++) {
        const char *text = list[i].sql;
        if (i == 0) {
            snprintf(sql, sizeof sql,
                     "SELECT %s FROM main.de_outbox WHERE position > ?1 "
                     "ORDER BY position LIMIT ?2",
                     read_cols);
            text = sql;
        } else if (i == 1) {
            snprintf(sql, sizeof sql,
                     "SELECT %s FROM main.de_outbox WHERE position = ?1",
                     read_cols);
            text = sql;
        }
        if (sqlite3_prepare_v3(r->db, text, -1, SQLITE_PREPARE_PERSISTENT,
                               list[i].st, NULL) != SQLITE_OK)
            return de__fail_db(r->db, "relay: cannot prepare '%s'", text);
    }
    return DE_OK;
}

static int64_t query_max_position(de_relay *r)
{
    int64_t v = 0;

    if (sqlite3_step(r->q_max) == SQLITE_ROW)
        v = sqlite3_column_int64(r->q_max, 0);
    sqlite3_reset(r->q_max);
    if (v > r->max_pos)
        r->max_pos = v;
    return v;
}

static int64_t meta_int(sqlite3 *db, const char *key)
{
    sqlite3_stmt *q = NULL;
    int64_t v = 0;

    if (sqlite3_prepare_v2(db, "SELECT value FROM main.de_meta WHERE key = ?1",
                           -1, &q, NULL) == SQLITE_OK) {
        sqlite3_bind_text(q, 1, key, -1, SQLITE_STATIC);
        if (sqlite3_step(q) == SQLITE_ROW)
            v = sqlite3_column_int64(q, 0);
    }
    sqlite3_finalize(q);
    return v;
}

/* ---- the producer ---------------------------------------------------- */

static void on_dr(rd_kafka_t *rk, const rd_kafka_message_t *m, void *opaque);

static void on_error(rd_kafka_t *rk, int err, const char *reason, void *opaque)
{
    de_relay *r = opaque;
    char fatal[256];

    if (err == RD_KAFKA_RESP_ERR__FATAL) {
        rd_kafka_resp_err_t orig =
            rd_kafka_fatal_error(rk, fatal, sizeof fatal);
        set_error(r, "producer fatal error: %s: %s", rd_kafka_err2name(orig),
                  fatal);
        rlog(r, DE_LOG_ERR, "producer fatal error (%s): %s; replacing it",
             rd_kafka_err2name(orig), fatal);
        r->need_restart = true;
        return;
    }
    /* Broker outages and the like: librdkafka retries by itself. */
    rlog(r, DE_LOG_INFO, "kafka: %s: %s",
         rd_kafka_err2name((rd_kafka_resp_err_t)err), reason);
}

static void on_rdkafka_log(const rd_kafka_t *rk, int level, const char *fac,
                           const char *buf)
{
    de_relay *r = rd_kafka_opaque(rk);

    /* The relay sets this property on purpose; the warning is noise. */
    if (strstr(buf, "enable.gapless.guarantee is experimental"))
        level = DE_LOG_INFO;
    de__log(r->conf, level, "librdkafka: %s: %s", fac, buf);
}

/* Properties the relay's guarantees depend on, and why. */
static const struct forced {
    const char *key, *value, *why;
} forced[] = {
    {"enable.idempotence", "true",
     "it keeps each partition's order and avoids duplicates across retries"},
    {"enable.gapless.guarantee", "true",
     "a batch that fails for good must stop the producer, not leave a gap"},
    {"message.timeout.ms", "2147483647",
     "a message that times out is dropped while later ones are written; "
     "the relay waits for the broker instead"},
};

static de_err producer_new(de_relay *r)
{
    rd_kafka_conf_t *c = rd_kafka_conf_new();
    char errstr[512];
    static const uint64_t one = 1;
    int64_t max_bytes = de__conf_int(r->conf, DE__K_EVENT_MAX_BYTES);
    struct {
        const char *key;
        char value[32];
    } defaults[] = {
        {"client.id", "deliveryevents-relay"},
        {"partitioner", "murmur2_random"},
        {"socket.nagle.disable", "true"},
        {"reconnect.backoff.ms", "10"},
        {"reconnect.backoff.max.ms", "1000"},
        /* Batches under load; at low load the relay sends at once (see
         * LOW_LOAD_ROWS), so latency does not pay for it. */
        {"linger.ms", "5"},
        {"queue.buffering.max.kbytes", "32768"},
        {"queue.buffering.max.messages", ""},
        {"message.max.bytes", ""},
    };

    snprintf(defaults[7].value, sizeof defaults[7].value, "%lld",
             (long long)(r->cap * 2 + 1000));
    snprintf(
        defaults[8].value, sizeof defaults[8].value, "%lld",
        (long long)(max_bytes + 10000 > 1000000 ? max_bytes + 10000 : 1000000));
    for (size_t i = 0; i < DE__ARRAY_LEN(defaults); i++)
        if (rd_kafka_conf_set(c, defaults[i].key, defaults[i].value, errstr,
                              sizeof errstr) != RD_KAFKA_CONF_OK)
            goto conf_fail;
    if (de__conf_apply_rdkafka(r->conf, c) != DE_OK) {
        rd_kafka_conf_destroy(c);
        return DE_ERR_CONFIG;
    }
    for (size_t i = 0; i < DE__ARRAY_LEN(forced); i++) {
        if (rd_kafka_conf_set(c, forced[i].key, forced[i].value, errstr,
                              sizeof errstr) != RD_KAFKA_CONF_OK)
            goto conf_fail;
    }
    rd_kafka_conf_set_opaque(c, r);
    rd_kafka_conf_set_dr_msg_cb(c, on_dr);
    rd_kafka_conf_set_error_cb(c, on_error);
    rd_kafka_conf_set_log_cb(c, on_rdkafka_log);
    r->rk = rd_kafka_new(RD_KAFKA_PRODUCER, c, errstr, sizeof errstr);
    if (r->rk == NULL) {
        rd_kafka_conf_destroy(c);
        return de__fail(DE_ERR_CONFIG,
                        "librdkafka refused the relay's "
                        "producer configuration: %s",
                        errstr);
    }
    r->mainq = rd_kafka_queue_get_main(r->rk);
    rd_kafka_queue_io_event_enable(r->mainq, r->wake_fd, &one, sizeof one);
    return DE_OK;
conf_fail:
    rd_kafka_conf_destroy(c);
    return de__fail(DE_ERR_CONFIG, "relay producer configuration: %s", errstr);
}

static void producer_destroy(de_relay *r)
{
    for (size_t i = 0; i < r->topics.n; i++) {
        if (r->topics.v[i].rkt != NULL)
            rd_kafka_topic_destroy(r->topics.v[i].rkt);
        r->topics.v[i].rkt = NULL;
    }
    if (r->mainq) {
        rd_kafka_queue_io_event_enable(r->mainq, -1, NULL, 0);
        rd_kafka_queue_destroy(r->mainq);
        r->mainq = NULL;
    }
    if (r->rk) {
        rd_kafka_destroy(r->rk);
        r->rk = NULL;
    }
}

static void topics_free(de_relay *r)
{
    for (size_t i = 0; i < r->topics.n; i++) {
        topic *t = &r->topics.v[i];
        if (t->rkt != NULL)
            rd_kafka_topic_destroy(t->rkt);
        free(t->subject_type);
        free(t->name);
        free(t->seen);
        free(t->marked);
    }
    r->topics.n = 0;
}

/* The entry of a subject type's topic (index in *idx), with the current
 * producer's handle; NULL with the message set when out of memory. */
static topic *topic_for(de_relay *r, const char *subject_type, uint32_t *idx)
{
    char name[256];
    topic t, *tp = NULL;

    for (size_t i = 0; i < r->topics.n && tp == NULL; i++)
        if (strcmp(r->topics.v[i].subject_type, subject_type) == 0) {
            tp = &r->topics.v[i];
            *idx = (uint32_t)i;
        }
    if (tp == NULL) {
        memset(&t, 0, sizeof t);
        de__topic_name(name, sizeof name, r->topic_template, subject_type);
        t.subject_type = strdup(subject_type);
        t.name = strdup(name);
        if (t.subject_type == NULL || t.name == NULL ||
            !VEC_PUSH(r->topics, t)) {
            free(t.subject_type);
            free(t.name);
            de__fail(DE_ERR_NOMEM, "relay: out of memory");
            return NULL;
        }
        *idx = (uint32_t)(r->topics.n - 1);
        tp = &r->topics.v[*idx];
    }
    if (tp->rkt == NULL &&
        (tp->rkt = rd_kafka_topic_new(r->rk, tp->name, NULL)) == NULL) {
        de__fail(DE_ERR_NOMEM, "relay: cannot create topic %s: %s", tp->name,
                 rd_kafka_err2str(rd_kafka_last_error()));
        return NULL;
    }
    return tp;
}

/* Grows a topic's per-partition offsets to cover partition p. */
static bool topic_cover(topic *t, int32_t p)
{
    int32_t n;
    int64_t *seen, *marked;

    if (p < t->nparts)
        return true;
    n = p + 1 > 2 * t->nparts ? p + 1 : 2 * t->nparts;
    seen = realloc(t->seen, (size_t)n * sizeof *seen);
    if (seen == NULL)
        return false;
    t->seen = seen;
    marked = realloc(t->marked, (size_t)n * sizeof *marked);
    if (marked == NULL)
        return false;
    t->marked = marked;
    for (int32_t i = t->nparts; i < n; i++)
        t->seen[i] = t->marked[i] = 0;
    t->nparts = n;
    return true;
}

/* An event at or below the watermark was stored at (partition, offset):
 * the partition's mark may rise past it at the next checkpoint.  Out of
 * memory only keeps the mark lower, which is safe. */
static void topic_seen(de_relay *r, uint32_t idx, int32_t partition,
                       int64_t offset)
{
    topic *t;

    if (idx >= r->topics.n || partition < 0 || offset < 0)
        return;
    t = &r->topics.v[idx];
    if (topic_cover(t, partition) && offset + 1 > t->seen[partition])
        t->seen[partition] = offset + 1;
}

/* Errors that say nothing about the message itself: the producer's state,
 * the network, leadership.  The message is resent after a restart.  Any
 * other delivery error is the message's own and blocks its subject. */
static bool collateral(rd_kafka_resp_err_t e)
{
    switch (e) {
    case RD_KAFKA_RESP_ERR__PURGE_QUEUE:
    case RD_KAFKA_RESP_ERR__PURGE_INFLIGHT:
    case RD_KAFKA_RESP_ERR__FATAL:
    case RD_KAFKA_RESP_ERR__MSG_TIMED_OUT:
    case RD_KAFKA_RESP_ERR__TIMED_OUT:
    case RD_KAFKA_RESP_ERR__TIMED_OUT_QUEUE:
    case RD_KAFKA_RESP_ERR__TRANSPORT:
    case RD_KAFKA_RESP_ERR__ALL_BROKERS_DOWN:
    case RD_KAFKA_RESP_ERR__DESTROY:
    case RD_KAFKA_RESP_ERR__STATE:
    case RD_KAFKA_RESP_ERR__INCONSISTENT:
    case RD_KAFKA_RESP_ERR__GAPLESS_GUARANTEE:
    case RD_KAFKA_RESP_ERR__RETRY:
    case RD_KAFKA_RESP_ERR__NODE_UPDATE:
    case RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER:
    case RD_KAFKA_RESP_ERR_DUPLICATE_SEQUENCE_NUMBER:
    case RD_KAFKA_RESP_ERR_UNKNOWN_PRODUCER_ID:
    case RD_KAFKA_RESP_ERR_INVALID_PRODUCER_EPOCH:
    case RD_KAFKA_RESP_ERR_INVALID_PRODUCER_ID_MAPPING:
    case RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT:
    case RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION:
    case RD_KAFKA_RESP_ERR_LEADER_NOT_AVAILABLE:
    case RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS:
    case RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS_AFTER_APPEND:
    case RD_KAFKA_RESP_ERR_NETWORK_EXCEPTION:
    case RD_KAFKA_RESP_ERR_KAFKA_STORAGE_ERROR:
    case RD_KAFKA_RESP_ERR_BROKER_NOT_AVAILABLE:
    case RD_KAFKA_RESP_ERR_REPLICA_NOT_AVAILABLE:
    case RD_KAFKA_RESP_ERR_FENCED_LEADER_EPOCH:
    case RD_KAFKA_RESP_ERR_UNKNOWN_LEADER_EPOCH:
    case RD_KAFKA_RESP_ERR_THROTTLING_QUOTA_EXCEEDED: return true;
    default: return false;
    }
}

/* ---- the ring -------------------------------------------------------- */

static slot *ring_at(de_relay *r, uint64_t tag)
{
    return &r->ring[tag % (uint64_t)r->cap];
}

static void on_dr(rd_kafka_t *rk, const rd_kafka_message_t *m, void *opaque)
{
    de_relay *r = opaque;
    uint64_t tag = (uint64_t)(uintptr_t)m->_private;
    slot *sl;

    (void)rk;
    if (tag & REPLAY_TAG) {
        for (size_t i = 0; i < r->replays.n; i++) {
            replay *rp = &r->replays.v[i];
            if (rp->tag != tag || rp->done)
                continue;
            if (m->err == RD_KAFKA_RESP_ERR_NO_ERROR) {
                rp->done = true;
                rp->s->replaying--;
                r->published++;
                VEC_PUSH(r->unparks, rp->position);
            } else {
                r->need_restart = true;
                if (!collateral(m->err)) {
                    set_error(r, "%s %s (%s): %s", SUBJ_TYPE(rp->s),
                              SUBJ_ID(rp->s), rd_kafka_topic_name(m->rkt),
                              rd_kafka_err2str(m->err));
                    free(rp->s->error);
                    rp->s->error = strdup(r->last_error);
                    rp->s->retry_at_ms = mono_ms() + r->retry_ms;
                }
            }
            return;
        }
        return;
    }
    if (tag < r->head_tag || tag >= r->head_tag + (uint64_t)r->count)
        return; /* from before a reset */
    sl = ring_at(r, tag);
    if (sl->tag != tag || sl->state != SLOT_INFLIGHT)
        return;
    if (m->err == RD_KAFKA_RESP_ERR_NO_ERROR) {
        sl->state = SLOT_ACKED;
        sl->partition = m->partition;
        sl->offset = m->offset;
        sl->s->fails = 0;
        r->published++;
        return;
    }
    sl->state = SLOT_FAILED;
    sl->err = m->err;
    r->need_restart = true;
    if (!collateral(m->err))
        set_error(r, "%s %s (%s): %s", SUBJ_TYPE(sl->s), SUBJ_ID(sl->s),
                  rd_kafka_topic_name(m->rkt), rd_kafka_err2str(m->err));
}

/* Moves the watermark past every acknowledged or held-back slot at the
 * head of the ring. */
static void advance(de_relay *r)
{
    while (r->count > 0) {
        slot *sl = ring_at(r, r->head_tag);
        if (sl->state != SLOT_ACKED && sl->state != SLOT_PARKED)
            break;
        if (sl->seq > sl->s->acked) {
            sl->s->acked = sl->seq;
            mark_dirty(r, sl->s);
        }
        if (sl->state == SLOT_ACKED)
            topic_seen(r, sl->topic, sl->partition, sl->offset);
        assert(sl->s->ring_refs > 0);
        sl->s->ring_refs--;
        r->done_pos = sl->position;
        r->dirty_pos = true;
        r->head_tag++;
        r->count--;
    }
    if (r->count == 0 && r->read_pos > r->done_pos) {
        r->done_pos = r->read_pos;
        r->dirty_pos = true;
    }
    assert(r->durable_pos <= r->done_pos && r->done_pos <= r->read_pos);
}

/* Holds a row back behind its blocked subject. */
static bool park_slot(de_relay *r, slot *sl)
{
    park p = {sl->position, sl->seq, sl->s};

    sl->state = SLOT_PARKED;
    if (!VEC_PUSH(r->parks, p))
        return false;
    if (r->parked_min == 0 || sl->position < r->parked_min)
        r->parked_min = sl->position;
    return true;
}

/* Hands one row to the producer with the given number and tag.  Returns
 * librdkafka's answer; RD_KAFKA_RESP_ERR__FAIL when out of memory. */
static rd_kafka_resp_err_t send_row(de_relay *r, const de__row *row,
                                    int64_t seq, uint64_t tag,
                                    rd_kafka_topic_t *rkt)
{
    rd_kafka_headers_t *hdrs;
    rd_kafka_resp_err_t err;

    hdrs = de__envelope_headers(row, seq, r->source, r->type_prefix);
    if (hdrs == NULL)
        return RD_KAFKA_RESP_ERR__FAIL;
    err = rd_kafka_producev(
        r->rk, RD_KAFKA_V_RKT(rkt),
        RD_KAFKA_V_KEY(row->subject_id, row->subject_id_len),
        RD_KAFKA_V_VALUE((void *)(uintptr_t)row->payload, row->payload_len),
        RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
        RD_KAFKA_V_TIMESTAMP(row->occurred_at_ms), RD_KAFKA_V_HEADERS(hdrs),
        RD_KAFKA_V_OPAQUE((void *)(uintptr_t)tag), RD_KAFKA_V_END);
    if (err != RD_KAFKA_RESP_ERR_NO_ERROR)
        rd_kafka_headers_destroy(hdrs); /* ours until producev took them */
    return err;
}

enum produce_result { PR_OK, PR_AGAIN, PR_ERROR };

/* Looks up whether a row read after activation already landed on Kafka
 * (relay_recover.c): then it keeps the number it has there and is not
 * sent again.  Only rows that existed at activation can have. */
static de_err landed(de_relay *r, const de__row *row, const topic *t, slot *sl,
                     bool *found)
{
    char name[256];
    int64_t seq, offset;
    int32_t partition;
    de_err err;

    *found = false;
    if (r->landed == 0 || row->position > r->recover_upto)
        return DE_OK;
    err = de__rstate_landed_get(r->st, row->event_id, found, &seq, name,
                                sizeof name, &partition, &offset);
    if (err != DE_OK || !*found)
        return err;
    sl->seq = seq;
    sl->state = SLOT_ACKED;
    if (strcmp(name, t->name) == 0) {
        sl->partition = partition;
        sl->offset = offset;
    }
    r->skipped++;
    return DE_OK;
}

static enum produce_result register_topic(de_relay *r, topic *t);

/* Produces (or holds back) one row at the tail of the ring. */
static enum produce_result produce_row(de_relay *r, const de__row *row)
{
    subj *s =
        subj_get(r, row->subject_type, row->subject_id, row->subject_id_len);
    uint64_t tag = r->head_tag + (uint64_t)r->count;
    enum produce_result pr;
    uint32_t tidx = 0;
    topic *t;
    slot *sl;
    rd_kafka_resp_err_t err;
    char why[300];
    bool found;

    assert(r->count < r->cap);
    if (s == NULL || (t = topic_for(r, row->subject_type, &tidx)) == NULL)
        return PR_ERROR;
    /* Its marks go on disk before anything of it is published. */
    if (!t->registered && (pr = register_topic(r, t)) != PR_OK)
        return pr;
    sl = ring_at(r, tag);
    sl->tag = tag;
    sl->position = row->position;
    sl->recorded_at_ms = row->recorded_at_ms;
    sl->seq = s->assigned + 1;
    sl->s = s;
    sl->err = 0;
    sl->topic = tidx;
    sl->partition = -1;
    sl->offset = -1;
    if (landed(r, row, t, sl, &found) != DE_OK)
        return PR_ERROR;
    if (found)
        goto take;
    if (s->blocked && row->position >= s->blocked_from) {
        if (!park_slot(r, sl))
            return PR_ERROR;
        goto take;
    }
    err = send_row(r, row, sl->seq, tag, t->rkt);
    if (err == RD_KAFKA_RESP_ERR_NO_ERROR) {
        sl->state = SLOT_INFLIGHT;
        goto take;
    }
    if (err == RD_KAFKA_RESP_ERR__FAIL) {
        de__fail(DE_ERR_NOMEM, "relay: out of memory producing");
        return PR_ERROR;
    }
    if (err == RD_KAFKA_RESP_ERR__QUEUE_FULL)
        return PR_AGAIN;
    if (collateral(err)) {
        r->need_restart = true;
        return PR_AGAIN;
    }
    /* Refused before it was sent (too large, unknown topic, ...): the
     * subject waits behind this event. */
    snprintf(why, sizeof why, "Kafka refused event %s on %s: %s", row->event_id,
             t->name, rd_kafka_err2str(err));
    set_error(r, "%s %s (%s): %s", row->subject_type, row->subject_id, t->name,
              rd_kafka_err2str(err));
    block_subject(r, s, row->position, why, r->retry_ms);
    if (!park_slot(r, sl))
        return PR_ERROR;
take:
    if (sl->seq > s->assigned)
        s->assigned = sl->seq;
    s->ring_refs++;
    r->count++;
    r->read_pos = row->position;
    r->nread++;
    return PR_OK;
}

/*
 * Makes the host database's write-ahead log durable up to what this
 * connection reads: one fsync of the log file, on the relay's thread,
 * never on the host's commit path.  Whatever the host's synchronous
 * setting (NORMAL does not sync at commit), no event reaches Kafka whose
 * transaction a power loss could still undo.  Rows that are in the
 * database file itself got there through a checkpoint, which syncs the
 * log before and the database after (synchronous NORMAL or FULL; OFF
 * gives up durability in SQLite itself, see docs/OPERATIONS.md).
 */
static de_err sync_host_log(de_relay *r)
{
    sqlite3_file *f = NULL;
    int rc;

    rc = sqlite3_file_control(r->db, "main", SQLITE_FCNTL_JOURNAL_POINTER, &f);
    if (rc != SQLITE_OK)
        return de__fail(DE_ERR_DB, "relay: cannot reach the log of '%s': %s",
                        r->db_path, sqlite3_errstr(rc));
    if (f == NULL || f->pMethods == NULL)
        return DE_OK; /* no log open: everything read is in the file */
    rc = f->pMethods->xSync(f, SQLITE_SYNC_NORMAL);
    if (rc != SQLITE_OK)
        return de__fail(DE_ERR_DB,
                        "relay: cannot sync the log of '%s' before "
                        "publishing: %s",
                        r->db_path, sqlite3_errstr(rc));
    return DE_OK;
}

/* Reads the next rows in position order and produces them, as many as the
 * ring has room for.  Returns false on a database error. */
static bool read_rows(de_relay *r)
{
    int64_t room = r->cap - r->count;
    int64_t limit = room < r->batch_size ? room : r->batch_size;
    int64_t n = 0;
    de__row row;
    int rc;

    bool synced = false;

    r->more_rows = false;
    if (limit <= 0 || r->need_restart)
        return true;
    sqlite3_bind_int64(r->q_read, 1, r->read_pos);
    sqlite3_bind_int64(r->q_read, 2, limit);
    while ((rc = sqlite3_step(r->q_read)) == SQLITE_ROW) {
        enum produce_result pr;
        /* The read's snapshot is fixed by its first step: make the log
         * durable up to it before anything read is handed to Kafka. */
        if (!synced && !(synced = sync_host_log(r) == DE_OK)) {
            sqlite3_reset(r->q_read);
            return false;
        }
        row_from(r->q_read, &row);
        if (row.position > r->max_pos)
            r->max_pos = row.position;
        pr = produce_row(r, &row);
        if (pr == PR_AGAIN)
            break;
        if (pr == PR_ERROR) {
            sqlite3_reset(r->q_read);
            return false;
        }
        n++;
    }
    if (rc != SQLITE_ROW && rc != SQLITE_DONE) {
        de__fail_db(r->db, "relay: reading the outbox failed");
        sqlite3_reset(r->q_read);
        return false;
    }
    sqlite3_reset(r->q_read);
    r->more_rows = (n == limit);
    r->last_read = n;
    return true;
}

/* ---- checkpoints and the lease --------------------------------------- */

/* The id of the outbox row at position into buf; NULL when there is none
 * (or it cannot be read: the state then records no id, and the check in
 * check_cursor_row is skipped rather than wrong). */
static const char *event_id_at(de_relay *r, int64_t position,
                               char buf[DE__EVENT_ID_MAX + 1])
{
    const unsigned char *v;
    const char *id = NULL;

    sqlite3_bind_int64(r->q_one, 1, position);
    if (sqlite3_step(r->q_one) == SQLITE_ROW &&
        (v = sqlite3_column_text(r->q_one, 1)) != NULL &&
        strlen((const char *)v) <= DE__EVENT_ID_MAX) {
        memcpy(buf, v, strlen((const char *)v) + 1);
        id = buf;
    }
    sqlite3_reset(r->q_one);
    return id;
}

/*
 * The row at the cursor is never deleted (cleanup stops below it), so it
 * is there, with the id the state recorded, unless the database went back
 * in time -- restored from a backup, or copied, without its state file.
 * New rows then reuse positions at or below the cursor, and the relay
 * could not tell them from the ones it published: it refuses.
 */
static de_err check_cursor_row(de_relay *r, int64_t cursor, const char *id)
{
    char buf[DE__EVENT_ID_MAX + 1];
    const char *there;

    if (cursor == 0 || id[0] == '\0')
        return DE_OK;
    there = event_id_at(r, cursor, buf);
    if (there != NULL && strcmp(there, id) == 0)
        return DE_OK;
    return de__fail(DE_ERR_STATE,
                    "database '%s' is older than its relay state '%s': the "
                    "event %s the relay published at position %lld is %s. "
                    "The database was restored from a backup (or copied) "
                    "without its state file; restore the state file of the "
                    "same backup beside it (see docs/OPERATIONS.md, "
                    "Restores)",
                    r->db_path, r->state_path, id, (long long)cursor,
                    there ? "not there any more (another event has its "
                            "position)"
                          : "not there any more");
}

/* Writes the watermark, the counters behind it and the held-back events,
 * renewing the lease in the same transaction.  Sets r->lease_lost when
 * another relay holds the lease. */
static de_err checkpoint(de_relay *r)
{
    int64_t now = de__now_ms();
    char id[DE__EVENT_ID_MAX + 1];
    bool held;
    de_err err;
    size_t i;

    if ((err = de__rstate_begin(r->st, r->owner, now, &held)) != DE_OK)
        return err;
    if (!held) {
        r->lease_lost = true;
        return DE_OK;
    }
    if (r->dirty_pos &&
        (err = de__rstate_put_cursor(r->st, r->done_pos,
                                     event_id_at(r, r->done_pos, id))) != DE_OK)
        goto fail;
    for (i = 0; i < r->dirty.n; i++) {
        subj *s = r->dirty.v[i];
        if ((err = de__rstate_put_seq(r->st, SUBJ_TYPE(s), SUBJ_ID(s),
                                      s->acked)) != DE_OK)
            goto fail;
    }
    for (i = 0; i < r->parks.n; i++) {
        park *p = &r->parks.v[i];
        if ((err = de__rstate_park(
                 r->st, p->position, SUBJ_TYPE(p->s), SUBJ_ID(p->s), p->seq,
                 p->s->error ? p->s->error : "", now)) != DE_OK)
            goto fail;
    }
    for (i = 0; i < r->unparks.n; i++)
        if ((err = de__rstate_unpark(r->st, r->unparks.v[i])) != DE_OK)
            goto fail;
    /* Where each partition stands: everything above the cursor is past
     * these offsets (only events at or below the watermark moved them). */
    for (i = 0; i < r->topics.n; i++) {
        topic *t = &r->topics.v[i];
        for (int32_t p = 0; p < t->nparts; p++)
            if (t->seen[p] > t->marked[p] &&
                (err = de__rstate_put_mark(r->st, t->name, p, t->seen[p])) !=
                    DE_OK)
                goto fail;
    }
    if ((err = de__rstate_commit(r->st)) != DE_OK)
        return err;
    for (i = 0; i < r->topics.n; i++) {
        topic *t = &r->topics.v[i];
        for (int32_t p = 0; p < t->nparts; p++)
            if (t->seen[p] > t->marked[p])
                t->marked[p] = t->seen[p];
    }
    for (i = 0; i < r->dirty.n; i++) {
        r->dirty.v[i]->persisted = r->dirty.v[i]->acked;
        r->dirty.v[i]->dirty = false;
    }
    r->dirty.n = 0;
    if (r->parks.n || r->unparks.n) {
        int64_t cnt;
        r->parks.n = 0;
        r->unparks.n = 0;
        if (de__rstate_parked_min(r->st, &r->parked_min, &cnt) == DE_OK)
            r->held_back = cnt;
    }
    assert(r->done_pos >= r->durable_pos || !r->dirty_pos);
    r->durable_pos = r->done_pos;
    r->dirty_pos = false;
    r->last_beat_ms = now;
    r->next_beat_us = de__mono_us() + r->lease_ms * 1000 / 5;
    r->next_ckpt_us = de__mono_us() + r->ckpt_ms * 1000;
    return DE_OK;
fail:
    de__rstate_rollback(r->st);
    return err;
}

static void maybe_checkpoint(de_relay *r, int64_t now_us)
{
    bool due = (r->dirty_pos || r->dirty.n || r->parks.n || r->unparks.n) &&
               now_us >= r->next_ckpt_us;

    if (!due && now_us < r->next_beat_us)
        return;
    if (checkpoint(r) != DE_OK) {
        rlog(r, DE_LOG_WARNING, "checkpoint failed: %s (will retry)",
             de_errmsg());
        r->next_ckpt_us = now_us + 100000;
    }
}

/*
 * Registers a topic before the relay first publishes to it: the current
 * end of each partition becomes its mark, on disk, so that a later
 * activation knows where to look for this outbox's events (see
 * relay_recover.c).  A topic that does not exist gets one mark "from the
 * beginning of every partition".  Kafka not answering is retried
 * (PR_AGAIN, after a pause); nothing of the topic is published meanwhile.
 */
#define REGISTER_TIMEOUT_MS 2000
static void publish_stats(de_relay *r);
static enum produce_result register_topic(de_relay *r, topic *t)
{
    const struct rd_kafka_metadata *md = NULL;
    rd_kafka_resp_err_t e;
    int64_t *ends = NULL;
    int32_t n = 0;
    bool has, held;
    de_err err;
    const char *what = "";

    if (de__mono_us() < r->register_retry_us)
        return PR_AGAIN;
    if (de__rstate_has_marks(r->st, t->name, &has) != DE_OK)
        return PR_ERROR;
    if (has) {
        t->registered = true;
        return PR_OK;
    }
    publish_stats(r); /* what waits is visible while Kafka is asked */
    e = rd_kafka_metadata(r->rk, 0, t->rkt, &md, REGISTER_TIMEOUT_MS);
    if (e != RD_KAFKA_RESP_ERR_NO_ERROR) {
        what = "no metadata";
        goto again;
    }
    e = md->topic_cnt == 1 ? md->topics[0].err
                           : RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART;
    n = md->topic_cnt == 1 ? md->topics[0].partition_cnt : 0;
    rd_kafka_metadata_destroy(md);
    if (e == RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART) {
        n = 0;
    } else if (e != RD_KAFKA_RESP_ERR_NO_ERROR || n <= 0) {
        what = "no partitions";
        goto again;
    } else if ((ends = calloc((size_t)n, sizeof *ends)) == NULL) {
        de__fail(DE_ERR_NOMEM, "relay: out of memory");
        return PR_ERROR;
    } else if ((e = de__topic_offsets(r->rk, t->name, n, RD_KAFKA_OFFSET_END,
                                      ends, REGISTER_TIMEOUT_MS)) !=
               RD_KAFKA_RESP_ERR_NO_ERROR) {
        what = "no end offsets";
        goto again;
    }
    if ((err = de__rstate_begin(r->st, r->owner, de__now_ms(), &held)) != DE_OK)
        goto state_fail;
    if (!held) {
        free(ends);
        r->lease_lost = true;
        return PR_AGAIN;
    }
    err = n == 0 ? de__rstate_put_mark(r->st, t->name, -1, 0) : DE_OK;
    for (int32_t p = 0; p < n && err == DE_OK; p++)
        err = de__rstate_put_mark(r->st, t->name, p, ends[p]);
    if (err != DE_OK || (err = de__rstate_commit(r->st)) != DE_OK) {
        de__rstate_rollback(r->st);
        goto state_fail;
    }
    if (n > 0 && topic_cover(t, n - 1))
        for (int32_t p = 0; p < n; p++)
            t->seen[p] = t->marked[p] = ends[p];
    free(ends);
    t->registered = true;
    rlog(r, DE_LOG_NOTICE, "publishing to topic %s (%d partitions%s)", t->name,
         (int)n, n == 0 ? ": it does not exist yet" : "");
    return PR_OK;
state_fail:
    free(ends);
    rlog(r, DE_LOG_WARNING, "registering topic %s: %s (retrying)", t->name,
         de_errmsg());
    r->register_retry_us = de__mono_us() + 200000;
    r->register_pending = true;
    return PR_AGAIN;
again:
    free(ends);
    set_error(r, "topic %s: %s: %s", t->name, what, rd_kafka_err2str(e));
    rlog(r, DE_LOG_WARNING,
         "cannot register topic %s before publishing to it: %s: %s "
         "(retrying in 1 s)",
         t->name, what, rd_kafka_err2str(e));
    r->register_retry_us = de__mono_us() + 1000000;
    r->register_pending = true;
    return PR_AGAIN;
}

/*
 * With nothing in flight and everything read acknowledged, every event of
 * this outbox on Kafka is at or below the cursor, so the end of each
 * partition now is a valid mark: anything published later lands after
 * it.  Raises the marks to those ends (written with the next checkpoint),
 * which keeps partitions the relay rarely publishes to from falling
 * behind the topic's retention.  Partitions that do not answer keep their
 * mark.
 */
static void refresh_marks(de_relay *r)
{
    assert(r->count == 0);
    for (size_t i = 0; i < r->topics.n; i++) {
        topic *t = &r->topics.v[i];
        const struct rd_kafka_metadata *md = NULL;
        int64_t *ends;
        int32_t n;

        /* Short waits: Kafka not answering only postpones this. */
        if (!t->registered || t->rkt == NULL ||
            rd_kafka_metadata(r->rk, 0, t->rkt, &md, 500) !=
                RD_KAFKA_RESP_ERR_NO_ERROR)
            return;
        n = md->topic_cnt == 1 && md->topics[0].err == 0
                ? md->topics[0].partition_cnt
                : 0;
        rd_kafka_metadata_destroy(md);
        if (n <= 0 || !topic_cover(t, n - 1) ||
            (ends = calloc((size_t)n, sizeof *ends)) == NULL)
            continue;
        if (de__topic_offsets(r->rk, t->name, n, RD_KAFKA_OFFSET_END, ends,
                              500) == RD_KAFKA_RESP_ERR_NO_ERROR) {
            for (int32_t p = 0; p < n; p++)
                if (ends[p] > t->seen[p]) {
                    t->seen[p] = ends[p];
                    r->dirty_pos = true; /* written with the cursor */
                }
        }
        free(ends);
    }
}

/* Resets everything read but not below the watermark, so that reading
 * resumes at the watermark and assigns the same numbers again. */
static void reset_to_watermark(de_relay *r)
{
    for (int64_t i = 0; i < r->count; i++) {
        slot *sl = ring_at(r, r->head_tag + (uint64_t)i);
        sl->s->ring_refs--;
    }
    r->head_tag += (uint64_t)r->count;
    r->count = 0;
    r->read_pos = r->done_pos;
    r->woken = true;
    for (size_t i = 0; i < r->nbuckets; i++)
        for (subj *s = r->buckets[i]; s; s = s->hnext)
            s->assigned = s->acked;
    /* Pending parks beyond the watermark will be parked again on the
     * re-read (with the same numbers); those below stay. */
    for (size_t i = 0; i < r->parks.n;) {
        if (r->parks.v[i].position > r->done_pos)
            r->parks.v[i] = r->parks.v[--r->parks.n];
        else
            i++;
    }
    /* Resends not acknowledged: the subject is blocked again, and retried
     * at once unless its event was refused for good. */
    for (size_t i = 0; i < r->replays.n; i++) {
        replay *rp = &r->replays.v[i];
        if (rp->done)
            continue;
        rp->s->replaying = 0;
        if (!rp->s->blocked) {
            rp->s->blocked = true;
            rp->s->blocked_from = rp->position;
            if (rp->s->retry_at_ms < mono_ms() + 1)
                rp->s->retry_at_ms = mono_ms();
            if (!rp->s->in_blocked_list && VEC_PUSH(r->blocked, rp->s))
                rp->s->in_blocked_list = true;
        } else if (rp->position < rp->s->blocked_from) {
            rp->s->blocked_from = rp->position;
        }
    }
    r->replays.n = 0;
}

/* Purges the producer and waits (up to a few seconds) for every delivery
 * report, so that nothing queued is written after this point. */
static void purge_and_drain(de_relay *r)
{
    int64_t deadline = de__mono_us() + 5000000;

    rd_kafka_purge(r->rk, RD_KAFKA_PURGE_F_QUEUE | RD_KAFKA_PURGE_F_INFLIGHT);
    while (rd_kafka_outq_len(r->rk) > 0 && de__mono_us() < deadline)
        rd_kafka_poll(r->rk, 10);
    rd_kafka_poll(r->rk, 0);
}

static bool stop_requested(de_relay *r)
{
    bool stop;

    pthread_mutex_lock(&r->mu);
    stop = r->stop_req && de__mono_us() >= r->stop_deadline_us;
    pthread_mutex_unlock(&r->mu);
    return stop;
}

/* Replaces the producer after a fatal error or a failed delivery. */
static void restart_producer(de_relay *r)
{
    int64_t now_us = de__mono_us();
    de_err err;

    purge_and_drain(r);
    /* Block the subjects whose own event was refused; count the others. */
    for (int64_t i = 0; i < r->count; i++) {
        slot *sl = ring_at(r, r->head_tag + (uint64_t)i);
        if (sl->state != SLOT_FAILED)
            continue;
        if (!collateral(sl->err)) {
            char why[300];
            snprintf(why, sizeof why,
                     "Kafka refused the event at position "
                     "%lld: %s",
                     (long long)sl->position, rd_kafka_err2str(sl->err));
            block_subject(r, sl->s, sl->position, why, r->retry_ms);
        } else if (sl->err != RD_KAFKA_RESP_ERR__PURGE_QUEUE &&
                   sl->err != RD_KAFKA_RESP_ERR__PURGE_INFLIGHT &&
                   ++sl->s->fails >= MAX_COLLATERAL_FAILS) {
            char why[300];
            snprintf(why, sizeof why,
                     "the event at position %lld failed %d "
                     "times in a row: %s",
                     (long long)sl->position, MAX_COLLATERAL_FAILS,
                     rd_kafka_err2str(sl->err));
            block_subject(r, sl->s, sl->position, why, r->retry_ms);
        }
    }
    advance(r);
    if (checkpoint(r) != DE_OK)
        rlog(r, DE_LOG_WARNING, "checkpoint before restart failed: %s",
             de_errmsg());
    producer_destroy(r);
    reset_to_watermark(r);
    r->need_restart = false;
    r->restarts++;
    /* Back off when restarts follow each other closely. */
    if (now_us - r->last_restart_us > 30000000)
        r->restart_backoff_ms = 0;
    r->restart_backoff_ms =
        r->restart_backoff_ms
            ? (r->restart_backoff_ms * 2 > 5000 ? 5000
                                                : r->restart_backoff_ms * 2)
            : 50;
    r->last_restart_us = now_us;
    for (int64_t waited = 0;
         waited < r->restart_backoff_ms && !stop_requested(r); waited += 10)
        usleep(10000);
    while ((err = producer_new(r)) != DE_OK) {
        rlog(r, DE_LOG_ERR, "cannot create a producer: %s", de_errmsg());
        if (stop_requested(r))
            return;
        sleep(1);
    }
    rlog(r, DE_LOG_NOTICE,
         "producer replaced (restart %llu); resuming at "
         "position %lld",
         (unsigned long long)r->restarts, (long long)r->done_pos + 1);
}

/* ---- held-back events ------------------------------------------------- */

struct replay_ctx {
    de_relay *r;
    subj *s;
    bool ok;
};

static de_err replay_row(void *arg, int64_t position, int64_t seq)
{
    struct replay_ctx *c = arg;
    de_relay *r = c->r;
    uint32_t tidx;
    topic *t;
    rd_kafka_resp_err_t err;
    replay rp;
    de__row row;
    int rc;

    if (!c->ok)
        return DE_OK;
    sqlite3_bind_int64(r->q_one, 1, position);
    rc = sqlite3_step(r->q_one);
    if (rc != SQLITE_ROW) {
        sqlite3_reset(r->q_one);
        if (rc == SQLITE_DONE) {
            rlog(r, DE_LOG_ERR,
                 "held-back event at position %lld is gone "
                 "from the outbox; dropping it",
                 (long long)position);
            VEC_PUSH(r->unparks, position);
            return DE_OK;
        }
        c->ok = false;
        return de__fail_db(r->db, "relay: reading a held-back event");
    }
    row_from(r->q_one, &row);
    rp.tag = REPLAY_TAG | r->next_replay_tag++;
    rp.position = position;
    rp.s = c->s;
    rp.done = false;
    /* Held back after registration: its topic has marks already. */
    t = topic_for(r, row.subject_type, &tidx);
    if (t == NULL || (!t->registered && register_topic(r, t) != PR_OK)) {
        sqlite3_reset(r->q_one);
        c->ok = false;
        return DE_OK;
    }
    err = send_row(r, &row, seq, rp.tag, t->rkt);
    sqlite3_reset(r->q_one);
    if (err != RD_KAFKA_RESP_ERR_NO_ERROR) {
        c->ok = false;
        set_error(r, "%s %s: resending failed: %s", SUBJ_TYPE(c->s),
                  SUBJ_ID(c->s), rd_kafka_err2str(err));
        return DE_OK;
    }
    if (!VEC_PUSH(r->replays, rp)) {
        c->ok = false;
        return de__fail(DE_ERR_NOMEM, "relay: out of memory");
    }
    c->s->replaying++;
    return DE_OK;
}

/* Forgets resends once all of them are acknowledged. */
static void compact_replays(de_relay *r)
{
    for (size_t i = 0; i < r->replays.n; i++)
        if (!r->replays.v[i].done)
            return;
    r->replays.n = 0;
}

/* Resends the held-back events of blocked subjects whose retry is due (or
 * all of them), in order, and unblocks them; the subject's later events
 * follow them into the same partition queue. */
static void retry_blocked(de_relay *r, bool all)
{
    int64_t now = mono_ms();
    bool any = false;

    for (size_t i = 0; i < r->blocked.n; i++)
        if (all || r->blocked.v[i]->retry_at_ms <= now)
            any = true;
    if (!any)
        return;
    /* Held-back events must be on disk before they are read back. */
    if (r->parks.n && checkpoint(r) != DE_OK)
        return;
    for (size_t i = 0; i < r->blocked.n;) {
        subj *s = r->blocked.v[i];
        struct replay_ctx c = {r, s, true};
        if (!(all || s->retry_at_ms <= now) || !s->blocked) {
            i++;
            continue;
        }
        rlog(r, DE_LOG_NOTICE, "retrying blocked %s %s", SUBJ_TYPE(s),
             SUBJ_ID(s));
        if (de__rstate_parked_rows(r->st, SUBJ_TYPE(s), SUBJ_ID(s), replay_row,
                                   &c) != DE_OK ||
            !c.ok) {
            /* What was resent stays in flight; the rest waits. */
            s->retry_at_ms = now + r->retry_ms;
            i++;
            continue;
        }
        s->blocked = false;
        s->in_blocked_list = false;
        r->blocked.v[i] = r->blocked.v[--r->blocked.n];
    }
}

/* ---- cleanup of published rows ----------------------------------------- */

/*
 * Deletes published rows in small transactions that never wait for the
 * host's write lock (busy timeout 0: if the host is writing, try later).
 * Only rows below the cursor on disk are deleted, the row at the
 * cursor is kept (so the next rowid stays above it), and nothing at or
 * above the first held-back event.  outbox.retention.ms keeps rows that
 * young.
 */
static void cleanup(de_relay *r)
{
    int64_t bound = r->durable_pos - 1, hi, cutoff;
    int64_t start = de__mono_us();
    int rc, n;

    if (r->parked_min > 0 && r->parked_min - 1 < bound)
        bound = r->parked_min - 1;
    while (bound > r->deleted_upto && de__mono_us() - start < 5000) {
        hi = bound;
        if (hi > r->deleted_upto + CLEANUP_CHUNK)
            hi = r->deleted_upto + CLEANUP_CHUNK;
        if (r->retention_ms > 0) {
            int64_t last_old = r->deleted_upto;
            cutoff = de__now_ms() - r->retention_ms;
            sqlite3_bind_int64(r->q_scan, 1, r->deleted_upto);
            sqlite3_bind_int64(r->q_scan, 2, hi);
            sqlite3_bind_int64(r->q_scan, 3, CLEANUP_CHUNK);
            while (sqlite3_step(r->q_scan) == SQLITE_ROW &&
                   sqlite3_column_int64(r->q_scan, 1) <= cutoff)
                last_old = sqlite3_column_int64(r->q_scan, 0);
            sqlite3_reset(r->q_scan);
            if (last_old < hi)
                hi = last_old;
            if (hi <= r->deleted_upto)
                return;
        }
        /* The cursor these deletions rely on is on disk (every
         * checkpoint is fsynced before durable_pos moves): once the rows
         * are gone it could not be rebuilt. */
        assert(hi < r->durable_pos && hi > r->deleted_upto);
        sqlite3_busy_timeout(r->db, 0);
        if (sqlite3_exec(r->db, "BEGIN IMMEDIATE", NULL, NULL, NULL) !=
            SQLITE_OK) {
            sqlite3_busy_timeout(r->db, 5000);
            return; /* the host is writing: later */
        }
        sqlite3_bind_int64(r->q_delete, 1, r->deleted_upto + 1);
        sqlite3_bind_int64(r->q_delete, 2, hi);
        sqlite3_bind_int64(r->q_floor, 1, hi);
        rc = sqlite3_step(r->q_delete);
        n = sqlite3_changes(r->db);
        if (rc != SQLITE_DONE || sqlite3_step(r->q_floor) != SQLITE_DONE ||
            sqlite3_exec(r->db, "COMMIT", NULL, NULL, NULL) != SQLITE_OK) {
            rlog(r, DE_LOG_WARNING, "deleting published rows failed: %s",
                 sqlite3_errmsg(r->db));
            sqlite3_exec(r->db, "ROLLBACK", NULL, NULL, NULL);
            sqlite3_reset(r->q_delete);
            sqlite3_reset(r->q_floor);
            sqlite3_busy_timeout(r->db, 5000);
            return;
        }
        sqlite3_reset(r->q_delete);
        sqlite3_reset(r->q_floor);
        sqlite3_busy_timeout(r->db, 5000);
        r->deleted += (uint64_t)n;
        r->deleted_upto = hi;
    }
}

/* ---- becoming active, and standing by ----------------------------------- */

struct load_ctx {
    de_relay *r;
    int64_t held_back;
};

static de_err load_blocked(void *arg, const char *type, const char *id,
                           int64_t held_back, int64_t since_ms,
                           const char *error)
{
    struct load_ctx *c = arg;
    subj *s = subj_get(c->r, type, id, strlen(id));

    (void)since_ms;
    if (s == NULL)
        return DE_ERR_NOMEM;
    s->blocked = true;
    s->blocked_from = INT64_MAX;
    free(s->error);
    s->error = strdup(error);
    s->retry_at_ms = mono_ms() + c->r->retry_ms;
    if (!s->in_blocked_list && VEC_PUSH(c->r->blocked, s))
        s->in_blocked_list = true;
    c->held_back += held_back;
    return DE_OK;
}

struct first_ctx {
    int64_t first;
};

static de_err first_parked(void *arg, int64_t position, int64_t seq)
{
    struct first_ctx *c = arg;

    (void)seq;
    if (c->first == 0)
        c->first = position;
    return DE_OK;
}

static bool recovery_cancelled(void *arg)
{
    de_relay *r = arg;
    bool stop;

    pthread_mutex_lock(&r->mu);
    stop = r->stop_req && de__mono_us() >= r->stop_deadline_us;
    pthread_mutex_unlock(&r->mu);
    return stop;
}

/* Reads Kafka forward from the marks (relay_recover.c) before the relay
 * publishes anything: events already there are not sent again, and
 * numbering continues above what is there. */
static de_err recover(de_relay *r, bool *lost)
{
    de__recover_opts o;
    de__recover_result res;
    de_err err;

    memset(&o, 0, sizeof o);
    o.conf = r->conf;
    o.source = r->source;
    o.owner = r->owner;
    o.lease_ms = r->lease_ms;
    o.continue_unverifiable = r->continue_unverifiable;
    o.cancelled = recovery_cancelled;
    o.cancel_ctx = r;
    *lost = false;
    r->landed = 0;
    r->recover_upto = query_max_position(r);
    if ((err = de__relay_recover(r->st, &o, &res)) != DE_OK)
        return err;
    if (res.lease_lost) {
        *lost = true;
        return DE_OK;
    }
    /* Reading may take longer than the lease: it was renewed meanwhile. */
    if (res.beat_ms > r->last_beat_ms)
        r->last_beat_ms = res.beat_ms;
    r->landed = res.landed;
    if (res.partitions > 0)
        rlog(r, DE_LOG_NOTICE,
             "read %lld records from %d partitions in %lld ms (%.0f/s) "
             "since the last checkpoint: %lld events of this outbox, %lld "
             "subjects' numbering raised to Kafka's%s",
             (long long)res.records, res.partitions, (long long)res.elapsed_ms,
             res.elapsed_ms > 0 ? res.records * 1000.0 / res.elapsed_ms
                                : (double)res.records,
             (long long)res.landed, (long long)res.subjects,
             res.unverified ? " (some partitions could not be verified)" : "");
    return DE_OK;
}

/* Loads the durable state after taking the lease.  *lost: the lease went
 * to another relay meanwhile. */
static de_err activate(de_relay *r, bool *lost)
{
    struct load_ctx lc = {r, 0};
    int64_t cursor, cnt;
    char cid[DE__EVENT_ID_MAX + 1];
    de_err err;

    subj_sweep(r, true);
    r->dirty.n = r->blocked.n = r->parks.n = r->unparks.n = r->replays.n = 0;
    for (size_t i = 0; i < r->topics.n; i++) {
        topic *t = &r->topics.v[i];
        /* Another relay may have registered topics meanwhile. */
        t->registered = false;
        for (int32_t p = 0; p < t->nparts; p++)
            t->seen[p] = t->marked[p] = 0;
    }
    if ((err = recover(r, lost)) != DE_OK || *lost)
        return err;
    if ((err = de__rstate_cursor(r->st, &cursor, cid, sizeof cid)) != DE_OK ||
        (err = check_cursor_row(r, cursor, cid)) != DE_OK)
        return err;
    r->done_pos = r->read_pos = r->durable_pos = cursor;
    r->deleted_upto = meta_int(r->db, "relay_deleted_upto");
    r->head_tag += (uint64_t)r->count;
    r->count = 0;
    if ((err = de__rstate_parked_subjects(r->st, load_blocked, &lc)) != DE_OK)
        return err;
    for (size_t i = 0; i < r->blocked.n; i++) {
        struct first_ctx fc = {0};
        subj *s = r->blocked.v[i];
        if ((err = de__rstate_parked_rows(r->st, SUBJ_TYPE(s), SUBJ_ID(s),
                                          first_parked, &fc)) != DE_OK)
            return err;
        s->blocked_from = fc.first;
    }
    if ((err = de__rstate_parked_min(r->st, &r->parked_min, &cnt)) != DE_OK)
        return err;
    r->held_back = cnt;
    r->active = true;
    r->woken = true;
    r->lease_lost = false;
    r->need_restart = false;
    r->next_cleanup_us = de__mono_us();
    r->next_mark_refresh_us = r->next_cleanup_us;
    r->next_ckpt_us = r->next_cleanup_us + r->ckpt_ms * 1000;
    rlog(r, DE_LOG_NOTICE,
         "active (lease taken); publishing from position %lld, %lld events "
         "held back behind %zu blocked subjects",
         (long long)cursor + 1, (long long)cnt, r->blocked.n);
    return DE_OK;
}

/* Gives up publishing at once: purges the producer and forgets what was
 * in flight (the next holder replays it from the durable cursor). */
static void demote(de_relay *r, const char *why)
{
    rlog(r, DE_LOG_WARNING, "standing by: %s", why);
    purge_and_drain(r);
    r->head_tag += (uint64_t)r->count;
    r->count = 0;
    r->replays.n = 0;
    r->active = false;
    r->lease_lost = false;
    subj_sweep(r, true);
    r->dirty.n = r->blocked.n = r->parks.n = r->unparks.n = 0;
}

/* Never publishes again: Kafka holds what the relay cannot verify
 * (relay_recover.c).  The thread ends; flush and stop report why. */
static void refuse(de_relay *r)
{
    snprintf(r->fail_msg, sizeof r->fail_msg, "%s", de_errmsg());
    rlog(r, DE_LOG_ERR, "refusing to publish: %s", r->fail_msg);
    set_error(r, "%s", r->fail_msg);
    r->refused = true;
}

static void try_activate(de_relay *r)
{
    char holder[300];
    bool held = false, lost = false;
    de_err err;

    if (de__mono_us() < r->next_standby_us)
        return;
    r->next_standby_us = de__mono_us() + r->lease_ms * 1000 / 5;
    if (de__rstate_lease_acquire(r->st, r->owner, de__now_ms(), r->lease_ms,
                                 &held, holder, sizeof holder) != DE_OK) {
        rlog(r, DE_LOG_WARNING, "cannot check the lease: %s", de_errmsg());
        return;
    }
    if (!held)
        return;
    r->last_beat_ms = de__now_ms();
    r->next_beat_us = de__mono_us() + r->lease_ms * 1000 / 5;
    if ((err = activate(r, &lost)) != DE_OK || lost) {
        if (err == DE_ERR_STATE)
            refuse(r);
        else if (lost)
            rlog(r, DE_LOG_WARNING,
                 "the lease went to another relay while "
                 "this one read Kafka; standing by");
        else
            rlog(r, DE_LOG_ERR, "cannot become active: %s (retrying)",
                 de_errmsg());
        if (!lost)
            (void)!de__rstate_lease_release(r->st, r->owner);
        r->active = false;
    }
}

/* ---- flush bookkeeping ------------------------------------------------ */

/* Whether every row up to target is published: below the watermark and
 * not held back. */
static bool published_through(de_relay *r, int64_t target)
{
    int64_t pos = r->done_pos, min = r->parked_min, cnt;

    if (!r->active) {
        if (de__rstate_cursor(r->st, &pos, NULL, 0) != DE_OK ||
            de__rstate_parked_min(r->st, &min, &cnt) != DE_OK)
            return false;
    }
    if (pos < target)
        return false;
    if (r->active && r->replays.n) {
        for (size_t i = 0; i < r->replays.n; i++)
            if (!r->replays.v[i].done && r->replays.v[i].position <= target)
                return false;
    }
    return min == 0 || min > target;
}

static void handle_flush(de_relay *r)
{
    uint64_t req;
    bool stop;

    pthread_mutex_lock(&r->mu);
    req = r->flush_req;
    stop = r->stop_req;
    pthread_mutex_unlock(&r->mu);
    if (req != r->flush_taken) {
        int64_t m = query_max_position(r);
        if (m > r->flush_target)
            r->flush_target = m;
        r->flush_taken = req;
    }
    if (stop && !r->stop_target_set) {
        r->stop_target = query_max_position(r);
        r->stop_target_set = true;
    }
    if (req != 0 && r->flush_done != r->flush_taken &&
        published_through(r, r->flush_target)) {
        publish_stats(r); /* a flusher reads them right after */
        pthread_mutex_lock(&r->mu);
        if (r->flush_done != r->flush_taken) {
            r->flush_done = r->flush_taken;
            pthread_cond_broadcast(&r->cond);
        }
        pthread_mutex_unlock(&r->mu);
    }
}

/* ---- stats -------------------------------------------------------------- */

static void publish_stats(de_relay *r)
{
    de_relay_stats s;
    int64_t max = r->max_pos > r->done_pos ? r->max_pos : r->done_pos;

    memset(&s, 0, sizeof s);
    s.published = r->published;
    /* Parks not yet written may repeat written ones (after a restart)
     * for at most one checkpoint interval. */
    s.held_back = (uint64_t)r->held_back + r->parks.n;
    s.pending = (uint64_t)(max - r->done_pos) + s.held_back;
    s.lag_ms = 0;
    if (r->count > 0)
        s.lag_ms = de__now_ms() - ring_at(r, r->head_tag)->recorded_at_ms;
    if (s.lag_ms < 0)
        s.lag_ms = 0;
    s.producer_restarts = r->restarts;
    s.active = r->active;
    s.position = r->done_pos;
    s.blocked_subjects = r->blocked.n;
    s.deleted = r->deleted;
    s.read = r->nread;
    s.last_error_ms = r->last_error_ms;
    memcpy(s.last_error, r->last_error, sizeof s.last_error);
    pthread_mutex_lock(&r->mu);
    r->stats = s;
    pthread_mutex_unlock(&r->mu);
}

/* ---- the thread ------------------------------------------------------- */

static void wait_for_work(de_relay *r, int timeout_ms)
{
    struct pollfd p = {r->wake_fd, POLLIN, 0};
    uint64_t v;

    if (timeout_ms > 0 && poll(&p, 1, timeout_ms) > 0 && (p.revents & POLLIN)) {
        (void)!read(r->wake_fd, &v, sizeof v);
        r->woken = true;
    } else if (timeout_ms <= 0 && read(r->wake_fd, &v, sizeof v) > 0) {
        r->woken = true;
    }
}

/* Whether another connection committed since the last call: the cheap
 * check (no table read) that catches writers this relay cannot hear. */
static bool others_committed(de_relay *r)
{
    int64_t dv = r->data_version;

    if (sqlite3_step(r->q_dv) == SQLITE_ROW)
        dv = sqlite3_column_int64(r->q_dv, 0);
    sqlite3_reset(r->q_dv);
    if (dv == r->data_version)
        return false;
    r->data_version = dv;
    return true;
}

static void *relay_main(void *arg)
{
    de_relay *r = arg;
    bool stop, retry, ok, flushing;
    int64_t now_us, deadline, t;
    int timeout;

    for (;;) {
        pthread_mutex_lock(&r->mu);
        stop = r->stop_req;
        deadline = r->stop_deadline_us;
        retry = r->retry_req;
        r->retry_req = false;
        flushing = r->flush_req != r->flush_done;
        pthread_mutex_unlock(&r->mu);
        now_us = de__mono_us();
        if (r->refused)
            break;

        if (!r->active) {
            /* A stopping relay still takes a free (or expired) lease to
             * publish what was committed before the stop, while its time
             * lasts. */
            if (!stop || now_us < deadline)
                try_activate(r);
            if (r->refused)
                break;
            if (!r->active) {
                handle_flush(r);
                publish_stats(r);
                if (stop && (published_through(r, r->stop_target) ||
                             now_us >= deadline))
                    break;
                wait_for_work(r,
                              stop || flushing ? 20 : (int)(r->lease_ms / 5));
                continue;
            }
        }

        if (r->rk == NULL && producer_new(r) != DE_OK) {
            rlog(r, DE_LOG_ERR, "cannot create a producer: %s", de_errmsg());
            if (stop)
                break;
            wait_for_work(r, 1000);
            continue;
        }
        rd_kafka_poll(r->rk, 0);
        if (r->need_restart)
            restart_producer(r);
        if (r->rk == NULL)
            continue;
        compact_replays(r);
        advance(r);
        handle_flush(r);
        if (stop && ((r->count == 0 && r->replays.n == 0 &&
                      published_through(r, r->stop_target)) ||
                     now_us >= deadline))
            break;
        if (retry)
            retry_blocked(r, true);
        else if (r->blocked.n)
            retry_blocked(r, false);
        maybe_checkpoint(r, now_us);
        if (!r->lease_lost && r->last_beat_ms &&
            de__now_ms() - r->last_beat_ms > r->lease_ms)
            r->lease_lost = true; /* could not renew in time: fence */
        if (r->lease_lost) {
            demote(r, "the lease was lost or could not be renewed in time");
            continue;
        }
        if (r->register_pending && now_us >= r->register_retry_us) {
            r->register_pending = false;
            r->woken = true;
        }
        /* Read when there may be rows: woken (a commit in this process,
         * delivery reports, the API), a backlog, or another connection
         * committed.  Otherwise the poll interval costs one PRAGMA. */
        if (r->woken || r->more_rows || others_committed(r)) {
            r->woken = false;
            ok = read_rows(r);
        } else {
            ok = true;
        }
        if (!ok) {
            rlog(r, DE_LOG_WARNING, "%s (retrying)", de_errmsg());
            wait_for_work(r, 200);
            continue;
        }
        if (r->last_read > 0 && r->last_read < LOW_LOAD_ROWS && !r->more_rows) {
            /* Caught up with a few rows: low load.  Send them now rather
             * than after linger.ms -- while flush() runs, librdkafka's
             * broker threads treat linger as elapsed -- and take their
             * acknowledgements as they come (up to 1 ms).  Under load the
             * reads return full batches and linger.ms batches them. */
            rd_kafka_flush(r->rk, 1);
        }
        if (r->link && de__link_checkpoint_due(r->link))
            sqlite3_wal_checkpoint_v2(r->db, "main", SQLITE_CHECKPOINT_PASSIVE,
                                      NULL, NULL);
        if (r->count == 0 && !r->more_rows &&
            now_us >= r->next_mark_refresh_us) {
            r->next_mark_refresh_us = now_us + MARK_REFRESH_MS * 1000;
            refresh_marks(r);
        }
        if (r->count == 0 && !r->more_rows && now_us >= r->next_cleanup_us) {
            r->next_cleanup_us = now_us + r->cleanup_ms * 1000;
            cleanup(r);
            subj_sweep(r, false);
        }
        publish_stats(r);

        if (r->more_rows && r->count < r->cap && !r->need_restart) {
            timeout = 0;
        } else {
            t = r->poll_ms * 1000;
            if ((r->dirty_pos || r->dirty.n) && r->next_ckpt_us - now_us < t)
                t = r->next_ckpt_us - now_us;
            if (r->next_beat_us - now_us < t)
                t = r->next_beat_us - now_us;
            if (r->register_pending && r->register_retry_us - now_us < t)
                t = r->register_retry_us - now_us;
            if (stop && t > 10000)
                t = 10000;
            timeout = t <= 0 ? 0 : (int)((t + 999) / 1000);
        }
        if (timeout > 0)
            wait_for_work(r, timeout);
        else
            rd_kafka_poll(r->rk, 0);
    }

    /* Shut down: record what is done, hand the lease over. */
    if (r->active) {
        advance(r);
        if (checkpoint(r) != DE_OK)
            rlog(r, DE_LOG_WARNING, "final checkpoint failed: %s", de_errmsg());
        if (r->rk)
            purge_and_drain(r);
        if (!r->lease_lost)
            de__rstate_lease_release(r->st, r->owner);
    }
    handle_flush(r);
    publish_stats(r);
    pthread_mutex_lock(&r->mu);
    if (r->refused)
        r->stop_result = DE_ERR_STATE;
    else
        r->stop_result =
            (r->stop_target_set && published_through(r, r->stop_target))
                ? DE_OK
                : DE_ERR_TIMEOUT;
    r->finished = true;
    pthread_cond_broadcast(&r->cond);
    pthread_mutex_unlock(&r->mu);
    return NULL;
}

/* ---- construction ----------------------------------------------------- */

static void relay_free(de_relay *r)
{
    if (r == NULL)
        return;
    de__link_release(r->link);
    producer_destroy(r);
    sqlite3_finalize(r->q_read);
    sqlite3_finalize(r->q_max);
    sqlite3_finalize(r->q_one);
    sqlite3_finalize(r->q_delete);
    sqlite3_finalize(r->q_floor);
    sqlite3_finalize(r->q_scan);
    sqlite3_finalize(r->q_dv);
    sqlite3_close(r->db);
    de__rstate_close(r->st);
    subj_sweep(r, true);
    free(r->buckets);
    free(r->dirty.v);
    free(r->blocked.v);
    free(r->parks.v);
    free(r->unparks.v);
    free(r->replays.v);
    topics_free(r);
    free(r->topics.v);
    free(r->ring);
    if (r->wake_fd >= 0)
        close(r->wake_fd);
    pthread_cond_destroy(&r->cond);
    pthread_mutex_destroy(&r->mu);
    free(r->db_path);
    free(r->state_path);
    de_conf_destroy(r->conf);
    free(r);
}

static de_err check_conf(const de_conf *conf)
{
    const char *v = NULL;

    if (!de__conf_rdkafka_get(conf, "bootstrap.servers", &v) &&
        !de__conf_rdkafka_get(conf, "metadata.broker.list", &v))
        return de__fail(DE_ERR_CONFIG, "the relay needs bootstrap.servers "
                                       "(the Kafka brokers to publish to)");
    for (size_t i = 0; i < DE__ARRAY_LEN(forced); i++) {
        if (de__conf_rdkafka_get(conf, forced[i].key, &v) &&
            strcmp(v, forced[i].value) != 0)
            return de__fail(DE_ERR_CONFIG,
                            "%s=%s is not allowed for the relay: it keeps "
                            "%s=%s because %s",
                            forced[i].key, v, forced[i].key, forced[i].value,
                            forced[i].why);
    }
    if (de__conf_rdkafka_get(conf, "transactional.id", &v))
        return de__fail(DE_ERR_CONFIG,
                        "transactional.id is not allowed for the relay: it "
                        "uses an idempotent, not a transactional, producer");
    return DE_OK;
}

static de_err relay_new(const char *db_path, de_conf *conf, de_outbox *ob,
                        de_relay **out)
{
    de_relay *r = calloc(1, sizeof *r);
    char resolved[PATH_MAX], state[PATH_MAX + 16];
    const char *sp;
    int rc;
    de_err err;

    if (r == NULL) {
        de_conf_destroy(conf);
        return de__fail(DE_ERR_NOMEM, "out of memory starting the relay");
    }
    r->conf = conf;
    r->wake_fd = -1;
    pthread_mutex_init(&r->mu, NULL);
    {
        /* Deadlines are monotonic: wall-clock steps must not cut a flush
         * short or stretch it. */
        pthread_condattr_t ca;
        pthread_condattr_init(&ca);
        pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
        pthread_cond_init(&r->cond, &ca);
        pthread_condattr_destroy(&ca);
    }
    if ((err = check_conf(conf)) != DE_OK)
        goto fail;
    if (realpath(db_path, resolved) == NULL) {
        err = de__fail(DE_ERR_ARG, "database '%s' cannot be opened: %s",
                       db_path, strerror(errno));
        goto fail;
    }
    r->db_path = strdup(resolved);
    sp = de__conf_str(conf, DE__K_RELAY_STATE_PATH);
    if (sp[0] == '\0') {
        snprintf(state, sizeof state, "%s-relay", resolved);
        sp = state;
    }
    r->state_path = strdup(sp);
    if (r->db_path == NULL || r->state_path == NULL) {
        err = de__fail(DE_ERR_NOMEM, "out of memory starting the relay");
        goto fail;
    }
    r->source = de__conf_str(conf, DE__K_EVENT_SOURCE);
    r->type_prefix = de__conf_str(conf, DE__K_EVENT_TYPE_PREFIX);
    r->topic_template = de__conf_str(conf, DE__K_TOPIC_TEMPLATE);
    r->batch_size = de__conf_int(conf, DE__K_RELAY_BATCH_SIZE);
    r->cap = de__conf_int(conf, DE__K_RELAY_MAX_INFLIGHT);
    r->poll_ms = de__conf_int(conf, DE__K_RELAY_POLL_INTERVAL_MS);
    r->ckpt_ms = de__conf_int(conf, DE__K_RELAY_CHECKPOINT_INTERVAL_MS);
    r->lease_ms = de__conf_int(conf, DE__K_RELAY_LEASE_TIMEOUT_MS);
    r->retry_ms = de__conf_int(conf, DE__K_RELAY_BLOCKED_RETRY_MS);
    r->cleanup_ms = de__conf_int(conf, DE__K_RELAY_CLEANUP_INTERVAL_MS);
    r->retention_ms = de__conf_int(conf, DE__K_OUTBOX_RETENTION_MS);
    r->continue_unverifiable =
        strcmp(de__conf_str(conf, DE__K_RELAY_RECOVERY_UNVERIFIABLE),
               "continue") == 0;
    r->ring = calloc((size_t)r->cap, sizeof *r->ring);
    if (r->ring == NULL) {
        err = de__fail(DE_ERR_NOMEM, "out of memory for %lld in-flight slots",
                       (long long)r->cap);
        goto fail;
    }
    de__uuid7(r->owner);
    r->head_tag = 1;
    r->next_replay_tag = 1;

    rc = sqlite3_open_v2(r->db_path, &r->db,
                         SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX, NULL);
    if (rc != SQLITE_OK) {
        err = de__fail_db(r->db, "relay: cannot open '%s'", r->db_path);
        goto fail;
    }
    sqlite3_busy_timeout(r->db, 5000);
    if ((err = de__exec(r->db, "PRAGMA journal_mode=WAL")) != DE_OK ||
        (err = de__outbox_schema_ensure(r->db)) != DE_OK ||
        (err = de__outbox_identity(r->db, r->outbox_id)) != DE_OK ||
        (err = prepare_all(r)) != DE_OK)
        goto fail;
    /* The link checkpoints for the host from now on: don't let this
     * connection's own auto-checkpoint compete. */
    sqlite3_wal_autocheckpoint(r->db, ob ? 0 : 1000);
    {
        int64_t cursor;
        char cid[DE__EVENT_ID_MAX + 1];
        err = de__rstate_open(r->state_path, r->outbox_id,
                              meta_int(r->db, "relay_deleted_upto"), &r->st,
                              &cursor);
        /* Refused at once, not only when the thread becomes active. */
        if (err == DE_OK &&
            (err = de__rstate_cursor(r->st, &cursor, cid, sizeof cid)) == DE_OK)
            err = check_cursor_row(r, cursor, cid);
        if (err != DE_OK)
            goto fail;
    }
    r->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (r->wake_fd < 0) {
        err = de__fail(DE_ERR_STATE, "relay: eventfd failed: %s",
                       strerror(errno));
        goto fail;
    }
    if ((err = producer_new(r)) != DE_OK)
        goto fail;
    if (ob != NULL) {
        r->link = de__link_new(r->wake_fd);
        if (r->link == NULL) {
            err = de__fail(DE_ERR_NOMEM, "out of memory starting the relay");
            goto fail;
        }
        de__outbox_link(ob, r->link);
    }
    r->stop_deadline_us = INT64_MAX;
    if ((rc = pthread_create(&r->thread, NULL, relay_main, r)) != 0) {
        err = de__fail(DE_ERR_STATE, "relay: cannot start its thread: %s",
                       strerror(rc));
        goto fail;
    }
    *out = r;
    return DE_OK;
fail:
    relay_free(r);
    return err;
}

de_err de_relay_start(de_outbox *ob, const de_conf *conf, de_relay **out)
{
    de_conf *merged;
    de_err err;

    if (out != NULL)
        *out = NULL;
    if (ob == NULL || out == NULL)
        return de__fail(DE_ERR_ARG,
                        "de_relay_start needs an outbox and an "
                        "out pointer (got NULL %s)",
                        ob == NULL ? "outbox" : "out");
    merged = de__conf_dup(de__outbox_conf(ob));
    if (merged == NULL)
        return de__fail(DE_ERR_NOMEM, "out of memory starting the relay");
    if ((err = de__conf_merge(merged, conf)) != DE_OK) {
        de_conf_destroy(merged);
        return err;
    }
    return relay_new(sqlite3_db_filename(de__outbox_db(ob), "main"), merged, ob,
                     out);
}

de_err de_relay_start_path(const char *db_path, const de_conf *conf,
                           de_relay **out)
{
    de_conf *copy;

    if (out != NULL)
        *out = NULL;
    if (db_path == NULL || out == NULL)
        return de__fail(DE_ERR_ARG,
                        "de_relay_start_path needs a database "
                        "path and an out pointer (got NULL %s)",
                        db_path == NULL ? "db_path" : "out");
    if (access(db_path, F_OK) != 0)
        return de__fail(DE_ERR_ARG, "database '%s' does not exist", db_path);
    copy = de__conf_dup(conf);
    if (copy == NULL)
        return de__fail(DE_ERR_NOMEM, "out of memory starting the relay");
    return relay_new(db_path, copy, NULL, out);
}

/* ---- the API threads' side --------------------------------------------- */

static void deadline_ts(struct timespec *ts, int timeout_ms)
{
    clock_gettime(CLOCK_MONOTONIC, ts);
    ts->tv_sec += timeout_ms / 1000;
    ts->tv_nsec += (long)(timeout_ms % 1000) * 1000000;
    if (ts->tv_nsec >= 1000000000) {
        ts->tv_sec++;
        ts->tv_nsec -= 1000000000;
    }
}

de_err de_relay_flush(de_relay *r, int timeout_ms)
{
    struct timespec ts;
    uint64_t mine;
    de_err err = DE_OK;

    if (r == NULL)
        return de__fail(DE_ERR_ARG, "de_relay_flush needs a relay (got NULL)");
    if (timeout_ms >= 0)
        deadline_ts(&ts, timeout_ms);
    pthread_mutex_lock(&r->mu);
    mine = ++r->flush_req;
    wake(r);
    while (r->flush_done < mine && !r->finished) {
        int rc = timeout_ms >= 0 ? pthread_cond_timedwait(&r->cond, &r->mu, &ts)
                                 : pthread_cond_wait(&r->cond, &r->mu);
        if (rc == ETIMEDOUT && r->flush_done < mine) {
            err = de__fail(DE_ERR_TIMEOUT,
                           "de_relay_flush: events committed before the call "
                           "were not all acknowledged within %d ms (%llu "
                           "pending%s%s); they stay in the outbox",
                           timeout_ms, (unsigned long long)r->stats.pending,
                           r->stats.last_error[0] ? "; last error: " : "",
                           r->stats.last_error);
            break;
        }
    }
    if (err == DE_OK && r->flush_done < mine)
        err = r->refused
                  ? de__fail(DE_ERR_STATE, "de_relay_flush: %s", r->fail_msg)
                  : de__fail(DE_ERR_STATE,
                             "de_relay_flush: the relay has stopped");
    pthread_mutex_unlock(&r->mu);
    return err;
}

de_err de_relay_stop(de_relay *r, int timeout_ms)
{
    de_err err;

    if (r == NULL)
        return DE_OK;
    pthread_mutex_lock(&r->mu);
    r->stop_req = true;
    r->stop_deadline_us =
        timeout_ms < 0 ? INT64_MAX : de__mono_us() + (int64_t)timeout_ms * 1000;
    pthread_mutex_unlock(&r->mu);
    wake(r);
    pthread_join(r->thread, NULL);
    err = r->stop_result;
    if (err == DE_ERR_STATE)
        de__fail(DE_ERR_STATE, "de_relay_stop: %s", r->fail_msg);
    else if (err == DE_ERR_TIMEOUT)
        de__fail(DE_ERR_TIMEOUT,
                 "de_relay_stop: not everything committed was acknowledged "
                 "within %d ms (%llu pending); the rest stays in the outbox "
                 "for the next relay",
                 timeout_ms, (unsigned long long)r->stats.pending);
    relay_free(r);
    return err;
}

de_err de_relay_stats_get(de_relay *r, de_relay_stats *out)
{
    if (r == NULL || out == NULL)
        return de__fail(DE_ERR_ARG,
                        "de_relay_stats_get needs a relay and "
                        "an out pointer (got NULL %s)",
                        r == NULL ? "relay" : "out");
    pthread_mutex_lock(&r->mu);
    *out = r->stats;
    pthread_mutex_unlock(&r->mu);
    return DE_OK;
}

de_err de_relay_retry_blocked(de_relay *r)
{
    if (r == NULL)
        return de__fail(DE_ERR_ARG,
                        "de_relay_retry_blocked needs a relay (got NULL)");
    pthread_mutex_lock(&r->mu);
    r->retry_req = true;
    pthread_mutex_unlock(&r->mu);
    wake(r);
    return DE_OK;
}

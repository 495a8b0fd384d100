/* SPDX-License-Identifier: MIT */
/*
 * kafka.c -- clusters, the ledger writer and the checking consumer shared
 * by the integration suites (see kafka.h).
 */
#include "kafka.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

int64_t tu_now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

void tu_log(void *ctx, int level, const char *message)
{
    (void)ctx;
    if (getenv("DE_TEST_LOG"))
        fprintf(stderr, "[%d] %s\n", level, message);
}

static void quiet_rdkafka_log(const rd_kafka_t *rk, int level, const char *fac,
                              const char *buf)
{
    (void)rk;
    if (getenv("DE_TEST_LOG"))
        fprintf(stderr, "[rdkafka %d] %s: %s\n", level, fac, buf);
}

int tu_cluster_count(void)
{
    const char *b = getenv("KAFKA_BOOTSTRAP_SERVERS");

    return b && *b ? 2 : 1;
}

int tu_cluster_first(void)
{
    return tu_cluster_count() == 2 && getenv("KAFKA_TEST_REAL_ONLY") ? 1 : 0;
}

static rd_kafka_t *new_client(rd_kafka_type_t type, const char *bootstrap,
                              const char *group)
{
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    char err[512];
    rd_kafka_t *rk;

    rd_kafka_conf_set_log_cb(conf, quiet_rdkafka_log);
    if (bootstrap)
        ck_assert(rd_kafka_conf_set(conf, "bootstrap.servers", bootstrap, err,
                                    sizeof err) == RD_KAFKA_CONF_OK);
    if (group) {
        rd_kafka_conf_set(conf, "group.id", group, err, sizeof err);
        rd_kafka_conf_set(conf, "enable.auto.commit", "false", err, sizeof err);
        rd_kafka_conf_set(conf, "enable.partition.eof", "false", err,
                          sizeof err);
    }
    rk = rd_kafka_new(type, conf, err, sizeof err);
    ck_assert_msg(rk != NULL, "rd_kafka_new: %s", err);
    return rk;
}

tu_cluster *tu_cluster_new(int which, int brokers)
{
    tu_cluster *c = calloc(1, sizeof *c);
    static int counter;

    ck_assert_ptr_nonnull(c);
    snprintf(c->prefix, sizeof c->prefix, "t%d-%lld-%d.", (int)getpid(),
             (long long)(time(NULL) % 100000), counter++);
    if (which == 1) {
        c->real = 1;
        snprintf(c->bootstrap, sizeof c->bootstrap, "%s",
                 getenv("KAFKA_BOOTSTRAP_SERVERS"));
        return c;
    }
    c->host = new_client(RD_KAFKA_PRODUCER, NULL, NULL);
    c->mock = rd_kafka_mock_cluster_new(c->host, brokers);
    ck_assert_ptr_nonnull(c->mock);
    snprintf(c->bootstrap, sizeof c->bootstrap, "%s",
             rd_kafka_mock_cluster_bootstraps(c->mock));
    return c;
}

void tu_cluster_destroy(tu_cluster *c)
{
    if (c == NULL)
        return;
    if (c->mock)
        rd_kafka_mock_cluster_destroy(c->mock);
    if (c->host)
        rd_kafka_destroy(c->host);
    free(c);
}

const char *tu_topic(tu_cluster *c, const char *subject_type)
{
    static char bufs[4][256];
    static int next;
    char *b = bufs[next++ & 3];

    snprintf(b, sizeof bufs[0], "%s%s.events", c->prefix, subject_type);
    return b;
}

void tu_topic_create(tu_cluster *c, const char *subject_type, int partitions)
{
    const char *name = tu_topic(c, subject_type);

    if (c->mock) {
        ck_assert_int_eq(
            rd_kafka_mock_topic_create(c->mock, name, partitions, 1),
            RD_KAFKA_RESP_ERR_NO_ERROR);
        return;
    }
    /* A cluster that creates topics itself when first used: the librdkafka
     * mock in another process (`deliveryevents mock-cluster`) has no
     * controller, so the Admin API cannot reach it; this rehearses the
     * real-cluster path here, with the cluster's default partition count. */
    if (getenv("KAFKA_TEST_AUTOCREATE_TOPICS"))
        return;
    /* A real cluster: the Admin API, replication factor from the broker's
     * default. */
    rd_kafka_t *rk = new_client(RD_KAFKA_PRODUCER, c->bootstrap, NULL);
    rd_kafka_NewTopic_t *nt;
    rd_kafka_queue_t *q = rd_kafka_queue_new(rk);
    rd_kafka_event_t *ev;
    char err[256];

    nt = rd_kafka_NewTopic_new(name, partitions, -1, err, sizeof err);
    ck_assert_msg(nt != NULL, "NewTopic: %s", err);
    rd_kafka_CreateTopics(rk, &nt, 1, NULL, q);
    ev = rd_kafka_queue_poll(q, 30000);
    ck_assert_msg(ev != NULL, "CreateTopics timed out");
    {
        const rd_kafka_CreateTopics_result_t *res =
            rd_kafka_event_CreateTopics_result(ev);
        size_t n;
        const rd_kafka_topic_result_t **tr =
            rd_kafka_CreateTopics_result_topics(res, &n);
        for (size_t i = 0; i < n; i++) {
            rd_kafka_resp_err_t e = rd_kafka_topic_result_error(tr[i]);
            ck_assert_msg(e == 0 || e == RD_KAFKA_RESP_ERR_TOPIC_ALREADY_EXISTS,
                          "create %s: %s", name,
                          rd_kafka_topic_result_error_string(tr[i]));
        }
    }
    rd_kafka_event_destroy(ev);
    rd_kafka_NewTopic_destroy(nt);
    rd_kafka_queue_destroy(q);
    rd_kafka_destroy(rk);
}

uint64_t tu_relay_published(de_relay *r)
{
    de_relay_stats st;

    tu_ok(de_relay_stats_get(r, &st));
    return st.published;
}

de_conf *tu_relay_conf(tu_cluster *c, ...)
{
    de_conf *conf = de_conf_new();
    char tmpl[128];
    const char *k, *v;
    va_list ap;

    snprintf(tmpl, sizeof tmpl, "%s{subject_type}.events", c->prefix);
    tu_ok(de_conf_set(conf, "bootstrap.servers", c->bootstrap));
    tu_ok(de_conf_set(conf, "topic.template", tmpl));
    tu_ok(de_conf_set(conf, "event.source", "/test/relay"));
    tu_ok(de_conf_set(conf, "relay.lease.timeout.ms", "1500"));
    tu_ok(de_conf_set(conf, "relay.checkpoint.interval.ms", "50"));
    tu_ok(de_conf_set(conf, "relay.cleanup.interval.ms", "100"));
    de_conf_set_log_cb(conf, tu_log, NULL);
    va_start(ap, c);
    while ((k = va_arg(ap, const char *)) != NULL) {
        v = va_arg(ap, const char *);
        tu_ok(de_conf_set(conf, k, v));
    }
    va_end(ap);
    return conf;
}

void tu_relay_takes_over(tu_cluster *c, de_outbox *ob, uint64_t found)
{
    de_conf *conf = tu_relay_conf(c, "relay.lease.timeout.ms", "300", NULL);
    de_relay *r = NULL;
    de_relay_stats st;

    tu_ok(de_relay_start(ob, conf, &r));
    de_conf_destroy(conf);
    tu_ok(de_relay_flush(r, 30000));
    tu_ok(de_relay_stats_get(r, &st));
    ck_assert_uint_ge(st.skipped, found);
    tu_ok(de_relay_stop(r, 10000));
}

sqlite3 *tu_db;
de_outbox *tu_ob;

void tu_service_setup(void)
{
    tu_dir_setup();
    tu_db = tu_open(tu_path(tu_dir, "service.db"));
    tu_ledger_create(tu_db);
    tu_ok(de_outbox_open(tu_db, NULL, &tu_ob));
}

void tu_service_teardown(void)
{
    de_outbox_close(tu_ob);
    tu_ob = NULL;
    sqlite3_close(tu_db);
    tu_db = NULL;
    tu_dir_teardown();
}

void tu_ledger_create(sqlite3 *db)
{
    tu_exec(db, "CREATE TABLE IF NOT EXISTS ledger("
                "  n INTEGER PRIMARY KEY, event_id TEXT NOT NULL,"
                "  subject_type TEXT NOT NULL, subject_id TEXT NOT NULL,"
                "  action TEXT NOT NULL, payload TEXT NOT NULL,"
                "  occurred_at_ms INTEGER NOT NULL, traceparent TEXT,"
                "  version INTEGER NOT NULL DEFAULT 0)");
}

int64_t tu_write_raw(sqlite3 *db, de_outbox *ob, const char *type,
                     const char *id, const char *action, const char *payload,
                     int rollback)
{
    de_event ev = {0};
    de_recorded rec;
    sqlite3_stmt *st = NULL;
    int64_t occurred = 1795604400000 + tu_now_ms() % 100000000;
    int rc;

    ev.subject_type = type;
    ev.subject_id = id;
    ev.action = action;
    ev.payload = payload;
    ev.occurred_at_ms = occurred;
    if (sqlite3_exec(db, "BEGIN IMMEDIATE", NULL, NULL, NULL) != SQLITE_OK)
        return -2;
    if (de_record(ob, &ev, &rec) != DE_OK)
        goto fail;
    if (sqlite3_prepare_v2(db,
                           "INSERT INTO ledger(event_id, subject_type, "
                           "subject_id, action, payload, occurred_at_ms) "
                           "VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                           -1, &st, NULL) != SQLITE_OK)
        goto fail;
    sqlite3_bind_text(st, 1, rec.event_id, -1, SQLITE_TRANSIENT);
    sqlite3_bind_text(st, 2, type, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 3, id, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 4, action, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 5, payload ? payload : "{}", -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 6, occurred);
    rc = sqlite3_step(st);
    sqlite3_finalize(st);
    if (rc != SQLITE_DONE)
        goto fail;
    if (sqlite3_exec(db, rollback ? "ROLLBACK" : "COMMIT", NULL, NULL, NULL) !=
        SQLITE_OK)
        goto fail;
    return rollback ? -1 : rec.position;
fail:
    sqlite3_exec(db, "ROLLBACK", NULL, NULL, NULL);
    return -2;
}

int64_t tu_write(sqlite3 *db, de_outbox *ob, const char *type, const char *id,
                 const char *action, const char *payload, int rollback)
{
    int64_t pos = tu_write_raw(db, ob, type, id, action, payload, rollback);

    ck_assert_msg(pos != -2, "writing %s %s %s failed: %s / %s", type, id,
                  action, de_errmsg(), sqlite3_errmsg(db));
    return pos;
}

/* ---- the checking consumer -------------------------------------------- */

int32_t tu_murmur2_partition(const char *key, size_t len, int32_t partitions)
{
    const uint32_t seed = 0x9747b28c, m = 0x5bd1e995;
    const int r = 24;
    uint32_t h = seed ^ (uint32_t)len;
    const unsigned char *p = (const unsigned char *)key;
    size_t n = len;

    while (n >= 4) {
        uint32_t k = (uint32_t)p[0] | (uint32_t)p[1] << 8 |
                     (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
        k *= m;
        k ^= k >> r;
        k *= m;
        h *= m;
        h ^= k;
        p += 4;
        n -= 4;
    }
    switch (n) {
    case 3: h ^= (uint32_t)p[2] << 16; /* fall through */
    case 2: h ^= (uint32_t)p[1] << 8;  /* fall through */
    case 1: h ^= p[0]; h *= m;
    }
    h ^= h >> 13;
    h *= m;
    h ^= h >> 15;
    return (int32_t)((h & 0x7fffffff) % (uint32_t)partitions);
}

/* One expected event, from the ledger. */
typedef struct exp_event {
    char *event_id, *type, *id, *action, *payload;
    int64_t occurred;
    long idx;           /* its place among its subject's events, from 0 */
    char *skey;         /* its subject's key */
    int64_t epoch, seq; /* the number it arrived with first */
} exp_event;

typedef struct exp_subject {
    char *key; /* type \x1f id */
    exp_event **events;
    long n;
    long last; /* events that arrived in order so far */
} exp_subject;

struct checker {
    exp_event *ev;
    exp_event **by_id; /* ev sorted by event_id */
    long nev;
    exp_subject *subj;
    long nsubj;
    char **types;
    int ntypes;
    tu_check res;
    const char *source, *prefix;
};

static void problem(struct checker *k, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static void problem(struct checker *k, const char *fmt, ...)
{
    va_list ap;

    if (k->res.problems++ == 0) {
        va_start(ap, fmt);
        vsnprintf(k->res.first_problem, sizeof k->res.first_problem, fmt, ap);
        va_end(ap);
    }
}

static int cmp_subj(const void *a, const void *b)
{
    return strcmp(((const exp_subject *)a)->key, ((const exp_subject *)b)->key);
}

static exp_subject *find_subj(struct checker *k, const char *type,
                              const char *id, size_t id_len)
{
    char key[400];
    exp_subject probe;

    snprintf(key, sizeof key, "%s\x1f%.*s", type, (int)id_len, id);
    probe.key = key;
    return bsearch(&probe, k->subj, (size_t)k->nsubj, sizeof probe, cmp_subj);
}

static int cmp_event_id(const void *a, const void *b)
{
    return strcmp((*(exp_event *const *)a)->event_id,
                  (*(exp_event *const *)b)->event_id);
}

static exp_event *find_event(struct checker *k, const char *event_id)
{
    exp_event probe, *pp = &probe, **hit;

    probe.event_id = (char *)(uintptr_t)event_id;
    hit =
        bsearch(&pp, k->by_id, (size_t)k->nev, sizeof *k->by_id, cmp_event_id);
    return hit ? *hit : NULL;
}

static char *dup_col(sqlite3_stmt *st, int i)
{
    const unsigned char *t = sqlite3_column_text(st, i);
    return strdup(t ? (const char *)t : "");
}

static void load_ledger(struct checker *k, sqlite3 *db)
{
    sqlite3_stmt *st;
    long i, j;

    k->nev = tu_query_int(db, "SELECT count(*) FROM ledger");
    k->ev = calloc((size_t)k->nev + 1, sizeof *k->ev);
    ck_assert_int_eq(sqlite3_prepare_v2(db,
                                        "SELECT event_id, subject_type, "
                                        "subject_id, action, payload, "
                                        "occurred_at_ms FROM ledger "
                                        "ORDER BY n",
                                        -1, &st, NULL),
                     SQLITE_OK);
    for (i = 0; i < k->nev && sqlite3_step(st) == SQLITE_ROW; i++) {
        k->ev[i].event_id = dup_col(st, 0);
        k->ev[i].type = dup_col(st, 1);
        k->ev[i].id = dup_col(st, 2);
        k->ev[i].action = dup_col(st, 3);
        k->ev[i].payload = dup_col(st, 4);
        k->ev[i].occurred = sqlite3_column_int64(st, 5);
    }
    sqlite3_finalize(st);
    /* Group by subject, keeping commit order within each. */
    k->subj = calloc((size_t)k->nev + 1, sizeof *k->subj);
    for (i = 0; i < k->nev; i++) {
        char key[400];
        exp_subject *s = NULL;
        snprintf(key, sizeof key, "%s\x1f%s", k->ev[i].type, k->ev[i].id);
        for (j = 0; j < k->nsubj; j++)
            if (strcmp(k->subj[j].key, key) == 0) {
                s = &k->subj[j];
                break;
            }
        if (s == NULL) {
            s = &k->subj[k->nsubj++];
            s->key = strdup(key);
            s->events = calloc((size_t)k->nev + 1, sizeof *s->events);
        }
        k->ev[i].idx = s->n;
        k->ev[i].skey = s->key;
        s->events[s->n++] = &k->ev[i];
    }
    qsort(k->subj, (size_t)k->nsubj, sizeof *k->subj, cmp_subj);
    k->by_id = calloc((size_t)k->nev + 1, sizeof *k->by_id);
    for (i = 0; i < k->nev; i++)
        k->by_id[i] = &k->ev[i];
    qsort(k->by_id, (size_t)k->nev, sizeof *k->by_id, cmp_event_id);
    k->types = calloc((size_t)k->nev + 1, sizeof *k->types);
    for (i = 0; i < k->nev; i++) {
        int found = 0;
        for (j = 0; j < k->ntypes; j++)
            found |= strcmp(k->types[j], k->ev[i].type) == 0;
        if (!found)
            k->types[k->ntypes++] = k->ev[i].type;
    }
    k->res.expected = k->nev;
}

static const char *header(const rd_kafka_message_t *m, const char *name,
                          size_t *len)
{
    rd_kafka_headers_t *h = NULL;
    const void *v = NULL;
    static char buf[8][1024];
    static int next;
    char *b;
    size_t n = 0;

    if (rd_kafka_message_headers(m, &h) != RD_KAFKA_RESP_ERR_NO_ERROR ||
        rd_kafka_header_get_last(h, name, &v, &n) !=
            RD_KAFKA_RESP_ERR_NO_ERROR ||
        v == NULL)
        return NULL;
    b = buf[next++ & 7];
    if (n >= sizeof buf[0])
        n = sizeof buf[0] - 1;
    memcpy(b, v, n);
    b[n] = '\0';
    if (len)
        *len = n;
    return b;
}

static void rfc3339(int64_t ms, char out[64])
{
    time_t s = (time_t)(ms / 1000);
    struct tm tm;

    gmtime_r(&s, &tm);
    snprintf(out, 64, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tm.tm_year + 1900,
             tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
             (int)(ms % 1000));
}

static void check_message(struct checker *k, const rd_kafka_message_t *m,
                          const char *type, int32_t partitions)
{
    const char *id = header(m, "ce_id", NULL);
    const char *seqs = header(m, "ce_subjectseq", NULL);
    const char *epochs = header(m, "ce_subjectepoch", NULL);
    const char *subject = header(m, "ce_subject", NULL);
    exp_subject *s;
    exp_event *e, *prev;
    int64_t seq, epoch;
    char want[512], t[64];
    const char *v;
    rd_kafka_timestamp_type_t tst;

    k->res.messages++;
    if (m->key == NULL || id == NULL || seqs == NULL || subject == NULL) {
        problem(k,
                "record at %s [%d] @%lld lacks key, ce_id, ce_subject or "
                "ce_subjectseq",
                rd_kafka_topic_name(m->rkt), (int)m->partition,
                (long long)m->offset);
        return;
    }
    s = find_subj(k, type, m->key, m->key_len);
    seq = strtoll(seqs, NULL, 10);
    epoch = epochs ? strtoll(epochs, NULL, 10) : 0;
    e = find_event(k, id);
    if (s == NULL || e == NULL || strcmp(e->skey, s->key) != 0) {
        problem(k,
                "record for unknown event %s of %s %.*s: not in the "
                "ledger, e.g. from a rolled-back transaction",
                id, type, (int)m->key_len, (const char *)m->key);
        return;
    }
    if (e->idx < s->last) {
        /* A copy: it must carry the number it first had. */
        if (epoch != e->epoch || seq != e->seq)
            problem(k,
                    "%s: event %s arrived as (%lld, %lld) and again as "
                    "(%lld, %lld): renumbered",
                    s->key, id, (long long)e->epoch, (long long)e->seq,
                    (long long)epoch, (long long)seq);
        k->res.duplicates++;
        return;
    }
    if (e->idx > s->last) {
        /* Ahead of an earlier event: a gap unless the missing events and
         * this one follow in order (then the subject still ends complete,
         * which the final count checks). */
        k->res.ahead++;
        return;
    }
    /* The next event in commit order: the next number of the numbering,
     * or 1 in a numbering with a higher epoch (ce_subjectepoch). */
    prev = e->idx > 0 ? s->events[e->idx - 1] : NULL;
    if (prev == NULL ? seq != 1
                     : !((epoch == prev->epoch && seq == prev->seq + 1) ||
                         (epoch > prev->epoch && seq == 1)))
        problem(k,
                "%s: event %s (#%ld committed) numbered (%lld, %lld) after "
                "(%lld, %lld): order or numbering broken",
                s->key, id, e->idx + 1, (long long)epoch, (long long)seq,
                prev ? (long long)prev->epoch : 0LL,
                prev ? (long long)prev->seq : 0LL);
    e->epoch = epoch;
    e->seq = seq;
    s->last++;
    k->res.unique++;
    /* The record itself, exactly. */
    if (strcmp(subject, e->id) != 0 ||
        (v = header(m, "ce_partitionkey", NULL)) == NULL ||
        strcmp(v, e->id) != 0)
        problem(k, "%s: ce_subject/ce_partitionkey differ from the key",
                s->key);
    if ((v = header(m, "ce_specversion", NULL)) == NULL || strcmp(v, "1.0"))
        problem(k, "%s: ce_specversion %s", s->key, v ? v : "missing");
    if ((v = header(m, "content-type", NULL)) == NULL ||
        strcmp(v, "application/json"))
        problem(k, "%s: content-type %s", s->key, v ? v : "missing");
    if ((v = header(m, "ce_source", NULL)) == NULL || strcmp(v, k->source))
        problem(k, "%s: ce_source %s, expected %s", s->key, v ? v : "missing",
                k->source);
    snprintf(want, sizeof want, "%s%s.%s", k->prefix, e->type, e->action);
    if ((v = header(m, "ce_type", NULL)) == NULL || strcmp(v, want))
        problem(k, "%s: ce_type %s, expected %s", s->key, v ? v : "missing",
                want);
    if ((v = header(m, "ce_subjecttype", NULL)) == NULL || strcmp(v, e->type))
        problem(k, "%s: ce_subjecttype %s", s->key, v ? v : "missing");
    if ((v = header(m, "ce_action", NULL)) == NULL || strcmp(v, e->action))
        problem(k, "%s: ce_action %s", s->key, v ? v : "missing");
    rfc3339(e->occurred, t);
    if ((v = header(m, "ce_time", NULL)) == NULL || strcmp(v, t))
        problem(k, "%s: ce_time %s, expected %s", s->key, v ? v : "missing", t);
    if (rd_kafka_message_timestamp(m, &tst) != e->occurred)
        problem(k, "%s: record timestamp %lld, expected occurred-at %lld",
                s->key, (long long)rd_kafka_message_timestamp(m, &tst),
                (long long)e->occurred);
    if (m->len != strlen(e->payload) ||
        memcmp(m->payload, e->payload, m->len) != 0)
        problem(k, "%s: value differs from the recorded payload", s->key);
    if (m->partition != tu_murmur2_partition(m->key, m->key_len, partitions))
        problem(k, "%s: partition %d, murmur2 says %d", s->key,
                (int)m->partition,
                (int)tu_murmur2_partition(m->key, m->key_len, partitions));
}

void tu_read_topic(tu_cluster *c, const char *topic, tu_record_fn fn, void *ctx)
{
    char group[128];
    rd_kafka_t *rk;
    const struct rd_kafka_metadata *md = NULL;
    rd_kafka_topic_t *rkt;
    rd_kafka_topic_partition_list_t *parts;
    int32_t np;
    int64_t *high, *pos;
    int64_t deadline = tu_now_ms() + 60000;
    int remaining = 0;

    snprintf(group, sizeof group, "%schecker", c->prefix);
    rk = new_client(RD_KAFKA_CONSUMER, c->bootstrap, group);
    rkt = rd_kafka_topic_new(rk, topic, NULL);
    ck_assert_int_eq(rd_kafka_metadata(rk, 0, rkt, &md, 10000), 0);
    ck_assert_int_eq(md->topic_cnt, 1);
    ck_assert_msg(md->topics[0].err == 0, "topic %s: %s", topic,
                  rd_kafka_err2str(md->topics[0].err));
    np = md->topics[0].partition_cnt;
    rd_kafka_metadata_destroy(md);
    rd_kafka_topic_destroy(rkt);
    high = calloc((size_t)np, sizeof *high);
    pos = calloc((size_t)np, sizeof *pos);
    parts = rd_kafka_topic_partition_list_new(np);
    for (int32_t p = 0; p < np; p++) {
        int64_t lo = 0;
        ck_assert_int_eq(rd_kafka_query_watermark_offsets(rk, topic, p, &lo,
                                                          &high[p], 10000),
                         0);
        pos[p] = lo;
        if (high[p] > lo)
            remaining++;
        rd_kafka_topic_partition_list_add(parts, topic, p)->offset =
            RD_KAFKA_OFFSET_BEGINNING;
    }
    ck_assert_int_eq(rd_kafka_assign(rk, parts), 0);
    rd_kafka_topic_partition_list_destroy(parts);
    while (remaining > 0 && tu_now_ms() < deadline) {
        rd_kafka_message_t *m = rd_kafka_consumer_poll(rk, 500);
        if (m == NULL)
            continue;
        if (m->err) {
            rd_kafka_message_destroy(m);
            continue;
        }
        if (m->offset < high[m->partition]) {
            fn(ctx, m, np);
            if (m->offset + 1 >= high[m->partition])
                remaining--;
        }
        rd_kafka_message_destroy(m);
    }
    ck_assert_msg(remaining == 0, "%s: could not read to the end within 60 s",
                  topic);
    free(high);
    free(pos);
    rd_kafka_consumer_close(rk);
    rd_kafka_destroy(rk);
}

struct check_ctx {
    struct checker *k;
    const char *type;
};

static void check_one(void *arg, const rd_kafka_message_t *m,
                      int32_t partitions)
{
    struct check_ctx *cc = arg;

    check_message(cc->k, m, cc->type, partitions);
}

static void consume_topic(struct checker *k, tu_cluster *c, const char *type)
{
    struct check_ctx cc = {k, type};

    tu_read_topic(c, tu_topic(c, type), check_one, &cc);
}

const char *tu_header(const rd_kafka_message_t *m, const char *name)
{
    return header(m, name, NULL);
}

tu_check tu_check_topics(tu_cluster *c, sqlite3 *ledger_db, const char *source,
                         const char *type_prefix)
{
    struct checker k;

    memset(&k, 0, sizeof k);
    k.source = source;
    k.prefix = type_prefix;
    load_ledger(&k, ledger_db);
    for (int i = 0; i < k.ntypes; i++)
        consume_topic(&k, c, k.types[i]);
    for (long i = 0; i < k.nsubj; i++) {
        if (k.subj[i].last != k.subj[i].n)
            problem(&k, "%s: %ld of %ld committed events arrived in order",
                    k.subj[i].key, k.subj[i].last, k.subj[i].n);
        free(k.subj[i].key);
        free(k.subj[i].events);
    }
    for (long i = 0; i < k.nev; i++) {
        free(k.ev[i].event_id);
        free(k.ev[i].type);
        free(k.ev[i].id);
        free(k.ev[i].action);
        free(k.ev[i].payload);
    }
    free(k.ev);
    free(k.by_id);
    free(k.subj);
    free(k.types);
    return k.res;
}

void tu_assert_check_mock_reorder(const tu_check *k)
{
    ck_assert_msg(k->problems == 0, "%ld problems; first: %s", k->problems,
                  k->first_problem);
    ck_assert_msg(k->unique == k->expected,
                  "%ld of %ld committed events arrived in order", k->unique,
                  k->expected);
}

void tu_assert_check(const tu_check *k)
{
    tu_assert_check_mock_reorder(k);
    ck_assert_msg(k->ahead == 0,
                  "%ld records came ahead of an earlier event of their "
                  "subject",
                  k->ahead);
}

void tu_produce_raw(tu_cluster *c, const char *topic, const char *key,
                    const char *value, const char *const *headers)
{
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    rd_kafka_headers_t *h = rd_kafka_headers_new(8);
    char err[256];
    rd_kafka_t *p;

    rd_kafka_conf_set(conf, "bootstrap.servers", c->bootstrap, err, sizeof err);
    p = rd_kafka_new(RD_KAFKA_PRODUCER, conf, err, sizeof err);
    ck_assert_ptr_nonnull(p);
    for (int i = 0; headers && headers[i]; i += 2)
        rd_kafka_header_add(h, headers[i], -1, headers[i + 1], -1);
    ck_assert_int_eq(
        rd_kafka_producev(p, RD_KAFKA_V_TOPIC(topic),
                          RD_KAFKA_V_KEY(key, key ? strlen(key) : 0),
                          RD_KAFKA_V_VALUE((void *)(uintptr_t)value,
                                           value ? strlen(value) : 0),
                          RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
                          RD_KAFKA_V_HEADERS(h), RD_KAFKA_V_END),
        0);
    ck_assert_int_eq(rd_kafka_flush(p, 10000), 0);
    rd_kafka_destroy(p);
}

/* SPDX-License-Identifier: MIT */
/*
 * check_pg_consumer.c -- the consumer on PostgreSQL (de_consumer_open_pg,
 * de_consumer_on_pg): events applied exactly once, in per-subject order,
 * into a read model in the consumer's own PostgreSQL database, with the
 * inbox's rules (duplicates dropped, a reused number parked as a
 * conflict, gaps parked), a failing handler undoing only its own event,
 * handlers by ce_type, and no event lost or applied twice across a
 * consumer killed with SIGKILL, a connection terminated under it or cut
 * during a batch's COMMIT (before and after the commit), consumers of
 * one group sharing the database through rebalances, and a host
 * dropping the consumer's prepared statements.
 *
 * Records are produced with plain librdkafka carrying the ce_ headers
 * (tu_produce_raw) into librdkafka's mock cluster (or the real one
 * KAFKA_BOOTSTRAP_SERVERS names); the server is the suite's throwaway
 * cluster (tests/pg/pgserver.c) or DE_PG_CONNINFO's.  The handler writes
 * one `applied` row per call, so the read model itself shows each
 * event's effects: counted per subject and per ce_id, independently of
 * the inbox.
 */
#include "deliveryevents_pg.h"
#include "kafka.h"
#include "pgledger.h"
#include "pgserver.h"

#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

static const char *conninfo;
static PGconn *conn;

static const char applied_sql[] =
    "CREATE TABLE IF NOT EXISTS applied(n bigserial PRIMARY KEY, "
    "subject_id text, seq bigint, event_id text, payload text, pid int)";

static void setup(void)
{
    conninfo = tpg_fresh_db();
    conn = tpg_connect(conninfo);
    tpg_exec(conn, applied_sql);
}

static void teardown(void)
{
    PQfinish(conn);
    conn = NULL;
}

/* What the handler does besides applying: fail for one subject (at one
 * number, or every one), with a server error or by returning one after
 * its write; or terminate its own backend at the n-th call. */
struct behaviour {
    const char *fail_subject;
    int64_t fail_seq; /* 0: every event of the subject */
    bool sql_error;   /* fail with a failing statement */
    PGconn *killer;   /* terminates the consumer's backend ... */
    int kill_at;      /* ... at this call (1-based; 0: never) */
    int calls;
    int delay_us; /* a slow downstream: so long per event */
    /* Stops (after its write, its transaction open) at the event with
     * this ce_id, or at this call (1-based), until gate is GATE_OPEN. */
    const char *gate_id;
    int gate_call;
    atomic_int gate;
    int tag; /* written as the row's pid when not 0 (threads share one) */
};

enum { GATE_NONE, GATE_WAITING, GATE_OPEN };

/* Runs sql with n parameters v on c; whether it succeeded. */
static bool exec_ok(PGconn *c, const char *sql, int n, const char *const *v)
{
    PGresult *r = PQexecParams(c, sql, n, NULL, v, NULL, NULL, 0);
    bool ok = PQresultStatus(r) == PGRES_COMMAND_OK;

    PQclear(r);
    return ok;
}

static de_err apply(PGconn *c, const de_event_view *ev, void *ctx)
{
    struct behaviour *b = ctx;
    char seq[24], pid[16], sql[128];
    const char *v[5] = {ev->subject_id, seq, ev->event_id, ev->payload, pid};
    PGresult *r;

    snprintf(seq, sizeof seq, "%lld", (long long)ev->subject_seq);
    snprintf(pid, sizeof pid, "%d",
             b != NULL && b->tag != 0 ? b->tag : (int)getpid());
    if (b != NULL)
        b->calls++;
    /* Between the inbox's claim of this event and the handler's write:
     * only one transaction around both keeps the event. */
    if (b != NULL && b->killer != NULL && b->calls == b->kill_at) {
        snprintf(sql, sizeof sql, "SELECT pg_terminate_backend(%d, 10000)",
                 PQbackendPID(c));
        tpg_exec(b->killer, sql);
    }
    if (!exec_ok(c,
                 "INSERT INTO applied(subject_id, seq, event_id, payload, "
                 "pid) VALUES ($1, $2, $3, $4, $5)",
                 5, v))
        return DE_ERR_DB;
    if (b == NULL)
        return DE_OK;
    if (b->delay_us > 0)
        usleep((useconds_t)b->delay_us);
    if ((b->gate_id && strcmp(ev->event_id, b->gate_id) == 0) ||
        b->calls == b->gate_call) {
        atomic_store(&b->gate, GATE_WAITING);
        while (atomic_load(&b->gate) != GATE_OPEN)
            usleep(1000);
    }
    if (b->fail_subject && strcmp(ev->subject_id, b->fail_subject) == 0 &&
        (b->fail_seq == 0 || b->fail_seq == ev->subject_seq)) {
        if (!b->sql_error)
            return DE_ERR_STATE; /* the "downstream" is unavailable */
        r = PQexec(c, "SELECT 1/0");
        PQclear(r);
        return DE_ERR_DB;
    }
    return DE_OK;
}

static de_conf *consumer_conf(const char *bootstrap, const char *prefix,
                              const char *group)
{
    de_conf *conf = de_conf_new();
    char tmpl[128], gid[192];

    snprintf(tmpl, sizeof tmpl, "%s{subject_type}.events", prefix);
    snprintf(gid, sizeof gid, "%s%s", prefix, group);
    de_conf_set_log_cb(conf, tu_log, NULL);
    if (de_conf_set(conf, "bootstrap.servers", bootstrap) != DE_OK ||
        de_conf_set(conf, "group.id", gid) != DE_OK ||
        de_conf_set(conf, "topic.template", tmpl) != DE_OK ||
        de_conf_set(conf, "consumer.retry.backoff.ms", "10") != DE_OK ||
        de_conf_set(conf, "consumer.max.attempts", "3") != DE_OK ||
        de_conf_set(conf, "consumer.batch.size", "20") != DE_OK) {
        de_conf_destroy(conf);
        return NULL;
    }
    return conf;
}

/* With the extra settings kv (key, value, ..., NULL; may be NULL). */
static de_err open_consumer_kv(PGconn *c, const char *bootstrap,
                               const char *prefix, const char *group,
                               const char *const *kv, struct behaviour *b,
                               de_consumer **out)
{
    de_conf *conf = consumer_conf(bootstrap, prefix, group);
    de_err err = DE_OK;

    if (conf == NULL)
        return DE_ERR_CONFIG;
    for (int i = 0; kv && kv[i] && err == DE_OK; i += 2)
        err = de_conf_set(conf, kv[i], kv[i + 1]);
    if (err != DE_OK) {
        de_conf_destroy(conf);
        return err;
    }
    err = de_consumer_open_pg(c, conf, out);
    de_conf_destroy(conf);
    if (err == DE_OK &&
        (err = de_consumer_on_pg(*out, "delivery", NULL, apply, b)) != DE_OK) {
        de_consumer_close(*out);
        *out = NULL;
    }
    return err;
}

static de_err open_consumer(PGconn *c, const char *bootstrap,
                            const char *prefix, const char *group,
                            struct behaviour *b, de_consumer **out)
{
    return open_consumer_kv(c, bootstrap, prefix, group, NULL, b, out);
}

static long long q(const char *sql)
{
    return tpg_int(conn, sql);
}

static long long applied_count(void)
{
    return q("SELECT count(*) FROM applied");
}

/* One short poll, then the stats: for tu_wait_for conditions, so that
 * tests wait for an outcome, never for a guessed number of polls. */
static void poll_stats(de_consumer *c, de_consumer_stats *st)
{
    tu_ok(de_consumer_poll(c, 20, NULL));
    tu_ok(de_consumer_stats_get(c, st));
}

static void poll_until(de_consumer *c, long long want, int timeout_ms)
{
    int64_t deadline = tu_now_ms() + timeout_ms;

    while (applied_count() < want && tu_now_ms() < deadline)
        tu_ok(de_consumer_poll(c, 50, NULL));
    ck_assert_int_eq(applied_count(), want);
}

/* The text of a query's single value (static buffer). */
static const char *text_of(const char *sql)
{
    static char buf[512];
    PGresult *r = PQexec(conn, sql);

    ck_assert_msg(PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) == 1,
                  "%s: %s", sql, PQerrorMessage(conn));
    snprintf(buf, sizeof buf, "%s", PQgetvalue(r, 0, 0));
    PQclear(r);
    return buf;
}

#define OURS(seq, id)                                                          \
    "ce_specversion", "1.0", "ce_id", id, "ce_source", "/test", "ce_type",     \
        "delivery.assigned", "ce_subjectseq", seq, "ce_subjecttype",           \
        "delivery", "ce_action", "assigned"

/* Event number seq of subject (ce_id "<subject>-<seq>"). */
static void produce(tu_cluster *c, const char *subject, int seq)
{
    char id[64], s[16], payload[64];
    const char *h[] = {OURS(s, id), NULL};

    snprintf(id, sizeof id, "%s-%d", subject, seq);
    snprintf(s, sizeof s, "%d", seq);
    snprintf(payload, sizeof payload, "{\"n\":%d}", seq);
    tu_produce_raw(c, tu_topic(c, "delivery"), subject, payload, h);
}

START_TEST(test_open_and_registration)
{
    tu_cluster *c = tu_cluster_new(0, 1);
    de_conf *conf = consumer_conf(c->bootstrap, c->prefix, "g");
    de_consumer *con = NULL, *lite = NULL;
    char *dir = tu_mkdtemp();
    sqlite3 *db = tu_open(tu_path(dir, "c.db"));

    /* Refusals write nothing. */
    tu_assert_err(de_consumer_open_pg(NULL, conf, &con), DE_ERR_ARG,
                  "connection");
    tpg_exec(conn, "BEGIN");
    tu_assert_err(de_consumer_open_pg(conn, conf, &con), DE_ERR_STATE,
                  "inside a transaction");
    ck_assert_ptr_null(con);
    tpg_exec(conn, "ROLLBACK");
    ck_assert_int_eq(q("SELECT count(*) FROM pg_namespace WHERE nspname = "
                       "'deliveryevents'"),
                     0);
    tu_ok(de_consumer_open_pg(conn, conf, &con));
    ck_assert_int_eq(q("SELECT value::int FROM deliveryevents.meta WHERE key "
                       "= 'inbox_schema_version'"),
                     1);
    /* Each kind registers with its own function. */
    tu_assert_err(de_consumer_on(con, "delivery", NULL, NULL, NULL), DE_ERR_ARG,
                  "fn");
    tu_assert_err(de_consumer_on(con, "delivery", NULL,
                                 (de_handler_fn)(void (*)(void))apply, NULL),
                  DE_ERR_ARG, "use de_consumer_on_pg");
    tu_assert_err(de_consumer_on_type(con, "delivery.assigned",
                                      (de_handler_fn)(void (*)(void))apply,
                                      NULL),
                  DE_ERR_ARG, "use de_consumer_on_type_pg");
    tu_assert_err(de_consumer_on_type_pg(con, "delivery.assigned", NULL, NULL),
                  DE_ERR_ARG, "fn");
    tu_assert_err(de_consumer_on_type_pg(con, "", apply, NULL), DE_ERR_ARG,
                  "ce_type ''");
    tu_assert_err(de_consumer_on_type_pg(con, "x\ny", apply, NULL), DE_ERR_ARG,
                  "ce_type");
    tu_ok(de_consumer_on_type_pg(con, "delivery.assigned", apply, NULL));
    tu_assert_err(de_consumer_on_type_pg(con, "delivery.assigned", apply, NULL),
                  DE_ERR_ARG, "already registered");
    tu_assert_err(de_consumer_on_pg(con, "bad type", NULL, apply, NULL),
                  DE_ERR_ARG, "'bad type'");
    tu_ok(de_consumer_on_pg(con, "delivery", NULL, apply, NULL));
    tu_assert_err(de_consumer_on_pg(con, "delivery", NULL, apply, NULL),
                  DE_ERR_ARG, "already registered");
    tu_ok(de_consumer_open(db, conf, &lite));
    tu_assert_err(de_consumer_on_pg(lite, "delivery", NULL, apply, NULL),
                  DE_ERR_ARG, "use de_consumer_on");
    tu_assert_err(
        de_consumer_on_type_pg(lite, "delivery.assigned", apply, NULL),
        DE_ERR_ARG, "use de_consumer_on_type");
    ck_assert_ptr_null(strstr(de_errmsg(), "use de_consumer_on_type_pg"));
    tu_ok(de_consumer_close(lite));
    tu_ok(de_consumer_close(con));
    /* A second open finds the tables. */
    tu_ok(de_consumer_open_pg(conn, conf, &con));
    tu_ok(de_consumer_close(con));
    sqlite3_close(db);
    tu_rmdir(dir);
    de_conf_destroy(conf);
    tu_cluster_destroy(c);
}
END_TEST

/* In order, each once; a true copy (same number, same ce_id) dropped. */
START_TEST(test_in_order_and_duplicates)
{
    tu_cluster *c = tu_cluster_new(_i, 1);
    de_consumer *con = NULL;
    de_consumer_stats st;
    const char *uuid[] = {OURS("1", "0190a4c2-7b1e-7c3d-8e4f-a1b2c3d4e5f6"),
                          NULL};

    tu_topic_create(c, "delivery", 2);
    for (int i = 1; i <= 3; i++)
        produce(c, "D-1", i);
    produce(c, "D-1", 2); /* a resend */
    produce(c, "D-1", 4);
    produce(c, "D-2", 1);
    produce(c, "D-2", 2);
    tu_produce_raw(c, tu_topic(c, "delivery"), "U-1", "{}", uuid);
    tu_ok(open_consumer(conn, c->bootstrap, c->prefix, "g", NULL, &con));
    poll_until(con, 7, 30000);
    ck_assert(tu_wait_for((poll_stats(con, &st), st.duplicates == 1), 10000));
    ck_assert_uint_eq(st.applied, 7);
    ck_assert_str_eq(text_of("SELECT string_agg(event_id || ':' || seq, ',' "
                             "ORDER BY n) FROM applied WHERE subject_id = "
                             "'D-1'"),
                     "D-1-1:1,D-1-2:2,D-1-3:3,D-1-4:4");
    ck_assert_str_eq(text_of("SELECT string_agg(payload, ',' ORDER BY n) FROM "
                             "applied WHERE subject_id = 'D-2'"),
                     "{\"n\":1},{\"n\":2}");
    ck_assert_int_eq(q("SELECT last_seq FROM deliveryevents.inbox WHERE "
                       "subject_id = 'D-1' AND last_event_id = 'D-1-4'"),
                     4);
    /* A canonical UUID is kept as one. */
    ck_assert_int_eq(q("SELECT count(*) FROM deliveryevents.inbox WHERE "
                       "subject_id = 'U-1' AND last_event_id IS NULL AND "
                       "last_event_uuid = "
                       "'0190a4c2-7b1e-7c3d-8e4f-a1b2c3d4e5f6'"),
                     1);
    /* Read again from the start (a new member of the group after a lost
     * offset commit): every record is a duplicate now. */
    tu_ok(de_consumer_close(con));
    tpg_exec(conn, "SELECT 1"); /* the connection is idle and usable */
    tu_ok(open_consumer(conn, c->bootstrap, c->prefix, "g-again", NULL, &con));
    ck_assert(tu_wait_for((poll_stats(con, &st), st.duplicates == 8), 30000));
    ck_assert_uint_eq(st.applied, 0);
    ck_assert_int_eq(applied_count(), 7);
    tu_ok(de_consumer_close(con));
    tu_cluster_destroy(c);
}
END_TEST

/* Two events with one number: the second is a conflict, its subject
 * parked, never dropped as a duplicate; release applies it. */
START_TEST(test_conflict_parks)
{
    tu_cluster *c = tu_cluster_new(_i, 1);
    de_consumer *con = NULL;
    de_consumer_stats st;
    const char *topic;
    const char *h1[] = {OURS("1", "c-1"), NULL};
    const char *h2[] = {OURS("2", "c-2"), NULL};
    const char *h2other[] = {OURS("2", "c-2b"), NULL};
    const char *h3[] = {OURS("3", "c-3"), NULL};

    tu_topic_create(c, "delivery", 1);
    topic = tu_topic(c, "delivery");
    tu_produce_raw(c, topic, "C-1", "{}", h1);
    tu_produce_raw(c, topic, "C-1", "{}", h2);
    tu_produce_raw(c, topic, "C-1", "{}", h2);
    tu_produce_raw(c, topic, "C-1", "{}", h2other);
    tu_produce_raw(c, topic, "C-1", "{}", h3);
    tu_ok(open_consumer(conn, c->bootstrap, c->prefix, "g", NULL, &con));
    ck_assert(tu_wait_for(
        (poll_stats(con, &st),
         q("SELECT count(*) FROM deliveryevents.inbox_dead_letter WHERE kind "
           "= 'waiting' AND event_id = 'c-3'") == 1),
        30000));
    ck_assert_uint_eq(st.applied, 2);
    ck_assert_uint_eq(st.duplicates, 1);
    ck_assert_uint_eq(st.parked_subjects, 1);
    ck_assert_int_eq(q("SELECT count(*) FROM deliveryevents.inbox_dead_letter "
                       "WHERE kind = 'conflict' AND seq = 2 AND event_id = "
                       "'c-2b' AND error LIKE '%applied as event c-2,%'"),
                     1);
    ck_assert_int_eq(applied_count(), 2);
    tu_ok(de_consumer_release(con, "delivery", "C-1"));
    ck_assert_str_eq(
        text_of("SELECT string_agg(event_id, ',' ORDER BY n) FROM applied"),
        "c-1,c-2,c-2b,c-3");
    ck_assert_int_eq(q("SELECT count(*) FROM deliveryevents.inbox WHERE "
                       "parked"),
                     0);
    tu_ok(de_consumer_close(con));
    tu_cluster_destroy(c);
}
END_TEST

/* A gap parks the subject (consumer.on.gap = park); the missing event,
 * arriving later, fills it and both apply in order. */
START_TEST(test_gap)
{
    tu_cluster *c = tu_cluster_new(_i, 1);
    de_consumer *con = NULL;
    de_consumer_stats st;

    tu_topic_create(c, "delivery", 1);
    produce(c, "G-1", 1);
    produce(c, "G-1", 2);
    produce(c, "G-1", 4);
    tu_ok(open_consumer(conn, c->bootstrap, c->prefix, "g", NULL, &con));
    ck_assert(tu_wait_for((poll_stats(con, &st), st.gaps == 1), 30000));
    ck_assert_int_eq(applied_count(), 2);
    ck_assert_int_eq(q("SELECT count(*) FROM deliveryevents.inbox_dead_letter "
                       "WHERE kind = 'gap' AND seq = 4 AND state = 'parked'"),
                     1);
    ck_assert_int_eq(q("SELECT count(*) FROM deliveryevents.inbox WHERE "
                       "subject_id = 'G-1' AND parked AND last_seq = 2"),
                     1);
    produce(c, "G-1", 3);
    poll_until(con, 4, 30000);
    ck_assert_str_eq(
        text_of("SELECT string_agg(seq::text, ',' ORDER BY n) FROM applied"),
        "1,2,3,4");
    ck_assert(tu_wait_for(
        (poll_stats(con, &st), q("SELECT count(*) FROM deliveryevents.inbox "
                                 "WHERE parked") == 0),
        10000));
    tu_ok(de_consumer_close(con));
    tu_cluster_destroy(c);
}
END_TEST

/* A handler by ce_type: writes "type:<ce_type>" as the payload, and
 * refuses to run outside the consumer's transaction. */
static de_err apply_typed(PGconn *c, const de_event_view *ev, void *ctx)
{
    int *calls = ctx;
    char seq[24];
    const char *v[4] = {ev->subject_id, seq, ev->event_id, ev->type};

    if (PQtransactionStatus(c) != PQTRANS_INTRANS)
        return DE_ERR_STATE;
    (*calls)++;
    snprintf(seq, sizeof seq, "%lld", (long long)ev->subject_seq);
    return exec_ok(c,
                   "INSERT INTO applied(subject_id, seq, event_id, payload) "
                   "VALUES ($1, $2, $3, 'type:' || $4)",
                   4, v)
               ? DE_OK
               : DE_ERR_DB;
}

/* Handlers by ce_type (de_consumer_on_type_pg) beside one by subject
 * type: the one by ce_type wins for its type, in the consumer's
 * transaction, for numbered events of ours and for another producer's
 * events without numbers (applied once per ce_id; a type without a
 * handler is taken and ignored). */
START_TEST(test_on_type)
{
    tu_cluster *c = tu_cluster_new(_i, 1);
    char topics[512], rider[256];
    const char *kv[] = {"consumer.topics", topics, NULL};
    const char *picked[] = {
        "ce_specversion", "1.0",   "ce_id",   "D-1-2",
        "ce_source",      "/test", "ce_type", "delivery.picked-up",
        "ce_subjectseq",  "2",     NULL};
#define SHIFT(id, type)                                                        \
    (const char *[]){"ce_specversion",                                         \
                     "1.0",                                                    \
                     "ce_id",                                                  \
                     id,                                                       \
                     "ce_source",                                              \
                     "/rider",                                                 \
                     "ce_type",                                                \
                     "com.example.rider.Shift-" type,                          \
                     NULL}
    de_consumer *con = NULL;
    de_consumer_stats st;
    int typed = 0;

    tu_topic_create(c, "delivery", 1);
    tu_topic_create(c, "rider", 1);
    snprintf(rider, sizeof rider, "%s", tu_topic(c, "rider"));
    snprintf(topics, sizeof topics, "%s,%s", tu_topic(c, "delivery"), rider);
    produce(c, "D-1", 1);
    tu_produce_raw(c, tu_topic(c, "delivery"), "D-1", "{\"n\":2}", picked);
    produce(c, "D-1", 3);
    tu_produce_raw(c, rider, "R-1", "{}", SHIFT("r-1", "Started"));
    tu_produce_raw(c, rider, "R-1", "{}", SHIFT("r-2", "Started"));
    tu_produce_raw(c, rider, "R-1", "{}", SHIFT("r-1", "Started"));
    tu_produce_raw(c, rider, "R-1", "{}", SHIFT("r-3", "Ended"));
#undef SHIFT
    tu_ok(open_consumer_kv(conn, c->bootstrap, c->prefix, "g", kv, NULL, &con));
    tu_ok(
        de_consumer_on_type_pg(con, "delivery.assigned", apply_typed, &typed));
    tu_ok(de_consumer_on_type_pg(con, "com.example.rider.Shift-Started",
                                 apply_typed, &typed));
    /* The last record read (r-3, no handler) leaves its id behind. */
    ck_assert(tu_wait_for(
        (poll_stats(con, &st),
         q("SELECT count(*) FROM deliveryevents.inbox_id WHERE source = "
           "'/rider' AND event_id = 'r-3'") == 1 &&
             q("SELECT count(*) FROM deliveryevents.inbox WHERE subject_id = "
               "'D-1' AND last_seq = 3") == 1),
        30000));
    ck_assert_uint_ge(st.duplicates, 1);
    ck_assert_uint_eq(st.parked_subjects, 0);
    ck_assert_int_eq(typed, 4);
    ck_assert_int_eq(applied_count(), 5);
    ck_assert_str_eq(text_of("SELECT string_agg(event_id || '=' || payload, "
                             "',' ORDER BY n) FROM applied WHERE subject_id = "
                             "'D-1'"),
                     "D-1-1=type:delivery.assigned,D-1-2={\"n\":2},"
                     "D-1-3=type:delivery.assigned");
    ck_assert_str_eq(text_of("SELECT string_agg(event_id || '=' || payload, "
                             "',' ORDER BY n) FROM applied WHERE subject_id = "
                             "'R-1'"),
                     "r-1=type:com.example.rider.Shift-Started,"
                     "r-2=type:com.example.rider.Shift-Started");
    tu_assert_err(de_consumer_on_type_pg(con, "com.example.rider.Shift-Ended",
                                         apply_typed, &typed),
                  DE_ERR_STATE, "after the first de_consumer_poll");
    tu_ok(de_consumer_close(con));
    tu_cluster_destroy(c);
}
END_TEST

/* A failing handler (a failed statement, which aborts PostgreSQL's
 * transaction, or an error returned after its write) undoes only its own
 * event: its write and the inbox stay as before, the other events of the
 * batch are applied; after consumer.max.attempts it is dead-lettered and
 * its subject parked, behind it its later events. */
START_TEST(test_handler_failure_rolls_back_only_its_event)
{
    tu_cluster *c = tu_cluster_new(tu_cluster_first(), 1);
    struct behaviour b = {
        .fail_subject = "F-1", .fail_seq = 2, .sql_error = _i == 0};
    de_consumer *con = NULL;
    de_consumer_stats st;

    tu_topic_create(c, "delivery", 1);
    /* One partition: one batch holds them all, interleaved. */
    for (int i = 1; i <= 3; i++) {
        produce(c, "OK-1", i);
        produce(c, "F-1", i);
    }
    tu_ok(open_consumer(conn, c->bootstrap, c->prefix, "g", &b, &con));
    ck_assert(tu_wait_for(
        (poll_stats(con, &st),
         st.parked_subjects == 1 && q("SELECT count(*) FROM "
                                      "deliveryevents.inbox_dead_letter WHERE "
                                      "event_id = 'F-1-3'") == 1),
        30000));
    ck_assert_str_eq(text_of("SELECT string_agg(event_id, ',' ORDER BY n) "
                             "FROM applied"),
                     "OK-1-1,F-1-1,OK-1-2,OK-1-3");
    ck_assert_int_eq(q("SELECT last_seq FROM deliveryevents.inbox WHERE "
                       "subject_id = 'F-1'"),
                     1);
    ck_assert_int_eq(q("SELECT last_seq FROM deliveryevents.inbox WHERE "
                       "subject_id = 'OK-1'"),
                     3);
    ck_assert_int_eq(q("SELECT count(*) FROM deliveryevents.inbox_dead_letter "
                       "WHERE event_id = 'F-1-2' AND kind = 'failed' AND "
                       "attempts >= 3 AND state = 'parked'"),
                     1);
    ck_assert_int_eq(q("SELECT count(*) FROM deliveryevents.inbox_dead_letter "
                       "WHERE event_id = 'F-1-3' AND kind = 'waiting'"),
                     1);
    /* The downstream is back: release applies both, in order. */
    b.fail_subject = NULL;
    tu_ok(de_consumer_release(con, "delivery", "F-1"));
    ck_assert_str_eq(text_of("SELECT string_agg(event_id, ',' ORDER BY n) "
                             "FROM applied WHERE subject_id = 'F-1'"),
                     "F-1-1,F-1-2,F-1-3");
    tu_ok(de_consumer_close(con));
    tu_cluster_destroy(c);
}
END_TEST

/* The housekeeping statements: idle subjects forgotten (never a parked
 * one), a release asked from outside the process (a row of
 * inbox_request) served by the running consumer, and dead letters that
 * park nothing any more deleted after consumer.dead.letter.retention.ms. */
START_TEST(test_forget_and_requests)
{
    tu_cluster *c = tu_cluster_new(_i, 1);
    const char *kv[] = {"consumer.subject.forget.ms", "1",
                        "consumer.dead.letter.retention.ms", "1", NULL};
    de_consumer *con = NULL;
    de_consumer_stats st;

    tu_topic_create(c, "delivery", 1);
    produce(c, "D-1", 1);
    produce(c, "D-1", 2);
    produce(c, "G-1", 1);
    produce(c, "G-1", 3);
    tu_ok(open_consumer_kv(conn, c->bootstrap, c->prefix, "g", kv, NULL, &con));
    ck_assert(tu_wait_for(
        (poll_stats(con, &st),
         st.gaps == 1 && q("SELECT count(*) FROM deliveryevents.inbox WHERE "
                           "subject_id = 'D-1'") == 0),
        30000));
    ck_assert_uint_ge(st.forgotten, 1);
    ck_assert_int_eq(q("SELECT count(*) FROM deliveryevents.inbox WHERE "
                       "subject_id = 'G-1' AND parked"),
                     1);
    tpg_exec(conn, "INSERT INTO deliveryevents.inbox_request(subject_type, "
                   "subject_id, action, requested_at_ms) VALUES ('delivery', "
                   "'G-1', 'release', 0)");
    ck_assert(
        tu_wait_for((poll_stats(con, &st),
                     q("SELECT count(*) FROM deliveryevents.inbox_request "
                       "WHERE done_at_ms IS NOT NULL AND result <> ''") == 1),
                    30000));
    ck_assert_str_eq(text_of("SELECT string_agg(event_id, ',' ORDER BY n) "
                             "FROM applied WHERE subject_id = 'G-1'"),
                     "G-1-1,G-1-3");
    ck_assert(tu_wait_for(
        (poll_stats(con, &st),
         q("SELECT count(*) FROM deliveryevents.inbox_dead_letter") == 0),
        30000));
    tu_ok(de_consumer_close(con));
    tu_cluster_destroy(c);
}
END_TEST

/* Every subject's events applied exactly once, in order: the read
 * model's rows against what was produced. */
static void assert_exactly_once(int subjects, int per)
{
    ck_assert_int_eq(applied_count(), (long long)subjects * per);
    ck_assert_int_eq(q("SELECT count(DISTINCT event_id) FROM applied"),
                     (long long)subjects * per);
    ck_assert_int_eq(q("SELECT count(*) FROM (SELECT subject_id, count(*) AS "
                       "k, max(seq) AS m FROM applied GROUP BY subject_id) x "
                       "WHERE k = m"),
                     subjects);
    /* In order: each row's number is one more than the subject's row
     * before it. */
    ck_assert_int_eq(q("SELECT count(*) FROM (SELECT seq, lag(seq) OVER "
                       "(PARTITION BY subject_id ORDER BY n) AS prev FROM "
                       "applied) x WHERE seq <> coalesce(prev, 0) + 1"),
                     0);
}

static void produce_many(tu_cluster *c, int subjects, int per)
{
    char subject[16];

    for (int i = 1; i <= per; i++)
        for (int s = 0; s < subjects; s++) {
            snprintf(subject, sizeof subject, "S-%02d", s);
            produce(c, subject, i);
        }
}

/* The consumer's backend terminated in the middle of a batch (by its
 * handler, from another connection): poll returns DE_ERR_DB, the host
 * resets the connection, and the batch is read again -- nothing applied
 * twice, nothing lost. */
START_TEST(test_connection_terminated)
{
    tu_cluster *c = tu_cluster_new(_i, 1);
    struct behaviour b = {.kill_at = 30};
    de_consumer *con = NULL;
    int64_t deadline;
    int db_errors = 0;

    b.killer = tpg_connect(conninfo);
    tu_topic_create(c, "delivery", 2);
    produce_many(c, 8, 10);
    tu_ok(open_consumer(conn, c->bootstrap, c->prefix, "g", &b, &con));
    deadline = tu_now_ms() + 60000;
    while (applied_count() < 80 && tu_now_ms() < deadline) {
        de_err err = de_consumer_poll(con, 50, NULL);
        if (err == DE_OK)
            continue;
        ck_assert_msg(err == DE_ERR_DB, "%s", de_errmsg());
        db_errors++;
        ck_assert_int_eq(PQstatus(conn), CONNECTION_BAD);
        PQreset(conn);
        ck_assert_int_eq(PQstatus(conn), CONNECTION_OK);
    }
    ck_assert_int_ge(db_errors, 1);
    ck_assert_int_eq(b.calls >= 30, 1);
    assert_exactly_once(8, 10);
    tu_ok(de_consumer_close(con));
    PQfinish(b.killer);
    tu_cluster_destroy(c);
}
END_TEST

/* The consumer's backend terminated while it has nothing to apply: a
 * poll still says so (DE_ERR_DB), as with a batch, so
 * that the host resets the connection now -- not only when the next event
 * comes, with the consumer's upkeep (release requests, forgetting)
 * failing on the dead connection meanwhile.  After the reset, what comes
 * is applied. */
START_TEST(test_connection_terminated_while_idle)
{
    tu_cluster *c = tu_cluster_new(_i, 1);
    PGconn *killer = tpg_connect(conninfo);
    de_consumer *con = NULL;
    de_err err = DE_OK;
    char sql[100];

    tu_topic_create(c, "delivery", 1);
    produce(c, "I-1", 1);
    tu_ok(open_consumer(conn, c->bootstrap, c->prefix, "g", NULL, &con));
    ck_assert(tu_wait_for(de_consumer_poll(con, 50, NULL) == DE_OK &&
                              applied_count() == 1,
                          60000));
    snprintf(sql, sizeof sql, "SELECT pg_catalog.pg_terminate_backend(%d)::int",
             PQbackendPID(conn));
    ck_assert_int_eq(tpg_int(killer, sql), 1);
    err = DE_OK;
    ck_assert_msg(
        tu_wait_for((err = de_consumer_poll(con, 50, NULL)) != DE_OK, 20000),
        "polls on a terminated connection went on returning DE_OK");
    ck_assert_msg(err == DE_ERR_DB, "%s: %s", de_err_name(err), de_errmsg());
    ck_assert_int_eq(PQstatus(conn), CONNECTION_BAD);
    PQreset(conn);
    ck_assert_int_eq(PQstatus(conn), CONNECTION_OK);
    produce(c, "I-1", 2);
    ck_assert(tu_wait_for(de_consumer_poll(con, 50, NULL) == DE_OK &&
                              applied_count() == 2,
                          60000));
    tu_ok(de_consumer_close(con));
    PQfinish(killer);
    tu_cluster_destroy(c);
}
END_TEST

/* The host (or a pooler resetting sessions) drops the consumer's
 * prepared statements on its connection between polls -- DEALLOCATE ALL,
 * DISCARD ALL, one of them -- and polls on: no poll fails, each applies
 * what came, and the counters (read outside a transaction) too. */
START_TEST(test_host_deallocates)
{
    static const char *const resets[] = {"DEALLOCATE ALL", "DISCARD ALL",
                                         "DEALLOCATE deliveryevents_inbox_3"};
    tu_cluster *c = tu_cluster_new(_i, 1);
    de_consumer *con = NULL;
    de_consumer_stats st;

    tu_topic_create(c, "delivery", 1);
    produce(c, "P-1", 1);
    tu_ok(open_consumer(conn, c->bootstrap, c->prefix, "g", NULL, &con));
    poll_until(con, 1, 30000); /* every poll must return DE_OK */
    for (int i = 0; i < (int)(sizeof resets / sizeof *resets); i++) {
        tpg_exec(conn, resets[i]);
        produce(c, "P-1", i + 2);
        poll_until(con, i + 2, 30000);
    }
    tpg_exec(conn, "DEALLOCATE ALL");
    tu_ok(de_consumer_stats_get(con, &st));
    ck_assert_uint_eq(st.parked_subjects, 0);
    ck_assert_str_eq(text_of("SELECT string_agg(seq::text, ',' ORDER BY n) "
                             "FROM applied"),
                     "1,2,3,4");
    tu_ok(de_consumer_close(con));
    tu_cluster_destroy(c);
}
END_TEST

/* ---- consumers sharing the database --------------------------------- */

/* A consumer polling on a thread of its own, with its own connection,
 * until told to stop.  No Check assertion runs on it: what it did is
 * read back from the database and its counters after the join. */
struct runner {
    pthread_t thread;
    PGconn *conn;
    de_consumer *con;
    atomic_bool stop;
    atomic_int failed_polls; /* DE_ERR_DB and the like: polled again */
};

static void *runner_main(void *arg)
{
    struct runner *r = arg;

    while (!atomic_load(&r->stop))
        if (de_consumer_poll(r->con, 50, NULL) != DE_OK) {
            atomic_fetch_add(&r->failed_polls, 1);
            if (PQstatus(r->conn) == CONNECTION_BAD)
                PQreset(r->conn);
        }
    return NULL;
}

static void runner_start(struct runner *r, tu_cluster *c, const char *group,
                         const char *const *kv, struct behaviour *b)
{
    r->conn = tpg_connect(conninfo);
    atomic_store(&r->stop, false);
    atomic_store(&r->failed_polls, 0);
    tu_ok(open_consumer_kv(r->conn, c->bootstrap, c->prefix, group, kv, b,
                           &r->con));
    ck_assert_int_eq(pthread_create(&r->thread, NULL, runner_main, r), 0);
}

/* Stops it and closes it (leaving the group). */
static void runner_stop(struct runner *r)
{
    atomic_store(&r->stop, true);
    ck_assert_int_eq(pthread_join(r->thread, NULL), 0);
    tu_ok(de_consumer_close(r->con));
    PQfinish(r->conn);
    r->conn = NULL;
}

/* Opens *gate once the backend `waiter` waits for a lock held by
 * `holder` (0: by anyone), or after 60 s; *seen says whether it did. */
struct opener {
    pthread_t thread;
    int waiter, holder;
    atomic_int *gate;
    atomic_bool seen;
};

static void *opener_main(void *arg)
{
    struct opener *o = arg;
    PGconn *c = PQconnectdb(conninfo);
    char sql[160];
    int64_t deadline = tu_now_ms() + 60000;

    snprintf(sql, sizeof sql,
             "SELECT count(*) FROM unnest(pg_blocking_pids(%d)) p WHERE %d "
             "IN (0, p)",
             o->waiter, o->holder);
    while (PQstatus(c) == CONNECTION_OK && tu_now_ms() < deadline) {
        PGresult *r = PQexec(c, sql);
        bool waits = PQresultStatus(r) == PGRES_TUPLES_OK &&
                     atoll(PQgetvalue(r, 0, 0)) > 0;
        PQclear(r);
        if (waits) {
            atomic_store(&o->seen, true);
            break;
        }
        usleep(5000);
    }
    PQfinish(c);
    atomic_store(o->gate, GATE_OPEN);
    return NULL;
}

static void opener_start(struct opener *o, int waiter, int holder,
                         atomic_int *gate)
{
    o->waiter = waiter;
    o->holder = holder;
    o->gate = gate;
    atomic_store(&o->seen, false);
    ck_assert_int_eq(pthread_create(&o->thread, NULL, opener_main, o), 0);
}

/* The read model against the inbox: every subject's rows 1..n in order,
 * each once, nothing parked, no dead letter. */
static void assert_clean_exactly_once(long long events, int subjects)
{
    assert_exactly_once(subjects, (int)(events / subjects));
    ck_assert_int_eq(q("SELECT count(*) FROM deliveryevents.inbox i JOIN "
                       "(SELECT subject_id, max(seq) AS m FROM applied GROUP "
                       "BY subject_id) a USING (subject_id) WHERE i.last_seq "
                       "= a.m AND NOT i.parked"),
                     subjects);
    ck_assert_int_eq(q("SELECT count(*) FROM deliveryevents.inbox_dead_letter"),
                     0);
}

/* A retry runs in careful mode (the handler in a savepoint) while a
 * consumer of another group on the same database holds the same event
 * claimed in its open transaction -- as two members of one group do when
 * a partition moves while its old owner is still applying it.  The
 * retry must wait for the other's commit and find the event taken; a
 * classification read instead sees the subject as it was before the
 * other's commit and applies the event a second time. */
START_TEST(test_careful_race)
{
    tu_cluster *c = tu_cluster_new(_i, 1);
    struct behaviour ba = {.fail_subject = "R-1"};
    struct behaviour bb = {.gate_id = "R-1-1", .tag = 2};
    const char *kv[] = {"consumer.max.attempts", "1000", NULL};
    struct runner rb = {0};
    struct opener op;
    de_consumer *a = NULL;
    de_consumer_stats st;

    tu_topic_create(c, "delivery", 1);
    for (int i = 1; i <= 3; i++)
        produce(c, "R-1", i);
    /* A's handler fails for R-1: its events wait for a retry. */
    tu_ok(open_consumer_kv(conn, c->bootstrap, c->prefix, "a", kv, &ba, &a));
    ck_assert(tu_wait_for((poll_stats(a, &st), st.retries >= 1), 30000));
    ck_assert_int_eq(applied_count(), 0);
    /* B, on the same database, claims R-1-1 and stops in its handler. */
    runner_start(&rb, c, "b", NULL, &bb);
    ck_assert(tu_wait_for(atomic_load(&bb.gate) == GATE_WAITING, 30000));
    /* A's retry would succeed now; B goes on once A waits for it. */
    ba.fail_subject = NULL;
    opener_start(&op, PQbackendPID(conn), PQbackendPID(rb.conn), &bb.gate);
    ck_assert(tu_wait_for((poll_stats(a, &st), st.applied + st.duplicates >= 3),
                          60000));
    ck_assert_int_eq(pthread_join(op.thread, NULL), 0);
    ck_assert_msg(atomic_load(&op.seen), "A never waited for B");
    ck_assert(tu_wait_for(q("SELECT count(*) FROM deliveryevents.inbox WHERE "
                            "subject_id = 'R-1' AND last_seq = 3") == 1,
                          30000));
    runner_stop(&rb);
    /* R-1-1 was B's; what B's batch held too came to A as duplicates,
     * the rest A applied: each once, in order. */
    ck_assert_uint_ge(st.duplicates, 1);
    ck_assert_uint_eq(st.applied + st.duplicates, 3);
    ck_assert_str_eq(text_of("SELECT string_agg(event_id, ',' ORDER BY n) "
                             "FROM applied"),
                     "R-1-1,R-1-2,R-1-3");
    ck_assert_int_eq(q("SELECT pid FROM applied WHERE event_id = 'R-1-1'"), 2);
    tu_ok(de_consumer_close(a));
    tu_cluster_destroy(c);
}
END_TEST

/* One round of events: the next number of each of n subjects. */
static void produce_round(tu_cluster *c, int *next, int n)
{
    char subject[16];

    for (int s = 0; s < n; s++) {
        snprintf(subject, sizeof subject, "S-%02d", s);
        produce(c, subject, ++next[s]);
    }
}

/* Produces a round and waits until everything produced is applied;
 * whether it was within 30 s. */
static bool round_applied(tu_cluster *c, int *next, int n, long long *produced)
{
    produce_round(c, next, n);
    *produced += n;
    return tu_wait_for(applied_count() == *produced, 30000);
}

/* Members of one group sharing the database through rebalances: A stops
 * in the middle of a batch (its transaction open) longer than
 * max.poll.interval.ms, so the group takes its partitions from it and B
 * reads, from their committed offsets, the events A holds claimed; B
 * waits for A's rows (seen in pg_blocking_pids) until A is let go. A
 * commits, rejoins, and later a third member joins while events keep
 * coming.  Every event is applied exactly once, in order, nothing is
 * parked. */
START_TEST(test_rebalance)
{
    enum { SUBJECTS = 16, FIRST_ROUNDS = 10 };
    tu_cluster *c = tu_cluster_new(_i, 1);
    const char *kv[] = {"max.poll.interval.ms", "6000", NULL};
    struct behaviour b[3] = {{0}};
    struct runner r[3] = {{0}};
    struct opener op;
    int next[SUBJECTS] = {0};
    long long produced;
    char sql[96];

    tu_topic_create(c, "delivery", 4);
    for (int i = 0; i < FIRST_ROUNDS; i++)
        produce_round(c, next, SUBJECTS);
    produced = (long long)SUBJECTS * FIRST_ROUNDS;
    for (int i = 0; i < 3; i++) {
        b[i].delay_us = 5000;
        b[i].tag = i + 1;
    }
    b[0].gate_call = 12; /* A stops at its 12th event */
    runner_start(&r[0], c, "g", kv, &b[0]);
    runner_start(&r[1], c, "g", kv, &b[1]);
    ck_assert(tu_wait_for(atomic_load(&b[0].gate) == GATE_WAITING, 60000));
    /* Past max.poll.interval.ms A is out of the group; B takes its
     * partitions and waits for A's claims. */
    opener_start(&op, PQbackendPID(r[1].conn), PQbackendPID(r[0].conn),
                 &b[0].gate);
    ck_assert_int_eq(pthread_join(op.thread, NULL), 0);
    ck_assert_msg(atomic_load(&op.seen), "B never waited for A's claims");
    ck_assert(tu_wait_for(applied_count() == produced, 60000));
    /* A is back in the group: it applies again. */
    snprintf(sql, sizeof sql, "SELECT count(*) FROM applied WHERE pid = 1");
    {
        long long before = q(sql);
        ck_assert(tu_wait_for(round_applied(c, next, SUBJECTS, &produced) &&
                                  q(sql) > before,
                              60000));
    }
    /* A third member joins and takes a share. */
    runner_start(&r[2], c, "g", kv, &b[2]);
    ck_assert(
        tu_wait_for(round_applied(c, next, SUBJECTS, &produced) &&
                        q("SELECT count(*) FROM applied WHERE pid = 3") > 0,
                    60000));
    for (int i = 0; i < 3; i++)
        runner_stop(&r[i]);
    assert_clean_exactly_once(produced, SUBJECTS);
    tu_cluster_destroy(c);
}
END_TEST

/* ---- a connection cut during COMMIT ---------------------------------- */

/* A proxy on a unix socket of its own between the consumer and the
 * server (unix socket servers only: the suite's own, or an external one
 * reached by socket).  Armed, it cuts the connection -- both sides --
 * once the server has answered the client's next "COMMIT", without
 * passing the answer on: the commit happened, the client cannot know. */
struct proxy {
    char *dir;
    char target[108];
    char conninfo[900]; /* the consumer's: through the proxy */
    int lfd;
    pthread_t thread;
    atomic_bool armed, stop;
    atomic_int cuts;
};

/* The client's stream cut into messages (the startup packet, then a
 * type byte and a length each): the bytes left of the current message,
 * its type and its first bytes. */
struct framing {
    bool started; /* past the startup packet */
    char head[5];
    int head_n;
    long left;
    char type;
    char body[8];
    int body_n;
};

/* Follows n more bytes p of the client's stream; *commit becomes true
 * when a simple Query "COMMIT" ends in them. */
static void frame(struct framing *f, const char *p, ssize_t n, bool *commit)
{
    for (ssize_t i = 0; i < n; i++) {
        if (f->left == 0) {
            int need = f->started ? 5 : 4;
            f->head[f->head_n++] = p[i];
            if (f->head_n < need)
                continue;
            const unsigned char *h =
                (const unsigned char *)f->head + (f->started ? 1 : 0);
            f->type = f->started ? f->head[0] : 0;
            f->left = ((long)h[0] << 24 | (long)h[1] << 16 | (long)h[2] << 8 |
                       (long)h[3]) -
                      4;
            f->head_n = 0;
            f->body_n = 0;
            f->started = true;
            continue;
        }
        if (f->body_n < (int)sizeof f->body)
            f->body[f->body_n++] = p[i];
        if (--f->left == 0 && f->type == 'Q' && f->body_n == 7 &&
            memcmp(f->body, "COMMIT", 7) == 0)
            *commit = true;
    }
}

static void *proxy_main(void *arg)
{
    struct proxy *px = arg;
    char buf[8192];

    while (!atomic_load(&px->stop)) {
        struct pollfd a = {px->lfd, POLLIN, 0};
        struct sockaddr_un sa = {0};
        struct framing f = {0};
        bool commit_sent = false;
        int cfd, sfd;

        if (poll(&a, 1, 50) <= 0)
            continue;
        if ((cfd = accept(px->lfd, NULL, NULL)) < 0)
            continue;
        sfd = socket(AF_UNIX, SOCK_STREAM, 0);
        sa.sun_family = AF_UNIX;
        snprintf(sa.sun_path, sizeof sa.sun_path, "%s", px->target);
        if (sfd < 0 || connect(sfd, (struct sockaddr *)&sa, sizeof sa) != 0) {
            close(cfd);
            if (sfd >= 0)
                close(sfd);
            continue;
        }
        for (;;) {
            struct pollfd p[2] = {{cfd, POLLIN, 0}, {sfd, POLLIN, 0}};
            ssize_t n;
            if (atomic_load(&px->stop))
                break;
            if (poll(p, 2, 50) <= 0)
                continue;
            if (p[0].revents) {
                bool commit = false;
                if ((n = read(cfd, buf, sizeof buf)) <= 0)
                    break;
                frame(&f, buf, n, &commit);
                commit_sent |= commit && atomic_load(&px->armed);
                if (write(sfd, buf, (size_t)n) != n)
                    break;
            }
            if (p[1].revents) {
                if ((n = read(sfd, buf, sizeof buf)) <= 0)
                    break;
                if (commit_sent) { /* the server answered COMMIT: cut */
                    atomic_store(&px->armed, false);
                    atomic_fetch_add(&px->cuts, 1);
                    break;
                }
                if (write(cfd, buf, (size_t)n) != n)
                    break;
            }
        }
        close(cfd);
        close(sfd);
    }
    return NULL;
}

/* A proxy to the server conn is connected to (by unix socket); false
 * when that server is not reached by one. */
static bool proxy_start(struct proxy *px, PGconn *c, const char *ci)
{
    struct sockaddr_un sa = {0};
    const char *host = PQhost(c);

    if (host == NULL || host[0] != '/')
        return false;
    snprintf(px->target, sizeof px->target, "%s/.s.PGSQL.%s", host, PQport(c));
    px->dir = tu_mkdtemp();
    sa.sun_family = AF_UNIX;
    snprintf(sa.sun_path, sizeof sa.sun_path, "%s/.s.PGSQL.%s", px->dir,
             PQport(c));
    px->lfd = socket(AF_UNIX, SOCK_STREAM, 0);
    ck_assert_int_ge(px->lfd, 0);
    ck_assert_int_eq(bind(px->lfd, (struct sockaddr *)&sa, sizeof sa), 0);
    ck_assert_int_eq(listen(px->lfd, 4), 0);
    /* The later host wins in a conninfo string. */
    snprintf(px->conninfo, sizeof px->conninfo,
             "%s host=%s gssencmode=disable sslmode=disable", ci, px->dir);
    atomic_store(&px->armed, false);
    atomic_store(&px->stop, false);
    atomic_store(&px->cuts, 0);
    ck_assert_int_eq(pthread_create(&px->thread, NULL, proxy_main, px), 0);
    return true;
}

static void proxy_stop(struct proxy *px)
{
    atomic_store(&px->stop, true);
    ck_assert_int_eq(pthread_join(px->thread, NULL), 0);
    close(px->lfd);
    tu_rmdir(px->dir);
}

/* What the handler does at the event that starts the cut (after its
 * write): arms the proxy, so that the batch's COMMIT is cut after it
 * happened. */
struct cut_after {
    const char *at;
    struct proxy *px;
};

static de_err apply_then_arm(PGconn *c, const de_event_view *ev, void *ctx)
{
    struct cut_after *ca = ctx;
    de_err err = apply(c, ev, NULL);

    if (err == DE_OK && strcmp(ev->event_id, ca->at) == 0 &&
        atomic_load(&ca->px->cuts) == 0)
        atomic_store(&ca->px->armed, true);
    return err;
}

/* Polls c (on cc) until every one of `want` events is applied, resetting
 * the connection after each failed poll; on the first failure, checks
 * what the cut batch left: *at_cut receives whether event `at` was
 * committed.  Returns the number of failed polls. */
static int poll_through_cuts(de_consumer *c, PGconn *cc, long long want,
                             const char *at, long long *at_cut)
{
    int64_t deadline = tu_now_ms() + 60000;
    char sql[128];
    int failures = 0;

    snprintf(sql, sizeof sql,
             "SELECT count(*) FROM applied WHERE event_id = '%s'", at);
    while (applied_count() < want && tu_now_ms() < deadline) {
        de_err err = de_consumer_poll(c, 50, NULL);
        if (err == DE_OK)
            continue;
        ck_assert_msg(err == DE_ERR_DB, "%s", de_errmsg());
        ck_assert_int_eq(PQstatus(cc), CONNECTION_BAD);
        if (failures++ == 0)
            *at_cut = q(sql);
        PQreset(cc);
        ck_assert_int_eq(PQstatus(cc), CONNECTION_OK);
    }
    return failures;
}

/* The connection cut during the COMMIT of a batch, after the server
 * committed it (a proxy drops the connection once the server has
 * answered COMMIT, the answer not passed on): poll returns DE_ERR_DB,
 * the host resets the connection, and the batch read again is all
 * duplicates -- nothing applied twice. */
START_TEST(test_commit_cut_after)
{
    tu_cluster *c = tu_cluster_new(_i, 1);
    struct proxy px;
    struct cut_after ca = {"S-03-5", &px};
    de_conf *conf;
    de_consumer *con = NULL;
    de_consumer_stats st;
    PGconn *cc;
    long long at_cut = -1;

    if (!proxy_start(&px, conn, conninfo)) {
        fprintf(stderr, "commit_cut_after: skipped (not a unix socket)\n");
        tu_cluster_destroy(c);
        return;
    }
    cc = tpg_connect(px.conninfo);
    tu_topic_create(c, "delivery", 2);
    produce_many(c, 8, 10);
    conf = consumer_conf(c->bootstrap, c->prefix, "g");
    tu_ok(de_consumer_open_pg(cc, conf, &con));
    de_conf_destroy(conf);
    tu_ok(de_consumer_on_pg(con, "delivery", NULL, apply_then_arm, &ca));
    ck_assert_int_eq(poll_through_cuts(con, cc, 80, ca.at, &at_cut), 1);
    ck_assert_int_eq(atomic_load(&px.cuts), 1);
    ck_assert_int_eq(at_cut, 1); /* the cut batch had committed */
    assert_exactly_once(8, 10);
    /* The cut batch, read again, is duplicates only: its applications
     * are not counted (they were not known to commit), the rest are. */
    poll_stats(con, &st);
    ck_assert_uint_lt(st.applied, 80);
    ck_assert_uint_ge(st.applied + st.duplicates, 80);
    tu_ok(de_consumer_close(con));
    PQfinish(cc);
    proxy_stop(&px);
    tu_cluster_destroy(c);
}
END_TEST

/* The connection cut during the COMMIT of a batch, before it committed:
 * a deferred constraint trigger on the read model's table terminates
 * its own backend at the COMMIT of the batch that wrote one event (once:
 * a sequence, which no rollback takes back, says it has).  Poll returns
 * DE_ERR_DB, the host resets the connection, and the batch read again is
 * applied once. */
START_TEST(test_commit_cut_before)
{
    tu_cluster *c = tu_cluster_new(_i, 1);
    de_consumer *con = NULL;
    de_consumer_stats st;
    long long at_cut = -1;

    tpg_exec(conn, "CREATE SEQUENCE cut_once");
    tpg_exec(conn,
             "CREATE FUNCTION cut() RETURNS trigger LANGUAGE plpgsql AS $$ "
             "BEGIN IF NEW.event_id = 'S-03-5' AND nextval('cut_once') = 1 "
             "THEN PERFORM pg_terminate_backend(pg_backend_pid()); END IF; "
             "RETURN NULL; END $$");
    tpg_exec(conn, "CREATE CONSTRAINT TRIGGER cut AFTER INSERT ON applied "
                   "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE "
                   "FUNCTION cut()");
    tu_topic_create(c, "delivery", 2);
    produce_many(c, 8, 10);
    tu_ok(open_consumer(conn, c->bootstrap, c->prefix, "g", NULL, &con));
    {
        PGconn *probe = conn; /* poll_through_cuts reads through conn */
        conn = tpg_connect(conninfo);
        ck_assert_int_eq(poll_through_cuts(con, probe, 80, "S-03-5", &at_cut),
                         1);
        PQfinish(conn);
        conn = probe;
    }
    ck_assert_int_eq(at_cut, 0); /* the cut batch had not committed */
    assert_exactly_once(8, 10);
    /* Cut once; the event read again committed (the trigger ran again). */
    ck_assert_int_eq(tpg_int(conn, "SELECT last_value FROM cut_once"), 2);
    ck_assert(tu_wait_for((poll_stats(con, &st), st.applied == 80), 10000));
    tu_ok(de_consumer_close(con));
    tu_cluster_destroy(c);
}
END_TEST

/* A consumer process (this program, --consume) applying into the
 * database; polls until killed. */
static int consume_main(const char *ci, const char *bootstrap,
                        const char *prefix, const char *group)
{
    static struct behaviour slow = {.delay_us = 5000};
    PGconn *c = PQconnectdb(ci);
    de_consumer *con = NULL;

    if (PQstatus(c) != CONNECTION_OK ||
        open_consumer(c, bootstrap, prefix, group, &slow, &con) != DE_OK)
        return 2;
    for (;;)
        if (de_consumer_poll(con, 100, NULL) != DE_OK)
            return 3;
}

static pid_t spawn_consumer(tu_cluster *c, const char *group)
{
    const char *args[] = {"/proc/self/exe", "--consume", conninfo, c->bootstrap,
                          c->prefix,        group,       NULL};
    bool quiet = getenv("DE_TEST_LOG") == NULL;
    char *argv[8];
    pid_t pid;

    /* Ready before fork: the child may only exec. */
    for (int i = 0; i < 7; i++)
        argv[i] = (char *)(uintptr_t)args[i];
    pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        int devnull = open("/dev/null", O_WRONLY);
        if (quiet && devnull >= 0) {
            dup2(devnull, 1);
            dup2(devnull, 2);
        }
        execv(argv[0], argv);
        _exit(127);
    }
    return pid;
}

/* A consumer killed with SIGKILL in the middle of the stream, then
 * another started in its place: every event applied exactly once.  The
 * new one reads in a group of its own, from the beginning: the worst
 * case of a crash between the database's commit and the offsets' (which
 * a kill at a random moment hits only rarely), so every event the killed
 * one applied comes again and must be dropped by the inbox. */
START_TEST(test_sigkill_restart)
{
    tu_cluster *c = tu_cluster_new(_i, 1);
    de_consumer *con = NULL;
    de_consumer_stats st;
    char sql[96];
    pid_t child;
    long long before;
    int status;

    tu_topic_create(c, "delivery", 2);
    produce_many(c, 10, 20);
    child = spawn_consumer(c, "g");
    /* Mid-stream: some applied, not all. */
    ck_assert(tu_wait_for(applied_count() >= 40, 60000));
    kill(child, SIGKILL);
    ck_assert_int_eq(waitpid(child, &status, 0), child);
    ck_assert(WIFSIGNALED(status));
    before = applied_count();
    ck_assert_int_lt(before, 200);
    /* Its session ends with it; the server rolls back what it had open. */
    tu_ok(open_consumer(conn, c->bootstrap, c->prefix, "g-restarted", NULL,
                        &con));
    poll_until(con, 200, 90000);
    /* What the killed one applied (its commits all done by now) came
     * again, each a duplicate. */
    snprintf(sql, sizeof sql, "SELECT count(*) FROM applied WHERE pid = %d",
             (int)child);
    ck_assert(tu_wait_for(
        (poll_stats(con, &st), st.duplicates == (uint64_t)q(sql)), 30000));
    ck_assert_uint_eq(st.applied + st.duplicates, 200);
    assert_exactly_once(10, 20);
    ck_assert_int_gt(q("SELECT count(DISTINCT pid) FROM applied"), 1);
    tu_ok(de_consumer_close(con));
    tu_cluster_destroy(c);
}
END_TEST

/* Event number seq of a subject of subject type `type` (ce_id
 * "<subject>-<seq>", ce_source "/test/<type>"), on that type's topic. */
static void produce_typed(tu_cluster *c, const char *type, const char *subject,
                          int seq)
{
    char id[64], s[16], ce_type[64], source[64];
    const char *h[] = {"ce_specversion",
                       "1.0",
                       "ce_id",
                       id,
                       "ce_source",
                       source,
                       "ce_type",
                       ce_type,
                       "ce_subjectseq",
                       s,
                       "ce_subjecttype",
                       type,
                       "ce_action",
                       "assigned",
                       NULL};

    snprintf(id, sizeof id, "%s-%d", subject, seq);
    snprintf(s, sizeof s, "%d", seq);
    snprintf(ce_type, sizeof ce_type, "%s.assigned", type);
    /* A source per type: the first event of a source writes its row of
     * inbox_source, which a second transaction recording the same one
     * would wait for. */
    snprintf(source, sizeof source, "/test/%s", type);
    tu_produce_raw(c, tu_topic(c, type), subject, "{}", h);
}

/* Counts the consumer's log lines that say a transaction is run again
 * after a conflict, and those that give up. */
struct conflict_log {
    atomic_int retried, gave_up;
};

static void count_conflicts(void *ctx, int level, const char *message)
{
    struct conflict_log *l = ctx;

    tu_log(NULL, level, message);
    if (strstr(message, "SQLSTATE 40P01") && strstr(message, "running it "
                                                             "again"))
        atomic_fetch_add(&l->retried, 1);
    if (strstr(message, "SQLSTATE 40P01") && strstr(message, "retried"))
        atomic_fetch_add(&l->gave_up, 1);
}

/* A consumer with one handler, for subject type `type`, logging into l. */
static de_consumer *open_typed(PGconn *pc, tu_cluster *c, const char *group,
                               const char *type, de_handler_pg_fn fn, void *ctx,
                               struct conflict_log *l)
{
    de_conf *conf = consumer_conf(c->bootstrap, c->prefix, group);
    de_consumer *con = NULL;

    ck_assert_ptr_nonnull(conf);
    de_conf_set_log_cb(conf, count_conflicts, l);
    tu_ok(de_consumer_open_pg(pc, conf, &con));
    de_conf_destroy(conf);
    tu_ok(de_consumer_on_pg(con, type, NULL, fn, ctx));
    return con;
}

/* One of two consumers whose handlers deadlock: each locks its own row
 * of `locks`, waits until the other holds its own (the barrier, once),
 * then locks the other's. */
struct locker {
    const char *type, *subject, *mine, *other;
    pthread_barrier_t *both;
    bool met;
    PGconn *conn;
    de_consumer *con;
    pthread_t thread;
    int failed_polls;
    char failure[512];
    bool done;
};

static de_err lock_both(PGconn *c, const de_event_view *ev, void *ctx)
{
    struct locker *l = ctx;
    const char *sql = "UPDATE locks SET n = n + 1 WHERE id = $1";

    const char *first = strcmp(l->mine, l->other) < 0 ? l->mine : l->other;
    const char *second = first == l->mine ? l->other : l->mine;

    if (l->met) {
        /* Every later run (the aborted one's included) locks in one
         * order: exactly one deadlock, whatever the timing. */
        if (!exec_ok(c, sql, 1, &first) || !exec_ok(c, sql, 1, &second))
            return DE_ERR_DB;
        return apply(c, ev, NULL);
    }
    if (!exec_ok(c, sql, 1, &l->mine))
        return DE_ERR_DB;
    l->met = true;
    pthread_barrier_wait(l->both);
    /* One of the two waits here for the other, which waits for it: the
     * server's deadlock detector aborts one of them. */
    if (!exec_ok(c, sql, 1, &l->other))
        return DE_ERR_DB;
    return apply(c, ev, NULL);
}

static long long count_on(PGconn *c, const char *sql, const char *arg)
{
    PGresult *r = PQexecParams(c, sql, 1, NULL, &arg, NULL, NULL, 0);
    long long n = PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) == 1
                      ? atoll(PQgetvalue(r, 0, 0))
                      : -1;

    PQclear(r);
    return n;
}

/* Polls until the subject's 3 events are applied (or 60 s), noting every
 * poll that did not return DE_OK. */
static void *locker_main(void *arg)
{
    struct locker *l = arg;
    int64_t deadline = tu_now_ms() + 60000;

    while (tu_now_ms() < deadline) {
        if (de_consumer_poll(l->con, 50, NULL) != DE_OK &&
            l->failed_polls++ == 0)
            snprintf(l->failure, sizeof l->failure, "%s", de_errmsg());
        if (count_on(l->conn,
                     "SELECT count(*) FROM applied WHERE subject_id = $1",
                     l->subject) >= 3) {
            l->done = true;
            break;
        }
    }
    return NULL;
}

/* Two consumers applying into one database deadlock in their handlers
 * (each holds a row of the host's table the other's handler then
 * locks); the server aborts one transaction with 40P01.  The aborted
 * batch must be rolled back and applied again inside the same poll: no
 * poll fails, every event is applied once (the host's counters and the
 * read model say so, not the inbox), and the retry is counted and
 * logged.  The two consumers read a topic each (in groups of their own:
 * what meets is their transactions, not their group). */
START_TEST(test_deadlock_retried)
{
    tu_cluster *c = tu_cluster_new(_i, 1);
    pthread_barrier_t both;
    struct conflict_log log = {0};
    struct locker l[2] = {
        {.type = "alpha", .subject = "A-1", .mine = "a", .other = "b"},
        {.type = "beta", .subject = "B-1", .mine = "b", .other = "a"},
    };
    de_consumer_stats st[2];

    tpg_exec(conn, "CREATE TABLE locks(id text PRIMARY KEY, n int NOT NULL);"
                   "INSERT INTO locks VALUES ('a', 0), ('b', 0)");
    ck_assert_int_eq(pthread_barrier_init(&both, NULL, 2), 0);
    for (int i = 0; i < 2; i++) {
        tu_topic_create(c, l[i].type, 1);
        for (int seq = 1; seq <= 3; seq++)
            produce_typed(c, l[i].type, l[i].subject, seq);
        l[i].both = &both;
        l[i].conn = tpg_connect(conninfo);
        /* A shorter wait before the deadlock check (1 s by default);
         * only a superuser may set it, and the test holds without. */
        PQclear(PQexec(l[i].conn, "SET deadlock_timeout = '20ms'"));
        l[i].con = open_typed(l[i].conn, c, l[i].type, l[i].type, lock_both,
                              &l[i], &log);
    }
    for (int i = 0; i < 2; i++)
        ck_assert_int_eq(pthread_create(&l[i].thread, NULL, locker_main, &l[i]),
                         0);
    for (int i = 0; i < 2; i++) {
        ck_assert_int_eq(pthread_join(l[i].thread, NULL), 0);
        ck_assert_msg(l[i].failed_polls == 0, "%s: %d polls failed: %s",
                      l[i].type, l[i].failed_polls, l[i].failure);
        ck_assert(l[i].done);
        tu_ok(de_consumer_stats_get(l[i].con, &st[i]));
        ck_assert_uint_eq(st[i].applied, 3);
        ck_assert_uint_eq(st[i].retries, 0); /* no handler failure */
        ck_assert_uint_eq(st[i].dead_lettered, 0);
        tu_ok(de_consumer_close(l[i].con));
        PQfinish(l[i].conn);
    }
    /* One of them was aborted, once, and ran again. */
    ck_assert_uint_eq(st[0].txn_retries + st[1].txn_retries, 1);
    ck_assert_int_ge(atomic_load(&log.retried), 1);
    ck_assert_int_eq(atomic_load(&log.gave_up), 0);
    /* Every event once: 6 rows, 6 ids, and each of the 6 handler runs
     * that committed counted once on both rows (the aborted run's
     * updates rolled back). */
    ck_assert_int_eq(applied_count(), 6);
    ck_assert_int_eq(q("SELECT count(DISTINCT event_id) FROM applied"), 6);
    ck_assert_int_eq(q("SELECT count(*) FROM locks WHERE n = 6"), 2);
    ck_assert_int_eq(q("SELECT count(*) FROM deliveryevents.inbox WHERE "
                       "last_seq = 3 AND NOT parked"),
                     2);
    ck_assert_int_eq(q("SELECT count(*) FROM deliveryevents.inbox_dead_letter"),
                     0);
    pthread_barrier_destroy(&both);
    tu_cluster_destroy(c);
}
END_TEST

/* A handler whose statement fails with a deadlock's SQLSTATE every time
 * it runs (until told otherwise). */
struct always_conflict {
    atomic_bool fail;
    int calls;
};

static de_err raise_conflict(PGconn *c, const de_event_view *ev, void *ctx)
{
    struct always_conflict *a = ctx;

    a->calls++;
    if (atomic_load(&a->fail)) {
        PQclear(PQexec(c, "DO $$BEGIN RAISE EXCEPTION 'a deadlock, always' "
                          "USING ERRCODE = '40P01'; END$$"));
        return DE_ERR_DB;
    }
    return apply(c, ev, NULL);
}

/* A conflict that does not go away: the batch is run CONFLICT_RUNS (5)
 * times, then the poll returns DE_ERR_DB naming the SQLSTATE and the
 * retries, nothing of the batch applied, nothing dead-lettered (it is
 * not the event's failure); the consumer goes on once it goes away. */
START_TEST(test_conflict_persists)
{
    tu_cluster *c = tu_cluster_new(_i, 1);
    struct always_conflict a = {.fail = true};
    struct conflict_log log = {0};
    de_consumer *con;
    de_consumer_stats st;
    int64_t deadline = tu_now_ms() + 30000;
    de_err err = DE_OK;

    tu_topic_create(c, "delivery", 1);
    produce(c, "P-1", 1);
    produce(c, "P-1", 2);
    produce(c, "Q-1", 1);
    con = open_typed(conn, c, "g", "delivery", raise_conflict, &a, &log);
    while (err == DE_OK && tu_now_ms() < deadline)
        err = de_consumer_poll(con, 50, NULL);
    tu_assert_err(err, DE_ERR_DB, "SQLSTATE 40P01");
    ck_assert_msg(strstr(de_errmsg(), "retried 4 times"), "%s", de_errmsg());
    /* P-1-1 heads the batch: 5 runs, 5 calls, nothing applied. */
    ck_assert_int_eq(a.calls, 5);
    ck_assert_int_eq(applied_count(), 0);
    ck_assert_int_eq(q("SELECT count(*) FROM deliveryevents.inbox"), 0);
    ck_assert_int_eq(q("SELECT count(*) FROM deliveryevents.inbox_dead_letter"),
                     0);
    tu_ok(de_consumer_stats_get(con, &st));
    ck_assert_uint_eq(st.txn_retries, 4);
    ck_assert_uint_eq(st.applied, 0);
    ck_assert_uint_eq(st.retries, 0);
    ck_assert_uint_eq(st.dead_lettered, 0);
    ck_assert_int_eq(atomic_load(&log.retried), 4);
    ck_assert_int_eq(atomic_load(&log.gave_up), 1);
    /* Usable afterwards: the batch is read again and applied, once. */
    atomic_store(&a.fail, false);
    poll_until(con, 3, 30000);
    ck_assert_int_eq(q("SELECT count(DISTINCT event_id) FROM applied"), 3);
    tu_ok(de_consumer_stats_get(con, &st));
    ck_assert_uint_eq(st.applied, 3);
    ck_assert_uint_eq(st.txn_retries, 4);
    ck_assert_uint_eq(st.dead_lettered, 0);
    tu_ok(de_consumer_close(con));
    tu_cluster_destroy(c);
}
END_TEST

/* A serialization failure (40001) at COMMIT -- a deferred trigger of the
 * host's raises it, twice -- is not a handler's failure and not a
 * statement of the inbox: the batch's COMMIT fails, and the batch is
 * run again inside the same poll, its events applied once. */
START_TEST(test_commit_conflict_retried)
{
    tu_cluster *c = tu_cluster_new(_i, 1);
    struct conflict_log log = {0};
    de_consumer *con;
    de_consumer_stats st;

    tpg_exec(conn, "CREATE SEQUENCE refuse_twice");
    tpg_exec(conn,
             "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ "
             "BEGIN IF nextval('refuse_twice') <= 2 THEN RAISE EXCEPTION "
             "'could not serialize' USING ERRCODE = '40001'; END IF; "
             "RETURN NULL; END $$");
    tpg_exec(conn, "CREATE CONSTRAINT TRIGGER refuse AFTER INSERT ON applied "
                   "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE "
                   "FUNCTION refuse()");
    tu_topic_create(c, "delivery", 1);
    produce(c, "C-1", 1);
    con = open_typed(conn, c, "g", "delivery", apply, NULL, &log);
    /* Every poll DE_OK (poll_until asserts it) until the event is in. */
    poll_until(con, 1, 30000);
    tu_ok(de_consumer_stats_get(con, &st));
    ck_assert_uint_eq(st.txn_retries, 2);
    ck_assert_uint_eq(st.applied, 1);
    ck_assert_uint_eq(st.retries, 0);
    ck_assert_int_eq(q("SELECT last_value FROM refuse_twice"), 3);
    ck_assert_int_eq(q("SELECT count(*) FROM deliveryevents.inbox WHERE "
                       "last_seq = 1"),
                     1);
    tu_ok(de_consumer_close(con));
    tu_cluster_destroy(c);
}
END_TEST

/* Adds tc: one scenario, looped over the clusters, with the fixture and
 * a timeout of its own. */
static void add_case(Suite *s, TCase *tc, const TTest *t, int timeout)
{
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, timeout);
    tcase_add_loop_test(tc, t, tu_cluster_first(), tu_cluster_count());
    suite_add_tcase(s, tc);
}

static Suite *pg_consumer_suite(void)
{
    Suite *s = suite_create("pg_consumer");
    TCase *tc = tcase_create("consumer");
    int first = tu_cluster_first(), n = tu_cluster_count();

    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 180);
    tcase_add_test(tc, test_open_and_registration);
    tcase_add_loop_test(tc, test_in_order_and_duplicates, first, n);
    tcase_add_loop_test(tc, test_conflict_parks, first, n);
    tcase_add_loop_test(tc, test_gap, first, n);
    /* Run twice on the mock: a failed statement, then a returned error. */
    tcase_add_loop_test(tc, test_handler_failure_rolls_back_only_its_event, 0,
                        2);
    tcase_add_loop_test(tc, test_forget_and_requests, first, n);
    tcase_add_loop_test(tc, test_connection_terminated, first, n);
    tcase_add_loop_test(tc, test_connection_terminated_while_idle, first, n);
    tcase_add_loop_test(tc, test_sigkill_restart, first, n);
    suite_add_tcase(s, tc);
    /* Each scenario below is a test case of its own: make check runs each
     * as its own job (CK_RUN_CASE). */
    add_case(s, tcase_create("on_type"), test_on_type, 60);
    add_case(s, tcase_create("careful_race"), test_careful_race, 90);
    add_case(s, tcase_create("commit_cut_after"), test_commit_cut_after, 90);
    add_case(s, tcase_create("commit_cut_before"), test_commit_cut_before, 90);
    add_case(s, tcase_create("rebalance"), test_rebalance, 180);
    add_case(s, tcase_create("host_deallocates"), test_host_deallocates, 60);
    add_case(s, tcase_create("deadlock_retried"), test_deadlock_retried, 90);
    add_case(s, tcase_create("conflict_persists"), test_conflict_persists, 60);
    add_case(s, tcase_create("commit_conflict"), test_commit_conflict_retried,
             60);
    return s;
}

int main(int argc, char **argv)
{
    if (argc == 6 && strcmp(argv[1], "--consume") == 0)
        return consume_main(argv[2], argv[3], argv[4], argv[5]);
    return tpg_run(pg_consumer_suite());
}

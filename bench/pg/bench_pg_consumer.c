/* SPDX-License-Identifier: MIT */
/*
 * bench_pg_consumer.c -- how fast the consumer applies events into
 * PostgreSQL, against plain libpq writing the same rows in the same order
 * (the floor, as bench/bench_consumer.c has for SQLite).
 *
 * A relay publishes BENCH_EVENTS (20,000) events over 2,000 subjects to
 * a 12-partition topic on the mock cluster (`deliveryevents mock-cluster`
 * in its own process, through DE_TOOL).  Then, on a throwaway server
 * (tests/pg/pgserver.c) or DE_PG_CONNINFO:
 *
 *  - de_consumer: de_consumer_open_pg with a handler doing a simple
 *    projection (an upsert of the subject's latest action), timed from
 *    the first event applied to the last (the group join left out);
 *  - floor: one connection, no Kafka, no decoding: per event the inbox's
 *    upsert and the projection's, prepared, in the order the consumer
 *    applied them, in transactions of the consumer's average batch.
 *
 * Prints events/s of both and the ratio; asserts nothing.
 * Environment: BENCH_EVENTS, DE_TOOL.
 */
#include "bench_kafka.h"
#include "bench_pg.h"
#include "deliveryevents_pg.h"
#include "pgserver.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PG_SUBJECTS 2000

/* The order the consumer applied its events in. */
static struct {
    long *subject, *seq;
    long n, cap;
    double first, last;
} order;

static const char project_sql[] =
    "INSERT INTO projection(subject_id, action, seq) VALUES ($1, $2, $3) "
    "ON CONFLICT (subject_id) DO UPDATE SET action = excluded.action, seq = "
    "excluded.seq";

static de_err project(PGconn *c, const de_event_view *ev, void *ctx)
{
    char seq[24];
    const char *v[3] = {ev->subject_id, ev->action, seq};
    PGresult *r;
    bool ok;

    (void)ctx;
    snprintf(seq, sizeof seq, "%lld", (long long)ev->subject_seq);
    r = PQexecPrepared(c, "project", 3, v, NULL, NULL, 0);
    ok = PQresultStatus(r) == PGRES_COMMAND_OK;
    PQclear(r);
    if (!ok)
        return DE_ERR_DB;
    if (order.n == order.cap) {
        order.cap = order.cap ? 2 * order.cap : 1 << 14;
        order.subject = realloc(order.subject, order.cap * sizeof(long));
        order.seq = realloc(order.seq, order.cap * sizeof(long));
        BENCH_CHECK(order.subject && order.seq, "out of memory");
    }
    order.subject[order.n] = strtol(ev->subject_id + 2, NULL, 10);
    order.seq[order.n++] = (long)ev->subject_seq;
    if (order.n == 1)
        order.first = bench_now();
    order.last = bench_now();
    return DE_OK;
}

/* Events per second of de_consumer over n events; *batch receives the
 * average events per transaction. */
static double consumer_round(PGconn *c, long n, double *batch)
{
    de_conf *conf = de_conf_new();
    de_consumer *con = NULL;
    de_consumer_stats st;
    PGresult *r;

    BENCH_SET(conf, "bootstrap.servers", bootstrap);
    BENCH_SET(conf, "group.id", "bench-pg");
    BENCH_SET(conf, "topic.template", "bench.{subject_type}.events");
    de_conf_set_log_cb(conf, quiet, NULL);
    BENCH_CHECK(de_consumer_open_pg(c, conf, &con) == DE_OK, "%s", de_errmsg());
    de_conf_destroy(conf);
    r = PQprepare(c, "project", project_sql, 0, NULL);
    BENCH_CHECK(PQresultStatus(r) == PGRES_COMMAND_OK, "%s",
                PQresultErrorMessage(r));
    PQclear(r);
    BENCH_CHECK(de_consumer_on_pg(con, "delivery", NULL, project, NULL) ==
                    DE_OK,
                "%s", de_errmsg());
    while (order.n < n)
        BENCH_CHECK(de_consumer_poll(con, 100, NULL) == DE_OK, "%s",
                    de_errmsg());
    BENCH_CHECK(de_consumer_stats_get(con, &st) == DE_OK, "%s", de_errmsg());
    *batch = st.batches ? (double)st.applied / (double)st.batches : 1;
    de_consumer_close(con);
    return (double)(n - 1) / (order.last - order.first);
}

/* Plain libpq: the same two upserts per event, in the same order, in
 * transactions of `batch` events. */
static double floor_round(PGconn *c, long batch)
{
    char id[32], seq[24], now[24];
    const char *inbox[4] = {id, seq, now,
                            "0190a4c2-7b1e-7c3d-8e4f-a1b2c3d4e5f6"};
    const char *proj[3] = {id, "assigned", seq};
    PGresult *r;
    double t0;

    must(c, "CREATE TABLE floor_inbox(subject_type text, subject_id text, "
            "last_seq bigint, updated_ms bigint, last_event_uuid uuid, "
            "PRIMARY KEY (subject_type, subject_id)) WITH (fillfactor = 80)");
    must(c, "CREATE TABLE floor_projection(subject_id text PRIMARY KEY, "
            "action text, seq bigint)");
    r = PQprepare(c, "floor_inbox",
                  "INSERT INTO floor_inbox VALUES ('delivery', $1, $2, $3, "
                  "$4) ON CONFLICT (subject_type, subject_id) DO UPDATE SET "
                  "last_seq = excluded.last_seq, updated_ms = "
                  "excluded.updated_ms, last_event_uuid = "
                  "excluded.last_event_uuid",
                  0, NULL);
    BENCH_CHECK(PQresultStatus(r) == PGRES_COMMAND_OK, "%s",
                PQresultErrorMessage(r));
    PQclear(r);
    r = PQprepare(c, "floor_project",
                  "INSERT INTO floor_projection VALUES ($1, $2, $3) ON "
                  "CONFLICT (subject_id) DO UPDATE SET action = "
                  "excluded.action, seq = excluded.seq",
                  0, NULL);
    BENCH_CHECK(PQresultStatus(r) == PGRES_COMMAND_OK, "%s",
                PQresultErrorMessage(r));
    PQclear(r);
    t0 = bench_now();
    for (long i = 0; i < order.n; i++) {
        if (i % batch == 0)
            must(c, "BEGIN");
        snprintf(id, sizeof id, SUBJECT_FMT, order.subject[i]);
        snprintf(seq, sizeof seq, "%ld", order.seq[i]);
        snprintf(now, sizeof now, "%lld", (long long)(bench_now() * 1000));
        r = PQexecPrepared(c, "floor_inbox", 4, inbox, NULL, NULL, 0);
        BENCH_CHECK(PQresultStatus(r) == PGRES_COMMAND_OK, "%s",
                    PQresultErrorMessage(r));
        PQclear(r);
        r = PQexecPrepared(c, "floor_project", 3, proj, NULL, NULL, 0);
        BENCH_CHECK(PQresultStatus(r) == PGRES_COMMAND_OK, "%s",
                    PQresultErrorMessage(r));
        PQclear(r);
        if (i % batch == batch - 1 || i == order.n - 1)
            must(c, "COMMIT");
    }
    return (double)order.n / (bench_now() - t0);
}

int main(void)
{
    static const char *const topics[] = {"bench.delivery.events:12", NULL};
    long n = bench_env_long("BENCH_EVENTS", 20000);
    char *dir = bench_mkdtemp(), path[4200];
    const char *conninfo;
    double rate, floor_rate, batch;
    PGconn *c;

    tool = getenv("DE_TOOL");
    BENCH_CHECK(tool != NULL, "set DE_TOOL to the deliveryevents tool");
    snprintf(path, sizeof path, "%s/outbox.db", dir);
    publish_backlog(topics, path, n, PG_SUBJECTS);
    BENCH_CHECK(tpg_start(), "no PostgreSQL server");
    conninfo = tpg_fresh_db();
    c = must_connect(conninfo);
    must(c, "CREATE TABLE projection(subject_id text PRIMARY KEY, action "
            "text, seq bigint)");
    rate = consumer_round(c, n, &batch);
    floor_rate = floor_round(c, batch > 1 ? (long)(batch + 0.5) : 1);
    printf("consumer on PostgreSQL, %ld events over %d subjects, 12 "
           "partitions (synchronous_commit on):\n"
           "  de_consumer     %9.0f events/s (%.1f events per transaction)\n"
           "  floor (libpq)   %9.0f events/s (same rows, same order, same "
           "transaction size)\n"
           "  ratio           %9.2fx of the floor\n",
           n, PG_SUBJECTS, rate, batch, floor_rate, rate / floor_rate);
    PQfinish(c);
    tpg_stop();
    stop_mock();
    bench_rmdir(dir);
    return 0;
}

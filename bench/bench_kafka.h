/* SPDX-License-Identifier: MIT */
/*
 * bench_kafka.h -- what the Kafka benchmarks share: the mock cluster in
 * its own process (`deliveryevents mock-cluster`, found through DE_TOOL),
 * and a database whose outbox holds a backlog of events.
 */
#ifndef DE_BENCH_KAFKA_H
#define DE_BENCH_KAFKA_H

#include "bench.h"

#include <deliveryevents.h>
#include <librdkafka/rdkafka.h>
#include <sqlite3.h>
#include <sys/wait.h>

/* The subject count of the benchmarks that do not say otherwise. */
#define SUBJECTS 10000
/* Subject ids: "D-" and 7 digits, whatever the count. */
#define SUBJECT_FMT "D-%07ld"

static const char payload[] = "{\"rider_id\":\"R-0042\",\"eta_s\":540,"
                              "\"lat\":37.5665,\"lng\":126.9780}";
static char bootstrap[1400];
static pid_t mock_pid;
static int mock_stdin = -1;
static const char *tool;

static void quiet(void *ctx, int level, const char *msg)
{
    (void)ctx;
    if (level <= DE_LOG_ERR)
        fprintf(stderr, "  relay: %s\n", msg);
}

static void quiet_rk(const rd_kafka_t *rk, int level, const char *fac,
                     const char *buf)
{
    (void)rk;
    (void)level;
    (void)fac;
    (void)buf;
}

/* Starts `deliveryevents mock-cluster` with the given topics. */
static void start_mock(const char *const *topics)
{
    int in[2], out[2];
    char line[1200];
    FILE *f;
    ssize_t n;

    BENCH_CHECK(pipe(in) == 0 && pipe(out) == 0, "pipe");
    mock_pid = fork();
    BENCH_CHECK(mock_pid >= 0, "fork");
    if (mock_pid == 0) {
        const char *argv[64];
        int a = 0;
        dup2(in[0], 0);
        dup2(out[1], 1);
        close(in[1]);
        close(out[0]);
        argv[a++] = tool;
        argv[a++] = "mock-cluster";
        argv[a++] = "--brokers";
        argv[a++] = "3";
        argv[a++] = "--until-stdin-eof";
        for (int i = 0; topics[i] && a < 60; i++) {
            argv[a++] = "--topic";
            argv[a++] = topics[i];
        }
        argv[a] = NULL;
        execv(tool, (char *const *)argv);
        _exit(127);
    }
    close(in[0]);
    close(out[1]);
    mock_stdin = in[1];
    f = fdopen(out[0], "r");
    BENCH_CHECK(f && fgets(line, sizeof line, f),
                "mock cluster did not start "
                "(DE_TOOL=%s)",
                tool);
    n = (ssize_t)strlen(line);
    if (n && line[n - 1] == '\n')
        line[n - 1] = '\0';
    BENCH_CHECK(strncmp(line, "bootstrap.servers=", 18) == 0, "mock said %s",
                line);
    snprintf(bootstrap, sizeof bootstrap, "%s", line + 18);
}

static void stop_mock(void)
{
    close(mock_stdin);
    waitpid(mock_pid, NULL, 0);
}

static void exec_sql(sqlite3 *db, const char *sql)
{
    char *err = NULL;
    BENCH_CHECK(sqlite3_exec(db, sql, NULL, NULL, &err) == SQLITE_OK, "%s: %s",
                sql, err ? err : "?");
}

/* A bare librdkafka consumer (a fresh group per round) reading n records
 * of topic, without decoding them: records per second from the first to
 * the last (the group join left out). */
static inline double bench_bare_round(const char *topic, long n, int round)
{
    rd_kafka_conf_t *c = rd_kafka_conf_new();
    rd_kafka_topic_partition_list_t *l;
    char err[512], group[64];
    double t0 = 0, t1 = 0;
    long got = 0;
    rd_kafka_t *rk;

    snprintf(group, sizeof group, "bench-bare-%s-%d", topic, round);
    rd_kafka_conf_set(c, "bootstrap.servers", bootstrap, err, sizeof err);
    rd_kafka_conf_set(c, "group.id", group, err, sizeof err);
    rd_kafka_conf_set(c, "auto.offset.reset", "earliest", err, sizeof err);
    rd_kafka_conf_set(c, "enable.auto.commit", "false", err, sizeof err);
    rd_kafka_conf_set_log_cb(c, quiet_rk);
    rk = rd_kafka_new(RD_KAFKA_CONSUMER, c, err, sizeof err);
    BENCH_CHECK(rk != NULL, "%s", err);
    rd_kafka_poll_set_consumer(rk);
    l = rd_kafka_topic_partition_list_new(1);
    rd_kafka_topic_partition_list_add(l, topic, RD_KAFKA_PARTITION_UA);
    rd_kafka_subscribe(rk, l);
    rd_kafka_topic_partition_list_destroy(l);
    while (got < n) {
        rd_kafka_message_t *m = rd_kafka_consumer_poll(rk, 1000);
        if (m == NULL)
            continue;
        if (m->err == 0) {
            if (got++ == 0)
                t0 = bench_now();
            t1 = bench_now();
        }
        rd_kafka_message_destroy(m);
    }
    rd_kafka_consumer_close(rk);
    rd_kafka_destroy(rk);
    return (double)(n - 1) / (t1 - t0);
}

/* A database whose outbox holds n events over `subjects` subjects (event
 * x belongs to subject x mod subjects). */
static void make_backlog(const char *path, long n, long subjects)
{
    sqlite3 *db;
    de_outbox *ob;
    char sql[1024];

    BENCH_CHECK(sqlite3_open(path, &db) == SQLITE_OK, "open %s", path);
    BENCH_CHECK(de_outbox_open(db, NULL, &ob) == DE_OK, "%s", de_errmsg());
    snprintf(sql, sizeof sql,
             "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c "
             "LIMIT %ld) INSERT INTO de_outbox(event_id, subject_type, "
             "subject_id, action, version, occurred_at_ms, recorded_at_ms, "
             "payload) SELECT printf('01937a1e-%%04x-7%%03x-8%%03x-%%012x', "
             "x / 65536 %% 65536, x %% 4096, x / 4096 %% 4096, x), "
             "'delivery', printf('D-%%07d', x %% %ld), 'assigned', 0, "
             "1795604400000 + x, 1795604400000 + x, '%s' FROM c",
             n, subjects, payload);
    exec_sql(db, sql);
    de_outbox_close(ob);
    sqlite3_close(db);
}

/* The mock cluster with topics, and n events over `subjects` subjects
 * published to it by a relay (topic.template bench.{subject_type}.events)
 * from a backlog in db_path. */
static inline void publish_backlog(const char *const *topics,
                                   const char *db_path, long n, long subjects)
{
    de_conf *conf = de_conf_new();
    de_relay *r = NULL;

    BENCH_CHECK(conf != NULL, "out of memory");
    start_mock(topics);
    make_backlog(db_path, n, subjects);
    BENCH_SET(conf, "bootstrap.servers", bootstrap);
    BENCH_SET(conf, "topic.template", "bench.{subject_type}.events");
    BENCH_SET_HMAC(conf); /* signed when the consumer checks signatures */
    de_conf_set_log_cb(conf, quiet, NULL);
    BENCH_CHECK(de_relay_start_path(db_path, conf, &r) == DE_OK, "%s",
                de_errmsg());
    BENCH_CHECK(de_relay_flush(r, -1) == DE_OK, "%s", de_errmsg());
    de_relay_stop(r, 10000);
    de_conf_destroy(conf);
}

#endif

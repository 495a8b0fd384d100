/* SPDX-License-Identifier: MIT */
/*
 * bench_relay.c -- the relay's throughput, latency and memory.
 *
 * The Kafka cluster is librdkafka's mock cluster with 3 brokers, run in
 * its own process (`deliveryevents mock-cluster`), as a broker would be.
 *
 * 1. Drain: a backlog of BENCH_EVENTS (1,000,000) events over 10,000
 *    subjects, 12 partitions, acks=all (idempotence), published by a relay
 *    started on the database -- against raw librdkafka producing the same
 *    messages (same keys, values, headers, producer settings) from memory
 *    to the same cluster.  Rounds alternate; the ratio is relay/raw
 *    throughput.  Target >= 0.8, in at least 4 of 5 rounds.  Then the same
 *    over 200,000 subjects (target >= 0.8) and over 1,000,000 subjects
 *    (reported), BENCH_CARD_ROUNDS (3) rounds each: every subject is new
 *    to the relay, as deliveries are.
 * 2. Latency: one event per transaction at a steady BENCH_RATE (1,500)
 *    events/s, commit -> Kafka acknowledgement, p50/p99/max.  Target p99
 *    <= 2 ms.
 * 3. Memory: peak RSS of a relay process (`deliveryevents relay --drain`)
 *    draining 1,000,000 events over 10,000 and over 1,000,000 subjects,
 *    and BENCH_BIG (10,000,000) events over as many subjects.  Target
 *    flat, <= 64 MiB.
 * 4. Recovery: a relay whose state is BENCH_RECOVER (100,000) events
 *    behind Kafka (its marks set back, as a restored backup would have
 *    them) reads them at activation before it publishes; records read per
 *    second, against a bare librdkafka consumer reading the same records.
 *    (The mock keeps about 5 MiB per partition: more would be "deleted by
 *    retention", and the relay would rightly refuse.)
 *
 * Environment: BENCH_HMAC_KEY (event.hmac.key: sign), BENCH_EVENTS,
 * BENCH_ROUNDS (5), BENCH_CARD_ROUNDS (3; 0 skips the runs over many subjects),
 * BENCH_RATE, BENCH_LAT_EVENTS (6000), BENCH_BIG (10000000; 0 skips the 10M
 * run), BENCH_MEMORY (1; 0 skips the memory runs), DE_TOOL (path of the
 * deliveryevents binary).
 */
#include "bench.h"

#include <deliveryevents.h>
#include <errno.h>
#include <fcntl.h>
#include <librdkafka/rdkafka.h>
#include <signal.h>
#include <stdbool.h>
#include <sqlite3.h>
#include <sys/resource.h>
#include <sys/wait.h>

#define PARTITIONS 12

#include "bench_kafka.h"
#include "bench_raw.h"

/* ---- 1. drain throughput -------------------------------------------- */

/* The relay: start on the backlog, wait until all of it is acknowledged. */
static double run_relay(const char *db_path, const char *state,
                        const char *tmpl, long n)
{
    de_conf *conf = de_conf_new();
    de_relay *r = NULL;
    de_relay_stats st;
    double t0, t;

    BENCH_SET(conf, "bootstrap.servers", bootstrap);
    BENCH_SET(conf, "topic.template", tmpl);
    BENCH_SET(conf, "event.source", "/bench");
    BENCH_SET(conf, "relay.state.path", state);
    /* Keep the rows: each round relays the same backlog afresh. */
    BENCH_SET(conf, "outbox.retention.ms", "315360000000");
    if (getenv("BENCH_SUBJECT_CACHE"))
        BENCH_SET(conf, "relay.subject.cache", getenv("BENCH_SUBJECT_CACHE"));
    BENCH_SET_HMAC(conf);

    de_conf_set_log_cb(conf, quiet, NULL);
    t0 = bench_now();
    BENCH_CHECK(de_relay_start_path(db_path, conf, &r) == DE_OK, "%s",
                de_errmsg());
    de_conf_destroy(conf);
    BENCH_CHECK(de_relay_flush(r, -1) == DE_OK, "%s", de_errmsg());
    t = bench_now() - t0;
    de_relay_stats_get(r, &st);
    BENCH_CHECK(st.published >= (uint64_t)n, "published %llu of %ld",
                (unsigned long long)st.published, n);
    de_relay_stop(r, 10000);
    return (double)n / t;
}

static double cpu_seconds(void)
{
    struct rusage ru;

    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 +
           (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6;
}

static void bench_drain(const char *dir, long n, long rounds, long subjects)
{
    char db[4200], state[4300], tmpl[64];
    struct raw_msg *msgs = raw_msgs(n, subjects);
    int good = 0;
    double *raw = calloc((size_t)rounds, sizeof(double));
    double *rel = calloc((size_t)rounds, sizeof(double));
    double *ratio = calloc((size_t)rounds, sizeof(double));
    double t0;

    BENCH_CHECK(raw && rel && ratio, "out of memory");
    printf("\ndrain: %ld events over %ld subjects, %d partitions, 3 brokers "
           "(mock cluster in its own process), acks=all\n",
           n, subjects, PARTITIONS);
    snprintf(db, sizeof db, "%s/drain-%ld.db", dir, subjects);
    t0 = bench_now();
    make_backlog(db, n, subjects);
    printf("  (backlog written in %.1f s)\n", bench_now() - t0);
    for (long r = 0; r < rounds; r++) {
        double c0, craw = 0, crel = 0;
        const char *topics[2] = {"bench.delivery.events:12", NULL};
        /* Each run gets a fresh cluster (the mock keeps up to 5 MiB per
         * partition, and a fuller mock is a slower one); the order of the
         * two alternates between rounds. */
        for (int k = 0; k < 2; k++) {
            bool do_raw = (k == 0) == (r % 2 == 0);
            start_mock(topics);
            c0 = cpu_seconds();
            if (do_raw) {
                raw[r] = raw_run("bench.delivery.events", msgs, n);
                craw = cpu_seconds() - c0;
            } else {
                snprintf(state, sizeof state, "%s/drain-%ld-%ld.relay", dir,
                         subjects, r);
                snprintf(tmpl, sizeof tmpl, "bench.{subject_type}.events");
                rel[r] = run_relay(db, state, tmpl, n);
                crel = cpu_seconds() - c0;
            }
            stop_mock();
        }
        ratio[r] = rel[r] / raw[r];
        good += ratio[r] >= 0.8;
        printf("  round %ld: raw %8.0f msg/s (%.2f us CPU/msg), relay %8.0f "
               "msg/s (%.2f us CPU/msg), ratio %.3f\n",
               r + 1, raw[r], craw * 1e6 / (double)n, rel[r],
               crel * 1e6 / (double)n, ratio[r]);
    }
    double mraw = bench_median(raw, (size_t)rounds);
    double mrel = bench_median(rel, (size_t)rounds);
    double mq = bench_median(ratio, (size_t)rounds);
    printf("  baseline raw librdkafka from memory : %8.0f msg/s\n", mraw);
    printf("  relay from the outbox               : %8.0f msg/s\n", mrel);
    printf("  ratio relay / raw                   : %8.3f  (median of rounds; "
           "target >= 0.80) %s\n",
           mq, mq >= 0.8 ? "OK" : "UNDER TARGET");
    printf("  rounds at or above 0.80             : %d of %ld\n", good, rounds);
    unlink(db);
    free(msgs);
    free(raw);
    free(rel);
    free(ratio);
}

/* ---- 2. commit -> ack latency ----------------------------------------- */

static void bench_latency(const char *dir, long n, long rate)
{
    char path[4200];
    sqlite3 *db;
    de_outbox *ob;
    de_conf *conf = de_conf_new();
    de_relay *r = NULL;
    de_relay_stats st;
    double *lat = calloc((size_t)n, sizeof(double));
    double period = 1.0 / (double)rate, next, t0;
    char sid[24];
    long warm = n / 10;

    printf("\nlatency: one event per transaction at %ld events/s, commit -> "
           "Kafka ack, %ld events (first %ld are warm-up)\n",
           rate, n, warm);
    snprintf(path, sizeof path, "%s/latency.db", dir);
    BENCH_CHECK(sqlite3_open(path, &db) == SQLITE_OK, "open");
    exec_sql(db, "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;"
                 "CREATE TABLE deliveries(id TEXT PRIMARY KEY, status TEXT)");
    BENCH_CHECK(de_outbox_open(db, NULL, &ob) == DE_OK, "%s", de_errmsg());
    BENCH_SET(conf, "bootstrap.servers", bootstrap);
    BENCH_SET(conf, "topic.template", "lat.{subject_type}.events");
    de_conf_set_log_cb(conf, quiet, NULL);
    BENCH_CHECK(de_relay_start(ob, conf, &r) == DE_OK, "%s", de_errmsg());
    de_conf_destroy(conf);
    next = bench_now();
    for (long i = 0; i < n; i++) {
        de_event ev = {0};
        uint64_t want;
        while (bench_now() < next)
            usleep(50);
        next += period;
        snprintf(sid, sizeof sid, SUBJECT_FMT, (i * 7919) % SUBJECTS);
        ev.subject_type = "delivery";
        ev.subject_id = sid;
        ev.action = "assigned";
        ev.payload = payload;
        exec_sql(db, "BEGIN");
        BENCH_CHECK(de_record(ob, &ev, NULL) == DE_OK, "%s", de_errmsg());
        exec_sql(db, "COMMIT");
        t0 = bench_now();
        want = (uint64_t)i + 1;
        /* Poll the relay's counters (not de_relay_flush, which would wake
         * the relay itself): the commit alone must bring the event out. */
        for (;;) {
            de_relay_stats_get(r, &st);
            if (st.published >= want)
                break;
            usleep(20);
        }
        lat[i] = (bench_now() - t0) * 1e3;
    }
    double p50 = bench_quantile(lat + warm, (size_t)(n - warm), 0.50);
    double p99 = bench_quantile(lat + warm, (size_t)(n - warm), 0.99);
    double mx = bench_quantile(lat + warm, (size_t)(n - warm), 1.0);
    printf("  p50 %.3f ms, p99 %.3f ms, max %.3f ms  (target p99 <= 2 ms) "
           "%s\n",
           p50, p99, mx, p99 <= 2.0 ? "OK" : "OVER TARGET");
    de_relay_stop(r, 10000);
    de_outbox_close(ob);
    sqlite3_close(db);
    free(lat);
}

/* ---- 3. relay process memory ----------------------------------------- */

static void bench_memory(const char *dir, long n, long subjects,
                         const char *label)
{
    char db[4200], boot[1500], tmpl[128];
    struct rusage ru;
    int status;
    pid_t pid;
    double t0 = bench_now(), t;

    snprintf(db, sizeof db, "%s/mem-%ld-%ld.db", dir, n, subjects);
    make_backlog(db, n, subjects);
    snprintf(boot, sizeof boot, "bootstrap.servers=%s", bootstrap);
    snprintf(tmpl, sizeof tmpl,
             "topic.template=mem%ld-%ld.{subject_type}.events", n, subjects);
    t0 = bench_now();
    pid = fork();
    BENCH_CHECK(pid >= 0, "fork");
    if (pid == 0) {
        execl(tool, tool, "relay", "--db", db, "--drain", "-X", boot, "-X",
              tmpl, (char *)NULL);
        _exit(127);
    }
    BENCH_CHECK(wait4(pid, &status, 0, &ru) == pid, "wait4");
    t = bench_now() - t0;
    BENCH_CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0,
                "relay --drain failed (status %d)", status);
    printf("  %-4s backlog (%9ld events, %8ld subjects): peak RSS %6.1f MiB, "
           "drained in %5.1f s (%.0f msg/s)  %s\n",
           label, n, subjects, (double)ru.ru_maxrss / 1024.0, t, (double)n / t,
           ru.ru_maxrss <= 64 * 1024 ? "OK (<= 64 MiB)" : "OVER TARGET");
    unlink(db);
}

/* ---- 4. recovery: reading Kafka at activation ---------------------- */

/* A bare consumer reading every record of the topic once. */
static double run_bare_read(const char *topic, long n)
{
    rd_kafka_conf_t *c = rd_kafka_conf_new();
    rd_kafka_queue_t *q;
    rd_kafka_topic_t *rkt;
    rd_kafka_t *rk;
    char err[512];
    long got = 0;
    double t0 = bench_now();

    rd_kafka_conf_set(c, "bootstrap.servers", bootstrap, err, sizeof err);
    rd_kafka_conf_set(c, "queued.max.messages.kbytes", "8192", err, sizeof err);
    rd_kafka_conf_set_log_cb(c, quiet_rk);
    rk = rd_kafka_new(RD_KAFKA_CONSUMER, c, err, sizeof err);
    BENCH_CHECK(rk != NULL, "%s", err);
    q = rd_kafka_queue_new(rk);
    rkt = rd_kafka_topic_new(rk, topic, NULL);
    for (int p = 0; p < PARTITIONS; p++)
        rd_kafka_consume_start_queue(rkt, p, RD_KAFKA_OFFSET_BEGINNING, q);
    while (got < n) {
        rd_kafka_message_t *m = rd_kafka_consume_queue(q, 1000);
        if (m == NULL)
            continue;
        if (m->err == 0) {
            rd_kafka_headers_t *h = NULL;
            const void *v;
            size_t len;
            /* What the relay reads of each record, at least. */
            rd_kafka_message_headers(m, &h);
            if (h)
                rd_kafka_header_get_last(h, "ce_source", &v, &len);
            got++;
        }
        rd_kafka_message_destroy(m);
    }
    for (int p = 0; p < PARTITIONS; p++)
        rd_kafka_consume_stop(rkt, p);
    rd_kafka_topic_destroy(rkt);
    rd_kafka_queue_destroy(q);
    rd_kafka_destroy(rk);
    return (double)got / (bench_now() - t0);
}

static void bench_recovery(const char *dir, long n)
{
    char db[4200], state[4300], sql[200];
    const char *topics[2] = {"rec.delivery.events:12", NULL};
    de_conf *conf;
    de_relay *r = NULL;
    de_relay_stats st;
    sqlite3 *s;
    double t0, relay_rate, bare_rate;

    printf("\nrecovery: a relay whose state is %ld events behind Kafka reads "
           "them when it becomes active\n",
           n);
    snprintf(db, sizeof db, "%s/recover.db", dir);
    snprintf(state, sizeof state, "%s/recover.relay", dir);
    make_backlog(db, n, SUBJECTS);
    start_mock(topics);
    conf = de_conf_new();
    BENCH_SET(conf, "bootstrap.servers", bootstrap);
    BENCH_SET(conf, "topic.template", "rec.{subject_type}.events");
    BENCH_SET(conf, "event.source", "/bench");
    BENCH_SET(conf, "relay.state.path", state);
    de_conf_set_log_cb(conf, quiet, NULL);
    BENCH_CHECK(de_relay_start_path(db, conf, &r) == DE_OK, "%s", de_errmsg());
    BENCH_CHECK(de_relay_flush(r, -1) == DE_OK, "%s", de_errmsg());
    BENCH_CHECK(de_relay_stop(r, 10000) == DE_OK, "%s", de_errmsg());
    /* Set the marks back to where they were before all of it. */
    BENCH_CHECK(sqlite3_open(state, &s) == SQLITE_OK, "open %s", state);
    snprintf(sql, sizeof sql, "UPDATE de_relay_mark SET next_offset = 0");
    exec_sql(s, sql);
    sqlite3_close(s);
    t0 = bench_now();
    BENCH_CHECK(de_relay_start_path(db, conf, &r) == DE_OK, "%s", de_errmsg());
    do {
        usleep(1000);
        de_relay_stats_get(r, &st);
        BENCH_CHECK(st.active || de_relay_flush(r, 0) != DE_ERR_STATE, "%s",
                    de_errmsg());
    } while (!st.active);
    relay_rate = (double)n / (bench_now() - t0);
    de_relay_stop(r, 10000);
    de_conf_destroy(conf);
    bare_rate = run_bare_read("rec.delivery.events", n);
    stop_mock();
    printf("  bare librdkafka consumer reading them : %8.0f records/s\n",
           bare_rate);
    printf("  relay reading them at activation      : %8.0f records/s "
           "(%.2f s for %ld), ratio %.3f\n",
           relay_rate, (double)n / relay_rate, n, relay_rate / bare_rate);
}

int main(void)
{
    long n = bench_env_long("BENCH_EVENTS", 1000000);
    long rounds = bench_env_long("BENCH_ROUNDS", 5);
    long card_rounds = bench_env_long("BENCH_CARD_ROUNDS", 3);
    long rate = bench_env_long("BENCH_RATE", 1500);
    long lat_n = bench_env_long("BENCH_LAT_EVENTS", 6000);
    long big = bench_env_long("BENCH_BIG", 10000000);
    long recover = bench_env_long("BENCH_RECOVER", 100000);
    long memory = bench_env_long("BENCH_MEMORY", 1);
    char *dir = bench_mkdtemp();
    const char *topics[16];
    char tbuf[16][64];
    int t = 0;

    tool = getenv("DE_TOOL");
    BENCH_CHECK(tool != NULL, "DE_TOOL must name the deliveryevents binary");
    snprintf(tbuf[t], sizeof tbuf[t], "lat.delivery.events:%d", PARTITIONS);
    topics[t] = tbuf[t];
    t++;
    topics[t] = NULL;
    bench_drain(dir, n, rounds, SUBJECTS);
    if (card_rounds > 0) {
        bench_drain(dir, n, card_rounds, 200000);
        bench_drain(dir, n, card_rounds, n);
    }
    start_mock(topics);
    bench_latency(dir, lat_n, rate);
    if (memory) {
        printf("\nmemory: peak RSS of a relay process (deliveryevents relay "
               "--drain) draining a backlog\n");
        bench_memory(dir, 1000000, SUBJECTS, "1M");
        bench_memory(dir, 1000000, 1000000, "1M");
        if (big > 0)
            bench_memory(dir, big, big, "10M");
    }
    stop_mock();
    if (recover > 0)
        bench_recovery(dir, recover);
    bench_rmdir(dir);
    return 0;
}

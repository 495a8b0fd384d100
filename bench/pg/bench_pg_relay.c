/* SPDX-License-Identifier: MIT */
/*
 * bench_pg_relay.c -- the relay on PostgreSQL: how fast it drains a
 * backlog and how soon a commit reaches Kafka, each against a baseline
 * measured in the same run, on a throwaway server (tests/pg/pgserver.c)
 * or DE_PG_CONNINFO, and librdkafka's mock cluster with 3 brokers in its
 * own process (`deliveryevents mock-cluster`, through DE_TOOL).
 *
 * 1. Drain: BENCH_PG_EVENTS (1,000,000) events over 10,000 subjects are
 *    recorded once through de_record in a few big transactions (not
 *    timed) into a template database; each round copies it (CREATE
 *    DATABASE ... TEMPLATE, so every relay starts on the same untouched
 *    backlog and relay state) and times de_relay_start_pg until
 *    de_relay_flush returns, to a fresh cluster, 12 partitions, acks=all
 *    with idempotence as the relay produces.  The relay runs in a process
 *    of its own (this program again, "--relay"), so that its peak RSS is
 *    the relay's alone.  Baseline: raw librdkafka producing the same keys,
 *    values and headers from memory, with the relay's producer settings,
 *    to a fresh cluster.  BENCH_PG_ROUNDS (3) rounds, the order of the two
 *    alternating; target: relay/raw >= 0.8, peak RSS <= 64 MiB (the
 *    child's VmHWM).  Each round also prints the share of one core the
 *    relay's process used (under 100 %, it waits on the server or on
 *    the CPU), and how busy the whole machine was in each half (near
 *    100 %: bound by CPU, the server's backends, the mock cluster and
 *    the relay competing for the same cores).
 * 2. Latency: one event per transaction at a steady BENCH_RATE (1,500)
 *    events/s for BENCH_LAT_EVENTS (6,000), commit return -> Kafka
 *    acknowledgement as the relay's counters show it (as
 *    bench/bench_relay.c measures it); p50/p99/max, target p99 <= 5 ms.
 *    Baseline: raw librdkafka at the same rate, produce -> acknowledgement
 *    of one message at a time (the Kafka round trip alone).
 *
 * BENCH_PG_SUBJECTS (10,000) sets how many subjects the drain's events
 * spread over: a delivery platform's subjects are mostly new (an order
 * lives for a few events), and each subject the relay has not seen
 * costs it a look-up of its counter in the relay's state.
 *
 * BENCH_PG_RELAY_SET ("key=value,...") adds relay settings to the drain's
 * relay, to try one; BENCH_PG_SERVER_OPTIONS ("-c name=value ...") starts
 * the throwaway server with settings of its own (not with
 * DE_PG_CONNINFO), to try a server configuration.  BENCH_PG_PREWARM=1
 * loads each round's copy of the backlog (the outbox, outbox_order and
 * their keys) into shared_buffers with pg_prewarm before its relay half:
 * the backlog as a server whose shared_buffers hold it has it (with
 * BENCH_PG_SERVER_OPTIONS="-c shared_buffers=..." large enough), rather
 * than read from the OS page cache, as a fresh copy is.  Asserts nothing
 * but that every event arrives (timings on a shared machine are not a
 * test).
 *
 * BENCH_PG_PIN=1 keeps the producing side off the cores of the server and
 * the brokers, as in a deployment where those are machines of their own
 * -- approximately: two cores only, so the server and the mock cluster
 * share one.  The producer (raw librdkafka, in this process, or the
 * relay's process) runs on CPU 0 only; everything else (the server and
 * its backends, the mock cluster, this program's own work between
 * halves) on CPU 1 only, and each round prints how busy each CPU was
 * (over the whole half: for the relay, its process's start and stop
 * included, which the rate leaves out).
 * Needs CPUs 0 and 1 and the throwaway server (not DE_PG_CONNINFO); the
 * latency half then runs on the CPUs the benchmark was given, on a
 * server still on CPU 1.
 */
#define PARTITIONS 12

#include "bench_kafka.h"
#include "bench_pg.h"
#include "bench_raw.h"
#include "deliveryevents_pg.h"
#include "pgserver.h"

#include <errno.h>
#include <sched.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>

#define FILL_TXN 100000

/* The server's conninfo without the database ("... dbname=x" is how
 * tpg_fresh_db names it), for databases of our own. */
static char base[700];

static void set_base(const char *conninfo)
{
    char *d;

    snprintf(base, sizeof base, "%s", conninfo);
    d = strstr(base, " dbname=");
    BENCH_CHECK(d != NULL, "no dbname in %s", conninfo);
    *d = '\0';
}

static void admin(const char *sql)
{
    char ci[800];
    PGconn *c;

    snprintf(ci, sizeof ci, "%s dbname=postgres", base);
    c = must_connect(ci);
    must(c, sql);
    PQfinish(c);
}

/* ---- 1. drain throughput -------------------------------------------- */

static bool pinned;        /* BENCH_PG_PIN */
static cpu_set_t unpinned; /* the CPUs the benchmark was given */

/* The calling thread, and the threads and processes it starts from now
 * on, on CPU cpu only (BENCH_PG_PIN), or back on the CPUs it was given
 * (cpu < 0). */
static void pin(int cpu)
{
    cpu_set_t set = unpinned;

    if (!pinned)
        return;
    if (cpu >= 0) {
        CPU_ZERO(&set);
        CPU_SET(cpu, &set);
    }
    BENCH_CHECK(sched_setaffinity(0, sizeof set, &set) == 0,
                "sched_setaffinity(CPU %d): %s", cpu, strerror(errno));
}

/* This process's peak RSS in KiB: VmHWM, the high-water mark of its own
 * address space.  (Not the parent's wait4 ru_maxrss: Linux carries the
 * pre-exec address space's mark into it, i.e. the forking benchmark's
 * size with its records in memory.) */
static long hwm_kib(void)
{
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    long kib = -1;

    BENCH_CHECK(f != NULL, "/proc/self/status: %s", strerror(errno));
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "VmHWM: %ld", &kib) == 1)
            break;
    fclose(f);
    return kib;
}

/* CPU time so far (clock ticks) of the /proc/stat line `which` ("cpu"
 * for all CPUs, "cpu1" for one): busy (everything but idle and iowait)
 * and in all. */
static void cpu_ticks(const char *which, unsigned long long *busy,
                      unsigned long long *total)
{
    unsigned long long v[8] = {0};
    char name[16], line[512];
    FILE *f = fopen("/proc/stat", "r");
    bool found = false;

    BENCH_CHECK(f != NULL, "/proc/stat: %s", strerror(errno));
    while (!found && fgets(line, sizeof line, f))
        found = sscanf(line, "%15s %llu %llu %llu %llu %llu %llu %llu %llu",
                       name, &v[0], &v[1], &v[2], &v[3], &v[4], &v[5], &v[6],
                       &v[7]) == 9 &&
                strcmp(name, which) == 0;
    fclose(f);
    BENCH_CHECK(found, "/proc/stat: no line %s", which);
    *total = 0;
    for (int i = 0; i < 8; i++)
        *total += v[i];
    *busy = *total - v[3] - v[4];
}

/* The whole machine's CPU time so far (cpu_ticks).  A phase that keeps
 * the machine near 100 % busy is bound by CPU, and then every process in
 * it (the server's backends, the mock cluster, the relay) competes for
 * the same cores. */
static void machine_cpu(unsigned long long *busy, unsigned long long *total)
{
    cpu_ticks("cpu", busy, total);
}

/* With BENCH_PG_PIN: how busy CPU 0 and CPU 1 were in a half. */
typedef struct per_cpu {
    unsigned long long busy[2], total[2];
} per_cpu;

static void per_cpu_start(per_cpu *p)
{
    if (!pinned)
        return;
    cpu_ticks("cpu0", &p->busy[0], &p->total[0]);
    cpu_ticks("cpu1", &p->busy[1], &p->total[1]);
}

static void per_cpu_end(const per_cpu *p, double share[2])
{
    static const char *const names[2] = {"cpu0", "cpu1"};

    for (int i = 0; pinned && i < 2; i++) {
        unsigned long long b, t;
        cpu_ticks(names[i], &b, &t);
        share[i] = t > p->total[i]
                       ? (double)(b - p->busy[i]) / (double)(t - p->total[i])
                       : 0;
    }
}

/* The share of the machine busy since busy0, total0 (machine_cpu);
 * *cpu_s receives the busy CPU seconds (all processes, all cores). */
static double busy_since(unsigned long long busy0, unsigned long long total0,
                         double *cpu_s)
{
    unsigned long long busy, total;

    machine_cpu(&busy, &total);
    *cpu_s = (double)(busy - busy0) / (double)sysconf(_SC_CLK_TCK);
    return total > total0 ? (double)(busy - busy0) / (double)(total - total0)
                          : 0;
}

/* The relay's process ("--relay conninfo bootstrap n"): drains and says
 * how long it took, how much it published and read, its peak RSS. */
static int relay_child(const char *conninfo, const char *boot, long n)
{
    de_conf *conf = de_conf_new();
    de_relay *r = NULL;
    de_relay_stats st;
    double t0, t;

    BENCH_CHECK(conf != NULL, "out of memory");
    BENCH_SET(conf, "bootstrap.servers", boot);
    BENCH_SET(conf, "topic.template", "bench.{subject_type}.events");
    BENCH_SET(conf, "event.source", "/bench");
    BENCH_SET_HMAC(conf);
    if (getenv("BENCH_PG_RELAY_SET")) { /* "key=value,key=value" */
        char *set = strdup(getenv("BENCH_PG_RELAY_SET")), *save = NULL;
        BENCH_CHECK(set != NULL, "out of memory");
        for (char *kv = strtok_r(set, ",", &save); kv;
             kv = strtok_r(NULL, ",", &save)) {
            char *eq = strchr(kv, '=');
            BENCH_CHECK(eq != NULL, "BENCH_PG_RELAY_SET: %s", kv);
            *eq = '\0';
            BENCH_SET(conf, kv, eq + 1);
        }
        free(set);
    }
    de_conf_set_log_cb(conf, quiet, NULL);
    t0 = bench_now();
    BENCH_CHECK(de_relay_start_pg(conninfo, conf, &r) == DE_OK, "%s",
                de_errmsg());
    de_conf_destroy(conf);
    BENCH_CHECK(de_relay_flush(r, -1) == DE_OK, "%s", de_errmsg());
    t = bench_now() - t0;
    de_relay_stats_get(r, &st);
    BENCH_CHECK(st.published >= (uint64_t)n, "published %llu of %ld",
                (unsigned long long)st.published, n);
    printf("%.6f %llu %llu %ld\n", t, (unsigned long long)st.published,
           (unsigned long long)st.read, hwm_kib());
    fflush(stdout);
    de_relay_stop(r, 10000);
    return 0;
}

/* Runs the relay's process on conninfo; its rate, its peak RSS in KiB,
 * the CPU seconds it used (user + system, all its threads). */
static double run_relay(const char *conninfo, long n, long *rss_kib,
                        double *cpu)
{
    char nbuf[24], line[256];
    unsigned long long published, read;
    int out[2], status;
    struct rusage ru;
    double t = 0;
    FILE *f;
    pid_t pid;

    snprintf(nbuf, sizeof nbuf, "%ld", n);
    BENCH_CHECK(pipe(out) == 0, "pipe");
    pid = fork();
    BENCH_CHECK(pid >= 0, "fork");
    if (pid == 0) {
        pin(0);
        dup2(out[1], 1);
        close(out[0]);
        close(out[1]);
        execl("/proc/self/exe", "bench_pg_relay", "--relay", conninfo,
              bootstrap, nbuf, (char *)NULL);
        _exit(127);
    }
    close(out[1]);
    f = fdopen(out[0], "r");
    BENCH_CHECK(f != NULL, "fdopen");
    BENCH_CHECK(fgets(line, sizeof line, f) != NULL &&
                    sscanf(line, "%lf %llu %llu %ld", &t, &published, &read,
                           rss_kib) == 4,
                "the relay's process said nothing");
    fclose(f);
    BENCH_CHECK(wait4(pid, &status, 0, &ru) == pid, "wait4");
    BENCH_CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0,
                "relay process failed (status %d)", status);
    *cpu = (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 +
           (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6;
    return (double)n / t;
}

/* Loads the outbox of the database at conninfo into shared_buffers
 * (BENCH_PG_PREWARM); prints how many blocks it loaded. */
static void prewarm(const char *conninfo)
{
    PGconn *c = must_connect(conninfo);
    PGresult *r;

    must(c, "CREATE EXTENSION IF NOT EXISTS pg_prewarm");
    r = PQexec(c, "SELECT sum(pg_prewarm(t)) FROM unnest(ARRAY["
                  "'deliveryevents.outbox', 'deliveryevents.outbox_pkey', "
                  "'deliveryevents.outbox_order', "
                  "'deliveryevents.outbox_order_pkey']::regclass[]) t");
    BENCH_CHECK(PQresultStatus(r) == PGRES_TUPLES_OK, "pg_prewarm: %s",
                PQerrorMessage(c));
    printf("  (prewarmed %s blocks into shared_buffers)\n",
           PQgetvalue(r, 0, 0));
    PQclear(r);
    PQfinish(c);
}

/* The template database: n events over `subjects` subjects (event x of
 * subject x mod subjects, as bench_kafka.h's make_backlog), recorded in
 * transactions of FILL_TXN. */
static void fill(const char *conninfo, long n, long subjects)
{
    PGconn *c = must_connect(conninfo);
    de_outbox *ob = NULL;
    char sid[24];

    BENCH_CHECK(de_outbox_open_pg(c, NULL, &ob) == DE_OK, "%s", de_errmsg());
    /* Nothing here waits for the disk: the backlog is not what is timed. */
    must(c, "SET synchronous_commit = off");
    for (long x = 1; x <= n; x++) {
        de_event ev = {0};
        if ((x - 1) % FILL_TXN == 0)
            must(c, "BEGIN");
        snprintf(sid, sizeof sid, SUBJECT_FMT, x % subjects);
        ev.subject_type = "delivery";
        ev.subject_id = sid;
        ev.action = "assigned";
        ev.payload = payload;
        BENCH_CHECK(de_record(ob, &ev, NULL) == DE_OK, "%s", de_errmsg());
        if (x % FILL_TXN == 0 || x == n)
            must(c, "COMMIT");
    }
    de_outbox_close(ob);
    must(c, "VACUUM ANALYZE");
    must(c, "CHECKPOINT");
    PQfinish(c);
}

static void bench_drain(long n, long rounds, long subjects)
{
    struct raw_msg *msgs = raw_msgs(n, subjects);
    double *raw = calloc((size_t)rounds, sizeof(double));
    double *rel = calloc((size_t)rounds, sizeof(double));
    double *ratio = calloc((size_t)rounds, sizeof(double));
    double *raw_us = calloc((size_t)rounds, sizeof(double));
    double *rel_us = calloc((size_t)rounds, sizeof(double));
    const char *topics[2] = {"bench.delivery.events:12", NULL};
    char tmpl[64], sql[256], ci[800];
    long peak = 0;
    int good = 0;
    double t0;

    BENCH_CHECK(raw && rel && ratio && raw_us && rel_us, "out of memory");
    printf("drain: %ld events over %ld subjects, %d partitions, 3 brokers "
           "(mock cluster in its own process), acks=all%s\n",
           n, subjects, PARTITIONS,
           pinned ? "; pinned (BENCH_PG_PIN): producer on CPU 0, server "
                    "and mock cluster on CPU 1"
                  : "");
    snprintf(tmpl, sizeof tmpl, "%s", strstr(tpg_fresh_db(), " dbname=") + 8);
    snprintf(ci, sizeof ci, "%s dbname=%s", base, tmpl);
    t0 = bench_now();
    fill(ci, n, subjects);
    printf("  (backlog recorded through de_record in %.1f s)\n",
           bench_now() - t0);
    for (long r = 0; r < rounds; r++) {
        long rss = 0;
        double cpu = 0, busy_raw = 0, busy_rel = 0, cpu_s = 0;
        double cpus_raw[2] = {0}, cpus_rel[2] = {0};
        unsigned long long b0, t0m;
        per_cpu pc;
        snprintf(sql, sizeof sql, "CREATE DATABASE %s_r%ld TEMPLATE %s", tmpl,
                 r, tmpl);
        admin(sql);
        for (int k = 0; k < 2; k++) {
            bool do_raw = (k == 0) == (r % 2 == 0);
            start_mock(topics);
            machine_cpu(&b0, &t0m);
            per_cpu_start(&pc);
            if (do_raw) {
                pin(0);
                raw[r] = raw_run("bench.delivery.events", msgs, n);
                pin(1);
                per_cpu_end(&pc, cpus_raw);
                busy_raw = busy_since(b0, t0m, &cpu_s);
                raw_us[r] = 1e6 * cpu_s / (double)n;
            } else {
                snprintf(ci, sizeof ci, "%s dbname=%s_r%ld", base, tmpl, r);
                if (bench_env_long("BENCH_PG_PREWARM", 0) != 0) {
                    prewarm(ci);
                    machine_cpu(&b0, &t0m);
                    per_cpu_start(&pc);
                }
                rel[r] = run_relay(ci, n, &rss, &cpu);
                per_cpu_end(&pc, cpus_rel);
                busy_rel = busy_since(b0, t0m, &cpu_s);
                rel_us[r] = 1e6 * cpu_s / (double)n;
            }
            stop_mock();
        }
        snprintf(sql, sizeof sql, "DROP DATABASE %s_r%ld", tmpl, r);
        admin(sql);
        ratio[r] = rel[r] / raw[r];
        good += ratio[r] >= 0.8;
        if (rss > peak)
            peak = rss;
        printf("  round %ld: raw %8.0f msg/s, relay %8.0f msg/s, ratio "
               "%.3f, relay peak RSS %.1f MiB, relay CPU %.1f%% of its "
               "wall time, machine busy %.0f%% (raw) / %.0f%% (relay), "
               "machine CPU per event %.1f us (raw) / %.1f us (relay)\n",
               r + 1, raw[r], rel[r], ratio[r], (double)rss / 1024.0,
               100.0 * cpu * rel[r] / (double)n, 100.0 * busy_raw,
               100.0 * busy_rel, raw_us[r], rel_us[r]);
        if (pinned)
            printf("    busy: CPU 0 (producer) %.0f%% (raw) / %.0f%% (relay), "
                   "CPU 1 (server, mock cluster) %.0f%% (raw) / %.0f%% "
                   "(relay)\n",
                   100.0 * cpus_raw[0], 100.0 * cpus_rel[0],
                   100.0 * cpus_raw[1], 100.0 * cpus_rel[1]);
        fflush(stdout);
    }
    double mraw = bench_median(raw, (size_t)rounds);
    double mrel = bench_median(rel, (size_t)rounds);
    double mq = bench_median(ratio, (size_t)rounds);
    printf("  baseline raw librdkafka from memory : %8.0f msg/s\n", mraw);
    printf("  relay from the PostgreSQL outbox    : %8.0f msg/s\n", mrel);
    printf("  ratio relay / raw                   : %8.3f  (median of rounds; "
           "target >= 0.80) %s\n",
           mq, mq >= 0.8 ? "OK" : "UNDER TARGET");
    printf("  rounds at or above 0.80             : %d of %ld\n", good, rounds);
    {
        /* Where the machine is the limit (busy near 100 % in both
         * halves), the ratio cannot exceed raw's CPU per event over the
         * relay's: every process of each half is counted (the relay, the
         * server's backends, the mock cluster, librdkafka). */
        double ru = bench_median(raw_us, (size_t)rounds);
        double lu = bench_median(rel_us, (size_t)rounds);
        printf("  machine CPU per event (medians)     : raw %.1f us, relay "
               "%.1f us; bound on a CPU-bound machine: ratio <= %.2f\n",
               ru, lu, lu > 0 ? ru / lu : 0);
    }
    printf("  relay peak RSS (largest round)      : %8.1f MiB  (target <= 64 "
           "MiB) %s\n",
           (double)peak / 1024.0, peak <= 64 * 1024 ? "OK" : "OVER TARGET");
    free(msgs);
    free(raw);
    free(rel);
    free(ratio);
    free(raw_us);
    free(rel_us);
}

/* ---- 2. commit -> ack latency ----------------------------------------- */

static void paced(double *next, double period)
{
    while (bench_now() < *next)
        usleep(50);
    *next += period;
}

static void report(const char *what, double *lat, long n, long warm,
                   double *p99)
{
    double p50 = bench_quantile(lat + warm, (size_t)(n - warm), 0.50);
    double mx = bench_quantile(lat + warm, (size_t)(n - warm), 1.0);

    *p99 = bench_quantile(lat + warm, (size_t)(n - warm), 0.99);
    printf("  %-38s: p50 %.3f ms, p99 %.3f ms, max %.3f ms\n", what, p50, *p99,
           mx);
}

/* The Kafka round trip alone: one message at a time, produce -> ack, at
 * the same rate and with the relay's settings (it flushes when it has
 * caught up, as here). */
static double raw_latency(long n, long rate, long warm)
{
    rd_kafka_t *rk = raw_producer();
    rd_kafka_topic_t *rkt = rd_kafka_topic_new(rk, "lat.delivery.events", NULL);
    double *lat = calloc((size_t)n, sizeof(double));
    double period = 1.0 / (double)rate, next = bench_now(), t0, p99;
    struct raw_msg m;

    BENCH_CHECK(lat != NULL, "out of memory");
    raw_acked = 0;
    for (long i = 0; i < n; i++) {
        paced(&next, period);
        memset(&m, 0, sizeof m);
        snprintf(m.id, sizeof m.id, "01937a1e-0000-7000-8000-%012lx", i + 1);
        snprintf(m.key, sizeof m.key, SUBJECT_FMT, (i * 7919) % SUBJECTS);
        m.ts = 1795604400000 + i;
        m.seq = i / SUBJECTS + 1;
        m.epoch = 1;
        t0 = bench_now();
        raw_produce(rk, rkt, &m, i);
        while (raw_acked < i + 1)
            rd_kafka_flush(rk, 1);
        lat[i] = (bench_now() - t0) * 1e3;
    }
    report("raw librdkafka, produce -> ack", lat, n, warm, &p99);
    rd_kafka_topic_destroy(rkt);
    rd_kafka_destroy(rk);
    free(lat);
    return p99;
}

static void bench_latency(long n, long rate)
{
    const char *topics[2] = {"lat.delivery.events:12", NULL};
    const char *conninfo = tpg_fresh_db();
    PGconn *c = must_connect(conninfo);
    de_outbox *ob = NULL;
    de_conf *conf = de_conf_new();
    de_relay *r = NULL;
    de_relay_stats st;
    double *lat = calloc((size_t)n, sizeof(double));
    double period = 1.0 / (double)rate, next, t0, p99, raw99;
    char sid[24];
    long warm = n / 10;

    BENCH_CHECK(conf && lat, "out of memory");
    printf("\nlatency: one event per transaction at %ld events/s, %ld events "
           "(first %ld are warm-up)\n",
           rate, n, warm);
    start_mock(topics);
    raw99 = raw_latency(n, rate, warm);
    BENCH_CHECK(de_outbox_open_pg(c, NULL, &ob) == DE_OK, "%s", de_errmsg());
    BENCH_SET(conf, "bootstrap.servers", bootstrap);
    BENCH_SET(conf, "topic.template", "lat.{subject_type}.events");
    BENCH_SET(conf, "event.source", "/bench");
    de_conf_set_log_cb(conf, quiet, NULL);
    BENCH_CHECK(de_relay_start_pg(conninfo, conf, &r) == DE_OK, "%s",
                de_errmsg());
    de_conf_destroy(conf);
    next = bench_now();
    for (long i = 0; i < n; i++) {
        de_event ev = {0};
        uint64_t want = (uint64_t)i + 1;
        paced(&next, period);
        snprintf(sid, sizeof sid, SUBJECT_FMT, (i * 7919) % SUBJECTS);
        ev.subject_type = "delivery";
        ev.subject_id = sid;
        ev.action = "assigned";
        ev.payload = payload;
        must(c, "BEGIN");
        BENCH_CHECK(de_record(ob, &ev, NULL) == DE_OK, "%s", de_errmsg());
        must(c, "COMMIT");
        t0 = bench_now();
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
    report("relay, commit return -> ack", lat, n, warm, &p99);
    printf("  p99 relay / raw %.2f; target p99 <= 5 ms: %s\n", p99 / raw99,
           p99 <= 5.0 ? "OK" : "OVER TARGET");
    de_relay_stop(r, 10000);
    stop_mock();
    de_outbox_close(ob);
    PQfinish(c);
    free(lat);
}

int main(int argc, char **argv)
{
    long n = bench_env_long("BENCH_PG_EVENTS", 1000000);
    long rounds = bench_env_long("BENCH_PG_ROUNDS", 3);
    long rate = bench_env_long("BENCH_RATE", 1500);
    long lat_n = bench_env_long("BENCH_LAT_EVENTS", 6000);

    /* bench_kafka.h's SQLite helpers, unused here. */
    (void)exec_sql;
    (void)make_backlog;
    if (argc == 5 && strcmp(argv[1], "--relay") == 0)
        return relay_child(argv[2], argv[3], strtol(argv[4], NULL, 10));
    tool = getenv("DE_TOOL");
    BENCH_CHECK(tool != NULL, "DE_TOOL must name the deliveryevents binary");
    BENCH_CHECK(n > 0 && rounds > 0 && rate > 0 && lat_n > 10,
                "BENCH_PG_EVENTS, BENCH_PG_ROUNDS, BENCH_RATE, "
                "BENCH_LAT_EVENTS must be positive");
    if (getenv("BENCH_PG_SERVER_OPTIONS") != NULL)
        tpg_server_options(getenv("BENCH_PG_SERVER_OPTIONS"));
    if (bench_env_long("BENCH_PG_PIN", 0) != 0) {
        BENCH_CHECK(sched_getaffinity(0, sizeof unpinned, &unpinned) == 0 &&
                        CPU_ISSET(0, &unpinned) && CPU_ISSET(1, &unpinned),
                    "BENCH_PG_PIN needs CPUs 0 and 1");
        BENCH_CHECK(getenv("DE_PG_CONNINFO") == NULL,
                    "BENCH_PG_PIN places the benchmark's own server; with "
                    "DE_PG_CONNINFO there is none to place");
        pinned = true;
        pin(1); /* the server and the mock cluster start from here */
    }
    if (!tpg_start())
        return 1;
    set_base(tpg_fresh_db());
    if (n > 0)
        bench_drain(n, rounds,
                    getenv("BENCH_PG_SUBJECTS")
                        ? strtol(getenv("BENCH_PG_SUBJECTS"), NULL, 10)
                        : SUBJECTS);
    pin(-1);
    if (lat_n > 0)
        bench_latency(lat_n, rate);
    tpg_stop();
    return 0;
}

/* SPDX-License-Identifier: MIT */
/*
 * check_consumer.c -- de_consumer: every event applied exactly once, in
 * per-subject order, into the consumer's own database, through relay
 * restarts, consumer crashes and rebalances; records that are not ours
 * parked, never fatal; failing handlers retried, dead-lettered, released.
 *
 * Events are recorded through the outbox (with a ledger row in the same
 * transaction) and published by the relay; the test handler writes an
 * `applied` row per event in the consumer's database, so the effects can
 * be compared with the ledger: same events, each once, in order.
 */
#include "kafka.h"

#include <fcntl.h>
#include <jansson.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

/* The service fixture of tests/util/kafka.c, under short names. */
#define dir tu_dir
#define db tu_db
#define ob tu_ob
#define setup tu_service_setup
#define teardown tu_service_teardown

/* ---- the consumer side, shared with the helper processes -------------- */

static const char applied_sql[] =
    "CREATE TABLE IF NOT EXISTS applied(n INTEGER PRIMARY KEY, "
    "subject_type TEXT, subject_id TEXT, seq INTEGER, event_id TEXT, "
    "action TEXT, type TEXT, source TEXT, occurred_at_ms INTEGER, "
    "topic TEXT, partition INTEGER, offset INTEGER, payload TEXT, "
    "pid INTEGER)";

/* Set (in the consumer's process) to make handlers for this subject
 * fail; "D-BAD" fails every time, "D-SKIP" only its second event. */
struct failing {
    const char *subject;
    int64_t only_seq; /* 0: every event */
};

static de_err record_applied(sqlite3 *cdb, const de_event_view *ev, void *ctx)
{
    const struct failing *f = ctx;
    sqlite3_stmt *st;
    int rc;

    if (f && f->subject && strcmp(ev->subject_id, f->subject) == 0 &&
        (f->only_seq == 0 || f->only_seq == ev->subject_seq))
        return DE_ERR_STATE; /* the "downstream" is unavailable */
    if (sqlite3_prepare_v2(cdb,
                           "INSERT INTO applied(subject_type, subject_id, "
                           "seq, event_id, action, type, source, "
                           "occurred_at_ms, topic, partition, offset, "
                           "payload, pid) VALUES (?1, ?2, ?3, ?4, ?5, ?6, "
                           "?7, ?8, ?9, ?10, ?11, ?12, ?13)",
                           -1, &st, NULL) != SQLITE_OK)
        return DE_ERR_DB;
    sqlite3_bind_text(st, 1, ev->subject_type, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, ev->subject_id, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 3, ev->subject_seq);
    sqlite3_bind_text(st, 4, ev->event_id, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 5, ev->action, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 6, ev->type, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 7, ev->source, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 8, ev->occurred_at_ms);
    sqlite3_bind_text(st, 9, ev->topic, -1, SQLITE_STATIC);
    sqlite3_bind_int(st, 10, ev->partition);
    sqlite3_bind_int64(st, 11, ev->offset);
    sqlite3_bind_text(st, 12, ev->payload, (int)ev->payload_len, SQLITE_STATIC);
    sqlite3_bind_int64(st, 13, (int64_t)getpid());
    rc = sqlite3_step(st);
    sqlite3_finalize(st);
    return rc == SQLITE_DONE ? DE_OK : DE_ERR_DB;
}

/* Opens a consumer of group `group` on cdb for topics under prefix, with
 * the extra settings kv (key, value, ..., NULL; kv may be NULL).  The
 * group id carries the prefix too, so that no two tests (or runs, on a
 * real cluster) ever share a group. */
static de_err open_consumer_kv(sqlite3 *cdb, const char *bootstrap,
                               const char *prefix, const char *group,
                               const char *const *kv, struct failing *f,
                               de_consumer **out)
{
    de_conf *conf = de_conf_new();
    char tmpl[128], gid[192];
    de_err err = DE_OK;

    snprintf(tmpl, sizeof tmpl, "%s{subject_type}.events", prefix);
    snprintf(gid, sizeof gid, "%s%s", prefix, group);
    de_conf_set_log_cb(conf, tu_log, NULL);
    if ((err = de_conf_set(conf, "bootstrap.servers", bootstrap)) != DE_OK ||
        (err = de_conf_set(conf, "group.id", gid)) != DE_OK ||
        (err = de_conf_set(conf, "topic.template", tmpl)) != DE_OK ||
        (err = de_conf_set(conf, "consumer.retry.backoff.ms", "10")) != DE_OK ||
        (err = de_conf_set(conf, "consumer.max.attempts", "3")) != DE_OK)
        goto done;
    for (int i = 0; kv && kv[i]; i += 2)
        if ((err = de_conf_set(conf, kv[i], kv[i + 1])) != DE_OK)
            goto done;
    sqlite3_exec(cdb, applied_sql, NULL, NULL, NULL);
    if ((err = de_consumer_open(cdb, conf, out)) != DE_OK)
        goto done;
    if ((err = de_consumer_on(*out, "delivery", NULL, record_applied, f)) !=
            DE_OK ||
        (err = de_consumer_on(*out, "rider", NULL, record_applied, f)) !=
            DE_OK) {
        de_consumer_close(*out);
        *out = NULL;
    }
done:
    de_conf_destroy(conf);
    return err;
}

static de_err open_consumer(sqlite3 *cdb, const char *bootstrap,
                            const char *prefix, const char *group,
                            const char *extra_key, const char *extra_value,
                            struct failing *f, de_consumer **out)
{
    const char *kv[] = {extra_key, extra_value, NULL};

    return open_consumer_kv(cdb, bootstrap, prefix, group,
                            extra_key ? kv : NULL, f, out);
}

static int64_t applied_count(sqlite3 *cdb)
{
    return tu_query_int(cdb, "SELECT count(*) FROM applied");
}

/* Polls until `want` events are applied in total (by any consumer on the
 * file) or timeout_ms passes. */
static void poll_until(de_consumer *c, sqlite3 *cdb, int64_t want,
                       int timeout_ms)
{
    int64_t deadline = tu_now_ms() + timeout_ms;

    while (applied_count(cdb) < want && tu_now_ms() < deadline)
        tu_ok(de_consumer_poll(c, 100, NULL));
}

/* One short poll, then the consumer's stats into st: for tu_wait_for
 * conditions, so that tests wait for an outcome, never for a guessed
 * number of polls (a partition may be fetched late). */
static void poll_stats(de_consumer *c, de_consumer_stats *st)
{
    tu_ok(de_consumer_poll(c, 20, NULL));
    tu_ok(de_consumer_stats_get(c, st));
}

static int64_t dead_letters(sqlite3 *cdb, const char *kind)
{
    char sql[200];

    snprintf(sql, sizeof sql,
             "SELECT count(*) FROM de_dead_letter WHERE kind = '%s'", kind);
    return tu_query_int(cdb, sql);
}

/* The effects match the ledger: every committed event applied exactly
 * once, each subject's in commit order, with the right ids. */
static void assert_exactly_once(sqlite3 *cdb)
{
    char sql[512];

    snprintf(sql, sizeof sql, "ATTACH '%s' AS svc", tu_path(dir, "service.db"));
    tu_exec(cdb, sql);
    ck_assert_int_eq(applied_count(cdb),
                     tu_query_int(cdb, "SELECT count(*) FROM svc.ledger"));
    /* Each event once. */
    ck_assert_int_eq(
        tu_query_int(cdb, "SELECT count(*) FROM (SELECT event_id FROM "
                          "applied GROUP BY event_id HAVING count(*) > 1)"),
        0);
    /* The n-th applied event of a subject is its n-th committed one, and
     * carries sequence number n. */
    ck_assert_int_eq(
        tu_query_int(cdb, "WITH a AS (SELECT subject_type, subject_id, seq, "
                          "event_id, row_number() OVER (PARTITION BY "
                          "subject_type, subject_id ORDER BY n) AS k FROM "
                          "applied), l AS (SELECT subject_type, subject_id, "
                          "event_id, row_number() OVER (PARTITION BY "
                          "subject_type, subject_id ORDER BY n) AS k FROM "
                          "svc.ledger) SELECT count(*) FROM a JOIN l USING "
                          "(subject_type, subject_id, k) WHERE a.event_id = "
                          "l.event_id AND a.seq = a.k"),
        tu_query_int(cdb, "SELECT count(*) FROM svc.ledger"));
    tu_exec(cdb, "DETACH svc");
}

static void write_events(int subjects, int per, const char *type)
{
    char id[32], payload[64];

    for (int i = 0; i < per; i++)
        for (int s = 0; s < subjects; s++) {
            snprintf(id, sizeof id, "D-%03d", s);
            snprintf(payload, sizeof payload, "{\"n\":%d}", i);
            tu_write(db, ob, type, id, "assigned", payload, 0);
        }
}

static de_relay *start_relay(tu_cluster *c)
{
    de_conf *conf = tu_relay_conf(c, NULL);
    de_relay *r = NULL;

    tu_ok(de_relay_start(ob, conf, &r));
    de_conf_destroy(conf);
    return r;
}

START_TEST(applies_each_event_once_in_order)
{
    tu_cluster *c = tu_cluster_new(_i, 3);
    sqlite3 *cdb = tu_open_shared(tu_path(dir, "consumer.db"));
    de_consumer *con = NULL;
    de_relay *r;
    de_consumer_stats st;

    tu_topic_create(c, "delivery", 4);
    tu_topic_create(c, "rider", 2);
    r = start_relay(c);
    write_events(20, 6, "delivery");
    write_events(5, 4, "rider");
    tu_write(db, ob, "delivery", "D-000", "canceled", "{}",
             1); /* rolled back */
    tu_ok(de_relay_flush(r, 30000));
    tu_ok(open_consumer(cdb, c->bootstrap, c->prefix, "g1", NULL, NULL, NULL,
                        &con));
    poll_until(con, cdb, 140, 60000);
    tu_ok(de_consumer_stats_get(con, &st));
    ck_assert_uint_eq(st.applied, 140);
    ck_assert_uint_eq(st.foreign, 0);
    ck_assert_uint_eq(st.gaps, 0);
    ck_assert_uint_lt(st.batches, 140); /* several events per transaction */
    /* The view carries the envelope. */
    ck_assert_int_eq(
        tu_query_int(cdb, "SELECT count(*) FROM applied WHERE type = "
                          "subject_type || '.' || action AND source = "
                          "'/test/relay' AND occurred_at_ms > 0 AND offset "
                          ">= 0 AND topic LIKE '%.events' AND payload LIKE "
                          "'{\"n\":%'"),
        140);
    tu_ok(de_consumer_close(con));
    assert_exactly_once(cdb);
    tu_ok(de_relay_stop(r, 5000));
    sqlite3_close(cdb);
    tu_cluster_destroy(c);
}
END_TEST

struct stats_seen {
    int docs;
    uint64_t applied; /* in the last document */
    int has_rdkafka;
    char group[256];
};

/* The statistics callback: on the polling thread, inside
 * de_consumer_poll. */
static void keep_stats(void *ctx, const char *json, size_t len)
{
    struct stats_seen *s = ctx;
    json_t *doc = json_loadb(json, len, 0, NULL);

    ck_assert_ptr_nonnull(doc);
    ck_assert_str_eq(json_string_value(json_object_get(doc, "client")),
                     "consumer");
    s->docs++;
    s->applied = (uint64_t)json_integer_value(json_object_get(doc, "applied"));
    s->has_rdkafka = json_is_object(
        json_object_get(json_object_get(doc, "rdkafka"), "cgrp"));
    snprintf(s->group, sizeof s->group, "%s",
             json_string_value(json_object_get(doc, "group")));
    json_decref(doc);
}

/* Monitoring: statistics as one JSON document every
 * statistics.interval.ms (with librdkafka's own, consumer group
 * included), and the counters in the Prometheus text format, the label
 * escaped as the format requires. */
START_TEST(consumer_statistics_and_prometheus_metrics)
{
    tu_cluster *c = tu_cluster_new(_i, 1);
    sqlite3 *cdb = tu_open_shared(tu_path(dir, "consumer.db"));
    de_conf *conf = de_conf_new();
    de_consumer *con = NULL;
    de_relay *r;
    struct stats_seen seen = {0};
    char tmpl[128], gid[192], want[512], *text;
    size_t len = 0;

    tu_topic_create(c, "delivery", 2);
    r = start_relay(c);
    write_events(10, 3, "delivery");
    tu_ok(de_relay_flush(r, 30000));
    snprintf(tmpl, sizeof tmpl, "%s{subject_type}.events", c->prefix);
    snprintf(gid, sizeof gid, "%sg\"1\\", c->prefix);
    de_conf_set_log_cb(conf, tu_log, NULL);
    de_conf_set_stats_cb(conf, keep_stats, &seen);
    tu_ok(de_conf_set(conf, "bootstrap.servers", c->bootstrap));
    tu_ok(de_conf_set(conf, "group.id", gid));
    tu_ok(de_conf_set(conf, "topic.template", tmpl));
    tu_ok(de_conf_set(conf, "statistics.interval.ms", "100"));
    sqlite3_exec(cdb, applied_sql, NULL, NULL, NULL);
    tu_ok(de_consumer_open(cdb, conf, &con));
    de_conf_destroy(conf);
    tu_ok(de_consumer_on(con, "delivery", NULL, record_applied, NULL));
    poll_until(con, cdb, 30, 60000);
    ck_assert(tu_wait_for(
        (tu_ok(de_consumer_poll(con, 20, NULL)), seen.applied == 30), 20000));
    ck_assert(seen.has_rdkafka);
    ck_assert_str_eq(seen.group, gid);

    tu_assert_err(de_consumer_metrics_prometheus(con, NULL, 0, &len),
                  DE_ERR_ARG, "too small");
    text = malloc(len + 1);
    tu_ok(de_consumer_metrics_prometheus(con, text, len + 1, &len));
    snprintf(want, sizeof want,
             "# TYPE deliveryevents_consumer_applied_total counter\n"
             "deliveryevents_consumer_applied_total{group=\"%sg\\\"1\\\\\"} "
             "30\n",
             c->prefix);
    ck_assert_msg(strstr(text, want), "want\n%s\nin\n%s", want, text);
    ck_assert(strstr(text, "# TYPE deliveryevents_consumer_parked_subjects "
                           "gauge\n"));
    free(text);
    tu_ok(de_consumer_close(con));
    tu_ok(de_relay_stop(r, 5000));
    sqlite3_close(cdb);
    tu_cluster_destroy(c);
}
END_TEST

/* ---- helper processes ------------------------------------------------- */

static pid_t spawn(const char *const *args)
{
    /* Everything the child needs is ready before fork: this process has
     * librdkafka's threads, and the child may only exec (no malloc). */
    bool quiet = getenv("DE_TEST_LOG") == NULL;
    char *argv[32];
    int n = 0;
    pid_t pid;

    /* execv's prototype predates const; it does not write them. */
    for (; args[n] && n < 31; n++)
        argv[n] = (char *)(uintptr_t)args[n];
    argv[n] = NULL;
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

static pid_t spawn_consumer(tu_cluster *c, const char *group)
{
    const char *args[] = {"/proc/self/exe",
                          "--consume",
                          tu_path(dir, "consumer.db"),
                          c->bootstrap,
                          c->prefix,
                          group,
                          NULL};
    return spawn(args);
}

/* A relay process that checkpoints only once at its start (long
 * checkpoint interval and lease), so that killing it guarantees resends. */
static pid_t spawn_relay(tu_cluster *c)
{
    static char boot[600], tmpl[200];
    const char *args[] = {getenv("DE_TOOL"),
                          "relay",
                          "--db",
                          tu_path(dir, "service.db"),
                          "-X",
                          boot,
                          "-X",
                          tmpl,
                          "-X",
                          "event.source=/test/relay",
                          "-X",
                          "relay.checkpoint.interval.ms=600000",
                          "-X",
                          "relay.lease.timeout.ms=600000",
                          NULL};

    ck_assert_msg(args[0] != NULL, "DE_TOOL unset");
    snprintf(boot, sizeof boot, "bootstrap.servers=%s", c->bootstrap);
    snprintf(tmpl, sizeof tmpl, "topic.template=%s{subject_type}.events",
             c->prefix);
    return spawn(args);
}

static void kill9(pid_t pid)
{
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
}

/* Records on a topic: the sum of its partitions' high watermarks. */
static int64_t topic_records(tu_cluster *c, const char *type, int parts)
{
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    char err[256];
    rd_kafka_t *rk;
    int64_t sum = 0, lo, hi;

    rd_kafka_conf_set(conf, "bootstrap.servers", c->bootstrap, err, sizeof err);
    rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, err, sizeof err);
    for (int p = 0; p < parts; p++)
        if (rd_kafka_query_watermark_offsets(rk, tu_topic(c, type), p, &lo, &hi,
                                             5000) == 0)
            sum += hi;
    rd_kafka_destroy(rk);
    return sum;
}

static void expire_lease(void)
{
    char path[4200];
    sqlite3 *st;

    snprintf(path, sizeof path, "%s-relay", tu_path(dir, "service.db"));
    st = tu_open_shared(path);
    sqlite3_busy_timeout(st, 2000);
    tu_exec(st, "UPDATE de_relay_lease SET heartbeat_ms = 0");
    sqlite3_close(st);
}

/* Sends a copy of every record of the topic again, into its partition:
 * what resends look like (a relay restarted before it could read what
 * landed, a producer's retry a broker stored twice). */
struct copier {
    rd_kafka_t *p;
    long copies;
};

static void copy_record(void *arg, const rd_kafka_message_t *m, int32_t np)
{
    struct copier *cp = arg;
    rd_kafka_headers_t *h = NULL, *copy;

    (void)np;
    ck_assert_int_eq(rd_kafka_message_headers(m, &h), 0);
    copy = rd_kafka_headers_copy(h);
    ck_assert_int_eq(
        rd_kafka_producev(cp->p, RD_KAFKA_V_TOPIC(rd_kafka_topic_name(m->rkt)),
                          RD_KAFKA_V_PARTITION(m->partition),
                          RD_KAFKA_V_KEY(m->key, m->key_len),
                          RD_KAFKA_V_VALUE(m->payload, m->len),
                          RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
                          RD_KAFKA_V_HEADERS(copy), RD_KAFKA_V_END),
        0);
    cp->copies++;
}

static long resend_everything(tu_cluster *c, const char *type)
{
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    struct copier cp = {NULL, 0};
    char err[256];

    rd_kafka_conf_set(conf, "bootstrap.servers", c->bootstrap, err, sizeof err);
    cp.p = rd_kafka_new(RD_KAFKA_PRODUCER, conf, err, sizeof err);
    ck_assert_ptr_nonnull(cp.p);
    tu_read_topic(c, tu_topic(c, type), copy_record, &cp);
    ck_assert_int_eq(rd_kafka_flush(cp.p, 30000), 0);
    rd_kafka_destroy(cp.p);
    return cp.copies;
}

/* Resends reach the consumer with their original ce_id and ce_subjectseq,
 * between relay crashes (killed mid-backlog and restarted), and are
 * applied once. */
START_TEST(relay_resends_are_applied_once)
{
    tu_cluster *c = tu_cluster_new(_i, 3);
    sqlite3 *cdb = tu_open_shared(tu_path(dir, "consumer.db"));
    de_consumer *con = NULL;
    de_consumer_stats st;
    de_relay *r;
    int64_t before;

    tu_topic_create(c, "delivery", 4);
    for (int i = 0; i < 6; i++) {
        write_events(30, 10, "delivery");
        before = topic_records(c, "delivery", 4);
        pid_t p = spawn_relay(c);
        /* Everything since the cursor goes out again: wait until at
         * least the new events are on Kafka, then kill. */
        ck_assert(tu_wait_for(topic_records(c, "delivery", 4) >= before + 300,
                              20000));
        kill9(p);
        expire_lease(); /* as if the lease had timed out */
    }
    r = start_relay(c);
    tu_ok(de_relay_flush(r, 60000));
    ck_assert_int_gt(resend_everything(c, "delivery"), 0);
    write_events(30, 1, "delivery"); /* and new events after them */
    tu_ok(de_relay_flush(r, 60000));
    tu_check k = tu_check_topics(c, db, "/test/relay", "");
    tu_assert_check(&k);
    tu_ok(open_consumer(cdb, c->bootstrap, c->prefix, "g1", NULL, NULL, NULL,
                        &con));
    poll_until(con, cdb, 1830, 60000);
    /* Let the consumer read to the end of the topic, duplicates too. */
    tu_wait_for((poll_stats(con, &st), st.duplicates >= (uint64_t)k.duplicates),
                60000);
    fprintf(stderr,
            "relay_resends_are_applied_once: %ld records, %ld "
            "duplicates on Kafka; consumer skipped %llu\n",
            k.messages, k.duplicates, (unsigned long long)st.duplicates);
    ck_assert_msg(k.duplicates > 0, "no resends happened: the test tested "
                                    "nothing");
    ck_assert_uint_eq(st.duplicates, (uint64_t)k.duplicates);
    tu_ok(de_consumer_close(con));
    assert_exactly_once(cdb);
    tu_ok(de_relay_stop(r, 5000));
    sqlite3_close(cdb);
    tu_cluster_destroy(c);
}
END_TEST

/* A consumer that dies inside the COMMIT of a batch (its Nth): its
 * offsets must not have been committed before the batch was, or the batch
 * would never be read again.  Deterministic where random kills rarely hit
 * that window. */
START_TEST(consumer_dying_in_commit_loses_nothing)
{
    tu_cluster *c = tu_cluster_new(_i, 1);
    sqlite3 *cdb;
    de_consumer *con = NULL;
    de_relay *r;
    char crash_at[16];
    int status;

    tu_topic_create(c, "delivery", 1);
    r = start_relay(c);
    write_events(10, 10, "delivery");
    tu_ok(de_relay_flush(r, 30000));
    cdb = tu_open_shared(tu_path(dir, "consumer.db"));
    tu_exec(cdb, applied_sql);
    for (int i = 0; i < 3; i++) {
        pid_t p;
        snprintf(crash_at, sizeof crash_at, "%d", 2 + i);
        {
            const char *args[] = {"/proc/self/exe",
                                  "--consume-crash",
                                  tu_path(dir, "consumer.db"),
                                  c->bootstrap,
                                  c->prefix,
                                  "g-commit",
                                  crash_at,
                                  NULL};
            p = spawn(args);
        }
        ck_assert_int_eq(waitpid(p, &status, 0), p);
        ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 3,
                      "consumer process %d did not die in its commit: "
                      "status %d",
                      i, status);
    }
    ck_assert_int_lt(applied_count(cdb), 100);
    tu_ok(open_consumer(cdb, c->bootstrap, c->prefix, "g-commit", NULL, NULL,
                        NULL, &con));
    poll_until(con, cdb, 100, 60000);
    tu_ok(de_consumer_close(con));
    assert_exactly_once(cdb);
    tu_ok(de_relay_stop(r, 5000));
    sqlite3_close(cdb);
    tu_cluster_destroy(c);
}
END_TEST

/* A consumer process killed with SIGKILL at random moments, mid-batch or
 * mid-transaction, and restarted: every event applied exactly once. */
START_TEST(consumer_killed_at_random_applies_exactly_once)
{
    tu_cluster *c = tu_cluster_new(_i, 3);
    sqlite3 *cdb;
    de_consumer *con = NULL;
    de_relay *r;
    unsigned seed = (unsigned)time(NULL);

    srand(seed);
    tu_topic_create(c, "delivery", 4);
    r = start_relay(c);
    write_events(40, 10, "delivery");
    cdb = tu_open_shared(tu_path(dir, "consumer.db"));
    tu_exec(cdb, applied_sql);
    for (int i = 0; i < 6; i++) {
        int64_t before = applied_count(cdb);
        pid_t p;

        /* New events first: the process before may have applied all
         * there was before it was killed, and this one must have work. */
        if (i > 0)
            write_events(40, 1, "delivery");
        p = spawn_consumer(c, "g-kill");
        /* Once it is applying (after the group join, which waits out the
         * previous, killed member's session), kill it at a random moment:
         * mid-batch, mid-transaction or between. */
        /* A generous deadline: the group join waits out the previous
         * member's session, and sanitizer builds on a busy machine are
         * slow; it is an outcome awaited, not a pause. */
        ck_assert_msg(tu_wait_for(applied_count(cdb) > before, 120000),
                      "consumer process %d applied nothing", i);
        write_events(40, 2, "delivery");
        usleep((useconds_t)(rand() % 300) * 1000);
        kill9(p);
    }
    sqlite3_close(cdb);
    tu_ok(de_relay_flush(r, 60000));
    cdb = tu_open_shared(tu_path(dir, "consumer.db"));
    tu_ok(open_consumer(cdb, c->bootstrap, c->prefix, "g-kill", NULL, NULL,
                        NULL, &con));
    poll_until(con, cdb, 40 * 10 + 6 * 80 + 5 * 40, 60000);
    tu_ok(de_consumer_close(con));
    if (applied_count(cdb) != 40 * 10 + 6 * 80 + 5 * 40)
        fprintf(stderr, "seed %u\n", seed);
    fprintf(stderr,
            "consumer_killed_at_random: events applied by %lld "
            "processes\n",
            (long long)tu_query_int(cdb, "SELECT count(DISTINCT pid) FROM "
                                         "applied"));
    ck_assert_int_ge(tu_query_int(cdb, "SELECT count(DISTINCT pid) FROM "
                                       "applied"),
                     2);
    assert_exactly_once(cdb);
    tu_ok(de_relay_stop(r, 5000));
    sqlite3_close(cdb);
    tu_cluster_destroy(c);
}
END_TEST

/* Two consumers of one group sharing the database: the second joins
 * mid-stream (partitions move), then the first leaves; order and
 * exactly-once effects hold throughout. */
START_TEST(two_consumers_rebalance)
{
    tu_cluster *c = tu_cluster_new(_i, 3);
    sqlite3 *cdb;
    de_consumer *con = NULL;
    de_relay *r;
    pid_t a, b;

    tu_topic_create(c, "delivery", 6);
    r = start_relay(c);
    write_events(30, 5, "delivery");
    cdb = tu_open_shared(tu_path(dir, "consumer.db"));
    tu_exec(cdb, applied_sql);
    a = spawn_consumer(c, "g-two");
    ck_assert(tu_wait_for(applied_count(cdb) >= 150, 60000));
    write_events(30, 5, "delivery");
    b = spawn_consumer(c, "g-two");
    /* The rebalance gave b partitions: it applied some of what follows. */
    write_events(30, 5, "delivery");
    {
        /* Events for every partition until the second member applied one
         * of them (the rebalance takes a few seconds). */
        int64_t deadline = tu_now_ms() + 90000;
        bool both = false;
        while (!both && tu_now_ms() < deadline) {
            write_events(30, 1, "delivery");
            both = tu_wait_for(tu_query_int(cdb, "SELECT count(DISTINCT pid) "
                                                 "FROM applied") == 2,
                               2000);
        }
        ck_assert_msg(both, "the second member never applied anything");
    }
    kill(a, SIGTERM); /* leaves the group: b takes its partitions */
    waitpid(a, NULL, 0);
    write_events(30, 5, "delivery");
    tu_ok(de_relay_flush(r, 60000));
    ck_assert(tu_wait_for(applied_count(cdb) ==
                              tu_query_int(db, "SELECT count(*) FROM ledger"),
                          60000));
    kill(b, SIGTERM);
    waitpid(b, NULL, 0);
    (void)con;
    /* Both members applied events: the work really moved. */
    ck_assert_int_eq(tu_query_int(cdb, "SELECT count(DISTINCT pid) FROM "
                                       "applied"),
                     2);
    assert_exactly_once(cdb);
    tu_ok(de_relay_stop(r, 5000));
    sqlite3_close(cdb);
    tu_cluster_destroy(c);
}
END_TEST

/* ---- records that are not ours ---------------------------------------- */

#define OURS(seq, id)                                                          \
    "ce_specversion", "1.0", "ce_id", id, "ce_source", "/test", "ce_type",     \
        "delivery.assigned", "ce_subjectseq", seq, "ce_subjecttype",           \
        "delivery", "ce_action", "assigned"

START_TEST(foreign_and_garbage_records_are_parked)
{
    tu_cluster *c = tu_cluster_new(_i, 1);
    sqlite3 *cdb = tu_open_shared(tu_path(dir, "consumer.db"));
    de_consumer *con = NULL;
    de_consumer_stats st;
    const char *topic;
    const char *bad_json[] = {OURS("1", "e-1"), NULL};
    const char *bad_seq[] = {OURS("01x", "e-2"), NULL};
    const char *no_action[] = {
        "ce_specversion", "1.0",      "ce_id", "e-3", "ce_subjectseq", "1",
        "ce_subjecttype", "delivery", NULL};
    de_relay *r;

    tu_topic_create(c, "delivery", 1);
    topic = tu_topic(c, "delivery");
    tu_produce_raw(c, topic, "X-1", "{\"plain\":\"kafka\"}", NULL);
    tu_produce_raw(c, topic, "X-2", "{not json", bad_json);
    tu_produce_raw(c, topic, "X-3", "{}", bad_seq);
    tu_produce_raw(c, topic, "X-4", "{}", no_action);
    tu_produce_raw(c, topic, NULL, "{}", NULL);
    r = start_relay(c);
    write_events(5, 3, "delivery");
    tu_ok(de_relay_flush(r, 30000));
    tu_ok(open_consumer(cdb, c->bootstrap, c->prefix, "g1", NULL, NULL, NULL,
                        &con));
    /* Both outcomes: on a cluster that makes the topic with several
     * partitions (check-remote), the foreign records are spread over them
     * and may be read after the last event is applied. */
    ck_assert(tu_wait_for(
        (poll_stats(con, &st), st.foreign >= 5 && applied_count(cdb) >= 15),
        60000));
    ck_assert_uint_eq(st.foreign, 5);
    ck_assert_uint_eq(st.applied, 15);
    ck_assert_int_eq(tu_query_int(cdb, "SELECT count(*) FROM de_dead_letter "
                                       "WHERE kind = 'foreign' AND topic IS "
                                       "NOT NULL AND offset BETWEEN 0 AND 4 "
                                       "AND error <> ''"),
                     5);
    ck_assert_int_eq(tu_query_int(cdb, "SELECT count(*) FROM de_dead_letter "
                                       "WHERE error LIKE '%ce_subjectseq%'"),
                     1);
    tu_ok(de_consumer_close(con));
    assert_exactly_once(cdb);
    tu_ok(de_relay_stop(r, 5000));
    sqlite3_close(cdb);
    tu_cluster_destroy(c);
}
END_TEST

/* A handler that keeps failing: retries, then a dead letter; the subject's
 * later events wait behind it while other subjects flow; release applies
 * them all in order. */
START_TEST(failing_handler_dead_letter_and_release)
{
    tu_cluster *c = tu_cluster_new(_i, 3);
    sqlite3 *cdb = tu_open_shared(tu_path(dir, "consumer.db"));
    de_consumer *con = NULL;
    de_consumer_stats st;
    struct failing f = {"D-BAD", 0};
    de_relay *r;

    tu_topic_create(c, "delivery", 3);
    r = start_relay(c);
    for (int i = 0; i < 5; i++) {
        write_events(10, 1, "delivery");
        tu_write(db, ob, "delivery", "D-BAD", "assigned", "{}", 0);
    }
    tu_ok(de_relay_flush(r, 30000));
    tu_ok(open_consumer(cdb, c->bootstrap, c->prefix, "g1", NULL, NULL, &f,
                        &con));
    poll_until(con, cdb, 50, 60000);
    /* D-BAD may have a partition to itself, read after the others: wait
     * until its retries ran out and its four later events wait. */
    tu_wait_for((poll_stats(con, &st),
                 st.dead_lettered >= 1 && dead_letters(cdb, "waiting") >= 4),
                30000);
    ck_assert_uint_eq(st.applied, 50);
    ck_assert_uint_eq(st.dead_lettered, 1);
    ck_assert_uint_eq(st.parked_subjects, 1);
    ck_assert_uint_ge(st.retries, 3);
    ck_assert_int_eq(tu_query_int(cdb, "SELECT count(*) FROM de_dead_letter "
                                       "WHERE subject_id = 'D-BAD' AND state "
                                       "= 'parked' AND kind = 'failed' AND "
                                       "seq = 1 AND attempts = 3 AND error "
                                       "LIKE '%DE_ERR_STATE%'"),
                     1);
    ck_assert_int_eq(tu_query_int(cdb, "SELECT count(*) FROM de_dead_letter "
                                       "WHERE subject_id = 'D-BAD' AND kind "
                                       "= 'waiting'"),
                     4);
    /* More events of the parked subject wait too. */
    tu_write(db, ob, "delivery", "D-BAD", "picked_up", "{}", 0);
    tu_ok(de_relay_flush(r, 30000));
    tu_wait_for((poll_stats(con, &st), dead_letters(cdb, "waiting") >= 5),
                30000);
    /* Fixed downstream: release applies all six in order. */
    f.subject = NULL;
    tu_ok(de_consumer_release(con, "delivery", "D-BAD"));
    tu_ok(de_consumer_stats_get(con, &st));
    ck_assert_uint_eq(st.parked_subjects, 0);
    ck_assert_str_eq(tu_query_text(cdb, "SELECT group_concat(seq, ',') FROM "
                                        "(SELECT seq FROM applied WHERE "
                                        "subject_id = 'D-BAD' ORDER BY n)"),
                     "1,2,3,4,5,6");
    tu_ok(de_consumer_close(con));
    assert_exactly_once(cdb);
    tu_ok(de_relay_stop(r, 5000));
    sqlite3_close(cdb);
    tu_cluster_destroy(c);
}
END_TEST

static const char *request_result(sqlite3 *cdb, const char *id)
{
    static char q[256];

    snprintf(q, sizeof q,
             "SELECT coalesce((SELECT result FROM de_consumer_request WHERE "
             "subject_id = '%s' AND done_at_ms IS NOT NULL), '')",
             id);
    return tu_query_text(cdb, q);
}

/* A release asked from outside the process -- a row in
 * de_consumer_request, as `deliveryevents release` writes it -- is done
 * by the running consumer with its handlers, and answered. */
START_TEST(release_asked_from_another_process)
{
    tu_cluster *c = tu_cluster_new(_i, 1);
    sqlite3 *cdb = tu_open_shared(tu_path(dir, "consumer.db"));
    sqlite3 *tool;
    de_consumer *con = NULL;
    de_consumer_stats st;
    struct failing f = {"D-BAD", 0};
    de_relay *r;

    tu_topic_create(c, "delivery", 1);
    r = start_relay(c);
    write_events(3, 1, "delivery");
    for (int i = 0; i < 3; i++)
        tu_write(db, ob, "delivery", "D-BAD", "assigned", "{}", 0);
    tu_ok(de_relay_flush(r, 30000));
    tu_ok(open_consumer(cdb, c->bootstrap, c->prefix, "g1", NULL, NULL, &f,
                        &con));
    ck_assert(tu_wait_for(
        (poll_stats(con, &st),
         st.parked_subjects == 1 && dead_letters(cdb, "waiting") == 2),
        30000));
    f.subject = NULL; /* fixed downstream */
    /* The tool asks and waits for the answer while this consumer polls;
     * a request for a subject that is not parked comes in on another
     * connection (the tool would refuse it without --force). */
    {
        const char *args[] = {
            getenv("DE_TOOL"), "release", "--db",  tu_path(dir, "consumer.db"),
            "delivery:D-BAD",  "--wait",  "30000", NULL};
        int status = 0;
        pid_t pid;

        ck_assert_msg(args[0] != NULL, "DE_TOOL unset");
        pid = spawn(args);
        tool = tu_open_shared(tu_path(dir, "consumer.db"));
        tu_exec(tool, "INSERT INTO de_consumer_request(subject_type, "
                      "subject_id, action, requested_at_ms) VALUES "
                      "('delivery', 'D-000', 'release', 1)");
        sqlite3_close(tool);
        ck_assert(tu_wait_for(
            (poll_stats(con, &st), waitpid(pid, &status, WNOHANG) == pid),
            30000));
        ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 0,
                      "deliveryevents release: status %d", status);
    }
    ck_assert(tu_wait_for(
        (poll_stats(con, &st), request_result(cdb, "D-000")[0] != '\0'),
        30000));
    ck_assert_str_eq(request_result(cdb, "D-BAD"),
                     "released: 3 events applied");
    ck_assert_str_eq(request_result(cdb, "D-000"), "not parked");
    ck_assert_uint_eq(st.parked_subjects, 0);
    ck_assert_str_eq(tu_query_text(cdb, "SELECT group_concat(seq, ',') FROM "
                                        "(SELECT seq FROM applied WHERE "
                                        "subject_id = 'D-BAD' ORDER BY n)"),
                     "1,2,3");
    tu_ok(de_consumer_close(con));
    assert_exactly_once(cdb);
    tu_ok(de_relay_stop(r, 5000));
    sqlite3_close(cdb);
    tu_cluster_destroy(c);
}
END_TEST

/* skip drops the dead-lettered event and applies the rest. */
START_TEST(skip_drops_the_dead_letter)
{
    tu_cluster *c = tu_cluster_new(_i, 1);
    sqlite3 *cdb = tu_open_shared(tu_path(dir, "consumer.db"));
    de_consumer *con = NULL;
    de_consumer_stats st;
    struct failing f = {"D-SKIP", 2};
    de_relay *r;

    tu_topic_create(c, "delivery", 1);
    r = start_relay(c);
    for (int i = 0; i < 4; i++)
        tu_write(db, ob, "delivery", "D-SKIP", "assigned", "{}", 0);
    tu_ok(de_relay_flush(r, 30000));
    tu_ok(open_consumer(cdb, c->bootstrap, c->prefix, "g1", NULL, NULL, &f,
                        &con));
    poll_until(con, cdb, 1, 60000);
    tu_wait_for((poll_stats(con, &st), st.dead_lettered >= 1), 30000);
    ck_assert_uint_eq(st.parked_subjects, 1);
    tu_ok(de_consumer_skip(con, "delivery", "D-SKIP"));
    ck_assert_str_eq(tu_query_text(cdb, "SELECT group_concat(seq, ',') FROM "
                                        "(SELECT seq FROM applied ORDER BY "
                                        "n)"),
                     "1,3,4");
    ck_assert_int_eq(tu_query_int(cdb, "SELECT count(*) FROM de_dead_letter "
                                       "WHERE state = 'skipped' AND seq = 2"),
                     1);
    tu_ok(de_consumer_stats_get(con, &st));
    ck_assert_uint_eq(st.parked_subjects, 0);
    tu_ok(de_consumer_close(con));
    tu_ok(de_relay_stop(r, 5000));
    sqlite3_close(cdb);
    tu_cluster_destroy(c);
}
END_TEST

/* consumer.on.gap: park (default) holds a subject whose event came after
 * a missing one; apply applies it anyway. */
START_TEST(gaps_are_parked_or_applied)
{
    tu_cluster *c = tu_cluster_new(_i, 1);
    sqlite3 *cdb = tu_open_shared(tu_path(dir, "consumer.db"));
    sqlite3 *cdb2 = tu_open_shared(tu_path(dir, "consumer2.db"));
    de_consumer *con = NULL;
    de_consumer_stats st;
    const char *topic;
    const char *h1[] = {OURS("1", "g-1"), NULL};
    const char *h2[] = {OURS("2", "g-2"), NULL};
    const char *h4[] = {OURS("4", "g-4"), NULL};

    tu_topic_create(c, "delivery", 1);
    topic = tu_topic(c, "delivery");
    tu_produce_raw(c, topic, "G-1", "{}", h1);
    tu_produce_raw(c, topic, "G-1", "{}", h2);
    tu_produce_raw(c, topic, "G-1", "{}", h4);
    tu_ok(open_consumer(cdb, c->bootstrap, c->prefix, "g-park", NULL, NULL,
                        NULL, &con));
    tu_wait_for((poll_stats(con, &st), st.gaps >= 1), 30000);
    ck_assert_uint_eq(st.applied, 2);
    ck_assert_uint_eq(st.gaps, 1);
    ck_assert_uint_eq(st.parked_subjects, 1);
    ck_assert_int_eq(tu_query_int(cdb, "SELECT count(*) FROM de_dead_letter "
                                       "WHERE kind = 'gap' AND seq = 4 AND "
                                       "error LIKE '%3..3%'"),
                     1);
    /* Releasing accepts the gap. */
    tu_ok(de_consumer_release(con, "delivery", "G-1"));
    ck_assert_int_eq(applied_count(cdb), 3);
    tu_ok(de_consumer_close(con));

    tu_ok(open_consumer(cdb2, c->bootstrap, c->prefix, "g-apply",
                        "consumer.on.gap", "apply", NULL, &con));
    poll_until(con, cdb2, 3, 60000);
    tu_ok(de_consumer_stats_get(con, &st));
    ck_assert_uint_eq(st.applied, 3);
    ck_assert_uint_eq(st.gaps, 1);
    ck_assert_uint_eq(st.parked_subjects, 0);
    tu_ok(de_consumer_close(con));
    sqlite3_close(cdb);
    sqlite3_close(cdb2);
    tu_cluster_destroy(c);
}
END_TEST

/* The inbox keeps the ce_id of a subject's last number compactly when it
 * is a UUID; what a conflict compares and reports is still the id
 * exactly as it was: one differing only in case is another id. */
START_TEST(uuid_ids_are_compared_exactly)
{
    tu_cluster *c = tu_cluster_new(_i, 1);
    sqlite3 *cdb = tu_open_shared(tu_path(dir, "consumer.db"));
    de_consumer *con = NULL;
    de_consumer_stats st;
    const char *topic;
#define U1 "01937a1e-0000-7001-8000-00000000000a"
#define U2 "01937a1e-0000-7001-8000-00000000000b"
#define U2_UPPER "01937A1E-0000-7001-8000-00000000000B"
    const char *h1[] = {OURS("1", U1), NULL};
    const char *h2[] = {OURS("2", U2), NULL};
    const char *h2upper[] = {OURS("2", U2_UPPER), NULL};

    tu_topic_create(c, "delivery", 1);
    topic = tu_topic(c, "delivery");
    tu_produce_raw(c, topic, "U-1", "{}", h1);
    tu_produce_raw(c, topic, "U-1", "{}", h2);
    tu_produce_raw(c, topic, "U-1", "{}", h2); /* a true copy */
    tu_produce_raw(c, topic, "U-1", "{}", h2upper);
    tu_ok(open_consumer(cdb, c->bootstrap, c->prefix, "g-uuid", NULL, NULL,
                        NULL, &con));
    ck_assert(
        tu_wait_for((poll_stats(con, &st), st.parked_subjects >= 1), 30000));
    ck_assert_uint_eq(st.applied, 2);
    ck_assert_uint_eq(st.duplicates, 1);
    ck_assert_int_eq(
        tu_query_int(cdb, "SELECT count(*) FROM de_dead_letter WHERE kind = "
                          "'conflict' AND seq = 2 AND event_id = '" U2_UPPER
                          "' AND error LIKE '%applied as event " U2 ",%'"),
        1);
#undef U1
#undef U2
#undef U2_UPPER
    tu_ok(de_consumer_close(con));
    sqlite3_close(cdb);
    tu_cluster_destroy(c);
}
END_TEST

/* Two events with one number (a producer restored from an older state):
 * the second is a conflict -- dead-lettered, its subject parked -- never
 * dropped as a duplicate; a copy of the first is still a duplicate; a
 * release applies it as the real event it is. */
START_TEST(reused_numbers_are_conflicts_not_duplicates)
{
    tu_cluster *c = tu_cluster_new(_i, 1);
    sqlite3 *cdb = tu_open_shared(tu_path(dir, "consumer.db"));
    de_consumer *con = NULL;
    de_consumer_stats st;
    const char *topic;
    const char *h1[] = {OURS("1", "c-1"), NULL};
    const char *h2[] = {OURS("2", "c-2"), NULL};
    const char *h2copy[] = {OURS("2", "c-2"), NULL};
    const char *h2other[] = {OURS("2", "c-2b"), NULL};
    const char *h3[] = {OURS("3", "c-3"), NULL};

    tu_topic_create(c, "delivery", 1);
    topic = tu_topic(c, "delivery");
    tu_produce_raw(c, topic, "C-1", "{}", h1);
    tu_produce_raw(c, topic, "C-1", "{}", h2);
    tu_produce_raw(c, topic, "C-1", "{}", h2copy);
    tu_produce_raw(c, topic, "C-1", "{}", h2other);
    tu_produce_raw(c, topic, "C-1", "{}", h3);
    tu_ok(open_consumer(cdb, c->bootstrap, c->prefix, "g-conflict", NULL, NULL,
                        NULL, &con));
    ck_assert(
        tu_wait_for((poll_stats(con, &st), st.parked_subjects >= 1), 30000));
    ck_assert_uint_eq(st.applied, 2);
    ck_assert_uint_eq(st.duplicates, 1); /* the true copy of number 2 */
    ck_assert_int_eq(tu_query_int(cdb, "SELECT count(*) FROM de_dead_letter "
                                       "WHERE kind = 'conflict' AND seq = 2 "
                                       "AND event_id = 'c-2b' AND error LIKE "
                                       "'%applied as event c-2,%'"),
                     1);
    /* Number 3 waits behind the conflict, in order. */
    ck_assert(tu_wait_for(
        (poll_stats(con, &st),
         tu_query_int(cdb, "SELECT count(*) FROM de_dead_letter WHERE kind = "
                           "'waiting' AND event_id = 'c-3'") == 1),
        30000));
    tu_ok(de_consumer_release(con, "delivery", "C-1"));
    ck_assert_int_eq(applied_count(cdb), 4);
    ck_assert_str_eq(tu_query_text(cdb, "SELECT group_concat(event_id) FROM "
                                        "(SELECT event_id FROM applied ORDER "
                                        "BY n)"),
                     "c-1,c-2,c-2b,c-3");
    tu_ok(de_consumer_close(con));
    sqlite3_close(cdb);
    tu_cluster_destroy(c);
}
END_TEST

/* Waits until a consumer has forgotten at least n subjects. */
static void wait_forgotten(de_consumer *con, uint64_t n)
{
    de_consumer_stats st;

    ck_assert_msg(tu_wait_for((poll_stats(con, &st), st.forgotten >= n), 30000),
                  "the consumer forgot %llu subjects, expected %llu",
                  (unsigned long long)st.forgotten, (unsigned long long)n);
}

/* The applied events of a subject, in the order applied. */
static const char *applied_ids(sqlite3 *cdb, const char *id)
{
    char sql[300];

    snprintf(sql, sizeof sql,
             "SELECT group_concat(event_id) FROM (SELECT event_id FROM "
             "applied WHERE subject_id = '%s' ORDER BY n)",
             id);
    return tu_query_text(cdb, sql);
}

/* The same, from the ledger. */
static const char *ledger_ids(const char *id)
{
    char sql[300];

    snprintf(sql, sizeof sql,
             "SELECT group_concat(event_id) FROM (SELECT event_id FROM "
             "ledger WHERE subject_id = '%s' ORDER BY n)",
             id);
    return tu_query_text(db, sql);
}

/*
 * A subject idle for longer than relay.subject.forget.ms is renumbered
 * from 1 in a new numbering (a higher ce_subjectepoch), and its counters
 * and inbox rows are forgotten.  Nothing is dropped or reordered: a
 * consumer that still remembers the subject applies the new numbering; one
 * that forgot it too applies it as a new subject; a consumer reading the
 * whole topic again applies nothing twice.  The sleeps are the idle time
 * under test (longer than the relay's forget time), not a guess.
 */
START_TEST(idle_subjects_are_renumbered_and_forgotten)
{
    tu_cluster *c = tu_cluster_new(_i, 1);
    sqlite3 *keep = tu_open_shared(tu_path(dir, "keep.db"));
    sqlite3 *forget = tu_open_shared(tu_path(dir, "forget.db"));
    de_consumer *ck = NULL, *cf = NULL, *again = NULL;
    de_conf *conf;
    de_relay *r;
    de_relay_stats rs;
    de_consumer_stats st;
    int64_t p3, p4;
    tu_check k;

    tu_topic_create(c, "delivery", 2);
    conf = tu_relay_conf(c, "relay.subject.forget.ms", "300", NULL);
    tu_ok(de_relay_start(ob, conf, &r));
    de_conf_destroy(conf);
    tu_write(db, ob, "delivery", "D-1", "created", "{}", 0);
    tu_write(db, ob, "delivery", "D-1", "assigned", "{}", 0);
    tu_write(db, ob, "delivery", "D-2", "created", "{}", 0);
    tu_ok(de_relay_flush(r, 30000));
    tu_ok(open_consumer(keep, c->bootstrap, c->prefix, "g-keep", NULL, NULL,
                        NULL, &ck));
    tu_ok(open_consumer(forget, c->bootstrap, c->prefix, "g-forget",
                        "consumer.subject.forget.ms", "100", NULL, &cf));
    poll_until(ck, keep, 3, 60000);
    poll_until(cf, forget, 3, 60000);
    wait_forgotten(cf, 2); /* D-1 and D-2 */
    usleep(400 * 1000);    /* idle past relay.subject.forget.ms */
    p3 = tu_write(db, ob, "delivery", "D-1", "picked_up", "{}", 0);
    tu_write(db, ob, "delivery", "D-1", "delivered", "{}", 0);
    tu_ok(de_relay_flush(r, 30000));
    poll_until(ck, keep, 5, 60000);
    poll_until(cf, forget, 5, 60000);
    /* Both applied all of D-1, in commit order; the renumbered events
     * carry 1 and 2 of the numbering named after D-1's third event. */
    ck_assert_str_eq(applied_ids(keep, "D-1"), ledger_ids("D-1"));
    ck_assert_str_eq(applied_ids(forget, "D-1"), ledger_ids("D-1"));
    ck_assert_str_eq(tu_query_text(keep, "SELECT group_concat(seq) FROM "
                                         "(SELECT seq FROM applied WHERE "
                                         "subject_id = 'D-1' ORDER BY n)"),
                     "1,2,1,2");
    ck_assert_int_eq(tu_query_int(keep, "SELECT epoch FROM de_inbox WHERE "
                                        "subject_id = 'D-1'"),
                     p3);
    tu_ok(de_consumer_stats_get(ck, &st));
    ck_assert_uint_eq(st.gaps + st.duplicates + st.dead_lettered, 0);
    /* The relay forgets the idle counters too (D-2 at least, once its
     * cleanup rounds pass it). */
    ck_assert(tu_wait_for(
        (de_relay_stats_get(r, &rs) == DE_OK && rs.forgotten >= 1), 30000));
    /* Idle again: D-1 starts a third numbering. */
    usleep(400 * 1000);
    p4 = tu_write(db, ob, "delivery", "D-1", "returned", "{}", 0);
    tu_ok(de_relay_flush(r, 30000));
    poll_until(ck, keep, 6, 60000);
    ck_assert_int_eq(tu_query_int(keep, "SELECT epoch FROM de_inbox WHERE "
                                        "subject_id = 'D-1'"),
                     p4);
    /* Reading everything again into the same inbox applies nothing:
     * older numberings' events are duplicates. */
    tu_ok(open_consumer(keep, c->bootstrap, c->prefix, "g-again", NULL, NULL,
                        NULL, &again));
    ck_assert(tu_wait_for((poll_stats(again, &st), st.duplicates >= 6), 30000));
    ck_assert_int_eq(applied_count(keep), 6);
    ck_assert_uint_eq(st.applied + st.gaps + st.dead_lettered, 0);
    /* And the topic, read back: every event once, each numbering from 1. */
    k = tu_check_topics(c, db, "/test/relay", "");
    tu_assert_check(&k);
    tu_ok(de_consumer_close(again));
    tu_ok(de_consumer_close(ck));
    tu_ok(de_consumer_close(cf));
    tu_ok(de_relay_stop(r, 5000));
    sqlite3_close(keep);
    sqlite3_close(forget);
    tu_cluster_destroy(c);
}
END_TEST

/* Why consumer.subject.forget.ms must exceed the relay's: a consumer that
 * forgets a subject the relay still numbers sees its next event as a gap
 * -- parked for an operator, never applied out of order or dropped. */
START_TEST(forgetting_before_the_relay_parks_a_gap)
{
    tu_cluster *c = tu_cluster_new(_i, 1);
    sqlite3 *cdb = tu_open_shared(tu_path(dir, "consumer.db"));
    de_consumer *con = NULL;
    de_consumer_stats st;
    de_relay *r;

    tu_topic_create(c, "delivery", 1);
    r = start_relay(c); /* relay.subject.forget.ms: 7 days */
    tu_write(db, ob, "delivery", "D-1", "created", "{}", 0);
    tu_ok(de_relay_flush(r, 30000));
    tu_ok(open_consumer(cdb, c->bootstrap, c->prefix, "g-early",
                        "consumer.subject.forget.ms", "1", NULL, &con));
    poll_until(con, cdb, 1, 60000);
    wait_forgotten(con, 1);
    tu_write(db, ob, "delivery", "D-1", "assigned", "{}", 0);
    tu_ok(de_relay_flush(r, 30000));
    ck_assert(
        tu_wait_for((poll_stats(con, &st), st.parked_subjects == 1), 30000));
    ck_assert_int_eq(dead_letters(cdb, "gap"), 1);
    ck_assert_int_eq(applied_count(cdb), 1);
    tu_ok(de_consumer_close(con));
    tu_ok(de_relay_stop(r, 5000));
    sqlite3_close(cdb);
    tu_cluster_destroy(c);
}
END_TEST

/* ---- other producers' CloudEvents ------------------------------------- */

/* A producer as other services have one: librdkafka directly, its default
 * partitioner, the headers or the structured value they write. */
typedef struct other {
    rd_kafka_t *p;
    const char *topic;
} other;

static other other_open(tu_cluster *c, const char *topic)
{
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    char err[256];
    other o = {NULL, topic};

    rd_kafka_conf_set(conf, "bootstrap.servers", c->bootstrap, err, sizeof err);
    o.p = rd_kafka_new(RD_KAFKA_PRODUCER, conf, err, sizeof err);
    ck_assert_ptr_nonnull(o.p);
    return o;
}

/* One record: key (NULL: none), value, header pairs (NULL-terminated). */
static void other_send(other *o, const char *key, const char *value,
                       const char *const *headers)
{
    rd_kafka_headers_t *h = rd_kafka_headers_new(16);

    for (int i = 0; headers && headers[i]; i += 2)
        rd_kafka_header_add(h, headers[i], -1, headers[i + 1], -1);
    ck_assert_int_eq(
        rd_kafka_producev(o->p, RD_KAFKA_V_TOPIC(o->topic),
                          RD_KAFKA_V_KEY(key, key ? strlen(key) : 0),
                          RD_KAFKA_V_VALUE((void *)(uintptr_t)value,
                                           value ? strlen(value) : 0),
                          RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
                          RD_KAFKA_V_HEADERS(h), RD_KAFKA_V_END),
        0);
}

/* A structured-mode event (application/cloudevents+json). */
static void other_structured(other *o, const char *key, const char *json)
{
    const char *h[] = {"content-type",
                       "application/cloudevents+json; charset=UTF-8", NULL};

    other_send(o, key, json, h);
}

static void other_close(other *o)
{
    ck_assert_int_eq(rd_kafka_flush(o->p, 30000), 0);
    rd_kafka_destroy(o->p);
}

/* Binary mode without this library's extensions: a ce_subject, no
 * sequence, a type with capitals and hyphens. */
#define PLAIN(id, subject, type)                                               \
    "ce_specversion", "1.0", "ce_id", id, "ce_source", "/courier-app",         \
        "ce_type", type, "ce_subject", subject, "ce_time",                     \
        "2026-11-25T11:00:00.250Z", "content-type", "application/json"

/* Binary mode with a sequence but no ce_subjecttype or ce_action. */
#define NUMBERED(id, seq)                                                      \
    "ce_specversion", "1.0", "ce_id", id, "ce_source", "/legacy-dispatch",     \
        "ce_type", "com.example.Delivery.picked-up", "ce_subjectseq", seq,     \
        "ce_time", "2026-11-25T12:00:00+01:00"

static int64_t count(sqlite3 *cdb, const char *sql)
{
    return tu_query_int(cdb, sql);
}

/* The events applied for a subject, their ids in the order applied. */
static const char *applied_of(sqlite3 *cdb, const char *subject)
{
    return applied_ids(cdb, subject);
}

/* A ce_type handler: records the event like the others, and counts. */
static int by_type_calls;

static de_err on_shift_started(sqlite3 *cdb, const de_event_view *ev, void *ctx)
{
    by_type_calls++;
    return record_applied(cdb, ev, ctx);
}

/* Produces the dead-lettered record of key `key` again, from its
 * de_dead_letter row alone, with header `name` of value `bad` set to
 * `good`: what an operator does to replay a record once its cause is
 * fixed. */
static void republish_fixed(tu_cluster *c, sqlite3 *cdb, const char *key,
                            const char *name, const char *bad, const char *good)
{
    sqlite3_stmt *st;
    json_t *hs;
    rd_kafka_headers_t *h = rd_kafka_headers_new(16);
    other o;
    size_t i;
    json_t *pair;

    ck_assert_int_eq(sqlite3_prepare_v2(cdb,
                                        "SELECT record_key, record_headers, "
                                        "record_value, topic FROM "
                                        "de_dead_letter WHERE record_key = "
                                        "CAST(?1 AS BLOB)",
                                        -1, &st, NULL),
                     SQLITE_OK);
    sqlite3_bind_text(st, 1, key, -1, SQLITE_STATIC);
    ck_assert_int_eq(sqlite3_step(st), SQLITE_ROW);
    hs = json_loads((const char *)sqlite3_column_text(st, 1), 0, NULL);
    ck_assert_ptr_nonnull(hs);
    json_array_foreach(hs, i, pair)
    {
        const char *n = json_string_value(json_array_get(pair, 0));
        const char *v = json_string_value(json_array_get(pair, 1));
        ck_assert_ptr_nonnull(v); /* all text here */
        rd_kafka_header_add(
            h, n, -1, strcmp(n, name) == 0 && strcmp(v, bad) == 0 ? good : v,
            -1);
    }
    o = other_open(c, (const char *)sqlite3_column_text(st, 3));
    ck_assert_int_eq(
        rd_kafka_producev(
            o.p, RD_KAFKA_V_TOPIC(o.topic),
            RD_KAFKA_V_KEY(sqlite3_column_blob(st, 0),
                           (size_t)sqlite3_column_bytes(st, 0)),
            RD_KAFKA_V_VALUE((void *)(uintptr_t)sqlite3_column_blob(st, 2),
                             (size_t)sqlite3_column_bytes(st, 2)),
            RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY), RD_KAFKA_V_HEADERS(h),
            RD_KAFKA_V_END),
        0);
    other_close(&o);
    json_decref(hs);
    sqlite3_finalize(st);
}

/*
 * A topic carrying this library's events and other producers' CloudEvents
 * side by side: binary mode without the library's extensions (no
 * sequence, types with capitals and hyphens), numbered events of another
 * source, structured mode with and without a sequence, duplicates of each
 * kind, and records that are no usable CloudEvent.  Every event is
 * applied exactly once (numbered ones in order), event time is ce_time,
 * every unusable record is dead-lettered whole with its reason, and
 * nothing is parked.
 */
START_TEST(polyglot_topic_applied_exactly_once)
{
    tu_cluster *c = tu_cluster_new(_i, 3);
    sqlite3 *cdb = tu_open_shared(tu_path(dir, "consumer.db"));
    de_consumer *con = NULL;
    de_consumer_stats st;
    de_relay *r;
    other o;
    const char *topic;
    char json[1024];

    tu_topic_create(c, "delivery", 3);
    topic = tu_topic(c, "delivery");
    r = start_relay(c);
    write_events(10, 3, "delivery");
    o = other_open(c, topic);
    for (int i = 1; i <= 3; i++) {
        char id[16];
        snprintf(id, sizeof id, "p-%d", i);
        {
            const char *h[] = {
                PLAIN(id, "R-1", "com.example.rider.Shift-Started"), NULL};
            other_send(&o, "R-1", "{\"shift\":1}", h);
            if (i == 2)
                other_send(&o, "R-1", "{\"shift\":1}", h); /* resent */
        }
    }
    {
        /* Key-less: the subject is ce_subject. */
        const char *h[] = {PLAIN("p-9", "R-2", "Delivery"), NULL};
        other_send(&o, NULL, NULL, h);
    }
    for (int i = 1; i <= 3; i++) {
        char id[16], seq[8];
        snprintf(id, sizeof id, "l-%d", i);
        snprintf(seq, sizeof seq, "%d", i);
        {
            const char *h[] = {NUMBERED(id, seq), NULL};
            other_send(&o, "L-1", "{\"n\":1e400}", h);
            if (i == 3)
                other_send(&o, "L-1", "{\"n\":1e400}", h); /* resent */
        }
    }
    for (int i = 1; i <= 3; i++) {
        snprintf(json, sizeof json,
                 "{\"specversion\":\"1.0\",\"id\":\"s-%d\",\"source\":"
                 "\"urn:example:billing\",\"type\":\"com.example.invoice."
                 "issued\",\"subject\":\"I-1\",\"subjectseq\":%d,\"time\":"
                 "\"2026-11-25T11:00:00.5+01:00\",\"datacontenttype\":"
                 "\"application/json\",\"data\":{\"amount\":"
                 "123456789012345678901234567890,\"n\":%d}}",
                 i, i, i);
        other_structured(&o, "I-1", json);
        if (i == 1)
            other_structured(&o, "I-1", json); /* resent */
    }
    for (int i = 1; i <= 2; i++) {
        snprintf(json, sizeof json,
                 "{\"specversion\":\"1.0\",\"id\":\"u-%d\",\"source\":"
                 "\"/notes\",\"type\":\"note.added\",\"subject\":\"N-\\u0031\","
                 "\"data\":{\"text\":\"caf\\u00e9\"}}",
                 i);
        other_structured(&o, "N-1", json);
    }
    other_structured(&o, "N-1", json); /* resent */
    {
        /* Unusable: each with its reason. */
        const char *bad_time[] = {PLAIN("x-1", "X-1", "t"), "ce_time",
                                  "yesterday", NULL};
        const char *no_source[] = {"ce_specversion", "1.0", "ce_id", "x-2",
                                   "ce_type",        "t",   NULL};
        const char *v03[] = {
            "ce_specversion", "0.3", "ce_id", "x-3", "ce_source", "/s",
            "ce_type",        "t",   NULL};
        other_send(&o, "X-1", "{}", bad_time);
        other_send(&o, "X-2", "{}", no_source);
        other_send(&o, "X-3", "{}", v03);
        other_send(&o, "X-4", "{\"a\":1,\"a\":2}",
                   (const char *[]){PLAIN("x-4", "X-4", "t"), NULL});
        other_structured(&o, "X-5",
                         "{\"specversion\":\"1.0\",\"id\":\"x-5\",\"source\":"
                         "\"/s\",\"type\":\"t\",\"data_base64\":\"AAE=\"}");
        other_structured(&o, "X-6", "{\"specversion\":\"1.0\",");
    }
    other_close(&o);
    tu_ok(de_relay_flush(r, 30000));

    {
        de_conf *conf = de_conf_new();
        char tmpl[128], gid[192];
        snprintf(tmpl, sizeof tmpl, "%s{subject_type}.events", c->prefix);
        snprintf(gid, sizeof gid, "%spolyglot", c->prefix);
        de_conf_set_log_cb(conf, tu_log, NULL);
        tu_ok(de_conf_set(conf, "bootstrap.servers", c->bootstrap));
        tu_ok(de_conf_set(conf, "group.id", gid));
        tu_ok(de_conf_set(conf, "topic.template", tmpl));
        sqlite3_exec(cdb, applied_sql, NULL, NULL, NULL);
        tu_ok(de_consumer_open(cdb, conf, &con));
        de_conf_destroy(conf);
    }
    by_type_calls = 0;
    tu_ok(de_consumer_on(con, "delivery", NULL, record_applied, NULL));
    tu_ok(de_consumer_on_type(con, "com.example.rider.Shift-Started",
                              on_shift_started, NULL));
    /* 30 of ours, 3 + 1 plain, 3 numbered, 3 + 2 structured. */
    ck_assert(tu_wait_for(
        (poll_stats(con, &st), applied_count(cdb) >= 42 && st.foreign >= 6),
        60000));
    ck_assert_int_eq(applied_count(cdb), 42);
    ck_assert_uint_eq(st.foreign, 6);
    ck_assert_uint_eq(st.parked_subjects, 0);
    ck_assert_uint_ge(st.duplicates, 4); /* the mock may store a retry */
    ck_assert_int_eq(by_type_calls, 3);
    /* Each in order, once. */
    ck_assert_str_eq(applied_of(cdb, "R-1"), "p-1,p-2,p-3");
    ck_assert_str_eq(applied_of(cdb, "L-1"), "l-1,l-2,l-3");
    ck_assert_str_eq(applied_of(cdb, "I-1"), "s-1,s-2,s-3");
    ck_assert_str_eq(applied_of(cdb, "N-1"), "u-1,u-2");
    ck_assert_str_eq(applied_of(cdb, "R-2"), "p-9");
    /* What the handlers saw: subject type from the topic, action from
     * ce_type, event time from ce_time, data exactly as written. */
    ck_assert_int_eq(count(cdb, "SELECT count(*) FROM applied WHERE "
                                "subject_id = 'L-1' AND subject_type = "
                                "'delivery' AND action = 'picked-up' AND "
                                "occurred_at_ms = 1795604400000 AND payload "
                                "= '{\"n\":1e400}' AND source = "
                                "'/legacy-dispatch'"),
                     3);
    ck_assert_int_eq(count(cdb, "SELECT count(*) FROM applied WHERE "
                                "subject_id = 'I-1' AND action = 'issued' "
                                "AND occurred_at_ms = 1795600800500 AND "
                                "payload LIKE '{\"amount\":"
                                "123456789012345678901234567890,\"n\":%' AND "
                                "seq = CAST(substr(event_id, 3) AS "
                                "INTEGER)"),
                     3);
    ck_assert_int_eq(count(cdb, "SELECT count(*) FROM applied WHERE "
                                "subject_id IN ('R-1', 'R-2', 'N-1') AND seq "
                                "= 0"),
                     6);
    ck_assert_int_eq(count(cdb, "SELECT count(*) FROM applied WHERE "
                                "subject_id = 'R-1' AND occurred_at_ms = "
                                "1795604400250 AND action = 'Shift-Started'"),
                     3);
    ck_assert_int_eq(count(cdb, "SELECT count(*) FROM applied WHERE "
                                "subject_id = 'R-2' AND action = 'Delivery' "
                                "AND payload = '{}'"),
                     1);
    ck_assert_int_eq(count(cdb, "SELECT count(*) FROM applied WHERE "
                                "subject_id = 'N-1' AND payload = "
                                "'{\"text\":\"caf\\u00e9\"}' AND "
                                "source = '/notes'"),
                     2);
    /* Unusable records, whole, each with its reason. */
    ck_assert_int_eq(count(cdb, "SELECT count(*) FROM de_dead_letter WHERE "
                                "kind = 'foreign' AND record_value IS NOT "
                                "NULL AND record_key IS NOT NULL AND "
                                "record_timestamp_ms > 0 AND partition >= 0 "
                                "AND offset >= 0"),
                     6);
    ck_assert_int_eq(count(cdb, "SELECT count(*) FROM de_dead_letter WHERE "
                                "record_key = CAST('X-1' AS BLOB) AND error "
                                "LIKE 'ce_time ''yesterday''%' AND "
                                "json_extract(record_headers, '$[0][0]') = "
                                "'ce_specversion' AND "
                                "json_array_length(record_headers) = 8 AND "
                                "CAST(record_value AS TEXT) = '{}'"),
                     1);
    ck_assert_int_eq(count(cdb, "SELECT count(*) FROM de_dead_letter WHERE "
                                "error LIKE 'ce_source%missing%'"),
                     1);
    ck_assert_int_eq(count(cdb, "SELECT count(*) FROM de_dead_letter WHERE "
                                "error LIKE 'ce_specversion ''0.3''%'"),
                     1);
    ck_assert_int_eq(count(cdb, "SELECT count(*) FROM de_dead_letter WHERE "
                                "error LIKE '%duplicate member name%'"),
                     1);
    ck_assert_int_eq(count(cdb, "SELECT count(*) FROM de_dead_letter WHERE "
                                "error LIKE 'data_base64%'"),
                     1);
    ck_assert_int_eq(count(cdb, "SELECT count(*) FROM de_dead_letter WHERE "
                                "error LIKE 'structured-mode value%'"),
                     1);
    /* A dead letter republished as it was kept -- key, headers in order,
     * value -- with its bad ce_time fixed, is applied. */
    republish_fixed(c, cdb, "X-1", "ce_time", "yesterday",
                    "2026-11-25T11:00:00Z");
    ck_assert(
        tu_wait_for((poll_stats(con, &st), applied_count(cdb) == 43), 30000));
    ck_assert_str_eq(applied_of(cdb, "X-1"), "x-1");
    /* A redelivery of everything applies nothing again. */
    tu_ok(de_consumer_close(con));
    {
        de_conf *conf = de_conf_new();
        char tmpl[128], gid[192];
        uint64_t applied_before;
        snprintf(tmpl, sizeof tmpl, "%s{subject_type}.events", c->prefix);
        snprintf(gid, sizeof gid, "%spolyglot-again", c->prefix);
        de_conf_set_log_cb(conf, tu_log, NULL);
        tu_ok(de_conf_set(conf, "bootstrap.servers", c->bootstrap));
        tu_ok(de_conf_set(conf, "group.id", gid));
        tu_ok(de_conf_set(conf, "topic.template", tmpl));
        tu_ok(de_consumer_open(cdb, conf, &con));
        de_conf_destroy(conf);
        tu_ok(de_consumer_on(con, "delivery", NULL, record_applied, NULL));
        applied_before = 0;
        ck_assert(tu_wait_for(
            (poll_stats(con, &st), st.duplicates >= 43 + 4 && st.foreign >= 6),
            60000));
        ck_assert_uint_eq(st.applied, applied_before);
        ck_assert_int_eq(applied_count(cdb), 43);
    }
    tu_ok(de_consumer_close(con));
    tu_ok(de_relay_stop(r, 5000));
    sqlite3_close(cdb);
    tu_cluster_destroy(c);
}
END_TEST

/* Opens a consumer of the delivery topics with record_applied for
 * "delivery", under group `group`, with one extra setting. */
static de_consumer *plain_consumer(tu_cluster *c, sqlite3 *cdb,
                                   const char *group, const char *key,
                                   const char *value)
{
    de_consumer *con = NULL;

    tu_ok(open_consumer(cdb, c->bootstrap, c->prefix, group, key, value, NULL,
                        &con));
    return con;
}

/*
 * One owner per numbered subject.  The relay numbers D-1 (1..4); a second
 * producer publishes its own "7" for D-1; then the relay's 5 and 6.  The
 * intruder is a conflict -- dead-lettered with that reason and the
 * subject parked -- never applied over the owner's events, and the
 * owner's 5 and 6 wait behind it (they are not dropped as duplicates).
 * skip acts on the event that parked the subject (the intruder's 7, not
 * the lowest number waiting), and the owner's events follow in order.
 */
START_TEST(second_producer_is_a_conflict_not_a_displacement)
{
    tu_cluster *c = tu_cluster_new(_i, 1);
    sqlite3 *cdb = tu_open_shared(tu_path(dir, "consumer.db"));
    de_consumer *con;
    de_consumer_stats st;
    de_relay *r;
    other o;
    const char *intruder[] = {"ce_specversion",
                              "1.0",
                              "ce_id",
                              "i-7",
                              "ce_source",
                              "/intruder",
                              "ce_type",
                              "delivery.assigned",
                              "ce_subjectseq",
                              "7",
                              "ce_subjecttype",
                              "delivery",
                              "ce_action",
                              "assigned",
                              NULL};

    tu_topic_create(c, "delivery", 1);
    r = start_relay(c);
    for (int i = 0; i < 4; i++)
        tu_write(db, ob, "delivery", "D-1", "assigned", "{}", 0);
    tu_ok(de_relay_flush(r, 30000));
    o = other_open(c, tu_topic(c, "delivery"));
    other_send(&o, "D-1", "{}", intruder);
    other_close(&o);
    tu_write(db, ob, "delivery", "D-1", "picked_up", "{}", 0);
    tu_write(db, ob, "delivery", "D-1", "delivered", "{}", 0);
    tu_ok(de_relay_flush(r, 30000));
    con = plain_consumer(c, cdb, "g-owner", NULL, NULL);
    ck_assert(tu_wait_for(
        (poll_stats(con, &st),
         st.parked_subjects == 1 && dead_letters(cdb, "waiting") == 2),
        30000));
    ck_assert_uint_eq(st.conflicts, 1);
    ck_assert_uint_eq(st.applied, 4);
    ck_assert_int_eq(count(cdb, "SELECT count(*) FROM de_dead_letter WHERE "
                                "kind = 'conflict' AND event_id = 'i-7' AND "
                                "source = '/intruder' AND error LIKE "
                                "'%ce_source ''/intruder''%''/test/relay''%'"
                                " AND state = 'parked'"),
                     1);
    tu_ok(de_consumer_skip(con, "delivery", "D-1"));
    tu_ok(de_consumer_stats_get(con, &st));
    ck_assert_uint_eq(st.parked_subjects, 0);
    ck_assert_int_eq(count(cdb, "SELECT count(*) FROM de_dead_letter WHERE "
                                "event_id = 'i-7' AND state = 'skipped'"),
                     1);
    ck_assert_str_eq(applied_ids(cdb, "D-1"), ledger_ids("D-1"));
    tu_ok(de_consumer_close(con));
    assert_exactly_once(cdb);
    tu_ok(de_relay_stop(r, 5000));
    sqlite3_close(cdb);
    tu_cluster_destroy(c);
}
END_TEST

/*
 * A gap that fills by itself unparks by itself: G-1 has 1..4, then 9
 * arrives (5..8 missing: parked on the gap), then 5..8 arrive: they are
 * applied and 9 after them, in order, without an operator.  H-1 parks on
 * a gap at 3 that never fills; its 4 waits; release applies 3 (accepting
 * the gap) and 4.
 */
START_TEST(a_gap_that_fills_unparks_itself)
{
    tu_cluster *c = tu_cluster_new(_i, 1);
    sqlite3 *cdb = tu_open_shared(tu_path(dir, "consumer.db"));
    de_consumer *con;
    de_consumer_stats st;
    other o;
    static const int order[] = {1, 2, 3, 4, 9, 5, 6, 7, 8};
    char id[16], seq[8];

    tu_topic_create(c, "delivery", 1);
    o = other_open(c, tu_topic(c, "delivery"));
    for (size_t i = 0; i < sizeof order / sizeof *order; i++) {
        snprintf(id, sizeof id, "g-%d", order[i]);
        snprintf(seq, sizeof seq, "%d", order[i]);
        {
            const char *h[] = {OURS(seq, id), NULL};
            other_send(&o, "G-1", "{}", h);
        }
        if (order[i] == 9) {
            /* H-1: 1, then 3 (a gap that stays), then 4. */
            const char *h1[] = {OURS("1", "h-1"), NULL};
            const char *h3[] = {OURS("3", "h-3"), NULL};
            const char *h4[] = {OURS("4", "h-4"), NULL};
            other_send(&o, "H-1", "{}", h1);
            other_send(&o, "H-1", "{}", h3);
            other_send(&o, "H-1", "{}", h4);
        }
    }
    other_close(&o);
    con = plain_consumer(c, cdb, "g-refill", NULL, NULL);
    ck_assert(tu_wait_for(
        (poll_stats(con, &st),
         applied_count(cdb) == 10 && dead_letters(cdb, "waiting") == 1),
        30000));
    ck_assert_str_eq(applied_ids(cdb, "G-1"),
                     "g-1,g-2,g-3,g-4,g-5,g-6,g-7,g-8,g-9");
    ck_assert_int_eq(count(cdb, "SELECT count(*) FROM de_dead_letter WHERE "
                                "subject_id = 'G-1' AND kind = 'gap' AND seq "
                                "= 9 AND state = 'applied'"),
                     1);
    ck_assert_uint_eq(st.parked_subjects, 1); /* H-1 */
    tu_ok(de_consumer_release(con, "delivery", "H-1"));
    ck_assert_str_eq(applied_ids(cdb, "H-1"), "h-1,h-3,h-4");
    tu_ok(de_consumer_stats_get(con, &st));
    ck_assert_uint_eq(st.parked_subjects, 0);
    tu_ok(de_consumer_close(con));
    sqlite3_close(cdb);
    tu_cluster_destroy(c);
}
END_TEST

/* An event without a sequence whose handler keeps failing parks its
 * subject like a numbered one: the subject's later events wait, in the
 * order read; release applies them in that order; copies read again
 * afterwards are duplicates by id. */
START_TEST(unnumbered_failures_park_and_release)
{
    tu_cluster *c = tu_cluster_new(_i, 1);
    sqlite3 *cdb = tu_open_shared(tu_path(dir, "consumer.db"));
    de_consumer *con = NULL;
    de_consumer_stats st;
    struct failing f = {"N-F", 0};
    other o;
    char id[16];

    tu_topic_create(c, "delivery", 1);
    for (int round = 0; round < 2; round++) {
        o = other_open(c, tu_topic(c, "delivery"));
        for (int i = 3; i >= 1; i--) { /* ids out of lexical order */
            snprintf(id, sizeof id, "n-%d", i);
            {
                const char *h[] = {PLAIN(id, "N-F", "delivery.noted"), NULL};
                other_send(&o, "N-F", "{}", h);
            }
            if (round == 0 && i == 3) {
                const char *h[] = {PLAIN("ok-1", "N-OK", "delivery.noted"),
                                   NULL};
                other_send(&o, "N-OK", "{}", h);
            }
        }
        other_close(&o);
        if (round == 1)
            break;
        /* The copies of round 1 come after the release below. */
        if (con == NULL)
            tu_ok(open_consumer(cdb, c->bootstrap, c->prefix, "g-unnumbered",
                                NULL, NULL, &f, &con));
        ck_assert(tu_wait_for(
            (poll_stats(con, &st), st.parked_subjects == 1 &&
                                       dead_letters(cdb, "waiting") == 2 &&
                                       applied_count(cdb) == 1),
            30000));
        ck_assert_int_eq(count(cdb, "SELECT count(*) FROM de_dead_letter "
                                    "WHERE kind = 'failed' AND event_id = "
                                    "'n-3' AND seq IS NULL AND state = "
                                    "'parked'"),
                         1);
        f.subject = NULL; /* fixed */
        tu_ok(de_consumer_release(con, "delivery", "N-F"));
        ck_assert_str_eq(applied_ids(cdb, "N-F"), "n-3,n-2,n-1");
    }
    /* The second round's copies: duplicates by id. */
    ck_assert(tu_wait_for((poll_stats(con, &st), st.duplicates >= 3), 30000));
    ck_assert_str_eq(applied_ids(cdb, "N-F"), "n-3,n-2,n-1");
    ck_assert_uint_eq(st.parked_subjects, 0);
    tu_ok(de_consumer_close(con));
    sqlite3_close(cdb);
    tu_cluster_destroy(c);
}
END_TEST

/* Events without a sequence are remembered by id for
 * consumer.id.forget.ms, then forgotten, a slice at a time. */
START_TEST(ids_are_forgotten_after_their_horizon)
{
    tu_cluster *c = tu_cluster_new(_i, 1);
    sqlite3 *cdb = tu_open_shared(tu_path(dir, "consumer.db"));
    de_consumer *con;
    de_consumer_stats st;
    other o;
    char id[16];

    tu_topic_create(c, "delivery", 1);
    o = other_open(c, tu_topic(c, "delivery"));
    for (int i = 0; i < 20; i++) {
        snprintf(id, sizeof id, "f-%d", i);
        {
            const char *h[] = {PLAIN(id, "F-1", "delivery.noted"), NULL};
            other_send(&o, "F-1", "{}", h);
        }
    }
    other_close(&o);
    con = plain_consumer(c, cdb, "g-ids", "consumer.id.forget.ms", "1000");
    ck_assert(
        tu_wait_for((poll_stats(con, &st), applied_count(cdb) == 20), 30000));
    /* The horizon under test is a second: wait for the outcome. */
    ck_assert(
        tu_wait_for((poll_stats(con, &st), st.ids_forgotten >= 20), 30000));
    ck_assert_int_eq(count(cdb, "SELECT count(*) FROM de_inbox_id"), 0);
    tu_ok(de_consumer_close(con));
    sqlite3_close(cdb);
    tu_cluster_destroy(c);
}
END_TEST

/* Which member applied an event: the applied row's pid column, set from
 * the handler's context. */
static de_err record_member(sqlite3 *cdb, const de_event_view *ev, void *ctx)
{
    char sql[128];
    de_err err = record_applied(cdb, ev, NULL);

    if (err != DE_OK)
        return err;
    snprintf(sql, sizeof sql,
             "UPDATE applied SET pid = %d WHERE n = last_insert_rowid()",
             (int)(intptr_t)ctx);
    return sqlite3_exec(cdb, sql, NULL, NULL, NULL) == SQLITE_OK ? DE_OK
                                                                 : DE_ERR_DB;
}

static de_consumer *member(tu_cluster *c, sqlite3 *cdb, const char *strategy,
                           const char *instance, int tag)
{
    de_conf *conf = de_conf_new();
    de_consumer *con = NULL;
    char tmpl[128], gid[192];

    snprintf(tmpl, sizeof tmpl, "%s{subject_type}.events", c->prefix);
    snprintf(gid, sizeof gid, "%smembers-%s", c->prefix, strategy);
    de_conf_set_log_cb(conf, tu_log, NULL);
    tu_ok(de_conf_set(conf, "bootstrap.servers", c->bootstrap));
    tu_ok(de_conf_set(conf, "group.id", gid));
    tu_ok(de_conf_set(conf, "topic.template", tmpl));
    tu_ok(de_conf_set(conf, "partition.assignment.strategy", strategy));
    if (instance != NULL)
        tu_ok(de_conf_set(conf, "group.instance.id", instance));
    tu_ok(de_consumer_open(cdb, conf, &con));
    de_conf_destroy(conf);
    tu_ok(de_consumer_on(con, "delivery", NULL, record_member,
                         (void *)(intptr_t)tag));
    return con;
}

/*
 * A rebalance with each strategy: eager (range,roundrobin) and
 * cooperative (cooperative-sticky, where librdkafka demands incremental
 * assignment).  A second member joins while events flow, takes
 * partitions and applies events; the first leaves and the second takes
 * everything; every event is applied once, in order.  Both members poll
 * from this thread, each on its own connection to the database.
 */
START_TEST(rebalances_with_each_strategy)
{
    static const char *const strategies[] = {"range,roundrobin",
                                             "cooperative-sticky"};
    tu_cluster *c = tu_cluster_new(_i / 2, 3);
    const char *strategy = strategies[_i % 2];
    sqlite3 *cdb = tu_open_shared(tu_path(dir, "consumer.db"));
    sqlite3 *cdb2 = tu_open_shared(tu_path(dir, "consumer.db"));
    de_consumer *a, *b;
    de_relay *r;
    int64_t want;

    tu_exec(cdb, applied_sql);
    tu_topic_create(c, "delivery", 6);
    r = start_relay(c);
    write_events(30, 2, "delivery");
    a = member(c, cdb, strategy, NULL, 1);
    ck_assert(tu_wait_for(
        (tu_ok(de_consumer_poll(a, 50, NULL)), applied_count(cdb) >= 60),
        60000));
    b = member(c, cdb2, strategy, NULL, 2);
    {
        /* Events for every partition until the second member applied one
         * of them (the rebalance takes a few seconds). */
        bool both = false;
        int64_t deadline = tu_now_ms() + 90000;
        while (!both && tu_now_ms() < deadline) {
            write_events(30, 1, "delivery");
            both = tu_wait_for((tu_ok(de_consumer_poll(a, 20, NULL)),
                                tu_ok(de_consumer_poll(b, 20, NULL)),
                                count(cdb, "SELECT count(DISTINCT pid) FROM "
                                           "applied") == 2),
                               3000);
        }
        ck_assert_msg(both, "%s: the second member never applied anything",
                      strategy);
    }
    tu_ok(de_consumer_close(a)); /* leaves: b takes its partitions */
    write_events(30, 2, "delivery");
    tu_ok(de_relay_flush(r, 60000));
    want = tu_query_int(db, "SELECT count(*) FROM ledger");
    ck_assert_msg(tu_wait_for((tu_ok(de_consumer_poll(b, 50, NULL)),
                               applied_count(cdb) == want),
                              60000),
                  "%s: %lld of %lld applied", strategy,
                  (long long)applied_count(cdb), (long long)want);
    tu_ok(de_consumer_close(b));
    assert_exactly_once(cdb);
    tu_ok(de_relay_stop(r, 5000));
    sqlite3_close(cdb2);
    sqlite3_close(cdb);
    tu_cluster_destroy(c);
}
END_TEST

/* Static group membership (group.instance.id): a member that restarts
 * under its instance id gets its partitions back and goes on where it
 * stopped, applying nothing twice. */
START_TEST(static_membership_restarts)
{
    tu_cluster *c = tu_cluster_new(_i, 3);
    sqlite3 *cdb = tu_open_shared(tu_path(dir, "consumer.db"));
    de_consumer *a;
    de_relay *r;
    int64_t want;

    tu_exec(cdb, applied_sql);
    tu_topic_create(c, "delivery", 3);
    r = start_relay(c);
    write_events(20, 2, "delivery");
    a = member(c, cdb, "range,roundrobin", "member-1", 1);
    ck_assert(tu_wait_for(
        (tu_ok(de_consumer_poll(a, 50, NULL)), applied_count(cdb) >= 40),
        60000));
    tu_ok(de_consumer_close(a));
    write_events(20, 2, "delivery");
    tu_ok(de_relay_flush(r, 60000));
    want = tu_query_int(db, "SELECT count(*) FROM ledger");
    a = member(c, cdb, "range,roundrobin", "member-1", 2);
    ck_assert(tu_wait_for(
        (tu_ok(de_consumer_poll(a, 50, NULL)), applied_count(cdb) == want),
        60000));
    tu_ok(de_consumer_close(a));
    assert_exactly_once(cdb);
    tu_ok(de_relay_stop(r, 5000));
    sqlite3_close(cdb);
    tu_cluster_destroy(c);
}
END_TEST

START_TEST(refuses_bad_use)
{
    sqlite3 *cdb = tu_open_shared(tu_path(dir, "consumer.db")), *mem;
    de_conf *conf = de_conf_new();
    de_consumer *con = (de_consumer *)1;

    tu_ok(de_conf_set(conf, "bootstrap.servers", "127.0.0.1:1"));
    tu_assert_err(de_consumer_open(cdb, conf, &con), DE_ERR_CONFIG, "group.id");
    ck_assert_ptr_null(con);
    tu_ok(de_conf_set(conf, "group.id", "g"));
    tu_ok(de_conf_set(conf, "enable.auto.commit", "true"));
    tu_assert_err(de_consumer_open(cdb, conf, &con), DE_ERR_CONFIG,
                  "enable.auto.commit=true is not allowed");
    tu_ok(de_conf_set(conf, "enable.auto.commit", "false"));
    tu_assert_err(de_conf_set(conf, "consumer.on.gap", "ignore"), DE_ERR_CONFIG,
                  "'ignore' must be park or apply");
    tu_assert_err(de_conf_set(conf, "consumer.topics", "a,,b"), DE_ERR_CONFIG,
                  "empty topic name");
    ck_assert_int_eq(sqlite3_open(":memory:", &mem), SQLITE_OK);
    tu_assert_err(de_consumer_open(mem, conf, &con), DE_ERR_ARG, "in memory");
    sqlite3_close(mem);
    tu_ok(de_consumer_open(cdb, conf, &con));
    tu_assert_err(de_consumer_on(con, "a b", NULL, record_applied, NULL),
                  DE_ERR_ARG, "'a b'");
    tu_assert_err(de_consumer_on_type(con, "", record_applied, NULL),
                  DE_ERR_ARG, "ce_type ''");
    tu_assert_err(de_consumer_on_type(con, "x\ny", record_applied, NULL),
                  DE_ERR_ARG, "'x\\x0ay'");
    tu_assert_err(de_consumer_on(con, "delivery", "x y", record_applied, NULL),
                  DE_ERR_ARG, "'x y'");
    tu_assert_err(de_consumer_on(con, "delivery", NULL, NULL, NULL), DE_ERR_ARG,
                  "NULL fn");
    tu_ok(de_consumer_on(con, "delivery", NULL, record_applied, NULL));
    tu_assert_err(de_consumer_on(con, "delivery", NULL, record_applied, NULL),
                  DE_ERR_ARG, "already registered");
    tu_ok(de_consumer_poll(con, 0, NULL));
    tu_assert_err(de_consumer_on(con, "rider", NULL, record_applied, NULL),
                  DE_ERR_STATE, "after the first");
    tu_ok(de_consumer_close(con));
    tu_ok(de_consumer_close(NULL));
    de_conf_destroy(conf);
    sqlite3_close(cdb);
}
END_TEST

/* ---- trust: origin and integrity ---------------------------------------- */

/* Our headers for D-1's number `seq`, from `source`. */
#define FORGED(source, seq, id)                                                \
    "ce_specversion", "1.0", "ce_id", id, "ce_source", source, "ce_type",      \
        "delivery.assigned", "ce_subjectseq", seq, "ce_subjecttype",           \
        "delivery", "ce_action", "assigned"

static int64_t foreign_with(sqlite3 *cdb, const char *error_like)
{
    char sql[300];

    snprintf(sql, sizeof sql,
             "SELECT count(*) FROM de_dead_letter WHERE kind = 'foreign' "
             "AND error LIKE '%s'",
             error_like);
    return tu_query_int(cdb, sql);
}

/* After forged records: the relay's next two events of D-1, then a
 * consumer (settings kv) reading everything.  It applies `applied` events
 * and dead-letters `foreign` records; D-1's real events are applied
 * in their order.  Returns the consumer, its stats in *st. */
static de_consumer *after_forgeries(tu_cluster *c, de_relay *r, sqlite3 *cdb,
                                    const char *group, const char *const *kv,
                                    int64_t applied, uint64_t foreign,
                                    de_consumer_stats *st)
{
    de_consumer *con = NULL;

    tu_write(db, ob, "delivery", "D-1", "delivered", "{}", 0);
    tu_write(db, ob, "delivery", "D-1", "rated", "{}", 0);
    tu_ok(de_relay_flush(r, 30000));
    tu_ok(
        open_consumer_kv(cdb, c->bootstrap, c->prefix, group, kv, NULL, &con));
    ck_assert(tu_wait_for((poll_stats(con, st), applied_count(cdb) == applied &&
                                                    st->foreign == foreign),
                          30000));
    ck_assert_str_eq(applied_ids(cdb, "D-1"), ledger_ids("D-1"));
    return con;
}

/* The ce_subjectepoch of the records read (all of one numbering). */
static void capture_epoch(void *arg, const rd_kafka_message_t *m, int32_t np)
{
    const char *e = tu_header(m, "ce_subjectepoch");

    (void)np;
    ck_assert_ptr_nonnull(e);
    snprintf(arg, 24, "%s", e);
}

/*
 * Forged numbered records never silence a subject.  The relay numbers D-1
 * 1..2; then come a number 3 from a source consumer.sources does not
 * list, the relay's own source with ce_subjectseq 999999999999999999,
 * and a never-seen D-9 starting at 5000; then the relay's 3 and 4.  Even
 * with consumer.on.gap=apply (where a far number would otherwise become
 * the subject's), the forged records are foreign dead letters with their
 * reasons, D-1's real events are applied in order, nothing is parked,
 * and D-9 gets no inbox row -- nor does C-1, a courier (a subject type
 * no handler takes), whose event is skipped without a dead letter.
 */
START_TEST(forged_numbers_are_dead_letters)
{
    tu_cluster *c = tu_cluster_new(_i, 1);
    sqlite3 *cdb = tu_open_shared(tu_path(dir, "consumer.db"));
    const char *kv[] = {"consumer.sources",
                        "/other,/test/relay",
                        "consumer.on.gap",
                        "apply",
                        "consumer.record.max.bytes",
                        "100000",
                        NULL};
    char *big = malloc(200001), *big_key = malloc(5001);
    const char *untrusted[] = {FORGED("/intruder", "3", "f-3"), NULL};
    char epoch[24] = "";
    const char *fresh[] = {FORGED("/test/relay", "5000", "f-fresh"), NULL};
    de_consumer *con = NULL;
    de_consumer_stats st;
    de_relay *r;
    other o;

    tu_topic_create(c, "delivery", 1);
    r = start_relay(c);
    tu_write(db, ob, "delivery", "D-1", "assigned", "{}", 0);
    tu_write(db, ob, "delivery", "D-1", "picked_up", "{}", 0);
    tu_ok(de_relay_flush(r, 30000));
    /* The forger copies the numbering from the topic, so that its far
     * number is not simply an older numbering's. */
    tu_read_topic(c, tu_topic(c, "delivery"), capture_epoch, epoch);
    ck_assert_str_ne(epoch, "");
    o = other_open(c, tu_topic(c, "delivery"));
    other_send(&o, "D-1", "{}", untrusted);
    {
        const char *far[] = {
            FORGED("/test/relay", "999999999999999999", "f-far"),
            "ce_subjectepoch", epoch, NULL};
        other_send(&o, "D-1", "{}", far);
    }
    other_send(&o, "D-9", "{}", fresh);
    {
        /* A subject type no handler takes: no inbox row, nothing kept. */
        const char *courier[] = {"ce_specversion",
                                 "1.0",
                                 "ce_id",
                                 "c-1",
                                 "ce_source",
                                 "/test/relay",
                                 "ce_type",
                                 "courier.started",
                                 "ce_subjectseq",
                                 "1",
                                 "ce_subjecttype",
                                 "courier",
                                 NULL};
        other_send(&o, "C-1", "{}", courier);
    }
    /* 200 kB over consumer.record.max.bytes: kept cut, with its hash. */
    memset(big, 'v', 200000);
    big[200000] = '\0';
    memset(big_key, 'k', 5000);
    big_key[5000] = '\0';
    {
        const char *h[] = {FORGED("/test/relay", "3", "f-big"), "x-big", big,
                           NULL};
        other_send(&o, big_key, big, h);
    }
    other_close(&o);
    con = after_forgeries(c, r, cdb, "g-forged", kv, 4, 4, &st);
    ck_assert_int_eq(foreign_with(cdb, "untrusted: ce_source ''/intruder'' is "
                                       "not in consumer.sources%"),
                     1);
    ck_assert_int_eq(foreign_with(cdb, "implausible: ce_subjectseq "
                                       "999999999999999999 of event f-far%"
                                       "last number 2%"),
                     1);
    ck_assert_int_eq(foreign_with(cdb, "implausible: ce_subjectseq 5000 of "
                                       "event f-fresh%last number 0%"),
                     1);
    ck_assert_int_eq(
        foreign_with(cdb, "the record is 405% over consumer.record.max.bytes "
                          "(100000); the key of 5000 bytes cut to its first "
                          "1024 (sha256 %); the value of 200000 bytes cut to "
                          "its first 65536 (sha256 %)"),
        1);
    ck_assert_int_eq(
        tu_query_int(cdb, "SELECT count(*) FROM de_dead_letter WHERE "
                          "length(record_value) = 65536 AND "
                          "length(record_key) = 1024 AND "
                          "json_extract(record_headers, '$[7][1].bytes') = "
                          "200000 AND length(json_extract(record_headers, "
                          "'$[7][1].prefix')) = 1024"),
        1);
    free(big);
    free(big_key);
    ck_assert_uint_eq(st.parked_subjects, 0);
    ck_assert_uint_eq(st.gaps, 0);
    ck_assert_int_eq(tu_query_int(cdb, "SELECT count(*) FROM de_inbox WHERE "
                                       "subject_id IN ('D-9', 'C-1')"),
                     0);
    ck_assert_int_eq(tu_query_int(cdb, "SELECT count(*) FROM de_dead_letter "
                                       "WHERE event_id = 'c-1' OR "
                                       "record_key = CAST('C-1' AS BLOB)"),
                     0);
    ck_assert_int_eq(tu_query_int(cdb, "SELECT last_seq FROM de_inbox WHERE "
                                       "subject_id = 'D-1'"),
                     4);
    tu_ok(de_consumer_close(con));
    assert_exactly_once(cdb);
    tu_ok(de_relay_stop(r, 5000));
    sqlite3_close(cdb);
    tu_cluster_destroy(c);
}
END_TEST

/* The headers of D-1's record number 3, captured from the topic. */
static void capture_third(void *arg, const rd_kafka_message_t *m, int32_t np)
{
    rd_kafka_headers_t **out = arg, *h = NULL;
    const char *seq = tu_header(m, "ce_subjectseq");

    (void)np;
    if (seq != NULL && strcmp(seq, "3") == 0 && *out == NULL) {
        ck_assert_int_eq(rd_kafka_message_headers(m, &h), 0);
        *out = rd_kafka_headers_copy(h);
    }
}

/* A copy of `from` with header `name`'s value replaced. */
static rd_kafka_headers_t *with_header(const rd_kafka_headers_t *from,
                                       const char *name, const char *value)
{
    rd_kafka_headers_t *h = rd_kafka_headers_new(16);
    const char *n;
    const void *v;
    size_t size;

    for (size_t i = 0; rd_kafka_header_get_all(from, i, &n, &v, &size) == 0;
         i++) {
        if (strcmp(n, name) == 0)
            rd_kafka_header_add(h, n, -1, value, -1);
        else
            rd_kafka_header_add(h, n, -1, v, (ssize_t)size);
    }
    return h;
}

#define SECRET_1 "k1:correct-horse-battery-staple-0123456789"
#define SECRET_0 "k0:the-key-we-used-last-month-abcdefghijklm"

/*
 * The integrity check.  The relay signs with event.hmac.key k1; the
 * consumer holds k0 (being retired) and k1.  Three records reach D-1's
 * topic between the relay's 3 and 4: its own number 4 unsigned, record
 * 3 re-sent with its signature but ce_id and ce_subjectseq changed to
 * make it number 4, and one signed under a key id the consumer does not
 * hold.  Each would otherwise be applied as D-1's number 4; each is a
 * foreign dead letter naming its reason, and the real 4 and 5 apply in
 * order after them.
 */
START_TEST(signed_records_are_verified)
{
    tu_cluster *c = tu_cluster_new(_i, 1);
    sqlite3 *cdb = tu_open_shared(tu_path(dir, "consumer.db"));
    const char *kv[] = {"event.hmac.key", SECRET_0 "," SECRET_1, NULL};
    const char *unsigned_[] = {FORGED("/test/relay", "4", "u-4"), NULL};
    const char *unknown[] = {
        FORGED("/test/relay", "4", "x-4"), "de_hmac",
        "k9:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        NULL};
    de_conf *rconf = tu_relay_conf(c, "event.hmac.key", SECRET_1, NULL);
    rd_kafka_headers_t *third = NULL, *forged;
    de_consumer *con = NULL;
    de_consumer_stats st;
    de_relay *r = NULL;
    other o;

    tu_topic_create(c, "delivery", 1);
    tu_ok(de_relay_start(ob, rconf, &r));
    de_conf_destroy(rconf);
    for (int i = 0; i < 3; i++)
        tu_write(db, ob, "delivery", "D-1", "assigned", "{}", 0);
    tu_ok(de_relay_flush(r, 30000));
    tu_read_topic(c, tu_topic(c, "delivery"), capture_third, &third);
    ck_assert_ptr_nonnull(third);
    {
        const void *v;
        size_t size;
        ck_assert_int_eq(rd_kafka_header_get_last(third, "de_hmac", &v, &size),
                         0);
        ck_assert_uint_eq(size, 3 + 64);
        ck_assert_int_eq(memcmp(v, "k1:", 3), 0);
    }
    forged = with_header(third, "ce_id", "t-4");
    rd_kafka_headers_destroy(third);
    third = with_header(forged, "ce_subjectseq", "4");
    rd_kafka_headers_destroy(forged);
    o = other_open(c, tu_topic(c, "delivery"));
    other_send(&o, "D-1", "{}", unsigned_);
    ck_assert_int_eq(
        rd_kafka_producev(o.p, RD_KAFKA_V_TOPIC(o.topic),
                          RD_KAFKA_V_KEY("D-1", 3),
                          RD_KAFKA_V_VALUE((void *)(uintptr_t) "{}", 2),
                          RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
                          RD_KAFKA_V_HEADERS(third), RD_KAFKA_V_END),
        0);
    other_send(&o, "D-1", "{}", unknown);
    other_close(&o);
    con = after_forgeries(c, r, cdb, "g-signed", kv, 5, 3, &st);
    ck_assert_int_eq(foreign_with(cdb, "no de_hmac header%"), 1);
    ck_assert_int_eq(foreign_with(cdb, "de_hmac does not match%key id ''k1''"),
                     1);
    ck_assert_int_eq(foreign_with(cdb, "de_hmac names key id ''k9''%"), 1);
    ck_assert_uint_eq(st.parked_subjects, 0);
    ck_assert_uint_eq(st.conflicts, 0);
    /* The secrets appear in no dead letter. */
    ck_assert_int_eq(tu_query_int(cdb, "SELECT count(*) FROM de_dead_letter "
                                       "WHERE error LIKE '%horse%' OR error "
                                       "LIKE '%last-month%'"),
                     0);
    tu_ok(de_consumer_close(con));
    assert_exactly_once(cdb);
    tu_ok(de_relay_stop(r, 5000));
    sqlite3_close(cdb);
    tu_cluster_destroy(c);
}
END_TEST

/* Dead letters past consumer.dead.letter.retention.ms are deleted, but
 * never one that parks a subject. */
START_TEST(dead_letters_have_a_retention)
{
    tu_cluster *c = tu_cluster_new(_i, 1);
    sqlite3 *cdb = tu_open_shared(tu_path(dir, "consumer.db"));
    const char *kv[] = {"consumer.dead.letter.retention.ms", "500", NULL};
    const char *gap[] = {OURS("5", "g-5"), NULL};
    de_consumer *con = NULL;
    de_consumer_stats st;
    other o;

    tu_topic_create(c, "delivery", 1);
    o = other_open(c, tu_topic(c, "delivery"));
    other_send(&o, "X-1", "{not json", NULL);
    other_send(&o, "G-1", "{}", gap);
    other_close(&o);
    tu_ok(open_consumer_kv(cdb, c->bootstrap, c->prefix, "g-retention", kv,
                           NULL, &con));
    ck_assert(tu_wait_for(
        (poll_stats(con, &st), st.foreign == 1 && st.parked_subjects == 1),
        30000));
    ck_assert(tu_wait_for(
        (poll_stats(con, &st), dead_letters(cdb, "foreign") == 0), 30000));
    ck_assert_int_eq(dead_letters(cdb, "gap"), 1);
    tu_ok(de_consumer_close(con));
    sqlite3_close(cdb);
    tu_cluster_destroy(c);
}
END_TEST

static Suite *consumer_suite(void)
{
    Suite *s = suite_create("consumer");
    TCase *tc = tcase_create("apply");

    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 180);
    tcase_add_loop_test(tc, consumer_statistics_and_prometheus_metrics,
                        tu_cluster_first(), tu_cluster_count());
    tcase_add_loop_test(tc, release_asked_from_another_process,
                        tu_cluster_first(), tu_cluster_count());
    tcase_add_loop_test(tc, applies_each_event_once_in_order,
                        tu_cluster_first(), tu_cluster_count());
    tcase_add_loop_test(tc, foreign_and_garbage_records_are_parked,
                        tu_cluster_first(), tu_cluster_count());
    tcase_add_loop_test(tc, failing_handler_dead_letter_and_release,
                        tu_cluster_first(), tu_cluster_count());
    tcase_add_loop_test(tc, skip_drops_the_dead_letter, tu_cluster_first(),
                        tu_cluster_count());
    tcase_add_loop_test(tc, gaps_are_parked_or_applied, tu_cluster_first(),
                        tu_cluster_count());
    tcase_add_loop_test(tc, reused_numbers_are_conflicts_not_duplicates,
                        tu_cluster_first(), tu_cluster_count());
    tcase_add_loop_test(tc, uuid_ids_are_compared_exactly, tu_cluster_first(),
                        tu_cluster_count());
    tcase_add_loop_test(tc, idle_subjects_are_renumbered_and_forgotten,
                        tu_cluster_first(), tu_cluster_count());
    tcase_add_loop_test(tc, forgetting_before_the_relay_parks_a_gap,
                        tu_cluster_first(), tu_cluster_count());
    tcase_add_test(tc, refuses_bad_use);
    suite_add_tcase(s, tc);

    /* Other producers' CloudEvents beside ours. */
    tc = tcase_create("polyglot");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 180);
    tcase_add_loop_test(tc, polyglot_topic_applied_exactly_once,
                        tu_cluster_first(), tu_cluster_count());
    tcase_add_loop_test(tc, second_producer_is_a_conflict_not_a_displacement,
                        tu_cluster_first(), tu_cluster_count());
    tcase_add_loop_test(tc, a_gap_that_fills_unparks_itself, tu_cluster_first(),
                        tu_cluster_count());
    tcase_add_loop_test(tc, ids_are_forgotten_after_their_horizon,
                        tu_cluster_first(), tu_cluster_count());
    tcase_add_loop_test(tc, unnumbered_failures_park_and_release,
                        tu_cluster_first(), tu_cluster_count());
    suite_add_tcase(s, tc);

    /* Group membership: each strategy, static members. */
    tc = tcase_create("trust");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 120);
    tcase_add_loop_test(tc, forged_numbers_are_dead_letters, tu_cluster_first(),
                        tu_cluster_count());
    tcase_add_loop_test(tc, signed_records_are_verified, tu_cluster_first(),
                        tu_cluster_count());
    tcase_add_loop_test(tc, dead_letters_have_a_retention, tu_cluster_first(),
                        tu_cluster_count());
    suite_add_tcase(s, tc);

    tc = tcase_create("membership");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 240);
    tcase_add_loop_test(tc, rebalances_with_each_strategy,
                        2 * tu_cluster_first(), 2 * tu_cluster_count());
    tcase_add_loop_test(tc, static_membership_restarts, tu_cluster_first(),
                        tu_cluster_count());
    suite_add_tcase(s, tc);

    tc = tcase_create("crashes");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 240);
    tcase_add_loop_test(tc, relay_resends_are_applied_once, tu_cluster_first(),
                        tu_cluster_count());
    tcase_add_loop_test(tc, consumer_dying_in_commit_loses_nothing,
                        tu_cluster_first(), tu_cluster_count());
    tcase_add_loop_test(tc, consumer_killed_at_random_applies_exactly_once,
                        tu_cluster_first(), tu_cluster_count());
    tcase_add_loop_test(tc, two_consumers_rebalance, tu_cluster_first(),
                        tu_cluster_count());
    suite_add_tcase(s, tc);
    return s;
}

/* --consume DB BOOTSTRAP PREFIX GROUP: a consumer process for the crash
 * and rebalance tests; runs until SIGKILL or SIGTERM. */
static volatile sig_atomic_t stop;

static void on_term(int sig)
{
    (void)sig;
    stop = 1;
}

/* The commit hook of a consumer process that dies at its Nth commit:
 * inside the COMMIT, before anything of it is on disk -- after waiting
 * long enough for offsets committed too early to have reached Kafka. */
static int commits_left;

static int die_at_commit(void *ctx)
{
    (void)ctx;
    if (--commits_left > 0)
        return 0;
    usleep(500 * 1000);
    _exit(3);
}

static int consume_main(char **argv, int crash_at)
{
    sqlite3 *cdb = NULL;
    de_consumer *con = NULL;

    signal(SIGTERM, on_term);
    if (sqlite3_open(argv[0], &cdb) != SQLITE_OK ||
        open_consumer(cdb, argv[1], argv[2], argv[3],
                      crash_at ? "consumer.batch.size" : NULL, "7", NULL,
                      &con) != DE_OK) {
        fprintf(stderr, "consumer: %s\n", de_errmsg());
        return 2;
    }
    if (crash_at > 0) {
        commits_left = crash_at;
        sqlite3_commit_hook(cdb, die_at_commit, NULL);
    }
    while (!stop)
        if (de_consumer_poll(con, 100, NULL) != DE_OK)
            fprintf(stderr, "consumer: %s\n", de_errmsg());
    de_consumer_close(con);
    sqlite3_close(cdb);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 6 && strcmp(argv[1], "--consume") == 0)
        return consume_main(argv + 2, 0);
    if (argc == 7 && strcmp(argv[1], "--consume-crash") == 0)
        return consume_main(argv + 2, atoi(argv[6]));
    return tu_run(consumer_suite()) ? EXIT_FAILURE : EXIT_SUCCESS;
}

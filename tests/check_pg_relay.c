/* SPDX-License-Identifier: MIT */
/*
 * check_pg_relay.c -- the relay of an outbox in PostgreSQL, end to end:
 * writers in other processes commit events through de_record on their
 * own connections, the relay publishes them to Kafka (librdkafka's mock
 * cluster, or KAFKA_BOOTSTRAP_SERVERS), and an independent consumer
 * reads the topic back and checks it against what the writers committed.
 *
 * The expected order is not taken from the library: the writers keep
 * the host's own ledger (tests/pg/pgledger.h says how), and the check
 * compares the topic with it.
 *
 * A relay that must be SIGKILLed runs in another process: this binary
 * run again with --relay (exec, so that no thread of the test's process
 * is inherited).
 */
#include "deliveryevents_pg.h"
#include "kafka.h"
#include "pg_int.h"
#include "pgledger.h"
#include "pgserver.h"
#include "testutil.h"

#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static const char *conninfo;
static PGconn *conn;
static de_outbox *ob;

static void setup(void)
{
    conn = tpg_host_open(&conninfo, &ob);
}

static void teardown(void)
{
    tpg_host_close(conn, ob);
    ob = NULL;
    conn = NULL;
}

/* ---- a relay in another process --------------------------------------- */

static pid_t spawn_relay(tu_cluster *c)
{
    char tmpl[128];
    pid_t pid;

    snprintf(tmpl, sizeof tmpl, "%s{subject_type}.events", c->prefix);
    pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        execl("/proc/self/exe", "check_pg_relay", "--relay", conninfo,
              c->bootstrap, tmpl, (char *)NULL);
        _exit(127);
    }
    return pid;
}

/* The --relay mode: a relay on conninfo until killed. */
static int relay_process(const char *where, const char *bootstrap,
                         const char *tmpl)
{
    de_conf *conf = de_conf_new();
    de_relay *r = NULL;

    if (de_conf_set(conf, "bootstrap.servers", bootstrap) != DE_OK ||
        de_conf_set(conf, "topic.template", tmpl) != DE_OK ||
        de_conf_set(conf, "event.source", "/test/relay") != DE_OK ||
        de_conf_set(conf, "relay.lease.timeout.ms", "1500") != DE_OK ||
        de_conf_set(conf, "relay.checkpoint.interval.ms", "50") != DE_OK ||
        de_conf_set(conf, "relay.poll.interval.ms", "10") != DE_OK ||
        (de_conf_set_log_cb(conf, tu_log, NULL),
         de_relay_start_pg(where, conf, &r)) != DE_OK) {
        fprintf(stderr, "relay process: %s\n", de_errmsg());
        return 1;
    }
    de_conf_destroy(conf);
    for (;;)
        pause();
}

static void kill_relay(pid_t pid)
{
    int status;

    kill(pid, SIGKILL);
    ck_assert_int_eq(waitpid(pid, &status, 0), pid);
}

/* The relays' connections to this database opened since the last kill
 * (their count), or, with kill, all of them terminated (how many). */
static long long relay_backends(bool kill)
{
    static const char relays[] =
        " FROM pg_catalog.pg_stat_activity WHERE application_name = "
        "'deliveryevents-relay' AND datname = pg_catalog.current_database() "
        "AND backend_start %s coalesce(nullif(pg_catalog.current_setting("
        "'de_test.killed_at', true), ''), '-infinity')::timestamptz";
    char where[400], sql[600];

    if (kill) /* later connections count as new */
        tpg_exec(conn, "SELECT pg_catalog.set_config('de_test.killed_at', "
                       "pg_catalog.clock_timestamp()::text, false)");
    snprintf(where, sizeof where, relays, kill ? "<=" : ">");
    snprintf(sql, sizeof sql, "%s%s",
             kill ? "SELECT count(*) FILTER (WHERE "
                    "pg_catalog.pg_terminate_backend(pid))"
                  : "SELECT count(*)",
             where);
    return tpg_int(conn, sql);
}

static bool relay_tables_exist(void)
{
    return tpg_int(conn, "SELECT count(*) FROM pg_catalog.pg_tables WHERE "
                         "schemaname = 'deliveryevents' AND tablename = "
                         "'relay_lease'") == 1;
}

/* Whether the relay's durable cursor is at the last position drawn. */
static bool cursor_at_end(void)
{
    return tpg_published_cursor(conn) ==
           tpg_int(conn, "SELECT coalesce(max(position), 0) FROM "
                         "deliveryevents.outbox_order");
}

static long long lease_epoch(void)
{
    return relay_tables_exist()
               ? tpg_int(conn, "SELECT coalesce((SELECT epoch FROM "
                               "deliveryevents.relay_lease), 0)")
               : 0;
}

/* Terminates every relay connection to this database and waits until
 * they are gone (pg_terminate_backend with a timeout); how many. */
static long long terminate_relays_now(void)
{
    return tpg_int(conn, "SELECT count(*) FILTER (WHERE "
                         "pg_catalog.pg_terminate_backend(pid, 10000)) FROM "
                         "pg_catalog.pg_stat_activity WHERE application_name "
                         "= 'deliveryevents-relay' AND datname = "
                         "pg_catalog.current_database()");
}

/* ---- tests ------------------------------------------------------------ */

/* Thirty-two writer processes, random commit delays, rollbacks and rolled-back
 * savepoints, the relay running meanwhile: Kafka holds exactly what
 * committed, each subject numbered 1, 2, 3, ... in commit order. */
START_TEST(end_to_end_many_writer_processes)
{
    enum { WRITERS = 32, TXNS = 25 };
    pid_t pids[WRITERS];
    tu_cluster *c;
    de_conf *conf;
    de_relay *r = NULL;

    tpg_fork_writers(conninfo, WRITERS, TXNS, 3000, false, pids);
    c = tu_cluster_new(_i, 3);
    tu_topic_create(c, "delivery", 3);
    conf = tu_relay_conf(c, "relay.poll.interval.ms", "10", NULL);
    /* de_relay_start on the host's outbox: the relay connects where the
     * host's connection is. */
    tu_ok(de_relay_start(ob, conf, &r));
    de_conf_destroy(conf);
    tpg_wait_writers(WRITERS, pids);
    tu_ok(de_relay_flush(r, 120000));
    tu_ok(de_relay_stop(r, 10000));
    ck_assert_int_gt(tpg_int(conn, "SELECT count(*) FROM ledger"), 100);
    tu_check k = tpg_check(conn, c);
    tu_assert_check(&k);
    ck_assert_int_eq(k.duplicates, 0); /* no crash, no restart */
    tu_cluster_destroy(c);
}
END_TEST

/* A relay SIGKILLed mid-stream: the next one publishes the rest, numbers
 * nothing twice, and repeats at most what was in flight, with the same
 * ce_id and ce_subjectseq. */
START_TEST(relay_killed_next_one_continues)
{
    enum { WRITERS = 4, TXNS = 60 };
    pid_t pids[WRITERS], relay;
    tu_cluster *c = tu_cluster_new(_i, 3);
    de_conf *conf;
    de_relay *r = NULL;

    tu_topic_create(c, "delivery", 3);
    relay = spawn_relay(c);
    tpg_fork_writers(conninfo, WRITERS, TXNS, 2000, false, pids);
    /* Killed once it has published and checkpointed some. */
    ck_assert(tu_wait_for(tpg_published_cursor(conn) > 20, 60000));
    kill_relay(relay);
    conf = tu_relay_conf(c, "relay.poll.interval.ms", "10", NULL);
    tu_ok(de_relay_start_pg(conninfo, conf, &r));
    de_conf_destroy(conf);
    tpg_wait_writers(WRITERS, pids);
    tpg_stop_and_check(r, conn, c);
    tu_cluster_destroy(c);
}
END_TEST

/* Two relays of one database: the second stands by; when the first is
 * SIGKILLed it takes over after the lease expires and publishes the
 * rest. */
START_TEST(standby_takes_over_after_sigkill)
{
    pid_t relay, pids[2];
    tu_cluster *c = tu_cluster_new(_i, 3);
    de_conf *conf;
    de_relay *b = NULL;
    de_relay_stats sb;
    long long epoch;

    tu_topic_create(c, "delivery", 3);
    relay = spawn_relay(c);
    ck_assert(tu_wait_for(lease_epoch() > 0, 30000));
    epoch = lease_epoch();
    conf = tu_relay_conf(c, "relay.poll.interval.ms", "10", NULL);
    tu_ok(de_relay_start_pg(conninfo, conf, &b));
    de_conf_destroy(conf);
    tpg_fork_writers(conninfo, 2, 20, 1000, false, pids);
    tpg_wait_writers(2, pids);
    /* The first relay publishes them; the second stays a standby. */
    ck_assert(tu_wait_for(cursor_at_end(), 60000));
    tu_ok(de_relay_stats_get(b, &sb));
    ck_assert_int_eq(sb.active, 0);
    ck_assert_uint_eq(sb.published, 0);
    kill_relay(relay);
    ck_assert(tu_wait_for((de_relay_stats_get(b, &sb), sb.active), 30000));
    ck_assert_int_eq(lease_epoch(), epoch + 1);
    tpg_fork_writers(conninfo, 2, 20, 1000, false, pids);
    tpg_wait_writers(2, pids);
    tu_ok(de_relay_flush(b, 120000));
    tu_ok(de_relay_stop(b, 10000));
    tu_check k = tpg_check(conn, c);
    tu_assert_check(&k);
    tu_cluster_destroy(c);
}
END_TEST

/* The lease fences: once another relay took it over (the first one
 * stopped renewing it for relay.lease.timeout.ms, by the server's clock),
 * the old holder's checkpoint renews nothing and writes nothing. */
START_TEST(old_relay_checkpoint_refused_after_takeover)
{
    char outbox_id[37], holder[300];
    de__source *src = NULL;
    de__rstate *old = NULL, *now = NULL;
    int64_t cursor;
    bool held = false;

    tu_ok(de__source_open_pg(conninfo, false, &src, outbox_id));
    tu_ok(de__rstate_open_pg(conninfo, outbox_id, 0, &old, &cursor));
    tu_ok(de__rstate_open_pg(conninfo, outbox_id, 0, &now, &cursor));
    ck_assert_int_eq(cursor, 0);
    tu_ok(de__rstate_lease_acquire(old, "old", 0, 1500, &held, holder,
                                   sizeof holder));
    ck_assert(held);
    /* Fresh: the other one is refused and told who holds it. */
    tu_ok(de__rstate_lease_acquire(now, "new", 0, 1500, &held, holder,
                                   sizeof holder));
    ck_assert(!held);
    ck_assert_ptr_nonnull(strstr(holder, "pid "));
    tu_ok(de__rstate_begin(old, "old", 0, &held));
    ck_assert(held);
    tu_ok(de__rstate_put_cursor(old, 5, "e5"));
    tu_ok(de__rstate_commit(old));
    /* The old one stops renewing: taken over once the lease expires. */
    ck_assert(
        tu_wait_for((tu_ok(de__rstate_lease_acquire(now, "new", 0, 1500, &held,
                                                    holder, sizeof holder)),
                     held),
                    10000));
    ck_assert_int_eq(lease_epoch(), 2);
    /* The old relay's checkpoint: refused, nothing written. */
    tu_ok(de__rstate_begin(old, "old", 0, &held));
    ck_assert(!held);
    ck_assert_int_eq(tpg_published_cursor(conn), 5);
    tu_ok(de__rstate_begin(now, "new", 0, &held));
    ck_assert(held);
    tu_ok(de__rstate_put_cursor(now, 7, "e7"));
    tu_ok(de__rstate_commit(now));
    ck_assert_int_eq(tpg_published_cursor(conn), 7);
    de__rstate_close(old);
    de__rstate_close(now);
    src->ops->close(src);
}
END_TEST

/* Relay connections of this database waiting for a lock in a statement
 * whose text contains `text`. */
static long long relay_lock_waits(const char *text)
{
    char sql[600];

    snprintf(sql, sizeof sql,
             "SELECT count(*) FROM pg_catalog.pg_stat_activity WHERE "
             "application_name = 'deliveryevents-relay' AND datname = "
             "pg_catalog.current_database() AND wait_event_type = 'Lock' AND "
             "strpos(query, '%s') > 0",
             text);
    return tpg_int(conn, sql);
}

/*
 * Guarantee 6 when a read stalls: a relay whose read of committed rows
 * outlasts its lease hands none of them to its producer; the standby
 * that took over publishes them.  An operator's ACCESS EXCLUSIVE lock on
 * the outbox (VACUUM FULL, ALTER TABLE) is requested while a host
 * transaction holds the table, so that the active relay's read of that
 * commit -- woken by its NOTIFY, the relay polling only every ten
 * minutes -- queues behind it.  The relay's thread renews nothing while
 * it waits, and the standby takes the lease, reads Kafka (nothing of the
 * event there) and waits for the lock too, to check its cursor.  The
 * lock released, both have the event: before the relay checked its
 * lease again right before producing, the old one published it as well
 * -- a duplicate without any crash.  (When the relay's lease timer woke
 * it just before the commit, its stalled read finds nothing, and the
 * read it makes next, before sleeping, has the event: the same check
 * covers it.)  On an external server this assumes no lock_timeout or
 * statement_timeout for the relay's role.
 */
START_TEST(read_stalled_past_the_lease_publishes_nothing)
{
    tu_cluster *c = tu_cluster_new(_i, 1);
    de_conf *conf;
    de_relay *a = NULL, *b = NULL;
    de_relay_stats st;
    PGconn *lock;
    PGresult *res;
    unsigned seed = 7;
    long long epoch;
    bool a_waits, b_waits, taken;

    tu_topic_create(c, "delivery", 3);
    conf = tu_relay_conf(c, "relay.poll.interval.ms", "600000",
                         "relay.lease.timeout.ms", "1000", NULL);
    tu_ok(de_relay_start(ob, conf, &a));
    de_conf_destroy(conf);
    tpg_commit_one(conn, ob, 1);
    tu_ok(de_relay_flush(a, 30000));
    /* Its cursor on disk: the standby's check of it reads that row. */
    ck_assert(tu_wait_for(cursor_at_end(), 30000));
    epoch = lease_epoch();
    ck_assert_int_gt(epoch, 0);
    conf = tu_relay_conf(c, "relay.poll.interval.ms", "10",
                         "relay.lease.timeout.ms", "1000", NULL);
    tu_ok(de_relay_start_pg(conninfo, conf, &b));
    de_conf_destroy(conf);

    tpg_exec(conn, "BEGIN");
    ck_assert(tpg_record_one(conn, ob, 2, &seed));
    lock = tpg_connect(conninfo);
    ck_assert_int_eq(PQsendQuery(lock, "BEGIN; LOCK TABLE "
                                       "deliveryevents.outbox IN ACCESS "
                                       "EXCLUSIVE MODE"),
                     1);
    ck_assert(tu_wait_for(
        tpg_int(conn, "SELECT count(*) FROM pg_catalog.pg_locks WHERE "
                      "database = (SELECT oid FROM pg_catalog.pg_database "
                      "WHERE datname = pg_catalog.current_database()) AND "
                      "relation = 'deliveryevents.outbox'::regclass AND "
                      "mode = 'AccessExclusiveLock' AND NOT granted") == 1,
        30000));
    tpg_exec(conn, "COMMIT");
    /* The relay's read of it (the batch read), then the standby's
     * cursor check (the read of one position), wait for the lock. */
    a_waits = tu_wait_for(relay_lock_waits("ORDER BY o.position") == 1, 30000);
    taken = a_waits && tu_wait_for(lease_epoch() == epoch + 1, 30000);
    b_waits =
        taken && tu_wait_for(relay_lock_waits("o.position = $1") == 1, 30000);
    while ((res = PQgetResult(lock)) != NULL)
        PQclear(res);
    PQfinish(lock); /* the lock goes with its transaction */
    ck_assert_msg(a_waits, "the relay's read did not wait for the lock");
    ck_assert_msg(taken, "the standby did not take the lease");
    ck_assert_msg(b_waits, "the standby did not wait for the lock");

    tu_ok(de_relay_flush(b, 30000));
    ck_assert(
        tu_wait_for((tu_ok(de_relay_stats_get(a, &st)), !st.active), 30000));
    tu_ok(de_relay_stop(b, 10000));
    tu_ok(de_relay_stop(a, 10000));
    tu_check k = tpg_check(conn, c);
    tu_assert_check(&k);
    ck_assert_int_eq(k.unique, 2);
    ck_assert_int_eq(k.duplicates, 0);
    tu_cluster_destroy(c);
}
END_TEST

/* The relay's seam on this database: its source and its state, the
 * lease taken for "me" (lease_ms) unless lease_ms is 0. */
static void open_seam(de__source **src, de__rstate **st, int64_t lease_ms)
{
    char outbox_id[37], holder[300];
    int64_t cursor;
    bool held = false;

    tu_ok(de__source_open_pg(conninfo, false, src, outbox_id));
    tu_ok(de__rstate_open_pg(conninfo, outbox_id, 0, st, &cursor));
    if (lease_ms > 0) {
        tu_ok(de__rstate_lease_acquire(*st, "me", 0, lease_ms, &held, holder,
                                       sizeof holder));
        ck_assert(held);
    }
}

/* A state connection lost inside a checkpoint: nothing of the
 * checkpoint is written -- not even by a later statement on a new
 * connection, where the lease would not be checked -- and the commit
 * fails; the next checkpoint reconnects. */
START_TEST(connection_lost_inside_a_checkpoint_writes_nothing)
{
    de__source *src = NULL;
    de__rstate *st = NULL;
    bool held = false, has = true;

    open_seam(&src, &st, 1500);
    tu_ok(de__rstate_begin(st, "me", 0, &held));
    ck_assert(held);
    tu_ok(de__rstate_put_cursor(st, 3, "e3"));
    /* pg_terminate_backend with a timeout: gone when it returns. */
    ck_assert_int_eq(terminate_relays_now(), 2);
    /* The writes are pipelined: each may fail now, or only the commit
     * (relay_state_pg.c, queue()); never may one run elsewhere. */
    (void)de__rstate_put_mark(st, "t", 0, 10);
    (void)de__rstate_put_mark(st, "t", 1, 10);
    ck_assert_int_ne(de__rstate_commit(st), DE_OK);
    ck_assert_int_eq(tpg_published_cursor(conn), 0);
    ck_assert_int_eq(
        tpg_int(conn, "SELECT count(*) FROM deliveryevents.relay_marks"), 0);
    /* The next checkpoint: on a new connection, and it counts. */
    tu_ok(de__rstate_begin(st, "me", 0, &held));
    ck_assert(held);
    tu_ok(de__rstate_put_mark(st, "t", 1, 10));
    tu_ok(de__rstate_commit(st));
    tu_ok(de__rstate_has_marks(st, "t", &has));
    ck_assert(has);
    de__rstate_close(st);
    src->ops->close(src);
}
END_TEST

/*
 * A checkpoint's counters are written together (a statement per
 * thousand): 2,500 subjects, one of them written twice with the later
 * value winning, odd ids among them, a rolled-back checkpoint that writes
 * nothing, and each counter read back as written, one by one and in one
 * query.
 */
START_TEST(checkpoint_counters_written_together)
{
    static const char *const odd[] = {"a\"b", "c\\d", "{e,f}", "NULL"};
    char id[32];
    const char *types[3] = {"delivery", "delivery", "delivery"};
    const char *ids[3];
    de__counter c, got[3];
    de__source *src = NULL;
    de__rstate *st = NULL;
    bool held = false;

    open_seam(&src, &st, 60000);
    /* Rolled back: nothing of it is written. */
    tu_ok(de__rstate_begin(st, "me", 0, &held));
    c = (de__counter){1, 99, 99};
    tu_ok(de__rstate_put_seq(st, "delivery", "R-1", &c));
    de__rstate_rollback(st);
    tu_ok(de__rstate_begin(st, "me", 0, &held));
    ck_assert(held);
    for (int i = 1; i <= 2500; i++) {
        snprintf(id, sizeof id, "S-%d", i);
        c = (de__counter){1, i, 1000 + i};
        tu_ok(de__rstate_put_seq(st, "delivery", id, &c));
        if (i == 1500) { /* S-7 again, in another batch than its first */
            c = (de__counter){2, 7000, 7};
            tu_ok(de__rstate_put_seq(st, "delivery", "S-7", &c));
        }
        if (i == 2000) { /* S-2000 twice in one batch: the later wins */
            c = (de__counter){3, 2001, 2};
            tu_ok(de__rstate_put_seq(st, "delivery", id, &c));
        }
    }
    for (int i = 0; i < 4; i++) {
        c = (de__counter){1, 10 + i, 0};
        tu_ok(de__rstate_put_seq(st, "delivery", odd[i], &c));
    }
    tu_ok(de__rstate_commit(st));
    ck_assert_int_eq(
        tpg_int(conn, "SELECT count(*) FROM deliveryevents.relay_subjects"),
        2504);
    tu_ok(de__rstate_get_seq(st, "delivery", "R-1", &c));
    ck_assert_int_eq(c.seq, 0);
    tu_ok(de__rstate_get_seq(st, "delivery", "S-2500", &c));
    ck_assert(c.epoch == 1 && c.seq == 2500 && c.last_ms == 3500);
    ids[0] = "S-7";
    ids[1] = "S-2000";
    ids[2] = odd[1];
    tu_ok(de__rstate_get_seqs(st, 3, types, ids, got));
    ck_assert(got[0].epoch == 2 && got[0].seq == 7000 && got[0].last_ms == 7);
    ck_assert(got[1].epoch == 3 && got[1].seq == 2001 && got[1].last_ms == 2);
    ck_assert(got[2].epoch == 1 && got[2].seq == 11);
    for (int i = 0; i < 4; i++) {
        tu_ok(de__rstate_get_seq(st, "delivery", odd[i], &c));
        ck_assert_int_eq(c.seq, 10 + i);
    }
    de__rstate_close(st);
    src->ops->close(src);
}
END_TEST

/* What the relay found on Kafka when it took the lease outlives a lost
 * connection: events already there keep their numbers rather than being
 * numbered again after a reconnect. */
START_TEST(found_on_kafka_outlives_a_lost_connection)
{
    char topic[64];
    de__source *src = NULL;
    de__rstate *st = NULL;
    int64_t epoch = 0, seq = 0, offset = 0, landed, subjects;
    int32_t partition = -1;
    bool found = false;

    open_seam(&src, &st, 0);
    tu_ok(de__rstate_found_clear(st));
    tu_ok(de__rstate_batch_begin(st));
    tu_ok(
        de__rstate_found_add(st, "ev-1", "delivery", "D-1", 7, 3, "t", 2, 41));
    tu_ok(de__rstate_batch_commit(st));
    ck_assert_int_eq(terminate_relays_now(), 2);
    /* The first statement finds the connection gone; the next reconnects. */
    (void)de__rstate_found_count(st, &landed, &subjects);
    tu_ok(de__rstate_landed_get(st, "ev-1", &found, &epoch, &seq, topic,
                                sizeof topic, &partition, &offset));
    ck_assert(found);
    ck_assert_int_eq(epoch, 7);
    ck_assert_int_eq(seq, 3);
    ck_assert_str_eq(topic, "t");
    ck_assert_int_eq(partition, 2);
    ck_assert_int_eq(offset, 41);
    tu_ok(de__rstate_found_count(st, &landed, &subjects));
    ck_assert_int_eq(landed, 1);
    ck_assert_int_eq(subjects, 1);
    de__rstate_close(st);
    src->ops->close(src);
}
END_TEST

/* The relay's state connection dies while it is idle, and the next
 * commit's read fails on it: the relay reads again (rather than wait for
 * a commit that may never come) and publishes. */
START_TEST(failed_read_is_retried)
{
    tu_cluster *c = tu_cluster_new(_i, 1);
    de_conf *conf;
    de_relay *r = NULL;

    tu_topic_create(c, "delivery", 1);
    /* No heartbeat or cleanup round soon: the read after the kill is the
     * first to use the dead connection. */
    conf = tu_relay_conf(c, "relay.poll.interval.ms", "10",
                         "relay.lease.timeout.ms", "60000",
                         "relay.cleanup.interval.ms", "86400000", NULL);
    tu_ok(de_relay_start(ob, conf, &r));
    de_conf_destroy(conf);
    tpg_commit_one(conn, ob, 1);
    tu_ok(de_relay_flush(r, 60000));
    ck_assert(tu_wait_for(cursor_at_end(), 60000));
    /* The state connection only: the relay opens it after the source's. */
    ck_assert_int_eq(
        tpg_int(conn, "SELECT count(*) FILTER (WHERE "
                      "pg_catalog.pg_terminate_backend(pid, 10000)) FROM "
                      "(SELECT pid FROM pg_catalog.pg_stat_activity WHERE "
                      "application_name = 'deliveryevents-relay' AND datname "
                      "= pg_catalog.current_database() ORDER BY backend_start "
                      "DESC LIMIT 1) AS last"),
        1);
    /* One commit (one wake-up) for a new subject: its counter is read
     * from the dead connection.  No de_relay_flush before it is
     * published: that would wake the relay, which must retry on its
     * own. */
    tpg_commit_one(conn, ob, 2);
    ck_assert(tu_wait_for(cursor_at_end(), 60000));
    tu_ok(de_relay_flush(r, 60000));
    tu_ok(de_relay_stop(r, 10000));
    tu_check k = tpg_check(conn, c);
    tu_assert_check(&k);
    tu_cluster_destroy(c);
}
END_TEST

/* ---- the relay loop itself: barrier back-off, warnings, wake-up --------- */

/* Warnings of the relay under test, counted by what they name. */
static atomic_int stall_warnings, prepared_warnings;

static void counting_log(void *ctx, int level, const char *message)
{
    if (level == DE_LOG_WARNING && strstr(message, "commit-order lock is held"))
        atomic_fetch_add(&stall_warnings, 1);
    if (level == DE_LOG_WARNING &&
        strstr(message, "allows prepared transactions"))
        atomic_fetch_add(&prepared_warnings, 1);
    tu_log(ctx, level, message);
}

/*
 * A transaction holds the commit-order lock (it recorded and ran SET
 * CONSTRAINTS ALL IMMEDIATE) and stays open: every barrier attempt
 * times out.  The relay warns, naming the situation, and backs off: over
 * a 3 s window once the back-off has doubled twice it makes at most 4
 * attempts (at one per poll interval it made ~9 a second: 10 ms poll +
 * 100 ms lock wait).  The server allows prepared transactions: the relay
 * warned about that once, at its start, and not again.  When the
 * transaction ends, everything is published.
 */
START_TEST(barrier_backs_off_and_warns_while_the_lock_is_held)
{
    tu_cluster *c = tu_cluster_new(_i, 1);
    PGconn *holder = tpg_connect(conninfo);
    de_outbox *hob = NULL;
    de_conf *conf;
    de_relay *r = NULL;
    unsigned seed = 7;
    unsigned long before;

    if (tpg_int(conn, "SELECT pg_catalog.current_setting("
                      "'max_prepared_transactions')::int") == 0) {
        fprintf(stderr, "SKIPPED: the server does not allow prepared "
                        "transactions (max_prepared_transactions = 0)\n");
        PQfinish(holder);
        tu_cluster_destroy(c);
        return;
    }
    tu_topic_create(c, "delivery", 1);
    conf = tu_relay_conf(c, "relay.poll.interval.ms", "10", NULL);
    de_conf_set_log_cb(conf, counting_log, NULL);
    tu_ok(de_relay_start(ob, conf, &r));
    de_conf_destroy(conf);
    tpg_commit_one(conn, ob, 1);
    tu_ok(de_relay_flush(r, 60000));
    ck_assert_int_eq(atomic_load(&prepared_warnings), 1);
    ck_assert_int_eq(atomic_load(&stall_warnings), 0);
    /* The holder: a recorded event whose position is drawn now. */
    tu_ok(de_outbox_open_pg(holder, NULL, &hob));
    tpg_exec(holder, "BEGIN");
    ck_assert(tpg_record_one(holder, hob, 2, &seed));
    tpg_exec(holder, "SET CONSTRAINTS ALL IMMEDIATE");
    tpg_commit_one(conn, ob,
                   3); /* behind it: not publishable while it is open */
    /* The 4th timeout in a row warns again: the wait is 800 ms now. */
    ck_assert(tu_wait_for(atomic_load(&stall_warnings) >= 2, 60000));
    before = de__source_pg_barrier_attempts();
    usleep(3000000); /* the window measured, not a synchronisation */
    ck_assert_uint_le(de__source_pg_barrier_attempts() - before, 4);
    ck_assert_uint_eq(tu_relay_published(r), 1);
    /* Ended: the next attempt (within the 5 s cap) publishes both. */
    tpg_exec(holder, "COMMIT");
    ck_assert(tu_wait_for(tu_relay_published(r) == 3, 60000));
    tu_ok(de_relay_flush(r, 60000));
    tu_ok(de_relay_stop(r, 10000));
    ck_assert_int_eq(atomic_load(&prepared_warnings), 1);
    de_outbox_close(hob);
    PQfinish(holder);
    tu_check k = tpg_check(conn, c);
    tu_assert_check(&k);
    tu_cluster_destroy(c);
}
END_TEST

/* A relay on ob publishing to "delivery" (1 partition) of c with nothing
 * due for minutes but its poll every poll_ms -- no heartbeat (every
 * lease timeout / 5), no cleanup round -- that has published event 1 and
 * sleeps: its flag up, its checkpoint (the last timer due) written. */
static de_relay *asleep_relay(tu_cluster *c, const char *poll_ms)
{
    de_conf *conf = tu_relay_conf(
        c, "relay.poll.interval.ms", poll_ms, "relay.lease.timeout.ms",
        "600000", "relay.cleanup.interval.ms", "86400000", NULL);
    de_relay *r = NULL;

    tu_topic_create(c, "delivery", 1);
    tu_ok(de_relay_start(ob, conf, &r));
    de_conf_destroy(conf);
    tpg_commit_one(conn, ob, 1);
    tu_ok(de_relay_flush(r, 60000));
    ck_assert(tu_wait_for(tpg_int(conn, "SELECT last_value FROM "
                                        "deliveryevents.relay_sleeping") == 1 &&
                              cursor_at_end(),
                          60000));
    return r;
}

/* The relay asleep (its flag up, relay.poll.interval.ms 60 s): a commit
 * in another process wakes it by NOTIFY, and the event is on Kafka long
 * before the poll interval could have brought it. */
START_TEST(sleeping_relay_is_woken_by_a_commit_elsewhere)
{
    tu_cluster *c;
    de_relay *r = NULL;
    int64_t t0;
    pid_t pid;
    int status, go[2];

    /* The committing process is forked now, before this process has
     * threads (the mock's, the relay's): a fork of a threaded process
     * may inherit a lock one of them held (the allocator's) and hang.  It
     * commits when told through the pipe (or exits when this process
     * dies and the pipe closes). */
    ck_assert_int_eq(pipe(go), 0);
    pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0) { /* one commit on a connection of its own */
        PGconn *w;
        de_outbox *o = NULL;
        unsigned wseed = 11;
        char b;
        bool ok;

        close(go[1]);
        if (read(go[0], &b, 1) != 1)
            _exit(2);
        w = PQconnectdb(conninfo);
        ok = PQstatus(w) == CONNECTION_OK &&
             de_outbox_open_pg(w, NULL, &o) == DE_OK && tpg_cmd(w, "BEGIN") &&
             tpg_record_one(w, o, 2, &wseed) && tpg_cmd(w, "COMMIT");
        de_outbox_close(o);
        PQfinish(w);
        _exit(ok ? 0 : 1);
    }
    close(go[0]);
    c = tu_cluster_new(_i, 1);
    /* Nothing else due for a minute: no poll either. */
    r = asleep_relay(c, "60000");
    t0 = tu_now_ms();
    ck_assert_int_eq(write(go[1], "c", 1), 1);
    close(go[1]);
    ck_assert_int_eq(waitpid(pid, &status, 0), pid);
    ck_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    /* No de_relay_flush here: it would wake the relay itself. */
    ck_assert(tu_wait_for(tu_relay_published(r) == 2, 10000));
    ck_assert_int_lt(tu_now_ms() - t0, 10000);
    tu_ok(de_relay_stop(r, 10000));
    tu_check k = tpg_check(conn, c);
    tu_assert_check(&k);
    tu_cluster_destroy(c);
}
END_TEST

/* The server's clock, in ms since the epoch. */
static long long server_ms(void)
{
    return tpg_int(conn, "SELECT (extract(epoch FROM "
                         "pg_catalog.clock_timestamp()) * 1000)::bigint");
}

/* How far the server has flushed its WAL, into lsn; false when the
 * WAL cannot be read back here (an external server, pg_walinspect
 * missing, a role without the privilege). */
static bool wal_flushed(char *lsn, size_t size)
{
    PGresult *r;
    bool ok;

    /* Only on the suite's own server: on a shared one, other sessions'
     * records would be counted too. */
    if (tpg_external())
        return false;
    PQclear(PQexec(conn, "SET client_min_messages = warning; CREATE "
                         "EXTENSION IF NOT EXISTS pg_walinspect; RESET "
                         "client_min_messages"));
    r = PQexec(conn, "SELECT pg_catalog.pg_current_wal_flush_lsn()::text, "
                     "has_function_privilege('pg_get_wal_records_info("
                     "pg_lsn, pg_lsn)', 'execute')");
    ok = PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) == 1 &&
         strcmp(PQgetvalue(r, 0, 1), "t") == 0;
    if (ok)
        snprintf(lsn, size, "%s", PQgetvalue(r, 0, 0));
    PQclear(r);
    return ok;
}

/* The WAL records written between the flush positions from and to that
 * are the relay's: those touching a relation of schema deliveryevents
 * (its tables, its sleeping flag) and logical messages (its flush
 * transaction).  Others -- autovacuum's ANALYZE, say -- are not.  Their
 * kinds go into what. */
static long long relay_wal_records(const char *from, const char *to, char *what,
                                   size_t size)
{
    char sql[1000];
    PGresult *r;
    long long n;

    what[0] = '\0';
    if (strcmp(from, to) == 0)
        return 0;
    snprintf(sql, sizeof sql,
             "SELECT count(*), coalesce(string_agg(DISTINCT "
             "w.resource_manager || ' ' || w.record_type || ' ' || "
             "coalesce(w.block_ref, ''), '; '), '') FROM "
             "pg_get_wal_records_info('%s', '%s') w WHERE "
             "w.resource_manager = 'LogicalMessage' OR EXISTS (SELECT 1 FROM "
             "pg_catalog.pg_class c, pg_catalog.pg_database d WHERE "
             "d.datname = pg_catalog.current_database() AND c.relnamespace = "
             "'deliveryevents'::regnamespace AND c.relfilenode <> 0 AND "
             "w.block_ref LIKE '%%/' || d.oid || '/' || c.relfilenode || "
             "' fork%%')",
             from, to);
    r = PQexec(conn, sql);
    ck_assert_msg(PQresultStatus(r) == PGRES_TUPLES_OK, "%s",
                  PQresultErrorMessage(r));
    n = strtoll(PQgetvalue(r, 0, 0), NULL, 10);
    snprintf(what, size, "%s", PQgetvalue(r, 0, 1));
    PQclear(r);
    return n;
}

/*
 * An idle relay writes next to nothing (WAL records of its own, read
 * back with pg_walinspect: at most 4 in two seconds, what settling
 * after its last work may write once -- a mark refresh, one more
 * lowering and raising of its flag; it was about 180).  Asleep (its
 * flag up), it still reads
 * every poll interval -- the fallback for a wake-up that cannot come, a
 * LISTEN connection dropped without a word -- but leaves the flag up:
 * lowering and raising it at each of those reads (as it did) were two
 * transactions with a synchronous commit per interval, about 40 a
 * second at the default 50 ms, on a database with nothing to publish.
 * On an external server without pg_walinspect (or the privilege) that
 * part says SKIPPED.
 * Then the fallback itself: the flag lowered behind the relay's back, a
 * commit sends no NOTIFY, and the next poll publishes it.
 */
START_TEST(idle_relay_writes_nothing_and_still_polls)
{
    tu_cluster *c = tu_cluster_new(_i, 1);
    de_relay *r = NULL;
    long long t0, written = 0;
    char later[400], from[40], to[40], what[600];
    bool polled, inspect;

    /* No heartbeat or cleanup round in the window: those write, on
     * purpose. */
    r = asleep_relay(c, "20");
    inspect = wal_flushed(from, sizeof from);
    t0 = server_ms();
    /* The window: until the relay ran a statement two seconds later (it
     * polls every 20 ms, about a hundred reads). */
    snprintf(later, sizeof later,
             "SELECT count(*) FROM pg_catalog.pg_stat_activity WHERE "
             "application_name = 'deliveryevents-relay' AND datname = "
             "pg_catalog.current_database() AND extract(epoch FROM "
             "query_start) * 1000 > %lld",
             t0 + 2000);
    polled = tu_wait_for(tpg_int(conn, later) > 0, 30000);
    if (inspect && wal_flushed(to, sizeof to))
        written = relay_wal_records(from, to, what, sizeof what);
    else
        fprintf(stderr, "SKIPPED: the WAL cannot be read back here "
                        "(pg_walinspect)\n");
    ck_assert_msg(polled, "the relay did not read within 30 s");
    ck_assert_msg(written <= 4,
                  "an idle relay wrote %lld WAL records in two seconds: %s",
                  written, what);
    ck_assert_int_eq(tpg_int(conn, "SELECT last_value FROM "
                                   "deliveryevents.relay_sleeping"),
                     1);

    tpg_exec(conn, "SELECT pg_catalog.setval('deliveryevents.relay_sleeping', "
                   "0)");
    tpg_commit_one(conn, ob, 2);
    ck_assert(tu_wait_for(tu_relay_published(r) == 2, 30000));
    tu_ok(de_relay_stop(r, 10000));
    tu_check k = tpg_check(conn, c);
    tu_assert_check(&k);
    ck_assert_int_eq(k.duplicates, 0);
    tu_cluster_destroy(c);
}
END_TEST

/* The brokers go down while events are committed, and come back: nothing
 * is lost. */
START_TEST(broker_outage_loses_nothing)
{
    pid_t pids[3];
    tu_cluster *c = tu_cluster_new(_i, 3);
    de_conf *conf;
    de_relay *r = NULL;
    de_relay_stats st;

    TU_MOCK_ONLY(c);
    tu_topic_create(c, "delivery", 3);
    conf = tu_relay_conf(c, "relay.poll.interval.ms", "10", NULL);
    tu_ok(de_relay_start(ob, conf, &r));
    de_conf_destroy(conf);
    ck_assert(tu_wait_for((de_relay_stats_get(r, &st), st.active), 30000));
    for (int b = 1; b <= 3; b++)
        rd_kafka_mock_broker_set_down(c->mock, b);
    tpg_fork_writers(conninfo, 3, 30, 1000, false, pids);
    tpg_wait_writers(3, pids);
    for (int b = 1; b <= 3; b++)
        rd_kafka_mock_broker_set_up(c->mock, b);
    tu_ok(de_relay_flush(r, 120000));
    tu_ok(de_relay_stop(r, 10000));
    tu_check k = tpg_check(conn, c);
    tu_assert_check_mock_reorder(&k);
    tu_cluster_destroy(c);
}
END_TEST

/* The relay's connections are terminated by the server mid-stream: it
 * reconnects and loses nothing. */
START_TEST(connection_loss_loses_nothing)
{
    pid_t pids[3];
    tu_cluster *c = tu_cluster_new(_i, 3);
    de_conf *conf;
    de_relay *r = NULL;

    tu_topic_create(c, "delivery", 3);
    conf = tu_relay_conf(c, "relay.poll.interval.ms", "10", NULL);
    tu_ok(de_relay_start(ob, conf, &r));
    de_conf_destroy(conf);
    tpg_fork_writers(conninfo, 3, 40, 2000, false, pids);
    for (int round = 0; round < 3; round++) {
        long long seen = tpg_published_cursor(conn);
        /* Something new to publish, whether or not the writers are
         * still at it. */
        ck_assert_int_ge(
            tpg_write_txns(conninfo, (unsigned)round, 5, 0, false, NULL), 0);
        ck_assert(tu_wait_for(tpg_published_cursor(conn) > seen, 60000));
        /* Both of its connections (back), then both terminated. */
        ck_assert(tu_wait_for(relay_backends(false) == 2, 60000));
        ck_assert_int_eq(relay_backends(true), 2);
    }
    tpg_wait_writers(3, pids);
    tu_ok(de_relay_flush(r, 120000));
    tu_ok(de_relay_stop(r, 10000));
    tu_check k = tpg_check(conn, c);
    tu_assert_check(&k);
    tu_cluster_destroy(c);
}
END_TEST

/*
 * Subject ids that need quoting in a text array literal: after a
 * restart the relay loads the counters of a batch's subjects in one
 * query (arrays of their types and ids), and each subject's numbering
 * continues (2 after 1) rather than starting again.
 */
START_TEST(odd_subject_ids_keep_their_numbering_across_a_restart)
{
    static const char *const ids[] = {"a\"b", "c\\d", "e,f",      "{g}",  "h i",
                                      "NULL", "\"\"", "\u00fc-1", "j\\\""};
    const int n = (int)(sizeof ids / sizeof ids[0]);
    tu_cluster *c = tu_cluster_new(_i, 1);
    unsigned seed = 5;

    tu_topic_create(c, "delivery", 2);
    for (int i = 0; i < n; i++) {
        const char *v[1] = {ids[i]};
        PQclear(PQexecParams(conn, "INSERT INTO deliveries VALUES ($1, 0)", 1,
                             NULL, v, NULL, NULL, 0));
    }
    for (int round = 0; round < 3; round++) {
        de_conf *conf = tu_relay_conf(c, NULL);
        de_relay *r = NULL;
        for (int i = 0; i < n; i++) {
            tpg_exec(conn, "BEGIN");
            ck_assert_msg(tpg_record_subject(conn, ob, ids[i], &seed), "%s",
                          ids[i]);
            tpg_exec(conn, "COMMIT");
        }
        tu_ok(de_relay_start(ob, conf, &r));
        de_conf_destroy(conf);
        tu_ok(de_relay_flush(r, 60000));
        tu_ok(de_relay_stop(r, 10000));
    }
    tu_check k = tpg_check(conn, c);
    tu_assert_check(&k);
    ck_assert_int_eq(k.expected, 3 * n);
    tu_cluster_destroy(c);
}
END_TEST

/* Rows a source read handed on (their positions), taking at most
 * take_max of them. */
static int64_t got[64];
static int ngot, take_max;

static de_err take_row(void *ctx, const de__row *row)
{
    (void)ctx;
    if (ngot >= take_max)
        return DE__AGAIN;
    got[ngot++] = row->position;
    return DE_OK;
}

/* A read of the rows after `after`, at most limit, of which the caller
 * takes `take`: exactly positions first, first + 1, ..., count of them. */
static void read_expect(de__source *src, int64_t after, int64_t limit, int take,
                        int64_t first, int64_t count)
{
    int64_t n = -1;

    ngot = 0;
    take_max = take;
    tu_ok(src->ops->read(src, after, limit, take_row, NULL, &n));
    ck_assert_int_eq(n, count);
    ck_assert_int_eq(ngot, count);
    for (int i = 0; i < ngot; i++)
        ck_assert_int_eq(got[i], first + i);
}

/*
 * The source reads the next batch ahead after a full one, before its
 * rows are handed on; whatever the next read asks for -- the rows after
 * another position (the caller took fewer), fewer rows, more rows -- it
 * gets exactly those, and a query of another kind meanwhile answers as
 * without it (and drops it: a read-ahead is never older than the read
 * before).
 */
START_TEST(source_read_ahead_answers_only_what_is_asked)
{
    unsigned long used0, dropped0, used, dropped;
    char outbox_id[37];
    de__source *src = NULL;
    int64_t max = 0;

    for (int i = 1; i <= 30; i++)
        tpg_commit_one(conn, ob, i);
    ck_assert_int_eq(tpg_max_position(conn), 30);
    tu_ok(de__source_open_pg(conninfo, false, &src, outbox_id));
    de__source_pg_read_aheads(&used0, &dropped0);
    read_expect(src, 0, 5, 5, 1, 5);          /* full: reads 6..10 ahead */
    read_expect(src, 2, 5, 5, 3, 5);          /* other rows: dropped */
    read_expect(src, 7, 3, 3, 8, 3);          /* fewer rows: used (1) */
    read_expect(src, 10, 5, 2, 11, 2);        /* full, 2 taken: reads ahead */
    tu_ok(src->ops->max_position(src, &max)); /* another query: dropped */
    ck_assert_int_eq(max, 30);
    read_expect(src, 12, 5, 5, 13, 5); /* reads 18..22 ahead */
    /* More rows: the read-ahead (2), then its own read-ahead (3). */
    read_expect(src, 17, 10, 10, 18, 10);
    ck_assert(src->ops->changed(src));   /* a read-ahead waits */
    read_expect(src, 27, 10, 10, 28, 3); /* used (4): the end */
    read_expect(src, 30, 10, 10, 0, 0);
    de__source_pg_read_aheads(&used, &dropped);
    ck_assert_uint_eq(used - used0, 4);
    ck_assert_uint_eq(dropped - dropped0, 2);
    src->ops->close(src);
}
END_TEST

static long long flag(void)
{
    return tpg_int(conn, "SELECT last_value FROM "
                         "deliveryevents.relay_sleeping");
}

/*
 * The sleeping flag kept by a relay's source, and by no other reader:
 *  - left up by a relay killed (or demoted) while it slept, the next
 *    relay, busy, lowers it -- else every recording commit would notify,
 *    serialising them, until that relay itself slept and woke, which a
 *    busy relay may not do for long.  Its first read that finds rows
 *    takes the flag as its own; the read after lowers it.  Another
 *    reader (a replay) leaves it as it is: lowering it would leave a
 *    sleeping relay deaf to commits until its next poll;
 *  - lowered behind the back of a relay asleep, its next read (the
 *    poll's) raises it again.
 */
START_TEST(flag_left_up_is_lowered_by_a_busy_relay)
{
    char outbox_id[37];
    de__source *src = NULL, *other = NULL;

    for (int i = 1; i <= 4; i++)
        tpg_commit_one(conn, ob, i);
    tpg_exec(conn,
             "SELECT pg_catalog.setval('deliveryevents.relay_sleeping', 1)");
    tu_ok(de__source_open_pg(conninfo, false, &other, outbox_id));
    read_expect(other, 0, 1, 1, 1, 1);
    read_expect(other, 1, 1, 1, 2, 1);
    other->ops->close(other);
    ck_assert_int_eq(flag(), 1);

    tu_ok(de__source_open_pg(conninfo, false, &src, outbox_id));
    de__source_pg_relay(src);
    read_expect(src, 0, 1, 1, 1, 1);
    read_expect(src, 1, 1, 1, 2, 1);
    ck_assert_int_eq(flag(), 0);
    read_expect(src, 2, 10, 10, 3, 2);
    ck_assert_int_eq(flag(), 0);

    ck_assert(src->ops->sleep_begin(src));
    ck_assert_int_eq(flag(), 1);
    read_expect(src, 4, 10, 10, 0, 0);
    tpg_exec(conn,
             "SELECT pg_catalog.setval('deliveryevents.relay_sleeping', 0)");
    read_expect(src, 4, 10, 10, 0, 0);
    ck_assert_int_eq(flag(), 1);
    src->ops->close(src); /* its own: lowered */
    ck_assert_int_eq(flag(), 0);
}
END_TEST

/*
 * A database configured the way that makes parallel plans most likely --
 * generic plans forced (some pooler set-ups do), parallelism free -- as a
 * DBA would set it, for every session: the relay's read of the outbox is
 * still planned without parallel workers.  A parallel read (a Gather
 * Merge over two workers) costs 60-70 ms a batch instead of 1-6 ms.
 */
START_TEST(outbox_read_never_plans_parallel_workers)
{
    char outbox_id[37];
    de__source *src = NULL;
    PGresult *r;
    int64_t max = 0;
    char plan[4096] = "";

    for (int i = 0; i < 200; i++)
        tpg_commit_one(conn, ob, 1 + i % 10);
    tpg_exec(conn,
             "ANALYZE deliveryevents.outbox, deliveryevents.outbox_order");
    tpg_exec(conn,
             "DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET "
             "plan_cache_mode = force_generic_plan', current_database()); "
             "EXECUTE format('ALTER DATABASE %I SET parallel_setup_cost = 0', "
             "current_database()); EXECUTE format('ALTER DATABASE %I SET "
             "parallel_tuple_cost = 0', current_database()); EXECUTE "
             "format('ALTER DATABASE %I SET min_parallel_index_scan_size = "
             "0', current_database()); EXECUTE format('ALTER DATABASE %I SET "
             "min_parallel_table_scan_size = 0', current_database()); END $$");
    tu_ok(de__source_open_pg(conninfo, false, &src, outbox_id));
    tu_ok(src->ops->max_position(src, &max)); /* set up, as a relay's */
    ck_assert_int_eq(max, 200);
    /* The read the relay prepares (Q_READ), as the server plans it. */
    r = PQexec(de__source_pg_conn(src),
               "EXPLAIN EXECUTE deliveryevents_src_3('0', '1000')");
    ck_assert_int_eq(PQresultStatus(r), PGRES_TUPLES_OK);
    for (int i = 0; i < PQntuples(r); i++) {
        strncat(plan, PQgetvalue(r, i, 0), sizeof plan - strlen(plan) - 2);
        strcat(plan, "\n");
    }
    PQclear(r);
    ck_assert_msg(strstr(plan, "outbox_order") != NULL, "not the read: %s",
                  plan);
    ck_assert_msg(strstr(plan, "Gather") == NULL &&
                      strstr(plan, "Parallel") == NULL,
                  "the outbox read plans parallel workers:\n%s", plan);
    src->ops->close(src);
}
END_TEST

/*
 * Read-ahead: batches of 7 with at most 16 events in flight, so that
 * most reads come back full and send the next read before their rows
 * are produced, and the room left in the relay often asks for fewer or
 * more rows than were read ahead (used in part, or dropped).  Writer
 * processes commit meanwhile, and the relay's connections are
 * terminated mid-stream, a read-ahead possibly on its way.  Kafka holds
 * exactly what committed, each subject in commit order, without a gap.
 */
START_TEST(read_ahead_keeps_order_and_loses_nothing)
{
    pid_t pids[4];
    tu_cluster *c = tu_cluster_new(_i, 3);
    unsigned long used0, dropped0, used, dropped;
    de_conf *conf;
    de_relay *r = NULL;

    tu_topic_create(c, "delivery", 3);
    /* A backlog first: the first reads are full. */
    ck_assert_int_gt(tpg_write_txns(conninfo, 11, 200, 0, false, NULL), 0);
    de__source_pg_read_aheads(&used0, &dropped0);
    conf = tu_relay_conf(c, "relay.batch.size", "7", "relay.max.inflight", "16",
                         "relay.poll.interval.ms", "10", NULL);
    tu_ok(de_relay_start(ob, conf, &r));
    de_conf_destroy(conf);
    tpg_fork_writers(conninfo, 4, 60, 2000, false, pids);
    for (int round = 0; round < 3; round++) {
        long long seen = tpg_published_cursor(conn);
        ck_assert_int_ge(tpg_write_txns(conninfo, 100u + (unsigned)round, 40, 0,
                                        false, NULL),
                         0);
        ck_assert(tu_wait_for(tpg_published_cursor(conn) > seen, 60000));
        ck_assert(tu_wait_for(relay_backends(false) == 2, 60000));
        ck_assert_int_eq(relay_backends(true), 2);
    }
    tpg_wait_writers(4, pids);
    tu_ok(de_relay_flush(r, 120000));
    tu_ok(de_relay_stop(r, 10000));
    de__source_pg_read_aheads(&used, &dropped);
    fprintf(stderr, "read_ahead: %lu read-aheads used, %lu dropped\n",
            used - used0, dropped - dropped0);
    /* The path under test was taken. */
    ck_assert_uint_gt(used - used0, 10);
    tu_check k = tpg_check(conn, c);
    tu_assert_check(&k);
    tu_cluster_destroy(c);
}
END_TEST

/* Everything was published, but the final checkpoint cannot be written
 * (a trigger refuses the relay's lease renewal, as a server could refuse
 * any state write): de_relay_stop says so with DE_ERR_DB -- not
 * DE_ERR_TIMEOUT with nothing pending -- and the next relay finds the
 * events on Kafka instead of sending them again. */
START_TEST(stop_says_when_only_the_final_checkpoint_failed)
{
    tu_cluster *c = tu_cluster_new(0, 1);
    /* No checkpoint or lease beat of its own once the trigger is there. */
    de_conf *conf =
        tu_relay_conf(c, "relay.lease.timeout.ms", "60000",
                      "relay.checkpoint.interval.ms", "60000", NULL);
    de_relay *r = NULL;
    de_relay_stats st;
    const char *msg;

    tu_topic_create(c, "delivery", 1);
    tu_ok(de_relay_start(ob, conf, &r));
    de_conf_destroy(conf);
    tpg_commit_one(conn, ob, 1); /* registers the topic: a state write */
    tu_ok(de_relay_flush(r, 30000));
    tpg_exec(conn, "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE "
                   "plpgsql AS $$BEGIN RAISE EXCEPTION 'state write refused "
                   "by the test'; END$$");
    tpg_exec(conn, "CREATE TRIGGER refuse BEFORE UPDATE ON "
                   "deliveryevents.relay_lease FOR EACH ROW EXECUTE "
                   "FUNCTION refuse()");
    for (int i = 2; i <= 4; i++)
        tpg_commit_one(conn, ob, i);
    tu_ok(de_relay_flush(r, 30000));
    tu_ok(de_relay_stats_get(r, &st));
    ck_assert_uint_eq(st.pending, 0);
    tu_assert_err(de_relay_stop(r, 10000), DE_ERR_DB, NULL);
    msg = de_errmsg();
    ck_assert_msg(strncmp(msg, TU_STOP_CKPT_FAILED "relay state: ",
                          strlen(TU_STOP_CKPT_FAILED "relay state: ")) == 0 &&
                      strstr(msg, "state write refused by the test") != NULL &&
                      strstr(msg, TU_STOP_CKPT_FAILED_THEN) != NULL,
                  "%s", msg);
    tpg_exec(conn, "DROP TRIGGER refuse ON deliveryevents.relay_lease");
    ck_assert_int_ge(
        tpg_int(conn, "SELECT count(*) FROM deliveryevents.outbox"), 3);
    tu_relay_takes_over(c, ob, 3);
    tu_check k = tpg_check(conn, c);
    tu_assert_check(&k);
    ck_assert_int_eq(k.duplicates, 0);
    tu_cluster_destroy(c);
}
END_TEST

/*
 * A database whose default isolation is SERIALIZABLE (some services set
 * it): hosts recording in serializable transactions, two relays (one
 * killed, the other taking over) publishing and deleting beside them.
 * Every host commit succeeds -- the relays take part in no
 * serialization conflict, their connections being READ COMMITTED --
 * and Kafka holds exactly what committed, in order.  The relay's
 * backends hold no SIRead lock: a serializable transaction left open
 * throughout keeps those of every serializable transaction that
 * overlapped it, so a relay reading at the database's default would
 * show them (its outbox checks at start did, until they came after its
 * session settings).
 */
START_TEST(serializable_database)
{
    tu_cluster *c = tu_cluster_new(_i, 3);
    char sql[200];
    de_conf *conf;
    de_relay *b = NULL;
    PGconn *hc, *open_txn;
    de_outbox *hob = NULL;
    pid_t relay;
    int i;

    snprintf(sql, sizeof sql,
             "ALTER DATABASE %s SET default_transaction_isolation = "
             "'serializable'",
             PQdb(conn));
    tpg_exec(conn, sql);
    hc = tpg_connect(conninfo); /* a new session: serializable */
    ck_assert_int_eq(tpg_int(hc, "SELECT (pg_catalog.current_setting("
                                 "'transaction_isolation') = "
                                 "'serializable')::int"),
                     1);
    tu_ok(de_outbox_open_pg(hc, NULL, &hob));
    open_txn = tpg_connect(conninfo);
    tpg_exec(open_txn, "BEGIN");
    tpg_exec(open_txn, "CREATE TEMP TABLE t AS SELECT 1 AS x");
    tu_topic_create(c, "delivery", 3);
    relay = spawn_relay(c);
    ck_assert(tu_wait_for(lease_epoch() > 0, 30000));
    conf = tu_relay_conf(c, "relay.poll.interval.ms", "10",
                         "relay.lease.timeout.ms", "1500",
                         "relay.cleanup.interval.ms", "20", NULL);
    tu_ok(de_relay_start_pg(conninfo, conf, &b));
    de_conf_destroy(conf);
    for (i = 0; i < 150; i++) {
        if (i == 75) {
            ck_assert(tu_wait_for(tpg_published_cursor(conn) > 20, 60000));
            kill_relay(relay);
        }
        tpg_commit_one(hc, hob, 1 + i % 20);
    }
    ck_assert_int_eq(
        tpg_int(conn, "SELECT count(*) FROM pg_catalog.pg_locks l JOIN "
                      "pg_catalog.pg_stat_activity a ON a.pid = l.pid "
                      "WHERE l.mode = 'SIReadLock' AND a.application_name "
                      "= 'deliveryevents-relay'"),
        0);
    ck_assert_int_gt(
        tpg_int(conn, "SELECT count(*) FROM pg_catalog.pg_locks WHERE mode "
                      "= 'SIReadLock'"),
        0); /* the premise: the hosts' are kept */
    tpg_exec(open_txn, "COMMIT");
    PQfinish(open_txn);
    tpg_stop_and_check(b, conn, c);
    de_outbox_close(hob);
    PQfinish(hc);
    tu_cluster_destroy(c);
}
END_TEST

typedef struct starter {
    de_conf *conf;
    de_relay *r;
    de_err err;
    char msg[300];
} starter;

static void *start_in_background(void *arg)
{
    starter *st = arg;

    st->err = de_relay_start_pg(conninfo, st->conf, &st->r);
    snprintf(st->msg, sizeof st->msg, "%s", st->err ? de_errmsg() : "");
    return NULL;
}

/* Two relays starting together on a database whose default isolation is
 * SERIALIZABLE, before any relay made its tables: the first creates
 * them, the second waits for their lock and must then see them and
 * their rows (its snapshot taken after the wait), not fail on them.
 * The lock is held until both wait for it. */
START_TEST(relays_start_together_under_serializable)
{
    tu_cluster *c = tu_cluster_new(_i, 1);
    char sql[200];
    starter st[2];
    pthread_t th[2];
    PGconn *holder;

    snprintf(sql, sizeof sql,
             "ALTER DATABASE %s SET default_transaction_isolation = "
             "'serializable'",
             PQdb(conn));
    tpg_exec(conn, sql);
    tu_topic_create(c, "delivery", 1);
    holder = tpg_connect(conninfo);
    tpg_exec(holder, "BEGIN; SELECT pg_catalog.pg_advisory_xact_lock("
                     "1684826486, 2)");
    for (int i = 0; i < 2; i++) {
        st[i].conf = tu_relay_conf(c, "relay.poll.interval.ms", "10", NULL);
        st[i].r = NULL;
        ck_assert_int_eq(
            pthread_create(&th[i], NULL, start_in_background, &st[i]), 0);
    }
    ck_assert(tu_wait_for(
        tpg_int(holder, "SELECT count(*) FROM pg_catalog.pg_locks WHERE "
                        "locktype = 'advisory' AND NOT granted AND classid "
                        "= 1684826486 AND objid = 2 AND database = (SELECT "
                        "oid FROM pg_catalog.pg_database WHERE datname = "
                        "pg_catalog.current_database())") == 2,
        30000));
    tpg_exec(holder, "COMMIT");
    PQfinish(holder);
    for (int i = 0; i < 2; i++) {
        pthread_join(th[i], NULL);
        de_conf_destroy(st[i].conf);
        ck_assert_msg(st[i].err == DE_OK, "relay %d: %s: %s", i,
                      de_err_name(st[i].err), st[i].msg);
    }
    tpg_commit_one(conn, ob, 1);
    tu_ok(de_relay_flush(st[0].r, 60000));
    tu_ok(de_relay_flush(st[1].r, 60000));
    tu_ok(de_relay_stop(st[0].r, 10000));
    tu_ok(de_relay_stop(st[1].r, 10000));
    tu_check k = tpg_check(conn, c);
    tu_assert_check(&k);
    tu_cluster_destroy(c);
}
END_TEST

static Suite *pg_relay_suite(void)
{
    Suite *s = suite_create("pg_relay");
    TCase *tc = tcase_create("relay");

    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 300);
    tcase_add_loop_test(tc, end_to_end_many_writer_processes,
                        tu_cluster_first(), tu_cluster_count());
    tcase_add_loop_test(tc, relay_killed_next_one_continues, tu_cluster_first(),
                        tu_cluster_count());
    tcase_add_loop_test(tc, standby_takes_over_after_sigkill,
                        tu_cluster_first(), tu_cluster_count());
    tcase_add_loop_test(tc, serializable_database, tu_cluster_first(),
                        tu_cluster_count());
    tcase_add_loop_test(tc, relays_start_together_under_serializable,
                        tu_cluster_first(), tu_cluster_count());
    tcase_add_test(tc, old_relay_checkpoint_refused_after_takeover);
    tcase_add_test(tc, connection_lost_inside_a_checkpoint_writes_nothing);
    tcase_add_test(tc, found_on_kafka_outlives_a_lost_connection);
    tcase_add_loop_test(tc, failed_read_is_retried, tu_cluster_first(),
                        tu_cluster_count());
    tcase_add_loop_test(tc, barrier_backs_off_and_warns_while_the_lock_is_held,
                        tu_cluster_first(), tu_cluster_count());
    tcase_add_loop_test(tc, sleeping_relay_is_woken_by_a_commit_elsewhere,
                        tu_cluster_first(), tu_cluster_count());
    tcase_add_loop_test(tc, broker_outage_loses_nothing, tu_cluster_first(),
                        tu_cluster_count());
    tcase_add_test(tc, source_read_ahead_answers_only_what_is_asked);
    tcase_add_test(tc, flag_left_up_is_lowered_by_a_busy_relay);
    tcase_add_test(tc, outbox_read_never_plans_parallel_workers);
    tcase_add_test(tc, checkpoint_counters_written_together);
    tcase_add_loop_test(tc,
                        odd_subject_ids_keep_their_numbering_across_a_restart,
                        tu_cluster_first(), tu_cluster_count());
    tcase_add_loop_test(tc, read_ahead_keeps_order_and_loses_nothing,
                        tu_cluster_first(), tu_cluster_count());
    tcase_add_loop_test(tc, connection_loss_loses_nothing, tu_cluster_first(),
                        tu_cluster_count());
    suite_add_tcase(s, tc);
    tc = tcase_create("idle");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 120);
    tcase_add_loop_test(tc, idle_relay_writes_nothing_and_still_polls,
                        tu_cluster_first(), tu_cluster_count());
    suite_add_tcase(s, tc);
    tc = tcase_create("stalled_read");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 120);
    tcase_add_loop_test(tc, read_stalled_past_the_lease_publishes_nothing,
                        tu_cluster_first(), tu_cluster_count());
    suite_add_tcase(s, tc);
    tc = tcase_create("final_checkpoint");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, stop_says_when_only_the_final_checkpoint_failed);
    suite_add_tcase(s, tc);
    return s;
}

int main(int argc, char **argv)
{
    if (argc == 5 && strcmp(argv[1], "--relay") == 0)
        return relay_process(argv[2], argv[3], argv[4]);
    /* The relay warns when prepared transactions are allowed (tested). */
    tpg_server_options("-c max_prepared_transactions=4");
    return tpg_run(pg_relay_suite());
}

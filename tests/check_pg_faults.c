/* SPDX-License-Identifier: MIT */
/*
 * check_pg_faults.c -- the relay of an outbox in PostgreSQL through what
 * happens to the server itself: restarts (crash-like and clean) with the
 * relay running, a crash right after the relay published events that a
 * host on synchronous_commit=off committed, power cuts (what the server
 * wrote without an fsync taken back: tests/pg/shim/powercut.c) while it
 * publishes them, a synchronous standby that
 * must hold whatever is published, a failover to it under load (the
 * server crashed, the standby promoted), dumps restored into another
 * database (the latest dump, and an older one behind what Kafka holds),
 * and the two refusals that name what to fix (relay.state.path set, the
 * outbox restored without the relay's tables).
 *
 * Writers and the independent check are those of check_pg_relay.c
 * (tests/pg/pgledger.h): the host's own ledger, written in the same
 * transactions as de_record, against the topic read back with a plain
 * librdkafka consumer.
 *
 * With DE_PG_CONNINFO the suite cannot restart or crash the server: the
 * cases that need to say SKIPPED (stderr) and pass without checking
 * anything; the others run there too.
 */
#include "deliveryevents_pg.h"
#include "kafka.h"
#include "pgledger.h"
#include "pgserver.h"
#include "testutil.h"

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static char conninfo[800];
static PGconn *conn;
static de_outbox *ob;

static void setup(void)
{
    const char *where;

    conn = tpg_host_open(&where, &ob);
    /* A copy: restoring a dump makes another fresh database. */
    snprintf(conninfo, sizeof conninfo, "%s", where);
}

static void teardown(void)
{
    tpg_host_close(conn, ob);
    ob = NULL;
    conn = NULL;
}

/* Whether the case can control the server; says why not when it
 * cannot. */
static bool server_is_ours(const char *why)
{
    if (!tpg_external())
        return true;
    fprintf(stderr,
            "SKIPPED: this case must %s the server, and DE_PG_CONNINFO "
            "names an external one\n",
            why);
    return false;
}

/* The host's connection after a restart of the server: reset until it
 * is back (pg_ctl -w returned, so the first try normally does). */
static void reconnect(PGconn *c)
{
    ck_assert(tu_wait_for((PQreset(c), PQstatus(c) == CONNECTION_OK), 30000));
}

static long long lease_epoch(PGconn *c)
{
    return tpg_int(c, "SELECT coalesce((SELECT epoch FROM "
                      "deliveryevents.relay_lease), 0)");
}

static bool relay_active(de_relay *r)
{
    de_relay_stats st;

    return de_relay_stats_get(r, &st) == DE_OK && st.active;
}

/* Every position drawn is behind the relay's durable cursor. */
static bool caught_up(PGconn *c)
{
    return tpg_published_cursor(c) >= tpg_max_position(c);
}

/* ---- 1. the server restarted under a running relay -------------------- */

/*
 * Writers in other processes keep recording (reconnecting when the
 * server drops them) while the server is restarted under the relay.  The
 * relay must come back by itself: reconnect both of its connections,
 * keep its lease, and LISTEN again.  The check: nothing lost, per-subject
 * order, no gap in ce_subjectseq, duplicates at most what one relay has
 * in flight, and the same lease epoch (no other relay took over).
 *
 * With listen_only, every timer of the relay is ten minutes (poll
 * interval, lease -- whose heartbeat is a fifth of it --, cleanup): any
 * of them ending its sleep would make it read, so only a NOTIFY can wake
 * it for the last commit, made when everything else is quiet.  Without,
 * the lease is 1.5 s: the restart outlasts it, the relay stops
 * publishing (it could not renew in time) and takes its own lease back
 * once the server is there, reading Kafka first.
 */
static void restart_under_relay(int which, const char *action, bool listen_only)
{
    enum { WRITERS = 3, TXNS = 150 };
    pid_t pids[WRITERS];
    tu_cluster *c;
    de_conf *conf;
    de_relay *r = NULL;
    long long epoch, before;

    if (!server_is_ours("restart"))
        return;
    c = tu_cluster_new(which, 3);
    tu_topic_create(c, "delivery", 3);
    conf = listen_only
               ? tu_relay_conf(c, "relay.poll.interval.ms", "600000",
                               "relay.lease.timeout.ms", "600000",
                               "relay.cleanup.interval.ms", "600000", NULL)
               : tu_relay_conf(c, "relay.poll.interval.ms", "10", NULL);
    tu_ok(de_relay_start(ob, conf, &r));
    de_conf_destroy(conf);
    ck_assert(tu_wait_for(relay_active(r), 30000));
    epoch = lease_epoch(conn);
    tpg_fork_writers(conninfo, WRITERS, TXNS, 20000, true, pids);
    ck_assert(tu_wait_for(tpg_published_cursor(conn) > 20, 60000));
    before = tpg_max_position(conn);
    ck_assert_msg(tpg_server(action), "pg_ctl %s failed", action);
    /* The writers were cut off mid-stream and go on. */
    ck_assert_int_gt(tpg_writers_running(WRITERS, pids), 0);
    reconnect(conn);
    tpg_wait_writers(WRITERS, pids);
    ck_assert_int_gt(tpg_max_position(conn), before);
    /* One commit with nothing else going on (no de_relay_flush before it
     * is published: that would wake the relay). */
    tpg_commit_one(conn, ob, 1);
    ck_assert_msg(tu_wait_for(caught_up(conn), 30000),
                  "the relay did not publish after the restart: cursor "
                  "%lld, last position %lld",
                  tpg_published_cursor(conn), tpg_max_position(conn));
    ck_assert(relay_active(r));
    ck_assert_int_eq(lease_epoch(conn), epoch);
    tpg_stop_and_check(r, conn, c);
    tu_cluster_destroy(c);
}

START_TEST(restart_immediate_relay_recovers)
{
    restart_under_relay(_i, "restart -m immediate", true);
}
END_TEST

START_TEST(restart_fast_relay_recovers)
{
    restart_under_relay(_i, "restart -m fast", false);
}
END_TEST

/* ---- 2. durable before published (guarantee 4a) ----------------------- */

/* A WAL position of the server (pg_lsn as a number): fn is
 * pg_current_wal_insert_lsn (records made), pg_current_wal_lsn (written
 * out of the server's memory) or pg_current_wal_flush_lsn (on disk). */
static long long wal_lsn(PGconn *c, const char *fn)
{
    char sql[160];

    snprintf(sql, sizeof sql, "SELECT pg_catalog.%s() - '0/0'::pg_lsn", fn);
    return tpg_int(c, sql);
}

/* Whether c's backend still answers. */
static bool answers(PGconn *c)
{
    PGresult *r = PQexec(c, "SELECT 1");
    bool ok = PQresultStatus(r) == PGRES_TUPLES_OK;

    PQclear(r);
    return ok;
}

/* A relay that commits nothing of its own for minutes once it has
 * published: its checkpoints, lease heartbeats and cleanup rounds ten
 * minutes apart (each would flush the WAL, and wait for a synchronous
 * standby). */
static de_conf *quiet_relay_conf(tu_cluster *c)
{
    return tu_relay_conf(c, "relay.poll.interval.ms", "10",
                         "relay.checkpoint.interval.ms", "600000",
                         "relay.lease.timeout.ms", "600000",
                         "relay.cleanup.interval.ms", "600000", NULL);
}

/* The server's WAL writer, stopped (SIGSTOP): from now on WAL leaves the
 * server's shared memory only when a backend flushes it itself -- a
 * synchronous commit -- as it would be lost in a power cut until the
 * WAL writer's next round.  Returns its pid. */
static pid_t stop_wal_writer(PGconn *c)
{
    pid_t pid = (pid_t)tpg_int(c, "SELECT pid FROM pg_catalog.pg_stat_activity "
                                  "WHERE backend_type = 'walwriter'");

    ck_assert_int_gt(pid, 0);
    ck_assert(tpg_stop_server_process(c, pid));
    return pid;
}

/* The crash: the WAL writer SIGKILLed, so the postmaster ends every other
 * server process and runs crash recovery from what reached the WAL files:
 * whatever was only in shared memory is gone, as after a power cut.
 * Waits until c's backend is gone, then until the server accepts
 * connections again. */
static void crash(PGconn *c, pid_t wal_writer)
{
    ck_assert_int_eq(kill(wal_writer, SIGKILL), 0);
    ck_assert(tu_wait_for(!answers(c), 30000));
    reconnect(c);
}

/* The server made to flush nothing by itself (see the case below):
 * the sleeping flag unlogged, the background writer and autovacuum
 * off, no timed checkpoint, from the next restart on. */
static void quiet_server(void)
{
    /* No timed checkpoint within a case (one would flush the WAL). */
    tpg_exec(conn, "ALTER SYSTEM SET checkpoint_timeout = '1h'");
    tpg_exec(conn, "ALTER SEQUENCE deliveryevents.relay_sleeping SET "
                   "UNLOGGED");
    tpg_exec(conn, "ALTER SYSTEM SET bgwriter_lru_maxpages = 0");
    tpg_exec(conn, "ALTER SYSTEM SET autovacuum = off");
}

/* The end of a durability case: one event committed durably after the
 * last crash, which the relay publishes; the relay stopped, the
 * server's settings reset, and the independent check. */
static void end_durability_case(de_relay *r, tu_cluster *c)
{
    tpg_commit_one(conn, ob, 2);
    tu_ok(de_relay_flush(r, 60000));
    tu_ok(de_relay_stop(r, 10000));
    tpg_exec(conn, "ALTER SYSTEM RESET ALL");
    tpg_exec(conn, "SELECT pg_catalog.pg_reload_conf()");
    tu_check k = tpg_check(conn, c);
    tu_assert_check(&k);
    ck_assert_int_eq(k.duplicates, 0);
    tu_cluster_destroy(c);
}

/*
 * Guarantee 4a on PostgreSQL: the host commits with
 * synchronous_commit=off, so its commits are visible before their WAL
 * is on disk.  Each of three rounds stops the server's WAL writer (so
 * nothing but a synchronous commit writes the WAL out: what is in
 * shared memory is what a power cut would take), commits a burst of
 * transactions, waits until Kafka acknowledged all of them
 * (de_relay_flush), and crashes the server at once (a server process
 * SIGKILLed: crash recovery from the WAL files); the same relay goes on
 * after it.  Whatever is on Kafka must still be in the database: the
 * check finds every event on Kafka in the host's ledger (written in the
 * same transactions), in order, without a gap.  Without the relay's
 * flush of what it read, the bursts are on Kafka and gone from the
 * database.
 *
 * Nothing else may flush meanwhile: a CHECKPOINT before each round (none
 * is due during it), the background writer and autovacuum off, and the
 * relay's own synchronous commits -- checkpoints, lease heartbeats,
 * cleanup -- minutes apart, longer than the case lasts.  One more: the
 * relay's sleeping flag is a sequence, and a setval of a logged
 * sequence takes a transaction id, so each time the relay goes idle its
 * setval commits synchronously and flushes the WAL too (found while
 * writing this case: without it the broken relay passed).  A relay under
 * load never goes idle, and then only its own flush stands between
 * Kafka and a crash; the case makes that so by making the flag
 * UNLOGGED (no WAL, no transaction id), for this database only.
 */
START_TEST(crash_after_publish_loses_nothing_published)
{
    enum { ROUNDS = 3, TXNS = 40 };
    tu_cluster *c;
    de_conf *conf;
    de_relay *r = NULL;
    long long made, written;
    pid_t wal_writer;

    if (!server_is_ours("crash"))
        return;
    quiet_server();
    ck_assert(tpg_server("restart -m fast"));
    reconnect(conn);
    c = tu_cluster_new(_i, 1);
    tu_topic_create(c, "delivery", 3);
    conf = quiet_relay_conf(c);
    for (int round = 0; round < ROUNDS; round++) {
        unsigned seed = 100u + (unsigned)round;
        tpg_exec(conn, "CHECKPOINT");
        tpg_exec(conn, "SET synchronous_commit = off");
        wal_writer = stop_wal_writer(conn);
        if (round == 0) {
            /* The premise: an asynchronous commit stays in memory now. */
            tpg_commit_one(conn, ob, 1);
            made = wal_lsn(conn, "pg_current_wal_insert_lsn");
            written = wal_lsn(conn, "pg_current_wal_lsn");
            ck_assert_msg(written < made,
                          "an asynchronous commit was written out at once "
                          "(%lld >= %lld)",
                          written, made);
            tu_ok(de_relay_start_pg(conninfo, conf, &r));
            ck_assert(tu_wait_for(relay_active(r), 30000));
        }
        for (int t = 0; t < TXNS; t++) {
            tpg_exec(conn, "BEGIN");
            ck_assert(tpg_record_one(
                conn, ob, 1 + (int)(rand_r(&seed) % TPG_SUBJECTS), &seed));
            tpg_exec(conn, "COMMIT");
        }
        tu_ok(de_relay_flush(r, 60000));
        /* Kafka acknowledged it all; then the crash. */
        if (getenv("DE_TEST_LOG"))
            fprintf(stderr, "round %d: %lld bytes of WAL not written out\n",
                    round,
                    wal_lsn(conn, "pg_current_wal_insert_lsn") -
                        wal_lsn(conn, "pg_current_wal_lsn"));
        crash(conn, wal_writer);
    }
    de_conf_destroy(conf);
    end_durability_case(r, c);
}
END_TEST

/*
 * Guarantee 4a against a power cut.  A crash of the server's processes
 * (above) keeps what the server wrote to the kernel, fsynced or not; a
 * power cut loses what was not fsynced.  The server runs with the
 * power-cut shim (tests/pg/shim/powercut.c), which can take back every
 * write to its data directory that no fsync covered, and a small
 * wal_buffers, so that a backend writes WAL out of a full buffer
 * without flushing it -- WAL a crash would keep and a cut takes back.
 * As above, the host commits with synchronous_commit=off, the WAL
 * writer is stopped, and nothing of the relay's own commits for
 * minutes.  Each of three rounds keeps committing while the relay
 * publishes, until Kafka acknowledged half a burst's worth of this
 * round's events, writes a large transaction (its WAL written out, not
 * flushed), and cuts the power -- the first time once the relay has
 * caught up, which shows what the cut takes back (below), the others
 * mid-stream: every server process stopped at one instant and killed,
 * every unsynced write undone.  The server then starts
 * (crash recovery from what was on disk) and the same relay goes on.  Whatever
 * is on Kafka must be in the database: the check finds every event on Kafka in
 * the host's ledger (written in the same transactions), in order, without a
 * gap, and no number reused.  Without the relay's flush of what it read, events
 * on Kafka are gone from the database and the check fails.
 */
START_TEST(power_cut_mid_stream_loses_nothing_published)
{
    enum { ROUNDS = 3, TXNS = 40, MAX_TXNS = 20000 };
    tu_cluster *c;
    de_conf *conf;
    de_relay *r = NULL;
    long long undone, wal;

    if (!server_is_ours("cut the power of"))
        return;
    quiet_server();
    tpg_exec(conn, "ALTER SYSTEM SET wal_buffers = '64kB'");
    ck_assert(tpg_power_cut_arm());
    reconnect(conn);
    tpg_exec(conn, "CREATE TABLE bulk (b text)");
    c = tu_cluster_new(_i, 1);
    tu_topic_create(c, "delivery", 3);
    conf = quiet_relay_conf(c);
    for (int round = 0; round < ROUNDS; round++) {
        unsigned seed = 200u + (unsigned)round;
        uint64_t base;
        int t;
        tpg_exec(conn, "CHECKPOINT");
        tpg_exec(conn, "SET synchronous_commit = off");
        (void)stop_wal_writer(conn); /* killed with the rest by the cut */
        if (round == 0) {
            tu_ok(de_relay_start_pg(conninfo, conf, &r));
            ck_assert(tu_wait_for(relay_active(r), 30000));
        }
        base = tu_relay_published(r);
        for (t = 0; t < MAX_TXNS &&
                    (t < TXNS || tu_relay_published(r) < base + TXNS / 2);
             t++) {
            tpg_exec(conn, "BEGIN");
            ck_assert(tpg_record_one(
                conn, ob, 1 + (int)(rand_r(&seed) % TPG_SUBJECTS), &seed));
            tpg_exec(conn, "COMMIT");
        }
        ck_assert_msg(t < MAX_TXNS, "the relay published nothing");
        if (round == 0) {
            /* The premise, with the relay caught up and idle (nothing
             * flushes the WAL): a transaction committed with
             * synchronous_commit=off whose commit record the server then
             * wrote out of a full buffer, without a flush -- a crash
             * would keep it, a power cut must not. */
            long long end;
            tu_ok(de_relay_flush(r, 60000));
            /* A fresh WAL segment: XLogWrite flushes a segment it
             * writes to its end, which the bulk insert must not reach. */
            tpg_exec(conn, "SELECT pg_catalog.pg_switch_wal()");
            tpg_exec(conn, "INSERT INTO bulk VALUES ('marker')");
            end = wal_lsn(conn, "pg_current_wal_insert_lsn");
            tpg_exec(conn, "BEGIN");
            tpg_exec(conn, "INSERT INTO bulk SELECT repeat('x', 1000) FROM "
                           "generate_series(1, 200)");
            ck_assert_int_ge(wal_lsn(conn, "pg_current_wal_lsn"), end);
            ck_assert_int_lt(wal_lsn(conn, "pg_current_wal_flush_lsn"), end);
        } else {
            /* Mid-stream, with more WAL written out than flushed. */
            tpg_exec(conn, "INSERT INTO bulk SELECT repeat('x', 1000) FROM "
                           "generate_series(1, 1000)");
        }
        ck_assert(tpg_power_cut(&undone, &wal));
        if (getenv("DE_TEST_LOG"))
            fprintf(stderr,
                    "round %d: %d commits, the cut took back %lld bytes "
                    "(%lld of WAL)\n",
                    round, t, undone, wal);
        ck_assert(tpg_server("start"));
        reconnect(conn);
        if (round == 0) {
            ck_assert_int_gt(wal, 0);
            ck_assert_int_eq(tpg_int(conn, "SELECT count(*) FROM bulk"), 0);
        }
    }
    de_conf_destroy(conf);
    end_durability_case(r, c);
    /* The server as the suite's other cases expect it. */
    ck_assert(tpg_power_cut_disarm());
    reconnect(conn);
}
END_TEST

/* ---- 2b. a synchronous standby (guarantee 4a through a failover) ----- */

static void count_record(void *ctx, const rd_kafka_message_t *m,
                         int32_t partitions)
{
    (void)m;
    (void)partitions;
    ++*(long *)ctx;
}

/* The records on the topic of subject type "delivery". */
static long records(tu_cluster *c)
{
    long n = 0;

    tu_read_topic(c, tu_topic(c, "delivery"), count_record, &n);
    return n;
}

/* What the relay's connections wait for, and run, into buf. */
static void relay_backends(PGconn *c, char *buf, size_t size)
{
    PGresult *r = PQexec(
        c, "SELECT coalesce(string_agg(coalesce(wait_event, '-') || ': ' || "
           "left(query, 60), '; '), 'none') FROM pg_catalog.pg_stat_activity "
           "WHERE application_name = 'deliveryevents-relay'");

    snprintf(buf, size, "%s",
             PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) == 1
                 ? PQgetvalue(r, 0, 0)
                 : PQresultErrorMessage(r));
    PQclear(r);
}

/* The server without its synchronous standby again, and the standby
 * stopped: the suite's other cases share the server. */
static void no_sync_standby(void)
{
    tpg_exec(conn, "ALTER SYSTEM RESET synchronous_standby_names");
    tpg_exec(conn, "SELECT pg_catalog.pg_reload_conf()");
    tpg_standby_stop();
}

/* After the case, in the suite's process, whether or not it passed: a
 * failed test runs no checked teardown, and a server left waiting for a
 * stopped standby would hang every later case. */
static void standby_cleanup(void)
{
    char admin[800];
    PGconn *c;

    if (tpg_external())
        return;
    snprintf(admin, sizeof admin, "%s dbname=postgres", tpg_base_conninfo());
    c = PQconnectdb(admin);
    if (PQstatus(c) != CONNECTION_OK) { /* a failover case left it down */
        PQfinish(c);
        (void)tpg_server("start");
        c = PQconnectdb(admin);
    }
    PQclear(PQexec(c, "ALTER SYSTEM RESET synchronous_standby_names"));
    PQclear(PQexec(c, "SELECT pg_catalog.pg_reload_conf()"));
    PQfinish(c);
    tpg_standby_stop();
}

#define FLUSH_WAITING                                                          \
    " FROM pg_catalog.pg_stat_activity WHERE application_name = "              \
    "'deliveryevents-relay' AND wait_event = 'SyncRep' AND query LIKE "        \
    "'%pg_logical_emit_message%'"

/* When the relay's flush transaction (flush_barrier in source_pg.c) now
 * waiting for the synchronous standby began (µs since the epoch), 0
 * when none waits. */
static long long flush_wait_began(PGconn *c)
{
    return tpg_int(c, "SELECT coalesce(max((extract(epoch FROM "
                      "query_start) * 1000000)::bigint), 0)" FLUSH_WAITING);
}

/* Makes the standby started by tpg_standby_start("de_standby")
 * synchronous; false (and the server without it again) when it did not
 * become so within 30 s. */
static bool make_sync_standby(void)
{
    bool sync;

    tpg_exec(conn, "ALTER SYSTEM SET synchronous_standby_names = "
                   "'de_standby'");
    tpg_exec(conn, "SELECT pg_catalog.pg_reload_conf()");
    sync = tu_wait_for(tpg_int(conn, "SELECT count(*) FROM "
                                     "pg_catalog.pg_stat_replication WHERE "
                                     "application_name = 'de_standby' AND "
                                     "sync_state = 'sync'") == 1,
                       30000);
    if (!sync) /* the server's other cases must not wait for it */
        no_sync_standby();
    return sync;
}

/*
 * Guarantee 4a where the server has a synchronous standby to fail over
 * to: Kafka never holds an event that the standby does not hold, or the
 * failover would undo a published event.  A host committing with
 * synchronous_commit=local -- visible once on the server's own disk,
 * without waiting for the standby -- records an event while the
 * standby's WAL receiver is stopped (SIGSTOP): the relay reads it and
 * must wait for the standby (its flush transaction waits in SyncRep)
 * with nothing of it on Kafka; the standby resumed, it is published.
 * Before the fix the relay published it at once, the server's own flush
 * being enough for it.  Then the wait is cancelled (pg_cancel_backend):
 * the server stops waiting with a WARNING and the COMMIT succeeds, the
 * standby still holding nothing -- the relay must flush again, not
 * publish (before that fix, it published).
 *
 * The relay's sleeping flag is made UNLOGGED here, as in the crash case
 * above: a logged sequence's setval takes a transaction id, so the relay
 * going idle would itself wait for the standby -- before reading the
 * event, and publishing nothing either way.
 */
START_TEST(sync_standby_holds_what_is_published)
{
    const char *sb_info;
    char sb_db[600];
    tu_cluster *c;
    de_conf *conf;
    de_relay *r = NULL;
    PGconn *sb;
    pid_t receiver;
    bool sync, early, waited, rewaited = false;
    long long began;
    char doing[1000];

    if (!server_is_ours("add a standby to"))
        return;
    tpg_exec(conn, "ALTER SEQUENCE deliveryevents.relay_sleeping SET "
                   "UNLOGGED");
    sb_info = tpg_standby_start("de_standby");
    ck_assert_msg(sb_info != NULL, "cannot start a standby (see stderr)");
    sync = make_sync_standby();
    ck_assert_msg(sync, "the standby did not become synchronous");
    c = tu_cluster_new(_i, 1);
    tu_topic_create(c, "delivery", 3);
    /* Nothing else of the relay's commits (each waits for the standby
     * too) while the standby is stopped. */
    conf = quiet_relay_conf(c);
    tu_ok(de_relay_start(ob, conf, &r));
    de_conf_destroy(conf);
    tpg_commit_one(conn, ob, 1);
    tu_ok(de_relay_flush(r, 60000));
    ck_assert_int_eq(records(c), 1);

    snprintf(sb_db, sizeof sb_db, "%s dbname=postgres", sb_info);
    sb = tpg_connect(sb_db);
    receiver = (pid_t)tpg_int(sb, "SELECT pid FROM "
                                  "pg_catalog.pg_stat_wal_receiver");
    PQfinish(sb);
    ck_assert_int_gt(receiver, 0);
    ck_assert_int_eq(kill(receiver, SIGSTOP), 0);
    tpg_exec(conn, "SET synchronous_commit = local");
    tpg_commit_one(conn, ob, 2);
    /* Either outcome ends the wait: the relay waiting for the standby
     * (right), or the event on Kafka (wrong). */
    (void)tu_wait_for(flush_wait_began(conn) > 0 || records(c) > 1, 30000);
    early = records(c) > 1;
    began = flush_wait_began(conn);
    waited = began > 0;
    relay_backends(conn, doing, sizeof doing);
    if (waited && !early) {
        tpg_exec(conn,
                 "SELECT pg_catalog.pg_cancel_backend(pid)" FLUSH_WAITING);
        (void)tu_wait_for(flush_wait_began(conn) > began || records(c) > 1,
                          30000);
        early = records(c) > 1;
        rewaited = flush_wait_began(conn) > began;
    }
    ck_assert_int_eq(kill(receiver, SIGCONT), 0);
    tu_ok(de_relay_flush(r, 60000));
    tu_ok(de_relay_stop(r, 10000));
    tpg_exec(conn, "SET synchronous_commit = on");
    no_sync_standby();
    ck_assert_msg(!early, "the relay published an event the synchronous "
                          "standby did not hold");
    ck_assert_msg(waited,
                  "the relay neither published nor waited for the standby "
                  "within 30 s; its connections: %s",
                  doing);
    ck_assert_msg(rewaited, "the relay did not wait for the standby again "
                            "after its wait was cancelled");
    ck_assert_int_eq(records(c), 2);
    tu_check k = tpg_check(conn, c);
    tu_assert_check(&k);
    ck_assert_int_eq(k.duplicates, 0);
    tu_cluster_destroy(c);
}
END_TEST

/*
 * A failover under load: writers in other processes and the relay all
 * connect through one conninfo naming the server and its synchronous
 * standby (target_session_attrs=read-write).  The server crashes
 * (pg_ctl stop -m immediate) in the middle of it and the standby is
 * promoted; the writers and the relay reconnect to it by themselves and
 * go on.  The check runs against the promoted server's ledger: every
 * event it holds is on Kafka, in order, numbered without gaps -- and
 * nothing is on Kafka that the failover undid (an event published
 * before the standby held it would be on Kafka but in no ledger).  The
 * relay's timers are all ten minutes, so the last commit, made when
 * everything else is quiet, is found by its NOTIFY on the promoted
 * server: the relay LISTENs again there and raises its flag there
 * before it sleeps.
 * Afterwards the old server is started again (crash recovery) for the
 * suite's other cases, without the standby; each run of the case starts
 * by doing the same (failover_setup), so that one that failed half-way
 * leaves nothing to the next.
 */
START_TEST(failover_to_sync_standby_keeps_order_and_loses_nothing)
{
    enum { WRITERS = 3, TXNS = 150 };
    const char *both;
    char where[800];
    pid_t pids[WRITERS];
    tu_cluster *c;
    de_conf *conf;
    de_relay *r = NULL;
    PGconn *now;
    de_outbox *nob = NULL;
    long long before;
    bool promoted;
    int running;

    if (!server_is_ours("fail over"))
        return;
    ck_assert_msg(tpg_standby_start("de_standby") != NULL,
                  "cannot start a standby (see stderr)");
    ck_assert_msg(make_sync_standby(), "the standby did not become "
                                       "synchronous");
    snprintf(where, sizeof where, "%s", tpg_failover_conninfo(PQdb(conn)));
    both = where;
    c = tu_cluster_new(_i, 3);
    tu_topic_create(c, "delivery", 3);
    /* Every timer ten minutes, as in restart_under_relay's listen_only:
     * only a NOTIFY on the promoted server can wake it for the last
     * commit. */
    conf = tu_relay_conf(c, "relay.poll.interval.ms", "600000",
                         "relay.lease.timeout.ms", "600000",
                         "relay.cleanup.interval.ms", "600000", NULL);
    tu_ok(de_relay_start_pg(both, conf, &r));
    de_conf_destroy(conf);
    ck_assert(tu_wait_for(relay_active(r), 30000));
    tpg_fork_writers(both, WRITERS, TXNS, 20000, true, pids);
    ck_assert(tu_wait_for(tpg_published_cursor(conn) > 20, 60000));
    before = tpg_max_position(conn);
    ck_assert_msg(tpg_server("stop -m immediate"), "pg_ctl stop failed");
    promoted = tpg_standby_promote();
    /* The writers were cut off mid-stream and go on there. */
    running = tpg_writers_running(WRITERS, pids);
    ck_assert_msg(promoted, "pg_ctl promote failed");
    ck_assert_int_gt(running, 0);
    tpg_wait_writers(WRITERS, pids);

    now = tpg_connect(both);
    ck_assert_int_gt(tpg_max_position(now), before);
    tu_ok(de_outbox_open_pg(now, NULL, &nob));
    /* One commit on the promoted server with nothing else going on: the
     * relay must have been woken by it -- its LISTEN and its sleeping
     * flag on the new server -- and not by a timer, all ten minutes
     * (no de_relay_flush before, which would wake it). */
    tpg_commit_one(now, nob, 1);
    ck_assert_msg(
        tu_wait_for(tpg_published_cursor(now) >= tpg_max_position(now), 60000),
        "the relay did not publish on the promoted server: "
        "cursor %lld, last position %lld",
        tpg_published_cursor(now), tpg_max_position(now));
    tu_ok(de_relay_flush(r, 60000));
    tu_ok(de_relay_stop(r, 10000));
    tu_check k = tpg_check(now, c);
    de_outbox_close(nob);
    PQfinish(now);
    tu_assert_check(&k);
    ck_assert_int_le(k.duplicates, 20000); /* relay.max.inflight */
    tu_cluster_destroy(c);
    standby_cleanup(); /* the old server back, for the next case */
}
END_TEST

/* The failover case's fixture: the suite's server back as it should be
 * (a run that failed half-way may have left it down, the standby
 * promoted), then the usual fresh database. */
static void failover_setup(void)
{
    standby_cleanup();
    setup();
}

/* ---- 3. dump and restore with a relay (guarantee 4b) ------------------ */

/* pg_dump of conninfo `from` (custom format) into file. */
static void dump(const char *from, const char *file)
{
    char cmd[2400];

    snprintf(cmd, sizeof cmd, TPG_BIN "/pg_dump -Fc -f '%s' -d '%s'", file,
             from);
    ck_assert_msg(system(cmd) == 0, "pg_dump failed: %s", cmd);
}

/* A new database holding file's dump; its conninfo into out. */
static void restore_new(const char *file, char *out, size_t size)
{
    char cmd[2400];

    snprintf(out, size, "%s", tpg_fresh_db());
    snprintf(cmd, sizeof cmd,
             TPG_BIN "/pg_restore --exit-on-error -d '%s' '%s'", out, file);
    ck_assert_msg(system(cmd) == 0, "pg_restore failed: %s", cmd);
}

static void relay_writers(de_relay *r, const char *where, int n, int ntx)
{
    pid_t pids[4];

    tpg_fork_writers(where, n, ntx, 1000, false, pids);
    tpg_wait_writers(n, pids);
    tu_ok(de_relay_flush(r, 60000));
}

static de_relay *start_relay(tu_cluster *c, de_outbox *o)
{
    de_conf *conf = tu_relay_conf(c, "relay.poll.interval.ms", "10", NULL);
    de_relay *r = NULL;

    tu_ok(de_relay_start(o, conf, &r));
    de_conf_destroy(conf);
    return r;
}

/*
 * The simple case: the relay publishes, the database is dumped while it
 * runs, restored into a fresh database, and the service and its relay
 * go on there.  Positions continue above the restored ones, and the
 * relay on the restored database publishes the new events numbered
 * after the old ones: nothing lost, nothing renumbered.
 */
START_TEST(dump_restored_into_new_database_continues)
{
    char *dir = tu_mkdtemp(), moved[800];
    const char *file = tu_path(dir, "db.dump");
    tu_cluster *c = tu_cluster_new(_i, 3);
    de_relay *r;
    de_outbox *ob2 = NULL;
    PGconn *conn2;
    long long last;

    tu_topic_create(c, "delivery", 3);
    r = start_relay(c, ob);
    relay_writers(r, conninfo, 3, 30);
    last = tpg_max_position(conn);
    dump(conninfo, file);
    tu_ok(de_relay_stop(r, 10000));
    restore_new(file, moved, sizeof moved);
    conn2 = tpg_connect(moved);
    tu_ok(de_outbox_open_pg(conn2, NULL, &ob2));
    ck_assert_int_eq(tpg_max_position(conn2), last);
    /* The dump's lease is the old relay's: taken once it expires. */
    r = start_relay(c, ob2);
    relay_writers(r, moved, 3, 30);
    /* Positions went on above the restored ones. */
    ck_assert_int_gt(tpg_max_position(conn2), last);
    tu_ok(de_relay_stop(r, 10000));
    tu_check k = tpg_check(conn2, c);
    tu_assert_check(&k);
    ck_assert_int_eq(k.duplicates, 0);
    de_outbox_close(ob2);
    PQfinish(conn2);
    tu_cluster_destroy(c);
    tu_rmdir(dir);
}
END_TEST

/*
 * An older dump restored over a newer topic: the relay publishes, the
 * database is dumped while it runs, more events are committed and
 * published, and then the older dump is restored into a new database
 * where the service goes on.  The events published after the dump are
 * on Kafka but no longer in the database; their subjects' numbers must
 * not be used again for the new events (another ce_id under a number a
 * consumer holds would be a conflict, or worse, taken for a duplicate):
 * the relay reads what landed and numbers above it.  The ledger the
 * check uses is the old database's (everything published before the
 * restore) followed by the new events.
 */
START_TEST(older_dump_restored_numbers_above_kafka)
{
    char *dir = tu_mkdtemp(), older[800];
    const char *file = tu_path(dir, "db.dump");
    tu_cluster *c = tu_cluster_new(_i, 3);
    de_relay *r;
    de_outbox *ob2 = NULL;
    PGconn *conn2;
    sqlite3 *ledger = NULL;
    long long at_dump;

    tu_topic_create(c, "delivery", 3);
    r = start_relay(c, ob);
    relay_writers(r, conninfo, 3, 20);
    at_dump = tpg_int(conn, "SELECT count(*) FROM ledger");
    dump(conninfo, file);
    relay_writers(r, conninfo, 3, 20);
    tu_ok(de_relay_stop(r, 10000));
    ck_assert_int_eq(sqlite3_open(":memory:", &ledger), SQLITE_OK);
    tpg_ledger_append(conn, ledger);
    restore_new(file, older, sizeof older);
    conn2 = tpg_connect(older);
    ck_assert_int_eq(tpg_int(conn2, "SELECT count(*) FROM ledger"), at_dump);
    tu_ok(de_outbox_open_pg(conn2, NULL, &ob2));
    r = start_relay(c, ob2);
    relay_writers(r, older, 3, 20);
    tu_ok(de_relay_stop(r, 10000));
    tpg_ledger_append(conn2, ledger);
    ck_assert_int_gt(tu_query_int(ledger, "SELECT count(*) FROM ledger"),
                     tpg_int(conn, "SELECT count(*) FROM ledger"));
    tu_check k = tpg_check_ledger(c, ledger);
    tu_assert_check(&k);
    ck_assert_int_le(k.duplicates, 20000); /* relay.max.inflight */
    sqlite3_close(ledger);
    de_outbox_close(ob2);
    PQfinish(conn2);
    tu_cluster_destroy(c);
    tu_rmdir(dir);
}
END_TEST

/* ---- 4. refusals that say what to fix --------------------------------- */

/* relay.state.path names a SQLite state file: on PostgreSQL the state is
 * in the database, and a setting that would be ignored is refused,
 * naming the key, before anything is created. */
START_TEST(state_path_is_refused)
{
    tu_cluster *c = tu_cluster_new(0, 1);
    de_conf *conf = tu_relay_conf(c, "relay.state.path", "/tmp/x-relay", NULL);
    de_relay *r = NULL;

    tu_assert_err(de_relay_start(ob, conf, &r), DE_ERR_CONFIG,
                  "relay.state.path");
    ck_assert_ptr_null(r);
    tu_assert_err(de_relay_start_pg(conninfo, conf, &r), DE_ERR_CONFIG,
                  "relay.state.path");
    ck_assert_ptr_null(r);
    ck_assert_int_eq(tpg_int(conn, "SELECT count(*) FROM pg_catalog.pg_tables "
                                   "WHERE schemaname = 'deliveryevents' AND "
                                   "tablename LIKE 'relay%'"),
                     0);
    de_conf_destroy(conf);
    tu_cluster_destroy(c);
}
END_TEST

/* The outbox's tables restored without the relay's (a partial restore):
 * the position at the relay's cursor holds another event.  The relay
 * refuses, and the message speaks of the relay's tables in the
 * database, not of a state file. */
START_TEST(partial_restore_is_refused_saying_what_to_restore)
{
    tu_cluster *c = tu_cluster_new(0, 1);
    de_relay *r;

    tu_topic_create(c, "delivery", 1);
    r = start_relay(c, ob);
    for (int i = 1; i <= 3; i++)
        tpg_commit_one(conn, ob, i);
    tu_ok(de_relay_flush(r, 60000));
    ck_assert(tu_wait_for(caught_up(conn), 30000));
    tu_ok(de_relay_stop(r, 10000));
    /* What restoring an older copy of the outbox's tables alone leaves:
     * the same positions, other events. */
    tpg_exec(conn, "TRUNCATE deliveryevents.outbox, "
                   "deliveryevents.outbox_order");
    tpg_exec(conn, "SELECT pg_catalog.setval("
                   "'deliveryevents.outbox_position', 1, false)");
    for (int i = 4; i <= 6; i++)
        tpg_commit_one(conn, ob, i);
    de_conf *conf = tu_relay_conf(c, NULL);
    r = NULL;
    tu_assert_err(de_relay_start(ob, conf, &r), DE_ERR_STATE,
                  "restore schema deliveryevents as a whole");
    ck_assert_ptr_null(r);
    ck_assert_ptr_null(strstr(de_errmsg(), "state file"));
    ck_assert_ptr_nonnull(strstr(de_errmsg(), "relay_* tables"));
    de_conf_destroy(conf);
    tu_cluster_destroy(c);
}
END_TEST

/* Each scenario is a test case of its own: make check runs each as a
 * job of its own (tests/run_suites.sh), with a server of its own. */
static TCase *add(Suite *s, TCase *tc, int timeout)
{
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, timeout);
    suite_add_tcase(s, tc);
    return tc;
}

static Suite *pg_faults_suite(void)
{
    Suite *s = suite_create("pg_faults");
    int first = tu_cluster_first(), n = tu_cluster_count();
    TCase *tc;

    tc = add(s, tcase_create("restart_immediate"), 90);
    tcase_add_loop_test(tc, restart_immediate_relay_recovers, first, n);
    tc = add(s, tcase_create("restart_fast"), 90);
    tcase_add_loop_test(tc, restart_fast_relay_recovers, first, n);
    tc = add(s, tcase_create("durability"), 90);
    tcase_add_loop_test(tc, crash_after_publish_loses_nothing_published, first,
                        n);
    tc = add(s, tcase_create("power_cut"), 120);
    tcase_add_loop_test(tc, power_cut_mid_stream_loses_nothing_published, first,
                        n);
    tc = add(s, tcase_create("sync_standby"), 120);
    tcase_add_unchecked_fixture(tc, NULL, standby_cleanup);
    tcase_add_loop_test(tc, sync_standby_holds_what_is_published, first, n);
    tc = tcase_create("failover");
    tcase_add_checked_fixture(tc, failover_setup, teardown);
    tcase_set_timeout(tc, 180);
    suite_add_tcase(s, tc);
    tcase_add_unchecked_fixture(tc, NULL, standby_cleanup);
    tcase_add_loop_test(
        tc, failover_to_sync_standby_keeps_order_and_loses_nothing, first, n);
    tc = add(s, tcase_create("dump_restore"), 90);
    tcase_add_loop_test(tc, dump_restored_into_new_database_continues, first,
                        n);
    tc = add(s, tcase_create("older_dump"), 90);
    tcase_add_loop_test(tc, older_dump_restored_numbers_above_kafka, first, n);
    tc = add(s, tcase_create("refusals"), 60);
    tcase_add_test(tc, state_path_is_refused);
    tcase_add_test(tc, partial_restore_is_refused_saying_what_to_restore);
    return s;
}

int main(void)
{
    return tpg_run(pg_faults_suite());
}

/* SPDX-License-Identifier: MIT */
/*
 * soak_pg.c -- years of uptime on PostgreSQL, compressed: dozens of writer
 * processes recording into one database, fresh subjects all the time,
 * subjects returning after the relay forgot them, an in-process relay and
 * a sidecar relay (one active, one standing by), a consumer applying into
 * the same database, and faults: broker outages, the sidecar killed, the
 * in-process relay restarted, every connection to the database cut, the
 * server restarted.  It samples every resource the library could leak --
 * the processes' memory, descriptors and threads, the server's
 * connections, the library's tables on disk, the server's WAL, the outbox,
 * inbox and relay counter rows -- and fails if any keeps growing after
 * warm-up (tests/util/soakutil.h says how that is judged).  Every event
 * is checked as it goes: applied once, in each subject's order, numbered
 * 1, 2, 3, ... within each numbering; at the end nothing is left
 * unapplied, nothing was applied that no committed transaction recorded
 * (one transaction in eight is rolled back, one in five rolls an event
 * back to a savepoint), and no event was dead-lettered.
 *
 *   make soak-pg        about 30 minutes (DE_SOAK_SECONDS=1800), 24 writers
 *   make soak-pg-short  2.5 minutes, 12 writers, run by CI
 *
 * Processes: this one owns the mock cluster (3 brokers) and the server
 * (tests/pg/pgserver.c), injects the faults, samples and checks; writer
 * processes (`--writer K`) record deliveries of their own subjects
 * ("w<K>-<n>"), each transaction with a row per event in the host's
 * ledger, random pauses before COMMIT; writer 0 also runs the in-process
 * relay, restarted on SIGUSR1; `deliveryevents relay --pg` runs as the
 * sidecar; a consumer process (`--consumer`) applies every event into the
 * table `applied`.  Checked rows are deleted from the ledger and from
 * `applied`, so that the tables measure the library's state, not the
 * test's.  Against an external server (DE_PG_CONNINFO) the server is not
 * restarted and its WAL is not measured.
 */
#include "deliveryevents_pg.h"
#include "kafka.h"
#include "pgledger.h"
#include "pgserver.h"
#include "soakutil.h"

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static const char *self_exe = "/proc/self/exe";

/* The run's shape: a long run has more writers and a higher rate. */
static tsk_plan plan_for(int seconds)
{
    return tsk_make_plan(seconds, seconds >= 900 ? 300 : 150);
}

static int writers_for(int seconds)
{
    return seconds >= 900 ? 24 : 12;
}

/* Cuts every connection to the database this often, and restarts the
 * server this often (alternating -m fast and -m immediate). */
static int cut_every_s(const tsk_plan *p)
{
    return p->seconds >= 900 ? 90 : 35;
}

static int server_restart_every_s(const tsk_plan *p)
{
    return p->seconds >= 900 ? 300 : 70;
}

/* ---- the writer processes ----------------------------------------------- */

/* libpq prints what the server says to a session it ends (each cut and
 * restart, in every process): the helpers keep quiet. */
static void quiet_notice(void *arg, const char *message)
{
    (void)arg;
    (void)message;
}

/* Runs the INSERT sql with its n parameters v on c. */
static bool insert(PGconn *c, const char *sql, int n, const char *const *v)
{
    PGresult *r = PQexecParams(c, sql, n, NULL, v, NULL, NULL, 0);
    bool ok = PQresultStatus(r) == PGRES_COMMAND_OK;

    PQclear(r);
    return ok;
}

/* Records delivery d's event (action) of writer k inside the open
 * transaction, with its row in the ledger unless it is to be rolled
 * back. */
static bool record(PGconn *c, de_outbox *ob, int k, const tsk_pending *d,
                   const char *action, bool ledger)
{
    char id[48];
    de_event ev = {0};
    de_recorded rec;
    const char *v[2];

    snprintf(id, sizeof id, "w%d-%ld", k, d->id);
    ev.subject_type = "delivery";
    ev.subject_id = id;
    ev.action = action;
    ev.payload = "{\"soak\":1}";
    if (de_record(ob, &ev, &rec) != DE_OK) {
        if (PQstatus(c) == CONNECTION_OK)
            fprintf(stderr, "writer %d: de_record: %s\n", k, de_errmsg());
        return false;
    }
    if (!ledger)
        return true;
    v[0] = rec.event_id;
    v[1] = id;
    return insert(c, "INSERT INTO ledger(event_id, subject_id) VALUES ($1, $2)",
                  2, v);
}

/* --writer K NWRITERS CONNINFO BOOTSTRAP PREFIX SECONDS: records
 * deliveries until SIGTERM, transactions of one to three events; writer
 * 0 runs the in-process relay, restarted on SIGUSR1.  A connection the
 * server dropped is reset and the writer goes on. */
static int writer_main(char **a)
{
    int k = atoi(a[0]);
    tsk_plan p = plan_for(atoi(a[5]));
    double rate = (double)p.rate / atoi(a[1]);
    PGconn *c = PQconnectdb(a[2]);
    de_outbox *ob = NULL;
    de_relay *r = NULL;
    tsk_deliveries ds = {0};
    unsigned seed = 7919u * (unsigned)k + (unsigned)getpid();
    long n = 0;
    int64_t t0 = tu_now_ms(), relay_retry_ms = 0;
    int rc = 0, failed = 0;

    tsk_catch_signals();
    PQsetNoticeProcessor(c, quiet_notice, NULL);
    for (;;) {
        if (!tpg_reconnect(c, NULL)) {
            fprintf(stderr, "writer %d: no connection: %s", k,
                    PQerrorMessage(c));
            rc = 2;
            goto done;
        }
        if (de_outbox_open_pg(c, NULL, &ob) == DE_OK)
            break;
        if (PQstatus(c) == CONNECTION_OK) {
            fprintf(stderr, "writer %d: %s\n", k, de_errmsg());
            rc = 2;
            goto done;
        }
    }
    while (!tsk_got_term) {
        int64_t now = tu_now_ms();
        int m = 1 + (int)(rand_r(&seed) % 3);
        bool rollback = rand_r(&seed) % 8 == 0;
        bool savepoint = rand_r(&seed) % 5 == 0, ok;
        tsk_pending d[3];
        const char *act[3];

        if (tsk_got_usr1 && k == 0) {
            tsk_got_usr1 = 0;
            de_relay_stop(r, 5000);
            r = NULL;
        }
        /* Writer 0's relay, started again while it cannot be (the
         * server restarting). */
        if (k == 0 && r == NULL && now >= relay_retry_ms) {
            r = tsk_start_relay(&p, ob, a[3], a[4]);
            relay_retry_ms = now + 1000;
        }
        /* Pace: n events by now. */
        if (n >= (now - t0) * rate / 1000) {
            usleep(2000);
            continue;
        }
        if (PQstatus(c) != CONNECTION_OK && !tpg_reconnect(c, NULL)) {
            fprintf(stderr, "writer %d: no connection after 120 s: %s", k,
                    PQerrorMessage(c));
            rc = 3;
            break;
        }
        for (int i = 0; i < m; i++)
            act[i] = tsk_next(&ds, now, &d[i]);
        ok = tpg_cmd(c, "BEGIN");
        for (int i = 0; i < m && ok; i++)
            ok = record(c, ob, k, &d[i], act[i], true);
        if (ok && savepoint)
            ok = tpg_cmd(c, "SAVEPOINT s") &&
                 record(c, ob, k, &d[m - 1], "noted", false) &&
                 tpg_cmd(c, "ROLLBACK TO SAVEPOINT s");
        usleep((useconds_t)(rand_r(&seed) % 20000));
        n += m;
        if (ok && !rollback && tpg_cmd(c, "COMMIT")) {
            for (int i = 0; i < m; i++)
                tsk_written(&ds, &p, &d[i], act[i], tu_now_ms());
            failed = 0;
        } else {
            /* Rolled back, or the connection was lost (the COMMIT may
             * have happened: the ledger row says so either way).  These
             * deliveries go no further. */
            PQclear(PQexec(c, "ROLLBACK"));
            /* A writer failing on a live connection stops the soak (it
             * would otherwise pass on fewer events). */
            if (!(ok && rollback) && PQstatus(c) == CONNECTION_OK &&
                ++failed >= 50) {
                fprintf(stderr, "writer %d: 50 transactions in a row failed\n",
                        k);
                rc = 5;
                break;
            }
        }
    }
    /* Not a failure when it times out (what is left stays in the
     * outbox): the parent's final check waits for every event. */
    if (r != NULL && de_relay_stop(r, 20000) != DE_OK)
        fprintf(stderr, "writer 0: relay stop: %s\n", de_errmsg());
done:
    de_outbox_close(ob);
    PQfinish(c);
    tsk_deliveries_free(&ds);
    return rc;
}

/* ---- the consumer process ----------------------------------------------- */

static de_err apply(PGconn *c, const de_event_view *ev, void *ctx)
{
    char epoch[24], seq[24];
    const char *v[4] = {ev->event_id, ev->subject_id, epoch, seq};

    (void)ctx;
    snprintf(epoch, sizeof epoch, "%lld", (long long)ev->subject_epoch);
    snprintf(seq, sizeof seq, "%lld", (long long)ev->subject_seq);
    return insert(c,
                  "INSERT INTO applied(event_id, subject_id, epoch, seq) "
                  "VALUES ($1, $2, $3, $4)",
                  4, v)
               ? DE_OK
               : DE_ERR_DB;
}

/* --consumer CONNINFO BOOTSTRAP PREFIX SECONDS: applies until SIGTERM,
 * resetting its connection when the server dropped it. */
static int consumer_main(char **a)
{
    tsk_plan p = plan_for(atoi(a[3]));
    char tmpl[128], gid[128], forget[32];
    PGconn *conn = PQconnectdb(a[0]);
    de_conf *conf = de_conf_new();
    de_consumer *c = NULL;
    int rc = 0;

    tsk_catch_signals();
    PQsetNoticeProcessor(conn, quiet_notice, NULL);
    snprintf(tmpl, sizeof tmpl, "%s{subject_type}.events", a[2]);
    snprintf(gid, sizeof gid, "%ssoak", a[2]);
    /* Past the relay's forget time plus the consumer's worst lag, as in
     * tests/soak.c (the rule in docs/OVERVIEW.md). */
    snprintf(forget, sizeof forget, "%d", (p.forget_s + 60) * 1000);
    de_conf_set_log_cb(conf, tsk_log, (void *)"consumer");
    if (!tpg_reconnect(conn, NULL) ||
        de_conf_set(conf, "bootstrap.servers", a[1]) != DE_OK ||
        de_conf_set(conf, "group.id", gid) != DE_OK ||
        de_conf_set(conf, "topic.template", tmpl) != DE_OK ||
        de_conf_set(conf, "consumer.subject.forget.ms", forget) != DE_OK ||
        de_consumer_open_pg(conn, conf, &c) != DE_OK ||
        de_consumer_on_pg(c, "delivery", NULL, apply, NULL) != DE_OK) {
        fprintf(stderr, "consumer: %s / %s\n", de_errmsg(),
                PQerrorMessage(conn));
        rc = 3;
        goto done;
    }
    while (!tsk_got_term) {
        if (de_consumer_poll(c, 200, NULL) == DE_OK)
            continue;
        if (PQstatus(conn) == CONNECTION_OK) {
            fprintf(stderr, "consumer: %s\n", de_errmsg());
        } else if (!tpg_reconnect(conn, NULL)) {
            fprintf(stderr, "consumer: no connection after 120 s: %s",
                    PQerrorMessage(conn));
            rc = 4;
            break;
        }
    }
done:
    de_conf_destroy(conf);
    /* A failed close (an offset commit or the group's leave on Kafka)
     * says nothing this soak checks. */
    if (c != NULL && de_consumer_close(c) != DE_OK)
        fprintf(stderr, "consumer: close: %s\n", de_errmsg());
    PQfinish(conn);
    return rc;
}

/* ---- the parent: faults, samples, checks -------------------------------- */

static pid_t spawn_writer(int k, int nw, const char *where, tu_cluster *c,
                          const char *secs)
{
    char ks[16], ns[16];
    const char *argv[] = {self_exe,     "--writer", ks,   ns,  where,
                          c->bootstrap, c->prefix,  secs, NULL};

    snprintf(ks, sizeof ks, "%d", k);
    snprintf(ns, sizeof ns, "%d", nw);
    return tsk_spawn(argv);
}

static pid_t spawn_consumer(const char *where, tu_cluster *c, const char *secs)
{
    const char *argv[] = {self_exe,  "--consumer", where, c->bootstrap,
                          c->prefix, secs,         NULL};

    return tsk_spawn(argv);
}

enum {
    M_RELAY_RSS,
    M_RELAY_FDS,
    M_RELAY_THREADS,
    M_WRITER_RSS,
    M_CON_RSS,
    M_CON_FDS,
    M_SIDE_RSS,
    M_BACKENDS,
    M_TABLES,
    M_WAL,
    M_INBOX,
    M_OUTBOX,
    M_COUNTERS,
    M_COUNT
};

static const tsk_metric metrics[M_COUNT] = {
    [M_RELAY_RSS] = {"writer 0 RSS", "KiB", 4096},
    [M_RELAY_FDS] = {"writer 0 fds", "", 4},
    [M_RELAY_THREADS] = {"writer 0 threads", "", 2},
    [M_WRITER_RSS] = {"writer 1 RSS", "KiB", 4096},
    [M_CON_RSS] = {"consumer RSS", "KiB", 4096},
    [M_CON_FDS] = {"consumer fds", "", 4},
    [M_SIDE_RSS] = {"sidecar RSS", "KiB", 4096},
    [M_BACKENDS] = {"connections", "", 4},
    [M_TABLES] = {"library tables", "KiB", 2048},
    [M_WAL] = {"server WAL", "KiB", 65536},
    [M_INBOX] = {"inbox rows", "", 2000},
    [M_OUTBOX] = {"outbox rows", "", 5000},
    [M_COUNTERS] = {"relay counters", "", 2000},
};

/* The parent's connection, alive again after a cut or a restart. */
static void alive(PGconn *c)
{
    PGresult *r = PQexec(c, "SELECT 1");
    bool ok = PQresultStatus(r) == PGRES_TUPLES_OK;

    PQclear(r);
    if (!ok)
        ck_assert_msg(
            tu_wait_for((PQreset(c), PQstatus(c) == CONNECTION_OK), 120000),
            "no connection to the server: %s", PQerrorMessage(c));
}

typedef struct checks {
    PGconn *c;
    long checked, windows;
} checks;

/*
 * Checks the events applied so far, in ledger order up to the first one
 * not applied yet: each applied exactly once, each subject's in commit
 * order (a subject's events come from one writer's transactions in turn,
 * so the ledger's n is their commit order), numbered 1, 2, 3, ... within
 * a numbering and 1 at each new one -- also across windows: the last
 * event checked of each subject stays in checked_last.  Then deletes them from
 * the ledger and from `applied`, in the same REPEATABLE READ transaction (one
 * snapshot for all of it).  Returns how many remain unapplied.
 */
static long long check_applied(checks *k)
{
    long long upto, n, left;
    char sql[2048];

    alive(k->c);
    tpg_exec(k->c, "BEGIN ISOLATION LEVEL REPEATABLE READ");
    upto = tpg_int(k->c, "SELECT coalesce((SELECT min(n) - 1 FROM ledger l "
                         "WHERE NOT EXISTS (SELECT 1 FROM applied a WHERE "
                         "a.event_id = l.event_id)), (SELECT max(n) FROM "
                         "ledger), 0)");
    snprintf(sql, sizeof sql, "SELECT count(*) FROM ledger WHERE n <= %lld",
             upto);
    n = tpg_int(k->c, sql);
    snprintf(sql, sizeof sql,
             "SELECT count(*) FROM ledger l JOIN applied a USING (event_id) "
             "WHERE l.n <= %lld",
             upto);
    ck_assert_msg(tpg_int(k->c, sql) == n,
                  "events up to %lld applied more than once", upto);
    /* Each subject's events of this window, after the last one checked
     * in an earlier window (checked_last, n = 0). */
    snprintf(sql, sizeof sql,
             "WITH w AS (SELECT l.subject_id, l.n, a.an, a.epoch, a.seq FROM "
             "ledger l JOIN applied a USING (event_id) WHERE l.n <= %lld), "
             "x AS (SELECT * FROM w UNION ALL SELECT c.subject_id, 0, c.an, "
             "c.epoch, c.seq FROM checked_last c WHERE c.subject_id IN "
             "(SELECT subject_id FROM w)) "
             "SELECT count(*) FROM (SELECT an, epoch, seq, lag(an) OVER o AS "
             "pan, lag(epoch) OVER o AS pe, lag(seq) OVER o AS ps FROM x "
             "WINDOW o AS (PARTITION BY subject_id ORDER BY n)) y WHERE pan "
             "IS NOT NULL AND (pan > an OR NOT ((epoch = pe AND seq = ps + 1) "
             "OR (epoch > pe AND seq = 1)))",
             upto);
    ck_assert_msg(tpg_int(k->c, sql) == 0,
                  "events up to %lld applied out of order or misnumbered",
                  upto);
    snprintf(sql, sizeof sql,
             "INSERT INTO checked_last SELECT DISTINCT ON (l.subject_id) "
             "l.subject_id, a.an, a.epoch, a.seq FROM ledger l JOIN applied a "
             "USING (event_id) WHERE l.n <= %lld ORDER BY l.subject_id, l.n "
             "DESC ON CONFLICT (subject_id) DO UPDATE SET an = excluded.an, "
             "epoch = excluded.epoch, seq = excluded.seq",
             upto);
    tpg_exec(k->c, sql);
    snprintf(sql, sizeof sql,
             "DELETE FROM applied WHERE event_id IN (SELECT event_id FROM "
             "ledger WHERE n <= %lld)",
             upto);
    tpg_exec(k->c, sql);
    snprintf(sql, sizeof sql, "DELETE FROM ledger WHERE n <= %lld", upto);
    tpg_exec(k->c, sql);
    left = tpg_int(k->c, "SELECT count(*) FROM ledger");
    tpg_exec(k->c, "COMMIT");
    k->checked += (long)n;
    k->windows++;
    return left;
}

static void dump(PGconn *c, const char *sql, const char *arg)
{
    PGresult *r = PQexecParams(c, sql, 1, NULL, &arg, NULL, NULL, 0);

    if (PQresultStatus(r) != PGRES_TUPLES_OK)
        fprintf(stderr, "  (%s: %s)\n", sql, PQerrorMessage(c));
    for (int i = 0; i < PQntuples(r); i++) {
        fprintf(stderr, " ");
        for (int f = 0; f < PQnfields(r); f++)
            fprintf(stderr, " %s=%s", PQfname(r, f),
                    PQgetisnull(r, i, f) ? "NULL" : PQgetvalue(r, i, f));
        fprintf(stderr, "\n");
    }
    PQclear(r);
}

/* When events stay unapplied: which, and where they went. */
static void explain_unapplied(checks *k, tu_cluster *c)
{
    PGresult *r = PQexec(k->c, "SELECT subject_id FROM ledger l WHERE NOT "
                               "EXISTS (SELECT 1 FROM applied a WHERE "
                               "a.event_id = l.event_id) ORDER BY n LIMIT 1");
    char sid[128] = "";

    if (PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) == 1)
        snprintf(sid, sizeof sid, "%s", PQgetvalue(r, 0, 0));
    PQclear(r);
    fprintf(stderr, "soak: first unapplied event's subject %s; its ledger:\n",
            sid);
    dump(k->c,
         "SELECT n, event_id, (SELECT count(*) FROM applied a WHERE "
         "a.event_id = l.event_id) AS applied FROM ledger l WHERE "
         "subject_id = $1 ORDER BY n",
         sid);
    fprintf(stderr, "soak: its inbox row and dead letters:\n");
    dump(k->c, "SELECT * FROM deliveryevents.inbox WHERE subject_id = $1", sid);
    dump(k->c,
         "SELECT * FROM deliveryevents.inbox_dead_letter WHERE subject_id "
         "= $1",
         sid);
    tsk_print_kafka_subject(c, "delivery", sid);
}

/* No event checked since the last sample: says, stamped, which event
 * holds the check up and where it is -- still in the outbox (and
 * whether it has a position yet), or published, and its subject's
 * inbox row -- to read against the faults' and the relays' lines. */
static void note_stall(checks *k)
{
    PGresult *r = PQexec(
        k->c,
        "SELECT l.n, l.subject_id, coalesce((SELECT coalesce(o.position::text, "
        "'none yet') FROM deliveryevents.outbox e LEFT JOIN "
        "deliveryevents.outbox_order o USING (id) WHERE e.event_id = "
        "l.event_id), 'gone from the outbox (published)'), coalesce((SELECT "
        "format('epoch %s, last_seq %s, parked %s, updated %s ms ago', "
        "i.epoch, i.last_seq, i.parked, (extract(epoch FROM now()) * 1000 - "
        "i.updated_ms)::bigint) FROM deliveryevents.inbox i WHERE "
        "i.subject_id = l.subject_id), 'no inbox row') FROM ledger l WHERE "
        "NOT EXISTS (SELECT 1 FROM applied a WHERE a.event_id = l.event_id) "
        "ORDER BY n LIMIT 1");

    if (PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) == 1)
        tsk_note("nothing checked since the last sample: first unapplied "
                 "ledger row %s (subject %s): outbox position %s; inbox: %s",
                 PQgetvalue(r, 0, 0), PQgetvalue(r, 0, 1), PQgetvalue(r, 0, 2),
                 PQgetvalue(r, 0, 3));
    PQclear(r);
}

/* The integer result of sql, or 0 when the table is not there yet. */
static double q_num(PGconn *c, const char *sql)
{
    PGresult *r = PQexec(c, sql);
    double v = 0;

    if (PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) == 1 &&
        !PQgetisnull(r, 0, 0))
        v = strtod(PQgetvalue(r, 0, 0), NULL);
    PQclear(r);
    return v;
}

static void sample(double *v, PGconn *c, pid_t w0, pid_t w1, pid_t con,
                   pid_t side)
{
    v[M_RELAY_RSS] = (double)tsk_proc_status(w0, "VmRSS:");
    v[M_RELAY_FDS] = (double)tsk_open_fds(w0);
    v[M_RELAY_THREADS] = (double)tsk_proc_status(w0, "Threads:");
    v[M_WRITER_RSS] = (double)tsk_proc_status(w1, "VmRSS:");
    v[M_CON_RSS] = (double)tsk_proc_status(con, "VmRSS:");
    v[M_CON_FDS] = (double)tsk_open_fds(con);
    v[M_SIDE_RSS] = (double)tsk_proc_status(side, "VmRSS:");
    v[M_BACKENDS] = q_num(c, "SELECT count(*) FROM pg_catalog.pg_stat_activity "
                             "WHERE datname = current_database() AND "
                             "backend_type = 'client backend'");
    v[M_TABLES] = q_num(c, "SELECT coalesce(sum(pg_catalog."
                           "pg_total_relation_size(c.oid)), 0) / 1024 FROM "
                           "pg_catalog.pg_class c JOIN pg_catalog."
                           "pg_namespace s ON s.oid = c.relnamespace WHERE "
                           "s.nspname = 'deliveryevents' AND c.relkind = 'r'");
    v[M_WAL] = tpg_external() ? 0
                              : q_num(c, "SELECT coalesce(sum(size), 0) / "
                                         "1024 FROM pg_catalog.pg_ls_waldir()");
    v[M_INBOX] = q_num(c, "SELECT count(*) FROM deliveryevents.inbox");
    v[M_OUTBOX] = q_num(c, "SELECT count(*) FROM deliveryevents.outbox");
    v[M_COUNTERS] =
        q_num(c, "SELECT count(*) FROM deliveryevents.relay_subjects");
}

static const char *who(pid_t dead, const pid_t *w, int nw, pid_t con)
{
    static char buf[32];

    if (dead == con)
        return "the consumer";
    for (int i = 0; i < nw; i++)
        if (w[i] == dead) {
            snprintf(buf, sizeof buf, "writer %d", i);
            return buf;
        }
    return "the sidecar";
}

START_TEST(soak_pg)
{
    const char *env = getenv("DE_SOAK_SECONDS");
    tsk_plan p = plan_for(env ? atoi(env) : 150);
    int nw = writers_for(p.seconds), status, restarts = 0, cuts = 0;
    tu_cluster *c = tu_cluster_new(0, 3);
    const char *where;
    char secs[16], conninfo[1100];
    pid_t w[64], con, side;
    int64_t t0, next_sample, next_cut, next_server, quiet_until = 0;
    tsk_faults f;
    tsk_samples s;
    checks k = {0};
    de_outbox *ob = NULL;

    tsk_samples_init(&s, metrics, M_COUNT, &p);
    snprintf(secs, sizeof secs, "%d", p.seconds);
    tu_topic_create(c, "delivery", 4);
    where = tpg_fresh_db();
    snprintf(conninfo, sizeof conninfo, "%s", where);
    k.c = tpg_connect(conninfo);
    tpg_exec(k.c, "CREATE TABLE ledger (n bigserial PRIMARY KEY, event_id "
                  "text NOT NULL, subject_id text NOT NULL)");
    tpg_exec(k.c, "CREATE TABLE applied (an bigserial PRIMARY KEY, event_id "
                  "text NOT NULL, subject_id text NOT NULL, epoch bigint NOT "
                  "NULL, seq bigint NOT NULL)");
    tpg_exec(k.c, "CREATE INDEX applied_id ON applied (event_id)");
    tpg_exec(k.c, "CREATE TABLE checked_last (subject_id text PRIMARY KEY, "
                  "an bigint NOT NULL, epoch bigint NOT NULL, seq bigint NOT "
                  "NULL)");
    /* The outbox's tables, before the writers race to make them. */
    tu_ok(de_outbox_open_pg(k.c, NULL, &ob));
    de_outbox_close(ob);
    for (int i = 0; i < nw; i++)
        w[i] = spawn_writer(i, nw, conninfo, c, secs);
    con = spawn_consumer(conninfo, c, secs);
    side = tsk_spawn_sidecar(&p, "--pg", conninfo, c);
    ck_assert(tu_wait_for(q_num(k.c, "SELECT count(*) FROM pg_catalog."
                                     "pg_tables WHERE schemaname = "
                                     "'deliveryevents' AND tablename IN "
                                     "('inbox', 'relay_subjects')") == 2,
                          60000));
    fprintf(stderr,
            "soak-pg: %d s, %d writers, %d events/s, samples every %d s "
            "after %d s of warm-up; relay forgets after %d s; outages of %d "
            "s every %d s, sidecar killed every %d s, in-process relay "
            "restarted every %d s, connections cut every %d s, server "
            "restarted every %d s%s\n",
            p.seconds, nw, p.rate, p.sample_s, p.warmup_s, p.forget_s,
            p.outage_s, p.outage_every_s, p.kill_every_s, p.restart_every_s,
            cut_every_s(&p), server_restart_every_s(&p),
            tpg_external() ? " (not: an external server)" : "");
    tsk_print_header(&s);
    t0 = tu_now_ms();
    next_sample = t0 + p.sample_s * 1000;
    tsk_faults_start(&f, &p, t0);
    next_cut = t0 + cut_every_s(&p) * 1000;
    next_server = t0 + server_restart_every_s(&p) * 1000;
    while (tu_now_ms() < t0 + p.seconds * 1000LL) {
        int64_t now = tu_now_ms();
        double *v;
        pid_t dead;
        int due;

        /* Any child dying on its own is a failure (the sidecar only when
         * this loop killed it). */
        if ((dead = waitpid(-1, &status, WNOHANG)) > 0)
            ck_abort_msg("%s exited on its own (status %d)",
                         who(dead, w, nw, con), status);
        due = tsk_faults_due(&f, &p, c, now);
        if (due & TSK_KILL_SIDECAR) {
            kill(side, SIGKILL);
            ck_assert_int_eq(waitpid(side, &status, 0), side);
            side = tsk_spawn_sidecar(&p, "--pg", conninfo, c);
        }
        if (due & TSK_RESTART_RELAY)
            kill(w[0], SIGUSR1);
        /* The database's faults wait until a relay just (re)started has
         * its connections: `deliveryevents relay` exits when it cannot
         * connect at its start, as a supervised service does. */
        if (due != 0)
            quiet_until = now + 15000;
        if (now >= next_cut && now >= quiet_until) {
            /* Every other connection to the database, mid-whatever. */
            alive(k.c);
            tsk_note("terminating every client connection");
            tpg_int(k.c, "SELECT count(pg_catalog.pg_terminate_backend(pid)) "
                         "FROM pg_catalog.pg_stat_activity WHERE datname = "
                         "current_database() AND backend_type = 'client "
                         "backend' AND pid <> pg_catalog.pg_backend_pid()");
            cuts++;
            next_cut += cut_every_s(&p) * 1000;
        }
        if (now >= next_server && now >= quiet_until && !tpg_external()) {
            tsk_note("server: pg_ctl %s",
                     restarts % 2 ? "restart -m immediate" : "restart -m fast");
            ck_assert(tpg_server(restarts % 2 ? "restart -m immediate"
                                              : "restart -m fast"));
            tsk_note("server: back");
            restarts++;
            alive(k.c);
            next_server += server_restart_every_s(&p) * 1000;
        }
        v = now >= next_sample ? tsk_sample_row(&s, (now - t0) / 1000) : NULL;
        if (v != NULL) {
            long before = k.checked;
            check_applied(&k);
            if (k.checked == before)
                note_stall(&k);
            sample(v, k.c, w[0], w[1], con, side);
            tsk_print_last(&s, k.checked);
            next_sample += p.sample_s * 1000;
        }
        usleep(50000);
    }
    tsk_faults_end(&f, c);
    /* Stop writing; everything committed must be applied and check out. */
    for (int i = 0; i < nw; i++)
        kill(w[i], SIGTERM);
    for (int i = 0; i < nw; i++) {
        ck_assert_int_eq(waitpid(w[i], &status, 0), w[i]);
        ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 0,
                      "writer %d status %d", i, status);
    }
    if (!tu_wait_for(check_applied(&k) == 0, 120000))
        explain_unapplied(&k, c);
    ck_assert_msg(check_applied(&k) == 0, "events left unapplied: %lld",
                  tpg_int(k.c, "SELECT count(*) FROM ledger"));
    /* Nothing applied that no committed transaction recorded (rolled
     * back, or to a savepoint), and nothing applied again after its
     * check. */
    ck_assert_msg(tpg_int(k.c, "SELECT count(*) FROM applied") == 0,
                  "%lld events applied beyond the ledger",
                  tpg_int(k.c, "SELECT count(*) FROM applied"));
    ck_assert_int_eq(
        tpg_int(k.c, "SELECT count(*) FROM deliveryevents.inbox_dead_letter"),
        0);
    /* The writers did write: half the planned rate at least (rolled back
     * transactions and those cut off count against it). */
    ck_assert_msg(k.checked >= (long)p.rate * p.seconds / 2,
                  "only %ld events checked (planned: %d a second for %d s)",
                  k.checked, p.rate, p.seconds);
    kill(con, SIGTERM);
    kill(side, SIGTERM);
    ck_assert_int_eq(waitpid(con, &status, 0), con);
    ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 0,
                  "consumer status %d", status);
    ck_assert_int_eq(waitpid(side, &status, 0), side);
    fprintf(stderr,
            "soak-pg: %ld events checked in %ld windows: each applied once, "
            "in order, numbered right; %d connection cuts, %d server "
            "restarts\n",
            k.checked, k.windows, cuts, restarts);
    tsk_assert_flat(&s, p.warmup_s);
    PQfinish(k.c);
    tsk_samples_free(&s);
    tu_cluster_destroy(c);
}
END_TEST

static Suite *soak_suite(void)
{
    Suite *s = suite_create("soak_pg");
    TCase *tc = tcase_create("soak_pg");
    const char *env = getenv("DE_SOAK_SECONDS");

    tcase_set_timeout(tc, (env ? atoi(env) : 150) + 600);
    tcase_add_test(tc, soak_pg);
    suite_add_tcase(s, tc);
    return s;
}

int main(int argc, char **argv)
{
    if (argc == 8 && strcmp(argv[1], "--writer") == 0)
        return writer_main(argv + 2);
    if (argc == 6 && strcmp(argv[1], "--consumer") == 0)
        return consumer_main(argv + 2);
    /* A helper process given the wrong arguments must not run the soak
     * (which would start helpers of its own). */
    if (argc > 1) {
        fprintf(stderr, "usage: %s (no arguments)\n", argv[0]);
        return 2;
    }
    /* Autovacuum every second and a checkpoint every 30 s: a soak of a
     * few minutes then shows the steady state of the tables and the WAL
     * that a server reaches over hours with its defaults. */
    tpg_server_options("-c autovacuum_naptime=1 -c checkpoint_timeout=30s");
    return tpg_run(soak_suite());
}

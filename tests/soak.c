/* SPDX-License-Identifier: MIT */
/*
 * soak.c -- years of uptime, compressed: mixed load on an in-process relay
 * and a sidecar relay (one active, one standing by), fresh subjects all the
 * time, subjects returning after they were forgotten, periodic broker
 * outages, relay kills and restarts, and a consumer -- sampling every
 * resource the library could leak and failing if any keeps growing after
 * warm-up.  Every event is checked as it goes: applied once, in each
 * subject's order, numbered 1, 2, 3, ... within each numbering.
 *
 *   make soak        about 30 minutes (DE_SOAK_SECONDS=1800)
 *   make soak-short  2.5 minutes, run by CI
 *
 * Processes: this one owns the mock cluster (3 brokers), injects the
 * faults, samples and checks; a service process (`--service`) writes
 * events with a ledger row in each transaction and runs an in-process
 * relay; `deliveryevents relay` runs as the sidecar; a consumer process
 * (`--consumer`) applies every event into its own database.  Checked rows
 * are deleted from the ledger and the consumer's table, so that the
 * files measure the library's state, not the test's.
 *
 * What "keeps growing" means is in tests/util/soakutil.h; tests/soak_pg.c
 * is the same run on PostgreSQL, with dozens of writer processes.
 */
#include "kafka.h"
#include "soakutil.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

static const char *self_exe = "/proc/self/exe";

/* Events per second the service writes. */
#define SOAK_RATE 100

/* ---- the service process ------------------------------------------------ */

/* --service DIR BOOTSTRAP PREFIX SECONDS: writes deliveries until SIGTERM,
 * with an in-process relay restarted on SIGUSR1. */
static int service_main(char **a)
{
    tsk_plan p = tsk_make_plan(atoi(a[3]), SOAK_RATE);
    sqlite3 *db = NULL;
    de_outbox *ob = NULL;
    de_relay *r;
    tsk_deliveries ds = {0};
    long n = 0;
    int64_t t0 = tu_now_ms();
    char path[4200], id[32];

    tsk_catch_signals();
    snprintf(path, sizeof path, "%s/service.db", a[0]);
    if (sqlite3_open(path, &db) != SQLITE_OK ||
        de_outbox_open(db, NULL, &ob) != DE_OK)
        return 2;
    r = tsk_start_relay(&p, ob, a[1], a[2]);
    while (!tsk_got_term) {
        int64_t now = tu_now_ms();
        tsk_pending d;
        const char *action;

        if (tsk_got_usr1) {
            tsk_got_usr1 = 0;
            de_relay_stop(r, 5000);
            r = tsk_start_relay(&p, ob, a[1], a[2]);
        }
        /* Pace: n events by now. */
        if (n >= (now - t0) * p.rate / 1000) {
            usleep(2000);
            continue;
        }
        action = tsk_next(&ds, now, &d);
        snprintf(id, sizeof id, "S%ld", d.id);
        if (tu_write_raw(db, ob, "delivery", id, action, "{\"soak\":1}", 0) <
            0) {
            fprintf(stderr, "service: write failed: %s / %s\n", de_errmsg(),
                    sqlite3_errmsg(db));
            usleep(100000);
            continue;
        }
        n++;
        tsk_written(&ds, &p, &d, action, now);
    }
    de_relay_stop(r, 20000);
    de_outbox_close(ob);
    sqlite3_close(db);
    tsk_deliveries_free(&ds);
    return 0;
}

/* ---- the consumer process ----------------------------------------------- */

static de_err apply(sqlite3 *db, const de_event_view *ev, void *ctx)
{
    sqlite3_stmt **st = ctx;

    if (*st == NULL &&
        sqlite3_prepare_v3(db,
                           "INSERT INTO applied(event_id, subject_id, epoch, "
                           "seq) VALUES (?1, ?2, ?3, ?4)",
                           -1, SQLITE_PREPARE_PERSISTENT, st,
                           NULL) != SQLITE_OK)
        return DE_ERR_DB;
    sqlite3_bind_text(*st, 1, ev->event_id, -1, SQLITE_STATIC);
    sqlite3_bind_text(*st, 2, ev->subject_id, -1, SQLITE_STATIC);
    sqlite3_bind_int64(*st, 3, ev->subject_epoch);
    sqlite3_bind_int64(*st, 4, ev->subject_seq);
    if (sqlite3_step(*st) != SQLITE_DONE) {
        sqlite3_reset(*st);
        return DE_ERR_DB;
    }
    sqlite3_reset(*st);
    return DE_OK;
}

/* --consumer DIR BOOTSTRAP PREFIX SECONDS: applies until SIGTERM. */
static int consumer_main(char **a)
{
    tsk_plan p = tsk_make_plan(atoi(a[3]), SOAK_RATE);
    char path[4200], tmpl[128], gid[128], forget[32];
    sqlite3 *db = NULL;
    sqlite3_stmt *st = NULL;
    de_conf *conf = de_conf_new();
    de_consumer *c = NULL;

    tsk_catch_signals();
    snprintf(path, sizeof path, "%s/consumer.db", a[0]);
    snprintf(tmpl, sizeof tmpl, "%s{subject_type}.events", a[2]);
    snprintf(gid, sizeof gid, "%ssoak", a[2]);
    /* Past the relay's forget time plus the consumer's worst lag (the
     * rule in docs/OVERVIEW.md).  With broker outages every 45 s and
     * relay kills, that lag went past 20 s in soak-short: three times
     * the relay's 10 s, the first margin chosen, made the consumer
     * forget subjects whose next event was still on its way, and park
     * that event as a gap (never lost, but not applied).  A minute of
     * margin covers it. */
    snprintf(forget, sizeof forget, "%d", (p.forget_s + 60) * 1000);
    /* an: the order of application.  AUTOINCREMENT, because the checker
     * deletes what it checked and compares an across its windows: a plain
     * rowid would be handed out again after the highest rows went. */
    if (sqlite3_open(path, &db) != SQLITE_OK ||
        sqlite3_exec(db,
                     "PRAGMA journal_mode=WAL; CREATE TABLE IF NOT EXISTS "
                     "applied(an INTEGER PRIMARY KEY AUTOINCREMENT, event_id "
                     "TEXT, "
                     "subject_id TEXT, epoch INTEGER, seq INTEGER); CREATE "
                     "INDEX IF NOT EXISTS applied_id ON applied(event_id)",
                     NULL, NULL, NULL) != SQLITE_OK)
        return 2;
    de_conf_set_log_cb(conf, tsk_log, (void *)"consumer");
    if (de_conf_set(conf, "bootstrap.servers", a[1]) != DE_OK ||
        de_conf_set(conf, "group.id", gid) != DE_OK ||
        de_conf_set(conf, "topic.template", tmpl) != DE_OK ||
        de_conf_set(conf, "consumer.subject.forget.ms", forget) != DE_OK ||
        de_consumer_open(db, conf, &c) != DE_OK ||
        de_consumer_on(c, "delivery", NULL, apply, &st) != DE_OK) {
        fprintf(stderr, "consumer: %s\n", de_errmsg());
        return 3;
    }
    de_conf_destroy(conf);
    while (!tsk_got_term)
        if (de_consumer_poll(c, 200, NULL) != DE_OK)
            fprintf(stderr, "consumer: %s\n", de_errmsg());
    sqlite3_finalize(st);
    de_consumer_close(c);
    sqlite3_close(db);
    return 0;
}

/* ---- the parent: faults, samples, checks -------------------------------- */

static pid_t spawn_self(const char *mode, const char *dir, tu_cluster *c,
                        const char *secs)
{
    const char *argv[] = {self_exe,  mode, dir, c->bootstrap,
                          c->prefix, secs, NULL};

    return tsk_spawn(argv);
}

static pid_t sidecar(const tsk_plan *p, tu_cluster *c)
{
    return tsk_spawn_sidecar(p, "--db", tu_path(tu_dir, "service.db"), c);
}

static int64_t file_size(const char *dir, const char *name)
{
    struct stat sb;

    return stat(tu_path(dir, name), &sb) == 0 ? (int64_t)sb.st_size : 0;
}

enum {
    M_SVC_RSS,
    M_SVC_FDS,
    M_SVC_THREADS,
    M_CON_RSS,
    M_CON_FDS,
    M_SIDE_RSS,
    M_DB,
    M_WAL,
    M_STATE,
    M_CDB,
    M_INBOX,
    M_OUTBOX,
    M_COUNTERS,
    M_COUNT
};

static const tsk_metric metrics[M_COUNT] = {
    [M_SVC_RSS] = {"service RSS", "KiB", 4096},
    [M_SVC_FDS] = {"service fds", "", 4},
    [M_SVC_THREADS] = {"service threads", "", 2},
    [M_CON_RSS] = {"consumer RSS", "KiB", 4096},
    [M_CON_FDS] = {"consumer fds", "", 4},
    [M_SIDE_RSS] = {"sidecar RSS", "KiB", 4096},
    [M_DB] = {"database", "KiB", 1024},
    [M_WAL] = {"log (-wal)", "KiB", 9000},
    [M_STATE] = {"relay state", "KiB", 1024},
    [M_CDB] = {"consumer db", "KiB", 1024},
    [M_INBOX] = {"inbox rows", "", 2000},
    [M_OUTBOX] = {"outbox rows", "", 5000},
    [M_COUNTERS] = {"relay counters", "", 2000},
};

typedef struct checks {
    sqlite3 *v; /* the consumer's database, the service's attached */
    long checked, windows;
} checks;

static int64_t q_int(sqlite3 *db, const char *sql)
{
    sqlite3_stmt *st;
    int64_t v = -1;

    if (sqlite3_prepare_v2(db, sql, -1, &st, NULL) == SQLITE_OK &&
        sqlite3_step(st) == SQLITE_ROW)
        v = sqlite3_column_int64(st, 0);
    sqlite3_finalize(st);
    return v;
}

static void dump(sqlite3 *db, const char *sql)
{
    sqlite3_stmt *st;

    if (sqlite3_prepare_v2(db, sql, -1, &st, NULL) != SQLITE_OK) {
        fprintf(stderr, "  (%s: %s)\n", sql, sqlite3_errmsg(db));
        return;
    }
    while (sqlite3_step(st) == SQLITE_ROW) {
        fprintf(stderr, "  ");
        for (int i = 0; i < sqlite3_column_count(st); i++)
            fprintf(stderr, "%s=%s ", sqlite3_column_name(st, i),
                    sqlite3_column_text(st, i)
                        ? (const char *)sqlite3_column_text(st, i)
                        : "NULL");
        fprintf(stderr, "\n");
    }
    sqlite3_finalize(st);
}

/* The events up to ledger row upto that break their subject's order or
 * numbering -- applied before the one before them, or not numbered next
 * to it -- where the one before the first of a window is the subject's
 * last checked in an earlier window (temp.checked_last, n = 0): their
 * `select` (a count, or the rows), at most 20. */
static void order_query(char *sql, size_t size, int64_t upto,
                        const char *select)
{
    snprintf(sql, size,
             "WITH w AS (SELECT l.subject_id, l.n, a.an, a.epoch, a.seq "
             "FROM svc.ledger l JOIN applied a USING (event_id) WHERE "
             "l.n <= %lld), x AS (SELECT * FROM w UNION ALL SELECT "
             "c.subject_id, 0, c.an, c.epoch, c.seq FROM "
             "temp.checked_last c WHERE c.subject_id IN (SELECT "
             "subject_id FROM w)) SELECT %s FROM (SELECT subject_id, n, "
             "an, epoch, seq, lag(an) OVER o AS pan, lag(epoch) OVER o AS "
             "pe, lag(seq) OVER o AS ps FROM x WINDOW o AS (PARTITION BY "
             "subject_id ORDER BY n)) WHERE pan IS NOT NULL AND (pan > an "
             "OR NOT ((epoch = pe AND seq = ps + 1) OR (epoch > pe AND "
             "seq = 1))) LIMIT 20",
             (long long)upto, select);
}

/*
 * Checks the events applied so far, in commit order up to the first one
 * not applied yet: each applied exactly once, each subject's in commit
 * order, numbered 1, 2, 3, ... within a numbering and 1 at each new one
 * -- also across windows: the last event checked of each subject stays
 * in temp.checked_last (the checker's own, not the consumer's file).
 * Then deletes them from the ledger and from the consumer's table.
 * Returns how many remain unapplied.
 */
static int64_t check_applied(checks *k)
{
    int64_t upto, n, left, bad;
    char sql[2048];

    tu_exec(k->v, "BEGIN IMMEDIATE");
    upto = q_int(k->v, "SELECT coalesce((SELECT min(n) - 1 FROM svc.ledger l "
                       "WHERE NOT EXISTS (SELECT 1 FROM applied a WHERE "
                       "a.event_id = l.event_id)), (SELECT max(n) FROM "
                       "svc.ledger), 0)");
    snprintf(sql, sizeof sql, "SELECT count(*) FROM svc.ledger WHERE n <= %lld",
             (long long)upto);
    n = q_int(k->v, sql);
    snprintf(sql, sizeof sql,
             "SELECT count(*) FROM svc.ledger l JOIN applied a USING "
             "(event_id) WHERE l.n <= %lld",
             (long long)upto);
    ck_assert_msg(q_int(k->v, sql) == n,
                  "events up to %lld applied more than once", (long long)upto);
    /* Per subject, in commit order: applied in that order, and numbered
     * (epoch, seq) next to the previous one -- the first of the window
     * next to the last one checked in an earlier window (n = 0). */
    order_query(sql, sizeof sql, upto, "count(*)");
    bad = q_int(k->v, sql);
    ck_assert_msg(bad >= 0, "soak: the order check failed: %s",
                  sqlite3_errmsg(k->v));
    if (bad > 0) {
        order_query(sql, sizeof sql, upto,
                    "subject_id, n, an, epoch, seq, pan, pe, ps");
        fprintf(stderr, "soak: applied out of order or misnumbered (n = 0: "
                        "the last one checked in an earlier window; pan, pe, "
                        "ps: the one before):\n");
        dump(k->v, sql);
        ck_abort_msg("events up to %lld applied out of order or misnumbered",
                     (long long)upto);
    }
    snprintf(sql, sizeof sql,
             "INSERT OR REPLACE INTO temp.checked_last SELECT subject_id, an, "
             "epoch, seq FROM (SELECT l.subject_id, a.an, a.epoch, a.seq, "
             "row_number() OVER (PARTITION BY l.subject_id ORDER BY l.n "
             "DESC) AS r FROM svc.ledger l JOIN applied a USING (event_id) "
             "WHERE l.n <= %lld) WHERE r = 1",
             (long long)upto);
    tu_exec(k->v, sql);
    snprintf(sql, sizeof sql,
             "DELETE FROM applied WHERE event_id IN (SELECT event_id FROM "
             "svc.ledger WHERE n <= %lld); DELETE FROM svc.ledger WHERE n <= "
             "%lld",
             (long long)upto, (long long)upto);
    tu_exec(k->v, sql);
    left = q_int(k->v, "SELECT count(*) FROM svc.ledger");
    tu_exec(k->v, "COMMIT");
    k->checked += n;
    k->windows++;
    return left;
}

/* When events stay unapplied: which, and where they went. */
static void explain_unapplied(checks *k, tu_cluster *c)
{
    char sql[512], sid[128];

    snprintf(sid, sizeof sid, "%s",
             tu_query_text(k->v, "SELECT coalesce((SELECT subject_id FROM "
                                 "svc.ledger l WHERE NOT EXISTS (SELECT 1 "
                                 "FROM applied a WHERE a.event_id = "
                                 "l.event_id) ORDER BY n LIMIT 1), '')"));
    fprintf(stderr, "soak: first unapplied event's subject %s; its ledger:\n",
            sid);
    snprintf(sql, sizeof sql,
             "SELECT n, event_id, action, (SELECT count(*) FROM applied a "
             "WHERE a.event_id = l.event_id) AS applied FROM svc.ledger l "
             "WHERE subject_id = '%s' ORDER BY n",
             sid);
    dump(k->v, sql);
    fprintf(stderr, "soak: its inbox row and dead letters:\n");
    snprintf(sql, sizeof sql, "SELECT * FROM de_inbox WHERE subject_id = '%s'",
             sid);
    dump(k->v, sql);
    snprintf(sql, sizeof sql,
             "SELECT id, kind, state, seq, epoch, event_id, error FROM "
             "de_dead_letter WHERE subject_id = '%s'",
             sid);
    dump(k->v, sql);
    tsk_print_kafka_subject(c, "delivery", sid);
}

START_TEST(soak)
{
    const char *env = getenv("DE_SOAK_SECONDS");
    tsk_plan p = tsk_make_plan(env ? atoi(env) : 150, SOAK_RATE);
    tu_cluster *c = tu_cluster_new(0, 3);
    char secs[16];
    pid_t svc, con, side;
    int64_t t0, next_sample;
    tsk_faults f;
    tsk_samples s;
    checks k = {0};
    sqlite3 *svcdb;
    int status;
    char sql[4300];

    tsk_samples_init(&s, metrics, M_COUNT, &p);
    snprintf(secs, sizeof secs, "%d", p.seconds);
    tu_topic_create(c, "delivery", 4);
    svcdb = tu_open(tu_path(tu_dir, "service.db"));
    tu_ledger_create(svcdb);
    sqlite3_close(svcdb);
    svc = spawn_self("--service", tu_dir, c, secs);
    con = spawn_self("--consumer", tu_dir, c, secs);
    side = sidecar(&p, c);
    ck_assert(tu_wait_for(file_size(tu_dir, "consumer.db") > 0, 30000));
    k.v = tu_open(tu_path(tu_dir, "consumer.db"));
    sqlite3_busy_timeout(k.v, 30000);
    snprintf(sql, sizeof sql, "ATTACH '%s' AS svc",
             tu_path(tu_dir, "service.db"));
    tu_exec(k.v, sql);
    tu_exec(k.v, "CREATE TEMP TABLE checked_last (subject_id TEXT PRIMARY KEY, "
                 "an INTEGER, epoch INTEGER, seq INTEGER)");
    ck_assert(tu_wait_for(q_int(k.v, "SELECT count(*) FROM sqlite_master "
                                     "WHERE name = 'applied'") == 1,
                          30000));
    fprintf(stderr,
            "soak: %d s, %d events/s, samples every %d s after %d s of "
            "warm-up; relay forgets after %d s; outages of %d s every %d "
            "s, sidecar killed every %d s, in-process relay restarted every "
            "%d s\n",
            p.seconds, p.rate, p.sample_s, p.warmup_s, p.forget_s, p.outage_s,
            p.outage_every_s, p.kill_every_s, p.restart_every_s);
    tsk_print_header(&s);
    t0 = tu_now_ms();
    next_sample = t0 + p.sample_s * 1000;
    tsk_faults_start(&f, &p, t0);
    while (tu_now_ms() < t0 + p.seconds * 1000LL) {
        int64_t now = tu_now_ms();
        double *v;
        pid_t dead;
        int due;

        /* Any child dying on its own is a failure (the sidecar only when
         * this loop killed it). */
        if ((dead = waitpid(-1, &status, WNOHANG)) > 0)
            ck_abort_msg("%s exited on its own (status %d)",
                         dead == svc   ? "the service"
                         : dead == con ? "the consumer"
                                       : "the sidecar",
                         status);
        due = tsk_faults_due(&f, &p, c, now);
        if (due & TSK_KILL_SIDECAR) {
            kill(side, SIGKILL);
            ck_assert_int_eq(waitpid(side, &status, 0), side);
            side = sidecar(&p, c);
        }
        if (due & TSK_RESTART_RELAY)
            kill(svc, SIGUSR1);
        v = now >= next_sample ? tsk_sample_row(&s, (now - t0) / 1000) : NULL;
        if (v != NULL) {
            check_applied(&k);
            v[M_SVC_RSS] = (double)tsk_proc_status(svc, "VmRSS:");
            v[M_SVC_FDS] = (double)tsk_open_fds(svc);
            v[M_SVC_THREADS] = (double)tsk_proc_status(svc, "Threads:");
            v[M_CON_RSS] = (double)tsk_proc_status(con, "VmRSS:");
            v[M_CON_FDS] = (double)tsk_open_fds(con);
            v[M_SIDE_RSS] = (double)tsk_proc_status(side, "VmRSS:");
            v[M_DB] = (double)file_size(tu_dir, "service.db") / 1024;
            v[M_WAL] = (double)file_size(tu_dir, "service.db-wal") / 1024;
            v[M_STATE] = (double)(file_size(tu_dir, "service.db-relay") +
                                  file_size(tu_dir, "service.db-relay-wal")) /
                         1024;
            v[M_CDB] = (double)(file_size(tu_dir, "consumer.db") +
                                file_size(tu_dir, "consumer.db-wal")) /
                       1024;
            v[M_INBOX] = (double)q_int(k.v, "SELECT count(*) FROM de_inbox");
            v[M_OUTBOX] =
                (double)q_int(k.v, "SELECT count(*) FROM svc.de_outbox");
            {
                sqlite3 *st = tu_open(tu_path(tu_dir, "service.db-relay"));
                sqlite3_busy_timeout(st, 30000);
                v[M_COUNTERS] =
                    (double)q_int(st, "SELECT count(*) FROM de_relay_seq");
                sqlite3_close(st);
            }
            tsk_print_last(&s, k.checked);
            next_sample += p.sample_s * 1000;
        }
        usleep(50000);
    }
    tsk_faults_end(&f, c);
    /* Stop writing; everything written must be applied and check out. */
    kill(svc, SIGTERM);
    ck_assert_int_eq(waitpid(svc, &status, 0), svc);
    ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 0,
                  "service status %d", status);
    if (!tu_wait_for(check_applied(&k) == 0, 120000))
        explain_unapplied(&k, c);
    ck_assert_msg(check_applied(&k) == 0, "events left unapplied: %lld",
                  (long long)q_int(k.v, "SELECT count(*) FROM svc.ledger"));
    ck_assert_int_eq(q_int(k.v, "SELECT count(*) FROM de_dead_letter"), 0);
    kill(con, SIGTERM);
    kill(side, SIGTERM);
    ck_assert_int_eq(waitpid(con, &status, 0), con);
    ck_assert_int_eq(waitpid(side, &status, 0), side);
    fprintf(stderr,
            "soak: %ld events checked in %ld windows: each applied "
            "once, in order, numbered right\n",
            k.checked, k.windows);
    /* Nothing keeps growing after warm-up. */
    tsk_assert_flat(&s, p.warmup_s);
    sqlite3_close(k.v);
    tsk_samples_free(&s);
    tu_cluster_destroy(c);
}
END_TEST

static Suite *soak_suite(void)
{
    Suite *s = suite_create("soak");
    TCase *tc = tcase_create("soak");
    const char *env = getenv("DE_SOAK_SECONDS");

    tcase_add_checked_fixture(tc, tu_dir_setup, tu_dir_teardown);
    tcase_set_timeout(tc, (env ? atoi(env) : 150) + 600);
    tcase_add_test(tc, soak);
    suite_add_tcase(s, tc);
    return s;
}

int main(int argc, char **argv)
{
    if (argc == 6 && strcmp(argv[1], "--service") == 0)
        return service_main(argv + 2);
    if (argc == 6 && strcmp(argv[1], "--consumer") == 0)
        return consumer_main(argv + 2);
    /* A helper process given the wrong arguments must not run the soak
     * (which would start helpers of its own). */
    if (argc > 1) {
        fprintf(stderr, "usage: %s (no arguments)\n", argv[0]);
        return 2;
    }
    return tu_run(soak_suite()) ? EXIT_FAILURE : EXIT_SUCCESS;
}

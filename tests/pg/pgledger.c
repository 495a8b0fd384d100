/* SPDX-License-Identifier: MIT */
/*
 * pgledger.c -- see pgledger.h.
 */
#include "pgledger.h"
#include "pgserver.h"
#include "testutil.h"

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

void tpg_ledger_setup(PGconn *c)
{
    char sql[200];

    tpg_exec(c, "CREATE TABLE deliveries (id text PRIMARY KEY, "
                "version integer NOT NULL DEFAULT 0)");
    tpg_exec(c, "CREATE TABLE ledger (event_id text PRIMARY KEY, "
                "subject_type text NOT NULL, subject_id text NOT NULL, "
                "version integer NOT NULL, action text NOT NULL, payload "
                "text NOT NULL, occurred_at_ms bigint NOT NULL)");
    snprintf(sql, sizeof sql,
             "INSERT INTO deliveries SELECT 'D-' || i, 0 FROM "
             "generate_series(1, %d) i",
             TPG_SUBJECTS);
    tpg_exec(c, sql);
}

PGconn *tpg_host_open(const char **where, de_outbox **o)
{
    PGconn *c;

    *where = tpg_fresh_db();
    c = tpg_connect(*where);
    tpg_ledger_setup(c);
    tu_ok(de_outbox_open_pg(c, NULL, o));
    return c;
}

void tpg_host_close(PGconn *c, de_outbox *o)
{
    de_outbox_close(o);
    PQfinish(c);
}

static int writer_main(const char *spec);

int tpg_run(Suite *s)
{
    const char *writer = getenv("TPG_WRITER");
    int failed;

    if (writer != NULL) { /* a writer process (tpg_fork_writers) */
        srunner_free(srunner_create(s)); /* frees s: nothing leaks */
        return writer_main(writer);
    }

    if (!tpg_start()) {
        tpg_stop();
        return EXIT_FAILURE;
    }
    failed = tu_run(s);
    tpg_stop();
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}

bool tpg_record_one(PGconn *c, de_outbox *o, int i, unsigned *seed)
{
    char id[32];

    snprintf(id, sizeof id, "D-%d", i);
    return tpg_record_subject(c, o, id, seed);
}

bool tpg_record_subject(PGconn *c, de_outbox *o, const char *id, unsigned *seed)
{
    char payload[64], ver[16], occ[24];
    const char *v[7];
    de_event ev = {0};
    de_recorded rec;
    PGresult *r;
    bool ok;

    v[0] = id;
    r = PQexecParams(c,
                     "UPDATE deliveries SET version = version + 1 WHERE id "
                     "= $1 RETURNING version",
                     1, NULL, v, NULL, NULL, 0);
    ok = PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) == 1;
    if (ok)
        snprintf(ver, sizeof ver, "%s", PQgetvalue(r, 0, 0));
    PQclear(r);
    if (!ok)
        return false;
    snprintf(payload, sizeof payload, "{\"v\":%s,\"r\":%u}", ver,
             rand_r(seed) % 1000);
    ev.subject_type = "delivery";
    ev.subject_id = id;
    ev.action = "assigned";
    ev.payload = payload;
    ev.occurred_at_ms = 1795604400000 + tu_now_ms() % 100000000;
    if (de_record(o, &ev, &rec) != DE_OK)
        return false;
    snprintf(occ, sizeof occ, "%lld", (long long)ev.occurred_at_ms);
    v[0] = rec.event_id;
    v[1] = "delivery";
    v[2] = id;
    v[3] = ver;
    v[4] = "assigned";
    v[5] = payload;
    v[6] = occ;
    r = PQexecParams(c,
                     "INSERT INTO ledger VALUES ($1, $2, $3, $4, $5, $6, $7)",
                     7, NULL, v, NULL, NULL, 0);
    ok = PQresultStatus(r) == PGRES_COMMAND_OK;
    PQclear(r);
    return ok;
}

void tpg_commit_one(PGconn *c, de_outbox *o, int i)
{
    unsigned seed = (unsigned)i;

    tpg_exec(c, "BEGIN");
    ck_assert(tpg_record_one(c, o, i, &seed));
    tpg_exec(c, "COMMIT");
}

bool tpg_cmd(PGconn *c, const char *sql)
{
    PGresult *r = PQexec(c, sql);
    bool ok = PQresultStatus(r) == PGRES_COMMAND_OK;

    PQclear(r);
    return ok;
}

de_err tpg_apply(PGconn *c, const de_event_view *ev, void *table)
{
    const char *v[2] = {ev->subject_id, ev->event_id};
    char sql[200];
    PGresult *r;
    bool ok;

    snprintf(sql, sizeof sql,
             "INSERT INTO %s(subject_id, event_id) VALUES ($1, $2)",
             (const char *)table);
    r = PQexecParams(c, sql, 2, NULL, v, NULL, NULL, 0);
    ok = PQresultStatus(r) == PGRES_COMMAND_OK;
    PQclear(r);
    return ok ? DE_OK : DE_ERR_DB;
}

static int cmp_int(const void *a, const void *b)
{
    return *(const int *)a - *(const int *)b;
}

bool tpg_reconnect(PGconn *c, const char *session_sql)
{
    int64_t deadline = tu_now_ms() + 120000;

    while (PQstatus(c) != CONNECTION_OK) {
        if (tu_now_ms() > deadline)
            return false;
        usleep(20000); /* a helper process retrying, not a test's wait */
        PQreset(c);
    }
    return session_sql == NULL || tpg_cmd(c, session_sql);
}

int tpg_write_txns(const char *where, unsigned seed, int ntx, int max_pause_us,
                   bool reconnect, const char *session_sql)
{
    PGconn *c = PQconnectdb(where);
    de_outbox *o = NULL;
    int committed = -1;

    /* A writer that survives restarts survives one during its own start
     * too: a slow start (a sanitizer build on a busy machine) can meet
     * the restart the test makes once the other writers are going. */
    for (;;) {
        if (reconnect && !tpg_reconnect(c, NULL))
            goto done;
        if (PQstatus(c) == CONNECTION_OK &&
            (session_sql == NULL || tpg_cmd(c, session_sql)) &&
            de_outbox_open_pg(c, NULL, &o) == DE_OK)
            break;
        if (!reconnect || PQstatus(c) == CONNECTION_OK) {
            fprintf(stderr, "writer: cannot start: %s / %s\n",
                    PQerrorMessage(c), de_errmsg());
            goto done;
        }
    }
    committed = 0;
    for (int t = 0; t < ntx; t++) {
        int n = 1 + (int)(rand_r(&seed) % 3), subj[3];
        bool rollback = rand_r(&seed) % 6 == 0;
        bool savepoint = rand_r(&seed) % 5 == 0, ok;

        if (reconnect && PQstatus(c) != CONNECTION_OK &&
            !tpg_reconnect(c, session_sql))
            break;
        ok = tpg_cmd(c, "BEGIN");
        for (int i = 0; i < n; i++)
            subj[i] = 1 + (int)(rand_r(&seed) % TPG_SUBJECTS);
        qsort(subj, (size_t)n, sizeof subj[0], cmp_int);
        for (int i = 0; i < n && ok; i++)
            ok = tpg_record_one(c, o, subj[i], &seed);
        if (ok && savepoint) {
            /* The last subject again: already locked, no deadlock. */
            ok = tpg_cmd(c, "SAVEPOINT s") &&
                 tpg_record_one(c, o, subj[n - 1], &seed);
            ok = tpg_cmd(c, "ROLLBACK TO SAVEPOINT s") && ok;
        }
        if (max_pause_us > 0)
            usleep((useconds_t)(rand_r(&seed) % (unsigned)max_pause_us));
        if (ok && !rollback && tpg_cmd(c, "COMMIT")) {
            committed++;
        } else {
            PQclear(PQexec(c, "ROLLBACK"));
        }
    }
done:
    de_outbox_close(o);
    PQfinish(c);
    return committed;
}

/* The writer processes are the suite's binary executed again (not a bare
 * fork: the test process has threads -- the relay's, the mock cluster's
 * -- and a fork of it may inherit a lock one of them held, e.g. in the
 * allocator, and hang); tpg_run sees TPG_WRITER and runs the writer. */
void tpg_fork_writers(const char *where, int n, int ntx, int max_pause_us,
                      bool reconnect, pid_t *pids)
{
    extern char **environ;
    size_t envc = 0;
    char **envp, spec[1100];
    char *const argv[] = {"tpg-writer", NULL};

    /* The environment plus TPG_WRITER, built before fork: the child only
     * calls execve (setenv here would race the threads' getenv). */
    while (environ[envc] != NULL)
        envc++;
    envp = calloc(envc + 2, sizeof *envp);
    ck_assert_ptr_nonnull(envp);
    memcpy(envp, environ, envc * sizeof *envp);
    envp[envc] = spec;
    for (int w = 0; w < n; w++) {
        snprintf(spec, sizeof spec, "TPG_WRITER=%u %d %d %d %s",
                 1000u + (unsigned)w * 7919u + (unsigned)getpid(), ntx,
                 max_pause_us, reconnect ? 1 : 0, where);
        pids[w] = fork();
        ck_assert_int_ge(pids[w], 0);
        if (pids[w] == 0) {
            execve("/proc/self/exe", argv, envp);
            _exit(127);
        }
    }
    free(envp);
}

/* The writer process tpg_fork_writers started: its exit status. */
static int writer_main(const char *spec)
{
    unsigned seed;
    int ntx, pause_us, reconnect, at = 0;

    if (sscanf(spec, "%u %d %d %d %n", &seed, &ntx, &pause_us, &reconnect,
               &at) != 4 ||
        at == 0)
        return 2;
    return tpg_write_txns(spec + at, seed, ntx, pause_us, reconnect != 0,
                          NULL) < 0
               ? 1
               : 0;
}

int tpg_writers_running(int n, const pid_t *pids)
{
    int running = 0;

    for (int w = 0; w < n; w++) {
        siginfo_t si;
        memset(&si, 0, sizeof si);
        /* WNOWAIT: an exited writer stays for tpg_wait_writers. */
        running += waitid(P_PID, (id_t)pids[w], &si,
                          WEXITED | WNOHANG | WNOWAIT) == 0 &&
                   si.si_pid == 0;
    }
    return running;
}

void tpg_wait_writers(int n, const pid_t *pids)
{
    for (int w = 0; w < n; w++) {
        int status = 0;
        ck_assert_int_eq(waitpid(pids[w], &status, 0), pids[w]);
        ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 0,
                      "writer %d failed (status %d)", w, status);
    }
}

void tpg_ledger_append(PGconn *c, sqlite3 *db)
{
    sqlite3_stmt *st;
    PGresult *r = PQexec(c, "SELECT event_id, subject_type, subject_id, "
                            "action, payload, occurred_at_ms FROM ledger "
                            "ORDER BY subject_type, subject_id, version");

    ck_assert_int_eq(PQresultStatus(r), PGRES_TUPLES_OK);
    tu_ledger_create(db);
    ck_assert_int_eq(sqlite3_prepare_v2(db,
                                        "INSERT INTO ledger(event_id, "
                                        "subject_type, subject_id, action, "
                                        "payload, occurred_at_ms) SELECT ?1, "
                                        "?2, ?3, ?4, ?5, ?6 WHERE NOT EXISTS "
                                        "(SELECT 1 FROM ledger WHERE "
                                        "event_id = ?1)",
                                        -1, &st, NULL),
                     SQLITE_OK);
    for (int i = 0; i < PQntuples(r); i++) {
        for (int col = 0; col < 5; col++)
            sqlite3_bind_text(st, col + 1, PQgetvalue(r, i, col), -1,
                              SQLITE_STATIC);
        sqlite3_bind_int64(st, 6, strtoll(PQgetvalue(r, i, 5), NULL, 10));
        ck_assert_int_eq(sqlite3_step(st), SQLITE_DONE);
        sqlite3_reset(st);
    }
    sqlite3_finalize(st);
    PQclear(r);
}

tu_check tpg_check_ledger(tu_cluster *k, sqlite3 *ledger)
{
    tu_check res = tu_check_topics(k, ledger, "/test/relay", "");

    if (getenv("DE_TEST_LOG"))
        fprintf(stderr,
                "check: %ld messages, %ld unique of %ld, %ld duplicates, "
                "%ld ahead, %ld problems %s\n",
                res.messages, res.unique, res.expected, res.duplicates,
                res.ahead, res.problems, res.first_problem);
    return res;
}

tu_check tpg_check(PGconn *c, tu_cluster *k)
{
    sqlite3 *ledger = NULL;
    tu_check res;

    ck_assert_int_eq(sqlite3_open(":memory:", &ledger), SQLITE_OK);
    tpg_ledger_append(c, ledger);
    res = tpg_check_ledger(k, ledger);
    sqlite3_close(ledger);
    return res;
}

void tpg_stop_and_check(de_relay *r, PGconn *c, tu_cluster *k)
{
    tu_ok(de_relay_flush(r, 120000));
    tu_ok(de_relay_stop(r, 10000));
    tu_check res = tpg_check(c, k);
    tu_assert_check(&res);
    ck_assert_int_le(res.duplicates, 20000); /* relay.max.inflight */
}

long long tpg_published_cursor(PGconn *c)
{
    if (tpg_int(c, "SELECT count(*) FROM pg_catalog.pg_tables WHERE "
                   "schemaname = 'deliveryevents' AND tablename = "
                   "'relay_state'") != 1)
        return 0;
    return tpg_int(c, "SELECT coalesce((SELECT value::bigint FROM "
                      "deliveryevents.relay_state WHERE key = 'cursor'), 0)");
}

long long tpg_max_position(PGconn *c)
{
    return tpg_int(c, "SELECT coalesce(max(position), 0) FROM "
                      "deliveryevents.outbox_order");
}

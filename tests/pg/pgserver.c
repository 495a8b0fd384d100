/* SPDX-License-Identifier: MIT */
/*
 * pgserver.c -- see pgserver.h.  pg_ctl -w waits until the server accepts
 * connections (no guessed sleeps); the socket lives in the cluster's own
 * directory, so the port number cannot clash with another server.
 */
#include "pgserver.h"
#include "powercut.h"

#include <check.h>
#include <fcntl.h>
#include <signal.h>
#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define PG_PORT 54329

static char dir[256];
static char base_conninfo[512];
static char as_user[64];        /* "runuser -u postgres -- " as root, else "" */
static char extra_options[200]; /* tpg_server_options() */
static bool external;
static pid_t owner; /* the process that started the server */
/* The server's options, for a start after a stop (pg_ctl restart reads
 * them back from postmaster.opts by itself). */
static char opts[600];
/* "env LD_PRELOAD=... " before pg_ctl once tpg_power_cut_arm ran. */
static char preload[1200];

/* At exit of the process that started it (not of Check's forked tests,
 * which inherit the handler). */
static void stop_at_exit(void)
{
    if (getpid() == owner)
        tpg_stop();
}

/* Runs cmd through the shell, as the server's user. */
static int run(const char *cmd)
{
    char full[4200];

    snprintf(full, sizeof full, "%s%s", as_user, cmd);
    return system(full);
}

/* A server's options: TCP off, the socket in the cluster's directory,
 * the suite's settings (a standby gets them too: a hot standby needs
 * max_connections, max_prepared_transactions ... at least as high). */
static void server_options(char *buf, size_t size, int port)
{
    snprintf(buf, size,
             "-c listen_addresses='' -k %s -p %d -c max_connections=200 "
             "-c track_commit_timestamp=on %s",
             dir, port, extra_options);
}

bool tpg_start(void)
{
    const char *ext = getenv("DE_PG_CONNINFO");
    const char *tmp = getenv("TMPDIR");
    char cmd[1400];

    if (ext != NULL && *ext != '\0') {
        external = true;
        snprintf(base_conninfo, sizeof base_conninfo, "%s", ext);
        return true;
    }
    snprintf(dir, sizeof dir, "%s/de-pg-XXXXXX", tmp ? tmp : "/tmp");
    /* A program that exits without tpg_stop (a failed assertion outside
     * a test) still stops its server; only abort() or a signal leaves it
     * running (pg_ctl -D <dir>/data stop, then remove <dir>). */
    owner = getpid();
    atexit(stop_at_exit);
    if (mkdtemp(dir) == NULL) {
        perror("tpg_start: mkdtemp");
        return false;
    }
    if (geteuid() == 0) {
        struct passwd *pw = getpwnam("postgres");
        if (pw == NULL || chown(dir, pw->pw_uid, pw->pw_gid) != 0) {
            fprintf(stderr, "tpg_start: running as root needs the OS user "
                            "'postgres' to run the server\n");
            return false;
        }
        snprintf(as_user, sizeof as_user, "runuser -u postgres -- ");
    }
    snprintf(cmd, sizeof cmd,
             TPG_BIN "/initdb -D %s/data -A trust -U postgres -E UTF8 "
                     "--locale=C --no-sync >%s/initdb.log 2>&1",
             dir, dir);
    if (run(cmd) != 0) {
        fprintf(stderr, "tpg_start: initdb failed, see %s/initdb.log\n", dir);
        return false;
    }
    server_options(opts, sizeof opts, PG_PORT);
    if (!tpg_server("start")) {
        fprintf(stderr, "tpg_start: pg_ctl start failed, see %s/server.log\n",
                dir);
        return false;
    }
    snprintf(base_conninfo, sizeof base_conninfo,
             "host=%s port=%d user=postgres", dir, PG_PORT);
    return true;
}

bool tpg_external(void)
{
    return external;
}

bool tpg_server(const char *action)
{
    char cmd[4000];

    if (external || dir[0] == '\0')
        return false;
    /* -w: start and restart return once the server accepts connections
     * (after crash recovery), stop once it is gone. */
    snprintf(cmd, sizeof cmd,
             "%s" TPG_BIN "/pg_ctl -D %s/data -w -t 120 -l %s/server.log%s%s%s "
             "%s >/dev/null",
             preload, dir, dir, strcmp(action, "start") == 0 ? " -o \"" : "",
             strcmp(action, "start") == 0 ? opts : "",
             strcmp(action, "start") == 0 ? "\"" : "", action);
    if (run(cmd) == 0)
        return true;
    /* What the server said, for the failing test's log. */
    snprintf(cmd, sizeof cmd, "tail -n 20 '%s/server.log' >&2", dir);
    (void)system(cmd);
    return false;
}

/* An empty journal directory for the shim. */
static bool clear_journals(void)
{
    char cmd[800];

    /* Two commands: run() makes only the first the server's user's. */
    snprintf(cmd, sizeof cmd, "rm -rf '%s/journal'", dir);
    if (run(cmd) != 0)
        return false;
    snprintf(cmd, sizeof cmd, "mkdir '%s/journal'", dir);
    return run(cmd) == 0;
}

bool tpg_power_cut_arm(void)
{
    char self[600], lock[300], *slash;
    ssize_t n;

    if (external || dir[0] == '\0')
        return false;
    /* The shim is built beside the test programs. */
    n = readlink("/proc/self/exe", self, sizeof self - 1);
    if (n <= 0)
        return false;
    self[n] = '\0';
    if ((slash = strrchr(self, '/')) == NULL)
        return false;
    snprintf(slash, sizeof self - (size_t)(slash - self),
             "/libtpg_powercut.so");
    /* Stopped, then started with no journal left from before: the
     * server without the shim may have given their inodes to other
     * files since. */
    if (!tpg_server("stop -m fast") || !clear_journals())
        return false;
    snprintf(lock, sizeof lock, "%s/journal/lock", dir);
    snprintf(preload, sizeof preload,
             "env 'LD_PRELOAD=%s' 'DE_PC_DATA=%s/data' "
             "'DE_PC_JOURNAL=%s/journal' ",
             self, dir, dir);
    if (!tpg_server("start"))
        return false;
    /* The postmaster writes its pid file through the shim, which makes
     * the lock: without it the loader ignored the shim (say, a path the
     * server's user cannot read) and a cut would be a mere crash. */
    if (access(lock, F_OK) != 0) {
        fprintf(stderr, "tpg_power_cut_arm: the server did not load %s\n",
                self);
        return false;
    }
    return true;
}

bool tpg_power_cut_disarm(void)
{
    if (preload[0] == '\0')
        return true;
    preload[0] = '\0';
    return tpg_server("restart -m fast") && clear_journals();
}

bool tpg_stop_server_process(PGconn *c, pid_t pid)
{
    char sql[200];

    /* Stopped holding a lock -- PostgreSQL's WALWriteLock between its
     * write and its fsync, the shim's -- it would stop every process
     * that needs it: stopped only while it waits in its main loop
     * (wait_event_type Activity), where it holds none, else let go
     * and stopped again a moment later. */
    snprintf(sql, sizeof sql,
             "SELECT (wait_event_type IS NOT DISTINCT FROM 'Activity')::int "
             "FROM pg_catalog.pg_stat_activity WHERE pid = %d",
             (int)pid);
    for (int tries = 0; tries < 10000; tries++) {
        struct timespec ms = {0, 1000000};
        if (!tpc_stop_process(pid))
            return false;
        if (tpg_int(c, sql) == 1)
            return true;
        (void)kill(pid, SIGCONT);
        nanosleep(&ms, NULL);
    }
    fprintf(stderr,
            "tpg_stop_server_process: %d never waited in its main "
            "loop\n",
            (int)pid);
    return false;
}

bool tpg_power_cut(long long *undone, long long *wal)
{
    char pid_file[300], path[300];
    long pid = 0;
    FILE *f;

    *undone = -1;
    if (preload[0] == '\0')
        return false;
    snprintf(pid_file, sizeof pid_file, "%s/data/postmaster.pid", dir);
    if ((f = fopen(pid_file, "r")) == NULL)
        return false;
    if (fscanf(f, "%ld", &pid) != 1 || pid <= 0) {
        fclose(f);
        return false;
    }
    fclose(f);
    if (!tpc_kill_server((pid_t)pid))
        return false;
    /* After a real cut no process has the pid its lock files name;
     * here the postmaster may linger as a zombie until reaped, which a
     * new one would take for a running server. */
    if (unlink(pid_file) != 0)
        return false;
    snprintf(path, sizeof path, "%s/.s.PGSQL.%d.lock", dir, PG_PORT);
    (void)unlink(path);
    snprintf(path, sizeof path, "%s/journal", dir);
    snprintf(pid_file, sizeof pid_file, "%s/data", dir);
    *undone = tpc_restore(pid_file, path, wal);
    return *undone >= 0;
}

void tpg_server_options(const char *options)
{
    snprintf(extra_options, sizeof extra_options, "%s", options);
}

void tpg_stop(void)
{
    char cmd[600];

    if (external || dir[0] == '\0')
        return;
    tpg_standby_stop();
    snprintf(cmd, sizeof cmd,
             TPG_BIN "/pg_ctl -D %s/data -m immediate -w stop >/dev/null 2>&1",
             dir);
    if (run(cmd) != 0)
        fprintf(stderr, "tpg_stop: pg_ctl stop failed in %s\n", dir);
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    if (system(cmd) != 0)
        fprintf(stderr, "tpg_stop: cannot remove %s\n", dir);
    dir[0] = '\0';
}

const char *tpg_standby_start(const char *name)
{
    static char conninfo[512];
    char cmd[2000], options[800];

    if (external || dir[0] == '\0')
        return NULL;
    if (!tpg_standby_stop()) {
        fprintf(stderr, "tpg_standby_start: a standby still runs in %s\n", dir);
        return NULL;
    }
    snprintf(cmd, sizeof cmd, "rm -rf '%s/standby'", dir);
    (void)run(cmd);
    /* -R: standby.signal and primary_conninfo written; -X stream: the
     * WAL of the copy itself comes with it. */
    snprintf(cmd, sizeof cmd,
             TPG_BIN
             "/pg_basebackup -h %s -p %d -U postgres -D %s/standby "
             "-X stream -R --checkpoint=fast --no-sync >%s/basebackup.log 2>&1",
             dir, PG_PORT, dir, dir);
    if (run(cmd) != 0) {
        fprintf(stderr,
                "tpg_standby_start: pg_basebackup failed, see "
                "%s/basebackup.log\n",
                dir);
        return NULL;
    }
    /* -w: until it accepts read-only connections. */
    server_options(options, sizeof options, PG_PORT + 1);
    snprintf(cmd, sizeof cmd,
             TPG_BIN "/pg_ctl -D %s/standby -w -t 120 -l %s/standby.log -o "
                     "\"%s -c cluster_name=%s\" start >/dev/null",
             dir, dir, options, name);
    if (run(cmd) != 0) {
        fprintf(stderr,
                "tpg_standby_start: pg_ctl start failed, see "
                "%s/standby.log\n",
                dir);
        return NULL;
    }
    snprintf(conninfo, sizeof conninfo, "host=%s port=%d user=postgres", dir,
             PG_PORT + 1);
    return conninfo;
}

/* By its pid file, not by a flag: the standby is started in a test's
 * process, and the suite's process stops it with the server when the
 * test could not. */
bool tpg_standby_stop(void)
{
    char pid_file[300], cmd[600];

    if (external || dir[0] == '\0')
        return true;
    snprintf(pid_file, sizeof pid_file, "%s/standby/postmaster.pid", dir);
    if (access(pid_file, F_OK) != 0)
        return true;
    snprintf(cmd, sizeof cmd,
             TPG_BIN "/pg_ctl -D %s/standby -m immediate -w stop >/dev/null "
                     "2>&1",
             dir);
    if (run(cmd) != 0)
        fprintf(stderr, "tpg_standby_stop: pg_ctl stop failed in %s\n", dir);
    return access(pid_file, F_OK) != 0;
}

bool tpg_standby_promote(void)
{
    char cmd[600];

    if (external || dir[0] == '\0')
        return false;
    snprintf(cmd, sizeof cmd,
             TPG_BIN "/pg_ctl -D %s/standby -w -t 120 promote >/dev/null", dir);
    return run(cmd) == 0;
}

const char *tpg_failover_conninfo(const char *dbname)
{
    static char conninfo[700];

    snprintf(conninfo, sizeof conninfo,
             "host=%s,%s port=%d,%d user=postgres dbname=%s "
             "target_session_attrs=read-write",
             dir, dir, PG_PORT, PG_PORT + 1, dbname);
    return conninfo;
}

PGconn *tpg_connect(const char *conninfo)
{
    PGconn *c = PQconnectdb(conninfo);

    /* ck_abort_msg only on failure: the benchmark calls this outside
     * any test, where Check's passing assertions cannot report. */
    if (PQstatus(c) != CONNECTION_OK)
        ck_abort_msg("cannot connect to %s: %s", conninfo, PQerrorMessage(c));
    return c;
}

void tpg_exec(PGconn *c, const char *sql)
{
    PGresult *r = PQexec(c, sql);
    ExecStatusType st = PQresultStatus(r);

    if (st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK)
        ck_abort_msg("%s: %s", sql, PQresultErrorMessage(r));
    PQclear(r);
}

long long tpg_int(PGconn *c, const char *sql)
{
    PGresult *r = PQexec(c, sql);
    long long v;

    if (PQresultStatus(r) != PGRES_TUPLES_OK || PQntuples(r) != 1)
        ck_abort_msg("%s: %s", sql, PQresultErrorMessage(r));
    v = PQgetisnull(r, 0, 0) ? 0 : atoll(PQgetvalue(r, 0, 0));
    PQclear(r);
    return v;
}

/* The databases this process made on an external server, dropped when
 * it exits (drop_at_exit): the suite's own server goes with its
 * directory, an external one would keep a database per test. */
static char made[64][32];
static int made_n;
static pid_t made_by;

static void drop_at_exit(void)
{
    char admin[600], sql[128];
    PGconn *c;

    /* Not in a child forked by a test (writers): it inherits the list
     * while its parent still uses the databases. */
    if (getpid() != made_by || made_n == 0)
        return;
    snprintf(admin, sizeof admin, "%s dbname=postgres", base_conninfo);
    c = PQconnectdb(admin);
    if (PQstatus(c) != CONNECTION_OK)
        fprintf(stderr,
                "pgserver: cannot drop this process's %d test "
                "database(s): %s",
                made_n, PQerrorMessage(c));
    for (int i = 0; PQstatus(c) == CONNECTION_OK && i < made_n; i++) {
        /* FORCE: a relay or consumer the test left running. */
        PGresult *r;
        snprintf(sql, sizeof sql, "DROP DATABASE IF EXISTS %s WITH (FORCE)",
                 made[i]);
        r = PQexec(c, sql);
        if (PQresultStatus(r) != PGRES_COMMAND_OK)
            fprintf(stderr, "pgserver: %s: %s", sql, PQresultErrorMessage(r));
        PQclear(r);
    }
    PQfinish(c);
    made_n = 0;
}

const char *tpg_fresh_db(void)
{
    static char conninfo[700];
    static int n;
    char name[32], sql[128], admin[600];
    PGconn *c;

    snprintf(name, sizeof name, "de_t%d_%d", (int)getpid(), ++n);
    snprintf(admin, sizeof admin, "%s dbname=postgres", base_conninfo);
    c = tpg_connect(admin);
    snprintf(sql, sizeof sql, "CREATE DATABASE %s", name);
    tpg_exec(c, sql);
    PQfinish(c);
    if (external) {
        if (made_by != getpid()) { /* a new process (Check forks one) */
            made_by = getpid();
            made_n = 0;
            atexit(drop_at_exit);
        }
        if (made_n < (int)(sizeof made / sizeof made[0]))
            snprintf(made[made_n++], sizeof made[0], "%s", name);
    }
    snprintf(conninfo, sizeof conninfo, "%s dbname=%s", base_conninfo, name);
    return conninfo;
}

const char *tpg_base_conninfo(void)
{
    return base_conninfo;
}

/* SPDX-License-Identifier: MIT */
/*
 * pgserver.h -- a real PostgreSQL server for the PostgreSQL suites: a
 * throwaway cluster of the suite's own (initdb into a temp dir, pg_ctl on
 * a unix socket inside that dir, TCP off), or the external server that
 * DE_PG_CONNINFO names.  As root the cluster runs as the `postgres` OS
 * user (PostgreSQL refuses to run as root).
 */
#ifndef DE_PGSERVER_H
#define DE_PGSERVER_H

#include <check.h>
#include <libpq-fe.h>
#include <stdbool.h>
#include <sys/types.h>

/* Where initdb and pg_ctl are: the Makefile passes `pg_config --bindir`;
 * Debian 12's PostgreSQL 15 otherwise. */
#ifndef TPG_BIN
#define TPG_BIN "/usr/lib/postgresql/15/bin"
#endif

/* Adds server settings ("-c name=value ...") to the suite's own server;
 * before tpg_start.  Ignored for an external server. */
void tpg_server_options(const char *opts);

/* Starts the suite's server (once per process; call from an unchecked
 * fixture, i.e. in the parent).  Returns false with a reason on stderr. */
bool tpg_start(void);
/* Stops and removes the cluster (nothing for an external server). */
void tpg_stop(void);

/* Whether the server is DE_PG_CONNINFO's, which the suites cannot stop
 * or restart. */
bool tpg_external(void);
/* pg_ctl <action> on the suite's own server ("restart -m immediate",
 * "stop -m immediate", "start", ...), waiting until it is done (-w);
 * false when it failed or the server is external. */
bool tpg_server(const char *action);

/* Restarts the suite's own server with the power-cut shim preloaded
 * (tests/pg/shim/powercut.c, built beside the test programs as
 * libtpg_powercut.so): from then on the server's writes to its data
 * directory that no fsync has made durable can be taken back.  false on
 * an external server or when the shim or the restart failed. */
bool tpg_power_cut_arm(void);
/* Restarts the server without the shim (the settings a case changed
 * are its own to reset). */
bool tpg_power_cut_disarm(void);
/* A power cut of the armed server: every server process stopped at one
 * instant and killed, then every write no fsync covered taken back, as
 * a machine losing power loses its page cache (what the shim does not
 * take back: tests/pg/shim/powercut.c).  The server is left down; start
 * it with tpg_server("start"), which runs crash recovery.  *undone
 * receives the bytes taken back, *wal those of them in pg_wal.  false
 * when it could not be done. */
bool tpg_power_cut(long long *undone, long long *wal);
/* Stops one of the server's auxiliary processes (SIGSTOP; the WAL
 * writer, say) at a moment it waits in its main loop, as c's
 * pg_stat_activity shows, so that it holds no lock other processes
 * need (PostgreSQL's, or the power-cut shim's); waits until it is
 * stopped.  false when it could not be done. */
bool tpg_stop_server_process(PGconn *c, pid_t pid);

/* A streaming standby of the suite's own server (pg_basebackup of the
 * running server, started on the next port in the same directory) with
 * cluster_name `name` -- the application_name its WAL receiver shows the
 * server, for synchronous_standby_names.  Returns its conninfo without a
 * database name (static), NULL when it cannot be had (external server,
 * or a failure said on stderr).  Stopped by tpg_standby_stop, or with
 * the server by tpg_stop. */
const char *tpg_standby_start(const char *name);
/* True when no standby runs (any more). */
bool tpg_standby_stop(void);
/* Promotes the standby (pg_ctl promote, waiting until it accepts
 * writes): a failover.  false when it failed. */
bool tpg_standby_promote(void);
/* A conninfo naming the server, then its standby, with
 * target_session_attrs=read-write -- libpq connects to whichever of them
 * accepts writes, the promoted standby after a failover -- and dbname
 * (static). */
const char *tpg_failover_conninfo(const char *dbname);

/* The conninfo of the server without a database name (static). */
const char *tpg_base_conninfo(void);

/* A fresh database for the calling test ("de_t<pid>_<n>"), created on the
 * server; its conninfo in a static buffer.  On an external server
 * (DE_PG_CONNINFO) the process that made it drops it when it exits. */
const char *tpg_fresh_db(void);

/* Connects to conninfo, failing the test on error. */
PGconn *tpg_connect(const char *conninfo);

/* Runs sql, failing the test unless it succeeds. */
void tpg_exec(PGconn *c, const char *sql);
/* The single integer result of sql; fails the test on error. */
long long tpg_int(PGconn *c, const char *sql);

#endif

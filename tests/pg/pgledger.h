/* SPDX-License-Identifier: MIT */
/*
 * pgledger.h -- the host side of the PostgreSQL relay suites
 * (check_pg_relay.c, check_pg_faults.c): writers that record events
 * through de_record and, in the same transactions, bump the subject's
 * row (deliveries.version) and write that version into the host's own
 * ledger; and the independent check of a topic against that ledger.
 *
 * The row lock orders the transactions of one subject, so the ledger's
 * versions are the subject's commit order, and the ledger holds exactly
 * what committed (rolled-back transactions and savepoints take their
 * ledger rows with them).  tu_check_topics (tests/util/kafka.c) then
 * checks: every committed event arrived, nothing else did, each
 * subject's ce_subjectseq runs 1, 2, 3, ... in that order, duplicates
 * repeat the same ce_id with the same number.
 */
#ifndef DE_PGLEDGER_H
#define DE_PGLEDGER_H

#include "deliveryevents_pg.h"
#include "kafka.h"

#include <stdbool.h>
#include <sys/types.h>

/* Subjects D-1 .. D-TPG_SUBJECTS. */
#define TPG_SUBJECTS 40

/* The host's tables (deliveries, ledger) in the database of c. */
void tpg_ledger_setup(PGconn *c);

/* A fresh database with the host's tables and an outbox open on a new
 * connection to it (returned); *where receives its conninfo (static:
 * valid until the next tpg_fresh_db).  tpg_host_close undoes it. */
PGconn *tpg_host_open(const char **where, de_outbox **o);
void tpg_host_close(PGconn *c, de_outbox *o);

/* A PostgreSQL suite's main: starts the server (tpg_start), runs s,
 * stops the server; the exit status.  In a writer process that
 * tpg_fork_writers started (the suite's binary again), it runs the
 * writer instead. */
int tpg_run(Suite *s);

/* Inside the open transaction on c: bumps subject i's row and records one
 * event for it, with the row's new version in the host's ledger.  false
 * when something failed (the transaction is then to be rolled back). */
bool tpg_record_one(PGconn *c, de_outbox *o, int i, unsigned *seed);
/* tpg_record_one for the subject id (a row of deliveries with that id
 * must exist). */
bool tpg_record_subject(PGconn *c, de_outbox *o, const char *id,
                        unsigned *seed);

/* One transaction on c recording one event for subject D-<i>; fails the
 * test unless it commits. */
void tpg_commit_one(PGconn *c, de_outbox *o, int i);

/* A command's success (no test assertion: for helper processes). */
bool tpg_cmd(PGconn *c, const char *sql);

/* In a helper process: resets a connection the server dropped, until it
 * is back (120 s at most: the server is restarting, or in crash
 * recovery); then runs session_sql (NULL: none).  false when it gave
 * up. */
bool tpg_reconnect(PGconn *c, const char *session_sql);

/* A consumer's handler (de_consumer_on_pg) that inserts the event's
 * (subject_id, event_id) into the table named by table (a const char *,
 * schema-qualified if need be, with those two text columns), in the
 * consumer's transaction; DE_ERR_DB when the INSERT fails (e.g. a
 * unique violation, or a privilege the role lacks). */
de_err tpg_apply(PGconn *c, const de_event_view *ev, void *table);

/*
 * ntx transactions of 1-3 events for random subjects (locked in
 * ascending order, so that writers never deadlock), a random pause of up
 * to max_pause_us before COMMIT, one in six rolled back, one in five
 * with a savepoint holding an extra event that is rolled back.  With
 * reconnect, a connection the server dropped (a restart) is reset and
 * the writer goes on (giving up after 120 s without a connection);
 * session_sql (NULL: none) runs after each connect.  Returns the number
 * of transactions that committed as far as the writer knows, or -1 when
 * the connection or outbox could not be opened.
 */
int tpg_write_txns(const char *where, unsigned seed, int ntx, int max_pause_us,
                   bool reconnect, const char *session_sql);

/* Forks n writer processes running tpg_write_txns; *pids receives them. */
void tpg_fork_writers(const char *where, int n, int ntx, int max_pause_us,
                      bool reconnect, pid_t *pids);
/* How many of the n writers have not exited yet (none is collected:
 * tpg_wait_writers still is to be called). */
int tpg_writers_running(int n, const pid_t *pids);
/* Waits for them; fails the test unless each exited 0. */
void tpg_wait_writers(int n, const pid_t *pids);

/* Appends the ledger of c's database, per subject in version (= commit)
 * order, to the SQLite ledger db (tu_ledger_create's table), skipping
 * events already there: a ledger copied before a restore, then the
 * restored database's, make one commit order. */
void tpg_ledger_append(PGconn *c, sqlite3 *db);

/* tu_check_topics against ledger (a copy made by tpg_ledger_append), the
 * relays' event.source being "/test/relay"; printed when DE_TEST_LOG
 * is set. */
tu_check tpg_check_ledger(tu_cluster *k, sqlite3 *ledger);
/* The same against the ledger of c's database alone. */
tu_check tpg_check(PGconn *c, tu_cluster *k);
/* Flushes and stops relay r, then checks the topics against c's ledger
 * with at most what one relay has in flight (relay.max.inflight) as
 * duplicates: the end of a test where relays crashed or restarted. */
void tpg_stop_and_check(de_relay *r, PGconn *c, tu_cluster *k);

/* The relay's durable cursor in c's database (0 before its first
 * checkpoint). */
long long tpg_published_cursor(PGconn *c);
/* The highest position drawn in c's database (0: none). */
long long tpg_max_position(PGconn *c);

#endif

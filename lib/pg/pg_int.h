/* SPDX-License-Identifier: MIT */
/*
 * pg_int.h -- what the PostgreSQL module's files share (lib/pg/): the
 * schema, libpq error translation, and the relay's source.  Only the
 * deliveryevents-pg library compiles these files; the core library never
 * sees libpq.
 */
#ifndef DE_PG_INT_H
#define DE_PG_INT_H

#include "inbox.h"
#include "internal.h"
#include "relay_state.h"
#include "source.h"

#include <libpq-fe.h>

/* DE_ERR_DB: "<what>: <the server's text>"; clears r (may be NULL: the
 * connection's message is used then). */
de_err de__pg_fail(PGconn *conn, PGresult *r, const char *what);

/* How the library begins each transaction of its own on a connection
 * it shares with others or whose default it does not set (migrations,
 * stored settings, the relay's state, the consumer's batches): READ
 * COMMITTED whatever the database's default.  Under REPEATABLE READ or
 * SERIALIZABLE a statement that waits for a lock another instance holds
 * takes its snapshot before that instance commits, and the transaction
 * then fails on what it could not see (a schema already made, a row
 * already stored: "already exists", "could not serialize access"). */
#define DE__PG_BEGIN_RC "BEGIN ISOLATION LEVEL READ COMMITTED"

/* What the relay sets on each of its own connections (never on a
 * host's):
 *  - no parallel plans.  Its statements are short index reads and small
 *    writes, which a parallel plan only slows down -- and a server that
 *    forces generic plans (plan_cache_mode = force_generic_plan, as some
 *    pooler set-ups do) plans the outbox read, whose LIMIT it cannot
 *    see, as a Gather Merge over two workers: 60-70 ms a batch instead
 *    of 1-6 ms, a drain six times slower (docs/POSTGRESQL-INTERNALS.md);
 *  - READ COMMITTED, whatever the database's default: every argument of
 *    the relay (barrier, lease, checkpoints) is made for it, and under
 *    SERIALIZABLE its reads and deletions of the outbox would take part
 *    in the hosts' serialization conflicts, failing host commits. */
#define DE__PG_RELAY_SESSION_SQL                                               \
    "SET max_parallel_workers_per_gather = 0; "                                \
    "SET default_transaction_isolation = 'read committed'"

/* Runs sql (no parameters, maybe several statements) expecting `want`
 * from the last; *res (may be NULL) receives the result, which the
 * caller clears.  de__pg_fail with what on failure. */
de_err de__pg_exec(PGconn *conn, const char *sql, ExecStatusType want,
                   PGresult **res, const char *what);

/* de__pg_exec for one statement with n text parameters (bound, never
 * spliced into sql); n 0 is de__pg_exec. */
de_err de__pg_params(PGconn *conn, const char *sql, int n,
                     const char *const *values, ExecStatusType want,
                     PGresult **res, const char *what);

/* Begins a transaction on conn, takes the migration lock, creates schema
 * deliveryevents and its meta table, and runs steps[v..n-1] where v is
 * the version stored under meta's version_key (then set to n; a version
 * above n is refused).  whose names the owner in messages ("the
 * outbox's").  The transaction stays open on success (the caller adds
 * its steps and commits); it is rolled back on failure. */
de_err de__pg_migrate(PGconn *conn, const char *whose, const char *version_key,
                      const char *const *steps, int n);

/* Creates or migrates schema deliveryevents on conn, which must be idle
 * (the migration is a transaction of its own); *outbox_id (may be NULL)
 * receives the outbox's id. */
de_err de__pg_schema_ensure(PGconn *conn, char outbox_id[37]);

/* Creates or migrates the consumer's tables on conn (idle: the migration
 * is a transaction of its own) and prepares its statements (inbox_pg.c);
 * conn is borrowed. */
de_err de__inbox_open_pg(PGconn *conn, de__inbox **out);

/* The channel the commit trigger notifies. */
#define DE__PG_CHANNEL "deliveryevents_outbox"

/* The advisory lock class every lock of the library takes ("dlev"), and
 * its keys: migrations (the outbox's and the consumer's), and the
 * commit-order lock (shared by recorders in
 * their commit, exclusive for an instant in the relay's barrier read and
 * while the sequence is raised at open). */
#define DE__PG_LOCK_CLASS "1684826486"
#define DE__PG_LOCK_MIGRATE "0"
#define DE__PG_LOCK_ORDER "1"

/* Opens the outbox in the PostgreSQL database conninfo names for a relay,
 * on a connection of its own that LISTENs for commits; creates the
 * schema when there is none and create is true (else DE_ERR_STATE).
 * *outbox_id receives the outbox's id. */
de_err de__source_open_pg(const char *conninfo, bool create, de__source **out,
                          char outbox_id[37]);

/* How long the source's barrier read waits for recorders in their commit
 * before it gives up until the next round (DE__PG_BARRIER_WAIT_MS unless
 * set); tests lengthen it to watch the wait.  src must come from
 * de__source_open_pg. */
#define DE__PG_BARRIER_WAIT_MS 100
void de__source_pg_barrier_wait(de__source *src, int ms);
/* Marks src as a relay's (relay_pg.c): only a relay's source keeps the
 * sleeping flag -- takes over one another relay left up, raises it
 * again when it finds it lowered behind its back.  Another reader (a
 * replay, a test) never touches it. */
void de__source_pg_relay(de__source *src);
/* How many barrier reads the PostgreSQL sources of this process sent to
 * their server (for tests: the back-off after timeouts shows in it). */
unsigned long de__source_pg_barrier_attempts(void);
/* How many reads the PostgreSQL sources of this process read ahead
 * (sent after a full batch, before its rows were handed on) and then
 * handed on (*used) or dropped because the next read asked for other
 * rows (*dropped); for tests. */
void de__source_pg_read_aheads(unsigned long *used, unsigned long *dropped);
/* The source's connection (for tests: to look at how the server plans
 * its statements). */
PGconn *de__source_pg_conn(de__source *src);

/* After the second barrier timeout in a row the source waits before it
 * tries again: DE__PG_BARRIER_BACKOFF_MS, doubling with each further
 * timeout up to DE__PG_BARRIER_BACKOFF_MAX_MS, until one succeeds. */
#define DE__PG_BARRIER_BACKOFF_MS 200
#define DE__PG_BARRIER_BACKOFF_MAX_MS 5000

/* Opens the relay's state in the PostgreSQL database conninfo names, on
 * a connection of its own, creating its tables (deliveryevents.relay_*)
 * when missing; the same refusals as de__rstate_open (another outbox's
 * state, a state older than the outbox's deletions up to
 * host_deleted_upto).  *cursor receives the durable cursor. */
de_err de__rstate_open_pg(const char *conninfo, const char *outbox_id,
                          int64_t host_deleted_upto, de__rstate **out,
                          int64_t *cursor);

/* de_relay_start on an outbox opened with de_outbox_open_pg on host:
 * the relay connects where pg.conninfo says, else where host is
 * connected.  conf is owned by the relay from now on, even on failure. */
de_err de__relay_start_pg_host(PGconn *host, de_outbox *ob, de_conf *conf,
                               de_relay **out);

#endif

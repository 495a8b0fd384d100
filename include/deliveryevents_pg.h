/* SPDX-License-Identifier: MIT */
/*
 * deliveryevents_pg.h -- libdeliveryevents for services whose state lives
 * in PostgreSQL: the same outbox, relay and consumer, kept in the host's
 * PostgreSQL database.
 *
 * Build and link with `pkg-config --cflags --libs deliveryevents-pg`
 * (library libdeliveryevents-pg).  That library contains the whole of
 * libdeliveryevents as well, so a program links it *instead of*
 * libdeliveryevents, never beside it (two copies of the API in one
 * process would each keep their own de_errmsg()).  Programs that use
 * only SQLite keep linking libdeliveryevents and never need libpq.
 *
 * Everything declared in deliveryevents.h works on an outbox opened here
 * unless its documentation says otherwise; the differences are stated
 * below, per function.
 *
 * The guide is docs/POSTGRESQL.md; the design, and what is not done yet
 * (its section 7), docs/POSTGRESQL-INTERNALS.md.
 * The deliveryevents tool reads a PostgreSQL service, and runs its relay,
 * with --pg CONNINFO (docs/POSTGRESQL.md, "Operating").
 *
 * The relay of a PostgreSQL outbox opens two connections of its own (one
 * reads the outbox and LISTENs for commits, one keeps its state in the
 * deliveryevents.relay_* tables); the host's connection is never used by
 * it.  de_relay_start on an outbox opened here connects where the
 * pg.conninfo key says, else to the host connection's database, host,
 * port, user and password.  One relay per database publishes at a time;
 * others stand by and take over when its lease
 * (relay.lease.timeout.ms) expires, as on SQLite.
 */
#ifndef DELIVERYEVENTS_PG_H
#define DELIVERYEVENTS_PG_H

#include <libpq-fe.h>

#include "deliveryevents.h"

#ifdef __cplusplus
extern "C" {
#endif

/**
 * Attaches an outbox to the host's own PostgreSQL connection.
 *
 * Must be called outside a transaction: it creates or migrates the
 * library's schema `deliveryevents` (its tables, a sequence and a
 * deferred trigger) in a transaction of its own, under an advisory lock so
 * that instances starting together migrate one at a time; the role needs
 * CREATE on the database the first time.  It prepares de_record's INSERT
 * on the connection's session (a statement named deliveryevents_record_2,
 * the number changing with its text, prepared again after the host resets
 * the connection): parsing and
 * planning it at every call costs a CPU-bound server up to about half
 * the cost of the transaction.  A host or pooler that drops it (DEALLOCATE
 * ALL, DISCARD ALL, PgBouncer in transaction mode handing the next
 * transaction another backend) makes the next de_record fail with
 * DE_ERR_DB, a message that says so, and the host's transaction aborted;
 * the de_record after that prepares it again.  With pg.record.prepared set
 * to false in conf, de_record sends the unnamed statement instead and keeps
 * nothing on the session, so none of that can disturb it.
 *
 * de_record on the outbox writes one row with one statement inside the
 * host's open transaction.  Every check that can refuse an event runs
 * before the server sees anything, so a refused event (DE_ERR_ARG,
 * DE_ERR_PAYLOAD, DE_ERR_CONTRACT, DE_ERR_NO_TXN) leaves the host's
 * transaction as it was.  A failure on the server (DE_ERR_DB: disk full,
 * statement_timeout, cancellation, a serialization failure) aborts the
 * host's transaction, as any failed statement does in PostgreSQL; the
 * message says so.  de_record returns DE_ERR_STATE when the host's
 * transaction has already failed, when a command is in progress, or in
 * pipeline mode; and, without writing anything and with the transaction
 * still usable, in a session with session_replication_role = replica,
 * where the outbox's commit trigger does not fire and the event would
 * never be published.  It also returns DE_ERR_STATE when a statement of
 * the outbox's name on the session is not the library's: before running
 * it when the outbox looks (at open, after a reset: nothing written), or
 * after it ran, when the host replaced it since -- then roll the
 * transaction back, as it may have written; the message says which.
 *
 * The event's position is assigned when the host's transaction commits,
 * not before, so on this outbox de_recorded.position is 0.  Positions
 * follow the order in which recording transactions reached their commit;
 * for transactions that wrote a common row (the normal case for two
 * changes to one subject) this is their commit order; two transactions
 * that touched no common data and overlapped in their commit may appear
 * in either order.  For per-subject order, update the subject's row in
 * the transaction that records its event (or lock it: SELECT ... FOR
 * UPDATE).  Recording transactions commit concurrently.
 *
 * SET CONSTRAINTS ALL IMMEDIATE assigns the position at that statement
 * (update the subject's row before it), and until the transaction ends
 * the relay publishes nothing recorded after it.  PREPARE TRANSACTION
 * after de_record is not supported: the same holds until COMMIT PREPARED.
 *
 * Threads: the outbox uses conn on the calling thread only, like conn
 * itself (libpq connections are not shared between threads).
 *
 * @param conn  the host's open connection; borrowed: it must stay open
 *              until de_outbox_close().  A PQreset() connection is
 *              prepared again on the next de_record.
 * @param conf  configuration, or NULL for defaults; copied.
 * @param out   receives the outbox; set to NULL on failure.  Freed with
 *              de_outbox_close().
 * @return DE_OK; DE_ERR_ARG (NULL argument, connection not open);
 *         DE_ERR_STATE (called inside a transaction, the schema was
 *         written by a newer library, or the commit trigger outbox_commit
 *         is disabled, ENABLE REPLICA or missing: the message says what
 *         to run); DE_ERR_DB (the server's text in the message);
 *         DE_ERR_NOMEM.
 */
DE_EXTERN DE_WARN_UNUSED de_err de_outbox_open_pg(PGconn *conn,
                                                  const de_conf *conf,
                                                  de_outbox **out);

/**
 * Starts a relay beside the service for the outbox in the PostgreSQL
 * database that conninfo names, on connections of its own (the outbox's
 * schema is created when missing).  The relay's thread starts at once;
 * it waits as a standby while another relay of the database holds the
 * lease.  It is woken by the commits of recording transactions (a
 * NOTIFY the commit trigger sends only while the relay sleeps), with
 * relay.poll.interval.ms as the fallback (a lost connection drops
 * notifications).
 *
 * @param conninfo  a libpq connection string or URI; copied.
 * @param conf      configuration, or NULL for defaults; copied.
 * @param out       receives the relay; set to NULL on failure.  Freed
 *                  with de_relay_stop().
 * @return DE_OK; DE_ERR_ARG (NULL argument); DE_ERR_CONFIG (bad
 *         configuration, or a wire setting that differs from the one the
 *         writer stored); DE_ERR_DB (cannot connect, or the server
 *         refused; the server's text in the message); DE_ERR_STATE (the
 *         relay's tables belong to another outbox or are older than the
 *         outbox's deletions); DE_ERR_NOMEM.
 */
DE_EXTERN DE_WARN_UNUSED de_err de_relay_start_pg(const char *conninfo,
                                                  const de_conf *conf,
                                                  de_relay **out);

/**
 * Opens a consumer that applies events into PostgreSQL through conn, with
 * the same effectively-once inbox as on SQLite (docs/CONSUMER.md): per
 * subject, ce_subjectseq last + 1 is applied, a number already applied is
 * dropped as a duplicate (the same number with another ce_id parks the
 * subject as a conflict), a gap is handled by consumer.on.gap; each
 * handler's writes and the inbox's update commit in one transaction on
 * conn, and the Kafka offsets are committed only after it.
 *
 * Must be called outside a transaction: it creates or migrates the
 * consumer's tables (deliveryevents.inbox, inbox_source, inbox_id,
 * inbox_dead_letter, inbox_request; the role needs CREATE on the
 * database the first time) in a transaction of its own, under the
 * advisory lock the outbox's migration takes, and prepares statements
 * named "deliveryevents_inbox_<n>" on the connection.  The host (or a
 * pooler) may drop them between polls (DEALLOCATE ALL, DISCARD ALL): the
 * BEGIN of each batch also counts them, in the same round trip, and the
 * missing ones are prepared again; a consumer call outside a batch that
 * finds one gone prepares them and runs again.  The consumer's
 * connection needs a backend of its own for the whole batch (a direct
 * connection, or session pooling).
 *
 * Transactions: de_consumer_poll (and de_consumer_release / _skip) runs
 * BEGIN ISOLATION LEVEL READ COMMITTED ... COMMIT on conn around a batch
 * (READ COMMITTED whatever the session's default: consumers of one group
 * sharing the database then wait for each other on a subject's inbox row
 * instead of failing to serialize).  conn must be idle (no transaction
 * open, no command in progress) whenever a consumer function is called.
 *
 * Conflicts with other transactions: when the server aborts the
 * consumer's transaction for a deadlock (SQLSTATE 40P01) or a
 * serialization failure (40001) -- two members, or a member and any other
 * transaction, taking rows in opposite orders, in a handler's statements
 * (seen through a libpq event procedure the consumer registers on conn
 * once; it stays with the connection) or in the inbox's --
 * de_consumer_poll (and de_consumer_release / _skip) rolls the whole
 * transaction back and runs it again with the same events in a new one,
 * after a random pause of 1 to 50 ms, up to 5 runs in all.  The
 * handlers' writes of a run rolled back go with it, and so does whatever
 * the consumer counted in memory during it, so an event is still applied
 * once.  Each run again is counted in de_consumer_stats.txn_retries and
 * logged (DE_LOG_INFO); a handler that fails with such a SQLSTATE is not
 * a failure of its event (no consumer.max.attempts, no dead letter).
 * When the 5th run fails the same way, the call returns DE_ERR_DB with a
 * message naming the SQLSTATE and how many times it was retried (logged
 * at DE_LOG_WARNING); nothing of the batch is applied and it is read
 * again at the next poll.
 *
 * A broken connection (server restart, pg_terminate_backend, network):
 * de_consumer_poll returns DE_ERR_DB, nothing of the batch is counted as
 * done and its records are read again from Kafka -- as on SQLite, where a
 * failed database makes poll return DE_ERR_DB and the next poll retries.
 * A consumer with nothing to apply finds it too, within half a second
 * (its upkeep: release requests, forgetting); a poll that committed its
 * batch before the connection broke returns DE_OK, and the next poll
 * fails before it reads anything.
 * The consumer does not reconnect a connection it borrows (the host's
 * session settings would be lost behind its back): the host checks
 * PQstatus(conn) == CONNECTION_BAD, calls PQreset(conn) and polls again;
 * the statements are prepared again on the new backend.  A batch whose
 * COMMIT was cut off may or may not have committed; either way the inbox
 * drops what was applied when it is read again, so nothing is applied
 * twice or lost.
 *
 * Threads: the consumer is used from one thread at a time, and conn only
 * on that thread (libpq connections are not shared between threads).
 *
 * @param conn  the consumer's connection; borrowed: the host keeps
 *              ownership and must keep it open until de_consumer_close().
 *              Between polls the host may use it for its own work if it
 *              leaves it idle.
 * @param conf  configuration (group.id required), or NULL; copied.
 * @param out   receives the consumer; set to NULL on failure.  Freed with
 *              de_consumer_close().
 * @return DE_OK; DE_ERR_ARG (NULL argument, connection not open);
 *         DE_ERR_STATE (called inside a transaction, or the tables were
 *         written by a newer library); DE_ERR_CONFIG (no group.id, a bad
 *         librdkafka setting); DE_ERR_DB (the server's text in the
 *         message); DE_ERR_NOMEM.
 */
DE_EXTERN DE_WARN_UNUSED de_err de_consumer_open_pg(PGconn *conn,
                                                    const de_conf *conf,
                                                    de_consumer **out);

/**
 * A handler of a PostgreSQL consumer: applies one event through conn,
 * inside the consumer's open transaction (the inbox's update commits with
 * it).  The same rules as de_handler_fn: it must not BEGIN, COMMIT or
 * ROLLBACK (a SAVEPOINT of its own is fine) and must not call back into
 * the consumer; ev and the strings it points to are valid only during
 * the call.  A statement that fails on the server aborts the transaction:
 * the handler must then return an error (not DE_OK), and the consumer
 * rolls back this event's writes only and retries it with backoff, then
 * dead-letters it after consumer.max.attempts.
 *
 * @param conn  the consumer's connection (the one given to
 *              de_consumer_open_pg), in a transaction.
 * @param ev    the event; never NULL.
 * @param ctx   the pointer given at registration.
 * @return DE_OK to apply; any other value rolls the event's effects back.
 */
typedef de_err (*de_handler_pg_fn)(PGconn *conn, const de_event_view *ev,
                                   void *ctx);

/**
 * Registers the handler for a subject type and action on a consumer
 * opened with de_consumer_open_pg, as de_consumer_on does on SQLite (same
 * rules: action NULL takes every action of the type not registered
 * alone; register before the first de_consumer_poll).  de_consumer_on on
 * a PostgreSQL consumer, and this function on a SQLite one, return
 * DE_ERR_ARG and name the function to use.
 *
 * Threads: the consumer's thread.
 *
 * @param c             the consumer; not NULL.
 * @param subject_type  1..249 of [A-Za-z0-9._-]; copied.
 * @param action        the action, or NULL for any; copied.
 * @param fn            the handler; not NULL.
 * @param ctx           passed to fn as is; may be NULL; not owned.
 * @return DE_OK; DE_ERR_ARG (NULL consumer or fn, a bad name, a SQLite
 *         consumer, a handler already registered for the pair);
 *         DE_ERR_STATE (after the first de_consumer_poll); DE_ERR_NOMEM.
 */
DE_EXTERN DE_WARN_UNUSED de_err de_consumer_on_pg(de_consumer *c,
                                                  const char *subject_type,
                                                  const char *action,
                                                  de_handler_pg_fn fn,
                                                  void *ctx);

/**
 * de_replay on a PostgreSQL outbox: republishes retained events of the
 * outbox in the database conninfo names with their original ce_id,
 * ce_subjectepoch and ce_subjectseq, exactly as de_replay() does for a
 * SQLite database file -- the same selection, refusals, result and
 * producer (its documentation in deliveryevents.h holds here, with the
 * relay's state read from the deliveryevents.relay_* tables instead of
 * a state file; relay.state.path does not apply).
 *
 * It reads the outbox and the relay's state on two connections of its
 * own (the state in one REPEATABLE READ READ ONLY transaction, so that
 * its check and its republishing see the same cursor and numbers); it
 * takes no lease and writes neither the outbox nor the relay's state
 * (an outbox schema written by an older library is migrated first, as
 * de_relay_start_pg does).
 * Retained: the relay keeps published rows for outbox.retention.ms and,
 * while that is above 0, records the numbers each went out with in
 * deliveryevents.relay_published.
 *
 * Blocks the calling thread; any thread may call it, also beside a relay
 * of the same database.
 *
 * @param conninfo    a libpq connection string or URI; required; read
 *                    during the call.
 * @param conf        bootstrap.servers and any other librdkafka property,
 *                    and the wire settings as for de_relay_start_pg();
 *                    copied.
 * @param select      what to republish; required; read during the call.
 * @param timeout_ms  as de_replay().
 * @param out         receives what was done; required; filled also on
 *                    failure.
 * @return as de_replay(); DE_ERR_ARG also for a conninfo that does not
 *         parse; DE_ERR_DB when the server cannot be reached (the
 *         server's text in the message); DE_ERR_STATE also for a
 *         database without the outbox's schema or without the relay's
 *         tables (no relay has run there).
 */
DE_EXTERN DE_WARN_UNUSED de_err de_replay_pg(const char *conninfo,
                                             const de_conf *conf,
                                             const de_replay_select *select,
                                             int timeout_ms,
                                             de_replay_result *out);

/**
 * Registers the handler for events whose ce_type is exactly ce_type, of
 * any producer, on a consumer opened with de_consumer_open_pg, as
 * de_consumer_on_type does on SQLite (same rules: it wins over handlers
 * by subject type and action; its topics are not derived, list them in
 * consumer.topics; register before the first de_consumer_poll).  The
 * handler runs as one registered with de_consumer_on_pg: in the
 * consumer's transaction on its connection.  de_consumer_on_type on a
 * PostgreSQL consumer, and this function on a SQLite one, return
 * DE_ERR_ARG and name the function to use.
 *
 * Threads: the consumer's thread.
 *
 * @param c        the consumer; not NULL.
 * @param ce_type  1..1024 bytes of UTF-8 without control characters;
 *                 copied.
 * @param fn       the handler; not NULL.
 * @param ctx      passed to fn as is; may be NULL; not owned.
 * @return DE_OK; DE_ERR_ARG (NULL consumer or fn, a bad ce_type, a SQLite
 *         consumer, a handler already registered for the ce_type);
 *         DE_ERR_STATE (after the first de_consumer_poll); DE_ERR_NOMEM.
 *         On failure nothing is registered and the consumer is usable.
 */
DE_EXTERN DE_WARN_UNUSED de_err de_consumer_on_type_pg(de_consumer *c,
                                                       const char *ce_type,
                                                       de_handler_pg_fn fn,
                                                       void *ctx);

#ifdef __cplusplus
}
#endif

#endif /* DELIVERYEVENTS_PG_H */

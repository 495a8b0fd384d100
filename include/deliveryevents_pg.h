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
 * STATUS: work in progress (docs/PG-WORK-IN-PROGRESS.md).
 * de_outbox_open_pg, de_record, de_relay_start on a PostgreSQL outbox and
 * de_relay_start_pg are implemented; de_consumer_open_pg and
 * de_outbox_define on a PostgreSQL outbox return DE_ERR_STATE.
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
 * CREATE on the database the first time.  It then prepares one statement
 * on the connection, named "deliveryevents_record".
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
 * pipeline mode.
 *
 * The event's place in commit order is assigned when the host's
 * transaction commits, not before (so that it is commit order whatever
 * the writers, savepoints and rollbacks): on this outbox
 * de_recorded.position is 0.  Recording transactions commit one at a time
 * (a lock held from the position's assignment to the end of the commit);
 * transactions that record nothing are not affected.  PREPARE TRANSACTION
 * after de_record is not supported: the prepared transaction would hold
 * that lock until COMMIT PREPARED.
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
 *         DE_ERR_STATE (called inside a transaction, or the schema was
 *         written by a newer library); DE_ERR_DB (the server's text in the
 *         message); DE_ERR_NOMEM.
 */
DE_EXTERN DE_WARN_UNUSED de_err de_outbox_open_pg(PGconn *conn,
                                                  const de_conf *conf,
                                                  de_outbox **out);

/**
 * Starts a relay beside the service for the outbox in the PostgreSQL
 * database that conninfo names, on connections of its own (the outbox's
 * schema is created when missing).  The relay's thread starts at once;
 * it waits as a standby while another relay of the database holds the
 * lease.  New commits are picked up at relay.poll.interval.ms.
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
 * the same effectively-once inbox as on SQLite.
 *
 * NOT IMPLEMENTED YET: returns DE_ERR_STATE (docs/PG-WORK-IN-PROGRESS.md).
 *
 * @param conn  the consumer's connection; borrowed until
 *              de_consumer_close().
 * @param conf  configuration (group.id required); copied.
 * @param out   receives the consumer; set to NULL on failure.
 * @return DE_OK; DE_ERR_ARG; DE_ERR_STATE.
 */
DE_EXTERN DE_WARN_UNUSED de_err de_consumer_open_pg(PGconn *conn,
                                                    const de_conf *conf,
                                                    de_consumer **out);

#ifdef __cplusplus
}
#endif

#endif /* DELIVERYEVENTS_PG_H */

/* SPDX-License-Identifier: MIT */
/*
 * pg_int.h -- what the PostgreSQL module's files share (lib/pg/): the
 * schema, libpq error translation, and the relay's source.  Only the
 * deliveryevents-pg library compiles these files; the core library never
 * sees libpq.
 */
#ifndef DE_PG_INT_H
#define DE_PG_INT_H

#include "internal.h"
#include "relay_state.h"
#include "source.h"

#include <libpq-fe.h>

/* DE_ERR_DB: "<what>: <the server's text>"; clears r (may be NULL: the
 * connection's message is used then). */
de_err de__pg_fail(PGconn *conn, PGresult *r, const char *what);

/* Runs sql (no parameters, maybe several statements) expecting `want`
 * from the last; *res (may be NULL) receives the result, which the
 * caller clears.  de__pg_fail with what on failure. */
de_err de__pg_exec(PGconn *conn, const char *sql, ExecStatusType want,
                   PGresult **res, const char *what);

/* Creates or migrates schema deliveryevents on conn, which must be idle
 * (the migration is a transaction of its own); *outbox_id (may be NULL)
 * receives the outbox's id. */
de_err de__pg_schema_ensure(PGconn *conn, char outbox_id[37]);

/* The channel the commit trigger notifies. */
#define DE__PG_CHANNEL "deliveryevents_outbox"

/* Opens the outbox in the PostgreSQL database conninfo names for a relay,
 * on a connection of its own that LISTENs for commits; creates the
 * schema when there is none and create is true (else DE_ERR_STATE).
 * *outbox_id receives the outbox's id. */
de_err de__source_open_pg(const char *conninfo, bool create, de__source **out,
                          char outbox_id[37]);

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

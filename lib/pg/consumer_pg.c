/* SPDX-License-Identifier: MIT */
/*
 * consumer_pg.c -- the consumer on PostgreSQL: consumer.c's logic with
 * its inbox in the database the handlers write to (inbox_pg.c), through
 * the connection the host lends, and handlers that receive that
 * connection.
 *
 * Invariant: handlers registered here are called only on a consumer
 * opened here (de__consumer_on refuses the other kinds), so call_pg's
 * cast gives back the type they were registered with.
 */
/* internal.h first (through pg_int.h): it marks the build
 * (DE_BUILDING_LIBRARY) so that DE_EXTERN exports what
 * deliveryevents_pg.h declares. */
#include "pg_int.h"

#include "deliveryevents_pg.h"

static de_err open_pg_inbox(void *conn, const de_conf *conf, de__inbox **out)
{
    (void)conf;
    return de__inbox_open_pg(conn, out);
}

static de_err call_pg(de__fnptr fn, void *conn, const de_event_view *v,
                      void *ctx)
{
    return ((de_handler_pg_fn)fn)(conn, v, ctx);
}

static const de__consumer_kind pg_kind = {
    .on_fn = "de_consumer_on_pg",
    .on_type_fn = "de_consumer_on_type_pg",
    .open_inbox = open_pg_inbox,
    .call = call_pg,
};

de_err de_consumer_open_pg(PGconn *conn, const de_conf *conf, de_consumer **out)
{
    if (out != NULL)
        *out = NULL;
    if (conn == NULL || out == NULL)
        return de__fail(DE_ERR_ARG,
                        "de_consumer_open_pg needs a connection and an out "
                        "pointer (got NULL %s)",
                        conn == NULL ? "connection" : "out");
    if (PQstatus(conn) != CONNECTION_OK)
        return de__fail(DE_ERR_ARG,
                        "de_consumer_open_pg needs an open connection (its "
                        "status is %d, not CONNECTION_OK)",
                        (int)PQstatus(conn));
    if (PQtransactionStatus(conn) != PQTRANS_IDLE)
        return de__fail(DE_ERR_STATE,
                        "de_consumer_open_pg was called inside a transaction; "
                        "open the consumer outside one: its migration commits "
                        "on its own");
    return de__consumer_open(conn, &pg_kind, conf, out);
}

de_err de_consumer_on_pg(de_consumer *c, const char *subject_type,
                         const char *action, de_handler_pg_fn fn, void *ctx)
{
    return de__consumer_on(c, "de_consumer_on_pg", subject_type, action,
                           (de__fnptr)fn, ctx);
}

de_err de_consumer_on_type_pg(de_consumer *c, const char *ce_type,
                              de_handler_pg_fn fn, void *ctx)
{
    return de__consumer_on_type(c, "de_consumer_on_type_pg", ce_type,
                                (de__fnptr)fn, ctx);
}

/* SPDX-License-Identifier: MIT */
/*
 * query_model_pg.c -- query_model.c's read model, a delivery status view
 * built only from events, kept in PostgreSQL.
 *
 * The view is an ordinary table, delivery_status, in the consumer's own
 * database (not the delivery service's: queries and their load stay
 * here).  Each handler writes through the consumer's connection inside
 * the transaction de_consumer_poll opened for the batch, so the view
 * and the consumer's inbox (deliveryevents.inbox) commit together:
 * exactly once, in each delivery's order.
 *
 * Usage: query_model_pg --bootstrap SERVERS [--db CONNINFO]
 *                       [--group query-model] [--until-idle MS]
 *
 * CONNINFO is a libpq connection string (default "dbname=query_model").
 */
#include "example.h"

#include <deliveryevents_pg.h>

#define WHO "query_model_pg"

static bool exec(PGconn *conn, const char *sql)
{
    PGresult *r = PQexec(conn, sql);
    bool ok = PQresultStatus(r) == PGRES_COMMAND_OK ||
              PQresultStatus(r) == PGRES_TUPLES_OK;

    if (!ok)
        fprintf(stderr, WHO ": %s", PQresultErrorMessage(r));
    PQclear(r);
    return ok;
}

static bool schema(PGconn *conn)
{
    return exec(conn, "CREATE TABLE IF NOT EXISTS delivery_status("
                      "  delivery_id text PRIMARY KEY,"
                      "  order_id text, region text, customer_id text,"
                      "  status text NOT NULL, rider_id text,"
                      "  created_at timestamptz, assigned_at timestamptz,"
                      "  picked_up_at timestamptz,"
                      "  delivered_at timestamptz,"
                      "  canceled_at timestamptz, cancel_reason text);"
                      "CREATE INDEX IF NOT EXISTS delivery_status_rider"
                      "  ON delivery_status(rider_id, status)");
}

/* Runs one statement of a handler with the event bound: $1 the delivery
 * (text), $2 the event time in Unix milliseconds (bigint), $3 the data
 * (jsonb).  The types are given, so a statement need not use all three. */
static de_err run(PGconn *conn, const de_event_view *ev, const char *sql)
{
    char at[24];
    static const Oid types[3] = {25, 20, 3802}; /* text, int8, jsonb */
    const char *p[3];
    int len[3] = {0, 0, (int)ev->payload_len};
    PGresult *r;
    de_err e;

    snprintf(at, sizeof at, "%lld", (long long)ev->occurred_at_ms);
    p[0] = ev->subject_id;
    p[1] = at;
    p[2] = ev->payload;
    r = PQexecParams(conn, sql, 3, types, p, len, NULL, 0);
    e = PQresultStatus(r) == PGRES_COMMAND_OK && atoi(PQcmdTuples(r)) == 1
            ? DE_OK
            : DE_ERR_DB;
    if (e != DE_OK)
        fprintf(stderr, WHO ": %s %s: %s", ev->subject_id, ev->action,
                PQresultErrorMessage(r));
    PQclear(r);
    return e;
}

#define AT "to_timestamp($2::bigint / 1000.0)"

static de_err on_created(PGconn *conn, const de_event_view *ev, void *ctx)
{
    (void)ctx;
    return run(conn, ev,
               "INSERT INTO delivery_status(delivery_id, order_id, region, "
               "customer_id, status, created_at) SELECT $1, d->>'order_id', "
               "d->>'region', d->>'customer_id', 'created', " AT
               " FROM (SELECT $3::jsonb AS d) AS e");
}

static de_err on_assigned(PGconn *conn, const de_event_view *ev, void *ctx)
{
    (void)ctx;
    return run(conn, ev,
               "UPDATE delivery_status SET status = 'assigned', rider_id = "
               "$3::jsonb->>'rider_id', assigned_at = " AT
               " WHERE delivery_id = $1");
}

static de_err on_picked_up(PGconn *conn, const de_event_view *ev, void *ctx)
{
    (void)ctx;
    return run(conn, ev,
               "UPDATE delivery_status SET status = 'picked_up', "
               "picked_up_at = " AT " WHERE delivery_id = $1");
}

static de_err on_delivered(PGconn *conn, const de_event_view *ev, void *ctx)
{
    (void)ctx;
    return run(conn, ev,
               "UPDATE delivery_status SET status = 'delivered', "
               "delivered_at = " AT " WHERE delivery_id = $1");
}

static de_err on_canceled(PGconn *conn, const de_event_view *ev, void *ctx)
{
    (void)ctx;
    return run(conn, ev,
               "UPDATE delivery_status SET status = 'canceled', canceled_at "
               "= " AT ", cancel_reason = $3::jsonb->>'reason' "
               "WHERE delivery_id = $1");
}

static de_err handlers(de_consumer *c)
{
    static const struct {
        const char *action;
        de_handler_pg_fn fn;
    } h[] = {
        {"created", on_created},     {"assigned", on_assigned},
        {"picked_up", on_picked_up}, {"delivered", on_delivered},
        {"canceled", on_canceled},
    };
    de_err e = DE_OK;

    for (size_t i = 0; e == DE_OK && i < sizeof h / sizeof h[0]; i++)
        e = de_consumer_on_pg(c, "delivery", h[i].action, h[i].fn, NULL);
    return e;
}

static void print_rows(PGconn *conn, const char *sql)
{
    PGresult *r = PQexec(conn, sql);

    if (PQresultStatus(r) != PGRES_TUPLES_OK) {
        fprintf(stderr, WHO ": %s", PQresultErrorMessage(r));
    } else {
        for (int j = 0; j < PQnfields(r); j++)
            printf("%s%-12s", j ? " " : "  ", PQfname(r, j));
        printf("\n");
        for (int i = 0; i < PQntuples(r); i++) {
            for (int j = 0; j < PQnfields(r); j++)
                printf("%s%-12s", j ? " " : "  ",
                       PQgetisnull(r, i, j) ? "-" : PQgetvalue(r, i, j));
            printf("\n");
        }
    }
    PQclear(r);
}

int main(int argc, char **argv)
{
    const char *conninfo = "dbname=query_model", *group = "query-model";
    int64_t idle_ms = -1;
    de_conf *conf = de_conf_new();
    de_consumer *c = NULL;
    PGconn *conn;
    int rc;

    if ((rc = example_args(WHO, "CONNINFO", argc, argv, &conninfo, &group,
                           &idle_ms, conf)) != 0)
        return rc;
    conn = PQconnectdb(conninfo);
    if (PQstatus(conn) != CONNECTION_OK) {
        fprintf(stderr, WHO ": cannot connect to %s: %s", conninfo,
                PQerrorMessage(conn));
        return 1;
    }
    if (!schema(conn))
        return 1;
    if (de_consumer_open_pg(conn, conf, &c) != DE_OK || handlers(c) != DE_OK) {
        fprintf(stderr, WHO ": %s\n", de_errmsg());
        return 1;
    }
    de_conf_destroy(conf);
    rc = example_consume(WHO, c, idle_ms);
    printf(WHO ": deliveries by status (SELECT status, count(*) FROM "
               "delivery_status GROUP BY status):\n");
    print_rows(conn, "SELECT status, count(*) AS deliveries FROM "
                     "delivery_status GROUP BY status ORDER BY 2 DESC");
    printf(WHO ": the first deliveries in the view:\n");
    print_rows(conn, "SELECT delivery_id, region, status, rider_id, "
                     "to_char(created_at AT TIME ZONE 'UTC', 'HH24:MI:SS') "
                     "AS created, to_char(coalesce(delivered_at, "
                     "canceled_at) AT TIME ZONE 'UTC', 'HH24:MI:SS') AS "
                     "ended FROM delivery_status ORDER BY delivery_id "
                     "LIMIT 6");
    PQfinish(conn);
    return rc;
}

/* SPDX-License-Identifier: MIT */
/*
 * query_model.c -- the CQRS read model: a delivery status view built only
 * from events.
 *
 * Queries about deliveries ("where is my order?", "what is rider R-7
 * doing?") no longer touch the delivery service's tables, so a slow query
 * or an outage here cannot spread to the service.  The view is an
 * ordinary SQLite table, delivery_status, queryable with SQL:
 *
 *   SELECT status, count(*) FROM delivery_status GROUP BY status;
 *
 * Each handler writes inside the transaction de_consumer opened for the
 * event, so the view and the consumer's inbox move together: exactly
 * once, in each delivery's order.
 *
 * Usage: query_model --bootstrap SERVERS [--db query_model.db]
 *                    [--group query-model] [--until-idle MS]
 */
#include "example.h"

static int schema(sqlite3 *db)
{
    return example_exec(db, "CREATE TABLE IF NOT EXISTS delivery_status("
                            "  delivery_id TEXT PRIMARY KEY,"
                            "  order_id TEXT, region TEXT, customer_id TEXT,"
                            "  status TEXT NOT NULL, rider_id TEXT,"
                            "  created_at TEXT, assigned_at TEXT,"
                            "  picked_up_at TEXT, delivered_at TEXT,"
                            "  canceled_at TEXT, cancel_reason TEXT);"
                            "CREATE INDEX IF NOT EXISTS delivery_status_rider"
                            "  ON delivery_status(rider_id, status);");
}

/* Statements run with example_run: ?1 the delivery, ?2 the time, ?3 the
 * data. */
#define run example_run

#define AT "strftime('%Y-%m-%dT%H:%M:%fZ', ?2, 'unixepoch')"

static de_err on_created(sqlite3 *db, const de_event_view *ev, void *ctx)
{
    (void)ctx;
    return run(db, ev,
               "INSERT INTO delivery_status(delivery_id, order_id, region, "
               "customer_id, status, created_at) VALUES (?1, "
               "json_extract(?3, '$.order_id'), json_extract(?3, "
               "'$.region'), json_extract(?3, '$.customer_id'), 'created', " AT
               ")");
}

static de_err on_assigned(sqlite3 *db, const de_event_view *ev, void *ctx)
{
    (void)ctx;
    return run(db, ev,
               "UPDATE delivery_status SET status = 'assigned', rider_id = "
               "json_extract(?3, '$.rider_id'), assigned_at = " AT
               " WHERE delivery_id = ?1");
}

static de_err on_picked_up(sqlite3 *db, const de_event_view *ev, void *ctx)
{
    (void)ctx;
    return run(db, ev,
               "UPDATE delivery_status SET status = 'picked_up', "
               "picked_up_at = " AT " WHERE delivery_id = ?1");
}

static de_err on_delivered(sqlite3 *db, const de_event_view *ev, void *ctx)
{
    (void)ctx;
    return run(db, ev,
               "UPDATE delivery_status SET status = 'delivered', "
               "delivered_at = " AT " WHERE delivery_id = ?1");
}

static de_err on_canceled(sqlite3 *db, const de_event_view *ev, void *ctx)
{
    (void)ctx;
    return run(db, ev,
               "UPDATE delivery_status SET status = 'canceled', canceled_at "
               "= " AT ", cancel_reason = json_extract(?3, '$.reason') "
               "WHERE delivery_id = ?1");
}

static de_err handlers(de_consumer *c)
{
    static const struct example_handler h[] = {
        {"created", on_created},     {"assigned", on_assigned},
        {"picked_up", on_picked_up}, {"delivered", on_delivered},
        {"canceled", on_canceled},
    };
    return example_on(c, "delivery", h, sizeof h / sizeof h[0]);
}

static void report(sqlite3 *db)
{
    printf("query_model: deliveries by status (SELECT status, count(*) FROM "
           "delivery_status GROUP BY status):\n");
    example_print(db,
                  "SELECT status, count(*) AS deliveries FROM "
                  "delivery_status GROUP BY status ORDER BY 2 DESC",
                  10);
    printf("query_model: the first deliveries in the view:\n");
    example_print(db,
                  "SELECT delivery_id, region, status, rider_id, "
                  "substr(created_at, 12, 8) AS created, "
                  "substr(coalesce(delivered_at, canceled_at), 12, 8) AS "
                  "ended FROM delivery_status ORDER BY delivery_id",
                  6);
}

int main(int argc, char **argv)
{
    static const struct example ex = {"query_model", "query_model.db",
                                      "query-model", schema,
                                      handlers,      report};
    return example_main(&ex, argc, argv);
}

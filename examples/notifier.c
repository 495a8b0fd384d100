/* SPDX-License-Identifier: MIT */
/*
 * notifier.c -- customer and rider notifications for assigned, picked_up,
 * delivered and canceled deliveries.
 *
 * Sending a push message is an effect outside the database, so it cannot
 * join the consumer's transaction.  Instead each handler writes the
 * message into a notifications table (exactly once, with the inbox) and a
 * sender delivers rows not yet sent -- at least once, with the row's id as
 * the idempotency key a push service takes.  The notifier keeps what it
 * needs from earlier events (the customer from `created`, the rider from
 * `assigned`) in its own table: events carry the actor's facts, not every
 * field some consumer might want.
 *
 * Usage: notifier --bootstrap SERVERS [--db notifier.db] [--group notifier]
 *                 [--until-idle MS]
 */
#include "example.h"

static int schema(sqlite3 *db)
{
    return example_exec(db,
                        "CREATE TABLE IF NOT EXISTS known_deliveries("
                        "  delivery_id TEXT PRIMARY KEY, order_id TEXT,"
                        "  customer_id TEXT, rider_id TEXT);"
                        "CREATE TABLE IF NOT EXISTS notifications("
                        "  id INTEGER PRIMARY KEY, delivery_id TEXT NOT NULL,"
                        "  recipient TEXT NOT NULL, message TEXT NOT NULL,"
                        "  event_id TEXT NOT NULL, created_at TEXT NOT NULL,"
                        "  sent_at TEXT);");
}

static de_err exec_bound(sqlite3 *db, const de_event_view *ev, const char *sql)
{
    sqlite3_stmt *st;
    int rc;

    if (sqlite3_prepare_v2(db, sql, -1, &st, NULL) != SQLITE_OK)
        return DE_ERR_DB;
    sqlite3_bind_text(st, 1, ev->subject_id, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, ev->payload, (int)ev->payload_len, SQLITE_STATIC);
    sqlite3_bind_text(st, 3, ev->event_id, -1, SQLITE_STATIC);
    sqlite3_bind_double(st, 4, (double)ev->occurred_at_ms / 1000.0);
    rc = sqlite3_step(st);
    sqlite3_finalize(st);
    return rc == SQLITE_DONE ? DE_OK : DE_ERR_DB;
}

/* Queues a message for the delivery's customer (who = 'customer') or
 * rider ('rider'); nothing when that person is unknown. */
static de_err notify(sqlite3 *db, const de_event_view *ev, const char *who,
                     const char *text_sql)
{
    char sql[1024];

    snprintf(sql, sizeof sql,
             "INSERT INTO notifications(delivery_id, recipient, message, "
             "event_id, created_at) SELECT ?1, k.%s_id, %s, ?3, "
             "strftime('%%Y-%%m-%%dT%%H:%%M:%%SZ', ?4, 'unixepoch') FROM "
             "known_deliveries k WHERE k.delivery_id = ?1 AND k.%s_id IS "
             "NOT NULL",
             who, text_sql, who);
    return exec_bound(db, ev, sql);
}

static de_err on_created(sqlite3 *db, const de_event_view *ev, void *ctx)
{
    (void)ctx;
    return exec_bound(db, ev,
                      "INSERT OR REPLACE INTO known_deliveries(delivery_id, "
                      "order_id, customer_id) VALUES (?1, json_extract(?2, "
                      "'$.order_id'), json_extract(?2, '$.customer_id'))");
}

static de_err on_assigned(sqlite3 *db, const de_event_view *ev, void *ctx)
{
    de_err e;

    (void)ctx;
    if ((e = exec_bound(db, ev,
                        "UPDATE known_deliveries SET rider_id = "
                        "json_extract(?2, '$.rider_id') WHERE delivery_id = "
                        "?1")) != DE_OK)
        return e;
    if ((e = notify(db, ev, "customer",
                    "'Rider ' || k.rider_id || ' is on the way to pick up "
                    "your order ' || k.order_id")) != DE_OK)
        return e;
    return notify(db, ev, "rider",
                  "'New delivery ' || ?1 || ' (order ' || k.order_id || ')'");
}

static de_err on_picked_up(sqlite3 *db, const de_event_view *ev, void *ctx)
{
    (void)ctx;
    return notify(db, ev, "customer",
                  "'Your order ' || k.order_id || ' was picked up'");
}

static de_err on_delivered(sqlite3 *db, const de_event_view *ev, void *ctx)
{
    (void)ctx;
    return notify(db, ev, "customer",
                  "'Your order ' || k.order_id || ' was delivered. Enjoy!'");
}

static de_err on_canceled(sqlite3 *db, const de_event_view *ev, void *ctx)
{
    de_err e;

    (void)ctx;
    if ((e = notify(db, ev, "customer",
                    "'Your order ' || k.order_id || ' was canceled (' || "
                    "json_extract(?2, '$.reason') || ')'")) != DE_OK)
        return e;
    return notify(db, ev, "rider",
                  "'Delivery ' || ?1 || ' was canceled; no pickup needed'");
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

/* The sender: here it prints; a real one calls the push service with the
 * row id as idempotency key and marks the row sent afterwards. */
static void report(sqlite3 *db)
{
    printf("notifier: notifications by recipient kind:\n");
    example_print(db,
                  "SELECT CASE WHEN recipient LIKE 'C-%' THEN 'customer' "
                  "ELSE 'rider' END AS recipient, count(*) AS messages FROM "
                  "notifications GROUP BY 1",
                  5);
    printf("notifier: sending the first ones:\n");
    example_print(
        db, "SELECT recipient, message FROM notifications ORDER BY id", 6);
    example_exec(db, "UPDATE notifications SET sent_at = "
                     "strftime('%Y-%m-%dT%H:%M:%SZ', 'now') WHERE sent_at IS "
                     "NULL");
}

int main(int argc, char **argv)
{
    static const struct example ex = {"notifier", "notifier.db", "notifier",
                                      schema,     handlers,      report};
    return example_main(&ex, argc, argv);
}

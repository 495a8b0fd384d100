/* SPDX-License-Identifier: MIT */
/*
 * dispatch_board.c -- a consumer of a mixed topic: delivery.events carries
 * the delivery service's events (libdeliveryevents' relay) and the
 * courier app's (another company's producer, examples/courier_app.c),
 * side by side.  The board shows each delivery's status and rider, and
 * each rider's shift and last known position:
 *
 *   SELECT d.delivery_id, d.status, r.rider_id, r.on_shift, r.lat, r.lon
 *   FROM board d JOIN riders r USING (rider_id) WHERE d.status = 'assigned';
 *
 * The delivery service's events are handled by subject type and action,
 * the courier app's by their ce_type.  Its shift events are numbered per
 * rider (by the app, its own ce_source): applied in order, once.  Its
 * location pings carry no number: applied once by their ce_id although
 * the app sends each twice.  Its stray non-CloudEvent record lands in
 * de_dead_letter, whole, and stops nothing.
 *
 * Usage: dispatch_board --bootstrap SERVERS [--db dispatch_board.db]
 *                       [--group dispatch-board] [--until-idle MS]
 */
#include "example.h"

static int schema(sqlite3 *db)
{
    return example_exec(db, "CREATE TABLE IF NOT EXISTS board("
                            "  delivery_id TEXT PRIMARY KEY,"
                            "  status TEXT NOT NULL, rider_id TEXT,"
                            "  updated_at TEXT);"
                            "CREATE TABLE IF NOT EXISTS riders("
                            "  rider_id TEXT PRIMARY KEY, on_shift INTEGER,"
                            "  shifts INTEGER NOT NULL DEFAULT 0,"
                            "  lat REAL, lon REAL, seen_at TEXT,"
                            "  pings INTEGER NOT NULL DEFAULT 0);");
}

/* Statements run with example_run (example.h): ?1 the subject, ?2 the
 * event time (ce_time, whoever produced it), ?3 the data, ?4 the
 * action. */
#define run example_run

#define AT "strftime('%Y-%m-%dT%H:%M:%fZ', ?2, 'unixepoch')"

/* Every action of a delivery: its new status, and its rider when the
 * event names one. */
static de_err on_delivery(sqlite3 *db, const de_event_view *ev, void *ctx)
{
    (void)ctx;
    return run(db, ev,
               "INSERT INTO board(delivery_id, status, rider_id, updated_at) "
               "VALUES (?1, ?4, json_extract(?3, '$.rider_id'), " AT ") ON "
               "CONFLICT(delivery_id) DO UPDATE SET status = excluded.status, "
               "rider_id = coalesce(excluded.rider_id, rider_id), updated_at "
               "= excluded.updated_at");
}

static de_err on_shift_started(sqlite3 *db, const de_event_view *ev, void *ctx)
{
    (void)ctx;
    return run(db, ev,
               "INSERT INTO riders(rider_id, on_shift, shifts, seen_at) "
               "VALUES (?1, 1, 1, " AT ") ON CONFLICT(rider_id) DO UPDATE "
               "SET on_shift = 1, shifts = shifts + 1");
}

static de_err on_shift_ended(sqlite3 *db, const de_event_view *ev, void *ctx)
{
    (void)ctx;
    return run(db, ev, "UPDATE riders SET on_shift = 0 WHERE rider_id = ?1");
}

static de_err on_location(sqlite3 *db, const de_event_view *ev, void *ctx)
{
    (void)ctx;
    return run(db, ev,
               "INSERT INTO riders(rider_id, lat, lon, seen_at, pings) VALUES "
               "(?1, json_extract(?3, '$.lat'), json_extract(?3, '$.lon'), " AT
               ", 1) ON CONFLICT(rider_id) DO UPDATE SET lat = excluded.lat, "
               "lon = excluded.lon, seen_at = excluded.seen_at, pings = pings "
               "+ 1");
}

static de_err handlers(de_consumer *c)
{
    de_err e;

    if ((e = de_consumer_on(c, "delivery", NULL, on_delivery, NULL)) != DE_OK ||
        (e = de_consumer_on_type(c, "com.example.courier.Shift-Started",
                                 on_shift_started, NULL)) != DE_OK ||
        (e = de_consumer_on_type(c, "com.example.courier.Shift-Ended",
                                 on_shift_ended, NULL)) != DE_OK)
        return e;
    return de_consumer_on_type(c, "com.example.courier.Location-Reported",
                               on_location, NULL);
}

static void report(sqlite3 *db)
{
    printf("dispatch_board: deliveries by status:\n");
    example_print(db,
                  "SELECT status, count(*) AS deliveries FROM board GROUP BY "
                  "status ORDER BY status",
                  10);
    printf("dispatch_board: riders (from the courier app):\n");
    example_print(db,
                  "SELECT rider_id, on_shift, shifts, pings, lat, lon FROM "
                  "riders ORDER BY rider_id",
                  5);
    printf("dispatch_board: records that were no usable CloudEvent:\n");
    example_print(db,
                  "SELECT topic, partition, offset, CAST(record_key AS TEXT) "
                  "AS key, error FROM de_dead_letter WHERE kind = 'foreign'",
                  5);
}

int main(int argc, char **argv)
{
    static const struct example ex = {"dispatch_board", "dispatch_board.db",
                                      "dispatch-board", schema,
                                      handlers,         report};
    return example_main(&ex, argc, argv);
}

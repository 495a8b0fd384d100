/* SPDX-License-Identifier: MIT */
/*
 * live_stats.c -- statistics computed on the stream instead of in a
 * nightly batch: per-minute tumbling windows by region of deliveries
 * created, delivered and canceled, and the average time from assignment
 * to delivery.
 *
 * Windows are by event time (the event's occurred-at), not by when the
 * event happened to arrive: a partition that lags behind others must not
 * move its events into the wrong minute.
 *
 * Allowed lateness: 2 minutes.  Each partition's events arrive in order,
 * but partitions are read at different paces, so the watermark is kept
 * per partition -- the latest event time seen in it -- and the stream's
 * watermark is the lowest of them minus 2 minutes.  A window [t, t+1min)
 * is closed once t+1min is at or below the watermark, and its row is
 * final as far as a dashboard is concerned.  (A partition that stops
 * receiving events holds the watermark back: windows then stay open
 * longer, never close early.)  Policy for an event later than that: it is still
 * counted in its window -- dropping it would make the stream disagree with the
 * books -- and the window's `revisions` goes up, and the event is noted
 * in late_events, so that a closed window that changed is visible and can
 * be re-exported.  With this policy the stream's totals equal a batch
 * aggregation over the same events (tests/check_examples.c proves it
 * against the delivery service's own tables).
 *
 * Usage: live_stats --bootstrap SERVERS [--db live_stats.db]
 *                   [--group live-stats] [--until-idle MS]
 */
#include "example.h"

#include <stdint.h>

#define WINDOW_MS 60000
#define ALLOWED_LATENESS_MS 120000

static int schema(sqlite3 *db)
{
    return example_exec(db,
                        "CREATE TABLE IF NOT EXISTS stream_deliveries("
                        "  delivery_id TEXT PRIMARY KEY, region TEXT NOT NULL,"
                        "  assigned_at_ms INTEGER);"
                        "CREATE TABLE IF NOT EXISTS window_stats("
                        "  window_start_ms INTEGER NOT NULL,"
                        "  region TEXT NOT NULL,"
                        "  created INTEGER NOT NULL DEFAULT 0,"
                        "  delivered INTEGER NOT NULL DEFAULT 0,"
                        "  canceled INTEGER NOT NULL DEFAULT 0,"
                        "  delivery_ms_sum INTEGER NOT NULL DEFAULT 0,"
                        "  delivery_ms_n INTEGER NOT NULL DEFAULT 0,"
                        "  revisions INTEGER NOT NULL DEFAULT 0,"
                        "  closed INTEGER NOT NULL DEFAULT 0,"
                        "  PRIMARY KEY(window_start_ms, region));"
                        "CREATE TABLE IF NOT EXISTS late_events("
                        "  event_id TEXT PRIMARY KEY, action TEXT, region TEXT,"
                        "  window_start_ms INTEGER, occurred_at_ms INTEGER,"
                        "  watermark_ms INTEGER);"
                        "CREATE TABLE IF NOT EXISTS partition_time("
                        "  topic TEXT NOT NULL, partition INTEGER NOT NULL,"
                        "  max_event_ms INTEGER NOT NULL,"
                        "  PRIMARY KEY(topic, partition));");
}

static int64_t query_int(sqlite3 *db, const char *sql, const char *arg)
{
    sqlite3_stmt *st;
    int64_t v = -1;

    if (sqlite3_prepare_v2(db, sql, -1, &st, NULL) != SQLITE_OK)
        return -1;
    if (arg)
        sqlite3_bind_text(st, 1, arg, -1, SQLITE_STATIC);
    if (sqlite3_step(st) == SQLITE_ROW &&
        sqlite3_column_type(st, 0) != SQLITE_NULL)
        v = sqlite3_column_int64(st, 0);
    sqlite3_finalize(st);
    return v;
}

/* The stream's watermark: the lowest per-partition event time, minus the
 * allowed lateness; very early when no partition has been seen. */
static int64_t watermark(sqlite3 *db)
{
    int64_t low =
        query_int(db, "SELECT min(max_event_ms) FROM partition_time", NULL);

    return low < 0 ? INT64_MIN / 2 : low - ALLOWED_LATENESS_MS;
}

static de_err exec6(sqlite3 *db, const char *sql, int64_t a, int64_t b,
                    int64_t c, const char *s1, const char *s2, const char *s3)
{
    sqlite3_stmt *st;
    int rc;

    if (sqlite3_prepare_v2(db, sql, -1, &st, NULL) != SQLITE_OK)
        return DE_ERR_DB;
    sqlite3_bind_int64(st, 1, a);
    sqlite3_bind_int64(st, 2, b);
    sqlite3_bind_int64(st, 3, c);
    sqlite3_bind_text(st, 4, s1, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 5, s2, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 6, s3, -1, SQLITE_STATIC);
    rc = sqlite3_step(st);
    sqlite3_finalize(st);
    return rc == SQLITE_DONE ? DE_OK : DE_ERR_DB;
}

/* Counts one event into its window: `column` += 1 (and the delivery time
 * when given), handling lateness, then advances the watermark. */
static de_err count(sqlite3 *db, const de_event_view *ev, const char *region,
                    const char *column, int64_t delivery_ms)
{
    int64_t t = ev->occurred_at_ms;
    int64_t w = t - t % WINDOW_MS;
    int64_t wm = watermark(db);
    bool late = w + WINDOW_MS <= wm;
    char sql[512];
    de_err e;

    snprintf(sql, sizeof sql,
             "INSERT INTO window_stats(window_start_ms, region, %s, "
             "delivery_ms_sum, delivery_ms_n, revisions) VALUES (?1, ?4, 1, "
             "max(?2, 0), ?2 >= 0, ?3) ON CONFLICT(window_start_ms, region) DO "
             "UPDATE SET %s = %s + 1, delivery_ms_sum = delivery_ms_sum + "
             "max(?2, 0), delivery_ms_n = delivery_ms_n + (?2 >= 0), "
             "revisions = revisions + ?3",
             column, column, column);
    /* delivery_ms < 0: this event carries no delivery time. */
    if ((e = exec6(db, sql, w, delivery_ms, late ? 1 : 0, region, NULL,
                   NULL)) != DE_OK)
        return e;
    if (late &&
        (e = exec6(db,
                   "INSERT OR IGNORE INTO late_events VALUES (?5, ?6, ?4, "
                   "?1, ?2, ?3)",
                   w, t, wm, region, ev->event_id, ev->action)) != DE_OK)
        return e;
    if ((e = exec6(db,
                   "INSERT INTO partition_time VALUES (?4, ?1, ?2) ON "
                   "CONFLICT(topic, partition) DO UPDATE SET max_event_ms = "
                   "max(max_event_ms, ?2)",
                   ev->partition, t, 0, ev->topic, NULL, NULL)) != DE_OK)
        return e;
    /* Close the windows the watermark passed. */
    return exec6(db,
                 "UPDATE window_stats SET closed = 1 WHERE closed = 0 AND "
                 "window_start_ms + ?2 <= ?1",
                 watermark(db), WINDOW_MS, 0, NULL, NULL, NULL);
}

static char *region_of(sqlite3 *db, const char *delivery_id)
{
    sqlite3_stmt *st;
    char *r = NULL;

    if (sqlite3_prepare_v2(db,
                           "SELECT region FROM stream_deliveries WHERE "
                           "delivery_id = ?1",
                           -1, &st, NULL) != SQLITE_OK)
        return NULL;
    sqlite3_bind_text(st, 1, delivery_id, -1, SQLITE_STATIC);
    if (sqlite3_step(st) == SQLITE_ROW)
        r = sqlite3_mprintf("%s", sqlite3_column_text(st, 0));
    sqlite3_finalize(st);
    return r;
}

static de_err on_event(sqlite3 *db, const de_event_view *ev, void *ctx)
{
    char *region = NULL;
    de_err e = DE_OK;

    (void)ctx;
    if (strcmp(ev->action, "created") == 0) {
        sqlite3_stmt *st;
        if (sqlite3_prepare_v2(db,
                               "INSERT OR REPLACE INTO stream_deliveries("
                               "delivery_id, region) VALUES (?1, "
                               "json_extract(?2, '$.region')) RETURNING "
                               "region",
                               -1, &st, NULL) != SQLITE_OK)
            return DE_ERR_DB;
        sqlite3_bind_text(st, 1, ev->subject_id, -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 2, ev->payload, (int)ev->payload_len,
                          SQLITE_STATIC);
        if (sqlite3_step(st) == SQLITE_ROW)
            region = sqlite3_mprintf("%s", sqlite3_column_text(st, 0));
        sqlite3_finalize(st);
        if (region == NULL)
            return DE_ERR_DB;
        e = count(db, ev, region, "created", -1);
    } else if (strcmp(ev->action, "assigned") == 0) {
        return exec6(db,
                     "UPDATE stream_deliveries SET assigned_at_ms = ?1 WHERE "
                     "delivery_id = ?4",
                     ev->occurred_at_ms, 0, 0, ev->subject_id, NULL, NULL);
    } else if (strcmp(ev->action, "delivered") == 0 ||
               strcmp(ev->action, "canceled") == 0) {
        bool delivered = ev->action[0] == 'd';
        int64_t assigned = query_int(db,
                                     "SELECT assigned_at_ms FROM "
                                     "stream_deliveries WHERE delivery_id = "
                                     "?1",
                                     ev->subject_id);
        region = region_of(db, ev->subject_id);
        if (region == NULL)
            return DE_ERR_STATE; /* created never seen: retried, parked */
        e = count(db, ev, region, delivered ? "delivered" : "canceled",
                  delivered && assigned >= 0 ? ev->occurred_at_ms - assigned
                                             : -1);
    }
    sqlite3_free(region);
    return e;
}

static de_err handlers(de_consumer *c)
{
    return de_consumer_on(c, "delivery", NULL, on_event, NULL);
}

static void report(sqlite3 *db)
{
    printf("live_stats: per-minute windows by region (event time; allowed "
           "lateness 2 min), the first 8:\n");
    example_print(db,
                  "SELECT strftime('%H:%M', window_start_ms / 1000, "
                  "'unixepoch') AS minute, region, created, delivered, "
                  "canceled, CASE WHEN delivery_ms_n > 0 THEN printf('%.1f', "
                  "delivery_ms_sum / 60000.0 / delivery_ms_n) END AS "
                  "avg_deliv_min, revisions, closed FROM window_stats ORDER "
                  "BY window_start_ms, region",
                  8);
    printf("live_stats: totals over all windows:\n");
    example_print(db,
                  "SELECT count(*) AS windows, sum(created) AS created, "
                  "sum(delivered) AS delivered, sum(canceled) AS canceled, "
                  "printf('%.1f', sum(delivery_ms_sum) / 60000.0 / "
                  "max(sum(delivery_ms_n), 1)) AS avg_deliv_min, (SELECT "
                  "count(*) FROM late_events) AS late_events FROM "
                  "window_stats",
                  1);
}

int main(int argc, char **argv)
{
    static const struct example ex = {
        "live_stats", "live_stats.db", "live-stats", schema, handlers, report};
    return example_main(&ex, argc, argv);
}

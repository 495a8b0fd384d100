/* SPDX-License-Identifier: MIT */
/*
 * delivery_service.c -- a small delivery service that announces what
 * happens to its deliveries as domain events.
 *
 * It keeps its own tables (orders, riders, deliveries).  Every state change
 * -- a delivery created for an order, assigned to a rider, picked up,
 * delivered, sometimes canceled -- is one transaction that updates those
 * tables and records the matching event with de_record, so the state and
 * the events can never disagree.  The service knows nothing about who
 * listens: notifications, ETA, statistics and the rest react to the events.
 *
 * Usage: delivery_service [--db PATH] [--deliveries N] [--seed S]
 *                         [--bootstrap SERVERS [--latency]]
 *
 * With --bootstrap the service runs the bundled relay in its own process:
 * each commit that recorded an event wakes it, and it publishes to Kafka
 * ("delivery.events", key = delivery id).  --latency also measures, for
 * every event, the time from COMMIT returning to Kafka acknowledging it.
 *
 * Every event it records has a contract, declared at startup with
 * de_outbox_define and defined from the actor's side -- the facts of
 * the action, identifiers rather than copies of other aggregates -- and
 * the outbox runs with outbox.strict=true, so an event type without a
 * contract, or a payload that strays from its contract, is refused.  The
 * run ends by showing one such refusal: a notifier "needs" the
 * customer's phone number, and the assignment is not the place for it.
 *
 * Time is simulated (starting 2026-11-25T11:00:00Z, advancing a few seconds
 * per step) so that runs are repeatable and the events carry realistic
 * occurred-at times.  The simulation, the payloads and the contracts are
 * in delivery.h, shared with delivery_service_pg.c (the same service on
 * PostgreSQL); this file holds what is SQLite's.
 */
#include "delivery.h"

#include <deliveryevents.h>
#include <sqlite3.h>

#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct service {
    sqlite3 *db;
    de_outbox *ob;
    struct delivery_latency relay;
};

static int sql(sqlite3 *db, const char *q)
{
    char *err = NULL;

    if (sqlite3_exec(db, q, NULL, NULL, &err) != SQLITE_OK) {
        fprintf(stderr, "delivery_service: %s: %s\n", q, err ? err : "?");
        sqlite3_free(err);
        return -1;
    }
    return 0;
}

/* Runs a statement with text/integer parameters $1, $2, ... given as a
 * format: 't' text, 'i' int64.  Returns SQLite's result of the step. */
static int run(sqlite3 *db, const char *q, const char *fmt, ...)
{
    sqlite3_stmt *st = NULL;
    va_list ap;
    int rc;

    if (sqlite3_prepare_v2(db, q, -1, &st, NULL) != SQLITE_OK) {
        fprintf(stderr, "delivery_service: %s\n", sqlite3_errmsg(db));
        return SQLITE_ERROR;
    }
    va_start(ap, fmt);
    for (int i = 0; fmt[i]; i++) {
        /* $N is a named parameter to SQLite, numbered as it appears. */
        char name[16];
        int at;
        snprintf(name, sizeof name, "$%d", i + 1);
        at = sqlite3_bind_parameter_index(st, name);
        if (fmt[i] == 't')
            sqlite3_bind_text(st, at, va_arg(ap, const char *), -1,
                              SQLITE_TRANSIENT);
        else
            sqlite3_bind_int64(st, at, va_arg(ap, int64_t));
    }
    va_end(ap);
    rc = sqlite3_step(st);
    sqlite3_finalize(st);
    return rc;
}

static int update(sqlite3 *db, const struct delivery_change *c)
{
    const char *sql = delivery_update_sql(c->action);

    if (strcmp(c->action, "created") == 0)
        return run(db, DELIVERY_INSERT_ORDER, "tti", c->order_id, c->region,
                   (int64_t)c->fee) != SQLITE_DONE ||
                       run(db, sql, "titt", c->id, c->at_ms, c->order_id,
                           c->region) != SQLITE_DONE
                   ? -1
                   : 0;
    return run(db, sql, c->rider_id ? "tit" : "ti", c->id, c->at_ms,
               c->rider_id) == SQLITE_DONE
               ? 0
               : -1;
}

/*
 * One state change: the domain update and its event in one transaction.
 * BEGIN IMMEDIATE takes the write lock first, so the reads that check the
 * current state cannot go stale before the write (no SQLITE_BUSY_SNAPSHOT).
 */
static int change(void *ctx, const struct delivery_change *c)
{
    struct service *s = ctx;
    de_event ev = {0};

    if (sql(s->db, "BEGIN IMMEDIATE") != 0)
        return -1;
    if (update(s->db, c) != 0 || sqlite3_changes(s->db) != 1)
        goto fail;
    ev.subject_type = "delivery";
    ev.subject_id = c->id;
    ev.action = c->action;
    ev.payload = c->payload;
    ev.occurred_at_ms = c->at_ms;
    if (de_record(s->ob, &ev, NULL) != DE_OK) {
        fprintf(stderr, "delivery_service: %s\n", de_errmsg());
        goto fail;
    }
    if (sql(s->db, "COMMIT") != 0)
        return -1;
    delivery_committed(&s->relay);
    return 0;
fail:
    fprintf(stderr, "delivery_service: %s %s failed: %s\n", c->id, c->action,
            sqlite3_errmsg(s->db));
    sql(s->db, "ROLLBACK");
    return -1;
}

/* A payload that strays from its contract is refused, nothing is
 * written, and the transaction goes on (here it is rolled back, as the
 * service would on any error). */
static void show_a_refusal(struct service *s)
{
    de_event ev;

    delivery_refusal_event(&ev);
    if (sql(s->db, "BEGIN IMMEDIATE") != 0)
        return;
    delivery_refusal_report(de_record(s->ob, &ev, NULL));
    sql(s->db, "ROLLBACK");
}

/* The service's own tables (delivery.h) and its riders. */
static int schema(sqlite3 *db)
{
    return sql(db, DELIVERY_TABLES
               "INSERT OR IGNORE INTO riders "
               "  WITH RECURSIVE r(n) AS (SELECT 0 UNION ALL"
               "    SELECT n + 1 FROM r WHERE n < 11)"
               "  SELECT printf('R-%02d', n), printf('rider %d', n)"
               "  FROM r;");
}

int main(int argc, char **argv)
{
    struct delivery_options o = {.db = "delivery.db"};
    struct service s = {0};
    sqlite3_stmt *q;

    delivery_options(&o, "delivery_service", "PATH", argc, argv);
    if (sqlite3_open(o.db, &s.db) != SQLITE_OK) {
        fprintf(stderr, "delivery_service: cannot open %s: %s\n", o.db,
                sqlite3_errmsg(s.db));
        return 1;
    }
    if (schema(s.db) != 0)
        return 1;
    {
        /* Only event types with a contract may be recorded. */
        de_conf *conf = de_conf_new();
        de_err e = de_conf_set(conf, "outbox.strict", "true");
        if (e == DE_OK)
            e = de_outbox_open(s.db, conf, &s.ob);
        de_conf_destroy(conf);
        if (e != DE_OK) {
            fprintf(stderr, "delivery_service: %s\n", de_errmsg());
            return 1;
        }
    }
    if (delivery_define_contracts(s.ob, "delivery_service") != 0)
        return 1;
    if (delivery_relay_start(&s.relay, s.ob, &o, "delivery_service") != 0)
        return 1;
    if (delivery_simulate(o.deliveries, o.seed, change, &s) != 0)
        return 1;

    show_a_refusal(&s);
    printf("delivery_service: %d deliveries in %s; events recorded in the "
           "outbox, by action:\n",
           o.deliveries, o.db);
    sqlite3_prepare_v2(s.db,
                       "SELECT action, count(*) FROM de_outbox "
                       "GROUP BY action ORDER BY min(position)",
                       -1, &q, NULL);
    while (sqlite3_step(q) == SQLITE_ROW)
        printf("  %-10s %5d\n", sqlite3_column_text(q, 0),
               sqlite3_column_int(q, 1));
    sqlite3_finalize(q);
    printf("the first events, in commit order:\n");
    sqlite3_prepare_v2(s.db,
                       "SELECT position, subject_id, action, "
                       "strftime('%H:%M:%S', occurred_at_ms / 1000, "
                       "'unixepoch'), payload FROM de_outbox "
                       "ORDER BY position LIMIT 8",
                       -1, &q, NULL);
    while (sqlite3_step(q) == SQLITE_ROW)
        printf("  #%-4" PRId64 " %s %-9s %s %s\n",
               (int64_t)sqlite3_column_int64(q, 0), sqlite3_column_text(q, 1),
               sqlite3_column_text(q, 2), sqlite3_column_text(q, 3),
               sqlite3_column_text(q, 4));
    sqlite3_finalize(q);

    delivery_relay_finish(&s.relay);
    de_outbox_close(s.ob);
    sqlite3_close(s.db);
    return 0;
}

/* SPDX-License-Identifier: MIT */
/*
 * delivery_service_pg.c -- the delivery service of delivery_service.c
 * with its tables in PostgreSQL: the same deliveries, events and
 * contracts (examples/delivery.h), recorded through libpq.
 *
 * Every state change is one transaction on the service's own connection:
 * BEGIN, the update of the delivery's row, de_record, COMMIT.  Updating
 * the row is what keeps one delivery's events in commit order on
 * PostgreSQL (docs/POSTGRESQL.md, "The commit-order rule"): two changes
 * to one delivery wait for each other on that row.  Every event type has
 * a contract (de_outbox_define) and the outbox runs with
 * outbox.strict=true; the run ends by showing one refusal, as on SQLite.
 *
 * Usage: delivery_service_pg --db CONNINFO [--deliveries N] [--seed S]
 *                            [--bootstrap SERVERS [--latency]]
 *
 * CONNINFO is a libpq connection string ("dbname=delivery host=/tmp").
 * With --bootstrap the service starts the bundled relay (de_relay_start
 * on the outbox: its own thread and two connections of its own to the
 * same database), woken by each commit, publishing to "delivery.events"
 * with the delivery id as key.
 */
#include "delivery.h"

#include <deliveryevents_pg.h>

#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define WHO "delivery_service_pg"

struct service {
    PGconn *conn;
    de_outbox *ob;
    struct delivery_latency relay;
};

/* Runs a statement with text parameters; true when it succeeded and, if
 * rows is not negative, changed exactly that many rows. */
static bool run(PGconn *conn, const char *sql, int n, const char *const *p,
                int rows)
{
    PGresult *r = PQexecParams(conn, sql, n, NULL, p, NULL, NULL, 0);
    ExecStatusType st = PQresultStatus(r);
    bool ok = st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK;

    if (!ok)
        fprintf(stderr, WHO ": %s", PQresultErrorMessage(r));
    else if (rows >= 0 && atoi(PQcmdTuples(r)) != rows)
        ok = false;
    PQclear(r);
    return ok;
}

/* Runs statements without parameters (several, separated by ';'). */
static bool exec(PGconn *conn, const char *sql)
{
    PGresult *r = PQexec(conn, sql);
    bool ok = PQresultStatus(r) == PGRES_COMMAND_OK;

    if (!ok)
        fprintf(stderr, WHO ": %s", PQresultErrorMessage(r));
    PQclear(r);
    return ok;
}

/* The change's row (delivery.h's SQL); false unless exactly one row
 * changed, i.e. unless the delivery's state allowed the change. */
static bool update(PGconn *conn, const struct delivery_change *c)
{
    char at[24], fee[16];
    const char *sql = delivery_update_sql(c->action);

    snprintf(at, sizeof at, "%" PRId64, c->at_ms);
    if (strcmp(c->action, "created") == 0) {
        const char *order[] = {c->order_id, c->region, fee};
        const char *p[] = {c->id, at, c->order_id, c->region};
        snprintf(fee, sizeof fee, "%d", c->fee);
        return run(conn, DELIVERY_INSERT_ORDER, 3, order, 1) &&
               run(conn, sql, 4, p, 1);
    } else {
        const char *p[] = {c->id, at, c->rider_id};
        return run(conn, sql, c->rider_id ? 3 : 2, p, 1);
    }
}

/* One state change: the row and its event in one transaction. */
static int change(void *ctx, const struct delivery_change *c)
{
    struct service *s = ctx;
    de_event ev = {0};
    PGresult *r;
    bool committed;

    if (!exec(s->conn, "BEGIN"))
        return -1;
    if (!update(s->conn, c))
        goto fail;
    ev.subject_type = "delivery";
    ev.subject_id = c->id;
    ev.action = c->action;
    ev.payload = c->payload;
    ev.occurred_at_ms = c->at_ms;
    if (de_record(s->ob, &ev, NULL) != DE_OK) {
        fprintf(stderr, WHO ": %s\n", de_errmsg());
        goto fail;
    }
    /* An aborted transaction "commits" as ROLLBACK: check the tag. */
    r = PQexec(s->conn, "COMMIT");
    committed = PQresultStatus(r) == PGRES_COMMAND_OK &&
                strcmp(PQcmdStatus(r), "COMMIT") == 0;
    if (!committed)
        fprintf(stderr, WHO ": %s %s: COMMIT failed: %s\n", c->id, c->action,
                PQresultErrorMessage(r));
    PQclear(r);
    if (!committed)
        return -1;
    delivery_committed(&s->relay);
    return 0;
fail:
    fprintf(stderr, WHO ": %s %s failed\n", c->id, c->action);
    exec(s->conn, "ROLLBACK");
    return -1;
}

/* A payload that strays from its contract is refused before the server
 * sees it, so the transaction is as it was (here rolled back). */
static void show_a_refusal(struct service *s)
{
    de_event ev;

    delivery_refusal_event(&ev);
    if (!exec(s->conn, "BEGIN"))
        return;
    delivery_refusal_report(de_record(s->ob, &ev, NULL));
    exec(s->conn, "ROLLBACK");
}

/* The service's own tables (delivery.h) and its riders. */
static bool schema(PGconn *conn)
{
    return exec(conn, DELIVERY_TABLES
                "INSERT INTO riders"
                "  SELECT format('R-%s', lpad(n::text, 2, '0')),"
                "         format('rider %s', n)"
                "  FROM generate_series(0, 11) AS n"
                "  ON CONFLICT DO NOTHING");
}

/* Prints the rows of a query as aligned columns. */
static void print_rows(PGconn *conn, const char *sql)
{
    PGresult *r = PQexec(conn, sql);

    if (PQresultStatus(r) != PGRES_TUPLES_OK)
        fprintf(stderr, WHO ": %s", PQresultErrorMessage(r));
    else
        for (int i = 0; i < PQntuples(r); i++) {
            for (int j = 0; j < PQnfields(r); j++)
                printf(j ? " %5s" : "  %-10s", PQgetvalue(r, i, j));
            printf("\n");
        }
    PQclear(r);
}

int main(int argc, char **argv)
{
    struct delivery_options o = {.db = NULL};
    struct service s = {0};

    delivery_options(&o, WHO, "CONNINFO", argc, argv);
    s.conn = PQconnectdb(o.db);
    if (PQstatus(s.conn) != CONNECTION_OK) {
        fprintf(stderr, WHO ": cannot connect to %s: %s", o.db,
                PQerrorMessage(s.conn));
        return 1;
    }
    if (!schema(s.conn))
        return 1;
    {
        /* Only event types with a contract may be recorded. */
        de_conf *conf = de_conf_new();
        de_err e = de_conf_set(conf, "outbox.strict", "true");
        if (e == DE_OK)
            e = de_outbox_open_pg(s.conn, conf, &s.ob);
        de_conf_destroy(conf);
        if (e != DE_OK) {
            fprintf(stderr, WHO ": %s\n", de_errmsg());
            return 1;
        }
    }
    if (delivery_define_contracts(s.ob, WHO) != 0)
        return 1;
    if (delivery_relay_start(&s.relay, s.ob, &o, WHO) != 0)
        return 1;
    if (delivery_simulate(o.deliveries, o.seed, change, &s) != 0)
        return 1;

    show_a_refusal(&s);
    printf(WHO ": %d deliveries, %llu state changes, each committed with "
               "its event; deliveries by status:\n",
           o.deliveries, (unsigned long long)s.relay.committed);
    print_rows(s.conn, "SELECT status, count(*) FROM deliveries "
                       "GROUP BY status ORDER BY 2 DESC");
    delivery_relay_finish(&s.relay);
    de_outbox_close(s.ob);
    PQfinish(s.conn);
    return 0;
}

/* SPDX-License-Identifier: MIT */
/*
 * bench_pg_record.c -- the cost of de_record on PostgreSQL, against the
 * same transaction inserting the same bytes into a bare table, on a
 * throwaway server (tests/pg/pgserver.c) or DE_PG_CONNINFO.
 *
 *   one writer:  transactions of one event, one after the other;
 *   16 writers:  the same from 16 connections at once (recorders commit
 *                concurrently: the commit-order lock is taken shared,
 *                docs/POSTGRESQL-INTERNALS.md section 2).
 *
 * Each with synchronous_commit on and off.  Then the same with a 10-field
 * payload checked against its contract (de_outbox_define: patterns, enums,
 * ranges, a date-time; the one of bench/bench_record.c), against the bare
 * table inserting the same bytes: target <= 1.5x.  Prints ratios; asserts
 * nothing (timings on a shared machine are not a test).
 *
 * No relay runs, so the relay's sleeping flag is down and the trigger
 * sends no NOTIFY -- the case of a busy relay.  DE_BENCH_RELAY_SLEEPING=1
 * raises the flag for the whole run instead: every commit notifies, the
 * worst case (an idle relay woken by every commit; PostgreSQL serialises
 * notifying commits in PreCommit_Notify).
 */
#include "../contract10.h"
#include "deliveryevents_pg.h"
#include "pgserver.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define TXNS 1000
#define THREADS 16

static const char *conninfo;
static const char *sync_mode;
static const char *payload = "{\"courier\":\"C-7\",\"eta_min\":12}";

static const char bare_sql[] =
    "INSERT INTO bare(event_id, subject_type, subject_id, action, version, "
    "occurred_at_ms, recorded_at_ms, payload, traceparent, tracestate, "
    "dataschema) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)";

static double now_s(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void must(PGconn *c, const char *sql)
{
    PGresult *r = PQexec(c, sql);

    if (PQresultStatus(r) != PGRES_COMMAND_OK &&
        PQresultStatus(r) != PGRES_TUPLES_OK) {
        fprintf(stderr, "%s: %s", sql, PQresultErrorMessage(r));
        exit(1);
    }
    PQclear(r);
}

/* TXNS transactions of one event; bare: a plain prepared INSERT. */
static void *run(void *arg)
{
    bool bare = arg != NULL;
    PGconn *c = PQconnectdb(conninfo);
    de_outbox *ob = NULL;
    const char *values[11] = {"0190a6c1-0000-7000-8000-000000000000",
                              "delivery",
                              "D-1001",
                              "assigned",
                              "0",
                              "1700000000000",
                              "1700000000000",
                              payload,
                              NULL,
                              NULL,
                              NULL};
    char set[80];
    int i;

    if (PQstatus(c) != CONNECTION_OK) {
        fprintf(stderr, "%s", PQerrorMessage(c));
        exit(1);
    }
    snprintf(set, sizeof set, "SET synchronous_commit = %s", sync_mode);
    must(c, set);
    if (bare)
        PQclear(PQprepare(c, "bare", bare_sql, 11, NULL));
    else if (de_outbox_open_pg(c, NULL, &ob) != DE_OK) {
        fprintf(stderr, "%s\n", de_errmsg());
        exit(1);
    }
    for (i = 0; i < TXNS; i++) {
        de_event ev = {.subject_type = "delivery",
                       .subject_id = "D-1001",
                       .action = "assigned",
                       .payload = values[7]};
        must(c, "BEGIN");
        if (bare) {
            PGresult *r = PQexecPrepared(c, "bare", 11, values, NULL, NULL, 0);
            if (PQresultStatus(r) != PGRES_COMMAND_OK)
                exit(1);
            PQclear(r);
        } else if (de_record(ob, &ev, NULL) != DE_OK) {
            fprintf(stderr, "%s\n", de_errmsg());
            exit(1);
        }
        must(c, "COMMIT");
    }
    de_outbox_close(ob);
    PQfinish(c);
    return NULL;
}

/* Transactions per second with n writers. */
static double rate(bool bare, int n)
{
    pthread_t th[THREADS];
    double t0 = now_s();
    int i;

    for (i = 0; i < n; i++)
        pthread_create(&th[i], NULL, run, bare ? (void *)1 : NULL);
    for (i = 0; i < n; i++)
        pthread_join(th[i], NULL);
    return n * TXNS / (now_s() - t0);
}

int main(void)
{
    static const char *modes[] = {"on", "off"};
    PGconn *c;
    de_outbox *ob = NULL;
    size_t m;

    if (!tpg_start())
        return 1;
    conninfo = tpg_fresh_db();
    c = PQconnectdb(conninfo);
    if (PQstatus(c) != CONNECTION_OK || de_outbox_open_pg(c, NULL, &ob))
        return 1;
    de_outbox_close(ob);
    if (getenv("DE_BENCH_RELAY_SLEEPING") != NULL)
        must(c, "SELECT setval('deliveryevents.relay_sleeping', 1)");
    must(c, "CREATE TABLE bare (id bigint GENERATED ALWAYS AS IDENTITY "
            "PRIMARY KEY, event_id text NOT NULL, subject_type text NOT "
            "NULL, subject_id text NOT NULL, action text NOT NULL, version "
            "integer NOT NULL, occurred_at_ms bigint NOT NULL, "
            "recorded_at_ms bigint NOT NULL, payload text NOT NULL, "
            "traceparent text, tracestate text, dataschema text)");
    PQfinish(c);
    for (m = 0; m < 4; m++) {
        double b1, r1, b16, r16;
        if (m == 2) { /* from now on every event is checked */
            payload = payload10;
            c = PQconnectdb(conninfo);
            if (PQstatus(c) != CONNECTION_OK ||
                de_outbox_open_pg(c, NULL, &ob) != DE_OK ||
                de_outbox_define(ob, "delivery", "assigned", 1, contract10) !=
                    DE_OK) {
                fprintf(stderr, "define: %s\n", de_errmsg());
                return 1;
            }
            de_outbox_close(ob);
            PQfinish(c);
        }
        sync_mode = modes[m % 2];
        b1 = rate(true, 1);
        r1 = rate(false, 1);
        b16 = rate(true, THREADS);
        r16 = rate(false, THREADS);
        printf("%ssynchronous_commit=%s: 1 writer: bare %.0f txn/s, "
               "de_record %.0f txn/s (cost %.2fx); %d writers: bare %.0f "
               "txn/s, de_record %.0f txn/s (cost %.2fx)\n",
               m >= 2 ? "10-field payload + contract, " : "", sync_mode, b1, r1,
               b1 / r1, THREADS, b16, r16, b16 / r16);
    }
    tpg_stop();
    return 0;
}

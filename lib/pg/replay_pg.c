/* SPDX-License-Identifier: MIT */
/*
 * replay_pg.c -- de_replay_pg: de_replay (lib/replay.c) on a PostgreSQL
 * outbox.  The replay itself is replay.c's; this file opens what it
 * reads: the outbox through the relay's PostgreSQL source (source_pg.c,
 * not creating the schema), and the relay's state as a reader of its own
 * -- one connection in one REPEATABLE READ READ ONLY transaction from
 * read_begin to read_end, so that both of replay.c's passes see the same
 * cursor, held-back events and recorded numbers, as SQLite's read
 * transaction gives them.  It takes no lease, creates no table and
 * writes nothing (relay_state_pg.c's open would create the relay's
 * tables and adopt them).
 */
#include "pg_int.h"
#include "relay_int.h"

#include <deliveryevents_pg.h>

#include <stdlib.h>
#include <string.h>

typedef struct pg_reader {
    de__rstate base;
    PGconn *conn;
} pg_reader;

static const de__rstate_ops reader_ops;

static void r_close(de__rstate *base)
{
    pg_reader *st = (pg_reader *)base;

    if (st == NULL)
        return;
    PQfinish(st->conn);
    free(st);
}

/* One row of one column of sql with parameter v (may be NULL): its text
 * in buf ("" and *found false without a row). */
static de_err r_value(pg_reader *st, const char *sql, const char *v, char *buf,
                      size_t size, bool *found, const char *what)
{
    const char *const vals[1] = {v};
    PGresult *r;
    de_err err;

    *found = false;
    if (size > 0)
        buf[0] = '\0';
    if ((err = de__pg_params(st->conn, sql, v ? 1 : 0, vals, PGRES_TUPLES_OK,
                             &r, what)) != DE_OK)
        return err;
    if (PQntuples(r) > 0 && !PQgetisnull(r, 0, 0)) {
        *found = true;
        snprintf(buf, size, "%s", PQgetvalue(r, 0, 0));
    }
    PQclear(r);
    return DE_OK;
}

static de_err r_cursor(de__rstate *base, int64_t *cursor, char *event_id,
                       size_t event_id_size)
{
    pg_reader *st = (pg_reader *)base;
    char buf[32];
    bool found;
    de_err err = r_value(st,
                         "SELECT value FROM deliveryevents.relay_state WHERE "
                         "key = 'cursor'",
                         NULL, buf, sizeof buf, &found,
                         "replay: cannot read the relay's cursor");

    *cursor = found ? strtoll(buf, NULL, 10) : 0;
    if (err == DE_OK && event_id_size > 0)
        err = r_value(st,
                      "SELECT value FROM deliveryevents.relay_state WHERE "
                      "key = 'cursor_event_id'",
                      NULL, event_id, event_id_size, &found,
                      "replay: cannot read the relay's cursor");
    return err;
}

static de_err r_read_begin(de__rstate *base)
{
    return de__pg_exec(((pg_reader *)base)->conn,
                       "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
                       PGRES_COMMAND_OK, NULL,
                       "replay: cannot begin reading the relay's state");
}

static void r_read_end(de__rstate *base)
{
    pg_reader *st = (pg_reader *)base;

    if (PQtransactionStatus(st->conn) != PQTRANS_IDLE)
        PQclear(PQexec(st->conn, "ROLLBACK"));
}

static de_err r_published_get(de__rstate *base, int64_t position, bool *found,
                              int64_t *epoch, int64_t *seq)
{
    pg_reader *st = (pg_reader *)base;
    char p[24];
    const char *const v[1] = {p};
    PGresult *r;
    de_err err;

    *found = false;
    snprintf(p, sizeof p, "%lld", (long long)position);
    if ((err = de__pg_params(st->conn,
                             "SELECT epoch, seq FROM "
                             "deliveryevents.relay_published WHERE position = "
                             "$1::bigint",
                             1, v, PGRES_TUPLES_OK, &r,
                             "replay: cannot read the numbers of a published "
                             "event")) != DE_OK)
        return err;
    if (PQntuples(r) == 1) {
        *found = true;
        *epoch = strtoll(PQgetvalue(r, 0, 0), NULL, 10);
        *seq = strtoll(PQgetvalue(r, 0, 1), NULL, 10);
    }
    PQclear(r);
    return DE_OK;
}

static de_err r_parked_at(de__rstate *base, int64_t position, bool *parked)
{
    char p[24], buf[8];

    snprintf(p, sizeof p, "%lld", (long long)position);
    return r_value((pg_reader *)base,
                   "SELECT 1 FROM deliveryevents.relay_parked WHERE position "
                   "= $1::bigint",
                   p, buf, sizeof buf, parked,
                   "replay: cannot read the held-back events");
}

/* Only what a replay calls (relay_int.h, de__replay_open_fn). */
static const de__rstate_ops reader_ops = {
    .close = r_close,
    .cursor = r_cursor,
    .read_begin = r_read_begin,
    .read_end = r_read_end,
    .published_get = r_published_get,
    .parked_at = r_parked_at,
};

/* The relay's state in the database conninfo names, as a reader: it must
 * exist and belong to outbox_id. */
static de_err reader_open(const char *conninfo, const char *outbox_id,
                          de__rstate **out)
{
    const char *const keys[] = {"dbname", "fallback_application_name", NULL};
    const char *const values[] = {conninfo, "deliveryevents-replay", NULL};
    pg_reader *st = calloc(1, sizeof *st);
    char buf[64];
    bool found;
    de_err err;

    *out = NULL;
    if (st == NULL)
        return de__fail(DE_ERR_NOMEM, "out of memory opening relay state");
    st->base.ops = &reader_ops;
    st->conn = PQconnectdbParams(keys, values, 1);
    if (PQstatus(st->conn) != CONNECTION_OK) {
        err =
            de__pg_fail(st->conn, NULL, "replay: cannot connect to PostgreSQL");
        goto fail;
    }
    /* The relay's session settings (pg_int.h): its reads outside the
     * REPEATABLE READ snapshot below must not run at a SERIALIZABLE
     * default either, whose SIRead locks outlive them. */
    if ((err = de__pg_exec(st->conn, DE__PG_RELAY_SESSION_SQL, PGRES_COMMAND_OK,
                           NULL, "replay: cannot set up its connection")) !=
        DE_OK)
        goto fail;
    if ((err = r_value(st,
                       "SELECT to_regclass('deliveryevents.relay_state') IS "
                       "NOT NULL AND to_regclass('deliveryevents.relay_"
                       "published') IS NOT NULL AND to_regclass("
                       "'deliveryevents.relay_parked') IS NOT NULL",
                       NULL, buf, sizeof buf, &found,
                       "replay: cannot read the relay's state")) != DE_OK)
        goto fail;
    if (strcmp(buf, "t") != 0) {
        err = de__fail(DE_ERR_STATE,
                       "replay: the database has no relay state (no "
                       "deliveryevents.relay_* tables): no relay has run, "
                       "so nothing was published to republish");
        goto fail;
    }
    if ((err = r_value(st,
                       "SELECT value FROM deliveryevents.relay_state WHERE "
                       "key = 'outbox_id'",
                       NULL, buf, sizeof buf, &found,
                       "replay: cannot read the relay's state")) != DE_OK)
        goto fail;
    if (found && strcmp(buf, outbox_id) != 0) {
        err = de__fail(DE_ERR_STATE,
                       "replay: the relay's tables in schema deliveryevents "
                       "belong to the outbox %s, not to this database's "
                       "outbox %s",
                       buf, outbox_id);
        goto fail;
    }
    *out = &st->base;
    return DE_OK;
fail:
    r_close(&st->base);
    return err;
}

static de_err open_pg(void *ctx, de_conf *conf, de__source **src,
                      de__rstate **st)
{
    const char *conninfo = ctx;
    char outbox_id[37];
    de_err err;

    (void)conf;
    if ((err = de__source_open_pg(conninfo, false, src, outbox_id)) != DE_OK)
        return err;
    return reader_open(conninfo, outbox_id, st);
}

de_err de_replay_pg(const char *conninfo, const de_conf *conf,
                    const de_replay_select *sel, int timeout_ms,
                    de_replay_result *out)
{
    char where[200];
    PQconninfoOption *opts;
    char *why = NULL;
    de_err err;

    if ((err = de__replay_check(conninfo, "conninfo", "a connection string",
                                sel, out)) != DE_OK)
        return err;
    if ((opts = PQconninfoParse(conninfo, &why)) == NULL) {
        err = de__fail(DE_ERR_ARG,
                       "de_replay_pg: '%s' is not a PostgreSQL connection "
                       "string or URI: %s",
                       conninfo, why ? why : "out of memory");
        PQfreemem(why);
        return err;
    }
    /* What messages call the database: its name, never the password. */
    snprintf(where, sizeof where, "(the default database)");
    for (PQconninfoOption *o = opts; o->keyword != NULL; o++)
        if (strcmp(o->keyword, "dbname") == 0 && o->val != NULL)
            snprintf(where, sizeof where, "%.190s", o->val);
    PQconninfoFree(opts);
    return de__replay_run(where, conf, sel, timeout_ms, out, open_pg,
                          (void *)(uintptr_t)conninfo);
}

/* SPDX-License-Identifier: MIT */
/*
 * pg.c -- the tool's PostgreSQL backend: the queries that gather what
 * status, consumer-status, dead-letters and contracts print, and the
 * request rows of release and skip, against the library's schema
 * deliveryevents (lib/pg/); and the calls of relay and replay.  The
 * printing is deliveryevents.c's, the same for both backends; this file
 * only reads (and, for release and skip, inserts one request row).
 *
 * Built with DE_TOOL_PG (the Makefile sets it where pkg-config knows
 * libpq); without it every PostgreSQL target is refused with a message
 * saying that this tool was built without PostgreSQL support.
 */
#include "tool.h"

#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

int is_pg_uri(const char *s)
{
    return strncmp(s, "postgresql://", 13) == 0 ||
           strncmp(s, "postgres://", 11) == 0;
}

#ifndef DE_TOOL_PG

int pgt_open(const char *cmd, const char *conninfo, int read_only, pgt **out)
{
    (void)read_only;
    *out = NULL;
    fprintf(stderr,
            "deliveryevents: %s: '%s' is a PostgreSQL database, and this "
            "deliveryevents was built without PostgreSQL support (libpq "
            "was not found at build time)\n",
            cmd, conninfo);
    return 1;
}

void pgt_close(pgt *p)
{
    (void)p;
}

const char *pgt_name(const pgt *p)
{
    (void)p;
    return "";
}

/* Never called: pgt_open refuses every target. */
const char *pgt_dbname(const pgt *p)
{
    (void)p;
    return "";
}

long pgt_list(const char *cmd, pgt *p, const char *type, int type_len,
              const char *id, int pending, int blocked, long limit,
              ol_emit_fn *emit, void *ctx)
{
    (void)cmd, (void)p, (void)type, (void)type_len, (void)id, (void)pending;
    (void)blocked, (void)limit, (void)emit, (void)ctx;
    return -1;
}

void pgt_setting(pgt *p, const char *key, char *buf, size_t size)
{
    (void)p, (void)key, (void)size;
    buf[0] = '\0';
}

int pgt_status(const char *cmd, pgt *p, status_facts *f)
{
    (void)cmd, (void)p, (void)f;
    return 1;
}

int pgt_consumer_status(const char *cmd, pgt *p, consumer_facts *f)
{
    (void)cmd, (void)p, (void)f;
    return 1;
}

long pgt_dead_letters(const char *cmd, pgt *p, const char *type, int type_len,
                      const char *id, int parked, long limit, dl_emit_fn *emit,
                      void *ctx)
{
    (void)cmd, (void)p, (void)type, (void)type_len, (void)id, (void)parked;
    (void)limit, (void)emit, (void)ctx;
    return -1;
}

json_t *pgt_contracts(const char *cmd, pgt *p)
{
    (void)cmd, (void)p;
    return NULL;
}

int pgt_parked(const char *cmd, pgt *p, const char *type, int type_len,
               const char *id)
{
    (void)cmd, (void)p, (void)type, (void)type_len, (void)id;
    return -1;
}

int64_t pgt_request(const char *cmd, pgt *p, const char *type, int type_len,
                    const char *id, const char *action, int64_t now)
{
    (void)cmd, (void)p, (void)type, (void)type_len, (void)id, (void)action;
    (void)now;
    return -1;
}

int pgt_request_state(const char *cmd, pgt *p, int64_t req, char *buf,
                      size_t size)
{
    (void)cmd, (void)p, (void)req, (void)buf, (void)size;
    return -1;
}

de_err pgt_replay(const char *conninfo, const de_conf *conf,
                  const de_replay_select *sel, int timeout_ms,
                  de_replay_result *out)
{
    (void)conninfo, (void)conf, (void)sel, (void)timeout_ms;
    memset(out, 0, sizeof *out);
    return DE_ERR_STATE;
}

de_err pgt_relay_start(const char *conninfo, const de_conf *conf,
                       de_relay **out)
{
    (void)conninfo, (void)conf;
    *out = NULL;
    return DE_ERR_STATE;
}

#else /* DE_TOOL_PG */

#include <deliveryevents_pg.h>
#include <libpq-fe.h>

struct pgt {
    PGconn *conn;
    char name[600];
};

/* The server's message, one line. */
static const char *pq_msg(PGconn *conn)
{
    static char buf[1024];
    size_t n;

    snprintf(buf, sizeof buf, "%s", PQerrorMessage(conn));
    n = strlen(buf);
    while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == ' '))
        buf[--n] = '\0';
    for (char *c = buf; *c; c++)
        if (*c == '\n' || *c == '\t')
            *c = ' ';
    return buf;
}

int pgt_open(const char *cmd, const char *conninfo, int read_only, pgt **out)
{
    /* connect_timeout before dbname: a conninfo that sets one wins. */
    const char *const keys[] = {"connect_timeout", "fallback_application_name",
                                "dbname", NULL};
    const char *const vals[] = {"10", "deliveryevents", conninfo, NULL};
    static const char *const shown[] = {"dbname", "host", "port", "user"};
    PQconninfoOption *opts;
    char *err = NULL;
    pgt *p;
    size_t n = 0;

    *out = NULL;
    if ((opts = PQconninfoParse(conninfo, &err)) == NULL) {
        char why[600];
        snprintf(why, sizeof why, "%s", err ? err : "out of memory");
        PQfreemem(err);
        why[strcspn(why, "\n")] = '\0';
        fprintf(stderr,
                "deliveryevents: %s: '%s' is not a PostgreSQL connection "
                "string or URI: %s\n(deliveryevents %s --help for usage)\n",
                cmd, conninfo, why, cmd);
        return 2;
    }
    PQconninfoFree(opts);
    if ((p = calloc(1, sizeof *p)) == NULL) {
        fprintf(stderr, "deliveryevents: %s: out of memory\n", cmd);
        return 1;
    }
    p->conn = PQconnectdbParams(keys, vals, 1);
    if (p->conn == NULL || PQstatus(p->conn) != CONNECTION_OK) {
        fprintf(stderr,
                "deliveryevents: %s: cannot connect to the PostgreSQL "
                "database '%s': %s\n",
                cmd, conninfo, p->conn ? pq_msg(p->conn) : "out of memory");
        pgt_close(p);
        return 1;
    }
    /* Where it is connected, without the password. */
    opts = PQconninfo(p->conn);
    for (size_t i = 0; i < 4; i++)
        for (PQconninfoOption *o = opts; o != NULL && o->keyword != NULL; o++)
            if (strcmp(o->keyword, shown[i]) == 0 && o->val && o->val[0] &&
                n < sizeof p->name)
                n +=
                    (size_t)snprintf(p->name + n, sizeof p->name - n, "%s%s=%s",
                                     n ? " " : "", o->keyword, o->val);
    PQconninfoFree(opts);
    if (read_only) {
        /* One snapshot for the whole report, as SQLite's read
         * transaction; and nothing written by mistake. */
        PGresult *r = PQexec(p->conn, "BEGIN ISOLATION LEVEL REPEATABLE READ "
                                      "READ ONLY");
        int ok = PQresultStatus(r) == PGRES_COMMAND_OK;
        PQclear(r);
        if (!ok) {
            fprintf(stderr, "deliveryevents: %s: cannot read '%s': %s\n", cmd,
                    p->name, pq_msg(p->conn));
            pgt_close(p);
            return 1;
        }
    }
    *out = p;
    return 0;
}

void pgt_close(pgt *p)
{
    if (p == NULL)
        return;
    if (p->conn != NULL && PQtransactionStatus(p->conn) != PQTRANS_IDLE)
        PQclear(PQexec(p->conn, "ROLLBACK"));
    PQfinish(p->conn);
    free(p);
}

const char *pgt_name(const pgt *p)
{
    return p->name;
}

const char *pgt_dbname(const pgt *p)
{
    return PQdb(p->conn);
}

/* sql with up to five text parameters (NULL: SQL NULL); the result, or
 * NULL after saying why (what names what was read). */
static PGresult *pq_query(const char *cmd, pgt *p, const char *what,
                          const char *sql, int n, const char *a, const char *b,
                          const char *c, const char *d, const char *e)
{
    const char *const v[5] = {a, b, c, d, e};
    PGresult *r = PQexecParams(p->conn, sql, n, NULL, v, NULL, NULL, 0);
    ExecStatusType st = PQresultStatus(r);

    if (st == PGRES_TUPLES_OK || st == PGRES_COMMAND_OK)
        return r;
    fprintf(stderr, "deliveryevents: %s: cannot read %s in '%s': %s\n", cmd,
            what, p->name, pq_msg(p->conn));
    PQclear(r);
    return NULL;
}

/* Column i of row j as an integer (dflt for NULL or no row). */
static int64_t col_int(PGresult *r, int j, int i, int64_t dflt)
{
    if (r == NULL || j >= PQntuples(r) || PQgetisnull(r, j, i))
        return dflt;
    return strtoll(PQgetvalue(r, j, i), NULL, 10);
}

/* Column i of row j as text (NULL for NULL or no row). */
static const char *col_text(PGresult *r, int j, int i)
{
    if (r == NULL || j >= PQntuples(r) || PQgetisnull(r, j, i))
        return NULL;
    return PQgetvalue(r, j, i);
}

static void copy_text(char *dst, size_t size, PGresult *r, int j, int i)
{
    const char *v = col_text(r, j, i);

    snprintf(dst, size, "%s", v ? v : "");
}

/* Whether the single value of sql is true; -1 after saying why. */
static int pq_bool(const char *cmd, pgt *p, const char *what, const char *sql)
{
    PGresult *r = pq_query(cmd, p, what, sql, 0, NULL, NULL, NULL, NULL, NULL);
    int v;

    if (r == NULL)
        return -1;
    v = PQntuples(r) == 1 && strcmp(PQgetvalue(r, 0, 0), "t") == 0;
    PQclear(r);
    return v;
}

/* The integers of one row of sql (no parameters) into out[0..n-1], dflt
 * where NULL; 0, or 1 after saying why. */
static int pq_ints(const char *cmd, pgt *p, const char *what, const char *sql,
                   int n, int64_t *out, int64_t dflt)
{
    PGresult *r = pq_query(cmd, p, what, sql, 0, NULL, NULL, NULL, NULL, NULL);

    if (r == NULL)
        return 1;
    for (int i = 0; i < n; i++)
        out[i] = col_int(r, 0, i, dflt);
    PQclear(r);
    return 0;
}

#define META(key)                                                              \
    "(SELECT value FROM deliveryevents.meta WHERE key = '" key "')"
#define STATE(key)                                                             \
    "(SELECT value FROM deliveryevents.relay_state WHERE key = '" key "')"

/* The relay's state: its tables (deliveryevents.relay_*), its lease and
 * the subjects it holds back. */
static int relay_facts(const char *cmd, pgt *p, status_facts *f)
{
    PGresult *r;

    r = pq_query(
        cmd, p, "the relay's state",
        "SELECT " STATE("cursor") ", " STATE("cursor_event_id") ", " STATE(
            "outbox_id") ", " STATE("schema_version") ", (SELECT "
                                                      "max(last_ms) FROM "
                                                      "deliveryevents.relay_"
                                                      "subjects), (SELECT "
                                                      "count(*) FROM "
                                                      "deliveryevents.relay_"
                                                      "parked), (SELECT "
                                                      "count(*) FROM (SELECT "
                                                      "DISTINCT subject_type, "
                                                      "subject_id "
                                                      "FROM "
                                                      "deliveryevents.relay_"
                                                      "parked) s)",
        0, NULL, NULL, NULL, NULL, NULL);
    if (r == NULL)
        return 1;
    f->cursor = col_int(r, 0, 0, 0);
    copy_text(f->cursor_event_id, sizeof f->cursor_event_id, r, 0, 1);
    copy_text(f->state_outbox_id, sizeof f->state_outbox_id, r, 0, 2);
    f->v_state = col_int(r, 0, 3, 0);
    f->last_ms = col_int(r, 0, 4, 0);
    f->parked = col_int(r, 0, 5, 0);
    f->nblocked = col_int(r, 0, 6, 0);
    PQclear(r);
    r = pq_query(cmd, p, "the relay's lease",
                 "SELECT owner, pid, host, acquired_ms, heartbeat_ms, epoch "
                 "FROM deliveryevents.relay_lease WHERE id = 1",
                 0, NULL, NULL, NULL, NULL, NULL);
    if (r == NULL)
        return 1;
    if (PQntuples(r) == 1) {
        copy_text(f->owner, sizeof f->owner, r, 0, 0);
        f->pid = col_int(r, 0, 1, 0);
        copy_text(f->host, sizeof f->host, r, 0, 2);
        f->acquired = col_int(r, 0, 3, 0);
        f->hb = col_int(r, 0, 4, 0);
        f->epoch = col_int(r, 0, 5, 0);
    }
    PQclear(r);
    r = pq_query(cmd, p, "the held-back events",
                 "SELECT subject_type, subject_id, count(*), min(since_ms), "
                 "(SELECT error FROM deliveryevents.relay_parked p2 WHERE "
                 "p2.subject_type = p.subject_type AND p2.subject_id = "
                 "p.subject_id ORDER BY position LIMIT 1), min(position) "
                 "FROM deliveryevents.relay_parked p GROUP BY subject_type, "
                 "subject_id ORDER BY min(position)",
                 0, NULL, NULL, NULL, NULL, NULL);
    if (r == NULL)
        return 1;
    for (int j = 0; j < PQntuples(r); j++)
        json_array_append_new(
            f->blocked, blocked_entry(col_text(r, j, 0), col_text(r, j, 1),
                                      col_int(r, j, 2, 0), col_int(r, j, 3, 0),
                                      col_text(r, j, 4), col_int(r, j, 5, 0)));
    PQclear(r);
    return 0;
}

/* 0 when p has an outbox, or 1 after saying why not. */
static int outbox_tables(const char *cmd, pgt *p)
{
    int has =
        pq_bool(cmd, p, "the schema",
                "SELECT to_regclass('deliveryevents.outbox') IS NOT NULL AND "
                "to_regclass('deliveryevents.outbox_order') IS NOT NULL AND "
                "to_regclass('deliveryevents.meta') IS NOT NULL");

    if (has == 0)
        fprintf(stderr,
                "deliveryevents: %s: '%s' has no outbox (no "
                "deliveryevents.outbox table)\n",
                cmd, p->name);
    return has == 1 ? 0 : 1;
}

long pgt_list(const char *cmd, pgt *p, const char *type, int type_len,
              const char *id, int pending, int blocked, long limit,
              ol_emit_fn *emit, void *ctx)
{
    char sql[1800], t[300], lim[24];
    PGresult *r;
    int has_state;
    long n;

    if (outbox_tables(cmd, p) != 0 ||
        (has_state = pq_bool(cmd, p, "the schema",
                             "SELECT to_regclass('deliveryevents.relay_"
                             "state') IS NOT NULL AND to_regclass("
                             "'deliveryevents.relay_parked') IS NOT "
                             "NULL")) < 0)
        return -1;
    /* Without the relay's tables (no relay has run): cursor 0, nothing
     * held back. */
    snprintf(
        sql, sizeof sql,
        "WITH c AS (SELECT %s AS cursor), h AS (%s) SELECT o.position, "
        "e.event_id, e.subject_type, e.subject_id, e.action, e.version, "
        "e.recorded_at_ms, CASE WHEN h.position IS NOT NULL THEN "
        "'held-back' WHEN o.position > c.cursor THEN 'pending' ELSE "
        "'published' END, h.error FROM deliveryevents.outbox_order o JOIN "
        "deliveryevents.outbox e USING (id) CROSS JOIN c LEFT JOIN h ON "
        "h.position = o.position WHERE ($1::text IS NULL OR "
        "(e.subject_type = $1 AND e.subject_id = $2)) AND (NOT $3::boolean "
        "OR o.position > c.cursor OR h.position IS NOT NULL) AND (NOT "
        "$4::boolean OR h.position IS NOT NULL) ORDER BY o.position LIMIT "
        "$5::bigint",
        has_state ? "coalesce((SELECT value::bigint FROM "
                    "deliveryevents.relay_state WHERE key = 'cursor'), 0)"
                  : "0::bigint",
        has_state ? "SELECT position, error FROM deliveryevents.relay_parked"
                  : "SELECT NULL::bigint AS position, NULL::text AS error "
                    "WHERE false");
    snprintf(t, sizeof t, "%.*s", type_len, type ? type : "");
    snprintf(lim, sizeof lim, "%ld", limit);
    r = pq_query(cmd, p, "the outbox", sql, 5, type ? t : NULL, id,
                 pending ? "t" : "f", blocked ? "t" : "f",
                 limit > 0 ? lim : NULL);
    if (r == NULL)
        return -1;
    n = PQntuples(r);
    for (int j = 0; j < n; j++) {
        ol_row o = {
            .position = col_int(r, j, 0, 0),
            .event_id = col_text(r, j, 1),
            .subject_type = col_text(r, j, 2),
            .subject_id = col_text(r, j, 3),
            .action = col_text(r, j, 4),
            .version = col_int(r, j, 5, 0),
            .recorded_at_ms = col_int(r, j, 6, 0),
            .status = col_text(r, j, 7),
            .error = col_text(r, j, 8),
        };
        emit(&o, ctx);
    }
    PQclear(r);
    return n;
}

void pgt_setting(pgt *p, const char *key, char *buf, size_t size)
{
    char name[200];
    const char *const v[1] = {name};
    PGresult *r;

    snprintf(name, sizeof name, "setting.%s", key);
    buf[0] = '\0';
    r = PQexecParams(p->conn,
                     "SELECT value FROM deliveryevents.meta WHERE key = $1", 1,
                     NULL, v, NULL, NULL, 0);
    if (PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) == 1 &&
        !PQgetisnull(r, 0, 0))
        snprintf(buf, size, "%s", PQgetvalue(r, 0, 0));
    PQclear(r);
}

int pgt_status(const char *cmd, pgt *p, status_facts *f)
{
    char sql[1200], cur[24];
    int64_t v[6];
    PGresult *r;

    memset(f, 0, sizeof *f);
    f->database = p->name;
    f->relay_state = "deliveryevents.relay_*";
    f->pg = 1;
    f->hb = -1;
    f->epoch = -1;
    f->sz_wal = f->sz_state = f->sz_state_wal = -1;
    f->blocked = json_array();
    if (outbox_tables(cmd, p) != 0)
        return 1;
    r = pq_query(
        cmd, p, "the outbox's meta",
        "SELECT to_regclass('deliveryevents.relay_state') IS NOT "
        "NULL AND to_regclass('deliveryevents.relay_lease') IS NOT "
        "NULL, pg_database_size(current_database()), (extract(epoch "
        "FROM clock_timestamp()) * 1000)::bigint, " META("outbox_id") ", " META(
            "schema_version") ", " META("relay_deleted_upto"),
        0, NULL, NULL, NULL, NULL, NULL);
    if (r == NULL)
        return 1;
    f->has_state = strcmp(PQgetvalue(r, 0, 0), "t") == 0;
    f->sz_db = col_int(r, 0, 1, -1);
    f->lease_now = col_int(r, 0, 2, 0);
    copy_text(f->outbox_id, sizeof f->outbox_id, r, 0, 3);
    f->v_outbox = col_int(r, 0, 4, 0);
    f->deleted_upto = col_int(r, 0, 5, 0);
    PQclear(r);
    if (f->has_state && relay_facts(cmd, p, f) != 0)
        return 1;
    /* A position exists once its transaction committed (outbox_order). */
    snprintf(cur, sizeof cur, "%" PRId64, f->cursor);
    snprintf(sql, sizeof sql,
             "SELECT (SELECT count(*) FROM deliveryevents.outbox_order WHERE "
             "position > %s), (SELECT min(o.recorded_at_ms) FROM "
             "deliveryevents.outbox o JOIN deliveryevents.outbox_order p "
             "USING (id) WHERE p.position > %s%s), (SELECT o.recorded_at_ms "
             "FROM deliveryevents.outbox o JOIN deliveryevents.outbox_order "
             "p USING (id) WHERE p.position = %s), count(*), min(position), "
             "max(position) FROM deliveryevents.outbox_order",
             cur, cur,
             f->has_state ? " OR p.position IN (SELECT position FROM "
                            "deliveryevents.relay_parked)"
                          : "",
             cur);
    if (pq_ints(cmd, p, "the outbox", sql, 6, v, 0) != 0)
        return 1;
    f->pending = v[0] + f->parked;
    f->oldest = v[1];
    f->cursor_at = v[2];
    f->rows = v[3];
    f->min_pos = v[4];
    f->max_pos = v[5];
    return 0;
}

/* 0 when p has the consumer's tables, or 1 after saying why not. */
static int consumer_tables(const char *cmd, pgt *p)
{
    int has = pq_bool(
        cmd, p, "the schema",
        "SELECT to_regclass('deliveryevents.inbox') IS NOT NULL AND "
        "to_regclass('deliveryevents.inbox_dead_letter') IS NOT NULL AND "
        "to_regclass('deliveryevents.inbox_request') IS NOT NULL");

    if (has == 0)
        fprintf(stderr,
                "deliveryevents: %s: '%s' has no consumer tables (no "
                "deliveryevents.inbox or inbox_dead_letter table)\n",
                cmd, p->name);
    return has == 1 ? 0 : 1;
}

int pgt_consumer_status(const char *cmd, pgt *p, consumer_facts *f)
{
    int64_t v[10];
    PGresult *r;

    memset(f, 0, sizeof *f);
    f->database = p->name;
    f->sz_wal = -1;
    if (consumer_tables(cmd, p) != 0)
        return 1;
    if (pq_ints(cmd, p, "the consumer's tables",
                "SELECT " META(
                    "inbox_schema_version") ", (SELECT count(*) "
                                            "FROM deliveryevents.inbox), "
                                            "(SELECT count(*) FROM "
                                            "deliveryevents.inbox WHERE "
                                            "parked), count(*), count(*) "
                                            "FILTER (WHERE state = 'parked'), "
                                            "min(parked_ms), "
                                            "min(parked_ms) FILTER (WHERE "
                                            "state = 'parked'), (SELECT "
                                            "count(*) FROM "
                                            "deliveryevents.inbox_request "
                                            "WHERE done_at_ms "
                                            "IS NULL), (SELECT "
                                            "min(requested_at_ms) FROM "
                                            "deliveryevents.inbox_request "
                                            "WHERE done_at_ms IS NULL), "
                                            "pg_database_size(current_database("
                                            ")) FROM "
                                            "deliveryevents.inbox_dead_letter",
                10, v, 0) != 0)
        return 1;
    f->version = v[0];
    f->subjects = v[1];
    f->parked = v[2];
    f->dl_total = v[3];
    f->dl_parked = v[4];
    f->oldest = v[5];
    f->oldest_parked = v[6];
    f->has_requests = 1;
    f->queued = v[7];
    f->oldest_queued = v[8];
    f->sz_db = v[9];
    f->by = json_array();
    f->plist = json_array();
    r = pq_query(cmd, p, "the dead letters",
                 "SELECT kind, state, count(*), min(parked_ms) FROM "
                 "deliveryevents.inbox_dead_letter GROUP BY kind, state "
                 "ORDER BY kind, state",
                 0, NULL, NULL, NULL, NULL, NULL);
    if (r == NULL)
        return 1;
    for (int j = 0; j < PQntuples(r); j++)
        json_array_append_new(
            f->by, by_kind_entry(col_text(r, j, 0), col_text(r, j, 1),
                                 col_int(r, j, 2, 0), col_int(r, j, 3, 0)));
    PQclear(r);
    /* The parked subjects, first parked first, with their first parked
     * event's kind and error. */
    r = pq_query(
        cmd, p, "the parked subjects",
        "SELECT i.subject_type, i.subject_id, count(d.id), min(d.parked_ms), "
        "(array_agg(d.kind ORDER BY d.id))[1], (array_agg(d.error ORDER BY "
        "d.id))[1] FROM deliveryevents.inbox i LEFT JOIN "
        "deliveryevents.inbox_dead_letter d ON d.subject_type = "
        "i.subject_type AND d.subject_id = i.subject_id AND d.state = "
        "'parked' WHERE i.parked GROUP BY i.subject_type, i.subject_id "
        "ORDER BY 4 NULLS FIRST, 1, 2",
        0, NULL, NULL, NULL, NULL, NULL);
    if (r == NULL)
        return 1;
    for (int j = 0; j < PQntuples(r); j++)
        json_array_append_new(
            f->plist, parked_entry(col_text(r, j, 0), col_text(r, j, 1),
                                   col_int(r, j, 2, 0), col_int(r, j, 3, 0),
                                   col_text(r, j, 4), col_text(r, j, 5)));
    PQclear(r);
    return 0;
}

long pgt_dead_letters(const char *cmd, pgt *p, const char *type, int type_len,
                      const char *id, int parked, long limit, dl_emit_fn *emit,
                      void *ctx)
{
    char t[300], lim[24];
    PGresult *r;
    long n;

    if (consumer_tables(cmd, p) != 0)
        return -1;
    snprintf(t, sizeof t, "%.*s", type_len, type ? type : "");
    snprintf(lim, sizeof lim, "%ld", limit);
    r = pq_query(cmd, p, "the dead letters",
                 "SELECT id, kind, state, subject_type, subject_id, "
                 "coalesce(epoch, 0), seq, event_id, action, type, topic, "
                 "kafka_partition, kafka_offset, error, attempts, parked_ms "
                 "FROM deliveryevents.inbox_dead_letter WHERE ($1::text IS "
                 "NULL OR (subject_type = $1 AND subject_id = $2)) AND (NOT "
                 "$3::boolean OR state = 'parked') ORDER BY id LIMIT "
                 "$4::bigint",
                 4, type ? t : NULL, id, parked ? "t" : "f",
                 limit > 0 ? lim : NULL, NULL);
    if (r == NULL)
        return -1;
    n = PQntuples(r);
    for (int j = 0; j < n; j++) {
        dl_row d = {
            .id = col_int(r, j, 0, 0),
            .kind = col_text(r, j, 1),
            .state = col_text(r, j, 2),
            .subject_type = col_text(r, j, 3),
            .subject_id = col_text(r, j, 4),
            .epoch = col_int(r, j, 5, 0),
            .seq = col_int(r, j, 6, 0),
            .numbered = !PQgetisnull(r, j, 6),
            .event_id = col_text(r, j, 7),
            .action = col_text(r, j, 8),
            .type = col_text(r, j, 9),
            .topic = col_text(r, j, 10),
            .partition = col_int(r, j, 11, 0),
            .offset = col_int(r, j, 12, 0),
            .error = col_text(r, j, 13),
            .attempts = col_int(r, j, 14, 0),
            .parked_at_ms = col_int(r, j, 15, 0),
        };
        emit(&d, ctx);
    }
    PQclear(r);
    return n;
}

json_t *pgt_contracts(const char *cmd, pgt *p)
{
    PGresult *r;
    json_t *all;
    json_error_t je;

    if ((r = pq_query(cmd, p, "the schema",
                      "SELECT to_regclass('deliveryevents.meta') IS NOT NULL, "
                      "to_regclass('deliveryevents.contracts') IS NOT NULL",
                      0, NULL, NULL, NULL, NULL, NULL)) == NULL)
        return NULL;
    if (strcmp(PQgetvalue(r, 0, 0), "t") != 0) {
        fprintf(stderr,
                "deliveryevents: %s: '%s' has no outbox (no "
                "deliveryevents.meta table)\n",
                cmd, p->name);
        PQclear(r);
        return NULL;
    }
    all = json_array();
    if (strcmp(PQgetvalue(r, 0, 1), "t") != 0) {
        PQclear(r);
        return all;
    }
    PQclear(r);
    if ((r = pq_query(cmd, p, "the contracts",
                      "SELECT subject_type, action, version, defined_at_ms, "
                      "schema FROM deliveryevents.contracts ORDER BY "
                      "subject_type COLLATE \"C\", action COLLATE \"C\", "
                      "version",
                      0, NULL, NULL, NULL, NULL, NULL)) == NULL) {
        json_decref(all);
        return NULL;
    }
    for (int j = 0; j < PQntuples(r); j++) {
        json_t *c = json_object(),
               *schema =
                   json_loads(col_text(r, j, 4), JSON_REJECT_DUPLICATES, &je);
        if (!json_is_object(schema)) {
            fprintf(stderr,
                    "deliveryevents: %s: '%s': a row of "
                    "deliveryevents.contracts is malformed (%s.%s v%s)\n",
                    cmd, p->name, col_text(r, j, 0), col_text(r, j, 1),
                    col_text(r, j, 2));
            json_decref(schema);
            json_decref(c);
            json_decref(all);
            PQclear(r);
            return NULL;
        }
        json_object_set_new(c, "subject_type", json_string(col_text(r, j, 0)));
        json_object_set_new(c, "action", json_string(col_text(r, j, 1)));
        json_object_set_new(c, "version", json_integer(col_int(r, j, 2, 0)));
        json_object_set_new(c, "defined_at_ms",
                            json_integer(col_int(r, j, 3, 0)));
        json_object_set_new(c, "schema", schema);
        json_array_append_new(all, c);
    }
    PQclear(r);
    return all;
}

int pgt_parked(const char *cmd, pgt *p, const char *type, int type_len,
               const char *id)
{
    char t[300];
    PGresult *r;
    int v;

    if (consumer_tables(cmd, p) != 0)
        return -1;
    snprintf(t, sizeof t, "%.*s", type_len, type);
    r = pq_query(cmd, p, "the subject",
                 "SELECT EXISTS (SELECT 1 FROM deliveryevents.inbox WHERE "
                 "subject_type = $1 AND subject_id = $2 AND parked) OR "
                 "EXISTS (SELECT 1 FROM deliveryevents.inbox_dead_letter "
                 "WHERE subject_type = $1 AND subject_id = $2 AND state = "
                 "'parked')",
                 2, t, id, NULL, NULL, NULL);
    if (r == NULL)
        return -1;
    v = strcmp(PQgetvalue(r, 0, 0), "t") == 0;
    PQclear(r);
    return v;
}

int64_t pgt_request(const char *cmd, pgt *p, const char *type, int type_len,
                    const char *id, const char *action, int64_t now)
{
    char t[300], when[24];
    PGresult *r;
    int64_t v;

    snprintf(t, sizeof t, "%.*s", type_len, type);
    snprintf(when, sizeof when, "%" PRId64, now);
    r = pq_query(cmd, p, "the request table",
                 "INSERT INTO deliveryevents.inbox_request(subject_type, "
                 "subject_id, action, requested_at_ms) VALUES ($1, $2, $3, "
                 "$4::bigint) RETURNING id",
                 4, t, id, action, when, NULL);
    if (r == NULL)
        return -1;
    v = col_int(r, 0, 0, -1);
    PQclear(r);
    return v;
}

int pgt_request_state(const char *cmd, pgt *p, int64_t req, char *buf,
                      size_t size)
{
    char num[24];
    PGresult *r;
    int v;

    snprintf(num, sizeof num, "%" PRId64, req);
    r = pq_query(cmd, p, "the request",
                 "SELECT done_at_ms IS NOT NULL, result FROM "
                 "deliveryevents.inbox_request WHERE id = $1::bigint",
                 1, num, NULL, NULL, NULL, NULL);
    if (r == NULL)
        return -1;
    if (PQntuples(r) == 0) {
        fprintf(stderr,
                "deliveryevents: %s: request %" PRId64 " is gone from '%s' "
                "before it was done\n",
                cmd, req, p->name);
        PQclear(r);
        return -1;
    }
    v = strcmp(PQgetvalue(r, 0, 0), "t") == 0;
    snprintf(buf, size, "%s",
             col_text(r, 0, 1) ? col_text(r, 0, 1) : "done, without a result");
    PQclear(r);
    return v;
}

de_err pgt_replay(const char *conninfo, const de_conf *conf,
                  const de_replay_select *sel, int timeout_ms,
                  de_replay_result *out)
{
    return de_replay_pg(conninfo, conf, sel, timeout_ms, out);
}

de_err pgt_relay_start(const char *conninfo, const de_conf *conf,
                       de_relay **out)
{
    return de_relay_start_pg(conninfo, conf, out);
}

#endif /* DE_TOOL_PG */

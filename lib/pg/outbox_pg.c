/* SPDX-License-Identifier: MIT */
/*
 * outbox_pg.c -- the outbox in the host's PostgreSQL database: the schema
 * and its migrations, and the backend de_record writes through
 * (de__outbox_backend, see outbox.c for the checks that run first).
 *
 * Commit order (docs/POSTGRESQL-INTERNALS.md, section 2): a row gets its
 * position not when de_record writes it but at the host's COMMIT, from a
 * deferred constraint trigger that takes the commit-order advisory lock
 * SHARED (transaction-scoped: released only after the commit is visible
 * or aborted) and then draws the position from a sequence.  Recorders
 * commit concurrently; the relay's barrier read (source_pg.c) takes the
 * same lock exclusive for an instant, which waits out exactly the
 * recorders that had drawn a position, so it never passes a position
 * that becomes visible later.  Positions therefore follow the order in
 * which recording transactions reached their commit.
 *
 * Wake-up: the trigger sends the NOTIFY that wakes the relay only while
 * the relay says it sleeps (sequence relay_sleeping, read with last_value:
 * sequences ignore the transaction's snapshot, so every isolation level
 * sees the relay's latest word).  It reads the flag after drawing its
 * position: a recorder whose position the relay's last read did not cover
 * drew it after that read, hence after the relay raised the flag, and
 * notifies.  PostgreSQL delivers the NOTIFY only if the transaction
 * commits; a NOTIFY in every commit would serialise recording commits
 * (PreCommit_Notify takes one cluster-wide lock until the commit ends).
 *
 * de_record itself is one INSERT on the host's connection -- a named
 * prepared statement (pg.record.prepared, the default), or the unnamed
 * statement, of which nothing is kept on the backend -- and nothing
 * else: every
 * check that can refuse an event has run before the server sees it, so a
 * refused event leaves the host's transaction as it was.  Contracts are checked
 * from the outbox's cache; the INSERT writes only if no definition was counted
 * (sequence contracts_version) since the cache was checked, and otherwise
 * writes nothing and has the cache reloaded so that de_record checks the event
 * again (insert_sql).  The one refusal the server makes, the INSERT itself
 * writing nothing, is of a replica session (session_replication_role).
 * A statement of the INSERT's name that is not ours is refused by its
 * text before it runs (ensure_prepared), or by its result's shape after
 * it ran (pg_insert: the host replaced it since).
 *
 * Invariants: the outbox borrows the host's PGconn and uses it on the
 * host's thread only; with pg.record.prepared its statement exists on the
 * backend whose pid is prepared_pid (prepared again after the host reset
 * the connection, or after the INSERT found it dropped: a host or pooler
 * running DEALLOCATE or DISCARD ALL), and without it the outbox keeps no
 * state on the backend; the
 * contracts cache holds every definition contracts_version counted
 * up to pg_outbox.seen.
 */
/* internal.h first: it marks the build (DE_BUILDING_LIBRARY) so that
 * DE_EXTERN exports what deliveryevents_pg.h declares. */
#include "pg_int.h"

#include "../contract.h"
#include "deliveryevents_pg.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PG_SCHEMA_VERSION 2
/* The recording INSERT's name on the host's session.  Its number
 * changes with insert_sql's text (or its result's shape): a backend may
 * still hold another library version's statement -- a session pooler
 * hands backends from process to process -- and the two must not meet
 * under one name. */
#define PG_RECORD_STMT "deliveryevents_record_2"

typedef struct pg_outbox {
    PGconn *conn;     /* borrowed from the host */
    bool prepared;    /* pg.record.prepared */
    int prepared_pid; /* backend holding PG_RECORD_STMT; 0: none */
    /* contracts_version values (see insert_sql): the cache holds every
     * definition counted up to seen; the INSERT expects expect, which is
     * seen except right after a reload whose snapshot could not see them
     * all (a REPEATABLE READ host transaction older than a definition). */
    int64_t seen, expect;
    /* Whether the cache was loaded once: the first look (at open) loads
     * whatever the counter says, so a definition whose definer died
     * before counting it is not missed by every later outbox. */
    bool loaded;
} pg_outbox;

/* Migration i takes the schema from version i to i + 1. */
static const char *const migrations[PG_SCHEMA_VERSION] = {
    /* 0 -> 1: the outbox, its commit order and the trigger that assigns
     * it.  outbox.id is insertion order only and never used to order
     * anything; outbox_order is narrow on purpose: the position is not
     * written into the (wide) outbox row, which would copy the payload
     * into a new row version and touch an index on every event. */
    "CREATE TABLE deliveryevents.outbox ("
    "  id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
    "  event_id text NOT NULL,"
    "  subject_type text NOT NULL,"
    "  subject_id text NOT NULL,"
    "  action text NOT NULL,"
    "  version integer NOT NULL,"
    "  occurred_at_ms bigint NOT NULL,"
    "  recorded_at_ms bigint NOT NULL,"
    "  payload text NOT NULL,"
    "  traceparent text,"
    "  tracestate text,"
    "  dataschema text"
    ");"
    "CREATE SEQUENCE deliveryevents.outbox_position AS bigint;"
    /* The relay's "I am going to sleep" flag (1) or not (0): a sequence,
     * set with setval, because a table row would be read with the host's
     * snapshot (a REPEATABLE READ host would not see the relay's word). */
    "CREATE SEQUENCE deliveryevents.relay_sleeping AS bigint MINVALUE 0 "
    "MAXVALUE 1 START 0;"
    "CREATE TABLE deliveryevents.outbox_order ("
    "  position bigint PRIMARY KEY,"
    "  id bigint NOT NULL"
    ");"
    /* Every name qualified (pg_catalog first) rather than a SET
     * search_path clause, which would cost a GUC save and restore per
     * row at every commit. */
    /* The order of the steps is the argument (see the top of this file
     * and source_pg.c): lock, then position, then the flag. */
    "CREATE FUNCTION deliveryevents.outbox_commit() RETURNS trigger "
    "LANGUAGE plpgsql AS $$\n"
    "BEGIN\n"
    "  PERFORM pg_catalog.pg_advisory_xact_lock_shared(" DE__PG_LOCK_CLASS
    ", " DE__PG_LOCK_ORDER ");\n"
    "  INSERT INTO deliveryevents.outbox_order(position, id) VALUES "
    "(pg_catalog.nextval('deliveryevents.outbox_position'), NEW.id);\n"
    "  IF (SELECT last_value FROM deliveryevents.relay_sleeping) <> 0 "
    "THEN\n"
    "    PERFORM pg_catalog.pg_notify('" DE__PG_CHANNEL "', '');\n"
    "  END IF;\n"
    "  RETURN NULL;\n"
    "END\n$$;"
    "CREATE CONSTRAINT TRIGGER outbox_commit AFTER INSERT ON "
    "deliveryevents.outbox DEFERRABLE INITIALLY DEFERRED FOR EACH ROW "
    "EXECUTE FUNCTION deliveryevents.outbox_commit();",
    /* 1 -> 2: contracts (de_outbox_define), as SQLite's de_contracts.
     * contracts_version counts the definitions stored: every define bumps
     * it (nextval) after its row committed, and the recording INSERT
     * reads it with last_value -- not transactional, so no snapshot hides
     * a bump -- to learn that its cache is stale. */
    "CREATE TABLE deliveryevents.contracts ("
    "  id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
    "  subject_type text NOT NULL,"
    "  action text NOT NULL,"
    "  version integer NOT NULL,"
    "  schema text NOT NULL,"
    "  defined_at_ms bigint NOT NULL,"
    "  UNIQUE (subject_type, action, version)"
    ");"
    "CREATE SEQUENCE deliveryevents.contracts_version AS bigint;",
};

/* How many definitions were stored (0 before the first nextval). */
#define CONTRACTS_VERSION                                                      \
    "SELECT CASE WHEN is_called THEN last_value ELSE 0 END AS n "              \
    "FROM deliveryevents.contracts_version"

/* The event is written only when contracts_version is still $12, the
 * value the cache was checked against, and the session is not a replica
 * session (session_replication_role = replica, where the commit trigger
 * does not fire: the event would get no position and never be
 * published); either way the statement returns the value it read, how
 * many rows it wrote and whether the session is one.  One round trip: a
 * stale cache is found out without a read before the write, and without
 * a write that would have to be undone (a savepoint per record would
 * cost two more round trips). */
static const char insert_sql[] =
    "WITH v AS (SELECT c.n, pg_catalog.current_setting("
    "'session_replication_role') = 'replica' AS replica FROM "
    "(" CONTRACTS_VERSION ") c), ins AS ("
    "INSERT INTO deliveryevents.outbox(event_id, subject_type, subject_id, "
    "action, version, occurred_at_ms, recorded_at_ms, payload, traceparent, "
    "tracestate, dataschema) SELECT $1, $2, $3, $4, $5::integer, $6::bigint, "
    "$7::bigint, $8, $9, $10, $11 FROM v WHERE v.n = $12::bigint AND NOT "
    "v.replica RETURNING 1) SELECT v.n, (SELECT count(*) FROM ins), "
    "v.replica FROM v";

/* The server's message without its trailing newline, in buf. */
static const char *pg_message(const char *msg, char *buf, size_t size)
{
    size_t n;

    snprintf(buf, size, "%s", msg ? msg : "");
    n = strlen(buf);
    while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == ' '))
        buf[--n] = '\0';
    return buf[0] ? buf : "no message from libpq";
}

de_err de__pg_fail(PGconn *conn, PGresult *r, const char *what)
{
    char msg[512];
    de_err err =
        de__fail(DE_ERR_DB, "%s: %s", what,
                 pg_message(r ? PQresultErrorMessage(r) : PQerrorMessage(conn),
                            msg, sizeof msg));

    PQclear(r);
    return err;
}

de_err de__pg_exec(PGconn *conn, const char *sql, ExecStatusType want,
                   PGresult **res, const char *what)
{
    return de__pg_params(conn, sql, 0, NULL, want, res, what);
}

de_err de__pg_params(PGconn *conn, const char *sql, int n,
                     const char *const *values, ExecStatusType want,
                     PGresult **res, const char *what)
{
    /* Without parameters: the simple protocol, which takes several
     * statements in one string (the migrations). */
    PGresult *r = n == 0
                      ? PQexec(conn, sql)
                      : PQexecParams(conn, sql, n, NULL, values, NULL, NULL, 0);

    if (r == NULL || PQresultStatus(r) != want)
        return de__pg_fail(conn, r, what);
    if (res != NULL)
        *res = r;
    else
        PQclear(r);
    return DE_OK;
}

/*
 * The migration both the outbox and the consumer run (whose: "the
 * outbox's", "the consumer's"): BEGIN, the migration advisory lock (so
 * that instances starting together migrate one at a time), schema
 * deliveryevents and its meta table, then steps[version .. n-1] from the
 * version stored under meta's version_key, which is then set to n.  A
 * stored version above n (a newer library wrote it) is refused.  On
 * success the transaction is left open for the caller's own steps and
 * COMMIT; on failure it is rolled back.
 */
de_err de__pg_migrate(PGconn *conn, const char *whose, const char *version_key,
                      const char *const *steps, int n)
{
    char what[160];
    const char *params[1] = {version_key};
    PGresult *r = NULL;
    int version = 0;
    bool exists;
    de_err err;

    snprintf(what, sizeof what, "cannot begin %s migration", whose);
    /* READ COMMITTED whatever the session's default: under REPEATABLE
     * READ or SERIALIZABLE the snapshot would be taken by the statement
     * that waits for the lock, before the instance holding it committed
     * its migration, and this one would run it again and fail. */
    if ((err = de__pg_exec(conn, DE__PG_BEGIN_RC, PGRES_COMMAND_OK, NULL,
                           what)) != DE_OK)
        return err;
    /* SET LOCAL: no "already exists, skipping" notices on the host's
     * connection, and the host's own setting back at COMMIT. */
    snprintf(what, sizeof what, "cannot lock %s schema", whose);
    if ((err = de__pg_exec(
             conn,
             "SET LOCAL client_min_messages = warning;"
             "SELECT pg_catalog.pg_advisory_xact_lock(" DE__PG_LOCK_CLASS
             ", " DE__PG_LOCK_MIGRATE ")",
             PGRES_TUPLES_OK, NULL, what)) != DE_OK ||
        (err =
             de__pg_exec(conn,
                         "SELECT pg_catalog.to_regclass('deliveryevents.meta') "
                         "IS NOT NULL",
                         PGRES_TUPLES_OK, &r, what)) != DE_OK)
        goto fail;
    /* CREATE ... IF NOT EXISTS checks the CREATE privilege first, even
     * when there is nothing to create: only a missing schema is created,
     * so that roles without it (docs/POSTGRESQL.md, "Privileges") open. */
    exists = strcmp(PQgetvalue(r, 0, 0), "t") == 0;
    PQclear(r);
    if (!exists && (err = de__pg_exec(
                        conn,
                        "CREATE SCHEMA IF NOT EXISTS deliveryevents;"
                        "CREATE TABLE IF NOT EXISTS deliveryevents.meta ("
                        "  key text PRIMARY KEY, value text NOT NULL)",
                        PGRES_COMMAND_OK, NULL,
                        "cannot create schema deliveryevents (the role needs "
                        "CREATE on the database once)")) != DE_OK)
        goto fail;
    r = PQexecParams(conn,
                     "SELECT value FROM deliveryevents.meta WHERE key = $1", 1,
                     NULL, params, NULL, NULL, 0);
    if (r == NULL || PQresultStatus(r) != PGRES_TUPLES_OK) {
        snprintf(what, sizeof what, "cannot read %s schema version", whose);
        err = de__pg_fail(conn, r, what);
        goto fail;
    }
    if (PQntuples(r) == 1)
        version = atoi(PQgetvalue(r, 0, 0));
    PQclear(r);
    if (version > n) {
        err = de__fail(DE_ERR_STATE,
                       "%s schema is version %d, newer than this library's "
                       "%d; upgrade libdeliveryevents-pg",
                       whose, version, n);
        goto fail;
    }
    if (version == n)
        return DE_OK; /* current: nothing to write */
    for (int i = version; i < n; i++) {
        snprintf(what, sizeof what,
                 "cannot migrate %s schema from version %d to %d", whose, i,
                 i + 1);
        if ((err = de__pg_exec(conn, steps[i], PGRES_COMMAND_OK, NULL, what)) !=
            DE_OK)
            goto fail;
    }
    snprintf(what, sizeof what, "%d", n);
    {
        const char *p2[2] = {version_key, what};
        r = PQexecParams(conn,
                         "INSERT INTO deliveryevents.meta VALUES ($1, $2) "
                         "ON CONFLICT (key) DO UPDATE SET value = "
                         "excluded.value",
                         2, NULL, p2, NULL, NULL, 0);
    }
    if (r == NULL || PQresultStatus(r) != PGRES_COMMAND_OK) {
        snprintf(what, sizeof what, "cannot store %s schema version", whose);
        err = de__pg_fail(conn, r, what);
        goto fail;
    }
    PQclear(r);
    return DE_OK;
fail:
    if (PQtransactionStatus(conn) != PQTRANS_IDLE)
        PQclear(PQexec(conn, "ROLLBACK"));
    return err;
}

/*
 * Creates or migrates the schema in one transaction of its own, under an
 * advisory lock so that concurrent openers (several instances starting
 * together) run it one at a time; then raises the position sequence to
 * at least the highest position stored, in case the data came without
 * its sequence (logical replication, a partial restore): positions must
 * never be handed out twice.  That step holds the commit-order lock, so
 * no recorder draws a position meanwhile.
 */
de_err de__pg_schema_ensure(PGconn *conn, char outbox_id[37])
{
    char uuid[37];
    const char *params[1];
    PGresult *r = NULL;
    de_err err;

    if ((err = de__pg_migrate(conn, "the outbox's", "schema_version",
                              migrations, PG_SCHEMA_VERSION)) != DE_OK)
        return err;
    /* The outbox's identity, as on SQLite (schema.c): a relay that finds
     * its marks written for another outbox refuses them. */
    de__uuid7(uuid);
    params[0] = uuid;
    /* Written once, by whoever opens first: later openers (roles without
     * INSERT on meta) only read it. */
    if ((err = de__pg_exec(conn,
                           "SELECT 1 FROM deliveryevents.meta WHERE key = "
                           "'outbox_id'",
                           PGRES_TUPLES_OK, &r, "cannot read the outbox id")) !=
        DE_OK)
        goto fail;
    if (PQntuples(r) == 0) {
        PQclear(r);
        r = PQexecParams(conn,
                         "INSERT INTO deliveryevents.meta VALUES ('outbox_id', "
                         "$1) ON CONFLICT (key) DO NOTHING",
                         1, NULL, params, NULL, NULL, 0);
        if (r == NULL || PQresultStatus(r) != PGRES_COMMAND_OK) {
            err = de__pg_fail(conn, r, "cannot store the outbox id");
            goto fail;
        }
    }
    PQclear(r);
    if ((err = de__pg_exec(
             conn,
             "SELECT pg_catalog.pg_advisory_xact_lock(" DE__PG_LOCK_CLASS
             ", " DE__PG_LOCK_ORDER ");"
             "SELECT pg_catalog.setval('deliveryevents.outbox_position', m) "
             "FROM (SELECT max(position) AS m "
             "      FROM deliveryevents.outbox_order) AS x "
             "WHERE m >= (SELECT CASE WHEN is_called THEN last_value + 1 "
             "            ELSE last_value END "
             "            FROM deliveryevents.outbox_position)",
             PGRES_TUPLES_OK, NULL,
             "cannot check the outbox's position sequence")) != DE_OK ||
        (err = de__pg_exec(conn, "COMMIT", PGRES_COMMAND_OK, NULL,
                           "cannot commit the outbox's migration")) != DE_OK)
        goto fail;
    if (outbox_id != NULL) {
        if ((err = de__pg_exec(conn,
                               "SELECT value FROM deliveryevents.meta WHERE "
                               "key = 'outbox_id'",
                               PGRES_TUPLES_OK, &r,
                               "cannot read the outbox id")) != DE_OK)
            goto fail;
        if (PQntuples(r) != 1 || PQgetlength(r, 0, 0) != 36) {
            PQclear(r);
            err = de__fail(DE_ERR_STATE, "the outbox id in deliveryevents.meta "
                                         "is missing or malformed");
            goto fail;
        }
        memcpy(outbox_id, PQgetvalue(r, 0, 0), 37);
        PQclear(r);
    }
    return DE_OK;
fail:
    if (PQtransactionStatus(conn) != PQTRANS_IDLE)
        PQclear(PQexec(conn, "ROLLBACK"));
    return err;
}

/* Prepares the INSERT on the connection's current backend, unless it is
 * there already.  A host that reset its connection (PQreset) has a new
 * backend without it; the pid tells, without a round trip. */
static de_err ensure_prepared(pg_outbox *pg)
{
    int pid = PQbackendPID(pg->conn);
    PGresult *r;

    if (pid != 0 && pid == pg->prepared_pid)
        return DE_OK;
    /* Another outbox on this connection may have prepared it: look
     * first, as a failed Parse inside the host's transaction would abort
     * it.  Same name, same text (PG_RECORD_STMT); a statement of this
     * name with another text is not run. */
    {
        const char *text[1] = {insert_sql};
        r = PQexecParams(pg->conn,
                         "SELECT statement = $1 FROM "
                         "pg_catalog.pg_prepared_statements WHERE name = "
                         "'" PG_RECORD_STMT "'",
                         1, NULL, text, NULL, NULL, 0);
    }
    if (r == NULL || PQresultStatus(r) != PGRES_TUPLES_OK)
        return de__pg_fail(pg->conn, r,
                           "cannot look for the outbox's prepared INSERT");
    if (PQntuples(r) == 1) {
        bool ours = strcmp(PQgetvalue(r, 0, 0), "t") == 0;
        PQclear(r);
        if (!ours)
            return de__fail(DE_ERR_STATE,
                            "a statement named " PG_RECORD_STMT " is "
                            "prepared on this connection with a text that "
                            "is not this library's; DEALLOCATE " PG_RECORD_STMT
                            " (nothing was written)");
        pg->prepared_pid = pid;
        return DE_OK;
    }
    PQclear(r);
    r = PQprepare(pg->conn, PG_RECORD_STMT, insert_sql, 12, NULL);
    if (r == NULL || PQresultStatus(r) != PGRES_COMMAND_OK)
        return de__pg_fail(pg->conn, r, "cannot prepare the outbox's INSERT");
    PQclear(r);
    pg->prepared_pid = pid;
    return DE_OK;
}

static de_err pg_check_txn(void *ctx, const de_event *ev)
{
    pg_outbox *pg = ctx;
    char msg[512];

    if (PQstatus(pg->conn) != CONNECTION_OK)
        return de__fail(DE_ERR_DB,
                        "de_record for %s.%s: the PostgreSQL connection is "
                        "not open: %s",
                        ev->subject_type, ev->action,
                        pg_message(PQerrorMessage(pg->conn), msg, sizeof msg));
    if (PQpipelineStatus(pg->conn) != PQ_PIPELINE_OFF)
        return de__fail(DE_ERR_STATE,
                        "de_record for %s.%s: the connection is in pipeline "
                        "mode; record outside pipeline mode",
                        ev->subject_type, ev->action);
    switch (PQtransactionStatus(pg->conn)) {
    case PQTRANS_INTRANS: return DE_OK;
    case PQTRANS_IDLE:
        return de__fail(DE_ERR_NO_TXN,
                        "de_record for %s.%s was called outside a "
                        "transaction; record inside the BEGIN ... COMMIT "
                        "that makes the change it announces",
                        ev->subject_type, ev->action);
    case PQTRANS_INERROR:
        return de__fail(DE_ERR_STATE,
                        "de_record for %s.%s: the host's transaction has "
                        "already failed (an earlier statement's error); roll "
                        "it back first",
                        ev->subject_type, ev->action);
    case PQTRANS_ACTIVE:
        return de__fail(DE_ERR_STATE,
                        "de_record for %s.%s: a command is still in progress "
                        "on the connection; read its results first",
                        ev->subject_type, ev->action);
    default:
        return de__fail(DE_ERR_DB,
                        "de_record for %s.%s: the PostgreSQL connection is "
                        "in an unknown state",
                        ev->subject_type, ev->action);
    }
}

/*
 * Loads into cs the stored definitions it lacks, after contracts_version
 * read v.  Every definition is read, not only those above the highest id
 * seen: two defines may commit in the other order than they drew their
 * ids.  A bump follows its row's commit, so a snapshot taken after v was
 * read sees every definition v counts -- unless the host's transaction is
 * REPEATABLE READ or SERIALIZABLE and older: then cs holds fewer than v,
 * seen stays, and the next record loads again.
 */
static de_err reload(pg_outbox *pg, de__contract_set *cs, int64_t v)
{
    PGresult *r =
        PQexec(pg->conn, "SELECT id, subject_type, action, version, schema "
                         "FROM deliveryevents.contracts ORDER BY id");
    de_err err = DE_OK;
    size_t n;

    if (r == NULL || PQresultStatus(r) != PGRES_TUPLES_OK)
        return de__pg_fail(pg->conn, r, "cannot read the contracts");
    for (int i = 0; i < PQntuples(r) && err == DE_OK; i++) {
        const char *type = PQgetvalue(r, i, 1), *act = PQgetvalue(r, i, 2);
        int version = atoi(PQgetvalue(r, i, 3));
        const de__contract_def *d;

        d = de__contract_set_find(cs, type, act, version, &n);
        if (d != NULL && d->version == version)
            continue;
        err = de__contract_set_add_stored(
            cs, PQdb(pg->conn), "deliveryevents.contracts",
            strtoll(PQgetvalue(r, i, 0), NULL, 10), type, act, version,
            PQgetvalue(r, i, 4), (size_t)PQgetlength(r, i, 4));
    }
    PQclear(r);
    if (err != DE_OK)
        return err;
    if (de__contract_set_count(cs) >= (size_t)v)
        pg->seen = v;
    pg->expect = v;
    pg->loaded = true;
    return DE_OK;
}

static de_err pg_refresh(void *ctx, de__contract_set *cs, bool *changed)
{
    pg_outbox *pg = ctx;
    size_t before = de__contract_set_count(cs);
    PGresult *r = PQexec(pg->conn, CONTRACTS_VERSION);
    int64_t v;
    de_err err;

    *changed = false;
    if (r == NULL || PQresultStatus(r) != PGRES_TUPLES_OK || PQntuples(r) != 1)
        return de__pg_fail(pg->conn, r, "cannot read the contracts' version");
    v = strtoll(PQgetvalue(r, 0, 0), NULL, 10);
    PQclear(r);
    if (pg->loaded && v == pg->seen && v == pg->expect)
        return DE_OK;
    if ((err = reload(pg, cs, v)) != DE_OK)
        return err;
    *changed = de__contract_set_count(cs) != before;
    return DE_OK;
}

static de_err pg_insert(void *ctx, de__contract_set *cs,
                        const de__outbox_row *row, int64_t *position)
{
    pg_outbox *pg = ctx;
    char version[16], occurred[24], recorded[24], expect[24], what[512];
    const char *values[12];
    PGresult *r;
    int64_t v;
    de_err err;

    snprintf(version, sizeof version, "%d", row->version);
    snprintf(occurred, sizeof occurred, "%lld", (long long)row->occurred_at_ms);
    snprintf(recorded, sizeof recorded, "%lld", (long long)row->recorded_at_ms);
    snprintf(expect, sizeof expect, "%lld", (long long)pg->expect);
    values[0] = row->event_id;
    values[1] = row->subject_type;
    values[2] = row->subject_id;
    values[3] = row->action;
    values[4] = version;
    values[5] = occurred;
    values[6] = recorded;
    values[7] = row->payload; /* NUL-terminated: payload_len is its strlen */
    values[8] = row->traceparent;
    values[9] = row->tracestate;
    values[10] = row->dataschema;
    values[11] = expect;
    if (pg->prepared) {
        /* Parsed and planned once per backend; a host (or pooler) that
         * drops it makes this INSERT fail, which aborts the host's
         * transaction: said below, and prepared again next time. */
        if ((err = ensure_prepared(pg)) != DE_OK)
            return err;
        r = PQexecPrepared(pg->conn, PG_RECORD_STMT, 12, values, NULL, NULL, 0);
    } else {
        /* The unnamed statement: parsed and planned with every call, but
         * nothing of it lives on the backend between calls, so a host
         * (or a pooler) running DEALLOCATE ALL or DISCARD ALL cannot make
         * it fail.  Still one round trip. */
        r = PQexecParams(pg->conn, insert_sql, 12, NULL, values, NULL, NULL, 0);
    }
    if (r != NULL &&
        (PQresultStatus(r) == PGRES_COMMAND_OK ||
         PQresultStatus(r) == PGRES_TUPLES_OK) &&
        (PQnfields(r) != 3 || PQntuples(r) != 1)) {
        /* Not ours: the host replaced the statement of this name on the
         * session after the outbox prepared it.  It ran, so it may have
         * written; it is looked for again next time (ensure_prepared). */
        int rows = PQntuples(r), fields = PQnfields(r);
        PQclear(r);
        pg->prepared_pid = 0;
        return de__fail(DE_ERR_STATE,
                        "recording %s.%s: the statement " PG_RECORD_STMT
                        " prepared on this connection is not this "
                        "library's (it returned %d rows of %d columns, not "
                        "1 of 3); roll the transaction back, as it may "
                        "have written, and DEALLOCATE " PG_RECORD_STMT,
                        row->subject_type, row->action, rows, fields);
    }
    if (r == NULL || PQresultStatus(r) != PGRES_TUPLES_OK ||
        PQntuples(r) != 1) {
        const char *state =
            r != NULL ? PQresultErrorField(r, PG_DIAG_SQLSTATE) : NULL;
        /* A failed statement aborts a PostgreSQL transaction: say so. */
        if (pg->prepared && state != NULL && strcmp(state, "26000") == 0) {
            pg->prepared_pid = 0; /* gone: prepared again next time */
            snprintf(what, sizeof what,
                     "recording %s.%s failed: the outbox's prepared "
                     "statement " PG_RECORD_STMT " was dropped on this "
                     "connection (DEALLOCATE or DISCARD ALL, e.g. by a "
                     "pooler), and PostgreSQL aborted the host's "
                     "transaction (roll it back; the next de_record "
                     "prepares it again; with pg.record.prepared=false "
                     "nothing is kept on the connection)",
                     row->subject_type, row->action);
        } else {
            snprintf(what, sizeof what,
                     "recording %s.%s failed and PostgreSQL aborted the "
                     "host's transaction (roll it back)",
                     row->subject_type, row->action);
        }
        return de__pg_fail(pg->conn, r, what);
    }
    if (strcmp(PQgetvalue(r, 0, 2), "t") == 0) {
        PQclear(r);
        return de__fail(DE_ERR_STATE,
                        "recording %s.%s refused: session_replication_role "
                        "is 'replica' on this connection, where the outbox's "
                        "commit trigger does not fire and the event would "
                        "never be published; record with "
                        "session_replication_role = 'origin' (nothing was "
                        "written; the transaction is still usable)",
                        row->subject_type, row->action);
    }
    v = strtoll(PQgetvalue(r, 0, 0), NULL, 10);
    if (strcmp(PQgetvalue(r, 0, 1), "1") != 0) {
        /* Written nothing: contracts were defined since the cache was
         * checked.  Load them; de_record checks the event again. */
        PQclear(r);
        if ((err = reload(pg, cs, v)) != DE_OK)
            return err;
        return DE__AGAIN;
    }
    PQclear(r);
    /* After a reload that could not see every definition, the next
     * record (maybe in a newer transaction) loads again. */
    pg->expect = pg->seen;
    *position = 0; /* assigned at commit (docs/POSTGRESQL-INTERNALS.md) */
    return DE_OK;
}

/*
 * de_outbox_define on PostgreSQL, on the host's connection outside a
 * transaction, as on SQLite: the INSERT commits on its own (autocommit);
 * a row already there for the version (ON CONFLICT waits for a concurrent
 * definer's commit) is compared by meaning.  Then contracts_version is
 * bumped -- after the commit, so that whoever sees the bump sees the row.
 * A definer killed between the two leaves its definition uncounted until
 * the next definition (or the next open) loads it.
 */
static de_err pg_define(void *ctx, de__contract_set *cs,
                        const char *subject_type, const char *action,
                        int version, const char *schema_json)
{
    pg_outbox *pg = ctx;
    de__contract *schema = NULL;
    char num[16], now[24], what[200];
    const char *values[5] = {subject_type, action, num, schema_json, now};
    PGresult *r = NULL;
    bool changed;
    de_err err;

    if (PQtransactionStatus(pg->conn) != PQTRANS_IDLE)
        return de__fail(DE_ERR_STATE,
                        "de_outbox_define for %s.%s v%d was called inside a "
                        "transaction; define contracts outside one (at "
                        "startup): a definition commits on its own",
                        subject_type, action, version);
    if ((err = de__contract_prepare(subject_type, action, version, schema_json,
                                    &schema)) != DE_OK)
        return err;
    snprintf(num, sizeof num, "%d", version);
    snprintf(now, sizeof now, "%lld", (long long)de__now_ms());
    snprintf(what, sizeof what, "cannot store the contract %s.%s v%d",
             subject_type, action, version);
    if ((err = de__pg_params(
             pg->conn,
             "INSERT INTO deliveryevents.contracts(subject_type, action, "
             "version, schema, defined_at_ms) VALUES ($1, $2, $3::integer, "
             "$4, $5::bigint) ON CONFLICT (subject_type, action, version) DO "
             "NOTHING RETURNING id",
             5, values, PGRES_TUPLES_OK, &r, what)) != DE_OK)
        goto fail;
    if (PQntuples(r) == 1) {
        if ((err = de__pg_exec(pg->conn,
                               "SELECT pg_catalog.nextval("
                               "'deliveryevents.contracts_version')",
                               PGRES_TUPLES_OK, NULL, what)) != DE_OK)
            goto fail;
    } else {
        PQclear(r);
        r = NULL;
        if ((err = de__pg_params(pg->conn,
                                 "SELECT schema FROM deliveryevents.contracts "
                                 "WHERE subject_type = $1 AND action = $2 AND "
                                 "version = $3::integer",
                                 3, values, PGRES_TUPLES_OK, &r,
                                 "cannot read the contracts")) != DE_OK)
            goto fail;
        if (PQntuples(r) != 1) {
            err = de__fail(DE_ERR_STATE,
                           "the contract %s.%s v%d was neither stored nor "
                           "found (deleted meanwhile?)",
                           subject_type, action, version);
            goto fail;
        }
        if ((err = de__contract_same(subject_type, action, version,
                                     PQgetvalue(r, 0, 0), schema)) != DE_OK)
            goto fail;
    }
    /* The cache takes it (and whatever others defined) from the table. */
    err = pg_refresh(pg, cs, &changed);
fail:
    PQclear(r);
    de__contract_free(schema);
    return err;
}

/*
 * Stores the wire settings (DE__WIRE_KEYS) that conf sets explicitly, as
 * on SQLite (schema.c, de__outbox_store_settings): every relay of the
 * database publishes with them.  One transaction; a changed value is
 * logged.
 */
static de_err store_settings(PGconn *conn, const de_conf *conf)
{
    static const de__key wire[] = DE__WIRE_KEYS;
    char name[96];
    de_err err;

    /* READ COMMITTED: see de__pg_migrate (two instances storing the
     * same new setting at once). */
    if ((err = de__pg_exec(conn, DE__PG_BEGIN_RC, PGRES_COMMAND_OK, NULL,
                           "cannot store the outbox's settings")) != DE_OK)
        return err;
    for (size_t i = 0; i < DE__ARRAY_LEN(wire); i++) {
        const char *values[2] = {name, de__conf_str(conf, wire[i])};
        PGresult *r;

        bool same;
        if (!de__conf_is_set(conf, wire[i]))
            continue;
        snprintf(name, sizeof name, "setting.%s", de__conf_key_name(wire[i]));
        /* Stored already: nothing to write (a role without write access
         * to meta opens with the settings the owner stored). */
        r = PQexecParams(conn,
                         "SELECT 1 FROM deliveryevents.meta WHERE key = $1 "
                         "AND value = $2",
                         2, NULL, values, NULL, NULL, 0);
        if (r == NULL || PQresultStatus(r) != PGRES_TUPLES_OK) {
            err = de__pg_fail(conn, r, "cannot read the outbox's settings");
            PQclear(PQexec(conn, "ROLLBACK"));
            return err;
        }
        same = PQntuples(r) == 1;
        PQclear(r);
        if (same)
            continue;
        /* The CTE reads the value from before the statement. */
        r = PQexecParams(conn,
                         "WITH old AS (SELECT value FROM deliveryevents.meta "
                         "WHERE key = $1) INSERT INTO deliveryevents.meta "
                         "VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET "
                         "value = excluded.value RETURNING (SELECT value "
                         "FROM old)",
                         2, NULL, values, NULL, NULL, 0);
        if (r == NULL || PQresultStatus(r) != PGRES_TUPLES_OK) {
            err = de__pg_fail(conn, r, "cannot store the outbox's settings");
            PQclear(PQexec(conn, "ROLLBACK"));
            return err;
        }
        if (!PQgetisnull(r, 0, 0) && strcmp(PQgetvalue(r, 0, 0), values[1]))
            de__log(conf, DE_LOG_NOTICE,
                    "outbox in PostgreSQL database '%s': %s changed from "
                    "'%s' to '%s'; every relay started from now on "
                    "publishes with it",
                    PQdb(conn), de__conf_key_name(wire[i]), PQgetvalue(r, 0, 0),
                    values[1]);
        PQclear(r);
    }
    return de__pg_exec(conn, "COMMIT", PGRES_COMMAND_OK, NULL,
                       "cannot store the outbox's settings");
}

static void pg_close(void *ctx)
{
    free(ctx);
}

static de_err pg_relay_start(void *ctx, de_outbox *ob, de_conf *conf,
                             de_relay **out)
{
    return de__relay_start_pg_host(((pg_outbox *)ctx)->conn, ob, conf, out);
}

static const de__outbox_backend pg_backend = {
    .name = "PostgreSQL",
    .check_txn = pg_check_txn,
    .insert = pg_insert,
    .relay_start = pg_relay_start,
    .refresh = pg_refresh,
    .define = pg_define,
    .close = pg_close,
};

/* Refuses an outbox whose commit trigger would not fire in this
 * session: disabled (ALTER TABLE ... DISABLE TRIGGER, left so by an
 * interrupted pg_restore --disable-triggers), enabled for replica
 * sessions only, or missing.  Events recorded then would get no position and
 * never be published.  (Replica sessions are refused per event: insert_sql.) */
static de_err check_trigger(PGconn *conn)
{
    PGresult *r = NULL;
    de_err err;
    char state;

    if ((err = de__pg_exec(conn,
                           "SELECT tgenabled FROM pg_catalog.pg_trigger WHERE "
                           "tgrelid = 'deliveryevents.outbox'::regclass AND "
                           "tgname = 'outbox_commit'",
                           PGRES_TUPLES_OK, &r,
                           "cannot check the outbox's commit trigger")) !=
        DE_OK)
        return err;
    state = PQntuples(r) == 1 ? PQgetvalue(r, 0, 0)[0] : '-';
    PQclear(r);
    if (state == 'O' || state == 'A')
        return DE_OK;
    if (state == '-')
        return de__fail(
            DE_ERR_STATE,
            "the outbox's commit trigger outbox_commit on "
            "deliveryevents.outbox is missing: events recorded "
            "would never be published; the schema deliveryevents is "
            "incomplete: restore it whole, from a dump that holds its "
            "triggers (pg_restore of a full or --schema=deliveryevents "
            "dump, not --data-only)");
    return de__fail(
        DE_ERR_STATE,
        "the outbox's commit trigger outbox_commit on "
        "deliveryevents.outbox is %s (pg_trigger.tgenabled '%c'): "
        "events recorded would never be published; run ALTER "
        "TABLE deliveryevents.outbox ENABLE TRIGGER outbox_commit",
        state == 'D' ? "disabled" : "enabled for replica sessions only", state);
}

de_err de_outbox_open_pg(PGconn *conn, const de_conf *conf, de_outbox **out)
{
    pg_outbox *pg;
    de_err err;

    if (out != NULL)
        *out = NULL;
    if (conn == NULL || out == NULL)
        return de__fail(DE_ERR_ARG,
                        "de_outbox_open_pg needs a connection and an out "
                        "pointer (got NULL %s)",
                        conn == NULL ? "connection" : "out");
    if (PQstatus(conn) != CONNECTION_OK)
        return de__fail(DE_ERR_ARG,
                        "de_outbox_open_pg needs an open connection (its "
                        "status is %d, not CONNECTION_OK)",
                        (int)PQstatus(conn));
    if (PQtransactionStatus(conn) != PQTRANS_IDLE)
        return de__fail(DE_ERR_STATE,
                        "de_outbox_open_pg was called inside a transaction; "
                        "open the outbox outside one (at startup): its "
                        "migration commits on its own");
    if ((err = de__pg_schema_ensure(conn, NULL)) != DE_OK ||
        (err = check_trigger(conn)) != DE_OK ||
        (conf != NULL && (err = store_settings(conn, conf)) != DE_OK))
        return err;
    if ((pg = calloc(1, sizeof *pg)) == NULL)
        return de__fail(DE_ERR_NOMEM, "out of memory opening the outbox");
    pg->conn = conn;
    pg->prepared = de__conf_bool(conf, DE__K_PG_RECORD_PREPARED);
    /* Prepared now, outside the host's transactions. */
    if (pg->prepared && (err = ensure_prepared(pg)) != DE_OK) {
        free(pg);
        return err;
    }
    return de__outbox_new_backend(conf, &pg_backend, pg, out);
}

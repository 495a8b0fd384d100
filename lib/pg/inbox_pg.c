/* SPDX-License-Identifier: MIT */
/*
 * inbox_pg.c -- the consumer's bookkeeping in PostgreSQL (de__inbox, see
 * inbox.h), a port of inbox_sqlite.c: deliveryevents.inbox (each
 * subject's last applied number, the ce_id applied under it, its owner
 * and whether it is parked), inbox_source, inbox_id (events without a
 * number), inbox_dead_letter and inbox_request, on the consumer's own
 * connection, which the host lends and its handlers write through.
 *
 * Invariants: every write runs inside the consumer's transaction on that
 * connection (asserted), so the inbox and the handlers' effects commit
 * together; the transaction is READ COMMITTED whatever the session's
 * default, so that two consumers racing for one subject serialise on its
 * row (the claim's UPDATE waits for the other's commit and re-reads the
 * row) instead of failing with a serialization error.  Statements are
 * prepared once per backend (re-prepared when the host reset the
 * connection: the backend pid tells) and every value is a bind
 * parameter.  A broken connection fails the operation with DE_ERR_DB;
 * the consumer rolls its batch back and reads it again, and the host
 * resets the connection (deliveryevents_pg.h).  A deadlock or
 * serialization failure, in the inbox's statements or a handler's, is
 * told apart by its SQLSTATE (i_conflict), and the consumer runs the
 * transaction again.
 */
#include "inbox.h"
#include "pg_int.h"

#include <assert.h>
#include <libpq-events.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define INBOX_SCHEMA_VERSION 1

/* Migration i takes the consumer's tables from version i to i + 1. */
static const char *const migrations[INBOX_SCHEMA_VERSION] = {
    /* 0 -> 1: the tables of SQLite's schema 5, at once.  The ce_id
     * applied with a number is a uuid when it is a canonical UUID (every
     * id this library generates: 16 bytes in a row every event rewrites),
     * else text.  fillfactor leaves room for the claim's new row version
     * on the same page (a HOT update: no index touched). */
    "CREATE TABLE deliveryevents.inbox ("
    "  subject_type text NOT NULL,"
    "  subject_id text NOT NULL,"
    "  epoch bigint NOT NULL DEFAULT 0,"
    "  last_seq bigint NOT NULL,"
    "  last_event_uuid uuid,"
    "  last_event_id text,"
    "  owner bigint,"
    "  parked boolean NOT NULL DEFAULT false,"
    "  updated_ms bigint NOT NULL,"
    "  PRIMARY KEY (subject_type, subject_id)"
    ") WITH (fillfactor = 80);"
    "CREATE INDEX inbox_parked ON deliveryevents.inbox (subject_type)"
    "  WHERE parked;"
    "CREATE TABLE deliveryevents.inbox_source ("
    "  owner bigint PRIMARY KEY,"
    "  source text NOT NULL"
    ");"
    "CREATE TABLE deliveryevents.inbox_id ("
    "  source text NOT NULL,"
    "  event_id text NOT NULL,"
    "  seen_ms bigint NOT NULL,"
    "  PRIMARY KEY (source, event_id)"
    ");"
    "CREATE INDEX inbox_id_seen ON deliveryevents.inbox_id (seen_ms);"
    /* kind: failed, waiting, gap, conflict, foreign; state: parked,
     * applied, skipped, duplicate, foreign.  payload and the record's
     * key and value are bytes as read (a foreign record's need not be
     * text). */
    "CREATE TABLE deliveryevents.inbox_dead_letter ("
    "  id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
    "  kind text NOT NULL,"
    "  state text NOT NULL,"
    "  topic text,"
    "  kafka_partition integer,"
    "  kafka_offset bigint,"
    "  subject_type text,"
    "  subject_id text,"
    "  epoch bigint,"
    "  seq bigint,"
    "  event_id text,"
    "  action text,"
    "  type text,"
    "  source text,"
    "  occurred_at_ms bigint,"
    "  traceparent text,"
    "  tracestate text,"
    "  payload bytea,"
    "  error text,"
    "  attempts integer NOT NULL DEFAULT 0,"
    "  parked_ms bigint NOT NULL,"
    "  parks boolean,"
    "  record_key bytea,"
    "  record_headers text,"
    "  record_value bytea,"
    "  record_timestamp_ms bigint"
    ");"
    "CREATE INDEX inbox_dead_letter_subject ON "
    "  deliveryevents.inbox_dead_letter (subject_type, subject_id, seq)"
    "  WHERE state = 'parked';"
    "CREATE TABLE deliveryevents.inbox_request ("
    "  id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
    "  subject_type text NOT NULL,"
    "  subject_id text NOT NULL,"
    "  action text NOT NULL CHECK (action IN ('release', 'skip')),"
    "  requested_at_ms bigint NOT NULL,"
    "  done_at_ms bigint,"
    "  result text"
    ");"
    "CREATE INDEX inbox_request_open ON deliveryevents.inbox_request (id)"
    "  WHERE done_at_ms IS NULL;",
};

enum {
    Q_GET,
    Q_PUT,
    Q_PARK,
    Q_CLAIM,
    Q_FIRST,
    Q_DL_INSERT,
    Q_DL_HAS,
    Q_DL_NEXT,
    Q_DL_DONE,
    Q_DL_FAIL,
    Q_PARKED_COUNT,
    Q_FORGET_SCAN,
    Q_FORGET,
    Q_REQ_NEXT,
    Q_REQ_DONE,
    Q_DL_REPARK,
    Q_SEEN_CLAIM,
    Q_SEEN,
    Q_FORGET_IDS,
    Q_SOURCE,
    Q_PARKS,
    Q_DL_FORGET,
    Q_COUNT
};

/* Statement texts, as inbox_sqlite.c's (the comments there say why each
 * is as it is); in Q_CLAIM, Q_FIRST and Q_PUT $5 is the ce_id as a uuid
 * and $8 as text, one of them NULL. */
static const char *const sql[Q_COUNT] = {
    [Q_GET] = "SELECT i.last_seq, i.parked, coalesce(i.last_event_uuid::text, "
              "i.last_event_id), i.epoch, (SELECT o.source FROM "
              "deliveryevents.inbox_source o WHERE o.owner = i.owner), d.id, "
              "d.kind, coalesce(d.epoch, 0), coalesce(d.seq, 0), i.owner IS "
              "NOT NULL, i.owner FROM deliveryevents.inbox i LEFT JOIN "
              "deliveryevents.inbox_dead_letter d ON d.subject_type = "
              "i.subject_type AND d.subject_id = i.subject_id AND d.state = "
              "'parked' AND d.parks AND i.parked WHERE i.subject_type = $1 "
              "AND i.subject_id = $2",
    [Q_PUT] = "INSERT INTO deliveryevents.inbox AS i (subject_type, "
              "subject_id, last_seq, parked, updated_ms, last_event_uuid, "
              "last_event_id, epoch, owner) VALUES ($1, $2, $3, false, $4, "
              "$5, $8, $6, $7) ON CONFLICT (subject_type, subject_id) DO "
              "UPDATE SET last_seq = excluded.last_seq, updated_ms = "
              "excluded.updated_ms, last_event_uuid = "
              "excluded.last_event_uuid, last_event_id = "
              "excluded.last_event_id, epoch = excluded.epoch, owner = "
              "coalesce(i.owner, excluded.owner)",
    [Q_PARK] = "INSERT INTO deliveryevents.inbox AS i (subject_type, "
               "subject_id, last_seq, parked, updated_ms) VALUES ($1, $2, 0, "
               "$3, $4) ON CONFLICT (subject_type, subject_id) DO UPDATE SET "
               "parked = excluded.parked, updated_ms = excluded.updated_ms",
    [Q_PARKS] = "UPDATE deliveryevents.inbox_dead_letter SET parks = CASE "
                "WHEN id = $3 THEN true END WHERE subject_type = $1 AND "
                "subject_id = $2 AND state = 'parked' AND (parks IS NOT NULL "
                "OR id = $3)",
    [Q_CLAIM] = "UPDATE deliveryevents.inbox SET last_seq = $3, updated_ms = "
                "$4, last_event_uuid = $5, last_event_id = $8 WHERE "
                "subject_type = $1 AND subject_id = $2 AND epoch = $6 AND "
                "last_seq = $3 - 1 AND NOT parked AND owner = $7",
    /* Taken only for number 1 ($3). */
    [Q_FIRST] = "INSERT INTO deliveryevents.inbox AS i (subject_type, "
                "subject_id, last_seq, parked, updated_ms, last_event_uuid, "
                "last_event_id, epoch, owner) VALUES ($1, $2, $3, false, $4, "
                "$5, $8, $6, $7) ON CONFLICT (subject_type, subject_id) DO "
                "UPDATE SET last_seq = excluded.last_seq, updated_ms = "
                "excluded.updated_ms, last_event_uuid = "
                "excluded.last_event_uuid, last_event_id = "
                "excluded.last_event_id, epoch = excluded.epoch, owner = "
                "excluded.owner WHERE i.epoch < excluded.epoch AND NOT "
                "i.parked AND (i.owner IS NULL OR i.owner = excluded.owner)",
    [Q_DL_INSERT] =
        "INSERT INTO deliveryevents.inbox_dead_letter(kind, state, topic, "
        "kafka_partition, kafka_offset, subject_type, subject_id, seq, "
        "event_id, action, type, source, occurred_at_ms, traceparent, "
        "tracestate, payload, error, attempts, parked_ms, epoch, record_key, "
        "record_headers, record_value, record_timestamp_ms) VALUES ($1, $2, "
        "$3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, "
        "$18, $19, $20, $21, $22, $23, $24) RETURNING id",
    [Q_DL_HAS] = "SELECT 1 FROM deliveryevents.inbox_dead_letter WHERE "
                 "subject_type = $1 AND subject_id = $2 AND coalesce(seq, 0) "
                 "= $3 AND coalesce(epoch, 0) = $4 AND event_id = $5 AND "
                 "source IS NOT DISTINCT FROM $6 AND state = 'parked'",
    [Q_DL_NEXT] = "SELECT id, kind, topic, kafka_partition, kafka_offset, "
                  "seq, event_id, action, type, source, occurred_at_ms, "
                  "traceparent, tracestate, payload, coalesce(epoch, 0) FROM "
                  "deliveryevents.inbox_dead_letter WHERE subject_type = $1 "
                  "AND subject_id = $2 AND state = 'parked' ORDER BY (id = "
                  "$3) IS TRUE DESC, coalesce(epoch, 0), coalesce(seq, 0), id "
                  "LIMIT 1",
    [Q_DL_DONE] = "UPDATE deliveryevents.inbox_dead_letter SET state = $2 "
                  "WHERE id = $1",
    [Q_DL_FAIL] = "UPDATE deliveryevents.inbox_dead_letter SET kind = "
                  "'failed', attempts = attempts + 1, error = $2 WHERE id = $1",
    [Q_PARKED_COUNT] = "SELECT count(*) FROM deliveryevents.inbox WHERE parked",
    [Q_FORGET_SCAN] = "SELECT subject_type, subject_id FROM "
                      "deliveryevents.inbox WHERE (subject_type, subject_id) "
                      "> ($1, $2) ORDER BY subject_type, subject_id LIMIT 1 "
                      "OFFSET $3",
    [Q_FORGET] = "DELETE FROM deliveryevents.inbox WHERE (subject_type, "
                 "subject_id) > ($1, $2) AND ($5::boolean OR (subject_type, "
                 "subject_id) <= ($3, $4)) AND updated_ms < $6 AND NOT parked",
    [Q_REQ_NEXT] = "SELECT id, subject_type, subject_id, action = 'skip' FROM "
                   "deliveryevents.inbox_request WHERE done_at_ms IS NULL "
                   "ORDER BY id LIMIT 1",
    [Q_REQ_DONE] = "UPDATE deliveryevents.inbox_request SET done_at_ms = $2, "
                   "result = $3 WHERE id = $1",
    [Q_DL_REPARK] = "UPDATE deliveryevents.inbox_dead_letter SET kind = $2, "
                    "error = $3 WHERE id = $1",
    [Q_SEEN_CLAIM] = "INSERT INTO deliveryevents.inbox_id(source, event_id, "
                     "seen_ms) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
    [Q_SEEN] = "SELECT 1 FROM deliveryevents.inbox_id WHERE source = $1 AND "
               "event_id = $2",
    [Q_FORGET_IDS] = "DELETE FROM deliveryevents.inbox_id WHERE (source, "
                     "event_id) IN (SELECT source, event_id FROM "
                     "deliveryevents.inbox_id WHERE seen_ms < $1 ORDER BY "
                     "seen_ms LIMIT $2)",
    [Q_SOURCE] = "INSERT INTO deliveryevents.inbox_source(owner, source) "
                 "VALUES ($1, $2) ON CONFLICT DO NOTHING",
    [Q_DL_FORGET] = "DELETE FROM deliveryevents.inbox_dead_letter WHERE id IN "
                    "(SELECT id FROM deliveryevents.inbox_dead_letter WHERE "
                    "id < coalesce((SELECT id FROM "
                    "deliveryevents.inbox_dead_letter WHERE parked_ms >= $1 "
                    "ORDER BY id LIMIT 1), 9223372036854775807) AND state <> "
                    "'parked' ORDER BY id LIMIT $2)",
};

/* The statements' names on the backend: one library per process, so one
 * text per name (another consumer on the same connection shares them). */
#define STMT_PREFIX "deliveryevents_inbox_"

typedef struct pg_inbox {
    de__inbox base;
    PGconn *conn;     /* borrowed from the host */
    int prepared_pid; /* backend holding the statements; 0: none */
    /* where forgetting stopped: the last key it looked at */
    char forget_type[DE__NAME_MAX + 1];
    char forget_id[DE__SUBJECT_ID_MAX + 1];
    /* owners whose text is in inbox_source (of this transaction or
     * committed: cleared on a rollback, and on a rollback to the event's
     * savepoint) */
    int64_t owners[16];
    size_t n_owners;
} pg_inbox;

#define IB(ib) ((pg_inbox *)(ib))

/* One statement's parameters, numbered from 1 as in its text; unset ones
 * are NULL. */
#define MAX_PARAMS 24
typedef struct params {
    const char *v[MAX_PARAMS + 1];
    int len[MAX_PARAMS + 1];
    int fmt[MAX_PARAMS + 1];
    char num[MAX_PARAMS + 1][24];
    int n;
} params;

static void p_text(params *p, int i, const char *s)
{
    p->v[i] = s;
    if (i > p->n)
        p->n = i;
}

static void p_int(params *p, int i, int64_t x)
{
    snprintf(p->num[i], sizeof p->num[i], "%lld", (long long)x);
    p_text(p, i, p->num[i]);
}

static void p_bool(params *p, int i, bool b)
{
    p_text(p, i, b ? "t" : "f");
}

/* Bytes as they are (binary format: no encoding check, NULs kept). */
static void p_bytes(params *p, int i, const void *b, size_t n)
{
    p_text(p, i, b);
    p->len[i] = (int)n;
    p->fmt[i] = 1;
}

/* The ce_id as the inbox row keeps it: $ui as a uuid when canonical,
 * else $ti as text. */
static void p_event_id(params *p, int ui, int ti, const char *id)
{
    unsigned char b[16];

    p_text(p, de__uuid_parse(id, b) ? ui : ti, id);
    if (ui > p->n || ti > p->n)
        p->n = ui > ti ? ui : ti;
}

static const char *what_of(int which)
{
    switch (which) {
    case Q_GET:
    case Q_FORGET_SCAN: return "consumer: reading the inbox";
    case Q_PUT:
    case Q_CLAIM:
    case Q_FIRST: return "consumer: updating the inbox";
    case Q_PARK:
    case Q_PARKS: return "consumer: parking a subject";
    case Q_DL_INSERT: return "consumer: writing a dead letter";
    case Q_DL_HAS:
    case Q_DL_NEXT: return "consumer: reading the dead letters";
    case Q_DL_DONE:
    case Q_DL_FAIL:
    case Q_DL_REPARK: return "consumer: updating a dead letter";
    case Q_PARKED_COUNT: return "consumer: counting parked subjects";
    case Q_FORGET: return "consumer: forgetting idle subjects";
    case Q_REQ_NEXT: return "consumer: reading release requests";
    case Q_REQ_DONE: return "consumer: answering a release request";
    case Q_SEEN_CLAIM: return "consumer: updating the inbox of ids";
    case Q_SEEN: return "consumer: reading the inbox of ids";
    case Q_FORGET_IDS: return "consumer: forgetting old event ids";
    case Q_SOURCE: return "consumer: recording a ce_source";
    case Q_DL_FORGET: return "consumer: forgetting old dead letters";
    default: return "consumer";
    }
}

/* The connection is broken: every statement on it would fail until the
 * host resets it (PQreset). */
static bool i_lost(de__inbox *ib)
{
    return PQstatus(IB(ib)->conn) != CONNECTION_OK;
}

/* The connection usable for the consumer's statements, or why not. */
static de_err check_conn(pg_inbox *s)
{
    if (i_lost(&s->base))
        return de__pg_fail(s->conn, NULL,
                           "consumer: the PostgreSQL connection is broken "
                           "(PQreset it; the batch is read again)");
    return DE_OK;
}

/* Prepares the statements on the connection's current backend, unless
 * they are there (this backend, or another consumer on it). */
static de_err ensure_prepared(pg_inbox *s)
{
    int pid = PQbackendPID(s->conn);
    char name[64];
    bool have[Q_COUNT] = {false};
    PGresult *r;
    de_err err;

    if (pid != 0 && pid == s->prepared_pid)
        return DE_OK;
    if ((err = de__pg_exec(s->conn,
                           "SELECT name FROM pg_catalog.pg_prepared_statements "
                           "WHERE name LIKE '" STMT_PREFIX "%'",
                           PGRES_TUPLES_OK, &r,
                           "consumer: cannot look for its statements")) !=
        DE_OK)
        return err;
    for (int i = 0; i < PQntuples(r); i++) {
        int q = atoi(PQgetvalue(r, i, 0) + strlen(STMT_PREFIX));
        if (q >= 0 && q < Q_COUNT)
            have[q] = true;
    }
    PQclear(r);
    for (int i = 0; i < Q_COUNT; i++) {
        if (have[i])
            continue;
        snprintf(name, sizeof name, STMT_PREFIX "%d", i);
        r = PQprepare(s->conn, name, sql[i], 0, NULL);
        if (r == NULL || PQresultStatus(r) != PGRES_COMMAND_OK)
            return de__pg_fail(s->conn, r,
                               "consumer: cannot prepare its "
                               "statements");
        PQclear(r);
    }
    s->prepared_pid = pid;
    return DE_OK;
}

/* Runs statement which with p, expecting want; *res (may be NULL)
 * receives the result, cleared by the caller. */
static de_err run(pg_inbox *s, int which, const params *p, ExecStatusType want,
                  PGresult **res)
{
    char name[64];
    PGresult *r;
    de_err err;

    if (res != NULL)
        *res = NULL;
    snprintf(name, sizeof name, STMT_PREFIX "%d", which);
    for (int tries = 0;; tries++) {
        bool idle = PQtransactionStatus(s->conn) == PQTRANS_IDLE;
        const char *state;
        if ((err = check_conn(s)) != DE_OK ||
            (err = ensure_prepared(s)) != DE_OK)
            return err;
        r = PQexecPrepared(s->conn, name, p->n, p->v + 1, p->len + 1,
                           p->fmt + 1, 0);
        if (r != NULL && PQresultStatus(r) == want)
            break;
        /* 26000: the statement is gone (the host ran DEALLOCATE or
         * DISCARD ALL since i_begin looked): prepare them again; outside
         * a transaction nothing was aborted, so try once more. */
        state = r ? PQresultErrorField(r, PG_DIAG_SQLSTATE) : NULL;
        if (state == NULL || strcmp(state, "26000") != 0)
            return de__pg_fail(s->conn, r, what_of(which));
        s->prepared_pid = 0;
        if (!idle || tries > 0)
            return de__pg_fail(s->conn, r, what_of(which));
        PQclear(r);
    }
    if (res != NULL)
        *res = r;
    else
        PQclear(r);
    return DE_OK;
}

/* Runs a statement without rows; *changed (may be NULL) receives the
 * number of rows it changed. */
static de_err change(pg_inbox *s, int which, const params *p, int64_t *changed)
{
    PGresult *r;
    de_err err = run(s, which, p, PGRES_COMMAND_OK, &r);

    if (err != DE_OK)
        return err;
    if (changed != NULL)
        *changed = atoll(PQcmdTuples(r));
    PQclear(r);
    return DE_OK;
}

static de_err simple(pg_inbox *s, const char *cmd, const char *what)
{
    de_err err = check_conn(s);

    return err != DE_OK
               ? err
               : de__pg_exec(s->conn, cmd, PGRES_COMMAND_OK, NULL, what);
}

static de_err i_begin(de__inbox *ib)
{
    pg_inbox *s = IB(ib);
    PGresult *r;
    de_err err;
    int have;

    if ((err = check_conn(s)) != DE_OK || (err = ensure_prepared(s)) != DE_OK)
        return err;
    if (PQtransactionStatus(s->conn) != PQTRANS_IDLE)
        return de__fail(DE_ERR_STATE,
                        "consumer: its PostgreSQL connection is inside a "
                        "transaction; the host must leave it idle between "
                        "polls");
    /* In the same round trip, whether the statements are all still
     * there: the host (or a pooler) may have run DEALLOCATE ALL or
     * DISCARD ALL on the connection since the last batch, and a missing
     * statement would fail this batch and every one after it.  Prepared
     * statements are not transactional: made in this transaction, they
     * outlive its rollback. */
    if ((err = de__pg_exec(s->conn,
                           DE__PG_BEGIN_RC
                           "; SELECT "
                           "count(*) FROM pg_catalog.pg_prepared_statements "
                           "WHERE name LIKE 'deliveryevents\\_inbox\\_%'",
                           PGRES_TUPLES_OK, &r,
                           "consumer: cannot begin a transaction")) != DE_OK)
        return err;
    have = atoi(PQgetvalue(r, 0, 0));
    PQclear(r);
    if (have >= Q_COUNT)
        return DE_OK;
    s->prepared_pid = 0;
    return ensure_prepared(s);
}

static de_err i_commit(de__inbox *ib)
{
    PGresult *r;
    de_err err;

    if ((err = check_conn(IB(ib))) != DE_OK)
        return err;
    /* COMMIT of a failed transaction "succeeds" as a ROLLBACK: say so. */
    r = PQexec(IB(ib)->conn, "COMMIT");
    if (r == NULL || PQresultStatus(r) != PGRES_COMMAND_OK)
        return de__pg_fail(IB(ib)->conn, r, "consumer: cannot commit");
    if (strcmp(PQcmdStatus(r), "ROLLBACK") == 0) {
        PQclear(r);
        return de__fail(DE_ERR_DB, "consumer: cannot commit: the transaction "
                                   "had failed and was rolled back");
    }
    PQclear(r);
    return DE_OK;
}

static void i_rollback(de__inbox *ib)
{
    pg_inbox *s = IB(ib);

    s->n_owners = 0;
    /* Nothing to do on a broken connection: the server rolled back. */
    if (PQstatus(s->conn) == CONNECTION_OK &&
        PQtransactionStatus(s->conn) != PQTRANS_IDLE)
        PQclear(PQexec(s->conn, "ROLLBACK"));
}

static de_err i_savepoint(de__inbox *ib)
{
    return simple(IB(ib), "SAVEPOINT de_event", "consumer: savepoint");
}

static de_err i_release(de__inbox *ib)
{
    return simple(IB(ib), "RELEASE SAVEPOINT de_event",
                  "consumer: releasing a savepoint");
}

static de_err i_rollback_to(de__inbox *ib)
{
    /* The event's claim may have written its owner's text: forget what
     * the cache learnt since (it cannot tell what), as on a rollback. */
    IB(ib)->n_owners = 0;
    return simple(IB(ib), "ROLLBACK TO SAVEPOINT de_event",
                  "consumer: rolling back an event");
}

/*
 * The SQLSTATE of the last failed statement on the consumer's connection,
 * kept by a libpq event procedure: it sees every result made on the
 * connection, the handlers' too, which the consumer never gets -- and a
 * handler's statement is where a deadlock between two members' read
 * models is found.  A successful result clears it; 25P02 (a statement
 * refused because the transaction had already failed) keeps the error
 * that failed it.  Registered once per connection and kept with it
 * (libpq cannot unregister a procedure; it costs a status check per
 * result): its data is freed with the connection, so a closed consumer
 * leaves nothing dangling.
 */
typedef struct last_error {
    char state[6];
} last_error;

static int track_errors(PGEventId id, void *info, void *pass)
{
    (void)pass;
    if (id == PGEVT_REGISTER) {
        PGconn *conn = ((PGEventRegister *)info)->conn;
        last_error *le = calloc(1, sizeof *le);
        return le != NULL && PQsetInstanceData(conn, track_errors, le);
    }
    if (id == PGEVT_CONNDESTROY) {
        free(PQinstanceData(((PGEventConnDestroy *)info)->conn, track_errors));
        return 1;
    }
    if (id == PGEVT_RESULTCREATE) {
        PGEventResultCreate *e = info;
        last_error *le = PQinstanceData(e->conn, track_errors);
        const char *state;
        if (le == NULL)
            return 1;
        if (PQresultStatus(e->result) != PGRES_FATAL_ERROR) {
            le->state[0] = '\0';
            return 1;
        }
        state = PQresultErrorField(e->result, PG_DIAG_SQLSTATE);
        if (state == NULL)
            le->state[0] = '\0';
        else if (strcmp(state, "25P02") != 0 || le->state[0] == '\0')
            snprintf(le->state, sizeof le->state, "%s", state);
    }
    return 1;
}

/* Deadlocks and serialization failures: the server aborted this
 * transaction to let another go on (inbox.h). */
static const char *i_conflict(de__inbox *ib)
{
    last_error *le = PQinstanceData(IB(ib)->conn, track_errors);

    if (le == NULL)
        return NULL;
    return strcmp(le->state, "40P01") == 0 || strcmp(le->state, "40001") == 0
               ? le->state
               : NULL;
}

/* A failed transaction is still open (ROLLBACK ends it), and so is one
 * on a broken connection as far as the consumer can tell: its next
 * statement fails and the batch is rolled back. */
static bool i_in_txn(de__inbox *ib)
{
    return PQtransactionStatus(IB(ib)->conn) != PQTRANS_IDLE;
}

static void p_subject(params *p, const char *type, const char *id)
{
    p_text(p, 1, type);
    p_text(p, 2, id);
}

/* A ce_source as the inbox row keeps it: FNV-1a, 64 bits (as SQLite). */
static int64_t owner_of(const char *source)
{
    uint64_t h = UINT64_C(14695981039346656037);

    for (const unsigned char *p = (const unsigned char *)source; *p; p++)
        h = (h ^ *p) * UINT64_C(1099511628211);
    return (int64_t)h;
}

/* Makes sure inbox_source has the text of owner. */
static de_err note_owner(pg_inbox *s, int64_t owner, const char *source)
{
    params p = {0};
    de_err err;

    for (size_t i = 0; i < s->n_owners; i++)
        if (s->owners[i] == owner)
            return DE_OK;
    p_int(&p, 1, owner);
    p_text(&p, 2, source);
    if ((err = change(s, Q_SOURCE, &p, NULL)) != DE_OK)
        return err;
    if (s->n_owners == DE__ARRAY_LEN(s->owners))
        s->n_owners = 0;
    s->owners[s->n_owners++] = owner;
    return DE_OK;
}

static de_err i_claim(de__inbox *ib, const de_event_view *v, bool *claimed)
{
    pg_inbox *s = IB(ib);
    int which = Q_CLAIM;
    int64_t owner = owner_of(v->source), n;
    params p = {0};
    de_err err;

    assert(i_in_txn(ib));
    *claimed = false;
    p_subject(&p, v->subject_type, v->subject_id);
    p_int(&p, 3, v->subject_seq);
    p_int(&p, 4, de__now_ms());
    p_event_id(&p, 5, 8, v->event_id);
    p_int(&p, 6, v->subject_epoch);
    p_int(&p, 7, owner);
    for (int pass = 0; pass < 2; pass++) {
        if ((err = change(s, which, &p, &n)) != DE_OK)
            return err;
        if (n == 1) {
            *claimed = true;
            return which == Q_FIRST ? note_owner(s, owner, v->source) : DE_OK;
        }
        if (v->subject_seq != 1)
            return DE_OK;
        which = Q_FIRST;
    }
    return DE_OK;
}

static de_err i_get(de__inbox *ib, const char *type, const char *id,
                    de__inbox_entry *e)
{
    pg_inbox *s = IB(ib);
    params p = {0};
    PGresult *r;
    de_err err;

    memset(e, 0, sizeof *e);
    p_subject(&p, type, id);
    if ((err = run(s, Q_GET, &p, PGRES_TUPLES_OK, &r)) != DE_OK)
        return err;
    if (PQntuples(r) > 0) {
        e->seq = atoll(PQgetvalue(r, 0, 0));
        e->parked = PQgetvalue(r, 0, 1)[0] == 't';
        snprintf(e->last_id, sizeof e->last_id, "%s", PQgetvalue(r, 0, 2));
        e->epoch = atoll(PQgetvalue(r, 0, 3));
        if (!PQgetisnull(r, 0, 4))
            snprintf(e->source, sizeof e->source, "%s", PQgetvalue(r, 0, 4));
        else if (PQgetvalue(r, 0, 9)[0] == 't')
            /* An owner whose text is missing: name it by its hash. */
            snprintf(e->source, sizeof e->source, "#%016llx",
                     (unsigned long long)atoll(PQgetvalue(r, 0, 10)));
        e->park_id = atoll(PQgetvalue(r, 0, 5));
        snprintf(e->park_kind, sizeof e->park_kind, "%s", PQgetvalue(r, 0, 6));
        e->park_epoch = atoll(PQgetvalue(r, 0, 7));
        e->park_seq = atoll(PQgetvalue(r, 0, 8));
    }
    PQclear(r);
    return DE_OK;
}

static de_err i_put(de__inbox *ib, const char *type, const char *id,
                    int64_t epoch, int64_t seq, const char *event_id,
                    const char *source)
{
    pg_inbox *s = IB(ib);
    params p = {0};
    de_err err;

    assert(i_in_txn(ib));
    p_subject(&p, type, id);
    p_int(&p, 3, seq);
    p_int(&p, 4, de__now_ms());
    p_event_id(&p, 5, 8, event_id);
    p_int(&p, 6, epoch);
    if (source != NULL)
        p_int(&p, 7, owner_of(source));
    if ((err = change(s, Q_PUT, &p, NULL)) != DE_OK || source == NULL)
        return err;
    return note_owner(s, owner_of(source), source);
}

static de_err i_park(de__inbox *ib, const char *type, const char *id,
                     bool parked, int64_t park_id)
{
    pg_inbox *s = IB(ib);
    params p = {0}, q = {0};
    de_err err;

    assert(i_in_txn(ib));
    p_subject(&p, type, id);
    p_bool(&p, 3, parked);
    p_int(&p, 4, de__now_ms());
    if ((err = change(s, Q_PARK, &p, NULL)) != DE_OK || !parked || park_id <= 0)
        return err;
    p_subject(&q, type, id);
    p_int(&q, 3, park_id);
    return change(s, Q_PARKS, &q, NULL);
}

static de_err i_dl_insert(de__inbox *ib, const char *kind,
                          const de__dl_origin *o, const de_event_view *v,
                          const char *error, int attempts, int64_t *id)
{
    pg_inbox *s = IB(ib);
    params p = {0};
    PGresult *r;
    de_err err;

    assert(i_in_txn(ib));
    p_text(&p, 1, kind);
    p_text(&p, 2, strcmp(kind, "foreign") == 0 ? "foreign" : "parked");
    p_text(&p, 3, o->topic);
    p_int(&p, 4, o->partition);
    p_int(&p, 5, o->offset);
    if (v != NULL) {
        p_text(&p, 6, v->subject_type);
        p_text(&p, 7, v->subject_id);
        if (v->subject_seq > 0) {
            p_int(&p, 8, v->subject_seq);
            p_int(&p, 20, v->subject_epoch);
        }
        p_text(&p, 9, v->event_id);
        p_text(&p, 10, v->action);
        p_text(&p, 11, v->type);
        p_text(&p, 12, v->source);
        p_int(&p, 13, v->occurred_at_ms);
        p_text(&p, 14, v->traceparent);
        p_text(&p, 15, v->tracestate);
        p_bytes(&p, 16, v->payload, v->payload_len);
    } else if (o->value != NULL) {
        p_bytes(&p, 16, o->value, o->value_len);
    }
    p_text(&p, 17, error);
    p_int(&p, 18, attempts);
    p_int(&p, 19, de__now_ms());
    if (o->key != NULL)
        p_bytes(&p, 21, o->key, o->key_len);
    p_text(&p, 22, o->headers);
    if (o->value != NULL)
        p_bytes(&p, 23, o->value, o->value_len);
    if (o->timestamp_ms >= 0)
        p_int(&p, 24, o->timestamp_ms);
    p.n = 24;
    if ((err = run(s, Q_DL_INSERT, &p, PGRES_TUPLES_OK, &r)) != DE_OK)
        return err;
    if (id != NULL)
        *id = atoll(PQgetvalue(r, 0, 0));
    PQclear(r);
    return DE_OK;
}

/* Runs a query and says whether it found a row. */
static de_err exists(pg_inbox *s, int which, const params *p, bool *found)
{
    PGresult *r;
    de_err err = run(s, which, p, PGRES_TUPLES_OK, &r);

    *found = err == DE_OK && PQntuples(r) > 0;
    PQclear(r);
    return err;
}

static de_err i_dl_has(de__inbox *ib, const de_event_view *v, bool *has)
{
    params p = {0};

    p_subject(&p, v->subject_type, v->subject_id);
    p_int(&p, 3, v->subject_seq);
    p_int(&p, 4, v->subject_seq > 0 ? v->subject_epoch : 0);
    p_text(&p, 5, v->event_id);
    p_text(&p, 6, v->source);
    return exists(IB(ib), Q_DL_HAS, &p, has);
}

/* Column col of row 0 copied (NULL stays NULL); false: out of memory. */
static bool dup_col(const PGresult *r, int col, char **out)
{
    *out = NULL;
    if (PQgetisnull(r, 0, col))
        return true;
    return (*out = strdup(PQgetvalue(r, 0, col))) != NULL;
}

static de_err i_dl_next(de__inbox *ib, const char *type, const char *id,
                        int64_t first, de__dead_letter *out, bool *found)
{
    pg_inbox *s = IB(ib);
    de_event_view *v = &out->view;
    /* Text columns copied into out->strings, in this order (13, the
     * payload, is bytes). */
    static const int text_cols[] = {2, 6, 7, 8, 9, 11, 12};
    char **str = out->strings;
    params p = {0};
    PGresult *r;
    de_err err;
    bool ok = true;

    memset(out, 0, sizeof *out);
    *found = false;
    p_subject(&p, type, id);
    if (first > 0)
        p_int(&p, 3, first);
    p.n = 3;
    if ((err = run(s, Q_DL_NEXT, &p, PGRES_TUPLES_OK, &r)) != DE_OK)
        return err;
    if (PQntuples(r) == 0) {
        PQclear(r);
        return DE_OK;
    }
    *found = true;
    out->id = atoll(PQgetvalue(r, 0, 0));
    ok = dup_col(r, 1, &out->kind);
    for (size_t i = 0; ok && i < DE__ARRAY_LEN(text_cols); i++)
        ok = dup_col(r, text_cols[i], &str[i]);
    if (ok && !PQgetisnull(r, 0, 13)) {
        /* bytea in text form: PQunescapeBytea gives the bytes, NUL
         * added, as the view's payload is a string. */
        size_t n = 0;
        unsigned char *b =
            PQunescapeBytea((const unsigned char *)PQgetvalue(r, 0, 13), &n);
        ok = b != NULL && (str[7] = malloc(n + 1)) != NULL;
        if (ok) {
            memcpy(str[7], b, n);
            str[7][n] = '\0';
        }
        PQfreemem(b);
    }
    if (ok) {
        str[8] = strdup(type);
        str[9] = strdup(id);
        ok = str[8] != NULL && str[9] != NULL;
    }
    if (!ok) {
        PQclear(r);
        de__dead_letter_free(out);
        return de__fail(DE_ERR_NOMEM, "consumer: out of memory");
    }
    v->topic = str[0];
    v->partition = atoi(PQgetvalue(r, 0, 3));
    v->offset = atoll(PQgetvalue(r, 0, 4));
    v->subject_seq = atoll(PQgetvalue(r, 0, 5));
    v->event_id = str[1] ? str[1] : "";
    v->action = str[2] ? str[2] : "";
    v->type = str[3] ? str[3] : "";
    v->source = str[4] ? str[4] : "";
    v->occurred_at_ms = atoll(PQgetvalue(r, 0, 10));
    v->traceparent = str[5];
    v->tracestate = str[6];
    v->payload = str[7] ? str[7] : "{}";
    v->payload_len = strlen(v->payload);
    v->subject_type = str[8];
    v->subject_id = str[9];
    v->subject_epoch = atoll(PQgetvalue(r, 0, 14));
    PQclear(r);
    return DE_OK;
}

/* A dead letter's update (Q_DL_DONE, Q_DL_FAIL): $1 its id, $2 the
 * text. */
static de_err dl_update(de__inbox *ib, int which, int64_t id, const char *text)
{
    params p = {0};

    assert(i_in_txn(ib));
    p_int(&p, 1, id);
    p_text(&p, 2, text);
    return change(IB(ib), which, &p, NULL);
}

static de_err i_dl_done(de__inbox *ib, int64_t id, const char *state)
{
    return dl_update(ib, Q_DL_DONE, id, state);
}

static de_err i_dl_fail(de__inbox *ib, int64_t id, const char *error)
{
    return dl_update(ib, Q_DL_FAIL, id, error);
}

static de_err i_dl_repark(de__inbox *ib, int64_t id, const char *kind,
                          const char *error)
{
    params p = {0};

    assert(i_in_txn(ib));
    p_int(&p, 1, id);
    p_text(&p, 2, kind);
    p_text(&p, 3, error);
    return change(IB(ib), Q_DL_REPARK, &p, NULL);
}

static de_err i_seen_claim(de__inbox *ib, const de_event_view *v, bool *claimed)
{
    params p = {0};
    int64_t n = 0;
    de_err err;

    assert(i_in_txn(ib));
    p_text(&p, 1, v->source);
    p_text(&p, 2, v->event_id);
    p_int(&p, 3, de__now_ms());
    err = change(IB(ib), Q_SEEN_CLAIM, &p, &n);
    *claimed = err == DE_OK && n == 1;
    return err;
}

static de_err i_seen(de__inbox *ib, const de_event_view *v, bool *seen)
{
    params p = {0};

    p_text(&p, 1, v->source);
    p_text(&p, 2, v->event_id);
    return exists(IB(ib), Q_SEEN, &p, seen);
}

/* A delete of up to limit rows older than before_ms (Q_FORGET_IDS,
 * Q_DL_FORGET). */
static de_err forget_old(de__inbox *ib, int which, int64_t before_ms, int limit,
                         int64_t *forgotten)
{
    params p = {0};

    *forgotten = 0;
    p_int(&p, 1, before_ms);
    p_int(&p, 2, limit);
    return change(IB(ib), which, &p, forgotten);
}

static de_err i_forget_ids(de__inbox *ib, int64_t before_ms, int limit,
                           int64_t *forgotten)
{
    assert(i_in_txn(ib));
    return forget_old(ib, Q_FORGET_IDS, before_ms, limit, forgotten);
}

static de_err i_dl_forget(de__inbox *ib, int64_t before_ms, int limit,
                          int64_t *forgotten)
{
    return forget_old(ib, Q_DL_FORGET, before_ms, limit, forgotten);
}

static de_err i_parked_count(de__inbox *ib, int64_t *n)
{
    params p = {0};
    PGresult *r;
    de_err err;

    *n = 0;
    if ((err = run(IB(ib), Q_PARKED_COUNT, &p, PGRES_TUPLES_OK, &r)) != DE_OK)
        return err;
    *n = atoll(PQgetvalue(r, 0, 0));
    PQclear(r);
    return DE_OK;
}

static de_err i_forget(de__inbox *ib, int64_t before_ms, int limit,
                       int64_t *forgotten)
{
    pg_inbox *s = IB(ib);
    char last_type[DE__NAME_MAX + 1] = "";
    char last_id[DE__SUBJECT_ID_MAX + 1] = "";
    params scan = {0}, del = {0};
    PGresult *r;
    bool end;
    de_err err;

    assert(i_in_txn(ib));
    *forgotten = 0;
    /* The slice's last key; none: the slice runs to the end. */
    p_subject(&scan, s->forget_type, s->forget_id);
    p_int(&scan, 3, limit - 1);
    if ((err = run(s, Q_FORGET_SCAN, &scan, PGRES_TUPLES_OK, &r)) != DE_OK)
        return err;
    end = PQntuples(r) == 0;
    if (!end) {
        snprintf(last_type, sizeof last_type, "%s", PQgetvalue(r, 0, 0));
        snprintf(last_id, sizeof last_id, "%s", PQgetvalue(r, 0, 1));
    }
    PQclear(r);
    p_subject(&del, s->forget_type, s->forget_id);
    p_text(&del, 3, last_type);
    p_text(&del, 4, last_id);
    p_bool(&del, 5, end);
    p_int(&del, 6, before_ms);
    if ((err = change(s, Q_FORGET, &del, forgotten)) != DE_OK)
        return err;
    snprintf(s->forget_type, sizeof s->forget_type, "%s", last_type);
    snprintf(s->forget_id, sizeof s->forget_id, "%s", last_id);
    return DE_OK;
}

static de_err i_request_next(de__inbox *ib, de__request *rq, bool *found)
{
    params p = {0};
    PGresult *r;
    de_err err;

    *found = false;
    if ((err = run(IB(ib), Q_REQ_NEXT, &p, PGRES_TUPLES_OK, &r)) != DE_OK)
        return err;
    if (PQntuples(r) > 0) {
        rq->id = atoll(PQgetvalue(r, 0, 0));
        snprintf(rq->type, sizeof rq->type, "%s", PQgetvalue(r, 0, 1));
        snprintf(rq->subject_id, sizeof rq->subject_id, "%s",
                 PQgetvalue(r, 0, 2));
        rq->skip = PQgetvalue(r, 0, 3)[0] == 't';
        *found = true;
    }
    PQclear(r);
    return DE_OK;
}

static de_err i_request_done(de__inbox *ib, int64_t id, const char *result)
{
    params p = {0};

    assert(i_in_txn(ib));
    p_int(&p, 1, id);
    p_int(&p, 2, de__now_ms());
    p_text(&p, 3, result);
    return change(IB(ib), Q_REQ_DONE, &p, NULL);
}

static void i_close(de__inbox *ib)
{
    /* The statements stay on the backend: the connection is the host's,
     * and another consumer on it may use them. */
    free(ib);
}

static const de__inbox_ops pg_ops = {
    .begin = i_begin,
    .commit = i_commit,
    .rollback = i_rollback,
    .savepoint = i_savepoint,
    .release = i_release,
    .rollback_to = i_rollback_to,
    .in_txn = i_in_txn,
    .lost = i_lost,
    .conflict = i_conflict,
    .claim = i_claim,
    .get = i_get,
    .put = i_put,
    .park = i_park,
    .dl_insert = i_dl_insert,
    .dl_has = i_dl_has,
    .dl_next = i_dl_next,
    .dl_done = i_dl_done,
    .dl_fail = i_dl_fail,
    .dl_repark = i_dl_repark,
    .seen_claim = i_seen_claim,
    .seen = i_seen,
    .forget_ids = i_forget_ids,
    .parked_count = i_parked_count,
    .forget = i_forget,
    .request_next = i_request_next,
    .request_done = i_request_done,
    .dl_forget = i_dl_forget,
    .close = i_close,
};

/*
 * Creates or migrates the consumer's tables in one transaction of its
 * own, under the same advisory lock as the outbox's migration (so that
 * consumers and outboxes starting together migrate one at a time); the
 * version is deliveryevents.meta's inbox_schema_version.
 */
static de_err ensure_schema(PGconn *conn)
{
    de_err err = de__pg_migrate(conn, "the consumer's", "inbox_schema_version",
                                migrations, INBOX_SCHEMA_VERSION);

    if (err == DE_OK &&
        (err = de__pg_exec(conn, "COMMIT", PGRES_COMMAND_OK, NULL,
                           "consumer: cannot commit its migration")) != DE_OK &&
        PQtransactionStatus(conn) != PQTRANS_IDLE)
        PQclear(PQexec(conn, "ROLLBACK"));
    return err;
}

de_err de__inbox_open_pg(PGconn *conn, de__inbox **out)
{
    pg_inbox *s;
    de_err err;

    *out = NULL;
    if ((err = ensure_schema(conn)) != DE_OK)
        return err;
    if ((s = calloc(1, sizeof *s)) == NULL)
        return de__fail(DE_ERR_NOMEM, "out of memory opening the consumer");
    s->base.ops = &pg_ops;
    s->conn = conn;
    /* Once per connection: a second consumer on it, or one opened again,
     * finds the procedure there. */
    if (!PQregisterEventProc(conn, track_errors, "deliveryevents-consumer",
                             NULL) &&
        PQinstanceData(conn, track_errors) == NULL) {
        free(s);
        return de__fail(DE_ERR_NOMEM, "consumer: cannot register its libpq "
                                      "event procedure (out of memory)");
    }
    if ((err = ensure_prepared(s)) != DE_OK) {
        free(s);
        return err;
    }
    *out = &s->base;
    return DE_OK;
}

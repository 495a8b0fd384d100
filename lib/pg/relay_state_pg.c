/* SPDX-License-Identifier: MIT */
/*
 * relay_state_pg.c -- the relay's bookkeeping (de__rstate, see
 * relay_state.h) in tables of its own in the outbox's PostgreSQL
 * database: deliveryevents.relay_state (cursor, outbox id),
 * relay_subjects (counters), relay_parked (held-back events),
 * relay_marks (partition marks), relay_published (the numbers events
 * went out with) and relay_lease (the one active relay), on a connection
 * of the relay's own.  What the active relay found on Kafka when it took
 * the lease is kept in relay_landed and relay_found.
 *
 * The same rules as the SQLite state (relay_state.c), with PostgreSQL's
 * means:
 *  - every write happens inside a checkpoint transaction that first
 *    renews the lease with "UPDATE ... WHERE owner = me": a relay whose
 *    lease was taken over updates no row, rolls back and writes nothing.
 *    The UPDATE takes the lease row's lock, and taking the lease reads
 *    that row FOR UPDATE, so a takeover and a checkpoint never interleave:
 *    the lease row is what fences an old relay (its epoch counts the
 *    takeovers);
 *  - every commit is durable before it returns (synchronous_commit=on on
 *    this connection, whatever the database's default): outbox deletions
 *    and numbering rely on it;
 *  - a COMMIT that PostgreSQL turned into a ROLLBACK (the transaction had
 *    failed) is a failure, never taken for a checkpoint;
 *  - the tables are created (under an advisory lock, so that relays
 *    starting together agree) by the first relay; the host's own code
 *    never writes them.
 * SQLite-only concerns (busy timeouts, the file's permissions, read
 * transactions that save lock round trips) have no counterpart here.
 */
#include "pg_int.h"
#include "relay_state.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* The advisory lock class of the library ("dlev", see outbox_pg.c), and
 * the keys this file takes: creating the relay's tables, taking the
 * lease. */
#define LOCK_CLASS "1684826486"
#define LOCK_TABLES "2"
#define LOCK_LEASE "3"

enum {
    S_META_GET,
    S_META_PUT,
    S_LEASE_GET,
    S_LEASE_PUT,
    S_LEASE_BEAT,
    S_LEASE_RELEASE,
    S_SEQ_GET,
    S_SEQ_GETS,
    S_SEQ_PUT,
    S_SEQ_PUTS,
    S_PARK,
    S_UNPARK,
    S_PARKED_SUBJECTS,
    S_PARKED_ROWS,
    S_PARKED_MIN,
    S_FORGET_SCAN,
    S_FORGET,
    S_MARK_PUT,
    S_MARKS,
    S_HAS_MARKS,
    S_FOUND_LANDED,
    S_FOUND_SUBJECT,
    S_FOUND_RAISE,
    S_LANDED_GET,
    S_FOUND_COUNT,
    S_PUBLISHED_PUT,
    S_PUBLISHED_FORGET,
    S_PUBLISHED_GET,
    S_PARKED_AT,
    S_COUNT
};

/* The lease's times are the server's clock, not the relays': relays on
 * several hosts compare heartbeats written by each other, and a host
 * whose clock ran ahead would take a live relay's lease (one behind would
 * wait too long for a dead one's). */
#define SERVER_MS                                                              \
    "(extract(epoch FROM pg_catalog.clock_timestamp()) * 1000)::bigint"

/* Raises (epoch, seq) of row t to excluded's when that is higher. */
#define NUMBER_HIGHER(t)                                                       \
    "(excluded.epoch > " t ".epoch OR (excluded.epoch = " t ".epoch AND "      \
    "excluded.seq > " t ".seq))"
#define NUMBER_MAX_SET(t)                                                      \
    "seq = CASE WHEN " NUMBER_HIGHER(                                          \
        t) " THEN excluded.seq ELSE " t                                        \
           ".seq END, epoch = CASE WHEN " NUMBER_HIGHER(                       \
               t) " THEN excluded.epoch ELSE " t ".epoch END"

static const char *const sql[S_COUNT] = {
    [S_META_GET] = "SELECT value FROM deliveryevents.relay_state "
                   "WHERE key = $1",
    [S_META_PUT] = "INSERT INTO deliveryevents.relay_state(key, value) "
                   "VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = "
                   "excluded.value",
    [S_LEASE_GET] = "SELECT owner, heartbeat_ms, pid, host, " SERVER_MS
                    " FROM deliveryevents.relay_lease WHERE id = 1 FOR "
                    "UPDATE",
    /* A new owner starts a new epoch. */
    [S_LEASE_PUT] = "INSERT INTO deliveryevents.relay_lease AS l (id, owner, "
                    "epoch, pid, host, acquired_ms, heartbeat_ms) VALUES (1, "
                    "$1, 1, $2::bigint, $3, " SERVER_MS ", " SERVER_MS
                    ") ON CONFLICT (id) DO UPDATE SET owner = excluded.owner, "
                    "epoch = l.epoch + CASE WHEN l.owner = excluded.owner "
                    "THEN 0 ELSE 1 END, pid = excluded.pid, host = "
                    "excluded.host, acquired_ms = excluded.acquired_ms, "
                    "heartbeat_ms = excluded.heartbeat_ms",
    [S_LEASE_BEAT] =
        "UPDATE deliveryevents.relay_lease SET heartbeat_ms = " SERVER_MS
        " WHERE id = 1 AND owner = $1",
    [S_LEASE_RELEASE] = "UPDATE deliveryevents.relay_lease SET heartbeat_ms "
                        "= 0 WHERE id = 1 AND owner = $1",
    [S_SEQ_GET] = "SELECT seq, epoch, last_ms FROM "
                  "deliveryevents.relay_subjects WHERE subject_type = $1 AND "
                  "subject_id = $2",
    /* Counters of many subjects at once: $1, $2 text arrays of their
     * types and ids; each counter found comes with its index (1-based). */
    [S_SEQ_GETS] = "SELECT k.i, s.seq, s.epoch, s.last_ms FROM "
                   "unnest($1::text[], $2::text[]) WITH ORDINALITY AS k(t, "
                   "id, i) JOIN deliveryevents.relay_subjects s ON "
                   "s.subject_type = k.t COLLATE \"C\" AND s.subject_id = "
                   "k.id COLLATE \"C\"",
    [S_SEQ_PUT] = "INSERT INTO deliveryevents.relay_subjects(subject_type, "
                  "subject_id, seq, epoch, last_ms) VALUES ($1, $2, $3, $4, "
                  "$5) ON CONFLICT (subject_type, subject_id) DO UPDATE SET "
                  "seq = excluded.seq, epoch = excluded.epoch, last_ms = "
                  "excluded.last_ms",
    /* Counters of many subjects at once ($1..$5: arrays of types, ids,
     * seqs, epochs, last_ms); a subject named twice takes its last. */
    [S_SEQ_PUTS] =
        "INSERT INTO deliveryevents.relay_subjects(subject_type, subject_id, "
        "seq, epoch, last_ms) SELECT DISTINCT ON (t, id) t, id, s, e, l FROM "
        "unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[], "
        "$5::bigint[]) WITH ORDINALITY AS k(t, id, s, e, l, i) ORDER BY t, "
        "id, i DESC ON CONFLICT (subject_type, subject_id) DO UPDATE SET "
        "seq = excluded.seq, epoch = excluded.epoch, last_ms = "
        "excluded.last_ms",
    [S_PARK] = "INSERT INTO deliveryevents.relay_parked(position, "
               "subject_type, subject_id, seq, error, since_ms, epoch) "
               "VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (position) "
               "DO UPDATE SET subject_type = excluded.subject_type, "
               "subject_id = excluded.subject_id, seq = excluded.seq, error "
               "= excluded.error, since_ms = excluded.since_ms, epoch = "
               "excluded.epoch",
    [S_UNPARK] = "DELETE FROM deliveryevents.relay_parked WHERE position = $1",
    [S_PARKED_SUBJECTS] =
        "SELECT subject_type, subject_id, count(*), min(since_ms), (SELECT "
        "error FROM deliveryevents.relay_parked p2 WHERE p2.subject_type = "
        "p.subject_type AND p2.subject_id = p.subject_id ORDER BY position "
        "LIMIT 1) FROM deliveryevents.relay_parked p GROUP BY subject_type, "
        "subject_id",
    [S_PARKED_ROWS] = "SELECT position, seq, epoch FROM "
                      "deliveryevents.relay_parked WHERE subject_type = $1 "
                      "AND subject_id = $2 ORDER BY position",
    [S_PARKED_MIN] = "SELECT coalesce(min(position), 0), count(*) FROM "
                     "deliveryevents.relay_parked",
    [S_FORGET_SCAN] = "SELECT subject_type, subject_id, last_ms FROM "
                      "deliveryevents.relay_subjects WHERE (subject_type, "
                      "subject_id) > ($1, $2) ORDER BY subject_type, "
                      "subject_id LIMIT $3",
    /* A subject with held-back events keeps its counter (relay_state.c). */
    [S_FORGET] = "DELETE FROM deliveryevents.relay_subjects s WHERE "
                 "(s.subject_type, s.subject_id) > ($1, $2) AND "
                 "(s.subject_type, s.subject_id) <= ($3, $4) AND s.last_ms < "
                 "$5 AND NOT EXISTS (SELECT 1 FROM deliveryevents.relay_parked "
                 "p WHERE p.subject_type = s.subject_type AND p.subject_id = "
                 "s.subject_id)",
    [S_MARK_PUT] = "INSERT INTO deliveryevents.relay_marks AS m (topic, "
                   "partition, next_offset) VALUES ($1, $2, $3) ON CONFLICT "
                   "(topic, partition) DO UPDATE SET next_offset = "
                   "greatest(m.next_offset, excluded.next_offset)",
    [S_MARKS] = "SELECT topic, partition, next_offset FROM "
                "deliveryevents.relay_marks ORDER BY topic, partition",
    [S_HAS_MARKS] = "SELECT 1 FROM deliveryevents.relay_marks WHERE topic = "
                    "$1 LIMIT 1",
    [S_FOUND_LANDED] = "INSERT INTO deliveryevents.relay_landed(event_id, seq, "
                       "topic, partition, \"offset\", epoch) VALUES ($1, $2, "
                       "$3, $4, $5, $6) ON CONFLICT (event_id) DO NOTHING",
    [S_FOUND_SUBJECT] =
        "INSERT INTO deliveryevents.relay_found AS f (subject_type, "
        "subject_id, seq, "
        "epoch) VALUES ($1, $2, $3, $4) ON CONFLICT (subject_type, "
        "subject_id) DO UPDATE SET " NUMBER_MAX_SET("f"),
    /* A subject found on Kafka counts as numbered now (relay_state.c). */
    [S_FOUND_RAISE] =
        "INSERT INTO deliveryevents.relay_subjects AS s (subject_type, "
        "subject_id, seq, epoch, last_ms) SELECT subject_type, subject_id, "
        "seq, epoch, $1::bigint FROM deliveryevents.relay_found ON CONFLICT "
        "(subject_type, subject_id) DO UPDATE SET " NUMBER_MAX_SET(
            "s") ", last_ms = greatest(s.last_ms, excluded.last_ms)",
    [S_LANDED_GET] = "SELECT seq, topic, partition, \"offset\", epoch FROM "
                     "deliveryevents.relay_landed WHERE event_id = $1",
    [S_FOUND_COUNT] =
        "SELECT (SELECT count(*) FROM deliveryevents.relay_landed), "
        "(SELECT count(*) FROM deliveryevents.relay_found)",
    [S_PUBLISHED_PUT] =
        "INSERT INTO deliveryevents.relay_published(position, epoch, seq, "
        "topic, partition, \"offset\") VALUES ($1, $2, $3, $4, $5, $6) ON "
        "CONFLICT (position) DO UPDATE SET epoch = excluded.epoch, seq = "
        "excluded.seq, topic = excluded.topic, partition = "
        "excluded.partition, \"offset\" = excluded.\"offset\"",
    [S_PUBLISHED_FORGET] = "DELETE FROM deliveryevents.relay_published "
                           "WHERE position <= $1",
    [S_PUBLISHED_GET] = "SELECT epoch, seq FROM deliveryevents.relay_published "
                        "WHERE position = $1",
    [S_PARKED_AT] = "SELECT 1 FROM deliveryevents.relay_parked WHERE "
                    "position = $1",
};

/* The relay's tables.  Subject and topic columns compare bytewise
 * (COLLATE "C"): forgetting walks the counters in key order a slice at a
 * time, which must not depend on the database's locale. */
static const char tables_sql[] =
    "SET LOCAL client_min_messages = warning;"
    "CREATE SCHEMA IF NOT EXISTS deliveryevents;"
    "CREATE TABLE IF NOT EXISTS deliveryevents.relay_state ("
    "  key text PRIMARY KEY, value text);"
    "CREATE TABLE IF NOT EXISTS deliveryevents.relay_subjects ("
    "  subject_type text COLLATE \"C\" NOT NULL,"
    "  subject_id text COLLATE \"C\" NOT NULL,"
    "  seq bigint NOT NULL, epoch bigint NOT NULL, last_ms bigint NOT NULL,"
    "  PRIMARY KEY (subject_type, subject_id));"
    "CREATE TABLE IF NOT EXISTS deliveryevents.relay_lease ("
    "  id integer PRIMARY KEY CHECK (id = 1), owner text NOT NULL,"
    "  epoch bigint NOT NULL, pid bigint, host text, acquired_ms bigint,"
    "  heartbeat_ms bigint NOT NULL);"
    "CREATE TABLE IF NOT EXISTS deliveryevents.relay_parked ("
    "  position bigint PRIMARY KEY,"
    "  subject_type text COLLATE \"C\" NOT NULL,"
    "  subject_id text COLLATE \"C\" NOT NULL, seq bigint NOT NULL,"
    "  epoch bigint NOT NULL, error text, since_ms bigint NOT NULL);"
    "CREATE INDEX IF NOT EXISTS relay_parked_subject ON "
    "  deliveryevents.relay_parked (subject_type, subject_id, position);"
    "CREATE TABLE IF NOT EXISTS deliveryevents.relay_marks ("
    "  topic text COLLATE \"C\" NOT NULL, partition integer NOT NULL,"
    "  next_offset bigint NOT NULL, PRIMARY KEY (topic, partition));"
    "CREATE TABLE IF NOT EXISTS deliveryevents.relay_published ("
    "  position bigint PRIMARY KEY, epoch bigint NOT NULL,"
    "  seq bigint NOT NULL, topic text, partition integer,"
    "  \"offset\" bigint);"
    /* What the active relay found on Kafka when it took the lease (read
     * while it publishes the rows that existed then).  Ordinary tables,
     * not temporary or unlogged ones: they must outlive a lost connection
     * and a server crash, or the relay would number again events that
     * are on Kafka already. */
    "CREATE TABLE IF NOT EXISTS deliveryevents.relay_landed ("
    "  event_id text PRIMARY KEY, seq bigint NOT NULL, topic text NOT NULL,"
    "  partition integer NOT NULL, \"offset\" bigint NOT NULL,"
    "  epoch bigint NOT NULL);"
    "CREATE TABLE IF NOT EXISTS deliveryevents.relay_found ("
    "  subject_type text COLLATE \"C\" NOT NULL,"
    "  subject_id text COLLATE \"C\" NOT NULL, seq bigint NOT NULL,"
    "  epoch bigint NOT NULL, PRIMARY KEY (subject_type, subject_id))";

/* Checkpoints are durable whatever the database's default. */
static const char session_sql[] =
    "SET synchronous_commit = on; " DE__PG_RELAY_SESSION_SQL;

/* A PostgreSQL array literal being built: {"a","b\\"c"} or {1,2}. */
typedef struct pg_arr {
    char *p;
    size_t len, cap;
} pg_arr;

/* Appends v (text: quoted and escaped; else as it is); false when out of
 * memory. */
static bool arr_add(pg_arr *a, const char *v, bool text)
{
    size_t need = a->len + 2 * strlen(v) + 5;
    char sep;

    if (need > a->cap) {
        size_t cap = a->cap ? a->cap : 256;
        char *p;
        while (cap < need)
            cap *= 2;
        if ((p = realloc(a->p, cap)) == NULL)
            return false;
        a->p = p;
        a->cap = cap;
    }
    sep = a->len == 0 ? '{' : ',';
    a->p[a->len++] = sep;
    if (!text) {
        size_t n = strlen(v);
        memcpy(a->p + a->len, v, n);
        a->len += n;
        return true;
    }
    a->p[a->len++] = '"';
    for (const char *c = v; *c; c++) {
        if (*c == '"' || *c == '\\')
            a->p[a->len++] = '\\';
        a->p[a->len++] = *c;
    }
    a->p[a->len++] = '"';
    return true;
}

/* The literal, closed ("{}" when nothing was added; NULL when out of
 * memory); a->len is reset for the next one (the buffer is kept). */
static const char *arr_end(pg_arr *a)
{
    if (a->cap < 3) {
        char *p = realloc(a->p, 256);
        if (p == NULL)
            return NULL;
        a->p = p;
        a->cap = 256;
    }
    if (a->len == 0)
        a->p[a->len++] = '{';
    a->p[a->len] = '}';
    a->p[a->len + 1] = '\0';
    a->len = 0;
    return a->p;
}

/* Counters a checkpoint wrote, not sent yet (p_put_seq): sent together
 * as one statement (S_SEQ_PUTS) of up to SEQ_BATCH of them. */
#define SEQ_BATCH 1000

typedef struct pg_state {
    de__rstate base;
    PGconn *conn;
    /* inside a transaction begin_txn began: a connection lost meanwhile
     * is not re-established until it ends, so that no statement of it
     * runs outside it (unchecked by the lease) on a new connection */
    bool in_txn;
    /* writes sent in pipeline mode whose results are not read yet (see
     * queue()) */
    int queued;
    /* counters to write (p_put_seq): types, ids, seqs, epochs, last_ms */
    pg_arr seqs[5];
    int nseqs;
    /* where forgetting stopped: the last key it looked at */
    char forget_type[DE__IDENT_MAX + 1];
    char forget_id[DE__SUBJECT_ID_MAX + 1];
} pg_state;

static const de__rstate_ops pg_ops;

static const char *i64(char buf[24], int64_t v)
{
    snprintf(buf, 24, "%lld", (long long)v);
    return buf;
}

static int64_t col64(const PGresult *r, int row, int col)
{
    return strtoll(PQgetvalue(r, row, col), NULL, 10);
}

/* Prepares every statement on the connection's backend and sets its
 * session (a new connection has neither). */
static de_err setup(pg_state *st)
{
    char name[40];
    de_err err;

    if ((err = de__pg_exec(st->conn, session_sql, PGRES_COMMAND_OK, NULL,
                           "relay state: cannot set up its connection")) !=
        DE_OK)
        return err;
    for (int i = 0; i < S_COUNT; i++) {
        PGresult *r;
        snprintf(name, sizeof name, "deliveryevents_rs_%d", i);
        r = PQprepare(st->conn, name, sql[i], 0, NULL);
        if (r == NULL || PQresultStatus(r) != PGRES_COMMAND_OK)
            return de__pg_fail(st->conn, r,
                               "relay state: cannot prepare its statements");
        PQclear(r);
    }
    return DE_OK;
}

/* Reconnects a dropped connection, between transactions only: a
 * transaction the connection took with it is simply not there. */
static de_err reconnect(pg_state *st)
{
    PQreset(st->conn);
    if (PQstatus(st->conn) != CONNECTION_OK)
        return de__pg_fail(st->conn, NULL,
                           "relay state: cannot reconnect to PostgreSQL");
    return setup(st);
}

static de_err ensure_conn(pg_state *st)
{
    return PQstatus(st->conn) == CONNECTION_OK ? DE_OK : reconnect(st);
}

/* Reads the results of the writes queue() sent and leaves pipeline
 * mode: the first failure among them is the result (a failed write
 * aborts the transaction, and the rest report PIPELINE_ABORTED).  Every
 * other statement on the connection comes after this, so that a
 * checkpoint's writes cost one round trip together rather than one
 * each. */
static de_err flush_seqs(pg_state *st);

static de_err drain(pg_state *st)
{
    PGresult *r;
    de_err err = DE_OK;
    int nulls = 0;

    if (st->in_txn)
        err = flush_seqs(st);
    if (PQpipelineStatus(st->conn) == PQ_PIPELINE_OFF)
        return err;
    if (PQpipelineSync(st->conn) != 1 && err == DE_OK)
        err = de__pg_fail(st->conn, NULL,
                          "relay state: cannot write the checkpoint");
    /* Each write's results end with a NULL; the sync's result ends the
     * lot.  A lost connection gives an error result and NULLs: bounded
     * by the count of writes. */
    while (err == DE_OK || PQstatus(st->conn) == CONNECTION_OK) {
        ExecStatusType t;
        if ((r = PQgetResult(st->conn)) == NULL) {
            if (++nulls > st->queued + 1)
                break;
            continue;
        }
        t = PQresultStatus(r);
        if (t == PGRES_PIPELINE_SYNC) {
            PQclear(r);
            break;
        }
        if (t != PGRES_COMMAND_OK && t != PGRES_TUPLES_OK && err == DE_OK)
            err = de__pg_fail(st->conn, r,
                              t == PGRES_PIPELINE_ABORTED
                                  ? "relay state: a checkpoint write failed"
                                  : "relay state: cannot write the checkpoint");
        else
            PQclear(r);
    }
    st->queued = 0;
    if (PQexitPipelineMode(st->conn) != 1 && err == DE_OK)
        err = de__pg_fail(st->conn, NULL,
                          "relay state: cannot write the checkpoint");
    return err;
}

/* Runs prepared statement `which` with n text parameters (NULL: SQL
 * NULL); *res (may be NULL) receives the result, which the caller
 * clears. */
static de_err run(pg_state *st, int which, int n, const char *const *values,
                  PGresult **res, const char *what)
{
    char name[40], msg[120];
    PGresult *r;
    de_err err;

    if ((err = drain(st)) != DE_OK)
        return err;
    if (!st->in_txn && (err = ensure_conn(st)) != DE_OK)
        return err;
    snprintf(name, sizeof name, "deliveryevents_rs_%d", which);
    r = PQexecPrepared(st->conn, name, n, values, NULL, NULL, 0);
    if (r == NULL || (PQresultStatus(r) != PGRES_COMMAND_OK &&
                      PQresultStatus(r) != PGRES_TUPLES_OK)) {
        snprintf(msg, sizeof msg, "relay state: %s", what);
        return de__pg_fail(st->conn, r, msg);
    }
    if (res != NULL)
        *res = r;
    else
        PQclear(r);
    return DE_OK;
}

/* queue() inside a transaction: the write sent in pipeline mode. */
static de_err send_queued(pg_state *st, int which, int n,
                          const char *const *values, const char *what)
{
    char name[40], msg[120];

    if (PQpipelineStatus(st->conn) == PQ_PIPELINE_OFF &&
        PQenterPipelineMode(st->conn) != 1) {
        snprintf(msg, sizeof msg, "relay state: %s", what);
        return de__pg_fail(st->conn, NULL, msg);
    }
    snprintf(name, sizeof name, "deliveryevents_rs_%d", which);
    if (PQsendQueryPrepared(st->conn, name, n, values, NULL, NULL, 0) != 1) {
        snprintf(msg, sizeof msg, "relay state: %s", what);
        (void)drain(st);
        return de__pg_fail(st->conn, NULL, msg);
    }
    st->queued++;
    return DE_OK;
}

/* Sends a write whose result nobody needs (a checkpoint's counters,
 * marks, held-back and published events) without waiting for it, in
 * libpq's pipeline mode; drain() reads the results before the next
 * statement that needs one, COMMIT included, so that a failed write
 * still fails the checkpoint.  Outside a transaction: run(). */
static de_err queue(pg_state *st, int which, int n, const char *const *values,
                    const char *what)
{
    de_err err;

    if (!st->in_txn)
        return run(st, which, n, values, NULL, what);
    /* Counters waiting to be sent go first: the writes keep their
     * order. */
    if ((err = flush_seqs(st)) != DE_OK)
        return err;
    return send_queued(st, which, n, values, what);
}

/* Sends the counters p_put_seq gathered, as one statement. */
static de_err flush_seqs(pg_state *st)
{
    const char *v[5];

    if (st->nseqs == 0)
        return DE_OK;
    st->nseqs = 0;
    for (int i = 0; i < 5; i++)
        if ((v[i] = arr_end(&st->seqs[i])) == NULL)
            return de__fail(DE_ERR_NOMEM,
                            "relay state: out of memory writing counters");
    return send_queued(st, S_SEQ_PUTS, 5, v, "cannot write sequence counters");
}

/* Runs a statement that changes rows; *changed (may be NULL) receives
 * how many. */
static de_err change(pg_state *st, int which, int n, const char *const *values,
                     int64_t *changed, const char *what)
{
    PGresult *r;
    de_err err = run(st, which, n, values, &r, what);

    if (err != DE_OK)
        return err;
    if (changed != NULL)
        *changed = strtoll(PQcmdTuples(r), NULL, 10);
    PQclear(r);
    return DE_OK;
}

static de_err simple(pg_state *st, const char *cmd, const char *what)
{
    de_err err = drain(st);

    if (err != DE_OK)
        return err;
    return de__pg_exec(st->conn, cmd, PGRES_COMMAND_OK, NULL, what);
}

static de_err meta_get(pg_state *st, const char *key, char *buf, size_t size,
                       bool *found)
{
    const char *v[1] = {key};
    PGresult *r;
    de_err err;

    *found = false;
    if (size > 0)
        buf[0] = '\0';
    if ((err = run(st, S_META_GET, 1, v, &r, "cannot read its metadata")) !=
        DE_OK)
        return err;
    if (PQntuples(r) == 1) {
        *found = true;
        if (!PQgetisnull(r, 0, 0) && size > 0)
            snprintf(buf, size, "%s", PQgetvalue(r, 0, 0));
    }
    PQclear(r);
    return DE_OK;
}

static de_err meta_put(pg_state *st, const char *key, const char *value)
{
    const char *v[2] = {key, value};

    return queue(st, S_META_PUT, 2, v, "cannot write its metadata");
}

static void p_rollback(de__rstate *base);

/* BEGIN, on a connection re-established first if it was lost.  A
 * transaction a caller's failure path left open (a recovery whose last
 * write failed) is rolled back first: it would otherwise pin the
 * connection, lost or not, for good.  READ COMMITTED (DE__PG_BEGIN_RC)
 * also before the session's settings are made: adopt runs first, and a
 * relay creating or adopting the tables beside another must not fail on
 * the other's rows. */
static de_err begin_txn(pg_state *st, const char *what)
{
    de_err err;

    if (st->in_txn)
        p_rollback(&st->base);
    if ((err = ensure_conn(st)) != DE_OK)
        return err;
    /* A connection the server dropped while it was idle (a restart)
     * shows only when used, and libpq may still call it CONNECTION_OK
     * after the failure: nothing of the transaction ran yet, so
     * reconnect and begin once more rather than fail this round. */
    if ((err = simple(st, DE__PG_BEGIN_RC, what)) != DE_OK &&
        ((err = reconnect(st)) != DE_OK ||
         (err = simple(st, DE__PG_BEGIN_RC, what)) != DE_OK))
        return err;
    st->in_txn = true;
    return DE_OK;
}

static void p_rollback(de__rstate *base)
{
    pg_state *st = (pg_state *)base;

    st->in_txn = false;
    st->nseqs = 0; /* never sent: nothing to roll back */
    for (int i = 0; i < 5; i++)
        st->seqs[i].len = 0;
    (void)drain(st); /* failed writes are what is rolled back */
    if (PQtransactionStatus(st->conn) != PQTRANS_IDLE)
        PQclear(PQexec(st->conn, "ROLLBACK"));
}

/* Creates the tables when one is missing (CREATE ... IF NOT EXISTS
 * checks the CREATE privilege even when there is nothing to create: a
 * relay role without it starts on tables its owner created). */
static de_err create_tables(pg_state *st)
{
    PGresult *r;
    bool all;
    de_err err;

    if ((err = de__pg_exec(st->conn,
                           "SELECT pg_catalog.to_regclass("
                           "'deliveryevents.relay_found') IS NOT NULL",
                           PGRES_TUPLES_OK, &r,
                           "relay state: cannot look for its tables")) != DE_OK)
        return err;
    all = strcmp(PQgetvalue(r, 0, 0), "t") == 0;
    PQclear(r);
    return all ? DE_OK
               : simple(st, tables_sql,
                        "relay state: cannot create its tables in schema "
                        "deliveryevents");
}

/* Creates the tables when missing and checks, in one transaction under
 * an advisory lock, that the state belongs to this outbox (recording
 * that it does when new) and is not older than the outbox's deletions. */
static de_err adopt(pg_state *st, const char *outbox_id,
                    int64_t host_deleted_upto, int64_t *cursor)
{
    char buf[64], cur[32];
    bool found, has_cursor;
    de_err err;

    if ((err = begin_txn(st, "relay state: cannot begin")) != DE_OK)
        return err;
    if ((err = de__pg_exec(st->conn,
                           "SELECT pg_catalog.pg_advisory_xact_lock(" LOCK_CLASS
                           ", " LOCK_TABLES ")",
                           PGRES_TUPLES_OK, NULL,
                           "relay state: cannot lock its tables")) != DE_OK ||
        (err = create_tables(st)) != DE_OK || (err = setup(st)) != DE_OK ||
        (err = meta_get(st, "outbox_id", buf, sizeof buf, &found)) != DE_OK ||
        (err = meta_get(st, "cursor", cur, sizeof cur, &has_cursor)) != DE_OK)
        goto fail;
    if (found && strcmp(buf, outbox_id) != 0) {
        err = de__fail(DE_ERR_STATE,
                       "the relay's tables in schema deliveryevents belong "
                       "to the outbox %s, not to this database's outbox %s",
                       buf, outbox_id);
        goto fail;
    }
    *cursor = has_cursor ? strtoll(cur, NULL, 10) : 0;
    /* The relay's tables were dropped or restored apart from the
     * outbox: numbering again would make consumers drop events as
     * duplicates. */
    if (host_deleted_upto > *cursor) {
        err = de__fail(DE_ERR_STATE,
                       "the relay's state in schema deliveryevents %s, but "
                       "this outbox was already relayed and cleaned up to "
                       "position %lld; restore the relay_* tables that "
                       "belong with this database",
                       has_cursor ? "is older than the outbox (its cursor "
                                    "is behind)"
                                  : "is new or was lost",
                       (long long)host_deleted_upto);
        goto fail;
    }
    if (!found && (err = meta_put(st, "outbox_id", outbox_id)) != DE_OK)
        goto fail;
    if ((err = simple(st, "COMMIT", "relay state: cannot commit")) != DE_OK)
        goto fail;
    return DE_OK;
fail:
    p_rollback(&st->base);
    return err;
}

static void p_close(de__rstate *base)
{
    pg_state *st = (pg_state *)base;

    if (st == NULL)
        return;
    PQfinish(st->conn);
    for (int i = 0; i < 5; i++)
        free(st->seqs[i].p);
    free(st);
}

de_err de__rstate_open_pg(const char *conninfo, const char *outbox_id,
                          int64_t host_deleted_upto, de__rstate **out,
                          int64_t *cursor)
{
    const char *const keys[] = {"dbname", "fallback_application_name", NULL};
    const char *const values[] = {conninfo, "deliveryevents-relay", NULL};
    pg_state *st = calloc(1, sizeof *st);
    de_err err;

    *out = NULL;
    if (st == NULL)
        return de__fail(DE_ERR_NOMEM, "out of memory opening relay state");
    st->base.ops = &pg_ops;
    st->conn = PQconnectdbParams(keys, values, 1);
    if (PQstatus(st->conn) != CONNECTION_OK) {
        err = de__pg_fail(st->conn, NULL,
                          "relay state: cannot connect to PostgreSQL");
        goto fail;
    }
    if ((err = adopt(st, outbox_id, host_deleted_upto, cursor)) != DE_OK)
        goto fail;
    *out = &st->base;
    return DE_OK;
fail:
    p_close(&st->base);
    return err;
}

static de_err p_cursor(de__rstate *base, int64_t *cursor, char *event_id,
                       size_t event_id_size)
{
    pg_state *st = (pg_state *)base;
    char buf[32];
    bool found;
    de_err err = meta_get(st, "cursor", buf, sizeof buf, &found);

    *cursor = found ? strtoll(buf, NULL, 10) : 0;
    if (err == DE_OK && event_id_size > 0)
        err = meta_get(st, "cursor_event_id", event_id, event_id_size, &found);
    return err;
}

/* COMMIT, refusing the ROLLBACK PostgreSQL answers for a transaction
 * that had failed. */
static de_err p_commit_checked(pg_state *st, const char *what)
{
    char msg[120];
    PGresult *r;
    de_err err;

    snprintf(msg, sizeof msg, "relay state: %s", what);
    if ((err = drain(st)) != DE_OK) {
        st->in_txn = false;
        return err;
    }
    st->in_txn = false;
    /* A COMMIT outside a transaction only warns: never let it pass. */
    if (PQtransactionStatus(st->conn) != PQTRANS_INTRANS &&
        PQtransactionStatus(st->conn) != PQTRANS_INERROR)
        return de__fail(
            DE_ERR_DB, "%s: the transaction was lost with its connection", msg);
    r = PQexec(st->conn, "COMMIT");
    if (r == NULL || PQresultStatus(r) != PGRES_COMMAND_OK)
        return de__pg_fail(st->conn, r, msg);
    if (strcmp(PQcmdStatus(r), "COMMIT") != 0) {
        PQclear(r);
        return de__fail(DE_ERR_DB,
                        "%s: the transaction had failed and was "
                        "rolled back",
                        msg);
    }
    PQclear(r);
    return DE_OK;
}

static de_err p_lease_acquire(de__rstate *base, const char *owner,
                              int64_t now_ms, int64_t timeout_ms, bool *held,
                              char *holder, size_t holder_size)
{
    pg_state *st = (pg_state *)base;
    char pid[24], host[256] = "";
    const char *v[3] = {owner, pid, host};
    PGresult *r = NULL;
    bool take = true;
    de_err err;

    (void)now_ms; /* the server's clock (SERVER_MS) */
    *held = false;
    if (holder_size)
        holder[0] = '\0';
    if ((err = begin_txn(st, "relay state: cannot begin")) != DE_OK)
        return err;
    /* Two relays finding no lease row at once would both insert one. */
    if ((err = de__pg_exec(st->conn,
                           "SELECT pg_catalog.pg_advisory_xact_lock(" LOCK_CLASS
                           ", " LOCK_LEASE ")",
                           PGRES_TUPLES_OK, NULL,
                           "relay state: cannot lock the lease")) != DE_OK ||
        (err = run(st, S_LEASE_GET, 0, NULL, &r, "cannot read the lease")) !=
            DE_OK)
        goto fail;
    if (PQntuples(r) == 1) {
        const char *o = PQgetvalue(r, 0, 0);
        int64_t beat = col64(r, 0, 1), server_now = col64(r, 0, 4);
        if (strcmp(o, owner) != 0 && server_now - beat <= timeout_ms) {
            take = false;
            if (holder_size)
                snprintf(holder, holder_size, "pid %s on %s",
                         PQgetvalue(r, 0, 2),
                         PQgetisnull(r, 0, 3) ? "?" : PQgetvalue(r, 0, 3));
        }
    }
    PQclear(r);
    if (take) {
        gethostname(host, sizeof host - 1);
        i64(pid, (int64_t)getpid());
        if ((err = run(st, S_LEASE_PUT, 3, v, NULL, "cannot take the lease")) !=
            DE_OK)
            goto fail;
    }
    if ((err = p_commit_checked(st, "cannot commit the lease")) != DE_OK)
        goto fail;
    *held = take;
    return DE_OK;
fail:
    p_rollback(base);
    return err;
}

static de_err p_lease_release(de__rstate *base, const char *owner)
{
    const char *v[1] = {owner};

    return run((pg_state *)base, S_LEASE_RELEASE, 1, v, NULL,
               "cannot release the lease");
}

/* Each read is a statement of its own: no lock round trip to save. */
static de_err p_read_begin(de__rstate *base)
{
    (void)base;
    return DE_OK;
}

static void p_read_end(de__rstate *base)
{
    (void)base;
}

static de_err p_begin(de__rstate *base, const char *owner, int64_t now_ms,
                      bool *held)
{
    pg_state *st = (pg_state *)base;
    const char *v[1] = {owner};
    int64_t n = 0;
    de_err err;

    (void)now_ms; /* the server's clock (SERVER_MS) */
    *held = false;
    if ((err = begin_txn(st, "relay state: cannot begin a checkpoint")) !=
        DE_OK)
        return err;
    if ((err = change(st, S_LEASE_BEAT, 1, v, &n, "cannot renew the lease")) !=
        DE_OK) {
        p_rollback(base);
        return err;
    }
    if (n != 1) {
        p_rollback(base);
        return DE_OK; /* the lease is someone else's now */
    }
    *held = true;
    return DE_OK;
}

static de_err p_commit(de__rstate *base)
{
    pg_state *st = (pg_state *)base;
    de_err err = p_commit_checked(st, "cannot commit a checkpoint");

    if (err != DE_OK)
        p_rollback(base);
    return err;
}

static de_err p_put_cursor(de__rstate *base, int64_t position,
                           const char *event_id)
{
    pg_state *st = (pg_state *)base;
    char pos[24];
    de_err err;

    if ((err = meta_put(st, "cursor", i64(pos, position))) != DE_OK)
        return err;
    return meta_put(st, "cursor_event_id", event_id);
}

static de_err p_put_seq(de__rstate *base, const char *type, const char *id,
                        const de__counter *c)
{
    pg_state *st = (pg_state *)base;
    char s[24], e[24], l[24];
    const char *v[5] = {type, id, i64(s, c->seq), i64(e, c->epoch),
                        i64(l, c->last_ms)};

    if (!st->in_txn)
        return queue(st, S_SEQ_PUT, 5, v, "cannot write a sequence counter");
    /* Gathered, and sent SEQ_BATCH at a time (or before the next other
     * statement): one upsert of a thousand rows costs the server a
     * fraction of a thousand upserts. */
    for (int i = 0; i < 5; i++)
        if (!arr_add(&st->seqs[i], v[i], i < 2)) {
            st->nseqs = 0;
            for (int j = 0; j < 5; j++)
                st->seqs[j].len = 0;
            return de__fail(DE_ERR_NOMEM,
                            "relay state: out of memory writing counters");
        }
    return ++st->nseqs >= SEQ_BATCH ? flush_seqs(st) : DE_OK;
}

static de_err p_get_seq(de__rstate *base, const char *type, const char *id,
                        de__counter *c)
{
    const char *v[2] = {type, id};
    PGresult *r;
    de_err err;

    memset(c, 0, sizeof *c);
    if ((err = run((pg_state *)base, S_SEQ_GET, 2, v, &r,
                   "cannot read a sequence counter")) != DE_OK)
        return err;
    if (PQntuples(r) == 1) {
        c->seq = col64(r, 0, 0);
        c->epoch = col64(r, 0, 1);
        c->last_ms = col64(r, 0, 2);
    }
    PQclear(r);
    return DE_OK;
}

static de_err p_get_seqs(de__rstate *base, int n, const char *const *types,
                         const char *const *ids, de__counter *c)
{
    pg_arr t = {0}, d = {0};
    const char *v[2];
    PGresult *r = NULL;
    bool ok = true;
    de_err err;

    memset(c, 0, (size_t)n * sizeof *c);
    for (int i = 0; i < n && ok; i++)
        ok = arr_add(&t, types[i], true) && arr_add(&d, ids[i], true);
    if (!ok || (v[0] = arr_end(&t)) == NULL || (v[1] = arr_end(&d)) == NULL)
        err = de__fail(DE_ERR_NOMEM, "out of memory reading counters");
    else
        err = run((pg_state *)base, S_SEQ_GETS, 2, v, &r,
                  "cannot read sequence counters");
    free(t.p);
    free(d.p);
    if (err != DE_OK)
        return err;
    for (int row = 0; row < PQntuples(r); row++) {
        int64_t i = col64(r, row, 0) - 1;
        if (i >= 0 && i < n) {
            c[i].seq = col64(r, row, 1);
            c[i].epoch = col64(r, row, 2);
            c[i].last_ms = col64(r, row, 3);
        }
    }
    PQclear(r);
    return DE_OK;
}

static de_err p_park(de__rstate *base, int64_t position, const char *type,
                     const char *id, int64_t epoch, int64_t seq,
                     const char *error, int64_t since_ms)
{
    char p[24], s[24], t[24], e[24];
    const char *v[7] = {i64(p, position), type,         id, i64(s, seq), error,
                        i64(t, since_ms), i64(e, epoch)};

    return queue((pg_state *)base, S_PARK, 7, v, "cannot hold an event back");
}

static de_err p_unpark(de__rstate *base, int64_t position)
{
    char p[24];
    const char *v[1] = {i64(p, position)};

    return queue((pg_state *)base, S_UNPARK, 1, v,
                 "cannot release a held-back event");
}

static de_err p_parked_subjects(de__rstate *base, de__rstate_subject_fn fn,
                                void *ctx)
{
    PGresult *r;
    de_err err;

    if ((err = run((pg_state *)base, S_PARKED_SUBJECTS, 0, NULL, &r,
                   "cannot read the held-back events")) != DE_OK)
        return err;
    for (int i = 0; i < PQntuples(r) && err == DE_OK; i++)
        err = fn(ctx, PQgetvalue(r, i, 0), PQgetvalue(r, i, 1), col64(r, i, 2),
                 col64(r, i, 3), PQgetvalue(r, i, 4));
    PQclear(r);
    return err;
}

static de_err p_parked_rows(de__rstate *base, const char *type, const char *id,
                            de__rstate_row_fn fn, void *ctx)
{
    const char *v[2] = {type, id};
    PGresult *r;
    de_err err;

    if ((err = run((pg_state *)base, S_PARKED_ROWS, 2, v, &r,
                   "cannot read a subject's held-back events")) != DE_OK)
        return err;
    for (int i = 0; i < PQntuples(r) && err == DE_OK; i++)
        err = fn(ctx, col64(r, i, 0), col64(r, i, 2), col64(r, i, 1));
    PQclear(r);
    return err;
}

static de_err p_parked_min(de__rstate *base, int64_t *min_position,
                           int64_t *count)
{
    PGresult *r;
    de_err err;

    *min_position = *count = 0;
    if ((err = run((pg_state *)base, S_PARKED_MIN, 0, NULL, &r,
                   "cannot count the held-back events")) != DE_OK)
        return err;
    *min_position = col64(r, 0, 0);
    *count = col64(r, 0, 1);
    PQclear(r);
    return DE_OK;
}

static de_err p_forget(de__rstate *base, int64_t before_ms, int limit,
                       int64_t *scanned, int64_t *forgotten)
{
    pg_state *st = (pg_state *)base;
    char last_type[DE__IDENT_MAX + 1] = "",
                                   last_id[DE__SUBJECT_ID_MAX + 1] = "";
    char lim[24], before[24];
    const char *scan[3] = {st->forget_type, st->forget_id, i64(lim, limit)};
    const char *del[5] = {st->forget_type, st->forget_id, last_type, last_id,
                          i64(before, before_ms)};
    int64_t stale = 0;
    PGresult *r;
    de_err err;

    *scanned = *forgotten = 0;
    if ((err = run(st, S_FORGET_SCAN, 3, scan, &r,
                   "cannot read the sequence counters")) != DE_OK)
        return err;
    for (int i = 0; i < PQntuples(r); i++) {
        snprintf(last_type, sizeof last_type, "%s", PQgetvalue(r, i, 0));
        snprintf(last_id, sizeof last_id, "%s", PQgetvalue(r, i, 1));
        (*scanned)++;
        stale += col64(r, i, 2) < before_ms;
    }
    PQclear(r);
    if (stale > 0 && (err = change(st, S_FORGET, 5, del, forgotten,
                                   "cannot forget idle counters")) != DE_OK)
        return err;
    /* At the end of the table: start over next time. */
    snprintf(st->forget_type, sizeof st->forget_type, "%s",
             *scanned < limit ? "" : last_type);
    snprintf(st->forget_id, sizeof st->forget_id, "%s",
             *scanned < limit ? "" : last_id);
    return DE_OK;
}

static de_err p_put_mark(de__rstate *base, const char *topic, int32_t partition,
                         int64_t next_offset)
{
    char p[24], o[24];
    const char *v[3] = {topic, i64(p, partition), i64(o, next_offset)};

    return queue((pg_state *)base, S_MARK_PUT, 3, v,
                 "cannot write a partition mark");
}

static de_err p_has_marks(de__rstate *base, const char *topic, bool *has)
{
    const char *v[1] = {topic};
    PGresult *r;
    de_err err;

    *has = false;
    if ((err = run((pg_state *)base, S_HAS_MARKS, 1, v, &r,
                   "cannot read the partition marks")) != DE_OK)
        return err;
    *has = PQntuples(r) > 0;
    PQclear(r);
    return DE_OK;
}

static de_err p_marks(de__rstate *base, de__rstate_mark_fn fn, void *ctx)
{
    PGresult *r;
    de_err err;

    if ((err = run((pg_state *)base, S_MARKS, 0, NULL, &r,
                   "cannot read the partition marks")) != DE_OK)
        return err;
    for (int i = 0; i < PQntuples(r) && err == DE_OK; i++)
        err = fn(ctx, PQgetvalue(r, i, 0), (int32_t)col64(r, i, 1),
                 col64(r, i, 2));
    PQclear(r);
    return err;
}

static de_err p_put_published(de__rstate *base, int64_t position, int64_t epoch,
                              int64_t seq, const char *topic, int32_t partition,
                              int64_t offset)
{
    char p[24], e[24], s[24], pa[24], o[24];
    bool where = partition >= 0 && offset >= 0;
    const char *v[6] = {i64(p, position),
                        i64(e, epoch),
                        i64(s, seq),
                        topic,
                        where ? i64(pa, partition) : NULL,
                        where ? i64(o, offset) : NULL};

    return queue((pg_state *)base, S_PUBLISHED_PUT, 6, v,
                 "cannot record a published event");
}

static de_err p_forget_published(de__rstate *base, int64_t upto,
                                 int64_t *forgotten)
{
    char u[24];
    const char *v[1] = {i64(u, upto)};

    *forgotten = 0;
    return change((pg_state *)base, S_PUBLISHED_FORGET, 1, v, forgotten,
                  "cannot forget the numbers of deleted rows");
}

static de_err p_published_get(de__rstate *base, int64_t position, bool *found,
                              int64_t *epoch, int64_t *seq)
{
    char p[24];
    const char *v[1] = {i64(p, position)};
    PGresult *r;
    de_err err;

    *found = false;
    if ((err = run((pg_state *)base, S_PUBLISHED_GET, 1, v, &r,
                   "cannot read the numbers of a published event")) != DE_OK)
        return err;
    if (PQntuples(r) == 1) {
        *found = true;
        *epoch = col64(r, 0, 0);
        *seq = col64(r, 0, 1);
    }
    PQclear(r);
    return DE_OK;
}

static de_err p_parked_at(de__rstate *base, int64_t position, bool *parked)
{
    char p[24];
    const char *v[1] = {i64(p, position)};
    PGresult *r;
    de_err err;

    *parked = false;
    if ((err = run((pg_state *)base, S_PARKED_AT, 1, v, &r,
                   "cannot read the held-back events")) != DE_OK)
        return err;
    *parked = PQntuples(r) > 0;
    PQclear(r);
    return DE_OK;
}

/* ---- what the relay found on Kafka ------------------------------------ *
 * Only the lease holder writes these (at activation, before it publishes),
 * and it empties them first. */

static de_err p_found_clear(de__rstate *base)
{
    pg_state *st = (pg_state *)base;
    de_err err;

    if ((err = ensure_conn(st)) != DE_OK)
        return err;
    return simple(st,
                  "TRUNCATE deliveryevents.relay_landed, "
                  "deliveryevents.relay_found",
                  "relay state: cannot clear what was found on Kafka");
}

static de_err p_found_add(de__rstate *base, const char *event_id,
                          const char *type, const char *id, int64_t epoch,
                          int64_t seq, const char *topic, int32_t partition,
                          int64_t offset)
{
    pg_state *st = (pg_state *)base;
    char s[24], p[24], o[24], e[24];
    const char *landed[6] = {event_id,          i64(s, seq),    topic,
                             i64(p, partition), i64(o, offset), i64(e, epoch)};
    const char *subject[4] = {type, id, s, e};
    de_err err;

    if ((err = queue(st, S_FOUND_LANDED, 6, landed,
                     "cannot note a found event")) != DE_OK)
        return err;
    return queue(st, S_FOUND_SUBJECT, 4, subject,
                 "cannot note a found subject");
}

static de_err p_found_raise(de__rstate *base, int64_t now_ms)
{
    char n[24];
    const char *v[1] = {i64(n, now_ms)};

    return run((pg_state *)base, S_FOUND_RAISE, 1, v, NULL,
               "cannot raise the counters to Kafka's");
}

static de_err p_found_count(de__rstate *base, int64_t *landed,
                            int64_t *subjects)
{
    PGresult *r;
    de_err err;

    *landed = *subjects = 0;
    if ((err = run((pg_state *)base, S_FOUND_COUNT, 0, NULL, &r,
                   "cannot count the events found on Kafka")) != DE_OK)
        return err;
    *landed = col64(r, 0, 0);
    *subjects = col64(r, 0, 1);
    PQclear(r);
    return DE_OK;
}

static de_err p_landed_get(de__rstate *base, const char *event_id, bool *found,
                           int64_t *epoch, int64_t *seq, char *topic,
                           size_t topic_size, int32_t *partition,
                           int64_t *offset)
{
    const char *v[1] = {event_id};
    PGresult *r;
    de_err err;

    *found = false;
    if ((err = run((pg_state *)base, S_LANDED_GET, 1, v, &r,
                   "cannot look up an event found on Kafka")) != DE_OK)
        return err;
    if (PQntuples(r) == 1) {
        *found = true;
        *seq = col64(r, 0, 0);
        snprintf(topic, topic_size, "%s", PQgetvalue(r, 0, 1));
        *partition = (int32_t)col64(r, 0, 2);
        *offset = col64(r, 0, 3);
        *epoch = col64(r, 0, 4);
    }
    PQclear(r);
    return DE_OK;
}

/* One transaction per batch of found events rather than one per event. */
static de_err p_batch_begin(de__rstate *base)
{
    return begin_txn((pg_state *)base, "relay state: cannot begin");
}

static de_err p_batch_commit(de__rstate *base)
{
    return p_commit((de__rstate *)base);
}

static const de__rstate_ops pg_ops = {
    .close = p_close,
    .cursor = p_cursor,
    .lease_acquire = p_lease_acquire,
    .lease_release = p_lease_release,
    .read_begin = p_read_begin,
    .read_end = p_read_end,
    .begin = p_begin,
    .put_cursor = p_put_cursor,
    .put_seq = p_put_seq,
    .park = p_park,
    .unpark = p_unpark,
    .commit = p_commit,
    .rollback = p_rollback,
    .forget = p_forget,
    .put_mark = p_put_mark,
    .has_marks = p_has_marks,
    .marks = p_marks,
    .get_seq = p_get_seq,
    .get_seqs = p_get_seqs,
    .parked_subjects = p_parked_subjects,
    .parked_rows = p_parked_rows,
    .parked_min = p_parked_min,
    .found_clear = p_found_clear,
    .found_add = p_found_add,
    .found_raise = p_found_raise,
    .found_count = p_found_count,
    .landed_get = p_landed_get,
    .put_published = p_put_published,
    .forget_published = p_forget_published,
    .published_get = p_published_get,
    .parked_at = p_parked_at,
    .batch_begin = p_batch_begin,
    .batch_commit = p_batch_commit,
};

/* SPDX-License-Identifier: MIT */
/*
 * source_pg.c -- the outbox in a PostgreSQL database, as a relay reads it
 * (de__source, see source.h): a connection of its own that LISTENs on the
 * channel the commit trigger notifies (outbox_pg.c).
 *
 * Positions come from deliveryevents.outbox_order, drawn at each commit
 * by the trigger (outbox_pg.c) while it holds the commit-order advisory
 * lock SHARED until its commit is visible or aborted.  Recorders commit
 * concurrently, so a read of "position > after" alone could pass a
 * position still in its commit.  The read is therefore a barrier read:
 *  (1) v = last_value of the position sequence: every position <= v was
 *      drawn by a recorder that held the shared lock at that moment;
 *  (2) the same lock exclusive, taken and released at once: it waits
 *      exactly for those recorders (and for no later one for long:
 *      bounded by lock_timeout, barrier_ms; on timeout the read returns
 *      DE__AGAIN, nothing read, and changed() asks for another round --
 *      a waiting exclusive request queues new recorders behind it --
 *      backing off after repeated timeouts: timed_out());
 *  (3) the rows with after < position <= v, in position order, with a
 *      snapshot taken after (2): each is visible or its transaction has
 *      aborted (a hole, never filled, never waited on).
 * All of it is one round trip (p_read: prepared statements in libpq's
 * pipeline mode).
 *
 * Wake-up: the trigger notifies only while the relay's flag
 * (deliveryevents.relay_sleeping) is up.  sleep_begin raises it before
 * the relay's last read; a recorder whose position that read did not
 * cover (> v) drew it after (1), hence after the flag went up, and reads
 * the flag after drawing: it notifies.  awake has the next read lower
 * it (after that read's WAL position, see durable()) and makes the next
 * changed() true, and so does the lowering, so that the relay reads once
 * more after it.  A commit is never left waiting longer than one poll
 * interval.
 *
 * Invariants:
 *  - nothing read is handed on before it is durable -- as durable as a
 *    commit with synchronous_commit=on is on this server: flushed to its
 *    disk, and to its synchronous standbys (synchronous_standby_names)
 *    as its rule requires, so that a failover to a standby holding every
 *    acknowledged commit keeps it (a cancelled wait for them fails the
 *    flush: on_notice).  A commit made with synchronous_commit=off (or
 *    local) is visible before that, so after a read that found rows, and
 *    before the first row reaches the caller, the source checks that the
 *    server's WAL is flushed past their commits (durable()), and when it
 *    is not -- always, on a server with synchronous standbys -- commits
 *    a transaction of its own with synchronous_commit=on that writes a
 *    WAL record (without one its commit is not flushed).  Its commit
 *    record comes after every commit the read saw, and flushing it (and
 *    waiting for the synchronous standbys to flush it) makes them
 *    durable;
 *  - the deletion floor (relay_deleted_upto in deliveryevents.meta) only
 *    rises;
 *  - a dropped connection is re-established (and LISTENs again) at the
 *    start of the next operation; changed() reports true meanwhile, so
 *    that the relay reads and finds out.
 */
#include "pg_int.h"

#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* How long a deletion waits for a row lock (someone holding an outbox row
 * locked) before it gives up until the next round. */
#define DELETE_LOCK_WAIT "5ms"

/* The smallest full read that reads ahead: a read of one row (de_replay
 * looks at the oldest row) is a probe, not a batch. */
#define AHEAD_MIN 2

/* What a read sends in libpq's pipeline mode, in one round trip (see
 * p_read): statements, and syncs that end the implicit transaction of
 * the statements before them (committing it, or rolling it back when
 * one failed: the server skips the rest of it). */
enum {
    R_WAIT,
    R_BARRIER,
    R_WRITTEN,
    R_SYNC1,
    R_READ,
    R_FLUSHED,
    R_SYNC2,
    R_LOWER,
    R_SYNC3,
    R_COUNT
};

typedef struct pg_source {
    de__source base;
    PGconn *conn;
    char *conninfo;
    int barrier_ms; /* lock_timeout of the barrier's exclusive request */
    bool relay;     /* a relay's source: it keeps the flag */
    bool sleeping;  /* this source raised the relay_sleeping flag */
    bool recheck;   /* changed() is true: a round may have gone unheard */
    bool unset;     /* setup() failed on a reset connection: reset again */
    bool lower;     /* the flag is to be lowered by the next read */
    /* back-off (see timed_out()) */
    int timeouts;       /* barrier timeouts in a row */
    int64_t stalled_us; /* when the first of them happened */
    int64_t retry_us;   /* no attempt before this (monotonic) */
    bool warn_prepared; /* the prepared-transactions warning is due */
    /* flush_barrier's watch for WARNINGs (on_notice) */
    bool in_flush;
    char flush_warning[300];
    PQnoticeReceiver prev_notice;
    /* read-ahead (see p_read): a read sent but not yet collected
     * (ahead_sent), or collected and kept (ahead_kept, in ahead_res) */
    bool ahead_sent, ahead_kept, ahead_whole;
    int ahead_count; /* its items (send_read) */
    int64_t ahead_after, ahead_limit;
    int64_t handed_upto; /* the last row a read handed on */
    PGresult *ahead_res[R_COUNT];
    char warning[600];     /* a warning due, "" when none */
    char warning_out[600]; /* the one warning() handed out last */
} pg_source;

static atomic_ulong barrier_attempts, aheads_used, aheads_dropped;

static void settle(pg_source *s, bool keep);

static const char *text_or_null(const PGresult *r, int i, int col)
{
    return PQgetisnull(r, i, col) ? NULL : PQgetvalue(r, i, col);
}

static void row_from(const PGresult *r, int i, de__row *row)
{
    row->position = strtoll(PQgetvalue(r, i, 0), NULL, 10);
    row->event_id = text_or_null(r, i, 1);
    row->subject_type = text_or_null(r, i, 2);
    row->subject_id = text_or_null(r, i, 3);
    row->subject_id_len = (size_t)PQgetlength(r, i, 3);
    row->action = text_or_null(r, i, 4);
    row->version = atoi(PQgetvalue(r, i, 5));
    row->occurred_at_ms = strtoll(PQgetvalue(r, i, 6), NULL, 10);
    row->recorded_at_ms = strtoll(PQgetvalue(r, i, 7), NULL, 10);
    row->payload = text_or_null(r, i, 8);
    row->payload_len = (size_t)PQgetlength(r, i, 8);
    row->traceparent = text_or_null(r, i, 9);
    row->tracestate = text_or_null(r, i, 10);
    row->dataschema = text_or_null(r, i, 11);
}

/* The statements a read makes, prepared once per connection (setup())
 * as deliveryevents_src_<n>: parsing and planning the read each time
 * cost the server more than running it. */
enum {
    Q_WAIT,
    Q_BARRIER,
    Q_WRITTEN,
    Q_READ,
    Q_FLUSHED,
    Q_LOWER,
    Q_ONE,
    Q_COUNT
};

#define READ_COLS                                                              \
    "o.position, e.event_id, e.subject_type, e.subject_id, e.action, "         \
    "e.version, e.occurred_at_ms, e.recorded_at_ms, e.payload, "               \
    "e.traceparent, e.tracestate, e.dataschema FROM "                          \
    "deliveryevents.outbox_order o JOIN deliveryevents.outbox e ON e.id = "    \
    "o.id"

static const char *const prepared_sql[Q_COUNT] = {
    /* The barrier's wait bound, for its transaction only. */
    [Q_WAIT] = "SELECT pg_catalog.set_config('lock_timeout', $1, true)",
    /* Steps (1) and (2): v, then -- only when something was drawn since
     * the cursor $1 -- the commit-order lock exclusive.  The lock is
     * evaluated for the sequence's row, so after v is read. */
    [Q_BARRIER] = "SELECT v, CASE WHEN v > $1 THEN "
                  "pg_catalog.pg_advisory_xact_lock(" DE__PG_LOCK_CLASS
                  ", " DE__PG_LOCK_ORDER ") END FROM (SELECT CASE WHEN "
                  "is_called THEN last_value ELSE 0 END AS v FROM "
                  "deliveryevents.outbox_position) s",
    /* After (2): the end of the WAL written so far, hence past the
     * commit record of every recorder of a position <= v (see
     * durable()). */
    [Q_WRITTEN] = "SELECT pg_catalog.pg_current_wal_insert_lsn()::text",
    /* After (3): how far the server has flushed its WAL, whether it has
     * synchronous standbys (see durable()), and whether the sleeping
     * flag is up (see finish_read). */
    [Q_FLUSHED] = "SELECT pg_catalog.pg_current_wal_flush_lsn()::text, "
                  "pg_catalog.current_setting('synchronous_standby_names') "
                  "<> '', (SELECT last_value FROM "
                  "deliveryevents.relay_sleeping) <> 0",
    /* The sleeping flag lowered (see p_awake). */
    [Q_LOWER] = "SELECT pg_catalog.setval('deliveryevents.relay_sleeping', 0)",
    /* Step (3), after the barrier's COMMIT: rows above v may be visible
     * too; the caller hands on only those <= v (they come first). */
    [Q_READ] = "SELECT " READ_COLS " WHERE o.position > $1 "
               "ORDER BY o.position LIMIT $2",
    [Q_ONE] = "SELECT " READ_COLS " WHERE o.position = $1",
};

/* Listens and prepares the statements: what a new connection lacks. */
static de_err setup(pg_source *s)
{
    char name[40];
    de_err err;

    if ((err = de__pg_exec(s->conn, DE__PG_RELAY_SESSION_SQL, PGRES_COMMAND_OK,
                           NULL, "relay: cannot set up its connection")) !=
            DE_OK ||
        (err = de__pg_exec(s->conn, "LISTEN " DE__PG_CHANNEL, PGRES_COMMAND_OK,
                           NULL, "relay: cannot listen for commits")) != DE_OK)
        return err;
    for (int i = 0; i < Q_COUNT; i++) {
        PGresult *r;
        snprintf(name, sizeof name, "deliveryevents_src_%d", i);
        r = PQprepare(s->conn, name, prepared_sql[i], 0, NULL);
        if (r == NULL || PQresultStatus(r) != PGRES_COMMAND_OK)
            return de__pg_fail(s->conn, r,
                               "relay: cannot prepare its statements");
        PQclear(r);
    }
    return DE_OK;
}

/* setup() on a connection just reset, remembering a failure: half set
 * up (some statements prepared, its session settings perhaps not), the
 * connection is reset again before its next use rather than used. */
static de_err set_up_reset(pg_source *s)
{
    de_err err = setup(s);

    s->unset = err != DE_OK;
    return err;
}

/* Reconnects a dropped connection, or one left half set up, and sets it
 * up again. */
static de_err ensure_conn(pg_source *s)
{
    settle(s, false);
    if (PQstatus(s->conn) == CONNECTION_OK && !s->unset)
        return DE_OK;
    PQreset(s->conn);
    if (PQstatus(s->conn) != CONNECTION_OK)
        return de__pg_fail(s->conn, NULL,
                           "relay: cannot reconnect to PostgreSQL");
    return set_up_reset(s);
}

/* Runs prepared statement q with text parameters, expecting rows; *res
 * receives the result. */
static de_err query_prepared(pg_source *s, int q, int n,
                             const char *const *values, PGresult **res,
                             const char *what)
{
    char name[40];
    PGresult *r;
    de_err err;

    if ((err = ensure_conn(s)) != DE_OK)
        return err;
    snprintf(name, sizeof name, "deliveryevents_src_%d", q);
    r = PQexecPrepared(s->conn, name, n, values, NULL, NULL, 0);
    if (r == NULL || PQresultStatus(r) != PGRES_TUPLES_OK)
        return de__pg_fail(s->conn, r, what);
    *res = r;
    return DE_OK;
}

/* Runs sql with text parameters, expecting rows (TUPLES_OK) or a command
 * result; *res receives the result. */
static de_err query(pg_source *s, const char *sql, int n,
                    const char *const *values, ExecStatusType want,
                    PGresult **res, const char *what)
{
    PGresult *r;
    de_err err;

    if ((err = ensure_conn(s)) != DE_OK)
        return err;
    r = PQexecParams(s->conn, sql, n, NULL, values, NULL, NULL, 0);
    if (r == NULL || PQresultStatus(r) != want)
        return de__pg_fail(s->conn, r, what);
    *res = r;
    return DE_OK;
}

/* Makes everything the last read saw durable (see the invariants).  The
 * transaction must write WAL of its own: one that only takes a
 * transaction id (pg_current_xact_id) writes none, and PostgreSQL then
 * commits it without a flush whatever synchronous_commit says.  A
 * transactional logical message is the smallest record that any role
 * may write, at any wal_level. */
static de_err flush_barrier(pg_source *s)
{
    de_err err;

    s->flush_warning[0] = '\0';
    s->in_flush = true;
    err = de__pg_exec(s->conn,
                      "BEGIN; SET LOCAL synchronous_commit = on; "
                      "SELECT pg_catalog.pg_logical_emit_message(true, "
                      "'deliveryevents', ''); COMMIT",
                      PGRES_COMMAND_OK, NULL,
                      "relay: cannot make the rows read durable");
    s->in_flush = false;
    if (err == DE_OK && s->flush_warning[0] != '\0')
        err = de__fail(DE_ERR_DB,
                       "relay: the commit that makes the rows read durable "
                       "was not confirmed (%s); reading them again",
                       s->flush_warning);
    return err;
}

/*
 * The source connection's notices.  A commit waiting for synchronous
 * standbys that is cancelled (pg_cancel_backend, a signal) stops waiting
 * with only a WARNING ("canceling wait for synchronous replication"),
 * and the COMMIT still succeeds: durable on this server, perhaps on no
 * standby.  A WARNING during flush_barrier therefore fails it, and the
 * rows are read and flushed again.  Every notice then goes on to the
 * receiver the connection had (libpq's: stderr).
 */
static void on_notice(void *arg, const PGresult *r)
{
    pg_source *s = arg;
    const char *severity = PQresultErrorField(r, PG_DIAG_SEVERITY_NONLOCALIZED);
    const char *msg = PQresultErrorField(r, PG_DIAG_MESSAGE_PRIMARY);

    if (s->in_flush && severity != NULL && strcmp(severity, "WARNING") == 0)
        snprintf(s->flush_warning, sizeof s->flush_warning, "%s",
                 msg != NULL ? msg : "a WARNING");
    if (s->prev_notice != NULL)
        s->prev_notice(NULL, r);
}

/* An LSN as pg_lsn's text form shows it ("16/B374D848"); 0 if not. */
static uint64_t lsn_of(const PGresult *r)
{
    unsigned hi, lo;

    if (PQntuples(r) != 1 ||
        sscanf(PQgetvalue(r, 0, 0), "%X/%X", &hi, &lo) != 2)
        return 0;
    return (uint64_t)hi << 32 | lo;
}

/*
 * Whether the rows a read took (positions <= v) are durable already, so
 * that the flush transaction (flush_barrier) can be skipped.  written is
 * pg_current_wal_insert_lsn() taken after the barrier's lock was granted,
 * flushed pg_current_wal_flush_lsn() taken after the read.
 *
 * Why that is enough: a recorder of a position <= v held the commit-order
 * lock, shared, from before v was read until after its commit -- and
 * PostgreSQL inserts a commit record into the WAL before the commit
 * becomes visible, and releases locks after that.  The exclusive lock was
 * granted only once all of them had released it, so each of their commit
 * records (or abort records: nothing then to publish) ends at or before
 * `written`.  The WAL is flushed in order: once the server's flush
 * position reaches `written`, every one of those commit records is on
 * disk, whether the recorder committed with synchronous_commit on or off,
 * and no crash of the server can undo a row handed on.  Rows above v are
 * never handed on by this read.  Anything else in the WAL before
 * `written` (other sessions' work, the relay's own setval) can only make
 * the answer "not yet", never a wrong "yes"; a "not yet" costs the flush
 * transaction, as before.  A writer committing with synchronous_commit=on
 * (the default) has flushed its commit itself, so at low load the answer
 * is normally yes.  An unreadable LSN answers no.
 *
 * A server with synchronous standbys always answers no: a recorder that
 * committed with synchronous_commit=local or off is visible before the
 * standbys hold its commit, and a failover would undo it.  The flush
 * transaction's commit waits for them as the server's settings require
 * (FIRST n, ANY n), which no comparison of positions here could know;
 * it costs one round trip per read that found rows, on such servers
 * only.  The setting is read with every read, so a reload that adds
 * standbys counts from the next read on.
 */
static bool durable(const PGresult *written, const PGresult *flushed)
{
    uint64_t w = lsn_of(written);

    if (PQntuples(flushed) != 1 || PQnfields(flushed) < 2 ||
        strcmp(PQgetvalue(flushed, 0, 1), "f") != 0)
        return false;
    return w != 0 && lsn_of(flushed) >= w;
}

static de_err set_sleeping(pg_source *s, bool up);

/*
 * A relay's source keeps the sleeping flag as it should be, by what the
 * read's last statement says of it (flushed, its third column), unless
 * this read lowered it itself (lowered):
 *  - busy (rows found) with the flag up though this source did not raise
 *    it: a relay killed or demoted while it slept left it so, and every
 *    recording commit would notify -- serialising them -- until this
 *    relay next slept and woke, which a relay kept busy may not do for
 *    long.  Taken as this source's own: the next read lowers it;
 *  - asleep (this source raised it, or tried to: p_sleep_begin, and no
 *    lowering is due) with the flag down: lowered behind its back
 *    (another source closing), or never raised (a setval that failed,
 *    the connection lost).  Commits would send no NOTIFY until the relay
 *    woke for work; it is raised again, and changed() asks for a read
 *    after that, which covers the commits in between.
 */
static void keep_flag(pg_source *s, const PGresult *flushed, bool lowered,
                      bool busy)
{
    bool up;

    if (!s->relay || lowered || PQntuples(flushed) != 1 ||
        PQnfields(flushed) < 3)
        return;
    up = strcmp(PQgetvalue(flushed, 0, 2), "t") == 0;
    if (busy && up && !s->sleeping) {
        s->sleeping = true;
        s->lower = true;
    } else if (!up && s->sleeping && !s->lower) {
        /* Failing (a lost connection, which asks for a read by itself),
         * the next read retries: no round of its own, which a setval
         * that always fails would turn into a loop. */
        if (set_sleeping(s, true) == DE_OK)
            s->recheck = true;
    }
}

/* Hands the first `rows` rows of r to fn in order, stopping at
 * DE__AGAIN.  While a read-ahead is on its way, the results arriving are
 * taken off the socket as the rows go (PQconsumeInput only buffers them):
 * a server whose socket buffer fills would stop producing them. */
static de_err deliver(pg_source *s, const PGresult *r, int rows, de__row_fn fn,
                      void *ctx, int64_t *n)
{
    de_err err = DE_OK;
    de__row row;
    int i;

    for (i = 0; i < rows; i++) {
        if (s->ahead_sent && (i & 63) == 63)
            (void)PQconsumeInput(s->conn);
        row_from(r, i, &row);
        if ((err = fn(ctx, &row)) != DE_OK)
            break;
        (*n)++;
    }
    return err == DE__AGAIN ? DE_OK : err;
}

/* The caller's batch hook (source.h) on the first `rows` rows of r. */
static de_err batch_hook(pg_source *s, const PGresult *r, int rows)
{
    const char **types = malloc((size_t)rows * sizeof *types);
    const char **ids = malloc((size_t)rows * sizeof *ids);
    de_err err;

    if (types == NULL || ids == NULL) {
        err = de__fail(DE_ERR_NOMEM, "relay: out of memory reading");
    } else {
        for (int i = 0; i < rows; i++) {
            types[i] = PQgetvalue(r, i, 2);
            ids[i] = PQgetvalue(r, i, 3);
        }
        err = s->base.batch(s->base.batch_ctx, rows, types, ids);
    }
    free(types);
    free(ids);
    return err;
}

static bool send_prepared(pg_source *s, int q, int n, const char *const *values)
{
    char name[40];

    snprintf(name, sizeof name, "deliveryevents_src_%d", q);
    return PQsendQueryPrepared(s->conn, name, n, values, NULL, NULL, 0) == 1;
}

static de_err setup(pg_source *s);

/* Collects the results of the n items sent since PQenterPipelineMode
 * (sync[i]: item i is a sync) into res[i] -- NULL when it never came --
 * and leaves pipeline mode.  False when the exchange broke off (a lost
 * connection) or went out of step; a connection left out of step (still
 * up, results unread, perhaps still in pipeline mode) is reset and set
 * up again, since nothing sent on it later could be told from what is
 * left, and changed() then asks for another round (notifications may be
 * lost with it). */
static bool pipeline_collect(pg_source *s, int n, const bool *sync,
                             PGresult **res)
{
    PGresult *r;
    bool whole = true;

    for (int i = 0; i < n; i++) {
        res[i] = whole ? PQgetResult(s->conn) : NULL;
        if (res[i] == NULL ||
            (PQresultStatus(res[i]) == PGRES_PIPELINE_SYNC) != sync[i]) {
            whole = false;
            continue;
        }
        /* Each statement's results end with a NULL; a sync's do not. */
        while (!sync[i] && (r = PQgetResult(s->conn)) != NULL)
            PQclear(r);
    }
    if (PQexitPipelineMode(s->conn) != 1)
        whole = false;
    if (!whole && PQstatus(s->conn) == CONNECTION_OK) {
        PQreset(s->conn);
        if (PQstatus(s->conn) == CONNECTION_OK)
            (void)set_up_reset(s); /* failing: reset again at next use */
        s->recheck = true;
    }
    return whole;
}

/*
 * A barrier attempt timed out (55P03): some transaction holds the
 * commit-order lock shared and stays open -- one that recorded events
 * and ran SET CONSTRAINTS ALL IMMEDIATE, or was prepared (PREPARE
 * TRANSACTION) and waits for COMMIT PREPARED -- and each attempt held
 * new recorders up for up to barrier_ms.  The first timeout is retried
 * at the next poll, as any slow commit would be; from the second in a
 * row the source waits DE__PG_BARRIER_BACKOFF_MS before the next
 * attempt, doubling each time up to DE__PG_BARRIER_BACKOFF_MAX_MS, and
 * warns (at the second timeout, then at the 4th, 8th, 16th ...: a line
 * per doubling of the stall, not per attempt).  A barrier that succeeds
 * ends the back-off.
 */
static void timed_out(pg_source *s)
{
    int64_t now = de__mono_us(), wait_ms;

    if (s->timeouts++ == 0)
        s->stalled_us = now;
    if (s->timeouts < 2)
        return;
    wait_ms = DE__PG_BARRIER_BACKOFF_MS;
    for (int i = 2; i < s->timeouts && wait_ms < DE__PG_BARRIER_BACKOFF_MAX_MS;
         i++)
        wait_ms *= 2;
    if (wait_ms > DE__PG_BARRIER_BACKOFF_MAX_MS)
        wait_ms = DE__PG_BARRIER_BACKOFF_MAX_MS;
    s->retry_us = now + wait_ms * 1000;
    if ((s->timeouts & (s->timeouts - 1)) == 0)
        snprintf(s->warning, sizeof s->warning,
                 "the outbox's commit-order lock is held by an open "
                 "transaction (%d attempts in a row timed out over %.1f s): "
                 "a transaction that recorded events and ran SET "
                 "CONSTRAINTS ALL IMMEDIATE, or was prepared with PREPARE "
                 "TRANSACTION and waits for COMMIT PREPARED; nothing "
                 "recorded after it is published until it ends, and each "
                 "attempt holds new recorders up for up to %d ms, so the "
                 "relay now tries every %lld ms (see pg_locks and "
                 "pg_prepared_xacts)",
                 s->timeouts, (double)(now - s->stalled_us) / 1e6,
                 s->barrier_ms, (long long)wait_ms);
}

/* Which items of a read are syncs (see R_*). */
static const bool read_sync[R_COUNT] = {
    [R_SYNC1] = true, [R_SYNC2] = true, [R_SYNC3] = true};

/*
 * Sends the barrier read (see the top of this file) of the rows after
 * `after`, at most limit of them, in one round trip without waiting for
 * its results: the wait bound, (1) and (2) in an implicit transaction
 * whose sync commits it -- releasing the lock at once -- then (3), whose
 * snapshot is taken after that, and the flag's lowering when it is due
 * (in a transaction of its own after the read: the WAL its setval
 * writes is not one the read must wait for).  *count receives how many
 * items pipeline_collect is to collect, also on failure.
 */
static de_err send_read(pg_source *s, int64_t after, int64_t limit, int *count)
{
    char a[24], l[24], w[24];
    const char *wait[1] = {w}, *barrier[1] = {a}, *read[2] = {a, l};
    const char *what = "relay: reading the outbox failed";

    *count = 0;
    atomic_fetch_add(&barrier_attempts, 1);
    snprintf(a, sizeof a, "%lld", (long long)after);
    snprintf(l, sizeof l, "%lld", (long long)limit);
    snprintf(w, sizeof w, "%d", s->barrier_ms);
    if (PQenterPipelineMode(s->conn) != 1)
        return de__pg_fail(s->conn, NULL, what);
    *count = s->lower ? R_COUNT : R_LOWER;
    if (!send_prepared(s, Q_WAIT, 1, wait) ||
        !send_prepared(s, Q_BARRIER, 1, barrier) ||
        !send_prepared(s, Q_WRITTEN, 0, NULL) || PQpipelineSync(s->conn) != 1 ||
        !send_prepared(s, Q_READ, 2, read) ||
        !send_prepared(s, Q_FLUSHED, 0, NULL) || PQpipelineSync(s->conn) != 1 ||
        (s->lower && (!send_prepared(s, Q_LOWER, 0, NULL) ||
                      PQpipelineSync(s->conn) != 1))) {
        /* Whatever went is flushed and ends, so that collecting it
         * cannot wait for ever; it comes back out of step. */
        (void)PQpipelineSync(s->conn);
        return de__pg_fail(s->conn, NULL, what);
    }
    return DE_OK;
}

static void clear_results(PGresult **res, int count)
{
    for (int i = 0; i < count; i++) {
        PQclear(res[i]);
        res[i] = NULL;
    }
}

static de_err finish_read(pg_source *s, PGresult **res, int count,
                          int64_t sent_limit, int64_t limit, de__row_fn fn,
                          void *ctx, int64_t *n);

/* Collects a read-ahead on its way (see p_read): every other use of the
 * connection comes after it.  keep: its results wait for the next read
 * (p_read, changed()); else they are dropped -- a query of another kind
 * came between, and a read-ahead is used only by the read right after
 * the one that sent it, so that it is never older than that.  A dropped
 * one's flag lowering (Q_LOWER) still counts. */
static void settle(pg_source *s, bool keep)
{
    int64_t none;

    if (s->ahead_sent) {
        s->ahead_sent = false;
        s->ahead_whole =
            pipeline_collect(s, s->ahead_count, read_sync, s->ahead_res);
        s->ahead_kept = true;
    }
    if (keep || !s->ahead_kept)
        return;
    s->ahead_kept = false;
    atomic_fetch_add(&aheads_dropped, 1);
    if (s->ahead_whole)
        (void)finish_read(s, s->ahead_res, s->ahead_count, s->ahead_limit, 0,
                          NULL, NULL, &none);
    clear_results(s->ahead_res, R_COUNT);
}

/*
 * Hands on what a read (res, its `count` items, asked with sent_limit)
 * found: at most limit rows (0: none, the read is dropped), to fn.
 * Before the first row: the flag's bookkeeping, the barrier's timeout
 * (55P03: a recorder is still in its commit; DE__AGAIN, nothing read),
 * the durability flush when the WAL is not flushed past the rows.  A
 * read that came back full, every row at or below v, sends the next
 * read at once (read-ahead), before the rows go to fn: the server reads
 * the next batch while the relay produces this one.  fn NULL: a
 * read-ahead dropped, only the flag's bookkeeping counts.  Clears res.
 */
static de_err finish_read(pg_source *s, PGresult **res, int count,
                          int64_t sent_limit, int64_t limit, de__row_fn fn,
                          void *ctx, int64_t *n)
{
    const char *what = "relay: reading the outbox failed";
    int64_t v;
    int rows, found, bad = -1;
    de_err err = DE_OK;

    if (s->lower && count == R_COUNT &&
        PQresultStatus(res[R_LOWER]) == PGRES_TUPLES_OK) {
        /* Commits from now on may send no NOTIFY: read once more. */
        s->lower = false;
        s->sleeping = false;
        s->recheck = true;
    }
    for (int i = 0; bad < 0 && i < R_LOWER; i++)
        if (!read_sync[i] && PQresultStatus(res[i]) != PGRES_TUPLES_OK)
            bad = i;
    if (bad >= 0) {
        const char *state = PQresultErrorField(res[bad], PG_DIAG_SQLSTATE);
        if (bad == R_BARRIER && state != NULL && strcmp(state, "55P03") == 0) {
            /* A recorder is still in its commit (SET CONSTRAINTS ALL
             * IMMEDIATE, PREPARE TRANSACTION, a slow commit): read
             * nothing now, and ask for another round. */
            s->recheck = true;
            if (fn != NULL) /* not for a read nobody asked for */
                timed_out(s);
            err = DE__AGAIN;
        } else {
            err = de__pg_fail(s->conn, res[bad],
                              bad == R_BARRIER
                                  ? "relay: waiting for commits in flight "
                                    "failed"
                                  : what);
            res[bad] = NULL; /* cleared by de__pg_fail */
        }
        goto done;
    }
    s->timeouts = 0;
    v = strtoll(PQgetvalue(res[R_BARRIER], 0, 0), NULL, 10);
    found = PQntuples(res[R_READ]);
    for (rows = 0; rows < found && rows < limit &&
                   strtoll(PQgetvalue(res[R_READ], rows, 0), NULL, 10) <= v;
         rows++)
        ;
    keep_flag(s, res[R_FLUSHED], count == R_COUNT, rows > 0);
    if (rows == 0)
        goto done;
    if (!durable(res[R_WRITTEN], res[R_FLUSHED]) &&
        (err = flush_barrier(s)) != DE_OK)
        goto done;
    if (rows == sent_limit && sent_limit >= AHEAD_MIN) {
        /* Full: more rows are likely.  A failure to send is the next
         * read's to find (it reconnects). */
        int64_t last = strtoll(PQgetvalue(res[R_READ], rows - 1, 0), NULL, 10);
        if (send_read(s, last, sent_limit, &s->ahead_count) == DE_OK) {
            s->ahead_sent = true;
            s->ahead_after = last;
            s->ahead_limit = sent_limit;
        } else {
            (void)pipeline_collect(s, s->ahead_count, read_sync, s->ahead_res);
            clear_results(s->ahead_res, s->ahead_count);
        }
    }
    if (s->base.batch != NULL && fn != NULL &&
        (err = batch_hook(s, res[R_READ], rows)) != DE_OK)
        goto done;
    err = deliver(s, res[R_READ], rows, fn, ctx, n);
    if (*n > 0)
        s->handed_upto =
            strtoll(PQgetvalue(res[R_READ], (int)*n - 1, 0), NULL, 10);
done:
    clear_results(res, count);
    return err;
}

/*
 * The barrier read (see the top of this file), in one round trip: the
 * read-ahead the last read sent (finish_read), when it is of the rows
 * after `after`, else a read sent now.  A read-ahead of other rows (the
 * caller took fewer than were read) is dropped.  One that asked for
 * fewer rows than limit is handed on whole, and the rest read after it
 * (a short read means "no more" to the caller).  Rows are handed on
 * only up to v; nothing read (DE__AGAIN) when the barrier timed out,
 * and changed() asks for another round.
 */
static de_err p_read(de__source *src, int64_t after, int64_t limit,
                     de__row_fn fn, void *ctx, int64_t *n)
{
    pg_source *s = (pg_source *)src;
    PGresult *res[R_COUNT] = {NULL};
    int64_t got;
    int count = 0;
    de_err err;

    *n = 0;
    settle(s, true);
    while (s->ahead_kept) {
        if (!s->ahead_whole || s->ahead_after != after) {
            settle(s, false); /* dropped, the flag's bookkeeping kept */
            break;
        }
        /* Its results move here: finish_read may send the next one. */
        s->ahead_kept = false;
        count = s->ahead_count;
        memcpy(res, s->ahead_res, sizeof res);
        memset(s->ahead_res, 0, sizeof s->ahead_res);
        atomic_fetch_add(&aheads_used, 1);
        got = 0;
        err = finish_read(s, res, count, s->ahead_limit, limit - *n, fn, ctx,
                          &got);
        *n += got;
        if (err != DE_OK || got < s->ahead_limit || *n == limit)
            return err;
        /* All of it taken, and more asked for: the rows after it. */
        after = s->handed_upto;
        settle(s, true);
    }
    if (s->timeouts >= 2 && de__mono_us() < s->retry_us) {
        /* Backing off (timed_out()): no attempt.  A flag left up would
         * make every commit notify (serialising them) for nothing. */
        if (s->lower)
            (void)set_sleeping(s, false);
        s->recheck = true;
        return *n > 0 ? DE_OK : DE__AGAIN;
    }
    if ((err = ensure_conn(s)) != DE_OK)
        return err;
    err = send_read(s, after, limit - *n, &count);
    if (!pipeline_collect(s, count, read_sync, res) && err == DE_OK)
        err = de__pg_fail(s->conn, NULL, "relay: reading the outbox failed");
    if (err != DE_OK) {
        clear_results(res, count);
        return err;
    }
    got = 0;
    err = finish_read(s, res, count, limit - *n, limit - *n, fn, ctx, &got);
    *n += got;
    return err;
}

/* The row at position (its result in *res, no row when there is none). */
static de_err one(pg_source *s, int64_t position, PGresult **res)
{
    char p[24];
    const char *values[1] = {p};

    snprintf(p, sizeof p, "%lld", (long long)position);
    return query_prepared(s, Q_ONE, 1, values, res,
                          "relay: reading the outbox failed");
}

static de_err p_read_one(de__source *src, int64_t position, de__row_fn fn,
                         void *ctx, bool *found)
{
    PGresult *r;
    de_err err;

    *found = false;
    if ((err = one((pg_source *)src, position, &r)) != DE_OK)
        return err;
    *found = PQntuples(r) == 1;
    if (*found) {
        de__row row;
        row_from(r, 0, &row);
        err = fn(ctx, &row);
    }
    PQclear(r);
    return err;
}

/* The single bigint a query returns (0 when it returns no row or NULL). */
static de_err single_int(pg_source *s, const char *sql, int64_t *out,
                         const char *what)
{
    PGresult *r;
    de_err err;

    *out = 0;
    if ((err = query(s, sql, 0, NULL, PGRES_TUPLES_OK, &r, what)) != DE_OK)
        return err;
    if (PQntuples(r) == 1 && !PQgetisnull(r, 0, 0))
        *out = strtoll(PQgetvalue(r, 0, 0), NULL, 10);
    PQclear(r);
    return DE_OK;
}

static de_err p_max_position(de__source *src, int64_t *out)
{
    return single_int((pg_source *)src,
                      "SELECT max(position) FROM deliveryevents.outbox_order",
                      out, "relay: reading the outbox failed");
}

static const char *p_event_id_at(de__source *src, int64_t position,
                                 char buf[DE__EVENT_ID_MAX + 1])
{
    const char *id = NULL;
    PGresult *r;

    if (one((pg_source *)src, position, &r) != DE_OK)
        return NULL;
    if (PQntuples(r) == 1 && !PQgetisnull(r, 0, 1) &&
        PQgetlength(r, 0, 1) <= DE__EVENT_ID_MAX) {
        memcpy(buf, PQgetvalue(r, 0, 1), (size_t)PQgetlength(r, 0, 1) + 1);
        id = buf;
    }
    PQclear(r);
    return id;
}

static de_err p_deleted_upto(de__source *src, int64_t *out)
{
    return single_int((pg_source *)src,
                      "SELECT value::bigint FROM deliveryevents.meta WHERE "
                      "key = 'relay_deleted_upto'",
                      out, "relay: reading the deletion floor failed");
}

static de_err p_stored_setting(de__source *src, const char *key, char **out)
{
    pg_source *s = (pg_source *)src;
    char name[96];
    const char *values[1] = {name};
    PGresult *r;
    de_err err;

    *out = NULL;
    snprintf(name, sizeof name, "setting.%s", key);
    if ((err = query(s, "SELECT value FROM deliveryevents.meta WHERE key = $1",
                     1, values, PGRES_TUPLES_OK, &r,
                     "cannot read the outbox's settings")) != DE_OK)
        return err;
    if (PQntuples(r) == 1 && (*out = strdup(PQgetvalue(r, 0, 0))) == NULL)
        err = de__fail(DE_ERR_NOMEM, "out of memory reading the settings");
    PQclear(r);
    return err;
}

/*
 * Deletes [from, hi] from both tables and raises the floor to hi, in one
 * transaction.  hi is `to`, or with recorded_before the end of the run of
 * rows from `from` recorded at or before it.  A row lock held elsewhere
 * (someone locked an outbox row) makes it DE__AGAIN after
 * DELETE_LOCK_WAIT rather than a wait.
 */
static de_err p_delete_range(de__source *src, int64_t from, int64_t to,
                             int64_t recorded_before, int64_t *upto,
                             int *deleted)
{
    pg_source *s = (pg_source *)src;
    char f[24], t[24], rb[24];
    const char *values[3] = {f, t, rb};
    PGresult *r;
    de_err err;

    *upto = from - 1;
    *deleted = 0;
    snprintf(f, sizeof f, "%lld", (long long)from);
    snprintf(t, sizeof t, "%lld", (long long)to);
    snprintf(rb, sizeof rb, "%lld", (long long)recorded_before);
    if ((err = ensure_conn(s)) != DE_OK)
        return err;
    if ((err = de__pg_exec(
             s->conn, "BEGIN; SET LOCAL lock_timeout = '" DELETE_LOCK_WAIT "'",
             PGRES_COMMAND_OK, NULL, "relay: cannot delete published rows")) !=
        DE_OK)
        return err;
    /* hi: with recorded_before, the last position before the first row
     * in the range recorded after it (all of them when there is none). */
    r = PQexecParams(
        s->conn,
        "WITH hi AS (SELECT CASE WHEN $3::bigint <= 0 THEN $2::bigint ELSE "
        "  coalesce((SELECT min(o.position) - 1 FROM "
        "    deliveryevents.outbox_order o JOIN deliveryevents.outbox e "
        "    ON e.id = o.id WHERE o.position BETWEEN $1 AND $2 AND "
        "    e.recorded_at_ms > $3), $2::bigint) END AS v), "
        "d AS (DELETE FROM deliveryevents.outbox_order WHERE position "
        "  BETWEEN $1 AND (SELECT v FROM hi) RETURNING id), "
        "e AS (DELETE FROM deliveryevents.outbox WHERE id IN "
        "  (SELECT id FROM d) RETURNING 1), "
        "f AS (INSERT INTO deliveryevents.meta(key, value) SELECT "
        "  'relay_deleted_upto', v::text FROM hi WHERE v >= $1 "
        "  ON CONFLICT (key) DO UPDATE SET value = greatest("
        "  deliveryevents.meta.value::bigint, excluded.value::bigint)::text "
        "  RETURNING 1) "
        "SELECT (SELECT v FROM hi), (SELECT count(*) FROM e)",
        3, NULL, values, NULL, NULL, 0);
    if (r == NULL || PQresultStatus(r) != PGRES_TUPLES_OK) {
        const char *state = r ? PQresultErrorField(r, PG_DIAG_SQLSTATE) : NULL;
        bool busy = state != NULL && strcmp(state, "55P03") == 0;
        err = busy ? DE__AGAIN
                   : de__pg_fail(s->conn, r,
                                 "relay: deleting published rows failed");
        if (busy)
            PQclear(r);
        PQclear(PQexec(s->conn, "ROLLBACK"));
        return err;
    }
    {
        int64_t hi = strtoll(PQgetvalue(r, 0, 0), NULL, 10);
        int n = atoi(PQgetvalue(r, 0, 1));
        PQclear(r);
        if ((err = de__pg_exec(s->conn, "COMMIT", PGRES_COMMAND_OK, NULL,
                               "relay: deleting published rows failed")) !=
            DE_OK)
            return err;
        if (hi >= from) {
            *upto = hi;
            *deleted = n;
        }
    }
    return DE_OK;
}

/* Whether a commit that recorded events was notified since the last call
 * (all pending notifications are consumed); true when the connection is
 * broken, so that the relay reads and reconnects, and after awake or a
 * barrier that timed out (a round that may have gone unheard). */
static bool p_changed(de__source *src)
{
    pg_source *s = (pg_source *)src;
    bool any = s->recheck;
    PGnotify *n;

    s->recheck = false;
    settle(s, true);
    if (s->ahead_kept)
        any = true; /* a read-ahead waits to be handed on */
    if (PQstatus(s->conn) != CONNECTION_OK || !PQconsumeInput(s->conn))
        return true;
    while ((n = PQnotifies(s->conn)) != NULL) {
        any = true;
        PQfreemem(n);
    }
    return any;
}

static int p_wait_fd(de__source *src)
{
    pg_source *s = (pg_source *)src;

    /* A broken connection's socket may stay readable (EOF): polling it
     * would spin; the poll interval covers until it is back. */
    return PQstatus(s->conn) == CONNECTION_OK ? PQsocket(s->conn) : -1;
}

/* Raises or lowers the relay_sleeping flag: setval is not
 * transactional, so recorders see it at once whatever their snapshot. */
static de_err set_sleeping(pg_source *s, bool up)
{
    PGresult *r;
    de_err err;

    if ((err = query(s,
                     up ? "SELECT pg_catalog.setval("
                          "'deliveryevents.relay_sleeping', 1)"
                        : "SELECT pg_catalog.setval("
                          "'deliveryevents.relay_sleeping', 0)",
                     0, NULL, PGRES_TUPLES_OK, &r,
                     "relay: cannot set its sleeping flag")) != DE_OK)
        return err;
    PQclear(r);
    s->sleeping = up;
    s->lower = false;
    return DE_OK;
}

static bool p_sleep_begin(de__source *src)
{
    pg_source *s = (pg_source *)src;

    /* Failing -- a connection lost, the server failing over -- the flag
     * may be down, and the relay sleeps on as announced: it is wanted up
     * all the same, so that the first read that finds it down raises it
     * (keep_flag).  Else commits would send no NOTIFY until a timer woke
     * the relay: its poll interval, or a fifth of its lease. */
    if (set_sleeping(s, true) != DE_OK && PQstatus(s->conn) != CONNECTION_OK) {
        /* Only for a lost connection: a setval refused on a live one
         * (a privilege missing) would fail again at every read. */
        s->sleeping = true;
        s->lower = false;
    }
    return true;
}

static void p_awake(de__source *src)
{
    pg_source *s = (pg_source *)src;

    /* The relay reads once more (and raises the flag again before it
     * next sleeps); that read lowers the flag at its end, after the WAL
     * position it compares (durable()), so that the setval's WAL record
     * does not make it flush; until then commits notify for nothing.
     * Lowered, the next changed() is true again: commits from then on
     * may send no NOTIFY, and a read after the lowering covers them. */
    s->recheck = true;
    if (s->sleeping)
        s->lower = true;
}

static void p_checkpoint_log(de__source *src)
{
    (void)src; /* PostgreSQL checkpoints on its own */
}

static const char *p_warning(de__source *src)
{
    pg_source *s = (pg_source *)src;

    if (s->warn_prepared) {
        s->warn_prepared = false;
        return "the PostgreSQL server allows prepared transactions "
               "(max_prepared_transactions > 0): a transaction prepared "
               "(PREPARE TRANSACTION) after recording events holds the "
               "outbox's commit-order lock until COMMIT PREPARED or "
               "ROLLBACK PREPARED, and the relay publishes nothing recorded "
               "after it until then";
    }
    if (s->warning[0] == '\0')
        return NULL;
    memcpy(s->warning_out, s->warning, sizeof s->warning_out);
    s->warning[0] = '\0';
    return s->warning_out;
}

unsigned long de__source_pg_barrier_attempts(void)
{
    return atomic_load(&barrier_attempts);
}

void de__source_pg_read_aheads(unsigned long *used, unsigned long *dropped)
{
    *used = atomic_load(&aheads_used);
    *dropped = atomic_load(&aheads_dropped);
}

PGconn *de__source_pg_conn(de__source *src)
{
    return ((pg_source *)src)->conn;
}

void de__source_pg_relay(de__source *src)
{
    ((pg_source *)src)->relay = true;
}

void de__source_pg_barrier_wait(de__source *src, int ms)
{
    ((pg_source *)src)->barrier_ms = ms;
}

static void p_close(de__source *src)
{
    pg_source *s = (pg_source *)src;

    if (s == NULL)
        return;
    /* Left up, the flag would make every recorder notify for nothing.
     * A read-ahead on its way is discarded with the connection. */
    if (s->sleeping && PQstatus(s->conn) == CONNECTION_OK)
        (void)set_sleeping(s, false);
    clear_results(s->ahead_res, R_COUNT);
    PQfinish(s->conn);
    free(s->conninfo);
    free(s);
}

static const de__source_ops pg_ops = {
    .read = p_read,
    .read_one = p_read_one,
    .max_position = p_max_position,
    .event_id_at = p_event_id_at,
    .delete_range = p_delete_range,
    .deleted_upto = p_deleted_upto,
    .changed = p_changed,
    .wait_fd = p_wait_fd,
    .sleep_begin = p_sleep_begin,
    .awake = p_awake,
    .stored_setting = p_stored_setting,
    .warning = p_warning,
    .checkpoint_log = p_checkpoint_log,
    .close = p_close,
};

de_err de__source_open_pg(const char *conninfo, bool create, de__source **out,
                          char outbox_id[37])
{
    pg_source *s = calloc(1, sizeof *s);
    PGresult *r = NULL;
    de_err err;

    *out = NULL;
    if (s == NULL || (s->conninfo = strdup(conninfo)) == NULL) {
        free(s);
        return de__fail(DE_ERR_NOMEM, "out of memory opening the outbox");
    }
    s->base.ops = &pg_ops;
    s->barrier_ms = DE__PG_BARRIER_WAIT_MS;
    {
        /* Named, so that operators (and tests) can tell it in
         * pg_stat_activity; the conninfo's own name wins. */
        const char *const keys[] = {"dbname", "fallback_application_name",
                                    NULL};
        const char *const values[] = {conninfo, "deliveryevents-relay", NULL};
        s->conn = PQconnectdbParams(keys, values, 1);
        /* Kept across PQreset: it belongs to the PGconn.  The one it
         * replaces is libpq's default, which ignores its argument. */
        s->prev_notice = PQsetNoticeReceiver(s->conn, on_notice, s);
    }
    if (PQstatus(s->conn) != CONNECTION_OK) {
        err = de__pg_fail(s->conn, NULL, "relay: cannot connect to PostgreSQL");
        goto fail;
    }
    /* The session's settings before anything runs (setup() makes them
     * again, for a reset connection): the outbox's checks below would
     * otherwise read at a SERIALIZABLE default, and their SIRead locks
     * outlive them while serializable hosts run. */
    if ((err = de__pg_exec(s->conn, DE__PG_RELAY_SESSION_SQL, PGRES_COMMAND_OK,
                           NULL, "relay: cannot set up its connection")) !=
        DE_OK)
        goto fail;
    if (!create) {
        if ((err = de__pg_exec(s->conn,
                               "SELECT to_regclass('deliveryevents.meta') IS "
                               "NOT NULL",
                               PGRES_TUPLES_OK, &r,
                               "relay: cannot look for the outbox")) != DE_OK)
            goto fail;
        if (strcmp(PQgetvalue(r, 0, 0), "t") != 0) {
            err = de__fail(DE_ERR_STATE,
                           "the PostgreSQL database has no outbox (schema "
                           "deliveryevents)");
            goto fail;
        }
    }
    if ((err = de__pg_schema_ensure(s->conn, outbox_id)) != DE_OK ||
        (err = setup(s)) != DE_OK)
        goto fail;
    {
        /* Warned once, at the relay's first read (p_warning). */
        int64_t prepared = 0;
        if ((err = single_int(s,
                              "SELECT pg_catalog.current_setting("
                              "'max_prepared_transactions')::int",
                              &prepared,
                              "relay: cannot read the server's settings")) !=
            DE_OK)
            goto fail;
        s->warn_prepared = prepared > 0;
    }
    PQclear(r);
    *out = &s->base;
    return DE_OK;
fail:
    PQclear(r);
    p_close(&s->base);
    return err;
}

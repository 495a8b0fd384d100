/* SPDX-License-Identifier: MIT */
/*
 * source_sqlite.c -- the outbox in a SQLite database, as a relay reads it
 * (de__source, see source.h): its own connection to the host's file.
 *
 * Invariants:
 *  - a read's snapshot is fixed by its first step, and the log is synced
 *    right after that step, before the first row is handed on: whatever
 *    the host's synchronous setting, a row the relay publishes survives a
 *    power loss (rows in the database file itself came there through a
 *    checkpoint, which syncs the log before and the file after);
 *  - deletions wait at most DELETE_LOCK_WAIT_MS for the host's write
 *    lock and hold it for one small chunk: the host's commits queue
 *    behind cleanup for about a millisecond at most;
 *  - the log is checkpointed without waiting (PASSIVE) whenever asked;
 *    only when it has grown past LOG_TRUNCATE_PAGES anyway (readers kept
 *    the checkpoints from finishing) is it truncated, waiting at most
 *    LOG_TRUNCATE_WAIT_MS for the host's writers;
 *  - the deletion floor (relay_deleted_upto in de_meta) only rises, so a
 *    stale relay resumed after a pause cannot lower it.
 */
#include "source.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* How long a deletion waits for the host's write lock. */
#define DELETE_LOCK_WAIT_MS 5
/* A log this large (in pages) is truncated, not only checkpointed. */
#define LOG_TRUNCATE_PAGES 4096
#define LOG_TRUNCATE_WAIT_MS 20

typedef struct sqlite_source {
    de__source base;
    sqlite3 *db;
    char *path;
    int busy_ms;
    int64_t data_version;
    sqlite3_stmt *read, *one, *max, *del, *floor, *scan, *dv, *floor_get;
} sqlite_source;

static const char read_cols[] =
    "position, event_id, subject_type, subject_id, action, version, "
    "occurred_at_ms, recorded_at_ms, payload, traceparent, tracestate, "
    "dataschema";

static void row_from(sqlite3_stmt *q, de__row *row)
{
    row->position = sqlite3_column_int64(q, 0);
    row->event_id = (const char *)sqlite3_column_text(q, 1);
    row->subject_type = (const char *)sqlite3_column_text(q, 2);
    row->subject_id = (const char *)sqlite3_column_text(q, 3);
    row->subject_id_len = (size_t)sqlite3_column_bytes(q, 3);
    row->action = (const char *)sqlite3_column_text(q, 4);
    row->version = sqlite3_column_int(q, 5);
    row->occurred_at_ms = sqlite3_column_int64(q, 6);
    row->recorded_at_ms = sqlite3_column_int64(q, 7);
    row->payload = (const char *)sqlite3_column_text(q, 8);
    row->payload_len = (size_t)sqlite3_column_bytes(q, 8);
    row->traceparent = (const char *)sqlite3_column_text(q, 9);
    row->tracestate = (const char *)sqlite3_column_text(q, 10);
    row->dataschema = (const char *)sqlite3_column_text(q, 11);
}

/*
 * Makes the database's write-ahead log durable up to what this connection
 * reads: one fsync of the log file (through SQLite's own file handle, so
 * that a VFS sees it).  With synchronous=NORMAL a commit does not sync;
 * this does, off the host's commit path.
 */
static de_err sync_log(sqlite_source *s)
{
    sqlite3_file *f = NULL;
    int rc;

    rc = sqlite3_file_control(s->db, "main", SQLITE_FCNTL_JOURNAL_POINTER, &f);
    if (rc != SQLITE_OK)
        return de__fail(DE_ERR_DB, "relay: cannot reach the log of '%s': %s",
                        s->path, sqlite3_errstr(rc));
    if (f == NULL || f->pMethods == NULL)
        return DE_OK; /* no log open: everything read is in the file */
    rc = f->pMethods->xSync(f, SQLITE_SYNC_NORMAL);
    if (rc != SQLITE_OK)
        return de__fail(DE_ERR_DB,
                        "relay: cannot sync the log of '%s' before "
                        "publishing: %s",
                        s->path, sqlite3_errstr(rc));
    return DE_OK;
}

static de_err s_read(de__source *src, int64_t after, int64_t limit,
                     de__row_fn fn, void *ctx, int64_t *n)
{
    sqlite_source *s = (sqlite_source *)src;
    de_err err = DE_OK;
    de__row row;
    int rc;

    *n = 0;
    sqlite3_bind_int64(s->read, 1, after);
    sqlite3_bind_int64(s->read, 2, limit);
    while ((rc = sqlite3_step(s->read)) == SQLITE_ROW) {
        /* The snapshot is fixed by the first step: sync once, before
         * anything read is handed on. */
        if (*n == 0 && (err = sync_log(s)) != DE_OK)
            break;
        row_from(s->read, &row);
        if ((err = fn(ctx, &row)) != DE_OK)
            break;
        (*n)++;
    }
    if (err == DE_OK && rc != SQLITE_DONE && rc != SQLITE_ROW)
        err = de__fail_db(s->db, "relay: reading the outbox of '%s' failed",
                          s->path);
    sqlite3_reset(s->read);
    return err == DE__AGAIN ? DE_OK : err;
}

static de_err s_read_one(de__source *src, int64_t position, de__row_fn fn,
                         void *ctx, bool *found)
{
    sqlite_source *s = (sqlite_source *)src;
    de_err err = DE_OK;
    de__row row;
    int rc;

    *found = false;
    sqlite3_bind_int64(s->one, 1, position);
    rc = sqlite3_step(s->one);
    if (rc == SQLITE_ROW) {
        *found = true;
        row_from(s->one, &row);
        err = fn(ctx, &row);
    } else if (rc != SQLITE_DONE) {
        err = de__fail_db(s->db, "relay: reading the outbox of '%s' failed",
                          s->path);
    }
    sqlite3_reset(s->one);
    return err;
}

static de_err s_max_position(de__source *src, int64_t *out)
{
    sqlite_source *s = (sqlite_source *)src;
    de_err err = DE_OK;

    *out = 0;
    if (sqlite3_step(s->max) == SQLITE_ROW)
        *out = sqlite3_column_int64(s->max, 0);
    else
        err = de__fail_db(s->db, "relay: reading the outbox of '%s' failed",
                          s->path);
    sqlite3_reset(s->max);
    return err;
}

static const char *s_event_id_at(de__source *src, int64_t position,
                                 char buf[DE__EVENT_ID_MAX + 1])
{
    sqlite_source *s = (sqlite_source *)src;
    const unsigned char *v;
    const char *id = NULL;

    sqlite3_bind_int64(s->one, 1, position);
    if (sqlite3_step(s->one) == SQLITE_ROW &&
        (v = sqlite3_column_text(s->one, 1)) != NULL &&
        strlen((const char *)v) <= DE__EVENT_ID_MAX) {
        memcpy(buf, v, strlen((const char *)v) + 1);
        id = buf;
    }
    sqlite3_reset(s->one);
    return id;
}

static de_err s_deleted_upto(de__source *src, int64_t *out)
{
    sqlite_source *s = (sqlite_source *)src;
    int rc;

    *out = 0;
    rc = sqlite3_step(s->floor_get);
    if (rc == SQLITE_ROW)
        *out = sqlite3_column_int64(s->floor_get, 0);
    sqlite3_reset(s->floor_get);
    if (rc != SQLITE_ROW && rc != SQLITE_DONE)
        return de__fail_db(s->db, "relay: reading the outbox of '%s' failed",
                           s->path);
    return DE_OK;
}

static de_err s_stored_setting(de__source *src, const char *key, char **out)
{
    return de__outbox_stored_setting(((sqlite_source *)src)->db, key, out);
}

static de_err s_delete_range(de__source *src, int64_t from, int64_t to,
                             int64_t recorded_before, int64_t *upto,
                             int *deleted)
{
    sqlite_source *s = (sqlite_source *)src;
    int64_t hi = to;
    int rc;

    *upto = from - 1;
    *deleted = 0;
    if (recorded_before > 0) {
        /* Only the rows old enough for outbox.retention.ms, from the
         * start of the range. */
        hi = from - 1;
        sqlite3_bind_int64(s->scan, 1, from - 1);
        sqlite3_bind_int64(s->scan, 2, to);
        sqlite3_bind_int64(s->scan, 3, to - from + 1);
        while (sqlite3_step(s->scan) == SQLITE_ROW &&
               sqlite3_column_int64(s->scan, 1) <= recorded_before)
            hi = sqlite3_column_int64(s->scan, 0);
        sqlite3_reset(s->scan);
        if (hi < from)
            return DE_OK;
    }
    sqlite3_busy_timeout(s->db, DELETE_LOCK_WAIT_MS);
    rc = sqlite3_exec(s->db, "BEGIN IMMEDIATE", NULL, NULL, NULL);
    sqlite3_busy_timeout(s->db, s->busy_ms);
    if (rc == SQLITE_BUSY)
        return DE__AGAIN; /* the host is writing: later */
    if (rc != SQLITE_OK)
        return de__fail_db(s->db, "relay: cannot delete published rows");
    sqlite3_bind_int64(s->del, 1, from);
    sqlite3_bind_int64(s->del, 2, hi);
    sqlite3_bind_int64(s->floor, 1, hi);
    rc = sqlite3_step(s->del);
    *deleted = sqlite3_changes(s->db);
    if (rc != SQLITE_DONE || sqlite3_step(s->floor) != SQLITE_DONE ||
        sqlite3_exec(s->db, "COMMIT", NULL, NULL, NULL) != SQLITE_OK) {
        de_err err =
            de__fail_db(s->db, "relay: deleting published rows failed");
        /* Nothing to do if the rollback fails: SQLite rolled back. */
        (void)sqlite3_exec(s->db, "ROLLBACK", NULL, NULL, NULL);
        sqlite3_reset(s->del);
        sqlite3_reset(s->floor);
        *deleted = 0;
        return err;
    }
    sqlite3_reset(s->del);
    sqlite3_reset(s->floor);
    *upto = hi;
    return DE_OK;
}

static bool s_changed(de__source *src)
{
    sqlite_source *s = (sqlite_source *)src;
    int64_t dv = s->data_version;

    if (sqlite3_step(s->dv) == SQLITE_ROW)
        dv = sqlite3_column_int64(s->dv, 0);
    sqlite3_reset(s->dv);
    if (dv == s->data_version)
        return false;
    s->data_version = dv;
    return true;
}

static void s_checkpoint_log(de__source *src)
{
    sqlite_source *s = (sqlite_source *)src;

    int log = 0, done = 0;

    /* PASSIVE never waits; what it cannot do now waits for the next. */
    if (sqlite3_wal_checkpoint_v2(s->db, "main", SQLITE_CHECKPOINT_PASSIVE,
                                  &log, &done) != SQLITE_OK ||
        log < LOG_TRUNCATE_PAGES)
        return;
    /* Readers kept every checkpoint from reaching the end, and writers
     * kept appending: copy everything back and truncate the log, waiting
     * briefly for the writers (a failure is tried again next time). */
    sqlite3_busy_timeout(s->db, LOG_TRUNCATE_WAIT_MS);
    (void)sqlite3_wal_checkpoint_v2(s->db, "main", SQLITE_CHECKPOINT_TRUNCATE,
                                    NULL, NULL);
    sqlite3_busy_timeout(s->db, s->busy_ms);
}

/* SQLite has nothing to poll and no wake-up to ask for: the host's WAL
 * hook (in this process) and changed() on the poll interval (others)
 * wake the relay whether it sleeps or not. */
static int s_wait_fd(de__source *src)
{
    (void)src;
    return -1;
}

static bool s_sleep_begin(de__source *src)
{
    (void)src;
    return false;
}

static void s_awake(de__source *src)
{
    (void)src;
}

static void s_close(de__source *src)
{
    sqlite_source *s = (sqlite_source *)src;
    sqlite3_stmt *all[] = {s->read,  s->one,  s->max, s->del,
                           s->floor, s->scan, s->dv,  s->floor_get};

    if (s == NULL)
        return;
    for (size_t i = 0; i < DE__ARRAY_LEN(all); i++)
        sqlite3_finalize(all[i]);
    sqlite3_close(s->db);
    free(s->path);
    free(s);
}

static const de__source_ops sqlite_ops = {
    .read = s_read,
    .read_one = s_read_one,
    .max_position = s_max_position,
    .event_id_at = s_event_id_at,
    .delete_range = s_delete_range,
    .deleted_upto = s_deleted_upto,
    .changed = s_changed,
    .wait_fd = s_wait_fd,
    .sleep_begin = s_sleep_begin,
    .awake = s_awake,
    .stored_setting = s_stored_setting,
    .checkpoint_log = s_checkpoint_log,
    .close = s_close,
};

static de_err prepare_all(sqlite_source *s)
{
    char read_sql[512], one_sql[512];
    struct {
        sqlite3_stmt **st;
        const char *sql;
    } list[] = {
        {&s->read, read_sql},
        {&s->one, one_sql},
        {&s->max, "SELECT coalesce(max(position), 0) FROM main.de_outbox"},
        {&s->del, "DELETE FROM main.de_outbox WHERE position >= ?1 AND "
                  "position <= ?2"},
        {&s->floor, "INSERT INTO main.de_meta(key, value) VALUES "
                    "('relay_deleted_upto', ?1) ON CONFLICT(key) DO UPDATE "
                    "SET value = max(value, excluded.value)"},
        {&s->scan, "SELECT position, recorded_at_ms FROM main.de_outbox "
                   "WHERE position > ?1 AND position <= ?2 "
                   "ORDER BY position LIMIT ?3"},
        {&s->dv, "PRAGMA data_version"},
        {&s->floor_get, "SELECT value FROM main.de_meta WHERE key = "
                        "'relay_deleted_upto'"},
    };

    snprintf(read_sql, sizeof read_sql,
             "SELECT %s FROM main.de_outbox WHERE position > ?1 "
             "ORDER BY position LIMIT ?2",
             read_cols);
    snprintf(one_sql, sizeof one_sql,
             "SELECT %s FROM main.de_outbox WHERE position = ?1", read_cols);
    for (size_t i = 0; i < DE__ARRAY_LEN(list); i++)
        if (sqlite3_prepare_v3(s->db, list[i].sql, -1,
                               SQLITE_PREPARE_PERSISTENT, list[i].st,
                               NULL) != SQLITE_OK)
            return de__fail_db(s->db, "relay: cannot prepare '%s'",
                               list[i].sql);
    return DE_OK;
}

de_err de__source_open_sqlite(const char *path, int64_t busy_ms, bool linked,
                              bool create, de__source **out, char outbox_id[37])
{
    sqlite_source *s = calloc(1, sizeof *s);
    de_err err;

    *out = NULL;
    if (s == NULL || (s->path = strdup(path)) == NULL) {
        free(s);
        return de__fail(DE_ERR_NOMEM, "out of memory opening '%s'", path);
    }
    s->base.ops = &sqlite_ops;
    s->busy_ms = (int)busy_ms;
    if (sqlite3_open_v2(path, &s->db,
                        SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX,
                        NULL) != SQLITE_OK) {
        err = de__fail_db(s->db, "relay: cannot open '%s'", path);
        goto fail;
    }
    sqlite3_busy_timeout(s->db, s->busy_ms);
    if (!create && de__query_int(s->db, "SELECT count(*) FROM sqlite_master "
                                        "WHERE type = 'table' AND name IN "
                                        "('de_outbox', 'de_meta')") != 2) {
        err = de__fail(DE_ERR_STATE, "database '%s' has no outbox", path);
        goto fail;
    }
    if ((err = de__exec(s->db, "PRAGMA journal_mode=WAL")) != DE_OK ||
        (err = de__outbox_schema_ensure(s->db)) != DE_OK ||
        (err = de__outbox_identity(s->db, outbox_id)) != DE_OK ||
        (err = prepare_all(s)) != DE_OK)
        goto fail;
    /* With an in-process outbox linked, this connection runs the host's
     * checkpoints when they are due (de__link): its own auto-checkpoint
     * must not compete. */
    sqlite3_wal_autocheckpoint(s->db, linked ? 0 : 1000);
    *out = &s->base;
    return DE_OK;
fail:
    s_close(&s->base);
    return err;
}

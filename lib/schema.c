/* SPDX-License-Identifier: MIT */
/*
 * schema.c -- the library's tables in the host's database, and their
 * migrations.
 *
 * The schema version lives in de_meta (never in PRAGMA user_version, which
 * belongs to the host).  migrations[i] takes a database from version i to
 * i+1; they run in one IMMEDIATE transaction, so two processes opening the
 * same file at once cannot both migrate, and a failure leaves the previous
 * version intact.  A database whose version is newer than this library's
 * is refused rather than guessed at.
 */
#include "internal.h"

#include <stdio.h>
#include <string.h>

static const char *const migrations[DE__OUTBOX_SCHEMA_VERSION] = {
    /* 0 -> 1: the outbox.  position is the rowid: assigned max+1 under the
     * write lock, so it follows commit order.  No AUTOINCREMENT and no
     * secondary index -- both would tax every de_record (see
     * docs/PERFORMANCE.md); the relay instead never deletes the row with
     * the highest published position, so positions never go back. */
    "CREATE TABLE de_meta ("
    "  key TEXT PRIMARY KEY,"
    "  value"
    ") WITHOUT ROWID;"
    "CREATE TABLE de_outbox ("
    "  position INTEGER PRIMARY KEY,"
    "  event_id TEXT NOT NULL,"
    "  subject_type TEXT NOT NULL,"
    "  subject_id TEXT NOT NULL,"
    "  action TEXT NOT NULL,"
    "  version INTEGER NOT NULL,"
    "  occurred_at_ms INTEGER NOT NULL,"
    "  recorded_at_ms INTEGER NOT NULL,"
    "  payload TEXT NOT NULL,"
    "  traceparent TEXT,"
    "  tracestate TEXT"
    ");",
};

de_err de__exec(sqlite3 *db, const char *sql)
{
    if (sqlite3_exec(db, sql, NULL, NULL, NULL) != SQLITE_OK)
        return de__fail_db(db, "SQL failed");
    return DE_OK;
}

/* Switches db's main database to WAL (outside a transaction). */
static de_err set_wal(sqlite3 *db)
{
    sqlite3_stmt *st = NULL;
    de_err err = DE_OK;
    const char *mode;

    if (sqlite3_prepare_v2(db, "PRAGMA main.journal_mode=WAL", -1, &st, NULL) !=
        SQLITE_OK)
        return de__fail_db(db, "cannot switch the database to WAL");
    if (sqlite3_step(st) != SQLITE_ROW) {
        err = de__fail_db(db, "cannot switch the database to WAL");
        goto done;
    }
    mode = (const char *)sqlite3_column_text(st, 0);
    if (mode == NULL || sqlite3_stricmp(mode, "wal") != 0)
        err = de__fail(DE_ERR_DB,
                       "database '%s' stayed in journal mode '%s'; the "
                       "library needs WAL so that its readers and the "
                       "host's writers do not block each other",
                       sqlite3_db_filename(db, "main"), mode ? mode : "?");
done:
    sqlite3_finalize(st);
    return err;
}

int64_t de__query_int(sqlite3 *db, const char *sql)
{
    sqlite3_stmt *st = NULL;
    int64_t v = 0;

    if (sqlite3_prepare_v2(db, sql, -1, &st, NULL) == SQLITE_OK &&
        sqlite3_step(st) == SQLITE_ROW)
        v = sqlite3_column_int64(st, 0);
    sqlite3_finalize(st);
    return v;
}

/* A connection without a busy timeout fails with SQLITE_BUSY the moment
 * another connection writes; give it one unless the host chose its own.
 * PRAGMA busy_timeout reads 0 both for "none" and for a custom busy
 * handler, which this would replace: see docs/OVERVIEW.md. */
static void ensure_busy_timeout(sqlite3 *db, int64_t ms)
{
    if (ms > 0 && de__query_int(db, "PRAGMA busy_timeout") == 0)
        sqlite3_busy_timeout(db, (int)ms);
}

de_err de__prepare_connection(sqlite3 *db, int64_t busy_ms)
{
    ensure_busy_timeout(db, busy_ms);
    return set_wal(db);
}

/* The stored schema version; 0 when the library's tables do not exist. */
static de_err read_version(sqlite3 *db, int64_t *version)
{
    sqlite3_stmt *st = NULL;
    de_err err = DE_OK;
    int rc;

    *version = 0;
    rc = sqlite3_prepare_v2(db,
                            "SELECT 1 FROM main.sqlite_master "
                            "WHERE type = 'table' AND name = 'de_meta'",
                            -1, &st, NULL);
    if (rc != SQLITE_OK)
        return de__fail_db(db, "cannot read the schema");
    rc = sqlite3_step(st);
    sqlite3_finalize(st);
    st = NULL;
    if (rc == SQLITE_DONE)
        return DE_OK;
    if (rc != SQLITE_ROW)
        return de__fail_db(db, "cannot read the schema");
    rc = sqlite3_prepare_v2(db,
                            "SELECT value FROM main.de_meta "
                            "WHERE key = 'schema_version'",
                            -1, &st, NULL);
    if (rc != SQLITE_OK)
        return de__fail_db(db, "cannot read the outbox schema version");
    rc = sqlite3_step(st);
    if (rc == SQLITE_ROW)
        *version = sqlite3_column_int64(st, 0);
    else if (rc != SQLITE_DONE)
        err = de__fail_db(db, "cannot read the outbox schema version");
    sqlite3_finalize(st);
    return err;
}

static de_err check_not_newer(sqlite3 *db, int64_t version)
{
    if (version > DE__OUTBOX_SCHEMA_VERSION)
        return de__fail(DE_ERR_STATE,
                        "database '%s' has outbox schema version %lld, "
                        "newer than the %d this libdeliveryevents %s "
                        "understands; upgrade the library",
                        sqlite3_db_filename(db, "main"), (long long)version,
                        DE__OUTBOX_SCHEMA_VERSION, de_version());
    return DE_OK;
}

/* Every outbox gets an id of its own when it is created, so that a relay
 * can tell its bookkeeping belongs to this database and not to a copy or a
 * predecessor. */
static de_err ensure_identity(sqlite3 *db)
{
    sqlite3_stmt *st = NULL;
    char id[37];
    int rc;

    de__uuid7(id);
    rc = sqlite3_prepare_v2(db,
                            "INSERT OR IGNORE INTO main.de_meta(key, value) "
                            "VALUES ('outbox_id', ?1)",
                            -1, &st, NULL);
    if (rc == SQLITE_OK) {
        sqlite3_bind_text(st, 1, id, -1, SQLITE_STATIC);
        rc = sqlite3_step(st);
    }
    sqlite3_finalize(st);
    if (rc != SQLITE_DONE)
        return de__fail_db(db, "cannot store the outbox id");
    return DE_OK;
}

de_err de__outbox_identity(sqlite3 *db, char out[37])
{
    sqlite3_stmt *st = NULL;
    de_err err = DE_OK;
    const unsigned char *v;

    if (sqlite3_prepare_v2(db,
                           "SELECT value FROM main.de_meta "
                           "WHERE key = 'outbox_id'",
                           -1, &st, NULL) != SQLITE_OK)
        return de__fail_db(db, "cannot read the outbox id");
    if (sqlite3_step(st) == SQLITE_ROW &&
        (v = sqlite3_column_text(st, 0)) != NULL &&
        strlen((const char *)v) < 37) {
        memcpy(out, v, strlen((const char *)v) + 1);
    } else {
        err = de__fail(DE_ERR_STATE, "database '%s' has no outbox id",
                       sqlite3_db_filename(db, "main"));
    }
    sqlite3_finalize(st);
    return err;
}

de_err de__outbox_schema_ensure(sqlite3 *db)
{
    char sql[128];
    int64_t version;
    de_err err;

    /* The common case, an up-to-date database, needs no write lock. */
    if ((err = de__exec(db, "BEGIN")) != DE_OK)
        return err;
    err = read_version(db, &version);
    sqlite3_exec(db, "COMMIT", NULL, NULL, NULL);
    if (err != DE_OK)
        return err;
    if (version == DE__OUTBOX_SCHEMA_VERSION)
        return DE_OK;
    if ((err = check_not_newer(db, version)) != DE_OK)
        return err;

    if ((err = de__exec(db, "BEGIN IMMEDIATE")) != DE_OK)
        return err;
    /* Read again under the write lock: another process may have migrated
     * in between. */
    if ((err = read_version(db, &version)) != DE_OK)
        goto fail;
    if ((err = check_not_newer(db, version)) != DE_OK)
        goto fail;
    for (; version < DE__OUTBOX_SCHEMA_VERSION; version++) {
        if (sqlite3_exec(db, migrations[version], NULL, NULL, NULL) !=
            SQLITE_OK) {
            err = de__fail_db(db,
                              "migrating the outbox schema from version "
                              "%lld failed",
                              (long long)version);
            goto fail;
        }
    }
    if ((err = ensure_identity(db)) != DE_OK)
        goto fail;
    snprintf(sql, sizeof sql,
             "INSERT OR REPLACE INTO main.de_meta(key, value) "
             "VALUES ('schema_version', %d)",
             DE__OUTBOX_SCHEMA_VERSION);
    if ((err = de__exec(db, sql)) != DE_OK)
        goto fail;
    if ((err = de__exec(db, "COMMIT")) != DE_OK)
        goto fail;
    return DE_OK;
fail:
    sqlite3_exec(db, "ROLLBACK", NULL, NULL, NULL);
    return err;
}

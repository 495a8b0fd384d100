/* SPDX-License-Identifier: MIT */
/*
 * schema.c -- the library's tables in the host's database, and their
 * migrations.
 *
 * One migrations helper (de__schema_migrate) serves every set of tables
 * the library keeps -- the outbox's here, the consumer's inbox, the relay's
 * state file: each set's version lives in a key/value table of its own
 * (never in PRAGMA user_version, which belongs to the host); migrations[i]
 * takes it from version i to i+1; they run in one IMMEDIATE transaction,
 * so two processes opening the same file at once cannot both migrate, and
 * a failure leaves the previous version intact.  A database whose version
 * is newer than this library's is refused rather than guessed at.
 */
#include "internal.h"

#include <assert.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *const migrations[DE__OUTBOX_SCHEMA_VERSION] = {
    /* 0 -> 1: the outbox.  position is the rowid: assigned max+1 under the
     * write lock, so it follows commit order.  No AUTOINCREMENT and no
     * secondary index -- both would tax every de_record (see
     * docs/PERFORMANCE.md); the relay instead never deletes the row with
     * the highest published position, so positions never go back. */
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
    /* 1 -> 2: contracts.  A row names the $id of the contract its payload
     * was checked against (ce_dataschema), so that any relay publishes it
     * without looking contracts up.  Contracts are never changed once
     * stored; id is their definition order, so an outbox's cache loads
     * only the rows above the last id it saw (contract_store.c). */
    "ALTER TABLE de_outbox ADD COLUMN dataschema TEXT;"
    "CREATE TABLE de_contracts ("
    "  id INTEGER PRIMARY KEY,"
    "  subject_type TEXT NOT NULL,"
    "  action TEXT NOT NULL,"
    "  version INTEGER NOT NULL,"
    "  schema TEXT NOT NULL,"
    "  defined_at_ms INTEGER NOT NULL,"
    "  UNIQUE (subject_type, action, version)"
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

de_err de__check_connection(sqlite3 *db, bool no_out, const char *who,
                            const char *why_file)
{
    const char *path;

    if (db == NULL || no_out)
        return de__fail(DE_ERR_ARG,
                        "%s needs a connection and an out pointer (got NULL "
                        "%s)",
                        who, db == NULL ? "db" : "out");
    path = sqlite3_db_filename(db, "main");
    if (path == NULL || path[0] == '\0')
        return de__fail(DE_ERR_ARG,
                        "the connection's main database is in memory or "
                        "temporary; %s",
                        why_file);
    if (sqlite3_db_readonly(db, "main") == 1)
        return de__fail(DE_ERR_ARG,
                        "database '%s' is open read-only; %s needs to write "
                        "to it",
                        path, who);
    if (!sqlite3_get_autocommit(db))
        return de__fail(DE_ERR_STATE,
                        "%s was called inside a transaction on '%s'; call it "
                        "before BEGIN (it switches the journal mode and may "
                        "migrate tables)",
                        who, path);
    return DE_OK;
}

de_err de__prepare_connection(sqlite3 *db, int64_t busy_ms)
{
    ensure_busy_timeout(db, busy_ms);
    return set_wal(db);
}

/* The stored version of a set of tables: an integer, or the digits an
 * older library wrote as text; 0 when the meta table does not exist. */
static de_err read_version(sqlite3 *db, const de__schema *sc, int64_t *version)
{
    sqlite3_stmt *st = NULL;
    char sql[200], q[DE__QUOTE_MAX];
    const unsigned char *t;
    de_err err = DE_OK;
    int rc;

    *version = 0;
    rc = sqlite3_prepare_v2(db,
                            "SELECT 1 FROM main.sqlite_master "
                            "WHERE type = 'table' AND name = ?1",
                            -1, &st, NULL);
    if (rc == SQLITE_OK) {
        sqlite3_bind_text(st, 1, sc->meta_table, -1, SQLITE_STATIC);
        rc = sqlite3_step(st);
    }
    sqlite3_finalize(st);
    st = NULL;
    if (rc == SQLITE_DONE)
        return DE_OK;
    if (rc != SQLITE_ROW)
        return de__fail_db(db, "cannot read the %s schema", sc->what);
    snprintf(sql, sizeof sql,
             "SELECT value FROM main.%s WHERE key = 'schema_version'",
             sc->meta_table);
    if (sqlite3_prepare_v2(db, sql, -1, &st, NULL) != SQLITE_OK)
        return de__fail_db(db, "cannot read the %s schema version", sc->what);
    rc = sqlite3_step(st);
    if (rc == SQLITE_ROW && sqlite3_column_type(st, 0) == SQLITE_INTEGER) {
        *version = sqlite3_column_int64(st, 0);
    } else if (rc == SQLITE_ROW) {
        char *end = NULL;
        t = sqlite3_column_text(st, 0);
        *version = t ? strtoll((const char *)t, &end, 10) : -1;
        if (t == NULL || end == (const char *)t || *end != '\0' || *version < 0)
            err = de__fail(DE_ERR_STATE,
                           "database '%s' has an unreadable %s schema "
                           "version %s in %s",
                           sqlite3_db_filename(db, "main"), sc->what,
                           de__quote(q, sizeof q, (const char *)t, (size_t)-1),
                           sc->meta_table);
    } else if (rc != SQLITE_DONE) {
        err = de__fail_db(db, "cannot read the %s schema version", sc->what);
    }
    sqlite3_finalize(st);
    return err;
}

static de_err check_not_newer(sqlite3 *db, const de__schema *sc,
                              int64_t version)
{
    if (version > sc->version)
        return de__fail(DE_ERR_STATE,
                        "database '%s' has %s schema version %lld, newer "
                        "than the %d this libdeliveryevents %s understands; "
                        "upgrade the library",
                        sqlite3_db_filename(db, "main"), sc->what,
                        (long long)version, sc->version, de_version());
    return DE_OK;
}

de_err de__schema_migrate(sqlite3 *db, const de__schema *sc, int64_t *was)
{
    char sql[200];
    int64_t version;
    de_err err;

    assert(!sqlite3_get_autocommit(db)); /* the caller's IMMEDIATE txn */
    if ((err = read_version(db, sc, &version)) != DE_OK ||
        (err = check_not_newer(db, sc, version)) != DE_OK)
        return err;
    if (was != NULL)
        *was = version;
    if (version == sc->version)
        return DE_OK;
    snprintf(sql, sizeof sql,
             "CREATE TABLE IF NOT EXISTS main.%s(key TEXT PRIMARY KEY, "
             "value) WITHOUT ROWID",
             sc->meta_table);
    if ((err = de__exec(db, sql)) != DE_OK)
        return err;
    for (; version < sc->version; version++)
        if (sqlite3_exec(db, sc->migrations[version], NULL, NULL, NULL) !=
            SQLITE_OK)
            return de__fail_db(db,
                               "migrating the %s schema of '%s' from version "
                               "%lld failed",
                               sc->what, sqlite3_db_filename(db, "main"),
                               (long long)version);
    if (sc->after != NULL && (err = sc->after(db)) != DE_OK)
        return err;
    snprintf(sql, sizeof sql,
             "INSERT OR REPLACE INTO main.%s(key, value) "
             "VALUES ('schema_version', %d)",
             sc->meta_table, sc->version);
    return de__exec(db, sql);
}

de_err de__schema_check(sqlite3 *db, const de__schema *sc, int64_t *version)
{
    de_err err = read_version(db, sc, version);

    return err != DE_OK ? err : check_not_newer(db, sc, *version);
}

de_err de__schema_ensure(sqlite3 *db, const de__schema *sc)
{
    int64_t version;
    de_err err;

    /* The common case, an up-to-date database, needs no write lock. */
    if ((err = de__exec(db, "BEGIN")) != DE_OK)
        return err;
    err = read_version(db, sc, &version);
    /* A read-only transaction: its end cannot fail in a way that
     * matters. */
    (void)sqlite3_exec(db, "COMMIT", NULL, NULL, NULL);
    if (err != DE_OK)
        return err;
    if (version == sc->version)
        return DE_OK;
    if ((err = check_not_newer(db, sc, version)) != DE_OK)
        return err;
    /* Under the write lock, read again: another process may have
     * migrated in between. */
    if ((err = de__exec(db, "BEGIN IMMEDIATE")) != DE_OK)
        return err;
    if ((err = de__schema_migrate(db, sc, NULL)) != DE_OK ||
        (err = de__exec(db, "COMMIT")) != DE_OK) {
        (void)sqlite3_exec(db, "ROLLBACK", NULL, NULL, NULL);
        return err;
    }
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

/* Wire settings live in de_meta as 'setting.<key>'. */
static void setting_name(char *buf, size_t cap, const char *key)
{
    snprintf(buf, cap, "setting.%s", key);
}

de_err de__outbox_stored_setting(sqlite3 *db, const char *key, char **out)
{
    sqlite3_stmt *st = NULL;
    char name[96];
    const unsigned char *v;
    int rc;

    *out = NULL;
    setting_name(name, sizeof name, key);
    if (sqlite3_prepare_v2(db, "SELECT value FROM main.de_meta WHERE key = ?1",
                           -1, &st, NULL) != SQLITE_OK)
        return de__fail_db(db, "cannot read the outbox's settings");
    sqlite3_bind_text(st, 1, name, -1, SQLITE_STATIC);
    rc = sqlite3_step(st);
    if (rc == SQLITE_ROW && (v = sqlite3_column_text(st, 0)) != NULL &&
        (*out = strdup((const char *)v)) == NULL) {
        sqlite3_finalize(st);
        return de__fail(DE_ERR_NOMEM, "out of memory reading the settings");
    }
    sqlite3_finalize(st);
    if (rc != SQLITE_ROW && rc != SQLITE_DONE)
        return de__fail_db(db, "cannot read the outbox's settings");
    return DE_OK;
}

de_err de__outbox_store_settings(sqlite3 *db, const de_conf *conf)
{
    static const de__key wire[] = DE__WIRE_KEYS;
    sqlite3_stmt *st = NULL;
    char name[96], *old[DE__ARRAY_LEN(wire)] = {NULL};
    bool change = false;
    de_err err = DE_OK;

    for (size_t i = 0; i < DE__ARRAY_LEN(wire); i++) {
        if (!de__conf_is_set(conf, wire[i]))
            continue;
        if ((err = de__outbox_stored_setting(db, de__conf_key_name(wire[i]),
                                             &old[i])) != DE_OK)
            goto done;
        change |=
            old[i] == NULL || strcmp(old[i], de__conf_str(conf, wire[i])) != 0;
    }
    if (!change)
        goto done;
    if ((err = de__exec(db, "BEGIN IMMEDIATE")) != DE_OK)
        goto done;
    if (sqlite3_prepare_v2(db,
                           "INSERT INTO main.de_meta(key, value) VALUES (?1, "
                           "?2) ON CONFLICT(key) DO UPDATE SET value = "
                           "excluded.value",
                           -1, &st, NULL) != SQLITE_OK) {
        err = de__fail_db(db, "cannot store the outbox's settings");
        (void)sqlite3_exec(db, "ROLLBACK", NULL, NULL, NULL);
        goto done;
    }
    for (size_t i = 0; i < DE__ARRAY_LEN(wire) && err == DE_OK; i++) {
        const char *key = de__conf_key_name(wire[i]);
        const char *v = de__conf_str(conf, wire[i]);
        if (!de__conf_is_set(conf, wire[i]) ||
            (old[i] != NULL && strcmp(old[i], v) == 0))
            continue;
        setting_name(name, sizeof name, key);
        sqlite3_bind_text(st, 1, name, -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 2, v, -1, SQLITE_STATIC);
        if (sqlite3_step(st) != SQLITE_DONE)
            err = de__fail_db(db, "cannot store the outbox's settings");
        sqlite3_reset(st);
    }
    sqlite3_finalize(st);
    if (err == DE_OK)
        err = de__exec(db, "COMMIT");
    if (err != DE_OK) {
        (void)sqlite3_exec(db, "ROLLBACK", NULL, NULL, NULL);
        goto done;
    }
    for (size_t i = 0; i < DE__ARRAY_LEN(wire); i++)
        if (de__conf_is_set(conf, wire[i]) && old[i] != NULL &&
            strcmp(old[i], de__conf_str(conf, wire[i])) != 0)
            de__log(conf, DE_LOG_NOTICE,
                    "outbox of '%s': %s changed from '%s' to '%s'; every "
                    "relay started from now on publishes with it",
                    sqlite3_db_filename(db, "main"), de__conf_key_name(wire[i]),
                    old[i], de__conf_str(conf, wire[i]));
done:
    for (size_t i = 0; i < DE__ARRAY_LEN(wire); i++)
        free(old[i]);
    return err;
}

static const de__schema outbox_schema = {
    "outbox", "de_meta", migrations, DE__OUTBOX_SCHEMA_VERSION, ensure_identity,
};

de_err de__outbox_schema_ensure(sqlite3 *db)
{
    return de__schema_ensure(db, &outbox_schema);
}

/* SPDX-License-Identifier: MIT */
/*
 * relay_state.c -- the relay's bookkeeping, in a SQLite file of its own
 * next to the database (relay.state.path, default "<database>-relay").
 *
 * It holds the relay's durable cursor (every outbox row at or below it is
 * published or held back), the per-subject sequence counters as of that
 * cursor, the events held back behind blocked subjects, and the lease that
 * lets one relay at a time publish.  None of it needs atomicity with the
 * host's transactions -- only the outbox rows do -- so keeping it in its
 * own file means the relay's frequent small writes never queue behind the
 * host's write lock, nor the host's behind them.
 *
 * Invariants:
 *  - every commit is durable (synchronous=FULL: in WAL mode each commit
 *    syncs the log): the outbox deletions and the numbering that rely on
 *    a checkpoint never run ahead of it on disk;
 *  - cursor, counters and partition marks are written in one transaction,
 *    and that transaction also checks the lease: a relay that lost the
 *    lease cannot move the cursor;
 *  - a subject's counter is at least the number of its last event at or
 *    below the cursor, and at least the highest number of this outbox's
 *    events found on Kafka at activation; a relay that restarts from the
 *    cursor gives every later event the number it had on Kafka, or the
 *    counter plus one (replay is deterministic, numbers never repeat);
 *  - a partition mark is an offset below which every event of this outbox
 *    with a position above the cursor cannot be: the relay reads Kafka
 *    forward from the marks when it becomes active;
 *  - the state names the outbox it belongs to (the outbox's id), and a
 *    state file that is missing or older than the outbox's deletions is
 *    refused rather than guessed at: restarting numbering from scratch
 *    would make consumers drop real events as duplicates.
 *
 * These are the SQLite store's operations of the seam in relay_state.h
 * (sq_*, listed in sq_ops); de__rstate_open and de__rstate_open_reader
 * make the handles.
 */
#include "relay_state.h"

#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define STATE_SCHEMA_VERSION 4

enum {
    S_LEASE_GET,
    S_LEASE_PUT,
    S_LEASE_BEAT,
    S_LEASE_RELEASE,
    S_CURSOR_PUT,
    S_CURSOR_ID_PUT,
    S_SEQ_GET,
    S_SEQ_PUT,
    S_PARK,
    S_UNPARK,
    S_PARKED_SUBJECTS,
    S_PARKED_ROWS,
    S_PARKED_MIN,
    S_FORGET_SCAN,
    S_FORGET,
    S_MARK_PUT,
    S_MARKS,
    S_FOUND_LANDED,
    S_FOUND_SUBJECT,
    S_FOUND_RAISE,
    S_LANDED_GET,
    S_FOUND_COUNT,
    S_HAS_MARKS,
    S_PUBLISHED_PUT,
    S_PUBLISHED_FORGET,
    S_PUBLISHED_GET,
    S_PARKED_AT,
    S_BEGIN,
    S_READ_BEGIN,
    S_COMMIT,
    S_ROLLBACK,
    S_COUNT
};

/* Raises (epoch, seq) of a row to excluded's when that is higher. */
#define NUMBER_HIGHER                                                          \
    "(excluded.epoch > epoch OR (excluded.epoch = epoch AND "                  \
    "excluded.seq > seq))"
#define NUMBER_MAX_SET                                                         \
    "seq = CASE WHEN " NUMBER_HIGHER " THEN excluded.seq ELSE seq END, "       \
    "epoch = CASE WHEN " NUMBER_HIGHER " THEN excluded.epoch ELSE epoch END"

static const char *const sql[S_COUNT] = {
    [S_LEASE_GET] = "SELECT owner, heartbeat_ms, pid, host FROM de_relay_lease "
                    "WHERE id = 1",
    [S_LEASE_PUT] = "INSERT OR REPLACE INTO de_relay_lease(id, owner, pid, "
                    "host, acquired_ms, heartbeat_ms) VALUES (1, ?1, ?2, ?3, "
                    "?4, ?4)",
    [S_LEASE_BEAT] = "UPDATE de_relay_lease SET heartbeat_ms = ?2 "
                     "WHERE id = 1 AND owner = ?1",
    [S_LEASE_RELEASE] = "UPDATE de_relay_lease SET heartbeat_ms = 0 "
                        "WHERE id = 1 AND owner = ?1",
    [S_CURSOR_ID_PUT] = "INSERT OR REPLACE INTO de_relay_meta(key, value) "
                        "VALUES ('cursor_event_id', ?1)",
    [S_CURSOR_PUT] = "INSERT OR REPLACE INTO de_relay_meta(key, value) "
                     "VALUES ('cursor', ?1)",
    [S_SEQ_GET] = "SELECT seq, epoch, last_ms FROM de_relay_seq WHERE "
                  "subject_type = ?1 AND subject_id = ?2",
    [S_SEQ_PUT] = "INSERT INTO de_relay_seq(subject_type, subject_id, seq, "
                  "epoch, last_ms) VALUES (?1, ?2, ?3, ?4, ?5) ON "
                  "CONFLICT(subject_type, subject_id) DO UPDATE SET seq = "
                  "excluded.seq, epoch = excluded.epoch, last_ms = "
                  "excluded.last_ms",
    [S_PARK] = "INSERT OR REPLACE INTO de_relay_parked(position, "
               "subject_type, subject_id, seq, error, since_ms, epoch) "
               "VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    [S_UNPARK] = "DELETE FROM de_relay_parked WHERE position = ?1",
    [S_PARKED_SUBJECTS] = "SELECT subject_type, subject_id, count(*), "
                          "min(since_ms), (SELECT error FROM de_relay_parked "
                          "p2 WHERE p2.subject_type = p.subject_type AND "
                          "p2.subject_id = p.subject_id ORDER BY position "
                          "LIMIT 1) FROM de_relay_parked p "
                          "GROUP BY subject_type, subject_id",
    [S_PARKED_ROWS] = "SELECT position, seq, epoch FROM de_relay_parked "
                      "WHERE subject_type = ?1 AND subject_id = ?2 "
                      "ORDER BY position",
    [S_PARKED_MIN] = "SELECT min(position), count(*) FROM de_relay_parked",
    /* The next keys after (?1, ?2) and when their subjects were last
     * numbered, for forgetting idle subjects a slice at a time. */
    [S_FORGET_SCAN] = "SELECT subject_type, subject_id, last_ms FROM "
                      "de_relay_seq WHERE (subject_type, subject_id) > "
                      "(?1, ?2) ORDER BY subject_type, subject_id LIMIT ?3",
    /* A subject with held-back events keeps its counter: they are resent
     * with their numbers, and its later events follow them. */
    [S_FORGET] = "DELETE FROM de_relay_seq WHERE (subject_type, subject_id) "
                 "> (?1, ?2) AND (subject_type, subject_id) <= (?3, ?4) AND "
                 "last_ms < ?5 AND NOT EXISTS (SELECT 1 FROM de_relay_parked "
                 "p WHERE p.subject_type = de_relay_seq.subject_type AND "
                 "p.subject_id = de_relay_seq.subject_id)",
    [S_MARK_PUT] = "INSERT INTO de_relay_mark(topic, partition, next_offset) "
                   "VALUES (?1, ?2, ?3) ON CONFLICT(topic, partition) DO "
                   "UPDATE SET next_offset = max(next_offset, "
                   "excluded.next_offset)",
    [S_MARKS] = "SELECT topic, partition, next_offset FROM de_relay_mark "
                "ORDER BY topic, partition",
    [S_FOUND_LANDED] = "INSERT OR IGNORE INTO temp.de_landed(event_id, seq, "
                       "topic, partition, offset, epoch) VALUES (?1, ?2, ?3, "
                       "?4, ?5, ?6)",
    /* Numbers compare by epoch, then by number: (epoch, seq) only rises.
     * SET expressions all see the row as it was. */
    [S_FOUND_SUBJECT] =
        "INSERT INTO temp.de_found(subject_type, subject_id, seq, epoch) "
        "VALUES (?1, ?2, ?3, ?4) ON CONFLICT(subject_type, subject_id) DO "
        "UPDATE SET " NUMBER_MAX_SET,
    /* "WHERE true" keeps ON CONFLICT from parsing as a join constraint.
     * A subject found on Kafka counts as numbered now, new to the state
     * or raised: its pending rows continue the numbering Kafka holds
     * rather than start one below it. */
    [S_FOUND_RAISE] =
        "INSERT INTO main.de_relay_seq(subject_type, subject_id, seq, epoch, "
        "last_ms) SELECT subject_type, subject_id, seq, epoch, ?1 FROM "
        "temp.de_found WHERE true ON CONFLICT(subject_type, subject_id) DO "
        "UPDATE SET " NUMBER_MAX_SET
        ", last_ms = max(last_ms, excluded.last_ms)",
    [S_LANDED_GET] = "SELECT seq, topic, partition, offset, epoch FROM "
                     "temp.de_landed WHERE event_id = ?1",
    [S_FOUND_COUNT] = "SELECT (SELECT count(*) FROM temp.de_landed), "
                      "(SELECT count(*) FROM temp.de_found)",
    [S_HAS_MARKS] = "SELECT 1 FROM de_relay_mark WHERE topic = ?1 LIMIT 1",
    [S_PUBLISHED_PUT] = "INSERT OR REPLACE INTO de_relay_published(position, "
                        "epoch, seq, topic, partition, offset) VALUES (?1, "
                        "?2, ?3, ?4, ?5, ?6)",
    [S_PUBLISHED_FORGET] = "DELETE FROM de_relay_published WHERE position <= "
                           "?1",
    [S_PUBLISHED_GET] = "SELECT epoch, seq FROM de_relay_published WHERE "
                        "position = ?1",
    [S_PARKED_AT] = "SELECT 1 FROM de_relay_parked WHERE position = ?1",
    [S_BEGIN] = "BEGIN IMMEDIATE",
    [S_READ_BEGIN] = "BEGIN",
    [S_COMMIT] = "COMMIT",
    [S_ROLLBACK] = "ROLLBACK",
};

typedef struct sq_state {
    de__rstate base; /* first: ops */
    sqlite3 *db;
    char *path;
    sqlite3_stmt *st[S_COUNT];
    bool reading;      /* inside de__rstate_read_begin's transaction */
    bool reader;       /* opened by de__rstate_open_reader: never writes */
    bool no_published; /* a state older than de_relay_published */
    /* where forgetting stopped: the last key it looked at */
    char forget_type[DE__IDENT_MAX + 1];
    char forget_id[DE__SUBJECT_ID_MAX + 1];
} sq_state;

static const char *const migrations[STATE_SCHEMA_VERSION] = {
    /* 0 -> 1: cursor and counters, the lease, held-back events. */
    "CREATE TABLE IF NOT EXISTS de_relay_seq("
    "  subject_type TEXT NOT NULL, subject_id TEXT NOT NULL,"
    "  seq INTEGER NOT NULL,"
    "  PRIMARY KEY(subject_type, subject_id)) WITHOUT ROWID;"
    "CREATE TABLE IF NOT EXISTS de_relay_lease("
    "  id INTEGER PRIMARY KEY CHECK (id = 1), owner TEXT NOT NULL,"
    "  pid INTEGER, host TEXT, acquired_ms INTEGER,"
    "  heartbeat_ms INTEGER NOT NULL);"
    "CREATE TABLE IF NOT EXISTS de_relay_parked("
    "  position INTEGER PRIMARY KEY, subject_type TEXT NOT NULL,"
    "  subject_id TEXT NOT NULL, seq INTEGER NOT NULL, error TEXT,"
    "  since_ms INTEGER NOT NULL);"
    "CREATE INDEX IF NOT EXISTS de_relay_parked_subject"
    "  ON de_relay_parked(subject_type, subject_id, position);",
    /* 1 -> 2: where each partition stood at the last checkpoint. */
    "CREATE TABLE IF NOT EXISTS de_relay_mark("
    "  topic TEXT NOT NULL, partition INTEGER NOT NULL,"
    "  next_offset INTEGER NOT NULL,"
    "  PRIMARY KEY(topic, partition)) WITHOUT ROWID;",
    /* 2 -> 3: numbering epochs, and when each subject was last numbered
     * (counters of subjects idle longer than relay.subject.forget.ms are
     * forgotten).  Subjects numbered before count as numbered now. */
    "ALTER TABLE de_relay_seq ADD COLUMN epoch INTEGER NOT NULL DEFAULT 0;"
    "ALTER TABLE de_relay_seq ADD COLUMN last_ms INTEGER NOT NULL DEFAULT 0;"
    "UPDATE de_relay_seq SET last_ms = "
    "  CAST(strftime('%s', 'now') AS INTEGER) * 1000;"
    "ALTER TABLE de_relay_parked ADD COLUMN epoch INTEGER NOT NULL DEFAULT 0;",
    /* 3 -> 4: the numbers each published event went out with, and where
     * Kafka stored it, while the outbox retains its row
     * (outbox.retention.ms), so that a replay republishes it with them.
     * Events published before have none. */
    "CREATE TABLE IF NOT EXISTS de_relay_published("
    "  position INTEGER PRIMARY KEY, epoch INTEGER NOT NULL,"
    "  seq INTEGER NOT NULL, topic TEXT, partition INTEGER,"
    "  offset INTEGER);",
};

static const de__schema state_schema = {
    "relay state", "de_relay_meta", migrations, STATE_SCHEMA_VERSION, NULL,
};

/* What the relay found on Kafka when it became active (relay_recover.c):
 * per connection, never on disk beyond SQLite's temporary files, so that
 * a scan of millions of records keeps the relay's memory flat. */
static const char temp_sql[] =
    "CREATE TEMP TABLE IF NOT EXISTS de_landed("
    "  event_id TEXT PRIMARY KEY, seq INTEGER NOT NULL, topic TEXT NOT NULL,"
    "  partition INTEGER NOT NULL, offset INTEGER NOT NULL,"
    "  epoch INTEGER NOT NULL) WITHOUT ROWID;"
    "CREATE TEMP TABLE IF NOT EXISTS de_found("
    "  subject_type TEXT NOT NULL, subject_id TEXT NOT NULL,"
    "  seq INTEGER NOT NULL, epoch INTEGER NOT NULL,"
    "  PRIMARY KEY(subject_type, subject_id)) WITHOUT ROWID;";

static de_err fail_st(sq_state *st, const char *what)
{
    return de__fail_db(st->db, "relay state '%s': %s", st->path, what);
}

/* Reads meta key `key` as text into buf (empty if absent). */
static de_err meta_get(sq_state *st, const char *key, char *buf, size_t size,
                       bool *found)
{
    sqlite3_stmt *q = NULL;
    const unsigned char *v;
    de_err err = DE_OK;

    *found = false;
    buf[0] = '\0';
    if (sqlite3_prepare_v2(st->db,
                           "SELECT value FROM de_relay_meta WHERE key = ?1", -1,
                           &q, NULL) != SQLITE_OK)
        return fail_st(st, "cannot read its metadata");
    sqlite3_bind_text(q, 1, key, -1, SQLITE_STATIC);
    switch (sqlite3_step(q)) {
    case SQLITE_ROW:
        *found = true;
        if ((v = sqlite3_column_text(q, 0)) != NULL)
            snprintf(buf, size, "%s", (const char *)v);
        break;
    case SQLITE_DONE: break;
    default: err = fail_st(st, "cannot read its metadata");
    }
    sqlite3_finalize(q);
    return err;
}

static de_err meta_put(sq_state *st, const char *key, const char *value)
{
    sqlite3_stmt *q = NULL;
    int rc;

    if (sqlite3_prepare_v2(st->db,
                           "INSERT OR REPLACE INTO de_relay_meta(key, value) "
                           "VALUES (?1, ?2)",
                           -1, &q, NULL) != SQLITE_OK)
        return fail_st(st, "cannot write its metadata");
    sqlite3_bind_text(q, 1, key, -1, SQLITE_STATIC);
    sqlite3_bind_text(q, 2, value, -1, SQLITE_STATIC);
    rc = sqlite3_step(q);
    sqlite3_finalize(q);
    return rc == SQLITE_DONE ? DE_OK : fail_st(st, "cannot write its metadata");
}

/*
 * Checks that this state belongs to the outbox (and records that it does
 * when it is new), inside one IMMEDIATE transaction so that two relays
 * starting at once agree.
 */
static de_err adopt(sq_state *st, const char *outbox_id,
                    int64_t host_deleted_upto, int64_t *cursor)
{
    char buf[64];
    bool found, has_cursor;
    de_err err;

    if ((err = de__exec(st->db, "BEGIN IMMEDIATE")) != DE_OK)
        return err;
    if ((err = de__schema_migrate(st->db, &state_schema, NULL)) != DE_OK)
        goto fail;
    if ((err = meta_get(st, "outbox_id", buf, sizeof buf, &found)) != DE_OK)
        goto fail;
    if (found && strcmp(buf, outbox_id) != 0) {
        err = de__fail(DE_ERR_STATE,
                       "relay state '%s' belongs to the outbox %s, not to "
                       "this database's outbox %s; point relay.state.path "
                       "at this database's own state",
                       st->path, buf, outbox_id);
        goto fail;
    }
    if ((err = meta_get(st, "cursor", buf, sizeof buf, &has_cursor)) != DE_OK)
        goto fail;
    *cursor = has_cursor ? strtoll(buf, NULL, 10) : 0;
    if (host_deleted_upto > *cursor) {
        err = de__fail(
            DE_ERR_STATE,
            "relay state '%s' %s, but this outbox was already relayed and "
            "cleaned up to position %lld; numbering again would make "
            "consumers drop events as duplicates.  Restore the state file "
            "that belongs with this database (see docs/OPERATIONS.md)",
            st->path,
            has_cursor ? "is older than the outbox (its cursor is behind)"
                       : "is new or was lost",
            (long long)host_deleted_upto);
        goto fail;
    }
    if (!found && (err = meta_put(st, "outbox_id", outbox_id)) != DE_OK)
        goto fail;
    if ((err = de__exec(st->db, "COMMIT")) != DE_OK)
        goto fail;
    return DE_OK;
fail:
    sqlite3_exec(st->db, "ROLLBACK", NULL, NULL, NULL);
    return err;
}

/* The state holds every subject id, the host's name and error texts: it
 * is created with the database's permissions (not SQLite's 0644), and
 * never through a symbolic link, which could send its tables into
 * another database or create a file elsewhere.  (SQLite gives the -wal
 * and -shm files the main file's mode; SQLITE_OPEN_NOFOLLOW then refuses
 * a link planted after this check.) */
static de_err create_file(const char *path, unsigned mode)
{
    int fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC,
                  (mode_t)mode);
    struct stat sb;

    if (fd >= 0) {
        /* Exactly the database's mode, whatever the umask. */
        if (fchmod(fd, (mode_t)mode) != 0) {
            int e = errno;
            close(fd);
            unlink(path);
            return de__fail(DE_ERR_STATE,
                            "relay state '%s': cannot set its permissions: %s",
                            path, strerror(e));
        }
        close(fd);
        return DE_OK;
    }
    if (errno == EEXIST && lstat(path, &sb) == 0 && !S_ISLNK(sb.st_mode))
        return DE_OK;
    if (errno == EEXIST || errno == ELOOP)
        return de__fail(DE_ERR_STATE,
                        "relay state '%s' is a symbolic link: refused (the "
                        "state is written only to a regular file; set "
                        "relay.state.path to the file itself)",
                        path);
    return de__fail(DE_ERR_STATE, "relay state '%s': cannot create it: %s",
                    path, strerror(errno));
}

static const de__rstate_ops sq_ops;
static void sq_free(sq_state *st);
static void sq_rollback(de__rstate *base);

/* A state handle on the file at path, opened with flags (read-write:
 * a WAL file is read through its -shm); *out is set also on failure, for
 * sq_free. */
static de_err state_new(const char *path, int flags, sq_state **out)
{
    sq_state *st = calloc(1, sizeof *st);

    *out = st;
    if (st != NULL)
        st->base.ops = &sq_ops;
    if (st == NULL || (st->path = strdup(path)) == NULL)
        return de__fail(DE_ERR_NOMEM, "out of memory opening relay state");
    if (sqlite3_open_v2(path, &st->db,
                        SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX | flags,
                        NULL) != SQLITE_OK)
        return fail_st(st, "cannot open");
    sqlite3_busy_timeout(st->db, 2000);
    return DE_OK;
}

/* Prepares the statements which[0..n-1]. */
static de_err prepare(sq_state *st, const int *which, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (sqlite3_prepare_v3(st->db, sql[which[i]], -1,
                               SQLITE_PREPARE_PERSISTENT, &st->st[which[i]],
                               NULL) != SQLITE_OK)
            return fail_st(st, "cannot prepare its statements");
    return DE_OK;
}

de_err de__rstate_open(const char *path, unsigned mode, const char *outbox_id,
                       int64_t host_deleted_upto, de__rstate **out,
                       int64_t *cursor)
{
    int all[S_COUNT];
    sq_state *st;
    de_err err;

    *out = NULL;
    if ((err = create_file(path, mode)) != DE_OK)
        return err;
    if ((err = state_new(path, SQLITE_OPEN_NOFOLLOW, &st)) != DE_OK)
        goto fail;
    /* FULL, set here outside any transaction (SQLite refuses to change it
     * inside one): in WAL mode every commit then syncs the log, so a
     * checkpoint is on disk before the deletions and numbering that rely
     * on it.  Checkpoints are rare (relay.checkpoint.interval.ms), so one
     * fsync each is cheap. */
    if ((err = de__exec(st->db, "PRAGMA journal_mode=WAL")) != DE_OK ||
        (err = de__exec(st->db, "PRAGMA synchronous=FULL")) != DE_OK ||
        (err = de__exec(st->db, "PRAGMA cache_size=-8192")) != DE_OK)
        goto fail;
    for (int i = 0; i < S_COUNT; i++)
        all[i] = i;
    if ((err = adopt(st, outbox_id, host_deleted_upto, cursor)) != DE_OK ||
        (err = de__exec(st->db, temp_sql)) != DE_OK ||
        (err = prepare(st, all, S_COUNT)) != DE_OK)
        goto fail;
    *out = &st->base;
    return DE_OK;
fail:
    sq_free(st);
    return err;
}

/* The statements a reader prepares (S_PUBLISHED_GET only where the table
 * exists): the others may name tables an older state lacks. */
static const int reader_statements[] = {S_PARKED_AT, S_READ_BEGIN, S_COMMIT,
                                        S_ROLLBACK, S_PUBLISHED_GET};

de_err de__rstate_open_reader(const char *path, const char *outbox_id,
                              de__rstate **out)
{
    sq_state *st;
    char buf[64];
    int64_t version = 0;
    bool found = false;
    de_err err;

    *out = NULL;
    if (access(path, F_OK) != 0)
        return de__fail(DE_ERR_STATE,
                        "relay state '%s' does not exist: no relay of this "
                        "outbox has published anything yet (or "
                        "relay.state.path names another file)",
                        path);
    if ((err = state_new(path, SQLITE_OPEN_NOFOLLOW, &st)) != DE_OK)
        goto fail;
    st->reader = true;
    if ((err = de__exec(st->db, "BEGIN")) != DE_OK)
        goto fail;
    err = de__schema_check(st->db, &state_schema, &version);
    if (err == DE_OK && version > 0)
        err = meta_get(st, "outbox_id", buf, sizeof buf, &found);
    (void)sqlite3_exec(st->db, "COMMIT", NULL, NULL, NULL); /* a read */
    if (err != DE_OK)
        goto fail;
    if (version == 0) {
        err = de__fail(DE_ERR_STATE, "'%s' is not a relay state file", path);
        goto fail;
    }
    if (found && strcmp(buf, outbox_id) != 0) {
        err = de__fail(DE_ERR_STATE,
                       "relay state '%s' belongs to the outbox %s, not to "
                       "this database's outbox %s",
                       path, buf, outbox_id);
        goto fail;
    }
    /* Written by a relay from before the numbers were recorded: none. */
    st->no_published = version < 4;
    if ((err = prepare(st, reader_statements,
                       DE__ARRAY_LEN(reader_statements) -
                           (st->no_published ? 1 : 0))) != DE_OK)
        goto fail;
    *out = &st->base;
    return DE_OK;
fail:
    sq_free(st);
    return err;
}

static void sq_free(sq_state *st)
{
    if (st == NULL)
        return;
    for (int i = 0; i < S_COUNT; i++)
        sqlite3_finalize(st->st[i]);
    sqlite3_close(st->db);
    free(st->path);
    free(st);
}

static void sq_close(de__rstate *base)
{
    sq_free((sq_state *)base);
}

/* Steps a write statement to completion and resets it. */
static de_err run(sq_state *st, int which, const char *what)
{
    sqlite3_stmt *q = st->st[which];
    int rc = sqlite3_step(q);

    sqlite3_reset(q);
    sqlite3_clear_bindings(q);
    if (rc != SQLITE_DONE)
        return fail_st(st, what);
    return DE_OK;
}

static de_err sq_lease_acquire(de__rstate *base, const char *owner,
                               int64_t now_ms, int64_t timeout_ms, bool *held,
                               char *holder, size_t holder_size)
{
    sq_state *st = (sq_state *)base;
    sqlite3_stmt *q = st->st[S_LEASE_GET];
    char host[256] = "";
    bool take = true;
    de_err err;
    int rc;

    *held = false;
    assert(!st->reader);
    if (holder_size)
        holder[0] = '\0';
    if ((err = run(st, S_BEGIN, "cannot lock to take the lease")) != DE_OK)
        return err;
    rc = sqlite3_step(q);
    if (rc == SQLITE_ROW) {
        const char *o = (const char *)sqlite3_column_text(q, 0);
        int64_t beat = sqlite3_column_int64(q, 1);
        if (o != NULL && strcmp(o, owner) != 0 && now_ms - beat <= timeout_ms) {
            take = false;
            if (holder_size)
                snprintf(holder, holder_size, "pid %lld on %s",
                         (long long)sqlite3_column_int64(q, 2),
                         sqlite3_column_text(q, 3)
                             ? (const char *)sqlite3_column_text(q, 3)
                             : "?");
        }
    } else if (rc != SQLITE_DONE) {
        err = fail_st(st, "cannot read the lease");
    }
    sqlite3_reset(q);
    if (err == DE_OK && take) {
        q = st->st[S_LEASE_PUT];
        gethostname(host, sizeof host - 1);
        sqlite3_bind_text(q, 1, owner, -1, SQLITE_STATIC);
        sqlite3_bind_int64(q, 2, (int64_t)getpid());
        sqlite3_bind_text(q, 3, host, -1, SQLITE_STATIC);
        sqlite3_bind_int64(q, 4, now_ms);
        err = run(st, S_LEASE_PUT, "cannot take the lease");
    }
    if (err == DE_OK)
        err = run(st, S_COMMIT, "cannot commit the lease");
    if (err != DE_OK) {
        run(st, S_ROLLBACK, "rollback");
        return err;
    }
    *held = take;
    return DE_OK;
}

static de_err sq_lease_release(de__rstate *base, const char *owner)
{
    sq_state *st = (sq_state *)base;

    sqlite3_bind_text(st->st[S_LEASE_RELEASE], 1, owner, -1, SQLITE_STATIC);
    return run(st, S_LEASE_RELEASE, "cannot release the lease");
}

static de_err sq_read_begin(de__rstate *base)
{
    sq_state *st = (sq_state *)base;
    de_err err;

    if (st->reading || !sqlite3_get_autocommit(st->db))
        return DE_OK;
    if ((err = run(st, S_READ_BEGIN, "cannot begin reading")) == DE_OK)
        st->reading = true;
    return err;
}

static void sq_read_end(de__rstate *base)
{
    sq_state *st = (sq_state *)base;

    if (!st->reading)
        return;
    st->reading = false;
    /* A read transaction: nothing to lose if its end fails. */
    if (run(st, S_COMMIT, "end of a read") != DE_OK)
        sq_rollback(&st->base);
}

static de_err sq_begin(de__rstate *base, const char *owner, int64_t now_ms,
                       bool *held)
{
    sq_state *st = (sq_state *)base;
    de_err err;

    *held = false;
    assert(!st->reader);
    sq_read_end(&st->base); /* a write needs the latest snapshot */
    if ((err = run(st, S_BEGIN, "cannot begin a checkpoint")) != DE_OK)
        return err;
    sqlite3_bind_text(st->st[S_LEASE_BEAT], 1, owner, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st->st[S_LEASE_BEAT], 2, now_ms);
    if ((err = run(st, S_LEASE_BEAT, "cannot renew the lease")) != DE_OK) {
        run(st, S_ROLLBACK, "rollback");
        return err;
    }
    if (sqlite3_changes(st->db) != 1) {
        run(st, S_ROLLBACK, "rollback");
        return DE_OK; /* the lease is someone else's now */
    }
    *held = true;
    return DE_OK;
}

static de_err sq_commit(de__rstate *base)
{
    sq_state *st = (sq_state *)base;
    de_err err;

    assert(!sqlite3_get_autocommit(st->db));
    err = run(st, S_COMMIT, "cannot commit a checkpoint");
    if (err != DE_OK)
        sq_rollback(&st->base);
    return err;
}

static void sq_rollback(de__rstate *base)
{
    sq_state *st = (sq_state *)base;

    /* A failed ROLLBACK leaves nothing to do: SQLite has then rolled back
     * already. */
    if (!sqlite3_get_autocommit(st->db))
        (void)run(st, S_ROLLBACK, "rollback");
}

static de_err sq_put_cursor(de__rstate *base, int64_t position,
                            const char *event_id)
{
    sq_state *st = (sq_state *)base;
    de_err err;

    assert(!sqlite3_get_autocommit(st->db)); /* inside begin ... commit */
    sqlite3_bind_int64(st->st[S_CURSOR_PUT], 1, position);
    if ((err = run(st, S_CURSOR_PUT, "cannot write the cursor")) != DE_OK)
        return err;
    if (event_id != NULL)
        sqlite3_bind_text(st->st[S_CURSOR_ID_PUT], 1, event_id, -1,
                          SQLITE_STATIC);
    return run(st, S_CURSOR_ID_PUT, "cannot write the cursor");
}

static de_err sq_put_seq(de__rstate *base, const char *type, const char *id,
                         const de__counter *c)
{
    sq_state *st = (sq_state *)base;
    sqlite3_stmt *q = st->st[S_SEQ_PUT];

    assert(!sqlite3_get_autocommit(st->db));
    assert(c->seq > 0 && c->epoch >= 0);
    sqlite3_bind_text(q, 1, type, -1, SQLITE_STATIC);
    sqlite3_bind_text(q, 2, id, -1, SQLITE_STATIC);
    sqlite3_bind_int64(q, 3, c->seq);
    sqlite3_bind_int64(q, 4, c->epoch);
    sqlite3_bind_int64(q, 5, c->last_ms);
    return run(st, S_SEQ_PUT, "cannot write a sequence counter");
}

static de_err sq_get_seq(de__rstate *base, const char *type, const char *id,
                         de__counter *c)
{
    sq_state *st = (sq_state *)base;
    sqlite3_stmt *q = st->st[S_SEQ_GET];
    de_err err = DE_OK;

    memset(c, 0, sizeof *c);
    sqlite3_bind_text(q, 1, type, -1, SQLITE_STATIC);
    sqlite3_bind_text(q, 2, id, -1, SQLITE_STATIC);
    switch (sqlite3_step(q)) {
    case SQLITE_ROW:
        c->seq = sqlite3_column_int64(q, 0);
        c->epoch = sqlite3_column_int64(q, 1);
        c->last_ms = sqlite3_column_int64(q, 2);
        break;
    case SQLITE_DONE: break;
    default: err = fail_st(st, "cannot read a sequence counter");
    }
    sqlite3_reset(q);
    sqlite3_clear_bindings(q);
    return err;
}

static de_err sq_park(de__rstate *base, int64_t position, const char *type,
                      const char *id, int64_t epoch, int64_t seq,
                      const char *error, int64_t since_ms)
{
    sq_state *st = (sq_state *)base;
    sqlite3_stmt *q = st->st[S_PARK];

    assert(!sqlite3_get_autocommit(st->db));
    sqlite3_bind_int64(q, 1, position);
    sqlite3_bind_text(q, 2, type, -1, SQLITE_STATIC);
    sqlite3_bind_text(q, 3, id, -1, SQLITE_STATIC);
    sqlite3_bind_int64(q, 4, seq);
    sqlite3_bind_text(q, 5, error, -1, SQLITE_STATIC);
    sqlite3_bind_int64(q, 6, since_ms);
    sqlite3_bind_int64(q, 7, epoch);
    return run(st, S_PARK, "cannot hold an event back");
}

static de_err sq_unpark(de__rstate *base, int64_t position)
{
    sq_state *st = (sq_state *)base;

    assert(!sqlite3_get_autocommit(st->db));
    sqlite3_bind_int64(st->st[S_UNPARK], 1, position);
    return run(st, S_UNPARK, "cannot release a held-back event");
}

static de_err sq_parked_subjects(de__rstate *base, de__rstate_subject_fn fn,
                                 void *ctx)
{
    sq_state *st = (sq_state *)base;
    sqlite3_stmt *q = st->st[S_PARKED_SUBJECTS];
    de_err err = DE_OK;
    int rc;

    while ((rc = sqlite3_step(q)) == SQLITE_ROW && err == DE_OK) {
        const char *e = (const char *)sqlite3_column_text(q, 4);
        err = fn(ctx, (const char *)sqlite3_column_text(q, 0),
                 (const char *)sqlite3_column_text(q, 1),
                 sqlite3_column_int64(q, 2), sqlite3_column_int64(q, 3),
                 e ? e : "");
    }
    if (err == DE_OK && rc != SQLITE_DONE && rc != SQLITE_ROW)
        err = fail_st(st, "cannot read the held-back events");
    sqlite3_reset(q);
    return err;
}

static de_err sq_parked_rows(de__rstate *base, const char *type, const char *id,
                             de__rstate_row_fn fn, void *ctx)
{
    sq_state *st = (sq_state *)base;
    sqlite3_stmt *q = st->st[S_PARKED_ROWS];
    de_err err = DE_OK;
    int rc;

    sqlite3_bind_text(q, 1, type, -1, SQLITE_TRANSIENT);
    sqlite3_bind_text(q, 2, id, -1, SQLITE_TRANSIENT);
    while ((rc = sqlite3_step(q)) == SQLITE_ROW && err == DE_OK)
        err = fn(ctx, sqlite3_column_int64(q, 0), sqlite3_column_int64(q, 2),
                 sqlite3_column_int64(q, 1));
    if (err == DE_OK && rc != SQLITE_DONE && rc != SQLITE_ROW)
        err = fail_st(st, "cannot read a subject's held-back events");
    sqlite3_reset(q);
    sqlite3_clear_bindings(q);
    return err;
}

static de_err sq_parked_min(de__rstate *base, int64_t *min_position,
                            int64_t *count)
{
    sq_state *st = (sq_state *)base;
    sqlite3_stmt *q = st->st[S_PARKED_MIN];
    de_err err = DE_OK;

    *min_position = 0;
    *count = 0;
    if (sqlite3_step(q) == SQLITE_ROW) {
        *min_position = sqlite3_column_int64(q, 0);
        *count = sqlite3_column_int64(q, 1);
    } else {
        err = fail_st(st, "cannot count the held-back events");
    }
    sqlite3_reset(q);
    return err;
}

static de_err sq_cursor(de__rstate *base, int64_t *cursor, char *event_id,
                        size_t event_id_size)
{
    sq_state *st = (sq_state *)base;
    char buf[32];
    bool found;
    de_err err = meta_get(st, "cursor", buf, sizeof buf, &found);

    *cursor = found ? strtoll(buf, NULL, 10) : 0;
    if (err == DE_OK && event_id_size > 0)
        err = meta_get(st, "cursor_event_id", event_id, event_id_size, &found);
    return err;
}

static de_err sq_forget(de__rstate *base, int64_t before_ms, int limit,
                        int64_t *scanned, int64_t *forgotten)
{
    sq_state *st = (sq_state *)base;
    sqlite3_stmt *scan = st->st[S_FORGET_SCAN], *del = st->st[S_FORGET];
    char last_type[DE__IDENT_MAX + 1], last_id[DE__SUBJECT_ID_MAX + 1];
    int64_t stale = 0;
    de_err err = DE_OK;
    int rc;

    assert(!sqlite3_get_autocommit(st->db));
    *scanned = *forgotten = 0;
    /* The slice: the next `limit` keys after where the last call stopped. */
    sqlite3_bind_text(scan, 1, st->forget_type, -1, SQLITE_STATIC);
    sqlite3_bind_text(scan, 2, st->forget_id, -1, SQLITE_STATIC);
    sqlite3_bind_int(scan, 3, limit);
    last_type[0] = last_id[0] = '\0';
    while ((rc = sqlite3_step(scan)) == SQLITE_ROW) {
        const unsigned char *t = sqlite3_column_text(scan, 0);
        const unsigned char *i = sqlite3_column_text(scan, 1);
        snprintf(last_type, sizeof last_type, "%s", t ? (const char *)t : "");
        snprintf(last_id, sizeof last_id, "%s", i ? (const char *)i : "");
        (*scanned)++;
        stale += sqlite3_column_int64(scan, 2) < before_ms;
    }
    sqlite3_reset(scan);
    sqlite3_clear_bindings(scan);
    if (rc != SQLITE_DONE)
        return fail_st(st, "cannot read the sequence counters");
    if (stale > 0) {
        sqlite3_bind_text(del, 1, st->forget_type, -1, SQLITE_STATIC);
        sqlite3_bind_text(del, 2, st->forget_id, -1, SQLITE_STATIC);
        sqlite3_bind_text(del, 3, last_type, -1, SQLITE_STATIC);
        sqlite3_bind_text(del, 4, last_id, -1, SQLITE_STATIC);
        sqlite3_bind_int64(del, 5, before_ms);
        if ((err = run(st, S_FORGET, "cannot forget idle counters")) != DE_OK)
            return err;
        *forgotten = sqlite3_changes(st->db);
    }
    /* At the end of the table: start over next time. */
    snprintf(st->forget_type, sizeof st->forget_type, "%s",
             *scanned < limit ? "" : last_type);
    snprintf(st->forget_id, sizeof st->forget_id, "%s",
             *scanned < limit ? "" : last_id);
    return DE_OK;
}

static de_err sq_put_mark(de__rstate *base, const char *topic,
                          int32_t partition, int64_t next_offset)
{
    sq_state *st = (sq_state *)base;
    sqlite3_stmt *q = st->st[S_MARK_PUT];

    assert(!sqlite3_get_autocommit(st->db));
    assert(next_offset >= 0);
    sqlite3_bind_text(q, 1, topic, -1, SQLITE_STATIC);
    sqlite3_bind_int(q, 2, partition);
    sqlite3_bind_int64(q, 3, next_offset);
    return run(st, S_MARK_PUT, "cannot write a partition mark");
}

static de_err sq_has_marks(de__rstate *base, const char *topic, bool *has)
{
    sq_state *st = (sq_state *)base;
    sqlite3_stmt *q = st->st[S_HAS_MARKS];
    int rc;

    sqlite3_bind_text(q, 1, topic, -1, SQLITE_STATIC);
    rc = sqlite3_step(q);
    *has = rc == SQLITE_ROW;
    sqlite3_reset(q);
    sqlite3_clear_bindings(q);
    if (rc != SQLITE_ROW && rc != SQLITE_DONE)
        return fail_st(st, "cannot read the partition marks");
    return DE_OK;
}

static de_err sq_marks(de__rstate *base, de__rstate_mark_fn fn, void *ctx)
{
    sq_state *st = (sq_state *)base;
    sqlite3_stmt *q = st->st[S_MARKS];
    de_err err = DE_OK;
    int rc;

    while ((rc = sqlite3_step(q)) == SQLITE_ROW && err == DE_OK)
        err = fn(ctx, (const char *)sqlite3_column_text(q, 0),
                 sqlite3_column_int(q, 1), sqlite3_column_int64(q, 2));
    if (err == DE_OK && rc != SQLITE_DONE && rc != SQLITE_ROW)
        err = fail_st(st, "cannot read the partition marks");
    sqlite3_reset(q);
    return err;
}

/* ---- the numbers of published events, for replays --------------------- */

static de_err sq_put_published(de__rstate *base, int64_t position,
                               int64_t epoch, int64_t seq, const char *topic,
                               int32_t partition, int64_t offset)
{
    sq_state *st = (sq_state *)base;
    sqlite3_stmt *q = st->st[S_PUBLISHED_PUT];

    assert(!sqlite3_get_autocommit(st->db));
    assert(seq > 0 && epoch >= 0);
    sqlite3_bind_int64(q, 1, position);
    sqlite3_bind_int64(q, 2, epoch);
    sqlite3_bind_int64(q, 3, seq);
    if (topic != NULL)
        sqlite3_bind_text(q, 4, topic, -1, SQLITE_STATIC);
    if (partition >= 0 && offset >= 0) {
        sqlite3_bind_int(q, 5, partition);
        sqlite3_bind_int64(q, 6, offset);
    }
    return run(st, S_PUBLISHED_PUT, "cannot record a published event");
}

static de_err sq_forget_published(de__rstate *base, int64_t upto,
                                  int64_t *forgotten)
{
    sq_state *st = (sq_state *)base;
    de_err err;

    assert(!sqlite3_get_autocommit(st->db));
    *forgotten = 0;
    sqlite3_bind_int64(st->st[S_PUBLISHED_FORGET], 1, upto);
    if ((err = run(st, S_PUBLISHED_FORGET,
                   "cannot forget the numbers of deleted rows")) == DE_OK)
        *forgotten = sqlite3_changes(st->db);
    return err;
}

static de_err sq_published_get(de__rstate *base, int64_t position, bool *found,
                               int64_t *epoch, int64_t *seq)
{
    sq_state *st = (sq_state *)base;
    sqlite3_stmt *q = st->st[S_PUBLISHED_GET];
    de_err err = DE_OK;

    *found = false;
    if (st->no_published)
        return DE_OK;
    sqlite3_bind_int64(q, 1, position);
    switch (sqlite3_step(q)) {
    case SQLITE_ROW:
        *found = true;
        *epoch = sqlite3_column_int64(q, 0);
        *seq = sqlite3_column_int64(q, 1);
        break;
    case SQLITE_DONE: break;
    default: err = fail_st(st, "cannot read the numbers of a published event");
    }
    sqlite3_reset(q);
    sqlite3_clear_bindings(q);
    return err;
}

static de_err sq_parked_at(de__rstate *base, int64_t position, bool *parked)
{
    sq_state *st = (sq_state *)base;
    sqlite3_stmt *q = st->st[S_PARKED_AT];
    int rc;

    sqlite3_bind_int64(q, 1, position);
    rc = sqlite3_step(q);
    *parked = rc == SQLITE_ROW;
    sqlite3_reset(q);
    sqlite3_clear_bindings(q);
    if (rc != SQLITE_ROW && rc != SQLITE_DONE)
        return fail_st(st, "cannot read the held-back events");
    return DE_OK;
}

/* ---- what the relay found on Kafka ------------------------------------ */

static de_err sq_found_clear(de__rstate *base)
{
    sq_state *st = (sq_state *)base;

    return de__exec(st->db, "DELETE FROM temp.de_landed;"
                            "DELETE FROM temp.de_found");
}

static de_err sq_found_add(de__rstate *base, const char *event_id,
                           const char *type, const char *id, int64_t epoch,
                           int64_t seq, const char *topic, int32_t partition,
                           int64_t offset)
{
    sq_state *st = (sq_state *)base;
    sqlite3_stmt *q = st->st[S_FOUND_LANDED];
    de_err err;

    sqlite3_bind_text(q, 1, event_id, -1, SQLITE_STATIC);
    sqlite3_bind_int64(q, 2, seq);
    sqlite3_bind_text(q, 3, topic, -1, SQLITE_STATIC);
    sqlite3_bind_int(q, 4, partition);
    sqlite3_bind_int64(q, 5, offset);
    sqlite3_bind_int64(q, 6, epoch);
    if ((err = run(st, S_FOUND_LANDED, "cannot note a found event")) != DE_OK)
        return err;
    q = st->st[S_FOUND_SUBJECT];
    sqlite3_bind_text(q, 1, type, -1, SQLITE_STATIC);
    sqlite3_bind_text(q, 2, id, -1, SQLITE_STATIC);
    sqlite3_bind_int64(q, 3, seq);
    sqlite3_bind_int64(q, 4, epoch);
    return run(st, S_FOUND_SUBJECT, "cannot note a found subject");
}

static de_err sq_found_raise(de__rstate *base, int64_t now_ms)
{
    sq_state *st = (sq_state *)base;

    assert(!sqlite3_get_autocommit(st->db));
    sqlite3_bind_int64(st->st[S_FOUND_RAISE], 1, now_ms);
    return run(st, S_FOUND_RAISE, "cannot raise the counters to Kafka's");
}

static de_err sq_found_count(de__rstate *base, int64_t *landed,
                             int64_t *subjects)
{
    sq_state *st = (sq_state *)base;
    sqlite3_stmt *q = st->st[S_FOUND_COUNT];
    de_err err = DE_OK;

    *landed = *subjects = 0;
    if (sqlite3_step(q) == SQLITE_ROW) {
        *landed = sqlite3_column_int64(q, 0);
        *subjects = sqlite3_column_int64(q, 1);
    } else {
        err = fail_st(st, "cannot count the events found on Kafka");
    }
    sqlite3_reset(q);
    return err;
}

static de_err sq_landed_get(de__rstate *base, const char *event_id, bool *found,
                            int64_t *epoch, int64_t *seq, char *topic,
                            size_t topic_size, int32_t *partition,
                            int64_t *offset)
{
    sq_state *st = (sq_state *)base;
    sqlite3_stmt *q = st->st[S_LANDED_GET];
    de_err err = DE_OK;

    *found = false;
    sqlite3_bind_text(q, 1, event_id, -1, SQLITE_STATIC);
    switch (sqlite3_step(q)) {
    case SQLITE_ROW:
        *found = true;
        *seq = sqlite3_column_int64(q, 0);
        snprintf(topic, topic_size, "%s",
                 (const char *)sqlite3_column_text(q, 1));
        *partition = sqlite3_column_int(q, 2);
        *offset = sqlite3_column_int64(q, 3);
        *epoch = sqlite3_column_int64(q, 4);
        break;
    case SQLITE_DONE: break;
    default: err = fail_st(st, "cannot look up an event found on Kafka");
    }
    sqlite3_reset(q);
    sqlite3_clear_bindings(q);
    return err;
}

/* Noting what Kafka holds one event at a time, each in its own commit,
 * would cost an fsync per event. */
static de_err sq_batch_begin(de__rstate *base)
{
    return de__exec(((sq_state *)base)->db, "BEGIN");
}

static de_err sq_batch_commit(de__rstate *base)
{
    return de__exec(((sq_state *)base)->db, "COMMIT");
}

static const de__rstate_ops sq_ops = {
    .close = sq_close,
    .cursor = sq_cursor,
    .lease_acquire = sq_lease_acquire,
    .lease_release = sq_lease_release,
    .read_begin = sq_read_begin,
    .read_end = sq_read_end,
    .begin = sq_begin,
    .put_cursor = sq_put_cursor,
    .put_seq = sq_put_seq,
    .park = sq_park,
    .unpark = sq_unpark,
    .commit = sq_commit,
    .rollback = sq_rollback,
    .forget = sq_forget,
    .put_mark = sq_put_mark,
    .has_marks = sq_has_marks,
    .marks = sq_marks,
    .get_seq = sq_get_seq,
    .parked_subjects = sq_parked_subjects,
    .parked_rows = sq_parked_rows,
    .parked_min = sq_parked_min,
    .found_clear = sq_found_clear,
    .found_add = sq_found_add,
    .found_raise = sq_found_raise,
    .found_count = sq_found_count,
    .landed_get = sq_landed_get,
    .put_published = sq_put_published,
    .forget_published = sq_forget_published,
    .published_get = sq_published_get,
    .parked_at = sq_parked_at,
    .batch_begin = sq_batch_begin,
    .batch_commit = sq_batch_commit,
};

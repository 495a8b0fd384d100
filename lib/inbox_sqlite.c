/* SPDX-License-Identifier: MIT */
/*
 * inbox_sqlite.c -- the consumer's bookkeeping in its SQLite database
 * (de__inbox, see inbox.h): de_inbox, each subject's last applied number
 * with the ce_id applied under it and whether it is parked, and
 * de_dead_letter.
 *
 * Invariants: every write runs inside the consumer's IMMEDIATE
 * transaction (asserted), so the inbox and the handler's effects commit
 * together; statements are prepared once and reset and unbound after
 * each use.
 */
#include "inbox.h"

#include <assert.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CONSUMER_SCHEMA_VERSION 5

static const char *const migrations[CONSUMER_SCHEMA_VERSION] = {
    /* 0 -> 1: the inbox and the dead letters. */
    "CREATE TABLE IF NOT EXISTS main.de_inbox("
    "  subject_type TEXT NOT NULL, subject_id TEXT NOT NULL,"
    "  last_seq INTEGER NOT NULL, parked INTEGER NOT NULL DEFAULT 0,"
    "  updated_ms INTEGER NOT NULL,"
    "  PRIMARY KEY(subject_type, subject_id)) WITHOUT ROWID;"
    "CREATE INDEX IF NOT EXISTS main.de_inbox_parked ON de_inbox(parked)"
    "  WHERE parked = 1;"
    "CREATE TABLE IF NOT EXISTS main.de_dead_letter("
    "  id INTEGER PRIMARY KEY,"
    "  kind TEXT NOT NULL,"  /* failed, waiting, gap, conflict, foreign */
    "  state TEXT NOT NULL," /* parked, applied, skipped, foreign;
                                and from schema 5 duplicate */
    "  topic TEXT, partition INTEGER, offset INTEGER,"
    "  subject_type TEXT, subject_id TEXT, seq INTEGER, event_id TEXT,"
    "  action TEXT, type TEXT, source TEXT, occurred_at_ms INTEGER,"
    "  traceparent TEXT, tracestate TEXT, payload BLOB, error TEXT,"
    "  attempts INTEGER NOT NULL DEFAULT 0, parked_ms INTEGER NOT NULL);"
    "CREATE INDEX IF NOT EXISTS main.de_dead_letter_subject"
    "  ON de_dead_letter(subject_type, subject_id, seq)"
    "  WHERE state = 'parked';",
    /* 1 -> 2: the inbox remembers the ce_id applied with each number. */
    "ALTER TABLE main.de_inbox ADD COLUMN last_event_id TEXT;",
    /* 2 -> 3: numbering epochs (ce_subjectepoch). */
    "ALTER TABLE main.de_inbox ADD COLUMN epoch INTEGER NOT NULL DEFAULT 0;"
    "ALTER TABLE main.de_dead_letter ADD COLUMN epoch INTEGER;",
    /* 3 -> 4: release and skip asked from outside the process (the
     * deliveryevents tool), done by the running consumer. */
    "CREATE TABLE IF NOT EXISTS main.de_consumer_request("
    "  id INTEGER PRIMARY KEY, subject_type TEXT NOT NULL,"
    "  subject_id TEXT NOT NULL,"
    "  action TEXT NOT NULL CHECK (action IN ('release', 'skip')),"
    "  requested_at_ms INTEGER NOT NULL, done_at_ms INTEGER, result TEXT);"
    "CREATE INDEX IF NOT EXISTS main.de_consumer_request_open"
    "  ON de_consumer_request(id) WHERE done_at_ms IS NULL;",
    /* 4 -> 5: events of any CloudEvents producer.  The ce_source that
     * numbers each subject (another one numbering it is a conflict), as
     * a 64-bit hash in the row (the claim compares it on every event;
     * de_inbox_source has the text), and the dead letter that parked it
     * (de_dead_letter.parks = 1: kept out of the inbox row, which every
     * event rewrites);
     * events without a sequence, applied once by (ce_source, ce_id),
     * remembered in de_inbox_id; dead letters keep the whole record (key,
     * headers, value, timestamp). */
    "ALTER TABLE main.de_inbox ADD COLUMN owner INTEGER;"
    "CREATE TABLE IF NOT EXISTS main.de_inbox_source("
    "  owner INTEGER PRIMARY KEY, source TEXT NOT NULL);"
    "ALTER TABLE main.de_dead_letter ADD COLUMN parks INTEGER;"
    "ALTER TABLE main.de_dead_letter ADD COLUMN record_key BLOB;"
    "ALTER TABLE main.de_dead_letter ADD COLUMN record_headers TEXT;"
    "ALTER TABLE main.de_dead_letter ADD COLUMN record_value BLOB;"
    "ALTER TABLE main.de_dead_letter ADD COLUMN record_timestamp_ms INTEGER;"
    "CREATE TABLE IF NOT EXISTS main.de_inbox_id("
    "  source TEXT NOT NULL, event_id TEXT NOT NULL,"
    "  seen_ms INTEGER NOT NULL,"
    "  PRIMARY KEY(source, event_id)) WITHOUT ROWID;"
    "CREATE INDEX IF NOT EXISTS main.de_inbox_id_seen ON de_inbox_id(seen_ms);",
};

static const de__schema consumer_schema = {
    "consumer", "de_consumer_meta", migrations, CONSUMER_SCHEMA_VERSION, NULL,
};

enum {
    Q_BEGIN,
    Q_COMMIT,
    Q_ROLLBACK,
    Q_SAVEPOINT,
    Q_RELEASE,
    Q_ROLLBACK_TO,
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
    Q_COUNT
};

static const char *const sql[Q_COUNT] = {
    [Q_BEGIN] = "BEGIN IMMEDIATE",
    [Q_COMMIT] = "COMMIT",
    [Q_ROLLBACK] = "ROLLBACK",
    [Q_SAVEPOINT] = "SAVEPOINT de_event",
    [Q_RELEASE] = "RELEASE de_event",
    [Q_ROLLBACK_TO] = "ROLLBACK TO de_event",
    /* The subject, its owner (the ce_source numbering it) and the dead
     * letter that parked it. */
    [Q_GET] = "SELECT i.last_seq, i.parked, i.last_event_id, i.epoch, "
              "(SELECT coalesce(source, '') FROM main.de_inbox_source o "
              "WHERE o.owner = i.owner), d.id, d.kind, coalesce(d.epoch, 0), "
              "coalesce(d.seq, 0), i.owner IS NOT NULL, i.owner FROM "
              "main.de_inbox i LEFT JOIN main.de_dead_letter d ON "
              "d.subject_type = i.subject_type AND d.subject_id = "
              "i.subject_id AND d.state = 'parked' AND d.parks = 1 AND "
              "i.parked = 1 WHERE i.subject_type = ?1 AND i.subject_id = ?2",
    /* Keeps the subject's park, and its owner once it has one. */
    [Q_PUT] = "INSERT INTO main.de_inbox(subject_type, subject_id, last_seq, "
              "parked, updated_ms, last_event_id, epoch, owner) VALUES (?1, "
              "?2, ?3, 0, ?4, ?5, ?6, ?7) ON CONFLICT(subject_type, "
              "subject_id) DO UPDATE SET last_seq = excluded.last_seq, "
              "updated_ms = excluded.updated_ms, last_event_id = "
              "excluded.last_event_id, epoch = excluded.epoch, owner = "
              "coalesce(de_inbox.owner, excluded.owner)",
    [Q_PARK] = "INSERT INTO main.de_inbox(subject_type, subject_id, last_seq, "
               "parked, updated_ms) VALUES (?1, ?2, 0, ?3, ?4) ON "
               "CONFLICT(subject_type, subject_id) DO UPDATE SET parked = "
               "excluded.parked, updated_ms = excluded.updated_ms",
    /* The one dead letter that parks the subject: ?3. */
    [Q_PARKS] = "UPDATE main.de_dead_letter SET parks = CASE WHEN id = ?3 "
                "THEN 1 END WHERE subject_type = ?1 AND subject_id = ?2 AND "
                "state = 'parked' AND (parks IS NOT NULL OR id = ?3)",
    /* The next event of a known subject's numbering, by its owner:
     * advance in one statement.  (A row without an owner, from before
     * schema 5, takes the slow path once, and Q_PUT gives it one.) */
    [Q_CLAIM] = "UPDATE main.de_inbox SET last_seq = ?3, updated_ms = ?4, "
                "last_event_id = ?5 WHERE subject_type = ?1 AND subject_id = "
                "?2 AND epoch = ?6 AND last_seq = ?3 - 1 AND parked = 0 AND "
                "owner = ?7",
    /* The first event of a subject never seen (or forgotten), or of a new
     * numbering of a known one by its owner. */
    [Q_FIRST] = "INSERT INTO main.de_inbox(subject_type, subject_id, "
                "last_seq, parked, updated_ms, last_event_id, epoch, owner) "
                "VALUES (?1, ?2, 1, 0, ?4, ?5, ?6, ?7) ON "
                "CONFLICT(subject_type, subject_id) DO UPDATE SET last_seq = "
                "1, updated_ms = excluded.updated_ms, last_event_id = "
                "excluded.last_event_id, epoch = excluded.epoch, owner = "
                "excluded.owner WHERE de_inbox.epoch < excluded.epoch AND "
                "de_inbox.parked = 0 AND (de_inbox.owner IS NULL OR "
                "de_inbox.owner = excluded.owner)",
    [Q_DL_INSERT] =
        "INSERT INTO main.de_dead_letter(kind, state, topic, partition, "
        "offset, subject_type, subject_id, seq, event_id, action, type, "
        "source, occurred_at_ms, traceparent, tracestate, payload, error, "
        "attempts, parked_ms, epoch, record_key, record_headers, "
        "record_value, record_timestamp_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, "
        "?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, "
        "?21, ?22, ?23, ?24)",
    /* The very event parked already (read again). */
    [Q_DL_HAS] = "SELECT 1 FROM main.de_dead_letter WHERE subject_type = ?1 "
                 "AND subject_id = ?2 AND coalesce(seq, 0) = ?3 AND "
                 "coalesce(epoch, 0) = ?4 AND event_id = ?5 AND source IS ?6 "
                 "AND state = 'parked'",
    /* The one that parked the subject (?3) first, then in number order:
     * by numbering, then number, then arrival (events without a number
     * in arrival order). */
    [Q_DL_NEXT] = "SELECT id, kind, topic, partition, offset, seq, event_id, "
                  "action, type, source, occurred_at_ms, traceparent, "
                  "tracestate, payload, coalesce(epoch, 0) FROM "
                  "main.de_dead_letter WHERE subject_type = ?1 AND "
                  "subject_id = ?2 AND state = 'parked' ORDER BY id IS ?3 "
                  "DESC, coalesce(epoch, 0), coalesce(seq, 0), id LIMIT 1",
    [Q_DL_DONE] = "UPDATE main.de_dead_letter SET state = ?2 WHERE id = ?1",
    [Q_DL_FAIL] = "UPDATE main.de_dead_letter SET kind = 'failed', "
                  "attempts = attempts + 1, error = ?2 WHERE id = ?1",
    [Q_PARKED_COUNT] = "SELECT count(*) FROM main.de_inbox WHERE parked = 1",
    /* Forgetting idle subjects a slice at a time: the slice's last key,
     * then the idle rows up to it. */
    [Q_FORGET_SCAN] = "SELECT subject_type, subject_id FROM main.de_inbox "
                      "WHERE (subject_type, subject_id) > (?1, ?2) ORDER BY "
                      "subject_type, subject_id LIMIT 1 OFFSET ?3",
    [Q_FORGET] = "DELETE FROM main.de_inbox WHERE (subject_type, subject_id) "
                 "> (?1, ?2) AND (?5 OR (subject_type, subject_id) <= (?3, "
                 "?4)) AND updated_ms < ?6 AND parked = 0",
    [Q_REQ_NEXT] = "SELECT id, subject_type, subject_id, action = 'skip' FROM "
                   "main.de_consumer_request WHERE done_at_ms IS NULL ORDER "
                   "BY id LIMIT 1",
    [Q_REQ_DONE] = "UPDATE main.de_consumer_request SET done_at_ms = ?2, "
                   "result = ?3 WHERE id = ?1",
    [Q_DL_REPARK] = "UPDATE main.de_dead_letter SET kind = ?2, error = ?3 "
                    "WHERE id = ?1",
    [Q_SEEN_CLAIM] = "INSERT INTO main.de_inbox_id(source, event_id, "
                     "seen_ms) VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING",
    [Q_SEEN] = "SELECT 1 FROM main.de_inbox_id WHERE source = ?1 AND "
               "event_id = ?2",
    /* The oldest, a slice at a time. */
    [Q_SOURCE] = "INSERT INTO main.de_inbox_source(owner, source) VALUES "
                 "(?1, ?2) ON CONFLICT DO NOTHING",
    [Q_FORGET_IDS] = "DELETE FROM main.de_inbox_id WHERE (source, event_id) "
                     "IN (SELECT source, event_id FROM main.de_inbox_id "
                     "WHERE seen_ms < ?1 ORDER BY seen_ms LIMIT ?2)",
};

typedef struct sqlite_inbox {
    de__inbox base;
    sqlite3 *db;
    sqlite3_stmt *q[Q_COUNT];
    /* where forgetting stopped: the last key it looked at */
    char forget_type[DE__NAME_MAX + 1];
    char forget_id[DE__SUBJECT_ID_MAX + 1];
    /* owners whose text is in de_inbox_source (of this transaction or
     * committed: the cache is cleared on a rollback, and on a rollback
     * to the event's savepoint) */
    int64_t owners[16];
    size_t n_owners;
} sqlite_inbox;

#define IB(ib) ((sqlite_inbox *)(ib))

/* Steps a statement without rows, resets and unbinds it. */
static int step(sqlite_inbox *s, int which)
{
    int rc = sqlite3_step(s->q[which]);

    sqlite3_reset(s->q[which]);
    sqlite3_clear_bindings(s->q[which]);
    return rc;
}

static de_err run(sqlite_inbox *s, int which, const char *what)
{
    if (step(s, which) != SQLITE_DONE)
        return de__fail_db(s->db, "consumer: %s", what);
    return DE_OK;
}

static de_err i_begin(de__inbox *ib)
{
    return run(IB(ib), Q_BEGIN, "cannot begin a transaction");
}

static de_err i_commit(de__inbox *ib)
{
    return run(IB(ib), Q_COMMIT, "cannot commit");
}

static void i_rollback(de__inbox *ib)
{
    IB(ib)->n_owners = 0;
    /* A failed ROLLBACK leaves nothing to do: SQLite rolled back. */
    if (!sqlite3_get_autocommit(IB(ib)->db))
        (void)step(IB(ib), Q_ROLLBACK);
}

static de_err i_savepoint(de__inbox *ib)
{
    return run(IB(ib), Q_SAVEPOINT, "savepoint");
}

static de_err i_release(de__inbox *ib)
{
    return run(IB(ib), Q_RELEASE, "releasing a savepoint");
}

static de_err i_rollback_to(de__inbox *ib)
{
    /* The event's claim may have written its owner's text: forget what
     * the cache learnt since (it cannot tell what), as on a rollback. */
    IB(ib)->n_owners = 0;
    return run(IB(ib), Q_ROLLBACK_TO, "rolling back an event");
}

static bool i_in_txn(de__inbox *ib)
{
    return !sqlite3_get_autocommit(IB(ib)->db);
}

static void bind_subject(sqlite3_stmt *q, const char *type, const char *id)
{
    sqlite3_bind_text(q, 1, type, -1, SQLITE_STATIC);
    sqlite3_bind_text(q, 2, id, -1, SQLITE_STATIC);
}

/*
 * The ce_id applied with a subject's number, as the inbox row keeps it:
 * a canonical (lowercase, hyphenated) UUID -- every id this library
 * generates -- as its 16 bytes, anything else as its text.  Every event
 * rewrites this row, and the 36-character text made it half again as
 * large: the blob is read back as the same text, so nothing else sees
 * the difference (a row written as text by an older version still reads
 * as text).
 */
static void bind_event_id(sqlite3_stmt *q, int idx, const char *id)
{
    unsigned char b[16];

    if (de__uuid_parse(id, b))
        sqlite3_bind_blob(q, idx, b, 16, SQLITE_TRANSIENT);
    else
        sqlite3_bind_text(q, idx, id, -1, SQLITE_STATIC);
}

/* The ce_id in column col, as bind_event_id stored it, into out. */
static void column_event_id(sqlite3_stmt *q, int col, char *out, size_t size)
{
    const unsigned char *p;

    if (sqlite3_column_type(q, col) == SQLITE_BLOB &&
        sqlite3_column_bytes(q, col) == 16 && size >= 37) {
        de__uuid_format(sqlite3_column_blob(q, col), out);
        return;
    }
    p = sqlite3_column_text(q, col);
    snprintf(out, size, "%s", p != NULL ? (const char *)p : "");
}

/* A ce_source as the inbox row keeps it: FNV-1a, 64 bits. */
static int64_t owner_of(const char *source)
{
    uint64_t h = UINT64_C(14695981039346656037);

    for (const unsigned char *p = (const unsigned char *)source; *p; p++)
        h = (h ^ *p) * UINT64_C(1099511628211);
    return (int64_t)h;
}

/* Makes sure de_inbox_source has the text of owner. */
static de_err note_owner(sqlite_inbox *s, int64_t owner, const char *source)
{
    sqlite3_stmt *q = s->q[Q_SOURCE];

    for (size_t i = 0; i < s->n_owners; i++)
        if (s->owners[i] == owner)
            return DE_OK;
    sqlite3_bind_int64(q, 1, owner);
    sqlite3_bind_text(q, 2, source, -1, SQLITE_STATIC);
    if (step(s, Q_SOURCE) != SQLITE_DONE)
        return de__fail_db(s->db, "consumer: recording a ce_source");
    if (s->n_owners == DE__ARRAY_LEN(s->owners))
        s->n_owners = 0;
    s->owners[s->n_owners++] = owner;
    return DE_OK;
}

static de_err i_claim(de__inbox *ib, const de_event_view *v, bool *claimed)
{
    sqlite_inbox *s = IB(ib);
    int which = Q_CLAIM;
    int64_t owner = owner_of(v->source);

    assert(i_in_txn(ib));
    *claimed = false;
    for (int pass = 0; pass < 2; pass++) {
        sqlite3_stmt *q = s->q[which];
        bind_subject(q, v->subject_type, v->subject_id);
        sqlite3_bind_int64(q, 3, v->subject_seq);
        sqlite3_bind_int64(q, 4, de__now_ms());
        bind_event_id(q, 5, v->event_id);
        sqlite3_bind_int64(q, 6, v->subject_epoch);
        sqlite3_bind_int64(q, 7, owner);
        if (step(s, which) != SQLITE_DONE)
            return de__fail_db(s->db, "consumer: updating the inbox");
        if (sqlite3_changes(s->db) == 1) {
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
    sqlite_inbox *s = IB(ib);
    sqlite3_stmt *q = s->q[Q_GET];
    const unsigned char *lid;
    int rc;

    memset(e, 0, sizeof *e);
    bind_subject(q, type, id);
    rc = sqlite3_step(q);
    if (rc == SQLITE_ROW) {
        e->seq = sqlite3_column_int64(q, 0);
        e->parked = sqlite3_column_int(q, 1) != 0;
        column_event_id(q, 2, e->last_id, sizeof e->last_id);
        e->epoch = sqlite3_column_int64(q, 3);
        if ((lid = sqlite3_column_text(q, 4)) != NULL)
            snprintf(e->source, sizeof e->source, "%s", (const char *)lid);
        else if (sqlite3_column_int(q, 9))
            /* An owner whose text is missing: name it by its hash. */
            snprintf(e->source, sizeof e->source, "#%016llx",
                     (unsigned long long)sqlite3_column_int64(q, 10));
        e->park_id = sqlite3_column_int64(q, 5);
        if ((lid = sqlite3_column_text(q, 6)) != NULL)
            snprintf(e->park_kind, sizeof e->park_kind, "%s",
                     (const char *)lid);
        e->park_epoch = sqlite3_column_int64(q, 7);
        e->park_seq = sqlite3_column_int64(q, 8);
    }
    sqlite3_reset(q);
    sqlite3_clear_bindings(q);
    if (rc != SQLITE_ROW && rc != SQLITE_DONE)
        return de__fail_db(s->db, "consumer: reading the inbox");
    return DE_OK;
}

static de_err i_put(de__inbox *ib, const char *type, const char *id,
                    int64_t epoch, int64_t seq, const char *event_id,
                    const char *source)
{
    sqlite_inbox *s = IB(ib);
    sqlite3_stmt *q = s->q[Q_PUT];

    assert(i_in_txn(ib));
    bind_subject(q, type, id);
    sqlite3_bind_int64(q, 3, seq);
    sqlite3_bind_int64(q, 4, de__now_ms());
    bind_event_id(q, 5, event_id);
    sqlite3_bind_int64(q, 6, epoch);
    if (source != NULL) {
        de_err err;
        sqlite3_bind_int64(q, 7, owner_of(source));
        if ((err = run(s, Q_PUT, "updating the inbox")) != DE_OK)
            return err;
        return note_owner(s, owner_of(source), source);
    }
    return run(s, Q_PUT, "updating the inbox");
}

static de_err i_park(de__inbox *ib, const char *type, const char *id,
                     bool parked, int64_t park_id)
{
    sqlite_inbox *s = IB(ib);
    sqlite3_stmt *q = s->q[Q_PARK];
    de_err err;

    assert(i_in_txn(ib));
    bind_subject(q, type, id);
    sqlite3_bind_int(q, 3, parked ? 1 : 0);
    sqlite3_bind_int64(q, 4, de__now_ms());
    if (!parked || park_id <= 0)
        return run(s, Q_PARK, "parking a subject");
    if ((err = run(s, Q_PARK, "parking a subject")) != DE_OK)
        return err;
    bind_subject(s->q[Q_PARKS], type, id);
    sqlite3_bind_int64(s->q[Q_PARKS], 3, park_id);
    return run(s, Q_PARKS, "parking a subject");
}

static de_err i_dl_insert(de__inbox *ib, const char *kind,
                          const de__dl_origin *o, const de_event_view *v,
                          const char *error, int attempts, int64_t *id)
{
    de_err err;

    sqlite_inbox *s = IB(ib);
    sqlite3_stmt *q = s->q[Q_DL_INSERT];

    assert(i_in_txn(ib));
    sqlite3_bind_text(q, 1, kind, -1, SQLITE_STATIC);
    sqlite3_bind_text(q, 2, strcmp(kind, "foreign") == 0 ? "foreign" : "parked",
                      -1, SQLITE_STATIC);
    sqlite3_bind_text(q, 3, o->topic, -1, SQLITE_STATIC);
    sqlite3_bind_int(q, 4, o->partition);
    sqlite3_bind_int64(q, 5, o->offset);
    if (v != NULL) {
        sqlite3_bind_text(q, 6, v->subject_type, -1, SQLITE_STATIC);
        sqlite3_bind_text(q, 7, v->subject_id, -1, SQLITE_STATIC);
        if (v->subject_seq > 0)
            sqlite3_bind_int64(q, 8, v->subject_seq);
        sqlite3_bind_text(q, 9, v->event_id, -1, SQLITE_STATIC);
        sqlite3_bind_text(q, 10, v->action, -1, SQLITE_STATIC);
        sqlite3_bind_text(q, 11, v->type, -1, SQLITE_STATIC);
        sqlite3_bind_text(q, 12, v->source, -1, SQLITE_STATIC);
        sqlite3_bind_int64(q, 13, v->occurred_at_ms);
        if (v->traceparent)
            sqlite3_bind_text(q, 14, v->traceparent, -1, SQLITE_STATIC);
        if (v->tracestate)
            sqlite3_bind_text(q, 15, v->tracestate, -1, SQLITE_STATIC);
        if (v->subject_seq > 0)
            sqlite3_bind_int64(q, 20, v->subject_epoch);
        sqlite3_bind_text(q, 16, v->payload, (int)v->payload_len,
                          SQLITE_STATIC);
    } else if (o->value != NULL) {
        sqlite3_bind_blob(q, 16, o->value, (int)o->value_len, SQLITE_STATIC);
    }
    sqlite3_bind_text(q, 17, error, -1, SQLITE_STATIC);
    sqlite3_bind_int(q, 18, attempts);
    sqlite3_bind_int64(q, 19, de__now_ms());
    if (o->key != NULL)
        sqlite3_bind_blob(q, 21, o->key, (int)o->key_len, SQLITE_STATIC);
    if (o->headers != NULL)
        sqlite3_bind_text(q, 22, o->headers, -1, SQLITE_STATIC);
    if (o->value != NULL)
        sqlite3_bind_blob(q, 23, o->value, (int)o->value_len, SQLITE_STATIC);
    if (o->timestamp_ms >= 0)
        sqlite3_bind_int64(q, 24, o->timestamp_ms);
    err = run(s, Q_DL_INSERT, "writing a dead letter");
    if (err == DE_OK && id != NULL)
        *id = sqlite3_last_insert_rowid(s->db);
    return err;
}

static de_err i_dl_has(de__inbox *ib, const de_event_view *v, bool *has)
{
    sqlite_inbox *s = IB(ib);
    sqlite3_stmt *q = s->q[Q_DL_HAS];
    int rc;

    bind_subject(q, v->subject_type, v->subject_id);
    sqlite3_bind_int64(q, 3, v->subject_seq);
    sqlite3_bind_int64(q, 4, v->subject_seq > 0 ? v->subject_epoch : 0);
    sqlite3_bind_text(q, 5, v->event_id, -1, SQLITE_STATIC);
    sqlite3_bind_text(q, 6, v->source, -1, SQLITE_STATIC);
    rc = sqlite3_step(q);
    *has = rc == SQLITE_ROW;
    sqlite3_reset(q);
    sqlite3_clear_bindings(q);
    if (rc != SQLITE_ROW && rc != SQLITE_DONE)
        return de__fail_db(s->db, "consumer: reading the dead letters");
    return DE_OK;
}

void de__dead_letter_free(de__dead_letter *dl)
{
    for (size_t i = 0; i < DE__ARRAY_LEN(dl->strings); i++)
        free(dl->strings[i]);
    free(dl->kind);
    memset(dl, 0, sizeof *dl);
}

static de_err i_dl_next(de__inbox *ib, const char *type, const char *id,
                        int64_t first, de__dead_letter *out, bool *found)
{
    sqlite_inbox *s = IB(ib);
    sqlite3_stmt *q = s->q[Q_DL_NEXT];
    de_event_view *v = &out->view;
    /* Columns copied into out->strings, in this order. */
    static const int text_cols[] = {2, 6, 7, 8, 9, 11, 12, 13};
    char **str = out->strings;
    de_err err = DE_OK;
    int rc;

    memset(out, 0, sizeof *out);
    *found = false;
    sqlite3_bind_text(q, 1, type, -1, SQLITE_TRANSIENT);
    sqlite3_bind_text(q, 2, id, -1, SQLITE_TRANSIENT);
    if (first > 0)
        sqlite3_bind_int64(q, 3, first);
    rc = sqlite3_step(q);
    if (rc == SQLITE_ROW) {
        *found = true;
        out->id = sqlite3_column_int64(q, 0);
        if (sqlite3_column_text(q, 1) != NULL &&
            (out->kind = strdup((const char *)sqlite3_column_text(q, 1))) ==
                NULL)
            err = de__fail(DE_ERR_NOMEM, "consumer: out of memory");
        for (size_t i = 0; err == DE_OK && i < DE__ARRAY_LEN(text_cols); i++)
            if (sqlite3_column_type(q, text_cols[i]) != SQLITE_NULL &&
                (str[i] = strdup((const char *)sqlite3_column_text(
                     q, text_cols[i]))) == NULL)
                err = de__fail(DE_ERR_NOMEM, "consumer: out of memory");
        str[8] = strdup(type);
        str[9] = strdup(id);
        if (err == DE_OK && (str[8] == NULL || str[9] == NULL))
            err = de__fail(DE_ERR_NOMEM, "consumer: out of memory");
        v->topic = str[0];
        v->partition = sqlite3_column_int(q, 3);
        v->offset = sqlite3_column_int64(q, 4);
        v->subject_seq = sqlite3_column_int64(q, 5);
        v->event_id = str[1] ? str[1] : "";
        v->action = str[2] ? str[2] : "";
        v->type = str[3] ? str[3] : "";
        v->source = str[4] ? str[4] : "";
        v->occurred_at_ms = sqlite3_column_int64(q, 10);
        v->traceparent = str[5];
        v->tracestate = str[6];
        v->payload = str[7] ? str[7] : "{}";
        v->payload_len = strlen(v->payload);
        v->subject_type = str[8];
        v->subject_id = str[9];
        v->subject_epoch = sqlite3_column_int64(q, 14);
    } else if (rc != SQLITE_DONE) {
        err = de__fail_db(s->db, "consumer: reading the dead letters");
    }
    sqlite3_reset(q);
    sqlite3_clear_bindings(q);
    if (err != DE_OK)
        de__dead_letter_free(out);
    return err;
}

/* Runs a dead letter's update (Q_DL_DONE or Q_DL_FAIL): ?1 its id, ?2
 * the text. */
static de_err dl_update(de__inbox *ib, int which, int64_t id, const char *text)
{
    sqlite_inbox *s = IB(ib);

    assert(i_in_txn(ib));
    sqlite3_bind_int64(s->q[which], 1, id);
    sqlite3_bind_text(s->q[which], 2, text, -1, SQLITE_STATIC);
    return run(s, which, "updating a dead letter");
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
    sqlite_inbox *s = IB(ib);
    sqlite3_stmt *q = s->q[Q_DL_REPARK];

    assert(i_in_txn(ib));
    sqlite3_bind_int64(q, 1, id);
    sqlite3_bind_text(q, 2, kind, -1, SQLITE_STATIC);
    sqlite3_bind_text(q, 3, error, -1, SQLITE_STATIC);
    return run(s, Q_DL_REPARK, "updating a dead letter");
}

static de_err i_seen_claim(de__inbox *ib, const de_event_view *v, bool *claimed)
{
    sqlite_inbox *s = IB(ib);
    sqlite3_stmt *q = s->q[Q_SEEN_CLAIM];

    assert(i_in_txn(ib));
    sqlite3_bind_text(q, 1, v->source, -1, SQLITE_STATIC);
    sqlite3_bind_text(q, 2, v->event_id, -1, SQLITE_STATIC);
    sqlite3_bind_int64(q, 3, de__now_ms());
    if (step(s, Q_SEEN_CLAIM) != SQLITE_DONE)
        return de__fail_db(s->db, "consumer: updating the inbox of ids");
    *claimed = sqlite3_changes(s->db) == 1;
    return DE_OK;
}

static de_err i_seen(de__inbox *ib, const de_event_view *v, bool *seen)
{
    sqlite_inbox *s = IB(ib);
    sqlite3_stmt *q = s->q[Q_SEEN];
    int rc;

    sqlite3_bind_text(q, 1, v->source, -1, SQLITE_STATIC);
    sqlite3_bind_text(q, 2, v->event_id, -1, SQLITE_STATIC);
    rc = sqlite3_step(q);
    *seen = rc == SQLITE_ROW;
    sqlite3_reset(q);
    sqlite3_clear_bindings(q);
    if (rc != SQLITE_ROW && rc != SQLITE_DONE)
        return de__fail_db(s->db, "consumer: reading the inbox of ids");
    return DE_OK;
}

static de_err i_forget_ids(de__inbox *ib, int64_t before_ms, int limit,
                           int64_t *forgotten)
{
    sqlite_inbox *s = IB(ib);
    sqlite3_stmt *q = s->q[Q_FORGET_IDS];

    assert(i_in_txn(ib));
    sqlite3_bind_int64(q, 1, before_ms);
    sqlite3_bind_int(q, 2, limit);
    if (step(s, Q_FORGET_IDS) != SQLITE_DONE)
        return de__fail_db(s->db, "consumer: forgetting old event ids");
    *forgotten = sqlite3_changes(s->db);
    return DE_OK;
}

static de_err i_parked_count(de__inbox *ib, int64_t *n)
{
    sqlite_inbox *s = IB(ib);
    sqlite3_stmt *q = s->q[Q_PARKED_COUNT];
    de_err err = DE_OK;

    *n = 0;
    if (sqlite3_step(q) == SQLITE_ROW)
        *n = sqlite3_column_int64(q, 0);
    else
        err = de__fail_db(s->db, "consumer: counting parked subjects");
    sqlite3_reset(q);
    return err;
}

static de_err i_forget(de__inbox *ib, int64_t before_ms, int limit,
                       int64_t *forgotten)
{
    sqlite_inbox *s = IB(ib);
    sqlite3_stmt *scan = s->q[Q_FORGET_SCAN];
    sqlite3_stmt *del = s->q[Q_FORGET];
    char last_type[DE__NAME_MAX + 1] = "";
    char last_id[DE__SUBJECT_ID_MAX + 1] = "";
    bool end;
    int rc;

    assert(i_in_txn(ib));
    *forgotten = 0;
    /* The slice's last key; none: the slice runs to the end. */
    bind_subject(scan, s->forget_type, s->forget_id);
    sqlite3_bind_int(scan, 3, limit - 1);
    rc = sqlite3_step(scan);
    if (rc == SQLITE_ROW) {
        snprintf(last_type, sizeof last_type, "%s",
                 (const char *)sqlite3_column_text(scan, 0));
        snprintf(last_id, sizeof last_id, "%s",
                 (const char *)sqlite3_column_text(scan, 1));
    }
    sqlite3_reset(scan);
    sqlite3_clear_bindings(scan);
    if (rc != SQLITE_ROW && rc != SQLITE_DONE)
        return de__fail_db(s->db, "consumer: reading the inbox");
    end = rc == SQLITE_DONE;
    bind_subject(del, s->forget_type, s->forget_id);
    sqlite3_bind_text(del, 3, last_type, -1, SQLITE_STATIC);
    sqlite3_bind_text(del, 4, last_id, -1, SQLITE_STATIC);
    sqlite3_bind_int(del, 5, end);
    sqlite3_bind_int64(del, 6, before_ms);
    if (step(s, Q_FORGET) != SQLITE_DONE)
        return de__fail_db(s->db, "consumer: forgetting idle subjects");
    *forgotten = sqlite3_changes(s->db);
    snprintf(s->forget_type, sizeof s->forget_type, "%s", last_type);
    snprintf(s->forget_id, sizeof s->forget_id, "%s", last_id);
    return DE_OK;
}

/* Not among the prepared statements: it runs once a second at most,
 * off the apply path.  Ids grow with parked_ms (both are set at insert),
 * so the scan stops at the first dead letter young enough to keep. */
static de_err i_dl_forget(de__inbox *ib, int64_t before_ms, int limit,
                          int64_t *forgotten)
{
    sqlite_inbox *s = IB(ib);
    sqlite3_stmt *q = NULL;
    int rc;

    *forgotten = 0;
    if (sqlite3_prepare_v2(
            s->db,
            "DELETE FROM main.de_dead_letter WHERE id IN (SELECT id FROM "
            "main.de_dead_letter WHERE id < coalesce((SELECT id FROM "
            "main.de_dead_letter WHERE parked_ms >= ?1 ORDER BY id LIMIT 1), "
            "9223372036854775807) AND state <> 'parked' ORDER BY id LIMIT ?2)",
            -1, &q, NULL) != SQLITE_OK)
        return de__fail_db(s->db, "consumer: forgetting old dead letters");
    sqlite3_bind_int64(q, 1, before_ms);
    sqlite3_bind_int(q, 2, limit);
    rc = sqlite3_step(q);
    sqlite3_finalize(q);
    if (rc != SQLITE_DONE)
        return de__fail_db(s->db, "consumer: forgetting old dead letters");
    *forgotten = sqlite3_changes(s->db);
    return DE_OK;
}

static void i_close(de__inbox *ib)
{
    sqlite_inbox *s = IB(ib);

    if (s == NULL)
        return;
    for (int i = 0; i < Q_COUNT; i++)
        sqlite3_finalize(s->q[i]);
    free(s);
}

static de_err i_request_next(de__inbox *ib, de__request *r, bool *found)
{
    sqlite_inbox *s = IB(ib);
    sqlite3_stmt *q = s->q[Q_REQ_NEXT];
    const unsigned char *t, *i;
    de_err err = DE_OK;
    int rc = sqlite3_step(q);

    *found = false;
    if (rc == SQLITE_ROW) {
        t = sqlite3_column_text(q, 1);
        i = sqlite3_column_text(q, 2);
        r->id = sqlite3_column_int64(q, 0);
        snprintf(r->type, sizeof r->type, "%s", t ? (const char *)t : "");
        snprintf(r->subject_id, sizeof r->subject_id, "%s",
                 i ? (const char *)i : "");
        r->skip = sqlite3_column_int(q, 3) != 0;
        *found = true;
    } else if (rc != SQLITE_DONE) {
        err = de__fail_db(s->db, "consumer: reading release requests");
    }
    sqlite3_reset(q);
    return err;
}

static de_err i_request_done(de__inbox *ib, int64_t id, const char *result)
{
    sqlite_inbox *s = IB(ib);
    sqlite3_stmt *q = s->q[Q_REQ_DONE];

    assert(!sqlite3_get_autocommit(s->db));
    sqlite3_bind_int64(q, 1, id);
    sqlite3_bind_int64(q, 2, de__now_ms());
    sqlite3_bind_text(q, 3, result, -1, SQLITE_TRANSIENT);
    return run(s, Q_REQ_DONE, "answering a release request");
}

/* Never a conflict to run again (inbox.h says why). */
static const char *i_conflict(de__inbox *ib)
{
    (void)ib;
    return NULL;
}

static const de__inbox_ops sqlite_ops = {
    .begin = i_begin,
    .commit = i_commit,
    .rollback = i_rollback,
    .savepoint = i_savepoint,
    .release = i_release,
    .rollback_to = i_rollback_to,
    .in_txn = i_in_txn,
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

de_err de__inbox_open_sqlite(sqlite3 *db, int64_t busy_ms, de__inbox **out)
{
    sqlite_inbox *s;
    de_err err;

    *out = NULL;
    if ((err = de__prepare_connection(db, busy_ms)) != DE_OK ||
        (err = de__schema_ensure(db, &consumer_schema)) != DE_OK)
        return err;
    if ((s = calloc(1, sizeof *s)) == NULL)
        return de__fail(DE_ERR_NOMEM, "out of memory opening the consumer");
    s->base.ops = &sqlite_ops;
    s->db = db;
    for (int i = 0; i < Q_COUNT; i++)
        if (sqlite3_prepare_v3(db, sql[i], -1, SQLITE_PREPARE_PERSISTENT,
                               &s->q[i], NULL) != SQLITE_OK) {
            err = de__fail_db(db, "cannot prepare '%s'", sql[i]);
            i_close(&s->base);
            return err;
        }
    *out = &s->base;
    return DE_OK;
}

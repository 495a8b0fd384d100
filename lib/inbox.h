/* SPDX-License-Identifier: MIT */
/*
 * inbox.h -- the consumer's bookkeeping as it needs it from its database:
 * the seam between the consumer's logic (consumer.c) and the database
 * that holds the inbox and the dead letters.  inbox_sqlite.c implements
 * it for SQLite; another database implements the same operations.
 *
 * An inbox is used by one thread at a time (the consumer's).  Every
 * operation but the transaction ones runs inside the transaction begun
 * with begin(); every failure sets the thread's message.
 */
#ifndef DE_INBOX_H
#define DE_INBOX_H

#include "internal.h"

typedef struct de__inbox de__inbox;

/* The whole record a dead letter keeps: where it was read, its key,
 * headers (JSON, see de__headers_json), value and timestamp. */
typedef struct de__dl_origin {
    const char *topic;
    int32_t partition;
    int64_t offset;
    const void *value; /* may be NULL */
    size_t value_len;
    const void *key; /* may be NULL */
    size_t key_len;
    const char *headers;  /* may be NULL: none */
    int64_t timestamp_ms; /* -1: none */
} de__dl_origin;

/* A parked dead letter read back (strings owned; de__dead_letter_free). */
typedef struct de__dead_letter {
    int64_t id;
    char *kind; /* failed, waiting, gap, conflict */
    de_event_view view;
    char *strings[12]; /* what view points into */
} de__dead_letter;

void de__dead_letter_free(de__dead_letter *dl);

/* A subject as the inbox knows it. */
typedef struct de__inbox_entry {
    int64_t epoch;                    /* of its numbering             */
    int64_t seq;                      /* last applied; 0: none        */
    bool parked;                      /* waiting behind a dead letter */
    char last_id[DE__CE_ID_MAX + 1];  /* ce_id applied with seq; ""   */
    char source[DE__CE_TEXT_MAX + 1]; /* the ce_source numbering it   */
    int64_t park_id;                  /* the dead letter parking it   */
    char park_kind[16];               /* its kind; "" when none       */
    int64_t park_epoch, park_seq;     /* its number                   */
} de__inbox_entry;

/* A release or skip asked from outside the process (de_consumer_request),
 * for the running consumer to do with its handlers. */
typedef struct de__request {
    int64_t id;
    char type[DE__NAME_MAX + 1];
    char subject_id[DE__SUBJECT_ID_MAX + 1];
    bool skip;
} de__request;

typedef struct de__inbox_ops {
    /* One write transaction; savepoints around one handler's effects. */
    de_err (*begin)(de__inbox *ib);
    de_err (*commit)(de__inbox *ib);
    void (*rollback)(de__inbox *ib);
    de_err (*savepoint)(de__inbox *ib);
    de_err (*release)(de__inbox *ib);
    de_err (*rollback_to)(de__inbox *ib);
    /* Whether the transaction is still open (a handler must not end it). */
    bool (*in_txn)(de__inbox *ib);
    /* Called right after an operation, a handler or the commit failed:
     * the SQLSTATE of that failure ("40P01", "40001") when it was a
     * conflict with another transaction -- a deadlock or a serialization
     * failure, which the server ends by aborting one of them, and which
     * the same work run again in a new transaction normally does not
     * meet -- else NULL.  SQLite's is always NULL: BEGIN IMMEDIATE takes
     * the write lock before anything is read or written, so two
     * transactions never deadlock, and its SQLITE_BUSY comes only after
     * the busy timeout has already waited for the other writer. */
    const char *(*conflict)(de__inbox *ib);
    /* Whether the connection is gone, so that nothing will work until
     * the host resets it (a PostgreSQL connection the server dropped:
     * the consumer never reconnects the host's connection itself).  NULL
     * when that cannot happen (SQLite). */
    bool (*lost)(de__inbox *ib);
    /* Takes v as its subject's next event in one step: true when it is
     * the next number of the subject's numbering, or number 1 of a
     * subject never seen or of a newer numbering, and the subject is not
     * parked. */
    de_err (*claim)(de__inbox *ib, const de_event_view *v, bool *claimed);
    /* A subject's entry; all zero when never seen (or forgotten). */
    de_err (*get)(de__inbox *ib, const char *type, const char *id,
                  de__inbox_entry *e);
    /* Records (epoch, seq) with event_id as the subject's last applied
     * event and lifts its park; source (NULL: keep the one recorded)
     * becomes the subject's owner. */
    de_err (*put)(de__inbox *ib, const char *type, const char *id,
                  int64_t epoch, int64_t seq, const char *event_id,
                  const char *source);
    /* Parks a subject behind dead letter park_id, or lifts its park. */
    de_err (*park)(de__inbox *ib, const char *type, const char *id, bool parked,
                   int64_t park_id);
    /* Stores a dead letter (v NULL: a foreign record); *id (may be NULL)
     * receives its id. */
    de_err (*dl_insert)(de__inbox *ib, const char *kind, const de__dl_origin *o,
                        const de_event_view *v, const char *error, int attempts,
                        int64_t *id);
    /* Whether this very event (subject, number, ce_source and ce_id) is
     * parked already. */
    de_err (*dl_has)(de__inbox *ib, const de_event_view *v, bool *has);
    /* The next parked dead letter of a subject: dead letter `first` when
     * it is parked, else in number order (then arrival); *found false
     * when there is none. */
    de_err (*dl_next)(de__inbox *ib, const char *type, const char *id,
                      int64_t first, de__dead_letter *out, bool *found);
    /* Makes a parked dead letter one of another kind (why in error). */
    de_err (*dl_repark)(de__inbox *ib, int64_t id, const char *kind,
                        const char *error);
    /* Events without a sequence: records (ce_source, ce_id) as applied,
     * *claimed false when it was already; or only looks. */
    de_err (*seen_claim)(de__inbox *ib, const de_event_view *v, bool *claimed);
    de_err (*seen)(de__inbox *ib, const de_event_view *v, bool *seen);
    /* Forgets (inside the transaction) up to limit ids seen before
     * before_ms, the oldest first. */
    de_err (*forget_ids)(de__inbox *ib, int64_t before_ms, int limit,
                         int64_t *forgotten);
    /* Marks a dead letter done: "applied", "skipped" or "duplicate" (its
     * number or id was applied meanwhile). */
    de_err (*dl_done)(de__inbox *ib, int64_t id, const char *state);
    /* Counts a failed attempt at a released dead letter. */
    de_err (*dl_fail)(de__inbox *ib, int64_t id, const char *error);
    de_err (*parked_count)(de__inbox *ib, int64_t *n);
    /* Forgets (inside the transaction) subjects last applied before
     * before_ms and not parked, among the next `limit` after where the
     * previous call stopped (starting over at the end). */
    de_err (*forget)(de__inbox *ib, int64_t before_ms, int limit,
                     int64_t *forgotten);
    /* The oldest release or skip asked from outside and not yet done. */
    de_err (*request_next)(de__inbox *ib, de__request *r, bool *found);
    /* Answers request id (inside the transaction) with result. */
    de_err (*request_done)(de__inbox *ib, int64_t id, const char *result);
    /* Deletes (inside the transaction) up to limit dead letters stored
     * before before_ms that no longer park anything (foreign ones, and
     * those applied, skipped or duplicates), the oldest first. */
    de_err (*dl_forget)(de__inbox *ib, int64_t before_ms, int limit,
                        int64_t *forgotten);
    void (*close)(de__inbox *ib);
} de__inbox_ops;

struct de__inbox {
    const de__inbox_ops *ops;
};

/* Readies db (busy timeout, WAL), creates or migrates the consumer's
 * tables and prepares their statements. */
de_err de__inbox_open_sqlite(sqlite3 *db, int64_t busy_ms, de__inbox **out);

/* Any function pointer, as a handler is kept whatever its type. */
typedef void (*de__fnptr)(void);

/* What a consumer needs from the database its handlers write to: how to
 * open its inbox on the connection, and how to call a handler registered
 * with on_fn (fn cast back to the type that function takes, so that the
 * core never sees the database's types). */
typedef struct de__consumer_kind {
    const char *on_fn;      /* "de_consumer_on", "de_consumer_on_pg" */
    const char *on_type_fn; /* "de_consumer_on_type", ..._type_pg */
    de_err (*open_inbox)(void *conn, const de_conf *conf, de__inbox **out);
    de_err (*call)(de__fnptr fn, void *conn, const de_event_view *v, void *ctx);
} de__consumer_kind;

/* Opens a consumer whose handlers write through conn (borrowed, checked
 * by the caller); *out is set to NULL on failure. */
de_err de__consumer_open(void *conn, const de__consumer_kind *kind,
                         const de_conf *conf, de_consumer **out);

/* Registers a handler by subject type and action; who names the public
 * function, which must be c's kind's on_fn (else DE_ERR_ARG). */
de_err de__consumer_on(de_consumer *c, const char *who,
                       const char *subject_type, const char *action,
                       de__fnptr fn, void *ctx);

/* Registers a handler by ce_type; who names the public function, which
 * must be c's kind's on_type_fn (else DE_ERR_ARG). */
de_err de__consumer_on_type(de_consumer *c, const char *who,
                            const char *ce_type, de__fnptr fn, void *ctx);

#endif

/* SPDX-License-Identifier: MIT */
/*
 * source.h -- the outbox as a relay reads it: the seam between the relay's
 * logic and the database that holds the outbox.  Everything the relay does
 * to the host's database goes through these operations; source_sqlite.c
 * implements them for SQLite, and another database implements the same
 * set (see docs/ARCHITECTURE.md).
 *
 * A source is used by one thread (the relay's).
 */
#ifndef DE_SOURCE_H
#define DE_SOURCE_H

#include "internal.h"

typedef struct de__source de__source;

/* Called for each row read; returning DE__AGAIN stops the read before the
 * row (it is read again next time), any other error stops it too and is
 * returned. */
typedef de_err (*de__row_fn)(void *ctx, const de__row *row);

/* Called, where a source can, once with the subjects of the n rows a read
 * is about to hand on (types[i], ids[i]: row i's, valid during the call
 * only), before the first of them: the relay loads their counters in one
 * query instead of one per row.  An error stops the read before any row
 * and is returned. */
typedef de_err (*de__batch_fn)(void *ctx, int n, const char *const *types,
                               const char *const *ids);

typedef struct de__source_ops {
    /* Calls fn for the rows after position `after`, in position (commit)
     * order, at most limit of them; *n receives how many fn took.  Before
     * the first row reaches fn, everything the read can see is made
     * durable (the relay never publishes what a power loss could undo).
     * DE__AGAIN with *n == 0: nothing could be proven complete yet (a
     * writer is still in its commit, PostgreSQL); changed() reports true
     * on the next round, so that the caller reads again then. */
    de_err (*read)(de__source *s, int64_t after, int64_t limit, de__row_fn fn,
                   void *ctx, int64_t *n);
    /* The row at position, if there is one. */
    de_err (*read_one)(de__source *s, int64_t position, de__row_fn fn,
                       void *ctx, bool *found);
    /* The highest position in the outbox (0 when empty). */
    de_err (*max_position)(de__source *s, int64_t *out);
    /* The id of the row at position into buf, or NULL when there is none. */
    const char *(*event_id_at)(de__source *s, int64_t position,
                               char buf[DE__EVENT_ID_MAX + 1]);
    /* Deletes the rows in [from, to] recorded at or before recorded_before
     * (0: any), without waiting for the host's writers (DE__AGAIN when one
     * holds the lock), and raises the deletion floor to the last position
     * deleted (it never goes down).  *upto receives that position (from-1
     * when nothing could go), *deleted the rows deleted. */
    de_err (*delete_range)(de__source *s, int64_t from, int64_t to,
                           int64_t recorded_before, int64_t *upto,
                           int *deleted);
    /* Where published rows were deleted up to (the floor). */
    de_err (*deleted_upto)(de__source *s, int64_t *out);
    /* Whether another connection committed since the last call. */
    bool (*changed)(de__source *s);
    /* The file descriptor that becomes readable when a writer's commit
     * wants the relay (PostgreSQL: the LISTEN connection's socket), for
     * the relay to poll beside its own; -1 when there is none (SQLite).
     * It may change after a reconnection: ask before each wait. */
    int (*wait_fd)(de__source *s);
    /* The relay has read everything and is about to sleep: a source whose
     * writers wake the relay only while it says so (PostgreSQL's
     * conditional NOTIFY) tells them now.  true: the caller must read
     * once more before it sleeps (a commit that came before the
     * announcement sent no wake-up); false: nothing to do (SQLite). */
    bool (*sleep_begin)(de__source *s);
    /* The relay woke for work after sleep_begin (a wake-up, or a read
     * that found rows; a timer that ran out does not end the sleep):
     * writers stop waking it (PostgreSQL: once the next read has lowered
     * the flag), and
     * changed() reports true on its next call -- and again after that
     * lowering -- because commits from then on may send no wake-up. */
    void (*awake)(de__source *s);
    /* The wire setting `key` its writer stored with the outbox (*out: a
     * copy the caller frees, NULL when none is stored). */
    de_err (*stored_setting)(de__source *s, const char *key, char **out);
    /* A warning for the relay's log, once each (NULL: none now; the
     * relay asks after each read until NULL).  May be NULL (SQLite). */
    const char *(*warning)(de__source *s);
    /* Checkpoints the database's log for its writers (WAL). */
    void (*checkpoint_log)(de__source *s);
    void (*close)(de__source *s);
} de__source_ops;

struct de__source {
    const de__source_ops *ops;
    /* The caller's batch hook (NULL: none) and its context, set around a
     * read that wants it; sources that hand rows on one at a time as
     * they step through them (SQLite) never call it. */
    de__batch_fn batch;
    void *batch_ctx;
};

/* Opens the outbox in the SQLite database at path for a relay (its own
 * connection, busy timeout busy_ms), creating the outbox tables if there
 * are none and create is true (else DE_ERR_STATE); *outbox_id receives
 * the outbox's id.  linked: an in-process outbox hands this connection the
 * host's checkpoints. */
de_err de__source_open_sqlite(const char *path, int64_t busy_ms, bool linked,
                              bool create, de__source **out,
                              char outbox_id[37]);

#endif

/* SPDX-License-Identifier: MIT */
/*
 * relay_state.h -- the relay's bookkeeping file (see relay_state.c).
 * Used by one relay thread at a time; not locked.
 */
#ifndef DE_RELAY_STATE_H
#define DE_RELAY_STATE_H

#include "internal.h"

typedef struct de__rstate de__rstate;

/* A subject's numbering: its epoch (0 for numberings begun before epochs
 * existed, else the outbox position of the numbering's first event, so
 * that a later numbering of the subject always has a higher one), its
 * last number, and when the event with that number was recorded. */
typedef struct de__counter {
    int64_t epoch, seq, last_ms;
} de__counter;

/* Opens (creating, with permissions mode) the state at path for the
 * outbox with id outbox_id.  Refuses (DE_ERR_STATE) a path that is a
 * symbolic link, a state of another outbox, and a missing or stale state
 * when the outbox's rows were already deleted up to host_deleted_upto.
 * *cursor receives the durable cursor. */
de_err de__rstate_open(const char *path, unsigned mode, const char *outbox_id,
                       int64_t host_deleted_upto, de__rstate **out,
                       int64_t *cursor);
void de__rstate_close(de__rstate *st);

/* The durable cursor, and the id of the event at that position when the
 * state recorded it ("" when unknown). */
de_err de__rstate_cursor(de__rstate *st, int64_t *cursor, char *event_id,
                         size_t event_id_size);

/* Takes the lease when it is free, expired (no heartbeat for timeout_ms),
 * or already owner's.  holder describes the current holder otherwise. */
de_err de__rstate_lease_acquire(de__rstate *st, const char *owner,
                                int64_t now_ms, int64_t timeout_ms, bool *held,
                                char *holder, size_t holder_size);
/* Expires owner's lease at once so that a standby takes over. */
de_err de__rstate_lease_release(de__rstate *st, const char *owner);

/* Lets the reads that follow (counters, what was found on Kafka) share one
 * read transaction, saving a lock round trip each, until read_end or the
 * next write transaction (begin) ends it.  Only one relay writes the
 * state, so the snapshot is never stale for the reads it serves. */
de_err de__rstate_read_begin(de__rstate *st);
void de__rstate_read_end(de__rstate *st);

/* A checkpoint: begin (renewing the lease; *held false and nothing begun
 * when it is someone else's), put..., commit.  Every commit is durable
 * (fsynced) before it returns. */
de_err de__rstate_begin(de__rstate *st, const char *owner, int64_t now_ms,
                        bool *held);
/* The cursor, with the id of the outbox row at that position (NULL:
 * unknown), so that a database older than its state can be told apart. */
de_err de__rstate_put_cursor(de__rstate *st, int64_t position,
                             const char *event_id);
de_err de__rstate_put_seq(de__rstate *st, const char *type, const char *id,
                          const de__counter *c);
de_err de__rstate_park(de__rstate *st, int64_t position, const char *type,
                       const char *id, int64_t epoch, int64_t seq,
                       const char *error, int64_t since_ms);
de_err de__rstate_unpark(de__rstate *st, int64_t position);
de_err de__rstate_commit(de__rstate *st);
void de__rstate_rollback(de__rstate *st);

/* Forgets (inside begin ... commit) the counters of subjects last
 * numbered before before_ms that hold nothing back, looking at the next
 * `limit` counters after where the previous call stopped (and starting
 * over at the end), so that each call costs little.  A forgotten subject
 * starts a new numbering, with a higher epoch, at its next event. */
de_err de__rstate_forget(de__rstate *st, int64_t before_ms, int limit,
                         int64_t *scanned, int64_t *forgotten);
/* Raises the mark of a partition (offset below which nothing of this
 * outbox above the cursor can be); partition -1 marks a topic that did
 * not exist when the relay first published to it. */
de_err de__rstate_put_mark(de__rstate *st, const char *topic, int32_t partition,
                           int64_t next_offset);
typedef de_err (*de__rstate_mark_fn)(void *ctx, const char *topic,
                                     int32_t partition, int64_t next_offset);
/* Whether the topic has marks: the relay registered it. */
de_err de__rstate_has_marks(de__rstate *st, const char *topic, bool *has);
/* Every mark, by topic and partition. */
de_err de__rstate_marks(de__rstate *st, de__rstate_mark_fn fn, void *ctx);

/* A subject's counter as of the cursor; all zero when it has none. */
de_err de__rstate_get_seq(de__rstate *st, const char *type, const char *id,
                          de__counter *c);

typedef de_err (*de__rstate_subject_fn)(void *ctx, const char *type,
                                        const char *id, int64_t held_back,
                                        int64_t since_ms, const char *error);
typedef de_err (*de__rstate_row_fn)(void *ctx, int64_t position, int64_t epoch,
                                    int64_t seq);

/* Every subject with held-back events. */
de_err de__rstate_parked_subjects(de__rstate *st, de__rstate_subject_fn fn,
                                  void *ctx);
/* One subject's held-back events in position order. */
de_err de__rstate_parked_rows(de__rstate *st, const char *type, const char *id,
                              de__rstate_row_fn fn, void *ctx);
/* The lowest held-back position (0 when none) and how many there are. */
de_err de__rstate_parked_min(de__rstate *st, int64_t *min_position,
                             int64_t *count);

/* What the relay found of this outbox's events on Kafka when it became
 * active (temporary, per connection; see relay_recover.c).  found_add
 * notes an event (the first copy of an id wins) and raises the subject's
 * found number; found_raise (inside begin ... commit) raises the durable
 * counters to those numbers. */
de_err de__rstate_found_clear(de__rstate *st);
de_err de__rstate_found_add(de__rstate *st, const char *event_id,
                            const char *type, const char *id, int64_t epoch,
                            int64_t seq, const char *topic, int32_t partition,
                            int64_t offset);
/* Subjects found count as last numbered at now_ms. */
de_err de__rstate_found_raise(de__rstate *st, int64_t now_ms);
de_err de__rstate_found_count(de__rstate *st, int64_t *landed,
                              int64_t *subjects);
/* Whether event_id was found on Kafka, and where. */
de_err de__rstate_landed_get(de__rstate *st, const char *event_id, bool *found,
                             int64_t *epoch, int64_t *seq, char *topic,
                             size_t topic_size, int32_t *partition,
                             int64_t *offset);
/* The numbers (epoch, seq) an event went out with, and where Kafka stored
 * it (topic NULL, partition or offset -1: unknown), recorded inside
 * begin ... commit -- in the checkpoint that moves the cursor past it --
 * while the outbox retains its row (outbox.retention.ms > 0), so that a
 * replay can republish it with them.  forget_published (inside begin ...
 * commit) drops those of positions up to upto, deleted from the outbox,
 * so that they last as long as the rows. */
de_err de__rstate_put_published(de__rstate *st, int64_t position, int64_t epoch,
                                int64_t seq, const char *topic,
                                int32_t partition, int64_t offset);
de_err de__rstate_forget_published(de__rstate *st, int64_t upto,
                                   int64_t *forgotten);

/* Opens an existing state to read what the relay published, for a replay
 * beside a running relay: never created, migrated or written (its lease,
 * cursor and counters stay the relay's).  Refuses (DE_ERR_STATE) a
 * missing file, another outbox's state and a newer one.  Only
 * de__rstate_cursor, read_begin/read_end, published_get and parked_at may
 * be called on it. */
de_err de__rstate_open_reader(const char *path, const char *outbox_id,
                              de__rstate **out);
/* The numbers recorded for position (*found false when none: published
 * before they were recorded, or with outbox.retention.ms 0). */
de_err de__rstate_published_get(de__rstate *st, int64_t position, bool *found,
                                int64_t *epoch, int64_t *seq);
/* Whether the event at position is held back behind a blocked subject. */
de_err de__rstate_parked_at(de__rstate *st, int64_t position, bool *parked);

/* The state's connection, for transactions around found_add batches. */
sqlite3 *de__rstate_db(de__rstate *st);

#endif

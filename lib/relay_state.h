/* SPDX-License-Identifier: MIT */
/*
 * relay_state.h -- the relay's bookkeeping: its cursor, counters, marks,
 * held-back events and lease, behind a seam of operations (de__rstate_ops)
 * so that it can live where the outbox does: a SQLite file of its own
 * (relay_state.c) or tables in the outbox's PostgreSQL database
 * (lib/pg/relay_state_pg.c).  The de__rstate_* functions below dispatch
 * to the store's operations and keep the relay's call sites unchanged.
 * A handle is used by one relay thread at a time; not locked.
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

/* Callbacks of the iterating operations below. */
typedef de_err (*de__rstate_mark_fn)(void *ctx, const char *topic,
                                     int32_t partition, int64_t next_offset);
typedef de_err (*de__rstate_subject_fn)(void *ctx, const char *type,
                                        const char *id, int64_t held_back,
                                        int64_t since_ms, const char *error);
typedef de_err (*de__rstate_row_fn)(void *ctx, int64_t position, int64_t epoch,
                                    int64_t seq);

/* The operations a store of the relay's state implements: SQLite
 * (relay_state.c) and PostgreSQL (lib/pg/relay_state_pg.c).  The
 * de__rstate_* functions below call them and say what each does. */
typedef struct de__rstate_ops {
    void (*close)(de__rstate *st);
    de_err (*cursor)(de__rstate *st, int64_t *cursor, char *event_id,
                     size_t event_id_size);
    de_err (*lease_acquire)(de__rstate *st, const char *owner, int64_t now_ms,
                            int64_t timeout_ms, bool *held, char *holder,
                            size_t holder_size);
    de_err (*lease_release)(de__rstate *st, const char *owner);
    de_err (*read_begin)(de__rstate *st);
    void (*read_end)(de__rstate *st);
    de_err (*begin)(de__rstate *st, const char *owner, int64_t now_ms,
                    bool *held);
    de_err (*put_cursor)(de__rstate *st, int64_t position,
                         const char *event_id);
    de_err (*put_seq)(de__rstate *st, const char *type, const char *id,
                      const de__counter *c);
    de_err (*park)(de__rstate *st, int64_t position, const char *type,
                   const char *id, int64_t epoch, int64_t seq,
                   const char *error, int64_t since_ms);
    de_err (*unpark)(de__rstate *st, int64_t position);
    de_err (*commit)(de__rstate *st);
    void (*rollback)(de__rstate *st);
    de_err (*forget)(de__rstate *st, int64_t before_ms, int limit,
                     int64_t *scanned, int64_t *forgotten);
    de_err (*put_mark)(de__rstate *st, const char *topic, int32_t partition,
                       int64_t next_offset);
    de_err (*has_marks)(de__rstate *st, const char *topic, bool *has);
    de_err (*marks)(de__rstate *st, de__rstate_mark_fn fn, void *ctx);
    de_err (*get_seq)(de__rstate *st, const char *type, const char *id,
                      de__counter *c);
    /* get_seq for n subjects at once, into c[0..n-1] (may be NULL: one
     * get_seq each). */
    de_err (*get_seqs)(de__rstate *st, int n, const char *const *types,
                       const char *const *ids, de__counter *c);
    de_err (*parked_subjects)(de__rstate *st, de__rstate_subject_fn fn,
                              void *ctx);
    de_err (*parked_rows)(de__rstate *st, const char *type, const char *id,
                          de__rstate_row_fn fn, void *ctx);
    de_err (*parked_min)(de__rstate *st, int64_t *min_position, int64_t *count);
    de_err (*found_clear)(de__rstate *st);
    de_err (*found_add)(de__rstate *st, const char *event_id, const char *type,
                        const char *id, int64_t epoch, int64_t seq,
                        const char *topic, int32_t partition, int64_t offset);
    de_err (*found_raise)(de__rstate *st, int64_t now_ms);
    de_err (*found_count)(de__rstate *st, int64_t *landed, int64_t *subjects);
    de_err (*landed_get)(de__rstate *st, const char *event_id, bool *found,
                         int64_t *epoch, int64_t *seq, char *topic,
                         size_t topic_size, int32_t *partition,
                         int64_t *offset);
    de_err (*put_published)(de__rstate *st, int64_t position, int64_t epoch,
                            int64_t seq, const char *topic, int32_t partition,
                            int64_t offset);
    de_err (*forget_published)(de__rstate *st, int64_t upto,
                               int64_t *forgotten);
    de_err (*published_get)(de__rstate *st, int64_t position, bool *found,
                            int64_t *epoch, int64_t *seq);
    de_err (*parked_at)(de__rstate *st, int64_t position, bool *parked);
    de_err (*batch_begin)(de__rstate *st);
    de_err (*batch_commit)(de__rstate *st);
} de__rstate_ops;

/* Every store's handle starts with this. */
struct de__rstate {
    const de__rstate_ops *ops;
};

/* Opens (creating, with permissions mode) the state at path for the
 * outbox with id outbox_id.  Refuses (DE_ERR_STATE) a path that is a
 * symbolic link, a state of another outbox, and a missing or stale state
 * when the outbox's rows were already deleted up to host_deleted_upto.
 * *cursor receives the durable cursor. */
de_err de__rstate_open(const char *path, unsigned mode, const char *outbox_id,
                       int64_t host_deleted_upto, de__rstate **out,
                       int64_t *cursor);
static inline void de__rstate_close(de__rstate *st)
{
    if (st != NULL)
        st->ops->close(st);
}

/* The durable cursor, and the id of the event at that position when the
 * state recorded it ("" when unknown). */
static inline de_err de__rstate_cursor(de__rstate *st, int64_t *cursor,
                                       char *event_id, size_t event_id_size)
{
    return st->ops->cursor(st, cursor, event_id, event_id_size);
}

/* Takes the lease when it is free, expired (no heartbeat for timeout_ms),
 * or already owner's.  holder describes the current holder otherwise.
 * now_ms is the caller's clock; a store shared by several hosts
 * (PostgreSQL) uses its server's instead, here and in begin. */
static inline de_err de__rstate_lease_acquire(de__rstate *st, const char *owner,
                                              int64_t now_ms,
                                              int64_t timeout_ms, bool *held,
                                              char *holder, size_t holder_size)
{
    return st->ops->lease_acquire(st, owner, now_ms, timeout_ms, held, holder,
                                  holder_size);
}
/* Expires owner's lease at once so that a standby takes over. */
static inline de_err de__rstate_lease_release(de__rstate *st, const char *owner)
{
    return st->ops->lease_release(st, owner);
}

/* Lets the reads that follow (counters, what was found on Kafka) share one
 * read transaction, saving a lock round trip each, until read_end or the
 * next write transaction (begin) ends it.  Only one relay writes the
 * state, so the snapshot is never stale for the reads it serves. */
static inline de_err de__rstate_read_begin(de__rstate *st)
{
    return st->ops->read_begin(st);
}
static inline void de__rstate_read_end(de__rstate *st)
{
    st->ops->read_end(st);
}

/* A checkpoint: begin (renewing the lease; *held false and nothing begun
 * when it is someone else's), put..., commit.  Every commit is durable
 * (fsynced) before it returns. */
static inline de_err de__rstate_begin(de__rstate *st, const char *owner,
                                      int64_t now_ms, bool *held)
{
    return st->ops->begin(st, owner, now_ms, held);
}
/* The cursor, with the id of the outbox row at that position (NULL:
 * unknown), so that a database older than its state can be told apart. */
static inline de_err de__rstate_put_cursor(de__rstate *st, int64_t position,
                                           const char *event_id)
{
    return st->ops->put_cursor(st, position, event_id);
}
static inline de_err de__rstate_put_seq(de__rstate *st, const char *type,
                                        const char *id, const de__counter *c)
{
    return st->ops->put_seq(st, type, id, c);
}
static inline de_err de__rstate_park(de__rstate *st, int64_t position,
                                     const char *type, const char *id,
                                     int64_t epoch, int64_t seq,
                                     const char *error, int64_t since_ms)
{
    return st->ops->park(st, position, type, id, epoch, seq, error, since_ms);
}
static inline de_err de__rstate_unpark(de__rstate *st, int64_t position)
{
    return st->ops->unpark(st, position);
}
static inline de_err de__rstate_commit(de__rstate *st)
{
    return st->ops->commit(st);
}
static inline void de__rstate_rollback(de__rstate *st)
{
    st->ops->rollback(st);
}

/* Forgets (inside begin ... commit) the counters of subjects last
 * numbered before before_ms that hold nothing back, looking at the next
 * `limit` counters after where the previous call stopped (and starting
 * over at the end), so that each call costs little.  A forgotten subject
 * starts a new numbering, with a higher epoch, at its next event. */
static inline de_err de__rstate_forget(de__rstate *st, int64_t before_ms,
                                       int limit, int64_t *scanned,
                                       int64_t *forgotten)
{
    return st->ops->forget(st, before_ms, limit, scanned, forgotten);
}
/* Raises the mark of a partition (offset below which nothing of this
 * outbox above the cursor can be); partition -1 marks a topic that did
 * not exist when the relay first published to it. */
static inline de_err de__rstate_put_mark(de__rstate *st, const char *topic,
                                         int32_t partition, int64_t next_offset)
{
    return st->ops->put_mark(st, topic, partition, next_offset);
}
/* Whether the topic has marks: the relay registered it. */
static inline de_err de__rstate_has_marks(de__rstate *st, const char *topic,
                                          bool *has)
{
    return st->ops->has_marks(st, topic, has);
}
/* Every mark, by topic and partition. */
static inline de_err de__rstate_marks(de__rstate *st, de__rstate_mark_fn fn,
                                      void *ctx)
{
    return st->ops->marks(st, fn, ctx);
}

/* A subject's counter as of the cursor; all zero when it has none. */
static inline de_err de__rstate_get_seq(de__rstate *st, const char *type,
                                        const char *id, de__counter *c)
{
    return st->ops->get_seq(st, type, id, c);
}

/* de__rstate_get_seq for n subjects, in one query where the store can. */
static inline de_err de__rstate_get_seqs(de__rstate *st, int n,
                                         const char *const *types,
                                         const char *const *ids, de__counter *c)
{
    de_err err = DE_OK;

    if (st->ops->get_seqs != NULL)
        return st->ops->get_seqs(st, n, types, ids, c);
    for (int i = 0; i < n && err == DE_OK; i++)
        err = st->ops->get_seq(st, types[i], ids[i], &c[i]);
    return err;
}

/* Every subject with held-back events. */
static inline de_err
de__rstate_parked_subjects(de__rstate *st, de__rstate_subject_fn fn, void *ctx)
{
    return st->ops->parked_subjects(st, fn, ctx);
}
/* One subject's held-back events in position order. */
static inline de_err de__rstate_parked_rows(de__rstate *st, const char *type,
                                            const char *id,
                                            de__rstate_row_fn fn, void *ctx)
{
    return st->ops->parked_rows(st, type, id, fn, ctx);
}
/* The lowest held-back position (0 when none) and how many there are. */
static inline de_err
de__rstate_parked_min(de__rstate *st, int64_t *min_position, int64_t *count)
{
    return st->ops->parked_min(st, min_position, count);
}

/* What the relay found of this outbox's events on Kafka when it became
 * active (temporary, per connection; see relay_recover.c).  found_add
 * notes an event (the first copy of an id wins) and raises the subject's
 * found number; found_raise (inside begin ... commit) raises the durable
 * counters to those numbers. */
static inline de_err de__rstate_found_clear(de__rstate *st)
{
    return st->ops->found_clear(st);
}
static inline de_err de__rstate_found_add(de__rstate *st, const char *event_id,
                                          const char *type, const char *id,
                                          int64_t epoch, int64_t seq,
                                          const char *topic, int32_t partition,
                                          int64_t offset)
{
    return st->ops->found_add(st, event_id, type, id, epoch, seq, topic,
                              partition, offset);
}
/* Subjects found count as last numbered at now_ms. */
static inline de_err de__rstate_found_raise(de__rstate *st, int64_t now_ms)
{
    return st->ops->found_raise(st, now_ms);
}
static inline de_err de__rstate_found_count(de__rstate *st, int64_t *landed,
                                            int64_t *subjects)
{
    return st->ops->found_count(st, landed, subjects);
}
/* Whether event_id was found on Kafka, and where. */
static inline de_err de__rstate_landed_get(de__rstate *st, const char *event_id,
                                           bool *found, int64_t *epoch,
                                           int64_t *seq, char *topic,
                                           size_t topic_size,
                                           int32_t *partition, int64_t *offset)
{
    return st->ops->landed_get(st, event_id, found, epoch, seq, topic,
                               topic_size, partition, offset);
}
/* The numbers (epoch, seq) an event went out with, and where Kafka stored
 * it (topic NULL, partition or offset -1: unknown), recorded inside
 * begin ... commit -- in the checkpoint that moves the cursor past it --
 * while the outbox retains its row (outbox.retention.ms > 0), so that a
 * replay can republish it with them.  forget_published (inside begin ...
 * commit) drops those of positions up to upto, deleted from the outbox,
 * so that they last as long as the rows. */
static inline de_err de__rstate_put_published(de__rstate *st, int64_t position,
                                              int64_t epoch, int64_t seq,
                                              const char *topic,
                                              int32_t partition, int64_t offset)
{
    return st->ops->put_published(st, position, epoch, seq, topic, partition,
                                  offset);
}
static inline de_err de__rstate_forget_published(de__rstate *st, int64_t upto,
                                                 int64_t *forgotten)
{
    return st->ops->forget_published(st, upto, forgotten);
}

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
static inline de_err de__rstate_published_get(de__rstate *st, int64_t position,
                                              bool *found, int64_t *epoch,
                                              int64_t *seq)
{
    return st->ops->published_get(st, position, found, epoch, seq);
}
/* Whether the event at position is held back behind a blocked subject. */
static inline de_err de__rstate_parked_at(de__rstate *st, int64_t position,
                                          bool *parked)
{
    return st->ops->parked_at(st, position, parked);
}

/* A transaction around a batch of found_add calls (relay_recover.c), so
 * that noting many events costs one commit. */
static inline de_err de__rstate_batch_begin(de__rstate *st)
{
    return st->ops->batch_begin(st);
}
static inline de_err de__rstate_batch_commit(de__rstate *st)
{
    return st->ops->batch_commit(st);
}

#endif

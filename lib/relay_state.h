/* SPDX-License-Identifier: MIT */
/*
 * relay_state.h -- the relay's bookkeeping file (see relay_state.c).
 * Used by one relay thread at a time; not locked.
 */
#ifndef DE_RELAY_STATE_H
#define DE_RELAY_STATE_H

#include "internal.h"

typedef struct de__rstate de__rstate;

/* Opens (creating) the state at path for the outbox with id outbox_id.
 * Refuses (DE_ERR_STATE) a state of another outbox, and a missing or
 * stale state when the outbox's rows were already deleted up to
 * host_deleted_upto.  *cursor receives the durable cursor. */
de_err de__rstate_open(const char *path, const char *outbox_id,
                       int64_t host_deleted_upto, de__rstate **out,
                       int64_t *cursor);
void de__rstate_close(de__rstate *st);

de_err de__rstate_cursor(de__rstate *st, int64_t *cursor);

/* Takes the lease when it is free, expired (no heartbeat for timeout_ms),
 * or already owner's.  holder describes the current holder otherwise. */
de_err de__rstate_lease_acquire(de__rstate *st, const char *owner,
                                int64_t now_ms, int64_t timeout_ms, bool *held,
                                char *holder, size_t holder_size);
/* Expires owner's lease at once so that a standby takes over. */
de_err de__rstate_lease_release(de__rstate *st, const char *owner);

/* A checkpoint: begin (renewing the lease; *held false and nothing begun
 * when it is someone else's), put..., commit (durable = fsync). */
de_err de__rstate_begin(de__rstate *st, const char *owner, int64_t now_ms,
                        bool *held);
de_err de__rstate_put_cursor(de__rstate *st, int64_t position);
de_err de__rstate_put_seq(de__rstate *st, const char *type, const char *id,
                          int64_t seq);
de_err de__rstate_park(de__rstate *st, int64_t position, const char *type,
                       const char *id, int64_t seq, const char *error,
                       int64_t since_ms);
de_err de__rstate_unpark(de__rstate *st, int64_t position);
de_err de__rstate_commit(de__rstate *st, bool durable);
void de__rstate_rollback(de__rstate *st);

/* The last sequence number given to a subject as of the cursor; 0 when it
 * has none. */
de_err de__rstate_get_seq(de__rstate *st, const char *type, const char *id,
                          int64_t *seq);

typedef de_err (*de__rstate_subject_fn)(void *ctx, const char *type,
                                        const char *id, int64_t held_back,
                                        int64_t since_ms, const char *error);
typedef de_err (*de__rstate_row_fn)(void *ctx, int64_t position, int64_t seq);

/* Every subject with held-back events. */
de_err de__rstate_parked_subjects(de__rstate *st, de__rstate_subject_fn fn,
                                  void *ctx);
/* One subject's held-back events in position order. */
de_err de__rstate_parked_rows(de__rstate *st, const char *type, const char *id,
                              de__rstate_row_fn fn, void *ctx);
/* The lowest held-back position (0 when none) and how many there are. */
de_err de__rstate_parked_min(de__rstate *st, int64_t *min_position,
                             int64_t *count);

#endif

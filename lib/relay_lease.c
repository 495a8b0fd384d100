/* SPDX-License-Identifier: MIT */
/*
 * relay_lease.c -- the relay's checkpoints and its lease: writing the
 * watermark, the counters behind it, the held-back events and the marks
 * to the state file (renewing the lease in the same transaction), taking
 * the lease and becoming active, giving it up, and deleting published
 * rows below the cursor on disk.
 *
 * Invariants: a checkpoint writes done_pos only with the counters and
 * marks that describe it, in one transaction that also checks the lease;
 * durable_pos moves only after that transaction is on disk; cleanup
 * deletes only below durable_pos and below the first held-back row.
 */
#include "relay_int.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Rows deleted from the outbox per transaction: the longest the host's
 * writers wait for one is the time to delete these (about a
 * millisecond). */
#define CLEANUP_CHUNK 1000
/* Time one cleanup round may take. */
#define CLEANUP_BUDGET_US 20000
/* Counters looked at per round when forgetting idle subjects. */
#define FORGET_SLICE 2000

/*
 * The row at the cursor is never deleted (cleanup stops below it), so it
 * is there, with the id the state recorded, unless the database went back
 * in time -- restored from a backup, or copied, without its relay state
 * (SQLite: the state file beside it; PostgreSQL: the relay_* tables of
 * the same database, which a whole-database restore carries along, so
 * only a partial restore gets here).  New rows then reuse positions at
 * or below the cursor, and the relay could not tell them from the ones
 * it published: it refuses, saying what to restore.
 */
de_err de__relay_check_cursor(de_relay *r, int64_t cursor, const char *id)
{
    char buf[DE__EVENT_ID_MAX + 1];
    const char *there, *what;

    if (cursor == 0 || id[0] == '\0')
        return DE_OK;
    there = r->src->ops->event_id_at(r->src, cursor, buf);
    if (there != NULL && strcmp(there, id) == 0)
        return DE_OK;
    what = there ? "not there any more (another event has its position)"
                 : "not there any more";
    if (r->state_in_db)
        return de__fail(DE_ERR_STATE,
                        "%s is older than its relay state (%s): the event "
                        "%s the relay published at position %lld is %s. The "
                        "outbox's tables were restored from a backup (or "
                        "copied) without the relay's tables of the same "
                        "backup; restore schema deliveryevents as a whole, "
                        "from one dump (see docs/POSTGRESQL.md, \"Backups "
                        "and restores\")",
                        r->db_path, r->state_path, id, (long long)cursor, what);
    return de__fail(DE_ERR_STATE,
                    "database '%s' is older than its relay state '%s': the "
                    "event %s the relay published at position %lld is %s. "
                    "The database was restored from a backup (or copied) "
                    "without its state file; restore the state file of the "
                    "same backup beside it (see docs/OPERATIONS.md, "
                    "\"Backups and restores\")",
                    r->db_path, r->state_path, id, (long long)cursor, what);
}

/* Writes the watermark, the counters behind it and the held-back events,
 * renewing the lease in the same transaction.  Sets r->lease_lost when
 * another relay holds the lease. */
/* Writes a subject's number at the watermark. */
static de_err put_counter(de_relay *r, const de__subj *s)
{
    de__counter c = {s->acked_epoch, s->acked, s->acked_ms};

    return de__rstate_put_seq(r->st, DE__SUBJ_TYPE(s), DE__SUBJ_ID(s), &c);
}

static void counter_written(de__subj *s)
{
    s->persisted = s->acked;
    s->persisted_epoch = s->acked_epoch;
    s->dirty = false;
}

de_err de__relay_checkpoint(de_relay *r)
{
    int64_t now = de__now_ms(), began = de__mono_ms();
    char id[DE__EVENT_ID_MAX + 1];
    bool held;
    de_err err;
    size_t i;

    if ((err = de__rstate_begin(r->st, r->owner, now, &held)) != DE_OK)
        return err;
    if (!held) {
        r->lease_lost = true;
        return DE_OK;
    }
    if (r->dirty_pos &&
        (err = de__rstate_put_cursor(
             r->st, r->done_pos,
             r->src->ops->event_id_at(r->src, r->done_pos, id))) != DE_OK)
        goto fail;
    for (i = 0; i < r->dirty.n; i++)
        if ((err = put_counter(r, r->dirty.v[i])) != DE_OK)
            goto fail;
    /* Marks that did not fit in the list: the whole table. */
    for (size_t b = 0; r->dirty_overflow && b < r->nbuckets; b++)
        for (de__subj *s = r->buckets[b]; s != NULL; s = s->hnext)
            if (s->dirty && (err = put_counter(r, s)) != DE_OK)
                goto fail;
    for (i = 0; i < r->parks.n; i++) {
        de__park *p = &r->parks.v[i];
        if ((err = de__rstate_park(r->st, p->position, DE__SUBJ_TYPE(p->s),
                                   DE__SUBJ_ID(p->s), p->epoch, p->seq,
                                   p->s->error ? p->s->error : "", now)) !=
            DE_OK)
            goto fail;
    }
    for (i = 0; i < r->unparks.n; i++)
        if ((err = de__rstate_unpark(r->st, r->unparks.v[i])) != DE_OK)
            goto fail;
    /* The numbers of what went out, with the cursor that passes them. */
    for (i = 0; i < r->sent.n; i++) {
        de__sent *e = &r->sent.v[i];
        if ((err = de__rstate_put_published(
                 r->st, e->position, e->epoch, e->seq,
                 e->topic < r->topics.n ? r->topics.v[e->topic].name : NULL,
                 e->partition, e->offset)) != DE_OK)
            goto fail;
    }
    /* Where each partition stands: everything above the cursor is past
     * these offsets (only events at or below the watermark moved them). */
    for (i = 0; i < r->topics.n; i++) {
        de__topic *t = &r->topics.v[i];
        for (int32_t p = 0; p < t->nparts; p++)
            if (t->seen[p] > t->marked[p] &&
                (err = de__rstate_put_mark(r->st, t->name, p, t->seen[p])) !=
                    DE_OK)
                goto fail;
    }
    if ((err = de__rstate_commit(r->st)) != DE_OK)
        return err;
    for (i = 0; i < r->topics.n; i++) {
        de__topic *t = &r->topics.v[i];
        for (int32_t p = 0; p < t->nparts; p++)
            if (t->seen[p] > t->marked[p])
                t->marked[p] = t->seen[p];
    }
    for (i = 0; i < r->dirty.n; i++)
        counter_written(r->dirty.v[i]);
    for (size_t b = 0; r->dirty_overflow && b < r->nbuckets; b++)
        for (de__subj *s = r->buckets[b]; s != NULL; s = s->hnext)
            if (s->dirty)
                counter_written(s);
    r->dirty.n = 0;
    r->dirty_overflow = false;
    r->sent.n = 0;
    if (r->parks.n || r->unparks.n) {
        int64_t cnt;
        r->parks.n = 0;
        r->unparks.n = 0;
        if (de__rstate_parked_min(r->st, &r->parked_min, &cnt) == DE_OK)
            r->held_back = cnt;
    }
    assert(r->done_pos >= r->durable_pos || !r->dirty_pos);
    r->durable_pos = r->done_pos;
    r->dirty_pos = false;
    r->last_beat_ms = began;
    r->next_beat_us = de__mono_us() + r->lease_ms * 1000 / 5;
    r->next_ckpt_us = de__mono_us() + r->ckpt_ms * 1000;
    return DE_OK;
fail:
    de__rstate_rollback(r->st);
    return err;
}

void de__relay_maybe_checkpoint(de_relay *r, int64_t now_us)
{
    bool due = (r->dirty_pos || r->dirty.n || r->dirty_overflow || r->parks.n ||
                r->unparks.n) &&
               now_us >= r->next_ckpt_us;

    if (!due && now_us < r->next_beat_us)
        return;
    if (de__relay_checkpoint(r) != DE_OK) {
        de__rlog(r, DE_LOG_WARNING, "checkpoint failed: %s (will retry)",
                 de_errmsg());
        r->next_ckpt_us = now_us + 100000;
    }
}

/*
 * Deletes published rows in small transactions that wait only briefly for
 * the host's write lock (if the host keeps it, try again soon), for at
 * most CLEANUP_BUDGET_US, whatever is in flight: the outbox stays bounded
 * by the relay's lag under sustained writes.  Only rows below the cursor
 * on disk are deleted, the row at the cursor is kept (so the next rowid
 * stays above it), and nothing at or above the first held-back event.
 * outbox.retention.ms keeps rows that young.  *behind: rows that could go
 * are left.
 */
de_err de__relay_cleanup(de_relay *r, bool *behind)
{
    int64_t bound = r->durable_pos - 1, hi, upto;
    int64_t start = de__mono_us();
    bool aged = false;
    de_err err = DE_OK;
    int n;

    if (r->parked_min > 0 && r->parked_min - 1 < bound)
        bound = r->parked_min - 1;
    while (bound > r->deleted_upto &&
           de__mono_us() - start < CLEANUP_BUDGET_US) {
        hi = bound;
        if (hi > r->deleted_upto + CLEANUP_CHUNK)
            hi = r->deleted_upto + CLEANUP_CHUNK;
        /* The cursor these deletions rely on is on disk (every
         * checkpoint is fsynced before durable_pos moves): once the rows
         * are gone it could not be rebuilt. */
        assert(hi < r->durable_pos && hi > r->deleted_upto);
        err = r->src->ops->delete_range(
            r->src, r->deleted_upto + 1, hi,
            r->retention_ms > 0 ? de__now_ms() - r->retention_ms : 0, &upto,
            &n);
        if (err != DE_OK)
            break;
        r->deleted += (uint64_t)n;
        if (upto <= r->deleted_upto) {
            aged = true; /* nothing old enough yet */
            break;
        }
        r->deleted_upto = upto;
    }
    *behind = !aged && bound > r->deleted_upto;
    return err == DE__AGAIN ? DE_OK : err;
}

/* Forgets, a slice at a time, the counters of subjects idle for longer
 * than relay.subject.forget.ms (their next event starts a new numbering
 * anyway), and the recorded numbers of the rows cleanup deleted (so that
 * they last as long as the rows: the state stays bounded), in a
 * transaction that checks the lease.  With outbox.retention.ms 0 nothing
 * is recorded: the numbers are swept once after activation, for what an
 * earlier relay with retention left.
 *
 * "Idle" is measured from the oldest event in flight, not from the wall
 * clock: a relay behind its outbox (after an outage, a takeover) still
 * has to number events recorded long ago, and a counter forgotten before
 * its subject's next event was read would start a new numbering that the
 * recording times do not call for -- and that a relay reading the same
 * rows with the counter still in memory would not start. */
de_err de__relay_forget(de_relay *r)
{
    int64_t now = de__now_ms(), began = de__mono_ms(), horizon = now;
    int64_t scanned, forgotten, dropped;
    bool numbers = r->deleted_upto > r->sent_forgotten_upto &&
                   (r->retention_ms > 0 || r->sent_forgotten_upto == 0);
    bool held;
    de_err err;

    if (r->forget_ms <= 0 && !numbers)
        return DE_OK;
    if (r->count > 0 && de__ring_at(r, r->head_tag)->recorded_at_ms < horizon)
        horizon = de__ring_at(r, r->head_tag)->recorded_at_ms;
    if ((err = de__rstate_begin(r->st, r->owner, now, &held)) != DE_OK)
        return err;
    if (!held) {
        r->lease_lost = true;
        return DE_OK;
    }
    scanned = forgotten = 0;
    if ((r->forget_ms > 0 &&
         (err = de__rstate_forget(r->st, horizon - r->forget_ms, FORGET_SLICE,
                                  &scanned, &forgotten)) != DE_OK) ||
        (numbers && (err = de__rstate_forget_published(r->st, r->deleted_upto,
                                                       &dropped)) != DE_OK) ||
        (err = de__rstate_commit(r->st)) != DE_OK) {
        de__rstate_rollback(r->st);
        return err;
    }
    r->forgotten += (uint64_t)forgotten;
    if (numbers)
        r->sent_forgotten_upto = r->deleted_upto;
    /* It renewed the lease: the next heartbeat is due a fifth of the
     * lease from now, not as well (an idle relay commits once per round,
     * not twice). */
    r->last_beat_ms = began;
    r->next_beat_us = de__mono_us() + r->lease_ms * 1000 / 5;
    return DE_OK;
}

struct load_ctx {
    de_relay *r;
    int64_t held_back;
};

static de_err load_blocked(void *arg, const char *type, const char *id,
                           int64_t held_back, int64_t since_ms,
                           const char *error)
{
    struct load_ctx *c = arg;
    de__subj *s = de__subj_get(c->r, type, id, strlen(id));

    (void)since_ms;
    if (s == NULL)
        return DE_ERR_NOMEM;
    s->blocked = true;
    s->blocked_from = INT64_MAX;
    free(s->error);
    s->error = strdup(error);
    s->retry_at_ms = de__mono_ms() + c->r->retry_ms;
    if (!s->in_blocked_list) {
        if (!DE__VEC_PUSH(c->r->blocked, s))
            return de__fail(DE_ERR_NOMEM, "relay: out of memory");
        s->in_blocked_list = true;
    }
    c->held_back += held_back;
    return DE_OK;
}

struct first_ctx {
    int64_t first;
};

static de_err first_parked(void *arg, int64_t position, int64_t epoch,
                           int64_t seq)
{
    struct first_ctx *c = arg;

    (void)epoch;
    (void)seq;
    if (c->first == 0)
        c->first = position;
    return DE_OK;
}

static bool recovery_cancelled(void *arg)
{
    return de__relay_stop_due(arg);
}

/* Reads Kafka forward from the marks (relay_recover.c) before the relay
 * publishes anything: events already there are not sent again, and
 * numbering continues above what is there. */
static de_err recover(de_relay *r, bool *lost)
{
    de__recover_opts o;
    de__recover_result res;
    de_err err;

    memset(&o, 0, sizeof o);
    o.conf = r->conf;
    o.source = r->source;
    o.owner = r->owner;
    o.lease_ms = r->lease_ms;
    o.continue_unverifiable = r->continue_unverifiable;
    o.cancelled = recovery_cancelled;
    o.cancel_ctx = r;
    *lost = false;
    r->landed = 0;
    if ((err = r->src->ops->max_position(r->src, &r->recover_upto)) != DE_OK ||
        (err = de__relay_recover(r->st, &o, &res)) != DE_OK)
        return err;
    if (res.lease_lost) {
        *lost = true;
        return DE_OK;
    }
    /* Reading may take longer than the lease: it was renewed meanwhile. */
    if (res.beat_ms > r->last_beat_ms)
        r->last_beat_ms = res.beat_ms;
    r->landed = res.landed;
    if (res.partitions > 0)
        de__rlog(
            r, DE_LOG_NOTICE,
            "read %lld records from %d partitions in %lld ms (%.0f/s) "
            "since the last checkpoint: %lld events of this outbox, %lld "
            "subjects' numbering raised to Kafka's%s",
            (long long)res.records, res.partitions, (long long)res.elapsed_ms,
            res.elapsed_ms > 0 ? res.records * 1000.0 / res.elapsed_ms
                               : (double)res.records,
            (long long)res.landed, (long long)res.subjects,
            res.unverified ? " (some partitions could not be verified)" : "");
    return DE_OK;
}

/* Loads the durable state after taking the lease.  *lost: the lease went
 * to another relay meanwhile. */
static de_err activate(de_relay *r, bool *lost)
{
    struct load_ctx lc = {r, 0};
    int64_t cursor, cnt;
    char cid[DE__EVENT_ID_MAX + 1];
    de_err err;

    de__subj_sweep(r, true);
    r->dirty.n = r->blocked.n = r->parks.n = r->unparks.n = r->replays.n = 0;
    r->sent.n = 0;
    r->sent_forgotten_upto = 0;
    for (size_t i = 0; i < r->topics.n; i++) {
        de__topic *t = &r->topics.v[i];
        /* Another relay may have registered topics meanwhile. */
        t->registered = false;
        for (int32_t p = 0; p < t->nparts; p++)
            t->seen[p] = t->marked[p] = 0;
    }
    if ((err = recover(r, lost)) != DE_OK || *lost)
        return err;
    if ((err = de__rstate_cursor(r->st, &cursor, cid, sizeof cid)) != DE_OK ||
        (err = de__relay_check_cursor(r, cursor, cid)) != DE_OK)
        return err;
    r->done_pos = r->read_pos = r->durable_pos = cursor;
    if ((err = r->src->ops->deleted_upto(r->src, &r->deleted_upto)) != DE_OK)
        return err;
    r->head_tag += (uint64_t)r->count;
    r->count = 0;
    if ((err = de__rstate_parked_subjects(r->st, load_blocked, &lc)) != DE_OK)
        return err;
    for (size_t i = 0; i < r->blocked.n; i++) {
        struct first_ctx fc = {0};
        de__subj *s = r->blocked.v[i];
        if ((err = de__rstate_parked_rows(r->st, DE__SUBJ_TYPE(s),
                                          DE__SUBJ_ID(s), first_parked, &fc)) !=
            DE_OK)
            return err;
        s->blocked_from = fc.first;
    }
    if ((err = de__rstate_parked_min(r->st, &r->parked_min, &cnt)) != DE_OK)
        return err;
    r->held_back = cnt;
    r->woken = true;
    r->lease_lost = false;
    r->need_restart = false;
    r->next_cleanup_us = de__mono_us();
    r->next_mark_refresh_us = r->next_cleanup_us;
    r->next_ckpt_us = r->next_cleanup_us + r->ckpt_ms * 1000;
    de__rlog(r, DE_LOG_NOTICE,
             "publishing from position %lld, %lld events held back behind "
             "%zu blocked subjects",
             (long long)cursor + 1, (long long)cnt, r->blocked.n);
    de__relay_set_state(r, DE_RELAY_ACTIVE, "lease taken, Kafka read");
    return DE_OK;
}

bool de__relay_lease_expired(de_relay *r)
{
    if (!r->lease_lost && r->last_beat_ms &&
        de__mono_ms() - r->last_beat_ms >= r->lease_ms - r->lease_ms / 10)
        r->lease_lost = true;
    return r->lease_lost;
}

/* Gives up publishing at once: purges the producer and forgets what was
 * in flight (the next holder replays it from the durable cursor). */
void de__relay_demote(de_relay *r, const char *why)
{
    de__relay_set_state(r, DE_RELAY_STANDBY, why);
    if (r->rk != NULL)
        de__relay_purge(r);
    for (int64_t i = 0; i < r->count; i++)
        de__ring_at(r, r->head_tag + (uint64_t)i)->s->ring_refs--;
    r->head_tag += (uint64_t)r->count;
    r->count = 0;
    r->replays.n = 0;
    r->lease_lost = false;
    de__subj_sweep(r, true);
    r->dirty.n = r->blocked.n = r->parks.n = r->unparks.n = 0;
    r->sent.n = 0;
}

/* Never publishes again: Kafka holds what the relay cannot verify
 * (relay_recover.c).  The thread ends; flush and stop report why. */
static void refuse(de_relay *r)
{
    pthread_mutex_lock(&r->mu);
    snprintf(r->fail_msg, sizeof r->fail_msg, "%s", de_errmsg());
    pthread_mutex_unlock(&r->mu);
    de__relay_set_error(r, "%s", de_errmsg());
    de__relay_set_state(r, DE_RELAY_REFUSED, de_errmsg());
}

void de__relay_try_activate(de_relay *r)
{
    char holder[300];
    bool held = false, lost = false;
    int64_t began;
    de_err err;

    if (de__mono_us() < r->next_standby_us)
        return;
    r->next_standby_us = de__mono_us() + r->lease_ms * 1000 / 5;
    began = de__mono_ms(); /* the heartbeat is written after this */
    if (de__rstate_lease_acquire(r->st, r->owner, de__now_ms(), r->lease_ms,
                                 &held, holder, sizeof holder) != DE_OK) {
        de__rlog(r, DE_LOG_WARNING, "cannot check the lease: %s", de_errmsg());
        return;
    }
    if (!held)
        return;
    r->last_beat_ms = began;
    r->next_beat_us = de__mono_us() + r->lease_ms * 1000 / 5;
    de__relay_set_state(r, DE_RELAY_RECOVERING, "lease taken");
    if ((err = activate(r, &lost)) != DE_OK || lost) {
        if (err == DE_ERR_STATE)
            refuse(r);
        else if (lost)
            de__rlog(r, DE_LOG_WARNING,
                     "the lease went to another relay while "
                     "this one read Kafka; standing by");
        else
            de__rlog(r, DE_LOG_ERR, "cannot become active: %s (retrying)",
                     de_errmsg());
        /* Another relay may do better; a release that fails only makes
         * it wait for the lease to expire. */
        if (!lost && de__rstate_lease_release(r->st, r->owner) != DE_OK)
            de__rlog(r, DE_LOG_WARNING, "cannot release the lease: %s",
                     de_errmsg());
        if (r->state != DE_RELAY_REFUSED)
            de__relay_set_state(r, DE_RELAY_STANDBY,
                                lost ? "lease lost while reading Kafka"
                                     : "could not become active");
    }
}

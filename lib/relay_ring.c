/* SPDX-License-Identifier: MIT */
/*
 * relay_ring.c -- the rows a relay has read and not yet passed: the ring of
 * slots in flight, the watermark that moves over acknowledged and
 * held-back slots, the rows held back behind blocked subjects, and their
 * resends.
 *
 * A row read becomes a slot at the tail of the ring with its subject's next
 * number (or the number Kafka already has for it, relay_recover.c); it is
 * produced, or held back when its subject is blocked.  Delivery reports
 * mark slots acknowledged or failed; the watermark (done_pos) moves past
 * the acknowledged and held-back ones at the head, in order.
 *
 * Invariants: see relay_int.h (durable_pos <= done_pos <= read_pos;
 * 0 <= count <= cap; each subject's ring_refs counts its slots).
 */
#include "relay_int.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Notes an event that went out, for the next checkpoint to record, when
 * the outbox keeps published rows (outbox.retention.ms): de_replay
 * republishes a retained row with the numbers it went out with. */
static void note_sent(de_relay *r, int64_t position, int64_t epoch, int64_t seq,
                      uint32_t topic, int32_t partition, int64_t offset)
{
    de__sent e = {position, epoch, seq, offset, partition, topic};

    if (r->retention_ms > 0 && !DE__VEC_PUSH(r->sent, e))
        r->oom = true; /* start over from the cursor */
}

/* A held-back event's resend was acknowledged or failed. */
static void replay_report(de_relay *r, uint64_t tag,
                          const rd_kafka_message_t *m)
{
    for (size_t i = 0; i < r->replays.n; i++) {
        de__replay *rp = &r->replays.v[i];
        if (rp->tag != tag || rp->done)
            continue;
        if (m->err == RD_KAFKA_RESP_ERR_NO_ERROR) {
            rp->done = true;
            rp->s->replaying--;
            r->published++;
            note_sent(r, rp->position, rp->epoch, rp->seq, rp->topic,
                      m->partition, m->offset);
            /* Not recorded as sent: it would be sent again, with the same
             * number; start over from the watermark instead. */
            if (!DE__VEC_PUSH(r->unparks, rp->position))
                r->oom = true;
        } else {
            r->need_restart = true;
            if (!de__relay_collateral(m->err)) {
                de__relay_set_error(r, "%s %s (%s): %s", DE__SUBJ_TYPE(rp->s),
                                    DE__SUBJ_ID(rp->s),
                                    rd_kafka_topic_name(m->rkt),
                                    rd_kafka_err2str(m->err));
                free(rp->s->error);
                rp->s->error = strdup(r->last_error);
                rp->s->retry_at_ms = de__mono_ms() + r->retry_ms;
            }
        }
        return;
    }
}

/* librdkafka's delivery report, on the relay's thread (rd_kafka_poll). */
void de__relay_on_dr(rd_kafka_t *rk, const rd_kafka_message_t *m, void *opaque)
{
    de_relay *r = ((de__rk_bridge *)opaque)->owner;
    uint64_t tag = (uint64_t)(uintptr_t)m->_private;
    de__slot *sl;

    (void)rk;
    if (tag & DE__REPLAY_TAG) {
        replay_report(r, tag, m);
        return;
    }
    if (tag < r->head_tag || tag >= r->head_tag + (uint64_t)r->count)
        return; /* from before a reset */
    sl = de__ring_at(r, tag);
    if (sl->tag != tag || sl->state != DE__SLOT_INFLIGHT)
        return;
    if (m->err == RD_KAFKA_RESP_ERR_NO_ERROR) {
        sl->state = DE__SLOT_ACKED;
        sl->partition = m->partition;
        sl->offset = m->offset;
        sl->s->fails = 0;
        r->published++;
        return;
    }
    sl->state = DE__SLOT_FAILED;
    sl->err = m->err;
    r->need_restart = true;
    if (!de__relay_collateral(m->err))
        de__relay_set_error(r, "%s %s (%s): %s", DE__SUBJ_TYPE(sl->s),
                            DE__SUBJ_ID(sl->s), rd_kafka_topic_name(m->rkt),
                            rd_kafka_err2str(m->err));
}

/* Moves the watermark past every acknowledged or held-back slot at the
 * head of the ring. */
void de__relay_advance(de_relay *r)
{
    while (r->count > 0) {
        de__slot *sl = de__ring_at(r, r->head_tag);
        if (sl->state != DE__SLOT_ACKED && sl->state != DE__SLOT_PARKED)
            break;
        assert(sl->position > r->done_pos);
        if (de__number_after(sl->epoch, sl->seq, sl->s->acked_epoch,
                             sl->s->acked)) {
            sl->s->acked = sl->seq;
            sl->s->acked_epoch = sl->epoch;
            sl->s->acked_ms = sl->recorded_at_ms;
            de__subj_mark_dirty(r, sl->s);
        }
        if (sl->state == DE__SLOT_ACKED) {
            de__relay_topic_seen(r, sl->topic, sl->partition, sl->offset);
            note_sent(r, sl->position, sl->epoch, sl->seq, sl->topic,
                      sl->partition, sl->offset);
        }
        assert(sl->s->ring_refs > 0);
        sl->s->ring_refs--;
        r->done_pos = sl->position;
        r->dirty_pos = true;
        r->head_tag++;
        r->count--;
    }
    if (r->count == 0 && r->read_pos > r->done_pos) {
        r->done_pos = r->read_pos;
        r->dirty_pos = true;
    }
    assert(r->durable_pos <= r->done_pos && r->done_pos <= r->read_pos);
    assert(r->count >= 0 && r->count <= r->cap);
}

/* The slot at the tail of the ring, set up for a row (not yet taken) with
 * the subject's next number: the next one of its numbering, or 1 in a new
 * numbering whose epoch is this row's position when the subject has none
 * or was idle longer than relay.subject.forget.ms.  A numbering that
 * began at or after this row (found on Kafka on activation: this row was
 * lost in flight while a later one of its subject landed) is continued,
 * never undercut.  The choice depends only on the rows and the counter at
 * the watermark, so reading again from the watermark gives every row the
 * same number. */
static de__slot *slot_init(de_relay *r, int64_t position,
                           int64_t recorded_at_ms, de__subj *s)
{
    uint64_t tag = r->head_tag + (uint64_t)r->count;
    de__slot *sl = de__ring_at(r, tag);

    assert(r->count < r->cap);
    assert(position > r->read_pos);
    memset(sl, 0, sizeof *sl);
    sl->tag = tag;
    sl->position = position;
    sl->recorded_at_ms = recorded_at_ms;
    if (s->assigned == 0 ||
        (r->forget_ms > 0 && recorded_at_ms - s->last_ms > r->forget_ms &&
         position > s->epoch)) {
        /* A new numbering outranks every earlier one of the subject. */
        assert(position > s->epoch);
        sl->epoch = position;
        sl->seq = 1;
    } else {
        sl->epoch = s->epoch;
        sl->seq = s->assigned + 1;
    }
    sl->s = s;
    sl->partition = -1;
    sl->offset = -1;
    return sl;
}

/* The tail slot joins the ring. */
static void slot_take(de_relay *r, de__slot *sl)
{
    if (de__number_after(sl->epoch, sl->seq, sl->s->epoch, sl->s->assigned)) {
        sl->s->assigned = sl->seq;
        sl->s->epoch = sl->epoch;
        sl->s->last_ms = sl->recorded_at_ms;
    }
    sl->s->ring_refs++;
    r->count++;
    r->read_pos = sl->position;
    r->nread++;
}

de__slot *de__ring_push(de_relay *r, int64_t position, int64_t recorded_at_ms,
                        de__subj *s)
{
    de__slot *sl = slot_init(r, position, recorded_at_ms, s);

    sl->state = DE__SLOT_INFLIGHT;
    slot_take(r, sl);
    return sl;
}

/* Holds a slot back behind its blocked subject (written to the state file
 * at the next checkpoint). */
static de_err park_slot(de_relay *r, de__slot *sl)
{
    de__park p = {sl->position, sl->epoch, sl->seq, sl->s};

    sl->state = DE__SLOT_PARKED;
    if (!DE__VEC_PUSH(r->parks, p))
        return de__fail(DE_ERR_NOMEM, "relay: out of memory holding back");
    if (r->parked_min == 0 || sl->position < r->parked_min)
        r->parked_min = sl->position;
    return DE_OK;
}

/* Whether a row read after activation already landed on Kafka
 * (relay_recover.c): then it keeps the number it has there and is not
 * sent again.  Only rows that existed at activation can have. */
static de_err landed(de_relay *r, const de__row *row, const de__topic *t,
                     de__slot *sl, bool *found)
{
    char name[256];
    int64_t epoch, seq, offset;
    int32_t partition;
    de_err err;

    *found = false;
    if (r->landed == 0 || row->position > r->recover_upto)
        return DE_OK;
    err = de__rstate_landed_get(r->st, row->event_id, found, &epoch, &seq, name,
                                sizeof name, &partition, &offset);
    if (err != DE_OK || !*found)
        return err;
    sl->seq = seq;
    sl->epoch = epoch;
    sl->state = DE__SLOT_ACKED;
    if (strcmp(name, t->name) == 0) {
        sl->partition = partition;
        sl->offset = offset;
    }
    r->skipped++;
    return DE_OK;
}

/* A row that de_record would have refused (inserted by hand, or by a
 * writer of another version): never published, its subject held back
 * behind it with the reason, like an event Kafka refused.  Once the row
 * is mended (or deleted) in the database, a retry sends it (or drops it,
 * which consumers then see as a gap). */
static de_err refuse_row(de_relay *r, const de__row *row, de__subj *s)
{
    char why[600];
    de__slot *sl;
    de_err err;

    snprintf(why, sizeof why,
             "the outbox row at position %lld is not a valid event (was it "
             "written without de_record?): %s",
             (long long)row->position, de_errmsg());
    de__relay_set_error(r, "%s", why);
    sl = slot_init(r, row->position, row->recorded_at_ms, s);
    de__subj_block(r, s, row->position, why, r->retry_ms);
    if ((err = park_slot(r, sl)) != DE_OK)
        return err;
    slot_take(r, sl);
    return DE_OK;
}

/* Produces (or holds back) one row at the tail of the ring.  DE__AGAIN:
 * not now (the producer's queue is full, its topic is not registered
 * yet, the lease may have passed); the row is read again. */
static de_err produce_row(void *ctx, const de__row *row)
{
    de_relay *r = ctx;
    de__subj *s = de__subj_get(r, row->subject_type, row->subject_id,
                               row->subject_id_len);
    uint32_t tidx = 0;
    rd_kafka_resp_err_t kerr;
    de__topic *t;
    de__slot *sl;
    char why[300];
    de_err err;
    bool found;

    if (row->position > r->max_pos)
        r->max_pos = row->position;
    if (s == NULL)
        return DE_ERR_NOMEM;
    /* Before its topic: a bad subject type must not name one. */
    if (de__row_check(row) != DE_OK)
        return refuse_row(r, row, s);
    if ((t = de__relay_topic(r, row->subject_type, &tidx)) == NULL)
        return DE_ERR_NOMEM;
    /* Its marks go on disk before anything of it is published. */
    if (!t->registered && (err = de__relay_register_topic(r, t)) != DE_OK)
        return err;
    sl = slot_init(r, row->position, row->recorded_at_ms, s);
    sl->topic = tidx;
    if ((err = landed(r, row, t, sl, &found)) != DE_OK)
        return err;
    if (found)
        goto take;
    if (s->blocked && row->position >= s->blocked_from) {
        if ((err = park_slot(r, sl)) != DE_OK)
            return err;
        goto take;
    }
    /* The lease is checked before each read, and again here, right
     * before the row goes to the producer: a read (or the lookups above)
     * that stalled past the lease -- a table lock, a server that stopped
     * answering, a flush waiting for synchronous standbys -- may have
     * let a standby take over, which publishes these rows itself. */
    if (de__relay_lease_expired(r))
        return DE__AGAIN;
    err = de__relay_send(r, row, sl->epoch, sl->seq, sl->tag, t, &kerr);
    if (err == DE_OK) {
        sl->state = DE__SLOT_INFLIGHT;
        goto take;
    }
    if (err != DE__AGAIN)
        return err;
    if (kerr == RD_KAFKA_RESP_ERR__QUEUE_FULL)
        return DE__AGAIN;
    if (de__relay_collateral(kerr)) {
        r->need_restart = true;
        return DE__AGAIN;
    }
    /* Refused before it was sent (too large, unknown topic, ...): the
     * subject waits behind this event. */
    snprintf(why, sizeof why, "Kafka refused event %s on %s: %s", row->event_id,
             t->name, rd_kafka_err2str(kerr));
    de__relay_set_error(r, "%s %s (%s): %s", row->subject_type, row->subject_id,
                        t->name, rd_kafka_err2str(kerr));
    de__subj_block(r, s, row->position, why, r->retry_ms);
    if ((err = park_slot(r, sl)) != DE_OK)
        return err;
take:
    slot_take(r, sl);
    return DE_OK;
}

/* The subjects of a batch about to be produced (de__batch_fn): their
 * counters loaded in one query. */
static de_err prefetch_subjects(void *ctx, int n, const char *const *types,
                                const char *const *ids)
{
    return de__subj_prefetch(ctx, n, types, ids);
}

/* Reads the next rows in position order and produces them, as many as the
 * ring has room for. */
de_err de__relay_read(de_relay *r)
{
    int64_t room = r->cap - r->count;
    int64_t limit = room < r->batch_size ? room : r->batch_size;
    int64_t n = 0;
    de_err err;

    r->more_rows = false;
    r->last_read = 0;
    if (limit <= 0 || r->need_restart)
        return DE_OK;
    /* The counters of the rows' subjects are read in one transaction. */
    if ((err = de__rstate_read_begin(r->st)) != DE_OK)
        return err;
    r->src->batch = prefetch_subjects;
    r->src->batch_ctx = r;
    err = r->src->ops->read(r->src, r->read_pos, limit, produce_row, r, &n);
    r->src->batch = NULL;
    de__rstate_read_end(r->st);
    r->more_rows = n == limit;
    r->last_read = n;
    /* The rows not taken are still there, and nothing else may wake the
     * relay for them (every commit may be over): read again after the
     * caller's pause. */
    if (err != DE_OK)
        r->woken = true;
    return err;
}

/* Resets everything read but not below the watermark, so that reading
 * resumes at the watermark and assigns the same numbers again. */
void de__relay_reset(de_relay *r)
{
    for (int64_t i = 0; i < r->count; i++) {
        de__slot *sl = de__ring_at(r, r->head_tag + (uint64_t)i);
        assert(sl->s->ring_refs > 0);
        sl->s->ring_refs--;
    }
    r->head_tag += (uint64_t)r->count;
    r->count = 0;
    r->read_pos = r->done_pos;
    r->woken = true;
    for (size_t i = 0; i < r->nbuckets; i++)
        for (de__subj *s = r->buckets[i]; s; s = s->hnext) {
            s->assigned = s->acked;
            s->epoch = s->acked_epoch;
            s->last_ms = s->acked_ms;
        }
    /* Pending parks beyond the watermark will be parked again on the
     * re-read (with the same numbers); those below stay. */
    for (size_t i = 0; i < r->parks.n;) {
        if (r->parks.v[i].position > r->done_pos)
            r->parks.v[i] = r->parks.v[--r->parks.n];
        else
            i++;
    }
    /* Resends not acknowledged: the subject is blocked again, and retried
     * at once unless its event was refused for good. */
    for (size_t i = 0; i < r->replays.n; i++) {
        de__replay *rp = &r->replays.v[i];
        if (rp->done)
            continue;
        rp->s->replaying = 0;
        if (!rp->s->blocked) {
            rp->s->blocked = true;
            rp->s->blocked_from = rp->position;
            if (rp->s->retry_at_ms > de__mono_ms())
                rp->s->retry_at_ms = de__mono_ms();
            if (!rp->s->in_blocked_list) {
                if (DE__VEC_PUSH(r->blocked, rp->s))
                    rp->s->in_blocked_list = true;
                else
                    r->oom = true;
            }
        } else if (rp->position < rp->s->blocked_from) {
            rp->s->blocked_from = rp->position;
        }
    }
    r->replays.n = 0;
}

struct replay_ctx {
    de_relay *r;
    de__subj *s;
    int64_t epoch, seq;
};

static de_err replay_one(void *arg, const de__row *row)
{
    struct replay_ctx *c = arg;
    de_relay *r = c->r;
    rd_kafka_resp_err_t kerr;
    uint32_t tidx;
    de__replay rp;
    de__topic *t;
    de_err err;

    rp.tag = DE__REPLAY_TAG | r->next_replay_tag++;
    rp.position = row->position;
    rp.epoch = c->epoch;
    rp.seq = c->seq;
    rp.s = c->s;
    rp.done = false;
    if (de__row_check(row) != DE_OK) {
        de__relay_set_error(r,
                            "%s %s: the outbox row at position %lld is still "
                            "not a valid event: %s",
                            DE__SUBJ_TYPE(c->s), DE__SUBJ_ID(c->s),
                            (long long)row->position, de_errmsg());
        return DE__AGAIN;
    }
    /* Held back after registration: its topic has marks already. */
    if ((t = de__relay_topic(r, row->subject_type, &tidx)) == NULL)
        return DE_ERR_NOMEM;
    rp.topic = tidx;
    if (!t->registered && (err = de__relay_register_topic(r, t)) != DE_OK)
        return err;
    if (de__relay_lease_expired(r)) /* as in produce_row */
        return DE__AGAIN;
    if ((err = de__relay_send(r, row, c->epoch, c->seq, rp.tag, t, &kerr)) !=
        DE_OK) {
        if (err == DE__AGAIN)
            de__relay_set_error(r, "%s %s: resending failed: %s",
                                DE__SUBJ_TYPE(c->s), DE__SUBJ_ID(c->s),
                                rd_kafka_err2str(kerr));
        return err;
    }
    if (!DE__VEC_PUSH(r->replays, rp)) {
        r->oom = true; /* sent, but not tracked: start over */
        return de__fail(DE_ERR_NOMEM, "relay: out of memory resending");
    }
    c->s->replaying++;
    return DE_OK;
}

/* Resends one held-back event; DE__AGAIN: stop here, try later. */
static de_err replay_row(void *arg, int64_t position, int64_t epoch,
                         int64_t seq)
{
    struct replay_ctx *c = arg;
    de_relay *r = c->r;
    bool found;
    de_err err;

    c->epoch = epoch;
    c->seq = seq;
    err = r->src->ops->read_one(r->src, position, replay_one, c, &found);
    if (err == DE_OK && !found) {
        de__rlog(r, DE_LOG_ERR,
                 "held-back event at position %lld is gone from the outbox; "
                 "dropping it",
                 (long long)position);
        if (!DE__VEC_PUSH(r->unparks, position))
            r->oom = true;
    }
    return err;
}

/* Forgets resends once all of them are acknowledged. */
void de__relay_compact_replays(de_relay *r)
{
    for (size_t i = 0; i < r->replays.n; i++)
        if (!r->replays.v[i].done)
            return;
    r->replays.n = 0;
}

/* Resends the held-back events of blocked subjects whose retry is due (or
 * all of them), in order, and unblocks them; the subject's later events
 * follow them into the same partition queue. */
void de__relay_retry_blocked(de_relay *r, bool all)
{
    int64_t now = de__mono_ms();
    bool any = false;
    de_err err;

    for (size_t i = 0; i < r->blocked.n; i++)
        if (all || r->blocked.v[i]->retry_at_ms <= now)
            any = true;
    if (!any || de__relay_lease_expired(r))
        return;
    /* Held-back events must be on disk before they are read back. */
    if (r->parks.n && (err = de__relay_checkpoint(r)) != DE_OK) {
        de__rlog(r, DE_LOG_WARNING, "checkpoint before a retry failed: %s",
                 de_errmsg());
        return;
    }
    for (size_t i = 0; i < r->blocked.n;) {
        de__subj *s = r->blocked.v[i];
        struct replay_ctx c = {r, s, 0, 0};
        if (!(all || s->retry_at_ms <= now) || !s->blocked) {
            i++;
            continue;
        }
        de__rlog(r, DE_LOG_NOTICE, "retrying blocked %s %s", DE__SUBJ_TYPE(s),
                 DE__SUBJ_ID(s));
        err = de__rstate_parked_rows(r->st, DE__SUBJ_TYPE(s), DE__SUBJ_ID(s),
                                     replay_row, &c);
        if (err != DE_OK) {
            if (err != DE__AGAIN)
                de__rlog(r, DE_LOG_WARNING, "retrying %s %s: %s",
                         DE__SUBJ_TYPE(s), DE__SUBJ_ID(s), de_errmsg());
            /* What was resent stays in flight; the rest waits. */
            s->retry_at_ms = now + r->retry_ms;
            i++;
            continue;
        }
        s->blocked = false;
        s->in_blocked_list = false;
        r->blocked.v[i] = r->blocked.v[--r->blocked.n];
    }
}

/* Whether every row up to target is published: below the watermark and
 * not held back (as the state file says, when this relay is not the one
 * publishing). */
bool de__relay_published_through(de_relay *r, int64_t target)
{
    int64_t pos = r->done_pos, min = r->parked_min, cnt;
    bool publishing = de__relay_publishing(r);

    if (!publishing && (de__rstate_cursor(r->st, &pos, NULL, 0) != DE_OK ||
                        de__rstate_parked_min(r->st, &min, &cnt) != DE_OK))
        return false;
    if (pos < target)
        return false;
    for (size_t i = 0; publishing && i < r->replays.n; i++)
        if (!r->replays.v[i].done && r->replays.v[i].position <= target)
            return false;
    return min == 0 || min > target;
}

/* SPDX-License-Identifier: MIT */
/*
 * relay.c -- the bundled relay: one thread, its own connection to the
 * database and its own idempotent librdkafka producer, publishing the
 * outbox to Kafka in commit (position) order with each subject's events
 * numbered 1, 2, 3, ...  This file holds the thread and its state machine,
 * flush and stop, and the public API; relay_int.h maps the rest.
 *
 * How the guarantees are kept:
 *
 *  Order.  Rows are read in position order and produced in that order
 *  with the subject id as the key, so a subject's events share a
 *  partition; the idempotent producer keeps their order through retries.
 *  ce_subjectseq is assigned at read time from per-subject counters.
 *
 *  No loss.  The durable cursor (relay_state.c) only moves past rows that
 *  Kafka acknowledged -- a contiguous watermark over the ring of rows in
 *  flight (relay_ring.c) -- or that are held back behind a blocked subject
 *  (recorded as such in the same transaction).  Rows are deleted from the
 *  outbox only below a cursor that is on disk, and the row at the cursor
 *  is never deleted, so positions never go back.
 *
 *  Durable before published.  The source syncs the database's log before
 *  it hands on the rows of a read (source_sqlite.c).
 *
 *  Numbers never reused.  Counters are persisted with the cursor; a relay
 *  that becomes active first reads Kafka forward from its marks
 *  (relay_recover.c): what already landed keeps its number and is not sent
 *  again, and every counter is raised above what Kafka holds.
 *
 *  Producer failures.  A fatal producer error or any delivery error purges
 *  the producer, replaces it, and replays from the watermark
 *  (relay_producer.c).  A message refused for a reason of its own blocks
 *  its subject; its later events are held back, in order, while other
 *  subjects keep flowing.
 *
 *  Promptness.  The thread sleeps in poll(2) on one eventfd, written by
 *  the host's WAL hook when a transaction that recorded events commits,
 *  by librdkafka when delivery reports, errors or log lines arrive, and by
 *  the API -- and on the source's descriptor when it has one (PostgreSQL:
 *  the connection that LISTENs for commits, which notify only while the
 *  relay announced its sleep, read_rows); it wakes every
 *  relay.poll.interval.ms to notice writers in other processes.
 *
 * The state machine (de_relay_state, changed only by
 * de__relay_set_state, which logs each change):
 *
 *   STANDBY --lease taken--> RECOVERING --Kafka read--> ACTIVE
 *   RECOVERING --cannot verify--> REFUSED (final)
 *   RECOVERING --Kafka unreachable, lease lost--> STANDBY
 *   ACTIVE --delivery failed--> RESTARTING --producer replaced--> ACTIVE
 *   ACTIVE, RESTARTING --lease lost or not renewed in time--> STANDBY
 *   any --stopped--> STOPPED (final)
 *
 * Threading: everything runs on the relay's thread except the public
 * functions at the end, which talk to it through r->mu, r->cond and the
 * eventfd.
 */
#include "relay_int.h"

#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <unistd.h>

/* A read that catches up with fewer rows than this is "low load": the
 * rows are sent at once instead of lingering for a batch. */
#define LOW_LOAD_ROWS 64
/* Subject entries kept in memory before idle ones are dropped. */
#define DEFAULT_SUBJECT_CACHE 100000
/* How often an idle relay raises the marks of partitions it does not
 * publish to (so that topic retention never overtakes them). */
#define MARK_REFRESH_MS 60000
/* A cleanup round that could not catch up is followed by the next one
 * this soon -- or, while the relay drains a backlog (its reads fill their
 * batches), this soon: deleting then competes with publishing for the
 * relay's thread and the database; a 20 ms round every 50 ms cost a
 * backlog drain about 8% (1M events over 200,000 subjects, three
 * alternating pairs: 107-114k vs 118-123k msg/s).  Rows left are deleted
 * once it caught up; the outbox stays bounded by the lag either way. */
#define CLEANUP_BEHIND_MS 50
#define CLEANUP_BEHIND_BUSY_MS 250

static const char *const state_names[] = {
    [DE_RELAY_STANDBY] = "standby", [DE_RELAY_RECOVERING] = "recovering",
    [DE_RELAY_ACTIVE] = "active",   [DE_RELAY_RESTARTING] = "restarting",
    [DE_RELAY_REFUSED] = "refused", [DE_RELAY_STOPPED] = "stopped",
};

const char *de_relay_state_name(de_relay_state s)
{
    if ((unsigned)s < DE__ARRAY_LEN(state_names) && state_names[s] != NULL)
        return state_names[s];
    return "unknown";
}

void de__relay_set_state(de_relay *r, de_relay_state state, const char *why)
{
    de_relay_state old = r->state;

    if (old == state)
        return;
    /* Final states stay final. */
    assert(old != DE_RELAY_REFUSED && old != DE_RELAY_STOPPED);
    de__rlog(r, state == DE_RELAY_REFUSED ? DE_LOG_ERR : DE_LOG_NOTICE,
             "%s -> %s: %s", de_relay_state_name(old),
             de_relay_state_name(state), why);
    r->state = state;
    pthread_mutex_lock(&r->mu);
    r->shared_state = state;
    r->stats.state = (int)state;
    pthread_mutex_unlock(&r->mu);
}

void de__relay_set_error(de_relay *r, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(r->last_error, sizeof r->last_error, fmt, ap);
    va_end(ap);
    r->last_error_ms = de__now_ms();
}

static void wake(de_relay *r)
{
    static const uint64_t one = 1;

    /* A full eventfd counter still wakes the thread: nothing to do. */
    (void)!write(r->wake_fd, &one, sizeof one);
}

bool de__relay_stop_due(de_relay *r)
{
    bool stop;

    pthread_mutex_lock(&r->mu);
    stop = r->stop_req && de__mono_us() >= r->stop_deadline_us;
    pthread_mutex_unlock(&r->mu);
    return stop;
}

/* A fatal producer error (librdkafka's error callback, on this thread). */
static void on_fatal(void *owner, rd_kafka_resp_err_t err, const char *why)
{
    de_relay *r = owner;

    de__relay_set_error(r, "producer fatal error: %s: %s",
                        rd_kafka_err2name(err), why);
    r->need_restart = true;
}

/* ---- flush bookkeeping ------------------------------------------------ */

static de_err max_position(de_relay *r, int64_t *max)
{
    de_err err = r->src->ops->max_position(r->src, max);

    if (err == DE_OK && *max > r->max_pos)
        r->max_pos = *max;
    return err;
}

static void handle_flush(de_relay *r)
{
    uint64_t req;
    int64_t m;
    bool stop;

    pthread_mutex_lock(&r->mu);
    req = r->flush_req;
    stop = r->stop_req;
    pthread_mutex_unlock(&r->mu);
    if (req != r->flush_taken && max_position(r, &m) == DE_OK) {
        if (m > r->flush_target)
            r->flush_target = m;
        r->flush_taken = req;
    }
    if (stop && !r->stop_target_set && max_position(r, &m) == DE_OK) {
        r->stop_target = m;
        r->stop_target_set = true;
    }
    if (req != 0 && r->flush_done != r->flush_taken &&
        de__relay_published_through(r, r->flush_target)) {
        de__relay_publish_stats(r); /* a flusher reads them right after */
        pthread_mutex_lock(&r->mu);
        if (r->flush_done != r->flush_taken) {
            r->flush_done = r->flush_taken;
            pthread_cond_broadcast(&r->cond);
        }
        pthread_mutex_unlock(&r->mu);
    }
}

/* ---- stats -------------------------------------------------------------- */

const char *de__relay_db_path(const de_relay *r)
{
    return r->db_path;
}

/* librdkafka's statistics of the producer, on the relay's thread: kept for
 * the next statistics callback. */
static void on_rk_stats(void *owner, const char *json, size_t len)
{
    de_relay *r = owner;
    char *copy = malloc(len + 1);

    if (copy == NULL)
        return; /* the next document goes without them */
    memcpy(copy, json, len);
    copy[len] = '\0';
    free(r->rk_stats);
    r->rk_stats = copy;
    r->rk_stats_len = len;
}

/* The user's statistics callback, every statistics.interval.ms. */
static void emit_stats(de_relay *r, const de_relay_stats *s)
{
    size_t len = 0;
    bool fresh = r->rk != NULL && r->rk_stats != NULL;
    char *doc = de__stats_doc(de__relay_stats_json(s, r->db_path),
                              fresh ? r->rk_stats : NULL,
                              fresh ? r->rk_stats_len : 0, &len);

    r->stats_next_ms = de__mono_ms() + r->stats_interval_ms;
    if (doc == NULL) {
        de__rlog(r, DE_LOG_WARNING, "statistics skipped: out of memory");
        return;
    }
    r->stats_fn(r->stats_ctx, doc, len);
    free(doc);
}

void de__relay_publish_stats(de_relay *r)
{
    de_relay_stats s;
    int64_t max = r->max_pos > r->done_pos ? r->max_pos : r->done_pos;

    memset(&s, 0, sizeof s);
    s.published = r->published;
    /* Parks not yet written may repeat written ones (after a restart)
     * for at most one checkpoint interval. */
    s.held_back = (uint64_t)r->held_back + r->parks.n;
    s.pending = (uint64_t)(max - r->done_pos) + s.held_back;
    s.lag_ms = 0;
    if (r->count > 0)
        s.lag_ms = de__now_ms() - de__ring_at(r, r->head_tag)->recorded_at_ms;
    if (s.lag_ms < 0)
        s.lag_ms = 0;
    s.producer_restarts = r->restarts;
    s.active = de__relay_publishing(r);
    s.position = r->done_pos;
    s.blocked_subjects = r->blocked.n;
    s.deleted = r->deleted;
    s.read = r->nread;
    s.last_error_ms = r->last_error_ms;
    memcpy(s.last_error, r->last_error, sizeof s.last_error);
    s.state = (int)r->state;
    s.skipped = r->skipped;
    s.forgotten = r->forgotten;
    s.subjects_cached = r->nsubj;
    s.brokers_up = r->rk != NULL ? atomic_load(&r->bridge.brokers_up) : -1;
    pthread_mutex_lock(&r->mu);
    r->stats = s;
    pthread_mutex_unlock(&r->mu);
    if (r->stats_fn != NULL && r->stats_interval_ms > 0 &&
        de__mono_ms() >= r->stats_next_ms)
        emit_stats(r, &s);
}

/* ---- the thread ------------------------------------------------------- */

/* Sleeps until the eventfd fires, the source's descriptor (PostgreSQL:
 * the LISTEN connection) has something, or timeout_ms pass.  Woken for
 * work, it ends an announced sleep (read_rows).  A timer that ran out
 * (the poll interval, a heartbeat) does not: raising and lowering
 * PostgreSQL's sleeping flag are writes -- two synchronous commits per
 * poll interval on an idle database -- so the flag stays up and the
 * relay reads once, as the fallback for a wake-up that could not come
 * (a LISTEN connection dropped without a word); a read that finds rows
 * ends the sleep then. */
static void wait_for_work(de_relay *r, int timeout_ms)
{
    struct pollfd p[2] = {{r->wake_fd, POLLIN, 0}, {-1, POLLIN, 0}};
    nfds_t n = 1;
    uint64_t v;

    if ((p[1].fd = r->src->ops->wait_fd(r->src)) >= 0)
        n = 2;
    if (timeout_ms > 0 && poll(p, n, timeout_ms) > 0) {
        if (p[0].revents & POLLIN) {
            (void)!read(r->wake_fd, &v, sizeof v); /* reset the counter */
            r->woken = true;
        }
        /* Drained here (changed() consumes what arrived), or the
         * descriptor would stay readable and the next poll spin. */
        if (n == 2 && p[1].revents != 0 && r->src->ops->changed(r->src))
            r->woken = true;
    } else if (timeout_ms <= 0 && read(r->wake_fd, &v, sizeof v) > 0) {
        r->woken = true;
    }
    if (r->sleep_announced && r->woken) {
        r->sleep_announced = false;
        r->src->ops->awake(r->src);
    } else if (r->sleep_announced) {
        r->woken = true; /* the fallback read, the flag still up */
    }
}

/* Logs what the source has to warn about (PostgreSQL: a barrier that
 * keeps timing out, prepared transactions allowed). */
static void log_source_warnings(de_relay *r)
{
    const char *w;

    if (r->src->ops->warning == NULL)
        return;
    while ((w = r->src->ops->warning(r->src)) != NULL)
        de__rlog(r, DE_LOG_WARNING, "%s", w);
}

/* Reads the next rows.  A read that finds nothing means the relay is about
 * to sleep: a source whose writers wake it only while it says so
 * (PostgreSQL's conditional NOTIFY) hears it now, and the read is made
 * once more after that, so that a commit that came before the
 * announcement is not left for the poll interval.  DE__AGAIN (nothing
 * could be proven complete yet) is no error: the source's changed()
 * brings the next round. */
static de_err read_rows(de_relay *r)
{
    de_err err = de__relay_read(r);

    log_source_warnings(r);
    if (r->sleep_announced && r->last_read > 0) {
        /* The fallback read (wait_for_work) found rows: busy. */
        r->sleep_announced = false;
        r->src->ops->awake(r->src);
    } else if (err == DE_OK && r->last_read == 0 && r->count < r->cap &&
               !r->need_restart && !r->sleep_announced && !r->lease_lost &&
               r->src->ops->sleep_begin(r->src)) {
        r->sleep_announced = true;
        err = de__relay_read(r);
        log_source_warnings(r);
        if (r->last_read > 0) {
            /* Busy after all: writers need not wake it. */
            r->sleep_announced = false;
            r->src->ops->awake(r->src);
        }
    }
    return err == DE__AGAIN ? DE_OK : err;
}

/* What a relay that does not hold the lease does in one turn of the loop:
 * try to take it (also when stopping, while its time lasts, to publish
 * what was committed before the stop).  false: the loop should end. */
static bool stand_by(de_relay *r, bool stop, bool flushing, int64_t now_us,
                     int64_t deadline)
{
    if (!stop || now_us < deadline)
        de__relay_try_activate(r);
    if (r->state == DE_RELAY_REFUSED)
        return false;
    if (de__relay_publishing(r))
        return true;
    /* The host in this process still writes: its log's checkpoints are
     * this relay's job whether or not it publishes. */
    if (r->link && de__link_checkpoint_due(r->link))
        r->src->ops->checkpoint_log(r->src);
    handle_flush(r);
    de__relay_publish_stats(r);
    if (stop &&
        (de__relay_published_through(r, r->stop_target) || now_us >= deadline))
        return false;
    wait_for_work(r, stop || flushing ? 20 : (int)(r->lease_ms / 5));
    return true;
}

/* What keeps the relay's files bounded by its lag, whatever the load:
 * deleting published rows, forgetting idle subjects, checkpointing the
 * host's log (writers in other processes never do it for us), dropping
 * idle subject entries. */
static void housekeeping(de_relay *r, int64_t now_us)
{
    bool behind = false;
    de_err err;

    if ((err = de__relay_cleanup(r, &behind)) != DE_OK)
        de__rlog(r, DE_LOG_WARNING,
                 "deleting published rows failed: %s (retrying)", de_errmsg());
    if ((err = de__relay_forget(r)) != DE_OK)
        de__rlog(r, DE_LOG_WARNING,
                 "forgetting idle subjects failed: %s (retrying)", de_errmsg());
    r->src->ops->checkpoint_log(r->src);
    if (r->count == 0 && !r->more_rows)
        de__subj_sweep(r, false);
    r->next_cleanup_us = now_us + (!behind        ? r->cleanup_ms
                                   : r->more_rows ? CLEANUP_BEHIND_BUSY_MS
                                                  : CLEANUP_BEHIND_MS) *
                                      1000;
}

/* How long the loop may sleep before something is due. */
static int next_timeout(de_relay *r, bool stop, int64_t now_us)
{
    int64_t t;

    if (r->more_rows && r->count < r->cap && !r->need_restart)
        return 0;
    t = r->poll_ms * 1000;
    if ((r->dirty_pos || r->dirty.n) && r->next_ckpt_us - now_us < t)
        t = r->next_ckpt_us - now_us;
    if (r->next_beat_us - now_us < t)
        t = r->next_beat_us - now_us;
    if (r->next_cleanup_us - now_us < t)
        t = r->next_cleanup_us - now_us;
    if (r->register_pending && r->register_retry_us - now_us < t)
        t = r->register_retry_us - now_us;
    if (stop && t > 10000)
        t = 10000;
    return t <= 0 ? 0 : (int)((t + 999) / 1000);
}

/* The shutdown of a publishing relay: record what is done, hand the lease
 * over.  When everything the stop asked for is published but that record
 * cannot be written, remember why: de_relay_stop reports it rather than
 * a timeout (the state file alone would say the events are pending). */
static void finish(de_relay *r)
{
    bool published;
    de_err err;

    if (!de__relay_publishing(r))
        return;
    de__relay_advance(r);
    published =
        r->stop_target_set && de__relay_published_through(r, r->stop_target);
    if ((err = de__relay_checkpoint(r)) != DE_OK) {
        snprintf(r->ckpt_fail_msg, sizeof r->ckpt_fail_msg, "%s", de_errmsg());
        r->ckpt_failed = published;
        de__rlog(r, DE_LOG_WARNING, "final checkpoint failed: %s",
                 r->ckpt_fail_msg);
    }
    if (r->rk)
        de__relay_purge(r);
    if (!r->lease_lost &&
        (err = de__rstate_lease_release(r->st, r->owner)) != DE_OK) {
        de__rlog(r, DE_LOG_WARNING,
                 "cannot release the lease (a standby takes over when it "
                 "expires): %s",
                 de_errmsg());
        r->release_failed = true;
    }
}

static void *relay_main(void *arg)
{
    de_relay *r = arg;
    bool stop, retry, flushing;
    int64_t now_us, deadline;
    de_err err;
    int timeout;

    for (;;) {
        pthread_mutex_lock(&r->mu);
        stop = r->stop_req;
        deadline = r->stop_deadline_us;
        retry = r->retry_req;
        r->retry_req = false;
        flushing = r->flush_req != r->flush_done;
        pthread_mutex_unlock(&r->mu);
        now_us = de__mono_us();

        if (r->state == DE_RELAY_REFUSED)
            break;
        if (!de__relay_publishing(r)) {
            if (!stand_by(r, stop, flushing, now_us, deadline))
                break;
            if (!de__relay_publishing(r))
                continue;
        }
        if (r->rk == NULL && (err = de__relay_producer_new(r)) != DE_OK) {
            de__rlog(r, DE_LOG_ERR, "cannot create a producer: %s",
                     de_errmsg());
            if (stop)
                break;
            wait_for_work(r, 1000);
            continue;
        }
        rd_kafka_poll(r->rk, 0); /* reports, errors, log lines */
        if (r->need_restart)
            de__relay_restart(r);
        if (r->rk == NULL)
            continue;
        de__relay_compact_replays(r);
        de__relay_advance(r);
        handle_flush(r);
        if (stop && ((r->count == 0 && r->replays.n == 0 &&
                      de__relay_published_through(r, r->stop_target)) ||
                     now_us >= deadline))
            break;
        if (retry)
            de__relay_retry_blocked(r, true);
        else if (r->blocked.n)
            de__relay_retry_blocked(r, false);
        de__relay_maybe_checkpoint(r, now_us);
        /* Not renewed in time: fence. */
        if (de__relay_lease_expired(r) || r->oom) {
            de__relay_demote(r, r->oom ? "out of memory in its bookkeeping: "
                                         "starting over from the cursor"
                                       : "the lease was lost or could not be "
                                         "renewed in time");
            r->oom = false;
            continue;
        }
        if (r->register_pending && now_us >= r->register_retry_us) {
            r->register_pending = false;
            r->woken = true;
        }
        /* Read when there may be rows: woken (a commit in this process,
         * delivery reports, the API), a backlog, or another connection
         * committed.  Otherwise the poll interval costs one cheap check. */
        if (r->woken || r->more_rows || r->src->ops->changed(r->src)) {
            r->woken = false;
            if ((err = read_rows(r)) != DE_OK) {
                de__rlog(r, DE_LOG_WARNING, "%s (retrying)", de_errmsg());
                wait_for_work(r, 200);
                continue;
            }
        }
        if (r->last_read > 0 && r->last_read < LOW_LOAD_ROWS && !r->more_rows) {
            /* Caught up with a few rows: low load.  Send them now rather
             * than after linger.ms -- while flush() runs, librdkafka's
             * broker threads treat linger as elapsed -- and take their
             * acknowledgements as they come (up to 1 ms).  Under load the
             * reads return full batches and linger.ms batches them.  The
             * result only says whether everything left in that time. */
            (void)rd_kafka_flush(r->rk, 1);
            /* The reports it delivered counted as published: move the
             * watermark with them, or the statistics below would show
             * them both published and pending. */
            de__relay_advance(r);
        }
        if (r->link && de__link_checkpoint_due(r->link))
            r->src->ops->checkpoint_log(r->src);
        if (r->count == 0 && !r->more_rows &&
            now_us >= r->next_mark_refresh_us) {
            r->next_mark_refresh_us = now_us + MARK_REFRESH_MS * 1000;
            de__relay_refresh_marks(r);
        }
        if (now_us >= r->next_cleanup_us)
            housekeeping(r, now_us);
        de__relay_publish_stats(r);
        timeout = next_timeout(r, stop, now_us);
        if (timeout > 0)
            wait_for_work(r, timeout);
        else
            rd_kafka_poll(r->rk, 0);
    }

    r->ended_standby = r->state != DE_RELAY_REFUSED && !de__relay_publishing(r);
    finish(r);
    handle_flush(r);
    if (r->state != DE_RELAY_REFUSED)
        de__relay_set_state(r, DE_RELAY_STOPPED, "stopped");
    de__relay_publish_stats(r);
    pthread_mutex_lock(&r->mu);
    if (r->state == DE_RELAY_REFUSED)
        r->stop_result = DE_ERR_STATE;
    else if (r->stop_target_set &&
             de__relay_published_through(r, r->stop_target))
        r->stop_result = DE_OK; /* as its state says: durably */
    else if (r->ckpt_failed)
        r->stop_result = DE_ERR_DB; /* published; not recorded as such */
    else
        r->stop_result = DE_ERR_TIMEOUT;
    r->finished = true;
    pthread_cond_broadcast(&r->cond);
    pthread_mutex_unlock(&r->mu);
    return NULL;
}

/* ---- construction ----------------------------------------------------- */

de_relay *de__relay_alloc(int64_t cap, de_conf *conf)
{
    de_relay *r = calloc(1, sizeof *r);
    pthread_condattr_t ca;

    if (r == NULL)
        return NULL;
    r->conf = conf;
    r->wake_fd = -1;
    r->cap = cap;
    r->head_tag = 1;
    r->next_replay_tag = 1;
    r->subject_cache = DEFAULT_SUBJECT_CACHE;
    r->state = r->shared_state = DE_RELAY_STANDBY;
    r->stop_deadline_us = INT64_MAX;
    snprintf(r->log_prefix, sizeof r->log_prefix, "relay: ");
    pthread_mutex_init(&r->mu, NULL);
    /* Deadlines are monotonic: wall-clock steps must not cut a flush
     * short or stretch it. */
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&r->cond, &ca);
    pthread_condattr_destroy(&ca);
    if ((r->ring = calloc((size_t)cap, sizeof *r->ring)) == NULL) {
        pthread_cond_destroy(&r->cond);
        pthread_mutex_destroy(&r->mu);
        free(r);
        return NULL;
    }
    return r;
}

void de__relay_free(de_relay *r)
{
    if (r == NULL)
        return;
    de__link_release(r->link);
    de__relay_producer_destroy(r);
    if (r->src != NULL)
        r->src->ops->close(r->src);
    de__rstate_close(r->st);
    de__subj_sweep(r, true);
    de__subj_pool_free(r);
    free(r->buckets);
    DE__VEC_FREE(r->dirty);
    DE__VEC_FREE(r->blocked);
    DE__VEC_FREE(r->parks);
    DE__VEC_FREE(r->unparks);
    DE__VEC_FREE(r->replays);
    DE__VEC_FREE(r->sent);
    de__relay_topics_free(r);
    DE__VEC_FREE(r->topics);
    free(r->ring);
    if (r->wake_fd >= 0)
        close(r->wake_fd);
    pthread_cond_destroy(&r->cond);
    pthread_mutex_destroy(&r->mu);
    free(r->db_path);
    free(r->rk_stats);
    free(r->state_path);
    de__hmac_keyring_free(&r->hmac);
    de_conf_destroy(r->conf);
    free(r);
}

de_err de__hmac_from_conf(const de_conf *conf, de__hmac_keyring *kr)
{
    char why[200];

    /* The value passed de_conf_set: only memory can fail here. */
    if (!de__hmac_keyring_parse(de__conf_str(conf, DE__K_EVENT_HMAC_KEY), kr,
                                why, sizeof why))
        return de__fail(DE_ERR_NOMEM, "event.hmac.key: %s", why);
    return DE_OK;
}

/* Reads the configuration into the relay's fields. */
static void read_conf(de_relay *r)
{
    const de_conf *conf = r->conf;

    r->source = de__conf_str(conf, DE__K_EVENT_SOURCE);
    r->type_prefix = de__conf_str(conf, DE__K_EVENT_TYPE_PREFIX);
    r->topic_template = de__conf_str(conf, DE__K_TOPIC_TEMPLATE);
    r->batch_size = de__conf_int(conf, DE__K_RELAY_BATCH_SIZE);
    r->poll_ms = de__conf_int(conf, DE__K_RELAY_POLL_INTERVAL_MS);
    r->ckpt_ms = de__conf_int(conf, DE__K_RELAY_CHECKPOINT_INTERVAL_MS);
    r->lease_ms = de__conf_int(conf, DE__K_RELAY_LEASE_TIMEOUT_MS);
    r->retry_ms = de__conf_int(conf, DE__K_RELAY_BLOCKED_RETRY_MS);
    r->cleanup_ms = de__conf_int(conf, DE__K_RELAY_CLEANUP_INTERVAL_MS);
    r->retention_ms = de__conf_int(conf, DE__K_OUTBOX_RETENTION_MS);
    r->forget_ms = de__conf_int(conf, DE__K_RELAY_SUBJECT_FORGET_MS);
    r->subject_cache = de__conf_int(conf, DE__K_RELAY_SUBJECT_CACHE);
    /* The relay's own connection always waits for the host's writers;
     * outbox.busy.timeout.ms=0 only leaves the host's connection alone. */
    r->busy_ms = de__conf_int(conf, DE__K_OUTBOX_BUSY_TIMEOUT_MS);
    if (r->busy_ms <= 0)
        r->busy_ms = 5000;
    r->continue_unverifiable =
        strcmp(de__conf_str(conf, DE__K_RELAY_RECOVERY_UNVERIFIABLE),
               "continue") == 0;
}

/* The database's permission bits, which its relay state gets too (0600
 * when they cannot be read). */
static unsigned db_mode(const char *db_path)
{
    struct stat sb;

    return stat(db_path, &sb) == 0 ? (unsigned)(sb.st_mode & 0666) : 0600;
}

/* Every relay of a database publishes with the wire settings its writer
 * stored with the outbox: a relay not given one takes the stored value; a
 * relay given a different one refuses (DE_ERR_CONFIG, naming both), unless
 * relay.settings.override says to publish with its own.  conf is the
 * caller's private copy. */
de_err de__adopt_settings(de__source *src, de_conf *conf, const char *db_path,
                          const char *log_prefix)
{
    static const de__key wire[] = DE__WIRE_KEYS;
    bool override = de__conf_bool(conf, DE__K_RELAY_SETTINGS_OVERRIDE);
    de_err err = DE_OK;

    for (size_t i = 0; i < DE__ARRAY_LEN(wire) && err == DE_OK; i++) {
        const char *key = de__conf_key_name(wire[i]);
        const char *mine = de__conf_str(conf, wire[i]);
        char *stored = NULL;
        if ((err = src->ops->stored_setting(src, key, &stored)) != DE_OK ||
            stored == NULL)
            continue;
        if (strcmp(stored, mine) == 0) {
            /* nothing to do */
        } else if (!de__conf_is_set(conf, wire[i])) {
            err = de_conf_set(conf, key, stored);
        } else if (override) {
            de__log(conf, DE_LOG_WARNING,
                    "%s%s is '%s' here but '%s' in the outbox's settings; "
                    "publishing with '%s' (relay.settings.override)",
                    log_prefix, key, mine, stored, mine);
        } else {
            err = de__fail(DE_ERR_CONFIG,
                           "%s is '%s' here but '%s' in the "
                           "settings the writer of '%s' stored with its "
                           "outbox; leave %s unset to use the stored value, "
                           "or set relay.settings.override=true",
                           key, mine, stored, db_path, key);
        }
        free(stored);
    }
    return err;
}

const char *de__relay_state_path(const de_conf *conf, const char *db_path,
                                 char *buf, size_t size)
{
    const char *sp = de__conf_str(conf, DE__K_RELAY_STATE_PATH);

    if (sp[0] != '\0')
        return sp;
    snprintf(buf, size, "%s-relay", db_path);
    return buf;
}

/* The SQLite store: the database file at where, and the state file
 * beside it (relay.state.path). */
static de_err sqlite_open_source(const char *where, de_relay *r, bool linked)
{
    return de__source_open_sqlite(where, r->busy_ms, linked, true, &r->src,
                                  r->outbox_id);
}

static de_err sqlite_open_state(const char *where, de_relay *r, int64_t floor,
                                int64_t *cursor)
{
    return de__rstate_open(r->state_path, db_mode(where), r->outbox_id, floor,
                           &r->st, cursor);
}

static const de__relay_store sqlite_store = {
    sqlite_open_source,
    sqlite_open_state,
    true,
    false,
};

de_err de__relay_new(const char *name, const char *where, const char *state,
                     de_conf *conf, de_outbox *ob, const de__relay_store *store,
                     de_relay **out)
{
    de_relay *r;
    char cid[DE__EVENT_ID_MAX + 1];
    int64_t cursor, floor;
    de_err err;
    int rc;

    if ((err = de__producer_check_conf(conf, "relay")) != DE_OK) {
        de_conf_destroy(conf);
        return err;
    }
    r = de__relay_alloc(de__conf_int(conf, DE__K_RELAY_MAX_INFLIGHT), conf);
    if (r == NULL) {
        de_conf_destroy(conf);
        return de__fail(DE_ERR_NOMEM, "out of memory starting the relay");
    }
    read_conf(r);
    r->db_path = strdup(name);
    r->state_path = strdup(state);
    r->state_in_db = store->state_in_db;
    if (r->db_path == NULL || r->state_path == NULL) {
        err = de__fail(DE_ERR_NOMEM, "out of memory starting the relay");
        goto fail;
    }
    snprintf(r->log_prefix, sizeof r->log_prefix, "relay %s: ", r->db_path);
    r->bridge.conf = conf;
    memcpy(r->bridge.prefix, r->log_prefix, sizeof r->bridge.prefix);
    r->bridge.owner = r;
    r->bridge.on_fatal = on_fatal;
    r->bridge.on_stats = on_rk_stats;
    atomic_store(&r->bridge.brokers_up, -1);
    r->stats_fn = de__conf_stats_cb(conf, &r->stats_ctx);
    r->stats_interval_ms = de__rk_stats_interval(conf);
    de__uuid7(r->owner);
    if ((err = store->open_source(where, r, ob != NULL && store->link)) !=
            DE_OK ||
        (err = de__adopt_settings(r->src, conf, r->db_path, r->log_prefix)) !=
            DE_OK ||
        (err = r->src->ops->deleted_upto(r->src, &floor)) != DE_OK ||
        (err = store->open_state(where, r, floor, &cursor)) != DE_OK ||
        (err = de__rstate_cursor(r->st, &cursor, cid, sizeof cid)) != DE_OK ||
        /* Refused at once, not only when the thread becomes active. */
        (err = de__relay_check_cursor(r, cursor, cid)) != DE_OK)
        goto fail;
    read_conf(r); /* with the writer's wire settings */
    if ((err = de__hmac_from_conf(r->conf, &r->hmac)) != DE_OK)
        goto fail;
    r->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (r->wake_fd < 0) {
        err = de__fail(DE_ERR_STATE, "relay: eventfd failed: %s",
                       strerror(errno));
        goto fail;
    }
    if ((err = de__relay_producer_new(r)) != DE_OK)
        goto fail;
    if (ob != NULL && store->link &&
        (r->link = de__outbox_attach(ob, r->wake_fd)) == NULL) {
        err = de__fail(DE_ERR_NOMEM, "out of memory starting the relay");
        goto fail;
    }
    if ((rc = pthread_create(&r->thread, NULL, relay_main, r)) != 0) {
        err = de__fail(DE_ERR_STATE, "relay: cannot start its thread: %s",
                       strerror(rc));
        goto fail;
    }
    *out = r;
    return DE_OK;
fail:
    de__relay_free(r);
    return err;
}

static de_err relay_new(const char *db_path, de_conf *conf, de_outbox *ob,
                        de_relay **out)
{
    char resolved[PATH_MAX], state[PATH_MAX + 16];

    if (realpath(db_path, resolved) == NULL) {
        de_err err = de__fail(DE_ERR_ARG, "database '%s' cannot be opened: %s",
                              db_path, strerror(errno));
        de_conf_destroy(conf);
        return err;
    }
    return de__relay_new(
        resolved, resolved,
        de__relay_state_path(conf, resolved, state, sizeof state), conf, ob,
        &sqlite_store, out);
}

de_err de_relay_start(de_outbox *ob, const de_conf *conf, de_relay **out)
{
    de_conf *merged;
    de_err err;

    if (out != NULL)
        *out = NULL;
    if (ob == NULL || out == NULL)
        return de__fail(DE_ERR_ARG,
                        "de_relay_start needs an outbox and an "
                        "out pointer (got NULL %s)",
                        ob == NULL ? "outbox" : "out");
    merged = de__conf_dup(de__outbox_conf(ob));
    if (merged == NULL)
        return de__fail(DE_ERR_NOMEM, "out of memory starting the relay");
    if ((err = de__conf_merge(merged, conf)) != DE_OK) {
        de_conf_destroy(merged);
        return err;
    }
    /* Another database: its module opens the relay's connections. */
    if (de__outbox_db(ob) == NULL)
        return de__outbox_relay_start(ob, merged, out);
    return relay_new(sqlite3_db_filename(de__outbox_db(ob), "main"), merged, ob,
                     out);
}

de_err de_relay_start_path(const char *db_path, const de_conf *conf,
                           de_relay **out)
{
    de_conf *copy;

    if (out != NULL)
        *out = NULL;
    if (db_path == NULL || out == NULL)
        return de__fail(DE_ERR_ARG,
                        "de_relay_start_path needs a database "
                        "path and an out pointer (got NULL %s)",
                        db_path == NULL ? "db_path" : "out");
    if (access(db_path, F_OK) != 0)
        return de__fail(DE_ERR_ARG, "database '%s' does not exist", db_path);
    copy = de__conf_dup(conf);
    if (copy == NULL)
        return de__fail(DE_ERR_NOMEM, "out of memory starting the relay");
    return relay_new(db_path, copy, NULL, out);
}

/* ---- the API threads' side --------------------------------------------- */

static void deadline_ts(struct timespec *ts, int timeout_ms)
{
    clock_gettime(CLOCK_MONOTONIC, ts);
    ts->tv_sec += timeout_ms / 1000;
    ts->tv_nsec += (long)(timeout_ms % 1000) * 1000000;
    if (ts->tv_nsec >= 1000000000) {
        ts->tv_sec++;
        ts->tv_nsec -= 1000000000;
    }
}

de_err de_relay_flush(de_relay *r, int timeout_ms)
{
    struct timespec ts;
    uint64_t mine;
    de_err err = DE_OK;

    if (r == NULL)
        return de__fail(DE_ERR_ARG, "de_relay_flush needs a relay (got NULL)");
    if (timeout_ms >= 0)
        deadline_ts(&ts, timeout_ms);
    pthread_mutex_lock(&r->mu);
    mine = ++r->flush_req;
    wake(r);
    while (r->flush_done < mine && !r->finished) {
        int rc = timeout_ms >= 0 ? pthread_cond_timedwait(&r->cond, &r->mu, &ts)
                                 : pthread_cond_wait(&r->cond, &r->mu);
        if (rc == ETIMEDOUT && r->flush_done < mine) {
            err = de__fail(DE_ERR_TIMEOUT,
                           "de_relay_flush: events committed before the call "
                           "were not all acknowledged within %d ms (%llu "
                           "pending, relay %s%s%s); they stay in the outbox",
                           timeout_ms, (unsigned long long)r->stats.pending,
                           de_relay_state_name(r->shared_state),
                           r->stats.last_error[0] ? "; last error: " : "",
                           r->stats.last_error);
            break;
        }
    }
    if (err == DE_OK && r->flush_done < mine)
        err = r->shared_state == DE_RELAY_REFUSED
                  ? de__fail(DE_ERR_STATE, "de_relay_flush: %s", r->fail_msg)
                  : de__fail(DE_ERR_STATE,
                             "de_relay_flush: the relay has stopped");
    pthread_mutex_unlock(&r->mu);
    return err;
}

de_err de_relay_stop(de_relay *r, int timeout_ms)
{
    de_err err;

    if (r == NULL)
        return DE_OK;
    pthread_mutex_lock(&r->mu);
    r->stop_req = true;
    r->stop_deadline_us =
        timeout_ms < 0 ? INT64_MAX : de__mono_us() + (int64_t)timeout_ms * 1000;
    pthread_mutex_unlock(&r->mu);
    wake(r);
    pthread_join(r->thread, NULL);
    err = r->stop_result;
    if (err == DE_ERR_STATE)
        de__fail(DE_ERR_STATE, "de_relay_stop: %s", r->fail_msg);
    else if (err == DE_ERR_DB)
        de__fail(DE_ERR_DB,
                 "de_relay_stop: everything committed before the stop was "
                 "published, but the final checkpoint failed: %s; the "
                 "relay's state does not record the last of them as "
                 "published, so they stay in the outbox and the next relay "
                 "to take over finds them on Kafka rather than sending them "
                 "again%s",
                 r->ckpt_fail_msg,
                 r->release_failed
                     ? "; the lease was not released either: a standby "
                       "takes over when it expires (relay.lease.timeout.ms)"
                     : "");
    else if (err == DE_ERR_TIMEOUT && r->ended_standby)
        de__fail(DE_ERR_TIMEOUT,
                 "de_relay_stop: events committed before the stop were not "
                 "all published within %d ms, and this relay did not hold "
                 "the lease at the end (another relay holds it, or it could "
                 "not be checked: see the log); they stay in the outbox for "
                 "the relay that holds the lease",
                 timeout_ms);
    else if (err == DE_ERR_TIMEOUT)
        de__fail(DE_ERR_TIMEOUT,
                 "de_relay_stop: not everything committed was acknowledged "
                 "within %d ms (%llu pending); the rest stays in the outbox "
                 "for the next relay",
                 timeout_ms, (unsigned long long)r->stats.pending);
    de__relay_free(r);
    return err;
}

de_err de_relay_stats_get(de_relay *r, de_relay_stats *out)
{
    if (r == NULL || out == NULL)
        return de__fail(DE_ERR_ARG,
                        "de_relay_stats_get needs a relay and "
                        "an out pointer (got NULL %s)",
                        r == NULL ? "relay" : "out");
    pthread_mutex_lock(&r->mu);
    *out = r->stats;
    pthread_mutex_unlock(&r->mu);
    return DE_OK;
}

de_err de_relay_retry_blocked(de_relay *r)
{
    if (r == NULL)
        return de__fail(DE_ERR_ARG,
                        "de_relay_retry_blocked needs a relay (got NULL)");
    pthread_mutex_lock(&r->mu);
    r->retry_req = true;
    pthread_mutex_unlock(&r->mu);
    wake(r);
    return DE_OK;
}

/* SPDX-License-Identifier: MIT */
/*
 * relay_int.h -- the relay's insides, shared by its files:
 *
 *   relay.c           the thread, its state machine, flush/stop, the API
 *   relay_ring.c      rows read and in flight, the watermark, held-back
 *                     events and their resends
 *   relay_subjects.c  per-subject numbering and blocking
 *   relay_producer.c  the producer, its topics and their marks
 *   relay_lease.c     checkpoints, the lease, becoming active, cleanup
 *   relay_recover.c   reading Kafka forward from the marks on activation
 *   relay_state.c     the state file (cursor, counters, marks, lease)
 *   source_sqlite.c   the outbox as the relay reads it (de__source)
 *
 * Everything here runs on the relay's thread, except what struct de_relay
 * marks as shared under mu.
 *
 * Invariants (checked with assert() where the state changes):
 *  - durable_pos <= done_pos <= read_pos: the cursor on disk never passes
 *    the watermark, which never passes what was read;
 *  - every ring slot between head_tag and head_tag + count holds a row
 *    read after done_pos, in position order; 0 <= count <= cap;
 *  - a subject's ring_refs counts its slots in the ring, and
 *    (acked_epoch, acked) <= (epoch, assigned): a subject's number at the
 *    watermark never passes the last number given out; a new numbering's
 *    epoch (its first row's position) is above every earlier one's;
 *  - rows are deleted from the outbox only below durable_pos, never the
 *    row at it, and never at or after the first held-back row;
 *  - nothing is handed to Kafka before the rows it came from are durable
 *    (the source syncs before the first row of a read) and before its
 *    topic's marks are on disk (registration).
 */
#ifndef DE_RELAY_INT_H
#define DE_RELAY_INT_H

#include "relay_recover.h"
#include "source.h"

#include <assert.h>
#include <pthread.h>

/* Tags of resent held-back events carry this bit; ring tags do not. */
#define DE__REPLAY_TAG (UINT64_C(1) << 62)

/* ---- subjects (relay_subjects.c) -------------------------------------- */

typedef struct de__subj_pool de__subj_pool;

typedef struct de__subj {
    struct de__subj *hnext;
    uint64_t hash;
    /* Numbers as (epoch, seq), when their events were recorded: */
    int64_t assigned; /* seq of the last event read                      */
    int64_t epoch;    /* its epoch (0 with assigned 0: none yet)         */
    int64_t last_ms;  /* when that event was recorded                    */
    int64_t acked;    /* seq of the last event at or below the watermark */
    int64_t acked_epoch;
    int64_t acked_ms;
    int64_t persisted; /* seq in the state file                           */
    int64_t persisted_epoch;
    uint32_t ring_refs; /* ring slots holding this subject                 */
    uint32_t replaying; /* held-back events resent and not yet acked       */
    uint32_t fails;     /* consecutive collateral failures                 */
    bool dirty;         /* acked != persisted: to write at the checkpoint  */
    bool blocked;
    bool in_blocked_list;
    int64_t blocked_from; /* first held-back position                      */
    int64_t retry_at_ms;  /* next automatic retry (monotonic ms)           */
    char *error;          /* why it is blocked                             */
    size_t type_len, id_len;
    int8_t pool_class; /* its slab size class; -1: from malloc */
    char key[];        /* subject_type NUL subject_id NUL */
} de__subj;

#define DE__SUBJ_TYPE(s) ((s)->key)
#define DE__SUBJ_ID(s) ((s)->key + (s)->type_len + 1)

/* ---- the ring (relay_ring.c) ------------------------------------------ */

enum { DE__SLOT_INFLIGHT, DE__SLOT_ACKED, DE__SLOT_PARKED, DE__SLOT_FAILED };

typedef struct de__slot {
    uint64_t tag;
    int64_t position;
    int64_t recorded_at_ms;
    int64_t seq;
    int64_t epoch;
    de__subj *s;
    int64_t offset;    /* where Kafka stored it, once acknowledged; -1 */
    int32_t partition; /* likewise */
    uint32_t topic;    /* index in r->topics */
    uint8_t state;
    rd_kafka_resp_err_t err;
} de__slot;

typedef struct de__replay {
    uint64_t tag;
    int64_t position;
    int64_t epoch, seq;
    uint32_t topic; /* index in r->topics */
    de__subj *s;
    bool done;
} de__replay;

/* An event that went out, with its numbers and where Kafka stored it
 * (partition and offset -1: unknown), recorded at the next checkpoint
 * while the outbox keeps published rows (outbox.retention.ms), so that
 * de_replay can republish it with the same numbers. */
typedef struct de__sent {
    int64_t position, epoch, seq, offset;
    int32_t partition;
    uint32_t topic; /* index in r->topics */
} de__sent;

typedef struct de__park {
    int64_t position;
    int64_t epoch, seq;
    de__subj *s;
} de__park;

/* ---- topics (relay_producer.c) ---------------------------------------- */

/* A subject type's topic.  Entries live as long as the relay; the
 * producer's handle is replaced with the producer. */
typedef struct de__topic {
    char *subject_type;
    char *name;
    rd_kafka_topic_t *rkt; /* NULL until the current producer needs it */
    bool registered;       /* its marks are on disk: publishing may begin */
    int32_t nparts;        /* partitions with a known offset below */
    int64_t *seen;   /* per partition: past the last acknowledged event at or
                        below the watermark, or the end while idle (0: none) */
    int64_t *marked; /* per partition: as written in the state file */
} de__topic;

struct de_relay {
    /* ---- set at start, read-only after ---- */
    de_conf *conf;
    char *db_path;
    char *state_path;
    bool state_in_db; /* de__relay_store.state_in_db */
    char owner[64];
    char outbox_id[37];
    char log_prefix[300]; /* "relay <db>: " */
    int wake_fd;
    de__link *link;
    pthread_t thread;
    const char *source, *type_prefix, *topic_template;
    de__hmac_keyring hmac; /* event.hmac.key: the first key signs */
    int64_t batch_size, cap, poll_ms, ckpt_ms, lease_ms, retry_ms, cleanup_ms,
        retention_ms, busy_ms, subject_cache, forget_ms;
    bool continue_unverifiable; /* relay.recovery.unverifiable=continue */
    de__rk_bridge bridge;       /* the producer's opaque */
    de_stats_fn stats_fn;       /* the user's statistics callback, or NULL */
    void *stats_ctx;
    int64_t stats_interval_ms;

    /* ---- the relay's thread only ---- */
    char *rk_stats; /* the producer's latest librdkafka statistics */
    size_t rk_stats_len;
    int64_t stats_next_ms; /* monotonic: the next statistics callback */

    /* ---- shared with API threads, under mu ---- */
    pthread_mutex_t mu;
    pthread_cond_t cond;
    bool stop_req;
    int64_t stop_deadline_us; /* monotonic; INT64_MAX = none */
    uint64_t flush_req, flush_done;
    bool retry_req;
    bool finished; /* the thread has ended */
    de_err stop_result;
    char fail_msg[600]; /* why it refused to publish (DE_RELAY_REFUSED) */
    /* Everything the stop asked for was published, but the final
     * checkpoint failed (why: ckpt_fail_msg); and whether the lease could
     * not be released either.  Written by the thread before it ends. */
    bool ckpt_failed, release_failed;
    /* The loop ended without the lease (another relay held it, or it
     * could not be checked): de_relay_stop says so. */
    bool ended_standby;
    char ckpt_fail_msg[600];
    de_relay_stats stats;
    de_relay_state shared_state; /* r->state, as the API sees it */

    /* ---- relay thread only ---- */
    de_relay_state state;
    de__source *src; /* the outbox, as this relay reads it */
    de__rstate *st;  /* the state file */
    rd_kafka_t *rk;
    rd_kafka_queue_t *mainq;
    DE__VEC(de__topic) topics;
    /* events: set by callbacks and checks, acted on by the loop */
    bool need_restart;     /* a delivery failed or the producer is fatal */
    bool lease_lost;       /* another relay holds the lease now          */
    bool oom;              /* bookkeeping could not grow: start over     */
    bool woken;            /* the eventfd fired, or state was reset      */
    bool sleep_announced;  /* source told: wake me (ops->sleep_begin)    */
    bool register_pending; /* read again when register_retry_us passes   */
    int64_t last_beat_ms;  /* monotonic ms: start of the last renewal */
    int64_t next_beat_us;  /* monotonic */
    int64_t next_ckpt_us;
    int64_t next_cleanup_us;
    int64_t next_standby_us;
    int64_t next_mark_refresh_us;
    int64_t register_retry_us; /* registering a topic failed: not before */
    int64_t restart_backoff_ms;
    int64_t last_restart_us;
    /* the ring of rows read and not yet below the watermark */
    de__slot *ring;
    uint64_t head_tag; /* tag of ring[head]; tags are consecutive */
    int64_t count;
    int64_t read_pos;    /* last position read */
    int64_t done_pos;    /* watermark: everything <= is acked or parked */
    int64_t durable_pos; /* cursor in the state file */
    int64_t deleted_upto;
    int64_t max_pos;   /* highest position seen in the outbox */
    bool more_rows;    /* the last read filled its batch */
    int64_t last_read; /* rows the last read produced */
    bool dirty_pos;    /* done_pos (or a mark) moved since the checkpoint */
    /* subjects */
    de__subj **buckets;
    size_t nbuckets, nsubj;
    size_t evict_at;            /* the eviction's clock hand: a bucket index */
    struct de__subj_pool *pool; /* where entries are allocated */
    bool dirty_overflow; /* a dirty subject is not in `dirty`: scan all */
    DE__VEC(de__subj *) dirty;
    DE__VEC(de__subj *) blocked;
    DE__VEC(de__park) parks;  /* held back, to write at the next checkpoint */
    DE__VEC(int64_t) unparks; /* resent and acked, to delete likewise */
    DE__VEC(de__replay) replays;
    uint64_t next_replay_tag;
    DE__VEC(de__sent) sent;      /* went out, to record at the checkpoint */
    int64_t sent_forgotten_upto; /* their records deleted up to here */
    /* what Kafka already held at activation (relay_recover.c) */
    int64_t recover_upto; /* rows up to here may have landed already */
    int64_t landed;       /* events found there; 0: no look-ups needed */
    int64_t held_back;    /* events held back, as of the last checkpoint */
    int64_t parked_min;   /* lowest held-back position; 0 = none */
    int64_t flush_target;
    uint64_t flush_taken;
    int64_t stop_target;
    bool stop_target_set;
    /* counters for stats */
    uint64_t published, restarts, deleted, nread, skipped, forgotten;
    char last_error[256];
    int64_t last_error_ms;
};

#define de__rlog(r, level, ...)                                                \
    de__logp((r)->conf, (level), (r)->log_prefix, __VA_ARGS__)

/* The relay holds the lease and publishes (or is replacing its
 * producer to go on publishing). */
static inline bool de__relay_publishing(const de_relay *r)
{
    return r->state == DE_RELAY_ACTIVE || r->state == DE_RELAY_RESTARTING;
}

static inline de__slot *de__ring_at(de_relay *r, uint64_t tag)
{
    return &r->ring[tag % (uint64_t)r->cap];
}

/* relay.c */
void de__relay_set_state(de_relay *r, de_relay_state state, const char *why);
void de__relay_set_error(de_relay *r, const char *fmt, ...) DE__PRINTF(2, 3);
void de__relay_publish_stats(de_relay *r);
bool de__relay_stop_due(de_relay *r);
/* Takes the wire settings the writer stored with the outbox in src into
 * conf (the caller's copy), or refuses a different one (DE_ERR_CONFIG)
 * unless relay.settings.override; log_prefix names the caller. */
de_err de__adopt_settings(de__source *src, de_conf *conf, const char *db_path,
                          const char *log_prefix);
/* Where a relay reads its outbox and keeps its state: SQLite (relay.c)
 * or another database (lib/pg/relay_pg.c).  open_source sets r->src and
 * r->outbox_id (linked: the outbox is in this process and hands the
 * relay its checkpoints); open_state sets r->st and *cursor, given the
 * outbox's deletion floor.  link: whether an in-process outbox links to
 * the relay (de__outbox_attach). */
typedef struct de__relay_store {
    de_err (*open_source)(const char *where, de_relay *r, bool linked);
    de_err (*open_state)(const char *where, de_relay *r, int64_t floor,
                         int64_t *cursor);
    bool link;
    /* The state lives in the outbox's own database (PostgreSQL), not in
     * a file beside it: messages about restores say so. */
    bool state_in_db;
} de__relay_store;

/* Starts a relay on store: name is what logs and messages call the
 * database, where what store opens, state what they call the state;
 * conf (the relay's own copy) is owned by the relay from now on, even on
 * failure; ob (may be NULL) is the in-process outbox. */
de_err de__relay_new(const char *name, const char *where, const char *state,
                     de_conf *conf, de_outbox *ob, const de__relay_store *store,
                     de_relay **out);

/* relay.state.path, or "<db_path>-relay" in buf. */
const char *de__relay_state_path(const de_conf *conf, const char *db_path,
                                 char *buf, size_t size);
/* Allocates a relay with no thread, database or producer, for the unit
 * tests of the ring and subjects; freed with de__relay_free. */
de_relay *de__relay_alloc(int64_t cap, de_conf *conf);
void de__relay_free(de_relay *r);

/* relay_subjects.c */
de__subj *de__subj_get(de_relay *r, const char *type, const char *id,
                       size_t id_len);
de_err de__subj_prefetch(de_relay *r, int n, const char *const *types,
                         const char *const *ids);
void de__subj_sweep(de_relay *r, bool all);
/* Frees the entries' slabs (after de__subj_sweep(r, true)). */
void de__subj_pool_free(de_relay *r);
void de__subj_mark_dirty(de_relay *r, de__subj *s);
void de__subj_block(de_relay *r, de__subj *s, int64_t position, const char *why,
                    int64_t retry_in_ms);

/* relay_ring.c */
void de__relay_on_dr(rd_kafka_t *rk, const rd_kafka_message_t *m, void *opaque);
de__slot *de__ring_push(de_relay *r, int64_t position, int64_t recorded_at_ms,
                        de__subj *s);
void de__relay_advance(de_relay *r);
de_err de__relay_read(de_relay *r);
void de__relay_reset(de_relay *r);
void de__relay_compact_replays(de_relay *r);
void de__relay_retry_blocked(de_relay *r, bool all);
bool de__relay_published_through(de_relay *r, int64_t target);

/* relay_producer.c */
/* Refuses (DE_ERR_CONFIG) a configuration a producer that publishes as the
 * relay does cannot run with: no bootstrap.servers, another value of a
 * property it owns, transactional.id.  who names it ("relay"). */
de_err de__producer_check_conf(const de_conf *conf, const char *who);
/* Such a producer's configuration: the relay's defaults (client.id
 * "deliveryevents-<who>", the murmur2_random partitioner, ...), conf's
 * librdkafka properties, the owned ones, the bridge. */
de_err de__producer_conf(const de_conf *conf, const char *who,
                         int64_t queue_max, de__rk_bridge *bridge,
                         rd_kafka_conf_t **out);
/* Hands a row's record (envelope.c's headers, the subject id as the key,
 * the payload, occurred_at as the timestamp; signed with hmac's first key
 * when it has one) to rk for rkt, copied.
 * DE__AGAIN when librdkafka did not take it (*kerr says why). */
de_err de__produce_row(rd_kafka_t *rk, rd_kafka_topic_t *rkt,
                       const de__row *row, int64_t epoch, int64_t seq,
                       const char *source, const char *type_prefix,
                       const de__hmac_keyring *hmac, void *opaque,
                       rd_kafka_resp_err_t *kerr);
/* event.hmac.key's keys from conf (DE_ERR_NOMEM only: the value was
 * checked when it was set). */
de_err de__hmac_from_conf(const de_conf *conf, de__hmac_keyring *kr);
de_err de__relay_producer_new(de_relay *r);
void de__relay_producer_destroy(de_relay *r);
void de__relay_purge(de_relay *r);
bool de__relay_collateral(rd_kafka_resp_err_t e);
de__topic *de__relay_topic(de_relay *r, const char *subject_type,
                           uint32_t *idx);
de_err de__relay_register_topic(de_relay *r, de__topic *t);
void de__relay_topic_seen(de_relay *r, uint32_t idx, int32_t partition,
                          int64_t offset);
void de__relay_refresh_marks(de_relay *r);
void de__relay_topics_free(de_relay *r);
de_err de__relay_send(de_relay *r, const de__row *row, int64_t epoch,
                      int64_t seq, uint64_t tag, de__topic *t,
                      rd_kafka_resp_err_t *kerr);
void de__relay_restart(de_relay *r);
extern const de__rk_owned de__relay_owned[];
extern const size_t de__relay_nowned;

/* relay_lease.c */
de_err de__relay_checkpoint(de_relay *r);
void de__relay_maybe_checkpoint(de_relay *r, int64_t now_us);
void de__relay_try_activate(de_relay *r);
/* Whether this relay may no longer hold the lease: lost, or its last
 * renewal began nine tenths of relay.lease.timeout.ms ago or more (by
 * the monotonic clock) -- a standby takes over once the heartbeat, which
 * that renewal wrote after it began, is a whole timeout old; the tenth
 * left covers what was handed to the producer just before (linger.ms,
 * a round trip).  Sets lease_lost: the fence -- nothing more goes to
 * the producer until the lease is taken again. */
bool de__relay_lease_expired(de_relay *r);
void de__relay_demote(de_relay *r, const char *why);
de_err de__relay_cleanup(de_relay *r, bool *behind);
de_err de__relay_forget(de_relay *r);
de_err de__relay_check_cursor(de_relay *r, int64_t cursor, const char *id);

/* replay.c: de_replay on any backend.  open opens the outbox's source
 * (not creating it) and its relay state as a reader (only cursor,
 * read_begin/read_end, published_get and parked_at are called on it;
 * read_begin must give both passes one snapshot) for the database where
 * names; *src and *st are closed by de__replay_run, also on failure.  where
 * is what messages call the database; sel and out as de_replay's. */
typedef de_err de__replay_open_fn(void *ctx, de_conf *conf, de__source **src,
                                  de__rstate **st);
de_err de__replay_run(const char *where, const de_conf *conf,
                      const de_replay_select *sel, int timeout_ms,
                      de_replay_result *out, de__replay_open_fn *open,
                      void *ctx);
/* Zeroes out (when not NULL) and checks the arguments every de_replay
 * takes: DE_ERR_ARG naming what is wrong; param is the name of the
 * database argument ("db_path", "conninfo"), noun what it is. */
de_err de__replay_check(const char *where, const char *param, const char *noun,
                        const de_replay_select *sel, de_replay_result *out);

#endif

/* SPDX-License-Identifier: MIT */
/*
 * relay_producer.c -- the relay's producer and its topics.
 *
 * One idempotent, gapless librdkafka producer at a time; a fatal error or
 * any failed delivery replaces it (de__relay_restart): purge, drain,
 * block the subjects whose own event was refused, checkpoint, start over
 * from the watermark with the same numbers.
 *
 * Topics: each subject type's topic is registered before the relay first
 * publishes to it -- the current end of each of its partitions written to
 * the state file as its marks -- and the marks rise with acknowledged
 * offsets at or below the watermark, and to the partitions' ends while the
 * relay is idle (relay_recover.c reads forward from them).
 *
 * Every call into Kafka that waits here is bounded: metadata and
 * rd_kafka_offsets_for_times keep their timeouts (librdkafka 2.0's
 * rd_kafka_query_watermark_offsets does not, with the brokers down).
 */
#include "relay_int.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Consecutive non-specific failures of one subject's event before the
 * subject is blocked rather than retried forever. */
#define MAX_COLLATERAL_FAILS 5
/* How long registering a topic waits for Kafka (each request). */
#define REGISTER_TIMEOUT_MS 2000

/* Properties the relay's guarantees depend on, and why. */
const de__rk_owned de__relay_owned[] = {
    {"enable.idempotence", "true",
     "it keeps each partition's order and avoids duplicates across retries"},
    {"enable.gapless.guarantee", "true",
     "a batch that fails for good must stop the producer, not leave a gap"},
    {"message.timeout.ms", "2147483647",
     "a message that times out is dropped while later ones are written; "
     "the relay waits for the broker instead"},
};
const size_t de__relay_nowned = DE__ARRAY_LEN(de__relay_owned);

/* librdkafka lines the producer causes on purpose, logged as debug. */
static const char *const quiet_lines[] = {
    "enable.gapless.guarantee is experimental", NULL};

de_err de__producer_check_conf(const de_conf *conf, const char *who)
{
    const char *v = NULL;

    if (!de__conf_rdkafka_get(conf, "bootstrap.servers", &v) &&
        !de__conf_rdkafka_get(conf, "metadata.broker.list", &v))
        return de__fail(DE_ERR_CONFIG,
                        "the %s needs bootstrap.servers "
                        "(the Kafka brokers to publish to)",
                        who);
    for (size_t i = 0; i < de__relay_nowned; i++) {
        const de__rk_owned *o = &de__relay_owned[i];
        if (de__conf_rdkafka_get(conf, o->key, &v) && strcmp(v, o->value) != 0)
            return de__fail(DE_ERR_CONFIG,
                            "%s=%s is not allowed for the %s: it keeps "
                            "%s=%s because %s",
                            o->key, v, who, o->key, o->value, o->why);
    }
    if (de__conf_rdkafka_get(conf, "transactional.id", &v))
        return de__fail(DE_ERR_CONFIG,
                        "transactional.id is not allowed for the %s: it "
                        "uses an idempotent, not a transactional, producer",
                        who);
    return DE_OK;
}

de_err de__producer_conf(const de_conf *conf, const char *who,
                         int64_t queue_max, de__rk_bridge *bridge,
                         rd_kafka_conf_t **out)
{
    int64_t max_bytes = de__conf_int(conf, DE__K_EVENT_MAX_BYTES);
    char inflight[32], maxmsg[32], client[64];
    de__rk_prop defaults[] = {
        {"client.id", client},
        {"partitioner", "murmur2_random"},
        {"socket.nagle.disable", "true"},
        {"reconnect.backoff.ms", "10"},
        {"reconnect.backoff.max.ms", "1000"},
        /* Batches under load; at low load the relay sends at once (see
         * LOW_LOAD_ROWS in relay.c), so latency does not pay for it. */
        {"linger.ms", "5"},
        {"queue.buffering.max.kbytes", "32768"},
        {"queue.buffering.max.messages", inflight},
        {"message.max.bytes", maxmsg},
    };

    snprintf(client, sizeof client, "deliveryevents-%s", who);
    snprintf(inflight, sizeof inflight, "%lld", (long long)queue_max);
    snprintf(
        maxmsg, sizeof maxmsg, "%lld",
        (long long)(max_bytes + 10000 > 1000000 ? max_bytes + 10000 : 1000000));
    bridge->quiet = quiet_lines;
    return de__rk_conf(conf, who, defaults, DE__ARRAY_LEN(defaults),
                       de__relay_owned, de__relay_nowned, bridge, out);
}

de_err de__relay_producer_new(de_relay *r)
{
    static const uint64_t one = 1;
    rd_kafka_conf_t *c;
    de_err err;

    if ((err = de__producer_conf(r->conf, "relay", r->cap * 2 + 1000,
                                 &r->bridge, &c)) != DE_OK)
        return err;
    rd_kafka_conf_set_dr_msg_cb(c, de__relay_on_dr);
    if ((err = de__rk_new(RD_KAFKA_PRODUCER, c, "relay's producer", &r->rk)) !=
        DE_OK)
        return err;
    /* Delivery reports, errors and log lines wake the relay's thread. */
    r->mainq = rd_kafka_queue_get_main(r->rk);
    rd_kafka_queue_io_event_enable(r->mainq, r->wake_fd, &one, sizeof one);
    return DE_OK;
}

void de__relay_producer_destroy(de_relay *r)
{
    for (size_t i = 0; i < r->topics.n; i++) {
        if (r->topics.v[i].rkt != NULL)
            rd_kafka_topic_destroy(r->topics.v[i].rkt);
        r->topics.v[i].rkt = NULL;
    }
    if (r->mainq) {
        rd_kafka_queue_io_event_enable(r->mainq, -1, NULL, 0);
        rd_kafka_queue_destroy(r->mainq);
        r->mainq = NULL;
    }
    if (r->rk) {
        rd_kafka_destroy(r->rk);
        r->rk = NULL;
    }
}

/* Hands one row to the producer with the given number and tag.  DE__AGAIN
 * when librdkafka did not take it (*kerr says why: a full queue, or an
 * error the caller sorts out); DE_ERR_NOMEM. */
de_err de__relay_send(de_relay *r, const de__row *row, int64_t epoch,
                      int64_t seq, uint64_t tag, de__topic *t,
                      rd_kafka_resp_err_t *kerr)
{
    return de__produce_row(r->rk, t->rkt, row, epoch, seq, r->source,
                           r->type_prefix, &r->hmac, (void *)(uintptr_t)tag,
                           kerr);
}

de_err de__produce_row(rd_kafka_t *rk, rd_kafka_topic_t *rkt,
                       const de__row *row, int64_t epoch, int64_t seq,
                       const char *source, const char *type_prefix,
                       const de__hmac_keyring *hmac, void *opaque,
                       rd_kafka_resp_err_t *kerr)
{
    rd_kafka_headers_t *hdrs;

    *kerr = RD_KAFKA_RESP_ERR_NO_ERROR;
    hdrs = de__envelope_headers(row, epoch, seq, source, type_prefix);
    if (hdrs == NULL)
        return de__fail(DE_ERR_NOMEM, "out of memory producing");
    if (hmac->n > 0 && !de__envelope_sign(hdrs, &hmac->keys[0], row->subject_id,
                                          row->subject_id_len, row->payload,
                                          row->payload_len)) {
        rd_kafka_headers_destroy(hdrs);
        return de__fail(DE_ERR_NOMEM, "out of memory signing a record");
    }
    *kerr = rd_kafka_producev(
        rk, RD_KAFKA_V_RKT(rkt),
        RD_KAFKA_V_KEY(row->subject_id, row->subject_id_len),
        RD_KAFKA_V_VALUE((void *)(uintptr_t)row->payload, row->payload_len),
        RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
        RD_KAFKA_V_TIMESTAMP(row->occurred_at_ms), RD_KAFKA_V_HEADERS(hdrs),
        RD_KAFKA_V_OPAQUE(opaque), RD_KAFKA_V_END);
    if (*kerr == RD_KAFKA_RESP_ERR_NO_ERROR)
        return DE_OK;
    rd_kafka_headers_destroy(hdrs); /* ours until producev took them */
    return DE__AGAIN;
}

void de__relay_topics_free(de_relay *r)
{
    for (size_t i = 0; i < r->topics.n; i++) {
        de__topic *t = &r->topics.v[i];
        if (t->rkt != NULL)
            rd_kafka_topic_destroy(t->rkt);
        free(t->subject_type);
        free(t->name);
        free(t->seen);
        free(t->marked);
    }
    r->topics.n = 0;
}

/* The entry of a subject type's topic (index in *idx), with the current
 * producer's handle; NULL with the message set when out of memory. */
de__topic *de__relay_topic(de_relay *r, const char *subject_type, uint32_t *idx)
{
    char name[256];
    de__topic t, *tp = NULL;

    for (size_t i = 0; i < r->topics.n && tp == NULL; i++)
        if (strcmp(r->topics.v[i].subject_type, subject_type) == 0) {
            tp = &r->topics.v[i];
            *idx = (uint32_t)i;
        }
    if (tp == NULL) {
        memset(&t, 0, sizeof t);
        de__topic_name(name, sizeof name, r->topic_template, subject_type);
        t.subject_type = strdup(subject_type);
        t.name = strdup(name);
        if (t.subject_type == NULL || t.name == NULL ||
            !DE__VEC_PUSH(r->topics, t)) {
            free(t.subject_type);
            free(t.name);
            de__fail(DE_ERR_NOMEM, "relay: out of memory");
            return NULL;
        }
        *idx = (uint32_t)(r->topics.n - 1);
        tp = &r->topics.v[*idx];
    }
    if (tp->rkt == NULL &&
        (tp->rkt = rd_kafka_topic_new(r->rk, tp->name, NULL)) == NULL) {
        de__fail(DE_ERR_NOMEM, "relay: cannot create topic %s: %s", tp->name,
                 rd_kafka_err2str(rd_kafka_last_error()));
        return NULL;
    }
    return tp;
}

/* Grows a topic's per-partition offsets to cover partition p. */
static bool topic_cover(de__topic *t, int32_t p)
{
    int32_t n;
    int64_t *seen, *marked;

    if (p < t->nparts)
        return true;
    n = p + 1 > 2 * t->nparts ? p + 1 : 2 * t->nparts;
    seen = realloc(t->seen, (size_t)n * sizeof *seen);
    if (seen == NULL)
        return false;
    t->seen = seen;
    marked = realloc(t->marked, (size_t)n * sizeof *marked);
    if (marked == NULL)
        return false;
    t->marked = marked;
    for (int32_t i = t->nparts; i < n; i++)
        t->seen[i] = t->marked[i] = 0;
    t->nparts = n;
    return true;
}

/* An event at or below the watermark was stored at (partition, offset):
 * the partition's mark may rise past it at the next checkpoint.  Out of
 * memory only keeps the mark lower, which is safe. */
void de__relay_topic_seen(de_relay *r, uint32_t idx, int32_t partition,
                          int64_t offset)
{
    de__topic *t;

    if (idx >= r->topics.n || partition < 0 || offset < 0)
        return;
    t = &r->topics.v[idx];
    if (topic_cover(t, partition) && offset + 1 > t->seen[partition])
        t->seen[partition] = offset + 1;
}

/* Errors that say nothing about the message itself: the producer's state,
 * the network, leadership.  The message is resent after a restart.  Any
 * other delivery error is the message's own and blocks its subject. */
bool de__relay_collateral(rd_kafka_resp_err_t e)
{
    switch (e) {
    case RD_KAFKA_RESP_ERR__PURGE_QUEUE:
    case RD_KAFKA_RESP_ERR__PURGE_INFLIGHT:
    case RD_KAFKA_RESP_ERR__FATAL:
    case RD_KAFKA_RESP_ERR__MSG_TIMED_OUT:
    case RD_KAFKA_RESP_ERR__TIMED_OUT:
    case RD_KAFKA_RESP_ERR__TIMED_OUT_QUEUE:
    case RD_KAFKA_RESP_ERR__TRANSPORT:
    case RD_KAFKA_RESP_ERR__ALL_BROKERS_DOWN:
    case RD_KAFKA_RESP_ERR__DESTROY:
    case RD_KAFKA_RESP_ERR__STATE:
    case RD_KAFKA_RESP_ERR__INCONSISTENT:
    case RD_KAFKA_RESP_ERR__GAPLESS_GUARANTEE:
    case RD_KAFKA_RESP_ERR__RETRY:
    case RD_KAFKA_RESP_ERR__NODE_UPDATE:
    case RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER:
    case RD_KAFKA_RESP_ERR_DUPLICATE_SEQUENCE_NUMBER:
    case RD_KAFKA_RESP_ERR_UNKNOWN_PRODUCER_ID:
    case RD_KAFKA_RESP_ERR_INVALID_PRODUCER_EPOCH:
    case RD_KAFKA_RESP_ERR_INVALID_PRODUCER_ID_MAPPING:
    case RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT:
    case RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION:
    case RD_KAFKA_RESP_ERR_LEADER_NOT_AVAILABLE:
    case RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS:
    case RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS_AFTER_APPEND:
    case RD_KAFKA_RESP_ERR_NETWORK_EXCEPTION:
    case RD_KAFKA_RESP_ERR_KAFKA_STORAGE_ERROR:
    case RD_KAFKA_RESP_ERR_BROKER_NOT_AVAILABLE:
    case RD_KAFKA_RESP_ERR_REPLICA_NOT_AVAILABLE:
    case RD_KAFKA_RESP_ERR_FENCED_LEADER_EPOCH:
    case RD_KAFKA_RESP_ERR_UNKNOWN_LEADER_EPOCH:
    case RD_KAFKA_RESP_ERR_THROTTLING_QUOTA_EXCEEDED: return true;
    default: return false;
    }
}

/*
 * Registers a topic before the relay first publishes to it: the current
 * end of each partition becomes its mark, on disk, so that a later
 * activation knows where to look for this outbox's events (see
 * relay_recover.c).  A topic that does not exist gets one mark "from the
 * beginning of every partition".  Kafka not answering is retried
 * (DE__AGAIN, after a pause); nothing of the topic is published meanwhile.
 */
de_err de__relay_register_topic(de_relay *r, de__topic *t)
{
    const struct rd_kafka_metadata *md = NULL;
    rd_kafka_resp_err_t e;
    int64_t *ends = NULL;
    int32_t n = 0;
    bool has, held;
    de_err err;
    const char *what = "";

    if (de__mono_us() < r->register_retry_us)
        return DE__AGAIN;
    if ((err = de__rstate_has_marks(r->st, t->name, &has)) != DE_OK)
        return err;
    if (has) {
        t->registered = true;
        return DE_OK;
    }
    de__relay_publish_stats(r); /* what waits is visible while Kafka is asked */
    e = rd_kafka_metadata(r->rk, 0, t->rkt, &md, REGISTER_TIMEOUT_MS);
    if (e != RD_KAFKA_RESP_ERR_NO_ERROR) {
        what = "no metadata";
        goto again;
    }
    e = md->topic_cnt == 1 ? md->topics[0].err
                           : RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART;
    n = md->topic_cnt == 1 ? md->topics[0].partition_cnt : 0;
    rd_kafka_metadata_destroy(md);
    if (e == RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART) {
        n = 0;
    } else if (e != RD_KAFKA_RESP_ERR_NO_ERROR || n <= 0) {
        what = "no partitions";
        goto again;
    } else if ((ends = calloc((size_t)n, sizeof *ends)) == NULL) {
        return de__fail(DE_ERR_NOMEM, "relay: out of memory");
    } else if ((e = de__topic_offsets(r->rk, t->name, n, RD_KAFKA_OFFSET_END,
                                      ends, REGISTER_TIMEOUT_MS)) !=
               RD_KAFKA_RESP_ERR_NO_ERROR) {
        what = "no end offsets";
        goto again;
    }
    if ((err = de__rstate_begin(r->st, r->owner, de__now_ms(), &held)) != DE_OK)
        goto state_fail;
    if (!held) {
        free(ends);
        r->lease_lost = true;
        return DE__AGAIN;
    }
    err = n == 0 ? de__rstate_put_mark(r->st, t->name, -1, 0) : DE_OK;
    for (int32_t p = 0; p < n && err == DE_OK; p++)
        err = de__rstate_put_mark(r->st, t->name, p, ends[p]);
    if (err != DE_OK || (err = de__rstate_commit(r->st)) != DE_OK) {
        de__rstate_rollback(r->st);
        goto state_fail;
    }
    if (n > 0 && topic_cover(t, n - 1))
        for (int32_t p = 0; p < n; p++)
            t->seen[p] = t->marked[p] = ends[p];
    free(ends);
    t->registered = true;
    de__rlog(r, DE_LOG_NOTICE, "publishing to topic %s (%d partitions%s)",
             t->name, (int)n, n == 0 ? ": it does not exist yet" : "");
    return DE_OK;
state_fail:
    free(ends);
    de__rlog(r, DE_LOG_WARNING, "registering topic %s: %s (retrying)", t->name,
             de_errmsg());
    r->register_retry_us = de__mono_us() + 200000;
    r->register_pending = true;
    return DE__AGAIN;
again:
    free(ends);
    de__relay_set_error(r, "topic %s: %s: %s", t->name, what,
                        rd_kafka_err2str(e));
    de__rlog(r, DE_LOG_WARNING,
             "cannot register topic %s before publishing to it: %s: %s "
             "(retrying in 1 s)",
             t->name, what, rd_kafka_err2str(e));
    r->register_retry_us = de__mono_us() + 1000000;
    r->register_pending = true;
    return DE__AGAIN;
}

/*
 * With nothing in flight and everything read acknowledged, every event of
 * this outbox on Kafka is at or below the cursor, so the end of each
 * partition now is a valid mark: anything published later lands after
 * it.  Raises the marks to those ends (written with the next checkpoint),
 * which keeps partitions the relay rarely publishes to from falling
 * behind the topic's retention.  Partitions that do not answer keep their
 * mark.
 */
void de__relay_refresh_marks(de_relay *r)
{
    assert(r->count == 0);
    for (size_t i = 0; i < r->topics.n; i++) {
        de__topic *t = &r->topics.v[i];
        const struct rd_kafka_metadata *md = NULL;
        int64_t *ends;
        int32_t n;

        /* Short waits: Kafka not answering only postpones this. */
        if (!t->registered || t->rkt == NULL ||
            rd_kafka_metadata(r->rk, 0, t->rkt, &md, 500) !=
                RD_KAFKA_RESP_ERR_NO_ERROR)
            return;
        n = md->topic_cnt == 1 && md->topics[0].err == 0
                ? md->topics[0].partition_cnt
                : 0;
        rd_kafka_metadata_destroy(md);
        if (n <= 0 || !topic_cover(t, n - 1) ||
            (ends = calloc((size_t)n, sizeof *ends)) == NULL)
            continue;
        if (de__topic_offsets(r->rk, t->name, n, RD_KAFKA_OFFSET_END, ends,
                              500) == RD_KAFKA_RESP_ERR_NO_ERROR) {
            for (int32_t p = 0; p < n; p++)
                if (ends[p] > t->seen[p]) {
                    t->seen[p] = ends[p];
                    r->dirty_pos = true; /* written with the cursor */
                }
        }
        free(ends);
    }
}

/* Purges the producer and waits (up to a few seconds) for every delivery
 * report, so that nothing queued is written after this point. */
void de__relay_purge(de_relay *r)
{
    int64_t deadline = de__mono_us() + 5000000;

    rd_kafka_purge(r->rk, RD_KAFKA_PURGE_F_QUEUE | RD_KAFKA_PURGE_F_INFLIGHT);
    while (rd_kafka_outq_len(r->rk) > 0 && de__mono_us() < deadline)
        rd_kafka_poll(r->rk, 10);
    rd_kafka_poll(r->rk, 0);
}

/* Replaces the producer after a fatal error or a failed delivery. */
void de__relay_restart(de_relay *r)
{
    int64_t now_us = de__mono_us();
    de_err err;

    de__relay_set_state(r, DE_RELAY_RESTARTING,
                        r->last_error[0] ? r->last_error : "delivery failed");
    de__relay_purge(r);
    /* Block the subjects whose own event was refused; count the others. */
    for (int64_t i = 0; i < r->count; i++) {
        de__slot *sl = de__ring_at(r, r->head_tag + (uint64_t)i);
        if (sl->state != DE__SLOT_FAILED)
            continue;
        if (!de__relay_collateral(sl->err)) {
            char why[300];
            snprintf(why, sizeof why,
                     "Kafka refused the event at position "
                     "%lld: %s",
                     (long long)sl->position, rd_kafka_err2str(sl->err));
            de__subj_block(r, sl->s, sl->position, why, r->retry_ms);
        } else if (sl->err != RD_KAFKA_RESP_ERR__PURGE_QUEUE &&
                   sl->err != RD_KAFKA_RESP_ERR__PURGE_INFLIGHT &&
                   ++sl->s->fails >= MAX_COLLATERAL_FAILS) {
            char why[300];
            snprintf(why, sizeof why,
                     "the event at position %lld failed %d "
                     "times in a row: %s",
                     (long long)sl->position, MAX_COLLATERAL_FAILS,
                     rd_kafka_err2str(sl->err));
            de__subj_block(r, sl->s, sl->position, why, r->retry_ms);
        }
    }
    de__relay_advance(r);
    if ((err = de__relay_checkpoint(r)) != DE_OK)
        de__rlog(r, DE_LOG_WARNING, "checkpoint before restart failed: %s",
                 de_errmsg());
    de__relay_producer_destroy(r);
    de__relay_reset(r);
    r->need_restart = false;
    r->restarts++;
    /* Back off when restarts follow each other closely. */
    if (now_us - r->last_restart_us > 30000000)
        r->restart_backoff_ms = 0;
    r->restart_backoff_ms =
        r->restart_backoff_ms
            ? (r->restart_backoff_ms * 2 > 5000 ? 5000
                                                : r->restart_backoff_ms * 2)
            : 50;
    r->last_restart_us = now_us;
    for (int64_t waited = 0;
         waited < r->restart_backoff_ms && !de__relay_stop_due(r); waited += 10)
        usleep(10000);
    while ((err = de__relay_producer_new(r)) != DE_OK) {
        de__rlog(r, DE_LOG_ERR, "cannot create a producer: %s", de_errmsg());
        if (de__relay_stop_due(r))
            return;
        sleep(1);
    }
    de__relay_set_state(r, DE_RELAY_ACTIVE, "producer replaced");
    de__rlog(r, DE_LOG_NOTICE, "restart %llu: resuming at position %lld",
             (unsigned long long)r->restarts, (long long)r->done_pos + 1);
}

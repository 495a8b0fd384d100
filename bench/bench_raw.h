/* SPDX-License-Identifier: MIT */
/*
 * bench_raw.h -- the baseline of the relay benchmarks (bench_relay.c,
 * pg/bench_pg_relay.c): raw librdkafka producing the records a relay
 * would, built from memory, with the relay's producer settings.  Include
 * after bench_kafka.h.
 */
#ifndef DE_BENCH_RAW_H
#define DE_BENCH_RAW_H

#include "bench_kafka.h"

/* One record: what differs between records. */
struct raw_msg {
    char id[40];
    char key[24];
    int64_t ts;
    int64_t seq;
    int64_t epoch;
};

/* Records acknowledged by the cluster since the last reset. */
static long raw_acked;

static inline void raw_dr(rd_kafka_t *rk, const rd_kafka_message_t *m, void *op)
{
    (void)rk;
    (void)op;
    if (m->err == 0)
        raw_acked++;
}

/* The relay's producer settings (see relay_producer.c), for a fair
 * baseline. */
static inline rd_kafka_t *raw_producer(void)
{
    static const char *const kv[][2] = {
        {"enable.idempotence", "true"},
        {"enable.gapless.guarantee", "true"},
        {"message.timeout.ms", "2147483647"},
        {"partitioner", "murmur2_random"},
        {"socket.nagle.disable", "true"},
        {"reconnect.backoff.ms", "10"},
        {"reconnect.backoff.max.ms", "1000"},
        {"linger.ms", "5"},
        {"queue.buffering.max.kbytes", "32768"},
        {"queue.buffering.max.messages", "41000"},
    };
    rd_kafka_conf_t *c = rd_kafka_conf_new();
    char err[512];
    rd_kafka_t *rk;

    rd_kafka_conf_set(c, "bootstrap.servers", bootstrap, err, sizeof err);
    for (size_t i = 0; i < sizeof kv / sizeof kv[0]; i++)
        BENCH_CHECK(rd_kafka_conf_set(c, kv[i][0], kv[i][1], err, sizeof err) ==
                        RD_KAFKA_CONF_OK,
                    "%s", err);
    rd_kafka_conf_set_dr_msg_cb(c, raw_dr);
    rd_kafka_conf_set_log_cb(c, quiet_rk);
    rk = rd_kafka_new(RD_KAFKA_PRODUCER, c, err, sizeof err);
    BENCH_CHECK(rk != NULL, "%s", err);
    return rk;
}

static inline void raw_header(rd_kafka_headers_t *h, const char *k,
                              const char *v)
{
    rd_kafka_header_add(h, k, -1, v, -1);
}

/* Record i as the relay builds it (its headers; ce_time's milliseconds
 * vary as the relay's would), produced with copy, waiting while the
 * queue is full. */
static inline void raw_produce(rd_kafka_t *rk, rd_kafka_topic_t *rkt,
                               const struct raw_msg *m, long i)
{
    rd_kafka_headers_t *h = rd_kafka_headers_new(14);
    rd_kafka_resp_err_t err;
    char seq[24], epoch[24], time[32];

    snprintf(seq, sizeof seq, "%lld", (long long)m->seq);
    snprintf(epoch, sizeof epoch, "%lld", (long long)m->epoch);
    snprintf(time, sizeof time, "2026-11-25T11:00:00.%03dZ", (int)(i % 1000));
    raw_header(h, "ce_specversion", "1.0");
    raw_header(h, "ce_id", m->id);
    raw_header(h, "ce_source", "/bench");
    raw_header(h, "ce_type", "delivery.assigned");
    raw_header(h, "ce_subject", m->key);
    raw_header(h, "ce_time", time);
    raw_header(h, "content-type", "application/json");
    raw_header(h, "ce_partitionkey", m->key);
    raw_header(h, "ce_subjectseq", seq);
    raw_header(h, "ce_subjectepoch", epoch);
    raw_header(h, "ce_subjecttype", "delivery");
    raw_header(h, "ce_action", "assigned");
    for (;;) {
        err = rd_kafka_producev(
            rk, RD_KAFKA_V_RKT(rkt), RD_KAFKA_V_KEY(m->key, strlen(m->key)),
            RD_KAFKA_V_VALUE((void *)(uintptr_t)payload, sizeof payload - 1),
            RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
            RD_KAFKA_V_TIMESTAMP(m->ts), RD_KAFKA_V_HEADERS(h), RD_KAFKA_V_END);
        if (err != RD_KAFKA_RESP_ERR__QUEUE_FULL)
            break;
        rd_kafka_poll(rk, 1);
    }
    BENCH_CHECK(err == 0, "produce: %s", rd_kafka_err2str(err));
}

/* The n records of a backlog over `subjects` subjects, as a relay
 * publishes them (event x of subject x mod subjects, as make_backlog
 * writes them); freed with free(). */
static inline struct raw_msg *raw_msgs(long n, long subjects)
{
    struct raw_msg *msgs = calloc((size_t)n, sizeof *msgs);
    int64_t *seqs = calloc((size_t)subjects, sizeof *seqs);
    int64_t *first = calloc((size_t)subjects, sizeof *first);

    BENCH_CHECK(msgs && seqs && first, "out of memory");
    for (long i = 0; i < n; i++) {
        long x = i + 1;
        snprintf(msgs[i].id, sizeof msgs[i].id,
                 "01937a1e-%04lx-7%03lx-8%03lx-%012lx", x / 65536 % 65536,
                 x % 4096, x / 4096 % 4096, x);
        snprintf(msgs[i].key, sizeof msgs[i].key, SUBJECT_FMT, x % subjects);
        msgs[i].ts = 1795604400000 + x;
        msgs[i].seq = ++seqs[x % subjects];
        /* As the relay numbers a subject it never saw: its first event's
         * position names the numbering. */
        if (first[x % subjects] == 0)
            first[x % subjects] = x;
        msgs[i].epoch = first[x % subjects];
    }
    free(seqs);
    free(first);
    return msgs;
}

/* Raw librdkafka: the n records to topic, until all are acknowledged;
 * records per second. */
static inline double raw_run(const char *topic, const struct raw_msg *msgs,
                             long n)
{
    rd_kafka_t *rk = raw_producer();
    rd_kafka_topic_t *rkt = rd_kafka_topic_new(rk, topic, NULL);
    double t0 = bench_now(), t;

    raw_acked = 0;
    for (long i = 0; i < n; i++) {
        raw_produce(rk, rkt, &msgs[i], i);
        rd_kafka_poll(rk, 0);
    }
    while (raw_acked < n)
        rd_kafka_poll(rk, 10);
    t = bench_now() - t0;
    rd_kafka_topic_destroy(rkt);
    rd_kafka_destroy(rk);
    return (double)n / t;
}

#endif

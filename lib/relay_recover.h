/* SPDX-License-Identifier: MIT */
/*
 * relay_recover.h -- reading Kafka forward from the relay's marks when it
 * becomes active (see relay_recover.c).  Runs on the relay's thread.
 */
#ifndef DE_RELAY_RECOVER_H
#define DE_RELAY_RECOVER_H

#include "relay_state.h"

typedef struct de__recover_opts {
    const de_conf *conf;          /* librdkafka properties: servers, TLS ... */
    const char *source;           /* this outbox's ce_source                 */
    const char *owner;            /* the lease, renewed while reading        */
    int64_t lease_ms;             /* relay.lease.timeout.ms                  */
    bool continue_unverifiable;   /* relay.recovery.unverifiable=continue    */
    bool (*cancelled)(void *ctx); /* polled while reading; may be NULL   */
    void *cancel_ctx;
} de__recover_opts;

typedef struct de__recover_result {
    int64_t records;    /* records read                             */
    int64_t ours;       /* of them, this outbox's events            */
    int64_t landed;     /* distinct events noted                    */
    int64_t subjects;   /* subjects whose numbers were noted        */
    int64_t unverified; /* partitions read from what was left       */
    int64_t elapsed_ms;
    int64_t beat_ms; /* monotonic ms: start of the last renewal; 0: none */
    int partitions;  /* partitions read                          */
    bool lease_lost; /* the lease went to another relay meanwhile */
} de__recover_result;

/*
 * Reads every marked partition from its mark to its current end, notes
 * this outbox's events in the state's temporary tables (de__rstate_landed_
 * get finds them) and raises the durable counters to the highest numbers
 * found.  Returns DE_OK (also when res->lease_lost); DE_ERR_STATE when a
 * mark cannot be read from (message says what to do); DE_ERR_KAFKA when
 * Kafka did not answer in time (try again later); DE_ERR_TIMEOUT when
 * cancelled; DE_ERR_DB; DE_ERR_CONFIG; DE_ERR_NOMEM.
 */
de_err de__relay_recover(de__rstate *st, const de__recover_opts *o,
                         de__recover_result *res);

/* The first (which = RD_KAFKA_OFFSET_BEGINNING) or next (RD_KAFKA_OFFSET_
 * END) offset of partitions 0..n-1 of topic, into out[]; one request per
 * leader, bounded by timeout_ms.  (rd_kafka_offsets_for_times keeps its
 * timeout; rd_kafka_query_watermark_offsets in librdkafka 2.0 can wait for
 * minutes while the brokers are down, which would stall the relay.)
 * Returns RD_KAFKA_RESP_ERR_NO_ERROR or the first error. */
rd_kafka_resp_err_t de__topic_offsets(rd_kafka_t *rk, const char *topic,
                                      int32_t n, int64_t which, int64_t *out,
                                      int timeout_ms);

#endif

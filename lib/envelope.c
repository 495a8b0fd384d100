/* SPDX-License-Identifier: MIT */
/*
 * envelope.c -- the wire format: how big a record gets on Kafka.
 *
 * Records are CloudEvents 1.0 in Kafka's binary content mode (DESIGN.md
 * section 4): key = subject id, value = payload, attributes as ce_*
 * headers.  de_record must refuse a record the broker would refuse, before
 * it is committed, so the size computed here is an upper bound of what any
 * relay writes for the event: every varint at its widest, the longest
 * source and type prefix the configuration allows, a 20-digit sequence.
 */
#include "internal.h"

#include <string.h>

/* A record batch's fixed header (Kafka message format v2). */
#define BATCH_OVERHEAD 61
/* length, attributes, timestamp delta, offset delta, key length, value
 * length, header count: varints at their widest. */
#define RECORD_OVERHEAD (5 + 1 + 10 + 5 + 5 + 5 + 5)

static size_t header(const char *name, size_t value_len)
{
    return 5 + strlen(name) + 5 + value_len;
}

size_t de__record_max_size(size_t subject_type_len, size_t subject_id_len,
                           size_t action_len, int version, size_t payload_len,
                           size_t traceparent_len, size_t tracestate_len,
                           size_t dataschema_len)
{
    size_t type_len = DE__TYPE_PREFIX_MAX + subject_type_len + 1 + action_len +
                      (version > 0 ? 2 + 10 : 0);
    size_t n = BATCH_OVERHEAD + RECORD_OVERHEAD + subject_id_len + payload_len;

    n += header(DE__H_SPECVERSION, 3);
    n += header(DE__H_ID, DE__EVENT_ID_MAX);
    n += header(DE__H_SOURCE, DE__SOURCE_MAX);
    n += header(DE__H_TYPE, type_len);
    n += header(DE__H_SUBJECT, subject_id_len);
    n += header(DE__H_TIME, DE__RFC3339_LEN);
    n += header(DE__H_CONTENT_TYPE, strlen("application/json"));
    n += header(DE__H_PARTITIONKEY, subject_id_len);
    n += header(DE__H_SUBJECTSEQ, 20);
    n += header(DE__H_SUBJECTTYPE, subject_type_len);
    n += header(DE__H_ACTION, action_len);
    if (dataschema_len)
        n += header(DE__H_DATASCHEMA, dataschema_len);
    if (traceparent_len)
        n += header(DE__H_TRACEPARENT, traceparent_len);
    if (tracestate_len)
        n += header(DE__H_TRACESTATE, tracestate_len);
    return n;
}

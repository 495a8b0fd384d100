/* SPDX-License-Identifier: MIT */
/*
 * fuzz_row.c -- outbox rows as the relay reads them back: anyone who can
 * write the database may have inserted one by hand.
 *
 * Input: occurred_at_ms (8 bytes), version (4 bytes), seq (8 bytes), then
 * items of a 2-byte little-endian length and that many bytes:
 * subject_type, subject_id, action, payload, event_id, traceparent,
 * tracestate (length 0xffff: NULL; a missing item: NULL).  Texts other
 * than subject_id and payload stop at their first NUL, as SQLite's text
 * columns hand them to the relay.
 *
 * Oracle: a row de__row_check refuses says why; a row it accepts becomes
 * a record (de__envelope_headers, signed) that the consumer's decoder
 * takes back as the same event, and whose signature verifies.
 */
#include "internal.h"

#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static const char *take(const uint8_t **p, const uint8_t *end, char *buf,
                        size_t *n)
{
    size_t len;

    *n = 0;
    if (end - *p < 2)
        return NULL;
    len = (size_t)(*p)[0] | (size_t)(*p)[1] << 8;
    *p += 2;
    if (len == 0xffff)
        return NULL;
    if ((size_t)(end - *p) < len)
        len = (size_t)(end - *p);
    memcpy(buf, *p, len);
    buf[len] = '\0';
    *p += len;
    *n = len;
    return buf;
}

static void same(const char *a, const char *b)
{
    if ((a == NULL) != (b == NULL) || (a && strcmp(a, b) != 0))
        abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static char bufs[7][65536 + 1];
    static de__decoded d;
    const char *f[7] = {0};
    size_t len[7] = {0};
    const uint8_t *p = data + 20, *end = data + size;
    de__row row;
    de__hmac_keyring kr;
    rd_kafka_headers_t *h;
    de__header hs[24];
    de__raw r;
    int64_t seq;
    char why[400];

    if (size < 20)
        return 0;
    memset(&row, 0, sizeof row);
    memcpy(&row.occurred_at_ms, data, 8);
    memcpy(&row.version, data + 8, 4);
    memcpy(&seq, data + 12, 8);
    for (int i = 0; i < 7; i++)
        f[i] = take(&p, end, bufs[i], &len[i]);
    row.subject_type = f[0];
    row.subject_id = f[1];
    row.subject_id_len = len[1];
    row.action = f[2];
    row.payload = f[3];
    row.payload_len = len[3];
    row.event_id = f[4];
    row.traceparent = f[5];
    row.tracestate = f[6];
    if (de__row_check(&row) != DE_OK) {
        if (de_errmsg()[0] == '\0')
            abort();
        return 0;
    }
    /* The relay numbers from 1; its numbers fit 18 digits. */
    seq = (int64_t)((uint64_t)seq % UINT64_C(999999999999999999)) + 1;
    if (seq < 1)
        seq = -seq;
    if (!de__hmac_keyring_parse("k1:0123456789abcdef0123456789abcdef", &kr, why,
                                sizeof why))
        abort();
    h = de__envelope_headers(&row, 0, seq, "/delivery-service", "com.example.");
    if (h == NULL ||
        !de__envelope_sign(h, &kr.keys[0], row.subject_id, row.subject_id_len,
                           row.payload, row.payload_len))
        abort();
    memset(&r, 0, sizeof r);
    while (r.nheaders < DE__ARRAY_LEN(hs) &&
           rd_kafka_header_get_all(h, r.nheaders, &hs[r.nheaders].name,
                                   &hs[r.nheaders].value,
                                   &hs[r.nheaders].size) == 0)
        r.nheaders++;
    r.topic = "delivery.events";
    r.key = row.subject_id;
    r.key_len = row.subject_id_len;
    r.value = row.payload;
    r.len = row.payload_len;
    r.timestamp_ms = row.occurred_at_ms;
    r.headers = hs;
    if (!de__raw_verify(&r, &kr, why, sizeof why))
        abort();
    if (!de__raw_decode(&r, "{subject_type}.events", &d, why, sizeof why))
        abort(); /* the relay would publish what no consumer takes */
    same(d.view.event_id, row.event_id);
    same(d.view.subject_type, row.subject_type);
    same(d.view.subject_id, row.subject_id);
    same(d.view.action, row.action);
    same(d.view.payload, row.payload);
    same(d.view.traceparent, row.traceparent);
    same(d.view.tracestate, row.tracestate);
    if (d.view.subject_seq != seq ||
        d.view.occurred_at_ms != row.occurred_at_ms)
        abort();
    rd_kafka_headers_destroy(h);
    de__hmac_keyring_free(&kr);
    return 0;
}

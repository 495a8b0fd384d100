/* SPDX-License-Identifier: MIT */
/*
 * fuzz_decode.c -- the consumer's record decoder (de__raw_decode) and
 * integrity check (de__raw_verify) on arbitrary Kafka records.
 *
 * Input: a flags byte (bit 0: a key, bit 1: a value), then items of a
 * 2-byte little-endian length and that many bytes: the key (if flagged),
 * the value (if flagged), then header name, header value, ... to the end
 * (a header value of length 0xffff has no value; a name stops at its
 * first NUL, as librdkafka's names are C strings).
 *
 * Oracles: a record decoded holds every rule docs/CONSUMER.md states for
 * the view (checked with the shared validators); a refused one says why;
 * the same record signed with a key verifies under it, and not under
 * another secret with the same id.
 */
#include "internal.h"

#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define MAX_HEADERS 64

static bool take(const uint8_t **p, const uint8_t *end, const uint8_t **item,
                 size_t *n)
{
    size_t len;

    if (end - *p < 2)
        return false;
    len = (size_t)(*p)[0] | (size_t)(*p)[1] << 8;
    *p += 2;
    if (len == 0xffff) {
        *item = NULL;
        *n = 0;
        return true;
    }
    if ((size_t)(end - *p) < len)
        len = (size_t)(end - *p);
    *item = *p;
    *n = len;
    *p += len;
    return true;
}

static void check_view(const de_event_view *v)
{
    size_t n;

    if (v->event_id == NULL || v->source == NULL || v->type == NULL ||
        v->subject_id == NULL || v->subject_type == NULL || v->action == NULL ||
        v->payload == NULL || v->topic == NULL)
        abort();
    n = strlen(v->event_id);
    if (n == 0 || n > DE__CE_ID_MAX || !de__is_clean_utf8(v->event_id, n))
        abort();
    n = strlen(v->subject_id);
    if (n == 0 || n > DE__SUBJECT_ID_MAX ||
        !de__is_clean_utf8(v->subject_id, n))
        abort();
    n = strlen(v->source);
    if (n > DE__CE_TEXT_MAX || !de__is_clean_utf8(v->source, n))
        abort();
    n = strlen(v->type);
    if (n > DE__CE_TEXT_MAX || !de__is_clean_utf8(v->type, n))
        abort();
    if (!de__is_action_name(v->action, strlen(v->action)))
        abort();
    if (v->traceparent != NULL && !de__is_traceparent(v->traceparent))
        abort();
    if (v->tracestate != NULL && !de__is_tracestate(v->tracestate))
        abort();
    if (strlen(v->payload) != v->payload_len ||
        !de__json_check(v->payload, v->payload_len, NULL))
        abort();
    if (v->subject_seq < 0 || v->subject_epoch < 0 ||
        (v->subject_epoch > 0 && v->subject_seq == 0))
        abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static de__decoded d;
    de__header hs[MAX_HEADERS + 1];
    char names[MAX_HEADERS][64], why[400], sig[100];
    const uint8_t *p = data + 1, *end = data + size, *item, *val;
    size_t n, vn;
    de__raw r = {"delivery.events", 0, 0, NULL, 0, NULL, 0, 1, hs, 0};
    de__hmac_keyring kr, other;
    unsigned char mac[32];
    bool ok;

    if (size < 1)
        return 0;
    if ((data[0] & 1) && take(&p, end, &item, &n)) {
        r.key = item;
        r.key_len = n;
    }
    if ((data[0] & 2) && take(&p, end, &item, &n)) {
        r.value = item;
        r.len = n;
    }
    while (r.nheaders < MAX_HEADERS && take(&p, end, &item, &n) &&
           take(&p, end, &val, &vn)) {
        size_t k = 0;
        while (k < n && k < sizeof names[0] - 1 && item && item[k] != 0)
            k++;
        if (k > 0)
            memcpy(names[r.nheaders], item, k);
        names[r.nheaders][k] = '\0';
        hs[r.nheaders].name = names[r.nheaders];
        hs[r.nheaders].value = val;
        hs[r.nheaders].size = vn;
        r.nheaders++;
    }
    why[0] = '\0';
    ok = de__raw_decode(&r, "{subject_type}.events", &d, why, sizeof why);
    if (ok)
        check_view(&d.view);
    else if (why[0] == '\0')
        abort();
    /* Signed as the relay signs (de_hmac last): it verifies under the
     * key, and fails under another secret of the same id. */
    if (!de__hmac_keyring_parse("k1:0123456789abcdef0123456789abcdef", &kr, why,
                                sizeof why) ||
        !de__hmac_keyring_parse("k1:0123456789abcdef0123456789abcdeX", &other,
                                why, sizeof why))
        abort();
    (void)de__raw_verify(&r, &kr, why, sizeof why); /* whatever it carries */
    for (size_t i = 0; i < r.nheaders; i++)
        if (strcmp(hs[i].name, DE__H_HMAC) == 0)
            goto done; /* a second one would be refused */
    de__record_mac(&kr.keys[0], r.key, r.key_len, hs, r.nheaders, r.value,
                   r.len, mac);
    memcpy(sig, "k1:", 3);
    de__hex(mac, sizeof mac, sig + 3);
    hs[r.nheaders].name = DE__H_HMAC;
    hs[r.nheaders].value = sig;
    hs[r.nheaders].size = 3 + 64;
    r.nheaders++;
    if (!de__raw_verify(&r, &kr, why, sizeof why) ||
        de__raw_verify(&r, &other, why, sizeof why))
        abort();
done:
    de__hmac_keyring_free(&kr);
    de__hmac_keyring_free(&other);
    return 0;
}

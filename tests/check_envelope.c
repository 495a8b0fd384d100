/* SPDX-License-Identifier: MIT */
/*
 * check_envelope.c -- the wire format's building blocks: RFC 3339 times,
 * ce_type, topic names, and the consumer's JSON validator, checked
 * differentially against jansson (the parser the outbox itself uses) on
 * thousands of mutated documents.
 */
#include "testutil.h"

#include "internal.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

START_TEST(rfc3339_matches_gmtime)
{
    char out[DE__RFC3339_LEN + 1], want[64];
    int64_t cases[] = {0,
                       1,
                       999,
                       1000,
                       86399999,
                       951782400000 /* 2000-02-29 */,
                       1795604400123,
                       DE__MAX_TIME_MS};
    unsigned seed = 12345;

    de__rfc3339_ms(1795604400123, out);
    ck_assert_str_eq(out, "2026-11-25T11:00:00.123Z");
    de__rfc3339_ms(DE__MAX_TIME_MS, out);
    ck_assert_str_eq(out, "9999-12-31T23:59:59.999Z");
    for (int i = 0; i < 20000; i++) {
        int64_t ms = i < 8 ? cases[i]
                           : (int64_t)(((uint64_t)rand_r(&seed) << 31 ^
                                        (uint64_t)rand_r(&seed)) %
                                       (uint64_t)DE__MAX_TIME_MS);
        time_t s = (time_t)(ms / 1000);
        struct tm tm;
        gmtime_r(&s, &tm);
        snprintf(want, sizeof want, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ",
                 tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour,
                 tm.tm_min, tm.tm_sec, (int)(ms % 1000));
        de__rfc3339_ms(ms, out);
        ck_assert_msg(strcmp(out, want) == 0, "%lld: %s, gmtime says %s",
                      (long long)ms, out, want);
        /* And back: what the relay writes, the consumer reads. */
        {
            int64_t back = -1;
            ck_assert(de__parse_rfc3339_ms(out, strlen(out), &back));
            ck_assert_int_eq(back, ms);
        }
    }
}
END_TEST

/* ce_time as other producers write it: any offset, any fraction. */
START_TEST(rfc3339_parses_any_producer)
{
    static const struct {
        const char *s;
        int64_t ms; /* -1: refused */
    } cases[] = {
        {"2026-11-25T11:00:00Z", 1795604400000},
        {"2026-11-25t11:00:00z", 1795604400000},
        {"2026-11-25T12:00:00+01:00", 1795604400000},
        {"2026-11-25T06:30:00-04:30", 1795604400000},
        {"2026-11-25T11:00:00.5Z", 1795604400500},
        {"2026-11-25T11:00:00.123456789Z", 1795604400123},
        {"2016-12-31T23:59:60Z", 1483228799999},
        {"2000-02-29T00:00:00Z", 951782400000},
        {"1969-12-31T23:59:59Z", -1000},
        {"2001-02-29T00:00:00Z", -1},
        {"2026-13-01T00:00:00Z", -1},
        {"2026-11-25T24:00:00Z", -1},
        {"2026-11-25T11:00:00", -1},
        {"2026-11-25 11:00:00Z", -1},
        {"2026-11-25T11:00:00.Z", -1},
        {"2026-11-25T11:00:00+0100", -1},
        {"2026-11-25T11:00:00Zjunk", -1},
        {"yesterday", -1},
        {"", -1},
    };

    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        int64_t ms = 0;
        bool ok = de__parse_rfc3339_ms(cases[i].s, strlen(cases[i].s), &ms);
        if (cases[i].ms == -1)
            ck_assert_msg(!ok, "%s accepted", cases[i].s);
        else
            ck_assert_msg(ok && ms == cases[i].ms, "%s: %d, %lld", cases[i].s,
                          ok, (long long)ms);
    }
}
END_TEST

static bool keep_member(void *ctx, const de__json_member *m)
{
    char *out = ctx, name[64];

    de__json_unescape(m->name, m->name_len, name);
    strcat(out, name);
    strcat(out, "=");
    strncat(out, m->value, m->value_len);
    strcat(out, ";");
    return true;
}

/* Structured mode's members, raw values kept exactly; strings unescaped
 * to UTF-8. */
START_TEST(json_members_and_strings)
{
    static const char doc[] =
        " { \"id\" : \"a\\u00e9\\ud83d\\ude00\\n\" , \"data\":{\"n\":1e400,"
        "\"m\":[1,{\"x\":null}]},\"s\\u0065q\":5 } ";
    char out[256] = "", text[64];

    ck_assert(de__json_check(doc, strlen(doc), NULL));
    ck_assert(de__json_members(doc, strlen(doc), keep_member, out));
    ck_assert_str_eq(out, "id=\"a\\u00e9\\ud83d\\ude00\\n\";data={\"n\":"
                          "1e400,\"m\":[1,{\"x\":null}]};seq=5;");
    {
        static const char raw[] = "\"a\\u00e9\\ud83d\\ude00\\n\"";
        ck_assert_uint_eq(de__json_unescape(raw, sizeof raw - 1, text), 8);
    }
    ck_assert_str_eq(text, "a\xc3\xa9\xf0\x9f\x98\x80\n");
    ck_assert_uint_eq(de__json_unescape("5", 1, text), (size_t)-1);
}
END_TEST

START_TEST(type_and_topic_names)
{
    char buf[300];

    de__envelope_type(buf, sizeof buf, "com.example.", "delivery", "assigned",
                      0);
    ck_assert_str_eq(buf, "com.example.delivery.assigned");
    de__envelope_type(buf, sizeof buf, "", "delivery", "assigned", 12);
    ck_assert_str_eq(buf, "delivery.assigned.v12");
    de__topic_name(buf, sizeof buf, "{subject_type}.events", "rider");
    ck_assert_str_eq(buf, "rider.events");
    de__topic_name(buf, sizeof buf, "prod.{subject_type}.{subject_type}", "d");
    ck_assert_str_eq(buf, "prod.d.d");
    de__topic_name(buf, sizeof buf, "all-events", "delivery");
    ck_assert_str_eq(buf, "all-events");
}
END_TEST

/* Every header of a record, in order, with its exact value: a header
 * dropped or misspelt, or a wrong value, fails here rather than somewhere
 * downstream. */
START_TEST(headers_are_built_exactly)
{
    static const char *const want[][2] = {
        {"ce_specversion", "1.0"},
        {"ce_id", "01937a1e-0000-7000-8000-000000000001"},
        {"ce_source", "/delivery-service"},
        {"ce_type", "com.example.delivery.assigned.v3"},
        {"ce_subject", "D-1001"},
        {"ce_time", "2026-11-25T11:00:00.123Z"},
        {"content-type", "application/json"},
        {"ce_partitionkey", "D-1001"},
        {"ce_subjectseq", "42"},
        {"ce_subjectepoch", "9007"},
        {"ce_subjecttype", "delivery"},
        {"ce_action", "assigned"},
        {"traceparent",
         "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"},
        {"tracestate", "rojo=00f067aa0ba902b7"},
    };
    de__row row;
    rd_kafka_headers_t *h;
    const char *name;
    const void *val;
    size_t size, i;

    memset(&row, 0, sizeof row);
    row.event_id = want[1][1];
    row.subject_type = "delivery";
    row.subject_id = "D-1001";
    row.subject_id_len = 6;
    row.action = "assigned";
    row.version = 3;
    row.occurred_at_ms = 1795604400123;
    row.payload = "{}";
    row.payload_len = 2;
    row.traceparent = want[12][1];
    row.tracestate = want[13][1];
    h = de__envelope_headers(&row, 9007, 42, "/delivery-service",
                             "com.example.");
    ck_assert_ptr_nonnull(h);
    for (i = 0; rd_kafka_header_get_all(h, i, &name, &val, &size) == 0; i++) {
        ck_assert_msg(i < DE__ARRAY_LEN(want), "extra header %s", name);
        ck_assert_str_eq(name, want[i][0]);
        ck_assert_msg(size == strlen(want[i][1]) &&
                          memcmp(val, want[i][1], size) == 0,
                      "%s is '%.*s', expected '%s'", name, (int)size,
                      (const char *)val, want[i][1]);
    }
    ck_assert_uint_eq(i, DE__ARRAY_LEN(want));
    rd_kafka_headers_destroy(h);
    /* Without trace context, version or epoch (a numbering begun before
     * epochs): none of those headers, no ".v". */
    row.traceparent = row.tracestate = NULL;
    row.version = 0;
    h = de__envelope_headers(&row, 0, 1, "/s", "");
    ck_assert_ptr_nonnull(h);
    ck_assert_int_eq(rd_kafka_header_get_last(h, "traceparent", &val, &size),
                     RD_KAFKA_RESP_ERR__NOENT);
    ck_assert_int_eq(
        rd_kafka_header_get_last(h, "ce_subjectepoch", &val, &size),
        RD_KAFKA_RESP_ERR__NOENT);
    ck_assert_int_eq(rd_kafka_header_get_last(h, "ce_type", &val, &size), 0);
    ck_assert_msg(size == 17 && memcmp(val, "delivery.assigned", 17) == 0,
                  "ce_type '%.*s'", (int)size, (const char *)val);
    rd_kafka_headers_destroy(h);
}
END_TEST

/* jansson's verdict on "one JSON object", where RFC 8259 and jansson
 * agree.  jansson also refuses numbers it cannot represent (overflow):
 * valid JSON, so those count as valid here. */
static int jansson_says(const char *s, size_t len)
{
    json_error_t e;
    json_t *j = json_loadb(s, len, JSON_ALLOW_NUL | JSON_REJECT_DUPLICATES, &e);
    int ok = j != NULL && json_is_object(j);

    json_decref(j);
    if (j == NULL && (strstr(e.text, "overflow") || strstr(e.text, "too big")))
        return -1;
    return ok;
}

START_TEST(json_validator_agrees_with_jansson)
{
    static const char *seeds[] = {
        "{}",
        "{\"a\":1}",
        " { \"rider_id\" : \"R-7\", \"eta_s\": 540, \"ok\": true } ",
        "{\"a\":[1,2.5,-3e10,0,0.0,1E+2,null,false,\"x\"]}",
        "{\"nested\":{\"deep\":{\"deeper\":[{\"k\":\"v\"}]}}}",
        "{\"s\":\"esc \\\" \\\\ \\/ \\b \\f \\n \\r \\t \\u00e9 "
        "\\ud83d\\ude00\"}",
        "{\"utf8\":\"\xea\xb0\x80\xeb\x82\x98 \xf0\x9f\x9a\x9a\"}",
        "{\"n\":-0.000123e-5}",
        "{\"a\":1,\"b\":{\"a\":2}}", /* the same name in another object */
    };
    static const char *bad[] = {
        "",
        "[]",
        "1",
        "\"s\"",
        "null",
        "{",
        "}",
        "{\"a\"}",
        "{\"a\":}",
        "{\"a\":1,}",
        "{,}",
        "{\"a\":01}",
        "{\"a\":1.}",
        "{\"a\":.5}",
        "{\"a\":+1}",
        "{\"a\":\"\\x\"}",
        "{\"a\":\"\\ud800\"}",
        "{\"a\":\"\\udc00\"}",
        "{\"a\":\"\x01\"}",
        "{\"a\":\"\xff\"}",
        "{\"a\":tru}",
        "{} {}",
        "{\"a\":[1,]}",
        "{'a':1}",
        "{\"a\":\"\xc0\xaf\"}",
        "{\"a\":1e}",
        "{\"a\":-}",
        "{\"a\":1,\"a\":2}",
        "{\"a\":1,\"\\u0061\":2}", /* the same name, escaped */
        "{\"\\ud83d\\ude00\":1,\"\xf0\x9f\x98\x80\":2}",
        "\xef\xbb\xbf{}", /* a byte-order mark */
    };
    unsigned seed = 4242;
    char buf[512];
    int checked = 0;

    for (size_t i = 0; i < DE__ARRAY_LEN(seeds); i++)
        ck_assert_msg(de__json_is_object(seeds[i], strlen(seeds[i])),
                      "refused valid %s", seeds[i]);
    for (size_t i = 0; i < DE__ARRAY_LEN(bad); i++)
        ck_assert_msg(!de__json_is_object(bad[i], strlen(bad[i])),
                      "accepted invalid %s", bad[i]);
    /* Mutations: flip, drop, insert and duplicate bytes of valid
     * documents, and require the same verdict as jansson. */
    for (int round = 0; round < 30000; round++) {
        const char *s = seeds[rand_r(&seed) % DE__ARRAY_LEN(seeds)];
        size_t len = strlen(s), pos;
        int mutations = 1 + rand_r(&seed) % 3;
        static const char alphabet[] = "{}[],:\"\\ -+.eE0123456789tfnul"
                                       "\x01\x7f\xc3\xa9\xff";
        memcpy(buf, s, len);
        for (int m = 0; m < mutations && len > 0 && len < sizeof buf - 2; m++) {
            pos = (size_t)rand_r(&seed) % len;
            switch (rand_r(&seed) % 3) {
            case 0:
                buf[pos] = alphabet[rand_r(&seed) % (sizeof alphabet - 1)];
                break;
            case 1:
                memmove(buf + pos, buf + pos + 1, len - pos - 1);
                len--;
                break;
            default:
                memmove(buf + pos + 1, buf + pos, len - pos);
                buf[pos] = alphabet[rand_r(&seed) % (sizeof alphabet - 1)];
                len++;
            }
        }
        int j = jansson_says(buf, len);
        if (j < 0)
            continue;
        ck_assert_msg(de__json_is_object(buf, len) == (j == 1),
                      "disagree with jansson (%d) on '%.*s'", j, (int)len, buf);
        checked++;
    }
    ck_assert_int_gt(checked, 25000);
    /* Numbers of any size are kept as written (jansson refuses these). */
    ck_assert(de__json_is_object("{\"n\":1e400}", 11));
    ck_assert(de__json_is_object("{\"n\":123456789012345678901234567890}", 36));
    /* Many members: checked through the hash table, duplicates found. */
    {
        size_t cap = 20 * 60000, o = 0;
        char *big = malloc(cap);
        de__json_error e;
        big[o++] = '{';
        for (int i = 0; i < 60000; i++)
            o += (size_t)snprintf(big + o, cap - o, "%s\"k%d\":%d",
                                  i ? "," : "", i, i);
        big[o++] = '}';
        ck_assert(de__json_check(big, o, &e));
        o--;
        o += (size_t)snprintf(big + o, cap - o, ",\"k31337\":0}");
        ck_assert(!de__json_check(big, o, &e));
        ck_assert_str_eq(e.what, "a duplicate member name");
        ck_assert_uint_gt(e.offset, 600000);
        free(big);
    }
    /* Exactly DE__JSON_MAX_DEPTH levels, and one more. */
    for (int extra = 0; extra < 2; extra++) {
        int levels = DE__JSON_MAX_DEPTH + extra;
        char *d = malloc((size_t)levels * 8 + 16);
        size_t o = 0;
        d[o++] = '{';
        for (int i = 1; i < levels; i++) {
            memcpy(d + o, "\"a\":{", 5);
            o += 5;
        }
        for (int i = 0; i < levels; i++)
            d[o++] = '}';
        ck_assert_msg(de__json_is_object(d, o) == (extra == 0), "%d levels",
                      levels);
        free(d);
    }
    /* Depth is capped: no stack exhaustion on hostile nesting. */
    {
        size_t n = 200000;
        char *deep = malloc(n * 2 + 16);
        size_t o = 0;
        deep[o++] = '{';
        memcpy(deep + o, "\"a\":", 4);
        o += 4;
        for (size_t i = 0; i < n; i++)
            deep[o++] = '[';
        for (size_t i = 0; i < n; i++)
            deep[o++] = ']';
        deep[o++] = '}';
        ck_assert(!de__json_is_object(deep, o));
        free(deep);
    }
}
END_TEST

/* The inbox keeps a canonical UUID as its 16 bytes: parsing must take
 * exactly the texts that formatting gives back, and nothing else (an id
 * in capitals or braces is another id, kept as text). */
START_TEST(uuid_text_round_trips_exactly)
{
    unsigned char b[16];
    char out[37];
    const char *refused[] = {
        "01937A1E-0000-7001-8000-00000000000B",  /* capitals */
        "01937a1e-0000-7001-8000-00000000000",   /* short */
        "01937a1e-0000-7001-8000-00000000000bb", /* long */
        "01937a1e00000-7001-8000-00000000000b",  /* hyphen moved */
        "{1937a1e-0000-7001-8000-00000000000b",  /* not hex */
        "01937a1e-0000-7001-8000-00000000000g",  "", "e-1-5",
    };

    for (int round = 0; round < 1000; round++) {
        char id[37];
        de__uuid7(id);
        ck_assert(de__uuid_parse(id, b));
        de__uuid_format(b, out);
        ck_assert_str_eq(out, id);
    }
    ck_assert(de__uuid_parse("01937a1e-0000-7001-8000-00000000000b", b));
    ck_assert_int_eq(b[0], 0x01);
    ck_assert_int_eq(b[15], 0x0b);
    for (size_t i = 0; i < sizeof refused / sizeof refused[0]; i++)
        ck_assert_msg(!de__uuid_parse(refused[i], b), "%s taken for a UUID",
                      refused[i]);
}
END_TEST

/* ---- integrity ---------------------------------------------------------- */

static const char *hex_of(const unsigned char d[32])
{
    static char out[65];

    de__hex(d, 32, out);
    return out;
}

/* FIPS 180-4's examples (and the usual empty and million-'a' messages),
 * whole and fed in uneven pieces. */
START_TEST(sha256_matches_fips_180_4)
{
    static const struct {
        const char *msg;
        const char *digest;
    } v[] = {
        {"abc",
         "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"},
        {"",
         "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"},
        {"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq",
         "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"},
    };
    unsigned char d[32];
    char *million = malloc(1000000);
    de__sha256 s;

    for (size_t i = 0; i < DE__ARRAY_LEN(v); i++) {
        de__sha256_digest(v[i].msg, strlen(v[i].msg), d);
        ck_assert_str_eq(hex_of(d), v[i].digest);
    }
    memset(million, 'a', 1000000);
    de__sha256_digest(million, 1000000, d);
    ck_assert_str_eq(
        hex_of(d),
        "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
    de__sha256_init(&s);
    for (size_t at = 0, step = 1; at < 1000000;
         at += step, step = step * 3 % 997 + 1)
        de__sha256_update(&s, million + at,
                          at + step > 1000000 ? 1000000 - at : step);
    de__sha256_final(&s, d);
    ck_assert_str_eq(
        hex_of(d),
        "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
    free(million);
}
END_TEST

/* RFC 4231's HMAC-SHA256 test cases 1-4, 6 and 7 (5 truncates). */
START_TEST(hmac_matches_rfc_4231)
{
    unsigned char k20[20], k25[25], k131[131], dd[50], cd[50], d[32];
    static const char big_key[] =
        "Test Using Larger Than Block-Size Key - Hash Key First";
    static const char big_both[] =
        "This is a test using a larger than block-size key and a larger "
        "than block-size data. The key needs to be hashed before being "
        "used by the HMAC algorithm.";
    struct hv {
        const void *key;
        size_t key_len;
        const void *data;
        size_t len;
        const char *mac;
    } v[6];
    de__hmac m;

    memset(k20, 0x0b, sizeof k20);
    for (int i = 0; i < 25; i++)
        k25[i] = (unsigned char)(i + 1);
    memset(k131, 0xaa, sizeof k131);
    memset(dd, 0xdd, sizeof dd);
    memset(cd, 0xcd, sizeof cd);
    v[0] = (struct hv){
        k20, 20, "Hi There", 8,
        "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"};
    v[1] = (struct hv){
        "Jefe", 4, "what do ya want for nothing?", 28,
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"};
    v[2] = (struct hv){
        k131, 20, dd, 50,
        "773ea91e36800e46854db8ebd09181a72959098b3ef8c122d9635514ced565fe"};
    v[3] = (struct hv){
        k25, 25, cd, 50,
        "82558a389a443c0ea4cc819899f2083a85f0faa3e578f8077a2e3ff46729665b"};
    v[4] = (struct hv){
        k131, 131, big_key, strlen(big_key),
        "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"};
    v[5] = (struct hv){
        k131, 131, big_both, strlen(big_both),
        "9b09ffa71b942fcb27635fbcd5b0e944bfdc63644f0713938a7f51535c3a35e2"};
    for (size_t i = 0; i < DE__ARRAY_LEN(v); i++) {
        de__hmac_init(&m, v[i].key, v[i].key_len);
        de__hmac_update(&m, v[i].data, v[i].len / 2);
        de__hmac_update(&m, (const char *)v[i].data + v[i].len / 2,
                        v[i].len - v[i].len / 2);
        de__hmac_final(&m, d);
        ck_assert_msg(strcmp(hex_of(d), v[i].mac) == 0, "case %zu: %s", i,
                      hex_of(d));
    }
}
END_TEST

/* The canonical encoding as docs/SECURITY.md gives it (the expected MAC
 * computed independently, with Python's hmac), signing and verifying a
 * record, and every refusal. */
START_TEST(records_are_signed_and_verified)
{
    de__header hs[] = {
        {"ce_specversion", "1.0", 3},
        {"ce_id", "e-1", 3},
        {"x-other", "ignored", 7}, /* not signed: changing it is fine */
        {"content-type", "application/json", 16},
        {"ce_subjectseq", "7", 1},
        {"de_hmac", NULL, 0},
    };
    const char *value = "{\"rider_id\":\"R-7\"}";
    de__hmac_keyring kr;
    de__raw r = {"t", 0, 0, "D-1", 3, value, strlen(value), -1, hs, 5};
    unsigned char d[32];
    char why[300], sig[100];

    ck_assert(
        de__hmac_keyring_parse("old:abcdefghijklmnopqrstuvwxyz0123456789,k1:"
                               "0123456789abcdef0123456789abcdef",
                               &kr, why, sizeof why));
    ck_assert_uint_eq(kr.n, 2);
    de__record_mac(&kr.keys[1], "D-1", 3, hs, 5, value, strlen(value), d);
    ck_assert_str_eq(
        hex_of(d),
        "cbdbe26e9c40a8e871232a4bbcd17390e6859f8005eb2b3ef506731ad448c205");
    snprintf(sig, sizeof sig, "k1:%s", hex_of(d));
    hs[5].value = sig;
    hs[5].size = strlen(sig);
    r.nheaders = 6;
    ck_assert_msg(de__raw_verify(&r, &kr, why, sizeof why), "%s", why);
    hs[2].value = "changed";
    ck_assert(de__raw_verify(&r, &kr, why, sizeof why));
    /* A signed header, the key, the value: each change is caught. */
    hs[4].value = "8";
    ck_assert(!de__raw_verify(&r, &kr, why, sizeof why));
    ck_assert_ptr_nonnull(strstr(why, "does not match"));
    hs[4].value = "7";
    r.key = "D-2";
    ck_assert(!de__raw_verify(&r, &kr, why, sizeof why));
    r.key = "D-1";
    r.value = "{\"rider_id\":\"R-8\"}";
    ck_assert(!de__raw_verify(&r, &kr, why, sizeof why));
    r.value = value;
    /* A signed header added after signing is caught too. */
    r.nheaders = 5;
    ck_assert(!de__raw_verify(&r, &kr, why, sizeof why));
    ck_assert_ptr_nonnull(strstr(why, "no de_hmac"));
    r.nheaders = 6;
    sig[0] = 'x';
    ck_assert(!de__raw_verify(&r, &kr, why, sizeof why));
    ck_assert_ptr_nonnull(strstr(why, "'x1'"));
    de__hmac_keyring_free(&kr);
    /* Keys that are not keys: named, never quoted. */
    ck_assert(!de__hmac_keyring_parse("k1:tooshort", &kr, why, sizeof why));
    ck_assert_ptr_null(strstr(why, "tooshort"));
    ck_assert(!de__hmac_keyring_parse("k1:0123456789abcdef0123456789abcdef,k1:"
                                      "0123456789abcdef0123456789abcdeX",
                                      &kr, why, sizeof why));
    ck_assert_ptr_nonnull(strstr(why, "repeats"));
    ck_assert(!de__hmac_keyring_parse("nocolon0123456789abcdef0123456789abcdef",
                                      &kr, why, sizeof why));
}
END_TEST

/* A message for de__raw_decode: ours, with one header replaced. */
static bool decode_with(de__decoded *d, const char *name, const char *value,
                        size_t value_len, const char *payload, char *why,
                        size_t why_size)
{
    de__header hs[] = {
        {"ce_specversion", "1.0", 3},
        {"ce_id", "e-1", 3},
        {"ce_source", "/s", 2},
        {"ce_type", "delivery.assigned", 17},
        {"ce_subjectseq", "1", 1},
        {"ce_subject", "D-1", 3},
        {"traceparent",
         "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", 55},
        {"tracestate", "rojo=00f067aa0ba902b7", 21},
    };
    de__raw r = {
        "delivery.events", 0, 0, "D-1", 3, payload, strlen(payload), -1, hs,
        DE__ARRAY_LEN(hs)};

    for (size_t i = 0; name && i < DE__ARRAY_LEN(hs); i++)
        if (strcmp(hs[i].name, name) == 0) {
            hs[i].value = value;
            hs[i].size = value_len;
        }
    return de__raw_decode(&r, "{subject_type}.events", d, why, why_size);
}

/* What de_record refuses to write, decoding refuses to read; and a buffer
 * an outlier grew is given back. */
START_TEST(decoding_holds_records_to_recording_rules)
{
    de__decoded d;
    char why[400];
    char *big = malloc(4 << 20);

    memset(&d, 0, sizeof d);
    ck_assert_msg(decode_with(&d, NULL, NULL, 0, "{}", why, sizeof why), "%s",
                  why);
    ck_assert_str_eq(d.view.traceparent,
                     "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
    ck_assert(!decode_with(&d, "traceparent", "00-\x1b]0;owned\x07", 13, "{}",
                           why, sizeof why));
    ck_assert_ptr_nonnull(strstr(why, "traceparent '00-\\x1b]0;owned\\x07'"));
    ck_assert(
        !decode_with(&d, "traceparent",
                     "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7"
                     "-01\0x",
                     57, "{}", why, sizeof why));
    ck_assert(
        !decode_with(&d, "tracestate", "a=\x7f", 3, "{}", why, sizeof why));
    ck_assert_ptr_nonnull(strstr(why, "tracestate"));
    ck_assert(!decode_with(&d, "ce_id", "e\0-1", 4, "{}", why, sizeof why));
    ck_assert(!decode_with(&d, "ce_type", "a\nb", 3, "{}", why, sizeof why));
    /* A right-to-left override in the subject, as de_record refuses it. */
    ck_assert(!decode_with(&d, "ce_subject",
                           "D-\xe2\x80\xae"
                           "1",
                           6, "{}", why, sizeof why));
    ck_assert_ptr_nonnull(strstr(why, "'D-\\xe2\\x80\\xae1'"));
    /* One 4 MiB payload, then small ones: the buffers shrink back. */
    memset(big, ' ', 4 << 20);
    big[0] = '{';
    big[(4 << 20) - 1] = '\0';
    big[(4 << 20) - 2] = '}';
    ck_assert(decode_with(&d, NULL, NULL, 0, big, why, sizeof why));
    ck_assert_uint_gt(de__decoded_capacity(&d), 4 << 20);
    ck_assert(decode_with(&d, NULL, NULL, 0, "{}", why, sizeof why));
    ck_assert_uint_le(de__decoded_capacity(&d), 2 * 256 * 1024);
    ck_assert_str_eq(d.view.payload, "{}");
    de__decoded_free(&d);
    free(big);
}
END_TEST

static Suite *envelope_suite(void)
{
    Suite *s = suite_create("envelope");
    TCase *tc = tcase_create("wire");

    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, rfc3339_matches_gmtime);
    tcase_add_test(tc, rfc3339_parses_any_producer);
    tcase_add_test(tc, json_members_and_strings);
    tcase_add_test(tc, type_and_topic_names);
    tcase_add_test(tc, headers_are_built_exactly);
    tcase_add_test(tc, json_validator_agrees_with_jansson);
    tcase_add_test(tc, uuid_text_round_trips_exactly);
    tcase_add_test(tc, sha256_matches_fips_180_4);
    tcase_add_test(tc, hmac_matches_rfc_4231);
    tcase_add_test(tc, records_are_signed_and_verified);
    tcase_add_test(tc, decoding_holds_records_to_recording_rules);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    return tu_run(envelope_suite()) ? EXIT_FAILURE : EXIT_SUCCESS;
}

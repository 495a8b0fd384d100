/* SPDX-License-Identifier: MIT */
/*
 * hmac.c -- SHA-256 (FIPS 180-4), HMAC-SHA256 (RFC 2104), and the keys
 * of event.hmac.key, for the optional integrity check of records.
 *
 * The library depends on librdkafka, jansson and SQLite only, so the hash
 * is here rather than in OpenSSL.  It is checked against the FIPS 180-4
 * examples and the RFC 4231 test cases (tests/check_envelope.c).
 *
 * Invariant: a key ring's secrets live only in memory this file
 * allocated, and are wiped before it is freed; a context that held a key
 * is wiped by de__hmac_final.
 */
#include "internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const uint32_t K[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1,
    0x923f82a4, 0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3,
    0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786,
    0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147,
    0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13,
    0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
    0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a,
    0x5b9cca4f, 0x682e6ff3, 0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208,
    0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};

#define ROR(x, n) (((x) >> (n)) | ((x) << (32 - (n))))

static void block(uint32_t h[8], const unsigned char *p)
{
    uint32_t w[64], a, b, c, d, e, f, g, k, t1, t2;

    for (int i = 0; i < 16; i++)
        w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 |
               (uint32_t)p[4 * i + 2] << 8 | (uint32_t)p[4 * i + 3];
    for (int i = 16; i < 64; i++) {
        uint32_t s0 = ROR(w[i - 15], 7) ^ ROR(w[i - 15], 18) ^ (w[i - 15] >> 3);
        uint32_t s1 = ROR(w[i - 2], 17) ^ ROR(w[i - 2], 19) ^ (w[i - 2] >> 10);
        w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], f = h[5], g = h[6],
    k = h[7];
    for (int i = 0; i < 64; i++) {
        t1 = k + (ROR(e, 6) ^ ROR(e, 11) ^ ROR(e, 25)) + ((e & f) ^ (~e & g)) +
             K[i] + w[i];
        t2 = (ROR(a, 2) ^ ROR(a, 13) ^ ROR(a, 22)) +
             ((a & b) ^ (a & c) ^ (b & c));
        k = g, g = f, f = e, e = d + t1, d = c, c = b, b = a, a = t1 + t2;
    }
    h[0] += a, h[1] += b, h[2] += c, h[3] += d, h[4] += e, h[5] += f, h[6] += g,
        h[7] += k;
}

void de__sha256_init(de__sha256 *s)
{
    static const uint32_t iv[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372,
                                   0xa54ff53a, 0x510e527f, 0x9b05688c,
                                   0x1f83d9ab, 0x5be0cd19};

    memcpy(s->h, iv, sizeof iv);
    s->bytes = 0;
    s->n = 0;
}

void de__sha256_update(de__sha256 *s, const void *data, size_t len)
{
    const unsigned char *p = data;

    s->bytes += len;
    if (s->n > 0) {
        size_t take = 64 - s->n < len ? 64 - s->n : len;
        memcpy(s->buf + s->n, p, take);
        s->n += take;
        p += take;
        len -= take;
        if (s->n < 64)
            return;
        block(s->h, s->buf);
        s->n = 0;
    }
    for (; len >= 64; p += 64, len -= 64)
        block(s->h, p);
    memcpy(s->buf, p, len);
    s->n = len;
}

void de__sha256_final(de__sha256 *s, unsigned char out[32])
{
    uint64_t bits = s->bytes * 8;
    unsigned char pad[72] = {0x80};
    size_t padn = (s->n < 56 ? 56 : 120) - s->n;

    for (int i = 0; i < 8; i++)
        pad[padn + (size_t)i] = (unsigned char)(bits >> (56 - 8 * i));
    de__sha256_update(s, pad, padn + 8);
    for (int i = 0; i < 8; i++) {
        out[4 * i] = (unsigned char)(s->h[i] >> 24);
        out[4 * i + 1] = (unsigned char)(s->h[i] >> 16);
        out[4 * i + 2] = (unsigned char)(s->h[i] >> 8);
        out[4 * i + 3] = (unsigned char)s->h[i];
    }
    explicit_bzero(s, sizeof *s);
}

void de__sha256_digest(const void *data, size_t len, unsigned char out[32])
{
    de__sha256 s;

    de__sha256_init(&s);
    de__sha256_update(&s, data, len);
    de__sha256_final(&s, out);
}

void de__hmac_init(de__hmac *m, const void *key, size_t key_len)
{
    unsigned char k[64] = {0}, pad[64];

    if (key_len > 64)
        de__sha256_digest(key, key_len, k);
    else
        memcpy(k, key, key_len);
    for (int i = 0; i < 64; i++)
        pad[i] = k[i] ^ 0x36;
    de__sha256_init(&m->inner);
    de__sha256_update(&m->inner, pad, 64);
    for (int i = 0; i < 64; i++)
        pad[i] = k[i] ^ 0x5c;
    de__sha256_init(&m->outer);
    de__sha256_update(&m->outer, pad, 64);
    explicit_bzero(k, sizeof k);
    explicit_bzero(pad, sizeof pad);
}

void de__hmac_update(de__hmac *m, const void *data, size_t len)
{
    de__sha256_update(&m->inner, data, len);
}

void de__hmac_final(de__hmac *m, unsigned char out[32])
{
    unsigned char ih[32];

    de__sha256_final(&m->inner, ih);
    de__sha256_update(&m->outer, ih, sizeof ih);
    de__sha256_final(&m->outer, out);
    explicit_bzero(ih, sizeof ih);
}

void de__hex(const unsigned char *p, size_t n, char *out)
{
    static const char x[] = "0123456789abcdef";

    for (size_t i = 0; i < n; i++) {
        out[2 * i] = x[p[i] >> 4];
        out[2 * i + 1] = x[p[i] & 15];
    }
    out[2 * n] = '\0';
}

/* ---- event.hmac.key --------------------------------------------------- */

static bool id_char(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
           (c >= '0' && c <= '9') || c == '.' || c == '_' || c == '-';
}

void de__hmac_keyring_free(de__hmac_keyring *kr)
{
    for (size_t i = 0; i < kr->n; i++) {
        explicit_bzero(kr->keys[i].secret, kr->keys[i].secret_len);
        explicit_bzero(&kr->keys[i].start, sizeof kr->keys[i].start);
        free(kr->keys[i].secret);
    }
    free(kr->keys);
    kr->keys = NULL;
    kr->n = 0;
}

#define WHY(...) (snprintf(why, why_size, __VA_ARGS__), false)

bool de__hmac_keyring_parse(const char *value, de__hmac_keyring *kr, char *why,
                            size_t why_size)
{
    const char *p = value;
    size_t count = 1;

    kr->keys = NULL;
    kr->n = 0;
    if (value[0] == '\0')
        return true;
    for (const char *c = value; *c; c++)
        count += *c == ',';
    if ((kr->keys = calloc(count, sizeof *kr->keys)) == NULL)
        return WHY("out of memory");
    for (size_t i = 0; i < count; i++) {
        const char *end = strchr(p, ','), *colon;
        size_t n = end ? (size_t)(end - p) : strlen(p), idn, sn;
        de__hmac_key *k = &kr->keys[i];

        colon = memchr(p, ':', n);
        if (colon == NULL) {
            de__hmac_keyring_free(kr);
            return WHY("key %zu has no ':' between its id and its secret",
                       i + 1);
        }
        idn = (size_t)(colon - p);
        sn = n - idn - 1;
        if (idn == 0 || idn > DE__HMAC_ID_MAX) {
            de__hmac_keyring_free(kr);
            return WHY("the id of key %zu is %zu bytes", i + 1, idn);
        }
        for (size_t j = 0; j < idn; j++)
            if (!id_char(p[j])) {
                de__hmac_keyring_free(kr);
                return WHY("the id of key %zu has a character outside "
                           "[A-Za-z0-9._-]",
                           i + 1);
            }
        if (sn < DE__HMAC_SECRET_MIN || sn > DE__HMAC_SECRET_MAX) {
            de__hmac_keyring_free(kr);
            return WHY("the secret of key %zu is %zu bytes", i + 1, sn);
        }
        for (size_t j = 0; j < sn; j++)
            if (colon[1 + j] < 0x21 || colon[1 + j] > 0x7e) {
                de__hmac_keyring_free(kr);
                return WHY("the secret of key %zu has a byte that is not "
                           "printable ASCII",
                           i + 1);
            }
        for (size_t j = 0; j < i; j++)
            if (strlen(kr->keys[j].id) == idn &&
                memcmp(kr->keys[j].id, p, idn) == 0) {
                de__hmac_keyring_free(kr);
                return WHY("key id %zu repeats the id of key %zu", i + 1,
                           j + 1);
            }
        memcpy(k->id, p, idn);
        k->id[idn] = '\0';
        if ((k->secret = malloc(sn)) == NULL) {
            de__hmac_keyring_free(kr);
            return WHY("out of memory");
        }
        memcpy(k->secret, colon + 1, sn);
        k->secret_len = sn;
        de__hmac_init(&k->start, k->secret, sn);
        kr->n++;
        p = end ? end + 1 : p + n;
    }
    return true;
}

/* SPDX-License-Identifier: MIT */
/*
 * fuzz_conf.c -- de_conf_set with any key and value.
 *
 * Input: one selector byte (a key from the list below, or the key spelled
 * in the input up to its first NUL), then the value.  Oracle: a set either
 * succeeds and reads back, or fails with DE_ERR_CONFIG (or DE_ERR_ARG /
 * DE_ERR_NOMEM) leaving the previous value; and a refused value of any
 * key that is not the library's own is never repeated in the message
 * (the value carries a marker that no fixed text contains).
 */
#include <deliveryevents.h>

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static const char *const keys[] = {
    "sasl.password",      "sasl.oauthbearer.client.secret",
    "ssl.key.password",   "sasl.mechanism",
    "compression.type",   "batch.size",
    "enable.idempotence", "acks",
    "bootstrap.servers",  "topic.template",
    "event.source",       "event.type.prefix",
    "event.max.bytes",    "relay.subject.forget.ms",
    "consumer.on.gap",    "relay.recovery.unverifiable",
    "consumer.topics",    "statistics.interval.ms",
};
#define NKEYS (sizeof keys / sizeof *keys)
#define MARK "Q7zX"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char key[128], *value;
    const char *rest = (const char *)data + 1, *before;
    size_t rest_n, klen;
    de_conf *c;
    de_err err;
    bool ours;

    if (size < 1)
        return 0;
    rest_n = size - 1;
    if (data[0] < NKEYS) {
        snprintf(key, sizeof key, "%s", keys[data[0]]);
    } else {
        klen = strnlen(rest, rest_n);
        if (klen >= sizeof key)
            return 0;
        memcpy(key, rest, klen);
        key[klen] = '\0';
        rest += klen < rest_n ? klen + 1 : klen;
        rest_n -= klen < rest_n ? klen + 1 : klen;
    }
    if ((value = malloc(rest_n + sizeof MARK)) == NULL)
        return 0;
    memcpy(value, MARK, sizeof MARK - 1);
    memcpy(value + sizeof MARK - 1, rest, rest_n);
    value[sizeof MARK - 1 + rest_n] = '\0';
    if ((c = de_conf_new()) == NULL) {
        free(value);
        return 0;
    }
    ours = de_conf_get(c, key) != NULL; /* the library's keys have defaults */
    before = de_conf_get(c, key);
    err = de_conf_set(c, key, value);
    if (err == DE_OK) {
        const char *got = de_conf_get(c, key);
        if (got == NULL || strcmp(got, value) != 0)
            abort();
    } else {
        if (err != DE_ERR_CONFIG && err != DE_ERR_ARG && err != DE_ERR_NOMEM)
            abort();
        if (de_conf_get(c, key) != before)
            abort(); /* a failed set changed the configuration */
        if (!ours && strstr(key, MARK) == NULL &&
            strstr(de_errmsg(), MARK) != NULL)
            abort(); /* a librdkafka property's value was repeated */
    }
    de_conf_destroy(c);
    free(value);
    return 0;
}

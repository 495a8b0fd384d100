/* SPDX-License-Identifier: MIT */
/*
 * kafka.c -- the glue every librdkafka client of the library shares: the
 * relay's producer, its recovery reader and the consumer.
 *
 *  - One way to build a client's configuration: the library's defaults,
 *    then the user's librdkafka properties in the order set, then the
 *    properties the library must own -- and a user value that contradicts
 *    an owned one is refused, naming both and why.
 *  - One log bridge: librdkafka's lines go through the handle's de_conf
 *    log callback, prefixed, and only on a thread the library documents:
 *    log.queue holds them until the thread that serves the handle's main
 *    queue (the relay's thread, the consumer's polling thread) polls.
 *  - One error bridge: fatal errors go to the owner, the rest are logged
 *    (librdkafka retries them by itself).
 *
 * Invariant: a client's opaque is its de__rk_bridge, which outlives it.
 */
#include "internal.h"

#include <stdio.h>
#include <string.h>

de_err de__rk_conf(const de_conf *conf, const char *who,
                   const de__rk_prop *defaults, size_t ndefaults,
                   const de__rk_owned *owned, size_t nowned,
                   de__rk_bridge *bridge, rd_kafka_conf_t **out)
{
    rd_kafka_conf_t *c;
    char errstr[512];
    const char *v;

    *out = NULL;
    for (size_t i = 0; i < nowned; i++)
        if (de__conf_rdkafka_get(conf, owned[i].key, &v) &&
            strcmp(v, owned[i].value) != 0)
            return de__fail(DE_ERR_CONFIG,
                            "%s=%s is not allowed for the %s: it keeps %s=%s "
                            "because %s",
                            owned[i].key, v, who, owned[i].key, owned[i].value,
                            owned[i].why);
    if ((c = rd_kafka_conf_new()) == NULL)
        return de__fail(DE_ERR_NOMEM, "out of memory configuring the %s", who);
    for (size_t i = 0; i < ndefaults; i++)
        if (rd_kafka_conf_set(c, defaults[i].key, defaults[i].value, errstr,
                              sizeof errstr) != RD_KAFKA_CONF_OK)
            goto refused;
    if (de__conf_apply_rdkafka(conf, c) != DE_OK) {
        rd_kafka_conf_destroy(c);
        return DE_ERR_CONFIG;
    }
    for (size_t i = 0; i < nowned; i++)
        if (rd_kafka_conf_set(c, owned[i].key, owned[i].value, errstr,
                              sizeof errstr) != RD_KAFKA_CONF_OK)
            goto refused;
    /* Log lines wait for the thread that polls the main queue. */
    if (rd_kafka_conf_set(c, "log.queue", "true", errstr, sizeof errstr) !=
        RD_KAFKA_CONF_OK)
        goto refused;
    rd_kafka_conf_set_opaque(c, bridge);
    rd_kafka_conf_set_log_cb(c, de__rk_log);
    rd_kafka_conf_set_error_cb(c, de__rk_error);
    *out = c;
    return DE_OK;
refused:
    rd_kafka_conf_destroy(c);
    return de__fail(DE_ERR_CONFIG, "%s configuration: %s", who, errstr);
}

de_err de__rk_new(rd_kafka_type_t type, rd_kafka_conf_t *c, const char *who,
                  rd_kafka_t **out)
{
    char errstr[512];
    rd_kafka_t *rk = rd_kafka_new(type, c, errstr, sizeof errstr);

    *out = NULL;
    if (rk == NULL) {
        rd_kafka_conf_destroy(c);
        return de__fail(DE_ERR_CONFIG,
                        "librdkafka refused the %s's configuration: %s", who,
                        errstr);
    }
    /* NULL: the main queue, served by rd_kafka_poll (or, once redirected,
     * by the consumer's poll). */
    if (rd_kafka_set_log_queue(rk, NULL) != RD_KAFKA_RESP_ERR_NO_ERROR) {
        rd_kafka_destroy(rk);
        return de__fail(DE_ERR_KAFKA, "the %s's log queue: %s", who,
                        rd_kafka_err2str(rd_kafka_last_error()));
    }
    *out = rk;
    return DE_OK;
}

void de__rk_log(const rd_kafka_t *rk, int level, const char *fac,
                const char *buf)
{
    const de__rk_bridge *b = rd_kafka_opaque(rk);

    if (b == NULL)
        return;
    for (size_t i = 0; b->quiet != NULL && b->quiet[i] != NULL; i++)
        if (strstr(buf, b->quiet[i]) != NULL)
            level = DE_LOG_INFO + 1; /* expected: debug */
    de__log(b->conf, level, "%slibrdkafka: %s: %s", b->prefix, fac, buf);
}

void de__rk_error(rd_kafka_t *rk, int err, const char *reason, void *opaque)
{
    de__rk_bridge *b = opaque;
    char fatal[512];
    rd_kafka_resp_err_t orig;

    if (err == RD_KAFKA_RESP_ERR__FATAL) {
        orig = rd_kafka_fatal_error(rk, fatal, sizeof fatal);
        de__log(b->conf, DE_LOG_ERR, "%sfatal error %s: %s", b->prefix,
                rd_kafka_err2name(orig), fatal);
        if (b->on_fatal != NULL)
            b->on_fatal(b->owner, orig, fatal);
        return;
    }
    /* Broker outages and the like: librdkafka retries by itself. */
    de__log(b->conf, DE_LOG_INFO, "%skafka: %s: %s", b->prefix,
            rd_kafka_err2name((rd_kafka_resp_err_t)err), reason);
}

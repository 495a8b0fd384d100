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

#include <errno.h>
#include <jansson.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define STATS_INTERVAL_MS "1000"

/* librdkafka's statistics cost memory (about 11 MiB of latency
 * histograms in a relay's producer, measured), so they run only when
 * asked for: by statistics.interval.ms, or by a statistics callback (then
 * every second unless the interval says otherwise). */
int64_t de__rk_stats_interval(const de_conf *conf)
{
    const char *v;
    void *ctx;

    if (de__conf_rdkafka_get(conf, "statistics.interval.ms", &v))
        return strtoll(v, NULL, 10); /* librdkafka validated it */
    if (de__conf_stats_cb(conf, &ctx) != NULL)
        return strtoll(STATS_INTERVAL_MS, NULL, 10);
    return 0;
}

/* Brokers in state UP among those librdkafka's statistics list, leaving
 * out its internal and logical ones; -1 when the document cannot be
 * read. */
static int64_t brokers_up(const char *json, size_t len)
{
    json_t *doc = json_loadb(json, len, 0, NULL), *brokers, *b;
    const char *name;
    int64_t up = 0;

    brokers = json_object_get(doc, "brokers");
    if (!json_is_object(brokers)) {
        json_decref(doc);
        return -1;
    }
    json_object_foreach(brokers, name, b)
    {
        const char *state = json_string_value(json_object_get(b, "state"));
        const char *source = json_string_value(json_object_get(b, "source"));
        if (state != NULL && strcmp(state, "UP") == 0 &&
            (source == NULL || (strcmp(source, "internal") != 0 &&
                                strcmp(source, "logical") != 0)))
            up++;
    }
    json_decref(doc);
    return up;
}

static int rk_stats(rd_kafka_t *rk, char *json, size_t len, void *opaque)
{
    de__rk_bridge *b = opaque;

    (void)rk;
    atomic_store(&b->brokers_up, brokers_up(json, len));
    if (b->on_stats != NULL)
        b->on_stats(b->owner, json, len);
    return 0; /* librdkafka frees json */
}

char *de__stats_doc(struct json_t *obj, const char *rk_json, size_t rk_len,
                    size_t *len)
{
    char *head = obj ? json_dumps(obj, JSON_COMPACT) : NULL, *doc = NULL;
    size_t hl;

    json_decref(obj);
    if (head == NULL || (hl = strlen(head)) < 2)
        goto done;
    if (rk_json == NULL) {
        rk_json = "null";
        rk_len = 4;
    }
    /* head is "{...}": "{...,"rdkafka":<raw>}". */
    doc = malloc(hl + rk_len + 16);
    if (doc == NULL)
        goto done;
    memcpy(doc, head, hl - 1);
    *len = hl - 1;
    *len += (size_t)sprintf(doc + *len, "%s\"rdkafka\":", hl > 2 ? "," : "");
    memcpy(doc + *len, rk_json, rk_len);
    *len += rk_len;
    doc[(*len)++] = '}';
    doc[*len] = '\0';
done:
    free(head);
    return doc;
}

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
    if (bridge->on_stats != NULL) {
        void *ctx;
        /* Before the user's properties: they may set another interval. */
        if (de__conf_stats_cb(conf, &ctx) != NULL &&
            rd_kafka_conf_set(c, "statistics.interval.ms", STATS_INTERVAL_MS,
                              errstr, sizeof errstr) != RD_KAFKA_CONF_OK)
            goto refused;
        rd_kafka_conf_set_stats_cb(c, rk_stats);
    }
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

/*
 * rd_kafka_destroy, waiting at most timeout_ms.  librdkafka 2.0 can wait
 * forever in rd_kafka_destroy of a consumer that lived through a broker
 * going down and up (a partition reference is never released, so its
 * broker thread never ends: confluentinc/librdkafka#4674, seen here in the
 * relay's recovery reader during the soak).  Rather than hang the caller
 * (and so de_relay_stop), the handle is left behind on a thread of its
 * own and a warning logged.  Returns whether the handle is gone.
 */
struct reaper {
    rd_kafka_t *rk;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    bool done, abandoned;
};

static void reaper_free(struct reaper *rp)
{
    pthread_mutex_destroy(&rp->mu);
    pthread_cond_destroy(&rp->cv);
    free(rp);
}

static void *reap(void *arg)
{
    struct reaper *rp = arg;
    bool abandoned;

    rd_kafka_destroy(rp->rk);
    pthread_mutex_lock(&rp->mu);
    rp->done = true;
    abandoned = rp->abandoned;
    pthread_cond_signal(&rp->cv);
    pthread_mutex_unlock(&rp->mu);
    if (abandoned)
        reaper_free(rp); /* nobody waits for it any more */
    return NULL;
}

bool de__rk_destroy_within(rd_kafka_t *rk, int timeout_ms, const de_conf *conf,
                           const char *who)
{
    struct reaper *rp = calloc(1, sizeof *rp);
    pthread_condattr_t ca;
    struct timespec dl;
    pthread_t t;
    bool done;

    if (rp == NULL || pthread_condattr_init(&ca) != 0) {
        free(rp);
        rd_kafka_destroy(rk);
        return true;
    }
    rp->rk = rk;
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_mutex_init(&rp->mu, NULL);
    pthread_cond_init(&rp->cv, &ca);
    pthread_condattr_destroy(&ca);
    if (pthread_create(&t, NULL, reap, rp) != 0) {
        reaper_free(rp);
        rd_kafka_destroy(rk);
        return true;
    }
    clock_gettime(CLOCK_MONOTONIC, &dl);
    dl.tv_sec += timeout_ms / 1000;
    dl.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
    if (dl.tv_nsec >= 1000000000L) {
        dl.tv_sec++;
        dl.tv_nsec -= 1000000000L;
    }
    pthread_mutex_lock(&rp->mu);
    while (!rp->done &&
           pthread_cond_timedwait(&rp->cv, &rp->mu, &dl) != ETIMEDOUT)
        ;
    done = rp->done;
    if (!done)
        rp->abandoned = true;
    pthread_mutex_unlock(&rp->mu);
    if (done) {
        pthread_join(t, NULL);
        reaper_free(rp);
        return true;
    }
    pthread_detach(t);
    de__log(conf, DE_LOG_WARNING,
            "%s: librdkafka did not shut its handle down within %d ms "
            "(librdkafka 2.0 can wait forever after a broker went down and "
            "up, confluentinc/librdkafka#4674); left behind so as not to "
            "hang",
            who, timeout_ms);
    return false;
}

/* SPDX-License-Identifier: MIT */
/*
 * metrics.c -- a relay's and a consumer's counters as monitoring systems
 * take them: the statistics callback's JSON document and the Prometheus
 * text exposition format.
 *
 * One table per stats struct names each field once -- its JSON name (the
 * struct field's), its Prometheus name, help and type -- so the two forms
 * can never disagree.  Prometheus names follow its conventions: a
 * deliveryevents_<client>_ prefix, counters end in _total, durations and
 * times are in seconds.
 */
#include "internal.h"

#include <jansson.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

typedef enum { U64, I64, INT } width;

typedef struct metric {
    const char *field; /* the stats struct's field, and the JSON name */
    const char *prom;  /* NULL: not exposed to Prometheus */
    const char *help;
    bool counter;
    width w;
    size_t off;
    double scale; /* Prometheus value = field * scale */
} metric;

#define R(f, p, h, c, w, s)                                                    \
    {                                                                          \
#f, p, h, c, w, offsetof(de_relay_stats, f), s                         \
    }
#define C(f, p, h, c)                                                          \
    {                                                                          \
#f, p, h, c, U64, offsetof(de_consumer_stats, f), 1                    \
    }

static const metric relay_metrics[] = {
    R(active, "relay_active",
      "1 while this relay holds the lease and publishes, 0 on standby", false,
      INT, 1),
    R(state, NULL, NULL, false, INT, 1),
    R(published, "relay_published_total", "Events acknowledged by Kafka", true,
      U64, 1),
    R(pending, "relay_pending_events",
      "Events committed and not yet acknowledged by Kafka, held-back ones "
      "included",
      false, U64, 1),
    R(lag_ms, "relay_lag_seconds", "Age of the oldest event in flight", false,
      I64, 0.001),
    R(held_back, "relay_held_back_events",
      "Events waiting behind a subject's refused event", false, U64, 1),
    R(blocked_subjects, "relay_blocked_subjects",
      "Subjects waiting behind an event Kafka refused", false, U64, 1),
    R(read, "relay_read_total", "Outbox rows read, resends included", true, U64,
      1),
    R(deleted, "relay_deleted_total", "Published rows deleted from the outbox",
      true, U64, 1),
    R(skipped, "relay_skipped_total",
      "Events found already on Kafka when the relay became active", true, U64,
      1),
    R(forgotten, "relay_forgotten_subjects_total",
      "Counters of idle subjects forgotten", true, U64, 1),
    R(subjects_cached, "relay_cached_subjects", "Subject entries in memory",
      false, U64, 1),
    R(producer_restarts, "relay_producer_restarts_total",
      "Producers replaced after a fatal error or a failed delivery", true, U64,
      1),
    R(position, "relay_position",
      "Outbox position up to which every event is published or held back",
      false, I64, 1),
    R(brokers_up, "relay_brokers_up",
      "Brokers the producer is connected to (-1: unknown)", false, I64, 1),
    R(last_error_ms, "relay_last_error_timestamp_seconds",
      "When the last publishing error happened (0: never)", false, I64, 0.001),
};

static const metric consumer_metrics[] = {
    C(applied, "consumer_applied_total",
      "Events applied: the handler ran and its transaction committed", true),
    C(duplicates, "consumer_duplicates_total",
      "Events already applied, skipped", true),
    C(gaps, "consumer_gaps_total", "Events that came after a missing one",
      true),
    C(retries, "consumer_retries_total", "Handler failures retried", true),
    C(dead_lettered, "consumer_dead_lettered_total",
      "Events parked after consumer.max.attempts", true),
    C(foreign, "consumer_foreign_total",
      "Records that are not usable CloudEvents, dead-lettered", true),
    C(conflicts, "consumer_conflicts_total",
      "Events whose number was applied under another id, parked", true),
    C(forgotten, "consumer_forgotten_subjects_total",
      "Inbox rows of idle subjects forgotten", true),
    C(ids_forgotten, "consumer_forgotten_ids_total",
      "Ids of events without a sequence forgotten (consumer.id.forget.ms)",
      true),
    C(batches, "consumer_batches_total", "Database transactions committed",
      true),
    C(txn_retries, "consumer_txn_retries_total",
      "Transactions run again after a deadlock or serialization failure", true),
    C(parked_subjects, "consumer_parked_subjects",
      "Subjects waiting behind a dead letter", false),
};

static double value_of(const metric *m, const void *stats)
{
    const char *p = (const char *)stats + m->off;
    uint64_t u;
    int64_t i;
    int n;

    switch (m->w) {
    case U64: memcpy(&u, p, sizeof u); return (double)u;
    case I64: memcpy(&i, p, sizeof i); return (double)i;
    default: memcpy(&n, p, sizeof n); return (double)n;
    }
}

static json_t *json_of(const metric *m, const void *stats)
{
    const char *p = (const char *)stats + m->off;
    uint64_t u;
    int64_t i;
    int n;

    switch (m->w) {
    case U64: memcpy(&u, p, sizeof u); return json_integer((json_int_t)u);
    case I64: memcpy(&i, p, sizeof i); return json_integer((json_int_t)i);
    default: memcpy(&n, p, sizeof n); return json_integer(n);
    }
}

static json_t *stats_object(const metric *ms, size_t n, const void *stats)
{
    json_t *o = json_object();

    for (size_t i = 0; o != NULL && i < n; i++)
        if (json_object_set_new(o, ms[i].field, json_of(&ms[i], stats)) != 0) {
            json_decref(o);
            return NULL;
        }
    return o;
}

json_t *de__relay_stats_json(const de_relay_stats *s, const char *database)
{
    json_t *o = stats_object(relay_metrics, DE__ARRAY_LEN(relay_metrics), s);

    if (o == NULL ||
        json_object_set_new(o, "client", json_string("relay")) != 0 ||
        json_object_set_new(o, "database", json_string(database)) != 0 ||
        json_object_set_new(
            o, "state_name",
            json_string(de_relay_state_name((de_relay_state)s->state))) != 0 ||
        json_object_set_new(o, "last_error", json_string(s->last_error)) != 0 ||
        json_object_set_new(o, "time_ms", json_integer(de__now_ms())) != 0) {
        json_decref(o);
        return NULL;
    }
    return o;
}

json_t *de__consumer_stats_json(const de_consumer_stats *s, const char *group)
{
    json_t *o =
        stats_object(consumer_metrics, DE__ARRAY_LEN(consumer_metrics), s);

    if (o == NULL ||
        json_object_set_new(o, "client", json_string("consumer")) != 0 ||
        json_object_set_new(o, "group", json_string(group ? group : "")) != 0 ||
        json_object_set_new(o, "time_ms", json_integer(de__now_ms())) != 0) {
        json_decref(o);
        return NULL;
    }
    return o;
}

/* ---- Prometheus -------------------------------------------------------- */

typedef struct out {
    char *buf;
    size_t cap, len;
} out;

static void put(out *o, const char *fmt, ...) DE__PRINTF(2, 3);
static void put(out *o, const char *fmt, ...)
{
    va_list ap;
    int n;

    va_start(ap, fmt);
    n = vsnprintf(o->len < o->cap ? o->buf + o->len : NULL,
                  o->len < o->cap ? o->cap - o->len : 0, fmt, ap);
    va_end(ap);
    if (n > 0)
        o->len += (size_t)n;
}

/* A label value, escaped as the exposition format wants (\\, \", \n). */
static void put_label(out *o, const char *v)
{
    for (; *v; v++) {
        if (*v == '\\')
            put(o, "\\\\");
        else if (*v == '"')
            put(o, "\\\"");
        else if (*v == '\n')
            put(o, "\\n");
        else
            put(o, "%c", *v);
    }
}

static de_err render(const metric *ms, size_t n, const void *stats,
                     const char *label, const char *value, char *buf,
                     size_t cap, size_t *len, const char *who)
{
    out o = {buf, cap, 0};

    for (size_t i = 0; i < n; i++) {
        double v;
        if (ms[i].prom == NULL)
            continue;
        put(&o, "# HELP deliveryevents_%s %s.\n", ms[i].prom, ms[i].help);
        put(&o, "# TYPE deliveryevents_%s %s\n", ms[i].prom,
            ms[i].counter ? "counter" : "gauge");
        put(&o, "deliveryevents_%s{%s=\"", ms[i].prom, label);
        put_label(&o, value);
        v = value_of(&ms[i], stats) * ms[i].scale;
        if (ms[i].scale == 1)
            put(&o, "\"} %.0f\n", v);
        else
            put(&o, "\"} %.3f\n", v);
    }
    *len = o.len;
    if (cap <= o.len)
        return de__fail(DE_ERR_ARG,
                        "%s: a buffer of %zu bytes is too small for the "
                        "metrics (%zu bytes and the NUL)",
                        who, cap, o.len);
    return DE_OK;
}

de_err de_relay_metrics_prometheus(de_relay *r, char *buf, size_t cap,
                                   size_t *len)
{
    de_relay_stats s;
    de_err err;

    if (len == NULL)
        return de__fail(DE_ERR_ARG, "de_relay_metrics_prometheus needs a len "
                                    "pointer (got NULL)");
    *len = 0;
    if ((err = de_relay_stats_get(r, &s)) != DE_OK)
        return err;
    return render(relay_metrics, DE__ARRAY_LEN(relay_metrics), &s, "database",
                  de__relay_db_path(r), buf, cap, len,
                  "de_relay_metrics_prometheus");
}

de_err de_consumer_metrics_prometheus(de_consumer *c, char *buf, size_t cap,
                                      size_t *len)
{
    de_consumer_stats s;
    de_err err;

    if (len == NULL)
        return de__fail(DE_ERR_ARG, "de_consumer_metrics_prometheus needs a "
                                    "len pointer (got NULL)");
    *len = 0;
    if ((err = de_consumer_stats_get(c, &s)) != DE_OK)
        return err;
    return render(consumer_metrics, DE__ARRAY_LEN(consumer_metrics), &s,
                  "group", de__consumer_group(c), buf, cap, len,
                  "de_consumer_metrics_prometheus");
}

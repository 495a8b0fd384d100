/* SPDX-License-Identifier: MIT */
/*
 * conf.c -- string properties in the style of librdkafka.
 *
 * Keys the library owns are declared once in the table below (name,
 * default, type, range, extra check); docs/CONFIGURATION.md lists the same
 * keys.  Every other key is set on a scratch librdkafka configuration at
 * de_conf_set time, so a bad key or value fails there with librdkafka's own
 * words, and is kept in the order set to be replayed onto the real producer
 * or consumer configuration later.
 *
 * Invariant: every value stored in a de_conf has passed validation, so code
 * reading it (de__conf_int and friends) never fails.
 */
#include "internal.h"

#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef enum { T_STR, T_INT, T_BOOL } keytype;

typedef de_err (*check_fn)(const char *key, const char *value);

static de_err check_topic_template(const char *key, const char *value);
static de_err check_source(const char *key, const char *value);
static de_err check_type_prefix(const char *key, const char *value);
static de_err check_gap(const char *key, const char *value);
static de_err check_unverifiable(const char *key, const char *value);
static de_err check_topics(const char *key, const char *value);
static de_err check_sources(const char *key, const char *value);
static de_err check_hmac_keys(const char *key, const char *value);

static const struct keydef {
    const char *name;
    const char *def;
    keytype type;
    int64_t min, max;
    check_fn check;
} keys[DE__K_COUNT] = {
    [DE__K_TOPIC_TEMPLATE] = {"topic.template", "{subject_type}.events", T_STR,
                              0, 0, check_topic_template},
    [DE__K_EVENT_SOURCE] = {"event.source", "/deliveryevents", T_STR, 0, 0,
                            check_source},
    [DE__K_EVENT_TYPE_PREFIX] = {"event.type.prefix", "", T_STR, 0, 0,
                                 check_type_prefix},
    [DE__K_EVENT_MAX_BYTES] = {"event.max.bytes", "990000", T_INT, 1024,
                               1000000000, NULL},
    [DE__K_OUTBOX_RETENTION_MS] = {"outbox.retention.ms", "0", T_INT, 0,
                                   INT64_C(315360000000), NULL},
    [DE__K_OUTBOX_BUSY_TIMEOUT_MS] = {"outbox.busy.timeout.ms", "5000", T_INT,
                                      0, INT32_MAX, NULL},
    [DE__K_OUTBOX_STRICT] = {"outbox.strict", "false", T_BOOL, 0, 1, NULL},
    [DE__K_RELAY_STATE_PATH] = {"relay.state.path", "", T_STR, 0, 0, NULL},
    [DE__K_RELAY_BATCH_SIZE] = {"relay.batch.size", "1000", T_INT, 1, 100000,
                                NULL},
    [DE__K_RELAY_MAX_INFLIGHT] = {"relay.max.inflight", "20000", T_INT, 1,
                                  1000000, NULL},
    [DE__K_RELAY_POLL_INTERVAL_MS] = {"relay.poll.interval.ms", "50", T_INT, 1,
                                      600000, NULL},
    [DE__K_RELAY_CHECKPOINT_INTERVAL_MS] = {"relay.checkpoint.interval.ms",
                                            "1000", T_INT, 1, 600000, NULL},
    [DE__K_RELAY_LEASE_TIMEOUT_MS] = {"relay.lease.timeout.ms", "5000", T_INT,
                                      300, 3600000, NULL},
    [DE__K_RELAY_BLOCKED_RETRY_MS] = {"relay.blocked.retry.ms", "60000", T_INT,
                                      10, 86400000, NULL},
    [DE__K_RELAY_CLEANUP_INTERVAL_MS] = {"relay.cleanup.interval.ms", "1000",
                                         T_INT, 10, 86400000, NULL},
    [DE__K_RELAY_RECOVERY_UNVERIFIABLE] = {"relay.recovery.unverifiable",
                                           "refuse", T_STR, 0, 0,
                                           check_unverifiable},
    /* 7 days; 0: never forget. */
    [DE__K_RELAY_SUBJECT_FORGET_MS] = {"relay.subject.forget.ms", "604800000",
                                       T_INT, 0, INT64_C(315360000000), NULL},
    [DE__K_RELAY_SUBJECT_CACHE] = {"relay.subject.cache", "100000", T_INT, 100,
                                   100000000, NULL},
    [DE__K_RELAY_SETTINGS_OVERRIDE] = {"relay.settings.override", "false",
                                       T_BOOL, 0, 1, NULL},
    [DE__K_CONSUMER_TOPICS] = {"consumer.topics", "", T_STR, 0, 0,
                               check_topics},
    [DE__K_CONSUMER_ON_GAP] = {"consumer.on.gap", "park", T_STR, 0, 0,
                               check_gap},
    [DE__K_CONSUMER_MAX_ATTEMPTS] = {"consumer.max.attempts", "5", T_INT, 1,
                                     1000, NULL},
    [DE__K_CONSUMER_RETRY_BACKOFF_MS] = {"consumer.retry.backoff.ms", "100",
                                         T_INT, 0, 3600000, NULL},
    [DE__K_CONSUMER_RETRY_BACKOFF_MAX_MS] = {"consumer.retry.backoff.max.ms",
                                             "5000", T_INT, 0, 3600000, NULL},
    [DE__K_CONSUMER_BATCH_SIZE] = {"consumer.batch.size", "500", T_INT, 1,
                                   100000, NULL},
    /* 14 days: past Kafka's default 7-day retention and the relay's 7
     * days, with 7 days of lag to spare; 0: never forget. */
    [DE__K_CONSUMER_SUBJECT_FORGET_MS] = {"consumer.subject.forget.ms",
                                          "1209600000", T_INT, 0,
                                          INT64_C(315360000000), NULL},
    /* Events without a sequence: how long their ids are remembered; the
     * same 14 days, past the default retention with room for lag. */
    [DE__K_CONSUMER_ID_FORGET_MS] = {"consumer.id.forget.ms", "1209600000",
                                     T_INT, 1000, INT64_C(315360000000), NULL},
    /* Empty: every ce_source may number subjects. */
    [DE__K_CONSUMER_SOURCES] = {"consumer.sources", "", T_STR, 0, 0,
                                check_sources},
    /* A subject's events come one number at a time; a jump of more than a
     * thousand is a forged or broken record, not a lost stretch of one
     * subject's history.  0: no limit. */
    [DE__K_CONSUMER_SEQ_MAX_JUMP] = {"consumer.seq.max.jump", "1000", T_INT, 0,
                                     INT64_C(999999999999999999), NULL},
    /* Kafka's default message limit: whatever a default broker accepts. */
    [DE__K_CONSUMER_RECORD_MAX_BYTES] = {"consumer.record.max.bytes", "1000000",
                                         T_INT, 1024, 1000000000, NULL},
    [DE__K_EVENT_HMAC_KEY] = {"event.hmac.key", "", T_STR, 0, 0,
                              check_hmac_keys},
    /* 0: dead letters are kept until deleted by hand, as before. */
    [DE__K_CONSUMER_DEAD_LETTER_RETENTION_MS] =
        {"consumer.dead.letter.retention.ms", "0", T_INT, 0,
         INT64_C(315360000000), NULL},
    /* Empty: the relay of a PostgreSQL outbox connects where the host's
     * connection did (deliveryevents_pg.h). */
    [DE__K_PG_CONNINFO] = {"pg.conninfo", "", T_STR, 0, 0, NULL},
    /* A named prepared statement: parsed and planned once per backend.
     * false: the unnamed statement, for hosts or poolers that DEALLOCATE
     * (deliveryevents_pg.h). */
    [DE__K_PG_RECORD_PREPARED] = {"pg.record.prepared", "true", T_BOOL, 0, 1,
                                  NULL},
};

struct rk_prop {
    char *key;
    char *value;
};

struct de_conf {
    char *val[DE__K_COUNT]; /* NULL: the default */
    int64_t num[DE__K_COUNT];
    struct rk_prop *rk; /* librdkafka properties in the order set */
    size_t nrk, caprk;
    rd_kafka_conf_t *probe; /* validates librdkafka properties */
    de_log_fn log_fn;
    void *log_ctx;
    de_stats_fn stats_fn;
    void *stats_ctx;
};

static int find_key(const char *name)
{
    for (size_t i = 0; i < DE__K_COUNT; i++)
        if (strcmp(keys[i].name, name) == 0)
            return (int)i;
    return -1;
}

static bool topic_char(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
           (c >= '0' && c <= '9') || c == '.' || c == '_' || c == '-';
}

/*
 * A template expands to a Kafka topic name: [A-Za-z0-9._-], at most 249
 * characters.  Only {subject_type} may be substituted -- a placeholder
 * that split one subject's events over several topics would break the
 * per-subject order Kafka keeps only within a partition.
 */
static de_err check_topic_template(const char *key, const char *value)
{
    static const char ph[] = "{subject_type}";
    size_t expanded = 0;
    const char *p = value;
    char q[DE__QUOTE_MAX];

    while (*p) {
        if (*p == '{') {
            if (strncmp(p, ph, sizeof ph - 1) != 0)
                return de__fail(DE_ERR_CONFIG,
                                "%s %s has an unknown placeholder; only "
                                "{subject_type} may be used",
                                key, de__quote(q, sizeof q, value, -1));
            p += sizeof ph - 1;
            expanded += DE__IDENT_MAX;
            continue;
        }
        if (!topic_char(*p))
            return de__fail(DE_ERR_CONFIG,
                            "%s %s is not a topic name: only letters, "
                            "digits, '.', '_' and '-' are allowed",
                            key, de__quote(q, sizeof q, value, -1));
        expanded++;
        p++;
    }
    if (expanded == 0)
        return de__fail(DE_ERR_CONFIG, "%s must not be empty", key);
    if (expanded > 249)
        return de__fail(DE_ERR_CONFIG,
                        "%s %s can expand to %zu characters; Kafka topic "
                        "names are at most 249 (a subject type is up to %d)",
                        key, de__quote(q, sizeof q, value, -1), expanded,
                        DE__IDENT_MAX);
    return DE_OK;
}

static de_err check_source(const char *key, const char *value)
{
    char q[DE__QUOTE_MAX];
    size_t len = strlen(value);

    if (len == 0 || len > DE__SOURCE_MAX || !de__is_uri_reference(value, len))
        return de__fail(DE_ERR_CONFIG,
                        "%s %s must be a non-empty RFC 3986 URI reference of "
                        "at most %d bytes (e.g. '/delivery-service/eu-1' or "
                        "'urn:example:delivery'; other characters "
                        "percent-encoded)",
                        key, de__quote(q, sizeof q, value, -1), DE__SOURCE_MAX);
    return DE_OK;
}

static de_err check_type_prefix(const char *key, const char *value)
{
    char q[DE__QUOTE_MAX];
    size_t len = strlen(value);
    bool ok = len <= DE__TYPE_PREFIX_MAX;

    for (size_t i = 0; ok && i < len; i++)
        ok = topic_char(value[i]);
    if (!ok)
        return de__fail(DE_ERR_CONFIG,
                        "%s %s must be at most %d of the characters "
                        "[A-Za-z0-9._-], e.g. 'com.example.'",
                        key, de__quote(q, sizeof q, value, -1),
                        DE__TYPE_PREFIX_MAX);
    return DE_OK;
}

/* value must be one of the choices (NULL-terminated). */
static de_err check_choice(const char *key, const char *value,
                           const char *const *choices, const char *expected)
{
    char q[DE__QUOTE_MAX];

    for (size_t i = 0; choices[i] != NULL; i++)
        if (strcmp(value, choices[i]) == 0)
            return DE_OK;
    return de__fail(DE_ERR_CONFIG, "%s %s must be %s", key,
                    de__quote(q, sizeof q, value, -1), expected);
}

static de_err check_gap(const char *key, const char *value)
{
    static const char *const choices[] = {"park", "apply", NULL};

    return check_choice(key, value, choices, "park or apply");
}

static de_err check_unverifiable(const char *key, const char *value)
{
    static const char *const choices[] = {"refuse", "continue", NULL};

    return check_choice(key, value, choices, "refuse or continue");
}

/* A comma-separated list of topic names (empty: derive from handlers). */
static de_err check_topics(const char *key, const char *value)
{
    char q[DE__QUOTE_MAX];
    size_t run = 0;

    for (const char *p = value;; p++) {
        if (*p == ',' || *p == '\0') {
            if (run == 0 && (*p == ',' || p != value))
                return de__fail(DE_ERR_CONFIG, "%s %s has an empty topic name",
                                key, de__quote(q, sizeof q, value, -1));
            if (run > 249)
                return de__fail(DE_ERR_CONFIG,
                                "%s %s has a topic name over 249 characters",
                                key, de__quote(q, sizeof q, value, -1));
            run = 0;
            if (*p == '\0')
                break;
            continue;
        }
        if (!topic_char(*p))
            return de__fail(DE_ERR_CONFIG,
                            "%s %s is not a comma-separated list of topic "
                            "names ([A-Za-z0-9._-])",
                            key, de__quote(q, sizeof q, value, -1));
        run++;
    }
    return DE_OK;
}

/* A comma-separated list of ce_source values: each 1..1024 bytes of
 * UTF-8 without control characters (a source with a comma cannot be
 * listed; CloudEvents sources are URI references, which have none
 * unescaped). */
static de_err check_sources(const char *key, const char *value)
{
    char q[DE__QUOTE_MAX];
    const char *p = value;

    if (value[0] == '\0')
        return DE_OK;
    for (;;) {
        const char *end = strchr(p, ',');
        size_t n = end ? (size_t)(end - p) : strlen(p);
        if (n == 0 || n > DE__CE_TEXT_MAX || !de__is_clean_utf8(p, n))
            return de__fail(DE_ERR_CONFIG,
                            "%s %s must be a comma-separated list of "
                            "ce_source values, each 1..%d bytes of UTF-8 "
                            "without control characters",
                            key, de__quote(q, sizeof q, value, -1),
                            DE__CE_TEXT_MAX);
        if (end == NULL)
            return DE_OK;
        p = end + 1;
    }
}

/*
 * event.hmac.key: "<key id>:<secret>[,<key id>:<secret>...]".  A secret:
 * the message names the key and the part that is wrong, never the value.
 */
static de_err check_hmac_keys(const char *key, const char *value)
{
    de__hmac_keyring kr;
    char why[200];
    de_err err = DE_OK;

    if (!de__hmac_keyring_parse(value, &kr, why, sizeof why))
        err = de__fail(DE_ERR_CONFIG,
                       "%s (a secret: its value is never shown): %s; expected "
                       "<key id>:<secret>[,<key id>:<secret>...], ids 1..%d "
                       "of [A-Za-z0-9._-], secrets %d..%d bytes of printable "
                       "ASCII without ','",
                       key, why, DE__HMAC_ID_MAX, DE__HMAC_SECRET_MIN,
                       DE__HMAC_SECRET_MAX);
    de__hmac_keyring_free(&kr);
    return err;
}

/* Parses and range-checks a value of key k into *num. */
static de_err parse_value(int k, const char *value, int64_t *num)
{
    const struct keydef *kd = &keys[k];
    char q[DE__QUOTE_MAX];
    char *end;
    long long v;

    *num = 0;
    switch (kd->type) {
    case T_STR: break;
    case T_BOOL:
        if (strcmp(value, "true") == 0 || strcmp(value, "1") == 0)
            *num = 1;
        else if (strcmp(value, "false") == 0 || strcmp(value, "0") == 0)
            *num = 0;
        else
            return de__fail(DE_ERR_CONFIG, "%s %s must be true or false",
                            kd->name, de__quote(q, sizeof q, value, -1));
        break;
    case T_INT:
        errno = 0;
        v = strtoll(value, &end, 10);
        if (value[0] == '\0' || *end != '\0' || errno != 0 || v < kd->min ||
            v > kd->max)
            return de__fail(DE_ERR_CONFIG,
                            "%s %s must be an integer from %lld to %lld",
                            kd->name, de__quote(q, sizeof q, value, -1),
                            (long long)kd->min, (long long)kd->max);
        *num = v;
        break;
    }
    return kd->check ? kd->check(kd->name, value) : DE_OK;
}

de_conf *de_conf_new(void)
{
    de_conf *conf = calloc(1, sizeof *conf);

    if (conf == NULL)
        return NULL;
    for (int k = 0; k < DE__K_COUNT; k++)
        (void)parse_value(k, keys[k].def, &conf->num[k]);
    return conf;
}

/* Frees a stored value, wiped first: it may be a password. */
static void free_value(char *v)
{
    if (v != NULL) {
        explicit_bzero(v, strlen(v));
        free(v);
    }
}

void de_conf_destroy(de_conf *conf)
{
    if (conf == NULL)
        return;
    for (int k = 0; k < DE__K_COUNT; k++)
        free_value(conf->val[k]);
    for (size_t i = 0; i < conf->nrk; i++) {
        free(conf->rk[i].key);
        free_value(conf->rk[i].value);
    }
    free(conf->rk);
    if (conf->probe)
        rd_kafka_conf_destroy(conf->probe);
    free(conf);
}

/* Remembers a librdkafka property, replacing an earlier value. */
static de_err store_rdkafka(de_conf *conf, const char *key, const char *value)
{
    char *v = strdup(value), *k;

    if (v == NULL)
        return de__fail(DE_ERR_NOMEM, "out of memory setting %s", key);
    for (size_t i = 0; i < conf->nrk; i++) {
        if (strcmp(conf->rk[i].key, key) == 0) {
            free_value(conf->rk[i].value);
            conf->rk[i].value = v;
            return DE_OK;
        }
    }
    if (conf->nrk == conf->caprk) {
        size_t cap = conf->caprk ? conf->caprk * 2 : 8;
        struct rk_prop *n = realloc(conf->rk, cap * sizeof *n);
        if (n == NULL)
            goto nomem;
        conf->rk = n;
        conf->caprk = cap;
    }
    k = strdup(key);
    if (k == NULL)
        goto nomem;
    conf->rk[conf->nrk].key = k;
    conf->rk[conf->nrk].value = v;
    conf->nrk++;
    return DE_OK;
nomem:
    free_value(v);
    return de__fail(DE_ERR_NOMEM, "out of memory setting %s", key);
}

/* Whether s[at, at + n) stands alone: not part of a longer word. */
static bool standalone(const char *s, size_t at, size_t n)
{
    bool before = at == 0 || !isalnum((unsigned char)s[at - 1]);
    bool after = !isalnum((unsigned char)s[at + n]);

    return before && after;
}

/* How many bytes from s on are a piece of value (0 when s[0] is not). */
static size_t echoed(const char *s, const char *value, size_t n)
{
    size_t k = 0;

    while (s[k] != '\0' && memmem(value, n, s, k + 1) != NULL)
        k++;
    return k;
}

/*
 * librdkafka refused a value.  Any librdkafka property may hold a secret
 * (sasl.password, ssl.key.password, ...), so the message names the key
 * and never the value: librdkafka's own words are kept with "<value>" in
 * place of every run of 4 or more bytes that is a piece of the value, and
 * of a shorter value standing alone -- librdkafka echoes values, cuts long
 * ones short, and may echo one item of a list.
 */
static de_err rk_refused(const char *key, const char *value, const char *errstr)
{
    char clean[512];
    size_t n = strlen(value), o = 0, k;

    for (size_t i = 0; errstr[i] != '\0' && o + 8 < sizeof clean;) {
        k = n > 0 ? echoed(errstr + i, value, n) : 0;
        if (k >= 4 || (k > 0 && k == n && standalone(errstr, i, n))) {
            memcpy(clean + o, "<value>", 7);
            o += 7;
            i += k;
        } else {
            clean[o++] = errstr[i++];
        }
    }
    clean[o] = '\0';
    return de__fail(DE_ERR_CONFIG,
                    "librdkafka refused the value of %s (values of librdkafka "
                    "properties are never shown: they may be secrets): %s",
                    key, clean);
}

de_err de_conf_set(de_conf *conf, const char *key, const char *value)
{
    char errstr[512], q[DE__QUOTE_MAX];
    int64_t num;
    de_err err;
    int k;

    if (conf == NULL || key == NULL || value == NULL)
        return de__fail(DE_ERR_ARG,
                        "de_conf_set needs a configuration, a "
                        "key and a value (got NULL %s)",
                        conf == NULL  ? "conf"
                        : key == NULL ? "key"
                                      : "value");
    k = find_key(key);
    if (k >= 0) {
        char *copy;
        err = parse_value(k, value, &num);
        if (err != DE_OK)
            return err;
        copy = strdup(value);
        if (copy == NULL)
            return de__fail(DE_ERR_NOMEM, "out of memory setting %s", key);
        free_value(conf->val[k]);
        conf->val[k] = copy;
        conf->num[k] = num;
        return DE_OK;
    }
    if (conf->probe == NULL) {
        conf->probe = rd_kafka_conf_new();
        if (conf->probe == NULL)
            return de__fail(DE_ERR_NOMEM, "out of memory setting %s", key);
    }
    switch (rd_kafka_conf_set(conf->probe, key, value, errstr, sizeof errstr)) {
    case RD_KAFKA_CONF_OK: return store_rdkafka(conf, key, value);
    case RD_KAFKA_CONF_UNKNOWN:
        return de__fail(DE_ERR_CONFIG,
                        "unknown configuration property %s: neither a "
                        "libdeliveryevents key nor a librdkafka one",
                        de__quote(q, sizeof q, key, -1));
    default: return rk_refused(key, value, errstr);
    }
}

const char *de_conf_get(const de_conf *conf, const char *key)
{
    const char *v = NULL;
    int k;

    if (key == NULL)
        return NULL;
    k = find_key(key);
    if (k >= 0)
        return de__conf_str(conf, (de__key)k);
    if (conf != NULL && de__conf_rdkafka_get(conf, key, &v))
        return v;
    return NULL;
}

const char *de__conf_key_name(int k)
{
    return k >= 0 && k < DE__K_COUNT ? keys[k].name : NULL;
}

const char *de__conf_str(const de_conf *conf, de__key k)
{
    if (conf != NULL && conf->val[k] != NULL)
        return conf->val[k];
    return keys[k].def;
}

int64_t de__conf_int(const de_conf *conf, de__key k)
{
    int64_t num = 0;

    if (conf != NULL)
        return conf->num[k];
    (void)parse_value((int)k, keys[k].def, &num);
    return num;
}

bool de__conf_bool(const de_conf *conf, de__key k)
{
    return de__conf_int(conf, k) != 0;
}

bool de__conf_is_set(const de_conf *conf, de__key k)
{
    return conf != NULL && conf->val[k] != NULL;
}

bool de__conf_rdkafka_get(const de_conf *conf, const char *key,
                          const char **value)
{
    if (conf == NULL)
        return false;
    for (size_t i = 0; i < conf->nrk; i++) {
        if (strcmp(conf->rk[i].key, key) == 0) {
            if (value)
                *value = conf->rk[i].value;
            return true;
        }
    }
    return false;
}

de_err de__conf_apply_rdkafka(const de_conf *conf, rd_kafka_conf_t *rkconf)
{
    char errstr[512];

    if (conf == NULL)
        return DE_OK;
    for (size_t i = 0; i < conf->nrk; i++) {
        if (rd_kafka_conf_set(rkconf, conf->rk[i].key, conf->rk[i].value,
                              errstr, sizeof errstr) != RD_KAFKA_CONF_OK)
            return rk_refused(conf->rk[i].key, conf->rk[i].value, errstr);
    }
    return DE_OK;
}

de_err de__conf_merge(de_conf *dst, const de_conf *src)
{
    de_err err;

    if (src == NULL)
        return DE_OK;
    for (int k = 0; k < DE__K_COUNT; k++)
        if (src->val[k] &&
            (err = de_conf_set(dst, keys[k].name, src->val[k])) != DE_OK)
            return err;
    for (size_t i = 0; i < src->nrk; i++)
        if ((err = de_conf_set(dst, src->rk[i].key, src->rk[i].value)) != DE_OK)
            return err;
    if (src->stats_fn != NULL) {
        dst->stats_fn = src->stats_fn;
        dst->stats_ctx = src->stats_ctx;
    }
    if (src->log_fn != NULL) {
        dst->log_fn = src->log_fn;
        dst->log_ctx = src->log_ctx;
    }
    return DE_OK;
}

de_conf *de__conf_dup(const de_conf *conf)
{
    de_conf *c = de_conf_new();

    if (c != NULL && de__conf_merge(c, conf) != DE_OK) {
        de_conf_destroy(c);
        return NULL;
    }
    return c;
}

void de_conf_set_stats_cb(de_conf *conf, de_stats_fn fn, void *ctx)
{
    if (conf == NULL)
        return;
    conf->stats_fn = fn;
    conf->stats_ctx = fn ? ctx : NULL;
}

de_stats_fn de__conf_stats_cb(const de_conf *conf, void **ctx)
{
    *ctx = conf ? conf->stats_ctx : NULL;
    return conf ? conf->stats_fn : NULL;
}

void de_conf_set_log_cb(de_conf *conf, de_log_fn fn, void *ctx)
{
    if (conf == NULL)
        return;
    conf->log_fn = fn;
    conf->log_ctx = fn ? ctx : NULL;
}

void de__vlog(const de_conf *conf, int level, const char *fmt, va_list ap)
{
    char line[1024];

    if ((conf == NULL || conf->log_fn == NULL) && level > DE_LOG_WARNING)
        return;
    vsnprintf(line, sizeof line, fmt, ap);
    if (conf != NULL && conf->log_fn != NULL)
        conf->log_fn(conf->log_ctx, level, line);
    else
        fprintf(stderr, "deliveryevents: %s\n", line);
}

void de__log(const de_conf *conf, int level, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    de__vlog(conf, level, fmt, ap);
    va_end(ap);
}

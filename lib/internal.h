/* SPDX-License-Identifier: MIT */
/*
 * internal.h -- declarations shared between the library's files.
 *
 * Nothing here is exported (the library is built with -fvisibility=hidden);
 * shared helpers are named de__*.  Every file includes this header first.
 */
#ifndef DE_INTERNAL_H
#define DE_INTERNAL_H

#define DE_BUILDING_LIBRARY 1
#include "deliveryevents.h"

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <librdkafka/rdkafka.h>

#define DE__PRINTF(a, b) __attribute__((format(printf, a, b)))
#define DE__ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))

/* ---- results that never leave the library ---------------------------- */

/* Like libgit2's GIT_RETRY: internal only, never returned by a public
 * function and never reported through de_errmsg(). */
#define DE__AGAIN ((de_err)100)          /* not now: nothing is wrong     */
#define DE__REDO ((de_err)101)           /* undo and redo more carefully  */
#define DE__HANDLER_FAILED ((de_err)102) /* a consumer's handler said no  */

/* ---- shared utilities (util.c) ---------------------------------------- */

/* A growable array: DE__VEC(T) v = {0}; DE__VEC_PUSH(v, item) is false
 * (and v unchanged) when out of memory or when the size would overflow. */
#define DE__VEC(T)                                                             \
    struct {                                                                   \
        T *v;                                                                  \
        size_t n, cap;                                                         \
    }
bool de__vec_reserve(void **v, size_t *cap, size_t need, size_t size);
#define DE__VEC_PUSH(vec, item)                                                \
    (((vec).n < (vec).cap || de__vec_reserve((void **)&(vec).v, &(vec).cap,    \
                                             (vec).n + 1, sizeof *(vec).v))    \
         ? ((vec).v[(vec).n++] = (item), true)                                 \
         : false)
#define DE__VEC_FREE(vec)                                                      \
    (free((vec).v), (vec).v = NULL, (vec).n = (vec).cap = 0)

/* ---- errors (error.c) ------------------------------------------------ */

/* Sets the calling thread's message and returns code, so that a failure is
 * one statement: `return de__fail(DE_ERR_ARG, "...", ...);`. */
de_err de__fail(de_err code, const char *fmt, ...) DE__PRINTF(2, 3);
de_err de__vfail(de_err code, const char *fmt, va_list ap) DE__PRINTF(2, 0);

/* Counts the messages set on this thread: a message set during a call
 * changes it (so that old text is never passed off as new). */
uint64_t de__errmsg_serial(void);

/* DE_ERR_DB with SQLite's own text appended: "<what>: <sqlite3_errmsg>". */
de_err de__fail_db(sqlite3 *db, const char *fmt, ...) DE__PRINTF(2, 3);

/* Quotes a value for a message: '...' with control characters and invalid
 * UTF-8 escaped as \xNN and long values cut (with "...") to fit buf.
 * len == (size_t)-1 means NUL-terminated.  Returns buf. */
#define DE__QUOTE_MAX 96
char *de__quote(char *buf, size_t bufsize, const char *s, size_t len);

/* ---- configuration (conf.c) ----------------------------------------- */

/* Library-owned keys, in the order of docs/CONFIGURATION.md. */
typedef enum {
    DE__K_TOPIC_TEMPLATE = 0,
    DE__K_EVENT_SOURCE,
    DE__K_EVENT_TYPE_PREFIX,
    DE__K_EVENT_MAX_BYTES,
    DE__K_OUTBOX_RETENTION_MS,
    DE__K_OUTBOX_BUSY_TIMEOUT_MS,
    DE__K_OUTBOX_STRICT,
    DE__K_RELAY_STATE_PATH,
    DE__K_RELAY_BATCH_SIZE,
    DE__K_RELAY_MAX_INFLIGHT,
    DE__K_RELAY_POLL_INTERVAL_MS,
    DE__K_RELAY_CHECKPOINT_INTERVAL_MS,
    DE__K_RELAY_LEASE_TIMEOUT_MS,
    DE__K_RELAY_BLOCKED_RETRY_MS,
    DE__K_RELAY_CLEANUP_INTERVAL_MS,
    DE__K_RELAY_RECOVERY_UNVERIFIABLE,
    DE__K_RELAY_SUBJECT_FORGET_MS,
    DE__K_RELAY_SUBJECT_CACHE,
    DE__K_RELAY_SETTINGS_OVERRIDE,
    DE__K_CONSUMER_TOPICS,
    DE__K_CONSUMER_ON_GAP,
    DE__K_CONSUMER_MAX_ATTEMPTS,
    DE__K_CONSUMER_RETRY_BACKOFF_MS,
    DE__K_CONSUMER_RETRY_BACKOFF_MAX_MS,
    DE__K_CONSUMER_BATCH_SIZE,
    DE__K_CONSUMER_SUBJECT_FORGET_MS,
    DE__K_CONSUMER_ID_FORGET_MS,
    DE__K_CONSUMER_SOURCES,
    DE__K_CONSUMER_SEQ_MAX_JUMP,
    DE__K_CONSUMER_RECORD_MAX_BYTES,
    DE__K_EVENT_HMAC_KEY,
    DE__K_CONSUMER_DEAD_LETTER_RETENTION_MS,
    DE__K_PG_CONNINFO,
    DE__K_PG_RECORD_PREPARED,
    DE__K_COUNT
} de__key;

/* Longest allowed event.source and event.type.prefix.  de_record sizes the
 * record with these maxima, so a relay elsewhere with another source or
 * prefix can never push a record over event.max.bytes. */
#define DE__SOURCE_MAX 255
#define DE__TYPE_PREFIX_MAX 128

const char *de__conf_str(const de_conf *conf, de__key k);
/* The name of library key k (0 <= k < DE__K_COUNT). */
const char *de__conf_key_name(int k);
int64_t de__conf_int(const de_conf *conf, de__key k);
bool de__conf_bool(const de_conf *conf, de__key k);
/* conf's statistics callback (NULL: none); *ctx receives its pointer. */
de_stats_fn de__conf_stats_cb(const de_conf *conf, void **ctx);
/* Whether library key k was set on conf (not left at its default). */
bool de__conf_is_set(const de_conf *conf, de__key k);

/* The settings that decide what goes on the wire -- which topic, which
 * ce_source, which ce_type -- and so must be the same for every relay of
 * one database.  A writer that sets one stores it with the outbox; every
 * relay of that database uses the stored value (see relay.c). */
#define DE__WIRE_KEYS                                                          \
    {                                                                          \
        DE__K_TOPIC_TEMPLATE, DE__K_EVENT_SOURCE, DE__K_EVENT_TYPE_PREFIX      \
    }

/* Applies every librdkafka property set on conf (in the order set) to
 * rkconf.  Returns DE_OK or DE_ERR_CONFIG with the message set. */
de_err de__conf_apply_rdkafka(const de_conf *conf, rd_kafka_conf_t *rkconf);

/* Whether the user set librdkafka property `key`; *value receives it. */
bool de__conf_rdkafka_get(const de_conf *conf, const char *key,
                          const char **value);

/* A deep copy of conf (conf may be NULL: a new default configuration). */
de_conf *de__conf_dup(const de_conf *conf);

/* Sets on dst everything set on src (library keys, librdkafka properties,
 * the log callback).  DE_OK or the failure of de_conf_set. */
de_err de__conf_merge(de_conf *dst, const de_conf *src);

/* Logs through conf's callback, or to stderr (WARNING and worse). */
void de__log(const de_conf *conf, int level, const char *fmt, ...)
    DE__PRINTF(3, 4);
void de__vlog(const de_conf *conf, int level, const char *fmt, va_list ap)
    DE__PRINTF(3, 0);
/* de__log with a prefix naming the component ("relay /srv/a.db: "). */
void de__logp(const de_conf *conf, int level, const char *prefix,
              const char *fmt, ...) DE__PRINTF(4, 5);

/* ---- librdkafka glue (kafka.c) ----------------------------------------- */

typedef struct de__rk_prop {
    const char *key, *value;
} de__rk_prop;

/* A property a client must own, and why (quoted when a user value is
 * refused). */
typedef struct de__rk_owned {
    const char *key, *value, *why;
} de__rk_owned;

/* A client's opaque: where its log lines, fatal errors and statistics
 * go. */
typedef struct de__rk_bridge {
    const de_conf *conf;      /* the log callback                       */
    char prefix[300];         /* "relay /srv/a.db: "                    */
    const char *const *quiet; /* substrings of lines logged as debug    */
    void *owner;              /* the relay or consumer                  */
    void (*on_fatal)(void *owner, rd_kafka_resp_err_t err, const char *why);
    /* Non-NULL: librdkafka's statistics, when they run (see
     * de__rk_stats_interval), are handed here on the thread serving the
     * client's main queue after brokers_up is updated. */
    void (*on_stats)(void *owner, const char *json, size_t len);
    _Atomic int64_t brokers_up; /* from the last statistics; -1 unknown */
} de__rk_bridge;

/* A client's statistics interval in ms: librdkafka's
 * statistics.interval.ms as conf sets it, else 1000 with a statistics
 * callback, else 0 (off). */
int64_t de__rk_stats_interval(const de_conf *conf);
/* rd_kafka_destroy(rk), waiting at most timeout_ms; past that the handle
 * is left to a thread of its own and a warning logged (librdkafka 2.0's
 * destroy can hang after a broker outage).  Whether it is gone. */
bool de__rk_destroy_within(rd_kafka_t *rk, int timeout_ms, const de_conf *conf,
                           const char *who);

/* The document a statistics callback receives: obj (a JSON object, taken
 * by this call) with librdkafka's statistics spliced in as "rdkafka" (raw
 * text; NULL gives null).  Returns a malloc'd NUL-terminated string and
 * its length, or NULL when out of memory. */
struct json_t;
/* The statistics callback's objects for a relay's and a consumer's
 * counters (metrics.c); NULL when out of memory. */
struct json_t *de__relay_stats_json(const de_relay_stats *s,
                                    const char *database);
struct json_t *de__consumer_stats_json(const de_consumer_stats *s,
                                       const char *group);
/* The labels of their Prometheus metrics. */
const char *de__relay_db_path(const de_relay *r);
const char *de__consumer_group(const de_consumer *c);
char *de__stats_doc(struct json_t *obj, const char *rk_json, size_t rk_len,
                    size_t *len);

/* A client configuration: defaults, then conf's librdkafka properties,
 * then the owned ones (a contradicting user value is refused with
 * DE_ERR_CONFIG), with the log and error bridge.  who names the client in
 * messages ("relay", "consumer"). */
de_err de__rk_conf(const de_conf *conf, const char *who,
                   const de__rk_prop *defaults, size_t ndefaults,
                   const de__rk_owned *owned, size_t nowned,
                   de__rk_bridge *bridge, rd_kafka_conf_t **out);
/* rd_kafka_new, taking c in every case, with the log queue set. */
de_err de__rk_new(rd_kafka_type_t type, rd_kafka_conf_t *c, const char *who,
                  rd_kafka_t **out);
void de__rk_log(const rd_kafka_t *rk, int level, const char *fac,
                const char *buf);
void de__rk_error(rd_kafka_t *rk, int err, const char *reason, void *opaque);

/* ---- time and ids (ids.c) ------------------------------------------- */

int64_t de__now_ms(void);  /* wall clock, Unix ms UTC */
int64_t de__mono_us(void); /* monotonic microseconds */
int64_t de__mono_ms(void); /* monotonic milliseconds */
/* 64 random bits from the thread's generator (the one de__uuid7 draws
 * from; seeded from getrandom(2)): for jitter, not for secrets. */
uint64_t de__random64(void);

/* Writes a new UUIDv7 (RFC 9562; time-ordered within this thread) as 36
 * lowercase characters plus NUL. */
void de__uuid7(char out[37]);
/* The 16 bytes b as a canonical UUID: lowercase, hyphenated, NUL-ended. */
void de__uuid_format(const unsigned char b[16], char out[37]);
/* The bytes of text if it is a canonical UUID (36 characters, lowercase
 * hex, hyphens at 8, 13, 18 and 23): what de__uuid_format gives back
 * exactly; false for anything else. */
bool de__uuid_parse(const char *text, unsigned char b[16]);

/* Formats Unix ms as RFC 3339 UTC with milliseconds,
 * "2026-11-25T11:00:00.123Z" (24 characters plus NUL).  ms must be within
 * [0, DE__MAX_TIME_MS]. */
/* 9999-12-31T23:59:59.999Z */
#define DE__MAX_TIME_MS INT64_C(253402300799999)
#define DE__RFC3339_LEN 24
void de__rfc3339_ms(int64_t ms, char out[DE__RFC3339_LEN + 1]);
/* Parses an RFC 3339 date-time ("2026-11-25T11:00:00.123456+01:00", any
 * offset, any number of fraction digits; a leap second counts as :59.999)
 * into Unix ms UTC, the fraction cut to milliseconds.  False when s is not
 * one. */
bool de__parse_rfc3339_ms(const char *s, size_t n, int64_t *out);

/* ---- input rules (validate.c) --------------------------------------- */

#define DE__IDENT_MAX 64
#define DE__SUBJECT_ID_MAX 256
#define DE__EVENT_ID_MAX 36
#define DE__TRACESTATE_MAX 512

/* [a-z][a-z0-9_]*, 1..DE__IDENT_MAX bytes. */
bool de__is_ident(const char *s);
/* Non-empty valid UTF-8 without C0, DEL or C1 controls or the
 * bidirectional formatting controls (U+061C, U+200E, U+200F,
 * U+202A..U+202E, U+2066..U+2069). */
bool de__is_clean_utf8(const char *s, size_t len);
/* Length of the UTF-8 sequence starting at s (at most avail bytes), or 0
 * when it is not a valid, shortest-form encoding of a scalar value. */
size_t de__utf8_seq_len(const unsigned char *s, size_t avail);
/* 1..36 printable ASCII characters without spaces. */
bool de__is_event_id(const char *s);
/* A W3C trace-context traceparent header value. */
bool de__is_traceparent(const char *s);
/* Printable ASCII, at most DE__TRACESTATE_MAX bytes. */
bool de__is_tracestate(const char *s);
/* The one rule for payloads, on both sides (validate.c): an RFC 8259 JSON
 * object in UTF-8, member names unique within each object, nesting at
 * most DE__JSON_MAX_DEPTH levels, numbers of any size. */
#define DE__JSON_MAX_DEPTH 128
typedef struct de__json_error {
    const char *what; /* e.g. "a duplicate member name" */
    size_t offset;    /* byte where it was found         */
    bool not_object;  /* valid JSON, but not an object */
} de__json_error;
bool de__json_check(const char *s, size_t len, de__json_error *err);
bool de__json_is_object(const char *s, size_t len);

/* A top-level member of a JSON object: its name and its value as raw text
 * (the name with its quotes, unescaped with de__json_unescape). */
typedef struct de__json_member {
    const char *name;
    size_t name_len;
    const char *value;
    size_t value_len;
} de__json_member;
typedef bool (*de__json_member_fn)(void *ctx, const de__json_member *m);
/* Calls fn for each top-level member of s, which de__json_check accepted,
 * in order; false when fn returns false. */
bool de__json_members(const char *s, size_t len, de__json_member_fn fn,
                      void *ctx);
/* Writes the text of a JSON string (raw, with its quotes, as
 * de__json_members gives it) into out, NUL-terminated: at most n - 1
 * bytes.  Returns its length; (size_t)-1 when raw is not a string. */
size_t de__json_unescape(const char *raw, size_t n, char *out);

/* Names as other CloudEvents producers write them.  A subject type: 1 to
 * DE__NAME_MAX of [A-Za-z0-9._-] (it can be a topic name).  An action:
 * 1 to DE__ACTION_MAX bytes of UTF-8 without controls or spaces. */
#define DE__NAME_MAX 249
#define DE__ACTION_MAX 128
bool de__is_type_name(const char *s, size_t n);
bool de__is_action_name(const char *s, size_t n);
/* RFC 3986 URI-reference (ASCII; every part checked for its characters,
 * percent-encodings for their two hex digits). */
bool de__is_uri_reference(const char *s, size_t n);

/* Limits on what the consumer takes from any producer: ce_id, and
 * ce_source and ce_type. */
#define DE__CE_ID_MAX 255
#define DE__CE_TEXT_MAX 1024

/* ---- wire format (envelope.c) --------------------------------------- */

/* Header names on the wire, in the order the relay writes them. */
#define DE__H_SPECVERSION "ce_specversion"
#define DE__H_ID "ce_id"
#define DE__H_SOURCE "ce_source"
#define DE__H_TYPE "ce_type"
#define DE__H_SUBJECT "ce_subject"
#define DE__H_TIME "ce_time"
#define DE__H_CONTENT_TYPE "content-type"
#define DE__H_PARTITIONKEY "ce_partitionkey"
#define DE__H_SUBJECTSEQ "ce_subjectseq"
#define DE__H_SUBJECTEPOCH "ce_subjectepoch"
#define DE__H_SUBJECTTYPE "ce_subjecttype"
#define DE__H_ACTION "ce_action"
#define DE__H_DATASCHEMA "ce_dataschema"
#define DE__H_TRACEPARENT "traceparent"
#define DE__H_TRACESTATE "tracestate"

/* The most bytes a record for these parts can take on the wire (key,
 * value, every header with its framing, the record's own framing), with
 * the longest allowed source and type prefix and a 20-digit sequence, so
 * that it holds whichever relay publishes it. */
size_t de__record_max_size(size_t subject_type_len, size_t subject_id_len,
                           size_t action_len, int version, size_t payload_len,
                           size_t traceparent_len, size_t tracestate_len,
                           size_t dataschema_len);

/* One outbox row as the relay reads it; strings borrowed from the
 * statement until its next step. */
typedef struct de__row {
    int64_t position;
    const char *event_id;
    const char *subject_type;
    const char *subject_id;
    size_t subject_id_len;
    const char *action;
    int version;
    int64_t occurred_at_ms;
    int64_t recorded_at_ms;
    const char *payload;
    size_t payload_len;
    const char *traceparent; /* NULL when absent */
    const char *tracestate;  /* NULL when absent */
    const char *dataschema;  /* the contract's $id; NULL when absent */
} de__row;

/* The rules de_record applies to an event (outbox.c), one set for every
 * writer: DE_ERR_ARG or DE_ERR_PAYLOAD with the message naming the field
 * and its value.  max_bytes 0: the record's size is not checked. */
de_err de__event_check(const de_event *ev, int64_t max_bytes,
                       const char **payload, size_t *payload_len);
/* The same rules for a row read back from the outbox, which anyone with
 * write access to the database may have inserted by hand: also no NUL
 * inside a text, and an event id present.  DE_OK or DE_ERR_ARG /
 * DE_ERR_PAYLOAD with the reason (envelope.c). */
de_err de__row_check(const de__row *row);

/* The CloudEvents headers of a row's record (docs/OVERVIEW.md).  NULL
 * when out of memory.  The caller owns the result until it hands it to
 * rd_kafka_producev successfully. */
rd_kafka_headers_t *de__envelope_headers(const de__row *row, int64_t epoch,
                                         int64_t seq, const char *source,
                                         const char *type_prefix);

/* Whether the number (e1, s1) comes after (e2, s2): a subject's numbers
 * compare by epoch (ce_subjectepoch), then by ce_subjectseq. */
static inline bool de__number_after(int64_t e1, int64_t s1, int64_t e2,
                                    int64_t s2)
{
    return e1 > e2 || (e1 == e2 && s1 > s2);
}

/* A positive decimal of at most 18 digits without a leading zero (as
 * ce_subjectseq and ce_subjectepoch are written). */
bool de__parse_count(const char *s, size_t n, int64_t *out);

/* "<prefix><subject_type>.<action>[.v<version>]" into buf. */
void de__envelope_type(char *buf, size_t size, const char *prefix,
                       const char *subject_type, const char *action,
                       int version);

/* topic.template with {subject_type} substituted, into buf. */
void de__topic_name(char *buf, size_t size, const char *template_,
                    const char *subject_type);

/* One header of a record, as librdkafka hands it (value NULL: a header
 * without a value). */
typedef struct de__header {
    const char *name;
    const void *value;
    size_t size;
} de__header;

/* A record as read from Kafka, whatever read it: borrowed pointers. */
typedef struct de__raw {
    const char *topic;
    int32_t partition;
    int64_t offset;
    const void *key; /* may be NULL */
    size_t key_len;
    const void *value; /* may be NULL */
    size_t len;
    int64_t timestamp_ms; /* -1: none */
    const de__header *headers;
    size_t nheaders;
} de__raw;

/* A record decoded by de__envelope_decode: a de_event_view whose strings
 * live in buf (NUL-terminated copies); scratch holds a structured-mode
 * event's unescaped attributes while it is decoded; hdrs the headers of
 * the record last read (de__raw_of). */
typedef struct de__decoded {
    de_event_view view;
    char *buf, *scratch;
    size_t cap, scratch_cap;
    DE__VEC(de__header) hdrs;
} de__decoded;

/* Fills r from m, its headers in d->hdrs (valid until the next call). */
bool de__raw_of(const rd_kafka_message_t *m, de__decoded *d, de__raw *r);

/* A record's size as consumer.record.max.bytes counts it: key, value,
 * and every header's name and value. */
size_t de__raw_size(const de__raw *r);

/* Decodes a CloudEvents 1.0 record of any producer, in binary or
 * structured mode (JSON event format), as docs/CONSUMER.md describes:
 * subject from ce_subject, else ce_partitionkey, else the key; subject
 * type from ce_subjecttype, else the topic by tmpl (topic.template);
 * action from ce_action, else the last '.'-part of ce_type; time from
 * ce_time, else the record timestamp; subject_seq 0 when the event has no
 * ce_subjectseq.  On failure returns false and writes why (naming the bad
 * attribute and value) into why. */
bool de__envelope_decode(const rd_kafka_message_t *m, const char *tmpl,
                         de__decoded *d, char *why, size_t why_size);
/* The same for a record already in hand (r's headers may be d->hdrs). */
bool de__raw_decode(const de__raw *r, const char *tmpl, de__decoded *d,
                    char *why, size_t why_size);
/* The subject type a topic stands for by topic.template (the part where
 * {subject_type} is), else the topic's whole name. */
void de__topic_subject_type(const char *tmpl, const char *topic,
                            const char **out, size_t *len);
void de__decoded_free(de__decoded *d);
/* Bytes d's decode buffers hold now (a test of their shrinking). */
size_t de__decoded_capacity(const de__decoded *d);

/* ---- integrity (hmac.c) ---------------------------------------------- */

typedef struct de__sha256 {
    uint32_t h[8];
    uint64_t bytes;
    unsigned char buf[64];
    size_t n;
} de__sha256;
void de__sha256_init(de__sha256 *s);
void de__sha256_update(de__sha256 *s, const void *data, size_t len);
/* Writes the digest and wipes s. */
void de__sha256_final(de__sha256 *s, unsigned char out[32]);
void de__sha256_digest(const void *data, size_t len, unsigned char out[32]);

/* HMAC-SHA256 (RFC 2104) over pieces given one at a time. */
typedef struct de__hmac {
    de__sha256 inner, outer;
} de__hmac;
void de__hmac_init(de__hmac *m, const void *key, size_t key_len);
void de__hmac_update(de__hmac *m, const void *data, size_t len);
/* Writes the MAC and wipes m. */
void de__hmac_final(de__hmac *m, unsigned char out[32]);
/* n bytes as 2n lowercase hex digits plus a NUL. */
void de__hex(const unsigned char *p, size_t n, char *out);

/* event.hmac.key: "<id>:<secret>[,<id>:<secret>...]".  The first key
 * signs (relay); any of them verifies (consumer). */
#define DE__HMAC_ID_MAX 32
#define DE__HMAC_SECRET_MIN 32
#define DE__HMAC_SECRET_MAX 1024
typedef struct de__hmac_key {
    char id[DE__HMAC_ID_MAX + 1];
    unsigned char *secret; /* wiped when freed */
    size_t secret_len;
    de__hmac start; /* HMAC begun with the secret: two blocks saved per
                       record; as secret as the secret, wiped too */
} de__hmac_key;
typedef struct de__hmac_keyring {
    de__hmac_key *keys;
    size_t n; /* 0: no integrity check */
} de__hmac_keyring;
/* Parses value ("" gives an empty ring); false with why (never quoting
 * the secret) when it is not a key list. */
bool de__hmac_keyring_parse(const char *value, de__hmac_keyring *kr, char *why,
                            size_t why_size);
void de__hmac_keyring_free(de__hmac_keyring *kr);

/* The header that carries a record's MAC: "<key id>:<64 hex digits>". */
#define DE__H_HMAC "de_hmac"
/* HMAC-SHA256 with k over a record's canonical encoding (docs/SECURITY.md,
 * "Integrity check"): its key, the headers a consumer reads (ce_*,
 * content-type, traceparent, tracestate) in record order, its value. */
void de__record_mac(const de__hmac_key *k, const void *key, size_t key_len,
                    const de__header *h, size_t nh, const void *value,
                    size_t len, unsigned char out[32]);
/* Adds the de_hmac header, signed with k, to a record the relay built. */
bool de__envelope_sign(rd_kafka_headers_t *h, const de__hmac_key *k,
                       const void *key, size_t key_len, const void *value,
                       size_t len);
/* Whether r carries a de_hmac header that one of kr's keys verifies;
 * false with why when not. */
bool de__raw_verify(const de__raw *r, const de__hmac_keyring *kr, char *why,
                    size_t why_size);

/* ---- SQLite helpers (schema.c) -------------------------------------- */

/* Runs SQL without results; DE_ERR_DB with the message set on failure. */
de_err de__exec(sqlite3 *db, const char *sql);

/* Refuses a connection the library cannot use: NULL (or no out pointer),
 * in memory or temporary (why_file says why a file is needed), read-only,
 * or inside a transaction.  who names the calling function. */
de_err de__check_connection(sqlite3 *db, bool no_out, const char *who,
                            const char *why_file);

/* Readies a host's connection for the library: a busy timeout of busy_ms
 * unless the host set its own (ensure_busy_timeout in schema.c), then WAL. In
 * that order: switching to WAL needs the file to itself for a moment, and
 * without a timeout another connection's read fails it at once. */
de_err de__prepare_connection(sqlite3 *db, int64_t busy_ms);

/* The first column of a one-row query; 0 if it has none. */
int64_t de__query_int(sqlite3 *db, const char *sql);

/* A set of tables the library keeps, versioned in a key/value table of
 * its own (schema.c). */
typedef struct de__schema {
    const char *what;              /* "outbox", "consumer", "relay state" */
    const char *meta_table;        /* holds key 'schema_version'          */
    const char *const *migrations; /* [i]: from version i to i + 1        */
    int version;                   /* the version this library writes     */
    de_err (*after)(sqlite3 *db);  /* after migrating (may be NULL)       */
} de__schema;

/* Inside the caller's IMMEDIATE transaction: refuses a newer version
 * (DE_ERR_STATE), migrates an older one; *was receives the version found
 * (0: new; may be NULL). */
de_err de__schema_migrate(sqlite3 *db, const de__schema *sc, int64_t *was);
/* The same in a transaction of its own; an up-to-date database is checked
 * without taking the write lock. */
de_err de__schema_ensure(sqlite3 *db, const de__schema *sc);
/* Reads the stored version (0: none) without migrating, refusing a newer
 * one (DE_ERR_STATE), for a reader that must not write. */
de_err de__schema_check(sqlite3 *db, const de__schema *sc, int64_t *version);

/* The outbox schema version this library writes. */
#define DE__OUTBOX_SCHEMA_VERSION 2

/* Creates or migrates the outbox tables in db's main database inside one
 * IMMEDIATE transaction.  DE_ERR_STATE if the stored version is newer. */
de_err de__outbox_schema_ensure(sqlite3 *db);

/* Creates the outbox_id row (a UUIDv7 naming this outbox) if missing. */
de_err de__outbox_identity(sqlite3 *db, char out[37]);

/* Stores the wire settings (DE__WIRE_KEYS) that conf sets explicitly with
 * the outbox in db, in one transaction, leaving the others as they are;
 * logs through conf each value it changes. */
de_err de__outbox_store_settings(sqlite3 *db, const de_conf *conf);

/* The wire setting `key` stored with the outbox in db: *out receives a
 * copy the caller frees, or NULL when none is stored. */
de_err de__outbox_stored_setting(sqlite3 *db, const char *key, char **out);

/* ---- outbox backends other than SQLite (outbox.c) -------------------- */

/* The contracts cache of an outbox (contract.h). */
struct de__contract_set;

/* One event as de_record hands it to a backend: validated, every pointer
 * borrowed for the call only. */
typedef struct de__outbox_row {
    const char *event_id, *subject_type, *subject_id, *action;
    int version;
    int64_t occurred_at_ms, recorded_at_ms;
    const char *payload;
    size_t payload_len;
    const char *traceparent, *tracestate, *dataschema; /* may be NULL */
} de__outbox_row;

/*
 * An outbox kept in another database than SQLite (lib/pg/outbox_pg.c).
 * The core library calls it only through these pointers, so it never
 * links that database's client library.  Every operation runs on the
 * host's thread and sets the thread's message on failure.
 */
typedef struct de__outbox_backend {
    const char *name; /* "PostgreSQL": for messages */
    /* DE_OK when the host's connection is inside an open transaction
     * (DE_ERR_NO_TXN outside one, DE_ERR_STATE when it cannot take a
     * statement); ev names the event in the message. */
    de_err (*check_txn)(void *ctx, const de_event *ev);
    /* Writes row inside the host's transaction; *position receives its
     * place in commit order, or 0 when it is known only at commit.
     * DE__AGAIN, having written nothing, when contracts were defined since
     * cs was loaded (row was checked against a stale cache): cs is loaded
     * again, and the caller checks the event once more and retries. */
    de_err (*insert)(void *ctx, struct de__contract_set *cs,
                     const de__outbox_row *row, int64_t *position);
    /* Loads into cs the definitions it has not seen yet when any were made
     * since the last look (a round trip: used on error paths and at open
     * only).  *changed tells whether cs grew. */
    de_err (*refresh)(void *ctx, struct de__contract_set *cs, bool *changed);
    /* de_outbox_define on this backend: stores the definition (outside
     * any transaction, DE_ERR_STATE inside one) and loads it into cs. */
    de_err (*define)(void *ctx, struct de__contract_set *cs,
                     const char *subject_type, const char *action, int version,
                     const char *schema_json);
    /* Starts a relay for this outbox (de_relay_start): conf is the
     * outbox's configuration merged with the caller's, owned by the
     * relay from now on, even on failure. */
    de_err (*relay_start)(void *ctx, de_outbox *ob, de_conf *conf,
                          de_relay **out);
    void (*close)(void *ctx);
} de__outbox_backend;

/* An outbox on backend be (ctx its state, owned by the outbox from now
 * on, even on failure: be->close(ctx) runs then). */
de_err de__outbox_new_backend(const de_conf *conf, const de__outbox_backend *be,
                              void *ctx, de_outbox **out);
/* The backend's state, or NULL for a SQLite outbox. */
void *de__outbox_backend_ctx(const de_outbox *ob);
/* be->relay_start for an outbox on another backend; conf as there. */
de_err de__outbox_relay_start(de_outbox *ob, de_conf *conf, de_relay **out);

/* ---- outbox internals the relay uses (outbox.c) ---------------------- */

/* NULL for an outbox on another backend. */
sqlite3 *de__outbox_db(const de_outbox *ob);
const de_conf *de__outbox_conf(const de_outbox *ob);

/*
 * The link through which an outbox wakes an in-process relay when a
 * transaction that recorded events commits (from the connection's WAL
 * hook, on the host's thread), and hands it the checkpointing: while a
 * relay is linked, the WAL hook only counts pages and the relay runs the
 * checkpoint on its own connection, off the host's commit path.  Either
 * side may go first; the link is freed when both have let go.
 */
typedef struct de__link de__link;
/* Links a relay (woken through wake_fd) to the outbox; NULL when out of
 * memory.  The outbox owns the link; the relay lets go of it with
 * de__link_release, after which nothing is written to its fd. */
de__link *de__outbox_attach(de_outbox *ob, int wake_fd);
void de__link_release(de__link *l);
/* Whether a checkpoint of the host's log is due (the host's
 * wal_autocheckpoint threshold, read at open), resetting the flag. */
bool de__link_checkpoint_due(de__link *l);

#endif /* DE_INTERNAL_H */

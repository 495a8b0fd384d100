/* SPDX-License-Identifier: MIT */
/*
 * deliveryevents.h -- the one public header of libdeliveryevents.
 *
 * libdeliveryevents lets a service that keeps its state in SQLite publish
 * domain events with a transactional outbox: an event is recorded in the
 * service's own transaction (de_record), so it exists if and only if that
 * transaction commits, and a bundled relay publishes the outbox to Kafka in
 * commit order, per subject, without loss.
 *
 * Conventions that hold for every declaration below unless it says
 * otherwise:
 *
 *  - Every fallible function returns a de_err; DE_OK (0) is success.  After
 *    a failure, de_errmsg() returns one sentence that names the offending
 *    value.  It is kept per thread and is not cleared by later successes.
 *  - On failure nothing is written and no handle is returned (out pointers
 *    are set to NULL where they are handles).
 *  - Strings passed in are copied before the call returns; the caller may
 *    free or reuse them at once.  Strings handed out are borrowed: they stay
 *    valid for the time each function states.
 *  - Each handle has exactly one function that frees it; those destructors
 *    return nothing and accept NULL.
 *  - Where a function takes `const de_conf *conf`, NULL means "all
 *    defaults"; the function copies what it needs, so the caller may destroy
 *    conf right after the call.
 *
 * Threading: the library keeps no mutable global state.  de_conf and
 * de_outbox handles are not internally locked: use each from one thread at
 * a time (a de_outbox belongs to the SQLite connection it was opened on and
 * is used wherever that connection is used).  de_errmsg() is thread-local.
 */
#ifndef DELIVERYEVENTS_H
#define DELIVERYEVENTS_H

#include <stddef.h>
#include <stdint.h>

#include <sqlite3.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The library's version; the Makefile reads these three lines. */
#define DE_VERSION_MAJOR 1
#define DE_VERSION_MINOR 0
#define DE_VERSION_PATCH 0

/* Marks the exported API; everything else is hidden. */
#if defined(DE_BUILDING_LIBRARY) && defined(__GNUC__)
#define DE_EXTERN __attribute__((visibility("default")))
#else
#define DE_EXTERN
#endif

/* On functions whose result must be looked at: ignoring it is a warning
 * where the compiler supports the attribute (GCC, Clang).  Destructors and
 * stats readers do not carry it. */
#if defined(__GNUC__)
#define DE_WARN_UNUSED __attribute__((warn_unused_result))
#else
#define DE_WARN_UNUSED
#endif

/* --------------------------------------------------------------------- */
/* Errors                                                                 */
/* --------------------------------------------------------------------- */

/**
 * Result codes.  The numbers never change; new codes are only added at the
 * end.
 */
typedef enum {
    DE_OK = 0,
    DE_ERR_ARG,      /* a required argument is missing or malformed        */
    DE_ERR_PAYLOAD,  /* payload not a JSON object, or over event.max.bytes */
    DE_ERR_CONTRACT, /* payload or event type breaks its declared contract
                        (reserved: contracts are not implemented yet) */
    DE_ERR_NO_TXN,   /* de_record called outside BEGIN ... COMMIT          */
    DE_ERR_DB,       /* SQLite failed (the message carries sqlite3_errmsg) */
    DE_ERR_KAFKA,    /* librdkafka failed at run time (not configuration)  */
    DE_ERR_CONFIG,   /* unknown or invalid property, ours or librdkafka's  */
    DE_ERR_STATE,    /* not valid now (e.g. schema newer than the library) */
    DE_ERR_NOMEM,    /* out of memory                                      */
    DE_ERR_TIMEOUT   /* flush/stop ran out of time; events stay in outbox  */
} de_err;

/**
 * The symbolic name of a result code, e.g. "DE_ERR_PAYLOAD".
 *
 * @param e any value; unknown values give "DE_ERR_UNKNOWN".
 * @return a static string, never NULL.
 */
DE_EXTERN const char *de_err_name(de_err e);

/**
 * One sentence explaining the most recent failure of a libdeliveryevents
 * call on the calling thread, naming the offending value and what was
 * expected, e.g. "payload for delivery.assigned is not a JSON object:
 * '[1,2]'".
 *
 * @return a thread-local string, valid until the next failing call on this
 *         thread; "" when no call has failed on this thread.  Never NULL.
 */
DE_EXTERN const char *de_errmsg(void);

/**
 * The library's version as "MAJOR.MINOR.PATCH".
 *
 * @return a static string.
 */
DE_EXTERN const char *de_version(void);

/* --------------------------------------------------------------------- */
/* Configuration                                                          */
/* --------------------------------------------------------------------- */

/**
 * A set of string properties in the style of librdkafka.  Keys the library
 * owns are listed with their defaults in docs/CONFIGURATION.md; every other
 * key is handed to librdkafka and validated by it when it is set.
 */
typedef struct de_conf de_conf;

/**
 * Creates an empty configuration (every key at its default).
 *
 * @return a new configuration, freed with de_conf_destroy(); NULL when out
 *         of memory.
 */
DE_EXTERN de_conf *de_conf_new(void);

/**
 * Sets one property.  The value is validated now: a library key against its
 * type and range, any other key by librdkafka's own configuration.  Setting
 * a key again replaces its value.
 *
 * @param conf  the configuration; required.
 * @param key   property name, e.g. "event.source" or "bootstrap.servers".
 * @param value its value as text; copied.
 * @return DE_OK; DE_ERR_ARG when an argument is NULL; DE_ERR_CONFIG when the
 *         key is unknown or the value invalid (the message names the key,
 *         and the value only for the library's own keys: a librdkafka
 *         property's value may be a secret and is never shown);
 *         DE_ERR_NOMEM.  On failure conf is unchanged.  Stored values are
 *         wiped when replaced and by de_conf_destroy().
 */
DE_EXTERN DE_WARN_UNUSED de_err de_conf_set(de_conf *conf, const char *key,
                                            const char *value);

/**
 * Reads back a property's effective value (the value set, or the library's
 * default for a library key).
 *
 * @param conf  the configuration; NULL reads the defaults.
 * @param key   property name.
 * @return the value, borrowed until conf is changed or destroyed (static for
 *         defaults); NULL when the key is a librdkafka key that was not set,
 *         or unknown.
 */
DE_EXTERN const char *de_conf_get(const de_conf *conf, const char *key);

/**
 * Frees a configuration.  NULL is a no-op.
 */
DE_EXTERN void de_conf_destroy(de_conf *conf);

/** Log levels, as syslog numbers them. */
typedef enum {
    DE_LOG_ERR = 3,     /* something failed and needs an operator      */
    DE_LOG_WARNING = 4, /* something failed and is being retried       */
    DE_LOG_NOTICE = 5,  /* a notable change: lease taken, restart done */
    DE_LOG_INFO = 6     /* routine progress                            */
} de_log_level;

/**
 * Receives the library's log lines (and librdkafka's, prefixed
 * "librdkafka: ").
 *
 * @param ctx      the pointer given to de_conf_set_log_cb().
 * @param level    a de_log_level (librdkafka's debug lines arrive as 7).
 * @param message  one line without a trailing newline; borrowed for the
 *                 call.
 *
 * Called on the thread that runs the component logging: the relay's own
 * thread, or the thread calling de_consumer_poll().  It must not call back
 * into the handle that logs.
 */
typedef void (*de_log_fn)(void *ctx, int level, const char *message);

/**
 * Sends log lines to fn instead of the default, which writes lines of
 * level DE_LOG_WARNING and worse to stderr prefixed "deliveryevents: ".
 * Handles copy the callback with the rest of the configuration.
 *
 * @param conf  the configuration; required (NULL is a no-op).
 * @param fn    the callback; NULL restores the default.
 * @param ctx   passed to fn as is; may be NULL.
 */
DE_EXTERN void de_conf_set_log_cb(de_conf *conf, de_log_fn fn, void *ctx);

/**
 * Receives a relay's or a consumer's statistics as one JSON document, in
 * the manner of librdkafka's statistics callback: the handle's counters
 * (the fields of de_relay_stats or de_consumer_stats, under the same
 * names), what it is ("client": "relay" with "database", or "consumer"
 * with "group"), "time_ms", and librdkafka's own statistics of its client
 * under "rdkafka" (null while the relay has no producer, e.g. on standby).
 * The layout is documented in docs/OPERATIONS.md ("Metrics").
 *
 * @param ctx   the pointer given to de_conf_set_stats_cb().
 * @param json  the document, NUL-terminated; borrowed for the call.
 * @param len   its length in bytes.
 *
 * Called every statistics.interval.ms (librdkafka's key; with a
 * statistics callback set it defaults to 1000; 0 turns statistics off) on
 * the relay's own
 * thread, or on the thread calling de_consumer_poll().  It must not call
 * back into the handle.
 */
typedef void (*de_stats_fn)(void *ctx, const char *json, size_t len);

/**
 * Sends statistics to fn (none are produced without one).  Handles copy
 * the callback with the rest of the configuration.
 *
 * @param conf  the configuration; required (NULL is a no-op).
 * @param fn    the callback; NULL turns the callback off.
 * @param ctx   passed to fn as is; may be NULL.
 */
DE_EXTERN void de_conf_set_stats_cb(de_conf *conf, de_stats_fn fn, void *ctx);

/* --------------------------------------------------------------------- */
/* Outbox                                                                 */
/* --------------------------------------------------------------------- */

/**
 * The outbox attached to one of the host's SQLite connections.
 */
typedef struct de_outbox de_outbox;

/**
 * Attaches an outbox to the host's own connection.
 *
 * Must be called outside a transaction.  It switches the database to WAL
 * (the relay reads beside the host's writers), gives the connection a busy
 * timeout of outbox.busy.timeout.ms when it has none (a connection without
 * one fails with SQLITE_BUSY the moment another connection writes), creates
 * or migrates the library's tables (all named de_*), and prepares its
 * statements once.  The wire settings conf sets (topic.template,
 * event.source, event.type.prefix) are stored with the outbox, so that
 * every relay of the database publishes with them (docs/CONFIGURATION.md,
 * "Wire settings").
 *
 * @param db    the host's open connection to a database file; borrowed: it
 *              must stay open until de_outbox_close().  In-memory and
 *              read-only databases are refused (the relay needs a file to
 *              read, the outbox needs to write).
 * @param conf  configuration, or NULL for defaults; copied.
 * @param out   receives the outbox; set to NULL on failure.
 * @return DE_OK; DE_ERR_ARG (NULL argument, in-memory or read-only
 *         database); DE_ERR_STATE (called inside a transaction, or the
 *         database was written by a newer libdeliveryevents); DE_ERR_CONFIG
 *         (an invalid outbox key in conf); DE_ERR_DB; DE_ERR_NOMEM.
 */
DE_EXTERN DE_WARN_UNUSED de_err de_outbox_open(sqlite3 *db, const de_conf *conf,
                                               de_outbox **out);

/**
 * Detaches an outbox and frees it.  The connection stays open and keeps its
 * journal mode and busy timeout.  Events already recorded are unaffected.
 * NULL is a no-op.
 */
DE_EXTERN void de_outbox_close(de_outbox *ob);

/**
 * An event to record; filled in by the caller.  Fields may only be added at
 * the end: zero-initialise it (`de_event ev = {0};`) so that new fields get
 * their defaults.
 */
typedef struct de_event {
    const char *subject_type; /* required, e.g. "delivery"                 */
    const char *subject_id;   /* required, e.g. "D-1001"; the Kafka key    */
    const char *action;       /* required, past tense, e.g. "assigned"     */
    const char *payload;      /* JSON object text; NULL means {}           */
    int64_t occurred_at_ms;   /* Unix ms UTC; 0 means now                  */
    const char *event_id;     /* optional; NULL generates a UUIDv7         */
    const char *traceparent;  /* optional W3C trace context to carry along */
    const char *tracestate;   /* optional, only with traceparent           */
    int version;              /* contract version to check against and to
                                 put in ce_type (".v<version>"); 0: the
                                 latest defined, or none                  */
} de_event;

/**
 * What de_record() assigned.
 */
typedef struct de_recorded {
    char event_id[37]; /* the generated (or given) id, NUL-terminated */
    int64_t position;  /* place in the outbox's commit order; increasing */
} de_recorded;

/**
 * Records one event in the host's open transaction on ob's connection.
 *
 * The event becomes visible to the relay when, and only when, that
 * transaction commits; if it rolls back, the event never existed.
 *
 * Rules (each broken rule has its own code and a message naming the
 * value):
 *  - subject_type and action: lowercase identifiers [a-z][a-z0-9_]*, at
 *    most 64 bytes (they become topic and type names) -> DE_ERR_ARG;
 *  - subject_id: non-empty UTF-8 without control characters (C0, DEL, C1,
 *    or the bidirectional controls such as U+202E), at most 256
 *    bytes -> DE_ERR_ARG;
 *  - payload: a JSON object (NULL means {}) -> DE_ERR_PAYLOAD: RFC 8259
 *    text in UTF-8, member names unique within each object (also when
 *    spelled with escapes), nesting at most 128 levels, numbers of any
 *    size -- the same rule the consumer applies; the whole Kafka record
 *    it becomes (key, value and every header) at most event.max.bytes ->
 *    DE_ERR_PAYLOAD;
 *  - occurred_at_ms: 0 (now) or a time from 1970 to the end of year 9999
 *    -> DE_ERR_ARG;
 *  - event_id, when given: 1 to 36 printable ASCII characters without
 *    spaces -> DE_ERR_ARG;
 *  - traceparent, when given: a valid W3C traceparent; tracestate only with
 *    a traceparent, at most 512 printable ASCII characters -> DE_ERR_ARG;
 *  - version: >= 0 -> DE_ERR_ARG;
 *  - ob's connection inside BEGIN ... COMMIT -> DE_ERR_NO_TXN;
 *  - contracts (de_outbox_define) -> DE_ERR_CONTRACT: when the event type
 *    has contracts, the payload must satisfy the one of `version` (0: the
 *    latest defined), which must exist; the message names the contract,
 *    the place in the payload and the rule, e.g. "delivery.assigned v1:
 *    $.eta_min must be an integer, got 1.5".  The version checked is the
 *    one recorded (and put in ce_type), and the contract's $id becomes the
 *    event's ce_dataschema.  A type without contracts is recorded as given
 *    (version 0: none in ce_type), unless outbox.strict is true, which
 *    refuses it.
 *
 * It does not read the database before writing (a deferred transaction
 * that reads and then writes after another connection committed would fail
 * with SQLITE_BUSY_SNAPSHOT), so calling it first in a transaction takes
 * the write lock directly.  Contracts are checked from ob's cache; it
 * picks up definitions another connection or process committed when this
 * transaction already holds a snapshot (it has read or written the
 * database before this call), and otherwise at the next de_outbox_define
 * on ob or the next call that finds the transaction holding one.  The
 * per-subject sequence (ce_subjectseq) is
 * assigned later by the relay, off the host's commit path.
 *
 * On any error nothing is written and the host transaction stays open and
 * usable -- except when SQLite itself rolls the whole transaction back
 * (disk full, I/O error), which the DE_ERR_DB message then says.
 *
 * @param ob   the outbox; required.
 * @param ev   the event; required; its strings are copied.
 * @param out  receives the event id and position; may be NULL.
 * @return DE_OK or one of the codes above; DE_ERR_DB when SQLite fails;
 *         DE_ERR_NOMEM.
 */
DE_EXTERN DE_WARN_UNUSED de_err de_record(de_outbox *ob, const de_event *ev,
                                          de_recorded *out);

/**
 * Declares the contract of version `version` of an event type: what its
 * payload may carry, as a subset of JSON Schema (draft 2020-12) that
 * docs/CONTRACTS.md describes -- type, properties, required,
 * additionalProperties (false unless the schema says true), enum, const,
 * minLength/maxLength, pattern, format (date-time, uuid),
 * minimum/maximum, items/minItems/maxItems, $defs with local $ref,
 * description and $id, which each event checked against it carries as
 * ce_dataschema.
 *
 * The schema is compiled once and stored in ob's database (table
 * de_contracts), so every connection and process, the relay and the
 * `deliveryevents contracts` and `asyncapi` commands see it.  A stored
 * version never changes: defining it again with the same schema (same
 * meaning, whatever the spacing or key order) is accepted and does
 * nothing, so a service may define its contracts at every start; a
 * different schema is refused -- a breaking change is a new version.
 * From then on de_record checks every payload of the type (see there).
 *
 * Must be called outside a transaction on ob's connection (a definition
 * commits on its own), on the thread that uses ob.  It also loads the
 * definitions other connections made since ob last looked.
 *
 * @param ob            the outbox; required.
 * @param subject_type  e.g. "delivery"; a lowercase identifier as for
 *                      de_record; copied.
 * @param action        e.g. "assigned"; likewise.
 * @param version       1, 2, ...
 * @param schema_json   the schema as JSON text, NUL-terminated, at most
 *                      1 MiB; copied (stored as given).
 * @return DE_OK; DE_ERR_ARG (NULL ob or schema_json, a malformed
 *         subject_type or action, version < 1); DE_ERR_CONTRACT (the
 *         schema is not JSON, uses a keyword outside the subset or gives
 *         one a wrong value -- the message names the keyword and its JSON
 *         path in the schema -- exceeds a limit of docs/CONTRACTS.md, or
 *         the version is already defined with a different schema);
 *         DE_ERR_STATE (called inside a transaction); DE_ERR_DB;
 *         DE_ERR_NOMEM.
 */
DE_EXTERN DE_WARN_UNUSED de_err de_outbox_define(de_outbox *ob,
                                                 const char *subject_type,
                                                 const char *action,
                                                 int version,
                                                 const char *schema_json);

/* --------------------------------------------------------------------- */
/* Relay                                                                  */
/* --------------------------------------------------------------------- */

/**
 * The relay: a thread with its own SQLite connection and its own
 * idempotent librdkafka producer that publishes the outbox to Kafka in
 * commit order, per subject, assigning each subject's events the sequence
 * numbers 1, 2, 3, ... (ce_subjectseq) as it goes.
 *
 * It publishes only what is durable: before it hands Kafka the rows of a
 * read it fsyncs the database's write-ahead log up to them (on its own
 * thread), so that no event reaches Kafka whose transaction a power loss
 * could undo, whatever the host's synchronous setting (OFF is not
 * supported).  When it becomes active it first reads Kafka forward from
 * where its last checkpoint left each partition: events already there are
 * not sent again, and numbering continues above the highest number found.
 * When that cannot be verified (the records were deleted by retention) it
 * refuses to publish: de_relay_flush() and de_relay_stop() then return
 * DE_ERR_STATE with the reason (see docs/OPERATIONS.md).
 *
 * One relay at a time publishes a database: relays hold a lease in the
 * relay's state file (relay.state.path); any other relay, in this process
 * or another, waits as a standby and takes over within
 * relay.lease.timeout.ms after the holder dies or stops.
 *
 * All relay functions may be called from any thread; de_relay_stop() must
 * not run concurrently with another call on the same relay.
 */
typedef struct de_relay de_relay;

/**
 * Starts a relay for an outbox in this process.  The relay opens its own
 * connection to ob's database file and is woken by the host's commits that
 * recorded events (no polling delay), and it takes over the connection's
 * WAL checkpoints so that the host's commits do not pay for them.
 *
 * Call it where ob is used (ob's connection must not be in use by another
 * thread during the call).  ob may be closed before the relay stops; the
 * relay then notices new commits within relay.poll.interval.ms.
 *
 * With event.hmac.key set (on ob's configuration or conf), every record
 * carries a de_hmac header signed with the first key (docs/SECURITY.md,
 * "Integrity check").
 *
 * @param ob    the outbox; required.
 * @param conf  the relay's configuration, or NULL.  Keys set on ob's
 *              configuration (event.source, topic.template, ...) apply
 *              unless conf sets them too.  bootstrap.servers is required
 *              in one of the two.  The wire settings the database's
 *              writer stored with its outbox apply where neither sets
 *              them.  Copied.
 * @param out   receives the relay; set to NULL on failure.
 * @return DE_OK; DE_ERR_ARG; DE_ERR_CONFIG (no bootstrap.servers, a
 *         property the relay must own such as enable.idempotence, one
 *         librdkafka refuses, or a wire setting that differs from the one
 *         the writer stored, without relay.settings.override); DE_ERR_STATE
 * (the relay's state belongs to another database, was lost or restored from a
 * copy older than the outbox's cleanup, or the database is older than the
 * state: restored without its state file); DE_ERR_DB; DE_ERR_KAFKA;
 *         DE_ERR_NOMEM.
 */
DE_EXTERN DE_WARN_UNUSED de_err de_relay_start(de_outbox *ob,
                                               const de_conf *conf,
                                               de_relay **out);

/**
 * Starts a relay for a database file that other processes write, e.g. as
 * a sidecar process.  Their commits are noticed within
 * relay.poll.interval.ms by a cheap check (PRAGMA data_version).  Creates
 * the outbox tables if the database has none yet.
 *
 * @param db_path  the database file; required; must exist.
 * @param conf     as for de_relay_start(); copied.
 * @param out      receives the relay; set to NULL on failure.
 * @return as de_relay_start().
 */
DE_EXTERN DE_WARN_UNUSED de_err de_relay_start_path(const char *db_path,
                                                    const de_conf *conf,
                                                    de_relay **out);

/**
 * Waits until every event committed before the call is acknowledged by
 * Kafka (by this relay, or by the active relay when this one is a
 * standby).
 *
 * @param r           the relay; required.
 * @param timeout_ms  how long to wait; negative waits without limit.
 * @return DE_OK; DE_ERR_TIMEOUT when time ran out (the events stay in the
 *         outbox and will be published); DE_ERR_STATE when the relay
 *         refused to publish because it could not verify what Kafka holds
 *         (de_errmsg() says why and what to do).
 */
DE_EXTERN DE_WARN_UNUSED de_err de_relay_flush(de_relay *r, int timeout_ms);

/**
 * Flushes for up to timeout_ms, then stops the relay, releases its lease
 * (so that a standby takes over at once) and frees it.  Whatever was not
 * acknowledged in time stays in the outbox for the next relay: stopping
 * never loses an event, and duplicates at most the events in flight.
 *
 * @param r           the relay; NULL is a no-op returning DE_OK.  Freed in
 *                    every case.
 * @param timeout_ms  how long to flush; 0 stops at once; negative waits
 *                    without limit.
 * A relay asked to stop still takes a free or expired lease to publish
 * what was committed before the call, while its time lasts; a negative
 * timeout never waits on a holder that is gone (its lease expires).
 *
 * @return DE_OK when everything committed before the call was published
 *         (and its state says so); DE_ERR_TIMEOUT when events committed
 *         before the call were still pending at the deadline (when this
 *         relay did not hold the lease at the end -- another relay holds
 *         it, or it could not be checked -- the message says so: the
 *         events are the holder's to publish);
 *         DE_ERR_DB when all of them were published but the final
 *         checkpoint -- writing the relay's state at stop -- failed (the
 *         message says why, and whether the lease was released): nothing
 *         is pending or lost, but the state does not record the last
 *         events as published, so their rows stay in the outbox and the
 *         next relay to take over finds them on Kafka instead of sending
 *         them again; DE_ERR_STATE when the relay refused to publish (see
 *         de_relay_flush()).
 */
DE_EXTERN de_err de_relay_stop(de_relay *r, int timeout_ms);

/**
 * What a relay is doing (de_relay_stats.state).  Changes are logged at
 * DE_LOG_NOTICE ("standby -> recovering: lease taken").
 */
typedef enum {
    DE_RELAY_STANDBY = 0, /* another relay holds the lease; waiting       */
    DE_RELAY_RECOVERING,  /* lease taken; reading Kafka before publishing */
    DE_RELAY_ACTIVE,      /* publishing                                   */
    DE_RELAY_RESTARTING,  /* replacing its producer after a failure       */
    DE_RELAY_REFUSED,     /* cannot verify what Kafka holds: publishes
                             nothing (see last_error; final)              */
    DE_RELAY_STOPPED      /* its thread has ended (final)                 */
} de_relay_state;

/**
 * The name of a relay state, e.g. "active".
 *
 * @return a static string; "unknown" for a value not listed above.
 */
DE_EXTERN const char *de_relay_state_name(de_relay_state s);

/**
 * A snapshot of a relay's counters.  New fields are taken from the reserved
 * space at the end, so the struct's size never changes: a program built
 * against an older header is never written past its end.
 */
typedef struct de_relay_stats {
    uint64_t published;         /* events acknowledged by Kafka             */
    uint64_t pending;           /* committed, not yet acknowledged          */
    int64_t lag_ms;             /* age of the oldest pending event          */
    uint64_t producer_restarts; /* producers replaced after a fatal error   */
    int active;                 /* 1 while this relay holds the lease       */
    int64_t position;           /* every event up to here is published or
                                   held back (see blocked_subjects)         */
    uint64_t blocked_subjects;  /* subjects waiting behind a failed event   */
    uint64_t held_back;         /* their events, waiting in order           */
    uint64_t deleted;           /* published rows removed from the outbox   */
    uint64_t read;              /* rows read from the outbox (with resends) */
    int64_t last_error_ms;      /* when last_error was set; 0 = never       */
    char last_error[256];       /* the last publishing error, e.g.
                                   "delivery D-7 (delivery.events): Broker:
                                   Topic authorization failed"             */
    int state;                  /* a de_relay_state                         */
    uint64_t skipped;           /* events found on Kafka when it became
                                   active, so not sent again               */
    uint64_t forgotten;         /* counters of idle subjects forgotten
                                   (relay.subject.forget.ms)               */
    uint64_t subjects_cached;   /* subject entries in memory now           */
    int64_t brokers_up;         /* brokers the producer is connected to, as
                                   of librdkafka's last statistics; -1:
                                   unknown (no producer yet, or statistics
                                   off: they run only with
                                   statistics.interval.ms or a statistics
                                   callback set, as they cost ~11 MiB)     */
    uint64_t reserved_[27];     /* room for later fields; zero              */
} de_relay_stats;

/**
 * Fills *out with the relay's counters as of now.
 *
 * @param r    the relay; required.
 * @param out  receives the snapshot; required.
 * @return DE_OK or DE_ERR_ARG.
 */
DE_EXTERN de_err de_relay_stats_get(de_relay *r, de_relay_stats *out);

/**
 * Renders the relay's counters in the Prometheus text exposition format
 * (version 0.0.4), for a service that already serves /metrics: one
 * complete exposition (HELP and TYPE lines included) of the metrics
 * deliveryevents_relay_* listed in docs/OPERATIONS.md ("Metrics"), each
 * labelled database="<the database file>".
 *
 * @param r    the relay; required.
 * @param buf  receives the text, NUL-terminated; may be NULL when cap is 0.
 * @param cap  the size of buf.
 * @param len  receives the length of the text (without the NUL), also
 *             when it did not fit; required.
 * @return DE_OK; DE_ERR_ARG (NULL relay or len, or cap <= *len: call
 *         again with a buffer of at least *len + 1 bytes).
 *
 * Any thread.
 */
DE_EXTERN DE_WARN_UNUSED de_err de_relay_metrics_prometheus(de_relay *r,
                                                            char *buf,
                                                            size_t cap,
                                                            size_t *len);

/**
 * Retries every blocked subject now instead of at the next
 * relay.blocked.retry.ms.  A subject is blocked when Kafka refused one of
 * its events permanently (for instance, no authorization on its topic);
 * its later events wait behind that one, in order, while other subjects
 * keep flowing.  Fix the cause, then call this (or wait).
 *
 * @param r  the relay; required.
 * @return DE_OK or DE_ERR_ARG.
 */
DE_EXTERN de_err de_relay_retry_blocked(de_relay *r);

/* --------------------------------------------------------------------- */
/* Replay                                                                 */
/* --------------------------------------------------------------------- */

/**
 * Which retained events de_replay() republishes: set exactly one of the
 * three selections.  Zero-initialise it (`de_replay_select sel = {0};`):
 * fields may only be added at the end, and new ones default to zero.
 */
typedef struct de_replay_select {
    const char *subject_type; /* with subject_id: one subject's events,
                                 e.g. "delivery" and "D-1001"            */
    const char *subject_id;
    int64_t from_position; /* > 0: the events from this outbox position
                              on (de_recorded.position)                  */
    int64_t since_ms;      /* > 0: the events recorded at or after this
                              time (Unix ms UTC)                         */
} de_replay_select;

/**
 * What de_replay() did.  The call fills every field, also on failure.
 * New fields are taken from the reserved space at the end.
 */
typedef struct de_replay_result {
    uint64_t republished;     /* events Kafka acknowledged again          */
    int64_t first_position;   /* the lowest and highest position among   */
    int64_t last_position;    /* them; 0 when none                        */
    uint64_t selected;        /* events selected that the relay published */
    uint64_t not_published;   /* selected events the relay has not
                                 published yet (above its cursor, or held
                                 back behind a blocked subject): left to
                                 it, not replayed                         */
    int64_t refused_position; /* DE_ERR_STATE: the position it names (the
                                 first one that cannot be replayed); 0
                                 otherwise                                */
    uint64_t reserved_[10];   /* zero                                     */
} de_replay_result;

/**
 * Republishes retained events of a database's outbox to Kafka with their
 * original ce_id, ce_subjectepoch and ce_subjectseq, so that a consumer
 * that applied them counts them as duplicates (de_consumer does), and one
 * whose inbox was reset, or a new consumer group, applies them again in
 * order.
 *
 * Retained: the relay keeps published rows for outbox.retention.ms and,
 * while it is above 0, records in its state file the numbers each one
 * went out with (docs/OPERATIONS.md, "Replaying retained events").  The
 * records go out exactly as the relay's did: the same envelope, key,
 * partitioner and topic, and the ce_source, ce_type prefix and topic
 * template the writer stored with the outbox (adopted as a relay adopts
 * them: a different value in conf is refused unless
 * relay.settings.override=true), through an idempotent producer; it waits
 * for every delivery report.
 *
 * It selects the retained rows at or below the relay's cursor that are
 * not held back; selected rows the relay has not published yet are left
 * to it and counted in out->not_published.  It refuses, publishing
 * nothing, with DE_ERR_STATE and out->refused_position when: a selected
 * published row has no recorded numbers (published by a relay without
 * retention, or before it recorded them); the selection starts where rows
 * are no longer retained (from_position at or below the deletion floor;
 * since_ms before the oldest retained row, once rows were deleted); the
 * selection holds no published event (only events not yet published, or
 * none at all).
 *
 * It takes no lease and writes neither the database nor the relay's state
 * file (it reads both): relays of the database, in this process or
 * others, go on as they were, their cursor and counters untouched.
 *
 * @param db_path     the database file; required; must hold an outbox.
 * @param conf        bootstrap.servers and any other librdkafka property
 *                    (TLS, SASL), relay.state.path when the relay's state
 *                    file is not "<db_path>-relay", and the wire settings
 *                    as for de_relay_start_path(); NULL is not enough
 *                    (bootstrap.servers is required).  Copied.
 * @param select      what to republish; required; read during the call.
 * @param timeout_ms  how long to wait for Kafka's acknowledgements once
 *                    everything is handed to the producer; negative waits
 *                    without limit.  What is not acknowledged in time is
 *                    purged (possibly written already: a duplicate).
 * @param out         receives what was done; required.
 * @return DE_OK; DE_ERR_ARG (a NULL argument, a missing database, not
 *         exactly one selection, a subject that is not TYPE and ID as
 *         de_record() takes them, a negative position or time);
 *         DE_ERR_STATE (refused, see above; also a missing or foreign
 *         relay state, a database without an outbox); DE_ERR_CONFIG (as
 *         de_relay_start_path()); DE_ERR_KAFKA (Kafka refused an event:
 *         the message names its position; out->republished counts what
 *         was acknowledged); DE_ERR_TIMEOUT; DE_ERR_DB; DE_ERR_NOMEM.
 *
 * Blocks the calling thread; any thread may call it, also beside a
 * de_relay of the same database.  It uses its own connections and its own
 * producer, and its log lines go to conf's log callback on this thread.
 */
DE_EXTERN DE_WARN_UNUSED de_err de_replay(const char *db_path,
                                          const de_conf *conf,
                                          const de_replay_select *select,
                                          int timeout_ms,
                                          de_replay_result *out);

/* --------------------------------------------------------------------- */
/* Consumer                                                               */
/* --------------------------------------------------------------------- */

/**
 * One event as a handler sees it: a CloudEvents 1.0 event of this
 * library's relay or of any other producer, read in binary or structured
 * mode (docs/CONSUMER.md, "Events from any producer", says where each
 * field comes from when the event lacks this library's extensions).
 * Every string is NUL-terminated and borrowed: valid only during the
 * handler call.  The library fills it; fields may be added at the end (a
 * handler only reads it).
 *
 * A numbered subject's events are numbered 1, 2, 3, ... within a
 * numbering (subject_epoch).  A subject idle for longer than
 * relay.subject.forget.ms starts a new numbering at its next event, with
 * a higher subject_epoch and subject_seq 1 again; de_consumer follows
 * that, so handlers need not.  An event without ce_subjectseq has
 * subject_seq 0 and is applied once by (ce_source, ce_id).
 */
typedef struct de_event_view {
    const char *event_id;     /* ce_id                                     */
    const char *subject_type; /* ce_subjecttype, else the topic's subject
                                 type by topic.template, else the topic    */
    const char *subject_id;   /* ce_subject, else ce_partitionkey, else the
                                 record key, e.g. "D-1001"                 */
    const char *action;       /* ce_action, else the part of ce_type after
                                 its last '.', e.g. "assigned"             */
    const char *type;       /* ce_type, e.g. "com.example.delivery.assigned" */
    const char *source;     /* ce_source                                 */
    const char *payload;    /* the data, a JSON object ("{}" when the
                               event has none), NUL-terminated           */
    size_t payload_len;     /* its length in bytes, without the NUL      */
    int64_t occurred_at_ms; /* ce_time in Unix ms UTC; the record's
                               timestamp when the event has no ce_time   */
    int64_t subject_seq;    /* ce_subjectseq: 1, 2, 3, ... per subject;
                               0 when the event carries none             */
    const char *topic;      /* where it was read                         */
    int32_t partition;
    int64_t offset;
    const char *traceparent; /* NULL when the event carried none          */
    const char *tracestate;  /* NULL when the event carried none          */
    int64_t subject_epoch;   /* ce_subjectepoch: the numbering subject_seq
                                belongs to; only grows per subject; 0 when
                                the record carries none                   */
} de_event_view;

/**
 * Applies one event.  Runs on the thread calling de_consumer_poll() (or
 * de_consumer_release()/de_consumer_skip()), inside a transaction on the
 * consumer's connection `db` that also records the event as applied:
 * write the event's effects with `db` and they commit together with that
 * record -- or not at all.
 *
 * The handler must not BEGIN, COMMIT or ROLLBACK (a SAVEPOINT of its own
 * is fine) and must not call back into the consumer.  Effects outside the
 * database (sending an e-mail) are at-least-once: record them in a table
 * and act on the table, as examples/notifier.c does.
 *
 * @return DE_OK to apply; any other value rolls the event's effects back,
 *         and the event is retried with backoff, then dead-lettered after
 *         consumer.max.attempts (see docs/CONSUMER.md).
 */
typedef de_err (*de_handler_fn)(sqlite3 *db, const de_event_view *ev,
                                void *ctx);

/**
 * A consumer: a librdkafka consumer-group member that applies each event
 * exactly once, in per-subject order, into its own SQLite database.
 * Used from one thread at a time.
 */
typedef struct de_consumer de_consumer;

/**
 * Opens a consumer on `db`, creating or migrating its tables (de_inbox,
 * the last applied ce_subjectseq per subject with the ce_id applied under
 * it and the ce_source that numbers it; de_inbox_source; de_inbox_id, the
 * (ce_source, ce_id) of events without a sequence, kept for
 * consumer.id.forget.ms; de_dead_letter, whole records).  It applies
 * CloudEvents 1.0 of any producer, binary or structured mode.  An event
 * whose number was applied already under another ce_id, or that another
 * ce_source numbers, is a conflict: dead-lettered, its subject parked,
 * never dropped as a duplicate (docs/CONSUMER.md).  A record that is
 * too large (consumer.record.max.bytes), fails the integrity check
 * (event.hmac.key), is numbered by a source consumer.sources does not
 * list, or jumps further than consumer.seq.max.jump is dead-lettered as
 * foreign before anything is applied, and parks nothing
 * (docs/SECURITY.md).  Several
 * consumers of one group may share the database file (one connection
 * each); they then share the inbox, which keeps effects exactly-once
 * across rebalances.
 *
 * @param db    the consumer's own connection, to a database file; borrowed
 *              until de_consumer_close().  Switched to WAL, given a busy
 *              timeout if it has none.
 * @param conf  configuration; `group.id` is required, `consumer.topics` is
 *              optional (default: the topics of the subject types given to
 *              de_consumer_on(), by topic.template).  Copied.
 * @param out   receives the consumer; NULL on failure.
 * @return DE_OK; DE_ERR_ARG; DE_ERR_CONFIG (no group.id, a property the
 *         consumer must own such as enable.auto.commit=true, or one
 *         librdkafka refuses); DE_ERR_STATE (inside a transaction, or a
 *         newer schema); DE_ERR_DB; DE_ERR_NOMEM.
 */
DE_EXTERN DE_WARN_UNUSED de_err de_consumer_open(sqlite3 *db,
                                                 const de_conf *conf,
                                                 de_consumer **out);

/**
 * Registers a handler for events of `subject_type` with `action` (NULL:
 * any action of that type).  A handler registered by ce_type
 * (de_consumer_on_type) wins over these, a specific action over NULL; an
 * event without a handler is recorded as applied and otherwise ignored.
 * Call before the first de_consumer_poll(), from the thread that polls.
 *
 * @param c             the consumer; required.
 * @param subject_type  1..249 of [A-Za-z0-9._-], e.g. "delivery" or
 *                      "Delivery"; copied.
 * @param action        1..128 bytes of UTF-8 without control characters
 *                      or spaces (e.g. "picked-up"), or NULL; copied.
 * @param fn            the handler; required.
 * @param ctx           passed to fn as is; may be NULL.
 * @return DE_OK; DE_ERR_ARG (a bad name, NULL fn, a second handler for
 *         the same pair; the message names the value; a consumer opened
 *         with de_consumer_open_pg, whose handlers are registered with
 *         de_consumer_on_pg); DE_ERR_STATE
 *         (after the first poll); DE_ERR_NOMEM.  On failure nothing is
 *         registered and the consumer is usable.
 */
DE_EXTERN DE_WARN_UNUSED de_err de_consumer_on(de_consumer *c,
                                               const char *subject_type,
                                               const char *action,
                                               de_handler_fn fn, void *ctx);

/**
 * Registers a handler for events whose ce_type is exactly `ce_type`
 * (e.g. "com.example.rider.Shift-Started"), of any producer: it wins over
 * handlers by subject type and action.  Its topics are not derived: list
 * them in consumer.topics.  Call before the first de_consumer_poll(),
 * from the thread that polls.
 *
 * @param c        the consumer; required.
 * @param ce_type  1..1024 bytes of UTF-8 without control characters;
 *                 copied.
 * @param fn       the handler; required.
 * @param ctx      passed to fn as is; may be NULL.
 * @return DE_OK; DE_ERR_ARG (NULL or bad ce_type, NULL fn, a second
 *         handler for the same ce_type; the message names the value; a
 *         consumer opened with de_consumer_open_pg, whose handlers by
 *         ce_type are registered with de_consumer_on_type_pg);
 *         DE_ERR_STATE (after the first poll); DE_ERR_NOMEM.  On failure
 *         nothing is registered and the consumer is usable.
 */
DE_EXTERN DE_WARN_UNUSED de_err de_consumer_on_type(de_consumer *c,
                                                    const char *ce_type,
                                                    de_handler_fn fn,
                                                    void *ctx);

/**
 * Reads the events available within timeout_ms (the first call also joins
 * the group) and applies them: several per SQLite transaction, each once,
 * in per-subject order, then commits their Kafka offsets.  Every half
 * second it also does the releases and skips asked from outside the
 * process (`deliveryevents release|skip`, rows of the table
 * de_consumer_request in the consumer's database), with this consumer's
 * handlers, and answers each (done_at_ms, result).
 *
 * @param c           the consumer.
 * @param timeout_ms  how long to wait for the first event.
 * @param handled     receives the number of events applied (duplicates
 *                    and parked events not counted); may be NULL.
 * On PostgreSQL a transaction the server aborts for a conflict with
 * another (a deadlock, SQLSTATE 40P01, or a serialization failure,
 * 40001) is rolled back and run again inside the call, up to 5 runs in
 * all (deliveryevents_pg.h, de_consumer_open_pg).
 *
 * @return DE_OK (also when nothing arrived); DE_ERR_DB when the database
 *         failed (nothing of the batch was applied; it is read again);
 *         DE_ERR_KAFKA for a fatal consumer error.
 */
DE_EXTERN DE_WARN_UNUSED de_err de_consumer_poll(de_consumer *c, int timeout_ms,
                                                 int *handled);

/**
 * Retries a parked subject now: its dead-lettered event, then the events
 * that waited behind it, in order.  If the handler fails again the subject
 * stays parked.  Another process asks the same of a running consumer
 * through de_consumer_request (see de_consumer_poll()).
 *
 * @return DE_OK (also when the subject was not parked); DE_ERR_ARG;
 *         DE_ERR_DB.  The handler's own failure is not an error here; see
 *         de_consumer_stats_get().
 */
DE_EXTERN DE_WARN_UNUSED de_err de_consumer_release(de_consumer *c,
                                                    const char *subject_type,
                                                    const char *subject_id);

/**
 * Drops a parked subject's dead-lettered event (kept in de_dead_letter,
 * marked skipped) and applies the events that waited behind it, in order,
 * as if it had been applied.
 *
 * @return as de_consumer_release().
 */
DE_EXTERN DE_WARN_UNUSED de_err de_consumer_skip(de_consumer *c,
                                                 const char *subject_type,
                                                 const char *subject_id);

/**
 * A snapshot of a consumer's counters.  New fields are taken from the
 * reserved space at the end: the struct's size never changes.
 */
typedef struct de_consumer_stats {
    uint64_t applied;         /* events applied (handler ran and committed) */
    uint64_t duplicates;      /* events already applied, skipped            */
    uint64_t gaps;            /* events that came after a missing one       */
    uint64_t retries;         /* handler failures retried                   */
    uint64_t dead_lettered;   /* events parked after consumer.max.attempts  */
    uint64_t foreign;         /* records that are not usable CloudEvents,
                                 or not trusted (consumer.sources,
                                 consumer.seq.max.jump, event.hmac.key,
                                 consumer.record.max.bytes): dead-lettered
                                 as kind foreign, never applied           */
    uint64_t parked_subjects; /* subjects waiting behind a dead letter      */
    uint64_t batches;         /* SQLite transactions committed              */
    uint64_t conflicts;       /* events whose number was applied already
                                 under another ce_id: parked, not dropped  */
    uint64_t forgotten;       /* inbox rows of idle subjects forgotten
                                 (consumer.subject.forget.ms)              */
    uint64_t ids_forgotten;   /* ids of events without a sequence forgotten
                                 (consumer.id.forget.ms)                   */
    uint64_t txn_retries;     /* transactions (a batch, a retry, a release)
                                 rolled back and run again inside the call
                                 after the database aborted them for a
                                 conflict with another transaction: a
                                 deadlock or a serialization failure
                                 (PostgreSQL, SQLSTATE 40P01 or 40001);
                                 always 0 on SQLite                        */
    uint64_t reserved_[28];   /* room for later fields; zero                */
} de_consumer_stats;

/**
 * Fills *out with the consumer's counters since it was opened, and the
 * number of parked subjects read from its database.  Call from the
 * thread that polls.
 *
 * @return DE_OK; DE_ERR_ARG; DE_ERR_DB when the database cannot be read
 *         (*out is then left untouched).
 */
DE_EXTERN de_err de_consumer_stats_get(de_consumer *c, de_consumer_stats *out);

/**
 * Renders the consumer's counters in the Prometheus text exposition format
 * (version 0.0.4): one complete exposition of the metrics
 * deliveryevents_consumer_* listed in docs/OPERATIONS.md ("Metrics"),
 * each labelled group="<group.id>".  Call from the thread that polls.
 *
 * @param c    the consumer; required.
 * @param buf  receives the text, NUL-terminated; may be NULL when cap is 0.
 * @param cap  the size of buf.
 * @param len  receives the length of the text (without the NUL), also
 *             when it did not fit; required.
 * @return DE_OK; DE_ERR_ARG (NULL consumer or len, or cap <= *len);
 *         DE_ERR_DB as de_consumer_stats_get().
 */
DE_EXTERN DE_WARN_UNUSED de_err de_consumer_metrics_prometheus(de_consumer *c,
                                                               char *buf,
                                                               size_t cap,
                                                               size_t *len);

/**
 * Commits what was applied, leaves the group (so that its partitions move
 * at once) and frees the consumer.  The connection stays open.
 *
 * @param c  the consumer; NULL is a no-op.
 * @return DE_OK, or the failure of the final commit (nothing is lost:
 *         uncommitted offsets are read again and the inbox absorbs them).
 */
DE_EXTERN de_err de_consumer_close(de_consumer *c);

#ifdef __cplusplus
}
#endif

#endif /* DELIVERYEVENTS_H */

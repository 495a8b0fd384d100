/* SPDX-License-Identifier: MIT */
/*
 * tool.h -- what the command-line tool's files share: signal handling,
 * clocks, usage messages, option parsing and the Kafka properties
 * (-b, -X, --config, DELIVERYEVENTS_X_*) that tools/deliveryevents.c
 * implements, and the commands that live in files of their own.
 */
#ifndef DE_TOOL_H
#define DE_TOOL_H

#include <deliveryevents.h>
#include <jansson.h>
#include <librdkafka/rdkafka.h>

#include <signal.h>
#include <stdint.h>
#include <stdio.h>

/* The last SIGINT or SIGTERM caught (0: none), and how many. */
extern volatile sig_atomic_t stop_signal, signals_seen;
void catch_signals(void);
int64_t now_ms(void);
int64_t mono_ms(void);

/* "deliveryevents CMD: <fmt with arg>" and a pointer to --help on
 * stderr; returns 2 (bad usage). */
int bad_usage(const char *cmd, const char *fmt, const char *arg);
/* Prints usage_text on stdout when argv holds --help or -h. */
int wants_help(int argc, char **argv, const char *usage_text);
const char *opt_value(const char *cmd, int argc, char **argv, int *i);
int parse_num(const char *cmd, const char *opt, const char *s, long min,
              long max, long *out);

/*
 * Properties of relay, replay, tail and archive, from (later ones
 * winning) the environment -- DELIVERYEVENTS_X_SASL_PASSWORD=... sets
 * sasl.password --, --config FILE (key=value lines, # comments),
 * -b SERVERS and -X key=value.  A value written @FILE is read from FILE
 * (its first line; @@ for a value that starts with @).  So secrets need
 * not be on the command line, where /proc/<pid>/cmdline shows them to
 * every local user; -X values that are there are wiped from argv once
 * parsed.  Messages name keys and files, never values.
 */
typedef struct props {
    const char *cmd;
    de_conf *conf;       /* every property, validated by the library */
    rd_kafka_conf_t *rk; /* a bare consumer's: librdkafka's, set here too */
} props;
int props_from_env(props *p);
int props_option(props *p, const char *a, const char *v);
int is_props_option(const char *a);
void wipe_x_values(int argc, char **argv);

/* A JSON string of s[0, n), valid whatever the bytes. */
json_t *json_text(const char *s, size_t n);

/*
 * The read-only reports' facts, gathered by a backend -- the SQLite
 * files (tools/deliveryevents.c) or a PostgreSQL database (tools/pg.c) --
 * and printed, as JSON or text, by one piece of code for both
 * (deliveryevents.c).  Strings are copied in; json_t members are owned.
 */
typedef struct status_facts {
    const char *database;    /* the file, or the connection (no password) */
    const char *relay_state; /* the state file, or where its tables are */
    int pg;                  /* a PostgreSQL database */
    int has_state;           /* a relay state exists */
    char outbox_id[64], state_outbox_id[64], cursor_event_id[64];
    char owner[64], host[256];
    int64_t cursor, pending, oldest, cursor_at, last_ms, rows, min_pos,
        max_pos, deleted_upto;
    int64_t pid, hb, acquired, lease_now; /* hb -1: no lease row */
    int64_t epoch;                        /* the lease's; -1: not kept */
    int64_t parked, nblocked, v_outbox, v_state;
    int64_t sz_db, sz_wal, sz_state, sz_state_wal; /* -1: none */
    json_t *blocked;                               /* blocked_entry()s */
} status_facts;
json_t *blocked_entry(const char *type, const char *id, int64_t held_back,
                      int64_t since_ms, const char *error, int64_t position);

typedef struct consumer_facts {
    const char *database;
    int64_t version, subjects, parked, dl_total, dl_parked, oldest,
        oldest_parked;
    int has_requests;
    int64_t queued, oldest_queued;
    int64_t sz_db, sz_wal; /* -1: none */
    json_t *by;            /* by_kind_entry()s */
    json_t *plist;         /* parked_entry()s */
} consumer_facts;
json_t *by_kind_entry(const char *kind, const char *state, int64_t count,
                      int64_t oldest_at_ms);
json_t *parked_entry(const char *type, const char *id, int64_t events,
                     int64_t since_ms, const char *kind, const char *error);

/* One dead letter, as dead-letters prints it. */
typedef struct dl_row {
    int64_t id, epoch, seq, partition, offset, attempts, parked_at_ms;
    int numbered; /* epoch and seq are known */
    const char *kind, *state, *subject_type, *subject_id, *event_id,
        *action, *type, *topic, *error;
} dl_row;
typedef void dl_emit_fn(const dl_row *row, void *ctx);

/* One retained outbox row, as list prints it. */
typedef struct ol_row {
    int64_t position, version, recorded_at_ms;
    const char *event_id, *subject_type, *subject_id, *action, *status,
        *error;
} ol_row;
typedef void ol_emit_fn(const ol_row *row, void *ctx);

/*
 * PostgreSQL targets (tools/pg.c): a libpq connection string or URI
 * where a command takes a database file (--pg CONNINFO, or --db with a
 * postgresql:// or postgres:// URI).  The library's tables there are in
 * schema deliveryevents.  A tool built without libpq says so and exits 1.
 */
int is_pg_uri(const char *s);
typedef struct pgt pgt;
/* Connects; 0, 2 for a malformed conninfo (bad_usage), 1 when the
 * server cannot be reached (the message names conninfo).  read_only: one
 * read-only snapshot for the whole command. */
int pgt_open(const char *cmd, const char *conninfo, int read_only,
             pgt **out);
void pgt_close(pgt *p);
/* "dbname=D host=H port=P user=U": where it is connected, no password. */
const char *pgt_name(const pgt *p);
/* The database's name alone. */
const char *pgt_dbname(const pgt *p);
/* The facts; 0, or 1 after saying why not (no outbox, no consumer
 * tables, a failed query). */
int pgt_status(const char *cmd, pgt *p, status_facts *f);
int pgt_consumer_status(const char *cmd, pgt *p, consumer_facts *f);
/* Calls emit for each dead letter (subject type NULL: all), oldest first,
 * at most limit (0: all); the number, or -1 after saying why. */
long pgt_dead_letters(const char *cmd, pgt *p, const char *type,
                      int type_len, const char *id, int parked, long limit,
                      dl_emit_fn *emit, void *ctx);
/* Calls emit for each retained outbox row (subject type NULL: all),
 * oldest first, with its status against the relay's cursor: pending
 * ones only (held-back included), or only held-back ones; at most limit
 * (0: all).  The number, or -1 after saying why. */
long pgt_list(const char *cmd, pgt *p, const char *type, int type_len,
              const char *id, int pending, int blocked, long limit,
              ol_emit_fn *emit, void *ctx);
/* The wire setting the writer stored for key (setting.KEY in
 * deliveryevents.meta) into buf; "" when none. */
void pgt_setting(pgt *p, const char *key, char *buf, size_t size);
/* Every contract: an array of {subject_type, action, version,
 * defined_at_ms, schema}; NULL after saying why. */
json_t *pgt_contracts(const char *cmd, pgt *p);
/* release/skip: whether the subject is parked (1, 0; -1 error), then the
 * request row (its id, or -1), then its state: 1 done (result in buf),
 * 0 not yet, -1 gone or an error (said). */
int pgt_parked(const char *cmd, pgt *p, const char *type, int type_len,
               const char *id);
int64_t pgt_request(const char *cmd, pgt *p, const char *type, int type_len,
                    const char *id, const char *action, int64_t now);
int pgt_request_state(const char *cmd, pgt *p, int64_t req, char *buf,
                      size_t size);
/* de_replay_pg (the tool built without libpq: DE_ERR_STATE; pgt_open
 * refuses first). */
de_err pgt_replay(const char *conninfo, const de_conf *conf,
                  const de_replay_select *sel, int timeout_ms,
                  de_replay_result *out);

/* de_relay_start_pg (the tool built without libpq: DE_ERR_STATE; pgt_open
 * refuses first). */
de_err pgt_relay_start(const char *conninfo, const de_conf *conf,
                       de_relay **out);

/* deliveryevents archive (tools/archive.c). */
extern const char usage_archive[];
int cmd_archive(int argc, char **argv);

#endif

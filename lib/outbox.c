/* SPDX-License-Identifier: MIT */
/*
 * outbox.c -- recording events inside the host's transaction.
 *
 * de_record is on the host's commit path, so it does the least that keeps
 * the guarantees: validate everything first (so a failure writes nothing),
 * then one INSERT through a statement prepared once, bound without copies.
 * It never reads the database before that write (a read first would turn
 * the host's deferred transaction into a snapshot that can fail with
 * SQLITE_BUSY_SNAPSHOT when it later writes), and the per-subject sequence
 * is left to the relay.
 *
 * Contracts are checked from a cache (contract_store.c), for the same
 * reason: de_record reads the database only when the host's transaction
 * already holds a snapshot (it has read or written), and then only PRAGMA
 * data_version, plus the new definitions when another connection
 * committed since the last look.
 *
 * An outbox on another database (PostgreSQL, lib/pg/) has no SQLite
 * connection (db NULL) and a backend instead: the same checks run here,
 * then the backend writes the row, refusing to when contracts were
 * defined since the cache was loaded (record_backend checks again then).
 * The core never links that database's client library; it calls the
 * backend through pointers only.
 *
 * Invariants: an outbox is used on its connection's thread only; every
 * statement it holds is reset and unbound when a call returns; exactly
 * one of db and backend is set.
 */
#include "contract.h"

#include <assert.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

struct de__link {
    pthread_mutex_t mu;
    int wake_fd; /* the relay's eventfd; -1 once it let go */
    int refs;    /* the relay's, and one per outbox holding it */
    atomic_bool ckpt_due;
    struct de__link *next; /* in the outbox's list */
};

struct de_outbox {
    sqlite3 *db;
    de_conf *conf;
    sqlite3_stmt *insert;
    sqlite3_stmt *data_version;  /* PRAGMA data_version */
    int64_t data_version_seen;   /* when the contracts were last loaded */
    de__contract_set *contracts; /* every definition, compiled */
    bool strict;                 /* outbox.strict */
    int64_t max_bytes;
    int ckpt_threshold; /* the host's wal_autocheckpoint, in pages */
    bool recorded;      /* de_record ran since the last commit */
    de__link *links;    /* in-process relays to wake */
    const de__outbox_backend *backend; /* NULL: SQLite (db) */
    void *backend_ctx;
};

static const char insert_sql[] =
    "INSERT INTO main.de_outbox(event_id, subject_type, subject_id, action, "
    "version, occurred_at_ms, recorded_at_ms, payload, traceparent, "
    "tracestate, dataschema) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, "
    "?10, ?11)";

de__link *de__outbox_attach(de_outbox *ob, int wake_fd)
{
    de__link *l = calloc(1, sizeof *l);

    if (l == NULL)
        return NULL;
    pthread_mutex_init(&l->mu, NULL);
    l->wake_fd = wake_fd;
    l->refs = 2; /* the relay's, and the outbox's */
    l->next = ob->links;
    ob->links = l;
    return l;
}

static void link_unref(de__link *l)
{
    int refs;

    pthread_mutex_lock(&l->mu);
    refs = --l->refs;
    pthread_mutex_unlock(&l->mu);
    if (refs == 0) {
        pthread_mutex_destroy(&l->mu);
        free(l);
    }
}

void de__link_release(de__link *l)
{
    if (l == NULL)
        return;
    pthread_mutex_lock(&l->mu);
    l->wake_fd = -1;
    pthread_mutex_unlock(&l->mu);
    link_unref(l);
}

bool de__link_checkpoint_due(de__link *l)
{
    return l != NULL && atomic_exchange(&l->ckpt_due, false);
}

sqlite3 *de__outbox_db(const de_outbox *ob)
{
    return ob->db;
}

const de_conf *de__outbox_conf(const de_outbox *ob)
{
    return ob->conf;
}

/*
 * Runs on the host's thread after every commit on its connection (SQLite's
 * WAL hook).  A commit that recorded events wakes the linked relays at
 * once: no polling delay between commit and publish.  Taking the hook
 * replaces SQLite's auto-checkpoint, so this does its job: with a relay
 * linked, the relay checkpoints on its own connection; without one, the
 * hook checkpoints here exactly as SQLite's default hook would.
 *
 * A checkpoint from another connection copies the log back but cannot
 * finish while this connection keeps committing (there are always newer
 * frames), so the log is never started over and grows.  Past twice the
 * threshold the hook checkpoints here too, between two of the host's
 * transactions: the relay has copied nearly everything already, this
 * finishes it, and the host's next write starts the log over.  The log
 * stays under about twice wal_autocheckpoint pages.
 */
static int wal_hook(void *arg, sqlite3 *db, const char *name, int pages)
{
    de_outbox *ob = arg;
    bool recorded = ob->recorded, handled = false;
    bool due = ob->ckpt_threshold > 0 && pages >= ob->ckpt_threshold;
    bool overdue = due && pages >= 2 * ob->ckpt_threshold;
    de__link **pp = &ob->links;
    static const uint64_t one = 1;

    if (strcmp(name, "main") != 0) {
        if (due)
            sqlite3_wal_checkpoint(db, name);
        return SQLITE_OK;
    }
    ob->recorded = false;
    while (*pp != NULL) {
        de__link *l = *pp;
        pthread_mutex_lock(&l->mu);
        if (l->wake_fd < 0) {
            /* The relay stopped: drop the link. */
            pthread_mutex_unlock(&l->mu);
            *pp = l->next;
            link_unref(l);
            continue;
        }
        if (due)
            atomic_store(&l->ckpt_due, true);
        if (recorded || due)
            (void)!write(l->wake_fd, &one, sizeof one);
        handled = true;
        pthread_mutex_unlock(&l->mu);
        pp = &l->next;
    }
    if ((!handled && due) || overdue)
        sqlite3_wal_checkpoint(db, name);
    return SQLITE_OK;
}

de_err de_outbox_open(sqlite3 *db, const de_conf *conf, de_outbox **out)
{
    de_outbox *ob = NULL;
    de_err err;

    if (out != NULL)
        *out = NULL;
    if ((err = de__check_connection(db, out == NULL, "de_outbox_open",
                                    "the outbox needs a database file that "
                                    "the relay can open too")) != DE_OK)
        return err;
    ob = calloc(1, sizeof *ob);
    if (ob == NULL)
        return de__fail(DE_ERR_NOMEM, "out of memory opening the outbox");
    ob->db = db;
    ob->conf = de__conf_dup(conf);
    if (ob->conf == NULL) {
        err = de__fail(DE_ERR_NOMEM, "out of memory copying the configuration");
        goto fail;
    }
    ob->max_bytes = de__conf_int(ob->conf, DE__K_EVENT_MAX_BYTES);
    if ((err = de__prepare_connection(
             db, de__conf_int(ob->conf, DE__K_OUTBOX_BUSY_TIMEOUT_MS))) !=
        DE_OK)
        goto fail;
    if ((err = de__outbox_schema_ensure(db)) != DE_OK ||
        (err = de__outbox_store_settings(db, ob->conf)) != DE_OK)
        goto fail;
    ob->ckpt_threshold = (int)de__query_int(db, "PRAGMA wal_autocheckpoint");
    ob->strict = de__conf_bool(ob->conf, DE__K_OUTBOX_STRICT);
    if (sqlite3_prepare_v3(db, insert_sql, -1, SQLITE_PREPARE_PERSISTENT,
                           &ob->insert, NULL) != SQLITE_OK ||
        sqlite3_prepare_v3(db, "PRAGMA main.data_version", -1,
                           SQLITE_PREPARE_PERSISTENT, &ob->data_version,
                           NULL) != SQLITE_OK) {
        err = de__fail_db(db, "cannot prepare the outbox's statements");
        goto fail;
    }
    if ((ob->contracts = de__contract_set_new()) == NULL) {
        err = de__fail(DE_ERR_NOMEM, "out of memory opening the outbox");
        goto fail;
    }
    /* The version first: a definition committed in between is loaded
     * now and, seen as a change, looked for again later (harmlessly). */
    ob->data_version_seen = de__query_int(db, "PRAGMA main.data_version");
    if ((err = de__contract_set_load(ob->contracts, db)) != DE_OK)
        goto fail;
    sqlite3_wal_hook(db, wal_hook, ob);
    *out = ob;
    return DE_OK;
fail:
    de_outbox_close(ob);
    return err;
}

de_err de__outbox_new_backend(const de_conf *conf, const de__outbox_backend *be,
                              void *ctx, de_outbox **out)
{
    de_outbox *ob = calloc(1, sizeof *ob);
    de_err err;

    if (ob == NULL) {
        be->close(ctx);
        return de__fail(DE_ERR_NOMEM, "out of memory opening the outbox");
    }
    ob->backend = be;
    ob->backend_ctx = ctx;
    if ((ob->conf = de__conf_dup(conf)) == NULL ||
        (ob->contracts = de__contract_set_new()) == NULL) {
        err = de__fail(DE_ERR_NOMEM, "out of memory opening the outbox");
        goto fail;
    }
    ob->max_bytes = de__conf_int(ob->conf, DE__K_EVENT_MAX_BYTES);
    ob->strict = de__conf_bool(ob->conf, DE__K_OUTBOX_STRICT);
    if ((err = be->refresh(ctx, ob->contracts, &(bool){false})) != DE_OK)
        goto fail;
    *out = ob;
    return DE_OK;
fail:
    de_outbox_close(ob);
    return err;
}

void *de__outbox_backend_ctx(const de_outbox *ob)
{
    return ob->backend_ctx;
}

de_err de__outbox_relay_start(de_outbox *ob, de_conf *conf, de_relay **out)
{
    assert(ob->backend != NULL);
    return ob->backend->relay_start(ob->backend_ctx, ob, conf, out);
}

void de_outbox_close(de_outbox *ob)
{
    if (ob == NULL)
        return;
    assert((ob->db == NULL) != (ob->backend == NULL));
    if (ob->backend != NULL)
        ob->backend->close(ob->backend_ctx);
    if (ob->insert != NULL) {
        /* Give the connection SQLite's own auto-checkpoint back. */
        sqlite3_wal_autocheckpoint(ob->db, ob->ckpt_threshold);
    }
    while (ob->links != NULL) {
        de__link *l = ob->links;
        ob->links = l->next;
        link_unref(l);
    }
    sqlite3_finalize(ob->insert);
    sqlite3_finalize(ob->data_version);
    de__contract_set_free(ob->contracts);
    de_conf_destroy(ob->conf);
    free(ob);
}

static de_err bad_field(const char *field, const char *value, bool numeric,
                        const char *type, const char *action, const char *rule,
                        ...) DE__PRINTF(6, 7);

/* Refuses a field of ev: "<field> <value> [for <type>[.<action>]] <rule>"
 * (DE_ERR_ARG).  value is quoted unless numeric; type and action name
 * the event when they are known to be valid. */
static de_err bad_field(const char *field, const char *value, bool numeric,
                        const char *type, const char *action, const char *rule,
                        ...)
{
    char q[DE__QUOTE_MAX], why[512];
    va_list ap;

    va_start(ap, rule);
    vsnprintf(why, sizeof why, rule, ap);
    va_end(ap);
    return de__fail(DE_ERR_ARG, "%s %s%s%s%s%s %s", field,
                    numeric ? value : de__quote(q, sizeof q, value, -1),
                    type ? " for " : "", type ? type : "", action ? "." : "",
                    action ? action : "", why);
}

/* The subject type and action: they become topic and type names. */
static de_err check_names(const char *st, const char *act)
{
    if (!de__is_ident(st))
        return bad_field("subject_type", st, false, NULL, NULL,
                         "must be a lowercase identifier [a-z][a-z0-9_]* of "
                         "at most %d bytes, e.g. 'delivery'",
                         DE__IDENT_MAX);
    if (!de__is_ident(act))
        return bad_field("action", act, false, st, NULL,
                         "must be a lowercase identifier [a-z][a-z0-9_]* of "
                         "at most %d bytes, in the past tense, e.g. "
                         "'assigned'",
                         DE__IDENT_MAX);
    return DE_OK;
}

/* Checks every field of ev without touching the database, the record it
 * becomes against max_bytes (0: not checked).  On success the payload
 * and its length are returned through the pointers. */
de_err de__event_check(const de_event *ev, int64_t max_bytes,
                       const char **payload, size_t *payload_len)
{
    const char *st = ev->subject_type, *act = ev->action;
    char q[DE__QUOTE_MAX], q2[DE__QUOTE_MAX], num[24];
    size_t st_len, sid_len, act_len, tp_len = 0, ts_len = 0, size;
    de__json_error je;
    de_err err;

    if ((err = check_names(st, act)) != DE_OK)
        return err;
    sid_len = ev->subject_id ? strlen(ev->subject_id) : 0;
    if (sid_len > DE__SUBJECT_ID_MAX ||
        !de__is_clean_utf8(ev->subject_id, sid_len))
        return bad_field("subject_id", ev->subject_id, false, st, act,
                         "must be non-empty UTF-8 without control "
                         "characters, at most %d bytes",
                         DE__SUBJECT_ID_MAX);
    if (ev->occurred_at_ms < 0 || ev->occurred_at_ms > DE__MAX_TIME_MS) {
        snprintf(num, sizeof num, "%lld", (long long)ev->occurred_at_ms);
        return bad_field("occurred_at_ms", num, true, st, act,
                         "must be 0 (now) or Unix milliseconds from 1970 to "
                         "9999-12-31");
    }
    if (ev->event_id != NULL && !de__is_event_id(ev->event_id))
        return bad_field("event_id", ev->event_id, false, st, act,
                         "must be 1 to %d printable ASCII characters "
                         "without spaces (or NULL for a generated UUIDv7)",
                         DE__EVENT_ID_MAX);
    if (ev->traceparent != NULL) {
        if (!de__is_traceparent(ev->traceparent))
            return bad_field("traceparent", ev->traceparent, false, st, act,
                             "is not a W3C traceparent ('00-<32 hex>-<16 "
                             "hex>-<2 hex>', lowercase, ids not all zero)");
        tp_len = strlen(ev->traceparent);
    }
    if (ev->tracestate != NULL) {
        if (ev->traceparent == NULL)
            return bad_field("tracestate", ev->tracestate, false, st, act,
                             "was given without a traceparent; W3C trace "
                             "context needs both");
        if (!de__is_tracestate(ev->tracestate))
            return bad_field("tracestate", ev->tracestate, false, st, act,
                             "must be at most %d printable ASCII characters",
                             DE__TRACESTATE_MAX);
        ts_len = strlen(ev->tracestate);
    }
    if (ev->version < 0) {
        snprintf(num, sizeof num, "%d", ev->version);
        return bad_field("version", num, true, st, act,
                         "must be 0 (latest or none) or a positive contract "
                         "version");
    }

    *payload = ev->payload ? ev->payload : "{}";
    *payload_len = strlen(*payload);
    st_len = strlen(ev->subject_type);
    act_len = strlen(ev->action);
    /* Size first: refusing an oversized payload must not cost a parse. */
    size = de__record_max_size(st_len, sid_len, act_len, ev->version,
                               *payload_len, tp_len, ts_len, 0);
    if (max_bytes > 0 && size > (size_t)max_bytes)
        return de__fail(DE_ERR_PAYLOAD,
                        "event %s.%s for %s would take up to %zu bytes on "
                        "Kafka (payload %zu bytes plus key and headers), "
                        "over event.max.bytes %lld",
                        ev->subject_type, ev->action,
                        de__quote(q, sizeof q, ev->subject_id, -1), size,
                        *payload_len, (long long)max_bytes);
    /* The same rule the consumer applies to what it receives. */
    if (!de__json_check(*payload, *payload_len, &je)) {
        if (je.not_object)
            return de__fail(DE_ERR_PAYLOAD,
                            "payload for %s.%s is not a JSON object: %s",
                            ev->subject_type, ev->action,
                            de__quote(q2, sizeof q2, *payload, *payload_len));
        return de__fail(DE_ERR_PAYLOAD,
                        "payload for %s.%s is not valid JSON (%s at byte "
                        "%zu): %s",
                        ev->subject_type, ev->action, je.what, je.offset,
                        de__quote(q2, sizeof q2, *payload, *payload_len));
    }
    return DE_OK;
}

/*
 * Loads the contracts other connections defined since the last look, when
 * reading is safe: only inside a transaction that already holds a
 * snapshot (it has read or written).  A read as the first statement of a
 * deferred transaction would fix its snapshot, and the host's next write
 * would fail with SQLITE_BUSY_SNAPSHOT had another connection committed
 * in between; there the cache is used as it is.  PRAGMA data_version
 * changes only when another connection commits, so the common case costs
 * one step of a prepared statement.
 */
static de_err refresh_contracts(de_outbox *ob)
{
    int64_t v;
    de_err err;
    int rc;

    if (ob->db == NULL) /* another backend: its insert detects changes */
        return DE_OK;
    if (sqlite3_txn_state(ob->db, "main") == SQLITE_TXN_NONE)
        return DE_OK;
    rc = sqlite3_step(ob->data_version);
    v = sqlite3_column_int64(ob->data_version, 0);
    sqlite3_reset(ob->data_version);
    if (rc != SQLITE_ROW)
        return de__fail_db(ob->db, "cannot read PRAGMA data_version");
    if (v == ob->data_version_seen)
        return DE_OK;
    if ((err = de__contract_set_load(ob->contracts, ob->db)) != DE_OK)
        return err; /* looked for again next time */
    ob->data_version_seen = v;
    return DE_OK;
}

/* Checks ev's payload against its contract; *def receives the contract
 * (NULL: the type has none and outbox.strict is off). */
static de_err check_contract(de_outbox *ob, const de_event *ev,
                             const char *payload, size_t payload_len,
                             const de__contract_def **def)
{
    const char *st = ev->subject_type, *act = ev->action;
    const de__contract_def *d;
    char versions[256];
    json_error_t je;
    size_t nversions, size;
    json_t *doc;
    de_err err;

    *def = NULL;
    if ((err = refresh_contracts(ob)) != DE_OK)
        return err;
    d = de__contract_set_find(ob->contracts, st, act, ev->version, &nversions);
    if (d == NULL && nversions > 0) {
        de__contract_set_versions(ob->contracts, st, act, versions,
                                  sizeof versions);
        return de__fail(DE_ERR_CONTRACT,
                        "%s.%s has no contract v%d (defined: %s); record a "
                        "defined version, or define v%d with "
                        "de_outbox_define first",
                        st, act, ev->version, versions, ev->version);
    }
    if (d == NULL && ob->strict)
        return de__fail(DE_ERR_CONTRACT,
                        "%s.%s has no contract, and outbox.strict is true: "
                        "define one with de_outbox_define before recording "
                        "it",
                        st, act);
    if (d == NULL)
        return DE_OK;
    /* Valid JSON already (de__event_check); an integer beyond 64 bits is
     * the one thing jansson still refuses, so read it as a number. */
    doc = json_loadb(payload, payload_len, JSON_ALLOW_NUL, &je);
    if (doc == NULL)
        doc = json_loadb(payload, payload_len,
                         JSON_ALLOW_NUL | JSON_DECODE_INT_AS_REAL, &je);
    if (doc == NULL && json_error_code(&je) == json_error_out_of_memory)
        return de__fail(DE_ERR_NOMEM,
                        "out of memory reading the payload of %s.%s", st, act);
    if (doc == NULL) /* a number beyond a double: 1e400 */
        return de__fail(DE_ERR_CONTRACT,
                        "%s: the payload cannot be checked: %s at byte %d",
                        d->label, je.text, je.position);
    err = de__contract_validate(d->schema, doc, d->label);
    json_decref(doc);
    if (err != DE_OK)
        return err;
    if (d->dataschema != NULL && ob->max_bytes > 0) {
        /* The size once more, now with the ce_dataschema header. */
        size = de__record_max_size(
            strlen(st), strlen(ev->subject_id), strlen(act), d->version,
            payload_len, ev->traceparent ? strlen(ev->traceparent) : 0,
            ev->tracestate ? strlen(ev->tracestate) : 0, strlen(d->dataschema));
        if (size > (size_t)ob->max_bytes)
            return de__fail(DE_ERR_PAYLOAD,
                            "event %s.%s would take up to %zu bytes on Kafka "
                            "(payload %zu bytes plus key and headers, "
                            "ce_dataschema included), over event.max.bytes "
                            "%lld",
                            st, act, size, payload_len,
                            (long long)ob->max_bytes);
    }
    *def = d;
    return DE_OK;
}

de_err de_outbox_define(de_outbox *ob, const char *subject_type,
                        const char *action, int version,
                        const char *schema_json)
{
    char num[24];
    de_err err;

    if (ob == NULL)
        return de__fail(DE_ERR_ARG,
                        "de_outbox_define needs an outbox (got NULL)");
    if ((err = check_names(subject_type, action)) != DE_OK)
        return err;
    if (version < 1) {
        snprintf(num, sizeof num, "%d", version);
        return bad_field("version", num, true, subject_type, action,
                         "must be a positive contract version (1, 2, ...)");
    }
    if (schema_json == NULL)
        return de__fail(DE_ERR_ARG,
                        "de_outbox_define for %s.%s v%d needs a schema (got "
                        "NULL)",
                        subject_type, action, version);
    if (ob->backend != NULL)
        return ob->backend->define(ob->backend_ctx, ob->contracts, subject_type,
                                   action, version, schema_json);
    if (!sqlite3_get_autocommit(ob->db))
        return de__fail(DE_ERR_STATE,
                        "de_outbox_define for %s.%s v%d was called inside a "
                        "transaction; define contracts outside one (at "
                        "startup): a definition commits on its own",
                        subject_type, action, version);
    return de__contract_define(ob->contracts, ob->db, subject_type, action,
                               version, schema_json);
}

/* How often de_record on another backend checks an event again because
 * contracts were being defined meanwhile before it gives up. */
#define RECHECKS_MAX 8

/*
 * The end of de_record on another backend.  The contract check runs
 * against the cache; the backend's insert writes nothing and says
 * DE__AGAIN when definitions were made since the cache was loaded (it
 * reloads it), and the event is checked again -- so a refusal always
 * comes before anything is written.  A refusal from the cache is checked
 * once more against the stored definitions (one round trip, on the error
 * path only): another connection may have defined the missing contract,
 * or a later version that version 0 now means.
 */
static de_err record_backend(de_outbox *ob, const de_event *ev,
                             const char *payload, size_t payload_len,
                             de_recorded *out)
{
    const de__contract_def *def = NULL;
    de__outbox_row row = {
        .subject_type = ev->subject_type,
        .subject_id = ev->subject_id,
        .action = ev->action,
        .payload = payload,
        .payload_len = payload_len,
        .traceparent = ev->traceparent,
        .tracestate = ev->tracestate,
    };
    char event_id[37];
    int64_t position = 0;
    bool changed = false;
    de_err err;
    int tries;

    if ((err = check_contract(ob, ev, payload, payload_len, &def)) ==
        DE_ERR_CONTRACT) {
        char why[1024];
        snprintf(why, sizeof why, "%s", de_errmsg());
        if ((err = ob->backend->refresh(ob->backend_ctx, ob->contracts,
                                        &changed)) != DE_OK)
            return err;
        err = changed ? check_contract(ob, ev, payload, payload_len, &def)
                      : de__fail(DE_ERR_CONTRACT, "%s", why);
    }
    if (err != DE_OK)
        return err;
    if (ev->event_id != NULL)
        memcpy(event_id, ev->event_id, strlen(ev->event_id) + 1);
    else
        de__uuid7(event_id);
    row.event_id = event_id;
    row.recorded_at_ms = de__now_ms();
    row.occurred_at_ms =
        ev->occurred_at_ms ? ev->occurred_at_ms : row.recorded_at_ms;
    for (tries = 0;; tries++) {
        row.version = def ? def->version : ev->version;
        row.dataschema = def ? def->dataschema : NULL;
        err = ob->backend->insert(ob->backend_ctx, ob->contracts, &row,
                                  &position);
        if (err != DE__AGAIN)
            break;
        if (tries == RECHECKS_MAX)
            return de__fail(DE_ERR_DB,
                            "de_record for %s.%s: contracts were being "
                            "defined during %d checks in a row; nothing was "
                            "recorded, try again",
                            ev->subject_type, ev->action, RECHECKS_MAX + 1);
        if ((err = check_contract(ob, ev, payload, payload_len, &def)) != DE_OK)
            return err;
    }
    if (err != DE_OK)
        return err;
    if (out != NULL) {
        memcpy(out->event_id, event_id, sizeof out->event_id);
        out->position = position;
    }
    return DE_OK;
}

de_err de_record(de_outbox *ob, const de_event *ev, de_recorded *out)
{
    const de__contract_def *def = NULL;
    sqlite3_stmt *st;
    const char *payload = NULL;
    size_t payload_len = 0;
    char event_id[37];
    int64_t now, occurred;
    de_err err;
    int rc;

    if (ob == NULL || ev == NULL)
        return de__fail(DE_ERR_ARG,
                        "de_record needs an outbox and an event "
                        "(got NULL %s)",
                        ob == NULL ? "outbox" : "event");
    if ((err = de__event_check(ev, ob->max_bytes, &payload, &payload_len)) !=
        DE_OK)
        return err;
    if (ob->backend != NULL) {
        if ((err = ob->backend->check_txn(ob->backend_ctx, ev)) != DE_OK)
            return err;
        return record_backend(ob, ev, payload, payload_len, out);
    }
    if (sqlite3_get_autocommit(ob->db))
        return de__fail(DE_ERR_NO_TXN,
                        "de_record for %s.%s was called outside a "
                        "transaction; record inside the BEGIN ... COMMIT "
                        "that makes the change it announces",
                        ev->subject_type, ev->action);
    if ((err = check_contract(ob, ev, payload, payload_len, &def)) != DE_OK)
        return err;

    if (ev->event_id != NULL)
        memcpy(event_id, ev->event_id, strlen(ev->event_id) + 1);
    else
        de__uuid7(event_id);
    now = de__now_ms();
    occurred = ev->occurred_at_ms ? ev->occurred_at_ms : now;

    st = ob->insert;
    sqlite3_bind_text(st, 1, event_id, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, ev->subject_type, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 3, ev->subject_id, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 4, ev->action, -1, SQLITE_STATIC);
    sqlite3_bind_int(st, 5, def ? def->version : ev->version);
    sqlite3_bind_int64(st, 6, occurred);
    sqlite3_bind_int64(st, 7, now);
    sqlite3_bind_text(st, 8, payload, (int)payload_len, SQLITE_STATIC);
    if (ev->traceparent)
        sqlite3_bind_text(st, 9, ev->traceparent, -1, SQLITE_STATIC);
    else
        sqlite3_bind_null(st, 9);
    if (ev->tracestate)
        sqlite3_bind_text(st, 10, ev->tracestate, -1, SQLITE_STATIC);
    else
        sqlite3_bind_null(st, 10);
    if (def && def->dataschema)
        sqlite3_bind_text(st, 11, def->dataschema, -1, SQLITE_STATIC);
    else
        sqlite3_bind_null(st, 11);
    rc = sqlite3_step(st);
    if (rc != SQLITE_DONE) {
        /* A failed statement is undone by SQLite; some errors (full disk,
         * I/O) roll back the whole transaction, which the caller must
         * know. */
        err = de__fail_db(
            ob->db,
            sqlite3_get_autocommit(ob->db)
                ? "recording %s.%s failed and SQLite rolled back the "
                  "whole transaction"
                : "recording %s.%s failed; nothing was written and the "
                  "transaction is still open",
            ev->subject_type, ev->action);
        sqlite3_reset(st);
        sqlite3_clear_bindings(st);
        return err;
    }
    sqlite3_reset(st);
    sqlite3_clear_bindings(st);
    ob->recorded = true;
    if (out != NULL) {
        memcpy(out->event_id, event_id, sizeof out->event_id);
        out->position = sqlite3_last_insert_rowid(ob->db);
    }
    return DE_OK;
}

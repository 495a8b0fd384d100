/* SPDX-License-Identifier: MIT */
/*
 * replay.c -- de_replay: retained events republished with the numbers the
 * relay gave them.
 *
 * The relay numbers each subject's events as it publishes them and keeps
 * those numbers nowhere but on Kafka -- except, while the outbox retains
 * published rows (outbox.retention.ms), in its state file, written with
 * the checkpoint that passes each event and deleted with the row
 * (relay_state.c, de_relay_published).  A replay reads the retained rows
 * through the relay's own seam (source.h), looks their numbers up in the
 * state (opened as a reader: no lease, nothing written), and produces them
 * as the relay does (relay_producer.c: the same envelope, key, partitioner
 * and producer properties; the writer's stored wire settings).
 *
 * Invariants:
 *  - nothing is produced before the whole selection was checked: a first
 *    pass plans, a second produces; both read the state in one read
 *    transaction, so every number the plan found is there for the second;
 *  - only rows at or below the relay's cursor (as of that transaction)
 *    that are not held back are republished: everything else is the
 *    relay's to publish;
 *  - an event goes out only with the numbers recorded for it, never with
 *    numbers made up.
 */
#include "relay_int.h"

#include <limits.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Rows read per query. */
#define SCAN_BATCH 1000
/* How long a full producer queue is waited on before trying again. */
#define QUEUE_FULL_POLL_MS 100

typedef struct rtopic {
    char *subject_type;
    rd_kafka_topic_t *rkt;
} rtopic;

typedef struct replay {
    const de_replay_select *sel;
    de_replay_result *out;
    de_conf *conf;
    de__source *src;
    de__rstate *st;
    const char *db_path;
    char log_prefix[300];
    int64_t cursor, deleted_upto, after;
    bool producing; /* the second pass */
    /* the plan (first pass) */
    int64_t first_unpublished;
    int64_t first_row, first_row_ms; /* the oldest retained row */
    uint64_t planned;
    /* producing */
    rd_kafka_t *rk;
    de__rk_bridge bridge;
    de__hmac_keyring hmac; /* event.hmac.key: republished records signed */
    DE__VEC(rtopic) topics;
    uint64_t sent;
    int64_t failed_position; /* the first delivery that failed */
    rd_kafka_resp_err_t failed_err;
    char fatal[512];
} replay;

static bool selected(const de_replay_select *sel, const de__row *row)
{
    if (sel->subject_type != NULL)
        return strcmp(row->subject_type, sel->subject_type) == 0 &&
               strcmp(row->subject_id, sel->subject_id) == 0;
    if (sel->from_position > 0)
        return row->position >= sel->from_position;
    return row->recorded_at_ms >= sel->since_ms;
}

/* The topic handle of a subject type's topic (topic.template). */
static rd_kafka_topic_t *topic_of(replay *x, const char *subject_type)
{
    char name[256];
    rtopic t;

    for (size_t i = 0; i < x->topics.n; i++)
        if (strcmp(x->topics.v[i].subject_type, subject_type) == 0)
            return x->topics.v[i].rkt;
    de__topic_name(name, sizeof name,
                   de__conf_str(x->conf, DE__K_TOPIC_TEMPLATE), subject_type);
    t.subject_type = strdup(subject_type);
    t.rkt = t.subject_type ? rd_kafka_topic_new(x->rk, name, NULL) : NULL;
    if (t.rkt == NULL || !DE__VEC_PUSH(x->topics, t)) {
        if (t.rkt != NULL)
            rd_kafka_topic_destroy(t.rkt);
        free(t.subject_type);
        return NULL;
    }
    return t.rkt;
}

/* Hands one row to the producer with its numbers, waiting while the
 * producer's queue is full. */
static de_err produce(replay *x, const de__row *row, int64_t epoch, int64_t seq)
{
    rd_kafka_topic_t *rkt = topic_of(x, row->subject_type);
    rd_kafka_resp_err_t kerr;
    de_err err;

    if (rkt == NULL)
        return de__fail(DE_ERR_NOMEM, "de_replay: out of memory");
    for (;;) {
        err =
            de__produce_row(x->rk, rkt, row, epoch, seq,
                            de__conf_str(x->conf, DE__K_EVENT_SOURCE),
                            de__conf_str(x->conf, DE__K_EVENT_TYPE_PREFIX),
                            &x->hmac, (void *)(uintptr_t)row->position, &kerr);
        if (err != DE__AGAIN)
            break;
        if (kerr != RD_KAFKA_RESP_ERR__QUEUE_FULL)
            return de__fail(DE_ERR_KAFKA,
                            "de_replay: Kafka refused the event at position "
                            "%lld (%s %s): %s",
                            (long long)row->position, row->subject_type,
                            row->subject_id, rd_kafka_err2str(kerr));
        rd_kafka_poll(x->rk, QUEUE_FULL_POLL_MS);
    }
    if (err == DE_OK)
        x->sent++;
    return err;
}

/*
 * One row of either pass, in position order.  The plan stops at the first
 * selected published row without numbers (refused) and otherwise reads to
 * the end, counting what is not published; producing stops past the
 * cursor (DE__AGAIN ends the read without an error).
 */
static de_err scan_row(void *ctx, const de__row *row)
{
    replay *x = ctx;
    int64_t epoch = 0, seq = 0;
    bool found, parked = false;
    de_err err;

    if (x->producing && row->position > x->cursor)
        return DE__AGAIN;
    x->after = row->position;
    if (!selected(x->sel, row))
        return DE_OK;
    if (row->position <= x->cursor &&
        (err = de__rstate_parked_at(x->st, row->position, &parked)) != DE_OK)
        return err;
    if (row->position > x->cursor || parked) {
        if (!x->producing) {
            x->out->not_published++;
            if (x->first_unpublished == 0)
                x->first_unpublished = row->position;
        }
        return DE_OK;
    }
    if ((err = de__rstate_published_get(x->st, row->position, &found, &epoch,
                                        &seq)) != DE_OK)
        return err;
    if (!found) {
        x->out->refused_position = row->position;
        return de__fail(
            DE_ERR_STATE,
            "de_replay: the event at position %lld (%s, %s %s) has no recorded "
            "numbers: it was published by a relay that did not record "
            "them (outbox.retention.ms 0, or a libdeliveryevents before "
            "replays); it cannot be republished with the ce_subjectseq it "
            "went out with, so nothing was republished",
            (long long)row->position, row->event_id, row->subject_type,
            row->subject_id);
    }
    if (x->producing)
        return produce(x, row, epoch, seq);
    x->planned++;
    return DE_OK;
}

/* Reads the rows after `from` - 1 in batches through scan_row. */
static de_err scan(replay *x, int64_t from)
{
    int64_t n;
    de_err err;

    x->after = from > 0 ? from - 1 : 0;
    do {
        err = x->src->ops->read(x->src, x->after, SCAN_BATCH, scan_row, x, &n);
        if (err != DE_OK)
            return err;
    } while (n == SCAN_BATCH); /* less: the end, or stopped (DE__AGAIN) */
    return DE_OK;
}

static de_err oldest_row(void *ctx, const de__row *row)
{
    replay *x = ctx;

    x->first_row = row->position;
    x->first_row_ms = row->recorded_at_ms;
    return DE_OK;
}

/* Describes the selection, for messages. */
static void describe(const de_replay_select *sel, char *what, size_t size)
{
    char t[DE__RFC3339_LEN + 1];

    if (sel->subject_type != NULL) {
        snprintf(what, size, "events of %s %s", sel->subject_type,
                 sel->subject_id);
    } else if (sel->from_position > 0) {
        snprintf(what, size, "events from position %lld",
                 (long long)sel->from_position);
    } else {
        de__rfc3339_ms(sel->since_ms, t);
        snprintf(what, size, "events recorded since %s", t);
    }
}

/* Refuses a selection that starts where rows are no longer retained: the
 * outbox's deletion floor and its oldest row, read now. */
static de_err check_retained(replay *x)
{
    const de_replay_select *sel = x->sel;
    char what[400];
    int64_t n;
    de_err err;

    x->first_row = x->first_row_ms = 0;
    if ((err = x->src->ops->deleted_upto(x->src, &x->deleted_upto)) != DE_OK ||
        (err = x->src->ops->read(x->src, x->deleted_upto, 1, oldest_row, x,
                                 &n)) != DE_OK)
        return err;
    describe(sel, what, sizeof what);
    if (sel->from_position > 0 && sel->from_position <= x->deleted_upto) {
        x->out->refused_position = sel->from_position;
        return de__fail(DE_ERR_STATE,
                        "de_replay: position %lld is no longer retained: the "
                        "outbox of '%s' was cleaned up to position %lld "
                        "(outbox.retention.ms); replay from position %lld "
                        "or later",
                        (long long)sel->from_position, x->db_path,
                        (long long)x->deleted_upto,
                        (long long)x->deleted_upto + 1);
    }
    if (sel->since_ms > 0 && x->deleted_upto > 0 &&
        (x->first_row == 0 || x->first_row_ms >= sel->since_ms)) {
        x->out->refused_position = x->deleted_upto;
        return de__fail(DE_ERR_STATE,
                        "de_replay: %s are no longer all retained: the outbox "
                        "of '%s' was cleaned up to position %lld "
                        "(outbox.retention.ms), and its oldest retained "
                        "event%s; replay from a later time, or from a "
                        "retained position",
                        what, x->db_path, (long long)x->deleted_upto,
                        x->first_row == 0 ? "s are gone"
                                          : " was recorded "
                                            "after that time");
    }
    return DE_OK;
}

/* Why the plan holds nothing to republish, or DE_OK when it holds some:
 * events not published yet, or none at all. */
static de_err check_plan(replay *x)
{
    const de_replay_select *sel = x->sel;
    de_replay_result *out = x->out;
    char what[400], cleaned[120] = "";

    describe(sel, what, sizeof what);
    if (x->deleted_upto > 0)
        snprintf(cleaned, sizeof cleaned,
                 " (it was cleaned up to position %lld by "
                 "outbox.retention.ms)",
                 (long long)x->deleted_upto);
    if (x->planned > 0)
        return DE_OK;
    if (x->first_unpublished > 0) {
        out->refused_position = x->first_unpublished;
        return de__fail(DE_ERR_STATE,
                        "de_replay: the event at position %lld is not "
                        "published yet (the relay's cursor is at %lld%s): "
                        "the relay will publish it; none of the %s is "
                        "published, so there is nothing to republish",
                        (long long)x->first_unpublished, (long long)x->cursor,
                        x->first_unpublished <= x->cursor
                            ? "; it is held back behind a blocked subject"
                            : "",
                        what);
    }
    out->refused_position =
        sel->from_position > 0 ? sel->from_position : x->deleted_upto;
    if (sel->from_position > 0)
        return de__fail(DE_ERR_STATE,
                        "de_replay: position %lld is not in the outbox of '%s' "
                        "yet: nothing there to republish",
                        (long long)sel->from_position, x->db_path);
    return de__fail(DE_ERR_STATE,
                    "de_replay: no %s retained in the outbox of '%s'%s: "
                    "nothing to republish",
                    what, x->db_path, cleaned);
}

static void on_dr(rd_kafka_t *rk, const rd_kafka_message_t *m, void *opaque)
{
    replay *x = ((de__rk_bridge *)opaque)->owner;
    int64_t pos = (int64_t)(uintptr_t)m->_private;

    (void)rk;
    if (m->err != RD_KAFKA_RESP_ERR_NO_ERROR) {
        if (x->failed_position == 0 || pos < x->failed_position) {
            x->failed_position = pos;
            x->failed_err = m->err;
        }
        return;
    }
    x->out->republished++;
    if (x->out->first_position == 0 || pos < x->out->first_position)
        x->out->first_position = pos;
    if (pos > x->out->last_position)
        x->out->last_position = pos;
}

static void on_fatal(void *owner, rd_kafka_resp_err_t err, const char *why)
{
    replay *x = owner;

    snprintf(x->fatal, sizeof x->fatal, "%s: %s", rd_kafka_err2name(err), why);
}

/* Waits for every delivery report, for up to timeout_ms (negative: no
 * limit); what is left then is purged. */
static de_err await_reports(replay *x, int timeout_ms)
{
    int64_t deadline = de__mono_ms() + timeout_ms;

    while (rd_kafka_outq_len(x->rk) > 0 && x->fatal[0] == '\0') {
        int64_t left = deadline - de__mono_ms();
        if (timeout_ms >= 0 && left <= 0)
            break;
        rd_kafka_poll(x->rk, timeout_ms < 0 || left > 100 ? 100 : (int)left);
    }
    if (rd_kafka_outq_len(x->rk) > 0) {
        rd_kafka_purge(x->rk,
                       RD_KAFKA_PURGE_F_QUEUE | RD_KAFKA_PURGE_F_INFLIGHT);
        while (rd_kafka_outq_len(x->rk) > 0)
            rd_kafka_poll(x->rk, 10);
    }
    if (x->fatal[0] != '\0')
        return de__fail(DE_ERR_KAFKA,
                        "de_replay: the producer failed: %s; %llu of %llu "
                        "events republished",
                        x->fatal, (unsigned long long)x->out->republished,
                        (unsigned long long)x->out->selected);
    if (x->failed_position > 0 &&
        x->failed_err != RD_KAFKA_RESP_ERR__PURGE_QUEUE &&
        x->failed_err != RD_KAFKA_RESP_ERR__PURGE_INFLIGHT)
        return de__fail(DE_ERR_KAFKA,
                        "de_replay: republishing the event at position %lld "
                        "failed: %s; %llu of %llu events republished",
                        (long long)x->failed_position,
                        rd_kafka_err2str(x->failed_err),
                        (unsigned long long)x->out->republished,
                        (unsigned long long)x->out->selected);
    if (x->out->republished < x->sent)
        return de__fail(DE_ERR_TIMEOUT,
                        "de_replay: Kafka acknowledged %llu of the %llu events "
                        "within %d ms; the rest were purged",
                        (unsigned long long)x->out->republished,
                        (unsigned long long)x->sent, timeout_ms);
    return DE_OK;
}

static de_err producer_new(replay *x)
{
    rd_kafka_conf_t *c;
    de_err err;

    x->bridge.conf = x->conf;
    memcpy(x->bridge.prefix, x->log_prefix, sizeof x->bridge.prefix);
    x->bridge.owner = x;
    x->bridge.on_fatal = on_fatal;
    if ((err = de__producer_conf(x->conf, "replay", 100000, &x->bridge, &c)) !=
        DE_OK)
        return err;
    rd_kafka_conf_set_dr_msg_cb(c, on_dr);
    return de__rk_new(RD_KAFKA_PRODUCER, c, "replay's producer", &x->rk);
}

static de_err check_select(const de_replay_select *sel)
{
    int n = (sel->subject_type != NULL || sel->subject_id != NULL) +
            (sel->from_position != 0) + (sel->since_ms != 0);
    char q[DE__QUOTE_MAX];

    if (n != 1)
        return de__fail(DE_ERR_ARG,
                        "de_replay needs exactly one selection: a subject, "
                        "a position or a time (got %d)",
                        n);
    if (sel->subject_type != NULL || sel->subject_id != NULL) {
        if (sel->subject_type == NULL || !de__is_ident(sel->subject_type))
            return de__fail(
                DE_ERR_ARG,
                "de_replay: subject type %s is not an identifier "
                "([a-z][a-z0-9_]*, at most %d bytes)",
                de__quote(q, sizeof q,
                          sel->subject_type ? sel->subject_type : "(null)",
                          (size_t)-1),
                DE__IDENT_MAX);
        if (sel->subject_id == NULL ||
            strlen(sel->subject_id) > DE__SUBJECT_ID_MAX ||
            !de__is_clean_utf8(sel->subject_id, strlen(sel->subject_id)))
            return de__fail(
                DE_ERR_ARG,
                "de_replay: subject id %s is not 1 to %d bytes "
                "of UTF-8 without control characters",
                de__quote(q, sizeof q,
                          sel->subject_id ? sel->subject_id : "(null)",
                          (size_t)-1),
                DE__SUBJECT_ID_MAX);
    }
    if (sel->from_position < 0)
        return de__fail(DE_ERR_ARG,
                        "de_replay: from_position %lld is negative; "
                        "positions start at 1",
                        (long long)sel->from_position);
    if (sel->since_ms < 0 || sel->since_ms > DE__MAX_TIME_MS)
        return de__fail(DE_ERR_ARG,
                        "de_replay: since_ms %lld is not a time from 1970 "
                        "to the end of year 9999",
                        (long long)sel->since_ms);
    return DE_OK;
}

de_err de__replay_run(const char *where, const de_conf *conf,
                      const de_replay_select *sel, int timeout_ms,
                      de_replay_result *out, de__replay_open_fn *open,
                      void *ctx)
{
    replay x;
    de_err err;

    memset(&x, 0, sizeof x);
    x.sel = sel;
    x.out = out;
    x.db_path = where;
    snprintf(x.log_prefix, sizeof x.log_prefix, "replay %.280s: ", where);
    atomic_store(&x.bridge.brokers_up, -1);
    if ((x.conf = de__conf_dup(conf)) == NULL)
        return de__fail(DE_ERR_NOMEM, "out of memory starting a replay");
    if ((err = de__producer_check_conf(x.conf, "replay")) != DE_OK ||
        (err = open(ctx, x.conf, &x.src, &x.st)) != DE_OK ||
        (err = de__adopt_settings(x.src, x.conf, where, x.log_prefix)) !=
            DE_OK ||
        (err = de__hmac_from_conf(x.conf, &x.hmac)) != DE_OK)
        goto done;
    /* One snapshot of the state for both passes. */
    if ((err = de__rstate_read_begin(x.st)) != DE_OK ||
        (err = de__rstate_cursor(x.st, &x.cursor, NULL, 0)) != DE_OK)
        goto done;
    /* Retention first, and again after the scan: the relay's cleanup may
     * have deleted rows meanwhile (only below the floor it then raised). */
    if ((err = check_retained(&x)) != DE_OK ||
        (err = scan(&x, sel->from_position)) != DE_OK ||
        (err = check_retained(&x)) != DE_OK || (err = check_plan(&x)) != DE_OK)
        goto done;
    out->selected = x.planned;
    x.producing = true;
    if ((err = producer_new(&x)) != DE_OK ||
        (err = scan(&x, sel->from_position)) != DE_OK) {
        if (x.rk != NULL)
            (void)await_reports(&x, 0); /* what went out is counted */
        goto done;
    }
    err = await_reports(&x, timeout_ms);
    if (err == DE_OK && out->republished < x.planned)
        de__log(x.conf, DE_LOG_WARNING,
                "%s%llu of the %llu selected events were deleted by the "
                "relay's cleanup during the replay (outbox.retention.ms) "
                "and not republished",
                x.log_prefix,
                (unsigned long long)(x.planned - out->republished),
                (unsigned long long)x.planned);
done:
    if (x.st != NULL)
        de__rstate_read_end(x.st);
    for (size_t i = 0; i < x.topics.n; i++) {
        rd_kafka_topic_destroy(x.topics.v[i].rkt);
        free(x.topics.v[i].subject_type);
    }
    DE__VEC_FREE(x.topics);
    if (x.rk != NULL)
        rd_kafka_destroy(x.rk);
    de__rstate_close(x.st);
    if (x.src != NULL)
        x.src->ops->close(x.src);
    de__hmac_keyring_free(&x.hmac);
    de_conf_destroy(x.conf);
    return err;
}

/* de_replay's opener: the SQLite database and its relay state file. */
typedef struct sqlite_open {
    const char *path;
    char state[PATH_MAX + 16];
} sqlite_open;

static de_err open_sqlite(void *ctx, de_conf *conf, de__source **src,
                          de__rstate **st)
{
    sqlite_open *o = ctx;
    char outbox_id[37];
    de_err err;

    if ((err = de__source_open_sqlite(
             o->path, de__conf_int(conf, DE__K_OUTBOX_BUSY_TIMEOUT_MS), false,
             false, src, outbox_id)) != DE_OK)
        return err;
    return de__rstate_open_reader(
        de__relay_state_path(conf, o->path, o->state, sizeof o->state),
        outbox_id, st);
}

de_err de__replay_check(const char *where, const char *param, const char *noun,
                        const de_replay_select *sel, de_replay_result *out)
{
    if (out != NULL)
        memset(out, 0, sizeof *out);
    if (where == NULL || sel == NULL || out == NULL)
        return de__fail(DE_ERR_ARG,
                        "%s needs %s, a selection and an out pointer (got "
                        "NULL %s)",
                        param[0] == 'd' ? "de_replay" : "de_replay_pg", noun,
                        where == NULL ? param
                        : sel == NULL ? "select"
                                      : "out");
    return check_select(sel);
}

de_err de_replay(const char *db_path, const de_conf *conf,
                 const de_replay_select *sel, int timeout_ms,
                 de_replay_result *out)
{
    char resolved[PATH_MAX];
    sqlite_open o = {resolved, ""};
    de_err err;

    if ((err = de__replay_check(db_path, "db_path", "a database path", sel,
                                out)) != DE_OK)
        return err;
    if (realpath(db_path, resolved) == NULL)
        return de__fail(DE_ERR_ARG, "database '%s' does not exist", db_path);
    return de__replay_run(resolved, conf, sel, timeout_ms, out, open_sqlite,
                          &o);
}

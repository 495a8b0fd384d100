/* SPDX-License-Identifier: MIT */
/*
 * check_outbox.c -- recording events inside the host's transaction.
 *
 * What a user relies on: an event exists iff its transaction committed
 * (guarantee 1), events keep commit order, and bad input is refused with
 * its own code and a message naming the value, writing nothing and leaving
 * the transaction usable (guarantee 7).  Every test uses a real database
 * file in a scratch directory.
 */
#include "contract_fixture.h"
#include "testutil.h"

#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

static char *dir;
static sqlite3 *db;
static de_outbox *ob;

static void setup(void)
{
    dir = tu_mkdtemp();
    db = tu_open(tu_path(dir, "service.db"));
    tu_exec(db, "CREATE TABLE deliveries(id TEXT PRIMARY KEY, status TEXT)");
    tu_ok(de_outbox_open(db, NULL, &ob));
}

static void teardown(void)
{
    de_outbox_close(ob);
    ob = NULL;
    sqlite3_close(db);
    db = NULL;
    tu_rmdir(dir);
    dir = NULL;
}

static de_event valid_event(void)
{
    de_event ev = {0};

    ev.subject_type = "delivery";
    ev.subject_id = "D-1001";
    ev.action = "assigned";
    ev.payload = "{\"rider_id\":\"R-7\"}";
    return ev;
}

static int64_t outbox_count(sqlite3 *conn)
{
    return tu_query_int(conn, "SELECT count(*) FROM de_outbox");
}

static bool is_uuid7(const char *s)
{
    if (strlen(s) != 36)
        return false;
    for (int i = 0; i < 36; i++) {
        if (i == 8 || i == 13 || i == 18 || i == 23) {
            if (s[i] != '-')
                return false;
        } else if (!strchr("0123456789abcdef", s[i])) {
            return false;
        }
    }
    return s[14] == '7' && strchr("89ab", s[19]) != NULL;
}

START_TEST(commit_keeps_events_in_order)
{
    de_recorded rec[3];
    de_event ev = valid_event();
    const char *actions[3] = {"assigned", "picked_up", "delivered"};
    sqlite3_stmt *st;
    int64_t before = (int64_t)time(NULL) * 1000;

    tu_exec(db, "BEGIN");
    tu_exec(db, "INSERT INTO deliveries VALUES ('D-1001', 'assigned')");
    for (int i = 0; i < 3; i++) {
        ev.action = actions[i];
        ev.payload = i == 1 ? NULL : "{\"n\": 1}";
        tu_ok(de_record(ob, &ev, &rec[i]));
        ck_assert(is_uuid7(rec[i].event_id));
        if (i > 0) {
            ck_assert_int_gt(rec[i].position, rec[i - 1].position);
            ck_assert_str_lt(rec[i - 1].event_id, rec[i].event_id);
        }
    }
    tu_exec(db, "COMMIT");

    ck_assert_int_eq(outbox_count(db), 3);
    ck_assert_int_eq(sqlite3_prepare_v2(db,
                                        "SELECT position, event_id, action, "
                                        "payload, occurred_at_ms, "
                                        "subject_id FROM de_outbox ORDER BY "
                                        "position",
                                        -1, &st, NULL),
                     SQLITE_OK);
    for (int i = 0; i < 3; i++) {
        ck_assert_int_eq(sqlite3_step(st), SQLITE_ROW);
        ck_assert_int_eq(sqlite3_column_int64(st, 0), rec[i].position);
        ck_assert_str_eq((const char *)sqlite3_column_text(st, 1),
                         rec[i].event_id);
        ck_assert_str_eq((const char *)sqlite3_column_text(st, 2), actions[i]);
        /* The payload is kept exactly as given; NULL became {}. */
        ck_assert_str_eq((const char *)sqlite3_column_text(st, 3),
                         i == 1 ? "{}" : "{\"n\": 1}");
        /* occurred_at 0 means now. */
        ck_assert_int_ge(sqlite3_column_int64(st, 4), before);
        ck_assert_str_eq((const char *)sqlite3_column_text(st, 5), "D-1001");
    }
    ck_assert_int_eq(sqlite3_step(st), SQLITE_DONE);
    sqlite3_finalize(st);
}
END_TEST

START_TEST(given_fields_are_kept)
{
    de_recorded rec;
    de_event ev = valid_event();

    ev.event_id = "my-id-42";
    ev.occurred_at_ms = 1764068400123;
    ev.traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    ev.tracestate = "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE";
    ev.version = 2;
    tu_exec(db, "BEGIN");
    tu_ok(de_record(ob, &ev, &rec));
    tu_exec(db, "COMMIT");
    ck_assert_str_eq(rec.event_id, "my-id-42");
    ck_assert_int_eq(
        tu_query_int(db, "SELECT count(*) FROM de_outbox WHERE "
                         "event_id = 'my-id-42' AND occurred_at_ms = "
                         "1764068400123 AND version = 2 AND traceparent = "
                         "'00-4bf92f3577b34da6a3ce929d0e0e4736-"
                         "00f067aa0ba902b7-01' AND tracestate LIKE 'rojo=%'"),
        1);
}
END_TEST

START_TEST(rollback_leaves_no_event)
{
    de_event ev = valid_event();

    tu_exec(db, "BEGIN");
    tu_exec(db, "INSERT INTO deliveries VALUES ('D-1001', 'assigned')");
    tu_ok(de_record(ob, &ev, NULL));
    tu_exec(db, "ROLLBACK");
    ck_assert_int_eq(outbox_count(db), 0);

    /* A rolled-back savepoint takes its events with it, the rest stays. */
    tu_exec(db, "BEGIN");
    tu_ok(de_record(ob, &ev, NULL));
    tu_exec(db, "SAVEPOINT sp");
    ev.action = "canceled";
    tu_ok(de_record(ob, &ev, NULL));
    tu_exec(db, "ROLLBACK TO sp");
    tu_exec(db, "RELEASE sp");
    tu_exec(db, "COMMIT");
    ck_assert_int_eq(outbox_count(db), 1);
    ck_assert_int_eq(tu_query_int(db, "SELECT count(*) FROM de_outbox "
                                      "WHERE action = 'assigned'"),
                     1);
}
END_TEST

START_TEST(crash_mid_transaction_leaves_no_event)
{
    pid_t pid = fork();
    int status;

    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        /* The child records inside an open transaction and dies without
         * committing, as a crashed service would. */
        sqlite3 *cdb = NULL;
        de_outbox *cob = NULL;
        de_event ev = valid_event();
        if (sqlite3_open(tu_path(dir, "service.db"), &cdb) != SQLITE_OK ||
            de_outbox_open(cdb, NULL, &cob) != DE_OK)
            _exit(2);
        sqlite3_exec(cdb, "BEGIN", NULL, NULL, NULL);
        for (int i = 0; i < 100; i++)
            if (de_record(cob, &ev, NULL) != DE_OK)
                _exit(3);
        kill(getpid(), SIGKILL);
        _exit(4);
    }
    ck_assert_int_eq(waitpid(pid, &status, 0), pid);
    ck_assert(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);
    ck_assert_int_eq(outbox_count(db), 0);
    /* And the database is healthy: recording still works. */
    de_event ev = valid_event();
    tu_exec(db, "BEGIN");
    tu_ok(de_record(ob, &ev, NULL));
    tu_exec(db, "COMMIT");
    ck_assert_int_eq(outbox_count(db), 1);
}
END_TEST

START_TEST(outside_transaction_is_refused)
{
    de_event ev = valid_event();

    tu_assert_err(de_record(ob, &ev, NULL), DE_ERR_NO_TXN,
                  "outside a transaction");
    ck_assert_int_eq(outbox_count(db), 0);
}
END_TEST

/* ---- the bad-input matrix --------------------------------------------- */

static char long_ident[80];
static char long_subject[300];
/* One byte over each limit, and exactly at it (exact_limits_are_accepted):
 * an off-by-one in either direction fails a test. */
static char ident_65[66], ident_64[65], subject_257[258], subject_256[257];
static char tracestate_513[514], tracestate_512[513];
static char long_payload[2000];
static char long_tracestate[600];

struct bad_case {
    const char *name;
    void (*mutate)(de_event *ev);
    de_err code;
    const char *in_message; /* the offending value as the message quotes it */
};

#define MUTATOR(fn, body)                                                      \
    static void fn(de_event *ev)                                               \
    {                                                                          \
        body;                                                                  \
    }

MUTATOR(st_null, ev->subject_type = NULL)
MUTATOR(st_empty, ev->subject_type = "")
MUTATOR(st_upper, ev->subject_type = "Delivery")
MUTATOR(st_upper_late, ev->subject_type = "deliverY")
MUTATOR(st_65, ev->subject_type = ident_65)
MUTATOR(act_upper_late, ev->action = "assigneD")
MUTATOR(act_65, ev->action = ident_65)
MUTATOR(sid_257, ev->subject_id = subject_257)
MUTATOR(ts_513, {
    ev->traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    ev->tracestate = tracestate_513;
})
MUTATOR(st_digit_first, ev->subject_type = "1delivery")
MUTATOR(st_dash, ev->subject_type = "deli-very")
MUTATOR(st_long, ev->subject_type = long_ident)
MUTATOR(act_null, ev->action = NULL)
MUTATOR(act_space, ev->action = "picked up")
MUTATOR(act_dot, ev->action = "was.assigned")
MUTATOR(act_long, ev->action = long_ident)
MUTATOR(sid_null, ev->subject_id = NULL)
MUTATOR(sid_empty, ev->subject_id = "")
MUTATOR(sid_newline, ev->subject_id = "D-1\n")
MUTATOR(sid_del, ev->subject_id = "D-\x7f")
MUTATOR(sid_c1, ev->subject_id = "D-\xc2\x85")
MUTATOR(sid_bad_utf8, ev->subject_id = "D-\xff\xfe")
MUTATOR(sid_overlong, ev->subject_id = "D-\xc0\xaf")
MUTATOR(sid_surrogate, ev->subject_id = "D-\xed\xa0\x80")
MUTATOR(sid_rlo, ev->subject_id = "D-\xe2\x80\xae"
                                  "1")
MUTATOR(sid_isolate, ev->subject_id = "D-\xe2\x81\xa6"
                                      "1")
MUTATOR(sid_long, ev->subject_id = long_subject)
MUTATOR(pl_array, ev->payload = "[1,2]")
MUTATOR(pl_string, ev->payload = "\"assigned\"")
MUTATOR(pl_null_json, ev->payload = "null")
MUTATOR(pl_broken, ev->payload = "{\"rider_id\": ")
MUTATOR(pl_trailing, ev->payload = "{} {}")
MUTATOR(pl_dup_key, ev->payload = "{\"a\":1,\"a\":2}")
MUTATOR(pl_bad_utf8, ev->payload = "{\"a\":\"\xff\"}")
MUTATOR(pl_empty, ev->payload = "")
MUTATOR(occ_negative, ev->occurred_at_ms = -5)
MUTATOR(occ_year_10000, ev->occurred_at_ms = INT64_C(253402300800000))
MUTATOR(eid_empty, ev->event_id = "")
MUTATOR(eid_space, ev->event_id = "id 1")
MUTATOR(eid_long, ev->event_id = "0123456789012345678901234567890123456")
MUTATOR(eid_nonascii, ev->event_id = "caf\xc3\xa9")
MUTATOR(tp_garbage, ev->traceparent = "not-a-traceparent")
MUTATOR(tp_upper, ev->traceparent =
                      "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01")
MUTATOR(
    tp_zero_trace,
    ev->traceparent = "00-00000000000000000000000000000000-00f067aa0ba902b7-01")
MUTATOR(
    tp_zero_parent,
    ev->traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01")
MUTATOR(
    tp_version_ff,
    ev->traceparent = "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
MUTATOR(tp_v00_extra,
        ev->traceparent =
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-xx")
MUTATOR(ts_alone, ev->tracestate = "rojo=1")
MUTATOR(ts_control, {
    ev->traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    ev->tracestate = "rojo=1\t";
})
MUTATOR(ts_long, {
    ev->traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    ev->tracestate = long_tracestate;
})
MUTATOR(ver_negative, ev->version = -1)

static const struct bad_case bad_cases[] = {
    {"subject_type NULL", st_null, DE_ERR_ARG, "subject_type (null)"},
    {"subject_type empty", st_empty, DE_ERR_ARG, "subject_type ''"},
    {"subject_type upper", st_upper, DE_ERR_ARG, "'Delivery'"},
    {"subject_type upper later", st_upper_late, DE_ERR_ARG, "'deliverY'"},
    {"subject_type 65 bytes", st_65, DE_ERR_ARG, "at most 64 bytes"},
    {"action upper later", act_upper_late, DE_ERR_ARG, "'assigneD'"},
    {"action 65 bytes", act_65, DE_ERR_ARG, "at most 64 bytes"},
    {"subject_id 257 bytes", sid_257, DE_ERR_ARG, "at most 256 bytes"},
    {"tracestate 513 bytes", ts_513, DE_ERR_ARG, "at most 512"},
    {"subject_type digit", st_digit_first, DE_ERR_ARG, "'1delivery'"},
    {"subject_type dash", st_dash, DE_ERR_ARG, "'deli-very'"},
    {"subject_type long", st_long, DE_ERR_ARG, "'aaaaaaaa"},
    {"action NULL", act_null, DE_ERR_ARG, "action (null)"},
    {"action space", act_space, DE_ERR_ARG, "'picked up'"},
    {"action dot", act_dot, DE_ERR_ARG, "'was.assigned'"},
    {"action long", act_long, DE_ERR_ARG, "action 'aaaa"},
    {"subject_id NULL", sid_null, DE_ERR_ARG, "subject_id (null)"},
    {"subject_id empty", sid_empty, DE_ERR_ARG, "subject_id ''"},
    {"subject_id newline", sid_newline, DE_ERR_ARG, "'D-1\\x0a'"},
    {"subject_id DEL", sid_del, DE_ERR_ARG, "'D-\\x7f'"},
    {"subject_id C1", sid_c1, DE_ERR_ARG, "'D-\\xc2\\x85'"},
    {"subject_id bad UTF-8", sid_bad_utf8, DE_ERR_ARG, "'D-\\xff\\xfe'"},
    {"subject_id overlong", sid_overlong, DE_ERR_ARG, "'D-\\xc0\\xaf'"},
    {"subject_id surrogate", sid_surrogate, DE_ERR_ARG, "'D-\\xed\\xa0\\x80'"},
    {"subject_id right-to-left override", sid_rlo, DE_ERR_ARG,
     "'D-\\xe2\\x80\\xae1'"},
    {"subject_id bidi isolate", sid_isolate, DE_ERR_ARG,
     "'D-\\xe2\\x81\\xa61'"},
    {"subject_id long", sid_long, DE_ERR_ARG, "at most 256 bytes"},
    {"payload array", pl_array, DE_ERR_PAYLOAD,
     "payload for delivery.assigned is not a JSON object: '[1,2]'"},
    {"payload string", pl_string, DE_ERR_PAYLOAD, "'\"assigned\"'"},
    {"payload null", pl_null_json, DE_ERR_PAYLOAD, "'null'"},
    {"payload broken", pl_broken, DE_ERR_PAYLOAD, "not valid JSON"},
    {"payload trailing", pl_trailing, DE_ERR_PAYLOAD, "'{} {}'"},
    {"payload duplicate key", pl_dup_key, DE_ERR_PAYLOAD, "duplicate"},
    {"payload bad UTF-8", pl_bad_utf8, DE_ERR_PAYLOAD, "'{\"a\":\"\\xff\"}'"},
    {"payload empty", pl_empty, DE_ERR_PAYLOAD, "not valid JSON"},
    {"occurred_at negative", occ_negative, DE_ERR_ARG, "occurred_at_ms -5"},
    {"occurred_at year 10000", occ_year_10000, DE_ERR_ARG, "253402300800000"},
    {"event_id empty", eid_empty, DE_ERR_ARG, "event_id ''"},
    {"event_id space", eid_space, DE_ERR_ARG, "'id 1'"},
    {"event_id long", eid_long, DE_ERR_ARG, "'0123456789"},
    {"event_id non-ASCII", eid_nonascii, DE_ERR_ARG, "event_id 'caf"},
    {"traceparent garbage", tp_garbage, DE_ERR_ARG, "'not-a-traceparent'"},
    {"traceparent upper", tp_upper, DE_ERR_ARG, "'00-4BF92F"},
    {"traceparent zero trace", tp_zero_trace, DE_ERR_ARG, "'00-0000"},
    {"traceparent zero parent", tp_zero_parent, DE_ERR_ARG,
     "-0000000000000000-"},
    {"traceparent version ff", tp_version_ff, DE_ERR_ARG, "'ff-4bf9"},
    {"traceparent v00 extra", tp_v00_extra, DE_ERR_ARG, "-01-xx'"},
    {"tracestate alone", ts_alone, DE_ERR_ARG, "without a traceparent"},
    {"tracestate control", ts_control, DE_ERR_ARG, "'rojo=1\\x09'"},
    {"tracestate long", ts_long, DE_ERR_ARG, "at most 512"},
    {"version negative", ver_negative, DE_ERR_ARG, "version -1"},
};

START_TEST(bad_input_is_refused_and_writes_nothing)
{
    const struct bad_case *bc = &bad_cases[_i];
    de_event ev = valid_event();
    de_recorded rec;

    memset(long_ident, 'a', sizeof long_ident - 1);
    memset(ident_65, 'b', sizeof ident_65 - 1);
    memset(ident_64, 'c', sizeof ident_64 - 1);
    memset(subject_257, 's', sizeof subject_257 - 1);
    memset(subject_256, 't', sizeof subject_256 - 1);
    memset(tracestate_513, 'k', sizeof tracestate_513 - 1);
    memset(tracestate_512, 'k', sizeof tracestate_512 - 1);
    memset(long_subject, 'x', sizeof long_subject - 1);
    memset(long_tracestate, 'k', sizeof long_tracestate - 1);

    tu_exec(db, "BEGIN");
    tu_exec(db, "INSERT INTO deliveries VALUES ('D-1001', 'assigned')");
    bc->mutate(&ev);
    memset(&rec, 0, sizeof rec);
    de_err e = de_record(ob, &ev, &rec);
    ck_assert_msg(e == bc->code, "%s: got %s, expected %s: %s", bc->name,
                  de_err_name(e), de_err_name(bc->code), de_errmsg());
    ck_assert_msg(strstr(de_errmsg(), bc->in_message) != NULL,
                  "%s: message lacks \"%s\": %s", bc->name, bc->in_message,
                  de_errmsg());
    /* Nothing was written and the host's transaction is still open and
     * usable: a valid event and the domain row both commit. */
    ck_assert_msg(!sqlite3_get_autocommit(db), "%s ended the transaction",
                  bc->name);
    ck_assert_int_eq(outbox_count(db), 0);
    ev = valid_event();
    tu_ok(de_record(ob, &ev, &rec));
    tu_exec(db, "COMMIT");
    ck_assert_int_eq(outbox_count(db), 1);
    ck_assert_int_eq(tu_query_int(db, "SELECT count(*) FROM deliveries"), 1);
}
END_TEST

/* Each limit itself is allowed: 64-byte identifiers, a 256-byte subject
 * id, a 36-character event id, a 512-byte tracestate. */
START_TEST(exact_limits_are_accepted)
{
    de_event ev = valid_event();
    de_recorded rec;

    memset(ident_64, 'c', sizeof ident_64 - 1);
    memset(subject_256, 't', sizeof subject_256 - 1);
    memset(tracestate_512, 'k', sizeof tracestate_512 - 1);
    ev.subject_type = ident_64;
    ev.action = ident_64;
    ev.subject_id = subject_256;
    ev.event_id = "012345678901234567890123456789012345";
    ev.traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    ev.tracestate = tracestate_512;
    tu_exec(db, "BEGIN");
    tu_ok(de_record(ob, &ev, &rec));
    tu_exec(db, "COMMIT");
    ck_assert_str_eq(rec.event_id, "012345678901234567890123456789012345");
    ck_assert_int_eq(tu_query_int(db, "SELECT length(subject_id) + "
                                      "length(subject_type) + "
                                      "length(tracestate) FROM de_outbox"),
                     256 + 64 + 512);
}
END_TEST

START_TEST(null_arguments_are_refused)
{
    de_event ev = valid_event();
    de_outbox *o2 = (de_outbox *)1;

    tu_exec(db, "BEGIN");
    tu_assert_err(de_record(NULL, &ev, NULL), DE_ERR_ARG, "NULL outbox");
    tu_assert_err(de_record(ob, NULL, NULL), DE_ERR_ARG, "NULL event");
    tu_exec(db, "COMMIT");
    tu_assert_err(de_outbox_open(NULL, NULL, &o2), DE_ERR_ARG, "NULL db");
    ck_assert_ptr_null(o2);
    tu_assert_err(de_outbox_open(db, NULL, NULL), DE_ERR_ARG, "NULL out");
    de_outbox_close(NULL);
}
END_TEST

START_TEST(oversized_events_are_refused)
{
    de_conf *conf = de_conf_new();
    de_outbox *small = NULL;
    de_event ev = valid_event();
    char *big;
    size_t n = 1000001;

    /* The default limit keeps the record under Kafka's 1,000,000 bytes. */
    big = malloc(n + 16);
    ck_assert_ptr_nonnull(big);
    memset(big, ' ', n + 16);
    big[0] = '{';
    memcpy(big + n - 8, "\"a\":1}", 7);
    ev.payload = big;
    tu_exec(db, "BEGIN");
    tu_assert_err(de_record(ob, &ev, NULL), DE_ERR_PAYLOAD,
                  "over event.max.bytes 990000");
    /* Just under the limit (with the maximal headers, a signature among
     * them) is fine. */
    big[988900 - 8] = '\0';
    memcpy(big + 988900 - 15, "\"a\":1}", 7);
    tu_ok(de_record(ob, &ev, NULL));
    tu_exec(db, "COMMIT");
    ck_assert_int_eq(outbox_count(db), 1);
    free(big);

    /* A configured limit counts key and headers too. */
    ck_assert_int_eq(de_conf_set(conf, "event.max.bytes", "2048"), DE_OK);
    tu_ok(de_outbox_open(db, conf, &small));
    de_conf_destroy(conf);
    memset(long_payload, ' ', sizeof long_payload - 1);
    long_payload[0] = '{';
    long_payload[sizeof long_payload - 2] = '}';
    ev.payload = long_payload;
    tu_exec(db, "BEGIN");
    tu_assert_err(de_record(small, &ev, NULL), DE_ERR_PAYLOAD,
                  "over event.max.bytes 2048");
    ck_assert(!sqlite3_get_autocommit(db));
    ev.payload = "{}";
    tu_ok(de_record(small, &ev, NULL));
    tu_exec(db, "COMMIT");
    ck_assert_int_eq(outbox_count(db), 2);
    de_outbox_close(small);
}
END_TEST

START_TEST(full_database_is_reported)
{
    de_event ev = valid_event();
    char sql[128];
    de_err e;
    int i;

    /* Cap the file at its current size: the next page allocation fails
     * with SQLITE_FULL, as on a full disk. */
    tu_exec(db, "BEGIN");
    tu_ok(de_record(ob, &ev, NULL));
    tu_exec(db, "COMMIT");
    snprintf(sql, sizeof sql, "PRAGMA max_page_count = %lld",
             (long long)tu_query_int(db, "PRAGMA page_count"));
    tu_exec(db, sql);
    memset(long_payload, ' ', sizeof long_payload - 1);
    long_payload[0] = '{';
    long_payload[sizeof long_payload - 2] = '}';
    ev.payload = long_payload;
    tu_exec(db, "BEGIN");
    for (i = 0; i < 1000; i++)
        if ((e = de_record(ob, &ev, NULL)) != DE_OK)
            break;
    ck_assert_msg(i < 1000, "the capped database never filled up");
    ck_assert_int_eq(e, DE_ERR_DB);
    ck_assert_msg(strstr(de_errmsg(), "full") != NULL, "%s", de_errmsg());
    ck_assert_msg(strstr(de_errmsg(), "delivery.assigned") != NULL, "%s",
                  de_errmsg());
    /* The message says truthfully whether SQLite kept the transaction. */
    if (sqlite3_get_autocommit(db)) {
        ck_assert_msg(strstr(de_errmsg(), "rolled back the whole") != NULL,
                      "%s", de_errmsg());
    } else {
        ck_assert_msg(strstr(de_errmsg(), "still open") != NULL, "%s",
                      de_errmsg());
        tu_exec(db, "ROLLBACK");
    }
    ck_assert_int_eq(outbox_count(db), 1);
}
END_TEST

START_TEST(refuses_unusable_connections)
{
    sqlite3 *mem = NULL, *ro = NULL;
    de_outbox *o2 = NULL;

    ck_assert_int_eq(sqlite3_open(":memory:", &mem), SQLITE_OK);
    tu_assert_err(de_outbox_open(mem, NULL, &o2), DE_ERR_ARG, "in memory");
    sqlite3_close(mem);

    ck_assert_int_eq(sqlite3_open_v2(tu_path(dir, "service.db"), &ro,
                                     SQLITE_OPEN_READONLY, NULL),
                     SQLITE_OK);
    tu_assert_err(de_outbox_open(ro, NULL, &o2), DE_ERR_ARG, "read-only");
    sqlite3_close(ro);

    tu_exec(db, "BEGIN");
    tu_assert_err(de_outbox_open(db, NULL, &o2), DE_ERR_STATE,
                  "inside a transaction");
    tu_exec(db, "COMMIT");
    ck_assert_ptr_null(o2);
}
END_TEST

START_TEST(newer_schema_is_refused)
{
    sqlite3 *db2;
    de_outbox *o2 = (de_outbox *)1;

    tu_exec(db, "UPDATE de_meta SET value = 99 WHERE key = 'schema_version'");
    db2 = tu_open(tu_path(dir, "service.db"));
    tu_assert_err(de_outbox_open(db2, NULL, &o2), DE_ERR_STATE,
                  "schema version 99");
    ck_assert_ptr_null(o2);
    sqlite3_close(db2);
}
END_TEST

/* Switching a file to WAL needs it alone for a moment: a read in progress
 * on another connection is waited for (the library gives a connection
 * without one a busy timeout first), not an error. */
static void *end_read_later(void *arg)
{
    usleep(300 * 1000);
    tu_exec(arg, "COMMIT");
    return NULL;
}

START_TEST(open_waits_for_a_reader)
{
    const char *path = tu_path(dir, "fresh.db");
    sqlite3 *reader = tu_open(path), *host = tu_open(path);
    de_outbox *o = NULL;
    pthread_t t;

    tu_exec(reader, "CREATE TABLE t(x); INSERT INTO t VALUES (1)");
    tu_exec(reader, "BEGIN; SELECT x FROM t"); /* holds its read lock */
    ck_assert_int_eq(pthread_create(&t, NULL, end_read_later, reader), 0);
    tu_ok(de_outbox_open(host, NULL, &o));
    pthread_join(t, NULL);
    ck_assert_str_eq(tu_query_text(host, "PRAGMA journal_mode"), "wal");
    de_outbox_close(o);
    sqlite3_close(host);
    sqlite3_close(reader);
}
END_TEST

START_TEST(open_is_idempotent_and_leaves_host_settings)
{
    sqlite3 *db2;
    de_outbox *o2 = NULL;

    /* The host's user_version and its own busy timeout are its own. */
    db2 = tu_open(tu_path(dir, "other.db"));
    tu_exec(db2, "PRAGMA user_version = 7");
    sqlite3_busy_timeout(db2, 1234);
    tu_ok(de_outbox_open(db2, NULL, &o2));
    de_outbox_close(o2);
    tu_ok(de_outbox_open(db2, NULL, &o2));
    ck_assert_int_eq(tu_query_int(db2, "PRAGMA user_version"), 7);
    ck_assert_int_eq(tu_query_int(db2, "PRAGMA busy_timeout"), 1234);
    ck_assert_int_eq(tu_query_int(db2, "SELECT count(*) FROM sqlite_master "
                                       "WHERE name = 'de_outbox'"),
                     1);
    de_outbox_close(o2);
    sqlite3_close(db2);

    /* A connection without a busy timeout gets the default one, and the
     * database is in WAL. */
    ck_assert_int_eq(tu_query_int(db, "PRAGMA busy_timeout"), 5000);
    sqlite3_stmt *st;
    ck_assert_int_eq(
        sqlite3_prepare_v2(db, "PRAGMA journal_mode", -1, &st, NULL),
        SQLITE_OK);
    ck_assert_int_eq(sqlite3_step(st), SQLITE_ROW);
    ck_assert_str_eq((const char *)sqlite3_column_text(st, 0), "wal");
    sqlite3_finalize(st);
}
END_TEST

static int trace_stmt(unsigned type, void *ctx, void *p, void *x)
{
    char *log = ctx;
    (void)type;
    (void)p;
    strncat(log, (const char *)x, 4000 - strlen(log));
    strncat(log, ";", 4000 - strlen(log));
    return 0;
}

START_TEST(record_does_not_read_before_writing)
{
    /* A deferred transaction that reads and then writes after another
     * connection committed fails with SQLITE_BUSY_SNAPSHOT; de_record
     * therefore starts with the INSERT, contracts or not.  Once the
     * transaction has written, reading is safe: the second call may look
     * at PRAGMA data_version (for contracts others defined), nothing
     * else. */
    sqlite3 *other = tu_open(tu_path(dir, "service.db"));
    de_outbox *oob = NULL;
    de_event ev = valid_event();
    static char log[4096];
    const char *p;

    tu_ok(de_outbox_open(other, NULL, &oob));
    tu_ok(de_outbox_define(ob, "delivery", "assigned", 1,
                           "{\"type\":\"object\",\"properties\":{"
                           "\"rider_id\":{\"type\":\"string\"}}}"));
    tu_exec(db, "BEGIN");
    tu_exec(other, "INSERT INTO deliveries VALUES ('D-2', 'created')");
    tu_ok(de_outbox_define(oob, "delivery", "picked_up", 1,
                           "{\"type\":\"object\"}"));
    log[0] = '\0';
    sqlite3_trace_v2(db, SQLITE_TRACE_STMT, trace_stmt, log);
    tu_ok(de_record(ob, &ev, NULL));
    tu_ok(de_record(ob, &ev, NULL));
    sqlite3_trace_v2(db, 0, NULL, NULL);
    tu_exec(db, "COMMIT");
    ck_assert_msg(strncmp(log, "INSERT INTO main.de_outbox", 26) == 0,
                  "de_record ran: %s", log);
    /* The second call, inside a transaction that holds a snapshot, saw
     * that another connection committed and loaded what it defined. */
    p = strchr(log, ';') + 1;
    ck_assert_msg(strncmp(p, "PRAGMA main.data_version;SELECT id", 34) == 0 &&
                      strstr(p, "FROM main.de_contracts") != NULL,
                  "de_record ran: %s", log);
    p = strstr(p, ";INSERT INTO main.de_outbox");
    ck_assert_msg(p != NULL && strchr(p + 1, ';') == p + strlen(p) - 1,
                  "de_record ran: %s", log);
    ck_assert_int_eq(outbox_count(db), 2);
    de_outbox_close(oob);
    sqlite3_close(other);
}
END_TEST

/* Two processes record into the same file at once; nothing is lost and
 * each writer's events keep its own order. */
START_TEST(concurrent_processes_lose_nothing)
{
    enum { WRITERS = 2, PER = 500 };
    pid_t pids[WRITERS];
    sqlite3_stmt *st;
    int64_t last[WRITERS] = {0, 0};

    for (int w = 0; w < WRITERS; w++) {
        pids[w] = fork();
        ck_assert_int_ge(pids[w], 0);
        if (pids[w] == 0) {
            sqlite3 *cdb = NULL;
            de_outbox *cob = NULL;
            char sid[32], payload[64];
            de_event ev = valid_event();
            if (sqlite3_open(tu_path(dir, "service.db"), &cdb) != SQLITE_OK ||
                de_outbox_open(cdb, NULL, &cob) != DE_OK)
                _exit(2);
            snprintf(sid, sizeof sid, "W-%d", w);
            ev.subject_id = sid;
            for (int i = 1; i <= PER; i++) {
                snprintf(payload, sizeof payload, "{\"n\":%d}", i);
                ev.payload = payload;
                if (sqlite3_exec(cdb, "BEGIN IMMEDIATE", NULL, NULL, NULL) !=
                        SQLITE_OK ||
                    de_record(cob, &ev, NULL) != DE_OK ||
                    sqlite3_exec(cdb, "COMMIT", NULL, NULL, NULL) != SQLITE_OK)
                    _exit(3);
            }
            de_outbox_close(cob);
            sqlite3_close(cdb);
            _exit(0);
        }
    }
    for (int w = 0; w < WRITERS; w++) {
        int status;
        ck_assert_int_eq(waitpid(pids[w], &status, 0), pids[w]);
        ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 0,
                      "writer %d failed (status %d)", w, status);
    }
    ck_assert_int_eq(outbox_count(db), WRITERS * PER);
    ck_assert_int_eq(
        sqlite3_prepare_v2(db,
                           "SELECT subject_id, json_extract(payload, '$.n') "
                           "FROM de_outbox ORDER BY position",
                           -1, &st, NULL),
        SQLITE_OK);
    while (sqlite3_step(st) == SQLITE_ROW) {
        int w = sqlite3_column_text(st, 0)[2] - '0';
        int64_t n = sqlite3_column_int64(st, 1);
        ck_assert_int_eq(n, last[w] + 1);
        last[w] = n;
    }
    sqlite3_finalize(st);
    ck_assert_int_eq(last[0], PER);
    ck_assert_int_eq(last[1], PER);
}
END_TEST

START_TEST(generated_ids_are_unique_and_time_ordered)
{
    de_event ev = valid_event();
    de_recorded prev, cur;

    tu_exec(db, "BEGIN");
    tu_ok(de_record(ob, &ev, &prev));
    for (int i = 0; i < 20000; i++) {
        tu_ok(de_record(ob, &ev, &cur));
        ck_assert(is_uuid7(cur.event_id));
        ck_assert_msg(strcmp(prev.event_id, cur.event_id) < 0,
                      "ids out of order: %s then %s", prev.event_id,
                      cur.event_id);
        prev = cur;
    }
    tu_exec(db, "COMMIT");
    ck_assert_int_eq(
        tu_query_int(db, "SELECT count(DISTINCT event_id) FROM de_outbox"),
        20001);
}
END_TEST

/* ---- contracts ------------------------------------------------------- */

static int64_t contract_count(sqlite3 *conn)
{
    return tu_query_int(conn, "SELECT count(*) FROM de_contracts");
}

/* Records ev in a transaction that first writes a domain row (the usual
 * shape); commits on success, rolls back otherwise.  Returns de_record's
 * result. */
static de_err record_in_txn(sqlite3 *conn, de_outbox *o, const de_event *ev)
{
    de_err e;

    tu_exec(conn, "BEGIN");
    tu_exec(conn, "INSERT OR REPLACE INTO deliveries VALUES ('D-1', 'x')");
    e = de_record(o, ev, NULL);
    tu_exec(conn, e == DE_OK ? "COMMIT" : "ROLLBACK");
    return e;
}

START_TEST(define_refuses_bad_arguments_and_schemas)
{
    tu_assert_err(de_outbox_define(NULL, "delivery", "assigned", 1, "{}"),
                  DE_ERR_ARG, "needs an outbox");
    tu_assert_err(de_outbox_define(ob, "Delivery", "assigned", 1, "{}"),
                  DE_ERR_ARG, "subject_type 'Delivery'");
    tu_assert_err(de_outbox_define(ob, "delivery", "is assigned", 1, "{}"),
                  DE_ERR_ARG, "action 'is assigned'");
    tu_assert_err(de_outbox_define(ob, "delivery", "assigned", 0, "{}"),
                  DE_ERR_ARG, "version 0 for delivery.assigned");
    tu_assert_err(de_outbox_define(ob, "delivery", "assigned", 1, NULL),
                  DE_ERR_ARG, "needs a schema");
    tu_assert_err(de_outbox_define(ob, "delivery", "assigned", 1, "{\"type\":"),
                  DE_ERR_CONTRACT,
                  "delivery.assigned v1: contract schema: "
                  "not valid JSON");
    tu_assert_err(
        de_outbox_define(ob, "delivery", "assigned", 1,
                         "{\"type\":\"object\",\"properties\":{\"rider\":{"
                         "\"oneOf\":[]}}}"),
        DE_ERR_CONTRACT,
        "delivery.assigned v1: contract schema: unsupported keyword 'oneOf' "
        "at $.properties.rider");
    tu_assert_err(de_outbox_define(ob, "delivery", "assigned", 1,
                                   "{\"$id\":\"https://x/a b\","
                                   "\"type\":\"object\"}"),
                  DE_ERR_CONTRACT, "'$id'");
    tu_exec(db, "BEGIN");
    tu_assert_err(de_outbox_define(ob, "delivery", "assigned", 1, ASSIGNED_V1),
                  DE_ERR_STATE, "inside a transaction");
    tu_exec(db, "COMMIT");
    ck_assert_int_eq(contract_count(db), 0);
}
END_TEST

/* The example, word for word: nothing is written and the
 * transaction goes on. */
START_TEST(record_refuses_a_payload_that_breaks_its_contract)
{
    de_event ev = valid_event();

    tu_ok(de_outbox_define(ob, "delivery", "assigned", 1, ASSIGNED_V1));
    tu_exec(db, "BEGIN");
    tu_exec(db, "INSERT INTO deliveries VALUES ('D-1001', 'assigned')");
    ev.payload = "{\"rider_id\":\"R-7\",\"eta_min\":1.5}";
    tu_assert_err(de_record(ob, &ev, NULL), DE_ERR_CONTRACT,
                  "delivery.assigned v1: $.eta_min must be an integer, got "
                  "1.5");
    ev.payload = "{\"rider_id\":\"R-7\",\"phone\":\"010\"}";
    tu_assert_err(de_record(ob, &ev, NULL), DE_ERR_CONTRACT,
                  "delivery.assigned v1: $.phone is not allowed");
    ev.payload = "{}";
    tu_assert_err(de_record(ob, &ev, NULL), DE_ERR_CONTRACT,
                  "$.rider_id is required");
    /* Numbers of any size are JSON; one a double cannot hold cannot be
     * checked, and is named. */
    ev.payload = "{\"rider_id\":\"R-7\",\"eta_min\":1e400}";
    tu_assert_err(de_record(ob, &ev, NULL), DE_ERR_CONTRACT,
                  "delivery.assigned v1: the payload cannot be checked: real "
                  "number overflow");
    ev.payload = "{\"rider_id\":\"R-7\",\"eta_min\":-123456789012345678901}";
    tu_assert_err(de_record(ob, &ev, NULL), DE_ERR_CONTRACT, "$.eta_min ");
    ck_assert_int_eq(outbox_count(db), 0);
    ev.payload = "{\"rider_id\":\"R-7\",\"eta_min\":12}";
    tu_ok(de_record(ob, &ev, NULL));
    tu_exec(db, "COMMIT");
    ck_assert_int_eq(outbox_count(db), 1);
    ck_assert_int_eq(tu_query_int(db, "SELECT count(*) FROM deliveries"), 1);
    /* Checked against v1, so recorded as v1, with the contract's $id. */
    ck_assert_int_eq(tu_query_int(db, "SELECT version FROM de_outbox"), 1);
    ck_assert_str_eq(tu_query_text(db, "SELECT dataschema FROM de_outbox"),
                     "https://schemas.example.com/delivery/assigned/v1.json");
}
END_TEST

START_TEST(version_zero_means_the_latest_and_others_must_exist)
{
    de_event ev = valid_event();

    tu_ok(de_outbox_define(ob, "delivery", "assigned", 2, ASSIGNED_V2));
    tu_ok(de_outbox_define(ob, "delivery", "assigned", 1, ASSIGNED_V1));
    /* Latest: v2, which needs a zone. */
    ev.payload = "{\"rider_id\":\"R-7\"}";
    tu_assert_err(record_in_txn(db, ob, &ev), DE_ERR_CONTRACT,
                  "delivery.assigned v2: $.zone is required");
    ev.payload = "{\"rider_id\":\"R-7\",\"zone\":\"mapo\"}";
    tu_ok(record_in_txn(db, ob, &ev));
    /* During a migration window the caller may still record v1. */
    ev.version = 1;
    tu_assert_err(record_in_txn(db, ob, &ev), DE_ERR_CONTRACT,
                  "delivery.assigned v1: $.zone is not allowed");
    ev.payload = "{\"rider_id\":\"R-7\"}";
    tu_ok(record_in_txn(db, ob, &ev));
    ev.version = 3;
    tu_assert_err(record_in_txn(db, ob, &ev), DE_ERR_CONTRACT,
                  "delivery.assigned has no contract v3 (defined: v1, v2)");
    ck_assert_int_eq(outbox_count(db), 2);
    ck_assert_int_eq(
        tu_query_int(db, "SELECT group_concat(version, '') FROM "
                         "(SELECT version FROM de_outbox ORDER BY position)"),
        21);
    ck_assert_int_eq(
        tu_query_int(db, "SELECT count(*) FROM de_outbox WHERE dataschema "
                         "IS NULL AND version = 2"),
        1);
}
END_TEST

START_TEST(strict_refuses_undefined_event_types)
{
    de_conf *conf = de_conf_new();
    sqlite3 *db2 = tu_open(tu_path(dir, "service.db"));
    de_outbox *strict = NULL;
    de_event ev = valid_event();

    /* Without outbox.strict an undefined type is recorded as before. */
    ev.action = "canceled";
    ev.version = 4;
    tu_ok(record_in_txn(db, ob, &ev));
    ck_assert_str_eq(de_conf_get(NULL, "outbox.strict"), "false");
    tu_ok(de_conf_set(conf, "outbox.strict", "true"));
    tu_ok(de_outbox_open(db2, conf, &strict));
    de_conf_destroy(conf);
    tu_ok(de_outbox_define(strict, "delivery", "assigned", 1, ASSIGNED_V1));
    ev.version = 0;
    tu_assert_err(record_in_txn(db2, strict, &ev), DE_ERR_CONTRACT,
                  "delivery.canceled has no contract, and outbox.strict is "
                  "true");
    ev.action = "assigned";
    tu_ok(record_in_txn(db2, strict, &ev));
    ck_assert_int_eq(outbox_count(db), 2);
    de_outbox_close(strict);
    sqlite3_close(db2);
}
END_TEST

START_TEST(a_defined_version_never_changes)
{
    /* The same meaning -- other spacing and member order -- is accepted
     * again, so a service can define its contracts at every start. */

    tu_ok(de_outbox_define(ob, "delivery", "assigned", 1, ASSIGNED_V1));
    tu_ok(de_outbox_define(ob, "delivery", "assigned", 1, ASSIGNED_V1_SAME));
    tu_assert_err(de_outbox_define(ob, "delivery", "assigned", 1, ASSIGNED_V2),
                  DE_ERR_CONTRACT,
                  "delivery.assigned v1 is already defined with a different "
                  "schema; a contract never changes once defined: define the "
                  "new schema as a new version");
    tu_ok(de_outbox_define(ob, "delivery", "assigned", 2, ASSIGNED_V2));
    ck_assert_int_eq(contract_count(db), 2);
    ck_assert_int_eq(tu_query_int(db, "SELECT count(*) FROM de_contracts "
                                      "WHERE version = 1 AND schema LIKE "
                                      "'%pattern%'"),
                     1);
}
END_TEST

/* Definitions live in the database: an outbox opened later on another
 * connection, one open already, and one in another process all check
 * against them. */
START_TEST(definitions_are_shared_by_connections_and_processes)
{
    sqlite3 *db2 = tu_open(tu_path(dir, "service.db"));
    de_outbox *ob2 = NULL;
    de_event ev = valid_event();
    pid_t pid;
    int status;

    tu_ok(de_outbox_open(db2, NULL, &ob2)); /* before any definition */
    tu_ok(de_outbox_define(ob, "delivery", "assigned", 1, ASSIGNED_V1));
    ev.payload = "{\"rider_id\":\"x\"}";
    tu_assert_err(record_in_txn(db2, ob2, &ev), DE_ERR_CONTRACT,
                  "delivery.assigned v1: $.rider_id must match");

    pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        sqlite3 *cdb = NULL;
        de_outbox *cob = NULL;
        de_event cev = valid_event();
        if (sqlite3_open(tu_path(dir, "service.db"), &cdb) != SQLITE_OK ||
            de_outbox_open(cdb, NULL, &cob) != DE_OK)
            _exit(2);
        /* v1, defined by the parent, applies here too. */
        cev.payload = "{\"rider_id\":\"x\"}";
        if (sqlite3_exec(cdb, "BEGIN", NULL, NULL, NULL) != SQLITE_OK ||
            de_record(cob, &cev, NULL) != DE_ERR_CONTRACT ||
            sqlite3_exec(cdb, "ROLLBACK", NULL, NULL, NULL) != SQLITE_OK)
            _exit(3);
        if (de_outbox_define(cob, "delivery", "assigned", 2, ASSIGNED_V2) !=
            DE_OK)
            _exit(4);
        de_outbox_close(cob);
        sqlite3_close(cdb);
        _exit(0);
    }
    ck_assert_int_eq(waitpid(pid, &status, 0), pid);
    ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 0,
                  "child failed (status %d)", status);
    /* v2, defined by the child, is now the latest for both outboxes. */
    ev.payload = "{\"rider_id\":\"R-1\"}";
    tu_assert_err(record_in_txn(db, ob, &ev), DE_ERR_CONTRACT,
                  "delivery.assigned v2: $.zone is required");
    tu_assert_err(record_in_txn(db2, ob2, &ev), DE_ERR_CONTRACT,
                  "delivery.assigned v2: $.zone is required");
    ck_assert_int_eq(outbox_count(db), 0);
    de_outbox_close(ob2);
    sqlite3_close(db2);
}
END_TEST

/* A database written by the previous library (outbox schema 1, no
 * contracts) is migrated in place: its rows are kept and relayable, and
 * contracts work from then on. */
START_TEST(upgrades_an_outbox_of_schema_1)
{
    sqlite3 *old = tu_open(tu_path(dir, "old.db"));
    de_outbox *o = NULL;
    de_event ev = valid_event();

    tu_exec(old, "PRAGMA journal_mode=WAL");
    tu_exec(old,
            "CREATE TABLE de_meta(key TEXT PRIMARY KEY, value) WITHOUT ROWID;"
            "INSERT INTO de_meta VALUES ('schema_version', 1),"
            " ('outbox_id', '018f0000-0000-7000-8000-000000000001');"
            "CREATE TABLE de_outbox (position INTEGER PRIMARY KEY,"
            " event_id TEXT NOT NULL, subject_type TEXT NOT NULL,"
            " subject_id TEXT NOT NULL, action TEXT NOT NULL,"
            " version INTEGER NOT NULL, occurred_at_ms INTEGER NOT NULL,"
            " recorded_at_ms INTEGER NOT NULL, payload TEXT NOT NULL,"
            " traceparent TEXT, tracestate TEXT);"
            "INSERT INTO de_outbox VALUES (1, 'e-1', 'delivery', 'D-1',"
            " 'assigned', 0, 1, 1, '{}', NULL, NULL);"
            "CREATE TABLE deliveries(id TEXT PRIMARY KEY, status TEXT)");
    tu_ok(de_outbox_open(old, NULL, &o));
    ck_assert_int_eq(tu_query_int(old, "SELECT value FROM de_meta WHERE key = "
                                       "'schema_version'"),
                     2);
    ck_assert_int_eq(tu_query_int(old, "SELECT count(*) FROM de_outbox WHERE "
                                       "event_id = 'e-1' AND dataschema IS "
                                       "NULL"),
                     1);
    tu_ok(de_outbox_define(o, "delivery", "assigned", 1, ASSIGNED_V1));
    ev.payload = "{\"rider_id\":\"R-7\"}";
    tu_ok(record_in_txn(old, o, &ev));
    ck_assert_int_eq(tu_query_int(old, "SELECT count(*) FROM de_outbox WHERE "
                                       "dataschema LIKE 'https://%'"),
                     1);
    de_outbox_close(o);
    sqlite3_close(old);
}
END_TEST

static Suite *outbox_suite(void)
{
    Suite *s = suite_create("outbox");
    TCase *tc = tcase_create("record");

    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, commit_keeps_events_in_order);
    tcase_add_test(tc, given_fields_are_kept);
    tcase_add_test(tc, rollback_leaves_no_event);
    tcase_add_test(tc, crash_mid_transaction_leaves_no_event);
    tcase_add_test(tc, outside_transaction_is_refused);
    tcase_add_loop_test(tc, bad_input_is_refused_and_writes_nothing, 0,
                        (int)(sizeof bad_cases / sizeof bad_cases[0]));
    tcase_add_test(tc, null_arguments_are_refused);
    tcase_add_test(tc, exact_limits_are_accepted);
    tcase_add_test(tc, oversized_events_are_refused);
    tcase_add_test(tc, full_database_is_reported);
    tcase_add_test(tc, refuses_unusable_connections);
    tcase_add_test(tc, newer_schema_is_refused);
    tcase_add_test(tc, open_is_idempotent_and_leaves_host_settings);
    tcase_add_test(tc, open_waits_for_a_reader);
    tcase_add_test(tc, record_does_not_read_before_writing);
    tcase_add_test(tc, concurrent_processes_lose_nothing);
    tcase_add_test(tc, generated_ids_are_unique_and_time_ordered);
    suite_add_tcase(s, tc);

    tc = tcase_create("contracts");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, define_refuses_bad_arguments_and_schemas);
    tcase_add_test(tc, record_refuses_a_payload_that_breaks_its_contract);
    tcase_add_test(tc, version_zero_means_the_latest_and_others_must_exist);
    tcase_add_test(tc, strict_refuses_undefined_event_types);
    tcase_add_test(tc, a_defined_version_never_changes);
    tcase_add_test(tc, definitions_are_shared_by_connections_and_processes);
    tcase_add_test(tc, upgrades_an_outbox_of_schema_1);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    return tu_run(outbox_suite()) ? EXIT_FAILURE : EXIT_SUCCESS;
}

/* SPDX-License-Identifier: MIT */
/*
 * check_examples.c -- the examples, end to end, on the mock cluster: the
 * delivery service publishes through its relay, and the read model, the
 * notifier and the live statistics -- each a separate program with its
 * own database -- must agree with the service's own tables:
 *
 *  - query_model's delivery_status equals the service's deliveries;
 *  - notifier queued exactly the messages the service's history implies;
 *  - live_stats' stream windows equal a batch SQL aggregation over the
 *    service's tables (event time, late events included as revisions);
 *  - dispatch_board, reading the same topic mixed with another producer's
 *    CloudEvents (courier_app: numbered binary-mode shifts, un-numbered
 *    structured-mode pings each sent twice, one record that is none),
 *    equals the service's deliveries and the courier app's riders, with
 *    every ping applied once and the stray record dead-lettered whole.
 */
#include "kafka.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

/* Rows of `a` not in `b`, both queries over the attached databases. */
static int64_t differ(sqlite3 *db, const char *a, const char *b)
{
    char sql[8192];

    snprintf(sql, sizeof sql,
             "SELECT count(*) FROM (SELECT * FROM (%s) EXCEPT SELECT * FROM "
             "(%s))",
             a, b);
    return tu_query_int(db, sql);
}

START_TEST(examples_agree_with_the_service)
{
    tu_cluster *c = tu_cluster_new(0, 3);
    const char *topic = NULL;
    pid_t svc, q, n, s, b, courier;
    sqlite3 *db;
    char sql[1024];
    static const char stream[] =
        "SELECT window_start_ms, region, created, delivered, canceled, "
        "delivery_ms_sum, delivery_ms_n FROM ls.window_stats";
    static const char batch[] =
        "WITH ev AS ("
        "  SELECT region, created_at AS t, 1 AS c, 0 AS d, 0 AS x,"
        "         0 AS ms, 0 AS n FROM svc.deliveries"
        "  UNION ALL SELECT region, delivered_at, 0, 1, 0,"
        "         delivered_at - assigned_at, 1 FROM svc.deliveries"
        "         WHERE delivered_at IS NOT NULL"
        "  UNION ALL SELECT region, canceled_at, 0, 0, 1, 0, 0"
        "         FROM svc.deliveries WHERE canceled_at IS NOT NULL)"
        "SELECT t - t % 60000, region, sum(c), sum(d), sum(x), sum(ms),"
        "       sum(n) FROM ev GROUP BY 1, 2";

    /* The service's topic (its default template). */
    ck_assert_int_eq(
        rd_kafka_mock_topic_create(c->mock, "delivery.events", 6, 1), 0);
    (void)topic;
    q = tu_example("query_model", "--bootstrap", c->bootstrap, "--db",
                   tu_path(tu_dir, "q.db"), "--until-idle", "2500");
    n = tu_example("notifier", "--bootstrap", c->bootstrap, "--db",
                   tu_path(tu_dir, "n.db"), "--until-idle", "2500");
    s = tu_example("live_stats", "--bootstrap", c->bootstrap, "--db",
                   tu_path(tu_dir, "s.db"), "--until-idle", "2500");
    b = tu_example("dispatch_board", "--bootstrap", c->bootstrap, "--db",
                   tu_path(tu_dir, "b.db"), "--until-idle", "2500");
    courier = tu_example("courier_app", "--bootstrap", c->bootstrap, "--riders",
                         "10", "--pings", "5");
    svc = tu_example("delivery_service", "--db", tu_path(tu_dir, "svc.db"),
                     "--deliveries", "150", "--bootstrap", c->bootstrap);
    tu_example_wait(courier, "courier_app");
    tu_example_wait(svc, "delivery_service");
    tu_example_wait(b, "dispatch_board");
    tu_example_wait(q, "query_model");
    tu_example_wait(n, "notifier");
    tu_example_wait(s, "live_stats");

    db = tu_open(tu_path(tu_dir, "svc.db"));
    snprintf(sql, sizeof sql,
             "ATTACH '%s' AS svc; ATTACH '%s' AS qm; ATTACH '%s' AS nt; "
             "ATTACH '%s' AS ls; ATTACH '%s' AS db",
             tu_path(tu_dir, "svc.db"), tu_path(tu_dir, "q.db"),
             tu_path(tu_dir, "n.db"), tu_path(tu_dir, "s.db"),
             tu_path(tu_dir, "b.db"));
    tu_exec(db, sql);
    ck_assert_int_eq(tu_query_int(db, "SELECT count(*) FROM svc.deliveries"),
                     150);

    /* The service runs strict, with a contract for every event it
     * records, and shows one payload its contract refuses. */
    ck_assert_int_eq(tu_query_int(db, "SELECT count(*) FROM svc.de_contracts "
                                      "WHERE subject_type = 'delivery'"),
                     5);
    {
        char out[4300], line[1024];
        FILE *f;
        int refused = 0;
        snprintf(out, sizeof out, "%s/delivery_service.out", tu_dir);
        f = fopen(out, "r");
        ck_assert_ptr_nonnull(f);
        while (fgets(line, sizeof line, f) != NULL)
            refused |= strstr(line, "DE_ERR_CONTRACT: delivery.assigned v1: "
                                    "$.customer_phone is not allowed") != NULL;
        fclose(f);
        ck_assert_msg(refused, "delivery_service did not show the refusal");
    }

    /* The read model is the service's state. */
    static const char svc_view[] =
        "SELECT id, region, status, rider_id, "
        "strftime('%Y-%m-%dT%H:%M:%fZ', created_at / 1000.0, 'unixepoch'), "
        "strftime('%Y-%m-%dT%H:%M:%fZ', delivered_at / 1000.0, "
        "'unixepoch') FROM svc.deliveries";
    static const char qm_view[] =
        "SELECT delivery_id, region, status, rider_id, created_at, "
        "delivered_at FROM qm.delivery_status";
    ck_assert_int_eq(differ(db, svc_view, qm_view), 0);
    ck_assert_int_eq(differ(db, qm_view, svc_view), 0);

    /* Notifications: two per assignment, one per pickup and delivery,
     * and per cancellation one to the customer plus one to an assigned
     * rider. */
    ck_assert_int_eq(
        tu_query_int(db, "SELECT count(*) FROM nt.notifications"),
        tu_query_int(db, "SELECT 2 * count(assigned_at) + "
                         "count(picked_up_at) + count(delivered_at) + "
                         "count(canceled_at) + count(CASE WHEN canceled_at "
                         "IS NOT NULL AND rider_id IS NOT NULL THEN 1 END) "
                         "FROM svc.deliveries"));

    /* The dispatch board: the service's deliveries from its events, the
     * riders from the courier app's, side by side on one topic. */
    {
        static const char svc_board[] =
            "SELECT id, status, rider_id FROM svc.deliveries";
        static const char board[] =
            "SELECT delivery_id, status, rider_id FROM db.board";
        ck_assert_int_eq(differ(db, svc_board, board), 0);
        ck_assert_int_eq(differ(db, board, svc_board), 0);
    }
    ck_assert_int_eq(tu_query_int(db, "SELECT count(*) FROM db.riders WHERE "
                                      "on_shift = 0 AND shifts = 1 AND pings "
                                      "= 5 AND lat = 52.5205 AND lon = "
                                      "13.4005"),
                     10);
    ck_assert_int_eq(tu_query_int(db, "SELECT count(*) FROM db.riders"), 10);
    ck_assert_int_eq(tu_query_int(db, "SELECT count(*) FROM "
                                      "db.de_dead_letter WHERE kind = "
                                      "'foreign' AND CAST(record_key AS "
                                      "TEXT) = 'debug' AND CAST(record_value "
                                      "AS TEXT) = 'rider app restarted' AND "
                                      "error LIKE 'no ce_specversion%'"),
                     1);
    ck_assert_int_eq(tu_query_int(db, "SELECT count(*) FROM db.de_dead_letter"),
                     1);
    ck_assert_int_eq(tu_query_int(db, "SELECT count(*) FROM db.de_inbox_id"),
                     50);

    /* The stream equals the batch, window by window. */
    ck_assert_int_gt(tu_query_int(db, "SELECT count(*) FROM ls.window_stats"),
                     10);
    ck_assert_int_eq(differ(db, stream, batch), 0);
    ck_assert_int_eq(differ(db, batch, stream), 0);
    fprintf(stderr,
            "examples_agree_with_the_service: %lld windows, %lld late "
            "events counted as revisions\n",
            (long long)tu_query_int(db, "SELECT count(*) FROM "
                                        "ls.window_stats"),
            (long long)tu_query_int(db, "SELECT count(*) FROM "
                                        "ls.late_events"));
    sqlite3_close(db);
    tu_cluster_destroy(c);
}
END_TEST

static Suite *examples_suite(void)
{
    Suite *s = suite_create("examples");
    TCase *tc = tcase_create("end-to-end");

    tcase_add_checked_fixture(tc, tu_dir_setup, tu_dir_teardown);
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, examples_agree_with_the_service);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    return tu_run(examples_suite()) ? EXIT_FAILURE : EXIT_SUCCESS;
}

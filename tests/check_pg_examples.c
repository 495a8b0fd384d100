/* SPDX-License-Identifier: MIT */
/*
 * check_pg_examples.c -- the examples on PostgreSQL, end to end, as
 * check_examples.c runs them on SQLite: delivery_service_pg records in
 * its own database and publishes through its relay to the mock cluster;
 * query_model_pg, a separate program with a database of its own, builds
 * the read model.  Both run as the programs a user runs (DE_EXAMPLES),
 * on this suite's throwaway server.  Checked against the service's own
 * table (what it committed), not against anything the library reports:
 *
 *  - the read model holds every delivery with the service's status,
 *    rider and times;
 *  - the topic holds each delivery's events exactly once, numbered 1..n
 *    in offset order, with the actions its row says happened, in the
 *    order they happened;
 *  - the service defined its five contracts and showed the refusal.
 */
#include "kafka.h"
#include "pgserver.h"
#include "testutil.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define DELIVERIES "150"

/* The rows of sql as one text, a row per line. */
static char *rows(PGconn *c, const char *sql)
{
    PGresult *r = PQexec(c, sql);
    size_t cap = 1, len = 0;
    char *out;

    ck_assert_msg(PQresultStatus(r) == PGRES_TUPLES_OK, "%s: %s", sql,
                  PQresultErrorMessage(r));
    for (int i = 0; i < PQntuples(r); i++)
        for (int j = 0; j < PQnfields(r); j++)
            cap += strlen(PQgetvalue(r, i, j)) + 2;
    out = malloc(cap);
    ck_assert_ptr_nonnull(out);
    out[0] = '\0';
    for (int i = 0; i < PQntuples(r); i++)
        for (int j = 0; j < PQnfields(r); j++)
            len += (size_t)snprintf(out + len, cap - len, "%s%c",
                                    PQgetvalue(r, i, j),
                                    j + 1 < PQnfields(r) ? '|' : '\n');
    PQclear(r);
    return out;
}

/* Fails unless the two row texts are equal, naming the first line
 * where they differ (the whole texts are too long for a message). */
static void same_rows(const char *what, const char *want, const char *got)
{
    size_t i = 0, line = 0;

    while (want[i] != '\0' && want[i] == got[i]) {
        if (want[i] == '\n')
            line = i + 1;
        i++;
    }
    ck_assert_msg(want[i] == got[i],
                  "%s: the service has %.60s... where it has %.60s...", what,
                  want + line, got + line);
}

/* Each record of the topic into the table topic of the service's
 * database (through a connection of the test's own). */
static void note_record(void *ctx, const rd_kafka_message_t *m, int32_t np)
{
    const char *p[5];
    char part[16], off[24];
    PGresult *r;

    (void)np;
    snprintf(part, sizeof part, "%d", (int)m->partition);
    snprintf(off, sizeof off, "%lld", (long long)m->offset);
    p[0] = tu_header(m, "ce_subject");
    p[1] = tu_header(m, "ce_subjectseq");
    p[2] = tu_header(m, "ce_type");
    p[3] = part;
    p[4] = off;
    r = PQexecParams(ctx,
                     "INSERT INTO topic(subject, seq, type, kafka_partition, "
                     "kafka_offset) VALUES ($1, $2, $3, $4, $5)",
                     5, NULL, p, NULL, NULL, 0);
    ck_assert_msg(PQresultStatus(r) == PGRES_COMMAND_OK, "%s",
                  PQresultErrorMessage(r));
    PQclear(r);
}

START_TEST(pg_examples_agree_with_the_service)
{
    tu_cluster *c = tu_cluster_new(0, 3);
    char svc_db[700], qm_db[700];
    char *svc, *qm;
    PGconn *db;
    pid_t s, q;

    ck_assert_int_eq(
        rd_kafka_mock_topic_create(c->mock, "delivery.events", 6, 1), 0);
    snprintf(svc_db, sizeof svc_db, "%s", tpg_fresh_db());
    snprintf(qm_db, sizeof qm_db, "%s", tpg_fresh_db());
    q = tu_example("query_model_pg", "--bootstrap", c->bootstrap, "--db", qm_db,
                   "--until-idle", "2500");
    s = tu_example("delivery_service_pg", "--db", svc_db, "--deliveries",
                   DELIVERIES, "--bootstrap", c->bootstrap);
    tu_example_wait(s, "delivery_service_pg");
    tu_example_wait(q, "query_model_pg");

    db = tpg_connect(svc_db);
    ck_assert_int_eq(tpg_int(db, "SELECT count(*) FROM deliveries"),
                     atoi(DELIVERIES));
    ck_assert_int_eq(tpg_int(db, "SELECT count(*) FROM "
                                 "deliveryevents.contracts WHERE "
                                 "subject_type = 'delivery'"),
                     5);
    {
        char out[4300], line[1024];
        FILE *f;
        int refused = 0;
        snprintf(out, sizeof out, "%s/delivery_service_pg.out", tu_dir);
        f = fopen(out, "r");
        ck_assert_ptr_nonnull(f);
        while (fgets(line, sizeof line, f) != NULL)
            refused |= strstr(line, "DE_ERR_CONTRACT: delivery.assigned v1: "
                                    "$.customer_phone is not allowed") != NULL;
        fclose(f);
        ck_assert_msg(refused, "delivery_service_pg did not show the refusal");
    }

    /* The read model is the service's state, row by row. */
    svc = rows(db, "SELECT id, region, status, rider_id, created_at, "
                   "assigned_at, picked_up_at, delivered_at, canceled_at "
                   "FROM deliveries ORDER BY id");
    {
        PGconn *qc = tpg_connect(qm_db);
        qm = rows(qc, "SELECT delivery_id, region, status, rider_id, "
                      "(extract(epoch FROM created_at) * 1000)::bigint, "
                      "(extract(epoch FROM assigned_at) * 1000)::bigint, "
                      "(extract(epoch FROM picked_up_at) * 1000)::bigint, "
                      "(extract(epoch FROM delivered_at) * 1000)::bigint, "
                      "(extract(epoch FROM canceled_at) * 1000)::bigint "
                      "FROM delivery_status ORDER BY delivery_id");
        PQfinish(qc);
    }
    same_rows("the read model", svc, qm);
    free(svc);
    free(qm);

    /* The topic: what the service's rows say happened, per delivery in
     * the order it happened, each event once, numbered 1..n in offset
     * order (one key, one partition). */
    tpg_exec(db, "CREATE TABLE topic(subject text, seq bigint, type text, "
                 "kafka_partition int, kafka_offset bigint)");
    tu_read_topic(c, "delivery.events", note_record, db);
    ck_assert_int_eq(tpg_int(db, "SELECT count(*) FROM topic WHERE subject "
                                 "IS NULL OR seq IS NULL OR type IS NULL"),
                     0);
    svc = rows(db, "SELECT id, a.action FROM deliveries, LATERAL (VALUES "
                   "('created', created_at), ('assigned', assigned_at), "
                   "('picked_up', picked_up_at), ('delivered', "
                   "delivered_at), ('canceled', canceled_at)) AS a(action, "
                   "at) WHERE a.at IS NOT NULL ORDER BY id, a.at");
    qm = rows(db, "SELECT subject, substring(type FROM "
                  "'^delivery\\.(.*)\\.v1$') FROM topic "
                  "ORDER BY subject, kafka_offset");
    same_rows("the topic", svc, qm);
    ck_assert_int_eq(tpg_int(db, "SELECT count(*) FROM (SELECT subject, seq, "
                                 "row_number() OVER (PARTITION BY subject "
                                 "ORDER BY kafka_offset) AS n, "
                                 "min(kafka_partition) OVER (PARTITION BY "
                                 "subject) AS lo, max(kafka_partition) OVER "
                                 "(PARTITION BY subject) AS hi FROM topic) "
                                 "AS t WHERE seq <> n OR lo <> hi"),
                     0);
    fprintf(stderr,
            "pg_examples_agree_with_the_service: %lld events of %lld "
            "deliveries, read model and topic agree with the service\n",
            tpg_int(db, "SELECT count(*) FROM topic"),
            tpg_int(db, "SELECT count(DISTINCT subject) FROM topic"));
    free(svc);
    free(qm);
    PQfinish(db);
    tu_cluster_destroy(c);
}
END_TEST

static Suite *pg_examples_suite(void)
{
    Suite *s = suite_create("pg_examples");
    TCase *tc = tcase_create("end-to-end");

    tcase_add_checked_fixture(tc, tu_dir_setup, tu_dir_teardown);
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, pg_examples_agree_with_the_service);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    int failed;

    if (!tpg_start()) {
        tpg_stop();
        return EXIT_FAILURE;
    }
    failed = tu_run(pg_examples_suite());
    tpg_stop();
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}

/* SPDX-License-Identifier: MIT */
/*
 * check_pg_roles.c -- least privilege on PostgreSQL: the GRANTs that
 * docs/POSTGRESQL.md ("Privileges") lists, and nothing more, are enough
 * for a service role to record, a relay role to publish and a consumer
 * role to apply, with schema deliveryevents owned by an owner role that
 * created it; and they do not let the service role rewrite what the
 * relay owns (published positions, the relay's state, the deletion
 * floor) nor the consumer role write the outbox.
 *
 * On the suite's throwaway server (trust authentication: a role logs in
 * by name) or DE_PG_CONNINFO's, which must then let this connection
 * create roles.  Kafka: librdkafka's mock cluster or
 * KAFKA_BOOTSTRAP_SERVERS.
 */
#include "deliveryevents_pg.h"
#include "kafka.h"
#include "pgledger.h"
#include "pgserver.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define EVENTS 20

static const char *conninfo;
static PGconn *conn; /* the superuser's: creates and drops the roles */

/* The GRANTs of docs/POSTGRESQL.md, "Privileges", run by the owner; %1$s
 * the service role, %2$s the relay role, %3$s the consumer role. */
static const char grants[] =
    "GRANT USAGE ON SCHEMA deliveryevents TO %1$s, %2$s, %3$s;"
    "GRANT SELECT ON deliveryevents.meta TO %1$s, %3$s;"
    /* the service role: records */
    "GRANT INSERT ON deliveryevents.outbox, deliveryevents.outbox_order "
    "  TO %1$s;"
    "GRANT SELECT ON deliveryevents.outbox_order, deliveryevents.contracts "
    "  TO %1$s;"
    "GRANT USAGE, SELECT ON SEQUENCE deliveryevents.outbox_position TO %1$s;"
    "GRANT SELECT ON SEQUENCE deliveryevents.relay_sleeping, "
    "  deliveryevents.contracts_version TO %1$s;"
    /* the relay role: reads and deletes the outbox, its own tables */
    "GRANT SELECT, INSERT, UPDATE ON deliveryevents.meta TO %2$s;"
    "GRANT SELECT, DELETE ON deliveryevents.outbox, "
    "  deliveryevents.outbox_order TO %2$s;"
    "GRANT SELECT ON SEQUENCE deliveryevents.outbox_position TO %2$s;"
    "GRANT SELECT, UPDATE ON SEQUENCE deliveryevents.relay_sleeping TO %2$s;"
    "GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON "
    "  deliveryevents.relay_state, deliveryevents.relay_subjects, "
    "  deliveryevents.relay_lease, deliveryevents.relay_parked, "
    "  deliveryevents.relay_marks, deliveryevents.relay_published, "
    "  deliveryevents.relay_landed, deliveryevents.relay_found TO %2$s;"
    /* the consumer role: its inbox (and the read model, below) */
    "GRANT SELECT, INSERT, UPDATE, DELETE ON deliveryevents.inbox, "
    "  deliveryevents.inbox_source, deliveryevents.inbox_id, "
    "  deliveryevents.inbox_dead_letter, deliveryevents.inbox_request "
    "  TO %3$s;";

static void setup(void)
{
    conninfo = tpg_fresh_db();
    conn = tpg_connect(conninfo);
}

static void teardown(void)
{
    PQfinish(conn);
    conn = NULL;
}

/* sql fails on c for want of a privilege (42501), changing nothing. */
static void assert_denied(PGconn *c, const char *sql)
{
    PGresult *r = PQexec(c, sql);
    const char *state = PQresultErrorField(r, PG_DIAG_SQLSTATE);

    ck_assert_msg(PQresultStatus(r) == PGRES_FATAL_ERROR && state != NULL &&
                      strcmp(state, "42501") == 0,
                  "%s: not refused for want of a privilege: %s", sql,
                  PQresultStatus(r) == PGRES_FATAL_ERROR
                      ? PQresultErrorMessage(r)
                      : "it succeeded");
    PQclear(r);
}

/* The three roles at work on what the owner created and granted, then
 * what they must not do. */
START_TEST(test_least_privilege)
{
    tu_cluster *c = tu_cluster_new(_i, 1);
    char owner[48], svc[48], rel[48], cons[48], ci[4][900], sql[4096];
    char tmpl[128], gid[192];
    PGconn *oc, *sc, *cc;
    de_outbox *ob = NULL;
    de_relay *r = NULL;
    de_consumer *con = NULL;
    de_conf *rconf, *cconf = de_conf_new();
    int64_t deadline;

    /* The suite's own server runs it as a superuser; an external one
     * (DE_PG_CONNINFO) may not let its role make roles. */
    if (tpg_int(conn,
                "SELECT (rolsuper OR rolcreaterole)::int FROM "
                "pg_catalog.pg_roles WHERE rolname = current_user") != 1) {
        fprintf(stderr, "SKIPPED: the roles case creates roles, and the "
                        "role of DE_PG_CONNINFO has no CREATEROLE\n");
        tu_cluster_destroy(c);
        de_conf_destroy(cconf);
        return;
    }
    snprintf(owner, sizeof owner, "de_owner_%d_%d", (int)getpid(), _i);
    snprintf(svc, sizeof svc, "de_service_%d_%d", (int)getpid(), _i);
    snprintf(rel, sizeof rel, "de_relay_%d_%d", (int)getpid(), _i);
    snprintf(cons, sizeof cons, "de_consumer_%d_%d", (int)getpid(), _i);
    snprintf(sql, sizeof sql,
             "CREATE ROLE %s LOGIN; CREATE ROLE %s LOGIN; CREATE ROLE %s "
             "LOGIN; CREATE ROLE %s LOGIN; GRANT CREATE ON DATABASE %s TO %s;"
             /* A role with CREATEROLE only (an external server) drops
              * what they own at the end as their member. */
             "GRANT %s, %s, %s, %s TO CURRENT_USER",
             owner, svc, rel, cons, PQdb(conn), owner, owner, svc, rel, cons);
    tpg_exec(conn, sql);
    /* The later user wins in a conninfo string. */
    snprintf(ci[0], sizeof ci[0], "%s user=%s", conninfo, owner);
    snprintf(ci[1], sizeof ci[1], "%s user=%s", conninfo, svc);
    snprintf(ci[2], sizeof ci[2], "%s user=%s", conninfo, rel);
    snprintf(ci[3], sizeof ci[3], "%s user=%s", conninfo, cons);
    tu_topic_create(c, "delivery", 2);
    rconf = tu_relay_conf(c, "relay.poll.interval.ms", "10", NULL);
    snprintf(tmpl, sizeof tmpl, "%s{subject_type}.events", c->prefix);
    snprintf(gid, sizeof gid, "%sg", c->prefix);
    de_conf_set_log_cb(cconf, tu_log, NULL);
    tu_ok(de_conf_set(cconf, "bootstrap.servers", c->bootstrap));
    tu_ok(de_conf_set(cconf, "group.id", gid));
    tu_ok(de_conf_set(cconf, "topic.template", tmpl));

    /* The owner creates everything: the outbox's schema, the consumer's
     * tables, the relay's (a relay started once), the read model. */
    oc = tpg_connect(ci[0]);
    tu_ok(de_outbox_open_pg(oc, rconf, &ob)); /* stores the wire settings */
    de_outbox_close(ob);
    tu_ok(de_consumer_open_pg(oc, cconf, &con));
    tu_ok(de_consumer_close(con));
    tu_ok(de_relay_start_pg(ci[0], rconf, &r));
    tu_ok(de_relay_stop(r, 10000));
    tpg_exec(oc, "CREATE SCHEMA model; CREATE TABLE model.applied(n "
                 "bigserial PRIMARY KEY, subject_id text, event_id text "
                 "UNIQUE)");
    snprintf(sql, sizeof sql, grants, svc, rel, cons);
    tpg_exec(oc, sql);
    snprintf(sql, sizeof sql,
             "GRANT USAGE ON SCHEMA model TO %s; GRANT SELECT, INSERT ON "
             "model.applied TO %s; GRANT USAGE ON SEQUENCE model.applied_n_seq "
             "TO %s",
             cons, cons, cons);
    tpg_exec(oc, sql);

    /* The service records. */
    sc = tpg_connect(ci[1]);
    tu_ok(de_outbox_open_pg(sc, rconf, &ob)); /* the same settings */
    for (int i = 0; i < EVENTS; i++) {
        char subject[16];
        de_event ev = {.subject_type = "delivery",
                       .subject_id = subject,
                       .action = "assigned",
                       .payload = "{}"};
        snprintf(subject, sizeof subject, "D-%d", i % 4);
        tpg_exec(sc, "BEGIN");
        tu_ok(de_record(ob, &ev, NULL));
        tpg_exec(sc, "COMMIT");
    }
    /* The service restarts: opens again, events there. */
    de_outbox_close(ob);
    tu_ok(de_outbox_open_pg(sc, rconf, &ob));
    /* The relay publishes (and deletes what it published). */
    tu_ok(de_relay_start_pg(ci[2], rconf, &r));
    tu_ok(de_relay_flush(r, 60000));
    /* The consumer applies. */
    cc = tpg_connect(ci[3]);
    tu_ok(de_consumer_open_pg(cc, cconf, &con));
    tu_ok(de_consumer_on_pg(con, "delivery", NULL, tpg_apply, "model.applied"));
    deadline = tu_now_ms() + 60000;
    while (tpg_int(oc, "SELECT count(*) FROM model.applied") < EVENTS &&
           tu_now_ms() < deadline)
        tu_ok(de_consumer_poll(con, 50, NULL));
    ck_assert_int_eq(tpg_int(oc, "SELECT count(DISTINCT event_id) FROM "
                                 "model.applied"),
                     EVENTS);
    /* What the relay published it deleted (relay.cleanup.interval.ms;
     * the row at its cursor stays), raising the floor in meta. */
    ck_assert(tu_wait_for(tpg_int(oc, "SELECT count(*) FROM "
                                      "deliveryevents.outbox") == 1,
                          30000));
    ck_assert_int_eq(tpg_int(oc, "SELECT value::bigint FROM "
                                 "deliveryevents.meta WHERE key = "
                                 "'relay_deleted_upto'"),
                     EVENTS - 1);

    /* What the service role must not do: rewrite published positions
     * or the position sequence, delete or change recorded events, touch
     * the relay's state or its deletion floor, the consumer's inbox. */
    assert_denied(sc, "UPDATE deliveryevents.outbox_order SET position = "
                      "position + 1000");
    assert_denied(sc, "DELETE FROM deliveryevents.outbox_order");
    assert_denied(sc, "SELECT pg_catalog.setval("
                      "'deliveryevents.outbox_position', 1)");
    assert_denied(sc, "UPDATE deliveryevents.outbox SET payload = '{}'");
    assert_denied(sc, "DELETE FROM deliveryevents.outbox");
    assert_denied(sc, "UPDATE deliveryevents.relay_state SET value = '0'");
    assert_denied(sc, "SELECT * FROM deliveryevents.relay_published");
    assert_denied(sc, "UPDATE deliveryevents.meta SET value = '0' WHERE key "
                      "= 'relay_deleted_upto'");
    assert_denied(sc, "SELECT pg_catalog.setval("
                      "'deliveryevents.relay_sleeping', 0)");
    assert_denied(sc, "UPDATE deliveryevents.inbox SET last_seq = 0");
    /* The consumer role: nothing of the outbox or the relay. */
    assert_denied(cc, "INSERT INTO deliveryevents.outbox_order VALUES (1, 1)");
    assert_denied(cc, "SELECT * FROM deliveryevents.outbox");
    assert_denied(cc, "UPDATE deliveryevents.relay_lease SET owner = 'x'");
    /* The relay role: not the consumer's inbox, not the read model. */
    {
        PGconn *rc = tpg_connect(ci[2]);
        assert_denied(rc, "UPDATE deliveryevents.inbox SET last_seq = 0");
        assert_denied(rc, "INSERT INTO model.applied(subject_id) VALUES ('x')");
        PQfinish(rc);
    }

    tu_ok(de_consumer_close(con));
    tu_ok(de_relay_stop(r, 10000));
    de_outbox_close(ob);
    PQfinish(cc);
    PQfinish(sc);
    PQfinish(oc);
    de_conf_destroy(cconf);
    de_conf_destroy(rconf);
    /* The roles are the server's: drop what they own here, then them. */
    snprintf(sql, sizeof sql,
             "DROP OWNED BY %s, %s, %s, %s; DROP ROLE %s; DROP ROLE %s; DROP "
             "ROLE %s; DROP ROLE %s",
             owner, svc, rel, cons, owner, svc, rel, cons);
    tpg_exec(conn, sql);
    tu_cluster_destroy(c);
}
END_TEST

static Suite *pg_roles_suite(void)
{
    Suite *s = suite_create("pg_roles");
    TCase *tc = tcase_create("least_privilege");

    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 120);
    tcase_add_loop_test(tc, test_least_privilege, tu_cluster_first(),
                        tu_cluster_count());
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    return tpg_run(pg_roles_suite());
}

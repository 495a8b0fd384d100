/* SPDX-License-Identifier: MIT */
/*
 * check_pg_tool.c -- the deliveryevents tool's operator commands on a
 * PostgreSQL service (--pg CONNINFO, or --db postgresql://...): status,
 * consumer-status, dead-letters, release, contracts and replay, run as users
 * run them -- the built binary (DE_TOOL) in separate processes -- against an
 * outbox, a relay and a consumer of this process on the suite's throwaway
 * server (tests/pg/pgserver.c) or DE_PG_CONNINFO's, with librdkafka's mock
 * cluster in this process (or the real one KAFKA_BOOTSTRAP_SERVERS names). Each
 * test asserts what an operator reads: exit status, the counts and names in the
 * output, the message naming a bad value, and that a subject the tool released
 * was applied.
 */
#include "deliveryevents_pg.h"
#include "kafka.h"
#include "pgledger.h"
#include "pgserver.h"

#include <fcntl.h>
#include <jansson.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static const char *conninfo;
static PGconn *conn;

static void setup(void)
{
    tu_dir_setup();
    conninfo = tpg_fresh_db();
    conn = tpg_connect(conninfo);
}

static void teardown(void)
{
    PQfinish(conn);
    conn = NULL;
    tu_dir_teardown();
}

/* ---- running the tool ---------------------------------------------- */

typedef struct tool_run {
    pid_t pid;
    int status; /* exit status once exited, else -1 */
    char out[600], err[600];
} tool_run;

/* Starts DE_TOOL with the NULL-terminated arguments; its stdout and
 * stderr go to files in tu_dir. */
static void tool_start(tool_run *t, const char *arg, ...)
{
    static int seq;
    const char *tool = getenv("DE_TOOL");
    const char *args[24] = {"deliveryevents"};
    va_list ap;
    int n = 1;

    ck_assert_msg(tool != NULL, "DE_TOOL (the deliveryevents binary) unset");
    va_start(ap, arg);
    for (const char *a = arg; a != NULL && n < 23; a = va_arg(ap, const char *))
        args[n++] = a;
    va_end(ap);
    args[n] = NULL;
    snprintf(t->out, sizeof t->out, "%s/tool%d.out", tu_dir, seq);
    snprintf(t->err, sizeof t->err, "%s/tool%d.err", tu_dir, seq++);
    t->status = -1;
    t->pid = fork();
    ck_assert_int_ge(t->pid, 0);
    if (t->pid == 0) {
        int out = open(t->out, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        int err = open(t->err, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (out < 0 || err < 0 || dup2(out, 1) < 0 || dup2(err, 2) < 0)
            _exit(126);
        execv(tool, (char *const *)(uintptr_t)args);
        _exit(127);
    }
}

/* Whether it exited (status then set). */
static bool tool_exited(tool_run *t)
{
    int st;

    if (t->status < 0 && waitpid(t->pid, &st, WNOHANG) == t->pid)
        t->status = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    return t->status >= 0;
}

#define text tu_slurp

/* Runs the tool to its end (60 s at most); its exit status. */
#define tool(t, ...)                                                           \
    (tool_start((t), __VA_ARGS__, (const char *)NULL),                         \
     ck_assert_msg(tu_wait_for(tool_exited(t), 60000), "the tool hangs"),      \
     (t)->status)

/* The JSON object the tool printed (one line), which must exit 0. */
static json_t *tool_json(const char *cmd, const char *where)
{
    tool_run t;
    json_t *o;
    json_error_t je;

    ck_assert_msg(tool(&t, cmd, "--pg", where, "--json") == 0,
                  "%s exited %d: %s", cmd, t.status, text(t.err));
    o = json_loads(text(t.out), 0, &je);
    ck_assert_msg(json_is_object(o), "%s printed no JSON object: %s", cmd,
                  text(t.out));
    return o;
}

static json_int_t jint(const json_t *o, const char *path)
{
    const json_t *v = o;
    char key[64];

    /* "a.b": a member of a member. */
    for (const char *p = path, *dot; v != NULL; p = dot + 1) {
        dot = strchr(p, '.');
        snprintf(key, sizeof key, "%.*s", dot ? (int)(dot - p) : (int)strlen(p),
                 p);
        v = json_object_get(v, key);
        if (dot == NULL)
            break;
    }
    ck_assert_msg(json_is_integer(v), "%s is not an integer", path);
    return json_integer_value(v);
}

static const char *jstr(const json_t *o, const char *key)
{
    const json_t *v = json_object_get(o, key);

    ck_assert_msg(json_is_string(v), "%s is not a string", key);
    return json_string_value(v);
}

/* ---- status -------------------------------------------------------- */

/* out has exactly n lines that contain what. */
static void assert_lines(const char *out, const char *what, int n)
{
    int found = 0;

    for (const char *l = out; *l;) {
        const char *nl = strchr(l, '\n');
        size_t len = nl ? (size_t)(nl - l) : strlen(l);
        char line[4096];
        snprintf(line, sizeof line, "%.*s", (int)len, l);
        found += strstr(line, what) != NULL;
        l += len + (nl != NULL);
    }
    ck_assert_msg(found == n, "%d lines with '%s', not %d, in:\n%s", found,
                  what, n, out);
}

static void record(de_outbox *ob, const char *id, const char *action)
{
    de_event ev = {.subject_type = "delivery",
                   .subject_id = id,
                   .action = action,
                   .payload = "{}"};

    tu_ok(de_record(ob, &ev, NULL));
}

/* status on PostgreSQL: what is pending before a relay ran, then the
 * relay's lease (its pid and epoch) and cursor once it published, the
 * lease released after it stopped; the keys of SQLite's status. */
START_TEST(test_status)
{
    tu_cluster *c = tu_cluster_new(_i, 1);
    de_outbox *ob = NULL, *lite_ob = NULL;
    de_conf *conf;
    de_relay *r = NULL;
    de_relay_stats st;
    json_t *o, *lite, *v;
    const char *key;
    sqlite3 *db;
    tool_run t;
    long long max_pos;

    tu_topic_create(c, "delivery", 1);
    tu_ok(de_outbox_open_pg(conn, NULL, &ob));
    tpg_exec(conn, "BEGIN");
    record(ob, "D-1", "created");
    record(ob, "D-1", "assigned");
    record(ob, "D-2", "created");
    tpg_exec(conn, "COMMIT");
    max_pos =
        tpg_int(conn, "SELECT max(position) FROM deliveryevents.outbox_order");

    o = tool_json("status", conninfo);
    ck_assert_str_eq(jstr(o, "backend"), "postgresql");
    ck_assert_int_eq(jint(o, "pending"), 3);
    ck_assert_int_eq(jint(o, "outbox_rows"), 3);
    ck_assert_int_eq(jint(o, "outbox_max_position"), max_pos);
    ck_assert_int_eq(jint(o, "cursor"), 0);
    ck_assert_int_ge(jint(o, "oldest_pending_recorded_at_ms"),
                     tu_now_ms() - 60000);
    ck_assert(json_is_null(json_object_get(o, "lease")));
    ck_assert(json_is_false(json_object_get(o, "relay_state_found")));
    /* Every key SQLite's status has, PostgreSQL's has too. */
    db = tu_open(tu_path(tu_dir, "lite.db"));
    tu_ok(de_outbox_open(db, NULL, &lite_ob));
    ck_assert_int_eq(
        tool(&t, "status", "--db", tu_path(tu_dir, "lite.db"), "--json"), 0);
    lite = json_loads(text(t.out), 0, NULL);
    ck_assert_ptr_nonnull(lite);
    json_object_foreach(lite, key, v)
        ck_assert_msg(json_object_get(o, key) != NULL,
                      "PostgreSQL's status has no '%s'", key);
    json_decref(lite);
    json_decref(o);
    de_outbox_close(lite_ob);
    sqlite3_close(db);
    /* list: the three rows, pending, oldest first. */
    ck_assert_int_eq(tool(&t, "list", "--pg", conninfo, "--pending", "--json"),
                     0);
    assert_lines(text(t.out), "\"status\":\"pending\"", 3);

    /* A relay publishes them: nothing pending, its lease. */
    /* Retained once published, for list to show them so. */
    conf = tu_relay_conf(c, "outbox.retention.ms", "3600000", NULL);
    tu_ok(de_relay_start_pg(conninfo, conf, &r));
    de_conf_destroy(conf);
    ck_assert(tu_wait_for(
        (tu_ok(de_relay_stats_get(r, &st)), st.published == 3), 60000));
    /* Published is not yet checkpointed: what status reads is the
     * relay's durable cursor, which follows. */
    ck_assert(tu_wait_for((o = tool_json("status", conninfo),
                           jint(o, "pending") == 0 || (json_decref(o), false)),
                          60000));
    ck_assert_int_eq(jint(o, "cursor"), max_pos);
    ck_assert_int_eq(jint(o, "lease.pid"), getpid());
    ck_assert_int_eq(jint(o, "lease.epoch"), 1);
    ck_assert(json_is_false(
        json_object_get(json_object_get(o, "lease"), "released")));
    json_decref(o);
    ck_assert_int_eq(
        tool(&t, "list", "--pg", conninfo, "--subject", "delivery:D-1"), 0);
    assert_lines(text(t.out), " published", 2);
    ck_assert_int_eq(tool(&t, "list", "--pg", conninfo, "--json"), 0);
    assert_lines(text(t.out), "\"status\":\"published\"", 3);
    ck_assert_int_eq(tool(&t, "list", "--pg", conninfo, "--pending"), 0);
    assert_lines(text(t.out), "pending", 0);
    /* The text. */
    ck_assert_int_eq(tool(&t, "status", "--pg", conninfo), 0);
    ck_assert_msg(strstr(text(t.out), "pending:         0 ") != NULL, "%s",
                  text(t.out));
    ck_assert_msg(strstr(text(t.out), ", epoch 1") != NULL, "%s", text(t.out));
    tu_ok(de_relay_stop(r, 10000));
    o = tool_json("status", conninfo);
    ck_assert(
        json_is_true(json_object_get(json_object_get(o, "lease"), "released")));
    json_decref(o);
    de_outbox_close(ob);
    tu_cluster_destroy(c);
}
END_TEST

/* A malformed conninfo, a server that cannot be reached, a database
 * without the library's tables: each its own exit status and a message
 * naming the value. */
START_TEST(test_bad_targets)
{
    tool_run t;

    ck_assert_int_eq(tool(&t, "status", "--pg", "dbname"), 2);
    ck_assert_msg(strstr(text(t.err), "'dbname' is not a PostgreSQL "
                                      "connection string") != NULL,
                  "%s", text(t.err));
    ck_assert_int_eq(tool(&t, "consumer-status", "--db",
                          "postgresql://nobody@%2Fnonexistent-de-dir/x"),
                     1);
    ck_assert_msg(strstr(text(t.err),
                         "cannot connect to the PostgreSQL database "
                         "'postgresql://nobody@%2Fnonexistent-de-dir/x'") !=
                      NULL,
                  "%s", text(t.err));
    ck_assert_int_eq(tool(&t, "status", "--pg", conninfo), 1);
    ck_assert_msg(strstr(text(t.err), "has no outbox") != NULL, "%s",
                  text(t.err));
    ck_assert_int_eq(tool(&t, "dead-letters", "--pg", conninfo), 1);
    ck_assert_msg(strstr(text(t.err), "has no consumer tables") != NULL, "%s",
                  text(t.err));
    ck_assert_int_eq(tool(&t, "release", "--pg", conninfo, "delivery:D-1"), 1);
    ck_assert_msg(strstr(text(t.err), "has no consumer tables") != NULL, "%s",
                  text(t.err));
    ck_assert_int_eq(tool(&t, "replay", "--pg", "dbname", "--subject",
                          "delivery:D-1", "-b", "127.0.0.1:1"),
                     2);
    ck_assert_msg(strstr(text(t.err), "'dbname' is not a PostgreSQL "
                                      "connection string") != NULL,
                  "%s", text(t.err));
    ck_assert_int_eq(
        tool(&t, "relay", "--pg", "dbname", "-b", "127.0.0.1:1", "--once"), 2);
    ck_assert_msg(strstr(text(t.err), "'dbname' is not a PostgreSQL "
                                      "connection string") != NULL,
                  "%s", text(t.err));
    ck_assert_int_eq(tool(&t, "status", "--pg", conninfo, "--state", "x"), 2);
    ck_assert_msg(strstr(text(t.err), "--state is for SQLite") != NULL, "%s",
                  text(t.err));
}
END_TEST

/* ---- the consumer: dead letters, release --------------------------- */

#define OURS(seq, id)                                                          \
    "ce_specversion", "1.0", "ce_id", id, "ce_source", "/test", "ce_type",     \
        "delivery.assigned", "ce_subjectseq", seq, "ce_subjecttype",           \
        "delivery", "ce_action", "assigned"

static void produce(tu_cluster *c, const char *subject, int seq)
{
    char id[64], s[16];
    const char *h[] = {OURS(s, id), NULL};

    snprintf(id, sizeof id, "%s-%d", subject, seq);
    snprintf(s, sizeof s, "%d", seq);
    tu_produce_raw(c, tu_topic(c, "delivery"), subject, "{}", h);
}

static const char *applied_ids(const char *subject)
{
    static char buf[256];
    const char *v[1] = {subject};
    PGresult *r = PQexecParams(conn,
                               "SELECT coalesce(string_agg(event_id, ',' "
                               "ORDER BY n), '') FROM applied WHERE "
                               "subject_id = $1",
                               1, NULL, v, NULL, NULL, 0);

    ck_assert_int_eq(PQresultStatus(r), PGRES_TUPLES_OK);
    snprintf(buf, sizeof buf, "%s", PQgetvalue(r, 0, 0));
    PQclear(r);
    return buf;
}

/* A subject parked by a gap on a PostgreSQL consumer: consumer-status
 * and dead-letters show it; release from the tool, served by the running
 * consumer, applies it; a subject not parked is refused. */
START_TEST(test_dead_letters_and_release)
{
    tu_cluster *c = tu_cluster_new(_i, 1);
    de_conf *conf = de_conf_new();
    de_consumer *con = NULL;
    de_consumer_stats st;
    char tmpl[128], group[128];
    const char *out;
    json_t *o, *p;
    json_error_t je;
    tool_run t;

    tpg_exec(conn, "CREATE TABLE applied(n bigserial PRIMARY KEY, "
                   "subject_id text, event_id text)");
    tu_topic_create(c, "delivery", 1);
    produce(c, "D-1", 1);
    produce(c, "G-1", 1);
    produce(c, "G-1", 3); /* 2 is missing: G-1 parks */
    snprintf(tmpl, sizeof tmpl, "%s{subject_type}.events", c->prefix);
    snprintf(group, sizeof group, "%sg", c->prefix);
    de_conf_set_log_cb(conf, tu_log, NULL);
    tu_ok(de_conf_set(conf, "bootstrap.servers", c->bootstrap));
    tu_ok(de_conf_set(conf, "group.id", group));
    tu_ok(de_conf_set(conf, "topic.template", tmpl));
    tu_ok(de_consumer_open_pg(conn, conf, &con));
    de_conf_destroy(conf);
    tu_ok(de_consumer_on_pg(con, "delivery", NULL, tpg_apply, "applied"));
    ck_assert(tu_wait_for((tu_ok(de_consumer_poll(con, 50, NULL)),
                           tu_ok(de_consumer_stats_get(con, &st)),
                           st.gaps == 1 && st.applied == 2),
                          60000));

    o = tool_json("consumer-status", conninfo);
    ck_assert_int_eq(jint(o, "subjects"), 2);
    ck_assert_int_eq(jint(o, "parked_subjects"), 1);
    ck_assert_int_eq(jint(o, "dead_letters_parked"), 1);
    ck_assert_int_eq(jint(o, "requests_queued"), 0);
    p = json_array_get(json_object_get(o, "parked"), 0);
    ck_assert_str_eq(jstr(p, "subject_id"), "G-1");
    ck_assert_str_eq(jstr(p, "kind"), "gap");
    ck_assert_int_eq(jint(p, "parked_events"), 1);
    json_decref(o);
    ck_assert_int_eq(
        tool(&t, "dead-letters", "--pg", conninfo, "--parked", "--json"), 0);
    o = json_loads(text(t.out), JSON_DISABLE_EOF_CHECK, &je);
    ck_assert_msg(json_is_object(o), "%s", text(t.out));
    ck_assert_str_eq(jstr(o, "subject_id"), "G-1");
    ck_assert_str_eq(jstr(o, "event_id"), "G-1-3");
    ck_assert_str_eq(jstr(o, "state"), "parked");
    ck_assert_int_eq(jint(o, "seq"), 3);
    json_decref(o);
    out = text(t.out);
    ck_assert_msg(strchr(out, '\n') == strrchr(out, '\n'),
                  "more than one parked dead letter: %s", out);

    /* Not parked: refused, nothing asked. */
    ck_assert_int_eq(tool(&t, "release", "--pg", conninfo, "delivery:D-1"), 1);
    ck_assert_msg(strstr(text(t.err), "delivery:D-1 is not parked") != NULL,
                  "%s", text(t.err));
    ck_assert_int_eq(
        tpg_int(conn, "SELECT count(*) FROM deliveryevents.inbox_request"), 0);

    /* Released from the tool while the consumer polls. */
    tool_start(&t, "release", "--pg", conninfo, "delivery:G-1", "--wait",
               "60000", (const char *)NULL);
    ck_assert(tu_wait_for(
        (tu_ok(de_consumer_poll(con, 50, NULL)), tool_exited(&t)), 60000));
    ck_assert_msg(t.status == 0, "release exited %d: %s", t.status,
                  text(t.err));
    ck_assert_str_eq(text(t.out),
                     "release delivery:G-1: released: 1 events applied\n");
    ck_assert_str_eq(applied_ids("G-1"), "G-1-1,G-1-3");
    o = tool_json("consumer-status", conninfo);
    ck_assert_int_eq(jint(o, "parked_subjects"), 0);
    ck_assert_int_eq(jint(o, "dead_letters_parked"), 0);
    json_decref(o);
    ck_assert_int_eq(
        tool(&t, "dead-letters", "--pg", conninfo, "--subject", "delivery:G-1"),
        0);
    ck_assert_msg(strstr(text(t.out), "G-1-3") != NULL &&
                      strstr(text(t.out), "applied") != NULL,
                  "%s", text(t.out));
    tu_ok(de_consumer_close(con));
    tu_cluster_destroy(c);
}
END_TEST

/* ---- contracts ----------------------------------------------------- */

START_TEST(test_contracts)
{
    char title[300];
    de_outbox *ob = NULL;
    json_t *o, *ty, *v;
    tool_run t;

    tu_ok(de_outbox_open_pg(conn, NULL, &ob));
    ck_assert_int_eq(tool(&t, "contracts", "--pg", conninfo), 0);
    ck_assert_msg(strstr(text(t.out), "no contracts defined") != NULL, "%s",
                  text(t.out));
    tu_ok(de_outbox_define(ob, "delivery", "assigned", 1,
                           "{\"$id\":\"https://example.com/assigned/1\","
                           "\"type\":\"object\",\"properties\":{\"rider_id\":"
                           "{\"type\":\"string\"}},\"required\":[\"rider_"
                           "id\"]}"));
    tu_ok(de_outbox_define(ob, "delivery", "assigned", 2,
                           "{\"type\":\"object\",\"properties\":{\"rider_"
                           "id\":{\"type\":\"string\"},\"eta\":{\"type\":"
                           "\"integer\"}}}"));
    o = tool_json("contracts", conninfo);
    ck_assert_int_eq(json_array_size(json_object_get(o, "contracts")), 1);
    ty = json_array_get(json_object_get(o, "contracts"), 0);
    ck_assert_str_eq(jstr(ty, "subject_type"), "delivery");
    ck_assert_str_eq(jstr(ty, "action"), "assigned");
    ck_assert_int_eq(json_array_size(json_object_get(ty, "versions")), 2);
    v = json_array_get(json_object_get(ty, "versions"), 0);
    ck_assert_int_eq(jint(v, "version"), 1);
    ck_assert_str_eq(jstr(v, "dataschema"), "https://example.com/assigned/1");
    json_decref(o);
    ck_assert_int_eq(tool(&t, "contracts", "--pg", conninfo), 0);
    ck_assert_msg(strstr(text(t.out), "delivery.assigned (2 versions)") !=
                          NULL &&
                      strstr(text(t.out), "rider_id*") != NULL,
                  "%s", text(t.out));
    /* asyncapi: the same contracts as an AsyncAPI document. */
    ck_assert_int_eq(tool(&t, "asyncapi", "--pg", conninfo), 0);
    o = json_loads(text(t.out), 0, NULL);
    ck_assert_msg(json_is_object(o), "%s", text(t.out));
    ck_assert_str_eq(jstr(o, "asyncapi"), "3.0.0");
    snprintf(title, sizeof title, "Events of %s", PQdb(conn));
    ck_assert_str_eq(jstr(json_object_get(o, "info"), "title"), title);
    ck_assert_int_eq(json_object_size(json_object_get(
                         json_object_get(o, "components"), "messages")),
                     2);
    json_decref(o);
    de_outbox_close(ob);
}
END_TEST

/* ---- replay -------------------------------------------------------- */

/* What a topic holds, per ce_id: how many copies, and whether every copy
 * carries the first one's ce_subjectseq, ce_subjectepoch and key. */
typedef struct copies {
    struct {
        char id[64], seq[24], epoch[24], key[64];
        int n;
        bool same;
    } ev[64];
    int n;
} copies;

static void count_copy(void *ctx, const rd_kafka_message_t *m, int32_t np)
{
    copies *k = ctx;
    const char *id = tu_header(m, "ce_id"),
               *seq = tu_header(m, "ce_subjectseq"),
               *epoch = tu_header(m, "ce_subjectepoch");
    char key[64];
    int i;

    (void)np;
    snprintf(key, sizeof key, "%.*s", (int)m->key_len, (const char *)m->key);
    for (i = 0; i < k->n && strcmp(k->ev[i].id, id ? id : "") != 0; i++)
        ;
    if (i == k->n) {
        ck_assert_int_lt(k->n, 64);
        snprintf(k->ev[i].id, sizeof k->ev[i].id, "%s", id ? id : "");
        snprintf(k->ev[i].seq, sizeof k->ev[i].seq, "%s", seq ? seq : "");
        snprintf(k->ev[i].epoch, sizeof k->ev[i].epoch, "%s",
                 epoch ? epoch : "");
        snprintf(k->ev[i].key, sizeof k->ev[i].key, "%s", key);
        k->ev[i].same = true;
        k->n++;
    }
    k->ev[i].n++;
    k->ev[i].same &= strcmp(k->ev[i].seq, seq ? seq : "") == 0 &&
                     strcmp(k->ev[i].epoch, epoch ? epoch : "") == 0 &&
                     strcmp(k->ev[i].key, key) == 0;
}

/* Each event of subject `key` on Kafka `want` times, every copy with the
 * first one's numbers; the others once.  How many events in all. */
static int assert_copies(tu_cluster *c, const char *key, int want)
{
    copies k;

    memset(&k, 0, sizeof k);
    tu_read_topic(c, tu_topic(c, "delivery"), count_copy, &k);
    for (int i = 0; i < k.n; i++) {
        ck_assert_msg(k.ev[i].same,
                      "a copy of %s went out with other numbers than %s/%s",
                      k.ev[i].id, k.ev[i].epoch, k.ev[i].seq);
        ck_assert_int_eq(k.ev[i].n, strcmp(k.ev[i].key, key) == 0 ? want : 1);
    }
    return k.n;
}

/* Retained events republished from the tool on PostgreSQL (de_replay_pg):
 * the subject's events on Kafka again with their ce_id, ce_subjectseq
 * and ce_subjectepoch, the others not; what is not published yet
 * refused, named. */
START_TEST(test_replay)
{
    tu_cluster *c = tu_cluster_new(_i, 1);
    de_conf *conf = tu_relay_conf(c, "outbox.retention.ms", "3600000", NULL);
    de_replay_select sel = {.subject_type = "delivery", .subject_id = "D-1"};
    de_replay_result res;
    de_outbox *ob = NULL;
    de_relay *r = NULL;
    json_t *o;
    tool_run t;

    /* No outbox yet, no relay state: refused, nothing written. */
    tu_assert_err(de_replay_pg(NULL, conf, &sel, 1000, &res), DE_ERR_ARG,
                  "conninfo");
    tu_assert_err(de_replay_pg(conninfo, conf, &sel, 1000, &res), DE_ERR_STATE,
                  "has no outbox");
    tu_topic_create(c, "delivery", 2);
    tu_ok(de_outbox_open_pg(conn, conf, &ob));
    tu_assert_err(de_replay_pg(conninfo, conf, &sel, 1000, &res), DE_ERR_STATE,
                  "no relay has run");
    tpg_exec(conn, "BEGIN");
    record(ob, "D-1", "created");
    record(ob, "D-2", "created");
    record(ob, "D-1", "assigned");
    tpg_exec(conn, "COMMIT");
    tpg_exec(conn, "BEGIN");
    record(ob, "D-1", "delivered");
    tpg_exec(conn, "COMMIT");
    tu_ok(de_relay_start_pg(conninfo, conf, &r));
    ck_assert(tu_wait_for((o = tool_json("status", conninfo),
                           jint(o, "pending") == 0 || (json_decref(o), false)),
                          60000));
    json_decref(o);
    tu_ok(de_relay_stop(r, 10000));
    ck_assert_int_eq(assert_copies(c, "D-1", 1), 4);

    /* D-1's three events again, as they went out. */
    ck_assert_int_eq(tool(&t, "replay", "--pg", conninfo, "--subject",
                          "delivery:D-1", "-b", c->bootstrap),
                     0);
    ck_assert_msg(strstr(text(t.out), "republished 3 events") != NULL, "%s",
                  text(t.out));
    ck_assert_int_eq(assert_copies(c, "D-1", 2), 4);

    /* Not published yet: the relay's, refused with its position. */
    tpg_exec(conn, "BEGIN");
    record(ob, "D-3", "created");
    tpg_exec(conn, "COMMIT");
    ck_assert_int_eq(tool(&t, "replay", "--pg", conninfo, "--subject",
                          "delivery:D-3", "-b", c->bootstrap),
                     1);
    ck_assert_msg(strstr(text(t.err), "is not published yet") != NULL, "%s",
                  text(t.err));
    /* The library call, by position: D-2's event and D-1's after it. */
    sel = (de_replay_select){
        .from_position = tpg_int(conn, "SELECT min(position) FROM "
                                       "deliveryevents.outbox_order o JOIN "
                                       "deliveryevents.outbox e USING (id) "
                                       "WHERE e.subject_id = 'D-2'")};
    tu_ok(de_replay_pg(conninfo, conf, &sel, 30000, &res));
    ck_assert_uint_eq(res.republished, 3);
    ck_assert_uint_eq(res.not_published, 1);
    ck_assert_int_eq(res.first_position, sel.from_position);
    de_outbox_close(ob);
    de_conf_destroy(conf);
    tu_cluster_destroy(c);
}
END_TEST

/* ---- relay --------------------------------------------------------- */

/* `relay --pg` as a sidecar process beside the service: writer processes
 * record while it runs, a second one stands by naming the lease holder,
 * SIGTERM stops it with nothing pending, and the independent check finds
 * every committed event on Kafka in commit order, numbered without gaps. */
START_TEST(test_relay)
{
    enum { WRITERS = 4, TXNS = 25 };
    tu_cluster *c = tu_cluster_new(_i, 1);
    char tmpl[160], src[] = "event.source=/test/relay";
    pid_t pids[WRITERS];
    tool_run r1, r2;
    de_outbox *ob = NULL;
    json_t *o;

    snprintf(tmpl, sizeof tmpl, "topic.template=%s{subject_type}.events",
             c->prefix);
    tu_topic_create(c, "delivery", 3);
    tpg_ledger_setup(conn);
    tu_ok(de_outbox_open_pg(conn, NULL, &ob));
    tool_start(&r1, "relay", "--pg", conninfo, "-b", c->bootstrap, "-X", tmpl,
               "-X", src, "-X", "relay.lease.timeout.ms=1500", (char *)NULL);
    tpg_fork_writers(conninfo, WRITERS, TXNS, 2000, false, pids);
    ck_assert_msg(tu_wait_for(strstr(text(r1.err), "active: publishing "
                                                   "dbname=") != NULL ||
                                  tool_exited(&r1),
                              60000),
                  "relay not active: %s", text(r1.err));
    ck_assert_msg(!tool_exited(&r1), "relay exited %d: %s", r1.status,
                  text(r1.err));
    /* A second relay waits, and says whose lease it waits for; it names
     * the database by a URI (the suite's conninfo is key=value): the
     * --db form. */
    {
        char uri[400];
        snprintf(uri, sizeof uri, "postgresql:///%s?host=%s&port=%s&user=%s",
                 PQdb(conn), PQhost(conn), PQport(conn), PQuser(conn));
        tool_start(&r2, "relay", "--db", uri, "-b", c->bootstrap, "-X", tmpl,
                   "-X", src, (char *)NULL);
    }
    ck_assert_msg(tu_wait_for(strstr(text(r2.err), "standing by: the relay "
                                                   "with pid ") != NULL ||
                                  tool_exited(&r2),
                              60000),
                  "no standby: %s", text(r2.err));
    {
        char pid[40];
        snprintf(pid, sizeof pid, "with pid %d on ", (int)r1.pid);
        ck_assert_msg(strstr(text(r2.err), pid) != NULL, "%s", text(r2.err));
    }
    tpg_wait_writers(WRITERS, pids);
    ck_assert(tu_wait_for((o = tool_json("status", conninfo),
                           jint(o, "pending") == 0 || (json_decref(o), false)),
                          60000));
    json_decref(o);
    kill(r2.pid, SIGTERM);
    kill(r1.pid, SIGTERM);
    ck_assert(tu_wait_for(tool_exited(&r1) && tool_exited(&r2), 60000));
    ck_assert_msg(r1.status == 0, "relay exited %d: %s", r1.status,
                  text(r1.err));
    ck_assert_msg(strstr(text(r1.err), "stopped; 0 events pending in the "
                                       "outbox of dbname=") != NULL,
                  "%s", text(r1.err));
    tu_check k = tpg_check(conn, c);
    tu_assert_check(&k);
    ck_assert_int_gt(k.expected, WRITERS * TXNS / 2);
    de_outbox_close(ob);
    tu_cluster_destroy(c);
}
END_TEST

static Suite *pg_tool_suite(void)
{
    Suite *s = suite_create("pg_tool");
    TCase *tc = tcase_create("tool");
    int first = tu_cluster_first(), n = tu_cluster_count();

    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 180);
    tcase_add_loop_test(tc, test_status, first, n);
    tcase_add_test(tc, test_bad_targets);
    tcase_add_loop_test(tc, test_dead_letters_and_release, first, n);
    tcase_add_test(tc, test_contracts);
    tcase_add_loop_test(tc, test_replay, first, n);
    tcase_add_loop_test(tc, test_relay, first, n);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    return tpg_run(pg_tool_suite());
}

/* SPDX-License-Identifier: MIT */
/*
 * check_tool.c -- the deliveryevents command-line tool as its users run
 * it: the built binary (DE_TOOL) in separate processes, its own
 * mock-cluster subcommand as the Kafka cluster, and assertions on what a
 * user sees -- exit status, the message naming a bad value, the output,
 * and the files left behind.  Every wait polls for an outcome with a
 * generous deadline.
 */
#include "kafka.h"

#include <fcntl.h>
#include <jansson.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_ARGS 32
#define MAX_PROCS 128

typedef struct proc {
    pid_t pid;
    char out[4200], err[4200]; /* files holding its stdout and stderr */
    int status;                /* from waitpid, once it exited */
    int exited;
} proc;

/* Processes started by the current test, stopped in teardown if it
 * failed before it could stop them. */
static proc *procs[MAX_PROCS];

static void setup(void)
{
    tu_dir_setup();
    memset(procs, 0, sizeof procs);
}

static void teardown(void)
{
    for (int i = 0; i < MAX_PROCS; i++)
        if (procs[i] != NULL) {
            if (!procs[i]->exited) {
                kill(procs[i]->pid, SIGKILL);
                waitpid(procs[i]->pid, NULL, 0);
            }
            free(procs[i]);
            procs[i] = NULL;
        }
    tu_dir_teardown();
}

/* Starts the tool with the NULL-terminated arguments after the command
 * name; stdout and stderr go to files "<name>.out" and "<name>.err". */
static proc *start(const char *name, ...)
{
    static int seq;
    const char *tool = getenv("DE_TOOL");
    char *args[MAX_ARGS + 2];
    proc *p = calloc(1, sizeof *p);
    const char *a;
    va_list ap;
    int n = 1;

    ck_assert_msg(tool != NULL, "DE_TOOL (the deliveryevents binary) unset");
    ck_assert_ptr_nonnull(p);
    args[0] = strdup("deliveryevents");
    va_start(ap, name);
    while (n <= MAX_ARGS && (a = va_arg(ap, const char *)) != NULL)
        args[n++] = strdup(a);
    va_end(ap);
    args[n] = NULL;
    snprintf(p->out, sizeof p->out, "%s/%s.%d.out", tu_dir, name, seq);
    snprintf(p->err, sizeof p->err, "%s/%s.%d.err", tu_dir, name, seq++);
    p->pid = fork();
    ck_assert_int_ge(p->pid, 0);
    if (p->pid == 0) {
        int in = open("/dev/null", O_RDONLY);
        int out = open(p->out, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        int err = open(p->err, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (in < 0 || out < 0 || err < 0 || dup2(in, 0) < 0 ||
            dup2(out, 1) < 0 || dup2(err, 2) < 0)
            _exit(126);
        execv(tool, args);
        _exit(127);
    }
    for (int i = 0; i < n; i++)
        free(args[i]);
    for (int i = 0; i <= MAX_PROCS; i++) {
        ck_assert_msg(i < MAX_PROCS, "more than %d processes in one test",
                      MAX_PROCS);
        if (procs[i] == NULL) {
            procs[i] = p;
            break;
        }
    }
    return p;
}

#define slurp tu_slurp

static bool exited(proc *p)
{
    if (!p->exited && waitpid(p->pid, &p->status, WNOHANG) == p->pid)
        p->exited = 1;
    return p->exited;
}

/* Waits for p to exit (within timeout_ms) and returns its exit status. */
static int finish(proc *p, int timeout_ms)
{
    ck_assert_msg(tu_wait_for(exited(p), timeout_ms),
                  "the tool did not exit within %d ms; stderr: %s", timeout_ms,
                  slurp(p->err));
    ck_assert_msg(WIFEXITED(p->status), "the tool died of signal %d: %s",
                  WTERMSIG(p->status), slurp(p->err));
    return WEXITSTATUS(p->status);
}

/* Runs the tool to its end; returns its exit status. */
#define run(p, ...) finish((p) = start(__VA_ARGS__, (const char *)NULL), 30000)

static bool file_has(const char *path, const char *needle)
{
    return strstr(slurp(path), needle) != NULL;
}

#define assert_has(path, needle)                                               \
    ck_assert_msg(file_has(path, needle), "expected '%s' in %s:\n%.2000s",     \
                  needle, path, slurp(path))

/* ---- a mock cluster in its own process --------------------------------- */

typedef struct cluster {
    proc *p;
    char bootstrap[512];
} cluster;

static cluster mock_start(const char *topic1, const char *topic2)
{
    cluster c;
    const char *line, *nl;

    memset(&c, 0, sizeof c);
    if (topic2 != NULL)
        c.p = start("mock", "mock-cluster", "--brokers", "1", "--topic", topic1,
                    "--topic", topic2, (const char *)NULL);
    else if (topic1 != NULL)
        c.p = start("mock", "mock-cluster", "--brokers", "1", "--topic", topic1,
                    (const char *)NULL);
    else
        c.p =
            start("mock", "mock-cluster", "--brokers", "1", (const char *)NULL);
    ck_assert_msg(
        tu_wait_for(strchr(slurp(c.p->out), '\n') != NULL || exited(c.p),
                    20000),
        "mock-cluster printed nothing: %s", slurp(c.p->err));
    line = slurp(c.p->out);
    ck_assert_msg(strncmp(line, "bootstrap.servers=", 18) == 0,
                  "mock-cluster's first line: %s", line);
    nl = strchr(line, '\n');
    snprintf(c.bootstrap, sizeof c.bootstrap, "%.*s", (int)(nl - line - 18),
             line + 18);
    return c;
}

static void mock_stop(cluster *c)
{
    kill(c->p->pid, SIGTERM);
    ck_assert_int_eq(finish(c->p, 20000), 0);
}

/* The partitions of a topic on the cluster: 0 if it does not exist. */
static int partitions(const cluster *c, const char *topic)
{
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    const struct rd_kafka_metadata *md = NULL;
    char err[256];
    rd_kafka_t *rk;
    int n = 0;

    rd_kafka_conf_set(conf, "bootstrap.servers", c->bootstrap, err, sizeof err);
    rd_kafka_conf_set(conf, "log_level", "0", err, sizeof err);
    rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, err, sizeof err);
    ck_assert_ptr_nonnull(rk);
    ck_assert_int_eq(rd_kafka_metadata(rk, 1, NULL, &md, 10000), 0);
    for (int i = 0; i < md->topic_cnt; i++)
        if (strcmp(md->topics[i].topic, topic) == 0)
            n = md->topics[i].partition_cnt;
    rd_kafka_metadata_destroy(md);
    rd_kafka_destroy(rk);
    return n;
}

/* ---- databases ----------------------------------------------------------- */

/* Records events (type, id pairs) in db_path, then closes it cleanly, so
 * that no -wal or -shm file is left. */
static void record(const char *db_path, int n, const char *type, const char *id)
{
    sqlite3 *db = tu_open(db_path);
    de_outbox *ob = NULL;

    tu_ledger_create(db);
    tu_ok(de_outbox_open(db, NULL, &ob));
    for (int i = 0; i < n; i++)
        tu_write(db, ob, type, id, "assigned", "{}", 0);
    de_outbox_close(ob);
    ck_assert_int_eq(sqlite3_close(db), SQLITE_OK);
}

/* The contents of a file, malloc'd, and its size. */
static char *contents(const char *path, size_t *size)
{
    FILE *f = fopen(path, "rb");
    char *b;

    ck_assert_msg(f != NULL, "cannot open %s", path);
    fseek(f, 0, SEEK_END);
    *size = (size_t)ftell(f);
    rewind(f);
    b = malloc(*size + 1);
    ck_assert_int_eq(fread(b, 1, *size, f), *size);
    fclose(f);
    return b;
}

static bool exists(const char *path)
{
    struct stat sb;

    return stat(path, &sb) == 0;
}

static json_t *json_of(const char *path)
{
    json_error_t e;
    json_t *j = json_loads(slurp(path), 0, &e);

    ck_assert_msg(j != NULL, "%s is not one JSON value: %s: %s", path, e.text,
                  slurp(path));
    return j;
}

static json_int_t jint(json_t *o, const char *key)
{
    json_t *v = json_object_get(o, key);

    ck_assert_msg(json_is_integer(v), "no integer '%s'", key);
    return json_integer_value(v);
}

/* ---- usage ---------------------------------------------------------- */

START_TEST(help_for_the_tool_and_every_command)
{
    static const char *const listed[] = {"relay",
                                         "status",
                                         "list",
                                         "tail",
                                         "mock-cluster",
                                         "--drain",
                                         "--once",
                                         "-b SERVERS",
                                         "--stats-ms",
                                         "--stop-timeout-ms",
                                         "--exit-at-end",
                                         "--print",
                                         "--json",
                                         "--subject",
                                         "--pending",
                                         "--blocked",
                                         "--limit",
                                         "--brokers",
                                         "--topic",
                                         "--until-stdin-eof",
                                         "--version",
                                         "exit status",
                                         "consumer-status",
                                         "dead-letters",
                                         "release",
                                         "skip",
                                         "--wait",
                                         "--force",
                                         "--parked",
                                         "replay",
                                         "--from",
                                         "--since",
                                         "--timeout-ms",
                                         "contracts",
                                         "asyncapi"};
    static const char *const cmds[] = {
        "relay",        "status",          "list",         "tail",
        "mock-cluster", "consumer-status", "dead-letters", "release",
        "skip",         "replay",          "contracts",    "asyncapi"};
    proc *p;

    ck_assert_int_eq(run(p, "help", "--help"), 0);
    for (size_t i = 0; i < sizeof listed / sizeof *listed; i++)
        assert_has(p->out, listed[i]);
    ck_assert_str_eq(slurp(p->err), "");
    ck_assert_int_eq(run(p, "help", "-h"), 0);
    assert_has(p->out, "usage: deliveryevents");
    for (size_t i = 0; i < sizeof cmds / sizeof *cmds; i++) {
        char want[64];
        snprintf(want, sizeof want, "usage: deliveryevents %s", cmds[i]);
        ck_assert_int_eq(run(p, "help", cmds[i], "--help"), 0);
        assert_has(p->out, want);
        ck_assert_str_eq(slurp(p->err), "");
        /* also after other arguments, and as -h */
        ck_assert_int_eq(run(p, "help", cmds[i], "--db", "x", "-h"), 0);
        assert_has(p->out, want);
    }
    /* Without a command: usage on stderr, bad usage. */
    ck_assert_int_eq(run(p, "help", "frobnicate"), 2);
    assert_has(p->err, "unknown command 'frobnicate'");
}
END_TEST

START_TEST(an_option_without_its_value_is_named)
{
    proc *p;

    ck_assert_int_eq(run(p, "novalue", "relay", "--db"), 2);
    assert_has(p->err, "relay: --db needs a value");
    ck_assert(!file_has(p->err, "unknown"));
    ck_assert_int_eq(run(p, "novalue", "relay", "--db", "x", "-b"), 2);
    assert_has(p->err, "relay: -b needs a value");
    ck_assert_int_eq(run(p, "novalue", "relay", "--db", "x", "--stats-ms"), 2);
    assert_has(p->err, "relay: --stats-ms needs a value");
    ck_assert_int_eq(run(p, "novalue", "tail", "-b", "x", "--topic"), 2);
    assert_has(p->err, "tail: --topic needs a value");
    ck_assert_int_eq(run(p, "novalue", "mock-cluster", "--topic"), 2);
    assert_has(p->err, "mock-cluster: --topic needs a value");
    ck_assert_int_eq(run(p, "novalue", "status", "--db"), 2);
    assert_has(p->err, "status: --db needs a value");
    ck_assert_int_eq(run(p, "novalue", "list", "--db", "x", "--limit"), 2);
    assert_has(p->err, "list: --limit needs a value");
    ck_assert_int_eq(run(p, "novalue", "consumer-status", "--db"), 2);
    assert_has(p->err, "consumer-status: --db needs a value");
    ck_assert_int_eq(
        run(p, "novalue", "dead-letters", "--db", "x", "--subject"), 2);
    assert_has(p->err, "dead-letters: --subject needs a value");
    ck_assert_int_eq(run(p, "novalue", "skip", "--db"), 2);
    assert_has(p->err, "skip: --db needs a value");
    ck_assert_int_eq(run(p, "novalue", "dead-letters", "--db", "x", "--bogus"),
                     2);
    assert_has(p->err, "dead-letters: unknown argument '--bogus'");
    ck_assert_int_eq(run(p, "novalue", "relay", "--bogus"), 2);
    assert_has(p->err, "unknown argument '--bogus'");
}
END_TEST

START_TEST(bad_numbers_are_named)
{
    proc *p;

    ck_assert_int_eq(run(p, "num", "relay", "--db", "x", "--stats-ms", "abc"),
                     2);
    assert_has(p->err, "--stats-ms");
    assert_has(p->err, "'abc'");
    ck_assert_int_eq(
        run(p, "num", "relay", "--db", "x", "--stop-timeout-ms", "-5"), 2);
    assert_has(p->err, "'-5'");
    ck_assert_int_eq(run(p, "num", "relay", "--db", "x", "--stats-ms", "10x"),
                     2);
    assert_has(p->err, "'10x'");
    ck_assert_int_eq(
        run(p, "num", "tail", "-b", "x", "--topic", "t", "--print", "abc"), 2);
    assert_has(p->err, "--print");
    assert_has(p->err, "'abc'");
    ck_assert_int_eq(run(p, "num", "mock-cluster", "--brokers", "0"), 2);
    assert_has(p->err, "--brokers");
    assert_has(p->err, "'0'");
    ck_assert_int_eq(run(p, "num", "mock-cluster", "--topic", "t:zero"), 2);
    assert_has(p->err, "'t:zero'");
    ck_assert_int_eq(run(p, "num", "list", "--db", "x", "--limit", "many"), 2);
    assert_has(p->err, "'many'");
    ck_assert_int_eq(run(p, "num", "list", "--db", "x", "--subject", "D-1"), 2);
    assert_has(p->err, "'D-1'");
    ck_assert_int_eq(
        run(p, "num", "dead-letters", "--db", "x", "--limit", "-1"), 2);
    assert_has(p->err, "'-1'");
    ck_assert_int_eq(
        run(p, "num", "dead-letters", "--db", "x", "--subject", "D-1"), 2);
    assert_has(p->err, "'D-1'");
    /* Not echoed: it may be a secret typed with the wrong separator. */
    ck_assert_int_eq(run(p, "num", "relay", "--db", "x", "-X", "novalue"), 2);
    assert_has(p->err, "-X takes key=value");
    ck_assert(!file_has(p->err, "novalue"));
}
END_TEST

/* ---- mock-cluster and tail --------------------------------------------- */

START_TEST(mock_cluster_topic_without_partitions_and_argv_intact)
{
    cluster c = mock_start("plain", "three:3");
    char cmdline[4096], path[64];
    size_t n;
    FILE *f;

    ck_assert_int_eq(partitions(&c, "plain"), 1);
    ck_assert_int_eq(partitions(&c, "three"), 3);
    /* What ps shows is what was typed: argv is not split in place. */
    snprintf(path, sizeof path, "/proc/%d/cmdline", (int)c.p->pid);
    f = fopen(path, "r");
    ck_assert_ptr_nonnull(f);
    n = fread(cmdline, 1, sizeof cmdline - 1, f);
    fclose(f);
    ck_assert_int_gt(n, 0);
    cmdline[n] = '\0';
    for (size_t i = 0; i + 1 < n; i++)
        if (cmdline[i] == '\0')
            cmdline[i] = ' ';
    ck_assert_msg(strstr(cmdline, "--topic three:3") != NULL,
                  "argv was changed: %s", cmdline);
    mock_stop(&c);
}
END_TEST

START_TEST(tail_refuses_a_missing_topic_without_creating_it)
{
    cluster c = mock_start("present", NULL);
    proc *p;

    ck_assert_int_eq(partitions(&c, "absent.events"), 0);
    ck_assert_int_eq(run(p, "tail", "tail", "-b", c.bootstrap, "--topic",
                         "absent.events", "--exit-at-end"),
                     1);
    assert_has(p->err, "'absent.events'");
    assert_has(p->err, "does not exist");
    ck_assert_int_eq(partitions(&c, "absent.events"), 0);
    /* --bootstrap still works, and an empty existing topic is fine. */
    ck_assert_int_eq(run(p, "tail", "tail", "--bootstrap", c.bootstrap,
                         "--topic", "present", "--exit-at-end"),
                     0);
    assert_has(p->out, "tail: 0 records on present");
    mock_stop(&c);
}
END_TEST

/* Two subjects with one id, of two types, on one topic: each is numbered
 * 1, 2, ... of its own, and tail must tell them apart.  Published by
 * relay --once with -b. */
START_TEST(relay_once_then_tail_keys_subjects_on_type_and_id)
{
    cluster c = mock_start("all.events:2", NULL);
    const char *db = tu_path(tu_dir, "svc.db");
    proc *p;

    record(db, 3, "delivery", "X-1");
    record(db, 2, "rider", "X-1");
    ck_assert_int_eq(run(p, "relay", "relay", "--db", db, "-b", c.bootstrap,
                         "-X", "topic.template=all.events", "--once"),
                     0);
    assert_has(p->err, "stopped; 0 events pending");
    /* --drain is the same */
    ck_assert_int_eq(run(p, "relay", "relay", "--db", db, "-b", c.bootstrap,
                         "-X", "topic.template=all.events", "--drain"),
                     0);
    ck_assert_int_eq(run(p, "tail", "tail", "-b", c.bootstrap, "--topic",
                         "all.events", "--from-beginning", "--exit-at-end"),
                     0);
    assert_has(p->out, "5 records on all.events: 5 events of 2 subjects in "
                       "order, 0 duplicates, 0 out of order");
    assert_has(p->out, "delivery/X-1");
    assert_has(p->out, "rider/X-1");
    ck_assert_int_eq(run(p, "tail", "tail", "-b", c.bootstrap, "--topic",
                         "all.events", "--from-beginning", "--exit-at-end",
                         "--print", "1"),
                     0);
    ck_assert_int_eq(strstr(slurp(p->out), "rider/X-1") == NULL ||
                         strstr(slurp(p->out), "delivery/X-1") == NULL,
                     1);
    mock_stop(&c);
}
END_TEST

/* A record shaped like ours but written to attack whoever reads the output:
 * terminal escapes in its type and value, a right-to-left override in its
 * subject id. */
static void produce_hostile(const char *bootstrap, const char *topic)
{
    static const char *const h[][2] = {
        {"ce_subjecttype", "delivery"},
        {"ce_subject", "D-\xe2\x80\xae"
                       "2"},
        {"ce_subjectseq", "1"},
        {"ce_subjectepoch", "1"},
        {"ce_type", "delivery.assigned\x1b]0;pwned\x07"},
        {"ce_time", "2026-12-01T00:00:00Z"},
        {"ce_id", "hostile-1"},
    };
    static const char value[] = "{\"x\":\"\x1b[2J\rALL OK\"}";
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    rd_kafka_headers_t *hs = rd_kafka_headers_new(8);
    char err[256];
    rd_kafka_t *rk;

    ck_assert_int_eq(rd_kafka_conf_set(conf, "bootstrap.servers", bootstrap,
                                       err, sizeof err),
                     RD_KAFKA_CONF_OK);
    rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, err, sizeof err);
    ck_assert_msg(rk != NULL, "%s", err);
    for (size_t i = 0; i < sizeof h / sizeof *h; i++)
        rd_kafka_header_add(hs, h[i][0], -1, h[i][1], -1);
    ck_assert_int_eq(
        rd_kafka_producev(
            rk, RD_KAFKA_V_TOPIC(topic), RD_KAFKA_V_KEY("D-2", 3),
            RD_KAFKA_V_VALUE((void *)(uintptr_t)value, sizeof value - 1),
            RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY), RD_KAFKA_V_HEADERS(hs),
            RD_KAFKA_V_END),
        0);
    ck_assert_int_eq(rd_kafka_flush(rk, 10000), 0);
    rd_kafka_destroy(rk);
}

/* tail reads new records unless told --from-beginning, resumes a group
 * where it committed, writes JSON lines on request, and never passes a
 * record's control characters to the terminal. */
START_TEST(tail_reads_from_the_end_or_a_group_and_escapes_what_it_prints)
{
    cluster c = mock_start("t.events:2", NULL);
    const char *db = tu_path(tu_dir, "svc.db");
    const char *out;
    int lines = 0, ours = 0;
    proc *p;

    record(db, 3, "delivery", "D-1");
    ck_assert_int_eq(run(p, "relay", "relay", "--db", db, "-b", c.bootstrap,
                         "-X", "topic.template=t.events", "--once"),
                     0);
    produce_hostile(c.bootstrap, "t.events");
    /* From the end: nothing that was there before. */
    ck_assert_int_eq(run(p, "tail", "tail", "-b", c.bootstrap, "--topic",
                         "t.events", "--exit-at-end"),
                     0);
    assert_has(p->out, "tail: 0 records on t.events");
    /* From the beginning, escaped. */
    ck_assert_int_eq(run(p, "tail", "tail", "-b", c.bootstrap, "--topic",
                         "t.events", "--from-beginning", "--exit-at-end"),
                     0);
    out = slurp(p->out);
    ck_assert_msg(strchr(out, 0x1b) == NULL && strchr(out, 0x07) == NULL &&
                      strchr(out, '\r') == NULL,
                  "raw control characters in tail's output:\n%s", out);
    assert_has(p->out, "delivery.assigned\\x1b]0;pwned\\x07");
    assert_has(p->out, "\\x1b[2J\\x0dALL OK");
    assert_has(p->out, "delivery/D-\\u{202e}2");
    assert_has(p->out, "4 records on t.events: 4 events of 2 subjects in "
                       "order");
    /* JSON lines: one object per record, the summary on stderr. */
    ck_assert_int_eq(run(p, "tail", "tail", "-b", c.bootstrap, "--topic",
                         "t.events", "--from-beginning", "--exit-at-end",
                         "--json"),
                     0);
    out = slurp(p->out);
    ck_assert(strchr(out, 0x1b) == NULL);
    for (const char *l = out; *l; l = strchr(l, '\n') + 1) {
        json_error_t je;
        json_t *o = json_loadb(l, (size_t)(strchr(l, '\n') - l), 0, &je);
        ck_assert_msg(o != NULL, "not JSON: %.200s (%s)", l, je.text);
        ck_assert_str_eq(json_string_value(json_object_get(o, "status")), "ok");
        if (strcmp(json_string_value(json_object_get(o, "subject_id")),
                   "D-1") == 0) {
            ours++;
            ck_assert(json_is_object(json_object_get(o, "data")));
            ck_assert_int_eq(json_integer_value(json_object_get(o, "seq")),
                             ours);
        }
        json_decref(o);
        lines++;
    }
    ck_assert_int_eq(lines, 4);
    ck_assert_int_eq(ours, 3);
    assert_has(p->err, "4 records on t.events");
    /* A group resumes where it committed.  (The 2.0.2 mock keeps a member
     * that left until its session times out, and a new member's join
     * waits for it: a short session keeps that wait short.) */
    ck_assert_int_eq(run(p, "tail", "tail", "-b", c.bootstrap, "--topic",
                         "t.events", "--group", "g1", "--from-beginning",
                         "--exit-at-end", "-X", "session.timeout.ms=6000"),
                     0);
    assert_has(p->out, "tail: 4 records on t.events");
    ck_assert_int_eq(run(p, "tail", "tail", "-b", c.bootstrap, "--topic",
                         "t.events", "--group", "g1", "--exit-at-end", "-X",
                         "session.timeout.ms=6000"),
                     0);
    assert_has(p->out, "tail: 0 records on t.events");
    mock_stop(&c);
}
END_TEST

/* What the databases hold is printed escaped: a row written by hand with
 * terminal escapes and a right-to-left override in its subject id cannot
 * reach the terminal raw, as text or as JSON. */
START_TEST(reports_escape_what_the_database_holds)
{
    const char *db = tu_path(tu_dir, "svc.db");
    const char *out;
    sqlite3 *h;
    proc *p;

    record(db, 1, "delivery", "D-1");
    h = tu_open(db);
    tu_exec(h, "INSERT INTO de_outbox(event_id, subject_type, subject_id, "
               "action, version, occurred_at_ms, recorded_at_ms, payload) "
               "VALUES ('hand-1', 'delivery', 'D-' || char(27) || "
               "']0;pwned' || char(7) || char(8238) || 'x', 'assigned', 0, "
               "1, 1, '{}')");
    sqlite3_close(h);
    ck_assert_int_eq(run(p, "list", "list", "--db", db), 0);
    out = slurp(p->out);
    ck_assert_msg(strchr(out, 0x1b) == NULL && strchr(out, 0x07) == NULL,
                  "raw control characters:\n%s", out);
    assert_has(p->out, "D-\\x1b]0;pwned\\x07\\u{202e}x");
    ck_assert_int_eq(run(p, "list", "list", "--db", db, "--json"), 0);
    out = slurp(p->out);
    ck_assert(strchr(out, 0x1b) == NULL);
    for (const char *l = out; *l; l = strchr(l, '\n') + 1) {
        json_t *o = json_loadb(l, (size_t)(strchr(l, '\n') - l), 0, NULL);
        ck_assert_msg(o != NULL, "not JSON: %.200s", l);
        json_decref(o);
    }
    ck_assert_int_eq(run(p, "status", "status", "--db", db), 0);
    ck_assert(strchr(slurp(p->out), 0x1b) == NULL);
}
END_TEST

#define PLANTED "PLANTED-"

static void assert_no_secret(const proc *p)
{
    ck_assert_msg(!file_has(p->out, PLANTED) && !file_has(p->err, PLANTED),
                  "a secret was printed:\n%s\n%s", slurp(p->out),
                  slurp(p->err));
}

/* Secrets given on the command line, in a --config file, through the
 * environment or in a file (key=@FILE) never reach an output, and those
 * on the command line leave it once parsed (/proc/<pid>/cmdline, which
 * every local user can read). */
START_TEST(secrets_never_reach_an_output_or_the_process_list)
{
    cluster c = mock_start("s.events", NULL);
    const char *db = tu_path(tu_dir, "svc.db");
    char cfg[4200], pw[4200], cmdline_path[64], cmdline[8192];
    FILE *f;
    proc *p;
    int fd;
    ssize_t n;

    snprintf(cfg, sizeof cfg, "%s", tu_path(tu_dir, "bad.conf"));
    snprintf(pw, sizeof pw, "%s", tu_path(tu_dir, "password"));
    record(db, 1, "delivery", "D-1");
    /* Refused: the key is named, the value never shown. */
    ck_assert_int_eq(run(p, "relay", "relay", "--db", db, "-b", c.bootstrap,
                         "-X", "sasl.oauthbearer.client.secret=" PLANTED "1",
                         "--once"),
                     2);
    assert_has(p->err, "sasl.oauthbearer.client.secret");
    assert_no_secret(p);
    ck_assert_int_eq(run(p, "relay", "relay", "--db", db, "-b", c.bootstrap,
                         "-X", "sasl.password:" PLANTED "2", "--once"),
                     2);
    assert_has(p->err, "-X takes key=value");
    assert_no_secret(p);
    ck_assert_ptr_nonnull(f = fopen(cfg, "w"));
    fputs("# the service's secrets\nsasl.password " PLANTED "3\n", f);
    fclose(f);
    ck_assert_int_eq(
        run(p, "relay", "relay", "--db", db, "--config", cfg, "--once"), 2);
    assert_has(p->err, "bad.conf:2: not key=value");
    assert_no_secret(p);
    setenv("DELIVERYEVENTS_X_SASL_OAUTHBEARER_CLIENT_SECRET", PLANTED "4", 1);
    ck_assert_int_eq(
        run(p, "relay", "relay", "--db", db, "-b", c.bootstrap, "--once"), 2);
    assert_has(p->err, "DELIVERYEVENTS_X_SASL_OAUTHBEARER_CLIENT_SECRET");
    assert_no_secret(p);
    unsetenv("DELIVERYEVENTS_X_SASL_OAUTHBEARER_CLIENT_SECRET");
    ck_assert_int_eq(run(p, "relay", "relay", "--db", db, "-b", c.bootstrap,
                         "-X", "sasl.password=@/nonexistent/pw", "--once"),
                     2);
    assert_has(p->err, "cannot read sasl.password's value from "
                       "/nonexistent/pw");
    /* The library's own secret: a bad one named, never shown. */
    ck_assert_int_eq(run(p, "relay", "relay", "--db", db, "-b", c.bootstrap,
                         "-X", "event.hmac.key=k1:" PLANTED "short", "--once"),
                     2);
    assert_has(p->err, "event.hmac.key (a secret: its value is never shown)");
    assert_no_secret(p);

    /* Accepted ones: from a file, the environment and the command line. */
    ck_assert_ptr_nonnull(f = fopen(pw, "w"));
    fputs(PLANTED "5\n", f);
    fclose(f);
    setenv("DELIVERYEVENTS_X_SASL_USERNAME", PLANTED "6", 1);
    {
        char x1[4300];
        snprintf(x1, sizeof x1, "sasl.password=@%s", pw);
        p = start("relay", "relay", "--db", db, "-b", c.bootstrap, "-X", x1,
                  "-X", "ssl.key.password=" PLANTED "7", "-X",
                  "event.hmac.key=k1:" PLANTED "8-0123456789abcdef0123456789",
                  "-X", "topic.template=s.events", "--stats-ms", "50",
                  (const char *)NULL);
    }
    unsetenv("DELIVERYEVENTS_X_SASL_USERNAME");
    ck_assert_msg(
        tu_wait_for(file_has(p->out, "published=1") || exited(p), 20000),
        "no event published: %s", slurp(p->err));
    ck_assert(!exited(p));
    snprintf(cmdline_path, sizeof cmdline_path, "/proc/%d/cmdline",
             (int)p->pid);
    fd = open(cmdline_path, O_RDONLY);
    ck_assert_int_ge(fd, 0);
    n = read(fd, cmdline, sizeof cmdline - 1);
    close(fd);
    ck_assert_int_gt(n, 0);
    for (ssize_t i = 0; i < n; i++)
        if (cmdline[i] == '\0')
            cmdline[i] = ' ';
    cmdline[n] = '\0';
    ck_assert_msg(strstr(cmdline, PLANTED) == NULL, "in the process list: %s",
                  cmdline);
    ck_assert_msg(strstr(cmdline, "ssl.key.password=") != NULL, "%s", cmdline);
    kill(p->pid, SIGTERM);
    ck_assert_int_eq(finish(p, 30000), 0);
    assert_no_secret(p);
    mock_stop(&c);
}
END_TEST

/* ---- relay: stopping against an unreachable broker --------------------- */

static proc *relay_unreachable(const char *db, const char *once,
                               const char *stop_ms)
{
    proc *p;

    record(db, 5, "delivery", "D-1");
    p = start("relay", "relay", "--db", db, "-b", "127.0.0.1:1", once,
              "--stats-ms", "50", "--stop-timeout-ms", stop_ms,
              (const char *)NULL);
    /* The first stats line: the relay runs and catches signals. */
    ck_assert_msg(tu_wait_for(file_has(p->out, "state=") || exited(p), 20000),
                  "no stats line: %s", slurp(p->err));
    ck_assert(!exited(p));
    return p;
}

START_TEST(relay_once_stops_on_sigterm_within_its_timeout)
{
    const char *db = tu_path(tu_dir, "svc.db");
    proc *p = relay_unreachable(db, "--once", "1000");
    int64_t t0;

    /* Not a wait for an outcome: --once must not exit by itself while
     * nothing can be published to 127.0.0.1:1. */
    usleep(300 * 1000);
    ck_assert(!exited(p));
    /* It says that no broker can be reached (librdkafka's statistics,
     * every second). */
    ck_assert_msg(tu_wait_for(file_has(p->out, "brokers_up=0 (no broker "
                                               "reachable)"),
                              10000),
                  "no 'no broker reachable' in the stats lines");
    t0 = tu_now_ms();
    kill(p->pid, SIGTERM);
    ck_assert_int_eq(finish(p, 15000), 1);
    ck_assert_msg(tu_now_ms() - t0 < 1000 + 2500,
                  "took %lld ms to stop with --stop-timeout-ms 1000",
                  (long long)(tu_now_ms() - t0));
    assert_has(p->err, "stopped; 5 events pending");
    /* The periodic line carries every counter of de_relay_stats. */
    static const char *const fields[] = {"state=",
                                         "active=",
                                         "brokers_up=",
                                         "published=",
                                         "pending=",
                                         "held_back=",
                                         "blocked_subjects=",
                                         "lag_ms=",
                                         "position=",
                                         "read=",
                                         "deleted=",
                                         "skipped=",
                                         "producer_restarts=",
                                         "forgotten=",
                                         "subjects_cached=",
                                         "last_error_ms=",
                                         "last_error=\""};
    for (size_t i = 0; i < sizeof fields / sizeof *fields; i++)
        assert_has(p->out, fields[i]);
}
END_TEST

START_TEST(relay_second_signal_stops_at_once)
{
    const char *db = tu_path(tu_dir, "svc.db");
    proc *p = relay_unreachable(db, "--drain", "600000");
    int64_t t0;

    kill(p->pid, SIGTERM);
    ck_assert(
        tu_wait_for(file_has(p->err, "signal again to stop at once"), 10000));
    ck_assert(!exited(p));
    t0 = tu_now_ms();
    kill(p->pid, SIGINT);
    ck_assert_int_eq(finish(p, 15000), 1);
    ck_assert_msg(tu_now_ms() - t0 < 3000,
                  "took %lld ms after the second "
                  "signal",
                  (long long)(tu_now_ms() - t0));
    assert_has(p->err, "stopped; 5 events pending");
}
END_TEST

/* Everything published, but the final checkpoint cannot be written (the
 * state file's write lock is held here from before the last events): the
 * relay prints why and exits 1, and does not count what it published as
 * pending. */
START_TEST(relay_says_when_its_final_checkpoint_failed)
{
    cluster c = mock_start("delivery.events", NULL);
    const char *db = tu_path(tu_dir, "svc.db");
    char path[4200];
    sqlite3 *state;
    proc *p;

    /* The first event registers the topic: a state write of its own. */
    record(db, 1, "delivery", "D-1");
    p = start("relay", "relay", "--db", db, "-b", c.bootstrap, "--stats-ms",
              "50", "-X", "relay.lease.timeout.ms=60000", (const char *)NULL);
    ck_assert_msg(
        tu_wait_for(file_has(p->out, "published=1") || exited(p), 20000),
        "not published: %s", slurp(p->err));
    snprintf(path, sizeof path, "%s-relay", db);
    state = tu_open(path);
    sqlite3_busy_timeout(state, 5000);
    tu_exec(state, "BEGIN IMMEDIATE");
    record(db, 3, "delivery", "D-1");
    ck_assert_msg(
        tu_wait_for(file_has(p->out, "published=4") || exited(p), 20000),
        "not published: %s", slurp(p->err));
    kill(p->pid, SIGTERM);
    ck_assert_int_eq(finish(p, 30000), 1);
    tu_exec(state, "ROLLBACK");
    sqlite3_close(state);
    assert_has(p->err, "deliveryevents: relay: de_relay_stop: everything "
                       "committed before the stop was published, but the "
                       "final checkpoint failed: relay state '");
    ck_assert_msg(!file_has(p->err, "events pending"), "%s", slurp(p->err));
    mock_stop(&c);
}
END_TEST

START_TEST(relay_standby_says_so_and_when_it_takes_over)
{
    cluster c = mock_start("delivery.events", NULL);
    const char *db = tu_path(tu_dir, "svc.db");
    proc *a, *b;

    record(db, 2, "delivery", "D-1");
    a = start("relay-a", "relay", "--db", db, "-b", c.bootstrap, "-X",
              "relay.lease.timeout.ms=1000", "--stats-ms", "50",
              (const char *)NULL);
    ck_assert(tu_wait_for(file_has(a->out, "state=active"), 20000));
    assert_has(a->err, "relay: active: publishing");
    /* status beside a live relay: the lease held by a, read-only. */
    {
        proc *s;
        json_t *j, *lease;
        ck_assert_int_eq(run(s, "status", "status", "--db", db, "--json"), 0);
        j = json_of(s->out);
        lease = json_object_get(j, "lease");
        ck_assert(json_is_object(lease));
        ck_assert_int_eq(jint(lease, "pid"), a->pid);
        ck_assert(json_is_false(json_object_get(lease, "released")));
        ck_assert_int_ge(jint(lease, "heartbeat_age_ms"), 0);
        ck_assert_int_lt(jint(lease, "heartbeat_age_ms"), 10000);
        json_decref(j);
    }
    b = start("relay-b", "relay", "--db", db, "-b", c.bootstrap, "-X",
              "relay.lease.timeout.ms=1000", (const char *)NULL);
    ck_assert_msg(tu_wait_for(file_has(b->err, "standing by"), 20000),
                  "no standby line: %s", slurp(b->err));
    {
        char pid[64];
        snprintf(pid, sizeof pid, "pid %d", (int)a->pid);
        assert_has(b->err, pid);
    }
    ck_assert(!file_has(b->err, "relay: active"));
    kill(a->pid, SIGTERM);
    ck_assert_int_eq(finish(a, 20000), 0);
    ck_assert_msg(
        tu_wait_for(file_has(b->err, "relay: active: publishing"), 20000),
        "the standby never said it took over: %s", slurp(b->err));
    kill(b->pid, SIGTERM);
    ck_assert_int_eq(finish(b, 20000), 0);
    assert_has(b->err, "stopped; 0 events pending");
    mock_stop(&c);
}
END_TEST

/* ---- status and list ----------------------------------------------------- */

START_TEST(status_counts_pending_and_changes_nothing)
{
    const char *db = tu_path(tu_dir, "svc.db");
    char db_wal[4200], db_shm[4200], relay[4200];
    size_t n0, n1;
    char *before, *after;
    json_t *j;
    proc *p;

    record(db, 7, "delivery", "D-1");
    snprintf(db_wal, sizeof db_wal, "%s-wal", db);
    snprintf(db_shm, sizeof db_shm, "%s-shm", db);
    snprintf(relay, sizeof relay, "%s-relay", db);
    ck_assert(!exists(db_wal) && !exists(db_shm) && !exists(relay));
    before = contents(db, &n0);

    ck_assert_int_eq(run(p, "status", "status", "--db", db), 0);
    assert_has(p->out, "pending:         7 ");
    assert_has(p->out, "outbox rows:     7 retained");
    assert_has(p->out, "no relay has run");
    ck_assert_int_eq(run(p, "status", "status", "--db", db, "--json"), 0);
    j = json_of(p->out);
    ck_assert_int_eq(jint(j, "pending"), 7);
    ck_assert_int_eq(jint(j, "outbox_rows"), 7);
    ck_assert_int_eq(jint(j, "cursor"), 0);
    ck_assert(json_is_false(json_object_get(j, "relay_state_found")));
    ck_assert_int_eq(jint(json_object_get(j, "schema_version"), "outbox"), 2);
    ck_assert_int_ge(jint(j, "oldest_pending_age_ms"), 0);
    json_decref(j);
    ck_assert_int_eq(run(p, "list", "list", "--db", db, "--pending"), 0);
    ck_assert_int_eq(run(p, "list", "list", "--db", db, "--json"), 0);

    /* Read-only: byte-identical, and no file created beside it. */
    after = contents(db, &n1);
    ck_assert_int_eq(n0, n1);
    ck_assert(memcmp(before, after, n0) == 0);
    ck_assert_msg(!exists(db_wal) && !exists(db_shm) && !exists(relay),
                  "status or list created a -wal, -shm or -relay file");
    free(before);
    free(after);

    /* A missing file is named, and not created. */
    ck_assert_int_eq(
        run(p, "status", "status", "--db", tu_path(tu_dir, "missing.db")), 1);
    assert_has(p->err, "missing.db");
    ck_assert(!exists(tu_path(tu_dir, "missing.db")));
    ck_assert_int_eq(
        run(p, "list", "list", "--db", tu_path(tu_dir, "missing.db")), 1);
    assert_has(p->err, "missing.db");
    ck_assert_int_eq(run(p, "status", "status", "--db", tu_dir), 1);
    assert_has(p->err, "is not a file");
    /* A database without an outbox. */
    {
        sqlite3 *plain = tu_open(tu_path(tu_dir, "plain.db"));
        tu_exec(plain, "CREATE TABLE t(x)");
        ck_assert_int_eq(sqlite3_close(plain), SQLITE_OK);
    }
    ck_assert_int_eq(
        run(p, "status", "status", "--db", tu_path(tu_dir, "plain.db")), 1);
    assert_has(p->err, "has no outbox");
}
END_TEST

START_TEST(status_and_list_after_a_relay)
{
    cluster c = mock_start("delivery.events:3", NULL);
    const char *db = tu_path(tu_dir, "svc.db");
    char relay[4200];
    size_t n0, n1, r0, r1;
    char *before, *after, *rbefore, *rafter;
    sqlite3 *sdb;
    json_t *j, *lease, *blocked;
    proc *p;
    int lines = 0;

    record(db, 4, "delivery", "D-1");
    ck_assert_int_eq(
        run(p, "relay", "relay", "--db", db, "-b", c.bootstrap, "--once"), 0);
    record(db, 2, "delivery", "D-2");
    record(db, 1, "delivery", "D-1");
    snprintf(relay, sizeof relay, "%s-relay", db);

    /* One event held back behind a refused one, as the relay records
     * it (Kafka cannot be made to refuse here). */
    sdb = tu_open(relay);
    tu_exec(sdb, "INSERT INTO de_relay_parked(position, subject_type, "
                 "subject_id, seq, error, since_ms, epoch) VALUES (4, "
                 "'delivery', 'D-1', 4, 'Broker: Topic authorization "
                 "failed', 1000, 0)");
    ck_assert_int_eq(sqlite3_close(sdb), SQLITE_OK);
    before = contents(db, &n0);
    rbefore = contents(relay, &r0);

    ck_assert_int_eq(run(p, "status", "status", "--db", db, "--json"), 0);
    j = json_of(p->out);
    ck_assert_int_eq(jint(j, "cursor"), 4);
    ck_assert_int_eq(jint(j, "pending"), 3 + 1);
    ck_assert_int_eq(jint(j, "held_back"), 1);
    ck_assert_int_eq(jint(j, "blocked_subjects"), 1);
    ck_assert_int_gt(jint(j, "cursor_recorded_at_ms"), 0);
    ck_assert_int_eq(jint(json_object_get(j, "schema_version"), "relay_state"),
                     4);
    lease = json_object_get(j, "lease");
    ck_assert(json_is_object(lease));
    ck_assert(json_is_true(json_object_get(lease, "released")));
    ck_assert_int_gt(jint(lease, "pid"), 0);
    blocked = json_object_get(j, "blocked");
    ck_assert_int_eq(json_array_size(blocked), 1);
    ck_assert_str_eq(
        json_string_value(json_object_get(json_array_get(blocked, 0), "error")),
        "Broker: Topic authorization failed");
    json_decref(j);
    ck_assert_int_eq(run(p, "status", "status", "--db", db), 0);
    assert_has(p->out, "pending:         4 ");
    assert_has(p->out, "delivery/D-1: 1 events from position 4");
    assert_has(p->out, "Topic authorization failed");

    ck_assert_int_eq(run(p, "list", "list", "--db", db), 0);
    assert_has(p->out, "published");
    assert_has(p->out, "held-back: Broker: Topic authorization failed");
    ck_assert_int_eq(run(p, "list", "list", "--db", db, "--pending", "--json"),
                     0);
    for (const char *s = slurp(p->out); (s = strchr(s, '\n')) != NULL; s++)
        lines++;
    ck_assert_int_eq(lines, 4);
    assert_has(p->out, "\"status\":\"pending\"");
    ck_assert(!file_has(p->out, "\"published\""));
    ck_assert_int_eq(run(p, "list", "list", "--db", db, "--blocked"), 0);
    assert_has(p->out, "\n4 ");
    ck_assert_int_eq(run(p, "list", "list", "--db", db, "--subject",
                         "delivery:D-2", "--json"),
                     0);
    lines = 0;
    for (const char *s = slurp(p->out); (s = strchr(s, '\n')) != NULL; s++)
        lines++;
    ck_assert_int_eq(lines, 2);
    ck_assert(!file_has(p->out, "\"D-1\""));
    ck_assert_int_eq(
        run(p, "list", "list", "--db", db, "--limit", "2", "--json"), 0);
    assert_has(p->out, "\"position\":2,");
    ck_assert(!file_has(p->out, "\"position\":3,"));

    /* A relay state of another outbox (--state) is called out. */
    record(tu_path(tu_dir, "other.db"), 1, "delivery", "D-9");
    ck_assert_int_eq(run(p, "status", "status", "--db",
                         tu_path(tu_dir, "other.db"), "--state", relay,
                         "--json"),
                     0);
    j = json_of(p->out);
    ck_assert(json_is_false(json_object_get(j, "relay_state_matches")));
    json_decref(j);
    ck_assert_int_eq(run(p, "status", "status", "--db",
                         tu_path(tu_dir, "other.db"), "--state", relay),
                     0);
    assert_has(p->out, "belongs to another outbox");
    ck_assert_int_eq(run(p, "status", "status", "--db", db, "--json"), 0);
    j = json_of(p->out);
    ck_assert(json_is_true(json_object_get(j, "relay_state_matches")));
    json_decref(j);

    after = contents(db, &n1);
    rafter = contents(relay, &r1);
    ck_assert(n0 == n1 && memcmp(before, after, n0) == 0);
    ck_assert(r0 == r1 && memcmp(rbefore, rafter, r0) == 0);
    free(before);
    free(after);
    free(rbefore);
    free(rafter);
    mock_stop(&c);
}
END_TEST

/* ---- relay --metrics, scraped with curl -----------------------------------
 */

/* GETs url with curl; the body goes to body (size bytes), the return value
 * is the HTTP status (0 when curl could not connect). */
static int http_get(const char *url, char *body, size_t size)
{
    char cmd[512], all[65536];
    size_t n = 0, r;
    FILE *f;
    char *nl;
    int code = 0;

    snprintf(cmd, sizeof cmd, "curl -s --max-time 5 -w '\\n%%{http_code}' '%s'",
             url);
    f = popen(cmd, "r");
    ck_assert_msg(f != NULL, "cannot run curl");
    while (n < sizeof all - 1 &&
           (r = fread(all + n, 1, sizeof all - 1 - n, f)) > 0)
        n += r;
    all[n] = '\0';
    ck_assert_msg(pclose(f) != 127 * 256, "curl is not installed");
    nl = strrchr(all, '\n');
    if (nl != NULL) {
        code = atoi(nl + 1);
        *nl = '\0';
    }
    snprintf(body, size, "%s", all);
    return code;
}

/* The value of a metric line "name{...} value" in a scrape; -1 if absent. */
static double metric(const char *text, const char *name)
{
    char key[128];
    const char *p;

    snprintf(key, sizeof key, "\n%s{", name);
    p = strstr(text, key);
    if (p == NULL || (p = strstr(p, "} ")) == NULL)
        return -1;
    return atof(p + 2);
}

static int scrape(const char *base, const char *path, char *body, size_t size)
{
    char url[256];

    snprintf(url, sizeof url, "%s%s", base, path);
    return http_get(url, body, size);
}

/* A monitoring system's view of a drain: /metrics shows the pending
 * events, /healthz turns 503 while the broker does not answer and nothing
 * is published, and /metrics shows pending falling to zero once it does. */
START_TEST(relay_metrics_scraped_during_a_drain)
{
    cluster c = mock_start("delivery.events", NULL);
    const char *db = tu_path(tu_dir, "svc.db");
    static char body[65536];
    char base[128];
    const char *line;
    unsigned port = 0;
    proc *p;

    record(db, 0, "delivery", "D-1");
    p = start("relay", "relay", "--db", db, "-b", c.bootstrap, "--metrics",
              "127.0.0.1:0", "--stall-ms", "1500", (const char *)NULL);
    ck_assert_msg(tu_wait_for((line = strstr(slurp(p->err), "metrics on "
                                                            "http://127.0.0."
                                                            "1:")) != NULL ||
                                  exited(p),
                              20000),
                  "no metrics address: %s", slurp(p->err));
    ck_assert_msg(sscanf(line, "metrics on http://127.0.0.1:%u/", &port) == 1,
                  "%s", line);
    snprintf(base, sizeof base, "http://127.0.0.1:%u", port);
    ck_assert(tu_wait_for(scrape(base, "/healthz", body, sizeof body) == 200 &&
                              strstr(body, "ok: active"),
                          20000));
    ck_assert_int_eq(scrape(base, "/nothing", body, sizeof body), 404);
    /* One event through, so that the relay knows its topic. */
    record(db, 1, "delivery", "D-1");
    ck_assert_msg(
        tu_wait_for(scrape(base, "/metrics", body, sizeof body) == 200 &&
                        metric(body, "deliveryevents_relay_published_total") ==
                            1,
                    20000),
        "%s", body);

    /* The broker stops answering; events come in. */
    ck_assert_int_eq(kill(c.p->pid, SIGSTOP), 0);
    record(db, 40, "delivery", "D-1");
    ck_assert_msg(
        tu_wait_for(scrape(base, "/metrics", body, sizeof body) == 200 &&
                        metric(body, "deliveryevents_relay_pending_events") ==
                            40,
                    20000),
        "%s", body);
    ck_assert(strstr(body, "# TYPE deliveryevents_relay_published_total "
                           "counter\n"));
    ck_assert_msg(
        tu_wait_for(scrape(base, "/healthz", body, sizeof body) == 503, 20000),
        "%s", body);
    ck_assert_msg(strstr(body, "stalled: 40 events pending"), "%s", body);

    /* It answers again: pending falls to zero, health returns. */
    ck_assert_int_eq(kill(c.p->pid, SIGCONT), 0);
    ck_assert_msg(
        tu_wait_for(
            scrape(base, "/metrics", body, sizeof body) == 200 &&
                metric(body, "deliveryevents_relay_pending_events") == 0 &&
                metric(body, "deliveryevents_relay_published_total") == 41,
            30000),
        "%s", body);
    ck_assert(
        tu_wait_for(scrape(base, "/healthz", body, sizeof body) == 200, 20000));
    kill(p->pid, SIGTERM);
    ck_assert_int_eq(finish(p, 20000), 0);
    mock_stop(&c);
}
END_TEST

/* ---- the consumer's database ------------------------------------------- */

/* A consumer's database as de_consumer_open leaves it (no Kafka is
 * reached: the consumer is closed before its first poll), with what a
 * consumer would have written: three subjects remembered, delivery:D-2
 * parked behind a failed event and one waiting behind it, delivery:D-1
 * with a dead letter that was skipped, and a record that was not ours.
 * Closed cleanly, so that no -wal or -shm file is left. */
static void quiet(void *ctx, int level, const char *message)
{
    (void)ctx;
    (void)level;
    (void)message;
}

/* Opens and closes a consumer on path: creates or migrates its tables
 * (to this library's schema, with de_consumer_request), as a service
 * would. */
static sqlite3 *consumer_opened(const char *path)
{
    sqlite3 *db = tu_open(path);
    de_conf *conf = de_conf_new();
    de_consumer *con = NULL;

    tu_ok(de_conf_set(conf, "bootstrap.servers", "127.0.0.1:9"));
    tu_ok(de_conf_set(conf, "group.id", "tool-test"));
    de_conf_set_log_cb(conf, quiet, NULL); /* nothing listens on port 9 */
    tu_ok(de_consumer_open(db, conf, &con));
    de_conf_destroy(conf);
    de_consumer_close(con);
    return db;
}

/* The library's migration of an older consumer database to this one. */
static void request_table(const char *path)
{
    ck_assert_int_eq(sqlite3_close(consumer_opened(path)), SQLITE_OK);
}

/* A consumer database as a libdeliveryevents before 1.0 left it: schema
 * 3, no request table (nor what schema 5 added). */
static void older_consumer_db(const char *path)
{
    sqlite3 *db = tu_open(path);

    tu_exec(db, "DROP TABLE de_consumer_request; DROP TABLE de_inbox_id; "
                "DROP TABLE de_inbox_source; ALTER TABLE de_inbox DROP COLUMN "
                "owner; ALTER TABLE "
                "de_dead_letter DROP COLUMN parks; ALTER TABLE de_dead_letter "
                "DROP COLUMN record_key; ALTER TABLE de_dead_letter DROP "
                "COLUMN record_headers; ALTER TABLE de_dead_letter DROP "
                "COLUMN record_value; ALTER TABLE de_dead_letter DROP COLUMN "
                "record_timestamp_ms; UPDATE de_consumer_meta SET value = 3 "
                "WHERE key = 'schema_version'");
    ck_assert_int_eq(sqlite3_close(db), SQLITE_OK);
}

static void consumer_db(const char *path)
{
    sqlite3 *db = consumer_opened(path);

    tu_exec(db,
            "INSERT INTO de_inbox(subject_type, subject_id, last_seq, parked, "
            "updated_ms, last_event_id, epoch) VALUES ('delivery', 'D-1', 5, "
            "0, 1000, 'e-1-5', 0), ('delivery', 'D-2', 2, 1, 2000, "
            "'e-2-2', 1), ('rider', 'R-1', 1, 0, 3000, 'e-r-1', 0);"
            "INSERT INTO de_dead_letter(kind, state, topic, partition, offset, "
            "subject_type, subject_id, seq, event_id, action, type, source, "
            "occurred_at_ms, payload, error, attempts, parked_ms, epoch) "
            "VALUES ('failed', 'skipped', 'delivery.events', 0, 10, "
            "'delivery', 'D-1', 3, 'e-1-3', 'assigned', 't', 's', 1, '{}', "
            "'no such rider', 3, 1000, 0), ('failed', 'parked', "
            "'delivery.events', 1, 20, 'delivery', 'D-2', 3, 'e-2-3', "
            "'picked_up', 't', 's', 1, '{}', 'constraint failed', 3, "
            "strftime('%s','now') * 1000 - 60000, 1), ('waiting', 'parked', "
            "'delivery.events', 1, 21, 'delivery', 'D-2', 4, 'e-2-4', "
            "'delivered', 't', 's', 1, '{}', 'waiting behind a parked event', "
            "0, strftime('%s','now') * 1000 - 50000, 1);"
            "INSERT INTO de_dead_letter(kind, state, topic, partition, offset, "
            "payload, error, attempts, parked_ms) VALUES ('foreign', "
            "'foreign', 'rider.events', 2, 7, 'junk', 'no ce_id header', 0, "
            "1500)");
    ck_assert_int_eq(sqlite3_close(db), SQLITE_OK);
}

static int lines_of(const char *path)
{
    int lines = 0;

    for (const char *s = slurp(path); (s = strchr(s, '\n')) != NULL; s++)
        lines++;
    return lines;
}

START_TEST(consumer_status_and_dead_letters_change_nothing)
{
    const char *db = tu_path(tu_dir, "consumer.db");
    char db_wal[4200], db_shm[4200];
    size_t n0, n1;
    char *before, *after;
    json_t *j, *by, *parked;
    const char *out;
    proc *p;

    consumer_db(db);
    older_consumer_db(db);
    snprintf(db_wal, sizeof db_wal, "%s-wal", db);
    snprintf(db_shm, sizeof db_shm, "%s-shm", db);
    ck_assert(!exists(db_wal) && !exists(db_shm));
    before = contents(db, &n0);

    ck_assert_int_eq(run(p, "cstatus", "consumer-status", "--db", db, "--json"),
                     0);
    j = json_of(p->out);
    ck_assert_int_eq(jint(j, "schema_version"), 3);
    ck_assert_int_eq(jint(j, "subjects"), 3);
    ck_assert_int_eq(jint(j, "parked_subjects"), 1);
    ck_assert_int_eq(jint(j, "dead_letters"), 4);
    ck_assert_int_eq(jint(j, "dead_letters_parked"), 2);
    ck_assert_int_eq(jint(j, "oldest_dead_letter_at_ms"), 1000);
    ck_assert_int_ge(jint(j, "oldest_parked_age_ms"), 59000);
    ck_assert(json_is_null(json_object_get(j, "requests_queued")));
    ck_assert_int_eq(jint(json_object_get(j, "file_bytes"), "database"),
                     (json_int_t)n0);
    by = json_object_get(j, "dead_letters_by_kind");
    ck_assert_int_eq(json_array_size(by),
                     4); /* failed twice, waiting, foreign */
    parked = json_object_get(j, "parked");
    ck_assert_int_eq(json_array_size(parked), 1);
    ck_assert_str_eq(json_string_value(json_object_get(
                         json_array_get(parked, 0), "subject_id")),
                     "D-2");
    ck_assert_int_eq(jint(json_array_get(parked, 0), "parked_events"), 2);
    ck_assert_str_eq(
        json_string_value(json_object_get(json_array_get(parked, 0), "error")),
        "constraint failed");
    json_decref(j);
    ck_assert_int_eq(run(p, "cstatus", "consumer-status", "--db", db), 0);
    assert_has(p->out, "schema version:  consumer 3 (no request table");
    assert_has(p->out, "subjects:        3 remembered, 1 parked");
    assert_has(p->out, "dead letters:    4 (2 still parked;");
    assert_has(p->out, "parked delivery:D-2: 2 events since ");
    assert_has(p->out, "first failed: constraint failed");

    ck_assert_int_eq(run(p, "dl", "dead-letters", "--db", db), 0);
    ck_assert_int_eq(lines_of(p->out), 5); /* a heading and four rows */
    assert_has(p->out, "delivery:D-2");
    assert_has(p->out, "1/3 ");
    assert_has(p->out, "rider.events[2]@7");
    out = slurp(p->out); /* oldest first */
    ck_assert(strstr(out, "e-1-3") != NULL &&
              strstr(out, "e-1-3") < strstr(out, "e-2-4"));
    ck_assert_int_eq(run(p, "dl", "dead-letters", "--db", db, "--json"), 0);
    ck_assert_int_eq(lines_of(p->out), 4);
    assert_has(p->out, "\"state\":\"skipped\"");
    assert_has(p->out, "\"event_id\":\"e-2-3\"");
    ck_assert_int_eq(run(p, "dl", "dead-letters", "--db", db, "--subject",
                         "delivery:D-2", "--json"),
                     0);
    ck_assert_int_eq(lines_of(p->out), 2);
    ck_assert(!file_has(p->out, "\"D-1\""));
    j = json_loads(slurp(p->out), JSON_DISABLE_EOF_CHECK, NULL); /* line 1 */
    ck_assert_ptr_nonnull(j);
    ck_assert_int_eq(jint(j, "epoch"), 1);
    ck_assert_int_eq(jint(j, "seq"), 3);
    ck_assert_int_eq(jint(j, "attempts"), 3);
    json_decref(j);
    ck_assert_int_eq(
        run(p, "dl", "dead-letters", "--db", db, "--parked", "--json"), 0);
    ck_assert_int_eq(lines_of(p->out), 2);
    ck_assert(!file_has(p->out, "skipped"));
    ck_assert_int_eq(
        run(p, "dl", "dead-letters", "--db", db, "--limit", "1", "--json"), 0);
    ck_assert_int_eq(lines_of(p->out), 1);
    assert_has(p->out, "e-1-3");

    /* Read-only: byte-identical, and no file created beside it. */
    after = contents(db, &n1);
    ck_assert(n0 == n1 && memcmp(before, after, n0) == 0);
    ck_assert_msg(!exists(db_wal) && !exists(db_shm),
                  "consumer-status or dead-letters created a -wal or -shm");
    free(before);
    free(after);

    /* A missing file, a directory, a database of no consumer: named. */
    ck_assert_int_eq(run(p, "cstatus", "consumer-status", "--db",
                         tu_path(tu_dir, "missing.db")),
                     1);
    assert_has(p->err, "missing.db");
    ck_assert(!exists(tu_path(tu_dir, "missing.db")));
    ck_assert_int_eq(
        run(p, "dl", "dead-letters", "--db", tu_path(tu_dir, "missing.db")), 1);
    assert_has(p->err, "missing.db");
    ck_assert(!exists(tu_path(tu_dir, "missing.db")));
    ck_assert_int_eq(run(p, "cstatus", "consumer-status", "--db", tu_dir), 1);
    assert_has(p->err, "is not a file");
    record(tu_path(tu_dir, "svc.db"), 1, "delivery", "D-1");
    ck_assert_int_eq(
        run(p, "cstatus", "consumer-status", "--db", tu_path(tu_dir, "svc.db")),
        1);
    assert_has(p->err, "svc.db' has no consumer tables");
    ck_assert_int_eq(
        run(p, "dl", "dead-letters", "--db", tu_path(tu_dir, "svc.db")), 1);
    assert_has(p->err, "has no consumer tables");
}
END_TEST

/* The request table of consumer schema 4 (libdeliveryevents 1.0), as the
 * contract with lib/consumer.c has it: what a consumer of 1.0 adds. */

static int64_t wall_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int64_t db_int(const char *path, const char *sql)
{
    sqlite3 *db = tu_open_shared(path);
    int64_t v = tu_query_int(db, sql);

    ck_assert_int_eq(sqlite3_close(db), SQLITE_OK);
    return v;
}

START_TEST(release_and_skip_refuse_what_they_cannot_ask)
{
    const char *db = tu_path(tu_dir, "consumer.db");
    static const char *const bad[] = {"delivery", ":D-2", "delivery:", ":"};
    proc *p;

    consumer_db(db);
    older_consumer_db(db);
    /* A consumer older than 1.0: no request table, and none created. */
    ck_assert_int_eq(run(p, "rel", "release", "--db", db, "delivery:D-2"), 1);
    assert_has(p->err, "consumer.db': this consumer database has no request "
                       "table: its consumer runs a libdeliveryevents older "
                       "than 1.0; upgrade it, or call de_consumer_release in "
                       "the service");
    ck_assert_int_eq(run(p, "skip", "skip", "--db", db, "delivery:D-2"), 1);
    assert_has(p->err, "call de_consumer_skip in the service");
    ck_assert_int_eq(db_int(db, "SELECT count(*) FROM sqlite_master WHERE "
                                "name = 'de_consumer_request'"),
                     0);

    /* Bad usage names the bad value. */
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        char want[64];
        ck_assert_int_eq(run(p, "rel", "release", "--db", db, bad[i]), 2);
        snprintf(want, sizeof want, "got '%s'", bad[i]);
        assert_has(p->err, want);
        assert_has(p->err, "TYPE:ID");
    }
    ck_assert_int_eq(run(p, "rel", "release", "--db", db), 2);
    assert_has(p->err, "needs the subject, TYPE:ID");
    ck_assert_int_eq(run(p, "rel", "skip", "delivery:D-2"), 2);
    assert_has(p->err, "skip: needs --db PATH");
    ck_assert_int_eq(
        run(p, "rel", "release", "--db", db, "delivery:D-2", "rider:R-1"), 2);
    assert_has(p->err, "'rider:R-1' is a second");
    ck_assert_int_eq(
        run(p, "rel", "release", "--db", db, "delivery:D-2", "--wait", "soon"),
        2);
    assert_has(p->err, "--wait");
    assert_has(p->err, "'soon'");
    ck_assert_int_eq(run(p, "rel", "release", "--db", db, "--wait"), 2);
    assert_has(p->err, "release: --wait needs a value");

    /* A missing file is named and not created; a database of no consumer
     * is refused. */
    ck_assert_int_eq(run(p, "rel", "release", "--db",
                         tu_path(tu_dir, "missing.db"), "delivery:D-2"),
                     1);
    assert_has(p->err, "missing.db");
    ck_assert(!exists(tu_path(tu_dir, "missing.db")));
    record(tu_path(tu_dir, "svc.db"), 1, "delivery", "D-1");
    ck_assert_int_eq(run(p, "rel", "release", "--db", tu_path(tu_dir, "svc.db"),
                         "delivery:D-1"),
                     1);
    assert_has(p->err, "has no consumer tables");

    /* With the table (a consumer of 1.0): a subject not parked is refused
     * -- one applied with only a skipped dead letter, one never seen --
     * and nothing is queued; --force asks anyway. */
    request_table(db);
    ck_assert_int_eq(run(p, "rel", "release", "--db", db, "delivery:D-1"), 1);
    assert_has(p->err, "delivery:D-1 is not parked in");
    assert_has(p->err, "--force");
    ck_assert_int_eq(run(p, "rel", "skip", "--db", db, "rider:R-9"), 1);
    assert_has(p->err, "rider:R-9 is not parked");
    ck_assert_int_eq(db_int(db, "SELECT count(*) FROM de_consumer_request"), 0);
    ck_assert_int_eq(run(p, "rel", "release", "--db", db, "--force",
                         "delivery:D-1", "--wait", "0"),
                     0);
    ck_assert_int_eq(db_int(db, "SELECT count(*) FROM de_consumer_request "
                                "WHERE subject_id = 'D-1'"),
                     1);
}
END_TEST

START_TEST(release_and_skip_queue_a_request_and_wait_for_its_result)
{
    const char *db = tu_path(tu_dir, "consumer.db");
    char want[4400];
    int64_t t0, t1;
    sqlite3 *sdb;
    proc *p;

    consumer_db(db);
    request_table(db);

    /* --wait 0: queued, and back at once. */
    t0 = wall_ms();
    ck_assert_int_eq(
        run(p, "skip", "skip", "--db", db, "delivery:D-2", "--wait", "0"), 0);
    t1 = wall_ms();
    ck_assert_int_lt(t1 - t0, 5000);
    snprintf(want, sizeof want,
             "queued: the consumer of %s has not taken the request yet; it "
             "stays queued",
             db);
    assert_has(p->out, want);
    sdb = tu_open_shared(db);
    ck_assert_int_eq(tu_query_int(sdb, "SELECT count(*) FROM "
                                       "de_consumer_request"),
                     1);
    ck_assert_str_eq(tu_query_text(sdb, "SELECT subject_type || '|' || "
                                        "subject_id || '|' || action || '|' "
                                        "|| typeof(done_at_ms) || '|' || "
                                        "typeof(result) FROM "
                                        "de_consumer_request"),
                     "delivery|D-2|skip|null|null");
    ck_assert_int_ge(
        tu_query_int(sdb, "SELECT requested_at_ms FROM de_consumer_request"),
        t0 - 1000);
    ck_assert_int_le(
        tu_query_int(sdb, "SELECT requested_at_ms FROM de_consumer_request"),
        t1 + 1000);

    /* Waiting in vain: exit 1, and the request stays queued. */
    t0 = tu_now_ms();
    ck_assert_int_eq(
        run(p, "rel", "release", "--db", db, "delivery:D-2", "--wait", "300"),
        1);
    ck_assert_int_ge(tu_now_ms() - t0, 300);
    assert_has(p->err, "release: queued: the consumer of ");
    ck_assert_int_eq(tu_query_int(sdb, "SELECT count(*) FROM "
                                       "de_consumer_request WHERE action = "
                                       "'release' AND done_at_ms IS NULL"),
                     1);

    /* This process plays the consumer: it takes the new request and sets
     * its result; the waiting release prints it and exits 0. */
    p = start("rel", "release", "--db", db, "delivery:D-2", (const char *)NULL);
    ck_assert_msg(tu_wait_for(tu_query_int(sdb, "SELECT count(*) FROM "
                                                "de_consumer_request") == 3 ||
                                  exited(p),
                              20000),
                  "release queued nothing: %s", slurp(p->err));
    ck_assert(!exited(p));
    tu_exec(sdb, "UPDATE de_consumer_request SET done_at_ms = 1, result = "
                 "'released: 2 events applied' WHERE id = (SELECT max(id) "
                 "FROM de_consumer_request)");
    ck_assert_int_eq(finish(p, 20000), 0);
    assert_has(p->out, "release delivery:D-2: released: 2 events applied");
    ck_assert_str_eq(slurp(p->err), "");
    /* The earlier ones are untouched: still queued for the consumer. */
    ck_assert_int_eq(tu_query_int(sdb, "SELECT count(*) FROM "
                                       "de_consumer_request WHERE done_at_ms "
                                       "IS NULL"),
                     2);
    ck_assert_int_eq(sqlite3_close(sdb), SQLITE_OK);

    /* consumer-status counts the queued requests. */
    ck_assert_int_eq(run(p, "cstatus", "consumer-status", "--db", db, "--json"),
                     0);
    {
        json_t *j = json_of(p->out);
        ck_assert_int_eq(jint(j, "schema_version"), 5);
        ck_assert_int_eq(jint(j, "requests_queued"), 2);
        json_decref(j);
    }
}
END_TEST

/* ---- replay ---------------------------------------------------------- */

/* What Kafka holds: every record of a topic, in partition and offset
 * order, with the headers a replay must repeat. */
typedef struct krec {
    char id[64], seq[24], epoch[24], subject[300];
    int32_t partition;
    int64_t offset;
} krec;

typedef struct krecs {
    krec r[256];
    int n;
} krecs;

static void collect(void *ctx, const rd_kafka_message_t *m, int32_t np)
{
    krecs *k = ctx;
    krec *r = &k->r[k->n];
    const char *e = tu_header(m, "ce_subjectepoch");

    (void)np;
    ck_assert_int_lt(k->n, 256);
    snprintf(r->id, sizeof r->id, "%s", tu_header(m, "ce_id"));
    snprintf(r->seq, sizeof r->seq, "%s", tu_header(m, "ce_subjectseq"));
    snprintf(r->epoch, sizeof r->epoch, "%s", e ? e : "-");
    snprintf(r->subject, sizeof r->subject, "%.*s", (int)m->key_len,
             (const char *)m->key);
    r->partition = m->partition;
    r->offset = m->offset;
    k->n++;
}

static void read_back(const cluster *c, const char *topic, krecs *k)
{
    tu_cluster tc;

    memset(&tc, 0, sizeof tc);
    snprintf(tc.bootstrap, sizeof tc.bootstrap, "%s", c->bootstrap);
    memset(k, 0, sizeof *k);
    tu_read_topic(&tc, topic, collect, k);
}

/* The records in now that were not in before: each must repeat, exactly,
 * the ce_id, ce_subjectepoch and ce_subjectseq and the partition the
 * relay first published that event with (and, with subject_only, be of
 * that subject).  Returns how many there are. */
static int assert_republished(const krecs *before, const krecs *now,
                              const char *subject_only)
{
    int added = 0;

    for (int i = 0; i < now->n; i++) {
        const krec *r = &now->r[i], *orig = NULL;
        bool old = false;
        for (int j = 0; j < before->n; j++)
            if (before->r[j].partition == r->partition &&
                before->r[j].offset == r->offset)
                old = true;
        if (old)
            continue;
        added++;
        /* The relay's first copy of the event: the lowest offset of its
         * id. */
        for (int j = 0; j < now->n && orig == NULL; j++)
            if (strcmp(now->r[j].id, r->id) == 0 && j != i)
                orig = &now->r[j];
        ck_assert_msg(orig != NULL, "a republished %s was never published",
                      r->id);
        ck_assert_str_eq(r->seq, orig->seq);
        ck_assert_str_eq(r->epoch, orig->epoch);
        ck_assert_str_eq(r->subject, orig->subject);
        ck_assert_int_eq(r->partition, orig->partition);
        if (subject_only != NULL)
            ck_assert_str_eq(r->subject, subject_only);
    }
    return added;
}

static int applied_count;

static de_err count_applied(sqlite3 *cdb, const de_event_view *ev, void *ctx)
{
    (void)ctx;
    (void)ev;
    applied_count++;
    return sqlite3_exec(cdb, "INSERT INTO applied VALUES (1)", NULL, NULL,
                        NULL) == SQLITE_OK
               ? DE_OK
               : DE_ERR_DB;
}

static bool polled(de_consumer *con)
{
    tu_ok(de_consumer_poll(con, 100, NULL));
    return true;
}

/* Runs deliveryevents replay on db against cluster c with the rest of the
 * arguments; its exit status. */
#define replay(p, c, ...)                                                      \
    run(p, "replay", "replay", "--db", db, "-b", (c).bootstrap, __VA_ARGS__)

/* A de_consumer (the library) applying delivery.events into its own
 * database, polled until cond holds. */
#define consume_until(con, cond)                                               \
    ck_assert_msg(tu_wait_for(polled(con) && (cond), 60000),                   \
                  "the consumer never got there")

/* Replays republish events as they were -- ids, numbers, partitions --
 * and signed (event.hmac.key, here from the environment) like the relay's
 * records: a consumer that checks signatures takes them for duplicates. */
#define REPLAY_KEY "k1:0123456789abcdef0123456789abcdef"

START_TEST(replay_republishes_with_the_original_numbers)
{
    cluster c = mock_start("delivery.events:2", NULL);
    const char *db = tu_path(tu_dir, "svc.db");
    krecs first, now, again;
    de_consumer_stats cs;
    de_consumer *con = NULL;
    de_conf *conf = de_conf_new();
    sqlite3 *cdb;
    char from[32];
    proc *p;

    record(db, 3, "delivery", "D-1");
    record(db, 2, "delivery", "D-2");
    record(db, 2, "delivery", "D-1"); /* positions 6 and 7 */
    /* Signed, relay and replays alike (the consumer checks them all). */
    setenv("DELIVERYEVENTS_X_EVENT_HMAC_KEY", REPLAY_KEY, 1);
    ck_assert_int_eq(run(p, "relay", "relay", "--db", db, "-b", c.bootstrap,
                         "-X", "outbox.retention.ms=3600000", "--once"),
                     0);
    read_back(&c, "delivery.events", &first);
    ck_assert_int_eq(first.n, 7);

    /* A consumer applies all seven. */
    cdb = tu_open(tu_path(tu_dir, "consumer.db"));
    tu_exec(cdb, "CREATE TABLE applied(x)");
    tu_ok(de_conf_set(conf, "bootstrap.servers", c.bootstrap));
    tu_ok(de_conf_set(conf, "group.id", "replay-test"));
    tu_ok(de_conf_set(conf, "event.hmac.key", REPLAY_KEY));
    tu_ok(de_conf_set(conf, "auto.offset.reset", "earliest"));
    de_conf_set_log_cb(conf, quiet, NULL);
    tu_ok(de_consumer_open(cdb, conf, &con));
    de_conf_destroy(conf);
    tu_ok(de_consumer_on(con, "delivery", NULL, count_applied, NULL));
    consume_until(con, applied_count == 7);

    /* By subject: D-1's five events, again, as they were. */
    ck_assert_int_eq(replay(p, c, "--subject", "delivery:D-1"), 0);
    assert_has(p->out, "republished 5 events");
    assert_has(p->out, "positions 1..7");
    read_back(&c, "delivery.events", &now);
    ck_assert_int_eq(assert_republished(&first, &now, "D-1"), 5);

    /* By position: 4 (D-2's first) and on. */
    snprintf(from, sizeof from, "%d", 4);
    ck_assert_int_eq(replay(p, c, "--from", from), 0);
    assert_has(p->out, "republished 4 events");
    assert_has(p->out, "positions 4..7");
    read_back(&c, "delivery.events", &again);
    ck_assert_int_eq(assert_republished(&now, &again, NULL), 4);

    /* By time: everything recorded in the last hour. */
    ck_assert_int_eq(replay(p, c, "--since", "1h", "--timeout-ms", "30000"), 0);
    assert_has(p->out, "republished 7 events");
    read_back(&c, "delivery.events", &now);
    ck_assert_int_eq(assert_republished(&again, &now, NULL), 7);

    /* The consumer takes all 16 for duplicates and applies none again. */
    consume_until(con, (de_consumer_stats_get(con, &cs), cs.duplicates >= 16));
    tu_ok(de_consumer_stats_get(con, &cs));
    ck_assert_uint_eq(cs.duplicates, 16);
    ck_assert_uint_eq(cs.applied, 7);
    ck_assert_uint_eq(cs.conflicts, 0);
    ck_assert_uint_eq(cs.foreign, 0);
    ck_assert_int_eq(applied_count, 7);
    ck_assert_int_eq(tu_query_int(cdb, "SELECT count(*) FROM applied"), 7);

    /* An event not published yet is the relay's: refused, named. */
    record(db, 1, "delivery", "D-3");
    ck_assert_int_eq(replay(p, c, "--from", "8"), 1);
    assert_has(p->err, "position 8 is not published yet");
    ck_assert_int_eq(replay(p, c, "--subject", "delivery:D-3"), 1);
    assert_has(p->err, "position 8 is not published yet");
    /* A selection with published and unpublished events republishes the
     * published ones and leaves the rest to the relay. */
    ck_assert_int_eq(replay(p, c, "--from", "7"), 0);
    assert_has(p->out, "republished 1 events");
    assert_has(p->out, "1 not published yet, left to the relay");
    read_back(&c, "delivery.events", &again);
    ck_assert_int_eq(again.n, now.n + 1);
    unsetenv("DELIVERYEVENTS_X_EVENT_HMAC_KEY");
    tu_ok(de_consumer_close(con));
    ck_assert_int_eq(sqlite3_close(cdb), SQLITE_OK);
    mock_stop(&c);
}
END_TEST

/* Retained rows without recorded numbers, rows no longer retained: both
 * refused, naming the position, with nothing written to Kafka. */
START_TEST(replay_refuses_what_it_cannot_republish_as_it_was)
{
    cluster c = mock_start("delivery.events", NULL);
    const char *db = tu_path(tu_dir, "svc.db");
    krecs before, after;
    proc *p;

    /* Published without retention: rows 1 and 2 deleted, row 3 (at the
     * cursor) kept, with no numbers. */
    record(db, 3, "delivery", "D-1");
    p = start("relay", "relay", "--db", db, "-b", c.bootstrap, "--stats-ms",
              "50", "-X", "relay.cleanup.interval.ms=10", (const char *)NULL);
    ck_assert_msg(tu_wait_for(file_has(p->out, "deleted=2 "), 30000),
                  "the relay never deleted rows 1 and 2: %s", slurp(p->err));
    kill(p->pid, SIGTERM);
    ck_assert_int_eq(finish(p, 20000), 0);
    /* Then with retention: rows 4 and 5, with their numbers. */
    record(db, 2, "delivery", "D-1");
    ck_assert_int_eq(run(p, "relay", "relay", "--db", db, "-b", c.bootstrap,
                         "-X", "outbox.retention.ms=3600000", "--once"),
                     0);
    read_back(&c, "delivery.events", &before);
    ck_assert_int_eq(before.n, 5);

    ck_assert_int_eq(replay(p, c, "--from", "3"), 1);
    assert_has(p->err, "DE_ERR_STATE");
    assert_has(p->err, "position 3 ");
    assert_has(p->err, "has no recorded numbers");
    ck_assert_int_eq(replay(p, c, "--subject", "delivery:D-1"), 1);
    assert_has(p->err, "position 3 ");
    ck_assert_int_eq(replay(p, c, "--from", "1"), 1);
    assert_has(p->err, "position 1 is no longer retained");
    ck_assert_int_eq(replay(p, c, "--since", "1d"), 1);
    assert_has(p->err, "no longer all retained");
    assert_has(p->err, "position 2");
    ck_assert_int_eq(replay(p, c, "--subject", "delivery:D-9"), 1);
    assert_has(p->err, "no events of delivery D-9 retained");
    read_back(&c, "delivery.events", &after);
    ck_assert_int_eq(after.n, before.n); /* nothing written */

    /* What has its numbers still goes. */
    ck_assert_int_eq(replay(p, c, "--from", "4"), 0);
    assert_has(p->out, "republished 2 events");
    read_back(&c, "delivery.events", &after);
    ck_assert_int_eq(assert_republished(&before, &after, "D-1"), 2);

    /* The relay's state stayed the relay's: its cursor and lease. */
    ck_assert_int_eq(run(p, "status", "status", "--db", db, "--json"), 0);
    {
        json_t *j = json_of(p->out);
        ck_assert_int_eq(jint(j, "cursor"), 5);
        ck_assert(json_is_true(
            json_object_get(json_object_get(j, "lease"), "released")));
        json_decref(j);
    }
    mock_stop(&c);
}
END_TEST

START_TEST(replay_names_bad_arguments)
{
    const char *db = tu_path(tu_dir, "svc.db");
    static const struct {
        const char *opt, *value, *named;
    } bad[] = {
        {"--from", "-5", "'-5'"},
        {"--from", "0", "'0'"},
        {"--from", "12x", "'12x'"},
        {"--since", "yesterday", "'yesterday'"},
        {"--since", "2026-13-01T00:00:00Z", "'2026-13-01T00:00:00Z'"},
        {"--since", "2026-11-25T11:00:00", "'2026-11-25T11:00:00'"},
        {"--subject", "D-1", "'D-1'"},
        {"--subject", "delivery:", "'delivery:'"},
        {"--subject", "Delivery:D-1", "'Delivery'"},
    };
    proc *p;

    record(db, 1, "delivery", "D-1");
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        ck_assert_int_eq(run(p, "replay", "replay", "--db", db, "-b",
                             "127.0.0.1:1", bad[i].opt, bad[i].value),
                         2);
        assert_has(p->err, bad[i].named);
    }
    ck_assert_int_eq(run(p, "replay", "replay", "--db", db, "-b", "127.0.0.1:1",
                         "--from", "1", "--since", "1h"),
                     2);
    assert_has(p->err, "'--since' is a second");
    ck_assert_int_eq(
        run(p, "replay", "replay", "--db", db, "-b", "127.0.0.1:1"), 2);
    assert_has(p->err, "needs what to replay");
    ck_assert_int_eq(run(p, "replay", "replay", "--db", db, "--from", "1"), 2);
    assert_has(p->err, "needs -b SERVERS");
    ck_assert_int_eq(run(p, "replay", "replay", "--from", "1"), 2);
    assert_has(p->err, "needs --db PATH");
    ck_assert_int_eq(
        run(p, "replay", "replay", "--db", db, "-b", "127.0.0.1:1", "--from"),
        2);
    assert_has(p->err, "replay: --from needs a value");
    ck_assert_int_eq(run(p, "replay", "replay", "--db",
                         tu_path(tu_dir, "missing.db"), "-b", "127.0.0.1:1",
                         "--from", "1"),
                     1);
    assert_has(p->err, "missing.db");
    ck_assert(!exists(tu_path(tu_dir, "missing.db")));
    /* No relay has run: nothing was published, nothing to replay. */
    ck_assert_int_eq(run(p, "replay", "replay", "--db", db, "-b", "127.0.0.1:1",
                         "--from", "1"),
                     1);
    assert_has(p->err, "does not exist: no relay of this outbox has published");
}
END_TEST

/* ---- contracts and the AsyncAPI catalog ------------------------------ */

/* A database with contracts: delivery.assigned v1 ($id, a $ref) and v2,
 * rider.went_online v1; topics named by a template. */
static void contracts_db(const char *path)
{
    sqlite3 *db = tu_open(path);
    de_conf *conf = de_conf_new();
    de_outbox *ob = NULL;

    tu_ok(de_conf_set(conf, "topic.template", "svc.{subject_type}.events"));
    tu_ok(de_outbox_open(db, conf, &ob));
    de_conf_destroy(conf);
    tu_ok(de_outbox_define(
        ob, "delivery", "assigned", 1,
        "{\"$schema\":\"https://json-schema.org/draft/2020-12/schema\","
        "\"$id\":\"https://schemas.example.com/delivery/assigned/v1.json\","
        "\"description\":\"A rider was assigned.\",\"type\":\"object\","
        "\"properties\":{\"rider_id\":{\"type\":\"string\"},"
        "\"items\":{\"type\":\"array\",\"items\":{\"$ref\":\"#/$defs/li"
        "ne%20item\"}}},\"required\":[\"rider_id\"],"
        "\"$defs\":{\"line item\":{\"type\":\"object\",\"properties\":{"
        "\"sku\":{\"type\":\"string\"}},\"required\":[\"sku\"]}}}"));
    tu_ok(
        de_outbox_define(ob, "delivery", "assigned", 2,
                         "{\"type\":\"object\",\"properties\":{\"rider_id\":"
                         "{\"type\":\"string\"},\"zone\":{\"type\":"
                         "\"string\"}},\"required\":[\"rider_id\",\"zone\"]}"));
    tu_ok(de_outbox_define(ob, "rider", "went_online", 1,
                           "{\"type\":\"object\",\"properties\":{\"zone\":"
                           "{\"enum\":[\"mapo\",\"gangnam\"]}}}"));
    de_outbox_close(ob);
    ck_assert_int_eq(sqlite3_close(db), SQLITE_OK);
}

START_TEST(contracts_lists_every_contract_and_version)
{
    const char *db = tu_path(tu_dir, "svc.db");
    const char *empty = tu_path(tu_dir, "empty.db");
    size_t n0, n1;
    char *before, *after;
    json_t *j, *types, *vs;
    proc *p;

    contracts_db(db);
    before = contents(db, &n0);
    ck_assert_int_eq(run(p, "contracts", "contracts", "--db", db), 0);
    assert_has(p->out, "delivery.assigned (2 versions)\n  v1  defined ");
    assert_has(p->out,
               "  https://schemas.example.com/delivery/assigned/v1.json\n"
               "      rider_id*, items\n  v2  defined ");
    assert_has(p->out, "      rider_id*, zone*\nrider.went_online (1 version)");
    ck_assert_int_eq(run(p, "contracts", "contracts", "--db", db, "--json"), 0);
    j = json_of(p->out);
    types = json_object_get(j, "contracts");
    ck_assert_int_eq(json_array_size(types), 2);
    vs = json_object_get(json_array_get(types, 0), "versions");
    ck_assert_int_eq(json_array_size(vs), 2);
    ck_assert_str_eq(
        json_string_value(json_object_get(json_array_get(vs, 0), "dataschema")),
        "https://schemas.example.com/delivery/assigned/v1.json");
    ck_assert(
        json_is_null(json_object_get(json_array_get(vs, 1), "dataschema")));
    ck_assert_int_eq(jint(json_array_get(vs, 1), "version"), 2);
    ck_assert(json_is_object(json_object_get(
        json_object_get(json_array_get(vs, 1), "schema"), "properties")));
    json_decref(j);
    after = contents(db, &n1);
    ck_assert(n0 == n1 && memcmp(before, after, n0) == 0);
    free(before);
    free(after);

    record(empty, 1, "delivery", "D-1");
    ck_assert_int_eq(run(p, "contracts", "contracts", "--db", empty), 0);
    assert_has(p->out, "no contracts defined in ");
    ck_assert_int_eq(
        run(p, "contracts", "contracts", "--db", tu_path(tu_dir, "nope.db")),
        1);
    assert_has(p->err, "nope.db");
}
END_TEST

/* o[k1][k2]...: the member at the end of a path of keys (NULL-ended). */
static json_t *dig(json_t *o, ...)
{
    const char *k;
    va_list ap;

    va_start(ap, o);
    while (o != NULL && (k = va_arg(ap, const char *)) != NULL)
        o = json_object_get(o, k);
    va_end(ap);
    return o;
}

/* Where @asyncapi/parser is installed for the tests (build/, not the
 * repository); "" when node or npm is missing. */
static const char *asyncapi_parser(void)
{
    static char dir[4200];
    char cmd[9000], mark[4300];

    if (system("command -v node >/dev/null 2>&1 && "
               "command -v npm >/dev/null 2>&1") != 0)
        return "";
    ck_assert_ptr_nonnull(getcwd(dir, sizeof dir - 64));
    strcat(dir, "/build/asyncapi-parser");
    snprintf(mark, sizeof mark, "%s/node_modules/@asyncapi/parser/package.json",
             dir);
    if (!exists(mark)) {
        snprintf(cmd, sizeof cmd,
                 "mkdir -p '%s' && npm install --no-audit --no-fund "
                 "--loglevel=error --prefix '%s' @asyncapi/parser@3 "
                 ">'%s/npm.log' 2>&1",
                 dir, dir, dir);
        ck_assert_msg(system(cmd) == 0,
                      "npm install @asyncapi/parser failed; see %s/npm.log",
                      dir);
    }
    return dir;
}

/* The document is what AsyncAPI tooling accepts: @asyncapi/parser reads
 * it without an error, and finds a channel per topic (topic.template), a
 * message per event type and version, each with its payload schema (the
 * contract's $defs resolved), its CloudEvents headers and the key. */
START_TEST(asyncapi_document_passes_the_asyncapi_parser)
{
    const char *db = tu_path(tu_dir, "svc.db");
    const char *parser;
    char cmd[13000], parsed[4200];
    json_t *doc, *ch, *msg, *j, *m;
    proc *p;
    int rc;

    contracts_db(db);
    ck_assert_int_eq(run(p, "asyncapi", "asyncapi", "--db", db), 0);
    doc = json_of(p->out);
    ck_assert_str_eq(json_string_value(json_object_get(doc, "asyncapi")),
                     "3.0.0");
    ch = json_object_get(json_object_get(doc, "channels"),
                         "svc.delivery.events");
    ck_assert_str_eq(json_string_value(json_object_get(ch, "address")),
                     "svc.delivery.events");
    ck_assert_int_eq(json_object_size(json_object_get(ch, "messages")), 2);
    msg = json_object_get(
        json_object_get(json_object_get(doc, "components"), "messages"),
        "delivery.assigned.v1");
    ck_assert_str_eq(json_string_value(dig(msg, "headers", "properties",
                                           "ce_dataschema", "const", NULL)),
                     "https://schemas.example.com/delivery/assigned/v1.json");
    /* The library's additionalProperties default, written out. */
    ck_assert(json_is_false(json_object_get(json_object_get(msg, "payload"),
                                            "additionalProperties")));
    json_decref(doc);
    ck_assert_int_eq(run(p, "asyncapi", "asyncapi", "--db", db, "--json"), 2);
    assert_has(p->err, "unknown argument '--json'");
    ck_assert_int_eq(run(p, "asyncapi", "asyncapi", "--db", db), 0);

    parser = asyncapi_parser();
    if (parser[0] == '\0') {
        ck_assert_msg(getenv("DE_REQUIRE_ASYNCAPI") == NULL,
                      "DE_REQUIRE_ASYNCAPI is set but node or npm is missing");
        fprintf(stderr, "SKIPPED: asyncapi_document_passes_the_asyncapi_parser"
                        ": the @asyncapi/parser check needs node and npm\n");
        return;
    }
    snprintf(parsed, sizeof parsed, "%s/parsed.json", tu_dir);
    snprintf(cmd, sizeof cmd,
             "NODE_PATH='%s/node_modules' node tests/util/asyncapi_check.cjs "
             "'%s' >'%s' 2>'%s.err'",
             parser, p->out, parsed, parsed);
    rc = system(cmd);
    snprintf(cmd, sizeof cmd, "%s.err", parsed);
    ck_assert_msg(rc == 0, "@asyncapi/parser refused the document:\n%s",
                  slurp(cmd));
    j = json_of(parsed);
    ch = json_object_get(json_object_get(j, "channels"), "svc.rider.events");
    ck_assert_str_eq(json_string_value(json_object_get(ch, "address")),
                     "svc.rider.events");
    m = json_object_get(json_object_get(j, "messages"), "delivery.assigned.v1");
    ck_assert_msg(m != NULL, "no delivery.assigned.v1 in %s", slurp(parsed));
    /* The $ref into $defs resolved to the line item's schema. */
    ck_assert_str_eq(
        json_string_value(json_array_get(
            dig(m, "payload", "properties", "items", "items", "required", NULL),
            0)),
        "sku");
    ck_assert_str_eq(
        json_string_value(json_object_get(json_object_get(m, "key"), "type")),
        "string");
    ck_assert_int_eq(json_array_size(json_object_get(m, "headers")), 15);
    ck_assert_int_eq(json_object_size(json_object_get(j, "messages")), 3);
    json_decref(j);
}
END_TEST

static Suite *tool_suite(void)
{
    Suite *s = suite_create("tool");
    TCase *usage = tcase_create("usage");
    TCase *kafka = tcase_create("kafka");
    TCase *relay = tcase_create("relay");
    TCase *status = tcase_create("status"), *tc;

    tcase_add_checked_fixture(usage, setup, teardown);
    /* Each test runs the tool dozens of times: Check's default of 4 s is
     * too short on a busy machine. */
    tcase_set_timeout(usage, 60);
    tcase_add_test(usage, help_for_the_tool_and_every_command);
    tcase_add_test(usage, an_option_without_its_value_is_named);
    tcase_add_test(usage, bad_numbers_are_named);
    tcase_add_test(usage, replay_names_bad_arguments);
    suite_add_tcase(s, usage);

    tcase_add_checked_fixture(kafka, setup, teardown);
    tcase_set_timeout(kafka, 60);
    tcase_add_test(kafka,
                   mock_cluster_topic_without_partitions_and_argv_intact);
    tcase_add_test(kafka, tail_refuses_a_missing_topic_without_creating_it);
    tcase_add_test(kafka, relay_once_then_tail_keys_subjects_on_type_and_id);
    tcase_add_test(
        kafka, tail_reads_from_the_end_or_a_group_and_escapes_what_it_prints);
    tcase_add_test(kafka, secrets_never_reach_an_output_or_the_process_list);
    suite_add_tcase(s, kafka);

    tcase_add_checked_fixture(relay, setup, teardown);
    tcase_set_timeout(relay, 60);
    tcase_add_test(relay, relay_once_stops_on_sigterm_within_its_timeout);
    tcase_add_test(relay, relay_second_signal_stops_at_once);
    tcase_add_test(relay, relay_says_when_its_final_checkpoint_failed);
    tcase_add_test(relay, relay_standby_says_so_and_when_it_takes_over);
    tcase_add_test(relay, relay_metrics_scraped_during_a_drain);
    tcase_add_test(relay, replay_republishes_with_the_original_numbers);
    tcase_add_test(relay, replay_refuses_what_it_cannot_republish_as_it_was);
    suite_add_tcase(s, relay);

    tcase_add_checked_fixture(status, setup, teardown);
    tcase_set_timeout(status, 60);
    tcase_add_test(status, status_counts_pending_and_changes_nothing);
    tcase_add_test(status, reports_escape_what_the_database_holds);
    tcase_add_test(status, status_and_list_after_a_relay);
    tcase_add_test(status, consumer_status_and_dead_letters_change_nothing);
    tcase_add_test(status, release_and_skip_refuse_what_they_cannot_ask);
    tcase_add_test(status,
                   release_and_skip_queue_a_request_and_wait_for_its_result);
    suite_add_tcase(s, status);

    tc = tcase_create("contracts");
    tcase_add_checked_fixture(tc, setup, teardown);
    /* The first run installs @asyncapi/parser with npm. */
    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, contracts_lists_every_contract_and_version);
    tcase_add_test(tc, asyncapi_document_passes_the_asyncapi_parser);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    return tu_run(tool_suite()) ? EXIT_FAILURE : EXIT_SUCCESS;
}

/* SPDX-License-Identifier: MIT */
/*
 * check_durability.c -- the guarantees that must survive what process
 * crashes do not show: power loss and restored backups.
 *
 *  - power_loss_at_random_points: the service and its relay (in-process,
 *    or a sidecar process) run on SQLite through a layer that remembers
 *    every write not yet synced (tests/util/powerloss.c).  At a random
 *    operation the whole process group is killed and every unsynced write
 *    of the host database and of the relay's state file is discarded; the
 *    next round restarts on what is left.  At the end an independent
 *    reading of the topics is compared with the ledger the database kept
 *    (written in the same transactions as the events): nothing durable
 *    lost, nothing published whose transaction is gone, no number reused,
 *    no gap, duplicates bounded; and de_consumer applies each event once.
 *  - restore drills: the database and the state file restored from older
 *    backups, together and alone: numbering continues above what Kafka
 *    holds, or the relay refuses and says what to do.
 *  - stop keeps its word.
 */
#include "kafka.h"
#include "powerloss.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define SOURCE "/test/durability"

static char self_exe[4096];

/* A relay configuration for the children (no Check there). */
static de_conf *child_conf(const char *bootstrap, const char *prefix)
{
    de_conf *conf = de_conf_new();
    char tmpl[200];

    snprintf(tmpl, sizeof tmpl, "%s{subject_type}.events", prefix);
    if (de_conf_set(conf, "bootstrap.servers", bootstrap) != DE_OK ||
        de_conf_set(conf, "topic.template", tmpl) != DE_OK ||
        de_conf_set(conf, "event.source", SOURCE) != DE_OK ||
        de_conf_set(conf, "relay.lease.timeout.ms", "300") != DE_OK ||
        de_conf_set(conf, "relay.checkpoint.interval.ms", "30") != DE_OK ||
        de_conf_set(conf, "relay.cleanup.interval.ms", "20") != DE_OK ||
        de_conf_set(conf, "relay.poll.interval.ms", "10") != DE_OK ||
        de_conf_set(conf, "relay.max.inflight", "200") != DE_OK ||
        de_conf_set(conf, "linger.ms", "2") != DE_OK) {
        fprintf(stderr, "child configuration: %s\n", de_errmsg());
        exit(10);
    }
    de_conf_set_log_cb(conf, tu_log, NULL);
    return conf;
}

/* ---- the children ------------------------------------------------------ */

/* --pl-service DIR CTL BOOTSTRAP PREFIX INPROC SEED SYNC EVENTS */
static int service_main(char **a)
{
    const char *dir = a[0], *ctl = a[1];
    int inproc = atoi(a[4]), events = atoi(a[7]);
    unsigned seed = (unsigned)strtoul(a[5], NULL, 10);
    char path[4200], sql[64], id[16], payload[64];
    sqlite3 *sdb = NULL;
    de_outbox *sob = NULL;
    de_relay *r = NULL;
    de_conf *conf;
    de_err err;

    if (pl_install(dir, ctl, "service") != 0)
        return 11;
    snprintf(path, sizeof path, "%s/service.db", dir);
    if (sqlite3_open(path, &sdb) != SQLITE_OK)
        return 12;
    snprintf(sql, sizeof sql, "PRAGMA synchronous=%s", a[6]);
    sqlite3_exec(sdb, sql, NULL, NULL, NULL);
    if (de_outbox_open(sdb, NULL, &sob) != DE_OK) {
        fprintf(stderr, "service: %s\n", de_errmsg());
        return 13;
    }
    conf = child_conf(a[2], a[3]);
    if (inproc && (err = de_relay_start(sob, conf, &r)) != DE_OK) {
        fprintf(stderr, "service: relay: %s\n", de_errmsg());
        return err == DE_ERR_STATE ? 20 : 14;
    }
    for (int i = 0; i < events;) {
        int burst = 5 + rand_r(&seed) % 30;
        for (int b = 0; b < burst && i < events; b++, i++) {
            int s = rand_r(&seed) % 24;
            snprintf(id, sizeof id, "%c-%02d", s < 16 ? 'D' : 'R', s);
            snprintf(payload, sizeof payload, "{\"n\":%d}", i);
            if (tu_write_raw(sdb, sob, s < 16 ? "delivery" : "rider", id,
                             i % 3 ? "moved" : "assigned", payload,
                             rand_r(&seed) % 10 == 0) == -2) {
                fprintf(stderr, "service: write: %s / %s\n", de_errmsg(),
                        sqlite3_errmsg(sdb));
                return 15;
            }
        }
        if (rand_r(&seed) % 3 == 0) /* idle: checkpoints, cleanup */
            usleep(5000 + rand_r(&seed) % 30000);
    }
    if (r != NULL) {
        if ((err = de_relay_flush(r, 30000)) != DE_OK)
            fprintf(stderr, "service: flush: %s\n", de_errmsg());
        usleep(60000); /* a few cleanup intervals */
        if (de_relay_stop(r, 10000) != DE_OK || err != DE_OK)
            return err == DE_ERR_STATE ? 20 : 16;
    }
    de_conf_destroy(conf);
    de_outbox_close(sob);
    sqlite3_close(sdb);
    return 0;
}

/* --pl-relay DIR CTL BOOTSTRAP PREFIX: a sidecar until SIGTERM. */
static int relay_child_main(char **a)
{
    char path[4200];
    de_relay *r = NULL;
    de_conf *conf;
    sigset_t set;
    int sig;
    de_err err;

    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    if (pl_install(a[0], a[1], "relay") != 0)
        return 11;
    snprintf(path, sizeof path, "%s/service.db", a[0]);
    conf = child_conf(a[2], a[3]);
    if ((err = de_relay_start_path(path, conf, &r)) != DE_OK) {
        fprintf(stderr, "relay: %s\n", de_errmsg());
        return err == DE_ERR_STATE ? 20 : 14;
    }
    sigwait(&set, &sig);
    err = de_relay_stop(r, 20000);
    if (err != DE_OK)
        fprintf(stderr, "relay: stop: %s\n", de_errmsg());
    de_conf_destroy(conf);
    return err == DE_OK ? 0 : err == DE_ERR_STATE ? 20 : 16;
}

/* ---- the parent ------------------------------------------------------ */

static pid_t spawn(char **argv, pid_t group)
{
    pid_t pid = fork();

    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        sigset_t set;
        /* SIGTERM stays blocked through exec: the sidecar takes it with
         * sigwait, also when it comes before the sidecar is ready (a
         * round whose service finished at once). */
        sigemptyset(&set);
        sigaddset(&set, SIGTERM);
        sigprocmask(SIG_BLOCK, &set, NULL);
        setpgid(0, group);
        if (!getenv("DE_TEST_LOG")) {
            int devnull = open("/dev/null", O_WRONLY);
            if (devnull >= 0)
                dup2(devnull, 1);
        }
        execv(self_exe, argv);
        _exit(127);
    }
    setpgid(pid, group ? group : pid);
    return pid;
}

/* Waits for a child; a round that hangs fails the test instead of
 * hanging it (the whole group is killed). */
static int wait_status(pid_t pid, pid_t group, int64_t deadline_ms)
{
    int status = 0;
    pid_t got;

    while ((got = waitpid(pid, &status, WNOHANG)) == 0 ||
           (got < 0 && errno == EINTR)) {
        if (tu_now_ms() > deadline_ms) {
            kill(-group, SIGKILL);
            waitpid(pid, &status, 0);
            ck_abort_msg("a round took more than 120 s: process %d hung",
                         (int)pid);
        }
        usleep(10000);
    }
    return status;
}

/* The outcome of one round. */
typedef struct outcome {
    pl_report rep;
    int service_status, relay_status;
} outcome;

static void run_round(tu_cluster *c, char *dir, char *ctl, int inproc,
                      unsigned seed, int events, outcome *out)
{
    char s_inproc[16], s_seed[16], s_events[16];
    pid_t svc, rel = 0;
    char *argv[12];
    int64_t deadline;

    snprintf(s_inproc, sizeof s_inproc, "%d", inproc);
    snprintf(s_seed, sizeof s_seed, "%u", seed);
    snprintf(s_events, sizeof s_events, "%d", events);
    argv[0] = self_exe;
    argv[1] = "--pl-service";
    argv[2] = dir;
    argv[3] = ctl;
    argv[4] = c->bootstrap;
    argv[5] = c->prefix;
    argv[6] = s_inproc;
    argv[7] = s_seed;
    argv[8] = seed % 4 == 0 ? "FULL" : "NORMAL";
    argv[9] = s_events;
    argv[10] = NULL;
    svc = spawn(argv, 0);
    if (!inproc) {
        argv[1] = "--pl-relay";
        argv[6] = NULL;
        rel = spawn(argv, svc);
    }
    memset(out, 0, sizeof *out);
    deadline = tu_now_ms() + 120000;
    out->service_status = wait_status(svc, svc, deadline);
    if (rel) {
        /* Written everything: let the sidecar publish it and stop. */
        if (WIFEXITED(out->service_status))
            kill(rel, SIGTERM);
        out->relay_status = wait_status(rel, svc, deadline);
    }
    pl_control_read(ctl, &out->rep);
}

static bool killed(int status)
{
    return WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL;
}

static de_err note_applied(sqlite3 *cdb, const de_event_view *ev, void *ctx)
{
    sqlite3_stmt *st;
    int rc;

    (void)ctx;
    /* event_id is the primary key: a second application would fail. */
    if (sqlite3_prepare_v2(cdb,
                           "INSERT INTO applied(event_id, subject_type, "
                           "subject_id, seq) VALUES (?1, ?2, ?3, ?4)",
                           -1, &st, NULL) != SQLITE_OK)
        return DE_ERR_DB;
    sqlite3_bind_text(st, 1, ev->event_id, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, ev->subject_type, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 3, ev->subject_id, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 4, ev->subject_seq);
    rc = sqlite3_step(st);
    sqlite3_finalize(st);
    return rc == SQLITE_DONE ? DE_OK : DE_ERR_DB;
}

/* de_consumer applies every committed event once, each subject's in
 * commit order, and nothing else; nothing is dead-lettered. */
static void consume_and_compare(tu_cluster *c, const char *db_path,
                                const char *dir, int64_t expected)
{
    char topics[600], group[128], sql[4400];
    sqlite3 *cdb = tu_open(tu_path(dir, "consumer.db"));
    de_conf *conf = de_conf_new();
    de_consumer *k = NULL;
    de_consumer_stats st;
    int64_t deadline = tu_now_ms() + 120000, applied = 0;

    tu_exec(cdb, "CREATE TABLE applied(event_id TEXT PRIMARY KEY, "
                 "subject_type TEXT, subject_id TEXT, seq INTEGER)");
    snprintf(topics, sizeof topics, "%s,%s", tu_topic(c, "delivery"),
             tu_topic(c, "rider"));
    snprintf(group, sizeof group, "%sdurability", c->prefix);
    tu_ok(de_conf_set(conf, "bootstrap.servers", c->bootstrap));
    tu_ok(de_conf_set(conf, "group.id", group));
    tu_ok(de_conf_set(conf, "consumer.topics", topics));
    de_conf_set_log_cb(conf, tu_log, NULL);
    tu_ok(de_consumer_open(cdb, conf, &k));
    de_conf_destroy(conf);
    tu_ok(de_consumer_on(k, "delivery", NULL, note_applied, NULL));
    tu_ok(de_consumer_on(k, "rider", NULL, note_applied, NULL));
    while (applied < expected && tu_now_ms() < deadline) {
        tu_ok(de_consumer_poll(k, 200, NULL));
        applied = tu_query_int(cdb, "SELECT count(*) FROM applied");
    }
    tu_ok(de_consumer_stats_get(k, &st));
    tu_ok(de_consumer_close(k));
    ck_assert_int_eq(applied, expected);
    ck_assert_uint_eq(st.dead_lettered, 0);
    ck_assert_uint_eq(st.gaps, 0);
    ck_assert_uint_eq(st.foreign, 0);
    snprintf(sql, sizeof sql, "ATTACH DATABASE '%s' AS svc", db_path);
    tu_exec(cdb, sql);
    /* The n-th committed event of a subject was applied as number n. */
    ck_assert_int_eq(
        tu_query_int(cdb,
                     "SELECT count(*) FROM (SELECT event_id, row_number() "
                     "OVER (PARTITION BY subject_type, subject_id ORDER BY "
                     "n) AS k FROM svc.ledger) l LEFT JOIN applied a USING "
                     "(event_id) WHERE a.seq IS NOT l.k"),
        0);
    fprintf(stderr,
            "power_loss: de_consumer applied %lld events, %llu "
            "duplicates skipped\n",
            (long long)applied, (unsigned long long)st.duplicates);
    sqlite3_close(cdb);
}

START_TEST(power_loss_at_random_points)
{
    tu_cluster *c = tu_cluster_new(_i, 3);
    char *dir = tu_mkdtemp();
    char ctl[4200], db_path[4200];
    const char *env = getenv("DE_PL_CUTS");
    int want = env ? atoi(env) : 100, cuts = 0, rounds = 0, no_cut = 0;
    int by_kind[PL_KINDS] = {0};
    int64_t ops[2][PL_KINDS]; /* per round, in-process and sidecar */
    const char *seed_env = getenv("DE_PL_SEED");
    unsigned seed = seed_env ? (unsigned)strtoul(seed_env, NULL, 10)
                             : (unsigned)time(NULL) ^ (unsigned)getpid();
    long discarded = 0;
    int64_t t0 = tu_now_ms();
    sqlite3 *d;
    de_outbox *o;
    de_relay *r = NULL;
    de_conf *conf;
    outcome rd;

    fprintf(stderr, "power_loss: seed %u\n", seed);
    snprintf(ctl, sizeof ctl, "%s/../%s.plctl", dir, strrchr(dir, '/') + 1);
    snprintf(db_path, sizeof db_path, "%s/service.db", dir);
    tu_topic_create(c, "delivery", 4);
    tu_topic_create(c, "rider", 2);
    d = tu_open(db_path);
    tu_ledger_create(d);
    tu_ok(de_outbox_open(d, NULL, &o));
    de_outbox_close(o);
    sqlite3_close(d);

    /* How many operations of each kind a whole round makes, so that the
     * cuts spread evenly over the four kinds of moment. */
    for (int inproc = 0; inproc < 2; inproc++) {
        pl_control_init(ctl, -1, 0);
        run_round(c, dir, ctl, inproc, seed, 150, &rd);
        ck_assert_msg(WIFEXITED(rd.service_status) &&
                          WEXITSTATUS(rd.service_status) == 0,
                      "calibration round failed: status %d", rd.service_status);
        for (int kd = 0; kd < PL_KINDS; kd++)
            ops[inproc][kd] = rd.rep.kind_ops[kd] > 0 ? rd.rep.kind_ops[kd] : 1;
    }

    while (cuts < want && rounds < want * 3) {
        unsigned rs = seed + (unsigned)rounds * 7919u;
        int inproc = rounds % 2, kind = (rounds / 2) % PL_KINDS;
        int64_t cut_at;
        long n;

        /* Aim at the kind cut least so far, so that a rare kind (a round
         * makes few relay-state writes) is tried until it is hit rather
         * than left to chance. */
        for (int kd = 0; kd < PL_KINDS; kd++)
            if (by_kind[kd] < by_kind[kind])
                kind = kd;
        cut_at = 1 + (int64_t)(rand_r(&rs) % (unsigned)ops[inproc][kind]);

        rounds++;
        pl_control_init(ctl, kind, cut_at);
        run_round(c, dir, ctl, inproc, rs, 150, &rd);
        if (!rd.rep.cut) {
            /* The round finished before its cut point. */
            ck_assert_msg(WIFEXITED(rd.service_status) &&
                              WEXITSTATUS(rd.service_status) == 0 &&
                              (inproc || (WIFEXITED(rd.relay_status) &&
                                          WEXITSTATUS(rd.relay_status) == 0)),
                          "round %d (seed %u) failed without a cut: service "
                          "status %d, relay status %d",
                          rounds, seed, rd.service_status, rd.relay_status);
            /* Rounds vary: aim the next cut of this kind within what this
             * round made of it. */
            if (rd.rep.kind_ops[kind] > 0 &&
                rd.rep.kind_ops[kind] < ops[inproc][kind])
                ops[inproc][kind] = rd.rep.kind_ops[kind];
            no_cut++;
            continue;
        }
        /* The cut kills the process group; a process that had finished
         * (the service, before its sidecar stopped) finished cleanly. */
        ck_assert_msg((killed(rd.service_status) ||
                       (WIFEXITED(rd.service_status) &&
                        WEXITSTATUS(rd.service_status) == 0)) &&
                          (inproc || killed(rd.relay_status) ||
                           (WIFEXITED(rd.relay_status) &&
                            WEXITSTATUS(rd.relay_status) == 0)),
                      "round %d (seed %u): a process failed before the "
                      "cut: service status %d, relay status %d",
                      rounds, seed, rd.service_status, rd.relay_status);
        n = pl_power_loss(dir, rs, rand_r(&rs) % 4 == 0);
        ck_assert_int_ge(n, 0);
        discarded += n;
        cuts++;
        by_kind[kind]++;
        if (getenv("DE_TEST_LOG"))
            fprintf(stderr,
                    "cut %d at op %lld/%lld of kind %d: %s; %ld "
                    "writes lost\n",
                    cuts, (long long)cut_at, (long long)ops[inproc][kind], kind,
                    rd.rep.where, n);
    }

    /* Whatever is left, published by a relay on the real disk. */
    conf = child_conf(c->bootstrap, c->prefix);
    tu_ok(de_relay_start_path(db_path, conf, &r));
    de_conf_destroy(conf);
    tu_ok(de_relay_flush(r, 60000));
    tu_ok(de_relay_stop(r, 10000));

    d = tu_open_shared(db_path);
    tu_check k = tu_check_topics(c, d, SOURCE, "");
    fprintf(stderr,
            "power_loss: %d cuts in %d rounds (%d finished first) in %lld "
            "s: %d recording, %d publishing (log syncs), %d relay state, "
            "%d relay writes to the database (cleanup, checkpoints); %ld "
            "unsynced writes discarded; %ld events committed durably, %ld "
            "records, %ld duplicates\n",
            cuts, rounds, no_cut, (long long)(tu_now_ms() - t0) / 1000,
            by_kind[PL_KIND_RECORD], by_kind[PL_KIND_PUBLISH],
            by_kind[PL_KIND_STATE], by_kind[PL_KIND_RELAY_WRITE], discarded,
            k.expected, k.messages, k.duplicates);
    if (k.problems)
        fprintf(stderr, "power_loss: seed %u: %s\n", seed, k.first_problem);
    tu_assert_check(&k);
    ck_assert_int_ge(cuts, want);
    /* Every kind of moment was cut at least once. */
    if (want >= 20)
        for (int i = 0; i < PL_KINDS; i++)
            ck_assert_msg(by_kind[i] > 0, "no cut of kind %d (seed %u)", i,
                          seed);
    /* Duplicates only of what was in flight when the power went
     * (relay.max.inflight 200). */
    ck_assert_int_le(k.duplicates, (long)cuts * 200);
    sqlite3_close(d);
    consume_and_compare(c, db_path, dir, k.expected);
    tu_rmdir(dir);
    unlink(ctl);
    tu_cluster_destroy(c);
}
END_TEST

/* ---- restore drills -------------------------------------------------- */

/* The service fixture of tests/util/kafka.c, under short names. */
#define dir tu_dir
#define db tu_db
#define ob tu_ob

static const char *state_path(void)
{
    static char p[4200];

    snprintf(p, sizeof p, "%s-relay", tu_path(dir, "service.db"));
    return p;
}

/* A consistent copy of a live database file, as SQLite's backup API (or
 * `sqlite3 file ".backup copy"`) makes it. */
static void backup(const char *from, const char *to)
{
    sqlite3 *src = tu_open_shared(from), *dst;
    sqlite3_backup *b;

    unlink(to);
    dst = tu_open(to);
    b = sqlite3_backup_init(dst, "main", src, "main");
    ck_assert_ptr_nonnull(b);
    ck_assert_int_eq(sqlite3_backup_step(b, -1), SQLITE_DONE);
    ck_assert_int_eq(sqlite3_backup_finish(b), SQLITE_OK);
    ck_assert_int_eq(sqlite3_close(dst), SQLITE_OK);
    ck_assert_int_eq(sqlite3_close(src), SQLITE_OK);
}

/* Puts a backup in place of a file nothing has open. */
static void restore(const char *copy, const char *to)
{
    char path[4200];
    sqlite3 *src = tu_open(copy), *dst;
    sqlite3_backup *b;

    snprintf(path, sizeof path, "%s-wal", to);
    unlink(path);
    snprintf(path, sizeof path, "%s-shm", to);
    unlink(path);
    unlink(to);
    dst = tu_open(to);
    b = sqlite3_backup_init(dst, "main", src, "main");
    ck_assert_ptr_nonnull(b);
    ck_assert_int_eq(sqlite3_backup_step(b, -1), SQLITE_DONE);
    ck_assert_int_eq(sqlite3_backup_finish(b), SQLITE_OK);
    sqlite3_close(dst);
    sqlite3_close(src);
}

static void service_close(void)
{
    de_outbox_close(ob);
    ob = NULL;
    ck_assert_int_eq(sqlite3_close(db), SQLITE_OK);
    db = NULL;
}

static void service_open(void)
{
    db = tu_open(tu_path(dir, "service.db"));
    tu_ok(de_outbox_open(db, NULL, &ob));
}

static de_conf *drill_conf(tu_cluster *c, const char *k, const char *v)
{
    de_conf *conf = tu_relay_conf(c, "event.source", SOURCE, NULL);

    if (k != NULL)
        tu_ok(de_conf_set(conf, k, v));
    return conf;
}

/* Starts a relay, records `n` events of delivery X-1, waits until they
 * are published, stops it.  Returns the last event's id. */
static const char *publish(tu_cluster *c, int n, const char *k, const char *v)
{
    static char last[37];
    de_conf *conf = drill_conf(c, k, v);
    de_relay *r = NULL;
    de_event ev = {0};
    de_recorded rec;

    tu_ok(de_relay_start(ob, conf, &r));
    de_conf_destroy(conf);
    ev.subject_type = "delivery";
    ev.subject_id = "X-1";
    ev.action = "moved";
    for (int i = 0; i < n; i++) {
        tu_exec(db, "BEGIN IMMEDIATE");
        tu_ok(de_record(ob, &ev, &rec));
        tu_exec(db, "COMMIT");
    }
    memcpy(last, rec.event_id, sizeof last);
    tu_ok(de_relay_flush(r, 30000));
    /* Unless told to keep them, published rows are deleted (all but the
     * one at the cursor) soon after. */
    if (k == NULL || strcmp(k, "outbox.retention.ms") != 0)
        ck_assert(tu_wait_for(
            tu_query_int(db, "SELECT count(*) FROM de_outbox") <= 1, 10000));
    tu_ok(de_relay_stop(r, 10000));
    return last;
}

/* What the topic holds for X-1: ids by number, and copies. */
struct numbering {
    char ids[64][37];
    int max, records, reused, foreign;
};

static void note_number(void *arg, const rd_kafka_message_t *m, int32_t np)
{
    struct numbering *nb = arg;
    const char *id = tu_header(m, "ce_id");
    const char *seq = tu_header(m, "ce_subjectseq");
    long n = seq ? strtol(seq, NULL, 10) : 0;

    (void)np;
    nb->records++;
    if (id == NULL || n < 1 || n >= 64) {
        nb->foreign++;
        return;
    }
    if (nb->ids[n][0] != '\0' && strcmp(nb->ids[n], id) != 0)
        nb->reused++; /* one number, two events */
    else
        snprintf(nb->ids[n], sizeof nb->ids[n], "%s", id);
    if (n > nb->max)
        nb->max = (int)n;
}

static struct numbering read_numbering(tu_cluster *c)
{
    struct numbering nb;

    memset(&nb, 0, sizeof nb);
    tu_read_topic(c, tu_topic(c, "delivery"), note_number, &nb);
    return nb;
}

/* Numbers 1..max each carry exactly one event, and `id` is number want. */
static void assert_numbering(tu_cluster *c, const char *id, int want,
                             int records)
{
    struct numbering nb = read_numbering(c);

    ck_assert_int_eq(nb.reused, 0);
    ck_assert_int_eq(nb.foreign, 0);
    ck_assert_int_eq(nb.max, want);
    for (int i = 1; i <= want; i++)
        ck_assert_msg(nb.ids[i][0] != '\0', "number %d is missing", i);
    ck_assert_str_eq(nb.ids[want], id);
    if (records > 0)
        ck_assert_int_eq(nb.records, records);
}

static void count_record(void *ctx, const rd_kafka_message_t *m,
                         int32_t partitions)
{
    (void)m;
    (void)partitions;
    (*(long *)ctx)++;
}

/* A relay stopped while it reads Kafka at activation stops, and the next
 * one finds on Kafka everything published: nothing it took from Kafka
 * keeps it (a record taken and not released made rd_kafka_destroy, and so
 * de_relay_stop, wait forever -- found by the 30-minute soak). */
START_TEST(stop_during_recovery_returns)
{
    tu_cluster *c = tu_cluster_new(_i, 1);
    de_conf *conf;
    de_relay *r = NULL;
    de_relay_stats st;
    de_event ev = {0};
    de_recorded rec;
    char id[16];
    const int n = 16000;
    long records = 0;

    tu_topic_create(c, "delivery", 4);
    publish(c, 1, "outbox.retention.ms", "3600000");
    backup(state_path(), tu_path(dir, "backup.db-relay"));
    /* Published, then the state that knew of none of it restored. */
    conf = drill_conf(c, "outbox.retention.ms", "3600000");
    tu_ok(de_relay_start(ob, conf, &r));
    ev.subject_type = "delivery";
    ev.action = "moved";
    ev.subject_id = id;
    tu_exec(db, "BEGIN IMMEDIATE");
    for (int i = 0; i < n; i++) {
        snprintf(id, sizeof id, "Y-%d", i % 100);
        tu_ok(de_record(ob, &ev, &rec));
    }
    tu_exec(db, "COMMIT");
    tu_ok(de_relay_flush(r, 60000));
    tu_ok(de_relay_stop(r, 10000));
    restore(tu_path(dir, "backup.db-relay"), state_path());

    r = NULL;
    tu_ok(de_relay_start(ob, conf, &r));
    ck_assert(tu_wait_for(
        (de_relay_stats_get(r, &st),
         st.state == DE_RELAY_RECOVERING || st.state == DE_RELAY_ACTIVE),
        30000));
    (void)de_relay_stop(r, 1000); /* returns: that is the test */

    r = NULL;
    tu_ok(de_relay_start(ob, conf, &r));
    tu_ok(de_relay_flush(r, 60000));
    tu_ok(de_relay_stop(r, 10000));
    /* What the restored state did not know was found on Kafka, not sent
     * a second time. */
    tu_read_topic(c, tu_topic(c, "delivery"), count_record, &records);
    ck_assert_int_eq(records, n + 1);
    de_conf_destroy(conf);
    tu_cluster_destroy(c);
}
END_TEST

/* Database and state file restored together from an older backup: the
 * two events published after the backup stay on Kafka as numbers 4 and
 * 5; the next event is number 6, never a second number 4. */
START_TEST(restore_of_both_continues_above_kafka)
{
    tu_cluster *c = tu_cluster_new(_i, 1);
    const char *id;

    tu_topic_create(c, "delivery", 1);
    publish(c, 3, NULL, NULL);
    backup(tu_path(dir, "service.db"), tu_path(dir, "backup.db"));
    backup(state_path(), tu_path(dir, "backup.db-relay"));
    publish(c, 2, NULL, NULL);
    service_close();
    restore(tu_path(dir, "backup.db"), tu_path(dir, "service.db"));
    restore(tu_path(dir, "backup.db-relay"), state_path());
    service_open();
    id = publish(c, 1, NULL, NULL);
    assert_numbering(c, id, 6, 6);
    tu_cluster_destroy(c);
}
END_TEST

/* The database alone restored (the state is newer): new rows would take
 * positions the relay already published, so it refuses and says to
 * restore the state file of the same backup -- with which it goes on. */
START_TEST(restore_of_the_database_alone_is_refused)
{
    tu_cluster *c = tu_cluster_new(_i, 1);
    de_conf *conf;
    de_relay *r = NULL;
    const char *id;

    tu_topic_create(c, "delivery", 1);
    publish(c, 3, NULL, NULL);
    backup(tu_path(dir, "service.db"), tu_path(dir, "backup.db"));
    backup(state_path(), tu_path(dir, "backup.db-relay"));
    publish(c, 2, NULL, NULL);
    service_close();
    restore(tu_path(dir, "backup.db"), tu_path(dir, "service.db"));
    service_open();
    tu_write(db, ob, "delivery", "X-1", "moved", NULL, 0);
    conf = drill_conf(c, NULL, NULL);
    tu_assert_err(de_relay_start(ob, conf, &r), DE_ERR_STATE,
                  "restore the state file of the same backup");
    ck_assert_ptr_null(r);
    de_conf_destroy(conf);
    restore(tu_path(dir, "backup.db-relay"), state_path());
    id = publish(c, 1, NULL, NULL);
    /* 4 and 5 of the lost timeline stay; the two new events follow. */
    assert_numbering(c, id, 7, 7);
    tu_cluster_destroy(c);
}
END_TEST

/* The state file alone restored while the outbox still has the rows it
 * missed: they are found on Kafka and not sent again. */
START_TEST(restore_of_the_state_alone_finds_what_landed)
{
    tu_cluster *c = tu_cluster_new(_i, 1);
    const char *id;

    tu_topic_create(c, "delivery", 1);
    publish(c, 3, "outbox.retention.ms", "3600000");
    backup(state_path(), tu_path(dir, "backup.db-relay"));
    publish(c, 2, "outbox.retention.ms", "3600000");
    restore(tu_path(dir, "backup.db-relay"), state_path());
    id = publish(c, 1, "outbox.retention.ms", "3600000");
    /* Six records: 4 and 5 were not published a second time. */
    assert_numbering(c, id, 6, 6);
    tu_cluster_destroy(c);
}
END_TEST

/* The state file alone restored after the outbox was cleaned up past it:
 * the numbers it lacks cannot be rebuilt from the outbox: refused. */
START_TEST(restore_of_the_state_after_cleanup_is_refused)
{
    tu_cluster *c = tu_cluster_new(_i, 1);
    de_conf *conf;
    de_relay *r = NULL;

    tu_topic_create(c, "delivery", 1);
    publish(c, 3, NULL, NULL);
    backup(state_path(), tu_path(dir, "backup.db-relay"));
    publish(c, 2, NULL, NULL);
    /* The stop's cleanup ran: rows up to the cursor are gone. */
    ck_assert_int_le(tu_query_int(db, "SELECT count(*) FROM de_outbox"), 1);
    restore(tu_path(dir, "backup.db-relay"), state_path());
    conf = drill_conf(c, NULL, NULL);
    tu_assert_err(de_relay_start(ob, conf, &r), DE_ERR_STATE,
                  "older than the outbox");
    ck_assert_ptr_null(r);
    de_conf_destroy(conf);
    tu_cluster_destroy(c);
}
END_TEST

/* Fills every partition of the topic past what the mock keeps (about
 * 5 MiB), as retention would: the oldest records are deleted. */
static void flood(tu_cluster *c, const char *topic, int partitions)
{
    rd_kafka_conf_t *kc = rd_kafka_conf_new();
    static char big[100000];
    char err[256];
    rd_kafka_t *p;

    memset(big, 'x', sizeof big);
    rd_kafka_conf_set(kc, "bootstrap.servers", c->bootstrap, err, sizeof err);
    p = rd_kafka_new(RD_KAFKA_PRODUCER, kc, err, sizeof err);
    ck_assert_ptr_nonnull(p);
    for (int part = 0; part < partitions; part++)
        for (int i = 0; i < 80; i++)
            while (rd_kafka_producev(
                       p, RD_KAFKA_V_TOPIC(topic), RD_KAFKA_V_PARTITION(part),
                       RD_KAFKA_V_VALUE(big, sizeof big), RD_KAFKA_V_END) != 0)
                rd_kafka_poll(p, 10);
    ck_assert_int_eq(rd_kafka_flush(p, 60000), 0);
    rd_kafka_destroy(p);
}

/* The records after the relay's marks were deleted by retention: it
 * cannot verify what earlier relays published and refuses, saying what
 * to do; told to continue, it does. */
START_TEST(deleted_history_is_refused_unless_told)
{
    tu_cluster *c = tu_cluster_new(0, 1);
    de_conf *conf;
    de_relay *r = NULL;
    const char *id;

    tu_topic_create(c, "delivery", 2);
    publish(c, 3, NULL, NULL);
    flood(c, tu_topic(c, "delivery"), 2);
    conf = drill_conf(c, NULL, NULL);
    tu_ok(de_relay_start(ob, conf, &r));
    de_conf_destroy(conf);
    tu_write(db, ob, "delivery", "X-2", "moved", NULL, 0);
    tu_assert_err(de_relay_flush(r, 30000), DE_ERR_STATE,
                  "deleted by the topic's retention");
    ck_assert(strstr(de_errmsg(), "relay.recovery.unverifiable=continue"));
    tu_assert_err(de_relay_stop(r, 1000), DE_ERR_STATE, "cannot verify");
    /* The operator confirms nothing was restored. */
    id = publish(c, 1, "relay.recovery.unverifiable", "continue");
    ck_assert_ptr_nonnull(id);
    /* And the next start needs no confirmation: the marks moved on. */
    publish(c, 1, NULL, NULL);
    tu_cluster_destroy(c);
}
END_TEST

/* ---- stop keeps its word ------------------------------------------- */

/* Stop right after start: what was committed is published. */
START_TEST(stop_right_after_start_publishes)
{
    tu_cluster *c = tu_cluster_new(_i, 3);
    de_conf *conf = drill_conf(c, NULL, NULL);
    de_relay *r = NULL;
    char sid[16];

    tu_topic_create(c, "delivery", 3);
    for (int i = 0; i < 40; i++) {
        snprintf(sid, sizeof sid, "D-%d", i % 7);
        tu_write(db, ob, "delivery", sid, "assigned", NULL, 0);
    }
    tu_ok(de_relay_start(ob, conf, &r));
    tu_ok(de_relay_stop(r, 10000));
    de_conf_destroy(conf);
    tu_check k = tu_check_topics(c, db, SOURCE, "");
    tu_assert_check(&k);
    tu_cluster_destroy(c);
}
END_TEST

/* A standby asked to stop with no time limit while the lease holder is
 * gone (its lease still fresh): it takes the lease when it expires and
 * publishes, instead of waiting forever. */
START_TEST(stopping_standby_finishes_for_a_dead_holder)
{
    tu_cluster *c = tu_cluster_new(_i, 3);
    de_conf *conf = drill_conf(c, NULL, NULL);
    de_relay *r = NULL;
    sqlite3 *st;
    int64_t t0;
    char sql[300];

    tu_topic_create(c, "delivery", 3);
    tu_ok(de_relay_start(ob, conf, &r)); /* creates the state file */
    tu_ok(de_relay_stop(r, 1000));
    for (int i = 0; i < 20; i++)
        tu_write(db, ob, "delivery", "D-1", "moved", NULL, 0);
    /* A holder that died a moment ago. */
    st = tu_open_shared(state_path());
    snprintf(sql, sizeof sql,
             "UPDATE de_relay_lease SET owner = 'dead', pid = 999999, "
             "heartbeat_ms = %lld",
             (long long)(time(NULL) * 1000));
    tu_exec(st, sql);
    sqlite3_close(st);
    tu_ok(de_relay_start(ob, conf, &r));
    de_conf_destroy(conf);
    t0 = tu_now_ms();
    tu_ok(de_relay_stop(r, -1));
    /* Within the lease timeout (1.5 s) and a flush. */
    ck_assert_int_lt(tu_now_ms() - t0, 20000);
    tu_check k = tu_check_topics(c, db, SOURCE, "");
    ck_assert_int_eq(k.problems, 0);
    ck_assert_int_eq(k.unique, k.expected);
    tu_cluster_destroy(c);
}
END_TEST

/* The deletion floor never goes down, whoever writes it. */
START_TEST(deletion_floor_only_rises)
{
    tu_cluster *c = tu_cluster_new(_i, 1);
    de_conf *conf = drill_conf(c, NULL, NULL);
    de_relay *r = NULL;
    de_relay_stats st;

    tu_topic_create(c, "delivery", 1);
    tu_ok(de_relay_start(ob, conf, &r));
    de_conf_destroy(conf);
    for (int i = 0; i < 30; i++)
        tu_write(db, ob, "delivery", "D-1", "moved", NULL, 0);
    tu_ok(de_relay_flush(r, 30000));
    ck_assert(
        tu_wait_for((de_relay_stats_get(r, &st), st.deleted >= 29), 10000));
    /* Another relay (in the future) got further. */
    tu_exec(db, "UPDATE de_meta SET value = 1000000 WHERE key = "
                "'relay_deleted_upto'");
    for (int i = 0; i < 30; i++)
        tu_write(db, ob, "delivery", "D-1", "moved", NULL, 0);
    tu_ok(de_relay_flush(r, 30000));
    ck_assert(
        tu_wait_for((de_relay_stats_get(r, &st), st.deleted >= 58), 10000));
    tu_ok(de_relay_stop(r, 5000));
    ck_assert_int_eq(tu_query_int(db, "SELECT value FROM de_meta WHERE key "
                                      "= 'relay_deleted_upto'"),
                     1000000);
    tu_cluster_destroy(c);
}
END_TEST

static Suite *durability_suite(void)
{
    Suite *s = suite_create("durability");
    TCase *tc = tcase_create("power-loss");

    tcase_set_timeout(tc, 900);
    tcase_add_loop_test(tc, power_loss_at_random_points, tu_cluster_first(),
                        tu_cluster_count());
    suite_add_tcase(s, tc);

    tc = tcase_create("restore");
    tcase_add_checked_fixture(tc, tu_service_setup, tu_service_teardown);
    tcase_set_timeout(tc, 120);
    tcase_add_loop_test(tc, stop_during_recovery_returns, tu_cluster_first(),
                        tu_cluster_count());
    tcase_add_loop_test(tc, restore_of_both_continues_above_kafka,
                        tu_cluster_first(), tu_cluster_count());
    tcase_add_loop_test(tc, restore_of_the_database_alone_is_refused,
                        tu_cluster_first(), tu_cluster_count());
    tcase_add_loop_test(tc, restore_of_the_state_alone_finds_what_landed,
                        tu_cluster_first(), tu_cluster_count());
    tcase_add_loop_test(tc, restore_of_the_state_after_cleanup_is_refused,
                        tu_cluster_first(), tu_cluster_count());
    tcase_add_loop_test(tc, stop_right_after_start_publishes,
                        tu_cluster_first(), tu_cluster_count());
    tcase_add_loop_test(tc, stopping_standby_finishes_for_a_dead_holder,
                        tu_cluster_first(), tu_cluster_count());
    tcase_add_loop_test(tc, deletion_floor_only_rises, tu_cluster_first(),
                        tu_cluster_count());
    suite_add_tcase(s, tc);

    /* Retention is simulated by filling the mock past what it keeps. */
    tc = tcase_create("retention");
    tcase_set_tags(tc, "mock-only");
    tcase_add_checked_fixture(tc, tu_service_setup, tu_service_teardown);
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, deleted_history_is_refused_unless_told);
    suite_add_tcase(s, tc);
    return s;
}

int main(int argc, char **argv)
{
    ssize_t n = readlink("/proc/self/exe", self_exe, sizeof self_exe - 1);

    if (n <= 0)
        return EXIT_FAILURE;
    self_exe[n] = '\0';
    if (argc == 10 && strcmp(argv[1], "--pl-service") == 0)
        return service_main(argv + 2);
    if (argc >= 6 && strcmp(argv[1], "--pl-relay") == 0)
        return relay_child_main(argv + 2);
    return tu_run(durability_suite()) ? EXIT_FAILURE : EXIT_SUCCESS;
}

/* SPDX-License-Identifier: MIT */
/*
 * soak.c -- years of uptime, compressed: mixed load on an in-process relay
 * and a sidecar relay (one active, one standing by), fresh subjects all the
 * time, subjects returning after they were forgotten, periodic broker
 * outages, relay kills and restarts, and a consumer -- sampling every
 * resource the library could leak and failing if any keeps growing after
 * warm-up.  Every event is checked as it goes: applied once, in each
 * subject's order, numbered 1, 2, 3, ... within each numbering.
 *
 *   make soak        about 30 minutes (DE_SOAK_SECONDS=1800)
 *   make soak-short  2.5 minutes, run by CI
 *
 * Processes: this one owns the mock cluster (3 brokers), injects the
 * faults, samples and checks; a service process (`--service`) writes
 * events with a ledger row in each transaction and runs an in-process
 * relay; `deliveryevents relay` runs as the sidecar; a consumer process
 * (`--consumer`) applies every event into its own database.  Checked rows
 * are deleted from the ledger and the consumer's table, so that the
 * files measure the library's state, not the test's.
 *
 * A metric "keeps growing" when the median of the second half of the
 * samples after warm-up exceeds the median of the first half by more than
 * 25 % and by more than the metric's slack (noise: a few pages, a few
 * descriptors).
 */
#include "kafka.h"

#include <dirent.h>
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

static const char *self_exe = "/proc/self/exe";

/* The run's shape, scaled from its length. */
typedef struct plan {
    int seconds, sample_s, warmup_s;
    int rate;           /* events per second */
    int forget_s;       /* relay.subject.forget.ms, in s */
    int return_after_s; /* a delivery returns this long after it ended */
    int outage_every_s, outage_s, kill_every_s, restart_every_s;
} plan;

static plan make_plan(int seconds)
{
    plan p;

    p.seconds = seconds;
    p.rate = 100;
    if (seconds >= 900) {
        p.sample_s = 60;
        p.warmup_s = seconds / 3;
        p.forget_s = 60;
        p.outage_every_s = 150;
        p.outage_s = 5;
        p.kill_every_s = 120;
        p.restart_every_s = 200;
    } else {
        p.sample_s = 10;
        p.warmup_s = seconds * 2 / 5;
        p.forget_s = 10;
        p.outage_every_s = 45;
        p.outage_s = 3;
        p.kill_every_s = 40;
        p.restart_every_s = 50;
    }
    p.return_after_s = p.forget_s * 3 / 2;
    return p;
}

/* Keys every relay of the run shares. */
static void relay_keys(const plan *p, const char *bootstrap, const char *prefix,
                       const char *kv[][2], int *n)
{
    static char tmpl[128], forget[32];

    snprintf(tmpl, sizeof tmpl, "%s{subject_type}.events", prefix);
    snprintf(forget, sizeof forget, "%d", p->forget_s * 1000);
    *n = 0;
    kv[(*n)][0] = "bootstrap.servers", kv[(*n)++][1] = bootstrap;
    kv[(*n)][0] = "topic.template", kv[(*n)++][1] = tmpl;
    kv[(*n)][0] = "event.source", kv[(*n)++][1] = "/soak";
    kv[(*n)][0] = "relay.subject.forget.ms", kv[(*n)++][1] = forget;
    kv[(*n)][0] = "relay.subject.cache", kv[(*n)++][1] = "1000";
    kv[(*n)][0] = "relay.lease.timeout.ms", kv[(*n)++][1] = "3000";
    kv[(*n)][0] = "relay.cleanup.interval.ms", kv[(*n)++][1] = "200";
}

/* ---- the service process ------------------------------------------------ */

static volatile sig_atomic_t got_term, got_usr1;

static void on_signal(int sig)
{
    if (sig == SIGUSR1)
        got_usr1 = 1;
    else
        got_term = 1;
}

static void catch_signals(void)
{
    struct sigaction sa;

    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGUSR1, &sa, NULL);
}

static de_relay *start_inproc(const plan *p, de_outbox *ob,
                              const char *bootstrap, const char *prefix)
{
    const char *kv[16][2];
    de_conf *conf = de_conf_new();
    de_relay *r = NULL;
    int n;

    relay_keys(p, bootstrap, prefix, kv, &n);
    for (int i = 0; i < n; i++)
        if (de_conf_set(conf, kv[i][0], kv[i][1]) != DE_OK)
            fprintf(stderr, "service: %s\n", de_errmsg());
    if (de_relay_start(ob, conf, &r) != DE_OK)
        fprintf(stderr, "service: relay: %s\n", de_errmsg());
    de_conf_destroy(conf);
    return r;
}

/* A delivery waiting for its next step. */
typedef struct pending {
    long id;
    int step;
    int64_t due_ms;
} pending;

/* A FIFO of pending steps (all of one delay, so due times are ordered). */
typedef struct fifo {
    pending *v;
    size_t head, n, cap;
} fifo;

static void fifo_push(fifo *f, pending p)
{
    if (f->n == f->cap) {
        size_t cap = f->cap ? f->cap * 2 : 1024;
        pending *v = malloc(cap * sizeof *v);
        for (size_t i = 0; i < f->n; i++)
            v[i] = f->v[(f->head + i) % f->cap];
        free(f->v);
        f->v = v;
        f->head = 0;
        f->cap = cap;
    }
    f->v[(f->head + f->n++) % f->cap] = p;
}

static bool fifo_due(fifo *f, int64_t now, pending *out)
{
    if (f->n == 0 || f->v[f->head].due_ms > now)
        return false;
    *out = f->v[f->head];
    f->head = (f->head + 1) % f->cap;
    f->n--;
    return true;
}

static const char *const steps[] = {"created", "assigned", "picked_up",
                                    "delivered"};

/* --service DIR BOOTSTRAP PREFIX SECONDS: writes deliveries until SIGTERM,
 * with an in-process relay restarted on SIGUSR1. */
static int service_main(char **a)
{
    plan p = make_plan(atoi(a[3]));
    sqlite3 *db = NULL;
    de_outbox *ob = NULL;
    de_relay *r;
    fifo next = {0}, returns = {0};
    long ids = 0, n = 0;
    int64_t t0 = tu_now_ms();
    char path[4200], id[32];

    catch_signals();
    snprintf(path, sizeof path, "%s/service.db", a[0]);
    if (sqlite3_open(path, &db) != SQLITE_OK ||
        de_outbox_open(db, NULL, &ob) != DE_OK)
        return 2;
    r = start_inproc(&p, ob, a[1], a[2]);
    while (!got_term) {
        int64_t now = tu_now_ms();
        pending d;
        const char *action;

        if (got_usr1) {
            got_usr1 = 0;
            de_relay_stop(r, 5000);
            r = start_inproc(&p, ob, a[1], a[2]);
        }
        /* Pace: n events by now. */
        if (n >= (now - t0) * p.rate / 1000) {
            usleep(2000);
            continue;
        }
        if (fifo_due(&returns, now, &d)) {
            action = "returned";
        } else if (fifo_due(&next, now, &d)) {
            action = steps[d.step];
        } else {
            d.id = ++ids;
            d.step = 0;
            action = steps[0];
        }
        snprintf(id, sizeof id, "S%ld", d.id);
        if (tu_write_raw(db, ob, "delivery", id, action, "{\"soak\":1}", 0) <
            0) {
            fprintf(stderr, "service: write failed: %s / %s\n", de_errmsg(),
                    sqlite3_errmsg(db));
            usleep(100000);
            continue;
        }
        n++;
        if (strcmp(action, "returned") == 0)
            continue;
        if (d.step + 1 < (int)(sizeof steps / sizeof *steps)) {
            fifo_push(&next, (pending){d.id, d.step + 1, now + 2000});
        } else if (d.id % 20 == 0) {
            /* One in twenty comes back after the relay forgot it. */
            fifo_push(&returns,
                      (pending){d.id, 0, now + p.return_after_s * 1000});
        }
    }
    de_relay_stop(r, 20000);
    de_outbox_close(ob);
    sqlite3_close(db);
    free(next.v);
    free(returns.v);
    return 0;
}

/* ---- the consumer process ----------------------------------------------- */

static de_err apply(sqlite3 *db, const de_event_view *ev, void *ctx)
{
    sqlite3_stmt **st = ctx;

    if (*st == NULL &&
        sqlite3_prepare_v3(db,
                           "INSERT INTO applied(event_id, subject_id, epoch, "
                           "seq) VALUES (?1, ?2, ?3, ?4)",
                           -1, SQLITE_PREPARE_PERSISTENT, st,
                           NULL) != SQLITE_OK)
        return DE_ERR_DB;
    sqlite3_bind_text(*st, 1, ev->event_id, -1, SQLITE_STATIC);
    sqlite3_bind_text(*st, 2, ev->subject_id, -1, SQLITE_STATIC);
    sqlite3_bind_int64(*st, 3, ev->subject_epoch);
    sqlite3_bind_int64(*st, 4, ev->subject_seq);
    if (sqlite3_step(*st) != SQLITE_DONE) {
        sqlite3_reset(*st);
        return DE_ERR_DB;
    }
    sqlite3_reset(*st);
    return DE_OK;
}

/* --consumer DIR BOOTSTRAP PREFIX SECONDS: applies until SIGTERM. */
static int consumer_main(char **a)
{
    plan p = make_plan(atoi(a[3]));
    char path[4200], tmpl[128], gid[128], forget[32];
    sqlite3 *db = NULL;
    sqlite3_stmt *st = NULL;
    de_conf *conf = de_conf_new();
    de_consumer *c = NULL;

    catch_signals();
    snprintf(path, sizeof path, "%s/consumer.db", a[0]);
    snprintf(tmpl, sizeof tmpl, "%s{subject_type}.events", a[2]);
    snprintf(gid, sizeof gid, "%ssoak", a[2]);
    /* Past the relay's forget time plus the consumer's worst lag (the
     * rule in docs/OVERVIEW.md).  With broker outages every 45 s and
     * relay kills, that lag went past 20 s in soak-short: three times
     * the relay's 10 s, the first margin chosen, made the consumer
     * forget subjects whose next event was still on its way, and park
     * that event as a gap (never lost, but not applied).  A minute of
     * margin covers it. */
    snprintf(forget, sizeof forget, "%d", (p.forget_s + 60) * 1000);
    if (sqlite3_open(path, &db) != SQLITE_OK ||
        sqlite3_exec(db,
                     "PRAGMA journal_mode=WAL; CREATE TABLE IF NOT EXISTS "
                     "applied(an INTEGER PRIMARY KEY, event_id TEXT, "
                     "subject_id TEXT, epoch INTEGER, seq INTEGER); CREATE "
                     "INDEX IF NOT EXISTS applied_id ON applied(event_id)",
                     NULL, NULL, NULL) != SQLITE_OK)
        return 2;
    de_conf_set_log_cb(conf, tu_log, NULL);
    if (de_conf_set(conf, "bootstrap.servers", a[1]) != DE_OK ||
        de_conf_set(conf, "group.id", gid) != DE_OK ||
        de_conf_set(conf, "topic.template", tmpl) != DE_OK ||
        de_conf_set(conf, "consumer.subject.forget.ms", forget) != DE_OK ||
        de_consumer_open(db, conf, &c) != DE_OK ||
        de_consumer_on(c, "delivery", NULL, apply, &st) != DE_OK) {
        fprintf(stderr, "consumer: %s\n", de_errmsg());
        return 3;
    }
    de_conf_destroy(conf);
    while (!got_term)
        if (de_consumer_poll(c, 200, NULL) != DE_OK)
            fprintf(stderr, "consumer: %s\n", de_errmsg());
    sqlite3_finalize(st);
    de_consumer_close(c);
    sqlite3_close(db);
    return 0;
}

/* ---- the parent: faults, samples, checks -------------------------------- */

static pid_t spawn(const char *const argv[])
{
    pid_t pid = fork();

    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        /* execv takes char *const[] for history's sake; it writes
         * nothing. */
        execv(argv[0], (char *const *)(uintptr_t)argv);
        _exit(127);
    }
    return pid;
}

static pid_t spawn_self(const char *mode, const char *dir, tu_cluster *c,
                        const char *secs)
{
    const char *argv[] = {self_exe,  mode, dir, c->bootstrap,
                          c->prefix, secs, NULL};

    return spawn(argv);
}

static pid_t spawn_sidecar(const plan *p, const char *dir, tu_cluster *c)
{
    const char *kv[16][2];
    const char *argv[48];
    char xs[16][300], db[4200];
    const char *tool = getenv("DE_TOOL");
    int n, a = 0;

    ck_assert_msg(tool != NULL, "DE_TOOL must name the deliveryevents tool");
    relay_keys(p, c->bootstrap, c->prefix, kv, &n);
    snprintf(db, sizeof db, "%s/service.db", dir);
    argv[a++] = tool;
    argv[a++] = "relay";
    argv[a++] = "--db";
    argv[a++] = db;
    for (int i = 0; i < n; i++) {
        snprintf(xs[i], sizeof xs[i], "%s=%s", kv[i][0], kv[i][1]);
        argv[a++] = "-X";
        argv[a++] = xs[i];
    }
    argv[a] = NULL;
    return spawn(argv);
}

static int64_t file_size(const char *dir, const char *name)
{
    struct stat sb;

    return stat(tu_path(dir, name), &sb) == 0 ? (int64_t)sb.st_size : 0;
}

/* A number from /proc/<pid>/status ("VmRSS:", "Threads:"). */
static int64_t proc_status(pid_t pid, const char *key)
{
    char path[64], line[256];
    int64_t v = 0;
    FILE *f;

    snprintf(path, sizeof path, "/proc/%d/status", (int)pid);
    if ((f = fopen(path, "r")) == NULL)
        return 0;
    while (fgets(line, sizeof line, f))
        if (strncmp(line, key, strlen(key)) == 0)
            v = strtoll(line + strlen(key), NULL, 10);
    fclose(f);
    return v;
}

static int64_t open_fds(pid_t pid)
{
    char path[64];
    struct dirent *e;
    int64_t n = 0;
    DIR *d;

    snprintf(path, sizeof path, "/proc/%d/fd", (int)pid);
    if ((d = opendir(path)) == NULL)
        return 0;
    while ((e = readdir(d)) != NULL)
        n += e->d_name[0] != '.';
    closedir(d);
    return n;
}

enum {
    M_SVC_RSS,
    M_SVC_FDS,
    M_SVC_THREADS,
    M_CON_RSS,
    M_CON_FDS,
    M_SIDE_RSS,
    M_DB,
    M_WAL,
    M_STATE,
    M_CDB,
    M_INBOX,
    M_OUTBOX,
    M_COUNTERS,
    M_COUNT
};

static const struct metric {
    const char *name, *unit;
    double slack; /* growth below this is noise */
} metrics[M_COUNT] = {
    [M_SVC_RSS] = {"service RSS", "KiB", 4096},
    [M_SVC_FDS] = {"service fds", "", 4},
    [M_SVC_THREADS] = {"service threads", "", 2},
    [M_CON_RSS] = {"consumer RSS", "KiB", 4096},
    [M_CON_FDS] = {"consumer fds", "", 4},
    [M_SIDE_RSS] = {"sidecar RSS", "KiB", 4096},
    [M_DB] = {"database", "KiB", 1024},
    [M_WAL] = {"log (-wal)", "KiB", 9000},
    [M_STATE] = {"relay state", "KiB", 1024},
    [M_CDB] = {"consumer db", "KiB", 1024},
    [M_INBOX] = {"inbox rows", "", 2000},
    [M_OUTBOX] = {"outbox rows", "", 5000},
    [M_COUNTERS] = {"relay counters", "", 2000},
};

typedef struct checks {
    sqlite3 *v; /* the consumer's database, the service's attached */
    long checked, windows;
} checks;

static int64_t q_int(sqlite3 *db, const char *sql)
{
    sqlite3_stmt *st;
    int64_t v = -1;

    if (sqlite3_prepare_v2(db, sql, -1, &st, NULL) == SQLITE_OK &&
        sqlite3_step(st) == SQLITE_ROW)
        v = sqlite3_column_int64(st, 0);
    sqlite3_finalize(st);
    return v;
}

/*
 * Checks the events applied so far, in commit order up to the first one
 * not applied yet: each applied exactly once, each subject's in commit
 * order, numbered 1, 2, 3, ... within a numbering and 1 at each new one.
 * Then deletes them from the ledger and from the consumer's table.
 * Returns how many remain unapplied.
 */
static int64_t check_applied(checks *k)
{
    int64_t upto, n, left;
    char sql[1024];

    tu_exec(k->v, "BEGIN IMMEDIATE");
    upto = q_int(k->v, "SELECT coalesce((SELECT min(n) - 1 FROM svc.ledger l "
                       "WHERE NOT EXISTS (SELECT 1 FROM applied a WHERE "
                       "a.event_id = l.event_id)), (SELECT max(n) FROM "
                       "svc.ledger), 0)");
    snprintf(sql, sizeof sql, "SELECT count(*) FROM svc.ledger WHERE n <= %lld",
             (long long)upto);
    n = q_int(k->v, sql);
    snprintf(sql, sizeof sql,
             "SELECT count(*) FROM svc.ledger l JOIN applied a USING "
             "(event_id) WHERE l.n <= %lld",
             (long long)upto);
    ck_assert_msg(q_int(k->v, sql) == n,
                  "events up to %lld applied more than once", (long long)upto);
    /* Per subject, in commit order: applied in that order, and numbered
     * (epoch, seq) next to the previous one. */
    snprintf(sql, sizeof sql,
             "SELECT count(*) FROM (SELECT a.an, a.epoch, a.seq, "
             "lag(a.an) OVER w AS pan, lag(a.epoch) OVER w AS pe, "
             "lag(a.seq) OVER w AS ps FROM svc.ledger l JOIN applied a "
             "USING (event_id) WHERE l.n <= %lld WINDOW w AS (PARTITION BY "
             "l.subject_id ORDER BY l.n)) WHERE pan IS NOT NULL AND (pan > "
             "an OR NOT ((epoch = pe AND seq = ps + 1) OR (epoch > pe AND "
             "seq = 1)))",
             (long long)upto);
    ck_assert_msg(q_int(k->v, sql) == 0,
                  "events up to %lld applied out of order or misnumbered",
                  (long long)upto);
    snprintf(sql, sizeof sql,
             "DELETE FROM applied WHERE event_id IN (SELECT event_id FROM "
             "svc.ledger WHERE n <= %lld); DELETE FROM svc.ledger WHERE n <= "
             "%lld",
             (long long)upto, (long long)upto);
    tu_exec(k->v, sql);
    left = q_int(k->v, "SELECT count(*) FROM svc.ledger");
    tu_exec(k->v, "COMMIT");
    k->checked += n;
    k->windows++;
    return left;
}

struct find_ctx {
    const char *id; /* the subject */
};

static void print_subject(void *arg, const rd_kafka_message_t *m, int32_t np)
{
    struct find_ctx *f = arg;
    const char *s = tu_header(m, "ce_subject");

    (void)np;
    if (s != NULL && strcmp(s, f->id) == 0) {
        char id[64], seq[32], ep[32];
        snprintf(id, sizeof id, "%s",
                 tu_header(m, "ce_id") ? tu_header(m, "ce_id") : "?");
        snprintf(seq, sizeof seq, "%s",
                 tu_header(m, "ce_subjectseq") ? tu_header(m, "ce_subjectseq")
                                               : "?");
        snprintf(ep, sizeof ep, "%s",
                 tu_header(m, "ce_subjectepoch")
                     ? tu_header(m, "ce_subjectepoch")
                     : "0");
        fprintf(stderr, "  kafka [%d] @%lld: %s epoch %s seq %s\n",
                (int)m->partition, (long long)m->offset, id, ep, seq);
    }
}

static void dump(sqlite3 *db, const char *sql)
{
    sqlite3_stmt *st;

    if (sqlite3_prepare_v2(db, sql, -1, &st, NULL) != SQLITE_OK) {
        fprintf(stderr, "  (%s: %s)\n", sql, sqlite3_errmsg(db));
        return;
    }
    while (sqlite3_step(st) == SQLITE_ROW) {
        fprintf(stderr, "  ");
        for (int i = 0; i < sqlite3_column_count(st); i++)
            fprintf(stderr, "%s=%s ", sqlite3_column_name(st, i),
                    sqlite3_column_text(st, i)
                        ? (const char *)sqlite3_column_text(st, i)
                        : "NULL");
        fprintf(stderr, "\n");
    }
    sqlite3_finalize(st);
}

/* When events stay unapplied: which, and where they went. */
static void explain_unapplied(checks *k, tu_cluster *c)
{
    char sql[512], sid[128];
    struct find_ctx f = {sid};

    snprintf(sid, sizeof sid, "%s",
             tu_query_text(k->v, "SELECT coalesce((SELECT subject_id FROM "
                                 "svc.ledger l WHERE NOT EXISTS (SELECT 1 "
                                 "FROM applied a WHERE a.event_id = "
                                 "l.event_id) ORDER BY n LIMIT 1), '')"));
    fprintf(stderr, "soak: first unapplied event's subject %s; its ledger:\n",
            sid);
    snprintf(sql, sizeof sql,
             "SELECT n, event_id, action, (SELECT count(*) FROM applied a "
             "WHERE a.event_id = l.event_id) AS applied FROM svc.ledger l "
             "WHERE subject_id = '%s' ORDER BY n",
             sid);
    dump(k->v, sql);
    fprintf(stderr, "soak: its inbox row and dead letters:\n");
    snprintf(sql, sizeof sql, "SELECT * FROM de_inbox WHERE subject_id = '%s'",
             sid);
    dump(k->v, sql);
    snprintf(sql, sizeof sql,
             "SELECT id, kind, state, seq, epoch, event_id, error FROM "
             "de_dead_letter WHERE subject_id = '%s'",
             sid);
    dump(k->v, sql);
    fprintf(stderr, "soak: its records on Kafka:\n");
    tu_read_topic(c, tu_topic(c, "delivery"), print_subject, &f);
}

static double median(double *v, int n)
{
    for (int i = 1; i < n; i++)
        for (int j = i; j > 0 && v[j - 1] > v[j]; j--) {
            double t = v[j];
            v[j] = v[j - 1];
            v[j - 1] = t;
        }
    return n == 0 ? 0 : n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

START_TEST(soak)
{
    const char *env = getenv("DE_SOAK_SECONDS");
    plan p = make_plan(env ? atoi(env) : 150);
    tu_cluster *c = tu_cluster_new(0, 3);
    char secs[16];
    pid_t svc, con, side;
    int64_t t0, next_sample, next_outage, next_kill, next_restart;
    int64_t outage_end = 0;
    int down = 0, nsamples = 0, max_samples = p.seconds / p.sample_s + 2;
    double(*s)[M_COUNT] = calloc((size_t)max_samples, sizeof *s);
    int64_t *at = calloc((size_t)max_samples, sizeof *at);
    checks k = {0};
    sqlite3 *svcdb;
    int status, growing = 0;
    char sql[4300];

    ck_assert(s && at);
    snprintf(secs, sizeof secs, "%d", p.seconds);
    tu_topic_create(c, "delivery", 4);
    svcdb = tu_open(tu_path(tu_dir, "service.db"));
    tu_ledger_create(svcdb);
    sqlite3_close(svcdb);
    svc = spawn_self("--service", tu_dir, c, secs);
    con = spawn_self("--consumer", tu_dir, c, secs);
    side = spawn_sidecar(&p, tu_dir, c);
    ck_assert(tu_wait_for(file_size(tu_dir, "consumer.db") > 0, 30000));
    k.v = tu_open(tu_path(tu_dir, "consumer.db"));
    sqlite3_busy_timeout(k.v, 30000);
    snprintf(sql, sizeof sql, "ATTACH '%s' AS svc",
             tu_path(tu_dir, "service.db"));
    tu_exec(k.v, sql);
    ck_assert(tu_wait_for(q_int(k.v, "SELECT count(*) FROM sqlite_master "
                                     "WHERE name = 'applied'") == 1,
                          30000));
    fprintf(stderr,
            "soak: %d s, %d events/s, samples every %d s after %d s of "
            "warm-up; relay forgets after %d s; outages of %d s every %d "
            "s, sidecar killed every %d s, in-process relay restarted every "
            "%d s\n",
            p.seconds, p.rate, p.sample_s, p.warmup_s, p.forget_s, p.outage_s,
            p.outage_every_s, p.kill_every_s, p.restart_every_s);
    fprintf(stderr, "%6s", "t(s)");
    for (int m = 0; m < M_COUNT; m++)
        fprintf(stderr, " %12.12s", metrics[m].name);
    fprintf(stderr, " %9s\n", "checked");
    t0 = tu_now_ms();
    next_sample = t0 + p.sample_s * 1000;
    next_outage = t0 + p.outage_every_s * 1000;
    next_kill = t0 + p.kill_every_s * 1000;
    next_restart = t0 + p.restart_every_s * 1000;
    while (tu_now_ms() < t0 + p.seconds * 1000LL) {
        int64_t now = tu_now_ms();
        pid_t dead;

        /* Any child dying on its own is a failure (the sidecar only when
         * this loop killed it). */
        if ((dead = waitpid(-1, &status, WNOHANG)) > 0)
            ck_abort_msg("%s exited on its own (status %d)",
                         dead == svc   ? "the service"
                         : dead == con ? "the consumer"
                                       : "the sidecar",
                         status);
        if (outage_end && now >= outage_end) {
            rd_kafka_mock_broker_set_up(c->mock, down);
            outage_end = 0;
        }
        if (now >= next_outage) {
            down = 1 + (int)((now / 1000) % 3);
            rd_kafka_mock_broker_set_down(c->mock, down);
            outage_end = now + p.outage_s * 1000;
            next_outage += p.outage_every_s * 1000;
        }
        if (now >= next_kill) {
            kill(side, SIGKILL);
            ck_assert_int_eq(waitpid(side, &status, 0), side);
            side = spawn_sidecar(&p, tu_dir, c);
            next_kill += p.kill_every_s * 1000;
        }
        if (now >= next_restart) {
            kill(svc, SIGUSR1);
            next_restart += p.restart_every_s * 1000;
        }
        if (now >= next_sample && nsamples < max_samples) {
            double *v = s[nsamples];
            at[nsamples] = (now - t0) / 1000;
            check_applied(&k);
            v[M_SVC_RSS] = (double)proc_status(svc, "VmRSS:");
            v[M_SVC_FDS] = (double)open_fds(svc);
            v[M_SVC_THREADS] = (double)proc_status(svc, "Threads:");
            v[M_CON_RSS] = (double)proc_status(con, "VmRSS:");
            v[M_CON_FDS] = (double)open_fds(con);
            v[M_SIDE_RSS] = (double)proc_status(side, "VmRSS:");
            v[M_DB] = (double)file_size(tu_dir, "service.db") / 1024;
            v[M_WAL] = (double)file_size(tu_dir, "service.db-wal") / 1024;
            v[M_STATE] = (double)(file_size(tu_dir, "service.db-relay") +
                                  file_size(tu_dir, "service.db-relay-wal")) /
                         1024;
            v[M_CDB] = (double)(file_size(tu_dir, "consumer.db") +
                                file_size(tu_dir, "consumer.db-wal")) /
                       1024;
            v[M_INBOX] = (double)q_int(k.v, "SELECT count(*) FROM de_inbox");
            v[M_OUTBOX] =
                (double)q_int(k.v, "SELECT count(*) FROM svc.de_outbox");
            {
                sqlite3 *st = tu_open(tu_path(tu_dir, "service.db-relay"));
                sqlite3_busy_timeout(st, 30000);
                v[M_COUNTERS] =
                    (double)q_int(st, "SELECT count(*) FROM de_relay_seq");
                sqlite3_close(st);
            }
            fprintf(stderr, "%6lld", (long long)at[nsamples]);
            for (int m = 0; m < M_COUNT; m++)
                fprintf(stderr, " %12.0f", v[m]);
            fprintf(stderr, " %9ld\n", k.checked);
            nsamples++;
            next_sample += p.sample_s * 1000;
        }
        usleep(50000);
    }
    if (outage_end)
        rd_kafka_mock_broker_set_up(c->mock, down);
    /* Stop writing; everything written must be applied and check out. */
    kill(svc, SIGTERM);
    ck_assert_int_eq(waitpid(svc, &status, 0), svc);
    ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 0,
                  "service status %d", status);
    if (!tu_wait_for(check_applied(&k) == 0, 120000))
        explain_unapplied(&k, c);
    ck_assert_msg(check_applied(&k) == 0, "events left unapplied: %lld",
                  (long long)q_int(k.v, "SELECT count(*) FROM svc.ledger"));
    ck_assert_int_eq(q_int(k.v, "SELECT count(*) FROM de_dead_letter"), 0);
    kill(con, SIGTERM);
    kill(side, SIGTERM);
    ck_assert_int_eq(waitpid(con, &status, 0), con);
    ck_assert_int_eq(waitpid(side, &status, 0), side);
    fprintf(stderr,
            "soak: %ld events checked in %ld windows: each applied "
            "once, in order, numbered right\n",
            k.checked, k.windows);
    /* Nothing keeps growing after warm-up. */
    {
        int first = 0, half;
        while (first < nsamples && at[first] < p.warmup_s)
            first++;
        half = (nsamples - first) / 2;
        ck_assert_msg(half >= 2, "too few samples after warm-up (%d)",
                      nsamples - first);
        for (int m = 0; m < M_COUNT; m++) {
            double a[256], b[256], ma, mb;
            int na = 0, nb = 0;
            for (int i = first; i < first + half && na < 256; i++)
                a[na++] = s[i][m];
            for (int i = first + half; i < nsamples && nb < 256; i++)
                b[nb++] = s[i][m];
            ma = median(a, na);
            mb = median(b, nb);
            bool grows = mb > ma * 1.25 && mb - ma > metrics[m].slack;
            fprintf(stderr, "soak: %-16s %10.0f -> %10.0f %-3s %s\n",
                    metrics[m].name, ma, mb, metrics[m].unit,
                    grows ? "KEEPS GROWING" : "flat");
            growing += grows;
        }
    }
    ck_assert_msg(growing == 0, "%d metrics keep growing after warm-up",
                  growing);
    sqlite3_close(k.v);
    free(s);
    free(at);
    tu_cluster_destroy(c);
}
END_TEST

static Suite *soak_suite(void)
{
    Suite *s = suite_create("soak");
    TCase *tc = tcase_create("soak");
    const char *env = getenv("DE_SOAK_SECONDS");

    tcase_add_checked_fixture(tc, tu_dir_setup, tu_dir_teardown);
    tcase_set_timeout(tc, (env ? atoi(env) : 150) + 600);
    tcase_add_test(tc, soak);
    suite_add_tcase(s, tc);
    return s;
}

int main(int argc, char **argv)
{
    if (argc == 6 && strcmp(argv[1], "--service") == 0)
        return service_main(argv + 2);
    if (argc == 6 && strcmp(argv[1], "--consumer") == 0)
        return consumer_main(argv + 2);
    return tu_run(soak_suite()) ? EXIT_FAILURE : EXIT_SUCCESS;
}

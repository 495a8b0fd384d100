/* SPDX-License-Identifier: MIT */
/*
 * soakutil.c -- see soakutil.h.
 */
#include "soakutil.h"

#include <check.h>
#include <dirent.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

tsk_plan tsk_make_plan(int seconds, int rate)
{
    tsk_plan p;

    p.seconds = seconds;
    p.rate = rate;
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

static void fifo_push(tsk_fifo *f, tsk_pending p)
{
    if (f->n == f->cap) {
        size_t cap = f->cap ? f->cap * 2 : 1024;
        tsk_pending *v = malloc(cap * sizeof *v);
        /* In a writer process, where Check's assertions cannot report. */
        if (v == NULL)
            abort();
        for (size_t i = 0; i < f->n; i++)
            v[i] = f->v[(f->head + i) % f->cap];
        free(f->v);
        f->v = v;
        f->head = 0;
        f->cap = cap;
    }
    f->v[(f->head + f->n++) % f->cap] = p;
}

static bool fifo_due(tsk_fifo *f, int64_t now, tsk_pending *out)
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

const char *tsk_next(tsk_deliveries *ds, int64_t now, tsk_pending *d)
{
    if (fifo_due(&ds->returns, now, d))
        return "returned";
    if (fifo_due(&ds->next, now, d))
        return steps[d->step];
    d->id = ++ds->ids;
    d->step = 0;
    return steps[0];
}

void tsk_written(tsk_deliveries *ds, const tsk_plan *p, const tsk_pending *d,
                 const char *action, int64_t now)
{
    if (strcmp(action, "returned") == 0)
        return;
    if (d->step + 1 < (int)(sizeof steps / sizeof *steps)) {
        fifo_push(&ds->next, (tsk_pending){d->id, d->step + 1, now + 2000});
    } else if (d->id % 20 == 0) {
        /* One in twenty comes back after the relay forgot it. */
        fifo_push(&ds->returns,
                  (tsk_pending){d->id, 0, now + p->return_after_s * 1000});
    }
}

void tsk_deliveries_free(tsk_deliveries *ds)
{
    free(ds->next.v);
    free(ds->returns.v);
    memset(ds, 0, sizeof *ds);
}

/* Keys every relay of the run shares. */
static void relay_keys(const tsk_plan *p, const char *bootstrap,
                       const char *prefix, const char *kv[][2], int *n)
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

/* "[HH:MM:SS.mmm]" of the wall clock (UTC), the same in every process of
 * a run, so that the soak's lines and its helpers' (the in-process relay,
 * the consumer) can be read against each other and against the samples.
 * The sidecar tool's own lines carry no stamp. */
static void stamp(char out[16])
{
    struct timeval tv;
    struct tm tm;

    gettimeofday(&tv, NULL);
    gmtime_r(&tv.tv_sec, &tm);
    snprintf(out, 16, "%02d:%02d:%02d.%03d", tm.tm_hour, tm.tm_min, tm.tm_sec,
             (int)(tv.tv_usec / 1000));
}

void tsk_note(const char *fmt, ...)
{
    char t[16], line[600];
    va_list ap;

    stamp(t);
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    fprintf(stderr, "[%s] soak: %s\n", t, line);
}

void tsk_log(void *ctx, int level, const char *message)
{
    char t[16];

    if (level <= DE_LOG_NOTICE) {
        stamp(t);
        fprintf(stderr, "[%s] %s: %s\n", t, (const char *)ctx, message);
    }
}

de_relay *tsk_start_relay(const tsk_plan *p, de_outbox *ob,
                          const char *bootstrap, const char *prefix)
{
    const char *kv[16][2];
    de_conf *conf = de_conf_new();
    de_relay *r = NULL;
    int n;

    relay_keys(p, bootstrap, prefix, kv, &n);
    for (int i = 0; i < n; i++)
        if (de_conf_set(conf, kv[i][0], kv[i][1]) != DE_OK)
            fprintf(stderr, "soak: relay: %s\n", de_errmsg());
    de_conf_set_log_cb(conf, tsk_log, (void *)"in-process relay");
    if (de_relay_start(ob, conf, &r) != DE_OK)
        fprintf(stderr, "soak: relay: %s\n", de_errmsg());
    de_conf_destroy(conf);
    return r;
}

pid_t tsk_spawn_sidecar(const tsk_plan *p, const char *where_flag,
                        const char *where, tu_cluster *c)
{
    const char *kv[16][2];
    const char *argv[48];
    char xs[16][300];
    const char *tool = getenv("DE_TOOL");
    int n, a = 0;

    ck_assert_msg(tool != NULL, "DE_TOOL must name the deliveryevents tool");
    relay_keys(p, c->bootstrap, c->prefix, kv, &n);
    argv[a++] = tool;
    argv[a++] = "relay";
    argv[a++] = where_flag;
    argv[a++] = where;
    for (int i = 0; i < n; i++) {
        snprintf(xs[i], sizeof xs[i], "%s=%s", kv[i][0], kv[i][1]);
        argv[a++] = "-X";
        argv[a++] = xs[i];
    }
    argv[a] = NULL;
    return tsk_spawn(argv);
}

void tsk_faults_start(tsk_faults *f, const tsk_plan *p, int64_t t0)
{
    memset(f, 0, sizeof *f);
    tsk_note("t(s) = 0: the samples' clock starts");
    f->next_outage = t0 + p->outage_every_s * 1000;
    f->next_kill = t0 + p->kill_every_s * 1000;
    f->next_restart = t0 + p->restart_every_s * 1000;
}

int tsk_faults_due(tsk_faults *f, const tsk_plan *p, tu_cluster *c, int64_t now)
{
    int due = 0;

    if (f->outage_end && now >= f->outage_end)
        tsk_faults_end(f, c);
    if (now >= f->next_outage) {
        f->down = 1 + (int)((now / 1000) % 3);
        tsk_note("broker %d down for %d s", f->down, p->outage_s);
        rd_kafka_mock_broker_set_down(c->mock, f->down);
        f->outage_end = now + p->outage_s * 1000;
        f->next_outage += p->outage_every_s * 1000;
    }
    if (now >= f->next_kill) {
        tsk_note("killing the sidecar relay");
        due |= TSK_KILL_SIDECAR;
        f->next_kill += p->kill_every_s * 1000;
    }
    if (now >= f->next_restart) {
        tsk_note("restarting the in-process relay");
        due |= TSK_RESTART_RELAY;
        f->next_restart += p->restart_every_s * 1000;
    }
    return due;
}

void tsk_faults_end(tsk_faults *f, tu_cluster *c)
{
    if (f->outage_end) {
        tsk_note("broker %d up", f->down);
        rd_kafka_mock_broker_set_up(c->mock, f->down);
        f->outage_end = 0;
    }
}

volatile sig_atomic_t tsk_got_term, tsk_got_usr1;

static void on_signal(int sig)
{
    if (sig == SIGUSR1)
        tsk_got_usr1 = 1;
    else
        tsk_got_term = 1;
}

void tsk_catch_signals(void)
{
    struct sigaction sa;

    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGUSR1, &sa, NULL);
}

pid_t tsk_spawn(const char *const argv[])
{
    pid_t parent = getpid(), pid = fork();

    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        /* Gone with the soak, however it ends (CK_FORK=no included):
         * a helper left behind would keep writing and relaying. */
        if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0 || getppid() != parent)
            _exit(127);
        /* execv takes char *const[] for history's sake; it writes
         * nothing. */
        execv(argv[0], (char *const *)(uintptr_t)argv);
        _exit(127);
    }
    return pid;
}

int64_t tsk_proc_status(pid_t pid, const char *key)
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

int64_t tsk_open_fds(pid_t pid)
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

void tsk_samples_init(tsk_samples *s, const tsk_metric *m, int nm,
                      const tsk_plan *p)
{
    memset(s, 0, sizeof *s);
    s->m = m;
    s->nm = nm;
    s->cap = p->seconds / p->sample_s + 2;
    s->v = calloc((size_t)s->cap * (size_t)nm, sizeof *s->v);
    s->at = calloc((size_t)s->cap, sizeof *s->at);
    ck_assert(s->v != NULL && s->at != NULL);
}

double *tsk_sample_row(tsk_samples *s, int64_t at_s)
{
    if (s->n >= s->cap)
        return NULL;
    s->at[s->n] = at_s;
    return s->v + (size_t)s->n++ * (size_t)s->nm;
}

void tsk_print_header(const tsk_samples *s)
{
    fprintf(stderr, "%6s", "t(s)");
    for (int m = 0; m < s->nm; m++)
        fprintf(stderr, " %12.12s", s->m[m].name);
    fprintf(stderr, " %9s\n", "checked");
}

void tsk_print_last(const tsk_samples *s, long checked)
{
    const double *v = s->v + (size_t)(s->n - 1) * (size_t)s->nm;

    fprintf(stderr, "%6lld", (long long)s->at[s->n - 1]);
    for (int m = 0; m < s->nm; m++)
        fprintf(stderr, " %12.0f", v[m]);
    fprintf(stderr, " %9ld\n", checked);
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

void tsk_assert_flat(const tsk_samples *s, int warm_s)
{
    int first = 0, half, growing = 0;

    while (first < s->n && s->at[first] < warm_s)
        first++;
    half = (s->n - first) / 2;
    ck_assert_msg(half >= 2, "too few samples after warm-up (%d)",
                  s->n - first);
    for (int m = 0; m < s->nm; m++) {
        double a[256], b[256], ma, mb;
        int na = 0, nb = 0;
        for (int i = first; i < first + half && na < 256; i++)
            a[na++] = s->v[(size_t)i * (size_t)s->nm + (size_t)m];
        for (int i = first + half; i < s->n && nb < 256; i++)
            b[nb++] = s->v[(size_t)i * (size_t)s->nm + (size_t)m];
        ma = median(a, na);
        mb = median(b, nb);
        bool grows = mb > ma * 1.25 && mb - ma > s->m[m].slack;
        fprintf(stderr, "soak: %-16s %10.0f -> %10.0f %-3s %s\n", s->m[m].name,
                ma, mb, s->m[m].unit, grows ? "KEEPS GROWING" : "flat");
        growing += grows;
    }
    ck_assert_msg(growing == 0, "%d metrics keep growing after warm-up",
                  growing);
}

void tsk_samples_free(tsk_samples *s)
{
    free(s->v);
    free(s->at);
    memset(s, 0, sizeof *s);
}

static void print_subject(void *arg, const rd_kafka_message_t *m, int32_t np)
{
    const char *id = arg, *s = tu_header(m, "ce_subject");
    /* tu_header rotates eight buffers: the four stay valid together. */
    const char *ce_id = tu_header(m, "ce_id");
    const char *seq = tu_header(m, "ce_subjectseq");
    const char *ep = tu_header(m, "ce_subjectepoch");

    (void)np;
    if (s != NULL && strcmp(s, id) == 0)
        fprintf(stderr, "  kafka [%d] @%lld: %s epoch %s seq %s\n",
                (int)m->partition, (long long)m->offset, ce_id ? ce_id : "?",
                ep ? ep : "0", seq ? seq : "?");
}

void tsk_print_kafka_subject(tu_cluster *c, const char *subject_type,
                             const char *id)
{
    fprintf(stderr, "soak: its records on Kafka:\n");
    tu_read_topic(c, tu_topic(c, subject_type), print_subject,
                  (void *)(uintptr_t)id);
}

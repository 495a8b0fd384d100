/* SPDX-License-Identifier: MIT */
/*
 * check_archive.c -- `deliveryevents archive` as its users run it: the
 * installed tool (DE_TOOL) in processes of its own, SIGKILLed at random
 * moments, rebalanced, starved of disk, fed late events and foreign
 * records, while a relay in this process publishes events to the mock
 * cluster (and to the real one named by KAFKA_BOOTSTRAP_SERVERS).  Every
 * test ends by reading the whole archive (zlib, jansson) and every record
 * of the topic, and asserting that each record is in the archive exactly
 * once, as the event it is, in the partition of its event time.
 *
 * DE_ARCHIVE_KILLS sets how many times the kill test kills the archiver
 * (10 by default; `make soak-archive` runs 100).
 */
#include "kafka.h"

#include <dirent.h>
#include <fcntl.h>
#include <ftw.h>
#include <jansson.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include <zlib.h>

#define MAX_PARTS 8
#define MAX_OFFSETS 40000

/* ---- the archiver in a process of its own ------------------------------- */

typedef struct proc {
    pid_t pid;
    char err[4200];
    int status, exited;
} proc;

static proc procs[16];
static int nprocs;
/* The topic archived: tu_topic(c, "delivery") unless set. */
static const char *topic_override;

/* Starts the tool: archive, the cluster, DIR, group, then the
 * NULL-terminated extra arguments; fsize > 0 limits the size of any file
 * it writes (RLIMIT_FSIZE, SIGXFSZ ignored: a write past it fails with
 * EFBIG, as one fails with ENOSPC on a full disk). */
static proc *archiver(tu_cluster *c, const char *dir, const char *group,
                      long fsize, ...)
{
    const char *tool = getenv("DE_TOOL"), *a;
    char *args[40];
    int n = 0;
    proc *p;
    va_list ap;

    ck_assert_msg(tool != NULL, "DE_TOOL (the deliveryevents binary) unset");
    ck_assert_int_lt(nprocs, 16);
    p = &procs[nprocs];
    memset(p, 0, sizeof *p);
    snprintf(p->err, sizeof p->err, "%s/archive.%d.err", tu_dir, nprocs++);
    args[n++] = strdup("deliveryevents");
    args[n++] = strdup("archive");
    args[n++] = strdup("-b");
    args[n++] = strdup(c->bootstrap);
    args[n++] = strdup("--topic");
    args[n++] =
        strdup(topic_override ? topic_override : tu_topic(c, "delivery"));
    args[n++] = strdup("--dir");
    args[n++] = strdup(dir);
    args[n++] = strdup("--group");
    args[n++] = strdup(group);
    /* A restarted member gets its partitions back soon. */
    args[n++] = strdup("-X");
    args[n++] = strdup(
        (c->real ? "session.timeout.ms=6000" : "session.timeout.ms=3000"));
    args[n++] = strdup("-X");
    args[n++] = strdup("heartbeat.interval.ms=1000");
    if (getenv("DE_ARCHIVE_DEBUG") != NULL) {
        args[n++] = strdup("-X");
        args[n++] = strdup(getenv("DE_ARCHIVE_DEBUG"));
    }
    va_start(ap, fsize);
    while ((a = va_arg(ap, const char *)) != NULL && n < 38)
        args[n++] = strdup(a);
    va_end(ap);
    args[n] = NULL;
    p->pid = fork();
    ck_assert_int_ge(p->pid, 0);
    if (p->pid == 0) {
        int in = open("/dev/null", O_RDONLY);
        int err = open(p->err, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (in < 0 || err < 0 || dup2(in, 0) < 0 || dup2(in, 1) < 0 ||
            dup2(err, 2) < 0)
            _exit(126);
        if (fsize > 0) {
            struct rlimit rl = {(rlim_t)fsize, (rlim_t)fsize};
            signal(SIGXFSZ, SIG_IGN);
            setrlimit(RLIMIT_FSIZE, &rl);
        }
        execv(tool, args);
        _exit(127);
    }
    for (int i = 0; i < n; i++)
        free(args[i]);
    return p;
}

static bool exited(proc *p)
{
    if (!p->exited && waitpid(p->pid, &p->status, WNOHANG) == p->pid)
        p->exited = 1;
    return p->exited;
}

static const char *slurp(const char *path)
{
    static char b[16384];
    FILE *f = fopen(path, "r");
    size_t n = 0;

    b[0] = '\0';
    if (f != NULL) {
        n = fread(b, 1, sizeof b - 1, f);
        fclose(f);
    }
    b[n] = '\0';
    return b;
}

/* Waits for p to exit by itself and returns its exit status. */
static int finish(proc *p, int timeout_ms)
{
    ck_assert_msg(tu_wait_for(exited(p), timeout_ms),
                  "the archiver did not exit within %d ms; stderr: %s",
                  timeout_ms, slurp(p->err));
    ck_assert_msg(WIFEXITED(p->status), "the archiver died of signal %d: %s",
                  WTERMSIG(p->status), slurp(p->err));
    return WEXITSTATUS(p->status);
}

/* The events a finished archiver says it archived (its last line). */
static long events_of(const proc *p)
{
    const char *text = slurp(p->err), *at = text;
    long n = -1;

    while ((at = strstr(at, "archive: ")) != NULL) {
        at += 9;
        if (*at >= '0' && *at <= '9')
            n = atol(at);
    }
    return n;
}

static void setup(void)
{
    tu_service_setup();
    nprocs = 0;
    topic_override = NULL;
}

static void teardown(void)
{
    for (int i = 0; i < nprocs; i++)
        if (!procs[i].exited) {
            kill(procs[i].pid, SIGKILL);
            waitpid(procs[i].pid, NULL, 0);
        }
    tu_service_teardown();
}

/* ---- reading the archive ------------------------------------------------ */

typedef struct scan {
    long lines, events, unparsed, files, tmp_files, problems;
    char first_problem[600];
    unsigned char count[MAX_PARTS][MAX_OFFSETS]; /* lines per record */
    char *id[MAX_PARTS][MAX_OFFSETS];            /* the event's id */
    json_t *unparsed_lines;                      /* array */
    int64_t high[MAX_PARTS]; /* the topic's end offsets (against) */
} scan;

static scan *S;            /* nftw has no context pointer */
static sqlite3_stmt *SINK; /* when set, every event line is inserted */

#define PROBLEM(...)                                                           \
    do {                                                                       \
        if (S->problems++ == 0)                                                \
            snprintf(S->first_problem, sizeof S->first_problem, __VA_ARGS__);  \
    } while (0)

/* One line of file path: where it belongs and whether it is there. */
static void scan_line(const char *path, const char *line, int64_t *expect)
{
    json_error_t je;
    json_t *j = json_loads(line, 0, &je);
    json_int_t p, off;
    const char *t, *hive;
    char want[64];

    if (j == NULL) {
        PROBLEM("%s: a line that is not JSON: %s", path, je.text);
        return;
    }
    S->lines++;
    p = json_integer_value(json_object_get(j, "kafkapartition"));
    off = json_integer_value(json_object_get(j, "kafkaoffset"));
    if (p < 0 || p >= MAX_PARTS || off < 0 || off >= MAX_OFFSETS) {
        PROBLEM("%s: partition %lld offset %lld out of range", path,
                (long long)p, (long long)off);
        json_decref(j);
        return;
    }
    /* A file is one contiguous run of offsets from the one it is named
     * after (the mock's offsets have no holes). */
    if (off != *expect)
        PROBLEM("%s: offset %lld where %lld was expected", path, (long long)off,
                (long long)*expect);
    *expect = off + 1;
    S->count[p][off]++;
    if (strstr(path, "/_unparsed/") != NULL) {
        S->unparsed++;
        json_array_append(S->unparsed_lines, j);
    } else {
        S->events++;
        if (SINK != NULL) {
            sqlite3_bind_text(SINK, 1, line, -1, SQLITE_TRANSIENT);
            ck_assert_int_eq(sqlite3_step(SINK), SQLITE_DONE);
            sqlite3_reset(SINK);
        }
        t = json_string_value(json_object_get(j, "time"));
        hive = strstr(path, "/dt=");
        if (t == NULL || strlen(t) < 13 ||
            !json_is_object(json_object_get(j, "data")) ||
            strcmp(json_string_value(json_object_get(j, "specversion")),
                   "1.0") != 0) {
            PROBLEM("%s: not a CloudEvent with time and data: %s", path, line);
        } else {
            snprintf(want, sizeof want, "/dt=%.10s/hour=%.2s/", t, t + 11);
            if (hive == NULL || strncmp(hive, want, strlen(want)) != 0)
                PROBLEM("%s: an event of %s in the wrong partition", path, t);
        }
        free(S->id[p][off]);
        S->id[p][off] = strdup(json_string_value(json_object_get(j, "id")));
    }
    json_decref(j);
}

static int scan_file(const char *path, const struct stat *st, int flag,
                     struct FTW *ftw)
{
    const char *name = path + ftw->base;
    static char line[1 << 20];
    long long first;
    int64_t expect;
    char tail[64];
    gzFile g;

    (void)st;
    if (flag != FTW_F || strstr(path, "/_reports/") != NULL)
        return 0;
    if (name[0] == '.') {
        S->tmp_files++;
        return 0;
    }
    /* <topic>+<partition>+<first>.ndjson.gz */
    if (sscanf(strrchr(name, '+') + 1, "%lld%63s", &first, tail) != 2 ||
        strcmp(tail, ".ndjson.gz") != 0) {
        PROBLEM("%s: not an archive file's name", path);
        return 0;
    }
    S->files++;
    expect = first;
    if ((g = gzopen(path, "rb")) == NULL) {
        PROBLEM("%s: cannot open", path);
        return 0;
    }
    while (gzgets(g, line, sizeof line) != NULL) {
        size_t n = strlen(line);
        if (n == 0 || line[n - 1] != '\n') {
            PROBLEM("%s: a line without its newline", path);
            break;
        }
        scan_line(path, line, &expect);
    }
    if (expect == first)
        PROBLEM("%s: an empty file", path);
    {
        int zerr;
        gzerror(g, &zerr);
        if (zerr != Z_OK && zerr != Z_STREAM_END)
            PROBLEM("%s: not a whole gzip stream", path);
    }
    gzclose(g);
    return 0;
}

static scan *scan_archive(const char *dir)
{
    scan *s = calloc(1, sizeof *s);

    ck_assert_ptr_nonnull(s);
    s->unparsed_lines = json_array();
    S = s;
    nftw(dir, scan_file, 16, FTW_PHYS);
    S = NULL;
    return s;
}

static void scan_free(scan *s)
{
    for (int p = 0; p < MAX_PARTS; p++)
        for (int o = 0; o < MAX_OFFSETS; o++)
            free(s->id[p][o]);
    json_decref(s->unparsed_lines);
    free(s);
}

/* Every record of the topic against the archive. */
typedef struct vs {
    scan *s;
    long records, missing, repeated, wrong;
    char first[600];
} vs;

static void against(void *ctx, const rd_kafka_message_t *m, int32_t np)
{
    vs *v = ctx;
    const char *id = tu_header(m, "ce_id");
    unsigned char n;

    (void)np;
    v->records++;
    ck_assert(m->partition < MAX_PARTS && m->offset < MAX_OFFSETS);
    if (m->offset + 1 > v->s->high[m->partition])
        v->s->high[m->partition] = m->offset + 1;
    n = v->s->count[m->partition][m->offset];
    if (n != 1) {
        if (n == 0)
            v->missing++;
        else
            v->repeated++;
        if (v->first[0] == '\0')
            snprintf(v->first, sizeof v->first,
                     "partition %d offset %lld is in the archive %u times",
                     (int)m->partition, (long long)m->offset, n);
    } else if (id != NULL && v->s->id[m->partition][m->offset] != NULL &&
               strcmp(id, v->s->id[m->partition][m->offset]) != 0) {
        v->wrong++;
        snprintf(v->first, sizeof v->first, "offset %lld: id %s, not %s",
                 (long long)m->offset, v->s->id[m->partition][m->offset], id);
    }
}

/* Asserts the archive in dir holds every record of the topic exactly
 * once, and nothing else; returns the scan (scan_free it). */
static scan *assert_exactly_once(tu_cluster *c, const char *dir)
{
    scan *s = scan_archive(dir);
    vs v;

    memset(&v, 0, sizeof v);
    v.s = s;
    ck_assert_msg(s->problems == 0, "%ld problems in the archive; first: %s",
                  s->problems, s->first_problem);
    tu_read_topic(c, topic_override ? topic_override : tu_topic(c, "delivery"),
                  against, &v);
    ck_assert_msg(v.missing == 0 && v.repeated == 0 && v.wrong == 0,
                  "of %ld records: %ld missing, %ld repeated, %ld wrong; %s",
                  v.records, v.missing, v.repeated, v.wrong, v.first);
    ck_assert_msg(s->lines == v.records,
                  "%ld lines in the archive for %ld records", s->lines,
                  v.records);
    ck_assert_int_eq(s->tmp_files, 0);
    return s;
}

/* Files under dir: all of them (finished or not: a sign of the archiver
 * at work), or only the finished ones (not temporary, not reports). */
static int nfiles;
static bool finished_only;
static int count_file(const char *path, const struct stat *st, int flag,
                      struct FTW *ftw)
{
    (void)st;
    if (flag == FTW_F &&
        (!finished_only ||
         (path[ftw->base] != '.' && strstr(path, "/_reports/") == NULL)))
        nfiles++;
    return 0;
}

static int count_files(const char *dir, bool finished)
{
    nfiles = 0;
    finished_only = finished;
    nftw(dir, count_file, 16, FTW_PHYS);
    return nfiles;
}

static int files_in(const char *dir)
{
    return count_files(dir, false);
}

static int finished_in(const char *dir)
{
    return count_files(dir, true);
}

/* The group's committed offsets of the topic's partitions (-1: none). */
static void committed(tu_cluster *c, const char *group, int np, int64_t *out)
{
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    rd_kafka_topic_partition_list_t *l = rd_kafka_topic_partition_list_new(np);
    char err[256];
    rd_kafka_t *rk;

    rd_kafka_conf_set(conf, "bootstrap.servers", c->bootstrap, err, sizeof err);
    rd_kafka_conf_set(conf, "group.id", group, err, sizeof err);
    rd_kafka_conf_set(conf, "log_level", "0", err, sizeof err);
    rk = rd_kafka_new(RD_KAFKA_CONSUMER, conf, err, sizeof err);
    ck_assert_ptr_nonnull(rk);
    for (int p = 0; p < np; p++)
        rd_kafka_topic_partition_list_add(l, tu_topic(c, "delivery"), p);
    ck_assert_int_eq(rd_kafka_committed(rk, l, 10000), 0);
    for (int p = 0; p < np; p++)
        out[p] = l->elems[p].offset;
    rd_kafka_topic_partition_list_destroy(l);
    rd_kafka_consumer_close(rk);
    rd_kafka_destroy(rk);
}

/* ---- writing events --------------------------------------------------- */

static long written;

static void write_events(int n, const char *payload)
{
    static const char *actions[] = {"created", "assigned", "picked_up",
                                    "delivered"};
    char id[32];

    for (int i = 0; i < n; i++, written++) {
        snprintf(id, sizeof id, "D-%ld", written % 37);
        tu_write(tu_db, tu_ob, "delivery", id, actions[written % 4],
                 payload ? payload : "{\"region\":\"north\",\"n\":1}", 0);
    }
}

static de_relay *relay_for(tu_cluster *c)
{
    de_conf *conf = tu_relay_conf(c, (const char *)NULL);
    de_relay *r = NULL;

    tu_ok(de_relay_start(tu_ob, conf, &r));
    de_conf_destroy(conf);
    return r;
}

static const char *archive_dir(void)
{
    return tu_path(tu_dir, "archive");
}

/* ---- tests -------------------------------------------------------------- */

/* SIGKILL at random moments while events flow.  Two archivers, each in a
 * group and a directory of its own (two whole archives of one topic),
 * are killed side by side -- so that the ~3 s a consumer group takes to
 * rebalance is paid once for two kills -- each a random 0..600 ms after
 * it was seen writing (a file appeared): mid-line, mid-rename or
 * mid-commit.  A final run of each catches up. */
START_TEST(every_event_once_across_random_sigkills)
{
    const char *e = getenv("DE_ARCHIVE_KILLS");
    int kills = e ? atoi(e) : 10, busy_kills = 0;
    unsigned seed = (unsigned)time(NULL);

    srand(seed);
    for (int w = tu_cluster_first(); w < tu_cluster_count(); w++) {
        tu_cluster *c = tu_cluster_new(w, 1);
        de_relay *r;
        proc *p[2];
        char dir[2][4096], group[2][32];

        tu_topic_create(c, "delivery", 3);
        r = relay_for(c);
        written = 0;
        /* The topic exists before the archiver looks (a cluster that
         * creates topics on first use). */
        write_events(1, NULL);
        tu_ok(de_relay_flush(r, 30000));
        for (int l = 0; l < 2; l++) {
            snprintf(dir[l], sizeof dir[l], "%s/%d-%d", archive_dir(), w, l);
            snprintf(group[l], sizeof group[l], "g-kill-%d", l);
        }
        for (int k = 0; k < kills; k += 2) {
            int before[2];
            int64_t kill_at[2];
            nprocs = 0; /* all reaped: the slots can be reused */
            for (int l = 0; l < 2; l++) {
                before[l] = files_in(dir[l]);
                p[l] = archiver(c, dir[l], group[l], 0, "--roll-ms", "150",
                                "--roll-bytes", "3000", (const char *)NULL);
                kill_at[l] = -1;
            }
            /* Events flow until both are seen at work, and each is
             * killed at its own random moment after that. */
            for (int64_t dl = tu_now_ms() + 30000;
                 tu_now_ms() < dl && (kill_at[0] != -2 || kill_at[1] != -2);) {
                write_events(2, NULL);
                usleep(10000);
                for (int l = 0; l < 2; l++) {
                    if (kill_at[l] == -2)
                        continue;
                    ck_assert_msg(!exited(p[l]), "the archiver exited: %s",
                                  slurp(p[l]->err));
                    if (kill_at[l] == -1 && files_in(dir[l]) != before[l]) {
                        busy_kills++;
                        kill_at[l] = tu_now_ms() + rand() % 600;
                    }
                    if (kill_at[l] >= 0 && tu_now_ms() >= kill_at[l]) {
                        kill(p[l]->pid, SIGKILL);
                        waitpid(p[l]->pid, &p[l]->status, 0);
                        p[l]->exited = 1;
                        kill_at[l] = -2;
                    }
                }
            }
            for (int l = 0; l < 2; l++)
                if (!p[l]->exited) {
                    kill(p[l]->pid, SIGKILL); /* never seen at work */
                    waitpid(p[l]->pid, &p[l]->status, 0);
                    p[l]->exited = 1;
                }
        }
        tu_ok(de_relay_flush(r, 30000));
        nprocs = 0;
        for (int l = 0; l < 2; l++)
            p[l] = archiver(c, dir[l], group[l], 0, "--roll-ms", "150",
                            "--until-idle", "1500", (const char *)NULL);
        for (int l = 0; l < 2; l++) {
            scan *s;
            ck_assert_int_eq(finish(p[l], 60000), 0);
            s = assert_exactly_once(c, dir[l]);
            ck_assert_int_eq(s->events, written);
            fprintf(stderr,
                    "archive kills (seed %u): archive %d: %ld events in %ld "
                    "files, each once\n",
                    seed, l, s->events, s->files);
            scan_free(s);
        }
        fprintf(stderr, "archive kills: %d SIGKILLs, %d while writing\n",
                (kills + 1) / 2 * 2, busy_kills);
        ck_assert_int_ge(busy_kills, kills / 2);
        tu_ok(de_relay_stop(r, 10000));
        tu_cluster_destroy(c);
    }
}
END_TEST

/* Two archivers in one group: the second joins while events flow (a
 * rebalance), then the first leaves (another); each partition's files
 * follow on from where the other member stopped, and on the way out
 * everything archived is committed. */
START_TEST(a_rebalance_between_two_archivers)
{
    for (int w = tu_cluster_first(); w < tu_cluster_count(); w++) {
        tu_cluster *c = tu_cluster_new(w, 1);
        de_relay *r;
        proc *a, *b;
        scan *s;
        int64_t off[4];
        char dir[4096];
        long a_events = 0, b_events = 0;

        snprintf(dir, sizeof dir, "%s/%d", archive_dir(), w);
        tu_topic_create(c, "delivery", 4);
        r = relay_for(c);
        written = 0;
        nprocs = 0;
        write_events(1, NULL);
        tu_ok(de_relay_flush(r, 30000));
        a = archiver(c, dir, "g-rebal", 0, "--roll-ms", "200",
                     (const char *)NULL);
        for (int64_t dl = tu_now_ms() + 20000;
             tu_now_ms() < dl && files_in(dir) == 0;)
            write_events(4, NULL), usleep(20000);
        b = archiver(c, dir, "g-rebal", 0, "--roll-ms", "200",
                     (const char *)NULL);
        for (int64_t dl = tu_now_ms() + 6000; tu_now_ms() < dl;)
            write_events(4, NULL), usleep(20000);
        kill(a->pid, SIGTERM);
        ck_assert_int_eq(finish(a, 30000), 0);
        for (int64_t dl = tu_now_ms() + 2000; tu_now_ms() < dl;)
            write_events(4, NULL), usleep(20000);
        tu_ok(de_relay_flush(r, 30000));
        /* b catches up on all four partitions. */
        ck_assert_msg(tu_wait_for(({
                                      scan *t = scan_archive(dir);
                                      bool all = t->lines == written;
                                      scan_free(t);
                                      all;
                                  }),
                                  60000),
                      "the archive never caught up; b: %s", slurp(b->err));
        kill(b->pid, SIGTERM);
        ck_assert_int_eq(finish(b, 30000), 0);
        a_events = events_of(a);
        b_events = events_of(b);
        ck_assert_msg(a_events > 0 && b_events > 0,
                      "both members archived: a %ld, b %ld", a_events,
                      b_events);
        s = assert_exactly_once(c, dir);
        ck_assert_int_eq(s->events, written);
        committed(c, "g-rebal", 4, off);
        for (int p = 0; p < 4; p++)
            ck_assert_msg(s->high[p] == 0 || off[p] == s->high[p],
                          "partition %d committed %lld, end %lld", p,
                          (long long)off[p], (long long)s->high[p]);
        scan_free(s);
        tu_ok(de_relay_stop(r, 10000));
        tu_cluster_destroy(c);
    }
}
END_TEST

/* The window a random kill seldom hits, made certain: files on disk
 * beyond the committed offset (a crash after the rename, before the
 * commit: here a group that never committed, as the mock refuses a
 * commit from outside a group's generation) and a crash's unfinished
 * temporary file.  The next run skips what the files hold, deletes the
 * temporary file, and commits. */
START_TEST(files_beyond_the_committed_offset_are_not_archived_again)
{
    for (int w = tu_cluster_first(); w < tu_cluster_count(); w++) {
        tu_cluster *c = tu_cluster_new(w, 1);
        char dir[4096], tmp[4400];
        de_relay *r;
        proc *p;
        scan *s;
        int64_t off[1];
        FILE *f;

        snprintf(dir, sizeof dir, "%s/%d", archive_dir(), w);
        tu_topic_create(c, "delivery", 1);
        r = relay_for(c);
        written = 0;
        nprocs = 0;
        write_events(50, NULL);
        tu_ok(de_relay_flush(r, 30000));
        p = archiver(c, dir, "g-back", 0, "--roll-bytes", "2000",
                     "--until-idle", "1000", (const char *)NULL);
        ck_assert_int_eq(finish(p, 60000), 0);
        committed(c, "g-back2", 1, off);
        ck_assert_int_lt(off[0], 0);
        snprintf(tmp, sizeof tmp, "%s/%s/_unparsed/.%s+0+50.ndjson.gz.tmp", dir,
                 tu_topic(c, "delivery"), tu_topic(c, "delivery"));
        mkdir(tu_path(dir, tu_topic(c, "delivery")), 0755);
        mkdir(tu_path(tu_path(dir, tu_topic(c, "delivery")), "_unparsed"),
              0755);
        ck_assert_ptr_nonnull(f = fopen(tmp, "w"));
        fputs("half a file", f);
        fclose(f);
        write_events(20, NULL);
        tu_ok(de_relay_flush(r, 30000));
        p = archiver(c, dir, "g-back2", 0, "--until-idle", "1000",
                     (const char *)NULL);
        ck_assert_int_eq(finish(p, 60000), 0);
        s = assert_exactly_once(c, dir); /* no temporary file is left */
        ck_assert_int_eq(s->events, 70);
        ck_assert_int_eq(events_of(p), 20);
        committed(c, "g-back2", 1, off);
        ck_assert_int_eq(off[0], 70);
        scan_free(s);
        tu_ok(de_relay_stop(r, 10000));
        tu_cluster_destroy(c);
    }
}
END_TEST

/* Batch over the archive = the stream: live_stats' per-minute windows,
 * computed from the archive files alone with SQLite's JSON functions,
 * equal what live_stats computed from the stream -- while the archiver
 * was SIGKILLed three times in the middle of its work.
 *
 * The service publishes its whole stream first, and each archiver is
 * killed once it has finished a random 1..8 files of it: an archiver
 * killed a random time after it started writing could, on a fast disk,
 * archive everything before the last kill (and the next one would then
 * have nothing to write).  The stream is some 300 files long, so three
 * kills never reach its end. */
START_TEST(live_stats_from_the_archive_equals_the_stream)
{
    tu_cluster *c = tu_cluster_new(0, 3);
    const char *dir = archive_dir();
    pid_t svc, ls;
    sqlite3 *db;
    scan *s;
    proc *p;
    char sql[4096];
    int kills = 0;
    unsigned seed = (unsigned)time(NULL);
    static const char stream[] =
        "SELECT window_start_ms, region, created, delivered, canceled, "
        "delivery_ms_sum, delivery_ms_n FROM ls.window_stats";
    /* Each event once (by id), its time in ms; a delivery's region from
     * its created event; a delivery's time from the last assignment
     * before it in the subject's order (as live_stats keeps it). */
    static const char batch[] =
        "WITH e AS (SELECT json_extract(line, '$.id') AS id,"
        "    json_extract(line, '$.subject') AS d,"
        "    json_extract(line, '$.action') AS a,"
        "    json_extract(line, '$.subjectseq') AS seq,"
        "    json_extract(line, '$.data.region') AS region,"
        "    CAST(strftime('%s', substr(json_extract(line, '$.time'), 1, 19))"
        "      AS INTEGER) * 1000 + CAST(substr(json_extract(line, '$.time'),"
        "      21, 3) AS INTEGER) AS t"
        "  FROM lines WHERE json_extract(line, '$.subjecttype') = 'delivery'"
        "  GROUP BY 1),"
        " r AS (SELECT d, region FROM e WHERE a = 'created'),"
        " ev AS ("
        "  SELECT r.region, e.t, 1 AS c, 0 AS x, 0 AS y, 0 AS ms, 0 AS n"
        "    FROM e JOIN r USING (d) WHERE a = 'created'"
        "  UNION ALL SELECT r.region, e.t, 0, 1, 0, coalesce(e.t - (SELECT"
        "    g.t FROM e g WHERE g.d = e.d AND g.a = 'assigned' AND g.seq <"
        "    e.seq ORDER BY g.seq DESC LIMIT 1), 0), (SELECT count(*) > 0"
        "    FROM e g WHERE g.d = e.d AND g.a = 'assigned' AND g.seq < e.seq)"
        "    FROM e JOIN r USING (d) WHERE a = 'delivered'"
        "  UNION ALL SELECT r.region, e.t, 0, 0, 1, 0, 0"
        "    FROM e JOIN r USING (d) WHERE a = 'canceled')"
        "SELECT t - t % 60000, region, sum(c), sum(x), sum(y), sum(ms),"
        "       sum(n) FROM ev GROUP BY 1, 2";

    ck_assert_int_eq(
        rd_kafka_mock_topic_create(c->mock, "delivery.events", 6, 1), 0);
    topic_override = "delivery.events";
    ls = tu_example("live_stats", "--bootstrap", c->bootstrap, "--db",
                    tu_path(tu_dir, "ls.db"), "--until-idle", "2500");
    svc = tu_example("delivery_service", "--db", tu_path(tu_dir, "svc.db"),
                     "--deliveries", "300", "--bootstrap", c->bootstrap);
    tu_example_wait(svc, "delivery_service");
    /* The archiver, killed at random points of its catch-up. */
    srand(seed);
    while (kills < 3) {
        int before = finished_in(dir), files = 1 + rand() % 8;
        nprocs = 0;
        p = archiver(c, dir, "g-stats", 0, "--roll-ms", "100", "--roll-bytes",
                     "2000", (const char *)NULL);
        ck_assert_msg(
            tu_wait_for(finished_in(dir) >= before + files || exited(p), 30000),
            "the archiver finished %d of %d files in 30 s (seed %u): %s",
            finished_in(dir) - before, files, seed, slurp(p->err));
        ck_assert_msg(!exited(p), "the archiver exited: %s", slurp(p->err));
        kill(p->pid, SIGKILL);
        waitpid(p->pid, &p->status, 0);
        p->exited = 1;
        kills++;
    }
    nprocs = 0;
    p = archiver(c, dir, "g-stats", 0, "--until-idle", "2000",
                 (const char *)NULL);
    ck_assert_int_eq(finish(p, 60000), 0);
    tu_example_wait(ls, "live_stats");

    db = tu_open(tu_path(tu_dir, "batch.db"));
    tu_exec(db, "CREATE TABLE lines(line TEXT NOT NULL)");
    tu_exec(db, "BEGIN");
    ck_assert_int_eq(sqlite3_prepare_v2(db, "INSERT INTO lines VALUES (?1)", -1,
                                        &SINK, NULL),
                     SQLITE_OK);
    s = assert_exactly_once(c, dir);
    sqlite3_finalize(SINK);
    SINK = NULL;
    tu_exec(db, "COMMIT");
    snprintf(sql, sizeof sql, "ATTACH '%s' AS ls", tu_path(tu_dir, "ls.db"));
    tu_exec(db, sql);
    ck_assert_int_gt(tu_query_int(db, "SELECT count(*) FROM ls.window_stats"),
                     0);
    snprintf(sql, sizeof sql,
             "SELECT count(*) FROM (SELECT * FROM (%s) EXCEPT SELECT * FROM "
             "(%s))",
             stream, batch);
    ck_assert_msg(tu_query_int(db, sql) == 0,
                  "windows of the stream not in the batch over the archive");
    snprintf(sql, sizeof sql,
             "SELECT count(*) FROM (SELECT * FROM (%s) EXCEPT SELECT * FROM "
             "(%s))",
             batch, stream);
    ck_assert_msg(tu_query_int(db, sql) == 0,
                  "windows of the batch over the archive not in the stream");
    fprintf(stderr,
            "archive = stream: %lld windows from %ld archived events in %ld "
            "files (%d SIGKILLs, seed %u)\n",
            (long long)tu_query_int(db, "SELECT count(*) FROM ls.window_stats"),
            s->events, s->files, kills, seed);
    scan_free(s);
    sqlite3_close(db);
    tu_cluster_destroy(c);
}
END_TEST

/* Raw records on the topic, as another producer writes them. */
static void produce(tu_cluster *c, const char *key, size_t key_len,
                    const char *value, size_t len, const char *const *hdrs)
{
    char copy[256];

    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    rd_kafka_headers_t *h = rd_kafka_headers_new(8);
    char err[256];
    rd_kafka_t *rk;

    rd_kafka_conf_set(conf, "bootstrap.servers", c->bootstrap, err, sizeof err);
    rd_kafka_conf_set(conf, "log_level", "0", err, sizeof err);
    rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, err, sizeof err);
    ck_assert_ptr_nonnull(rk);
    ck_assert_uint_le(len, sizeof copy);
    memcpy(copy, value, len);
    for (int i = 0; hdrs != NULL && hdrs[i] != NULL; i += 2)
        rd_kafka_header_add(h, hdrs[i], -1, hdrs[i + 1], -1);
    ck_assert_int_eq(
        rd_kafka_producev(rk, RD_KAFKA_V_TOPIC(tu_topic(c, "delivery")),
                          RD_KAFKA_V_PARTITION(0), RD_KAFKA_V_KEY(key, key_len),
                          RD_KAFKA_V_VALUE(copy, len), RD_KAFKA_V_HEADERS(h),
                          RD_KAFKA_V_END),
        0);
    ck_assert_int_eq(rd_kafka_flush(rk, 10000), 0);
    rd_kafka_destroy(rk);
}

/* A CloudEvent of subject D-X from another producer, with its own number. */
static void produce_numbered(tu_cluster *c, const char *id, const char *seq)
{
    const char *h[] = {"ce_specversion",
                       "1.0",
                       "ce_id",
                       id,
                       "ce_source",
                       "/other",
                       "ce_type",
                       "delivery.assigned",
                       "ce_subject",
                       "D-X",
                       "ce_time",
                       "2026-11-25T10:15:00.000Z",
                       "ce_subjecttype",
                       "delivery",
                       "ce_subjectseq",
                       seq,
                       "content-type",
                       "application/json",
                       NULL};
    produce(c, "D-X", 3, "{\"region\":\"east\"}", 17, h);
}

static int64_t at(int y, int mo, int d, int h, int mi)
{
    struct tm tm = {0};

    tm.tm_year = y - 1900;
    tm.tm_mon = mo - 1;
    tm.tm_mday = d;
    tm.tm_hour = h;
    tm.tm_min = mi;
    return (int64_t)timegm(&tm) * 1000;
}

/* Late events go to the partition of their own hour; records that are not
 * events go to _unparsed/ as they are, with the reason; the run's report
 * counts the gap, duplicate and conflict of ce_subjectseq it saw. */
START_TEST(late_events_foreign_records_and_the_report)
{
    for (int w = tu_cluster_first(); w < tu_cluster_count(); w++) {
        tu_cluster *c = tu_cluster_new(w, 1);
        int64_t hours[] = {at(2026, 11, 25, 10, 5), at(2026, 11, 25, 11, 0),
                           at(2026, 11, 25, 10, 59), at(2026, 11, 24, 23, 30),
                           at(2026, 11, 25, 11, 1)};
        const char *bad_time[] = {
            "ce_specversion", "1.0", "ce_id",   "e-bad",     "ce_source", "/x",
            "ce_type",        "t.a", "ce_time", "yesterday", NULL};
        de_relay *r;
        proc *p;
        scan *s;
        char dir[4096], path[4400];
        json_t *rep = NULL, *l;
        size_t i;
        int found = 0;
        DIR *d;
        struct dirent *de;

        snprintf(dir, sizeof dir, "%s/%d", archive_dir(), w);
        tu_topic_create(c, "delivery", 1);
        r = relay_for(c);
        for (int k = 0; k < 5; k++) {
            de_event ev = {.subject_type = "delivery",
                           .subject_id = "D-1",
                           .action = "assigned",
                           .payload = "{\"rider\":\"R-1\"}",
                           .occurred_at_ms = hours[k]};
            tu_exec(tu_db, "BEGIN");
            tu_ok(de_record(tu_ob, &ev, NULL));
            tu_exec(tu_db, "COMMIT");
        }
        tu_ok(de_relay_flush(r, 30000));
        produce(c, "\xff\x01k", 3, "not json \x00\xfe", 11, NULL);
        produce(c, "D-2", 3, "{}", 2, bad_time);
        produce_numbered(c, "x-1", "1");
        produce_numbered(c, "x-2", "2");
        produce_numbered(c, "x-4", "4");  /* a gap */
        produce_numbered(c, "x-4", "4");  /* a duplicate */
        produce_numbered(c, "x-4b", "4"); /* a conflict */
        p = archiver(c, dir, "g-late", 0, "--until-idle", "1000",
                     (const char *)NULL);
        ck_assert_int_eq(finish(p, 60000), 0);
        s = assert_exactly_once(c, dir);
        ck_assert_int_eq(s->events, 10);
        ck_assert_int_eq(s->unparsed, 2);
        /* One file per run of one hour: 10, 11, 10, 23 (a day before),
         * 11, then 10 for the other producer's. */
        ck_assert_int_eq(s->files, 7);
        l = json_array_get(s->unparsed_lines, 0);
        ck_assert_str_eq(json_string_value(json_object_get(l, "key_base64")),
                         "/wFr");
        ck_assert_str_eq(json_string_value(json_object_get(l, "value_base64")),
                         "bm90IGpzb24gAP4=");
        ck_assert_ptr_nonnull(strstr(
            json_string_value(json_object_get(l, "reason")), "ce_specversion"));
        l = json_array_get(s->unparsed_lines, 1);
        ck_assert_ptr_nonnull(
            strstr(json_string_value(json_object_get(l, "reason")), "ce_time"));
        ck_assert_int_eq(json_array_size(json_object_get(l, "headers")), 5);
        scan_free(s);
        /* The report. */
        snprintf(path, sizeof path, "%s/_reports", dir);
        d = opendir(path);
        ck_assert_ptr_nonnull(d);
        while ((de = readdir(d)) != NULL)
            if (de->d_name[0] != '.') {
                snprintf(path, sizeof path, "%s/_reports/%s", dir, de->d_name);
                rep = json_load_file(path, 0, NULL);
                found++;
            }
        closedir(d);
        ck_assert_int_eq(found, 1);
        ck_assert_ptr_nonnull(rep);
        ck_assert_int_eq(json_integer_value(json_object_get(rep, "events")),
                         10);
        ck_assert_int_eq(json_integer_value(json_object_get(rep, "gaps")), 1);
        ck_assert_int_eq(json_integer_value(json_object_get(rep, "duplicates")),
                         1);
        ck_assert_int_eq(json_integer_value(json_object_get(rep, "conflicts")),
                         1);
        json_array_foreach(json_object_get(rep, "examples"), i, l)
        {
            ck_assert_str_eq(json_string_value(json_object_get(l, "subject")),
                             "D-X");
        }
        json_decref(rep);
        tu_ok(de_relay_stop(r, 10000));
        tu_cluster_destroy(c);
    }
}
END_TEST

/* A file that cannot be written (RLIMIT_FSIZE: EFBIG, as ENOSPC on a full
 * disk) stops the archiver with a message naming it; what it committed
 * is on disk, the broken file is gone, and the next run archives the rest
 * exactly once. */
START_TEST(a_full_disk_commits_nothing_that_is_not_on_disk)
{
    for (int w = tu_cluster_first(); w < tu_cluster_count(); w++) {
        tu_cluster *c = tu_cluster_new(w, 1);
        char dir[4096], blob[4200], hex[4001];
        de_relay *r;
        proc *p;
        scan *s;
        int64_t off[1];

        snprintf(dir, sizeof dir, "%s/%d", archive_dir(), w);
        tu_topic_create(c, "delivery", 1);
        r = relay_for(c);
        written = 0;
        nprocs = 0;
        /* Small, compressible events fill files far below the limit... */
        write_events(200, NULL);
        /* ...then events whose lines barely compress (each its own). */
        for (int k = 0; k < 20; k++) {
            for (int i = 0; i < 4000; i++)
                hex[i] = "0123456789abcdef"[rand() % 16];
            hex[4000] = '\0';
            snprintf(blob, sizeof blob, "{\"blob\":\"%s\"}", hex);
            write_events(1, blob);
        }
        tu_ok(de_relay_flush(r, 30000));
        p = archiver(c, dir, "g-full", 8192, "--roll-bytes", "30000",
                     "--roll-ms", "100000", "--until-idle", "2000",
                     (const char *)NULL);
        {
            int st = finish(p, 60000);
            ck_assert_msg(st == 1, "exit %d; stderr: %s", st, slurp(p->err));
        }
        ck_assert_msg(strstr(slurp(p->err), "File too large") != NULL &&
                          strstr(slurp(p->err), "cannot write") != NULL,
                      "stderr: %s", slurp(p->err));
        s = scan_archive(dir);
        ck_assert_msg(s->problems == 0, "%s", s->first_problem);
        ck_assert_int_eq(s->tmp_files, 0);
        ck_assert_int_gt(s->lines, 0);
        ck_assert_int_lt(s->lines, written);
        /* Committed: exactly what is in finished files. */
        committed(c, "g-full", 1, off);
        ck_assert_int_eq(off[0], s->lines);
        for (int64_t o = 0; o < off[0]; o++)
            ck_assert_int_eq(s->count[0][o], 1);
        scan_free(s);
        p = archiver(c, dir, "g-full", 0, "--until-idle", "1000",
                     (const char *)NULL);
        ck_assert_int_eq(finish(p, 60000), 0);
        s = assert_exactly_once(c, dir);
        ck_assert_int_eq(s->events, written);
        scan_free(s);
        tu_ok(de_relay_stop(r, 10000));
        tu_cluster_destroy(c);
    }
}
END_TEST

static Suite *archive_suite(void)
{
    Suite *s = suite_create("archive");
    TCase *once = tcase_create("exactly-once");
    TCase *kills = tcase_create("kills");

    tcase_add_checked_fixture(once, setup, teardown);
    tcase_set_timeout(once, 180);
    tcase_add_test(once, late_events_foreign_records_and_the_report);
    tcase_add_test(once, a_full_disk_commits_nothing_that_is_not_on_disk);
    tcase_add_test(once, a_rebalance_between_two_archivers);
    tcase_add_test(once,
                   files_beyond_the_committed_offset_are_not_archived_again);
    suite_add_tcase(s, once);

    tcase_add_checked_fixture(kills, setup, teardown);
    tcase_set_timeout(kills, 1800);
    tcase_add_test(kills, every_event_once_across_random_sigkills);
    tcase_add_test(kills, live_stats_from_the_archive_equals_the_stream);
    suite_add_tcase(s, kills);
    return s;
}

int main(void)
{
    return tu_run(archive_suite()) ? EXIT_FAILURE : EXIT_SUCCESS;
}

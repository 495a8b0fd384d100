/* SPDX-License-Identifier: MIT */
/*
 * bench_archive.c -- how fast `deliveryevents archive` lands events on
 * disk, against the floor its format sets: this process gzip-compressing
 * the very same NDJSON lines (same zlib level, same file boundaries) in
 * memory, with no Kafka and no disk.  A bare librdkafka consumer reading
 * the same topic is reported beside it.
 *
 * A relay publishes BENCH_EVENTS (100,000) events over 10,000 subjects to
 * a 12-partition topic on the mock cluster (in its own process).  Then,
 * in alternating rounds, each with a fresh group and directory:
 *
 *  - archive: the installed tool (DE_TOOL) with --until-idle 1000 and its
 *    default --roll-ms and --roll-bytes; its rate is events over the time
 *    from the first record read to the last, plus the closing of the
 *    files at the end (finish, fsync, rename, commit), from the run's
 *    report -- the group join and the idle wait are left out;
 *  - floor: the files that run wrote, decompressed, compressed again;
 *  - bare: a librdkafka consumer reading every record, not decoding.
 *
 * Target: archive >= 0.7x the floor.  Environment: BENCH_EVENTS,
 * BENCH_ROUNDS (3), DE_TOOL.
 */
#include "bench_kafka.h"

#include <dirent.h>
#include <sys/resource.h>
#include <jansson.h>
#include <zlib.h>

#define TOPIC "bench.delivery.events"

/* The archive's files, decompressed, for the floor. */
static struct files {
    char **text;
    size_t *len;
    int n, cap;
    long lines;
} F;

static int take_file(const char *path, const struct stat *st, int flag,
                     struct FTW *ftw)
{
    gzFile g;
    char *buf = NULL;
    size_t n = 0, cap = 0;
    int r;

    (void)st;
    if (flag != FTW_F || path[ftw->base] == '.' ||
        strstr(path, ".ndjson.gz") == NULL)
        return 0;
    BENCH_CHECK((g = gzopen(path, "rb")) != NULL, "open %s", path);
    do {
        if (cap - n < 65536)
            BENCH_CHECK((buf = realloc(buf, cap = cap ? cap * 2 : 1 << 20)),
                        "out of memory");
        r = gzread(g, buf + n, (unsigned)(cap - n));
        if (r > 0)
            n += (size_t)r;
    } while (r > 0);
    gzclose(g);
    if (F.n == F.cap) {
        F.cap = F.cap ? F.cap * 2 : 64;
        F.text = realloc(F.text, (size_t)F.cap * sizeof *F.text);
        F.len = realloc(F.len, (size_t)F.cap * sizeof *F.len);
        BENCH_CHECK(F.text && F.len, "out of memory");
    }
    for (size_t i = 0; i < n; i++)
        F.lines += buf[i] == '\n';
    F.text[F.n] = buf;
    F.len[F.n++] = n;
    return 0;
}

static void files_free(void)
{
    for (int i = 0; i < F.n; i++)
        free(F.text[i]);
    free(F.text);
    free(F.len);
    memset(&F, 0, sizeof F);
}

/* The floor: the same lines, file by file, through the same deflate
 * (gzip wrapper, default level), into memory: lines per second. */
static double floor_round(void)
{
    static unsigned char out[256 * 1024];
    double t0 = bench_now();

    for (int i = 0; i < F.n; i++) {
        z_stream z;
        int zr;
        memset(&z, 0, sizeof z);
        BENCH_CHECK(deflateInit2(&z, Z_DEFAULT_COMPRESSION, Z_DEFLATED, 15 + 16,
                                 8, Z_DEFAULT_STRATEGY) == Z_OK,
                    "deflateInit2");
        z.next_in = (unsigned char *)F.text[i];
        z.avail_in = (unsigned)F.len[i];
        do {
            z.next_out = out;
            z.avail_out = sizeof out;
            zr = deflate(&z, Z_FINISH);
        } while (zr == Z_OK);
        BENCH_CHECK(zr == Z_STREAM_END, "deflate");
        deflateEnd(&z);
    }
    return (double)F.lines / (bench_now() - t0);
}

/* One archive run into dir with group: events per second from its
 * report. */
static double archive_round(const char *dir, int round, long n)
{
    char group[64], rdir[4300], path[4600];
    pid_t pid;
    int status;
    DIR *d;
    struct dirent *e;
    json_t *rep = NULL;
    double rate;
    struct rusage ru;

    snprintf(group, sizeof group, "bench-archive-%d", round);
    pid = fork();
    BENCH_CHECK(pid >= 0, "fork");
    if (pid == 0) {
        execl(tool, tool, "archive", "-b", bootstrap, "--topic", TOPIC, "--dir",
              dir, "--group", group, "--until-idle", "1000", "-X",
              "log_level=0", (char *)NULL);
        _exit(127);
    }
    BENCH_CHECK(wait4(pid, &status, 0, &ru) == pid && WIFEXITED(status) &&
                    WEXITSTATUS(status) == 0,
                "the archiver failed (status %d)", status);
    snprintf(rdir, sizeof rdir, "%s/_reports", dir);
    BENCH_CHECK((d = opendir(rdir)) != NULL, "no %s", rdir);
    while ((e = readdir(d)) != NULL)
        if (e->d_name[0] != '.') {
            snprintf(path, sizeof path, "%s/%s", rdir, e->d_name);
            rep = json_load_file(path, 0, NULL);
        }
    closedir(d);
    BENCH_CHECK(rep != NULL, "no report in %s", rdir);
    BENCH_CHECK(json_integer_value(json_object_get(rep, "events")) == n,
                "the archiver wrote %lld events of %ld",
                (long long)json_integer_value(json_object_get(rep, "events")),
                n);
    /* From the first record read to the last, plus closing (finishing,
     * fsyncing, renaming, committing) the files at the end: the idle wait
     * of --until-idle in between is not the archiver's work. */
#define J(k) ((double)json_integer_value(json_object_get(rep, k)))
    rate = (double)n /
           ((J("last_read_ms") - J("first_read_ms") + J("final_close_ms")) /
            1000.0);
    printf("  (archiver: %.0f ms reading, %.0f ms closing, %.2f s CPU over "
           "its whole run incl. join and idle)\n",
           J("last_read_ms") - J("first_read_ms"), J("final_close_ms"),
           (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 +
               (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6);
#undef J
    json_decref(rep);
    return rate;
}

int main(void)
{
    long n = bench_env_long("BENCH_EVENTS", 100000);
    long rounds = bench_env_long("BENCH_ROUNDS", 3);
    char *dir = bench_mkdtemp(), db[4200], adir[4300];
    const char *topics[] = {TOPIC ":12", NULL};
    double *bare = calloc((size_t)rounds, sizeof(double));
    double *arch = calloc((size_t)rounds, sizeof(double));
    double *flo = calloc((size_t)rounds, sizeof(double));
    double *ratio = calloc((size_t)rounds, sizeof(double));
    long files = 0;

    tool = getenv("DE_TOOL");
    BENCH_CHECK(tool != NULL, "DE_TOOL must name the deliveryevents binary");
    BENCH_CHECK(bare && arch && flo && ratio, "out of memory");
    snprintf(db, sizeof db, "%s/service.db", dir);
    publish_backlog(topics, db, n, SUBJECTS);

    printf("archive: %ld events over %d subjects, 12 partitions, mock "
           "cluster in its own process; default --roll-ms/--roll-bytes\n",
           n, SUBJECTS);
    for (long i = 0; i < rounds; i++) {
        snprintf(adir, sizeof adir, "%s/archive-%ld", dir, i);
        if (i % 2 == 0) {
            bare[i] = bench_bare_round(TOPIC, n, (int)i);
            arch[i] = archive_round(adir, (int)i, n);
        } else {
            arch[i] = archive_round(adir, (int)i, n);
            bare[i] = bench_bare_round(TOPIC, n, (int)i);
        }
        nftw(adir, take_file, 16, FTW_PHYS);
        BENCH_CHECK(F.lines == n, "%ld lines in the archive for %ld events",
                    F.lines, n);
        files = F.n;
        flo[i] = floor_round();
        files_free();
        ratio[i] = arch[i] / flo[i];
        printf("  round %ld: bare %8.0f msg/s, floor %8.0f lines/s, archive "
               "%8.0f events/s, archive/floor %.3f\n",
               i + 1, bare[i], flo[i], arch[i], ratio[i]);
    }
    printf("  bare librdkafka consumer (no decoding) : %8.0f msg/s\n",
           bench_median(bare, (size_t)rounds));
    printf("  floor: gzip of the same lines in memory: %8.0f lines/s\n",
           bench_median(flo, (size_t)rounds));
    printf("  deliveryevents archive (%ld files)     : %8.0f events/s\n", files,
           bench_median(arch, (size_t)rounds));
    printf("  ratio archive / floor                  : %8.3f  (median of "
           "rounds; target >= 0.70) %s\n",
           bench_median(ratio, (size_t)rounds),
           bench_median(ratio, (size_t)rounds) >= 0.7 ? "ok" : "BELOW TARGET");
    stop_mock();
    bench_rmdir(dir);
    free(bare);
    free(arch);
    free(flo);
    free(ratio);
    return 0;
}

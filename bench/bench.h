/* SPDX-License-Identifier: MIT */
/*
 * bench.h -- small helpers shared by the benchmarks: clocks, medians,
 * scratch directories.  Every benchmark prints each figure beside a
 * baseline measured in the same run, and the ratio; rounds of the two
 * alternate so that the shared machine's noise falls on both alike.
 */
#ifndef DE_BENCH_H
#define DE_BENCH_H

#include <ftw.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static inline double bench_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int bench_cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* The median of n values (sorts them). */
static inline double bench_median(double *v, size_t n)
{
    qsort(v, n, sizeof *v, bench_cmp_double);
    return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

/* The q-quantile (0..1) of n values (sorts them). */
static inline double bench_quantile(double *v, size_t n, double q)
{
    size_t i;
    qsort(v, n, sizeof *v, bench_cmp_double);
    i = (size_t)(q * (double)(n - 1) + 0.5);
    return v[i < n ? i : n - 1];
}

static inline long bench_env_long(const char *name, long def)
{
    const char *v = getenv(name);
    return v && *v ? strtol(v, NULL, 10) : def;
}

static inline char *bench_mkdtemp(void)
{
    const char *tmp = getenv("TMPDIR");
    static char dir[4096];
    snprintf(dir, sizeof dir, "%s/de-bench-XXXXXX", tmp && *tmp ? tmp : "/tmp");
    if (mkdtemp(dir) == NULL) {
        perror("mkdtemp");
        exit(1);
    }
    return dir;
}

static int bench_rm_entry(const char *path, const struct stat *sb, int flag,
                          struct FTW *ftw)
{
    (void)sb;
    (void)flag;
    (void)ftw;
    return remove(path);
}

static inline void bench_rmdir(const char *dir)
{
    nftw(dir, bench_rm_entry, 16, FTW_DEPTH | FTW_PHYS);
}

#define BENCH_CHECK(cond, ...)                                                 \
    do {                                                                       \
        if (!(cond)) {                                                         \
            fprintf(stderr, "bench: " __VA_ARGS__);                            \
            fprintf(stderr, "\n");                                             \
            exit(1);                                                           \
        }                                                                      \
    } while (0)

/* de_conf_set that stops the benchmark on a refused property. */
#define BENCH_SET(conf, key, value)                                            \
    BENCH_CHECK(de_conf_set((conf), (key), (value)) == DE_OK, "%s", de_errmsg())

/* event.hmac.key from BENCH_HMAC_KEY, when set: the cost of the
 * integrity check (docs/PERFORMANCE.md). */
#define BENCH_SET_HMAC(conf)                                                   \
    do {                                                                       \
        if (getenv("BENCH_HMAC_KEY"))                                          \
            BENCH_SET(conf, "event.hmac.key", getenv("BENCH_HMAC_KEY"));       \
    } while (0)

#endif

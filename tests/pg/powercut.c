/* SPDX-License-Identifier: MIT */
/*
 * powercut.c -- see pgserver.h (tpg_power_cut).  The cut itself: every
 * process of the server stopped (SIGSTOP, the postmaster first, so that
 * it forks no new one), then killed, so that the data directory holds
 * one instant's writes; then the undo journals of the shim
 * (tests/pg/shim/powercut.c) applied, newest record first, and each file
 * truncated to its size at its last fsync.
 */
#include "pgserver.h"
#include "shim/powercut_journal.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* The pids whose parent is ppid (at most max) into pids; their count. */
static int children(pid_t ppid, pid_t *pids, int max)
{
    DIR *d = opendir("/proc");
    struct dirent *e;
    int n = 0;

    if (d == NULL)
        return 0;
    while ((e = readdir(d)) != NULL && n < max) {
        char path[300], buf[512], *p;
        FILE *f;
        int parent = 0;
        if (e->d_name[0] < '0' || e->d_name[0] > '9')
            continue;
        snprintf(path, sizeof path, "/proc/%s/stat", e->d_name);
        if ((f = fopen(path, "r")) == NULL)
            continue;
        /* "pid (comm) state ppid ...": comm may hold spaces and ')'. */
        if (fgets(buf, sizeof buf, f) != NULL &&
            (p = strrchr(buf, ')')) != NULL &&
            sscanf(p + 1, " %*c %d", &parent) == 1 && parent == ppid)
            pids[n++] = (pid_t)atoi(e->d_name);
        fclose(f);
    }
    closedir(d);
    return n;
}

/* Gone, or a zombie: it writes nothing any more. */
static bool dead(pid_t pid)
{
    char path[64], buf[512], *p, state = 'X';
    FILE *f;

    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    if ((f = fopen(path, "r")) == NULL)
        return true;
    if (fgets(buf, sizeof buf, f) != NULL && (p = strrchr(buf, ')')) != NULL)
        (void)sscanf(p + 1, " %c", &state);
    fclose(f);
    return state == 'Z' || state == 'X';
}

bool tpc_kill_server(pid_t postmaster)
{
    enum { MAX = 512 };
    pid_t pids[MAX];
    int n;
    time_t deadline = time(NULL) + 30;

    if (kill(postmaster, SIGSTOP) != 0)
        return false;
    n = children(postmaster, pids, MAX);
    for (int i = 0; i < n; i++)
        (void)kill(pids[i], SIGSTOP);
    /* Every one stopped: now none of them writes again. */
    for (int i = 0; i < n; i++)
        (void)kill(pids[i], SIGKILL);
    (void)kill(postmaster, SIGKILL);
    for (int i = 0; i <= n; i++) {
        pid_t p = i < n ? pids[i] : postmaster;
        while (!dead(p)) {
            struct timespec ms = {0, 1000000};
            if (time(NULL) > deadline) {
                fprintf(stderr, "tpc_kill_server: %d still runs\n", (int)p);
                return false;
            }
            nanosleep(&ms, NULL); /* until an outcome: the process gone */
        }
    }
    return true;
}

/* The data files by inode, for the journals (named by inode). */
static struct {
    dev_t dev;
    ino_t ino;
    char *path;
} * files;
static size_t nfiles, capfiles;

static int collect(const char *path, const struct stat *st, int type,
                   struct FTW *ftw)
{
    (void)ftw;
    if (type != FTW_F || !S_ISREG(st->st_mode))
        return 0;
    if (nfiles == capfiles) {
        capfiles = capfiles ? 2 * capfiles : 1024;
        files = realloc(files, capfiles * sizeof *files);
        if (files == NULL)
            return -1;
    }
    files[nfiles].dev = st->st_dev;
    files[nfiles].ino = st->st_ino;
    files[nfiles].path = strdup(path);
    nfiles++;
    return 0;
}

static const char *path_of(unsigned long long dev, unsigned long long ino)
{
    for (size_t i = 0; i < nfiles; i++)
        if ((unsigned long long)files[i].dev == dev &&
            (unsigned long long)files[i].ino == ino)
            return files[i].path;
    return NULL;
}

/* Applies one journal to path; the bytes it took back, -1 on error. */
static long long undo(const char *journal, const char *path)
{
    struct tpc_header h;
    struct tpc_record rec;
    struct {
        int64_t off, len;
        long where;
    } *recs = NULL;
    size_t n = 0, cap = 0;
    long long undone = 0;
    char *buf = NULL;
    FILE *j = fopen(journal, "rb");
    int fd = open(path, O_RDWR);
    struct stat st;

    if (j == NULL || fd < 0 || fread(&h, sizeof h, 1, j) != 1 ||
        h.magic != TPC_MAGIC || fstat(fd, &st) != 0)
        goto fail;
    /* A record cut short was never followed by its write (the shim
     * writes only after its record is whole): ignored. */
    while (fread(&rec, sizeof rec, 1, j) == 1 && rec.len >= 0) {
        long where = ftell(j);
        if (fseek(j, (long)rec.len, SEEK_CUR) != 0 ||
            ftell(j) - where != (long)rec.len)
            break;
        if (n == cap) {
            cap = cap ? 2 * cap : 256;
            if ((recs = realloc(recs, cap * sizeof *recs)) == NULL)
                goto fail;
        }
        recs[n].off = rec.off;
        recs[n].len = rec.len;
        recs[n].where = where;
        n++;
    }
    {
        struct stat js;
        /* The last record may end past the file's end: check by size. */
        if (fstat(fileno(j), &js) != 0)
            goto fail;
        while (n > 0 && recs[n - 1].where + recs[n - 1].len > js.st_size)
            n--;
    }
    for (size_t i = n; i-- > 0;) {
        if ((buf = realloc(buf, (size_t)recs[i].len + 1)) == NULL ||
            fseek(j, recs[i].where, SEEK_SET) != 0 ||
            fread(buf, 1, (size_t)recs[i].len, j) != (size_t)recs[i].len ||
            pwrite(fd, buf, (size_t)recs[i].len, recs[i].off) != recs[i].len)
            goto fail;
        undone += recs[i].len;
    }
    if (st.st_size > h.size)
        undone += st.st_size - h.size;
    if (ftruncate(fd, h.size) != 0 || fsync(fd) != 0)
        goto fail;
    free(buf);
    free(recs);
    fclose(j);
    close(fd);
    return undone;
fail:
    fprintf(stderr, "tpc_restore: cannot undo %s on %s: %s\n", journal, path,
            strerror(errno));
    free(buf);
    free(recs);
    if (j != NULL)
        fclose(j);
    if (fd >= 0)
        close(fd);
    return -1;
}

long long tpc_restore(const char *data_dir, const char *journal_dir,
                      long long *wal)
{
    DIR *d = opendir(journal_dir);
    struct dirent *e;
    long long undone = 0;

    *wal = 0;
    if (d == NULL || nftw(data_dir, collect, 32, FTW_PHYS) != 0) {
        if (d != NULL)
            closedir(d);
        return -1;
    }
    while (undone >= 0 && (e = readdir(d)) != NULL) {
        unsigned long long dev, ino;
        char journal[600];
        const char *path;
        long long u;
        if (sscanf(e->d_name, "%llu-%llu", &dev, &ino) != 2)
            continue;
        snprintf(journal, sizeof journal, "%s/%s", journal_dir, e->d_name);
        /* A file unlinked since: nothing to take back (the shim treats
         * unlinking as durable at once). */
        if ((path = path_of(dev, ino)) != NULL) {
            u = undo(journal, path);
            undone = u < 0 ? -1 : undone + u;
            if (u > 0 && strstr(path, "/pg_wal/") != NULL)
                *wal += u;
        }
        if (undone >= 0)
            (void)unlink(journal);
    }
    closedir(d);
    for (size_t i = 0; i < nfiles; i++)
        free(files[i].path);
    free(files);
    files = NULL;
    nfiles = capfiles = 0;
    return undone;
}

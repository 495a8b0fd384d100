/* SPDX-License-Identifier: MIT */
/*
 * powercut.c -- see powercut.h.  The cut itself: every process of the
 * server stopped (SIGSTOP, the postmaster first, so that it forks no new
 * one), then killed, so that the data directory holds one instant's
 * writes; then the undo journals of the shim (tests/pg/shim/powercut.c)
 * applied, newest record first, and each file truncated to its size at
 * its last fsync.
 */
#include "powercut.h"
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

/* A process's state letter and parent from /proc/<pid>/stat ("pid (comm)
 * state ppid ...": comm may hold spaces and ')'); 'X' when it is gone. */
static char state_of(pid_t pid, pid_t *parent)
{
    char path[64], buf[512], *p, state = 'X';
    int pp = 0;
    FILE *f;

    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    if ((f = fopen(path, "r")) == NULL)
        return 'X';
    if (fgets(buf, sizeof buf, f) != NULL && (p = strrchr(buf, ')')) != NULL &&
        sscanf(p + 1, " %c %d", &state, &pp) != 2)
        state = 'X';
    fclose(f);
    if (parent != NULL)
        *parent = (pid_t)pp;
    return state;
}

/* The pids whose parent is ppid (at most max) into pids; their count. */
static int children(pid_t ppid, pid_t *pids, int max)
{
    DIR *d = opendir("/proc");
    struct dirent *e;
    int n = 0;

    if (d == NULL)
        return 0;
    while ((e = readdir(d)) != NULL && n < max) {
        pid_t pid, parent = 0;
        if (e->d_name[0] < '0' || e->d_name[0] > '9')
            continue;
        pid = (pid_t)atoi(e->d_name);
        if (state_of(pid, &parent) != 'X' && parent == ppid)
            pids[n++] = pid;
    }
    closedir(d);
    return n;
}

/* Gone, or a zombie: it writes nothing any more. */
static bool dead(pid_t pid)
{
    char s = state_of(pid, NULL);

    return s == 'Z' || s == 'X';
}

/* Stopped by a signal, or dead: it writes nothing until it goes on. */
static bool stopped(pid_t pid)
{
    return state_of(pid, NULL) == 'T' || dead(pid);
}

/* Waits until done(pid) holds, up to the deadline (an outcome, checked
 * every millisecond). */
static bool wait_until(bool (*done)(pid_t), pid_t pid, time_t deadline)
{
    struct timespec ms = {0, 1000000};

    while (!done(pid)) {
        if (time(NULL) > deadline) {
            fprintf(stderr, "powercut: process %d does not stop\n", (int)pid);
            return false;
        }
        nanosleep(&ms, NULL);
    }
    return true;
}

bool tpc_stop_process(pid_t pid)
{
    return kill(pid, SIGSTOP) == 0 && wait_until(stopped, pid, time(NULL) + 30);
}

/* Kills the n pids and the postmaster, and waits until none runs. */
static bool kill_all(pid_t postmaster, const pid_t *pids, int n,
                     time_t deadline)
{
    bool ok = true;

    for (int i = 0; i < n; i++)
        (void)kill(pids[i], SIGKILL);
    (void)kill(postmaster, SIGKILL);
    for (int i = 0; i <= n; i++)
        ok = wait_until(dead, i < n ? pids[i] : postmaster, deadline) && ok;
    return ok;
}

bool tpc_kill_server(pid_t postmaster)
{
    enum { MAX = 512 };
    pid_t pids[MAX] = {0}, found[MAX];
    int n = 0, before, k;
    time_t deadline = time(NULL) + 30;
    bool ok = true;

    /* The postmaster first, and until it has stopped: then it forks no
     * more.  A child it was forking as it stopped may show in a later
     * scan only: scan until one finds no new child.  Every pid seen is
     * kept (its children are never reaped while the postmaster is
     * stopped, so none of them leaves the list). */
    if (!tpc_stop_process(postmaster)) {
        (void)kill_all(postmaster, pids, 0, deadline);
        return false;
    }
    do {
        before = n;
        k = children(postmaster, found, MAX);
        for (int i = 0; i < k; i++) {
            int j = 0;
            while (j < n && pids[j] != found[i])
                j++;
            if (j == n && n < MAX)
                pids[n++] = found[i];
        }
        for (int i = 0; i < n; i++)
            (void)kill(pids[i], SIGSTOP);
        for (int i = 0; ok && i < n; i++)
            ok = wait_until(stopped, pids[i], deadline);
    } while (ok && n != before);
    if (n == MAX) {
        fprintf(stderr, "powercut: more than %d server processes\n", MAX);
        ok = false;
    }
    /* Every one stopped at once: now none of them writes again. */
    return kill_all(postmaster, pids, n, deadline) && ok;
}

/* The data files by inode, for the journals (named by inode). */
static struct file {
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
        size_t cap = capfiles ? 2 * capfiles : 1024;
        struct file *more = realloc(files, cap * sizeof *files);
        if (more == NULL)
            return -1;
        files = more;
        capfiles = cap;
    }
    files[nfiles].dev = st->st_dev;
    files[nfiles].ino = st->st_ino;
    if ((files[nfiles].path = strdup(path)) == NULL)
        return -1;
    nfiles++;
    return 0;
}

static void forget_files(void)
{
    for (size_t i = 0; i < nfiles; i++)
        free(files[i].path);
    free(files);
    files = NULL;
    nfiles = capfiles = 0;
}

static const char *path_of(unsigned long long dev, unsigned long long ino)
{
    for (size_t i = 0; i < nfiles; i++)
        if ((unsigned long long)files[i].dev == dev &&
            (unsigned long long)files[i].ino == ino)
            return files[i].path;
    return NULL;
}

/* Applies one journal to path; the bytes it took back, -1 on error
 * (said on stderr). */
static long long undo(const char *journal, const char *path)
{
    struct tpc_header h;
    struct tpc_record rec;
    struct {
        int64_t off, len;
        long where;
    } *recs = NULL;
    size_t n = 0, cap = 0;
    long long undone = -1;
    char *buf = NULL;
    const char *why = NULL;
    FILE *j = fopen(journal, "rb");
    int fd = open(path, O_RDWR);
    struct stat st, js;

    if (j == NULL || fd < 0 || fstat(fd, &st) != 0 ||
        fstat(fileno(j), &js) != 0)
        goto done;
    /* A journal without its whole header: its creator was killed before
     * it, and so before its write. */
    if (fread(&h, sizeof h, 1, j) != 1) {
        undone = 0;
        goto done;
    }
    if (h.magic != TPC_MAGIC) {
        why = "not a journal";
        goto done;
    }
    /* Records in order; one cut short (the last: its write never came,
     * the shim writes only after its record is whole) is left out. */
    while (fread(&rec, sizeof rec, 1, j) == 1 && rec.len >= 0 &&
           ftell(j) + rec.len <= js.st_size) {
        if (n == cap) {
            size_t c2 = cap ? 2 * cap : 256;
            void *more = realloc(recs, c2 * sizeof *recs);
            if (more == NULL)
                goto done;
            recs = more;
            cap = c2;
        }
        recs[n].off = rec.off;
        recs[n].len = rec.len;
        recs[n].where = ftell(j);
        n++;
        if (fseek(j, (long)rec.len, SEEK_CUR) != 0)
            goto done;
    }
    undone = 0;
    for (size_t i = n; i-- > 0;) {
        void *more = realloc(buf, (size_t)recs[i].len + 1);
        if (more == NULL) {
            undone = -1;
            goto done;
        }
        buf = more;
        if (fseek(j, recs[i].where, SEEK_SET) != 0 ||
            fread(buf, 1, (size_t)recs[i].len, j) != (size_t)recs[i].len ||
            pwrite(fd, buf, (size_t)recs[i].len, recs[i].off) != recs[i].len) {
            undone = -1;
            goto done;
        }
        undone += recs[i].len;
    }
    if (st.st_size > h.size)
        undone += st.st_size - h.size;
    if (ftruncate(fd, h.size) != 0 || fsync(fd) != 0)
        undone = -1;
done:
    if (undone < 0)
        fprintf(stderr, "powercut: cannot undo %s on %s: %s\n", journal, path,
                why != NULL ? why : strerror(errno));
    free(buf);
    free(recs);
    if (j != NULL)
        fclose(j);
    if (fd >= 0)
        close(fd);
    return undone;
}

long long tpc_restore(const char *data_dir, const char *journal_dir,
                      long long *wal)
{
    DIR *d = opendir(journal_dir);
    struct dirent *e;
    long long undone = 0;

    *wal = 0;
    if (d == NULL || nftw(data_dir, collect, 32, FTW_PHYS) != 0) {
        fprintf(stderr, "powercut: cannot list %s or %s\n", journal_dir,
                data_dir);
        if (d != NULL)
            closedir(d);
        forget_files();
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
        /* A journal whose file is gone (unlinked with the shim not
         * seeing it): nothing to take back. */
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
    forget_files();
    return undone;
}

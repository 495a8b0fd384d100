/* SPDX-License-Identifier: MIT */
/*
 * powercut.c -- preloaded (LD_PRELOAD) into a test's PostgreSQL server to
 * make a power cut possible: what the server wrote to its data directory
 * since it last fsynced the file can be taken back, as a machine losing
 * power takes back what sat in the kernel's page cache.  Killing the
 * server's processes alone (a crash) keeps the page cache; only this
 * tells "written" from "on disk".
 *
 * Before each write (write, pwrite, pwritev, ftruncate) to a regular file
 * under DE_PC_DATA, the bytes it is about to overwrite are appended to
 * that file's undo journal in DE_PC_JOURNAL ("<dev>-<ino>": by inode, so
 * that a renamed WAL segment keeps its journal), which starts with the
 * file's size before its first unsynced write.  fsync or fdatasync of the
 * file deletes its journal: everything written so far is on disk.  After
 * the server's processes are killed, tests/pg/powercut.c applies the
 * journals backwards and truncates each file to its first size, leaving
 * every file as its last fsync left it.
 *
 * One lock (flock on DE_PC_JOURNAL/lock, opened by each process: a
 * descriptor inherited across fork would share one lock between them)
 * covers a journal record and the write it undoes, and an fsync and the
 * deletion of the journal, so that no write can slip between an fsync and
 * the journal's end unrecorded.  The server runs slower; a test's server
 * does not mind.
 *
 * What it does not take back, making the cut milder than a real one (it
 * can let a test pass that a real cut would fail, never the reverse):
 * files created, renamed or unlinked (metadata, treated as durable at
 * once), writes through mmap, and files opened O_SYNC or O_DSYNC (durable
 * at each write, correctly).
 *
 * Never linked into a test program: built as a shared object of its own.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

#include "powercut_journal.h"

static char data_dir[PATH_MAX];
static size_t data_len;
static char journal_dir[PATH_MAX];
static int lock_fd = -1;
static pid_t lock_pid;

static ssize_t (*real_write)(int, const void *, size_t);
static ssize_t (*real_pwrite)(int, const void *, size_t, off_t);
static ssize_t (*real_pwrite64)(int, const void *, size_t, off_t);
static ssize_t (*real_pwritev)(int, const struct iovec *, int, off_t);
static ssize_t (*real_pwritev64)(int, const struct iovec *, int, off_t);
static int (*real_ftruncate)(int, off_t);
static int (*real_ftruncate64)(int, off_t);
static int (*real_fsync)(int);
static int (*real_fdatasync)(int);

__attribute__((constructor)) static void init(void)
{
    const char *d = getenv("DE_PC_DATA"), *j = getenv("DE_PC_JOURNAL");

    real_write = dlsym(RTLD_NEXT, "write");
    real_pwrite = dlsym(RTLD_NEXT, "pwrite");
    real_pwrite64 = dlsym(RTLD_NEXT, "pwrite64");
    real_pwritev = dlsym(RTLD_NEXT, "pwritev");
    real_pwritev64 = dlsym(RTLD_NEXT, "pwritev64");
    real_ftruncate = dlsym(RTLD_NEXT, "ftruncate");
    real_ftruncate64 = dlsym(RTLD_NEXT, "ftruncate64");
    real_fsync = dlsym(RTLD_NEXT, "fsync");
    real_fdatasync = dlsym(RTLD_NEXT, "fdatasync");
    if (d == NULL || j == NULL || realpath(d, data_dir) == NULL ||
        strlen(j) >= sizeof journal_dir) {
        data_dir[0] = '\0';
        return;
    }
    data_len = strlen(data_dir);
    snprintf(journal_dir, sizeof journal_dir, "%s", j);
}

/* A file whose writes can be taken back: regular, under the data
 * directory, not opened for synchronous writes.  *st receives its
 * status. */
static bool tracked(int fd, struct stat *st)
{
    char link[64], path[PATH_MAX];
    ssize_t n;
    int flags;

    if (data_len == 0 || fstat(fd, st) != 0 || !S_ISREG(st->st_mode))
        return false;
    flags = fcntl(fd, F_GETFL);
    if (flags < 0 || (flags & (O_SYNC | O_DSYNC)) != 0)
        return false;
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    n = readlink(link, path, sizeof path - 1);
    if (n <= 0)
        return false;
    path[n] = '\0';
    return (size_t)n > data_len && memcmp(path, data_dir, data_len) == 0 &&
           path[data_len] == '/';
}

static void lock(void)
{
    if (lock_fd < 0 || lock_pid != getpid()) {
        char path[PATH_MAX + 8];
        snprintf(path, sizeof path, "%s/lock", journal_dir);
        lock_fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
        lock_pid = getpid();
    }
    while (lock_fd >= 0 && flock(lock_fd, LOCK_EX) != 0 && errno == EINTR)
        ;
}

static void unlock(void)
{
    if (lock_fd >= 0)
        (void)flock(lock_fd, LOCK_UN);
}

static void journal_path(char *buf, size_t size, const struct stat *st)
{
    snprintf(buf, size, "%s/%llu-%llu", journal_dir,
             (unsigned long long)st->st_dev, (unsigned long long)st->st_ino);
}

/* Writes all of buf to fd, or stops the server: a journal that lost a
 * record would make the cut silently wrong. */
static void must_write(int fd, const void *buf, size_t len)
{
    const char *p = buf;

    while (len > 0) {
        ssize_t n = real_write(fd, p, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            abort();
        p += n;
        len -= (size_t)n;
    }
}

/* Records, in fd's journal, the bytes [off, off + len) hold now (those
 * before the end of the file; off -1: at the end), starting the journal
 * with the file's size if it has none.  Called with the lock held: the
 * size is read under it, another process may have just grown the file. */
static void record(int fd, off_t off, size_t len)
{
    char path[PATH_MAX + 64], self[64];
    struct stat sb, *st = &sb;
    struct tpc_header h = {TPC_MAGIC, 0};
    struct tpc_record rec = {0, 0};
    char *old = NULL;
    int j;

    if (fstat(fd, st) != 0)
        abort();
    if (off < 0)
        off = st->st_size;
    h.size = (int64_t)st->st_size;
    rec.off = (int64_t)off;
    journal_path(path, sizeof path, st);
    j = open(path, O_WRONLY | O_APPEND | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (j >= 0) {
        must_write(j, &h, sizeof h);
    } else if (errno != EEXIST ||
               (j = open(path, O_WRONLY | O_APPEND | O_CLOEXEC)) < 0) {
        abort();
    }
    if (off < st->st_size && len > 0) {
        size_t want = (size_t)(st->st_size - off) < len
                          ? (size_t)(st->st_size - off)
                          : len;
        int r;
        /* The descriptor may be write-only: read through a new one. */
        snprintf(self, sizeof self, "/proc/self/fd/%d", fd);
        r = open(self, O_RDONLY | O_CLOEXEC);
        old = malloc(sizeof rec + want);
        if (r < 0 || old == NULL ||
            pread(r, old + sizeof rec, want, off) != (ssize_t)want)
            abort();
        close(r);
        rec.len = (int64_t)want;
        memcpy(old, &rec, sizeof rec);
        /* One append: a record is whole or (killed mid-way) last. */
        must_write(j, old, sizeof rec + want);
        free(old);
    }
    close(j);
}

static size_t iov_len(const struct iovec *iov, int n)
{
    size_t len = 0;

    for (int i = 0; i < n; i++)
        len += iov[i].iov_len;
    return len;
}

ssize_t write(int fd, const void *buf, size_t len)
{
    struct stat st;
    ssize_t n;
    int flags;

    if (!tracked(fd, &st))
        return real_write(fd, buf, len);
    lock();
    flags = fcntl(fd, F_GETFL);
    record(fd, (flags & O_APPEND) ? -1 : lseek(fd, 0, SEEK_CUR), len);
    n = real_write(fd, buf, len);
    unlock();
    return n;
}

#define PWRITE(name, real, type)                                               \
    ssize_t name(int fd, const void *buf, size_t len, type off)                \
    {                                                                          \
        struct stat st;                                                        \
        ssize_t n;                                                             \
        if (!tracked(fd, &st))                                                 \
            return real(fd, buf, len, off);                                    \
        lock();                                                                \
        record(fd, off, len);                                                  \
        n = real(fd, buf, len, off);                                           \
        unlock();                                                              \
        return n;                                                              \
    }
PWRITE(pwrite, real_pwrite, off_t)
PWRITE(pwrite64, real_pwrite64, off_t)

#define PWRITEV(name, real)                                                    \
    ssize_t name(int fd, const struct iovec *iov, int cnt, off_t off)          \
    {                                                                          \
        struct stat st;                                                        \
        ssize_t n;                                                             \
        if (!tracked(fd, &st))                                                 \
            return real(fd, iov, cnt, off);                                    \
        lock();                                                                \
        record(fd, off, iov_len(iov, cnt));                                    \
        n = real(fd, iov, cnt, off);                                           \
        unlock();                                                              \
        return n;                                                              \
    }
PWRITEV(pwritev, real_pwritev)
PWRITEV(pwritev64, real_pwritev64)

#define FTRUNCATE(name, real)                                                  \
    int name(int fd, off_t len)                                                \
    {                                                                          \
        struct stat st;                                                        \
        int rc;                                                                \
        if (!tracked(fd, &st))                                                 \
            return real(fd, len);                                              \
        lock();                                                                \
        /* What a shrink cuts off; a growth needs only the first size. */      \
        fstat(fd, &st);                                                        \
        record(fd, len, len < st.st_size ? (size_t)(st.st_size - len) : 0);    \
        rc = real(fd, len);                                                    \
        unlock();                                                              \
        return rc;                                                             \
    }
FTRUNCATE(ftruncate, real_ftruncate)
FTRUNCATE(ftruncate64, real_ftruncate64)

#define SYNC(name, real)                                                       \
    int name(int fd)                                                           \
    {                                                                          \
        char path[PATH_MAX + 64];                                              \
        struct stat st;                                                        \
        int rc;                                                                \
        if (!tracked(fd, &st))                                                 \
            return real(fd);                                                   \
        lock();                                                                \
        rc = real(fd);                                                         \
        if (rc == 0) {                                                         \
            journal_path(path, sizeof path, &st);                              \
            (void)unlink(path);                                                \
        }                                                                      \
        unlock();                                                              \
        return rc;                                                             \
    }
SYNC(fsync, real_fsync)
SYNC(fdatasync, real_fdatasync)

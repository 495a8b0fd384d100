/* SPDX-License-Identifier: MIT */
/*
 * powercut.c -- preloaded (LD_PRELOAD) into a test's PostgreSQL server to
 * make a power cut possible: what the server wrote to its data directory
 * since it last fsynced the file can be taken back, as a machine losing
 * power takes back what sat in the kernel's page cache.  Killing the
 * server's processes alone (a crash) keeps the page cache; only this
 * tells "written" from "on disk".
 *
 * Before each write (write, pwrite, pwritev, ftruncate, truncate) to a
 * regular file under DE_PC_DATA, the bytes it is about to overwrite are
 * appended to that file's undo journal in DE_PC_JOURNAL ("<dev>-<ino>":
 * by inode, so that a renamed WAL segment keeps its journal), which
 * starts with the file's size before its first unsynced write.  fsync or
 * fdatasync of the file deletes its journal: everything written so far
 * is on disk; syncfs and sync delete them all.  A file's last link going
 * (unlink, rename over it) deletes its journal too, so that a new file
 * given the same inode starts a journal of its own.  After the server's
 * processes are killed, tests/pg/powercut.c applies the journals
 * backwards and truncates each file to its first size, leaving every
 * file as its last fsync left it.
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
 * files created, renamed or unlinked (metadata, durable at once here);
 * a file's contents dropped by O_TRUNC at open; writes through stdio
 * (glibc's fwrite reaches write() inside libc, where no preload sees it:
 * pg_internal.init, postmaster.opts, statistics files), through mmap, or
 * by posix_fallocate; and a write to a file opened O_SYNC or O_DSYNC,
 * which makes everything written to that file so far durable here (the
 * kernel makes only that write durable).  PostgreSQL 15's defaults
 * (wal_sync_method=fdatasync, recovery_init_sync_method=fsync) write its
 * WAL and data files through pwrite, pwritev and write and sync them
 * with fsync and fdatasync, all seen here.
 *
 * Never linked into a test program: built as a shared object of its own.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <dlfcn.h>
#include <dirent.h>
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
static ssize_t (*real_pwritev)(int, const struct iovec *, int, off_t);
static int (*real_ftruncate)(int, off_t);
static int (*real_truncate)(const char *, off_t);
static int (*real_unlink)(const char *);
static int (*real_rename)(const char *, const char *);
static int (*real_fsync)(int);
static int (*real_fdatasync)(int);
static int (*real_syncfs)(int);
static void (*real_sync)(void);

/* Also called by every wrapper first: a call made before the
 * constructor ran (another library's constructor) must not jump to
 * NULL. */
__attribute__((constructor)) static void init(void)
{
    const char *d = getenv("DE_PC_DATA"), *j = getenv("DE_PC_JOURNAL");

    if (real_write != NULL)
        return;
    real_pwrite = dlsym(RTLD_NEXT, "pwrite");
    real_pwritev = dlsym(RTLD_NEXT, "pwritev");
    real_ftruncate = dlsym(RTLD_NEXT, "ftruncate");
    real_truncate = dlsym(RTLD_NEXT, "truncate");
    real_unlink = dlsym(RTLD_NEXT, "unlink");
    real_rename = dlsym(RTLD_NEXT, "rename");
    real_fsync = dlsym(RTLD_NEXT, "fsync");
    real_fdatasync = dlsym(RTLD_NEXT, "fdatasync");
    real_syncfs = dlsym(RTLD_NEXT, "syncfs");
    real_sync = dlsym(RTLD_NEXT, "sync");
    real_write = dlsym(RTLD_NEXT, "write"); /* last: it marks "done" */
    if (d == NULL || j == NULL || realpath(d, data_dir) == NULL ||
        strlen(j) >= sizeof journal_dir) {
        data_dir[0] = '\0';
        return;
    }
    data_len = strlen(data_dir);
    snprintf(journal_dir, sizeof journal_dir, "%s", j);
}

/* Says why on stderr (the server's log), then stops the process: a
 * journal that lost a record would make the cut silently wrong. */
static void die(const char *what)
{
    char line[300];
    int n = snprintf(line, sizeof line, "powercut shim [%d]: %s: %s\n",
                     (int)getpid(), what, strerror(errno));

    if (n > 0)
        (void)real_write(2, line,
                         (size_t)n < sizeof line ? (size_t)n : sizeof line - 1);
    abort();
}

/* Whether fd's writes concern the cut: a regular file under the data
 * directory.  *st receives its status, *sync whether it was opened for
 * synchronous writes. */
static bool tracked(int fd, struct stat *st, bool *sync)
{
    char link[64], path[PATH_MAX];
    ssize_t n;
    int flags;

    init();
    if (data_len == 0 || fstat(fd, st) != 0 || !S_ISREG(st->st_mode))
        return false;
    flags = fcntl(fd, F_GETFL);
    if (flags < 0)
        return false;
    *sync = (flags & (O_SYNC | O_DSYNC)) != 0;
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
    init();
    if (data_len == 0)
        return;
    if (lock_fd < 0 || lock_pid != getpid()) {
        char path[PATH_MAX + 8];
        /* The parent's descriptor: its lock is the parent's. */
        if (lock_fd >= 0)
            close(lock_fd);
        snprintf(path, sizeof path, "%s/lock", journal_dir);
        lock_fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
        lock_pid = getpid();
        if (lock_fd < 0)
            die("cannot open the journal lock");
    }
    while (flock(lock_fd, LOCK_EX) != 0)
        if (errno != EINTR)
            die("cannot take the journal lock");
}

static void unlock(void)
{
    if (lock_fd >= 0 && lock_pid == getpid())
        (void)flock(lock_fd, LOCK_UN);
}

static void journal_path(char *buf, size_t size, dev_t dev, ino_t ino)
{
    snprintf(buf, size, "%s/%llu-%llu", journal_dir, (unsigned long long)dev,
             (unsigned long long)ino);
}

/* The file (dev, ino) is durable, or gone: its journal ends. */
static void forget(dev_t dev, ino_t ino)
{
    char path[PATH_MAX + 64];

    journal_path(path, sizeof path, dev, ino);
    if (real_unlink(path) != 0 && errno != ENOENT)
        die("cannot delete a journal");
}

static void must_write(int fd, const void *buf, size_t len)
{
    const char *p = buf;

    while (len > 0) {
        ssize_t n = real_write(fd, p, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            die("cannot write a journal");
        p += n;
        len -= (size_t)n;
    }
}

/* Records, in fd's journal, the bytes [off, off + len) hold now (those
 * before the end of the file; off -1: at the end), starting the journal
 * with the file's size if it has none.  Called with the lock held: the
 * size is read under it, another process may have just grown the file. */
enum { CHUNK = 1 << 20 };

static void record(int fd, off_t off, size_t len)
{
    char path[PATH_MAX + 64], self[64];
    struct stat st, js;
    struct tpc_header h = {TPC_MAGIC, 0};
    struct tpc_record rec = {0, 0};
    char *old;
    int j;

    if (fstat(fd, &st) != 0)
        die("cannot stat a data file");
    /* Unlinked (its journal went with its last link): nothing of it
     * survives a cut, and a journal made now would be the next file's
     * given this inode. */
    if (st.st_nlink == 0)
        return;
    if (off < 0)
        off = st.st_size;
    journal_path(path, sizeof path, st.st_dev, st.st_ino);
    j = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
    if (j < 0 || fstat(j, &js) != 0)
        die("cannot open a journal");
    if (js.st_size < (off_t)sizeof h) {
        /* New, or its creator was killed before its header: nothing of
         * it was followed by a write. */
        h.size = (int64_t)st.st_size;
        if (real_ftruncate(j, 0) != 0)
            die("cannot start a journal");
        must_write(j, &h, sizeof h);
    }
    if (off < st.st_size && len > 0) {
        size_t want =
            (size_t)(st.st_size - off) < len ? (size_t)(st.st_size - off) : len;
        int r;
        /* The descriptor may be write-only: read through a new one. */
        snprintf(self, sizeof self, "/proc/self/fd/%d", fd);
        r = open(self, O_RDONLY | O_CLOEXEC);
        old = malloc(sizeof rec + (want < CHUNK ? want : CHUNK));
        if (r < 0 || old == NULL)
            die("cannot read what a write overwrites");
        /* In pieces of at most CHUNK (a truncation may cut off a whole
         * segment), each one record, appended whole. */
        for (size_t done = 0; done < want;) {
            size_t n = want - done < CHUNK ? want - done : CHUNK;
            if (pread(r, old + sizeof rec, n, off + (off_t)done) != (ssize_t)n)
                die("cannot read what a write overwrites");
            rec.off = (int64_t)(off + (off_t)done);
            rec.len = (int64_t)n;
            memcpy(old, &rec, sizeof rec);
            must_write(j, old, sizeof rec + n);
            done += n;
        }
        close(r);
        free(old);
    }
    close(j);
}

/* The offset of a write() (not a pwrite): the descriptor's own. */
#define AT_FD_OFFSET ((off_t)-2)

/* A file write, step one: false when fd does not concern the cut (then
 * write it plainly); else the lock is taken, the bytes [off, off + len)
 * hold now are recorded (off AT_FD_OFFSET: where write() will write),
 * and after_write must follow the write. */
static bool before_write(int fd, off_t off, size_t len, struct stat *st,
                         bool *sync)
{
    if (!tracked(fd, st, sync))
        return false;
    lock();
    if (off == AT_FD_OFFSET)
        off = (fcntl(fd, F_GETFL) & O_APPEND) ? -1 : lseek(fd, 0, SEEK_CUR);
    /* A file opened for synchronous writes is durable at each write,
     * here (milder than the kernel) with everything before it. */
    if (!*sync)
        record(fd, off, len);
    return true;
}

/* Step two, after the write: the lock let go; errno is the write's. */
static void after_write(const struct stat *st, bool sync)
{
    int saved = errno;

    if (sync)
        forget(st->st_dev, st->st_ino);
    unlock();
    errno = saved;
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
    bool sync = false;
    ssize_t n;

    if (!before_write(fd, AT_FD_OFFSET, len, &st, &sync))
        return real_write(fd, buf, len);
    n = real_write(fd, buf, len);
    after_write(&st, sync);
    return n;
}

ssize_t pwrite(int fd, const void *buf, size_t len, off_t off)
{
    struct stat st;
    bool sync = false;
    ssize_t n;

    if (!before_write(fd, off, len, &st, &sync))
        return real_pwrite(fd, buf, len, off);
    n = real_pwrite(fd, buf, len, off);
    after_write(&st, sync);
    return n;
}

ssize_t pwritev(int fd, const struct iovec *iov, int cnt, off_t off)
{
    struct stat st;
    bool sync = false;
    ssize_t n;

    if (!before_write(fd, off, iov_len(iov, cnt), &st, &sync))
        return real_pwritev(fd, iov, cnt, off);
    n = real_pwritev(fd, iov, cnt, off);
    after_write(&st, sync);
    return n;
}

int ftruncate(int fd, off_t len)
{
    struct stat st;
    bool sync = false;
    int rc;

    if (!tracked(fd, &st, &sync))
        return real_ftruncate(fd, len);
    lock();
    /* What a shrink cuts off; a growth needs only the first size. */
    if (fstat(fd, &st) != 0)
        die("cannot stat a data file");
    record(fd, len, len < st.st_size ? (size_t)(st.st_size - len) : 0);
    rc = real_ftruncate(fd, len);
    unlock();
    return rc;
}

/* By path (PostgreSQL truncates a dropped relation's first segment so):
 * through a descriptor, as ftruncate. */
int truncate(const char *path, off_t len)
{
    int fd, rc;

    init();
    fd = open(path, O_WRONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
    if (fd < 0)
        return real_truncate(path, len);
    rc = ftruncate(fd, len);
    close(fd);
    return rc;
}

/* The inode a path names, when it is a regular file whose last link
 * that path is. */
static bool last_link(const char *path, struct stat *st)
{
    return lstat(path, st) == 0 && S_ISREG(st->st_mode) && st->st_nlink == 1;
}

int unlink(const char *path)
{
    struct stat st;
    bool last;
    int rc;

    init();
    if (data_len == 0)
        return real_unlink(path);
    lock();
    last = last_link(path, &st);
    rc = real_unlink(path);
    if (rc == 0 && last)
        forget(st.st_dev, st.st_ino);
    unlock();
    return rc;
}

int rename(const char *from, const char *to)
{
    struct stat st;
    bool last;
    int rc;

    init();
    if (data_len == 0)
        return real_rename(from, to);
    lock();
    last = last_link(to, &st);
    rc = real_rename(from, to);
    if (rc == 0 && last)
        forget(st.st_dev, st.st_ino);
    unlock();
    return rc;
}

static int synced(int fd, int (*real)(int))
{
    struct stat st;
    bool sync = false;
    int rc;

    if (!tracked(fd, &st, &sync))
        return real(fd);
    lock();
    rc = real(fd);
    if (rc == 0)
        forget(st.st_dev, st.st_ino);
    unlock();
    return rc;
}

int fsync(int fd)
{
    init();
    return synced(fd, real_fsync);
}

int fdatasync(int fd)
{
    init();
    return synced(fd, real_fdatasync);
}

/* Every file of the file system durable: every journal ends. */
static void forget_all(void)
{
    DIR *d = opendir(journal_dir);
    struct dirent *e;
    char path[PATH_MAX + 300];

    if (d == NULL)
        die("cannot list the journals");
    while ((e = readdir(d)) != NULL) {
        if (strchr(e->d_name, '-') == NULL)
            continue;
        snprintf(path, sizeof path, "%s/%s", journal_dir, e->d_name);
        if (real_unlink(path) != 0 && errno != ENOENT)
            die("cannot delete a journal");
    }
    closedir(d);
}

int syncfs(int fd)
{
    int rc;

    init();
    if (data_len == 0)
        return real_syncfs(fd);
    lock();
    rc = real_syncfs(fd);
    if (rc == 0)
        forget_all();
    unlock();
    return rc;
}

void sync(void)
{
    init();
    if (data_len == 0) {
        real_sync();
        return;
    }
    lock();
    real_sync();
    forget_all();
    unlock();
}

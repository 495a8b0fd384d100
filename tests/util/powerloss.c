/* SPDX-License-Identifier: MIT */
/*
 * powerloss.c -- a SQLite VFS that can lose unsynced writes (see
 * powerloss.h).
 *
 * Invariants:
 *  - a tracked write or truncation is performed only after what it
 *    overwrites is in the file's undo log, so no change reaches a file
 *    without a way back;
 *  - an undo log's header holds the end of its durable prefix: a sync of
 *    the file (by any process, any connection) moves it to the end of the
 *    log as it stands when the sync begins; entries after it are the
 *    writes a power loss may discard;
 *  - the undo logs are shared between processes (flock serialises their
 *    appends), because a sync by one process makes every write to the
 *    file durable, whoever wrote it -- as fsync does.
 * Real fsyncs are skipped: the undo logs are the disk here.
 */
#include "powerloss.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <sqlite3.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define UNDO_SUFFIX ".plundo"
#define MAGIC 0x504c5531u
#define T_WRITE 1u
#define T_TRUNCATE 2u

struct ctl {
    _Atomic int64_t ops;
    int64_t cut_at;
    int cut_kind; /* -1: count every operation */
    _Atomic int cut;
    _Atomic int64_t kind_ops[PL_KINDS];
    char where[160];
};

struct entry {
    uint32_t magic, type;
    int64_t off;      /* where the old bytes go back           */
    int64_t old_size; /* the file's size before the change     */
    uint32_t n, pad;  /* old bytes that follow                 */
};

typedef struct pl_file {
    sqlite3_file base;
    sqlite3_file *real; /* follows this struct */
    int undo_fd;        /* -1: not tracked */
    char name[64];      /* for reports */
} pl_file;

static struct ctl *g_ctl;
static char g_dir[4096];
static size_t g_dirlen;
static char g_role[32];
static pthread_t g_main;
static sqlite3_vfs g_vfs;
static sqlite3_vfs *g_real;

/* ---- the cut ---------------------------------------------------------- */

static void die(void)
{
    kill(0, SIGKILL);
    for (;;)
        pause();
}

/* Which moment an operation belongs to (powerloss.h, PL_KIND_*). */
static int kind_of(const char *op, const pl_file *f)
{
    bool relay =
        strcmp(g_role, "relay") == 0 || !pthread_equal(pthread_self(), g_main);

    if (strstr(f->name, "-relay") != NULL)
        return PL_KIND_STATE;
    if (!relay)
        return PL_KIND_RECORD;
    if (strcmp(op, "sync") == 0 && strstr(f->name, "-wal") != NULL)
        return PL_KIND_PUBLISH;
    return PL_KIND_RELAY_WRITE;
}

static void tick(const char *op, const pl_file *f)
{
    int64_t n, k;
    int kind, expected = 0;

    if (g_ctl == NULL)
        return;
    if (atomic_load(&g_ctl->cut))
        die(); /* the power is off: nothing more reaches a disk */
    kind = kind_of(op, f);
    n = atomic_fetch_add(&g_ctl->ops, 1) + 1;
    k = atomic_fetch_add(&g_ctl->kind_ops[kind], 1) + 1;
    if (g_ctl->cut_kind >= 0) {
        if (kind != g_ctl->cut_kind)
            return;
        n = k;
    }
    if (g_ctl->cut_at <= 0 || n < g_ctl->cut_at)
        return;
    if (atomic_compare_exchange_strong(&g_ctl->cut, &expected, 1))
        snprintf(g_ctl->where, sizeof g_ctl->where, "%s %s by %s%s", op,
                 f->name, g_role,
                 pthread_equal(pthread_self(), g_main) ? "" : " thread");
    die();
}

void pl_control_init(const char *ctl_path, int kind, int64_t cut_at)
{
    struct ctl c;
    int fd = open(ctl_path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);

    memset(&c, 0, sizeof c);
    c.cut_at = cut_at;
    c.cut_kind = kind;
    if (fd < 0 || write(fd, &c, sizeof c) != (ssize_t)sizeof c) {
        perror("powerloss: control file");
        abort();
    }
    close(fd);
}

void pl_control_read(const char *ctl_path, pl_report *out)
{
    struct ctl c;
    int fd = open(ctl_path, O_RDONLY | O_CLOEXEC);

    memset(out, 0, sizeof *out);
    if (fd < 0 || read(fd, &c, sizeof c) != (ssize_t)sizeof c) {
        if (fd >= 0)
            close(fd);
        return;
    }
    close(fd);
    out->ops = atomic_load(&c.ops);
    for (int i = 0; i < PL_KINDS; i++)
        out->kind_ops[i] = atomic_load(&c.kind_ops[i]);
    out->cut = atomic_load(&c.cut);
    memcpy(out->where, c.where, sizeof out->where);
    out->where[sizeof out->where - 1] = '\0';
}

/* ---- undo logs -------------------------------------------------------- */

static int write_all(int fd, const void *p, size_t n)
{
    const char *c = p;

    while (n > 0) {
        ssize_t w = write(fd, c, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return -1;
        c += w;
        n -= (size_t)w;
    }
    return 0;
}

/* Appends an entry with the n old bytes at off of the real file. */
static int log_old(pl_file *f, uint32_t type, int64_t off, int64_t old_size,
                   int64_t n)
{
    struct entry e;
    char *buf;
    int rc = 0;

    memset(&e, 0, sizeof e);
    e.magic = MAGIC;
    e.type = type;
    e.off = off;
    e.old_size = old_size;
    e.n = (uint32_t)n;
    if ((buf = malloc(sizeof e + (size_t)n)) == NULL)
        return -1;
    memcpy(buf, &e, sizeof e);
    if (n > 0 && f->real->pMethods->xRead(f->real, buf + sizeof e, (int)n,
                                          off) != SQLITE_OK)
        rc = -1;
    /* One write per entry: a process killed while appending leaves at
     * most one incomplete entry, whose change never started. */
    if (rc == 0 && (lseek(f->undo_fd, 0, SEEK_END) < 0 ||
                    write_all(f->undo_fd, buf, sizeof e + (size_t)n) != 0))
        rc = -1;
    free(buf);
    return rc;
}

static int64_t real_size(pl_file *f)
{
    sqlite3_int64 size = 0;

    if (f->real->pMethods->xFileSize(f->real, &size) != SQLITE_OK)
        return -1;
    return size;
}

/* ---- io methods --------------------------------------------------------- */

static int x_close(sqlite3_file *file)
{
    pl_file *f = (pl_file *)file;
    int rc = f->real->pMethods->xClose(f->real);

    if (f->undo_fd >= 0)
        close(f->undo_fd);
    f->undo_fd = -1;
    return rc;
}

static int x_read(sqlite3_file *file, void *buf, int amt, sqlite3_int64 off)
{
    pl_file *f = (pl_file *)file;

    return f->real->pMethods->xRead(f->real, buf, amt, off);
}

static int x_write(sqlite3_file *file, const void *buf, int amt,
                   sqlite3_int64 off)
{
    pl_file *f = (pl_file *)file;
    int64_t size, n;
    int rc;

    if (f->undo_fd < 0)
        return f->real->pMethods->xWrite(f->real, buf, amt, off);
    tick("write", f);
    flock(f->undo_fd, LOCK_EX);
    size = real_size(f);
    n = size > off ? (size - off < amt ? size - off : amt) : 0;
    rc = size < 0 || log_old(f, T_WRITE, off, size, n) != 0
             ? SQLITE_IOERR_WRITE
             : f->real->pMethods->xWrite(f->real, buf, amt, off);
    flock(f->undo_fd, LOCK_UN);
    return rc;
}

static int x_truncate(sqlite3_file *file, sqlite3_int64 size)
{
    pl_file *f = (pl_file *)file;
    int64_t old;
    int rc;

    if (f->undo_fd < 0)
        return f->real->pMethods->xTruncate(f->real, size);
    tick("truncate", f);
    flock(f->undo_fd, LOCK_EX);
    old = real_size(f);
    rc = old < 0 || (old > size &&
                     log_old(f, T_TRUNCATE, size, old, old - size) != 0)
             ? SQLITE_IOERR_TRUNCATE
             : f->real->pMethods->xTruncate(f->real, size);
    flock(f->undo_fd, LOCK_UN);
    return rc;
}

static int x_sync(sqlite3_file *file, int flags)
{
    pl_file *f = (pl_file *)file;
    int64_t end;

    if (f->undo_fd < 0)
        return f->real->pMethods->xSync(f->real, flags);
    tick("sync", f);
    flock(f->undo_fd, LOCK_EX);
    end = lseek(f->undo_fd, 0, SEEK_END);
    if (end < (int64_t)sizeof end ||
        pwrite(f->undo_fd, &end, sizeof end, 0) != (ssize_t)sizeof end) {
        flock(f->undo_fd, LOCK_UN);
        return SQLITE_IOERR_FSYNC;
    }
    flock(f->undo_fd, LOCK_UN);
    return SQLITE_OK;
}

static int x_file_size(sqlite3_file *file, sqlite3_int64 *size)
{
    pl_file *f = (pl_file *)file;

    return f->real->pMethods->xFileSize(f->real, size);
}

static int x_lock(sqlite3_file *file, int lock)
{
    pl_file *f = (pl_file *)file;

    return f->real->pMethods->xLock(f->real, lock);
}

static int x_unlock(sqlite3_file *file, int lock)
{
    pl_file *f = (pl_file *)file;

    return f->real->pMethods->xUnlock(f->real, lock);
}

static int x_check_reserved(sqlite3_file *file, int *out)
{
    pl_file *f = (pl_file *)file;

    return f->real->pMethods->xCheckReservedLock(f->real, out);
}

static int x_file_control(sqlite3_file *file, int op, void *arg)
{
    pl_file *f = (pl_file *)file;

    return f->real->pMethods->xFileControl(f->real, op, arg);
}

static int x_sector_size(sqlite3_file *file)
{
    pl_file *f = (pl_file *)file;

    return f->real->pMethods->xSectorSize(f->real);
}

static int x_device_characteristics(sqlite3_file *file)
{
    pl_file *f = (pl_file *)file;

    return f->real->pMethods->xDeviceCharacteristics(f->real);
}

static int x_shm_map(sqlite3_file *file, int pg, int pgsz, int extend,
                     void volatile **pp)
{
    pl_file *f = (pl_file *)file;

    return f->real->pMethods->xShmMap(f->real, pg, pgsz, extend, pp);
}

static int x_shm_lock(sqlite3_file *file, int offset, int n, int flags)
{
    pl_file *f = (pl_file *)file;

    return f->real->pMethods->xShmLock(f->real, offset, n, flags);
}

static void x_shm_barrier(sqlite3_file *file)
{
    pl_file *f = (pl_file *)file;

    f->real->pMethods->xShmBarrier(f->real);
}

static int x_shm_unmap(sqlite3_file *file, int del)
{
    pl_file *f = (pl_file *)file;

    return f->real->pMethods->xShmUnmap(f->real, del);
}

/* Version 2: no memory-mapped reads, so every byte read comes through
 * x_read from the files the undo logs describe. */
static const sqlite3_io_methods io_methods = {2,
                                              x_close,
                                              x_read,
                                              x_write,
                                              x_truncate,
                                              x_sync,
                                              x_file_size,
                                              x_lock,
                                              x_unlock,
                                              x_check_reserved,
                                              x_file_control,
                                              x_sector_size,
                                              x_device_characteristics,
                                              x_shm_map,
                                              x_shm_lock,
                                              x_shm_barrier,
                                              x_shm_unmap,
                                              NULL,
                                              NULL};

/* ---- the vfs ---------------------------------------------------------- */

static bool tracked(const char *name)
{
    return name != NULL && strncmp(name, g_dir, g_dirlen) == 0 &&
           strstr(name, UNDO_SUFFIX) == NULL;
}

static int x_open(sqlite3_vfs *vfs, const char *name, sqlite3_file *file,
                  int flags, int *out_flags)
{
    pl_file *f = (pl_file *)file;
    char path[4200];
    const char *base;
    int rc;

    (void)vfs;
    memset(f, 0, sizeof *f);
    f->real = (sqlite3_file *)(f + 1);
    f->undo_fd = -1;
    rc = g_real->xOpen(g_real, name, f->real, flags, out_flags);
    if (rc != SQLITE_OK) {
        f->base.pMethods = NULL;
        return rc;
    }
    if (tracked(name)) {
        snprintf(path, sizeof path, "%s%s", name, UNDO_SUFFIX);
        f->undo_fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
        if (f->undo_fd < 0) {
            f->real->pMethods->xClose(f->real);
            f->base.pMethods = NULL;
            return SQLITE_CANTOPEN;
        }
        flock(f->undo_fd, LOCK_EX);
        if (lseek(f->undo_fd, 0, SEEK_END) == 0) {
            int64_t start = sizeof start; /* nothing unsynced yet */
            if (write_all(f->undo_fd, &start, sizeof start) != 0) {
                flock(f->undo_fd, LOCK_UN);
                close(f->undo_fd);
                f->real->pMethods->xClose(f->real);
                f->base.pMethods = NULL;
                return SQLITE_CANTOPEN;
            }
        }
        flock(f->undo_fd, LOCK_UN);
        base = strrchr(name, '/');
        snprintf(f->name, sizeof f->name, "%s", base ? base + 1 : name);
    }
    f->base.pMethods = &io_methods;
    return SQLITE_OK;
}

static int x_delete(sqlite3_vfs *vfs, const char *name, int sync_dir)
{
    char path[4200];

    (void)vfs;
    if (tracked(name)) {
        /* A deleted file stays deleted (its contents were checkpointed,
         * synced, before SQLite deletes a log). */
        snprintf(path, sizeof path, "%s%s", name, UNDO_SUFFIX);
        unlink(path);
    }
    return g_real->xDelete(g_real, name, sync_dir);
}

static int x_access(sqlite3_vfs *vfs, const char *name, int flags, int *out)
{
    (void)vfs;
    return g_real->xAccess(g_real, name, flags, out);
}

static int x_full_pathname(sqlite3_vfs *vfs, const char *name, int n, char *out)
{
    (void)vfs;
    return g_real->xFullPathname(g_real, name, n, out);
}

static int x_randomness(sqlite3_vfs *vfs, int n, char *out)
{
    (void)vfs;
    return g_real->xRandomness(g_real, n, out);
}

static int x_sleep(sqlite3_vfs *vfs, int us)
{
    (void)vfs;
    return g_real->xSleep(g_real, us);
}

static int x_current_time(sqlite3_vfs *vfs, double *out)
{
    (void)vfs;
    return g_real->xCurrentTime(g_real, out);
}

static int x_last_error(sqlite3_vfs *vfs, int n, char *out)
{
    (void)vfs;
    return g_real->xGetLastError(g_real, n, out);
}

static int x_current_time64(sqlite3_vfs *vfs, sqlite3_int64 *out)
{
    (void)vfs;
    return g_real->xCurrentTimeInt64(g_real, out);
}

int pl_install(const char *dir, const char *ctl_path, const char *role)
{
    int fd;

    g_real = sqlite3_vfs_find(NULL);
    if (g_real == NULL)
        return -1;
    snprintf(g_dir, sizeof g_dir, "%s/", dir);
    g_dirlen = strlen(g_dir);
    snprintf(g_role, sizeof g_role, "%s", role);
    g_main = pthread_self();
    fd = open(ctl_path, O_RDWR | O_CLOEXEC);
    if (fd < 0) {
        perror("powerloss: control file");
        return -1;
    }
    g_ctl =
        mmap(NULL, sizeof *g_ctl, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (g_ctl == MAP_FAILED) {
        g_ctl = NULL;
        perror("powerloss: mmap");
        return -1;
    }
    memset(&g_vfs, 0, sizeof g_vfs);
    g_vfs.iVersion = 2;
    g_vfs.szOsFile = (int)sizeof(pl_file) + g_real->szOsFile;
    g_vfs.mxPathname = g_real->mxPathname;
    g_vfs.zName = "powerloss";
    g_vfs.xOpen = x_open;
    g_vfs.xDelete = x_delete;
    g_vfs.xAccess = x_access;
    g_vfs.xFullPathname = x_full_pathname;
    g_vfs.xRandomness = x_randomness;
    g_vfs.xSleep = x_sleep;
    g_vfs.xCurrentTime = x_current_time;
    g_vfs.xGetLastError = x_last_error;
    g_vfs.xCurrentTimeInt64 = x_current_time64;
    return sqlite3_vfs_register(&g_vfs, 1) == SQLITE_OK ? 0 : -1;
}

/* ---- the power loss ----------------------------------------------------- */

static int undo_file(const char *target, const char *undo, unsigned *seed,
                     int keep_prefix, long *discarded)
{
    int ufd = open(undo, O_RDONLY | O_CLOEXEC), tfd;
    int64_t durable = 0, end, pos, *offs = NULL;
    size_t n = 0, cap = 0, keep;
    struct entry e;
    char *buf = NULL;
    int rc = -1;

    if (ufd < 0)
        return -1;
    end = lseek(ufd, 0, SEEK_END);
    if (pread(ufd, &durable, sizeof durable, 0) != (ssize_t)sizeof durable)
        durable = end; /* never finished its header: nothing logged */
    for (pos = durable; pos + (int64_t)sizeof e <= end;) {
        if (pread(ufd, &e, sizeof e, pos) != (ssize_t)sizeof e ||
            e.magic != MAGIC || pos + (int64_t)sizeof e + e.n > end)
            break; /* an incomplete last entry: its change never began */
        if (n == cap) {
            cap = cap ? cap * 2 : 64;
            if ((offs = realloc(offs, cap * sizeof *offs)) == NULL)
                goto done;
        }
        offs[n++] = pos;
        pos += (int64_t)sizeof e + e.n;
    }
    keep = keep_prefix && n > 0 ? (size_t)rand_r(seed) % (n + 1) : 0;
    tfd = open(target, O_RDWR | O_CLOEXEC);
    if (tfd < 0) {
        rc = errno == ENOENT ? 0 : -1; /* deleted: stays deleted */
        goto done;
    }
    for (size_t i = n; i-- > keep;) {
        if (pread(ufd, &e, sizeof e, offs[i]) != (ssize_t)sizeof e ||
            (buf = realloc(buf, e.n + 1)) == NULL ||
            pread(ufd, buf, e.n, offs[i] + (int64_t)sizeof e) != (ssize_t)e.n ||
            (e.n > 0 && pwrite(tfd, buf, e.n, e.off) != (ssize_t)e.n) ||
            (e.type == T_WRITE && ftruncate(tfd, e.old_size) != 0)) {
            close(tfd);
            goto done;
        }
        (*discarded)++;
    }
    close(tfd);
    rc = 0;
done:
    free(offs);
    free(buf);
    close(ufd);
    return rc;
}

long pl_power_loss(const char *dir, unsigned seed, int keep_prefix)
{
    DIR *d = opendir(dir);
    struct dirent *de;
    long discarded = 0;
    size_t sl = strlen(UNDO_SUFFIX);
    char undo[4200], target[4200];
    int rc = 0;

    if (d == NULL)
        return -1;
    while ((de = readdir(d)) != NULL) {
        size_t len = strlen(de->d_name);
        snprintf(undo, sizeof undo, "%s/%s", dir, de->d_name);
        if (len > 4 && strcmp(de->d_name + len - 4, "-shm") == 0) {
            unlink(undo); /* shared memory does not survive */
            continue;
        }
        if (len <= sl || strcmp(de->d_name + len - sl, UNDO_SUFFIX) != 0)
            continue;
        snprintf(target, sizeof target, "%s/%.*s", dir, (int)(len - sl),
                 de->d_name);
        if (undo_file(target, undo, &seed, keep_prefix, &discarded) != 0)
            rc = -1;
        unlink(undo);
    }
    closedir(d);
    return rc ? -1 : discarded;
}

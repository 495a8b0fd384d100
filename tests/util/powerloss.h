/* SPDX-License-Identifier: MIT */
/*
 * powerloss.h -- simulated power loss for SQLite files, in the spirit of
 * SQLite's own crash tests (test6.c).
 *
 * pl_install() registers a VFS (as the default) that writes through to
 * the real files, so that every process sharing a database sees every
 * write at once, as the page cache would show it -- and, before each
 * write or truncation of a file under the watched directory, appends
 * what it overwrites to an undo log next to the file.  A sync of a file
 * (by any process) makes that file's logged writes durable.  After the
 * processes are killed, pl_power_loss() plays the undo logs backwards
 * over every write not yet synced: the files end up exactly as a disk
 * that lost its unsynced writes would leave them.
 *
 * The cut: every tracked operation (write, truncate, sync) of every
 * process counts one in a shared control file, in total and for its kind
 * of moment; the process that makes operation number cut_at (of the kind
 * chosen, or of all) kills its whole process group with SIGKILL instead
 * of performing it, and no process performs another tracked operation
 * after that.
 */
#ifndef DE_TEST_POWERLOSS_H
#define DE_TEST_POWERLOSS_H

#include <stdint.h>

/* Registers the VFS as the default for this process: files whose path
 * starts with dir are tracked; ctl_path is the control file made by
 * pl_control_init.  role names this process in pl_report.where.
 * Returns 0, or -1 (with a message on stderr). */
int pl_install(const char *dir, const char *ctl_path, const char *role);

/* Kinds of moment, by who does what to which file. */
enum {
    PL_KIND_RECORD,      /* the service's own thread: recording         */
    PL_KIND_PUBLISH,     /* a relay syncing the database's log          */
    PL_KIND_STATE,       /* anything on the relay's state file          */
    PL_KIND_RELAY_WRITE, /* a relay writing the database: cleanup,
                            checkpoints of the log                      */
    PL_KINDS
};

/* Creates (or resets) the control file: cut at operation cut_at (0:
 * never) among those of kind (-1: every operation). */
void pl_control_init(const char *ctl_path, int kind, int64_t cut_at);

typedef struct pl_report {
    int64_t ops; /* tracked operations counted                    */
    int64_t kind_ops[PL_KINDS]; /* of each kind                       */
    int cut;         /* 1 when the cut happened                       */
    char where[160]; /* "<op> <file> by <role>[ thread]" of the cut   */
} pl_report;

void pl_control_read(const char *ctl_path, pl_report *out);

/* With every process that used the files dead: discards each tracked
 * file's unsynced writes (all of them, or, with keep_prefix, a random
 * prefix of them survives, as if the disk wrote some in order before the
 * power went), removes the undo logs and the shared-memory (-shm) files.
 * Returns the number of writes discarded, or -1 on error. */
long pl_power_loss(const char *dir, unsigned seed, int keep_prefix);

#endif

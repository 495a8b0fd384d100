/* SPDX-License-Identifier: MIT */
/*
 * powercut.h -- the two halves of a power cut of a test server
 * (tests/pg/powercut.c), used by pgserver.c's tpg_power_cut: the server's
 * processes stopped at one instant and killed, and the undo journals of
 * the shim (tests/pg/shim/powercut.c) applied.
 */
#ifndef DE_POWERCUT_H
#define DE_POWERCUT_H

#include <stdbool.h>
#include <sys/types.h>

/* Stops pid (SIGSTOP) and waits until it is stopped (or gone). */
bool tpc_stop_process(pid_t pid);
/* Stops the postmaster, then every child it has (until a scan finds no
 * new one), each until it is stopped; then kills them all and waits until
 * none runs.  false (said on stderr) when one would not stop or die. */
bool tpc_kill_server(pid_t postmaster);
/* Applies the journals in journal_dir to the files of data_dir (each
 * file back to its state at its last fsync) and deletes them: the bytes
 * taken back, -1 on error (said on stderr); *wal receives those of them
 * in pg_wal. */
long long tpc_restore(const char *data_dir, const char *journal_dir,
                      long long *wal);

#endif

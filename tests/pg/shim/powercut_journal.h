/* SPDX-License-Identifier: MIT */
/*
 * powercut_journal.h -- the undo journal the power-cut shim
 * (tests/pg/shim/powercut.c) writes and tests/pg/powercut.c applies: one
 * file per data file, "<st_dev>-<st_ino>", a header, then records in the
 * order of the writes they undo.
 */
#ifndef TPC_JOURNAL_H
#define TPC_JOURNAL_H

#include <stdint.h>

#define TPC_MAGIC 0x7470636a6f75726eLL /* "tpcjourn" */

struct tpc_header {
    int64_t magic;
    int64_t size; /* the file's size before its first unsynced write */
};

/* Followed by len bytes: what [off, off + len) held before the write. */
struct tpc_record {
    int64_t off;
    int64_t len;
};

#endif

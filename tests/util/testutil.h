/* SPDX-License-Identifier: MIT */
/*
 * testutil.h -- helpers shared by the test suites: scratch directories,
 * real SQLite database files in them, and assertions on de_err results.
 */
#ifndef DE_TESTUTIL_H
#define DE_TESTUTIL_H

#include <check.h>
#include <sqlite3.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>
#include <sys/types.h>
#include <time.h>

#include "deliveryevents.h"

/* A fresh directory under $TMPDIR (or /tmp), removed by tu_rmdir(). */
char *tu_mkdtemp(void);
void tu_rmdir(char *dir);

/* A checked fixture giving each test a fresh tu_dir (tu_mkdtemp), removed
 * after it. */
extern char *tu_dir;
void tu_dir_setup(void);
void tu_dir_teardown(void);

/* "<dir>/<name>" in a static buffer rotated over 8 slots. */
const char *tu_path(const char *dir, const char *name);

/* The whole of a file, NUL-terminated, in a static buffer rotated over 4
 * slots ("" when it cannot be read). */
const char *tu_slurp(const char *path);

/* Opens (creating) a database file, failing the test on error. */
sqlite3 *tu_open(const char *path);
/* tu_open with a 10 s busy timeout: for a file other processes write. */
sqlite3 *tu_open_shared(const char *path);

/* Runs SQL, failing the test on error. */
void tu_exec(sqlite3 *db, const char *sql);

/* The single integer result of a query; fails the test on error. */
int64_t tu_query_int(sqlite3 *db, const char *sql);

/* The single text result of a query in a static buffer ("" for NULL). */
const char *tu_query_text(sqlite3 *db, const char *sql);

/* Asserts a de_err and, when substr is not NULL, that de_errmsg() contains
 * it. */
void tu_check_err(de_err got, de_err want, const char *substr, const char *expr,
                  const char *file, int line);
#define tu_assert_err(call, code, substr)                                      \
    tu_check_err((call), (code), (substr), #call, __FILE__, __LINE__)

#define tu_ok(call) tu_assert_err(call, DE_OK, NULL)

/* Starts example program prog (from $DE_EXAMPLES) with up to six
 * arguments (NULL ends them), its stdout in "<tu_dir>/<prog>.out". */
pid_t tu_example(const char *prog, const char *a1, const char *a2,
                 const char *a3, const char *a4, const char *a5,
                 const char *a6);
/* Waits for it; fails the test unless it exited 0 (what names it). */
void tu_example_wait(pid_t pid, const char *what);

/* Runs a suite with Check's default runner; returns the number failed. */
int tu_run(Suite *s);

#endif

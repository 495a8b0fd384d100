/* SPDX-License-Identifier: MIT */
/*
 * testutil.c -- scratch directories and SQLite helpers for the suites.
 */
#include "testutil.h"

#include <ftw.h>
#include <sys/wait.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

char *tu_dir;

void tu_dir_setup(void)
{
    tu_dir = tu_mkdtemp();
}

void tu_dir_teardown(void)
{
    tu_rmdir(tu_dir);
    tu_dir = NULL;
}

char *tu_mkdtemp(void)
{
    const char *tmp = getenv("TMPDIR");
    char *dir;

    if (tmp == NULL || tmp[0] == '\0')
        tmp = "/tmp";
    if (asprintf(&dir, "%s/de-test-XXXXXX", tmp) < 0)
        ck_abort_msg("out of memory");
    if (mkdtemp(dir) == NULL)
        ck_abort_msg("mkdtemp %s failed", dir);
    return dir;
}

static int rm_entry(const char *path, const struct stat *sb, int flag,
                    struct FTW *ftw)
{
    (void)sb;
    (void)flag;
    (void)ftw;
    return remove(path);
}

void tu_rmdir(char *dir)
{
    if (dir == NULL)
        return;
    nftw(dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
    free(dir);
}

const char *tu_path(const char *dir, const char *name)
{
    static char bufs[8][4096];
    static int next;
    char *b = bufs[next++ & 7];

    snprintf(b, sizeof bufs[0], "%s/%s", dir, name);
    return b;
}

const char *tu_slurp(const char *path)
{
    static char bufs[4][65536];
    static int next;
    char *b = bufs[next++ % 4];
    FILE *f = fopen(path, "r");
    size_t n = 0;

    if (f != NULL) {
        n = fread(b, 1, sizeof bufs[0] - 1, f);
        fclose(f);
    }
    b[n] = '\0';
    return b;
}

sqlite3 *tu_open(const char *path)
{
    sqlite3 *db = NULL;
    int rc = sqlite3_open(path, &db);

    ck_assert_msg(rc == SQLITE_OK, "open %s: %s", path, sqlite3_errmsg(db));
    return db;
}

sqlite3 *tu_open_shared(const char *path)
{
    sqlite3 *db = tu_open(path);

    /* Even a WAL reader can meet SQLITE_BUSY: the first connection after a
     * writer was SIGKILLed must recover the WAL index under an exclusive
     * lock, and a checkpoint resetting the log briefly excludes readers.
     * Waiting is what any observer of a shared file does. */
    sqlite3_busy_timeout(db, 10000);
    return db;
}

void tu_exec(sqlite3 *db, const char *sql)
{
    char *err = NULL;

    if (sqlite3_exec(db, sql, NULL, NULL, &err) != SQLITE_OK)
        ck_abort_msg("SQL failed: %s: %s", sql, err ? err : "?");
}

int64_t tu_query_int(sqlite3 *db, const char *sql)
{
    sqlite3_stmt *st = NULL;
    int64_t v;

    ck_assert_msg(sqlite3_prepare_v2(db, sql, -1, &st, NULL) == SQLITE_OK,
                  "prepare %s: %s", sql, sqlite3_errmsg(db));
    ck_assert_msg(sqlite3_step(st) == SQLITE_ROW, "no row from %s: %s", sql,
                  sqlite3_errmsg(db));
    v = sqlite3_column_int64(st, 0);
    sqlite3_finalize(st);
    return v;
}

const char *tu_query_text(sqlite3 *db, const char *sql)
{
    static char buf[4096];
    sqlite3_stmt *st = NULL;
    const unsigned char *t;

    ck_assert_msg(sqlite3_prepare_v2(db, sql, -1, &st, NULL) == SQLITE_OK,
                  "prepare %s: %s", sql, sqlite3_errmsg(db));
    ck_assert_msg(sqlite3_step(st) == SQLITE_ROW, "no row from %s", sql);
    t = sqlite3_column_text(st, 0);
    snprintf(buf, sizeof buf, "%s", t ? (const char *)t : "");
    sqlite3_finalize(st);
    return buf;
}

int tu_run(Suite *s)
{
    SRunner *sr = srunner_create(s);
    int failed;

    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed;
}

void tu_check_err(de_err got, de_err want, const char *substr, const char *expr,
                  const char *file, int line)
{
    ck_assert_msg(got == want, "%s:%d: %s returned %s, expected %s: %s", file,
                  line, expr, de_err_name(got), de_err_name(want), de_errmsg());
    if (substr != NULL)
        ck_assert_msg(strstr(de_errmsg(), substr) != NULL,
                      "%s:%d: message of %s lacks '%s': %s", file, line, expr,
                      substr, de_errmsg());
}

pid_t tu_example(const char *prog, const char *a1, const char *a2,
                 const char *a3, const char *a4, const char *a5, const char *a6)
{
    const char *exdir = getenv("DE_EXAMPLES");
    char path[4200], out[4300];
    pid_t pid;

    ck_assert_msg(exdir != NULL, "DE_EXAMPLES (the examples' directory) "
                                 "unset");
    snprintf(path, sizeof path, "%s/%s", exdir, prog);
    snprintf(out, sizeof out, "%s/%s.out", tu_dir, prog);
    pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        if (!freopen(out, "w", stdout))
            _exit(126);
        execl(path, prog, a1, a2, a3, a4, a5, a6, (char *)NULL);
        _exit(127);
    }
    return pid;
}

void tu_example_wait(pid_t pid, const char *what)
{
    int status;

    ck_assert_int_eq(waitpid(pid, &status, 0), pid);
    ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 0,
                  "%s exited with status %d", what, status);
}

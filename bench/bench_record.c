/* SPDX-License-Identifier: MIT */
/*
 * bench_record.c -- what de_record costs the host's transaction.
 *
 * 1. A host transaction (update one delivery row among 10,000, record its
 *    event) with de_record, against the same transaction inserting the
 *    same bytes into a bare table with the same columns.  Target <= 1.3x.
 * 2. The same transaction recording a 10-field payload checked against
 *    its contract (de_outbox_define: patterns, an enum, ranges, a
 *    date-time), against the bare table inserting the same bytes.
 *    Target <= 1.5x.
 * 3. The same transaction with de_record on an outbox that retains
 *    BENCH_RETAINED_ROWS rows (default 10,000,000) against an empty one.
 *    Target <= 1.1x.
 *
 * SQLite in WAL with synchronous=NORMAL, as recommended for the host.
 * Rounds of each side alternate; the figures are medians over rounds.
 *
 * Environment: BENCH_ROUNDS (15), BENCH_TXNS per round (2000),
 * BENCH_RETAINED_ROWS (10000000; 0 skips part 2).
 */
#include "bench.h"
#include "contract10.h"

#include <deliveryevents.h>
#include <sqlite3.h>

#define SUBJECTS 10000

static const char payload[] = "{\"rider_id\":\"R-0042\",\"eta_s\":540,"
                              "\"lat\":37.5665,\"lng\":126.9780}";
static const char fixed_id[] = "01937a1e-8a4b-7c3d-9e2f-0123456789ab";

struct host {
    sqlite3 *db;
    de_outbox *ob;
    sqlite3_stmt *begin, *commit, *update, *bare;
};

static void exec(sqlite3 *db, const char *sql)
{
    char *err = NULL;
    BENCH_CHECK(sqlite3_exec(db, sql, NULL, NULL, &err) == SQLITE_OK, "%s: %s",
                sql, err ? err : "?");
}

static sqlite3_stmt *prep(sqlite3 *db, const char *sql)
{
    sqlite3_stmt *st = NULL;
    BENCH_CHECK(sqlite3_prepare_v2(db, sql, -1, &st, NULL) == SQLITE_OK,
                "%s: %s", sql, sqlite3_errmsg(db));
    return st;
}

static void step(sqlite3_stmt *st)
{
    int rc = sqlite3_step(st);
    BENCH_CHECK(rc == SQLITE_DONE, "step: %s",
                sqlite3_errmsg(sqlite3_db_handle(st)));
    sqlite3_reset(st);
}

static void host_open(struct host *h, const char *path, long retained)
{
    BENCH_CHECK(sqlite3_open(path, &h->db) == SQLITE_OK, "open %s", path);
    exec(h->db, "PRAGMA journal_mode=WAL");
    exec(h->db, "PRAGMA synchronous=NORMAL");
    exec(h->db, "CREATE TABLE IF NOT EXISTS deliveries(id TEXT PRIMARY KEY, "
                "status TEXT, rider_id TEXT, updated_at INTEGER)");
    exec(h->db, "WITH RECURSIVE c(x) AS (SELECT 0 UNION ALL SELECT x + 1 "
                "FROM c LIMIT 10000) INSERT OR IGNORE INTO deliveries "
                "SELECT printf('D-%05d', x), 'created', NULL, 0 FROM c");
    /* The baseline's table has the outbox's columns and nothing else. */
    exec(h->db, "CREATE TABLE IF NOT EXISTS bare(event_id, subject_type, "
                "subject_id, action, version, occurred_at_ms, "
                "recorded_at_ms, payload, traceparent, tracestate)");
    BENCH_CHECK(de_outbox_open(h->db, NULL, &h->ob) == DE_OK, "outbox: %s",
                de_errmsg());
    if (retained > 0) {
        char sql[1024];
        double t0 = bench_now();
        fprintf(stderr, "  filling an outbox with %ld rows...", retained);
        snprintf(sql, sizeof sql,
                 "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 "
                 "FROM c LIMIT %ld) INSERT INTO de_outbox(event_id, "
                 "subject_type, subject_id, action, version, occurred_at_ms, "
                 "recorded_at_ms, payload) SELECT printf('%%036d', x), "
                 "'delivery', printf('D-%%05d', x %% 10000), 'assigned', 0, "
                 "x, x, '%s' FROM c",
                 retained, payload);
        exec(h->db, sql);
        /* Write the fill back and flush it now, so that the kernel's
         * writeback of a gigabyte does not land in the measured rounds. */
        exec(h->db, "PRAGMA wal_checkpoint(TRUNCATE)");
        sync();
        fprintf(stderr, " %.1f s\n", bench_now() - t0);
    }
    h->begin = prep(h->db, "BEGIN");
    h->commit = prep(h->db, "COMMIT");
    h->update = prep(h->db, "UPDATE deliveries SET status = 'assigned', "
                            "rider_id = ?1, updated_at = ?2 WHERE id = ?3");
    h->bare = prep(h->db, "INSERT INTO bare VALUES (?1, ?2, ?3, ?4, ?5, ?6, "
                          "?7, ?8, ?9, ?10)");
}

static void host_close(struct host *h)
{
    sqlite3_finalize(h->begin);
    sqlite3_finalize(h->commit);
    sqlite3_finalize(h->update);
    sqlite3_finalize(h->bare);
    de_outbox_close(h->ob);
    sqlite3_close(h->db);
}

static void update_row(struct host *h, const char *sid, int64_t now)
{
    sqlite3_bind_text(h->update, 1, "R-0042", -1, SQLITE_STATIC);
    sqlite3_bind_int64(h->update, 2, now);
    sqlite3_bind_text(h->update, 3, sid, -1, SQLITE_STATIC);
    step(h->update);
}

/* Mean microseconds per transaction over n transactions. */
static double run(struct host *h, int with_record, long n, long *counter,
                  const char *body)
{
    char sid[16];
    double t0 = bench_now();

    for (long i = 0; i < n; i++) {
        long k = (*counter)++;
        int64_t now = 1764068400000 + k;
        snprintf(sid, sizeof sid, "D-%05ld", (k * 7919) % SUBJECTS);
        step(h->begin);
        update_row(h, sid, now);
        if (with_record) {
            de_event ev = {0};
            ev.subject_type = "delivery";
            ev.subject_id = sid;
            ev.action = "assigned";
            ev.payload = body;
            BENCH_CHECK(de_record(h->ob, &ev, NULL) == DE_OK, "record: %s",
                        de_errmsg());
        } else {
            sqlite3_stmt *b = h->bare;
            sqlite3_bind_text(b, 1, fixed_id, 36, SQLITE_STATIC);
            sqlite3_bind_text(b, 2, "delivery", 8, SQLITE_STATIC);
            sqlite3_bind_text(b, 3, sid, -1, SQLITE_STATIC);
            sqlite3_bind_text(b, 4, "assigned", 8, SQLITE_STATIC);
            sqlite3_bind_int(b, 5, 0);
            sqlite3_bind_int64(b, 6, now);
            sqlite3_bind_int64(b, 7, now);
            sqlite3_bind_text(b, 8, body, -1, SQLITE_STATIC);
            sqlite3_bind_null(b, 9);
            sqlite3_bind_null(b, 10);
            step(b);
        }
        step(h->commit);
    }
    return (bench_now() - t0) * 1e6 / (double)n;
}

/* One side of a comparison: a host, recording or the bare insert, and
 * the payload. */
struct side {
    struct host *h;
    int with_record;
    const char *body;
    const char *label;
};

/*
 * Runs a warm-up of each side, then `rounds` alternating rounds of `txns`
 * transactions, and prints the medians and the median of the per-round
 * ratios b / a against target.
 */
static void compare(struct side a, struct side b, long rounds, long txns,
                    long *counter, double target)
{
    double *ta = calloc((size_t)rounds, sizeof(double));
    double *tb = calloc((size_t)rounds, sizeof(double));
    double *ratio = calloc((size_t)rounds, sizeof(double));
    double q;

    BENCH_CHECK(ta && tb && ratio, "out of memory");
    run(a.h, a.with_record, txns, counter, a.body); /* page cache, WAL */
    run(b.h, b.with_record, txns, counter, b.body);
    for (long r = 0; r < rounds; r++) {
        ta[r] = run(a.h, a.with_record, txns, counter, a.body);
        tb[r] = run(b.h, b.with_record, txns, counter, b.body);
        ratio[r] = tb[r] / ta[r];
    }
    q = bench_median(ratio, (size_t)rounds);
    printf("  %-40s: %7.2f us/txn\n", a.label,
           bench_median(ta, (size_t)rounds));
    printf("  %-40s: %7.2f us/txn\n", b.label,
           bench_median(tb, (size_t)rounds));
    printf("  %-40s: %7.3f  (median of per-round ratios; target <= %.2f) %s\n",
           "ratio", q, target, q <= target ? "OK" : "OVER TARGET");
    free(ta);
    free(tb);
    free(ratio);
}

int main(void)
{
    long rounds = bench_env_long("BENCH_ROUNDS", 15);
    long txns = bench_env_long("BENCH_TXNS", 2000);
    long retained = bench_env_long("BENCH_RETAINED_ROWS", 10000000);
    char *dir = bench_mkdtemp();
    char path[4200];
    struct host h, empty, full;
    long counter = 0;

    printf("de_record inside a host transaction (update 1 of %d rows + "
           "event), WAL, synchronous=NORMAL\n",
           SUBJECTS);
    printf("rounds %ld x %ld transactions per side, alternating\n", rounds,
           txns);
    snprintf(path, sizeof path, "%s/host.db", dir);
    host_open(&h, path, 0);
    compare((struct side){&h, 0, payload,
                          "baseline  bare INSERT of the same bytes"},
            (struct side){&h, 1, payload, "de_record"}, rounds, txns, &counter,
            1.30);
    host_close(&h);

    printf("\nde_record of a 10-field payload checked against its contract "
           "(%zu bytes)\n",
           sizeof payload10 - 1);
    snprintf(path, sizeof path, "%s/contract.db", dir);
    host_open(&h, path, 0);
    BENCH_CHECK(de_outbox_define(h.ob, "delivery", "assigned", 1, contract10) ==
                    DE_OK,
                "define: %s", de_errmsg());
    compare((struct side){&h, 0, payload10,
                          "baseline  bare INSERT of the same bytes"},
            (struct side){&h, 1, payload10, "de_record with the contract"},
            rounds, txns, &counter, 1.50);
    host_close(&h);

    if (retained > 0) {
        printf("\nde_record with %ld retained outbox rows vs an empty "
               "outbox\n",
               retained);
        snprintf(path, sizeof path, "%s/empty.db", dir);
        host_open(&empty, path, 0);
        snprintf(path, sizeof path, "%s/full.db", dir);
        host_open(&full, path, retained);
        compare((struct side){&empty, 1, payload, "baseline  empty outbox"},
                (struct side){&full, 1, payload, "with retained rows"}, rounds,
                txns, &counter, 1.10);
        host_close(&empty);
        host_close(&full);
    }
    bench_rmdir(dir);
    return 0;
}

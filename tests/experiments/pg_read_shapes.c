/* SPDX-License-Identifier: MIT */
/*
 * pg_read_shapes.c -- what the relay's read of the PostgreSQL outbox
 * costs the server, per row, against other shapes of the same read:
 * evidence for docs/PERFORMANCE.md ("What the read costs, by query
 * shape").  Not a test: it prints numbers.
 *
 * A throwaway server (tests/pg/pgserver.c) and an outbox made by the
 * library (de_outbox_open_pg), filled with ROWS events through
 * de_record, a few writers' worth of transactions interleaved so that
 * positions do not follow insertion order exactly; VACUUM ANALYZE.  Then
 * each query reads all of it in batches of 1,000 ("position > last"),
 * prepared, with text results as the relay takes them, three passes
 * (the first from the OS page cache into shared_buffers, the others
 * warm); the backend's CPU time comes from /proc/<pid>/stat.  For the
 * relay's read and the hash join it also prints the plan.
 *
 * Build and run: make pg-read-shapes-experiment
 * Usage: pg_read_shapes [ROWS]   (default 300000)
 */
#include "deliveryevents_pg.h"
#include "pgserver.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define COLS                                                                   \
    "e.event_id, e.subject_type, e.subject_id, e.action, e.version, "          \
    "e.occurred_at_ms, e.recorded_at_ms, e.payload, e.traceparent, "           \
    "e.tracestate, e.dataschema"
#define ORDER "deliveryevents.outbox_order"
#define OUTBOX "deliveryevents.outbox"
#define WRITERS 4

static const struct shape {
    const char *name, *sql;
    int explain;
} shapes[] = {
    {"the relay's read: outbox_order by position, outbox by id (join)",
     "SELECT o.position, " COLS " FROM " ORDER " o JOIN " OUTBOX
     " e ON e.id = o.id WHERE o.position > $1 ORDER BY o.position LIMIT $2",
     1},
    {"the same join, only position and id out",
     "SELECT o.position, e.id FROM " ORDER " o JOIN " OUTBOX
     " e ON e.id = o.id WHERE o.position > $1 ORDER BY o.position LIMIT $2",
     0},
    {"outbox_order alone, position only",
     "SELECT o.position FROM " ORDER " o WHERE o.position > $1 ORDER BY "
     "o.position LIMIT $2",
     0},
    {"outbox alone by id range, every column (no order)",
     "SELECT e.id, " COLS " FROM " OUTBOX " e WHERE e.id > $1 ORDER BY e.id "
     "LIMIT $2",
     0},
    {"the batch's positions materialized, outbox by their id range, hash "
     "join, no final sort",
     "WITH o AS MATERIALIZED (SELECT position, id FROM " ORDER
     " WHERE position > $1 ORDER BY position LIMIT $2) SELECT o.position, "
     "" COLS " FROM o JOIN " OUTBOX " e ON e.id = o.id AND e.id BETWEEN "
     "(SELECT min(id) FROM o) AND (SELECT max(id) FROM o)",
     1},
};

static void die(PGconn *c, const char *what)
{
    fprintf(stderr, "pg_read_shapes: %s: %s\n", what,
            c ? PQerrorMessage(c) : de_errmsg());
    exit(1);
}

static void exec(PGconn *c, const char *sql)
{
    PGresult *r = PQexec(c, sql);

    if (PQresultStatus(r) != PGRES_COMMAND_OK &&
        PQresultStatus(r) != PGRES_TUPLES_OK)
        die(c, sql);
    PQclear(r);
}

static double now_s(void)
{
    struct timespec t;

    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

/* CPU seconds (user + system) process pid has used. */
static double cpu_s(int pid)
{
    char path[64], buf[1024], *p;
    unsigned long ut = 0, st = 0;
    FILE *f;

    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    f = fopen(path, "r");
    if (f == NULL || fgets(buf, sizeof buf, f) == NULL ||
        (p = strrchr(buf, ')')) == NULL) {
        fprintf(stderr,
                "pg_read_shapes: cannot read %s (the server must "
                "run on this machine)\n",
                path);
        exit(1);
    }
    fclose(f);
    /* After ")": state, then 10 fields, then utime and stime. */
    if (sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu",
               &ut, &st) != 2)
        die(NULL, "unexpected /proc/<pid>/stat");
    return (double)(ut + st) / (double)sysconf(_SC_CLK_TCK);
}

/* ROWS events through the library, WRITERS connections taking turns in
 * transactions of 50, each left open while the next writer records. */
static void fill(const char *conninfo, long rows)
{
    PGconn *w[WRITERS];
    de_outbox *ob[WRITERS];
    char sid[24];
    long x = 0;

    for (int i = 0; i < WRITERS; i++) {
        w[i] = PQconnectdb(conninfo);
        if (PQstatus(w[i]) != CONNECTION_OK)
            die(w[i], "connect");
        if (de_outbox_open_pg(w[i], NULL, &ob[i]) != DE_OK)
            die(NULL, "de_outbox_open_pg");
        exec(w[i], "SET synchronous_commit = off");
    }
    while (x < rows) {
        for (int i = 0; i < WRITERS && x < rows; i++) {
            exec(w[i], "BEGIN");
            for (int k = 0; k < 50 && x < rows; k++, x++) {
                de_event ev = {0};
                snprintf(sid, sizeof sid, "D-%07ld", x % 10000);
                ev.subject_type = "delivery";
                ev.subject_id = sid;
                ev.action = "assigned";
                ev.payload = "{\"rider_id\":\"R-0042\",\"eta_s\":540,"
                             "\"lat\":37.5665,\"lng\":126.9780}";
                if (de_record(ob[i], &ev, NULL) != DE_OK)
                    die(NULL, "de_record");
            }
        }
        /* Committed in reverse: positions against insertion order. */
        for (int i = WRITERS - 1; i >= 0; i--)
            if (PQtransactionStatus(w[i]) == PQTRANS_INTRANS)
                exec(w[i], "COMMIT");
    }
    for (int i = 0; i < WRITERS; i++) {
        de_outbox_close(ob[i]);
        PQfinish(w[i]);
    }
}

static void run(const char *conninfo, const struct shape *s, long rows)
{
    PGconn *c = PQconnectdb(conninfo);
    PGresult *r;
    int pid;

    if (PQstatus(c) != CONNECTION_OK)
        die(c, "connect");
    exec(c, "SET max_parallel_workers_per_gather = 0"); /* as the relay */
    r = PQprepare(c, "q", s->sql, 2, NULL);
    if (PQresultStatus(r) != PGRES_COMMAND_OK)
        die(c, s->sql);
    PQclear(r);
    pid = PQbackendPID(c);
    printf("%s\n", s->name);
    for (int pass = 1; pass <= 3; pass++) {
        double t0 = now_s(), c0 = cpu_s(pid), t, used;
        long long after = 0;
        long got = 0;
        for (;;) {
            char a[24], l[] = "1000";
            const char *v[2] = {a, l};
            long long last = after;
            int n;
            snprintf(a, sizeof a, "%lld", after);
            r = PQexecPrepared(c, "q", 2, v, NULL, NULL, 0);
            if (PQresultStatus(r) != PGRES_TUPLES_OK)
                die(c, s->name);
            n = PQntuples(r);
            for (int i = 0; i < n; i++) { /* unordered shapes too */
                long long p = strtoll(PQgetvalue(r, i, 0), NULL, 10);
                if (p > last)
                    last = p;
            }
            PQclear(r);
            if (n == 0)
                break;
            got += n;
            after = last;
        }
        t = now_s() - t0;
        used = cpu_s(pid) - c0;
        printf("  pass %d: %ld rows, %.3f s, backend CPU %.3f s = %.2f us "
               "a row\n",
               pass, got, t, used, 1e6 * used / (double)(got ? got : 1));
    }
    if (s->explain) {
        char e[64];
        snprintf(e, sizeof e, "EXPLAIN EXECUTE q(%ld, 1000)", rows / 2);
        r = PQexec(c, e);
        for (int i = 0; i < PQntuples(r); i++)
            printf("    %s\n", PQgetvalue(r, i, 0));
        PQclear(r);
    }
    PQfinish(c);
}

int main(int argc, char **argv)
{
    long rows = argc > 1 ? strtol(argv[1], NULL, 10) : 300000;
    const char *conninfo;
    PGresult *r;
    PGconn *c;

    if (rows <= 0 || argc > 2) {
        fprintf(stderr, "usage: pg_read_shapes [ROWS]\n");
        return 2;
    }
    if (!tpg_start())
        return 1;
    conninfo = tpg_fresh_db();
    fill(conninfo, rows);
    c = PQconnectdb(conninfo);
    exec(c, "VACUUM ANALYZE");
    exec(c, "CHECKPOINT");
    r = PQexec(c, "SELECT count(*) FROM (SELECT id, lag(id) OVER (ORDER BY "
                  "position) AS p FROM " ORDER ") x WHERE id < p");
    if (PQresultStatus(r) != PGRES_TUPLES_OK)
        die(c, "counting positions out of insertion order");
    printf("%ld events; %s positions out of insertion order\n", rows,
           PQgetvalue(r, 0, 0));
    PQclear(r);
    PQfinish(c);
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++)
        run(conninfo, &shapes[i], rows);
    tpg_stop();
    return 0;
}

/* SPDX-License-Identifier: MIT */
/*
 * fuzz_record.c -- de_record with arbitrary event fields, in a real SQLite
 * database file.
 *
 * Input: occurred_at_ms (8 bytes), version (4 bytes), then subject_type,
 * subject_id, action, payload, event_id, traceparent, tracestate separated
 * by NUL (a field missing from the input is NULL).  Oracle: de_record
 * either writes exactly one row or writes nothing and returns one of its
 * documented codes, and the transaction stays usable (a valid event is
 * recorded after a refused one).
 */
#include <deliveryevents.h>

#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static sqlite3 *db;
static de_outbox *ob;

static void open_once(void)
{
    char path[] = "/tmp/de-fuzz-record-XXXXXX";
    int fd;

    if (db != NULL)
        return;
    if ((fd = mkstemp(path)) < 0)
        abort();
    close(fd);
    if (sqlite3_open(path, &db) != SQLITE_OK ||
        de_outbox_open(db, NULL, &ob) != DE_OK)
        abort();
    unlink(path); /* gone when the process ends */
}

static int64_t rows(void)
{
    sqlite3_stmt *q;
    int64_t n = -1;

    if (sqlite3_prepare_v2(db, "SELECT count(*) FROM de_outbox", -1, &q,
                           NULL) != SQLITE_OK)
        abort();
    if (sqlite3_step(q) == SQLITE_ROW)
        n = sqlite3_column_int64(q, 0);
    sqlite3_finalize(q);
    return n;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *f[7] = {0};
    char *buf;
    size_t at = 12, nf = 0;
    de_event ev;
    de_recorded out;
    int64_t n0;
    de_err err;

    if (size < 12)
        return 0;
    open_once();
    if ((buf = malloc(size - 12 + 1)) == NULL)
        return 0;
    memcpy(buf, data + 12, size - 12);
    buf[size - 12] = '\0';
    for (size_t i = 0; nf < 7 && at <= size; nf++) {
        f[nf] = buf + i;
        i += strlen(buf + i) + 1;
        at = 12 + i;
    }
    memset(&ev, 0, sizeof ev);
    memcpy(&ev.occurred_at_ms, data, 8);
    memcpy(&ev.version, data + 8, 4);
    ev.subject_type = f[0];
    ev.subject_id = f[1];
    ev.action = f[2];
    ev.payload = f[3];
    ev.event_id = f[4];
    ev.traceparent = f[5];
    ev.tracestate = f[6];
    if (sqlite3_exec(db, "BEGIN", NULL, NULL, NULL) != SQLITE_OK)
        abort();
    n0 = rows();
    err = de_record(ob, &ev, &out);
    if (err == DE_OK) {
        if (rows() != n0 + 1 || out.position <= 0)
            abort();
    } else {
        if (err != DE_ERR_ARG && err != DE_ERR_PAYLOAD &&
            err != DE_ERR_CONTRACT && err != DE_ERR_NOMEM)
            abort();
        if (rows() != n0 || de_errmsg()[0] == '\0')
            abort(); /* half-written, or refused without a reason */
        /* The caller's transaction is still usable. */
        de_event ok = {.subject_type = "delivery",
                       .subject_id = "D-1",
                       .action = "assigned"};
        if (de_record(ob, &ok, &out) != DE_OK || rows() != n0 + 1)
            abort();
    }
    if (sqlite3_exec(db, "ROLLBACK", NULL, NULL, NULL) != SQLITE_OK)
        abort();
    free(buf);
    return 0;
}

/* SPDX-License-Identifier: MIT */
/*
 * error.c -- result code names and the per-thread error message.
 *
 * Invariant: every failing public call leaves exactly one sentence in the
 * calling thread's buffer before it returns, and nothing else ever writes
 * it, so de_errmsg() always explains the last failure on that thread.
 */
#include "internal.h"

#include <stdio.h>
#include <string.h>

static _Thread_local char errbuf[1024];
/* How many messages this thread has had: tells a message set during a
 * call (a handler's) from an old one. */
static _Thread_local uint64_t serial;

const char *de_err_name(de_err e)
{
    switch (e) {
    case DE_OK: return "DE_OK";
    case DE_ERR_ARG: return "DE_ERR_ARG";
    case DE_ERR_PAYLOAD: return "DE_ERR_PAYLOAD";
    case DE_ERR_CONTRACT: return "DE_ERR_CONTRACT";
    case DE_ERR_NO_TXN: return "DE_ERR_NO_TXN";
    case DE_ERR_DB: return "DE_ERR_DB";
    case DE_ERR_KAFKA: return "DE_ERR_KAFKA";
    case DE_ERR_CONFIG: return "DE_ERR_CONFIG";
    case DE_ERR_STATE: return "DE_ERR_STATE";
    case DE_ERR_NOMEM: return "DE_ERR_NOMEM";
    case DE_ERR_TIMEOUT: return "DE_ERR_TIMEOUT";
    }
    return "DE_ERR_UNKNOWN";
}

const char *de_errmsg(void)
{
    return errbuf;
}

#define DE__STR2(x) #x
#define DE__STR(x) DE__STR2(x)

const char *de_version(void)
{
    return DE__STR(DE_VERSION_MAJOR) "." DE__STR(DE_VERSION_MINOR) "." DE__STR(
        DE_VERSION_PATCH);
}

de_err de__vfail(de_err code, const char *fmt, va_list ap)
{
    vsnprintf(errbuf, sizeof errbuf, fmt, ap);
    serial++;
    return code;
}

uint64_t de__errmsg_serial(void)
{
    return serial;
}

de_err de__fail(de_err code, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    de__vfail(code, fmt, ap);
    va_end(ap);
    return code;
}

de_err de__fail_db(sqlite3 *db, const char *fmt, ...)
{
    va_list ap;
    size_t n;
    int rc = db ? sqlite3_extended_errcode(db) : SQLITE_ERROR;
    de_err code = (rc & 0xff) == SQLITE_NOMEM ? DE_ERR_NOMEM : DE_ERR_DB;

    va_start(ap, fmt);
    de__vfail(code, fmt, ap);
    va_end(ap);
    n = strlen(errbuf);
    if (n < sizeof errbuf)
        snprintf(errbuf + n, sizeof errbuf - n, ": %s (%s)",
                 db ? sqlite3_errmsg(db) : "no connection", sqlite3_errstr(rc));
    return code;
}

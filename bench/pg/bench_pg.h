/* SPDX-License-Identifier: MIT */
/*
 * bench_pg.h -- what the PostgreSQL benchmarks that use bench.h share:
 * connecting and running SQL, stopping the benchmark on failure.
 */
#ifndef DE_BENCH_PG_H
#define DE_BENCH_PG_H

#include "bench.h"

#include <libpq-fe.h>

static inline PGconn *must_connect(const char *conninfo)
{
    PGconn *c = PQconnectdb(conninfo);

    BENCH_CHECK(PQstatus(c) == CONNECTION_OK, "%s", PQerrorMessage(c));
    return c;
}

static inline void must(PGconn *c, const char *sql)
{
    PGresult *r = PQexec(c, sql);

    BENCH_CHECK(PQresultStatus(r) == PGRES_COMMAND_OK ||
                    PQresultStatus(r) == PGRES_TUPLES_OK,
                "%s: %s", sql, PQresultErrorMessage(r));
    PQclear(r);
}

#endif

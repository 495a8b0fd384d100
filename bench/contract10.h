/* SPDX-License-Identifier: MIT */
/*
 * contract10.h -- the 10-field payload and its contract that the record
 * benchmarks check on every backend (bench_record.c on SQLite,
 * pg/bench_pg_record.c on PostgreSQL), so their figures compare.
 */
#ifndef DE_BENCH_CONTRACT10_H
#define DE_BENCH_CONTRACT10_H

/* Ten fields, as an assignment might carry, and their contract. */
static const char payload10[] =
    "{\"order_id\":\"O-00042\",\"rider_id\":\"R-0042\",\"zone\":"
    "\"mapo\",\"vehicle\":\"bike\",\"eta_s\":540,\"fee\":3500,"
    "\"lat\":37.5665,\"lng\":126.978,\"priority\":false,"
    "\"assigned_at\":\"2026-11-25T11:00:00.123Z\"}";
static const char contract10[] =
    "{\"$id\":\"https://schemas.example.com/delivery/assigned/v1.json\","
    "\"type\":\"object\",\"properties\":{"
    "\"order_id\":{\"type\":\"string\",\"pattern\":\"^O-[0-9]+$\"},"
    "\"rider_id\":{\"type\":\"string\",\"pattern\":\"^R-[0-9]+$\"},"
    "\"zone\":{\"enum\":[\"gangnam\",\"jongno\",\"mapo\",\"songpa\"]},"
    "\"vehicle\":{\"enum\":[\"bike\",\"car\",\"foot\"]},"
    "\"eta_s\":{\"type\":\"integer\",\"minimum\":0,\"maximum\":86400},"
    "\"fee\":{\"type\":\"integer\",\"minimum\":0},"
    "\"lat\":{\"type\":\"number\",\"minimum\":-90,\"maximum\":90},"
    "\"lng\":{\"type\":\"number\",\"minimum\":-180,\"maximum\":180},"
    "\"priority\":{\"type\":\"boolean\"},"
    "\"assigned_at\":{\"type\":\"string\",\"format\":\"date-time\"}},"
    "\"required\":[\"order_id\",\"rider_id\",\"zone\",\"eta_s\","
    "\"assigned_at\"]}";
#endif

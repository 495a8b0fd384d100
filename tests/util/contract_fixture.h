/* SPDX-License-Identifier: MIT */
/*
 * contract_fixture.h -- the contracts the outbox suites define on every
 * backend (check_outbox.c on SQLite, check_pg_outbox.c on PostgreSQL), so
 * that both check the same rules against the same schemas.
 */
#ifndef DE_CONTRACT_FIXTURE_H
#define DE_CONTRACT_FIXTURE_H

/* delivery.assigned v1: a pattern, a range, a required field, an $id. */
#define ASSIGNED_V1                                                            \
    "{\"$id\":\"https://schemas.example.com/delivery/assigned/v1.json\","      \
    "\"type\":\"object\",\"properties\":{"                                     \
    "\"rider_id\":{\"type\":\"string\",\"pattern\":\"^R-[0-9]+$\"},"           \
    "\"eta_min\":{\"type\":\"integer\",\"minimum\":0}},"                       \
    "\"required\":[\"rider_id\"]}"
/* v2 adds a required zone: a breaking change, so a new version. */
#define ASSIGNED_V2                                                            \
    "{\"type\":\"object\",\"properties\":{"                                    \
    "\"rider_id\":{\"type\":\"string\"},\"zone\":{\"type\":\"string\"}},"      \
    "\"required\":[\"rider_id\",\"zone\"]}"
/* v1 again with other spacing and member order: the same meaning, so a
 * service may define its contracts at every start. */
#define ASSIGNED_V1_SAME                                                       \
    "{ \"required\": [\"rider_id\"], \"type\": \"object\",\n"                  \
    "  \"$id\": \"https://schemas.example.com/delivery/assigned/v1.json\","    \
    "  \"properties\": {\"eta_min\": {\"minimum\": 0, \"type\": "              \
    "\"integer\"}, \"rider_id\": {\"pattern\": \"^R-[0-9]+$\", "               \
    "\"type\": \"string\"}}}"

#endif

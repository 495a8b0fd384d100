/* SPDX-License-Identifier: MIT */
/*
 * contract.h -- event contracts: a subset of JSON Schema (draft 2020-12)
 * compiled once and checked against payloads (contract.c).
 *
 * The supported subset, its deviations from plain JSON Schema and the
 * limits below are documented in docs/CONTRACTS.md; keep the two in step.
 */
#ifndef DE_CONTRACT_H
#define DE_CONTRACT_H

#include "internal.h"

#include <jansson.h>

/* Largest schema text accepted: a contract is written by hand, and this
 * bounds the memory and time a compile can take. */
#define DE__CONTRACT_MAX_BYTES (1024 * 1024)
/* Deepest nesting of subschemas, counting the top level as 1 and each
 * properties/items/$defs entry and each $ref followed as one more.  It
 * bounds the recursion of both compile and check. */
#define DE__CONTRACT_DEPTH_MAX 64
/* Most values an enum may list. */
#define DE__CONTRACT_ENUM_MAX 1024
/* Longest $id, in bytes (it becomes the ce_dataschema header). */
#define DE__CONTRACT_ID_MAX 1024
/* Longest pattern, in bytes. */
#define DE__PATTERN_MAX 256
/* Largest bound in a pattern's {m,n} (POSIX's RE_DUP_MAX minimum). */
#define DE__PATTERN_REPEAT_MAX 255
/* Most instructions a pattern may compile to once its {m,n} are unrolled.
 * A check costs at most this many steps per subject character. */
#define DE__PATTERN_SIZE_MAX 1024
/* Longest string, in bytes, checked against a pattern; a longer one
 * fails the check.  With DE__PATTERN_SIZE_MAX it bounds the time one
 * pattern check can take (docs/CONTRACTS.md, "Patterns"). */
#define DE__PATTERN_SUBJECT_MAX 1024

/* A compiled contract schema: immutable once compiled, so it may be used
 * by several threads at once. */
typedef struct de__contract de__contract;

/*
 * Parses schema_json[0..len) and compiles it.  DE_ERR_CONTRACT, with a
 * message naming the keyword, its JSON path in the schema and the bad
 * value, when the text is not JSON, uses a keyword outside the subset,
 * gives a keyword a wrong value, could never be satisfied, or exceeds a
 * limit above; DE_ERR_NOMEM when out of memory.  *out is NULL on failure.
 */
de_err de__contract_compile(const char *schema_json, size_t len,
                            de__contract **out);

/*
 * Checks instance (normally the parsed payload) against s.  DE_OK, or
 * DE_ERR_CONTRACT with "<label>: <path> <rule>, got <value>" for the
 * first violation (docs/CONTRACTS.md gives the order; the result and
 * message are deterministic).  label NULL reads as "payload".
 * DE_ERR_NOMEM if the regex engine runs out of memory.
 */
de_err de__contract_validate(const de__contract *s, const json_t *instance,
                             const char *label);

/* The top-level $id, or NULL; borrowed from s. */
const char *de__contract_id(const de__contract *s);

/* The schema as compact JSON with sorted keys, for comparing two
 * definitions by meaning rather than by bytes; borrowed from s. */
const char *de__contract_canonical(const de__contract *s);

/* Frees s; NULL is a no-op. */
void de__contract_free(de__contract *s);

/* ---- the contracts of an outbox (contract_store.c) -------------------- */

/*
 * The contracts defined in a database (table de_contracts), compiled and
 * cached by one outbox.  Definitions are immutable once stored (a
 * different schema for a stored version is refused), so a cache only ever
 * grows: it loads the rows above the highest id it has seen.
 *
 * Used on its outbox's connection thread only; the compiled schemas it
 * hands out live until the set is freed.
 */
typedef struct de__contract_set de__contract_set;

/* One defined version of an event type. */
typedef struct de__contract_def {
    int version;
    de__contract *schema;
    const char *dataschema; /* the schema's $id, or NULL; borrowed */
    char label[2 * DE__IDENT_MAX + 16]; /* "delivery.assigned v1" */
} de__contract_def;

/* An empty set; NULL when out of memory. */
de__contract_set *de__contract_set_new(void);
void de__contract_set_free(de__contract_set *cs);

/* Compiles a stored row and adds it to cs; DE_ERR_STATE naming dbname,
 * table and row_id when the row is malformed or no longer compiles.
 * Used by each backend's loader (the SQLite one below, lib/pg). */
de_err de__contract_set_add_stored(de__contract_set *cs, const char *dbname,
                                   const char *table, int64_t row_id,
                                   const char *type, const char *act,
                                   int version, const char *text, size_t len);

/* How many definitions cs holds, every type together. */
size_t de__contract_set_count(const de__contract_set *cs);

/* Compiles a definition about to be stored and checks its $id as the
 * relay will (DE_ERR_CONTRACT naming type.action vN); *out (caller frees)
 * is NULL on failure.  The first half of every backend's define. */
de_err de__contract_prepare(const char *subject_type, const char *action,
                            int version, const char *schema_json,
                            de__contract **out);

/* DE_OK when stored (the text already stored for type.action vN) means
 * the same as schema; DE_ERR_CONTRACT "define a new version" otherwise. */
de_err de__contract_same(const char *type, const char *act, int version,
                         const char *stored, const de__contract *schema);

/* Loads into cs the definitions stored in db that it has not seen yet.
 * Reads only: the caller decides when reading is safe (see outbox.c). */
de_err de__contract_set_load(de__contract_set *cs, sqlite3 *db);

/* The definition of subject_type.action at version (0: the latest), or
 * NULL.  *versions receives how many versions the type has (0: none). */
const de__contract_def *de__contract_set_find(const de__contract_set *cs,
                                              const char *subject_type,
                                              const char *action, int version,
                                              size_t *versions);

/* Writes into buf the versions of subject_type.action, "v1, v2". */
void de__contract_set_versions(const de__contract_set *cs,
                               const char *subject_type, const char *action,
                               char *buf, size_t size);

/* Stores a definition in db (its own IMMEDIATE transaction, outside any
 * other) and adds it to cs, loading others' new definitions too.  An
 * identical definition (same meaning, compared canonically) is accepted
 * again; a different schema for a stored version is DE_ERR_CONTRACT. */
de_err de__contract_define(de__contract_set *cs, sqlite3 *db,
                           const char *subject_type, const char *action,
                           int version, const char *schema_json);

#endif /* DE_CONTRACT_H */

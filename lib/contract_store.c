/* SPDX-License-Identifier: MIT */
/*
 * contract_store.c -- the contracts of an outbox: stored in the host's
 * database (de_contracts) so that every connection, process, relay and
 * the tool see the same definitions, and compiled once into a cache per
 * outbox so that de_record never parses a schema and never has to read
 * the database before it writes.
 *
 * Invariants: a stored definition never changes (redefining a version
 * with another schema is refused), so a cache is always a prefix of the
 * table in id order and refreshing it means loading the rows above the
 * highest id seen.  A type's versions are kept sorted, the last being the
 * latest.
 */
#include "contract.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct ctype {
    char *subject_type, *action;
    uint64_t hash;
    DE__VEC(de__contract_def *) defs; /* sorted by version */
} ctype;

struct de__contract_set {
    ctype **slots; /* open addressing, cap a power of two */
    size_t n, cap;
    size_t ndefs;    /* definitions cached, every type together */
    int64_t last_id; /* highest de_contracts.id loaded */
};

/* Fails with code and "<prefix>: <the current message>" (the message is
 * copied first: de__fail writes into the buffer de_errmsg returns). */
static de_err fail_wrapped(de_err code, const char *prefix)
{
    char why[1024];

    snprintf(why, sizeof why, "%s", de_errmsg());
    return de__fail(code, "%s: %s", prefix, why);
}

static uint64_t type_hash(const char *st, const char *act)
{
    uint64_t h = UINT64_C(1469598103934665603);

    for (; *st; st++)
        h = (h ^ (unsigned char)*st) * UINT64_C(1099511628211);
    h = (h ^ '.') * UINT64_C(1099511628211);
    for (; *act; act++)
        h = (h ^ (unsigned char)*act) * UINT64_C(1099511628211);
    return h;
}

de__contract_set *de__contract_set_new(void)
{
    return calloc(1, sizeof(de__contract_set));
}

static void ctype_free(ctype *t)
{
    for (size_t i = 0; i < t->defs.n; i++) {
        de__contract_free(t->defs.v[i]->schema);
        free(t->defs.v[i]);
    }
    DE__VEC_FREE(t->defs);
    free(t->subject_type);
    free(t->action);
    free(t);
}

void de__contract_set_free(de__contract_set *cs)
{
    if (cs == NULL)
        return;
    for (size_t i = 0; i < cs->cap; i++)
        if (cs->slots[i] != NULL)
            ctype_free(cs->slots[i]);
    free(cs->slots);
    free(cs);
}

static ctype **slot_of(ctype **slots, size_t cap, const char *st,
                       const char *act, uint64_t h)
{
    size_t i = (size_t)h & (cap - 1);

    while (slots[i] != NULL &&
           (slots[i]->hash != h || strcmp(slots[i]->subject_type, st) != 0 ||
            strcmp(slots[i]->action, act) != 0))
        i = (i + 1) & (cap - 1);
    return &slots[i];
}

static ctype *find_type(const de__contract_set *cs, const char *st,
                        const char *act)
{
    if (cs->n == 0)
        return NULL;
    return *slot_of(cs->slots, cs->cap, st, act, type_hash(st, act));
}

/* The type's entry, created when missing; NULL when out of memory. */
static ctype *get_type(de__contract_set *cs, const char *st, const char *act)
{
    uint64_t h = type_hash(st, act);
    ctype **slot, *t;

    if (2 * (cs->n + 1) > cs->cap) {
        size_t cap = cs->cap ? 2 * cs->cap : 16;
        ctype **slots = calloc(cap, sizeof *slots);
        if (slots == NULL)
            return NULL;
        for (size_t i = 0; i < cs->cap; i++)
            if (cs->slots[i] != NULL)
                *slot_of(slots, cap, cs->slots[i]->subject_type,
                         cs->slots[i]->action, cs->slots[i]->hash) =
                    cs->slots[i];
        free(cs->slots);
        cs->slots = slots;
        cs->cap = cap;
    }
    slot = slot_of(cs->slots, cs->cap, st, act, h);
    if (*slot != NULL)
        return *slot;
    t = calloc(1, sizeof *t);
    if (t == NULL || (t->subject_type = strdup(st)) == NULL ||
        (t->action = strdup(act)) == NULL) {
        if (t != NULL)
            free(t->subject_type);
        free(t);
        return NULL;
    }
    t->hash = h;
    *slot = t;
    cs->n++;
    return t;
}

/* Adds a compiled definition, taking schema (freed on failure). */
static de_err add_def(de__contract_set *cs, const char *st, const char *act,
                      int version, de__contract *schema)
{
    ctype *t = get_type(cs, st, act);
    de__contract_def *d = t ? calloc(1, sizeof *d) : NULL;
    size_t i;

    if (d == NULL || !DE__VEC_PUSH(t->defs, d)) {
        free(d);
        de__contract_free(schema);
        return de__fail(DE_ERR_NOMEM, "out of memory caching a contract");
    }
    d->version = version;
    d->schema = schema;
    cs->ndefs++;
    d->dataschema = de__contract_id(schema);
    snprintf(d->label, sizeof d->label, "%s.%s v%d", st, act, version);
    /* Keep the versions sorted: insertion from the end. */
    for (i = t->defs.n - 1; i > 0 && t->defs.v[i - 1]->version > version; i--)
        t->defs.v[i] = t->defs.v[i - 1];
    t->defs.v[i] = d;
    return DE_OK;
}

const de__contract_def *de__contract_set_find(const de__contract_set *cs,
                                              const char *subject_type,
                                              const char *action, int version,
                                              size_t *versions)
{
    const ctype *t = find_type(cs, subject_type, action);

    *versions = t ? t->defs.n : 0;
    if (t == NULL || t->defs.n == 0)
        return NULL;
    if (version == 0)
        return t->defs.v[t->defs.n - 1];
    for (size_t i = 0; i < t->defs.n; i++)
        if (t->defs.v[i]->version == version)
            return t->defs.v[i];
    return NULL;
}

void de__contract_set_versions(const de__contract_set *cs,
                               const char *subject_type, const char *action,
                               char *buf, size_t size)
{
    const ctype *t = find_type(cs, subject_type, action);
    size_t o = 0;

    buf[0] = '\0';
    for (size_t i = 0; t != NULL && i < t->defs.n && o < size; i++) {
        int n = snprintf(buf + o, size - o, "%sv%d", i ? ", " : "",
                         t->defs.v[i]->version);
        if (n < 0)
            break;
        o += (size_t)n;
    }
}

de_err de__contract_set_add_stored(de__contract_set *cs, const char *dbname,
                                   const char *table, int64_t row_id,
                                   const char *type, const char *act,
                                   int version, const char *text, size_t len)
{
    de__contract *schema = NULL;
    de_err err;

    if (type == NULL || act == NULL || text == NULL || !de__is_ident(type) ||
        !de__is_ident(act) || version < 1)
        return de__fail(DE_ERR_STATE,
                        "database '%s': contract row %lld of %s is malformed",
                        dbname, (long long)row_id, table);
    if ((err = de__contract_compile(text, len, &schema)) != DE_OK) {
        char what[512];
        snprintf(what, sizeof what,
                 "database '%s': the stored contract %s.%s v%d no longer "
                 "compiles",
                 dbname, type, act, version);
        return fail_wrapped(err == DE_ERR_NOMEM ? err : DE_ERR_STATE, what);
    }
    return add_def(cs, type, act, version, schema);
}

size_t de__contract_set_count(const de__contract_set *cs)
{
    return cs->ndefs;
}

de_err de__contract_set_load(de__contract_set *cs, sqlite3 *db)
{
    sqlite3_stmt *st = NULL;
    de_err err = DE_OK;
    int rc;

    if (sqlite3_prepare_v2(db,
                           "SELECT id, subject_type, action, version, schema "
                           "FROM main.de_contracts WHERE id > ?1 ORDER BY id",
                           -1, &st, NULL) != SQLITE_OK)
        return de__fail_db(db, "cannot read the contracts");
    sqlite3_bind_int64(st, 1, cs->last_id);
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        const char *type = (const char *)sqlite3_column_text(st, 1);
        const char *act = (const char *)sqlite3_column_text(st, 2);
        int version = sqlite3_column_int(st, 3);
        const char *text = (const char *)sqlite3_column_text(st, 4);

        if ((err = de__contract_set_add_stored(
                 cs, sqlite3_db_filename(db, "main"), "de_contracts",
                 sqlite3_column_int64(st, 0), type, act, version, text,
                 (size_t)sqlite3_column_bytes(st, 4))) != DE_OK)
            break;
        cs->last_id = sqlite3_column_int64(st, 0);
    }
    if (err == DE_OK && rc != SQLITE_DONE)
        err = de__fail_db(db, "cannot read the contracts");
    sqlite3_finalize(st);
    return err;
}

/* The stored schema text of a version: *out (caller frees) or NULL. */
static de_err stored_text(sqlite3 *db, const char *type, const char *act,
                          int version, char **out)
{
    sqlite3_stmt *st = NULL;
    const char *t;
    int rc;

    *out = NULL;
    if (sqlite3_prepare_v2(db,
                           "SELECT schema FROM main.de_contracts WHERE "
                           "subject_type = ?1 AND action = ?2 AND version = ?3",
                           -1, &st, NULL) != SQLITE_OK)
        return de__fail_db(db, "cannot read the contracts");
    sqlite3_bind_text(st, 1, type, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, act, -1, SQLITE_STATIC);
    sqlite3_bind_int(st, 3, version);
    rc = sqlite3_step(st);
    if (rc == SQLITE_ROW && (t = (const char *)sqlite3_column_text(st, 0)) &&
        (*out = strdup(t)) == NULL)
        rc = SQLITE_NOMEM;
    sqlite3_finalize(st);
    if (rc == SQLITE_NOMEM)
        return de__fail(DE_ERR_NOMEM, "out of memory reading a contract");
    if (rc != SQLITE_ROW && rc != SQLITE_DONE)
        return de__fail_db(db, "cannot read the contracts");
    return DE_OK;
}

de_err de__contract_same(const char *type, const char *act, int version,
                         const char *stored, const de__contract *schema)
{
    de__contract *old = NULL;
    de_err err = de__contract_compile(stored, strlen(stored), &old);

    if (err == DE_OK &&
        strcmp(de__contract_canonical(old), de__contract_canonical(schema)))
        err = de__fail(DE_ERR_CONTRACT,
                       "%s.%s v%d is already defined with a different "
                       "schema; a contract never changes once defined: "
                       "define the new schema as a new version",
                       type, act, version);
    else if (err != DE_OK && err != DE_ERR_NOMEM)
        err = fail_wrapped(DE_ERR_STATE,
                           "the stored contract no longer compiles");
    de__contract_free(old);
    return err;
}

/* Inside the IMMEDIATE transaction: stores the definition unless an
 * identical one is there; refuses a different one. */
static de_err store(sqlite3 *db, const char *type, const char *act, int version,
                    const char *schema_json, const de__contract *schema)
{
    sqlite3_stmt *st = NULL;
    char *text = NULL;
    de_err err;

    if ((err = stored_text(db, type, act, version, &text)) != DE_OK)
        return err;
    if (text != NULL) {
        err = de__contract_same(type, act, version, text, schema);
        free(text);
        return err;
    }
    if (sqlite3_prepare_v2(db,
                           "INSERT INTO main.de_contracts(subject_type, "
                           "action, version, schema, defined_at_ms) VALUES "
                           "(?1, ?2, ?3, ?4, ?5)",
                           -1, &st, NULL) != SQLITE_OK)
        return de__fail_db(db, "cannot store the contract %s.%s v%d", type, act,
                           version);
    sqlite3_bind_text(st, 1, type, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, act, -1, SQLITE_STATIC);
    sqlite3_bind_int(st, 3, version);
    sqlite3_bind_text(st, 4, schema_json, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 5, de__now_ms());
    if (sqlite3_step(st) != SQLITE_DONE)
        err = de__fail_db(db, "cannot store the contract %s.%s v%d", type, act,
                          version);
    sqlite3_finalize(st);
    return err;
}

de_err de__contract_prepare(const char *subject_type, const char *action,
                            int version, const char *schema_json,
                            de__contract **out)
{
    de__contract *schema = NULL;
    const char *id;
    de_err err;

    *out = NULL;
    if ((err = de__contract_compile(schema_json, strlen(schema_json),
                                    &schema)) != DE_OK) {
        char what[2 * DE__IDENT_MAX + 16];
        snprintf(what, sizeof what, "%s.%s v%d", subject_type, action, version);
        return err == DE_ERR_CONTRACT ? fail_wrapped(err, what) : err;
    }
    /* Every relay checks ce_dataschema as a URI reference before it
     * publishes a row (de__row_check): refuse now what it would refuse. */
    id = de__contract_id(schema);
    if (id != NULL && !de__is_uri_reference(id, strlen(id))) {
        char q[DE__QUOTE_MAX];
        err = de__fail(DE_ERR_CONTRACT,
                       "%s.%s v%d: contract schema: '$id' at $ must be an "
                       "RFC 3986 URI reference, got %s",
                       subject_type, action, version,
                       de__quote(q, sizeof q, id, (size_t)-1));
        de__contract_free(schema);
        return err;
    }
    *out = schema;
    return DE_OK;
}

de_err de__contract_define(de__contract_set *cs, sqlite3 *db,
                           const char *subject_type, const char *action,
                           int version, const char *schema_json)
{
    de__contract *schema = NULL;
    de_err err;

    if ((err = de__contract_prepare(subject_type, action, version, schema_json,
                                    &schema)) != DE_OK)
        return err;
    if ((err = de__exec(db, "BEGIN IMMEDIATE")) != DE_OK)
        goto done;
    if ((err = store(db, subject_type, action, version, schema_json, schema)) !=
            DE_OK ||
        (err = de__exec(db, "COMMIT")) != DE_OK) {
        (void)sqlite3_exec(db, "ROLLBACK", NULL, NULL, NULL);
        goto done;
    }
    /* Committed: the cache takes it (and whatever others defined) from the
     * table, so that it stays a prefix of the table in id order. */
    err = de__contract_set_load(cs, db);
done:
    de__contract_free(schema);
    return err;
}

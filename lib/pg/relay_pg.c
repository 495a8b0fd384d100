/* SPDX-License-Identifier: MIT */
/*
 * relay_pg.c -- starting the relay of an outbox in PostgreSQL: the relay
 * logic is the one of relay.c; it reads the outbox through
 * source_pg.c and keeps its state through relay_state_pg.c, each on a
 * connection of its own to the database (never the host's connection,
 * which belongs to the host's thread and transactions).
 *
 * Where it connects: de_relay_start_pg's conninfo; for de_relay_start on
 * an outbox opened with de_outbox_open_pg, pg.conninfo when set, else
 * the database, host, port, user and password of the host's connection.
 * Messages and logs name the database by its name and host only (a
 * conninfo may hold a password).
 */
/* internal.h first: it marks the build (DE_BUILDING_LIBRARY) so that
 * DE_EXTERN exports what deliveryevents_pg.h declares. */
#include "pg_int.h"
#include "relay_int.h"

#include "deliveryevents_pg.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static de_err pg_open_source(const char *where, de_relay *r, bool linked)
{
    (void)linked; /* no checkpoints of the host's log to hand over */
    de_err err = de__source_open_pg(where, true, &r->src, r->outbox_id);

    if (err == DE_OK)
        de__source_pg_relay(r->src);
    return err;
}

static de_err pg_open_state(const char *where, de_relay *r, int64_t floor,
                            int64_t *cursor)
{
    return de__rstate_open_pg(where, r->outbox_id, floor, &r->st, cursor);
}

/* A PostgreSQL outbox wakes its relay through NOTIFY, not through the
 * in-process link of a SQLite outbox. */
static const de__relay_store pg_store = {pg_open_source, pg_open_state, false,
                                         true};

/* "PostgreSQL database <db> on <host>" from conninfo, for messages;
 * never the password. */
static void display_name(const char *conninfo, char *buf, size_t size)
{
    PQconninfoOption *opts = PQconninfoParse(conninfo, NULL);
    const char *db = NULL, *host = NULL;

    for (PQconninfoOption *o = opts; o != NULL && o->keyword != NULL; o++) {
        if (strcmp(o->keyword, "dbname") == 0)
            db = o->val;
        else if (strcmp(o->keyword, "host") == 0)
            host = o->val;
    }
    snprintf(buf, size, "PostgreSQL database %s%s%s", db ? db : "(default)",
             host ? " on " : "", host ? host : "");
    PQconninfoFree(opts);
}

/* conf is the relay's own copy: owned from here on, even on failure. */
static de_err start(const char *conninfo, de_conf *conf, de_outbox *ob,
                    de_relay **out)
{
    char name[512];

    /* Refused rather than ignored: whoever set it expects the state
     * there, and would back up (or restore) that file in vain. */
    if (de__conf_str(conf, DE__K_RELAY_STATE_PATH)[0] != '\0') {
        de_conf_destroy(conf);
        return de__fail(DE_ERR_CONFIG,
                        "relay.state.path is set, but the relay of an "
                        "outbox in PostgreSQL keeps its state in the same "
                        "database (the relay_* tables in schema "
                        "deliveryevents), never in a file: remove "
                        "relay.state.path from its configuration");
    }
    display_name(conninfo, name, sizeof name);
    return de__relay_new(name, conninfo,
                         "the relay_* tables in schema deliveryevents", conf,
                         ob, &pg_store, out);
}

/* Appends key='value' to buf, quoted as libpq reads it. */
static void append(char *buf, size_t size, const char *key, const char *value)
{
    size_t n = strlen(buf);

    if (value == NULL || value[0] == '\0' || n + strlen(key) + 4 >= size)
        return;
    n += (size_t)snprintf(buf + n, size - n, "%s%s='", n ? " " : "", key);
    for (const char *p = value; *p != '\0' && n + 3 < size; p++) {
        if (*p == '\'' || *p == '\\')
            buf[n++] = '\\';
        buf[n++] = *p;
    }
    if (n + 2 < size) {
        buf[n++] = '\'';
        buf[n] = '\0';
    }
}

de_err de__relay_start_pg_host(PGconn *host, de_outbox *ob, de_conf *conf,
                               de_relay **out)
{
    const char *set = de__conf_str(conf, DE__K_PG_CONNINFO);
    char conninfo[2048] = "";

    if (set[0] != '\0')
        return start(set, conf, ob, out);
    append(conninfo, sizeof conninfo, "dbname", PQdb(host));
    append(conninfo, sizeof conninfo, "host", PQhost(host));
    append(conninfo, sizeof conninfo, "port", PQport(host));
    append(conninfo, sizeof conninfo, "user", PQuser(host));
    append(conninfo, sizeof conninfo, "password", PQpass(host));
    return start(conninfo, conf, ob, out);
}

de_err de_relay_start_pg(const char *conninfo, const de_conf *conf,
                         de_relay **out)
{
    de_conf *copy;

    if (out != NULL)
        *out = NULL;
    if (conninfo == NULL || out == NULL)
        return de__fail(DE_ERR_ARG,
                        "de_relay_start_pg needs a connection string and an "
                        "out pointer (got NULL %s)",
                        conninfo == NULL ? "conninfo" : "out");
    copy = de__conf_dup(conf);
    if (copy == NULL)
        return de__fail(DE_ERR_NOMEM, "out of memory starting the relay");
    return start(conninfo, copy, NULL, out);
}

/* SPDX-License-Identifier: MIT */
/*
 * example.h -- the command line and main loop shared by the consuming
 * examples (query_model, notifier, live_stats), so that each of them
 * shows only what is its own: its tables and its handlers.
 *
 * Usage of each: NAME --bootstrap SERVERS [--db PATH] [--group ID]
 *                     [--until-idle MS] [-X key=value]...
 * It consumes until SIGINT/SIGTERM, or with --until-idle until no event
 * arrived for MS milliseconds (after it has applied at least one), then
 * prints its report.
 *
 * A consumer on another database (query_model_pg.c, where --db takes a
 * libpq connection string) uses example_args and example_consume, the
 * command line and the loop, with a main of its own.
 */
#ifndef DE_EXAMPLE_H
#define DE_EXAMPLE_H

#include <deliveryevents.h>
#include <sqlite3.h>

#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

struct example {
    const char *name;
    const char *default_db;
    const char *default_group;
    /* Creates the example's tables; 0 on success. */
    int (*schema)(sqlite3 *db);
    /* Registers its handlers. */
    de_err (*handlers)(de_consumer *c);
    /* Prints what it built. */
    void (*report)(sqlite3 *db);
};

/* One handler per action of a subject type. */
struct example_handler {
    const char *action;
    de_handler_fn fn;
};

static inline de_err example_on(de_consumer *c, const char *subject_type,
                                const struct example_handler *h, size_t n)
{
    de_err e;

    for (size_t i = 0; i < n; i++)
        if ((e = de_consumer_on(c, subject_type, h[i].action, h[i].fn, NULL)) !=
            DE_OK)
            return e;
    return DE_OK;
}

static volatile sig_atomic_t example_stop;

static inline void example_on_signal(int sig)
{
    (void)sig;
    example_stop = 1;
}

static inline int64_t example_now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static inline int example_exec(sqlite3 *db, const char *sql)
{
    char *err = NULL;

    if (sqlite3_exec(db, sql, NULL, NULL, &err) != SQLITE_OK) {
        fprintf(stderr, "%s\n", err ? err : sqlite3_errmsg(db));
        sqlite3_free(err);
        return -1;
    }
    return 0;
}

/* Runs one statement of a handler with the event bound: ?1 the subject
 * id, ?2 the event time in Unix seconds (ce_time), ?3 the data (JSON
 * text), and ?4 the action when the statement has a fourth parameter. */
static inline de_err example_run(sqlite3 *db, const de_event_view *ev,
                                 const char *sql)
{
    sqlite3_stmt *st;
    int rc;

    if (sqlite3_prepare_v2(db, sql, -1, &st, NULL) != SQLITE_OK)
        return DE_ERR_DB;
    sqlite3_bind_text(st, 1, ev->subject_id, -1, SQLITE_STATIC);
    sqlite3_bind_double(st, 2, (double)ev->occurred_at_ms / 1000.0);
    sqlite3_bind_text(st, 3, ev->payload, (int)ev->payload_len, SQLITE_STATIC);
    if (sqlite3_bind_parameter_count(st) >= 4)
        sqlite3_bind_text(st, 4, ev->action, -1, SQLITE_STATIC);
    rc = sqlite3_step(st);
    sqlite3_finalize(st);
    return rc == SQLITE_DONE ? DE_OK : DE_ERR_DB;
}

/* Prints the rows of a query as aligned columns (at most `limit`). */
static inline void example_print(sqlite3 *db, const char *sql, int limit)
{
    sqlite3_stmt *st;
    int n = 0, cols;

    if (sqlite3_prepare_v2(db, sql, -1, &st, NULL) != SQLITE_OK) {
        fprintf(stderr, "%s: %s\n", sql, sqlite3_errmsg(db));
        return;
    }
    cols = sqlite3_column_count(st);
    for (int i = 0; i < cols; i++)
        printf("%s%-14s", i ? " " : "  ", sqlite3_column_name(st, i));
    printf("\n");
    while (sqlite3_step(st) == SQLITE_ROW && n++ < limit) {
        for (int i = 0; i < cols; i++) {
            const unsigned char *t = sqlite3_column_text(st, i);
            printf("%s%-14s", i ? " " : "  ", t ? (const char *)t : "-");
        }
        printf("\n");
    }
    sqlite3_finalize(st);
}

static inline void example_usage(const char *name, const char *db)
{
    fprintf(stderr,
            "usage: %s --bootstrap SERVERS [--db %s] [--group ID] "
            "[--until-idle MS] [-X key=value]...\n",
            name, db);
    exit(2);
}

/* The command line every consumer shares.  Sets *db, *group and
 * *idle_ms (-1: until a signal) when given, and the Kafka settings into
 * conf; returns 0, or 2 after printing why. */
static inline int example_args(const char *name, const char *db_word, int argc,
                               char **argv, const char **db, const char **group,
                               int64_t *idle_ms, de_conf *conf)
{
    int have_bootstrap = 0;

    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--db") == 0 && i + 1 < argc) {
            *db = argv[++i];
        } else if (strcmp(argv[i], "--group") == 0 && i + 1 < argc) {
            *group = argv[++i];
        } else if (strcmp(argv[i], "--until-idle") == 0 && i + 1 < argc) {
            *idle_ms = strtol(argv[++i], NULL, 10);
        } else if (strcmp(argv[i], "--bootstrap") == 0 && i + 1 < argc) {
            have_bootstrap = 1;
            if (de_conf_set(conf, "bootstrap.servers", argv[++i]) != DE_OK)
                goto conf_fail;
        } else if (strcmp(argv[i], "-X") == 0 && i + 1 < argc) {
            char *kv = argv[++i], *eq = strchr(kv, '=');
            if (eq == NULL)
                example_usage(name, db_word);
            *eq = '\0';
            if (de_conf_set(conf, kv, eq + 1) != DE_OK)
                goto conf_fail;
        } else {
            example_usage(name, db_word);
        }
    }
    if (!have_bootstrap)
        example_usage(name, db_word);
    if (de_conf_set(conf, "group.id", *group) != DE_OK)
        goto conf_fail;
    signal(SIGINT, example_on_signal);
    signal(SIGTERM, example_on_signal);
    return 0;
conf_fail:
    fprintf(stderr, "%s: %s\n", name, de_errmsg());
    return 2;
}

/* Consumes until a signal, or until no event arrived for idle_ms (after
 * at least one was applied); prints the consumer's account and closes
 * it.  Returns 0, or 1 when closing failed. */
static inline int example_consume(const char *name, de_consumer *c,
                                  int64_t idle_ms)
{
    int64_t last = example_now_ms();
    de_consumer_stats st;
    int handled;

    while (!example_stop) {
        if (de_consumer_poll(c, 100, &handled) != DE_OK)
            fprintf(stderr, "%s: %s\n", name, de_errmsg());
        de_consumer_stats_get(c, &st);
        if (handled > 0)
            last = example_now_ms();
        if (idle_ms >= 0 && st.applied > 0 &&
            example_now_ms() - last >= idle_ms)
            break;
    }
    de_consumer_stats_get(c, &st);
    printf("%s: applied %llu events in %llu transactions (%llu duplicates "
           "skipped), %llu parked subjects, %llu foreign records\n",
           name, (unsigned long long)st.applied, (unsigned long long)st.batches,
           (unsigned long long)st.duplicates,
           (unsigned long long)st.parked_subjects,
           (unsigned long long)st.foreign);
    if (de_consumer_close(c) != DE_OK) {
        fprintf(stderr, "%s: %s\n", name, de_errmsg());
        return 1;
    }
    return 0;
}

static inline int example_main(const struct example *ex, int argc, char **argv)
{
    const char *path = ex->default_db, *group = ex->default_group;
    int64_t idle_ms = -1;
    de_conf *conf = de_conf_new();
    de_consumer *c = NULL;
    sqlite3 *db = NULL;
    int rc;

    if ((rc = example_args(ex->name, "PATH", argc, argv, &path, &group,
                           &idle_ms, conf)) != 0)
        return rc;
    if (sqlite3_open(path, &db) != SQLITE_OK || ex->schema(db) != 0) {
        fprintf(stderr, "%s: cannot set up %s: %s\n", ex->name, path,
                sqlite3_errmsg(db));
        return 1;
    }
    if (de_consumer_open(db, conf, &c) != DE_OK || ex->handlers(c) != DE_OK) {
        fprintf(stderr, "%s: %s\n", ex->name, de_errmsg());
        return 1;
    }
    de_conf_destroy(conf);
    rc = example_consume(ex->name, c, idle_ms);
    ex->report(db);
    sqlite3_close(db);
    return rc;
}

#endif

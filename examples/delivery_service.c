/* SPDX-License-Identifier: MIT */
/*
 * delivery_service.c -- a small delivery service that announces what
 * happens to its deliveries as domain events.
 *
 * It keeps its own tables (orders, riders, deliveries).  Every state change
 * -- a delivery created for an order, assigned to a rider, picked up,
 * delivered, sometimes canceled -- is one transaction that updates those
 * tables and records the matching event with de_record, so the state and
 * the events can never disagree.  The service knows nothing about who
 * listens: notifications, ETA, statistics and the rest react to the events.
 *
 * Usage: delivery_service [--db PATH] [--deliveries N] [--seed S]
 *                         [--bootstrap SERVERS [--latency]]
 *
 * With --bootstrap the service runs the bundled relay in its own process:
 * each commit that recorded an event wakes it, and it publishes to Kafka
 * ("delivery.events", key = delivery id).  --latency also measures, for
 * every event, the time from COMMIT returning to Kafka acknowledging it.
 *
 * Every event it records has a contract, declared at startup with
 * de_outbox_define and defined from the actor's side -- the facts of
 * the action, identifiers rather than copies of other aggregates -- and
 * the outbox runs with outbox.strict=true, so an event type without a
 * contract, or a payload that strays from its contract, is refused.  The
 * run ends by showing one such refusal: a notifier "needs" the
 * customer's phone number, and the assignment is not the place for it.
 *
 * Time is simulated (starting 2026-11-25T11:00:00Z, advancing a few seconds
 * per step) so that runs are repeatable and the events carry realistic
 * occurred-at times.
 */
#include <deliveryevents.h>
#include <sqlite3.h>

#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static const char *const regions[] = {"gangnam", "jongno", "mapo", "songpa"};
#define N_REGIONS 4
#define N_RIDERS 12

struct service {
    sqlite3 *db;
    de_outbox *ob;
    de_relay *relay;    /* NULL without --bootstrap */
    double *latency_ms; /* with --latency: one per event */
    size_t n_latency, cap_latency;
    uint64_t committed;
    int64_t clock_ms; /* the simulated wall clock */
    unsigned rng;
};

enum status { CREATED, ASSIGNED, PICKED_UP, DELIVERED, CANCELED };

static unsigned next_rand(struct service *s)
{
    s->rng = s->rng * 1103515245u + 12345u;
    return (s->rng >> 16) & 0x7fff;
}

static int sql(sqlite3 *db, const char *q)
{
    char *err = NULL;

    if (sqlite3_exec(db, q, NULL, NULL, &err) != SQLITE_OK) {
        fprintf(stderr, "delivery_service: %s: %s\n", q, err ? err : "?");
        sqlite3_free(err);
        return -1;
    }
    return 0;
}

/* Runs a statement with text/integer parameters given as a format: 't'
 * text, 'i' int64.  Returns SQLite's result of the step. */
static int vrun(sqlite3 *db, const char *q, const char *fmt, va_list ap)
{
    sqlite3_stmt *st = NULL;
    int rc;

    if (sqlite3_prepare_v2(db, q, -1, &st, NULL) != SQLITE_OK) {
        fprintf(stderr, "delivery_service: %s\n", sqlite3_errmsg(db));
        return SQLITE_ERROR;
    }
    for (int i = 0; fmt[i]; i++) {
        if (fmt[i] == 't')
            sqlite3_bind_text(st, i + 1, va_arg(ap, const char *), -1,
                              SQLITE_TRANSIENT);
        else
            sqlite3_bind_int64(st, i + 1, va_arg(ap, int64_t));
    }
    rc = sqlite3_step(st);
    sqlite3_finalize(st);
    return rc;
}

static int run(sqlite3 *db, const char *q, const char *fmt, ...)
{
    va_list ap;
    int rc;

    va_start(ap, fmt);
    rc = vrun(db, q, fmt, ap);
    va_end(ap);
    return rc;
}

static double now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

/* Waits for the relay to report the event just committed as acknowledged
 * by Kafka, and notes how long that took.  (A demonstration of latency;
 * a real service would not wait.) */
static void measure_ack(struct service *s)
{
    double t0 = now_ms();
    de_relay_stats st;

    do {
        struct timespec pause = {0, 20000};
        nanosleep(&pause, NULL);
        de_relay_stats_get(s->relay, &st);
    } while (st.published < s->committed && now_ms() - t0 < 10000);
    if (s->n_latency < s->cap_latency)
        s->latency_ms[s->n_latency++] = now_ms() - t0;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/*
 * One state change: the domain update and its event in one transaction.
 * BEGIN IMMEDIATE takes the write lock first, so the reads that check the
 * current state cannot go stale before the write (no SQLITE_BUSY_SNAPSHOT).
 */
static int change(struct service *s, const char *delivery_id,
                  const char *action, const char *payload,
                  const char *update_sql, const char *update_fmt, ...)
{
    de_event ev = {0};
    de_recorded rec;
    va_list ap;
    int rc;

    if (sql(s->db, "BEGIN IMMEDIATE") != 0)
        return -1;
    va_start(ap, update_fmt);
    rc = vrun(s->db, update_sql, update_fmt, ap);
    va_end(ap);
    if (rc != SQLITE_DONE || sqlite3_changes(s->db) != 1)
        goto fail;

    ev.subject_type = "delivery";
    ev.subject_id = delivery_id;
    ev.action = action;
    ev.payload = payload;
    ev.occurred_at_ms = s->clock_ms;
    if (de_record(s->ob, &ev, &rec) != DE_OK) {
        fprintf(stderr, "delivery_service: %s\n", de_errmsg());
        goto fail;
    }
    if (sql(s->db, "COMMIT") != 0)
        return -1;
    s->committed++;
    if (s->latency_ms != NULL)
        measure_ack(s);
    return 0;
fail:
    fprintf(stderr, "delivery_service: %s %s failed: %s\n", delivery_id, action,
            sqlite3_errmsg(s->db));
    sql(s->db, "ROLLBACK");
    return -1;
}

static int create_delivery(struct service *s, int n)
{
    char order[32], id[32], payload[256];
    const char *region = regions[next_rand(s) % N_REGIONS];
    int fee = 3000 + (int)(next_rand(s) % 5) * 500;

    snprintf(order, sizeof order, "O-%05d", n);
    snprintf(id, sizeof id, "D-%05d", n);
    snprintf(payload, sizeof payload,
             "{\"order_id\":\"%s\",\"region\":\"%s\",\"fee\":%d,"
             "\"customer_id\":\"C-%03u\"}",
             order, region, fee, next_rand(s) % 500);
    if (run(s->db, "INSERT INTO orders(id, region, fee) VALUES (?1, ?2, ?3)",
            "tti", order, region, (int64_t)fee) != SQLITE_DONE)
        return -1;
    return change(s, id, "created", payload,
                  "INSERT INTO deliveries(id, order_id, region, status, "
                  "created_at, updated_at) VALUES (?1, ?2, ?3, 'created', "
                  "?4, ?4)",
                  "ttti", id, order, region, s->clock_ms);
}

static int assign(struct service *s, const char *id)
{
    char rider[16], payload[128];

    snprintf(rider, sizeof rider, "R-%02u", next_rand(s) % N_RIDERS);
    snprintf(payload, sizeof payload, "{\"rider_id\":\"%s\"}", rider);
    return change(s, id, "assigned", payload,
                  "UPDATE deliveries SET status = 'assigned', rider_id = ?2, "
                  "assigned_at = ?3, updated_at = ?3 WHERE id = ?1 AND status "
                  "= 'created'",
                  "tti", id, rider, s->clock_ms);
}

static int pick_up(struct service *s, const char *id)
{
    return change(s, id, "picked_up", "{}",
                  "UPDATE deliveries SET status = 'picked_up', "
                  "picked_up_at = ?2, updated_at = ?2 WHERE id = ?1 AND status "
                  "= 'assigned'",
                  "ti", id, s->clock_ms);
}

static int deliver(struct service *s, const char *id)
{
    return change(s, id, "delivered", "{}",
                  "UPDATE deliveries SET status = 'delivered', "
                  "delivered_at = ?2, updated_at = ?2 WHERE id = ?1 AND status "
                  "= 'picked_up'",
                  "ti", id, s->clock_ms);
}

static int cancel(struct service *s, const char *id, const char *reason)
{
    char payload[128];

    snprintf(payload, sizeof payload, "{\"reason\":\"%s\"}", reason);
    return change(
        s, id, "canceled", payload,
        "UPDATE deliveries SET status = 'canceled', "
        "canceled_at = ?2, updated_at = ?2 WHERE id = ?1 AND status IN "
        "('created', 'assigned')",
        "ti", id, s->clock_ms);
}

/* The contracts of the events this service records, version 1 each.
 * Defining them at every start is harmless: a stored version is only
 * ever accepted again unchanged. */
#define ID_OF(prefix)                                                          \
    "{\"type\":\"string\",\"pattern\":\"^" prefix "-[0-9]+$\"}"
static const struct {
    const char *action, *schema;
} contracts[] = {
    {"created",
     "{\"$id\":\"https://schemas.example.com/delivery/created/v1.json\","
     "\"description\":\"A delivery was created for an order.\","
     "\"type\":\"object\",\"properties\":{"
     "\"order_id\":" ID_OF("O") ",\"customer_id\":" ID_OF(
         "C") ","
              "\"region\":{\"enum\":[\"gangnam\",\"jongno\",\"mapo\","
              "\"songpa\"]},"
              "\"fee\":{\"type\":\"integer\",\"minimum\":0}},"
              "\"required\":[\"order_id\",\"customer_id\",\"region\",\"fee\"]"
              "}"},
    {"assigned",
     "{\"$id\":\"https://schemas.example.com/delivery/assigned/v1.json\","
     "\"description\":\"A rider was assigned to the delivery.\","
     "\"type\":\"object\",\"properties\":{\"rider_id\":" ID_OF(
         "R") "},"
              "\"required\":[\"rider_id\"]}"},
    {"picked_up",
     "{\"$id\":\"https://schemas.example.com/delivery/picked_up/v1.json\","
     "\"description\":\"The rider picked the order up.\","
     "\"type\":\"object\"}"},
    {"delivered",
     "{\"$id\":\"https://schemas.example.com/delivery/delivered/v1.json\","
     "\"description\":\"The order reached the customer.\","
     "\"type\":\"object\"}"},
    {"canceled",
     "{\"$id\":\"https://schemas.example.com/delivery/canceled/v1.json\","
     "\"description\":\"The delivery was canceled.\","
     "\"type\":\"object\",\"properties\":{\"reason\":{\"enum\":["
     "\"customer_request\",\"store_closed\"]}},\"required\":[\"reason\"]}"},
};

static int define_contracts(de_outbox *ob)
{
    for (size_t i = 0; i < sizeof contracts / sizeof *contracts; i++)
        if (de_outbox_define(ob, "delivery", contracts[i].action, 1,
                             contracts[i].schema) != DE_OK) {
            fprintf(stderr, "delivery_service: %s\n", de_errmsg());
            return -1;
        }
    return 0;
}

/* What the contracts are for: a payload grown for one consumer's
 * convenience is refused, nothing is written, and the transaction goes
 * on (here it is rolled back, as the service would on any error). */
static void show_a_refusal(struct service *s)
{
    de_event ev = {0};
    de_err e;

    ev.subject_type = "delivery";
    ev.subject_id = "D-00000";
    ev.action = "assigned";
    ev.payload = "{\"rider_id\":\"R-07\",\"customer_phone\":"
                 "\"010-1234-5678\"}";
    if (sql(s->db, "BEGIN IMMEDIATE") != 0)
        return;
    e = de_record(s->ob, &ev, NULL);
    printf("contract check: delivery.assigned with a customer_phone for the "
           "notifier -> %s: %s\n",
           de_err_name(e), e == DE_OK ? "recorded?!" : de_errmsg());
    sql(s->db, "ROLLBACK");
}

static int schema(sqlite3 *db)
{
    return sql(db, "CREATE TABLE IF NOT EXISTS orders("
                   "  id TEXT PRIMARY KEY, region TEXT NOT NULL,"
                   "  fee INTEGER NOT NULL);"
                   "CREATE TABLE IF NOT EXISTS riders("
                   "  id TEXT PRIMARY KEY, name TEXT NOT NULL);"
                   "CREATE TABLE IF NOT EXISTS deliveries("
                   "  id TEXT PRIMARY KEY, order_id TEXT NOT NULL"
                   "    REFERENCES orders(id),"
                   "  region TEXT NOT NULL, status TEXT NOT NULL,"
                   "  rider_id TEXT REFERENCES riders(id),"
                   "  created_at INTEGER, assigned_at INTEGER,"
                   "  picked_up_at INTEGER, delivered_at INTEGER,"
                   "  canceled_at INTEGER, updated_at INTEGER NOT NULL);"
                   "INSERT OR IGNORE INTO riders "
                   "  WITH RECURSIVE r(n) AS (SELECT 0 UNION ALL"
                   "    SELECT n + 1 FROM r WHERE n < 11)"
                   "  SELECT printf('R-%02d', n), printf('rider %d', n)"
                   "  FROM r;");
}

static void usage(void)
{
    fprintf(stderr, "usage: delivery_service [--db PATH] [--deliveries N] "
                    "[--seed S] [--bootstrap SERVERS [--latency]]\n");
    exit(2);
}

int main(int argc, char **argv)
{
    const char *path = "delivery.db", *bootstrap = NULL;
    int n = 40, made = 0, open = 0, latency = 0;
    struct service s = {0};
    enum status *st;
    sqlite3_stmt *q;

    s.rng = 42;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--db") == 0 && i + 1 < argc)
            path = argv[++i];
        else if (strcmp(argv[i], "--deliveries") == 0 && i + 1 < argc)
            n = atoi(argv[++i]);
        else if (strcmp(argv[i], "--seed") == 0 && i + 1 < argc)
            s.rng = (unsigned)strtoul(argv[++i], NULL, 10);
        else if (strcmp(argv[i], "--bootstrap") == 0 && i + 1 < argc)
            bootstrap = argv[++i];
        else if (strcmp(argv[i], "--latency") == 0)
            latency = 1;
        else
            usage();
    }
    if (n <= 0)
        usage();
    if (sqlite3_open(path, &s.db) != SQLITE_OK) {
        fprintf(stderr, "delivery_service: cannot open %s: %s\n", path,
                sqlite3_errmsg(s.db));
        return 1;
    }
    if (schema(s.db) != 0)
        return 1;
    {
        /* Only event types with a contract may be recorded. */
        de_conf *conf = de_conf_new();
        de_err e = de_conf_set(conf, "outbox.strict", "true");
        if (e == DE_OK)
            e = de_outbox_open(s.db, conf, &s.ob);
        de_conf_destroy(conf);
        if (e != DE_OK) {
            fprintf(stderr, "delivery_service: %s\n", de_errmsg());
            return 1;
        }
    }
    if (define_contracts(s.ob) != 0)
        return 1;
    st = calloc((size_t)n, sizeof *st);
    if (st == NULL)
        return 1;
    if (bootstrap != NULL) {
        /* The relay: its own thread, connection and Kafka producer. */
        de_conf *conf = de_conf_new();
        if (de_conf_set(conf, "bootstrap.servers", bootstrap) != DE_OK ||
            de_conf_set(conf, "event.source", "/delivery-service") != DE_OK ||
            de_relay_start(s.ob, conf, &s.relay) != DE_OK) {
            fprintf(stderr, "delivery_service: %s\n", de_errmsg());
            return 1;
        }
        de_conf_destroy(conf);
        if (latency) {
            s.cap_latency = (size_t)n * 5;
            s.latency_ms = calloc(s.cap_latency, sizeof(double));
        }
    }

    /* Drive deliveries through their lives, interleaved as on a busy
     * lunchtime: each step picks a delivery and moves it on. */
    s.clock_ms = INT64_C(1795604400000); /* 2026-11-25T11:00:00Z */
    while (made < n || open > 0) {
        int k = (int)(next_rand(&s) % (unsigned)(made < n ? made + 1 : made));
        char id[32];
        int rc = 0;

        s.clock_ms += 1000 + next_rand(&s) % 9000;
        if (k == made && made < n) {
            rc = create_delivery(&s, made);
            st[made++] = CREATED;
            open++;
            if (rc != 0)
                return 1;
            continue;
        }
        snprintf(id, sizeof id, "D-%05d", k);
        switch (st[k]) {
        case CREATED:
            if (next_rand(&s) % 10 == 0) {
                rc = cancel(&s, id, "customer_request");
                st[k] = CANCELED;
                open--;
            } else {
                rc = assign(&s, id);
                st[k] = ASSIGNED;
            }
            break;
        case ASSIGNED:
            if (next_rand(&s) % 20 == 0) {
                rc = cancel(&s, id, "store_closed");
                st[k] = CANCELED;
                open--;
            } else {
                rc = pick_up(&s, id);
                st[k] = PICKED_UP;
            }
            break;
        case PICKED_UP:
            rc = deliver(&s, id);
            st[k] = DELIVERED;
            open--;
            break;
        default: break;
        }
        if (rc != 0)
            return 1;
    }

    show_a_refusal(&s);
    printf("delivery_service: %d deliveries in %s; events recorded in the "
           "outbox, by action:\n",
           n, path);
    sqlite3_prepare_v2(s.db,
                       "SELECT action, count(*) FROM de_outbox "
                       "GROUP BY action ORDER BY min(position)",
                       -1, &q, NULL);
    while (sqlite3_step(q) == SQLITE_ROW)
        printf("  %-10s %5d\n", sqlite3_column_text(q, 0),
               sqlite3_column_int(q, 1));
    sqlite3_finalize(q);
    printf("the first events, in commit order:\n");
    sqlite3_prepare_v2(s.db,
                       "SELECT position, subject_id, action, "
                       "strftime('%H:%M:%S', occurred_at_ms / 1000, "
                       "'unixepoch'), payload FROM de_outbox "
                       "ORDER BY position LIMIT 8",
                       -1, &q, NULL);
    while (sqlite3_step(q) == SQLITE_ROW)
        printf("  #%-4" PRId64 " %s %-9s %s %s\n",
               (int64_t)sqlite3_column_int64(q, 0), sqlite3_column_text(q, 1),
               sqlite3_column_text(q, 2), sqlite3_column_text(q, 3),
               sqlite3_column_text(q, 4));
    sqlite3_finalize(q);

    if (s.relay != NULL) {
        de_relay_stats rs;
        de_err e = de_relay_flush(s.relay, 30000);
        de_relay_stats_get(s.relay, &rs);
        printf("relay: %llu events published to Kafka, %llu pending, %llu "
               "producer restarts%s%s\n",
               (unsigned long long)rs.published, (unsigned long long)rs.pending,
               (unsigned long long)rs.producer_restarts,
               e == DE_OK ? "" : "; flush: ", e == DE_OK ? "" : de_errmsg());
        if (s.n_latency > 0) {
            qsort(s.latency_ms, s.n_latency, sizeof(double), cmp_double);
            printf("relay: commit -> Kafka ack over %zu events: p50 %.2f ms, "
                   "p99 %.2f ms, max %.2f ms\n",
                   s.n_latency, s.latency_ms[s.n_latency / 2],
                   s.latency_ms[(s.n_latency * 99) / 100],
                   s.latency_ms[s.n_latency - 1]);
        }
        de_relay_stop(s.relay, 10000);
        free(s.latency_ms);
    }
    free(st);
    de_outbox_close(s.ob);
    sqlite3_close(s.db);
    return 0;
}

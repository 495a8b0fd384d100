/* SPDX-License-Identifier: MIT */
/*
 * delivery.h -- what the two delivery services share: delivery_service.c
 * (SQLite) and delivery_service_pg.c (PostgreSQL) differ only in where
 * their tables live, so the simulated lunchtime that drives deliveries
 * through their lives, the payloads of their events, the events'
 * contracts, the refusal they show and the relay's account are here,
 * once.  Each service supplies one function: apply a state change to its
 * tables and record its event, in one transaction.
 *
 * The same seed gives the same deliveries, events and times on both
 * databases.  Time is simulated (from 2026-11-25T11:00:00Z, a few
 * seconds per step) so that runs are repeatable and the events carry
 * realistic occurred-at times.
 */
#ifndef DE_DELIVERY_H
#define DE_DELIVERY_H

#include <deliveryevents.h>

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static const char *const delivery_regions[] = {"gangnam", "jongno", "mapo",
                                               "songpa"};
#define DELIVERY_N_REGIONS 4
#define DELIVERY_N_RIDERS 12

/* The command line both services share:
 *   NAME --db DB [--deliveries N] [--seed S] [--bootstrap SERVERS
 *   [--latency]]
 * db_word names what --db takes (a path, a connection string); db keeps
 * its default when --db is absent and the default is not NULL. */
struct delivery_options {
    const char *db, *bootstrap;
    int deliveries, latency;
    unsigned seed;
};

static inline void delivery_options(struct delivery_options *o,
                                    const char *name, const char *db_word,
                                    int argc, char **argv)
{
    o->deliveries = o->deliveries ? o->deliveries : 40;
    o->seed = o->seed ? o->seed : 42;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--db") == 0 && i + 1 < argc)
            o->db = argv[++i];
        else if (strcmp(argv[i], "--deliveries") == 0 && i + 1 < argc)
            o->deliveries = atoi(argv[++i]);
        else if (strcmp(argv[i], "--seed") == 0 && i + 1 < argc)
            o->seed = (unsigned)strtoul(argv[++i], NULL, 10);
        else if (strcmp(argv[i], "--bootstrap") == 0 && i + 1 < argc)
            o->bootstrap = argv[++i];
        else if (strcmp(argv[i], "--latency") == 0)
            o->latency = 1;
        else
            o->deliveries = 0;
    }
    if (o->db == NULL || o->deliveries <= 0) {
        fprintf(stderr,
                "usage: %s --db %s [--deliveries N] [--seed S] "
                "[--bootstrap SERVERS [--latency]]\n",
                name, db_word);
        exit(2);
    }
}

/* One state change: the row to write and the event to record with it.
 * The fields a step does not use are NULL / 0. */
struct delivery_change {
    const char *id;      /* "D-00042" */
    const char *action;  /* created, assigned, picked_up, delivered, ... */
    const char *payload; /* the event's data (JSON) */
    int64_t at_ms;       /* the simulated time of the change */
    const char *order_id, *region; /* created */
    int fee;                       /* created */
    const char *rider_id;          /* assigned */
};

/* Applies one change and records its event in one transaction; 0 on
 * success. */
typedef int (*delivery_apply_fn)(void *ctx, const struct delivery_change *c);

static inline unsigned delivery_rand(unsigned *rng)
{
    *rng = *rng * 1103515245u + 12345u;
    return (*rng >> 16) & 0x7fff;
}

/*
 * Drives n deliveries through their lives, interleaved as on a busy
 * lunchtime: each step picks a delivery and moves it on (created ->
 * assigned -> picked_up -> delivered, now and then canceled).  Returns 0,
 * or the first failure of apply.
 */
static inline int delivery_simulate(int n, unsigned seed,
                                    delivery_apply_fn apply, void *ctx)
{
    enum { CREATED, ASSIGNED, PICKED_UP, DELIVERED, CANCELED } * st;
    int64_t clock_ms = INT64_C(1795604400000); /* 2026-11-25T11:00:00Z */
    unsigned rng = seed;
    int made = 0, open = 0, rc = 0;

    st = calloc((size_t)n, sizeof *st);
    if (st == NULL)
        return -1;
    while (rc == 0 && (made < n || open > 0)) {
        int k =
            (int)(delivery_rand(&rng) % (unsigned)(made < n ? made + 1 : made));
        char id[32], order[32], rider[16], payload[256];
        struct delivery_change c = {0};

        clock_ms += 1000 + delivery_rand(&rng) % 9000;
        snprintf(id, sizeof id, "D-%05d", k);
        c.id = id;
        c.at_ms = clock_ms;
        c.payload = "{}";
        if (k == made && made < n) {
            c.region =
                delivery_regions[delivery_rand(&rng) % DELIVERY_N_REGIONS];
            c.fee = 3000 + (int)(delivery_rand(&rng) % 5) * 500;
            snprintf(order, sizeof order, "O-%05d", k);
            snprintf(payload, sizeof payload,
                     "{\"order_id\":\"%s\",\"region\":\"%s\",\"fee\":%d,"
                     "\"customer_id\":\"C-%03u\"}",
                     order, c.region, c.fee, delivery_rand(&rng) % 500);
            c.order_id = order;
            c.action = "created";
            c.payload = payload;
            st[made++] = CREATED;
            open++;
        } else if (st[k] == CREATED || st[k] == ASSIGNED) {
            if (delivery_rand(&rng) % (st[k] == CREATED ? 10 : 20) == 0) {
                c.action = "canceled";
                c.payload = st[k] == CREATED ? "{\"reason\":\"customer_"
                                               "request\"}"
                                             : "{\"reason\":\"store_closed\"}";
                st[k] = CANCELED;
                open--;
            } else if (st[k] == CREATED) {
                snprintf(rider, sizeof rider, "R-%02u",
                         delivery_rand(&rng) % DELIVERY_N_RIDERS);
                snprintf(payload, sizeof payload, "{\"rider_id\":\"%s\"}",
                         rider);
                c.action = "assigned";
                c.payload = payload;
                c.rider_id = rider;
                st[k] = ASSIGNED;
            } else {
                c.action = "picked_up";
                st[k] = PICKED_UP;
            }
        } else if (st[k] == PICKED_UP) {
            c.action = "delivered";
            st[k] = DELIVERED;
            open--;
        } else {
            continue; /* already ended */
        }
        rc = apply(ctx, &c);
    }
    free(st);
    return rc;
}

/* The service's own tables, in SQL both databases take (times in Unix
 * milliseconds).  Each service then adds the riders its own way. */
#define DELIVERY_TABLES                                                        \
    "CREATE TABLE IF NOT EXISTS orders("                                       \
    "  id text PRIMARY KEY, region text NOT NULL,"                             \
    "  fee integer NOT NULL);"                                                 \
    "CREATE TABLE IF NOT EXISTS riders("                                       \
    "  id text PRIMARY KEY, name text NOT NULL);"                              \
    "CREATE TABLE IF NOT EXISTS deliveries("                                   \
    "  id text PRIMARY KEY, order_id text NOT NULL"                            \
    "    REFERENCES orders(id),"                                               \
    "  region text NOT NULL, status text NOT NULL,"                            \
    "  rider_id text REFERENCES riders(id),"                                   \
    "  created_at bigint, assigned_at bigint,"                                 \
    "  picked_up_at bigint, delivered_at bigint,"                              \
    "  canceled_at bigint, updated_at bigint NOT NULL);"

/* The domain update of each action, in SQL both databases take: $1 the
 * delivery, $2 the time (Unix ms), $3 the rider (assigned) or the order
 * (created), $4 the region (created).  (SQLite reads $1... as named
 * parameters: delivery_service.c binds them by name.)  The WHERE clause
 * refuses a change the delivery's state does not allow; created inserts
 * the order first (DELIVERY_INSERT_ORDER: $1 id, $2 region, $3 fee). */
#define DELIVERY_INSERT_ORDER                                                  \
    "INSERT INTO orders(id, region, fee) VALUES ($1, $2, $3)"
static const struct {
    const char *action, *sql;
} delivery_updates[] = {
    {"created", "INSERT INTO deliveries(id, order_id, region, status, "
                "created_at, updated_at) VALUES ($1, $3, $4, 'created', $2, "
                "$2)"},
    {"assigned", "UPDATE deliveries SET status = 'assigned', rider_id = $3, "
                 "assigned_at = $2, updated_at = $2 WHERE id = $1 AND status "
                 "= 'created'"},
    {"picked_up", "UPDATE deliveries SET status = 'picked_up', picked_up_at "
                  "= $2, updated_at = $2 WHERE id = $1 AND status = "
                  "'assigned'"},
    {"delivered", "UPDATE deliveries SET status = 'delivered', delivered_at "
                  "= $2, updated_at = $2 WHERE id = $1 AND status = "
                  "'picked_up'"},
    {"canceled", "UPDATE deliveries SET status = 'canceled', canceled_at = "
                 "$2, updated_at = $2 WHERE id = $1 AND status IN "
                 "('created', 'assigned')"},
};

static inline const char *delivery_update_sql(const char *action)
{
    size_t i = 0;

    while (strcmp(delivery_updates[i].action, action) != 0)
        i++;
    return delivery_updates[i].sql;
}

/* The contracts of the events the service records, version 1 each.
 * Defining them at every start is harmless: a stored version is only
 * ever accepted again unchanged. */
#define DELIVERY_ID_OF(prefix)                                                 \
    "{\"type\":\"string\",\"pattern\":\"^" prefix "-[0-9]+$\"}"
static const struct {
    const char *action, *schema;
} delivery_contracts[] = {
    {"created",
     "{\"$id\":\"https://schemas.example.com/delivery/created/v1.json\","
     "\"description\":\"A delivery was created for an order.\","
     "\"type\":\"object\",\"properties\":{"
     "\"order_id\":" DELIVERY_ID_OF("O") ",\"customer_id\":" DELIVERY_ID_OF(
         "C") ","
              "\"region\":{\"enum\":[\"gangnam\",\"jongno\",\"mapo\","
              "\"songpa\"]},"
              "\"fee\":{\"type\":\"integer\",\"minimum\":0}},"
              "\"required\":[\"order_id\",\"customer_id\",\"region\",\"fee\"]"
              "}"},
    {"assigned",
     "{\"$id\":\"https://schemas.example.com/delivery/assigned/v1.json\","
     "\"description\":\"A rider was assigned to the delivery.\","
     "\"type\":\"object\",\"properties\":{\"rider_id\":" DELIVERY_ID_OF(
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

/* Opens nothing: defines every contract on an open outbox (outside a
 * transaction); 0 on success. */
static inline int delivery_define_contracts(de_outbox *ob, const char *who)
{
    for (size_t i = 0;
         i < sizeof delivery_contracts / sizeof *delivery_contracts; i++)
        if (de_outbox_define(ob, "delivery", delivery_contracts[i].action, 1,
                             delivery_contracts[i].schema) != DE_OK) {
            fprintf(stderr, "%s: %s\n", who, de_errmsg());
            return -1;
        }
    return 0;
}

/* What the contracts are for: a payload grown for one consumer's
 * convenience.  The caller records it inside a transaction it then
 * rolls back, and prints the outcome with delivery_refusal_report. */
static inline void delivery_refusal_event(de_event *ev)
{
    memset(ev, 0, sizeof *ev);
    ev->subject_type = "delivery";
    ev->subject_id = "D-00000";
    ev->action = "assigned";
    ev->payload = "{\"rider_id\":\"R-07\",\"customer_phone\":"
                  "\"010-1234-5678\"}";
}

static inline void delivery_refusal_report(de_err e)
{
    printf("contract check: delivery.assigned with a customer_phone for the "
           "notifier -> %s: %s\n",
           de_err_name(e), e == DE_OK ? "recorded?!" : de_errmsg());
}

/* --latency: the time from COMMIT returning to Kafka acknowledging the
 * event, per event.  (A demonstration of latency; a real service would
 * not wait.) */
struct delivery_latency {
    de_relay *relay; /* NULL without --bootstrap */
    uint64_t committed;
    double *ms;
    size_t n, cap;
};

static inline double delivery_now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

/* Called after each commit: counts it, and with --latency waits for the
 * relay to report it acknowledged by Kafka. */
static inline void delivery_committed(struct delivery_latency *l)
{
    double t0 = delivery_now_ms();
    de_relay_stats st;

    l->committed++;
    if (l->ms == NULL)
        return;
    do {
        struct timespec pause = {0, 20000};
        nanosleep(&pause, NULL);
        de_relay_stats_get(l->relay, &st);
    } while (st.published < l->committed && delivery_now_ms() - t0 < 10000);
    if (l->n < l->cap)
        l->ms[l->n++] = delivery_now_ms() - t0;
}

static inline int delivery_cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* Flushes the relay, prints its account (and the latencies), stops it. */
static inline void delivery_relay_finish(struct delivery_latency *l)
{
    de_relay_stats rs;
    de_err e;

    if (l->relay == NULL)
        return;
    e = de_relay_flush(l->relay, 30000);
    de_relay_stats_get(l->relay, &rs);
    printf("relay: %llu events published to Kafka, %llu pending, %llu "
           "producer restarts%s%s\n",
           (unsigned long long)rs.published, (unsigned long long)rs.pending,
           (unsigned long long)rs.producer_restarts,
           e == DE_OK ? "" : "; flush: ", e == DE_OK ? "" : de_errmsg());
    if (l->n > 0) {
        qsort(l->ms, l->n, sizeof(double), delivery_cmp_double);
        printf("relay: commit -> Kafka ack over %zu events: p50 %.2f ms, "
               "p99 %.2f ms, max %.2f ms\n",
               l->n, l->ms[l->n / 2], l->ms[(l->n * 99) / 100],
               l->ms[l->n - 1]);
    }
    de_relay_stop(l->relay, 10000);
    l->relay = NULL;
    free(l->ms);
    l->ms = NULL;
}

/* Starts the relay beside the service (its own thread, connections and
 * Kafka producer); 0 on success. */
static inline int delivery_relay_start(struct delivery_latency *l,
                                       de_outbox *ob,
                                       const struct delivery_options *o,
                                       const char *who)
{
    de_conf *conf;

    if (o->bootstrap == NULL)
        return 0;
    conf = de_conf_new();
    if (de_conf_set(conf, "bootstrap.servers", o->bootstrap) != DE_OK ||
        de_conf_set(conf, "event.source", "/delivery-service") != DE_OK ||
        de_relay_start(ob, conf, &l->relay) != DE_OK) {
        fprintf(stderr, "%s: %s\n", who, de_errmsg());
        de_conf_destroy(conf);
        return -1;
    }
    de_conf_destroy(conf);
    if (o->latency) {
        l->cap = (size_t)o->deliveries * 5;
        l->ms = calloc(l->cap, sizeof(double));
    }
    return 0;
}

#endif

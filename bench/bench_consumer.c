/* SPDX-License-Identifier: MIT */
/*
 * bench_consumer.c -- how fast de_consumer applies events, against a bare
 * librdkafka consumer reading the same topic in the same run.
 *
 * A relay publishes BENCH_EVENTS (120,000) events over 10,000 subjects to
 * a 12-partition topic on the mock cluster (in its own process; kept under
 * the mock's 5 MiB per partition so that nothing is evicted).  Then, in
 * alternating rounds, each with a fresh consumer group:
 *
 *  - bare: a librdkafka consumer reads every record (no decoding);
 *  - de_consumer: decodes, checks and advances the inbox, and runs a
 *    handler doing a simple projection (an upsert of the subject's latest
 *    action into a table), several events per SQLite transaction (WAL,
 *    synchronous=NORMAL).
 *
 * Both are timed from the first event to the last, so the consumer-group
 * join (about 3 s on the mock) is left out of both.  Target: de_consumer
 * at least 0.5x the bare consumer.
 *
 * Each scenario ends with the SQLite floor: the same two rows per event
 * (inbox and projection), 500 per transaction, no Kafka, no decoding --
 * written in the order the last de_consumer round applied them (as Kafka
 * delivers them, partition by partition; target: de_consumer >= 0.6x of
 * it), and, for comparison, in subject order (neighbouring subjects per
 * transaction: far fewer pages per commit, a floor no consumer of a
 * partitioned topic sees).
 *
 * Then the same over 200,000 subjects (BENCH_CARD_EVENTS, 400,000 events;
 * BENCH_CARD_ROUNDS, 1), reported against the SQLite floor at that
 * cardinality.
 *
 * Environment: BENCH_HMAC_KEY (event.hmac.key: sign and verify),
 * BENCH_EVENTS, BENCH_ROUNDS (3), BENCH_CARD_EVENTS,
 * BENCH_CARD_ROUNDS, DE_TOOL.
 */
#include "bench_kafka.h"

/* The order in which the last de_consumer round applied its events
 * (subject number and ce_subjectseq), for the floor to write the same
 * rows in the same order. */
static struct applied {
    long *subject, *seq;
    long n, cap;
} order;

static void note_order(const de_event_view *ev)
{
    if (order.n == order.cap) {
        order.cap = order.cap ? 2 * order.cap : 1 << 16;
        order.subject = realloc(order.subject, order.cap * sizeof(long));
        order.seq = realloc(order.seq, order.cap * sizeof(long));
        BENCH_CHECK(order.subject && order.seq, "out of memory");
    }
    order.subject[order.n] = strtol(ev->subject_id + 2, NULL, 10);
    order.seq[order.n++] = (long)ev->subject_seq;
}

static de_err project(sqlite3 *db, const de_event_view *ev, void *ctx)
{
    sqlite3_stmt **st = ctx;

    note_order(ev);

    if (*st == NULL &&
        sqlite3_prepare_v3(db,
                           "INSERT INTO latest(subject_id, action, seq) "
                           "VALUES (?1, ?2, ?3) ON CONFLICT(subject_id) DO "
                           "UPDATE SET action = excluded.action, seq = "
                           "excluded.seq",
                           -1, SQLITE_PREPARE_PERSISTENT, st,
                           NULL) != SQLITE_OK)
        return DE_ERR_DB;
    sqlite3_bind_text(*st, 1, ev->subject_id, -1, SQLITE_STATIC);
    sqlite3_bind_text(*st, 2, ev->action, -1, SQLITE_STATIC);
    sqlite3_bind_int64(*st, 3, ev->subject_seq);
    if (sqlite3_step(*st) != SQLITE_DONE) {
        sqlite3_reset(*st);
        return DE_ERR_DB;
    }
    sqlite3_reset(*st);
    return DE_OK;
}

/* The floor: what SQLite alone needs for the same effects -- per event an
 * inbox update and a projection upsert, prepared, 500 events per
 * transaction, the same file settings -- with no Kafka and no decoding.
 * With `ord` the rows are written in the order de_consumer applied them
 * (as Kafka delivers them: partition by partition, subjects mixed);
 * without, in subject order, 500 neighbouring subjects per transaction,
 * which touches far fewer pages per commit (the favourable case). */
static double sqlite_floor(const char *dir, long n, long subjects,
                           const struct applied *ord)
{
    char path[4200], id[24];
    sqlite3 *db;
    sqlite3_stmt *inbox, *proj, *begin, *commit;
    double t0;

    snprintf(path, sizeof path, "%s/floor-%ld-%d.db", dir, subjects,
             ord != NULL);
    BENCH_CHECK(sqlite3_open(path, &db) == SQLITE_OK, "open");
    BENCH_CHECK(sqlite3_exec(db,
                             "PRAGMA journal_mode=WAL; PRAGMA "
                             "synchronous=NORMAL; CREATE TABLE inbox("
                             "subject_type TEXT, subject_id TEXT, epoch "
                             "INTEGER, last_seq INTEGER, parked INTEGER, "
                             "updated_ms INTEGER, "
                             "PRIMARY KEY(subject_type, subject_id)) "
                             "WITHOUT ROWID; CREATE TABLE latest(subject_id "
                             "TEXT PRIMARY KEY, action TEXT, seq INTEGER)",
                             NULL, NULL, NULL) == SQLITE_OK,
                "schema");
    sqlite3_prepare_v2(
        db,
        "INSERT INTO inbox VALUES ('delivery', ?1, 0, ?2, 0, ?3) "
        "ON CONFLICT DO UPDATE SET last_seq = excluded."
        "last_seq, updated_ms = excluded.updated_ms",
        -1, &inbox, NULL);
    sqlite3_prepare_v2(db,
                       "INSERT INTO latest VALUES (?1, 'assigned', ?2) ON "
                       "CONFLICT(subject_id) DO UPDATE SET action = "
                       "excluded.action, seq = excluded.seq",
                       -1, &proj, NULL);
    sqlite3_prepare_v2(db, "BEGIN IMMEDIATE", -1, &begin, NULL);
    sqlite3_prepare_v2(db, "COMMIT", -1, &commit, NULL);
    t0 = bench_now();
    for (long i = 0; i < n; i++) {
        if (i % 500 == 0) {
            if (i) {
                sqlite3_step(commit);
                sqlite3_reset(commit);
            }
            sqlite3_step(begin);
            sqlite3_reset(begin);
        }
        long subject = ord ? ord->subject[i] : i % subjects;
        long seq = ord ? ord->seq[i] : i / subjects + 1;
        snprintf(id, sizeof id, SUBJECT_FMT, subject);
        sqlite3_bind_text(inbox, 1, id, -1, SQLITE_STATIC);
        sqlite3_bind_int64(inbox, 2, seq);
        sqlite3_bind_int64(inbox, 3, i);
        sqlite3_step(inbox);
        sqlite3_reset(inbox);
        sqlite3_bind_text(proj, 1, id, -1, SQLITE_STATIC);
        sqlite3_bind_int64(proj, 2, seq);
        sqlite3_step(proj);
        sqlite3_reset(proj);
    }
    sqlite3_step(commit);
    sqlite3_reset(commit);
    t0 = bench_now() - t0;
    sqlite3_finalize(inbox);
    sqlite3_finalize(proj);
    sqlite3_finalize(begin);
    sqlite3_finalize(commit);
    sqlite3_close(db);
    return (double)n / t0;
}

static double de_round(const char *dir, long n, long subjects, int round)
{
    char path[4200], group[64];
    sqlite3 *db;
    sqlite3_stmt *st = NULL;
    de_conf *conf = de_conf_new();
    de_consumer *c = NULL;
    de_consumer_stats s;
    double t0 = 0, t1 = 0;
    uint64_t first = 0;

    order.n = 0;
    snprintf(path, sizeof path, "%s/consumer-%ld-%d.db", dir, subjects, round);
    snprintf(group, sizeof group, "bench-de-%ld-%d", subjects, round);
    BENCH_CHECK(sqlite3_open(path, &db) == SQLITE_OK, "open");
    BENCH_CHECK(sqlite3_exec(db,
                             "PRAGMA journal_mode=WAL; PRAGMA "
                             "synchronous=NORMAL; CREATE TABLE latest("
                             "subject_id TEXT PRIMARY KEY, action TEXT, "
                             "seq INTEGER)",
                             NULL, NULL, NULL) == SQLITE_OK,
                "schema");
    BENCH_SET(conf, "bootstrap.servers", bootstrap);
    BENCH_SET(conf, "group.id", group);
    BENCH_SET(conf, "topic.template", "bench.{subject_type}.events");
    BENCH_SET_HMAC(conf);
    de_conf_set_log_cb(conf, quiet, NULL);
    BENCH_CHECK(de_consumer_open(db, conf, &c) == DE_OK, "%s", de_errmsg());
    de_conf_destroy(conf);
    BENCH_CHECK(de_consumer_on(c, "delivery", NULL, project, &st) == DE_OK,
                "%s", de_errmsg());
    for (;;) {
        int handled;
        BENCH_CHECK(de_consumer_poll(c, 1000, &handled) == DE_OK, "%s",
                    de_errmsg());
        de_consumer_stats_get(c, &s);
        if (handled > 0 && first == 0) {
            /* The clock starts after the first batch, which waited for
             * the group join; its events are not counted. */
            first = s.applied;
            t0 = bench_now();
        }
        if (s.applied >= (uint64_t)n) {
            t1 = bench_now();
            break;
        }
    }
    sqlite3_finalize(st);
    de_consumer_close(c);
    sqlite3_close(db);
    return (double)((uint64_t)n - first) / (t1 - t0);
}

/* One scenario: a fresh mock cluster holding n events over `subjects`
 * subjects on a topic of `partitions` partitions, then alternating rounds
 * of the bare consumer and de_consumer, then the SQLite floor. */
static void scenario(const char *dir, long n, long subjects, int partitions,
                     long rounds, double target)
{
    char db[4200], spec[64];
    const char *topics[] = {spec, NULL};
    double *bare = calloc((size_t)rounds, sizeof(double));
    double *de = calloc((size_t)rounds, sizeof(double));
    double *ratio = calloc((size_t)rounds, sizeof(double));

    BENCH_CHECK(bare && de && ratio, "out of memory");
    snprintf(spec, sizeof spec, "bench.delivery.events:%d", partitions);
    snprintf(db, sizeof db, "%s/service-%ld.db", dir, subjects);
    publish_backlog(topics, db, n, subjects);

    printf("consume: %ld events over %ld subjects, %d partitions, mock "
           "cluster in its own process; clocks start at the first event\n",
           n, subjects, partitions);
    for (long i = 0; i < rounds; i++) {
        if (i % 2 == 0) {
            bare[i] = bench_bare_round("bench.delivery.events", n, (int)i);
            de[i] = de_round(dir, n, subjects, (int)i);
        } else {
            de[i] = de_round(dir, n, subjects, (int)i);
            bare[i] = bench_bare_round("bench.delivery.events", n, (int)i);
        }
        ratio[i] = de[i] / bare[i];
        printf("  round %ld: bare %8.0f msg/s, de_consumer %8.0f events/s, "
               "ratio %.3f\n",
               i + 1, bare[i], de[i], ratio[i]);
    }
    double mb = bench_median(bare, (size_t)rounds);
    double md = bench_median(de, (size_t)rounds);
    double mq = bench_median(ratio, (size_t)rounds);
    printf("  baseline bare librdkafka consumer    : %8.0f msg/s\n", mb);
    printf("  de_consumer (inbox + projection)     : %8.0f events/s\n", md);
    if (target > 0)
        printf("  ratio de_consumer / bare             : %8.3f  (median of "
               "rounds; target >= %.2f) %s\n",
               mq, target, mq >= target ? "OK" : "UNDER TARGET");
    else
        printf("  ratio de_consumer / bare             : %8.3f  (median of "
               "rounds; reported)\n",
               mq);
    {
        double seq = sqlite_floor(dir, n, subjects, NULL);
        double floor;
        BENCH_CHECK(order.n == n, "the last round applied %ld events, not %ld",
                    order.n, n);
        floor = sqlite_floor(dir, n, subjects, &order);
        printf("  floor: SQLite alone writing the same effects (inbox "
               "upsert + projection upsert per event, 500 per "
               "transaction)\n"
               "    in the order de_consumer applied them : %8.0f events/s; "
               "de_consumer reaches %.2f of it (target >= 0.60) %s\n"
               "    in subject order (favourable)          : %8.0f events/s; "
               "de_consumer reaches %.2f of it\n",
               floor, md / floor, md / floor >= 0.6 ? "OK" : "UNDER TARGET",
               seq, md / seq);
    }
    stop_mock();
    free(bare);
    free(de);
    free(ratio);
}

int main(void)
{
    long n = bench_env_long("BENCH_EVENTS", 120000);
    long rounds = bench_env_long("BENCH_ROUNDS", 3);
    long card = bench_env_long("BENCH_CARD_EVENTS", 400000);
    char *dir = bench_mkdtemp();

    tool = getenv("DE_TOOL");
    BENCH_CHECK(tool != NULL, "DE_TOOL must name the deliveryevents binary");
    scenario(dir, n, SUBJECTS, 12, rounds, 0.5);
    /* Realistic cardinality: 200,000 subjects with two events each, on
     * enough partitions to stay under the mock's 5 MiB per partition. */
    if (card > 0)
        scenario(dir, card, 200000, 64, bench_env_long("BENCH_CARD_ROUNDS", 1),
                 0);
    bench_rmdir(dir);
    return 0;
}

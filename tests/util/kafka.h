/* SPDX-License-Identifier: MIT */
/*
 * kafka.h -- Kafka for the test suites: a cluster (librdkafka's mock
 * cluster in this process, or the real one named by
 * KAFKA_BOOTSTRAP_SERVERS), a writer that records events together with a
 * ledger row in the same transaction, and the checking consumer that reads
 * the topics back and compares them with the ledger.
 */
#ifndef DE_TEST_KAFKA_H
#define DE_TEST_KAFKA_H

#include <librdkafka/rdkafka.h>
#include <librdkafka/rdkafka_mock.h>

#include "testutil.h"

typedef struct tu_cluster {
    int real; /* 1: KAFKA_BOOTSTRAP_SERVERS */
    char bootstrap[512];
    rd_kafka_t *host;              /* owns the mock cluster */
    rd_kafka_mock_cluster_t *mock; /* NULL on a real cluster */
    char prefix[64];               /* unique per cluster: topics start so */
} tu_cluster;

/* How many clusters the integration tests run on: 1 (the mock), or 2
 * when KAFKA_BOOTSTRAP_SERVERS names a real cluster. */
int tu_cluster_count(void);
/* Where those loops start: 0, or 1 (the real cluster only) when
 * KAFKA_TEST_REAL_ONLY is set, as `make check-remote` does. */
int tu_cluster_first(void);

/* which: 0 = a new mock cluster with `brokers` brokers; 1 = the real
 * cluster.  Each gets a unique topic prefix. */
tu_cluster *tu_cluster_new(int which, int brokers);
void tu_cluster_destroy(tu_cluster *c);

/* Skips the rest of a test that needs fault injection on a real cluster. */
#define TU_MOCK_ONLY(c)                                                        \
    do {                                                                       \
        if ((c)->real) {                                                       \
            tu_cluster_destroy(c);                                             \
            return;                                                            \
        }                                                                      \
    } while (0)

/* The topic for a subject type: "<prefix><type>.events". */
const char *tu_topic(tu_cluster *c, const char *subject_type);
void tu_topic_create(tu_cluster *c, const char *subject_type, int partitions);

/* A relay configuration for this cluster with short timers; extra
 * key/value pairs (NULL-terminated) override. */
de_conf *tu_relay_conf(tu_cluster *c, ...);

/* The events Kafka acknowledged so far to r (its stats; fails the test
 * when they cannot be read). */
uint64_t tu_relay_published(de_relay *r);

/* de_relay_stop's message when everything was published but the final
 * checkpoint failed: what precedes the failure's own message, and what
 * follows it when the lease could not be released either. */
#define TU_STOP_CKPT_FAILED                                                    \
    "de_relay_stop: everything committed before the stop was published, "      \
    "but the final checkpoint failed: "
#define TU_STOP_CKPT_FAILED_THEN                                               \
    "; the relay's state does not record the last of them as published, "      \
    "so they stay in the outbox and the next relay to take over finds them "   \
    "on Kafka rather than sending them again; the lease was not released "     \
    "either: a standby takes over when it expires (relay.lease.timeout.ms)"

/* After such a stop: a relay on ob with a short lease timeout (it takes
 * the lease left to expire) publishes what is committed, finding at least
 * `found` events already on Kafka (de_relay_stats.skipped), and stops. */
void tu_relay_takes_over(tu_cluster *c, de_outbox *ob, uint64_t found);

/* Log callback for handles in tests: quiet unless DE_TEST_LOG is set. */
void tu_log(void *ctx, int level, const char *message);

/* The service side of an integration test: a scratch directory with
 * service.db (ledger table, outbox open).  tu_service_setup and
 * tu_service_teardown are Check fixtures. */
extern sqlite3 *tu_db;
extern de_outbox *tu_ob;
void tu_service_setup(void);
void tu_service_teardown(void);

/* The ledger: a domain table the writer fills in the same transaction as
 * de_record, so it lists exactly the committed events, in commit order. */
void tu_ledger_create(sqlite3 *db);
/* BEGIN; de_record; ledger row; COMMIT (or ROLLBACK when rollback != 0,
 * leaving no event).  Returns the position, or -1 when rolled back. */
int64_t tu_write(sqlite3 *db, de_outbox *ob, const char *type, const char *id,
                 const char *action, const char *payload, int rollback);
/* The same without Check assertions, for helper processes: -2 on error. */
int64_t tu_write_raw(sqlite3 *db, de_outbox *ob, const char *type,
                     const char *id, const char *action, const char *payload,
                     int rollback);

typedef struct tu_check {
    long messages;   /* records read */
    long unique;     /* events delivered (first copies) */
    long duplicates; /* further copies, same ce_id and ce_subjectseq */
    long expected;   /* events in the ledger */
    long ahead;      /* records that came before an earlier event of
                        their subject and were written again in order
                        later (see tu_assert_check_mock_reorder) */
    long problems;   /* anything wrong: see first_problem */
    char first_problem[512];
} tu_check;

/* Reads every topic of the ledger's subject types from the beginning to
 * the end and checks, against the ledger in ledger_db: every committed
 * event arrived, nothing else did, each subject's ce_subjectseq runs
 * 1, 2, 3, ... in commit order (starting over at 1 only in a numbering
 * with a higher ce_subjectepoch), duplicates repeat the same ce_id with
 * the same number, the key and partition (murmur2) are right, and the
 * headers, timestamp and value are exact.  source/type_prefix are the
 * expected ce_source and ce_type prefix. */
tu_check tu_check_topics(tu_cluster *c, sqlite3 *ledger_db, const char *source,
                         const char *type_prefix);

/* Asserts a check found no problem, every event arrived, and no record
 * ever came ahead of an earlier event of its subject. */
void tu_assert_check(const tu_check *k);

/*
 * The same, but tolerating records that came ahead of an earlier event of
 * their subject as long as the earlier event and then the record itself
 * followed in order.  Only for tests that drop produce connections on the
 * 2.0.2 mock cluster: it does not check idempotent sequence numbers for
 * non-transactional producers, so a request pipelined behind a dropped
 * one can be stored, and the retry then writes both again (plain
 * librdkafka does the same with no relay involved: see docs/TESTING.md).
 * A real broker rejects such a request with OUT_OF_ORDER_SEQUENCE_NUMBER.
 */
void tu_assert_check_mock_reorder(const tu_check *k);

/* Calls fn for every record of topic, from the beginning of each
 * partition to its end when the call began (fails the test if that end
 * is not reached within 60 s). */
typedef void (*tu_record_fn)(void *ctx, const rd_kafka_message_t *m,
                             int32_t partitions);
void tu_read_topic(tu_cluster *c, const char *topic, tu_record_fn fn,
                   void *ctx);
/* A header's value as a string (rotating static buffers), NULL if absent. */
const char *tu_header(const rd_kafka_message_t *m, const char *name);

/* Produces one record with plain librdkafka (a producer of its own,
 * flushed before it returns): key (NULL: none), value, and headers as
 * name/value pairs, NULL-terminated (NULL: none). */
void tu_produce_raw(tu_cluster *c, const char *topic, const char *key,
                    const char *value, const char *const *headers);

/* Java-compatible murmur2 partition of a key. */
int32_t tu_murmur2_partition(const char *key, size_t len, int32_t partitions);

/* Waits until cond holds or timeout_ms passes; returns cond's last value. */
#define tu_wait_for(cond, timeout_ms)                                          \
    ({                                                                         \
        int64_t tu_dl_ = tu_now_ms() + (timeout_ms);                           \
        bool tu_ok_;                                                           \
        while (!(tu_ok_ = (cond)) && tu_now_ms() < tu_dl_)                     \
            usleep(10000);                                                     \
        tu_ok_;                                                                \
    })

int64_t tu_now_ms(void);

#endif

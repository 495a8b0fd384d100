/* SPDX-License-Identifier: MIT */
/*
 * mock_reorder.c -- shows, with plain librdkafka and no libdeliveryevents
 * code, what librdkafka 2.0.2's mock cluster does to an idempotent
 * producer's records: it does not check idempotent sequence numbers for
 * non-transactional producers, so
 *
 *  - when produce connections are dropped, a request pipelined behind a
 *    dropped one may be stored and the retry then writes both again
 *    (records of one key out of order);
 *  - when partition leaders move while requests are in flight
 *    (argument "leader"), a batch refused with NOT_LEADER_FOR_PARTITION
 *    can be overtaken by a later batch at the new leader, and librdkafka,
 *    seeing the later one stored, takes the earlier one as persisted: a
 *    record acknowledged (no failed delivery report) that the mock never
 *    stored.  With "leader-quiet" the leaders move only after everything
 *    was acknowledged.
 *
 * A real broker refuses the out-of-sequence request with
 * OUT_OF_ORDER_SEQUENCE_NUMBER.  See docs/TESTING.md.
 *
 * Build and run: make mock-reorder-experiment
 * Usage: mock_reorder [RUNS] [leader|leader-quiet]
 * Prints, per run: records read, duplicates, records ahead of an earlier
 * record of their key, records missing or out of order at the end, and
 * failed delivery reports.
 */
#include <librdkafka/rdkafka.h>
#include <librdkafka/rdkafka_mock.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define KEYS 20

static void quiet(const rd_kafka_t *rk, int l, const char *f, const char *b)
{
    (void)rk;
    (void)l;
    (void)f;
    (void)b;
}

static void set(rd_kafka_conf_t *c, const char *k, const char *v)
{
    char err[256];

    if (rd_kafka_conf_set(c, k, v, err, sizeof err) != RD_KAFKA_CONF_OK) {
        fprintf(stderr, "%s\n", err);
        exit(1);
    }
}

static int leader_mode, quiet_moves;
static int failed; /* delivery reports with an error */

static void on_dr(rd_kafka_t *rk, const rd_kafka_message_t *m, void *opaque)
{
    (void)rk;
    (void)opaque;
    if (m->err)
        failed++;
}

static void run(int rounds)
{
    char err[512];
    rd_kafka_conf_t *hc = rd_kafka_conf_new(), *c = rd_kafka_conf_new(),
                    *cc = rd_kafka_conf_new();
    rd_kafka_t *host, *p, *cons;
    rd_kafka_mock_cluster_t *mc;
    rd_kafka_topic_partition_list_t *l;
    int next[KEYS] = {0}, last[KEYS] = {0};
    int total = 0, dups = 0, ahead = 0, idle = 0, lost = 0;

    rd_kafka_conf_set_log_cb(hc, quiet);
    host = rd_kafka_new(RD_KAFKA_PRODUCER, hc, err, sizeof err);
    mc = rd_kafka_mock_cluster_new(host, 3);
    rd_kafka_mock_topic_create(mc, "t", 6, 1);

    rd_kafka_conf_set_log_cb(c, quiet);
    set(c, "bootstrap.servers", rd_kafka_mock_cluster_bootstraps(mc));
    set(c, "enable.idempotence", "true");
    set(c, "linger.ms", "0");
    set(c, "reconnect.backoff.ms", "10");
    rd_kafka_conf_set_dr_msg_cb(c, on_dr);
    failed = 0;
    p = rd_kafka_new(RD_KAFKA_PRODUCER, c, err, sizeof err);
    for (int r = 0; r < rounds; r++) {
        if (!leader_mode) {
            /* The next three produce requests drop their connection. */
            rd_kafka_mock_push_request_errors(
                mc, 0, 3, RD_KAFKA_RESP_ERR__TRANSPORT,
                RD_KAFKA_RESP_ERR__TRANSPORT, RD_KAFKA_RESP_ERR__TRANSPORT);
        }
        for (int i = 0; i < 2 * (1 + 9 * leader_mode); i++)
            for (int k = 0; k < KEYS; k++) {
                if (leader_mode && k == 0 && (i == 3 || i == 12)) {
                    /* Every partition moves to another broker, while
                     * requests are in flight or (quiet) after all were
                     * acknowledged. */
                    if (quiet_moves)
                        rd_kafka_flush(p, 30000);
                    for (int part = 0; part < 6; part++)
                        rd_kafka_mock_partition_set_leader(
                            mc, "t", part, 1 + (part + r + i) % 3);
                }
                char key[16], val[16];
                snprintf(key, sizeof key, "K-%02d", k);
                snprintf(val, sizeof val, "%d", ++next[k]);
                rd_kafka_producev(
                    p, RD_KAFKA_V_TOPIC("t"), RD_KAFKA_V_KEY(key, strlen(key)),
                    RD_KAFKA_V_VALUE(val, strlen(val)),
                    RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY), RD_KAFKA_V_END);
                rd_kafka_poll(p, 0);
                usleep(50);
            }
        usleep(50000);
    }
    rd_kafka_flush(p, 30000);

    rd_kafka_conf_set_log_cb(cc, quiet);
    set(cc, "bootstrap.servers", rd_kafka_mock_cluster_bootstraps(mc));
    set(cc, "group.id", "reader");
    cons = rd_kafka_new(RD_KAFKA_CONSUMER, cc, err, sizeof err);
    l = rd_kafka_topic_partition_list_new(6);
    for (int i = 0; i < 6; i++)
        rd_kafka_topic_partition_list_add(l, "t", i)->offset =
            RD_KAFKA_OFFSET_BEGINNING;
    rd_kafka_assign(cons, l);
    rd_kafka_topic_partition_list_destroy(l);
    while (idle < 6) {
        rd_kafka_message_t *m = rd_kafka_consumer_poll(cons, 500);
        char v[16];
        int k, s;
        if (m == NULL) {
            idle++;
            continue;
        }
        if (m->err == 0) {
            idle = 0;
            total++;
            k = atoi((const char *)m->key + 2);
            memcpy(v, m->payload, m->len < 15 ? m->len : 15);
            v[m->len < 15 ? m->len : 15] = '\0';
            s = atoi(v);
            if (s <= last[k])
                dups++;
            else if (s != last[k] + 1)
                ahead++;
            else
                last[k] = s;
        }
        rd_kafka_message_destroy(m);
    }
    for (int k = 0; k < KEYS; k++)
        lost += next[k] - last[k];
    printf("records %d, duplicates %d, ahead of an earlier record %d, "
           "missing or out of order at the end %d, failed delivery "
           "reports %d\n",
           total, dups, ahead, lost, failed);
    rd_kafka_consumer_close(cons);
    rd_kafka_destroy(cons);
    rd_kafka_destroy(p);
    rd_kafka_mock_cluster_destroy(mc);
    rd_kafka_destroy(host);
}

int main(int argc, char **argv)
{
    int runs = argc > 1 ? atoi(argv[1]) : 10;

    leader_mode = argc > 2 && strncmp(argv[2], "leader", 6) == 0;
    quiet_moves = argc > 2 && strcmp(argv[2], "leader-quiet") == 0;

    for (int i = 0; i < runs; i++)
        run(5);
    return 0;
}

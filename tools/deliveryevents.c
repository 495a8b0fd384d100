/* SPDX-License-Identifier: MIT */
/*
 * deliveryevents -- the command-line tool.
 *
 *   deliveryevents relay --db PATH [-X key=value]... [--stats-ms N]
 *       Runs a relay for a database file until SIGINT or SIGTERM, then
 *       stops it gracefully (flushing for up to --stop-timeout-ms).  Other
 *       relays for the same database wait as standbys.  With --drain it
 *       publishes what is committed when it starts, then exits.
 *
 *   deliveryevents mock-cluster [--brokers N] [--topic NAME:PARTITIONS]...
 *       Starts librdkafka's mock Kafka cluster on loopback and prints
 *       "bootstrap.servers=<list>" on the first line of stdout, then runs
 *       until SIGINT, SIGTERM or (with --until-stdin-eof) end of stdin.
 *       Tools such as kcat and other processes can connect to it.
 *
 *   deliveryevents tail --bootstrap SERVERS --topic NAME [--exit-at-end]
 *                       [--print N]
 *       Reads a topic from the beginning and prints each event (partition,
 *       offset, subject, ce_subjectseq, type, time, payload), checking as
 *       it goes that every subject's sequence runs 1, 2, 3, ... (starting
 *       over at 1 in a new numbering, ce_subjectepoch).  With
 *       --exit-at-end it stops at the end of the topic and prints a summary;
 *       --print limits how many events are printed.
 *
 * Exit status: 0 on success, 1 on a runtime failure, 2 on bad usage, 3
 * when tail found a subject out of order or with a gap.
 */
#include <deliveryevents.h>
#include <librdkafka/rdkafka.h>
#include <librdkafka/rdkafka_mock.h>

#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <unistd.h>

static volatile sig_atomic_t stop_signal;

static void on_signal(int sig)
{
    stop_signal = sig;
}

static void catch_signals(void)
{
    struct sigaction sa;

    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
}

static void usage(FILE *out)
{
    fprintf(out, "usage: deliveryevents relay --db PATH [-X key=value]... "
                 "[--stats-ms N] [--stop-timeout-ms N]\n"
                 "       deliveryevents mock-cluster [--brokers N] "
                 "[--topic NAME:PARTITIONS]... [--until-stdin-eof]\n"
                 "       deliveryevents --version\n");
}

static int bad_usage(const char *fmt, const char *arg)
{
    fprintf(stderr, "deliveryevents: ");
    fprintf(stderr, fmt, arg);
    fprintf(stderr, "\n");
    usage(stderr);
    return 2;
}

static void log_line(void *ctx, int level, const char *message)
{
    (void)ctx;
    if (level <= DE_LOG_NOTICE)
        fprintf(stderr, "deliveryevents: %s\n", message);
}

static int cmd_relay(int argc, char **argv)
{
    const char *db = NULL;
    long stats_ms = 0, stop_ms = 10000;
    int drain = 0;
    de_conf *conf = de_conf_new();
    de_relay *r = NULL;
    de_relay_stats st;
    de_err err;
    int rc = 0;

    de_conf_set_log_cb(conf, log_line, NULL);
    for (int i = 0; i < argc; i++) {
        if (strcmp(argv[i], "--db") == 0 && i + 1 < argc) {
            db = argv[++i];
        } else if (strcmp(argv[i], "-X") == 0 && i + 1 < argc) {
            char *kv = argv[++i], *eq = strchr(kv, '=');
            if (eq == NULL)
                return bad_usage("-X takes key=value, got '%s'", kv);
            *eq = '\0';
            if (de_conf_set(conf, kv, eq + 1) != DE_OK) {
                fprintf(stderr, "deliveryevents: %s\n", de_errmsg());
                return 2;
            }
        } else if (strcmp(argv[i], "--drain") == 0) {
            drain = 1;
        } else if (strcmp(argv[i], "--stats-ms") == 0 && i + 1 < argc) {
            stats_ms = strtol(argv[++i], NULL, 10);
        } else if (strcmp(argv[i], "--stop-timeout-ms") == 0 && i + 1 < argc) {
            stop_ms = strtol(argv[++i], NULL, 10);
        } else {
            return bad_usage("unknown relay argument '%s'", argv[i]);
        }
    }
    if (db == NULL)
        return bad_usage("relay needs --db PATH%s", "");
    catch_signals();
    err = de_relay_start_path(db, conf, &r);
    de_conf_destroy(conf);
    if (err != DE_OK) {
        fprintf(stderr, "deliveryevents: %s: %s\n", de_err_name(err),
                de_errmsg());
        return 1;
    }
    if (drain) {
        /* Publish what is committed now, then stop. */
        err = de_relay_flush(r, -1);
        if (err != DE_OK) {
            fprintf(stderr, "deliveryevents: %s\n", de_errmsg());
            rc = 1;
        }
        stop_signal = 1;
    }
    while (!stop_signal) {
        poll(NULL, 0, stats_ms > 0 ? (int)stats_ms : 200);
        if (stats_ms > 0 && de_relay_stats_get(r, &st) == DE_OK)
            printf("active=%d published=%" PRIu64 " pending=%" PRIu64
                   " lag_ms=%" PRId64 " restarts=%" PRIu64 " blocked=%" PRIu64
                   " position=%" PRId64 "\n",
                   st.active, st.published, st.pending, st.lag_ms,
                   st.producer_restarts, st.blocked_subjects, st.position);
        fflush(stdout);
    }
    err = de_relay_stop(r, (int)stop_ms);
    if (err != DE_OK) {
        fprintf(stderr, "deliveryevents: %s\n", de_errmsg());
        rc = 1;
    }
    return rc;
}

/* ---- tail ---------------------------------------------------------- */

struct seen {
    struct seen *next;
    long long epoch, last; /* the last number seen in order */
    char subject[];
};

#define SEEN_BUCKETS 65536

static struct seen *seen_get(struct seen **tab, const char *subject)
{
    unsigned long h = 5381;
    struct seen *s;

    for (const char *p = subject; *p; p++)
        h = h * 33 + (unsigned char)*p;
    for (s = tab[h % SEEN_BUCKETS]; s; s = s->next)
        if (strcmp(s->subject, subject) == 0)
            return s;
    s = calloc(1, sizeof *s + strlen(subject) + 1);
    if (s == NULL)
        return NULL;
    strcpy(s->subject, subject);
    s->next = tab[h % SEEN_BUCKETS];
    tab[h % SEEN_BUCKETS] = s;
    return s;
}

static const char *hdr(rd_kafka_headers_t *h, const char *name, char *buf,
                       size_t size)
{
    const void *v = NULL;
    size_t n = 0;

    if (h == NULL || rd_kafka_header_get_last(h, name, &v, &n) != 0 ||
        v == NULL)
        return NULL;
    if (n >= size)
        n = size - 1;
    memcpy(buf, v, n);
    buf[n] = '\0';
    return buf;
}

static int cmd_tail(int argc, char **argv)
{
    const char *bootstrap = NULL, *topic = NULL;
    int exit_at_end = 0;
    long print = -1, records = 0, events = 0, dups = 0, bad = 0, subjects = 0;
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    const struct rd_kafka_metadata *md = NULL;
    rd_kafka_topic_partition_list_t *parts;
    struct seen **tab;
    int64_t *high;
    int32_t np;
    int remaining = 0;
    rd_kafka_topic_t *rkt;
    rd_kafka_t *rk;
    char err[512];

    for (int i = 0; i < argc; i++) {
        if (strcmp(argv[i], "--bootstrap") == 0 && i + 1 < argc)
            bootstrap = argv[++i];
        else if (strcmp(argv[i], "--topic") == 0 && i + 1 < argc)
            topic = argv[++i];
        else if (strcmp(argv[i], "--exit-at-end") == 0)
            exit_at_end = 1;
        else if (strcmp(argv[i], "--print") == 0 && i + 1 < argc)
            print = strtol(argv[++i], NULL, 10);
        else
            return bad_usage("unknown tail argument '%s'", argv[i]);
    }
    if (bootstrap == NULL || topic == NULL)
        return bad_usage("tail needs --bootstrap and --topic%s", "");
    rd_kafka_conf_set(conf, "bootstrap.servers", bootstrap, err, sizeof err);
    rd_kafka_conf_set(conf, "group.id", "deliveryevents-tail", err, sizeof err);
    rd_kafka_conf_set(conf, "enable.auto.commit", "false", err, sizeof err);
    rk = rd_kafka_new(RD_KAFKA_CONSUMER, conf, err, sizeof err);
    if (rk == NULL) {
        fprintf(stderr, "deliveryevents: %s\n", err);
        return 1;
    }
    rkt = rd_kafka_topic_new(rk, topic, NULL);
    if (rd_kafka_metadata(rk, 0, rkt, &md, 10000) != 0 || md->topic_cnt != 1 ||
        md->topics[0].err) {
        fprintf(stderr, "deliveryevents: topic %s: %s\n", topic,
                md ? rd_kafka_err2str(md->topics[0].err) : "no metadata");
        return 1;
    }
    np = md->topics[0].partition_cnt;
    rd_kafka_metadata_destroy(md);
    rd_kafka_topic_destroy(rkt);
    high = calloc((size_t)np, sizeof *high);
    tab = calloc(SEEN_BUCKETS, sizeof *tab);
    parts = rd_kafka_topic_partition_list_new(np);
    for (int32_t p = 0; p < np; p++) {
        int64_t lo = 0;
        rd_kafka_query_watermark_offsets(rk, topic, p, &lo, &high[p], 10000);
        if (high[p] > lo)
            remaining++;
        rd_kafka_topic_partition_list_add(parts, topic, p)->offset =
            RD_KAFKA_OFFSET_BEGINNING;
    }
    rd_kafka_assign(rk, parts);
    rd_kafka_topic_partition_list_destroy(parts);
    catch_signals();
    while (!stop_signal && !(exit_at_end && remaining == 0)) {
        rd_kafka_message_t *m = rd_kafka_consumer_poll(rk, 200);
        rd_kafka_headers_t *h = NULL;
        char subject[300], seqs[32], epochs[32], type[300], time[40];
        struct seen *sn;
        long long seq, epoch;
        const char *what;
        int gap = 0;

        if (m == NULL)
            continue;
        if (m->err) {
            rd_kafka_message_destroy(m);
            continue;
        }
        records++;
        rd_kafka_message_headers(m, &h);
        if (!hdr(h, "ce_subject", subject, sizeof subject) ||
            !hdr(h, "ce_subjectseq", seqs, sizeof seqs) ||
            !hdr(h, "ce_type", type, sizeof type) ||
            !hdr(h, "ce_time", time, sizeof time)) {
            printf("p%d@%lld: not a deliveryevents record\n", (int)m->partition,
                   (long long)m->offset);
            bad++;
        } else {
            seq = strtoll(seqs, NULL, 10);
            epoch = hdr(h, "ce_subjectepoch", epochs, sizeof epochs)
                        ? strtoll(epochs, NULL, 10)
                        : 0;
            sn = seen_get(tab, subject);
            if (sn && sn->last == 0)
                subjects++;
            what = "";
            /* In order: the next number of the numbering, or 1 in a newer
             * numbering (ce_subjectepoch: the subject was idle). */
            if (sn == NULL || (epoch == sn->epoch && seq == sn->last + 1) ||
                (epoch > sn->epoch && seq == 1)) {
                events++;
                if (sn) {
                    sn->epoch = epoch;
                    sn->last = seq;
                }
            } else if (epoch < sn->epoch ||
                       (epoch == sn->epoch && seq <= sn->last)) {
                dups++;
                what = "  (duplicate: already seen)";
            } else {
                bad++;
                gap = 1;
                what = "  (GAP: an earlier event is missing)";
            }
            if (print < 0 || records <= print || gap)
                printf("p%d@%-6lld %-10s #%-3lld %-28s %s %.*s%s\n",
                       (int)m->partition, (long long)m->offset, subject, seq,
                       type, time, (int)m->len, (const char *)m->payload, what);
        }
        if (m->offset + 1 == high[m->partition])
            remaining--;
        rd_kafka_message_destroy(m);
    }
    printf("tail: %ld records on %s: %ld events of %ld subjects in order, %ld "
           "duplicates, %ld out of order or foreign\n",
           records, topic, events, subjects, dups, bad);
    rd_kafka_consumer_close(rk);
    rd_kafka_destroy(rk);
    free(high);
    for (int i = 0; i < SEEN_BUCKETS; i++)
        while (tab[i]) {
            struct seen *n = tab[i]->next;
            free(tab[i]);
            tab[i] = n;
        }
    free(tab);
    return bad ? 3 : 0;
}

static int cmd_mock_cluster(int argc, char **argv)
{
    int brokers = 3, until_eof = 0;
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    rd_kafka_mock_cluster_t *mc;
    rd_kafka_t *rk;
    char err[512];

    for (int i = 0; i < argc; i++) {
        if (strcmp(argv[i], "--brokers") == 0 && i + 1 < argc) {
            brokers = atoi(argv[++i]);
            if (brokers < 1)
                return bad_usage("--brokers takes a positive number, got "
                                 "'%s'",
                                 argv[i]);
        } else if (strcmp(argv[i], "--topic") == 0 && i + 1 < argc) {
            i++; /* created below, once the cluster exists */
        } else if (strcmp(argv[i], "--until-stdin-eof") == 0) {
            until_eof = 1;
        } else {
            return bad_usage("unknown mock-cluster argument '%s'", argv[i]);
        }
    }
    /* Die with the parent that started us, never linger as an orphan. */
    if (until_eof)
        prctl(PR_SET_PDEATHSIG, SIGTERM);
    rd_kafka_conf_set(conf, "log_level", "0", err, sizeof err);
    rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, err, sizeof err);
    if (rk == NULL) {
        fprintf(stderr, "deliveryevents: %s\n", err);
        return 1;
    }
    mc = rd_kafka_mock_cluster_new(rk, brokers);
    if (mc == NULL) {
        fprintf(stderr, "deliveryevents: cannot start the mock cluster\n");
        rd_kafka_destroy(rk);
        return 1;
    }
    for (int i = 0; i < argc; i++) {
        if (strcmp(argv[i], "--topic") == 0) {
            char *spec = argv[++i], *colon = strrchr(spec, ':');
            int parts = colon ? atoi(colon + 1) : 0;
            if (colon == NULL || parts < 1) {
                rd_kafka_mock_cluster_destroy(mc);
                rd_kafka_destroy(rk);
                return bad_usage("--topic takes NAME:PARTITIONS, got '%s'",
                                 spec);
            }
            *colon = '\0';
            rd_kafka_mock_topic_create(mc, spec, parts, 1);
        }
    }
    catch_signals();
    printf("bootstrap.servers=%s\n", rd_kafka_mock_cluster_bootstraps(mc));
    fflush(stdout);
    while (!stop_signal) {
        struct pollfd p = {0, POLLIN, 0};
        if (until_eof) {
            char buf[256];
            if (poll(&p, 1, 500) > 0 && read(0, buf, sizeof buf) <= 0)
                break;
        } else {
            poll(NULL, 0, 500);
        }
    }
    rd_kafka_mock_cluster_destroy(mc);
    rd_kafka_destroy(rk);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    if (strcmp(argv[1], "relay") == 0)
        return cmd_relay(argc - 2, argv + 2);
    if (strcmp(argv[1], "mock-cluster") == 0)
        return cmd_mock_cluster(argc - 2, argv + 2);
    if (strcmp(argv[1], "tail") == 0)
        return cmd_tail(argc - 2, argv + 2);
    if (strcmp(argv[1], "--version") == 0) {
        printf("deliveryevents %s (librdkafka %s, SQLite %s)\n", de_version(),
               rd_kafka_version_str(), sqlite3_libversion());
        return 0;
    }
    if (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0) {
        usage(stdout);
        return 0;
    }
    return bad_usage("unknown command '%s'", argv[1]);
}

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
 * Exit status: 0 on success, 1 on a runtime failure, 2 on bad usage.
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

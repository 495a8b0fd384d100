/* SPDX-License-Identifier: MIT */
/*
 * deliveryevents -- the command-line tool.
 *
 *   deliveryevents relay --db PATH [-b SERVERS] [-X key=value]...
 *                        [--once] [--stats-ms N] [--stop-timeout-ms N]
 *                        [--metrics ADDR:PORT] [--stall-ms N]
 *       Runs a relay for a database file until SIGINT or SIGTERM, then
 *       stops it gracefully (flushing for up to --stop-timeout-ms, 10000
 *       by default); a second SIGINT or SIGTERM stops it at once.  On the
 *       way out it prints how many events stay pending in the outbox (the
 *       next relay publishes them).  -b SERVERS is -X
 *       bootstrap.servers=SERVERS.  Other relays for the same database
 *       wait as standbys (the relay says so in one line, and again when it
 *       becomes active).  With --once (alias --drain) it publishes what is
 *       committed, then exits, with a progress line on a terminal.
 *       --stats-ms N prints every counter of de_relay_stats every N ms on
 *       stdout.  --metrics ADDR:PORT serves the counters over HTTP:
 *       /metrics in the Prometheus text format and /healthz, which answers
 *       503 while the relay is stopped or has pending events and published
 *       nothing for --stall-ms (60000); port 0 picks a free port, and the
 *       address is printed on stderr.
 *
 *   deliveryevents status --db PATH [--state PATH] [--json]
 *       Read-only: what the outbox and its relay state (PATH-relay) hold --
 *       pending events and the age of the oldest, the relay's cursor, the
 *       lease holder, blocked subjects and their held-back events, schema
 *       versions, file sizes.  Creates and changes nothing.
 *
 *   deliveryevents list --db PATH [--state PATH] [--subject TYPE:ID]
 *                       [--pending | --blocked] [--limit N] [--json]
 *       Read-only: the outbox rows still retained, oldest first, each
 *       published, pending or held back (100 rows unless --limit; 0 = all).
 *
 *   deliveryevents consumer-status --db PATH [--json]
 *       Read-only, like status, for a consumer's database: its schema
 *       version, subjects remembered (de_inbox), parked subjects, dead
 *       letters by kind and state and the oldest, release/skip requests
 *       still queued, file sizes.
 *
 *   deliveryevents dead-letters --db PATH [--subject TYPE:ID] [--parked]
 *                               [--limit N] [--json]
 *       Read-only: a consumer's de_dead_letter rows, oldest first (100
 *       unless --limit; 0 = all).
 *
 *   deliveryevents release --db PATH TYPE:ID [--wait MS] [--force]
 *   deliveryevents skip --db PATH TYPE:ID [--wait MS] [--force]
 *       Asks the running consumer of PATH (which has the handlers) to call
 *       de_consumer_release or de_consumer_skip for a parked subject: a
 *       row in de_consumer_request (consumer schema 4; an older database
 *       is refused, never changed), then up to --wait MS (30000; 0 = no
 *       wait) for the consumer's result, which is printed.  A subject not
 *       parked is refused unless --force; a request not taken in time
 *       stays queued (exit 1); exit 1 too when the consumer answers that
 *       the subject is still parked or the request failed.
 *
 *   deliveryevents contracts --db PATH [--json]
 *       Read-only: the event contracts defined in the database
 *       (de_contracts), by type and version, with $id and properties.
 *
 *   deliveryevents asyncapi --db PATH
 *       Read-only: an AsyncAPI 3.0 document (JSON) of those contracts on
 *       stdout -- a channel per topic, a message per type and version with
 *       its payload schema, the CloudEvents headers and the key.
 *
 *   deliveryevents replay --db PATH (--subject TYPE:ID | --from POSITION |
 *                         --since TIME) [-b SERVERS] [-X key=value]...
 *                         [--timeout-ms N]
 *       Republishes retained events (outbox.retention.ms) with their
 *       original ce_id, ce_subjectepoch and ce_subjectseq (de_replay):
 *       consumers that applied them count them as duplicates.  Refuses,
 *       publishing nothing and naming the position, an event no longer
 *       retained or without recorded numbers, and a selection of which
 *       nothing is published yet.  Takes no lease, writes no file.
 *
 *   deliveryevents mock-cluster [--brokers N] [--topic NAME[:PARTITIONS]]...
 *                               [--until-stdin-eof]
 *       Starts librdkafka's mock Kafka cluster on loopback and prints
 *       "bootstrap.servers=<list>" on the first line of stdout, then runs
 *       until SIGINT, SIGTERM or (with --until-stdin-eof) end of stdin.
 *       A topic without :PARTITIONS gets 1 partition.  Tools such as kcat
 *       and other processes can connect to it.
 *
 *   deliveryevents tail -b SERVERS --topic NAME [--exit-at-end] [--print N]
 *       Reads an existing topic from the beginning (a topic that does not
 *       exist is refused, never created) and prints each event
 *       (partition, offset, subject, ce_subjectseq, type, time, payload),
 *       line by line, checking as it goes that every subject
 *       (ce_subjecttype/ce_subject) runs 1, 2, 3, ... (starting over at 1
 *       in a new numbering, ce_subjectepoch).  With --exit-at-end it stops
 *       at the end of the topic and prints a summary; --print limits how
 *       many events are printed.  --bootstrap is an alias of -b.
 *
 *   deliveryevents archive -b SERVERS --topic NAME [--topic NAME]...
 *                          --dir DIR [--group G] [--roll-ms N]
 *                          [--roll-bytes N] [--until-idle MS]
 *       Writes every event of the topics, exactly once across crashes and
 *       rebalances, to gzip'd NDJSON files (CloudEvents JSON format) in
 *       Hive-style partitions by event time (tools/archive.c).
 *
 *   status, list, consumer-status, dead-letters, release, skip,
 *   contracts, asyncapi and replay (de_replay_pg) work on a PostgreSQL
 *   database as well: --pg CONNINFO (a libpq connection string or URI)
 *   instead of --db PATH, or --db postgresql://...; the library's tables
 *   are in its schema deliveryevents (tools/pg.c).  The output is the
 *   same, printed by the same code.
 *
 *   Every command takes --help (-h).
 *
 * Exit status: 0 on success; 1 on a runtime failure (including a relay
 * stopped before everything was published, a missing database, a missing
 * topic, a release or skip refused or not taken in time, a replay refused);
 * 2 on bad usage (the
 * message names the bad argument or value); 3 when tail found a subject out of
 * order or with a gap.
 */
#include "tool.h"

#include <deliveryevents.h>
#include <jansson.h>
#include <librdkafka/rdkafka.h>
#include <librdkafka/rdkafka_mock.h>

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <microhttpd.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

volatile sig_atomic_t stop_signal, signals_seen;

static void on_signal(int sig)
{
    stop_signal = sig;
    signals_seen++;
}

void catch_signals(void)
{
    struct sigaction sa;

    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
}

int64_t now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int64_t mono_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* ---- usage ------------------------------------------------------------ */

static const char usage_relay[] =
    "usage: deliveryevents relay (--db PATH | --pg CONNINFO) [-b SERVERS]\n"
    "                            [-X key=value]... [--config FILE]\n"
    "                            [--once|--drain] [--stats-ms N] "
    "[--stop-timeout-ms N]\n"
    "                            [--metrics ADDR:PORT] [--stall-ms N]\n"
    "  Publishes the outbox of PATH to Kafka until SIGINT or SIGTERM.\n"
    "  --db PATH             the service's database file\n"
    "  --pg CONNINFO         or its PostgreSQL database (a libpq connection\n"
    "                        string or URI; --db postgresql://... too)\n"
    "  -b SERVERS            Kafka bootstrap servers (= -X "
    "bootstrap.servers=SERVERS)\n"
    "  -X key=value          a relay or librdkafka property; repeatable;\n"
    "                        key=@FILE reads the value from FILE\n"
    "  --config FILE         key=value lines; DELIVERYEVENTS_X_<KEY>\n"
    "                        environment variables are read too\n"
    "  --once, --drain       publish what is committed, then exit\n"
    "  --stats-ms N          print every relay counter every N ms on stdout\n"
    "  --stop-timeout-ms N   on SIGINT/SIGTERM flush for up to N ms "
    "(10000);\n"
    "                        a second signal stops at once\n"
    "  --metrics ADDR:PORT   serve /metrics (Prometheus) and /healthz over "
    "HTTP\n"
    "                        (port 0: any free port, printed on stderr)\n"
    "  --stall-ms N          /healthz fails after N ms with events pending "
    "and\n"
    "                        none published (60000)\n"
    "  On exit it prints how many events stay pending in the outbox.\n";

static const char usage_status[] =
    "usage: deliveryevents status (--db PATH [--state PATH] | --pg CONNINFO)\n"
    "                             [--json]\n"
    "  Read-only report of an outbox and its relay state: pending events,\n"
    "  the relay's cursor, lease holder, blocked subjects, schema versions,\n"
    "  file sizes.  Creates and changes nothing.\n"
    "  --db PATH       the service's database file (required)\n"
    "  --pg CONNINFO   a PostgreSQL database instead (a libpq connection\n"
    "                  string or URI; --db postgresql://... works too)\n"
    "  --state PATH    the relay's state file (default PATH-relay; "
    "SQLite)\n"
    "  --json          one JSON object instead of text\n";

static const char usage_list[] =
    "usage: deliveryevents list (--db PATH [--state PATH] | --pg CONNINFO)\n"
    "                           [--subject TYPE:ID]\n"
    "                           [--pending | --blocked] [--limit N] "
    "[--json]\n"
    "  Read-only list of the outbox rows still retained, oldest first.\n"
    "  --db PATH          the service's database file (required)\n"
    "  --pg CONNINFO      a PostgreSQL database instead (a libpq "
    "connection\n"
    "                     string or URI; --db postgresql://... works too)\n"
    "  --state PATH       the relay's state file (default PATH-relay; "
    "SQLite)\n"
    "  --subject TYPE:ID  only this subject's events, e.g. delivery:D-7\n"
    "  --pending          only events not yet published (held back "
    "included)\n"
    "  --blocked          only events held back behind a blocked subject\n"
    "  --limit N          at most N rows (100; 0 = all)\n"
    "  --json             one JSON object per line\n";

static const char usage_mock[] =
    "usage: deliveryevents mock-cluster [--brokers N] [--topic "
    "NAME[:PARTITIONS]]...\n"
    "                                   [--until-stdin-eof]\n"
    "  Runs librdkafka's mock Kafka cluster on loopback; prints\n"
    "  \"bootstrap.servers=LIST\" on the first line of stdout.\n"
    "  --brokers N          brokers (3)\n"
    "  --topic NAME[:P]     create a topic with P partitions (1); "
    "repeatable\n"
    "  --until-stdin-eof    also stop at the end of stdin (and with the "
    "parent)\n";

static const char usage_tail[] =
    "usage: deliveryevents tail -b SERVERS --topic NAME [--from-beginning]\n"
    "       [--group G] [--json] [--exit-at-end] [--print N]\n"
    "       [-X key=value]... [--config FILE]\n"
    "  Reads an existing topic, prints each event (control characters\n"
    "  escaped) and checks that every subject's ce_subjectseq runs 1, 2, 3\n"
    "  -b, --bootstrap SERVERS   Kafka bootstrap servers (required)\n"
    "  --topic NAME              the topic (required; never created)\n"
    "  --from-beginning          start at the oldest record (default: the\n"
    "                            end, new records only)\n"
    "  --group G                 read as a member of consumer group G,\n"
    "                            resuming where it committed\n"
    "  --json                    one JSON object per record on stdout (the\n"
    "                            summary goes to stderr)\n"
    "  --exit-at-end             stop at the end of the topic, print a "
    "summary\n"
    "  --print N                 print at most N events (gaps always)\n"
    "  -X key=value              a librdkafka property (e.g. TLS, SASL);\n"
    "                            key=@FILE reads the value from FILE\n"
    "  --config FILE             key=value lines; DELIVERYEVENTS_X_<KEY>\n"
    "                            environment variables are read too\n";

static void usage(FILE *out)
{
    fprintf(
        out,
        "usage: deliveryevents COMMAND [OPTION]...\n"
        "commands:\n"
        "  relay --db PATH [-b SERVERS] [-X key=value]... [--once|--drain]"
        "\n"
        "        [--config FILE] [--stats-ms N] [--stop-timeout-ms N]\n"
        "        [--metrics ADDR:PORT] [--stall-ms N]\n"
        "                 publish a database's outbox to Kafka\n"
        "  status (--db PATH [--state PATH] | --pg CONNINFO) [--json]\n"
        "                 what an outbox holds and how its relay stands "
        "(read-only)\n"
        "  list (--db PATH [--state PATH] | --pg CONNINFO) [--subject "
        "TYPE:ID]\n"
        "        [--pending|--blocked] [--limit N] [--json]\n"
        "                 the retained outbox rows (read-only)\n"
        "  consumer-status (--db PATH | --pg CONNINFO) [--json]\n"
        "                 what a consumer's database holds: parked "
        "subjects, dead\n"
        "                 letters, queued requests (read-only)\n"
        "  dead-letters (--db PATH | --pg CONNINFO) [--subject TYPE:ID] "
        "[--parked]\n"
        "        [--limit N] [--json]\n"
        "                 a consumer's dead letters, oldest first "
        "(read-only)\n"
        "  replay (--db PATH | --pg CONNINFO) (--subject TYPE:ID | --from "
        "POSITION |\n"
        "        --since TIME)\n"
        "        [-b SERVERS] [-X key=value]... [--config FILE] [--timeout-ms "
        "N]\n"
        "                 republish retained events with their original "
        "numbers\n"
        "  release (--db PATH | --pg CONNINFO) TYPE:ID [--wait MS] "
        "[--force]\n"
        "  skip (--db PATH | --pg CONNINFO) TYPE:ID [--wait MS] [--force]\n"
        "                 ask the running consumer to release a parked "
        "subject, or\n"
        "                 to skip its first parked event, and wait for "
        "its result\n"
        "  tail -b SERVERS --topic NAME [--from-beginning] [--group G] "
        "[--json]\n"
        "        [--exit-at-end] [--print N] [-X key=value]... [--config "
        "FILE]\n"
        "                 print a topic's events, checking their order\n"
        "  contracts (--db PATH | --pg CONNINFO) [--json]\n"
        "                 the event contracts defined in a database "
        "(read-only)\n"
        "  asyncapi (--db PATH | --pg CONNINFO)\n"
        "                 an AsyncAPI 3.0 document of those contracts "
        "(read-only)\n"
        "  archive -b SERVERS --topic NAME [--topic NAME]... --dir DIR\n"
        "        [--group G] [--roll-ms N] [--roll-bytes N] [--until-idle MS]\n"
        "        [-X key=value]... [--config FILE]\n"
        "                 write the topics' events, exactly once, to "
        "gzip'd NDJSON\n"
        "                 files partitioned by event time\n"
        "  mock-cluster [--brokers N] [--topic NAME[:PARTITIONS]]... "
        "[--until-stdin-eof]\n"
        "                 run a mock Kafka cluster on loopback\n"
        "  --version      print the versions\n"
        "  --help, -h     this text; COMMAND --help for a command's\n"
        "exit status: 0 success, 1 runtime failure, 2 bad usage, 3 tail "
        "found a\n"
        "subject out of order\n");
}

int bad_usage(const char *cmd, const char *fmt, const char *arg)
{
    fprintf(stderr, "deliveryevents: %s: ", cmd);
    fprintf(stderr, fmt, arg);
    fprintf(stderr, "\n(deliveryevents %s --help for usage)\n", cmd);
    return 2;
}

static int is_help(const char *a)
{
    return strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0;
}

/* Whether a command's arguments ask for its help (--help or -h, wherever
 * they are); the usage is then printed on stdout. */
int wants_help(int argc, char **argv, const char *usage_text)
{
    for (int i = 0; i < argc; i++)
        if (is_help(argv[i])) {
            fputs(usage_text, stdout);
            return 1;
        }
    return 0;
}

/* Splits TYPE:ID at its first colon; -1 when either side is empty. */
static int split_subject(const char *s, const char **colon)
{
    *colon = strchr(s, ':');
    return *colon == NULL || *colon == s || (*colon)[1] == '\0' ? -1 : 0;
}

/* The value of the option at argv[*i], or NULL (said on stderr) when it is
 * the last argument. */
const char *opt_value(const char *cmd, int argc, char **argv, int *i)
{
    if (*i + 1 >= argc) {
        bad_usage(cmd, "%s needs a value", argv[*i]);
        return NULL;
    }
    return argv[++*i];
}

/* Parses a whole decimal number in [min, max]; says why not on stderr
 * (unless cmd is NULL). */
int parse_num(const char *cmd, const char *opt, const char *s, long min,
              long max, long *out)
{
    char *end;
    long v;

    errno = 0;
    v = strtol(s, &end, 10);
    if (errno != 0 || end == s || *end != '\0' || v < min || v > max) {
        if (cmd != NULL)
            fprintf(
                stderr,
                "deliveryevents: %s: %s takes a number from %ld to %ld, got "
                "'%s'\n",
                cmd, opt, min, max, s);
        return -1;
    }
    *out = v;
    return 0;
}

/* Properties (see tool.h for where they come from). */
#define ENV_PREFIX "DELIVERYEVENTS_X_"

/* The value raw stands for: itself, or FILE's first line for @FILE; NULL
 * after saying why.  The caller frees (wiping) what it gets. */
static char *prop_value(const props *p, const char *key, const char *raw)
{
    char *v;
    FILE *f;
    size_t n = 0;
    ssize_t len;

    if (raw[0] != '@' || raw[1] == '@')
        return strdup(raw[0] == '@' ? raw + 1 : raw);
    if ((f = fopen(raw + 1, "r")) == NULL) {
        fprintf(stderr,
                "deliveryevents: %s: cannot read %s's value from %s: %s\n",
                p->cmd, key, raw + 1, strerror(errno));
        return NULL;
    }
    v = NULL;
    len = getline(&v, &n, f);
    fclose(f);
    if (len < 0) {
        free(v);
        return strdup(""); /* an empty file: an empty value */
    }
    while (len > 0 && (v[len - 1] == '\n' || v[len - 1] == '\r'))
        v[--len] = '\0';
    return v;
}

static void wipe_free(char *v)
{
    if (v != NULL) {
        explicit_bzero(v, strlen(v));
        free(v);
    }
}

/* Sets key to raw (see prop_value); where prefixes messages ("FILE:LINE:
 * " or "").  0, or 2 after saying why. */
static int prop_set(props *p, const char *key, const char *raw,
                    const char *where)
{
    char err[512], *v = prop_value(p, key, raw);
    int rc = 0;

    if (v == NULL)
        return 2;
    if (de_conf_set(p->conf, key, v) != DE_OK) {
        fprintf(stderr, "deliveryevents: %s: %s%s\n", p->cmd, where,
                de_errmsg());
        rc = 2;
    } else if (p->rk != NULL &&
               rd_kafka_conf_set(p->rk, key, v, err, sizeof err) !=
                   RD_KAFKA_CONF_OK) {
        fprintf(stderr,
                "deliveryevents: %s: %s%s is not a librdkafka property "
                "(this command takes only librdkafka's)\n",
                p->cmd, where, key);
        rc = 2;
    }
    wipe_free(v);
    return rc;
}

/* Splits "key=value" into key (a copy) and *value; -1 when malformed. */
static int split_kv(const char *s, char *key, size_t size, const char **value)
{
    const char *eq = strchr(s, '=');

    if (eq == NULL || eq == s || (size_t)(eq - s) >= size)
        return -1;
    memcpy(key, s, (size_t)(eq - s));
    key[eq - s] = '\0';
    *value = eq + 1;
    return 0;
}

/* The environment's DELIVERYEVENTS_X_* variables. */
int props_from_env(props *p)
{
    extern char **environ;
    char key[256], where[300];
    const char *value;

    for (char **e = environ; *e != NULL; e++) {
        if (strncmp(*e, ENV_PREFIX, sizeof ENV_PREFIX - 1) != 0 ||
            split_kv(*e + sizeof ENV_PREFIX - 1, key, sizeof key, &value) != 0)
            continue;
        for (char *k = key; *k; k++)
            *k = *k == '_' ? '.' : (char)tolower((unsigned char)*k);
        snprintf(where, sizeof where, "environment " ENV_PREFIX "%.*s: ",
                 (int)(strchr(*e, '=') - *e - (sizeof ENV_PREFIX - 1)),
                 *e + sizeof ENV_PREFIX - 1);
        if (prop_set(p, key, value, where) != 0)
            return 2;
    }
    return 0;
}

/* --config FILE: key=value lines; blank lines and # comments skipped. */
static int props_from_file(props *p, const char *path)
{
    FILE *f = fopen(path, "r");
    char *line = NULL, key[256], where[PATH_MAX + 40];
    const char *value;
    size_t n = 0;
    ssize_t len;
    int rc = 0, no = 0;

    if (f == NULL) {
        fprintf(stderr, "deliveryevents: %s: cannot read --config %s: %s\n",
                p->cmd, path, strerror(errno));
        return 2;
    }
    while (rc == 0 && (len = getline(&line, &n, f)) >= 0) {
        char *s = line;
        no++;
        while (len > 0 && (s[len - 1] == '\n' || s[len - 1] == '\r'))
            s[--len] = '\0';
        while (*s == ' ' || *s == '\t')
            s++;
        if (*s == '\0' || *s == '#')
            continue;
        snprintf(where, sizeof where, "%s:%d: ", path, no);
        if (split_kv(s, key, sizeof key, &value) != 0) {
            fprintf(stderr,
                    "deliveryevents: %s: %snot key=value (the line is not "
                    "shown: it may hold a secret)\n",
                    p->cmd, where);
            rc = 2;
        } else {
            rc = prop_set(p, key, value, where);
        }
    }
    if (line != NULL)
        explicit_bzero(line, n);
    free(line);
    fclose(f);
    return rc;
}

/* -b SERVERS, -X key=value or --config FILE (option a, value v). */
int props_option(props *p, const char *a, const char *v)
{
    char key[256];
    const char *value;

    if (strcmp(a, "--config") == 0)
        return props_from_file(p, v);
    if (strcmp(a, "-b") == 0 || strcmp(a, "--bootstrap") == 0)
        return prop_set(p, "bootstrap.servers", v, "");
    if (split_kv(v, key, sizeof key, &value) != 0)
        return bad_usage(p->cmd,
                         "-X takes key=value with a key of 1 to 255 bytes; "
                         "got an argument without one (not shown: it may "
                         "hold a secret)%s",
                         "");
    return prop_set(p, key, value, "");
}

/* Whether a is one of the options props_option takes. */
int is_props_option(const char *a)
{
    return strcmp(a, "-b") == 0 || strcmp(a, "--bootstrap") == 0 ||
           strcmp(a, "-X") == 0 || strcmp(a, "--config") == 0;
}

/* Wipes the values of -X arguments from argv (what ps and
 * /proc/<pid>/cmdline show), once they are parsed and copied. */
void wipe_x_values(int argc, char **argv)
{
    for (int i = 0; i + 1 < argc; i++) {
        char *eq;
        if (strcmp(argv[i], "-X") == 0 && (eq = strchr(argv[i + 1], '=')))
            memset(eq + 1, 0, strlen(eq + 1));
    }
}

static void log_line(void *ctx, int level, const char *message)
{
    (void)ctx;
    if (level <= DE_LOG_NOTICE)
        fprintf(stderr, "deliveryevents: %s\n", message);
}

/* ---- the database and the relay state, read-only -------------------- */

/*
 * Both files are opened read-only (SQLITE_OPEN_READONLY, URI mode=ro) and
 * never changed or created.  A WAL database that no connection has open
 * has no -wal file, and SQLite would create -wal and -shm files even for a
 * read-only connection: such a file is read as immutable instead (nothing
 * is writing it; a writer that starts meanwhile can at worst make the
 * report stale or fail with an error).  The relay state is attached as
 * "rs"; without one, empty temporary tables of the same names stand in
 * (nothing published yet).
 */
typedef struct ro {
    sqlite3 *db;
    pgt *pg; /* a PostgreSQL database instead (tools/pg.c) */
    const char *db_path;
    char state_path[PATH_MAX + 16];
    int has_state;
} ro;

static int file_exists(const char *path)
{
    struct stat sb;

    return stat(path, &sb) == 0;
}

static int is_file(const char *path)
{
    struct stat sb;

    return stat(path, &sb) == 0 && S_ISREG(sb.st_mode);
}

static int64_t file_size(const char *path)
{
    struct stat sb;

    return stat(path, &sb) == 0 ? (int64_t)sb.st_size : -1;
}

/* "file:PATH?mode=ro" (or immutable=1, see above), PATH %-escaped. */
static void ro_uri(const char *path, char *buf, size_t size)
{
    static const char hex[] = "0123456789ABCDEF";
    char wal[PATH_MAX + 16];
    size_t n = 0;

    n += (size_t)snprintf(buf, size, "file:");
    for (const unsigned char *p = (const unsigned char *)path;
         *p && n + 4 < size; p++) {
        if ((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') ||
            (*p >= '0' && *p <= '9') || strchr("/-._~", *p)) {
            buf[n++] = (char)*p;
        } else {
            buf[n++] = '%';
            buf[n++] = hex[*p >> 4];
            buf[n++] = hex[*p & 15];
        }
    }
    buf[n] = '\0';
    snprintf(wal, sizeof wal, "%s-wal", path);
    snprintf(buf + n, size - n, "%s",
             file_exists(wal) ? "?mode=ro" : "?immutable=1");
}

/* The single integer of a query, or dflt (also for NULL or an error). */
static int64_t q_int(sqlite3 *db, const char *sql, int64_t dflt)
{
    sqlite3_stmt *st = NULL;
    int64_t v = dflt;

    if (sqlite3_prepare_v2(db, sql, -1, &st, NULL) == SQLITE_OK &&
        sqlite3_step(st) == SQLITE_ROW &&
        sqlite3_column_type(st, 0) != SQLITE_NULL)
        v = sqlite3_column_int64(st, 0);
    sqlite3_finalize(st);
    return v;
}

/* The single text of a query into buf ("" for none). */
static const char *q_text(sqlite3 *db, const char *sql, char *buf, size_t size)
{
    sqlite3_stmt *st = NULL;
    const unsigned char *v;

    buf[0] = '\0';
    if (sqlite3_prepare_v2(db, sql, -1, &st, NULL) == SQLITE_OK &&
        sqlite3_step(st) == SQLITE_ROW &&
        (v = sqlite3_column_text(st, 0)) != NULL)
        snprintf(buf, size, "%s", (const char *)v);
    sqlite3_finalize(st);
    return buf;
}

static void ro_close(ro *r)
{
    pgt_close(r->pg);
    r->pg = NULL;
    if (r->db != NULL) {
        (void)sqlite3_exec(r->db, "COMMIT", NULL, NULL, NULL);
        sqlite3_close(r->db);
    }
    r->db = NULL;
}

/* Opens db_path alone read-only in one read transaction; 0, or 1 after
 * saying why not. */
static int ro_open_file(const char *cmd, const char *db_path, ro *r)
{
    char uri[3 * PATH_MAX + 64];

    memset(r, 0, sizeof *r);
    r->db_path = db_path;
    if (!file_exists(db_path)) {
        fprintf(stderr, "deliveryevents: %s: cannot open '%s': %s\n", cmd,
                db_path, strerror(errno));
        return 1;
    }
    if (!is_file(db_path)) {
        fprintf(stderr, "deliveryevents: %s: '%s' is not a file\n", cmd,
                db_path);
        return 1;
    }
    ro_uri(db_path, uri, sizeof uri);
    if (sqlite3_open_v2(uri, &r->db, SQLITE_OPEN_READONLY | SQLITE_OPEN_URI,
                        NULL) != SQLITE_OK ||
        sqlite3_busy_timeout(r->db, 5000) != SQLITE_OK ||
        sqlite3_exec(r->db, "BEGIN", NULL, NULL, NULL) != SQLITE_OK) {
        fprintf(stderr, "deliveryevents: %s: cannot read '%s': %s\n", cmd,
                db_path, r->db ? sqlite3_errmsg(r->db) : "out of memory");
        ro_close(r);
        return 1;
    }
    return 0;
}

/* Opens db_path and its relay state read-only in one read transaction;
 * 0, or 1 after saying why not. */
static int ro_open(const char *cmd, const char *db_path, const char *state_path,
                   ro *r)
{
    char uri[3 * PATH_MAX + 64], sql[3 * PATH_MAX + 100];

    if (ro_open_file(cmd, db_path, r) != 0)
        return 1;
    if (q_int(r->db,
              "SELECT count(*) FROM main.sqlite_master WHERE type = 'table' "
              "AND name IN ('de_outbox', 'de_meta')",
              -1) != 2) {
        fprintf(stderr,
                "deliveryevents: %s: '%s' has no outbox (no de_outbox "
                "table)%s%s\n",
                cmd, db_path, sqlite3_errcode(r->db) ? ": " : "",
                sqlite3_errcode(r->db) ? sqlite3_errmsg(r->db) : "");
        ro_close(r);
        return 1;
    }
    snprintf(r->state_path, sizeof r->state_path, "%s",
             state_path ? state_path : "");
    if (state_path == NULL)
        snprintf(r->state_path, sizeof r->state_path, "%s-relay", db_path);
    r->has_state = file_exists(r->state_path);
    if (r->has_state) {
        sqlite3_stmt *st = NULL;
        int rc;

        ro_uri(r->state_path, uri, sizeof uri);
        rc = sqlite3_prepare_v2(r->db, "ATTACH ?1 AS rs", -1, &st, NULL);
        if (rc == SQLITE_OK) {
            sqlite3_bind_text(st, 1, uri, -1, SQLITE_STATIC);
            rc = sqlite3_step(st) == SQLITE_DONE ? SQLITE_OK : SQLITE_ERROR;
        }
        sqlite3_finalize(st);
        if (rc != SQLITE_OK ||
            q_int(r->db, "SELECT count(*) FROM rs.de_relay_meta", -1) < 0) {
            fprintf(stderr,
                    "deliveryevents: %s: cannot read the relay state '%s': "
                    "%s\n",
                    cmd, r->state_path, sqlite3_errmsg(r->db));
            ro_close(r);
            return 1;
        }
    } else {
        snprintf(sql, sizeof sql,
                 "CREATE TEMP TABLE de_relay_meta(key, value);"
                 "CREATE TEMP TABLE de_relay_parked(position, subject_type, "
                 "subject_id, seq, error, since_ms);"
                 "CREATE TEMP TABLE de_relay_lease(id, owner, pid, host, "
                 "acquired_ms, heartbeat_ms);"
                 "CREATE TEMP TABLE de_relay_seq(subject_type, subject_id, "
                 "seq, last_ms);");
        if (sqlite3_exec(r->db, sql, NULL, NULL, NULL) != SQLITE_OK) {
            fprintf(stderr, "deliveryevents: %s: %s\n", cmd,
                    sqlite3_errmsg(r->db));
            ro_close(r);
            return 1;
        }
    }
    return 0;
}

static int64_t ro_cursor(ro *r)
{
    return q_int(r->db,
                 "SELECT CAST(value AS INTEGER) FROM de_relay_meta "
                 "WHERE key = 'cursor'",
                 0);
}

/* Events not yet published: above the cursor, or held back at or below
 * it. */
static int64_t ro_pending(ro *r, int64_t cursor)
{
    char sql[200];

    snprintf(sql, sizeof sql,
             "SELECT (SELECT count(*) FROM de_outbox WHERE position > %" PRId64
             ") + (SELECT count(*) FROM de_relay_parked)",
             cursor);
    return q_int(r->db, sql, -1);
}

static void iso_time(int64_t ms, char *buf, size_t size)
{
    time_t t = (time_t)(ms / 1000);
    struct tm tm;

    if (ms <= 0 || gmtime_r(&t, &tm) == NULL) {
        snprintf(buf, size, "-");
        return;
    }
    snprintf(buf, size, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ",
             tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour,
             tm.tm_min, tm.tm_sec, (int)(ms % 1000));
}

/* ---- relay ------------------------------------------------------------- */

static void print_stats(const de_relay_stats *st)
{
    printf("state=%s active=%d brokers_up=%" PRId64 "%s published=%" PRIu64
           " pending=%" PRIu64 " held_back=%" PRIu64
           " blocked_subjects=%" PRIu64 " lag_ms=%" PRId64 " position=%" PRId64
           " read=%" PRIu64 " deleted=%" PRIu64 " skipped=%" PRIu64
           " producer_restarts=%" PRIu64 " forgotten=%" PRIu64
           " subjects_cached=%" PRIu64 " last_error_ms=%" PRId64
           " last_error=\"%s\"\n",
           de_relay_state_name((de_relay_state)st->state), st->active,
           st->brokers_up,
           st->active && st->brokers_up == 0 ? " (no broker reachable)" : "",
           st->published, st->pending, st->held_back, st->blocked_subjects,
           st->lag_ms, st->position, st->read, st->deleted, st->skipped,
           st->producer_restarts, st->forgotten, st->subjects_cached,
           st->last_error_ms, st->last_error);
    fflush(stdout);
}

/* Who holds the lease of a relay state file, for the standby line. */
/* A PostgreSQL relay's lease holder (pid 0: none known) and the number of
 * events pending (the result; -1 when it cannot be read), from the facts
 * status prints. */
static int64_t pg_relay_facts(const char *conninfo, int64_t *pid, char *host,
                              size_t size)
{
    status_facts f;
    int64_t pending = -1;
    pgt *p = NULL;

    memset(&f, 0, sizeof f);
    if (pid != NULL)
        *pid = 0;
    if (pgt_open("relay", conninfo, 1, &p) != 0)
        return -1;
    if (pgt_status("relay", p, &f) == 0) {
        pending = f.pending;
        if (pid != NULL && f.hb >= 0) {
            *pid = f.pid;
            snprintf(host, size, "%s", f.host);
        }
    }
    json_decref(f.blocked);
    pgt_close(p);
    return pending;
}

/* Who holds the relay lease of db (pg: a PostgreSQL conninfo), in words. */
static void lease_holder(const char *db, int pg, const char *state, char *buf,
                         size_t size)
{
    char host[256];
    ro r;
    int64_t pid;

    snprintf(buf, size, "another relay");
    if (pg) {
        pg_relay_facts(db, &pid, host, sizeof host);
        if (pid > 0)
            snprintf(buf, size, "the relay with pid %" PRId64 " on %s", pid,
                     host[0] ? host : "?");
        return;
    }
    if (ro_open("relay", db, state, &r) != 0)
        return;
    pid = q_int(r.db, "SELECT pid FROM de_relay_lease WHERE id = 1", 0);
    q_text(r.db, "SELECT host FROM de_relay_lease WHERE id = 1", host,
           sizeof host);
    if (pid > 0)
        snprintf(buf, size, "the relay with pid %" PRId64 " on %s", pid,
                 host[0] ? host : "?");
    ro_close(&r);
}

/* ---- relay --metrics: /metrics and /healthz --------------------------- */

/* Progress as the main loop sees it, for /healthz (libmicrohttpd's
 * thread). */
typedef struct health {
    pthread_mutex_t mu;
    de_relay *r;
    long stall_ms;
    uint64_t published;
    int64_t changed_ms; /* monotonic: when published last moved */
} health;

static void health_note(health *h, const de_relay_stats *st)
{
    pthread_mutex_lock(&h->mu);
    if (st->published != h->published || st->pending == 0) {
        h->published = st->published;
        h->changed_ms = mono_ms();
    }
    pthread_mutex_unlock(&h->mu);
}

/* 200 with "ok ..." or 503 with why, into buf. */
static unsigned health_check(health *h, char *buf, size_t size)
{
    de_relay_stats st;
    int64_t idle;

    if (de_relay_stats_get(h->r, &st) != DE_OK) {
        snprintf(buf, size, "unavailable: %s\n", de_errmsg());
        return MHD_HTTP_SERVICE_UNAVAILABLE;
    }
    health_note(h, &st);
    pthread_mutex_lock(&h->mu);
    idle = mono_ms() - h->changed_ms;
    pthread_mutex_unlock(&h->mu);
    if (st.state == DE_RELAY_STOPPED || st.state == DE_RELAY_REFUSED) {
        snprintf(buf, size, "%s\n",
                 de_relay_state_name((de_relay_state)st.state));
        return MHD_HTTP_SERVICE_UNAVAILABLE;
    }
    if (st.pending > 0 && idle >= h->stall_ms) {
        snprintf(buf, size,
                 "stalled: %" PRIu64 " events pending, none published for "
                 "%" PRId64 " ms; brokers_up=%" PRId64 " last_error=\"%s\"\n",
                 st.pending, idle, st.brokers_up, st.last_error);
        return MHD_HTTP_SERVICE_UNAVAILABLE;
    }
    snprintf(buf, size, "ok: %s, %" PRIu64 " events pending\n",
             de_relay_state_name((de_relay_state)st.state), st.pending);
    return MHD_HTTP_OK;
}

static enum MHD_Result serve(void *cls, struct MHD_Connection *conn,
                             const char *url, const char *method,
                             const char *version, const char *upload,
                             size_t *upload_size, void **req)
{
    health *h = cls;
    struct MHD_Response *resp;
    char small[768], *text = small;
    size_t len = 0;
    unsigned status = MHD_HTTP_OK;
    const char *type = "text/plain; charset=utf-8";
    enum MHD_Result ret;

    (void)version;
    (void)upload;
    (void)upload_size;
    (void)req;
    if (strcmp(method, "GET") != 0 && strcmp(method, "HEAD") != 0) {
        snprintf(small, sizeof small, "method %s not allowed\n", method);
        status = MHD_HTTP_METHOD_NOT_ALLOWED;
    } else if (strcmp(url, "/metrics") == 0) {
        type = "text/plain; version=0.0.4; charset=utf-8";
        if (de_relay_metrics_prometheus(h->r, NULL, 0, &len) != DE_OK &&
            len > 0 && (text = malloc(len + 1)) != NULL &&
            de_relay_metrics_prometheus(h->r, text, len + 1, &len) == DE_OK) {
            /* text holds the exposition */
        } else {
            if (text != small)
                free(text);
            text = small;
            snprintf(small, sizeof small, "metrics unavailable\n");
            status = MHD_HTTP_INTERNAL_SERVER_ERROR;
        }
    } else if (strcmp(url, "/healthz") == 0) {
        status = health_check(h, small, sizeof small);
    } else {
        snprintf(small, sizeof small,
                 "not found: %s (try /metrics or "
                 "/healthz)\n",
                 url);
        status = MHD_HTTP_NOT_FOUND;
    }
    if (text == small)
        len = strlen(small);
    resp = MHD_create_response_from_buffer(len, text, MHD_RESPMEM_MUST_COPY);
    if (text != small)
        free(text);
    if (resp == NULL)
        return MHD_NO;
    MHD_add_response_header(resp, "Content-Type", type);
    ret = MHD_queue_response(conn, status, resp);
    MHD_destroy_response(resp);
    return ret;
}

/* Starts the metrics server on spec (ADDR:PORT, IPv4), printing where it
 * listens; NULL with the reason on stderr when it cannot. */
static struct MHD_Daemon *metrics_start(const char *spec, health *h)
{
    struct sockaddr_in sa;
    char addr[64];
    const char *colon = strrchr(spec, ':');
    long port;
    struct MHD_Daemon *d;
    const union MHD_DaemonInfo *info;

    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    if (colon == NULL || (size_t)(colon - spec) >= sizeof addr ||
        parse_num("relay", "--metrics port", colon + 1, 0, 65535, &port) != 0) {
        fprintf(stderr,
                "deliveryevents: relay: --metrics takes ADDR:PORT, e.g. "
                "127.0.0.1:9464, got '%s'\n",
                spec);
        return NULL;
    }
    memcpy(addr, spec, (size_t)(colon - spec));
    addr[colon - spec] = '\0';
    if (inet_pton(AF_INET, addr[0] ? addr : "0.0.0.0", &sa.sin_addr) != 1) {
        fprintf(stderr,
                "deliveryevents: relay: --metrics address '%s' is not an "
                "IPv4 address\n",
                addr);
        return NULL;
    }
    sa.sin_port = htons((uint16_t)port);
    d = MHD_start_daemon(
        MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_ERROR_LOG, (uint16_t)port,
        NULL, NULL, serve, h, MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&sa,
        MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)10, MHD_OPTION_END);
    if (d == NULL) {
        fprintf(stderr,
                "deliveryevents: relay: cannot serve metrics on %s: %s\n", spec,
                strerror(errno));
        return NULL;
    }
    info = MHD_get_daemon_info(d, MHD_DAEMON_INFO_BIND_PORT);
    fprintf(stderr,
            "deliveryevents: relay: metrics on http://%s:%u/metrics and "
            "/healthz\n",
            addr[0] ? addr : "0.0.0.0", info ? info->port : (unsigned)port);
    return d;
}

static int cmd_relay(int argc, char **argv)
{
    const char *db = NULL, *state_path = NULL, *metrics = NULL, *v;
    long stats_ms = 0, stop_ms = 10000, stall_ms = 60000;
    int once = 0, flushed = 0, stopping = 0, said_standby = 0, said_active = 0;
    int progress = 0, pg = 0;
    char where[600];
    int64_t started, deadline = 0, next_stats = 0, next_progress = 0;
    health h = {PTHREAD_MUTEX_INITIALIZER, NULL, 0, 0, 0};
    struct MHD_Daemon *httpd = NULL;
    de_conf *conf;
    de_relay *r = NULL;
    de_relay_stats st;
    de_err err;
    int rc = 0;

    if (wants_help(argc, argv, usage_relay))
        return 0;
    conf = de_conf_new();
    if (conf == NULL) {
        fprintf(stderr, "deliveryevents: relay: out of memory\n");
        return 1;
    }
    de_conf_set_log_cb(conf, log_line, NULL);
    props p = {"relay", conf, NULL};
    if (props_from_env(&p) != 0) {
        de_conf_destroy(conf);
        return 2;
    }
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--once") == 0 || strcmp(a, "--drain") == 0) {
            once = 1;
            continue;
        }
        if (strcmp(a, "--db") != 0 && strcmp(a, "--pg") != 0 &&
            !is_props_option(a) && strcmp(a, "--stats-ms") != 0 &&
            strcmp(a, "--stop-timeout-ms") != 0 &&
            strcmp(a, "--metrics") != 0 && strcmp(a, "--stall-ms") != 0) {
            de_conf_destroy(conf);
            return bad_usage("relay", "unknown argument '%s'", a);
        }
        if ((v = opt_value("relay", argc, argv, &i)) == NULL) {
            de_conf_destroy(conf);
            return 2;
        }
        if (strcmp(a, "--db") == 0 || strcmp(a, "--pg") == 0) {
            db = v;
            pg = strcmp(a, "--pg") == 0 || is_pg_uri(v);
        } else if (strcmp(a, "--metrics") == 0) {
            metrics = v;
        } else if (strcmp(a, "--stall-ms") == 0) {
            if (parse_num("relay", a, v, 1, INT_MAX, &stall_ms) != 0) {
                de_conf_destroy(conf);
                return 2;
            }
        } else if (is_props_option(a)) {
            if ((rc = props_option(&p, a, v)) != 0) {
                de_conf_destroy(conf);
                return rc;
            }
        } else if (parse_num("relay", a, v, 0, INT_MAX,
                             strcmp(a, "--stats-ms") == 0 ? &stats_ms
                                                          : &stop_ms) != 0) {
            de_conf_destroy(conf);
            return 2;
        }
    }
    wipe_x_values(argc, argv);
    if (db == NULL) {
        de_conf_destroy(conf);
        return bad_usage("relay", "needs --db PATH or --pg CONNINFO%s", "");
    }
    snprintf(where, sizeof where, "%s", db);
    if (pg) {
        /* Reachable, and named without its password from here on; a
         * malformed conninfo is bad usage (2). */
        pgt *pgc = NULL;
        if ((rc = pgt_open("relay", db, 1, &pgc)) != 0) {
            de_conf_destroy(conf);
            return rc;
        }
        snprintf(where, sizeof where, "%s", pgt_name(pgc));
        pgt_close(pgc);
    }
    state_path = de_conf_get(conf, "relay.state.path");
    if (state_path != NULL && state_path[0] == '\0')
        state_path = NULL;
    /* The stats line, the metrics and the progress line say whether a
     * broker is reachable: that needs librdkafka's statistics, which the
     * library runs only when asked. */
    if ((stats_ms > 0 || metrics != NULL || (once && isatty(2))) &&
        de_conf_get(conf, "statistics.interval.ms") == NULL &&
        de_conf_set(conf, "statistics.interval.ms", "1000") != DE_OK) {
        fprintf(stderr, "deliveryevents: relay: %s\n", de_errmsg());
        de_conf_destroy(conf);
        return 1;
    }
    catch_signals();
    err =
        pg ? pgt_relay_start(db, conf, &r) : de_relay_start_path(db, conf, &r);
    de_conf_destroy(conf);
    if (err != DE_OK) {
        fprintf(stderr, "deliveryevents: relay: %s: %s\n", de_err_name(err),
                de_errmsg());
        return 1;
    }
    started = mono_ms();
    next_stats = started + stats_ms;
    h.r = r;
    h.stall_ms = stall_ms;
    h.changed_ms = started;
    if (metrics != NULL && (httpd = metrics_start(metrics, &h)) == NULL) {
        (void)de_relay_stop(r, 0);
        return 1;
    }
    /* A drain on a terminal shows its progress on one line. */
    progress = once && isatty(2);
    next_progress = started + 1000;
    /*
     * Waits in slices of at most 100 ms, never in one unbounded call, so
     * that SIGINT and SIGTERM are seen however long Kafka takes: the
     * first flushes for up to --stop-timeout-ms, a second stops at once.
     */
    for (;;) {
        int64_t now = mono_ms();
        int slice = 100;

        if (signals_seen >= 2 || (stopping && stop_ms == 0))
            break;
        if (signals_seen == 1 && !stopping) {
            stopping = 1;
            deadline = now + stop_ms;
            if (stop_ms > 0)
                fprintf(stderr,
                        "deliveryevents: relay: stopping: publishing what is "
                        "committed for up to %ld ms (signal again to stop at "
                        "once)\n",
                        stop_ms);
            continue;
        }
        if (stopping && now >= deadline)
            break;
        if (stopping && deadline - now < slice)
            slice = (int)(deadline - now);
        if (stats_ms > 0 && next_stats - now < slice)
            slice = next_stats > now ? (int)(next_stats - now) : 0;
        if (stopping || once) {
            err = de_relay_flush(r, slice);
            if (err == DE_OK) {
                flushed = 1;
                break;
            }
            if (err != DE_ERR_TIMEOUT) {
                fprintf(stderr, "deliveryevents: relay: %s\n", de_errmsg());
                rc = 1;
                break;
            }
        } else if (slice > 0) {
            poll(NULL, 0, slice);
        }
        if (de_relay_stats_get(r, &st) != DE_OK)
            continue;
        health_note(&h, &st);
        if (st.state == DE_RELAY_REFUSED) {
            /* It will not publish until an operator acts; the library
             * logged why. */
            fprintf(stderr,
                    "deliveryevents: relay: refused to publish %s (see the "
                    "message above); exiting\n",
                    where);
            rc = 1;
            break;
        }
        now = mono_ms();
        if (progress && now >= next_progress) {
            fprintf(stderr,
                    "\rdeliveryevents: relay: %s, %" PRIu64
                    " published, %" PRIu64 " pending%s   ",
                    de_relay_state_name((de_relay_state)st.state), st.published,
                    st.pending,
                    st.active && st.brokers_up == 0 ? ", no broker reachable"
                                                    : "");
            next_progress = now + 1000;
            progress = 2; /* a line to end */
        }
        if (st.state == DE_RELAY_STANDBY && !said_standby && !said_active &&
            now - started >= 1000) {
            char who[300];
            lease_holder(db, pg, state_path, who, sizeof who);
            fprintf(stderr,
                    "deliveryevents: relay: standing by: %s holds the lease "
                    "of %s; taking over when it stops\n",
                    who, where);
            said_standby = 1;
        } else if (st.state == DE_RELAY_ACTIVE && !said_active) {
            fprintf(stderr, "deliveryevents: relay: active: publishing %s\n",
                    where);
            said_active = 1;
        } else if (st.state == DE_RELAY_STANDBY && said_active) {
            said_active = 0; /* lost the lease; the library logged it */
        }
        if (stats_ms > 0 && now >= next_stats) {
            print_stats(&st);
            next_stats = now + stats_ms;
        }
    }
    if (progress == 2)
        fputc('\n', stderr);
    if (stats_ms > 0 && de_relay_stats_get(r, &st) == DE_OK)
        print_stats(&st);
    if (httpd != NULL)
        MHD_stop_daemon(httpd);
    err = de_relay_stop(r, 0);
    if (err == DE_ERR_STATE || err == DE_ERR_DB) {
        fprintf(stderr, "deliveryevents: relay: %s\n", de_errmsg());
        rc = 1;
    }
    /* DE_ERR_DB: all published, the final checkpoint failed; the state's
     * count would call pending what was published, and the message said
     * what stays in the outbox. */
    if (err != DE_ERR_DB) {
        ro rs;
        int64_t pending = -1;
        if (pg) {
            pending = pg_relay_facts(db, NULL, NULL, 0);
        } else if (ro_open("relay", db, state_path, &rs) == 0) {
            pending = ro_pending(&rs, ro_cursor(&rs));
            ro_close(&rs);
        }
        if (pending < 0)
            fprintf(stderr,
                    "deliveryevents: relay: stopped; cannot count the events "
                    "pending in %s\n",
                    where);
        else
            fprintf(stderr,
                    "deliveryevents: relay: stopped; %" PRId64
                    " events pending in the outbox of %s%s\n",
                    pending, where,
                    pending > 0 ? " (the next relay publishes them)" : "");
        if ((once || stopping) && !flushed)
            rc = 1;
    }
    return rc;
}

/* ---- replay ------------------------------------------------------------ */

static const char usage_replay[] =
    "usage: deliveryevents replay (--db PATH | --pg CONNINFO)\n"
    "                             (--subject TYPE:ID | --from POSITION |\n"
    "                             --since TIME) [-b SERVERS] [-X "
    "key=value]...\n"
    "                             [--config FILE] [--timeout-ms N]\n"
    "  Republishes retained events (outbox.retention.ms) to Kafka with their\n"
    "  original ce_id, ce_subjectepoch and ce_subjectseq: consumers that\n"
    "  applied them count them as duplicates; a reset consumer applies them\n"
    "  again.  Refuses, publishing nothing, when a selected event is no\n"
    "  longer retained or has no recorded numbers, or when nothing selected\n"
    "  is published yet (the relay publishes it).  Takes no lease.\n"
    "  --db PATH            the service's database file (required)\n"
    "  --pg CONNINFO        a PostgreSQL database instead (a libpq\n"
    "                       connection string or URI; --db postgresql://...\n"
    "                       works too): de_replay_pg\n"
    "  --subject TYPE:ID    one subject's retained events, e.g. "
    "delivery:D-7\n"
    "  --from POSITION      the retained events from this outbox position "
    "on\n"
    "  --since TIME         the retained events recorded since TIME:\n"
    "                       2026-11-25T11:00:00Z (or +01:00, or a date), "
    "or a\n"
    "                       time ago: 90s, 15m, 2h, 1d\n"
    "  -b SERVERS           Kafka bootstrap servers (= -X "
    "bootstrap.servers=SERVERS)\n"
    "  -X key=value         a librdkafka property, relay.state.path or "
    "a wire\n"
    "                       setting; repeatable; key=@FILE reads the\n"
    "                       value from FILE\n"
    "  --config FILE        key=value lines (and DELIVERYEVENTS_X_<KEY>\n"
    "                       environment variables), as for relay\n"
    "  --timeout-ms N       wait up to N ms for Kafka's acknowledgements "
    "(60000)\n"
    "  Events the relay has not published yet are left to it.\n";

/* Days since 1970-01-01 of a proleptic Gregorian date. */
static int64_t days_from_civil(int64_t y, int64_t m, int64_t d)
{
    int64_t era, yoe, doy, doe;

    y -= m <= 2;
    era = (y >= 0 ? y : y - 399) / 400;
    yoe = y - era * 400;
    doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
    doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + doe - 719468;
}

/* A time for --since as Unix ms: "2026-11-25", "2026-11-25T11:00[:00[.123]]"
 * with Z or an offset (+01:00) (a space may stand for the T), or a time
 * ago: N followed by ms, s, m, h or d.  -1 when it is none of those. */
static int parse_time(const char *s, int64_t *ms)
{
    static const struct {
        const char *unit;
        int64_t ms;
    } units[] = {
        {"ms", 1}, {"s", 1000}, {"m", 60000}, {"h", 3600000}, {"d", 86400000}};
    int y, mo, d, h = 0, mi = 0, sec = 0, n = 0, frac = 0, fn = 0;
    int oh = 0, om = 0;
    const char *p;
    char *end;
    long long v;

    /* A time ago. */
    errno = 0;
    v = strtoll(s, &end, 10);
    if (end != s && s[0] >= '0' && s[0] <= '9' && errno == 0 && end[0] != '-')
        for (size_t i = 0; i < sizeof units / sizeof *units; i++)
            if (strcmp(end, units[i].unit) == 0 && v >= 0 &&
                v <= INT64_MAX / units[i].ms && v * units[i].ms < now_ms()) {
                *ms = now_ms() - v * units[i].ms;
                return 0;
            }
    /* A date, and perhaps a time of day and an offset. */
    if (sscanf(s, "%4d-%2d-%2d%n", &y, &mo, &d, &n) != 3 || n != 10 || mo < 1 ||
        mo > 12 || d < 1 || d > 31 || y < 1970)
        return -1;
    p = s + n;
    if (*p == 'T' || *p == ' ') {
        if (sscanf(p + 1, "%2d:%2d%n", &h, &mi, &n) != 2 || n != 5)
            return -1;
        p += 1 + n;
        if (*p == ':') {
            if (sscanf(p + 1, "%2d%n", &sec, &n) != 1 || n != 2)
                return -1;
            p += 1 + n;
            if (*p == '.') {
                for (p++; *p >= '0' && *p <= '9'; p++, fn++)
                    if (fn < 3)
                        frac = frac * 10 + (*p - '0');
                if (fn == 0)
                    return -1;
                for (int i = fn; i < 3; i++)
                    frac *= 10;
            }
        }
        if (h > 23 || mi > 59 || sec > 60)
            return -1;
        if (*p == 'Z') {
            p++;
        } else if (*p == '+' || *p == '-') {
            if (sscanf(p + 1, "%2d:%2d%n", &oh, &om, &n) != 2 || n != 5 ||
                oh > 23 || om > 59)
                return -1;
            if (*p == '-') {
                oh = -oh;
                om = -om;
            }
            p += 1 + n;
        } else {
            return -1; /* a time of day says which zone */
        }
    }
    if (*p != '\0')
        return -1;
    *ms = ((days_from_civil(y, mo, d) * 24 + h - oh) * 60 + mi - om) * 60000 +
          (int64_t)sec * 1000 + frac;
    return *ms >= 0 ? 0 : -1;
}

static int cmd_replay(int argc, char **argv)
{
    static const char cmd[] = "replay";
    const char *db = NULL, *subject = NULL, *v, *colon;
    char type[128], shown[600];
    long from = 0, timeout_ms = 60000;
    int64_t since = 0;
    int rc = 0, chosen = 0, pg = 0;
    pgt *conn = NULL;
    de_replay_select sel;
    de_replay_result res;
    de_conf *conf;
    de_err err;

    if (wants_help(argc, argv, usage_replay))
        return 0;
    if ((conf = de_conf_new()) == NULL) {
        fprintf(stderr, "deliveryevents: %s: out of memory\n", cmd);
        return 1;
    }
    de_conf_set_log_cb(conf, log_line, NULL);
    props p = {cmd, conf, NULL};
    rc = props_from_env(&p);
    for (int i = 0; i < argc && rc == 0; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--db") != 0 && strcmp(a, "--pg") != 0 &&
            strcmp(a, "--subject") != 0 && strcmp(a, "--from") != 0 &&
            strcmp(a, "--since") != 0 && !is_props_option(a) &&
            strcmp(a, "--timeout-ms") != 0) {
            rc = bad_usage(cmd, "unknown argument '%s'", a);
        } else if ((v = opt_value(cmd, argc, argv, &i)) == NULL) {
            rc = 2;
        } else if (strcmp(a, "--db") == 0 || strcmp(a, "--pg") == 0) {
            db = v;
            pg = strcmp(a, "--pg") == 0 || is_pg_uri(v);
        } else if (is_props_option(a)) {
            rc = props_option(&p, a, v);
        } else if (strcmp(a, "--timeout-ms") == 0) {
            rc = parse_num(cmd, a, v, 0, INT_MAX, &timeout_ms) ? 2 : 0;
        } else if (chosen++ > 0) {
            rc = bad_usage(cmd,
                           "takes one of --subject, --from and --since; "
                           "'%s' is a second",
                           a);
        } else if (strcmp(a, "--subject") == 0) {
            if (split_subject(v, &colon) != 0 ||
                (size_t)(colon - v) >= sizeof type)
                rc = bad_usage(cmd,
                               "--subject takes TYPE:ID, both non-empty "
                               "(e.g. delivery:D-7), got '%s'",
                               v);
            subject = v;
        } else if (strcmp(a, "--from") == 0) {
            rc = parse_num(cmd, a, v, 1, LONG_MAX, &from) ? 2 : 0;
        } else if (parse_time(v, &since) != 0) {
            rc = bad_usage(cmd,
                           "--since takes a time, e.g. 2026-11-25T11:00:00Z, "
                           "2026-11-25T12:00+01:00, 2026-11-25, or a time "
                           "ago such as 90s, 15m, 2h or 1d, got '%s'",
                           v);
        }
    }
    wipe_x_values(argc, argv);
    if (rc == 0 && db == NULL)
        rc = bad_usage(cmd, "needs --db PATH (or --pg CONNINFO)%s", "");
    if (rc == 0 && chosen == 0)
        rc = bad_usage(cmd,
                       "needs what to replay: --subject TYPE:ID, --from "
                       "POSITION or --since TIME%s",
                       "");
    if (rc == 0 && de_conf_get(conf, "bootstrap.servers") == NULL)
        rc = bad_usage(cmd, "needs -b SERVERS (or -X bootstrap.servers=...)%s",
                       "");
    /* A PostgreSQL target: a malformed conninfo or an unreachable
     * server said as the other commands say it. */
    snprintf(shown, sizeof shown, "%s", db ? db : "");
    if (rc == 0 && pg && (rc = pgt_open(cmd, db, 1, &conn)) == 0) {
        snprintf(shown, sizeof shown, "%s", pgt_name(conn));
        pgt_close(conn);
    }
    if (rc == 0 && !pg && (!file_exists(db) || !is_file(db))) {
        fprintf(stderr, "deliveryevents: %s: cannot open '%s': %s\n", cmd, db,
                file_exists(db) ? "not a file" : strerror(errno));
        rc = 1;
    }
    if (rc != 0) {
        de_conf_destroy(conf);
        return rc;
    }
    memset(&sel, 0, sizeof sel);
    if (subject != NULL) {
        split_subject(subject, &colon);
        snprintf(type, sizeof type, "%.*s", (int)(colon - subject), subject);
        sel.subject_type = type;
        sel.subject_id = colon + 1;
    }
    sel.from_position = from;
    sel.since_ms = since;
    err = pg ? pgt_replay(db, conf, &sel, (int)timeout_ms, &res)
             : de_replay(db, conf, &sel, (int)timeout_ms, &res);
    de_conf_destroy(conf);
    if (err == DE_ERR_ARG) /* the selection: the tool checked the rest */
        return bad_usage(cmd, "%s", de_errmsg());
    if (err != DE_OK) {
        fprintf(stderr, "deliveryevents: %s: %s: %s\n", cmd, de_err_name(err),
                de_errmsg());
        if (res.republished > 0)
            fprintf(stderr,
                    "deliveryevents: %s: %llu events were republished "
                    "(positions %lld..%lld)\n",
                    cmd, (unsigned long long)res.republished,
                    (long long)res.first_position,
                    (long long)res.last_position);
        return 1;
    }
    printf("replay: republished %llu events of %s (positions %lld..%lld) "
           "with their original ce_id and numbers",
           (unsigned long long)res.republished, shown,
           (long long)res.first_position, (long long)res.last_position);
    if (res.not_published > 0)
        printf("; %llu not published yet, left to the relay",
               (unsigned long long)res.not_published);
    printf("\n");
    return 0;
}

/* ---- tail -------------------------------------------------------------- */

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

/* The partition count of an existing topic, from the metadata of all
 * topics (asking for the topic itself could create it where the brokers
 * auto-create topics); 0 when it does not exist, -1 on an error. */
static int32_t topic_partitions(rd_kafka_t *rk, const char *topic)
{
    const struct rd_kafka_metadata *md = NULL;
    rd_kafka_resp_err_t e;
    int32_t np = 0;

    e = rd_kafka_metadata(rk, 1, NULL, &md, 10000);
    if (e != RD_KAFKA_RESP_ERR_NO_ERROR) {
        fprintf(stderr, "deliveryevents: tail: cannot read the topics: %s\n",
                rd_kafka_err2str(e));
        return -1;
    }
    for (int i = 0; i < md->topic_cnt; i++)
        if (strcmp(md->topics[i].topic, topic) == 0) {
            if (md->topics[i].err) {
                fprintf(stderr, "deliveryevents: tail: topic '%s': %s\n", topic,
                        rd_kafka_err2str(md->topics[i].err));
                np = -1;
            } else {
                np = md->topics[i].partition_cnt;
            }
        }
    rd_kafka_metadata_destroy(md);
    return np;
}

/* Writes s[0, n) for a terminal or a log: printable UTF-8 as it is; control
 * bytes, DEL, C1 controls, bytes that are not UTF-8 as \xNN, and the
 * bidirectional controls (which reorder what follows them on screen) as
 * \u{XXXX} -- a record's content cannot clear the screen, retitle the
 * window or forge a line. */
static void put_escaped(FILE *out, const char *s, size_t n)
{
    const unsigned char *p = (const unsigned char *)s;
    size_t i = 0;

    while (i < n) {
        unsigned c = p[i], len = 0, cp = 0;
        if (c >= 0x20 && c < 0x7f) {
            fputc((int)c, out);
            i++;
            continue;
        }
        if (c >= 0xc2 && c <= 0xdf)
            len = 2, cp = c & 0x1f;
        else if (c >= 0xe0 && c <= 0xef)
            len = 3, cp = c & 0x0f;
        else if (c >= 0xf0 && c <= 0xf4)
            len = 4, cp = c & 0x07;
        for (unsigned k = 1; k < len; k++) {
            if (i + k >= n || (p[i + k] & 0xc0) != 0x80) {
                len = 0;
                break;
            }
            cp = (cp << 6) | (p[i + k] & 0x3f);
        }
        if (len == 0 || (len == 3 && cp < 0x800) ||
            (len == 4 && (cp < 0x10000 || cp > 0x10ffff)) ||
            (cp >= 0xd800 && cp <= 0xdfff) || cp < 0xa0) {
            fprintf(out, "\\x%02x", c);
            i++;
        } else if (cp == 0x61c || cp == 0x200e || cp == 0x200f ||
                   (cp >= 0x202a && cp <= 0x202e) ||
                   (cp >= 0x2066 && cp <= 0x2069)) {
            fprintf(out, "\\u{%04x}", cp);
            i += len;
        } else {
            fwrite(p + i, 1, len, out);
            i += len;
        }
    }
}

static void put_escaped_str(FILE *out, const char *s)
{
    put_escaped(out, s, strlen(s));
}

/* A JSON string of s[0, n), valid whatever the bytes: what is not UTF-8
 * is written \xNN (as text). */
json_t *json_text(const char *s, size_t n)
{
    char *buf;
    FILE *f;
    size_t len = 0;
    json_t *j;

    if ((j = json_stringn(s, n)) != NULL)
        return j;
    buf = NULL;
    if ((f = open_memstream(&buf, &len)) == NULL)
        return json_null();
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c < 0x80)
            fputc(c, f);
        else
            fprintf(f, "\\x%02x", c);
    }
    fclose(f);
    j = json_stringn(buf, len);
    free(buf);
    return j ? j : json_null();
}

/* Which partitions this member reads, as a number that changes when they
 * do (-1 when unknown). */
static long assignment_sign(rd_kafka_t *rk)
{
    rd_kafka_topic_partition_list_t *mine = NULL;
    long sign = -1;

    if (rd_kafka_assignment(rk, &mine) == 0 && mine != NULL) {
        sign = mine->cnt;
        for (int k = 0; k < mine->cnt; k++)
            sign = sign * 31 + mine->elems[k].partition + 1;
        rd_kafka_topic_partition_list_destroy(mine);
    }
    return sign;
}

/* Where this member's reading of each partition it reads ends -- the
 * partition's end when the reading began -- and whether it is there
 * already: it starts from the beginning, the end, or (in a group) where
 * the group committed, or where this member has read to (next).  Returns
 * how many partitions it reads. */
static int plan_end(rd_kafka_t *rk, const char *topic, int32_t np, int in_group,
                    int from_beginning, const int64_t *next, int64_t *high,
                    char *done)
{
    rd_kafka_topic_partition_list_t *mine = NULL;
    int n = 0;

    if (rd_kafka_assignment(rk, &mine) != 0 || mine == NULL)
        return 0;
    memset(done, 1,
           (size_t)np); /* the partitions not ours: nothing to wait for */
    if (in_group && mine->cnt > 0)
        (void)rd_kafka_committed(rk, mine, 10000);
    for (int k = 0; k < mine->cnt; k++) {
        int32_t q = mine->elems[k].partition;
        int64_t lo = 0, hi = 0, start;
        if (q < 0 || q >= np ||
            rd_kafka_query_watermark_offsets(rk, topic, q, &lo, &hi, 10000))
            continue;
        start = from_beginning ? lo : hi;
        if (in_group && mine->elems[k].offset >= 0)
            start = mine->elems[k].offset;
        if (next[q] > start) /* read this far already */
            start = next[q];
        high[q] = hi;
        done[q] = start >= hi;
        n++;
    }
    rd_kafka_topic_partition_list_destroy(mine);
    return n;
}

static int cmd_tail(int argc, char **argv)
{
    const char *topic = NULL, *group = NULL, *v;
    int exit_at_end = 0, from_beginning = 0, as_json = 0, rc = 0;
    long print = -1, records = 0, events = 0, dups = 0, bad = 0, subjects = 0;
    rd_kafka_conf_t *conf;
    de_conf *dconf;
    rd_kafka_topic_partition_list_t *parts;
    struct seen **tab;
    char *done;
    int64_t *high, *next;
    int32_t np;
    int planned = 0;
    long sign = -1, now_sign;
    rd_kafka_t *rk;
    char err[512];
    props p;

    if (wants_help(argc, argv, usage_tail))
        return 0;
    conf = rd_kafka_conf_new();
    dconf = de_conf_new();
    if (conf == NULL || dconf == NULL) {
        fprintf(stderr, "deliveryevents: tail: out of memory\n");
        return 1;
    }
    p = (props){"tail", dconf, conf};
    rc = props_from_env(&p);
    for (int i = 0; i < argc && rc == 0; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--exit-at-end") == 0) {
            exit_at_end = 1;
            continue;
        }
        if (strcmp(a, "--from-beginning") == 0) {
            from_beginning = 1;
            continue;
        }
        if (strcmp(a, "--json") == 0) {
            as_json = 1;
            continue;
        }
        if (!is_props_option(a) && strcmp(a, "--topic") != 0 &&
            strcmp(a, "--print") != 0 && strcmp(a, "--group") != 0)
            rc = bad_usage("tail", "unknown argument '%s'", a);
        else if ((v = opt_value("tail", argc, argv, &i)) == NULL)
            rc = 2;
        else if (strcmp(a, "--topic") == 0)
            topic = v;
        else if (strcmp(a, "--group") == 0)
            group = v;
        else if (strcmp(a, "--print") == 0)
            rc = parse_num("tail", a, v, 0, LONG_MAX, &print) ? 2 : 0;
        else
            rc = props_option(&p, a, v);
    }
    wipe_x_values(argc, argv);
    if (rc == 0 &&
        (de_conf_get(dconf, "bootstrap.servers") == NULL || topic == NULL))
        rc = bad_usage("tail", "needs -b SERVERS and --topic NAME%s", "");
    if (rc == 0 && group != NULL && group[0] == '\0')
        rc = bad_usage("tail", "--group takes a group id, got '%s'", group);
    /* A group resumes where it committed; without one nothing is
     * committed, and the start is the end unless --from-beginning. */
    if (rc == 0 &&
        (rd_kafka_conf_set(conf, "group.id",
                           group ? group : "deliveryevents-tail", err,
                           sizeof err) != RD_KAFKA_CONF_OK ||
         rd_kafka_conf_set(conf, "enable.auto.commit", group ? "true" : "false",
                           err, sizeof err) != RD_KAFKA_CONF_OK ||
         rd_kafka_conf_set(conf, "auto.offset.reset",
                           from_beginning ? "earliest" : "latest", err,
                           sizeof err) != RD_KAFKA_CONF_OK)) {
        fprintf(stderr, "deliveryevents: tail: %s\n", err);
        rc = 2;
    }
    if (rc != 0) {
        rd_kafka_conf_destroy(conf);
        de_conf_destroy(dconf);
        return rc;
    }
    /* Line by line, also into a pipe: whoever reads sees each event. */
    setvbuf(stdout, NULL, _IOLBF, 0);
    rk = rd_kafka_new(RD_KAFKA_CONSUMER, conf, err, sizeof err);
    if (rk == NULL) {
        fprintf(stderr, "deliveryevents: tail: %s\n", err);
        rd_kafka_conf_destroy(conf);
        de_conf_destroy(dconf);
        return 1;
    }
    np = topic_partitions(rk, topic);
    if (np <= 0) {
        if (np == 0)
            fprintf(stderr,
                    "deliveryevents: tail: topic '%s' does not exist on %s\n",
                    topic, de_conf_get(dconf, "bootstrap.servers"));
        rd_kafka_destroy(rk);
        de_conf_destroy(dconf);
        return 1;
    }
    de_conf_destroy(dconf);
    done = calloc((size_t)np, 1);
    high = calloc((size_t)np, sizeof *high);
    next = calloc((size_t)np, sizeof *next);
    tab = calloc(SEEN_BUCKETS, sizeof *tab);
    parts = rd_kafka_topic_partition_list_new(np);
    if (done == NULL || high == NULL || next == NULL || tab == NULL ||
        parts == NULL) {
        fprintf(stderr, "deliveryevents: tail: out of memory\n");
        rd_kafka_destroy(rk);
        return 1;
    }
    if (group != NULL) {
        rd_kafka_topic_partition_list_add(parts, topic, RD_KAFKA_PARTITION_UA);
        rd_kafka_subscribe(rk, parts);
    } else {
        for (int32_t q = 0; q < np; q++)
            rd_kafka_topic_partition_list_add(parts, topic, q)->offset =
                from_beginning ? RD_KAFKA_OFFSET_BEGINNING
                               : RD_KAFKA_OFFSET_END;
        rd_kafka_assign(rk, parts);
    }
    rd_kafka_topic_partition_list_destroy(parts);
    catch_signals();
    while (!stop_signal) {
        rd_kafka_message_t *m = rd_kafka_consumer_poll(rk, 200);
        rd_kafka_headers_t *h = NULL;
        char stype[130], sid[300], subject[440], seqs[32], epochs[32],
            type[300], time[40], id[80];
        struct seen *sn;
        long long seq, epoch;
        const char *what, *status;
        int gap = 0;

        if (exit_at_end && m == NULL) {
            /* At the end of every partition this member reads (a group's
             * partitions arrive, or change, with a rebalance). */
            int all = 1;
            if ((now_sign = assignment_sign(rk)) != sign) {
                sign = now_sign;
                planned = plan_end(rk, topic, np, group != NULL, from_beginning,
                                   next, high, done);
            }
            for (int32_t q = 0; q < np; q++)
                if (!done[q])
                    all = 0;
            if (planned > 0 && all)
                break;
        }
        if (m == NULL)
            continue;
        if (m->err) {
            rd_kafka_message_destroy(m);
            continue;
        }
        if (m->partition >= 0 && m->partition < np) {
            next[m->partition] = m->offset + 1;
            if (m->offset + 1 >= high[m->partition])
                done[m->partition] = 1;
        }
        records++;
        rd_kafka_message_headers(m, &h);
        if (!hdr(h, "ce_subjecttype", stype, sizeof stype) ||
            !hdr(h, "ce_subject", sid, sizeof sid) ||
            !hdr(h, "ce_subjectseq", seqs, sizeof seqs) ||
            !hdr(h, "ce_type", type, sizeof type) ||
            !hdr(h, "ce_time", time, sizeof time)) {
            if (as_json) {
                json_t *o =
                    json_pack("{s:s, s:i, s:I, s:s}", "topic", topic,
                              "partition", (int)m->partition, "offset",
                              (json_int_t)m->offset, "status", "foreign");
                json_dumpf(o, stdout, JSON_COMPACT);
                fputc('\n', stdout);
                json_decref(o);
            } else {
                printf("p%d@%lld: not a deliveryevents record\n",
                       (int)m->partition, (long long)m->offset);
            }
            bad++;
            rd_kafka_message_destroy(m);
            continue;
        }
        /* A subject is its type and id: delivery/X-1 and rider/X-1 are
         * numbered apart, even on one topic. */
        snprintf(subject, sizeof subject, "%s/%s", stype, sid);
        seq = strtoll(seqs, NULL, 10);
        epoch = hdr(h, "ce_subjectepoch", epochs, sizeof epochs)
                    ? strtoll(epochs, NULL, 10)
                    : 0;
        sn = seen_get(tab, subject);
        if (sn && sn->last == 0)
            subjects++;
        what = "";
        status = "ok";
        /* In order: the next number of the numbering, or 1 in a newer
         * numbering (ce_subjectepoch: the subject was idle).  Read from
         * the end, a subject's first event shows where it stands. */
        if (sn == NULL || (epoch == sn->epoch && seq == sn->last + 1) ||
            (epoch > sn->epoch && seq == 1) ||
            (sn->last == 0 && !from_beginning)) {
            events++;
            if (sn) {
                sn->epoch = epoch;
                sn->last = seq;
            }
        } else if (epoch < sn->epoch ||
                   (epoch == sn->epoch && seq <= sn->last)) {
            dups++;
            what = "  (duplicate: already seen)";
            status = "duplicate";
        } else {
            bad++;
            gap = 1;
            what = "  (GAP: an earlier event is missing)";
            status = "gap";
        }
        if (as_json) {
            json_t *o = json_pack(
                "{s:s, s:i, s:I, s:o, s:o, s:I, s:I, s:o, s:o, s:s}", "topic",
                topic, "partition", (int)m->partition, "offset",
                (json_int_t)m->offset, "subject_type",
                json_text(stype, strlen(stype)), "subject_id",
                json_text(sid, strlen(sid)), "seq", (json_int_t)seq, "epoch",
                (json_int_t)epoch, "type", json_text(type, strlen(type)),
                "time", json_text(time, strlen(time)), "status", status);
            if (o != NULL && hdr(h, "ce_id", id, sizeof id))
                json_object_set_new(o, "id", json_text(id, strlen(id)));
            if (o != NULL) {
                json_t *data =
                    json_loadb((const char *)m->payload, m->len,
                               JSON_DECODE_ANY | JSON_ALLOW_NUL, NULL);
                json_object_set_new(
                    o, "data",
                    data ? data : json_text((const char *)m->payload, m->len));
                json_dumpf(o, stdout, JSON_COMPACT);
                fputc('\n', stdout);
                json_decref(o);
            }
        } else if (print < 0 || records <= print || gap) {
            printf("p%d@%-6lld ", (int)m->partition, (long long)m->offset);
            put_escaped_str(stdout, subject);
            printf(" #%-3lld ", seq);
            put_escaped_str(stdout, type);
            fputc(' ', stdout);
            put_escaped_str(stdout, time);
            fputc(' ', stdout);
            put_escaped(stdout, (const char *)m->payload, m->len);
            printf("%s\n", what);
        }
        rd_kafka_message_destroy(m);
    }
    fprintf(as_json ? stderr : stdout,
            "tail: %ld records on %s: %ld events of %ld subjects in order, "
            "%ld duplicates, %ld out of order or foreign\n",
            records, topic, events, subjects, dups, bad);
    rd_kafka_consumer_close(rk);
    rd_kafka_destroy(rk);
    free(done);
    free(high);
    free(next);
    for (int i = 0; i < SEEN_BUCKETS; i++)
        while (tab[i]) {
            struct seen *n = tab[i]->next;
            free(tab[i]);
            tab[i] = n;
        }
    free(tab);
    return bad ? 3 : 0;
}

/* ---- mock-cluster ------------------------------------------------------ */

/* Splits "NAME[:PARTITIONS]" into name (a copy: argv is what ps shows)
 * and partitions (1 when absent); -1 when malformed. */
static int topic_spec(const char *spec, char *name, size_t size, long *parts)
{
    const char *colon = strrchr(spec, ':');
    size_t n = colon ? (size_t)(colon - spec) : strlen(spec);

    *parts = 1;
    if (n == 0 || n >= size)
        return -1;
    memcpy(name, spec, n);
    name[n] = '\0';
    if (colon == NULL)
        return 0;
    return parse_num(NULL, "--topic", colon + 1, 1, 100000, parts);
}

static int cmd_mock_cluster(int argc, char **argv)
{
    long brokers = 3, parts;
    int until_eof = 0;
    rd_kafka_conf_t *conf;
    rd_kafka_mock_cluster_t *mc;
    rd_kafka_t *rk;
    char err[512], name[256];
    const char *v;

    if (wants_help(argc, argv, usage_mock))
        return 0;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--until-stdin-eof") == 0) {
            until_eof = 1;
            continue;
        }
        if (strcmp(a, "--brokers") != 0 && strcmp(a, "--topic") != 0)
            return bad_usage("mock-cluster", "unknown argument '%s'", a);
        if ((v = opt_value("mock-cluster", argc, argv, &i)) == NULL)
            return 2;
        if (strcmp(a, "--brokers") == 0) {
            if (parse_num("mock-cluster", a, v, 1, 100, &brokers) != 0)
                return 2;
        } else if (topic_spec(v, name, sizeof name, &parts) != 0) {
            /* checked here, created below once the cluster exists */
            return bad_usage("mock-cluster",
                             "--topic takes NAME[:PARTITIONS], got '%s'", v);
        }
    }
    /* Die with the parent that started us, never linger as an orphan. */
    if (until_eof)
        prctl(PR_SET_PDEATHSIG, SIGTERM);
    conf = rd_kafka_conf_new();
    rd_kafka_conf_set(conf, "log_level", "0", err, sizeof err);
    rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, err, sizeof err);
    if (rk == NULL) {
        fprintf(stderr, "deliveryevents: mock-cluster: %s\n", err);
        return 1;
    }
    mc = rd_kafka_mock_cluster_new(rk, (int)brokers);
    if (mc == NULL) {
        fprintf(stderr,
                "deliveryevents: mock-cluster: cannot start the cluster\n");
        rd_kafka_destroy(rk);
        return 1;
    }
    for (int i = 0; i < argc; i++) {
        if (strcmp(argv[i], "--topic") == 0) {
            if (topic_spec(argv[++i], name, sizeof name, &parts) != 0 ||
                rd_kafka_mock_topic_create(mc, name, (int)parts, 1) != 0) {
                fprintf(stderr,
                        "deliveryevents: mock-cluster: cannot create topic "
                        "'%s'\n",
                        argv[i]);
                rd_kafka_mock_cluster_destroy(mc);
                rd_kafka_destroy(rk);
                return 1;
            }
        } else if (strcmp(argv[i], "--brokers") == 0) {
            i++;
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

/* ---- the read-only commands: status, list (consumer-status, below) ----- */

/*
 * The read-only commands (status, list, consumer-status, dead-letters)
 * share one skeleton, ro_main: --help, the arguments, the database opened
 * read-only (with its relay state, or as a consumer's), the command's own
 * report, the database closed.  Each command states only what differs: its
 * usage, the options it takes beyond --db and --json, and its report.
 */

/* Options a read-only command may take beyond --db and --json. */
enum {
    RO_STATE = 1 << 0,   /* --state PATH */
    RO_SUBJECT = 1 << 1, /* --subject TYPE:ID */
    RO_LIMIT = 1 << 2,   /* --limit N (100; 0 = all) */
    RO_FILTER = 1 << 3,  /* --pending | --blocked */
    RO_PARKED = 1 << 4,  /* --parked */
    RO_NO_JSON = 1 << 5  /* no --json: the output is JSON already */
};

struct ro_args {
    const char *db, *state, *subject;
    int json, pending, blocked, parked;
    int pg; /* db is a PostgreSQL conninfo (--pg, or a URI) */
    long limit;
};

typedef struct ro_cmd {
    const char *name;
    const char *usage;
    unsigned opts; /* RO_* */
    int consumer;  /* a consumer's database, not an outbox */
    int pg;        /* works on PostgreSQL too */
    int (*report)(const char *cmd, const struct ro_args *a, ro *r);
} ro_cmd;

/* Whether o is a flag c takes; sets it. */
static int ro_flag(const ro_cmd *c, const char *o, struct ro_args *a)
{
    int *flag =
        !(c->opts & RO_NO_JSON) && strcmp(o, "--json") == 0    ? &a->json
        : (c->opts & RO_FILTER) && strcmp(o, "--pending") == 0 ? &a->pending
        : (c->opts & RO_FILTER) && strcmp(o, "--blocked") == 0 ? &a->blocked
        : (c->opts & RO_PARKED) && strcmp(o, "--parked") == 0  ? &a->parked
                                                               : NULL;

    if (flag != NULL)
        *flag = 1;
    return flag != NULL;
}

/* Whether o is an option with a value that c takes. */
static int ro_option(const ro_cmd *c, const char *o)
{
    return strcmp(o, "--db") == 0 || strcmp(o, "--pg") == 0 ||
           ((c->opts & RO_STATE) && strcmp(o, "--state") == 0) ||
           ((c->opts & RO_SUBJECT) && strcmp(o, "--subject") == 0) ||
           ((c->opts & RO_LIMIT) && strcmp(o, "--limit") == 0);
}

static int ro_args_parse(const ro_cmd *c, int argc, char **argv,
                         struct ro_args *a)
{
    const char *cmd = c->name, *v, *colon;

    memset(a, 0, sizeof *a);
    a->limit = 100;
    for (int i = 0; i < argc; i++) {
        const char *o = argv[i];
        if (ro_flag(c, o, a))
            continue;
        if (!ro_option(c, o))
            return bad_usage(cmd, "unknown argument '%s'", o);
        if ((v = opt_value(cmd, argc, argv, &i)) == NULL)
            return 2;
        if (strcmp(o, "--db") == 0 || strcmp(o, "--pg") == 0) {
            a->db = v;
            a->pg = strcmp(o, "--pg") == 0 || is_pg_uri(v);
        } else if (strcmp(o, "--state") == 0) {
            a->state = v;
        } else if (strcmp(o, "--subject") == 0) {
            if (split_subject(v, &colon) != 0)
                return bad_usage(cmd, "--subject takes TYPE:ID, got '%s'", v);
            a->subject = v;
        } else if (parse_num(cmd, o, v, 0, LONG_MAX, &a->limit) != 0) {
            return 2;
        }
    }
    if (a->pending && a->blocked)
        return bad_usage(cmd, "--pending and --blocked exclude each other%s",
                         "");
    if (a->db == NULL)
        return bad_usage(cmd, "needs --db PATH (or --pg CONNINFO)%s", "");
    if (a->pg && a->state != NULL)
        return bad_usage(cmd,
                         "--state is for SQLite; on PostgreSQL the relay's "
                         "state is in the database ('%s')",
                         a->state);
    if (a->pg && !c->pg)
        return bad_usage(cmd, "does not read PostgreSQL databases yet ('%s')",
                         a->db);
    return 0;
}

static int consumer_ro_open(const char *cmd, const char *path, ro *r);
static void print_json_line(json_t *o);

/* The skeleton of every read-only command. */
static int ro_main(const ro_cmd *c, int argc, char **argv)
{
    struct ro_args a;
    ro r;
    int rc;

    if (wants_help(argc, argv, c->usage))
        return 0;
    if ((rc = ro_args_parse(c, argc, argv, &a)) != 0)
        return rc;
    if (a.pg) {
        memset(&r, 0, sizeof r);
        if ((rc = pgt_open(c->name, a.db, 1, &r.pg)) != 0)
            return rc;
        r.db_path = pgt_name(r.pg);
    } else if ((c->consumer ? consumer_ro_open(c->name, a.db, &r)
                            : ro_open(c->name, a.db, a.state, &r)) != 0) {
        return 1;
    }
    if (a.json) {
        rc = c->report(c->name, &a, &r);
    } else {
        /* Text reports pass through put_escaped, line by line: the
         * databases hold what writers put there -- and dead letters what
         * any producer of a shared topic did. */
        FILE *saved = stdout, *mem;
        char *text = NULL;
        size_t len = 0;
        if ((mem = open_memstream(&text, &len)) == NULL) {
            ro_close(&r);
            fprintf(stderr, "deliveryevents: %s: out of memory\n", c->name);
            return 1;
        }
        stdout = mem;
        rc = c->report(c->name, &a, &r);
        fclose(mem);
        stdout = saved;
        for (size_t i = 0; i < len;) {
            const char *nl = memchr(text + i, '\n', len - i);
            size_t n = nl ? (size_t)(nl - (text + i)) : len - i;
            put_escaped(stdout, text + i, n);
            if (nl)
                fputc('\n', stdout);
            i += n + 1;
        }
        free(text);
    }
    ro_close(&r);
    return rc;
}

static void put_int(json_t *o, const char *k, int64_t v)
{
    json_object_set_new(o, k, json_integer((json_int_t)v));
}

/* Any bytes: what is not UTF-8 is kept as \xNN text (json_text). */
static void put_str(json_t *o, const char *k, const char *v)
{
    json_object_set_new(o, k, v ? json_text(v, strlen(v)) : json_null());
}

/* Sizes: -1 (JSON null, text "none") for a file that does not exist. */
static void put_size(json_t *o, const char *k, int64_t v)
{
    json_object_set_new(o, k,
                        v >= 0 ? json_integer((json_int_t)v) : json_null());
}

static void age(int64_t now, int64_t then, char *buf, size_t size)
{
    if (then <= 0)
        snprintf(buf, size, "-");
    else
        snprintf(buf, size, "%.1f s ago", (double)(now - then) / 1000.0);
}

json_t *blocked_entry(const char *type, const char *id, int64_t held_back,
                      int64_t since_ms, const char *error, int64_t position)
{
    json_t *b = json_object();

    put_str(b, "subject_type", type);
    put_str(b, "subject_id", id);
    put_int(b, "held_back", held_back);
    put_int(b, "since_ms", since_ms);
    put_str(b, "error", error);
    put_int(b, "position", position);
    return b;
}

/* status's facts from the SQLite files. */
static void status_sqlite(const struct ro_args *a, ro *r, status_facts *f)
{
    char path[PATH_MAX + 64], buf[300];
    sqlite3_stmt *st = NULL;

    memset(f, 0, sizeof *f);
    f->database = a->db;
    f->relay_state = r->state_path;
    f->has_state = r->has_state;
    f->epoch = -1;
    f->cursor = ro_cursor(r);
    f->pending = ro_pending(r, f->cursor);
    f->rows = q_int(r->db, "SELECT count(*) FROM de_outbox", 0);
    snprintf(buf, sizeof buf,
             "SELECT min(recorded_at_ms) FROM de_outbox WHERE position > "
             "%" PRId64 " OR position IN (SELECT position FROM "
             "de_relay_parked)",
             f->cursor);
    f->oldest = q_int(r->db, buf, 0);
    snprintf(buf, sizeof buf,
             "SELECT recorded_at_ms FROM de_outbox WHERE position = %" PRId64,
             f->cursor);
    f->cursor_at = q_int(r->db, buf, 0);
    f->last_ms = q_int(r->db, "SELECT max(last_ms) FROM de_relay_seq", 0);
    f->deleted_upto = q_int(r->db,
                            "SELECT CAST(value AS INTEGER) FROM main.de_meta "
                            "WHERE key = 'relay_deleted_upto'",
                            0);
    f->v_outbox = q_int(r->db,
                        "SELECT value FROM main.de_meta WHERE key = "
                        "'schema_version'",
                        0);
    f->v_state = q_int(r->db,
                       "SELECT value FROM de_relay_meta WHERE key = "
                       "'schema_version'",
                       0);
    f->pid = q_int(r->db, "SELECT pid FROM de_relay_lease WHERE id = 1", 0);
    f->hb = q_int(r->db, "SELECT heartbeat_ms FROM de_relay_lease WHERE id = 1",
                  -1);
    f->acquired =
        q_int(r->db, "SELECT acquired_ms FROM de_relay_lease WHERE id = 1", 0);
    f->lease_now = now_ms();
    q_text(r->db, "SELECT host FROM de_relay_lease WHERE id = 1", f->host,
           sizeof f->host);
    q_text(r->db, "SELECT owner FROM de_relay_lease WHERE id = 1", f->owner,
           sizeof f->owner);
    f->parked = q_int(r->db, "SELECT count(*) FROM de_relay_parked", 0);
    f->nblocked = q_int(r->db,
                        "SELECT count(*) FROM (SELECT DISTINCT subject_type, "
                        "subject_id FROM de_relay_parked)",
                        0);
    f->min_pos = q_int(r->db, "SELECT min(position) FROM de_outbox", 0);
    f->max_pos = q_int(r->db, "SELECT max(position) FROM de_outbox", 0);
    f->sz_db = file_size(a->db);
    snprintf(path, sizeof path, "%s-wal", a->db);
    f->sz_wal = file_size(path);
    f->sz_state = file_size(r->state_path);
    snprintf(path, sizeof path, "%s-wal", r->state_path);
    f->sz_state_wal = file_size(path);
    /* The state names the outbox it belongs to (its de_meta outbox_id). */
    q_text(r->db, "SELECT value FROM main.de_meta WHERE key = 'outbox_id'",
           f->outbox_id, sizeof f->outbox_id);
    q_text(r->db, "SELECT value FROM de_relay_meta WHERE key = 'outbox_id'",
           f->state_outbox_id, sizeof f->state_outbox_id);
    q_text(r->db,
           "SELECT value FROM de_relay_meta WHERE key = 'cursor_event_id'",
           f->cursor_event_id, sizeof f->cursor_event_id);
    f->blocked = json_array();
    if (sqlite3_prepare_v2(
            r->db,
            "SELECT subject_type, subject_id, count(*), min(since_ms), "
            "(SELECT error FROM de_relay_parked p2 WHERE p2.subject_type = "
            "p.subject_type AND p2.subject_id = p.subject_id ORDER BY "
            "position LIMIT 1), min(position) FROM de_relay_parked p GROUP "
            "BY subject_type, subject_id ORDER BY min(position)",
            -1, &st, NULL) == SQLITE_OK)
        while (sqlite3_step(st) == SQLITE_ROW)
            json_array_append_new(
                f->blocked,
                blocked_entry((const char *)sqlite3_column_text(st, 0),
                              (const char *)sqlite3_column_text(st, 1),
                              sqlite3_column_int64(st, 2),
                              sqlite3_column_int64(st, 3),
                              (const char *)sqlite3_column_text(st, 4),
                              sqlite3_column_int64(st, 5)));
    sqlite3_finalize(st);
}

/* status's output, JSON or text, whichever backend gathered f. */
static int status_print(const char *cmd, const struct ro_args *a,
                        status_facts *f)
{
    char t1[64], t2[64];
    int64_t now = now_ms();
    json_t *o, *lease, *files, *blocked = f->blocked, *schema;
    int state_matches;

    state_matches = !f->has_state || f->state_outbox_id[0] == '\0' ||
                    strcmp(f->outbox_id, f->state_outbox_id) == 0;
    o = json_object();
    put_str(o, "database", f->database);
    put_str(o, "backend", f->pg ? "postgresql" : "sqlite");
    put_str(o, "relay_state", f->relay_state);
    json_object_set_new(o, "relay_state_found", json_boolean(f->has_state));
    put_str(o, "outbox_id", f->outbox_id[0] ? f->outbox_id : NULL);
    json_object_set_new(o, "relay_state_matches", json_boolean(state_matches));
    put_int(o, "pending", f->pending);
    put_int(o, "oldest_pending_recorded_at_ms", f->oldest);
    put_int(o, "oldest_pending_age_ms", f->oldest > 0 ? now - f->oldest : 0);
    put_int(o, "cursor", f->cursor);
    put_str(o, "cursor_event_id",
            f->cursor_event_id[0] ? f->cursor_event_id : NULL);
    put_int(o, "cursor_recorded_at_ms", f->cursor_at);
    put_int(o, "last_numbered_at_ms", f->last_ms);
    put_int(o, "outbox_rows", f->rows);
    put_int(o, "outbox_min_position", f->min_pos);
    put_int(o, "outbox_max_position", f->max_pos);
    put_int(o, "deleted_upto", f->deleted_upto);
    lease = json_object();
    if (f->hb >= 0) {
        put_str(lease, "owner", f->owner);
        put_int(lease, "pid", f->pid);
        put_str(lease, "host", f->host);
        put_int(lease, "acquired_at_ms", f->acquired);
        put_int(lease, "heartbeat_at_ms", f->hb);
        /* On the clock the lease is kept on (PostgreSQL: the server's). */
        put_int(lease, "heartbeat_age_ms",
                f->hb > 0 ? f->lease_now - f->hb : -1);
        json_object_set_new(lease, "released", json_boolean(f->hb == 0));
        if (f->epoch >= 0)
            put_int(lease, "epoch", f->epoch);
    }
    json_object_set_new(o, "lease", f->hb >= 0 ? lease : json_null());
    if (f->hb < 0)
        json_decref(lease);
    put_int(o, "blocked_subjects", f->nblocked);
    put_int(o, "held_back", f->parked);
    json_object_set_new(o, "blocked", blocked);
    schema = json_object();
    put_int(schema, "outbox", f->v_outbox);
    if (f->has_state)
        put_int(schema, "relay_state", f->v_state);
    else
        json_object_set_new(schema, "relay_state", json_null());
    json_object_set_new(o, "schema_version", schema);
    files = json_object();
    put_size(files, "database", f->sz_db);
    put_size(files, "database_wal", f->sz_wal);
    put_size(files, "relay_state", f->sz_state);
    put_size(files, "relay_state_wal", f->sz_state_wal);
    json_object_set_new(o, "file_bytes", files);

    if (a->json) {
        char *s = json_dumps(o, JSON_COMPACT);
        if (s == NULL) {
            json_decref(o);
            fprintf(stderr, "deliveryevents: %s: out of memory\n", cmd);
            return 1;
        }
        printf("%s\n", s);
        free(s);
        json_decref(o);
        return 0;
    }
    if (f->pg) {
        printf("database:        PostgreSQL %s (%" PRId64 " bytes)\n",
               f->database, f->sz_db);
        printf("relay state:     %s%s\n", f->relay_state,
               f->has_state ? ""
                            : " (none: no relay has run; every row is "
                              "pending)");
    } else {
        printf("database:        %s (%" PRId64 " bytes, wal %" PRId64
               " bytes)\n",
               f->database, f->sz_db, f->sz_wal > 0 ? f->sz_wal : 0);
        if (f->has_state)
            printf("relay state:     %s (%" PRId64 " bytes, wal %" PRId64
                   " bytes)\n",
                   f->relay_state, f->sz_state,
                   f->sz_state_wal > 0 ? f->sz_state_wal : 0);
        else
            printf("relay state:     %s (none: no relay has run; every row "
                   "is pending)\n",
                   f->relay_state);
    }
    if (f->has_state)
        printf("schema versions: outbox %" PRId64 ", relay state %" PRId64 "\n",
               f->v_outbox, f->v_state);
    else
        printf("schema versions: outbox %" PRId64 ", relay state -\n",
               f->v_outbox);
    if (!state_matches)
        printf("WARNING:         the relay state belongs to another outbox "
               "(a copy or a predecessor of this database): a relay "
               "refuses it\n");
    printf("outbox rows:     %" PRId64 " retained (positions %" PRId64
           "..%" PRId64 "; deleted up to %" PRId64 ")\n",
           f->rows, f->min_pos, f->max_pos, f->deleted_upto);
    age(now, f->oldest, t1, sizeof t1);
    printf("pending:         %" PRId64 " (oldest recorded %s)\n", f->pending,
           f->oldest > 0 ? t1 : "-");
    iso_time(f->cursor_at, t1, sizeof t1);
    age(now, f->cursor_at, t2, sizeof t2);
    printf("cursor:          %" PRId64 " (published or held back up to "
           "here; event %s recorded %s, %s)\n",
           f->cursor, f->cursor_event_id[0] ? f->cursor_event_id : "-", t1, t2);
    iso_time(f->last_ms, t1, sizeof t1);
    printf("last numbered:   %s\n", t1);
    if (f->hb < 0) {
        printf("lease:           none (no relay has held it)\n");
    } else {
        age(f->lease_now, f->hb, t1, sizeof t1);
        printf("lease:           %s by pid %" PRId64 " on %s (heartbeat "
               "%s)",
               f->hb == 0 ? "released, last held" : "held", f->pid,
               f->host[0] ? f->host : "?", f->hb == 0 ? "-" : t1);
        if (f->epoch >= 0)
            printf(", epoch %" PRId64, f->epoch);
        printf("\n");
    }
    printf("blocked:         %" PRId64 " subjects, %" PRId64
           " events held back\n",
           f->nblocked, f->parked);
    for (size_t i = 0; i < json_array_size(blocked); i++) {
        json_t *b = json_array_get(blocked, i);
        iso_time(json_integer_value(json_object_get(b, "since_ms")), t1,
                 sizeof t1);
        printf("  %s/%s: %" PRId64 " events from position %" PRId64
               " since %s: %s\n",
               json_string_value(json_object_get(b, "subject_type")),
               json_string_value(json_object_get(b, "subject_id")),
               (int64_t)json_integer_value(json_object_get(b, "held_back")),
               (int64_t)json_integer_value(json_object_get(b, "position")), t1,
               json_is_string(json_object_get(b, "error"))
                   ? json_string_value(json_object_get(b, "error"))
                   : "-");
    }
    json_decref(o);
    return 0;
}

static int status_report(const char *cmd, const struct ro_args *a, ro *r)
{
    status_facts f;

    memset(&f, 0, sizeof f);
    if (r->pg != NULL) {
        if (pgt_status(cmd, r->pg, &f) != 0) {
            json_decref(f.blocked);
            return 1;
        }
    } else {
        status_sqlite(a, r, &f);
    }
    return status_print(cmd, a, &f);
}

/* One outbox row, as a JSON line or a text row. */
static void ol_emit(const ol_row *o, void *ctx)
{
    const struct ro_args *a = ctx;
    char t[64];

    if (a->json) {
        json_t *j = json_object();
        put_int(j, "position", o->position);
        put_str(j, "event_id", o->event_id);
        put_str(j, "subject_type", o->subject_type);
        put_str(j, "subject_id", o->subject_id);
        put_str(j, "action", o->action);
        put_int(j, "version", o->version);
        put_int(j, "recorded_at_ms", o->recorded_at_ms);
        put_str(j, "status", o->status);
        if (o->error != NULL)
            put_str(j, "error", o->error);
        print_json_line(j);
        json_decref(j);
    } else {
        char subject[300];
        snprintf(subject, sizeof subject, "%s/%s", o->subject_type,
                 o->subject_id);
        iso_time(o->recorded_at_ms, t, sizeof t);
        printf("%-10lld %-36s %-24s %-12s %-3d %-24s %s%s%s\n",
               (long long)o->position, o->event_id, subject, o->action,
               (int)o->version, t, o->status, o->error ? ": " : "",
               o->error ? o->error : "");
    }
}

/* The retained rows of a SQLite outbox; how many, or -1. */
static long list_sqlite(const char *cmd, const struct ro_args *a, ro *r)
{
    sqlite3_stmt *st = NULL;
    const char *colon;
    int64_t cursor;
    long n = 0;
    int rc;

    cursor = ro_cursor(r);
    if (sqlite3_prepare_v2(
            r->db,
            "SELECT o.position, o.event_id, o.subject_type, o.subject_id, "
            "o.action, o.version, o.recorded_at_ms, CASE WHEN p.position "
            "IS NOT NULL THEN 'held-back' WHEN o.position > ?1 THEN "
            "'pending' ELSE 'published' END, p.error FROM de_outbox o LEFT "
            "JOIN de_relay_parked p ON p.position = o.position WHERE (?2 IS "
            "NULL OR (o.subject_type = ?2 AND o.subject_id = ?3)) AND (?4 = "
            "0 OR o.position > ?1 OR p.position IS NOT NULL) AND (?5 = 0 OR "
            "p.position IS NOT NULL) ORDER BY o.position LIMIT ?6",
            -1, &st, NULL) != SQLITE_OK) {
        fprintf(stderr, "deliveryevents: %s: %s\n", cmd, sqlite3_errmsg(r->db));
        return -1;
    }
    sqlite3_bind_int64(st, 1, cursor);
    if (a->subject != NULL) {
        colon = strchr(a->subject, ':');
        sqlite3_bind_text(st, 2, a->subject, (int)(colon - a->subject),
                          SQLITE_STATIC);
        sqlite3_bind_text(st, 3, colon + 1, -1, SQLITE_STATIC);
    }
    sqlite3_bind_int(st, 4, a->pending);
    sqlite3_bind_int(st, 5, a->blocked);
    sqlite3_bind_int64(st, 6, a->limit > 0 ? a->limit : -1);
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        ol_row o = {
            .position = sqlite3_column_int64(st, 0),
            .event_id = (const char *)sqlite3_column_text(st, 1),
            .subject_type = (const char *)sqlite3_column_text(st, 2),
            .subject_id = (const char *)sqlite3_column_text(st, 3),
            .action = (const char *)sqlite3_column_text(st, 4),
            .version = sqlite3_column_int64(st, 5),
            .recorded_at_ms = sqlite3_column_int64(st, 6),
            .status = (const char *)sqlite3_column_text(st, 7),
            .error = (const char *)sqlite3_column_text(st, 8),
        };
        n++;
        ol_emit(&o, (void *)(uintptr_t)a);
    }
    sqlite3_finalize(st);
    if (rc != SQLITE_DONE) {
        fprintf(stderr, "deliveryevents: %s: %s\n", cmd, sqlite3_errmsg(r->db));
        return -1;
    }
    return n;
}

static int list_report(const char *cmd, const struct ro_args *a, ro *r)
{
    const char *colon = NULL;
    long n;

    if (!a->json)
        printf("%-10s %-36s %-24s %-12s %-3s %-24s %s\n", "POSITION",
               "EVENT_ID", "SUBJECT", "ACTION", "V", "RECORDED", "STATUS");
    if (a->subject != NULL)
        colon = strchr(a->subject, ':');
    n = r->pg != NULL
            ? pgt_list(cmd, r->pg, a->subject,
                       colon ? (int)(colon - a->subject) : 0,
                       colon ? colon + 1 : NULL, a->pending, a->blocked,
                       a->limit, ol_emit, (void *)(uintptr_t)a)
            : list_sqlite(cmd, a, r);
    if (n < 0)
        return 1;
    if (!a->json && a->limit > 0 && n == a->limit)
        printf("(first %ld rows; --limit 0 for all)\n", n);
    return 0;
}

/* ---- the consumer's database: consumer-status, dead-letters ------------ */

/*
 * A consumer keeps its bookkeeping in its own database (lib/inbox_sqlite.c):
 * de_inbox (a row per subject remembered, parked = 1 while the subject is
 * parked), de_dead_letter (kind failed, waiting, gap, conflict or foreign;
 * state parked, applied, skipped, duplicate or foreign) and
 * de_consumer_meta (the
 * schema version).  From version 4 on it also has de_consumer_request,
 * where release and skip ask the running consumer to act.  Both reading
 * commands open the file as status does: read-only, creating nothing.
 */

static int has_table(sqlite3 *db, const char *name)
{
    char sql[200];

    snprintf(sql, sizeof sql,
             "SELECT count(*) FROM main.sqlite_master WHERE type = 'table' "
             "AND name = '%s'",
             name);
    return q_int(db, sql, 0) > 0;
}

/* Opens a consumer's database read-only; 0, or 1 after saying why not. */
static int consumer_ro_open(const char *cmd, const char *path, ro *r)
{
    if (ro_open_file(cmd, path, r) != 0)
        return 1;
    if (!has_table(r->db, "de_inbox") || !has_table(r->db, "de_dead_letter")) {
        fprintf(stderr,
                "deliveryevents: %s: '%s' has no consumer tables (no "
                "de_inbox or de_dead_letter table)%s%s\n",
                cmd, path, sqlite3_errcode(r->db) ? ": " : "",
                sqlite3_errcode(r->db) ? sqlite3_errmsg(r->db) : "");
        ro_close(r);
        return 1;
    }
    return 0;
}

/* "coalesce(epoch, 0)", or "0" for a database older than schema 3. */
static const char *dl_epoch_expr(sqlite3 *db)
{
    return q_int(db,
                 "SELECT count(*) FROM pragma_table_info('de_dead_letter') "
                 "WHERE name = 'epoch'",
                 0) > 0
               ? "coalesce(epoch, 0)"
               : "0";
}

static const char usage_consumer_status[] =
    "usage: deliveryevents consumer-status (--db PATH | --pg CONNINFO) "
    "[--json]\n"
    "  Read-only report of a consumer's database: schema version, subjects\n"
    "  remembered, parked subjects, dead letters by kind and state, the\n"
    "  oldest dead letter, queued release/skip requests, file sizes.\n"
    "  Creates and changes nothing.\n"
    "  --db PATH       the consumer's database file (required)\n"
    "  --pg CONNINFO   a PostgreSQL database instead (a libpq connection\n"
    "                  string or URI; --db postgresql://... works too)\n"
    "  --json          one JSON object instead of text\n";

static const char usage_dead_letters[] =
    "usage: deliveryevents dead-letters (--db PATH | --pg CONNINFO)\n"
    "                                   [--subject TYPE:ID] "
    "[--parked]\n"
    "                                   [--limit N] [--json]\n"
    "  Read-only list of a consumer's dead letters (de_dead_letter), oldest\n"
    "  first: subject, epoch/seq, ce_id, kind, state (parked, applied,\n"
    "  skipped, duplicate, foreign), when, attempts, error.\n"
    "  --db PATH          the consumer's database file (required)\n"
    "  --pg CONNINFO      a PostgreSQL database instead (a libpq "
    "connection\n"
    "                     string or URI; --db postgresql://... works too)\n"
    "  --subject TYPE:ID  only this subject's dead letters, e.g. "
    "delivery:D-7\n"
    "  --parked           only those still parked (waiting for release or "
    "skip)\n"
    "  --limit N          at most N rows (100; 0 = all)\n"
    "  --json             one JSON object per line\n";

static void print_json_line(json_t *o)
{
    char *s = json_dumps(o, JSON_COMPACT);

    printf("%s\n", s ? s : "{}");
    free(s);
}

json_t *by_kind_entry(const char *kind, const char *state, int64_t count,
                      int64_t oldest_at_ms)
{
    json_t *b = json_object();

    put_str(b, "kind", kind);
    put_str(b, "state", state);
    put_int(b, "count", count);
    put_int(b, "oldest_at_ms", oldest_at_ms);
    return b;
}

json_t *parked_entry(const char *type, const char *id, int64_t events,
                     int64_t since_ms, const char *kind, const char *error)
{
    json_t *b = json_object();

    put_str(b, "subject_type", type);
    put_str(b, "subject_id", id);
    put_int(b, "parked_events", events);
    put_int(b, "since_ms", since_ms);
    put_str(b, "kind", kind);
    put_str(b, "error", error && error[0] ? error : NULL);
    return b;
}

/* consumer-status's facts from a consumer's SQLite file. */
static void consumer_sqlite(const struct ro_args *a, ro *r, consumer_facts *f)
{
    char path[PATH_MAX + 16];
    sqlite3_stmt *st = NULL;

    memset(f, 0, sizeof *f);
    f->database = a->db;
    f->queued = -1;
    f->version = q_int(r->db,
                       "SELECT value FROM main.de_consumer_meta WHERE key = "
                       "'schema_version'",
                       0);
    f->subjects = q_int(r->db, "SELECT count(*) FROM de_inbox", 0);
    f->parked =
        q_int(r->db, "SELECT count(*) FROM de_inbox WHERE parked = 1", 0);
    f->dl_total = q_int(r->db, "SELECT count(*) FROM de_dead_letter", 0);
    f->dl_parked = q_int(
        r->db, "SELECT count(*) FROM de_dead_letter WHERE state = 'parked'", 0);
    f->oldest = q_int(r->db, "SELECT min(parked_ms) FROM de_dead_letter", 0);
    f->oldest_parked = q_int(r->db,
                             "SELECT min(parked_ms) FROM de_dead_letter WHERE "
                             "state = 'parked'",
                             0);
    f->has_requests = has_table(r->db, "de_consumer_request");
    if (f->has_requests) {
        f->queued = q_int(r->db,
                          "SELECT count(*) FROM de_consumer_request WHERE "
                          "done_at_ms IS NULL",
                          0);
        f->oldest_queued = q_int(r->db,
                                 "SELECT min(requested_at_ms) FROM "
                                 "de_consumer_request WHERE done_at_ms IS NULL",
                                 0);
    }
    f->sz_db = file_size(a->db);
    snprintf(path, sizeof path, "%s-wal", a->db);
    f->sz_wal = file_size(path);
    f->by = json_array();
    if (sqlite3_prepare_v2(r->db,
                           "SELECT kind, state, count(*), min(parked_ms) FROM "
                           "de_dead_letter GROUP BY kind, state ORDER BY "
                           "kind, state",
                           -1, &st, NULL) == SQLITE_OK)
        while (sqlite3_step(st) == SQLITE_ROW)
            json_array_append_new(
                f->by, by_kind_entry((const char *)sqlite3_column_text(st, 0),
                                     (const char *)sqlite3_column_text(st, 1),
                                     sqlite3_column_int64(st, 2),
                                     sqlite3_column_int64(st, 3)));
    sqlite3_finalize(st);
    st = NULL;
    /* The parked subjects, first parked first: their parked events and the
     * first one's kind and error. */
    f->plist = json_array();
    if (sqlite3_prepare_v2(
            r->db,
            "SELECT i.subject_type, i.subject_id, (SELECT count(*) FROM "
            "de_dead_letter d WHERE d.subject_type = i.subject_type AND "
            "d.subject_id = i.subject_id AND d.state = 'parked'), (SELECT "
            "min(parked_ms) FROM de_dead_letter d WHERE d.subject_type = "
            "i.subject_type AND d.subject_id = i.subject_id AND d.state = "
            "'parked'), (SELECT kind || char(9) || coalesce(error, '') FROM "
            "de_dead_letter d WHERE d.subject_type = i.subject_type AND "
            "d.subject_id = i.subject_id AND d.state = 'parked' ORDER BY id "
            "LIMIT 1) FROM de_inbox i WHERE i.parked = 1 ORDER BY 4, 1, 2",
            -1, &st, NULL) == SQLITE_OK)
        while (sqlite3_step(st) == SQLITE_ROW) {
            const char *ke = (const char *)sqlite3_column_text(st, 4);
            const char *tab = ke ? strchr(ke, '\t') : NULL;
            char kind[64];
            snprintf(kind, sizeof kind, "%.*s", tab ? (int)(tab - ke) : 0,
                     tab ? ke : "");
            json_array_append_new(
                f->plist,
                parked_entry((const char *)sqlite3_column_text(st, 0),
                             (const char *)sqlite3_column_text(st, 1),
                             sqlite3_column_int64(st, 2),
                             sqlite3_column_int64(st, 3), tab ? kind : NULL,
                             tab ? tab + 1 : NULL));
        }
    sqlite3_finalize(st);
}

/* consumer-status's output, JSON or text, whichever backend gathered f. */
static int consumer_status_print(const struct ro_args *a, consumer_facts *f)
{
    char t1[64], t2[64];
    int64_t now = now_ms();
    json_t *o, *files, *by = f->by, *plist = f->plist;

    o = json_object();
    put_str(o, "database", f->database);
    put_int(o, "schema_version", f->version);
    put_int(o, "subjects", f->subjects);
    put_int(o, "parked_subjects", f->parked);
    put_int(o, "dead_letters", f->dl_total);
    put_int(o, "dead_letters_parked", f->dl_parked);
    put_int(o, "oldest_dead_letter_at_ms", f->oldest);
    put_int(o, "oldest_dead_letter_age_ms",
            f->oldest > 0 ? now - f->oldest : 0);
    put_int(o, "oldest_parked_at_ms", f->oldest_parked);
    put_int(o, "oldest_parked_age_ms",
            f->oldest_parked > 0 ? now - f->oldest_parked : 0);
    json_object_set_new(o, "dead_letters_by_kind", by);
    json_object_set_new(o, "parked", plist);
    if (f->has_requests) {
        put_int(o, "requests_queued", f->queued);
        put_int(o, "oldest_request_at_ms", f->oldest_queued);
    } else {
        json_object_set_new(o, "requests_queued", json_null());
    }
    files = json_object();
    put_size(files, "database", f->sz_db);
    put_size(files, "database_wal", f->sz_wal);
    json_object_set_new(o, "file_bytes", files);

    if (a->json) {
        print_json_line(o);
        json_decref(o);
        return 0;
    }
    if (f->sz_wal < 0 && a->pg)
        printf("database:        PostgreSQL %s (%" PRId64 " bytes)\n",
               f->database, f->sz_db);
    else
        printf("database:        %s (%" PRId64 " bytes, wal %" PRId64
               " bytes)\n",
               f->database, f->sz_db, f->sz_wal > 0 ? f->sz_wal : 0);
    printf("schema version:  consumer %" PRId64 "%s\n", f->version,
           f->has_requests ? ""
                           : " (no request table: release and skip from "
                             "the command line need 1.0)");
    printf("subjects:        %" PRId64 " remembered, %" PRId64 " parked\n",
           f->subjects, f->parked);
    age(now, f->oldest, t1, sizeof t1);
    age(now, f->oldest_parked, t2, sizeof t2);
    printf("dead letters:    %" PRId64 " (%" PRId64 " still parked; oldest "
           "%s, oldest parked %s)\n",
           f->dl_total, f->dl_parked, t1, t2);
    for (size_t i = 0; i < json_array_size(by); i++) {
        json_t *b = json_array_get(by, i);
        printf("  %-10s %-8s %" PRId64 "\n",
               json_string_value(json_object_get(b, "kind")),
               json_string_value(json_object_get(b, "state")),
               (int64_t)json_integer_value(json_object_get(b, "count")));
    }
    for (size_t i = 0; i < json_array_size(plist); i++) {
        json_t *b = json_array_get(plist, i);
        json_t *err = json_object_get(b, "error");
        iso_time(json_integer_value(json_object_get(b, "since_ms")), t1,
                 sizeof t1);
        if (i == 20) {
            printf("  ... %zu more parked subjects (dead-letters --parked "
                   "lists them)\n",
                   json_array_size(plist) - i);
            break;
        }
        printf("  parked %s:%s: %" PRId64 " events since %s, first %s%s%s\n",
               json_string_value(json_object_get(b, "subject_type")),
               json_string_value(json_object_get(b, "subject_id")),
               (int64_t)json_integer_value(json_object_get(b, "parked_events")),
               t1,
               json_is_string(json_object_get(b, "kind"))
                   ? json_string_value(json_object_get(b, "kind"))
                   : "-",
               json_is_string(err) ? ": " : "",
               json_is_string(err) ? json_string_value(err) : "");
    }
    if (f->has_requests) {
        age(now, f->oldest_queued, t1, sizeof t1);
        printf("requests:        %" PRId64 " queued for the consumer "
               "(oldest %s)\n",
               f->queued, t1);
    }
    json_decref(o);
    return 0;
}

static int consumer_status_report(const char *cmd, const struct ro_args *a,
                                  ro *r)
{
    consumer_facts f;

    memset(&f, 0, sizeof f);
    if (r->pg != NULL) {
        if (pgt_consumer_status(cmd, r->pg, &f) != 0) {
            json_decref(f.by);
            json_decref(f.plist);
            return 1;
        }
    } else {
        consumer_sqlite(a, r, &f);
    }
    return consumer_status_print(a, &f);
}

/* One dead letter, as a JSON line or a text row. */
static void dl_emit(const dl_row *d, void *ctx)
{
    const struct ro_args *a = ctx;
    char t[64];

    if (a->json) {
        json_t *o = json_object();
        put_int(o, "id", d->id);
        put_str(o, "kind", d->kind);
        put_str(o, "state", d->state);
        put_str(o, "subject_type", d->subject_type);
        put_str(o, "subject_id", d->subject_id);
        if (d->subject_type != NULL && d->numbered) {
            put_int(o, "epoch", d->epoch);
            put_int(o, "seq", d->seq);
        } else {
            json_object_set_new(o, "epoch", json_null());
            json_object_set_new(o, "seq", json_null());
        }
        put_str(o, "event_id", d->event_id);
        put_str(o, "action", d->action);
        put_str(o, "type", d->type);
        put_str(o, "topic", d->topic);
        put_int(o, "partition", d->partition);
        put_int(o, "offset", d->offset);
        put_str(o, "error", d->error);
        put_int(o, "attempts", d->attempts);
        put_int(o, "parked_at_ms", d->parked_at_ms);
        print_json_line(o);
        json_decref(o);
    } else {
        char subject[300], num[48];
        if (d->subject_type != NULL) {
            snprintf(subject, sizeof subject, "%s:%s", d->subject_type,
                     d->subject_id ? d->subject_id : "");
            /* An event without a sequence: "-". */
            if (d->numbered)
                snprintf(num, sizeof num, "%lld/%lld", (long long)d->epoch,
                         (long long)d->seq);
            else
                snprintf(num, sizeof num, "-");
        } else {
            /* A record that is not ours: where it was read. */
            snprintf(subject, sizeof subject, "%s[%d]@%lld",
                     d->topic ? d->topic : "?", (int)d->partition,
                     (long long)d->offset);
            snprintf(num, sizeof num, "-");
        }
        iso_time(d->parked_at_ms, t, sizeof t);
        printf("%-6lld %-24s %-28s %-9s %-8s %-8s %-36s %s\n", (long long)d->id,
               t, subject, num, d->kind ? d->kind : "-",
               d->state ? d->state : "-", d->event_id ? d->event_id : "-",
               d->error ? d->error : "");
    }
}

/* The dead letters of a consumer's SQLite file; how many, or -1. */
static long dead_letters_sqlite(const char *cmd, const struct ro_args *a, ro *r)
{
    sqlite3_stmt *st = NULL;
    char sql[1200];
    const char *colon = NULL;
    long n = 0;
    int rc;

    snprintf(sql, sizeof sql,
             "SELECT id, kind, state, subject_type, subject_id, %s, seq, "
             "event_id, action, type, topic, partition, offset, error, "
             "attempts, parked_ms FROM de_dead_letter WHERE (?1 IS NULL OR "
             "(subject_type = ?1 AND subject_id = ?2)) AND (?3 = 0 OR state "
             "= 'parked') ORDER BY id LIMIT ?4",
             dl_epoch_expr(r->db));
    if (sqlite3_prepare_v2(r->db, sql, -1, &st, NULL) != SQLITE_OK) {
        fprintf(stderr, "deliveryevents: %s: %s\n", cmd, sqlite3_errmsg(r->db));
        return -1;
    }
    if (a->subject != NULL) {
        split_subject(a->subject, &colon);
        sqlite3_bind_text(st, 1, a->subject, (int)(colon - a->subject),
                          SQLITE_STATIC);
        sqlite3_bind_text(st, 2, colon + 1, -1, SQLITE_STATIC);
    }
    sqlite3_bind_int(st, 3, a->parked);
    sqlite3_bind_int64(st, 4, a->limit > 0 ? a->limit : -1);
#define COL_TEXT(i) ((const char *)sqlite3_column_text(st, (i)))
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        dl_row d = {
            .id = sqlite3_column_int64(st, 0),
            .kind = COL_TEXT(1),
            .state = COL_TEXT(2),
            .subject_type = COL_TEXT(3),
            .subject_id = COL_TEXT(4),
            .epoch = sqlite3_column_int64(st, 5),
            .seq = sqlite3_column_int64(st, 6),
            .numbered = sqlite3_column_type(st, 6) != SQLITE_NULL,
            .event_id = COL_TEXT(7),
            .action = COL_TEXT(8),
            .type = COL_TEXT(9),
            .topic = COL_TEXT(10),
            .partition = sqlite3_column_int64(st, 11),
            .offset = sqlite3_column_int64(st, 12),
            .error = COL_TEXT(13),
            .attempts = sqlite3_column_int64(st, 14),
            .parked_at_ms = sqlite3_column_int64(st, 15),
        };
        n++;
        dl_emit(&d, (void *)(uintptr_t)a);
    }
#undef COL_TEXT
    sqlite3_finalize(st);
    if (rc != SQLITE_DONE) {
        fprintf(stderr, "deliveryevents: %s: %s\n", cmd, sqlite3_errmsg(r->db));
        return -1;
    }
    return n;
}

static int dead_letters_report(const char *cmd, const struct ro_args *a, ro *r)
{
    const char *colon = NULL;
    long n;

    if (!a->json)
        printf("%-6s %-24s %-28s %-9s %-8s %-8s %-36s %s\n", "ID", "WHEN",
               "SUBJECT", "EPOCH/SEQ", "KIND", "STATE", "CE_ID", "ERROR");
    if (a->subject != NULL)
        split_subject(a->subject, &colon);
    n = r->pg != NULL
            ? pgt_dead_letters(cmd, r->pg, a->subject,
                               colon ? (int)(colon - a->subject) : 0,
                               colon ? colon + 1 : NULL, a->parked, a->limit,
                               dl_emit, (void *)(uintptr_t)a)
            : dead_letters_sqlite(cmd, a, r);
    if (n < 0)
        return 1;
    if (!a->json && a->limit > 0 && n == a->limit)
        printf("(first %ld rows; --limit 0 for all)\n", n);
    return 0;
}

/* ---- release and skip: asking the running consumer ---------------------- */

/*
 * A parked subject is released or skipped by its consumer, which has the
 * handlers (de_consumer_release, de_consumer_skip).  From the command
 * line the tool can only ask: it inserts a row into de_consumer_request
 * (consumer schema 4, libdeliveryevents 1.0), which the running consumer
 * takes on its next de_consumer_poll, in id order; it sets done_at_ms and
 * its result, which the tool waits for.  Parked is what the library calls
 * it: the subject's de_inbox row has parked = 1, or it has dead letters
 * still in state 'parked'.  The tool never creates tables.
 */

static const char usage_release[] =
    "usage: deliveryevents release (--db PATH | --pg CONNINFO) TYPE:ID\n"
    "                              [--wait MS] [--force]\n"
    "  Asks the running consumer of PATH to release a parked subject: to\n"
    "  apply its parked events again, in order, with its handlers\n"
    "  (de_consumer_release).  Needs a consumer of libdeliveryevents 1.0 or\n"
    "  later (consumer schema 4: the de_consumer_request table).\n"
    "  --db PATH     the consumer's database file (required)\n"
    "  --pg CONNINFO a PostgreSQL database instead (a libpq connection\n"
    "                string or URI; --db postgresql://... works too):\n"
    "                the row goes to deliveryevents.inbox_request\n"
    "  TYPE:ID       the subject, e.g. delivery:D-7 (required)\n"
    "  --wait MS     wait up to MS ms for the consumer's result (30000;\n"
    "                0: queue the request and return at once)\n"
    "  --force       ask even if the subject does not look parked\n"
    "  Prints the consumer's result; exit 1 if it answers that the subject\n"
    "  is still parked or the request failed, or if it did not take the\n"
    "  request in time (the request stays queued).\n";

static const char usage_skip[] =
    "usage: deliveryevents skip (--db PATH | --pg CONNINFO) TYPE:ID\n"
    "                           [--wait MS] [--force]\n"
    "  Asks the running consumer of PATH to skip the event that parked a\n"
    "  subject (kept in de_dead_letter, marked skipped) and apply the\n"
    "  rest, in order, with its handlers (de_consumer_skip).  Needs a\n"
    "  consumer of libdeliveryevents 1.0 or later (consumer schema 4: the\n"
    "  de_consumer_request table).\n"
    "  --db PATH     the consumer's database file (required)\n"
    "  --pg CONNINFO a PostgreSQL database instead (a libpq connection\n"
    "                string or URI; --db postgresql://... works too):\n"
    "                the row goes to deliveryevents.inbox_request\n"
    "  TYPE:ID       the subject, e.g. delivery:D-7 (required)\n"
    "  --wait MS     wait up to MS ms for the consumer's result (30000;\n"
    "                0: queue the request and return at once)\n"
    "  --force       ask even if the subject does not look parked\n"
    "  Prints the consumer's result; exit 1 if it answers that the subject\n"
    "  is still parked or the request failed, or if it did not take the\n"
    "  request in time (the request stays queued).\n";

/* Runs one statement with the subject bound as ?1, ?2 (and text ?3, int
 * ?4 when given); the first integer column of its row, or -1 on an error
 * (said on stderr), or 0 without a row. */
static int64_t req_exec(const char *cmd, sqlite3 *db, const char *sql,
                        const char *type, int type_len, const char *id,
                        const char *text, int64_t num)
{
    sqlite3_stmt *st = NULL;
    int64_t v = 0;
    int rc;

    if (sqlite3_prepare_v2(db, sql, -1, &st, NULL) != SQLITE_OK) {
        fprintf(stderr, "deliveryevents: %s: %s\n", cmd, sqlite3_errmsg(db));
        return -1;
    }
    if (type != NULL) {
        sqlite3_bind_text(st, 1, type, type_len, SQLITE_STATIC);
        sqlite3_bind_text(st, 2, id, -1, SQLITE_STATIC);
    }
    if (text != NULL) {
        sqlite3_bind_text(st, 3, text, -1, SQLITE_STATIC);
        sqlite3_bind_int64(st, 4, num);
    }
    rc = sqlite3_step(st);
    if (rc == SQLITE_ROW)
        v = sqlite3_column_int64(st, 0);
    else if (rc != SQLITE_DONE)
        v = -1;
    if (v < 0)
        fprintf(stderr, "deliveryevents: %s: %s\n", cmd, sqlite3_errmsg(db));
    sqlite3_finalize(st);
    return v;
}

/* The SQLite side of release and skip: db opened read-write, the
 * request row written if the subject is parked (or force); its id, or
 * -1 after saying why. */
static int64_t request_sqlite(const char *cmd, const char *db_path,
                              sqlite3 **dbp, const char *subject, int type_len,
                              const char *id_part, int force)
{
    sqlite3 *db = NULL;
    int64_t id;

    if (!file_exists(db_path)) {
        fprintf(stderr, "deliveryevents: %s: cannot open '%s': %s\n", cmd,
                db_path, strerror(errno));
        return -1;
    }
    if (!is_file(db_path)) {
        fprintf(stderr, "deliveryevents: %s: '%s' is not a file\n", cmd,
                db_path);
        return -1;
    }
    /* Read-write, never created; the consumer holds the write lock only
     * for a batch, so 5 s of busy timeout is plenty. */
    if (sqlite3_open_v2(db_path, &db, SQLITE_OPEN_READWRITE, NULL) !=
            SQLITE_OK ||
        sqlite3_busy_timeout(db, 5000) != SQLITE_OK) {
        fprintf(stderr, "deliveryevents: %s: cannot open '%s': %s\n", cmd,
                db_path, db ? sqlite3_errmsg(db) : "out of memory");
        *dbp = db;
        return -1;
    }
    *dbp = db;
    if (!has_table(db, "de_inbox") || !has_table(db, "de_dead_letter")) {
        fprintf(stderr,
                "deliveryevents: %s: '%s' has no consumer tables (no "
                "de_inbox or de_dead_letter table)%s%s\n",
                cmd, db_path, sqlite3_errcode(db) ? ": " : "",
                sqlite3_errcode(db) ? sqlite3_errmsg(db) : "");
        return -1;
    }
    if (!has_table(db, "de_consumer_request")) {
        fprintf(stderr,
                "deliveryevents: %s: '%s': this consumer database has no "
                "request table: its consumer runs a libdeliveryevents older "
                "than 1.0; upgrade it, or call de_consumer_%s in the "
                "service\n",
                cmd, db_path, cmd);
        return -1;
    }
    /* Whether it is parked and the request, in one transaction. */
    if (sqlite3_exec(db, "BEGIN IMMEDIATE", NULL, NULL, NULL) != SQLITE_OK) {
        fprintf(stderr, "deliveryevents: %s: cannot write '%s': %s\n", cmd,
                db_path, sqlite3_errmsg(db));
        return -1;
    }
    id = req_exec(cmd, db,
                  "SELECT EXISTS (SELECT 1 FROM de_inbox WHERE subject_type = "
                  "?1 AND subject_id = ?2 AND parked = 1) OR EXISTS (SELECT 1 "
                  "FROM de_dead_letter WHERE subject_type = ?1 AND subject_id "
                  "= ?2 AND state = 'parked')",
                  subject, type_len, id_part, NULL, 0);
    if (id < 0)
        goto rollback;
    if (id == 0 && !force) {
        fprintf(stderr,
                "deliveryevents: %s: %s is not parked in '%s' (its inbox row "
                "is not parked and it has no parked dead letters): nothing "
                "to %s; --force asks the consumer anyway\n",
                cmd, subject, db_path, cmd);
        goto rollback;
    }
    if (req_exec(cmd, db,
                 "INSERT INTO de_consumer_request(subject_type, subject_id, "
                 "action, requested_at_ms) VALUES (?1, ?2, ?3, ?4)",
                 subject, type_len, id_part, cmd, now_ms()) < 0)
        goto rollback;
    id = sqlite3_last_insert_rowid(db);
    if (sqlite3_exec(db, "COMMIT", NULL, NULL, NULL) != SQLITE_OK) {
        fprintf(stderr, "deliveryevents: %s: cannot commit to '%s': %s\n", cmd,
                db_path, sqlite3_errmsg(db));
        goto rollback;
    }
    return id;
rollback:
    (void)sqlite3_exec(db, "ROLLBACK", NULL, NULL, NULL);
    return -1;
}

/* The same on PostgreSQL: the row in deliveryevents.inbox_request, which
 * the PostgreSQL consumer serves as the SQLite one serves its table. */
static int64_t request_pg(const char *cmd, pgt *pg, const char *subject,
                          int type_len, const char *id_part, int force)
{
    int parked = pgt_parked(cmd, pg, subject, type_len, id_part);

    if (parked < 0)
        return -1;
    if (parked == 0 && !force) {
        fprintf(stderr,
                "deliveryevents: %s: %s is not parked in '%s' (its inbox row "
                "is not parked and it has no parked dead letters): nothing "
                "to %s; --force asks the consumer anyway\n",
                cmd, subject, pgt_name(pg), cmd);
        return -1;
    }
    return pgt_request(cmd, pg, subject, type_len, id_part, cmd, now_ms());
}

/* Whether request id is done (1, its result in buf), not yet (0), or gone
 * or unreadable (-1, said). */
static int request_state_sqlite(const char *cmd, sqlite3 *db,
                                const char *db_path, int64_t id, char *buf,
                                size_t size)
{
    sqlite3_stmt *st = NULL;
    int found = 0, done = 0;

    if (sqlite3_prepare_v2(db,
                           "SELECT done_at_ms IS NOT NULL, result FROM "
                           "de_consumer_request WHERE id = ?1",
                           -1, &st, NULL) == SQLITE_OK) {
        sqlite3_bind_int64(st, 1, id);
        if (sqlite3_step(st) == SQLITE_ROW) {
            found = 1;
            done = sqlite3_column_int(st, 0);
            snprintf(buf, size, "%s",
                     sqlite3_column_text(st, 1)
                         ? (const char *)sqlite3_column_text(st, 1)
                         : "done, without a result");
        }
    }
    sqlite3_finalize(st);
    if (!found) {
        fprintf(stderr,
                "deliveryevents: %s: request %" PRId64 " is gone from "
                "'%s' before it was done%s%s\n",
                cmd, id, db_path, sqlite3_errcode(db) ? ": " : "",
                sqlite3_errcode(db) ? sqlite3_errmsg(db) : "");
        return -1;
    }
    return done;
}

static int cmd_request(const char *cmd, int argc, char **argv)
{
    const char *db_path = NULL, *subject = NULL, *colon, *v;
    char result[1024], shown[300];
    long wait_ms = 30000;
    int force = 0, rc = 1, type_len, pg = 0, state;
    int64_t id, deadline;
    sqlite3 *db = NULL;
    pgt *conn = NULL;

    if (wants_help(argc, argv,
                   strcmp(cmd, "skip") == 0 ? usage_skip : usage_release))
        return 0;
    for (int i = 0; i < argc; i++) {
        const char *o = argv[i];
        if (strcmp(o, "--force") == 0) {
            force = 1;
        } else if (strcmp(o, "--db") == 0 || strcmp(o, "--pg") == 0 ||
                   strcmp(o, "--wait") == 0) {
            if ((v = opt_value(cmd, argc, argv, &i)) == NULL)
                return 2;
            if (strcmp(o, "--wait") != 0) {
                db_path = v;
                pg = strcmp(o, "--pg") == 0 || is_pg_uri(v);
            } else if (parse_num(cmd, o, v, 0, 24L * 3600 * 1000, &wait_ms) !=
                       0) {
                return 2;
            }
        } else if (o[0] == '-' && o[1] != '\0') {
            return bad_usage(cmd, "unknown argument '%s'", o);
        } else if (subject != NULL) {
            return bad_usage(cmd, "takes one subject; '%s' is a second", o);
        } else if (split_subject(o, &colon) != 0) {
            return bad_usage(cmd,
                             "the subject is TYPE:ID, both non-empty (e.g. "
                             "delivery:D-7), got '%s'",
                             o);
        } else {
            subject = o;
        }
    }
    if (db_path == NULL)
        return bad_usage(cmd, "needs --db PATH (or --pg CONNINFO)%s", "");
    if (subject == NULL)
        return bad_usage(cmd,
                         "needs the subject, TYPE:ID (e.g. "
                         "delivery:D-7)%s",
                         "");
    split_subject(subject, &colon);
    type_len = (int)(colon - subject);
    snprintf(shown, sizeof shown, "%s", subject);

    if (pg) {
        if ((rc = pgt_open(cmd, db_path, 0, &conn)) != 0)
            return rc;
        rc = 1;
        db_path = pgt_name(conn);
        id = request_pg(cmd, conn, shown, type_len, colon + 1, force);
    } else {
        id = request_sqlite(cmd, db_path, &db, shown, type_len, colon + 1,
                            force);
    }
    if (id < 0)
        goto done;

    /* Waiting for the consumer: it sets done_at_ms and result. */
    catch_signals();
    deadline = mono_ms() + wait_ms;
    while (wait_ms > 0 && !stop_signal) {
        state = pg ? pgt_request_state(cmd, conn, id, result, sizeof result)
                   : request_state_sqlite(cmd, db, db_path, id, result,
                                          sizeof result);
        if (state < 0)
            goto done;
        if (state > 0) {
            printf("%s %s: %s\n", cmd, shown, result);
            /* The subject no longer parked is success; still parked, or
             * the consumer could not do it, is not. */
            rc = strncmp(result, "still parked", 12) == 0 ||
                         strncmp(result, "failed", 6) == 0
                     ? 1
                     : 0;
            goto done;
        }
        if (mono_ms() >= deadline)
            break;
        (void)poll(NULL, 0, 100);
    }
    if (wait_ms == 0) {
        printf("queued: the consumer of %s has not taken the request yet; "
               "it stays queued (request %" PRId64 ")\n",
               db_path, id);
        rc = 0;
    } else {
        fprintf(stderr,
                "deliveryevents: %s: queued: the consumer of %s has not "
                "taken the request yet; it stays queued (request %" PRId64
                ")\n",
                cmd, db_path, id);
    }
done:
    sqlite3_close(db);
    pgt_close(conn);
    return rc;
}

/* ---- contracts and the AsyncAPI catalog ------------------------------- */

static const char usage_contracts[] =
    "usage: deliveryevents contracts (--db PATH | --pg CONNINFO) [--json]\n"
    "  Read-only: every event contract defined in the database\n"
    "  (de_outbox_define), by event type and version, with its $id and\n"
    "  top-level properties (* = required).\n"
    "  --db PATH       the service's database file (required)\n"
    "  --pg CONNINFO   a PostgreSQL database instead (a libpq connection\n"
    "                  string or URI; --db postgresql://... works too)\n"
    "  --json          one JSON object instead of text, with each schema\n";

static const char usage_asyncapi[] =
    "usage: deliveryevents asyncapi (--db PATH | --pg CONNINFO)\n"
    "  Read-only: writes an AsyncAPI 3.0 document (JSON) of the database's\n"
    "  event contracts on stdout: a channel per topic (topic.template), a\n"
    "  message per event type and version with its payload schema, the\n"
    "  CloudEvents headers and the Kafka key (the subject id).\n"
    "  --db PATH       the service's database file (required)\n"
    "  --pg CONNINFO   a PostgreSQL database instead (a libpq connection\n"
    "                  string or URI; --db postgresql://... works too)\n";

/* "2026-11-25T11:00:00.123Z" */
static void utc_ms(int64_t ms, char *buf, size_t size)
{
    time_t s = (time_t)(ms / 1000);
    struct tm tm;

    if (gmtime_r(&s, &tm) == NULL) {
        snprintf(buf, size, "-");
        return;
    }
    snprintf(buf, size, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ",
             tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour,
             tm.tm_min, tm.tm_sec, (int)(ms % 1000));
}

/*
 * Every contract of r's database, ordered by type, action and version:
 * an array of {subject_type, action, version, defined_at_ms, schema}.
 * A database without the de_contracts table (outbox schema 1) has none.
 * NULL after saying why on stderr.
 */
static json_t *read_contracts(const char *cmd, ro *r)
{
    sqlite3_stmt *st = NULL;
    json_t *all = json_array(), *schema;
    json_error_t je;
    int rc;

    if (r->pg != NULL) {
        json_decref(all);
        return pgt_contracts(cmd, r->pg);
    }
    if (q_int(r->db,
              "SELECT count(*) FROM main.sqlite_master WHERE type = 'table' "
              "AND name = 'de_contracts'",
              0) == 0)
        return all;
    if (sqlite3_prepare_v2(r->db,
                           "SELECT subject_type, action, version, "
                           "defined_at_ms, schema FROM main.de_contracts "
                           "ORDER BY subject_type, action, version",
                           -1, &st, NULL) != SQLITE_OK) {
        fprintf(stderr, "deliveryevents: %s: cannot read the contracts: %s\n",
                cmd, sqlite3_errmsg(r->db));
        json_decref(all);
        return NULL;
    }
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        const char *type = (const char *)sqlite3_column_text(st, 0);
        const char *act = (const char *)sqlite3_column_text(st, 1);
        const char *text = (const char *)sqlite3_column_text(st, 4);
        json_t *c = json_object();

        schema = text ? json_loads(text, JSON_REJECT_DUPLICATES, &je) : NULL;
        if (type == NULL || act == NULL || !json_is_object(schema)) {
            fprintf(stderr,
                    "deliveryevents: %s: '%s': a row of de_contracts is "
                    "malformed (%s.%s v%d)\n",
                    cmd, r->db_path, type ? type : "?", act ? act : "?",
                    sqlite3_column_int(st, 2));
            json_decref(schema);
            json_decref(c);
            json_decref(all);
            sqlite3_finalize(st);
            return NULL;
        }
        put_str(c, "subject_type", type);
        put_str(c, "action", act);
        put_int(c, "version", sqlite3_column_int(st, 2));
        put_int(c, "defined_at_ms", sqlite3_column_int64(st, 3));
        json_object_set_new(c, "schema", schema);
        json_array_append_new(all, c);
    }
    sqlite3_finalize(st);
    if (rc != SQLITE_DONE) {
        fprintf(stderr, "deliveryevents: %s: cannot read the contracts: %s\n",
                cmd, sqlite3_errmsg(r->db));
        json_decref(all);
        return NULL;
    }
    return all;
}

static const char *jstr(const json_t *o, const char *k)
{
    return json_string_value(json_object_get(o, k));
}

static int contracts_report(const char *cmd, const struct ro_args *a, ro *r)
{
    json_t *all = read_contracts(cmd, r), *types, *c, *t = NULL;
    char when[64];
    size_t i;

    if (all == NULL)
        return 1;
    /* One entry per event type, its versions in order. */
    types = json_array();
    json_array_foreach(all, i, c)
    {
        json_t *v = json_object(), *schema = json_object_get(c, "schema");
        if (t == NULL ||
            strcmp(jstr(t, "subject_type"), jstr(c, "subject_type")) != 0 ||
            strcmp(jstr(t, "action"), jstr(c, "action")) != 0) {
            t = json_object();
            json_object_set(t, "subject_type",
                            json_object_get(c, "subject_type"));
            json_object_set(t, "action", json_object_get(c, "action"));
            json_object_set_new(t, "versions", json_array());
            json_array_append_new(types, t);
        }
        json_object_set(v, "version", json_object_get(c, "version"));
        json_object_set(v, "defined_at_ms",
                        json_object_get(c, "defined_at_ms"));
        json_object_set_new(v, "dataschema",
                            json_is_string(json_object_get(schema, "$id"))
                                ? json_copy(json_object_get(schema, "$id"))
                                : json_null());
        json_object_set(v, "schema", schema);
        json_array_append_new(json_object_get(t, "versions"), v);
    }
    json_decref(all);
    if (a->json) {
        json_t *o = json_object();
        char *s;
        put_str(o, "database", r->db_path);
        json_object_set_new(o, "contracts", types);
        s = json_dumps(o, JSON_COMPACT);
        printf("%s\n", s ? s : "{}");
        free(s);
        json_decref(o);
        return 0;
    }
    if (json_array_size(types) == 0)
        printf("no contracts defined in %s\n", r->db_path);
    json_array_foreach(types, i, t)
    {
        json_t *vs = json_object_get(t, "versions"), *v;
        size_t k;
        printf("%s.%s (%zu version%s)\n", jstr(t, "subject_type"),
               jstr(t, "action"), json_array_size(vs),
               json_array_size(vs) == 1 ? "" : "s");
        json_array_foreach(vs, k, v)
        {
            json_t *schema = json_object_get(v, "schema");
            json_t *members = json_object_get(schema, "properties");
            json_t *req = json_object_get(schema, "required"), *p;
            const char *name;
            int first = 1;
            utc_ms(json_integer_value(json_object_get(v, "defined_at_ms")),
                   when, sizeof when);
            printf("  v%lld  defined %s%s%s\n",
                   (long long)json_integer_value(json_object_get(v, "version")),
                   when,
                   json_is_string(json_object_get(v, "dataschema")) ? "  " : "",
                   json_is_string(json_object_get(v, "dataschema"))
                       ? jstr(v, "dataschema")
                       : "");
            printf("      ");
            json_object_foreach(members, name, p)
            {
                int required = 0;
                size_t j;
                json_t *rn;
                json_array_foreach(req, j, rn) required |=
                    json_is_string(rn) &&
                    strcmp(json_string_value(rn), name) == 0;
                printf("%s%s%s", first ? "" : ", ", name, required ? "*" : "");
                first = 0;
            }
            printf("%s\n", first ? "(no properties)" : "");
        }
    }
    json_decref(types);
    return 0;
}

/* A stored wire setting (setting.KEY in de_meta), or dflt. */
static const char *stored_setting(ro *r, const char *key, const char *dflt,
                                  char *buf, size_t size)
{
    char sql[200];

    if (r->pg != NULL) {
        pgt_setting(r->pg, key, buf, size);
        return buf[0] ? buf : dflt;
    }
    snprintf(sql, sizeof sql,
             "SELECT value FROM main.de_meta WHERE key = 'setting.%s'", key);
    q_text(r->db, sql, buf, size);
    return buf[0] ? buf : dflt;
}

/* topic.template with {subject_type} substituted. */
static void expand_topic(const char *tmpl, const char *type, char *buf,
                         size_t size)
{
    const char *ph = "{subject_type}", *at = strstr(tmpl, ph);

    if (at == NULL)
        snprintf(buf, size, "%s", tmpl);
    else
        snprintf(buf, size, "%.*s%s%s", (int)(at - tmpl), tmpl, type,
                 at + strlen(ph));
}

/* The name of a $defs member from the token of a "#/$defs/<token>"
 * reference: a URI fragment (%XX) holding a JSON Pointer token (~1 is /,
 * ~0 is ~). */
static void def_name(const char *tok, char *out, size_t size)
{
    size_t o = 0;

    for (size_t i = 0; tok[i] && o + 1 < size; i++) {
        char c = tok[i];
        if (c == '%' && isxdigit((unsigned char)tok[i + 1]) &&
            isxdigit((unsigned char)tok[i + 2])) {
            char hex[3] = {tok[i + 1], tok[i + 2], 0};
            c = (char)strtol(hex, NULL, 16);
            i += 2;
        }
        out[o++] = c;
    }
    out[o] = '\0';
    o = 0;
    for (size_t i = 0; out[i]; i++) {
        if (out[i] == '~' && (out[i + 1] == '1' || out[i + 1] == '0')) {
            out[o++] = out[i + 1] == '1' ? '/' : '~';
            i++;
        } else {
            out[o++] = out[i];
        }
    }
    out[o] = '\0';
}

/*
 * Makes a contract schema say in plain JSON Schema what the library
 * enforces, for tools that read the document: additionalProperties is
 * written out as false where the contract leaves it to the library's
 * default, and each "#/$defs/X" reference points at the component
 * schema refs[X] names (the document's own root is not the schema's).
 */
static void to_plain_schema(json_t *s, const json_t *refs)
{
    json_t *type, *v;
    const char *k, *ref;
    size_t i;
    char name[1100], target[1200];
    int object = 0;

    if (!json_is_object(s))
        return;
    ref = jstr(s, "$ref");
    if (ref != NULL && strncmp(ref, "#/$defs/", 8) == 0) {
        def_name(ref + 8, name, sizeof name);
        if (jstr(refs, name) != NULL) {
            snprintf(target, sizeof target, "#/components/schemas/%s",
                     jstr(refs, name));
            json_object_set_new(s, "$ref", json_string(target));
        }
    }
    type = json_object_get(s, "type");
    if (json_is_string(type))
        object = strcmp(json_string_value(type), "object") == 0;
    json_array_foreach(type, i, v) object |=
        json_is_string(v) && strcmp(json_string_value(v), "object") == 0;
    if (object && json_object_get(s, "additionalProperties") == NULL)
        json_object_set_new(s, "additionalProperties", json_false());
    json_object_foreach(json_object_get(s, "properties"), k, v)
        to_plain_schema(v, refs);
    to_plain_schema(json_object_get(s, "items"), refs);
}

static json_t *header_schema(const char *type, const char *description)
{
    return json_pack("{s:s, s:s}", "type", type, "description", description);
}

/* The CloudEvents headers of one event type's records (docs/OVERVIEW.md). */
static json_t *ce_headers(const char *stype, const char *act, int version,
                          const char *prefix, int prefix_known,
                          const char *dataschema)
{
    json_t *p = json_object(), *h, *req;
    char ce_type[400], pattern[500];
    size_t o = 0;

    snprintf(ce_type, sizeof ce_type, "%s%s.%s.v%d", prefix, stype, act,
             version);
    json_object_set_new(
        p, "ce_specversion",
        json_pack("{s:s, s:s}", "type", "string", "const", "1.0"));
    json_object_set_new(p, "ce_id", header_schema("string", "The event id."));
    json_object_set_new(p, "ce_source",
                        header_schema("string", "The CloudEvents source "
                                                "(event.source)."));
    if (prefix_known) {
        h = json_pack("{s:s, s:s}", "type", "string", "const", ce_type);
    } else {
        /* A relay of this database may add its own event.type.prefix. */
        o = (size_t)snprintf(pattern, sizeof pattern, "^.*");
        for (const char *c = ce_type; *c && o + 3 < sizeof pattern; c++) {
            if (*c == '.')
                pattern[o++] = '\\';
            pattern[o++] = *c;
        }
        snprintf(pattern + o, sizeof pattern - o, "$");
        h = json_pack("{s:s, s:s}", "type", "string", "pattern", pattern);
    }
    json_object_set_new(p, "ce_type", h);
    json_object_set_new(p, "ce_subject",
                        header_schema("string", "The subject id, as the key."));
    json_object_set_new(p, "ce_time",
                        json_pack("{s:s, s:s, s:s}", "type", "string", "format",
                                  "date-time", "description",
                                  "When it happened (RFC 3339, UTC, ms)."));
    json_object_set_new(
        p, "content-type",
        json_pack("{s:s, s:s}", "type", "string", "const", "application/json"));
    json_object_set_new(p, "ce_partitionkey",
                        header_schema("string", "The subject id."));
    json_object_set_new(
        p, "ce_subjectseq",
        json_pack("{s:s, s:s, s:s}", "type", "string", "pattern",
                  "^[1-9][0-9]*$", "description",
                  "The subject's sequence number: 1, 2, 3, ... in commit "
                  "order, without gaps."));
    json_object_set_new(p, "ce_subjectepoch",
                        json_pack("{s:s, s:s, s:s}", "type", "string",
                                  "pattern", "^[1-9][0-9]*$", "description",
                                  "Present when the numbering started over "
                                  "(compare by epoch, then sequence)."));
    json_object_set_new(
        p, "ce_subjecttype",
        json_pack("{s:s, s:s}", "type", "string", "const", stype));
    json_object_set_new(
        p, "ce_action",
        json_pack("{s:s, s:s}", "type", "string", "const", act));
    if (dataschema != NULL)
        json_object_set_new(
            p, "ce_dataschema",
            json_pack("{s:s, s:s}", "type", "string", "const", dataschema));
    json_object_set_new(p, "traceparent",
                        header_schema("string", "W3C trace context, when "
                                                "recorded."));
    json_object_set_new(p, "tracestate",
                        header_schema("string", "W3C trace state, when "
                                                "recorded."));
    req = json_pack("[s,s,s,s,s,s,s,s,s,s,s]", "ce_specversion", "ce_id",
                    "ce_source", "ce_type", "ce_subject", "ce_time",
                    "content-type", "ce_partitionkey", "ce_subjectseq",
                    "ce_subjecttype", "ce_action");
    if (dataschema != NULL)
        json_array_append_new(req, json_string("ce_dataschema"));
    return json_pack("{s:s, s:o, s:o}", "type", "object", "properties", p,
                     "required", req);
}

/* A component name: [A-Za-z0-9._-] kept, anything else '_'. */
static void component_name(const char *s, char *out, size_t size)
{
    size_t o = 0;

    for (; *s && o + 1 < size; s++)
        out[o++] = isalnum((unsigned char)*s) || strchr("._-", *s) ? *s : '_';
    out[o] = '\0';
}

/* Adds one contract to the document: its message, its $defs as component
 * schemas, and its channel and send operation. */
static void asyncapi_add(json_t *doc, const json_t *c, const char *tmpl,
                         const char *prefix, int prefix_known)
{
    const char *stype = jstr(c, "subject_type"), *act = jstr(c, "action");
    int version = (int)json_integer_value(json_object_get(c, "version"));
    json_t *payload = json_deep_copy(json_object_get(c, "schema"));
    json_t *comps = json_object_get(doc, "components"), *refs = json_object();
    json_t *defs, *d, *ch, *op, *msg, *ref;
    const char *dataschema = jstr(payload, "$id"), *name;
    char msgid[300], topic[600], cname[1500], target[2000];
    char *id_copy = dataschema ? strdup(dataschema) : NULL;

    snprintf(msgid, sizeof msgid, "%s.%s.v%d", stype, act, version);
    expand_topic(tmpl, stype, topic, sizeof topic);
    /* $defs become component schemas named <message>-<name>. */
    defs = json_object_get(payload, "$defs");
    json_object_foreach(defs, name, d)
    {
        char safe[1100];
        component_name(name, safe, sizeof safe);
        snprintf(cname, sizeof cname, "%s-%s", msgid, safe);
        for (int n = 2;
             json_object_get(json_object_get(comps, "schemas"), cname) != NULL;
             n++)
            snprintf(cname, sizeof cname, "%s-%s-%d", msgid, safe, n);
        json_object_set_new(refs, name, json_string(cname));
        json_object_set(json_object_get(comps, "schemas"), cname, d);
    }
    json_object_foreach(defs, name, d) to_plain_schema(d, refs);
    to_plain_schema(payload, refs);
    /* What only means something at a schema's root: the document's root
     * is another; $id goes out as the ce_dataschema header instead. */
    json_object_del(payload, "$defs");
    json_object_del(payload, "$schema");
    json_object_del(payload, "$id");

    msg = json_pack(
        "{s:s, s:s, s:s, s:o, s:o}", "name", msgid, "title", msgid,
        "contentType", "application/json", "headers",
        ce_headers(stype, act, version, prefix, prefix_known, id_copy),
        "payload", payload);
    if (jstr(payload, "description") != NULL)
        json_object_set_new(msg, "summary",
                            json_string(jstr(payload, "description")));
    json_object_set_new(
        msg, "bindings",
        json_pack("{s:{s:{s:s, s:s}, s:s}}", "kafka", "key", "type", "string",
                  "description",
                  "The subject id: every event of one subject goes to one "
                  "partition, in order.",
                  "bindingVersion", "0.5.0"));
    json_object_set_new(json_object_get(comps, "messages"), msgid, msg);

    ch = json_object_get(json_object_get(doc, "channels"), topic);
    if (ch == NULL) {
        ch = json_pack("{s:s, s:s, s:{}}", "address", topic, "description", "",
                       "messages");
        snprintf(target, sizeof target,
                 "Events of subject type '%s', keyed by subject id.", stype);
        json_object_set_new(ch, "description", json_string(target));
        json_object_set_new(json_object_get(doc, "channels"), topic, ch);
        snprintf(target, sizeof target, "#/channels/%s", topic);
        op = json_pack("{s:s, s:{s:s}, s:[]}", "action", "send", "channel",
                       "$ref", target, "messages");
        snprintf(cname, sizeof cname, "send.%s", topic);
        json_object_set_new(json_object_get(doc, "operations"), cname, op);
    }
    snprintf(target, sizeof target, "#/components/messages/%s", msgid);
    json_object_set_new(json_object_get(ch, "messages"), msgid,
                        json_pack("{s:s}", "$ref", target));
    snprintf(cname, sizeof cname, "send.%s", topic);
    op = json_object_get(json_object_get(doc, "operations"), cname);
    snprintf(target, sizeof target, "#/channels/%s/messages/%s", topic, msgid);
    ref = json_pack("{s:s}", "$ref", target);
    json_array_append_new(json_object_get(op, "messages"), ref);
    json_decref(refs);
    free(id_copy);
}

static int asyncapi_report(const char *cmd, const struct ro_args *a, ro *r)
{
    json_t *all = read_contracts(cmd, r), *doc, *c;
    char tmpl[300], prefix[200], source[300], title[PATH_MAX + 64], *s;
    /* The file's name, or the PostgreSQL database's. */
    const char *name = r->pg ? pgt_dbname(r->pg) : r->db_path,
               *base = r->pg ? NULL : strrchr(name, '/');
    int prefix_known;
    size_t i;

    (void)a;
    if (all == NULL)
        return 1;
    stored_setting(r, "topic.template", "{subject_type}.events", tmpl,
                   sizeof tmpl);
    if (tmpl[0] == '\0')
        snprintf(tmpl, sizeof tmpl, "{subject_type}.events");
    prefix_known = stored_setting(r, "event.type.prefix", NULL, prefix,
                                  sizeof prefix) != NULL;
    stored_setting(r, "event.source", "/deliveryevents", source, sizeof source);
    snprintf(title, sizeof title, "Events of %s", base ? base + 1 : name);
    doc = json_pack(
        "{s:s, s:{s:s, s:s, s:s}, s:s, s:{}, s:{}, s:{s:{}, s:{}}}", "asyncapi",
        "3.0.0", "info", "title", title, "version", "1", "description",
        "The event contracts of this database (de_outbox_define), as "
        "libdeliveryevents publishes them: CloudEvents 1.0 in Kafka binary "
        "mode, the payload as JSON, the subject id as key.",
        "defaultContentType", "application/json", "channels", "operations",
        "components", "messages", "schemas");
    snprintf(title, sizeof title, "%zu", json_array_size(all));
    json_object_set_new(json_object_get(doc, "info"), "version",
                        json_string(title));
    json_array_foreach(all, i, c)
        asyncapi_add(doc, c, tmpl, prefix, prefix_known);
    json_decref(all);
    s = json_dumps(doc, JSON_INDENT(2) | JSON_ENSURE_ASCII);
    json_decref(doc);
    if (s == NULL) {
        fprintf(stderr, "deliveryevents: %s: out of memory\n", cmd);
        return 1;
    }
    printf("%s\n", s);
    free(s);
    return 0;
}

/* The read-only commands: what each takes beyond --db and --json. */
static const ro_cmd ro_cmds[] = {
    {"status", usage_status, RO_STATE, 0, 1, status_report},
    {"list", usage_list, RO_STATE | RO_SUBJECT | RO_LIMIT | RO_FILTER, 0, 1,
     list_report},
    {"consumer-status", usage_consumer_status, 0, 1, 1, consumer_status_report},
    {"dead-letters", usage_dead_letters, RO_SUBJECT | RO_LIMIT | RO_PARKED, 1,
     1, dead_letters_report},
    {"contracts", usage_contracts, 0, 0, 1, contracts_report},
    {"asyncapi", usage_asyncapi, RO_NO_JSON, 0, 1, asyncapi_report},
};

int main(int argc, char **argv)
{
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    if (strcmp(argv[1], "relay") == 0)
        return cmd_relay(argc - 2, argv + 2);
    for (size_t i = 0; i < sizeof ro_cmds / sizeof *ro_cmds; i++)
        if (strcmp(argv[1], ro_cmds[i].name) == 0)
            return ro_main(&ro_cmds[i], argc - 2, argv + 2);
    if (strcmp(argv[1], "release") == 0 || strcmp(argv[1], "skip") == 0)
        return cmd_request(argv[1], argc - 2, argv + 2);
    if (strcmp(argv[1], "replay") == 0)
        return cmd_replay(argc - 2, argv + 2);
    if (strcmp(argv[1], "mock-cluster") == 0)
        return cmd_mock_cluster(argc - 2, argv + 2);
    if (strcmp(argv[1], "tail") == 0)
        return cmd_tail(argc - 2, argv + 2);
    if (strcmp(argv[1], "archive") == 0)
        return cmd_archive(argc - 2, argv + 2);
    if (strcmp(argv[1], "--version") == 0) {
        printf("deliveryevents %s (librdkafka %s, SQLite %s)\n", de_version(),
               rd_kafka_version_str(), sqlite3_libversion());
        return 0;
    }
    if (is_help(argv[1])) {
        usage(stdout);
        return 0;
    }
    fprintf(stderr, "deliveryevents: unknown command '%s'\n", argv[1]);
    usage(stderr);
    return 2;
}

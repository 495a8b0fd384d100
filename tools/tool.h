/* SPDX-License-Identifier: MIT */
/*
 * tool.h -- what the command-line tool's files share: signal handling,
 * clocks, usage messages, option parsing and the Kafka properties
 * (-b, -X, --config, DELIVERYEVENTS_X_*) that tools/deliveryevents.c
 * implements, and the commands that live in files of their own.
 */
#ifndef DE_TOOL_H
#define DE_TOOL_H

#include <deliveryevents.h>
#include <jansson.h>
#include <librdkafka/rdkafka.h>

#include <signal.h>
#include <stdint.h>
#include <stdio.h>

/* The last SIGINT or SIGTERM caught (0: none), and how many. */
extern volatile sig_atomic_t stop_signal, signals_seen;
void catch_signals(void);
int64_t now_ms(void);
int64_t mono_ms(void);

/* "deliveryevents CMD: <fmt with arg>" and a pointer to --help on
 * stderr; returns 2 (bad usage). */
int bad_usage(const char *cmd, const char *fmt, const char *arg);
/* Prints usage_text on stdout when argv holds --help or -h. */
int wants_help(int argc, char **argv, const char *usage_text);
const char *opt_value(const char *cmd, int argc, char **argv, int *i);
int parse_num(const char *cmd, const char *opt, const char *s, long min,
              long max, long *out);

/*
 * Properties of relay, replay, tail and archive, from (later ones
 * winning) the environment -- DELIVERYEVENTS_X_SASL_PASSWORD=... sets
 * sasl.password --, --config FILE (key=value lines, # comments),
 * -b SERVERS and -X key=value.  A value written @FILE is read from FILE
 * (its first line; @@ for a value that starts with @).  So secrets need
 * not be on the command line, where /proc/<pid>/cmdline shows them to
 * every local user; -X values that are there are wiped from argv once
 * parsed.  Messages name keys and files, never values.
 */
typedef struct props {
    const char *cmd;
    de_conf *conf;       /* every property, validated by the library */
    rd_kafka_conf_t *rk; /* a bare consumer's: librdkafka's, set here too */
} props;
int props_from_env(props *p);
int props_option(props *p, const char *a, const char *v);
int is_props_option(const char *a);
void wipe_x_values(int argc, char **argv);

/* A JSON string of s[0, n), valid whatever the bytes. */
json_t *json_text(const char *s, size_t n);

/* deliveryevents archive (tools/archive.c). */
extern const char usage_archive[];
int cmd_archive(int argc, char **argv);

#endif

/* SPDX-License-Identifier: MIT */
/*
 * soakutil.h -- what the two soaks share (tests/soak.c on SQLite,
 * tests/soak_pg.c on PostgreSQL): the run's shape scaled from its length,
 * deliveries going through their life cycle and coming back after the
 * relay forgot them, the signals a writer process obeys, the resources a
 * process holds, and the verdict on sampled metrics: "keeps growing" when
 * the median of the second half of the samples after warm-up exceeds the
 * median of the first half by more than 25 % and by more than the
 * metric's slack (noise: a few pages, a few descriptors).
 */
#ifndef DE_SOAKUTIL_H
#define DE_SOAKUTIL_H

#include "kafka.h"

#include <signal.h>
#include <stdint.h>
#include <sys/types.h>

/* The run's shape, scaled from its length (tsk_make_plan). */
typedef struct tsk_plan {
    int seconds, sample_s, warmup_s;
    int rate;           /* events per second, all writers together */
    int forget_s;       /* relay.subject.forget.ms, in s */
    int return_after_s; /* a delivery returns this long after it ended */
    int outage_every_s, outage_s, kill_every_s, restart_every_s;
} tsk_plan;

/* The plan of a run of `seconds` at `rate` events/s: a long run (15
 * minutes or more) samples every minute and spaces its faults out. */
tsk_plan tsk_make_plan(int seconds, int rate);

/* A delivery waiting for its next step. */
typedef struct tsk_pending {
    long id;
    int step;
    int64_t due_ms;
} tsk_pending;

/* A FIFO of pending steps (all of one delay, so due times are ordered). */
typedef struct tsk_fifo {
    tsk_pending *v;
    size_t head, n, cap;
} tsk_fifo;

/* Deliveries in flight: each is created, assigned, picked up and
 * delivered, a step every 2 s; one in twenty comes back ("returned")
 * after the relay forgot it (return_after_s).  Used in the writer
 * processes, so nothing here calls Check's assertions: outside the test
 * runner they cannot report, and end the process. */
typedef struct tsk_deliveries {
    tsk_fifo next, returns;
    long ids;
} tsk_deliveries;

/* The event to write next at now: *d receives its delivery; the action
 * (static). */
const char *tsk_next(tsk_deliveries *ds, int64_t now, tsk_pending *d);
/* d's event (action, from tsk_next) committed at now: schedules the
 * delivery's next step. */
void tsk_written(tsk_deliveries *ds, const tsk_plan *p, const tsk_pending *d,
                 const char *action, int64_t now);
void tsk_deliveries_free(tsk_deliveries *ds);

/* A relay of the run, in the service's process (ob): the settings every
 * relay of the run shares (tsk_relay_keys).  NULL, said on stderr, when
 * it cannot start. */
de_relay *tsk_start_relay(const tsk_plan *p, de_outbox *ob,
                          const char *bootstrap, const char *prefix);
/* The sidecar: `$DE_TOOL relay <where_flag> <where>` ("--db" and a file,
 * or "--pg" and a conninfo) with the same settings. */
pid_t tsk_spawn_sidecar(const tsk_plan *p, const char *where_flag,
                        const char *where, tu_cluster *c);

/* The faults both soaks inject on the run's clock: one broker of c down
 * for outage_s every outage_every_s, and when to kill the sidecar and
 * restart the in-process relay (the caller's processes). */
typedef struct tsk_faults {
    int64_t next_outage, outage_end, next_kill, next_restart;
    int down; /* the broker down, while outage_end */
} tsk_faults;

enum { TSK_KILL_SIDECAR = 1, TSK_RESTART_RELAY = 2 };

void tsk_faults_start(tsk_faults *f, const tsk_plan *p, int64_t t0);
/* Takes a broker down or brings it up as due at now; returns which of
 * TSK_KILL_SIDECAR and TSK_RESTART_RELAY are due. */
int tsk_faults_due(tsk_faults *f, const tsk_plan *p, tu_cluster *c,
                   int64_t now);
/* Brings the broker of an outage still under way back up. */
void tsk_faults_end(tsk_faults *f, tu_cluster *c);

/* Set by SIGTERM (stop) and SIGUSR1 (restart the in-process relay) once
 * tsk_catch_signals ran. */
extern volatile sig_atomic_t tsk_got_term, tsk_got_usr1;
void tsk_catch_signals(void);

/* A line on stderr, "[HH:MM:SS.mmm] soak: ...", stamped with the wall
 * clock as the in-process relay's lines are: what the faults and the
 * relays did, and when, to read the samples against. */
void tsk_note(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* A de_log_fn: the library's notable changes (notices and worse: a
 * relay's lease and recovery, a consumer's rebalance or parked subject)
 * on stderr, stamped as tsk_note's, after ctx (a string naming who). */
void tsk_log(void *ctx, int level, const char *message);

/* Starts argv[0] with argv in a child process, killed when the calling
 * process ends; fails the test when it cannot fork. */
pid_t tsk_spawn(const char *const argv[]);
/* A number from /proc/<pid>/status ("VmRSS:", "Threads:"); 0 when the
 * process is gone. */
int64_t tsk_proc_status(pid_t pid, const char *key);
/* How many descriptors the process holds open. */
int64_t tsk_open_fds(pid_t pid);

/* A sampled metric: its name, unit, and the growth below which a change
 * is noise. */
typedef struct tsk_metric {
    const char *name, *unit;
    double slack;
} tsk_metric;

/* Samples of nm metrics, one row per sample. */
typedef struct tsk_samples {
    const tsk_metric *m;
    int nm, n, cap;
    double *v;   /* n rows of nm */
    int64_t *at; /* seconds since the start, per row */
} tsk_samples;

void tsk_samples_init(tsk_samples *s, const tsk_metric *m, int nm,
                      const tsk_plan *p);
/* The row to fill for a sample at at_s, NULL when the table is full. */
double *tsk_sample_row(tsk_samples *s, int64_t at_s);
/* Prints the header line (before the first sample), and the last row with
 * the events checked so far. */
void tsk_print_header(const tsk_samples *s);
void tsk_print_last(const tsk_samples *s, long checked);
/* Prints each metric's verdict and fails the test if any keeps growing
 * after warm_s (or if too few samples followed it). */
void tsk_assert_flat(const tsk_samples *s, int warm_s);
void tsk_samples_free(tsk_samples *s);

/* Prints the records of subject id on subject_type's topic of c, with
 * their ce_id, epoch and number: when a soak finds an event unapplied. */
void tsk_print_kafka_subject(tu_cluster *c, const char *subject_type,
                             const char *id);

#endif

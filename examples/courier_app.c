/* SPDX-License-Identifier: MIT */
/*
 * courier_app.c -- another company's producer on the delivery topic: the
 * courier app's backend, as a service written in another language would
 * publish, with librdkafka alone and none of libdeliveryevents.
 *
 * It writes CloudEvents 1.0 to delivery.events, beside the delivery
 * service's own events, the way other producers do:
 *
 *  - binary mode, numbered per rider (its own ce_subjectseq, no
 *    ce_subjecttype or ce_action): com.example.courier.Shift-Started and
 *    Shift-Ended, ce_subject = the rider;
 *  - structured mode (application/cloudevents+json), not numbered:
 *    com.example.courier.Location-Reported, each ping sent twice (its
 *    client retries), which the consumer must apply once by its id;
 *  - one record that is no CloudEvent at all (a debug line someone
 *    produced by hand), which the consumer must dead-letter, not stall on.
 *
 * Time is simulated from 2026-11-25 11:00 UTC so runs are repeatable.
 *
 * Usage: courier_app --bootstrap SERVERS [--riders N] [--pings N]
 *                    [--topic delivery.events]
 */
#include <librdkafka/rdkafka.h>

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define SOURCE "//courier-app.example.com/eu"
#define T0_MS INT64_C(1795604400000) /* 2026-11-25T11:00:00Z */

static rd_kafka_t *producer;
static const char *topic = "delivery.events";

static void rfc3339(int64_t ms, char out[32])
{
    int64_t s = ms / 1000;
    int min = (int)(s / 60 % 60), sec = (int)(s % 60);
    int hour = (int)(s / 3600 % 24);

    /* Within the simulated day: 2026-11-25. */
    snprintf(out, 32, "2026-11-25T%02d:%02d:%02d.%03dZ", hour, min, sec,
             (int)(ms % 1000));
}

/* One record; headers as NULL-terminated name/value pairs. */
static void produce(const char *key, const char *value, const char *const *hdrs)
{
    rd_kafka_headers_t *h = rd_kafka_headers_new(12);
    rd_kafka_resp_err_t err;

    for (int i = 0; hdrs != NULL && hdrs[i] != NULL; i += 2)
        rd_kafka_header_add(h, hdrs[i], -1, hdrs[i + 1], -1);
    err = rd_kafka_producev(
        producer, RD_KAFKA_V_TOPIC(topic), RD_KAFKA_V_KEY(key, strlen(key)),
        RD_KAFKA_V_VALUE((void *)(uintptr_t)value, strlen(value)),
        RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY), RD_KAFKA_V_HEADERS(h),
        RD_KAFKA_V_END);
    if (err) {
        fprintf(stderr, "courier_app: %s\n", rd_kafka_err2str(err));
        exit(1);
    }
}

/* Binary mode: attributes in ce_* headers, the data as the value. */
static void shift_event(const char *rider, int seq, const char *what,
                        int64_t at_ms)
{
    char id[64], seqs[16], time[32], type[80];

    snprintf(id, sizeof id, "shift-%s-%d", rider, seq);
    snprintf(seqs, sizeof seqs, "%d", seq);
    snprintf(type, sizeof type, "com.example.courier.%s", what);
    rfc3339(at_ms, time);
    {
        const char *h[] = {"ce_specversion",
                           "1.0",
                           "ce_id",
                           id,
                           "ce_source",
                           SOURCE,
                           "ce_type",
                           type,
                           "ce_subject",
                           rider,
                           "ce_time",
                           time,
                           "ce_subjectseq",
                           seqs,
                           "content-type",
                           "application/json",
                           NULL};
        produce(rider, "{\"vehicle\":\"bike\"}", h);
    }
}

/* Structured mode: the whole event is the value. */
static void location(const char *rider, int n, int64_t at_ms)
{
    char json[512], time[32];
    const char *h[] = {"content-type", "application/cloudevents+json", NULL};

    rfc3339(at_ms, time);
    snprintf(json, sizeof json,
             "{\"specversion\":\"1.0\",\"id\":\"loc-%s-%d\",\"source\":"
             "\"%s\",\"type\":\"com.example.courier.Location-Reported\","
             "\"subject\":\"%s\",\"time\":\"%s\",\"datacontenttype\":"
             "\"application/json\",\"data\":{\"lat\":52.52%02d,\"lon\":"
             "13.40%02d}}",
             rider, n, SOURCE, rider, time, n, n);
    produce(rider, json, h);
    produce(rider, json, h); /* the app's client retried */
}

int main(int argc, char **argv)
{
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    int riders = 10, pings = 5;
    const char *bootstrap = NULL;
    char err[512];

    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--bootstrap") == 0 && i + 1 < argc)
            bootstrap = argv[++i];
        else if (strcmp(argv[i], "--riders") == 0 && i + 1 < argc)
            riders = atoi(argv[++i]);
        else if (strcmp(argv[i], "--pings") == 0 && i + 1 < argc)
            pings = atoi(argv[++i]);
        else if (strcmp(argv[i], "--topic") == 0 && i + 1 < argc)
            topic = argv[++i];
        else
            bootstrap = NULL, i = argc;
    }
    if (bootstrap == NULL || riders < 1 || riders > 99 || pings < 0) {
        fprintf(stderr, "usage: courier_app --bootstrap SERVERS [--riders "
                        "1..99] [--pings N] [--topic T]\n");
        return 2;
    }
    if (rd_kafka_conf_set(conf, "bootstrap.servers", bootstrap, err,
                          sizeof err) != RD_KAFKA_CONF_OK ||
        (producer = rd_kafka_new(RD_KAFKA_PRODUCER, conf, err, sizeof err)) ==
            NULL) {
        fprintf(stderr, "courier_app: %s\n", err);
        return 1;
    }
    for (int r = 1; r <= riders; r++) {
        char rider[8];
        int64_t t = T0_MS + r * 1000;
        snprintf(rider, sizeof rider, "R-%02d", r);
        shift_event(rider, 1, "Shift-Started", t);
        for (int p = 1; p <= pings; p++)
            location(rider, p, t + p * 60000);
        shift_event(rider, 2, "Shift-Ended", t + (pings + 1) * 60000);
    }
    produce("debug", "rider app restarted", NULL); /* not a CloudEvent */
    if (rd_kafka_flush(producer, 30000) != RD_KAFKA_RESP_ERR_NO_ERROR) {
        fprintf(stderr, "courier_app: not everything was acknowledged\n");
        return 1;
    }
    rd_kafka_destroy(producer);
    printf("courier_app: %d riders, %d shift events, %d location pings (each "
           "sent twice), 1 record that is no CloudEvent\n",
           riders, 2 * riders, riders * pings);
    return 0;
}

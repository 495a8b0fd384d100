/* SPDX-License-Identifier: MIT */
/*
 * relay_recover.c -- what a relay learns from Kafka before it publishes.
 *
 * Kafka is the truth about what was published.  A relay that becomes
 * active -- after a crash, a takeover, a power loss or a restored backup --
 * may hold a state file that is behind what earlier relays of the same
 * outbox wrote.  So before it publishes anything it reads every partition
 * it has ever published to, forward from that partition's mark (where it
 * stood at the last checkpoint) to the current end, and notes each record
 * of this outbox (its ce_source) that it finds:
 *
 *  - an event still pending in the outbox is not sent again: the relay
 *    gives it the number it already has on Kafka ("landed");
 *  - every subject's counter is raised to the highest number found
 *    (by ce_subjectepoch, then ce_subjectseq),
 *    so numbering continues above it and never repeats a number, even
 *    when the state file or the database went back in time.
 *
 * Invariant relied on (kept by relay.c): a topic's marks are on disk
 * before the relay first publishes to it, and afterwards only rise past
 * offsets of acknowledged events at or below the cursor; so every event of
 * this outbox above the cursor sits at or after the marks.  When a mark can
 * no longer be read from -- the records after it were deleted by retention,
 * or the topic was recreated -- the relay cannot know what it missed: it
 * refuses with DE_ERR_STATE, unless relay.recovery.unverifiable=continue
 * tells it to go on from what is left.
 *
 * What is found goes to temporary tables of the state's connection
 * (relay_state.c), so that reading millions of records after a restore
 * keeps the relay's memory flat.
 */
#include "relay_recover.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Each metadata and watermark request waits this long for Kafka. */
#define REQUEST_TIMEOUT_MS 10000
/* Reading gives up (to be retried later) when no record arrives for this
 * long while partitions still have records to read. */
#define IDLE_TIMEOUT_MS 30000
/* Found events noted per transaction on the temporary tables. */
#define NOTE_BATCH 1000

typedef struct mark {
    char *topic;
    int32_t partition; /* -1: the topic did not exist when registered */
    int64_t next;
} mark;

typedef struct reading {
    rd_kafka_topic_t *rkt;
    const char *topic; /* borrowed from the marks */
    int32_t partition;
    int64_t end; /* the high watermark when reading started */
    bool done;
} reading;

struct ctx {
    de__rstate *st;
    const de__recover_opts *o;
    de__recover_result *res;
    mark *marks;
    size_t nmarks, capmarks;
    reading *reads;
    size_t nreads, capreads;
    rd_kafka_t *rk;
    rd_kafka_queue_t *q;
    de__rk_bridge bridge; /* the reader's opaque */
    bool in_batch;
    int batch_n;
    int64_t next_beat_ms;
};

static de_err add_mark(void *arg, const char *topic, int32_t partition,
                       int64_t next)
{
    struct ctx *c = arg;
    mark *n;

    if (c->nmarks == c->capmarks) {
        size_t cap = c->capmarks ? c->capmarks * 2 : 16;
        if ((n = realloc(c->marks, cap * sizeof *n)) == NULL)
            return de__fail(DE_ERR_NOMEM, "relay recovery: out of memory");
        c->marks = n;
        c->capmarks = cap;
    }
    n = &c->marks[c->nmarks];
    if ((n->topic = strdup(topic)) == NULL)
        return de__fail(DE_ERR_NOMEM, "relay recovery: out of memory");
    n->partition = partition;
    n->next = next;
    c->nmarks++;
    return DE_OK;
}

/* The mark of (topic, partition): its own, else the topic's "did not
 * exist" mark (0), else 0 for a partition added after registration. */
static int64_t mark_of(const struct ctx *c, const char *topic,
                       int32_t partition)
{
    int64_t whole = 0;

    for (size_t i = 0; i < c->nmarks; i++) {
        if (strcmp(c->marks[i].topic, topic) != 0)
            continue;
        if (c->marks[i].partition == partition)
            return c->marks[i].next;
        if (c->marks[i].partition == -1)
            whole = c->marks[i].next;
    }
    return whole;
}

/* The relay's properties are a producer's: the reader ignores those, and
 * says so once per property. */
static const char *const quiet_lines[] = {"is a producer property", NULL};

static de_err reader_new(struct ctx *c)
{
    static const de__rk_prop defaults[] = {
        {"client.id", "deliveryevents-relay-recovery"},
        {"enable.partition.eof", "true"},
        /* Bounded prefetch: memory stays flat however much is read. */
        {"queued.max.messages.kbytes", "8192"},
        {"fetch.wait.max.ms", "100"},
    };
    rd_kafka_conf_t *kc;
    de_err err;

    c->bridge.conf = c->o->conf;
    snprintf(c->bridge.prefix, sizeof c->bridge.prefix, "relay recovery: ");
    c->bridge.quiet = quiet_lines;
    if ((err = de__rk_conf(c->o->conf, "relay's recovery reader", defaults,
                           DE__ARRAY_LEN(defaults), NULL, 0, &c->bridge,
                           &kc)) != DE_OK ||
        (err = de__rk_new(RD_KAFKA_CONSUMER, kc, "relay's recovery reader",
                          &c->rk)) != DE_OK)
        return err;
    if ((c->q = rd_kafka_queue_new(c->rk)) == NULL)
        return de__fail(DE_ERR_NOMEM, "relay recovery: out of memory");
    return DE_OK;
}

/* A mark that cannot be read from.  With relay.recovery.unverifiable=
 * continue the reading starts at *from instead; otherwise DE_ERR_STATE. */
static de_err unverifiable(struct ctx *c, const char *topic, int32_t partition,
                           const char *what)
{
    if (c->o->continue_unverifiable) {
        de__log(c->o->conf, DE_LOG_WARNING,
                "relay recovery: %s [%d]: %s; continuing from what is left "
                "(relay.recovery.unverifiable=continue)",
                topic, (int)partition, what);
        c->res->unverified++;
        return DE_OK;
    }
    return de__fail(DE_ERR_STATE,
                    "the relay cannot verify what this outbox published to "
                    "%s [%d]: %s.  It will not guess, because numbering "
                    "could then repeat numbers consumers already hold.  If "
                    "neither this database nor its relay state file was "
                    "restored from an older backup or copy, no relay of it "
                    "published there since: start the relay once with "
                    "relay.recovery.unverifiable=continue (see "
                    "docs/OPERATIONS.md, \"Backups and restores\")",
                    topic, (int)partition, what);
}

rd_kafka_resp_err_t de__topic_offsets(rd_kafka_t *rk, const char *topic,
                                      int32_t n, int64_t which, int64_t *out,
                                      int timeout_ms)
{
    rd_kafka_topic_partition_list_t *l = rd_kafka_topic_partition_list_new(n);
    rd_kafka_resp_err_t e;

    if (l == NULL)
        return RD_KAFKA_RESP_ERR__NOENT; /* out of memory */
    for (int32_t p = 0; p < n; p++)
        rd_kafka_topic_partition_list_add(l, topic, p)->offset = which;
    e = rd_kafka_offsets_for_times(rk, l, timeout_ms);
    for (int i = 0; i < l->cnt && e == RD_KAFKA_RESP_ERR_NO_ERROR; i++) {
        rd_kafka_topic_partition_t *tp = &l->elems[i];
        if (tp->err != RD_KAFKA_RESP_ERR_NO_ERROR)
            e = tp->err;
        else if (tp->offset < 0)
            e = RD_KAFKA_RESP_ERR__TIMED_OUT;
        else if (tp->partition >= 0 && tp->partition < n)
            out[tp->partition] = tp->offset;
    }
    rd_kafka_topic_partition_list_destroy(l);
    return e;
}

static de_err plan_partition(struct ctx *c, rd_kafka_topic_t *rkt,
                             const char *topic, int32_t partition, int64_t lo,
                             int64_t hi)
{
    int64_t from = mark_of(c, topic, partition);
    char what[300];
    reading *rd;
    de_err err;

    if (from > hi) {
        snprintf(what, sizeof what,
                 "the partition ends at offset %lld, before offset %lld "
                 "that the last checkpoint recorded (the topic was deleted "
                 "and recreated, or truncated)",
                 (long long)hi, (long long)from);
        if ((err = unverifiable(c, topic, partition, what)) != DE_OK)
            return err;
        from = lo;
    } else if (lo > from) {
        snprintf(what, sizeof what,
                 "its records from offset %lld, where the last checkpoint "
                 "left it, were deleted by the topic's retention (it now "
                 "starts at %lld)",
                 (long long)from, (long long)lo);
        if ((err = unverifiable(c, topic, partition, what)) != DE_OK)
            return err;
        from = lo;
    }
    if (from >= hi)
        return DE_OK; /* nothing written since */
    if (c->nreads == c->capreads) {
        size_t cap = c->capreads ? c->capreads * 2 : 16;
        reading *n = realloc(c->reads, cap * sizeof *n);
        if (n == NULL)
            return de__fail(DE_ERR_NOMEM, "relay recovery: out of memory");
        c->reads = n;
        c->capreads = cap;
    }
    rd = &c->reads[c->nreads];
    rd->rkt = rkt;
    rd->topic = topic;
    rd->partition = partition;
    rd->end = hi;
    rd->done = false;
    if (rd_kafka_consume_start_queue(rkt, partition, from, c->q) != 0)
        return de__fail(DE_ERR_KAFKA, "relay recovery: cannot read %s [%d]: %s",
                        topic, (int)partition,
                        rd_kafka_err2str(rd_kafka_last_error()));
    c->nreads++;
    c->res->partitions++;
    return DE_OK;
}

/* Plans the reading of one topic: every partition from its mark. */
static de_err plan_topic(struct ctx *c, const char *topic,
                         rd_kafka_topic_t **rktp)
{
    const struct rd_kafka_metadata *md = NULL;
    rd_kafka_topic_t *rkt = rd_kafka_topic_new(c->rk, topic, NULL);
    rd_kafka_resp_err_t e;
    de_err err = DE_OK;
    int64_t *lo = NULL, *hi = NULL;
    int32_t n;
    bool published = false;

    *rktp = rkt;
    if (rkt == NULL)
        return de__fail(DE_ERR_NOMEM, "relay recovery: out of memory");
    e = rd_kafka_metadata(c->rk, 0, rkt, &md, REQUEST_TIMEOUT_MS);
    if (e != RD_KAFKA_RESP_ERR_NO_ERROR)
        return de__fail(DE_ERR_KAFKA,
                        "relay recovery: no metadata for topic %s: %s", topic,
                        rd_kafka_err2str(e));
    e = md->topic_cnt == 1 ? md->topics[0].err
                           : RD_KAFKA_RESP_ERR__UNKNOWN_TOPIC;
    n = md->topic_cnt == 1 ? md->topics[0].partition_cnt : 0;
    rd_kafka_metadata_destroy(md);
    if (e == RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART ||
        e == RD_KAFKA_RESP_ERR__UNKNOWN_TOPIC) {
        for (size_t i = 0; i < c->nmarks; i++)
            published |=
                strcmp(c->marks[i].topic, topic) == 0 && c->marks[i].next > 0;
        if (!published)
            return DE_OK; /* never written to, and still not there */
        return unverifiable(c, topic, 0,
                            "the topic no longer exists, although this "
                            "outbox published to it");
    }
    if (e != RD_KAFKA_RESP_ERR_NO_ERROR || n <= 0)
        return de__fail(DE_ERR_KAFKA, "relay recovery: topic %s: %s", topic,
                        rd_kafka_err2str(e));
    if ((lo = calloc((size_t)n, sizeof *lo)) == NULL ||
        (hi = calloc((size_t)n, sizeof *hi)) == NULL) {
        free(lo);
        return de__fail(DE_ERR_NOMEM, "relay recovery: out of memory");
    }
    if ((e = de__topic_offsets(c->rk, topic, n, RD_KAFKA_OFFSET_BEGINNING, lo,
                               REQUEST_TIMEOUT_MS)) != 0 ||
        (e = de__topic_offsets(c->rk, topic, n, RD_KAFKA_OFFSET_END, hi,
                               REQUEST_TIMEOUT_MS)) != 0)
        err = de__fail(DE_ERR_KAFKA,
                       "relay recovery: cannot read where the partitions of "
                       "%s begin and end: %s",
                       topic, rd_kafka_err2str(e));
    for (int32_t p = 0; p < n && err == DE_OK; p++)
        err = plan_partition(c, rkt, topic, p, lo[p], hi[p]);
    free(lo);
    free(hi);
    return err;
}

static de_err batch_commit(struct ctx *c)
{
    if (!c->in_batch)
        return DE_OK;
    c->in_batch = false;
    c->batch_n = 0;
    return de__rstate_batch_commit(c->st);
}

/* Renews the lease while reading (a long read must not let a standby take
 * over underneath); false when the lease is someone else's now. */
static de_err beat(struct ctx *c, bool *held)
{
    int64_t now = de__now_ms(), began = de__mono_ms();
    de_err err;

    *held = true;
    if (now < c->next_beat_ms)
        return DE_OK;
    if ((err = batch_commit(c)) != DE_OK ||
        (err = de__rstate_begin(c->st, c->o->owner, now, held)) != DE_OK)
        return err;
    if (!*held)
        return DE_OK;
    if ((err = de__rstate_commit(c->st)) != DE_OK)
        return err;
    c->res->beat_ms = began;
    c->next_beat_ms = now + c->o->lease_ms / 5;
    return DE_OK;
}

static bool header(rd_kafka_headers_t *h, const char *name, char *buf,
                   size_t size, size_t *len)
{
    const void *v = NULL;
    size_t n = 0;

    if (h == NULL ||
        rd_kafka_header_get_last(h, name, &v, &n) !=
            RD_KAFKA_RESP_ERR_NO_ERROR ||
        v == NULL || n == 0 || n >= size)
        return false;
    memcpy(buf, v, n);
    buf[n] = '\0';
    *len = n;
    return true;
}

/* Notes one record if it is one of this outbox's events. */
static de_err note(struct ctx *c, const rd_kafka_message_t *m,
                   const char *topic)
{
    rd_kafka_headers_t *h = NULL;
    char source[DE__SOURCE_MAX + 1], id[DE__EVENT_ID_MAX + 1];
    char type[DE__IDENT_MAX + 1], seqs[24], epochs[24];
    char key[DE__SUBJECT_ID_MAX + 1];
    size_t n, en;
    int64_t seq = 0, epoch = 0;
    de_err err;

    c->res->records++;
    if (rd_kafka_message_headers(m, &h) != RD_KAFKA_RESP_ERR_NO_ERROR ||
        !header(h, DE__H_SOURCE, source, sizeof source, &n) ||
        strcmp(source, c->o->source) != 0)
        return DE_OK; /* another producer's record */
    if (!header(h, DE__H_ID, id, sizeof id, &n) ||
        !header(h, DE__H_SUBJECTTYPE, type, sizeof type, &n) ||
        !de__is_ident(type) ||
        !header(h, DE__H_SUBJECTSEQ, seqs, sizeof seqs, &n) ||
        !de__parse_count(seqs, n, &seq) || m->key == NULL || m->key_len == 0 ||
        m->key_len > DE__SUBJECT_ID_MAX)
        return DE_OK;
    /* No ce_subjectepoch: a numbering begun before epochs (epoch 0). */
    if (header(h, DE__H_SUBJECTEPOCH, epochs, sizeof epochs, &en) &&
        !de__parse_count(epochs, en, &epoch))
        return DE_OK;
    memcpy(key, m->key, m->key_len);
    key[m->key_len] = '\0';
    if (strlen(key) != m->key_len)
        return DE_OK; /* a NUL inside: not a subject id we recorded */
    if (!c->in_batch) {
        if ((err = de__rstate_batch_begin(c->st)) != DE_OK)
            return err;
        c->in_batch = true;
    }
    if ((err = de__rstate_found_add(c->st, id, type, key, epoch, seq, topic,
                                    m->partition, m->offset)) != DE_OK)
        return err;
    c->res->ours++;
    if (++c->batch_n >= NOTE_BATCH)
        return batch_commit(c);
    return DE_OK;
}

static reading *reading_of(struct ctx *c, const rd_kafka_message_t *m)
{
    const char *name = rd_kafka_topic_name(m->rkt);

    for (size_t i = 0; i < c->nreads; i++)
        if (c->reads[i].partition == m->partition &&
            strcmp(c->reads[i].topic, name) == 0)
            return &c->reads[i];
    return NULL;
}

/* Reads every planned partition to the end it had when reading began. */
static de_err read_all(struct ctx *c)
{
    size_t left = c->nreads;
    int64_t last_progress = de__now_ms();
    de_err err;
    bool held;

    while (left > 0) {
        rd_kafka_message_t *m;
        reading *rd;

        /* Checked before a record is taken: one taken and not destroyed
         * keeps its partition, and so rd_kafka_destroy, waiting forever
         * (a relay stopped while it recovered hung in de_relay_stop). */
        rd_kafka_poll(c->rk, 0); /* its log lines, on this thread */
        if ((err = beat(c, &held)) != DE_OK)
            return err;
        if (!held) {
            c->res->lease_lost = true;
            return DE_OK;
        }
        if (c->o->cancelled && c->o->cancelled(c->o->cancel_ctx))
            return de__fail(DE_ERR_TIMEOUT, "relay recovery: stopped");
        m = rd_kafka_consume_queue(c->q, 200);
        if (m == NULL) {
            if (de__now_ms() - last_progress > IDLE_TIMEOUT_MS)
                return de__fail(DE_ERR_KAFKA,
                                "relay recovery: no records from Kafka for "
                                "%d s with %zu partitions still to read",
                                IDLE_TIMEOUT_MS / 1000, left);
            continue;
        }
        rd = reading_of(c, m);
        if (m->err == RD_KAFKA_RESP_ERR__PARTITION_EOF) {
            if (rd != NULL && !rd->done && m->offset >= rd->end) {
                rd->done = true;
                left--;
            }
        } else if (m->err == RD_KAFKA_RESP_ERR_OFFSET_OUT_OF_RANGE) {
            /* Deleted by retention while being read. */
            const char *t = rd ? rd->topic : "?";
            rd_kafka_message_destroy(m);
            if ((err = unverifiable(c, t, rd ? rd->partition : -1,
                                    "its records were deleted by the "
                                    "topic's retention while the relay "
                                    "read them")) != DE_OK)
                return err;
            if (rd != NULL && !rd->done) {
                rd->done = true;
                left--;
            }
            continue;
        } else if (m->err) {
            de__log(c->o->conf, DE_LOG_INFO, "relay recovery: %s",
                    rd_kafka_message_errstr(m));
        } else if (rd != NULL && !rd->done) {
            last_progress = de__now_ms();
            if (m->offset < rd->end && (err = note(c, m, rd->topic)) != DE_OK) {
                rd_kafka_message_destroy(m);
                return err;
            }
            if (m->offset + 1 >= rd->end) {
                rd->done = true;
                left--;
            }
        }
        rd_kafka_message_destroy(m);
    }
    return batch_commit(c);
}

de_err de__relay_recover(de__rstate *st, const de__recover_opts *o,
                         de__recover_result *res)
{
    struct ctx c;
    rd_kafka_topic_t **rkts = NULL;
    size_t nrkts = 0;
    int64_t t0 = de__mono_us(), began;
    de_err err;
    bool held;

    memset(res, 0, sizeof *res);
    memset(&c, 0, sizeof c);
    c.st = st;
    c.o = o;
    c.res = res;
    c.next_beat_ms = de__now_ms() + o->lease_ms / 5;
    if ((err = de__rstate_found_clear(st)) != DE_OK ||
        (err = de__rstate_marks(st, add_mark, &c)) != DE_OK)
        goto done;
    if (c.nmarks == 0)
        goto done; /* never published: nothing of ours can be on Kafka */
    if ((err = reader_new(&c)) != DE_OK)
        goto done;
    if ((rkts = calloc(c.nmarks, sizeof *rkts)) == NULL) {
        err = de__fail(DE_ERR_NOMEM, "relay recovery: out of memory");
        goto done;
    }
    for (size_t i = 0; i < c.nmarks; i++) {
        if (i > 0 && strcmp(c.marks[i].topic, c.marks[i - 1].topic) == 0)
            continue; /* marks come sorted by topic */
        if ((err = plan_topic(&c, c.marks[i].topic, &rkts[nrkts++])) != DE_OK)
            goto done;
    }
    if ((err = read_all(&c)) != DE_OK || res->lease_lost)
        goto done;
    /* Raise the counters to what Kafka holds, checking (and renewing) the
     * lease. */
    began = de__mono_ms();
    if ((err = de__rstate_begin(st, o->owner, de__now_ms(), &held)) != DE_OK)
        goto done;
    if (!held) {
        res->lease_lost = true;
        goto done;
    }
    if ((err = de__rstate_found_raise(st, de__now_ms())) != DE_OK ||
        (err = de__rstate_commit(st)) != DE_OK)
        goto done;
    res->beat_ms = began;
    err = de__rstate_found_count(st, &res->landed, &res->subjects);
done:
    if (c.in_batch)
        (void)batch_commit(&c); /* what was noted stays noted */
    for (size_t i = 0; i < c.nreads; i++)
        rd_kafka_consume_stop(c.reads[i].rkt, c.reads[i].partition);
    for (size_t i = 0; i < nrkts; i++)
        if (rkts[i] != NULL)
            rd_kafka_topic_destroy(rkts[i]);
    free(rkts);
    if (c.q != NULL)
        rd_kafka_queue_destroy(c.q);
    if (c.rk != NULL)
        (void)de__rk_destroy_within(c.rk, 10000, o->conf, "relay recovery");
    for (size_t i = 0; i < c.nmarks; i++)
        free(c.marks[i].topic);
    free(c.marks);
    free(c.reads);
    res->elapsed_ms = (de__mono_us() - t0) / 1000;
    return err;
}

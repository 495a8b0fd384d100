/* SPDX-License-Identifier: MIT */
/*
 * archive.c -- deliveryevents archive: the event stream as gzip'd
 * newline-delimited CloudEvents JSON in Hive-style partitions by event
 * time, each event exactly once.
 *
 *   DIR/<topic>/dt=YYYY-MM-DD/hour=HH/<topic>+<partition>+<first>.ndjson.gz
 *   DIR/<topic>/_unparsed/<topic>+<partition>+<first>.ndjson.gz
 *   DIR/_reports/<start>-<pid>.json
 *
 * Invariants, per Kafka partition this member is assigned:
 *  - At most one file is open, and it holds one contiguous run of the
 *    partition's offsets (first .. last); an event of another hour (or a
 *    record that is not an event) closes it and starts the next.  Files of
 *    a partition therefore never overlap, and the one with the highest
 *    first offset also ends highest.
 *  - An open file lives under a hidden temporary name (".<name>.tmp",
 *    which Hive-style readers skip); it is finished, fsync'd, renamed into
 *    place and its directory fsync'd before the offset after its last is
 *    committed -- so every committed offset is on disk, and a file under
 *    its final name is complete.
 *  - Every line carries its kafkapartition and kafkaoffset.  On
 *    assignment the archiver resumes after the later of the committed
 *    offset and the last offset of the partition's newest file (a crash
 *    between rename and commit leaves such a file), commits that, and
 *    deletes the partition's leftover temporary files: nothing archived
 *    is archived again, nothing committed is missing.
 *  - After a write, fsync or rename fails (a full disk), nothing more is
 *    committed: the open files are discarded and the archiver exits 1.
 */
#include "tool.h"

#include "internal.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <zlib.h>

#define HOUR_MS 3600000LL
#define BUCKET_UNPARSED INT64_MIN /* a file of records that are not events */
#define DEFAULT_ROLL_MS 60000
#define DEFAULT_ROLL_BYTES (64L << 20)
#define ZOUT_SIZE (256 * 1024)
/* Lines are gathered and handed to deflate this many bytes at a time:
 * one deflate call per line costs more than the compressing itself. */
#define STAGE_SIZE (64 * 1024)
#define REPORT_EXAMPLES 20
#define SUBJECT_BUCKETS 65536
/* Subjects the report follows (about 150 bytes each): beyond, new
 * subjects are counted as untracked, so memory stays bounded. */
#define SUBJECT_MAX 100000

const char usage_archive[] =
    "usage: deliveryevents archive -b SERVERS --topic NAME [--topic NAME]...\n"
    "       --dir DIR [--group G] [--roll-ms N] [--roll-bytes N]\n"
    "       [--until-idle MS] [-X key=value]... [--config FILE]\n"
    "  Writes every event of the topics, exactly once, to gzip'd NDJSON\n"
    "  files (CloudEvents JSON format) under\n"
    "  DIR/<topic>/dt=YYYY-MM-DD/hour=HH/ by event time; records that are\n"
    "  not events go to DIR/<topic>/_unparsed/ with the reason; a report\n"
    "  of ce_subjectseq gaps and duplicates to DIR/_reports/.\n"
    "  -b, --bootstrap SERVERS   Kafka bootstrap servers (required)\n"
    "  --topic NAME              a topic to archive (required; repeatable)\n"
    "  --dir DIR                 the archive's root directory (required)\n"
    "  --group G                 the consumer group (default\n"
    "                            deliveryevents-archive)\n"
    "  --roll-ms N               close a file, making it durable, at most N\n"
    "                            ms after it was opened (default 60000)\n"
    "  --roll-bytes N            close a file once it holds N bytes of\n"
    "                            uncompressed lines (default 67108864)\n"
    "  --until-idle MS           exit once caught up for MS ms (default:\n"
    "                            run until SIGINT or SIGTERM)\n"
    "  -X key=value              a librdkafka property (e.g. TLS, SASL);\n"
    "                            key=@FILE reads the value from FILE\n"
    "  --config FILE             key=value lines; DELIVERYEVENTS_X_<KEY>\n"
    "                            environment variables are read too\n";

/* A growable byte buffer: one line being built. */
typedef struct buf {
    char *p;
    size_t n, cap;
    bool oom;
} buf;

/* One open file of one partition: the offsets first .. last. */
typedef struct afile {
    char final[PATH_MAX], tmp[PATH_MAX], dir[PATH_MAX];
    int fd;
    z_stream z;
    unsigned char *zout, *stage; /* deflate's output; lines not yet fed */
    size_t staged;
    int64_t first, last, bucket, opened_ms;
    uint64_t raw_bytes;
    long lines;
} afile;

/* An assigned partition. */
typedef struct apart {
    struct apart *next_ap;
    char topic[256];
    int32_t partition;
    int64_t next;      /* the next offset to archive; below: done or open */
    int64_t durable;   /* offsets below are in renamed, synced files */
    int64_t committed; /* what this member last committed (-1: nothing) */
    bool eof;          /* at the partition's end, nothing newer since */
    afile *f;
} apart;

/* ce_subjectseq as this run saw it, per subject. */
typedef struct subj {
    struct subj *next_s;
    int64_t epoch, seq;
    char id[80];
    char key[];
} subj;

typedef struct archiver {
    const char *dir;
    char *tmpl; /* topic.template: a topic's subject type */
    long roll_ms, roll_bytes;
    rd_kafka_t *rk;
    apart *parts;
    bool failed, assigned_once;
    buf line;
    de__decoded dec;
    subj **subjects;
    long events, unparsed, files, gaps, dups, conflicts, skipped;
    long subjects_n, untracked; /* subjects followed; events not */
    json_t *examples;           /* the first REPORT_EXAMPLES findings */
    int64_t started_ms;
    /* After a failed commit (a rebalance in progress, say), the loop
     * tries again no sooner than this (mono_ms), not after every record:
     * one message a second, not hundreds. */
    int64_t commit_retry_ms;
    /* For throughput: when the first and the last record were read, the
     * last file finished, and how long the final close took (0: none). */
    int64_t first_read_ms, last_read_ms, last_durable_ms, final_close_ms;
} archiver;

/* ---- lines ------------------------------------------------------------ */

static void buf_put(buf *b, const char *s, size_t n)
{
    if (b->n + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        char *np;
        while (cap < b->n + n + 1)
            cap *= 2;
        if ((np = realloc(b->p, cap)) == NULL) {
            b->oom = true;
            return;
        }
        b->p = np;
        b->cap = cap;
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
}

static void buf_lit(buf *b, const char *s)
{
    buf_put(b, s, strlen(s));
}

static void buf_int(buf *b, int64_t v)
{
    char t[32];
    buf_put(b, t, (size_t)snprintf(t, sizeof t, "%" PRId64, v));
}

/* s[0, n) as a JSON string; a byte that is not UTF-8 becomes U+FFFD (only
 * a foreign record's reason can hold one: the decoder admits events'
 * attributes only as clean UTF-8). */
static void buf_str(buf *b, const char *s, size_t n)
{
    const unsigned char *p = (const unsigned char *)s;
    size_t i = 0, run = 0;

    buf_put(b, "\"", 1);
    while (i < n) {
        size_t len;
        if (p[i] >= 0x20 && p[i] < 0x80 && p[i] != '"' && p[i] != '\\') {
            i++; /* the common case, without a call */
            run++;
            continue;
        }
        len = de__utf8_seq_len(p + i, n - i);
        if (len > 0 && p[i] >= 0x20 && p[i] != '"' && p[i] != '\\') {
            i += len;
            run += len;
            continue;
        }
        buf_put(b, s + i - run, run);
        run = 0;
        if (len == 0) {
            buf_lit(b, "\\ufffd");
        } else if (p[i] == '"' || p[i] == '\\') {
            char e[2] = {'\\', (char)p[i]};
            buf_put(b, e, 2);
        } else {
            char e[8];
            buf_put(b, e, (size_t)snprintf(e, sizeof e, "\\u%04x", p[i]));
        }
        i++;
    }
    buf_put(b, s + i - run, run);
    buf_put(b, "\"", 1);
}

static void buf_field(buf *b, const char *name, const char *v)
{
    buf_put(b, ",\"", 2);
    buf_lit(b, name);
    buf_put(b, "\":", 2);
    buf_str(b, v, strlen(v));
}

/* base64 of s[0, n) as a JSON string. */
static void buf_b64(buf *b, const unsigned char *s, size_t n)
{
    static const char tab[] =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    char q[4];

    buf_put(b, "\"", 1);
    for (size_t i = 0; i < n; i += 3) {
        unsigned v = (unsigned)s[i] << 16;
        if (i + 1 < n)
            v |= (unsigned)s[i + 1] << 8;
        if (i + 2 < n)
            v |= s[i + 2];
        q[0] = tab[(v >> 18) & 63];
        q[1] = tab[(v >> 12) & 63];
        q[2] = i + 1 < n ? tab[(v >> 6) & 63] : '=';
        q[3] = i + 2 < n ? tab[v & 63] : '=';
        buf_put(b, q, 4);
    }
    buf_put(b, "\"", 1);
}

/* One event as a CloudEvents JSON-format line: the attributes, the
 * extensions, where it was on Kafka, and data inline as the payload
 * object (JSON outside strings has no line breaks that matter, so the
 * payload's own become spaces: the line stays one line and valid). */
static void event_line(buf *b, const de_event_view *v)
{
    char t[DE__RFC3339_LEN + 1];

    b->n = 0;
    buf_lit(b, "{\"specversion\":\"1.0\"");
    buf_field(b, "id", v->event_id);
    buf_field(b, "source", v->source);
    buf_field(b, "type", v->type);
    buf_field(b, "subject", v->subject_id);
    de__rfc3339_ms(v->occurred_at_ms, t);
    buf_field(b, "time", t);
    buf_lit(b, ",\"datacontenttype\":\"application/json\"");
    buf_field(b, "subjecttype", v->subject_type);
    buf_field(b, "action", v->action);
    if (v->subject_seq > 0) {
        buf_lit(b, ",\"subjectseq\":");
        buf_int(b, v->subject_seq);
    }
    if (v->subject_epoch > 0) {
        buf_lit(b, ",\"subjectepoch\":");
        buf_int(b, v->subject_epoch);
    }
    if (v->traceparent != NULL)
        buf_field(b, "traceparent", v->traceparent);
    if (v->tracestate != NULL)
        buf_field(b, "tracestate", v->tracestate);
    buf_lit(b, ",\"kafkapartition\":");
    buf_int(b, v->partition);
    buf_lit(b, ",\"kafkaoffset\":");
    buf_int(b, v->offset);
    buf_lit(b, ",\"data\":");
    {
        size_t at = b->n;
        buf_put(b, v->payload, v->payload_len);
        if (!b->oom)
            for (size_t i = at; i < b->n; i++)
                if (b->p[i] == '\n' || b->p[i] == '\r')
                    b->p[i] = ' ';
    }
    buf_lit(b, "}\n");
}

/* A record that is not an event, as it is: why, key, headers and value
 * (base64), timestamp. */
static void unparsed_line(buf *b, const rd_kafka_message_t *m, const char *why)
{
    rd_kafka_headers_t *h = NULL;
    rd_kafka_timestamp_type_t tst;
    int64_t ts = rd_kafka_message_timestamp(m, &tst);

    b->n = 0;
    buf_lit(b, "{\"kafkapartition\":");
    buf_int(b, m->partition);
    buf_lit(b, ",\"kafkaoffset\":");
    buf_int(b, m->offset);
    buf_lit(b, ",\"timestamp\":");
    if (tst == RD_KAFKA_TIMESTAMP_NOT_AVAILABLE)
        buf_lit(b, "null");
    else
        buf_int(b, ts);
    buf_field(b, "reason", why);
    buf_lit(b, ",\"key_base64\":");
    if (m->key == NULL)
        buf_lit(b, "null");
    else
        buf_b64(b, m->key, m->key_len);
    buf_lit(b, ",\"headers\":[");
    rd_kafka_message_headers(m, &h);
    for (size_t i = 0; h != NULL; i++) {
        const char *name;
        const void *val;
        size_t size;
        if (rd_kafka_header_get_all(h, i, &name, &val, &size))
            break;
        buf_lit(b, i ? ",{\"name\":" : "{\"name\":");
        buf_str(b, name, strlen(name));
        buf_lit(b, ",\"value_base64\":");
        if (val == NULL)
            buf_lit(b, "null");
        else
            buf_b64(b, val, size);
        buf_lit(b, "}");
    }
    buf_lit(b, "],\"value_base64\":");
    if (m->payload == NULL)
        buf_lit(b, "null");
    else
        buf_b64(b, m->payload, m->len);
    buf_lit(b, "}\n");
}

/* ---- files ------------------------------------------------------------ */

static void say(const char *fmt, const char *a, const char *b)
{
    fprintf(stderr, "deliveryevents: archive: ");
    fprintf(stderr, fmt, a, b);
    fputc('\n', stderr);
}

/* snprintf into a PATH_MAX buffer: --dir is at most DIR_MAX bytes and
 * topic names at most 249, so a path the archiver makes always fits. */
#define DIR_MAX 3000
__attribute__((format(printf, 2, 3))) static void pathf(char *out,
                                                        const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    (void)vsnprintf(out, PATH_MAX, fmt, ap);
    va_end(ap);
}

/* fsync of a directory, so that an entry made or renamed in it lasts. */
static int sync_dir(const char *dir)
{
    int fd = open(dir, O_RDONLY | O_DIRECTORY), rc;

    if (fd < 0)
        return -1;
    rc = fsync(fd);
    close(fd);
    return rc;
}

/* mkdir -p, syncing the parent of every directory it makes. */
static int make_dirs(char *path)
{
    struct stat st;
    char *slash;
    int rc = 0;

    if (stat(path, &st) == 0)
        return S_ISDIR(st.st_mode) ? 0 : (errno = ENOTDIR, -1);
    slash = strrchr(path, '/');
    if (slash != NULL && slash != path) {
        *slash = '\0';
        rc = make_dirs(path);
        *slash = '/';
        if (rc != 0)
            return -1;
    }
    if (mkdir(path, 0755) != 0 && errno != EEXIST)
        return -1;
    if (slash != NULL && slash != path) {
        *slash = '\0';
        rc = sync_dir(path);
        *slash = '/';
    }
    return rc;
}

static int write_all(int fd, const unsigned char *p, size_t n)
{
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return -1;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* Runs deflate over what next_in holds with flush, writing what it
 * produces (deflate takes all the input once it has room to spare). */
static int deflate_more(afile *f, int flush)
{
    int zr;

    do {
        f->z.next_out = f->zout;
        f->z.avail_out = ZOUT_SIZE;
        zr = deflate(&f->z, flush);
        if (zr == Z_STREAM_ERROR)
            return (errno = EIO, -1);
        if (write_all(f->fd, f->zout, ZOUT_SIZE - f->z.avail_out) != 0)
            return -1;
    } while (f->z.avail_out == 0 || (flush == Z_FINISH && zr != Z_STREAM_END));
    return 0;
}

/* Feeds deflate the staged lines with flush. */
static int deflate_out(afile *f, int flush)
{
    f->z.next_in = f->stage;
    f->z.avail_in = (unsigned)f->staged;
    f->staged = 0;
    return deflate_more(f, flush);
}

static void file_free(afile *f)
{
    if (f == NULL)
        return;
    if (f->fd >= 0)
        close(f->fd);
    deflateEnd(&f->z);
    free(f->zout);
    free(f->stage);
    free(f);
}

/* Gives up an open file: its temporary name goes, its offsets stay
 * uncommitted. */
static void file_discard(afile *f)
{
    if (f != NULL)
        unlink(f->tmp);
    file_free(f);
}

static void file_name(const archiver *A, const apart *ap, int64_t bucket,
                      int64_t first, afile *f)
{
    char where[64];

    if (bucket == BUCKET_UNPARSED) {
        snprintf(where, sizeof where, "_unparsed");
    } else {
        time_t secs = (time_t)(bucket * 3600);
        struct tm tm;
        gmtime_r(&secs, &tm);
        snprintf(where, sizeof where, "dt=%04d-%02d-%02d/hour=%02d",
                 tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour);
    }
    pathf(f->dir, "%s/%s/%s", A->dir, ap->topic, where);
    pathf(f->final, "%s/%s+%d+%" PRId64 ".ndjson.gz", f->dir, ap->topic,
          (int)ap->partition, first);
    pathf(f->tmp, "%s/.%s+%d+%" PRId64 ".ndjson.gz.tmp", f->dir, ap->topic,
          (int)ap->partition, first);
}

static afile *file_open(archiver *A, const apart *ap, int64_t bucket,
                        int64_t first)
{
    afile *f = calloc(1, sizeof *f);

    if (f == NULL)
        return NULL;
    f->fd = -1;
    file_name(A, ap, bucket, first, f);
    f->first = f->last = first;
    f->bucket = bucket;
    f->opened_ms = mono_ms();
    /* windowBits 15 + 16: a gzip stream, which every engine reads. */
    if (deflateInit2(&f->z, Z_DEFAULT_COMPRESSION, Z_DEFLATED, 15 + 16, 8,
                     Z_DEFAULT_STRATEGY) != Z_OK) {
        free(f);
        return NULL;
    }
    if ((f->zout = malloc(ZOUT_SIZE)) == NULL ||
        (f->stage = malloc(STAGE_SIZE)) == NULL || make_dirs(f->dir) != 0 ||
        (f->fd = open(f->tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644)) <
            0) {
        say("cannot create %s: %s", f->tmp, strerror(errno));
        file_free(f);
        return NULL;
    }
    return f;
}

/* Finishes the gzip stream, fsyncs the file, renames it into place and
 * fsyncs its directory: after this returns 0 the file lasts a crash or a
 * power loss, and only then may its offsets be committed. */
static int file_finish(afile *f)
{
    if (deflate_out(f, Z_FINISH) != 0 || fsync(f->fd) != 0) {
        say("cannot write %s: %s", f->tmp, strerror(errno));
        return -1;
    }
    if (close(f->fd) != 0) {
        f->fd = -1;
        say("cannot write %s: %s", f->tmp, strerror(errno));
        return -1;
    }
    f->fd = -1;
    if (rename(f->tmp, f->final) != 0 || sync_dir(f->dir) != 0) {
        say("cannot put %s in place: %s", f->final, strerror(errno));
        return -1;
    }
    return 0;
}

/* ---- partitions --------------------------------------------------------- */

static apart *part_find(archiver *A, const char *topic, int32_t partition)
{
    for (apart *ap = A->parts; ap != NULL; ap = ap->next_ap)
        if (ap->partition == partition && strcmp(ap->topic, topic) == 0)
            return ap;
    return NULL;
}

/* Closes ap's open file; on success its offsets become durable. */
static void part_roll(archiver *A, apart *ap)
{
    afile *f = ap->f;

    if (f == NULL)
        return;
    ap->f = NULL;
    if (A->failed) {
        file_discard(f);
        return;
    }
    if (file_finish(f) != 0) {
        A->failed = true;
        file_discard(f);
        return;
    }
    ap->durable = f->last + 1;
    A->files++;
    A->last_durable_ms = now_ms();
    file_free(f);
}

/* Commits, synchronously, exactly the durable offsets not yet committed
 * (of all assigned partitions, or of those in only when it is not NULL). */
static void commit_durable(archiver *A,
                           const rd_kafka_topic_partition_list_t *only)
{
    rd_kafka_topic_partition_list_t *l;
    rd_kafka_resp_err_t e;
    bool any = false;

    for (apart *ap = A->parts; ap != NULL && !any; ap = ap->next_ap)
        any = ap->durable > ap->committed;
    if (!any)
        return; /* the usual case, checked after every record */
    l = rd_kafka_topic_partition_list_new(4);

    for (apart *ap = A->parts; ap != NULL; ap = ap->next_ap)
        if (ap->durable > ap->committed &&
            (only == NULL || rd_kafka_topic_partition_list_find(
                                 only, ap->topic, ap->partition) != NULL))
            rd_kafka_topic_partition_list_add(l, ap->topic, ap->partition)
                ->offset = ap->durable;
    if (l->cnt > 0) {
        e = rd_kafka_commit(A->rk, l, 0);
        if (e != RD_KAFKA_RESP_ERR_NO_ERROR) {
            /* Not fatal: the files are in place, and whoever reads the
             * partition next recognises them. */
            say("committing offsets failed (the files are in place and "
                "will be recognised): %s%s",
                rd_kafka_err2str(e), "");
            A->commit_retry_ms = mono_ms() + 1000;
        } else {
            A->commit_retry_ms = 0;
            for (int i = 0; i < l->cnt; i++) {
                apart *ap =
                    part_find(A, l->elems[i].topic, l->elems[i].partition);
                if (ap != NULL)
                    ap->committed = l->elems[i].offset;
            }
        }
    }
    rd_kafka_topic_partition_list_destroy(l);
}

/* The last offset in an archive file (from its last line's kafkaoffset);
 * -1 when it cannot be read. */
static int64_t file_last_offset(const char *path)
{
    gzFile g = gzopen(path, "rb");
    char *text = NULL, *last;
    size_t n = 0, cap = 0;
    int64_t off = -1;
    json_t *j;
    int r;

    if (g == NULL)
        return -1;
    do {
        if (cap - n < 65536) {
            char *nt = realloc(text, cap = cap ? cap * 2 : 1 << 20);
            if (nt == NULL) {
                r = -1;
                break;
            }
            text = nt;
        }
        r = gzread(g, text + n, (unsigned)(cap - n - 1));
        if (r > 0)
            n += (size_t)r;
    } while (r > 0);
    gzclose(g);
    if (r < 0 || n == 0) {
        free(text);
        return -1;
    }
    text[n] = '\0';
    while (n > 0 && text[n - 1] == '\n')
        text[--n] = '\0';
    last = strrchr(text, '\n');
    last = last ? last + 1 : text;
    if ((j = json_loads(last, 0, NULL)) != NULL) {
        json_t *o = json_object_get(j, "kafkaoffset");
        if (json_is_integer(o))
            off = json_integer_value(o);
        json_decref(j);
    }
    free(text);
    return off;
}

/* What the archive already holds of a partition: scans DIR/<topic>'s
 * directories for the partition's files, deletes its leftover temporary
 * files, and returns the offset after the last archived one (-1: none). */
static int64_t part_recover(archiver *A, const apart *ap)
{
    char top[PATH_MAX], sub[PATH_MAX], best[PATH_MAX], prefix[300],
        tprefix[301];
    int64_t best_first = -1, end = -1;
    DIR *d1, *d2, *d3;
    struct dirent *e1, *e2, *e3;
    size_t pn, tn;

    snprintf(prefix, sizeof prefix, "%s+%d+", ap->topic, (int)ap->partition);
    snprintf(tprefix, sizeof tprefix, ".%s", prefix);
    pn = strlen(prefix);
    tn = strlen(tprefix);
    pathf(top, "%s/%s", A->dir, ap->topic);
    if ((d1 = opendir(top)) == NULL)
        return -1;
    /* Files are in <topic>/_unparsed and <topic>/dt=.../hour=... */
    while ((e1 = readdir(d1)) != NULL) {
        bool unparsed = strcmp(e1->d_name, "_unparsed") == 0;
        if (!unparsed && strncmp(e1->d_name, "dt=", 3) != 0)
            continue;
        pathf(sub, "%s/%s", top, e1->d_name);
        if ((d2 = opendir(sub)) == NULL)
            continue;
        while ((e2 = readdir(d2)) != NULL) {
            char dir[PATH_MAX], path[PATH_MAX];
            if (unparsed) {
                d3 = NULL;
                pathf(dir, "%s", sub);
                e3 = e2;
            } else {
                if (strncmp(e2->d_name, "hour=", 5) != 0)
                    continue;
                pathf(dir, "%s/%s", sub, e2->d_name);
                if ((d3 = opendir(dir)) == NULL)
                    continue;
                e3 = readdir(d3);
            }
            for (; e3 != NULL; e3 = d3 ? readdir(d3) : NULL) {
                const char *name = e3->d_name;
                char *end_p;
                long long first;
                pathf(path, "%s/%s", dir, name);
                if (strncmp(name, tprefix, tn) == 0 &&
                    strstr(name, ".tmp") != NULL) {
                    unlink(path); /* a crash's unfinished file */
                } else if (strncmp(name, prefix, pn) == 0) {
                    errno = 0;
                    first = strtoll(name + pn, &end_p, 10);
                    if (errno == 0 && end_p != name + pn &&
                        strcmp(end_p, ".ndjson.gz") == 0 &&
                        first > best_first) {
                        best_first = first;
                        pathf(best, "%s", path);
                    }
                }
                if (d3 == NULL)
                    break;
            }
            if (d3 != NULL)
                closedir(d3);
        }
        closedir(d2);
    }
    closedir(d1);
    if (best_first >= 0) {
        end = file_last_offset(best);
        if (end < best_first) {
            say("cannot read the last offset of %s%s: refusing to guess "
                "where the archive ends",
                best, "");
            A->failed = true;
            return -1;
        }
        end++;
    }
    return end;
}

/* Takes (assign) or gives up partitions, eagerly or, with the
 * cooperative-sticky assignor (-X partition.assignment.strategy), only
 * those named. */
static void change_assignment(rd_kafka_t *rk,
                              const rd_kafka_topic_partition_list_t *parts,
                              bool assign)
{
    rd_kafka_error_t *e = NULL;

    if (strcmp(rd_kafka_rebalance_protocol(rk), "COOPERATIVE") == 0)
        e = assign ? rd_kafka_incremental_assign(rk, parts)
                   : rd_kafka_incremental_unassign(rk, parts);
    else
        rd_kafka_assign(rk, assign ? parts : NULL);
    if (e != NULL) {
        say("%s%s", rd_kafka_error_string(e), "");
        rd_kafka_error_destroy(e);
    }
}

static void on_rebalance(rd_kafka_t *rk, rd_kafka_resp_err_t err,
                         rd_kafka_topic_partition_list_t *parts, void *opaque)
{
    archiver *A = opaque;

    if (err == RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS) {
        rd_kafka_resp_err_t ce = rd_kafka_committed(rk, parts, 30000);
        if (ce != RD_KAFKA_RESP_ERR_NO_ERROR) {
            /* Without the committed offsets the archive alone would say
             * where to start: not enough if files were moved away. */
            say("cannot read the committed offsets: %s%s", rd_kafka_err2str(ce),
                "");
            A->failed = true;
        }
        A->assigned_once = true;
        for (int i = 0; i < parts->cnt && !A->failed; i++) {
            rd_kafka_topic_partition_t *tp = &parts->elems[i];
            apart *ap = calloc(1, sizeof *ap);
            int64_t have;
            if (ap == NULL) {
                A->failed = true;
                break;
            }
            snprintf(ap->topic, sizeof ap->topic, "%s", tp->topic);
            ap->partition = tp->partition;
            ap->committed = tp->offset >= 0 ? tp->offset : -1;
            have = part_recover(A, ap);
            ap->next = ap->committed > have ? ap->committed : have;
            ap->durable = ap->next;
            if (ap->next >= 0)
                tp->offset = ap->next;
            ap->next_ap = A->parts;
            A->parts = ap;
        }
        if (!A->failed) {
            commit_durable(A, parts); /* files found: committed now */
            change_assignment(rk, parts, true);
        } /* else the loop stops, taking nothing */
    } else {
        /* Revoked: what is open is made durable and committed before the
         * partitions go to another member. */
        for (apart *ap = A->parts; ap != NULL; ap = ap->next_ap)
            if (rd_kafka_topic_partition_list_find(parts, ap->topic,
                                                   ap->partition))
                part_roll(A, ap);
        commit_durable(A, parts);
        for (apart **pp = &A->parts; *pp != NULL;) {
            apart *ap = *pp;
            if (rd_kafka_topic_partition_list_find(parts, ap->topic,
                                                   ap->partition)) {
                *pp = ap->next_ap;
                file_discard(ap->f);
                free(ap);
            } else {
                pp = &ap->next_ap;
            }
        }
        change_assignment(rk, parts, false);
    }
}

/* ---- the per-run report of ce_subjectseq --------------------------------- */

static void finding(archiver *A, const char *kind, const de_event_view *v,
                    int64_t expected)
{
    if (json_array_size(A->examples) >= REPORT_EXAMPLES)
        return;
    json_array_append_new(
        A->examples,
        json_pack("{s:s, s:o, s:o, s:o, s:I, s:I, s:I, s:i, s:I}", "kind", kind,
                  "subject_type",
                  json_text(v->subject_type, strlen(v->subject_type)),
                  "subject", json_text(v->subject_id, strlen(v->subject_id)),
                  "id", json_text(v->event_id, strlen(v->event_id)),
                  "subjectepoch", (json_int_t)v->subject_epoch, "subjectseq",
                  (json_int_t)v->subject_seq, "expected", (json_int_t)expected,
                  "kafkapartition", (int)v->partition, "kafkaoffset",
                  (json_int_t)v->offset));
}

/* Follows each subject's numbering as consumers do: the next number is
 * in order, a lower one a duplicate (a conflict when the same number
 * comes with another ce_id), a higher one a gap.  A subject's first event
 * in this run is where it stands. */
static void track(archiver *A, const de_event_view *v)
{
    char key[600];
    unsigned long h = 5381;
    subj *s;

    if (v->subject_seq <= 0)
        return;
    snprintf(key, sizeof key, "%s/%s", v->subject_type, v->subject_id);
    for (const char *p = key; *p; p++)
        h = h * 33 + (unsigned char)*p;
    for (s = A->subjects[h % SUBJECT_BUCKETS]; s; s = s->next_s)
        if (strcmp(s->key, key) == 0)
            break;
    if (s == NULL) {
        if (A->subjects_n >= SUBJECT_MAX ||
            (s = calloc(1, sizeof *s + strlen(key) + 1)) == NULL) {
            A->untracked++;
            return;
        }
        A->subjects_n++;
        strcpy(s->key, key);
        s->next_s = A->subjects[h % SUBJECT_BUCKETS];
        A->subjects[h % SUBJECT_BUCKETS] = s;
    } else if (v->subject_epoch == s->epoch && v->subject_seq == s->seq + 1) {
        /* in order */
    } else if (v->subject_epoch > s->epoch && v->subject_seq == 1) {
        /* a new numbering */
    } else if (v->subject_epoch < s->epoch ||
               (v->subject_epoch == s->epoch && v->subject_seq <= s->seq)) {
        if (v->subject_epoch == s->epoch && v->subject_seq == s->seq &&
            strcmp(v->event_id, s->id) != 0) {
            A->conflicts++;
            finding(A, "conflict", v, s->seq + 1);
        } else {
            A->dups++;
            finding(A, "duplicate", v, s->seq + 1);
        }
        return;
    } else {
        A->gaps++;
        finding(A, "gap", v, s->seq + 1);
    }
    s->epoch = v->subject_epoch;
    s->seq = v->subject_seq;
    snprintf(s->id, sizeof s->id, "%s", v->event_id);
}

static void write_report(archiver *A)
{
    char dir[PATH_MAX], path[PATH_MAX], tmp[PATH_MAX], stamp[32];
    time_t secs = (time_t)(A->started_ms / 1000);
    struct tm tm;
    json_t *r;

    gmtime_r(&secs, &tm);
    strftime(stamp, sizeof stamp, "%Y%m%dT%H%M%SZ", &tm);
    pathf(dir, "%s/_reports", A->dir);
    pathf(path, "%s/%s-%d.json", dir, stamp, (int)getpid());
    pathf(tmp, "%s/.%s-%d.json.tmp", dir, stamp, (int)getpid());
    r = json_pack("{s:I, s:I, s:i, s:i, s:i, s:i, s:i, s:i, s:i, s:i, s:i, "
                  "s:I, s:I, s:I, s:I, s:b, s:O}",
                  "started_ms", (json_int_t)A->started_ms, "ended_ms",
                  (json_int_t)now_ms(), "events", (int)A->events, "unparsed",
                  (int)A->unparsed, "files", (int)A->files, "skipped",
                  (int)A->skipped, "gaps", (int)A->gaps, "duplicates",
                  (int)A->dups, "conflicts", (int)A->conflicts, "subjects",
                  (int)A->subjects_n, "untracked", (int)A->untracked,
                  "first_read_ms", (json_int_t)A->first_read_ms, "last_read_ms",
                  (json_int_t)A->last_read_ms, "last_durable_ms",
                  (json_int_t)A->last_durable_ms, "final_close_ms",
                  (json_int_t)A->final_close_ms, "failed", A->failed,
                  "examples", A->examples);
    if (r == NULL || make_dirs(dir) != 0 ||
        json_dump_file(r, tmp, JSON_INDENT(2)) != 0 || rename(tmp, path) != 0)
        say("cannot write the report %s: %s", path, strerror(errno));
    json_decref(r);
    fprintf(stderr,
            "deliveryevents: archive: %ld events and %ld unparsed records "
            "in %ld files; ce_subjectseq: %ld gaps, %ld duplicates, %ld "
            "conflicts (%s)\n",
            A->events, A->unparsed, A->files, A->gaps, A->dups, A->conflicts,
            path);
}

/* ---- the loop ------------------------------------------------------------ */

/* Appends a line to f's staged bytes, compressing them when full (a line
 * longer than the stage goes to deflate on its own). */
static bool stage_line(afile *f, const char *p, size_t n)
{
    if (f->staged + n > STAGE_SIZE && deflate_out(f, Z_NO_FLUSH) != 0)
        return false;
    if (n > STAGE_SIZE) {
        f->z.next_in = (unsigned char *)(uintptr_t)p;
        f->z.avail_in = (unsigned)n;
        return deflate_more(f, Z_NO_FLUSH) == 0;
    }
    memcpy(f->stage + f->staged, p, n);
    f->staged += n;
    return true;
}

static void archive_record(archiver *A, rd_kafka_message_t *m)
{
    const char *topic = rd_kafka_topic_name(m->rkt);
    apart *ap = part_find(A, topic, m->partition);
    char why[512];
    int64_t bucket;

    if (ap == NULL || m->offset < ap->next) {
        A->skipped++; /* archived already, or no longer ours */
        return;
    }
    ap->eof = false;
    A->last_read_ms = now_ms();
    if (A->first_read_ms == 0)
        A->first_read_ms = A->last_read_ms;
    if (de__envelope_decode(m, A->tmpl, &A->dec, why, sizeof why)) {
        int64_t t = A->dec.view.occurred_at_ms;
        bucket = t >= 0 ? t / HOUR_MS : -((-t + HOUR_MS - 1) / HOUR_MS);
        event_line(&A->line, &A->dec.view);
        track(A, &A->dec.view);
        A->events++;
    } else {
        bucket = BUCKET_UNPARSED;
        unparsed_line(&A->line, m, why);
        A->unparsed++;
    }
    if (A->line.oom) {
        say("out of memory archiving a record of %s%s", topic, "");
        A->failed = true;
        return;
    }
    if (ap->f != NULL && ap->f->bucket != bucket)
        part_roll(A, ap); /* a file is one contiguous run of one hour */
    if (ap->f == NULL && !A->failed &&
        (ap->f = file_open(A, ap, bucket, m->offset)) == NULL)
        A->failed = true;
    if (A->failed)
        return;
    if (!stage_line(ap->f, A->line.p, A->line.n)) {
        say("cannot write %s: %s", ap->f->tmp, strerror(errno));
        A->failed = true;
        return;
    }
    ap->f->last = m->offset;
    ap->f->raw_bytes += A->line.n;
    ap->f->lines++;
    ap->next = m->offset + 1;
    if (ap->f->raw_bytes >= (uint64_t)A->roll_bytes)
        part_roll(A, ap);
}

/* Whether every assigned partition is at its end. */
static bool caught_up(const archiver *A)
{
    if (!A->assigned_once)
        return false;
    for (const apart *ap = A->parts; ap != NULL; ap = ap->next_ap)
        if (!ap->eof)
            return false;
    return true;
}

static int archive_run(archiver *A, long until_idle)
{
    int64_t idle_since = -1;

    while (!stop_signal && !A->failed) {
        rd_kafka_message_t *m = rd_kafka_consumer_poll(A->rk, 100);
        int64_t now;
        if (m != NULL) {
            if (m->err == RD_KAFKA_RESP_ERR__PARTITION_EOF) {
                apart *ap =
                    part_find(A, rd_kafka_topic_name(m->rkt), m->partition);
                if (ap != NULL && m->offset >= ap->next)
                    ap->eof = true;
            } else if (m->err) {
                say("%s%s", rd_kafka_message_errstr(m), "");
            } else {
                archive_record(A, m);
            }
            rd_kafka_message_destroy(m);
        }
        now = mono_ms();
        for (apart *ap = A->parts; ap != NULL; ap = ap->next_ap)
            if (ap->f != NULL && now - ap->f->opened_ms >= A->roll_ms)
                part_roll(A, ap);
        if (!A->failed && now >= A->commit_retry_ms)
            commit_durable(A, NULL);
        if (until_idle >= 0) {
            if (!caught_up(A))
                idle_since = -1;
            else if (idle_since < 0)
                idle_since = now;
            else if (now - idle_since >= until_idle)
                break;
        }
    }
    /* A clean stop: everything read is made durable and committed. */
    idle_since = mono_ms();
    for (apart *ap = A->parts; ap != NULL; ap = ap->next_ap)
        part_roll(A, ap);
    if (!A->failed)
        commit_durable(A, NULL);
    A->final_close_ms = mono_ms() - idle_since;
    return A->failed ? 1 : 0;
}

/* Whether each topic exists (it is never created). */
static int topics_exist(rd_kafka_t *rk, char **topics, int n)
{
    const struct rd_kafka_metadata *md = NULL;
    rd_kafka_resp_err_t e = rd_kafka_metadata(rk, 1, NULL, &md, 10000);
    int rc = 0;

    if (e != RD_KAFKA_RESP_ERR_NO_ERROR) {
        say("cannot read the topics: %s%s", rd_kafka_err2str(e), "");
        return 1;
    }
    for (int i = 0; i < n; i++) {
        int found = 0;
        for (int k = 0; k < md->topic_cnt; k++)
            if (strcmp(md->topics[k].topic, topics[i]) == 0 &&
                !md->topics[k].err)
                found = 1;
        if (!found) {
            say("topic '%s' does not exist%s", topics[i], "");
            rc = 1;
        }
    }
    rd_kafka_metadata_destroy(md);
    return rc;
}

int cmd_archive(int argc, char **argv)
{
    const char *group = "deliveryevents-archive", *v;
    char *topics[64], err[512];
    int ntopics = 0, rc = 0;
    long until_idle = -1, roll_ms = DEFAULT_ROLL_MS,
         roll_bytes = DEFAULT_ROLL_BYTES;
    rd_kafka_conf_t *conf;
    de_conf *dconf;
    rd_kafka_topic_partition_list_t *subs;
    archiver A;
    props p;

    if (wants_help(argc, argv, usage_archive))
        return 0;
    memset(&A, 0, sizeof A);
    conf = rd_kafka_conf_new();
    dconf = de_conf_new();
    if (conf == NULL || dconf == NULL) {
        fprintf(stderr, "deliveryevents: archive: out of memory\n");
        return 1;
    }
    /* Defaults a user may override with -X: a restarted archiver gets its
     * partitions back soon. */
    rd_kafka_conf_set(conf, "session.timeout.ms", "10000", err, sizeof err);
    p = (props){"archive", dconf, conf};
    rc = props_from_env(&p);
    for (int i = 0; i < argc && rc == 0; i++) {
        const char *a = argv[i];
        if (!is_props_option(a) && strcmp(a, "--topic") != 0 &&
            strcmp(a, "--dir") != 0 && strcmp(a, "--group") != 0 &&
            strcmp(a, "--roll-ms") != 0 && strcmp(a, "--roll-bytes") != 0 &&
            strcmp(a, "--until-idle") != 0)
            rc = bad_usage("archive", "unknown argument '%s'", a);
        else if ((v = opt_value("archive", argc, argv, &i)) == NULL)
            rc = 2;
        else if (strcmp(a, "--topic") == 0) {
            if (ntopics == (int)(sizeof topics / sizeof *topics))
                rc = bad_usage("archive", "more than 64 topics (at '%s')", v);
            else if (v[0] == '\0' || strpbrk(v, "/+") != NULL)
                rc = bad_usage("archive",
                               "--topic takes a topic name, got '%s'", v);
            else
                topics[ntopics++] = (char *)(uintptr_t)v;
        } else if (strcmp(a, "--dir") == 0)
            A.dir = v;
        else if (strcmp(a, "--group") == 0)
            group = v;
        else if (strcmp(a, "--roll-ms") == 0)
            rc = parse_num("archive", a, v, 1, INT_MAX, &roll_ms) ? 2 : 0;
        else if (strcmp(a, "--roll-bytes") == 0)
            rc = parse_num("archive", a, v, 1, LONG_MAX, &roll_bytes) ? 2 : 0;
        else if (strcmp(a, "--until-idle") == 0)
            rc = parse_num("archive", a, v, 0, INT_MAX, &until_idle) ? 2 : 0;
        else
            rc = props_option(&p, a, v);
    }
    wipe_x_values(argc, argv);
    if (rc == 0 && (de_conf_get(dconf, "bootstrap.servers") == NULL ||
                    ntopics == 0 || A.dir == NULL || A.dir[0] == '\0'))
        rc = bad_usage("archive",
                       "needs -b SERVERS, --topic NAME and --dir "
                       "DIR%s",
                       "");
    if (rc == 0 && strlen(A.dir) > DIR_MAX)
        rc = bad_usage("archive",
                       "--dir takes a path of at most 3000 "
                       "bytes, got '%s'",
                       A.dir);
    if (rc == 0 && group[0] == '\0')
        rc = bad_usage("archive", "--group takes a group id, got '%s'", group);
    /* Offsets are committed by hand, only once the files are on disk. */
    if (rc == 0 &&
        (rd_kafka_conf_set(conf, "group.id", group, err, sizeof err) ||
         rd_kafka_conf_set(conf, "enable.auto.commit", "false", err,
                           sizeof err) ||
         rd_kafka_conf_set(conf, "enable.auto.offset.store", "false", err,
                           sizeof err) ||
         rd_kafka_conf_set(conf, "auto.offset.reset", "earliest", err,
                           sizeof err) ||
         rd_kafka_conf_set(conf, "enable.partition.eof", "true", err,
                           sizeof err) ||
         rd_kafka_conf_set(conf, "allow.auto.create.topics", "false", err,
                           sizeof err))) {
        fprintf(stderr, "deliveryevents: archive: %s\n", err);
        rc = 2;
    }
    if (rc == 0) {
        const char *t = de_conf_get(dconf, "topic.template");
        A.tmpl = strdup(t ? t : "{subject_type}.events");
    }
    de_conf_destroy(dconf);
    if (rc != 0) {
        rd_kafka_conf_destroy(conf);
        return rc;
    }
    {
        char dir[PATH_MAX];
        snprintf(dir, sizeof dir, "%s", A.dir);
        if (make_dirs(dir) != 0) {
            say("cannot create --dir %s: %s", A.dir, strerror(errno));
            rd_kafka_conf_destroy(conf);
            return 1;
        }
    }
    A.roll_ms = roll_ms;
    A.roll_bytes = roll_bytes;
    A.started_ms = now_ms();
    A.examples = json_array();
    A.subjects = calloc(SUBJECT_BUCKETS, sizeof *A.subjects);
    rd_kafka_conf_set_opaque(conf, &A);
    rd_kafka_conf_set_rebalance_cb(conf, on_rebalance);
    A.rk = rd_kafka_new(RD_KAFKA_CONSUMER, conf, err, sizeof err);
    if (A.rk == NULL || A.subjects == NULL || A.examples == NULL) {
        fprintf(stderr, "deliveryevents: archive: %s\n",
                A.rk ? "out of memory" : err);
        if (A.rk == NULL)
            rd_kafka_conf_destroy(conf);
        rc = 1;
        goto done;
    }
    if (topics_exist(A.rk, topics, ntopics) != 0) {
        rc = 1;
        goto done;
    }
    rd_kafka_poll_set_consumer(A.rk);
    subs = rd_kafka_topic_partition_list_new(ntopics);
    for (int i = 0; i < ntopics; i++)
        rd_kafka_topic_partition_list_add(subs, topics[i],
                                          RD_KAFKA_PARTITION_UA);
    rd_kafka_subscribe(A.rk, subs);
    rd_kafka_topic_partition_list_destroy(subs);
    catch_signals();
    /* Past a file size limit (ulimit -f) a write fails with EFBIG, which
     * is reported like any other write error, instead of killing us. */
    signal(SIGXFSZ, SIG_IGN);
    rc = archive_run(&A, until_idle);
    /* Leaving the group revokes the partitions: on_rebalance commits what
     * is durable (everything, after a clean stop). */
    rd_kafka_consumer_close(A.rk);
    write_report(&A);
done:
    if (A.rk != NULL)
        de__rk_destroy_within(A.rk, 10000, NULL, "archive");
    while (A.parts != NULL) {
        apart *ap = A.parts;
        A.parts = ap->next_ap;
        file_discard(ap->f);
        free(ap);
    }
    for (int i = 0; A.subjects != NULL && i < SUBJECT_BUCKETS; i++)
        while (A.subjects[i] != NULL) {
            subj *s = A.subjects[i];
            A.subjects[i] = s->next_s;
            free(s);
        }
    free(A.subjects);
    free(A.line.p);
    free(A.tmpl);
    de__decoded_free(&A.dec);
    json_decref(A.examples);
    return rc;
}

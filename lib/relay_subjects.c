/* SPDX-License-Identifier: MIT */
/*
 * relay_subjects.c -- the relay's table of subjects: each subject's
 * numbering (the last number given out, the last one at or below the
 * watermark, the one on disk) and whether it is blocked.
 *
 * Entries are loaded from the state file on first use and dropped again
 * when idle -- nothing in flight, nothing held back, nothing to write --
 * once the table holds more than r->subject_cache of them: each new entry
 * first evicts idle ones, a few buckets at a time from where the last
 * eviction stopped (a clock hand), so memory stays flat while a backlog
 * over millions of subjects drains.  Entries waiting for a checkpoint are
 * not idle; once they are half the cache, the next checkpoint is due at
 * once.
 *
 * Invariants: (acked_epoch, acked) <= (epoch, assigned); the persisted
 * number is at most the acked one unless the counter was raised to what
 * Kafka holds (relay_recover.c); a subject with dirty set is in r->dirty,
 * or r->dirty_overflow is set.
 */
#include "relay_int.h"

#include <stdlib.h>
#include <string.h>

static uint64_t hash_key(const char *type, size_t type_len, const char *id,
                         size_t id_len)
{
    uint64_t h = UINT64_C(14695981039346656037);

    for (size_t i = 0; i < type_len; i++)
        h = (h ^ (unsigned char)type[i]) * UINT64_C(1099511628211);
    h = (h ^ 0xff) * UINT64_C(1099511628211);
    for (size_t i = 0; i < id_len; i++)
        h = (h ^ (unsigned char)id[i]) * UINT64_C(1099511628211);
    return h ^ (h >> 29);
}

static bool subj_grow(de_relay *r)
{
    size_t n = r->nbuckets ? r->nbuckets * 2 : 4096;
    de__subj **b = calloc(n, sizeof *b);

    if (b == NULL)
        return false;
    for (size_t i = 0; i < r->nbuckets; i++) {
        de__subj *s = r->buckets[i], *next;
        for (; s; s = next) {
            next = s->hnext;
            s->hnext = b[s->hash & (n - 1)];
            b[s->hash & (n - 1)] = s;
        }
    }
    free(r->buckets);
    r->buckets = b;
    r->nbuckets = n;
    return true;
}

/*
 * Entries come from slabs of their own, in a few size classes, rather than
 * from malloc one by one: a drain over millions of subjects creates and
 * drops an entry per event, and mixing those long-lived small blocks with
 * librdkafka's per-message allocations fragmented the heap and made every
 * malloc of the relay thread slower.  Slabs are kept until the relay ends
 * (the table is bounded, so they are too).
 */
#define SLAB_BYTES 65536
static const uint16_t size_class[] = {128, 192, 256, 384, 512};
#define NCLASSES (sizeof size_class / sizeof *size_class)

struct de__subj_pool {
    void *free_[NCLASSES]; /* free blocks, linked through their first word */
    void **slabs;
    size_t nslabs, capslabs;
    char *cur[NCLASSES]; /* the slab being cut, and how much is left */
    size_t left[NCLASSES];
};

static int class_for(size_t size)
{
    for (size_t c = 0; c < NCLASSES; c++)
        if (size <= size_class[c])
            return (int)c;
    return -1;
}

static void *pool_alloc(de_relay *r, size_t size, int *cls)
{
    de__subj_pool *p = r->pool;
    int c = class_for(size);
    void *b;

    *cls = c;
    if (c < 0)
        return calloc(1, size); /* longer than any class: malloc's */
    if (p == NULL && (p = r->pool = calloc(1, sizeof *p)) == NULL)
        return NULL;
    if ((b = p->free_[c]) != NULL) {
        p->free_[c] = *(void **)b;
    } else {
        if (p->left[c] < size_class[c]) {
            char *slab;
            if (p->nslabs == p->capslabs) {
                size_t cap = p->capslabs ? p->capslabs * 2 : 16;
                void **v = realloc(p->slabs, cap * sizeof *v);
                if (v == NULL)
                    return NULL;
                p->slabs = v;
                p->capslabs = cap;
            }
            if ((slab = malloc(SLAB_BYTES)) == NULL)
                return NULL;
            p->slabs[p->nslabs++] = slab;
            p->cur[c] = slab;
            p->left[c] = SLAB_BYTES;
        }
        b = p->cur[c];
        p->cur[c] += size_class[c];
        p->left[c] -= size_class[c];
    }
    memset(b, 0, size);
    return b;
}

static void subj_free(de_relay *r, de__subj *s)
{
    free(s->error);
    if (s->pool_class < 0) {
        free(s);
        return;
    }
    *(void **)s = r->pool->free_[s->pool_class];
    r->pool->free_[s->pool_class] = s;
}

void de__subj_pool_free(de_relay *r)
{
    if (r->pool == NULL)
        return;
    for (size_t i = 0; i < r->pool->nslabs; i++)
        free(r->pool->slabs[i]);
    free(r->pool->slabs);
    free(r->pool);
    r->pool = NULL;
}

static bool subj_idle(const de__subj *s);

/* Buckets one eviction looks at, at most. */
#define EVICT_BUCKETS 64

/* Drops idle entries from the buckets after the clock hand until the
 * table is within its size or EVICT_BUCKETS were looked at. */
static void subj_evict(de_relay *r)
{
    for (int looked = 0; looked < EVICT_BUCKETS && r->nbuckets &&
                         r->nsubj >= (size_t)r->subject_cache;
         looked++) {
        de__subj **pp = &r->buckets[r->evict_at];
        while (*pp) {
            de__subj *s = *pp;
            if (subj_idle(s)) {
                *pp = s->hnext;
                subj_free(r, s);
                r->nsubj--;
            } else {
                pp = &s->hnext;
            }
        }
        r->evict_at = (r->evict_at + 1) & (r->nbuckets - 1);
    }
}

/* The entry of a subject, NULL when the table has none. */
static de__subj *subj_find(de_relay *r, uint64_t h, const char *type,
                           size_t type_len, const char *id, size_t id_len)
{
    de__subj *s;

    if (r->nbuckets == 0)
        return NULL;
    for (s = r->buckets[h & (r->nbuckets - 1)]; s; s = s->hnext)
        if (s->hash == h && s->id_len == id_len && s->type_len == type_len &&
            memcmp(DE__SUBJ_ID(s), id, id_len) == 0 &&
            memcmp(DE__SUBJ_TYPE(s), type, type_len) == 0)
            return s;
    return NULL;
}

/* A new entry for a subject the table does not hold, with its counter
 * from the state (c; NULL: read it now); NULL with the message set on
 * error. */
static de__subj *subj_add(de_relay *r, uint64_t h, const char *type,
                          size_t type_len, const char *id, size_t id_len,
                          const de__counter *c)
{
    de__counter read;
    de__subj *s;
    int cls;

    if (r->nsubj >= (size_t)r->subject_cache)
        subj_evict(r);
    if (r->nsubj >= r->nbuckets / 2 && !subj_grow(r)) {
        de__fail(DE_ERR_NOMEM, "out of memory in the subject table");
        return NULL;
    }
    s = pool_alloc(r, sizeof *s + type_len + id_len + 2, &cls);
    if (s == NULL) {
        de__fail(DE_ERR_NOMEM, "out of memory in the subject table");
        return NULL;
    }
    s->pool_class = (int8_t)cls;
    s->hash = h;
    s->type_len = type_len;
    s->id_len = id_len;
    memcpy(s->key, type, type_len + 1);
    memcpy(s->key + type_len + 1, id, id_len);
    s->key[type_len + 1 + id_len] = '\0';
    if (c == NULL) {
        if (de__rstate_get_seq(r->st, DE__SUBJ_TYPE(s), DE__SUBJ_ID(s),
                               &read) != DE_OK) {
            subj_free(r, s); /* from the pool: never free() */
            return NULL;
        }
        c = &read;
    }
    s->assigned = s->acked = s->persisted = c->seq;
    s->epoch = s->acked_epoch = s->persisted_epoch = c->epoch;
    s->last_ms = s->acked_ms = c->last_ms;
    s->hnext = r->buckets[h & (r->nbuckets - 1)];
    r->buckets[h & (r->nbuckets - 1)] = s;
    r->nsubj++;
    return s;
}

/* Finds or loads a subject's entry; NULL with the message set on error. */
de__subj *de__subj_get(de_relay *r, const char *type, const char *id,
                       size_t id_len)
{
    size_t type_len = strlen(type);
    uint64_t h = hash_key(type, type_len, id, id_len);
    de__subj *s = subj_find(r, h, type, type_len, id, id_len);

    return s != NULL ? s : subj_add(r, h, type, type_len, id, id_len, NULL);
}

/*
 * Loads the entries of the subjects among types/ids (n of them, the
 * rows a read is about to hand on) that the table does not hold, their
 * counters read in one query (de__rstate_get_seqs) rather than one per
 * subject as de__subj_get would.  The same entries as de__subj_get would
 * make, only earlier in the same read; a subject named twice is loaded
 * once.  As many as the cache takes (no more than relay.subject.cache
 * minus what is busy): the rest load one at a time.
 */
de_err de__subj_prefetch(de_relay *r, int n, const char *const *types,
                         const char *const *ids)
{
    const char **mt = malloc((size_t)n * sizeof *mt);
    const char **mi = malloc((size_t)n * sizeof *mi);
    de__counter *c = malloc((size_t)n * sizeof *c);
    int m = 0;
    de_err err = DE_OK;

    if (mt == NULL || mi == NULL || c == NULL) {
        err = de__fail(DE_ERR_NOMEM, "out of memory in the subject table");
        goto done;
    }
    for (int i = 0; i < n; i++) {
        size_t tl = strlen(types[i]), il = strlen(ids[i]);
        if (subj_find(r, hash_key(types[i], tl, ids[i], il), types[i], tl,
                      ids[i], il) == NULL) {
            mt[m] = types[i];
            mi[m++] = ids[i];
        }
    }
    if (m == 0 || (err = de__rstate_get_seqs(r->st, m, mt, mi, c)) != DE_OK)
        goto done;
    for (int i = 0; i < m; i++) {
        size_t tl = strlen(mt[i]), il = strlen(mi[i]);
        uint64_t h = hash_key(mt[i], tl, mi[i], il);
        if (subj_find(r, h, mt[i], tl, mi[i], il) == NULL &&
            subj_add(r, h, mt[i], tl, mi[i], il, &c[i]) == NULL) {
            err = DE_ERR_NOMEM; /* the only failure with a counter */
            break;
        }
    }
done:
    free(mt);
    free(mi);
    free(c);
    return err;
}

static bool subj_idle(const de__subj *s)
{
    assert(!de__number_after(s->acked_epoch, s->acked, s->epoch, s->assigned));
    return !s->dirty && !s->blocked && !s->in_blocked_list &&
           s->ring_refs == 0 && s->replaying == 0 &&
           s->assigned == s->persisted && s->epoch == s->persisted_epoch;
}

/* Drops idle entries when the table is large; they reload on demand. */
void de__subj_sweep(de_relay *r, bool all)
{
    if (!all && r->nsubj <= (size_t)r->subject_cache)
        return;
    for (size_t i = 0; i < r->nbuckets; i++) {
        de__subj **pp = &r->buckets[i];
        while (*pp) {
            de__subj *s = *pp;
            if (all || subj_idle(s)) {
                *pp = s->hnext;
                subj_free(r, s);
                r->nsubj--;
            } else {
                pp = &s->hnext;
            }
        }
    }
}

void de__subj_mark_dirty(de_relay *r, de__subj *s)
{
    assert(!de__number_after(s->acked_epoch, s->acked, s->epoch, s->assigned));
    if (s->dirty)
        return;
    /* The mark is never lost: if the list cannot grow, the next
     * checkpoint scans the whole table for it. */
    s->dirty = true;
    if (!DE__VEC_PUSH(r->dirty, s))
        r->dirty_overflow = true;
    /* Entries to write cannot be evicted: write them soon. */
    if (r->dirty.n >= (size_t)r->subject_cache / 2)
        r->next_ckpt_us = 0;
}

void de__subj_block(de_relay *r, de__subj *s, int64_t position, const char *why,
                    int64_t retry_in_ms)
{
    if (!s->blocked || position < s->blocked_from)
        s->blocked_from = position;
    if (!s->blocked)
        de__rlog(r, DE_LOG_ERR,
                 "%s %s is blocked at position %lld: %s; its later events wait "
                 "behind it, other subjects keep flowing; retrying in %lld ms "
                 "(or call de_relay_retry_blocked)",
                 DE__SUBJ_TYPE(s), DE__SUBJ_ID(s), (long long)position, why,
                 (long long)retry_in_ms);
    s->blocked = true;
    free(s->error);
    s->error = strdup(why);
    s->retry_at_ms = de__mono_ms() + retry_in_ms;
    if (!s->in_blocked_list) {
        if (DE__VEC_PUSH(r->blocked, s))
            s->in_blocked_list = true;
        else
            r->oom = true; /* start over from the watermark */
    }
}

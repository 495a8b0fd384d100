/* SPDX-License-Identifier: MIT */
/*
 * relay_subjects.c -- the relay's table of subjects: each subject's
 * numbering (the last number given out, the last one at or below the
 * watermark, the one on disk) and whether it is blocked.
 *
 * Entries are loaded from the state file on first use and dropped again
 * when idle -- nothing in flight, nothing held back, nothing to write --
 * once the table holds more than r->subject_cache of them.
 *
 * Invariants: acked <= assigned; persisted <= acked unless the counter
 * was raised to what Kafka holds (relay_recover.c); a subject with
 * dirty set is in r->dirty, or r->dirty_overflow is set.
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

static void subj_free(de__subj *s)
{
    free(s->error);
    free(s);
}

/* Finds or loads a subject's entry; NULL with the message set on error. */
de__subj *de__subj_get(de_relay *r, const char *type, const char *id,
                       size_t id_len)
{
    size_t type_len = strlen(type);
    uint64_t h = hash_key(type, type_len, id, id_len);
    de__subj *s;
    int64_t seq;

    if (r->nbuckets) {
        for (s = r->buckets[h & (r->nbuckets - 1)]; s; s = s->hnext)
            if (s->hash == h && s->id_len == id_len &&
                s->type_len == type_len &&
                memcmp(DE__SUBJ_ID(s), id, id_len) == 0 &&
                memcmp(DE__SUBJ_TYPE(s), type, type_len) == 0)
                return s;
    }
    if (r->nsubj >= r->nbuckets / 2 && !subj_grow(r)) {
        de__fail(DE_ERR_NOMEM, "out of memory in the subject table");
        return NULL;
    }
    s = calloc(1, sizeof *s + type_len + id_len + 2);
    if (s == NULL) {
        de__fail(DE_ERR_NOMEM, "out of memory in the subject table");
        return NULL;
    }
    s->hash = h;
    s->type_len = type_len;
    s->id_len = id_len;
    memcpy(s->key, type, type_len + 1);
    memcpy(s->key + type_len + 1, id, id_len);
    s->key[type_len + 1 + id_len] = '\0';
    if (de__rstate_get_seq(r->st, DE__SUBJ_TYPE(s), DE__SUBJ_ID(s), &seq) !=
        DE_OK) {
        free(s);
        return NULL;
    }
    s->assigned = s->acked = s->persisted = seq;
    s->hnext = r->buckets[h & (r->nbuckets - 1)];
    r->buckets[h & (r->nbuckets - 1)] = s;
    r->nsubj++;
    return s;
}

static bool subj_idle(const de__subj *s)
{
    assert(s->acked <= s->assigned);
    return !s->dirty && !s->blocked && !s->in_blocked_list &&
           s->ring_refs == 0 && s->replaying == 0 &&
           s->assigned == s->persisted;
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
                subj_free(s);
                r->nsubj--;
            } else {
                pp = &s->hnext;
            }
        }
    }
}

void de__subj_mark_dirty(de_relay *r, de__subj *s)
{
    assert(s->acked <= s->assigned);
    if (s->dirty)
        return;
    /* The mark is never lost: if the list cannot grow, the next
     * checkpoint scans the whole table for it. */
    s->dirty = true;
    if (!DE__VEC_PUSH(r->dirty, s))
        r->dirty_overflow = true;
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

/* SPDX-License-Identifier: MIT */
/*
 * check_relay_units.c -- the relay's pieces alone, without Kafka or a
 * thread, in milliseconds: the lease (expiry, fencing), the state file's
 * ownership, the watermark over acknowledged and held-back slots, and the
 * subject table's eviction.
 */
#include "relay_int.h"
#include "testutil.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static de__rstate *open_state(const char *outbox_id, int64_t deleted_upto)
{
    de__rstate *st = NULL;
    int64_t cursor;

    tu_ok(de__rstate_open(tu_path(tu_dir, "s.db-relay"), 0600, outbox_id,
                          deleted_upto, &st, &cursor));
    return st;
}

/* One holder at a time; an expired lease can be taken; a relay whose
 * lease was taken cannot checkpoint any more (fenced). */
START_TEST(lease_expires_and_fences)
{
    de__rstate *a = open_state("outbox-1", 0);
    de__rstate *b = open_state("outbox-1", 0);
    char holder[200];
    bool held;

    tu_ok(de__rstate_lease_acquire(a, "A", 10000, 500, &held, holder,
                                   sizeof holder));
    ck_assert(held);
    tu_ok(de__rstate_lease_acquire(b, "B", 10400, 500, &held, holder,
                                   sizeof holder));
    ck_assert(!held);
    ck_assert_msg(strstr(holder, "pid ") != NULL, "holder '%s'", holder);
    /* A renews with its checkpoint; still B cannot take it. */
    tu_ok(de__rstate_begin(a, "A", 10450, &held));
    ck_assert(held);
    tu_ok(de__rstate_put_cursor(a, 7, "e-7"));
    tu_ok(de__rstate_commit(a));
    tu_ok(de__rstate_lease_acquire(b, "B", 10900, 500, &held, holder,
                                   sizeof holder));
    ck_assert(!held);
    /* No heartbeat for longer than the timeout: B takes it. */
    tu_ok(de__rstate_lease_acquire(b, "B", 10951, 500, &held, holder,
                                   sizeof holder));
    ck_assert(held);
    /* A is fenced: its checkpoint does not begin, and the cursor stays. */
    tu_ok(de__rstate_begin(a, "A", 10960, &held));
    ck_assert(!held);
    {
        int64_t cursor;
        char id[40];
        tu_ok(de__rstate_cursor(b, &cursor, id, sizeof id));
        ck_assert_int_eq(cursor, 7);
        ck_assert_str_eq(id, "e-7");
    }
    /* Released: taken at once. */
    tu_ok(de__rstate_lease_release(b, "B"));
    tu_ok(de__rstate_lease_acquire(a, "A", 10970, 500, &held, holder,
                                   sizeof holder));
    ck_assert(held);
    de__rstate_close(a);
    de__rstate_close(b);
}
END_TEST

/* A state file belongs to one outbox; one older than the outbox's
 * cleanup is refused. */
START_TEST(foreign_or_stale_state_is_refused)
{
    de__rstate *st = open_state("outbox-1", 0), *other = NULL;
    int64_t cursor;
    char holder[200];
    bool held;

    tu_ok(de__rstate_lease_acquire(st, "A", 1, 500, &held, holder,
                                   sizeof holder));
    tu_ok(de__rstate_begin(st, "A", 1, &held));
    ck_assert(held);
    tu_ok(de__rstate_put_cursor(st, 40, NULL));
    tu_ok(de__rstate_commit(st));
    de__rstate_close(st);
    tu_assert_err(de__rstate_open(tu_path(tu_dir, "s.db-relay"), 0600,
                                  "outbox-2", 0, &other, &cursor),
                  DE_ERR_STATE, "belongs to the outbox outbox-1");
    ck_assert_ptr_null(other);
    tu_assert_err(de__rstate_open(tu_path(tu_dir, "s.db-relay"), 0600,
                                  "outbox-1", 41, &other, &cursor),
                  DE_ERR_STATE, "older than the outbox");
    tu_ok(de__rstate_open(tu_path(tu_dir, "s.db-relay"), 0600, "outbox-1", 39,
                          &other, &cursor));
    ck_assert_int_eq(cursor, 40);
    de__rstate_close(other);
}
END_TEST

/* A relay with a ring and a subject table but no thread or Kafka. */
static de_relay *bare_relay(int64_t cap)
{
    de_relay *r = de__relay_alloc(cap, de_conf_new());

    ck_assert_ptr_nonnull(r);
    r->st = open_state("outbox-1", 0);
    return r;
}

/* The watermark moves over acknowledged and held-back slots at the head
 * of the ring, in order, and stops at the first one in flight. */
START_TEST(watermark_passes_acked_and_held_back_slots)
{
    de_relay *r = bare_relay(8);
    de__subj *s = de__subj_get(r, "delivery", "D-1", 3);
    de__subj *t = de__subj_get(r, "delivery", "D-2", 3);
    de__slot *sl[5];

    ck_assert_ptr_nonnull(s);
    ck_assert_ptr_nonnull(t);
    sl[0] = de__ring_push(r, 10, 1000, s);
    sl[1] = de__ring_push(r, 11, 1000, t);
    sl[2] = de__ring_push(r, 12, 1000, s);
    sl[3] = de__ring_push(r, 14, 1000, t);
    sl[4] = de__ring_push(r, 15, 1000, s);
    ck_assert_int_eq(r->count, 5);
    /* New subjects: numbered from 1 in a numbering named after the
     * position of its first event. */
    ck_assert_int_eq(sl[0]->epoch, 10);
    ck_assert_int_eq(sl[1]->epoch, 11);
    ck_assert_int_eq(sl[2]->seq, 2); /* D-1's second event */
    ck_assert_int_eq(sl[2]->epoch, 10);
    sl[1]->state = DE__SLOT_ACKED; /* out of order: nothing moves */
    de__relay_advance(r);
    ck_assert_int_eq(r->done_pos, 0);
    sl[0]->state = DE__SLOT_ACKED;
    sl[2]->state = DE__SLOT_PARKED; /* held back: passed too */
    de__relay_advance(r);
    ck_assert_int_eq(r->done_pos, 12);
    ck_assert_int_eq(r->count, 2);
    ck_assert_int_eq(s->acked, 2);
    ck_assert_int_eq(t->acked, 1);
    ck_assert(s->dirty && t->dirty);
    sl[4]->state = DE__SLOT_ACKED; /* behind 14, in flight */
    de__relay_advance(r);
    ck_assert_int_eq(r->done_pos, 12);
    sl[3]->state = DE__SLOT_ACKED;
    de__relay_advance(r);
    ck_assert_int_eq(r->done_pos, 15);
    ck_assert_int_eq(r->count, 0);
    ck_assert_int_eq(s->ring_refs + t->ring_refs, 0);
    /* Reset to the watermark: the next number is given out again. */
    ck_assert_int_eq(s->assigned, 3);
    de__relay_reset(r);
    ck_assert_int_eq(r->read_pos, 15);
    ck_assert_int_eq(s->assigned, s->acked);
    de__relay_free(r);
}
END_TEST

/* Writes one counter in a checkpoint-like transaction of owner "A". */
static void put_counter(de_relay *r, const char *id, int64_t epoch, int64_t seq,
                        int64_t last_ms)
{
    de__counter c = {epoch, seq, last_ms};
    char holder[16];
    bool held;

    tu_ok(de__rstate_lease_acquire(r->st, "A", 1, 500, &held, holder,
                                   sizeof holder));
    tu_ok(de__rstate_begin(r->st, "A", 1, &held));
    ck_assert(held);
    tu_ok(de__rstate_put_seq(r->st, "delivery", id, &c));
    tu_ok(de__rstate_commit(r->st));
}

/* Idle subjects are dropped as new ones come in, once the table is over
 * its size -- while reading, not only when idle -- and come back with
 * their numbers from the state file; busy ones stay. */
START_TEST(idle_subjects_are_evicted_and_reload)
{
    de_relay *r = bare_relay(4);
    char id[16];
    de__subj *busy;

    r->subject_cache = 10;
    put_counter(r, "D-7", 3, 41, 1000);
    busy = de__subj_get(r, "delivery", "D-0", 3);
    ck_assert_ptr_nonnull(de__ring_push(r, 1, 1000, busy));
    for (int i = 1; i < 5000; i++) {
        snprintf(id, sizeof id, "D-%d", i);
        ck_assert_ptr_nonnull(de__subj_get(r, "delivery", id, strlen(id)));
        /* Bounded while subjects keep coming: the clock hand looks at
         * 64 of the 4096 buckets per new entry. */
        ck_assert_uint_le(r->nsubj, 10 + 4096 / 64);
    }
    ck_assert_uint_eq(r->nbuckets, 4096); /* never grew */
    de__subj_sweep(r, false);
    ck_assert_uint_eq(r->nsubj, 1); /* only the one in flight */
    ck_assert_ptr_eq(de__subj_get(r, "delivery", "D-0", 3), busy);
    ck_assert_int_eq(de__subj_get(r, "delivery", "D-7", 3)->assigned, 41);
    ck_assert_int_eq(de__subj_get(r, "delivery", "D-7", 3)->epoch, 3);
    de__relay_free(r);
}
END_TEST

/* A subject idle for longer than relay.subject.forget.ms starts a new
 * numbering at its next event: number 1, with the event's position as
 * its epoch (above the old one).  The choice depends on the rows' times
 * only, so reading again from the watermark repeats it. */
START_TEST(idle_subject_starts_a_new_numbering)
{
    de_relay *r = bare_relay(8);
    de__subj *s;
    de__slot *a, *b, *c;

    r->forget_ms = 1000;
    put_counter(r, "D-9", 7, 41, 50000);
    s = de__subj_get(r, "delivery", "D-9", 3);
    a = de__ring_push(r, 100, 51000, s); /* 1000 ms later: not idle yet */
    ck_assert_int_eq(a->epoch, 7);
    ck_assert_int_eq(a->seq, 42);
    b = de__ring_push(r, 101, 52001, s); /* 1001 ms after a: idle */
    ck_assert_int_eq(b->epoch, 101);
    ck_assert_int_eq(b->seq, 1);
    c = de__ring_push(r, 102, 52002, s);
    ck_assert_int_eq(c->epoch, 101);
    ck_assert_int_eq(c->seq, 2);
    /* Read again from the watermark (nothing acked): the same numbers. */
    de__relay_reset(r);
    ck_assert_int_eq(de__ring_push(r, 100, 51000, s)->seq, 42);
    b = de__ring_push(r, 101, 52001, s);
    ck_assert(b->epoch == 101 && b->seq == 1);
    /* With the first acknowledged, likewise. */
    de__ring_at(r, r->head_tag)->state = DE__SLOT_ACKED;
    de__relay_advance(r);
    de__relay_reset(r);
    b = de__ring_push(r, 101, 52001, s);
    ck_assert(b->epoch == 101 && b->seq == 1);
    /* Never forgotten when relay.subject.forget.ms is 0. */
    r->forget_ms = 0;
    ck_assert_int_eq(de__ring_push(r, 102, 999999999, s)->seq, 2);
    de__relay_free(r);
}
END_TEST

/* Forgetting removes only counters idle since before the bound, never one
 * of a subject with held-back events, and walks the table in slices. */
START_TEST(forgetting_spares_recent_and_held_back_subjects)
{
    de_relay *r = bare_relay(4);
    int64_t scanned, forgotten, total = 0;
    de__counter got;
    char id[16];
    bool held;

    for (int i = 0; i < 10; i++) {
        snprintf(id, sizeof id, "D-%d", i);
        put_counter(r, id, 1, 5, i < 6 ? 1000 : 9000); /* 0..5 are old */
    }
    tu_ok(de__rstate_begin(r->st, "A", 1, &held));
    tu_ok(de__rstate_park(r->st, 77, "delivery", "D-2", 1, 6, "refused", 1));
    tu_ok(de__rstate_commit(r->st));
    for (int round = 0; round < 3; round++) {
        tu_ok(de__rstate_begin(r->st, "A", 1, &held));
        tu_ok(de__rstate_forget(r->st, 5000, 4, &scanned, &forgotten));
        tu_ok(de__rstate_commit(r->st));
        ck_assert_int_le(scanned, 4);
        total += forgotten;
    }
    ck_assert_int_eq(total, 5); /* D-0..D-5 but D-2 */
    for (int i = 0; i < 10; i++) {
        snprintf(id, sizeof id, "D-%d", i);
        tu_ok(de__rstate_get_seq(r->st, "delivery", id, &got));
        ck_assert_int_eq(got.seq, (i < 6 && i != 2) ? 0 : 5);
    }
    de__relay_free(r);
}
END_TEST

/* A relay behind its outbox forgets by the age of what it still has to
 * publish, not by the clock: a subject idle for a minute by the clock,
 * while the oldest event in flight was recorded 65 s ago, may still have
 * events to come within relay.subject.forget.ms of its last. */
START_TEST(forgetting_waits_for_the_events_in_flight)
{
    de_relay *r = bare_relay(4);
    int64_t now = de__now_ms();
    char holder[64];
    de__counter got;
    de__slot *sl;
    bool held;

    snprintf(r->owner, sizeof r->owner, "A");
    r->forget_ms = 10000;
    put_counter(r, "D-1", 1, 3, now - 60000);
    tu_ok(de__rstate_lease_acquire(r->st, "A", now, 60000, &held, holder,
                                   sizeof holder));
    ck_assert(held);
    sl = de__ring_push(r, 10, now - 65000,
                       de__subj_get(r, "delivery", "D-9", 3));
    ck_assert_ptr_nonnull(sl);
    tu_ok(de__relay_forget(r));
    tu_ok(de__rstate_get_seq(r->st, "delivery", "D-1", &got));
    ck_assert_int_eq(got.seq, 3); /* kept */
    /* Caught up: now it is idle. */
    sl->state = DE__SLOT_ACKED;
    de__relay_advance(r);
    ck_assert_int_eq(r->count, 0);
    tu_ok(de__relay_forget(r));
    tu_ok(de__rstate_get_seq(r->st, "delivery", "D-1", &got));
    ck_assert_int_eq(got.seq, 0); /* forgotten */
    de__relay_free(r);
}
END_TEST

/* Activation found a later event of a subject on Kafka (numbered (100, 2))
 * while an earlier row of it (position 100, lost in flight) is still to
 * publish, and the subject's counter was last used long before: the row
 * continues Kafka's numbering rather than start a new one below it.  (A
 * relay stopped during a broker outage left exactly this; it aborted.) */
START_TEST(a_numbering_found_on_kafka_is_continued)
{
    de_relay *r = bare_relay(8);
    int64_t now = de__now_ms();
    de__subj *s;
    de__slot *sl;
    char holder[16];
    bool held;

    r->forget_ms = 1000;
    put_counter(r, "D-9", 7, 41, now - 3600000);
    tu_ok(de__rstate_found_clear(r->st));
    tu_ok(de__rstate_found_add(r->st, "ev-101", "delivery", "D-9", 100, 2,
                               "delivery.events", 0, 17));
    tu_ok(de__rstate_lease_acquire(r->st, "A", now, 60000, &held, holder,
                                   sizeof holder));
    tu_ok(de__rstate_begin(r->st, "A", now, &held));
    ck_assert(held);
    tu_ok(de__rstate_found_raise(r->st, now));
    tu_ok(de__rstate_commit(r->st));
    s = de__subj_get(r, "delivery", "D-9", 3);
    ck_assert_int_eq(s->epoch, 100);
    ck_assert_int_eq(s->assigned, 2);
    sl = de__ring_push(r, 100, now - 1800000, s);
    ck_assert_ptr_nonnull(sl);
    ck_assert_int_eq(sl->epoch, 100);
    ck_assert_int_eq(sl->seq, 3);
    /* Idle long after that, its next row starts a new numbering. */
    sl = de__ring_push(r, 101, now + 7200000, s);
    ck_assert_int_eq(sl->epoch, 101);
    ck_assert_int_eq(sl->seq, 1);
    /* Whatever the clocks say, no numbering starts at or below the one in
     * force (a counter raised to Kafka's keeps its old time if the host's
     * clock went back). */
    put_counter(r, "D-8", 300, 5, now - 3600000);
    s = de__subj_get(r, "delivery", "D-8", 3);
    sl = de__ring_push(r, 102, now, s);
    ck_assert_int_eq(sl->epoch, 300);
    ck_assert_int_eq(sl->seq, 6);
    de__relay_free(r);
}
END_TEST

static Suite *units_suite(void)
{
    Suite *s = suite_create("relay-units");
    TCase *tc = tcase_create("units");

    tcase_add_checked_fixture(tc, tu_dir_setup, tu_dir_teardown);
    tcase_add_test(tc, lease_expires_and_fences);
    tcase_add_test(tc, foreign_or_stale_state_is_refused);
    tcase_add_test(tc, watermark_passes_acked_and_held_back_slots);
    tcase_add_test(tc, idle_subjects_are_evicted_and_reload);
    tcase_add_test(tc, idle_subject_starts_a_new_numbering);
    tcase_add_test(tc, forgetting_spares_recent_and_held_back_subjects);
    tcase_add_test(tc, forgetting_waits_for_the_events_in_flight);
    tcase_add_test(tc, a_numbering_found_on_kafka_is_continued);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    return tu_run(units_suite()) ? EXIT_FAILURE : EXIT_SUCCESS;
}

/* SPDX-License-Identifier: MIT */
/*
 * tsan_c11.c -- linked only into ThreadSanitizer builds (make check-tsan).
 *
 * Debian's librdkafka uses C11 threads (thrd_create, mtx_lock, ...).  In
 * glibc those call the pthread implementation internally, past
 * ThreadSanitizer's interceptors, so TSan never learns of librdkafka's
 * threads (and crashes in its allocator on their first malloc) nor of its
 * locks (and reports races librdkafka's mutexes prevent).  Defining the
 * C11 functions here, in the executable, interposes them for librdkafka
 * and routes them through the intercepted pthread calls; glibc lays
 * thrd_t, mtx_t and cnd_t out as their pthread counterparts.
 */
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <threads.h>
#include <time.h>

struct start {
    thrd_start_t func;
    void *arg;
};

static void *trampoline(void *p)
{
    struct start s = *(struct start *)p;

    free(p);
    return (void *)(intptr_t)s.func(s.arg);
}

static int result(int rc)
{
    return rc == 0           ? thrd_success
           : rc == ENOMEM    ? thrd_nomem
           : rc == ETIMEDOUT ? thrd_timedout
           : rc == EBUSY     ? thrd_busy
                             : thrd_error;
}

int thrd_create(thrd_t *thr, thrd_start_t func, void *arg)
{
    struct start *s = malloc(sizeof *s);
    int rc;

    if (s == NULL)
        return thrd_nomem;
    s->func = func;
    s->arg = arg;
    rc = pthread_create((pthread_t *)thr, NULL, trampoline, s);
    if (rc != 0)
        free(s);
    return result(rc);
}

int thrd_join(thrd_t thr, int *res)
{
    void *ret = NULL;
    int rc = pthread_join((pthread_t)thr, &ret);

    if (rc == 0 && res != NULL)
        *res = (int)(intptr_t)ret;
    return result(rc);
}

int thrd_detach(thrd_t thr)
{
    return result(pthread_detach((pthread_t)thr));
}

int mtx_init(mtx_t *m, int type)
{
    pthread_mutexattr_t a;
    int rc;

    pthread_mutexattr_init(&a);
    if (type & mtx_recursive)
        pthread_mutexattr_settype(&a, PTHREAD_MUTEX_RECURSIVE);
    rc = pthread_mutex_init((pthread_mutex_t *)m, &a);
    pthread_mutexattr_destroy(&a);
    return result(rc);
}

int mtx_lock(mtx_t *m)
{
    return result(pthread_mutex_lock((pthread_mutex_t *)m));
}

int mtx_trylock(mtx_t *m)
{
    return result(pthread_mutex_trylock((pthread_mutex_t *)m));
}

int mtx_timedlock(mtx_t *restrict m, const struct timespec *restrict ts)
{
    return result(pthread_mutex_timedlock((pthread_mutex_t *)m, ts));
}

int mtx_unlock(mtx_t *m)
{
    return result(pthread_mutex_unlock((pthread_mutex_t *)m));
}

void mtx_destroy(mtx_t *m)
{
    pthread_mutex_destroy((pthread_mutex_t *)m);
}

int cnd_init(cnd_t *c)
{
    return result(pthread_cond_init((pthread_cond_t *)c, NULL));
}

int cnd_signal(cnd_t *c)
{
    return result(pthread_cond_signal((pthread_cond_t *)c));
}

int cnd_broadcast(cnd_t *c)
{
    return result(pthread_cond_broadcast((pthread_cond_t *)c));
}

int cnd_wait(cnd_t *c, mtx_t *m)
{
    return result(pthread_cond_wait((pthread_cond_t *)c, (pthread_mutex_t *)m));
}

int cnd_timedwait(cnd_t *restrict c, mtx_t *restrict m,
                  const struct timespec *restrict ts)
{
    return result(
        pthread_cond_timedwait((pthread_cond_t *)c, (pthread_mutex_t *)m, ts));
}

void cnd_destroy(cnd_t *c)
{
    pthread_cond_destroy((pthread_cond_t *)c);
}

void call_once(once_flag *flag, void (*func)(void))
{
    pthread_once((pthread_once_t *)flag, func);
}

/* SPDX-License-Identifier: MIT */
/*
 * ids.c -- clocks, UUIDv7 event ids and RFC 3339 timestamps.
 *
 * UUIDv7 (RFC 9562 section 5.7): 48 bits of Unix milliseconds, then a
 * 12-bit counter (method 1 of section 6.2) so that ids made by one thread
 * sort in the order they were made even within a millisecond, then 62
 * random bits.  The generator is per thread (no locks on the recording
 * path) and is reseeded from getrandom(2) after a fork, so a parent and
 * its child never share a random stream.
 */
#include "internal.h"

#include <stdio.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

int64_t de__now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int64_t de__mono_us(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

int64_t de__mono_ms(void)
{
    return de__mono_us() / 1000;
}

struct uuid_state {
    pid_t pid;     /* process that seeded s; 0 = not seeded */
    uint64_t s[4]; /* xoshiro256** state */
    int64_t last_ms;
    uint32_t counter;
};

static _Thread_local struct uuid_state us;

static uint64_t rotl(uint64_t x, int k)
{
    return (x << k) | (x >> (64 - k));
}

static uint64_t next_random(struct uuid_state *st)
{
    uint64_t *s = st->s;
    uint64_t result = rotl(s[1] * 5, 7) * 9;
    uint64_t t = s[1] << 17;

    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return result;
}

static void seed(struct uuid_state *st)
{
    size_t got = 0;

    while (got < sizeof st->s) {
        ssize_t n = getrandom((char *)st->s + got, sizeof st->s - got, 0);
        if (n <= 0)
            break;
        got += (size_t)n;
    }
    if (got < sizeof st->s) {
        /* No entropy source: fall back to clock, pid and address bits
         * (uniqueness still rests on the time prefix and the counter). */
        st->s[0] ^= (uint64_t)de__mono_us() * UINT64_C(0x9e3779b97f4a7c15);
        st->s[1] ^= (uint64_t)getpid() << 32 ^ (uint64_t)(uintptr_t)st;
        st->s[2] ^= (uint64_t)de__now_ms();
        st->s[3] |= 1;
    }
    st->pid = getpid();
    st->last_ms = 0;
}

uint64_t de__random64(void)
{
    if (us.pid != getpid())
        seed(&us);
    return next_random(&us);
}

void de__uuid7(char out[37])
{
    struct uuid_state *st = &us;
    unsigned char b[16];
    int64_t ms = de__now_ms();
    uint64_t r;

    if (st->pid != getpid())
        seed(st);
    if (ms > st->last_ms) {
        st->last_ms = ms;
        /* Start each millisecond low in the counter's range so that many
         * ids fit in it before the clock has to be stepped. */
        st->counter = (uint32_t)(next_random(st) & 0x3ff);
    } else if (++st->counter > 0xfff) {
        st->last_ms++;
        st->counter = 0;
    }
    ms = st->last_ms;
    r = next_random(st);
    for (int i = 0; i < 6; i++)
        b[i] = (unsigned char)(ms >> (40 - 8 * i));
    b[6] = (unsigned char)(0x70 | (st->counter >> 8));
    b[7] = (unsigned char)(st->counter & 0xff);
    b[8] = (unsigned char)(0x80 | ((r >> 56) & 0x3f));
    for (int i = 9; i < 16; i++)
        b[i] = (unsigned char)(r >> (8 * (15 - i)));
    de__uuid_format(b, out);
}

void de__uuid_format(const unsigned char b[16], char out[37])
{
    static const char hex[] = "0123456789abcdef";
    int o = 0;

    for (int i = 0; i < 16; i++) {
        if (i == 4 || i == 6 || i == 8 || i == 10)
            out[o++] = '-';
        out[o++] = hex[b[i] >> 4];
        out[o++] = hex[b[i] & 15];
    }
    out[o] = '\0';
}

static int hex_digit(char ch)
{
    return ch >= '0' && ch <= '9'   ? ch - '0'
           : ch >= 'a' && ch <= 'f' ? ch - 'a' + 10
                                    : -1;
}

bool de__uuid_parse(const char *text, unsigned char b[16])
{
    size_t k = 0, i;

    for (i = 0; i < 36 && text[i] != '\0'; i++) {
        int d;
        if (i == 8 || i == 13 || i == 18 || i == 23) {
            if (text[i] != '-')
                return false;
            continue;
        }
        if ((d = hex_digit(text[i])) < 0)
            return false;
        if (k % 2 == 0)
            b[k / 2] = (unsigned char)(d << 4);
        else
            b[k / 2] |= (unsigned char)d;
        k++;
    }
    return i == 36 && text[36] == '\0' && k == 32;
}

/* Days since 1970-01-01 to a proleptic Gregorian date (H. Hinnant's
 * days_from_civil inverse); valid for every day in [0, year 9999]. */
static void civil_from_days(int64_t z, int *y, int *m, int *d)
{
    z += 719468;
    int64_t era = z / 146097;
    int64_t doe = z - era * 146097;
    int64_t yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    int64_t doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    int64_t mp = (5 * doy + 2) / 153;

    *d = (int)(doy - (153 * mp + 2) / 5 + 1);
    *m = (int)(mp < 10 ? mp + 3 : mp - 9);
    *y = (int)(yoe + era * 400 + (*m <= 2));
}

/* Writes v as exactly n decimal digits. */
static char *digits(char *p, int v, int n)
{
    for (int i = n - 1; i >= 0; i--) {
        p[i] = (char)('0' + v % 10);
        v /= 10;
    }
    return p + n;
}

void de__rfc3339_ms(int64_t ms, char out[DE__RFC3339_LEN + 1])
{
    int64_t days = ms / 86400000, rem = ms % 86400000;
    int y, mo, d;
    char *p = out;

    civil_from_days(days, &y, &mo, &d);
    p = digits(p, y, 4);
    *p++ = '-';
    p = digits(p, mo, 2);
    *p++ = '-';
    p = digits(p, d, 2);
    *p++ = 'T';
    p = digits(p, (int)(rem / 3600000), 2);
    *p++ = ':';
    p = digits(p, (int)(rem / 60000 % 60), 2);
    *p++ = ':';
    p = digits(p, (int)(rem / 1000 % 60), 2);
    *p++ = '.';
    p = digits(p, (int)(rem % 1000), 3);
    *p++ = 'Z';
    *p = '\0';
}

/* Days from 1970-01-01 to a proleptic Gregorian date (H. Hinnant's
 * days_from_civil). */
static int64_t days_from_civil(int64_t y, int m, int d)
{
    y -= m <= 2;
    int64_t era = (y >= 0 ? y : y - 399) / 400;
    int64_t yoe = y - era * 400;
    int64_t doy = (153 * (m > 2 ? m - 3 : m + 9) + 2) / 5 + d - 1;
    int64_t doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;

    return era * 146097 + doe - 719468;
}

/* n decimal digits at s into *v. */
static bool take_digits(const char *s, int n, int *v)
{
    *v = 0;
    for (int i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9')
            return false;
        *v = *v * 10 + (s[i] - '0');
    }
    return true;
}

bool de__parse_rfc3339_ms(const char *s, size_t n, int64_t *out)
{
    static const int mdays[] = {31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    int y, mo, d, h, mi, sec, oh = 0, om = 0, frac = 0;
    size_t i = 19;
    int64_t ms, sign = 0;

    /* date-time: YYYY-MM-DD "T" hh:mm:ss [.frac] ("Z" / +hh:mm / -hh:mm) */
    if (n < 20 || !take_digits(s, 4, &y) || s[4] != '-' ||
        !take_digits(s + 5, 2, &mo) || s[7] != '-' ||
        !take_digits(s + 8, 2, &d) || (s[10] != 'T' && s[10] != 't') ||
        !take_digits(s + 11, 2, &h) || s[13] != ':' ||
        !take_digits(s + 14, 2, &mi) || s[16] != ':' ||
        !take_digits(s + 17, 2, &sec))
        return false;
    if (mo < 1 || mo > 12 || d < 1 || d > mdays[mo - 1] || h > 23 || mi > 59 ||
        sec > 60)
        return false;
    if (mo == 2 && d == 29 && !(y % 4 == 0 && (y % 100 != 0 || y % 400 == 0)))
        return false;
    if (s[i] == '.') {
        size_t start = ++i;
        while (i < n && s[i] >= '0' && s[i] <= '9') {
            if (i - start < 3)
                frac = frac * 10 + (s[i] - '0');
            i++;
        }
        if (i == start)
            return false;
        for (size_t k = i - start; k < 3; k++)
            frac *= 10;
    }
    if (i < n && (s[i] == 'Z' || s[i] == 'z')) {
        i++;
    } else if (i < n && (s[i] == '+' || s[i] == '-')) {
        sign = s[i] == '+' ? 1 : -1;
        if (n - i < 6 || !take_digits(s + i + 1, 2, &oh) || s[i + 3] != ':' ||
            !take_digits(s + i + 4, 2, &om) || oh > 23 || om > 59)
            return false;
        i += 6;
    } else {
        return false;
    }
    if (i != n)
        return false;
    if (sec == 60) {
        sec = 59; /* a leap second: its last representable millisecond */
        frac = 999;
    }
    ms = (days_from_civil(y, mo, d) * 86400 + h * 3600 + mi * 60 + sec) * 1000 +
         frac;
    ms -= sign * (oh * 3600 + om * 60) * 1000;
    *out = ms;
    return true;
}

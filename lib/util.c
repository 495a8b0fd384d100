/* SPDX-License-Identifier: MIT */
/*
 * util.c -- small utilities the library's files share (in the spirit of
 * libgit2's util/): the growable array behind DE__VEC, and a prefixed log
 * line.
 */
#include "internal.h"

#include <stdio.h>
#include <stdlib.h>

bool de__vec_reserve(void **v, size_t *cap, size_t need, size_t size)
{
    size_t ncap = *cap ? *cap : 8;
    void *n;

    if (need <= *cap)
        return true;
    while (ncap < need) {
        if (ncap > SIZE_MAX / 2)
            return false;
        ncap *= 2;
    }
    if (size == 0 || ncap > SIZE_MAX / size)
        return false;
    if ((n = realloc(*v, ncap * size)) == NULL)
        return false;
    *v = n;
    *cap = ncap;
    return true;
}

void de__logp(const de_conf *conf, int level, const char *prefix,
              const char *fmt, ...)
{
    char line[1024];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    de__log(conf, level, "%s%s", prefix, line);
}

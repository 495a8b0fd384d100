/* SPDX-License-Identifier: MIT */
/*
 * fuzz_json.c -- the payload rule (de__json_check, lib/validate.c) against
 * jansson, an independent parser.
 *
 * Oracle, both ways: what jansson parses as an object (duplicates
 * refused, NUL escapes allowed, nesting within our limit) we accept; what
 * we accept jansson parses too, unless jansson's only objection is a
 * number too large for its integers or doubles (we accept numbers of any
 * size, kept as written), nesting deeper than its own limit, or a
 * member name holding \u0000 (valid JSON; jansson's object keys are C
 * strings: fuzz/regressions/json/nul-key, found by this target).  jansson
 * takes a raw NUL byte between tokens as whitespace, which RFC 8259 does
 * not (fuzz/corpus/json/raw-nul, found by this target): inputs with one
 * are held to the second direction only.
 */
#include "internal.h"

#include <jansson.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static size_t depth_of(json_t *j)
{
    size_t d = 0, c;
    const char *k;
    json_t *v;
    size_t i;

    if (json_is_object(j)) {
        json_object_foreach(j, k, v)
        {
            c = depth_of(v);
            if (c > d)
                d = c;
        }
        return d + 1;
    }
    if (json_is_array(j)) {
        json_array_foreach(j, i, v)
        {
            c = depth_of(v);
            if (c > d)
                d = c;
        }
        return d + 1;
    }
    return 0;
}

/* jansson's objections that are its limits, not JSON's rules. */
static bool number_objection(const json_error_t *e)
{
    return strstr(e->text, "too big") != NULL ||
           strstr(e->text, "overflow") != NULL ||
           strstr(e->text, "NUL byte in object key") != NULL;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    de__json_error err;
    json_error_t je;
    bool ours = de__json_check((const char *)data, size, &err);
    json_t *j = json_loadb(
        (const char *)data, size,
        JSON_REJECT_DUPLICATES | JSON_ALLOW_NUL | JSON_DECODE_ANY, &je);

    if (j != NULL) {
        bool theirs = json_is_object(j) && depth_of(j) <= DE__JSON_MAX_DEPTH &&
                      memchr(data, 0, size) == NULL;
        if (theirs && !ours)
            abort(); /* jansson parsed an object we refused */
        if (ours && !json_is_object(j))
            abort(); /* we accepted a non-object */
        json_decref(j);
    } else if (ours && !number_objection(&je) &&
               strstr(je.text, "too deep") == NULL) {
        abort(); /* we accepted what jansson calls malformed */
    }
    return 0;
}

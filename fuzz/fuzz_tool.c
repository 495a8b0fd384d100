/* SPDX-License-Identifier: MIT */
/*
 * fuzz_tool.c -- the deliveryevents tool's handling of what it is given:
 * -X key=value arguments, --config files, and the record content tail
 * prints.  The tool's own source is compiled in (its main renamed), so
 * what is fuzzed is the code the tool runs, not a copy.
 *
 * Input: one selector byte, then
 *  0: bytes tail writes for a terminal (put_escaped).  Oracle: the output
 *     is clean UTF-8 text -- no control byte, no DEL, no C1 control, no
 *     bidirectional control -- whatever the input.
 *  1: bytes tail writes as a JSON string (json_text).  Oracle: a JSON
 *     string always comes back.
 *  2: "key\0value": the argument -X key=<MARK>value, for relay (the
 *     library's configuration) and for tail (librdkafka's too).  Oracle:
 *     a value is never repeated on stderr, unless the key is one of the
 *     library's own non-secret keys, whose messages quote their value.
 *  3: the lines of a --config file, each value given the marker.  Same
 *     oracle.
 */
#include <stddef.h>
#include <stdint.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int deliveryevents_tool_main(int argc, char **argv);

#define main deliveryevents_tool_main
#include "../tools/deliveryevents.c"
#undef main

#include "internal.h"

#define MARK "Q7zX"

/* Whether a message may quote key's value: the library's own keys do,
 * except the secret one; librdkafka's never may. */
static bool may_quote(const char *key)
{
    de_conf *c = de_conf_new();
    bool ours = c != NULL && de_conf_get(c, key) != NULL;

    de_conf_destroy(c);
    return ours && strcmp(key, "event.hmac.key") != 0;
}

/* Runs props_option(a, v) for relay and for tail, stderr captured;
 * aborts if a marked value shows there. */
static void props_quietly(const char *a, const char *v, bool check)
{
    for (int tail = 0; tail < 2; tail++) {
        char *out = NULL;
        size_t len = 0;
        FILE *saved = stderr, *cap = open_memstream(&out, &len);
        props p = {tail ? "tail" : "relay", de_conf_new(),
                   tail ? rd_kafka_conf_new() : NULL};

        if (cap == NULL || p.conf == NULL) {
            if (cap != NULL)
                fclose(cap);
            free(out);
            de_conf_destroy(p.conf);
            if (p.rk != NULL)
                rd_kafka_conf_destroy(p.rk);
            return;
        }
        stderr = cap;
        (void)props_option(&p, a, v);
        stderr = saved;
        fclose(cap);
        if (check && out != NULL && strstr(out, MARK) != NULL) {
            fprintf(stderr, "a value was repeated: %s\n", out);
            abort();
        }
        free(out);
        de_conf_destroy(p.conf);
        if (p.rk != NULL)
            rd_kafka_conf_destroy(p.rk);
    }
}

static void escaped(const char *s, size_t n)
{
    char *out = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&out, &len);

    if (f == NULL)
        return;
    put_escaped(f, s, n);
    fclose(f);
    if (len > 0 && !de__is_clean_utf8(out, len))
        abort(); /* a control, a bidirectional control or bad UTF-8 */
    free(out);
}

static void as_json(const char *s, size_t n)
{
    json_t *j = json_text(s, n);

    if (!json_is_string(j))
        abort();
    json_decref(j);
}

static void x_argument(const char *s, size_t n)
{
    size_t klen = strnlen(s, n);
    char *arg;

    if (klen == n || memchr(s, '=', klen) != NULL)
        return; /* the key ends at its NUL and holds no '=' */
    if ((arg = malloc(n + sizeof MARK + 1)) == NULL)
        return;
    memcpy(arg, s, klen);
    arg[klen] = '=';
    memcpy(arg + klen + 1, MARK, sizeof MARK - 1);
    memcpy(arg + klen + sizeof MARK, s + klen + 1, n - klen - 1);
    arg[n + sizeof MARK - 1] = '\0';
    if (strlen(arg + klen + 1) == n - klen - 1 + sizeof MARK - 1) {
        arg[klen] = '\0';
        bool check = !may_quote(arg) && strstr(arg, MARK) == NULL;
        arg[klen] = '=';
        props_quietly("-X", arg, check);
    }
    free(arg);
}

static void config_file(const char *s, size_t n)
{
    static char path[64];
    char *text = malloc(2 * n + 16), *keys = malloc(n + 1);
    size_t o = 0, ko = 0;
    bool check = true, at_key = true;
    FILE *f;

    if (text == NULL || keys == NULL)
        goto done;
    if (path[0] == '\0')
        snprintf(path, sizeof path, "/tmp/fuzz_tool_config.%d", (int)getpid());
    /* Each line's value gets the marker after its first '='. */
    for (size_t i = 0; i < n; i++) {
        text[o++] = s[i];
        if (at_key && s[i] == '=') {
            memcpy(text + o, MARK, sizeof MARK - 1);
            o += sizeof MARK - 1;
            keys[ko] = '\0';
            while (ko > 0 && (keys[ko - 1] == ' ' || keys[ko - 1] == '\t'))
                keys[--ko] = '\0';
            {
                const char *k = keys;
                while (*k == ' ' || *k == '\t')
                    k++;
                if (may_quote(k) || strstr(k, MARK) != NULL)
                    check = false;
            }
            at_key = false;
        } else if (s[i] == '\n') {
            at_key = true;
            ko = 0;
        } else if (at_key) {
            keys[ko++] = s[i];
        }
    }
    if (memchr(s, '\0', n) != NULL || memchr(s, '\r', n) != NULL)
        check = false; /* lines the file reader sees otherwise */
    if ((f = fopen(path, "w")) == NULL)
        goto done;
    fwrite(text, 1, o, f);
    fclose(f);
    props_quietly("--config", path, check);
    unlink(path);
done:
    free(text);
    free(keys);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *s = (const char *)data + 1;

    if (size < 1)
        return 0;
    switch (data[0] % 4) {
    case 0: escaped(s, size - 1); break;
    case 1: as_json(s, size - 1); break;
    case 2: x_argument(s, size - 1); break;
    default: config_file(s, size - 1); break;
    }
    return 0;
}

/* SPDX-License-Identifier: MIT */
/*
 * check_conf.c -- configuration: library keys validated against their
 * type and range, every other key validated by librdkafka at set time,
 * and a failed set leaving the configuration as it was.
 */
#include "testutil.h"

#include "internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

START_TEST(defaults_are_documented_values)
{
    ck_assert_str_eq(de_conf_get(NULL, "topic.template"),
                     "{subject_type}.events");
    ck_assert_str_eq(de_conf_get(NULL, "event.source"), "/deliveryevents");
    ck_assert_str_eq(de_conf_get(NULL, "event.type.prefix"), "");
    ck_assert_str_eq(de_conf_get(NULL, "event.max.bytes"), "990000");
    ck_assert_str_eq(de_conf_get(NULL, "outbox.retention.ms"), "0");
    ck_assert_str_eq(de_conf_get(NULL, "outbox.busy.timeout.ms"), "5000");
    ck_assert_ptr_null(de_conf_get(NULL, "bootstrap.servers"));
    ck_assert_ptr_null(de_conf_get(NULL, "no.such.key"));
}
END_TEST

/* docs/CONFIGURATION.md lists every library key with its default, and
 * the defaults there are the library's. */
START_TEST(configuration_doc_matches_the_library)
{
    FILE *f = fopen("docs/CONFIGURATION.md", "r");
    char line[4096];
    int documented[DE__K_COUNT] = {0};

    ck_assert_msg(f != NULL, "run from the repository root: "
                             "docs/CONFIGURATION.md not found");
    while (fgets(line, sizeof line, f)) {
        char key[128], def[256];
        const char *p = line, *q;
        if (strncmp(p, "| `", 3) != 0)
            continue;
        p += 3;
        q = strchr(p, '`');
        if (q == NULL || (size_t)(q - p) >= sizeof key)
            continue;
        memcpy(key, p, (size_t)(q - p));
        key[q - p] = '\0';
        p = strstr(q, "| ");
        if (p == NULL)
            continue;
        p += 2;
        if (strncmp(p, "*(empty", 7) == 0) {
            def[0] = '\0';
        } else if (*p == '`' && (q = strchr(p + 1, '`')) != NULL) {
            memcpy(def, p + 1, (size_t)(q - p - 1));
            def[q - p - 1] = '\0';
        } else {
            continue;
        }
        for (int k = 0; k < DE__K_COUNT; k++) {
            if (strcmp(de__conf_key_name(k), key) != 0)
                continue;
            documented[k] = 1;
            ck_assert_msg(strcmp(de_conf_get(NULL, key), def) == 0,
                          "%s: documented default '%s', library's '%s'", key,
                          def, de_conf_get(NULL, key));
        }
    }
    fclose(f);
    for (int k = 0; k < DE__K_COUNT; k++)
        ck_assert_msg(documented[k], "%s is not in docs/CONFIGURATION.md",
                      de__conf_key_name(k));
}
END_TEST

START_TEST(library_keys_are_validated)
{
    de_conf *c = de_conf_new();

    ck_assert_ptr_nonnull(c);
    tu_ok(de_conf_set(c, "event.max.bytes", "4096"));
    ck_assert_str_eq(de_conf_get(c, "event.max.bytes"), "4096");
    tu_assert_err(de_conf_set(c, "event.max.bytes", "12abc"), DE_ERR_CONFIG,
                  "event.max.bytes '12abc' must be an integer from 1024");
    tu_assert_err(de_conf_set(c, "event.max.bytes", "10"), DE_ERR_CONFIG,
                  "'10'");
    tu_assert_err(de_conf_set(c, "event.max.bytes", ""), DE_ERR_CONFIG, "''");
    tu_assert_err(de_conf_set(c, "event.max.bytes", "99999999999999999999"),
                  DE_ERR_CONFIG, "'99999999999999999999'");
    /* A failed set leaves the earlier value. */
    ck_assert_str_eq(de_conf_get(c, "event.max.bytes"), "4096");

    tu_ok(de_conf_set(c, "topic.template", "prod.{subject_type}.v1"));
    tu_assert_err(de_conf_set(c, "topic.template", "{action}.events"),
                  DE_ERR_CONFIG, "unknown placeholder");
    tu_assert_err(de_conf_set(c, "topic.template", "bad topic"), DE_ERR_CONFIG,
                  "'bad topic' is not a topic name");
    tu_assert_err(de_conf_set(c, "topic.template", ""), DE_ERR_CONFIG,
                  "must not be empty");
    ck_assert_str_eq(de_conf_get(c, "topic.template"),
                     "prod.{subject_type}.v1");

    tu_ok(de_conf_set(c, "event.source", "/delivery-service/eu-1"));
    tu_assert_err(de_conf_set(c, "event.source", ""), DE_ERR_CONFIG,
                  "event.source ''");
    tu_assert_err(de_conf_set(c, "event.source", "a\nb"), DE_ERR_CONFIG,
                  "'a\\x0ab'");
    /* An RFC 3986 URI reference, as CloudEvents requires of source. */
    {
        static const char *const good[] = {
            "/delivery-service/eu-1",
            "urn:example:delivery",
            "https://svc.example.com:8443/a/b?x=1&y=%20#f",
            "//host/path",
            "mailto:ops@example.com",
            "delivery-service",
            "http://[2001:db8::1]/x",
            "a/b:c",
            "%C3%A9t%C3%A9",
        };
        static const char *const bad[][2] = {
            {"/delivery service", "'/delivery service'"},
            {"/d\xc3\xa9j\xc3\xa0", "RFC 3986"},
            {"/50%", "'/50%'"},
            {"/a%zz", "'/a%zz'"},
            {"1http://x", "'1http://x'"},
            {"http://host:80x/", "'http://host:80x/'"},
            {"/a#b#c", "'/a#b#c'"},
            {"/a<b>", "'/a<b>'"},
            {"http://[::1/x", "'http://[::1/x'"},
        };
        for (size_t i = 0; i < sizeof good / sizeof *good; i++) {
            tu_ok(de_conf_set(c, "event.source", good[i]));
            ck_assert_str_eq(de_conf_get(c, "event.source"), good[i]);
        }
        for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
            tu_assert_err(de_conf_set(c, "event.source", bad[i][0]),
                          DE_ERR_CONFIG, bad[i][1]);
            /* A failed set leaves the last good value. */
            ck_assert_str_eq(de_conf_get(c, "event.source"),
                             good[sizeof good / sizeof *good - 1]);
        }
    }
    tu_ok(de_conf_set(c, "event.type.prefix", "com.example."));
    tu_assert_err(de_conf_set(c, "event.type.prefix", "com/example"),
                  DE_ERR_CONFIG, "'com/example'");
    tu_assert_err(de_conf_set(c, "outbox.retention.ms", "-1"), DE_ERR_CONFIG,
                  "outbox.retention.ms '-1'");
    de_conf_destroy(c);
}
END_TEST

START_TEST(other_keys_are_validated_by_librdkafka)
{
    de_conf *c = de_conf_new();

    tu_ok(de_conf_set(c, "bootstrap.servers", "localhost:9092"));
    ck_assert_str_eq(de_conf_get(c, "bootstrap.servers"), "localhost:9092");
    tu_ok(de_conf_set(c, "bootstrap.servers", "broker:9092"));
    ck_assert_str_eq(de_conf_get(c, "bootstrap.servers"), "broker:9092");
    tu_ok(de_conf_set(c, "compression.type", "lz4"));
    tu_assert_err(de_conf_set(c, "compression.type", "zip"), DE_ERR_CONFIG,
                  "librdkafka refused the value of compression.type");
    ck_assert_ptr_nonnull(strstr(de_errmsg(), "Invalid value \"<value>\""));
    ck_assert_str_eq(de_conf_get(c, "compression.type"), "lz4");
    tu_assert_err(de_conf_set(c, "bootstrap.server", "x"), DE_ERR_CONFIG,
                  "unknown configuration property 'bootstrap.server'");
    tu_assert_err(de_conf_set(c, "socket.timeout.ms", "-3"), DE_ERR_CONFIG,
                  "socket.timeout.ms");
    de_conf_destroy(c);
}
END_TEST

/* Values of librdkafka properties may be secrets: a refused one is never
 * repeated, whatever librdkafka's own message says; the key is named. */
START_TEST(refused_secrets_are_never_repeated)
{
    static const char *const cases[][2] = {
        {"sasl.oauthbearer.client.secret", "S3cr3tXYZ-oauth"},
        {"sasl.mechanism", "Hunter2-mech"},
        {"compression.type", "Hunter2-codec"},
        {"batch.size", "-77123"},
        {"enable.idempotence", "Hunter2-bool"},
    };
    de_conf *c = de_conf_new();

    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        de_err err = de_conf_set(c, cases[i][0], cases[i][1]);
        if (err == DE_OK)
            continue; /* this librdkafka build takes it: nothing to show */
        ck_assert_int_eq(err, DE_ERR_CONFIG);
        ck_assert_msg(strstr(de_errmsg(), cases[i][1]) == NULL,
                      "%s's value repeated: %s", cases[i][0], de_errmsg());
        ck_assert_msg(strstr(de_errmsg(), cases[i][0]) != NULL,
                      "%s not named: %s", cases[i][0], de_errmsg());
    }
    /* At least the bad number and the bad boolean are refused anywhere. */
    tu_assert_err(de_conf_set(c, "batch.size", "-77123"), DE_ERR_CONFIG,
                  "outside allowed range");
    tu_assert_err(de_conf_set(c, "enable.idempotence", "Hunter2-bool"),
                  DE_ERR_CONFIG, "enable.idempotence");
    /* A long value librdkafka cuts short in its message: not even the
     * part it kept is shown (found by fuzz/fuzz_conf.c). */
    {
        char longv[700];
        memset(longv, 'w', sizeof longv - 1);
        memcpy(longv, "Hunter2-long", 12);
        longv[sizeof longv - 1] = '\0';
        tu_assert_err(de_conf_set(c, "compression.type", longv), DE_ERR_CONFIG,
                      "compression.type");
        ck_assert_ptr_null(strstr(de_errmsg(), "Hunter2"));
        ck_assert_ptr_null(strstr(de_errmsg(), "wwww"));
    }
    /* A secret that is accepted is kept for the client, and replaced. */
    tu_ok(de_conf_set(c, "sasl.password", "Hunter2-first"));
    tu_ok(de_conf_set(c, "sasl.password", "Hunter2-second"));
    ck_assert_str_eq(de_conf_get(c, "sasl.password"), "Hunter2-second");
    de_conf_destroy(c);
}
END_TEST

/* The trust keys: checked at set time, and event.hmac.key, a secret, is
 * never repeated in a message, not even the part that is right. */
START_TEST(trust_keys_are_validated)
{
    de_conf *c = de_conf_new();

    tu_ok(de_conf_set(c, "consumer.sources", "/delivery-service,urn:x:y"));
    tu_assert_err(de_conf_set(c, "consumer.sources", "/a,,/b"), DE_ERR_CONFIG,
                  "consumer.sources '/a,,/b' must be a comma-separated list");
    tu_assert_err(de_conf_set(c, "consumer.sources", "/a\n"), DE_ERR_CONFIG,
                  "'/a\\x0a'");
    ck_assert_str_eq(de_conf_get(c, "consumer.sources"),
                     "/delivery-service,urn:x:y");
    tu_ok(de_conf_set(c, "consumer.seq.max.jump", "0"));
    tu_assert_err(de_conf_set(c, "consumer.seq.max.jump", "-1"), DE_ERR_CONFIG,
                  "consumer.seq.max.jump '-1' must be an integer from 0");
    tu_assert_err(de_conf_set(c, "consumer.record.max.bytes", "100"),
                  DE_ERR_CONFIG, "from 1024");
    tu_ok(de_conf_set(c, "event.hmac.key",
                      "k1:Hunter2-0123456789abcdef0123456789ab"));
    tu_assert_err(de_conf_set(c, "event.hmac.key", "k1:Hunter2-short"),
                  DE_ERR_CONFIG, "the secret of key 1 is 13 bytes");
    ck_assert_ptr_null(strstr(de_errmsg(), "Hunter2"));
    tu_assert_err(de_conf_set(c, "event.hmac.key",
                              "k1:Hunter2-0123456789abcdef0123456789ab,"
                              "k 2:Hunter2-0123456789abcdef0123456789ab"),
                  DE_ERR_CONFIG, "the id of key 2");
    ck_assert_ptr_null(strstr(de_errmsg(), "Hunter2"));
    tu_assert_err(de_conf_set(c, "event.hmac.key",
                              "Hunter2-0123456789abcdef0123456789ab"),
                  DE_ERR_CONFIG, "no ':'");
    ck_assert_ptr_null(strstr(de_errmsg(), "Hunter2"));
    /* A refused value leaves the one set. */
    ck_assert_str_eq(de_conf_get(c, "event.hmac.key"),
                     "k1:Hunter2-0123456789abcdef0123456789ab");
    de_conf_destroy(c);
}
END_TEST

START_TEST(null_arguments)
{
    de_conf *c = de_conf_new();

    tu_assert_err(de_conf_set(NULL, "a", "b"), DE_ERR_ARG, "NULL conf");
    tu_assert_err(de_conf_set(c, NULL, "b"), DE_ERR_ARG, "NULL key");
    tu_assert_err(de_conf_set(c, "event.source", NULL), DE_ERR_ARG,
                  "NULL value");
    ck_assert_ptr_null(de_conf_get(c, NULL));
    de_conf_destroy(c);
    de_conf_destroy(NULL);
}
END_TEST

START_TEST(outbox_copies_its_configuration)
{
    /* The caller may destroy conf right after de_outbox_open. */
    char *dir = tu_mkdtemp();
    sqlite3 *db = tu_open(tu_path(dir, "s.db"));
    de_conf *c = de_conf_new();
    de_outbox *ob = NULL;
    de_event ev = {0};
    char payload[3000];

    tu_ok(de_conf_set(c, "event.max.bytes", "2048"));
    tu_ok(de_outbox_open(db, c, &ob));
    tu_ok(de_conf_set(c, "event.max.bytes", "900000"));
    de_conf_destroy(c);
    memset(payload, ' ', sizeof payload - 1);
    payload[0] = '{';
    payload[sizeof payload - 2] = '}';
    payload[sizeof payload - 1] = '\0';
    ev.subject_type = "delivery";
    ev.subject_id = "D-1";
    ev.action = "created";
    ev.payload = payload;
    tu_exec(db, "BEGIN");
    tu_assert_err(de_record(ob, &ev, NULL), DE_ERR_PAYLOAD,
                  "event.max.bytes 2048");
    tu_exec(db, "COMMIT");
    de_outbox_close(ob);
    sqlite3_close(db);
    tu_rmdir(dir);
}
END_TEST

START_TEST(error_names_and_version)
{
    ck_assert_str_eq(de_err_name(DE_OK), "DE_OK");
    ck_assert_str_eq(de_err_name(DE_ERR_TIMEOUT), "DE_ERR_TIMEOUT");
    ck_assert_str_eq(de_err_name((de_err)999), "DE_ERR_UNKNOWN");
    ck_assert_int_eq(DE_ERR_ARG, 1);
    ck_assert_int_eq(DE_ERR_TIMEOUT, 10);
    char v[32];
    snprintf(v, sizeof v, "%d.%d.%d", DE_VERSION_MAJOR, DE_VERSION_MINOR,
             DE_VERSION_PATCH);
    ck_assert_str_eq(de_version(), v);
}
END_TEST

static Suite *conf_suite(void)
{
    Suite *s = suite_create("conf");
    TCase *tc = tcase_create("conf");

    tcase_add_test(tc, defaults_are_documented_values);
    tcase_add_test(tc, library_keys_are_validated);
    tcase_add_test(tc, configuration_doc_matches_the_library);
    tcase_add_test(tc, other_keys_are_validated_by_librdkafka);
    tcase_add_test(tc, refused_secrets_are_never_repeated);
    tcase_add_test(tc, trust_keys_are_validated);
    tcase_add_test(tc, null_arguments);
    tcase_add_test(tc, outbox_copies_its_configuration);
    tcase_add_test(tc, error_names_and_version);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    return tu_run(conf_suite()) ? EXIT_FAILURE : EXIT_SUCCESS;
}

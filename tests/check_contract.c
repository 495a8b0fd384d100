/* SPDX-License-Identifier: MIT */
/*
 * check_contract.c -- event contracts: the JSON Schema subset compiled by
 * lib/contract.c and the checks it runs on payloads.
 *
 * What a user relies on: every supported keyword accepts what draft
 * 2020-12 accepts and refuses the rest with DE_ERR_CONTRACT and a message
 * naming the path, the rule and the value (asserted here word for word);
 * anything outside the subset is refused when the contract is compiled,
 * naming the keyword and where it is; hostile schemas are refused or
 * bounded (depth, enum size, pattern size, $ref cycles) and catastrophic
 * patterns finish quickly; and results are deterministic, which a
 * differential test checks on thousands of random schemas against a
 * naive interpreter written independently below.
 */
#include "testutil.h"

#include "contract.h"

#include <jansson.h>
#include <locale.h>
#include <pthread.h>
#include <regex.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define LABEL "delivery.assigned v1"

/*
 * JSON written with single quotes, so that the cases stay readable:
 * J("{'a':1}") is {"a":1}, and a backtick is a literal single quote.  The
 * result lives in one of 8 rotating static buffers.
 */
static const char *J(const char *s)
{
    static char bufs[8][16384];
    static int next;
    char *out = bufs[next++ % 8];
    size_t o = 0;

    for (size_t i = 0; s[i]; i++) {
        ck_assert_uint_lt(o, sizeof bufs[0] - 2);
        out[o++] = s[i] == '\'' ? '"' : s[i] == '`' ? '\'' : s[i];
    }
    out[o] = '\0';
    return out;
}

static de__contract *compile_ok_at(const char *schema, const char *file,
                                   int line)
{
    de__contract *s = NULL;
    de_err e = de__contract_compile(schema, strlen(schema), &s);

    ck_assert_msg(e == DE_OK, "%s:%d: compiling %s: %s: %s", file, line, schema,
                  de_err_name(e), de_errmsg());
    ck_assert_ptr_nonnull(s);
    return s;
}
#define compile_ok(schema) compile_ok_at((schema), __FILE__, __LINE__)

/* The schema is refused with exactly `want` (a prefix when it ends in
 * "..."). */
static void refused_at(const char *schema, size_t len, const char *want,
                       const char *file, int line)
{
    de__contract *s = (de__contract *)&s; /* must be reset to NULL */
    de_err e = de__contract_compile(schema, len, &s);
    size_t wl = strlen(want);

    ck_assert_msg(e == DE_ERR_CONTRACT,
                  "%s:%d: compiling %.200s gave %s (%s), expected "
                  "DE_ERR_CONTRACT",
                  file, line, schema, de_err_name(e), de_errmsg());
    ck_assert_msg(s == NULL, "%s:%d: *out not NULL after a failure", file,
                  line);
    if (wl > 3 && strcmp(want + wl - 3, "...") == 0)
        ck_assert_msg(strncmp(de_errmsg(), want, wl - 3) == 0,
                      "%s:%d: message\n  %s\ndoes not start with\n  %.*s", file,
                      line, de_errmsg(), (int)(wl - 3), want);
    else
        ck_assert_msg(strcmp(de_errmsg(), want) == 0,
                      "%s:%d: message\n  %s\nexpected\n  %s", file, line,
                      de_errmsg(), want);
}
#define refused(schema, want)                                                  \
    refused_at((schema), strlen(schema), (want), __FILE__, __LINE__)

/* Checks instance against a compiled schema: want NULL means valid,
 * otherwise the exact message after "delivery.assigned v1: ". */
static void verdict_at(const de__contract *s, const char *instance,
                       const char *want, const char *file, int line)
{
    json_error_t jerr;
    json_t *v = json_loads(instance, JSON_ALLOW_NUL | JSON_DECODE_ANY, &jerr);
    char full[1024];
    de_err e;

    ck_assert_msg(v != NULL, "%s:%d: bad test instance %s: %s", file, line,
                  instance, jerr.text);
    e = de__contract_validate(s, v, LABEL);
    json_decref(v);
    if (want == NULL) {
        ck_assert_msg(e == DE_OK, "%s:%d: %s was refused: %s", file, line,
                      instance, de_errmsg());
        return;
    }
    snprintf(full, sizeof full, "%s: %s", LABEL, want);
    ck_assert_msg(e == DE_ERR_CONTRACT, "%s:%d: %s gave %s, expected %s", file,
                  line, instance, de_err_name(e), full);
    ck_assert_msg(strcmp(de_errmsg(), full) == 0,
                  "%s:%d: %s: message\n  %s\nexpected\n  %s", file, line,
                  instance, de_errmsg(), full);
}
#define verdict(s, instance, want)                                             \
    verdict_at((s), (instance), (want), __FILE__, __LINE__)
#define valid(s, instance) verdict_at((s), (instance), NULL, __FILE__, __LINE__)

/* A schema with one property "a" whose schema is `sub` (single-quoted). */
static de__contract *prop_schema_at(const char *sub, const char *file, int line)
{
    char buf[8192];

    snprintf(buf, sizeof buf, "{'type':'object','properties':{'a':%s}}", sub);
    return compile_ok_at(J(buf), file, line);
}
#define prop_schema(sub) prop_schema_at((sub), __FILE__, __LINE__)

static void prop_refused_at(const char *sub, const char *want, const char *file,
                            int line)
{
    char buf[8192];
    const char *j;

    snprintf(buf, sizeof buf, "{'type':'object','properties':{'a':%s}}", sub);
    j = J(buf);
    refused_at(j, strlen(j), want, file, line);
}
#define prop_refused(sub, want)                                                \
    prop_refused_at((sub), (want), __FILE__, __LINE__)

/* ---- type ------------------------------------------------------------- */

START_TEST(type_keyword)
{
    de__contract *s;

    s = prop_schema("{'type':'string'}");
    valid(s, J("{'a':'x'}"));
    valid(s, "{}");
    verdict(s, J("{'a':1}"), "$.a must be a string, got 1");
    verdict(s, J("{'a':null}"), "$.a must be a string, got null");
    de__contract_free(s);

    /* 2020-12: an integer is a number without a fractional part, so 1.0
     * and 1e2 are integers, 1.5 is not. */
    s = prop_schema("{'type':'integer'}");
    valid(s, J("{'a':1}"));
    valid(s, J("{'a':-7}"));
    valid(s, J("{'a':1.0}"));
    valid(s, J("{'a':1e2}"));
    valid(s, J("{'a':1e300}"));
    verdict(s, J("{'a':1.5}"), "$.a must be an integer, got 1.5");
    verdict(s, J("{'a':'1'}"), "$.a must be an integer, got '1'");
    verdict(s, J("{'a':true}"), "$.a must be an integer, got true");
    de__contract_free(s);

    s = prop_schema("{'type':'number'}");
    valid(s, J("{'a':1}"));
    valid(s, J("{'a':-0.25}"));
    verdict(s, J("{'a':'x'}"), "$.a must be a number, got 'x'");
    de__contract_free(s);

    s = prop_schema("{'type':'boolean'}");
    valid(s, J("{'a':true}"));
    valid(s, J("{'a':false}"));
    verdict(s, J("{'a':0}"), "$.a must be a boolean, got 0");
    de__contract_free(s);

    s = prop_schema("{'type':'null'}");
    valid(s, J("{'a':null}"));
    verdict(s, J("{'a':false}"), "$.a must be null, got false");
    de__contract_free(s);

    s = prop_schema("{'type':'array'}");
    valid(s, J("{'a':[]}"));
    verdict(s, J("{'a':{}}"), "$.a must be an array, got '{}'");
    de__contract_free(s);

    s = prop_schema("{'type':'object'}");
    valid(s, J("{'a':{}}"));
    verdict(s, J("{'a':[1,'x']}"), "$.a must be an object, got '[1,\"x\"]'");
    de__contract_free(s);

    s = prop_schema("{'type':['string','null']}");
    valid(s, J("{'a':'x'}"));
    valid(s, J("{'a':null}"));
    verdict(s, J("{'a':5}"), "$.a must be a string or null, got 5");
    de__contract_free(s);

    s = prop_schema("{'type':['null','array','object']}");
    verdict(s, J("{'a':2.5}"),
            "$.a must be an object, an array or null, got 2.5");
    de__contract_free(s);

    s = prop_schema("{'type':['integer','number']}");
    valid(s, J("{'a':2.5}"));
    verdict(s, J("{'a':'2'}"), "$.a must be a number, got '2'");
    de__contract_free(s);

    /* The top level is always an object schema. */
    s = compile_ok(J("{'type':'object'}"));
    valid(s, "{}");
    verdict(s, "[1]", "$ must be an object, got '[1]'");
    verdict(s, "\"x\"", "$ must be an object, got 'x'");
    de__contract_free(s);

    prop_refused("{'type':'text'}",
                 "contract schema: 'type' at $.properties.a must name "
                 "object, array, string, integer, number, boolean or null, "
                 "got 'text'");
    prop_refused("{'type':[]}", "contract schema: 'type' at $.properties.a "
                                "must not be an empty array");
    prop_refused("{'type':['string','string']}",
                 "contract schema: 'type' at $.properties.a lists 'string' "
                 "twice");
    prop_refused("{'type':5}", "contract schema: 'type' at $.properties.a "
                               "must be a type name or an array of them, "
                               "got 5");
    prop_refused("{'type':['string',null]}",
                 "contract schema: 'type' at $.properties.a must name "
                 "object, array, string, integer, number, boolean or null, "
                 "got null");
}
END_TEST

START_TEST(top_level_is_an_object_schema)
{
    refused("{}", "contract schema: the top level must say \"type\": "
                  "\"object\" (a payload is a JSON object), got no 'type'");
    refused(J("{'type':'array'}"),
            "contract schema: the top level must say \"type\": \"object\" "
            "(a payload is a JSON object), got 'array'");
    refused(J("{'type':['object','null']}"),
            "contract schema: the top level must say \"type\": \"object\" "
            "(a payload is a JSON object), got '[\"object\",\"null\"]'");
    refused("[]", "contract schema: the schema at $ must be a JSON object, "
                  "got '[]'");
    refused("{\"type\":", "contract schema: not valid JSON (...");
    refused("{\"type\":\"object\"} x", "contract schema: not valid JSON (...");
    refused("{\"type\":\"object\",\"type\":\"object\"}",
            "contract schema: not valid JSON (duplicate object key near "
            "'\"type\"' at line 1, column 23)");
    refused(J("{'type':'object','$ref':'#/$defs/a','$defs':{'a':{}}}"),
            "contract schema: '$ref' at $ cannot stand for the top level, "
            "which must say \"type\": \"object\" itself");

    /* A one-element type array naming object is the same thing. */
    de__contract_free(compile_ok(J("{'type':['object']}")));
    ck_assert_int_eq(de__contract_compile(NULL, 0, &(de__contract *){NULL}),
                     DE_ERR_CONTRACT);
    de__contract_free(NULL); /* a no-op */
}
END_TEST

/* ---- objects ------------------------------------------------------------ */

START_TEST(properties_and_additional_properties)
{
    de__contract *s;

    /* Undeclared members are refused unless additionalProperties is true:
     * this library's default differs from plain JSON Schema. */
    s = compile_ok(J("{'type':'object','properties':{'rider_id':{'type':"
                     "'string'}}}"));
    valid(s, J("{'rider_id':'R-7'}"));
    valid(s, "{}");
    verdict(s, J("{'rider_id':'R-7','tip':1}"),
            "$.tip is not allowed (additionalProperties is false)");
    de__contract_free(s);

    s = compile_ok(J("{'type':'object','additionalProperties':false}"));
    verdict(s, J("{'x':1}"),
            "$.x is not allowed (additionalProperties is false)");
    de__contract_free(s);

    s = compile_ok(J("{'type':'object','additionalProperties':true,"
                     "'properties':{'a':{'type':'string'}}}"));
    valid(s, J("{'a':'x','tip':1,'more':{'any':[1]}}"));
    verdict(s, J("{'a':1}"), "$.a must be a string, got 1");
    de__contract_free(s);

    /* Nested object schemas get the same default; {} and true accept any
     * value, objects included; false refuses the member. */
    s = compile_ok(J("{'type':'object','properties':{'o':{'type':'object',"
                     "'properties':{'b':{}}},'any':{},'t':true,'f':false}}"));
    valid(s, J("{'o':{'b':[1,{'z':null}]},'any':{'x':1},'t':{'y':2}}"));
    verdict(s, J("{'o':{'b':1,'c':2}}"),
            "$.o.c is not allowed (additionalProperties is false)");
    verdict(s, J("{'f':1}"), "$.f is not allowed (its schema is false)");
    de__contract_free(s);

    /* Names that are not identifiers are quoted in paths. */
    s = compile_ok(J("{'type':'object','properties':{'my key':{'type':"
                     "'string'},'it`s':{'type':'string'},'1st':{'type':"
                     "'string'},'a.b':{'type':'string'},'$x_1':{'type':"
                     "'string'}}}"));
    verdict(s, J("{'my key':1}"), "$['my key'] must be a string, got 1");
    verdict(s, J("{'it`s':1}"), "$['it\\'s'] must be a string, got 1");
    verdict(s, J("{'1st':1}"), "$['1st'] must be a string, got 1");
    verdict(s, J("{'a.b':1}"), "$['a.b'] must be a string, got 1");
    verdict(s, J("{'$x_1':1}"), "$.$x_1 must be a string, got 1");
    verdict(s, J("{'new\\nline':1}"),
            "$['new\\x0aline'] is not allowed (additionalProperties is "
            "false)");
    de__contract_free(s);

    prop_refused("{'type':'object','additionalProperties':{}}",
                 "contract schema: 'additionalProperties' at $.properties.a "
                 "must be true or false (schemas are not supported here), "
                 "got '{}'");
    refused(J("{'type':'object','properties':[]}"),
            "contract schema: 'properties' at $ must be an object of "
            "schemas, got '[]'");
    refused(J("{'type':'object','properties':{'a':5}}"),
            "contract schema: the schema at $.properties.a must be a JSON "
            "object or true/false, got 5");
    prop_refused("{'type':'string','properties':{}}",
                 "contract schema: 'properties' at $.properties.a needs "
                 "'type' to include \"object\" (it applies to objects only, "
                 "and any other value would skip it)");
    prop_refused("{'additionalProperties':true}",
                 "contract schema: 'additionalProperties' at $.properties.a "
                 "needs 'type' to include \"object\" (it applies to objects "
                 "only, and any other value would skip it)");
}
END_TEST

START_TEST(required_keyword)
{
    de__contract *s;

    s = compile_ok(J("{'type':'object','properties':{'rider_id':{'type':"
                     "'string'},'eta_min':{'type':'integer'},'note':{}},"
                     "'required':['rider_id','eta_min']}"));
    valid(s, J("{'rider_id':'R-7','eta_min':5}"));
    valid(s, J("{'eta_min':5,'rider_id':'R-7','note':1}"));
    verdict(s, J("{'eta_min':5}"), "$.rider_id is required");
    /* Missing ones are reported in the order 'required' lists them... */
    verdict(s, J("{'note':1}"), "$.rider_id is required");
    verdict(s, J("{'rider_id':'R'}"), "$.eta_min is required");
    /* ...after anything wrong with the members present. */
    verdict(s, J("{'eta_min':1.5}"), "$.eta_min must be an integer, got 1.5");
    de__contract_free(s);

    /* With additionalProperties true a required name need not be
     * declared. */
    s = compile_ok(J("{'type':'object','additionalProperties':true,"
                     "'required':['a','b']}"));
    valid(s, J("{'a':1,'b':2,'c':3}"));
    verdict(s, J("{'a':1}"), "$.b is required");
    de__contract_free(s);

    s = compile_ok(J("{'type':'object','required':[]}"));
    valid(s, "{}");
    de__contract_free(s);

    refused(J("{'type':'object','required':'a'}"),
            "contract schema: 'required' at $ must be an array of property "
            "names, got 'a'");
    refused(J("{'type':'object','required':[1]}"),
            "contract schema: 'required' at $ must list property names "
            "(strings), got 1");
    refused(J("{'type':'object','properties':{'a':{}},'required':['a','a']}"),
            "contract schema: 'required' at $ lists 'a' twice");
    refused(J("{'type':'object','properties':{'a':{}},'required':['b']}"),
            "contract schema: 'required' at $ lists 'b', which 'properties' "
            "does not declare; with additionalProperties false no payload "
            "could ever satisfy this contract");
    refused(J("{'type':'object','properties':{'a':false},'required':['a']}"),
            "contract schema: 'required' at $ lists 'a', whose schema is "
            "false; no payload could ever satisfy this contract");
}
END_TEST

/* ---- enum and const ------------------------------------------------------ */

START_TEST(enum_keyword)
{
    de__contract *s;
    char buf[4096];
    size_t o;

    s = prop_schema("{'enum':['assigned','picked_up']}");
    valid(s, J("{'a':'assigned'}"));
    valid(s, J("{'a':'picked_up'}"));
    verdict(s, J("{'a':'lost'}"),
            "$.a must be one of 'assigned', 'picked_up', got 'lost'");
    verdict(s, J("{'a':'assigne'}"),
            "$.a must be one of 'assigned', 'picked_up', got 'assigne'");
    verdict(s, J("{'a':1}"),
            "$.a must be one of 'assigned', 'picked_up', got 1");
    de__contract_free(s);

    /* Numbers compare by value: 1 and 1.0 are the same number. */
    s = prop_schema("{'type':'number','enum':[1,2.5,-3]}");
    valid(s, J("{'a':1}"));
    valid(s, J("{'a':1.0}"));
    valid(s, J("{'a':2.5}"));
    valid(s, J("{'a':-3.0}"));
    verdict(s, J("{'a':3}"), "$.a must be one of 1, 2.5, -3, got 3");
    verdict(s, J("{'a':1.000001}"),
            "$.a must be one of 1, 2.5, -3, got 1.000001");
    de__contract_free(s);

    s = prop_schema("{'enum':[null,true,'x',{'k':[1,2]},[1,{'z':1}]]}");
    valid(s, J("{'a':null}"));
    valid(s, J("{'a':true}"));
    valid(s, J("{'a':{'k':[1.0,2]}}"));
    valid(s, J("{'a':[1,{'z':1.0}]}"));
    verdict(s, J("{'a':false}"),
            "$.a must be one of null, true, 'x', '{\"k\":[1,2]}', "
            "'[1,{\"z\":1}]', got false");
    verdict(s, J("{'a':{'k':[2,1]}}"),
            "$.a must be one of null, true, 'x', '{\"k\":[1,2]}', "
            "'[1,{\"z\":1}]', got '{\"k\":[2,1]}'");
    de__contract_free(s);

    /* A long list is cut in the message. */
    o = (size_t)snprintf(buf, sizeof buf, "{'enum':[");
    for (int i = 0; i < 100; i++)
        o += (size_t)snprintf(buf + o, sizeof buf - o, "%s'value_%02d'",
                              i ? "," : "", i);
    snprintf(buf + o, sizeof buf - o, "]}");
    s = prop_schema(buf);
    valid(s, J("{'a':'value_99'}"));
    verdict(s, J("{'a':'value_100'}"),
            "$.a must be one of 'value_00', 'value_01', 'value_02', "
            "'value_03', 'value_04', 'value_05', 'value_06', 'value_07', "
            "'value_08', 'value_09', 'value_10', 'value_11', 'value_12', "
            "'value_13', 'value_14', 'value_15', 'value_16', 'value_17', ... "
            "(100 values), got "
            "'value_100'");
    de__contract_free(s);

    prop_refused("{'enum':'a'}", "contract schema: 'enum' at $.properties.a "
                                 "must be an array, got 'a'");
    prop_refused("{'enum':[]}", "contract schema: 'enum' at $.properties.a "
                                "must list at least one value (an empty "
                                "enum allows nothing)");
    prop_refused("{'enum':['a','b','a']}",
                 "contract schema: 'enum' at $.properties.a lists 'a' twice");
    prop_refused("{'enum':[1,2,1.0]}",
                 "contract schema: 'enum' at $.properties.a lists 1.0 twice "
                 "(numbers compare by value: 1 and 1.0 are equal)");
    prop_refused("{'enum':[{'a':1},{'a':1.0}]}",
                 "contract schema: 'enum' at $.properties.a lists "
                 "'{\"a\":1.0}' twice");
    prop_refused("{'enum':[null,null]}",
                 "contract schema: 'enum' at $.properties.a lists null twice");
    prop_refused("{'type':'string','enum':['a',1]}",
                 "contract schema: 'enum' at $.properties.a lists 1, which "
                 "'type' does not allow (it could never be accepted)");
    prop_refused("{'type':'integer','enum':[1,1.5]}",
                 "contract schema: 'enum' at $.properties.a lists 1.5, which "
                 "'type' does not allow (it could never be accepted)");
}
END_TEST

START_TEST(huge_enum_is_capped)
{
    size_t cap = 16 * (DE__CONTRACT_ENUM_MAX + 2) + 128, o;
    char *buf = malloc(cap);
    de__contract *s;
    json_t *v;

    ck_assert_ptr_nonnull(buf);
    for (int n = DE__CONTRACT_ENUM_MAX; n <= DE__CONTRACT_ENUM_MAX + 1; n++) {
        o = (size_t)snprintf(buf, cap,
                             "{\"type\":\"object\",\"properties\":{\"a\":{"
                             "\"enum\":[");
        for (int i = 0; i < n; i++)
            o += (size_t)snprintf(buf + o, cap - o, "%s\"v%d\"", i ? "," : "",
                                  i);
        o += (size_t)snprintf(buf + o, cap - o, "]}}}");
        if (n > DE__CONTRACT_ENUM_MAX) {
            refused_at(buf, o,
                       "contract schema: 'enum' at $.properties.a has 1025 "
                       "values, over the limit of 1024",
                       __FILE__, __LINE__);
            continue;
        }
        s = compile_ok(buf);
        for (int i = 0; i < n; i += 97) {
            char inst[64];
            snprintf(inst, sizeof inst, "{\"a\":\"v%d\"}", i);
            valid(s, inst);
        }
        v = json_pack("{s:s}", "a", "v1024");
        ck_assert_int_eq(de__contract_validate(s, v, LABEL), DE_ERR_CONTRACT);
        ck_assert_ptr_nonnull(strstr(de_errmsg(), "(1024 values), got "
                                                  "'v1024'"));
        json_decref(v);
        de__contract_free(s);
    }
    free(buf);
}
END_TEST

START_TEST(const_keyword)
{
    de__contract *s;

    s = prop_schema("{'const':'delivery'}");
    valid(s, J("{'a':'delivery'}"));
    verdict(s, J("{'a':'pickup'}"),
            "$.a must be 'delivery' (const), got 'pickup'");
    de__contract_free(s);

    s = prop_schema("{'const':1}");
    valid(s, J("{'a':1.0}"));
    verdict(s, J("{'a':2}"), "$.a must be 1 (const), got 2");
    verdict(s, J("{'a':'1'}"), "$.a must be 1 (const), got '1'");
    de__contract_free(s);

    s = prop_schema("{'const':{'k':[1,2],'m':null}}");
    valid(s, J("{'a':{'m':null,'k':[1,2.0]}}"));
    verdict(s, J("{'a':{'k':[2,1],'m':null}}"),
            "$.a must be '{\"k\":[1,2],\"m\":null}' (const), got "
            "'{\"k\":[2,1],\"m\":null}'");
    verdict(s, J("{'a':{'k':[1,2]}}"),
            "$.a must be '{\"k\":[1,2],\"m\":null}' (const), got "
            "'{\"k\":[1,2]}'");
    de__contract_free(s);

    s = prop_schema("{'const':null}");
    valid(s, J("{'a':null}"));
    verdict(s, J("{'a':false}"), "$.a must be null (const), got false");
    de__contract_free(s);

    prop_refused("{'const':1,'enum':[1]}",
                 "contract schema: 'const' at $.properties.a cannot be "
                 "combined with 'enum' (use one of them)");
    prop_refused("{'type':'string','const':1}",
                 "contract schema: 'const' at $.properties.a is 1, which "
                 "'type' does not allow (it could never be accepted)");
}
END_TEST

/* ---- strings ------------------------------------------------------------- */

START_TEST(min_and_max_length_count_code_points)
{
    de__contract *s;

    s = prop_schema("{'type':'string','minLength':2,'maxLength':5}");
    valid(s, J("{'a':'ab'}"));
    valid(s, J("{'a':'abcde'}"));
    /* 5 code points in 6 bytes; one emoji is 4 bytes. */
    valid(s, J("{'a':'h\u00e9llo'}"));
    valid(s, J("{'a':'\U0001F600\U0001F600'}"));
    verdict(s, J("{'a':'a'}"),
            "$.a must be at least 2 characters long (minLength), got 'a' "
            "(1)");
    verdict(s, "{\"a\":\"\\ud83d\\ude00\"}",
            "$.a must be at least 2 characters long (minLength), got "
            "'\U0001F600' (1)");
    verdict(s, J("{'a':'abcdef'}"),
            "$.a must be at most 5 characters long (maxLength), got "
            "'abcdef' (6)");
    verdict(s, J("{'a':'\u00e9\u00e9\u00e9\u00e9\u00e9\u00e9'}"),
            "$.a must be at most 5 characters long (maxLength), got "
            "'\u00e9\u00e9\u00e9\u00e9\u00e9\u00e9' (6)");
    /* Not a string: the length rules do not apply. */
    de__contract_free(s);

    s = prop_schema("{'type':['string','integer'],'maxLength':1}");
    valid(s, J("{'a':12345}"));
    verdict(s, J("{'a':'ab'}"),
            "$.a must be at most 1 characters long (maxLength), got 'ab' "
            "(2)");
    de__contract_free(s);

    /* 2.0 is an integer (2020-12). */
    s = prop_schema("{'type':'string','minLength':2.0,'maxLength':3.0e0}");
    de__contract_free(s);
    s = prop_schema("{'type':'string','minLength':0}");
    valid(s, J("{'a':''}"));
    de__contract_free(s);

    prop_refused("{'type':'string','minLength':-1}",
                 "contract schema: 'minLength' at $.properties.a must be a "
                 "non-negative integer, got -1");
    prop_refused("{'type':'string','maxLength':1.5}",
                 "contract schema: 'maxLength' at $.properties.a must be a "
                 "non-negative integer, got 1.5");
    prop_refused("{'type':'string','maxLength':'3'}",
                 "contract schema: 'maxLength' at $.properties.a must be a "
                 "non-negative integer, got '3'");
    prop_refused("{'type':'string','minLength':5,'maxLength':3}",
                 "contract schema: 'minLength' at $.properties.a is 5, over "
                 "maxLength 3; no string could ever satisfy both");
    prop_refused("{'minLength':3}",
                 "contract schema: 'minLength' at $.properties.a needs "
                 "'type' to include \"string\" (it applies to strings only, "
                 "and any other value would skip it)");
}
END_TEST

START_TEST(pattern_keyword)
{
    de__contract *s;
    char *big;

    s = prop_schema("{'type':'string','pattern':'^[A-Z]{3}-[0-9]+$'}");
    valid(s, J("{'a':'ABC-12'}"));
    verdict(s, J("{'a':'x'}"), "$.a must match ^[A-Z]{3}-[0-9]+$, got 'x'");
    verdict(s, J("{'a':'ABC-12\\n'}"),
            "$.a must match ^[A-Z]{3}-[0-9]+$, got 'ABC-12\\x0a'");
    de__contract_free(s);

    /* Unanchored search, as JSON Schema says; an anchor inside keeps its
     * meaning. */
    s = prop_schema("{'type':'string','pattern':'b+c'}");
    valid(s, J("{'a':'abbcd'}"));
    verdict(s, J("{'a':'acb'}"), "$.a must match b+c, got 'acb'");
    de__contract_free(s);
    s = prop_schema("{'type':'string','pattern':'x|^b'}");
    valid(s, J("{'a':'bc'}"));
    valid(s, J("{'a':'abx'}"));
    verdict(s, J("{'a':'ab'}"), "$.a must match x|^b, got 'ab'");
    /* glibc's automaton takes the place after a newline for a line start:
     * "^b" must still match only at the very start. */
    valid(s, J("{'a':'b\\nx'}"));
    verdict(s, J("{'a':'a\\nb'}"), "$.a must match x|^b, got 'a\\x0ab'");
    de__contract_free(s);
    s = prop_schema("{'type':'string','pattern':'^a$|^b|c$|d'}");
    valid(s, J("{'a':'a'}"));
    valid(s, J("{'a':'bz'}"));
    valid(s, J("{'a':'zc'}"));
    valid(s, J("{'a':'zdz'}"));
    verdict(s, J("{'a':'z\\nbz'}"),
            "$.a must match ^a$|^b|c$|d, got 'z\\x0abz'");
    verdict(s, J("{'a':'a\\n'}"),
            "$.a must match ^a$|^b|c$|d, got "
            "'a\\x0a'");
    verdict(s, J("{'a':'cz'}"), "$.a must match ^a$|^b|c$|d, got 'cz'");
    de__contract_free(s);
    s = prop_schema("{'type':'string','pattern':'^'}");
    valid(s, J("{'a':'\\nanything'}"));
    de__contract_free(s);
    s = prop_schema("{'type':'string','pattern':'^$'}");
    valid(s, J("{'a':''}"));
    verdict(s, J("{'a':'\\n'}"), "$.a must match ^$, got '\\x0a'");
    de__contract_free(s);
    s = prop_schema("{'type':'string','pattern':''}");
    valid(s, J("{'a':''}"));
    valid(s, J("{'a':'anything'}"));
    de__contract_free(s);

    /* "." is one code point (C.UTF-8, whatever the host's locale); a NUL
     * or newline in the subject is a character like any other. */
    s = prop_schema("{'type':'string','pattern':'^.$'}");
    valid(s, J("{'a':'\u00e9'}"));
    valid(s, J("{'a':'\U0001F600'}"));
    verdict(s, J("{'a':'ab'}"), "$.a must match ^.$, got 'ab'");
    de__contract_free(s);
    s = prop_schema("{'type':'string','pattern':'b$'}");
    valid(s, "{\"a\":\"a\\u0000b\"}");
    valid(s, "{\"a\":\"a\\nb\"}");
    verdict(s, "{\"a\":\"ab\\u0000\"}", "$.a must match b$, got 'ab\\x00'");
    de__contract_free(s);
    s = prop_schema("{'type':'string','pattern':'^[[:alpha:]]+$'}");
    valid(s, J("{'a':'\u00e9t\u00e9'}"));
    verdict(s, J("{'a':'a1'}"), "$.a must match ^[[:alpha:]]+$, got 'a1'");
    de__contract_free(s);

    /* Escaped punctuation, and ']' first in a bracket, are literal. */
    s = prop_schema("{'type':'string','pattern':'^a\\\\.b\\\\/[]x-]$'}");
    valid(s, J("{'a':'a.b/]'}"));
    valid(s, J("{'a':'a.b/-'}"));
    verdict(s, J("{'a':'axb/]'}"),
            "$.a must match ^a\\.b\\/[]x-]$, got "
            "'axb/]'");
    de__contract_free(s);

    /* Over 256 instructions, the matcher's work arrays move to the heap. */
    s = prop_schema("{'type':'string','pattern':'^[a-z]{1,200}$'}");
    valid(s, J("{'a':'abc'}"));
    big = malloc(300);
    ck_assert_ptr_nonnull(big);
    memcpy(big, "{\"a\":\"", 6);
    memset(big + 6, 'q', 201);
    memcpy(big + 6 + 201, "\"}", 3);
    verdict(
        s, big,
        "$.a must match ^[a-z]{1,200}$, got "
        "'qqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqq"
        "qqqqqqqqqqqqqqqqqqqqqqq...'");
    free(big);
    de__contract_free(s);

    /* Strings longer than the bound are not searched: they fail. */
    s = prop_schema("{'type':'string','pattern':'a'}");
    big = malloc(DE__PATTERN_SUBJECT_MAX + 32);
    ck_assert_ptr_nonnull(big);
    memcpy(big, "{\"a\":\"", 6);
    memset(big + 6, 'a', DE__PATTERN_SUBJECT_MAX);
    memcpy(big + 6 + DE__PATTERN_SUBJECT_MAX, "\"}", 3);
    valid(s, big);
    memcpy(big + 6 + DE__PATTERN_SUBJECT_MAX, "a\"}", 4);
    verdict(s, big,
            "$.a is too long to check against a (pattern checks at most "
            "1024 bytes), got 1025 bytes: "
            "'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
            "aaaaaaaaaaaaaaaaaaaaaaaaaa...'");
    free(big);
    de__contract_free(s);

    prop_refused("{'type':'string','pattern':1}",
                 "contract schema: 'pattern' at $.properties.a must be a "
                 "string, got 1");
    prop_refused("{'pattern':'a'}",
                 "contract schema: 'pattern' at $.properties.a needs 'type' "
                 "to include \"string\" (it applies to strings only, and any "
                 "other value would skip it)");
}
END_TEST

START_TEST(patterns_outside_the_dialect_are_refused)
{
    static const struct {
        const char *pattern; /* single-quoted JSON string contents */
        const char *why;
    } cases[] = {
        {"(a)\\\\1", "uses the back-reference '\\1', which is not supported "
                     "(it needs a backtracking matcher): '(a)\\1'"},
        {"^\\\\d+$", "uses '\\d', which POSIX ERE does not have; write "
                     "[0-9]: '^\\d+$'"},
        {"\\\\w", "uses '\\w', which POSIX ERE does not have; write "
                  "[A-Za-z0-9_]: '\\w'"},
        {"\\\\S", "uses '\\S', which POSIX ERE does not have; write "
                  "[^[:space:]]: '\\S'"},
        {"a\\\\b", "escapes a character that is not punctuation (at byte 1); "
                   "POSIX ERE only escapes .[](){}*+?^$|\\ (plus / and -): "
                   "'a\\b'"},
        {"a\\\\", "ends with a lone backslash: 'a\\'"},
        {"[\\\\d]", "has a backslash inside a bracket expression, where "
                    "POSIX ERE reads it literally; put ']' first and '-' "
                    "last instead of escaping them: '[\\d]'"},
        {"(?:ab)+", "uses '(?', which POSIX ERE does not have (no "
                    "non-capturing groups, lookaround or flags): '(?:ab)+'"},
        {"a(?=b)", "uses '(?', which POSIX ERE does not have (no "
                   "non-capturing groups, lookaround or flags): 'a(?=b)'"},
        {"a)b", "has an unmatched ')': 'a)b'"},
        {"(a", "has an unmatched '(': '(a'"},
        {"a^b", "uses '^' inside (at byte 1); an anchor may only start the "
                "pattern or a top-level alternative, e.g. '^(a|b)c': "
                "'a^b'"},
        {"(^a|b)c", "uses '^' inside (at byte 1); an anchor may only start "
                    "the pattern or a top-level alternative, e.g. "
                    "'^(a|b)c': '(^a|b)c'"},
        {"^^a", "uses '^' inside (at byte 1); an anchor may only start the "
                "pattern or a top-level alternative, e.g. '^(a|b)c': "
                "'^^a'"},
        {"a$b", "uses '$' inside (at byte 1); an anchor may only end the "
                "pattern or a top-level alternative, e.g. 'a(b|c)$': "
                "'a$b'"},
        {"(a$|b)", "uses '$' inside (at byte 2); an anchor may only end the "
                   "pattern or a top-level alternative, e.g. 'a(b|c)$': "
                   "'(a$|b)'"},
        {"[ab", "has an unterminated bracket expression: '[ab'"},
        {"[[:alpha:]", "has an unterminated bracket expression: "
                       "'[[:alpha:]'"},
        {"[[:alpha]", "has an unterminated character class ('[:'): "
                      "'[[:alpha]'"},
        {"[[=a=]]", "uses a collating element or equivalence class ('[='), "
                    "which is not supported: '[[=a=]]'"},
        {"a{,3}", "has an interval without a lower bound ('{,'); write "
                  "{0,n}: 'a{,3}'"},
        {"a{256}", "repeats up to 256 times, over the limit of 255: "
                   "'a{256}'"},
        {"a{1,1000}", "repeats up to 1000 times, over the limit of 255: "
                      "'a{1,1000}'"},
        {"(a{100}){100}", "expands to more than 1024 instructions once "
                          "its repetitions are unrolled; simplify it: "
                          "'(a{100}){100}'"},
        /* The nesting that would make glibc's regcomp allocate gigabytes:
         * refused before it gets there. */
        {"((((a{1,255}){1,255}){1,255}){1,255})",
         "expands to more than 1024 instructions once its repetitions are "
         "unrolled; simplify it: '((((a{1,255}){1,255}){1,255}){1,255})'"},
        {"*a", "has '*' with nothing to repeat (at byte 0): '*a'"},
        {"a|*b", "has '*' with nothing to repeat (at byte 2): 'a|*b'"},
        {"(+a)", "has '+' with nothing to repeat (at byte 1): '(+a)'"},
        {"^*a", "repeats an anchor (at byte 1): '^*a'"},
        {"a{2,1}", "has an interval {2,1} whose bounds are backwards: "
                   "'a{2,1}'"},
        {"a{x}", "has a '{' that does not start an interval {m}, {m,} or "
                 "{m,n} (at byte 1): 'a{x}'"},
        {"a{}", "has a '{' that does not start an interval {m}, {m,} or "
                "{m,n} (at byte 1): 'a{}'"},
        {"a{2", "has a '{' that does not start an interval {m}, {m,} or "
                "{m,n} (at byte 1): 'a{2'"},
        {"[[:nope:]]", "names an unknown character class '[:nope:]': "
                       "'[[:nope:]]'"},
        {"[z-a]", "has a backwards range (at byte 1): '[z-a]'"},
        {"x[\xc3\xa0-\xc3\xbf]", "has a range with a non-ASCII end (at byte "
                                 "2), which glibc cannot collate in C.UTF-8; "
                                 "list the characters instead: "
                                 "'x[\xc3\xa0-\xc3\xbf]'"},
        {"[a-c-e]", "has a '-' right after a range (at byte 4); put a "
                    "literal '-' last: '[a-c-e]'"},
        {"[[:alpha:]-z]", "starts a range with a character class (at byte "
                          "10): '[[:alpha:]-z]'"},
        {"[a-[:alpha:]]", "ends a range with '[' (at byte 3): "
                          "'[a-[:alpha:]]'"},
    };
    char sub[1024], want[1024];

    for (size_t i = 0; i < DE__ARRAY_LEN(cases); i++) {
        snprintf(sub, sizeof sub, "{'type':'string','pattern':'%s'}",
                 cases[i].pattern);
        snprintf(want, sizeof want,
                 "contract schema: 'pattern' at $.properties.a %s",
                 cases[i].why);
        prop_refused_at(sub, want, __FILE__, __LINE__);
    }
}
END_TEST

START_TEST(long_patterns_are_refused)
{
    char sub[1024], pat[DE__PATTERN_MAX + 2];
    de__contract *s;

    memset(pat, 'a', DE__PATTERN_MAX);
    pat[DE__PATTERN_MAX] = '\0';
    snprintf(sub, sizeof sub, "{'type':'string','pattern':'%s'}", pat);
    s = prop_schema(sub);
    de__contract_free(s);

    strcat(pat, "a");
    snprintf(sub, sizeof sub, "{'type':'string','pattern':'%s'}", pat);
    prop_refused(sub, "contract schema: 'pattern' at $.properties.a is 257 "
                      "bytes, over the limit of 256: "
                      "'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
                      "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa...'");
}
END_TEST

/*
 * Patterns that take exponential time in a backtracking engine, and ones
 * that make glibc's lazily built automaton slow, against subjects of the
 * longest checked length.  glibc does not backtrack, and the search is
 * compiled anchored (one pass over the subject), so each finishes in
 * milliseconds; the subject bound caps the worst case.  Run under alarm():
 * a regression kills the test (Check reports signal 14) instead of
 * hanging it.  No wall-clock threshold is asserted.
 */
START_TEST(catastrophic_patterns_finish)
{
    static const char *const patterns[] = {
        "(a+)+$",   "(a|aa)*b",        "(a|a)*b",       "(.*a){20}b",
        "(a*)*b",   "^(a+)+$",         "(x+x+)+y",      "(a|b)*a(a|b){20}c",
        "a.{255}c", "(.*){1,200}[bc]", "([a-z]+)*[0-9]"};
    static const char alphabet[][4] = {"a", "b", "a"};
    char *inst = malloc(DE__PATTERN_SUBJECT_MAX + 32);
    char sub[512];
    json_t *v;

    ck_assert_ptr_nonnull(inst);
    alarm(60);
    for (size_t p = 0; p < DE__ARRAY_LEN(patterns); p++) {
        de__contract *s;
        snprintf(sub, sizeof sub, "{'type':'string','pattern':'%s'}",
                 patterns[p]);
        s = prop_schema(sub);
        for (int kind = 0; kind < 3; kind++) {
            /* all a's and a '!'; then random a/b (many automaton states). */
            for (size_t i = 0; i < DE__PATTERN_SUBJECT_MAX; i++)
                inst[i] = kind == 2 ? alphabet[(i * 7919) % 5 % 3][0] : 'a';
            if (kind == 1)
                inst[DE__PATTERN_SUBJECT_MAX - 1] = '!';
            v = json_pack("{s:s%}", "a", inst, (size_t)DE__PATTERN_SUBJECT_MAX);
            ck_assert_ptr_nonnull(v);
            /* Matching or not does not matter here; finishing does. */
            de_err e = de__contract_validate(s, v, LABEL);
            ck_assert(e == DE_OK || e == DE_ERR_CONTRACT);
            json_decref(v);
        }
        de__contract_free(s);
    }
    alarm(0);
    free(inst);
}
END_TEST

/* ---- formats ----------------------------------------------------------------
 */

START_TEST(format_date_time)
{
    static const char *const good[] = {
        "1963-06-19T08:30:06.283185Z",
        "1963-06-19t08:30:06.283185z",
        "2026-11-25T11:00:00Z",
        "2026-11-25T11:00:00.123+01:00",
        "1990-12-31T15:59:59-12:00",
        "1998-12-31T23:59:60Z",          /* a leap second, UTC */
        "1998-12-31T15:59:60.123-08:00", /* the same, with an offset */
        "2020-02-29T00:00:00+00:00",
        "2000-02-29T00:00:00Z", /* divisible by 400 */
        "0000-01-01T00:00:00-00:00",
        "9999-12-31T23:59:59.999999999Z",
    };
    static const char *const bad[] = {
        "1998-12-31T23:59:61Z",      /* past a leap second */
        "1998-12-31T23:58:60Z",      /* leap second, wrong minute */
        "1998-12-31T22:59:60Z",      /* leap second, wrong hour */
        "1990-12-31T15:59:59-24:00", /* offset hour */
        "1990-12-31T15:59:59+01:60", /* offset minute */
        "2013-350T01:01:01",         /* ISO 8601 ordinal date */
        "1900-02-29T00:00:00Z",      /* not a leap year */
        "2021-02-29T00:00:00Z",
        "2021-04-31T00:00:00Z",
        "2021-13-01T00:00:00Z",
        "2021-00-10T00:00:00Z",
        "2021-01-00T00:00:00Z",
        "1963-06-19 08:30:06Z",  /* space separator */
        "1963-06-19T08:30:06",   /* no offset */
        "1963-06-19T08:30:06.Z", /* empty fraction */
        "1963-06-19T24:00:00Z",
        "1963-06-19T08:60:00Z",
        "1963-06-19T08:30:06+0100",
        "1963-06-19T08:30:06+01:00x",
        "1963-06-19T08:30:06ZZ",
        "1963-6-19T08:30:06Z",
        "1963-06-1\xe0\xa7\xaaT00:00:00Z", /* a Bengali digit four */
        "",
        "2026-11-25",
    };
    de__contract *s = prop_schema("{'type':'string','format':'date-time'}");
    char inst[256], want[256];

    for (size_t i = 0; i < DE__ARRAY_LEN(good); i++) {
        snprintf(inst, sizeof inst, "{\"a\":\"%s\"}", good[i]);
        valid(s, inst);
    }
    for (size_t i = 0; i < DE__ARRAY_LEN(bad); i++) {
        snprintf(inst, sizeof inst, "{\"a\":\"%s\"}", bad[i]);
        snprintf(want, sizeof want,
                 "$.a must be an RFC 3339 date-time (format), got '%s'",
                 bad[i]);
        verdict(s, inst, want);
    }
    /* Formats check strings only. */
    de__contract_free(s);
    s = prop_schema("{'type':['string','integer'],'format':'date-time'}");
    valid(s, J("{'a':5}"));
    de__contract_free(s);

    prop_refused("{'type':'string','format':'email'}",
                 "contract schema: 'format' at $.properties.a must be "
                 "\"date-time\" or \"uuid\" (the formats this library "
                 "checks), got 'email'");
    prop_refused("{'type':'string','format':1}",
                 "contract schema: 'format' at $.properties.a must be "
                 "\"date-time\" or \"uuid\" (the formats this library "
                 "checks), got 1");
    prop_refused("{'format':'uuid'}",
                 "contract schema: 'format' at $.properties.a needs 'type' to "
                 "include \"string\" (it applies to strings only, and any "
                 "other value would skip it)");
}
END_TEST

START_TEST(format_uuid)
{
    static const char *const good[] = {
        "2eb8aa08-aa98-11ea-b4aa-73b441d16380",
        "2EB8AA08-AA98-11EA-B4AA-73B441D16380",
        "2eb8aa08-AA98-11ea-B4Aa-73B441D16380",
        "00000000-0000-0000-0000-000000000000",
        "01890a5d-ac96-774b-bcce-b302099a8057", /* v7 */
        "98d80576-482e-427f-8434-7f86890ab222",
        "99c17cbb-656f-564a-940f-1a4568f03487",
        "99c17cbb-656f-f64a-940f-1a4568f03487", /* version 15 */
    };
    static const char *const bad[] = {
        "2eb8aa08-aa98-11ea-b4aa-73b441d1638",
        "2eb8aa08-aa98-11ea-b4aa-73b441d163800",
        "2eb8aa08aa9811eab4aa73b441d16380",
        "2eb8aa08-aa98-11ea-b4aa73b441d16380",
        "2eb8aa08-aa98-11ea-b4aa-73b441d1638-",
        "2eb8aa0-8aa98-11ea-b4aa-73b441d16380",
        "2eb8aa08-aa98-11ea-b4ga-73b441d16380",
        "{2eb8aa08-aa98-11ea-b4aa-73b441d1638}",
        "",
    };
    de__contract *s = prop_schema("{'type':'string','format':'uuid'}");
    char inst[256], want[256];

    for (size_t i = 0; i < DE__ARRAY_LEN(good); i++) {
        snprintf(inst, sizeof inst, "{\"a\":\"%s\"}", good[i]);
        valid(s, inst);
    }
    for (size_t i = 0; i < DE__ARRAY_LEN(bad); i++) {
        snprintf(inst, sizeof inst, "{\"a\":\"%s\"}", bad[i]);
        snprintf(want, sizeof want,
                 "$.a must be a UUID, 8-4-4-4-12 hex digits (format), got "
                 "'%s'",
                 bad[i]);
        verdict(s, inst, want);
    }
    de__contract_free(s);
}
END_TEST

/* ---- numbers ---------------------------------------------------------------
 */

START_TEST(minimum_and_maximum)
{
    de__contract *s;

    s = prop_schema("{'type':'number','minimum':0,'maximum':10}");
    valid(s, J("{'a':0}"));
    valid(s, J("{'a':0.0}"));
    valid(s, J("{'a':10}"));
    valid(s, J("{'a':10.0}"));
    valid(s, J("{'a':5.5}"));
    verdict(s, J("{'a':-1}"), "$.a must be >= 0 (minimum), got -1");
    verdict(s, J("{'a':-0.5}"), "$.a must be >= 0 (minimum), got -0.5");
    verdict(s, J("{'a':10.000000000000002}"),
            "$.a must be <= 10 (maximum), got 10.000000000000002");
    de__contract_free(s);

    s = prop_schema(
        "{'type':'number','exclusiveMinimum':0,'exclusiveMaximum':1.5}");
    valid(s, J("{'a':1e-300}"));
    valid(s, J("{'a':1}"));
    verdict(s, J("{'a':0}"), "$.a must be > 0 (exclusiveMinimum), got 0");
    verdict(s, J("{'a':0.0}"), "$.a must be > 0 (exclusiveMinimum), got 0.0");
    verdict(s, J("{'a':1.5}"), "$.a must be < 1.5 (exclusiveMaximum), got 1.5");
    de__contract_free(s);

    /* Integers compare exactly, not rounded to doubles: 2^53 + 1 is over
     * a maximum of 2^53 even though (double)(2^53 + 1) == 2^53. */
    s = prop_schema("{'type':'integer','maximum':9007199254740992.0}");
    valid(s, J("{'a':9007199254740992}"));
    verdict(s, J("{'a':9007199254740993}"),
            "$.a must be <= 9007199254740992.0 (maximum), got "
            "9007199254740993");
    de__contract_free(s);
    s = prop_schema("{'type':'integer','minimum':-9223372036854775808,"
                    "'maximum':9223372036854775807}");
    valid(s, J("{'a':9223372036854775807}"));
    valid(s, J("{'a':-9223372036854775808}"));
    verdict(s, J("{'a':1e19}"),
            "$.a must be <= 9223372036854775807 (maximum), got 1e19");
    de__contract_free(s);
    s = prop_schema("{'type':'number','exclusiveMaximum':1e19}");
    valid(s, J("{'a':9223372036854775807}"));
    de__contract_free(s);

    s = prop_schema("{'type':'integer','minimum':1.5}");
    valid(s, J("{'a':2}"));
    verdict(s, J("{'a':1}"), "$.a must be >= 1.5 (minimum), got 1");
    de__contract_free(s);

    /* One allowed value is fine. */
    de__contract_free(prop_schema("{'type':'number','minimum':5,'maximum':5}"));

    prop_refused("{'type':'number','minimum':'0'}",
                 "contract schema: 'minimum' at $.properties.a must be a "
                 "number, got '0'");
    prop_refused("{'type':'number','exclusiveMinimum':true}",
                 "contract schema: 'exclusiveMinimum' at $.properties.a must "
                 "be a number (draft 2020-12 style, not a boolean), got "
                 "true");
    prop_refused("{'type':'number','minimum':10,'maximum':5}",
                 "contract schema: 'minimum' at $.properties.a is 10 but "
                 "'maximum' is 5; no number could ever satisfy both");
    prop_refused("{'type':'number','exclusiveMinimum':5,'maximum':5.0}",
                 "contract schema: 'exclusiveMinimum' at $.properties.a is 5 "
                 "but 'maximum' is 5.0; no number could ever satisfy both");
    prop_refused("{'type':'number','minimum':1,'exclusiveMaximum':1}",
                 "contract schema: 'minimum' at $.properties.a is 1 but "
                 "'exclusiveMaximum' is 1; no number could ever satisfy "
                 "both");
    prop_refused("{'type':'string','maximum':5}",
                 "contract schema: 'maximum' at $.properties.a needs 'type' "
                 "to include \"number\" or \"integer\" (it applies to numbers "
                 "only, and any other value would skip it)");
}
END_TEST

/* ---- arrays
 * ------------------------------------------------------------------ */

START_TEST(items_min_items_max_items)
{
    de__contract *s;

    s = prop_schema("{'type':'array','items':{'type':'integer'},"
                    "'minItems':1,'maxItems':3}");
    valid(s, J("{'a':[1]}"));
    valid(s, J("{'a':[1,2,3.0]}"));
    verdict(s, J("{'a':[]}"),
            "$.a must have at least 1 element (minItems), got 0");
    verdict(s, J("{'a':[1,2,3,4]}"),
            "$.a must have at most 3 elements (maxItems), got 4");
    verdict(s, J("{'a':[1,2,'x']}"), "$.a[2] must be an integer, got 'x'");
    /* The first failing element, in order. */
    verdict(s, J("{'a':[1,true,'x']}"), "$.a[1] must be an integer, got true");
    de__contract_free(s);

    s = prop_schema("{'type':'array','items':false}");
    valid(s, J("{'a':[]}"));
    verdict(s, J("{'a':[1]}"), "$.a[0] is not allowed (its schema is false)");
    de__contract_free(s);

    s = prop_schema("{'type':'array','maxItems':1}");
    valid(s, J("{'a':[{'any':1}]}"));
    verdict(s, J("{'a':[1,2]}"),
            "$.a must have at most 1 element (maxItems), got 2");
    de__contract_free(s);

    prop_refused("{'type':'array','items':[{}]}",
                 "contract schema: 'items' at $.properties.a must be one "
                 "schema (the array form is prefixItems, which is not "
                 "supported)");
    prop_refused("{'type':'array','minItems':3,'maxItems':2}",
                 "contract schema: 'minItems' at $.properties.a is 3, over "
                 "maxItems 2; no array could ever satisfy both");
    prop_refused("{'type':'array','minItems':-3}",
                 "contract schema: 'minItems' at $.properties.a must be a "
                 "non-negative integer, got -3");
    prop_refused("{'type':'array','items':{'type':'string','minLength':'x'}}",
                 "contract schema: 'minLength' at $.properties.a.items must "
                 "be a non-negative integer, got 'x'");
    prop_refused("{'items':{}}",
                 "contract schema: 'items' at $.properties.a needs 'type' to "
                 "include \"array\" (it applies to arrays only, and any other "
                 "value would skip it)");
}
END_TEST

START_TEST(nested_paths)
{
    de__contract *s = compile_ok(J(
        "{'type':'object','properties':{'order':{'type':'object',"
        "'properties':{'lines':{'type':'array','items':{'type':'object',"
        "'properties':{'sku':{'type':'string','pattern':'^[A-Z]{3}-[0-9]+$'},"
        "'qty':{'type':'integer','minimum':1},'tags':{'type':'array',"
        "'items':{'type':'object','properties':{'k':{'type':'string'}}}}},"
        "'required':['sku']}}},'required':['lines']}},'required':['order']}"));

    valid(s, J("{'order':{'lines':[{'sku':'ABC-1','qty':2},{'sku':'DEF-2',"
               "'tags':[{'k':'x'}]}]}}"));
    verdict(s, J("{'order':{'lines':[{'sku':'ABC-1'},{'qty':2}]}}"),
            "$.order.lines[1].sku is required");
    verdict(s, J("{'order':{'lines':[{'sku':'ABC-1','qty':0}]}}"),
            "$.order.lines[0].qty must be >= 1 (minimum), got 0");
    verdict(s,
            J("{'order':{'lines':[{'sku':'ABC-1'},{'sku':'ABC-2'},"
              "{'sku':'ABC-3'},{'sku':'x'}]}}"),
            "$.order.lines[3].sku must match ^[A-Z]{3}-[0-9]+$, got 'x'");
    verdict(s, J("{'order':{'lines':[{'sku':'ABC-1','note':'x'}]}}"),
            "$.order.lines[0].note is not allowed (additionalProperties is "
            "false)");
    verdict(s,
            J("{'order':{'lines':[{'sku':'ABC-1','tags':[{'k':'x'},"
              "{'k':7}]}]}}"),
            "$.order.lines[0].tags[1].k must be a string, got 7");
    verdict(s, J("{'order':{}}"), "$.order.lines is required");
    verdict(s, "{}", "$.order is required");
    /* The first violation in the payload's own order. */
    verdict(s, J("{'order':{'lines':[{'qty':0,'sku':'x'}]}}"),
            "$.order.lines[0].qty must be >= 1 (minimum), got 0");
    verdict(s, J("{'order':{'lines':[{'sku':'x','qty':0}]}}"),
            "$.order.lines[0].sku must match ^[A-Z]{3}-[0-9]+$, got 'x'");
    de__contract_free(s);
}
END_TEST

/* ---- $defs and $ref
 * ----------------------------------------------------------- */

START_TEST(defs_and_ref)
{
    de__contract *s;

    s = compile_ok(J("{'type':'object','properties':{'from':{'$ref':"
                     "'#/$defs/place','description':'pickup'},'to':{'$ref':"
                     "'#/$defs/place'},'stops':{'type':'array','items':{"
                     "'$ref':'#/$defs/place'}},'amount':{'$ref':"
                     "'#/$defs/alias'}},'$defs':{'alias':{'$ref':"
                     "'#/$defs/money'},'money':{'type':'integer','minimum':0},"
                     "'place':{'type':'object','properties':{'lat':{'type':"
                     "'number'},'lng':{'type':'number'}},'required':['lat',"
                     "'lng']},'unused':{'type':'string'}}}"));
    valid(s, J("{'from':{'lat':1,'lng':2},'to':{'lat':1.5,'lng':2},"
               "'stops':[{'lat':0,'lng':0}],'amount':5}"));
    /* Paths are the payload's, not the definition's. */
    verdict(s, J("{'to':{'lat':'x','lng':2}}"),
            "$.to.lat must be a number, got 'x'");
    verdict(s, J("{'stops':[{'lat':1,'lng':2},{'lat':1}]}"),
            "$.stops[1].lng is required");
    verdict(s, J("{'amount':-1}"), "$.amount must be >= 0 (minimum), got -1");
    de__contract_free(s);

    /* Names are JSON Pointer tokens in a URI fragment. */
    s = compile_ok(J("{'type':'object','properties':{'a':{'$ref':"
                     "'#/$defs/a~1b'},'b':{'$ref':'#/$defs/t~0x'},'c':{"
                     "'$ref':'#/$defs/sp%20ace'}},'$defs':{'a/b':{'type':"
                     "'string'},'t~x':{'type':'integer'},'sp ace':{'type':"
                     "'null'}}}"));
    verdict(s, J("{'a':1}"), "$.a must be a string, got 1");
    verdict(s, J("{'b':'x'}"), "$.b must be an integer, got 'x'");
    verdict(s, J("{'c':1}"), "$.c must be null, got 1");
    de__contract_free(s);

    prop_refused("{'$ref':'#/$defs/nope'}",
                 "contract schema: '$ref' at $.properties.a points to "
                 "'#/$defs/nope', which $defs does not define");
    prop_refused("{'$ref':'other.json#/$defs/x'}",
                 "contract schema: '$ref' at $.properties.a must be "
                 "'#/$defs/<name>' (only local definitions are supported), "
                 "got 'other.json#/$defs/x'");
    prop_refused("{'$ref':'#/definitions/x'}",
                 "contract schema: '$ref' at $.properties.a must be "
                 "'#/$defs/<name>' (only local definitions are supported), "
                 "got '#/definitions/x'");
    prop_refused("{'$ref':'#/$defs/'}",
                 "contract schema: '$ref' at $.properties.a must be "
                 "'#/$defs/<name>' (only local definitions are supported), "
                 "got '#/$defs/'");
    prop_refused("{'$ref':'#/$defs/x/properties/y'}",
                 "contract schema: '$ref' at $.properties.a must name a "
                 "definition itself ('#/$defs/<name>'), not a place inside "
                 "one: '#/$defs/x/properties/y'");
    prop_refused("{'$ref':'#/$defs/x~2'}",
                 "contract schema: '$ref' at $.properties.a has a '~' that "
                 "is not ~0 or ~1 (JSON Pointer): '#/$defs/x~2'");
    prop_refused("{'$ref':'#/$defs/x%zz'}",
                 "contract schema: '$ref' at $.properties.a has a bad "
                 "%-escape: '#/$defs/x%zz'");
    prop_refused("{'$ref':5}", "contract schema: '$ref' at $.properties.a "
                               "must be a string, got 5");
    refused(J("{'type':'object','properties':{'a':{'$ref':'#/$defs/x',"
              "'type':'string'}},'$defs':{'x':{}}}"),
            "contract schema: '$ref' at $.properties.a cannot be combined "
            "with 'type' (only description, title, examples and deprecated "
            "may sit beside it)");
    prop_refused("{'type':'object','$defs':{}}",
                 "contract schema: '$defs' at $.properties.a is only allowed "
                 "at the top level of a contract");
    refused(J("{'type':'object','$defs':[]}"),
            "contract schema: '$defs' at $ must be an object of schemas, "
            "got '[]'");
    refused(J("{'type':'object','$defs':{'x':{'type':'string','oneOf':[]}}}"),
            "contract schema: unsupported keyword 'oneOf' at $.$defs.x");
}
END_TEST

START_TEST(ref_cycles_are_refused)
{
    refused(J("{'type':'object','properties':{'a':{'$ref':'#/$defs/a'}},"
              "'$defs':{'a':{'$ref':'#/$defs/a'}}}"),
            "contract schema: '$ref' makes a cycle (recursive contracts are "
            "not supported): #/$defs/a -> #/$defs/a");
    refused(J("{'type':'object','properties':{'a':{'$ref':'#/$defs/b'}},"
              "'$defs':{'b':{'$ref':'#/$defs/c'},'c':{'$ref':'#/$defs/b'}}}"),
            "contract schema: '$ref' makes a cycle (recursive contracts are "
            "not supported): #/$defs/b -> #/$defs/c -> #/$defs/b");
    /* Recursion through a property is a cycle too: a tree-shaped payload
     * cannot be bounded. */
    refused(J("{'type':'object','properties':{'root':{'$ref':"
              "'#/$defs/node'}},'$defs':{'node':{'type':'object',"
              "'properties':{'children':{'type':'array','items':{'$ref':"
              "'#/$defs/node'}}}}}}"),
            "contract schema: '$ref' makes a cycle (recursive contracts are "
            "not supported): #/$defs/node -> #/$defs/node");
    /* Unused definitions are checked as well. */
    refused(J("{'type':'object','$defs':{'x':{'$ref':'#/$defs/y'},'y':{"
              "'type':'array','items':{'$ref':'#/$defs/x'}}}}"),
            "contract schema: '$ref' makes a cycle (recursive contracts are "
            "not supported): #/$defs/x -> #/$defs/y -> #/$defs/x");
    /* Shared, acyclic references are fine. */
    de__contract_free(compile_ok(
        J("{'type':'object','properties':{'a':{'$ref':'#/$defs/x'},'b':{"
          "'$ref':'#/$defs/x'}},'$defs':{'x':{'$ref':'#/$defs/y'},'y':{}}}")));
}
END_TEST

/* Appends `n` levels of {'type':'object','properties':{'a': ... }}. */
static size_t nest_open(char *buf, size_t o, size_t cap, int n)
{
    for (int i = 0; i < n; i++)
        o += (size_t)snprintf(buf + o, cap - o,
                              "{\"type\":\"object\",\"properties\":{\"a\":");
    return o;
}

static size_t nest_close(char *buf, size_t o, size_t cap, int n)
{
    for (int i = 0; i < n; i++)
        o += (size_t)snprintf(buf + o, cap - o, "}}");
    return o;
}

START_TEST(deep_nesting_is_refused)
{
    size_t cap = 64 * 1024, o;
    char *buf = malloc(cap), *inst = malloc(cap);
    de__contract *s;
    json_t *v;

    ck_assert_ptr_nonnull(buf);
    ck_assert_ptr_nonnull(inst);
    /* The top level and 63 nested objects: 64 levels, the limit. */
    o = nest_open(buf, 0, cap, DE__CONTRACT_DEPTH_MAX - 1);
    o += (size_t)snprintf(buf + o, cap - o, "{\"type\":\"integer\"}");
    o = nest_close(buf, o, cap, DE__CONTRACT_DEPTH_MAX - 1);
    buf[o] = '\0';
    s = compile_ok(buf);
    /* A payload as deep: its message keeps the tail of the path. */
    o = 0;
    for (int i = 0; i < DE__CONTRACT_DEPTH_MAX - 1; i++)
        o += (size_t)snprintf(inst + o, cap - o, "{\"a\":");
    o += (size_t)snprintf(inst + o, cap - o, "\"x\"");
    for (int i = 0; i < DE__CONTRACT_DEPTH_MAX - 1; i++)
        inst[o++] = '}';
    inst[o] = '\0';
    v = json_loads(inst, 0, NULL);
    ck_assert_ptr_nonnull(v);
    ck_assert_int_eq(de__contract_validate(s, v, LABEL), DE_ERR_CONTRACT);
    o = (size_t)snprintf(buf, cap, "%s: $", LABEL);
    for (int i = 0; i < DE__CONTRACT_DEPTH_MAX - 1; i++)
        o += (size_t)snprintf(buf + o, cap - o, ".a");
    snprintf(buf + o, cap - o, " must be an integer, got 'x'");
    ck_assert_str_eq(de_errmsg(), buf);
    json_decref(v);
    de__contract_free(s);

    /* One more level is refused. */
    o = nest_open(buf, 0, cap, DE__CONTRACT_DEPTH_MAX);
    o += (size_t)snprintf(buf + o, cap - o, "{\"type\":\"integer\"}");
    o = nest_close(buf, o, cap, DE__CONTRACT_DEPTH_MAX);
    /* The path is long: the message keeps its tail. */
    refused_at(buf, o, "contract schema: the schema at $....a.properties.a...",
               __FILE__, __LINE__);
    ck_assert_ptr_nonnull(strstr(de_errmsg(), ".properties.a.properties.a "
                                              "is nested more than 64 "
                                              "levels deep"));

    /* Arrays in arrays count the same way; a hostile depth (far beyond,
     * still within jansson's own limit of 2048) is refused at once. */
    o = 0;
    o += (size_t)snprintf(buf, cap,
                          "{\"type\":\"object\",\"properties\":{"
                          "\"a\":");
    for (int i = 0; i < 1000; i++)
        o += (size_t)snprintf(buf + o, cap - o,
                              "{\"type\":\"array\",\"items\":");
    o += (size_t)snprintf(buf + o, cap - o, "{}");
    for (int i = 0; i < 1000; i++)
        buf[o++] = '}';
    o += (size_t)snprintf(buf + o, cap - o, "}}");
    refused_at(buf, o, "contract schema: the schema at $...", __FILE__,
               __LINE__);
    ck_assert_ptr_nonnull(strstr(de_errmsg(), ".items.items.items is nested "
                                              "more than 64 levels deep"));
    free(buf);
    free(inst);
}
END_TEST

START_TEST(deep_nesting_through_ref_is_refused)
{
    size_t cap = 64 * 1024, o;
    char *buf = malloc(cap);

    ck_assert_ptr_nonnull(buf);
    /* d0 holds a 40-level object; d1 nests d0 40 levels down; the top
     * nests d1: far over 64 once $ref is followed, each part under it. */
    o = (size_t)snprintf(buf, cap,
                         "{\"type\":\"object\",\"properties\":{\"x\":"
                         "{\"$ref\":\"#/$defs/d1\"}},\"$defs\":{\"d0\":");
    o = nest_open(buf, o, cap, 40);
    o += (size_t)snprintf(buf + o, cap - o, "{}");
    o = nest_close(buf, o, cap, 40);
    o += (size_t)snprintf(buf + o, cap - o, ",\"d1\":");
    o = nest_open(buf, o, cap, 40);
    o += (size_t)snprintf(buf + o, cap - o, "{\"$ref\":\"#/$defs/d0\"}");
    o = nest_close(buf, o, cap, 40);
    o += (size_t)snprintf(buf + o, cap - o, "}}");
    refused_at(buf, o,
               "contract schema: following '$ref' nests the schema more "
               "than 64 levels deep, through: #/$defs/d1 -> #/$defs/d0",
               __FILE__, __LINE__);
    free(buf);
}
END_TEST

/* ---- annotations and identity ----------------------------------------------
 */

START_TEST(annotations_are_accepted_and_ignored)
{
    de__contract *s = compile_ok(
        J("{'type':'object','title':'Delivery assigned','description':'A "
          "rider took it','deprecated':false,'examples':[{'rider_id':'R-7'}],"
          "'properties':{'rider_id':{'type':'string','description':'who',"
          "'title':'Rider','examples':['R-7',5],'deprecated':true}}}"));

    valid(s, J("{'rider_id':'R-7'}"));
    verdict(s, J("{'rider_id':5}"), "$.rider_id must be a string, got 5");
    de__contract_free(s);

    prop_refused("{'description':1}", "contract schema: 'description' at "
                                      "$.properties.a must be a string, "
                                      "got 1");
    prop_refused("{'title':null}", "contract schema: 'title' at "
                                   "$.properties.a must be a string, got "
                                   "null");
    prop_refused("{'examples':'R-7'}", "contract schema: 'examples' at "
                                       "$.properties.a must be an array, "
                                       "got 'R-7'");
    prop_refused("{'deprecated':'yes'}", "contract schema: 'deprecated' at "
                                         "$.properties.a must be true or "
                                         "false, got 'yes'");
}
END_TEST

START_TEST(id_and_schema_keywords)
{
    de__contract *s;
    char big[DE__CONTRACT_ID_MAX + 64];
    size_t o;

    s = compile_ok(J("{'$schema':'https://json-schema.org/draft/2020-12/"
                     "schema','$id':'https://schemas.example.com/delivery/"
                     "assigned/v1.json','type':'object'}"));
    ck_assert_str_eq(de__contract_id(s),
                     "https://schemas.example.com/delivery/assigned/v1.json");
    de__contract_free(s);
    s = compile_ok(J("{'$schema':'https://json-schema.org/draft/2020-12/"
                     "schema#','$id':'urn:example:delivery:assigned:1#',"
                     "'type':'object'}"));
    ck_assert_str_eq(de__contract_id(s), "urn:example:delivery:assigned:1#");
    de__contract_free(s);
    s = compile_ok(J("{'$id':'schemas/delivery%20v1.json','type':'object'}"));
    ck_assert_str_eq(de__contract_id(s), "schemas/delivery%20v1.json");
    de__contract_free(s);
    s = compile_ok(J("{'type':'object'}"));
    ck_assert_ptr_null(de__contract_id(s));
    de__contract_free(s);

    refused(J("{'$schema':'http://json-schema.org/draft-07/schema#','type':"
              "'object'}"),
            "contract schema: '$schema' at $ names "
            "'http://json-schema.org/draft-07/schema#'; only draft 2020-12 "
            "(https://json-schema.org/draft/2020-12/schema) is supported");
    refused(J("{'$schema':'https://json-schema.org/draft/2020-12/schema#x',"
              "'type':'object'}"),
            "contract schema: '$schema' at $ names "
            "'https://json-schema.org/draft/2020-12/schema#x'; only draft "
            "2020-12 (https://json-schema.org/draft/2020-12/schema) is "
            "supported");
    refused(J("{'$id':'has space','type':'object'}"),
            "contract schema: '$id' at $ must be a URI reference (RFC 3986: "
            "no spaces or other characters outside it), got 'has space'");
    refused(J("{'$id':'a%2','type':'object'}"),
            "contract schema: '$id' at $ must be a URI reference (RFC 3986: "
            "no spaces or other characters outside it), got 'a%2'");
    refused(J("{'$id':'https://x/s.json#frag','type':'object'}"),
            "contract schema: '$id' at $ must not have a fragment (draft "
            "2020-12), got 'https://x/s.json#frag'");
    refused(J("{'$id':'','type':'object'}"),
            "contract schema: '$id' at $ must be a non-empty URI string, "
            "got ''");
    refused(J("{'$id':1,'type':'object'}"),
            "contract schema: '$id' at $ must be a non-empty URI string, "
            "got 1");
    prop_refused("{'$id':'x'}", "contract schema: '$id' at $.properties.a "
                                "is only allowed at the top level of a "
                                "contract");
    prop_refused("{'$schema':'https://json-schema.org/draft/2020-12/schema'}",
                 "contract schema: '$schema' at $.properties.a is only "
                 "allowed at the top level of a contract");

    /* "urn:" and 1021 x's: one byte over. */
    o = (size_t)snprintf(big, sizeof big,
                         "{\"type\":\"object\",\"$id\":\"urn:");
    memset(big + o, 'x', DE__CONTRACT_ID_MAX - 3);
    snprintf(big + o + DE__CONTRACT_ID_MAX - 3, 8, "\"}");
    refused(big, "contract schema: '$id' at $ is 1025 bytes, over the limit "
                 "of 1024: 'urn:xxxxxx...");
}
END_TEST

START_TEST(unsupported_keywords_are_refused)
{
    static const char *const kws[] = {
        "oneOf",
        "anyOf",
        "allOf",
        "not",
        "if",
        "then",
        "else",
        "multipleOf",
        "uniqueItems",
        "prefixItems",
        "contains",
        "minProperties",
        "dependentRequired",
        "patternProperties",
        "propertyNames",
        "unevaluatedProperties",
        "definitions",
        "$comment",
        "$anchor",
        "$dynamicRef",
        "default",
        "readOnly",
        "contentMediaType",
        "requried",
        "Type",
        "nullable",
    };
    char sub[256], want[256];

    refused(J("{'type':'object','properties':{'rider':{'oneOf':[]}}}"),
            "contract schema: unsupported keyword 'oneOf' at "
            "$.properties.rider");
    for (size_t i = 0; i < DE__ARRAY_LEN(kws); i++) {
        snprintf(sub, sizeof sub, "{'type':'string','%s':1}", kws[i]);
        snprintf(want, sizeof want,
                 "contract schema: unsupported keyword '%s' at "
                 "$.properties.a",
                 kws[i]);
        prop_refused_at(sub, want, __FILE__, __LINE__);
    }
    /* At the top level, and a name that needs escaping in the message. */
    refused(J("{'type':'object','x-extension':1}"),
            "contract schema: unsupported keyword 'x-extension' at $");
    refused("{\"type\":\"object\",\"a\\u0001\":1}",
            "contract schema: unsupported keyword 'a\\x01' at $");
    refused(J("{'type':'object','properties':{'odd key':{'fromat':1}}}"),
            "contract schema: unsupported keyword 'fromat' at "
            "$.properties['odd key']");
}
END_TEST

START_TEST(big_schemas_are_refused)
{
    size_t n = DE__CONTRACT_MAX_BYTES + 1;
    char *buf = malloc(n);

    ck_assert_ptr_nonnull(buf);
    memset(buf, ' ', n);
    memcpy(buf, "{\"type\":\"object\"}", 17);
    refused_at(buf, n,
               "contract schema: 1048577 bytes, over the limit of 1048576",
               __FILE__, __LINE__);
    /* At the limit, it is only JSON. */
    de__contract *s = NULL;
    ck_assert_int_eq(de__contract_compile(buf, n - 1, &s), DE_OK);
    de__contract_free(s);
    free(buf);
}
END_TEST

START_TEST(canonical_form_compares_by_meaning)
{
    de__contract *a = compile_ok(J("{ 'type' : 'object', 'properties': {'b': "
                                   "{'type':'string'}, 'a': {'enum':[1,2]}}, "
                                   "'required':['b'] }"));
    de__contract *b = compile_ok(J("{'required':['b'],'properties':{'a':{'enum'"
                                   ":[1,2]},'b':{'type':'string'}},'type':"
                                   "'object'}"));
    de__contract *c = compile_ok(J("{'required':['b'],'properties':{'a':{'enum'"
                                   ":[2,1]},'b':{'type':'string'}},'type':"
                                   "'object'}"));

    ck_assert_str_eq(de__contract_canonical(a), de__contract_canonical(b));
    ck_assert_str_eq(de__contract_canonical(a),
                     "{\"properties\":{\"a\":{\"enum\":[1,2]},\"b\":{\"type\":"
                     "\"string\"}},\"required\":[\"b\"],\"type\":\"object\"}");
    ck_assert_str_ne(de__contract_canonical(a), de__contract_canonical(c));
    de__contract_free(a);
    de__contract_free(b);
    de__contract_free(c);
}
END_TEST

START_TEST(messages_quote_and_cut_values)
{
    de__contract *s = compile_ok(
        J("{'type':'object','properties':{'s':{'type':'integer'},'o':{'type':"
          "'string'}}}"));
    char inst[1024];

    /* A long value is cut; control characters and NULs are escaped. */
    snprintf(inst, sizeof inst, "{\"s\":\"%0200d\"}", 0);
    verdict(s, inst,
            "$.s must be an integer, got "
            "'0000000000000000000000000000000000000000000000000000000000000000"
            "0000000000000000000000000...'");
    verdict(s, "{\"s\":\"a\\u0000b\\u001b\\u0085\"}",
            "$.s must be an integer, got 'a\\x00b\\x1b\\xc2\\x85'");
    verdict(s, "{\"o\":{\"k\":[1,2,3],\"t\":\"x\\ny\"}}",
            "$.o must be a string, got '{\"k\":[1,2,3],\"t\":\"x\\ny\"}'");
    de__contract_free(s);

    /* No label reads as "payload"; a long key is cut in the path. */
    s = compile_ok(J("{'type':'object'}"));
    json_t *v = json_pack("{s:i}",
                          "kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk"
                          "kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk",
                          1);
    ck_assert_int_eq(de__contract_validate(s, v, NULL), DE_ERR_CONTRACT);
    ck_assert_str_eq(de_errmsg(),
                     "payload: $['kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk"
                     "kkkkkkkkkkkkkkkkkkk...'] is not allowed "
                     "(additionalProperties is false)");
    json_decref(v);
    de__contract_free(s);
}
END_TEST

/* Checks from several threads against one schema: a compiled schema is
 * immutable (and glibc locks its regex cache). */
struct thread_arg {
    const de__contract *s;
    int failures;
};

static void *checker(void *p)
{
    struct thread_arg *a = p;
    json_t *good = json_pack("{s:s,s:i}", "sku", "ABC-12", "n", 3);
    json_t *bad = json_pack("{s:s,s:i}", "sku", "x", "n", 3);

    for (int i = 0; i < 2000; i++) {
        if (de__contract_validate(a->s, good, LABEL) != DE_OK)
            a->failures++;
        if (de__contract_validate(a->s, bad, LABEL) != DE_ERR_CONTRACT ||
            strcmp(de_errmsg(), LABEL ": $.sku must match ^[A-Z]{3}-[0-9]+$, "
                                      "got 'x'") != 0)
            a->failures++;
    }
    json_decref(good);
    json_decref(bad);
    return NULL;
}

START_TEST(threads_share_a_schema)
{
    de__contract *s = compile_ok(
        J("{'type':'object','properties':{'sku':{'type':'string','pattern':"
          "'^[A-Z]{3}-[0-9]+$'},'n':{'type':'integer','enum':[1,2,3]}}}"));
    pthread_t t[4];
    struct thread_arg args[4];

    for (int i = 0; i < 4; i++) {
        args[i].s = s;
        args[i].failures = 0;
        ck_assert_int_eq(pthread_create(&t[i], NULL, checker, &args[i]), 0);
    }
    for (int i = 0; i < 4; i++) {
        pthread_join(t[i], NULL);
        ck_assert_int_eq(args[i].failures, 0);
    }
    de__contract_free(s);
}
END_TEST

/* Patterns do not depend on the host's locale. */
START_TEST(host_locale_does_not_matter)
{
    de__contract *s = prop_schema("{'type':'string','pattern':'^.{3}$'}");

    setlocale(LC_ALL, "C");
    valid(s, J("{'a':'\u00e9t\u00e9'}"));
    verdict(s, J("{'a':'\u00e9t'}"), "$.a must match ^.{3}$, got '\u00e9t'");
    setlocale(LC_ALL, "C.UTF-8");
    valid(s, J("{'a':'\u00e9t\u00e9'}"));
    setlocale(LC_ALL, "C");
    de__contract_free(s);
}
END_TEST

/* ---- differential property test
 * ------------------------------------------------ */

/*
 * Random small schemas and payloads.  Each payload is checked against the
 * compiled schema and against a naive interpreter of the same schema text
 * (below, written independently of lib/contract.c: it walks the JSON each
 * time, compares numbers as doubles, which is exact for the small values
 * generated, and searches patterns with a plain unanchored regexec).  They
 * must agree; the check must be deterministic (same code, same message,
 * twice and after recompiling the canonical text); and it must never
 * crash (ASan and UBSan watch it in make check-asan).
 */
static uint64_t rng_state;

static uint64_t rnd(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

static int pick(int n)
{
    return (int)(rnd() % (uint64_t)n);
}

static const char *const names[] = {"a", "b", "c", "k k", "d"};
static const char *const pattern_pool[] = {
    "a",
    "^a",
    "b$",
    "^(a|b)+$",
    "[ab]c",
    "a.b",
    "^.?$",
    "x|^b",
    "a|^b",
    "^a|b$|c",
    "^b|^a$",
    "[^b]$|^a",
    "a{2}",
    "^[^a]*$",
    "(ab)*c",
    "\xc3\xa9",
    "^$",
    "a+b?",
    "[[:alpha:]]+[0-9]",
    "^(a|bc){1,2}$",
    "",
};
static const char *const string_pool[] = {
    "",     "a",   "b",   "ab",       "ba",
    "abc",  "aab", "c",   "\xc3\xa9", "a\nb",
    "x",    "bc",  "ac",  "a1",       "\xc3\xa9t\xc3\xa9",
    "zzzz", "\nb", "b\n", "a\n"};

static json_t *gen_value(int depth);
static bool oracle_equal(const json_t *a, const json_t *b);

/* Schema text cannot hold NUL (jansson refuses \\u0000 without
 * JSON_ALLOW_NUL), payloads can. */
static bool gen_nul_ok;

static json_t *gen_number(void)
{
    switch (pick(3)) {
    case 0: return json_integer(pick(11) - 5);
    case 1: return json_real((pick(21) - 10) / 2.0);
    default: return json_real((double)(pick(7) - 3)); /* integral reals */
    }
}

static json_t *gen_string(void)
{
    if (gen_nul_ok && pick(8) == 0)
        return json_stringn("a\0b", 3);
    return json_string(string_pool[pick((int)DE__ARRAY_LEN(string_pool))]);
}

static json_t *gen_value(int depth)
{
    switch (pick(depth > 2 ? 5 : 7)) {
    case 0: return json_null();
    case 1: return json_boolean(pick(2));
    case 2:
    case 3: return gen_number();
    case 4: return gen_string();
    case 5: {
        json_t *a = json_array();
        for (int i = pick(3); i > 0; i--)
            json_array_append_new(a, gen_value(depth + 1));
        return a;
    }
    default: {
        json_t *o = json_object();
        for (int i = pick(3); i > 0; i--)
            json_object_set_new(o, names[pick(5)], gen_value(depth + 1));
        return o;
    }
    }
}

static const char *const type_pool[] = {
    "object", "array", "string", "integer", "number", "boolean", "null"};

static json_t *gen_schema(int depth, int ndefs);

/* Schema keywords for one type. */
static void gen_type_keywords(json_t *s, const char *t, int depth, int ndefs)
{
    if (strcmp(t, "string") == 0) {
        if (pick(3) == 0) {
            int lo = pick(3);
            json_object_set_new(s, "minLength", json_integer(lo));
            if (pick(2))
                json_object_set_new(s, "maxLength", json_integer(lo + pick(3)));
        }
        if (pick(3) == 0)
            json_object_set_new(
                s, "pattern",
                json_string(
                    pattern_pool[pick((int)DE__ARRAY_LEN(pattern_pool))]));
    } else if (strcmp(t, "integer") == 0 || strcmp(t, "number") == 0) {
        static const char *const bk[] = {"minimum", "exclusiveMinimum",
                                         "maximum", "exclusiveMaximum"};
        int lo = pick(5) - 4;
        if (pick(2))
            json_object_set_new(s, bk[pick(2)], json_integer(lo));
        if (pick(2))
            json_object_set_new(s, bk[2 + pick(2)],
                                json_real(lo + 1 + pick(6) / 2.0));
    } else if (strcmp(t, "array") == 0) {
        if (pick(2))
            json_object_set_new(s, "items", gen_schema(depth + 1, ndefs));
        if (pick(3) == 0)
            json_object_set_new(s, "minItems", json_integer(pick(2)));
        if (pick(3) == 0)
            json_object_set_new(s, "maxItems", json_integer(1 + pick(2)));
    } else if (strcmp(t, "object") == 0) {
        json_t *props = json_object(), *req = json_array();
        bool additional = pick(4) == 0;
        for (int i = pick(4); i > 0; i--) {
            const char *nm = names[pick(5)];
            if (json_object_get(props, nm) == NULL)
                json_object_set_new(props, nm, gen_schema(depth + 1, ndefs));
        }
        const char *k;
        json_t *v;
        json_object_foreach(props, k, v)
        {
            if (pick(2) && !json_is_false(v))
                json_array_append_new(req, json_string(k));
        }
        if (additional && pick(2))
            json_array_append_new(req, json_string("extra"));
        json_object_set_new(s, "properties", props);
        if (json_array_size(req) || pick(2))
            json_object_set_new(s, "required", req);
        else
            json_decref(req);
        if (additional || pick(3) == 0)
            json_object_set_new(s, "additionalProperties",
                                json_boolean(additional));
    }
}

static bool is_numeric(const char *t)
{
    return strcmp(t, "integer") == 0 || strcmp(t, "number") == 0;
}

static json_t *gen_schema(int depth, int ndefs)
{
    json_t *s;
    int kind = pick(depth > 3 ? 6 : 10);

    if (kind == 0 && ndefs > 0) {
        char ref[32];
        snprintf(ref, sizeof ref, "#/$defs/d%d", pick(ndefs));
        return json_pack("{s:s}", "$ref", ref);
    }
    if (kind == 1)
        return pick(8) ? json_true() : json_false();
    s = json_object();
    if (kind == 2) { /* enum or const, no type */
        if (pick(2)) {
            json_t *e = json_array();
            for (int i = 1 + pick(3); i > 0; i--) {
                json_t *v = gen_value(2);
                bool dup = false;
                for (size_t j = 0; j < json_array_size(e); j++) {
                    json_t *w = json_array_get(e, j);
                    dup |= oracle_equal(v, w);
                }
                if (dup)
                    json_decref(v);
                else
                    json_array_append_new(e, v);
            }
            json_object_set_new(s, "enum", e);
        } else {
            json_object_set_new(s, "const", gen_value(2));
        }
        return s;
    }
    if (kind == 3)
        return s; /* {} */
    if (kind == 4) {
        const char *a = type_pool[pick(7)], *b = type_pool[pick(7)];
        json_t *ts = json_array();
        json_array_append_new(ts, json_string(a));
        if (strcmp(a, b) != 0)
            json_array_append_new(ts, json_string(b));
        json_object_set_new(s, "type", ts);
        gen_type_keywords(s, a, depth, ndefs);
        /* integer and number share their keywords: once is enough. */
        if (strcmp(a, b) != 0 && !(is_numeric(a) && is_numeric(b)))
            gen_type_keywords(s, b, depth, ndefs);
        return s;
    }
    /* Deep down, scalars only, so that generation ends. */
    const char *t = depth > 4 ? type_pool[2 + pick(5)] : type_pool[pick(8) % 7];
    json_object_set_new(s, "type", json_string(t));
    gen_type_keywords(s, t, depth, ndefs);
    if (pick(6) == 0 && (strcmp(t, "string") == 0)) {
        json_t *e = json_array();
        json_array_append_new(e, json_string("a"));
        json_array_append_new(e, json_string("ab"));
        json_object_set_new(s, "enum", e);
    }
    return s;
}

/* A value shaped by the schema most of the time, random otherwise. */
static json_t *gen_instance(const json_t *root, const json_t *s, int depth)
{
    const json_t *t;

    if (depth > 6 || pick(8) == 0 || !json_is_object(s))
        return gen_value(depth);
    if (json_object_get(s, "$ref")) {
        const char *r = json_string_value(json_object_get(s, "$ref"));
        return gen_instance(root,
                            json_object_get(json_object_get(root, "$defs"),
                                            r + strlen("#/$defs/")),
                            depth);
    }
    if ((t = json_object_get(s, "enum")) && pick(4))
        return json_deep_copy(
            json_array_get(t, (size_t)pick((int)json_array_size(t))));
    if ((t = json_object_get(s, "const")) && pick(4))
        return json_deep_copy(t);
    t = json_object_get(s, "type");
    if (json_is_array(t))
        t = json_array_get(t, (size_t)pick((int)json_array_size(t)));
    if (!json_is_string(t))
        return gen_value(depth);
    const char *tn = json_string_value(t);
    if (strcmp(tn, "object") == 0) {
        json_t *o = json_object(), *props = json_object_get(s, "properties");
        const char *k;
        json_t *sub;
        json_object_foreach(props, k, sub)
        {
            if (pick(5))
                json_object_set_new(o, k, gen_instance(root, sub, depth + 1));
        }
        if (pick(6) == 0)
            json_object_set_new(o, names[pick(5)], gen_value(depth + 1));
        if (pick(6) == 0)
            json_object_set_new(o, "extra", gen_value(depth + 1));
        return o;
    }
    if (strcmp(tn, "array") == 0) {
        json_t *a = json_array(), *items = json_object_get(s, "items");
        for (int i = pick(4); i > 0; i--)
            json_array_append_new(a, items
                                         ? gen_instance(root, items, depth + 1)
                                         : gen_value(depth + 1));
        return a;
    }
    if (strcmp(tn, "string") == 0)
        return gen_string();
    if (strcmp(tn, "integer") == 0)
        return pick(4) ? json_integer(pick(13) - 6) : gen_number();
    if (strcmp(tn, "number") == 0)
        return gen_number();
    if (strcmp(tn, "boolean") == 0)
        return json_boolean(pick(2));
    return json_null();
}

/* ---- the naive interpreter --------------------------------------------- */

static locale_t oracle_locale;

static bool oracle_equal(const json_t *a, const json_t *b)
{
    if (json_is_number(a) && json_is_number(b))
        return json_number_value(a) == json_number_value(b);
    if (json_typeof(a) != json_typeof(b))
        return false;
    if (json_is_array(a)) {
        if (json_array_size(a) != json_array_size(b))
            return false;
        for (size_t i = 0; i < json_array_size(a); i++)
            if (!oracle_equal(json_array_get(a, i), json_array_get(b, i)))
                return false;
        return true;
    }
    if (json_is_object(a)) {
        const char *k;
        json_t *v;
        if (json_object_size(a) != json_object_size(b))
            return false;
        json_object_foreach((json_t *)(uintptr_t)a, k, v)
        {
            json_t *w = json_object_get(b, k);
            if (w == NULL || !oracle_equal(v, w))
                return false;
        }
        return true;
    }
    if (json_is_string(a))
        return json_string_length(a) == json_string_length(b) &&
               memcmp(json_string_value(a), json_string_value(b),
                      json_string_length(a)) == 0;
    return true;
}

static bool oracle_type(const char *t, const json_t *v)
{
    if (strcmp(t, "integer") == 0)
        return json_is_integer(v) ||
               (json_is_real(v) &&
                json_real_value(v) == (double)(long long)json_real_value(v));
    if (strcmp(t, "number") == 0)
        return json_is_number(v);
    if (strcmp(t, "string") == 0)
        return json_is_string(v);
    if (strcmp(t, "object") == 0)
        return json_is_object(v);
    if (strcmp(t, "array") == 0)
        return json_is_array(v);
    if (strcmp(t, "boolean") == 0)
        return json_is_boolean(v);
    return json_is_null(v);
}

static bool oracle_search(const char *pattern, const json_t *v)
{
    regex_t re;
    regmatch_t m[1] = {{0, (regoff_t)json_string_length(v)}};
    locale_t old = uselocale(oracle_locale);
    bool found;

    ck_assert_int_eq(regcomp(&re, pattern, REG_EXTENDED | REG_NOSUB), 0);
    found = regexec(&re, json_string_value(v), 0, m, REG_STARTEND) == 0;
    regfree(&re);
    uselocale(old);
    return found;
}

static bool oracle(const json_t *root, const json_t *s, const json_t *v)
{
    const json_t *k, *t = json_object_get(s, "type");
    bool has_object = false;

    if (json_is_boolean(s))
        return json_is_true(s);
    if ((k = json_object_get(s, "$ref")) != NULL)
        return oracle(root,
                      json_object_get(json_object_get(root, "$defs"),
                                      json_string_value(k) + 8),
                      v);
    if (t != NULL) {
        bool ok = false;
        for (size_t i = 0; i < (json_is_array(t) ? json_array_size(t) : 1);
             i++) {
            const char *tn =
                json_string_value(json_is_array(t) ? json_array_get(t, i) : t);
            ok |= oracle_type(tn, v);
            has_object |= strcmp(tn, "object") == 0;
        }
        if (!ok)
            return false;
    }
    if ((k = json_object_get(s, "const")) != NULL && !oracle_equal(k, v))
        return false;
    if ((k = json_object_get(s, "enum")) != NULL) {
        bool in = false;
        for (size_t i = 0; i < json_array_size(k); i++)
            in |= oracle_equal(json_array_get(k, i), v);
        if (!in)
            return false;
    }
    if (json_is_string(v)) {
        size_t cps = 0;
        for (size_t i = 0; i < json_string_length(v); i++)
            cps += (json_string_value(v)[i] & 0xc0) != 0x80;
        if ((k = json_object_get(s, "minLength")) &&
            cps < (size_t)json_integer_value(k))
            return false;
        if ((k = json_object_get(s, "maxLength")) &&
            cps > (size_t)json_integer_value(k))
            return false;
        if ((k = json_object_get(s, "pattern")) &&
            !oracle_search(json_string_value(k), v))
            return false;
    }
    if (json_is_number(v)) {
        double x = json_number_value(v);
        if ((k = json_object_get(s, "minimum")) && !(x >= json_number_value(k)))
            return false;
        if ((k = json_object_get(s, "exclusiveMinimum")) &&
            !(x > json_number_value(k)))
            return false;
        if ((k = json_object_get(s, "maximum")) && !(x <= json_number_value(k)))
            return false;
        if ((k = json_object_get(s, "exclusiveMaximum")) &&
            !(x < json_number_value(k)))
            return false;
    }
    if (json_is_array(v)) {
        if ((k = json_object_get(s, "minItems")) &&
            json_array_size(v) < (size_t)json_integer_value(k))
            return false;
        if ((k = json_object_get(s, "maxItems")) &&
            json_array_size(v) > (size_t)json_integer_value(k))
            return false;
        if ((k = json_object_get(s, "items")) != NULL)
            for (size_t i = 0; i < json_array_size(v); i++)
                if (!oracle(root, k, json_array_get(v, i)))
                    return false;
    }
    if (json_is_object(v) && has_object) {
        const json_t *props = json_object_get(s, "properties");
        const json_t *add = json_object_get(s, "additionalProperties");
        const char *key;
        json_t *mv;
        json_object_foreach((json_t *)(uintptr_t)v, key, mv)
        {
            const json_t *ps = props ? json_object_get(props, key) : NULL;
            if (ps == NULL && !json_is_true(add))
                return false;
            if (ps != NULL && !oracle(root, ps, mv))
                return false;
        }
        if ((k = json_object_get(s, "required")) != NULL)
            for (size_t i = 0; i < json_array_size(k); i++)
                if (!json_object_get(v,
                                     json_string_value(json_array_get(k, i))))
                    return false;
    }
    return true;
}

START_TEST(differential_random_schemas)
{
    const char *seed_env = getenv("DE_CONTRACT_SEED");
    uint64_t seed = seed_env ? strtoull(seed_env, NULL, 10) : 20260101;
    int rounds = 3000, agreed_invalid = 0, agreed_valid = 0;

    oracle_locale =
        newlocale(LC_CTYPE_MASK | LC_COLLATE_MASK, "C.UTF-8", (locale_t)0);
    ck_assert(oracle_locale != (locale_t)0);
    rng_state = seed ? seed : 1;
    for (int r = 0; r < rounds; r++) {
        json_t *root = json_object(), *defs = json_object();
        int ndefs = pick(3);

        gen_nul_ok = false;
        char *text, *text2, msg1[1024];
        de__contract *s, *s2;

        for (int d = 0; d < ndefs; d++) {
            char nm[8];
            snprintf(nm, sizeof nm, "d%d", d);
            /* A definition only refers to earlier ones: no cycles. */
            json_object_set_new(defs, nm, gen_schema(2, d));
        }
        json_object_set_new(root, "type", json_string("object"));
        gen_type_keywords(root, "object", 1, ndefs);
        if (ndefs)
            json_object_set_new(root, "$defs", defs);
        else
            json_decref(defs);
        gen_nul_ok = true;
        text = json_dumps(root, JSON_COMPACT);
        s = NULL;
        ck_assert_msg(de__contract_compile(text, strlen(text), &s) == DE_OK,
                      "seed %llu round %d: %s refused: %s",
                      (unsigned long long)seed, r, text, de_errmsg());
        text2 = strdup(de__contract_canonical(s));
        ck_assert_int_eq(de__contract_compile(text2, strlen(text2), &s2),
                         DE_OK);
        for (int i = 0; i < 12; i++) {
            json_t *inst = gen_instance(root, root, 1);
            bool want = oracle(root, root, inst);
            de_err e1 = de__contract_validate(s, inst, LABEL);
            snprintf(msg1, sizeof msg1, "%s", de_errmsg());
            char *itext = json_dumps(inst, JSON_COMPACT | JSON_ENCODE_ANY);
            ck_assert_msg(e1 == (want ? DE_OK : DE_ERR_CONTRACT),
                          "seed %llu round %d: schema %s instance %s: "
                          "oracle says %s, contract.c says %s (%s)",
                          (unsigned long long)seed, r, text, itext,
                          want ? "valid" : "invalid", de_err_name(e1),
                          e1 ? msg1 : "");
            if (e1 != DE_OK) {
                ck_assert_msg(strncmp(msg1, LABEL ": $", strlen(LABEL) + 3) ==
                                  0,
                              "message without label and path: %s", msg1);
                agreed_invalid++;
            } else {
                agreed_valid++;
            }
            /* Deterministic: again, and through the canonical text (whose
             * sorted keys may print an object in an enum differently, so
             * only the verdict is compared there). */
            ck_assert_int_eq(de__contract_validate(s, inst, LABEL), e1);
            if (e1 != DE_OK)
                ck_assert_str_eq(de_errmsg(), msg1);
            ck_assert_int_eq(de__contract_validate(s2, inst, LABEL), e1);
            free(itext);
            json_decref(inst);
        }
        de__contract_free(s);
        de__contract_free(s2);
        free(text);
        free(text2);
        json_decref(root);
    }
    /* The generator exercises both outcomes. */
    ck_assert_int_gt(agreed_valid, rounds);
    ck_assert_int_gt(agreed_invalid, rounds);
    freelocale(oracle_locale);
}
END_TEST

/*
 * The matcher against glibc's own regexec (plain, unanchored, in C.UTF-8)
 * on random patterns covering the accepted dialect -- literals, multibyte
 * characters, ".", bracket expressions with ranges, negation and classes,
 * groups, alternation, every quantifier, anchors at the ends of top-level
 * alternatives -- and random subjects with NULs, newlines and multibyte
 * characters.  glibc is the reference for the dialect; the two must agree
 * on every subject.
 */
static void gen_pattern(char *out, size_t *o, size_t cap, int depth);

static void gen_piece(char *out, size_t *o, size_t cap, int depth)
{
    static const char *const atoms[] = {"a",
                                        "b",
                                        "c",
                                        "\xc3\xa9",
                                        ".",
                                        "[ab]",
                                        "[^a]",
                                        "[a-c]",
                                        "[]a]",
                                        "[^]\n]",
                                        "[[:alpha:]]",
                                        "[[:digit:]]",
                                        "[^[:space:]]",
                                        "\\.",
                                        "\\-",
                                        "-",
                                        "1",
                                        "[a-]",
                                        "[\xc3\xa0\xc3\xbf]"};
    static const char *const quants[] = {"*",   "+",    "?",  "{0,2}", "{1,3}",
                                         "{2}", "{1,}", "*?", "{0}",   "+*"};

    if (depth < 3 && pick(6) == 0) {
        out[(*o)++] = '(';
        gen_pattern(out, o, cap, depth + 1);
        out[(*o)++] = ')';
    } else {
        const char *a = atoms[pick((int)DE__ARRAY_LEN(atoms))];
        memcpy(out + *o, a, strlen(a));
        *o += strlen(a);
    }
    if (pick(3) == 0) {
        const char *q = quants[pick((int)DE__ARRAY_LEN(quants))];
        memcpy(out + *o, q, strlen(q));
        *o += strlen(q);
    }
    ck_assert_uint_lt(*o, cap - 64);
}

static void gen_pattern(char *out, size_t *o, size_t cap, int depth)
{
    int alts = pick(4) == 0 ? 2 + pick(2) : 1;

    for (int k = 0; k < alts; k++) {
        if (k > 0)
            out[(*o)++] = '|';
        if (depth == 0 && pick(4) == 0)
            out[(*o)++] = '^';
        for (int i = pick(4); i > 0; i--)
            gen_piece(out, o, cap, depth);
        if (depth == 0 && pick(4) == 0)
            out[(*o)++] = '$';
    }
}

START_TEST(patterns_agree_with_glibc)
{
    static const char *const chars[] = {"a",  "b", "c", "\xc3\xa9", "1", ".",
                                        "\n", "-", "]", "\xc3\xa0", " ", "A"};
    const char *seed_env = getenv("DE_CONTRACT_SEED");
    uint64_t seed = seed_env ? strtoull(seed_env, NULL, 10) : 77;
    locale_t loc =
        newlocale(LC_CTYPE_MASK | LC_COLLATE_MASK, "C.UTF-8", (locale_t)0);
    int matched = 0, missed = 0;

    ck_assert(loc != (locale_t)0);
    rng_state = seed ? seed : 1;
    for (int r = 0; r < 3000; r++) {
        char pat[512], subj[64];
        size_t o = 0;
        json_t *sch;
        char *text;
        de__contract *s = NULL;
        regex_t re;
        locale_t old;

        gen_pattern(pat, &o, sizeof pat, 0);
        pat[o] = '\0';
        sch = json_pack("{s:s,s:{s:{s:s,s:s}}}", "type", "object", "properties",
                        "a", "type", "string", "pattern", pat);
        text = json_dumps(sch, JSON_COMPACT);
        old = uselocale(loc);
        ck_assert_msg(regcomp(&re, pat, REG_EXTENDED | REG_NOSUB) == 0,
                      "seed %llu: the generator made %s, which glibc "
                      "refuses",
                      (unsigned long long)seed, pat);
        uselocale(old);
        ck_assert_msg(de__contract_compile(text, strlen(text), &s) == DE_OK,
                      "seed %llu: pattern %s refused: %s",
                      (unsigned long long)seed, pat, de_errmsg());
        for (int k = 0; k < 20; k++) {
            size_t n = 0;
            for (int i = pick(9); i > 0; i--) {
                const char *c = pick(12) ? chars[pick(12)] : "\0";
                size_t cl = c[0] ? strlen(c) : 1;
                memcpy(subj + n, c, cl);
                n += cl;
            }
            regmatch_t m[1] = {{0, (regoff_t)n}};
            old = uselocale(loc);
            bool want = regexec(&re, subj, 0, m, REG_STARTEND) == 0;
            uselocale(old);
            json_t *v = json_pack("{s:s%}", "a", subj, n);
            de_err e = de__contract_validate(s, v, LABEL);
            ck_assert_msg(
                e == (want ? DE_OK : DE_ERR_CONTRACT),
                "seed %llu: pattern %s on %s (%zu bytes): glibc "
                "says %s, contract.c %s",
                (unsigned long long)seed, pat,
                de__quote((char[DE__QUOTE_MAX]){0}, DE__QUOTE_MAX, subj, n), n,
                want ? "match" : "no match", de_err_name(e));
            matched += want;
            missed += !want;
            json_decref(v);
        }
        regfree(&re);
        de__contract_free(s);
        free(text);
        json_decref(sch);
    }
    ck_assert_int_gt(matched, 5000);
    ck_assert_int_gt(missed, 5000);
    freelocale(loc);
}
END_TEST

static Suite *contract_suite(void)
{
    Suite *s = suite_create("contract");
    TCase *kw = tcase_create("keywords");
    TCase *hostile = tcase_create("hostile");
    TCase *prop = tcase_create("property");

    tcase_add_test(kw, type_keyword);
    tcase_add_test(kw, top_level_is_an_object_schema);
    tcase_add_test(kw, properties_and_additional_properties);
    tcase_add_test(kw, required_keyword);
    tcase_add_test(kw, enum_keyword);
    tcase_add_test(kw, const_keyword);
    tcase_add_test(kw, min_and_max_length_count_code_points);
    tcase_add_test(kw, pattern_keyword);
    tcase_add_test(kw, patterns_outside_the_dialect_are_refused);
    tcase_add_test(kw, format_date_time);
    tcase_add_test(kw, format_uuid);
    tcase_add_test(kw, minimum_and_maximum);
    tcase_add_test(kw, items_min_items_max_items);
    tcase_add_test(kw, nested_paths);
    tcase_add_test(kw, defs_and_ref);
    tcase_add_test(kw, annotations_are_accepted_and_ignored);
    tcase_add_test(kw, id_and_schema_keywords);
    tcase_add_test(kw, unsupported_keywords_are_refused);
    tcase_add_test(kw, canonical_form_compares_by_meaning);
    tcase_add_test(kw, messages_quote_and_cut_values);
    tcase_add_test(kw, threads_share_a_schema);
    tcase_add_test(kw, host_locale_does_not_matter);
    suite_add_tcase(s, kw);

    tcase_set_timeout(hostile, 120);
    tcase_add_test(hostile, huge_enum_is_capped);
    tcase_add_test(hostile, long_patterns_are_refused);
    tcase_add_test(hostile, catastrophic_patterns_finish);
    tcase_add_test(hostile, ref_cycles_are_refused);
    tcase_add_test(hostile, deep_nesting_is_refused);
    tcase_add_test(hostile, deep_nesting_through_ref_is_refused);
    tcase_add_test(hostile, big_schemas_are_refused);
    suite_add_tcase(s, hostile);

    tcase_set_timeout(prop, 300);
    tcase_add_test(prop, differential_random_schemas);
    tcase_add_test(prop, patterns_agree_with_glibc);
    suite_add_tcase(s, prop);
    return s;
}

int main(void)
{
    return tu_run(contract_suite()) ? EXIT_FAILURE : EXIT_SUCCESS;
}

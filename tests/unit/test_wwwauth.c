/* Unit tests for src/wwwauth.c: real registry challenges, RFC 7235 corner cases, and
 * garbage that must fail cleanly. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "archmirror/error.h"
#include "archmirror/wwwauth.h"

#define MAXCH 4

struct result {
    struct am_challenge ch[MAXCH];
    size_t n;
    int rc;
};

static struct result parse(const char *s)
{
    struct result r;
    memset(&r, 0, sizeof r);
    r.n = 99;
    r.rc = am_wwwauth_parse(s, strlen(s), r.ch, MAXCH, &r.n);
    return r;
}

static void expect_garbage(const char *s)
{
    struct result r = parse(s);
    if (r.rc != AM_EUPSTREAM_PROTOCOL) fail_msg("accepted \"%s\"", s);
    assert_int_equal(r.n, 0);
}

static void parses_docker_hub_bearer_challenge(void **state)
{
    struct result r = parse("Bearer realm=\"https://auth.docker.io/token\","
                            "service=\"registry.docker.io\","
                            "scope=\"repository:library/alpine:pull\"");
    assert_int_equal(r.rc, 0);
    assert_int_equal(r.n, 1);
    assert_int_equal(r.ch[0].scheme, AM_AUTH_BEARER);
    assert_string_equal(r.ch[0].realm, "https://auth.docker.io/token");
    assert_string_equal(r.ch[0].service, "registry.docker.io");
    assert_string_equal(r.ch[0].scope, "repository:library/alpine:pull");
    assert_string_equal(r.ch[0].error, "");
}

static void parses_ghcr_bearer_challenge(void **state)
{
    struct result r = parse("Bearer realm=\"https://ghcr.io/token\",service=\"ghcr.io\","
                            "scope=\"repository:user/image:pull\"");
    assert_int_equal(r.rc, 0);
    assert_int_equal(r.n, 1);
    assert_string_equal(r.ch[0].realm, "https://ghcr.io/token");
    assert_string_equal(r.ch[0].service, "ghcr.io");
    assert_string_equal(r.ch[0].scope, "repository:user/image:pull");
}

static void parses_basic_challenge(void **state)
{
    struct result r = parse("Basic realm=\"Registry Realm\"");
    assert_int_equal(r.rc, 0);
    assert_int_equal(r.n, 1);
    assert_int_equal(r.ch[0].scheme, AM_AUTH_BASIC);
    assert_string_equal(r.ch[0].realm, "Registry Realm");
}

static void parses_bearer_error_of_rfc6750(void **state)
{
    /* RFC 6750 §3 example; error_description is not stored. */
    struct result r = parse("Bearer realm=\"example\", error=\"invalid_token\", "
                            "error_description=\"The access token expired\"");
    assert_int_equal(r.rc, 0);
    assert_int_equal(r.n, 1);
    assert_string_equal(r.ch[0].realm, "example");
    assert_string_equal(r.ch[0].error, "invalid_token");
    /* The token form of a value, too. */
    r = parse("Bearer realm=\"x\",error=insufficient_scope,scope=\"a b\"");
    assert_int_equal(r.rc, 0);
    assert_string_equal(r.ch[0].error, "insufficient_scope");
    assert_string_equal(r.ch[0].scope, "a b");
}

static void parses_several_challenges_in_one_header(void **state)
{
    struct result r = parse("Basic realm=\"x\", Bearer realm=\"https://a/token\",service=\"s\"");
    assert_int_equal(r.rc, 0);
    assert_int_equal(r.n, 2);
    assert_int_equal(r.ch[0].scheme, AM_AUTH_BASIC);
    assert_string_equal(r.ch[0].realm, "x");
    assert_string_equal(r.ch[0].service, "");
    assert_int_equal(r.ch[1].scheme, AM_AUTH_BEARER);
    assert_string_equal(r.ch[1].realm, "https://a/token");
    assert_string_equal(r.ch[1].service, "s");
}

static void parses_the_rfc7235_example(void **state)
{
    /* RFC 7235 §4.1: two challenges, the first with a quoted-pair in a value. */
    struct result r = parse("Newauth realm=\"apps\", type=1, title=\"Login to \\\"apps\\\"\", "
                            "Basic realm=\"simple\"");
    assert_int_equal(r.rc, 0);
    assert_int_equal(r.n, 2);
    assert_int_equal(r.ch[0].scheme, AM_AUTH_OTHER);
    assert_string_equal(r.ch[0].realm, "apps");
    assert_int_equal(r.ch[1].scheme, AM_AUTH_BASIC);
    assert_string_equal(r.ch[1].realm, "simple");
}

static void parses_token68_and_bare_schemes(void **state)
{
    struct result r = parse("Negotiate YIIBzwYGKwYBBQUCoIIBwzCCAb+gMDAu==, Basic realm=\"r\"");
    assert_int_equal(r.rc, 0);
    assert_int_equal(r.n, 2);
    assert_int_equal(r.ch[0].scheme, AM_AUTH_OTHER);
    assert_string_equal(r.ch[0].realm, "");
    assert_string_equal(r.ch[1].realm, "r");
    r = parse("Negotiate");
    assert_int_equal(r.rc, 0);
    assert_int_equal(r.n, 1);
    r = parse("Negotiate, NTLM, Basic realm=\"r\"");
    assert_int_equal(r.rc, 0);
    assert_int_equal(r.n, 3);
    assert_int_equal(r.ch[2].scheme, AM_AUTH_BASIC);
    /* "realm=" with no value is, by the grammar, a token68 and not a parameter. */
    r = parse("Basic abc=");
    assert_int_equal(r.rc, 0);
    assert_int_equal(r.n, 1);
    r = parse("Bearer realm=");
    assert_int_equal(r.rc, 0);
    assert_string_equal(r.ch[0].realm, "");
}

static void unescapes_quoted_pairs(void **state)
{
    struct result r = parse("Bearer realm=\"a\\\"b\\\\c\\d\"");
    assert_int_equal(r.rc, 0);
    assert_string_equal(r.ch[0].realm, "a\"b\\cd");
    r = parse("Bearer realm=\"with, comma; and = sign\",service=\"s\"");
    assert_int_equal(r.rc, 0);
    assert_string_equal(r.ch[0].realm, "with, comma; and = sign");
    assert_string_equal(r.ch[0].service, "s");
    r = parse("Bearer realm=\"\"");
    assert_int_equal(r.rc, 0);
    assert_string_equal(r.ch[0].realm, "");
}

static void matches_scheme_and_parameter_names_case_insensitively(void **state)
{
    struct result r = parse("bEaReR REALM=\"x\",Service=\"y\",sCoPe=\"z\"");
    assert_int_equal(r.rc, 0);
    assert_int_equal(r.ch[0].scheme, AM_AUTH_BEARER);
    assert_string_equal(r.ch[0].realm, "x");
    assert_string_equal(r.ch[0].service, "y");
    assert_string_equal(r.ch[0].scope, "z");
    r = parse("BASIC realm=\"x\"");
    assert_int_equal(r.ch[0].scheme, AM_AUTH_BASIC);
}

static void tolerates_odd_spacing_and_empty_list_elements(void **state)
{
    struct result r = parse(" ,Bearer  realm = \"x\" ,\t service=\"y\" ,, ");
    assert_int_equal(r.rc, 0);
    assert_int_equal(r.n, 1);
    assert_string_equal(r.ch[0].realm, "x");
    assert_string_equal(r.ch[0].service, "y");
}

static void skips_unknown_parameters(void **state)
{
    struct result r = parse("Bearer foo=\"bar\",realm=\"x\",charset=UTF-8");
    assert_int_equal(r.rc, 0);
    assert_int_equal(r.n, 1);
    assert_string_equal(r.ch[0].realm, "x");
}

static void stores_at_most_max_challenges_but_checks_them_all(void **state)
{
    struct am_challenge two[2];
    size_t n = 99;
    const char *s = "A realm=\"1\", B realm=\"2\", C realm=\"3\"";
    assert_int_equal(am_wwwauth_parse(s, strlen(s), two, 2, &n), 0);
    assert_int_equal(n, 2);
    assert_string_equal(two[1].realm, "2");
    assert_int_equal(am_wwwauth_parse(s, strlen(s), NULL, 0, &n), 0);
    assert_int_equal(n, 0);
    s = "A realm=\"1\", B realm=\"2\", C realm=\"3\", service=";
    assert_int_equal(am_wwwauth_parse(s, strlen(s), two, 2, &n), AM_EUPSTREAM_PROTOCOL);
    assert_int_equal(n, 0);
}

static void rejects_overlong_values(void **state)
{
    char s[1200], v[1100];
    memset(v, 'r', 1023);
    v[1023] = '\0';
    snprintf(s, sizeof s, "Bearer realm=\"%s\"", v);
    struct result r = parse(s);
    assert_int_equal(r.rc, 0);
    assert_int_equal(strlen(r.ch[0].realm), 1023);
    strcat(v, "r");
    snprintf(s, sizeof s, "Bearer realm=\"%s\"", v);
    expect_garbage(s);
    snprintf(s, sizeof s, "Bearer realm=%s", v); /* token form */
    expect_garbage(s);

    memset(v, 'e', 64);
    v[64] = '\0';
    snprintf(s, sizeof s, "Bearer error=\"%s\"", v);
    expect_garbage(s);
    v[63] = '\0';
    snprintf(s, sizeof s, "Bearer error=\"%s\"", v);
    assert_int_equal(parse(s).rc, 0);

    /* Unknown parameters are not stored, so their length does not matter. */
    memset(v, 'u', 1099);
    v[1099] = '\0';
    snprintf(s, sizeof s, "Bearer x=\"%s\"", v);
    assert_int_equal(parse(s).rc, 0);
}

static void rejects_duplicate_known_parameters(void **state)
{
    expect_garbage("Bearer realm=\"a\",realm=\"b\"");
    expect_garbage("Bearer realm=\"a\",REALM=\"b\"");
    /* The same name in two challenges is fine. */
    assert_int_equal(parse("Basic realm=\"a\", Bearer realm=\"b\"").rc, 0);
}

static void rejects_garbage(void **state)
{
    static const char *const bad[] = {
        "",
        "   ",
        ",,",
        "=x",
        "\"Bearer\"",
        "Bearer realm=\"x\", service=",
        "Bearer realm=\"unterminated",
        "Bearer realm=\"x\\",
        "Bearer realm=\"x\" junk",
        "Bearer realm=\"x\"junk",
        "Bearer realm=https://auth.example/token",
        "Bearer\"realm\"",
        "Bearer realm=\"x\";service=\"y\"",
        "Bearer realm=\"a\x01"
        "b\"",
        "Bearer realm=\"a\r\nb\"",
        "Bearer realm=\"caf\xc3\xa9\"",
        "Negotiate abc=def=",
        "Negotiate a=b=c",
        "Negotiate ab cd",
        "Bearer realm=\"x\", =y",
        "B\x7f realm=\"x\"",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) expect_garbage(bad[i]);
}

static void rejects_nul_in_the_middle(void **state)
{
    static const char s[] = "Bearer realm=\"a\0b\"";
    struct am_challenge ch[1];
    size_t n = 99;
    assert_int_equal(am_wwwauth_parse(s, sizeof s - 1, ch, 1, &n), AM_EUPSTREAM_PROTOCOL);
    assert_int_equal(n, 0);
    static const char t[] = "Bearer\0 realm=\"a\"";
    assert_int_equal(am_wwwauth_parse(t, sizeof t - 1, ch, 1, &n), AM_EUPSTREAM_PROTOCOL);
}

static void parses_by_length_not_by_terminator(void **state)
{
    const char *s = "Basic realm=\"r\", service=";
    struct am_challenge ch[2];
    size_t n = 0;
    assert_int_equal(am_wwwauth_parse(s, 15, ch, 2, &n), 0);
    assert_int_equal(n, 1);
    assert_int_equal(am_wwwauth_parse(s, strlen(s), ch, 2, &n), AM_EUPSTREAM_PROTOCOL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(parses_docker_hub_bearer_challenge),
        cmocka_unit_test(parses_ghcr_bearer_challenge),
        cmocka_unit_test(parses_basic_challenge),
        cmocka_unit_test(parses_bearer_error_of_rfc6750),
        cmocka_unit_test(parses_several_challenges_in_one_header),
        cmocka_unit_test(parses_the_rfc7235_example),
        cmocka_unit_test(parses_token68_and_bare_schemes),
        cmocka_unit_test(unescapes_quoted_pairs),
        cmocka_unit_test(matches_scheme_and_parameter_names_case_insensitively),
        cmocka_unit_test(tolerates_odd_spacing_and_empty_list_elements),
        cmocka_unit_test(skips_unknown_parameters),
        cmocka_unit_test(stores_at_most_max_challenges_but_checks_them_all),
        cmocka_unit_test(rejects_overlong_values),
        cmocka_unit_test(rejects_duplicate_known_parameters),
        cmocka_unit_test(rejects_garbage),
        cmocka_unit_test(rejects_nul_in_the_middle),
        cmocka_unit_test(parses_by_length_not_by_terminator),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

/* Unit tests for src/reference.c: name/tag/registry grammar and docker normalisation. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "archmirror/error.h"
#include "archmirror/reference.h"

#define DIGEST_A "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"

static int name(const char *s)
{
    return am_reference_validate_name(s, strlen(s));
}
static int tag(const char *s)
{
    return am_reference_validate_tag(s, strlen(s));
}
static int registry(const char *s)
{
    return am_reference_validate_registry(s, strlen(s));
}

/* A string of n copies of c, in a static buffer. */
static const char *repeat(char c, size_t n)
{
    static char buf[1024];
    assert_true(n < sizeof buf);
    memset(buf, c, n);
    buf[n] = '\0';
    return buf;
}

static void accepts_names_of_the_oci_grammar(void **state)
{
    static const char *const ok[] = {
        "nginx",
        "library/nginx",
        "a/b/c/d",
        "foo.bar",
        "foo_bar",
        "foo__bar",
        "foo-bar",
        "foo---bar",
        "a0",
        "123",
        "a/0",
        "x.y-z_w__v/k8s.io",
        "grafana/loki-canary",
    };
    for (size_t i = 0; i < sizeof ok / sizeof ok[0]; i++) {
        if (name(ok[i]) != 0) fail_msg("refused \"%s\"", ok[i]);
    }
}

static void rejects_uppercase_repository(void **state)
{
    assert_int_equal(name("Nginx"), AM_ENAME_INVALID);
    assert_int_equal(name("library/NGINX"), AM_ENAME_INVALID);
}

static void rejects_dot_segments_and_encoded_dots(void **state)
{
    static const char *const bad[] = {
        "..",         ".",   "a/../b", "a/./b", "../a", "a/..", "%2e%2e",
        "a/%2e%2e/b", "%2E", ".a",     "a.",    "a..b", "a/.b",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        if (name(bad[i]) != AM_ENAME_INVALID) fail_msg("accepted \"%s\"", bad[i]);
    }
}

static void rejects_empty_components_and_bad_separators(void **state)
{
    static const char *const bad[] = {
        "",   "/",  "a/", "/a",  "a//b", "a___b", "a._b", "a-_b",  "a_-b", "_a",
        "-a", "a-", "a_", "a b", "a\tb", "a:b",   "a@b",  "a%2fb", "a\\b",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        if (name(bad[i]) != AM_ENAME_INVALID) fail_msg("accepted \"%s\"", bad[i]);
    }
}

static void rejects_control_bytes_and_nul_in_names(void **state)
{
    assert_int_equal(name("a\x01"
                          "b"),
                     AM_ENAME_INVALID);
    assert_int_equal(name("a\x7f"), AM_ENAME_INVALID);
    assert_int_equal(name("a\xc3\xa9"), AM_ENAME_INVALID);
    assert_int_equal(am_reference_validate_name("ab\0cd", 5), AM_ENAME_INVALID);
    assert_int_equal(am_reference_validate_name("ab\0", 3), AM_ENAME_INVALID);
    /* The same bytes up to the NUL are fine: the length decides, not the terminator. */
    assert_int_equal(am_reference_validate_name("ab\0cd", 2), 0);
}

static void limits_names_to_255_bytes(void **state)
{
    assert_int_equal(name(repeat('a', 255)), 0);
    assert_int_equal(name(repeat('a', 256)), AM_ENAME_INVALID);
}

static void accepts_tags_of_the_oci_grammar(void **state)
{
    static const char *const ok[] = {"latest", "1.27",          "v1.0-rc_1",     "_x",
                                     "A",      "3.20.3-alpine", "sha256-abc.sig"};
    for (size_t i = 0; i < sizeof ok / sizeof ok[0]; i++) {
        if (tag(ok[i]) != 0) fail_msg("refused \"%s\"", ok[i]);
    }
    assert_int_equal(tag(repeat('t', 128)), 0);
}

static void rejects_bad_tags(void **state)
{
    static const char *const bad[] = {"", ".x", "-x", "a:b", "a/b", "a@b", "a b", "%2e", "a\x01"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        if (tag(bad[i]) != AM_ETAG_INVALID) fail_msg("accepted \"%s\"", bad[i]);
    }
    assert_int_equal(tag(repeat('t', 129)), AM_ETAG_INVALID);
    assert_int_equal(am_reference_validate_tag("v1\0x", 4), AM_ETAG_INVALID);
}

static void accepts_registry_hosts_ports_and_addresses(void **state)
{
    static const char *const ok[] = {
        "docker.io",
        "ghcr.io",
        "localhost",
        "localhost:5000",
        "registry-1.docker.io",
        "10.0.0.1",
        "10.0.0.1:5000",
        "255.255.255.255",
        "0.0.0.0",
        "[::1]",
        "[::1]:5000",
        "[2001:db8::1]",
        "[::ffff:10.0.0.1]",
        "a.b-c.d",
        "xn--bcher-kva.example",
        "r:1",
        "r:65535",
        "host.docker.internal:5000",
    };
    for (size_t i = 0; i < sizeof ok / sizeof ok[0]; i++) {
        if (registry(ok[i]) != 0) fail_msg("refused \"%s\"", ok[i]);
    }
}

static void rejects_uppercase_registry(void **state)
{
    assert_int_equal(registry("Docker.io"), AM_EINVAL);
    assert_int_equal(registry("GHCR.IO"), AM_EINVAL);
    assert_int_equal(registry("[FE80::1]"), AM_EINVAL);
}

static void rejects_bad_ports(void **state)
{
    static const char *const bad[] = {"docker.io:",       "docker.io:0",   "docker.io:65536",
                                      "docker.io:05000",  "docker.io:abc", "docker.io:-1",
                                      "docker.io:123456", "a:1:2",         ":5000",
                                      "[::1]:",           "[::1]:0"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        if (registry(bad[i]) != AM_EINVAL) fail_msg("accepted \"%s\"", bad[i]);
    }
}

static void rejects_bad_host_labels(void **state)
{
    static const char *const bad[] = {"",       "-a.io",  "a-.io",  "a..io", ".io",
                                      "io.",    "a_b.io", "a b.io", "a/b",   "docker.io/x",
                                      "%2e%2e", "..",     "a.%2e"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        if (registry(bad[i]) != AM_EINVAL) fail_msg("accepted \"%s\"", bad[i]);
    }
    assert_int_equal(registry(repeat('a', 63)), 0);
    assert_int_equal(registry(repeat('a', 64)), AM_EINVAL);
}

static void rejects_numeric_hosts_that_are_not_ipv4(void **state)
{
    assert_int_equal(registry("999.1.1.1"), AM_EINVAL);
    assert_int_equal(registry("1.2.3"), AM_EINVAL);
    assert_int_equal(registry("1.2.3.4.5"), AM_EINVAL);
    assert_int_equal(registry("01.2.3.4"), AM_EINVAL);
    assert_int_equal(registry("256.0.0.1:80"), AM_EINVAL);
    /* A numeric label that is not the last one is a DNS name. */
    assert_int_equal(registry("1.example"), 0);
}

static void rejects_malformed_ipv6_literals(void **state)
{
    static const char *const bad[] = {
        "[::1",   "::1",   "[::1]x", "[::g]", "[]", "[fe80::1%eth0]", "[1:2:3:4:5:6:7:8:9]",
        "[::1]]", "[[::1]"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        if (registry(bad[i]) != AM_EINVAL) fail_msg("accepted \"%s\"", bad[i]);
    }
}

static void rejects_overlong_registry_and_nul(void **state)
{
    char host[300];
    /* 4 labels of 63 plus dots = 255 bytes: the maximum. */
    memset(host, 'a', 255);
    host[63] = host[127] = host[191] = '.';
    host[255] = '\0';
    assert_int_equal(registry(host), 0);
    host[254] = '\0';
    strcat(host, "-");
    assert_int_equal(registry(host), AM_EINVAL); /* a label may not end in '-' */
    /* Short valid labels: "a.a.…a" of 255 bytes passes, 257 fails on length alone. */
    for (size_t i = 0; i < 257; i++) host[i] = i % 2 ? '.' : 'a';
    host[255] = '\0';
    assert_int_equal(registry(host), 0);
    host[255] = '.';
    host[257] = '\0';
    assert_int_equal(registry(host), AM_EINVAL);
    assert_int_equal(am_reference_validate_registry("docker.io\0x", 11), AM_EINVAL);
    assert_int_equal(registry("docker.io\r\n"), AM_EINVAL);
}

struct parse_case {
    const char *input;
    const char *registry;
    const char *repository;
    const char *tag;    /* NULL: no tag */
    const char *digest; /* NULL: no digest */
};

static void parses_and_normalises_like_docker(void **state)
{
    static const struct parse_case cases[] = {
        {"nginx", "docker.io", "library/nginx", "latest", NULL},
        {"nginx:1.27", "docker.io", "library/nginx", "1.27", NULL},
        {"library/nginx", "docker.io", "library/nginx", "latest", NULL},
        {"docker.io/nginx", "docker.io", "library/nginx", "latest", NULL},
        {"docker.io/library/nginx:1.27", "docker.io", "library/nginx", "1.27", NULL},
        {"index.docker.io/nginx", "docker.io", "library/nginx", "latest", NULL},
        {"registry-1.docker.io/bitnami/redis:7", "docker.io", "bitnami/redis", "7", NULL},
        {"user/repo", "docker.io", "user/repo", "latest", NULL},
        {"quay.io/a", "quay.io", "a", "latest", NULL},
        {"ghcr.io/o/r@" DIGEST_A, "ghcr.io", "o/r", NULL, DIGEST_A},
        {"ghcr.io/o/r:v1@" DIGEST_A, "ghcr.io", "o/r", "v1", DIGEST_A},
        {"alpine@" DIGEST_A, "docker.io", "library/alpine", NULL, DIGEST_A},
        {"localhost:5000/x:y", "localhost:5000", "x", "y", NULL},
        {"localhost/x", "localhost", "x", "latest", NULL},
        /* No '/': "localhost:5000" is docker's library/localhost with tag 5000. */
        {"localhost:5000", "docker.io", "library/localhost", "5000", NULL},
        {"[::1]:5000/a/b", "[::1]:5000", "a/b", "latest", NULL},
        {"10.0.0.1:5000/team/app:Prod", "10.0.0.1:5000", "team/app", "Prod", NULL},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const struct parse_case *c = &cases[i];
        struct am_reference ref;
        char msg[128] = "";
        int rc = am_reference_parse(c->input, strlen(c->input), &ref, msg, sizeof msg);
        if (rc != 0) fail_msg("\"%s\": %s (%s)", c->input, am_error_name(rc), msg);
        assert_string_equal(ref.registry, c->registry);
        assert_string_equal(ref.repository, c->repository);
        assert_int_equal(ref.has_tag, c->tag != NULL);
        assert_string_equal(ref.tag, c->tag ? c->tag : "");
        assert_int_equal(ref.has_digest, c->digest != NULL);
        if (c->digest) assert_string_equal(ref.digest.str, c->digest);
    }
}

struct bad_case {
    const char *input;
    int err;
    const char *msg_part;
};

static void rejects_bad_references_with_a_reason(void **state)
{
    static const struct bad_case cases[] = {
        {"", AM_ENAME_INVALID, "empty"},
        {"Nginx", AM_ENAME_INVALID, "lowercase"},
        {"docker.io/Library/nginx", AM_ENAME_INVALID, "lowercase"},
        {"nginx:", AM_ETAG_INVALID, "tag"},
        {"nginx:-x", AM_ETAG_INVALID, "tag"},
        {"nginx:a:b", AM_ETAG_INVALID, "tag"},
        {"nginx@sha256:abc", AM_EDIGEST_INVALID, "digest"},
        {"nginx@", AM_EDIGEST_INVALID, "digest"},
        {"nginx@" DIGEST_A "@" DIGEST_A, AM_EDIGEST_INVALID, "digest"},
        {"ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad", AM_ENAME_INVALID,
         "hexadecimal"},
        {"Docker.IO/x", AM_ENAME_INVALID, "registry"},
        {"docker.io:99999/x", AM_ENAME_INVALID, "registry"},
        {"docker.io/", AM_ENAME_INVALID, "repository"},
        {"docker.io//x", AM_ENAME_INVALID, "repository"},
        {"ghcr.io/a/../b", AM_ENAME_INVALID, "repository"},
        {"../x", AM_ENAME_INVALID, "registry"}, /* ".." has a '.', so it names a host */
        {"%2e%2e/x", AM_ENAME_INVALID, "repository"},
        {"ghcr.io/a/", AM_ENAME_INVALID, "repository"},
        {"nginx latest", AM_ENAME_INVALID, "repository"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const struct bad_case *c = &cases[i];
        struct am_reference ref;
        char msg[128] = "";
        int rc = am_reference_parse(c->input, strlen(c->input), &ref, msg, sizeof msg);
        if (rc != c->err)
            fail_msg("\"%s\": got %s, want %s", c->input, am_error_name(rc), am_error_name(c->err));
        if (!strstr(msg, c->msg_part)) fail_msg("\"%s\": message \"%s\"", c->input, msg);
        assert_null(strchr(msg, '\n'));
    }
}

static void rejects_nul_in_the_middle_of_a_reference(void **state)
{
    struct am_reference ref;
    assert_int_equal(am_reference_parse("nginx\0:1", 8, &ref, NULL, 0), AM_ENAME_INVALID);
    assert_int_equal(am_reference_parse("nginx:1\0", 8, &ref, NULL, 0), AM_ETAG_INVALID);
}

static void limits_the_normalised_name_to_255_bytes(void **state)
{
    char in[1100]; /* repeat() may return up to 1023 bytes */
    struct am_reference ref;
    /* "docker.io/library/" + 237 = 255 */
    snprintf(in, sizeof in, "%s", repeat('a', 237));
    assert_int_equal(am_reference_parse(in, strlen(in), &ref, NULL, 0), 0);
    assert_int_equal(strlen(ref.repository), 8 + 237);
    snprintf(in, sizeof in, "%s", repeat('a', 238));
    assert_int_equal(am_reference_parse(in, strlen(in), &ref, NULL, 0), AM_ENAME_INVALID);
    /* "quay.io/" + 247 = 255 */
    snprintf(in, sizeof in, "quay.io/%s", repeat('b', 247));
    assert_int_equal(am_reference_parse(in, strlen(in), &ref, NULL, 0), 0);
    snprintf(in, sizeof in, "quay.io/%s", repeat('b', 248));
    assert_int_equal(am_reference_parse(in, strlen(in), &ref, NULL, 0), AM_ENAME_INVALID);
}

static void leaves_the_reference_untouched_on_failure(void **state)
{
    struct am_reference ref;
    memset(&ref, 0x5a, sizeof ref);
    assert_int_equal(am_reference_parse("docker.io/x:", 12, &ref, NULL, 0), AM_ETAG_INVALID);
    assert_int_equal((unsigned char)ref.registry[0], 0x5a);
    assert_int_equal((unsigned char)ref.repository[0], 0x5a);
}

static void truncates_a_long_message_safely(void **state)
{
    struct am_reference ref;
    char msg[8];
    memset(msg, 'x', sizeof msg);
    assert_int_equal(am_reference_parse("Nginx", 5, &ref, msg, sizeof msg), AM_ENAME_INVALID);
    assert_int_equal(strlen(msg), sizeof msg - 1);
}

static void formats_registry_repository_tag_and_digest(void **state)
{
    struct am_reference ref;
    char out[512];

    assert_int_equal(am_reference_parse("nginx", 5, &ref, NULL, 0), 0);
    am_reference_format(&ref, out, sizeof out);
    assert_string_equal(out, "docker.io/library/nginx:latest");

    assert_int_equal(
        am_reference_parse("ghcr.io/o/r@" DIGEST_A, 12 + strlen(DIGEST_A), &ref, NULL, 0), 0);
    am_reference_format(&ref, out, sizeof out);
    assert_string_equal(out, "ghcr.io/o/r@" DIGEST_A);

    assert_int_equal(
        am_reference_parse("ghcr.io/o/r:v1@" DIGEST_A, 15 + strlen(DIGEST_A), &ref, NULL, 0), 0);
    am_reference_format(&ref, out, sizeof out);
    assert_string_equal(out, "ghcr.io/o/r:v1@" DIGEST_A);
}

static void format_round_trips_through_parse(void **state)
{
    struct am_reference a, b;
    char out[512];
    const char *in = "localhost:5000/team/app:v2@" DIGEST_A;
    assert_int_equal(am_reference_parse(in, strlen(in), &a, NULL, 0), 0);
    am_reference_format(&a, out, sizeof out);
    assert_string_equal(out, in);
    assert_int_equal(am_reference_parse(out, strlen(out), &b, NULL, 0), 0);
    assert_memory_equal(&a, &b, sizeof a);
}

static void format_truncates_safely(void **state)
{
    struct am_reference ref;
    char out[10];
    memset(out, 'x', sizeof out);
    assert_int_equal(am_reference_parse("nginx", 5, &ref, NULL, 0), 0);
    am_reference_format(&ref, out, sizeof out);
    assert_string_equal(out, "docker.io");
    out[0] = 'q';
    am_reference_format(&ref, out, 0);
    assert_int_equal(out[0], 'q');
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(accepts_names_of_the_oci_grammar),
        cmocka_unit_test(rejects_uppercase_repository),
        cmocka_unit_test(rejects_dot_segments_and_encoded_dots),
        cmocka_unit_test(rejects_empty_components_and_bad_separators),
        cmocka_unit_test(rejects_control_bytes_and_nul_in_names),
        cmocka_unit_test(limits_names_to_255_bytes),
        cmocka_unit_test(accepts_tags_of_the_oci_grammar),
        cmocka_unit_test(rejects_bad_tags),
        cmocka_unit_test(accepts_registry_hosts_ports_and_addresses),
        cmocka_unit_test(rejects_uppercase_registry),
        cmocka_unit_test(rejects_bad_ports),
        cmocka_unit_test(rejects_bad_host_labels),
        cmocka_unit_test(rejects_numeric_hosts_that_are_not_ipv4),
        cmocka_unit_test(rejects_malformed_ipv6_literals),
        cmocka_unit_test(rejects_overlong_registry_and_nul),
        cmocka_unit_test(parses_and_normalises_like_docker),
        cmocka_unit_test(rejects_bad_references_with_a_reason),
        cmocka_unit_test(rejects_nul_in_the_middle_of_a_reference),
        cmocka_unit_test(limits_the_normalised_name_to_255_bytes),
        cmocka_unit_test(leaves_the_reference_untouched_on_failure),
        cmocka_unit_test(truncates_a_long_message_safely),
        cmocka_unit_test(formats_registry_repository_tag_and_digest),
        cmocka_unit_test(format_round_trips_through_parse),
        cmocka_unit_test(format_truncates_safely),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

/* Unit tests for src/route.c: every endpoint, nested names, ns= parsing and hostile
 * request targets. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "archmirror/error.h"
#include "archmirror/route.h"

#define DIGEST_A "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"

struct result {
    struct am_route r;
    char msg[128];
    int rc;
};

static struct result route_q(const char *path, const char *query)
{
    struct result x;
    memset(&x, 0, sizeof x);
    x.rc = am_route_parse(path, strlen(path), query, query ? strlen(query) : 0, &x.r, x.msg,
                          sizeof x.msg);
    return x;
}

static struct result route(const char *path)
{
    return route_q(path, "");
}

static void expect_kind(const char *path, enum am_route_kind kind)
{
    struct result x = route(path);
    if (x.rc != 0) fail_msg("\"%s\": %s (%s)", path, am_error_name(x.rc), x.msg);
    if (x.r.kind != kind) fail_msg("\"%s\": kind %d, want %d", path, x.r.kind, kind);
}

static void expect_error(const char *path, const char *query, int err)
{
    struct result x = route_q(path, query);
    if (x.rc != err)
        fail_msg("\"%s\" ? \"%s\": got %s, want %s", path, query, am_error_name(x.rc),
                 am_error_name(err));
    assert_true(x.msg[0] != '\0');
    assert_null(strchr(x.msg, '\n'));
}

static void routes_the_base_endpoint(void **state)
{
    expect_kind("/v2", AM_ROUTE_BASE);
    expect_kind("/v2/", AM_ROUTE_BASE);
}

static void leaves_paths_outside_v2_alone(void **state)
{
    static const char *const paths[] = {"",     "/",        "/v1/", "/v2x", "/v2x/a/manifests/b",
                                        "/V2/", "/metrics", "v2/",  "//v2/"};
    for (size_t i = 0; i < sizeof paths / sizeof paths[0]; i++)
        expect_kind(paths[i], AM_ROUTE_NONE);
    /* Not ours, so its query is not ours to judge either. */
    assert_int_equal(route_q("/healthz", "ns=%zz").rc, 0);
}

static void routes_manifest_by_tag(void **state)
{
    struct result x = route("/v2/library/alpine/manifests/3.20");
    assert_int_equal(x.rc, 0);
    assert_int_equal(x.r.kind, AM_ROUTE_MANIFEST);
    assert_string_equal(x.r.name, "library/alpine");
    assert_false(x.r.by_digest);
    assert_string_equal(x.r.tag, "3.20");
    assert_false(x.r.has_ns);
}

static void routes_manifest_by_digest(void **state)
{
    struct result x = route("/v2/o/r/manifests/" DIGEST_A);
    assert_int_equal(x.rc, 0);
    assert_int_equal(x.r.kind, AM_ROUTE_MANIFEST);
    assert_true(x.r.by_digest);
    assert_string_equal(x.r.digest.str, DIGEST_A);
    assert_string_equal(x.r.tag, "");
}

static void routes_blobs_tags_and_referrers(void **state)
{
    struct result x = route("/v2/library/alpine/blobs/" DIGEST_A);
    assert_int_equal(x.rc, 0);
    assert_int_equal(x.r.kind, AM_ROUTE_BLOB);
    assert_string_equal(x.r.name, "library/alpine");
    assert_string_equal(x.r.digest.str, DIGEST_A);

    x = route("/v2/a/b/tags/list");
    assert_int_equal(x.rc, 0);
    assert_int_equal(x.r.kind, AM_ROUTE_TAGS);
    assert_string_equal(x.r.name, "a/b");

    x = route("/v2/x/referrers/" DIGEST_A);
    assert_int_equal(x.rc, 0);
    assert_int_equal(x.r.kind, AM_ROUTE_REFERRERS);
    assert_string_equal(x.r.name, "x");
    assert_string_equal(x.r.digest.str, DIGEST_A);
}

static void routes_upload_endpoints(void **state)
{
    static const char *const paths[] = {
        "/v2/x/blobs/uploads/", "/v2/x/blobs/uploads",
        "/v2/a/b/blobs/uploads/5f1b6a0e-2c1d-4c5e-9f0a-1b2c3d4e5f60",
        "/v2/x/blobs/uploads/" DIGEST_A};
    for (size_t i = 0; i < sizeof paths / sizeof paths[0]; i++)
        expect_kind(paths[i], AM_ROUTE_UPLOAD);
    struct result x = route("/v2/a/b/blobs/uploads/abc");
    assert_string_equal(x.r.name, "a/b");
}

static void routes_deeply_nested_names(void **state)
{
    struct result x = route("/v2/a/b/c/d/e/manifests/latest");
    assert_int_equal(x.rc, 0);
    assert_string_equal(x.r.name, "a/b/c/d/e");
    assert_string_equal(x.r.tag, "latest");
}

static void splits_at_the_last_endpoint_segment(void **state)
{
    /* Endpoint words are legal name components; the endpoint is the one at the end. */
    struct result x = route("/v2/foo/manifests/manifests/x");
    assert_int_equal(x.r.kind, AM_ROUTE_MANIFEST);
    assert_string_equal(x.r.name, "foo/manifests");
    assert_string_equal(x.r.tag, "x");

    x = route("/v2/blobs/blobs/" DIGEST_A);
    assert_int_equal(x.r.kind, AM_ROUTE_BLOB);
    assert_string_equal(x.r.name, "blobs");

    x = route("/v2/a/tags/list/manifests/latest");
    assert_int_equal(x.r.kind, AM_ROUTE_MANIFEST);
    assert_string_equal(x.r.name, "a/tags/list");

    x = route("/v2/a/manifests/tags/list");
    assert_int_equal(x.r.kind, AM_ROUTE_TAGS);
    assert_string_equal(x.r.name, "a/manifests");

    x = route("/v2/a/blobs/uploads/manifests/v1");
    assert_int_equal(x.r.kind, AM_ROUTE_MANIFEST);
    assert_string_equal(x.r.name, "a/blobs/uploads");
}

static void reports_unknown_endpoints_under_v2(void **state)
{
    static const char *const paths[] = {
        "/v2/x",
        "/v2/x/",
        "/v2/x/foo/bar",
        "/v2/x/manifests/latest/",
        "/v2/_catalog",
        "/v2/x/tags/list/",
        "/v2/x/tags/other",
        "/v2/../x",
        "/v2/manifests/x",
        "/v2/tags/list",
        "/v2//",
        "/v2/a/..",
    };
    for (size_t i = 0; i < sizeof paths / sizeof paths[0]; i++)
        expect_kind(paths[i], AM_ROUTE_UNKNOWN_V2);
}

static void rejects_dot_segments_in_names(void **state)
{
    expect_error("/v2/a/../b/manifests/x", "", AM_ENAME_INVALID);
    expect_error("/v2/../x/manifests/y", "", AM_ENAME_INVALID);
    expect_error("/v2/./x/blobs/" DIGEST_A, "", AM_ENAME_INVALID);
}

static void rejects_percent_encoded_names_and_tags(void **state)
{
    expect_error("/v2/%2e%2e/manifests/x", "", AM_ENAME_INVALID);
    expect_error("/v2/a%2Fb/manifests/x", "", AM_ENAME_INVALID);
    expect_error("/v2/a/%2e%2e/b/tags/list", "", AM_ENAME_INVALID);
    expect_error("/v2/x/manifests/%2e%2e", "", AM_ETAG_INVALID);
    expect_error("/v2/x/manifests/..", "", AM_ETAG_INVALID);
}

static void rejects_empty_components(void **state)
{
    expect_error("/v2//manifests/x", "", AM_ENAME_INVALID);
    expect_error("/v2//a/manifests/x", "", AM_ENAME_INVALID);
    expect_error("/v2/a//b/manifests/x", "", AM_ENAME_INVALID);
    expect_error("/v2/a//tags/list", "", AM_ENAME_INVALID);
    expect_error("/v2/x/manifests/", "", AM_ETAG_INVALID);
}

static void rejects_uppercase_repository(void **state)
{
    expect_error("/v2/Library/alpine/manifests/latest", "", AM_ENAME_INVALID);
    expect_error("/v2/ALPINE/blobs/" DIGEST_A, "", AM_ENAME_INVALID);
    /* Tags may be uppercase. */
    struct result x = route("/v2/alpine/manifests/Latest");
    assert_int_equal(x.rc, 0);
    assert_string_equal(x.r.tag, "Latest");
}

static void limits_names_to_255_bytes(void **state)
{
    char path[400], name[300];
    memset(name, 'a', 255);
    name[255] = '\0';
    snprintf(path, sizeof path, "/v2/%s/manifests/latest", name);
    struct result x = route(path);
    assert_int_equal(x.rc, 0);
    assert_int_equal(strlen(x.r.name), 255);
    memcpy(name, "b/", 2); /* still 255 bytes, two components */
    snprintf(path, sizeof path, "/v2/%s/tags/list", name);
    assert_int_equal(route(path).rc, 0);
    name[255] = 'a';
    name[256] = '\0';
    snprintf(path, sizeof path, "/v2/%s/manifests/latest", name);
    expect_error(path, "", AM_ENAME_INVALID);
}

static void rejects_overlong_tags(void **state)
{
    char path[300], tag[200];
    memset(tag, 't', 129);
    tag[129] = '\0';
    snprintf(path, sizeof path, "/v2/x/manifests/%s", tag);
    expect_error(path, "", AM_ETAG_INVALID);
    tag[128] = '\0';
    snprintf(path, sizeof path, "/v2/x/manifests/%s", tag);
    assert_int_equal(route(path).rc, 0);
}

static void rejects_bad_digests(void **state)
{
    expect_error("/v2/x/blobs/sha256:abc", "", AM_EDIGEST_INVALID);
    expect_error("/v2/x/blobs/latest", "", AM_EDIGEST_INVALID);
    expect_error("/v2/x/blobs/", "", AM_EDIGEST_INVALID);
    expect_error("/v2/x/manifests/sha256:BA7816BF8F01CFEA414140DE5DAE2223B00361A396177A9CB4"
                 "10FF61F20015AD",
                 "", AM_EDIGEST_INVALID);
    expect_error("/v2/x/manifests/md5:abc", "", AM_EDIGEST_INVALID);
    expect_error("/v2/x/referrers/latest", "", AM_EDIGEST_INVALID);
    expect_error("/v2/x/blobs/" DIGEST_A "%00", "", AM_EDIGEST_INVALID);
}

static void rejects_control_bytes_and_nul(void **state)
{
    static const char nul[] = "/v2/a\0b/manifests/x";
    struct am_route r;
    assert_int_equal(am_route_parse(nul, sizeof nul - 1, "", 0, &r, NULL, 0), AM_ENAME_INVALID);
    static const char nul_tag[] = "/v2/a/manifests/x\0y";
    assert_int_equal(am_route_parse(nul_tag, sizeof nul_tag - 1, "", 0, &r, NULL, 0),
                     AM_ETAG_INVALID);
    expect_error("/v2/a\r\nb/manifests/x", "", AM_ENAME_INVALID);
    expect_error("/v2/a/manifests/x\x7f", "", AM_ETAG_INVALID);
}

static void parses_the_ns_parameter(void **state)
{
    struct result x = route_q("/v2/library/alpine/manifests/3.20", "ns=docker.io");
    assert_int_equal(x.rc, 0);
    assert_true(x.r.has_ns);
    assert_string_equal(x.r.ns, "docker.io");

    x = route_q("/v2/x/blobs/" DIGEST_A, "foo=bar&ns=localhost%3A5000&x");
    assert_int_equal(x.rc, 0);
    assert_string_equal(x.r.ns, "localhost:5000");

    x = route_q("/v2/x/tags/list", "n=1&ns=%5b%3a%3a1%5D%3a5000");
    assert_int_equal(x.rc, 0);
    assert_string_equal(x.r.ns, "[::1]:5000");

    x = route_q("/v2/", "ns=ghcr.io");
    assert_int_equal(x.rc, 0);
    assert_int_equal(x.r.kind, AM_ROUTE_BASE);
    assert_string_equal(x.r.ns, "ghcr.io");
}

static void ignores_other_query_parameters(void **state)
{
    struct result x = route_q("/v2/x/tags/list", "n=100&last=%zz&NS=docker.io&nsx=1&xns=2");
    assert_int_equal(x.rc, 0);
    assert_false(x.r.has_ns);
    x = route_q("/v2/x/tags/list", NULL);
    assert_int_equal(x.rc, 0);
    assert_false(x.r.has_ns);
    x = route_q("/v2/x/tags/list", "&&");
    assert_int_equal(x.rc, 0);
}

static void rejects_bad_ns_values(void **state)
{
    static const char *const bad[] = {
        "ns=",
        "ns",
        "ns=%zz",
        "ns=%4",
        "ns=%",
        "ns=docker.io%",
        "ns=docker.io%00",
        "ns=Docker.io",
        "ns=a+b",
        "ns=docker.io/x",
        "ns=docker.io%2F..",
        "ns=..",
        "ns=%2e%2e",
        "ns=docker.io:0",
        "ns=a b",
        "ns=docker.io%0d%0aX-Evil:1",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        expect_error("/v2/x/manifests/latest", bad[i], AM_EBAD_REQUEST);
    static const char raw_nul[] = "ns=docker\0.io";
    struct am_route r;
    assert_int_equal(am_route_parse("/v2/", 4, raw_nul, sizeof raw_nul - 1, &r, NULL, 0),
                     AM_EBAD_REQUEST);
}

static void rejects_duplicate_ns(void **state)
{
    expect_error("/v2/x/manifests/latest", "ns=docker.io&ns=docker.io", AM_EBAD_REQUEST);
    expect_error("/v2/x/manifests/latest", "ns=docker.io&a=b&ns=ghcr.io", AM_EBAD_REQUEST);
}

static void rejects_overlong_ns(void **state)
{
    char q[600];
    size_t n = (size_t)snprintf(q, sizeof q, "ns=");
    /* "a.a.a…" of 255 bytes fits; one more label does not. */
    for (size_t i = 0; i < 255; i++) q[n + i] = i % 2 ? '.' : 'a';
    q[n + 255] = '\0';
    struct result x = route_q("/v2/", q);
    assert_int_equal(x.rc, 0);
    assert_int_equal(strlen(x.r.ns), 255);
    strcat(q, ".a");
    expect_error("/v2/", q, AM_EBAD_REQUEST);
}

static void adds_library_prefix_only_for_docker_hub_short_names(void **state)
{
    char out[AM_NAME_MAX + 1];
    assert_int_equal(am_route_upstream_name("docker.io", "alpine", out, sizeof out), 0);
    assert_string_equal(out, "library/alpine");
    assert_int_equal(am_route_upstream_name("docker.io", "library/alpine", out, sizeof out), 0);
    assert_string_equal(out, "library/alpine");
    assert_int_equal(am_route_upstream_name("docker.io", "bitnami/redis", out, sizeof out), 0);
    assert_string_equal(out, "bitnami/redis");
    assert_int_equal(am_route_upstream_name("ghcr.io", "alpine", out, sizeof out), 0);
    assert_string_equal(out, "alpine");
    assert_int_equal(am_route_upstream_name("registry-1.docker.io", "alpine", out, sizeof out), 0);
    assert_string_equal(out, "alpine");
}

static void limits_the_upstream_name(void **state)
{
    char out[AM_NAME_MAX + 1], name[300];
    memset(name, 'a', 247);
    name[247] = '\0';
    assert_int_equal(am_route_upstream_name("docker.io", name, out, sizeof out), 0);
    assert_int_equal(strlen(out), 255);
    strcat(name, "a");
    assert_int_equal(am_route_upstream_name("docker.io", name, out, sizeof out), AM_ENAME_INVALID);
    /* A too-small output buffer fails rather than truncating. */
    char small[8];
    assert_int_equal(am_route_upstream_name("docker.io", "alpine", small, sizeof small),
                     AM_ENAME_INVALID);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(routes_the_base_endpoint),
        cmocka_unit_test(leaves_paths_outside_v2_alone),
        cmocka_unit_test(routes_manifest_by_tag),
        cmocka_unit_test(routes_manifest_by_digest),
        cmocka_unit_test(routes_blobs_tags_and_referrers),
        cmocka_unit_test(routes_upload_endpoints),
        cmocka_unit_test(routes_deeply_nested_names),
        cmocka_unit_test(splits_at_the_last_endpoint_segment),
        cmocka_unit_test(reports_unknown_endpoints_under_v2),
        cmocka_unit_test(rejects_dot_segments_in_names),
        cmocka_unit_test(rejects_percent_encoded_names_and_tags),
        cmocka_unit_test(rejects_empty_components),
        cmocka_unit_test(rejects_uppercase_repository),
        cmocka_unit_test(limits_names_to_255_bytes),
        cmocka_unit_test(rejects_overlong_tags),
        cmocka_unit_test(rejects_bad_digests),
        cmocka_unit_test(rejects_control_bytes_and_nul),
        cmocka_unit_test(parses_the_ns_parameter),
        cmocka_unit_test(ignores_other_query_parameters),
        cmocka_unit_test(rejects_bad_ns_values),
        cmocka_unit_test(rejects_duplicate_ns),
        cmocka_unit_test(rejects_overlong_ns),
        cmocka_unit_test(adds_library_prefix_only_for_docker_hub_short_names),
        cmocka_unit_test(limits_the_upstream_name),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

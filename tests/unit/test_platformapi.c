/*
 * test_platformapi — the pure parts of the platform API: image reference → upstream and
 * query, the image= query parameter, the batch body, containerd's choice for a required
 * platform (what "missing" is made of), the JSON of a result, timestamps, and the paths
 * the API owns. The HTTP side is tested end to end in tests/integration/test_platform_api.py.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "archmirror/buf.h"
#include "archmirror/config.h"
#include "archmirror/error.h"
#include "archmirror/mediatype.h"
#include "archmirror/platformapi.h"

static struct am_config cfg;

static int setup(void **state)
{
    char msg[256];
    (void)state;
    if (am_config_init_defaults(&cfg)) return -1;
    if (am_config_set_upstream(&cfg, "docker.io=http://127.0.0.1:9", msg, sizeof msg) ||
        am_config_set_upstream(&cfg, "example.com=http://127.0.0.1:9", msg, sizeof msg) ||
        am_config_set_upstream(&cfg, "localhost:5000=http://127.0.0.1:9", msg, sizeof msg))
        return -1;
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    am_config_cleanup(&cfg);
    return 0;
}

static struct am_platformapi_target target_ok(const char *s)
{
    struct am_platformapi_target t;
    struct am_platformapi_error e;
    if (am_platformapi_parse_image(&cfg, s, strlen(s), &t, &e) != 0)
        fail_msg("refused \"%s\": %s", s, e.message);
    return t;
}

static struct am_platformapi_error target_err(const char *s)
{
    struct am_platformapi_target t;
    struct am_platformapi_error e;
    memset(&e, 0, sizeof e);
    if (am_platformapi_parse_image(&cfg, s, strlen(s), &t, &e) == 0) fail_msg("took \"%s\"", s);
    return e;
}

static struct am_platform plat(const char *s)
{
    struct am_platform p;
    char msg[128];
    if (am_platform_parse(s, strlen(s), &p, NULL, msg, sizeof msg)) fail_msg("%s: %s", s, msg);
    return p;
}

static struct am_imageinfo_image image_of(const char *const *specs, size_t n)
{
    struct am_imageinfo_image img;
    memset(&img, 0, sizeof img);
    for (size_t i = 0; i < n; i++) {
        img.platforms[i].platform = plat(specs[i]);
        char seed[32];
        snprintf(seed, sizeof seed, "m%zu", i);
        am_digest_of(AM_DIGEST_SHA256, seed, strlen(seed), &img.platforms[i].digest);
        img.platforms[i].size = 100 + i;
    }
    img.n_platforms = n;
    img.multi_arch = n > 1;
    img.is_index = true;
    return img;
}

/* ---- references ---- */

static void maps_references_to_upstreams_like_docker(void **state)
{
    (void)state;
    struct am_platformapi_target t = target_ok("docker.io/library/nginx:1.27");
    assert_int_equal(t.up_idx, 0);
    assert_string_equal(t.ref.registry, "docker.io");
    assert_string_equal(t.ref.repository, "library/nginx");
    assert_string_equal(t.ref.tag, "1.27");

    t = target_ok("nginx"); /* registry, library/ and tag implied */
    assert_int_equal(t.up_idx, 0);
    assert_string_equal(t.ref.repository, "library/nginx");
    assert_string_equal(t.ref.tag, "latest");
    t = target_ok("index.docker.io/bitnami/redis:7");
    assert_string_equal(t.ref.registry, "docker.io");
    assert_string_equal(t.ref.repository, "bitnami/redis");
    t = target_ok("registry-1.docker.io/nginx:1");
    assert_string_equal(t.ref.repository, "library/nginx");

    /* Other registries: the repository exactly as written. */
    t = target_ok("example.com/multi:1.0");
    assert_int_equal(t.up_idx, 1);
    assert_string_equal(t.ref.repository, "multi");
    t = target_ok("example.com/library/multi:1.0");
    assert_string_equal(t.ref.repository, "library/multi");
    t = target_ok("localhost:5000/team/app@sha256:"
                  "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef");
    assert_int_equal(t.up_idx, 2);
    assert_true(t.ref.has_digest);
    assert_false(t.ref.has_tag);
    t = target_ok("example.com/app:1@sha256:"
                  "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef");
    assert_true(t.ref.has_digest);
    assert_true(t.ref.has_tag);
}

static void refuses_bad_references_and_registries_that_are_not_upstreams(void **state)
{
    (void)state;
    struct am_platformapi_error e = target_err("quay.io/prometheus/node-exporter:v1");
    assert_int_equal(e.status, 403);
    assert_string_equal(e.code, "REGISTRY_UNKNOWN");
    assert_non_null(strstr(e.message, "\"quay.io\""));
    assert_non_null(strstr(e.message, "example.com"));

    const char *bad[] = {"", "Nginx:1", "nginx:", "nginx@sha256:abc", "a//b", "example.com/x:y z"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        e = target_err(bad[i]);
        assert_int_equal(e.status, 400);
        assert_string_equal(e.code, "REFERENCE_INVALID");
        assert_true(strlen(e.message) > 0);
    }
    char longref[AM_PLATFORMAPI_IMAGE_MAX + 2];
    memset(longref, 'a', sizeof longref - 1);
    longref[sizeof longref - 1] = '\0';
    e = target_err(longref);
    assert_string_equal(e.code, "REFERENCE_INVALID");
}

/* ---- query ---- */

static void decodes_the_image_query_parameter(void **state)
{
    (void)state;
    char out[64];
#define Q(s) (s), strlen(s)
    assert_int_equal(am_platformapi_query_param(Q("image=docker.io%2Flibrary%2Fnginx%3a1.27"),
                                                "image", out, sizeof out),
                     0);
    assert_string_equal(out, "docker.io/library/nginx:1.27");
    assert_int_equal(am_platformapi_query_param(Q("x=1&image=a/b:c&y"), "image", out, sizeof out),
                     0);
    assert_string_equal(out, "a/b:c");
    assert_int_equal(am_platformapi_query_param(Q("images=a&imagex=b"), "image", out, sizeof out),
                     AM_ENOT_FOUND);
    assert_int_equal(am_platformapi_query_param(Q(""), "image", out, sizeof out), AM_ENOT_FOUND);
    assert_int_equal(am_platformapi_query_param(Q("image"), "image", out, sizeof out), 0);
    assert_string_equal(out, "");
    assert_int_equal(am_platformapi_query_param(Q("image=a&image=b"), "image", out, sizeof out),
                     AM_EINVAL);
    assert_int_equal(am_platformapi_query_param(Q("image=%zz"), "image", out, sizeof out),
                     AM_EINVAL);
    assert_int_equal(am_platformapi_query_param(Q("image=ab%2"), "image", out, sizeof out),
                     AM_EINVAL);
    assert_int_equal(am_platformapi_query_param(Q("image=a%00b"), "image", out, sizeof out),
                     AM_EINVAL);
    assert_int_equal(am_platformapi_query_param(Q("image=a+b"), "image", out, sizeof out), 0);
    assert_string_equal(out, "a b");
    assert_int_equal(am_platformapi_query_param(Q("image=0123456789"), "image", out, 10),
                     AM_ETOO_LARGE);
    assert_int_equal(am_platformapi_query_param(Q("image=012345678"), "image", out, 10), 0);
#undef Q
}

/* ---- batch body ---- */

static int batch(const char *body, struct am_platformapi_batch *b, struct am_platformapi_error *e)
{
    memset(e, 0, sizeof *e);
    return am_platformapi_parse_batch(body, strlen(body), b, e);
}

static void parses_a_batch_with_distinct_images_and_normalised_requirements(void **state)
{
    (void)state;
    struct am_platformapi_batch b;
    struct am_platformapi_error e;
    assert_int_equal(batch("{\"images\":[\"nginx\",\"redis:7\",\"nginx\",\"\",\"redis:7\"],"
                           "\"require\":[\"linux/arm64/v8\",\"aarch64\",\"linux/amd64\"]}",
                           &b, &e),
                     0);
    assert_int_equal(b.n_images, 3);
    assert_string_equal(b.images[0], "nginx");
    assert_string_equal(b.images[1], "redis:7");
    assert_string_equal(b.images[2], ""); /* refused later, in its own entry */
    assert_int_equal(b.n_require, 2);
    assert_string_equal(b.require[0].architecture, "arm64");
    assert_string_equal(b.require[0].variant, "");
    assert_string_equal(b.require[1].architecture, "amd64");
    am_platformapi_batch_cleanup(&b);
    am_platformapi_batch_cleanup(&b); /* idempotent */

    assert_int_equal(batch("{\"images\":[]}", &b, &e), 0);
    assert_int_equal(b.n_images, 0);
    assert_int_equal(b.n_require, 0);
    am_platformapi_batch_cleanup(&b);
    assert_int_equal(batch("{\"images\":[\"a\"],\"require\":null}", &b, &e), 0);
    am_platformapi_batch_cleanup(&b);
}

static void refuses_malformed_batches_saying_what_was_wrong(void **state)
{
    (void)state;
    struct am_platformapi_batch b;
    struct am_platformapi_error e;
    struct {
        const char *body;
        int status;
        const char *code;
        const char *says;
    } cases[] = {
        {"", 400, "JSON_INVALID", "empty"},
        {"{\"images\": [\"a\",]}", 400, "JSON_INVALID", "line 1"},
        {"{\"images\":[\"a\"]} x", 400, "JSON_INVALID", "column"},
        {"[\"nginx\"]", 400, "BODY_INVALID", "object"},
        {"{\"image\":[\"nginx\"]}", 400, "BODY_INVALID", "unknown key \"image\""},
        {"{\"images\":\"nginx\"}", 400, "BODY_INVALID", "\"images\" must be an array"},
        {"{}", 400, "BODY_INVALID", "\"images\""},
        {"{\"images\":[\"a\",3]}", 400, "BODY_INVALID", "images[1]"},
        {"{\"images\":[],\"require\":\"linux/arm64\"}", 400, "BODY_INVALID", "\"require\""},
        {"{\"images\":[],\"require\":[7]}", 400, "BODY_INVALID", "require[0]"},
        {"{\"images\":[],\"require\":[\"linux/amd64\",\"linux\"]}", 400, "PLATFORM_INVALID",
         "require[1]"},
        {"{\"images\":[\"a\"],\"images\":[\"b\"]}", 400, "JSON_INVALID", "duplicate"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        int rc = batch(cases[i].body, &b, &e);
        if (rc != -1 || e.status != cases[i].status || strcmp(e.code, cases[i].code) != 0 ||
            !strstr(e.message, cases[i].says))
            fail_msg("%s: rc %d status %d code %s message %s", cases[i].body, rc, e.status,
                     e.code ? e.code : "-", e.message);
        assert_null(b.images);
    }
}

static void bounds_the_images_of_a_batch(void **state)
{
    (void)state;
    struct am_platformapi_batch b;
    struct am_platformapi_error e;
    struct am_buf body;
    am_buf_init(&body, 1 << 20);
    /* AM_PLATFORMAPI_MAX_IMAGES distinct (each twice) is fine; one more is not. */
    assert_int_equal(am_buf_append_str(&body, "{\"images\":["), 0);
    for (int i = 0; i < 2 * AM_PLATFORMAPI_MAX_IMAGES; i++)
        assert_int_equal(am_buf_appendf(&body, "%s\"img%d\"", i ? "," : "", i / 2), 0);
    assert_int_equal(am_buf_append_str(&body, "]}"), 0);
    assert_int_equal(am_platformapi_parse_batch(body.data, body.len, &b, &e), 0);
    assert_int_equal(b.n_images, AM_PLATFORMAPI_MAX_IMAGES);
    am_platformapi_batch_cleanup(&b);
    body.len -= 2;
    assert_int_equal(am_buf_append_str(&body, ",\"one-more\"]}"), 0);
    assert_int_equal(am_platformapi_parse_batch(body.data, body.len, &b, &e), -1);
    assert_int_equal(e.status, 413);
    assert_string_equal(e.code, "TOO_MANY_IMAGES");

    am_buf_reset(&body);
    assert_int_equal(am_buf_append_str(&body, "{\"images\":["), 0);
    for (int i = 0; i <= AM_PLATFORMAPI_MAX_LIST; i++)
        assert_int_equal(am_buf_appendf(&body, "%s\"x\"", i ? "," : ""), 0);
    assert_int_equal(am_buf_append_str(&body, "]}"), 0);
    assert_int_equal(am_platformapi_parse_batch(body.data, body.len, &b, &e), -1);
    assert_int_equal(e.status, 413);
    assert_non_null(strstr(e.message, "10000"));
    am_buf_cleanup(&body);
}

/* ---- containerd's choice ---- */

static void selects_what_containerd_on_the_required_platform_would_pull(void **state)
{
    (void)state;
    const char *three[] = {"linux/amd64", "linux/arm64", "linux/arm/v7"};
    struct am_imageinfo_image img = image_of(three, 3);
    struct am_platform p;
    p = plat("linux/arm64");
    assert_int_equal(am_platformapi_select(&img, &p), 1);
    p = plat("linux/arm64/v8");
    assert_int_equal(am_platformapi_select(&img, &p), 1);
    p = plat("linux/arm/v7");
    assert_int_equal(am_platformapi_select(&img, &p), 2);
    p = plat("linux/arm/v8");
    assert_int_equal(am_platformapi_select(&img, &p), 2); /* arm/v8 runs v7 */
    p = plat("linux/arm/v6");
    assert_int_equal(am_platformapi_select(&img, &p), -1); /* v6 cannot run v7 */
    p = plat("linux/386");
    assert_int_equal(am_platformapi_select(&img, &p), -1);
    p = plat("linux/s390x");
    assert_int_equal(am_platformapi_select(&img, &p), -1);
    p = plat("windows/amd64");
    assert_int_equal(am_platformapi_select(&img, &p), -1);

    /* Fallbacks: arm64 takes an arm entry, amd64 a 386 one; never the other way. */
    const char *arm_only[] = {"linux/arm/v6", "linux/arm/v7"};
    img = image_of(arm_only, 2);
    p = plat("linux/arm64");
    assert_int_equal(am_platformapi_select(&img, &p), 1); /* v7 ranks above v6 */
    const char *i386[] = {"linux/386"};
    img = image_of(i386, 1);
    p = plat("linux/amd64");
    assert_int_equal(am_platformapi_select(&img, &p), 0);
    const char *amd_only[] = {"linux/amd64"};
    img = image_of(amd_only, 1);
    p = plat("linux/arm64");
    assert_int_equal(am_platformapi_select(&img, &p), -1);
    p = plat("linux/386");
    assert_int_equal(am_platformapi_select(&img, &p), -1);
    /* The exact match wins over an earlier fallback. */
    const char *mixed[] = {"linux/arm/v7", "linux/arm64"};
    img = image_of(mixed, 2);
    p = plat("linux/arm64");
    assert_int_equal(am_platformapi_select(&img, &p), 1);
    img = image_of(NULL, 0);
    assert_int_equal(am_platformapi_select(&img, &p), -1);
}

/* ---- JSON ---- */

static void shapes_a_result_as_the_api_documents(void **state)
{
    (void)state;
    const char *two[] = {"linux/amd64", "linux/arm/v7"};
    struct am_imageinfo_image img = image_of(two, 2);
    snprintf(img.media_type, sizeof img.media_type, AM_MT_DOCKER_LIST_S);
    am_digest_of(AM_DIGEST_SHA256, "top", 3, &img.digest);
    img.size = 1234;
    snprintf(img.platforms[0].platform.os_version, sizeof img.platforms[0].platform.os_version,
             "x");
    struct am_platformapi_target t = target_ok("example.com/library/list:1.0");
    struct am_imageinfo_result r = {.image = &img,
                                    .cache_state = "miss",
                                    .from_upstream = true,
                                    .checked_at_ms = 1700000000123u};
    json_t *o = am_platformapi_result_json(&t, &r);
    assert_non_null(o);
    char *text = json_dumps(o, JSON_COMPACT);
    assert_non_null(text);
    char want[2048];
    struct am_digest m0, m1;
    am_digest_of(AM_DIGEST_SHA256, "m0", 2, &m0);
    am_digest_of(AM_DIGEST_SHA256, "m1", 2, &m1);
    snprintf(want, sizeof want,
             "{\"registry\":\"example.com\",\"repository\":\"library/list\",\"tag\":\"1.0\","
             "\"digest\":\"%s\",\"mediaType\":\"%s\",\"multiArch\":true,\"platforms\":["
             "{\"platform\":\"linux/amd64\",\"os\":\"linux\",\"architecture\":\"amd64\","
             "\"variant\":\"\",\"osVersion\":\"x\",\"digest\":\"%s\",\"size\":100},"
             "{\"platform\":\"linux/arm/v7\",\"os\":\"linux\",\"architecture\":\"arm\","
             "\"variant\":\"v7\",\"digest\":\"%s\",\"size\":101}],"
             "\"source\":\"upstream\",\"cacheState\":\"miss\","
             "\"checkedAt\":\"2023-11-14T22:13:20.123Z\"}",
             img.digest.str, AM_MT_DOCKER_LIST_S, m0.str, m1.str);
    assert_string_equal(text, want);
    free(text);
    json_decref(o);

    /* By digest alone: tag null; from the caches: source "cache"; truncated flagged. */
    t = target_ok("example.com/a@sha256:"
                  "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef");
    img.truncated = true;
    r.from_upstream = false;
    r.cache_state = "hit";
    o = am_platformapi_result_json(&t, &r);
    assert_true(json_is_null(json_object_get(o, "tag")));
    assert_string_equal(json_string_value(json_object_get(o, "source")), "cache");
    assert_true(json_is_true(json_object_get(o, "truncated")));
    json_decref(o);
}

static void shapes_a_failed_lookup_as_an_error_entry(void **state)
{
    (void)state;
    struct am_platformapi_target t = target_ok("example.com/missing:1");
    struct am_imageinfo_result r = {.err = AM_EMANIFEST_UNKNOWN, .message = NULL};
    json_t *o = am_platformapi_result_json(&t, &r);
    char *text = json_dumps(o, JSON_COMPACT);
    assert_string_equal(text, "{\"error\":{\"code\":\"MANIFEST_UNKNOWN\","
                              "\"message\":\"manifest unknown\"}}");
    free(text);
    json_decref(o);

    /* Upstream text is made printable ASCII (jansson refuses invalid UTF-8). */
    r.err = AM_EUPSTREAM_CONNECT;
    r.message = "cannot connect: \xff\n\x01 refused";
    o = am_platformapi_result_json(&t, &r);
    assert_non_null(o);
    json_t *err = json_object_get(o, "error");
    assert_string_equal(json_string_value(json_object_get(err, "code")), "UNAVAILABLE");
    assert_string_equal(json_string_value(json_object_get(err, "message")),
                        "cannot connect: ??? refused");
    json_decref(o);

    assert_string_equal(am_platformapi_error_code(AM_ENOMEM), "NOMEM");
    assert_string_equal(am_platformapi_error_code(AM_EBLOB_UNKNOWN), "BLOB_UNKNOWN");
    assert_string_equal(am_platformapi_error_code(AM_ETOOMANYREQUESTS), "TOOMANYREQUESTS");
    assert_string_equal(am_platformapi_error_code(AM_EDIGEST_MISMATCH), "DIGEST_INVALID");
}

static void formats_times_as_rfc3339_utc_with_milliseconds(void **state)
{
    (void)state;
    char out[32];
    am_platformapi_format_time(0, out, sizeof out);
    assert_string_equal(out, "1970-01-01T00:00:00.000Z");
    am_platformapi_format_time(1700000000123u, out, sizeof out);
    assert_string_equal(out, "2023-11-14T22:13:20.123Z");
    am_platformapi_format_time(951782400999u, out, sizeof out); /* a leap day */
    assert_string_equal(out, "2000-02-29T00:00:00.999Z");
}

static void owns_its_path_and_everything_below_it(void **state)
{
    (void)state;
#define OWNS(s) am_platformapi_owns((s), strlen(s))
    assert_true(OWNS("/api/v1/platforms"));
    assert_true(OWNS("/api/v1/platforms/"));
    assert_true(OWNS("/api/v1/platforms/x"));
    assert_false(OWNS("/api/v1/platformsx"));
    assert_false(OWNS("/api/v1/platform"));
    assert_false(OWNS("/api/v1/pulls"));
    assert_false(OWNS("/v2/"));
#undef OWNS
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(maps_references_to_upstreams_like_docker),
        cmocka_unit_test(refuses_bad_references_and_registries_that_are_not_upstreams),
        cmocka_unit_test(decodes_the_image_query_parameter),
        cmocka_unit_test(parses_a_batch_with_distinct_images_and_normalised_requirements),
        cmocka_unit_test(refuses_malformed_batches_saying_what_was_wrong),
        cmocka_unit_test(bounds_the_images_of_a_batch),
        cmocka_unit_test(selects_what_containerd_on_the_required_platform_would_pull),
        cmocka_unit_test(shapes_a_result_as_the_api_documents),
        cmocka_unit_test(shapes_a_failed_lookup_as_an_error_entry),
        cmocka_unit_test(formats_times_as_rfc3339_utc_with_milliseconds),
        cmocka_unit_test(owns_its_path_and_everything_below_it),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}

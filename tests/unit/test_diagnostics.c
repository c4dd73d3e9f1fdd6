/* Unit tests for src/diagnostics.c: node platform headers, judgement, refusal text. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <jansson.h>

#include "archmirror/diagnostics.h"
#include "archmirror/platform.h"

static struct am_platform plat(const char *s)
{
    struct am_platform p;
    assert_int_equal(am_platform_parse(s, strlen(s), &p, NULL, NULL, 0), 0);
    return p;
}

static struct am_http_header H(const char *n, const char *v) {
    struct am_http_header h = {n, strlen(n), v, strlen(v)};
    return h;
}

static void
reads_repeated_and_comma_separated_node_platform_headers(void **state)
{
    struct am_http_header h[] = {H("Accept", "*/*"), H("X-Node-Platform", "linux/arm64"),
                                 H("x-node-platform", " linux/arm/v7 , bogus//x")};
    struct am_platform out[AM_DIAG_NODE_MAX];
    size_t n = am_diagnostics_node_platforms(h, 3, out, AM_DIAG_NODE_MAX);
    assert_int_equal(n, 2);
    assert_string_equal(out[0].architecture, "arm64");
    assert_string_equal(out[1].architecture, "arm");
    assert_string_equal(out[1].variant, "v7");
    assert_int_equal(am_diagnostics_node_platforms(h, 1, out, AM_DIAG_NODE_MAX), 0);
}

static void judges_like_containerd(void **state)
{
    struct am_platform arm64 = plat("linux/arm64"), amd64 = plat("linux/amd64");
    struct am_platform only_amd[] = {plat("linux/amd64")};
    struct am_platform arm7[] = {plat("linux/arm/v7")};
    struct am_platform i386[] = {plat("linux/386")};
    assert_false(am_diagnostics_runnable(&arm64, 1, only_amd, 1));
    assert_true(am_diagnostics_runnable(&amd64, 1, only_amd, 1));
    /* containerd's arm64 matcher accepts arm/v7, and amd64 accepts 386 */
    assert_true(am_diagnostics_runnable(&arm64, 1, arm7, 1));
    assert_true(am_diagnostics_runnable(&amd64, 1, i386, 1));
    assert_false(am_diagnostics_runnable(&amd64, 1, arm7, 1));
    /* nothing known: nothing to refuse */
    assert_true(am_diagnostics_runnable(&arm64, 1, NULL, 0));
}

static void writes_a_reason_phrase_that_names_image_platforms_and_fix(void **state)
{
    struct am_platform node = plat("linux/arm64");
    struct am_platform has[] = {plat("linux/amd64"), plat("linux/s390x")};
    char r[AM_DIAG_REASON_MAX + 1];
    am_diagnostics_reason("docker.io/library/foo:1.0", &node, has, 2, r);
    assert_string_equal(r, "no linux/arm64 variant of docker.io/library/foo:1.0 (has linux/amd64, "
                           "linux/s390x); build multi-arch or pin kubernetes.io/arch=amd64");
}

static void bounds_the_reason_and_keeps_it_printable_ascii(void **state)
{
    struct am_platform node = plat("linux/arm64");
    struct am_platform has[] = {plat("linux/amd64")};
    char image[600], r[AM_DIAG_REASON_MAX + 1];
    memset(image, 'a', sizeof image - 1);
    image[sizeof image - 1] = '\0';
    memcpy(image + 580, "\r\nX: y\x80", 7);
    am_diagnostics_reason(image, &node, has, 1, r);
    assert_true(strlen(r) <= AM_DIAG_REASON_MAX);
    for (const char *c = r; *c; c++) assert_true(*c >= 0x20 && *c < 0x7f);
    assert_non_null(strstr(r, "..."));
    assert_non_null(strstr(r, "pin kubernetes.io/arch=amd64"));
}

static void builds_a_denied_body_with_the_platforms_in_detail(void **state)
{
    struct am_platform node = plat("linux/arm64");
    struct am_platform has[] = {plat("linux/amd64")};
    char *body = am_diagnostics_body("docker.io/library/foo:1.0", &node, 1, has, 1, "why");
    assert_non_null(body);
    json_error_t e;
    json_t *doc = json_loads(body, 0, &e);
    assert_non_null(doc);
    json_t *err = json_array_get(json_object_get(doc, "errors"), 0);
    assert_string_equal(json_string_value(json_object_get(err, "code")), "DENIED");
    assert_string_equal(json_string_value(json_object_get(err, "message")), "why");
    json_t *d = json_object_get(err, "detail");
    assert_string_equal(json_string_value(json_array_get(json_object_get(d, "available"), 0)),
                        "linux/amd64");
    assert_string_equal(json_string_value(json_array_get(json_object_get(d, "requested"), 0)),
                        "linux/arm64");
    json_decref(doc);
    free(body);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(reads_repeated_and_comma_separated_node_platform_headers),
        cmocka_unit_test(judges_like_containerd),
        cmocka_unit_test(writes_a_reason_phrase_that_names_image_platforms_and_fix),
        cmocka_unit_test(bounds_the_reason_and_keeps_it_printable_ascii),
        cmocka_unit_test(builds_a_denied_body_with_the_platforms_in_detail),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

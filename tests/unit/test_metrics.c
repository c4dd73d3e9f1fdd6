/* Unit tests for src/metrics.c: route classification, exposition text, bounded labels. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "archmirror/buf.h"
#include "archmirror/metrics.h"

static char *render(struct am_buf *b)
{
    am_buf_init(b, 16u << 20);
    assert_int_equal(am_metrics_render(b, NULL, NULL), 0);
    return b->data;
}

static void classifies_registry_and_admin_paths(void **state)
{
    assert_int_equal(am_metrics_route_of("/v2/"), AM_MR_BASE);
    assert_int_equal(am_metrics_route_of("/v2"), AM_MR_BASE);
    assert_int_equal(am_metrics_route_of("/v2/library/a/manifests/1"), AM_MR_MANIFEST);
    assert_int_equal(am_metrics_route_of("/v2/a/blobs/sha256:x"), AM_MR_BLOB);
    assert_int_equal(am_metrics_route_of("/v2/a/tags/list"), AM_MR_OTHER);
    assert_int_equal(am_metrics_route_of("/api/v1/platforms"), AM_MR_API);
    assert_int_equal(am_metrics_route_of("/metrics"), AM_MR_METRICS);
    assert_int_equal(am_metrics_route_of("/readyz"), AM_MR_HEALTH);
    assert_int_equal(am_metrics_route_of("/"), AM_MR_OTHER);
}

static void counts_requests_by_route_and_status(void **state)
{
    struct am_buf b;
    am_metrics_reset();
    am_metrics_count_request(AM_MR_MANIFEST, 200, 1000, 2000000);
    am_metrics_count_request(AM_MR_MANIFEST, 200, 500, 1000);
    am_metrics_count_request(AM_MR_BLOB, 404, 0, 1000);
    char *t = render(&b);
    assert_non_null(strstr(t, "archmirror_requests_total{route=\"manifest\",code=\"200\"} 2\n"));
    assert_non_null(strstr(t, "archmirror_requests_total{route=\"blob\",code=\"404\"} 1\n"));
    assert_non_null(strstr(t, "archmirror_served_bytes_total{route=\"manifest\"} 1500\n"));
    /* 2 ms falls in the 5 ms bucket, 1 µs in the first */
    assert_non_null(strstr(t, "archmirror_request_duration_seconds_bucket{route=\"manifest\","
                              "le=\"0.0005\"} 1\n"));
    assert_non_null(strstr(t, "archmirror_request_duration_seconds_bucket{route=\"manifest\","
                              "le=\"0.005\"} 2\n"));
    assert_non_null(strstr(t, "archmirror_request_duration_seconds_count{route=\"manifest\"} 2\n"));
    am_buf_cleanup(&b);
}

static void counts_cache_results_upstreams_and_mismatches(void **state)
{
    struct am_buf b;
    am_metrics_reset();
    am_metrics_count_cache(true, true);
    am_metrics_count_cache(false, false);
    am_metrics_count_upstream("docker.io", false, 1000);
    am_metrics_count_upstream("docker.io", true, 1000);
    am_metrics_count_mismatch("docker.io/library/a:1", "linux/arm64");
    am_metrics_count_mismatch("docker.io/library/a:1", "linux/arm64");
    am_metrics_count_pull("linux/amd64");
    char *t = render(&b);
    assert_non_null(strstr(t, "archmirror_cache_requests_total{kind=\"blob\",result=\"hit\"} 1\n"));
    assert_non_null(
        strstr(t, "archmirror_cache_requests_total{kind=\"manifest\",result=\"miss\"} 1\n"));
    assert_non_null(strstr(t, "archmirror_upstream_requests_total{upstream=\"docker.io\"} 2\n"));
    assert_non_null(strstr(t, "archmirror_upstream_errors_total{upstream=\"docker.io\"} 1\n"));
    assert_non_null(strstr(t, "archmirror_platform_mismatch_total{image=\"docker.io/library/a:1\","
                              "platform=\"linux/arm64\"} 2\n"));
    assert_non_null(strstr(t, "archmirror_pulls_total{platform=\"linux/amd64\"} 1\n"));
    am_buf_cleanup(&b);
}

static void escapes_label_values_and_bounds_their_number(void **state)
{
    struct am_buf b;
    char name[32];
    am_metrics_reset();
    am_metrics_count_pull("we\"ird\\\nname");
    for (int i = 0; i < AM_METRICS_MAX_LABELS + 10; i++) {
        snprintf(name, sizeof name, "p%d", i);
        am_metrics_count_pull(name);
    }
    char *t = render(&b);
    assert_non_null(strstr(t, "archmirror_pulls_total{platform=\"we\\\"ird\\\\\\nname\"} 1\n"));
    assert_non_null(strstr(t, "archmirror_pulls_total{platform=\"other\"} 11\n"));
    assert_null(strstr(t, "platform=\"p520\""));
    am_buf_cleanup(&b);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(classifies_registry_and_admin_paths),
        cmocka_unit_test(counts_requests_by_route_and_status),
        cmocka_unit_test(counts_cache_results_upstreams_and_mismatches),
        cmocka_unit_test(escapes_label_values_and_bounds_their_number),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

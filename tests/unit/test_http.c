/* Unit tests for src/http.c: header lookup, reason phrases, numbers and Range. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "archmirror/error.h"
#include "archmirror/http.h"

static int range(const char *s, uint64_t size, uint64_t *a, uint64_t *b)
{
    return am_http_parse_range(s, strlen(s), size, a, b);
}

static void parses_an_open_ended_range_as_containerd_sends_it(void **state)
{
    uint64_t a, b;
    assert_int_equal(range("bytes=20000-", 65536, &a, &b), 0);
    assert_int_equal(a, 20000);
    assert_int_equal(b, 65536);
}

static void parses_a_closed_range_and_clamps_its_end(void **state)
{
    uint64_t a, b;
    assert_int_equal(range("bytes=0-99", 1000, &a, &b), 0);
    assert_int_equal(a, 0);
    assert_int_equal(b, 100);
    assert_int_equal(range("bytes=900-5000", 1000, &a, &b), 0);
    assert_int_equal(a, 900);
    assert_int_equal(b, 1000);
    assert_int_equal(range("BYTES=5-5", 1000, &a, &b), 0);
    assert_int_equal(b - a, 1);
}

static void parses_a_suffix_range(void **state)
{
    uint64_t a, b;
    assert_int_equal(range("bytes=-100", 1000, &a, &b), 0);
    assert_int_equal(a, 900);
    assert_int_equal(b, 1000);
    assert_int_equal(range("bytes=-5000", 1000, &a, &b), 0);
    assert_int_equal(a, 0);
}

static void reports_unsatisfiable_ranges(void **state)
{
    uint64_t a, b;
    assert_int_equal(range("bytes=1000-", 1000, &a, &b), AM_ERANGE);
    assert_int_equal(range("bytes=1000-2000", 1000, &a, &b), AM_ERANGE);
    assert_int_equal(range("bytes=-0", 1000, &a, &b), AM_ERANGE);
    assert_int_equal(range("bytes=0-", 0, &a, &b), AM_ERANGE);
}

static void ignores_malformed_or_multiple_ranges(void **state)
{
    uint64_t a, b;
    const char *bad[] = {"",          "bytes",
                         "bytes=",    "bytes=-",
                         "bytes=5-1", "bytes=0-1,5-9",
                         "items=0-1", "bytes=a-",
                         "bytes=1-x", "bytes=99999999999999999999-",
                         "bytes=0--1"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        assert_int_equal(range(bad[i], 1000, &a, &b), AM_EINVAL);
}

static void finds_headers_case_insensitively(void **state)
{
    struct am_http_header h[] = {{"Content-Type", 12, "a", 1}, {"content-length", 14, "2", 1}};
    assert_ptr_equal(am_http_header_find(h, 2, "CONTENT-LENGTH"), &h[1]);
    assert_null(am_http_header_find(h, 2, "range"));
}

static void parses_content_lengths_strictly(void **state)
{
    uint64_t v;
    assert_int_equal(am_http_parse_u64("123", 3, &v), 0);
    assert_int_equal(v, 123);
    assert_int_equal(am_http_parse_u64("", 0, &v), AM_EINVAL);
    assert_int_equal(am_http_parse_u64("-1", 2, &v), AM_EINVAL);
    assert_int_equal(am_http_parse_u64("1 ", 2, &v), AM_EINVAL);
    assert_string_equal(am_http_reason(416), "Range Not Satisfiable");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(parses_an_open_ended_range_as_containerd_sends_it),
        cmocka_unit_test(parses_a_closed_range_and_clamps_its_end),
        cmocka_unit_test(parses_a_suffix_range),
        cmocka_unit_test(reports_unsatisfiable_ranges),
        cmocka_unit_test(ignores_malformed_or_multiple_ranges),
        cmocka_unit_test(finds_headers_case_insensitively),
        cmocka_unit_test(parses_content_lengths_strictly),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

/* Unit tests for src/error.c (the failure table, OCI error bodies, libuv mapping) and
 * src/buf.c (the bounded buffer). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <jansson.h>
#include <uv.h>

#include "archmirror/buf.h"
#include "archmirror/error.h"

/* ---- error ---------------------------------------------------------------------- */

static void looks_up_name_message_status_and_oci_code(void **state)
{
    assert_string_equal(am_error_name(AM_ENOMEM), "NOMEM");
    assert_string_equal(am_error_message(AM_ENOMEM), "out of memory");
    assert_int_equal(am_error_http_status(AM_ENOMEM), 500);
    assert_string_equal(am_error_oci_code(AM_ENOMEM), "UNKNOWN");

    assert_string_equal(am_error_name(AM_ENAME_INVALID), "NAME_INVALID");
    assert_int_equal(am_error_http_status(AM_ENAME_INVALID), 400);
    assert_string_equal(am_error_oci_code(AM_ENAME_INVALID), "NAME_INVALID");

    assert_int_equal(am_error_http_status(AM_EMANIFEST_UNKNOWN), 404);
    assert_string_equal(am_error_oci_code(AM_EMANIFEST_UNKNOWN), "MANIFEST_UNKNOWN");
    assert_int_equal(am_error_http_status(AM_ETOOMANYREQUESTS), 429);
    assert_string_equal(am_error_oci_code(AM_ETOOMANYREQUESTS), "TOOMANYREQUESTS");
    assert_string_equal(am_error_oci_code(AM_ENS_DENIED), "DENIED");
    assert_int_equal(am_error_http_status(AM_EUPSTREAM_TIMEOUT), 504);
    assert_string_equal(am_error_name(AM_ECONFIG), "CONFIG"); /* the last row */
}

static void reports_success_as_ok(void **state)
{
    assert_string_equal(am_error_name(0), "OK");
    assert_string_equal(am_error_message(0), "ok");
    assert_int_equal(am_error_http_status(0), 200);
}

static void maps_unknown_codes_to_the_io_entry(void **state)
{
    static const int unknown[] = {-1, -5000, AM_ERR_FIRST_, AM_ERR_LAST_, 7};
    for (size_t i = 0; i < sizeof unknown / sizeof unknown[0]; i++) {
        assert_string_equal(am_error_name(unknown[i]), "IO");
        assert_string_equal(am_error_message(unknown[i]), "I/O error");
        assert_int_equal(am_error_http_status(unknown[i]), 500);
        assert_string_equal(am_error_oci_code(unknown[i]), "UNKNOWN");
    }
}

static void gives_every_row_a_distinct_name_and_an_error_status(void **state)
{
    for (int e = AM_ERR_FIRST_ + 1; e < AM_ERR_LAST_; e++) {
        int status = am_error_http_status(e);
        assert_non_null(am_error_message(e));
        assert_non_null(am_error_oci_code(e));
        if (status < 400 || status > 599) fail_msg("%s has status %d", am_error_name(e), status);
        for (int f = e + 1; f < AM_ERR_LAST_; f++)
            if (strcmp(am_error_name(e), am_error_name(f)) == 0)
                fail_msg("%s appears twice", am_error_name(e));
    }
    assert_string_not_equal(am_error_name(AM_ECONFIG), "IO");
}

static void formats_the_oci_error_body_exactly(void **state)
{
    struct am_buf b;
    am_buf_init(&b, 4096);
    assert_int_equal(am_error_format_json(AM_EMANIFEST_UNKNOWN, NULL, &b), 0);
    assert_string_equal(b.data, "{\"errors\":[{\"code\":\"MANIFEST_UNKNOWN\","
                                "\"message\":\"manifest unknown\"}]}\n");
    assert_int_equal(b.len, strlen(b.data));
    am_buf_cleanup(&b);
}

static void escapes_the_message_into_valid_json(void **state)
{
    const char *msg = "bad \"name\" \\ here\nand\ttab\x01";
    struct am_buf b;
    json_error_t jerr;

    am_buf_init(&b, 4096);
    assert_int_equal(am_error_format_json(AM_ENAME_INVALID, msg, &b), 0);
    assert_non_null(strstr(b.data, "\\\"name\\\""));
    assert_non_null(strstr(b.data, "\\u0001"));
    json_t *root = json_loadb(b.data, b.len, 0, &jerr);
    if (!root) fail_msg("not JSON: %s: %s", jerr.text, b.data);
    json_t *e0 = json_array_get(json_object_get(root, "errors"), 0);
    assert_string_equal(json_string_value(json_object_get(e0, "code")), "NAME_INVALID");
    assert_string_equal(json_string_value(json_object_get(e0, "message")), msg);
    json_decref(root);
    am_buf_cleanup(&b);
}

static void appends_the_error_body_after_existing_content(void **state)
{
    struct am_buf b;
    am_buf_init(&b, 4096);
    assert_int_equal(am_buf_append_str(&b, "HEAD "), 0);
    assert_int_equal(am_error_format_json(AM_EDENIED, NULL, &b), 0);
    const char *want = "HEAD {\"errors\":[{\"code\":\"DENIED\"";
    assert_int_equal(strncmp(b.data, want, strlen(want)), 0);
    am_buf_cleanup(&b);
}

static void leaves_the_buffer_unchanged_when_the_body_does_not_fit(void **state)
{
    struct am_buf b;
    am_buf_init(&b, 40);
    assert_int_equal(am_buf_append_str(&b, "keep"), 0);
    assert_int_equal(am_error_format_json(AM_EMANIFEST_UNKNOWN, NULL, &b), AM_ETOO_LARGE);
    assert_int_equal(b.len, 4);
    assert_string_equal(b.data, "keep");
    /* Also when the overflow happens inside the escaped message. */
    assert_int_equal(am_error_format_json(AM_EIO, "\"\"\"\"\"\"\"\"\"\"", &b), AM_ETOO_LARGE);
    assert_string_equal(b.data, "keep");
    am_buf_cleanup(&b);
}

static void converts_libuv_errors(void **state)
{
    assert_int_equal(am_error_from_uv(0), 0);
    assert_int_equal(am_error_from_uv(UV_ENOMEM), AM_ENOMEM);
    assert_int_equal(am_error_from_uv(UV_ETIMEDOUT), AM_EUPSTREAM_TIMEOUT);
    assert_int_equal(am_error_from_uv(UV_ECONNREFUSED), AM_EUPSTREAM_CONNECT);
    assert_int_equal(am_error_from_uv(UV_EAI_NONAME), AM_EUPSTREAM_CONNECT);
    assert_int_equal(am_error_from_uv(UV_ECONNRESET), AM_EUPSTREAM);
    assert_int_equal(am_error_from_uv(UV_EOF), AM_EUPSTREAM);
    assert_int_equal(am_error_from_uv(UV_ECANCELED), AM_ECANCELED);
    assert_int_equal(am_error_from_uv(UV_ENOSPC), AM_ESTORE_FULL);
    assert_int_equal(am_error_from_uv(UV_EROFS), AM_ESTORE_READONLY);
    assert_int_equal(am_error_from_uv(UV_EPERM), AM_EIO);
}

/* ---- buf ------------------------------------------------------------------------- */

static void starts_empty_without_allocating(void **state)
{
    struct am_buf b;
    am_buf_init(&b, 100);
    assert_null(b.data);
    assert_int_equal(b.len, 0);
    assert_int_equal(b.max, 100);
    am_buf_cleanup(&b);
    am_buf_cleanup(NULL);
}

static void appends_and_keeps_a_terminator(void **state)
{
    struct am_buf b;
    am_buf_init(&b, 100);
    assert_int_equal(am_buf_append(&b, "ab\0cd", 5), 0);
    assert_int_equal(b.len, 5);
    assert_memory_equal(b.data, "ab\0cd", 6);
    assert_int_equal(am_buf_append_str(&b, "ef"), 0);
    assert_int_equal(b.len, 7);
    assert_int_equal(b.data[7], '\0');
    assert_int_equal(am_buf_append(&b, NULL, 0), 0);
    assert_int_equal(b.len, 7);
    am_buf_cleanup(&b);
    assert_null(b.data);
    am_buf_cleanup(&b);
}

static void enforces_the_maximum_exactly(void **state)
{
    struct am_buf b;
    char big[300];
    memset(big, 'x', sizeof big);
    am_buf_init(&b, 300);
    assert_int_equal(am_buf_append(&b, big, 299), 0);
    assert_int_equal(am_buf_append(&b, big, 2), AM_ETOO_LARGE);
    assert_int_equal(b.len, 299);
    assert_int_equal(b.data[299], '\0');
    assert_int_equal(am_buf_append(&b, big, 1), 0);
    assert_int_equal(b.len, 300);
    assert_int_equal(am_buf_append(&b, "y", 1), AM_ETOO_LARGE);
    assert_int_equal(am_buf_append(&b, "", 0), 0);
    assert_int_equal(b.len, 300);
    assert_true(b.cap <= 301);
    am_buf_cleanup(&b);
}

static void refuses_sizes_that_would_overflow(void **state)
{
    struct am_buf b;
    am_buf_init(&b, 100);
    assert_int_equal(am_buf_append(&b, "abc", 3), 0);
    assert_int_equal(am_buf_append(&b, "x", SIZE_MAX), AM_ETOO_LARGE);
    assert_int_equal(am_buf_append(&b, "x", SIZE_MAX - 1), AM_ETOO_LARGE);
    assert_int_equal(b.len, 3);
    am_buf_cleanup(&b);
}

static void grows_past_its_first_allocation(void **state)
{
    struct am_buf b;
    am_buf_init(&b, 10000);
    for (int i = 0; i < 10000; i++)
        assert_int_equal(am_buf_append(&b, &"0123456789"[i % 10], 1), 0);
    assert_int_equal(b.len, 10000);
    for (int i = 0; i < 10000; i++) assert_int_equal(b.data[i], '0' + i % 10);
    assert_int_equal(am_buf_append(&b, "x", 1), AM_ETOO_LARGE);
    am_buf_cleanup(&b);
}

static void with_zero_maximum_accepts_only_empty_appends(void **state)
{
    struct am_buf b;
    am_buf_init(&b, 0);
    assert_int_equal(am_buf_append(&b, "x", 1), AM_ETOO_LARGE);
    assert_int_equal(am_buf_append(&b, "", 0), 0);
    assert_string_equal(b.data, "");
    am_buf_cleanup(&b);
}

static void appendf_formats_and_respects_the_maximum(void **state)
{
    struct am_buf b;
    am_buf_init(&b, 16);
    assert_int_equal(am_buf_appendf(&b, "%d-%s", 42, "ab"), 0);
    assert_string_equal(b.data, "42-ab");
    assert_int_equal(am_buf_appendf(&b, "%s", "0123456789ab"), AM_ETOO_LARGE);
    assert_string_equal(b.data, "42-ab");
    assert_int_equal(b.len, 5);
    assert_int_equal(am_buf_appendf(&b, "%05d%s", 7, "xxxxxx"), 0);
    assert_string_equal(b.data, "42-ab00007xxxxxx");
    assert_int_equal(b.len, 16);
    assert_int_equal(am_buf_appendf(&b, "%s", ""), 0);
    am_buf_cleanup(&b);
}

static void json_escaping_quotes_controls_and_rolls_back(void **state)
{
    struct am_buf b;
    am_buf_init(&b, 64);
    assert_int_equal(am_buf_append_json_escaped(&b, "a\"b\\c\n\x1f", 7), 0);
    assert_string_equal(b.data, "a\\\"b\\\\c\\u000a\\u001f");
    am_buf_reset(&b);
    /* NUL inside the span is escaped too, by length. */
    assert_int_equal(am_buf_append_json_escaped(&b, "x\0y", 3), 0);
    assert_string_equal(b.data, "x\\u0000y");
    am_buf_cleanup(&b);

    am_buf_init(&b, 10);
    assert_int_equal(am_buf_append_str(&b, "k"), 0);
    assert_int_equal(am_buf_append_json_escaped(&b, "\x01\x02", 2), AM_ETOO_LARGE);
    assert_int_equal(b.len, 1);
    assert_string_equal(b.data, "k");
    am_buf_cleanup(&b);
}

static void reset_keeps_the_allocation(void **state)
{
    struct am_buf b;
    am_buf_init(&b, 100);
    assert_int_equal(am_buf_append_str(&b, "hello"), 0);
    char *p = b.data;
    am_buf_reset(&b);
    assert_ptr_equal(b.data, p);
    assert_int_equal(b.len, 0);
    assert_string_equal(b.data, "");
    am_buf_reset(&b);
    am_buf_cleanup(&b);
    am_buf_init(&b, 1);
    am_buf_reset(&b); /* on a never-allocated buffer */
    assert_null(b.data);
}

static void steal_hands_over_the_bytes_and_empties_the_buffer(void **state)
{
    struct am_buf b;
    size_t len = 99;
    am_buf_init(&b, 100);
    assert_int_equal(am_buf_append_str(&b, "payload"), 0);
    char *p = am_buf_steal(&b, &len);
    assert_string_equal(p, "payload");
    assert_int_equal(len, 7);
    assert_null(b.data);
    assert_int_equal(b.len, 0);
    assert_int_equal(b.cap, 0);
    assert_int_equal(b.max, 100);
    free(p);
    /* The buffer is usable again after a steal. */
    assert_int_equal(am_buf_append_str(&b, "again"), 0);
    assert_string_equal(b.data, "again");
    am_buf_cleanup(&b);
}

static void steal_of_an_empty_buffer_returns_an_allocated_empty_string(void **state)
{
    struct am_buf b;
    size_t len = 99;
    am_buf_init(&b, 100);
    char *p = am_buf_steal(&b, &len);
    assert_non_null(p);
    assert_string_equal(p, "");
    assert_int_equal(len, 0);
    free(p);
    p = am_buf_steal(&b, NULL);
    assert_non_null(p);
    free(p);
}

static void setmsg_formats_truncates_and_accepts_no_buffer(void **state)
{
    (void)state;
    char msg[8];
    am_error_setmsg(msg, sizeof msg, "key %s: %d", "file", 42);
    assert_string_equal(msg, "key fil"); /* cut to fit, NUL-terminated */
    am_error_setmsg(msg, sizeof msg, "%s", "ok");
    assert_string_equal(msg, "ok");
    msg[0] = 'x';
    am_error_setmsg(msg, 0, "%s", "ignored");
    assert_int_equal(msg[0], 'x');
    am_error_setmsg(NULL, 64, "%s", "ignored"); /* no message wanted: no crash */
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(looks_up_name_message_status_and_oci_code),
        cmocka_unit_test(reports_success_as_ok),
        cmocka_unit_test(setmsg_formats_truncates_and_accepts_no_buffer),
        cmocka_unit_test(maps_unknown_codes_to_the_io_entry),
        cmocka_unit_test(gives_every_row_a_distinct_name_and_an_error_status),
        cmocka_unit_test(formats_the_oci_error_body_exactly),
        cmocka_unit_test(escapes_the_message_into_valid_json),
        cmocka_unit_test(appends_the_error_body_after_existing_content),
        cmocka_unit_test(leaves_the_buffer_unchanged_when_the_body_does_not_fit),
        cmocka_unit_test(converts_libuv_errors),
        cmocka_unit_test(starts_empty_without_allocating),
        cmocka_unit_test(appends_and_keeps_a_terminator),
        cmocka_unit_test(enforces_the_maximum_exactly),
        cmocka_unit_test(refuses_sizes_that_would_overflow),
        cmocka_unit_test(grows_past_its_first_allocation),
        cmocka_unit_test(with_zero_maximum_accepts_only_empty_appends),
        cmocka_unit_test(appendf_formats_and_respects_the_maximum),
        cmocka_unit_test(json_escaping_quotes_controls_and_rolls_back),
        cmocka_unit_test(reset_keeps_the_allocation),
        cmocka_unit_test(steal_hands_over_the_bytes_and_empties_the_buffer),
        cmocka_unit_test(steal_of_an_empty_buffer_returns_an_allocated_empty_string),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

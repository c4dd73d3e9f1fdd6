/* Unit tests for src/mediatype.c: classification and Accept negotiation. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "archmirror/mediatype.h"

static enum am_media_kind classify(const char *s)
{
    return am_mediatype_classify(s, strlen(s));
}

static bool accepts(const char *accept, const char *mt)
{
    return am_mediatype_accepts(accept, accept ? strlen(accept) : 0, mt);
}

static void classifies_every_known_manifest_type(void **state)
{
    assert_int_equal(classify(AM_MT_OCI_MANIFEST_S), AM_MT_OCI_MANIFEST);
    assert_int_equal(classify(AM_MT_OCI_INDEX_S), AM_MT_OCI_INDEX);
    assert_int_equal(classify(AM_MT_DOCKER_MANIFEST_S), AM_MT_DOCKER_MANIFEST);
    assert_int_equal(classify(AM_MT_DOCKER_LIST_S), AM_MT_DOCKER_LIST);
    assert_int_equal(classify(AM_MT_DOCKER_V1_S), AM_MT_DOCKER_V1);
    assert_int_equal(classify(AM_MT_DOCKER_V1_SIGNED_S), AM_MT_DOCKER_V1);
}

static void classifies_ignoring_case_parameters_and_whitespace(void **state)
{
    assert_int_equal(classify("Application/VND.OCI.Image.Index.v1+JSON"), AM_MT_OCI_INDEX);
    assert_int_equal(classify(AM_MT_OCI_MANIFEST_S "; charset=utf-8"), AM_MT_OCI_MANIFEST);
    assert_int_equal(classify(" \t" AM_MT_DOCKER_MANIFEST_S " ;q=1"), AM_MT_DOCKER_MANIFEST);
    assert_int_equal(classify("  " AM_MT_DOCKER_LIST_S "  "), AM_MT_DOCKER_LIST);
}

static void classifies_other_types_as_unknown(void **state)
{
    assert_int_equal(classify(""), AM_MT_UNKNOWN);
    assert_int_equal(classify("application/json"), AM_MT_UNKNOWN);
    assert_int_equal(classify("application/vnd.oci.image.layer.v1.tar+gzip"), AM_MT_UNKNOWN);
    assert_int_equal(classify(AM_MT_OCI_MANIFEST_S "x"), AM_MT_UNKNOWN);
    assert_int_equal(classify("application/vnd.oci.image.manifest.v1"), AM_MT_UNKNOWN);
    assert_int_equal(am_mediatype_classify(NULL, 0), AM_MT_UNKNOWN);
}

static void classifies_by_length_not_by_terminator(void **state)
{
    const char *s = AM_MT_OCI_INDEX_S "garbage";
    assert_int_equal(am_mediatype_classify(s, strlen(AM_MT_OCI_INDEX_S)), AM_MT_OCI_INDEX);
    char nul[] = AM_MT_OCI_INDEX_S "\0x";
    assert_int_equal(am_mediatype_classify(nul, sizeof nul - 1), AM_MT_UNKNOWN);
}

static void tells_indexes_from_manifests(void **state)
{
    assert_true(am_mediatype_is_index(AM_MT_OCI_INDEX));
    assert_true(am_mediatype_is_index(AM_MT_DOCKER_LIST));
    assert_false(am_mediatype_is_index(AM_MT_OCI_MANIFEST));
    assert_false(am_mediatype_is_index(AM_MT_DOCKER_MANIFEST));
    assert_false(am_mediatype_is_index(AM_MT_DOCKER_V1));
    assert_false(am_mediatype_is_index(AM_MT_UNKNOWN));
    assert_true(am_mediatype_is_manifest(AM_MT_DOCKER_V1));
    assert_true(am_mediatype_is_manifest(AM_MT_OCI_INDEX));
    assert_false(am_mediatype_is_manifest(AM_MT_UNKNOWN));
}

static void absent_or_empty_accept_allows_everything(void **state)
{
    assert_true(accepts(NULL, AM_MT_OCI_INDEX_S));
    assert_true(accepts("", AM_MT_OCI_INDEX_S));
    assert_true(accepts("  ", AM_MT_DOCKER_V1_S));
    assert_true(accepts(" , ,", AM_MT_DOCKER_MANIFEST_S));
}

static void accepts_listed_types_only(void **state)
{
    /* What containerd 1.7 sends for a manifest resolve, minus its trailing wildcard. */
    const char *ctr = AM_MT_DOCKER_MANIFEST_S ", " AM_MT_DOCKER_LIST_S ", " AM_MT_OCI_MANIFEST_S
                                              ", " AM_MT_OCI_INDEX_S;
    assert_true(accepts(ctr, AM_MT_OCI_INDEX_S));
    assert_true(accepts(ctr, AM_MT_DOCKER_MANIFEST_S));
    assert_false(accepts(ctr, AM_MT_DOCKER_V1_SIGNED_S));
    assert_false(accepts(AM_MT_DOCKER_MANIFEST_S, AM_MT_DOCKER_LIST_S));
    assert_false(accepts("application/json", AM_MT_OCI_MANIFEST_S));
}

static void matches_case_insensitively_with_any_whitespace(void **state)
{
    assert_true(accepts("APPLICATION/VND.OCI.IMAGE.INDEX.V1+JSON", AM_MT_OCI_INDEX_S));
    assert_true(accepts("text/plain,\t" AM_MT_OCI_INDEX_S "  ,x/y", AM_MT_OCI_INDEX_S));
    assert_true(accepts("text/plain  ,  " AM_MT_OCI_INDEX_S " ; q=0.5 ", AM_MT_OCI_INDEX_S));
    assert_true(accepts(AM_MT_OCI_INDEX_S ";Q=1", AM_MT_OCI_INDEX_S));
}

static void accepts_wildcards(void **state)
{
    assert_true(accepts("*/*", AM_MT_DOCKER_V1_S));
    assert_true(accepts("application/*", AM_MT_OCI_MANIFEST_S));
    assert_false(accepts("text/*", AM_MT_OCI_MANIFEST_S));
    assert_true(accepts(AM_MT_DOCKER_MANIFEST_S ", */*;q=0.1", AM_MT_OCI_INDEX_S));
    /* "*" "/json" is not a media range (RFC 9110 §12.5.1). */
    assert_false(accepts("*/json", AM_MT_OCI_MANIFEST_S));
    assert_false(accepts("*", AM_MT_OCI_MANIFEST_S));
}

static void q_zero_excludes_a_type(void **state)
{
    assert_false(accepts(AM_MT_OCI_INDEX_S ";q=0", AM_MT_OCI_INDEX_S));
    assert_false(accepts(AM_MT_OCI_INDEX_S "; q=0.000", AM_MT_OCI_INDEX_S));
    assert_true(accepts(AM_MT_OCI_INDEX_S ";q=0.001", AM_MT_OCI_INDEX_S));
}

static void most_specific_range_decides(void **state)
{
    /* RFC 9110 §12.5.1: the exact type overrides the wildcards, both ways. */
    assert_false(accepts("*/*, " AM_MT_OCI_INDEX_S ";q=0", AM_MT_OCI_INDEX_S));
    assert_true(accepts("*/*, " AM_MT_OCI_INDEX_S ";q=0", AM_MT_OCI_MANIFEST_S));
    assert_false(accepts("*/*, application/*;q=0", AM_MT_OCI_MANIFEST_S));
    assert_true(accepts("application/*;q=0, " AM_MT_OCI_MANIFEST_S, AM_MT_OCI_MANIFEST_S));
    assert_true(accepts("*/*;q=0, application/*", AM_MT_OCI_MANIFEST_S));
}

static void ignores_parameters_other_than_q(void **state)
{
    assert_true(accepts(AM_MT_OCI_MANIFEST_S "; charset=utf-8", AM_MT_OCI_MANIFEST_S));
    assert_false(accepts(AM_MT_OCI_MANIFEST_S "; charset=utf-8; q=0", AM_MT_OCI_MANIFEST_S));
}

static void skips_commas_and_semicolons_inside_quoted_parameters(void **state)
{
    /* Were the comma a separator, "q=0, x" would never be seen as one element. */
    assert_false(accepts(AM_MT_OCI_INDEX_S ";p=\"a, */*\";q=0", AM_MT_OCI_INDEX_S));
    assert_false(accepts(AM_MT_OCI_INDEX_S ";p=\"a;q=1\";q=0", AM_MT_OCI_INDEX_S));
    assert_true(accepts(AM_MT_OCI_INDEX_S ";p=\"a\\\";q=0\"", AM_MT_OCI_INDEX_S));
}

static void ignores_elements_with_malformed_q(void **state)
{
    static const char *const bad[] = {"q=2", "q=1.5", "q=1.001", "q=0.0001", "q=abc",
                                      "q=",  "q=.5",  "q=-0",    "q=\"0\""};
    char accept[256];
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        snprintf(accept, sizeof accept, AM_MT_OCI_INDEX_S ";%s", bad[i]);
        if (accepts(accept, AM_MT_OCI_INDEX_S)) fail_msg("\"%s\" accepted", accept);
    }
    /* The malformed element neither admits nor excludes: a wildcard still applies. */
    assert_true(accepts(AM_MT_OCI_INDEX_S ";q=2, */*", AM_MT_OCI_INDEX_S));
}

static void refuses_garbage_accept(void **state)
{
    assert_false(accepts("garbage", AM_MT_OCI_INDEX_S));
    assert_false(accepts("/", AM_MT_OCI_INDEX_S));
    assert_false(accepts("application/", AM_MT_OCI_INDEX_S));
    assert_false(accepts(";q=1", AM_MT_OCI_INDEX_S));
    assert_false(accepts("\"" AM_MT_OCI_INDEX_S, AM_MT_OCI_INDEX_S));
}

static void accepts_by_length_not_by_terminator(void **state)
{
    const char *s = AM_MT_OCI_INDEX_S ";q=0";
    assert_true(am_mediatype_accepts(s, strlen(AM_MT_OCI_INDEX_S), AM_MT_OCI_INDEX_S));
    assert_false(am_mediatype_accepts(s, strlen(s), AM_MT_OCI_INDEX_S));
}

static void accept_all_names_every_served_type(void **state)
{
    assert_true(accepts(AM_MEDIATYPE_ACCEPT_ALL, AM_MT_OCI_INDEX_S));
    assert_true(accepts(AM_MEDIATYPE_ACCEPT_ALL, AM_MT_OCI_MANIFEST_S));
    assert_true(accepts(AM_MEDIATYPE_ACCEPT_ALL, AM_MT_DOCKER_LIST_S));
    assert_true(accepts(AM_MEDIATYPE_ACCEPT_ALL, AM_MT_DOCKER_MANIFEST_S));
    assert_false(accepts(AM_MEDIATYPE_ACCEPT_ALL, AM_MT_DOCKER_V1_SIGNED_S));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(classifies_every_known_manifest_type),
        cmocka_unit_test(classifies_ignoring_case_parameters_and_whitespace),
        cmocka_unit_test(classifies_other_types_as_unknown),
        cmocka_unit_test(classifies_by_length_not_by_terminator),
        cmocka_unit_test(tells_indexes_from_manifests),
        cmocka_unit_test(absent_or_empty_accept_allows_everything),
        cmocka_unit_test(accepts_listed_types_only),
        cmocka_unit_test(matches_case_insensitively_with_any_whitespace),
        cmocka_unit_test(accepts_wildcards),
        cmocka_unit_test(q_zero_excludes_a_type),
        cmocka_unit_test(most_specific_range_decides),
        cmocka_unit_test(ignores_parameters_other_than_q),
        cmocka_unit_test(skips_commas_and_semicolons_inside_quoted_parameters),
        cmocka_unit_test(ignores_elements_with_malformed_q),
        cmocka_unit_test(refuses_garbage_accept),
        cmocka_unit_test(accepts_by_length_not_by_terminator),
        cmocka_unit_test(accept_all_names_every_served_type),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

/* Unit tests for src/digest.c: strict parsing and EVP hashing against known vectors. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "archmirror/digest.h"
#include "archmirror/error.h"

#define SHA256_EMPTY "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
#define SHA256_ABC   "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
#define SHA512_ABC                                                                                 \
    "sha512:ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a"                      \
    "2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f"

static int parse(const char *s)
{
    struct am_digest d;
    return am_digest_parse(s, strlen(s), &d);
}

static void parses_sha256_and_keeps_canonical_text(void **state)
{
    struct am_digest d;
    assert_int_equal(am_digest_parse(SHA256_ABC, strlen(SHA256_ABC), &d), 0);
    assert_int_equal(d.alg, AM_DIGEST_SHA256);
    assert_string_equal(d.str, SHA256_ABC);
}

static void parses_sha512(void **state)
{
    struct am_digest d;
    assert_int_equal(am_digest_parse(SHA512_ABC, strlen(SHA512_ABC), &d), 0);
    assert_int_equal(d.alg, AM_DIGEST_SHA512);
    assert_string_equal(d.str, SHA512_ABC);
}

static void parses_only_the_given_length(void **state)
{
    /* A digest followed by more bytes, parsed with the digest's length. */
    const char *s = SHA256_ABC "/trailing";
    struct am_digest d;
    assert_int_equal(am_digest_parse(s, strlen(SHA256_ABC), &d), 0);
    assert_string_equal(d.str, SHA256_ABC);
    assert_int_equal(am_digest_parse(s, strlen(s), &d), AM_EDIGEST_INVALID);
}

static void rejects_uppercase_hex(void **state)
{
    assert_int_equal(
        parse("sha256:BA7816BF8F01CFEA414140DE5DAE2223B00361A396177A9CB410FF61F20015AD"),
        AM_EDIGEST_INVALID);
    assert_int_equal(
        parse("sha256:Ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"),
        AM_EDIGEST_INVALID);
}

static void rejects_uppercase_algorithm(void **state)
{
    assert_int_equal(
        parse("SHA256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"),
        AM_EDIGEST_INVALID);
}

static void rejects_wrong_lengths(void **state)
{
    assert_int_equal(
        parse("sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015a"),
        AM_EDIGEST_INVALID);
    assert_int_equal(
        parse("sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad0"),
        AM_EDIGEST_INVALID);
    /* A sha256-length hex under the sha512 name and the reverse. */
    assert_int_equal(
        parse("sha512:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"),
        AM_EDIGEST_INVALID);
    assert_int_equal(parse("sha256:ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee6"
                           "4b55d39a2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94f"
                           "a54ca49f"),
                     AM_EDIGEST_INVALID);
}

static void rejects_unknown_algorithms_and_bad_grammar(void **state)
{
    assert_int_equal(parse(""), AM_EDIGEST_INVALID);
    assert_int_equal(parse("sha256:"), AM_EDIGEST_INVALID);
    assert_int_equal(parse("sha256"), AM_EDIGEST_INVALID);
    assert_int_equal(parse(":ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"),
                     AM_EDIGEST_INVALID);
    assert_int_equal(parse("md5:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"),
                     AM_EDIGEST_INVALID);
    assert_int_equal(
        parse("sha384:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"),
        AM_EDIGEST_INVALID);
    assert_int_equal(
        parse("sha256+b64:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015"),
        AM_EDIGEST_INVALID);
    assert_int_equal(
        parse(" sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015a"),
        AM_EDIGEST_INVALID);
    assert_int_equal(
        parse("sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015a "),
        AM_EDIGEST_INVALID);
    assert_int_equal(
        parse("sha256:ga7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"),
        AM_EDIGEST_INVALID);
}

static void rejects_nul_in_the_middle(void **state)
{
    char s[] = SHA256_ABC;
    struct am_digest d;
    s[20] = '\0';
    assert_int_equal(am_digest_parse(s, sizeof s - 1, &d), AM_EDIGEST_INVALID);
}

static void leaves_output_untouched_on_failure(void **state)
{
    struct am_digest d;
    memset(&d, 0x5a, sizeof d);
    assert_int_equal(am_digest_parse("sha256:zz", 9, &d), AM_EDIGEST_INVALID);
    for (size_t i = 0; i < sizeof d.str; i++) assert_int_equal((unsigned char)d.str[i], 0x5a);
}

static void hashes_known_vectors_in_one_shot(void **state)
{
    struct am_digest d;
    am_digest_of(AM_DIGEST_SHA256, "", 0, &d);
    assert_string_equal(d.str, SHA256_EMPTY);
    am_digest_of(AM_DIGEST_SHA256, "abc", 3, &d);
    assert_string_equal(d.str, SHA256_ABC);
    assert_int_equal(d.alg, AM_DIGEST_SHA256);
    am_digest_of(AM_DIGEST_SHA512, "abc", 3, &d);
    assert_string_equal(d.str, SHA512_ABC);
    assert_int_equal(d.alg, AM_DIGEST_SHA512);
}

static void hashes_incrementally_like_one_shot(void **state)
{
    static const char text[] = "The quick brown fox jumps over the lazy dog";
    struct am_hasher h;
    struct am_digest whole, parts;

    am_digest_of(AM_DIGEST_SHA256, text, sizeof text - 1, &whole);
    assert_int_equal(am_hasher_init(&h, AM_DIGEST_SHA256), 0);
    for (size_t i = 0; i < sizeof text - 1; i += 5) {
        size_t n = sizeof text - 1 - i < 5 ? sizeof text - 1 - i : 5;
        am_hasher_update(&h, text + i, n);
    }
    am_hasher_update(&h, "", 0);
    am_hasher_final(&h, &parts);
    am_hasher_cleanup(&h);
    assert_string_equal(parts.str,
                        "sha256:d7a8fbb307d7809469ca9abcb0082e4f8d5651e46d3cdb762d02d0bf37c9e592");
    assert_true(am_digest_equal(&whole, &parts));
}

static void hashes_sha512_incrementally(void **state)
{
    struct am_hasher h;
    struct am_digest d;
    assert_int_equal(am_hasher_init(&h, AM_DIGEST_SHA512), 0);
    am_hasher_update(&h, "a", 1);
    am_hasher_update(&h, "bc", 2);
    am_hasher_final(&h, &d);
    am_hasher_cleanup(&h);
    assert_string_equal(d.str, SHA512_ABC);
}

static void hashed_digest_round_trips_through_parse(void **state)
{
    struct am_digest hashed, parsed;
    am_digest_of(AM_DIGEST_SHA512, "x", 1, &hashed);
    assert_int_equal(am_digest_parse(hashed.str, strlen(hashed.str), &parsed), 0);
    assert_true(am_digest_equal(&hashed, &parsed));
}

static void compares_algorithm_and_text(void **state)
{
    struct am_digest a, b, c;
    am_digest_of(AM_DIGEST_SHA256, "abc", 3, &a);
    am_digest_of(AM_DIGEST_SHA256, "abd", 3, &b);
    am_digest_of(AM_DIGEST_SHA512, "abc", 3, &c);
    assert_true(am_digest_equal(&a, &a));
    assert_false(am_digest_equal(&a, &b));
    assert_false(am_digest_equal(&a, &c));
}

static void never_equates_empty_digests(void **state)
{
    /* The fail-closed result of a hash OpenSSL could not compute. */
    struct am_digest a = {AM_DIGEST_SHA256, ""}, b = {AM_DIGEST_SHA256, ""};
    assert_false(am_digest_equal(&a, &b));
}

static void cleans_up_zeroed_and_cleaned_hashers(void **state)
{
    struct am_hasher h = {0};
    am_hasher_cleanup(&h);
    am_hasher_cleanup(NULL);
    assert_int_equal(am_hasher_init(&h, AM_DIGEST_SHA256), 0);
    am_hasher_cleanup(&h);
    assert_null(h.ctx);
    am_hasher_cleanup(&h);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(parses_sha256_and_keeps_canonical_text),
        cmocka_unit_test(parses_sha512),
        cmocka_unit_test(parses_only_the_given_length),
        cmocka_unit_test(rejects_uppercase_hex),
        cmocka_unit_test(rejects_uppercase_algorithm),
        cmocka_unit_test(rejects_wrong_lengths),
        cmocka_unit_test(rejects_unknown_algorithms_and_bad_grammar),
        cmocka_unit_test(rejects_nul_in_the_middle),
        cmocka_unit_test(leaves_output_untouched_on_failure),
        cmocka_unit_test(hashes_known_vectors_in_one_shot),
        cmocka_unit_test(hashes_incrementally_like_one_shot),
        cmocka_unit_test(hashes_sha512_incrementally),
        cmocka_unit_test(hashed_digest_round_trips_through_parse),
        cmocka_unit_test(compares_algorithm_and_text),
        cmocka_unit_test(never_equates_empty_digests),
        cmocka_unit_test(cleans_up_zeroed_and_cleaned_hashers),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

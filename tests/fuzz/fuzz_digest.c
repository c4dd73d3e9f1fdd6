/*
 * fuzz_digest — am_digest_parse on arbitrary bytes (digests arrive in request paths,
 * manifests and upstream headers). Properties: a digest that parses is its own canonical
 * text (same length, same bytes: the parser never normalises) and parses again equal.
 */
#include <string.h>

#include "archmirror/digest.h"
#include "fuzz.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct am_digest d, again;
    if (am_digest_parse((const char *)data, size, &d) != 0) return 0;
    size_t n = strnlen(d.str, sizeof d.str);
    FUZZ_CHECK(n < sizeof d.str);
    FUZZ_CHECK(n == size && memcmp(d.str, data, size) == 0);
    FUZZ_CHECK(d.alg == AM_DIGEST_SHA256 || d.alg == AM_DIGEST_SHA512);
    FUZZ_CHECK(n == (d.alg == AM_DIGEST_SHA256 ? 7 + 64 : 7 + 128));
    FUZZ_CHECK(am_digest_parse(d.str, n, &again) == 0 && am_digest_equal(&d, &again));
    return 0;
}

/*
 * fuzz_range — am_http_parse_range on arbitrary Range values (clients send them; the
 * answer decides which bytes of a cached blob go out). Input: 8 bytes little-endian of
 * the blob's size (its top bits cleared, so sizes near 2^64 cannot wrap the arithmetic
 * the property checks do), then the header value. Properties: the result is one of the
 * three documented codes; a satisfiable range is non-empty and inside the blob; written
 * back as "bytes=FIRST-LAST" it parses to the same range; a range that does not fit is
 * 416 only when it starts at or past the end (or the blob is empty).
 */
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "archmirror/error.h"
#include "archmirror/http.h"
#include "archmirror/le.h"
#include "fuzz.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 8) return 0;
    uint64_t blob = am_le_get64(data) & ((UINT64_C(1) << 62) - 1);
    const char *s = (const char *)data + 8;
    size_t len = size - 8;
    uint64_t start = 0, end = 0;
    int rc = am_http_parse_range(s, len, blob, &start, &end);
    FUZZ_CHECK(rc == 0 || rc == AM_ERANGE || rc == AM_EINVAL);
    if (rc == AM_ERANGE) {
        /* 416 needs a well-formed single range that misses: parsing it against a much
         * larger blob must then succeed or still miss, never turn malformed. */
        uint64_t s2, e2;
        int again = am_http_parse_range(s, len, (UINT64_C(1) << 62), &s2, &e2);
        FUZZ_CHECK(again == 0 || again == AM_ERANGE);
        return 0;
    }
    if (rc != 0) return 0;
    FUZZ_CHECK(start < end);
    FUZZ_CHECK(end <= blob);
    char canon[64];
    int n = snprintf(canon, sizeof canon, "bytes=%" PRIu64 "-%" PRIu64, start, end - 1);
    FUZZ_CHECK(n > 0 && (size_t)n < sizeof canon);
    uint64_t s2 = 0, e2 = 0;
    FUZZ_CHECK(am_http_parse_range(canon, (size_t)n, blob, &s2, &e2) == 0);
    FUZZ_CHECK(s2 == start && e2 == end);
    return 0;
}

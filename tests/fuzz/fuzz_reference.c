/*
 * fuzz_reference — the reference.h validators and am_reference_parse on arbitrary
 * bytes. Properties: nothing that contains "..", '%' or an empty component passes as a
 * name; every field of a parsed reference passes its own validator; formatting a parsed
 * reference and parsing that text again gives the same reference.
 */
#include <stdbool.h>
#include <string.h>

#include "archmirror/reference.h"
#include "fuzz.h"

static void check_name(const char *s, size_t len)
{
    FUZZ_CHECK(len > 0 && len <= AM_NAME_MAX);
    FUZZ_CHECK(memchr(s, '%', len) == NULL);
    FUZZ_CHECK(s[0] != '/' && s[len - 1] != '/');
    for (size_t i = 0; i + 1 < len; i++) {
        FUZZ_CHECK(!(s[i] == '.' && s[i + 1] == '.'));
        FUZZ_CHECK(!(s[i] == '/' && s[i + 1] == '/'));
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *s = (const char *)data;
    if (am_reference_validate_name(s, size) == 0) check_name(s, size);
    if (am_reference_validate_tag(s, size) == 0) FUZZ_CHECK(size > 0 && size <= AM_TAG_MAX);
    if (am_reference_validate_registry(s, size) == 0) {
        FUZZ_CHECK(size > 0 && size <= AM_REGISTRY_MAX);
        FUZZ_CHECK(memchr(s, '/', size) == NULL && memchr(s, '@', size) == NULL);
    }

    struct am_reference ref, again;
    char msg[256];
    memset(&ref, 0, sizeof ref);
    memset(&again, 0, sizeof again);
    if (am_reference_parse(s, size, &ref, msg, sizeof msg) != 0) {
        FUZZ_CHECK(strnlen(msg, sizeof msg) < sizeof msg);
        return 0;
    }
    size_t rl = strnlen(ref.registry, sizeof ref.registry);
    size_t nl = strnlen(ref.repository, sizeof ref.repository);
    size_t tl = strnlen(ref.tag, sizeof ref.tag);
    FUZZ_CHECK(rl < sizeof ref.registry && nl < sizeof ref.repository && tl < sizeof ref.tag);
    FUZZ_CHECK(am_reference_validate_registry(ref.registry, rl) == 0);
    FUZZ_CHECK(am_reference_validate_name(ref.repository, nl) == 0);
    check_name(ref.repository, nl);
    FUZZ_CHECK(ref.has_tag == (tl > 0));
    if (ref.has_tag) FUZZ_CHECK(am_reference_validate_tag(ref.tag, tl) == 0);
    FUZZ_CHECK(ref.has_tag || ref.has_digest);

    char text[AM_REGISTRY_MAX + AM_NAME_MAX + AM_TAG_MAX + AM_DIGEST_STR_MAX + 8];
    am_reference_format(&ref, text, sizeof text);
    size_t n = strlen(text);
    FUZZ_CHECK(n + 1 < sizeof text); /* never truncated */
    FUZZ_CHECK(am_reference_parse(text, n, &again, NULL, 0) == 0);
    FUZZ_CHECK(strcmp(ref.registry, again.registry) == 0);
    FUZZ_CHECK(strcmp(ref.repository, again.repository) == 0);
    FUZZ_CHECK(strcmp(ref.tag, again.tag) == 0 && ref.has_tag == again.has_tag);
    FUZZ_CHECK(ref.has_digest == again.has_digest);
    if (ref.has_digest) FUZZ_CHECK(am_digest_equal(&ref.digest, &again.digest));
    return 0;
}

/*
 * fuzz_route — am_route_parse on an arbitrary request-target, split at the first '?'
 * into path and query as the server does. Properties: whatever is returned passed
 * reference.h's validation (name, tag, ns) and digest.h's; nothing is percent-decoded
 * into a name; the upstream name of a valid name is valid or refused, never truncated.
 */
#include <string.h>

#include "archmirror/error.h"
#include "archmirror/route.h"
#include "fuzz.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *s = (const char *)data;
    const char *q = memchr(s, '?', size);
    size_t plen = q ? (size_t)(q - s) : size;
    const char *query = q ? q + 1 : "";
    size_t qlen = q ? size - plen - 1 : 0;

    struct am_route r;
    char msg[256];
    memset(&r, 0, sizeof r);
    int rc = am_route_parse(s, plen, query, qlen, &r, msg, sizeof msg);
    if (rc) {
        FUZZ_CHECK(rc == AM_ENAME_INVALID || rc == AM_ETAG_INVALID || rc == AM_EDIGEST_INVALID ||
                   rc == AM_EBAD_REQUEST);
        FUZZ_CHECK(strnlen(msg, sizeof msg) < sizeof msg);
        return 0;
    }
    FUZZ_CHECK(r.kind >= AM_ROUTE_NONE && r.kind <= AM_ROUTE_UNKNOWN_V2);
    if (r.has_ns) {
        size_t n = strnlen(r.ns, sizeof r.ns);
        FUZZ_CHECK(n < sizeof r.ns && am_reference_validate_registry(r.ns, n) == 0);
    }
    switch (r.kind) {
    case AM_ROUTE_MANIFEST:
    case AM_ROUTE_BLOB:
    case AM_ROUTE_TAGS:
    case AM_ROUTE_REFERRERS:
    case AM_ROUTE_UPLOAD: {
        size_t n = strnlen(r.name, sizeof r.name);
        FUZZ_CHECK(n < sizeof r.name && am_reference_validate_name(r.name, n) == 0);
        FUZZ_CHECK(memchr(r.name, '%', n) == NULL);
        /* The name is a substring of the path as sent: never decoded or rebuilt. */
        FUZZ_CHECK(n <= plen && memmem(s, plen, r.name, n) != NULL);
        char up[AM_NAME_MAX + 1];
        int urc = am_route_upstream_name("docker.io", r.name, up, sizeof up);
        if (urc == 0) {
            size_t un = strnlen(up, sizeof up);
            FUZZ_CHECK(un < sizeof up && am_reference_validate_name(up, un) == 0);
        } else {
            FUZZ_CHECK(urc == AM_ENAME_INVALID);
        }
        FUZZ_CHECK(am_route_upstream_name("ghcr.io", r.name, up, sizeof up) == 0 &&
                   strcmp(up, r.name) == 0);
        break;
    }
    default: break;
    }
    if (r.kind == AM_ROUTE_MANIFEST) {
        if (r.by_digest) {
            size_t n = strnlen(r.digest.str, sizeof r.digest.str);
            struct am_digest d;
            FUZZ_CHECK(am_digest_parse(r.digest.str, n, &d) == 0);
        } else {
            size_t n = strnlen(r.tag, sizeof r.tag);
            FUZZ_CHECK(n < sizeof r.tag && am_reference_validate_tag(r.tag, n) == 0);
        }
    }
    if (r.kind == AM_ROUTE_BLOB || r.kind == AM_ROUTE_REFERRERS) {
        size_t n = strnlen(r.digest.str, sizeof r.digest.str);
        struct am_digest d;
        FUZZ_CHECK(am_digest_parse(r.digest.str, n, &d) == 0);
    }
    return 0;
}

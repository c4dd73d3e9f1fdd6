/*
 * fuzz_manifest — am_manifest_parse on arbitrary bytes as an upstream manifest, image
 * index or Docker manifest list. The first byte picks the upstream's Content-Type (none,
 * empty, each known type, a foreign one, one with parameters); the rest is the body.
 * Properties: success yields a known kind, NUL-terminated strings inside their fields,
 * valid digests, non-negative sizes and an entries array of exactly n_entries; a failure
 * leaves nothing owned and a one-line message.
 */
#include <string.h>

#include "archmirror/error.h"
#include "archmirror/manifest.h"
#include "fuzz.h"

static const char *const content_types[] = {
    NULL,
    "",
    AM_MT_OCI_MANIFEST_S,
    AM_MT_OCI_INDEX_S,
    AM_MT_DOCKER_MANIFEST_S,
    AM_MT_DOCKER_LIST_S,
    AM_MT_DOCKER_V1_S,
    AM_MT_DOCKER_V1_SIGNED_S,
    "application/json",
    "application/vnd.oci.image.index.v1+json; charset=utf-8",
    " APPLICATION/VND.DOCKER.DISTRIBUTION.MANIFEST.V2+JSON ",
    "text/html",
};

static void check_descriptor(const struct am_descriptor *d)
{
    FUZZ_CHECK(strnlen(d->media_type, sizeof d->media_type) < sizeof d->media_type);
    size_t n = strnlen(d->digest.str, sizeof d->digest.str);
    struct am_digest again;
    FUZZ_CHECK(am_digest_parse(d->digest.str, n, &again) == 0);
    FUZZ_CHECK(d->size >= 0);
    if (d->has_platform) {
        const struct am_platform *p = &d->platform;
        FUZZ_CHECK(strnlen(p->os, sizeof p->os) < sizeof p->os);
        FUZZ_CHECK(strnlen(p->architecture, sizeof p->architecture) < sizeof p->architecture);
        FUZZ_CHECK(strnlen(p->variant, sizeof p->variant) < sizeof p->variant);
        FUZZ_CHECK(strnlen(p->os_version, sizeof p->os_version) < sizeof p->os_version);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size == 0) return 0;
    const char *ct = content_types[data[0] % (sizeof content_types / sizeof content_types[0])];
    struct am_manifest m;
    char msg[256];
    int rc = am_manifest_parse((const char *)data + 1, size - 1, ct, &m, msg, sizeof msg);
    if (rc) {
        FUZZ_CHECK(rc == AM_EMANIFEST_INVALID || rc == AM_ENOMEM);
        FUZZ_CHECK(strnlen(msg, sizeof msg) < sizeof msg);
        FUZZ_CHECK(strchr(msg, '\n') == NULL && strchr(msg, '\r') == NULL);
        FUZZ_CHECK(m.entries == NULL);
        am_manifest_cleanup(&m); /* harmless after a failure */
        return 0;
    }
    FUZZ_CHECK(am_mediatype_is_manifest(m.kind));
    FUZZ_CHECK(strnlen(m.media_type, sizeof m.media_type) < sizeof m.media_type);
    FUZZ_CHECK((m.n_entries == 0) || m.entries != NULL);
    if (m.has_config) {
        FUZZ_CHECK(!am_mediatype_is_index(m.kind));
        check_descriptor(&m.config);
    }
    for (size_t i = 0; i < m.n_entries; i++) {
        check_descriptor(&m.entries[i]);
        if (m.entries[i].is_attestation) FUZZ_CHECK(am_mediatype_is_index(m.kind));
    }
    am_manifest_cleanup(&m);
    am_manifest_cleanup(&m); /* documented as idempotent through NULLing */
    return 0;
}

/*
 * fuzz_mediatype — Accept negotiation (am_mediatype_accepts) and Content-Type
 * classification (am_mediatype_classify) on arbitrary header values. The first byte
 * picks the media type asked about; the rest is the Accept value. Property: an empty
 * Accept allows everything; "*" "/" "*" with no q=0 elsewhere allows the types archmirror
 * serves.
 */
#include <string.h>

#include "archmirror/mediatype.h"
#include "fuzz.h"

static const char *const types[] = {
    AM_MT_OCI_MANIFEST_S, AM_MT_OCI_INDEX_S, AM_MT_DOCKER_MANIFEST_S,
    AM_MT_DOCKER_LIST_S,  AM_MT_DOCKER_V1_S, AM_MT_DOCKER_V1_SIGNED_S,
    "application/json",   "text/plain",      "",
};

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *s = (const char *)data;
    enum am_media_kind k = am_mediatype_classify(s, size);
    FUZZ_CHECK(k >= AM_MT_UNKNOWN && k <= AM_MT_DOCKER_V1);
    FUZZ_CHECK(!am_mediatype_is_index(k) || am_mediatype_is_manifest(k));
    if (size == 0) return 0;
    const char *mt = types[data[0] % (sizeof types / sizeof types[0])];
    const char *accept = s + 1;
    size_t alen = size - 1;
    bool ok = am_mediatype_accepts(accept, alen, mt);
    if (alen == 0) FUZZ_CHECK(ok);
    /* Asking twice gives the same answer (no hidden state). */
    FUZZ_CHECK(am_mediatype_accepts(accept, alen, mt) == ok);
    return 0;
}

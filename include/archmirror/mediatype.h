/*
 * mediatype — the manifest media types archmirror understands, and Accept negotiation.
 *
 * archmirror never converts a manifest: it stores the upstream's bytes with the media
 * type they came with, and serves them only to a client whose Accept allows that type.
 * Upstream is always asked with the full list (AM_MEDIATYPE_ACCEPT_ALL) because
 * distribution 2.8 otherwise rewrites manifest lists and converts to schema1.
 */
#ifndef ARCHMIRROR_MEDIATYPE_H
#define ARCHMIRROR_MEDIATYPE_H

#include <stdbool.h>
#include <stddef.h>

#define AM_MT_OCI_MANIFEST_S     "application/vnd.oci.image.manifest.v1+json"
#define AM_MT_OCI_INDEX_S        "application/vnd.oci.image.index.v1+json"
#define AM_MT_DOCKER_MANIFEST_S  "application/vnd.docker.distribution.manifest.v2+json"
#define AM_MT_DOCKER_LIST_S      "application/vnd.docker.distribution.manifest.list.v2+json"
#define AM_MT_DOCKER_V1_S        "application/vnd.docker.distribution.manifest.v1+json"
#define AM_MT_DOCKER_V1_SIGNED_S "application/vnd.docker.distribution.manifest.v1+prettyjws"

/* What archmirror sends upstream on every manifest request. */
#define AM_MEDIATYPE_ACCEPT_ALL                                                                    \
    AM_MT_OCI_INDEX_S ", " AM_MT_OCI_MANIFEST_S ", " AM_MT_DOCKER_LIST_S                           \
                      ", " AM_MT_DOCKER_MANIFEST_S

enum am_media_kind {
    AM_MT_UNKNOWN = 0,
    AM_MT_OCI_MANIFEST,
    AM_MT_OCI_INDEX,
    AM_MT_DOCKER_MANIFEST,
    AM_MT_DOCKER_LIST,
    AM_MT_DOCKER_V1, /* schema1, signed or not: passed through, never produced */
};

/* Classifies a Content-Type/mediaType value; parameters (";charset=…") and case of the
 * type are ignored; surrounding whitespace is ignored. */
enum am_media_kind am_mediatype_classify(const char *s, size_t len);
bool am_mediatype_is_index(enum am_media_kind k);    /* OCI index or Docker list */
bool am_mediatype_is_manifest(enum am_media_kind k); /* any kind but UNKNOWN */

/* Whether an Accept header value (comma-separated, possibly joined from several header
 * lines, with q= parameters) allows media type mt. An absent/empty Accept allows
 * everything; "*" "/" "*" and "type/" "*" match; q=0 excludes. */
bool am_mediatype_accepts(const char *accept, size_t accept_len, const char *mt);

#endif

/*
 * manifest — parsing of image manifests, OCI indexes and Docker manifest lists.
 *
 * The parse reads the upstream's bytes and never rewrites them: what is stored and
 * served is the original byte string. The parsed form lists the descriptors an index
 * points at (with platform and annotations) or a manifest's config and layers. Input is
 * untrusted: every field is type-checked, digests validated, strings bounded.
 */
#ifndef ARCHMIRROR_MANIFEST_H
#define ARCHMIRROR_MANIFEST_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "archmirror/digest.h"
#include "archmirror/mediatype.h"

#define AM_MEDIATYPE_MAX      255
#define AM_PLATFORM_FIELD_MAX 63

struct am_platform {
    char os[AM_PLATFORM_FIELD_MAX + 1];
    char architecture[AM_PLATFORM_FIELD_MAX + 1];
    char variant[AM_PLATFORM_FIELD_MAX + 1];
    char os_version[AM_PLATFORM_FIELD_MAX + 1];
};

struct am_descriptor {
    char media_type[AM_MEDIATYPE_MAX + 1];
    struct am_digest digest;
    int64_t size;
    bool has_platform;
    struct am_platform platform;
    /* buildx attestation: annotation vnd.docker.reference.type == attestation-manifest */
    bool is_attestation;
};

struct am_manifest {
    enum am_media_kind kind;
    char media_type[AM_MEDIATYPE_MAX + 1];
    int schema_version;
    bool has_config;
    struct am_descriptor config;   /* manifests only */
    struct am_descriptor *entries; /* owned: index → manifests[], manifest → layers[] */
    size_t n_entries;
};

/* Parses bytes[0..len). content_type (borrowed, may be NULL/empty) is the upstream's
 * Content-Type; the JSON mediaType wins when present, and the two must not contradict.
 * Returns 0 with *out owned (release with am_manifest_cleanup), or AM_EMANIFEST_INVALID
 * with a one-line reason in msg, or AM_ENOMEM. */
int am_manifest_parse(const char *bytes, size_t len, const char *content_type,
                      struct am_manifest *out, char *msg, size_t msglen);
void am_manifest_cleanup(struct am_manifest *m);

#endif

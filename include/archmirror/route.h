/*
 * route — maps a request-target of the registry API to what it names.
 *
 * Parses "/v2/", "/v2/<name>/manifests/<tag|digest>", "/v2/<name>/blobs/<digest>",
 * the push endpoints ("/v2/<name>/blobs/uploads/…") and "/v2/<name>/tags/list", plus the
 * ns= query parameter that containerd appends when talking to a mirror. The path is
 * untrusted and is never percent-decoded: the name grammar has no '%', so an encoded
 * byte ("%2e%2e", "%2F") is simply invalid. Everything returned has passed
 * reference.h's validation. This module never allocates.
 */
#ifndef ARCHMIRROR_ROUTE_H
#define ARCHMIRROR_ROUTE_H

#include <stdbool.h>
#include <stddef.h>

#include "archmirror/digest.h"
#include "archmirror/reference.h"

enum am_route_kind {
    AM_ROUTE_NONE = 0,  /* not under /v2 */
    AM_ROUTE_BASE,      /* /v2/ or /v2 */
    AM_ROUTE_MANIFEST,  /* /v2/<name>/manifests/<reference> */
    AM_ROUTE_BLOB,      /* /v2/<name>/blobs/<digest> */
    AM_ROUTE_UPLOAD,    /* /v2/<name>/blobs/uploads/… (push: refused) */
    AM_ROUTE_TAGS,      /* /v2/<name>/tags/list */
    AM_ROUTE_REFERRERS, /* /v2/<name>/referrers/<digest> */
    AM_ROUTE_UNKNOWN_V2 /* under /v2 but no endpoint */
};

struct am_route {
    enum am_route_kind kind;
    char name[AM_NAME_MAX + 1]; /* repository as requested */
    bool by_digest;             /* manifests: reference is a digest */
    char tag[AM_TAG_MAX + 1];   /* manifests by tag */
    struct am_digest digest;    /* manifests by digest, blobs */
    bool has_ns;
    char ns[AM_REGISTRY_MAX + 1]; /* ?ns= value, validated registry host[:port] */
};

/* Parses path (no query) and query (without '?', may be empty). Returns 0 with *out
 * filled, or AM_ENAME_INVALID / AM_ETAG_INVALID / AM_EDIGEST_INVALID / AM_EBAD_REQUEST
 * (bad ns, bad query encoding) with a one-line reason in msg. Path kinds NONE and
 * UNKNOWN_V2 return 0. */
int am_route_parse(const char *path, size_t path_len, const char *query, size_t query_len,
                   struct am_route *out, char *msg, size_t msglen);

/* The repository as the upstream knows it: for upstream "docker.io" a one-component
 * name gets "library/" (containerd already sends it, other clients may not). Returns 0
 * or AM_ENAME_INVALID when the result exceeds AM_NAME_MAX. */
int am_route_upstream_name(const char *upstream, const char *name, char *out, size_t outlen);

#endif

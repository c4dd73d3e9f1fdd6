/*
 * reference — repository names, tags, registry hosts and image references.
 *
 * Everything a client puts in a path or in ?ns= is validated here against the OCI
 * distribution spec grammar before it reaches a cache key or an upstream URL:
 *   name      [a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(\/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*
 *   tag       [a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}
 * This module must never let "..", "%2e", empty components or bytes outside the
 * grammar through, and never allocates.
 */
#ifndef ARCHMIRROR_REFERENCE_H
#define ARCHMIRROR_REFERENCE_H

#include <stdbool.h>
#include <stddef.h>

#include "archmirror/digest.h"

#define AM_NAME_MAX     255 /* distribution's limit for a repository name */
#define AM_TAG_MAX      128
#define AM_REGISTRY_MAX 255 /* host[:port] */

/* Each returns 0 or AM_ENAME_INVALID / AM_ETAG_INVALID / AM_EINVAL (registry). */
int am_reference_validate_name(const char *s, size_t len);
int am_reference_validate_tag(const char *s, size_t len);
/* host[:port]: DNS labels or an IPv4 address, optional port 1-65535; lowercase. Also
 * accepts a bracketed IPv6 literal. This is the grammar of the ns= value. */
int am_reference_validate_registry(const char *s, size_t len);

struct am_reference {
    char registry[AM_REGISTRY_MAX + 1]; /* "docker.io" when absent */
    char repository[AM_NAME_MAX + 1];   /* "library/nginx" for "nginx" on docker.io */
    char tag[AM_TAG_MAX + 1];           /* "" when absent (and has_tag false) */
    bool has_tag;
    bool has_digest;
    struct am_digest digest;
};

/* Parses "nginx", "nginx:1.27", "docker.io/library/nginx:1.27",
 * "ghcr.io/o/r@sha256:…", "localhost:5000/x:y" like docker's reference.ParseNormalizedNamed:
 * the first component is a registry when it contains '.' or ':' or is "localhost";
 * "index.docker.io" and "registry-1.docker.io" normalise to "docker.io"; one-component
 * docker.io names get "library/"; neither tag nor digest → tag "latest".
 * Returns 0 or AM_ENAME_INVALID/AM_ETAG_INVALID/AM_EDIGEST_INVALID with a one-line
 * reason in msg (msg may be NULL). */
int am_reference_parse(const char *s, size_t len, struct am_reference *out, char *msg,
                       size_t msglen);
/* Writes "registry/repository[:tag][@digest]" into out (truncates safely). */
void am_reference_format(const struct am_reference *ref, char *out, size_t outlen);

#endif

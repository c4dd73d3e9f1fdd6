/*
 * platformapi — the platform-query JSON API under /api/v1/platforms: which platforms an
 * image ships, for one image (GET) or a fleet's worth with a readiness check (POST).
 *
 *   GET /api/v1/platforms?image=docker.io/library/nginx:1.27      (HEAD too)
 *     200 {"image","registry","repository","tag","digest","mediaType","multiArch",
 *          "platforms":[{"platform","os","architecture","variant","digest","size"}],
 *          "source":"cache"|"upstream","cacheState","checkedAt"}
 *     "variant" is "" when the platform has none; "osVersion" is added when set;
 *     "truncated": true when more than AM_IMAGEINFO_PLATFORMS_MAX platforms exist;
 *     "tag" is null for a reference by digest alone; "checkedAt" is RFC 3339 UTC.
 *   POST /api/v1/platforms {"images":[…], "require":["linux/arm64", …]}  (require optional)
 *     200 {"results":[one per distinct image string, in input order: the GET shape, or
 *          {"image", "error":{"code","message"}}], "missing":[{"image","platforms":[…]}]}
 *     With require, each successful result also carries "matches": {required platform →
 *     {"platform","digest"} of the entry containerd on that platform would pull, or null}.
 *     A required platform is met the way containerd on that platform pulls
 *     (am_platform_best_match / am_platform_match_rank): an arm64 node takes an
 *     arm/v8…v5 entry when there is no arm64 one, an amd64 node a 386 one; the reverse
 *     never. "missing" lists, per resolved image, the required platforms not met; images
 *     that failed to resolve are not in it (their error is in "results").
 *
 * References are parsed like docker's ParseNormalizedNamed (reference.h): a missing
 * registry is docker.io, one-component Docker Hub names get "library/", index.docker.io
 * and registry-1.docker.io are docker.io; other registries' repositories are used as
 * written. The registry must be a configured upstream. Lookups go through imageinfo
 * (its caches, then the upstream); a batch runs at most AM_PLATFORMAPI_CONCURRENCY at a
 * time, identical images (same upstream, repository and tag or digest) resolve once, and
 * one image's failure is reported in its own entry.
 *
 * Mistakes get 4xx with {"error":{"code","message"}}; codes: BAD_REQUEST (400: missing or
 * repeated image=, bad %-encoding), JSON_INVALID (400: body is not JSON), BODY_INVALID
 * (400: wrong shape, unknown key), REFERENCE_INVALID (400), PLATFORM_INVALID (400),
 * REGISTRY_UNKNOWN (403: not an upstream of this mirror), NOT_FOUND (404: unknown path),
 * METHOD_NOT_ALLOWED (405), TOO_MANY_IMAGES (413). A failed lookup is reported with the
 * OCI code of its AM_E* (MANIFEST_UNKNOWN, UNAUTHORIZED, DENIED, TOOMANYREQUESTS,
 * BLOB_UNKNOWN, DIGEST_INVALID, MANIFEST_INVALID, SIZE_INVALID, UNAVAILABLE…, or the
 * error's name where that code is UNKNOWN) and, for GET, its HTTP status. Bodies over
 * AM_HTTPSERVER_MAX_BODY are refused by the server (413, OCI error JSON).
 *
 * This module must never reach an upstream that is not configured, never block the loop
 * and never let one image's failure fail the batch.
 */
#ifndef ARCHMIRROR_PLATFORMAPI_H
#define ARCHMIRROR_PLATFORMAPI_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>

#include "archmirror/config.h"
#include "archmirror/httpserver.h"
#include "archmirror/imageinfo.h"
#include "archmirror/platform.h"
#include "archmirror/reference.h"

#define AM_PLATFORMAPI_PATH        "/api/v1/platforms"
#define AM_PLATFORMAPI_MAX_IMAGES  1000  /* distinct image strings per POST */
#define AM_PLATFORMAPI_MAX_LIST    10000 /* entries of "images", duplicates included */
#define AM_PLATFORMAPI_MAX_REQUIRE 16    /* entries of "require" */
#define AM_PLATFORMAPI_CONCURRENCY 8     /* lookups in flight per POST */
#define AM_PLATFORMAPI_IMAGE_MAX   512   /* bytes of one image reference */

struct am_platformapi;

/* ii and cfg are borrowed and must outlive the API. Returns 0 with *out owned
 * (am_platformapi_free) or AM_ENOMEM. */
int am_platformapi_new(struct am_imageinfo *ii, const struct am_config *cfg,
                       struct am_platformapi **out);
/* Cancels the lookups of requests still in flight and forgets them without touching their
 * exchanges: call after the server drained (or before it goes). Accepts NULL. Must run
 * before am_imageinfo_free. */
void am_platformapi_free(struct am_platformapi *api);

/* Whether a request path (raw, without the query) belongs to this API:
 * AM_PLATFORMAPI_PATH itself or anything below it. */
bool am_platformapi_owns(const char *path, size_t len);
/* Handles a request whose path am_platformapi_owns: answers it now or later; ex is
 * borrowed until then (the module sets the exchange's on_gone while it waits). */
void am_platformapi_handle(struct am_platformapi *api, struct am_http_exchange *ex);

/* --- the pure parts, public for tests and the CLI --------------------------------------- */

/* A request mistake: HTTP status, a stable code (static string) and what was wrong. */
struct am_platformapi_error {
    int status;
    const char *code;
    char message[256];
};

/* What an image reference resolves to. */
struct am_platformapi_target {
    size_t up_idx;           /* index into cfg->upstreams */
    struct am_reference ref; /* registry (the upstream's name), repository, tag… */
};

/* Parses an image reference s[0..len) and picks its upstream. Returns 0, or -1 with *err
 * filled (REFERENCE_INVALID 400, REGISTRY_UNKNOWN 403). */
int am_platformapi_parse_image(const struct am_config *cfg, const char *s, size_t len,
                               struct am_platformapi_target *out, struct am_platformapi_error *err);

/* The value of the one query parameter `name` in query[0..len) ("a=1&image=x%2Fy"),
 * %XX- and '+'-decoded into out (NUL-terminated). Returns 0, AM_ENOT_FOUND (absent),
 * AM_EINVAL (given twice, bad %-escape, or a decoded NUL) or AM_ETOO_LARGE (longer than
 * outlen - 1). */
int am_platformapi_query_param(const char *query, size_t len, const char *name, char *out,
                               size_t outlen);

/* A batch request's body, parsed. */
struct am_platformapi_batch {
    char **images; /* owned: distinct image strings in first-seen order */
    size_t n_images;
    struct am_platform require[AM_PLATFORMAPI_MAX_REQUIRE]; /* normalised, distinct */
    size_t n_require;
};
/* Parses {"images":[…], "require":[…]} from body[0..len). Returns 0 with *out owned
 * (am_platformapi_batch_cleanup), -1 with *err filled (JSON_INVALID, BODY_INVALID,
 * PLATFORM_INVALID, TOO_MANY_IMAGES), or AM_ENOMEM. Image strings are not parsed here:
 * a bad one is that image's own error. */
int am_platformapi_parse_batch(const char *body, size_t len, struct am_platformapi_batch *out,
                               struct am_platformapi_error *err);
void am_platformapi_batch_cleanup(struct am_platformapi_batch *b); /* accepts zeroed */

/* The entry of img that containerd on `node` would pull (lowest am_platform_match_rank,
 * earliest among equals), as a position in img->platforms, or -1 when none matches. */
int am_platformapi_select(const struct am_imageinfo_image *img, const struct am_platform *node);

/* The "error" code reported for a failed lookup's AM_E* (OCI code, or the error's name
 * where the OCI code is UNKNOWN). Static string. */
const char *am_platformapi_error_code(int err);

/* The JSON of a lookup without its "image" key: on success registry … checkedAt (the GET
 * shape), on failure {"error":{"code","message"}}. t and r borrowed. Returns a new
 * reference, or NULL when out of memory. */
json_t *am_platformapi_result_json(const struct am_platformapi_target *t,
                                   const struct am_imageinfo_result *r);
/* {"error":{"code","message"}}; message made printable ASCII. New reference or NULL. */
json_t *am_platformapi_error_json(const char *code, const char *message);

/* ms since the epoch → "2024-05-01T12:00:00.123Z" into out (at least 32 bytes). */
void am_platformapi_format_time(uint64_t ms, char *out, size_t outlen);

#endif

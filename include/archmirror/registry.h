/*
 * registry — the pull side of the OCI distribution API, served from the caches and
 * the upstreams.
 *
 * Maps each /v2 request to an upstream (by ?ns= or the default), serves manifests and
 * indexes from the metastore (by digest: immutable; by tag: inside the freshness window
 * with no upstream contact, after it revalidated by one upstream HEAD, served stale when
 * the upstream fails), and serves blobs from the blob store, coalescing concurrent misses
 * into one fetch (blobflight.h); what no stored or in-flight copy can answer is streamed
 * through with its digest checked on the way.
 * It must never serve a byte that did not match its digest, never cache what failed
 * verification, never convert a manifest, and never proxy to a host that is not a
 * configured upstream.
 */
#ifndef ARCHMIRROR_REGISTRY_H
#define ARCHMIRROR_REGISTRY_H

#include <stdbool.h>
#include <uv.h>

#include "archmirror/blobstore.h"
#include "archmirror/config.h"
#include "archmirror/httpserver.h"
#include "archmirror/metastore.h"

struct am_pulllog;

struct am_registry;

/* cfg, ms, bs and pl are borrowed and must outlive the registry; bs may be NULL (blobs
 * are then only streamed through), pl may be NULL (no pull log). Creates one upstream client per
 * configured upstream. Returns 0 with *out owned (am_registry_free), or an error with msg filled.
 */
int am_registry_new(uv_loop_t *loop, const struct am_config *cfg, struct am_metastore *ms,
                    struct am_blobstore *bs, struct am_pulllog *pl, struct am_registry **out,
                    char *msg, size_t msglen);
/* The am_http_handler_fn for the server; ctx is the registry. */
void am_registry_handle(void *ctx, struct am_http_exchange *ex);
/* The handler of a separate admin listener: /metrics, /api/v1/…, /healthz, /readyz. */
void am_registry_handle_admin(void *ctx, struct am_http_exchange *ex);
/* separate: admin paths are answered only by am_registry_handle_admin (the registry
 * listeners say 404). token (borrowed, copied; may be NULL): the bearer token the admin
 * side requires. Returns 0 or AM_ENOMEM. */
int am_registry_set_admin(struct am_registry *reg, bool separate, const char *token);
/* The server's on_complete hook: request metrics and the debug access log. */
void am_registry_on_complete(void *ctx, const struct am_http_request *req, int status,
                             uint64_t body_bytes, bool completed, uint64_t duration_ns);
/* Frees the registry; upstream connections close asynchronously on the loop. Call only
 * once the server has drained (no exchange is in flight). */
void am_registry_free(struct am_registry *reg);

#endif

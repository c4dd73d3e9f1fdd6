/*
 * manifests — the manifest and index cache policy: what to answer for a tag or a digest,
 * from the metastore or from the upstream, with concurrent identical misses coalesced
 * into one upstream request.
 *
 * By digest: the stored bytes, with no upstream contact; on a miss one GET whose bytes
 * must hash to the digest. By tag: inside the freshness window the stored digest with no
 * upstream contact; after it one upstream HEAD (not counted as a pull by Docker Hub),
 * and a GET only when the digest moved; when the upstream is unreachable, times out,
 * answers 5xx or 429, the stored copy is served stale. Bytes are stored only after they
 * hashed to their digest and parsed as a manifest, and are never re-serialised. Callers
 * (the /v2 API, the platform API) get results through a callback and do their own
 * content negotiation. This module never blocks the loop and never stores what failed.
 */
#ifndef ARCHMIRROR_MANIFESTS_H
#define ARCHMIRROR_MANIFESTS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "archmirror/config.h"
#include "archmirror/digest.h"
#include "archmirror/metastore.h"
#include "archmirror/upstream.h"

struct am_manifests;
struct am_manifests_waiter;

/* cfg, ms and ups[0..cfg->n_upstreams) are borrowed and must outlive the table.
 * Returns 0 with *out owned (am_manifests_free) or AM_ENOMEM. */
int am_manifests_new(const struct am_config *cfg, struct am_metastore *ms,
                     struct am_upstream *const *ups, struct am_manifests **out);
/* Cancels requests still running; their waiters get AM_ECANCELED. */
void am_manifests_free(struct am_manifests *mf);

struct am_manifests_query {
    size_t up_idx;    /* index into cfg->upstreams */
    const char *repo; /* repository as the upstream names it */
    const char *tag;  /* exactly one of tag and digest */
    const struct am_digest *digest;
    bool need_body;      /* false: a HEAD; digest, type and size suffice */
    const char *log_ctx; /* "c1 r2", for log lines; may be NULL */
};

/* What a query resolved to. Every pointer is a view valid only during the callback. */
struct am_manifests_result {
    int err;                 /* 0, or the AM_E* a client should see */
    const char *message;     /* with err: a one-line reason, or NULL */
    const char *retry_after; /* with AM_ETOOMANYREQUESTS: the upstream's value, or "" */
    const char *media_type;
    const struct am_digest *digest;
    uint64_t size;
    const char *bytes;       /* NULL when only the head is known (need_body false) */
    const char *cache_state; /* "hit", "miss", "stale", "revalidated" */
};

typedef void (*am_manifests_cb)(void *arg, const struct am_manifests_result *r);

/* Resolves q (strings borrowed, copied as needed). cb(arg, result) runs exactly once;
 * for a cache hit it runs before this returns and *out is set to NULL. Otherwise *out is
 * the waiter handle, valid until cb runs, for am_manifests_cancel. Returns 0, or an error
 * (AM_ENOMEM, AM_EINVAL) without calling cb. */
int am_manifests_get(struct am_manifests *mf, const struct am_manifests_query *q,
                     am_manifests_cb cb, void *arg, struct am_manifests_waiter **out);
/* The waiter no longer wants its answer (its client went away): cb will not run. When no
 * waiter is left the upstream request is cancelled. */
void am_manifests_cancel(struct am_manifests_waiter *w);

struct am_manifests_stats {
    uint64_t hits;      /* answered from the metastore */
    uint64_t upstream;  /* upstream requests started */
    uint64_t coalesced; /* queries that joined a request in progress */
    uint64_t stale;     /* answered stale after an upstream failure */
};
void am_manifests_get_stats(const struct am_manifests *mf, struct am_manifests_stats *out);

#endif

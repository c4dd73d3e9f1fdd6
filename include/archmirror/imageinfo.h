/*
 * imageinfo — which platforms an image ships, from the caches when they know and from
 * the upstream when they must.
 *
 * An image's platforms are the entries of its OCI index or Docker manifest list minus
 * attestation manifests and unknown/unknown (as am_platform_list_from_index), or, for a
 * single-arch manifest, the os/architecture/variant of its config blob. An entry that is
 * itself an index ("index of indexes") is followed, by digest, to the manifests under it,
 * AM_IMAGEINFO_INDEX_DEPTH levels at most, and each platform names that leaf manifest,
 * the one containerd pulls (src/imageinfo.c says how an entry's own platform counts). A
 * child index that cannot be read fails the query: a partial list would claim platforms
 * missing that the image ships. Manifests (child indexes too) come through the manifests
 * module (its cache policy, verification and coalescing); a config
 * blob is fetched once (GET /v2/<repo>/blobs/<digest>, at most AM_IMAGEINFO_CONFIG_MAX
 * bytes, concurrent fetches of one coalesced), and the platform read from it is kept in
 * the metastore's "platforms" DB, keyed by the manifest's digest, only after the blob
 * hashed to the config digest. Parsed platform lists are kept in a bounded in-memory LRU
 * by digest, and every index parsed here or noted by the /v2 API (am_imageinfo_note_index)
 * feeds a bounded child-manifest → platform map, so the platform that pulled a child
 * manifest can be inferred on the hot path.
 *
 * This module runs on the loop thread only, never blocks it, never stores a platform read
 * from bytes that did not match their digest, and never reaches the upstream from its
 * synchronous functions (am_imageinfo_lookup_cached, am_imageinfo_child_platform,
 * am_imageinfo_note_index).
 */
#ifndef ARCHMIRROR_IMAGEINFO_H
#define ARCHMIRROR_IMAGEINFO_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "archmirror/config.h"
#include "archmirror/digest.h"
#include "archmirror/manifest.h"
#include "archmirror/manifests.h"
#include "archmirror/metastore.h"
#include "archmirror/upstream.h"

/* Limits, in one place. */
#define AM_IMAGEINFO_PLATFORMS_MAX 64         /* platforms reported per image */
#define AM_IMAGEINFO_CONFIG_MAX    (1u << 20) /* bytes of a config blob fetched */
#define AM_IMAGEINFO_LRU_IMAGES    4096       /* parsed platform lists kept in memory */
#define AM_IMAGEINFO_LRU_CHILDREN  32768      /* child manifest → platform mappings kept */
#define AM_IMAGEINFO_INDEX_DEPTH   4          /* levels of indexes, the top one included */
#define AM_IMAGEINFO_NESTED_MAX    32         /* child indexes read for one image */
#define AM_IMAGEINFO_TREE_ENTRIES  4096       /* entries walked in child indexes, per image */

struct am_imageinfo;
struct am_imageinfo_waiter;

/* One platform an image ships. */
struct am_imageinfo_platform {
    struct am_platform platform; /* normalised (platform.h) */
    struct am_digest digest;     /* the manifest for it: an index entry (below nested
                                  * indexes, the leaf manifest), or for a single-arch
                                  * image the image's own manifest */
    uint64_t size;               /* that manifest's size in bytes */
};

/* What an image is. Plain data, no pointers: copy it freely. */
struct am_imageinfo_image {
    char media_type[AM_MEDIATYPE_MAX + 1]; /* of the top manifest, as the upstream sent it */
    struct am_digest digest;               /* of the top manifest */
    uint64_t size;                         /* of the top manifest */
    bool is_index;                         /* the top manifest is an index or a list */
    bool multi_arch;                       /* more than one platform */
    bool truncated; /* more than AM_IMAGEINFO_PLATFORMS_MAX platforms: the first are kept */
    size_t n_platforms;
    /* Index order; below nested indexes, depth first, an index's entries that carry a
     * platform before the child indexes that carry none (containerd's preference). */
    struct am_imageinfo_platform platforms[AM_IMAGEINFO_PLATFORMS_MAX];
};

/* cfg, ms, mf and ups[0..cfg->n_upstreams) are borrowed and must outlive the module;
 * loop is kept. Returns 0 with *out owned (am_imageinfo_free) or AM_ENOMEM. */
int am_imageinfo_new(uv_loop_t *loop, const struct am_config *cfg, struct am_metastore *ms,
                     struct am_manifests *mf, struct am_upstream *const *ups,
                     struct am_imageinfo **out);
/* Cancels the work in flight: every pending query's callback runs with AM_ECANCELED
 * inside this call (and must not call into ii). Call before freeing mf, ms or ups.
 * Accepts NULL. */
void am_imageinfo_free(struct am_imageinfo *ii);

struct am_imageinfo_query {
    size_t up_idx;    /* index into cfg->upstreams */
    const char *repo; /* repository as the upstream names it, "library/nginx" */
    const char *tag;  /* exactly one of tag and digest */
    const struct am_digest *digest;
    const char *log_ctx; /* "c1 r2", for log lines; may be NULL */
};

/* What a query found. Every pointer is a view valid only during the callback. */
struct am_imageinfo_result {
    int err;                 /* 0, or the AM_E* to report (AM_EMANIFEST_UNKNOWN,
                              * AM_EUNAUTHORIZED, AM_ETOOMANYREQUESTS, AM_EBLOB_UNKNOWN
                              * (config blob missing), AM_EDIGEST_MISMATCH,
                              * AM_EMANIFEST_INVALID (also: config without a platform;
                              * nested indexes too deep, in a cycle, not an index, or
                              * unknown upstream), AM_ETOO_LARGE (also: more nested
                              * indexes or entries than the limits), AM_EUPSTREAM*,
                              * AM_ECANCELED, AM_ENOMEM…); a nested index's fetch error
                              * is the image's, its message naming that index */
    const char *message;     /* with err: a one-line reason, or NULL */
    const char *retry_after; /* with AM_ETOOMANYREQUESTS: the upstream's value, or "" */
    const struct am_imageinfo_image *image; /* NULL with err */
    const char *cache_state; /* the top manifest's (manifests.h): "hit", "miss", "stale",
                              * "revalidated"; "" with err */
    bool from_upstream;      /* the upstream was asked: manifest, tag HEAD, nested index
                              * or config blob */
    uint64_t checked_at_ms;  /* wall clock, ms since the epoch: by tag, when the tag was
                              * last checked upstream (the metastore's fetched_at, or now);
                              * by digest (immutable content), now */
};

typedef void (*am_imageinfo_cb)(void *arg, const struct am_imageinfo_result *r);

/* Resolves q (strings borrowed, copied as needed). cb(arg, result) runs exactly once;
 * when the caches answer it runs before this returns and *out is set to NULL. Otherwise
 * *out is the waiter handle, valid until cb runs, for am_imageinfo_cancel. cb may start
 * new queries and cancel others. Returns 0, or an error (AM_EINVAL: bad up_idx, missing
 * repo, not exactly one of tag and digest, over-long strings; AM_ENOMEM; AM_ECANCELED
 * during am_imageinfo_free) without calling cb. */
int am_imageinfo_get(struct am_imageinfo *ii, const struct am_imageinfo_query *q,
                     am_imageinfo_cb cb, void *arg, struct am_imageinfo_waiter **out);
/* The waiter no longer wants its answer: cb will not run. Accepts NULL. A config fetch
 * nobody waits for any more is cancelled. */
void am_imageinfo_cancel(struct am_imageinfo_waiter *w);

/* The platforms of the manifest top_digest of (up_idx, repo) from the caches alone (the
 * in-memory LRU, the metastore's manifest and platform records; no upstream I/O, so it
 * may run on every manifest request). An index found in the store is parsed once and
 * remembered. Returns 0 with *out filled, AM_ENOT_FOUND (not derivable without the
 * upstream: the manifest, or one of its nested indexes, is not stored, or it is
 * single-arch and its config was never read), AM_EINVAL (bad arguments),
 * AM_EMANIFEST_INVALID (stored bytes that do not parse; nested indexes too deep or in a
 * cycle), AM_ETOO_LARGE (nesting limits), AM_ENOMEM or a metastore read error. out is
 * written only on success. */
int am_imageinfo_lookup_cached(struct am_imageinfo *ii, size_t up_idx, const char *repo,
                               const struct am_digest *top_digest, struct am_imageinfo_image *out);

/* Tells the module about index bytes the /v2 API is serving for (up_idx, repo), so that
 * later requests for its children can be attributed (am_imageinfo_child_platform).
 * bytes[0..len) borrowed, already verified against digest by the caller; digest may be
 * NULL (then the sha256 of the bytes is used); media_type is the Content-Type they are
 * served with (may be NULL). Cheap when the digest was seen before (no parse). Nested
 * indexes are followed through the metastore only; while one is not stored, just the
 * index's own manifest entries are recorded (each child index is noted in its turn when
 * the /v2 API serves it). Returns 0, AM_EINVAL when the bytes are not an index (nothing
 * is recorded; call it for indexes only, or ignore that code), AM_EMANIFEST_INVALID,
 * AM_ETOO_LARGE (nesting limits) or AM_ENOMEM. */
int am_imageinfo_note_index(struct am_imageinfo *ii, size_t up_idx, const char *repo,
                            const struct am_digest *digest, const char *media_type,
                            const char *bytes, size_t len);

/* The platform of child_digest if it is an entry (with a platform, not an attestation) of
 * an index recently parsed or noted for (up_idx, repo), or a leaf manifest reached through
 * nested indexes from one. Returns 0 with *platform (normalised) and, when index is not
 * NULL, the digest of that index (for a leaf below nested indexes, the top one, unless a
 * child index was noted by itself later); AM_ENOT_FOUND
 * otherwise (also for evicted mappings: the map keeps AM_IMAGEINFO_LRU_CHILDREN). */
int am_imageinfo_child_platform(struct am_imageinfo *ii, size_t up_idx, const char *repo,
                                const struct am_digest *child_digest, struct am_platform *platform,
                                struct am_digest *index);

/* A source of small blobs (configs) other than a plain upstream GET: the registry plugs
 * in the blob cache, so the config that imageinfo reads and the one the pulling node
 * fetches are one upstream fetch. fetch returns 0 and later calls cb(arg, 0, bytes, len)
 * with verified bytes (a view valid during the call) or cb(arg, err, NULL, 0) — never
 * inside fetch — and sets *handle for cancel; after cancel(ctx, handle) cb does not run.
 * A non-zero return means cb will not run. */
typedef void (*am_imageinfo_blob_cb)(void *arg, int err, const char *bytes, size_t len);
typedef int (*am_imageinfo_blob_fetch_fn)(void *ctx, size_t up_idx, const char *repo,
                                          const struct am_digest *digest, size_t max,
                                          am_imageinfo_blob_cb cb, void *arg, void **handle);
typedef void (*am_imageinfo_blob_cancel_fn)(void *ctx, void *handle);
/* ctx is kept. Set before the first query. */
void am_imageinfo_set_blob_source(struct am_imageinfo *ii, am_imageinfo_blob_fetch_fn fetch,
                                  am_imageinfo_blob_cancel_fn cancel, void *ctx);

/* Counters for tests and diagnostics. */
struct am_imageinfo_stats {
    uint64_t queries;          /* am_imageinfo_get calls accepted */
    uint64_t lru_hits;         /* platform lists answered from memory */
    uint64_t parses;           /* manifests parsed (nested indexes included) */
    uint64_t nested_fetches;   /* nested indexes asked of the manifests module */
    uint64_t store_hits;       /* single-arch platforms read from the metastore */
    uint64_t config_fetches;   /* config blob requests started upstream */
    uint64_t config_coalesced; /* queries that joined a config fetch in progress */
};
void am_imageinfo_get_stats(const struct am_imageinfo *ii, struct am_imageinfo_stats *out);

#endif

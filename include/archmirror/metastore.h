/*
 * metastore — the LMDB store of manifests (by digest) and tags (tag → digest).
 *
 * Keys are scoped by upstream and repository, so one repository's content is never
 * served for another. A manifest is stored only after its bytes were hashed against
 * its digest by the caller. Reads run on the loop thread (LMDB readers never wait for
 * the writer) and return owned copies, never MDB_val views. Writes are queued to a
 * single writer on the libuv thread pool that batches puts into one transaction: the
 * event loop must never wait on an LMDB write or fsync. MDB_MAP_FULL and read-only or
 * full disks become AM_ESTORE_FULL / AM_ESTORE_READONLY, never a crash.
 *
 * Manifests are kept under a byte budget (am_metastore_set_budget): the loop keeps an
 * index of every stored manifest with its size and last read, and when the total passes
 * the high watermark the least recently read manifests are deleted, by the writer, down
 * to the low watermark. A read records its time in memory only; the times reach LMDB with
 * the writer's batches. Tags and platform records are small and are not evicted: a tag
 * whose manifest was evicted stays, and its manifest is fetched again by digest.
 *
 * On disk: <dir>/meta.lmdb and <dir>/meta.lmdb-lock (LMDB with MDB_NOSUBDIR), named
 * DBs "manifests", "tags", "platforms" (the platform of a single-arch manifest, derived
 * from its config blob), "access" (when each manifest was last read) and "meta" (schema
 * version). A store must not be opened twice
 * in one process at the same time (LMDB's rule). Key and value encodings are in
 * src/metastore.c. Upstream, repository and tag are bounded by AM_REGISTRY_MAX,
 * AM_NAME_MAX and AM_TAG_MAX and must be printable ASCII without spaces (the reference
 * module validates the real grammar first); anything else is AM_EINVAL.
 */
#ifndef ARCHMIRROR_METASTORE_H
#define ARCHMIRROR_METASTORE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "archmirror/digest.h"
#include "archmirror/manifest.h"

struct am_metastore;

/* Opens (creating, mkdir -p) <dir>/meta.lmdb with the given map size (0: LMDB's default)
 * and reads the manifests' sizes and last-read times into the index (one pass over the
 * keys; no budget yet: see am_metastore_set_budget). Synchronous: meant for startup,
 * before the loop serves requests. dir borrowed; loop kept until close's done. Returns 0
 * with *out owned (release with am_metastore_close), or AM_ESTORE (also: schema version
 * newer than this build), AM_ESTORE_READONLY, AM_ESTORE_FULL or AM_ENOMEM with msg filled
 * (msg may be NULL). */
int am_metastore_open(uv_loop_t *loop, const char *dir, uint64_t map_bytes,
                      struct am_metastore **out, char *msg, size_t msglen);

/* Sets the manifest budget: once the manifests' bytes (keys and values as stored) exceed
 * max_bytes * high_pct / 100, the least recently read (or stored) ones are deleted until
 * they are at most max_bytes * low_pct / 100. max_bytes 0: unbounded (the default). Loop
 * thread; the deletes are queued to the writer at once if the store is over the new
 * budget. Keep max_bytes well below the map size: LMDB's pages, the tags and the platform
 * records need room too (a full map still evicts, oldest first, as a last resort).
 * Returns 0, AM_EINVAL (high_pct not in 1..100, low_pct not in 1..high_pct) or
 * AM_EUNAVAILABLE (store closing). */
int am_metastore_set_budget(struct am_metastore *ms, uint64_t max_bytes, unsigned high_pct,
                            unsigned low_pct);
/* Stops accepting writes and reads (both fail with AM_EUNAVAILABLE from now on); lets
 * the queued writes commit and their callbacks run, closes the LMDB env, frees the store,
 * then calls done(arg) on the loop, never from within this call. done may be NULL. Call
 * once; takes ms. */
void am_metastore_close(struct am_metastore *ms, void (*done)(void *arg), void *arg);

struct am_manifest_rec {
    char media_type[AM_MEDIATYPE_MAX + 1];
    struct am_digest digest;
    char *bytes; /* owned (free()) */
    size_t len;
    uint64_t stored_at_ms;
};

struct am_tag_rec {
    struct am_digest digest;
    char media_type[AM_MEDIATYPE_MAX + 1];
    uint64_t size;
    uint64_t fetched_at_ms; /* wall clock, ms since epoch, of the last upstream check */
};

/* Reads, on the loop thread. Return 0, AM_ENOT_FOUND, AM_ENOMEM, AM_ESTORE (also: a
 * stored value that fails validation), AM_EINVAL (arguments out of bounds) or
 * AM_EUNAVAILABLE (store closing). Strings borrowed. out is always initialised (zeroed on
 * failure), so am_manifest_rec_cleanup is safe on every path. A manifest's bytes are
 * returned owned, with a NUL after the last byte (not counted in len). A manifest read
 * becomes the most recently used (in memory; no write). An evicted manifest is
 * AM_ENOT_FOUND from the moment its eviction is decided. */
int am_metastore_get_manifest(struct am_metastore *ms, const char *upstream, const char *repo,
                              const struct am_digest *digest, struct am_manifest_rec *out);
void am_manifest_rec_cleanup(struct am_manifest_rec *rec); /* accepts NULL */
int am_metastore_get_tag(struct am_metastore *ms, const char *upstream, const char *repo,
                         const char *tag, struct am_tag_rec *out);

/* Whether a tag checked at rec->fetched_at_ms is still fresh at now_ms: iff
 * fetched_at_ms <= now_ms and now_ms - fetched_at_ms < window_ms. A fetched_at_ms in the
 * future (the wall clock stepped back) is never fresh: the tag is revalidated once and the
 * new record carries the new clock. window_ms 0 means never fresh. */
bool am_metastore_tag_is_fresh(const struct am_tag_rec *rec, uint64_t now_ms, uint64_t window_ms);

/* Writes: copy their inputs (all borrowed), queue, and return at once: 0, AM_ENOMEM,
 * AM_EINVAL (arguments out of bounds, or a digest that am_digest_parse would not produce),
 * AM_ETOO_LARGE (manifest over AM_METASTORE_MANIFEST_MAX, or a record larger than the
 * budget's low watermark: storing it would evict everything else and then itself) or
 * AM_EUNAVAILABLE (store closing). A manifest put counts as a use, and may queue
 * evictions behind it. A put that returns an
 * error never runs cb; one that returns 0 runs it exactly once. cb (may be NULL) runs
 * later on the loop with the commit's status: 0, AM_ESTORE_FULL, AM_ESTORE_READONLY,
 * AM_ENOMEM or AM_ESTORE. Puts are committed in the order they were made; all puts of
 * one batch share one transaction and one status (a failed batch applies none of them).
 * A failed batch is logged once at WARN. Reads see a put as soon as it returned 0 (the
 * queued value is read until it is committed); if its batch then fails, later reads no
 * longer see it. */
#define AM_METASTORE_MANIFEST_MAX ((size_t)64 << 20)
typedef void (*am_metastore_cb)(void *arg, int status);
int am_metastore_put_manifest(struct am_metastore *ms, const char *upstream, const char *repo,
                              const struct am_digest *digest, const char *media_type,
                              const char *bytes, size_t len, am_metastore_cb cb, void *arg);
int am_metastore_put_tag(struct am_metastore *ms, const char *upstream, const char *repo,
                         const char *tag, const struct am_tag_rec *rec, am_metastore_cb cb,
                         void *arg);

/* The platform of a single-arch manifest, as read from its config blob (the platform
 * module's am_platform_from_config_json), keyed by (upstream, repository, manifest
 * digest). Derived data: the caller stores it only after the config blob hashed to
 * rec->config. Fields are at most AM_PLATFORM_FIELD_MAX bytes of printable ASCII
 * (0x20..0x7e); os.features are not kept. */
struct am_platform_rec {
    struct am_platform platform; /* normalised by the caller */
    struct am_digest config;     /* the config blob it was read from */
    uint64_t stored_at_ms;       /* set by the put (wall clock); ignored on input */
};
/* Read, as the other gets: 0, AM_ENOT_FOUND, AM_EINVAL, AM_ESTORE (a stored value that
 * fails validation), AM_EUNAVAILABLE; out is always initialised (zeroed on failure). */
int am_metastore_get_platform(struct am_metastore *ms, const char *upstream, const char *repo,
                              const struct am_digest *manifest, struct am_platform_rec *out);
/* Write, as the other puts (queued, batched, cb with the commit's status); AM_EINVAL also
 * for a field that is too long or not printable ASCII, or an invalid config digest. */
int am_metastore_put_platform(struct am_metastore *ms, const char *upstream, const char *repo,
                              const struct am_digest *manifest, const struct am_platform_rec *rec,
                              am_metastore_cb cb, void *arg);

/* Milliseconds since the epoch (wall clock), the unit of fetched_at_ms. */
uint64_t am_metastore_now_ms(void);

/* Counters since open, for diagnostics and tests. */
struct am_metastore_stats {
    uint64_t puts;             /* writes accepted (put returned 0) */
    uint64_t write_txns;       /* write transactions run (one per batch) */
    uint64_t committed;        /* writes whose batch committed */
    uint64_t failed;           /* writes whose batch failed */
    uint64_t manifests;        /* manifests in the index (stored, or queued to be) */
    uint64_t manifest_bytes;   /* their keys and values as stored: what the budget counts */
    uint64_t evicted;          /* manifests deleted, least recently used first, by the budget */
    uint64_t evicted_bytes;    /* ... their bytes */
    uint64_t evicted_map_full; /* manifests deleted (oldest access first) in a full map */
    uint64_t access_records;   /* last-read times written to LMDB (batched, not per read) */
};
/* Copies the counters into *out. Loop thread; ms must not yet have reached close's done. */
void am_metastore_get_stats(const struct am_metastore *ms, struct am_metastore_stats *out);

#endif

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

/* Opens (creating) <dir>/meta.lmdb with the given map size. Returns 0 with *out owned
 * (release with am_metastore_close), or AM_ESTORE/AM_ESTORE_READONLY with msg filled. */
int am_metastore_open(uv_loop_t *loop, const char *dir, uint64_t map_bytes,
                      struct am_metastore **out, char *msg, size_t msglen);
/* Stops accepting writes; calls done(arg) on the loop once queued writes are committed,
 * then frees the store. done may be NULL. */
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

/* Reads. Return 0, AM_ENOT_FOUND, AM_ENOMEM or AM_ESTORE. Strings borrowed. */
int am_metastore_get_manifest(struct am_metastore *ms, const char *upstream, const char *repo,
                              const struct am_digest *digest, struct am_manifest_rec *out);
void am_manifest_rec_cleanup(struct am_manifest_rec *rec);
int am_metastore_get_tag(struct am_metastore *ms, const char *upstream, const char *repo,
                         const char *tag, struct am_tag_rec *out);

/* Whether a tag checked at rec->fetched_at_ms is still fresh at now_ms. */
bool am_metastore_tag_is_fresh(const struct am_tag_rec *rec, uint64_t now_ms,
                               uint64_t window_ms);

/* Writes: copy their inputs, queue, and return at once (0 or AM_ENOMEM, or the error of
 * a store that is closing). cb (may be NULL) runs later on the loop with the commit's
 * status: 0, AM_ESTORE_FULL, AM_ESTORE_READONLY, AM_ESTORE. A read issued after the
 * callback sees the write; a read before it may not. */
typedef void (*am_metastore_cb)(void *arg, int status);
int am_metastore_put_manifest(struct am_metastore *ms, const char *upstream, const char *repo,
                              const struct am_digest *digest, const char *media_type,
                              const char *bytes, size_t len, am_metastore_cb cb, void *arg);
int am_metastore_put_tag(struct am_metastore *ms, const char *upstream, const char *repo,
                         const char *tag, const struct am_tag_rec *rec, am_metastore_cb cb,
                         void *arg);

/* Milliseconds since the epoch (wall clock), the unit of fetched_at_ms. */
uint64_t am_metastore_now_ms(void);

#endif

/*
 * blobflight — serves blobs from the blob store, and turns concurrent misses of one blob
 * into ONE upstream fetch that every waiting client receives as the bytes arrive.
 *
 * A flight fetches a blob from its upstream into a blob store writer (temp file, hashed
 * as it streams). Clients that are keeping up get each chunk the moment it arrives;
 * a client that falls behind, or joins late, reads the temp file from its own offset and
 * rejoins the live stream once it has caught up, so a slow client never slows the fetch
 * or the others. The last byte of every response is held back until the store has
 * verified the whole blob: when the upstream fails or the digest does not match, every
 * client's response is aborted before it looks complete, nothing becomes visible, and the
 * next request starts a fresh fetch. Hits are served from the committed file with Range
 * support. This module never blocks the loop (file reads go through the thread pool) and
 * never sends a byte the store has not at least received from the fetch it belongs to.
 */
#ifndef ARCHMIRROR_BLOBFLIGHT_H
#define ARCHMIRROR_BLOBFLIGHT_H

#include <stdbool.h>
#include <uv.h>

#include "archmirror/blobstore.h"
#include "archmirror/digest.h"
#include "archmirror/httpserver.h"
#include "archmirror/upstream.h"

struct am_blobflights;

/* bs is borrowed and must outlive the table. Returns 0 with *out owned
 * (am_blobflights_free) or AM_ENOMEM. */
int am_blobflights_new(uv_loop_t *loop, struct am_blobstore *bs, struct am_blobflights **out);

/* Cancels the fetches still running (their temp files are removed) and frees the table.
 * Call after the server has drained (no client left) and before the blob store closes. */
void am_blobflights_free(struct am_blobflights *bf);

enum am_blobflight_outcome {
    AM_BLOBFLIGHT_SERVED,  /* the exchange is taken: answered now or later */
    AM_BLOBFLIGHT_DECLINED /* not taken: stream the request through instead */
};

/* Serves GET/HEAD of digest for the client exchange ex (borrowed; taken when SERVED).
 * From the store when committed (Range honoured: 206 / 416); by joining the flight in
 * progress; or by starting one from up (borrowed) with path and scope (copied). Declines
 * HEAD and Range requests that no cached or in-flight copy can answer (the caller passes
 * them upstream), and anything when the store cannot take a new writer. */
enum am_blobflight_outcome am_blobflights_serve(struct am_blobflights *bf,
                                                struct am_http_exchange *ex, struct am_upstream *up,
                                                const char *path, const char *scope,
                                                const struct am_digest *digest);

/* Reads a small blob (at most max bytes) for an internal consumer (imageinfo's config
 * read): from the store, or by joining or starting the same single fetch that clients
 * share. cb(arg, 0, bytes, len) gets the committed (verified) bytes, a view valid during
 * the call, or cb(arg, err, NULL, 0); it never runs inside this call. Returns 0 with
 * *handle for am_blobflights_cancel_small, or an error (cb will not run). */
typedef void (*am_blobflight_small_cb)(void *arg, int err, const char *bytes, size_t len);
int am_blobflights_fetch_small(struct am_blobflights *bf, struct am_upstream *up, const char *path,
                               const char *scope, const struct am_digest *digest, size_t max,
                               am_blobflight_small_cb cb, void *arg, void **handle);
/* cb will not run for handle. */
void am_blobflights_cancel_small(struct am_blobflights *bf, void *handle);

struct am_blobflight_stats {
    uint64_t flights;        /* upstream fetches started */
    uint64_t joined;         /* clients that joined a fetch in progress */
    uint64_t hits;           /* clients served from the store */
    uint64_t failed;         /* fetches that failed (upstream, digest, store) */
    uint64_t active;         /* fetches running now */
    uint64_t sendfile_bytes; /* body bytes sent zero-copy from the page cache */
    uint64_t copied_bytes;   /* body bytes read from a file into memory, then written */
};
void am_blobflights_get_stats(const struct am_blobflights *bf, struct am_blobflight_stats *out);

#endif

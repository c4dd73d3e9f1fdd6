/*
 * pulllog — the record of completed pulls: which node, of which platform, pulled which
 * image, as a JSON-lines stream rotated by size and as aggregates in LMDB that answer
 * GET /api/v1/pulls and GET /api/v1/readiness.
 *
 * The registry decides when a pull completed and which platform pulled (X-Node-Platform,
 * the child manifest fetched after the index, or a single-arch config) and calls
 * am_pulllog_record; this module copies the record and returns. Everything that touches
 * the disk (the JSON lines, rotation, the aggregate transaction) runs in batches on the
 * libuv thread pool, one batch at a time. Queries read the aggregates on the loop thread
 * (LMDB readers never wait for the writer) and copy out.
 *
 * What this module must never do: make the loop wait on a write or an fsync, let a
 * failing disk reach the caller (a full or read-only disk drops lines and aggregates,
 * counted, logged once at WARN), grow its buffer without bound, or write half a line
 * that the next line would join.
 *
 * On disk, in <dir>:
 *   pulls.jsonl, pulls.jsonl.1 … pulls.jsonl.<keep_files>   one JSON object per line,
 *       newest file first; rotated when the next line would take pulls.jsonl past
 *       rotate_bytes (a single longer line gets a file of its own).
 *   pulls.lmdb, pulls.lmdb-lock   the aggregates (LMDB, MDB_NOSUBDIR); layout in
 *       src/pulllog.c. A pull log must not be opened twice at once (LMDB's rule).
 *
 * A JSON line (every field always present; "" where the record had none):
 *   {"time":"2024-05-01T12:00:00.123Z","client":"10.0.3.7:41234","node":"10.0.3.7",
 *    "nodePlatform":"linux/arm64","platformSource":"header","registry":"docker.io",
 *    "repository":"library/nginx","tag":"1.27","digest":"sha256:…",
 *    "platformDigest":"sha256:…","cacheHit":true,"bytes":1234,
 *    "imagePlatforms":["linux/amd64","linux/arm64"]}
 *
 * Aggregates. An "entry" is (registry, repository, tag — or @digest for a pull by
 * digest —, node platform); an "image" is the same without the platform. Each keeps the
 * pull count, cache hits, bytes, pulls per platform source, first and last pull, the
 * latest digest served and the distinct nodes (a node is the client address without its
 * port). Distinct nodes are exact up to AM_PULLLOG_NODES_EXACT per entry; beyond that the
 * count is a HyperLogLog estimate (256 registers, typically within 7%), never less than
 * AM_PULLLOG_NODES_EXACT. An image also keeps its latest known platforms (from the newest
 * record that listed any). Counts are totals since the first pull: a `since` filter
 * selects entries by their last pull, it does not window the counts.
 */
#ifndef ARCHMIRROR_PULLLOG_H
#define ARCHMIRROR_PULLLOG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

struct am_buf;
struct am_http_exchange;
struct am_pulllog;

/* Distinct nodes counted exactly per entry and per image. */
#define AM_PULLLOG_NODES_EXACT 1024u
/* Most image platforms one record may carry. */
#define AM_PULLLOG_PLATFORMS_MAX 64u
/* Longest client address ("[v6%zone]:port"). */
#define AM_PULLLOG_CLIENT_MAX 96u
/* Most entries one query answers; beyond it the answer says "truncated":true. */
#define AM_PULLLOG_QUERY_MAX_ENTRIES 10000u

struct am_pulllog_opts {
    const char *dir;            /* borrowed; created (mkdir -p) when missing */
    uint64_t rotate_bytes;      /* 0: never rotate */
    uint32_t keep_files;        /* rotated files kept; 0: pulls.jsonl is removed on rotation */
    uint64_t map_bytes;         /* LMDB map size; 0: LMDB's default (10 MiB) */
    uint64_t flush_interval_ms; /* longest a record waits to be written; 0: write at once */
    uint64_t flush_bytes;       /* buffered record bytes that start a write at once */
    uint64_t max_buffer_bytes;  /* records beyond this (waiting + being written) are
                                 * refused; 0: the default */
};

/* Fills *o with the defaults: dir NULL, rotate_bytes 64 MiB, keep_files 5, map_bytes
 * 256 MiB, flush_interval_ms 1000, flush_bytes 64 KiB, max_buffer_bytes 16 MiB. */
void am_pulllog_opts_init(struct am_pulllog_opts *o);

/* Opens (creating) <dir>/pulls.jsonl for appending and <dir>/pulls.lmdb, and removes
 * rotated files numbered above keep_files (left by an earlier, larger setting).
 * Synchronous: meant for startup. opts borrowed; loop kept until close's done. Returns 0
 * with *out owned (release with am_pulllog_close), or AM_EINVAL (dir NULL or empty),
 * AM_ESTORE_READONLY, AM_ESTORE_FULL, AM_ESTORE (also: a schema version newer than this
 * build) or AM_ENOMEM, with msg filled (msg may be NULL). */
int am_pulllog_open(uv_loop_t *loop, const struct am_pulllog_opts *opts, struct am_pulllog **out,
                    char *msg, size_t msglen);
/* Stops accepting records and flushes (both fail with AM_EUNAVAILABLE from now on),
 * writes the buffered records and commits their aggregates, runs pending flush
 * callbacks, closes the files, frees pl, then calls done(arg) on the loop, never from
 * within this call. done may be NULL. Call once. Queries made from a flush callback that
 * runs during close get AM_EUNAVAILABLE. */
void am_pulllog_close(struct am_pulllog *pl, void (*done)(void *arg), void *arg);

/* Which evidence named the node's platform. */
enum am_pulllog_source {
    AM_PULLLOG_SOURCE_UNKNOWN = 0,    /* "unknown": node_platform is "" */
    AM_PULLLOG_SOURCE_HEADER,         /* "header": X-Node-Platform */
    AM_PULLLOG_SOURCE_CHILD_MANIFEST, /* "child-manifest": the child fetched after the index */
    AM_PULLLOG_SOURCE_CONFIG,         /* "config": a single-arch image's config */
};
/* "unknown", "header", "child-manifest", "config"; "unknown" for values out of range. */
const char *am_pulllog_source_name(enum am_pulllog_source s);

/* One completed pull. All pointers borrowed for the call. */
struct am_pulllog_record {
    uint64_t time_ms;          /* wall clock, ms since the epoch; 0: now */
    const char *client;        /* peer "10.0.3.7:41234" / "[fd00::7]:41234"; NULL or "" */
    const char *node_platform; /* "linux/arm64"; NULL or "" when unknown. Normalised here. */
    enum am_pulllog_source platform_source;
    const char *registry;        /* "docker.io" (required) */
    const char *repository;      /* "library/nginx" (required) */
    const char *tag;             /* "1.27"; NULL or "" when pulled by digest */
    const char *digest;          /* the top manifest or index served (required) */
    const char *platform_digest; /* the child manifest; NULL or "" for single-arch */
    bool cache_hit;
    uint64_t bytes;                     /* manifest bytes served in this pull */
    const char *const *image_platforms; /* the platforms the image ships; may be NULL */
    size_t n_image_platforms;           /* 0: unknown (a known list is kept, not erased) */
};

/* Copies *r, queues it and returns at once: 0, or (the record is then dropped and
 * counted in refused; callers may ignore the result, serving never depends on it)
 * AM_EINVAL (registry, repository or digest missing; a string over its reference.h
 * bound or with bytes outside 0x21..0x7e; a digest am_digest_parse refuses; a platform
 * am_platform_parse refuses; more than AM_PULLLOG_PLATFORMS_MAX platforms; a source out
 * of range),
 * AM_ETOO_LARGE (max_buffer_bytes reached: the disk is behind; logged once at WARN),
 * AM_ENOMEM, or AM_EUNAVAILABLE (closing). Platforms are normalised (am_platform_parse
 * then am_platform_format_all) and image platforms deduplicated, order kept; without a
 * node_platform the source is recorded as AM_PULLLOG_SOURCE_UNKNOWN. The record
 * reaches the file and the aggregates with the next batch: at most flush_interval_ms
 * later, at once past flush_bytes, or at am_pulllog_flush / close. */
int am_pulllog_record(struct am_pulllog *pl, const struct am_pulllog_record *r);

/* Writes and commits every record accepted before this call, then calls cb(arg) on the
 * loop (never from within this call) whatever the outcome. Returns 0 (cb will run
 * exactly once), AM_ENOMEM or AM_EUNAVAILABLE (closing; cb never runs). */
int am_pulllog_flush(struct am_pulllog *pl, void (*cb)(void *arg), void *arg);

/* Serves GET (and HEAD) /api/v1/pulls and /api/v1/readiness. Returns false, touching
 * nothing, when the request's path is neither; true otherwise, and the exchange is then
 * the pull log's until it responds (it first flushes, so the answer includes every pull
 * recorded before the request). pl may be NULL (the pull log failed to open): the two
 * paths then get 503. Other methods get 405 with Allow: GET, HEAD; bad parameters 400.
 * Error bodies are {"error":{"code":"BAD_REQUEST","message":"since: …"}}, the code being
 * am_error_name of the error and the status its am_error_http_status. */
bool am_pulllog_handle(struct am_pulllog *pl, struct am_http_exchange *ex);

/* The two answers as JSON appended to out (the caller's buffer, with its own max), for
 * the query string query[0..len) (after '?', %XX-decoded here; '+' is kept as '+') at
 * wall clock now_ms. Loop thread; reads the committed aggregates only (flush first for
 * the latest). Return 0, AM_EBAD_REQUEST with a one-line reason in msg (msg may be NULL;
 * out unchanged), AM_ETOO_LARGE (out's max), AM_ENOMEM, AM_ESTORE or AM_EUNAVAILABLE
 * (closing, or pl NULL: the query is then only checked, which is what a fuzz target of
 * the parameter parser wants). Unknown, repeated or over-long (512 bytes) parameters are
 * AM_EBAD_REQUEST; an empty value is the same as none.
 *
 * since: RFC 3339 ("2024-05-01T12:00:00Z", "…+02:00", fractions allowed; also a bare
 * date "2024-05-01" = its midnight UTC), unix seconds ("1714564800"), or a duration back
 * from now in am_config_parse_duration_ms syntax ("24h", "90m", "1h30m").
 *
 * /api/v1/pulls — parameters since, arch, platform, image:
 *   arch      an architecture ("arm64", "aarch64", "amd64", "arm"): entries whose
 *             platform has it, any variant ("arm64" matches linux/arm64 and linux/arm64/v9)
 *   platform  an exact platform after normalisation ("linux/arm/v7", "linux/arm64/v8")
 *   image     with an explicit tag or digest ("nginx:1.27", "ghcr.io/o/r@sha256:…"):
 *             that reference exactly, normalised like docker (docker.io/library/…);
 *             otherwise a substring of "registry/repository" ("nginx", "docker.io/library/")
 *   → {"since":<RFC 3339 or null>,"truncated":false,"pulls":[{"image":"docker.io/library/nginx",
 *      "tag":"1.27","digest":"sha256:…","platform":"linux/arm64","pulls":3,"nodes":2,
 *      "cacheHits":2,"bytes":4096,"sources":{"header":3,"child-manifest":0,"config":0,
 *      "unknown":0},"firstPull":"…Z","lastPull":"…Z"}]}
 *   sorted by image, tag, platform; "tag" is "" for pulls by digest; "platform" is
 *   "unknown" for pulls whose node platform was unknown.
 *
 * /api/v1/readiness — parameters target (required; an am_platform_parse specifier),
 * since, image (as above):
 *   → {"target":"linux/arm64","since":…,"truncated":false,
 *      "images":[{"image":"docker.io/library/foo:1.0","tag":"1.0","digest":"sha256:…",
 *        "platforms":["linux/amd64"],"pulls":5,"nodes":3,"firstPull":"…","lastPull":"…"}],
 *      "unknown":[… same fields, "platforms":[] …]}
 *   "images": every image pulled in the window none of whose known platforms a node of
 *   the target would pull (am_platform_matches and am_platform_features_match, i.e.
 *   containerd's matcher: an arm64 target accepts arm/v8…v5, an amd64 target 386);
 *   "unknown": the images whose platforms were never recorded. Both sorted by pulls,
 *   most first, then by image; pulls and nodes count every node platform. "image" is
 *   the reference ("registry/repository:tag" or "registry/repository@digest"). */
int am_pulllog_query_pulls(struct am_pulllog *pl, const char *query, size_t len, uint64_t now_ms,
                           struct am_buf *out, char *msg, size_t msglen);
int am_pulllog_query_readiness(struct am_pulllog *pl, const char *query, size_t len,
                               uint64_t now_ms, struct am_buf *out, char *msg, size_t msglen);

/* Counters since open, for metrics and tests. */
struct am_pulllog_stats {
    uint64_t recorded;           /* am_pulllog_record returned 0 */
    uint64_t refused;            /* am_pulllog_record returned an error */
    uint64_t lines_written;      /* JSON lines written to pulls.jsonl */
    uint64_t lines_dropped;      /* lines lost to a failed open, write or rotation */
    uint64_t aggregated;         /* records whose aggregate transaction committed */
    uint64_t aggregates_dropped; /* records whose aggregate transaction failed */
    uint64_t batches;            /* writes run on the thread pool */
    uint64_t rotations;          /* pulls.jsonl rotated */
    uint64_t corrupt;            /* stored aggregates found corrupt (restarted or skipped) */
};
/* Copies the counters into *out. Loop thread; pl must not yet have reached close's done. */
void am_pulllog_get_stats(const struct am_pulllog *pl, struct am_pulllog_stats *out);

#endif

/*
 * metrics — process-wide counters and histograms, rendered in the Prometheus text
 * exposition format for GET /metrics.
 *
 * Everything is counted on the loop thread (plain integers, no atomics); thread-pool
 * workers never touch it. Label sets that come from the outside world (upstream names,
 * platforms, image names) are bounded: past AM_METRICS_MAX_LABELS distinct values, new
 * ones are counted under "other", so a hostile client cannot grow memory.
 */
#ifndef ARCHMIRROR_METRICS_H
#define ARCHMIRROR_METRICS_H

#include <stdbool.h>
#include <stdint.h>

struct am_buf;

#define AM_METRICS_MAX_LABELS 512

enum am_metrics_route {
    AM_MR_BASE = 0,
    AM_MR_MANIFEST,
    AM_MR_BLOB,
    AM_MR_API,
    AM_MR_HEALTH,
    AM_MR_METRICS,
    AM_MR_OTHER,
    AM_MR_N_
};

/* Classifies a request path (no query) for the route label. */
enum am_metrics_route am_metrics_route_of(const char *path);

void am_metrics_count_request(enum am_metrics_route route, int status, uint64_t bytes,
                              uint64_t duration_ns);
void am_metrics_count_cache(bool blob, bool hit);
/* One upstream request that ended; error: transport failure or status >= 500/429. */
void am_metrics_count_upstream(const char *upstream, bool error, uint64_t duration_ns);
void am_metrics_count_pull(const char *platform);
void am_metrics_count_mismatch(const char *image, const char *platform);
/* The manifest cache (metastore): n manifests evicted, by the budget (least recently used)
 * or, map_full, because the LMDB map filled; and its size now (max_bytes 0: unbounded). */
void am_metrics_count_manifest_evictions(bool map_full, uint64_t n);
void am_metrics_set_manifest_cache(uint64_t bytes, uint64_t manifests, uint64_t max_bytes);

/* Appends extra gauge lines (store sizes…) at render time; arg is kept. Returns 0 or an
 * AM_E* from the buffer. */
typedef int (*am_metrics_gauges_fn)(void *arg, struct am_buf *out);

/* Appends the whole exposition to out. Returns 0, AM_ENOMEM or AM_ETOO_LARGE. */
int am_metrics_render(struct am_buf *out, am_metrics_gauges_fn gauges, void *arg);

/* Zeroes everything (tests). */
void am_metrics_reset(void);

#endif

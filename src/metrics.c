/* metrics — counters and histograms for /metrics; see include/archmirror/metrics.h. */
#include "archmirror/metrics.h"

#include <stdio.h>
#include <string.h>

#include "archmirror/buf.h"
#include "archmirror/error.h"

/* Request latency buckets, in seconds (upper bounds; +Inf is implicit). */
static const double buckets[] = {0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30};
#define N_BUCKETS (sizeof buckets / sizeof buckets[0])
#define N_STATUS  600

struct histogram {
    uint64_t counts[N_BUCKETS + 1];
    uint64_t n;
    double sum;
};

/* A bounded set of label values with one counter (and a histogram) each. */
struct labeled {
    char names[AM_METRICS_MAX_LABELS][160];
    uint64_t values[AM_METRICS_MAX_LABELS + 1]; /* last: "other" */
    uint64_t errors[AM_METRICS_MAX_LABELS + 1];
    struct histogram hist[AM_METRICS_MAX_LABELS + 1];
    size_t n;
};

static const char *const route_names[AM_MR_N_] = {"base",   "manifest", "blob", "api",
                                                  "health", "metrics",  "other"};

static struct {
    uint64_t requests[AM_MR_N_][N_STATUS];
    uint64_t bytes[AM_MR_N_];
    struct histogram latency[AM_MR_N_];
    uint64_t cache[2][2]; /* [blob][hit] */
    struct labeled upstreams;
    struct labeled pulls;
    struct labeled mismatches;
    uint64_t manifest_evictions[2]; /* [map_full] */
    uint64_t manifest_bytes, manifest_count, manifest_max_bytes;
} m;

void am_metrics_reset(void)
{
    memset(&m, 0, sizeof m);
}

static void observe(struct histogram *h, uint64_t ns)
{
    double s = (double)ns / 1e9;
    size_t i = 0;
    while (i < N_BUCKETS && s > buckets[i]) i++;
    h->counts[i]++;
    h->n++;
    h->sum += s;
}

/* The slot for a label value; "other" once the set is full. */
static size_t slot(struct labeled *l, const char *name)
{
    for (size_t i = 0; i < l->n; i++)
        if (strcmp(l->names[i], name) == 0) return i;
    if (l->n == AM_METRICS_MAX_LABELS || strlen(name) >= sizeof l->names[0])
        return AM_METRICS_MAX_LABELS;
    snprintf(l->names[l->n], sizeof l->names[0], "%s", name);
    return l->n++;
}

enum am_metrics_route am_metrics_route_of(const char *path)
{
    if (strncmp(path, "/v2", 3) == 0) {
        if (strstr(path, "/manifests/")) return AM_MR_MANIFEST;
        if (strstr(path, "/blobs/")) return AM_MR_BLOB;
        return path[3] == '\0' || strcmp(path + 3, "/") == 0 ? AM_MR_BASE : AM_MR_OTHER;
    }
    if (strncmp(path, "/api/", 5) == 0) return AM_MR_API;
    if (strcmp(path, "/metrics") == 0) return AM_MR_METRICS;
    if (strcmp(path, "/healthz") == 0 || strcmp(path, "/readyz") == 0) return AM_MR_HEALTH;
    return AM_MR_OTHER;
}

void am_metrics_count_request(enum am_metrics_route route, int status, uint64_t bytes,
                              uint64_t duration_ns)
{
    if ((unsigned)route >= AM_MR_N_) route = AM_MR_OTHER;
    if (status < 0 || status >= N_STATUS) status = 0;
    m.requests[route][status]++;
    m.bytes[route] += bytes;
    observe(&m.latency[route], duration_ns);
}

void am_metrics_count_cache(bool blob, bool hit)
{
    m.cache[blob][hit]++;
}

void am_metrics_count_upstream(const char *upstream, bool error, uint64_t duration_ns)
{
    size_t i = slot(&m.upstreams, upstream);
    m.upstreams.values[i]++;
    if (error) m.upstreams.errors[i]++;
    observe(&m.upstreams.hist[i], duration_ns);
}

void am_metrics_count_pull(const char *platform)
{
    m.pulls.values[slot(&m.pulls, platform)]++;
}

void am_metrics_count_mismatch(const char *image, const char *platform)
{
    char key[160];
    snprintf(key, sizeof key, "%s\x1f%s", image, platform);
    m.mismatches.values[slot(&m.mismatches, key)]++;
}

void am_metrics_count_manifest_evictions(bool map_full, uint64_t n)
{
    m.manifest_evictions[map_full] += n;
}

void am_metrics_set_manifest_cache(uint64_t bytes, uint64_t manifests, uint64_t max_bytes)
{
    m.manifest_bytes = bytes;
    m.manifest_count = manifests;
    m.manifest_max_bytes = max_bytes;
}

/* Label values are written with \\, " and newline escaped (exposition format). */
static int append_label(struct am_buf *b, const char *s, size_t n)
{
    int rc = 0;
    for (size_t i = 0; i < n && !rc; i++) {
        char c = s[i];
        if (c == '\\' || c == '"')
            rc = am_buf_appendf(b, "\\%c", c);
        else if (c == '\n')
            rc = am_buf_append_str(b, "\\n");
        else
            rc = am_buf_append(b, &c, 1);
    }
    return rc;
}

static int render_histogram(struct am_buf *b, const char *name, const char *lname,
                            const char *lvalue, const struct histogram *h)
{
    int rc = 0;
    uint64_t cum = 0;
    for (size_t i = 0; i <= N_BUCKETS && !rc; i++) {
        cum += h->counts[i];
        if (i < N_BUCKETS)
            rc = am_buf_appendf(b, "%s_bucket{%s=\"%s\",le=\"%g\"} %llu\n", name, lname, lvalue,
                                buckets[i], (unsigned long long)cum);
        else
            rc = am_buf_appendf(b, "%s_bucket{%s=\"%s\",le=\"+Inf\"} %llu\n", name, lname, lvalue,
                                (unsigned long long)cum);
    }
    if (!rc)
        rc = am_buf_appendf(b, "%s_sum{%s=\"%s\"} %.6f\n%s_count{%s=\"%s\"} %llu\n", name, lname,
                            lvalue, h->sum, name, lname, lvalue, (unsigned long long)h->n);
    return rc;
}

static int render_labeled(struct am_buf *b, const struct labeled *l, const char *name,
                          const char *help, const char *lname)
{
    int rc = am_buf_appendf(b, "# HELP %s %s\n# TYPE %s counter\n", name, help, name);
    for (size_t i = 0; i <= AM_METRICS_MAX_LABELS && !rc; i++) {
        if (i >= l->n && i != AM_METRICS_MAX_LABELS) continue;
        if (i == AM_METRICS_MAX_LABELS && !l->values[i]) break;
        const char *v = i < l->n ? l->names[i] : "other";
        rc = am_buf_appendf(b, "%s{%s=\"", name, lname);
        if (!rc) rc = append_label(b, v, strlen(v));
        if (!rc) rc = am_buf_appendf(b, "\"} %llu\n", (unsigned long long)l->values[i]);
    }
    return rc;
}

static int render_mismatches(struct am_buf *b)
{
    const struct labeled *l = &m.mismatches;
    const char *name = "archmirror_platform_mismatch_total";
    int rc = am_buf_appendf(b,
                            "# HELP %s Pulls of a tag with no variant for the node's platform.\n"
                            "# TYPE %s counter\n",
                            name, name);
    for (size_t i = 0; i < l->n && !rc; i++) {
        const char *sep = strchr(l->names[i], '\x1f');
        if (!sep) continue;
        rc = am_buf_appendf(b, "%s{image=\"", name);
        if (!rc) rc = append_label(b, l->names[i], (size_t)(sep - l->names[i]));
        if (!rc) rc = am_buf_append_str(b, "\",platform=\"");
        if (!rc) rc = append_label(b, sep + 1, strlen(sep + 1));
        if (!rc) rc = am_buf_appendf(b, "\"} %llu\n", (unsigned long long)l->values[i]);
    }
    if (!rc && l->values[AM_METRICS_MAX_LABELS])
        rc = am_buf_appendf(b, "%s{image=\"other\",platform=\"other\"} %llu\n", name,
                            (unsigned long long)l->values[AM_METRICS_MAX_LABELS]);
    return rc;
}

int am_metrics_render(struct am_buf *out, am_metrics_gauges_fn gauges, void *arg)
{
    int rc = am_buf_append_str(out, "# HELP archmirror_requests_total Client requests by route "
                                    "and status.\n# TYPE archmirror_requests_total counter\n");
    for (int r = 0; r < AM_MR_N_ && !rc; r++)
        for (int s = 0; s < N_STATUS && !rc; s++)
            if (m.requests[r][s])
                rc = am_buf_appendf(out,
                                    "archmirror_requests_total{route=\"%s\",code=\"%d\"} %llu\n",
                                    route_names[r], s, (unsigned long long)m.requests[r][s]);
    if (!rc)
        rc = am_buf_append_str(out, "# HELP archmirror_served_bytes_total Response body bytes "
                                    "by route.\n# TYPE archmirror_served_bytes_total counter\n");
    for (int r = 0; r < AM_MR_N_ && !rc; r++)
        rc = am_buf_appendf(out, "archmirror_served_bytes_total{route=\"%s\"} %llu\n",
                            route_names[r], (unsigned long long)m.bytes[r]);
    if (!rc)
        rc = am_buf_append_str(out, "# HELP archmirror_request_duration_seconds Time to answer "
                                    "a request.\n# TYPE archmirror_request_duration_seconds "
                                    "histogram\n");
    for (int r = 0; r < AM_MR_N_ && !rc; r++)
        if (m.latency[r].n)
            rc = render_histogram(out, "archmirror_request_duration_seconds", "route",
                                  route_names[r], &m.latency[r]);
    if (!rc)
        rc = am_buf_append_str(out, "# HELP archmirror_cache_requests_total Cache lookups by "
                                    "kind and result.\n# TYPE archmirror_cache_requests_total "
                                    "counter\n");
    for (int kind = 0; kind < 2 && !rc; kind++)
        for (int hit = 0; hit < 2 && !rc; hit++)
            rc = am_buf_appendf(out,
                                "archmirror_cache_requests_total{kind=\"%s\",result=\"%s\"} %llu\n",
                                kind ? "blob" : "manifest", hit ? "hit" : "miss",
                                (unsigned long long)m.cache[kind][hit]);
    if (!rc)
        rc = render_labeled(out, &m.upstreams, "archmirror_upstream_requests_total",
                            "Requests to upstream registries.", "upstream");
    if (!rc)
        rc = am_buf_append_str(out, "# HELP archmirror_upstream_errors_total Upstream requests "
                                    "that failed (transport, 5xx, 429).\n# TYPE "
                                    "archmirror_upstream_errors_total counter\n");
    for (size_t i = 0; i < m.upstreams.n && !rc; i++) {
        rc = am_buf_append_str(out, "archmirror_upstream_errors_total{upstream=\"");
        if (!rc) rc = append_label(out, m.upstreams.names[i], strlen(m.upstreams.names[i]));
        if (!rc) rc = am_buf_appendf(out, "\"} %llu\n", (unsigned long long)m.upstreams.errors[i]);
    }
    if (!rc)
        rc = am_buf_append_str(out, "# HELP archmirror_upstream_request_duration_seconds Upstream "
                                    "request time.\n# TYPE "
                                    "archmirror_upstream_request_duration_seconds histogram\n");
    for (size_t i = 0; i < m.upstreams.n && !rc; i++)
        rc = render_histogram(out, "archmirror_upstream_request_duration_seconds", "upstream",
                              m.upstreams.names[i], &m.upstreams.hist[i]);
    if (!rc)
        rc = render_labeled(out, &m.pulls, "archmirror_pulls_total",
                            "Completed pulls by node platform.", "platform");
    if (!rc) rc = render_mismatches(out);
    if (!rc)
        rc = am_buf_appendf(
            out,
            "# HELP archmirror_manifest_cache_bytes Bytes of cached manifests (keys and values as "
            "stored).\n# TYPE archmirror_manifest_cache_bytes gauge\n"
            "archmirror_manifest_cache_bytes %llu\n"
            "# HELP archmirror_manifest_cache_max_bytes The manifest cache's budget "
            "(cache.manifest_max_size; 0: unbounded).\n"
            "# TYPE archmirror_manifest_cache_max_bytes gauge\n"
            "archmirror_manifest_cache_max_bytes %llu\n"
            "# HELP archmirror_manifest_cache_manifests Cached manifests.\n"
            "# TYPE archmirror_manifest_cache_manifests gauge\n"
            "archmirror_manifest_cache_manifests %llu\n"
            "# HELP archmirror_manifest_cache_evictions_total Manifests evicted: lru to stay in "
            "budget, map_full when the LMDB map filled.\n"
            "# TYPE archmirror_manifest_cache_evictions_total counter\n"
            "archmirror_manifest_cache_evictions_total{reason=\"lru\"} %llu\n"
            "archmirror_manifest_cache_evictions_total{reason=\"map_full\"} %llu\n",
            (unsigned long long)m.manifest_bytes, (unsigned long long)m.manifest_max_bytes,
            (unsigned long long)m.manifest_count, (unsigned long long)m.manifest_evictions[0],
            (unsigned long long)m.manifest_evictions[1]);
    if (!rc && gauges) rc = gauges(arg, out);
    return rc;
}

/*
 * registry — the /v2 pull API: routing to an upstream, the manifest cache policy and
 * blob stream-through. See include/archmirror/registry.h.
 *
 * DESIGN. Every request that needs the upstream becomes a `struct pull`, which lives
 * until both its client exchange has ended (answered, or the client went away) and its
 * upstream request has finished (on_done ran, or it was cancelled). Manifests are
 * buffered whole (bounded by cache.max_manifest_size), hashed, parsed, stored, then
 * answered; blobs are hashed as they stream and the client connection is aborted if the
 * digest does not match at the end, so a client never holds a complete-looking wrong
 * body. Cache writes go to the metastore's writer thread; nothing here waits for them.
 */
#include "archmirror/registry.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "archmirror/blobflight.h"
#include "archmirror/buf.h"
#include "archmirror/digest.h"
#include "archmirror/error.h"
#include "archmirror/log.h"
#include "archmirror/manifest.h"
#include "archmirror/manifests.h"
#include "archmirror/mediatype.h"
#include "archmirror/metrics.h"
#include "archmirror/diagnostics.h"
#include "archmirror/imageinfo.h"
#include "archmirror/platform.h"
#include "archmirror/platformapi.h"
#include "archmirror/pulllog.h"
#include "archmirror/pulltrack.h"
#include "archmirror/route.h"
#include "archmirror/upstream.h"

#define ACCEPT_MAX 4096
/* A client that reads slower than the upstream sends pauses the upstream above this. */
#define BLOB_HIGH_WATER (1u << 20)
#define API_VERSION_HDR "Docker-Distribution-API-Version"
#define API_VERSION     "registry/2.0"

struct am_registry {
    uv_loop_t *loop;
    const struct am_config *cfg;
    struct am_metastore *ms;
    struct am_blobstore *bs;                          /* borrowed; NULL without a blob store */
    struct am_pulllog *pl;                            /* borrowed; NULL when the pull log is off */
    struct am_blobflights *bf;                        /* owned; NULL without a blob store */
    struct am_manifests *mf;                          /* owned */
    struct am_imageinfo *ii;                          /* owned */
    struct am_platformapi *api;                       /* owned */
    struct am_pulltrack *pt;                          /* owned */
    bool admin_separate;                              /* admin paths only on the admin listener */
    char *admin_token;                                /* owned secret or NULL */
    struct am_upstream *ups[AM_CONFIG_MAX_UPSTREAMS]; /* owned; index = cfg->upstreams */
    size_t n_ups;
};

/* A blob request that no stored or in-flight copy answers, streamed through. */
struct pull {
    struct am_registry *reg;
    struct am_http_exchange *ex;  /* borrowed; NULL once the exchange has ended */
    struct am_upstream_req *ureq; /* NULL once finished or cancelled */
    size_t up_idx;
    bool client_head;
    char ctx[48]; /* log context "c1 r2" */
    char repo[AM_NAME_MAX + 1];
    struct am_digest digest;
    char range[128];

    /* Upstream response head. */
    int up_status;
    bool got_head;
    char retry_after[32];
    char content_range[96];
    int64_t up_len;

    struct am_hasher hasher;
    bool hashing;
    bool started; /* blob response head sent */
    bool paused;
    uint64_t received; /* blob body bytes from upstream */
    bool holding;      /* the final byte is held back until the digest is verified */
    char held;
};

/* --- small helpers ------------------------------------------------------------------ */

static void copy_view(char *dst, size_t cap, const char *s, size_t len)
{
    if (len >= cap) len = cap - 1;
    memcpy(dst, s, len);
    dst[len] = '\0';
}

static struct am_http_header hdr(const char *name, const char *value)
{
    struct am_http_header h = {name, strlen(name), value, strlen(value)};
    return h;
}

/* Joins every Accept header line into one list, as RFC 9110 §5.3 allows. */
static int join_accept(const struct am_http_request *req, char *out, size_t cap)
{
    size_t len = 0;
    out[0] = '\0';
    for (size_t i = 0; i < req->n_headers; i++) {
        const struct am_http_header *h = &req->headers[i];
        if (!am_http_token_eq(h->name, h->name_len, "accept")) continue;
        if (len + h->value_len + 3 > cap) return AM_EHEADERS_TOO_LARGE;
        if (len) {
            memcpy(out + len, ", ", 2);
            len += 2;
        }
        memcpy(out + len, h->value, h->value_len);
        len += h->value_len;
        out[len] = '\0';
    }
    return 0;
}

static int respond_error(struct am_http_exchange *ex, int err, const char *message)
{
    struct am_http_header h[] = {hdr(API_VERSION_HDR, API_VERSION)};
    return am_http_respond_error(ex, err, NULL, message, h, 1);
}

/* Sends a manifest (or only its head): the stored bytes, never re-serialised. */
static void respond_manifest(struct am_http_exchange *ex, const char *media_type,
                             const struct am_digest *digest, const char *bytes, size_t len,
                             const char *cache_state)
{
    char etag[AM_DIGEST_STR_MAX + 3];
    snprintf(etag, sizeof etag, "\"%s\"", digest->str);
    struct am_http_header h[] = {
        hdr("Content-Type", media_type),
        hdr("Docker-Content-Digest", digest->str),
        hdr("ETag", etag),
        hdr(API_VERSION_HDR, API_VERSION),
        hdr("X-Archmirror-Cache", cache_state),
    };
    am_http_respond(ex, 200, NULL, h, sizeof h / sizeof h[0], bytes, len);
}

static bool accept_allows(struct am_http_exchange *ex, const char *accept, const char *mt)
{
    if (am_mediatype_accepts(accept, strlen(accept), mt)) return true;
    char msg[AM_MEDIATYPE_MAX + 96];
    snprintf(msg, sizeof msg, "manifest is %s, which the request's Accept header excludes", mt);
    respond_error(ex, AM_EMANIFEST_UNKNOWN, msg);
    return false;
}

/* --- pull lifetime ------------------------------------------------------------------ */

static void pull_free(struct pull *p)
{
    if (p->hashing) am_hasher_cleanup(&p->hasher);
    free(p);
}

static void pull_maybe_free(struct pull *p)
{
    if (!p->ex && !p->ureq) pull_free(p);
}

static void on_client_gone(void *arg)
{
    struct pull *p = arg;
    AM_DEBUG("%s client went away during %s", p->ctx, p->repo);
    p->ex = NULL;
    if (p->ureq) {
        am_upstream_req_cancel(p->ureq);
        p->ureq = NULL;
    }
    pull_maybe_free(p);
}

static void on_client_drain(void *arg)
{
    struct pull *p = arg;
    if (p->paused && p->ureq) {
        p->paused = false;
        am_upstream_req_resume(p->ureq);
    }
}

static void pull_respond_error(struct pull *p, int err, const char *message)
{
    if (!p->ex) return;
    if (err == AM_ETOOMANYREQUESTS && p->retry_after[0]) {
        struct am_http_header h[] = {hdr(API_VERSION_HDR, API_VERSION),
                                     hdr("Retry-After", p->retry_after)};
        am_http_respond_error(p->ex, err, NULL, message, h, 2);
    } else {
        respond_error(p->ex, err, message);
    }
    p->ex = NULL;
}

static const struct am_upstream_cbs pull_cbs;

/* Starts the upstream request for p. On failure answers the client and returns the
 * error; the caller then releases p with pull_maybe_free. */
static int pull_start(struct pull *p, const char *method, const char *path)
{
    struct am_registry *reg = p->reg;
    char scope[AM_NAME_MAX + 32];
    snprintf(scope, sizeof scope, "repository:%s:pull", p->repo);
    struct am_upstream_request_opts o = {
        .method = method,
        .path = path,
        .range = p->range[0] ? p->range : NULL,
        .scope = scope,
    };
    int rc = am_upstream_request(reg->ups[p->up_idx], &o, &pull_cbs, p, &p->ureq);
    if (rc) {
        p->ureq = NULL;
        AM_WARN("%s upstream %s %s: %s", p->ctx, method, path, am_error_message(rc));
        pull_respond_error(p, rc, NULL);
    }
    return rc;
}

/* --- upstream callbacks ------------------------------------------------------------- */

static void on_up_head(void *arg, const struct am_upstream_response *r)
{
    struct pull *p = arg;
    const struct am_http_header *h;
    p->got_head = true;
    p->up_status = r->status;
    p->up_len = r->content_length;
    if ((h = am_http_header_find(r->headers, r->n_headers, "retry-after")))
        copy_view(p->retry_after, sizeof p->retry_after, h->value, h->value_len);
    if ((h = am_http_header_find(r->headers, r->n_headers, "content-range")))
        copy_view(p->content_range, sizeof p->content_range, h->value, h->value_len);

    /* A success head starts the client response right away so the bytes stream. */
    if (!p->ex || (r->status != 200 && r->status != 206)) return;
    if (r->content_length < 0) return; /* answered in on_done as a protocol error */
    struct am_http_header out[6];
    size_t n = 0;
    out[n++] = hdr("Content-Type", "application/octet-stream");
    out[n++] = hdr("Docker-Content-Digest", p->digest.str);
    out[n++] = hdr("Accept-Ranges", "bytes");
    out[n++] = hdr(API_VERSION_HDR, API_VERSION);
    out[n++] = hdr("X-Archmirror-Cache", "miss");
    if (r->status == 206 && p->content_range[0]) out[n++] = hdr("Content-Range", p->content_range);
    if (am_http_start(p->ex, r->status, NULL, out, n, (uint64_t)r->content_length) != 0) return;
    p->started = true;
    /* A range cannot be checked against the whole blob's digest; a full body is. */
    if (r->status == 200 && !p->client_head) {
        if (am_hasher_init(&p->hasher, p->digest.alg) == 0) p->hashing = true;
    }
}

static void on_up_body(void *arg, const char *data, size_t len)
{
    struct pull *p = arg;
    if (p->up_status != 200 && p->up_status != 206) return; /* error bodies are dropped */
    if (p->hashing) am_hasher_update(&p->hasher, data, len);
    p->received += len;
    if (!p->ex || !p->started) return;
    /* With Content-Length the last byte completes the response in the client's eyes, so
     * it is sent only once the whole body has been verified (finish_blob). */
    if (p->hashing && len > 0 && p->up_len >= 0 && p->received == (uint64_t)p->up_len) {
        p->holding = true;
        p->held = data[len - 1];
        len--;
    }
    if (len && am_http_write(p->ex, data, len) != 0) return;
    if (!p->paused && am_http_queued(p->ex) > BLOB_HIGH_WATER && p->ureq) {
        p->paused = true;
        am_upstream_req_pause(p->ureq);
    }
}

static void finish_blob(struct pull *p, int err)
{
    if (!p->ex) return;
    if (!p->started) {
        if (err) {
            pull_respond_error(p, err, NULL);
        } else if (p->up_status == 200 || p->up_status == 206) {
            pull_respond_error(p, AM_EUPSTREAM_PROTOCOL,
                               "upstream sent a blob without Content-Length");
        } else {
            pull_respond_error(p, am_error_from_upstream_status(p->up_status, true), NULL);
        }
        return;
    }
    if (err) {
        AM_WARN("%s blob %s@%s: upstream failed mid-body: %s", p->ctx, p->repo, p->digest.str,
                am_error_message(err));
        am_http_abort(p->ex);
        p->ex = NULL;
        return;
    }
    if (p->hashing) {
        struct am_digest got;
        am_hasher_final(&p->hasher, &got);
        am_hasher_cleanup(&p->hasher);
        p->hashing = false;
        if (!am_digest_equal(&got, &p->digest)) {
            AM_ERROR("%s blob %s@%s: upstream bytes hash to %s; connection aborted", p->ctx,
                     p->repo, p->digest.str, got.str);
            am_http_abort(p->ex);
            p->ex = NULL;
            return;
        }
    }
    if (p->holding && am_http_write(p->ex, &p->held, 1) != 0) {
        am_http_abort(p->ex);
        p->ex = NULL;
        return;
    }
    am_http_end(p->ex);
    p->ex = NULL;
}

static void on_up_done(void *arg, int err)
{
    struct pull *p = arg;
    p->ureq = NULL;
    finish_blob(p, err);
    pull_maybe_free(p);
}

static const struct am_upstream_cbs pull_cbs = {on_up_head, on_up_body, on_up_done};

/* --- request handling --------------------------------------------------------------- */

static struct pull *pull_new(struct am_registry *reg, struct am_http_exchange *ex,
                             const struct am_http_request *req, size_t up_idx, const char *repo)
{
    struct pull *p = calloc(1, sizeof *p);
    if (!p) return NULL;
    p->reg = reg;
    p->ex = ex;
    p->up_idx = up_idx;
    p->client_head = req->is_head;
    snprintf(p->ctx, sizeof p->ctx, "c%llu r%llu", (unsigned long long)req->conn_id,
             (unsigned long long)req->id);
    copy_view(p->repo, sizeof p->repo, repo, strlen(repo));
    am_http_set_callbacks(ex, on_client_drain, on_client_gone, p);
    return p;
}

/* Picks the upstream for a request; answers DENIED itself when there is none. */
static int pick_upstream(struct am_registry *reg, struct am_http_exchange *ex,
                         const struct am_route *rt, size_t *idx)
{
    const char *name = rt->has_ns ? rt->ns : reg->cfg->default_upstream;
    /* containerd treats docker.io and its API host as one registry; so do we. */
    if (rt->has_ns &&
        (strcmp(name, "registry-1.docker.io") == 0 || strcmp(name, "index.docker.io") == 0))
        name = "docker.io";
    for (size_t i = 0; i < reg->cfg->n_upstreams; i++) {
        if (strcmp(reg->cfg->upstreams[i].name, name) == 0) {
            *idx = i;
            return 0;
        }
    }
    char msg[AM_REGISTRY_MAX + 64];
    snprintf(msg, sizeof msg, "registry \"%s\" is not an upstream of this mirror", name);
    respond_error(ex, AM_ENS_DENIED, msg);
    return AM_ENS_DENIED;
}

/* A client waiting for a manifest answer. */
struct mreq {
    struct am_registry *reg;
    struct am_http_exchange *ex;
    struct am_manifests_waiter *waiter;  /* while the manifest query runs */
    struct am_imageinfo_waiter *iwaiter; /* while the enforce check runs */
    struct am_manifests_query q;         /* its strings point into this struct */
    char repo[AM_NAME_MAX + 1];
    char tag[AM_TAG_MAX + 1];
    struct am_digest digest;
    char ctx[48];
    char peer[AM_PULLLOG_CLIENT_MAX];
    struct am_platform node[AM_DIAG_NODE_MAX]; /* X-Node-Platform */
    size_t n_node;
    char accept[ACCEPT_MAX];
};

static void on_mreq_gone(void *arg)
{
    struct mreq *m = arg;
    am_manifests_cancel(m->waiter);
    am_imageinfo_cancel(m->iwaiter);
    free(m);
}

/* Answers a manifest query's result to one client, with its own Accept negotiation. */
static void answer_manifest(struct am_http_exchange *ex, const char *accept,
                            const struct am_manifests_result *r)
{
    if (r->err) {
        if (r->err == AM_ETOOMANYREQUESTS && r->retry_after && r->retry_after[0]) {
            struct am_http_header h[] = {hdr(API_VERSION_HDR, API_VERSION),
                                         hdr("Retry-After", r->retry_after)};
            am_http_respond_error(ex, r->err, NULL, r->message, h, 2);
        } else {
            respond_error(ex, r->err, r->message);
        }
        return;
    }
    if (!accept_allows(ex, accept, r->media_type)) return;
    if (r->bytes) {
        respond_manifest(ex, r->media_type, r->digest, r->bytes, r->size, r->cache_state);
        return;
    }
    /* Only the head is known (a HEAD by tag): same headers, no body. */
    char etag[AM_DIGEST_STR_MAX + 3];
    snprintf(etag, sizeof etag, "\"%s\"", r->digest->str);
    struct am_http_header h[] = {
        hdr("Content-Type", r->media_type),
        hdr("Docker-Content-Digest", r->digest->str),
        hdr("ETag", etag),
        hdr(API_VERSION_HDR, API_VERSION),
        hdr("X-Archmirror-Cache", r->cache_state),
    };
    if (am_http_start(ex, 200, NULL, h, sizeof h / sizeof h[0], r->size) == 0) am_http_end(ex);
}

static void image_ref(const struct am_registry *reg, size_t up_idx, const char *repo,
                      const char *tag, char *out, size_t cap)
{
    snprintf(out, cap, "%s/%s%s%s", reg->cfg->upstreams[up_idx].name, repo, tag ? ":" : "",
             tag ? tag : "");
}

static struct am_pulltrack_event event_of(const struct mreq *m, const struct am_digest *d,
                                          const char *media_type, uint64_t size, const char *bytes,
                                          bool hit)
{
    struct am_pulltrack_event ev = {
        .peer = m->peer,
        .node = m->node,
        .n_node = m->n_node,
        .up_idx = m->q.up_idx,
        .repo = m->repo,
        .tag = m->q.tag,
        .media_type = media_type,
        .digest = d,
        .bytes = bytes,
        .size = size,
        .cache_hit = hit,
    };
    return ev;
}

/* Whether the node can run the image; when it cannot, logs, counts and records it. */
static bool judge(struct am_registry *reg, const struct mreq *m,
                  const struct am_imageinfo_image *img, char *reason)
{
    struct am_platform has[AM_IMAGEINFO_PLATFORMS_MAX];
    for (size_t i = 0; i < img->n_platforms; i++) has[i] = img->platforms[i].platform;
    if (am_diagnostics_runnable(m->node, m->n_node, has, img->n_platforms)) return true;
    char ref[AM_REGISTRY_MAX + AM_NAME_MAX + AM_TAG_MAX + 4], node[AM_PLATFORM_FORMAT_SIZE];
    image_ref(reg, m->q.up_idx, m->repo, m->q.tag, ref, sizeof ref);
    am_platform_format(&m->node[0], node, sizeof node);
    am_diagnostics_reason(ref, &m->node[0], has, img->n_platforms, reason);
    AM_WARN("%s %s: %s", m->ctx, m->peer, reason);
    am_metrics_count_mismatch(ref, node);
    /* The pull log gets the attempt when no completed pull will record it: a refused tag,
     * or an index with no variant for the node (containerd gives up after the index). A
     * single-arch image in warn mode is pulled anyway and recorded when it completes. */
    if (reg->cfg->diagnostics == AM_DIAG_ENFORCE || img->is_index) {
        struct am_pulltrack_event ev = event_of(m, &img->digest, img->media_type, 0, NULL, true);
        am_pulltrack_record_mismatch(reg->pt, &ev, img);
    }
    return false;
}

/* warn mode: the pull was answered; judge it in the background, once the image's
 * platforms are known (from the caches, or fetched once). */
struct warn_check {
    struct am_registry *reg;
    struct mreq m;
};

static void on_warn_checked(void *arg, const struct am_imageinfo_result *r)
{
    struct warn_check *wc = arg;
    char reason[AM_DIAG_REASON_MAX + 1];
    if (!r->err && r->image) judge(wc->reg, &wc->m, r->image, reason);
    free(wc);
}

static void warn_check(struct am_registry *reg, const struct mreq *m, const struct am_digest *d)
{
    struct am_imageinfo_image img;
    char reason[AM_DIAG_REASON_MAX + 1];
    if (am_imageinfo_lookup_cached(reg->ii, m->q.up_idx, m->repo, d, &img) == 0) {
        judge(reg, m, &img, reason);
        return;
    }
    struct warn_check *wc = malloc(sizeof *wc);
    if (!wc) return;
    wc->reg = reg;
    wc->m = *m;
    wc->m.ex = NULL;
    wc->m.q.repo = wc->m.repo;
    wc->m.q.tag = wc->m.tag;
    struct am_imageinfo_query iq = {
        .up_idx = m->q.up_idx, .repo = wc->m.repo, .digest = d, .log_ctx = m->ctx};
    struct am_imageinfo_waiter *w;
    if (am_imageinfo_get(reg->ii, &iq, on_warn_checked, wc, &w) != 0) free(wc);
    /* No handle is kept: the check outlives the client; am_imageinfo_free answers it. */
}

static void on_mreq_result(void *arg, const struct am_manifests_result *r)
{
    struct mreq *m = arg;
    struct am_registry *reg = m->reg;
    m->waiter = NULL;
    bool hit = !r->err && strcmp(r->cache_state, "miss") != 0;
    if (!r->err) am_metrics_count_cache(false, hit);
    answer_manifest(m->ex, m->accept, r);
    if (!r->err) {
        struct am_pulltrack_event ev =
            event_of(m, r->digest, r->media_type, r->size, r->bytes, hit);
        if (reg->pt) am_pulltrack_observe(reg->pt, &ev);
        if (m->q.tag && m->n_node && reg->cfg->diagnostics == AM_DIAG_WARN && reg->ii)
            warn_check(reg, m, r->digest);
    }
    free(m);
}

/* Asks the manifest cache; the answer goes to on_mreq_result. */
static void mreq_run(struct mreq *m)
{
    struct am_manifests_waiter *w;
    struct am_http_exchange *ex = m->ex;
    int rc = am_manifests_get(m->reg->mf, &m->q, on_mreq_result, m, &w);
    if (rc) {
        free(m);
        respond_error(ex, rc, NULL);
        return;
    }
    if (!w) return; /* answered already: on_mreq_result freed m */
    m->waiter = w;
    am_http_set_callbacks(ex, NULL, on_mreq_gone, m);
}

/* enforce mode: a tag the node cannot run is refused with 409 and the diagnosis in the
 * reason phrase — the only server text containerd shows for a tag HEAD. */
static void on_enforce_checked(void *arg, const struct am_imageinfo_result *r)
{
    struct mreq *m = arg;
    m->iwaiter = NULL;
    char reason[AM_DIAG_REASON_MAX + 1];
    if (!r->err && r->image && !judge(m->reg, m, r->image, reason)) {
        struct am_platform has[AM_IMAGEINFO_PLATFORMS_MAX];
        for (size_t i = 0; i < r->image->n_platforms; i++) has[i] = r->image->platforms[i].platform;
        char ref[AM_REGISTRY_MAX + AM_NAME_MAX + AM_TAG_MAX + 4];
        image_ref(m->reg, m->q.up_idx, m->repo, m->q.tag, ref, sizeof ref);
        char *body =
            am_diagnostics_body(ref, m->node, m->n_node, has, r->image->n_platforms, reason);
        struct am_http_header h[] = {hdr("Content-Type", "application/json"),
                                     hdr(API_VERSION_HDR, API_VERSION)};
        if (body)
            am_http_respond(m->ex, 409, reason, h, 2, body, strlen(body));
        else
            am_http_respond_error(m->ex, AM_EDENIED, reason, reason, h + 1, 1);
        free(body);
        free(m);
        return;
    }
    /* Runnable, or not judgeable (the manifest query reports its own errors). */
    mreq_run(m);
}

static void handle_manifest(struct am_registry *reg, struct am_http_exchange *ex,
                            const struct am_http_request *req, const struct am_route *rt,
                            size_t up_idx, const char *repo, const char *accept)
{
    struct mreq *m = calloc(1, sizeof *m);
    if (!m) {
        respond_error(ex, AM_ENOMEM, NULL);
        return;
    }
    m->reg = reg;
    m->ex = ex;
    snprintf(m->ctx, sizeof m->ctx, "c%llu r%llu", (unsigned long long)req->conn_id,
             (unsigned long long)req->id);
    snprintf(m->peer, sizeof m->peer, "%s", req->peer);
    snprintf(m->repo, sizeof m->repo, "%s", repo);
    snprintf(m->accept, sizeof m->accept, "%s", accept);
    if (rt->by_digest)
        m->digest = rt->digest;
    else
        snprintf(m->tag, sizeof m->tag, "%s", rt->tag);
    m->q = (struct am_manifests_query){
        .up_idx = up_idx,
        .repo = m->repo,
        .tag = rt->by_digest ? NULL : m->tag,
        .digest = rt->by_digest ? &m->digest : NULL,
        .need_body = !req->is_head,
        .log_ctx = m->ctx,
    };
    if (reg->cfg->diagnostics != AM_DIAG_OFF)
        m->n_node =
            am_diagnostics_node_platforms(req->headers, req->n_headers, m->node, AM_DIAG_NODE_MAX);
    if (!rt->by_digest && m->n_node && reg->cfg->diagnostics == AM_DIAG_ENFORCE && reg->ii) {
        struct am_imageinfo_query iq = {
            .up_idx = up_idx, .repo = m->repo, .tag = m->tag, .log_ctx = m->ctx};
        struct am_imageinfo_waiter *w;
        if (am_imageinfo_get(reg->ii, &iq, on_enforce_checked, m, &w) == 0) {
            if (w) {
                m->iwaiter = w;
                am_http_set_callbacks(ex, NULL, on_mreq_gone, m);
            }
            return; /* on_enforce_checked answers (it may have run already) */
        }
    }
    mreq_run(m);
}

static void handle_blob(struct am_registry *reg, struct am_http_exchange *ex,
                        const struct am_http_request *req, const struct am_route *rt, size_t up_idx,
                        const char *repo)
{
    char path[AM_NAME_MAX + AM_DIGEST_STR_MAX + 32];
    snprintf(path, sizeof path, "/v2/%s/blobs/%s", repo, rt->digest.str);
    if (reg->bf) {
        char scope[AM_NAME_MAX + 32];
        snprintf(scope, sizeof scope, "repository:%s:pull", repo);
        if (am_blobflights_serve(reg->bf, ex, reg->ups[up_idx], path, scope, &rt->digest) ==
            AM_BLOBFLIGHT_SERVED)
            return;
    }
    /* No cached or in-flight copy can answer (a cold HEAD or Range, or no store): pass
     * the request through, checking the digest of a whole body on the way. */
    struct pull *p = pull_new(reg, ex, req, up_idx, repo);
    if (!p) {
        respond_error(ex, AM_ENOMEM, NULL);
        return;
    }
    p->digest = rt->digest;
    size_t rlen;
    const char *range = am_http_req_header(ex, "range", &rlen);
    if (range) {
        if (rlen >= sizeof p->range) {
            pull_respond_error(p, AM_ERANGE, "Range header too long");
            pull_maybe_free(p);
            return;
        }
        copy_view(p->range, sizeof p->range, range, rlen);
    }
    if (pull_start(p, req->is_head ? "HEAD" : "GET", path)) pull_maybe_free(p);
}

/* Store sizes, read at scrape time. */
static int append_gauges(void *arg, struct am_buf *out)
{
    struct am_registry *reg = arg;
    if (!reg->bs) return 0;
    struct am_blobstore_stats st;
    am_blobstore_get_stats(reg->bs, &st);
    if (reg->bf) {
        struct am_blobflight_stats fs;
        am_blobflights_get_stats(reg->bf, &fs);
        int rc = am_buf_appendf(
            out,
            "# HELP archmirror_blob_file_bytes_total Blob body bytes sent from files, by how: "
            "sendfile (zero-copy from the page cache) or copy (read on the thread pool, then "
            "written).\n"
            "# TYPE archmirror_blob_file_bytes_total counter\n"
            "archmirror_blob_file_bytes_total{path=\"sendfile\"} %llu\n"
            "archmirror_blob_file_bytes_total{path=\"copy\"} %llu\n",
            (unsigned long long)fs.sendfile_bytes, (unsigned long long)fs.copied_bytes);
        if (rc) return rc;
    }
    return am_buf_appendf(
        out,
        "# HELP archmirror_cache_bytes Bytes of cached blobs.\n"
        "# TYPE archmirror_cache_bytes gauge\narchmirror_cache_bytes %llu\n"
        "# HELP archmirror_cache_max_bytes The blob cache's budget (cache.max_size).\n"
        "# TYPE archmirror_cache_max_bytes gauge\narchmirror_cache_max_bytes %llu\n"
        "# HELP archmirror_cache_blobs Cached blobs.\n"
        "# TYPE archmirror_cache_blobs gauge\narchmirror_cache_blobs %llu\n"
        "# HELP archmirror_cache_evictions_total Blobs evicted to stay in budget.\n"
        "# TYPE archmirror_cache_evictions_total counter\narchmirror_cache_evictions_total %llu\n",
        (unsigned long long)st.bytes_used, (unsigned long long)reg->cfg->blob_max_bytes,
        (unsigned long long)st.blobs, (unsigned long long)st.evictions);
}

static void respond_metrics(struct am_registry *reg, struct am_http_exchange *ex)
{
    struct am_buf b;
    am_buf_init(&b, 8u << 20);
    int rc = am_metrics_render(&b, append_gauges, reg);
    if (rc) {
        am_buf_cleanup(&b);
        respond_error(ex, rc, "metrics too large");
        return;
    }
    struct am_http_header h[] = {hdr("Content-Type", "text/plain; version=0.0.4")};
    am_http_respond(ex, 200, NULL, h, 1, b.data, b.len);
    am_buf_cleanup(&b);
}

void am_registry_on_complete(void *ctx, const struct am_http_request *req, int status,
                             uint64_t body_bytes, bool completed, uint64_t duration_ns)
{
    (void)ctx;
    am_metrics_count_request(am_metrics_route_of(req->path), status, body_bytes, duration_ns);
    AM_DEBUG("c%llu r%llu %s %s %d %llu bytes %.3f ms%s", (unsigned long long)req->conn_id,
             (unsigned long long)req->id, req->method, req->path, status,
             (unsigned long long)body_bytes, (double)duration_ns / 1e6,
             completed ? "" : " (aborted)");
}

static bool is_admin_path(const char *path)
{
    return strcmp(path, "/metrics") == 0 || strncmp(path, "/api/", 5) == 0;
}

/* Constant-time comparison: a token check must not tell how much of a guess was right. */
static bool token_ok(const struct am_registry *reg, const struct am_http_exchange *ex)
{
    size_t len;
    const char *v = am_http_req_header(ex, "authorization", &len);
    if (!v || len < 7 || strncasecmp(v, "Bearer ", 7) != 0) return false;
    v += 7;
    len -= 7;
    size_t want = strlen(reg->admin_token);
    unsigned diff = (unsigned)(len ^ want);
    for (size_t i = 0; i < len && i < want; i++) diff |= (unsigned)(v[i] ^ reg->admin_token[i]);
    return diff == 0;
}

/* The admin side: metrics and the JSON API. Returns false when path is not admin. */
static bool handle_admin(struct am_registry *reg, struct am_http_exchange *ex,
                         const struct am_http_request *req)
{
    if (!is_admin_path(req->path)) return false;
    if (reg->admin_token && !token_ok(reg, ex)) {
        struct am_http_header h[] = {hdr("WWW-Authenticate", "Bearer realm=\"archmirror-admin\"")};
        AM_INFO("c%llu r%llu %s %s: missing or wrong admin token", (unsigned long long)req->conn_id,
                (unsigned long long)req->id, req->method, req->path);
        am_http_respond_error(ex, AM_EUNAUTHORIZED, NULL, "the admin API needs its bearer token", h,
                              1);
        return true;
    }
    if (strcmp(req->path, "/metrics") == 0) {
        respond_metrics(reg, ex);
        return true;
    }
    if (am_platformapi_owns(req->path, req->path_len)) {
        am_platformapi_handle(reg->api, ex);
        return true;
    }
    if (am_pulllog_handle(reg->pl, ex)) return true;
    respond_error(ex, AM_ENOT_FOUND, "no such admin endpoint");
    return true;
}

/* Probes answer on every listener, without a token. */
static bool handle_health(struct am_registry *reg, struct am_http_exchange *ex,
                          const struct am_http_request *req)
{
    struct am_http_header h[] = {hdr("Content-Type", "text/plain")};
    if (strcmp(req->path, "/healthz") == 0) {
        am_http_respond(ex, 200, NULL, h, 1, "ok\n", 3);
        return true;
    }
    if (strcmp(req->path, "/readyz") != 0) return false;
    /* Ready means the cache store answers reads: probe it with a key that never exists.
     * A draining server has already stopped accepting. */
    struct am_tag_rec probe;
    int prc = am_metastore_get_tag(reg->ms, "readyz", "readyz", "readyz", &probe);
    if (prc == 0 || prc == AM_ENOT_FOUND)
        am_http_respond(ex, 200, NULL, h, 1, "ready\n", 6);
    else
        am_http_respond(ex, 503, NULL, h, 1, "cache store unavailable\n", 24);
    return true;
}

void am_registry_handle_admin(void *ctx, struct am_http_exchange *ex)
{
    struct am_registry *reg = ctx;
    const struct am_http_request *req = am_http_request_of(ex);
    if (handle_health(reg, ex, req) || handle_admin(reg, ex, req)) return;
    respond_error(ex, AM_ENOT_FOUND, "this is the admin listener: /metrics, /api/v1/...");
}

int am_registry_set_admin(struct am_registry *reg, bool separate, const char *token)
{
    reg->admin_separate = separate;
    if (!token) return 0;
    reg->admin_token = strdup(token);
    return reg->admin_token ? 0 : AM_ENOMEM;
}

void am_registry_handle(void *ctx, struct am_http_exchange *ex)
{
    struct am_registry *reg = ctx;
    const struct am_http_request *req = am_http_request_of(ex);
    struct am_route rt;
    char msg[256];

    if (handle_health(reg, ex, req)) return;
    if (is_admin_path(req->path)) {
        if (reg->admin_separate)
            respond_error(ex, AM_ENOT_FOUND, "served on the admin listener");
        else
            handle_admin(reg, ex, req);
        return;
    }

    int rc =
        am_route_parse(req->path, req->path_len, req->query, req->query_len, &rt, msg, sizeof msg);
    if (rc) {
        AM_INFO("c%llu r%llu %s %s: %s", (unsigned long long)req->conn_id,
                (unsigned long long)req->id, req->method, req->path, msg);
        respond_error(ex, rc, msg);
        return;
    }
    if (rt.kind == AM_ROUTE_NONE || rt.kind == AM_ROUTE_UNKNOWN_V2) {
        respond_error(ex, AM_ENOT_FOUND, "no such endpoint on this registry mirror");
        return;
    }
    bool read_method = strcmp(req->method, "GET") == 0 || req->is_head;
    if (!read_method || rt.kind == AM_ROUTE_UPLOAD) {
        /* A pull-through mirror takes no pushes (OCI distribution spec: UNSUPPORTED). */
        struct am_http_header h[] = {hdr(API_VERSION_HDR, API_VERSION), hdr("Allow", "GET, HEAD")};
        am_http_respond_error(ex, AM_EUNSUPPORTED, NULL,
                              "archmirror is a read-only pull-through mirror", h, 2);
        return;
    }
    if (rt.kind == AM_ROUTE_BASE) {
        struct am_http_header h[] = {hdr("Content-Type", "application/json"),
                                     hdr(API_VERSION_HDR, API_VERSION)};
        am_http_respond(ex, 200, NULL, h, 2, "{}", 2);
        return;
    }
    if (rt.kind == AM_ROUTE_TAGS || rt.kind == AM_ROUTE_REFERRERS) {
        respond_error(ex, AM_EUNSUPPORTED, "this endpoint is not served by the mirror");
        return;
    }

    size_t up_idx;
    if (pick_upstream(reg, ex, &rt, &up_idx)) return;
    char repo[AM_NAME_MAX + 1];
    if ((rc = am_route_upstream_name(reg->cfg->upstreams[up_idx].name, rt.name, repo,
                                     sizeof repo))) {
        respond_error(ex, rc, "repository name too long");
        return;
    }

    if (rt.kind == AM_ROUTE_BLOB) {
        handle_blob(reg, ex, req, &rt, up_idx, repo);
        return;
    }
    char accept[ACCEPT_MAX];
    if ((rc = join_accept(req, accept, sizeof accept))) {
        respond_error(ex, rc, "Accept header too long");
        return;
    }
    handle_manifest(reg, ex, req, &rt, up_idx, repo, accept);
}

/* imageinfo's blob source: configs come through the blob cache's single fetch. */
static int blob_source_fetch(void *ctx, size_t up_idx, const char *repo,
                             const struct am_digest *digest, size_t max, am_imageinfo_blob_cb cb,
                             void *arg, void **handle)
{
    struct am_registry *reg = ctx;
    char path[AM_NAME_MAX + AM_DIGEST_STR_MAX + 32], scope[AM_NAME_MAX + 32];
    snprintf(path, sizeof path, "/v2/%s/blobs/%s", repo, digest->str);
    snprintf(scope, sizeof scope, "repository:%s:pull", repo);
    return am_blobflights_fetch_small(reg->bf, reg->ups[up_idx], path, scope, digest, max, cb, arg,
                                      handle);
}

static void blob_source_cancel(void *ctx, void *handle)
{
    struct am_registry *reg = ctx;
    am_blobflights_cancel_small(reg->bf, handle);
}

int am_registry_new(uv_loop_t *loop, const struct am_config *cfg, struct am_metastore *ms,
                    struct am_blobstore *bs, struct am_pulllog *pl, struct am_registry **out,
                    char *msg, size_t msglen)
{
    struct am_registry *reg = calloc(1, sizeof *reg);
    if (!reg) return AM_ENOMEM;
    reg->loop = loop;
    reg->cfg = cfg;
    reg->ms = ms;
    reg->bs = bs;
    reg->pl = pl;
    if (bs && am_blobflights_new(loop, bs, &reg->bf)) {
        free(reg);
        return AM_ENOMEM;
    }
    if (am_manifests_new(cfg, ms, reg->ups, &reg->mf) ||
        am_imageinfo_new(loop, cfg, ms, reg->mf, reg->ups, &reg->ii) ||
        am_platformapi_new(reg->ii, cfg, &reg->api) ||
        am_pulltrack_new(cfg, reg->ii, pl, &reg->pt)) {
        am_registry_free(reg);
        return AM_ENOMEM;
    }
    if (reg->bf) am_imageinfo_set_blob_source(reg->ii, blob_source_fetch, blob_source_cancel, reg);
    struct am_upstream_opts o = {
        .connect_timeout_ms = cfg->upstream_connect_timeout_ms,
        .header_timeout_ms = cfg->upstream_header_timeout_ms,
        .idle_timeout_ms = cfg->upstream_idle_timeout_ms,
        .pool_size = cfg->upstream_pool_size,
        .max_redirects = cfg->max_redirects,
        .allow_private_redirects = cfg->allow_private_redirects,
    };
    for (size_t i = 0; i < cfg->n_upstreams; i++) {
        int rc = am_upstream_new(loop, &cfg->upstreams[i], &o, &reg->ups[i], msg, msglen);
        if (rc) {
            am_registry_free(reg);
            return rc;
        }
        reg->n_ups = i + 1;
    }
    *out = reg;
    return 0;
}

void am_registry_free(struct am_registry *reg)
{
    if (!reg) return;
    if (reg->admin_token) {
        explicit_bzero(reg->admin_token, strlen(reg->admin_token));
        free(reg->admin_token);
    }
    if (reg->api) am_platformapi_free(reg->api);
    /* imageinfo first: it answers the pull tracker's deferred records with AM_ECANCELED
     * and cancels its config reads from the blob flights; then the flights, then the
     * manifests and the upstreams they all use. */
    am_imageinfo_free(reg->ii);
    am_pulltrack_free(reg->pt);
    am_blobflights_free(reg->bf);
    am_manifests_free(reg->mf);
    for (size_t i = 0; i < reg->n_ups; i++) am_upstream_free(reg->ups[i]);
    free(reg);
}

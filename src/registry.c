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

#include "archmirror/blobflight.h"
#include "archmirror/buf.h"
#include "archmirror/digest.h"
#include "archmirror/error.h"
#include "archmirror/log.h"
#include "archmirror/manifest.h"
#include "archmirror/mediatype.h"
#include "archmirror/route.h"
#include "archmirror/upstream.h"

#define ACCEPT_MAX 4096
/* A client that reads slower than the upstream sends pauses the upstream above this. */
#define BLOB_HIGH_WATER (1u << 20)
#define API_VERSION_HDR "Docker-Distribution-API-Version"
#define API_VERSION "registry/2.0"

struct am_registry {
    uv_loop_t *loop;
    const struct am_config *cfg;
    struct am_metastore *ms;
    struct am_blobflights *bf; /* owned; NULL without a blob store */
    struct am_upstream *ups[AM_CONFIG_MAX_UPSTREAMS]; /* owned; index = cfg->upstreams */
    size_t n_ups;
};

enum pull_kind {
    PULL_MANIFEST_DIGEST, /* GET upstream by digest, verify, store */
    PULL_TAG_GET,         /* GET upstream by tag, verify, store manifest + tag */
    PULL_TAG_HEAD,        /* HEAD upstream by tag (cold HEAD or revalidation) */
    PULL_BLOB,            /* stream a blob through */
};

struct pull {
    struct am_registry *reg;
    struct am_http_exchange *ex; /* borrowed; NULL once the exchange has ended */
    struct am_upstream_req *ureq; /* NULL once finished or cancelled */
    size_t up_idx;
    enum pull_kind kind;
    bool client_head;
    char ctx[48]; /* log context "c1 r2" */

    char repo[AM_NAME_MAX + 1];
    char tag[AM_TAG_MAX + 1];
    struct am_digest digest; /* requested digest (by-digest pulls and blobs) */
    char accept[ACCEPT_MAX];
    char range[128];

    /* What the tag pointed at before, for revalidation and stale serving. */
    bool have_stale;
    struct am_tag_rec stale;

    /* Upstream response head. */
    int up_status;
    bool got_head;
    char content_type[AM_MEDIATYPE_MAX + 1];
    bool has_up_digest;
    struct am_digest up_digest;
    char retry_after[32];
    char content_range[96];
    int64_t up_len;

    struct am_buf body; /* manifests */
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
        hdr("Content-Type", media_type), hdr("Docker-Content-Digest", digest->str),
        hdr("ETag", etag),               hdr(API_VERSION_HDR, API_VERSION),
        hdr("X-Archmirror-Cache", cache_state),
    };
    am_http_respond(ex, 200, NULL, h, sizeof h / sizeof h[0], bytes, len);
}

/* A HEAD answered from a tag record alone: no body needed, the length is known. */
static void respond_tag_head(struct am_http_exchange *ex, const struct am_tag_rec *rec,
                             const char *cache_state)
{
    char etag[AM_DIGEST_STR_MAX + 3];
    snprintf(etag, sizeof etag, "\"%s\"", rec->digest.str);
    struct am_http_header h[] = {
        hdr("Content-Type", rec->media_type), hdr("Docker-Content-Digest", rec->digest.str),
        hdr("ETag", etag),                    hdr(API_VERSION_HDR, API_VERSION),
        hdr("X-Archmirror-Cache", cache_state),
    };
    /* am_http_start+end on a HEAD sends the head with this Content-Length and no body. */
    if (am_http_start(ex, 200, NULL, h, sizeof h / sizeof h[0], rec->size) == 0)
        am_http_end(ex);
}

static bool accept_allows(struct am_http_exchange *ex, const char *accept, const char *mt)
{
    if (am_mediatype_accepts(accept, strlen(accept), mt)) return true;
    char msg[AM_MEDIATYPE_MAX + 96];
    snprintf(msg, sizeof msg, "manifest is %s, which the request's Accept header excludes",
             mt);
    respond_error(ex, AM_EMANIFEST_UNKNOWN, msg);
    return false;
}

/* Serves a manifest from the metastore if it is there. Returns true when the exchange was
 * answered (with the manifest or an Accept refusal). */
static bool serve_cached_manifest(struct am_registry *reg, struct am_http_exchange *ex,
                                  const char *upstream, const char *repo,
                                  const struct am_digest *digest, const char *accept,
                                  const char *cache_state)
{
    struct am_manifest_rec rec;
    int rc = am_metastore_get_manifest(reg->ms, upstream, repo, digest, &rec);
    if (rc != 0) {
        if (rc != AM_ENOT_FOUND) AM_WARN("metastore read %s@%s: %s", repo, digest->str,
                                         am_error_message(rc));
        return false;
    }
    if (accept_allows(ex, accept, rec.media_type))
        respond_manifest(ex, rec.media_type, &rec.digest, rec.bytes, rec.len, cache_state);
    am_manifest_rec_cleanup(&rec);
    return true;
}

/* Maps an upstream's final non-success status to the error a client should see. */
static int error_for_status(int status, bool blob)
{
    switch (status) {
    case 401: return AM_EUNAUTHORIZED;
    case 403: return AM_EDENIED;
    case 404: return blob ? AM_EBLOB_UNKNOWN : AM_EMANIFEST_UNKNOWN;
    case 416: return AM_ERANGE;
    case 429: return AM_ETOOMANYREQUESTS;
    case 504: return AM_EUPSTREAM_TIMEOUT;
    default: return AM_EUPSTREAM;
    }
}

/* Whether an upstream failure allows serving a cached tag stale: the upstream is
 * unreachable or overloaded, not saying "this tag is gone". */
static bool may_serve_stale(int err, int status)
{
    if (err) return err != AM_ECANCELED;
    return status == 429 || status >= 500;
}

/* --- pull lifetime ------------------------------------------------------------------ */

static void pull_free(struct pull *p)
{
    am_buf_cleanup(&p->body);
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
        .accept = p->kind == PULL_BLOB ? NULL : AM_MEDIATYPE_ACCEPT_ALL,
        .range = p->range[0] ? p->range : NULL,
        .scope = scope,
    };
    p->got_head = false;
    p->has_up_digest = false;
    p->content_type[0] = p->retry_after[0] = p->content_range[0] = '\0';
    am_buf_reset(&p->body);
    int rc = am_upstream_request(reg->ups[p->up_idx], &o, &pull_cbs, p, &p->ureq);
    if (rc) {
        p->ureq = NULL;
        AM_WARN("%s upstream %s %s: %s", p->ctx, method, path, am_error_message(rc));
        pull_respond_error(p, rc, NULL);
    }
    return rc;
}

static int pull_start_manifest(struct pull *p, enum pull_kind kind, const char *ref)
{
    char path[AM_NAME_MAX + AM_DIGEST_STR_MAX + 32];
    snprintf(path, sizeof path, "/v2/%s/manifests/%s", p->repo, ref);
    p->kind = kind;
    return pull_start(p, kind == PULL_TAG_HEAD ? "HEAD" : "GET", path);
}

/* --- upstream callbacks ------------------------------------------------------------- */

static void on_up_head(void *arg, const struct am_upstream_response *r)
{
    struct pull *p = arg;
    const struct am_http_header *h;
    p->got_head = true;
    p->up_status = r->status;
    p->up_len = r->content_length;
    if ((h = am_http_header_find(r->headers, r->n_headers, "content-type")))
        copy_view(p->content_type, sizeof p->content_type, h->value, h->value_len);
    if ((h = am_http_header_find(r->headers, r->n_headers, "docker-content-digest")))
        p->has_up_digest = am_digest_parse(h->value, h->value_len, &p->up_digest) == 0;
    if ((h = am_http_header_find(r->headers, r->n_headers, "retry-after")))
        copy_view(p->retry_after, sizeof p->retry_after, h->value, h->value_len);
    if ((h = am_http_header_find(r->headers, r->n_headers, "content-range")))
        copy_view(p->content_range, sizeof p->content_range, h->value, h->value_len);

    if (p->kind != PULL_BLOB) {
        if (r->status == 200 && r->content_length >= 0 &&
            (uint64_t)r->content_length > p->reg->cfg->max_manifest_bytes)
            AM_WARN("%s upstream manifest of %s is %lld bytes, above the limit", p->ctx,
                    p->repo, (long long)r->content_length);
        return;
    }

    /* Blobs: a success head starts the client response right away so the bytes stream. */
    if (!p->ex || (r->status != 200 && r->status != 206)) return;
    if (r->content_length < 0) return; /* answered in on_done as a protocol error */
    char lenbuf[32];
    snprintf(lenbuf, sizeof lenbuf, "%lld", (long long)r->content_length);
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
    if (p->kind != PULL_BLOB) {
        int rc = am_buf_append(&p->body, data, len);
        if (rc && p->ureq) {
            /* Too large: finishing the pull as an error is done in on_done's path. */
            am_upstream_req_cancel(p->ureq);
            p->ureq = NULL;
            AM_WARN("%s upstream manifest of %s exceeds %llu bytes", p->ctx, p->repo,
                    (unsigned long long)p->reg->cfg->max_manifest_bytes);
            pull_respond_error(p, rc == AM_ETOO_LARGE ? AM_ETOO_LARGE : rc, NULL);
            pull_maybe_free(p);
        }
        return;
    }
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
            pull_respond_error(p, error_for_status(p->up_status, true), NULL);
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

static void store_tag(struct pull *p, const struct am_digest *d, const char *media_type,
                      uint64_t size)
{
    struct am_tag_rec rec;
    memset(&rec, 0, sizeof rec);
    rec.digest = *d;
    copy_view(rec.media_type, sizeof rec.media_type, media_type, strlen(media_type));
    rec.size = size;
    rec.fetched_at_ms = am_metastore_now_ms();
    int rc = am_metastore_put_tag(p->reg->ms, p->reg->cfg->upstreams[p->up_idx].name, p->repo,
                                  p->tag, &rec, NULL, NULL);
    if (rc) AM_WARN("%s caching tag %s:%s: %s", p->ctx, p->repo, p->tag, am_error_message(rc));
}

/* Serves the stale copy of a tag after a failed revalidation; false if there is none. */
static bool serve_stale(struct pull *p, const char *why)
{
    if (!p->have_stale || !p->ex) return false;
    const char *up = p->reg->cfg->upstreams[p->up_idx].name;
    AM_WARN("%s upstream %s failed revalidating %s:%s (%s); serving cached %s stale", p->ctx,
            up, p->repo, p->tag, why, p->stale.digest.str);
    if (p->client_head) {
        if (accept_allows(p->ex, p->accept, p->stale.media_type))
            respond_tag_head(p->ex, &p->stale, "stale");
        p->ex = NULL;
        return true;
    }
    if (serve_cached_manifest(p->reg, p->ex, up, p->repo, &p->stale.digest, p->accept,
                              "stale")) {
        p->ex = NULL;
        return true;
    }
    return false;
}

/* A manifest body arrived whole: verify, parse, store, answer. */
static void finish_manifest_body(struct pull *p)
{
    const char *up = p->reg->cfg->upstreams[p->up_idx].name;
    struct am_digest got;
    enum am_digest_alg alg = p->kind == PULL_MANIFEST_DIGEST ? p->digest.alg
                             : p->has_up_digest             ? p->up_digest.alg
                                                            : AM_DIGEST_SHA256;
    am_digest_of(alg, p->body.data ? p->body.data : "", p->body.len, &got);

    const struct am_digest *want = p->kind == PULL_MANIFEST_DIGEST ? &p->digest
                                   : p->has_up_digest               ? &p->up_digest
                                                                    : NULL;
    if (want && !am_digest_equal(&got, want)) {
        AM_ERROR("%s upstream %s: manifest %s of %s hashes to %s; not cached", p->ctx, up,
                 want->str, p->repo, got.str);
        pull_respond_error(p, AM_EDIGEST_MISMATCH, NULL);
        return;
    }

    struct am_manifest m;
    char msg[160];
    int rc = am_manifest_parse(p->body.data ? p->body.data : "", p->body.len, p->content_type,
                               &m, msg, sizeof msg);
    if (rc) {
        AM_WARN("%s upstream %s: manifest %s of %s is invalid: %s", p->ctx, up, got.str,
                p->repo, msg);
        pull_respond_error(p, rc == AM_ENOMEM ? rc : AM_EMANIFEST_INVALID, msg);
        return;
    }
    /* The upstream's Content-Type is what clients have always received for these bytes;
     * fall back to the JSON's own mediaType when the upstream sent a generic type. */
    const char *mt = am_mediatype_is_manifest(am_mediatype_classify(
                         p->content_type, strlen(p->content_type)))
                         ? p->content_type
                         : m.media_type;
    char media_type[AM_MEDIATYPE_MAX + 1];
    copy_view(media_type, sizeof media_type, mt, strlen(mt));
    am_manifest_cleanup(&m);
    if (!media_type[0]) {
        pull_respond_error(p, AM_EMANIFEST_INVALID, "upstream manifest has no media type");
        return;
    }

    rc = am_metastore_put_manifest(p->reg->ms, up, p->repo, &got, media_type, p->body.data,
                                   p->body.len, NULL, NULL);
    if (rc) AM_WARN("%s caching manifest %s: %s", p->ctx, got.str, am_error_message(rc));
    if (p->kind == PULL_TAG_GET) store_tag(p, &got, media_type, p->body.len);

    if (p->ex && accept_allows(p->ex, p->accept, media_type))
        respond_manifest(p->ex, media_type, &got, p->body.data, p->body.len, "miss");
    p->ex = NULL;
}

/* The HEAD by tag finished: either a cold client HEAD or a revalidation. */
static void finish_tag_head(struct pull *p)
{
    const char *up = p->reg->cfg->upstreams[p->up_idx].name;
    if (p->up_status != 200) {
        if (may_serve_stale(0, p->up_status)) {
            char why[32];
            snprintf(why, sizeof why, "status %d", p->up_status);
            if (serve_stale(p, why)) return;
        }
        pull_respond_error(p, error_for_status(p->up_status, false), NULL);
        return;
    }
    enum am_media_kind k = am_mediatype_classify(p->content_type, strlen(p->content_type));
    if (!p->has_up_digest || !am_mediatype_is_manifest(k) || p->up_len < 0) {
        /* Without digest, type and length a HEAD says too little: fetch the manifest. */
        pull_start_manifest(p, PULL_TAG_GET, p->tag);
        return;
    }
    if (p->have_stale && am_digest_equal(&p->stale.digest, &p->up_digest)) {
        AM_DEBUG("%s tag %s:%s still %s upstream", p->ctx, p->repo, p->tag, p->up_digest.str);
        store_tag(p, &p->up_digest, p->stale.media_type, p->stale.size);
        if (p->client_head) {
            if (accept_allows(p->ex, p->accept, p->stale.media_type))
                respond_tag_head(p->ex, &p->stale, "revalidated");
            p->ex = NULL;
            return;
        }
        if (serve_cached_manifest(p->reg, p->ex, up, p->repo, &p->up_digest, p->accept,
                                  "revalidated")) {
            p->ex = NULL;
            return;
        }
    }
    if (p->client_head) {
        /* A HEAD needs no body: remember the tag; the GET by digest that containerd sends
         * next fetches and verifies the bytes (and a HEAD is not a pull on Docker Hub). */
        store_tag(p, &p->up_digest, p->content_type, (uint64_t)p->up_len);
        struct am_tag_rec rec;
        memset(&rec, 0, sizeof rec);
        rec.digest = p->up_digest;
        copy_view(rec.media_type, sizeof rec.media_type, p->content_type,
                  strlen(p->content_type));
        rec.size = (uint64_t)p->up_len;
        if (accept_allows(p->ex, p->accept, rec.media_type)) respond_tag_head(p->ex, &rec, "miss");
        p->ex = NULL;
        return;
    }
    /* The tag moved (or its manifest is not cached): fetch the new manifest by digest. */
    if (serve_cached_manifest(p->reg, p->ex, up, p->repo, &p->up_digest, p->accept, "hit")) {
        store_tag(p, &p->up_digest, p->content_type, (uint64_t)p->up_len);
        p->ex = NULL;
        return;
    }
    pull_start_manifest(p, PULL_TAG_GET, p->tag);
}

static void on_up_done(void *arg, int err)
{
    struct pull *p = arg;
    p->ureq = NULL;
    if (p->kind == PULL_BLOB) {
        finish_blob(p, err);
        pull_maybe_free(p);
        return;
    }
    if (!p->ex) {
        pull_maybe_free(p);
        return;
    }
    if (err || !p->got_head) {
        if (!err) err = AM_EUPSTREAM_PROTOCOL;
        AM_WARN("%s upstream %s for %s: %s", p->ctx, p->reg->cfg->upstreams[p->up_idx].name,
                p->repo, am_error_message(err));
        if (!(p->kind != PULL_MANIFEST_DIGEST && may_serve_stale(err, 0) &&
              serve_stale(p, am_error_message(err))))
            pull_respond_error(p, err, NULL);
    } else if (p->kind == PULL_TAG_HEAD) {
        finish_tag_head(p);
    } else if (p->up_status == 200) {
        finish_manifest_body(p);
    } else if (p->kind == PULL_TAG_GET && may_serve_stale(0, p->up_status) &&
               serve_stale(p, "upstream error")) {
        /* served */
    } else {
        pull_respond_error(p, error_for_status(p->up_status, false), NULL);
    }
    pull_maybe_free(p);
}

static const struct am_upstream_cbs pull_cbs = {on_up_head, on_up_body, on_up_done};

/* --- request handling --------------------------------------------------------------- */

static struct pull *pull_new(struct am_registry *reg, struct am_http_exchange *ex,
                             const struct am_http_request *req, size_t up_idx,
                             const char *repo)
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
    am_buf_init(&p->body, reg->cfg->max_manifest_bytes);
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

static void handle_manifest(struct am_registry *reg, struct am_http_exchange *ex,
                            const struct am_http_request *req, const struct am_route *rt,
                            size_t up_idx, const char *repo, const char *accept)
{
    const char *up = reg->cfg->upstreams[up_idx].name;

    if (rt->by_digest) {
        if (serve_cached_manifest(reg, ex, up, repo, &rt->digest, accept, "hit")) return;
        struct pull *p = pull_new(reg, ex, req, up_idx, repo);
        if (!p) {
            respond_error(ex, AM_ENOMEM, NULL);
            return;
        }
        p->digest = rt->digest;
        snprintf(p->accept, sizeof p->accept, "%s", accept);
        if (pull_start_manifest(p, PULL_MANIFEST_DIGEST, rt->digest.str)) pull_maybe_free(p);
        return;
    }

    struct am_tag_rec tag;
    int rc = am_metastore_get_tag(reg->ms, up, repo, rt->tag, &tag);
    if (rc != 0 && rc != AM_ENOT_FOUND)
        AM_WARN("metastore read %s:%s: %s", repo, rt->tag, am_error_message(rc));
    bool have = rc == 0;
    if (have && am_metastore_tag_is_fresh(&tag, am_metastore_now_ms(), reg->cfg->tag_freshness_ms)) {
        if (req->is_head) {
            if (accept_allows(ex, accept, tag.media_type)) respond_tag_head(ex, &tag, "hit");
            return;
        }
        if (serve_cached_manifest(reg, ex, up, repo, &tag.digest, accept, "hit")) return;
    }

    struct pull *p = pull_new(reg, ex, req, up_idx, repo);
    if (!p) {
        respond_error(ex, AM_ENOMEM, NULL);
        return;
    }
    snprintf(p->tag, sizeof p->tag, "%s", rt->tag);
    snprintf(p->accept, sizeof p->accept, "%s", accept);
    p->have_stale = have;
    if (have) p->stale = tag;
    /* Revalidate with a HEAD (not counted as a pull by Docker Hub); a cold GET fetches. */
    if (pull_start_manifest(p, have || req->is_head ? PULL_TAG_HEAD : PULL_TAG_GET, rt->tag))
        pull_maybe_free(p);
}

static void handle_blob(struct am_registry *reg, struct am_http_exchange *ex,
                        const struct am_http_request *req, const struct am_route *rt,
                        size_t up_idx, const char *repo)
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
    p->kind = PULL_BLOB;
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

void am_registry_handle(void *ctx, struct am_http_exchange *ex)
{
    struct am_registry *reg = ctx;
    const struct am_http_request *req = am_http_request_of(ex);
    struct am_route rt;
    char msg[256];

    if (strcmp(req->path, "/healthz") == 0) {
        struct am_http_header h[] = {hdr("Content-Type", "text/plain")};
        am_http_respond(ex, 200, NULL, h, 1, "ok\n", 3);
        return;
    }
    if (strcmp(req->path, "/readyz") == 0) {
        /* Ready means the cache store answers reads: probe it with a key that never
         * exists. A draining server has already stopped accepting. */
        struct am_tag_rec probe;
        int prc = am_metastore_get_tag(reg->ms, "readyz", "readyz", "readyz", &probe);
        struct am_http_header h[] = {hdr("Content-Type", "text/plain")};
        if (prc == 0 || prc == AM_ENOT_FOUND)
            am_http_respond(ex, 200, NULL, h, 1, "ready\n", 6);
        else
            am_http_respond(ex, 503, NULL, h, 1, "cache store unavailable\n", 24);
        return;
    }

    int rc = am_route_parse(req->path, req->path_len, req->query, req->query_len, &rt, msg,
                            sizeof msg);
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

int am_registry_new(uv_loop_t *loop, const struct am_config *cfg, struct am_metastore *ms,
                    struct am_blobstore *bs, struct am_registry **out, char *msg, size_t msglen)
{
    struct am_registry *reg = calloc(1, sizeof *reg);
    if (!reg) return AM_ENOMEM;
    reg->loop = loop;
    reg->cfg = cfg;
    reg->ms = ms;
    if (bs && am_blobflights_new(loop, bs, &reg->bf)) {
        free(reg);
        return AM_ENOMEM;
    }
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
    am_blobflights_free(reg->bf); /* cancels fetches before their upstreams go */
    for (size_t i = 0; i < reg->n_ups; i++) am_upstream_free(reg->ups[i]);
    free(reg);
}

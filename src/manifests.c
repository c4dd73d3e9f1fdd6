/*
 * manifests — manifest/index cache policy with coalesced upstream requests.
 * See include/archmirror/manifests.h.
 *
 * DESIGN. A `pull` is one upstream conversation about one (upstream, repository,
 * reference); every query that arrives while it runs and can be answered by it joins it
 * as a `waiter`. A pull first tries what it knows (the stored tag and manifest), then asks
 * upstream: a HEAD to revalidate a tag (or to answer a cold HEAD), a GET when the bytes
 * are needed. Its outcome is delivered to every waiter at once, after which the pull
 * leaves the table, so later queries find the cache instead. Manifests are buffered whole
 * (bounded by cache.max_manifest_size), hashed, parsed, stored, then delivered.
 */
#include "archmirror/manifests.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "archmirror/buf.h"
#include "archmirror/error.h"
#include "archmirror/log.h"
#include "archmirror/manifest.h"
#include "archmirror/mediatype.h"
#include "archmirror/reference.h"

enum pull_kind {
    PULL_DIGEST,   /* GET upstream by digest, verify, store */
    PULL_TAG_GET,  /* GET upstream by tag, verify, store manifest + tag */
    PULL_TAG_HEAD, /* HEAD upstream by tag (cold HEAD or revalidation) */
};

struct pull;

struct am_manifests_waiter {
    struct am_manifests_waiter *next, *prev;
    struct pull *p;
    am_manifests_cb cb;
    void *arg;
};

struct pull {
    struct pull *next, *prev; /* in the table while joinable */
    bool in_table;
    bool delivering;
    struct am_manifests *mf;
    struct am_upstream_req *ureq; /* NULL once finished or cancelled */
    struct am_manifests_waiter *waiters;
    size_t up_idx;
    enum pull_kind kind;
    bool need_body;
    bool by_digest;
    char ctx[48];
    char repo[AM_NAME_MAX + 1];
    char tag[AM_TAG_MAX + 1];
    struct am_digest digest;

    bool have_stale; /* what the tag pointed at before */
    struct am_tag_rec stale;

    int up_status;
    bool got_head;
    char content_type[AM_MEDIATYPE_MAX + 1];
    bool has_up_digest;
    struct am_digest up_digest;
    char retry_after[32];
    int64_t up_len;
    struct am_buf body;
    bool too_large;
};

struct am_manifests {
    const struct am_config *cfg;
    struct am_metastore *ms;
    struct am_upstream *const *ups;
    struct pull *pulls;
    struct am_manifests_stats stats;
};

static void copy_view(char *dst, size_t cap, const char *s, size_t len)
{
    if (len >= cap) len = cap - 1;
    memcpy(dst, s, len);
    dst[len] = '\0';
}

static const char *up_name(const struct pull *p)
{
    return p->mf->cfg->upstreams[p->up_idx].name;
}

/* --- table and lifetime -------------------------------------------------------------- */

static void table_unlink(struct pull *p)
{
    if (!p->in_table) return;
    if (p->prev)
        p->prev->next = p->next;
    else
        p->mf->pulls = p->next;
    if (p->next) p->next->prev = p->prev;
    p->prev = p->next = NULL;
    p->in_table = false;
}

static void pull_free(struct pull *p)
{
    table_unlink(p);
    am_buf_cleanup(&p->body);
    free(p);
}

static void pull_maybe_free(struct pull *p)
{
    if (!p->waiters && !p->ureq && !p->delivering) pull_free(p);
}

/* Hands r to every waiter; the pull leaves the table first, so queries that the
 * callbacks make find the cache rather than this finished pull. */
static void deliver(struct pull *p, const struct am_manifests_result *r)
{
    table_unlink(p);
    p->delivering = true;
    while (p->waiters) {
        struct am_manifests_waiter *w = p->waiters;
        p->waiters = w->next;
        if (p->waiters) p->waiters->prev = NULL;
        am_manifests_cb cb = w->cb;
        void *arg = w->arg;
        free(w);
        cb(arg, r);
    }
    p->delivering = false;
}

static void deliver_error(struct pull *p, int err, const char *message)
{
    struct am_manifests_result r = {
        .err = err,
        .message = message,
        .retry_after = err == AM_ETOOMANYREQUESTS ? p->retry_after : "",
    };
    deliver(p, &r);
}

/* Delivers a stored manifest; false when it is not in the store. */
static bool deliver_stored(struct pull *p, const struct am_digest *d, const char *state)
{
    struct am_manifest_rec rec;
    int rc = am_metastore_get_manifest(p->mf->ms, up_name(p), p->repo, d, &rec);
    if (rc) {
        if (rc != AM_ENOT_FOUND)
            AM_WARN("%s metastore read %s@%s: %s", p->ctx, p->repo, d->str, am_error_message(rc));
        return false;
    }
    struct am_manifests_result r = {
        .media_type = rec.media_type,
        .digest = &rec.digest,
        .size = rec.len,
        .bytes = rec.bytes,
        .cache_state = state,
    };
    deliver(p, &r);
    am_manifest_rec_cleanup(&rec);
    return true;
}

/* Delivers what a tag record says, to waiters that need no body. */
static void deliver_tag(struct pull *p, const struct am_tag_rec *rec, const char *state)
{
    struct am_manifests_result r = {
        .media_type = rec->media_type,
        .digest = &rec->digest,
        .size = rec->size,
        .cache_state = state,
    };
    deliver(p, &r);
}

/* --- upstream ------------------------------------------------------------------------ */

/* Whether an upstream failure allows serving a cached tag stale: the upstream is
 * unreachable or overloaded, not saying "this tag is gone". */
static bool may_serve_stale(int err, int status)
{
    if (err) return err != AM_ECANCELED;
    return status == 429 || status >= 500;
}

static const struct am_upstream_cbs pull_cbs;

/* Starts the upstream request of kind for p. On failure delivers the error. */
static void pull_start(struct pull *p, enum pull_kind kind)
{
    char path[AM_NAME_MAX + AM_DIGEST_STR_MAX + 32], scope[AM_NAME_MAX + 32];
    snprintf(path, sizeof path, "/v2/%s/manifests/%s", p->repo,
             kind == PULL_DIGEST ? p->digest.str : p->tag);
    snprintf(scope, sizeof scope, "repository:%s:pull", p->repo);
    struct am_upstream_request_opts o = {
        .method = kind == PULL_TAG_HEAD ? "HEAD" : "GET",
        .path = path,
        .accept = AM_MEDIATYPE_ACCEPT_ALL,
        .scope = scope,
    };
    p->kind = kind;
    p->got_head = p->has_up_digest = p->too_large = false;
    p->content_type[0] = p->retry_after[0] = '\0';
    am_buf_reset(&p->body);
    p->mf->stats.upstream++;
    int rc = am_upstream_request(p->mf->ups[p->up_idx], &o, &pull_cbs, p, &p->ureq);
    if (rc) {
        p->ureq = NULL;
        AM_WARN("%s upstream %s %s %s: %s", p->ctx, up_name(p), o.method, path,
                am_error_message(rc));
        deliver_error(p, rc, NULL);
    }
}

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
}

static void on_up_body(void *arg, const char *data, size_t len)
{
    struct pull *p = arg;
    if (p->up_status != 200 || p->too_large) return; /* error bodies are dropped */
    if (am_buf_append(&p->body, data, len) == 0) return;
    /* Over cache.max_manifest_size (or out of memory): stop downloading it. */
    p->too_large = true;
    am_upstream_req_cancel(p->ureq);
    p->ureq = NULL;
    AM_WARN("%s upstream %s: manifest of %s exceeds %llu bytes", p->ctx, up_name(p), p->repo,
            (unsigned long long)p->mf->cfg->max_manifest_bytes);
    deliver_error(p, AM_ETOO_LARGE, "upstream manifest exceeds cache.max_manifest_size");
    pull_maybe_free(p);
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
    int rc = am_metastore_put_tag(p->mf->ms, up_name(p), p->repo, p->tag, &rec, NULL, NULL);
    if (rc) AM_WARN("%s caching tag %s:%s: %s", p->ctx, p->repo, p->tag, am_error_message(rc));
}

/* Serves the stale copy of a tag after a failed revalidation; false if there is none
 * (also when the tag's manifest was evicted: there is nothing to serve the body from). */
static bool serve_stale(struct pull *p, const char *why)
{
    if (!p->have_stale) return false;
    AM_WARN("%s upstream %s failed revalidating %s:%s (%s); serving cached %s stale", p->ctx,
            up_name(p), p->repo, p->tag, why, p->stale.digest.str);
    if (!p->need_body) {
        p->mf->stats.stale++;
        deliver_tag(p, &p->stale, "stale");
        return true;
    }
    if (!deliver_stored(p, &p->stale.digest, "stale")) {
        AM_WARN("%s manifest %s of %s:%s is no longer cached; nothing to serve stale", p->ctx,
                p->stale.digest.str, p->repo, p->tag);
        return false;
    }
    p->mf->stats.stale++;
    return true;
}

/* A manifest body arrived whole: verify, parse, store, deliver. */
static void finish_body(struct pull *p)
{
    struct am_digest got;
    enum am_digest_alg alg = p->kind == PULL_DIGEST ? p->digest.alg
                             : p->has_up_digest     ? p->up_digest.alg
                                                    : AM_DIGEST_SHA256;
    const char *bytes = p->body.data ? p->body.data : "";
    am_digest_of(alg, bytes, p->body.len, &got);

    const struct am_digest *want = p->kind == PULL_DIGEST ? &p->digest
                                   : p->has_up_digest     ? &p->up_digest
                                                          : NULL;
    if (want && !am_digest_equal(&got, want)) {
        AM_ERROR("%s upstream %s: manifest %s of %s hashes to %s; not cached", p->ctx, up_name(p),
                 want->str, p->repo, got.str);
        deliver_error(p, AM_EDIGEST_MISMATCH, NULL);
        return;
    }

    struct am_manifest m;
    char msg[160];
    int rc = am_manifest_parse(bytes, p->body.len, p->content_type, &m, msg, sizeof msg);
    if (rc) {
        AM_WARN("%s upstream %s: manifest %s of %s is invalid: %s", p->ctx, up_name(p), got.str,
                p->repo, msg);
        deliver_error(p, rc == AM_ENOMEM ? rc : AM_EMANIFEST_INVALID, msg);
        return;
    }
    /* The upstream's Content-Type is what clients have always received for these bytes;
     * fall back to the JSON's own mediaType when the upstream sent a generic type. */
    const char *mt =
        am_mediatype_is_manifest(am_mediatype_classify(p->content_type, strlen(p->content_type)))
            ? p->content_type
            : m.media_type;
    char media_type[AM_MEDIATYPE_MAX + 1];
    copy_view(media_type, sizeof media_type, mt, strlen(mt));
    am_manifest_cleanup(&m);
    if (!media_type[0]) {
        deliver_error(p, AM_EMANIFEST_INVALID, "upstream manifest has no media type");
        return;
    }

    rc = am_metastore_put_manifest(p->mf->ms, up_name(p), p->repo, &got, media_type, bytes,
                                   p->body.len, NULL, NULL);
    if (rc) AM_WARN("%s caching manifest %s: %s", p->ctx, got.str, am_error_message(rc));
    if (p->kind == PULL_TAG_GET) store_tag(p, &got, media_type, p->body.len);

    struct am_manifests_result r = {
        .media_type = media_type,
        .digest = &got,
        .size = p->body.len,
        .bytes = bytes,
        .cache_state = "miss",
    };
    deliver(p, &r);
}

/* The HEAD by tag finished: either a cold HEAD or a revalidation. */
static void finish_tag_head(struct pull *p)
{
    if (p->up_status != 200) {
        char why[32];
        snprintf(why, sizeof why, "status %d", p->up_status);
        if (may_serve_stale(0, p->up_status) && serve_stale(p, why)) return;
        deliver_error(p, am_error_from_upstream_status(p->up_status, false), NULL);
        return;
    }
    enum am_media_kind k = am_mediatype_classify(p->content_type, strlen(p->content_type));
    if (!p->has_up_digest || !am_mediatype_is_manifest(k) || p->up_len < 0) {
        /* Without digest, type and length a HEAD says too little: fetch the manifest. */
        pull_start(p, PULL_TAG_GET);
        return;
    }
    if (p->have_stale && am_digest_equal(&p->stale.digest, &p->up_digest)) {
        AM_DEBUG("%s tag %s:%s still %s upstream", p->ctx, p->repo, p->tag, p->up_digest.str);
        store_tag(p, &p->up_digest, p->stale.media_type, p->stale.size);
        if (!p->need_body) {
            deliver_tag(p, &p->stale, "revalidated");
            return;
        }
        if (deliver_stored(p, &p->up_digest, "revalidated")) return;
    }
    if (!p->need_body) {
        /* A HEAD needs no body: remember the tag; the GET by digest that containerd sends
         * next fetches and verifies the bytes (and a HEAD is not a pull on Docker Hub). */
        struct am_tag_rec rec;
        memset(&rec, 0, sizeof rec);
        rec.digest = p->up_digest;
        copy_view(rec.media_type, sizeof rec.media_type, p->content_type, strlen(p->content_type));
        rec.size = (uint64_t)p->up_len;
        store_tag(p, &rec.digest, rec.media_type, rec.size);
        deliver_tag(p, &rec, "miss");
        return;
    }
    /* The tag moved: its new manifest may be stored already (another tag, a digest pull). */
    struct am_digest moved = p->up_digest;
    char mt[AM_MEDIATYPE_MAX + 1];
    copy_view(mt, sizeof mt, p->content_type, strlen(p->content_type));
    uint64_t len = (uint64_t)p->up_len;
    if (deliver_stored(p, &moved, "hit")) {
        store_tag(p, &moved, mt, len);
        return;
    }
    pull_start(p, PULL_TAG_GET);
}

static void on_up_done(void *arg, int err)
{
    struct pull *p = arg;
    /* The client's one line says what failed (a refused redirect's target, the TLS
     * verify error…); it is only valid during this callback. */
    const char *why = p->ureq ? am_upstream_req_message(p->ureq) : NULL;
    p->ureq = NULL;
    if (err || !p->got_head) {
        if (!err) err = AM_EUPSTREAM_PROTOCOL;
        AM_WARN("%s upstream %s for %s: %s%s%s", p->ctx, up_name(p), p->repo, am_error_message(err),
                why && why[0] ? ": " : "", why ? why : "");
        if (!(p->kind != PULL_DIGEST && may_serve_stale(err, 0) &&
              serve_stale(p, am_error_message(err))))
            deliver_error(p, err, NULL);
    } else if (p->kind == PULL_TAG_HEAD) {
        finish_tag_head(p);
    } else if (p->kind == PULL_DIGEST && !p->by_digest && p->up_status == 404) {
        /* The fresh tag's manifest, evicted here, is gone upstream too: ask for the tag. */
        pull_start(p, PULL_TAG_GET);
    } else if (p->up_status == 200) {
        finish_body(p);
    } else if (!(p->kind == PULL_TAG_GET && may_serve_stale(0, p->up_status) &&
                 serve_stale(p, "upstream error"))) {
        deliver_error(p, am_error_from_upstream_status(p->up_status, false), NULL);
    }
    pull_maybe_free(p);
}

static const struct am_upstream_cbs pull_cbs = {on_up_head, on_up_body, on_up_done};

/* --- queries ------------------------------------------------------------------------- */

static bool answers(const struct pull *p, const struct am_manifests_query *q)
{
    if (p->up_idx != q->up_idx || strcmp(p->repo, q->repo) != 0) return false;
    if (q->need_body && !p->need_body) return false;
    if (q->digest) return p->by_digest && am_digest_equal(&p->digest, q->digest);
    return !p->by_digest && strcmp(p->tag, q->tag) == 0;
}

static int add_waiter(struct pull *p, am_manifests_cb cb, void *arg,
                      struct am_manifests_waiter **out)
{
    struct am_manifests_waiter *w = calloc(1, sizeof *w);
    if (!w) return AM_ENOMEM;
    w->p = p;
    w->cb = cb;
    w->arg = arg;
    w->next = p->waiters;
    if (p->waiters) p->waiters->prev = w;
    p->waiters = w;
    *out = w;
    return 0;
}

/* Answers from the store alone, when it can: true if cb ran. */
static bool answer_from_store(struct am_manifests *mf, const struct am_manifests_query *q,
                              am_manifests_cb cb, void *arg, struct am_tag_rec *tag, bool *have_tag)
{
    const char *up = mf->cfg->upstreams[q->up_idx].name;
    const struct am_digest *d = q->digest;
    *have_tag = false;
    if (!d) {
        int rc = am_metastore_get_tag(mf->ms, up, q->repo, q->tag, tag);
        if (rc != 0 && rc != AM_ENOT_FOUND)
            AM_WARN("metastore read %s:%s: %s", q->repo, q->tag, am_error_message(rc));
        *have_tag = rc == 0;
        if (!*have_tag ||
            !am_metastore_tag_is_fresh(tag, am_metastore_now_ms(), mf->cfg->tag_freshness_ms))
            return false;
        if (!q->need_body) {
            struct am_manifests_result r = {.media_type = tag->media_type,
                                            .digest = &tag->digest,
                                            .size = tag->size,
                                            .cache_state = "hit"};
            mf->stats.hits++;
            cb(arg, &r);
            return true;
        }
        d = &tag->digest;
    }
    struct am_manifest_rec rec;
    int rc = am_metastore_get_manifest(mf->ms, up, q->repo, d, &rec);
    if (rc) {
        if (rc != AM_ENOT_FOUND)
            AM_WARN("metastore read %s@%s: %s", q->repo, d->str, am_error_message(rc));
        return false;
    }
    struct am_manifests_result r = {.media_type = rec.media_type,
                                    .digest = &rec.digest,
                                    .size = rec.len,
                                    .bytes = rec.bytes,
                                    .cache_state = "hit"};
    mf->stats.hits++;
    cb(arg, &r);
    am_manifest_rec_cleanup(&rec);
    return true;
}

int am_manifests_get(struct am_manifests *mf, const struct am_manifests_query *q,
                     am_manifests_cb cb, void *arg, struct am_manifests_waiter **out)
{
    *out = NULL;
    if (q->up_idx >= mf->cfg->n_upstreams || !q->repo || (!q->tag == !q->digest)) return AM_EINVAL;
    if (strlen(q->repo) > AM_NAME_MAX || (q->tag && strlen(q->tag) > AM_TAG_MAX)) return AM_EINVAL;

    struct am_tag_rec tag;
    bool have_tag;
    if (answer_from_store(mf, q, cb, arg, &tag, &have_tag)) return 0;

    for (struct pull *p = mf->pulls; p; p = p->next) {
        if (!answers(p, q)) continue;
        mf->stats.coalesced++;
        return add_waiter(p, cb, arg, out);
    }

    struct pull *p = calloc(1, sizeof *p);
    if (!p) return AM_ENOMEM;
    p->mf = mf;
    p->up_idx = q->up_idx;
    p->need_body = q->need_body || q->digest; /* a digest is verified from its bytes */
    p->by_digest = q->digest != NULL;
    snprintf(p->ctx, sizeof p->ctx, "%s", q->log_ctx ? q->log_ctx : "-");
    copy_view(p->repo, sizeof p->repo, q->repo, strlen(q->repo));
    if (q->digest)
        p->digest = *q->digest;
    else
        copy_view(p->tag, sizeof p->tag, q->tag, strlen(q->tag));
    p->have_stale = have_tag;
    if (have_tag) p->stale = tag;
    am_buf_init(&p->body, mf->cfg->max_manifest_bytes);
    int rc = add_waiter(p, cb, arg, out);
    if (rc) {
        free(p);
        return rc;
    }
    p->next = mf->pulls;
    if (mf->pulls) mf->pulls->prev = p;
    mf->pulls = p;
    p->in_table = true;

    enum pull_kind kind = q->digest                   ? PULL_DIGEST
                          : have_tag || !q->need_body ? PULL_TAG_HEAD /* revalidate, or HEAD */
                                                      : PULL_TAG_GET;
    if (have_tag && q->need_body &&
        am_metastore_tag_is_fresh(&tag, am_metastore_now_ms(), mf->cfg->tag_freshness_ms)) {
        /* A fresh tag whose manifest is not in the store (evicted by the manifest budget):
         * the tag is trusted for its window, so fetch the manifest it names by digest,
         * verified against that digest, without revalidating the tag. */
        p->digest = tag.digest;
        kind = PULL_DIGEST;
    }
    pull_start(p, kind);
    if (!p->ureq) {
        /* The start failed and delivered its error synchronously: cb ran already. */
        *out = NULL;
        pull_maybe_free(p);
    }
    return 0;
}

void am_manifests_cancel(struct am_manifests_waiter *w)
{
    if (!w) return;
    struct pull *p = w->p;
    if (w->prev)
        w->prev->next = w->next;
    else
        p->waiters = w->next;
    if (w->next) w->next->prev = w->prev;
    free(w);
    if (!p->waiters && !p->delivering && p->ureq) {
        am_upstream_req_cancel(p->ureq);
        p->ureq = NULL;
    }
    pull_maybe_free(p);
}

int am_manifests_new(const struct am_config *cfg, struct am_metastore *ms,
                     struct am_upstream *const *ups, struct am_manifests **out)
{
    struct am_manifests *mf = calloc(1, sizeof *mf);
    if (!mf) return AM_ENOMEM;
    mf->cfg = cfg;
    mf->ms = ms;
    mf->ups = ups;
    *out = mf;
    return 0;
}

void am_manifests_free(struct am_manifests *mf)
{
    if (!mf) return;
    while (mf->pulls) {
        struct pull *p = mf->pulls;
        if (p->ureq) {
            am_upstream_req_cancel(p->ureq);
            p->ureq = NULL;
        }
        deliver_error(p, AM_ECANCELED, NULL); /* unlinks p */
        pull_free(p);
    }
    free(mf);
}

void am_manifests_get_stats(const struct am_manifests *mf, struct am_manifests_stats *out)
{
    *out = mf->stats;
}

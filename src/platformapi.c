/*
 * platformapi — /api/v1/platforms; see include/archmirror/platformapi.h.
 *
 * DESIGN. Every request becomes a `req` holding its `lookup`s: one for GET, one per
 * distinct (upstream, repository, tag or digest) for POST, each with the JSON of its
 * result once known. `pump` starts lookups until AM_PLATFORMAPI_CONCURRENCY are in
 * flight; a lookup that the caches answer completes inside imageinfo's get, so pump is a
 * loop guarded against re-entry rather than a recursion (a cached 1,000-image batch runs
 * in one loop, not 1,000 nested frames). The response is built when the last lookup
 * completes; a client that goes away cancels the lookups still in flight. Strings that
 * reach the JSON (the client's own image strings, upstream messages) are made printable
 * ASCII first, since jansson refuses invalid UTF-8.
 */
#include "archmirror/platformapi.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <time.h>

#include "archmirror/error.h"
#include "archmirror/log.h"

struct req;

struct lookup {
    struct req *q;
    struct am_imageinfo_waiter *w; /* while in flight */
    struct am_platformapi_target t;
    bool done;
    int err;
    char retry_after[32];
    json_t *core;    /* the result without "image" */
    json_t *missing; /* required platforms not met (POST with require), or NULL */
};

struct item {
    const char *image; /* borrowed from the batch */
    ssize_t lookup;    /* index into lookups, or -1: core holds the reference's error */
    json_t *core;
};

struct req {
    struct am_platformapi *api;
    struct req *prev, *next; /* api->reqs */
    struct am_http_exchange *ex;
    bool is_get;
    char ctx[48];
    struct am_platformapi_batch batch;
    struct item *items;
    size_t n_items;
    struct lookup *lookups;
    size_t n_lookups;
    size_t next_lookup, in_flight, n_done;
    bool pumping;
};

struct am_platformapi {
    struct am_imageinfo *ii;
    const struct am_config *cfg;
    struct req *reqs;
};

/* --- JSON helpers ---------------------------------------------------------------------- */

/* A JSON string of s with every byte outside printable ASCII replaced by '?'. */
static json_t *jstr(const char *s)
{
    char buf[1024];
    size_t n = 0;
    for (; s && s[n] && n < sizeof buf - 1; n++) {
        unsigned char c = (unsigned char)s[n];
        buf[n] = c >= 0x20 && c < 0x7f ? (char)c : '?';
    }
    buf[n] = '\0';
    return json_stringn(buf, n);
}

json_t *am_platformapi_error_json(const char *code, const char *message)
{
    return json_pack("{s:{s:s,s:o}}", "error", "code", code, "message",
                     jstr(message ? message : ""));
}

static void set_err(struct am_platformapi_error *e, int status, const char *code, const char *fmt,
                    ...) __attribute__((format(printf, 4, 5)));
static void set_err(struct am_platformapi_error *e, int status, const char *code, const char *fmt,
                    ...)
{
    va_list ap;
    e->status = status;
    e->code = code;
    va_start(ap, fmt);
    vsnprintf(e->message, sizeof e->message, fmt, ap);
    va_end(ap);
}

static struct am_http_header hdr(const char *name, const char *value)
{
    struct am_http_header h = {name, strlen(name), value, strlen(value)};
    return h;
}

/* Sends doc (taken) as the response; extra headers may be NULL. */
static void respond_json(struct am_http_exchange *ex, int status, json_t *doc,
                         const struct am_http_header *extra, size_t n_extra)
{
    char *text = doc ? json_dumps(doc, JSON_COMPACT) : NULL;
    json_decref(doc);
    struct am_http_header h[4] = {hdr("Content-Type", "application/json"),
                                  hdr("Cache-Control", "no-store")};
    size_t n = 2;
    for (size_t i = 0; i < n_extra && n < 4; i++) h[n++] = extra[i];
    if (!text) {
        static const char oom[] =
            "{\"error\":{\"code\":\"NOMEM\",\"message\":\"out of memory\"}}\n";
        am_http_respond(ex, 500, NULL, h, n, oom, sizeof oom - 1);
        return;
    }
    size_t len = strlen(text);
    char *body = realloc(text, len + 2);
    if (body) {
        body[len++] = '\n';
        body[len] = '\0';
        text = body;
    }
    am_http_respond(ex, status, NULL, h, n, text, len);
    free(text);
}

static void respond_error(struct am_http_exchange *ex, const struct am_platformapi_error *e,
                          const struct am_http_header *extra, size_t n_extra)
{
    respond_json(ex, e->status, am_platformapi_error_json(e->code, e->message), extra, n_extra);
}

/* --- pure parts ------------------------------------------------------------------------ */

bool am_platformapi_owns(const char *path, size_t len)
{
    size_t n = sizeof AM_PLATFORMAPI_PATH - 1;
    return len >= n && memcmp(path, AM_PLATFORMAPI_PATH, n) == 0 && (len == n || path[n] == '/');
}

int am_platformapi_parse_image(const struct am_config *cfg, const char *s, size_t len,
                               struct am_platformapi_target *out, struct am_platformapi_error *err)
{
    char msg[200];
    struct am_reference ref;
    if (len > AM_PLATFORMAPI_IMAGE_MAX) {
        set_err(err, 400, "REFERENCE_INVALID", "image reference longer than %d bytes",
                AM_PLATFORMAPI_IMAGE_MAX);
        return -1;
    }
    if (am_reference_parse(s, len, &ref, msg, sizeof msg) != 0) {
        set_err(err, 400, "REFERENCE_INVALID", "%s", msg);
        return -1;
    }
    const struct am_upstream_conf *up =
        am_config_find_upstream(cfg, ref.registry, strlen(ref.registry));
    if (!up) {
        char names[160] = "";
        size_t at = 0;
        for (size_t i = 0; i < cfg->n_upstreams && at < sizeof names; i++) {
            int w = snprintf(names + at, sizeof names - at, "%s%s", i ? ", " : "",
                             cfg->upstreams[i].name);
            if (w < 0) break;
            at += (size_t)w;
        }
        set_err(err, 403, "REGISTRY_UNKNOWN",
                "registry \"%s\" is not an upstream of this mirror (upstreams: %s)", ref.registry,
                names);
        return -1;
    }
    out->up_idx = (size_t)(up - cfg->upstreams);
    out->ref = ref;
    return 0;
}

static int hexval(char c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

int am_platformapi_query_param(const char *query, size_t len, const char *name, char *out,
                               size_t outlen)
{
    size_t nl = strlen(name);
    bool found = false;
    size_t i = 0;
    while (i <= len) {
        const char *amp = memchr(query + i, '&', len - i);
        size_t end = amp ? (size_t)(amp - query) : len;
        const char *kv = query + i;
        size_t kvlen = end - i;
        if (kvlen > nl && memcmp(kv, name, nl) == 0 && kv[nl] == '=') {
            if (found) return AM_EINVAL;
            found = true;
            size_t o = 0;
            for (size_t k = nl + 1; k < kvlen; k++) {
                char c = kv[k];
                if (c == '+') {
                    c = ' ';
                } else if (c == '%') {
                    if (k + 2 >= kvlen || hexval(kv[k + 1]) < 0 || hexval(kv[k + 2]) < 0)
                        return AM_EINVAL;
                    c = (char)(hexval(kv[k + 1]) * 16 + hexval(kv[k + 2]));
                    if (c == '\0') return AM_EINVAL;
                    k += 2;
                }
                if (o + 1 >= outlen) return AM_ETOO_LARGE;
                out[o++] = c;
            }
            out[o] = '\0';
        } else if (kvlen == nl && memcmp(kv, name, nl) == 0) {
            if (found) return AM_EINVAL;
            found = true;
            if (outlen < 1) return AM_ETOO_LARGE;
            out[0] = '\0';
        }
        if (!amp) break;
        i = end + 1;
    }
    return found ? 0 : AM_ENOT_FOUND;
}

void am_platformapi_batch_cleanup(struct am_platformapi_batch *b)
{
    if (!b) return;
    for (size_t i = 0; i < b->n_images; i++) free(b->images[i]);
    free(b->images);
    b->images = NULL;
    b->n_images = 0;
    b->n_require = 0;
}

int am_platformapi_parse_batch(const char *body, size_t len, struct am_platformapi_batch *out,
                               struct am_platformapi_error *err)
{
    json_error_t jerr;
    json_t *root = NULL, *seen = NULL;
    int rc = -1;
    memset(out, 0, sizeof *out);
    if (len == 0) {
        set_err(err, 400, "JSON_INVALID",
                "empty request body; expected {\"images\": [...], \"require\": [...]}");
        return -1;
    }
    root = json_loadb(body, len, JSON_REJECT_DUPLICATES, &jerr);
    if (!root) {
        if (json_error_code(&jerr) == json_error_out_of_memory) return AM_ENOMEM;
        set_err(err, 400, "JSON_INVALID", "invalid JSON at line %d, column %d: %.160s", jerr.line,
                jerr.column, jerr.text);
        return -1;
    }
    if (!json_is_object(root)) {
        set_err(err, 400, "BODY_INVALID",
                "the body must be a JSON object {\"images\": [...], \"require\": [...]}");
        goto done;
    }
    const char *key;
    json_t *v;
    json_object_foreach(root, key, v)
    {
        if (strcmp(key, "images") != 0 && strcmp(key, "require") != 0) {
            char k[64];
            size_t i = 0;
            for (; key[i] && i < sizeof k - 1; i++)
                k[i] = (unsigned char)key[i] >= 0x20 && (unsigned char)key[i] < 0x7f ? key[i] : '?';
            k[i] = '\0';
            set_err(err, 400, "BODY_INVALID", "unknown key \"%s\" (expected images, require)", k);
            goto done;
        }
    }
    json_t *images = json_object_get(root, "images");
    if (!json_is_array(images)) {
        set_err(err, 400, "BODY_INVALID", "\"images\" must be an array of image references");
        goto done;
    }
    size_t n = json_array_size(images);
    if (n > AM_PLATFORMAPI_MAX_LIST) {
        set_err(err, 413, "TOO_MANY_IMAGES", "at most %d entries in \"images\" (got %zu)",
                AM_PLATFORMAPI_MAX_LIST, n);
        goto done;
    }
    json_t *req = json_object_get(root, "require");
    if (req && !json_is_null(req)) {
        if (!json_is_array(req)) {
            set_err(err, 400, "BODY_INVALID",
                    "\"require\" must be an array of platforms such as \"linux/arm64\"");
            goto done;
        }
        if (json_array_size(req) > AM_PLATFORMAPI_MAX_REQUIRE) {
            set_err(err, 400, "BODY_INVALID", "at most %d entries in \"require\"",
                    AM_PLATFORMAPI_MAX_REQUIRE);
            goto done;
        }
        size_t i;
        json_array_foreach(req, i, v)
        {
            char msg[160];
            struct am_platform p;
            if (!json_is_string(v)) {
                set_err(err, 400, "BODY_INVALID", "require[%zu] is not a string", i);
                goto done;
            }
            if (am_platform_parse(json_string_value(v), json_string_length(v), &p, NULL, msg,
                                  sizeof msg) != 0) {
                set_err(err, 400, "PLATFORM_INVALID", "require[%zu]: %s", i, msg);
                goto done;
            }
            bool dup = false;
            for (size_t k = 0; k < out->n_require && !dup; k++)
                dup = am_platform_equal(&out->require[k], &p);
            if (!dup) out->require[out->n_require++] = p;
        }
    }
    /* Distinct strings, first-seen order; a jansson object is the set. */
    seen = json_object();
    out->images = calloc(n ? n : 1, sizeof *out->images);
    if (!seen || !out->images) {
        rc = AM_ENOMEM;
        goto done;
    }
    size_t i;
    json_array_foreach(images, i, v)
    {
        if (!json_is_string(v)) {
            set_err(err, 400, "BODY_INVALID", "images[%zu] is not a string", i);
            goto done;
        }
        const char *s = json_string_value(v);
        size_t sl = json_string_length(v);
        /* A NUL cannot be a set key; such a string is an invalid reference anyway and is
         * kept (undeduplicated) so that it gets its own error entry. */
        if (strlen(s) == sl) {
            if (json_object_get(seen, s)) continue;
            if (json_object_set_new(seen, s, json_true())) {
                rc = AM_ENOMEM;
                goto done;
            }
        }
        if (out->n_images == AM_PLATFORMAPI_MAX_IMAGES) {
            set_err(err, 413, "TOO_MANY_IMAGES", "at most %d distinct images per request",
                    AM_PLATFORMAPI_MAX_IMAGES);
            goto done;
        }
        char *copy = malloc(sl + 1);
        if (!copy) {
            rc = AM_ENOMEM;
            goto done;
        }
        memcpy(copy, s, sl + 1);
        out->images[out->n_images++] = copy;
    }
    rc = 0;
done:
    json_decref(seen);
    json_decref(root);
    if (rc) am_platformapi_batch_cleanup(out);
    return rc;
}

int am_platformapi_select(const struct am_imageinfo_image *img, const struct am_platform *node)
{
    int best = -1, best_rank = -1;
    for (size_t i = 0; i < img->n_platforms; i++) {
        int r = am_platform_match_rank(node, &img->platforms[i].platform);
        /* Strictly lower only: containerd's stable sort keeps index order among equals. */
        if (r >= 0 && (best_rank < 0 || r < best_rank)) {
            best_rank = r;
            best = (int)i;
        }
    }
    return best;
}

const char *am_platformapi_error_code(int err)
{
    const char *code = am_error_oci_code(err);
    return strcmp(code, "UNKNOWN") == 0 ? am_error_name(err) : code;
}

void am_platformapi_format_time(uint64_t ms, char *out, size_t outlen)
{
    time_t secs = (time_t)(ms / 1000);
    struct tm tm;
    char base[24];
    if (!gmtime_r(&secs, &tm) || strftime(base, sizeof base, "%Y-%m-%dT%H:%M:%S", &tm) == 0)
        snprintf(base, sizeof base, "1970-01-01T00:00:00");
    snprintf(out, outlen, "%s.%03uZ", base, (unsigned)(ms % 1000));
}

static json_t *platform_json(const struct am_imageinfo_platform *p)
{
    char spec[AM_PLATFORM_FORMAT_SIZE];
    am_platform_format(&p->platform, spec, sizeof spec);
    json_t *o = json_pack("{s:o,s:o,s:o,s:o}", "platform", jstr(spec), "os", jstr(p->platform.os),
                          "architecture", jstr(p->platform.architecture), "variant",
                          jstr(p->platform.variant));
    if (!o) return NULL;
    if (p->platform.os_version[0])
        json_object_set_new(o, "osVersion", jstr(p->platform.os_version));
    json_object_set_new(o, "digest", jstr(p->digest.str));
    json_object_set_new(o, "size", json_integer((json_int_t)p->size));
    return o;
}

json_t *am_platformapi_result_json(const struct am_platformapi_target *t,
                                   const struct am_imageinfo_result *r)
{
    if (r->err) {
        char msg[256];
        snprintf(msg, sizeof msg, "%s",
                 r->message && r->message[0] ? r->message : am_error_message(r->err));
        return am_platformapi_error_json(am_platformapi_error_code(r->err), msg);
    }
    const struct am_imageinfo_image *img = r->image;
    char when[32];
    am_platformapi_format_time(r->checked_at_ms, when, sizeof when);
    json_t *plats = json_array();
    for (size_t i = 0; plats && i < img->n_platforms; i++)
        if (json_array_append_new(plats, platform_json(&img->platforms[i]))) {
            json_decref(plats);
            plats = NULL;
        }
    if (!plats) return NULL;
    json_t *o =
        json_pack("{s:o,s:o,s:o,s:o,s:o,s:b,s:o}", "registry", jstr(t->ref.registry), "repository",
                  jstr(t->ref.repository), "tag", t->ref.has_tag ? jstr(t->ref.tag) : json_null(),
                  "digest", jstr(img->digest.str), "mediaType", jstr(img->media_type), "multiArch",
                  img->multi_arch, "platforms", plats);
    if (!o) return NULL;
    if (img->truncated) json_object_set_new(o, "truncated", json_true());
    json_object_set_new(o, "source", json_string(r->from_upstream ? "upstream" : "cache"));
    json_object_set_new(o, "cacheState", jstr(r->cache_state));
    json_object_set_new(o, "checkedAt", json_string(when));
    return o;
}

/* --- requests -------------------------------------------------------------------------- */

static void req_free(struct req *q)
{
    struct am_platformapi *api = q->api;
    if (q->prev)
        q->prev->next = q->next;
    else if (api->reqs == q)
        api->reqs = q->next;
    if (q->next) q->next->prev = q->prev;
    for (size_t i = 0; i < q->n_lookups; i++) {
        struct lookup *l = &q->lookups[i];
        if (l->w) am_imageinfo_cancel(l->w);
        json_decref(l->core);
        json_decref(l->missing);
    }
    for (size_t i = 0; i < q->n_items; i++) json_decref(q->items[i].core);
    free(q->lookups);
    free(q->items);
    am_platformapi_batch_cleanup(&q->batch);
    free(q);
}

static void on_req_gone(void *arg)
{
    struct req *q = arg;
    AM_DEBUG("%s platforms: client went away", q->ctx);
    q->ex = NULL;
    req_free(q);
}

/* The "matches" object of a result and the list of required platforms not met. */
static void add_matches(struct lookup *l, const struct am_imageinfo_image *img)
{
    const struct am_platformapi_batch *b = &l->q->batch;
    json_t *matches = json_object();
    l->missing = json_array();
    if (!matches || !l->missing) {
        json_decref(matches);
        return;
    }
    for (size_t k = 0; k < b->n_require; k++) {
        char want[AM_PLATFORM_FORMAT_SIZE], got[AM_PLATFORM_FORMAT_SIZE];
        am_platform_format(&b->require[k], want, sizeof want);
        int i = am_platformapi_select(img, &b->require[k]);
        if (i < 0) {
            json_object_set_new(matches, want, json_null());
            json_array_append_new(l->missing, json_string(want));
            continue;
        }
        am_platform_format(&img->platforms[i].platform, got, sizeof got);
        json_object_set_new(matches, want,
                            json_pack("{s:o,s:o}", "platform", jstr(got), "digest",
                                      jstr(img->platforms[i].digest.str)));
    }
    if (l->core)
        json_object_set_new(l->core, "matches", matches);
    else
        json_decref(matches);
}

static void respond_get(struct req *q)
{
    struct lookup *l = &q->lookups[0];
    json_t *doc = json_object();
    if (doc) {
        json_object_set_new(doc, "image", jstr(q->items[0].image));
        if (l->core)
            json_object_update(doc, l->core);
        else {
            json_decref(doc);
            doc = NULL;
        }
    }
    int status = l->err ? am_error_http_status(l->err) : 200;
    struct am_http_header ra = hdr("Retry-After", l->retry_after);
    respond_json(q->ex, status, doc, &ra, l->err == AM_ETOOMANYREQUESTS && l->retry_after[0]);
}

static void respond_batch(struct req *q)
{
    json_t *results = json_array(), *missing = json_array();
    size_t n_missing = 0, n_errors = 0;
    bool ok = results && missing;
    for (size_t i = 0; ok && i < q->n_items; i++) {
        const struct item *it = &q->items[i];
        const struct lookup *l = it->lookup >= 0 ? &q->lookups[it->lookup] : NULL;
        json_t *core = l ? l->core : it->core;
        json_t *o = json_object();
        if (!o || !core || json_object_set_new(o, "image", jstr(it->image)) ||
            json_object_update(o, core)) {
            json_decref(o);
            ok = false;
            break;
        }
        if (json_array_append_new(results, o)) { /* takes o, also on failure */
            ok = false;
            break;
        }
        if (json_object_get(core, "error")) n_errors++;
        if (l && l->missing && json_array_size(l->missing)) {
            json_t *m = json_pack("{s:o,s:O}", "image", jstr(it->image), "platforms", l->missing);
            ok = m && json_array_append_new(missing, m) == 0;
            n_missing++;
        }
    }
    json_t *doc = NULL;
    if (ok) doc = json_pack("{s:O,s:O}", "results", results, "missing", missing);
    json_decref(results);
    json_decref(missing);
    AM_INFO("%s platforms: %zu images, %zu lookups, %zu errors, %zu missing a required platform",
            q->ctx, q->n_items, q->n_lookups, n_errors, n_missing);
    respond_json(q->ex, 200, doc, NULL, 0);
}

static void pump(struct req *q);

static void on_lookup(void *arg, const struct am_imageinfo_result *r)
{
    struct lookup *l = arg;
    struct req *q = l->q;
    l->w = NULL;
    l->done = true;
    l->err = r->err;
    if (r->err) {
        snprintf(l->retry_after, sizeof l->retry_after, "%s", r->retry_after ? r->retry_after : "");
        AM_DEBUG("%s platforms: %s/%s: %s", q->ctx, l->t.ref.registry, l->t.ref.repository,
                 r->message ? r->message : am_error_message(r->err));
    }
    l->core = am_platformapi_result_json(&l->t, r);
    if (!r->err && q->batch.n_require) add_matches(l, r->image);
    q->in_flight--;
    q->n_done++;
    if (!q->pumping) pump(q); /* may answer and free q */
}

/* Starts lookups up to the concurrency bound; answers once all are done. */
static void pump(struct req *q)
{
    q->pumping = true;
    while (q->next_lookup < q->n_lookups && q->in_flight < AM_PLATFORMAPI_CONCURRENCY) {
        struct lookup *l = &q->lookups[q->next_lookup++];
        const struct am_reference *ref = &l->t.ref;
        struct am_imageinfo_query iq = {
            .up_idx = l->t.up_idx,
            .repo = ref->repository,
            .tag = ref->has_digest ? NULL : ref->tag,
            .digest = ref->has_digest ? &ref->digest : NULL,
            .log_ctx = q->ctx,
        };
        struct am_imageinfo_waiter *w = NULL;
        q->in_flight++;
        int rc = am_imageinfo_get(q->api->ii, &iq, on_lookup, l, &w);
        if (rc) {
            struct am_imageinfo_result r = {.err = rc, .retry_after = ""};
            on_lookup(l, &r); /* pumping: does not recurse */
        } else if (!l->done) {
            l->w = w;
        }
    }
    q->pumping = false;
    if (q->n_done == q->n_lookups) {
        if (q->is_get)
            respond_get(q);
        else
            respond_batch(q);
        q->ex = NULL;
        req_free(q);
    }
}

static struct req *req_new(struct am_platformapi *api, struct am_http_exchange *ex)
{
    const struct am_http_request *hr = am_http_request_of(ex);
    struct req *q = calloc(1, sizeof *q);
    if (!q) return NULL;
    q->api = api;
    q->ex = ex;
    snprintf(q->ctx, sizeof q->ctx, "c%llu r%llu", (unsigned long long)hr->conn_id,
             (unsigned long long)hr->id);
    q->next = api->reqs;
    if (api->reqs) api->reqs->prev = q;
    api->reqs = q;
    return q;
}

/* Adds the items and their (deduplicated) lookups. Returns 0 or AM_ENOMEM. */
static int req_plan(struct req *q)
{
    const struct am_config *cfg = q->api->cfg;
    size_t n = q->batch.n_images;
    q->items = calloc(n ? n : 1, sizeof *q->items);
    q->lookups = calloc(n ? n : 1, sizeof *q->lookups);
    json_t *keys = json_object();
    int rc = AM_ENOMEM;
    if (!q->items || !q->lookups || !keys) goto done;
    for (size_t i = 0; i < n; i++) {
        struct item *it = &q->items[q->n_items++];
        struct am_platformapi_target t;
        struct am_platformapi_error e;
        it->image = q->batch.images[i];
        it->lookup = -1;
        if (am_platformapi_parse_image(cfg, it->image, strlen(it->image), &t, &e) != 0) {
            it->core = am_platformapi_error_json(e.code, e.message);
            if (!it->core) goto done;
            continue;
        }
        char key[AM_NAME_MAX + AM_DIGEST_STR_MAX + 64];
        snprintf(key, sizeof key, "%zu\n%s\n%s%s", t.up_idx, t.ref.repository,
                 t.ref.has_digest ? "@" : ":", t.ref.has_digest ? t.ref.digest.str : t.ref.tag);
        json_t *have = json_object_get(keys, key);
        if (have) {
            it->lookup = (ssize_t)json_integer_value(have);
            /* The same image under another spelling: report the tag as this string says. */
            continue;
        }
        if (json_object_set_new(keys, key, json_integer((json_int_t)q->n_lookups))) goto done;
        it->lookup = (ssize_t)q->n_lookups;
        struct lookup *l = &q->lookups[q->n_lookups++];
        l->q = q;
        l->t = t;
    }
    rc = 0;
done:
    json_decref(keys);
    return rc;
}

static void handle_get(struct am_platformapi *api, struct am_http_exchange *ex,
                       const struct am_http_request *hr)
{
    struct am_platformapi_error e;
    char image[AM_PLATFORMAPI_IMAGE_MAX + 1];
    int rc = am_platformapi_query_param(hr->query, hr->query_len, "image", image, sizeof image);
    if (rc == AM_ENOT_FOUND) {
        set_err(&e, 400, "BAD_REQUEST",
                "query parameter image= is required, e.g. ?image=docker.io/library/nginx:1.27");
    } else if (rc == AM_ETOO_LARGE) {
        set_err(&e, 400, "REFERENCE_INVALID", "image reference longer than %d bytes",
                AM_PLATFORMAPI_IMAGE_MAX);
    } else if (rc) {
        set_err(&e, 400, "BAD_REQUEST",
                "image= must be given once and be validly %%-encoded (POST for several images)");
    }
    struct am_platformapi_target t;
    if (!rc && am_platformapi_parse_image(api->cfg, image, strlen(image), &t, &e) != 0) rc = -1;
    if (rc) {
        AM_INFO("c%llu r%llu GET %s: %d %s", (unsigned long long)hr->conn_id,
                (unsigned long long)hr->id, hr->path, e.status, e.message);
        json_t *doc = json_object();
        if (doc) {
            json_object_set_new(doc, "image", rc == -1 ? jstr(image) : json_null());
            json_t *ej = am_platformapi_error_json(e.code, e.message);
            if (!ej || json_object_update(doc, ej)) {
                json_decref(doc);
                doc = NULL;
            }
            json_decref(ej);
        }
        respond_json(ex, e.status, doc, NULL, 0);
        return;
    }
    struct req *q = req_new(api, ex);
    char *copy = strdup(image);
    if (!q || !copy || !(q->batch.images = calloc(1, sizeof *q->batch.images))) {
        free(copy);
        if (q) req_free(q);
        set_err(&e, 500, "NOMEM", "out of memory");
        respond_error(ex, &e, NULL, 0);
        return;
    }
    q->is_get = true;
    q->batch.images[0] = copy;
    q->batch.n_images = 1;
    if (req_plan(q) || q->n_lookups != 1) {
        req_free(q);
        set_err(&e, 500, "NOMEM", "out of memory");
        respond_error(ex, &e, NULL, 0);
        return;
    }
    am_http_set_callbacks(ex, NULL, on_req_gone, q);
    pump(q);
}

static void handle_post(struct am_platformapi *api, struct am_http_exchange *ex,
                        const struct am_http_request *hr)
{
    struct am_platformapi_error e;
    size_t len;
    const char *body = am_http_req_body(ex, &len);
    struct req *q = req_new(api, ex);
    if (!q) {
        set_err(&e, 500, "NOMEM", "out of memory");
        respond_error(ex, &e, NULL, 0);
        return;
    }
    int rc = am_platformapi_parse_batch(body, len, &q->batch, &e);
    if (rc == 0 && req_plan(q)) rc = AM_ENOMEM;
    if (rc) {
        if (rc == AM_ENOMEM)
            set_err(&e, 500, "NOMEM", "out of memory");
        else
            AM_INFO("%s POST %s: %d %s", q->ctx, hr->path, e.status, e.message);
        req_free(q);
        respond_error(ex, &e, NULL, 0);
        return;
    }
    AM_DEBUG("%s platforms: %zu images, %zu lookups, %zu required platforms", q->ctx, q->n_items,
             q->n_lookups, q->batch.n_require);
    am_http_set_callbacks(ex, NULL, on_req_gone, q);
    pump(q);
}

void am_platformapi_handle(struct am_platformapi *api, struct am_http_exchange *ex)
{
    const struct am_http_request *hr = am_http_request_of(ex);
    struct am_platformapi_error e;
    size_t n = sizeof AM_PLATFORMAPI_PATH - 1;
    /* The collection itself, with or without a trailing slash; nothing lives below it. */
    if (!(hr->path_len == n || (hr->path_len == n + 1 && hr->path[n] == '/'))) {
        set_err(&e, 404, "NOT_FOUND", "no such endpoint; the platform API is %s",
                AM_PLATFORMAPI_PATH);
        respond_error(ex, &e, NULL, 0);
        return;
    }
    if (strcmp(hr->method, "GET") == 0 || hr->is_head) {
        handle_get(api, ex, hr);
    } else if (strcmp(hr->method, "POST") == 0) {
        handle_post(api, ex, hr);
    } else {
        struct am_http_header allow = hdr("Allow", "GET, HEAD, POST");
        set_err(&e, 405, "METHOD_NOT_ALLOWED", "%s is not allowed here; use GET or POST",
                strlen(hr->method) < 16 ? hr->method : "this method");
        respond_error(ex, &e, &allow, 1);
    }
}

int am_platformapi_new(struct am_imageinfo *ii, const struct am_config *cfg,
                       struct am_platformapi **out)
{
    struct am_platformapi *api = calloc(1, sizeof *api);
    if (!api) return AM_ENOMEM;
    api->ii = ii;
    api->cfg = cfg;
    *out = api;
    return 0;
}

void am_platformapi_free(struct am_platformapi *api)
{
    if (!api) return;
    while (api->reqs) req_free(api->reqs); /* cancels lookups; exchanges untouched */
    free(api);
}

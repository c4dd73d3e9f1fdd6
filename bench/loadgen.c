/*
 * loadgen — the benchmark's load generator: K simulated nodes pulling images the way
 * containerd does, or one request repeated at a fixed concurrency, against one or more
 * targets, over archmirror's own HTTP client (include/archmirror/upstream.h).
 *
 * Modes (bench/README.md has the full story):
 *   pull  K nodes, each with its own platform (--platforms linux/arm64:30,linux/amd64:70),
 *         pull --pulls-per-node images each, one after the other (kubelet serialises
 *         pulls). A pull is: HEAD the tag (containerd's resolve) → GET the index by the
 *         digest the HEAD returned → GET the node's platform manifest (chosen from the
 *         index by am_platform_best_match, containerd's rules) → GET the config → GET the
 *         layers, --layer-concurrency at a time (containerd's max_concurrent_downloads,
 *         default 3). All nodes start together (a herd) unless --stagger-ms.
 *   get / head   --concurrency c workers repeat one --path for --duration seconds after
 *         --warmup seconds; latencies of requests started inside the window are kept.
 *   idle  opens --connections keep-alive connections (plain libuv TCP, one GET each so
 *         the server has seen a request) and holds them open for --hold seconds; the
 *         harness samples the server's RSS meanwhile (--ready-file marks the moment).
 *
 * Each target gets one am_upstream whose idle pool is sized to the concurrency, so
 * connections are reused like containerd's. Results go to stdout as one JSON document
 * (an array, one object per target) and as a Markdown table to --markdown FILE (or
 * stderr). Timings are wall-clock from uv_hrtime. This program is a measuring device: it
 * never retries, and it counts as an error every failed request, unexpected status, and
 * body whose length (or, with --verify, digest) differs from its descriptor.
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <jansson.h>
#include <math.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <uv.h>

#include "archmirror/buf.h"
#include "archmirror/digest.h"
#include "archmirror/error.h"
#include "archmirror/http.h"
#include "archmirror/log.h"
#include "archmirror/manifest.h"
#include "archmirror/mediatype.h"
#include "archmirror/platform.h"
#include "archmirror/upstream.h"

#define MAX_TARGETS   16
#define MAX_PLATFORMS 16
#define MAX_ERR_MSGS  8
#define MANIFEST_MAX  (4u << 20)
#define NS_PER_S      1000000000.0

/* What containerd 1.6/1.7 sends when it resolves a tag and fetches manifests. */
#define CONTAINERD_ACCEPT                                                                          \
    AM_MT_DOCKER_MANIFEST_S ", " AM_MT_DOCKER_LIST_S ", " AM_MT_OCI_MANIFEST_S                     \
                            ", " AM_MT_OCI_INDEX_S ", */*"

/* --- options ----------------------------------------------------------------------- */

struct target {
    char name[64];
    char url[256];
};

struct plat_weight {
    char spec[AM_PLATFORM_SPEC_MAX + 1];
    struct am_platform plat;
    unsigned weight;
    int current; /* smooth weighted round robin state */
};

enum mode { MODE_PULL, MODE_GET, MODE_HEAD, MODE_IDLE };

static struct {
    enum mode mode;
    struct target targets[MAX_TARGETS];
    size_t n_targets;
    /* pull */
    char **images;
    size_t n_images, cap_images;
    unsigned nodes;
    struct plat_weight plats[MAX_PLATFORMS];
    size_t n_plats;
    unsigned pulls_per_node;
    unsigned layer_conc;
    bool verify;
    const char *select; /* roundrobin | zipf */
    uint64_t seed;
    unsigned stagger_ms;
    /* get / head */
    const char *path;
    const char *accept;
    unsigned conc;
    double duration, warmup;
    int expect;
    /* idle */
    unsigned connections;
    double hold;
    unsigned connect_batch;
    const char *ready_file;
    /* output */
    const char *label;
    const char *md_out;
    size_t max_samples;
    double timeout_s;
} O = {
    .mode = MODE_PULL,
    .nodes = 1,
    .pulls_per_node = 1,
    .layer_conc = 3,
    .select = "roundrobin",
    .seed = 1,
    .accept = NULL,
    .conc = 1,
    .duration = 5,
    .warmup = 1,
    .expect = 200,
    .connections = 1000,
    .hold = 5,
    .connect_batch = 256,
    .max_samples = 20000,
    .timeout_s = 600,
};

/* --- latency samples --------------------------------------------------------------- */

struct lat {
    uint64_t *v; /* ns */
    size_t n, cap;
};

static void lat_add(struct lat *l, uint64_t ns)
{
    if (l->n == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 4096;
        uint64_t *v = realloc(l->v, cap * sizeof *v);
        if (!v) return; /* a lost sample under OOM; counted nowhere, rare */
        l->v = v;
        l->cap = cap;
    }
    l->v[l->n++] = ns;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* Nearest-rank percentile of a sorted array. */
static double lat_pct_s(const struct lat *l, double p)
{
    if (!l->n) return 0;
    size_t rank = (size_t)ceil(p / 100.0 * (double)l->n);
    if (rank < 1) rank = 1;
    if (rank > l->n) rank = l->n;
    return (double)l->v[rank - 1] / NS_PER_S;
}

static json_t *lat_json(struct lat *l)
{
    if (l->n) qsort(l->v, l->n, sizeof *l->v, cmp_u64);
    double sum = 0;
    for (size_t i = 0; i < l->n; i++) sum += (double)l->v[i];
    json_t *o = json_object();
    json_object_set_new(o, "n", json_integer((json_int_t)l->n));
    json_object_set_new(o, "min", json_real(l->n ? (double)l->v[0] / NS_PER_S : 0));
    json_object_set_new(o, "mean", json_real(l->n ? sum / (double)l->n / NS_PER_S : 0));
    json_object_set_new(o, "p50", json_real(lat_pct_s(l, 50)));
    json_object_set_new(o, "p90", json_real(lat_pct_s(l, 90)));
    json_object_set_new(o, "p99", json_real(lat_pct_s(l, 99)));
    json_object_set_new(o, "p999", json_real(lat_pct_s(l, 99.9)));
    json_object_set_new(o, "max", json_real(l->n ? (double)l->v[l->n - 1] / NS_PER_S : 0));
    return o;
}

/* Up to max evenly spaced quantiles of a sorted array (for the CDF chart). */
static json_t *lat_samples_json(const struct lat *l, size_t max)
{
    json_t *a = json_array();
    if (!l->n) return a;
    size_t n = l->n < max ? l->n : max;
    for (size_t i = 0; i < n; i++) {
        size_t k = n == l->n ? i : (size_t)((double)i * (double)(l->n - 1) / (double)(n - 1));
        json_array_append_new(a, json_real((double)l->v[k] / NS_PER_S));
    }
    return a;
}

/* --- a set of digests seen, for "image bytes" -------------------------------------- */

struct seen {
    char (*keys)[AM_DIGEST_STR_MAX + 1];
    uint64_t *sizes;
    size_t n, cap; /* cap is a power of two */
    uint64_t total;
};

static uint64_t fnv1a(const char *s)
{
    uint64_t h = 1469598103934665603ull;
    for (; *s; s++) h = (h ^ (unsigned char)*s) * 1099511628211ull;
    return h;
}

static void seen_add(struct seen *st, const char *digest, uint64_t size);

static void seen_grow(struct seen *st)
{
    struct seen old = *st;
    size_t cap = old.cap ? old.cap * 2 : 256;
    st->keys = calloc(cap, sizeof *st->keys);
    st->sizes = calloc(cap, sizeof *st->sizes);
    if (!st->keys || !st->sizes) {
        free(st->keys);
        free(st->sizes);
        *st = old; /* keep the old table; the set is a statistic */
        return;
    }
    st->cap = cap;
    st->n = 0;
    st->total = 0;
    for (size_t i = 0; i < old.cap; i++)
        if (old.keys[i][0]) seen_add(st, old.keys[i], old.sizes[i]);
    free(old.keys);
    free(old.sizes);
}

static void seen_add(struct seen *st, const char *digest, uint64_t size)
{
    if ((st->n + 1) * 2 > st->cap) seen_grow(st);
    if (!st->cap || st->n + 1 >= st->cap) return; /* could not grow: drop the sample */
    size_t i = (size_t)fnv1a(digest) & (st->cap - 1);
    while (st->keys[i][0]) {
        if (strcmp(st->keys[i], digest) == 0) return;
        i = (i + 1) & (st->cap - 1);
    }
    snprintf(st->keys[i], sizeof st->keys[i], "%s", digest);
    st->sizes[i] = size;
    st->n++;
    st->total += size;
}

static void seen_free(struct seen *st)
{
    free(st->keys);
    free(st->sizes);
    memset(st, 0, sizeof *st);
}

/* --- one run: one target, one workload --------------------------------------------- */

struct node;
struct op;

struct run {
    uv_loop_t *loop;
    const struct target *t;
    struct am_upstream *up;
    uv_timer_t deadline; /* --timeout: cancels everything */
    uv_timer_t window;   /* get/head: warmup end, then measurement end; pull: stagger */
    bool window_open;    /* get/head: inside the measurement window */
    bool stopping;       /* no new requests */
    bool timed_out;
    unsigned active; /* workers or nodes still running */
    uint64_t t_start, t_end, m_start, m_end;

    uint64_t requests, req_errors, bytes;
    uint64_t pulls_ok, pulls_failed;
    uint64_t err_by_code[64];
    char err_msgs[MAX_ERR_MSGS][200];
    size_t n_err_msgs;
    struct lat req_lat, pull_lat, meta_lat, blob_lat;
    struct seen objects; /* unique objects fetched by pulls */
    unsigned plat_nodes[MAX_PLATFORMS];

    struct node *nodes;
    unsigned next_node; /* stagger */
    struct op *workers;
};

static void run_error(struct run *r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void run_error(struct run *r, const char *fmt, ...)
{
    r->req_errors++;
    if (r->n_err_msgs >= MAX_ERR_MSGS) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(r->err_msgs[r->n_err_msgs++], sizeof r->err_msgs[0], fmt, ap);
    va_end(ap);
}

static void run_maybe_finish(struct run *r);

/* --- requests ---------------------------------------------------------------------- */

enum op_kind { OP_RESOLVE, OP_TOP, OP_CHILD, OP_CONFIG, OP_LAYER, OP_SIMPLE };

static const char *op_kind_name(enum op_kind k)
{
    static const char *names[] = {"HEAD tag",   "GET index", "GET manifest",
                                  "GET config", "GET layer", "request"};
    return names[k];
}

struct op {
    struct run *r;
    struct node *node; /* pull ops */
    enum op_kind kind;
    struct am_upstream_req *req;
    char path[512];
    uint64_t t0;
    int status;
    bool got_head;
    char ct[AM_MEDIATYPE_MAX + 1];
    bool has_digest;
    struct am_digest hdr_digest;
    struct am_buf body; /* manifests */
    bool overflow;      /* the manifest exceeded MANIFEST_MAX: an error at on_done */
    uint64_t got;
    int64_t want; /* descriptor size, -1 unknown */
    struct am_digest expect;
    bool hashing;
    struct am_hasher hasher;
    uv_timer_t retry; /* simple mode: paces a worker after a synchronous failure */
    bool retry_init;
};

static void on_op_head(void *arg, const struct am_upstream_response *resp)
{
    struct op *op = arg;
    op->got_head = true;
    op->status = resp->status;
    const struct am_http_header *h;
    op->ct[0] = '\0';
    if ((h = am_http_header_find(resp->headers, resp->n_headers, "content-type"))) {
        size_t n = h->value_len < sizeof op->ct - 1 ? h->value_len : sizeof op->ct - 1;
        memcpy(op->ct, h->value, n);
        op->ct[n] = '\0';
    }
    op->has_digest = false;
    if ((h = am_http_header_find(resp->headers, resp->n_headers, "docker-content-digest")))
        op->has_digest = am_digest_parse(h->value, h->value_len, &op->hdr_digest) == 0;
}

static void on_op_body(void *arg, const char *data, size_t len)
{
    struct op *op = arg;
    op->r->bytes += len;
    op->got += len;
    if (op->kind == OP_TOP || op->kind == OP_CHILD) {
        if (!op->overflow && am_buf_append(&op->body, data, len) != 0) op->overflow = true;
    } else if (op->hashing) {
        am_hasher_update(&op->hasher, data, len);
    }
}

static void on_op_done(void *arg, int err);
static const struct am_upstream_cbs op_cbs = {on_op_head, on_op_body, on_op_done};

/* Starts op (path already set). Returns 0 or an AM_E* code (no callback then). */
static int op_start(struct op *op, const char *method, const char *accept)
{
    struct am_upstream_request_opts ro = {.method = method, .path = op->path, .accept = accept};
    if (!op->r->up) return AM_ECANCELED; /* the run timed out */
    op->t0 = uv_hrtime();
    op->overflow = false;
    op->status = 0;
    op->got_head = false;
    op->got = 0;
    op->has_digest = false;
    op->ct[0] = '\0';
    am_buf_reset(&op->body);
    int rc = am_upstream_request(op->r->up, &ro, &op_cbs, op, &op->req);
    if (rc) op->req = NULL;
    return rc;
}

static unsigned err_slot(int err)
{
    int i = err - (int)AM_ERR_FIRST_;
    return i > 0 && i < 64 ? (unsigned)i : 0;
}

/* Common bookkeeping of a finished request; returns true when it succeeded. */
static bool op_account(struct op *op, int err, int expect)
{
    struct run *r = op->r;
    uint64_t now = uv_hrtime();
    r->requests++;
    if (err) {
        r->err_by_code[err_slot(err)]++;
        run_error(r, "%s %s: %s%s%s", op_kind_name(op->kind), op->path, am_error_name(err),
                  op->req && am_upstream_req_message(op->req)[0] ? ": " : "",
                  op->req ? am_upstream_req_message(op->req) : "");
        return false;
    }
    if (op->overflow) {
        run_error(r, "%s %s: body larger than %u bytes", op_kind_name(op->kind), op->path,
                  MANIFEST_MAX);
        return false;
    }
    if (op->status != expect) {
        run_error(r, "%s %s: status %d, expected %d", op_kind_name(op->kind), op->path, op->status,
                  expect);
        return false;
    }
    if (op->kind == OP_SIMPLE) {
        if (r->window_open && op->t0 >= r->m_start) lat_add(&r->req_lat, now - op->t0);
    } else {
        lat_add(&r->req_lat, now - op->t0);
    }
    return true;
}

/* --- get / head mode --------------------------------------------------------------- */

static void worker_next(struct op *op);

static void on_retry_timer(uv_timer_t *t)
{
    worker_next(t->data);
}

static void worker_next(struct op *op)
{
    struct run *r = op->r;
    if (r->stopping) {
        r->active--;
        run_maybe_finish(r);
        return;
    }
    snprintf(op->path, sizeof op->path, "%s", O.path);
    int rc = op_start(op, O.mode == MODE_HEAD ? "HEAD" : "GET", O.accept);
    if (rc) {
        r->requests++;
        r->err_by_code[err_slot(rc)]++;
        run_error(r, "request %s: %s (not sent)", O.path, am_error_name(rc));
        uv_timer_start(&op->retry, on_retry_timer, 10, 0);
    }
}

static void simple_done(struct op *op, int err)
{
    op_account(op, err, O.expect);
    op->req = NULL;
    worker_next(op);
}

static void on_window(uv_timer_t *t)
{
    struct run *r = t->data;
    if (!r->window_open) {
        r->window_open = true;
        r->m_start = uv_hrtime();
        uv_timer_start(&r->window, on_window, (uint64_t)(O.duration * 1000), 0);
        return;
    }
    r->m_end = uv_hrtime();
    r->window_open = false;
    r->stopping = true;
}

static void simple_start(struct run *r)
{
    r->workers = calloc(O.conc, sizeof *r->workers);
    if (!r->workers) {
        fprintf(stderr, "loadgen: out of memory\n");
        exit(1);
    }
    r->active = O.conc;
    for (unsigned i = 0; i < O.conc; i++) {
        struct op *op = &r->workers[i];
        op->r = r;
        op->kind = OP_SIMPLE;
        am_buf_init(&op->body, MANIFEST_MAX);
        uv_timer_init(r->loop, &op->retry);
        op->retry.data = op;
        op->retry_init = true;
    }
    uv_timer_start(&r->window, on_window, (uint64_t)(O.warmup * 1000), 0);
    if (O.warmup <= 0) on_window(&r->window);
    for (unsigned i = 0; i < O.conc; i++) worker_next(&r->workers[i]);
}

/* --- pull mode --------------------------------------------------------------------- */

struct node {
    struct run *r;
    unsigned id;
    size_t plat_idx;
    unsigned pulls_done;
    uint64_t rng;
    /* the pull in progress */
    const char *image;
    char repo[256];
    char tag[160];
    uint64_t t0, t_meta;
    bool failed;
    struct am_manifest man;
    bool have_man;
    size_t next_layer;
    unsigned inflight;
    struct op *ops; /* layer_conc + 1 slots */
    struct op meta; /* resolve, index, manifest, config */
};

static uint64_t splitmix(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* Which image a node pulls next: round robin from a per-node offset, or Zipf(1) over
 * the list (a fleet where a few images are everywhere and most are rare). */
static const char *pick_image(struct node *n)
{
    if (O.n_images == 1) return O.images[0];
    if (strcmp(O.select, "zipf") == 0) {
        double h = 0;
        for (size_t i = 0; i < O.n_images; i++) h += 1.0 / (double)(i + 1);
        double u = (double)(splitmix(&n->rng) >> 11) / 9007199254740992.0 * h;
        for (size_t i = 0; i < O.n_images; i++) {
            u -= 1.0 / (double)(i + 1);
            if (u <= 0) return O.images[i];
        }
        return O.images[O.n_images - 1];
    }
    return O.images[(n->id + n->pulls_done) % O.n_images];
}

static void node_next_pull(struct node *n);
static void node_finish_pull(struct node *n);

static void node_fail(struct node *n, struct op *op)
{
    (void)op;
    n->failed = true;
    if (n->inflight == 0) node_finish_pull(n);
}

static void node_finish_pull(struct node *n)
{
    struct run *r = n->r;
    uint64_t now = uv_hrtime();
    if (n->failed) {
        r->pulls_failed++;
    } else {
        r->pulls_ok++;
        lat_add(&r->pull_lat, now - n->t0);
    }
    if (n->have_man) {
        am_manifest_cleanup(&n->man);
        n->have_man = false;
    }
    n->pulls_done++;
    node_next_pull(n);
}

static int split_ref(const char *ref, char *repo, size_t rcap, char *tag, size_t tcap)
{
    const char *at = strchr(ref, '@');
    const char *colon = strrchr(ref, ':');
    const char *slash = strrchr(ref, '/');
    const char *sep = at ? at : (colon && (!slash || colon > slash) ? colon : NULL);
    if (!sep) {
        snprintf(repo, rcap, "%s", ref);
        snprintf(tag, tcap, "latest");
        return 0;
    }
    if ((size_t)(sep - ref) >= rcap) return -1;
    memcpy(repo, ref, (size_t)(sep - ref));
    repo[sep - ref] = '\0';
    snprintf(tag, tcap, "%s", sep + 1);
    return 0;
}

/* Starts one request of a pull. Returns 0, or an error already counted (the caller
 * then fails the pull). */
static int pull_op_start(struct node *n, struct op *op, enum op_kind kind, const char *method,
                         const char *what, const char *accept)
{
    op->kind = kind;
    snprintf(op->path, sizeof op->path, "/v2/%s/%s/%s", n->repo,
             kind == OP_CONFIG || kind == OP_LAYER ? "blobs" : "manifests", what);
    int rc = op_start(op, method, accept);
    if (rc) {
        n->r->requests++;
        n->r->err_by_code[err_slot(rc)]++;
        run_error(n->r, "%s %s: %s (not sent)", op_kind_name(kind), op->path, am_error_name(rc));
        return rc;
    }
    n->inflight++;
    return 0;
}

static int start_blob(struct node *n, struct op *op, enum op_kind kind,
                      const struct am_descriptor *d)
{
    op->want = d->size;
    op->expect = d->digest;
    if (op->hashing) am_hasher_cleanup(&op->hasher);
    op->hashing = O.verify && am_hasher_init(&op->hasher, d->digest.alg) == 0;
    seen_add(&n->r->objects, d->digest.str, d->size >= 0 ? (uint64_t)d->size : 0);
    return pull_op_start(n, op, kind, "GET", d->digest.str, NULL);
}

static void start_layers(struct node *n)
{
    while (!n->failed && n->next_layer < n->man.n_entries && n->inflight < O.layer_conc) {
        struct op *op = NULL;
        for (unsigned i = 0; i < O.layer_conc; i++)
            if (!n->ops[i].req) {
                op = &n->ops[i];
                break;
            }
        if (!op) break;
        if (start_blob(n, op, OP_LAYER, &n->man.entries[n->next_layer++])) n->failed = true;
    }
    if (n->inflight == 0) node_finish_pull(n);
}

/* Checks a finished blob body against its descriptor. */
static bool blob_ok(struct node *n, struct op *op)
{
    if (op->want >= 0 && op->got != (uint64_t)op->want) {
        run_error(n->r, "%s %s: %" PRIu64 " bytes, descriptor says %" PRId64,
                  op_kind_name(op->kind), op->path, op->got, op->want);
        return false;
    }
    if (op->hashing) {
        struct am_digest got;
        am_hasher_final(&op->hasher, &got);
        am_hasher_cleanup(&op->hasher);
        op->hashing = false;
        if (!am_digest_equal(&got, &op->expect)) {
            run_error(n->r, "%s %s: digest mismatch (%s)", op_kind_name(op->kind), op->path,
                      got.str);
            return false;
        }
    }
    return true;
}

/* A manifest body arrived: parse it and take the next step. */
static void on_manifest(struct node *n, struct op *op)
{
    struct run *r = n->r;
    struct am_manifest m;
    char msg[200];
    int rc = am_manifest_parse(op->body.data ? op->body.data : "", op->body.len, op->ct, &m, msg,
                               sizeof msg);
    if (rc) {
        run_error(r, "%s %s: %s", op_kind_name(op->kind), op->path, msg);
        node_fail(n, op);
        return;
    }
    struct am_digest d;
    am_digest_of(AM_DIGEST_SHA256, op->body.data ? op->body.data : "", op->body.len, &d);
    seen_add(&r->objects, d.str, op->body.len);

    if (am_mediatype_is_index(m.kind)) {
        size_t e;
        const struct am_platform *want = &O.plats[n->plat_idx].plat;
        rc = am_platform_best_match(&m, want, &e);
        if (rc || op->kind != OP_TOP) {
            run_error(r, "%s %s: %s", op_kind_name(op->kind), op->path,
                      rc ? "no manifest for the node's platform" : "nested index");
            am_manifest_cleanup(&m);
            node_fail(n, op);
            return;
        }
        char dig[AM_DIGEST_STR_MAX + 1];
        snprintf(dig, sizeof dig, "%s", m.entries[e].digest.str);
        am_manifest_cleanup(&m);
        if (pull_op_start(n, op, OP_CHILD, "GET", dig, CONTAINERD_ACCEPT)) node_fail(n, op);
        return;
    }
    n->man = m;
    n->have_man = true;
    n->t_meta = uv_hrtime();
    lat_add(&r->meta_lat, n->t_meta - n->t0);
    n->next_layer = 0;
    if (m.has_config) {
        if (start_blob(n, op, OP_CONFIG, &m.config)) node_fail(n, op);
        return;
    }
    start_layers(n);
}

static void pull_done(struct op *op, int err)
{
    struct node *n = op->node;
    struct run *r = n->r;
    n->inflight--;
    bool ok = op_account(op, err, 200); /* op->req still valid: its message */
    op->req = NULL;
    if (ok && op->kind == OP_RESOLVE && !op->has_digest) {
        run_error(r, "HEAD %s: no Docker-Content-Digest", op->path);
        ok = false;
    }
    if (ok && (op->kind == OP_CONFIG || op->kind == OP_LAYER)) ok = blob_ok(n, op);
    if (op->kind == OP_LAYER) lat_add(&r->blob_lat, uv_hrtime() - op->t0);
    if (!ok || n->failed) {
        node_fail(n, op);
        return;
    }
    switch (op->kind) {
    case OP_RESOLVE: {
        char dig[AM_DIGEST_STR_MAX + 1];
        snprintf(dig, sizeof dig, "%s", op->hdr_digest.str);
        if (pull_op_start(n, op, OP_TOP, "GET", dig, CONTAINERD_ACCEPT)) node_fail(n, op);
        break;
    }
    case OP_TOP:
    case OP_CHILD: on_manifest(n, op); break;
    case OP_CONFIG: start_layers(n); break;
    case OP_LAYER: start_layers(n); break;
    case OP_SIMPLE: break;
    }
}

static void node_next_pull(struct node *n)
{
    struct run *r = n->r;
    if (n->pulls_done >= O.pulls_per_node || r->stopping) {
        r->active--;
        run_maybe_finish(r);
        return;
    }
    n->image = pick_image(n);
    n->failed = false;
    n->inflight = 0;
    if (split_ref(n->image, n->repo, sizeof n->repo, n->tag, sizeof n->tag)) {
        run_error(r, "bad image reference %s", n->image);
        n->failed = true;
        node_finish_pull(n);
        return;
    }
    n->t0 = uv_hrtime();
    if (pull_op_start(n, &n->meta, OP_RESOLVE, "HEAD", n->tag, CONTAINERD_ACCEPT)) {
        n->failed = true;
        node_finish_pull(n);
    }
}

static void node_start(struct run *r, unsigned i)
{
    struct node *n = &r->nodes[i];
    node_next_pull(n);
}

static void on_stagger(uv_timer_t *t)
{
    struct run *r = t->data;
    if (r->next_node < O.nodes) node_start(r, r->next_node++);
    if (r->next_node >= O.nodes) uv_timer_stop(t);
}

static void op_init(struct op *op, struct run *r, struct node *n)
{
    op->r = r;
    op->node = n;
    am_buf_init(&op->body, MANIFEST_MAX);
}

static void pull_start(struct run *r)
{
    r->nodes = calloc(O.nodes, sizeof *r->nodes);
    if (!r->nodes) {
        fprintf(stderr, "loadgen: out of memory\n");
        exit(1);
    }
    /* Platforms in proportion to their weights, interleaved (smooth weighted round robin). */
    unsigned total = 0;
    for (size_t j = 0; j < O.n_plats; j++) {
        total += O.plats[j].weight;
        O.plats[j].current = 0;
    }
    for (unsigned i = 0; i < O.nodes; i++) {
        struct node *n = &r->nodes[i];
        n->r = r;
        n->id = i;
        n->rng = O.seed * 1000003u + i;
        size_t best = 0;
        for (size_t j = 0; j < O.n_plats; j++) {
            O.plats[j].current += (int)O.plats[j].weight;
            if (O.plats[j].current > O.plats[best].current) best = j;
        }
        O.plats[best].current -= (int)total;
        n->plat_idx = best;
        r->plat_nodes[best]++;
        n->ops = calloc(O.layer_conc, sizeof *n->ops);
        if (!n->ops) {
            fprintf(stderr, "loadgen: out of memory\n");
            exit(1);
        }
        op_init(&n->meta, r, n);
        for (unsigned k = 0; k < O.layer_conc; k++) op_init(&n->ops[k], r, n);
    }
    r->active = O.nodes;
    if (O.stagger_ms) {
        r->next_node = 0;
        uv_timer_start(&r->window, on_stagger, 0, O.stagger_ms);
    } else {
        for (unsigned i = 0; i < O.nodes; i++) node_start(r, i);
    }
}

static void on_op_done(void *arg, int err)
{
    struct op *op = arg;
    if (op->kind == OP_SIMPLE) {
        simple_done(op, err);
    } else {
        pull_done(op, err);
    }
}

/* --- run lifetime ------------------------------------------------------------------ */

static void on_deadline(uv_timer_t *t)
{
    struct run *r = t->data;
    fprintf(stderr, "loadgen: %s: timed out after %.0f s; cancelling\n", r->t->name, O.timeout_s);
    r->timed_out = true;
    r->stopping = true;
    struct am_upstream *up = r->up;
    r->up = NULL;
    am_upstream_free(up); /* every in-flight request ends with AM_ECANCELED */
}

static void run_maybe_finish(struct run *r)
{
    if (r->active) return;
    r->t_end = uv_hrtime();
    if (!r->m_end) r->m_end = r->t_end;
    uv_timer_stop(&r->deadline);
    uv_timer_stop(&r->window);
    uv_close((uv_handle_t *)&r->deadline, NULL);
    uv_close((uv_handle_t *)&r->window, NULL);
    if (r->workers)
        for (unsigned i = 0; i < O.conc; i++) uv_close((uv_handle_t *)&r->workers[i].retry, NULL);
    if (r->up) {
        struct am_upstream *up = r->up;
        r->up = NULL;
        am_upstream_free(up);
    }
}

/* --- idle mode: many quiet keep-alive connections ---------------------------------- */

struct iconn {
    uv_tcp_t tcp;
    uv_connect_t creq;
    uv_write_t wreq;
    struct irun *ir;
    char rbuf[1024];
    bool answered, closed;
};

struct irun {
    uv_loop_t *loop;
    struct sockaddr_storage addr;
    char request[512];
    struct iconn *conns;
    unsigned started, answered, failed, closed_by_peer;
    uv_timer_t hold;
    uint64_t t_start, t_established;
    bool holding;
    char first_err[200];
};

static void irun_next(struct irun *ir);

static void i_alloc(uv_handle_t *h, size_t sz, uv_buf_t *b)
{
    struct iconn *c = h->data;
    *b = uv_buf_init(c->rbuf, sizeof c->rbuf);
}

static void i_fail(struct iconn *c, const char *what, int err)
{
    struct irun *ir = c->ir;
    if (!ir->first_err[0])
        snprintf(ir->first_err, sizeof ir->first_err, "%s: %s", what, uv_strerror(err));
    if (!c->closed) {
        c->closed = true;
        uv_close((uv_handle_t *)&c->tcp, NULL);
    }
}

static void i_check_done(struct irun *ir);

static void i_read(uv_stream_t *s, ssize_t n, const uv_buf_t *b)
{
    struct iconn *c = s->data;
    struct irun *ir = c->ir;
    if (n < 0) {
        if (c->answered)
            ir->closed_by_peer++;
        else
            ir->failed++;
        i_fail(c, c->answered ? "closed while idle" : "read", (int)n);
        i_check_done(ir);
        irun_next(ir);
        return;
    }
    if (n > 0 && !c->answered) {
        c->answered = true;
        ir->answered++;
        i_check_done(ir);
        irun_next(ir);
    }
}

static void i_written(uv_write_t *w, int status)
{
    struct iconn *c = w->data;
    if (status && !c->closed) {
        c->ir->failed++;
        i_fail(c, "write", status);
        i_check_done(c->ir);
        irun_next(c->ir);
    }
}

static void i_connected(uv_connect_t *req, int status)
{
    struct iconn *c = req->data;
    struct irun *ir = c->ir;
    if (c->closed) return;
    if (status) {
        ir->failed++;
        i_fail(c, "connect", status);
        i_check_done(ir);
        irun_next(ir);
        return;
    }
    uv_buf_t b = uv_buf_init(ir->request, (unsigned)strlen(ir->request));
    c->wreq.data = c;
    int rc = uv_write(&c->wreq, (uv_stream_t *)&c->tcp, &b, 1, i_written);
    if (!rc) rc = uv_read_start((uv_stream_t *)&c->tcp, i_alloc, i_read);
    if (rc) {
        ir->failed++;
        i_fail(c, "write", rc);
        i_check_done(ir);
        irun_next(ir);
    }
}

/* Keeps at most connect_batch connections between connect and first response. */
static void irun_next(struct irun *ir)
{
    while (ir->started < O.connections &&
           ir->started - ir->answered - ir->failed < O.connect_batch) {
        struct iconn *c = &ir->conns[ir->started++];
        c->ir = ir;
        uv_tcp_init(ir->loop, &c->tcp);
        c->tcp.data = c;
        c->creq.data = c;
        int rc = uv_tcp_connect(&c->creq, &c->tcp, (const struct sockaddr *)&ir->addr, i_connected);
        if (rc) {
            ir->failed++;
            i_fail(c, "connect", rc);
        }
    }
    i_check_done(ir); /* the last ones may have failed synchronously */
}

static void on_hold(uv_timer_t *t)
{
    struct irun *ir = t->data;
    for (unsigned i = 0; i < ir->started; i++) {
        struct iconn *c = &ir->conns[i];
        if (!c->closed) {
            c->closed = true;
            uv_close((uv_handle_t *)&c->tcp, NULL);
        }
    }
    uv_close((uv_handle_t *)&ir->hold, NULL);
}

static void i_check_done(struct irun *ir)
{
    if (ir->holding || ir->answered + ir->failed < O.connections) return;
    ir->holding = true;
    ir->t_established = uv_hrtime();
    fprintf(stderr, "loadgen: idle: %u connections answered, %u failed; holding %.1f s\n",
            ir->answered, ir->failed, O.hold);
    if (O.ready_file) {
        FILE *f = fopen(O.ready_file, "w");
        if (f) {
            fprintf(f, "%u\n", ir->answered);
            fclose(f);
        }
    }
    uv_timer_start(&ir->hold, on_hold, (uint64_t)(O.hold * 1000), 0);
}

static int parse_hostport(const char *url, struct sockaddr_storage *ss, char *host, size_t hcap)
{
    const char *p = strstr(url, "://");
    p = p ? p + 3 : url;
    const char *colon = strrchr(p, ':');
    if (!colon) return -1;
    size_t hl = (size_t)(colon - p);
    if (hl >= hcap) return -1;
    memcpy(host, p, hl);
    host[hl] = '\0';
    int port = atoi(colon + 1);
    if (host[0] == '[') {
        char h6[64];
        snprintf(h6, sizeof h6, "%.*s", (int)(hl - 2), host + 1);
        return uv_ip6_addr(h6, port, (struct sockaddr_in6 *)ss);
    }
    return uv_ip4_addr(host, port, (struct sockaddr_in *)ss);
}

static json_t *idle_run(uv_loop_t *loop, const struct target *t)
{
    struct irun ir;
    memset(&ir, 0, sizeof ir);
    ir.loop = loop;
    char host[128];
    if (parse_hostport(t->url, &ir.addr, host, sizeof host)) {
        fprintf(stderr, "loadgen: idle mode needs http://IP:PORT, not %s\n", t->url);
        exit(2);
    }
    const char *hp = strstr(t->url, "://");
    hp = hp ? hp + 3 : t->url;
    snprintf(ir.request, sizeof ir.request,
             "GET %s HTTP/1.1\r\nHost: %.*s\r\nUser-Agent: archmirror-loadgen\r\n\r\n",
             O.path ? O.path : "/v2/", (int)strcspn(hp, "/"), hp);
    ir.conns = calloc(O.connections, sizeof *ir.conns);
    if (!ir.conns) exit(1);
    uv_timer_init(loop, &ir.hold);
    ir.hold.data = &ir;
    ir.t_start = uv_hrtime();
    irun_next(&ir);
    uv_run(loop, UV_RUN_DEFAULT);
    json_t *o = json_object();
    json_object_set_new(o, "target", json_string(t->name));
    json_object_set_new(o, "url", json_string(t->url));
    json_object_set_new(o, "mode", json_string("idle"));
    if (O.label) json_object_set_new(o, "label", json_string(O.label));
    json_object_set_new(o, "connections", json_integer(O.connections));
    json_object_set_new(o, "answered", json_integer(ir.answered));
    json_object_set_new(o, "failed", json_integer(ir.failed));
    json_object_set_new(o, "closed_by_server_while_idle", json_integer(ir.closed_by_peer));
    json_object_set_new(o, "errors", json_integer(ir.failed + ir.closed_by_peer));
    json_object_set_new(o, "establish_s",
                        json_real((double)(ir.t_established - ir.t_start) / NS_PER_S));
    json_object_set_new(o, "hold_s", json_real(O.hold));
    if (ir.first_err[0]) json_object_set_new(o, "first_error", json_string(ir.first_err));
    free(ir.conns);
    return o;
}

/* --- a run and its report ---------------------------------------------------------- */

static json_t *run_json(struct run *r)
{
    json_t *o = json_object();
    json_object_set_new(o, "target", json_string(r->t->name));
    json_object_set_new(o, "url", json_string(r->t->url));
    static const char *modes[] = {"pull", "get", "head", "idle"};
    json_object_set_new(o, "mode", json_string(modes[O.mode]));
    if (O.label) json_object_set_new(o, "label", json_string(O.label));
    double wall = (double)(r->t_end - r->t_start) / NS_PER_S;
    double win = O.mode == MODE_PULL ? wall : (double)(r->m_end - r->m_start) / NS_PER_S;
    json_object_set_new(o, "wall_s", json_real(wall));
    json_object_set_new(o, "window_s", json_real(win));
    json_object_set_new(o, "requests", json_integer((json_int_t)r->requests));
    json_object_set_new(o, "errors", json_integer((json_int_t)r->req_errors));
    json_object_set_new(o, "timed_out", json_boolean(r->timed_out));
    json_object_set_new(o, "bytes", json_integer((json_int_t)r->bytes));
    uint64_t counted = O.mode == MODE_PULL ? r->requests : r->req_lat.n;
    json_object_set_new(o, "req_per_s", json_real(win > 0 ? (double)counted / win : 0));
    json_object_set_new(o, "bytes_per_s",
                        json_real(win > 0 && O.mode == MODE_PULL ? (double)r->bytes / win : 0));
    if (O.mode != MODE_PULL && win > 0 && r->req_lat.n) {
        /* bytes per request are equal in these modes: scale to the window's requests */
        double per = r->requests ? (double)r->bytes / (double)r->requests : 0;
        json_object_set_new(o, "bytes_per_s", json_real(per * (double)r->req_lat.n / win));
    }
    json_object_set_new(o, "request_latency_s", lat_json(&r->req_lat));
    if (O.mode == MODE_PULL) {
        json_object_set_new(o, "nodes", json_integer(O.nodes));
        json_object_set_new(o, "pulls_per_node", json_integer(O.pulls_per_node));
        json_object_set_new(o, "layer_concurrency", json_integer(O.layer_conc));
        json_object_set_new(o, "pulls_ok", json_integer((json_int_t)r->pulls_ok));
        json_object_set_new(o, "pulls_failed", json_integer((json_int_t)r->pulls_failed));
        json_t *pl = json_object();
        for (size_t j = 0; j < O.n_plats; j++)
            json_object_set_new(pl, O.plats[j].spec, json_integer(r->plat_nodes[j]));
        json_object_set_new(o, "platform_nodes", pl);
        json_object_set_new(o, "n_images", json_integer((json_int_t)O.n_images));
        if (O.n_images <= 16) {
            json_t *imgs = json_array();
            for (size_t i = 0; i < O.n_images; i++)
                json_array_append_new(imgs, json_string(O.images[i]));
            json_object_set_new(o, "images", imgs);
        }
        json_object_set_new(o, "unique_objects", json_integer((json_int_t)r->objects.n));
        json_object_set_new(o, "image_bytes", json_integer((json_int_t)r->objects.total));
        json_object_set_new(o, "pull_latency_s", lat_json(&r->pull_lat));
        json_object_set_new(o, "meta_latency_s", lat_json(&r->meta_lat));
        json_object_set_new(o, "layer_latency_s", lat_json(&r->blob_lat));
        json_object_set_new(o, "pull_samples_s", lat_samples_json(&r->pull_lat, O.max_samples));
    } else {
        json_object_set_new(o, "path", json_string(O.path));
        json_object_set_new(o, "concurrency", json_integer(O.conc));
        /* 201 evenly spaced quantiles draw the distribution; the percentiles above are
         * computed from every sample. */
        json_object_set_new(
            o, "request_samples_s",
            lat_samples_json(&r->req_lat, O.max_samples < 201 ? O.max_samples : 201));
    }
    json_t *codes = json_object();
    for (int i = 1; i < 64; i++)
        if (r->err_by_code[i])
            json_object_set_new(codes, am_error_name((int)AM_ERR_FIRST_ + i),
                                json_integer((json_int_t)r->err_by_code[i]));
    json_object_set_new(o, "errors_by_code", codes);
    json_t *msgs = json_array();
    for (size_t i = 0; i < r->n_err_msgs; i++)
        json_array_append_new(msgs, json_string(r->err_msgs[i]));
    json_object_set_new(o, "error_examples", msgs);
    return o;
}

static json_t *do_run(uv_loop_t *loop, const struct target *t)
{
    if (O.mode == MODE_IDLE) return idle_run(loop, t);
    struct run r;
    memset(&r, 0, sizeof r);
    r.loop = loop;
    r.t = t;
    struct am_upstream_conf conf = {.name = (char *)t->name, .url = (char *)t->url};
    unsigned pool = O.mode == MODE_PULL ? O.nodes * (O.layer_conc + 1) : O.conc;
    struct am_upstream_opts uo = {
        .connect_timeout_ms = 10000,
        .header_timeout_ms = (uint64_t)(O.timeout_s * 1000),
        .idle_timeout_ms = 60000,
        .pool_size = pool > 1024 ? 1024 : pool,
        .max_redirects = 5,
        .allow_private_redirects = true,
    };
    char msg[256];
    int rc = am_upstream_new(loop, &conf, &uo, &r.up, msg, sizeof msg);
    if (rc) {
        fprintf(stderr, "loadgen: target %s: %s\n", t->name, msg[0] ? msg : am_error_message(rc));
        exit(2);
    }
    uv_timer_init(loop, &r.deadline);
    uv_timer_init(loop, &r.window);
    r.deadline.data = r.window.data = &r;
    uv_timer_start(&r.deadline, on_deadline, (uint64_t)(O.timeout_s * 1000), 0);
    r.t_start = uv_hrtime();
    if (O.mode == MODE_PULL)
        pull_start(&r);
    else
        simple_start(&r);
    uv_run(loop, UV_RUN_DEFAULT);
    json_t *o = run_json(&r);
    /* Release the run. */
    if (r.nodes) {
        for (unsigned i = 0; i < O.nodes; i++) {
            struct node *n = &r.nodes[i];
            am_buf_cleanup(&n->meta.body);
            for (unsigned k = 0; k < O.layer_conc; k++) {
                am_buf_cleanup(&n->ops[k].body);
                if (n->ops[k].hashing) am_hasher_cleanup(&n->ops[k].hasher);
            }
            if (n->meta.hashing) am_hasher_cleanup(&n->meta.hasher);
            if (n->have_man) am_manifest_cleanup(&n->man);
            free(n->ops);
        }
        free(r.nodes);
    }
    if (r.workers) {
        for (unsigned i = 0; i < O.conc; i++) am_buf_cleanup(&r.workers[i].body);
        free(r.workers);
    }
    free(r.req_lat.v);
    free(r.pull_lat.v);
    free(r.meta_lat.v);
    free(r.blob_lat.v);
    seen_free(&r.objects);
    return o;
}

/* --- Markdown ---------------------------------------------------------------------- */

static double jnum(json_t *o, const char *k)
{
    json_t *v = json_object_get(o, k);
    return v ? json_number_value(v) : 0;
}

static double jlat(json_t *o, const char *k, const char *p)
{
    json_t *l = json_object_get(o, k);
    return l ? jnum(l, p) : 0;
}

static void write_markdown(FILE *f, json_t *all)
{
    size_t i;
    json_t *o;
    if (O.mode == MODE_IDLE) {
        fprintf(f,
                "| target | connections | answered | failed | closed while idle | establish s |\n");
        fprintf(f, "|---|---:|---:|---:|---:|---:|\n");
        json_array_foreach(all, i, o)
            fprintf(f, "| %s | %.0f | %.0f | %.0f | %.0f | %.2f |\n",
                    json_string_value(json_object_get(o, "target")), jnum(o, "connections"),
                    jnum(o, "answered"), jnum(o, "failed"), jnum(o, "closed_by_server_while_idle"),
                    jnum(o, "establish_s"));
        return;
    }
    bool pull = O.mode == MODE_PULL;
    const char *k = pull ? "pull_latency_s" : "request_latency_s";
    fprintf(f, "| target | %s | errors | p50 ms | p90 ms | p99 ms | max ms | req/s | MB/s |\n",
            pull ? "pulls" : "requests");
    fprintf(f, "|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    json_array_foreach(all, i, o)
        fprintf(f, "| %s | %.0f | %.0f | %.3f | %.3f | %.3f | %.3f | %.0f | %.1f |\n",
                json_string_value(json_object_get(o, "target")),
                pull ? jnum(o, "pulls_ok") : jlat(o, k, "n"), jnum(o, "errors"),
                jlat(o, k, "p50") * 1e3, jlat(o, k, "p90") * 1e3, jlat(o, k, "p99") * 1e3,
                jlat(o, k, "max") * 1e3, jnum(o, "req_per_s"), jnum(o, "bytes_per_s") / 1e6);
}

/* --- command line ------------------------------------------------------------------ */

static const char usage[] =
    "usage: loadgen --target [NAME=]URL [--target ...] [--mode pull|get|head|idle] [options]\n"
    "\n"
    "pull:  --image REPO:TAG (repeatable) | --images-file FILE   images to pull\n"
    "       --nodes K (1)  --pulls-per-node M (1)  --select roundrobin|zipf\n"
    "       --platforms linux/arm64:30,linux/amd64:70 (linux/amd64:1)\n"
    "       --layer-concurrency L (3)  --verify (sha256 every blob)  --stagger-ms MS\n"
    "get/head: --path PATH  --concurrency C (1)  --duration S (5)  --warmup S (1)\n"
    "       --accept VALUE  --expect STATUS (200)\n"
    "idle:  --connections N (1000)  --hold S (5)  --path PATH (/v2/)  --ready-file FILE\n"
    "common: --label TEXT  --markdown FILE (default stderr)  --max-samples N (20000)\n"
    "       --timeout S (600)  --seed N  --verbose\n"
    "\n"
    "Writes a JSON array (one object per target) to stdout. Exit status 0 when every\n"
    "request succeeded, 1 when some failed, 2 for bad usage.\n";

static void add_image(const char *s)
{
    if (O.n_images == O.cap_images) {
        O.cap_images = O.cap_images ? O.cap_images * 2 : 16;
        O.images = realloc(O.images, O.cap_images * sizeof *O.images);
        if (!O.images) exit(1);
    }
    O.images[O.n_images++] = strdup(s);
}

static void load_images(const char *file)
{
    FILE *f = fopen(file, "r");
    if (!f) {
        fprintf(stderr, "loadgen: %s: %s\n", file, strerror(errno));
        exit(2);
    }
    char line[512];
    while (fgets(line, sizeof line, f)) {
        line[strcspn(line, "\r\n")] = '\0';
        char *s = line;
        while (*s == ' ' || *s == '\t') s++;
        if (*s && *s != '#') add_image(s);
    }
    fclose(f);
}

static void parse_platforms(const char *s)
{
    char *dup = strdup(s);
    char *save = NULL;
    for (char *tok = strtok_r(dup, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        if (O.n_plats == MAX_PLATFORMS) {
            fprintf(stderr, "loadgen: at most %d platforms\n", MAX_PLATFORMS);
            exit(2);
        }
        struct plat_weight *p = &O.plats[O.n_plats];
        char *colon = strrchr(tok, ':');
        p->weight = 1;
        if (colon) {
            *colon = '\0';
            p->weight = (unsigned)strtoul(colon + 1, NULL, 10);
        }
        char msg[160];
        if (am_platform_parse(tok, strlen(tok), &p->plat, NULL, msg, sizeof msg)) {
            fprintf(stderr, "loadgen: --platforms %s: %s\n", tok, msg);
            exit(2);
        }
        snprintf(p->spec, sizeof p->spec, "%s", tok);
        if (p->weight) O.n_plats++;
    }
    free(dup);
}

static void add_target(const char *s)
{
    if (O.n_targets == MAX_TARGETS) {
        fprintf(stderr, "loadgen: at most %d targets\n", MAX_TARGETS);
        exit(2);
    }
    struct target *t = &O.targets[O.n_targets++];
    const char *eq = strchr(s, '=');
    const char *scheme = strstr(s, "://");
    if (eq && (!scheme || eq < scheme)) {
        snprintf(t->name, sizeof t->name, "%.*s", (int)(eq - s), s);
        snprintf(t->url, sizeof t->url, "%s", eq + 1);
    } else {
        snprintf(t->url, sizeof t->url, "%s", s);
        snprintf(t->name, sizeof t->name, "target%zu", O.n_targets);
    }
}

int main(int argc, char **argv)
{
    enum {
        OPT_IMAGES_FILE = 256,
        OPT_PULLS,
        OPT_LAYER_CONC,
        OPT_STAGGER,
        OPT_MAX_SAMPLES,
        OPT_READY,
        OPT_SELECT,
        OPT_EXPECT,
        OPT_WARMUP,
        OPT_HOLD,
        OPT_CONNS,
        OPT_BATCH
    };
    static const struct option longopts[] = {
        {"target", required_argument, 0, 't'},
        {"mode", required_argument, 0, 'm'},
        {"image", required_argument, 0, 'i'},
        {"images-file", required_argument, 0, OPT_IMAGES_FILE},
        {"nodes", required_argument, 0, 'n'},
        {"platforms", required_argument, 0, 'p'},
        {"pulls-per-node", required_argument, 0, OPT_PULLS},
        {"layer-concurrency", required_argument, 0, OPT_LAYER_CONC},
        {"select", required_argument, 0, OPT_SELECT},
        {"verify", no_argument, 0, 'V'},
        {"stagger-ms", required_argument, 0, OPT_STAGGER},
        {"path", required_argument, 0, 'P'},
        {"accept", required_argument, 0, 'a'},
        {"concurrency", required_argument, 0, 'c'},
        {"duration", required_argument, 0, 'd'},
        {"warmup", required_argument, 0, OPT_WARMUP},
        {"expect", required_argument, 0, OPT_EXPECT},
        {"connections", required_argument, 0, OPT_CONNS},
        {"connect-batch", required_argument, 0, OPT_BATCH},
        {"hold", required_argument, 0, OPT_HOLD},
        {"ready-file", required_argument, 0, OPT_READY},
        {"label", required_argument, 0, 'l'},
        {"markdown", required_argument, 0, 'M'},
        {"max-samples", required_argument, 0, OPT_MAX_SAMPLES},
        {"timeout", required_argument, 0, 'T'},
        {"seed", required_argument, 0, 's'},
        {"verbose", no_argument, 0, 'v'},
        {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0},
    };
    am_log_set_level(AM_LOG_ERROR);
    int ch;
    while ((ch = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
        switch (ch) {
        case 't': add_target(optarg); break;
        case 'm':
            if (strcmp(optarg, "pull") == 0)
                O.mode = MODE_PULL;
            else if (strcmp(optarg, "get") == 0)
                O.mode = MODE_GET;
            else if (strcmp(optarg, "head") == 0)
                O.mode = MODE_HEAD;
            else if (strcmp(optarg, "idle") == 0)
                O.mode = MODE_IDLE;
            else {
                fprintf(stderr, "loadgen: unknown mode %s\n", optarg);
                return 2;
            }
            break;
        case 'i': add_image(optarg); break;
        case OPT_IMAGES_FILE: load_images(optarg); break;
        case 'n': O.nodes = (unsigned)strtoul(optarg, NULL, 10); break;
        case 'p': parse_platforms(optarg); break;
        case OPT_PULLS: O.pulls_per_node = (unsigned)strtoul(optarg, NULL, 10); break;
        case OPT_LAYER_CONC: O.layer_conc = (unsigned)strtoul(optarg, NULL, 10); break;
        case OPT_SELECT: O.select = optarg; break;
        case 'V': O.verify = true; break;
        case OPT_STAGGER: O.stagger_ms = (unsigned)strtoul(optarg, NULL, 10); break;
        case 'P': O.path = optarg; break;
        case 'a': O.accept = optarg; break;
        case 'c': O.conc = (unsigned)strtoul(optarg, NULL, 10); break;
        case 'd': O.duration = strtod(optarg, NULL); break;
        case OPT_WARMUP: O.warmup = strtod(optarg, NULL); break;
        case OPT_EXPECT: O.expect = atoi(optarg); break;
        case OPT_CONNS: O.connections = (unsigned)strtoul(optarg, NULL, 10); break;
        case OPT_BATCH: O.connect_batch = (unsigned)strtoul(optarg, NULL, 10); break;
        case OPT_HOLD: O.hold = strtod(optarg, NULL); break;
        case OPT_READY: O.ready_file = optarg; break;
        case 'l': O.label = optarg; break;
        case 'M': O.md_out = optarg; break;
        case OPT_MAX_SAMPLES: O.max_samples = strtoul(optarg, NULL, 10); break;
        case 'T': O.timeout_s = strtod(optarg, NULL); break;
        case 's': O.seed = strtoull(optarg, NULL, 10); break;
        case 'v': am_log_set_level(AM_LOG_DEBUG); break;
        case 'h': fputs(usage, stdout); return 0;
        default: fputs(usage, stderr); return 2;
        }
    }
    if (optind < argc || O.n_targets == 0) {
        fputs(usage, stderr);
        return 2;
    }
    if (O.mode == MODE_PULL && O.n_images == 0) {
        fprintf(stderr, "loadgen: pull mode needs --image or --images-file\n");
        return 2;
    }
    if ((O.mode == MODE_GET || O.mode == MODE_HEAD) && !O.path) {
        fprintf(stderr, "loadgen: %s mode needs --path\n", O.mode == MODE_GET ? "get" : "head");
        return 2;
    }
    if (O.nodes == 0 || O.conc == 0 || O.layer_conc == 0 || O.pulls_per_node == 0 ||
        O.connections == 0 || O.connect_batch == 0 || O.duration <= 0 || O.timeout_s <= 0 ||
        O.max_samples < 2) {
        fprintf(stderr, "loadgen: counts, durations and --max-samples must be positive\n");
        return 2;
    }
    if (O.n_plats == 0) parse_platforms("linux/amd64:1");

    /* Many connections (idle mode, big herds): use the whole hard limit on descriptors. */
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    signal(SIGPIPE, SIG_IGN);

    uv_loop_t loop;
    uv_loop_init(&loop);
    json_t *all = json_array();
    bool any_error = false;
    for (size_t i = 0; i < O.n_targets; i++) {
        json_t *o = do_run(&loop, &O.targets[i]);
        if (jnum(o, "errors") > 0 || json_is_true(json_object_get(o, "timed_out")))
            any_error = true;
        json_array_append_new(all, o);
    }
    json_dumpf(all, stdout, JSON_INDENT(1) | JSON_REAL_PRECISION(7));
    fputc('\n', stdout);
    fflush(stdout);
    FILE *md = stderr;
    if (O.md_out && !(md = fopen(O.md_out, "w"))) {
        fprintf(stderr, "loadgen: %s: %s\n", O.md_out, strerror(errno));
        md = stderr;
    }
    write_markdown(md, all);
    if (md != stderr) fclose(md);
    json_decref(all);
    uv_loop_close(&loop);
    for (size_t i = 0; i < O.n_images; i++) free(O.images[i]);
    free(O.images);
    return any_error ? 1 : 0;
}

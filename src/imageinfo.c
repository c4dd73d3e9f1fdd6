/*
 * imageinfo — the platforms an image ships; see include/archmirror/imageinfo.h.
 *
 * DESIGN. A query is a `waiter` that first asks the manifests module for the top
 * manifest (bytes needed: a tag inside its freshness window, or a digest, is answered
 * from the metastore with no upstream contact). With the bytes, `derive` tries, without
 * I/O: the image LRU by digest; the parse of an index (its platform list, remembered in the
 * image LRU and, per child entry, in the child LRU); the platform of a schema 1 manifest
 * (in the manifest itself); the metastore's platform record of a single-arch manifest.
 * Only a single-arch manifest whose config was never read needs the upstream: the waiter
 * joins the `cfetch` for that (upstream, repository, manifest digest), or starts one. A
 * cfetch buffers the blob (bounded), hashes it against the config digest, reads the
 * platform, stores it, and answers all its waiters at once. The synchronous lookups run
 * `derive` on what the metastore holds.
 *
 * An index with entries that are indexes becomes a `tree`: the parsed top plus the child
 * indexes read so far. `tree_step` walks it (without I/O) and either completes the image
 * or names the first child index it lacks; the waiter then asks the manifests module for
 * that child by digest (the same cache policy, verification and coalescing as the top;
 * containerd asks for the same child a moment later) and walks again. Children are read
 * one at a time: nesting is rare, a stored child answers at once, and one outstanding
 * request keeps cancellation simple; `advance` loops rather than recursing when the
 * answers come synchronously. The synchronous lookups complete a tree from the metastore
 * alone.
 *
 * Both LRUs are one structure: a fixed-size hash table of chained nodes plus a recency
 * list; the tail is evicted when an insert would exceed the bound. Keys are
 * "<up_idx>\n<repo>\n<digest>" ('\n' occurs in neither component).
 */
#include "archmirror/imageinfo.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "archmirror/buf.h"
#include "archmirror/error.h"
#include "archmirror/log.h"
#include "archmirror/mediatype.h"
#include "archmirror/platform.h"
#include "archmirror/reference.h"

#define KEY_MAX     (24 + AM_NAME_MAX + AM_DIGEST_STR_MAX + 4)
#define NEED_CONFIG 1 /* derive's "ask the upstream for the config blob" */
#define NEED_CHILD  2 /* tree_step's "read the child index tree->missing first" */
#define MSG_MAX     320

/* --- LRU ------------------------------------------------------------------------------ */

struct lru_node {
    struct lru_node *hnext;       /* hash chain */
    struct lru_node *prev, *next; /* recency: head is the most recent */
    uint32_t hash;
    void *value; /* owned: free() */
    size_t klen;
    char key[];
};

struct lru {
    struct lru_node **buckets;
    size_t mask; /* buckets - 1, a power of two */
    size_t n, max;
    struct lru_node *head, *tail;
};

static uint32_t fnv1a(const char *s, size_t n)
{
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < n; i++) {
        h ^= (unsigned char)s[i];
        h *= 16777619u;
    }
    return h;
}

static int lru_init(struct lru *l, size_t max)
{
    size_t nb = 1;
    while (nb < max) nb <<= 1;
    memset(l, 0, sizeof *l);
    l->buckets = calloc(nb, sizeof *l->buckets);
    if (!l->buckets) return AM_ENOMEM;
    l->mask = nb - 1;
    l->max = max;
    return 0;
}

static void lru_unlink_recency(struct lru *l, struct lru_node *n)
{
    if (n->prev)
        n->prev->next = n->next;
    else
        l->head = n->next;
    if (n->next)
        n->next->prev = n->prev;
    else
        l->tail = n->prev;
    n->prev = n->next = NULL;
}

static void lru_push_front(struct lru *l, struct lru_node *n)
{
    n->prev = NULL;
    n->next = l->head;
    if (l->head) l->head->prev = n;
    l->head = n;
    if (!l->tail) l->tail = n;
}

static void lru_remove(struct lru *l, struct lru_node *n)
{
    struct lru_node **pp = &l->buckets[n->hash & l->mask];
    while (*pp != n) pp = &(*pp)->hnext;
    *pp = n->hnext;
    lru_unlink_recency(l, n);
    l->n--;
    free(n->value);
    free(n);
}

static void lru_cleanup(struct lru *l)
{
    while (l->head) lru_remove(l, l->head);
    free(l->buckets);
    l->buckets = NULL;
}

/* The value stored under key, made the most recent; NULL when absent. */
static void *lru_get(struct lru *l, const char *key, size_t klen)
{
    uint32_t h = fnv1a(key, klen);
    for (struct lru_node *n = l->buckets[h & l->mask]; n; n = n->hnext) {
        if (n->hash != h || n->klen != klen || memcmp(n->key, key, klen) != 0) continue;
        if (l->head != n) {
            lru_unlink_recency(l, n);
            lru_push_front(l, n);
        }
        return n->value;
    }
    return NULL;
}

/* Stores value (takes it: freed on failure too) under key, replacing an older value and
 * evicting the least recent entry beyond the bound. Returns 0 or AM_ENOMEM. */
static int lru_put(struct lru *l, const char *key, size_t klen, void *value)
{
    uint32_t h = fnv1a(key, klen);
    for (struct lru_node *n = l->buckets[h & l->mask]; n; n = n->hnext) {
        if (n->hash != h || n->klen != klen || memcmp(n->key, key, klen) != 0) continue;
        free(n->value);
        n->value = value;
        if (l->head != n) {
            lru_unlink_recency(l, n);
            lru_push_front(l, n);
        }
        return 0;
    }
    struct lru_node *n = malloc(sizeof *n + klen);
    if (!n) {
        free(value);
        return AM_ENOMEM;
    }
    n->hash = h;
    n->value = value;
    n->klen = klen;
    memcpy(n->key, key, klen);
    n->hnext = l->buckets[h & l->mask];
    l->buckets[h & l->mask] = n;
    lru_push_front(l, n);
    l->n++;
    while (l->n > l->max) lru_remove(l, l->tail);
    return 0;
}

/* --- state ---------------------------------------------------------------------------- */

/* An image as the LRU keeps it: the image without its unused platform slots; or, with
 * need_config, a single-arch manifest whose config platform is not known yet (so that the
 * hot path's lookups do not re-read and re-parse it; replaced once the platform is). */
struct image_val {
    char media_type[AM_MEDIATYPE_MAX + 1];
    uint64_t size;
    bool is_index, truncated;
    bool need_config;
    struct am_digest config;
    int64_t config_size;
    size_t n;
    struct am_imageinfo_platform p[];
};

struct child_val {
    struct am_platform platform;
    struct am_digest index;
};

struct cfetch;
struct tree;

struct am_imageinfo_waiter {
    struct am_imageinfo *ii;
    struct am_imageinfo_waiter *prev, *next;       /* ii->waiters */
    struct cfetch *cf;                             /* waiting for this config fetch */
    struct am_imageinfo_waiter *cf_prev, *cf_next; /* cf->waiters */
    struct am_manifests_waiter *mw;                /* waiting for the manifest or a child */
    struct tree *tree;                             /* owned: a nested index being walked */
    bool walking;                                  /* advance is on the stack */
    bool child_pending;                            /* a child index was asked for */
    int child_err;                                 /* its failure, for advance to report */
    char child_msg[MSG_MAX];
    char child_retry[32];
    am_imageinfo_cb cb;
    void *arg;
    bool in_get, done;
    size_t up_idx;
    bool by_tag;
    char tag[AM_TAG_MAX + 1];
    char repo[AM_NAME_MAX + 1];
    char ctx[48];
    char cache_state[16];
    bool from_upstream;
    uint64_t checked_at_ms;
    struct am_imageinfo_image image;
};

/* One upstream request for a config blob, shared by the waiters of one manifest. */
struct cfetch {
    struct cfetch *prev, *next; /* ii->fetches */
    struct am_imageinfo *ii;
    struct am_upstream_req *ureq; /* NULL once finished or cancelled */
    void *bhandle;                /* the blob source's fetch, or NULL */
    struct am_imageinfo_waiter *waiters;
    size_t up_idx;
    char repo[AM_NAME_MAX + 1];
    char ctx[48];
    struct am_digest manifest;
    char media_type[AM_MEDIATYPE_MAX + 1]; /* of the manifest */
    uint64_t manifest_size;
    struct am_digest config;
    int status;
    bool got_head;
    bool in_table;   /* in ii->fetches: joinable */
    bool delivering; /* cf_deliver is answering its waiters */
    char retry_after[32];
    struct am_buf body;
};

struct am_imageinfo {
    uv_loop_t *loop;
    am_imageinfo_blob_fetch_fn blob_fetch; /* NULL: config blobs straight from upstream */
    am_imageinfo_blob_cancel_fn blob_cancel;
    void *blob_ctx;
    const struct am_config *cfg;
    struct am_metastore *ms;
    struct am_manifests *mf;
    struct am_upstream *const *ups;
    struct lru images;
    struct lru children;
    struct am_imageinfo_waiter *waiters;
    struct cfetch *fetches;
    bool freeing;
    struct am_imageinfo_stats stats;
};

static void copy_str(char *dst, size_t cap, const char *s)
{
    size_t n = strnlen(s, cap - 1);
    memcpy(dst, s, n);
    dst[n] = '\0';
}

static const char *up_name(const struct am_imageinfo *ii, size_t up_idx)
{
    return ii->cfg->upstreams[up_idx].name;
}

static size_t make_key(char *out, size_t up_idx, const char *repo, const struct am_digest *d)
{
    int n = snprintf(out, KEY_MAX, "%zu\n%s\n%s", up_idx, repo, d->str);
    return n < 0 ? 0 : (size_t)n < KEY_MAX ? (size_t)n : KEY_MAX - 1;
}

static bool args_ok(const struct am_imageinfo *ii, size_t up_idx, const char *repo,
                    const struct am_digest *d)
{
    return ii && up_idx < ii->cfg->n_upstreams && repo && repo[0] && strlen(repo) <= AM_NAME_MAX &&
           !strchr(repo, '\n') && d && d->str[0] && strnlen(d->str, sizeof d->str) < sizeof d->str;
}

/* --- the caches ------------------------------------------------------------------------ */

static void image_from_val(struct am_imageinfo_image *img, const struct image_val *v)
{
    copy_str(img->media_type, sizeof img->media_type, v->media_type);
    img->size = v->size;
    img->is_index = v->is_index;
    img->truncated = v->truncated;
    img->n_platforms = v->n;
    memcpy(img->platforms, v->p, v->n * sizeof v->p[0]);
    img->multi_arch = v->n > 1;
}

/* Remembers img (its top fields and platforms) by digest. Failure only costs a re-parse. */
static void remember_image(struct am_imageinfo *ii, size_t up_idx, const char *repo,
                           const struct am_imageinfo_image *img)
{
    char key[KEY_MAX];
    size_t klen = make_key(key, up_idx, repo, &img->digest);
    struct image_val *v = malloc(sizeof *v + img->n_platforms * sizeof v->p[0]);
    if (!v) return;
    copy_str(v->media_type, sizeof v->media_type, img->media_type);
    v->size = img->size;
    v->is_index = img->is_index;
    v->truncated = img->truncated;
    v->need_config = false;
    v->n = img->n_platforms;
    memcpy(v->p, img->platforms, v->n * sizeof v->p[0]);
    lru_put(&ii->images, key, klen, v);
}

/* Remembers that img is single-arch with the given config, platform unknown. */
static void remember_need_config(struct am_imageinfo *ii, size_t up_idx, const char *repo,
                                 const struct am_imageinfo_image *img,
                                 const struct am_descriptor *config)
{
    char key[KEY_MAX];
    size_t klen = make_key(key, up_idx, repo, &img->digest);
    struct image_val *v = calloc(1, sizeof *v);
    if (!v) return;
    copy_str(v->media_type, sizeof v->media_type, img->media_type);
    v->size = img->size;
    v->need_config = true;
    v->config = config->digest;
    v->config_size = config->size;
    lru_put(&ii->images, key, klen, v);
}

static void remember_child(struct am_imageinfo *ii, size_t up_idx, const char *repo,
                           const struct am_digest *child, const struct am_platform *p,
                           const struct am_digest *index)
{
    char key[KEY_MAX];
    size_t klen = make_key(key, up_idx, repo, child);
    struct child_val *v = malloc(sizeof *v);
    if (!v) return;
    v->platform = *p;
    v->index = *index;
    lru_put(&ii->children, key, klen, v);
}

/* --- nested indexes ------------------------------------------------------------------ */

/* The indexes of one image: the top and the child indexes read so far, by digest (a child
 * referenced twice is read once). */
struct tree_node {
    struct am_digest digest;
    struct am_manifest m; /* owned */
};

struct tree {
    struct am_digest top_digest;
    struct am_manifest top; /* owned */
    struct tree_node *nodes;
    size_t n, cap;
    struct am_digest missing; /* after NEED_CHILD: the child index to read */
};

/* A manifest a node can pull, and the platform it is pulled for. */
struct leaf {
    struct am_platform platform;   /* normalised */
    const struct am_descriptor *d; /* a view into the tree */
};

struct walk {
    const struct tree *t;
    struct am_digest path[AM_IMAGEINFO_INDEX_DEPTH]; /* indexes from the top down */
    size_t depth;                                    /* of path */
    size_t visited; /* entries of child indexes walked, repeats included */
    struct leaf *leaves;
    size_t n, cap;
    struct am_digest missing;
    char *msg;
    size_t msglen;
};

/* Takes m (moved into the tree; m is left empty). Returns the tree or NULL (m freed). */
static struct tree *tree_new(const struct am_digest *top_digest, struct am_manifest *m)
{
    struct tree *t = calloc(1, sizeof *t);
    if (!t) {
        am_manifest_cleanup(m);
        return NULL;
    }
    t->top_digest = *top_digest;
    t->top = *m;
    m->entries = NULL;
    m->n_entries = 0;
    return t;
}

static void tree_free(struct tree *t)
{
    if (!t) return;
    am_manifest_cleanup(&t->top);
    for (size_t i = 0; i < t->n; i++) am_manifest_cleanup(&t->nodes[i].m);
    free(t->nodes);
    free(t);
}

static const struct am_manifest *tree_find(const struct tree *t, const struct am_digest *d)
{
    for (size_t i = 0; i < t->n; i++)
        if (am_digest_equal(&t->nodes[i].digest, d)) return &t->nodes[i].m;
    return NULL;
}

/* Adds the child index digest, from verified bytes[0..len) served as media_type (both
 * borrowed). Returns 0, AM_ETOO_LARGE (AM_IMAGEINFO_NESTED_MAX), AM_EMANIFEST_INVALID
 * (does not parse, or is not an index) with msg filled, or AM_ENOMEM. */
static int tree_add(struct am_imageinfo *ii, struct tree *t, const struct am_digest *digest,
                    const char *media_type, const char *bytes, size_t len, char *msg, size_t msglen)
{
    if (t->n == AM_IMAGEINFO_NESTED_MAX) {
        snprintf(msg, msglen, "more than %d nested indexes", AM_IMAGEINFO_NESTED_MAX);
        return AM_ETOO_LARGE;
    }
    if (t->n == t->cap) {
        size_t cap = t->cap ? 2 * t->cap : 4;
        struct tree_node *nodes = realloc(t->nodes, cap * sizeof *nodes);
        if (!nodes) return AM_ENOMEM;
        t->nodes = nodes;
        t->cap = cap;
    }
    struct tree_node *node = &t->nodes[t->n];
    char why[160];
    ii->stats.parses++;
    int rc = am_manifest_parse(bytes ? bytes : "", len, media_type, &node->m, why, sizeof why);
    if (rc == AM_ENOMEM) return rc;
    if (rc) {
        snprintf(msg, msglen, "nested index %s: %s", digest->str, why);
        return AM_EMANIFEST_INVALID;
    }
    if (!am_mediatype_is_index(node->m.kind)) {
        /* containerd refuses the same (images/image.go validateMediaType). */
        am_manifest_cleanup(&node->m);
        snprintf(msg, msglen, "nested index %s is an image manifest, not an index", digest->str);
        return AM_EMANIFEST_INVALID;
    }
    node->digest = *digest;
    t->n++;
    return 0;
}

static int add_leaf(struct walk *wk, const struct am_descriptor *d, const struct am_platform *p)
{
    if (!p) return 0; /* no platform of its own and none from above: not listed, as before */
    if (wk->n == wk->cap) {
        size_t cap = wk->cap ? 2 * wk->cap : 16;
        struct leaf *l = realloc(wk->leaves, cap * sizeof *l);
        if (!l) return AM_ENOMEM;
        wk->leaves = l;
        wk->cap = cap;
    }
    wk->leaves[wk->n].platform = *p;
    wk->leaves[wk->n].d = d;
    wk->n++;
    return 0;
}

static int walk_index(struct walk *wk, const struct am_manifest *m, const struct am_platform *gate);

/* Descends into the child index of entry d, whose leaves are pulled for gate (or for
 * their own platforms when gate is NULL). */
static int walk_child(struct walk *wk, const struct am_descriptor *d,
                      const struct am_platform *gate)
{
    for (size_t k = 0; k < wk->depth; k++) {
        if (!am_digest_equal(&wk->path[k], &d->digest)) continue;
        snprintf(wk->msg, wk->msglen, "nested index %s contains itself", d->digest.str);
        return AM_EMANIFEST_INVALID;
    }
    /* Nesting is bounded although containerd's Walk is not: content addressing rules out
     * a cycle for verified bytes, but every level is one more manifest fetch before the
     * query answers, and an upstream is not trusted to end the chain. Producers nest one
     * level (an index of per-platform or per-variant indexes: oras, crane, image
     * signers); AM_IMAGEINFO_INDEX_DEPTH leaves room for two more. */
    if (wk->depth == AM_IMAGEINFO_INDEX_DEPTH) {
        snprintf(wk->msg, wk->msglen, "indexes nested more than %d levels deep (at %s)",
                 AM_IMAGEINFO_INDEX_DEPTH, d->digest.str);
        return AM_EMANIFEST_INVALID;
    }
    const struct am_manifest *child = tree_find(wk->t, &d->digest);
    if (!child) {
        wk->missing = d->digest;
        return NEED_CHILD;
    }
    wk->visited += child->n_entries;
    if (wk->visited > AM_IMAGEINFO_TREE_ENTRIES) {
        snprintf(wk->msg, wk->msglen, "nested indexes hold more than %d entries",
                 AM_IMAGEINFO_TREE_ENTRIES);
        return AM_ETOO_LARGE;
    }
    wk->path[wk->depth++] = d->digest;
    int rc = walk_index(wk, child, gate);
    wk->depth--;
    return rc;
}

/* Collects the leaves of index m in the order containerd prefers them.
 *
 * How containerd walks nested indexes (containerd v2 core/images/image.go Manifest, and
 * on the pull path core/images/handlers.go FilterPlatforms + LimitManifests; images/ in
 * 1.x): at every index it keeps the entries whose platform matches the node or that have
 * none, sorts them stably by the node's preference with platform-less entries last, and
 * descends into the first; a child index's entries are matched against the same node.
 * Hence, here:
 * - a child index without a platform is walked for every node, after the entries that
 *   carry one (pass 1), so a platform found both ways keeps the digest containerd pulls;
 * - a child index with platform P is walked only by nodes that P matches: its leaves are
 *   listed with their own platforms, minus those a node of platform P would not take
 *   (the gate), and a leaf without a platform inherits P (containerd's filter lets it
 *   through for exactly those nodes);
 * - containerd's images.Platforms, which only lists, stops at the first descriptor with a
 *   platform and reports that one; we go on to the leaf, since the digest we report must
 *   be the manifest a node pulls.
 * Approximation: containerd never backtracks, so a node that merely matches a platformed
 * entry of the top (amd64 takes 386) never looks into a platform-less child index for an
 * exact entry; we still list that exact entry. Attestations and unknown/unknown are never
 * leaves, and never walked into. */
static int walk_index(struct walk *wk, const struct am_manifest *m, const struct am_platform *gate)
{
    for (int pass = 0; pass < 2; pass++) {
        for (size_t i = 0; i < m->n_entries; i++) {
            const struct am_descriptor *d = &m->entries[i];
            if (d->has_platform != (pass == 0) || d->is_attestation) continue;
            struct am_platform own;
            const struct am_platform *p = gate;
            if (d->has_platform) {
                own = d->platform;
                am_platform_normalize(&own);
                if (strcmp(own.os, "unknown") == 0 && strcmp(own.architecture, "unknown") == 0)
                    continue;
                if (gate && !am_platform_matches(gate, &own)) continue;
                p = &own;
            }
            enum am_media_kind k = am_mediatype_classify(d->media_type, strlen(d->media_type));
            int rc = am_mediatype_is_index(k) ? walk_child(wk, d, p) : add_leaf(wk, d, p);
            if (rc) return rc;
        }
    }
    return 0;
}

/* Walks t. Returns 0 with img's platforms filled from its leaves (img's top fields set by
 * the caller) and img and every leaf remembered; NEED_CHILD with t->missing set when a
 * child index must be read first; or an error with msg filled (AM_EMANIFEST_INVALID,
 * AM_ETOO_LARGE) or AM_ENOMEM. */
static int tree_step(struct am_imageinfo *ii, size_t up_idx, const char *repo, struct tree *t,
                     struct am_imageinfo_image *img, char *msg, size_t msglen)
{
    struct walk wk;
    memset(&wk, 0, sizeof wk);
    wk.t = t;
    wk.path[0] = t->top_digest;
    wk.depth = 1;
    wk.msg = msg;
    wk.msglen = msglen;
    msg[0] = '\0';
    int rc = walk_index(&wk, &t->top, NULL);
    if (rc == NEED_CHILD) t->missing = wk.missing;
    if (rc) {
        free(wk.leaves);
        return rc;
    }
    img->is_index = true;
    img->truncated = false;
    img->n_platforms = 0;
    for (size_t i = 0; i < wk.n; i++) {
        const struct leaf *l = &wk.leaves[i];
        bool seen = false;
        for (size_t k = 0; k < img->n_platforms && !seen; k++)
            seen = am_platform_equal(&img->platforms[k].platform, &l->platform);
        /* Every leaf containerd could pick, not only the first of each platform: entries
         * that differ in os.features normalise alike but are distinct manifests. */
        remember_child(ii, up_idx, repo, &l->d->digest, &l->platform, &img->digest);
        if (seen) continue;
        if (img->n_platforms == AM_IMAGEINFO_PLATFORMS_MAX) {
            img->truncated = true;
            continue;
        }
        struct am_imageinfo_platform *out = &img->platforms[img->n_platforms++];
        out->platform = l->platform;
        out->digest = l->d->digest;
        out->size = l->d->size > 0 ? (uint64_t)l->d->size : 0;
    }
    img->multi_arch = img->n_platforms > 1;
    free(wk.leaves);
    remember_image(ii, up_idx, repo, img);
    return 0;
}

/* Completes t from the metastore alone (no upstream I/O). Returns as tree_step, with
 * AM_ENOT_FOUND for a child index that is not stored. */
static int tree_resolve_stored(struct am_imageinfo *ii, size_t up_idx, const char *repo,
                               struct tree *t, struct am_imageinfo_image *img, char *msg,
                               size_t msglen)
{
    for (;;) { /* ends: every round adds a node, and tree_add stops at the bound */
        int rc = tree_step(ii, up_idx, repo, t, img, msg, msglen);
        if (rc != NEED_CHILD) return rc;
        struct am_manifest_rec rec;
        rc = am_metastore_get_manifest(ii->ms, up_name(ii, up_idx), repo, &t->missing, &rec);
        if (rc == 0)
            rc = tree_add(ii, t, &t->missing, rec.media_type, rec.bytes, rec.len, msg, msglen);
        am_manifest_rec_cleanup(&rec);
        if (rc) return rc;
    }
}

/* Records the manifest entries of index m itself (for an index whose nested indexes are
 * not all stored yet: what can be attributed now). */
static void remember_direct_children(struct am_imageinfo *ii, size_t up_idx, const char *repo,
                                     const struct am_manifest *m, const struct am_digest *index)
{
    for (size_t i = 0; i < m->n_entries; i++) {
        const struct am_descriptor *d = &m->entries[i];
        if (!d->has_platform || d->is_attestation) continue;
        if (am_mediatype_is_index(am_mediatype_classify(d->media_type, strlen(d->media_type))))
            continue;
        struct am_platform p = d->platform;
        am_platform_normalize(&p);
        if (strcmp(p.os, "unknown") == 0 && strcmp(p.architecture, "unknown") == 0) continue;
        remember_child(ii, up_idx, repo, &d->digest, &p, index);
    }
}

/* Schema 1 carries its architecture in the manifest itself; its os is linux (Docker's
 * schema1 predates anything else). */
static int image_from_schema1(const char *bytes, size_t len, struct am_imageinfo_image *img,
                              char *msg, size_t msglen)
{
    json_error_t jerr;
    json_t *root = json_loadb(bytes, len, 0, &jerr);
    json_t *a = root ? json_object_get(root, "architecture") : NULL;
    int rc = AM_EMANIFEST_INVALID;
    if (!a || !json_is_string(a) || json_string_length(a) == 0 ||
        json_string_length(a) > AM_PLATFORM_FIELD_MAX) {
        snprintf(msg, msglen, "schema 1 manifest without a usable \"architecture\"");
        goto done;
    }
    struct am_imageinfo_platform *p = &img->platforms[0];
    memset(p, 0, sizeof *p);
    copy_str(p->platform.os, sizeof p->platform.os, "linux");
    copy_str(p->platform.architecture, sizeof p->platform.architecture, json_string_value(a));
    for (char *c = p->platform.architecture; *c; c++)
        if ((unsigned char)*c < 0x20 || (unsigned char)*c > 0x7e) *c = '?';
    am_platform_normalize(&p->platform);
    p->digest = img->digest;
    p->size = img->size;
    img->n_platforms = 1;
    img->multi_arch = false;
    rc = 0;
done:
    json_decref(root);
    return rc;
}

/* The single platform of a single-arch image. */
static void image_single(struct am_imageinfo_image *img, const struct am_platform *p)
{
    img->is_index = false;
    img->truncated = false;
    img->multi_arch = false;
    img->n_platforms = 1;
    img->platforms[0].platform = *p;
    img->platforms[0].digest = img->digest;
    img->platforms[0].size = img->size;
}

/* Derives img's platforms from verified manifest bytes without upstream I/O. img's top
 * fields (media type, digest, size) are set by the caller. Returns 0 (img complete),
 * NEED_CONFIG (a single-arch manifest whose config platform is unknown: *config is its
 * descriptor), NEED_CHILD (an index with a nested index not read yet: *tree_out is
 * returned owned, tree_free, with ->missing naming it), or an error with msg filled. */
static int derive(struct am_imageinfo *ii, size_t up_idx, const char *repo, const char *bytes,
                  size_t len, struct am_imageinfo_image *img, struct am_descriptor *config,
                  struct tree **tree_out, char *msg, size_t msglen)
{
    *tree_out = NULL;
    char key[KEY_MAX];
    size_t klen = make_key(key, up_idx, repo, &img->digest);
    const struct image_val *v = lru_get(&ii->images, key, klen);
    msg[0] = '\0';
    if (v && v->need_config) {
        memset(config, 0, sizeof *config);
        config->digest = v->config;
        config->size = v->config_size;
        return NEED_CONFIG;
    }
    if (v) {
        ii->stats.lru_hits++;
        image_from_val(img, v);
        return 0;
    }

    struct am_manifest m;
    ii->stats.parses++;
    int rc = am_manifest_parse(bytes, len, img->media_type, &m, msg, msglen);
    if (rc) return rc == AM_ENOMEM ? rc : AM_EMANIFEST_INVALID;
    if (am_mediatype_is_index(m.kind)) {
        struct tree *t = tree_new(&img->digest, &m); /* takes m */
        if (!t) return AM_ENOMEM;
        rc = tree_step(ii, up_idx, repo, t, img, msg, msglen); /* remembers img on success */
        if (rc == NEED_CHILD)
            *tree_out = t;
        else
            tree_free(t);
        return rc;
    }
    if (m.kind == AM_MT_DOCKER_V1) {
        img->is_index = false;
        rc = image_from_schema1(bytes, len, img, msg, msglen);
    } else if (!m.has_config) {
        snprintf(msg, msglen, "manifest has no config descriptor");
        rc = AM_EMANIFEST_INVALID;
    } else {
        struct am_platform_rec rec;
        rc = am_metastore_get_platform(ii->ms, up_name(ii, up_idx), repo, &img->digest, &rec);
        if (rc == 0 && am_digest_equal(&rec.config, &m.config.digest)) {
            ii->stats.store_hits++;
            image_single(img, &rec.platform);
        } else {
            if (rc && rc != AM_ENOT_FOUND)
                AM_WARN("imageinfo: platform record of %s@%s: %s", repo, img->digest.str,
                        am_error_message(rc));
            *config = m.config;
            remember_need_config(ii, up_idx, repo, img, config);
            rc = NEED_CONFIG;
        }
    }
    am_manifest_cleanup(&m);
    if (rc == 0) remember_image(ii, up_idx, repo, img);
    return rc;
}

/* --- waiters --------------------------------------------------------------------------- */

static void waiter_unlink(struct am_imageinfo_waiter *w)
{
    struct am_imageinfo *ii = w->ii;
    if (w->prev)
        w->prev->next = w->next;
    else if (ii->waiters == w)
        ii->waiters = w->next;
    if (w->next) w->next->prev = w->prev;
    w->prev = w->next = NULL;
}

static void waiter_free(struct am_imageinfo_waiter *w)
{
    tree_free(w->tree);
    free(w);
}

/* Answers w once and releases it (unless am_imageinfo_get is still on the stack). */
static void finish(struct am_imageinfo_waiter *w, int err, const char *message,
                   const char *retry_after)
{
    waiter_unlink(w);
    tree_free(w->tree); /* the answer is in w->image */
    w->tree = NULL;
    struct am_imageinfo_result r = {
        .err = err,
        .message = err ? message : NULL,
        .retry_after = retry_after ? retry_after : "",
        .image = err ? NULL : &w->image,
        .cache_state = err ? "" : w->cache_state,
        .from_upstream = w->from_upstream,
        .checked_at_ms = w->checked_at_ms,
    };
    w->done = true;
    w->cb(w->arg, &r);
    if (!w->in_get) waiter_free(w);
}

/* --- config fetches -------------------------------------------------------------------- */

static void cf_unlink_waiter(struct cfetch *cf, struct am_imageinfo_waiter *w)
{
    if (w->cf_prev)
        w->cf_prev->cf_next = w->cf_next;
    else
        cf->waiters = w->cf_next;
    if (w->cf_next) w->cf_next->cf_prev = w->cf_prev;
    w->cf_prev = w->cf_next = NULL;
    w->cf = NULL;
}

static void cf_table_unlink(struct cfetch *cf)
{
    struct am_imageinfo *ii = cf->ii;
    if (!cf->in_table) return;
    if (cf->prev)
        cf->prev->next = cf->next;
    else
        ii->fetches = cf->next;
    if (cf->next) cf->next->prev = cf->prev;
    cf->prev = cf->next = NULL;
    cf->in_table = false;
}

/* Stops whatever is fetching cf's config (upstream request or blob source). */
static void cf_stop(struct cfetch *cf)
{
    if (cf->ureq) am_upstream_req_cancel(cf->ureq);
    cf->ureq = NULL;
    if (cf->bhandle) cf->ii->blob_cancel(cf->ii->blob_ctx, cf->bhandle);
    cf->bhandle = NULL;
}

static void cf_free(struct cfetch *cf)
{
    cf_table_unlink(cf);
    am_buf_cleanup(&cf->body);
    free(cf);
}

/* Answers every waiter of cf (platform p, or err) and frees cf. The fetch leaves the
 * table first, so queries made from the callbacks find the cache or start anew; a
 * callback may cancel a waiter still to be answered (it leaves cf->waiters). */
static void cf_deliver(struct cfetch *cf, int err, const char *message, const struct am_platform *p)
{
    struct am_imageinfo *ii = cf->ii;
    if (cf->ureq || cf->bhandle) {
        cf_stop(cf);
    }
    cf_table_unlink(cf);
    cf->delivering = true;
    const char *retry = err == AM_ETOOMANYREQUESTS ? cf->retry_after : "";
    if (!err) {
        struct am_imageinfo_image img;
        memset(&img, 0, sizeof img);
        copy_str(img.media_type, sizeof img.media_type, cf->media_type);
        img.digest = cf->manifest;
        img.size = cf->manifest_size;
        image_single(&img, p);
        remember_image(ii, cf->up_idx, cf->repo, &img);
    }
    while (cf->waiters) {
        struct am_imageinfo_waiter *w = cf->waiters;
        cf_unlink_waiter(cf, w);
        if (!err) {
            image_single(&w->image, p);
            w->from_upstream = true;
        }
        finish(w, err, message, retry);
    }
    cf_free(cf);
}

static void on_cf_head(void *arg, const struct am_upstream_response *r)
{
    struct cfetch *cf = arg;
    const struct am_http_header *h;
    cf->got_head = true;
    cf->status = r->status;
    if ((h = am_http_header_find(r->headers, r->n_headers, "retry-after"))) {
        size_t n =
            h->value_len < sizeof cf->retry_after - 1 ? h->value_len : sizeof cf->retry_after - 1;
        memcpy(cf->retry_after, h->value, n);
        cf->retry_after[n] = '\0';
    }
    if (r->status == 200 && r->content_length > (int64_t)AM_IMAGEINFO_CONFIG_MAX) {
        AM_WARN("%s imageinfo: config %s of %s is %lld bytes; not read", cf->ctx, cf->config.str,
                cf->repo, (long long)r->content_length);
        cf_deliver(cf, AM_ETOO_LARGE, "image config blob exceeds 1 MiB", NULL);
    }
}

static void on_cf_body(void *arg, const char *data, size_t len)
{
    struct cfetch *cf = arg;
    if (cf->status != 200) return; /* error bodies are dropped */
    if (am_buf_append(&cf->body, data, len) == 0) return;
    AM_WARN("%s imageinfo: config %s of %s exceeds %u bytes; not read", cf->ctx, cf->config.str,
            cf->repo, AM_IMAGEINFO_CONFIG_MAX);
    cf_deliver(cf, AM_ETOO_LARGE, "image config blob exceeds 1 MiB", NULL);
}

static void cf_finish_bytes(struct cfetch *cf, const char *bytes, size_t len);

static void on_cf_blob(void *arg, int err, const char *bytes, size_t len)
{
    struct cfetch *cf = arg;
    cf->bhandle = NULL;
    if (err) {
        char msg[AM_DIGEST_STR_MAX + 64];
        snprintf(msg, sizeof msg, "fetching image config %s: %s", cf->config.str,
                 am_error_message(err));
        if (err != AM_ECANCELED)
            AM_WARN("%s imageinfo: upstream %s: %s", cf->ctx, up_name(cf->ii, cf->up_idx), msg);
        cf_deliver(cf, err, msg, NULL);
        return;
    }
    cf_finish_bytes(cf, bytes, len);
}

static void on_cf_done(void *arg, int err)
{
    struct cfetch *cf = arg;
    struct am_imageinfo *ii = cf->ii;
    char msg[2 * AM_DIGEST_STR_MAX + 64];
    const char *why = cf->ureq ? am_upstream_req_message(cf->ureq) : "";
    cf->ureq = NULL;
    if (err || !cf->got_head) {
        if (!err) err = AM_EUPSTREAM_PROTOCOL;
        snprintf(msg, sizeof msg, "fetching image config %s: %s", cf->config.str,
                 why && why[0] ? why : am_error_message(err));
        AM_WARN("%s imageinfo: upstream %s: %s", cf->ctx, up_name(ii, cf->up_idx), msg);
        cf_deliver(cf, err, msg, NULL);
        return;
    }
    if (cf->status != 200) {
        snprintf(msg, sizeof msg, "upstream answered %d for image config %s", cf->status,
                 cf->config.str);
        AM_INFO("%s imageinfo: %s of %s", cf->ctx, msg, cf->repo);
        cf_deliver(cf, am_error_from_upstream_status(cf->status, true), msg, NULL);
        return;
    }
    cf_finish_bytes(cf, cf->body.data ? cf->body.data : "", cf->body.len);
}

/* The config's bytes arrived (upstream or blob source): verify, parse, store, deliver. */
static void cf_finish_bytes(struct cfetch *cf, const char *bytes, size_t len)
{
    struct am_imageinfo *ii = cf->ii;
    char msg[2 * AM_DIGEST_STR_MAX + 64];
    struct am_digest got;
    am_digest_of(cf->config.alg, bytes, len, &got);
    if (!am_digest_equal(&got, &cf->config)) {
        snprintf(msg, sizeof msg, "image config %s hashes to %s", cf->config.str, got.str);
        AM_ERROR("%s imageinfo: upstream %s: %s (%s); not cached", cf->ctx, up_name(ii, cf->up_idx),
                 msg, cf->repo);
        cf_deliver(cf, AM_EDIGEST_MISMATCH, msg, NULL);
        return;
    }
    struct am_platform p;
    char why2[160];
    int rc = am_platform_from_config_json(bytes, len, &p, NULL, why2, sizeof why2);
    if (rc) {
        snprintf(msg, sizeof msg, "%s", rc == AM_ENOMEM ? am_error_message(rc) : why2);
        AM_INFO("%s imageinfo: config %s of %s: %s", cf->ctx, cf->config.str, cf->repo, msg);
        cf_deliver(cf, rc == AM_ENOMEM ? rc : AM_EMANIFEST_INVALID, msg, NULL);
        return;
    }
    struct am_platform_rec rec;
    memset(&rec, 0, sizeof rec);
    rec.platform = p;
    rec.config = cf->config;
    rc = am_metastore_put_platform(ii->ms, up_name(ii, cf->up_idx), cf->repo, &cf->manifest, &rec,
                                   NULL, NULL);
    if (rc)
        AM_WARN("%s imageinfo: caching the platform of %s@%s: %s", cf->ctx, cf->repo,
                cf->manifest.str, am_error_message(rc));
    cf_deliver(cf, 0, NULL, &p);
}

static const struct am_upstream_cbs cf_cbs = {on_cf_head, on_cf_body, on_cf_done};

/* Makes w wait for the config blob of its single-arch manifest. On failure answers w. */
static void wait_for_config(struct am_imageinfo_waiter *w, const struct am_descriptor *config)
{
    struct am_imageinfo *ii = w->ii;
    for (struct cfetch *cf = ii->fetches; cf; cf = cf->next) {
        if (cf->up_idx != w->up_idx || strcmp(cf->repo, w->repo) != 0 ||
            !am_digest_equal(&cf->manifest, &w->image.digest))
            continue;
        ii->stats.config_coalesced++;
        w->cf = cf;
        w->cf_next = cf->waiters;
        if (cf->waiters) cf->waiters->cf_prev = w;
        cf->waiters = w;
        return;
    }
    if (config->size > (int64_t)AM_IMAGEINFO_CONFIG_MAX) {
        finish(w, AM_ETOO_LARGE, "image config blob exceeds 1 MiB", NULL);
        return;
    }
    struct cfetch *cf = calloc(1, sizeof *cf);
    if (!cf) {
        finish(w, AM_ENOMEM, NULL, NULL);
        return;
    }
    cf->ii = ii;
    cf->up_idx = w->up_idx;
    copy_str(cf->repo, sizeof cf->repo, w->repo);
    copy_str(cf->ctx, sizeof cf->ctx, w->ctx);
    cf->manifest = w->image.digest;
    copy_str(cf->media_type, sizeof cf->media_type, w->image.media_type);
    cf->manifest_size = w->image.size;
    cf->config = config->digest;
    am_buf_init(&cf->body, AM_IMAGEINFO_CONFIG_MAX);

    char path[AM_NAME_MAX + AM_DIGEST_STR_MAX + 32], scope[AM_NAME_MAX + 32];
    snprintf(path, sizeof path, "/v2/%s/blobs/%s", w->repo, config->digest.str);
    snprintf(scope, sizeof scope, "repository:%s:pull", w->repo);
    struct am_upstream_request_opts o = {.method = "GET", .path = path, .scope = scope};
    ii->stats.config_fetches++;
    /* Through the blob cache when there is one: the node pulling this image asks for the
     * same config a moment later, and one upstream fetch serves both. */
    int rc = ii->blob_fetch ? ii->blob_fetch(ii->blob_ctx, w->up_idx, w->repo, &config->digest,
                                             AM_IMAGEINFO_CONFIG_MAX, on_cf_blob, cf, &cf->bhandle)
                            : am_upstream_request(ii->ups[w->up_idx], &o, &cf_cbs, cf, &cf->ureq);
    if (rc) {
        AM_WARN("%s imageinfo: upstream %s GET %s: %s", w->ctx, up_name(ii, w->up_idx), path,
                am_error_message(rc));
        am_buf_cleanup(&cf->body);
        free(cf);
        finish(w, rc, NULL, NULL);
        return;
    }
    AM_DEBUG("%s imageinfo: fetching config %s of %s@%s", w->ctx, config->digest.str, w->repo,
             w->image.digest.str);
    cf->next = ii->fetches;
    if (ii->fetches) ii->fetches->prev = cf;
    ii->fetches = cf;
    cf->in_table = true;
    w->cf = cf;
    cf->waiters = w;
}

/* --- queries --------------------------------------------------------------------------- */

static void advance(struct am_imageinfo_waiter *w);

/* A child index arrived (or failed). Inside advance it only records the outcome, which
 * advance reads when am_manifests_get returns; later it advances w itself. */
static void on_child(void *arg, const struct am_manifests_result *r)
{
    struct am_imageinfo_waiter *w = arg;
    struct am_imageinfo *ii = w->ii;
    w->mw = NULL;
    w->child_pending = false;
    struct am_digest d = w->tree->missing;
    if (r->err) {
        /* A child the upstream does not have makes the image unpullable, not unknown:
         * the image itself exists, so not a 404. Other failures keep their class (a 429
         * keeps its Retry-After). */
        w->child_err = r->err == AM_EMANIFEST_UNKNOWN ? AM_EMANIFEST_INVALID : r->err;
        snprintf(w->child_msg, sizeof w->child_msg, "nested index %s: %s", d.str,
                 r->message && r->message[0] ? r->message : am_error_message(r->err));
        snprintf(w->child_retry, sizeof w->child_retry, "%s", r->retry_after ? r->retry_after : "");
    } else {
        if (r->cache_state &&
            (strcmp(r->cache_state, "miss") == 0 || strcmp(r->cache_state, "revalidated") == 0))
            w->from_upstream = true;
        w->child_err = r->bytes ? tree_add(ii, w->tree, &d, r->media_type, r->bytes, r->size,
                                           w->child_msg, sizeof w->child_msg)
                                : AM_EUPSTREAM; /* our bug: need_body */
        if (!r->bytes) snprintf(w->child_msg, sizeof w->child_msg, "nested index body missing");
    }
    if (w->walking) return;
    if (w->child_err) {
        AM_INFO("%s imageinfo: %s@%s: %s", w->ctx, w->repo, w->image.digest.str, w->child_msg);
        finish(w, w->child_err, w->child_msg, w->child_retry);
        return;
    }
    advance(w);
}

/* Walks w's tree, asking for child indexes until the image is complete or fails; answers
 * w at the end. Stored children answer inside am_manifests_get: a loop, not a recursion. */
static void advance(struct am_imageinfo_waiter *w)
{
    struct am_imageinfo *ii = w->ii;
    char msg[MSG_MAX];
    w->walking = true;
    for (;;) {
        int rc = tree_step(ii, w->up_idx, w->repo, w->tree, &w->image, msg, sizeof msg);
        if (rc != NEED_CHILD) {
            if (rc)
                AM_INFO("%s imageinfo: %s@%s: %s", w->ctx, w->repo, w->image.digest.str,
                        msg[0] ? msg : am_error_message(rc));
            finish(w, rc, msg[0] ? msg : NULL, NULL);
            return;
        }
        struct am_manifests_query mq = {
            .up_idx = w->up_idx,
            .repo = w->repo,
            .digest = &w->tree->missing,
            .need_body = true,
            .log_ctx = w->ctx,
        };
        struct am_manifests_waiter *mw = NULL;
        AM_DEBUG("%s imageinfo: %s@%s: reading nested index %s", w->ctx, w->repo,
                 w->image.digest.str, w->tree->missing.str);
        ii->stats.nested_fetches++;
        w->child_pending = true;
        w->child_err = 0;
        w->child_msg[0] = w->child_retry[0] = '\0';
        rc = am_manifests_get(ii->mf, &mq, on_child, w, &mw);
        if (rc) {
            snprintf(msg, sizeof msg, "nested index %s: %s", w->tree->missing.str,
                     am_error_message(rc));
            finish(w, rc, msg, NULL);
            return;
        }
        if (w->child_pending) { /* on_child advances when the answer comes */
            w->mw = mw;
            w->walking = false;
            return;
        }
        if (w->child_err) {
            AM_INFO("%s imageinfo: %s@%s: %s", w->ctx, w->repo, w->image.digest.str, w->child_msg);
            finish(w, w->child_err, w->child_msg, w->child_retry);
            return;
        }
    }
}

static void on_manifest(void *arg, const struct am_manifests_result *r)
{
    struct am_imageinfo_waiter *w = arg;
    struct am_imageinfo *ii = w->ii;
    w->mw = NULL;
    if (r->err) {
        finish(w, r->err, r->message, r->retry_after);
        return;
    }
    copy_str(w->cache_state, sizeof w->cache_state, r->cache_state ? r->cache_state : "");
    w->from_upstream =
        strcmp(w->cache_state, "miss") == 0 || strcmp(w->cache_state, "revalidated") == 0;
    w->checked_at_ms = am_metastore_now_ms();
    if (w->by_tag) {
        /* The manifests module has just stored or read the tag: its record says when it
         * was last checked upstream. */
        struct am_tag_rec tag;
        if (am_metastore_get_tag(ii->ms, up_name(ii, w->up_idx), w->repo, w->tag, &tag) == 0 &&
            tag.fetched_at_ms)
            w->checked_at_ms = tag.fetched_at_ms;
    }
    struct am_imageinfo_image *img = &w->image;
    copy_str(img->media_type, sizeof img->media_type, r->media_type ? r->media_type : "");
    img->digest = *r->digest;
    img->size = r->size;
    if (!r->bytes) {
        finish(w, AM_EUPSTREAM, "manifest body missing", NULL); /* our bug: need_body */
        return;
    }
    struct am_descriptor config;
    struct tree *t;
    char msg[MSG_MAX];
    int rc = derive(ii, w->up_idx, w->repo, r->bytes, r->size, img, &config, &t, msg, sizeof msg);
    if (rc == 0) {
        finish(w, 0, NULL, NULL);
    } else if (rc == NEED_CONFIG) {
        wait_for_config(w, &config);
    } else if (rc == NEED_CHILD) {
        w->tree = t;
        advance(w);
    } else {
        AM_INFO("%s imageinfo: %s@%s: %s", w->ctx, w->repo, img->digest.str,
                msg[0] ? msg : am_error_message(rc));
        finish(w, rc, msg[0] ? msg : NULL, NULL);
    }
}

int am_imageinfo_get(struct am_imageinfo *ii, const struct am_imageinfo_query *q,
                     am_imageinfo_cb cb, void *arg, struct am_imageinfo_waiter **out)
{
    *out = NULL;
    if (ii->freeing) return AM_ECANCELED;
    if (q->up_idx >= ii->cfg->n_upstreams || !q->repo || !q->repo[0] || !q->tag == !q->digest ||
        strlen(q->repo) > AM_NAME_MAX || strchr(q->repo, '\n') ||
        (q->tag && (!q->tag[0] || strlen(q->tag) > AM_TAG_MAX)))
        return AM_EINVAL;
    struct am_imageinfo_waiter *w = calloc(1, sizeof *w);
    if (!w) return AM_ENOMEM;
    w->ii = ii;
    w->cb = cb;
    w->arg = arg;
    w->up_idx = q->up_idx;
    w->by_tag = q->tag != NULL;
    if (q->tag) copy_str(w->tag, sizeof w->tag, q->tag);
    copy_str(w->repo, sizeof w->repo, q->repo);
    copy_str(w->ctx, sizeof w->ctx, q->log_ctx ? q->log_ctx : "-");
    w->next = ii->waiters;
    if (ii->waiters) ii->waiters->prev = w;
    ii->waiters = w;
    ii->stats.queries++;

    struct am_manifests_query mq = {
        .up_idx = q->up_idx,
        .repo = w->repo,
        .tag = q->tag ? w->tag : NULL,
        .digest = q->digest,
        .need_body = true,
        .log_ctx = w->ctx,
    };
    struct am_manifests_waiter *mw = NULL;
    w->in_get = true;
    int rc = am_manifests_get(ii->mf, &mq, on_manifest, w, &mw);
    w->in_get = false;
    if (rc) {
        waiter_unlink(w);
        waiter_free(w);
        return rc;
    }
    if (w->done) {
        waiter_free(w);
        return 0;
    }
    if (mw) w->mw = mw;
    *out = w;
    return 0;
}

void am_imageinfo_cancel(struct am_imageinfo_waiter *w)
{
    if (!w) return;
    if (w->mw) {
        am_manifests_cancel(w->mw);
        w->mw = NULL;
    }
    struct cfetch *cf = w->cf;
    if (cf) {
        cf_unlink_waiter(cf, w);
        if (!cf->waiters && !cf->delivering) {
            cf_stop(cf);
            cf_free(cf);
        }
    }
    waiter_unlink(w);
    waiter_free(w);
}

/* --- synchronous lookups --------------------------------------------------------------- */

int am_imageinfo_lookup_cached(struct am_imageinfo *ii, size_t up_idx, const char *repo,
                               const struct am_digest *top_digest, struct am_imageinfo_image *out)
{
    if (!args_ok(ii, up_idx, repo, top_digest) || !out) return AM_EINVAL;
    char key[KEY_MAX];
    size_t klen = make_key(key, up_idx, repo, top_digest);
    const struct image_val *v = lru_get(&ii->images, key, klen);
    if (v && v->need_config) return AM_ENOT_FOUND;
    if (v) {
        ii->stats.lru_hits++;
        out->digest = *top_digest;
        image_from_val(out, v);
        return 0;
    }
    struct am_manifest_rec rec;
    int rc = am_metastore_get_manifest(ii->ms, up_name(ii, up_idx), repo, top_digest, &rec);
    if (rc) {
        am_manifest_rec_cleanup(&rec);
        return rc;
    }
    /* Built aside: out is written only on success. */
    struct am_imageinfo_image *img = malloc(sizeof *img);
    if (!img) {
        am_manifest_rec_cleanup(&rec);
        return AM_ENOMEM;
    }
    memset(img, 0, sizeof *img);
    copy_str(img->media_type, sizeof img->media_type, rec.media_type);
    img->digest = *top_digest;
    img->size = rec.len;
    struct am_descriptor config;
    struct tree *t;
    char msg[MSG_MAX];
    rc = derive(ii, up_idx, repo, rec.bytes, rec.len, img, &config, &t, msg, sizeof msg);
    am_manifest_rec_cleanup(&rec);
    if (rc == NEED_CHILD) rc = tree_resolve_stored(ii, up_idx, repo, t, img, msg, sizeof msg);
    tree_free(t);
    if (rc == NEED_CONFIG) rc = AM_ENOT_FOUND;
    if (rc == 0) *out = *img;
    free(img);
    return rc;
}

int am_imageinfo_note_index(struct am_imageinfo *ii, size_t up_idx, const char *repo,
                            const struct am_digest *digest, const char *media_type,
                            const char *bytes, size_t len)
{
    struct am_digest d;
    if (!ii || (!bytes && len)) return AM_EINVAL;
    if (!digest) {
        am_digest_of(AM_DIGEST_SHA256, bytes ? bytes : "", len, &d);
        if (!d.str[0]) return AM_ENOMEM;
        digest = &d;
    }
    if (!args_ok(ii, up_idx, repo, digest)) return AM_EINVAL;
    char key[KEY_MAX];
    size_t klen = make_key(key, up_idx, repo, digest);
    const struct image_val *v = lru_get(&ii->images, key, klen);
    if (v) {
        if (!v->is_index) return AM_EINVAL;
        /* Seen before: refresh its children (they may have aged out of the smaller map). */
        for (size_t i = 0; i < v->n; i++)
            remember_child(ii, up_idx, repo, &v->p[i].digest, &v->p[i].platform, digest);
        return 0;
    }
    struct am_manifest m;
    char msg[160];
    ii->stats.parses++;
    int rc = am_manifest_parse(bytes ? bytes : "", len, media_type, &m, msg, sizeof msg);
    if (rc) return rc == AM_ENOMEM ? rc : AM_EMANIFEST_INVALID;
    if (!am_mediatype_is_index(m.kind)) {
        am_manifest_cleanup(&m);
        return AM_EINVAL;
    }
    struct am_imageinfo_image *img = calloc(1, sizeof *img);
    if (!img) {
        am_manifest_cleanup(&m);
        return AM_ENOMEM;
    }
    copy_str(img->media_type, sizeof img->media_type,
             media_type && media_type[0] ? media_type : m.media_type);
    img->digest = *digest;
    img->size = len;
    struct tree *t = tree_new(digest, &m); /* takes m */
    if (!t) {
        free(img);
        return AM_ENOMEM;
    }
    char why[MSG_MAX];
    rc = tree_resolve_stored(ii, up_idx, repo, t, img, why, sizeof why); /* remembers img */
    if (rc && rc != AM_ENOMEM) {
        /* What can be attributed now. A child index not stored yet (or unreadable) is
         * noted in its turn when the /v2 API serves it; a broken tree is reported. */
        remember_direct_children(ii, up_idx, repo, &t->top, digest);
        if (rc == AM_EMANIFEST_INVALID || rc == AM_ETOO_LARGE)
            AM_INFO("imageinfo: noting %s@%s: %s", repo, digest->str, why);
        else
            rc = 0;
    }
    tree_free(t);
    free(img);
    return rc;
}

int am_imageinfo_child_platform(struct am_imageinfo *ii, size_t up_idx, const char *repo,
                                const struct am_digest *child_digest, struct am_platform *platform,
                                struct am_digest *index)
{
    if (!args_ok(ii, up_idx, repo, child_digest) || !platform) return AM_EINVAL;
    char key[KEY_MAX];
    size_t klen = make_key(key, up_idx, repo, child_digest);
    const struct child_val *v = lru_get(&ii->children, key, klen);
    if (!v) return AM_ENOT_FOUND;
    *platform = v->platform;
    if (index) *index = v->index;
    return 0;
}

/* --- lifetime -------------------------------------------------------------------------- */

int am_imageinfo_new(uv_loop_t *loop, const struct am_config *cfg, struct am_metastore *ms,
                     struct am_manifests *mf, struct am_upstream *const *ups,
                     struct am_imageinfo **out)
{
    struct am_imageinfo *ii = calloc(1, sizeof *ii);
    if (!ii) return AM_ENOMEM;
    ii->loop = loop;
    ii->cfg = cfg;
    ii->ms = ms;
    ii->mf = mf;
    ii->ups = ups;
    if (lru_init(&ii->images, AM_IMAGEINFO_LRU_IMAGES) ||
        lru_init(&ii->children, AM_IMAGEINFO_LRU_CHILDREN)) {
        lru_cleanup(&ii->images);
        lru_cleanup(&ii->children);
        free(ii);
        return AM_ENOMEM;
    }
    *out = ii;
    return 0;
}

void am_imageinfo_free(struct am_imageinfo *ii)
{
    if (!ii) return;
    ii->freeing = true;
    while (ii->fetches) {
        struct cfetch *cf = ii->fetches;
        cf_deliver(cf, AM_ECANCELED, NULL, NULL); /* cancels, unlinks and frees cf */
    }
    while (ii->waiters) {
        struct am_imageinfo_waiter *w = ii->waiters;
        if (w->mw) {
            am_manifests_cancel(w->mw);
            w->mw = NULL;
        }
        finish(w, AM_ECANCELED, NULL, NULL); /* unlinks w */
    }
    lru_cleanup(&ii->images);
    lru_cleanup(&ii->children);
    free(ii);
}

void am_imageinfo_get_stats(const struct am_imageinfo *ii, struct am_imageinfo_stats *out)
{
    *out = ii->stats;
}

void am_imageinfo_set_blob_source(struct am_imageinfo *ii, am_imageinfo_blob_fetch_fn fetch,
                                  am_imageinfo_blob_cancel_fn cancel, void *ctx)
{
    ii->blob_fetch = fetch;
    ii->blob_cancel = cancel;
    ii->blob_ctx = ctx;
}

/* pulltrack — which node pulled what, on which platform; see include/archmirror/pulltrack.h. */
#include "archmirror/pulltrack.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "archmirror/error.h"
#include "archmirror/log.h"
#include "archmirror/mediatype.h"
#include "archmirror/metastore.h"
#include "archmirror/metrics.h"
#include "archmirror/platform.h"
#include "archmirror/reference.h"

/* What one node last resolved in one repository. */
struct slot {
    bool used;
    uint64_t at_ms;
    char node[AM_PULLLOG_CLIENT_MAX];
    size_t up_idx;
    char repo[AM_NAME_MAX + 1];
    char tag[AM_TAG_MAX + 1];
    struct am_digest digest; /* the top manifest the tag resolved to */
    uint64_t bytes;          /* manifest bytes served in this pull so far */
    bool hit;                /* every manifest of this pull came from the cache */
    /* Child indexes of that top index (an index of indexes): fetching one by digest is
     * the same pull going one level down, not a new pull without a tag. */
    struct am_digest nested[AM_PULLTRACK_NESTED];
    size_t n_nested;
};

struct am_pulltrack {
    const struct am_config *cfg;
    struct am_imageinfo *ii;
    struct am_pulllog *pl;
    struct slot slots[AM_PULLTRACK_NODES];
    /* Recent completions, (node, upstream, repository, manifest) hashed to 64 bits:
     * a false match needs a 64-bit collision within the window. */
    struct recent {
        uint64_t key, at_ms;
    } recent[AM_PULLTRACK_RECENT];
};

int am_pulltrack_new(const struct am_config *cfg, struct am_imageinfo *ii, struct am_pulllog *pl,
                     struct am_pulltrack **out)
{
    struct am_pulltrack *pt = calloc(1, sizeof *pt);
    if (!pt) return AM_ENOMEM;
    pt->cfg = cfg;
    pt->ii = ii;
    pt->pl = pl;
    *out = pt;
    return 0;
}

void am_pulltrack_free(struct am_pulltrack *pt)
{
    free(pt);
}

/* The node is the client address without its port. */
static void node_of(const char *peer, char *out, size_t cap)
{
    snprintf(out, cap, "%s", peer ? peer : "");
    char *colon = strrchr(out, ':');
    if (colon && (out[0] != '[' || colon[-1] == ']')) *colon = '\0';
}

static uint64_t hash(const char *node, size_t up_idx, const char *repo)
{
    uint64_t h = 1469598103934665603u ^ up_idx;
    for (const char *s = node; *s; s++) h = (h ^ (unsigned char)*s) * 1099511628211u;
    for (const char *s = repo; *s; s++) h = (h ^ (unsigned char)*s) * 1099511628211u;
    return h;
}

/* The slot of (node, up, repo): found, or the one to overwrite (a small set-associative
 * table: 4 candidates, the oldest goes). */
static struct slot *lookup(struct am_pulltrack *pt, const char *node, size_t up_idx,
                           const char *repo, bool create, uint64_t now)
{
    size_t base = (size_t)(hash(node, up_idx, repo) % (AM_PULLTRACK_NODES / 4)) * 4;
    struct slot *victim = &pt->slots[base];
    for (size_t i = 0; i < 4; i++) {
        struct slot *s = &pt->slots[base + i];
        if (s->used && s->up_idx == up_idx && strcmp(s->node, node) == 0 &&
            strcmp(s->repo, repo) == 0) {
            if (now - s->at_ms <= AM_PULLTRACK_TTL_MS) return s;
            s->used = false;
        }
        if (!s->used || (victim->used && s->at_ms < victim->at_ms)) victim = s;
    }
    if (!create) return NULL;
    memset(victim, 0, sizeof *victim);
    victim->used = true;
    snprintf(victim->node, sizeof victim->node, "%s", node);
    victim->up_idx = up_idx;
    snprintf(victim->repo, sizeof victim->repo, "%s", repo);
    victim->hit = true;
    return victim;
}

/* Whether this node (address and X-Node-Platform) completed a pull ending at manifest d
 * within pull_log.dedupe_window;
 * remembers this completion either way (4-way sets, the oldest entry goes). */
static bool seen_recently(struct am_pulltrack *pt, const char *node, const char *header,
                          size_t up_idx, const char *repo, const struct am_digest *d, uint64_t now)
{
    uint64_t window = pt->cfg->pulllog_dedupe_ms;
    if (!window) return false;
    uint64_t key = hash(node, up_idx, repo);
    /* The header is part of who pulled: one address, two hosts.toml, two nodes. */
    for (const char *p = header; *p; p++) key = (key ^ (unsigned char)*p) * 1099511628211u;
    for (const char *p = d->str; *p; p++) key = (key ^ (unsigned char)*p) * 1099511628211u;
    key ^= key >> 29;
    key |= 1; /* 0 marks a free entry */
    size_t base = (size_t)((key >> 7) % (AM_PULLTRACK_RECENT / 4)) * 4;
    struct recent *victim = &pt->recent[base];
    for (size_t i = 0; i < 4; i++) {
        struct recent *r = &pt->recent[base + i];
        if (r->key == key) {
            bool dup = now >= r->at_ms && now - r->at_ms < window;
            if (!dup) r->at_ms = now; /* a new pull: the window starts again */
            return dup;
        }
        if (r->at_ms < victim->at_ms) victim = r;
    }
    victim->key = key;
    victim->at_ms = now;
    return false;
}

static bool is_nested(const struct slot *s, const struct am_digest *d)
{
    for (size_t i = 0; i < s->n_nested; i++)
        if (am_digest_equal(&s->nested[i], d)) return true;
    return false;
}

/* Remembers the child indexes an index served to this node lists (bytes verified by the
 * caller). Past AM_PULLTRACK_NESTED of them, the rest count as pulls of their own. */
static void note_nested(struct slot *s, const struct am_pulltrack_event *ev)
{
    struct am_manifest m;
    char msg[128];
    if (am_manifest_parse(ev->bytes, (size_t)ev->size, ev->media_type, &m, msg, sizeof msg)) return;
    for (size_t i = 0; i < m.n_entries && s->n_nested < AM_PULLTRACK_NESTED; i++) {
        const struct am_descriptor *e = &m.entries[i];
        enum am_media_kind k = am_mediatype_classify(e->media_type, strlen(e->media_type));
        if (am_mediatype_is_index(k) && !e->is_attestation && !is_nested(s, &e->digest))
            s->nested[s->n_nested++] = e->digest;
    }
    am_manifest_cleanup(&m);
}

static void record(struct am_pulltrack *pt, const struct am_pulltrack_event *ev, const char *tag,
                   const struct am_digest *top, const struct am_digest *child, const char *platform,
                   enum am_pulllog_source source, const struct am_imageinfo_image *image,
                   uint64_t bytes, bool hit)
{
    char plats[AM_IMAGEINFO_PLATFORMS_MAX][AM_PLATFORM_FORMAT_SIZE];
    const char *plist[AM_IMAGEINFO_PLATFORMS_MAX];
    size_t n = 0;
    for (size_t i = 0; image && i < image->n_platforms && n < AM_IMAGEINFO_PLATFORMS_MAX; i++) {
        am_platform_format(&image->platforms[i].platform, plats[n], sizeof plats[n]);
        plist[n] = plats[n];
        n++;
    }
    am_metrics_count_pull(platform[0] ? platform : "unknown");
    struct am_pulllog_record r = {
        .client = ev->peer,
        .node_platform = platform,
        .platform_source = source,
        .registry = pt->cfg->upstreams[ev->up_idx].name,
        .repository = ev->repo,
        .tag = tag && tag[0] ? tag : NULL,
        .digest = top->str,
        .platform_digest = child ? child->str : NULL,
        .cache_hit = hit,
        .bytes = bytes,
        .image_platforms = plist,
        .n_image_platforms = n,
    };
    if (pt->pl) {
        int rc = am_pulllog_record(pt->pl, &r);
        if (rc) AM_DEBUG("pull log record for %s: %s", ev->repo, am_error_message(rc));
    }
    AM_DEBUG("pull: %s %s/%s%s%s %s (%s)", ev->peer, r.registry, ev->repo, r.tag ? ":" : "",
             r.tag ? r.tag : "", platform[0] ? platform : "unknown platform",
             am_pulllog_source_name(source));
}

/* A completed single-arch pull: its platform is the header's, else its config's. */
static void record_single(struct am_pulltrack *pt, const struct am_pulltrack_event *ev,
                          const char *tag, const char *header,
                          const struct am_imageinfo_image *image, bool hit)
{
    char cfgplat[AM_PLATFORM_FORMAT_SIZE] = "";
    if (image && image->n_platforms == 1)
        am_platform_format(&image->platforms[0].platform, cfgplat, sizeof cfgplat);
    record(pt, ev, tag, ev->digest, NULL, header[0] ? header : cfgplat,
           header[0]    ? AM_PULLLOG_SOURCE_HEADER
           : cfgplat[0] ? AM_PULLLOG_SOURCE_CONFIG
                        : AM_PULLLOG_SOURCE_UNKNOWN,
           image, ev->size, hit);
}

/* A single-arch pull whose config was never read: the record waits for imageinfo to
 * fetch it once (shared with a diagnostics check asking the same), so the pull log gets
 * the image's platform rather than "unknown". Everything the record needs is copied. */
struct deferred {
    struct am_pulltrack *pt;
    struct am_pulltrack_event ev;
    char peer[AM_PULLLOG_CLIENT_MAX];
    struct am_platform node[1];
    char repo[AM_NAME_MAX + 1];
    char tag[AM_TAG_MAX + 1];
    char media_type[AM_MEDIATYPE_MAX + 1];
    char header[AM_PLATFORM_FORMAT_SIZE];
    struct am_digest digest;
    bool hit;
};

static void on_single_resolved(void *arg, const struct am_imageinfo_result *r)
{
    struct deferred *d = arg;
    if (r->err != AM_ECANCELED)
        record_single(d->pt, &d->ev, d->tag[0] ? d->tag : NULL, d->header, r->err ? NULL : r->image,
                      d->hit);
    free(d);
}

static bool defer_single(struct am_pulltrack *pt, const struct am_pulltrack_event *ev,
                         const char *tag, const char *header, bool hit)
{
    struct deferred *d = calloc(1, sizeof *d);
    if (!d) return false;
    d->pt = pt;
    d->hit = hit;
    snprintf(d->peer, sizeof d->peer, "%s", ev->peer ? ev->peer : "");
    snprintf(d->repo, sizeof d->repo, "%s", ev->repo);
    snprintf(d->tag, sizeof d->tag, "%s", tag ? tag : "");
    snprintf(d->media_type, sizeof d->media_type, "%s", ev->media_type);
    snprintf(d->header, sizeof d->header, "%s", header);
    d->digest = *ev->digest;
    d->ev = *ev;
    d->ev.peer = d->peer;
    d->ev.repo = d->repo;
    d->ev.tag = d->tag[0] ? d->tag : NULL;
    d->ev.media_type = d->media_type;
    d->ev.digest = &d->digest;
    d->ev.bytes = NULL;
    d->ev.n_node = ev->n_node ? 1 : 0;
    if (ev->n_node) d->node[0] = ev->node[0];
    d->ev.node = d->node;
    struct am_imageinfo_query q = {.up_idx = ev->up_idx, .repo = d->repo, .digest = &d->digest};
    struct am_imageinfo_waiter *w;
    if (am_imageinfo_get(pt->ii, &q, on_single_resolved, d, &w) != 0) {
        free(d);
        return false;
    }
    return true; /* on_single_resolved records it (maybe already did) */
}

bool am_pulltrack_observe(struct am_pulltrack *pt, const struct am_pulltrack_event *ev)
{
    char node[AM_PULLLOG_CLIENT_MAX], header[AM_PLATFORM_FORMAT_SIZE] = "";
    node_of(ev->peer, node, sizeof node);
    if (ev->n_node) am_platform_format(&ev->node[0], header, sizeof header);
    uint64_t now = am_metastore_now_ms();
    enum am_media_kind kind = am_mediatype_classify(ev->media_type, strlen(ev->media_type));

    if (am_mediatype_is_index(kind)) {
        if (ev->bytes)
            (void)am_imageinfo_note_index(pt->ii, ev->up_idx, ev->repo, ev->digest, ev->media_type,
                                          ev->bytes, (size_t)ev->size);
        struct slot *s = lookup(pt, node, ev->up_idx, ev->repo, true, now);
        bool nested = !ev->tag && is_nested(s, ev->digest);
        if (!nested && !am_digest_equal(&s->digest, ev->digest)) s->n_nested = 0;
        if (ev->tag) {
            snprintf(s->tag, sizeof s->tag, "%s", ev->tag);
        } else if (!nested && !am_digest_equal(&s->digest, ev->digest)) {
            s->tag[0] = '\0'; /* an index pulled by digest, not through a tag */
            s->bytes = 0;
            s->hit = true;
        }
        if (!nested) s->digest = *ev->digest; /* the pull stays the top index's */
        s->at_ms = now;
        s->bytes += ev->bytes ? ev->size : 0;
        s->hit &= ev->cache_hit;
        if (ev->bytes) note_nested(s, ev);
        return false;
    }

    /* A child of an index this node (or any node) resolved: the multi-arch pull is done. */
    struct am_platform child_plat;
    struct am_digest index;
    if (!ev->tag && am_imageinfo_child_platform(pt->ii, ev->up_idx, ev->repo, ev->digest,
                                                &child_plat, &index) == 0) {
        if (!ev->bytes) return false;
        struct slot *s = lookup(pt, node, ev->up_idx, ev->repo, false, now);
        if (seen_recently(pt, node, header, ev->up_idx, ev->repo, ev->digest, now)) {
            if (s && (am_digest_equal(&s->digest, &index) || is_nested(s, &index))) s->used = false;
            return false; /* the same pull again (pull_log.dedupe_window) */
        }
        bool same = s && (am_digest_equal(&s->digest, &index) || is_nested(s, &index));
        if (same) index = s->digest; /* a leaf below nested indexes: the top one's pull */
        char inferred[AM_PLATFORM_FORMAT_SIZE];
        am_platform_format(&child_plat, inferred, sizeof inferred);
        struct am_imageinfo_image image;
        bool known = am_imageinfo_lookup_cached(pt->ii, ev->up_idx, ev->repo, &index, &image) == 0;
        record(pt, ev, same ? s->tag : NULL, &index, ev->digest, header[0] ? header : inferred,
               header[0] ? AM_PULLLOG_SOURCE_HEADER : AM_PULLLOG_SOURCE_CHILD_MANIFEST,
               known ? &image : NULL, (same ? s->bytes : 0) + ev->size,
               (same ? s->hit : true) && ev->cache_hit);
        if (same) s->used = false;
        return true;
    }

    /* A single-arch image: resolved by a HEAD, done when its body is fetched. */
    struct slot *s = lookup(pt, node, ev->up_idx, ev->repo, ev->bytes == NULL, now);
    if (!ev->bytes) {
        if (ev->tag) snprintf(s->tag, sizeof s->tag, "%s", ev->tag);
        s->digest = *ev->digest;
        s->at_ms = now;
        s->hit &= ev->cache_hit;
        return false;
    }
    if (seen_recently(pt, node, header, ev->up_idx, ev->repo, ev->digest, now)) {
        if (s) s->used = false;
        return false; /* the same pull again (pull_log.dedupe_window) */
    }
    const char *tag = ev->tag;
    if (!tag && s && am_digest_equal(&s->digest, ev->digest)) tag = s->tag;
    bool hit = ev->cache_hit && (!s || s->hit);
    struct am_imageinfo_image image;
    if (am_imageinfo_lookup_cached(pt->ii, ev->up_idx, ev->repo, ev->digest, &image) == 0) {
        record_single(pt, ev, tag, header, &image, hit);
    } else if (!defer_single(pt, ev, tag, header, hit)) {
        record_single(pt, ev, tag, header, NULL, hit);
    }
    if (s) s->used = false;
    return true;
}

void am_pulltrack_record_mismatch(struct am_pulltrack *pt, const struct am_pulltrack_event *ev,
                                  const struct am_imageinfo_image *image)
{
    char header[AM_PLATFORM_FORMAT_SIZE] = "";
    if (ev->n_node) am_platform_format(&ev->node[0], header, sizeof header);
    record(pt, ev, ev->tag, &image->digest, NULL, header, AM_PULLLOG_SOURCE_HEADER, image, 0,
           ev->cache_hit);
}

/*
 * test_imageinfo — the platforms of an image from the caches: noted and stored indexes,
 * the child → platform map, single-arch manifests with and without a platform record,
 * schema 1, truncation, the LRU bound, queries answered synchronously from the store,
 * nested indexes (leaves, the outer entry's platform, cycles, the depth and count limits,
 * a child the upstream cannot give), and the query lifetime (cancel, free) against an
 * upstream that never answers in time.
 *
 * Every test gets a fresh metastore (mkdtemp under $AM_TEST_TMP or /tmp), its own loop,
 * and ends by closing everything and asserting uv_loop_close() == 0. No upstream is ever
 * reached: the lifetime tests end before their connection attempt does, and the one test
 * that runs the loop connects to a closed loopback port (refused at once).
 */
#include <errno.h>
#include <ftw.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "archmirror/buf.h"
#include "archmirror/config.h"
#include "archmirror/error.h"
#include "archmirror/imageinfo.h"
#include "archmirror/log.h"
#include "archmirror/manifests.h"
#include "archmirror/mediatype.h"
#include "archmirror/metastore.h"
#include "archmirror/platform.h"

#define UP   "example.com"
#define REPO "library/multi"

struct fx {
    uv_loop_t loop;
    char dir[4096];
    struct am_config cfg;
    struct am_metastore *ms;
    struct am_upstream *ups[AM_CONFIG_MAX_UPSTREAMS];
    struct am_manifests *mf;
    struct am_imageinfo *ii;
    bool closed;
};

/* One query's callback record. */
struct got {
    int calls;
    int err;
    char message[512];
    char cache_state[16];
    bool from_upstream;
    uint64_t checked_at_ms;
    struct am_imageinfo_image image;
};

static void on_got(void *arg, const struct am_imageinfo_result *r)
{
    struct got *g = arg;
    g->calls++;
    g->err = r->err;
    snprintf(g->message, sizeof g->message, "%s", r->message ? r->message : "");
    snprintf(g->cache_state, sizeof g->cache_state, "%s", r->cache_state ? r->cache_state : "?");
    g->from_upstream = r->from_upstream;
    g->checked_at_ms = r->checked_at_ms;
    if (!r->err) g->image = *r->image;
}

/* ---- fixture ---- */

static int rm_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st, (void)flag, (void)ftw;
    remove(path);
    return 0;
}

static int setup(void **state)
{
    struct fx *f = calloc(1, sizeof *f);
    char msg[256];
    if (!f) return -1;
    const char *base = getenv("AM_TEST_TMP");
    if (!base || !*base) base = "/tmp";
    if (mkdir(base, 0755) != 0 && errno != EEXIST) goto fail;
    snprintf(f->dir, sizeof f->dir, "%.4000s/imageinfo-XXXXXX", base);
    if (!mkdtemp(f->dir)) goto fail;
    if (uv_loop_init(&f->loop) != 0) goto fail;
    if (am_config_init_defaults(&f->cfg) ||
        am_config_set_upstream(&f->cfg, UP "=http://127.0.0.1:9", msg, sizeof msg) ||
        am_config_set_upstream(&f->cfg, "other.io=http://127.0.0.1:9", msg, sizeof msg))
        goto fail;
    if (am_metastore_open(&f->loop, f->dir, 0, &f->ms, msg, sizeof msg)) goto fail;
    if (am_manifests_new(&f->cfg, f->ms, f->ups, &f->mf)) goto fail;
    if (am_imageinfo_new(&f->loop, &f->cfg, f->ms, f->mf, f->ups, &f->ii)) goto fail;
    *state = f;
    return 0;
fail:
    fprintf(stderr, "setup failed: %s\n", strerror(errno));
    free(f);
    return -1;
}

static void on_closed(void *arg)
{
    struct fx *f = arg;
    f->closed = true;
}

static int teardown(void **state)
{
    struct fx *f = *state;
    am_imageinfo_free(f->ii);
    am_manifests_free(f->mf);
    for (size_t i = 0; i < f->cfg.n_upstreams; i++) am_upstream_free(f->ups[i]);
    am_metastore_close(f->ms, on_closed, f);
    assert_int_equal(uv_run(&f->loop, UV_RUN_DEFAULT), 0);
    assert_true(f->closed);
    assert_int_equal(uv_loop_close(&f->loop), 0);
    am_config_cleanup(&f->cfg);
    nftw(f->dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
    free(f);
    return 0;
}

/* ---- content ---- */

static void digest_of_str(const char *s, struct am_digest *d)
{
    am_digest_of(AM_DIGEST_SHA256, s, strlen(s), d);
}

/* A descriptor of media type mt and digest d. */
static void add_desc(struct am_buf *b, const char *mt, const struct am_digest *d, size_t size,
                     const char *platform_json, const char *annotations)
{
    assert_int_equal(
        am_buf_appendf(b, "%s{\"mediaType\":\"%s\",\"digest\":\"%s\",\"size\":%zu%s%s%s%s}",
                       b->len && b->data[b->len - 1] != '[' ? "," : "", mt, d->str, size,
                       platform_json ? ",\"platform\":" : "", platform_json ? platform_json : "",
                       annotations ? ",\"annotations\":" : "", annotations ? annotations : ""),
        0);
}

/* A child descriptor with the digest of `seed`. */
static void add_entry(struct am_buf *b, const char *seed, const char *platform_json,
                      const char *annotations)
{
    struct am_digest d;
    digest_of_str(seed, &d);
    add_desc(b, AM_MT_OCI_MANIFEST_S, &d, strlen(seed) + 100, platform_json, annotations);
}

/* An entry that is itself an index, with digest d. */
static void add_index_entry(struct am_buf *b, const struct am_digest *d, const char *platform_json)
{
    add_desc(b, AM_MT_OCI_INDEX_S, d, 500, platform_json, NULL);
}

static void index_begin(struct am_buf *b)
{
    am_buf_init(b, 1 << 20);
    assert_int_equal(am_buf_append_str(b, "{\"schemaVersion\":2,\"mediaType\":\"" AM_MT_OCI_INDEX_S
                                          "\",\"manifests\":["),
                     0);
}

/* Owned string. */
static char *index_end(struct am_buf *b)
{
    assert_int_equal(am_buf_append_str(b, "]}"), 0);
    return am_buf_steal(b, NULL);
}

/* OCI index: amd64, arm64/v8, arm (→ v7), a buildx attestation, a nested index without a
 * platform, unknown/unknown. Owned string. */
static char *standard_index(void)
{
    struct am_buf b;
    am_buf_init(&b, 1 << 20);
    assert_int_equal(am_buf_append_str(&b, "{\"schemaVersion\":2,\"mediaType\":\"" AM_MT_OCI_INDEX_S
                                           "\",\"manifests\":["),
                     0);
    add_entry(&b, "amd64", "{\"os\":\"linux\",\"architecture\":\"amd64\"}", NULL);
    add_entry(&b, "arm64", "{\"os\":\"linux\",\"architecture\":\"arm64\",\"variant\":\"v8\"}",
              NULL);
    add_entry(&b, "arm", "{\"os\":\"linux\",\"architecture\":\"arm\"}", NULL);
    add_entry(&b, "att", "{\"os\":\"unknown\",\"architecture\":\"unknown\"}",
              "{\"vnd.docker.reference.type\":\"attestation-manifest\"}");
    add_entry(&b, "nested", NULL, NULL);
    add_entry(&b, "unknown", "{\"os\":\"unknown\",\"architecture\":\"unknown\"}", NULL);
    assert_int_equal(am_buf_append_str(&b, "]}"), 0);
    return am_buf_steal(&b, NULL);
}

static const char *fmt(const struct am_platform *p)
{
    static char buf[AM_PLATFORM_FORMAT_SIZE];
    assert_int_equal(am_platform_format(p, buf, sizeof buf), 0);
    return buf;
}

static void assert_standard_platforms(const struct am_imageinfo_image *img)
{
    struct am_digest d;
    assert_true(img->is_index);
    assert_true(img->multi_arch);
    assert_false(img->truncated);
    assert_int_equal(img->n_platforms, 3);
    assert_string_equal(fmt(&img->platforms[0].platform), "linux/amd64");
    assert_string_equal(fmt(&img->platforms[1].platform), "linux/arm64"); /* v8 normalised */
    assert_string_equal(img->platforms[1].platform.variant, "");
    assert_string_equal(fmt(&img->platforms[2].platform), "linux/arm/v7");
    digest_of_str("arm64", &d);
    assert_string_equal(img->platforms[1].digest.str, d.str);
    assert_int_equal(img->platforms[1].size, strlen("arm64") + 100);
}

/* A Docker schema 2 manifest whose config has the digest of `config_seed`. Owned. */
static char *single_manifest(const char *config_seed)
{
    struct am_digest c, l;
    digest_of_str(config_seed, &c);
    digest_of_str("layer", &l);
    char *s = malloc(1024);
    assert_non_null(s);
    snprintf(s, 1024,
             "{\"schemaVersion\":2,\"mediaType\":\"" AM_MT_DOCKER_MANIFEST_S "\","
             "\"config\":{\"mediaType\":\"application/vnd.docker.container.image.v1+json\","
             "\"digest\":\"%s\",\"size\":321},"
             "\"layers\":[{\"mediaType\":\"application/vnd.docker.image.rootfs.diff.tar.gzip\","
             "\"digest\":\"%s\",\"size\":1000}]}",
             c.str, l.str);
    return s;
}

static void store_manifest(struct fx *f, const char *repo, const char *mt, const char *bytes,
                           struct am_digest *d)
{
    digest_of_str(bytes, d);
    assert_int_equal(
        am_metastore_put_manifest(f->ms, UP, repo, d, mt, bytes, strlen(bytes), NULL, NULL), 0);
}

/* ---- tests ---- */

static void a_noted_index_lists_its_platforms_without_attestations_or_unknowns(void **state)
{
    struct fx *f = *state;
    char *idx = standard_index();
    struct am_digest d;
    struct am_imageinfo_image img;
    digest_of_str(idx, &d);

    assert_int_equal(am_imageinfo_lookup_cached(f->ii, 0, REPO, &d, &img), AM_ENOT_FOUND);
    assert_int_equal(
        am_imageinfo_note_index(f->ii, 0, REPO, NULL, AM_MT_OCI_INDEX_S, idx, strlen(idx)), 0);
    memset(&img, 0, sizeof img);
    assert_int_equal(am_imageinfo_lookup_cached(f->ii, 0, REPO, &d, &img), 0);
    assert_standard_platforms(&img);
    assert_string_equal(img.digest.str, d.str);
    assert_string_equal(img.media_type, AM_MT_OCI_INDEX_S);
    assert_int_equal(img.size, strlen(idx));

    /* Noting it again (the digest given this time) parses nothing. */
    struct am_imageinfo_stats st;
    am_imageinfo_get_stats(f->ii, &st);
    uint64_t parses = st.parses;
    assert_int_equal(am_imageinfo_note_index(f->ii, 0, REPO, &d, NULL, idx, strlen(idx)), 0);
    am_imageinfo_get_stats(f->ii, &st);
    assert_int_equal(st.parses, parses);
    free(idx);
}

static void children_of_a_noted_index_map_to_their_platforms_per_repository(void **state)
{
    struct fx *f = *state;
    char *idx = standard_index();
    struct am_digest top, child, got;
    struct am_platform p;
    digest_of_str(idx, &top);
    assert_int_equal(am_imageinfo_note_index(f->ii, 0, REPO, NULL, NULL, idx, strlen(idx)), 0);

    digest_of_str("arm", &child);
    assert_int_equal(am_imageinfo_child_platform(f->ii, 0, REPO, &child, &p, &got), 0);
    assert_string_equal(fmt(&p), "linux/arm/v7");
    assert_string_equal(got.str, top.str);
    digest_of_str("amd64", &child);
    assert_int_equal(am_imageinfo_child_platform(f->ii, 0, REPO, &child, &p, NULL), 0);
    assert_string_equal(fmt(&p), "linux/amd64");

    /* Not children anyone pulls for a platform, or not of this repository/upstream. */
    digest_of_str("att", &child);
    assert_int_equal(am_imageinfo_child_platform(f->ii, 0, REPO, &child, &p, NULL), AM_ENOT_FOUND);
    digest_of_str("unknown", &child);
    assert_int_equal(am_imageinfo_child_platform(f->ii, 0, REPO, &child, &p, NULL), AM_ENOT_FOUND);
    digest_of_str("amd64", &child);
    assert_int_equal(am_imageinfo_child_platform(f->ii, 0, "library/other", &child, &p, NULL),
                     AM_ENOT_FOUND);
    assert_int_equal(am_imageinfo_child_platform(f->ii, 1, REPO, &child, &p, NULL), AM_ENOT_FOUND);
    assert_int_equal(am_imageinfo_child_platform(f->ii, 7, REPO, &child, &p, NULL), AM_EINVAL);
    free(idx);
}

static void noting_a_single_arch_manifest_or_garbage_records_nothing(void **state)
{
    struct fx *f = *state;
    char *m = single_manifest("cfg");
    struct am_digest d;
    struct am_imageinfo_image img;
    digest_of_str(m, &d);
    assert_int_equal(am_imageinfo_note_index(f->ii, 0, REPO, NULL, NULL, m, strlen(m)), AM_EINVAL);
    assert_int_equal(am_imageinfo_lookup_cached(f->ii, 0, REPO, &d, &img), AM_ENOT_FOUND);
    assert_int_equal(am_imageinfo_note_index(f->ii, 0, REPO, NULL, NULL, "{]", 2),
                     AM_EMANIFEST_INVALID);
    assert_int_equal(am_imageinfo_note_index(f->ii, 0, "", NULL, NULL, "{}", 2), AM_EINVAL);
    free(m);
}

static void a_stored_index_is_parsed_once_and_teaches_its_children(void **state)
{
    struct fx *f = *state;
    char *idx = standard_index();
    struct am_digest d, child;
    struct am_imageinfo_image img;
    struct am_imageinfo_stats st;
    struct am_platform p;
    store_manifest(f, REPO, AM_MT_OCI_INDEX_S, idx, &d);

    assert_int_equal(am_imageinfo_lookup_cached(f->ii, 0, REPO, &d, &img), 0);
    assert_standard_platforms(&img);
    digest_of_str("arm64", &child);
    assert_int_equal(am_imageinfo_child_platform(f->ii, 0, REPO, &child, &p, NULL), 0);
    assert_string_equal(fmt(&p), "linux/arm64");
    assert_int_equal(am_imageinfo_lookup_cached(f->ii, 0, REPO, &d, &img), 0);
    am_imageinfo_get_stats(f->ii, &st);
    assert_int_equal(st.parses, 1);
    assert_int_equal(st.lru_hits, 1);
    /* Another upstream's store has no such manifest. */
    assert_int_equal(am_imageinfo_lookup_cached(f->ii, 1, REPO, &d, &img), AM_ENOT_FOUND);
    free(idx);
}

static struct am_platform_rec platform_rec(const char *arch, const char *variant,
                                           const char *config_seed)
{
    struct am_platform_rec rec;
    memset(&rec, 0, sizeof rec);
    snprintf(rec.platform.os, sizeof rec.platform.os, "linux");
    snprintf(rec.platform.architecture, sizeof rec.platform.architecture, "%s", arch);
    snprintf(rec.platform.variant, sizeof rec.platform.variant, "%s", variant);
    digest_of_str(config_seed, &rec.config);
    return rec;
}

static void a_single_arch_manifest_needs_its_platform_record(void **state)
{
    struct fx *f = *state;
    char *m = single_manifest("cfg"), *m2 = single_manifest("cfg2");
    struct am_digest d, d2;
    struct am_imageinfo_image img;
    struct am_imageinfo_stats st;
    store_manifest(f, "library/single", AM_MT_DOCKER_MANIFEST_S, m, &d);
    store_manifest(f, "library/single", AM_MT_DOCKER_MANIFEST_S, m2, &d2);

    /* A record read from another config (the manifest was re-pushed) does not count. */
    struct am_platform_rec rec = platform_rec("arm", "v6", "another config");
    assert_int_equal(am_metastore_put_platform(f->ms, UP, "library/single", &d, &rec, NULL, NULL),
                     0);
    assert_int_equal(am_imageinfo_lookup_cached(f->ii, 0, "library/single", &d, &img),
                     AM_ENOT_FOUND);
    /* Not derivable: remembered as such, so the hot path does not parse it again. */
    am_imageinfo_get_stats(f->ii, &st);
    uint64_t parses = st.parses;
    assert_int_equal(am_imageinfo_lookup_cached(f->ii, 0, "library/single", &d, &img),
                     AM_ENOT_FOUND);
    am_imageinfo_get_stats(f->ii, &st);
    assert_int_equal(st.parses, parses);

    rec = platform_rec("arm", "v6", "cfg2");
    assert_int_equal(am_metastore_put_platform(f->ms, UP, "library/single", &d2, &rec, NULL, NULL),
                     0);
    memset(&img, 0, sizeof img);
    assert_int_equal(am_imageinfo_lookup_cached(f->ii, 0, "library/single", &d2, &img), 0);
    assert_false(img.is_index);
    assert_false(img.multi_arch);
    assert_int_equal(img.n_platforms, 1);
    assert_string_equal(fmt(&img.platforms[0].platform), "linux/arm/v6");
    assert_string_equal(img.platforms[0].digest.str, d2.str); /* the image's own manifest */
    assert_int_equal(img.platforms[0].size, strlen(m2));
    assert_string_equal(img.media_type, AM_MT_DOCKER_MANIFEST_S);
    am_imageinfo_get_stats(f->ii, &st);
    assert_int_equal(st.store_hits, 1);
    free(m);
    free(m2);
}

static void a_schema1_manifest_names_its_architecture_itself(void **state)
{
    struct fx *f = *state;
    const char *m = "{\"schemaVersion\":1,\"name\":\"library/old\",\"tag\":\"1\","
                    "\"architecture\":\"aarch64\",\"fsLayers\":[],\"history\":[]}";
    struct am_digest d;
    struct am_imageinfo_image img;
    store_manifest(f, "library/old", AM_MT_DOCKER_V1_S, m, &d);
    assert_int_equal(am_imageinfo_lookup_cached(f->ii, 0, "library/old", &d, &img), 0);
    assert_int_equal(img.n_platforms, 1);
    assert_string_equal(fmt(&img.platforms[0].platform), "linux/arm64");
    assert_false(img.multi_arch);
}

static void an_index_with_too_many_platforms_is_truncated(void **state)
{
    struct fx *f = *state;
    struct am_buf b;
    struct am_digest d;
    struct am_imageinfo_image img;
    am_buf_init(&b, 1 << 20);
    assert_int_equal(am_buf_append_str(&b, "{\"schemaVersion\":2,\"mediaType\":\"" AM_MT_OCI_INDEX_S
                                           "\",\"manifests\":["),
                     0);
    for (int i = 0; i < AM_IMAGEINFO_PLATFORMS_MAX + 6; i++) {
        char seed[32], plat[128];
        snprintf(seed, sizeof seed, "win-%d", i);
        snprintf(plat, sizeof plat,
                 "{\"os\":\"windows\",\"architecture\":\"amd64\",\"os.version\":\"10.0.%d\"}", i);
        add_entry(&b, seed, plat, NULL);
    }
    assert_int_equal(am_buf_append_str(&b, "]}"), 0);
    char *idx = am_buf_steal(&b, NULL);
    digest_of_str(idx, &d);
    assert_int_equal(am_imageinfo_note_index(f->ii, 0, REPO, NULL, NULL, idx, strlen(idx)), 0);
    assert_int_equal(am_imageinfo_lookup_cached(f->ii, 0, REPO, &d, &img), 0);
    assert_true(img.truncated);
    assert_int_equal(img.n_platforms, AM_IMAGEINFO_PLATFORMS_MAX);
    assert_string_equal(img.platforms[63].platform.os_version, "10.0.63");
    free(idx);
}

static void the_image_cache_forgets_the_least_recent_beyond_its_bound(void **state)
{
    struct fx *f = *state;
    struct am_digest first, d;
    struct am_imageinfo_image img;
    char buf[512];
    for (int i = 0; i <= AM_IMAGEINFO_LRU_IMAGES; i++) {
        int n = snprintf(buf, sizeof buf,
                         "{\"schemaVersion\":2,\"mediaType\":\"" AM_MT_OCI_INDEX_S
                         "\",\"manifests\":[],\"annotations\":{\"n\":\"%d\"}}",
                         i);
        digest_of_str(buf, &d);
        if (i == 0) first = d;
        assert_int_equal(am_imageinfo_note_index(f->ii, 0, REPO, &d, NULL, buf, (size_t)n), 0);
        if (i == 1) /* touching the first keeps it; the second becomes the oldest */
            assert_int_equal(am_imageinfo_lookup_cached(f->ii, 0, REPO, &first, &img), 0);
    }
    assert_int_equal(am_imageinfo_lookup_cached(f->ii, 0, REPO, &first, &img), 0);
    assert_int_equal(img.n_platforms, 0);
    assert_false(img.multi_arch);
    snprintf(buf, sizeof buf,
             "{\"schemaVersion\":2,\"mediaType\":\"" AM_MT_OCI_INDEX_S
             "\",\"manifests\":[],\"annotations\":{\"n\":\"1\"}}");
    digest_of_str(buf, &d);
    assert_int_equal(am_imageinfo_lookup_cached(f->ii, 0, REPO, &d, &img), AM_ENOT_FOUND);
}

static void a_fresh_tag_is_answered_from_the_caches_before_get_returns(void **state)
{
    struct fx *f = *state;
    char *idx = standard_index();
    struct am_digest d;
    store_manifest(f, REPO, AM_MT_OCI_INDEX_S, idx, &d);
    struct am_tag_rec tag;
    memset(&tag, 0, sizeof tag);
    tag.digest = d;
    snprintf(tag.media_type, sizeof tag.media_type, AM_MT_OCI_INDEX_S);
    tag.size = strlen(idx);
    tag.fetched_at_ms = am_metastore_now_ms() - 1234;
    assert_int_equal(am_metastore_put_tag(f->ms, UP, REPO, "1.0", &tag, NULL, NULL), 0);

    struct got g = {0};
    struct am_imageinfo_waiter *w = (void *)1;
    struct am_imageinfo_query q = {.up_idx = 0, .repo = REPO, .tag = "1.0", .log_ctx = "t"};
    assert_int_equal(am_imageinfo_get(f->ii, &q, on_got, &g, &w), 0);
    assert_null(w);
    assert_int_equal(g.calls, 1);
    assert_int_equal(g.err, 0);
    assert_string_equal(g.cache_state, "hit");
    assert_false(g.from_upstream);
    assert_int_equal(g.checked_at_ms, tag.fetched_at_ms);
    assert_standard_platforms(&g.image);
    assert_string_equal(g.image.digest.str, d.str);

    /* By digest, and a single-arch image whose platform is on record: also at once. */
    char *m = single_manifest("cfg");
    struct am_digest md;
    store_manifest(f, "library/single", AM_MT_DOCKER_MANIFEST_S, m, &md);
    struct am_platform_rec rec = platform_rec("amd64", "", "cfg");
    assert_int_equal(am_metastore_put_platform(f->ms, UP, "library/single", &md, &rec, NULL, NULL),
                     0);
    struct got g2 = {0};
    uint64_t before = am_metastore_now_ms();
    struct am_imageinfo_query q2 = {.up_idx = 0, .repo = "library/single", .digest = &md};
    assert_int_equal(am_imageinfo_get(f->ii, &q2, on_got, &g2, &w), 0);
    assert_null(w);
    assert_int_equal(g2.calls, 1);
    assert_int_equal(g2.err, 0);
    assert_int_equal(g2.image.n_platforms, 1);
    assert_string_equal(fmt(&g2.image.platforms[0].platform), "linux/amd64");
    assert_true(g2.checked_at_ms >= before); /* by digest: now */
    struct am_imageinfo_stats st;
    am_imageinfo_get_stats(f->ii, &st);
    assert_int_equal(st.queries, 2);
    assert_int_equal(st.config_fetches, 0);
    free(m);
    free(idx);
}

static void bad_queries_are_refused_without_calling_back(void **state)
{
    struct fx *f = *state;
    struct got g = {0};
    struct am_imageinfo_waiter *w;
    struct am_digest d;
    digest_of_str("x", &d);
    struct am_imageinfo_query bad[] = {
        {.up_idx = 9, .repo = REPO, .tag = "1"},
        {.up_idx = 0, .repo = NULL, .tag = "1"},
        {.up_idx = 0, .repo = "", .tag = "1"},
        {.up_idx = 0, .repo = REPO},
        {.up_idx = 0, .repo = REPO, .tag = "1", .digest = &d},
        {.up_idx = 0, .repo = REPO, .tag = ""},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        assert_int_equal(am_imageinfo_get(f->ii, &bad[i], on_got, &g, &w), AM_EINVAL);
    assert_int_equal(g.calls, 0);
    struct am_imageinfo_image img;
    assert_int_equal(am_imageinfo_lookup_cached(f->ii, 0, NULL, &d, &img), AM_EINVAL);
    assert_int_equal(am_imageinfo_lookup_cached(f->ii, 0, "a\nb", &d, &img), AM_EINVAL);
}

/* The upstream (a closed port) is only asked once the loop runs: these tests end first. */
static void make_upstream(struct fx *f)
{
    char msg[256];
    struct am_upstream_opts o = {.connect_timeout_ms = 1000};
    assert_int_equal(
        am_upstream_new(&f->loop, &f->cfg.upstreams[0], &o, &f->ups[0], msg, sizeof msg), 0);
}

static void a_cancelled_query_never_calls_back(void **state)
{
    struct fx *f = *state;
    make_upstream(f);
    struct got g = {0};
    struct am_imageinfo_waiter *w = NULL;
    struct am_imageinfo_query q = {.up_idx = 0, .repo = REPO, .tag = "cold"};
    assert_int_equal(am_imageinfo_get(f->ii, &q, on_got, &g, &w), 0);
    assert_non_null(w);
    am_imageinfo_cancel(w);
    am_imageinfo_cancel(NULL);
    assert_int_equal(g.calls, 0);
}

static void free_answers_pending_queries_with_ecanceled(void **state)
{
    struct fx *f = *state;
    make_upstream(f);
    struct got g1 = {0}, g2 = {0};
    struct am_imageinfo_waiter *w1 = NULL, *w2 = NULL;
    struct am_digest d;
    digest_of_str("never stored", &d);
    struct am_imageinfo_query q1 = {.up_idx = 0, .repo = REPO, .tag = "cold"};
    struct am_imageinfo_query q2 = {.up_idx = 0, .repo = REPO, .digest = &d};
    assert_int_equal(am_imageinfo_get(f->ii, &q1, on_got, &g1, &w1), 0);
    assert_int_equal(am_imageinfo_get(f->ii, &q2, on_got, &g2, &w2), 0);
    assert_non_null(w1);
    assert_non_null(w2);
    am_imageinfo_free(f->ii);
    f->ii = NULL;
    assert_int_equal(g1.calls, 1);
    assert_int_equal(g1.err, AM_ECANCELED);
    assert_int_equal(g2.calls, 1);
    assert_int_equal(g2.err, AM_ECANCELED);
}

/* ---- nested indexes ---- */

#define P_AMD64 "{\"os\":\"linux\",\"architecture\":\"amd64\"}"
#define P_ARM64 "{\"os\":\"linux\",\"architecture\":\"arm64\"}"
#define P_ARMV7 "{\"os\":\"linux\",\"architecture\":\"arm\",\"variant\":\"v7\"}"

/* An index of indexes:
 *   top: [A (no platform), B (linux/arm/v7), "top-amd64" (linux/amd64)]
 *   A:   ["a-amd64" (linux/amd64), "a-arm64" (linux/arm64), "a-att" (attestation)]
 *   B:   ["b-arm" (no platform: inherits arm/v7), "b-amd64" (an arm/v7 node never takes it)]
 * containerd on amd64 takes top-amd64 (platform-less entries sort last), on arm64 A's
 * a-arm64, on arm/v7 b-arm. */
struct nested {
    char *a, *b, *top;
    struct am_digest da, db, dtop;
};

static void nested_make(struct nested *n)
{
    struct am_buf b;
    index_begin(&b);
    add_entry(&b, "a-amd64", P_AMD64, NULL);
    add_entry(&b, "a-arm64", P_ARM64, NULL);
    add_entry(&b, "a-att", "{\"os\":\"unknown\",\"architecture\":\"unknown\"}",
              "{\"vnd.docker.reference.type\":\"attestation-manifest\"}");
    n->a = index_end(&b);
    digest_of_str(n->a, &n->da);
    index_begin(&b);
    add_entry(&b, "b-arm", NULL, NULL);
    add_entry(&b, "b-amd64", P_AMD64, NULL);
    n->b = index_end(&b);
    digest_of_str(n->b, &n->db);
    index_begin(&b);
    add_index_entry(&b, &n->da, NULL);
    add_index_entry(&b, &n->db, P_ARMV7);
    add_entry(&b, "top-amd64", P_AMD64, NULL);
    n->top = index_end(&b);
    digest_of_str(n->top, &n->dtop);
}

static void nested_free(struct nested *n)
{
    free(n->a);
    free(n->b);
    free(n->top);
}

static void assert_nested_platforms(const struct am_imageinfo_image *img)
{
    static const char *want[][2] = {
        {"linux/arm/v7", "b-arm"}, {"linux/amd64", "top-amd64"}, {"linux/arm64", "a-arm64"}};
    assert_true(img->is_index);
    assert_true(img->multi_arch);
    assert_false(img->truncated);
    assert_int_equal(img->n_platforms, 3);
    for (size_t i = 0; i < 3; i++) {
        struct am_digest d;
        digest_of_str(want[i][1], &d);
        assert_string_equal(fmt(&img->platforms[i].platform), want[i][0]);
        assert_string_equal(img->platforms[i].digest.str, d.str); /* the leaf, not A or B */
        assert_int_equal(img->platforms[i].size, strlen(want[i][1]) + 100);
    }
}

static void a_two_level_index_lists_the_leaf_manifests_of_its_child_indexes(void **state)
{
    struct fx *f = *state;
    struct nested n;
    struct am_digest d, child, got;
    struct am_imageinfo_image img;
    struct am_platform p;
    nested_make(&n);
    store_manifest(f, REPO, AM_MT_OCI_INDEX_S, n.top, &d);

    /* The children are not stored: not derivable without the upstream. Noting the top
     * attributes its own manifest entries only. */
    assert_int_equal(am_imageinfo_lookup_cached(f->ii, 0, REPO, &n.dtop, &img), AM_ENOT_FOUND);
    assert_int_equal(am_imageinfo_note_index(f->ii, 0, REPO, &n.dtop, NULL, n.top, strlen(n.top)),
                     0);
    digest_of_str("top-amd64", &child);
    assert_int_equal(am_imageinfo_child_platform(f->ii, 0, REPO, &child, &p, NULL), 0);
    digest_of_str("a-arm64", &child);
    assert_int_equal(am_imageinfo_child_platform(f->ii, 0, REPO, &child, &p, NULL), AM_ENOT_FOUND);

    store_manifest(f, REPO, AM_MT_OCI_INDEX_S, n.a, &d);
    store_manifest(f, REPO, AM_MT_OCI_INDEX_S, n.b, &d);
    memset(&img, 0, sizeof img);
    assert_int_equal(am_imageinfo_lookup_cached(f->ii, 0, REPO, &n.dtop, &img), 0);
    assert_nested_platforms(&img);
    assert_string_equal(img.digest.str, n.dtop.str);

    /* Every leaf maps to its platform and to the top index (what the pull log names). */
    digest_of_str("a-arm64", &child);
    assert_int_equal(am_imageinfo_child_platform(f->ii, 0, REPO, &child, &p, &got), 0);
    assert_string_equal(fmt(&p), "linux/arm64");
    assert_string_equal(got.str, n.dtop.str);
    digest_of_str("a-amd64", &child); /* a second amd64 manifest: containerd could pick it */
    assert_int_equal(am_imageinfo_child_platform(f->ii, 0, REPO, &child, &p, NULL), 0);
    digest_of_str("b-arm", &child);
    assert_int_equal(am_imageinfo_child_platform(f->ii, 0, REPO, &child, &p, NULL), 0);
    assert_string_equal(fmt(&p), "linux/arm/v7");
    digest_of_str("b-amd64", &child);
    assert_int_equal(am_imageinfo_child_platform(f->ii, 0, REPO, &child, &p, NULL), AM_ENOT_FOUND);
    digest_of_str("a-att", &child);
    assert_int_equal(am_imageinfo_child_platform(f->ii, 0, REPO, &child, &p, NULL), AM_ENOT_FOUND);
    /* The child indexes are not platforms. */
    assert_int_equal(am_imageinfo_child_platform(f->ii, 0, REPO, &n.db, &p, NULL), AM_ENOT_FOUND);

    /* Remembered: answered from memory. */
    struct am_imageinfo_stats st;
    am_imageinfo_get_stats(f->ii, &st);
    uint64_t parses = st.parses;
    assert_int_equal(am_imageinfo_lookup_cached(f->ii, 0, REPO, &n.dtop, &img), 0);
    am_imageinfo_get_stats(f->ii, &st);
    assert_int_equal(st.parses, parses);
    nested_free(&n);
}

static void a_query_reads_stored_child_indexes_through_the_manifests_module(void **state)
{
    struct fx *f = *state;
    struct nested n;
    struct am_digest d;
    nested_make(&n);
    store_manifest(f, REPO, AM_MT_OCI_INDEX_S, n.top, &d);
    store_manifest(f, REPO, AM_MT_OCI_INDEX_S, n.a, &d);
    store_manifest(f, REPO, AM_MT_OCI_INDEX_S, n.b, &d);

    struct got g = {0};
    struct am_imageinfo_waiter *w = (void *)1;
    struct am_imageinfo_query q = {.up_idx = 0, .repo = REPO, .digest = &n.dtop};
    assert_int_equal(am_imageinfo_get(f->ii, &q, on_got, &g, &w), 0);
    assert_null(w); /* every child was stored: answered before get returned */
    assert_int_equal(g.calls, 1);
    assert_int_equal(g.err, 0);
    assert_false(g.from_upstream);
    assert_string_equal(g.cache_state, "hit");
    assert_nested_platforms(&g.image);
    struct am_imageinfo_stats st;
    am_imageinfo_get_stats(f->ii, &st);
    assert_int_equal(st.nested_fetches, 2);
    assert_int_equal(st.parses, 3);
    nested_free(&n);
}

static void a_cycle_of_nested_indexes_is_refused(void **state)
{
    struct fx *f = *state;
    struct am_buf b;
    struct am_digest fake, top;
    struct am_imageinfo_image img;
    /* Verified bytes cannot form a cycle (a digest would have to hash to itself), so the
     * child is stored under a digest that is not its hash. */
    digest_of_str("not the hash of the child", &fake);
    index_begin(&b);
    add_entry(&b, "amd64", P_AMD64, NULL);
    add_index_entry(&b, &fake, NULL);
    char *t = index_end(&b);
    store_manifest(f, REPO, AM_MT_OCI_INDEX_S, t, &top);
    index_begin(&b);
    add_entry(&b, "arm64", P_ARM64, NULL);
    add_index_entry(&b, &top, NULL);
    char *c = index_end(&b);
    assert_int_equal(am_metastore_put_manifest(f->ms, UP, REPO, &fake, AM_MT_OCI_INDEX_S, c,
                                               strlen(c), NULL, NULL),
                     0);

    assert_int_equal(am_imageinfo_lookup_cached(f->ii, 0, REPO, &top, &img), AM_EMANIFEST_INVALID);
    struct got g = {0};
    struct am_imageinfo_waiter *w;
    struct am_imageinfo_query q = {.up_idx = 0, .repo = REPO, .digest = &top};
    assert_int_equal(am_imageinfo_get(f->ii, &q, on_got, &g, &w), 0);
    assert_int_equal(g.calls, 1);
    assert_int_equal(g.err, AM_EMANIFEST_INVALID);
    assert_non_null(strstr(g.message, "contains itself"));
    assert_non_null(strstr(g.message, top.str));
    free(t);
    free(c);
}

/* Stores a chain of `levels` indexes (the top one included) over one amd64 manifest. */
static void store_chain(struct fx *f, const char *repo, int levels, struct am_digest *top)
{
    struct am_buf b;
    index_begin(&b);
    add_entry(&b, "deep-amd64", P_AMD64, NULL);
    char *s = index_end(&b);
    store_manifest(f, repo, AM_MT_OCI_INDEX_S, s, top);
    free(s);
    for (int i = 1; i < levels; i++) {
        index_begin(&b);
        add_index_entry(&b, top, NULL);
        s = index_end(&b);
        store_manifest(f, repo, AM_MT_OCI_INDEX_S, s, top);
        free(s);
    }
}

static void indexes_nested_deeper_than_the_limit_are_refused(void **state)
{
    struct fx *f = *state;
    struct am_digest ok, deep, leaf;
    struct am_imageinfo_image img;
    digest_of_str("deep-amd64", &leaf);
    store_chain(f, "library/deep-ok", AM_IMAGEINFO_INDEX_DEPTH, &ok);
    assert_int_equal(am_imageinfo_lookup_cached(f->ii, 0, "library/deep-ok", &ok, &img), 0);
    assert_int_equal(img.n_platforms, 1);
    assert_string_equal(fmt(&img.platforms[0].platform), "linux/amd64");
    assert_string_equal(img.platforms[0].digest.str, leaf.str);

    store_chain(f, "library/deep", AM_IMAGEINFO_INDEX_DEPTH + 1, &deep);
    assert_int_equal(am_imageinfo_lookup_cached(f->ii, 0, "library/deep", &deep, &img),
                     AM_EMANIFEST_INVALID);
    struct got g = {0};
    struct am_imageinfo_waiter *w;
    struct am_imageinfo_query q = {.up_idx = 0, .repo = "library/deep", .digest = &deep};
    assert_int_equal(am_imageinfo_get(f->ii, &q, on_got, &g, &w), 0);
    assert_int_equal(g.calls, 1);
    assert_int_equal(g.err, AM_EMANIFEST_INVALID);
    assert_non_null(strstr(g.message, "more than 4 levels"));
}

static void more_nested_indexes_than_the_limit_are_refused(void **state)
{
    struct fx *f = *state;
    struct am_buf top;
    struct am_digest d, last;
    struct am_imageinfo_image img;
    index_begin(&top);
    for (int i = 0; i <= AM_IMAGEINFO_NESTED_MAX; i++) {
        struct am_buf b;
        char seed[32];
        snprintf(seed, sizeof seed, "leaf-%d", i);
        index_begin(&b);
        add_entry(&b, seed, P_AMD64, NULL);
        char *c = index_end(&b);
        store_manifest(f, REPO, AM_MT_OCI_INDEX_S, c, &d);
        free(c);
        if (i < AM_IMAGEINFO_NESTED_MAX) add_index_entry(&top, &d, NULL);
    }
    last = d;
    char *t = index_end(&top);
    store_manifest(f, REPO, AM_MT_OCI_INDEX_S, t, &d);
    assert_int_equal(am_imageinfo_lookup_cached(f->ii, 0, REPO, &d, &img), 0); /* at the bound */
    assert_int_equal(img.n_platforms, 1);
    free(t);

    /* One more child index. */
    index_begin(&top);
    for (int i = 0; i < AM_IMAGEINFO_NESTED_MAX; i++) {
        char seed[32];
        struct am_buf b;
        snprintf(seed, sizeof seed, "leaf-%d", i);
        index_begin(&b);
        add_entry(&b, seed, P_AMD64, NULL);
        char *c = index_end(&b);
        digest_of_str(c, &d);
        free(c);
        add_index_entry(&top, &d, NULL);
    }
    add_index_entry(&top, &last, NULL);
    t = index_end(&top);
    store_manifest(f, REPO, AM_MT_OCI_INDEX_S, t, &d);
    assert_int_equal(am_imageinfo_lookup_cached(f->ii, 0, REPO, &d, &img), AM_ETOO_LARGE);
    free(t);
}

static void a_nested_entry_that_is_a_manifest_is_refused(void **state)
{
    struct fx *f = *state;
    struct am_buf b;
    struct am_digest m, top;
    struct am_imageinfo_image img;
    char *single = single_manifest("cfg");
    store_manifest(f, REPO, AM_MT_DOCKER_MANIFEST_S, single, &m);
    index_begin(&b);
    add_index_entry(&b, &m, NULL); /* says index; is an image manifest */
    char *t = index_end(&b);
    store_manifest(f, REPO, AM_MT_OCI_INDEX_S, t, &top);
    assert_int_equal(am_imageinfo_lookup_cached(f->ii, 0, REPO, &top, &img), AM_EMANIFEST_INVALID);
    free(t);
    free(single);
}

static void a_child_index_the_upstream_cannot_give_fails_the_query_naming_it(void **state)
{
    struct fx *f = *state;
    make_upstream(f);
    struct am_buf b;
    struct am_digest missing, top;
    digest_of_str("never stored", &missing);
    index_begin(&b);
    add_entry(&b, "amd64", P_AMD64, NULL);
    add_index_entry(&b, &missing, NULL);
    char *t = index_end(&b);
    store_manifest(f, REPO, AM_MT_OCI_INDEX_S, t, &top);

    struct got g = {0};
    struct am_imageinfo_waiter *w = NULL;
    struct am_imageinfo_query q = {.up_idx = 0, .repo = REPO, .digest = &top};
    assert_int_equal(am_imageinfo_get(f->ii, &q, on_got, &g, &w), 0);
    assert_non_null(w); /* waiting for the child, upstream */
    assert_int_equal(g.calls, 0);
    /* The upstream is a closed port: the connection is refused on the first turns. */
    for (int i = 0; i < 1000 && g.calls == 0; i++) uv_run(&f->loop, UV_RUN_ONCE);
    assert_int_equal(g.calls, 1);
    assert_int_not_equal(g.err, 0);
    assert_non_null(strstr(g.message, "nested index"));
    assert_non_null(strstr(g.message, missing.str));
    struct am_imageinfo_stats st;
    am_imageinfo_get_stats(f->ii, &st);
    assert_int_equal(st.nested_fetches, 1);
    free(t);
}

static void a_query_waiting_for_a_child_index_can_be_cancelled_or_freed(void **state)
{
    struct fx *f = *state;
    make_upstream(f);
    struct nested n;
    struct am_digest d;
    nested_make(&n);
    store_manifest(f, REPO, AM_MT_OCI_INDEX_S, n.top, &d);
    struct got g1 = {0}, g2 = {0};
    struct am_imageinfo_waiter *w1 = NULL, *w2 = NULL;
    struct am_imageinfo_query q = {.up_idx = 0, .repo = REPO, .digest = &n.dtop};
    assert_int_equal(am_imageinfo_get(f->ii, &q, on_got, &g1, &w1), 0);
    assert_int_equal(am_imageinfo_get(f->ii, &q, on_got, &g2, &w2), 0);
    assert_non_null(w1);
    assert_non_null(w2);
    am_imageinfo_cancel(w1);
    am_imageinfo_free(f->ii);
    f->ii = NULL;
    assert_int_equal(g1.calls, 0);
    assert_int_equal(g2.calls, 1);
    assert_int_equal(g2.err, AM_ECANCELED);
    nested_free(&n);
}

int main(void)
{
    am_log_set_level(AM_LOG_ERROR);
    const struct CMUnitTest tests[] = {
#define T(name) cmocka_unit_test_setup_teardown(name, setup, teardown)
        T(a_noted_index_lists_its_platforms_without_attestations_or_unknowns),
        T(children_of_a_noted_index_map_to_their_platforms_per_repository),
        T(noting_a_single_arch_manifest_or_garbage_records_nothing),
        T(a_stored_index_is_parsed_once_and_teaches_its_children),
        T(a_single_arch_manifest_needs_its_platform_record),
        T(a_schema1_manifest_names_its_architecture_itself),
        T(an_index_with_too_many_platforms_is_truncated),
        T(the_image_cache_forgets_the_least_recent_beyond_its_bound),
        T(a_fresh_tag_is_answered_from_the_caches_before_get_returns),
        T(bad_queries_are_refused_without_calling_back),
        T(a_cancelled_query_never_calls_back),
        T(free_answers_pending_queries_with_ecanceled),
        T(a_two_level_index_lists_the_leaf_manifests_of_its_child_indexes),
        T(a_query_reads_stored_child_indexes_through_the_manifests_module),
        T(a_cycle_of_nested_indexes_is_refused),
        T(indexes_nested_deeper_than_the_limit_are_refused),
        T(more_nested_indexes_than_the_limit_are_refused),
        T(a_nested_entry_that_is_a_manifest_is_refused),
        T(a_child_index_the_upstream_cannot_give_fails_the_query_naming_it),
        T(a_query_waiting_for_a_child_index_can_be_cancelled_or_freed),
#undef T
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

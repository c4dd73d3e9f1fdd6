/*
 * test_imageinfo — the platforms of an image from the caches: noted and stored indexes,
 * the child → platform map, single-arch manifests with and without a platform record,
 * schema 1, truncation, the LRU bound, queries answered synchronously from the store, and
 * the query lifetime (cancel, free) against an upstream that never answers in time.
 *
 * Every test gets a fresh metastore (mkdtemp under $AM_TEST_TMP or /tmp), its own loop,
 * and ends by closing everything and asserting uv_loop_close() == 0. No upstream is ever
 * reached: the lifetime tests end before their connection attempt does.
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

/* A child descriptor with the digest of `seed`. */
static void add_entry(struct am_buf *b, const char *seed, const char *platform_json,
                      const char *annotations)
{
    struct am_digest d;
    digest_of_str(seed, &d);
    assert_int_equal(
        am_buf_appendf(b,
                       "%s{\"mediaType\":\"" AM_MT_OCI_MANIFEST_S
                       "\",\"digest\":\"%s\",\"size\":%zu%s%s%s%s}",
                       b->len && b->data[b->len - 1] != '[' ? "," : "", d.str, strlen(seed) + 100,
                       platform_json ? ",\"platform\":" : "", platform_json ? platform_json : "",
                       annotations ? ",\"annotations\":" : "", annotations ? annotations : ""),
        0);
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
#undef T
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

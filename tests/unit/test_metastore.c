/*
 * test_metastore — the LMDB metadata store: round trips, scoping, batching, close,
 * full and read-only stores, corrupt records, freshness, the manifest budget (LRU
 * eviction, read times kept in memory and batched).
 *
 * Every test gets a fresh directory (mkdtemp under $AM_TEST_TMP or /tmp) and its own
 * loop, and ends by closing the store and asserting uv_loop_close() == 0: the store must
 * leave no live handle or request behind. Corrupt records are written with the LMDB API
 * directly, using the key and value layout documented in src/metastore.c.
 */
#include <errno.h>
#include <ftw.h>
#include <lmdb.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "archmirror/config.h"
#include "archmirror/digest.h"
#include "archmirror/error.h"
#include "archmirror/log.h"
#include "archmirror/mediatype.h"
#include "archmirror/metastore.h"
#include "archmirror/reference.h"

#define MAX_CALLS 128

struct fixture {
    uv_loop_t loop;
    char dir[4096];
    struct am_metastore *ms;
    int seq;    /* next callback sequence number */
    int closed; /* close's done calls */
    int closed_seq;
};

/* One put's callback record. */
struct call {
    struct fixture *f;
    int calls;
    int status;
    int seq;
};

/* ---- fixture ---- */

static int rm_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st, (void)flag, (void)ftw;
    remove(path);
    return 0;
}

static int setup(void **state)
{
    struct fixture *f = calloc(1, sizeof *f);
    if (!f) return -1;
    const char *base = getenv("AM_TEST_TMP");
    if (!base || !*base) base = "/tmp";
    /* $AM_TEST_TMP may not exist yet; create it (one level is all ctest needs). */
    if (mkdir(base, 0755) != 0 && errno != EEXIST) goto fail;
    snprintf(f->dir, sizeof f->dir, "%.4000s/metastore-XXXXXX", base);
    if (!mkdtemp(f->dir)) goto fail;
    if (uv_loop_init(&f->loop) != 0) {
        rmdir(f->dir);
        goto fail;
    }
    *state = f;
    return 0;

fail:
    fprintf(stderr, "setup: %s: %s\n", base, strerror(errno));
    free(f);
    return -1;
}

static int teardown(void **state)
{
    struct fixture *f = *state;
    chmod(f->dir, 0700);
    nftw(f->dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
    free(f);
    return 0;
}

static void on_closed(void *arg)
{
    struct fixture *f = arg;
    f->closed++;
    f->closed_seq = f->seq++;
}

static void on_put(void *arg, int status)
{
    struct call *c = arg;
    c->calls++;
    c->status = status;
    c->seq = c->f->seq++;
}

static void open_store(struct fixture *f, uint64_t map_bytes)
{
    char msg[256] = "";
    int rc = am_metastore_open(&f->loop, f->dir, map_bytes, &f->ms, msg, sizeof msg);
    if (rc) fail_msg("open: %s: %s", am_error_name(rc), msg);
}

/* Closes the store (if open), runs the loop until done, and checks the loop is empty. */
static void finish(struct fixture *f)
{
    if (f->ms) {
        int before = f->closed;
        am_metastore_close(f->ms, on_closed, f);
        f->ms = NULL;
        assert_int_equal(f->closed, before); /* never from within close */
        assert_int_equal(uv_run(&f->loop, UV_RUN_DEFAULT), 0);
        assert_int_equal(f->closed, before + 1);
    }
    assert_int_equal(uv_loop_close(&f->loop), 0);
}

static void close_store(struct fixture *f)
{
    int before = f->closed;
    am_metastore_close(f->ms, on_closed, f);
    f->ms = NULL;
    assert_int_equal(uv_run(&f->loop, UV_RUN_DEFAULT), 0);
    assert_int_equal(f->closed, before + 1);
}

static void digest_of_int(int i, struct am_digest *d)
{
    char s[32];
    int n = snprintf(s, sizeof s, "blob-%d", i);
    am_digest_of(AM_DIGEST_SHA256, s, (size_t)n, d);
}

static struct am_tag_rec tag_rec(int i, uint64_t fetched_at)
{
    struct am_tag_rec r;
    memset(&r, 0, sizeof r);
    digest_of_int(i, &r.digest);
    snprintf(r.media_type, sizeof r.media_type, "%s", AM_MT_OCI_INDEX_S);
    r.size = 1000u + (uint64_t)i;
    r.fetched_at_ms = fetched_at;
    return r;
}

/* Puts a tag, runs the loop until its callback ran, returns the callback's status. */
static int put_tag_now(struct fixture *f, const char *up, const char *repo, const char *tag,
                       const struct am_tag_rec *rec)
{
    struct call c = {.f = f};
    assert_int_equal(am_metastore_put_tag(f->ms, up, repo, tag, rec, on_put, &c), 0);
    assert_int_equal(uv_run(&f->loop, UV_RUN_DEFAULT), 0);
    assert_int_equal(c.calls, 1);
    return c.status;
}

static int put_manifest_now(struct fixture *f, const char *up, const char *repo,
                            const struct am_digest *d, const char *mt, const char *bytes,
                            size_t len)
{
    struct call c = {.f = f};
    assert_int_equal(am_metastore_put_manifest(f->ms, up, repo, d, mt, bytes, len, on_put, &c), 0);
    assert_int_equal(uv_run(&f->loop, UV_RUN_DEFAULT), 0);
    assert_int_equal(c.calls, 1);
    return c.status;
}

static void assert_tag_equal(const struct am_tag_rec *a, const struct am_tag_rec *b)
{
    assert_string_equal(a->digest.str, b->digest.str);
    assert_int_equal(a->digest.alg, b->digest.alg);
    assert_string_equal(a->media_type, b->media_type);
    assert_int_equal(a->size, b->size);
    assert_int_equal(a->fetched_at_ms, b->fetched_at_ms);
}

/* ---- round trips ---- */

static void stores_and_reads_back_a_manifest(void **state)
{
    struct fixture *f = *state;
    const char body[] = "{\"schemaVersion\":2,\"mediaType\":\"" AM_MT_OCI_MANIFEST_S "\"}";
    struct am_digest d;
    struct am_manifest_rec rec;
    am_digest_of(AM_DIGEST_SHA256, body, sizeof body - 1, &d);
    open_store(f, 0);

    uint64_t before = am_metastore_now_ms();
    assert_int_equal(put_manifest_now(f, "docker.io", "library/nginx", &d, AM_MT_OCI_MANIFEST_S,
                                      body, sizeof body - 1),
                     0);
    uint64_t after = am_metastore_now_ms();

    assert_int_equal(am_metastore_get_manifest(f->ms, "docker.io", "library/nginx", &d, &rec), 0);
    assert_int_equal(rec.len, sizeof body - 1);
    assert_memory_equal(rec.bytes, body, rec.len);
    assert_int_equal(rec.bytes[rec.len], '\0');
    assert_string_equal(rec.media_type, AM_MT_OCI_MANIFEST_S);
    assert_true(am_digest_equal(&rec.digest, &d));
    assert_true(rec.stored_at_ms >= before && rec.stored_at_ms <= after);
    am_manifest_rec_cleanup(&rec);
    assert_null(rec.bytes);

    struct am_metastore_stats st;
    am_metastore_get_stats(f->ms, &st);
    assert_int_equal(st.puts, 1);
    assert_int_equal(st.committed, 1);
    assert_int_equal(st.failed, 0);
    finish(f);
}

static void stores_and_reads_back_a_tag(void **state)
{
    struct fixture *f = *state;
    struct am_tag_rec in = tag_rec(7, 1700000000123u), out;
    open_store(f, 0);

    assert_int_equal(put_tag_now(f, "ghcr.io", "owner/app", "v1.2.3", &in), 0);
    assert_int_equal(am_metastore_get_tag(f->ms, "ghcr.io", "owner/app", "v1.2.3", &out), 0);
    assert_tag_equal(&out, &in);
    finish(f);
}

static void reads_its_own_writes_before_they_are_committed(void **state)
{
    struct fixture *f = *state;
    struct am_tag_rec first = tag_rec(1, 1700000000001u), second = tag_rec(2, 1700000000002u);
    struct am_tag_rec out;
    const char body[] = "{\"schemaVersion\":2}";
    struct am_digest d;
    struct am_manifest_rec rec;
    struct call c1 = {.f = f}, c2 = {.f = f}, c3 = {.f = f};
    am_digest_of(AM_DIGEST_SHA256, body, sizeof body - 1, &d);
    open_store(f, 0);

    /* Nothing has been committed yet: the loop has not run. */
    assert_int_equal(
        am_metastore_put_tag(f->ms, "docker.io", "library/x", "1", &first, on_put, &c1), 0);
    assert_int_equal(
        am_metastore_put_tag(f->ms, "docker.io", "library/x", "1", &second, on_put, &c2), 0);
    assert_int_equal(am_metastore_put_manifest(f->ms, "docker.io", "library/x", &d,
                                               AM_MT_OCI_MANIFEST_S, body, sizeof body - 1, on_put,
                                               &c3),
                     0);
    assert_int_equal(c1.calls + c2.calls + c3.calls, 0);
    assert_int_equal(am_metastore_get_tag(f->ms, "docker.io", "library/x", "1", &out), 0);
    assert_tag_equal(&out, &second); /* the newest queued write wins */
    assert_int_equal(am_metastore_get_manifest(f->ms, "docker.io", "library/x", &d, &rec), 0);
    assert_memory_equal(rec.bytes, body, rec.len);
    am_manifest_rec_cleanup(&rec);
    assert_int_equal(am_metastore_get_tag(f->ms, "docker.io", "library/y", "1", &out),
                     AM_ENOT_FOUND);

    assert_int_equal(uv_run(&f->loop, UV_RUN_DEFAULT), 0);
    assert_int_equal(c1.calls + c2.calls + c3.calls, 3);
    assert_int_equal(am_metastore_get_tag(f->ms, "docker.io", "library/x", "1", &out), 0);
    assert_tag_equal(&out, &second);
    finish(f);
}

static void stores_an_empty_manifest_media_type_and_sha512_digest(void **state)
{
    struct fixture *f = *state;
    struct am_digest d;
    struct am_manifest_rec rec;
    am_digest_of(AM_DIGEST_SHA512, "x", 1, &d);
    open_store(f, 0);

    assert_int_equal(put_manifest_now(f, "quay.io", "a/b", &d, "", "x", 1), 0);
    assert_int_equal(am_metastore_get_manifest(f->ms, "quay.io", "a/b", &d, &rec), 0);
    assert_string_equal(rec.media_type, "");
    assert_int_equal(rec.len, 1);
    assert_int_equal(rec.digest.alg, AM_DIGEST_SHA512);
    am_manifest_rec_cleanup(&rec);
    finish(f);
}

static void reports_missing_records_as_not_found(void **state)
{
    struct fixture *f = *state;
    struct am_digest d;
    struct am_manifest_rec rec;
    struct am_tag_rec tag;
    digest_of_int(1, &d);
    open_store(f, 0);

    memset(&rec, 0x5a, sizeof rec);
    assert_int_equal(am_metastore_get_manifest(f->ms, "docker.io", "library/x", &d, &rec),
                     AM_ENOT_FOUND);
    assert_null(rec.bytes); /* zeroed, so cleanup is safe */
    am_manifest_rec_cleanup(&rec);
    am_manifest_rec_cleanup(NULL);
    assert_int_equal(am_metastore_get_tag(f->ms, "docker.io", "library/x", "latest", &tag),
                     AM_ENOT_FOUND);
    finish(f);
}

/* ---- scoping ---- */

static void keeps_upstreams_and_repositories_apart(void **state)
{
    struct fixture *f = *state;
    struct am_digest d;
    struct am_manifest_rec rec;
    struct am_tag_rec t = tag_rec(1, 5), out;
    digest_of_int(1, &d);
    open_store(f, 0);

    assert_int_equal(put_manifest_now(f, "docker.io", "a/repo", &d, AM_MT_OCI_MANIFEST_S, "{}", 2),
                     0);
    assert_int_equal(put_tag_now(f, "docker.io", "a/repo", "latest", &t), 0);

    assert_int_equal(am_metastore_get_manifest(f->ms, "docker.io", "a/repo", &d, &rec), 0);
    am_manifest_rec_cleanup(&rec);
    assert_int_equal(am_metastore_get_manifest(f->ms, "docker.io", "b/repo", &d, &rec),
                     AM_ENOT_FOUND);
    assert_int_equal(am_metastore_get_manifest(f->ms, "ghcr.io", "a/repo", &d, &rec),
                     AM_ENOT_FOUND);
    assert_int_equal(am_metastore_get_tag(f->ms, "docker.io", "b/repo", "latest", &out),
                     AM_ENOT_FOUND);
    assert_int_equal(am_metastore_get_tag(f->ms, "ghcr.io", "a/repo", "latest", &out),
                     AM_ENOT_FOUND);
    /* Tags and manifests live in different DBs: a tag spelled like the digest is absent. */
    assert_int_equal(am_metastore_get_tag(f->ms, "docker.io", "a/repo", d.str, &out),
                     AM_ENOT_FOUND);
    finish(f);
}

static void does_not_confuse_components_that_concatenate_alike(void **state)
{
    struct fixture *f = *state;
    struct am_tag_rec t1 = tag_rec(1, 1), t2 = tag_rec(2, 2), out;
    open_store(f, 0);

    assert_int_equal(put_tag_now(f, "ab", "c", "d", &t1), 0);
    assert_int_equal(put_tag_now(f, "a", "bc", "d", &t2), 0);
    assert_int_equal(am_metastore_get_tag(f->ms, "ab", "c", "d", &out), 0);
    assert_tag_equal(&out, &t1);
    assert_int_equal(am_metastore_get_tag(f->ms, "a", "bc", "d", &out), 0);
    assert_tag_equal(&out, &t2);
    assert_int_equal(am_metastore_get_tag(f->ms, "a", "b", "cd", &out), AM_ENOT_FOUND);
    finish(f);
}

static void stores_keys_longer_than_lmdb_allows(void **state)
{
    struct fixture *f = *state;
    char up[AM_REGISTRY_MAX + 1], repo1[AM_NAME_MAX + 1], repo2[AM_NAME_MAX + 1];
    char tag[AM_TAG_MAX + 1];
    struct am_digest d;
    struct am_manifest_rec rec;
    struct am_tag_rec t1 = tag_rec(1, 1), t2 = tag_rec(2, 2), out;
    memset(up, 'u', AM_REGISTRY_MAX);
    up[AM_REGISTRY_MAX] = '\0';
    memset(repo1, 'r', AM_NAME_MAX);
    repo1[AM_NAME_MAX] = '\0';
    memcpy(repo2, repo1, sizeof repo2);
    repo2[AM_NAME_MAX - 1] = 's'; /* differs in the last byte only */
    memset(tag, 't', AM_TAG_MAX);
    tag[AM_TAG_MAX] = '\0';
    am_digest_of(AM_DIGEST_SHA512, "long", 4, &d);
    open_store(f, 0);

    assert_int_equal(put_manifest_now(f, up, repo1, &d, AM_MT_OCI_MANIFEST_S, "one", 3), 0);
    assert_int_equal(put_manifest_now(f, up, repo2, &d, AM_MT_OCI_MANIFEST_S, "two", 3), 0);
    assert_int_equal(put_tag_now(f, up, repo1, tag, &t1), 0);
    assert_int_equal(put_tag_now(f, up, repo2, tag, &t2), 0);

    assert_int_equal(am_metastore_get_manifest(f->ms, up, repo1, &d, &rec), 0);
    assert_memory_equal(rec.bytes, "one", 3);
    am_manifest_rec_cleanup(&rec);
    assert_int_equal(am_metastore_get_manifest(f->ms, up, repo2, &d, &rec), 0);
    assert_memory_equal(rec.bytes, "two", 3);
    am_manifest_rec_cleanup(&rec);
    assert_int_equal(am_metastore_get_tag(f->ms, up, repo1, tag, &out), 0);
    assert_tag_equal(&out, &t1);
    assert_int_equal(am_metastore_get_tag(f->ms, up, repo2, tag, &out), 0);
    assert_tag_equal(&out, &t2);
    finish(f);
}

/* ---- overwrite and batching ---- */

static void overwrites_a_tag(void **state)
{
    struct fixture *f = *state;
    struct am_tag_rec t1 = tag_rec(1, 100), t2 = tag_rec(2, 200), t3 = tag_rec(3, 300), out;
    struct call c2 = {.f = f}, c3 = {.f = f};
    open_store(f, 0);

    assert_int_equal(put_tag_now(f, "docker.io", "library/x", "latest", &t1), 0);
    assert_int_equal(put_tag_now(f, "docker.io", "library/x", "latest", &t2), 0);
    assert_int_equal(am_metastore_get_tag(f->ms, "docker.io", "library/x", "latest", &out), 0);
    assert_tag_equal(&out, &t2);

    /* Two puts of one key before the loop runs: the later one wins. */
    assert_int_equal(
        am_metastore_put_tag(f->ms, "docker.io", "library/x", "latest", &t3, on_put, &c3), 0);
    assert_int_equal(
        am_metastore_put_tag(f->ms, "docker.io", "library/x", "latest", &t2, on_put, &c2), 0);
    assert_int_equal(uv_run(&f->loop, UV_RUN_DEFAULT), 0);
    assert_int_equal(c3.calls, 1);
    assert_int_equal(c2.calls, 1);
    assert_true(c3.seq < c2.seq);
    assert_int_equal(am_metastore_get_tag(f->ms, "docker.io", "library/x", "latest", &out), 0);
    assert_tag_equal(&out, &t2);
    finish(f);
}

static void batches_puts_made_before_the_loop_runs(void **state)
{
    struct fixture *f = *state;
    enum { N = 50 };
    struct call calls[N];
    struct am_digest d[N];
    char tags[N][16];
    open_store(f, 0);

    for (int i = 0; i < N; i++) {
        calls[i] = (struct call){.f = f};
        if (i % 2) {
            struct am_tag_rec t = tag_rec(i, (uint64_t)i);
            snprintf(tags[i], sizeof tags[i], "t%d", i);
            assert_int_equal(am_metastore_put_tag(f->ms, "docker.io", "library/b", tags[i], &t,
                                                  on_put, &calls[i]),
                             0);
        } else {
            digest_of_int(i, &d[i]);
            assert_int_equal(am_metastore_put_manifest(f->ms, "docker.io", "library/b", &d[i],
                                                       AM_MT_OCI_MANIFEST_S, "x", 1, on_put,
                                                       &calls[i]),
                             0);
        }
    }
    for (int i = 0; i < N; i++) assert_int_equal(calls[i].calls, 0); /* not inline */
    assert_int_equal(uv_run(&f->loop, UV_RUN_DEFAULT), 0);

    for (int i = 0; i < N; i++) {
        assert_int_equal(calls[i].calls, 1);
        assert_int_equal(calls[i].status, 0);
        assert_int_equal(calls[i].seq, i); /* callbacks in put order */
    }
    struct am_metastore_stats st;
    am_metastore_get_stats(f->ms, &st);
    assert_int_equal(st.puts, N);
    assert_int_equal(st.committed, N);
    /* The first put starts a batch alone; the other 49 wait for it and share the next. */
    assert_int_equal(st.write_txns, 2);

    for (int i = 0; i < N; i++) {
        if (i % 2) {
            struct am_tag_rec out;
            assert_int_equal(am_metastore_get_tag(f->ms, "docker.io", "library/b", tags[i], &out),
                             0);
            assert_int_equal(out.fetched_at_ms, (uint64_t)i);
        } else {
            struct am_manifest_rec rec;
            assert_int_equal(
                am_metastore_get_manifest(f->ms, "docker.io", "library/b", &d[i], &rec), 0);
            am_manifest_rec_cleanup(&rec);
        }
    }
    finish(f);
}

struct chain {
    struct call first;
    struct call more[2];
    int put_rc[2];
};

static void on_put_then_put_more(void *arg, int status)
{
    struct chain *ch = arg;
    struct fixture *f = ch->first.f;
    on_put(&ch->first, status);
    for (int i = 0; i < 2; i++) {
        struct am_tag_rec t = tag_rec(10 + i, 1);
        ch->put_rc[i] = am_metastore_put_tag(f->ms, "docker.io", "library/c", i ? "b" : "a", &t,
                                             on_put, &ch->more[i]);
    }
}

static void commits_puts_made_from_a_callback_in_a_later_batch(void **state)
{
    struct fixture *f = *state;
    struct chain ch = {.first = {.f = f}, .more = {{.f = f}, {.f = f}}};
    struct am_tag_rec t = tag_rec(1, 1), out;
    open_store(f, 0);

    assert_int_equal(am_metastore_put_tag(f->ms, "docker.io", "library/c", "first", &t,
                                          on_put_then_put_more, &ch),
                     0);
    assert_int_equal(uv_run(&f->loop, UV_RUN_DEFAULT), 0);
    assert_int_equal(ch.first.calls, 1);
    for (int i = 0; i < 2; i++) {
        assert_int_equal(ch.put_rc[i], 0);
        assert_int_equal(ch.more[i].calls, 1);
        assert_int_equal(ch.more[i].status, 0);
    }
    assert_int_equal(am_metastore_get_tag(f->ms, "docker.io", "library/c", "a", &out), 0);
    assert_int_equal(am_metastore_get_tag(f->ms, "docker.io", "library/c", "b", &out), 0);
    struct am_metastore_stats st;
    am_metastore_get_stats(f->ms, &st);
    assert_int_equal(st.write_txns, 2); /* both callback puts shared one batch */
    finish(f);
}

/* ---- close ---- */

static void commits_queued_puts_before_close_completes_and_reopens_with_them(void **state)
{
    struct fixture *f = *state;
    struct am_tag_rec t = tag_rec(3, 33), out;
    struct am_digest d;
    struct am_manifest_rec rec;
    struct call c1 = {.f = f}, c2 = {.f = f};
    digest_of_int(3, &d);
    open_store(f, 0);

    assert_int_equal(
        am_metastore_put_tag(f->ms, "docker.io", "library/r", "latest", &t, on_put, &c1), 0);
    assert_int_equal(am_metastore_put_manifest(f->ms, "docker.io", "library/r", &d,
                                               AM_MT_DOCKER_MANIFEST_S, "{\"a\":1}", 7, on_put,
                                               &c2),
                     0);
    am_metastore_close(f->ms, on_closed, f);
    f->ms = NULL;
    assert_int_equal(f->closed, 0);
    assert_int_equal(uv_run(&f->loop, UV_RUN_DEFAULT), 0);
    assert_int_equal(c1.calls, 1);
    assert_int_equal(c1.status, 0);
    assert_int_equal(c2.calls, 1);
    assert_int_equal(c2.status, 0);
    assert_int_equal(f->closed, 1);
    assert_true(c1.seq < f->closed_seq && c2.seq < f->closed_seq);

    open_store(f, 0);
    assert_int_equal(am_metastore_get_tag(f->ms, "docker.io", "library/r", "latest", &out), 0);
    assert_tag_equal(&out, &t);
    assert_int_equal(am_metastore_get_manifest(f->ms, "docker.io", "library/r", &d, &rec), 0);
    assert_int_equal(rec.len, 7);
    assert_memory_equal(rec.bytes, "{\"a\":1}", 7);
    assert_string_equal(rec.media_type, AM_MT_DOCKER_MANIFEST_S);
    am_manifest_rec_cleanup(&rec);
    finish(f);
}

static void calls_close_done_from_the_loop_even_when_idle(void **state)
{
    struct fixture *f = *state;
    open_store(f, 0);
    am_metastore_close(f->ms, on_closed, f);
    f->ms = NULL;
    assert_int_equal(f->closed, 0);
    assert_int_equal(uv_run(&f->loop, UV_RUN_DEFAULT), 0);
    assert_int_equal(f->closed, 1);
    finish(f);
}

static void closes_without_a_done_callback(void **state)
{
    struct fixture *f = *state;
    struct am_tag_rec t = tag_rec(1, 1);
    struct call c = {.f = f};
    open_store(f, 0);
    assert_int_equal(am_metastore_put_tag(f->ms, "docker.io", "x/y", "z", &t, on_put, &c), 0);
    am_metastore_close(f->ms, NULL, NULL);
    f->ms = NULL;
    assert_int_equal(uv_run(&f->loop, UV_RUN_DEFAULT), 0);
    assert_int_equal(c.calls, 1);
    assert_int_equal(c.status, 0);
    finish(f);
}

struct one_run {
    struct fixture *f;
    struct am_digest d;
    int got;
    size_t len;
    int put_status;
};

static void on_put_read_and_close(void *arg, int status)
{
    struct one_run *r = arg;
    struct am_manifest_rec rec;
    r->put_status = status;
    r->got = am_metastore_get_manifest(r->f->ms, "docker.io", "library/one", &r->d, &rec);
    r->len = rec.len;
    am_manifest_rec_cleanup(&rec);
    am_metastore_close(r->f->ms, on_closed, r->f);
    r->f->ms = NULL;
}

static void opens_uses_and_closes_within_one_loop_run(void **state)
{
    struct fixture *f = *state;
    struct one_run r = {.f = f, .got = -1};
    digest_of_int(9, &r.d);
    open_store(f, 0);

    assert_int_equal(am_metastore_put_manifest(f->ms, "docker.io", "library/one", &r.d,
                                               AM_MT_OCI_INDEX_S, "{}", 2, on_put_read_and_close,
                                               &r),
                     0);
    assert_int_equal(uv_run(&f->loop, UV_RUN_DEFAULT), 0);
    assert_int_equal(r.put_status, 0);
    assert_int_equal(r.got, 0); /* visible once the callback runs */
    assert_int_equal(r.len, 2);
    assert_int_equal(f->closed, 1);
    finish(f);
}

static void refuses_puts_and_reads_once_close_has_begun(void **state)
{
    struct fixture *f = *state;
    struct am_tag_rec t = tag_rec(1, 1), out;
    struct am_digest d;
    struct am_manifest_rec rec;
    struct call c = {.f = f};
    struct am_metastore *ms;
    digest_of_int(1, &d);
    open_store(f, 0);
    ms = f->ms;

    am_metastore_close(ms, on_closed, f);
    f->ms = NULL;
    /* Until done runs the store still exists; it must refuse, not crash or queue. */
    assert_int_equal(am_metastore_put_tag(ms, "docker.io", "x/y", "z", &t, on_put, &c),
                     AM_EUNAVAILABLE);
    assert_int_equal(am_metastore_put_manifest(ms, "docker.io", "x/y", &d, "", "a", 1, on_put, &c),
                     AM_EUNAVAILABLE);
    assert_int_equal(am_metastore_get_tag(ms, "docker.io", "x/y", "z", &out), AM_EUNAVAILABLE);
    assert_int_equal(am_metastore_get_manifest(ms, "docker.io", "x/y", &d, &rec), AM_EUNAVAILABLE);
    assert_int_equal(uv_run(&f->loop, UV_RUN_DEFAULT), 0);
    assert_int_equal(c.calls, 0); /* a refused put never calls back */
    assert_int_equal(f->closed, 1);
    finish(f);
}

/* ---- argument bounds ---- */

static void rejects_arguments_out_of_bounds_without_calling_back(void **state)
{
    struct fixture *f = *state;
    struct am_tag_rec t = tag_rec(1, 1), bad, out;
    struct am_digest d, bad_d;
    struct call c = {.f = f};
    char long_tag[AM_TAG_MAX + 2], long_mt[AM_MEDIATYPE_MAX + 2];
    memset(long_tag, 'a', sizeof long_tag - 1);
    long_tag[sizeof long_tag - 1] = '\0';
    memset(long_mt, 'm', sizeof long_mt - 1);
    long_mt[sizeof long_mt - 1] = '\0';
    digest_of_int(1, &d);
    open_store(f, 0);

    assert_int_equal(am_metastore_put_tag(f->ms, "docker.io", "", "z", &t, on_put, &c), AM_EINVAL);
    assert_int_equal(am_metastore_put_tag(f->ms, "docker.io", "a b", "z", &t, on_put, &c),
                     AM_EINVAL);
    assert_int_equal(am_metastore_put_tag(f->ms, NULL, "a", "z", &t, on_put, &c), AM_EINVAL);
    assert_int_equal(am_metastore_put_tag(f->ms, "docker.io", "a", long_tag, &t, on_put, &c),
                     AM_EINVAL);
    long_tag[AM_TAG_MAX] = '\0'; /* exactly AM_TAG_MAX is fine */
    assert_int_equal(am_metastore_put_tag(f->ms, "docker.io", "a", long_tag, &t, on_put, &c), 0);
    bad = t;
    bad.digest.str[5] = 'X'; /* not a canonical digest */
    assert_int_equal(am_metastore_put_tag(f->ms, "docker.io", "a", "z", &bad, on_put, &c),
                     AM_EINVAL);
    bad = t;
    memset(bad.media_type, 'm', sizeof bad.media_type); /* no NUL */
    assert_int_equal(am_metastore_put_tag(f->ms, "docker.io", "a", "z", &bad, on_put, &c),
                     AM_EINVAL);

    assert_int_equal(
        am_metastore_put_manifest(f->ms, "docker.io", "a", &d, long_mt, "x", 1, on_put, &c),
        AM_EINVAL);
    bad_d = d;
    bad_d.alg = AM_DIGEST_SHA512; /* text says sha256 */
    assert_int_equal(
        am_metastore_put_manifest(f->ms, "docker.io", "a", &bad_d, "", "x", 1, on_put, &c),
        AM_EINVAL);
    assert_int_equal(
        am_metastore_put_manifest(f->ms, "docker.io", "a", &d, "", NULL, 1, on_put, &c), AM_EINVAL);
    /* The size check comes before any byte is read, so a short buffer is safe here. */
    assert_int_equal(am_metastore_put_manifest(f->ms, "docker.io", "a", &d, "", "x",
                                               AM_METASTORE_MANIFEST_MAX + 1, on_put, &c),
                     AM_ETOO_LARGE);
    assert_int_equal(am_metastore_get_tag(f->ms, "docker.io", "a", "", &out), AM_EINVAL);

    assert_int_equal(uv_run(&f->loop, UV_RUN_DEFAULT), 0);
    assert_int_equal(c.calls, 1); /* only the one accepted put */
    assert_int_equal(c.status, 0);
    finish(f);
}

/* ---- full and read-only stores ---- */

#define TINY_MAP ((uint64_t)64 << 10)
#define BIG_LEN  ((size_t)100 << 10)

static void evicts_the_oldest_manifests_when_the_map_fills(void **state)
{
    struct fixture *f = *state;
    enum { LEN = 8192, N = 200 };
    char *body = malloc(LEN);
    struct am_digest d[N];
    struct am_manifest_rec rec;
    assert_non_null(body);
    open_store(f, 512 * 1024); /* room for a few dozen of them */
    for (int i = 0; i < N; i++) {
        memset(body, 'a' + i % 26, LEN);
        snprintf(body, 32, "{\"n\":%d}", i);
        am_digest_of(AM_DIGEST_SHA256, body, LEN, &d[i]);
        assert_int_equal(
            put_manifest_now(f, "docker.io", "library/e", &d[i], AM_MT_OCI_MANIFEST_S, body, LEN),
            0);
    }
    struct am_metastore_stats st;
    am_metastore_get_stats(f->ms, &st);
    assert_true(st.evicted_map_full > 0);
    assert_int_equal(st.evicted, 0); /* no budget: only the map bounds it */
    assert_int_equal(st.failed, 0);
    assert_int_equal(st.manifests + st.evicted_map_full, N); /* the index followed */
    /* The newest is there, the first went. */
    assert_int_equal(am_metastore_get_manifest(f->ms, "docker.io", "library/e", &d[N - 1], &rec),
                     0);
    assert_int_equal(rec.len, LEN);
    am_manifest_rec_cleanup(&rec);
    assert_int_equal(am_metastore_get_manifest(f->ms, "docker.io", "library/e", &d[0], &rec),
                     AM_ENOT_FOUND);
    free(body);
    finish(f);
}

static void reports_a_full_map_and_stays_usable(void **state)
{
    struct fixture *f = *state;
    struct am_tag_rec t1 = tag_rec(1, 1), t2 = tag_rec(2, 2), out;
    struct am_digest d;
    struct am_manifest_rec rec;
    char *big = malloc(BIG_LEN);
    assert_non_null(big);
    memset(big, '{', BIG_LEN);
    am_digest_of(AM_DIGEST_SHA256, big, BIG_LEN, &d);
    open_store(f, TINY_MAP);

    assert_int_equal(put_tag_now(f, "docker.io", "library/f", "one", &t1), 0);
    assert_int_equal(
        put_manifest_now(f, "docker.io", "library/f", &d, AM_MT_OCI_MANIFEST_S, big, BIG_LEN),
        AM_ESTORE_FULL);
    struct am_metastore_stats st;
    am_metastore_get_stats(f->ms, &st);
    assert_int_equal(st.failed, 1);

    assert_int_equal(am_metastore_get_tag(f->ms, "docker.io", "library/f", "one", &out), 0);
    assert_tag_equal(&out, &t1);
    assert_int_equal(am_metastore_get_manifest(f->ms, "docker.io", "library/f", &d, &rec),
                     AM_ENOT_FOUND);
    assert_int_equal(put_tag_now(f, "docker.io", "library/f", "two", &t2), 0);
    assert_int_equal(am_metastore_get_tag(f->ms, "docker.io", "library/f", "two", &out), 0);
    assert_tag_equal(&out, &t2);
    free(big);
    finish(f);
}

static void applies_nothing_of_a_batch_that_fails(void **state)
{
    struct fixture *f = *state;
    struct am_tag_rec t = tag_rec(1, 1), out;
    struct am_digest d;
    struct call first = {.f = f}, small = {.f = f}, large = {.f = f};
    char *big = malloc(BIG_LEN);
    assert_non_null(big);
    memset(big, '[', BIG_LEN);
    am_digest_of(AM_DIGEST_SHA256, big, BIG_LEN, &d);
    open_store(f, TINY_MAP);

    /* first runs alone; small and large share the second batch. */
    assert_int_equal(
        am_metastore_put_tag(f->ms, "docker.io", "library/g", "first", &t, on_put, &first), 0);
    assert_int_equal(
        am_metastore_put_tag(f->ms, "docker.io", "library/g", "small", &t, on_put, &small), 0);
    assert_int_equal(am_metastore_put_manifest(f->ms, "docker.io", "library/g", &d,
                                               AM_MT_OCI_MANIFEST_S, big, BIG_LEN, on_put, &large),
                     0);
    free(big); /* the put copied it */
    assert_int_equal(uv_run(&f->loop, UV_RUN_DEFAULT), 0);
    assert_int_equal(first.status, 0);
    assert_int_equal(small.calls, 1);
    assert_int_equal(small.status, AM_ESTORE_FULL);
    assert_int_equal(large.calls, 1);
    assert_int_equal(large.status, AM_ESTORE_FULL);
    assert_int_equal(am_metastore_get_tag(f->ms, "docker.io", "library/g", "first", &out), 0);
    assert_int_equal(am_metastore_get_tag(f->ms, "docker.io", "library/g", "small", &out),
                     AM_ENOT_FOUND);
    finish(f);
}

static void refuses_a_read_only_data_directory(void **state)
{
    struct fixture *f = *state;
    char msg[256] = "";
    /* root ignores directory permissions, so chmod cannot make a directory read-only for
     * it; refuses_a_directory_not_even_root_can_write covers that case instead. */
    if (geteuid() == 0) {
        assert_int_equal(uv_loop_close(&f->loop), 0);
        skip();
    }
    assert_int_equal(chmod(f->dir, 0500), 0);
    assert_int_equal(am_metastore_open(&f->loop, f->dir, 0, &f->ms, msg, sizeof msg),
                     AM_ESTORE_READONLY);
    assert_null(f->ms);
    assert_non_null(strstr(msg, f->dir));
    finish(f);
}

static void refuses_a_directory_not_even_root_can_write(void **state)
{
    struct fixture *f = *state;
    char msg[256] = "";
    struct stat st;
    /* sysfs refuses new files and directories to everyone, root included. */
    if (stat("/sys/kernel", &st) != 0 || !S_ISDIR(st.st_mode)) {
        assert_int_equal(uv_loop_close(&f->loop), 0);
        skip();
    }
    assert_int_equal(am_metastore_open(&f->loop, "/sys/kernel", 0, &f->ms, msg, sizeof msg),
                     AM_ESTORE_READONLY);
    assert_null(f->ms);
    assert_non_null(strstr(msg, "/sys/kernel/meta.lmdb"));
    msg[0] = '\0';
    assert_int_equal(
        am_metastore_open(&f->loop, "/sys/archmirror-test/data", 0, &f->ms, msg, sizeof msg),
        AM_ESTORE_READONLY);
    assert_non_null(strstr(msg, "cannot create"));
    finish(f);
}

static void refuses_a_file_where_the_data_directory_should_be(void **state)
{
    struct fixture *f = *state;
    char file[4200], sub[4300], msg[256] = "";
    snprintf(file, sizeof file, "%s/plain", f->dir);
    FILE *fp = fopen(file, "w");
    assert_non_null(fp);
    fclose(fp);
    snprintf(sub, sizeof sub, "%s/below", file);

    assert_int_equal(am_metastore_open(&f->loop, file, 0, &f->ms, msg, sizeof msg), AM_ESTORE);
    assert_non_null(strstr(msg, file));
    assert_null(f->ms);
    assert_int_equal(am_metastore_open(&f->loop, sub, 0, &f->ms, NULL, 0), AM_ESTORE);
    finish(f);
}

static void creates_missing_parent_directories(void **state)
{
    struct fixture *f = *state;
    char orig[sizeof f->dir];
    struct stat st;
    memcpy(orig, f->dir, sizeof orig);
    int n = snprintf(f->dir, sizeof f->dir, "%.4000s/a/b/c/", orig);
    assert_true(n > 0 && (size_t)n < sizeof f->dir);
    open_store(f, 0);
    finish(f);
    char file[4200];
    snprintf(file, sizeof file, "%s/a/b/c/meta.lmdb", orig);
    assert_int_equal(stat(file, &st), 0);
    assert_true(S_ISREG(st.st_mode));
    memcpy(f->dir, orig, sizeof orig);
}

/* ---- corruption ---- */

/* Writes key → value into the named DB with the LMDB API; the store must be closed. */
static void raw_put(const char *dir, const char *db, const void *key, size_t klen, const void *val,
                    size_t vlen)
{
    char path[4200];
    MDB_env *env;
    MDB_txn *txn;
    MDB_dbi dbi;
    snprintf(path, sizeof path, "%s/meta.lmdb", dir);
    assert_int_equal(mdb_env_create(&env), 0);
    assert_int_equal(mdb_env_set_maxdbs(env, 3), 0);
    assert_int_equal(mdb_env_open(env, path, MDB_NOSUBDIR, 0600), 0);
    assert_int_equal(mdb_txn_begin(env, NULL, 0, &txn), 0);
    assert_int_equal(mdb_dbi_open(txn, db, 0, &dbi), 0);
    MDB_val k = {.mv_size = klen, .mv_data = (void *)key};
    MDB_val v = {.mv_size = vlen, .mv_data = (void *)val};
    assert_int_equal(mdb_put(txn, dbi, &k, &v, 0), 0);
    assert_int_equal(mdb_txn_commit(txn), 0);
    mdb_env_close(env);
}

/* The value layout of src/metastore.c. */
static size_t encode(unsigned char *p, unsigned kind, const char *mt, const char *dg,
                     uint64_t time_ms, uint64_t size, const char *body, size_t body_len)
{
    size_t ml = strlen(mt), dl = dg ? strlen(dg) : 0;
    memset(p, 0, 24);
    p[0] = 1;
    p[2] = (unsigned char)kind;
    p[3] = (unsigned char)ml;
    p[4] = (unsigned char)dl;
    for (int i = 0; i < 8; i++) {
        p[8 + i] = (unsigned char)(time_ms >> (8 * i));
        p[16 + i] = (unsigned char)(size >> (8 * i));
    }
    memcpy(p + 24, mt, ml);
    if (dl) memcpy(p + 24 + ml, dg, dl);
    if (body_len) memcpy(p + 24 + ml + dl, body, body_len);
    return 24 + ml + dl + body_len;
}

static const char tag_key[] = "docker.io\0library/z\0latest";

static int get_tag_after_raw_put(struct fixture *f, const void *val, size_t vlen,
                                 struct am_tag_rec *out)
{
    raw_put(f->dir, "tags", tag_key, sizeof tag_key - 1, val, vlen);
    open_store(f, 0);
    int rc = am_metastore_get_tag(f->ms, "docker.io", "library/z", "latest", out);
    close_store(f);
    return rc;
}

static void detects_corrupt_tag_records(void **state)
{
    struct fixture *f = *state;
    struct am_digest d;
    struct am_tag_rec out;
    unsigned char v[512];
    size_t n;
    digest_of_int(4, &d);
    open_store(f, 0);
    close_store(f);

    /* A well-formed raw value reads back: the key and layout above are the real ones. */
    n = encode(v, 2, AM_MT_OCI_INDEX_S, d.str, 77, 88, NULL, 0);
    assert_int_equal(get_tag_after_raw_put(f, v, n, &out), 0);
    assert_string_equal(out.digest.str, d.str);
    assert_int_equal(out.fetched_at_ms, 77);
    assert_int_equal(out.size, 88);

    assert_int_equal(get_tag_after_raw_put(f, v, 3, &out), AM_ESTORE);     /* short header */
    assert_int_equal(get_tag_after_raw_put(f, v, n - 1, &out), AM_ESTORE); /* truncated */
    v[n] = 'x';
    assert_int_equal(get_tag_after_raw_put(f, v, n + 1, &out), AM_ESTORE); /* trailing */

    n = encode(v, 2, AM_MT_OCI_INDEX_S, d.str, 77, 88, NULL, 0);
    v[0] = 2; /* format version from the future */
    assert_int_equal(get_tag_after_raw_put(f, v, n, &out), AM_ESTORE);
    n = encode(v, 1, AM_MT_OCI_INDEX_S, d.str, 77, 88, NULL, 0); /* manifest kind */
    assert_int_equal(get_tag_after_raw_put(f, v, n, &out), AM_ESTORE);
    n = encode(v, 2, AM_MT_OCI_INDEX_S, d.str, 77, 88, NULL, 0);
    v[6] = 1; /* reserved byte */
    assert_int_equal(get_tag_after_raw_put(f, v, n, &out), AM_ESTORE);
    n = encode(v, 2, AM_MT_OCI_INDEX_S, d.str, 77, 88, NULL, 0);
    v[3] = 255; /* media type longer than the value */
    assert_int_equal(get_tag_after_raw_put(f, v, n, &out), AM_ESTORE);
    n = encode(v, 2, AM_MT_OCI_INDEX_S, d.str, 77, 88, NULL, 0);
    v[24 + 3] = '\0'; /* NUL inside the media type */
    assert_int_equal(get_tag_after_raw_put(f, v, n, &out), AM_ESTORE);
    n = encode(v, 2, AM_MT_OCI_INDEX_S, "sha256:XYZ", 77, 88, NULL, 0);
    assert_int_equal(get_tag_after_raw_put(f, v, n, &out), AM_ESTORE);
    n = encode(v, 2, AM_MT_OCI_INDEX_S, NULL, 77, 88, NULL, 0); /* no digest */
    assert_int_equal(get_tag_after_raw_put(f, v, n, &out), AM_ESTORE);
    assert_int_equal(get_tag_after_raw_put(f, "", 0, &out), AM_ESTORE); /* empty value */
    finish(f);
}

static void detects_corrupt_manifest_records(void **state)
{
    struct fixture *f = *state;
    struct am_digest d;
    struct am_manifest_rec rec;
    unsigned char v[512], key[256];
    size_t n, kl;
    digest_of_int(5, &d);
    kl = (size_t)snprintf((char *)key, sizeof key, "docker.io%clibrary/m%c%s", 0, 0, d.str);
    open_store(f, 0);
    close_store(f);

    n = encode(v, 1, AM_MT_OCI_MANIFEST_S, NULL, 5, 4, "abcd", 4);
    raw_put(f->dir, "manifests", key, kl, v, n);
    open_store(f, 0);
    assert_int_equal(am_metastore_get_manifest(f->ms, "docker.io", "library/m", &d, &rec), 0);
    assert_int_equal(rec.len, 4);
    assert_memory_equal(rec.bytes, "abcd", 4);
    assert_int_equal(rec.stored_at_ms, 5);
    am_manifest_rec_cleanup(&rec);
    close_store(f);

    /* The size field announces more bytes than there are, then fewer. */
    const uint64_t sizes[] = {5, 3, UINT64_MAX};
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        n = encode(v, 1, AM_MT_OCI_MANIFEST_S, NULL, 5, sizes[i], "abcd", 4);
        raw_put(f->dir, "manifests", key, kl, v, n);
        open_store(f, 0);
        assert_int_equal(am_metastore_get_manifest(f->ms, "docker.io", "library/m", &d, &rec),
                         AM_ESTORE);
        assert_null(rec.bytes);
        close_store(f);
    }
    /* A manifest must not carry a digest field. */
    n = encode(v, 1, AM_MT_OCI_MANIFEST_S, d.str, 5, 4, "abcd", 4);
    raw_put(f->dir, "manifests", key, kl, v, n);
    open_store(f, 0);
    assert_int_equal(am_metastore_get_manifest(f->ms, "docker.io", "library/m", &d, &rec),
                     AM_ESTORE);
    finish(f);
}

/* ---- platforms ---- */

static struct am_platform_rec platform_rec(const char *os, const char *arch, const char *variant,
                                           int config)
{
    struct am_platform_rec r;
    memset(&r, 0, sizeof r);
    snprintf(r.platform.os, sizeof r.platform.os, "%s", os);
    snprintf(r.platform.architecture, sizeof r.platform.architecture, "%s", arch);
    snprintf(r.platform.variant, sizeof r.platform.variant, "%s", variant);
    digest_of_int(config, &r.config);
    return r;
}

static int put_platform_now(struct fixture *f, const char *up, const char *repo,
                            const struct am_digest *m, const struct am_platform_rec *rec)
{
    struct call c = {.f = f};
    assert_int_equal(am_metastore_put_platform(f->ms, up, repo, m, rec, on_put, &c), 0);
    assert_int_equal(uv_run(&f->loop, UV_RUN_DEFAULT), 0);
    assert_int_equal(c.calls, 1);
    return c.status;
}

static void stores_and_reads_back_the_platform_of_a_manifest(void **state)
{
    struct fixture *f = *state;
    struct am_digest m;
    struct am_platform_rec in = platform_rec("windows", "amd64", "", 9), out;
    snprintf(in.platform.os_version, sizeof in.platform.os_version, "10.0.17763.5820");
    digest_of_int(1, &m);
    open_store(f, 0);

    uint64_t before = am_metastore_now_ms();
    /* Visible as soon as the put returned, before the commit. */
    struct call c = {.f = f};
    assert_int_equal(
        am_metastore_put_platform(f->ms, "docker.io", "library/a", &m, &in, on_put, &c), 0);
    assert_int_equal(am_metastore_get_platform(f->ms, "docker.io", "library/a", &m, &out), 0);
    assert_string_equal(out.platform.os, "windows");
    assert_int_equal(uv_run(&f->loop, UV_RUN_DEFAULT), 0);
    assert_int_equal(c.calls, 1);
    assert_int_equal(c.status, 0);
    uint64_t after = am_metastore_now_ms();

    assert_int_equal(am_metastore_get_platform(f->ms, "docker.io", "library/a", &m, &out), 0);
    assert_string_equal(out.platform.os, "windows");
    assert_string_equal(out.platform.architecture, "amd64");
    assert_string_equal(out.platform.variant, "");
    assert_string_equal(out.platform.os_version, "10.0.17763.5820");
    assert_string_equal(out.config.str, in.config.str);
    assert_true(out.stored_at_ms >= before && out.stored_at_ms <= after);

    /* Scoped like manifests: another repository or upstream does not see it. */
    assert_int_equal(am_metastore_get_platform(f->ms, "docker.io", "library/b", &m, &out),
                     AM_ENOT_FOUND);
    assert_string_equal(out.platform.os, "");
    assert_int_equal(am_metastore_get_platform(f->ms, "ghcr.io", "library/a", &m, &out),
                     AM_ENOT_FOUND);
    /* Overwritten by a later put; survives a reopen. */
    struct am_platform_rec arm = platform_rec("linux", "arm", "v7", 10);
    assert_int_equal(put_platform_now(f, "docker.io", "library/a", &m, &arm), 0);
    close_store(f);
    open_store(f, 0);
    assert_int_equal(am_metastore_get_platform(f->ms, "docker.io", "library/a", &m, &out), 0);
    assert_string_equal(out.platform.architecture, "arm");
    assert_string_equal(out.platform.variant, "v7");
    assert_string_equal(out.platform.os_version, "");
    assert_string_equal(out.config.str, arm.config.str);
    finish(f);
}

static void rejects_platform_records_out_of_bounds_without_calling_back(void **state)
{
    struct fixture *f = *state;
    struct am_digest m;
    struct call c = {.f = f};
    struct am_platform_rec r = platform_rec("linux", "arm64", "", 2), out;
    digest_of_int(1, &m);
    open_store(f, 0);

    struct am_platform_rec bad = r;
    memset(bad.platform.variant, 'v', sizeof bad.platform.variant); /* no NUL */
    assert_int_equal(am_metastore_put_platform(f->ms, "docker.io", "x", &m, &bad, on_put, &c),
                     AM_EINVAL);
    bad = r;
    bad.platform.os[1] = '\n';
    assert_int_equal(am_metastore_put_platform(f->ms, "docker.io", "x", &m, &bad, on_put, &c),
                     AM_EINVAL);
    bad = r;
    snprintf(bad.config.str, sizeof bad.config.str, "sha256:abc");
    assert_int_equal(am_metastore_put_platform(f->ms, "docker.io", "x", &m, &bad, on_put, &c),
                     AM_EINVAL);
    struct am_digest badm = m;
    badm.str[10] = 'G';
    assert_int_equal(am_metastore_put_platform(f->ms, "docker.io", "x", &badm, &r, on_put, &c),
                     AM_EINVAL);
    assert_int_equal(am_metastore_get_platform(f->ms, "docker.io", "x", &badm, &out), AM_EINVAL);
    assert_int_equal(am_metastore_put_platform(f->ms, "docker.io", "", &m, &r, on_put, &c),
                     AM_EINVAL);
    assert_int_equal(am_metastore_put_platform(f->ms, "docker.io", "x", &m, NULL, on_put, &c),
                     AM_EINVAL);
    /* A field of exactly AM_PLATFORM_FIELD_MAX bytes is fine. */
    struct am_platform_rec longest = r;
    memset(longest.platform.os_version, '1', AM_PLATFORM_FIELD_MAX);
    longest.platform.os_version[AM_PLATFORM_FIELD_MAX] = '\0';
    assert_int_equal(put_platform_now(f, "docker.io", "x", &m, &longest), 0);
    assert_int_equal(am_metastore_get_platform(f->ms, "docker.io", "x", &m, &out), 0);
    assert_int_equal(strlen(out.platform.os_version), AM_PLATFORM_FIELD_MAX);
    assert_int_equal(c.calls, 0);
    finish(f);
}

/* A platform value as src/metastore.c lays it out: header, digest, 4 × (len, bytes). */
static size_t encode_platform(unsigned char *p, const char *dg, const char *const fields[4])
{
    unsigned char body[300];
    size_t bl = 0;
    for (int i = 0; i < 4; i++) {
        size_t n = strlen(fields[i]);
        body[bl++] = (unsigned char)n;
        memcpy(body + bl, fields[i], n);
        bl += n;
    }
    /* encode() puts the digest after the (empty) media type, then the body. */
    return encode(p, 3, "", dg, 42, bl, (const char *)body, bl);
}

static void detects_corrupt_platform_records(void **state)
{
    struct fixture *f = *state;
    struct am_digest m, cfg;
    struct am_platform_rec out;
    unsigned char v[512], key[256];
    size_t n, kl;
    const char *const good[4] = {"linux", "arm", "v7", ""};
    digest_of_int(6, &m);
    digest_of_int(7, &cfg);
    kl = (size_t)snprintf((char *)key, sizeof key, "docker.io%clibrary/p%c%s", 0, 0, m.str);
    open_store(f, 0);
    close_store(f);

#define GET_AFTER_RAW(val, len)                                                                    \
    (raw_put(f->dir, "platforms", key, kl, (val), (len)), open_store(f, 0),                        \
     rc = am_metastore_get_platform(f->ms, "docker.io", "library/p", &m, &out), close_store(f),    \
     rc)
    int rc;
    n = encode_platform(v, cfg.str, good);
    assert_int_equal(GET_AFTER_RAW(v, n), 0);
    assert_string_equal(out.platform.architecture, "arm");
    assert_string_equal(out.platform.variant, "v7");
    assert_string_equal(out.config.str, cfg.str);
    assert_int_equal(out.stored_at_ms, 42);

    assert_int_equal(GET_AFTER_RAW(v, n - 1), AM_ESTORE); /* truncated */
    v[n] = 'x';
    assert_int_equal(GET_AFTER_RAW(v, n + 1), AM_ESTORE); /* trailing byte */
    assert_int_equal(GET_AFTER_RAW(v, 10), AM_ESTORE);    /* short header */
    n = encode_platform(v, cfg.str, good);
    v[2] = 2; /* a tag's kind */
    assert_int_equal(GET_AFTER_RAW(v, n), AM_ESTORE);
    n = encode_platform(v, cfg.str, good);
    v[5] = 1; /* reserved */
    assert_int_equal(GET_AFTER_RAW(v, n), AM_ESTORE);
    n = encode_platform(v, "sha256:nothex", good);
    assert_int_equal(GET_AFTER_RAW(v, n), AM_ESTORE);
    const char *const ctl[4] = {"linux", "ar\x01m", "v7", ""};
    n = encode_platform(v, cfg.str, ctl);
    assert_int_equal(GET_AFTER_RAW(v, n), AM_ESTORE);
    n = encode_platform(v, cfg.str, good);
    v[24 + strlen(cfg.str)] = 200; /* a field length past the end */
    assert_int_equal(GET_AFTER_RAW(v, n), AM_ESTORE);
    assert_string_equal(out.platform.os, "");
#undef GET_AFTER_RAW
    finish(f);
}

/* A store written before the "platforms" DB existed (meta, manifests, tags only) opens,
 * keeps its records, and gains the new DB. */
static void adds_the_platforms_database_to_an_older_store(void **state)
{
    struct fixture *f = *state;
    char path[4200];
    MDB_env *env;
    MDB_txn *txn;
    MDB_dbi meta, dbi;
    snprintf(path, sizeof path, "%s/meta.lmdb", f->dir);
    assert_int_equal(mdb_env_create(&env), 0);
    assert_int_equal(mdb_env_set_maxdbs(env, 3), 0);
    assert_int_equal(mdb_env_open(env, path, MDB_NOSUBDIR, 0600), 0);
    assert_int_equal(mdb_txn_begin(env, NULL, 0, &txn), 0);
    assert_int_equal(mdb_dbi_open(txn, "meta", MDB_CREATE, &meta), 0);
    assert_int_equal(mdb_dbi_open(txn, "manifests", MDB_CREATE, &dbi), 0);
    assert_int_equal(mdb_dbi_open(txn, "tags", MDB_CREATE, &dbi), 0);
    MDB_val k = {.mv_size = 6, .mv_data = "schema"};
    MDB_val v = {.mv_size = 4, .mv_data = "\x01\0\0\0"};
    assert_int_equal(mdb_put(txn, meta, &k, &v, 0), 0);
    assert_int_equal(mdb_txn_commit(txn), 0);
    mdb_env_close(env);

    struct am_tag_rec tag = tag_rec(3, 1700000000000u), got;
    struct am_digest m;
    struct am_platform_rec pr = platform_rec("linux", "amd64", "", 4), out;
    digest_of_int(5, &m);
    open_store(f, 0);
    assert_int_equal(put_tag_now(f, "docker.io", "library/old", "1", &tag), 0);
    assert_int_equal(put_platform_now(f, "docker.io", "library/old", &m, &pr), 0);
    close_store(f);
    open_store(f, 0); /* second open: the DB exists now */
    assert_int_equal(am_metastore_get_tag(f->ms, "docker.io", "library/old", "1", &got), 0);
    assert_tag_equal(&got, &tag);
    assert_int_equal(am_metastore_get_platform(f->ms, "docker.io", "library/old", &m, &out), 0);
    assert_string_equal(out.platform.architecture, "amd64");
    finish(f);
}

static void refuses_a_newer_schema_version(void **state)
{
    struct fixture *f = *state;
    char msg[256] = "";
    open_store(f, 0);
    close_store(f);

    raw_put(f->dir, "meta", "schema", 6, "\x02\0\0\0", 4);
    assert_int_equal(am_metastore_open(&f->loop, f->dir, 0, &f->ms, msg, sizeof msg), AM_ESTORE);
    assert_null(f->ms);
    assert_non_null(strstr(msg, "schema version 2"));

    raw_put(f->dir, "meta", "schema", 6, "\x01\0", 2);
    assert_int_equal(am_metastore_open(&f->loop, f->dir, 0, &f->ms, msg, sizeof msg), AM_ESTORE);
    assert_non_null(strstr(msg, "corrupt schema"));

    raw_put(f->dir, "meta", "schema", 6, "\x01\0\0\0", 4);
    open_store(f, 0); /* the current version opens again */
    finish(f);
}

static void refuses_a_file_that_is_not_an_lmdb_store(void **state)
{
    struct fixture *f = *state;
    char path[4200], msg[256] = "";
    snprintf(path, sizeof path, "%s/meta.lmdb", f->dir);
    FILE *fp = fopen(path, "w");
    assert_non_null(fp);
    for (int i = 0; i < 3000; i++) fputs("not lmdb ", fp);
    fclose(fp);
    assert_int_equal(am_metastore_open(&f->loop, f->dir, 0, &f->ms, msg, sizeof msg), AM_ESTORE);
    assert_null(f->ms);
    assert_non_null(strstr(msg, "meta.lmdb"));
    finish(f);
}

/* ---- time ---- */

static void treats_a_tag_as_fresh_strictly_inside_the_window(void **state)
{
    (void)state;
    struct am_tag_rec r = tag_rec(1, 1000);
    assert_true(am_metastore_tag_is_fresh(&r, 1000, 30));  /* just fetched */
    assert_true(am_metastore_tag_is_fresh(&r, 1029, 30));  /* last fresh ms */
    assert_false(am_metastore_tag_is_fresh(&r, 1030, 30)); /* window reached */
    assert_false(am_metastore_tag_is_fresh(&r, UINT64_MAX, 30));
    assert_false(am_metastore_tag_is_fresh(&r, 1000, 0)); /* no window: never fresh */
    assert_true(am_metastore_tag_is_fresh(&r, UINT64_MAX, UINT64_MAX));
    r.fetched_at_ms = 0;
    assert_true(am_metastore_tag_is_fresh(&r, UINT64_MAX - 1, UINT64_MAX));
    assert_false(am_metastore_tag_is_fresh(&r, UINT64_MAX, UINT64_MAX));
}

static void treats_a_tag_fetched_in_the_future_as_stale(void **state)
{
    (void)state;
    struct am_tag_rec r = tag_rec(1, 1000);
    /* The wall clock stepped back: revalidate rather than trust for an unknown time. */
    assert_false(am_metastore_tag_is_fresh(&r, 999, 30));
    assert_false(am_metastore_tag_is_fresh(&r, 0, UINT64_MAX));
    r.fetched_at_ms = UINT64_MAX;
    assert_false(am_metastore_tag_is_fresh(&r, 0, 30));
}

static void reads_now_from_the_wall_clock_in_milliseconds(void **state)
{
    (void)state;
    struct timespec a, b;
    clock_gettime(CLOCK_REALTIME, &a);
    uint64_t now = am_metastore_now_ms();
    clock_gettime(CLOCK_REALTIME, &b);
    uint64_t lo = (uint64_t)a.tv_sec * 1000u + (uint64_t)a.tv_nsec / 1000000u;
    uint64_t hi = (uint64_t)b.tv_sec * 1000u + (uint64_t)b.tv_nsec / 1000000u;
    assert_true(lo <= now && now <= hi);
}

/* ---- the manifest budget ---- */

#define LRU_REPO "library/lru"
#define LRU_LEN  300

/* Puts manifest i of LRU_REPO (LRU_LEN bytes, all records the same size) and commits it. */
static void put_lru(struct fixture *f, int i, struct am_digest *d)
{
    char body[LRU_LEN];
    memset(body, ' ', sizeof body);
    snprintf(body, sizeof body, "{\"n\":%d}", i);
    am_digest_of(AM_DIGEST_SHA256, body, sizeof body, d);
    assert_int_equal(
        put_manifest_now(f, "docker.io", LRU_REPO, d, AM_MT_OCI_MANIFEST_S, body, sizeof body), 0);
}

static int get_lru(struct fixture *f, const struct am_digest *d)
{
    struct am_manifest_rec rec;
    int rc = am_metastore_get_manifest(f->ms, "docker.io", LRU_REPO, d, &rec);
    if (rc == 0) assert_int_equal(rec.len, LRU_LEN);
    am_manifest_rec_cleanup(&rec);
    return rc;
}

static struct am_metastore_stats stats_of(struct fixture *f)
{
    struct am_metastore_stats st;
    am_metastore_get_stats(f->ms, &st);
    return st;
}

/* The bytes one put_lru record counts against the budget (key and value as stored). */
static uint64_t lru_record_bytes(void)
{
    return (sizeof "docker.io" + sizeof LRU_REPO + strlen("sha256:") + 64) +
           (24 + strlen(AM_MT_OCI_MANIFEST_S) + LRU_LEN);
}

/* Sums key and value lengths of the "manifests" DB with the LMDB API; store closed. */
static uint64_t raw_manifest_bytes(const char *dir, size_t *count)
{
    char path[4200];
    MDB_env *env;
    MDB_txn *txn;
    MDB_dbi dbi;
    MDB_cursor *cur;
    MDB_val k, v;
    uint64_t sum = 0;
    *count = 0;
    snprintf(path, sizeof path, "%s/meta.lmdb", dir);
    assert_int_equal(mdb_env_create(&env), 0);
    assert_int_equal(mdb_env_set_maxdbs(env, 8), 0);
    assert_int_equal(mdb_env_open(env, path, MDB_NOSUBDIR | MDB_RDONLY, 0600), 0);
    assert_int_equal(mdb_txn_begin(env, NULL, MDB_RDONLY, &txn), 0);
    assert_int_equal(mdb_dbi_open(txn, "manifests", 0, &dbi), 0);
    assert_int_equal(mdb_cursor_open(txn, dbi, &cur), 0);
    for (int rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST); rc == 0;
         rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
        sum += k.mv_size + v.mv_size;
        (*count)++;
    }
    mdb_cursor_close(cur);
    mdb_txn_abort(txn);
    mdb_env_close(env);
    return sum;
}

static void counts_manifest_keys_and_values_against_the_budget(void **state)
{
    struct fixture *f = *state;
    struct am_digest d;
    open_store(f, 0);
    assert_int_equal(stats_of(f).manifest_bytes, 0);
    put_lru(f, 0, &d);
    assert_int_equal(stats_of(f).manifests, 1);
    assert_int_equal(stats_of(f).manifest_bytes, lru_record_bytes());
    put_lru(f, 0, &d); /* the same manifest again: counted once */
    assert_int_equal(stats_of(f).manifest_bytes, lru_record_bytes());
    struct am_tag_rec t = tag_rec(1, 1);
    assert_int_equal(put_tag_now(f, "docker.io", LRU_REPO, "latest", &t), 0); /* not counted */
    assert_int_equal(stats_of(f).manifest_bytes, lru_record_bytes());
    close_store(f);
    size_t n;
    assert_int_equal(raw_manifest_bytes(f->dir, &n), lru_record_bytes());
    assert_int_equal(n, 1);
    finish(f);
}

static void evicts_the_least_recently_read_manifests_first(void **state)
{
    struct fixture *f = *state;
    struct am_digest d[11];
    uint64_t r = lru_record_bytes();
    open_store(f, 0);
    /* Eviction above 10 records, down to 8. */
    assert_int_equal(am_metastore_set_budget(f->ms, 10 * r, 100, 80), 0);
    for (int i = 0; i < 10; i++) put_lru(f, i, &d[i]);
    assert_int_equal(stats_of(f).evicted, 0);
    /* Read the two oldest: they become the most recently used. */
    assert_int_equal(get_lru(f, &d[0]), 0);
    assert_int_equal(get_lru(f, &d[1]), 0);

    put_lru(f, 10, &d[10]); /* 11 records: over the high watermark */
    struct am_metastore_stats st = stats_of(f);
    assert_int_equal(st.evicted, 3);
    assert_int_equal(st.evicted_bytes, 3 * r);
    assert_int_equal(st.manifests, 8);
    assert_int_equal(st.manifest_bytes, 8 * r);
    /* The least recently used went (2, 3, 4); the recently read and the newer stayed. */
    for (int i = 0; i <= 10; i++) {
        int want = i >= 2 && i <= 4 ? AM_ENOT_FOUND : 0;
        if (get_lru(f, &d[i]) != want) fail_msg("manifest %d: expected %s", i, am_error_name(want));
    }
    close_store(f);
    size_t n;
    assert_int_equal(raw_manifest_bytes(f->dir, &n), 8 * r);
    assert_int_equal(n, 8);
    finish(f);
}

static void reads_an_evicted_manifest_as_not_found_before_the_delete_commits(void **state)
{
    struct fixture *f = *state;
    struct am_digest d[4];
    struct am_manifest_rec rec;
    struct call c = {.f = f};
    uint64_t r = lru_record_bytes();
    open_store(f, 0);
    assert_int_equal(am_metastore_set_budget(f->ms, 3 * r, 100, 100), 0);
    for (int i = 0; i < 3; i++) put_lru(f, i, &d[i]);

    char body[LRU_LEN];
    memset(body, ' ', sizeof body);
    snprintf(body, sizeof body, "{\"n\":%d}", 3);
    am_digest_of(AM_DIGEST_SHA256, body, sizeof body, &d[3]);
    assert_int_equal(am_metastore_put_manifest(f->ms, "docker.io", LRU_REPO, &d[3],
                                               AM_MT_OCI_MANIFEST_S, body, sizeof body, on_put, &c),
                     0);
    /* Nothing has run yet: the eviction is queued, and already visible. */
    assert_int_equal(c.calls, 0);
    assert_int_equal(am_metastore_get_manifest(f->ms, "docker.io", LRU_REPO, &d[0], &rec),
                     AM_ENOT_FOUND);
    assert_int_equal(get_lru(f, &d[3]), 0);
    assert_int_equal(uv_run(&f->loop, UV_RUN_DEFAULT), 0);
    assert_int_equal(c.calls, 1);
    assert_int_equal(c.status, 0);
    assert_int_equal(get_lru(f, &d[0]), AM_ENOT_FOUND);
    /* The eviction is not a caller's write. */
    assert_int_equal(stats_of(f).puts, 4);
    assert_int_equal(stats_of(f).committed, 4);
    close_store(f);
    open_store(f, 0);
    assert_int_equal(get_lru(f, &d[0]), AM_ENOT_FOUND);
    assert_int_equal(get_lru(f, &d[1]), 0);
    finish(f);
}

static void keeps_the_manifest_total_under_the_budget(void **state)
{
    struct fixture *f = *state;
    enum { N = 120, MAX = 16 << 10 };
    char body[2000];
    struct am_digest d;
    open_store(f, 0);
    assert_int_equal(am_metastore_set_budget(f->ms, MAX, 95, 90), 0);
    for (int i = 0; i < N; i++) {
        size_t len = 100 + (size_t)(i * 37) % 1500; /* assorted sizes */
        memset(body, 'x', len);
        snprintf(body, 32, "{\"n\":%d}", i);
        am_digest_of(AM_DIGEST_SHA256, body, len, &d);
        /* Several puts per batch, and their evictions with them. */
        assert_int_equal(am_metastore_put_manifest(f->ms, "docker.io", "library/many", &d,
                                                   AM_MT_OCI_MANIFEST_S, body, len, NULL, NULL),
                         0);
        assert_true(stats_of(f).manifest_bytes <= MAX * 95 / 100);
        if (i % 7 == 0) assert_int_equal(uv_run(&f->loop, UV_RUN_DEFAULT), 0);
    }
    assert_int_equal(uv_run(&f->loop, UV_RUN_DEFAULT), 0);
    struct am_metastore_stats st = stats_of(f);
    assert_true(st.evicted > 0);
    assert_int_equal(st.failed, 0);
    assert_int_equal(st.manifests + st.evicted, N);
    close_store(f);
    size_t n;
    uint64_t on_disk = raw_manifest_bytes(f->dir, &n);
    assert_int_equal(on_disk, st.manifest_bytes); /* the running total is what LMDB holds */
    assert_int_equal(n, st.manifests);
    assert_true(on_disk <= MAX);
    open_store(f, 0); /* the index rebuilt at open agrees */
    assert_int_equal(stats_of(f).manifest_bytes, on_disk);
    assert_int_equal(stats_of(f).manifests, n);
    finish(f);
}

static void records_reads_in_memory_and_writes_them_with_the_next_batch(void **state)
{
    struct fixture *f = *state;
    struct am_digest d[2];
    open_store(f, 0);
    put_lru(f, 0, &d[0]);
    struct am_metastore_stats before = stats_of(f);
    for (int i = 0; i < 100; i++) assert_int_equal(get_lru(f, &d[0]), 0);
    assert_int_equal(uv_run(&f->loop, UV_RUN_DEFAULT), 0);
    struct am_metastore_stats after = stats_of(f);
    assert_int_equal(after.write_txns, before.write_txns); /* no write per read */
    assert_int_equal(after.access_records, 0);
    put_lru(f, 1, &d[1]); /* the read time rides along */
    after = stats_of(f);
    assert_int_equal(after.write_txns, before.write_txns + 1);
    assert_int_equal(after.access_records, 1);
    finish(f);
}

static void writes_read_times_on_their_own_once_enough_have_accumulated(void **state)
{
    struct fixture *f = *state;
    enum { N = 300 };
    struct am_digest *d = calloc(N, sizeof *d);
    char body[LRU_LEN];
    assert_non_null(d);
    open_store(f, 0);
    for (int i = 0; i < N; i++) {
        memset(body, ' ', sizeof body);
        snprintf(body, sizeof body, "{\"n\":%d}", i);
        am_digest_of(AM_DIGEST_SHA256, body, sizeof body, &d[i]);
        assert_int_equal(am_metastore_put_manifest(f->ms, "docker.io", LRU_REPO, &d[i],
                                                   AM_MT_OCI_MANIFEST_S, body, sizeof body, NULL,
                                                   NULL),
                         0);
    }
    assert_int_equal(uv_run(&f->loop, UV_RUN_DEFAULT), 0);
    uint64_t txns = stats_of(f).write_txns;
    for (int i = 0; i < N; i++) assert_int_equal(get_lru(f, &d[i]), 0);
    assert_int_equal(uv_run(&f->loop, UV_RUN_DEFAULT), 0);
    /* The 256th distinct read started one batch of 256 read times; 44 wait. */
    assert_int_equal(stats_of(f).write_txns, txns + 1);
    assert_int_equal(stats_of(f).access_records, 256);
    free(d);
    finish(f);
}

/* Writes an access record (u64 LE ms) for manifest d of LRU_REPO; store closed. */
static void raw_access(struct fixture *f, const struct am_digest *d, uint64_t ms)
{
    char key[256];
    unsigned char v[8];
    int n = snprintf(key, sizeof key, "docker.io%c" LRU_REPO "%c%s", 0, 0, d->str);
    for (int i = 0; i < 8; i++) v[i] = (unsigned char)(ms >> (8 * i));
    raw_put(f->dir, "access", key, (size_t)n, v, sizeof v);
}

static void remembers_the_order_of_use_across_a_restart(void **state)
{
    struct fixture *f = *state;
    struct am_digest d[4];
    uint64_t r = lru_record_bytes();
    open_store(f, 0);
    for (int i = 0; i < 4; i++) put_lru(f, i, &d[i]);
    close_store(f);
    /* Last used: 2 (oldest), 0, 3, 1 (newest). */
    raw_access(f, &d[2], 1000);
    raw_access(f, &d[0], 2000);
    raw_access(f, &d[3], 3000);
    raw_access(f, &d[1], 4000);
    open_store(f, 0);
    assert_int_equal(stats_of(f).manifest_bytes, 4 * r);
    /* A budget below what is stored evicts at once, least recently used first. */
    assert_int_equal(am_metastore_set_budget(f->ms, 2 * r, 100, 100), 0);
    assert_int_equal(stats_of(f).evicted, 2);
    assert_int_equal(get_lru(f, &d[2]), AM_ENOT_FOUND);
    assert_int_equal(get_lru(f, &d[0]), AM_ENOT_FOUND);
    assert_int_equal(get_lru(f, &d[3]), 0);
    assert_int_equal(get_lru(f, &d[1]), 0);
    finish(f);
}

static void keeps_the_tag_of_an_evicted_manifest(void **state)
{
    struct fixture *f = *state;
    struct am_digest d[3];
    struct am_tag_rec t, out;
    uint64_t r = lru_record_bytes();
    open_store(f, 0);
    assert_int_equal(am_metastore_set_budget(f->ms, 2 * r, 100, 50), 0);
    put_lru(f, 0, &d[0]);
    memset(&t, 0, sizeof t);
    t.digest = d[0];
    snprintf(t.media_type, sizeof t.media_type, "%s", AM_MT_OCI_MANIFEST_S);
    t.size = LRU_LEN;
    t.fetched_at_ms = 5;
    assert_int_equal(put_tag_now(f, "docker.io", LRU_REPO, "v1", &t), 0);
    put_lru(f, 1, &d[1]);
    put_lru(f, 2, &d[2]); /* over 2 records: down to 1 */
    assert_int_equal(get_lru(f, &d[0]), AM_ENOT_FOUND);
    assert_int_equal(am_metastore_get_tag(f->ms, "docker.io", LRU_REPO, "v1", &out), 0);
    assert_tag_equal(&out, &t); /* the caller fetches d[0] again by digest */
    finish(f);
}

static void refuses_a_manifest_larger_than_the_low_watermark(void **state)
{
    struct fixture *f = *state;
    struct am_digest d;
    struct call c = {.f = f};
    char body[LRU_LEN];
    uint64_t r = lru_record_bytes();
    memset(body, ' ', sizeof body);
    am_digest_of(AM_DIGEST_SHA256, body, sizeof body, &d);
    open_store(f, 0);
    assert_int_equal(am_metastore_set_budget(f->ms, 2 * r - 2, 100, 50), 0);
    assert_int_equal(am_metastore_put_manifest(f->ms, "docker.io", LRU_REPO, &d,
                                               AM_MT_OCI_MANIFEST_S, body, sizeof body, on_put, &c),
                     AM_ETOO_LARGE);
    assert_int_equal(stats_of(f).manifests, 0);
    assert_int_equal(am_metastore_set_budget(f->ms, 2 * r, 100, 50), 0); /* exactly fits */
    assert_int_equal(
        put_manifest_now(f, "docker.io", LRU_REPO, &d, AM_MT_OCI_MANIFEST_S, body, sizeof body), 0);
    assert_int_equal(c.calls, 0); /* the refused put never calls back */
    assert_int_equal(stats_of(f).manifests, 1);
    finish(f);
}

static void rejects_a_budget_with_watermarks_out_of_order(void **state)
{
    struct fixture *f = *state;
    open_store(f, 0);
    assert_int_equal(am_metastore_set_budget(f->ms, 1000, 0, 0), AM_EINVAL);
    assert_int_equal(am_metastore_set_budget(f->ms, 1000, 101, 90), AM_EINVAL);
    assert_int_equal(am_metastore_set_budget(f->ms, 1000, 90, 95), AM_EINVAL);
    assert_int_equal(am_metastore_set_budget(f->ms, 1000, 90, 0), AM_EINVAL);
    assert_int_equal(am_metastore_set_budget(f->ms, 0, 95, 90), 0); /* unbounded */
    finish(f);
}

static void forgets_a_manifest_whose_batch_failed(void **state)
{
    struct fixture *f = *state;
    struct am_digest d;
    char *big = malloc(BIG_LEN);
    assert_non_null(big);
    memset(big, '{', BIG_LEN);
    am_digest_of(AM_DIGEST_SHA256, big, BIG_LEN, &d);
    open_store(f, TINY_MAP);
    assert_int_equal(
        put_manifest_now(f, "docker.io", "library/f", &d, AM_MT_OCI_MANIFEST_S, big, BIG_LEN),
        AM_ESTORE_FULL);
    assert_int_equal(stats_of(f).manifests, 0);
    assert_int_equal(stats_of(f).manifest_bytes, 0);
    free(big);
    finish(f);
}

static void config_refuses_a_manifest_budget_not_below_the_map(void **state)
{
    (void)state;
    struct am_config cfg;
    struct am_config_report r;
    const char *cases[][2] = {
        {"{\"cache\": {\"metastore_map_size\": \"64MiB\", \"manifest_max_size\": \"64MiB\"}}", "1"},
        {"{\"cache\": {\"metastore_map_size\": \"64MiB\", \"manifest_max_size\": \"1GiB\"}}", "1"},
        {"{\"cache\": {\"metastore_map_size\": \"64MiB\", \"manifest_max_size\": \"32MiB\"}}", "0"},
        {"{\"cache\": {\"metastore_map_size\": \"2MiB\"}}", "0"}, /* 0: half the map */
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        assert_int_equal(am_config_init_defaults(&cfg), 0);
        assert_int_equal(am_config_load_string(&cfg, cases[i][0], &r), 0);
        int rc = am_config_validate(&cfg, &r);
        if (cases[i][1][0] == '1') {
            assert_int_equal(rc, AM_ECONFIG);
            assert_int_equal(r.total, 1);
            assert_string_equal(r.problems[0].path, "$.cache.manifest_max_size");
            assert_non_null(strstr(r.problems[0].message, "metastore_map_size (64MiB)"));
        } else {
            assert_int_equal(rc, 0);
        }
        am_config_cleanup(&cfg);
    }
}

int main(void)
{
    /* Failure paths log at WARN by design; keep test output to the cmocka report. */
    am_log_set_level(AM_LOG_ERROR);
    const struct CMUnitTest tests[] = {
#define T(name) cmocka_unit_test_setup_teardown(name, setup, teardown)
        T(stores_and_reads_back_a_manifest),
        T(stores_and_reads_back_a_tag),
        T(reads_its_own_writes_before_they_are_committed),
        T(stores_an_empty_manifest_media_type_and_sha512_digest),
        T(reports_missing_records_as_not_found),
        T(keeps_upstreams_and_repositories_apart),
        T(does_not_confuse_components_that_concatenate_alike),
        T(stores_keys_longer_than_lmdb_allows),
        T(overwrites_a_tag),
        T(batches_puts_made_before_the_loop_runs),
        T(commits_puts_made_from_a_callback_in_a_later_batch),
        T(commits_queued_puts_before_close_completes_and_reopens_with_them),
        T(calls_close_done_from_the_loop_even_when_idle),
        T(closes_without_a_done_callback),
        T(opens_uses_and_closes_within_one_loop_run),
        T(refuses_puts_and_reads_once_close_has_begun),
        T(rejects_arguments_out_of_bounds_without_calling_back),
        T(reports_a_full_map_and_stays_usable),
        T(evicts_the_oldest_manifests_when_the_map_fills),
        T(applies_nothing_of_a_batch_that_fails),
        T(refuses_a_read_only_data_directory),
        T(refuses_a_directory_not_even_root_can_write),
        T(refuses_a_file_where_the_data_directory_should_be),
        T(creates_missing_parent_directories),
        T(detects_corrupt_tag_records),
        T(detects_corrupt_manifest_records),
        T(stores_and_reads_back_the_platform_of_a_manifest),
        T(rejects_platform_records_out_of_bounds_without_calling_back),
        T(detects_corrupt_platform_records),
        T(adds_the_platforms_database_to_an_older_store),
        T(refuses_a_newer_schema_version),
        T(refuses_a_file_that_is_not_an_lmdb_store),
        T(counts_manifest_keys_and_values_against_the_budget),
        T(evicts_the_least_recently_read_manifests_first),
        T(reads_an_evicted_manifest_as_not_found_before_the_delete_commits),
        T(keeps_the_manifest_total_under_the_budget),
        T(records_reads_in_memory_and_writes_them_with_the_next_batch),
        T(writes_read_times_on_their_own_once_enough_have_accumulated),
        T(remembers_the_order_of_use_across_a_restart),
        T(keeps_the_tag_of_an_evicted_manifest),
        T(refuses_a_manifest_larger_than_the_low_watermark),
        T(rejects_a_budget_with_watermarks_out_of_order),
        T(forgets_a_manifest_whose_batch_failed),
        cmocka_unit_test(config_refuses_a_manifest_budget_not_below_the_map),
        cmocka_unit_test(treats_a_tag_as_fresh_strictly_inside_the_window),
        cmocka_unit_test(treats_a_tag_fetched_in_the_future_as_stale),
        cmocka_unit_test(reads_now_from_the_wall_clock_in_milliseconds),
#undef T
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

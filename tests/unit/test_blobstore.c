/*
 * test_blobstore — the content-addressed blob store: round trips, ordered streaming
 * writes, verification, abort, readers against eviction and deletion, LRU order, startup
 * repair, followers of a temp file, concurrent and duplicate writers, full and read-only
 * stores.
 *
 * Every test gets a fresh data directory (mkdtemp under $AM_TEST_TMP or /tmp) and its own
 * loop, waits only for callbacks (the loop is run until a condition holds, never for a
 * time), and ends by closing the store and asserting uv_loop_close() == 0: the store must
 * leave no live handle or request behind. Startup tests damage the tree with plain file
 * calls, using the layout documented in include/archmirror/blobstore.h.
 */
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <linux/fs.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <dirent.h>
#include <unistd.h>

#include <cmocka.h>

#include "archmirror/blobstore.h"
#include "archmirror/digest.h"
#include "archmirror/error.h"
#include "archmirror/log.h"

struct fixture {
    uv_loop_t loop;
    char dir[4096];
    struct am_blobstore *bs;
    int closed;
    char immutable[4200]; /* a directory made immutable by a test, cleared in teardown */
};

/* A commit's callback record. */
struct commit_call {
    int calls;
    int status;
    int seq;
    struct fixture *f;
    struct am_digest digest; /* opened from within the callback when open_in_cb */
    bool open_in_cb;
    int open_rc;
};

/* A writer's progress record. */
struct progress {
    int calls;
    uint64_t written;
    int status;
    int errors;
};

static int g_seq;

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
    if (mkdir(base, 0755) != 0 && errno != EEXIST) goto fail;
    snprintf(f->dir, sizeof f->dir, "%.4000s/blobstore-XXXXXX", base);
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

static void set_immutable(const char *path, bool on)
{
    int fd = open(path, O_RDONLY | O_DIRECTORY);
    if (fd < 0) return;
    int flags = 0;
    if (ioctl(fd, FS_IOC_GETFLAGS, &flags) == 0) {
        flags = on ? flags | FS_IMMUTABLE_FL : flags & ~FS_IMMUTABLE_FL;
        (void)ioctl(fd, FS_IOC_SETFLAGS, &flags);
    }
    close(fd);
}

static int teardown(void **state)
{
    struct fixture *f = *state;
    if (f->immutable[0]) set_immutable(f->immutable, false);
    nftw(f->dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
    free(f);
    return 0;
}

static void on_closed(void *arg)
{
    struct fixture *f = arg;
    f->closed++;
}

static void open_store_with(struct fixture *f, const struct am_blobstore_options *opts)
{
    char msg[512] = "";
    int rc = am_blobstore_open_store(&f->loop, f->dir, opts, &f->bs, msg, sizeof msg);
    if (rc) fail_msg("open_store: %s: %s", am_error_name(rc), msg);
}

static void open_store(struct fixture *f)
{
    open_store_with(f, NULL);
}

static void open_store_max(struct fixture *f, uint64_t max_bytes)
{
    struct am_blobstore_options o = {.max_bytes = max_bytes};
    open_store_with(f, &o);
}

/* Closes the store, runs the loop until close's done, and checks nothing is left. */
static void close_store(struct fixture *f)
{
    int before = f->closed;
    am_blobstore_close_store(f->bs, on_closed, f);
    f->bs = NULL;
    assert_int_equal(f->closed, before); /* never from within close */
    assert_int_equal(uv_run(&f->loop, UV_RUN_DEFAULT), 0);
    assert_int_equal(f->closed, before + 1);
}

static void finish(struct fixture *f)
{
    if (f->bs) close_store(f);
    assert_int_equal(uv_run(&f->loop, UV_RUN_DEFAULT), 0);
    assert_int_equal(uv_loop_close(&f->loop), 0);
}

/* Runs the loop until cond holds; fails if the loop runs dry first. */
#define RUN_UNTIL(f, cond)                                                                         \
    do {                                                                                           \
        while (!(cond)) {                                                                          \
            if (uv_run(&(f)->loop, UV_RUN_ONCE) == 0 && !(cond))                                   \
                fail_msg("loop ran dry before %s", #cond);                                         \
        }                                                                                          \
    } while (0)

static void run_until(struct fixture *f, const int *flag)
{
    RUN_UNTIL(f, *flag);
}

static void run_idle(struct fixture *f)
{
    assert_int_equal(uv_run(&f->loop, UV_RUN_DEFAULT), 0);
}

/* ---- data and paths ---- */

/* Deterministic bytes: seed picks the stream. Returns owned memory. */
static unsigned char *make_bytes(size_t len, uint32_t seed)
{
    unsigned char *p = malloc(len ? len : 1);
    assert_non_null(p);
    uint32_t x = seed * 2654435761u + 1;
    for (size_t i = 0; i < len; i++) {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        p[i] = (unsigned char)x;
    }
    return p;
}

static struct am_digest digest_of(const void *p, size_t len)
{
    struct am_digest d;
    am_digest_of(AM_DIGEST_SHA256, p, len, &d);
    return d;
}

static void blob_file(const struct fixture *f, const struct am_digest *d, char *out, size_t n)
{
    const char *hex = strchr(d->str, ':') + 1;
    snprintf(out, n, "%s/blobs/%.*s/%.2s/%s", f->dir, (int)(hex - 1 - d->str), d->str, hex, hex);
}

static bool blob_file_exists(const struct fixture *f, const struct am_digest *d)
{
    char path[4400];
    struct stat st;
    blob_file(f, d, path, sizeof path);
    return stat(path, &st) == 0;
}

static int count_entries(const char *dir)
{
    DIR *d = opendir(dir);
    if (!d) return -1;
    int n = 0;
    struct dirent *de;
    while ((de = readdir(d)) != NULL)
        if (strcmp(de->d_name, ".") != 0 && strcmp(de->d_name, "..") != 0) n++;
    closedir(d);
    return n;
}

static int count_temps(const struct fixture *f)
{
    char path[4200];
    snprintf(path, sizeof path, "%s/blobs/tmp", f->dir);
    return count_entries(path);
}

static void write_file(const char *path, const void *p, size_t len)
{
    FILE *fp = fopen(path, "wb");
    assert_non_null(fp);
    if (len) assert_int_equal(fwrite(p, 1, len, fp), len);
    assert_int_equal(fclose(fp), 0);
}

/* Reads [0, len) of fd with pread and compares it with want. */
static void assert_fd_holds(int fd, const unsigned char *want, size_t len)
{
    unsigned char *got = malloc(len + 1);
    assert_non_null(got);
    size_t off = 0;
    while (off < len) {
        ssize_t n = pread(fd, got + off, len - off, (off_t)off);
        assert_true(n > 0);
        off += (size_t)n;
    }
    assert_int_equal(pread(fd, got, 1, (off_t)len), 0); /* and nothing more */
    assert_memory_equal(got, want, len);
    free(got);
}

/* Opens the blob and checks its exact bytes. */
static void assert_blob_holds(struct fixture *f, const struct am_digest *d,
                              const unsigned char *want, size_t len)
{
    struct am_blobstore_reader *r = NULL;
    int rc = am_blobstore_open(f->bs, d, &r);
    if (rc) fail_msg("open %s: %s", d->str, am_error_name(rc));
    assert_int_equal(am_blobstore_reader_size(r), len);
    assert_fd_holds(am_blobstore_reader_fd(r), want, len);
    am_blobstore_close_reader(r);
}

static bool blob_present(struct fixture *f, const struct am_digest *d)
{
    struct am_blobstore_info info;
    return am_blobstore_stat(f->bs, d, &info) == 0;
}

static void on_commit(void *arg, int status)
{
    struct commit_call *c = arg;
    c->calls++;
    c->status = status;
    c->seq = g_seq++;
    if (c->open_in_cb) {
        struct am_blobstore_reader *r = NULL;
        c->open_rc = am_blobstore_open(c->f->bs, &c->digest, &r);
        am_blobstore_close_reader(r);
    }
}

static void on_progress(void *arg, uint64_t written, int status)
{
    struct progress *p = arg;
    p->calls++;
    p->written = written;
    p->status = status;
    if (status) p->errors++;
}

/* Begins, appends len bytes in one piece, commits, runs until the callback; returns its
 * status. */
static int store_blob(struct fixture *f, const struct am_digest *d, int64_t expected, const void *p,
                      size_t len)
{
    struct am_blobstore_writer *w = NULL;
    struct commit_call c = {0};
    assert_int_equal(am_blobstore_begin(f->bs, d, expected, &w), 0);
    int rc = am_blobstore_writer_append(w, p, len);
    if (rc) fail_msg("append: %s", am_error_name(rc));
    assert_int_equal(am_blobstore_writer_commit(w, on_commit, &c), 0);
    assert_int_equal(c.calls, 0); /* never from within commit */
    run_until(f, &c.calls);
    assert_int_equal(c.calls, 1);
    return c.status;
}

/* Stores len bytes of stream seed; returns their digest. */
static struct am_digest store_seeded(struct fixture *f, size_t len, uint32_t seed)
{
    unsigned char *p = make_bytes(len, seed);
    struct am_digest d = digest_of(p, len);
    assert_int_equal(store_blob(f, &d, (int64_t)len, p, len), 0);
    free(p);
    return d;
}

static struct am_blobstore_stats stats(struct fixture *f)
{
    struct am_blobstore_stats s;
    am_blobstore_get_stats(f->bs, &s);
    return s;
}

/* ---- round trips ---- */

static void stores_a_blob_and_reads_back_the_exact_bytes(void **state)
{
    struct fixture *f = *state;
    size_t len = 300000;
    unsigned char *p = make_bytes(len, 1);
    struct am_digest d = digest_of(p, len);
    struct am_blobstore_writer *w = NULL;
    struct commit_call c = {0};
    open_store(f);

    assert_int_equal(am_blobstore_begin(f->bs, &d, (int64_t)len, &w), 0);
    assert_int_equal(
        am_blobstore_writer_set_media_type(w, "application/vnd.oci.image.layer.v1.tar+gzip"), 0);
    /* Appended before the temp file even exists: queued, in order. */
    assert_int_equal(am_blobstore_writer_append(w, p, 1000), 0);
    assert_int_equal(am_blobstore_writer_append(w, p + 1000, 99000), 0);
    assert_int_equal(am_blobstore_writer_append(w, p + 100000, len - 100000), 0);
    assert_int_equal(am_blobstore_writer_appended_bytes(w), len);
    assert_int_equal(am_blobstore_writer_commit(w, on_commit, &c), 0);
    run_until(f, &c.calls);
    assert_int_equal(c.status, 0);

    /* At its content address, with exactly the bytes; no temp file left. */
    char path[4400];
    blob_file(f, &d, path, sizeof path);
    int fd = open(path, O_RDONLY);
    assert_true(fd >= 0);
    assert_fd_holds(fd, p, len);
    close(fd);
    assert_int_equal(count_temps(f), 0);

    struct am_blobstore_reader *r = NULL;
    assert_int_equal(am_blobstore_open(f->bs, &d, &r), 0);
    assert_int_equal(am_blobstore_reader_size(r), len);
    assert_string_equal(am_blobstore_reader_media_type(r),
                        "application/vnd.oci.image.layer.v1.tar+gzip");
    assert_fd_holds(am_blobstore_reader_fd(r), p, len);

    struct am_blobstore_info info;
    assert_int_equal(am_blobstore_stat(f->bs, &d, &info), 0);
    assert_int_equal(info.size, len);
    assert_int_equal(info.hits, 1);
    assert_int_equal(info.readers, 1);
    assert_string_equal(info.media_type, "application/vnd.oci.image.layer.v1.tar+gzip");
    assert_true(info.stored_at_ms > 0 && info.last_access_ms >= info.stored_at_ms);
    am_blobstore_close_reader(r);

    struct am_blobstore_stats s = stats(f);
    assert_int_equal(s.blobs, 1);
    assert_int_equal(s.bytes_used, len);
    assert_int_equal(s.commits, 1);
    assert_int_equal(s.hits, 1);
    assert_int_equal(s.writers, 0);
    assert_int_equal(s.readers, 0);
    free(p);
    finish(f);
}

static void keeps_committed_blobs_across_a_restart(void **state)
{
    struct fixture *f = *state;
    unsigned char *p = make_bytes(5000, 2);
    struct am_digest d = digest_of(p, 5000);
    open_store(f);
    assert_int_equal(store_blob(f, &d, 5000, p, 5000), 0);
    close_store(f);

    open_store(f);
    struct am_blobstore_stats s = stats(f);
    assert_int_equal(s.blobs, 1);
    assert_int_equal(s.bytes_used, 5000);
    assert_int_equal(s.startup_adopted + s.startup_orphans + s.startup_removed, 0);
    assert_blob_holds(f, &d, p, 5000);
    free(p);
    finish(f);
}

static void stores_an_empty_blob(void **state)
{
    struct fixture *f = *state;
    struct am_digest d = digest_of("", 0);
    struct am_blobstore_writer *w = NULL;
    struct commit_call c = {0};
    open_store(f);
    assert_int_equal(am_blobstore_begin(f->bs, &d, 0, &w), 0);
    assert_int_equal(am_blobstore_writer_append(w, "", 0), 0);
    assert_int_equal(am_blobstore_writer_commit(w, on_commit, &c), 0);
    run_until(f, &c.calls);
    assert_int_equal(c.status, 0);
    assert_blob_holds(f, &d, (const unsigned char *)"", 0);
    finish(f);
}

static void stores_sha512_blobs_under_their_own_directory(void **state)
{
    struct fixture *f = *state;
    unsigned char *p = make_bytes(777, 3);
    struct am_digest d;
    am_digest_of(AM_DIGEST_SHA512, p, 777, &d);
    open_store(f);
    assert_int_equal(store_blob(f, &d, -1, p, 777), 0);
    char path[4400];
    snprintf(path, sizeof path, "%s/blobs/sha512/%.2s/%s", f->dir, d.str + 7, d.str + 7);
    struct stat st;
    assert_int_equal(stat(path, &st), 0);
    assert_int_equal(st.st_size, 777);
    assert_blob_holds(f, &d, p, 777);
    free(p);
    finish(f);
}

/* ---- streaming ---- */

struct stream {
    struct fixture *f;
    struct am_blobstore_writer *w;
    const unsigned char *p;
    size_t len;
    size_t off;
    int refs_taken;
    int refs_released;
    int progress_calls;
    uint64_t last_written;
    bool out_of_order;
};

static void on_release(void *arg)
{
    struct stream *s = arg;
    s->refs_released++;
}

/* Appends the next few pieces of 1..13 bytes, every third one by reference. */
static void stream_some(struct stream *s, int pieces)
{
    for (int i = 0; i < pieces && s->off < s->len; i++) {
        size_t n = 1 + (s->off * 7 + (size_t)i) % 13;
        if (n > s->len - s->off) n = s->len - s->off;
        if (i % 3 == 0) {
            assert_int_equal(am_blobstore_writer_append_ref(s->w, s->p + s->off, n, on_release, s),
                             0);
            s->refs_taken++;
        } else {
            assert_int_equal(am_blobstore_writer_append(s->w, s->p + s->off, n), 0);
        }
        s->off += n;
    }
}

/* More appends arrive while earlier writes are in flight. */
static void on_stream_progress(void *arg, uint64_t written, int status)
{
    struct stream *s = arg;
    assert_int_equal(status, 0);
    if (written < s->last_written) s->out_of_order = true;
    s->last_written = written;
    s->progress_calls++;
    stream_some(s, 200);
}

static void writes_many_small_appends_in_order(void **state)
{
    struct fixture *f = *state;
    size_t len = 60000;
    unsigned char *p = make_bytes(len, 4);
    struct am_digest d = digest_of(p, len);
    struct stream s = {.f = f, .p = p, .len = len};
    struct commit_call c = {0};
    open_store(f);

    assert_int_equal(am_blobstore_begin(f->bs, &d, (int64_t)len, &s.w), 0);
    am_blobstore_writer_set_on_written(s.w, on_stream_progress, &s);
    stream_some(&s, 100);
    while (s.off < len) {
        int before = s.progress_calls;
        RUN_UNTIL(f, s.progress_calls != before);
    }
    assert_int_equal(am_blobstore_writer_commit(s.w, on_commit, &c), 0);
    run_until(f, &c.calls);
    assert_int_equal(c.status, 0);
    assert_false(s.out_of_order);
    assert_true(s.progress_calls > 2);
    assert_int_equal(s.refs_released, s.refs_taken);
    assert_blob_holds(f, &d, p, len);
    free(p);
    finish(f);
}

static void reports_written_bytes_and_lets_a_follower_read_the_temp_file(void **state)
{
    struct fixture *f = *state;
    size_t len = 20000;
    unsigned char *p = make_bytes(len, 5);
    struct am_digest d = digest_of(p, len);
    struct am_blobstore_writer *w = NULL;
    struct progress pr = {0};
    struct commit_call c = {0};
    int fd_path = -1, fd_dup = -1;
    open_store(f);

    assert_int_equal(am_blobstore_begin(f->bs, &d, (int64_t)len, &w), 0);
    am_blobstore_writer_set_on_written(w, on_progress, &pr);
    assert_int_equal(am_blobstore_writer_written_bytes(w), 0);
    /* Before the temp file exists there is nothing to follow. */
    assert_int_equal(am_blobstore_writer_open_reader(w, &fd_dup), AM_EUNAVAILABLE);
    assert_int_equal(fd_dup, -1);
    run_until(f, &pr.calls); /* the file exists: written 0 */
    assert_int_equal(pr.written, 0);

    assert_int_equal(am_blobstore_writer_append(w, p, 8000), 0);
    RUN_UNTIL(f, am_blobstore_writer_written_bytes(w) == 8000);
    assert_int_equal(pr.written, 8000);

    /* A late joiner reads the prefix, by path or through the writer's descriptor. */
    fd_path = open(am_blobstore_writer_temp_path(w), O_RDONLY);
    assert_true(fd_path >= 0);
    assert_fd_holds(fd_path, p, 8000);
    assert_int_equal(am_blobstore_writer_open_reader(w, &fd_dup), 0);
    assert_fd_holds(fd_dup, p, 8000);
    assert_false(blob_present(f, &d)); /* nothing visible before the commit */

    /* ... then follows live. */
    assert_int_equal(am_blobstore_writer_append(w, p + 8000, len - 8000), 0);
    assert_int_equal(am_blobstore_writer_commit(w, on_commit, &c), 0);
    run_until(f, &c.calls);
    assert_int_equal(c.status, 0);
    assert_int_equal(pr.written, len);
    assert_int_equal(pr.errors, 0);
    /* Both descriptors survive the rename and see the whole blob. */
    assert_fd_holds(fd_path, p, len);
    assert_fd_holds(fd_dup, p, len);
    close(fd_path);
    close(fd_dup);
    assert_int_equal(count_temps(f), 0);
    free(p);
    finish(f);
}

static void makes_the_blob_visible_by_the_time_the_commit_calls_back(void **state)
{
    struct fixture *f = *state;
    unsigned char *p = make_bytes(100, 6);
    struct am_digest d = digest_of(p, 100);
    struct am_blobstore_writer *w = NULL;
    struct commit_call c = {.f = f, .digest = d, .open_in_cb = true, .open_rc = -1};
    open_store(f);
    assert_int_equal(am_blobstore_begin(f->bs, &d, 100, &w), 0);
    assert_int_equal(am_blobstore_writer_append(w, p, 100), 0);
    assert_int_equal(am_blobstore_writer_commit(w, on_commit, &c), 0);
    run_until(f, &c.calls);
    assert_int_equal(c.status, 0);
    assert_int_equal(c.open_rc, 0);
    free(p);
    finish(f);
}

/* ---- verification ---- */

static void refuses_a_digest_mismatch_and_leaves_nothing_at_the_address(void **state)
{
    struct fixture *f = *state;
    unsigned char *good = make_bytes(4096, 7), *bad = make_bytes(4096, 8);
    struct am_digest d = digest_of(good, 4096);
    struct progress pr = {0};
    struct am_blobstore_writer *w = NULL;
    struct commit_call c = {0};
    open_store(f);

    assert_int_equal(am_blobstore_begin(f->bs, &d, 4096, &w), 0);
    am_blobstore_writer_set_on_written(w, on_progress, &pr);
    assert_int_equal(am_blobstore_writer_append(w, bad, 4096), 0);
    assert_int_equal(am_blobstore_writer_commit(w, on_commit, &c), 0);
    run_until(f, &c.calls);
    assert_int_equal(c.status, AM_EDIGEST_MISMATCH);
    assert_int_equal(pr.errors, 0); /* the write itself went fine */

    assert_false(blob_file_exists(f, &d));
    assert_int_equal(count_temps(f), 0);
    struct am_blobstore_reader *r = NULL;
    assert_int_equal(am_blobstore_open(f->bs, &d, &r), AM_ENOT_FOUND);
    assert_null(r);
    struct am_blobstore_stats s = stats(f);
    assert_int_equal(s.blobs, 0);
    assert_int_equal(s.commit_failures, 1);
    assert_int_equal(s.misses, 1);

    /* The right bytes are accepted afterwards. */
    assert_int_equal(store_blob(f, &d, 4096, good, 4096), 0);
    assert_blob_holds(f, &d, good, 4096);
    free(good);
    free(bad);
    finish(f);
}

static void refuses_a_body_shorter_than_expected_even_if_its_digest_matches(void **state)
{
    struct fixture *f = *state;
    unsigned char *p = make_bytes(500, 9);
    struct am_digest d = digest_of(p, 500);
    open_store(f);
    assert_int_equal(store_blob(f, &d, 501, p, 500), AM_EDIGEST_MISMATCH);
    assert_false(blob_file_exists(f, &d));
    assert_int_equal(count_temps(f), 0);
    free(p);
    finish(f);
}

static void refuses_a_body_longer_than_expected_at_the_append(void **state)
{
    struct fixture *f = *state;
    unsigned char *p = make_bytes(500, 10);
    struct am_digest d = digest_of(p, 400);
    struct am_blobstore_writer *w = NULL;
    struct commit_call c = {0};
    open_store(f);
    assert_int_equal(am_blobstore_begin(f->bs, &d, 400, &w), 0);
    assert_int_equal(am_blobstore_writer_append(w, p, 300), 0);
    assert_int_equal(am_blobstore_writer_append(w, p + 300, 200), AM_EDIGEST_MISMATCH);
    /* Latched: later appends fail the same way. */
    assert_int_equal(am_blobstore_writer_append(w, p + 300, 100), AM_EDIGEST_MISMATCH);
    assert_int_equal(am_blobstore_writer_status(w), AM_EDIGEST_MISMATCH);
    assert_int_equal(am_blobstore_writer_commit(w, on_commit, &c), 0);
    run_until(f, &c.calls);
    assert_int_equal(c.status, AM_EDIGEST_MISMATCH);
    assert_false(blob_file_exists(f, &d));
    assert_int_equal(count_temps(f), 0);
    free(p);
    finish(f);
}

static void refuses_blobs_larger_than_the_whole_cache(void **state)
{
    struct fixture *f = *state;
    unsigned char *p = make_bytes(1200, 11);
    struct am_digest d = digest_of(p, 1200);
    struct am_blobstore_writer *w = (struct am_blobstore_writer *)1;
    struct commit_call c = {0};
    open_store_max(f, 1000);
    assert_int_equal(am_blobstore_begin(f->bs, &d, 1200, &w), AM_ETOO_LARGE);
    assert_null(w);
    /* Size unknown: refused once the bytes exceed the cache. */
    assert_int_equal(am_blobstore_begin(f->bs, &d, -1, &w), 0);
    assert_int_equal(am_blobstore_writer_append(w, p, 600), 0);
    assert_int_equal(am_blobstore_writer_append(w, p + 600, 600), AM_ETOO_LARGE);
    assert_int_equal(am_blobstore_writer_commit(w, on_commit, &c), 0);
    run_until(f, &c.calls);
    assert_int_equal(c.status, AM_ETOO_LARGE);
    assert_int_equal(count_temps(f), 0);
    assert_int_equal(stats(f).blobs, 0);
    free(p);
    finish(f);
}

/* ---- abort ---- */

static void aborts_before_the_temp_file_exists_and_releases_queued_chunks(void **state)
{
    struct fixture *f = *state;
    unsigned char *p = make_bytes(1000, 12);
    struct am_digest d = digest_of(p, 1000);
    struct am_blobstore_writer *w = NULL;
    struct progress pr = {0};
    struct stream s = {0};
    open_store(f);
    assert_int_equal(am_blobstore_begin(f->bs, &d, 1000, &w), 0);
    am_blobstore_writer_set_on_written(w, on_progress, &pr);
    assert_int_equal(am_blobstore_writer_append_ref(w, p, 1000, on_release, &s), 0);
    am_blobstore_writer_abort(w);
    assert_int_equal(s.refs_released, 0); /* never from within abort */
    run_idle(f);
    assert_int_equal(s.refs_released, 1);
    assert_int_equal(pr.calls, 0); /* no callback after abort */
    assert_int_equal(count_temps(f), 0);
    assert_false(blob_file_exists(f, &d));
    assert_int_equal(stats(f).writers, 0);
    free(p);
    finish(f);
}

static void aborts_after_writing_and_removes_the_temp_file(void **state)
{
    struct fixture *f = *state;
    unsigned char *p = make_bytes(3000, 13);
    struct am_digest d = digest_of(p, 3000);
    struct am_blobstore_writer *w = NULL;
    struct progress pr = {0};
    open_store(f);
    assert_int_equal(am_blobstore_begin(f->bs, &d, 3000, &w), 0);
    am_blobstore_writer_set_on_written(w, on_progress, &pr);
    assert_int_equal(am_blobstore_writer_append(w, p, 2000), 0);
    RUN_UNTIL(f, am_blobstore_writer_written_bytes(w) == 2000);
    assert_int_equal(count_temps(f), 1);
    int calls = pr.calls;
    assert_int_equal(am_blobstore_writer_append(w, p + 2000, 1000), 0); /* in flight */
    am_blobstore_writer_abort(w);
    run_idle(f);
    assert_int_equal(pr.calls, calls);
    assert_int_equal(count_temps(f), 0);
    assert_false(blob_present(f, &d));
    free(p);
    finish(f);
}

/* ---- readers, deletion, eviction ---- */

static void counts_hits_and_misses(void **state)
{
    struct fixture *f = *state;
    open_store(f);
    struct am_digest d = store_seeded(f, 64, 14);
    struct am_digest other = digest_of("other", 5);
    struct am_blobstore_reader *r = NULL;
    assert_int_equal(am_blobstore_open(f->bs, &other, &r), AM_ENOT_FOUND);
    assert_int_equal(am_blobstore_open(f->bs, &d, &r), 0);
    am_blobstore_close_reader(r);
    assert_int_equal(am_blobstore_open(f->bs, &d, &r), 0);
    am_blobstore_close_reader(r);
    struct am_blobstore_stats s = stats(f);
    assert_int_equal(s.hits, 2);
    assert_int_equal(s.misses, 1);
    struct am_blobstore_info info;
    assert_int_equal(am_blobstore_stat(f->bs, &d, &info), 0);
    assert_int_equal(info.hits, 2);
    assert_int_equal(am_blobstore_stat(f->bs, &other, &info), AM_ENOT_FOUND);
    assert_int_equal(stats(f).hits, 2); /* stat is not a hit */
    finish(f);
}

static void persists_hits_and_access_times_across_a_restart(void **state)
{
    struct fixture *f = *state;
    struct am_blobstore_info before, after;
    open_store(f);
    struct am_digest d = store_seeded(f, 64, 15);
    for (int i = 0; i < 3; i++) {
        struct am_blobstore_reader *r = NULL;
        assert_int_equal(am_blobstore_open(f->bs, &d, &r), 0);
        am_blobstore_close_reader(r);
    }
    assert_int_equal(am_blobstore_stat(f->bs, &d, &before), 0);
    assert_int_equal(before.hits, 3);
    close_store(f); /* writes the batched access records */
    open_store(f);
    assert_int_equal(am_blobstore_stat(f->bs, &d, &after), 0);
    assert_int_equal(after.hits, 3);
    assert_int_equal(after.last_access_ms, before.last_access_ms);
    assert_int_equal(after.stored_at_ms, before.stored_at_ms);
    finish(f);
}

static void writes_access_records_on_flush(void **state)
{
    struct fixture *f = *state;
    open_store(f);
    struct am_digest d = store_seeded(f, 64, 16);
    struct am_blobstore_reader *r = NULL;
    assert_int_equal(am_blobstore_open(f->bs, &d, &r), 0);
    am_blobstore_close_reader(r);
    run_idle(f);
    uint64_t failures = stats(f).meta_failures;
    am_blobstore_flush(f->bs);
    run_idle(f);
    assert_int_equal(stats(f).meta_failures, failures);
    am_blobstore_flush(f->bs); /* nothing left: a no-op */
    run_idle(f);
    finish(f);
}

static void deletes_a_blob_being_read_only_after_the_last_reader_closes(void **state)
{
    struct fixture *f = *state;
    size_t len = 10000;
    unsigned char *p = make_bytes(len, 17);
    struct am_digest d = digest_of(p, len);
    struct am_blobstore_reader *r1 = NULL, *r2 = NULL, *r3 = NULL;
    open_store(f);
    assert_int_equal(store_blob(f, &d, (int64_t)len, p, len), 0);
    assert_int_equal(am_blobstore_open(f->bs, &d, &r1), 0);
    assert_int_equal(am_blobstore_open(f->bs, &d, &r2), 0);

    assert_int_equal(am_blobstore_del(f->bs, &d), 0);
    assert_int_equal(am_blobstore_del(f->bs, &d), AM_ENOT_FOUND);
    assert_int_equal(am_blobstore_open(f->bs, &d, &r3), AM_ENOT_FOUND); /* invisible now */
    assert_int_equal(stats(f).blobs, 0);
    run_idle(f);
    assert_true(blob_file_exists(f, &d)); /* ... but not unlinked under its readers */
    assert_fd_holds(am_blobstore_reader_fd(r1), p, len);

    am_blobstore_close_reader(r1);
    run_idle(f);
    assert_true(blob_file_exists(f, &d));
    assert_fd_holds(am_blobstore_reader_fd(r2), p, len);
    am_blobstore_close_reader(r2);
    run_idle(f);
    assert_false(blob_file_exists(f, &d));
    assert_int_equal(stats(f).deletions, 1);

    close_store(f);
    open_store(f); /* the record went too */
    assert_int_equal(stats(f).startup_orphans, 0);
    assert_false(blob_present(f, &d));
    free(p);
    finish(f);
}

static void replaces_a_deleted_blob_that_is_committed_again_while_read(void **state)
{
    struct fixture *f = *state;
    char path[4400];
    unsigned char *p = make_bytes(900, 18);
    struct am_digest d = digest_of(p, 900);
    struct am_blobstore_reader *r = NULL;
    struct am_blobstore_info info;
    open_store(f);
    assert_int_equal(store_blob(f, &d, 900, p, 900), 0);
    assert_int_equal(am_blobstore_open(f->bs, &d, &r), 0);
    /* Deleted as damaged (flip a byte in place; the reader sees the same inode). */
    blob_file(f, &d, path, sizeof path);
    int fd = open(path, O_WRONLY);
    assert_true(fd >= 0);
    assert_int_equal(pwrite(fd, "\xff", 1, 0), 1);
    close(fd);
    assert_int_equal(am_blobstore_del(f->bs, &d), 0);

    /* A fresh, verified copy is committed while the old one is still being read: it
     * replaces the damaged file instead of reviving it. */
    assert_int_equal(store_blob(f, &d, 900, p, 900), 0);
    struct am_blobstore_stats s = stats(f);
    assert_int_equal(s.commits, 2);
    assert_int_equal(s.commits_shared, 0);
    assert_int_equal(s.blobs, 1);
    assert_int_equal(am_blobstore_stat(f->bs, &d, &info), 0);
    assert_int_equal(info.readers, 1);
    assert_blob_holds(f, &d, p, 900);

    /* The old reader keeps its inode; its close unlinks nothing. */
    unsigned char first;
    assert_int_equal(pread(am_blobstore_reader_fd(r), &first, 1, 0), 1);
    assert_int_equal(first, 0xff);
    am_blobstore_close_reader(r);
    run_idle(f);
    assert_true(blob_file_exists(f, &d));
    assert_blob_holds(f, &d, p, 900);
    close_store(f);
    open_store(f);
    s = stats(f);
    assert_int_equal(s.startup_adopted + s.startup_orphans + s.startup_removed, 0);
    assert_blob_holds(f, &d, p, 900);
    free(p);
    finish(f);
}

static void recommits_a_blob_whose_unlink_is_in_flight(void **state)
{
    struct fixture *f = *state;
    unsigned char *p = make_bytes(900, 19);
    struct am_digest d = digest_of(p, 900);
    struct am_blobstore_writer *w = NULL;
    struct commit_call c = {0};
    open_store(f);
    assert_int_equal(store_blob(f, &d, 900, p, 900), 0);
    /* The unlink and the new commit race on the thread pool: the commit must wait. */
    assert_int_equal(am_blobstore_del(f->bs, &d), 0);
    assert_int_equal(am_blobstore_begin(f->bs, &d, 900, &w), 0);
    assert_int_equal(am_blobstore_writer_append(w, p, 900), 0);
    assert_int_equal(am_blobstore_writer_commit(w, on_commit, &c), 0);
    run_idle(f);
    assert_int_equal(c.status, 0);
    assert_true(blob_file_exists(f, &d));
    assert_blob_holds(f, &d, p, 900);
    close_store(f);
    open_store(f); /* and its record survived the delete queued before it */
    assert_int_equal(stats(f).startup_adopted + stats(f).startup_orphans, 0);
    assert_true(blob_present(f, &d));
    free(p);
    finish(f);
}

static void evicts_the_least_recently_used_blob_first(void **state)
{
    struct fixture *f = *state;
    struct am_blobstore_reader *r = NULL;
    open_store_max(f, 1000); /* evict above 950, down to 900 */
    struct am_digest a = store_seeded(f, 300, 20);
    struct am_digest b = store_seeded(f, 300, 21);
    struct am_digest c = store_seeded(f, 300, 22);
    assert_int_equal(stats(f).evictions, 0);
    assert_int_equal(am_blobstore_open(f->bs, &a, &r), 0); /* a is now the most recent */
    am_blobstore_close_reader(r);

    struct am_digest d = store_seeded(f, 300, 23);
    run_idle(f);
    assert_true(blob_present(f, &a));
    assert_false(blob_present(f, &b));
    assert_false(blob_file_exists(f, &b));
    assert_true(blob_present(f, &c));
    assert_true(blob_present(f, &d));
    struct am_blobstore_stats s = stats(f);
    assert_int_equal(s.evictions, 1);
    assert_int_equal(s.evicted_bytes, 300);
    assert_int_equal(s.bytes_used, 900);

    struct am_digest e = store_seeded(f, 300, 24);
    run_idle(f);
    assert_true(blob_present(f, &a));
    assert_false(blob_present(f, &c));
    assert_false(blob_file_exists(f, &c));
    assert_true(blob_present(f, &d));
    assert_true(blob_present(f, &e));
    assert_int_equal(stats(f).bytes_used, 900);

    close_store(f);
    open_store_max(f, 1000); /* the evicted records are gone too */
    s = stats(f);
    assert_int_equal(s.blobs, 3);
    assert_int_equal(s.startup_orphans + s.startup_adopted, 0);
    finish(f);
}

static void keeps_a_blob_being_read_through_eviction_until_its_reader_closes(void **state)
{
    struct fixture *f = *state;
    size_t len = 460;
    unsigned char *pa = make_bytes(len, 25);
    struct am_digest a = digest_of(pa, len);
    struct am_blobstore_reader *ra = NULL, *rb = NULL;
    open_store_max(f, 1000); /* evict above 950, down to 900 */
    assert_int_equal(store_blob(f, &a, (int64_t)len, pa, len), 0);
    assert_int_equal(am_blobstore_open(f->bs, &a, &ra), 0);
    struct am_digest b = store_seeded(f, 460, 26);
    assert_int_equal(am_blobstore_open(f->bs, &b, &rb), 0);

    /* 1020 bytes: a and b are being read, so only the newcomer can go. */
    struct am_digest c = store_seeded(f, 100, 27);
    run_idle(f);
    assert_false(blob_present(f, &c));
    assert_true(blob_file_exists(f, &a));
    assert_true(blob_file_exists(f, &b));
    assert_int_equal(stats(f).bytes_used, 920); /* still over the low watermark */
    assert_fd_holds(am_blobstore_reader_fd(ra), pa, len);

    /* a (least recent) goes as soon as its reader closes; b stays. */
    am_blobstore_close_reader(ra);
    run_idle(f);
    assert_false(blob_file_exists(f, &a));
    assert_true(blob_file_exists(f, &b));
    am_blobstore_close_reader(rb);
    run_idle(f);
    assert_true(blob_file_exists(f, &b));
    assert_int_equal(stats(f).bytes_used, 460);
    assert_int_equal(stats(f).evictions, 2);
    free(pa);
    finish(f);
}

static void evicts_at_startup_when_the_budget_has_shrunk(void **state)
{
    struct fixture *f = *state;
    open_store(f);
    for (uint32_t i = 0; i < 4; i++) store_seeded(f, 300, 30 + i);
    close_store(f);
    open_store_max(f, 700); /* evict above 665, down to 630 */
    run_idle(f);
    struct am_blobstore_stats s = stats(f);
    assert_int_equal(s.evictions, 2);
    assert_int_equal(s.blobs, 2);
    assert_int_equal(s.bytes_used, 600);
    finish(f);
}

static void drops_a_blob_whose_file_changed_size_instead_of_serving_it(void **state)
{
    struct fixture *f = *state;
    char path[4400];
    struct am_blobstore_reader *r = NULL;
    open_store(f);
    struct am_digest d = store_seeded(f, 2000, 28);
    blob_file(f, &d, path, sizeof path);
    assert_int_equal(truncate(path, 1000), 0);
    assert_int_equal(am_blobstore_open(f->bs, &d, &r), AM_ENOT_FOUND);
    assert_null(r);
    run_idle(f);
    assert_false(blob_file_exists(f, &d));
    assert_int_equal(stats(f).deletions, 1);
    close_store(f);
    open_store(f);
    assert_int_equal(stats(f).startup_orphans, 0);
    finish(f);
}

/* ---- startup ---- */

static void removes_stale_temp_files_at_startup(void **state)
{
    struct fixture *f = *state;
    char path[4400];
    open_store(f);
    struct am_digest d = store_seeded(f, 100, 40);
    close_store(f);
    /* What a kill -9 during a fill leaves behind. */
    snprintf(path, sizeof path, "%s/blobs/tmp/123-1-00aa.part", f->dir);
    write_file(path, "partial", 7);
    snprintf(path, sizeof path, "%s/blobs/tmp/123-2-00bb.part", f->dir);
    write_file(path, "", 0);
    assert_int_equal(count_temps(f), 2);

    open_store(f);
    assert_int_equal(count_temps(f), 0);
    struct am_blobstore_stats s = stats(f);
    assert_int_equal(s.startup_temp_removed, 2);
    assert_int_equal(s.blobs, 1);
    assert_true(blob_present(f, &d));
    finish(f);
}

static void adopts_a_committed_file_whose_metadata_was_never_written(void **state)
{
    struct fixture *f = *state;
    char path[4400];
    unsigned char *p = make_bytes(3333, 41);
    struct am_digest d = digest_of(p, 3333);
    open_store(f);
    close_store(f);
    /* A crash between the rename and the LMDB commit leaves exactly this. */
    snprintf(path, sizeof path, "%s/blobs/sha256/%.2s", f->dir, d.str + 7);
    assert_int_equal(mkdir(path, 0750), 0);
    blob_file(f, &d, path, sizeof path);
    write_file(path, p, 3333);

    open_store(f);
    struct am_blobstore_stats s = stats(f);
    assert_int_equal(s.startup_adopted, 1);
    assert_int_equal(s.blobs, 1);
    assert_int_equal(s.bytes_used, 3333);
    assert_blob_holds(f, &d, p, 3333);
    close_store(f);
    open_store(f); /* adopted once, recorded since */
    assert_int_equal(stats(f).startup_adopted, 0);
    assert_true(blob_present(f, &d));
    free(p);
    finish(f);
}

static void deletes_metadata_whose_file_is_gone(void **state)
{
    struct fixture *f = *state;
    char path[4400];
    struct am_digest gone[3];
    open_store(f);
    for (uint32_t i = 0; i < 3; i++) gone[i] = store_seeded(f, 100, 42 + i);
    struct am_digest kept = store_seeded(f, 100, 45);
    close_store(f);
    for (int i = 0; i < 3; i++) {
        blob_file(f, &gone[i], path, sizeof path);
        assert_int_equal(unlink(path), 0);
    }

    open_store(f);
    struct am_blobstore_stats s = stats(f);
    assert_int_equal(s.startup_orphans, 3);
    assert_int_equal(s.blobs, 1);
    assert_true(blob_present(f, &kept));
    for (int i = 0; i < 3; i++) assert_false(blob_present(f, &gone[i]));
    close_store(f);
    open_store(f);
    assert_int_equal(stats(f).startup_orphans, 0);
    finish(f);
}

static void removes_files_that_disagree_with_their_metadata_or_are_not_blobs(void **state)
{
    struct fixture *f = *state;
    char path[4400];
    open_store(f);
    struct am_digest cut = store_seeded(f, 1000, 46);
    struct am_digest kept = store_seeded(f, 1000, 47);
    close_store(f);
    blob_file(f, &cut, path, sizeof path);
    assert_int_equal(truncate(path, 10), 0);
    /* A foreign name in a <hh> directory, one in the <alg> directory, a blob in the
     * wrong <hh> directory, and a directory we leave alone. */
    snprintf(path, sizeof path, "%s/blobs/sha256/%.2s/junk", f->dir, kept.str + 7);
    write_file(path, "x", 1);
    snprintf(path, sizeof path, "%s/blobs/sha256/stray", f->dir);
    write_file(path, "x", 1);
    snprintf(path, sizeof path, "%s/blobs/sha256/%s", f->dir, kept.str[7] == '0' ? "ff" : "00");
    mkdir(path, 0750);
    snprintf(path + strlen(path), sizeof path - strlen(path), "/%s", kept.str + 7);
    write_file(path, "x", 1);
    snprintf(path, sizeof path, "%s/blobs/sha256/%.2s/subdir", f->dir, kept.str + 7);
    assert_int_equal(mkdir(path, 0750), 0);

    open_store(f);
    struct am_blobstore_stats s = stats(f);
    assert_int_equal(s.startup_removed, 4);
    assert_int_equal(s.blobs, 1);
    assert_false(blob_present(f, &cut));
    assert_false(blob_file_exists(f, &cut));
    assert_true(blob_present(f, &kept));
    struct stat st;
    assert_int_equal(stat(path, &st), 0); /* the directory */
    close_store(f);
    open_store(f); /* repaired once */
    s = stats(f);
    assert_int_equal(s.startup_removed + s.startup_orphans + s.startup_adopted, 0);
    finish(f);
}

/* ---- concurrency ---- */

static void commits_concurrent_writers_of_different_digests(void **state)
{
    struct fixture *f = *state;
    enum { N = 8 };
    size_t len = 50000;
    unsigned char *p[N];
    struct am_digest d[N];
    struct am_blobstore_writer *w[N];
    struct commit_call c[N];
    open_store(f);
    for (int i = 0; i < N; i++) {
        p[i] = make_bytes(len, 50 + (uint32_t)i);
        d[i] = digest_of(p[i], len);
        memset(&c[i], 0, sizeof c[i]);
        assert_int_equal(am_blobstore_begin(f->bs, &d[i], (int64_t)len, &w[i]), 0);
    }
    /* Interleaved appends, the loop running between rounds. */
    for (size_t off = 0; off < len; off += 5000) {
        for (int i = 0; i < N; i++)
            assert_int_equal(am_blobstore_writer_append(w[i], p[i] + off, 5000), 0);
        uv_run(&f->loop, UV_RUN_NOWAIT);
    }
    for (int i = 0; i < N; i++)
        assert_int_equal(am_blobstore_writer_commit(w[i], on_commit, &c[i]), 0);
    run_idle(f);
    for (int i = 0; i < N; i++) assert_int_equal(c[i].calls, 1);
    for (int i = 0; i < N; i++) {
        assert_int_equal(c[i].status, 0);
        assert_blob_holds(f, &d[i], p[i], len);
        free(p[i]);
    }
    assert_int_equal(stats(f).blobs, N);
    assert_int_equal(count_temps(f), 0);
    finish(f);
}

static void commits_a_second_writer_of_the_same_digest_as_a_shared_success(void **state)
{
    struct fixture *f = *state;
    size_t len = 40000;
    unsigned char *p = make_bytes(len, 60);
    struct am_digest d = digest_of(p, len);
    struct am_blobstore_writer *w1 = NULL, *w2 = NULL;
    struct commit_call c1 = {0}, c2 = {0};
    open_store(f);
    assert_int_equal(am_blobstore_begin(f->bs, &d, (int64_t)len, &w1), 0);
    assert_int_equal(am_blobstore_begin(f->bs, &d, (int64_t)len, &w2), 0);
    assert_string_not_equal(am_blobstore_writer_temp_path(w1), am_blobstore_writer_temp_path(w2));
    assert_int_equal(am_blobstore_writer_append(w1, p, len), 0);
    assert_int_equal(am_blobstore_writer_append(w2, p, len), 0);
    assert_int_equal(am_blobstore_writer_commit(w1, on_commit, &c1), 0);
    assert_int_equal(am_blobstore_writer_commit(w2, on_commit, &c2), 0);
    run_idle(f);
    assert_int_equal(c1.calls, 1);
    assert_int_equal(c2.calls, 1);
    assert_int_equal(c1.status, 0);
    assert_int_equal(c2.status, 0);
    struct am_blobstore_stats s = stats(f);
    assert_int_equal(s.commits, 1);
    assert_int_equal(s.commits_shared, 1);
    assert_int_equal(s.blobs, 1);
    assert_int_equal(s.bytes_used, len);
    assert_int_equal(count_temps(f), 0);
    assert_blob_holds(f, &d, p, len);

    /* Once committed, a third writer is a shared success too, and may tell the media
     * type the first did not know. */
    struct am_blobstore_writer *w3 = NULL;
    struct commit_call c3 = {0};
    struct am_blobstore_info info;
    assert_int_equal(am_blobstore_begin(f->bs, &d, (int64_t)len, &w3), 0);
    assert_int_equal(am_blobstore_writer_set_media_type(w3, "application/octet-stream"), 0);
    assert_int_equal(am_blobstore_writer_append(w3, p, len), 0);
    assert_int_equal(am_blobstore_writer_commit(w3, on_commit, &c3), 0);
    run_until(f, &c3.calls);
    assert_int_equal(c3.status, 0);
    assert_int_equal(stats(f).commits_shared, 2);
    assert_int_equal(stats(f).bytes_used, len);
    assert_int_equal(count_temps(f), 0);
    close_store(f);
    open_store(f);
    assert_int_equal(am_blobstore_stat(f->bs, &d, &info), 0);
    assert_string_equal(info.media_type, "application/octet-stream");
    free(p);
    finish(f);
}

static void commits_the_good_writer_when_another_of_its_digest_is_corrupt(void **state)
{
    struct fixture *f = *state;
    unsigned char *good = make_bytes(8000, 61), *bad = make_bytes(8000, 62);
    struct am_digest d = digest_of(good, 8000);
    struct am_blobstore_writer *w1 = NULL, *w2 = NULL;
    struct commit_call c1 = {0}, c2 = {0};
    open_store(f);
    assert_int_equal(am_blobstore_begin(f->bs, &d, 8000, &w1), 0);
    assert_int_equal(am_blobstore_begin(f->bs, &d, 8000, &w2), 0);
    assert_int_equal(am_blobstore_writer_append(w1, bad, 8000), 0);
    assert_int_equal(am_blobstore_writer_append(w2, good, 8000), 0);
    assert_int_equal(am_blobstore_writer_commit(w1, on_commit, &c1), 0);
    assert_int_equal(am_blobstore_writer_commit(w2, on_commit, &c2), 0);
    run_idle(f);
    assert_int_equal(c1.status, AM_EDIGEST_MISMATCH);
    assert_int_equal(c2.status, 0);
    assert_blob_holds(f, &d, good, 8000);
    assert_int_equal(count_temps(f), 0);
    free(good);
    free(bad);
    finish(f);
}

/* ---- closing ---- */

static void finishes_commits_in_flight_before_close_completes(void **state)
{
    struct fixture *f = *state;
    unsigned char *p = make_bytes(10000, 63);
    struct am_digest d = digest_of(p, 10000);
    struct am_blobstore_writer *w = NULL, *wa = NULL;
    struct commit_call c = {0};
    open_store(f);
    assert_int_equal(am_blobstore_begin(f->bs, &d, 10000, &w), 0);
    assert_int_equal(am_blobstore_writer_append(w, p, 10000), 0);
    assert_int_equal(am_blobstore_writer_commit(w, on_commit, &c), 0);
    assert_int_equal(am_blobstore_begin(f->bs, &d, 10000, &wa), 0);
    am_blobstore_writer_abort(wa);
    close_store(f);
    assert_int_equal(c.calls, 1);
    assert_int_equal(c.status, 0);
    assert_int_equal(count_temps(f), 0);
    open_store(f);
    assert_blob_holds(f, &d, p, 10000);
    free(p);
    finish(f);
}

static void refuses_new_work_once_close_has_begun(void **state)
{
    struct fixture *f = *state;
    struct am_digest d = digest_of("x", 1);
    struct am_blobstore_writer *w = NULL;
    struct am_blobstore_reader *r = NULL;
    open_store(f);
    am_blobstore_close_store(f->bs, on_closed, f);
    assert_int_equal(am_blobstore_begin(f->bs, &d, 1, &w), AM_EUNAVAILABLE);
    assert_int_equal(am_blobstore_open(f->bs, &d, &r), AM_EUNAVAILABLE);
    assert_int_equal(am_blobstore_del(f->bs, &d), AM_EUNAVAILABLE);
    assert_null(w);
    assert_null(r);
    f->bs = NULL;
    run_idle(f);
    assert_int_equal(f->closed, 1);
    finish(f);
}

static void closes_without_a_done_callback(void **state)
{
    struct fixture *f = *state;
    open_store(f);
    am_blobstore_close_store(f->bs, NULL, NULL);
    f->bs = NULL;
    finish(f);
}

/* ---- failures of the disk ---- */

static void reports_a_full_disk_as_store_full_and_cleans_up(void **state)
{
    struct fixture *f = *state;
    size_t len = (size_t)2 << 20;
    unsigned char *p = make_bytes(len, 64);
    struct am_digest d = digest_of(p, len);
    struct am_blobstore_writer *w = NULL;
    struct progress pr = {0};
    struct commit_call c = {0};
    struct rlimit old, lim;
    open_store(f);

    /* A file size limit fails writes past 1 MiB with EFBIG, as a full disk would with
     * ENOSPC; both are AM_ESTORE_FULL. */
    assert_int_equal(getrlimit(RLIMIT_FSIZE, &old), 0);
    void (*prev)(int) = signal(SIGXFSZ, SIG_IGN);
    lim = old;
    lim.rlim_cur = (rlim_t)1 << 20;
    assert_int_equal(setrlimit(RLIMIT_FSIZE, &lim), 0);

    assert_int_equal(am_blobstore_begin(f->bs, &d, (int64_t)len, &w), 0);
    am_blobstore_writer_set_on_written(w, on_progress, &pr);
    for (size_t off = 0; off < len; off += 65536)
        assert_int_equal(am_blobstore_writer_append(w, p + off, 65536), 0);
    RUN_UNTIL(f, pr.errors > 0);
    assert_int_equal(pr.status, AM_ESTORE_FULL);
    assert_int_equal(am_blobstore_writer_status(w), AM_ESTORE_FULL);
    assert_int_equal(am_blobstore_writer_append(w, p, 1), AM_ESTORE_FULL);
    assert_int_equal(pr.written, (uint64_t)1 << 20); /* every byte that fit, in order */
    assert_int_equal(am_blobstore_writer_commit(w, on_commit, &c), 0);
    run_until(f, &c.calls);

    assert_int_equal(setrlimit(RLIMIT_FSIZE, &old), 0);
    signal(SIGXFSZ, prev);
    assert_int_equal(c.status, AM_ESTORE_FULL);
    assert_int_equal(pr.errors, 1);
    assert_int_equal(count_temps(f), 0);
    assert_false(blob_file_exists(f, &d));
    /* The store stays usable. */
    struct am_digest small = store_seeded(f, 100, 65);
    assert_true(blob_present(f, &small));
    free(p);
    finish(f);
}

static void reports_a_temp_directory_that_refuses_files_as_read_only(void **state)
{
    struct fixture *f = *state;
    struct am_digest d = digest_of("abc", 3);
    struct am_blobstore_writer *w = NULL;
    struct progress pr = {0};
    struct commit_call c = {0};
    char tmp[4200];
    open_store(f);
    snprintf(tmp, sizeof tmp, "%s/blobs/tmp", f->dir);
    /* root ignores modes; an immutable directory refuses even root. */
    if (geteuid() == 0) {
        snprintf(f->immutable, sizeof f->immutable, "%s", tmp);
        set_immutable(tmp, true);
        char probe[4300];
        snprintf(probe, sizeof probe, "%s/probe", tmp);
        int fd = open(probe, O_CREAT | O_WRONLY, 0600);
        if (fd >= 0) {
            close(fd);
            unlink(probe);
            finish(f);
            skip();
        }
    } else {
        assert_int_equal(chmod(tmp, 0500), 0);
    }
    assert_int_equal(am_blobstore_begin(f->bs, &d, 3, &w), 0);
    am_blobstore_writer_set_on_written(w, on_progress, &pr);
    assert_int_equal(am_blobstore_writer_append(w, "abc", 3), 0);
    run_until(f, &pr.calls);
    assert_int_equal(pr.status, AM_ESTORE_READONLY);
    assert_int_equal(am_blobstore_writer_commit(w, on_commit, &c), 0);
    run_until(f, &c.calls);
    assert_int_equal(c.status, AM_ESTORE_READONLY);
    assert_false(blob_file_exists(f, &d));
    if (geteuid() == 0) {
        set_immutable(tmp, false);
        f->immutable[0] = '\0';
    } else {
        chmod(tmp, 0750);
    }
    finish(f);
}

static void refuses_a_data_directory_not_even_root_can_write(void **state)
{
    struct fixture *f = *state;
    char msg[256] = "";
    struct stat st;
    if (stat("/sys/kernel", &st) != 0 || !S_ISDIR(st.st_mode)) {
        finish(f);
        skip();
    }
    assert_int_equal(
        am_blobstore_open_store(&f->loop, "/sys/kernel", NULL, &f->bs, msg, sizeof msg),
        AM_ESTORE_READONLY);
    assert_null(f->bs);
    assert_non_null(strstr(msg, "/sys/kernel/blobs"));
    finish(f);
}

static void keeps_a_verified_blob_whose_metadata_could_not_be_written(void **state)
{
    struct fixture *f = *state;
    char mt[AM_MEDIATYPE_MAX + 1];
    struct am_digest last = {0};
    struct am_blobstore_options tiny = {.map_bytes = 64 << 10};
    memset(mt, 'm', AM_MEDIATYPE_MAX);
    mt[AM_MEDIATYPE_MAX] = '\0';
    open_store_with(f, &tiny);
    /* Records of ~330 bytes fill a 64 KiB map after a few hundred blobs. */
    for (uint32_t i = 0; i < 1000 && stats(f).meta_failures == 0; i++) {
        unsigned char b[4];
        memcpy(b, &i, sizeof b);
        struct am_blobstore_writer *w = NULL;
        struct commit_call c = {0};
        last = digest_of(b, sizeof b);
        assert_int_equal(am_blobstore_begin(f->bs, &last, sizeof b, &w), 0);
        assert_int_equal(am_blobstore_writer_set_media_type(w, mt), 0);
        assert_int_equal(am_blobstore_writer_append(w, b, sizeof b), 0);
        assert_int_equal(am_blobstore_writer_commit(w, on_commit, &c), 0);
        run_until(f, &c.calls);
        assert_int_equal(c.status, 0); /* in place and verified, whatever LMDB says */
    }
    assert_true(stats(f).meta_failures > 0);
    assert_true(blob_present(f, &last));
    uint64_t blobs = stats(f).blobs;
    close_store(f);

    /* With room in the map, the next start adopts what could not be recorded. */
    open_store(f);
    assert_true(stats(f).startup_adopted >= 1);
    assert_int_equal(stats(f).blobs, blobs);
    assert_true(blob_present(f, &last));
    finish(f);
}

/* ---- arguments ---- */

static void rejects_invalid_arguments_without_calling_back(void **state)
{
    struct fixture *f = *state;
    struct am_digest d = digest_of("x", 1), bad = d;
    struct am_blobstore_writer *w = NULL;
    struct am_blobstore_reader *r = NULL;
    struct am_blobstore_info info;
    struct am_blobstore *bs = NULL;
    char msg[128] = "";
    char long_mt[AM_MEDIATYPE_MAX + 2];

    struct am_blobstore_options o = {.high_pct = 80, .low_pct = 90};
    assert_int_equal(am_blobstore_open_store(&f->loop, f->dir, &o, &bs, msg, sizeof msg),
                     AM_EINVAL);
    assert_null(bs);
    o = (struct am_blobstore_options){.high_pct = 101};
    assert_int_equal(am_blobstore_open_store(&f->loop, f->dir, &o, &bs, NULL, 0), AM_EINVAL);
    assert_int_equal(am_blobstore_open_store(&f->loop, "", NULL, &bs, NULL, 0), AM_EINVAL);
    open_store(f);

    bad.str[7] = 'A'; /* uppercase hex is not canonical */
    assert_int_equal(am_blobstore_begin(f->bs, &bad, 1, &w), AM_EINVAL);
    assert_int_equal(am_blobstore_begin(f->bs, NULL, 1, &w), AM_EINVAL);
    assert_int_equal(am_blobstore_begin(f->bs, &d, -2, &w), AM_EINVAL);
    assert_null(w);
    assert_int_equal(am_blobstore_open(f->bs, &bad, &r), AM_EINVAL);
    assert_int_equal(am_blobstore_stat(f->bs, &bad, &info), AM_EINVAL);
    assert_int_equal(am_blobstore_del(f->bs, &bad), AM_EINVAL);
    assert_int_equal(am_blobstore_writer_commit(NULL, on_commit, NULL), AM_EINVAL);
    am_blobstore_writer_abort(NULL);
    am_blobstore_close_reader(NULL);

    assert_int_equal(am_blobstore_begin(f->bs, &d, 1, &w), 0);
    memset(long_mt, 'a', sizeof long_mt - 1);
    long_mt[sizeof long_mt - 1] = '\0';
    assert_int_equal(am_blobstore_writer_set_media_type(w, long_mt), AM_EINVAL);
    assert_int_equal(am_blobstore_writer_append_ref(w, "x", 0, free, NULL), AM_EINVAL);
    assert_int_equal(am_blobstore_writer_append(w, NULL, 1), AM_EINVAL);
    assert_int_equal(am_blobstore_writer_status(w), 0); /* argument errors do not latch */
    assert_int_equal(am_blobstore_writer_append(w, "x", 1), 0);
    struct commit_call c = {0};
    assert_int_equal(am_blobstore_writer_commit(w, on_commit, &c), 0);
    run_until(f, &c.calls);
    assert_int_equal(c.status, 0);
    finish(f);
}

int main(void)
{
    /* Failure paths log at WARN by design; keep test output to the cmocka report. */
    am_log_set_level(AM_LOG_ERROR);
    const struct CMUnitTest tests[] = {
#define T(name) cmocka_unit_test_setup_teardown(name, setup, teardown)
        T(stores_a_blob_and_reads_back_the_exact_bytes),
        T(keeps_committed_blobs_across_a_restart),
        T(stores_an_empty_blob),
        T(stores_sha512_blobs_under_their_own_directory),
        T(writes_many_small_appends_in_order),
        T(reports_written_bytes_and_lets_a_follower_read_the_temp_file),
        T(makes_the_blob_visible_by_the_time_the_commit_calls_back),
        T(refuses_a_digest_mismatch_and_leaves_nothing_at_the_address),
        T(refuses_a_body_shorter_than_expected_even_if_its_digest_matches),
        T(refuses_a_body_longer_than_expected_at_the_append),
        T(refuses_blobs_larger_than_the_whole_cache),
        T(aborts_before_the_temp_file_exists_and_releases_queued_chunks),
        T(aborts_after_writing_and_removes_the_temp_file),
        T(counts_hits_and_misses),
        T(persists_hits_and_access_times_across_a_restart),
        T(writes_access_records_on_flush),
        T(deletes_a_blob_being_read_only_after_the_last_reader_closes),
        T(replaces_a_deleted_blob_that_is_committed_again_while_read),
        T(recommits_a_blob_whose_unlink_is_in_flight),
        T(evicts_the_least_recently_used_blob_first),
        T(keeps_a_blob_being_read_through_eviction_until_its_reader_closes),
        T(evicts_at_startup_when_the_budget_has_shrunk),
        T(drops_a_blob_whose_file_changed_size_instead_of_serving_it),
        T(removes_stale_temp_files_at_startup),
        T(adopts_a_committed_file_whose_metadata_was_never_written),
        T(deletes_metadata_whose_file_is_gone),
        T(removes_files_that_disagree_with_their_metadata_or_are_not_blobs),
        T(commits_concurrent_writers_of_different_digests),
        T(commits_a_second_writer_of_the_same_digest_as_a_shared_success),
        T(commits_the_good_writer_when_another_of_its_digest_is_corrupt),
        T(finishes_commits_in_flight_before_close_completes),
        T(refuses_new_work_once_close_has_begun),
        T(closes_without_a_done_callback),
        T(reports_a_full_disk_as_store_full_and_cleans_up),
        T(reports_a_temp_directory_that_refuses_files_as_read_only),
        T(refuses_a_data_directory_not_even_root_can_write),
        T(keeps_a_verified_blob_whose_metadata_could_not_be_written),
        T(rejects_invalid_arguments_without_calling_back),
#undef T
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

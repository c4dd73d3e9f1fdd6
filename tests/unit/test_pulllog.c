/*
 * test_pulllog — the pull log: JSON lines, rotation, aggregates (pulls, distinct nodes,
 * platforms), the /api/v1/pulls and /api/v1/readiness answers, failing disks, and the
 * HTTP handler end to end.
 *
 * Every test gets a fresh directory (mkdtemp under $AM_TEST_TMP or /tmp) and its own
 * loop, and ends by closing the pull log and asserting uv_loop_close() == 0. Writes are
 * made to happen with am_pulllog_flush or close and the loop run until their callbacks
 * ran; the flush interval is an hour unless a test is about the interval itself, so no
 * test depends on timing. JSON is checked by parsing it back with jansson.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <jansson.h>
#include <netinet/in.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <unistd.h>
#include <uv.h>

#include "archmirror/buf.h"
#include "archmirror/error.h"
#include "archmirror/http.h"
#include "archmirror/httpserver.h"
#include "archmirror/log.h"
#include "archmirror/pulllog.h"

#define HOUR_MS (3600u * 1000u)
/* 2024-05-01T12:00:00Z */
#define T0 ((uint64_t)1714564800u * 1000u)

#define DG_A "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
#define DG_B "sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"
#define DG_C "sha256:cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc"

struct fixture {
    uv_loop_t loop;
    char dir[4096];
    struct am_pulllog_opts opts;
    struct am_pulllog *pl;
    int closed;
    int flushed;
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
    if (mkdir(base, 0755) != 0 && errno != EEXIST) goto fail;
    snprintf(f->dir, sizeof f->dir, "%.4000s/pulllog-XXXXXX", base);
    if (!mkdtemp(f->dir)) goto fail;
    if (uv_loop_init(&f->loop) != 0) goto fail;
    am_pulllog_opts_init(&f->opts);
    f->opts.dir = f->dir;
    f->opts.flush_interval_ms = HOUR_MS;
    f->opts.flush_bytes = (uint64_t)1 << 30;
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
    nftw(f->dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
    free(f);
    return 0;
}

static void on_closed(void *arg)
{
    struct fixture *f = arg;
    f->closed++;
}

static void on_flushed(void *arg)
{
    struct fixture *f = arg;
    f->flushed++;
}

static void open_log(struct fixture *f)
{
    char msg[256] = "";
    int rc = am_pulllog_open(&f->loop, &f->opts, &f->pl, msg, sizeof msg);
    if (rc) fail_msg("open: %s: %s", am_error_name(rc), msg);
}

static void close_log(struct fixture *f)
{
    int before = f->closed;
    am_pulllog_close(f->pl, on_closed, f);
    f->pl = NULL;
    assert_int_equal(f->closed, before); /* never from within close */
    assert_int_equal(uv_run(&f->loop, UV_RUN_DEFAULT), 0);
    assert_int_equal(f->closed, before + 1);
}

/* Closes the log (if open) and checks the loop is left empty. */
static void finish(struct fixture *f)
{
    if (f->pl) close_log(f);
    assert_int_equal(uv_loop_close(&f->loop), 0);
}

static void flush(struct fixture *f)
{
    int before = f->flushed;
    assert_int_equal(am_pulllog_flush(f->pl, on_flushed, f), 0);
    assert_int_equal(f->flushed, before); /* never from within flush */
    assert_int_equal(uv_run(&f->loop, UV_RUN_DEFAULT), 0);
    assert_int_equal(f->flushed, before + 1);
}

static struct am_pulllog_stats stats(struct fixture *f)
{
    struct am_pulllog_stats s;
    am_pulllog_get_stats(f->pl, &s);
    return s;
}

static struct am_pulllog_record rec(const char *client, const char *platform,
                                    const char *repository, const char *tag, uint64_t t)
{
    struct am_pulllog_record r = {
        .time_ms = t,
        .client = client,
        .node_platform = platform,
        .platform_source =
            platform && *platform ? AM_PULLLOG_SOURCE_HEADER : AM_PULLLOG_SOURCE_UNKNOWN,
        .registry = "docker.io",
        .repository = repository,
        .tag = tag,
        .digest = DG_A,
    };
    return r;
}

static void record(struct fixture *f, const struct am_pulllog_record *r)
{
    int rc = am_pulllog_record(f->pl, r);
    if (rc) fail_msg("record: %s", am_error_name(rc));
}

/* A pull of repository:tag by client on platform at time t, shipping plats. */
static void pull(struct fixture *f, const char *client, const char *platform,
                 const char *repository, const char *tag, uint64_t t, const char *const *plats,
                 size_t n_plats)
{
    struct am_pulllog_record r = rec(client, platform, repository, tag, t);
    r.image_platforms = plats;
    r.n_image_platforms = n_plats;
    record(f, &r);
}

static char *read_file(const char *path, size_t *len)
{
    FILE *fp = fopen(path, "rb");
    if (!fp) return NULL;
    struct am_buf b;
    am_buf_init(&b, (size_t)1 << 26);
    char chunk[4096];
    size_t n;
    while ((n = fread(chunk, 1, sizeof chunk, fp)) > 0)
        if (am_buf_append(&b, chunk, n) != 0) break;
    fclose(fp);
    char *s = am_buf_steal(&b, len);
    am_buf_cleanup(&b);
    return s;
}

static void path_of(const struct fixture *f, const char *name, char *out, size_t outlen)
{
    snprintf(out, outlen, "%s/%s", f->dir, name);
}

/* The lines of a file in the log directory, parsed; NULL when it does not exist. */
static json_t *lines_of(const struct fixture *f, const char *name)
{
    char path[4200];
    size_t len;
    path_of(f, name, path, sizeof path);
    char *s = read_file(path, &len);
    if (!s) return NULL;
    json_t *arr = json_array();
    char *line = s;
    while (*line) {
        char *nl = strchr(line, '\n');
        if (!nl) fail_msg("%s: last line has no newline: %s", name, line);
        *nl = '\0';
        json_error_t err;
        json_t *j = json_loads(line, 0, &err);
        if (!j) fail_msg("%s: not JSON (%s): %s", name, err.text, line);
        json_array_append_new(arr, j);
        line = nl + 1;
    }
    free(s);
    return arr;
}

static bool exists(const struct fixture *f, const char *name)
{
    char path[4200];
    struct stat st;
    path_of(f, name, path, sizeof path);
    return stat(path, &st) == 0;
}

/* Runs a query and parses its answer. */
static json_t *query(struct fixture *f, bool readiness, const char *qs, uint64_t now)
{
    struct am_buf b;
    char msg[256] = "";
    am_buf_init(&b, (size_t)1 << 26);
    int rc = readiness ? am_pulllog_query_readiness(f->pl, qs, strlen(qs), now, &b, msg, sizeof msg)
                       : am_pulllog_query_pulls(f->pl, qs, strlen(qs), now, &b, msg, sizeof msg);
    if (rc) fail_msg("query %s: %s: %s", qs, am_error_name(rc), msg);
    json_error_t err;
    json_t *j = json_loadb(b.data, b.len, 0, &err);
    if (!j) fail_msg("answer is not JSON (%s): %s", err.text, b.data);
    am_buf_cleanup(&b);
    return j;
}

static int query_fails(struct fixture *f, bool readiness, const char *qs, char *msg, size_t msglen)
{
    struct am_buf b;
    am_buf_init(&b, 1 << 20);
    assert_int_equal(am_buf_append_str(&b, "keep"), 0);
    int rc = readiness ? am_pulllog_query_readiness(f->pl, qs, strlen(qs), T0, &b, msg, msglen)
                       : am_pulllog_query_pulls(f->pl, qs, strlen(qs), T0, &b, msg, msglen);
    assert_string_equal(b.data, "keep"); /* out unchanged */
    am_buf_cleanup(&b);
    return rc;
}

static const char *jstr(json_t *o, const char *key)
{
    json_t *v = json_object_get(o, key);
    if (!json_is_string(v)) fail_msg("%s is not a string", key);
    return json_string_value(v);
}

static long long jint(json_t *o, const char *key)
{
    json_t *v = json_object_get(o, key);
    if (!json_is_integer(v)) fail_msg("%s is not an integer", key);
    return json_integer_value(v);
}

/* The /pulls entry for image, tag and platform, or NULL. */
static json_t *find_pull(json_t *answer, const char *image, const char *tag, const char *platform)
{
    size_t i;
    json_t *e;
    json_array_foreach(json_object_get(answer, "pulls"), i, e)
    {
        if (strcmp(jstr(e, "image"), image) == 0 && strcmp(jstr(e, "tag"), tag) == 0 &&
            strcmp(jstr(e, "platform"), platform) == 0)
            return e;
    }
    return NULL;
}

/* The "image" values of a list in an answer, joined by spaces. */
static void images_of(json_t *answer, const char *list, char *out, size_t outlen)
{
    size_t i, n = 0;
    json_t *e;
    out[0] = '\0';
    json_array_foreach(json_object_get(answer, list), i, e)
    {
        n += (size_t)snprintf(out + n, outlen - n, "%s%s", i ? " " : "", jstr(e, "image"));
        if (n >= outlen) fail_msg("images_of: too long");
    }
}

/* ---- the JSON lines ---- */

static void records_a_json_line_with_every_field(void **state)
{
    struct fixture *f = *state;
    const char *plats[] = {"linux/amd64", "linux/arm64"};
    struct am_pulllog_record r = {
        .time_ms = T0 + 123,
        .client = "10.0.3.7:41234",
        .node_platform = "linux/arm64",
        .platform_source = AM_PULLLOG_SOURCE_CHILD_MANIFEST,
        .registry = "docker.io",
        .repository = "library/nginx",
        .tag = "1.27",
        .digest = DG_A,
        .platform_digest = DG_B,
        .cache_hit = true,
        .bytes = 4321,
        .image_platforms = plats,
        .n_image_platforms = 2,
    };
    open_log(f);
    record(f, &r);
    close_log(f);

    json_t *lines = lines_of(f, "pulls.jsonl");
    assert_non_null(lines);
    assert_int_equal(json_array_size(lines), 1);
    json_t *l = json_array_get(lines, 0);
    assert_int_equal(json_object_size(l), 13);
    assert_string_equal(jstr(l, "time"), "2024-05-01T12:00:00.123Z");
    assert_string_equal(jstr(l, "client"), "10.0.3.7:41234");
    assert_string_equal(jstr(l, "node"), "10.0.3.7");
    assert_string_equal(jstr(l, "nodePlatform"), "linux/arm64");
    assert_string_equal(jstr(l, "platformSource"), "child-manifest");
    assert_string_equal(jstr(l, "registry"), "docker.io");
    assert_string_equal(jstr(l, "repository"), "library/nginx");
    assert_string_equal(jstr(l, "tag"), "1.27");
    assert_string_equal(jstr(l, "digest"), DG_A);
    assert_string_equal(jstr(l, "platformDigest"), DG_B);
    assert_true(json_is_true(json_object_get(l, "cacheHit")));
    assert_int_equal(jint(l, "bytes"), 4321);
    json_t *ip = json_object_get(l, "imagePlatforms");
    assert_int_equal(json_array_size(ip), 2);
    assert_string_equal(json_string_value(json_array_get(ip, 0)), "linux/amd64");
    assert_string_equal(json_string_value(json_array_get(ip, 1)), "linux/arm64");
    json_decref(lines);
    finish(f);
}

static void writes_empty_strings_for_what_a_pull_by_digest_lacks(void **state)
{
    struct fixture *f = *state;
    struct am_pulllog_record r = {
        .time_ms = T0,
        .client = "[fd00::7]:5000",
        .platform_source = AM_PULLLOG_SOURCE_HEADER, /* no platform: recorded as unknown */
        .registry = "ghcr.io",
        .repository = "o/r",
        .digest = DG_C,
    };
    open_log(f);
    record(f, &r);
    close_log(f);
    json_t *lines = lines_of(f, "pulls.jsonl");
    json_t *l = json_array_get(lines, 0);
    assert_string_equal(jstr(l, "node"), "fd00::7");
    assert_string_equal(jstr(l, "nodePlatform"), "");
    assert_string_equal(jstr(l, "platformSource"), "unknown");
    assert_string_equal(jstr(l, "tag"), "");
    assert_string_equal(jstr(l, "platformDigest"), "");
    assert_true(json_is_false(json_object_get(l, "cacheHit")));
    assert_int_equal(json_array_size(json_object_get(l, "imagePlatforms")), 0);
    json_decref(lines);
    finish(f);
}

static void normalises_platforms_and_deduplicates_image_platforms(void **state)
{
    struct fixture *f = *state;
    const char *plats[] = {"linux/x86_64", "linux/arm64/v8", "linux/amd64", "Linux/aarch64",
                           "linux/arm"};
    struct am_pulllog_record r = rec("10.0.0.1:1", "Linux/aarch64", "library/a", "1", T0);
    r.image_platforms = plats;
    r.n_image_platforms = 5;
    open_log(f);
    record(f, &r);
    close_log(f);
    json_t *lines = lines_of(f, "pulls.jsonl");
    json_t *l = json_array_get(lines, 0);
    assert_string_equal(jstr(l, "nodePlatform"), "linux/arm64");
    json_t *ip = json_object_get(l, "imagePlatforms");
    assert_int_equal(json_array_size(ip), 3);
    assert_string_equal(json_string_value(json_array_get(ip, 0)), "linux/amd64");
    assert_string_equal(json_string_value(json_array_get(ip, 1)), "linux/arm64");
    assert_string_equal(json_string_value(json_array_get(ip, 2)), "linux/arm/v7");
    json_decref(lines);
    finish(f);
}

static void refuses_invalid_records_and_counts_them(void **state)
{
    struct fixture *f = *state;
    const char *bad_plat[] = {"linux"};
    const char *null_plat[] = {NULL};
    open_log(f);
    struct am_pulllog_record ok = rec("10.0.0.1:1", "linux/arm64", "library/a", "1", T0);
    struct am_pulllog_record r;

    r = ok, r.registry = NULL;
    assert_int_equal(am_pulllog_record(f->pl, &r), AM_EINVAL);
    r = ok, r.repository = "";
    assert_int_equal(am_pulllog_record(f->pl, &r), AM_EINVAL);
    r = ok, r.digest = NULL;
    assert_int_equal(am_pulllog_record(f->pl, &r), AM_EINVAL);
    r = ok, r.digest = "sha256:abc";
    assert_int_equal(am_pulllog_record(f->pl, &r), AM_EINVAL);
    r = ok, r.platform_digest = "md5:00";
    assert_int_equal(am_pulllog_record(f->pl, &r), AM_EINVAL);
    r = ok, r.tag = "has space";
    assert_int_equal(am_pulllog_record(f->pl, &r), AM_EINVAL);
    r = ok, r.client = "10.0.0.1:1\n";
    assert_int_equal(am_pulllog_record(f->pl, &r), AM_EINVAL);
    r = ok, r.node_platform = "linux/arm64\r\nX: y";
    assert_int_equal(am_pulllog_record(f->pl, &r), AM_EINVAL);
    r = ok, r.node_platform = "plan9";
    assert_int_equal(am_pulllog_record(f->pl, &r), AM_EINVAL);
    r = ok, r.platform_source = (enum am_pulllog_source)7;
    assert_int_equal(am_pulllog_record(f->pl, &r), AM_EINVAL);
    r = ok, r.image_platforms = bad_plat, r.n_image_platforms = 1;
    assert_int_equal(am_pulllog_record(f->pl, &r), AM_EINVAL);
    r = ok, r.image_platforms = null_plat, r.n_image_platforms = 1;
    assert_int_equal(am_pulllog_record(f->pl, &r), AM_EINVAL);
    r = ok, r.image_platforms = NULL, r.n_image_platforms = 2;
    assert_int_equal(am_pulllog_record(f->pl, &r), AM_EINVAL);
    r = ok, r.n_image_platforms = AM_PULLLOG_PLATFORMS_MAX + 1;
    assert_int_equal(am_pulllog_record(f->pl, &r), AM_EINVAL);
    assert_int_equal(am_pulllog_record(f->pl, NULL), AM_EINVAL);
    record(f, &ok);

    struct am_pulllog_stats s = stats(f);
    assert_int_equal(s.refused, 15);
    assert_int_equal(s.recorded, 1);
    close_log(f);
    json_t *lines = lines_of(f, "pulls.jsonl");
    assert_int_equal(json_array_size(lines), 1);
    json_decref(lines);
    finish(f);
}

static void appends_to_the_file_of_an_earlier_run(void **state)
{
    struct fixture *f = *state;
    open_log(f);
    record(f, &(struct am_pulllog_record){.registry = "docker.io",
                                          .repository = "library/a",
                                          .tag = "1",
                                          .digest = DG_A,
                                          .time_ms = T0});
    close_log(f);
    open_log(f);
    record(f, &(struct am_pulllog_record){.registry = "docker.io",
                                          .repository = "library/b",
                                          .tag = "1",
                                          .digest = DG_A,
                                          .time_ms = T0});
    close_log(f);
    json_t *lines = lines_of(f, "pulls.jsonl");
    assert_int_equal(json_array_size(lines), 2);
    assert_string_equal(jstr(json_array_get(lines, 1), "repository"), "library/b");
    json_decref(lines);
    finish(f);
}

static void starts_a_new_line_after_half_a_line_left_by_a_crash(void **state)
{
    struct fixture *f = *state;
    char path[4200];
    path_of(f, "pulls.jsonl", path, sizeof path);
    FILE *fp = fopen(path, "w");
    assert_non_null(fp);
    fputs("{\"time\":\"2024-05-01T12:00:00.000Z\"}\n{\"time\":\"2024-05-0", fp);
    fclose(fp);
    open_log(f);
    record(f, &(struct am_pulllog_record){.registry = "docker.io",
                                          .repository = "library/a",
                                          .tag = "1",
                                          .digest = DG_A,
                                          .time_ms = T0});
    close_log(f);
    size_t len;
    char *s = read_file(path, &len);
    assert_non_null(s);
    char *third = strstr(s, "\n{\"time\":\"2024-05-0\n{");
    assert_non_null(third); /* the torn line stays alone on its line */
    assert_non_null(strstr(third, "\"repository\":\"library/a\""));
    assert_int_equal(s[len - 1], '\n');
    free(s);
    finish(f);
}

/* ---- rotation ---- */

static void rotates_by_size_and_keeps_at_most_keep_files(void **state)
{
    struct fixture *f = *state;
    f->opts.rotate_bytes = 700; /* a line here is 312 bytes: two lines per file */
    f->opts.keep_files = 2;
    open_log(f);
    char tag[16];
    for (int i = 0; i < 9; i++) {
        snprintf(tag, sizeof tag, "t%d", i);
        record(f, &(struct am_pulllog_record){.registry = "docker.io",
                                              .repository = "library/a",
                                              .tag = tag,
                                              .digest = DG_A,
                                              .time_ms = T0});
        if (i % 3 == 2) flush(f); /* rotation happens inside and between batches */
    }
    struct am_pulllog_stats s = stats(f);
    assert_int_equal(s.lines_written, 9);
    assert_int_equal(s.rotations, 4);
    close_log(f);

    assert_true(exists(f, "pulls.jsonl.1"));
    assert_true(exists(f, "pulls.jsonl.2"));
    assert_false(exists(f, "pulls.jsonl.3"));
    json_t *cur = lines_of(f, "pulls.jsonl"), *one = lines_of(f, "pulls.jsonl.1"),
           *two = lines_of(f, "pulls.jsonl.2");
    /* Newest first: t8 | t6 t7 | t4 t5; t0..t3 rotated away. */
    assert_int_equal(json_array_size(cur), 1);
    assert_string_equal(jstr(json_array_get(cur, 0), "tag"), "t8");
    assert_int_equal(json_array_size(one), 2);
    assert_string_equal(jstr(json_array_get(one, 0), "tag"), "t6");
    assert_int_equal(json_array_size(two), 2);
    assert_string_equal(jstr(json_array_get(two, 0), "tag"), "t4");
    char path[4200];
    struct stat st;
    const char *names[] = {"pulls.jsonl", "pulls.jsonl.1", "pulls.jsonl.2"};
    for (int i = 0; i < 3; i++) {
        path_of(f, names[i], path, sizeof path);
        assert_int_equal(stat(path, &st), 0);
        assert_true(st.st_size <= 700);
    }
    json_decref(cur);
    json_decref(one);
    json_decref(two);
    finish(f);
}

static void gives_a_line_longer_than_rotate_bytes_a_file_of_its_own(void **state)
{
    struct fixture *f = *state;
    f->opts.rotate_bytes = 10;
    f->opts.keep_files = 5;
    open_log(f);
    for (int i = 0; i < 3; i++)
        record(f, &(struct am_pulllog_record){.registry = "docker.io",
                                              .repository = "library/a",
                                              .tag = "x",
                                              .digest = DG_A,
                                              .time_ms = T0});
    close_log(f);
    for (int i = 0; i < 3; i++) {
        char name[32];
        snprintf(name, sizeof name, i ? "pulls.jsonl.%d" : "pulls.jsonl", i);
        json_t *l = lines_of(f, name);
        assert_non_null(l);
        assert_int_equal(json_array_size(l), 1);
        json_decref(l);
    }
    assert_false(exists(f, "pulls.jsonl.3"));
    finish(f);
}

static void keeps_no_rotated_file_when_keep_files_is_zero(void **state)
{
    struct fixture *f = *state;
    f->opts.rotate_bytes = 10;
    f->opts.keep_files = 0;
    open_log(f);
    for (int i = 0; i < 3; i++)
        record(f, &(struct am_pulllog_record){.registry = "docker.io",
                                              .repository = "library/a",
                                              .tag = "x",
                                              .digest = DG_A,
                                              .time_ms = T0});
    close_log(f);
    json_t *l = lines_of(f, "pulls.jsonl");
    assert_int_equal(json_array_size(l), 1);
    assert_false(exists(f, "pulls.jsonl.1"));
    json_decref(l);
    finish(f);
}

static void removes_rotated_files_beyond_keep_files_at_open(void **state)
{
    struct fixture *f = *state;
    const char *names[] = {"pulls.jsonl.1",  "pulls.jsonl.2", "pulls.jsonl.3",
                           "pulls.jsonl.10", "pulls.jsonl.x", "other.3"};
    char path[4200];
    for (size_t i = 0; i < 6; i++) {
        path_of(f, names[i], path, sizeof path);
        FILE *fp = fopen(path, "w");
        assert_non_null(fp);
        fclose(fp);
    }
    f->opts.keep_files = 2;
    open_log(f);
    assert_true(exists(f, "pulls.jsonl.1"));
    assert_true(exists(f, "pulls.jsonl.2"));
    assert_false(exists(f, "pulls.jsonl.3"));
    assert_false(exists(f, "pulls.jsonl.10"));
    assert_true(exists(f, "pulls.jsonl.x"));
    assert_true(exists(f, "other.3"));
    finish(f);
}

static void keeps_writing_when_rotation_fails(void **state)
{
    struct fixture *f = *state;
    char path[4200], inner[4300];
    /* A non-empty directory where pulls.jsonl.1 should go: rename refuses to replace it. */
    path_of(f, "pulls.jsonl.1", path, sizeof path);
    assert_int_equal(mkdir(path, 0700), 0);
    snprintf(inner, sizeof inner, "%s/x", path);
    FILE *fp = fopen(inner, "w");
    assert_non_null(fp);
    fclose(fp);
    f->opts.rotate_bytes = 10;
    f->opts.keep_files = 1;
    enum am_log_level level = am_log_current_level;
    am_log_set_level(AM_LOG_ERROR); /* the WARN is expected */
    open_log(f);
    for (int i = 0; i < 3; i++)
        record(f, &(struct am_pulllog_record){.registry = "docker.io",
                                              .repository = "library/a",
                                              .tag = "x",
                                              .digest = DG_A,
                                              .time_ms = T0});
    flush(f);
    am_log_set_level(level);
    struct am_pulllog_stats s = stats(f);
    assert_int_equal(s.rotations, 0);
    assert_int_equal(s.lines_written, 3);
    assert_int_equal(s.lines_dropped, 0);
    close_log(f);
    json_t *l = lines_of(f, "pulls.jsonl");
    assert_int_equal(json_array_size(l), 3); /* one oversized file beats lost lines */
    json_decref(l);
    unlink(inner);
    rmdir(path);
    finish(f);
}

/* ---- when writes happen ---- */

static void writes_buffered_records_when_the_flush_interval_elapses(void **state)
{
    struct fixture *f = *state;
    f->opts.flush_interval_ms = 1;
    open_log(f);
    record(f, &(struct am_pulllog_record){
                  .registry = "docker.io", .repository = "library/a", .tag = "1", .digest = DG_A});
    assert_int_equal(stats(f).batches, 0);
    /* The one-shot timer is the only thing left to run; the loop ends after its batch. */
    assert_int_equal(uv_run(&f->loop, UV_RUN_DEFAULT), 0);
    struct am_pulllog_stats s = stats(f);
    assert_int_equal(s.batches, 1);
    assert_int_equal(s.lines_written, 1);
    assert_int_equal(s.aggregated, 1);
    finish(f);
}

static void writes_at_once_past_flush_bytes(void **state)
{
    struct fixture *f = *state;
    f->opts.flush_bytes = 1;
    open_log(f);
    record(f, &(struct am_pulllog_record){
                  .registry = "docker.io", .repository = "library/a", .tag = "1", .digest = DG_A});
    assert_int_equal(uv_run(&f->loop, UV_RUN_DEFAULT), 0);
    assert_int_equal(stats(f).lines_written, 1);
    finish(f);
}

static void writes_records_of_one_loop_turn_in_one_batch(void **state)
{
    struct fixture *f = *state;
    open_log(f);
    for (int i = 0; i < 50; i++)
        record(f,
               &(struct am_pulllog_record){
                   .registry = "docker.io", .repository = "library/a", .tag = "1", .digest = DG_A});
    flush(f);
    struct am_pulllog_stats s = stats(f);
    assert_int_equal(s.batches, 1);
    assert_int_equal(s.lines_written, 50);
    assert_int_equal(s.aggregated, 50);
    finish(f);
}

static void calls_flush_back_from_the_loop_even_when_idle(void **state)
{
    struct fixture *f = *state;
    open_log(f);
    flush(f);
    flush(f);
    finish(f);
}

struct cb_record {
    struct fixture *f;
    int calls;
    int rc;
};

static void flush_cb_records(void *arg)
{
    struct cb_record *c = arg;
    c->calls++;
    c->rc = am_pulllog_record(c->f->pl, &(struct am_pulllog_record){.registry = "docker.io",
                                                                    .repository = "library/b",
                                                                    .tag = "1",
                                                                    .digest = DG_A});
}

static void writes_records_made_from_a_flush_callback_in_a_later_batch(void **state)
{
    struct fixture *f = *state;
    struct cb_record c = {.f = f, .rc = 1};
    f->opts.flush_bytes = 1; /* the callback's record must not wait for the timer */
    open_log(f);
    record(f, &(struct am_pulllog_record){
                  .registry = "docker.io", .repository = "library/a", .tag = "1", .digest = DG_A});
    assert_int_equal(am_pulllog_flush(f->pl, flush_cb_records, &c), 0);
    assert_int_equal(uv_run(&f->loop, UV_RUN_DEFAULT), 0);
    assert_int_equal(c.calls, 1);
    assert_int_equal(c.rc, 0);
    struct am_pulllog_stats s = stats(f);
    assert_int_equal(s.batches, 2);
    assert_int_equal(s.lines_written, 2);
    finish(f);
}

static void runs_flush_callbacks_during_close_and_refuses_their_records(void **state)
{
    struct fixture *f = *state;
    struct cb_record c = {.f = f, .rc = 1};
    open_log(f);
    record(f, &(struct am_pulllog_record){
                  .registry = "docker.io", .repository = "library/a", .tag = "1", .digest = DG_A});
    assert_int_equal(am_pulllog_flush(f->pl, flush_cb_records, &c), 0);
    am_pulllog_close(f->pl, on_closed, f); /* f->pl stays set for the callback */
    assert_int_equal(c.calls, 0);
    assert_int_equal(uv_run(&f->loop, UV_RUN_DEFAULT), 0);
    f->pl = NULL;
    assert_int_equal(c.calls, 1);
    assert_int_equal(c.rc, AM_EUNAVAILABLE);
    assert_int_equal(f->closed, 1);
    json_t *l = lines_of(f, "pulls.jsonl");
    assert_int_equal(json_array_size(l), 1);
    json_decref(l);
    finish(f);
}

static void refuses_records_and_flushes_once_close_has_begun(void **state)
{
    struct fixture *f = *state;
    open_log(f);
    struct am_pulllog *pl = f->pl;
    am_pulllog_close(pl, on_closed, f);
    f->pl = NULL;
    assert_int_equal(am_pulllog_record(pl, &(struct am_pulllog_record){.registry = "docker.io",
                                                                       .repository = "library/a",
                                                                       .tag = "1",
                                                                       .digest = DG_A}),
                     AM_EUNAVAILABLE);
    assert_int_equal(am_pulllog_flush(pl, on_flushed, f), AM_EUNAVAILABLE);
    struct am_buf b;
    am_buf_init(&b, 1024);
    assert_int_equal(am_pulllog_query_pulls(pl, "", 0, T0, &b, NULL, 0), AM_EUNAVAILABLE);
    am_buf_cleanup(&b);
    assert_int_equal(uv_run(&f->loop, UV_RUN_DEFAULT), 0);
    assert_int_equal(f->closed, 1);
    assert_int_equal(f->flushed, 0);
    finish(f);
}

static void refuses_records_beyond_the_buffer_limit(void **state)
{
    struct fixture *f = *state;
    f->opts.max_buffer_bytes = 2000;
    open_log(f);
    int accepted = 0, rc = 0;
    while (accepted < 100) {
        rc = am_pulllog_record(f->pl, &(struct am_pulllog_record){.registry = "docker.io",
                                                                  .repository = "library/a",
                                                                  .tag = "1",
                                                                  .digest = DG_A,
                                                                  .time_ms = T0});
        if (rc) break;
        accepted++;
    }
    assert_int_equal(rc, AM_ETOO_LARGE);
    assert_true(accepted > 0 && accepted < 100);
    assert_int_equal(stats(f).refused, 1);
    flush(f);
    /* Written, the buffer has room again. */
    record(f, &(struct am_pulllog_record){.registry = "docker.io",
                                          .repository = "library/a",
                                          .tag = "1",
                                          .digest = DG_A,
                                          .time_ms = T0});
    flush(f);
    assert_int_equal(stats(f).lines_written, (uint64_t)accepted + 1);
    finish(f);
}

/* ---- aggregates ---- */

static void counts_pulls_and_distinct_nodes_per_platform(void **state)
{
    struct fixture *f = *state;
    open_log(f);
    pull(f, "10.0.0.1:1000", "linux/arm64", "library/nginx", "1.27", T0, NULL, 0);
    pull(f, "10.0.0.1:1001", "linux/arm64/v8", "library/nginx", "1.27", T0 + 5000, NULL, 0);
    pull(f, "10.0.0.2:1000", "linux/aarch64", "library/nginx", "1.27", T0 + 1000, NULL, 0);
    pull(f, "10.0.0.3:1000", "linux/amd64", "library/nginx", "1.27", T0 + 2000, NULL, 0);
    pull(f, "10.0.0.4:1000", "", "library/nginx", "1.27", T0 + 3000, NULL, 0);
    pull(f, "10.0.0.1:1000", "linux/arm64", "library/nginx", "1.26", T0, NULL, 0);
    flush(f);
    /* The second batch adds to the first. */
    struct am_pulllog_record r =
        rec("10.0.0.5:9", "linux/arm64", "library/nginx", "1.27", T0 - 1000);
    r.cache_hit = true;
    r.bytes = 100;
    r.digest = DG_B;
    record(f, &r);
    flush(f);

    json_t *a = query(f, false, "", T0);
    assert_int_equal(json_array_size(json_object_get(a, "pulls")), 4);
    json_t *e = find_pull(a, "docker.io/library/nginx", "1.27", "linux/arm64");
    assert_non_null(e);
    assert_int_equal(jint(e, "pulls"), 4);
    assert_int_equal(jint(e, "nodes"), 3);
    assert_int_equal(jint(e, "cacheHits"), 1);
    assert_int_equal(jint(e, "bytes"), 100);
    assert_int_equal(jint(json_object_get(e, "sources"), "header"), 4);
    assert_string_equal(jstr(e, "firstPull"), "2024-05-01T11:59:59.000Z");
    assert_string_equal(jstr(e, "lastPull"), "2024-05-01T12:00:05.000Z");
    /* The latest digest served is the one of the latest pull, not of the latest record. */
    assert_string_equal(jstr(e, "digest"), DG_A);
    e = find_pull(a, "docker.io/library/nginx", "1.27", "linux/amd64");
    assert_non_null(e);
    assert_int_equal(jint(e, "pulls"), 1);
    assert_int_equal(jint(e, "nodes"), 1);
    e = find_pull(a, "docker.io/library/nginx", "1.27", "unknown");
    assert_non_null(e);
    assert_int_equal(jint(json_object_get(e, "sources"), "unknown"), 1);
    e = find_pull(a, "docker.io/library/nginx", "1.26", "linux/arm64");
    assert_non_null(e);
    /* Sorted by image, tag, platform. */
    json_t *list = json_object_get(a, "pulls");
    assert_string_equal(jstr(json_array_get(list, 0), "tag"), "1.26");
    assert_string_equal(jstr(json_array_get(list, 1), "platform"), "linux/amd64");
    assert_string_equal(jstr(json_array_get(list, 2), "platform"), "linux/arm64");
    assert_string_equal(jstr(json_array_get(list, 3), "platform"), "unknown");
    assert_true(json_is_null(json_object_get(a, "since")));
    assert_true(json_is_false(json_object_get(a, "truncated")));
    json_decref(a);
    finish(f);
}

static void keeps_pulls_by_digest_apart_from_pulls_by_tag(void **state)
{
    struct fixture *f = *state;
    open_log(f);
    pull(f, "10.0.0.1:1", "linux/amd64", "library/a", "1", T0, NULL, 0);
    struct am_pulllog_record r = rec("10.0.0.1:1", "linux/amd64", "library/a", NULL, T0);
    r.digest = DG_B;
    record(f, &r);
    flush(f);
    json_t *a = query(f, false, "", T0);
    assert_int_equal(json_array_size(json_object_get(a, "pulls")), 2);
    json_t *e = find_pull(a, "docker.io/library/a", "", "linux/amd64");
    assert_non_null(e);
    assert_string_equal(jstr(e, "digest"), DG_B);
    json_decref(a);
    a = query(f, false, "image=docker.io/library/a@" DG_B, T0);
    assert_int_equal(json_array_size(json_object_get(a, "pulls")), 1);
    json_decref(a);
    finish(f);
}

static void counts_nodes_exactly_up_to_the_bound_then_estimates(void **state)
{
    struct fixture *f = *state;
    char client[64];
    const unsigned n = 3000;
    open_log(f);
    for (int round = 0; round < 2; round++) {
        for (unsigned i = 0; i < n; i++) {
            snprintf(client, sizeof client, "10.%u.%u.%u:%u", i >> 16, (i >> 8) & 255, i & 255,
                     1000 + round);
            pull(f, client, "linux/arm64", "library/big", "1", T0, NULL, 0);
        }
        flush(f);
    }
    /* Exactly counted below the bound. */
    for (unsigned i = 0; i < 1000; i++) {
        snprintf(client, sizeof client, "192.168.%u.%u:1", i >> 8, i & 255);
        pull(f, client, "linux/amd64", "library/big", "1", T0, NULL, 0);
    }
    flush(f);
    json_t *a = query(f, false, "image=library/big", T0);
    json_t *e = find_pull(a, "docker.io/library/big", "1", "linux/arm64");
    assert_int_equal(jint(e, "pulls"), 2 * n);
    long long nodes = jint(e, "nodes");
    assert_true(nodes >= AM_PULLLOG_NODES_EXACT);
    assert_true(nodes > n * 80 / 100 && nodes < n * 120 / 100);
    e = find_pull(a, "docker.io/library/big", "1", "linux/amd64");
    assert_int_equal(jint(e, "nodes"), 1000);
    json_decref(a);
    finish(f);
}

static void keeps_the_aggregates_across_a_reopen(void **state)
{
    struct fixture *f = *state;
    const char *plats[] = {"linux/amd64"};
    open_log(f);
    pull(f, "10.0.0.1:1", "linux/arm64", "library/a", "1", T0, plats, 1);
    pull(f, "10.0.0.2:1", "linux/arm64", "library/a", "1", T0, plats, 1);
    close_log(f);
    open_log(f);
    pull(f, "10.0.0.1:2", "linux/arm64", "library/a", "1", T0 + 1, NULL, 0);
    flush(f);
    json_t *a = query(f, false, "", T0);
    json_t *e = find_pull(a, "docker.io/library/a", "1", "linux/arm64");
    assert_int_equal(jint(e, "pulls"), 3);
    assert_int_equal(jint(e, "nodes"), 2);
    json_decref(a);
    a = query(f, true, "target=linux/arm64", T0);
    json_t *img = json_array_get(json_object_get(a, "images"), 0);
    assert_string_equal(jstr(img, "image"), "docker.io/library/a:1");
    assert_int_equal(jint(img, "pulls"), 3);
    json_decref(a);
    finish(f);
}

/* ---- /api/v1/pulls filters ---- */

static void seed_filters(struct fixture *f)
{
    pull(f, "10.0.0.1:1", "linux/arm64", "library/nginx", "1.27", T0, NULL, 0);
    pull(f, "10.0.0.2:1", "linux/arm64/v9", "library/nginx", "1.27", T0 - 2 * HOUR_MS, NULL, 0);
    pull(f, "10.0.0.3:1", "linux/amd64", "library/nginx", "1.27-alpine", T0 - 48 * HOUR_MS, NULL,
         0);
    pull(f, "10.0.0.4:1", "linux/arm/v7", "library/redis", "7", T0 - HOUR_MS, NULL, 0);
    struct am_pulllog_record r = rec("10.0.0.5:1", "linux/arm64", "org/nginx-exporter", "2", T0);
    r.registry = "ghcr.io";
    record(f, &r);
    flush(f);
}

static void count_pulls(struct fixture *f, const char *qs, uint64_t now, size_t want)
{
    json_t *a = query(f, false, qs, now);
    size_t got = json_array_size(json_object_get(a, "pulls"));
    if (got != want) {
        char *s = json_dumps(a, 0);
        fail_msg("%s: %zu entries, want %zu: %s", qs, got, want, s);
    }
    json_decref(a);
}

static void filters_pulls_by_architecture_and_platform(void **state)
{
    struct fixture *f = *state;
    open_log(f);
    seed_filters(f);
    count_pulls(f, "", T0, 5);
    count_pulls(f, "arch=arm64", T0, 3); /* linux/arm64 twice and linux/arm64/v9 */
    count_pulls(f, "arch=aarch64", T0, 3);
    count_pulls(f, "arch=amd64", T0, 1);
    count_pulls(f, "arch=arm", T0, 1);
    count_pulls(f, "arch=riscv64", T0, 0);
    count_pulls(f, "platform=linux/arm64/v8", T0, 2);
    count_pulls(f, "platform=linux%2Farm64%2Fv9", T0, 1);
    count_pulls(f, "platform=linux/arm", T0, 1); /* arm means arm/v7 */
    count_pulls(f, "arch=arm64&platform=linux/amd64", T0, 0);
    count_pulls(f, "arch=&image=", T0, 5); /* empty values are no filter */
    finish(f);
}

static void filters_pulls_by_last_pull_time(void **state)
{
    struct fixture *f = *state;
    open_log(f);
    seed_filters(f);
    count_pulls(f, "since=2024-05-01T11:30:00Z", T0, 2);
    count_pulls(f, "since=2024-05-01T13:30:00%2B02:00", T0, 2); /* 11:30Z */
    count_pulls(f, "since=2024-05-01T13:30:00+02:00", T0, 2);   /* '+' is kept */
    count_pulls(f, "since=2024-05-01t09:59:59.999z", T0, 4);
    count_pulls(f, "since=2024-05-01", T0, 4);
    count_pulls(f, "since=1714564800", T0, 2); /* unix seconds = T0 */
    count_pulls(f, "since=0", T0, 5);
    count_pulls(f, "since=90m", T0, 3);
    count_pulls(f, "since=24h", T0, 4);
    count_pulls(f, "since=24h", T0 + 24 * HOUR_MS, 2);
    count_pulls(f, "since=1h30m", T0, 3);
    json_t *a = query(f, false, "since=24h", T0);
    assert_string_equal(jstr(a, "since"), "2024-04-30T12:00:00.000Z");
    json_decref(a);
    finish(f);
}

static void filters_pulls_by_image_substring_or_exact_reference(void **state)
{
    struct fixture *f = *state;
    open_log(f);
    seed_filters(f);
    count_pulls(f, "image=nginx", T0, 4);
    count_pulls(f, "image=docker.io/library/nginx", T0, 3);
    count_pulls(f, "image=ghcr.io/", T0, 1);
    count_pulls(f, "image=nginx:1.27", T0, 2); /* exact: not 1.27-alpine */
    count_pulls(f, "image=docker.io/library/nginx:1.27-alpine", T0, 1);
    count_pulls(f, "image=ghcr.io/org/nginx-exporter:2", T0, 1);
    count_pulls(f, "image=redis:6", T0, 0);
    count_pulls(f, "image=nginx&arch=arm64&since=1h", T0, 2); /* and nginx-exporter */
    count_pulls(f, "image=library/nginx&arch=arm64&since=1h", T0, 1);
    finish(f);
}

static void refuses_bad_query_parameters_with_a_reason(void **state)
{
    struct fixture *f = *state;
    char msg[256];
    open_log(f);
    struct {
        bool readiness;
        const char *qs;
        const char *reason;
    } cases[] = {
        {false, "since=yesterday", "since: cannot parse \"yesterday\""},
        {false, "since=2024-13-01T00:00:00Z", "since:"},
        {false, "since=2024-02-30", "since:"},
        {false, "since=2024-05-01T12:00:00", "since:"}, /* no offset */
        {false, "since=-5", "since:"},
        {false, "arch=linux", "arch:"},
        {false, "arch=linux/arm64", "platform="},
        {false, "platform=linux", "platform:"},
        {false, "image=Nginx:1.0", "image:"},
        {false, "target=linux/arm64", "unknown query parameter \"target\""},
        {false, "arch=arm64&arch=amd64", "arch: given more than once"},
        {false, "since=%zz", "since:"},
        {false, "since=%00", "since:"},
        {true, "", "target: required"},
        {true, "target=", "target: required"},
        {true, "target=linux", "target:"},
        {true, "target=linux/arm64&arch=arm64", "unknown query parameter \"arch\""},
        {true, "target=linux/arm64&since=soon", "since:"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        msg[0] = '\0';
        int rc = query_fails(f, cases[i].readiness, cases[i].qs, msg, sizeof msg);
        if (rc != AM_EBAD_REQUEST) fail_msg("%s: %s", cases[i].qs, am_error_name(rc));
        if (!strstr(msg, cases[i].reason))
            fail_msg("%s: reason \"%s\" lacks \"%s\"", cases[i].qs, msg, cases[i].reason);
    }
    finish(f);
}

static void checks_a_query_without_a_store(void **state)
{
    struct fixture *f = *state;
    struct am_buf b;
    char msg[128] = "";
    am_buf_init(&b, 1024);
    assert_int_equal(am_pulllog_query_pulls(NULL, "since=x", 7, T0, &b, msg, sizeof msg),
                     AM_EBAD_REQUEST);
    assert_non_null(strstr(msg, "since:"));
    assert_int_equal(am_pulllog_query_pulls(NULL, "since=1h", 8, T0, &b, NULL, 0), AM_EUNAVAILABLE);
    assert_int_equal(am_pulllog_query_readiness(NULL, "target=arm64", 12, T0, &b, NULL, 0),
                     AM_EUNAVAILABLE);
    assert_int_equal(b.len, 0);
    am_buf_cleanup(&b);
    finish(f);
}

/* ---- /api/v1/readiness ---- */

static void seed_readiness(struct fixture *f)
{
    const char *amd64[] = {"linux/amd64"};
    const char *multi[] = {"linux/amd64", "linux/arm64"};
    const char *armv7[] = {"linux/arm/v7"};
    const char *i386[] = {"linux/386"};
    const char *arm64v9[] = {"linux/arm64/v9"};
    for (int i = 0; i < 3; i++)
        pull(f, "10.0.0.1:1", "linux/amd64", "library/amd", "1", T0, amd64, 1);
    pull(f, "10.0.0.2:1", "linux/amd64", "library/amd", "1", T0, NULL, 0); /* platforms kept */
    pull(f, "10.0.0.1:1", "linux/amd64", "library/multi", "1", T0, multi, 2);
    pull(f, "10.0.0.1:1", "linux/amd64", "library/armv7", "1", T0, armv7, 1);
    pull(f, "10.0.0.1:1", "linux/amd64", "library/armv7", "1", T0, armv7, 1);
    pull(f, "10.0.0.1:1", "linux/amd64", "library/i386", "1", T0 - 48 * HOUR_MS, i386, 1);
    pull(f, "10.0.0.1:1", "linux/amd64", "library/v9", "1", T0, arm64v9, 1);
    pull(f, "10.0.0.1:1", "linux/amd64", "library/mystery", "1", T0, NULL, 0);
    pull(f, "10.0.0.2:1", "", "library/mystery", "1", T0, NULL, 0);
    flush(f);
}

static void lists_images_without_a_variant_for_the_target(void **state)
{
    struct fixture *f = *state;
    char list[512];
    open_log(f);
    seed_readiness(f);

    /* arm64 nodes run arm/v7 images (containerd: arm64 accepts arm/v8…v5), not amd64, 386
     * or arm64/v9 (a v9 image needs a v9 node). */
    json_t *a = query(f, true, "target=linux/arm64", T0);
    assert_string_equal(jstr(a, "target"), "linux/arm64");
    images_of(a, "images", list, sizeof list);
    assert_string_equal(list, "docker.io/library/amd:1 docker.io/library/i386:1 "
                              "docker.io/library/v9:1");
    images_of(a, "unknown", list, sizeof list);
    assert_string_equal(list, "docker.io/library/mystery:1");
    json_t *img = json_array_get(json_object_get(a, "images"), 0);
    assert_int_equal(jint(img, "pulls"), 4);
    assert_int_equal(jint(img, "nodes"), 2);
    assert_string_equal(jstr(img, "tag"), "1");
    assert_string_equal(jstr(img, "digest"), DG_A);
    assert_string_equal(jstr(img, "lastPull"), "2024-05-01T12:00:00.000Z");
    json_t *plats = json_object_get(img, "platforms");
    assert_int_equal(json_array_size(plats), 1);
    assert_string_equal(json_string_value(json_array_get(plats, 0)), "linux/amd64");
    json_t *unk = json_array_get(json_object_get(a, "unknown"), 0);
    assert_int_equal(jint(unk, "pulls"), 2);
    assert_int_equal(jint(unk, "nodes"), 2);
    assert_int_equal(json_array_size(json_object_get(unk, "platforms")), 0);
    json_decref(a);

    /* An arm/v7 node runs neither arm64 nor amd64. */
    a = query(f, true, "target=linux/arm/v7", T0);
    images_of(a, "images", list, sizeof list);
    assert_string_equal(list, "docker.io/library/amd:1 docker.io/library/i386:1 "
                              "docker.io/library/multi:1 docker.io/library/v9:1");
    json_decref(a);

    /* amd64 nodes run 386. */
    a = query(f, true, "target=amd64", T0);
    assert_string_equal(jstr(a, "target"), "linux/amd64");
    images_of(a, "images", list, sizeof list);
    assert_string_equal(list, "docker.io/library/armv7:1 docker.io/library/v9:1");
    json_decref(a);

    /* A v9 node runs everything arm64 and arm. */
    a = query(f, true, "target=linux/arm64/v9", T0);
    images_of(a, "images", list, sizeof list);
    assert_string_equal(list, "docker.io/library/amd:1 docker.io/library/i386:1");
    json_decref(a);
    finish(f);
}

static void limits_readiness_to_the_window_and_the_image(void **state)
{
    struct fixture *f = *state;
    char list[512];
    open_log(f);
    seed_readiness(f);
    json_t *a = query(f, true, "target=linux/arm64&since=24h", T0);
    images_of(a, "images", list, sizeof list);
    assert_string_equal(list, "docker.io/library/amd:1 docker.io/library/v9:1");
    assert_string_equal(jstr(a, "since"), "2024-04-30T12:00:00.000Z");
    json_decref(a);
    a = query(f, true, "target=linux/arm64&image=amd", T0);
    images_of(a, "images", list, sizeof list);
    assert_string_equal(list, "docker.io/library/amd:1");
    images_of(a, "unknown", list, sizeof list);
    assert_string_equal(list, "");
    json_decref(a);
    finish(f);
}

static void keeps_the_latest_known_platforms_of_an_image(void **state)
{
    struct fixture *f = *state;
    const char *amd64[] = {"linux/amd64"};
    const char *multi[] = {"linux/amd64", "linux/arm64"};
    char list[256];
    open_log(f);
    pull(f, "10.0.0.1:1", "linux/amd64", "library/a", "1", T0, amd64, 1);
    flush(f);
    json_t *a = query(f, true, "target=linux/arm64", T0);
    images_of(a, "images", list, sizeof list);
    assert_string_equal(list, "docker.io/library/a:1");
    json_decref(a);
    /* The tag became multi-arch; an older record does not undo that. */
    pull(f, "10.0.0.1:1", "linux/amd64", "library/a", "1", T0 + 10, multi, 2);
    pull(f, "10.0.0.1:1", "linux/amd64", "library/a", "1", T0 + 5, amd64, 1);
    pull(f, "10.0.0.1:1", "linux/amd64", "library/a", "1", T0 + 20, NULL, 0);
    flush(f);
    a = query(f, true, "target=linux/arm64", T0);
    images_of(a, "images", list, sizeof list);
    assert_string_equal(list, "");
    json_decref(a);
    finish(f);
}

/* ---- failing disks ---- */

static void refuses_a_directory_not_even_root_can_write(void **state)
{
    struct fixture *f = *state;
    char msg[256] = "";
    struct stat st;
    if (stat("/sys/kernel", &st) != 0 || !S_ISDIR(st.st_mode)) {
        assert_int_equal(uv_loop_close(&f->loop), 0);
        skip();
    }
    f->opts.dir = "/sys/kernel";
    assert_int_equal(am_pulllog_open(&f->loop, &f->opts, &f->pl, msg, sizeof msg),
                     AM_ESTORE_READONLY);
    assert_null(f->pl);
    assert_non_null(strstr(msg, "/sys/kernel/pulls.jsonl"));
    f->opts.dir = "/sys/archmirror-test/pulls";
    assert_int_equal(am_pulllog_open(&f->loop, &f->opts, &f->pl, msg, sizeof msg),
                     AM_ESTORE_READONLY);
    assert_non_null(strstr(msg, "cannot create"));
    finish(f);
}

static void refuses_bad_options(void **state)
{
    struct fixture *f = *state;
    char msg[256] = "";
    struct am_pulllog_opts o = f->opts;
    o.dir = "";
    assert_int_equal(am_pulllog_open(&f->loop, &o, &f->pl, msg, sizeof msg), AM_EINVAL);
    o.dir = NULL;
    assert_int_equal(am_pulllog_open(&f->loop, &o, &f->pl, NULL, 0), AM_EINVAL);
    o = f->opts;
    o.keep_files = 1000000;
    assert_int_equal(am_pulllog_open(&f->loop, &o, &f->pl, msg, sizeof msg), AM_EINVAL);
    assert_null(f->pl);
    finish(f);
}

/* Runs fn with stderr redirected to a file; returns what was written. */
static char *capture_stderr_begin(int *saved, char *path, size_t pathlen, const struct fixture *f)
{
    snprintf(path, pathlen, "%s/stderr.txt", f->dir);
    fflush(stderr);
    *saved = dup(2);
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    assert_true(fd >= 0 && *saved >= 0);
    dup2(fd, 2);
    close(fd);
    return path;
}

static char *capture_stderr_end(int saved, const char *path)
{
    size_t len;
    fflush(stderr);
    dup2(saved, 2);
    close(saved);
    char *s = read_file(path, &len);
    unlink(path);
    return s;
}

static size_t count_substr(const char *s, const char *needle)
{
    size_t n = 0;
    for (const char *p = s; (p = strstr(p, needle)) != NULL; p++) n++;
    return n;
}

static void drops_and_counts_lines_when_the_disk_is_full(void **state)
{
    struct fixture *f = *state;
    char path[4200], errpath[4200];
    int saved;
    path_of(f, "pulls.jsonl", path, sizeof path);
    /* /dev/full fails every write with ENOSPC. */
    assert_int_equal(symlink("/dev/full", path), 0);
    enum am_log_level level = am_log_current_level;
    am_log_set_level(AM_LOG_WARN);
    capture_stderr_begin(&saved, errpath, sizeof errpath, f);
    open_log(f);
    for (int round = 0; round < 3; round++) {
        pull(f, "10.0.0.1:1", "linux/arm64", "library/a", "1", T0, NULL, 0);
        pull(f, "10.0.0.2:1", "linux/arm64", "library/a", "1", T0, NULL, 0);
        flush(f);
    }
    char *err = capture_stderr_end(saved, errpath);
    am_log_set_level(level);
    struct am_pulllog_stats s = stats(f);
    assert_int_equal(s.lines_written, 0);
    assert_int_equal(s.lines_dropped, 6);
    assert_int_equal(s.aggregated, 6); /* the aggregates do not depend on the file */
    assert_non_null(err);
    assert_int_equal(count_substr(err, "pulls.jsonl: writing failed: No space left on device"), 1);
    free(err);
    json_t *a = query(f, false, "", T0);
    json_t *e = find_pull(a, "docker.io/library/a", "1", "linux/arm64");
    assert_int_equal(jint(e, "pulls"), 6);
    assert_int_equal(jint(e, "nodes"), 2);
    json_decref(a);
    finish(f);
}

static void drops_and_counts_aggregates_when_the_map_is_full(void **state)
{
    struct fixture *f = *state;
    char repo[64];
    f->opts.map_bytes = (uint64_t)256 << 10;
    enum am_log_level level = am_log_current_level;
    am_log_set_level(AM_LOG_ERROR); /* the WARN is expected */
    open_log(f);
    int round;
    for (round = 0; round < 50 && stats(f).aggregates_dropped == 0; round++) {
        for (int i = 0; i < 10; i++) {
            snprintf(repo, sizeof repo, "library/r%d-%d", round, i);
            pull(f, "10.0.0.1:1", "linux/arm64", repo, "1", T0, NULL, 0);
        }
        flush(f);
    }
    am_log_set_level(level);
    struct am_pulllog_stats s = stats(f);
    assert_true(s.aggregated > 0);
    assert_true(s.aggregates_dropped > 0);
    assert_int_equal(s.aggregated + s.aggregates_dropped, (uint64_t)round * 10);
    assert_int_equal(s.lines_written, (uint64_t)round * 10); /* the file does not depend on LMDB */
    /* What committed is still served. */
    json_t *a = query(f, false, "image=library/r0-0", T0);
    assert_int_equal(json_array_size(json_object_get(a, "pulls")), 1);
    json_decref(a);
    finish(f);
}

/* ---- over HTTP ---- */

struct http_fx {
    uv_loop_t *loop;
    struct fixture *f;
    struct am_httpserver *srv;
    int port;
    uv_async_t async;
    uv_thread_t thread;
    bool drained;
    /* client side: raw responses */
    char resp[8][16384];
    int n;
};

static void http_handler(void *ctx, struct am_http_exchange *ex)
{
    struct http_fx *h = ctx;
    if (am_pulllog_handle(h->f->pl, ex)) return;
    am_http_respond(ex, 404, NULL, NULL, 0, "no\n", 3);
}

static int http_get(int port, const char *request, char *out, size_t outlen)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) return -1;
    struct timeval tv = {30, 0}; /* a hang guard, not a synchronisation */
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    struct sockaddr_in sin = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, (struct sockaddr *)&sin, sizeof sin) != 0) {
        close(fd);
        return -1;
    }
    size_t n = strlen(request), off = 0;
    while (off < n) {
        ssize_t w = send(fd, request + off, n - off, MSG_NOSIGNAL);
        if (w <= 0) break;
        off += (size_t)w;
    }
    size_t got = 0;
    for (;;) {
        ssize_t r = recv(fd, out + got, outlen - 1 - got, 0);
        if (r <= 0) break;
        got += (size_t)r;
        if (got == outlen - 1) break;
    }
    out[got] = '\0';
    close(fd);
    return 0;
}

static const char *const http_requests[] = {
    "GET /api/v1/pulls?arch=arm64 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    "GET /api/v1/readiness?target=linux%2Farm64 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    "GET /api/v1/readiness HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    "POST /api/v1/pulls HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    "HEAD /api/v1/pulls HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    "GET /api/v1/other HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
};
#define N_HTTP_REQUESTS (sizeof http_requests / sizeof http_requests[0])

static void http_client(void *arg)
{
    struct http_fx *h = arg;
    for (size_t i = 0; i < N_HTTP_REQUESTS; i++) {
        if (http_get(h->port, http_requests[i], h->resp[i], sizeof h->resp[i]) != 0) break;
        h->n++;
    }
    uv_async_send(&h->async);
}

static void on_http_drained(void *arg)
{
    struct http_fx *h = arg;
    h->drained = true;
}

static void on_client_done(uv_async_t *a)
{
    struct http_fx *h = a->data;
    uv_close((uv_handle_t *)&h->async, NULL);
    am_httpserver_drain(h->srv, on_http_drained, h);
}

/* The body after the head of a raw response. */
static const char *body_of(const char *resp)
{
    const char *p = strstr(resp, "\r\n\r\n");
    return p ? p + 4 : "";
}

static void serves_pulls_and_readiness_over_http(void **state)
{
    struct fixture *f = *state;
    const char *amd64[] = {"linux/amd64"};
    struct http_fx *h = calloc(1, sizeof *h);
    char msg[128];
    assert_non_null(h);
    h->f = f;
    open_log(f);
    /* Recorded, never flushed: the handler flushes before it reads. */
    pull(f, "10.0.0.1:1", "linux/arm64", "library/a", "1", T0, amd64, 1);
    pull(f, "10.0.0.2:1", "linux/amd64", "library/a", "1", T0, amd64, 1);

    struct am_httpserver_opts so = {.max_connections = 10, .drain_timeout_ms = 10000};
    assert_int_equal(am_httpserver_new(&f->loop, &so, http_handler, h, &h->srv), 0);
    assert_int_equal(am_httpserver_listen(h->srv, "127.0.0.1:0", msg, sizeof msg), 0);
    h->port = am_httpserver_port(h->srv, 0);
    assert_int_equal(uv_async_init(&f->loop, &h->async, on_client_done), 0);
    h->async.data = h;
    assert_int_equal(uv_thread_create(&h->thread, http_client, h), 0);
    assert_int_equal(uv_run(&f->loop, UV_RUN_DEFAULT), 0);
    assert_int_equal(uv_thread_join(&h->thread), 0);
    assert_true(h->drained);
    am_httpserver_free(h->srv);
    assert_int_equal(h->n, (int)N_HTTP_REQUESTS);

    /* 0: /pulls?arch=arm64 */
    assert_non_null(strstr(h->resp[0], "HTTP/1.1 200 "));
    assert_non_null(strstr(h->resp[0], "Content-Type: application/json"));
    json_error_t jerr;
    json_t *a = json_loads(body_of(h->resp[0]), 0, &jerr);
    assert_non_null(a);
    assert_int_equal(json_array_size(json_object_get(a, "pulls")), 1);
    json_t *e = find_pull(a, "docker.io/library/a", "1", "linux/arm64");
    assert_non_null(e);
    assert_int_equal(jint(e, "pulls"), 1);
    json_decref(a);
    /* 1: /readiness?target=linux/arm64 */
    assert_non_null(strstr(h->resp[1], "HTTP/1.1 200 "));
    a = json_loads(body_of(h->resp[1]), 0, &jerr);
    assert_non_null(a);
    assert_string_equal(jstr(a, "target"), "linux/arm64");
    json_t *img = json_array_get(json_object_get(a, "images"), 0);
    assert_string_equal(jstr(img, "image"), "docker.io/library/a:1");
    assert_int_equal(jint(img, "pulls"), 2);
    assert_int_equal(jint(img, "nodes"), 2);
    json_decref(a);
    /* 2: no target */
    assert_non_null(strstr(h->resp[2], "HTTP/1.1 400 "));
    a = json_loads(body_of(h->resp[2]), 0, &jerr);
    assert_non_null(a);
    json_t *err = json_object_get(a, "error");
    assert_string_equal(jstr(err, "code"), "BAD_REQUEST");
    assert_non_null(strstr(jstr(err, "message"), "target: required"));
    json_decref(a);
    /* 3: POST */
    assert_non_null(strstr(h->resp[3], "HTTP/1.1 405 "));
    assert_non_null(strstr(h->resp[3], "Allow: GET, HEAD"));
    /* 4: HEAD: a head with the length of the body it would have sent */
    assert_non_null(strstr(h->resp[4], "HTTP/1.1 200 "));
    assert_string_equal(body_of(h->resp[4]), "");
    /* 5: not the pull log's */
    assert_non_null(strstr(h->resp[5], "HTTP/1.1 404 "));
    free(h);
    finish(f);
}

static void gone_handler(void *ctx, struct am_http_exchange *ex)
{
    (void)ctx;
    if (!am_pulllog_handle(NULL, ex)) am_http_respond(ex, 404, NULL, NULL, 0, NULL, 0);
}

static void answers_503_when_the_pull_log_is_not_open(void **state)
{
    struct fixture *f = *state;
    struct http_fx *h = calloc(1, sizeof *h);
    char msg[128];
    assert_non_null(h);
    h->f = f;
    struct am_httpserver_opts so = {.max_connections = 10};
    assert_int_equal(am_httpserver_new(&f->loop, &so, gone_handler, h, &h->srv), 0);
    assert_int_equal(am_httpserver_listen(h->srv, "127.0.0.1:0", msg, sizeof msg), 0);
    h->port = am_httpserver_port(h->srv, 0);
    assert_int_equal(uv_async_init(&f->loop, &h->async, on_client_done), 0);
    h->async.data = h;
    assert_int_equal(uv_thread_create(&h->thread, http_client, h), 0);
    assert_int_equal(uv_run(&f->loop, UV_RUN_DEFAULT), 0);
    assert_int_equal(uv_thread_join(&h->thread), 0);
    am_httpserver_free(h->srv);
    assert_non_null(strstr(h->resp[0], "HTTP/1.1 503 "));
    assert_non_null(strstr(body_of(h->resp[0]), "\"code\":\"UNAVAILABLE\""));
    assert_non_null(strstr(h->resp[3], "HTTP/1.1 405 "));
    assert_non_null(strstr(h->resp[5], "HTTP/1.1 404 "));
    free(h);
    finish(f);
}

int main(void)
{
    am_log_set_level(AM_LOG_ERROR);
#define T(name) cmocka_unit_test_setup_teardown(name, setup, teardown)
    const struct CMUnitTest tests[] = {
        T(records_a_json_line_with_every_field),
        T(writes_empty_strings_for_what_a_pull_by_digest_lacks),
        T(normalises_platforms_and_deduplicates_image_platforms),
        T(refuses_invalid_records_and_counts_them),
        T(appends_to_the_file_of_an_earlier_run),
        T(starts_a_new_line_after_half_a_line_left_by_a_crash),
        T(rotates_by_size_and_keeps_at_most_keep_files),
        T(gives_a_line_longer_than_rotate_bytes_a_file_of_its_own),
        T(keeps_no_rotated_file_when_keep_files_is_zero),
        T(removes_rotated_files_beyond_keep_files_at_open),
        T(keeps_writing_when_rotation_fails),
        T(writes_buffered_records_when_the_flush_interval_elapses),
        T(writes_at_once_past_flush_bytes),
        T(writes_records_of_one_loop_turn_in_one_batch),
        T(calls_flush_back_from_the_loop_even_when_idle),
        T(writes_records_made_from_a_flush_callback_in_a_later_batch),
        T(runs_flush_callbacks_during_close_and_refuses_their_records),
        T(refuses_records_and_flushes_once_close_has_begun),
        T(refuses_records_beyond_the_buffer_limit),
        T(counts_pulls_and_distinct_nodes_per_platform),
        T(keeps_pulls_by_digest_apart_from_pulls_by_tag),
        T(counts_nodes_exactly_up_to_the_bound_then_estimates),
        T(keeps_the_aggregates_across_a_reopen),
        T(filters_pulls_by_architecture_and_platform),
        T(filters_pulls_by_last_pull_time),
        T(filters_pulls_by_image_substring_or_exact_reference),
        T(refuses_bad_query_parameters_with_a_reason),
        T(checks_a_query_without_a_store),
        T(lists_images_without_a_variant_for_the_target),
        T(limits_readiness_to_the_window_and_the_image),
        T(keeps_the_latest_known_platforms_of_an_image),
        T(refuses_a_directory_not_even_root_can_write),
        T(refuses_bad_options),
        T(drops_and_counts_lines_when_the_disk_is_full),
        T(drops_and_counts_aggregates_when_the_map_is_full),
        T(serves_pulls_and_readiness_over_http),
        T(answers_503_when_the_pull_log_is_not_open),
    };
#undef T
    return cmocka_run_group_tests(tests, NULL, NULL);
}

/*
 * test_config — src/config.c: defaults, the size and duration grammars, the loader's
 * problem reports (paths, types, bounds, unknown keys, malformed JSON), upstream list
 * replacement, credentials, validation, command-line overrides, the dump, and the
 * agreement of conf/archmirror.json and conf/README.md with the schema table.
 *
 * Files live in a mkdtemp directory under $AM_TEST_TMP (removed at the end). The source
 * tree is $AM_SOURCE_DIR, or derived from this file's path when that is unset.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <ftw.h>
#include <limits.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>
#include <jansson.h>

#include "archmirror/config.h"
#include "archmirror/error.h"
#include "archmirror/log.h"

/* cmocka's test signature passes a state pointer that these tests do not use (the
 * project builds with -Wno-unused-parameter; this keeps a plain -Wextra build working). */
#pragma GCC diagnostic ignored "-Wunused-parameter"

static char tmpdir[1024]; /* short enough that every path built from it fits PATH_MAX */

/* ---- helpers --------------------------------------------------------------------------- */

static int mkdir_p(const char *path)
{
    char tmp[PATH_MAX];
    snprintf(tmp, sizeof tmp, "%s", path);
    for (char *p = tmp + 1; *p; p++) {
        if (*p != '/') continue;
        *p = '\0';
        if (mkdir(tmp, 0755) != 0 && errno != EEXIST) return -1;
        *p = '/';
    }
    return mkdir(tmp, 0755) != 0 && errno != EEXIST ? -1 : 0;
}

static int setup_group(void **state)
{
    const char *base = getenv("AM_TEST_TMP");
    if (!base || !*base) base = "/tmp";
    if (mkdir_p(base) != 0) return -1;
    if (snprintf(tmpdir, sizeof tmpdir, "%s/config-XXXXXX", base) >= (int)sizeof tmpdir) return -1;
    return mkdtemp(tmpdir) ? 0 : -1;
}

static int remove_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st;
    (void)flag;
    (void)ftw;
    return remove(path);
}

static int teardown_group(void **state)
{
    return nftw(tmpdir, remove_entry, 16, FTW_DEPTH | FTW_PHYS);
}

/* Writes content to tmpdir/name; returns the path in a static buffer (one at a time). */
static const char *write_file(const char *name, const char *content, mode_t mode)
{
    static char path[PATH_MAX];
    snprintf(path, sizeof path, "%s/%s", tmpdir, name);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    assert_int_equal(fputs(content, f) >= 0, 1);
    assert_int_equal(fclose(f), 0);
    assert_int_equal(chmod(path, mode), 0);
    return path;
}

/* Defaults, then json over them. */
static int load(struct am_config *cfg, const char *json, struct am_config_report *r)
{
    assert_int_equal(am_config_init_defaults(cfg), 0);
    return am_config_load_string(cfg, json, r);
}

static void print_report(const struct am_config_report *r)
{
    print_error("the report has %zu problem(s):\n", r->total);
    for (size_t i = 0; i < r->n; i++)
        print_error("  %s: %s\n", r->problems[i].path, r->problems[i].message);
}

/* Whether r has a problem at exactly path whose message contains text. */
static bool has_problem(const struct am_config_report *r, const char *path, const char *text)
{
    for (size_t i = 0; i < r->n; i++)
        if (strcmp(r->problems[i].path, path) == 0 && strstr(r->problems[i].message, text))
            return true;
    print_error("expected a problem at %s containing \"%s\"\n", path, text);
    print_report(r);
    return false;
}
#define assert_problem(r, path, text) assert_true(has_problem((r), (path), (text)))

/* Loads json over the defaults, expects AM_ECONFIG with one problem at path containing
 * text, and cleans up. */
static void expect_one_problem(const char *json, const char *path, const char *text)
{
    struct am_config cfg;
    struct am_config_report r;
    int rc = load(&cfg, json, &r);
    if (rc != AM_ECONFIG || r.total != 1) {
        print_error("loading %s\n", json);
        print_report(&r);
    }
    assert_int_equal(rc, AM_ECONFIG);
    assert_int_equal(r.total, 1);
    assert_problem(&r, path, text);
    am_config_cleanup(&cfg);
}

/* Loads json over the defaults, expects the load to pass and validation to report one
 * problem at path containing text. */
static void expect_invalid(const char *json, const char *path, const char *text)
{
    struct am_config cfg;
    struct am_config_report r;
    assert_int_equal(am_config_init_defaults(&cfg), 0);
    int rc = am_config_load_string(&cfg, json, &r);
    if (rc == 0) rc = am_config_validate(&cfg, &r);
    if (rc != AM_ECONFIG || r.total != 1) {
        print_error("loading and validating %s\n", json);
        print_report(&r);
    }
    assert_int_equal(rc, AM_ECONFIG);
    assert_int_equal(r.total, 1);
    assert_problem(&r, path, text);
    am_config_cleanup(&cfg);
}

/* Loads json over the defaults and expects both the load and validation to pass. */
static void expect_valid(const char *json)
{
    struct am_config cfg;
    struct am_config_report r;
    int rc = load(&cfg, json, &r);
    if (rc == 0) rc = am_config_validate(&cfg, &r);
    if (rc != 0) {
        print_error("loading and validating %s\n", json);
        print_report(&r);
    }
    assert_int_equal(rc, 0);
    am_config_cleanup(&cfg);
}

static const char *source_dir(void)
{
    static char dir[PATH_MAX];
    const char *env = getenv("AM_SOURCE_DIR");
    if (env && *env) return env;
    /* __FILE__ is ".../tests/unit/test_config.c" in a CMake build. */
    snprintf(dir, sizeof dir, "%s", __FILE__);
    char *cut = strstr(dir, "/tests/unit/test_config.c");
    if (cut)
        *cut = '\0';
    else
        snprintf(dir, sizeof dir, ".");
    return dir;
}

static char *read_whole(const char *path)
{
    FILE *f = fopen(path, "r");
    if (!f) {
        print_error("cannot open %s: %s\n", path, strerror(errno));
        return NULL;
    }
    char *data = NULL;
    size_t len = 0;
    char chunk[4096];
    size_t got;
    while ((got = fread(chunk, 1, sizeof chunk, f)) > 0) {
        char *p = realloc(data, len + got + 1);
        assert_non_null(p);
        data = p;
        memcpy(data + len, chunk, got);
        len += got;
        data[len] = '\0';
    }
    fclose(f);
    return data ? data : strdup("");
}

/* ---- defaults ---------------------------------------------------------------------- */

static void defaults_hold_the_documented_values(void **state)
{
    struct am_config cfg;
    assert_int_equal(am_config_init_defaults(&cfg), 0);
    assert_int_equal(cfg.n_listen, 1);
    assert_string_equal(cfg.listen[0], "127.0.0.1:5000");
    assert_string_equal(cfg.data_dir, "./var/archmirror");
    assert_int_equal(cfg.log_level, AM_LOG_INFO);
    assert_string_equal(cfg.default_upstream, "docker.io");
    assert_int_equal(cfg.max_connections, 4096);
    assert_int_equal(cfg.max_header_bytes, 16 * 1024);
    assert_int_equal(cfg.max_headers, 64);
    assert_int_equal(cfg.header_timeout_ms, 10000);
    assert_int_equal(cfg.idle_timeout_ms, 60000);
    assert_int_equal(cfg.drain_timeout_ms, 10000);
    assert_int_equal(cfg.upstream_connect_timeout_ms, 5000);
    assert_int_equal(cfg.upstream_header_timeout_ms, 30000);
    assert_int_equal(cfg.upstream_idle_timeout_ms, 30000);
    assert_int_equal(cfg.upstream_pool_size, 16);
    assert_int_equal(cfg.max_redirects, 5);
    assert_false(cfg.allow_private_redirects);
    assert_int_equal(cfg.tag_freshness_ms, 5 * 60 * 1000);
    assert_int_equal(cfg.max_manifest_bytes, 4 * 1024 * 1024);
    assert_int_equal(cfg.metastore_map_bytes, 1024ull * 1024 * 1024);
    assert_false(cfg.listen_overridden);
    assert_false(cfg.upstreams_overridden);
    am_config_cleanup(&cfg);
}

static void defaults_list_the_six_public_upstreams_in_order(void **state)
{
    static const char *const want[][2] = {
        {"docker.io", "https://registry-1.docker.io"},
        {"ghcr.io", "https://ghcr.io"},
        {"quay.io", "https://quay.io"},
        {"registry.k8s.io", "https://registry.k8s.io"},
        {"public.ecr.aws", "https://public.ecr.aws"},
        {"mcr.microsoft.com", "https://mcr.microsoft.com"},
    };
    struct am_config cfg;
    assert_int_equal(am_config_init_defaults(&cfg), 0);
    assert_int_equal(cfg.n_upstreams, 6);
    for (size_t i = 0; i < 6; i++) {
        assert_string_equal(cfg.upstreams[i].name, want[i][0]);
        assert_string_equal(cfg.upstreams[i].url, want[i][1]);
        assert_null(cfg.upstreams[i].ca_file);
        assert_false(cfg.upstreams[i].insecure);
        assert_null(cfg.upstreams[i].username);
        assert_null(cfg.upstreams[i].password);
    }
    am_config_cleanup(&cfg);
}

static void defaults_pass_validation(void **state)
{
    struct am_config cfg;
    struct am_config_report r = {0};
    assert_int_equal(am_config_init_defaults(&cfg), 0);
    int rc = am_config_validate(&cfg, &r);
    if (rc) print_report(&r);
    assert_int_equal(rc, 0);
    assert_int_equal(r.total, 0);
    am_config_cleanup(&cfg);
}

static void reads_the_diagnostics_mode_and_the_pull_log_section(void **state)
{
    struct am_config cfg;
    struct am_config_report r;
    assert_int_equal(load(&cfg,
                          "{\"diagnostics\": \"enforce\", \"pull_log\": "
                          "{\"dir\": \"/tmp/p\", \"keep_files\": 3}}",
                          &r),
                     0);
    assert_int_equal(cfg.diagnostics, AM_DIAG_ENFORCE);
    assert_string_equal(cfg.pulllog_dir, "/tmp/p");
    assert_int_equal(cfg.pulllog_keep_files, 3);
    assert_true(cfg.pulllog_enabled);
    am_config_cleanup(&cfg);
    assert_int_equal(am_config_parse_diagnostics("off"), AM_DIAG_OFF);
    assert_int_equal(am_config_parse_diagnostics("Warn"), AM_EINVAL);
    expect_one_problem("{\"diagnostics\": \"block\"}", "$.diagnostics", "off, warn or enforce");
    expect_one_problem("{\"diagnostics\": 2}", "$.diagnostics", "one of");
    expect_invalid("{\"cache\": {\"evict_low_watermark\": 96}}", "$.cache.evict_low_watermark",
                   "above evict_high_watermark");
}

static void empty_object_changes_nothing(void **state)
{
    struct am_config cfg, def;
    struct am_config_report r;
    assert_int_equal(load(&cfg, "{}", &r), 0);
    assert_int_equal(r.total, 0);
    assert_int_equal(am_config_init_defaults(&def), 0);
    char *a = am_config_dump(&cfg), *b = am_config_dump(&def);
    assert_non_null(a);
    assert_non_null(b);
    assert_string_equal(a, b);
    free(a);
    free(b);
    am_config_cleanup(&cfg);
    am_config_cleanup(&def);
}

/* ---- sizes and durations ----------------------------------------------------------- */

static void size_parser_accepts_every_unit_and_plain_bytes(void **state)
{
    static const struct {
        const char *s;
        uint64_t v;
    } cases[] = {
        {"0", 0},
        {"1048576", 1048576},
        {"512B", 512},
        {"1KB", 1000},
        {"10MB", 10000000},
        {"1GB", 1000000000},
        {"2TB", 2000000000000ull},
        {"512KiB", 512 * 1024},
        {"64MiB", 64ull * 1024 * 1024},
        {"1GiB", 1024ull * 1024 * 1024},
        {"1TiB", 1024ull * 1024 * 1024 * 1024},
        {"007KiB", 7 * 1024},
        {"18446744073709551615", UINT64_MAX},
        {"16777215TiB", 16777215ull << 40},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        uint64_t v = 12345;
        if (am_config_parse_size(cases[i].s, &v) != 0) print_error("rejected %s\n", cases[i].s);
        assert_int_equal(am_config_parse_size(cases[i].s, &v), 0);
        assert_int_equal(v, cases[i].v);
    }
}

static void size_parser_rejects_malformed_sizes(void **state)
{
    static const char *const bad[] = {
        "",
        "MiB",
        "64 MiB",
        "64mib",
        "64mb",
        "1.5GiB",
        "1,5GiB",
        "-1",
        "+5",
        "0x10",
        "64MiBs",
        " 64",
        "64 ",
        "64k",
        "64KIB",
        "1e3",
        "18446744073709551616",
        "16777216TiB",
        "64MiB\n",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        uint64_t v = 777;
        if (am_config_parse_size(bad[i], &v) != AM_EINVAL) print_error("accepted \"%s\"\n", bad[i]);
        assert_int_equal(am_config_parse_size(bad[i], &v), AM_EINVAL);
        assert_int_equal(v, 777); /* untouched on failure */
    }
}

static void duration_parser_accepts_every_form(void **state)
{
    static const struct {
        const char *s;
        uint64_t ms;
    } cases[] = {
        {"0", 0},          {"0s", 0},       {"500ms", 500},         {"30s", 30000},
        {"5m", 300000},    {"1h", 3600000}, {"2h30m", 9000000},     {"1m30s", 90000},
        {"1s500ms", 1500}, {"90s", 90000},  {"1h2m3s4ms", 3723004}, {"48h", 172800000},
        {"0h0m0s1ms", 1},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        uint64_t v = 12345;
        if (am_config_parse_duration_ms(cases[i].s, &v) != 0)
            print_error("rejected %s\n", cases[i].s);
        assert_int_equal(am_config_parse_duration_ms(cases[i].s, &v), 0);
        assert_int_equal(v, cases[i].ms);
    }
}

static void duration_parser_rejects_malformed_durations(void **state)
{
    static const char *const bad[] = {
        "",
        "30",
        "1.5h",
        "30S",
        "1s2h",
        "1h1h",
        "-1s",
        " 1s",
        "1s ",
        "1d",
        "ms",
        "h",
        "1m s",
        "5mss",
        "1us",
        "1ns",
        "1hm",
        "00",
        "30sec",
        "1H",
        "5min",
        "999999999999999999999h",
        "5124095576030432h",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        uint64_t v = 777;
        if (am_config_parse_duration_ms(bad[i], &v) != AM_EINVAL)
            print_error("accepted \"%s\"\n", bad[i]);
        assert_int_equal(am_config_parse_duration_ms(bad[i], &v), AM_EINVAL);
        assert_int_equal(v, 777);
    }
}

static void loader_accepts_integer_bytes_for_sizes_and_zero_for_durations(void **state)
{
    struct am_config cfg;
    struct am_config_report r;
    int rc = load(&cfg,
                  "{\"server\": {\"max_header_bytes\": 2048, \"drain_timeout\": 0},"
                  " \"cache\": {\"max_manifest_size\": \"10MB\", \"tag_freshness\": \"0\","
                  " \"metastore_map_size\": \"2GiB\"},"
                  " \"upstream_client\": {\"connect_timeout\": \"1s500ms\"}}",
                  &r);
    if (rc) print_report(&r);
    assert_int_equal(rc, 0);
    assert_int_equal(cfg.max_header_bytes, 2048);
    assert_int_equal(cfg.drain_timeout_ms, 0);
    assert_int_equal(cfg.max_manifest_bytes, 10000000);
    assert_int_equal(cfg.tag_freshness_ms, 0);
    assert_int_equal(cfg.metastore_map_bytes, 2ull << 30);
    assert_int_equal(cfg.upstream_connect_timeout_ms, 1500);
    am_config_cleanup(&cfg);
}

static void loader_rejects_plain_integer_durations_other_than_zero(void **state)
{
    expect_one_problem("{\"server\": {\"idle_timeout\": 30}}", "$.server.idle_timeout",
                       "write \"30s\" or \"30ms\"");
    expect_one_problem("{\"server\": {\"idle_timeout\": \"30\"}}", "$.server.idle_timeout",
                       "needs a unit");
}

static void size_and_duration_errors_name_the_path_and_the_accepted_forms(void **state)
{
    expect_one_problem("{\"cache\": {\"max_manifest_size\": \"4mb\"}}", "$.cache.max_manifest_size",
                       "unknown unit: use B, KB, MB");
    expect_one_problem("{\"cache\": {\"max_manifest_size\": \"1.5MiB\"}}",
                       "$.cache.max_manifest_size", "whole number");
    expect_one_problem("{\"cache\": {\"max_manifest_size\": -1}}", "$.cache.max_manifest_size",
                       "must not be negative");
    expect_one_problem("{\"cache\": {\"tag_freshness\": \"5 m\"}}", "$.cache.tag_freshness",
                       "unknown unit: use h, m, s or ms");
    expect_one_problem("{\"cache\": {\"tag_freshness\": \"30s5m\"}}", "$.cache.tag_freshness",
                       "largest to smallest");
    expect_one_problem("{\"cache\": {\"tag_freshness\": 1.5}}", "$.cache.tag_freshness",
                       "expected a duration string");
}

/* ---- unknown keys, types, collection --------------------------------------------- */

static void unknown_key_is_reported_with_its_json_path(void **state)
{
    expect_one_problem("{\"server\": {\"max_conections\": 10}}", "$.server.max_conections",
                       "unknown key (did you mean \"max_connections\"?)");
    expect_one_problem("{\"frobnicate\": true}", "$.frobnicate", "unknown key");
}

static void unknown_top_level_key_suggests_the_section_it_belongs_to(void **state)
{
    expect_one_problem("{\"max_connections\": 10}", "$.max_connections",
                       "did you mean $.server.max_connections?");
}

static void unknown_key_inside_an_upstream_is_reported_with_its_index(void **state)
{
    expect_one_problem("{\"upstreams\": [{\"name\": \"a.io\", \"url\": \"https://a.io\"},"
                       " {\"name\": \"b.io\", \"url\": \"https://b.io\", \"passwd\": \"x\"}]}",
                       "$.upstreams[1].passwd", "unknown key");
}

static void type_errors_name_the_path_and_the_expected_type(void **state)
{
    expect_one_problem("{\"server\": {\"max_connections\": \"4096\"}}", "$.server.max_connections",
                       "expected an integer, got a string (\"4096\")");
    expect_one_problem("{\"server\": {\"max_connections\": 40.5}}", "$.server.max_connections",
                       "expected an integer, got a number with a fraction");
    expect_one_problem("{\"upstream_client\": {\"allow_private_redirects\": \"yes\"}}",
                       "$.upstream_client.allow_private_redirects", "expected true or false");
    expect_one_problem("{\"data_dir\": 5}", "$.data_dir", "expected a string, got an integer");
    expect_one_problem("{\"data_dir\": null}", "$.data_dir", "expected a string, got null");
    expect_one_problem("{\"server\": []}", "$.server", "expected an object, got an array");
    expect_one_problem("{\"listen\": \"127.0.0.1:5000\"}", "$.listen",
                       "expected an array of \"host:port\" strings");
    expect_one_problem("{\"listen\": [5000]}", "$.listen[0]",
                       "expected a \"host:port\" string, got an integer");
    expect_one_problem("{\"upstreams\": {\"name\": \"a.io\"}}", "$.upstreams",
                       "expected an array of upstream objects");
    expect_one_problem("{\"upstreams\": [\"a.io\"]}", "$.upstreams[0]",
                       "expected an upstream object");
    expect_one_problem("{\"log_level\": 3}", "$.log_level", "expected one of \"error\"");
    expect_one_problem("{\"log_level\": \"verbose\"}", "$.log_level",
                       "unknown log level \"verbose\"");
    expect_one_problem("{\"data_dir\": \"\"}", "$.data_dir", "must not be empty");
    expect_one_problem("{\"upstreams\": [{\"name\": \"a.io\", \"url\": \"https://a.io\","
                       " \"ca_file\": \"\"}]}",
                       "$.upstreams[0].ca_file", "use null to leave it unset");
}

static void every_problem_is_collected_with_its_path(void **state)
{
    struct am_config cfg;
    struct am_config_report r;
    assert_int_equal(load(&cfg,
                          "{\"server\": {\"max_conections\": 1, \"max_headers\": 2,"
                          " \"idle_timeout\": \"soon\"},"
                          " \"log_level\": \"loud\", \"cahce\": {},"
                          " \"listen\": [\"localhost:5000\"],"
                          " \"upstreams\": [{\"name\": \"Docker.io\", \"url\": \"ftp://x\"},"
                          " {\"url\": \"https://b.io\"}]}",
                          &r),
                     AM_ECONFIG);
    assert_int_equal(r.total, 9);
    assert_int_equal(r.n, 9);
    assert_problem(&r, "$.server.max_conections", "unknown key");
    assert_problem(&r, "$.server.max_headers", "2 is out of range: allowed 8 to 1024");
    assert_problem(&r, "$.server.idle_timeout", "duration \"soon\"");
    assert_problem(&r, "$.log_level", "unknown log level");
    assert_problem(&r, "$.cahce", "did you mean \"cache\"?");
    assert_problem(&r, "$.listen[0]", "not an IPv4 address");
    assert_problem(&r, "$.upstreams[0].name", "is not a registry host");
    assert_problem(&r, "$.upstreams[0].url", "must start with http:// or https://");
    assert_problem(&r, "$.upstreams[1]", "missing required key \"name\"");
    am_config_cleanup(&cfg);
}

static void report_counts_problems_beyond_its_capacity(void **state)
{
    char json[2048] = "{";
    for (int i = 0; i < 40; i++) {
        char k[32];
        snprintf(k, sizeof k, "%s\"unknown_%d\": 1", i ? ", " : "", i);
        strcat(json, k);
    }
    strcat(json, "}");
    struct am_config cfg;
    struct am_config_report r;
    assert_int_equal(load(&cfg, json, &r), AM_ECONFIG);
    assert_int_equal(r.total, 40);
    assert_int_equal(r.n, 32);
    assert_string_equal(r.problems[0].path, "$.unknown_0");
    assert_string_equal(r.problems[31].path, "$.unknown_31");
    am_config_cleanup(&cfg);
}

static void load_resets_the_report_and_validate_appends_to_it(void **state)
{
    struct am_config cfg;
    struct am_config_report r;
    memset(&r, 0x5a, sizeof r); /* garbage: load must not trust it */
    assert_int_equal(load(&cfg, "{\"default_upstream\": \"nowhere.io\"}", &r), 0);
    assert_int_equal(r.total, 0);
    assert_int_equal(r.n, 0);
    r.total = r.n = 1;
    snprintf(r.problems[0].path, sizeof r.problems[0].path, "$.earlier");
    assert_int_equal(am_config_validate(&cfg, &r), AM_ECONFIG);
    assert_int_equal(r.total, 2);
    assert_string_equal(r.problems[0].path, "$.earlier");
    assert_problem(&r, "$.default_upstream", "\"nowhere.io\" is not one of the upstreams");
    am_config_cleanup(&cfg);
}

static void control_bytes_in_keys_are_not_echoed_raw(void **state)
{
    expect_one_problem("{\"a\\u0007\\nb\": 1}", "$.a??b", "unknown key");
}

/* ---- malformed JSON ---------------------------------------------------------------- */

static void malformed_json_reports_line_and_column(void **state)
{
    expect_one_problem("{\n  \"listen\": [\"127.0.0.1:5000\",\n}\n", "$",
                       "invalid JSON at line 3, column 1");
    expect_one_problem("{\"data_dir\": \"x\" \"log_level\": \"info\"}", "$",
                       "invalid JSON at line 1, column ");
}

static void empty_document_is_malformed_json(void **state)
{
    expect_one_problem("", "$", "invalid JSON at line 1");
}

static void duplicate_json_keys_are_rejected(void **state)
{
    expect_one_problem("{\"server\": {\"max_headers\": 10, \"max_headers\": 20}}", "$",
                       "duplicate object key");
}

static void top_level_must_be_an_object(void **state)
{
    expect_one_problem("[{\"listen\": []}]", "$", "expected an object {…} at the top level");
}

/* ---- bounds ------------------------------------------------------------------------ */

static void values_outside_their_bounds_are_rejected_with_the_allowed_range(void **state)
{
    expect_one_problem("{\"server\": {\"max_connections\": 0}}", "$.server.max_connections",
                       "0 is out of range: allowed 1 to 1000000");
    expect_one_problem("{\"server\": {\"max_connections\": 1000001}}", "$.server.max_connections",
                       "allowed 1 to 1000000");
    expect_one_problem("{\"server\": {\"max_header_bytes\": \"512B\"}}",
                       "$.server.max_header_bytes", "512B is out of range: allowed 1KiB to 1MiB");
    expect_one_problem("{\"server\": {\"max_header_bytes\": \"2MiB\"}}",
                       "$.server.max_header_bytes", "2MiB is out of range");
    expect_one_problem("{\"server\": {\"max_headers\": 4}}", "$.server.max_headers",
                       "allowed 8 to 1024");
    expect_one_problem("{\"server\": {\"header_timeout\": \"2h\"}}", "$.server.header_timeout",
                       "2h is out of range: allowed 10ms to 1h");
    expect_one_problem("{\"server\": {\"header_timeout\": 0}}", "$.server.header_timeout",
                       "0s is out of range");
    expect_one_problem("{\"upstream_client\": {\"max_redirects\": 21}}",
                       "$.upstream_client.max_redirects", "allowed 0 to 20");
    expect_one_problem("{\"server\": {\"max_headers\": -3}}", "$.server.max_headers",
                       "must not be negative");
    expect_valid("{\"server\": {\"max_connections\": 1, \"max_header_bytes\": \"1MiB\","
                 " \"max_headers\": 1024, \"header_timeout\": \"10ms\"},"
                 " \"upstream_client\": {\"pool_size\": 0, \"max_redirects\": 0}}");
}

static void validate_rechecks_values_set_by_code(void **state)
{
    struct am_config cfg;
    struct am_config_report r = {0};
    assert_int_equal(am_config_init_defaults(&cfg), 0);
    cfg.max_headers = 2;
    cfg.log_level = 9;
    cfg.upstream_idle_timeout_ms = 0;
    assert_int_equal(am_config_validate(&cfg, &r), AM_ECONFIG);
    assert_int_equal(r.total, 3);
    assert_problem(&r, "$.server.max_headers", "2 is out of range");
    assert_problem(&r, "$.upstream_client.idle_timeout", "0s is out of range");
    assert_problem(&r, "$.log_level", "9 is not a log level");
    am_config_cleanup(&cfg);
}

/* ---- upstreams --------------------------------------------------------------------- */

static void upstreams_array_replaces_the_default_list(void **state)
{
    struct am_config cfg;
    struct am_config_report r;
    int rc =
        load(&cfg,
             "{\"upstreams\": [{\"name\": \"localhost:5001\", \"url\": \"http://127.0.0.1:5001\","
             " \"insecure\": true}, {\"name\": \"docker.io\", \"url\": "
             "\"https://mirror.example.com/\"}]}",
             &r);
    if (rc) print_report(&r);
    assert_int_equal(rc, 0);
    assert_int_equal(cfg.n_upstreams, 2);
    assert_string_equal(cfg.upstreams[0].name, "localhost:5001");
    assert_string_equal(cfg.upstreams[0].url, "http://127.0.0.1:5001");
    assert_true(cfg.upstreams[0].insecure);
    assert_string_equal(cfg.upstreams[1].name, "docker.io");
    assert_string_equal(cfg.upstreams[1].url, "https://mirror.example.com"); /* '/' dropped */
    assert_false(cfg.upstreams[1].insecure);
    assert_null(am_config_find_upstream(&cfg, "ghcr.io", 7));
    /* docker.io is still an upstream, so it stays the default. */
    assert_string_equal(cfg.default_upstream, "docker.io");
    am_config_cleanup(&cfg);
}

static void default_upstream_becomes_the_first_upstream_when_the_old_one_is_gone(void **state)
{
    struct am_config cfg;
    struct am_config_report r;
    assert_int_equal(load(&cfg,
                          "{\"upstreams\": [{\"name\": \"quay.io\", \"url\": \"https://quay.io\"},"
                          " {\"name\": \"ghcr.io\", \"url\": \"https://ghcr.io\"}]}",
                          &r),
                     0);
    assert_string_equal(cfg.default_upstream, "quay.io");
    am_config_cleanup(&cfg);

    /* An explicit default is kept, wherever it sits in the document. */
    assert_int_equal(
        load(&cfg,
             "{\"default_upstream\": \"ghcr.io\", \"upstreams\": [{\"name\": \"quay.io\","
             " \"url\": \"https://quay.io\"}, {\"name\": \"ghcr.io\", \"url\": "
             "\"https://ghcr.io\"}]}",
             &r),
        0);
    assert_string_equal(cfg.default_upstream, "ghcr.io");
    am_config_cleanup(&cfg);
}

static void default_upstream_must_name_an_upstream(void **state)
{
    expect_invalid("{\"default_upstream\": \"example.com\"}", "$.default_upstream",
                   "\"example.com\" is not one of the upstreams (docker.io, ghcr.io, quay.io");
    expect_invalid("{\"default_upstream\": \"docker.io\", \"upstreams\": [{\"name\": \"quay.io\","
                   " \"url\": \"https://quay.io\"}]}",
                   "$.default_upstream", "\"docker.io\" is not one of the upstreams (quay.io)");
    expect_valid("{\"default_upstream\": \"quay.io\"}");
}

static void upstream_without_name_or_url_is_reported(void **state)
{
    struct am_config cfg;
    struct am_config_report r;
    assert_int_equal(
        load(&cfg, "{\"upstreams\": [{\"name\": \"a.io\"}, {\"url\": \"https://b.io\"}, {}]}", &r),
        AM_ECONFIG);
    assert_int_equal(r.total, 4);
    assert_problem(&r, "$.upstreams[0]", "missing required key \"url\"");
    assert_problem(&r, "$.upstreams[1]", "missing required key \"name\"");
    assert_problem(&r, "$.upstreams[2]", "missing required key \"name\"");
    assert_problem(&r, "$.upstreams[2]", "missing required key \"url\"");
    am_config_cleanup(&cfg);
}

static void upstream_list_must_have_one_to_sixty_four_entries(void **state)
{
    expect_one_problem("{\"upstreams\": []}", "$.upstreams", "lists 0 upstreams: give 1 to 64");
    char json[16384] = "{\"upstreams\": [";
    for (int i = 0; i < 65; i++) {
        char u[96];
        snprintf(u, sizeof u, "%s{\"name\": \"r%d.io\", \"url\": \"https://r%d.io\"}", i ? "," : "",
                 i, i);
        strcat(json, u);
    }
    strcat(json, "]}");
    expect_one_problem(json, "$.upstreams", "lists 65 upstreams: give 1 to 64");
}

static void a_failed_list_leaves_the_previous_list_in_place(void **state)
{
    struct am_config cfg;
    struct am_config_report r;
    assert_int_equal(load(&cfg,
                          "{\"upstreams\": [{\"name\": \"a.io\", \"url\": \"https://a.io\"},"
                          " {\"name\": \"b.io\"}], \"listen\": [\"127.0.0.1:1\", 7]}",
                          &r),
                     AM_ECONFIG);
    assert_int_equal(cfg.n_upstreams, 6);
    assert_string_equal(cfg.upstreams[0].name, "docker.io");
    assert_int_equal(cfg.n_listen, 1);
    assert_string_equal(cfg.listen[0], "127.0.0.1:5000");
    am_config_cleanup(&cfg);
}

static void bad_upstream_urls_are_rejected(void **state)
{
    static const struct {
        const char *url, *why;
    } cases[] = {
        {"ftp://a.io", "must start with http:// or https://"},
        {"a.io", "must start with http:// or https://"},
        {"HTTPS://a.io", "must start with http:// or https://"},
        {"https://", "has no host"},
        {"https:///v2", "has no host"},
        {"https://a.io/v2", "must not have a path"},
        {"https://a.io//", "must not have a path"},
        {"https://a.io?x=1", "must not have a path, query or fragment"},
        {"https://a.io#top", "must not have a path, query or fragment"},
        {"https://user:pw@a.io", "must not contain credentials"},
        {"https://A.io", "has an invalid host"},
        {"https://a.io:0", "has an invalid host"},
        {"https://a.io:65536", "has an invalid host"},
        {"https://a.io:", "has an invalid host"},
        {"https://a..io", "has an invalid host"},
        {"https://a io", "has an invalid host"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char json[256];
        snprintf(json, sizeof json, "{\"upstreams\": [{\"name\": \"a.io\", \"url\": \"%s\"}]}",
                 cases[i].url);
        expect_one_problem(json, "$.upstreams[0].url", cases[i].why);
    }
}

static void good_upstream_urls_are_accepted(void **state)
{
    expect_valid("{\"upstreams\": [{\"name\": \"a.io\", \"url\": \"https://a.io\"},"
                 " {\"name\": \"localhost:5001\", \"url\": \"http://127.0.0.1:5001/\"},"
                 " {\"name\": \"c.io\", \"url\": \"https://[::1]:8443\"},"
                 " {\"name\": \"d.io\", \"url\": \"http://registry.local:65535\"}]}");
}

static void duplicate_upstream_names_are_rejected(void **state)
{
    expect_one_problem("{\"upstreams\": [{\"name\": \"a.io\", \"url\": \"https://a.io\"},"
                       " {\"name\": \"b.io\", \"url\": \"https://b.io\"},"
                       " {\"name\": \"a.io\", \"url\": \"https://c.io\"}]}",
                       "$.upstreams[2].name", "\"a.io\" is already the name of $.upstreams[0]");
}

static void upstream_names_must_be_lowercase_registry_hosts(void **state)
{
    static const char *const bad[] = {"Docker.io", "docker io",  "a.io/x",      "-a.io",
                                      "a.io:0",    "a.io:99999", "https://a.io"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char json[256];
        snprintf(json, sizeof json,
                 "{\"upstreams\": [{\"name\": \"%s\", \"url\": \"https://a.io\"}]}", bad[i]);
        expect_one_problem(json, "$.upstreams[0].name", "is not a registry host");
    }
    expect_valid(
        "{\"upstreams\": [{\"name\": \"localhost:5000\", \"url\": \"http://127.0.0.1:5000\"},"
        " {\"name\": \"10.0.0.1:443\", \"url\": \"https://10.0.0.1\"}]}");
}

/* ---- listen ------------------------------------------------------------------------ */

static void listen_addresses_must_be_ip_literals_with_a_port(void **state)
{
    static const struct {
        const char *addr, *why;
    } cases[] = {
        {"localhost:5000", "not an IPv4 address"},
        {"127.0.0.1", "needs a port"},
        {":5000", "has no host"},
        {"127.0.0.1:", "invalid port"},
        {"127.0.0.1:65536", "invalid port"},
        {"127.0.0.1:50a", "invalid port"},
        {"127.0.0.1:-1", "invalid port"},
        {"256.0.0.1:80", "not an IPv4 address"},
        {"::1:5000", "without brackets"},
        {"[::1]", "must be \"[IPv6]:port\""},
        {"[::1:5000", "must be \"[IPv6]:port\""},
        {"[127.0.0.1]:80", "not an IPv6 address"},
        {"[]:80", "has no host"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char json[256];
        snprintf(json, sizeof json, "{\"listen\": [\"%s\"]}", cases[i].addr);
        expect_one_problem(json, "$.listen[0]", cases[i].why);
    }
    expect_valid(
        "{\"listen\": [\"127.0.0.1:0\", \"0.0.0.0:65535\", \"[::1]:5000\", \"[::]:5000\"]}");
    expect_one_problem("{\"listen\": []}", "$.listen", "lists 0 addresses: give 1 to 8");
}

static void duplicate_listen_addresses_are_rejected(void **state)
{
    expect_one_problem("{\"listen\": [\"127.0.0.1:5000\", \"[::1]:5000\", \"127.0.0.1:5000\"]}",
                       "$.listen[2]", "\"127.0.0.1:5000\" is already $.listen[0]");
}

/* ---- CA files ---------------------------------------------------------------------- */

static void ca_file_must_exist_and_be_readable(void **state)
{
    char json[PATH_MAX + 256];
    const char *ca = write_file("ca.pem", "-----BEGIN CERTIFICATE-----\n", 0644);
    snprintf(
        json, sizeof json,
        "{\"upstreams\": [{\"name\": \"a.io\", \"url\": \"https://a.io\", \"ca_file\": \"%s\"}]}",
        ca);
    expect_valid(json);

    snprintf(json, sizeof json,
             "{\"upstreams\": [{\"name\": \"a.io\", \"url\": \"https://a.io\", \"ca_file\": "
             "\"%s/missing.pem\"}]}",
             tmpdir);
    expect_one_problem(json, "$.upstreams[0].ca_file", "No such file or directory");

    snprintf(
        json, sizeof json,
        "{\"upstreams\": [{\"name\": \"a.io\", \"url\": \"https://a.io\", \"ca_file\": \"%s\"}]}",
        tmpdir);
    expect_one_problem(json, "$.upstreams[0].ca_file", "not a regular file");

    if (geteuid() != 0) { /* root reads any file: the case only exists for other users */
        ca = write_file("secret-ca.pem", "x", 0000);
        snprintf(json, sizeof json,
                 "{\"upstreams\": [{\"name\": \"a.io\", \"url\": \"https://a.io\", \"ca_file\": "
                 "\"%s\"}]}",
                 ca);
        expect_one_problem(json, "$.upstreams[0].ca_file", "Permission denied");
    }
}

static void ca_file_needs_an_https_url(void **state)
{
    char json[PATH_MAX + 256];
    const char *ca = write_file("ca-http.pem", "pem", 0644);
    snprintf(
        json, sizeof json,
        "{\"upstreams\": [{\"name\": \"a.io\", \"url\": \"http://a.io\", \"ca_file\": \"%s\"}]}",
        ca);
    expect_one_problem(json, "$.upstreams[0].ca_file", "only used with an https:// url");
}

static void validate_notices_a_ca_file_removed_after_loading(void **state)
{
    char json[PATH_MAX + 256];
    struct am_config cfg;
    struct am_config_report r;
    const char *ca = write_file("ca-gone.pem", "pem", 0644);
    snprintf(
        json, sizeof json,
        "{\"upstreams\": [{\"name\": \"a.io\", \"url\": \"https://a.io\", \"ca_file\": \"%s\"}]}",
        ca);
    assert_int_equal(load(&cfg, json, &r), 0);
    assert_int_equal(unlink(ca), 0);
    assert_int_equal(am_config_validate(&cfg, &r), AM_ECONFIG);
    assert_problem(&r, "$.upstreams[0].ca_file", "cannot read CA file");
    am_config_cleanup(&cfg);
}

/* ---- credentials ------------------------------------------------------------------- */

static void password_file_is_read_with_trailing_newlines_removed(void **state)
{
    char json[PATH_MAX + 256];
    struct am_config cfg;
    struct am_config_report r;
    const char *pw = write_file("pw", "s3cr=t pass\r\n\n", 0600);
    snprintf(
        json, sizeof json,
        "{\"upstreams\": [{\"name\": \"a.io\", \"url\": \"https://a.io\", \"username\": \"bob\","
        " \"password_file\": \"%s\", \"password\": null, \"password_env\": null}]}",
        pw);
    int rc = load(&cfg, json, &r);
    if (rc == 0) rc = am_config_validate(&cfg, &r);
    if (rc) print_report(&r);
    assert_int_equal(rc, 0);
    assert_string_equal(cfg.upstreams[0].username, "bob");
    assert_string_equal(cfg.upstreams[0].password, "s3cr=t pass");
    am_config_cleanup(&cfg);
}

static void unusable_password_files_are_reported(void **state)
{
    static const struct {
        const char *name, *content, *why;
    } cases[] = {
        {"pw-empty", "\n", "is empty"},
        {"pw-lines", "one\ntwo\n", "must hold one line"},
    };
    char json[PATH_MAX + 256];
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const char *pw = write_file(cases[i].name, cases[i].content, 0600);
        snprintf(json, sizeof json,
                 "{\"upstreams\": [{\"name\": \"a.io\", \"url\": \"https://a.io\", \"username\": "
                 "\"bob\","
                 " \"password_file\": \"%s\"}]}",
                 pw);
        expect_one_problem(json, "$.upstreams[0].password_file", cases[i].why);
    }
    char big[5000];
    memset(big, 'x', sizeof big - 1);
    big[sizeof big - 1] = '\0';
    const char *pw = write_file("pw-big", big, 0600);
    snprintf(
        json, sizeof json,
        "{\"upstreams\": [{\"name\": \"a.io\", \"url\": \"https://a.io\", \"username\": \"bob\","
        " \"password_file\": \"%s\"}]}",
        pw);
    expect_one_problem(json, "$.upstreams[0].password_file", "larger than 4KiB");
    snprintf(
        json, sizeof json,
        "{\"upstreams\": [{\"name\": \"a.io\", \"url\": \"https://a.io\", \"username\": \"bob\","
        " \"password_file\": \"%s/no-such-file\"}]}",
        tmpdir);
    expect_one_problem(json, "$.upstreams[0].password_file",
                       "cannot open: No such file or directory");
}

static void password_env_is_read_from_the_environment(void **state)
{
    struct am_config cfg;
    struct am_config_report r;
    assert_int_equal(setenv("AM_TEST_CONFIG_PASSWORD", "from-env", 1), 0);
    int rc = load(
        &cfg,
        "{\"upstreams\": [{\"name\": \"a.io\", \"url\": \"https://a.io\", \"username\": \"bob\","
        " \"password_env\": \"AM_TEST_CONFIG_PASSWORD\"}]}",
        &r);
    unsetenv("AM_TEST_CONFIG_PASSWORD");
    if (rc) print_report(&r);
    assert_int_equal(rc, 0);
    assert_string_equal(cfg.upstreams[0].password, "from-env");
    am_config_cleanup(&cfg);
}

static void unusable_password_env_is_reported(void **state)
{
    unsetenv("AM_TEST_CONFIG_UNSET");
    expect_one_problem(
        "{\"upstreams\": [{\"name\": \"a.io\", \"url\": \"https://a.io\", \"username\": \"u\","
        " \"password_env\": \"AM_TEST_CONFIG_UNSET\"}]}",
        "$.upstreams[0].password_env", "environment variable AM_TEST_CONFIG_UNSET is not set");
    assert_int_equal(setenv("AM_TEST_CONFIG_EMPTY", "", 1), 0);
    expect_one_problem(
        "{\"upstreams\": [{\"name\": \"a.io\", \"url\": \"https://a.io\", \"username\": \"u\","
        " \"password_env\": \"AM_TEST_CONFIG_EMPTY\"}]}",
        "$.upstreams[0].password_env", "is empty");
    unsetenv("AM_TEST_CONFIG_EMPTY");
    expect_one_problem(
        "{\"upstreams\": [{\"name\": \"a.io\", \"url\": \"https://a.io\", \"username\": \"u\","
        " \"password_env\": \"NOT-A-NAME\"}]}",
        "$.upstreams[0].password_env", "is not an environment variable name");
}

static void only_one_password_source_is_allowed(void **state)
{
    assert_int_equal(setenv("AM_TEST_CONFIG_PASSWORD2", "x", 1), 0);
    expect_one_problem(
        "{\"upstreams\": [{\"name\": \"a.io\", \"url\": \"https://a.io\", \"username\": \"u\","
        " \"password\": \"p\", \"password_env\": \"AM_TEST_CONFIG_PASSWORD2\"}]}",
        "$.upstreams[0]", "set only one of password, password_file and password_env");
    unsetenv("AM_TEST_CONFIG_PASSWORD2");
}

static void username_and_password_go_together(void **state)
{
    expect_one_problem(
        "{\"upstreams\": [{\"name\": \"a.io\", \"url\": \"https://a.io\", \"username\": \"u\"}]}",
        "$.upstreams[0]", "username is set without a password");
    expect_one_problem(
        "{\"upstreams\": [{\"name\": \"a.io\", \"url\": \"https://a.io\", \"password\": \"p\"}]}",
        "$.upstreams[0]", "a password is set without a username");
    expect_valid(
        "{\"upstreams\": [{\"name\": \"a.io\", \"url\": \"https://a.io\", \"username\": \"u\","
        " \"password\": \"p\"}]}");
}

static void type_errors_never_echo_a_password(void **state)
{
    struct am_config cfg;
    struct am_config_report r;
    assert_int_equal(
        load(&cfg,
             "{\"upstreams\": [{\"name\": \"a.io\", \"url\": \"https://a.io\", \"username\": \"u\","
             " \"password\": 918273645}]}",
             &r),
        AM_ECONFIG);
    assert_problem(&r, "$.upstreams[0].password", "expected a string or null, got an integer");
    for (size_t i = 0; i < r.n; i++) assert_null(strstr(r.problems[i].message, "918273645"));
    am_config_cleanup(&cfg);
}

/* ---- dump -------------------------------------------------------------------------- */

static void dump_never_prints_passwords(void **state)
{
    struct am_config cfg;
    struct am_config_report r;
    char json[PATH_MAX + 512];
    const char *pw = write_file("pw-dump", "file-secret-42\n", 0600);
    assert_int_equal(setenv("AM_TEST_CONFIG_DUMP", "env-secret-43", 1), 0);
    snprintf(json, sizeof json,
             "{\"upstreams\": ["
             "{\"name\": \"a.io\", \"url\": \"https://a.io\", \"username\": \"alice\", "
             "\"password\": \"inline-secret-41\"},"
             "{\"name\": \"b.io\", \"url\": \"https://b.io\", \"username\": \"bob\", "
             "\"password_file\": \"%s\"},"
             "{\"name\": \"c.io\", \"url\": \"https://c.io\", \"username\": \"carol\", "
             "\"password_env\": \"AM_TEST_CONFIG_DUMP\"},"
             "{\"name\": \"d.io\", \"url\": \"https://d.io\"}]}",
             pw);
    int rc = load(&cfg, json, &r);
    unsetenv("AM_TEST_CONFIG_DUMP");
    if (rc) print_report(&r);
    assert_int_equal(rc, 0);
    char *out = am_config_dump(&cfg);
    assert_non_null(out);
    assert_null(strstr(out, "secret-4"));
    assert_null(strstr(out, "password_file"));
    assert_null(strstr(out, "password_env"));

    json_error_t jerr;
    json_t *root = json_loads(out, 0, &jerr);
    assert_non_null(root);
    json_t *ups = json_object_get(root, "upstreams");
    assert_int_equal(json_array_size(ups), 4);
    for (size_t i = 0; i < 3; i++)
        assert_string_equal(json_string_value(json_object_get(json_array_get(ups, i), "password")),
                            "***");
    assert_true(json_is_null(json_object_get(json_array_get(ups, 3), "password")));
    assert_string_equal(json_string_value(json_object_get(json_array_get(ups, 1), "username")),
                        "bob");
    json_decref(root);
    free(out);
    am_config_cleanup(&cfg);
}

static void dump_writes_sizes_and_durations_in_human_form(void **state)
{
    struct am_config cfg;
    struct am_config_report r;
    assert_int_equal(
        load(&cfg,
             "{\"server\": {\"max_header_bytes\": 1536, \"header_timeout\": \"90s\","
             " \"idle_timeout\": \"1s500ms\", \"drain_timeout\": 0},"
             " \"cache\": {\"max_manifest_size\": \"10MB\", \"tag_freshness\": \"150m\","
             " \"metastore_map_size\": 1234567}}",
             &r),
        0);
    char *out = am_config_dump(&cfg);
    assert_non_null(out);
    json_t *root = json_loads(out, 0, NULL);
    assert_non_null(root);
    json_t *server = json_object_get(root, "server"), *cache = json_object_get(root, "cache");
    assert_string_equal(json_string_value(json_object_get(server, "max_header_bytes")), "1536B");
    assert_string_equal(json_string_value(json_object_get(server, "header_timeout")), "1m30s");
    assert_string_equal(json_string_value(json_object_get(server, "idle_timeout")), "1s500ms");
    assert_string_equal(json_string_value(json_object_get(server, "drain_timeout")), "0s");
    assert_int_equal(json_integer_value(json_object_get(server, "max_connections")), 4096);
    assert_string_equal(json_string_value(json_object_get(cache, "max_manifest_size")), "10MB");
    assert_string_equal(json_string_value(json_object_get(cache, "tag_freshness")), "2h30m");
    assert_string_equal(json_string_value(json_object_get(cache, "metastore_map_size")),
                        "1234567B");
    assert_string_equal(json_string_value(json_object_get(root, "log_level")), "info");
    assert_int_equal(out[strlen(out) - 1], '\n');
    json_decref(root);
    free(out);
    am_config_cleanup(&cfg);
}

static void dump_of_a_config_loads_back_to_the_same_config(void **state)
{
    struct am_config a, b;
    struct am_config_report r;
    assert_int_equal(
        load(&a,
             "{\"log_level\": \"debug\", \"listen\": [\"[::1]:0\", \"127.0.0.1:0\"],"
             " \"upstreams\": [{\"name\": \"localhost:5001\", \"url\": \"http://127.0.0.1:5001\","
             " \"insecure\": true}], \"server\": {\"idle_timeout\": \"45m30s\"},"
             " \"cache\": {\"max_manifest_size\": \"1000KB\"}}",
             &r),
        0);
    assert_string_equal(a.default_upstream, "localhost:5001");
    char *first = am_config_dump(&a);
    assert_non_null(first);
    int rc = load(&b, first, &r);
    if (rc) print_report(&r);
    assert_int_equal(rc, 0);
    char *second = am_config_dump(&b);
    assert_non_null(second);
    assert_string_equal(first, second);
    assert_int_equal(b.log_level, AM_LOG_DEBUG);
    assert_int_equal(b.idle_timeout_ms, 2730000);
    assert_int_equal(b.max_manifest_bytes, 1000000);
    free(first);
    free(second);
    am_config_cleanup(&a);
    am_config_cleanup(&b);
}

/* ---- command-line overrides -------------------------------------------------------- */

static void cli_listen_replaces_the_list_then_adds_to_it(void **state)
{
    struct am_config cfg;
    char msg[256];
    assert_int_equal(am_config_init_defaults(&cfg), 0);
    assert_int_equal(am_config_set_listen(&cfg, "0.0.0.0:5001", msg, sizeof msg), 0);
    assert_int_equal(am_config_set_listen(&cfg, "[::]:5001", msg, sizeof msg), 0);
    assert_true(cfg.listen_overridden);
    assert_int_equal(cfg.n_listen, 2);
    assert_string_equal(cfg.listen[0], "0.0.0.0:5001");
    assert_string_equal(cfg.listen[1], "[::]:5001");
    for (int i = 2; i < AM_CONFIG_MAX_LISTEN; i++) {
        char a[32];
        snprintf(a, sizeof a, "127.0.0.%d:1", i);
        assert_int_equal(am_config_set_listen(&cfg, a, msg, sizeof msg), 0);
    }
    assert_int_equal(am_config_set_listen(&cfg, "127.0.0.99:1", msg, sizeof msg), AM_ECONFIG);
    assert_non_null(strstr(msg, "at most 8 listen addresses"));
    am_config_cleanup(&cfg);
}

static void cli_listen_rejects_bad_addresses_and_keeps_the_list(void **state)
{
    struct am_config cfg;
    char msg[256];
    assert_int_equal(am_config_init_defaults(&cfg), 0);
    assert_int_equal(am_config_set_listen(&cfg, "localhost:80", msg, sizeof msg), AM_ECONFIG);
    assert_non_null(strstr(msg, "listen address \"localhost:80\" has a host that is not an IPv4"));
    assert_int_equal(cfg.n_listen, 1);
    assert_string_equal(cfg.listen[0], "127.0.0.1:5000");
    assert_false(cfg.listen_overridden);
    assert_int_equal(am_config_set_listen(&cfg, "bad", NULL, 0), AM_ECONFIG); /* msg optional */
    am_config_cleanup(&cfg);
}

static void cli_upstream_first_call_drops_the_earlier_list(void **state)
{
    struct am_config cfg;
    struct am_config_report r;
    char msg[256];
    assert_int_equal(
        load(&cfg, "{\"upstreams\": [{\"name\": \"a.io\", \"url\": \"https://a.io\"}]}", &r), 0);
    assert_int_equal(
        am_config_set_upstream(&cfg, "docker.io=http://127.0.0.1:5100/", msg, sizeof msg), 0);
    assert_true(cfg.upstreams_overridden);
    assert_int_equal(
        am_config_set_upstream(&cfg, "localhost:5101=http://127.0.0.1:5101", msg, sizeof msg), 0);
    assert_int_equal(cfg.n_upstreams, 2);
    assert_string_equal(cfg.upstreams[0].name, "docker.io");
    assert_string_equal(cfg.upstreams[0].url, "http://127.0.0.1:5100");
    assert_string_equal(cfg.upstreams[1].name, "localhost:5101");
    assert_null(am_config_find_upstream(&cfg, "a.io", 4));
    /* default_upstream is the caller's to settle: a.io is gone, validation says so. */
    assert_string_equal(cfg.default_upstream, "a.io");
    memset(&r, 0, sizeof r);
    assert_int_equal(am_config_validate(&cfg, &r), AM_ECONFIG);
    assert_problem(&r, "$.default_upstream", "\"a.io\" is not one of the upstreams");
    am_config_cleanup(&cfg);
}

static void cli_upstream_rejects_bad_arguments_and_keeps_the_list(void **state)
{
    static const struct {
        const char *arg, *why;
    } cases[] = {
        {"docker.io", "expected NAME=URL"},
        {"=https://a.io", "expected NAME=URL"},
        {"docker.io=", "expected NAME=URL"},
        {"Docker.io=https://a.io", "upstream name \"Docker.io\" is not a registry host"},
        {"docker.io=ftp://a.io", "upstream docker.io: URL \"ftp://a.io\" must start with"},
        {"docker.io=https://a.io/v2", "must not have a path"},
    };
    struct am_config cfg;
    char msg[256];
    assert_int_equal(am_config_init_defaults(&cfg), 0);
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        msg[0] = '\0';
        assert_int_equal(am_config_set_upstream(&cfg, cases[i].arg, msg, sizeof msg), AM_ECONFIG);
        if (!strstr(msg, cases[i].why)) print_error("%s: got \"%s\"\n", cases[i].arg, msg);
        assert_non_null(strstr(msg, cases[i].why));
        assert_int_equal(cfg.n_upstreams, 6);
        assert_false(cfg.upstreams_overridden);
    }
    assert_int_equal(am_config_set_upstream(&cfg, "a.io=https://a.io", msg, sizeof msg), 0);
    assert_int_equal(am_config_set_upstream(&cfg, "a.io=https://b.io", msg, sizeof msg),
                     AM_ECONFIG);
    assert_non_null(strstr(msg, "upstream a.io is given twice"));
    assert_int_equal(cfg.n_upstreams, 1);
    assert_string_equal(cfg.upstreams[0].url, "https://a.io");
    am_config_cleanup(&cfg);
}

static void cli_upstream_ca_needs_an_existing_https_upstream_and_a_readable_file(void **state)
{
    struct am_config cfg;
    char msg[256], arg[PATH_MAX + 64];
    const char *ca = write_file("cli-ca.pem", "pem", 0644);
    assert_int_equal(am_config_init_defaults(&cfg), 0);

    snprintf(arg, sizeof arg, "nowhere.io=%s", ca);
    assert_int_equal(am_config_set_upstream_ca(&cfg, arg, msg, sizeof msg), AM_ECONFIG);
    assert_non_null(strstr(msg, "no upstream is named \"nowhere.io\""));

    assert_int_equal(am_config_set_upstream_ca(&cfg, "ghcr.io", msg, sizeof msg), AM_ECONFIG);
    assert_non_null(strstr(msg, "expected NAME=FILE"));

    snprintf(arg, sizeof arg, "ghcr.io=%s/missing.pem", tmpdir);
    assert_int_equal(am_config_set_upstream_ca(&cfg, arg, msg, sizeof msg), AM_ECONFIG);
    assert_non_null(strstr(msg, "cannot read CA file"));
    assert_null(cfg.upstreams[1].ca_file);

    snprintf(arg, sizeof arg, "ghcr.io=%s", ca);
    assert_int_equal(am_config_set_upstream_ca(&cfg, arg, msg, sizeof msg), 0);
    assert_string_equal(cfg.upstreams[1].ca_file, ca);
    assert_int_equal(am_config_set_upstream_ca(&cfg, arg, msg, sizeof msg), 0); /* replaces */
    assert_string_equal(cfg.upstreams[1].ca_file, ca);

    assert_int_equal(
        am_config_set_upstream(&cfg, "local.io=http://127.0.0.1:5100", msg, sizeof msg), 0);
    snprintf(arg, sizeof arg, "local.io=%s", ca);
    assert_int_equal(am_config_set_upstream_ca(&cfg, arg, msg, sizeof msg), AM_ECONFIG);
    assert_non_null(strstr(msg, "needs an https:// URL"));
    am_config_cleanup(&cfg);
}

/* ---- files ------------------------------------------------------------------------- */

static void load_file_reads_a_config_from_disk(void **state)
{
    struct am_config cfg;
    struct am_config_report r;
    const char *path = write_file("archmirror.json",
                                  "{\"log_level\": \"warn\",\n \"data_dir\": \"/srv/am\"}\n", 0644);
    assert_int_equal(am_config_init_defaults(&cfg), 0);
    int rc = am_config_load_file(&cfg, path, &r);
    if (rc) print_report(&r);
    assert_int_equal(rc, 0);
    assert_int_equal(cfg.log_level, AM_LOG_WARN);
    assert_string_equal(cfg.data_dir, "/srv/am");
    am_config_cleanup(&cfg);

    path = write_file("broken.json", "{\n\"log_level\": \"warn\"\n\"x\": 1}\n", 0644);
    assert_int_equal(am_config_init_defaults(&cfg), 0);
    assert_int_equal(am_config_load_file(&cfg, path, &r), AM_ECONFIG);
    assert_problem(&r, "$", "invalid JSON at line 3, column");
    am_config_cleanup(&cfg);
}

static void load_file_reports_a_missing_file_or_a_directory(void **state)
{
    struct am_config cfg;
    struct am_config_report r;
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s/absent.json", tmpdir);
    assert_int_equal(am_config_init_defaults(&cfg), 0);
    assert_int_equal(am_config_load_file(&cfg, path, &r), AM_ECONFIG);
    assert_int_equal(r.total, 1);
    assert_problem(&r, "$", "No such file or directory");
    assert_non_null(strstr(r.problems[0].message, "absent.json"));
    assert_int_equal(am_config_load_file(&cfg, tmpdir, &r), AM_ECONFIG);
    assert_int_equal(r.total, 1);
    assert_problem(&r, "$", "is a directory");
    am_config_cleanup(&cfg);
}

static void example_config_loads_validates_and_equals_the_defaults(void **state)
{
    char path[PATH_MAX];
    struct am_config cfg, def;
    struct am_config_report r;
    snprintf(path, sizeof path, "%s/conf/archmirror.json", source_dir());
    assert_int_equal(am_config_init_defaults(&cfg), 0);
    int rc = am_config_load_file(&cfg, path, &r);
    if (rc == 0) rc = am_config_validate(&cfg, &r);
    if (rc) {
        print_error("%s:\n", path);
        print_report(&r);
    }
    assert_int_equal(rc, 0);
    assert_int_equal(am_config_init_defaults(&def), 0);
    char *a = am_config_dump(&cfg), *b = am_config_dump(&def);
    assert_non_null(a);
    assert_non_null(b);
    assert_string_equal(a, b);
    free(a);
    free(b);
    am_config_cleanup(&cfg);
    am_config_cleanup(&def);
}

/* Whether the example document has key, written as the reference names it: "listen",
 * "server.max_headers", or "upstreams[].ca_file" (in at least one upstream). */
static bool example_has_key(json_t *root, const char *key)
{
    const char *dot = strchr(key, '.');
    if (strncmp(key, "upstreams[].", 12) == 0) {
        json_t *ups = json_object_get(root, "upstreams");
        for (size_t i = 0; i < json_array_size(ups); i++)
            if (json_object_get(json_array_get(ups, i), key + 12)) return true;
        return false;
    }
    if (!dot) return json_object_get(root, key) != NULL;
    char section[64];
    snprintf(section, sizeof section, "%.*s", (int)(dot - key), key);
    return json_object_get(json_object_get(root, section), dot + 1) != NULL;
}

/* Every key of the generated reference (one table row each) is in the example file. */
static void example_config_shows_every_key(void **state)
{
    char path[PATH_MAX];
    json_error_t jerr;
    snprintf(path, sizeof path, "%s/conf/archmirror.json", source_dir());
    json_t *root = json_load_file(path, JSON_REJECT_DUPLICATES, &jerr);
    if (!root) print_error("%s:%d: %s\n", path, jerr.line, jerr.text);
    assert_non_null(root);
    char *doc = am_config_format_doc();
    assert_non_null(doc);
    char *table_end = strstr(doc, "\n\n"); /* the key table ends at the first blank line */
    assert_non_null(table_end);
    *table_end = '\0';
    size_t keys = 0;
    for (char *line = strstr(doc, "\n| `"); line; line = strstr(line + 1, "\n| `")) {
        char key[128];
        const char *name = line + 4, *tick = strchr(name, '`');
        assert_non_null(tick);
        snprintf(key, sizeof key, "%.*s", (int)(tick - name), name);
        if (!example_has_key(root, key)) print_error("conf/archmirror.json lacks %s\n", key);
        assert_true(example_has_key(root, key));
        keys++;
    }
    assert_true(keys >= 31); /* the table was found and read: every row of the schema */
    free(doc);
    json_decref(root);
}

static void readme_contains_the_generated_key_table(void **state)
{
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s/conf/README.md", source_dir());
    char *readme = read_whole(path);
    assert_non_null(readme);
    char *doc = am_config_format_doc();
    assert_non_null(doc);
    const char *begin = "<!-- BEGIN config-keys -->\n", *end = "<!-- END config-keys -->";
    char *b = strstr(readme, begin), *e = b ? strstr(b, end) : NULL;
    bool same = b && e && (size_t)(e - b - strlen(begin)) == strlen(doc) &&
                memcmp(b + strlen(begin), doc, strlen(doc)) == 0;
    if (!same) {
        char out[PATH_MAX];
        snprintf(out, sizeof out, "%s/../config-keys.md", tmpdir);
        FILE *f = fopen(out, "w");
        if (f) {
            fputs(doc, f);
            fclose(f);
        }
        print_error("%s is out of date with the schema in src/config.c; the current table is in "
                    "%s: paste it between the BEGIN/END config-keys markers\n",
                    path, out);
    }
    assert_true(same);
    free(doc);
    free(readme);
}

/* ---- odds and ends ----------------------------------------------------------------- */

static void find_upstream_compares_the_whole_name(void **state)
{
    struct am_config cfg;
    assert_int_equal(am_config_init_defaults(&cfg), 0);
    const struct am_upstream_conf *u = am_config_find_upstream(&cfg, "ghcr.io/extra", 7);
    assert_non_null(u);
    assert_string_equal(u->name, "ghcr.io");
    assert_null(am_config_find_upstream(&cfg, "ghcr.i", 6));
    assert_null(am_config_find_upstream(&cfg, "ghcr.iox", 8));
    assert_null(am_config_find_upstream(&cfg, "GHCR.IO", 7));
    am_config_cleanup(&cfg);
}

static void cleanup_accepts_null_and_a_cleaned_up_config(void **state)
{
    struct am_config cfg;
    struct am_config_report r;
    am_config_cleanup(NULL);
    assert_int_equal(load(&cfg,
                          "{\"upstreams\": [{\"name\": \"a.io\", \"url\": \"https://a.io\","
                          " \"username\": \"u\", \"password\": \"p\"}]}",
                          &r),
                     0);
    am_config_cleanup(&cfg);
    assert_int_equal(cfg.n_upstreams, 0);
    assert_null(cfg.data_dir);
    am_config_cleanup(&cfg);
}

static void log_level_is_stored_as_the_log_enum(void **state)
{
    static const struct {
        const char *name;
        enum am_log_level level;
    } cases[] = {{"error", AM_LOG_ERROR},
                 {"warn", AM_LOG_WARN},
                 {"info", AM_LOG_INFO},
                 {"debug", AM_LOG_DEBUG}};
    for (size_t i = 0; i < 4; i++) {
        char json[64];
        struct am_config cfg;
        struct am_config_report r;
        snprintf(json, sizeof json, "{\"log_level\": \"%s\"}", cases[i].name);
        assert_int_equal(load(&cfg, json, &r), 0);
        assert_int_equal(cfg.log_level, (int)cases[i].level);
        am_config_cleanup(&cfg);
    }
    expect_one_problem("{\"log_level\": \"INFO\"}", "$.log_level", "unknown log level");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(defaults_hold_the_documented_values),
        cmocka_unit_test(defaults_list_the_six_public_upstreams_in_order),
        cmocka_unit_test(defaults_pass_validation),
        cmocka_unit_test(empty_object_changes_nothing),
        cmocka_unit_test(reads_the_diagnostics_mode_and_the_pull_log_section),
        cmocka_unit_test(size_parser_accepts_every_unit_and_plain_bytes),
        cmocka_unit_test(size_parser_rejects_malformed_sizes),
        cmocka_unit_test(duration_parser_accepts_every_form),
        cmocka_unit_test(duration_parser_rejects_malformed_durations),
        cmocka_unit_test(loader_accepts_integer_bytes_for_sizes_and_zero_for_durations),
        cmocka_unit_test(loader_rejects_plain_integer_durations_other_than_zero),
        cmocka_unit_test(size_and_duration_errors_name_the_path_and_the_accepted_forms),
        cmocka_unit_test(unknown_key_is_reported_with_its_json_path),
        cmocka_unit_test(unknown_top_level_key_suggests_the_section_it_belongs_to),
        cmocka_unit_test(unknown_key_inside_an_upstream_is_reported_with_its_index),
        cmocka_unit_test(type_errors_name_the_path_and_the_expected_type),
        cmocka_unit_test(every_problem_is_collected_with_its_path),
        cmocka_unit_test(report_counts_problems_beyond_its_capacity),
        cmocka_unit_test(load_resets_the_report_and_validate_appends_to_it),
        cmocka_unit_test(control_bytes_in_keys_are_not_echoed_raw),
        cmocka_unit_test(malformed_json_reports_line_and_column),
        cmocka_unit_test(empty_document_is_malformed_json),
        cmocka_unit_test(duplicate_json_keys_are_rejected),
        cmocka_unit_test(top_level_must_be_an_object),
        cmocka_unit_test(values_outside_their_bounds_are_rejected_with_the_allowed_range),
        cmocka_unit_test(validate_rechecks_values_set_by_code),
        cmocka_unit_test(upstreams_array_replaces_the_default_list),
        cmocka_unit_test(default_upstream_becomes_the_first_upstream_when_the_old_one_is_gone),
        cmocka_unit_test(default_upstream_must_name_an_upstream),
        cmocka_unit_test(upstream_without_name_or_url_is_reported),
        cmocka_unit_test(upstream_list_must_have_one_to_sixty_four_entries),
        cmocka_unit_test(a_failed_list_leaves_the_previous_list_in_place),
        cmocka_unit_test(bad_upstream_urls_are_rejected),
        cmocka_unit_test(good_upstream_urls_are_accepted),
        cmocka_unit_test(duplicate_upstream_names_are_rejected),
        cmocka_unit_test(upstream_names_must_be_lowercase_registry_hosts),
        cmocka_unit_test(listen_addresses_must_be_ip_literals_with_a_port),
        cmocka_unit_test(duplicate_listen_addresses_are_rejected),
        cmocka_unit_test(ca_file_must_exist_and_be_readable),
        cmocka_unit_test(ca_file_needs_an_https_url),
        cmocka_unit_test(validate_notices_a_ca_file_removed_after_loading),
        cmocka_unit_test(password_file_is_read_with_trailing_newlines_removed),
        cmocka_unit_test(unusable_password_files_are_reported),
        cmocka_unit_test(password_env_is_read_from_the_environment),
        cmocka_unit_test(unusable_password_env_is_reported),
        cmocka_unit_test(only_one_password_source_is_allowed),
        cmocka_unit_test(username_and_password_go_together),
        cmocka_unit_test(type_errors_never_echo_a_password),
        cmocka_unit_test(dump_never_prints_passwords),
        cmocka_unit_test(dump_writes_sizes_and_durations_in_human_form),
        cmocka_unit_test(dump_of_a_config_loads_back_to_the_same_config),
        cmocka_unit_test(cli_listen_replaces_the_list_then_adds_to_it),
        cmocka_unit_test(cli_listen_rejects_bad_addresses_and_keeps_the_list),
        cmocka_unit_test(cli_upstream_first_call_drops_the_earlier_list),
        cmocka_unit_test(cli_upstream_rejects_bad_arguments_and_keeps_the_list),
        cmocka_unit_test(cli_upstream_ca_needs_an_existing_https_upstream_and_a_readable_file),
        cmocka_unit_test(load_file_reads_a_config_from_disk),
        cmocka_unit_test(load_file_reports_a_missing_file_or_a_directory),
        cmocka_unit_test(example_config_loads_validates_and_equals_the_defaults),
        cmocka_unit_test(example_config_shows_every_key),
        cmocka_unit_test(readme_contains_the_generated_key_table),
        cmocka_unit_test(find_upstream_compares_the_whole_name),
        cmocka_unit_test(cleanup_accepts_null_and_a_cleaned_up_config),
        cmocka_unit_test(log_level_is_stored_as_the_log_enum),
    };
    return cmocka_run_group_tests(tests, setup_group, teardown_group);
}

/* Unit tests for src/platform.c: containerd's platform parsing, normalisation, formatting
 * and matching (tables after containerd/platforms compare_test.go TestOnly and
 * platforms_test.go), image platforms from an index, and the config blob's platform. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "archmirror/error.h"
#include "archmirror/manifest.h"
#include "archmirror/platform.h"

#define N_OF(a) (sizeof(a) / sizeof((a)[0]))

/* ---- helpers ---------------------------------------------------------------------- */

static struct am_platform plat(const char *os, const char *arch, const char *variant)
{
    struct am_platform p;
    memset(&p, 0, sizeof p);
    snprintf(p.os, sizeof p.os, "%s", os);
    snprintf(p.architecture, sizeof p.architecture, "%s", arch);
    snprintf(p.variant, sizeof p.variant, "%s", variant);
    return p;
}

/* Parses s, failing the test on error; returns the platform. */
static struct am_platform parse_ok(const char *s)
{
    struct am_platform p;
    char msg[256] = "";
    int rc = am_platform_parse(s, strlen(s), &p, NULL, msg, sizeof msg);
    if (rc != 0) fail_msg("refused \"%s\": %s", s, msg);
    return p;
}

/* The canonical string of a parsed specifier, in a static buffer. */
static const char *canon(const char *s)
{
    static char buf[AM_PLATFORM_FORMAT_ALL_SIZE];
    struct am_platform p;
    struct am_platform_features f;
    char msg[256] = "";
    int rc = am_platform_parse(s, strlen(s), &p, &f, msg, sizeof msg);
    if (rc != 0) fail_msg("refused \"%s\": %s", s, msg);
    assert_int_equal(am_platform_format_all(&p, &f, buf, sizeof buf), 0);
    return buf;
}

/* Normalises os/arch/variant and formats the result, in a static buffer. */
static const char *normalized(const char *os, const char *arch, const char *variant)
{
    static char buf[AM_PLATFORM_FORMAT_SIZE];
    struct am_platform p = plat(os, arch, variant);
    am_platform_normalize(&p);
    assert_int_equal(am_platform_format(&p, buf, sizeof buf), 0);
    return buf;
}

static int rank_of(const char *node, const char *candidate)
{
    struct am_platform n = parse_ok(node), c = parse_ok(candidate);
    return am_platform_match_rank(&n, &c);
}

struct match_case {
    const char *node;
    const char *yes[24];
    const char *no[12];
};

static void check_matches(const struct match_case *tc, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        for (size_t k = 0; k < N_OF(tc[i].yes) && tc[i].yes[k]; k++)
            if (rank_of(tc[i].node, tc[i].yes[k]) < 0)
                fail_msg("node %s refused %s", tc[i].node, tc[i].yes[k]);
        for (size_t k = 0; k < N_OF(tc[i].no) && tc[i].no[k]; k++)
            if (rank_of(tc[i].node, tc[i].no[k]) >= 0)
                fail_msg("node %s accepted %s", tc[i].node, tc[i].no[k]);
    }
}

static void expect_parse_error(const char *s, size_t len)
{
    struct am_platform p = plat("sentinel", "sentinel", "sentinel");
    char msg[256] = "";
    int rc = am_platform_parse(s, len, &p, NULL, msg, sizeof msg);
    if (rc != AM_EINVAL) fail_msg("accepted \"%.*s\" (rc %d)", (int)len, s, rc);
    if (msg[0] == '\0') fail_msg("no message for \"%.*s\"", (int)len, s);
    for (const char *m = msg; *m; m++)
        if ((unsigned char)*m < 0x20 || (unsigned char)*m > 0x7e)
            fail_msg("non-printable message for \"%.*s\"", (int)len, s);
    assert_string_equal(p.os, "sentinel"); /* untouched on error */
}

static void expect_parse_error_s(const char *s)
{
    expect_parse_error(s, strlen(s));
}

/* Index fixtures built by hand, independent of manifest.c. */
static struct am_descriptor desc(const char *os, const char *arch, const char *variant)
{
    struct am_descriptor d;
    memset(&d, 0, sizeof d);
    snprintf(d.media_type, sizeof d.media_type, "%s", AM_MT_OCI_MANIFEST_S);
    d.size = 1234;
    d.has_platform = true;
    d.platform = plat(os, arch, variant);
    return d;
}

static struct am_descriptor attestation(void)
{
    struct am_descriptor d = desc("unknown", "unknown", "");
    d.is_attestation = true;
    return d;
}

static struct am_manifest index_of(struct am_descriptor *entries, size_t n)
{
    struct am_manifest m;
    memset(&m, 0, sizeof m);
    m.kind = AM_MT_OCI_INDEX;
    snprintf(m.media_type, sizeof m.media_type, "%s", AM_MT_OCI_INDEX_S);
    m.schema_version = 2;
    m.entries = entries;
    m.n_entries = n;
    return m;
}

static size_t best(const struct am_manifest *idx, const char *node)
{
    struct am_platform n = parse_ok(node);
    size_t e = 9999;
    int rc = am_platform_best_match(idx, &n, &e);
    if (rc != 0) fail_msg("no best match for %s (rc %d)", node, rc);
    return e;
}

/* ---- normalisation ---------------------------------------------------------------- */

static void normalises_aarch64_to_arm64_and_arm64_v8_to_no_variant(void **state)
{
    assert_string_equal(normalized("linux", "aarch64", ""), "linux/arm64");
    assert_string_equal(normalized("linux", "AArch64", ""), "linux/arm64");
    assert_string_equal(normalized("linux", "arm64", "v8"), "linux/arm64");
    assert_string_equal(normalized("linux", "arm64", "8"), "linux/arm64");
    assert_string_equal(normalized("linux", "arm64", "V8"), "linux/arm64");
    assert_string_equal(normalized("linux", "aarch64", "v8"), "linux/arm64");
    assert_string_equal(normalized("linux", "arm64", "v8.0"), "linux/arm64");
    assert_string_equal(normalized("linux", "arm64", "v8.2"), "linux/arm64/v8.2");
}

static void normalises_arm64_v9_spellings_to_v9(void **state)
{
    assert_string_equal(normalized("linux", "arm64", "9"), "linux/arm64/v9");
    assert_string_equal(normalized("linux", "arm64", "9.0"), "linux/arm64/v9");
    assert_string_equal(normalized("linux", "arm64", "v9.0"), "linux/arm64/v9");
    assert_string_equal(normalized("linux", "arm64", "v9"), "linux/arm64/v9");
    assert_string_equal(normalized("linux", "arm64", "v9.3"), "linux/arm64/v9.3");
}

static void normalises_x86_64_spellings_to_amd64_and_drops_v1(void **state)
{
    assert_string_equal(normalized("linux", "x86_64", ""), "linux/amd64");
    assert_string_equal(normalized("linux", "x86-64", ""), "linux/amd64");
    assert_string_equal(normalized("linux", "X86_64", ""), "linux/amd64");
    assert_string_equal(normalized("linux", "amd64", "v1"), "linux/amd64");
    assert_string_equal(normalized("linux", "amd64", "V1"), "linux/amd64");
    assert_string_equal(normalized("linux", "amd64", "v2"), "linux/amd64/v2");
    assert_string_equal(normalized("linux", "x86_64", "v3"), "linux/amd64/v3");
    assert_string_equal(normalized("linux", "amd64", "v4"), "linux/amd64/v4");
}

static void normalises_i386_to_386_but_leaves_i686_as_containerd_does(void **state)
{
    assert_string_equal(normalized("linux", "i386", ""), "linux/386");
    assert_string_equal(normalized("linux", "i386", "sse2"), "linux/386");
    assert_string_equal(normalized("linux", "386", ""), "linux/386");
    /* database.go normalizeArch knows only "i386". */
    assert_string_equal(normalized("linux", "i486", ""), "linux/i486");
    assert_string_equal(normalized("linux", "i586", ""), "linux/i586");
    assert_string_equal(normalized("linux", "i686", ""), "linux/i686");
}

static void normalises_armhf_armel_and_bare_arm(void **state)
{
    assert_string_equal(normalized("linux", "armhf", ""), "linux/arm/v7");
    assert_string_equal(normalized("linux", "armhf", "v6"), "linux/arm/v7");
    assert_string_equal(normalized("linux", "armel", ""), "linux/arm/v6");
    assert_string_equal(normalized("linux", "arm", ""), "linux/arm/v7");
    assert_string_equal(normalized("linux", "ARM", ""), "linux/arm/v7");
}

static void normalises_numeric_arm_variants(void **state)
{
    assert_string_equal(normalized("linux", "arm", "5"), "linux/arm/v5");
    assert_string_equal(normalized("linux", "arm", "6"), "linux/arm/v6");
    assert_string_equal(normalized("linux", "arm", "7"), "linux/arm/v7");
    assert_string_equal(normalized("linux", "arm", "8"), "linux/arm/v8");
    assert_string_equal(normalized("linux", "arm", "v6"), "linux/arm/v6");
    assert_string_equal(normalized("linux", "arm", "V5"), "linux/arm/v5");
    /* Only 5-8 are rewritten. */
    assert_string_equal(normalized("linux", "arm", "4"), "linux/arm/4");
}

static void lowercases_the_os_and_maps_macos_to_darwin(void **state)
{
    assert_string_equal(normalized("Linux", "amd64", ""), "linux/amd64");
    assert_string_equal(normalized("WINDOWS", "amd64", ""), "windows/amd64");
    assert_string_equal(normalized("macos", "arm64", ""), "darwin/arm64");
    assert_string_equal(normalized("MacOS", "arm64", ""), "darwin/arm64");
}

static void reads_an_empty_os_as_linux(void **state)
{
    assert_string_equal(normalized("", "arm64", ""), "linux/arm64");
}

static void keeps_os_version_verbatim_when_normalising(void **state)
{
    struct am_platform p = plat("Windows", "AMD64", "");
    snprintf(p.os_version, sizeof p.os_version, "10.0.17763.ABC");
    am_platform_normalize(&p);
    assert_string_equal(p.os, "windows");
    assert_string_equal(p.architecture, "amd64");
    assert_string_equal(p.os_version, "10.0.17763.ABC");
}

static void normalisation_is_idempotent(void **state)
{
    static const char *const in[][3] = {
        {"linux", "aarch64", "8"}, {"linux", "arm", ""},      {"linux", "armel", ""},
        {"Linux", "x86_64", "v1"}, {"linux", "arm64", "9.0"}, {"macos", "amd64", "v3"},
        {"", "i386", ""},          {"linux", "arm", "5"},     {"linux", "riscv64", ""},
    };
    for (size_t i = 0; i < N_OF(in); i++) {
        struct am_platform a = plat(in[i][0], in[i][1], in[i][2]), b;
        am_platform_normalize(&a);
        b = a;
        am_platform_normalize(&b);
        assert_memory_equal(&a, &b, sizeof a);
    }
}

static void normalises_features_sorted_and_unique(void **state)
{
    struct am_platform_features f;
    memset(&f, 0, sizeof f);
    f.n = 5;
    snprintf(f.v[0], sizeof f.v[0], "simd");
    snprintf(f.v[1], sizeof f.v[1], "gpu");
    snprintf(f.v[2], sizeof f.v[2], "%s", "");
    snprintf(f.v[3], sizeof f.v[3], "simd");
    snprintf(f.v[4], sizeof f.v[4], "erofs");
    am_platform_features_normalize(&f);
    assert_int_equal(f.n, 3);
    assert_string_equal(f.v[0], "erofs");
    assert_string_equal(f.v[1], "gpu");
    assert_string_equal(f.v[2], "simd");
}

/* ---- parsing ------------------------------------------------------------------------ */

static void parses_specifiers_into_the_normalised_platform(void **state)
{
    static const char *const cases[][2] = {
        {"linux/arm64", "linux/arm64"},
        {"linux/arm64/v8", "linux/arm64"},
        {"linux/aarch64", "linux/arm64"},
        {"Linux/AArch64/V8", "linux/arm64"},
        {"linux/arm64/v8.0", "linux/arm64"},
        {"linux/arm64/v8.2", "linux/arm64/v8.2"},
        {"linux/arm64/9.0", "linux/arm64/v9"},
        {"linux/arm", "linux/arm/v7"},
        {"linux/arm/v7", "linux/arm/v7"},
        {"linux/arm/7", "linux/arm/v7"},
        {"linux/arm/v6", "linux/arm/v6"},
        {"linux/armhf", "linux/arm/v7"},
        {"linux/armel", "linux/arm/v6"},
        {"linux/x86_64", "linux/amd64"},
        {"Linux/x86_64", "linux/amd64"},
        {"linux/x86-64", "linux/amd64"},
        {"linux/amd64", "linux/amd64"},
        {"linux/amd64/v1", "linux/amd64"},
        {"linux/amd64/v3", "linux/amd64/v3"},
        {"linux/i386", "linux/386"},
        {"linux/386", "linux/386"},
        {"linux/s390x", "linux/s390x"},
        {"linux/ppc64le", "linux/ppc64le"},
        {"linux/riscv64", "linux/riscv64"},
        {"windows/amd64", "windows/amd64"},
        {"macos/arm64", "darwin/arm64"},
        /* Two or three components: any os/arch pair is taken (platforms.go Parse). */
        {"plan10/zarch", "plan10/zarch"},
        {"linux/i686", "linux/i686"},
    };
    for (size_t i = 0; i < N_OF(cases); i++) {
        const char *got = canon(cases[i][0]);
        if (strcmp(got, cases[i][1]) != 0)
            fail_msg("\"%s\" → \"%s\", want \"%s\"", cases[i][0], got, cases[i][1]);
    }
}

static void parses_a_lone_architecture_as_linux(void **state)
{
    static const char *const cases[][2] = {
        {"arm64", "linux/arm64"},  {"aarch64", "linux/arm64"},   {"Aarch64", "linux/arm64"},
        {"x86_64", "linux/amd64"}, {"amd64", "linux/amd64"},     {"i386", "linux/386"},
        {"arm", "linux/arm/v7"},   {"armhf", "linux/arm/v7"},    {"armel", "linux/arm/v6"},
        {"s390x", "linux/s390x"},  {"riscv64", "linux/riscv64"},
    };
    for (size_t i = 0; i < N_OF(cases); i++) {
        const char *got = canon(cases[i][0]);
        if (strcmp(got, cases[i][1]) != 0)
            fail_msg("\"%s\" → \"%s\", want \"%s\"", cases[i][0], got, cases[i][1]);
    }
}

static void refuses_a_lone_os_because_a_mirror_has_no_default_architecture(void **state)
{
    expect_parse_error_s("linux");
    expect_parse_error_s("windows");
    expect_parse_error_s("macOS");
    expect_parse_error_s("windows(10.0.17763)");
}

static void refuses_a_lone_unknown_word(void **state)
{
    expect_parse_error_s("i686"); /* not a known arch: containerd refuses it too */
    expect_parse_error_s("foo");
    expect_parse_error_s("arm64(1.0)");
}

static void parses_os_version_and_features(void **state)
{
    struct am_platform p;
    struct am_platform_features f;
    const char *s;

    assert_string_equal(canon("windows(10.0.17763)/amd64"), "windows(10.0.17763)/amd64");
    assert_string_equal(canon("windows()/amd64"), "windows/amd64");
    assert_string_equal(canon("windows(10.0.17763+win32k)/amd64"),
                        "windows(10.0.17763+win32k)/amd64");
    assert_string_equal(canon("linux(+gpu+simd)/amd64"), "linux(+gpu+simd)/amd64");
    assert_string_equal(canon("linux(+unsorted+erofs)/arm64"), "linux(+erofs+unsorted)/arm64");
    assert_string_equal(canon("linux(+gpu+gpu)/arm64"), "linux(+gpu)/arm64");

    s = "windows(10.0.17763%2Bbuild.42+win32k)/amd64";
    assert_int_equal(am_platform_parse(s, strlen(s), &p, &f, NULL, 0), 0);
    assert_string_equal(p.os, "windows");
    assert_string_equal(p.os_version, "10.0.17763+build.42");
    assert_int_equal(f.n, 1);
    assert_string_equal(f.v[0], "win32k");
    assert_string_equal(canon(s), s); /* FormatAll re-encodes the '+' */

    s = "windows(50%25done)/amd64";
    assert_int_equal(am_platform_parse(s, strlen(s), &p, &f, NULL, 0), 0);
    assert_string_equal(p.os_version, "50%done");
    assert_int_equal(f.n, 0);
    assert_string_equal(canon(s), s);
}

static void parses_input_that_is_not_nul_terminated(void **state)
{
    const char buf[] = {'l', 'i', 'n', 'u', 'x', '/', 'a', 'r', 'm', '6', '4', 'X', 'Y'};
    struct am_platform p;
    assert_int_equal(am_platform_parse(buf, 11, &p, NULL, NULL, 0), 0);
    assert_string_equal(p.architecture, "arm64");
    assert_string_equal(p.os_version, "");
}

static void rejects_empty_and_overlong_specifiers(void **state)
{
    char big[AM_PLATFORM_SPEC_MAX + 2];
    struct am_platform p;

    expect_parse_error_s("");
    expect_parse_error(NULL, 0);
    memset(big, 'a', sizeof big);
    memcpy(big, "linux/", 6);
    expect_parse_error(big, AM_PLATFORM_SPEC_MAX + 1);
    assert_int_equal(am_platform_parse(NULL, 0, &p, NULL, NULL, 0), AM_EINVAL);
}

static void rejects_too_many_and_empty_components(void **state)
{
    expect_parse_error_s("linux/arm/foo/bar");
    expect_parse_error_s("linux/arm/v7/x");
    expect_parse_error_s("/linux/arm");
    expect_parse_error_s("linux/arm/");
    expect_parse_error_s("linux//arm");
    expect_parse_error_s("/");
    expect_parse_error_s("linux/");
    expect_parse_error_s("///");
}

static void rejects_garbage_characters(void **state)
{
    static const char *const bad[] = {
        "linux /arm",
        "linux/ arm64",
        "linux/&arm",
        "*",
        "linux/*",
        "*/arm64",
        "linux/arm64\n",
        "linux/ar\tm",
        "li:nux/arm",
        "linux/arm64/v8;",
        "linux/arm\xc3\xa9",
        "linux/..",
        "linux/arm/.",
        "linux(/arm64",
        "linux)/arm64",
        "linux(+)/arm64",
        "linux(a++b)/amd64",
        "linux(a)b)/amd64",
        "lin.ux/amd64",
        "windows(10.0%2)/amd64",
        "windows(10.0%zz)/amd64",
        "windows(%00)/amd64",
        "windows(%0a)/amd64",
        "windows(a b)/amd64",
    };
    for (size_t i = 0; i < N_OF(bad); i++) expect_parse_error_s(bad[i]);
    expect_parse_error("linux/arm\0"
                       "64",
                       12);
}

static void rejects_overlong_components(void **state)
{
    char s[256];
    char long_field[AM_PLATFORM_FIELD_MAX + 2];

    memset(long_field, 'a', AM_PLATFORM_FIELD_MAX + 1);
    long_field[AM_PLATFORM_FIELD_MAX + 1] = '\0';
    snprintf(s, sizeof s, "%s/amd64", long_field);
    expect_parse_error_s(s);
    snprintf(s, sizeof s, "linux/%s", long_field);
    expect_parse_error_s(s);
    snprintf(s, sizeof s, "linux/arm/%s", long_field);
    expect_parse_error_s(s);
    snprintf(s, sizeof s, "windows(%s)/amd64", long_field);
    expect_parse_error_s(s);
    snprintf(s, sizeof s, "linux(+%s)/amd64", long_field);
    expect_parse_error_s(s);
    /* Exactly the limit is fine. */
    long_field[AM_PLATFORM_FIELD_MAX] = '\0';
    snprintf(s, sizeof s, "linux/%s", long_field);
    (void)parse_ok(s);
}

static void rejects_more_features_than_the_limit(void **state)
{
    char s[256] = "linux(";
    for (int i = 0; i <= AM_PLATFORM_FEATURES_MAX; i++)
        snprintf(s + strlen(s), sizeof s - strlen(s), "+f%d", i);
    snprintf(s + strlen(s), sizeof s - strlen(s), ")/amd64");
    expect_parse_error_s(s);
}

static void parse_message_quotes_input_safely(void **state)
{
    char msg[256] = "";
    struct am_platform p;
    const char *s = "linux/\x01\"evil\r\n";
    assert_int_equal(am_platform_parse(s, strlen(s), &p, NULL, msg, sizeof msg), AM_EINVAL);
    assert_null(strchr(msg, '\r'));
    assert_null(strchr(msg, '\n'));
    assert_non_null(strstr(msg, "linux/"));
    /* A tiny message buffer is still NUL-terminated and never overrun. */
    char tiny[8];
    memset(tiny, 'x', sizeof tiny);
    assert_int_equal(am_platform_parse("", 0, &p, NULL, tiny, sizeof tiny), AM_EINVAL);
    assert_int_equal(strlen(tiny), sizeof tiny - 1);
}

/* ---- formatting ----------------------------------------------------------------------- */

static void formats_like_containerd(void **state)
{
    char buf[AM_PLATFORM_FORMAT_SIZE];
    struct am_platform p;

    p = plat("linux", "arm64", "");
    assert_int_equal(am_platform_format(&p, buf, sizeof buf), 0);
    assert_string_equal(buf, "linux/arm64");
    p = plat("linux", "arm", "v7");
    assert_int_equal(am_platform_format(&p, buf, sizeof buf), 0);
    assert_string_equal(buf, "linux/arm/v7");
    p = plat("linux", "amd64", "v3");
    assert_int_equal(am_platform_format(&p, buf, sizeof buf), 0);
    assert_string_equal(buf, "linux/amd64/v3");
    /* Format does not normalise: "arm64/v8" stays as given. */
    p = plat("linux", "arm64", "v8");
    assert_int_equal(am_platform_format(&p, buf, sizeof buf), 0);
    assert_string_equal(buf, "linux/arm64/v8");
    /* platforms.go Format: no os → "unknown". */
    p = plat("", "amd64", "");
    assert_int_equal(am_platform_format(&p, buf, sizeof buf), 0);
    assert_string_equal(buf, "unknown");
    /* Format leaves os.version out; FormatAll shows it. */
    p = plat("windows", "amd64", "");
    snprintf(p.os_version, sizeof p.os_version, "10.0.17763");
    assert_int_equal(am_platform_format(&p, buf, sizeof buf), 0);
    assert_string_equal(buf, "windows/amd64");
}

static void format_reports_a_short_buffer(void **state)
{
    char buf[8];
    struct am_platform p = plat("linux", "arm64", "v8.2");
    assert_int_equal(am_platform_format(&p, buf, sizeof buf), AM_EINVAL);
    assert_string_equal(buf, "linux/a");
    assert_int_equal(am_platform_format(&p, buf, 0), AM_EINVAL);
}

static void format_sizes_fit_the_longest_platform(void **state)
{
    struct am_platform p;
    struct am_platform_features f;
    char buf[AM_PLATFORM_FORMAT_ALL_SIZE];

    memset(&p, '/', sizeof p);
    p.os[AM_PLATFORM_FIELD_MAX] = p.architecture[AM_PLATFORM_FIELD_MAX] = '\0';
    p.variant[AM_PLATFORM_FIELD_MAX] = p.os_version[AM_PLATFORM_FIELD_MAX] = '\0';
    /* Every byte of os.version and of each feature needs %XX; the features differ
     * (a '(' in a different place) so none is deduplicated. */
    memset(&f, '+', sizeof f);
    f.n = AM_PLATFORM_FEATURES_MAX;
    for (size_t i = 0; i < f.n; i++) {
        f.v[i][i] = '(';
        f.v[i][AM_PLATFORM_FIELD_MAX] = '\0';
    }
    assert_int_equal(am_platform_format(&p, buf, AM_PLATFORM_FORMAT_SIZE), 0);
    assert_int_equal(am_platform_format_all(&p, &f, buf, sizeof buf), 0);
    assert_int_equal(strlen(buf), sizeof buf - 1);
}

static void format_all_round_trips_through_parse(void **state)
{
    static const char *const cases[] = {
        "linux/arm64",
        "linux/arm/v6",
        "windows(10.0.20348)/amd64",
        "windows(10.0.17763+win32k)/arm64",
        "linux(+erofs+gpu)/amd64/v3",
        "windows(a%2Fb%28c%29d%25)/amd64",
        "windows(10.0%23x%3A)/amd64", /* "#" and ":" come back encoded */
    };
    for (size_t i = 0; i < N_OF(cases); i++) {
        char again[AM_PLATFORM_FORMAT_ALL_SIZE];
        snprintf(again, sizeof again, "%s", canon(cases[i]));
        assert_string_equal(again, cases[i]);
        assert_string_equal(canon(again), cases[i]);
    }
}

/* ---- matching ------------------------------------------------------------------------- */

static void arm64_node_accepts_arm64_and_32_bit_arm_down_to_v5(void **state)
{
    static const struct match_case tc[] = {
        {"linux/arm64",
         {"linux/arm64", "linux/arm64/v8", "linux/aarch64", "linux/arm64/v8.0", "linux/arm/v8",
          "linux/arm/v7", "linux/arm", "linux/armhf", "linux/arm/v6", "linux/armel",
          "linux/arm/v5"},
         {"linux/amd64", "linux/386", "linux/arm/v4", "linux/arm/v9", "linux/arm64/v9",
          "linux/arm64/v8.1", "windows/arm64", "windows/arm", "darwin/arm64"}},
        /* The same node spelled three ways. */
        {"linux/arm64/v8", {"linux/arm64", "linux/arm/v7"}, {"linux/arm64/v9"}},
        {"linux/aarch64", {"linux/arm64/v8", "linux/arm/v5"}, {"linux/amd64"}},
    };
    check_matches(tc, N_OF(tc));
}

static void amd64_node_accepts_386(void **state)
{
    static const struct match_case tc[] = {
        {"linux/amd64",
         {"linux/amd64", "linux/x86_64", "linux/amd64/v1", "linux/386", "linux/i386"},
         {"linux/amd64/v2", "linux/amd64/v3", "linux/arm64", "linux/arm/v7", "windows/amd64",
          "windows/386", "linux/i686"}},
    };
    check_matches(tc, N_OF(tc));
}

static void amd64_v3_node_accepts_lower_amd64_variants_and_386(void **state)
{
    static const struct match_case tc[] = {
        {"linux/amd64/v3",
         {"linux/amd64/v3", "linux/amd64/v2", "linux/amd64/v1", "linux/amd64", "linux/386"},
         {"linux/amd64/v4", "linux/arm64", "windows/amd64"}},
        {"linux/amd64/v2",
         {"linux/amd64", "linux/amd64/v1", "linux/amd64/v2", "linux/386"},
         {"linux/amd64/v3", "linux/amd64/v4", "linux/arm/v7", "linux/arm64", "windows/amd64"}},
    };
    check_matches(tc, N_OF(tc));
}

static void arm_v7_node_never_accepts_arm64(void **state)
{
    static const struct match_case tc[] = {
        {"linux/arm/v7",
         {"linux/arm", "linux/arm/v7", "linux/armhf", "linux/arm/v6", "linux/arm/v5"},
         {"linux/arm64", "linux/arm64/v8", "linux/arm/v8", "linux/arm/v4", "linux/amd64",
          "windows/arm"}},
        {"linux/arm/v8",
         {"linux/arm", "linux/arm/v5", "linux/arm/v6", "linux/arm/v7", "linux/arm/v8"},
         {"linux/arm64", "linux/arm/v4", "linux/amd64", "windows/arm"}},
        {"linux/arm/v6",
         {"linux/arm/v5", "linux/arm/v6", "linux/armel"},
         {"linux/arm", "linux/arm/v7", "linux/arm/v8", "linux/arm/v4", "linux/arm64"}},
        {"linux/arm/v5", {"linux/arm/v5"}, {"linux/arm", "linux/arm/v4", "linux/arm/v6"}},
        {"linux/arm/v4", {"linux/arm/v4"}, {"linux/arm/v5", "linux/arm"}},
    };
    check_matches(tc, N_OF(tc));
}

static void i386_node_never_accepts_amd64(void **state)
{
    static const struct match_case tc[] = {
        {"linux/386",
         {"linux/386", "linux/i386"},
         {"linux/amd64", "linux/amd64/v2", "linux/arm/v7", "linux/arm64", "windows/386"}},
    };
    check_matches(tc, N_OF(tc));
}

static void arm64_v8_x_and_v9_x_nodes_accept_lower_arm64_variants(void **state)
{
    static const struct match_case tc[] = {
        {"linux/arm64/v8.1",
         {"linux/arm64/v8.1", "linux/arm64/v8", "linux/arm64", "linux/arm/v8", "linux/arm/v5"},
         {"linux/arm64/v8.2", "linux/arm64/v9", "linux/amd64"}},
        {"linux/arm64/v9",
         {"linux/arm64/v9", "linux/arm64/v9.0", "linux/arm64/v8.5", "linux/arm64/v8.1",
          "linux/arm64", "linux/arm/v8", "linux/arm/v7", "linux/arm/v5"},
         {"linux/arm64/v8.6", "linux/arm64/v9.1", "linux/arm/v4", "linux/amd64"}},
        {"linux/arm64/v9.6",
         {"linux/arm64/v9.6", "linux/arm64/v9.5", "linux/arm64/v9.1", "linux/arm64/v9",
          "linux/arm64/v8.9", "linux/arm64/v8.1", "linux/arm64", "linux/arm/v8", "linux/arm/v5"},
         {"linux/arm64/v8.10", "linux/arm64/v9.7", "linux/arm/v4", "linux/amd64"}},
    };
    check_matches(tc, N_OF(tc));
}

static void arm64_node_with_an_unknown_variant_accepts_only_itself(void **state)
{
    /* containerd 2.x gives such a node an empty vector (matches nothing); archmirror keeps
     * the exact match and no fallbacks. */
    assert_int_equal(rank_of("linux/arm64/v10", "linux/arm64/v10"), 0);
    assert_int_equal(rank_of("linux/arm64/v10", "linux/arm64"), -1);
    assert_int_equal(rank_of("linux/arm64/v10", "linux/arm/v7"), -1);
}

static void fallback_ranks_follow_containerds_platform_vector_order(void **state)
{
    /* compare.go platformVector(arm64) = arm64/v8, arm/v8, arm/v7, arm/v6, arm/v5 */
    assert_int_equal(rank_of("linux/arm64", "linux/arm64/v8"), 0);
    assert_int_equal(rank_of("linux/arm64", "linux/arm/v8"), 1);
    assert_int_equal(rank_of("linux/arm64", "linux/arm/v7"), 2);
    assert_int_equal(rank_of("linux/arm64", "linux/arm/v6"), 3);
    assert_int_equal(rank_of("linux/arm64", "linux/arm/v5"), 4);
    /* amd64/v3 = v3, v2, v1, 386 */
    assert_int_equal(rank_of("linux/amd64/v3", "linux/amd64/v3"), 0);
    assert_int_equal(rank_of("linux/amd64/v3", "linux/amd64/v2"), 1);
    assert_int_equal(rank_of("linux/amd64/v3", "linux/amd64"), 2);
    assert_int_equal(rank_of("linux/amd64/v3", "linux/386"), 3);
    assert_int_equal(rank_of("linux/amd64", "linux/386"), 1);
    /* arm/v7 = v7, v6, v5 */
    assert_int_equal(rank_of("linux/arm/v7", "linux/arm/v6"), 1);
    assert_int_equal(rank_of("linux/arm/v7", "linux/arm/v5"), 2);
    /* arm64/v9.1 = v9.1, v9, v8.6 … v8.1, v8, arm/v8 … */
    assert_int_equal(rank_of("linux/arm64/v9.1", "linux/arm64/v9"), 1);
    assert_int_equal(rank_of("linux/arm64/v9.1", "linux/arm64/v8.6"), 2);
    assert_int_equal(rank_of("linux/arm64/v9.1", "linux/arm64"), 8);
    assert_int_equal(rank_of("linux/arm64/v9.1", "linux/arm/v8"), 9);
    assert_int_equal(rank_of("linux/arm64/v9.1", "linux/arm/v5"), 12);
}

static void the_os_must_match(void **state)
{
    assert_int_equal(rank_of("linux/amd64", "windows/amd64"), -1);
    assert_int_equal(rank_of("windows/amd64", "linux/amd64"), -1);
    assert_int_equal(rank_of("windows/amd64", "windows/386"), 1);
    assert_int_equal(rank_of("darwin/arm64", "macos/arm64"), 0);
    /* An entry without an os is read as linux. */
    struct am_platform n = parse_ok("linux/arm64"), c = plat("", "arm64", "");
    assert_true(am_platform_matches(&n, &c));
}

static void windows_nodes_match_compatible_os_versions(void **state)
{
    /* platform_windows_compat.go checkWindowsHostAndContainerCompat */
    static const struct match_case tc[] = {
        {"windows/amd64",
         {"windows/amd64", "windows(10.0.17763)/amd64", "windows(10.0.20348)/amd64"},
         {"linux/amd64"}},
        {"windows(10.0.17763)/amd64",
         {"windows/amd64", "windows(10.0.17763)/amd64", "windows(10.0.17763.1234)/amd64"},
         {"windows(10.0.17764)/amd64", "windows(10.0.20348)/amd64", "windows(6.3.17763)/amd64",
          "windows(bogus)/amd64"}},
        {"windows(10.0.20348)/amd64",
         {"windows(10.0.20348.2700)/amd64"},
         {"windows(10.0.17763)/amd64", "windows(10.0.20349)/amd64"}},
        {"windows(10.0.26100)/amd64",
         {"windows(10.0.20348)/amd64", "windows(10.0.22621)/amd64", "windows(10.0.26100)/amd64"},
         {"windows(10.0.17763)/amd64", "windows(10.0.26101)/amd64"}},
        {"windows(10.0.26200)/amd64",
         {"windows(10.0.26100)/amd64", "windows(10.0.26200)/amd64"},
         {"windows(10.0.20348)/amd64"}},
        /* A node version that does not parse matches every version. */
        {"windows(10.0)/amd64", {"windows(10.0.17763)/amd64"}, {"linux/amd64"}},
    };
    check_matches(tc, N_OF(tc));
    /* Linux ignores os.version, as containerd's matcher does. */
    assert_int_equal(rank_of("linux(1.0)/amd64", "linux(2.0)/amd64"), 0);
}

static void os_features_of_a_candidate_must_be_a_subset_of_the_nodes(void **state)
{
    struct am_platform n = parse_ok("linux/amd64"), w = parse_ok("windows/amd64");
    struct am_platform_features nf, cf;

    memset(&nf, 0, sizeof nf);
    memset(&cf, 0, sizeof cf);
    assert_true(am_platform_features_match(&n, NULL, NULL));
    nf.n = 2;
    snprintf(nf.v[0], sizeof nf.v[0], "simd");
    snprintf(nf.v[1], sizeof nf.v[1], "gpu");
    assert_true(am_platform_features_match(&n, &nf, &cf));
    cf.n = 1;
    snprintf(cf.v[0], sizeof cf.v[0], "gpu");
    assert_true(am_platform_features_match(&n, &nf, &cf));
    snprintf(cf.v[cf.n++], sizeof cf.v[0], "erofs");
    assert_false(am_platform_features_match(&n, &nf, &cf));
    assert_false(am_platform_features_match(&n, NULL, &cf));
    /* windowsStripFeaturesMatcher: win32k on the candidate is ignored for windows. */
    memset(&cf, 0, sizeof cf);
    cf.n = 1;
    snprintf(cf.v[0], sizeof cf.v[0], "win32k");
    assert_true(am_platform_features_match(&w, NULL, &cf));
    assert_false(am_platform_features_match(&n, NULL, &cf));
}

static void huge_variant_numbers_neither_loop_nor_overflow(void **state)
{
    int r = rank_of("linux/amd64/v9223372036854775807", "linux/amd64/v2");
    assert_true(r > 0);
    assert_true(rank_of("linux/amd64/v9223372036854775807", "linux/386") > 0);
    assert_true(rank_of("linux/arm/v9223372036854775807", "linux/arm/v5") > 0);
    /* Out of int64 range: strconv.Atoi fails, so there are no amd64 fallbacks. */
    assert_int_equal(rank_of("linux/amd64/v99999999999999999999", "linux/amd64/v2"), -1);
    assert_int_equal(rank_of("linux/amd64/v99999999999999999999", "linux/386"), 1);
    /* Only canonical "vN" spellings are in the vector. */
    assert_int_equal(rank_of("linux/amd64/v3", "linux/amd64/v02"), -1);
    assert_int_equal(rank_of("linux/amd64/v3", "linux/amd64/2"), -1);
    assert_int_equal(rank_of("linux/amd64/v3", "linux/386/v1"), -1);
}

static void equal_compares_normalised_platforms(void **state)
{
    struct am_platform a = plat("linux", "aarch64", "v8"), b = plat("Linux", "arm64", "");
    assert_true(am_platform_equal(&a, &b));
    a = plat("linux", "arm", "");
    b = plat("linux", "armhf", "");
    assert_true(am_platform_equal(&a, &b));
    b = plat("linux", "arm", "v6");
    assert_false(am_platform_equal(&a, &b));
    a = plat("windows", "amd64", "");
    b = a;
    snprintf(b.os_version, sizeof b.os_version, "10.0.17763");
    assert_false(am_platform_equal(&a, &b));
}

/* ---- image platforms ------------------------------------------------------------------ */

static void lists_index_platforms_without_attestations_or_unknown(void **state)
{
    struct am_descriptor e[] = {
        desc("linux", "amd64", ""),
        desc("linux", "arm64", "v8"),
        desc("linux", "arm", "v7"),
        attestation(),
        attestation(),
        desc("unknown", "unknown", ""),
    };
    struct am_manifest idx = index_of(e, N_OF(e));
    struct am_platform_entry out[N_OF(e)];
    char buf[AM_PLATFORM_FORMAT_SIZE];
    size_t n = 99;

    assert_int_equal(am_platform_list_from_index(&idx, out, N_OF(out), &n), 0);
    assert_int_equal(n, 3);
    assert_int_equal(am_platform_format(&out[0].platform, buf, sizeof buf), 0);
    assert_string_equal(buf, "linux/amd64");
    assert_int_equal(out[0].index, 0);
    assert_int_equal(am_platform_format(&out[1].platform, buf, sizeof buf), 0);
    assert_string_equal(buf, "linux/arm64");
    assert_int_equal(out[1].index, 1);
    assert_int_equal(am_platform_format(&out[2].platform, buf, sizeof buf), 0);
    assert_string_equal(buf, "linux/arm/v7");
    assert_int_equal(out[2].index, 2);
}

static void excludes_an_attestation_whatever_its_platform(void **state)
{
    struct am_descriptor e[] = {desc("linux", "amd64", ""), desc("linux", "arm64", "")};
    struct am_manifest idx = index_of(e, N_OF(e));
    struct am_platform_entry out[2];
    size_t n;

    e[1].is_attestation = true;
    assert_int_equal(am_platform_list_from_index(&idx, out, N_OF(out), &n), 0);
    assert_int_equal(n, 1);
    assert_string_equal(out[0].platform.architecture, "amd64");
}

static void excludes_entries_without_a_platform(void **state)
{
    struct am_descriptor e[] = {desc("linux", "amd64", ""), desc("", "", "")};
    struct am_manifest idx = index_of(e, N_OF(e));
    struct am_platform_entry out[2];
    size_t n;

    e[1].has_platform = false; /* e.g. a nested index */
    assert_int_equal(am_platform_list_from_index(&idx, out, N_OF(out), &n), 0);
    assert_int_equal(n, 1);
}

static void list_deduplicates_equal_platforms_keeping_the_first_entry(void **state)
{
    struct am_descriptor e[] = {
        desc("linux", "arm64", "v8"), desc("linux", "aarch64", ""), desc("linux", "arm64", ""),
        desc("linux", "arm", ""),     desc("linux", "arm", "v7"),   desc("Linux", "x86_64", "v1"),
        desc("linux", "amd64", ""),
    };
    struct am_manifest idx = index_of(e, N_OF(e));
    struct am_platform_entry out[N_OF(e)];
    size_t n;

    assert_int_equal(am_platform_list_from_index(&idx, out, N_OF(out), &n), 0);
    assert_int_equal(n, 3);
    assert_int_equal(out[0].index, 0);
    assert_int_equal(out[1].index, 3);
    assert_int_equal(out[2].index, 5);
    assert_string_equal(out[2].platform.architecture, "amd64");
}

static void list_keeps_windows_os_versions_apart(void **state)
{
    struct am_descriptor e[] = {desc("windows", "amd64", ""), desc("windows", "amd64", "")};
    struct am_manifest idx = index_of(e, N_OF(e));
    struct am_platform_entry out[2];
    size_t n;

    snprintf(e[0].platform.os_version, sizeof e[0].platform.os_version, "10.0.17763.1");
    snprintf(e[1].platform.os_version, sizeof e[1].platform.os_version, "10.0.20348.1");
    assert_int_equal(am_platform_list_from_index(&idx, out, N_OF(out), &n), 0);
    assert_int_equal(n, 2);
}

static void list_reports_too_large_when_the_output_is_short(void **state)
{
    struct am_descriptor e[] = {desc("linux", "amd64", ""), desc("linux", "arm64", ""),
                                desc("linux", "s390x", "")};
    struct am_manifest idx = index_of(e, N_OF(e));
    struct am_platform_entry out[2];
    size_t n = 99;

    assert_int_equal(am_platform_list_from_index(&idx, out, 2, &n), AM_ETOO_LARGE);
    assert_int_equal(n, 2);
    assert_int_equal(am_platform_list_from_index(&idx, out, 0, &n), AM_ETOO_LARGE);
    assert_int_equal(n, 0);
}

static void list_of_an_empty_index_is_empty(void **state)
{
    struct am_manifest idx = index_of(NULL, 0);
    size_t n = 99;
    assert_int_equal(am_platform_list_from_index(&idx, NULL, 0, &n), 0);
    assert_int_equal(n, 0);
}

static void list_and_best_match_refuse_a_single_arch_manifest(void **state)
{
    struct am_descriptor layers[] = {desc("linux", "amd64", "")};
    struct am_manifest m = index_of(layers, 1);
    struct am_platform_entry out[1];
    struct am_platform node = parse_ok("linux/amd64");
    size_t n, e;

    m.kind = AM_MT_OCI_MANIFEST;
    assert_int_equal(am_platform_list_from_index(&m, out, 1, &n), AM_EINVAL);
    assert_int_equal(am_platform_best_match(&m, &node, &e), AM_EINVAL);
    m.kind = AM_MT_DOCKER_MANIFEST;
    assert_int_equal(am_platform_best_match(&m, &node, &e), AM_EINVAL);
    m.kind = AM_MT_DOCKER_LIST;
    assert_int_equal(am_platform_best_match(&m, &node, &e), 0);
}

static void best_match_prefers_the_exact_entry_over_a_fallback(void **state)
{
    struct am_descriptor e[] = {
        desc("linux", "386", ""),   desc("linux", "arm", "v5"),   desc("linux", "arm", "v7"),
        desc("linux", "amd64", ""), desc("linux", "arm64", "v8"), attestation(),
    };
    struct am_manifest idx = index_of(e, N_OF(e));

    assert_int_equal(best(&idx, "linux/amd64"), 3);
    assert_int_equal(best(&idx, "linux/arm64"), 4);
    assert_int_equal(best(&idx, "linux/aarch64"), 4);
    assert_int_equal(best(&idx, "linux/arm/v7"), 2);
    assert_int_equal(best(&idx, "linux/arm/v6"), 1);
    assert_int_equal(best(&idx, "linux/386"), 0);
}

static void best_match_falls_back_in_platform_vector_order(void **state)
{
    struct am_descriptor e[] = {
        desc("linux", "arm", "v5"), desc("linux", "arm", "v6"),   desc("linux", "arm", ""),
        desc("linux", "386", ""),   desc("linux", "amd64", "v2"),
    };
    struct am_manifest idx = index_of(e, N_OF(e));

    /* arm64: arm/v8 absent, so arm/v7 (entry 2, "arm" = v7) before v6 and v5. */
    assert_int_equal(best(&idx, "linux/arm64"), 2);
    /* amd64 (v1): amd64/v2 is not acceptable, 386 is. */
    assert_int_equal(best(&idx, "linux/amd64"), 3);
    /* amd64/v3: v2 before 386. */
    assert_int_equal(best(&idx, "linux/amd64/v3"), 4);
}

static void best_match_takes_the_earliest_of_equal_entries(void **state)
{
    struct am_descriptor e[] = {
        desc("linux", "amd64", ""),
        desc("linux", "arm64", ""),
        desc("linux", "arm64", "v8"),
    };
    struct am_manifest idx = index_of(e, N_OF(e));

    snprintf(e[2].media_type, sizeof e[2].media_type, "%s", AM_MT_DOCKER_MANIFEST_S);
    assert_int_equal(best(&idx, "linux/arm64"), 1);
}

static void best_match_reports_not_found_when_nothing_fits(void **state)
{
    struct am_descriptor amd_only[] = {desc("linux", "amd64", ""), attestation()};
    struct am_descriptor arm64_only[] = {desc("linux", "arm64", "v8")};
    struct am_manifest a = index_of(amd_only, N_OF(amd_only));
    struct am_manifest b = index_of(arm64_only, N_OF(arm64_only));
    struct am_platform node;
    size_t e = 77;

    node = parse_ok("linux/arm64");
    assert_int_equal(am_platform_best_match(&a, &node, &e), AM_ENOT_FOUND);
    assert_int_equal(e, 77);
    node = parse_ok("linux/arm/v7");
    assert_int_equal(am_platform_best_match(&b, &node, &e), AM_ENOT_FOUND);
    node = parse_ok("linux/386");
    assert_int_equal(am_platform_best_match(&a, &node, &e), AM_ENOT_FOUND);
    node = parse_ok("windows/amd64");
    assert_int_equal(am_platform_best_match(&a, &node, &e), AM_ENOT_FOUND);
}

static void best_match_never_picks_an_attestation_or_an_unplatformed_entry(void **state)
{
    struct am_descriptor e[] = {attestation(), desc("linux", "arm64", ""),
                                desc("linux", "arm64", ""), desc("linux", "arm", "v7")};
    struct am_manifest idx = index_of(e, N_OF(e));
    struct am_platform node = plat("unknown", "unknown", "");
    size_t got;

    e[1].is_attestation = true;
    e[2].has_platform = false;
    assert_int_equal(best(&idx, "linux/arm64"), 3);
    assert_int_equal(am_platform_best_match(&idx, &node, &got), AM_ENOT_FOUND);
}

/* ---- config blob ---------------------------------------------------------------------- */

static void expect_config(const char *json, const char *want)
{
    struct am_platform p;
    struct am_platform_features f;
    char msg[256] = "", buf[AM_PLATFORM_FORMAT_ALL_SIZE];
    int rc = am_platform_from_config_json(json, strlen(json), &p, &f, msg, sizeof msg);
    if (rc != 0) fail_msg("refused %s: %s", json, msg);
    assert_int_equal(am_platform_format_all(&p, &f, buf, sizeof buf), 0);
    if (strcmp(buf, want) != 0) fail_msg("%s → %s, want %s", json, buf, want);
}

static void reads_the_platform_of_a_config_blob(void **state)
{
    expect_config("{\"architecture\":\"amd64\",\"os\":\"linux\",\"config\":{\"Env\":[\"A=1\"]},"
                  "\"rootfs\":{\"type\":\"layers\",\"diff_ids\":[]},\"history\":[]}",
                  "linux/amd64");
    expect_config("{\"architecture\":\"arm64\",\"variant\":\"v8\",\"os\":\"linux\"}",
                  "linux/arm64");
    expect_config("{\"architecture\":\"aarch64\",\"os\":\"Linux\"}", "linux/arm64");
    expect_config("{\"architecture\":\"arm\",\"os\":\"linux\"}", "linux/arm/v7");
    expect_config("{\"architecture\":\"arm\",\"variant\":\"v6\",\"os\":\"linux\"}", "linux/arm/v6");
    expect_config("{\"architecture\":\"amd64\",\"os\":\"windows\",\"os.version\":"
                  "\"10.0.17763.1879\",\"os.features\":[\"win32k\"]}",
                  "windows(10.0.17763.1879+win32k)/amd64");
    expect_config("{\"architecture\":\"amd64\",\"os\":\"linux\",\"os.features\":null,"
                  "\"variant\":\"v1\"}",
                  "linux/amd64");
    /* Go's decoder and jansson both keep the last of duplicate keys. */
    expect_config("{\"architecture\":\"amd64\",\"architecture\":\"s390x\",\"os\":\"linux\"}",
                  "linux/s390x");
}

static void config_platform_matches_like_an_index_entry(void **state)
{
    const char *json = "{\"architecture\":\"arm\",\"variant\":\"v7\",\"os\":\"linux\"}";
    struct am_platform p, arm64 = parse_ok("linux/arm64"), amd64 = parse_ok("linux/amd64");
    assert_int_equal(am_platform_from_config_json(json, strlen(json), &p, NULL, NULL, 0), 0);
    assert_true(am_platform_matches(&arm64, &p));
    assert_false(am_platform_matches(&amd64, &p));
}

static void expect_config_error(const char *json, size_t len)
{
    struct am_platform p = plat("sentinel", "sentinel", "");
    char msg[256] = "";
    int rc = am_platform_from_config_json(json, len, &p, NULL, msg, sizeof msg);
    if (rc != AM_EMANIFEST_INVALID) fail_msg("accepted %.*s (rc %d)", (int)len, json, rc);
    if (msg[0] == '\0') fail_msg("no message for %.*s", (int)len, json);
    for (const char *m = msg; *m; m++)
        if ((unsigned char)*m < 0x20 || (unsigned char)*m > 0x7e)
            fail_msg("non-printable message for %.*s", (int)len, json);
    assert_string_equal(p.os, "sentinel");
}

static void expect_config_error_s(const char *json)
{
    expect_config_error(json, strlen(json));
}

static void refuses_config_blobs_that_are_not_valid(void **state)
{
    char big[512];

    expect_config_error_s("");
    expect_config_error(NULL, 0);
    expect_config_error_s("{");
    expect_config_error_s("{\"architecture\":\"amd64\",\"os\":\"linux\"} trailing");
    expect_config_error_s("[]");
    expect_config_error_s("\"linux/amd64\"");
    expect_config_error_s("{}");
    expect_config_error_s("{\"os\":\"linux\"}");
    expect_config_error_s("{\"architecture\":\"amd64\"}");
    expect_config_error_s("{\"architecture\":\"\",\"os\":\"linux\"}");
    expect_config_error_s("{\"architecture\":\"amd64\",\"os\":\"\"}");
    expect_config_error_s("{\"architecture\":64,\"os\":\"linux\"}");
    expect_config_error_s("{\"architecture\":\"amd64\",\"os\":null}");
    expect_config_error_s("{\"architecture\":\"amd64\",\"os\":\"linux\",\"variant\":7}");
    expect_config_error_s("{\"architecture\":\"amd64\",\"os\":\"linux\",\"os.version\":[]}");
    expect_config_error_s("{\"architecture\":\"amd 64\",\"os\":\"linux\"}");
    expect_config_error_s("{\"architecture\":\"amd64\\r\\n\",\"os\":\"linux\"}");
    expect_config_error_s("{\"architecture\":\"amd64\\u0000\",\"os\":\"linux\"}");
    expect_config_error_s("{\"architecture\":\"am\xc3\xa9\",\"os\":\"linux\"}");
    expect_config_error_s("{\"architecture\":\"amd64\",\"os\":\"linux\",\"os.features\":\"x\"}");
    expect_config_error_s("{\"architecture\":\"amd64\",\"os\":\"linux\",\"os.features\":[1]}");
    expect_config_error_s("{\"architecture\":\"amd64\",\"os\":\"linux\",\"os.features\":"
                          "[\"a\",\"b\",\"c\",\"d\",\"e\",\"f\",\"g\",\"h\",\"i\"]}");
    snprintf(big, sizeof big, "{\"architecture\":\"%0*d\",\"os\":\"linux\"}",
             AM_PLATFORM_FIELD_MAX + 1, 0);
    expect_config_error_s(big);
    snprintf(big, sizeof big,
             "{\"architecture\":\"amd64\",\"os\":\"linux\",\"os.features\":"
             "[\"%0*d\"]}",
             AM_PLATFORM_FIELD_MAX + 1, 0);
    expect_config_error_s(big);
    /* Exactly the limit is fine. */
    snprintf(big, sizeof big, "{\"architecture\":\"%0*d\",\"os\":\"linux\"}", AM_PLATFORM_FIELD_MAX,
             0);
    struct am_platform p;
    assert_int_equal(am_platform_from_config_json(big, strlen(big), &p, NULL, NULL, 0), 0);
    /* Length-bounded: the bytes after len are not read. */
    const char *json = "{\"architecture\":\"amd64\",\"os\":\"linux\"}garbage";
    assert_int_equal(am_platform_from_config_json(json, strlen(json) - 7, &p, NULL, NULL, 0), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(normalises_aarch64_to_arm64_and_arm64_v8_to_no_variant),
        cmocka_unit_test(normalises_arm64_v9_spellings_to_v9),
        cmocka_unit_test(normalises_x86_64_spellings_to_amd64_and_drops_v1),
        cmocka_unit_test(normalises_i386_to_386_but_leaves_i686_as_containerd_does),
        cmocka_unit_test(normalises_armhf_armel_and_bare_arm),
        cmocka_unit_test(normalises_numeric_arm_variants),
        cmocka_unit_test(lowercases_the_os_and_maps_macos_to_darwin),
        cmocka_unit_test(reads_an_empty_os_as_linux),
        cmocka_unit_test(keeps_os_version_verbatim_when_normalising),
        cmocka_unit_test(normalisation_is_idempotent),
        cmocka_unit_test(normalises_features_sorted_and_unique),
        cmocka_unit_test(parses_specifiers_into_the_normalised_platform),
        cmocka_unit_test(parses_a_lone_architecture_as_linux),
        cmocka_unit_test(refuses_a_lone_os_because_a_mirror_has_no_default_architecture),
        cmocka_unit_test(refuses_a_lone_unknown_word),
        cmocka_unit_test(parses_os_version_and_features),
        cmocka_unit_test(parses_input_that_is_not_nul_terminated),
        cmocka_unit_test(rejects_empty_and_overlong_specifiers),
        cmocka_unit_test(rejects_too_many_and_empty_components),
        cmocka_unit_test(rejects_garbage_characters),
        cmocka_unit_test(rejects_overlong_components),
        cmocka_unit_test(rejects_more_features_than_the_limit),
        cmocka_unit_test(parse_message_quotes_input_safely),
        cmocka_unit_test(formats_like_containerd),
        cmocka_unit_test(format_reports_a_short_buffer),
        cmocka_unit_test(format_sizes_fit_the_longest_platform),
        cmocka_unit_test(format_all_round_trips_through_parse),
        cmocka_unit_test(arm64_node_accepts_arm64_and_32_bit_arm_down_to_v5),
        cmocka_unit_test(amd64_node_accepts_386),
        cmocka_unit_test(amd64_v3_node_accepts_lower_amd64_variants_and_386),
        cmocka_unit_test(arm_v7_node_never_accepts_arm64),
        cmocka_unit_test(i386_node_never_accepts_amd64),
        cmocka_unit_test(arm64_v8_x_and_v9_x_nodes_accept_lower_arm64_variants),
        cmocka_unit_test(arm64_node_with_an_unknown_variant_accepts_only_itself),
        cmocka_unit_test(fallback_ranks_follow_containerds_platform_vector_order),
        cmocka_unit_test(the_os_must_match),
        cmocka_unit_test(windows_nodes_match_compatible_os_versions),
        cmocka_unit_test(os_features_of_a_candidate_must_be_a_subset_of_the_nodes),
        cmocka_unit_test(huge_variant_numbers_neither_loop_nor_overflow),
        cmocka_unit_test(equal_compares_normalised_platforms),
        cmocka_unit_test(lists_index_platforms_without_attestations_or_unknown),
        cmocka_unit_test(excludes_an_attestation_whatever_its_platform),
        cmocka_unit_test(excludes_entries_without_a_platform),
        cmocka_unit_test(list_deduplicates_equal_platforms_keeping_the_first_entry),
        cmocka_unit_test(list_keeps_windows_os_versions_apart),
        cmocka_unit_test(list_reports_too_large_when_the_output_is_short),
        cmocka_unit_test(list_of_an_empty_index_is_empty),
        cmocka_unit_test(list_and_best_match_refuse_a_single_arch_manifest),
        cmocka_unit_test(best_match_prefers_the_exact_entry_over_a_fallback),
        cmocka_unit_test(best_match_falls_back_in_platform_vector_order),
        cmocka_unit_test(best_match_takes_the_earliest_of_equal_entries),
        cmocka_unit_test(best_match_reports_not_found_when_nothing_fits),
        cmocka_unit_test(best_match_never_picks_an_attestation_or_an_unplatformed_entry),
        cmocka_unit_test(reads_the_platform_of_a_config_blob),
        cmocka_unit_test(config_platform_matches_like_an_index_entry),
        cmocka_unit_test(refuses_config_blobs_that_are_not_valid),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

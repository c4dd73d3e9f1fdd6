/*
 * platform — containerd's platform rules, so that archmirror judges an image the way the
 * node's containerd will.
 *
 * Sources (read, not copied): github.com/containerd/platforms at v1.0.0-rc.2..rc.4
 * (the module containerd 2.2 vendors; "2.x" below) and github.com/containerd/containerd
 * v1.6.20 platforms/ ("1.6"), the version Debian 12 ships. Where they differ the comment
 * says so; archmirror follows 2.x, which extends 1.6 (arm64 v8.x/v9.x, v8.0, the
 * "os(version+features)" syntax, Windows os.version matching).
 *
 * What this module must never do: read the host's platform (containerd's Parse and
 * normalizeOS fall back to runtime.GOOS/GOARCH and /proc/cpuinfo, cpuinfo_linux.go
 * getCPUVariant; on a mirror those describe the wrong machine), allocate, or accept a
 * byte that could break a header, a log line or an LMDB key.
 *
 * DESIGN: containerd matches by building a vector of acceptable platforms (compare.go
 * platformVector) and asking each, in order (Ordered). For amd64/vN and arm/vN that
 * vector has N entries — unbounded for a hostile "v99999999" — so rank() computes the
 * position in the vector arithmetically instead; only arm64, whose vector is bounded
 * by a fixed table, is enumerated.
 */
#include "archmirror/platform.h"

#include <jansson.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "archmirror/error.h"
#include "archmirror/mediatype.h"

/* containerd's Parse and normalizeOS use runtime.GOOS; archmirror's nodes are Linux
 * (the kubelet's containerd), and an index entry without "os" is read as Linux there. */
#define DEFAULT_OS "linux"
/* How much of a rejected input a message echoes. */
#define QUOTE_MAX 48

/* A printable, bounded copy of untrusted input for a message. */
static void quote(char dst[QUOTE_MAX + 4], const char *s, size_t len)
{
    size_t n = len < QUOTE_MAX ? len : QUOTE_MAX;

    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        dst[i] = (c < 0x20 || c > 0x7e || c == '"') ? '?' : (char)c;
    }
    if (n < len) {
        memcpy(dst + n, "...", 4);
    } else {
        dst[n] = '\0';
    }
}

static bool streq(const char *a, const char *b)
{
    return strcmp(a, b) == 0;
}

/* Writes a short literal into a platform field (all literals here are < 8 bytes). */
static void set_field(char dst[AM_PLATFORM_FIELD_MAX + 1], const char *lit)
{
    size_t n = strlen(lit);
    memcpy(dst, lit, n + 1);
}

/* strings.ToLower for the ASCII these fields hold; other bytes are left alone. */
static void lower(char *s)
{
    for (; *s; s++)
        if (*s >= 'A' && *s <= 'Z') *s = (char)(*s - 'A' + 'a');
}

static bool printable(const char *s, size_t len)
{
    for (size_t i = 0; i < len; i++)
        if ((unsigned char)s[i] < 0x21 || (unsigned char)s[i] > 0x7e) return false;
    return true;
}

/* ---- database.go ---------------------------------------------------------------- */

/* database.go isKnownOS (generated from Go's syslist.go). */
static bool known_os(const char *os)
{
    static const char *const list[] = {
        "aix",   "android", "darwin", "dragonfly", "freebsd", "hurd",    "illumos", "ios", "js",
        "linux", "nacl",    "netbsd", "openbsd",   "plan9",   "solaris", "windows", "zos",
    };
    for (size_t i = 0; i < sizeof list / sizeof list[0]; i++)
        if (streq(os, list[i])) return true;
    return false;
}

/* database.go isKnownArch. */
static bool known_arch(const char *arch)
{
    static const char *const list[] = {
        "386",     "amd64",    "amd64p32",  "arm",         "armbe",   "arm64",
        "arm64be", "ppc64",    "ppc64le",   "loong64",     "mips",    "mipsle",
        "mips64",  "mips64le", "mips64p32", "mips64p32le", "ppc",     "riscv",
        "riscv64", "s390",     "s390x",     "sparc",       "sparc64", "wasm",
    };
    for (size_t i = 0; i < sizeof list / sizeof list[0]; i++)
        if (streq(arch, list[i])) return true;
    return false;
}

/* database.go normalizeOS: lowercase, "macos" → "darwin"; "" becomes runtime.GOOS there,
 * DEFAULT_OS here. */
static void normalize_os(char os[AM_PLATFORM_FIELD_MAX + 1])
{
    if (os[0] == '\0') {
        set_field(os, DEFAULT_OS);
        return;
    }
    lower(os);
    if (streq(os, "macos")) set_field(os, "darwin");
}

/* database.go normalizeArch (2.x). Only the spellings listed are rewritten: "i686" or
 * "armv7l" stay as they are, and so never match 386 or arm — containerd would not pull
 * such an entry either. 1.6 lacks the arm64 "v8.0" and "9"/"9.0"/"v9.0" cases. */
static void normalize_arch(char arch[AM_PLATFORM_FIELD_MAX + 1],
                           char variant[AM_PLATFORM_FIELD_MAX + 1])
{
    lower(arch);
    lower(variant);
    if (streq(arch, "i386")) {
        set_field(arch, "386");
        variant[0] = '\0';
    } else if (streq(arch, "x86_64") || streq(arch, "x86-64") || streq(arch, "amd64")) {
        set_field(arch, "amd64");
        if (streq(variant, "v1")) variant[0] = '\0';
    } else if (streq(arch, "aarch64") || streq(arch, "arm64")) {
        set_field(arch, "arm64");
        if (streq(variant, "8") || streq(variant, "v8") || streq(variant, "v8.0"))
            variant[0] = '\0';
        else if (streq(variant, "9") || streq(variant, "9.0") || streq(variant, "v9.0"))
            set_field(variant, "v9");
    } else if (streq(arch, "armhf")) {
        set_field(arch, "arm");
        set_field(variant, "v7");
    } else if (streq(arch, "armel")) {
        set_field(arch, "arm");
        set_field(variant, "v6");
    } else if (streq(arch, "arm")) {
        if (variant[0] == '\0' || streq(variant, "7"))
            set_field(variant, "v7");
        else if (streq(variant, "5") || streq(variant, "6") || streq(variant, "8")) {
            variant[2] = '\0';
            variant[1] = variant[0];
            variant[0] = 'v';
        }
    }
}

void am_platform_normalize(struct am_platform *p)
{
    normalize_os(p->os);
    normalize_arch(p->architecture, p->variant);
}

static int cmp_feature(const void *a, const void *b)
{
    return strcmp(a, b);
}

void am_platform_features_normalize(struct am_platform_features *f)
{
    size_t w = 0;

    if (f->n > AM_PLATFORM_FEATURES_MAX) f->n = AM_PLATFORM_FEATURES_MAX;
    qsort(f->v, f->n, sizeof f->v[0], cmp_feature);
    for (size_t i = 0; i < f->n; i++) {
        if (f->v[i][0] == '\0') continue;
        if (w > 0 && streq(f->v[w - 1], f->v[i])) continue;
        if (w != i) memcpy(f->v[w], f->v[i], sizeof f->v[0]);
        w++;
    }
    f->n = w;
}

/* ---- platforms.go Parse ---------------------------------------------------------- */

/* Character classes of 2.x platforms.go: specifierRe `^[A-Za-z0-9_.-]+$` for arch and
 * variant, and osRe's `[A-Za-z0-9_-]+` for the os name and `[A-Za-z0-9_.%-]` inside the
 * os options. (1.6's specifierRe has no '.', and no os options.) */
static bool is_alnum(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
}
static bool is_os_char(char c)
{
    return is_alnum(c) || c == '_' || c == '-';
}
static bool is_spec_char(char c)
{
    return is_os_char(c) || c == '.';
}
static bool is_option_char(char c)
{
    return is_spec_char(c) || c == '%';
}

static int hexval(char c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* platforms.go decodeOSOption (url.PathUnescape) into dst. A bad escape is an error, as
 * in Go; unlike Go, a decoded byte outside printable ASCII is refused too. */
static int decode_option(const char *s, size_t len, char dst[AM_PLATFORM_FIELD_MAX + 1],
                         const char *what, const char *spec, char *msg, size_t msglen)
{
    size_t w = 0;

    for (size_t i = 0; i < len; i++) {
        char c = s[i];
        if (c == '%') {
            int hi = i + 2 < len ? hexval(s[i + 1]) : -1;
            int lo = i + 2 < len ? hexval(s[i + 2]) : -1;
            if (hi < 0 || lo < 0) {
                am_error_setmsg(msg, msglen, "platform \"%s\": invalid %%-escape in the %s", spec,
                                what);
                return AM_EINVAL;
            }
            c = (char)(hi << 4 | lo);
            i += 2;
        }
        if (!printable(&c, 1)) {
            am_error_setmsg(msg, msglen, "platform \"%s\": the %s decodes to a non-printable byte",
                            spec, what);
            return AM_EINVAL;
        }
        if (w == AM_PLATFORM_FIELD_MAX) {
            am_error_setmsg(msg, msglen, "platform \"%s\": the %s is longer than %d bytes", spec,
                            what, AM_PLATFORM_FIELD_MAX);
            return AM_EINVAL;
        }
        dst[w++] = c;
    }
    dst[w] = '\0';
    return 0;
}

/* The first component, osRe in 2.x platforms.go:
 *   ^([A-Za-z0-9_-]+)(?:\(([A-Za-z0-9_.%-]*)((?:\+[A-Za-z0-9_.%-]+)*)\))?$
 * Fills p->os (not yet normalised), p->os_version and f; *has_options says whether
 * "(…)" was present. */
static int parse_os_component(const char *s, size_t len, struct am_platform *p,
                              struct am_platform_features *f, bool *has_options, const char *spec,
                              char *msg, size_t msglen)
{
    size_t i = 0, start;
    int rc;

    while (i < len && is_os_char(s[i])) i++;
    if (i == 0 || (i < len && (s[i] != '(' || s[len - 1] != ')'))) {
        am_error_setmsg(msg, msglen,
                        "platform \"%s\": invalid os component (want name[(version[+feature]...)] "
                        "of [A-Za-z0-9_-])",
                        spec);
        return AM_EINVAL;
    }
    if (i > AM_PLATFORM_FIELD_MAX) {
        am_error_setmsg(msg, msglen, "platform \"%s\": os longer than %d bytes", spec,
                        AM_PLATFORM_FIELD_MAX);
        return AM_EINVAL;
    }
    memcpy(p->os, s, i);
    p->os[i] = '\0';
    *has_options = i < len;
    if (!*has_options) return 0;

    /* Inside the parentheses: s[i+1 .. len-1). */
    i++;
    len--;
    start = i;
    while (i < len && is_option_char(s[i])) i++;
    if ((rc = decode_option(s + start, i - start, p->os_version, "os version", spec, msg, msglen)))
        return rc;
    while (i < len) {
        if (s[i] != '+') break;
        start = ++i;
        while (i < len && is_option_char(s[i])) i++;
        if (i == start) {
            /* osRe wants "+" followed by at least one character. */
            am_error_setmsg(msg, msglen, "platform \"%s\": empty os feature", spec);
            return AM_EINVAL;
        }
        if (f->n == AM_PLATFORM_FEATURES_MAX) {
            am_error_setmsg(msg, msglen, "platform \"%s\": more than %d os features", spec,
                            AM_PLATFORM_FEATURES_MAX);
            return AM_EINVAL;
        }
        if ((rc = decode_option(s + start, i - start, f->v[f->n], "os feature", spec, msg, msglen)))
            return rc;
        f->n++;
    }
    if (i < len) {
        am_error_setmsg(msg, msglen,
                        "platform \"%s\": invalid os options (want (version+feature...))", spec);
        return AM_EINVAL;
    }
    return 0;
}

/* An architecture or variant component: specifierRe, bounded. Components made only of
 * dots are refused although containerd's regexp allows them: Format's path.Join would
 * turn "linux/.." into "." and no platform is spelled that way. */
static int copy_component(const char *s, size_t len, char dst[AM_PLATFORM_FIELD_MAX + 1],
                          const char *what, const char *spec, char *msg, size_t msglen)
{
    bool only_dots = true;

    if (len == 0) {
        am_error_setmsg(msg, msglen, "platform \"%s\": empty %s component", spec, what);
        return AM_EINVAL;
    }
    for (size_t i = 0; i < len; i++) {
        if (!is_spec_char(s[i])) {
            am_error_setmsg(msg, msglen,
                            "platform \"%s\": invalid character in the %s (allowed: "
                            "A-Z a-z 0-9 _ . -)",
                            spec, what);
            return AM_EINVAL;
        }
        if (s[i] != '.') only_dots = false;
    }
    if (only_dots) {
        am_error_setmsg(msg, msglen, "platform \"%s\": the %s cannot be \".\" or \"..\"", spec,
                        what);
        return AM_EINVAL;
    }
    if (len > AM_PLATFORM_FIELD_MAX) {
        am_error_setmsg(msg, msglen, "platform \"%s\": %s longer than %d bytes", spec, what,
                        AM_PLATFORM_FIELD_MAX);
        return AM_EINVAL;
    }
    memcpy(dst, s, len);
    dst[len] = '\0';
    return 0;
}

int am_platform_parse(const char *s, size_t len, struct am_platform *out,
                      struct am_platform_features *features, char *msg, size_t msglen)
{
    struct am_platform p;
    struct am_platform_features f;
    const char *part[3];
    size_t plen[3], nparts = 0;
    char spec[QUOTE_MAX + 4];
    bool has_options = false;
    int rc;

    memset(&p, 0, sizeof p);
    memset(&f, 0, sizeof f);
    if (!s) len = 0;
    quote(spec, s ? s : "", len);
    if (len == 0) {
        am_error_setmsg(msg, msglen, "empty platform (want os/architecture[/variant])");
        return AM_EINVAL;
    }
    if (len > AM_PLATFORM_SPEC_MAX) {
        am_error_setmsg(msg, msglen, "platform \"%s\": longer than %d bytes", spec,
                        AM_PLATFORM_SPEC_MAX);
        return AM_EINVAL;
    }
    /* platforms.go Parse: "wildcards not yet supported". */
    if (memchr(s, '*', len)) {
        am_error_setmsg(msg, msglen, "platform \"%s\": wildcards are not supported", spec);
        return AM_EINVAL;
    }
    /* platforms.go Parse: at most os/arch/variant ("cannot parse platform specifier").
     * The os options may hold '/' only %-encoded, so a raw '/' always separates. */
    for (size_t i = 0, start = 0; i <= len; i++) {
        if (i < len && s[i] != '/') continue;
        if (nparts == 3) {
            am_error_setmsg(msg, msglen,
                            "platform \"%s\": too many components (want "
                            "os/architecture[/variant])",
                            spec);
            return AM_EINVAL;
        }
        part[nparts] = s + start;
        plen[nparts++] = i - start;
        start = i + 1;
    }

    if ((rc = parse_os_component(part[0], plen[0], &p, &f, &has_options, spec, msg, msglen)))
        return rc;
    if (nparts >= 2 &&
        (rc = copy_component(part[1], plen[1], p.architecture, "architecture", spec, msg, msglen)))
        return rc;
    if (nparts == 3 &&
        (rc = copy_component(part[2], plen[2], p.variant, "variant", spec, msg, msglen)))
        return rc;

    if (nparts == 1) {
        /* platforms.go Parse, one component: a known OS gets runtime.GOARCH there, which
         * on a mirror is not the node's; refuse. Otherwise it must be a known arch, and
         * the os is runtime.GOOS there, DEFAULT_OS here. */
        normalize_os(p.os);
        if (known_os(p.os)) {
            am_error_setmsg(msg, msglen,
                            "platform \"%s\" names only an operating system; give os/architecture, "
                            "e.g. linux/arm64",
                            spec);
            return AM_EINVAL;
        }
        if (has_options) {
            am_error_setmsg(msg, msglen, "platform \"%s\": unknown operating system", spec);
            return AM_EINVAL;
        }
        memcpy(p.architecture, p.os, sizeof p.architecture);
        p.os[0] = '\0';
        normalize_arch(p.architecture, p.variant);
        if (!known_arch(p.architecture)) {
            am_error_setmsg(msg, msglen,
                            "platform \"%s\": unknown operating system or architecture", spec);
            return AM_EINVAL;
        }
        set_field(p.os, DEFAULT_OS);
    } else {
        /* Two or three components: any os/arch pair is taken, known or not. */
        am_platform_normalize(&p);
    }
    am_platform_features_normalize(&f);
    *out = p;
    if (features) *features = f;
    return 0;
}

/* ---- platforms.go Format / FormatAll --------------------------------------------- */

struct writer {
    char *out;
    size_t cap, len;
    bool overflow;
};

static void put(struct writer *w, const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (w->len + 1 >= w->cap) {
            w->overflow = true;
            return;
        }
        w->out[w->len++] = s[i];
    }
}

static void puts_(struct writer *w, const char *s)
{
    put(w, s, strlen(s));
}

/* platforms.go encodeOSOption %XX-encodes %, +, (, ) and /. Here every byte outside
 * specifierRe's class is encoded, so that what is written always parses back: Go's
 * output for an os.version holding, say, '#' or ' ' is not accepted by its own Parse. */
static void put_encoded(struct writer *w, const char *s)
{
    for (; *s; s++) {
        char esc[4];
        if (!is_spec_char(*s)) {
            snprintf(esc, sizeof esc, "%%%02X", (unsigned)(unsigned char)*s);
            put(w, esc, 3);
        } else {
            put(w, s, 1);
        }
    }
}

static int format_impl(const struct am_platform *p, const struct am_platform_features *f, bool all,
                       char *out, size_t outlen)
{
    struct writer w = {out, outlen, 0, false};
    struct am_platform_features nf;

    if (!out || outlen == 0) return AM_EINVAL;
    if (p->os[0] == '\0') {
        /* platforms.go Format: no os → "unknown". */
        puts_(&w, "unknown");
    } else {
        puts_(&w, p->os);
        if (all) {
            nf.n = 0;
            if (f) {
                nf = *f;
                am_platform_features_normalize(&nf);
            }
            if (p->os_version[0] || nf.n) {
                put(&w, "(", 1);
                put_encoded(&w, p->os_version);
                for (size_t i = 0; i < nf.n; i++) {
                    put(&w, "+", 1);
                    put_encoded(&w, nf.v[i]);
                }
                put(&w, ")", 1);
            }
        }
        /* path.Join leaves out empty elements. */
        if (p->architecture[0]) {
            put(&w, "/", 1);
            puts_(&w, p->architecture);
        }
        if (p->variant[0]) {
            put(&w, "/", 1);
            puts_(&w, p->variant);
        }
    }
    out[w.len] = '\0';
    return w.overflow ? AM_EINVAL : 0;
}

int am_platform_format(const struct am_platform *p, char *out, size_t outlen)
{
    return format_impl(p, NULL, false, out, outlen);
}

int am_platform_format_all(const struct am_platform *p, const struct am_platform_features *f,
                           char *out, size_t outlen)
{
    return format_impl(p, f, true, out, outlen);
}

bool am_platform_equal(const struct am_platform *a, const struct am_platform *b)
{
    struct am_platform na = *a, nb = *b;

    am_platform_normalize(&na);
    am_platform_normalize(&nb);
    return streq(na.os, nb.os) && streq(na.architecture, nb.architecture) &&
           streq(na.variant, nb.variant) && streq(na.os_version, nb.os_version);
}

/* ---- platform_windows_compat.go -------------------------------------------------- */

struct winver {
    unsigned major, minor, build;
};

/* strconv.ParseUint(s, 10, bits): decimal digits only, no sign, within range. */
static bool parse_uint(const char *s, size_t len, unsigned max, unsigned *v)
{
    unsigned long long x = 0;

    if (len == 0) return false;
    for (size_t i = 0; i < len; i++) {
        if (s[i] < '0' || s[i] > '9') return false;
        x = x * 10 + (unsigned)(s[i] - '0');
        if (x > max) return false;
    }
    *v = (unsigned)x;
    return true;
}

/* platform_windows_compat.go getWindowsOSVersion: "major.minor.build[.…]" with
 * uint8/uint8/uint16 parts; anything else is the zero version. */
static struct winver winver_parse(const char *s)
{
    struct winver v = {0, 0, 0}, zero = {0, 0, 0};
    const char *d1 = strchr(s, '.'), *d2, *d3;

    if (!d1 || !(d2 = strchr(d1 + 1, '.'))) return zero;
    d3 = strchr(d2 + 1, '.');
    if (!d3) d3 = d2 + 1 + strlen(d2 + 1);
    if (!parse_uint(s, (size_t)(d1 - s), UINT8_MAX, &v.major) ||
        !parse_uint(d1 + 1, (size_t)(d2 - d1 - 1), UINT8_MAX, &v.minor) ||
        !parse_uint(d2 + 1, (size_t)(d3 - d2 - 1), UINT16_MAX, &v.build))
        return zero;
    return v;
}

/* platform_windows_compat.go windowsVersionMatcher.Match and
 * checkWindowsHostAndContainerCompat: major.minor must agree; a host older than
 * ltsc2022 (build 20348) needs the same build; a newer host runs builds from the LTSC
 * release before it up to its own. A node or candidate without a version matches. */
static bool windows_version_matches(const char *node_version, const char *cand_version)
{
    static const unsigned ltsc[] = {20348 /* ltsc2022 */, 26100 /* ltsc2025 */};
    struct winver host = winver_parse(node_version), ctr;
    unsigned supported = ltsc[0];

    if ((host.major == 0 && host.minor == 0 && host.build == 0) || cand_version[0] == '\0')
        return true;
    ctr = winver_parse(cand_version);
    if (host.major != ctr.major || host.minor != ctr.minor) return false;
    if (host.build < ltsc[0]) return host.build == ctr.build;
    for (size_t i = sizeof ltsc / sizeof ltsc[0]; i-- > 0;) {
        if (host.build > ltsc[i]) {
            supported = ltsc[i];
            break;
        }
    }
    return supported <= ctr.build && ctr.build <= host.build;
}

/* ---- compare.go platformVector / Only / Ordered ---------------------------------- */

/* strconv.Atoi(strings.TrimPrefix(variant, "v")) as platformVector uses it: optional
 * sign, decimal digits, 64-bit range. */
static bool variant_atoi(const char *variant, long long *v)
{
    const char *s = variant[0] == 'v' ? variant + 1 : variant;
    bool neg = false;
    unsigned long long x = 0;

    if (*s == '+' || *s == '-') neg = *s++ == '-';
    if (*s == '\0') return false;
    for (; *s; s++) {
        if (*s < '0' || *s > '9') return false;
        if (x > ((unsigned long long)LLONG_MAX + 1 - (unsigned)(*s - '0')) / 10) return false;
        x = x * 10 + (unsigned)(*s - '0');
    }
    if (!neg && x > (unsigned long long)LLONG_MAX) return false;
    *v = neg ? (long long)(0 - x) : (long long)x;
    return true;
}

/* Whether variant is exactly "v" + strconv.Itoa(n) for some n >= 1, the spelling of the
 * entries platformVector generates; *n gets n. */
static bool canonical_vn(const char *variant, long long *n)
{
    if (variant[0] != 'v' || variant[1] < '1' || variant[1] > '9') return false;
    return variant_atoi(variant, n);
}

/* compare.go arm64variantToVersion (2.x): for each arm64 variant, the majors and the
 * highest minor of each that it can run. v9.x diverged from v8.(x+5). */
static const struct {
    const char *variant;
    int n;
    int major[2], minor[2];
} arm64_versions[] = {
    {"v8", 1, {8}, {0}},         {"v8.0", 1, {8}, {0}},       {"v8.1", 1, {8}, {1}},
    {"v8.2", 1, {8}, {2}},       {"v8.3", 1, {8}, {3}},       {"v8.4", 1, {8}, {4}},
    {"v8.5", 1, {8}, {5}},       {"v8.6", 1, {8}, {6}},       {"v8.7", 1, {8}, {7}},
    {"v8.8", 1, {8}, {8}},       {"v8.9", 1, {8}, {9}},       {"v9", 2, {9, 8}, {0, 5}},
    {"v9.0", 2, {9, 8}, {0, 5}}, {"v9.1", 2, {9, 8}, {1, 6}}, {"v9.2", 2, {9, 8}, {2, 7}},
    {"v9.3", 2, {9, 8}, {3, 8}}, {"v9.4", 2, {9, 8}, {4, 9}}, {"v9.5", 2, {9, 8}, {5, 9}},
    {"v9.6", 2, {9, 8}, {6, 9}}, {"v9.7", 2, {9, 8}, {7, 9}},
};

/* Position of the arm fallback candidate variant in the vector arm/vK, vK-1 … v5 that
 * platformVector builds for arm/vK (K > 5), or -1. */
static long long arm_fallback(long long k, const char *cand_variant)
{
    long long j;

    if (!canonical_vn(cand_variant, &j) || j < 5 || j >= k) return -1;
    return k - j;
}

/* The rank of candidate c (normalised) for node n (normalised), os already equal. */
static long long rank(const struct am_platform *n, const struct am_platform *c)
{
    long long k, j;

    if (streq(n->architecture, c->architecture) && streq(n->variant, c->variant)) return 0;

    if (streq(n->architecture, "amd64")) {
        /* amd64/vK (K > 1): amd64/vK, vK-1, …, v1 (normalised to ""), then 386 with no
         * variant; any other amd64: itself, then 386. */
        bool versioned = variant_atoi(n->variant, &k) && k > 1;
        if (streq(c->architecture, "386")) {
            if (c->variant[0] != '\0') return -1;
            return versioned ? k : 1;
        }
        if (!versioned || !streq(c->architecture, "amd64")) return -1;
        if (c->variant[0] == '\0') return k - 1;
        if (!canonical_vn(c->variant, &j) || j < 2 || j >= k) return -1;
        return k - j;
    }

    if (streq(n->architecture, "arm")) {
        /* arm/vK (K > 5): arm/vK, vK-1, …, v5. */
        if (!streq(c->architecture, "arm") || !variant_atoi(n->variant, &k) || k <= 5) return -1;
        return arm_fallback(k, c->variant);
    }

    if (streq(n->architecture, "arm64")) {
        /* 2.x: arm64 variants down the table (each normalised: "v8" is ""), then
         * arm/v8 … v5. 1.6 has only the arm fallback: [arm64/V, arm/V'] with V' = "v8"
         * for "". A variant not in the table gets an empty vector in 2.x — it would match
         * nothing, not even itself; archmirror keeps the exact match above. */
        const char *v = n->variant[0] ? n->variant : "v8";
        long long pos = 0;
        size_t t;

        for (t = 0; t < sizeof arm64_versions / sizeof arm64_versions[0]; t++)
            if (streq(arm64_versions[t].variant, v)) break;
        if (t == sizeof arm64_versions / sizeof arm64_versions[0]) return -1;
        for (int i = 0; i < arm64_versions[t].n; i++) {
            int major = arm64_versions[t].major[i];
            for (int minor = arm64_versions[t].minor[i]; minor >= 0; minor--, pos++) {
                char entry[AM_PLATFORM_FIELD_MAX + 1];
                char arch[AM_PLATFORM_FIELD_MAX + 1] = "arm64";
                if (minor == 0)
                    snprintf(entry, sizeof entry, "v%d", major);
                else
                    snprintf(entry, sizeof entry, "v%d.%d", major, minor);
                normalize_arch(arch, entry);
                if (streq(c->architecture, "arm64") && streq(c->variant, entry)) return pos;
            }
        }
        /* "All arm64/v8.x and arm64/v9.x are compatible with arm/v8 (32-bits) and
         * below": platformVector(arm/v8) = arm/v8, v7, v6, v5. */
        if (!streq(c->architecture, "arm")) return -1;
        if (streq(c->variant, "v8")) return pos;
        j = arm_fallback(8, c->variant);
        return j < 0 ? -1 : pos + j;
    }
    return -1;
}

int am_platform_match_rank(const struct am_platform *node, const struct am_platform *candidate)
{
    struct am_platform n = *node, c = *candidate;
    long long r;

    am_platform_normalize(&n);
    am_platform_normalize(&c);
    /* Every vector entry copies the node's OS and OSVersion (platformVector); the matcher
     * compares OS and, for windows, os.version (platforms.go NewMatcher, matcher.Match). */
    if (!streq(n.os, c.os)) return -1;
    if (streq(n.os, "windows") && !windows_version_matches(n.os_version, c.os_version)) return -1;
    r = rank(&n, &c);
    if (r < 0) return -1;
    return r > INT_MAX ? INT_MAX : (int)r;
}

bool am_platform_matches(const struct am_platform *node, const struct am_platform *candidate)
{
    return am_platform_match_rank(node, candidate) >= 0;
}

bool am_platform_features_match(const struct am_platform *node,
                                const struct am_platform_features *node_features,
                                const struct am_platform_features *candidate_features)
{
    struct am_platform_features nf, cf;
    struct am_platform n = *node;
    size_t j = 0;

    nf.n = cf.n = 0;
    if (node_features) nf = *node_features;
    if (candidate_features) cf = *candidate_features;
    am_platform_features_normalize(&nf);
    am_platform_features_normalize(&cf);
    normalize_os(n.os);
    /* Both sorted: a merge walk finds each candidate feature in the node's list. */
    for (size_t i = 0; i < cf.n; i++) {
        if (streq(n.os, "windows") && streq(cf.v[i], "win32k")) continue;
        while (j < nf.n && strcmp(nf.v[j], cf.v[i]) < 0) j++;
        if (j == nf.n || !streq(nf.v[j], cf.v[i])) return false;
        j++;
    }
    return true;
}

/* ---- image platforms ------------------------------------------------------------- */

/* Entries that are never a platform of the image: buildx attestations and the
 * unknown/unknown platform they carry, and descriptors without a platform. */
static bool is_candidate(const struct am_descriptor *d, struct am_platform *normalized)
{
    if (!d->has_platform || d->is_attestation) return false;
    *normalized = d->platform;
    am_platform_normalize(normalized);
    return !(streq(normalized->os, "unknown") && streq(normalized->architecture, "unknown"));
}

int am_platform_list_from_index(const struct am_manifest *index, struct am_platform_entry *out,
                                size_t cap, size_t *n_out)
{
    size_t n = 0;

    *n_out = 0;
    if (!am_mediatype_is_index(index->kind)) return AM_EINVAL;
    for (size_t i = 0; i < index->n_entries; i++) {
        struct am_platform p;
        bool seen = false;

        if (!is_candidate(&index->entries[i], &p)) continue;
        for (size_t k = 0; k < n && !seen; k++) seen = am_platform_equal(&out[k].platform, &p);
        if (seen) continue;
        if (n == cap) {
            *n_out = n;
            return AM_ETOO_LARGE;
        }
        out[n].platform = p;
        out[n].index = i;
        n++;
    }
    *n_out = n;
    return 0;
}

int am_platform_best_match(const struct am_manifest *index, const struct am_platform *node,
                           size_t *entry)
{
    int best = -1;

    if (!am_mediatype_is_index(index->kind)) return AM_EINVAL;
    for (size_t i = 0; i < index->n_entries; i++) {
        struct am_platform p;
        int r;

        if (!is_candidate(&index->entries[i], &p)) continue;
        r = am_platform_match_rank(node, &p);
        /* Strictly lower only: sort.SliceStable keeps index order among equals. */
        if (r >= 0 && (best < 0 || r < best)) {
            best = r;
            *entry = i;
        }
    }
    return best < 0 ? AM_ENOT_FOUND : 0;
}

/* ---- config blob ----------------------------------------------------------------- */

static int config_string(json_t *root, const char *key, bool required,
                         char dst[AM_PLATFORM_FIELD_MAX + 1], char *msg, size_t msglen)
{
    json_t *v = json_object_get(root, key);
    size_t len;

    dst[0] = '\0';
    if (!v) {
        if (!required) return 0;
        am_error_setmsg(msg, msglen, "image config: \"%s\" missing", key);
        return AM_EMANIFEST_INVALID;
    }
    if (!json_is_string(v)) {
        am_error_setmsg(msg, msglen, "image config: \"%s\" is not a string", key);
        return AM_EMANIFEST_INVALID;
    }
    len = json_string_length(v);
    if (required && len == 0) {
        am_error_setmsg(msg, msglen, "image config: \"%s\" is empty", key);
        return AM_EMANIFEST_INVALID;
    }
    if (len > AM_PLATFORM_FIELD_MAX) {
        am_error_setmsg(msg, msglen, "image config: \"%s\" longer than %d bytes", key,
                        AM_PLATFORM_FIELD_MAX);
        return AM_EMANIFEST_INVALID;
    }
    if (!printable(json_string_value(v), len)) {
        am_error_setmsg(msg, msglen, "image config: \"%s\" contains non-printable bytes", key);
        return AM_EMANIFEST_INVALID;
    }
    memcpy(dst, json_string_value(v), len + 1);
    return 0;
}

int am_platform_from_config_json(const char *bytes, size_t len, struct am_platform *out,
                                 struct am_platform_features *features, char *msg, size_t msglen)
{
    struct am_platform p;
    struct am_platform_features f;
    json_error_t jerr;
    json_t *root, *feat;
    int rc = AM_EMANIFEST_INVALID;

    memset(&p, 0, sizeof p);
    memset(&f, 0, sizeof f);
    root = json_loadb(bytes ? bytes : "", bytes ? len : 0, 0, &jerr);
    if (!root) {
        char text[QUOTE_MAX + 4];
        if (json_error_code(&jerr) == json_error_out_of_memory) return AM_ENOMEM;
        quote(text, jerr.text, strlen(jerr.text));
        am_error_setmsg(msg, msglen, "image config: invalid JSON at byte %d: %s", jerr.position,
                        text);
        return AM_EMANIFEST_INVALID;
    }
    if (!json_is_object(root)) {
        am_error_setmsg(msg, msglen, "image config: not a JSON object");
        goto fail;
    }
    if ((rc = config_string(root, "architecture", true, p.architecture, msg, msglen)) ||
        (rc = config_string(root, "os", true, p.os, msg, msglen)) ||
        (rc = config_string(root, "variant", false, p.variant, msg, msglen)) ||
        (rc = config_string(root, "os.version", false, p.os_version, msg, msglen)))
        goto fail;
    rc = AM_EMANIFEST_INVALID;
    feat = json_object_get(root, "os.features");
    if (feat && !json_is_null(feat)) {
        /* Go decodes null as an absent slice; anything else must be an array of strings. */
        if (!json_is_array(feat)) {
            am_error_setmsg(msg, msglen, "image config: \"os.features\" is not an array");
            goto fail;
        }
        if (json_array_size(feat) > AM_PLATFORM_FEATURES_MAX) {
            am_error_setmsg(msg, msglen, "image config: more than %d \"os.features\"",
                            AM_PLATFORM_FEATURES_MAX);
            goto fail;
        }
        for (size_t i = 0; i < json_array_size(feat); i++) {
            json_t *v = json_array_get(feat, i);
            size_t flen;
            if (!json_is_string(v)) {
                am_error_setmsg(msg, msglen, "image config: \"os.features\"[%zu] is not a string",
                                i);
                goto fail;
            }
            flen = json_string_length(v);
            if (flen > AM_PLATFORM_FIELD_MAX || !printable(json_string_value(v), flen)) {
                am_error_setmsg(
                    msg, msglen,
                    "image config: \"os.features\"[%zu] is over %d bytes or not printable", i,
                    AM_PLATFORM_FIELD_MAX);
                goto fail;
            }
            memcpy(f.v[f.n++], json_string_value(v), flen + 1);
        }
    }
    json_decref(root);
    am_platform_normalize(&p);
    am_platform_features_normalize(&f);
    *out = p;
    if (features) *features = f;
    return 0;

fail:
    json_decref(root);
    return rc;
}

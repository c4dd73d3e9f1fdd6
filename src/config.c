/*
 * config — archmirror's settings; see include/archmirror/config.h for the API and
 * conf/README.md for every key.
 *
 * DESIGN. Everything a person can set is one row of `fields` below: where it sits in the
 * JSON document (section + key), its type, its default written as the JSON a config file
 * would contain, its bounds and one sentence of documentation. The same rows fill the
 * defaults (by loading each default through the file loader), walk a loaded document,
 * re-check bounds in am_config_validate, print the effective configuration
 * (am_config_dump) and print the README table (am_config_format_doc). Adding a setting
 * is one row plus one struct field.
 *
 * A loaded value is stored only after its type and bounds were checked, and a list
 * (listen, upstreams) is swapped in only when all of its entries were good, so cfg holds
 * owned-or-NULL pointers and in-range numbers even after a failed load. Checks that need
 * the assembled configuration (host and URL grammar, duplicates, default_upstream, CA
 * files, credentials) live in am_config_validate, which runs after the file and the
 * command line.
 *
 * This module must never bind a port, create or open the data directory, or put a
 * password into a message or a dump.
 */
#include "archmirror/config.h"

#include <arpa/inet.h>
#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "archmirror/buf.h"
#include "archmirror/error.h"
#include "archmirror/log.h"
#include "archmirror/reference.h"

#define KIB    1024ull
#define MIB    (1024ull * KIB)
#define GIB    (1024ull * MIB)
#define TIB    (1024ull * GIB)
#define SEC    1000ull
#define MINUTE (60ull * SEC)
#define HOUR   (60ull * MINUTE)

#define CONFIG_FILE_MAX MIB       /* a config is a few KiB: anything larger is a mistake */
#define SECRET_FILE_MAX (4 * KIB) /* a password file holds one line */
#define DOC_MAX         (64 * KIB)
#define PATH_LEN        sizeof(((struct am_config_problem *)0)->path)
#define WHY_LEN         200 /* a reason that still fits in a problem message after its value */

/* ---- the schema table --------------------------------------------------------------- */

enum kind {
    K_OBJECT,      /* a section ("server"): its rows have section == this row's key */
    K_LISTEN,      /* array of "host:port" strings; min/max bound the entry count */
    K_UPSTREAMS,   /* array of objects whose rows have section "upstreams"; min/max count */
    K_STRING,      /* non-empty string */
    K_NSTRING,     /* non-empty string or null */
    K_URL,         /* non-empty string; one trailing '/' is dropped when stored */
    K_LOGLEVEL,    /* "error" | "warn" | "info" | "debug", stored as int */
    K_DIAG,        /* "off" | "warn" | "enforce", stored as int (enum am_diagnostics) */
    K_BOOL,        /* true | false */
    K_UINT,        /* JSON integer within min..max */
    K_SIZE,        /* bytes: a JSON integer or "64MiB"; within min..max */
    K_DURATION,    /* milliseconds: "30s" (a plain number only when 0); within min..max */
    K_SECRET,      /* the password itself: string or null; printed as "***" */
    K_SECRET_FILE, /* path of a file holding the password; read at load into the password */
    K_SECRET_ENV,  /* name of an environment variable holding the password; read at load */
};

enum {
    F_REQUIRED = 1,   /* an upstream object must have this key */
    F_INPUT_ONLY = 2, /* read at load into another field; never dumped */
};

struct field {
    const char *section; /* "" at the top level, else the key of a K_OBJECT/K_UPSTREAMS row */
    const char *key;
    enum kind kind;
    size_t off;        /* into struct am_config, or struct am_upstream_conf ("upstreams") */
    const char *def;   /* default as JSON text; NULL: null (or none, with F_REQUIRED) */
    uint64_t min, max; /* numeric kinds: value bounds; K_LISTEN/K_UPSTREAMS: entry count */
    unsigned flags;
    const char *doc;
};

/* offsetof that also fails to compile (-Werror: distinct pointer types) when the member
 * does not have the type the row's kind writes. */
#define OFF_(type, s, m) (offsetof(s, m) + 0 * sizeof(&((s *)0)->m == (type *)0))
#define C_U64(m)         OFF_(uint64_t, struct am_config, m)
#define C_STR(m)         OFF_(char *, struct am_config, m)
#define C_BOOL(m)        OFF_(bool, struct am_config, m)
#define C_INT(m)         OFF_(int, struct am_config, m)
#define U_STR(m)         OFF_(char *, struct am_upstream_conf, m)
#define U_BOOL(m)        OFF_(bool, struct am_upstream_conf, m)

/* Row order is the order of am_config_dump, conf/archmirror.json and conf/README.md. */
static const struct field fields[] = {
    /* section, key, kind, offset, default, min, max, flags, doc */
    {"", "listen", K_LISTEN, 0, "[\"127.0.0.1:5000\"]", 1, AM_CONFIG_MAX_LISTEN, 0,
     "Addresses to serve on, \"IPv4:port\" or \"[IPv6]:port\" (IP literals, not names); "
     "port 0 picks a free port."},
    {"", "data_dir", K_STRING, C_STR(data_dir), "\"./var/archmirror\"", 0, 0, 0,
     "Cache directory (manifest database and blobs); a relative path is taken from the "
     "working directory."},
    {"", "log_level", K_LOGLEVEL, C_INT(log_level), "\"info\"", 0, 0, 0,
     "Least severe diagnostic lines written to stderr."},
    {"", "diagnostics", K_DIAG, C_INT(diagnostics), "\"warn\"", 0, 0, 0,
     "What to do when a node whose platform is known (X-Node-Platform) pulls a tag that has "
     "no variant it can run: off; warn (log, count, record in the pull log; the pull "
     "proceeds); enforce (refuse the tag HEAD/GET with 409 and the diagnosis in the reason "
     "phrase)."},
    {"", "default_upstream", K_STRING, C_STR(default_upstream), "\"docker.io\"", 0, 0, 0,
     "Upstream used when a request has no ?ns= parameter; must be one of upstreams[].name. "
     "When a file replaces upstreams without setting it and the old default is not in the "
     "new list, the first upstream."},
    {"", "upstreams", K_UPSTREAMS, 0, NULL, 1, AM_CONFIG_MAX_UPSTREAMS, 0,
     "Registries this mirror serves. A config file's list replaces the default list."},
    {"upstreams", "name", K_STRING, U_STR(name), NULL, 0, 0, F_REQUIRED,
     "Registry host as clients name it in ?ns= (lowercase host[:port], e.g. docker.io); "
     "names must be unique."},
    {"upstreams", "url", K_URL, U_STR(url), NULL, 0, 0, F_REQUIRED,
     "Where to fetch from: http:// or https:// and host[:port], without path or "
     "credentials."},
    {"upstreams", "ca_file", K_NSTRING, U_STR(ca_file), "null", 0, 0, 0,
     "PEM CA bundle that verifies the upstream instead of the system store (https only); "
     "must be readable."},
    {"upstreams", "insecure", K_BOOL, U_BOOL(insecure), "false", 0, 0, 0,
     "Skip TLS certificate verification. For test registries only."},
    {"upstreams", "username", K_NSTRING, U_STR(username), "null", 0, 0, 0,
     "User for the registry's token or Basic authentication; needs exactly one password "
     "source."},
    {"upstreams", "password", K_SECRET, U_STR(password), "null", 0, 0, 0,
     "Password written inline (prefer password_file or password_env). Never printed."},
    {"upstreams", "password_file", K_SECRET_FILE, U_STR(password), "null", 0, 0, F_INPUT_ONLY,
     "File holding the password, read at start-up; trailing newlines are removed."},
    {"upstreams", "password_env", K_SECRET_ENV, U_STR(password), "null", 0, 0, F_INPUT_ONLY,
     "Environment variable holding the password, read at start-up."},

    {"", "server", K_OBJECT, 0, NULL, 0, 0, 0, "The HTTP server that clients talk to."},
    {"server", "max_connections", K_UINT, C_U64(max_connections), "4096", 1, 1000000, 0,
     "Open client connections; beyond it a new connection gets 503 and is closed."},
    {"server", "max_header_bytes", K_SIZE, C_U64(max_header_bytes), "\"16KiB\"", KIB, MIB, 0,
     "Request line plus header fields; a larger request head gets 431."},
    {"server", "max_headers", K_UINT, C_U64(max_headers), "64", 8, 1024, 0,
     "Header fields per request; more get 431."},
    {"server", "header_timeout", K_DURATION, C_U64(header_timeout_ms), "\"10s\"", 10, HOUR, 0,
     "A request head that has started must be complete within this, else 408."},
    {"server", "idle_timeout", K_DURATION, C_U64(idle_timeout_ms), "\"60s\"", 10, HOUR, 0,
     "A keep-alive connection without a request is closed after this."},
    {"server", "drain_timeout", K_DURATION, C_U64(drain_timeout_ms), "\"10s\"", 0, 10 * MINUTE, 0,
     "On SIGTERM/SIGINT, requests in progress get this long before their connections are "
     "closed."},
    {"server", "sendfile", K_BOOL, C_BOOL(sendfile), "true", 0, 0, 0,
     "Send cached blob bodies with sendfile(2) from the page cache (plain TCP); false copies "
     "them through memory. Ranges not in memory are read on the thread pool either way."},
    {"server", "tls_cert_file", K_NSTRING, C_STR(tls_cert_file), "null", 0, 0, 0,
     "PEM certificate chain (leaf first) for HTTPS on the listen addresses; needs "
     "tls_key_file. Re-read on SIGHUP. null: plain HTTP."},
    {"server", "tls_key_file", K_NSTRING, C_STR(tls_key_file), "null", 0, 0, 0,
     "PEM private key of tls_cert_file. Re-read on SIGHUP together with the certificate; "
     "a pair that fails to load keeps the previous one."},

    {"", "upstream_client", K_OBJECT, 0, NULL, 0, 0, 0,
     "How archmirror talks to upstream registries."},
    {"upstream_client", "connect_timeout", K_DURATION, C_U64(upstream_connect_timeout_ms), "\"5s\"",
     10, 5 * MINUTE, 0, "TCP connect plus TLS handshake."},
    {"upstream_client", "header_timeout", K_DURATION, C_U64(upstream_header_timeout_ms), "\"30s\"",
     10, HOUR, 0, "From sending a request to receiving the response head."},
    {"upstream_client", "idle_timeout", K_DURATION, C_U64(upstream_idle_timeout_ms), "\"30s\"", 10,
     HOUR, 0, "Longest silence while a response body streams."},
    {"upstream_client", "pool_size", K_UINT, C_U64(upstream_pool_size), "16", 0, 1024, 0,
     "Idle keep-alive connections kept per upstream; 0 opens a connection per request."},
    {"upstream_client", "max_redirects", K_UINT, C_U64(max_redirects), "5", 0, 20, 0,
     "Redirects followed per request (blob downloads usually redirect once, to storage)."},
    {"upstream_client", "allow_private_redirects", K_BOOL, C_BOOL(allow_private_redirects), "false",
     0, 0, 0,
     "Follow redirects to loopback and link-local addresses (off: an upstream cannot point "
     "archmirror at local services)."},

    {"", "cache", K_OBJECT, 0, NULL, 0, 0, 0, "What is kept, and for how long."},
    {"cache", "tag_freshness", K_DURATION, C_U64(tag_freshness_ms), "\"5m\"", 0, 720 * HOUR, 0,
     "How long a tag's digest is served without asking the upstream again; 0 asks every "
     "time."},
    {"cache", "max_manifest_size", K_SIZE, C_U64(max_manifest_bytes), "\"4MiB\"", KIB, 64 * MIB, 0,
     "Largest manifest or index accepted from an upstream."},
    {"cache", "metastore_map_size", K_SIZE, C_U64(metastore_map_bytes), "\"1GiB\"", MIB, TIB, 0,
     "Size of the LMDB map that holds manifests and tags: the most it can grow to, not disk "
     "space used up front."},
    {"cache", "manifest_max_size", K_SIZE, C_U64(manifest_max_bytes), "0", 0, TIB, 0,
     "Budget for cached manifests and indexes (their bytes as stored); the least recently "
     "used are evicted in the background to stay under it, with the evict_*_watermark "
     "percentages. Must be below metastore_map_size, which also holds LMDB's page overhead "
     "and the tags; 0: half of metastore_map_size."},
    {"cache", "max_size", K_SIZE, C_U64(blob_max_bytes), "\"10GiB\"", MIB, 1024 * TIB, 0,
     "Disk budget for cached blobs (layers, configs); least-recently-used blobs are evicted "
     "in the background to stay under it."},
    {"cache", "evict_high_watermark", K_UINT, C_U64(blob_high_pct), "95", 1, 100, 0,
     "Eviction starts when cached blobs exceed this percentage of max_size (cached "
     "manifests: of manifest_max_size)."},
    {"cache", "evict_low_watermark", K_UINT, C_U64(blob_low_pct), "90", 1, 100, 0,
     "Eviction frees space down to this percentage of max_size (manifests: of "
     "manifest_max_size); at most evict_high_watermark."},
    {"cache", "blobstore_map_size", K_SIZE, C_U64(blobstore_map_bytes), "\"256MiB\"", MIB, TIB, 0,
     "Size of the LMDB map that holds blob metadata (size, last access, hits)."},
    {"", "pull_log", K_OBJECT, 0, NULL, 0, 0, 0,
     "The record of which node platform pulled which image (JSON lines plus aggregates)."},
    {"pull_log", "enabled", K_BOOL, C_BOOL(pulllog_enabled), "true", 0, 0, 0,
     "Record pulls to <dir>/pulls.jsonl and keep per-image, per-platform aggregates for "
     "/api/v1/pulls and /api/v1/readiness."},
    {"", "admin", K_OBJECT, 0, NULL, 0, 0, 0,
     "The admin side: /metrics and /api/v1/* (platforms, pulls, readiness)."},
    {"admin", "listen", K_NSTRING, C_STR(admin_listen), "null", 0, 0, 0,
     "A separate \"host:port\" for the admin side; the registry listeners then answer 404 "
     "there. null: the admin side is served on the registry listeners."},
    {"admin", "token_file", K_NSTRING, C_STR(admin_token_file), "null", 0, 0, 0,
     "File holding a bearer token that the admin side requires (Authorization: Bearer …); "
     "read at start-up. null: no token. /healthz and /readyz never need it."},
    {"admin", "tls_cert_file", K_NSTRING, C_STR(admin_tls_cert_file), "null", 0, 0, 0,
     "PEM certificate chain for HTTPS on admin.listen; needs admin.tls_key_file and "
     "admin.listen. Re-read on SIGHUP."},
    {"admin", "tls_key_file", K_NSTRING, C_STR(admin_tls_key_file), "null", 0, 0, 0,
     "PEM private key of admin.tls_cert_file."},
    {"pull_log", "dir", K_NSTRING, C_STR(pulllog_dir), "null", 0, 0, 0,
     "Directory of the pull log; null: <data_dir>/pulls."},
    {"pull_log", "rotate_size", K_SIZE, C_U64(pulllog_rotate_bytes), "\"64MiB\"", KIB,
     64 * 1024 * MIB, 0, "A log file is rotated (pulls.jsonl.1 …) when it reaches this size."},
    {"pull_log", "keep_files", K_UINT, C_U64(pulllog_keep_files), "5", 1, 1000, 0,
     "Rotated files kept."},
    {"pull_log", "dedupe_window", K_DURATION, C_U64(pulllog_dedupe_ms), "\"60s\"", 0, HOUR, 0,
     "A node that fetches the same platform manifest again within this has not pulled the "
     "image again: one record, not one per GET (a client looping on GETs cannot flood the "
     "log). 0 records every completion."},
};
#define N_FIELDS (sizeof fields / sizeof fields[0])

/* The embedded upstream list, in this order; a file's "upstreams" or the first
 * am_config_set_upstream replaces it. */
static const struct {
    const char *name;
    const char *url;
} builtin_upstreams[] = {
    {"docker.io", "https://registry-1.docker.io"},
    {"ghcr.io", "https://ghcr.io"},
    {"quay.io", "https://quay.io"},
    {"registry.k8s.io", "https://registry.k8s.io"},
    {"public.ecr.aws", "https://public.ecr.aws"},
    {"mcr.microsoft.com", "https://mcr.microsoft.com"},
};

/* Indexed by enum am_log_level; parsing goes through am_log_parse_level. */
static const char *const level_names[] = {"error", "warn", "info", "debug"};
static const char *const diag_names[] = {"off", "warn", "enforce"};
_Static_assert(AM_DIAG_ENFORCE == 2, "diag_names follows enum am_diagnostics");
_Static_assert(AM_LOG_DEBUG == 3, "level_names follows enum am_log_level");

static const struct field *find_field(const char *section, const char *key)
{
    for (size_t i = 0; i < N_FIELDS; i++)
        if (strcmp(fields[i].section, section) == 0 && strcmp(fields[i].key, key) == 0)
            return &fields[i];
    return NULL;
}

/* "listen", "server.max_headers", "upstreams[].url": the key as the README names it. */
static void display_key(const struct field *f, char *out, size_t n)
{
    const struct field *parent = f->section[0] ? find_field("", f->section) : NULL;
    if (!parent)
        snprintf(out, n, "%s", f->key);
    else if (parent->kind == K_UPSTREAMS)
        snprintf(out, n, "%s[].%s", f->section, f->key);
    else
        snprintf(out, n, "%s.%s", f->section, f->key);
}

static bool is_numeric(enum kind k)
{
    return k == K_UINT || k == K_SIZE || k == K_DURATION;
}

static bool is_secret(enum kind k)
{
    return k == K_SECRET || k == K_SECRET_FILE || k == K_SECRET_ENV;
}

/* ---- sizes and durations ------------------------------------------------------------ */

static const struct {
    const char *suffix;
    uint64_t factor;
} size_units[] = {
    /* Largest first: format_size picks the first that divides the value. */
    {"TiB", TIB},
    {"GiB", GIB},
    {"MiB", MIB},
    {"KiB", KIB},
    {"TB", 1000ull * 1000 * 1000 * 1000},
    {"GB", 1000ull * 1000 * 1000},
    {"MB", 1000ull * 1000},
    {"KB", 1000},
    {"B", 1},
};
#define SIZE_UNITS_TEXT "B, KB, MB, GB, TB, KiB, MiB, GiB or TiB"

/* Reads leading decimal digits; returns how many, 0 when none. *overflow on > UINT64_MAX. */
static size_t read_digits(const char *s, uint64_t *out, bool *overflow)
{
    uint64_t v = 0;
    size_t i = 0;
    *overflow = false;
    for (; s[i] >= '0' && s[i] <= '9'; i++) {
        unsigned d = (unsigned)(s[i] - '0');
        if (v > (UINT64_MAX - d) / 10)
            *overflow = true;
        else
            v = v * 10 + d;
    }
    *out = v;
    return i;
}

/* Returns NULL and sets *out, or the reason s is not a size. */
static const char *parse_size(const char *s, uint64_t *out)
{
    uint64_t v;
    bool overflow;
    if (!*s) return "is empty";
    if (*s == '-') return "must not be negative";
    size_t nd = read_digits(s, &v, &overflow);
    if (nd == 0) return "must start with a number, as in \"64MiB\"";
    if (overflow) return "is too large";
    const char *unit = s + nd;
    if (*unit == '.' || *unit == ',')
        return "must be a whole number: use a smaller unit (\"1536MiB\", not \"1.5GiB\")";
    if (*unit == ' ') return "must have its unit right after the number, as in \"64MiB\"";
    if (!*unit) {
        *out = v; /* plain bytes */
        return NULL;
    }
    for (size_t i = 0; i < sizeof size_units / sizeof size_units[0]; i++) {
        if (strcmp(unit, size_units[i].suffix) != 0) continue;
        if (v > UINT64_MAX / size_units[i].factor) return "is too large";
        *out = v * size_units[i].factor;
        return NULL;
    }
    return "has an unknown unit: use " SIZE_UNITS_TEXT " (\"64MiB\", \"1GB\")";
}

int am_config_parse_size(const char *s, uint64_t *out)
{
    uint64_t v;
    if (!s || parse_size(s, &v)) return AM_EINVAL;
    *out = v;
    return 0;
}

static const struct {
    const char *suffix;
    uint64_t ms;
} duration_units[] = {
    /* Largest first: a duration writes its units in this order, each at most once. */
    {"h", HOUR},
    {"m", MINUTE},
    {"s", SEC},
    {"ms", 1},
};
#define N_DURATION_UNITS (sizeof duration_units / sizeof duration_units[0])

/* Returns NULL and sets *out, or the reason s is not a duration. Grammar: "0", or one or
 * more <digits><unit> with units h, m, s, ms from largest to smallest, each at most once
 * ("2h30m", "1s500ms"). A bare number other than 0 is refused: "30" could mean seconds
 * or milliseconds, and guessing wrong is a 1000x mistake. */
static const char *parse_duration(const char *s, uint64_t *out)
{
    uint64_t total = 0;
    size_t next_unit = 0; /* index of the largest unit still allowed */
    if (!*s) return "is empty";
    if (*s == '-') return "must not be negative";
    if (strcmp(s, "0") == 0) {
        *out = 0;
        return NULL;
    }
    while (*s) {
        uint64_t v;
        bool overflow;
        size_t nd = read_digits(s, &v, &overflow);
        if (nd == 0) return "must be numbers with units, as in \"30s\", \"500ms\" or \"2h30m\"";
        if (overflow) return "is too long";
        s += nd;
        if (*s == '.' || *s == ',') return "must use whole numbers: write \"1m30s\", not \"1.5m\"";
        if (!*s) return "needs a unit after its last number: h, m, s or ms (\"30s\", not \"30\")";
        size_t u = N_DURATION_UNITS, ulen = 0;
        for (size_t i = 0; i < N_DURATION_UNITS; i++) {
            size_t len = strlen(duration_units[i].suffix);
            /* Longest match: "5ms" is milliseconds, not minutes followed by "s". */
            if (len > ulen && strncmp(s, duration_units[i].suffix, len) == 0) {
                u = i;
                ulen = len;
            }
        }
        if (u == N_DURATION_UNITS)
            return "has an unknown unit: use h, m, s or ms (\"2h30m\", \"500ms\")";
        if (u < next_unit)
            return "must write its units from largest to smallest, each once (\"1h30m\")";
        if (v > (UINT64_MAX - total) / duration_units[u].ms) return "is too long";
        total += v * duration_units[u].ms;
        next_unit = u + 1;
        s += ulen;
    }
    *out = total;
    return NULL;
}

int am_config_parse_duration_ms(const char *s, uint64_t *out)
{
    uint64_t v;
    if (!s || parse_duration(s, &v)) return AM_EINVAL;
    *out = v;
    return 0;
}

/* "4MiB", "10MB", "1234B": the largest unit that divides v exactly. */
static void format_size(uint64_t v, char *out, size_t n)
{
    for (size_t i = 0; i < sizeof size_units / sizeof size_units[0]; i++) {
        if (v != 0 && v % size_units[i].factor == 0) {
            snprintf(out, n, "%llu%s", (unsigned long long)(v / size_units[i].factor),
                     size_units[i].suffix);
            return;
        }
    }
    snprintf(out, n, "%lluB", (unsigned long long)v);
}

/* "2h30m", "1s500ms", "0s". */
static void format_duration(uint64_t ms, char *out, size_t n)
{
    size_t len = 0;
    if (ms == 0) {
        snprintf(out, n, "0s");
        return;
    }
    out[0] = '\0';
    for (size_t i = 0; i < N_DURATION_UNITS && ms; i++) {
        uint64_t q = ms / duration_units[i].ms;
        if (!q) continue;
        ms -= q * duration_units[i].ms;
        int w =
            snprintf(out + len, n - len, "%llu%s", (unsigned long long)q, duration_units[i].suffix);
        if (w < 0 || (size_t)w >= n - len) return;
        len += (size_t)w;
    }
}

static void format_number(enum kind k, uint64_t v, char *out, size_t n)
{
    if (k == K_SIZE)
        format_size(v, out, n);
    else if (k == K_DURATION)
        format_duration(v, out, n);
    else
        snprintf(out, n, "%llu", (unsigned long long)v);
}

/* ---- problems ----------------------------------------------------------------------- */

static void problem(struct am_config_report *r, const char *path, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void problem(struct am_config_report *r, const char *path, const char *fmt, ...)
{
    r->total++;
    if (r->n >= sizeof r->problems / sizeof r->problems[0]) return;
    struct am_config_problem *p = &r->problems[r->n++];
    snprintf(p->path, sizeof p->path, "%s", path);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(p->message, sizeof p->message, fmt, ap);
    va_end(ap);
}

/* Copies a string a person wrote into out for a message: control bytes become '?', and
 * anything past 64 bytes becomes "...", so a message stays one readable line. */
static const char *shown(const char *s, char *out, size_t n)
{
    size_t i = 0, limit = n < 68 ? n - 4 : 64;
    for (; s[i] && i < limit; i++) {
        unsigned char c = (unsigned char)s[i];
        out[i] = (c < 0x20 || c == 0x7f) ? '?' : (char)c;
    }
    if (s[i]) {
        memcpy(out + i, "...", 3);
        i += 3;
    }
    out[i] = '\0';
    return out;
}

/* shown() for a URL, with any user:password@ replaced by "***@": a URL refused for
 * carrying credentials must not print them. */
static const char *shown_url(const char *url, char *out, size_t n)
{
    char tmp[256];
    const char *auth = strstr(url, "://");
    auth = auth ? auth + 3 : url;
    size_t alen = strcspn(auth, "/?#");
    const char *at = NULL;
    for (const char *p = auth; p < auth + alen; p++)
        if (*p == '@') at = p; /* the last '@' ends the userinfo (RFC 3986 §3.2.1) */
    if (!at) return shown(url, out, n);
    snprintf(tmp, sizeof tmp, "%.*s***%s", (int)(auth - url), url, at);
    return shown(tmp, out, n);
}

/* A file path for a message: its end (the file name) says the most, so a long path
 * loses its beginning. Control bytes become '?'. */
static const char *shown_path_tail(const char *s, char *out, size_t n)
{
    size_t len = strlen(s), start = 0, o = 0;
    if (len + 1 > n) {
        start = len - (n - 4);
        memcpy(out, "...", 3);
        o = 3;
    }
    for (size_t i = start; i < len && o + 1 < n; i++) {
        unsigned char c = (unsigned char)s[i];
        out[o++] = (c < 0x20 || c == 0x7f) ? '?' : (char)c;
    }
    out[o] = '\0';
    return out;
}

/* out = a + b, cut to fit n: a deep path losing its tail still names where to look. */
static void join(char *out, size_t n, const char *a, const char *b)
{
    size_t la = strlen(a), lb = strlen(b);
    if (la > n - 1) la = n - 1;
    if (lb > n - 1 - la) lb = n - 1 - la;
    memmove(out, a, la); /* out may be a */
    memcpy(out + la, b, lb);
    out[la + lb] = '\0';
}

/* parent + ".key" (the key shown as above) into out. */
static void path_key(char *out, size_t n, const char *parent, const char *key)
{
    char k[72] = ".";
    shown(key, k + 1, sizeof k - 1);
    join(out, n, parent, k);
}

static void path_index(char *out, size_t n, const char *parent, size_t i)
{
    char idx[24];
    snprintf(idx, sizeof idx, "[%zu]", i);
    join(out, n, parent, idx);
}

static const char *type_name(const json_t *v)
{
    switch (json_typeof(v)) {
    case JSON_OBJECT: return "an object";
    case JSON_ARRAY: return "an array";
    case JSON_STRING: return "a string";
    case JSON_INTEGER: return "an integer";
    case JSON_REAL: return "a number with a fraction";
    case JSON_TRUE:
    case JSON_FALSE: return "a boolean";
    case JSON_NULL: return "null";
    }
    return "an unknown value";
}

/* "a string (\"4096\")": a value's type and, for scalars, its shortened JSON text. A
 * secret gets only its type, so a misplaced password never reaches a message. */
static void describe(const json_t *v, bool secret, char *out, size_t n)
{
    char *text = NULL;
    if (!secret && (json_is_string(v) || json_is_number(v) || json_is_boolean(v)))
        text = json_dumps(v, JSON_ENCODE_ANY | JSON_COMPACT | JSON_ENSURE_ASCII);
    if (!text) {
        snprintf(out, n, "%s", type_name(v));
        return;
    }
    if (strlen(text) > 40)
        snprintf(out, n, "%s (%.37s...)", type_name(v), text);
    else
        snprintf(out, n, "%s (%s)", type_name(v), text);
    free(text);
}

static const char *expected(enum kind k)
{
    switch (k) {
    case K_OBJECT: return "an object";
    case K_LISTEN: return "an array of \"host:port\" strings";
    case K_UPSTREAMS: return "an array of upstream objects";
    case K_STRING:
    case K_URL: return "a string";
    case K_NSTRING:
    case K_SECRET:
    case K_SECRET_FILE:
    case K_SECRET_ENV: return "a string or null";
    case K_LOGLEVEL: return "one of \"error\", \"warn\", \"info\", \"debug\"";
    case K_DIAG: return "one of \"off\", \"warn\", \"enforce\"";
    case K_BOOL: return "true or false";
    case K_UINT: return "an integer";
    case K_SIZE: return "a size (an integer number of bytes, or a string like \"64MiB\")";
    case K_DURATION: return "a duration string like \"30s\", \"500ms\" or \"2h30m\"";
    }
    return "a value";
}

/* ---- loading ------------------------------------------------------------------------ */

/* The per-entry checks of am_config_validate, also run on a list being loaded so that a
 * file's problems are all reported in one pass. */
static void check_listen_list(char *const *list, size_t n, struct am_config_report *r);
static void check_upstream(const struct am_upstream_conf *ups, size_t i,
                           struct am_config_report *r);

struct loader {
    struct am_config *cfg;
    struct am_config_report *r;
    bool oom;                /* an allocation failed: the load returns AM_ENOMEM */
    bool upstreams_replaced; /* this document had a good "upstreams" list */
};

static void type_error(struct loader *ld, const char *path, const struct field *f, const json_t *v)
{
    char got[96];
    describe(v, is_secret(f->kind), got, sizeof got);
    problem(ld->r, path, "expected %s, got %s", expected(f->kind), got);
}

static void out_of_memory(struct loader *ld, const char *path)
{
    ld->oom = true;
    problem(ld->r, path, "out of memory");
}

/* Frees a string that may hold a password, wiping it first. */
static void free_secret(char *s)
{
    if (!s) return;
    explicit_bzero(s, strlen(s));
    free(s);
}

/* Replaces *slot with value (takes value; NULL clears). */
static void set_owned(char **slot, char *value, bool secret)
{
    if (secret)
        free_secret(*slot);
    else
        free(*slot);
    *slot = value;
}

/* The stored length of a URL: one trailing '/' is dropped ("https://ghcr.io/" is
 * "https://ghcr.io"), because callers append "/v2/…". "https://" keeps its slashes so
 * that validation reports the missing host. */
static size_t url_stored_len(const char *s, size_t len)
{
    if (len >= 2 && s[len - 1] == '/' && s[len - 2] != '/') return len - 1;
    return len;
}

static bool is_env_name(const char *s)
{
    if (!((*s >= 'A' && *s <= 'Z') || (*s >= 'a' && *s <= 'z') || *s == '_')) return false;
    for (s++; *s; s++)
        if (!((*s >= 'A' && *s <= 'Z') || (*s >= 'a' && *s <= 'z') || (*s >= '0' && *s <= '9') ||
              *s == '_'))
            return false;
    return true;
}

/* Reads a password file: regular file, at most SECRET_FILE_MAX bytes, one line (trailing
 * "\n"/"\r\n" removed), not empty. Returns 0 with *out owned (free_secret), AM_ENOMEM, or
 * AM_EINVAL with a reason in why. */
static int read_secret_file(const char *path, char **out, char *why, size_t n)
{
    char buf[SECRET_FILE_MAX + 1];
    size_t len = 0;
    int rc = AM_EINVAL;
    struct stat st;
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
    if (fd < 0) {
        snprintf(why, n, "cannot open: %s", strerror(errno));
        return AM_EINVAL;
    }
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        snprintf(why, n, "is not a regular file");
        goto fail;
    }
    while (len < sizeof buf) {
        ssize_t got = read(fd, buf + len, sizeof buf - len);
        if (got < 0 && errno == EINTR) continue;
        if (got < 0) {
            snprintf(why, n, "cannot read: %s", strerror(errno));
            goto fail;
        }
        if (got == 0) break;
        len += (size_t)got;
    }
    if (len > SECRET_FILE_MAX) {
        snprintf(why, n, "is larger than 4KiB; it must hold only the password");
        goto fail;
    }
    while (len && (buf[len - 1] == '\n' || buf[len - 1] == '\r')) len--;
    if (len == 0) {
        snprintf(why, n, "is empty");
        goto fail;
    }
    if (memchr(buf, '\0', len) || memchr(buf, '\n', len)) {
        snprintf(why, n, "must hold one line of text: the password");
        goto fail;
    }
    if (!(*out = strndup(buf, len)))
        rc = AM_ENOMEM;
    else
        rc = 0;
fail:
    explicit_bzero(buf, sizeof buf);
    close(fd);
    return rc;
}

/* Stores one scalar value (every kind but K_OBJECT/K_LISTEN/K_UPSTREAMS) at
 * base + f->off, or records why not. */
static void apply_scalar(struct loader *ld, const struct field *f, void *base, json_t *v,
                         const char *path)
{
    char *at = (char *)base + f->off;
    char **slot = (char **)(void *)at;
    char why[WHY_LEN], tmp[80];
    uint64_t u = 0;
    const char *bad = NULL;

    switch (f->kind) {
    case K_STRING:
    case K_NSTRING:
    case K_URL:
    case K_SECRET:
    case K_SECRET_FILE:
    case K_SECRET_ENV: {
        if (json_is_null(v) && f->kind != K_STRING && f->kind != K_URL) {
            /* For the three password sources null means "not this one": it must not
             * clear a password another source set. */
            if (f->kind == K_NSTRING) set_owned(slot, NULL, false);
            return;
        }
        if (!json_is_string(v)) {
            type_error(ld, path, f, v);
            return;
        }
        const char *s = json_string_value(v);
        size_t len = json_string_length(v);
        if (len == 0) {
            problem(ld->r, path, "must not be empty%s",
                    f->kind == K_STRING || f->kind == K_URL ? "" : " (use null to leave it unset)");
            return;
        }
        char *value = NULL;
        if (f->kind == K_SECRET_FILE) {
            int rc = read_secret_file(s, &value, why, sizeof why);
            if (rc == AM_ENOMEM) {
                out_of_memory(ld, path);
                return;
            }
            if (rc) {
                problem(ld->r, path, "password file %s %s", shown(s, tmp, sizeof tmp), why);
                return;
            }
        } else if (f->kind == K_SECRET_ENV) {
            const char *env = is_env_name(s) ? getenv(s) : NULL;
            if (!is_env_name(s))
                bad = "is not an environment variable name";
            else if (!env)
                bad = "is not set";
            else if (!*env)
                bad = "is empty";
            if (bad) {
                problem(ld->r, path, "environment variable %s %s", shown(s, tmp, sizeof tmp), bad);
                return;
            }
            if (!(value = strdup(env))) {
                out_of_memory(ld, path);
                return;
            }
        } else {
            if (f->kind == K_URL) len = url_stored_len(s, len);
            if (!(value = strndup(s, len))) {
                out_of_memory(ld, path);
                return;
            }
        }
        set_owned(slot, value, is_secret(f->kind));
        return;
    }
    case K_LOGLEVEL: {
        enum am_log_level lvl;
        if (!json_is_string(v)) {
            type_error(ld, path, f, v);
            return;
        }
        if (am_log_parse_level(json_string_value(v), &lvl) != 0) {
            problem(ld->r, path, "unknown log level \"%s\": use error, warn, info or debug",
                    shown(json_string_value(v), tmp, sizeof tmp));
            return;
        }
        *(int *)(void *)at = (int)lvl;
        return;
    }
    case K_DIAG: {
        int mode;
        if (!json_is_string(v)) {
            type_error(ld, path, f, v);
            return;
        }
        if ((mode = am_config_parse_diagnostics(json_string_value(v))) < 0) {
            problem(ld->r, path, "unknown diagnostics mode \"%s\": use off, warn or enforce",
                    shown(json_string_value(v), tmp, sizeof tmp));
            return;
        }
        *(int *)(void *)at = mode;
        return;
    }
    case K_BOOL:
        if (!json_is_boolean(v)) {
            type_error(ld, path, f, v);
            return;
        }
        *(bool *)(void *)at = json_is_true(v);
        return;
    case K_UINT:
    case K_SIZE:
    case K_DURATION:
        if (json_is_integer(v)) {
            json_int_t i = json_integer_value(v);
            if (i < 0) {
                problem(ld->r, path, "must not be negative, got %lld", (long long)i);
                return;
            }
            if (f->kind == K_DURATION && i != 0) {
                problem(ld->r, path,
                        "a plain number is not a duration: write \"%llds\" or \"%lldms\"",
                        (long long)i, (long long)i);
                return;
            }
            u = (uint64_t)i;
        } else if (json_is_string(v) && f->kind != K_UINT) {
            const char *s = json_string_value(v);
            bad = f->kind == K_SIZE ? parse_size(s, &u) : parse_duration(s, &u);
            if (bad) {
                problem(ld->r, path, "%s \"%s\" %s", f->kind == K_SIZE ? "size" : "duration",
                        shown(s, tmp, sizeof tmp), bad);
                return;
            }
        } else {
            type_error(ld, path, f, v);
            return;
        }
        if (u < f->min || u > f->max) {
            char a[32], lo[32], hi[32];
            format_number(f->kind, u, a, sizeof a);
            format_number(f->kind, f->min, lo, sizeof lo);
            format_number(f->kind, f->max, hi, sizeof hi);
            problem(ld->r, path, "%s is out of range: allowed %s to %s", a, lo, hi);
            return;
        }
        *(uint64_t *)(void *)at = u;
        return;
    case K_OBJECT:
    case K_LISTEN:
    case K_UPSTREAMS: break;
    }
    assert(!"apply_scalar called for a compound kind");
}

static void apply(struct loader *ld, const struct field *f, void *base, json_t *v,
                  const char *path);

/* The closest known key to an unknown one (edit distance at most 2), for "did you mean".
 * Returns NULL when nothing is close. */
static const struct field *closest_key(const char *section, const char *key)
{
    size_t klen = strlen(key);
    const struct field *best = NULL;
    size_t best_d = 3;
    if (klen > 63) return NULL;
    for (size_t i = 0; i < N_FIELDS; i++) {
        const char *cand = fields[i].key;
        size_t clen = strlen(cand);
        size_t row[65];
        if (clen > 63) continue;
        /* Levenshtein distance, one row at a time. */
        for (size_t j = 0; j <= clen; j++) row[j] = j;
        for (size_t a = 1; a <= klen; a++) {
            size_t diag = row[0];
            row[0] = a;
            for (size_t j = 1; j <= clen; j++) {
                size_t up = row[j];
                size_t cost = key[a - 1] == cand[j - 1] ? 0 : 1;
                size_t best_here = diag + cost;
                if (up + 1 < best_here) best_here = up + 1;
                if (row[j - 1] + 1 < best_here) best_here = row[j - 1] + 1;
                row[j] = best_here;
                diag = up;
            }
        }
        size_t d = row[clen];
        /* Prefer a key in the same section on a tie. */
        if (d < best_d || (d == best_d && best && strcmp(fields[i].section, section) == 0 &&
                           strcmp(best->section, section) != 0)) {
            best = &fields[i];
            best_d = d;
        }
    }
    return best;
}

static void unknown_key(struct loader *ld, const char *path, const char *section, const char *key)
{
    const struct field *near = closest_key(section, key);
    char name[PATH_LEN];
    if (!near) {
        problem(ld->r, path, "unknown key");
    } else if (strcmp(near->section, section) == 0) {
        problem(ld->r, path, "unknown key (did you mean \"%s\"?)", near->key);
    } else {
        display_key(near, name, sizeof name);
        problem(ld->r, path, "unknown key (did you mean $.%s?)", name);
    }
}

/* Applies each member of obj against the rows of section; base is the struct those rows
 * point into. */
static void walk(struct loader *ld, json_t *obj, const char *section, void *base, const char *path)
{
    const char *key;
    json_t *v;
    json_object_foreach(obj, key, v)
    {
        char sub[PATH_LEN];
        path_key(sub, sizeof sub, path, key);
        const struct field *f = find_field(section, key);
        if (!f)
            unknown_key(ld, sub, section, key);
        else
            apply(ld, f, base, v, sub);
    }
}

static void free_upstream(struct am_upstream_conf *u)
{
    free(u->name);
    free(u->url);
    free(u->ca_file);
    free(u->username);
    free_secret(u->password);
    memset(u, 0, sizeof *u);
}

static void free_upstreams(struct am_config *cfg)
{
    for (size_t i = 0; i < cfg->n_upstreams; i++) free_upstream(&cfg->upstreams[i]);
    cfg->n_upstreams = 0;
}

static void free_listen(struct am_config *cfg)
{
    for (size_t i = 0; i < cfg->n_listen; i++) {
        free(cfg->listen[i]);
        cfg->listen[i] = NULL;
    }
    cfg->n_listen = 0;
}

/* Applies the defaults of every scalar row in section to base. */
static void apply_defaults(struct loader *ld, const char *section, void *base, const char *path)
{
    for (size_t i = 0; i < N_FIELDS; i++) {
        const struct field *f = &fields[i];
        if (strcmp(f->section, section) != 0 || !f->def || f->kind == K_LISTEN) continue;
        char sub[PATH_LEN];
        path_key(sub, sizeof sub, path, f->key);
        json_t *v = json_loads(f->def, JSON_DECODE_ANY, NULL);
        if (!v) {
            out_of_memory(ld, sub); /* the unit tests prove every default parses */
            continue;
        }
        apply_scalar(ld, f, base, v, sub);
        json_decref(v);
    }
}

static void load_listen(struct loader *ld, const struct field *f, json_t *v, const char *path)
{
    char *tmp[AM_CONFIG_MAX_LISTEN] = {0};
    size_t n = json_is_array(v) ? json_array_size(v) : 0, before = ld->r->total;
    if (!json_is_array(v)) {
        type_error(ld, path, f, v);
        return;
    }
    if (n < f->min || n > f->max) {
        problem(ld->r, path, "lists %zu addresses: give 1 to %llu", n, (unsigned long long)f->max);
        return;
    }
    for (size_t i = 0; i < n; i++) {
        json_t *e = json_array_get(v, i);
        char sub[PATH_LEN];
        path_index(sub, sizeof sub, path, i);
        if (!json_is_string(e)) {
            char got[96];
            describe(e, false, got, sizeof got);
            problem(ld->r, sub, "expected a \"host:port\" string, got %s", got);
        } else if (!(tmp[i] = strdup(json_string_value(e)))) {
            out_of_memory(ld, sub);
        }
    }
    if (ld->r->total == before) check_listen_list(tmp, n, ld->r);
    if (ld->r->total == before) {
        free_listen(ld->cfg);
        memcpy(ld->cfg->listen, tmp, n * sizeof tmp[0]);
        ld->cfg->n_listen = n;
        return;
    }
    for (size_t i = 0; i < n; i++) free(tmp[i]);
}

/* Loads one upstream object into u (zeroed by the caller). */
static void load_upstream(struct loader *ld, json_t *obj, struct am_upstream_conf *u,
                          const char *path)
{
    size_t sources = 0;
    apply_defaults(ld, "upstreams", u, path);
    walk(ld, obj, "upstreams", u, path);
    for (size_t i = 0; i < N_FIELDS; i++) {
        const struct field *f = &fields[i];
        if (strcmp(f->section, "upstreams") != 0) continue;
        json_t *v = json_object_get(obj, f->key);
        if ((f->flags & F_REQUIRED) && !v)
            problem(ld->r, path, "missing required key \"%s\"", f->key);
        if (is_secret(f->kind) && v && !json_is_null(v)) sources++;
    }
    if (sources > 1)
        problem(ld->r, path, "set only one of password, password_file and password_env");
}

static void load_upstreams(struct loader *ld, const struct field *f, json_t *v, const char *path)
{
    struct am_upstream_conf *tmp;
    size_t n = json_is_array(v) ? json_array_size(v) : 0, before = ld->r->total;
    if (!json_is_array(v)) {
        type_error(ld, path, f, v);
        return;
    }
    if (n < f->min || n > f->max) {
        problem(ld->r, path, "lists %zu upstreams: give 1 to %llu", n, (unsigned long long)f->max);
        return;
    }
    if (!(tmp = calloc(n, sizeof *tmp))) {
        out_of_memory(ld, path);
        return;
    }
    for (size_t i = 0; i < n; i++) {
        json_t *e = json_array_get(v, i);
        char sub[PATH_LEN];
        path_index(sub, sizeof sub, path, i);
        if (!json_is_object(e)) {
            char got[96];
            describe(e, false, got, sizeof got);
            problem(ld->r, sub, "expected an upstream object {\"name\": …, \"url\": …}, got %s",
                    got);
            continue;
        }
        size_t mark = ld->r->total;
        load_upstream(ld, e, &tmp[i], sub);
        if (ld->r->total == mark) check_upstream(tmp, i, ld->r);
    }
    if (ld->r->total == before) {
        free_upstreams(ld->cfg);
        memcpy(ld->cfg->upstreams, tmp, n * sizeof *tmp);
        ld->cfg->n_upstreams = n;
        ld->upstreams_replaced = true;
    } else {
        for (size_t i = 0; i < n; i++) free_upstream(&tmp[i]);
    }
    free(tmp);
}

static void apply(struct loader *ld, const struct field *f, void *base, json_t *v, const char *path)
{
    switch (f->kind) {
    case K_OBJECT:
        if (!json_is_object(v))
            type_error(ld, path, f, v);
        else
            walk(ld, v, f->key, base, path);
        break;
    case K_LISTEN: load_listen(ld, f, v, path); break;
    case K_UPSTREAMS: load_upstreams(ld, f, v, path); break;
    default: apply_scalar(ld, f, base, v, path); break;
    }
}

int am_config_init_defaults(struct am_config *cfg)
{
    struct am_config_report r;
    struct loader ld = {.cfg = cfg, .r = &r};
    memset(cfg, 0, sizeof *cfg);
    memset(&r, 0, sizeof r);

    for (size_t i = 0; i < N_FIELDS; i++) {
        const struct field *f = &fields[i];
        char path[PATH_LEN];
        path_key(path, sizeof path, "$", f->key);
        if (strcmp(f->section, "") != 0 || f->kind == K_OBJECT) continue;
        if (f->kind == K_LISTEN) {
            json_t *v = json_loads(f->def, JSON_DECODE_ANY, NULL);
            if (!v)
                out_of_memory(&ld, path);
            else
                load_listen(&ld, f, v, path);
            json_decref(v);
        } else if (f->kind == K_UPSTREAMS) {
            /* Through the loader, so the embedded list gets the same checks and field
             * defaults as a file's. */
            json_t *v = json_array();
            for (size_t j = 0; v && j < sizeof builtin_upstreams / sizeof builtin_upstreams[0];
                 j++) {
                json_t *u = json_pack("{s:s, s:s}", "name", builtin_upstreams[j].name, "url",
                                      builtin_upstreams[j].url);
                if (json_array_append_new(v, u) != 0) {
                    json_decref(v);
                    v = NULL;
                }
            }
            if (!v)
                out_of_memory(&ld, path);
            else
                load_upstreams(&ld, f, v, path);
            json_decref(v);
        }
    }
    /* Scalars of the top level and of every section. */
    apply_defaults(&ld, "", cfg, "$");
    for (size_t i = 0; i < N_FIELDS; i++) {
        if (fields[i].kind != K_OBJECT) continue;
        char path[PATH_LEN];
        path_key(path, sizeof path, "$", fields[i].key);
        apply_defaults(&ld, fields[i].key, cfg, path);
    }
    if (r.total && !ld.oom) {
        /* A default that fails its own row's checks is a bug in the table above. */
        assert(!"a default in the config schema table does not pass its own checks");
        am_config_cleanup(cfg);
        return AM_EINVAL;
    }
    if (ld.oom) {
        am_config_cleanup(cfg);
        return AM_ENOMEM;
    }
    return 0;
}

void am_config_cleanup(struct am_config *cfg)
{
    if (!cfg) return;
    free_listen(cfg);
    free_upstreams(cfg);
    /* Every string the table stores in cfg itself (data_dir, default_upstream, …). */
    for (size_t i = 0; i < N_FIELDS; i++) {
        const struct field *f = &fields[i];
        if (strcmp(f->section, "upstreams") == 0) continue;
        if (f->kind != K_STRING && f->kind != K_NSTRING && f->kind != K_URL) continue;
        char **slot = (char **)(void *)((char *)cfg + f->off);
        free(*slot);
        *slot = NULL;
    }
    memset(cfg, 0, sizeof *cfg);
}

/* Loads a parsed document (or records why it could not be parsed) into cfg. */
static int load_document(struct am_config *cfg, json_t *root, const json_error_t *jerr,
                         struct am_config_report *r)
{
    struct loader ld = {.cfg = cfg, .r = r};
    if (!root) {
        /* jansson quotes the text it choked on ("… near 'hunter2'"): next to an inline
         * password that is the password, so only the reason and the position are kept. */
        char why[sizeof jerr->text];
        snprintf(why, sizeof why, "%s", jerr->text);
        char *near = strstr(why, " near '");
        if (near) *near = '\0';
        problem(r, "$", "invalid JSON at line %d, column %d: %s", jerr->line, jerr->column, why);
        return AM_ECONFIG;
    }
    if (!json_is_object(root)) {
        char got[96];
        describe(root, false, got, sizeof got);
        problem(r, "$", "expected an object {…} at the top level, got %s", got);
    } else {
        walk(&ld, root, "", cfg, "$");
    }
    /* A new list without default_upstream keeps the old default only if it is still an
     * upstream; otherwise the first one becomes the default. */
    if (ld.upstreams_replaced && !json_object_get(root, "default_upstream") &&
        (!cfg->default_upstream ||
         !am_config_find_upstream(cfg, cfg->default_upstream, strlen(cfg->default_upstream)))) {
        char *first = strdup(cfg->upstreams[0].name);
        if (!first)
            out_of_memory(&ld, "$.default_upstream");
        else
            set_owned(&cfg->default_upstream, first, false);
    }
    json_decref(root);
    if (ld.oom) return AM_ENOMEM;
    return r->total ? AM_ECONFIG : 0;
}

/* Duplicate keys are refused by the parser (JSON_REJECT_DUPLICATES): a second
 * "max_connections" silently winning is the kind of mistake a config check exists for. */
#define LOAD_FLAGS JSON_REJECT_DUPLICATES

int am_config_load_string(struct am_config *cfg, const char *json, struct am_config_report *r)
{
    json_error_t jerr;
    memset(r, 0, sizeof *r);
    json_t *root = json_loads(json, LOAD_FLAGS, &jerr);
    return load_document(cfg, root, &jerr, r);
}

int am_config_load_file(struct am_config *cfg, const char *path, struct am_config_report *r)
{
    struct am_buf b;
    struct stat st;
    char chunk[4096], shown_path[120];
    json_error_t jerr;
    int fd, rc = 0;

    memset(r, 0, sizeof *r);
    shown_path_tail(path, shown_path, sizeof shown_path);
    if ((fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY)) < 0) {
        problem(r, "$", "cannot open %s: %s", shown_path, strerror(errno));
        return AM_ECONFIG;
    }
    if (fstat(fd, &st) == 0 && S_ISDIR(st.st_mode)) {
        problem(r, "$", "%s is a directory, not a config file", shown_path);
        close(fd);
        return AM_ECONFIG;
    }
    am_buf_init(&b, CONFIG_FILE_MAX);
    for (;;) {
        ssize_t got = read(fd, chunk, sizeof chunk);
        if (got < 0 && errno == EINTR) continue;
        if (got < 0) {
            problem(r, "$", "cannot read %s: %s", shown_path, strerror(errno));
            rc = AM_ECONFIG;
            break;
        }
        if (got == 0) break;
        if ((rc = am_buf_append(&b, chunk, (size_t)got)) != 0) {
            if (rc == AM_ETOO_LARGE) {
                problem(r, "$", "%s is larger than 1MiB; it cannot be a config file", shown_path);
                rc = AM_ECONFIG;
            } else {
                problem(r, "$", "out of memory");
            }
            break;
        }
    }
    close(fd);
    if (rc == 0) {
        json_t *root = json_loadb(b.data ? b.data : "", b.len, LOAD_FLAGS, &jerr);
        rc = load_document(cfg, root, &jerr, r);
    }
    if (b.data) explicit_bzero(b.data, b.len); /* it may hold an inline password */
    am_buf_cleanup(&b);
    return rc;
}

/* ---- checks shared by validation and the command line ------------------------------- */

/* "host:port" with an IPv4 literal, or "[v6]:port"; port 0-65535. Returns 0, or -1 with
 * a reason in why. */
static int check_listen(const char *s, char *why, size_t n)
{
    char host[INET6_ADDRSTRLEN + 1];
    unsigned char addr[sizeof(struct in6_addr)];
    const char *port;
    size_t hlen;
    int family = AF_INET;

    if (s[0] == '[') {
        const char *close = strchr(s, ']');
        if (!close || close[1] != ':') {
            snprintf(why, n, "must be \"[IPv6]:port\", as in \"[::1]:5000\"");
            return -1;
        }
        family = AF_INET6;
        hlen = (size_t)(close - s - 1);
        memcpy(host, s + 1, hlen < sizeof host ? hlen : 0);
        port = close + 2;
    } else {
        const char *colon = strrchr(s, ':');
        if (!colon) {
            snprintf(why, n, "needs a port, as in \"127.0.0.1:5000\"");
            return -1;
        }
        if (memchr(s, ':', (size_t)(colon - s))) {
            snprintf(why, n, "is an IPv6 address without brackets: write \"[::1]:5000\"");
            return -1;
        }
        hlen = (size_t)(colon - s);
        memcpy(host, s, hlen < sizeof host ? hlen : 0);
        port = colon + 1;
    }
    if (hlen == 0) {
        snprintf(why, n, "has no host: write \"0.0.0.0:PORT\" or \"[::]:PORT\" for every address");
        return -1;
    }
    if (hlen >= sizeof host) {
        snprintf(why, n, "has a host that is not an IP address");
        return -1;
    }
    host[hlen] = '\0';
    if (inet_pton(family, host, addr) != 1) {
        snprintf(why, n, "has a host that is not an IP%s address (names are not resolved)",
                 family == AF_INET ? "v4" : "v6");
        return -1;
    }
    uint64_t p;
    bool overflow;
    size_t nd = read_digits(port, &p, &overflow);
    if (nd == 0 || port[nd] != '\0' || nd > 5 || p > 65535) {
        snprintf(why, n, "has an invalid port: use 0 to 65535");
        return -1;
    }
    return 0;
}

static int check_name(const char *s, char *why, size_t n)
{
    if (am_reference_validate_registry(s, strlen(s)) == 0) return 0;
    snprintf(why, n,
             "is not a registry host: use lowercase host[:port] as clients write it, like "
             "\"docker.io\" or \"localhost:5000\"");
    return -1;
}

static int check_url(const char *s, char *why, size_t n)
{
    const char *auth;
    if (strncmp(s, "https://", 8) == 0)
        auth = s + 8;
    else if (strncmp(s, "http://", 7) == 0)
        auth = s + 7;
    else {
        snprintf(why, n, "must start with http:// or https://");
        return -1;
    }
    size_t alen = strcspn(auth, "/?#");
    const char *rest = auth + alen;
    if (memchr(auth, '@', alen)) {
        snprintf(why, n, "must not contain credentials: use username and password_file");
        return -1;
    }
    if (alen == 0) {
        snprintf(why, n, "has no host");
        return -1;
    }
    if (rest[0] && strcmp(rest, "/") != 0) {
        snprintf(why, n, "must not have a path, query or fragment: archmirror adds /v2/… itself");
        return -1;
    }
    if (am_reference_validate_registry(auth, alen) != 0) {
        snprintf(why, n, "has an invalid host: use lowercase host[:port] with port 1-65535");
        return -1;
    }
    return 0;
}

static bool is_https(const char *url)
{
    return url && strncmp(url, "https://", 8) == 0;
}

static int check_readable_file(const char *path, char *why, size_t n)
{
    struct stat st;
    if (stat(path, &st) != 0) {
        snprintf(why, n, "%s", strerror(errno));
        return -1;
    }
    if (!S_ISREG(st.st_mode)) {
        snprintf(why, n, "not a regular file");
        return -1;
    }
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
    if (fd < 0) {
        snprintf(why, n, "%s", strerror(errno));
        return -1;
    }
    close(fd);
    return 0;
}

/* ---- validation --------------------------------------------------------------------- */

static void check_listen_list(char *const *list, size_t n, struct am_config_report *r)
{
    char path[PATH_LEN], why[WHY_LEN], s[80];
    for (size_t i = 0; i < n; i++) {
        path_index(path, sizeof path, "$.listen", i);
        if (check_listen(list[i], why, sizeof why)) {
            problem(r, path, "\"%s\" %s", shown(list[i], s, sizeof s), why);
            continue;
        }
        for (size_t j = 0; j < i; j++) {
            if (strcmp(list[j], list[i]) == 0) {
                problem(r, path, "\"%s\" is already $.listen[%zu]", list[i], j);
                break;
            }
        }
    }
}

/* Checks ups[i] on its own and against ups[0..i) (duplicate names). */
static void check_upstream(const struct am_upstream_conf *ups, size_t i, struct am_config_report *r)
{
    const struct am_upstream_conf *u = &ups[i];
    char base[PATH_LEN], path[PATH_LEN], why[WHY_LEN], s[80];
    path_index(base, sizeof base, "$.upstreams", i);

    path_key(path, sizeof path, base, "name");
    if (!u->name || !*u->name) {
        problem(r, path, "is missing");
    } else if (check_name(u->name, why, sizeof why)) {
        problem(r, path, "\"%s\" %s", shown(u->name, s, sizeof s), why);
    } else {
        for (size_t j = 0; j < i; j++) {
            if (ups[j].name && strcmp(ups[j].name, u->name) == 0) {
                problem(r, path, "\"%s\" is already the name of $.upstreams[%zu]", u->name, j);
                break;
            }
        }
    }
    path_key(path, sizeof path, base, "url");
    if (!u->url || !*u->url)
        problem(r, path, "is missing");
    else if (check_url(u->url, why, sizeof why))
        problem(r, path, "\"%s\" %s", shown_url(u->url, s, sizeof s), why);

    if (u->ca_file) {
        path_key(path, sizeof path, base, "ca_file");
        if (!is_https(u->url))
            problem(r, path, "a CA file is only used with an https:// url");
        else if (check_readable_file(u->ca_file, why, sizeof why))
            problem(r, path, "cannot read CA file %s: %s", shown(u->ca_file, s, sizeof s), why);
    }
    if (u->username && !u->password)
        problem(r, base,
                "username is set without a password: set password, password_file or "
                "password_env");
    if (u->password && !u->username) problem(r, base, "a password is set without a username");
}

/* A certificate and its key come together, and both must be readable (their contents
 * are checked when the server loads them). */
static void check_tls_pair(struct am_config_report *r, const char *section, const char *cert,
                           const char *key)
{
    char path[PATH_LEN];
    if (!cert != !key) {
        snprintf(path, sizeof path, "%s.%s", section, cert ? "tls_key_file" : "tls_cert_file");
        problem(r, path, "must be set together with %s", cert ? "tls_cert_file" : "tls_key_file");
        return;
    }
    const char *files[2] = {cert, key}, *names[2] = {"tls_cert_file", "tls_key_file"};
    for (int i = 0; i < 2; i++) {
        if (!files[i] || access(files[i], R_OK) == 0) continue;
        snprintf(path, sizeof path, "%s.%s", section, names[i]);
        problem(r, path, "cannot read %s: %s", files[i], strerror(errno));
    }
}

int am_config_validate(const struct am_config *cfg, struct am_config_report *r)
{
    size_t before = r->total;
    char path[PATH_LEN], s[80];

    /* Numbers again, for values set by code rather than by the loader. */
    for (size_t i = 0; i < N_FIELDS; i++) {
        const struct field *f = &fields[i];
        if (!is_numeric(f->kind) || strcmp(f->section, "upstreams") == 0) continue;
        uint64_t v = *(const uint64_t *)(const void *)((const char *)cfg + f->off);
        if (v >= f->min && v <= f->max) continue;
        char key[PATH_LEN - 2], a[32], lo[32], hi[32];
        display_key(f, key, sizeof key);
        snprintf(path, sizeof path, "$.%s", key);
        format_number(f->kind, v, a, sizeof a);
        format_number(f->kind, f->min, lo, sizeof lo);
        format_number(f->kind, f->max, hi, sizeof hi);
        problem(r, path, "%s is out of range: allowed %s to %s", a, lo, hi);
    }
    if (cfg->log_level < AM_LOG_ERROR || cfg->log_level > AM_LOG_DEBUG)
        problem(r, "$.log_level", "%d is not a log level", cfg->log_level);
    if (!cfg->data_dir || !*cfg->data_dir) problem(r, "$.data_dir", "must not be empty");
    if (cfg->admin_listen) {
        char why[160];
        if (check_listen(cfg->admin_listen, why, sizeof why))
            problem(r, "$.admin.listen", "%s", why);
    }
    if (cfg->admin_token_file && access(cfg->admin_token_file, R_OK) != 0)
        problem(r, "$.admin.token_file", "cannot read %s: %s", cfg->admin_token_file,
                strerror(errno));
    check_tls_pair(r, "$.server", cfg->tls_cert_file, cfg->tls_key_file);
    check_tls_pair(r, "$.admin", cfg->admin_tls_cert_file, cfg->admin_tls_key_file);
    if (cfg->admin_tls_cert_file && !cfg->admin_listen)
        problem(r, "$.admin.tls_cert_file",
                "needs admin.listen (without it the admin side is on the registry listeners: "
                "use server.tls_cert_file)");
    if (cfg->blob_low_pct > cfg->blob_high_pct)
        problem(r, "$.cache.evict_low_watermark",
                "%llu is above evict_high_watermark (%llu): eviction would never stop",
                (unsigned long long)cfg->blob_low_pct, (unsigned long long)cfg->blob_high_pct);
    if (cfg->manifest_max_bytes && cfg->manifest_max_bytes >= cfg->metastore_map_bytes) {
        char a[32], b[32];
        format_size(cfg->manifest_max_bytes, a, sizeof a);
        format_size(cfg->metastore_map_bytes, b, sizeof b);
        problem(r, "$.cache.manifest_max_size",
                "%s is not below metastore_map_size (%s): the map would fill before eviction "
                "starts",
                a, b);
    }

    if (cfg->n_listen == 0) problem(r, "$.listen", "must list at least one address");
    check_listen_list(cfg->listen, cfg->n_listen, r);

    if (cfg->n_upstreams == 0) problem(r, "$.upstreams", "must list at least one upstream");
    for (size_t i = 0; i < cfg->n_upstreams; i++) check_upstream(cfg->upstreams, i, r);

    if (!cfg->default_upstream || !*cfg->default_upstream) {
        problem(r, "$.default_upstream", "must name one of the upstreams");
    } else if (!am_config_find_upstream(cfg, cfg->default_upstream,
                                        strlen(cfg->default_upstream))) {
        char names[160];
        size_t len = 0;
        names[0] = '\0';
        for (size_t i = 0; i < cfg->n_upstreams && len < sizeof names; i++) {
            int w = snprintf(names + len, sizeof names - len, "%s%s", i ? ", " : "",
                             cfg->upstreams[i].name ? cfg->upstreams[i].name : "?");
            if (w < 0) break;
            len += (size_t)w;
        }
        problem(r, "$.default_upstream", "\"%s\" is not one of the upstreams (%s)",
                shown(cfg->default_upstream, s, sizeof s), names);
    }
    return r->total > before ? AM_ECONFIG : 0;
}

const struct am_upstream_conf *am_config_find_upstream(const struct am_config *cfg,
                                                       const char *name, size_t len)
{
    for (size_t i = 0; i < cfg->n_upstreams; i++) {
        const char *n = cfg->upstreams[i].name;
        if (n && strlen(n) == len && memcmp(n, name, len) == 0) return &cfg->upstreams[i];
    }
    return NULL;
}

/* ---- command-line overrides --------------------------------------------------------- */

int am_config_set_listen(struct am_config *cfg, const char *hostport, char *msg, size_t n)
{
    char why[WHY_LEN], s[80];
    if (check_listen(hostport, why, sizeof why)) {
        am_error_setmsg(msg, n, "listen address \"%s\" %s", shown(hostport, s, sizeof s), why);
        return AM_ECONFIG;
    }
    if (!cfg->listen_overridden) {
        free_listen(cfg);
        cfg->listen_overridden = true;
    }
    if (cfg->n_listen >= AM_CONFIG_MAX_LISTEN) {
        am_error_setmsg(msg, n, "at most %d listen addresses are allowed", AM_CONFIG_MAX_LISTEN);
        return AM_ECONFIG;
    }
    if (!(cfg->listen[cfg->n_listen] = strdup(hostport))) {
        am_error_setmsg(msg, n, "out of memory");
        return AM_ENOMEM;
    }
    cfg->n_listen++;
    return 0;
}

/* Splits "LEFT=RIGHT" at the first '='; both sides non-empty. */
static bool split_eq(const char *s, size_t *left_len, const char **right)
{
    const char *eq = strchr(s, '=');
    if (!eq || eq == s || !eq[1]) return false;
    *left_len = (size_t)(eq - s);
    *right = eq + 1;
    return true;
}

int am_config_set_upstream(struct am_config *cfg, const char *name_eq_url, char *msg, size_t n)
{
    char why[WHY_LEN], s[80], *name = NULL, *url = NULL;
    const char *url_in;
    size_t name_len;

    if (!split_eq(name_eq_url, &name_len, &url_in)) {
        am_error_setmsg(msg, n,
                        "upstream \"%s\": expected NAME=URL, as in "
                        "docker.io=https://registry-1.docker.io",
                        shown(name_eq_url, s, sizeof s));
        return AM_ECONFIG;
    }
    if (!(name = strndup(name_eq_url, name_len)) ||
        !(url = strndup(url_in, url_stored_len(url_in, strlen(url_in))))) {
        am_error_setmsg(msg, n, "out of memory");
        free(name);
        return AM_ENOMEM;
    }
    int rc = AM_ECONFIG;
    if (check_name(name, why, sizeof why)) {
        am_error_setmsg(msg, n, "upstream name \"%s\" %s", shown(name, s, sizeof s), why);
        goto fail;
    }
    if (check_url(url, why, sizeof why)) {
        am_error_setmsg(msg, n, "upstream %s: URL \"%s\" %s", name, shown_url(url_in, s, sizeof s),
                        why);
        goto fail;
    }
    if (!cfg->upstreams_overridden) {
        free_upstreams(cfg);
        cfg->upstreams_overridden = true;
    }
    if (am_config_find_upstream(cfg, name, name_len)) {
        am_error_setmsg(msg, n, "upstream %s is given twice", name);
        goto fail;
    }
    if (cfg->n_upstreams >= AM_CONFIG_MAX_UPSTREAMS) {
        am_error_setmsg(msg, n, "at most %d upstreams are allowed", AM_CONFIG_MAX_UPSTREAMS);
        goto fail;
    }
    struct am_upstream_conf *u = &cfg->upstreams[cfg->n_upstreams++];
    memset(u, 0, sizeof *u);
    u->name = name;
    u->url = url;
    return 0;
fail:
    free(name);
    free(url);
    return rc;
}

int am_config_set_upstream_ca(struct am_config *cfg, const char *name_eq_file, char *msg, size_t n)
{
    char why[WHY_LEN], s[80], *file;
    const char *file_in;
    size_t name_len;

    if (!split_eq(name_eq_file, &name_len, &file_in)) {
        am_error_setmsg(msg, n, "upstream CA \"%s\": expected NAME=FILE",
                        shown(name_eq_file, s, sizeof s));
        return AM_ECONFIG;
    }
    struct am_upstream_conf *u =
        (struct am_upstream_conf *)am_config_find_upstream(cfg, name_eq_file, name_len);
    if (!u) {
        char name[80];
        snprintf(name, sizeof name, "%.*s", (int)(name_len < 70 ? name_len : 70), name_eq_file);
        am_error_setmsg(msg, n,
                        "upstream CA: no upstream is named \"%s\" (configure the upstream first)",
                        shown(name, s, sizeof s));
        return AM_ECONFIG;
    }
    if (!is_https(u->url)) {
        am_error_setmsg(msg, n, "upstream %s: a CA file needs an https:// URL, not %s", u->name,
                        u->url);
        return AM_ECONFIG;
    }
    if (check_readable_file(file_in, why, sizeof why)) {
        am_error_setmsg(msg, n, "upstream %s: cannot read CA file %s: %s", u->name,
                        shown(file_in, s, sizeof s), why);
        return AM_ECONFIG;
    }
    if (!(file = strdup(file_in))) {
        am_error_setmsg(msg, n, "out of memory");
        return AM_ENOMEM;
    }
    set_owned(&u->ca_file, file, false);
    return 0;
}

/* ---- dump and documentation --------------------------------------------------------- */

/* json_string, but a string that is not UTF-8 (a path from the command line) is shown
 * with '?' for its non-ASCII bytes instead of failing the whole dump. */
static json_t *json_string_lossy(const char *s)
{
    json_t *v = json_string(s);
    if (v) return v;
    char *copy = strdup(s);
    if (!copy) return NULL;
    for (char *p = copy; *p; p++)
        if ((unsigned char)*p >= 0x80) *p = '?';
    v = json_string(copy);
    free(copy);
    return v;
}

static json_t *value_json(const struct field *f, const void *base)
{
    const char *at = (const char *)base + f->off;
    char text[48];
    switch (f->kind) {
    case K_STRING:
    case K_NSTRING:
    case K_URL: {
        const char *s = *(char *const *)(const void *)at;
        return s ? json_string_lossy(s) : json_null();
    }
    case K_SECRET: return *(char *const *)(const void *)at ? json_string("***") : json_null();
    case K_LOGLEVEL: {
        int lvl = *(const int *)(const void *)at;
        return json_string(lvl >= AM_LOG_ERROR && lvl <= AM_LOG_DEBUG ? level_names[lvl] : "?");
    }
    case K_DIAG: {
        int mode = *(const int *)(const void *)at;
        return json_string(mode >= AM_DIAG_OFF && mode <= AM_DIAG_ENFORCE ? diag_names[mode] : "?");
    }
    case K_BOOL: return json_boolean(*(const bool *)(const void *)at);
    case K_UINT: {
        /* Bounds in the table keep every integer far below JSON_INTEGER_MAX. */
        uint64_t u = *(const uint64_t *)(const void *)at;
        return json_integer((json_int_t)u);
    }
    case K_SIZE:
    case K_DURATION:
        format_number(f->kind, *(const uint64_t *)(const void *)at, text, sizeof text);
        return json_string(text);
    case K_SECRET_FILE:
    case K_SECRET_ENV:
    case K_OBJECT:
    case K_LISTEN:
    case K_UPSTREAMS: break;
    }
    return NULL;
}

/* Adds the rows of section (values read from base) to obj. Returns 0 or -1 (out of
 * memory). */
static int dump_section(const struct am_config *cfg, const char *section, const void *base,
                        json_t *obj)
{
    int rc = 0;
    for (size_t i = 0; i < N_FIELDS; i++) {
        const struct field *f = &fields[i];
        json_t *v = NULL;
        if (strcmp(f->section, section) != 0 || (f->flags & F_INPUT_ONLY)) continue;
        if (f->kind == K_OBJECT) {
            if ((v = json_object()) && dump_section(cfg, f->key, cfg, v) != 0) rc = -1;
        } else if (f->kind == K_LISTEN) {
            v = json_array();
            for (size_t j = 0; v && j < cfg->n_listen; j++)
                if (json_array_append_new(v, json_string_lossy(cfg->listen[j])) != 0) rc = -1;
        } else if (f->kind == K_UPSTREAMS) {
            v = json_array();
            for (size_t j = 0; v && j < cfg->n_upstreams; j++) {
                json_t *u = json_object();
                if (!u || dump_section(cfg, f->key, &cfg->upstreams[j], u) != 0) rc = -1;
                if (json_array_append_new(v, u) != 0) rc = -1;
            }
        } else {
            v = value_json(f, base);
        }
        if (json_object_set_new(obj, f->key, v) != 0) rc = -1;
    }
    return rc;
}

char *am_config_dump(const struct am_config *cfg)
{
    json_t *root = json_object();
    char *text = NULL, *out = NULL;
    if (root && dump_section(cfg, "", cfg, root) == 0)
        text = json_dumps(root, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
    json_decref(root);
    if (!text) return NULL;
    size_t len = strlen(text);
    if ((out = malloc(len + 2))) {
        memcpy(out, text, len);
        memcpy(out + len, "\n", 2);
    }
    free(text);
    return out;
}

static const char *type_label(enum kind k)
{
    switch (k) {
    case K_OBJECT: return "object";
    case K_LISTEN: return "array of strings";
    case K_UPSTREAMS: return "array of objects";
    case K_STRING: return "string";
    case K_URL: return "URL string";
    case K_NSTRING:
    case K_SECRET:
    case K_SECRET_FILE:
    case K_SECRET_ENV: return "string or null";
    case K_LOGLEVEL:
    case K_DIAG: return "string";
    case K_BOOL: return "boolean";
    case K_UINT: return "integer";
    case K_SIZE: return "size";
    case K_DURATION: return "duration";
    }
    return "?";
}

/* Appends s to b with '|' escaped for a Markdown table cell. */
static int append_cell(struct am_buf *b, const char *s)
{
    int rc = 0;
    for (; *s && !rc; s++) rc = *s == '|' ? am_buf_append_str(b, "\\|") : am_buf_append(b, s, 1);
    return rc;
}

char *am_config_format_doc(void)
{
    struct am_buf b;
    int rc;
    am_buf_init(&b, DOC_MAX);
    rc = am_buf_append_str(&b, "| Key | Type | Default | Allowed | Meaning |\n"
                               "|---|---|---|---|---|\n");
    for (size_t i = 0; i < N_FIELDS && !rc; i++) {
        const struct field *f = &fields[i];
        char key[PATH_LEN], allowed[96] = "", lo[32], hi[32];
        display_key(f, key, sizeof key);
        if (is_numeric(f->kind)) {
            format_number(f->kind, f->min, lo, sizeof lo);
            format_number(f->kind, f->max, hi, sizeof hi);
            snprintf(allowed, sizeof allowed, "%s to %s", lo, hi);
        } else if (f->kind == K_LISTEN || f->kind == K_UPSTREAMS) {
            snprintf(allowed, sizeof allowed, "%llu to %llu entries", (unsigned long long)f->min,
                     (unsigned long long)f->max);
        } else if (f->kind == K_LOGLEVEL) {
            snprintf(allowed, sizeof allowed, "`error`, `warn`, `info`, `debug`");
        } else if (f->kind == K_DIAG) {
            snprintf(allowed, sizeof allowed, "`off`, `warn`, `enforce`");
        } else if (f->kind == K_URL) {
            snprintf(allowed, sizeof allowed, "`http://` or `https://` host[:port]");
        }
        rc = am_buf_appendf(&b, "| `%s` | %s | ", key, type_label(f->kind));
        if (!rc) {
            if (f->flags & F_REQUIRED)
                rc = am_buf_append_str(&b, "required");
            else if (f->kind == K_UPSTREAMS)
                rc = am_buf_append_str(&b, "the list below");
            else if (f->kind == K_OBJECT)
                rc = 0;
            else if (!f->def)
                rc = am_buf_append_str(&b, "`null`");
            else
                rc = am_buf_appendf(&b, "`%s`", f->def);
        }
        if (!rc) rc = am_buf_append_str(&b, " | ");
        if (!rc) rc = append_cell(&b, allowed);
        if (!rc) rc = am_buf_append_str(&b, " | ");
        if (!rc) rc = append_cell(&b, f->doc);
        if (!rc) rc = am_buf_append_str(&b, " |\n");
    }
    if (!rc)
        rc = am_buf_append_str(&b, "\nDefault `upstreams`, in order:\n\n"
                                   "| name | url |\n|---|---|\n");
    for (size_t i = 0; i < sizeof builtin_upstreams / sizeof builtin_upstreams[0] && !rc; i++)
        rc = am_buf_appendf(&b, "| `%s` | `%s` |\n", builtin_upstreams[i].name,
                            builtin_upstreams[i].url);
    if (rc) {
        am_buf_cleanup(&b);
        return NULL;
    }
    return am_buf_steal(&b, NULL);
}

int am_config_parse_diagnostics(const char *s)
{
    for (int i = 0; i <= AM_DIAG_ENFORCE; i++)
        if (strcmp(s, diag_names[i]) == 0) return i;
    return AM_EINVAL;
}

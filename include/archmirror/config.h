/*
 * config — archmirror's settings: one schema table, embedded defaults, a JSON file,
 * command-line overrides, and a checker that reports every problem with its JSON path.
 *
 * Sizes are written "64MiB"/"1GB"/plain integers and durations "30s"/"500ms"/"5m"/"1h";
 * both parse in this module only. Unknown keys are errors. This module must never bind
 * a port or touch the data directory: --check-config runs it alone.
 *
 * Order of use: am_config_init_defaults, then am_config_load_file (optional), then the
 * am_config_set_* overrides, then am_config_validate once, after the last change. Every
 * key, its type, default and bounds: conf/README.md (printed by am_config_format_doc).
 */
#ifndef ARCHMIRROR_CONFIG_H
#define ARCHMIRROR_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define AM_CONFIG_MAX_LISTEN    8
#define AM_CONFIG_MAX_UPSTREAMS 64

enum am_diagnostics { AM_DIAG_OFF = 0, AM_DIAG_WARN, AM_DIAG_ENFORCE };

struct am_upstream_conf {
    char *name;     /* owned; registry host as clients name it ("docker.io", "ghcr.io") */
    char *url;      /* owned; "https://registry-1.docker.io" (scheme://host[:port]) */
    char *ca_file;  /* owned or NULL: PEM bundle used instead of the system store */
    bool insecure;  /* skip certificate verification (explicit opt-out) */
    char *username; /* owned or NULL */
    char *password; /* owned or NULL; from password / password_file / password_env */
};

struct am_config {
    char *listen[AM_CONFIG_MAX_LISTEN]; /* owned; "127.0.0.1:5000", "[::1]:5000" */
    size_t n_listen;
    char *data_dir;         /* owned */
    char *default_upstream; /* owned; name used when ?ns= is absent */
    struct am_upstream_conf upstreams[AM_CONFIG_MAX_UPSTREAMS];
    size_t n_upstreams;
    int log_level;   /* enum am_log_level */
    int diagnostics; /* enum am_diagnostics */

    /* server */
    uint64_t max_connections;
    uint64_t max_header_bytes;
    uint64_t max_headers;
    uint64_t header_timeout_ms;
    uint64_t idle_timeout_ms;
    uint64_t drain_timeout_ms;
    bool sendfile;       /* zero-copy blob bodies on plain TCP */
    char *tls_cert_file; /* owned or NULL: the registry listeners speak plain HTTP */
    char *tls_key_file;  /* owned; set exactly when tls_cert_file is */

    /* upstream client */
    uint64_t upstream_connect_timeout_ms;
    uint64_t upstream_header_timeout_ms;
    uint64_t upstream_idle_timeout_ms; /* max silence while a body streams */
    uint64_t upstream_pool_size;       /* idle keep-alive connections per upstream */
    uint64_t max_redirects;
    bool allow_private_redirects; /* redirect targets on loopback/link-local */

    /* cache */
    uint64_t tag_freshness_ms;
    uint64_t max_manifest_bytes;
    uint64_t metastore_map_bytes;
    uint64_t manifest_max_bytes; /* manifest cache budget; 0: metastore_map_bytes / 2 */
    uint64_t blob_max_bytes;     /* blob store budget */
    uint64_t blob_high_pct;      /* eviction starts above this % of blob_max_bytes */
    uint64_t blob_low_pct;       /* ... and frees down to this % */
    uint64_t blobstore_map_bytes;

    /* admin side */
    char *admin_listen;        /* owned or NULL: served on the registry listeners */
    char *admin_token_file;    /* owned or NULL: no token required */
    char *admin_tls_cert_file; /* owned or NULL: the admin listener speaks plain HTTP */
    char *admin_tls_key_file;

    /* pull log */
    bool pulllog_enabled;
    char *pulllog_dir; /* owned or NULL: <data_dir>/pulls */
    uint64_t pulllog_rotate_bytes;
    uint64_t pulllog_keep_files;
    uint64_t pulllog_dedupe_ms; /* a repeat completion within this is not recorded */

    /* Bookkeeping of the command-line overrides, not settings: set once the first
     * am_config_set_listen / am_config_set_upstream has dropped the earlier list. */
    bool listen_overridden;
    bool upstreams_overridden;
};

/* Fills cfg (caller storage, overwritten without being cleaned up) with the embedded
 * defaults: the six public upstreams (docker.io first, the default_upstream), listen
 * 127.0.0.1:5000, data_dir ./var/archmirror. Returns 0 or AM_ENOMEM (cfg then empty).
 * Release with am_config_cleanup. */
int am_config_init_defaults(struct am_config *cfg);
/* Frees everything cfg owns (passwords are wiped first) and zeroes it; accepts NULL and
 * an already cleaned-up cfg. */
void am_config_cleanup(struct am_config *cfg);

/* One problem found while loading: JSON path ("$.upstreams[2].url") and reason. */
struct am_config_problem {
    char path[128];
    char message[256];
};
struct am_config_report {
    struct am_config_problem problems[32];
    size_t n;     /* recorded (at most 32) */
    size_t total; /* found */
};

/* Merges a JSON document over cfg: keys present replace their values; a "listen" or
 * "upstreams" array replaces the whole list. r (borrowed) is reset first, then gets every
 * problem: malformed JSON ("$", with line and column), unknown keys, wrong types, bad
 * sizes/durations, out-of-range values, unreadable password_file, unset password_env,
 * more than one password source. Checks of the assembled config are am_config_validate's.
 * When "upstreams" is given without "default_upstream" and the current default is not in
 * the new list, default_upstream becomes the first upstream.
 * Returns 0, AM_ECONFIG (problems recorded), or AM_ENOMEM. After a failure cfg is a mix
 * of old and new values, each valid on its own, and must still be cleaned up.
 * json/path: borrowed; relative paths in the document are from the working directory. */
int am_config_load_file(struct am_config *cfg, const char *path, struct am_config_report *r);
int am_config_load_string(struct am_config *cfg, const char *json, struct am_config_report *r);

/* Command-line overrides. Each checks its argument, returns 0, AM_ENOMEM, or AM_ECONFIG
 * with a one-line reason in msg (msg may be NULL), and leaves cfg unchanged on failure.
 * am_config_set_listen "HOST:PORT": the first call drops the earlier list, later calls
 *   add to it.
 * am_config_set_upstream "NAME=URL": the first call drops the earlier list (embedded or
 *   from the file), later calls add to it. It does not change default_upstream: the
 *   caller picks one after the last override.
 * am_config_set_upstream_ca "NAME=FILE": NAME must already be an https upstream, so it
 *   runs after the am_config_set_upstream calls; FILE must be readable. */
int am_config_set_listen(struct am_config *cfg, const char *hostport, char *msg, size_t n);
int am_config_set_upstream(struct am_config *cfg, const char *name_eq_url, char *msg, size_t n);
int am_config_set_upstream_ca(struct am_config *cfg, const char *name_eq_file, char *msg, size_t n);
/* Checks of the assembled config: listen addresses (IP literal:port, no duplicates),
 * data_dir, upstream names (registry host grammar, unique), URLs (http(s)://host[:port],
 * no path or userinfo), ca_file (https only, readable), username and password together,
 * default_upstream names an upstream, numbers in range. Appends every problem to r (not
 * reset); returns 0 or AM_ECONFIG. */
int am_config_validate(const struct am_config *cfg, struct am_config_report *r);

/* Finds an upstream by the name clients use; NULL if none. */
const struct am_upstream_conf *am_config_find_upstream(const struct am_config *cfg,
                                                       const char *name, size_t len);

/* "off" | "warn" | "enforce" → enum am_diagnostics, or AM_EINVAL. */
int am_config_parse_diagnostics(const char *s);

/* Parsers shared by file and command line. Return 0 or AM_EINVAL (*out untouched).
 * Size: digits with an optional unit B, KB, MB, GB, TB (powers of 1000) or KiB, MiB,
 * GiB, TiB (powers of 1024): "64MiB", "10MB", "1048576". No fractions, spaces or sign.
 * Duration: "0", or whole numbers with units h, m, s, ms written largest first, each at
 * most once: "500ms", "30s", "5m", "2h30m", "1s500ms". A plain number other than 0 is
 * refused (seconds or milliseconds would be a guess). */
int am_config_parse_size(const char *s, uint64_t *out);
int am_config_parse_duration_ms(const char *s, uint64_t *out);

/* Writes cfg as an indented JSON document ending in a newline, every key in
 * conf/archmirror.json's order, sizes and durations in human form ("16KiB", "2h30m").
 * Passwords are written as "***" (null when unset); password_file and password_env are
 * not written, their value having been read into password. A dump without passwords loads
 * back into the same config. Returns owned string (free()) or NULL (out of memory). */
char *am_config_dump(const struct am_config *cfg);

/* The Markdown reference of every key (key, type, default, allowed values, meaning) and
 * the default upstream list, generated from the schema table; conf/README.md contains it
 * verbatim. Returns owned string (free()) or NULL (out of memory). */
char *am_config_format_doc(void);

#endif

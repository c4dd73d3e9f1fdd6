/*
 * config — archmirror's settings: one schema table, embedded defaults, a JSON file,
 * command-line overrides, and a checker that reports every problem with its JSON path.
 *
 * Sizes are written "64MiB"/"1GB"/plain integers and durations "30s"/"500ms"/"5m"/"1h";
 * both parse in this module only. Unknown keys are errors. This module must never bind
 * a port or touch the data directory: --check-config runs it alone.
 */
#ifndef ARCHMIRROR_CONFIG_H
#define ARCHMIRROR_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define AM_CONFIG_MAX_LISTEN 8
#define AM_CONFIG_MAX_UPSTREAMS 64

struct am_upstream_conf {
    char *name;          /* owned; registry host as clients name it ("docker.io", "ghcr.io") */
    char *url;           /* owned; "https://registry-1.docker.io" (scheme://host[:port]) */
    char *ca_file;       /* owned or NULL: PEM bundle used instead of the system store */
    bool insecure;       /* skip certificate verification (explicit opt-out) */
    char *username;      /* owned or NULL */
    char *password;      /* owned or NULL; from password / password_file / password_env */
};

struct am_config {
    char *listen[AM_CONFIG_MAX_LISTEN]; /* owned; "127.0.0.1:5000", "[::1]:5000" */
    size_t n_listen;
    char *data_dir;                     /* owned */
    char *default_upstream;             /* owned; name used when ?ns= is absent */
    struct am_upstream_conf upstreams[AM_CONFIG_MAX_UPSTREAMS];
    size_t n_upstreams;
    int log_level;                      /* enum am_log_level */

    /* server */
    uint64_t max_connections;
    uint64_t max_header_bytes;
    uint64_t max_headers;
    uint64_t header_timeout_ms;
    uint64_t idle_timeout_ms;
    uint64_t drain_timeout_ms;

    /* upstream client */
    uint64_t upstream_connect_timeout_ms;
    uint64_t upstream_header_timeout_ms;
    uint64_t upstream_idle_timeout_ms;   /* max silence while a body streams */
    uint64_t upstream_pool_size;         /* idle keep-alive connections per upstream */
    uint64_t max_redirects;
    bool allow_private_redirects;        /* redirect targets on loopback/link-local */

    /* cache */
    uint64_t tag_freshness_ms;
    uint64_t max_manifest_bytes;
    uint64_t metastore_map_bytes;
};

/* Fills cfg with the embedded defaults (the six public upstreams, 127.0.0.1:5000,
 * ./var/archmirror). Returns 0 or AM_ENOMEM. Release with am_config_cleanup. */
int am_config_init_defaults(struct am_config *cfg);
void am_config_cleanup(struct am_config *cfg);

/* One problem found while loading: JSON path ("$.upstreams[2].url") and reason. */
struct am_config_problem {
    char path[128];
    char message[256];
};
struct am_config_report {
    struct am_config_problem problems[32];
    size_t n;      /* recorded (at most 32) */
    size_t total;  /* found */
};

/* Merges a JSON document over cfg. Every problem is recorded in report (borrowed);
 * returns 0 when there were none, AM_ECONFIG otherwise (cfg then unspecified). */
int am_config_load_file(struct am_config *cfg, const char *path, struct am_config_report *r);
int am_config_load_string(struct am_config *cfg, const char *json, struct am_config_report *r);

/* Command-line overrides. Each returns 0 or AM_ECONFIG with a reason in msg.
 * am_config_set_upstream "NAME=URL": the first call drops the default list. */
int am_config_set_listen(struct am_config *cfg, const char *hostport, char *msg, size_t n);
int am_config_set_upstream(struct am_config *cfg, const char *name_eq_url, char *msg, size_t n);
int am_config_set_upstream_ca(struct am_config *cfg, const char *name_eq_file, char *msg,
                              size_t n);
/* Cross-field checks (default_upstream names an upstream, URLs parse, CA files exist).
 * Appends to r; returns 0 or AM_ECONFIG. */
int am_config_validate(const struct am_config *cfg, struct am_config_report *r);

/* Finds an upstream by the name clients use; NULL if none. */
const struct am_upstream_conf *am_config_find_upstream(const struct am_config *cfg,
                                                       const char *name, size_t len);

/* Parsers shared by file and command line. Return 0 or AM_EINVAL. */
int am_config_parse_size(const char *s, uint64_t *out);
int am_config_parse_duration_ms(const char *s, uint64_t *out);

/* Writes the defaults as a JSON document (for --print-defaults / the README). Returns
 * owned string (free()) or NULL. */
char *am_config_dump(const struct am_config *cfg);

#endif

/*
 * main — the archmirror command: flags, config, start-up and graceful shutdown.
 *
 * Order of precedence: embedded defaults, then --config FILE, then the flags. Exit codes:
 * 0 after a clean shutdown (SIGTERM/SIGINT drain), 2 for bad flags or config (one line
 * per problem), 1 when start-up fails (port in use, data dir unusable).
 */
#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <uv.h>

#include "archmirror/blobstore.h"
#include "archmirror/cli.h"
#include "archmirror/config.h"
#include "archmirror/dirs.h"
#include "archmirror/error.h"
#include "archmirror/httpserver.h"
#include "archmirror/log.h"
#include "archmirror/metastore.h"
#include "archmirror/pulllog.h"
#include "archmirror/registry.h"
#include "archmirror/tls.h"

#define EXIT_USAGE    2
#define MAX_OVERRIDES 64

static const char usage[] =
    "usage: archmirror [options]\n"
    "       archmirror platforms [--server URL] [--json] IMAGE...\n"
    "       archmirror audit --require PLATFORM [--server URL] [--json] [FILE|-]\n"
    "\n"
    "A caching, architecture-aware mirror for container registries (OCI distribution\n"
    "pull API), meant to sit between every node's containerd and the upstream registries.\n"
    "\n"
    "  --config FILE           JSON config (see conf/archmirror.json); flags override it\n"
    "  --listen HOST:PORT      address to serve on (repeatable; default 127.0.0.1:5000)\n"
    "  --data-dir DIR          cache directory (default ./var/archmirror)\n"
    "  --upstream NAME=URL     upstream registry NAME (as clients name it, e.g. docker.io)\n"
    "                          at URL (repeatable; replaces the default list), e.g.\n"
    "                          --upstream docker.io=http://127.0.0.1:5100\n"
    "  --upstream-ca NAME=FILE PEM CA bundle to verify upstream NAME's TLS certificate\n"
    "  --default-upstream NAME upstream used when a request has no ?ns= parameter\n"
    "  --log-level LEVEL       error, warn, info (default) or debug\n"
    "  --diagnostics MODE      off, warn (default) or enforce: what to do when a node\n"
    "                          pulls a tag with no variant for its platform\n"
    "  --check-config FILE     validate FILE (with the flags given before it), print every\n"
    "                          problem with its JSON path, and exit\n"
    "  --print-config          print the effective configuration as JSON and exit\n"
    "  --version               print the version and exit\n"
    "  --help                  print this help and exit\n"
    "\n"
    "Exit status: 0 after a clean shutdown on SIGTERM/SIGINT, 2 for bad flags or config,\n"
    "1 when start-up fails (for example the port is already in use).\n";

struct app {
    uv_loop_t loop;
    struct am_config cfg;
    struct am_metastore *ms;
    struct am_blobstore *bs;
    struct am_pulllog *pl;
    struct am_registry *reg;
    struct am_httpserver *srv;
    struct am_httpserver *admin; /* NULL unless admin.listen is set */
    int draining;                /* servers still draining */
    uv_signal_t sigterm, sigint, sighup;
    bool stopping;
    bool reloading;    /* a certificate reload is on the thread pool */
    bool reload_again; /* SIGHUP came during it: reload once more when it ends */
    uv_work_t reload_req;
    struct tls_side {
        const char *what;       /* "registry" / "admin", for logs */
        const char *cert, *key; /* borrowed from cfg; NULL: no TLS */
        struct am_httpserver **srv;
        struct am_tls_ctx *loaded; /* a reload's result, handed to srv on the loop */
        int rc;
        char msg[512];
    } tls[2];
};

static void print_report(const char *file, const struct am_config_report *r)
{
    for (size_t i = 0; i < r->n; i++)
        fprintf(stderr, "archmirror: %s: %s: %s\n", file, r->problems[i].path,
                r->problems[i].message);
    if (r->total > r->n)
        fprintf(stderr, "archmirror: %s: … and %zu more problems\n", file, r->total - r->n);
}

static int replace_str(char **slot, const char *value)
{
    char *dup = strdup(value);
    if (!dup) return AM_ENOMEM;
    free(*slot);
    *slot = dup;
    return 0;
}

/* --- shutdown: drain the server, then the upstreams, then the store ---------------- */

static void on_signal_closed(uv_handle_t *h)
{
    (void)h;
}

static void on_store_closed(void *arg)
{
    struct app *app = arg;
    app->ms = NULL;
    uv_close((uv_handle_t *)&app->sigterm, on_signal_closed);
    uv_close((uv_handle_t *)&app->sigint, on_signal_closed);
    uv_close((uv_handle_t *)&app->sighup, on_signal_closed);
}

static void on_pulllog_closed(void *arg)
{
    struct app *app = arg;
    app->pl = NULL;
    am_metastore_close(app->ms, on_store_closed, app);
}

static void on_blobs_closed(void *arg)
{
    struct app *app = arg;
    app->bs = NULL;
    if (app->pl)
        am_pulllog_close(app->pl, on_pulllog_closed, app);
    else
        on_pulllog_closed(app);
}

static void on_server_drained(void *arg)
{
    struct app *app = arg;
    if (--app->draining > 0) return;
    AM_INFO("server drained; closing upstreams and the cache stores");
    am_registry_free(app->reg);
    app->reg = NULL;
    am_blobstore_close_store(app->bs, on_blobs_closed, app);
}

/* --- TLS certificates: loaded at start, re-read on SIGHUP ---------------------------- */

/* On the thread pool: reading the PEM files is disk I/O, never done on the loop. */
static void reload_work(uv_work_t *req)
{
    struct app *app = req->data;
    for (int i = 0; i < 2; i++) {
        struct tls_side *t = &app->tls[i];
        t->loaded = NULL;
        t->msg[0] = '\0';
        t->rc =
            t->cert ? am_tls_server_ctx_new(t->cert, t->key, &t->loaded, t->msg, sizeof t->msg) : 0;
    }
}

static void reload_start(struct app *app);

static void reload_done(uv_work_t *req, int status)
{
    struct app *app = req->data;
    app->reloading = false;
    for (int i = 0; i < 2; i++) {
        struct tls_side *t = &app->tls[i];
        if (!t->cert) continue;
        if (status == 0 && t->rc == 0 && *t->srv && !app->stopping) {
            char desc[400];
            am_tls_ctx_describe(t->loaded, desc, sizeof desc);
            am_httpserver_set_tls(*t->srv, t->loaded);
            AM_INFO("SIGHUP: %s listeners: new connections use %s", t->what, desc);
        } else {
            am_tls_ctx_free(t->loaded);
            if (!app->stopping)
                AM_ERROR("SIGHUP: %s listeners keep the previous certificate: %s", t->what,
                         status      ? uv_strerror(status)
                         : t->msg[0] ? t->msg
                                     : am_error_message(t->rc));
        }
        t->loaded = NULL;
    }
    if (app->reload_again && !app->stopping) {
        app->reload_again = false;
        reload_start(app);
    }
}

static void reload_start(struct app *app)
{
    if (app->reloading) {
        app->reload_again = true; /* the files may have changed after the worker read them */
        return;
    }
    app->reload_req.data = app;
    if (uv_queue_work(&app->loop, &app->reload_req, reload_work, reload_done) == 0)
        app->reloading = true;
}

static void on_sighup(uv_signal_t *h, int signum)
{
    struct app *app = h->data;
    (void)signum;
    if (app->stopping) return;
    if (!app->tls[0].cert && !app->tls[1].cert) {
        AM_INFO("SIGHUP: no TLS certificate configured; nothing to reload");
        return;
    }
    reload_start(app);
}

/* At start-up, before the loop runs: a pair that does not load stops the start. */
static int tls_setup(struct app *app)
{
    const struct am_config *cfg = &app->cfg;
    app->tls[0] = (struct tls_side){
        .what = "registry", .cert = cfg->tls_cert_file, .key = cfg->tls_key_file, .srv = &app->srv};
    app->tls[1] = (struct tls_side){.what = "admin",
                                    .cert = cfg->admin_tls_cert_file,
                                    .key = cfg->admin_tls_key_file,
                                    .srv = &app->admin};
    for (int i = 0; i < 2; i++) {
        struct tls_side *t = &app->tls[i];
        struct am_tls_ctx *ctx;
        char desc[400];
        if (!t->cert || !*t->srv) continue;
        int rc = am_tls_server_ctx_new(t->cert, t->key, &ctx, t->msg, sizeof t->msg);
        if (rc) {
            fprintf(stderr, "archmirror: %s TLS: %s\n", t->what,
                    t->msg[0] ? t->msg : am_error_message(rc));
            return rc;
        }
        am_tls_ctx_describe(ctx, desc, sizeof desc);
        am_httpserver_set_tls(*t->srv, ctx);
        AM_INFO("%s listeners speak TLS with %s", t->what, desc);
    }
    return 0;
}

static void on_signal(uv_signal_t *h, int signum)
{
    struct app *app = h->data;
    if (app->stopping) {
        AM_WARN("second signal %d: exiting without waiting for the drain", signum);
        exit(1);
    }
    app->stopping = true;
    AM_INFO("signal %d: draining connections", signum);
    app->draining = app->admin ? 2 : 1;
    am_httpserver_drain(app->srv, on_server_drained, app);
    if (app->admin) am_httpserver_drain(app->admin, on_server_drained, app);
}

/* --- flags ---------------------------------------------------------------------------- */

enum {
    OPT_CONFIG = 256,
    OPT_LISTEN,
    OPT_DATA_DIR,
    OPT_UPSTREAM,
    OPT_UPSTREAM_CA,
    OPT_DEFAULT_UPSTREAM,
    OPT_LOG_LEVEL,
    OPT_DIAGNOSTICS,
    OPT_CHECK,
    OPT_PRINT,
    OPT_VERSION,
    OPT_HELP
};

static const struct option options[] = {
    {"config", required_argument, NULL, OPT_CONFIG},
    {"listen", required_argument, NULL, OPT_LISTEN},
    {"data-dir", required_argument, NULL, OPT_DATA_DIR},
    {"upstream", required_argument, NULL, OPT_UPSTREAM},
    {"upstream-ca", required_argument, NULL, OPT_UPSTREAM_CA},
    {"default-upstream", required_argument, NULL, OPT_DEFAULT_UPSTREAM},
    {"log-level", required_argument, NULL, OPT_LOG_LEVEL},
    {"diagnostics", required_argument, NULL, OPT_DIAGNOSTICS},
    {"check-config", required_argument, NULL, OPT_CHECK},
    {"print-config", no_argument, NULL, OPT_PRINT},
    {"version", no_argument, NULL, OPT_VERSION},
    {"help", no_argument, NULL, OPT_HELP},
    {NULL, 0, NULL, 0},
};

struct flags {
    const char *config;
    const char *check;
    bool print;
    int n;
    int opt[MAX_OVERRIDES];
    const char *val[MAX_OVERRIDES];
};

static int parse_flags(int argc, char **argv, struct flags *f)
{
    int c;
    opterr = 0;
    while ((c = getopt_long(argc, argv, "", options, NULL)) != -1) {
        switch (c) {
        case OPT_CONFIG: f->config = optarg; break;
        case OPT_CHECK: f->check = optarg; break;
        case OPT_PRINT: f->print = true; break;
        case OPT_VERSION: printf("archmirror %s\n", AM_VERSION); exit(0);
        case OPT_HELP: fputs(usage, stdout); exit(0);
        case '?':
            fprintf(stderr, "archmirror: unknown or incomplete option '%s' (see --help)\n",
                    argv[optind - 1]);
            return AM_EINVAL;
        default:
            if (f->n == MAX_OVERRIDES) {
                fprintf(stderr, "archmirror: too many options\n");
                return AM_EINVAL;
            }
            f->opt[f->n] = c;
            f->val[f->n++] = optarg;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "archmirror: unexpected argument '%s' (see --help)\n", argv[optind]);
        return AM_EINVAL;
    }
    return 0;
}

static int apply_overrides(struct am_config *cfg, const struct flags *f)
{
    char msg[256];
    for (int i = 0; i < f->n; i++) {
        int rc = 0;
        msg[0] = '\0';
        switch (f->opt[i]) {
        case OPT_LISTEN: rc = am_config_set_listen(cfg, f->val[i], msg, sizeof msg); break;
        case OPT_DATA_DIR: rc = replace_str(&cfg->data_dir, f->val[i]); break;
        case OPT_UPSTREAM: rc = am_config_set_upstream(cfg, f->val[i], msg, sizeof msg); break;
        case OPT_UPSTREAM_CA:
            rc = am_config_set_upstream_ca(cfg, f->val[i], msg, sizeof msg);
            break;
        case OPT_DEFAULT_UPSTREAM: rc = replace_str(&cfg->default_upstream, f->val[i]); break;
        case OPT_DIAGNOSTICS: {
            int mode = am_config_parse_diagnostics(f->val[i]);
            if (mode < 0) {
                rc = AM_ECONFIG;
                snprintf(msg, sizeof msg, "--diagnostics: expected off, warn or enforce");
            } else {
                cfg->diagnostics = mode;
            }
            break;
        }
        case OPT_LOG_LEVEL: {
            enum am_log_level lvl;
            rc = am_log_parse_level(f->val[i], &lvl);
            if (rc)
                snprintf(msg, sizeof msg, "--log-level: expected error, warn, info or debug");
            else
                cfg->log_level = (int)lvl;
            break;
        }
        }
        if (rc) {
            fprintf(stderr, "archmirror: %s\n", msg[0] ? msg : am_error_message(rc));
            return rc;
        }
    }
    /* The first --upstream names the default registry unless one was given. */
    bool default_given = false, upstream_given = false;
    const char *first = NULL;
    for (int i = 0; i < f->n; i++) {
        if (f->opt[i] == OPT_DEFAULT_UPSTREAM) default_given = true;
        if (f->opt[i] == OPT_UPSTREAM && !upstream_given) {
            upstream_given = true;
            first = cfg->n_upstreams ? cfg->upstreams[0].name : NULL;
        }
    }
    if (upstream_given && !default_given && first &&
        !am_config_find_upstream(cfg, cfg->default_upstream, strlen(cfg->default_upstream)))
        return replace_str(&cfg->default_upstream, first);
    return 0;
}

/* Loads defaults, file and flags into cfg; prints problems. Returns 0 or AM_ECONFIG. */
static int load_config(struct am_config *cfg, const char *file, const struct flags *f)
{
    struct am_config_report r;
    memset(&r, 0, sizeof r);
    if (am_config_init_defaults(cfg)) {
        fprintf(stderr, "archmirror: out of memory\n");
        return AM_ENOMEM;
    }
    if (file && am_config_load_file(cfg, file, &r)) {
        print_report(file, &r);
        return AM_ECONFIG;
    }
    if (apply_overrides(cfg, f)) return AM_ECONFIG;
    memset(&r, 0, sizeof r);
    if (am_config_validate(cfg, &r)) {
        print_report(file ? file : "(flags)", &r);
        return AM_ECONFIG;
    }
    return 0;
}

/* Reads a one-line secret; trailing newlines go. Returns 0 or -errno (reason printed). */
static int read_token(const char *path, char *out, size_t cap)
{
    FILE *f = fopen(path, "r");
    if (!f) {
        int e = errno;
        fprintf(stderr, "archmirror: admin.token_file %s: %s\n", path, strerror(e));
        return -e;
    }
    size_t n = fread(out, 1, cap - 1, f);
    fclose(f);
    out[n] = '\0';
    while (n && (out[n - 1] == '\n' || out[n - 1] == '\r')) out[--n] = '\0';
    if (!n) {
        fprintf(stderr, "archmirror: admin.token_file %s is empty\n", path);
        return -EINVAL;
    }
    return 0;
}

static int start(struct app *app)
{
    char msg[512] = "";
    struct am_config *cfg = &app->cfg;
    int rc;

    if ((rc = am_dirs_make(cfg->data_dir))) {
        fprintf(stderr, "archmirror: data dir %s: %s\n", cfg->data_dir, strerror(rc));
        return rc;
    }
    if ((rc = am_metastore_open(&app->loop, cfg->data_dir, cfg->metastore_map_bytes, &app->ms, msg,
                                sizeof msg))) {
        fprintf(stderr, "archmirror: cache store: %s\n", msg[0] ? msg : am_error_message(rc));
        return rc;
    }
    /* cache.manifest_max_size 0 means half the map: the rest is LMDB's overhead and tags. */
    uint64_t manifest_budget =
        cfg->manifest_max_bytes ? cfg->manifest_max_bytes : cfg->metastore_map_bytes / 2;
    if ((rc = am_metastore_set_budget(app->ms, manifest_budget, (unsigned)cfg->blob_high_pct,
                                      (unsigned)cfg->blob_low_pct))) {
        fprintf(stderr, "archmirror: cache store: manifest budget: %s\n", am_error_message(rc));
        return rc;
    }
    struct am_blobstore_options bo = {
        .max_bytes = cfg->blob_max_bytes,
        .high_pct = (unsigned)cfg->blob_high_pct,
        .low_pct = (unsigned)cfg->blob_low_pct,
        .map_bytes = cfg->blobstore_map_bytes,
    };
    if ((rc = am_blobstore_open_store(&app->loop, cfg->data_dir, &bo, &app->bs, msg, sizeof msg))) {
        fprintf(stderr, "archmirror: blob store: %s\n", msg[0] ? msg : am_error_message(rc));
        return rc;
    }
    if (cfg->pulllog_enabled) {
        char dir[4096];
        struct am_pulllog_opts po;
        am_pulllog_opts_init(&po);
        if (cfg->pulllog_dir)
            snprintf(dir, sizeof dir, "%s", cfg->pulllog_dir);
        else
            snprintf(dir, sizeof dir, "%s/pulls", cfg->data_dir);
        po.dir = dir;
        po.rotate_bytes = cfg->pulllog_rotate_bytes;
        po.keep_files = (uint32_t)cfg->pulllog_keep_files;
        if ((rc = am_pulllog_open(&app->loop, &po, &app->pl, msg, sizeof msg))) {
            fprintf(stderr, "archmirror: pull log: %s\n", msg[0] ? msg : am_error_message(rc));
            return rc;
        }
    }
    if ((rc = am_registry_new(&app->loop, cfg, app->ms, app->bs, app->pl, &app->reg, msg,
                              sizeof msg))) {
        fprintf(stderr, "archmirror: upstreams: %s\n", msg[0] ? msg : am_error_message(rc));
        return rc;
    }
    struct am_httpserver_opts so = {
        .max_connections = cfg->max_connections,
        .max_header_bytes = cfg->max_header_bytes,
        .max_headers = cfg->max_headers,
        .header_timeout_ms = cfg->header_timeout_ms,
        .idle_timeout_ms = cfg->idle_timeout_ms,
        .drain_timeout_ms = cfg->drain_timeout_ms,
        .on_complete = am_registry_on_complete,
        .no_sendfile = !cfg->sendfile,
    };
    if ((rc = am_httpserver_new(&app->loop, &so, am_registry_handle, app->reg, &app->srv))) {
        fprintf(stderr, "archmirror: server: %s\n", am_error_message(rc));
        return rc;
    }
    for (size_t i = 0; i < cfg->n_listen; i++) {
        msg[0] = '\0';
        if ((rc = am_httpserver_listen(app->srv, cfg->listen[i], msg, sizeof msg))) {
            fprintf(stderr, "archmirror: %s\n", msg[0] ? msg : am_error_message(rc));
            return rc;
        }
        AM_INFO("listening on %s", cfg->listen[i]);
    }
    for (size_t i = 0; i < cfg->n_upstreams; i++)
        AM_INFO("upstream %s → %s%s", cfg->upstreams[i].name, cfg->upstreams[i].url,
                strcmp(cfg->upstreams[i].name, cfg->default_upstream) == 0 ? " (default)" : "");
    if (cfg->admin_listen || cfg->admin_token_file) {
        char token[512] = "";
        if (cfg->admin_token_file && (rc = read_token(cfg->admin_token_file, token, sizeof token)))
            return rc;
        rc = am_registry_set_admin(app->reg, cfg->admin_listen != NULL, token[0] ? token : NULL);
        explicit_bzero(token, sizeof token);
        if (rc) return rc;
    }
    if (cfg->admin_listen) {
        if ((rc = am_httpserver_new(&app->loop, &so, am_registry_handle_admin, app->reg,
                                    &app->admin))) {
            fprintf(stderr, "archmirror: admin server: %s\n", am_error_message(rc));
            return rc;
        }
        msg[0] = '\0';
        if ((rc = am_httpserver_listen(app->admin, cfg->admin_listen, msg, sizeof msg))) {
            fprintf(stderr, "archmirror: admin: %s\n", msg[0] ? msg : am_error_message(rc));
            return rc;
        }
        AM_INFO("admin side (/metrics, /api/v1) on %s%s", cfg->admin_listen,
                cfg->admin_token_file ? ", bearer token required" : "");
    }
    if ((rc = tls_setup(app))) return rc;
    AM_INFO("archmirror %s ready; data in %s", AM_VERSION, cfg->data_dir);
    return 0;
}

/* Start-up failed: undo what was opened, letting async closes finish. */
static void abandon(struct app *app)
{
    struct am_httpserver *servers[] = {app->srv, app->admin};
    for (int i = 0; i < 2; i++) {
        if (!servers[i]) continue;
        am_httpserver_drain(servers[i], NULL, NULL);
        uv_run(&app->loop, UV_RUN_DEFAULT);
        am_httpserver_free(servers[i]);
    }
    am_registry_free(app->reg);
    if (app->bs) am_blobstore_close_store(app->bs, NULL, NULL);
    if (app->pl) am_pulllog_close(app->pl, NULL, NULL);
    if (app->ms) am_metastore_close(app->ms, NULL, NULL);
    uv_close((uv_handle_t *)&app->sigterm, NULL);
    uv_close((uv_handle_t *)&app->sigint, NULL);
    uv_close((uv_handle_t *)&app->sighup, NULL);
    uv_run(&app->loop, UV_RUN_DEFAULT);
    uv_loop_close(&app->loop);
}

int main(int argc, char **argv)
{
    static struct app app;
    struct flags f;
    if (am_cli_is_command(argc, argv)) return am_cli_main(argc, argv);
    memset(&f, 0, sizeof f);
    if (parse_flags(argc, argv, &f)) return EXIT_USAGE;

    if (f.check) {
        int rc = load_config(&app.cfg, f.check, &f);
        am_config_cleanup(&app.cfg);
        if (rc) return EXIT_USAGE;
        printf("%s: OK\n", f.check);
        return 0;
    }
    if (load_config(&app.cfg, f.config, &f)) {
        am_config_cleanup(&app.cfg);
        return EXIT_USAGE;
    }
    if (f.print) {
        char *json = am_config_dump(&app.cfg);
        if (json) puts(json);
        free(json);
        am_config_cleanup(&app.cfg);
        return json ? 0 : 1;
    }
    am_log_set_level((enum am_log_level)app.cfg.log_level);
    signal(SIGPIPE, SIG_IGN);

    uv_loop_init(&app.loop);
    uv_signal_init(&app.loop, &app.sigterm);
    uv_signal_init(&app.loop, &app.sigint);
    uv_signal_init(&app.loop, &app.sighup);
    app.sigterm.data = app.sigint.data = app.sighup.data = &app;
    if (start(&app)) {
        abandon(&app);
        am_config_cleanup(&app.cfg);
        return 1;
    }
    uv_signal_start(&app.sigterm, on_signal, SIGTERM);
    uv_signal_start(&app.sigint, on_signal, SIGINT);
    uv_signal_start(&app.sighup, on_sighup, SIGHUP);

    uv_run(&app.loop, UV_RUN_DEFAULT);

    am_httpserver_free(app.srv);
    if (app.admin) am_httpserver_free(app.admin);
    int rc = uv_loop_close(&app.loop);
    if (rc) AM_WARN("event loop closed with live handles: %s", uv_strerror(rc));
    am_config_cleanup(&app.cfg);
    AM_INFO("archmirror stopped");
    return 0;
}

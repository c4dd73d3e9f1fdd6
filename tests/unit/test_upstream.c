/*
 * Unit tests for src/upstream.c and src/tls.c.
 *
 * Two kinds of peer: a real Debian docker-registry (distribution 2.8), plain and with TLS
 * (a CA and a server certificate for IP 127.0.0.1 made with the openssl CLI), started
 * once for the group on free loopback ports and killed by PID at the end; and fake
 * servers on each test's own loop for what a real registry will not do: stall, redirect,
 * ask for tokens, break framing. Fakes count what they receive, so tests assert what the
 * upstream got, not only what the client saw. Every test ends by asserting that its loop
 * closes with no live handle.
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
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <uv.h>

#include "archmirror/digest.h"
#include "archmirror/error.h"
#include "archmirror/log.h"
#include "archmirror/upstream.h"

extern char **environ;

#define REGISTRY_BIN "/usr/bin/docker-registry"
#define OPENSSL_BIN  "/usr/bin/openssl"
#define BLOB_LEN     (1024 * 1024 + 37)

static struct {
    char dir[512];
    bool have_registry;
    bool have_tls;
    pid_t plain_pid, tls_pid;
    int plain_port, tls_port;
    char plain_url[64], tls_url[64];
    char ca_file[600];
    unsigned char *blob;
    char blob_digest[AM_DIGEST_STR_MAX + 1];
} G;

/* --- processes and blocking helpers for the group setup ---------------------------------- */

static pid_t spawn(char *const argv[], const char *logpath)
{
    posix_spawn_file_actions_t fa;
    pid_t pid;
    posix_spawn_file_actions_init(&fa);
    if (logpath) {
        posix_spawn_file_actions_addopen(&fa, 1, logpath, O_WRONLY | O_CREAT | O_APPEND, 0644);
        posix_spawn_file_actions_adddup2(&fa, 1, 2);
    }
    int rc = posix_spawn(&pid, argv[0], &fa, NULL, argv, environ);
    posix_spawn_file_actions_destroy(&fa);
    return rc ? -1 : pid;
}

static int run(char *const argv[], const char *logpath)
{
    int st;
    pid_t pid = spawn(argv, logpath);
    if (pid < 0 || waitpid(pid, &st, 0) != pid) return -1;
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

static int free_port(void)
{
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof a;
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) return -1;
    if (bind(fd, (struct sockaddr *)&a, sizeof a) || getsockname(fd, (struct sockaddr *)&a, &len)) {
        close(fd);
        return -1;
    }
    close(fd);
    return ntohs(a.sin_port);
}

static int connect_loopback(int port)
{
    struct sockaddr_in a = {.sin_family = AF_INET,
                            .sin_port = htons((uint16_t)port),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    struct timeval tv = {.tv_sec = 10};
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) return -1;
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    if (connect(fd, (struct sockaddr *)&a, sizeof a)) {
        close(fd);
        return -1;
    }
    return fd;
}

static bool send_all(int fd, const void *p, size_t n)
{
    const char *c = p;
    while (n) {
        ssize_t w = send(fd, c, n, MSG_NOSIGNAL);
        if (w <= 0) return false;
        c += w;
        n -= (size_t)w;
    }
    return true;
}

/* One blocking request with Connection: close; the response head goes to out. Returns
 * the status or -1. */
static int blocking_http(int port, const char *head, const void *body, size_t blen, char *out,
                         size_t outlen)
{
    int fd = connect_loopback(port);
    if (fd < 0) return -1;
    size_t got = 0;
    int status = -1;
    if (!send_all(fd, head, strlen(head)) || (blen && !send_all(fd, body, blen))) goto out;
    while (got + 1 < outlen) {
        ssize_t r = recv(fd, out + got, outlen - 1 - got, 0);
        if (r <= 0) break;
        got += (size_t)r;
        out[got] = '\0';
        if (strstr(out, "\r\n\r\n")) break;
    }
    out[got] = '\0';
    if (sscanf(out, "HTTP/1.%*d %d", &status) != 1) status = -1;
out:
    close(fd);
    return status;
}

/* A header's value in a raw head (case-insensitive name), copied into out. */
static bool head_value(const char *head, const char *name, char *out, size_t n)
{
    size_t nl = strlen(name);
    for (const char *l = strstr(head, "\r\n"); l; l = strstr(l, "\r\n")) {
        l += 2;
        if (strncasecmp(l, name, nl) == 0 && l[nl] == ':') {
            const char *v = l + nl + 1;
            while (*v == ' ') v++;
            size_t vl = strcspn(v, "\r");
            snprintf(out, n, "%.*s", (int)vl, v);
            return true;
        }
    }
    if (n) out[0] = '\0';
    return false;
}

/* Each registry we start sends this header with G.dir as its value, so a port taken
 * meanwhile by someone else's server is not mistaken for ours. */
#define INSTANCE_HDR "X-Archmirror-Test"

static bool wait_registry(int port, pid_t pid)
{
    char out[4096], id[600];
    char req[128];
    snprintf(req, sizeof req,
             "GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nConnection: close\r\n\r\n", port);
    for (int i = 0; i < 500; i++) {
        if (blocking_http(port, req, NULL, 0, out, sizeof out) == 200)
            return head_value(out, INSTANCE_HDR, id, sizeof id) && strcmp(id, G.dir) == 0;
        if (waitpid(pid, NULL, WNOHANG) == pid) return false;
        struct timespec ts = {0, 20 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    return false;
}

static bool wait_listening(int port, pid_t pid)
{
    for (int i = 0; i < 500; i++) {
        int fd = connect_loopback(port);
        if (fd >= 0) {
            close(fd);
            return true;
        }
        if (waitpid(pid, NULL, WNOHANG) == pid) return false;
        struct timespec ts = {0, 20 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    return false;
}

/* Monolithic push through the registry API: POST an upload, PUT it with ?digest=. */
static bool push_blob(int port, const char *repo, const void *data, size_t len, struct am_digest *d)
{
    char head[4096], out[8192], loc[2048];
    am_digest_of(AM_DIGEST_SHA256, data, len, d);
    snprintf(head, sizeof head,
             "POST /v2/%s/blobs/uploads/ HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
             "Content-Length: 0\r\nConnection: close\r\n\r\n",
             repo, port);
    if (blocking_http(port, head, NULL, 0, out, sizeof out) != 202) return false;
    if (!head_value(out, "Location", loc, sizeof loc)) return false;
    const char *path = loc;
    if (strncmp(loc, "http://", 7) == 0) path = strchr(loc + 7, '/');
    if (!path) return false;
    snprintf(head, sizeof head,
             "PUT %s%cdigest=%s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
             "Content-Type: application/octet-stream\r\nContent-Length: %zu\r\n"
             "Connection: close\r\n\r\n",
             path, strchr(path, '?') ? '&' : '?', d->str, port, len);
    return blocking_http(port, head, data, len, out, sizeof out) == 201;
}

static bool write_file(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    if (!f) return false;
    bool ok = fputs(text, f) >= 0;
    return fclose(f) == 0 && ok;
}

static bool make_certs(void)
{
    char ca_key[600], ca_crt[600], key[600], csr[600], crt[600], ext[600], chain[600], log[600];
    snprintf(ca_key, sizeof ca_key, "%s/ca.key", G.dir);
    snprintf(ca_crt, sizeof ca_crt, "%s/ca.crt", G.dir);
    snprintf(key, sizeof key, "%s/srv.key", G.dir);
    snprintf(csr, sizeof csr, "%s/srv.csr", G.dir);
    snprintf(crt, sizeof crt, "%s/srv.crt", G.dir);
    snprintf(ext, sizeof ext, "%s/srv.ext", G.dir);
    snprintf(chain, sizeof chain, "%s/srv-chain.crt", G.dir);
    snprintf(log, sizeof log, "%s/openssl.log", G.dir);
    if (!write_file(ext, "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
                         "keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n"))
        return false;
    char *ca[] = {OPENSSL_BIN,
                  "req",
                  "-x509",
                  "-newkey",
                  "ec",
                  "-pkeyopt",
                  "ec_paramgen_curve:prime256v1",
                  "-nodes",
                  "-keyout",
                  ca_key,
                  "-out",
                  ca_crt,
                  "-days",
                  "2",
                  "-subj",
                  "/CN=archmirror test CA",
                  NULL};
    char *req[] = {
        OPENSSL_BIN, "req",     "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes",    "-keyout", key,    "-out",    csr,  "-subj",    "/CN=127.0.0.1",
        NULL};
    char *sign[] = {
        OPENSSL_BIN,       "x509", "-req", "-in",   csr, "-CA",      ca_crt, "-CAkey", ca_key,
        "-CAcreateserial", "-out", crt,    "-days", "2", "-extfile", ext,    NULL};
    if (run(ca, log) != 0 || run(req, log) != 0 || run(sign, log) != 0) return false;
    /* Serve leaf + CA, so an untrusted chain reads "self-signed certificate in chain". */
    FILE *out = fopen(chain, "w");
    if (!out) return false;
    const char *parts[] = {crt, ca_crt};
    for (int i = 0; i < 2; i++) {
        FILE *in = fopen(parts[i], "r");
        char buf[4096];
        size_t n;
        if (!in) {
            fclose(out);
            return false;
        }
        while ((n = fread(buf, 1, sizeof buf, in)) > 0) fwrite(buf, 1, n, out);
        fclose(in);
    }
    fclose(out);
    snprintf(G.ca_file, sizeof G.ca_file, "%s", ca_crt);
    return true;
}

static pid_t start_registry(const char *tag, int port, bool tls)
{
    char cfg[600], log[600], text[4096], tlspart[1400] = "";
    snprintf(cfg, sizeof cfg, "%s/registry-%s.yml", G.dir, tag);
    snprintf(log, sizeof log, "%s/registry-%s.log", G.dir, tag);
    if (tls)
        snprintf(tlspart, sizeof tlspart,
                 "  tls:\n    certificate: %s/srv-chain.crt\n    key: %s/srv.key\n", G.dir, G.dir);
    snprintf(text, sizeof text,
             "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n"
             "storage:\n  filesystem:\n    rootdirectory: %s/storage\n"
             "http:\n  addr: 127.0.0.1:%d\n  secret: archmirror-test\n"
             "  headers:\n    " INSTANCE_HDR ": [\"%s\"]\n%s",
             G.dir, port, G.dir, tlspart);
    if (!write_file(cfg, text)) return -1;
    char *argv[] = {REGISTRY_BIN, "serve", cfg, NULL};
    return spawn(argv, log);
}

static void stop(pid_t *pid)
{
    if (*pid <= 0) return;
    kill(*pid, SIGTERM);
    waitpid(*pid, NULL, 0);
    *pid = 0;
}

static int rm_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    return remove(path);
}

static int mkdirs(const char *path)
{
    char tmp[512];
    snprintf(tmp, sizeof tmp, "%s", path);
    for (char *p = tmp + 1; *p; p++) {
        if (*p != '/') continue;
        *p = '\0';
        mkdir(tmp, 0755);
        *p = '/';
    }
    return mkdir(tmp, 0755) == 0 || errno == EEXIST ? 0 : -1;
}

static bool tls_registry_is_ours(void);

static int group_setup(void **state)
{
    if (getenv("AM_TEST_DEBUG")) am_log_set_level(AM_LOG_DEBUG);
    const char *base = getenv("AM_TEST_TMP");
    if (!base || !*base) base = "/tmp";
    if (mkdirs(base)) return -1;
    snprintf(G.dir, sizeof G.dir, "%s/upstream-XXXXXX", base);
    if (!mkdtemp(G.dir)) return -1;

    /* Deterministic, incompressible-looking content. */
    G.blob = malloc(BLOB_LEN);
    if (!G.blob) return -1;
    uint64_t x = 0x9e3779b97f4a7c15ull;
    for (size_t i = 0; i < BLOB_LEN; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        G.blob[i] = (unsigned char)x;
    }

    if (access(REGISTRY_BIN, X_OK) != 0) return 0;
    /* A free port can be taken by another process before the registry binds it: then
     * ours exits and the check meets a stranger; another port is tried. */
    bool up = false;
    for (int attempt = 0; attempt < 5 && !up; attempt++) {
        stop(&G.plain_pid);
        G.plain_port = free_port();
        G.plain_pid = start_registry("plain", G.plain_port, false);
        up = G.plain_pid > 0 && wait_registry(G.plain_port, G.plain_pid);
    }
    if (!up) {
        fprintf(stderr, "docker-registry did not start; see %s\n", G.dir);
        return -1;
    }
    struct am_digest d;
    if (!push_blob(G.plain_port, "t", G.blob, BLOB_LEN, &d)) {
        fprintf(stderr, "pushing the test blob failed\n");
        return -1;
    }
    snprintf(G.blob_digest, sizeof G.blob_digest, "%s", d.str);
    snprintf(G.plain_url, sizeof G.plain_url, "http://127.0.0.1:%d", G.plain_port);
    G.have_registry = true;

    if (access(OPENSSL_BIN, X_OK) != 0 || !make_certs()) return 0;
    for (int attempt = 0; attempt < 5 && !G.have_tls; attempt++) {
        stop(&G.tls_pid);
        G.tls_port = free_port();
        G.tls_pid = start_registry("tls", G.tls_port, true);
        snprintf(G.tls_url, sizeof G.tls_url, "https://127.0.0.1:%d", G.tls_port);
        G.have_tls =
            G.tls_pid > 0 && wait_listening(G.tls_port, G.tls_pid) && tls_registry_is_ours();
    }
    if (!G.have_tls) {
        fprintf(stderr, "docker-registry with TLS did not start; see %s\n", G.dir);
        return -1;
    }
    return 0;
}

static int group_teardown(void **state)
{
    stop(&G.plain_pid);
    stop(&G.tls_pid);
    free(G.blob);
    if (G.dir[0] && !getenv("AM_TEST_KEEP")) nftw(G.dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
    return 0;
}

/* --- the client side ---------------------------------------------------------------------- */

struct res {
    struct am_upstream_req *req;
    int heads, bodies, dones;
    int status;
    int64_t content_length;
    int done_status;
    char msg[256];
    char api[64];
    char body[4096];
    size_t body_len;
    struct am_hasher hasher;
    bool hashing;
    bool cb_after_done;
    bool cancel_on_first_body;
    bool pause_on_body;
    bool pause_on_head;
    bool free_on_body; /* am_upstream_free(up) from inside on_body */
    struct am_upstream *up;
    bool auto_resume; /* resume from r->resumer (initialised by the test) */
    bool paused;
    int pauses;
    bool body_while_paused;
    uv_idle_t resumer;
    const char *grab; /* a response header to copy into grabbed */
    char grabbed[256];
};

static void on_resume_idle(uv_idle_t *h);

static void on_head(void *arg, const struct am_upstream_response *resp)
{
    struct res *r = arg;
    const struct am_http_header *h =
        am_http_header_find(resp->headers, resp->n_headers, "Docker-Distribution-API-Version");
    if (r->dones || r->heads) r->cb_after_done = true;
    r->heads++;
    r->status = resp->status;
    r->content_length = resp->content_length;
    if (h) snprintf(r->api, sizeof r->api, "%.*s", (int)h->value_len, h->value);
    if (r->grab && (h = am_http_header_find(resp->headers, resp->n_headers, r->grab)))
        snprintf(r->grabbed, sizeof r->grabbed, "[%.*s]", (int)h->value_len, h->value);
    if (r->pause_on_head) {
        am_upstream_req_pause(r->req);
        r->paused = true;
        r->pauses++;
        if (r->auto_resume) uv_idle_start(&r->resumer, on_resume_idle);
    }
}

static void on_body(void *arg, const char *data, size_t len)
{
    struct res *r = arg;
    if (r->dones || !r->heads) r->cb_after_done = true;
    if (r->paused) r->body_while_paused = true;
    r->bodies++;
    size_t have = r->body_len < sizeof r->body - 1 ? r->body_len : sizeof r->body - 1;
    size_t n = len < sizeof r->body - 1 - have ? len : sizeof r->body - 1 - have;
    memcpy(r->body + have, data, n);
    r->body[have + n] = '\0';
    r->body_len += len;
    if (r->hashing) am_hasher_update(&r->hasher, data, len);
    if (r->cancel_on_first_body) {
        am_upstream_req_cancel(r->req);
        return;
    }
    if (r->free_on_body) {
        r->free_on_body = false;
        am_upstream_free(r->up);
        return;
    }
    if (r->pause_on_body) {
        am_upstream_req_pause(r->req);
        r->paused = true;
        r->pauses++;
        if (r->auto_resume) uv_idle_start(&r->resumer, on_resume_idle);
    }
}

static void on_done(void *arg, int status)
{
    struct res *r = arg;
    if (r->dones) r->cb_after_done = true;
    r->dones++;
    r->done_status = status;
    snprintf(r->msg, sizeof r->msg, "%s", am_upstream_req_message(r->req));
}

static const struct am_upstream_cbs cbs = {on_head, on_body, on_done};

static void on_resume_idle(uv_idle_t *h)
{
    struct res *r = h->data;
    uv_idle_stop(h);
    r->paused = false;
    am_upstream_req_resume(r->req);
}

static void res_init(struct res *r)
{
    memset(r, 0, sizeof *r);
    r->status = -1;
    r->content_length = -2;
}

static void res_hash(struct res *r)
{
    assert_int_equal(am_hasher_init(&r->hasher, AM_DIGEST_SHA256), 0);
    r->hashing = true;
}

static void res_check_digest(struct res *r, const char *digest)
{
    struct am_digest d;
    am_hasher_final(&r->hasher, &d);
    am_hasher_cleanup(&r->hasher);
    r->hashing = false;
    assert_string_equal(d.str, digest);
}

static void start_full(struct am_upstream *up, struct res *r, const char *method, const char *path,
                       const char *accept, const char *range, const char *scope)
{
    struct am_upstream_request_opts o = {
        .method = method, .path = path, .accept = accept, .range = range, .scope = scope};
    assert_int_equal(am_upstream_request(up, &o, &cbs, r, &r->req), 0);
}

static void start(struct am_upstream *up, struct res *r, const char *method, const char *path)
{
    start_full(up, r, method, path, NULL, NULL, NULL);
}

static void run_until(uv_loop_t *loop, const int *counter, int target)
{
    while (*counter < target)
        if (uv_run(loop, UV_RUN_ONCE) == 0 && *counter < target) fail_msg("the loop ran dry");
}

static void wait_done(uv_loop_t *loop, struct res *r)
{
    run_until(loop, &r->dones, 1);
}

static struct am_upstream_opts default_opts(void)
{
    struct am_upstream_opts o = {.connect_timeout_ms = 10000,
                                 .header_timeout_ms = 10000,
                                 .idle_timeout_ms = 10000,
                                 .pool_size = 4,
                                 .max_redirects = 5};
    return o;
}

static struct am_upstream *new_up(uv_loop_t *loop, const char *url, const char *ca, bool insecure,
                                  const char *user, const char *pass,
                                  const struct am_upstream_opts *opts)
{
    struct am_upstream_conf conf = {.name = "test",
                                    .url = (char *)url,
                                    .ca_file = (char *)ca,
                                    .insecure = insecure,
                                    .username = (char *)user,
                                    .password = (char *)pass};
    struct am_upstream_opts o = opts ? *opts : default_opts();
    struct am_upstream *up = NULL;
    char msg[256];
    int rc = am_upstream_new(loop, &conf, &o, &up, msg, sizeof msg);
    if (rc) fail_msg("am_upstream_new: %s", msg);
    return up;
}

static void print_handle(uv_handle_t *h, void *arg)
{
    fprintf(stderr, "live handle: %s%s\n", uv_handle_type_name(uv_handle_get_type(h)),
            uv_is_closing(h) ? " (closing)" : "");
}

/* Runs the loop dry and asserts it closes with no handle left. */
static void drain(uv_loop_t *loop)
{
    uv_run(loop, UV_RUN_DEFAULT);
    int rc = uv_loop_close(loop);
    if (rc) uv_walk(loop, print_handle, NULL);
    assert_int_equal(rc, 0);
}

static void finish(uv_loop_t *loop, struct am_upstream *up)
{
    am_upstream_free(up);
    drain(loop);
}

static struct am_upstream_stats stats_of(const struct am_upstream *up)
{
    struct am_upstream_stats s;
    am_upstream_get_stats(up, &s);
    return s;
}

/* GET /v2/ through the client under test: the TLS registry answers, with our header. */
static bool tls_registry_is_ours(void)
{
    uv_loop_t loop;
    struct res r;
    char want[620];
    uv_loop_init(&loop);
    struct am_upstream *up = new_up(&loop, G.tls_url, G.ca_file, false, NULL, NULL, NULL);
    res_init(&r);
    r.grab = INSTANCE_HDR;
    start(up, &r, "GET", "/v2/");
    wait_done(&loop, &r);
    am_upstream_free(up);
    uv_run(&loop, UV_RUN_DEFAULT);
    uv_loop_close(&loop);
    snprintf(want, sizeof want, "[%s]", G.dir);
    return r.done_status == 0 && r.status == 200 && strcmp(r.grabbed, want) == 0;
}

/* --- fake servers --------------------------------------------------------------------------- */

struct fake;

struct fconn {
    uv_tcp_t tcp;
    uv_shutdown_t shut;
    struct fake *f;
    struct fconn *next;
    size_t len;
    int served;
    bool closing;
    char buf[131072];
};

struct freq {
    char method[16];
    char path[4096];
    const char *head;
};

typedef void (*fake_handler)(struct fake *f, struct fconn *fc, const struct freq *rq);

struct fake {
    uv_loop_t *loop;
    uv_tcp_t srv;
    int port;
    fake_handler handler;
    struct fconn *conns;
    int accepted, requests, closed;
    int peer_port;
    const char *token_value;
    bool token_fail;
    bool token_hold;    /* keep the token request unanswered ... */
    struct fconn *held; /* ... on this connection, until fake_release_token */
    int tokens, unauth, authed;
    char token_query[4096], token_auth[512], peer_auth[512];
    char last_head[8192];
};

static void fake_on_closed(uv_handle_t *h)
{
    struct fconn *fc = h->data;
    struct fake *f = fc->f;
    for (struct fconn **pp = &f->conns; *pp; pp = &(*pp)->next) {
        if (*pp == fc) {
            *pp = fc->next;
            break;
        }
    }
    f->closed++;
    free(fc);
}

/* Closes at once; unsent writes are dropped. */
static void fake_drop(struct fconn *fc)
{
    fc->closing = true;
    if (!uv_is_closing((uv_handle_t *)&fc->tcp)) uv_close((uv_handle_t *)&fc->tcp, fake_on_closed);
}

static void fake_on_shutdown(uv_shutdown_t *req, int status)
{
    struct fconn *fc = req->data;
    if (!uv_is_closing((uv_handle_t *)&fc->tcp)) uv_close((uv_handle_t *)&fc->tcp, fake_on_closed);
}

/* Closes after the queued writes went out. */
static void fake_end(struct fconn *fc)
{
    if (fc->closing) return;
    fc->closing = true;
    fc->shut.data = fc;
    if (uv_shutdown(&fc->shut, (uv_stream_t *)&fc->tcp, fake_on_shutdown)) fake_drop(fc);
}

static void fake_on_write(uv_write_t *w, int status)
{
    free(w);
}

static void fake_send(struct fconn *fc, const char *data, size_t len)
{
    if (fc->closing) return;
    uv_write_t *w = malloc(sizeof *w + len);
    assert_non_null(w);
    char *copy = (char *)(w + 1);
    memcpy(copy, data, len);
    uv_buf_t b = uv_buf_init(copy, (unsigned)len);
    assert_int_equal(uv_write(w, (uv_stream_t *)&fc->tcp, &b, 1, fake_on_write), 0);
}

static void fake_sendf(struct fconn *fc, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static void fake_sendf(struct fconn *fc, const char *fmt, ...)
{
    char *s = NULL;
    va_list ap;
    va_start(ap, fmt);
    int n = vasprintf(&s, fmt, ap);
    va_end(ap);
    assert_true(n >= 0);
    fake_send(fc, s, (size_t)n);
    free(s);
}

static void fake_alloc(uv_handle_t *h, size_t hint, uv_buf_t *buf)
{
    struct fconn *fc = h->data;
    *buf = uv_buf_init(fc->buf + fc->len, (unsigned)(sizeof fc->buf - fc->len - 1));
}

static void fake_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    struct fconn *fc = s->data;
    struct fake *f = fc->f;
    if (nread < 0) {
        fake_drop(fc);
        return;
    }
    fc->len += (size_t)nread;
    fc->buf[fc->len] = '\0';
    while (!fc->closing) {
        char *end = strstr(fc->buf, "\r\n\r\n");
        if (!end) break;
        size_t hl = (size_t)(end + 4 - fc->buf);
        char head[8192];
        snprintf(head, sizeof head, "%.*s", (int)hl, fc->buf);
        memmove(fc->buf, fc->buf + hl, fc->len - hl + 1);
        fc->len -= hl;
        struct freq rq = {.head = head};
        sscanf(head, "%15s %4095s", rq.method, rq.path);
        snprintf(f->last_head, sizeof f->last_head, "%s", head);
        f->requests++;
        fc->served++;
        f->handler(f, fc, &rq);
    }
}

static void fake_on_conn(uv_stream_t *srv, int status)
{
    struct fake *f = srv->data;
    struct fconn *fc = calloc(1, sizeof *fc);
    assert_non_null(fc);
    fc->f = f;
    uv_tcp_init(f->loop, &fc->tcp);
    fc->tcp.data = fc;
    fc->next = f->conns;
    f->conns = fc;
    if (uv_accept(srv, (uv_stream_t *)&fc->tcp)) {
        fake_drop(fc);
        return;
    }
    f->accepted++;
    uv_read_start((uv_stream_t *)&fc->tcp, fake_alloc, fake_read);
}

static void fake_start_on(uv_loop_t *loop, struct fake *f, fake_handler h, const char *ip)
{
    struct sockaddr_in a;
    struct sockaddr_storage got;
    int len = sizeof got;
    memset(f, 0, sizeof *f);
    f->loop = loop;
    f->handler = h;
    f->token_value = "tok-1";
    assert_int_equal(uv_tcp_init(loop, &f->srv), 0);
    f->srv.data = f;
    assert_int_equal(uv_ip4_addr(ip, 0, &a), 0);
    assert_int_equal(uv_tcp_bind(&f->srv, (struct sockaddr *)&a, 0), 0);
    assert_int_equal(uv_listen((uv_stream_t *)&f->srv, 64, fake_on_conn), 0);
    assert_int_equal(uv_tcp_getsockname(&f->srv, (struct sockaddr *)&got, &len), 0);
    f->port = ntohs(((struct sockaddr_in *)&got)->sin_port);
}

static void fake_start(uv_loop_t *loop, struct fake *f, fake_handler h)
{
    fake_start_on(loop, f, h, "127.0.0.1");
}

static void fake_stop(struct fake *f)
{
    uv_close((uv_handle_t *)&f->srv, NULL);
    for (struct fconn *fc = f->conns; fc; fc = fc->next) fake_drop(fc);
}

static void fake_url(const struct fake *f, char *out, size_t n)
{
    snprintf(out, n, "http://127.0.0.1:%d", f->port);
}

/* --- fake behaviours --------------------------------------------------------------------- */

static void h_ok(struct fake *f, struct fconn *fc, const struct freq *rq)
{
    fake_sendf(fc, "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello");
}

static void h_stall(struct fake *f, struct fconn *fc, const struct freq *rq) {}

static void h_body_stall(struct fake *f, struct fconn *fc, const struct freq *rq)
{
    fake_sendf(fc, "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789");
}

static void h_close_mid_body(struct fake *f, struct fconn *fc, const struct freq *rq)
{
    fake_sendf(fc, "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789");
    fake_end(fc);
}

static void h_framing(struct fake *f, struct fconn *fc, const struct freq *rq)
{
    if (strcmp(rq->path, "/chunked") == 0) {
        fake_sendf(fc, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                       "5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n");
    } else if (strcmp(rq->path, "/interim") == 0) {
        fake_sendf(fc, "HTTP/1.1 100 Continue\r\n\r\n"
                       "HTTP/1.1 200 Fine\r\nContent-Length: 2\r\nX-Trail:  spaced  \r\n\r\nok");
    } else {
        fake_sendf(fc, "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end");
        fake_end(fc);
    }
}

static void h_many_headers(struct fake *f, struct fconn *fc, const struct freq *rq)
{
    fake_sendf(fc, "HTTP/1.1 200 OK\r\n");
    for (int i = 0; i < AM_UPSTREAM_MAX_HEADERS + 1; i++) fake_sendf(fc, "X-H%d: v\r\n", i);
    fake_sendf(fc, "Content-Length: 0\r\n\r\n");
}

static void h_huge_header(struct fake *f, struct fconn *fc, const struct freq *rq)
{
    static char v[AM_UPSTREAM_MAX_HEAD_BYTES + 100];
    memset(v, 'a', sizeof v - 1);
    fake_sendf(fc, "HTTP/1.1 200 OK\r\nX-Big: %s\r\nContent-Length: 0\r\n\r\n", v);
}

/* The first request of each connection is answered; a second one on the same connection
 * finds it closed, the race a pooled connection can lose. */
static void h_drop_second(struct fake *f, struct fconn *fc, const struct freq *rq)
{
    if (fc->served > 1) {
        fake_drop(fc);
        return;
    }
    fake_sendf(fc, "HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\none");
}

static void h_close_after(struct fake *f, struct fconn *fc, const struct freq *rq)
{
    fake_sendf(fc, "HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\none");
    fake_end(fc);
}

/* 401 Basic until the credentials come, then 307 to the peer fake; /same: 302 to a
 * relative path on this origin, which again needs the credentials. */
static void h_basic_redirect(struct fake *f, struct fconn *fc, const struct freq *rq)
{
    char auth[256];
    head_value(rq->head, "Authorization", auth, sizeof auth);
    if (strcmp(auth, "Basic dXNlcjpwYXNz") != 0) { /* user:pass */
        f->unauth++;
        fake_sendf(fc, "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"fake\"\r\n"
                       "Content-Length: 2\r\n\r\nno");
        return;
    }
    f->authed++;
    if (strcmp(rq->path, "/v2/same") == 0) {
        fake_sendf(fc, "HTTP/1.1 302 Found\r\nLocation: ../v2/./final?x=1#frag\r\n"
                       "Content-Length: 0\r\n\r\n");
    } else if (strncmp(rq->path, "/v2/final", 9) == 0) {
        fake_sendf(fc, "HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nsame-site");
    } else {
        fake_sendf(fc,
                   "HTTP/1.1 307 Temporary Redirect\r\nLocation: http://127.0.0.1:%d/final\r\n"
                   "Content-Length: 3\r\n\r\nbye",
                   f->peer_port);
    }
}

static void h_peer(struct fake *f, struct fconn *fc, const struct freq *rq)
{
    head_value(rq->head, "Authorization", f->peer_auth, sizeof f->peer_auth);
    fake_sendf(fc, "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nredirected");
}

static void h_loop(struct fake *f, struct fconn *fc, const struct freq *rq)
{
    fake_sendf(fc, "HTTP/1.1 302 Found\r\nLocation: /v2/loop\r\nContent-Length: 0\r\n\r\n");
}

static void h_to_loopback(struct fake *f, struct fconn *fc, const struct freq *rq)
{
    fake_sendf(fc,
               "HTTP/1.1 307 Temporary Redirect\r\nLocation: http://127.0.0.1:%d/final\r\n"
               "Content-Length: 0\r\n\r\n",
               f->peer_port);
}

static void fake_send_token(struct fake *f, struct fconn *fc)
{
    char body[256];
    int n = snprintf(body, sizeof body, "{\"token\":\"%s\",\"expires_in\":300}", f->token_value);
    fake_sendf(fc,
               "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s",
               n, body);
}

/* A registry behind token auth, its token endpoint at /token on the same server. */
static void h_bearer(struct fake *f, struct fconn *fc, const struct freq *rq)
{
    char auth[512], want[128];
    head_value(rq->head, "Authorization", auth, sizeof auth);
    if (strncmp(rq->path, "/token", 6) == 0) {
        f->tokens++;
        snprintf(f->token_query, sizeof f->token_query, "%s", rq->path);
        snprintf(f->token_auth, sizeof f->token_auth, "%s", auth);
        if (f->token_fail) {
            fake_sendf(fc, "HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n");
            return;
        }
        if (f->token_hold) {
            f->held = fc;
            return;
        }
        fake_send_token(f, fc);
        return;
    }
    bool head = strcmp(rq->method, "HEAD") == 0; /* same head, no body (RFC 9110 §9.3.2) */
    if (strcmp(auth, "Bearer tok-1") == 0) {
        f->authed++;
        fake_sendf(fc, "HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\n%s", head ? "" : "secret");
        return;
    }
    f->unauth++;
    snprintf(want, sizeof want, "http://127.0.0.1:%d/token", f->port);
    fake_sendf(fc,
               "HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\n"
               "WWW-Authenticate: Bearer realm=\"%s\",service=\"fake-registry\","
               "scope=\"repository:t:pull\"\r\nContent-Length: 2\r\n\r\n%s",
               want, head ? "" : "{}");
}

/* --- tests against the real registry ------------------------------------------------------- */

#define NEED_REGISTRY()                                                                            \
    do {                                                                                           \
        if (!G.have_registry) skip();                                                              \
    } while (0)
#define NEED_TLS()                                                                                 \
    do {                                                                                           \
        if (!G.have_tls) skip();                                                                   \
    } while (0)

static void gets_v2_with_the_api_version_header(void **state)
{
    NEED_REGISTRY();
    uv_loop_t loop;
    struct res r;
    uv_loop_init(&loop);
    struct am_upstream *up = new_up(&loop, G.plain_url, NULL, false, NULL, NULL, NULL);
    assert_string_equal(am_upstream_name(up), "test");
    res_init(&r);
    start(up, &r, "GET", "/v2/");
    wait_done(&loop, &r);
    assert_int_equal(r.heads, 1);
    assert_int_equal(r.status, 200);
    assert_string_equal(r.api, "registry/2.0");
    assert_int_equal(r.done_status, 0);
    assert_string_equal(r.msg, "");
    assert_false(r.cb_after_done);
    finish(&loop, up);
}

static void gets_a_blob_whose_bytes_match_its_digest(void **state)
{
    NEED_REGISTRY();
    uv_loop_t loop;
    struct res r;
    char path[256];
    uv_loop_init(&loop);
    struct am_upstream *up = new_up(&loop, G.plain_url, NULL, false, NULL, NULL, NULL);
    res_init(&r);
    res_hash(&r);
    snprintf(path, sizeof path, "/v2/t/blobs/%s", G.blob_digest);
    start(up, &r, "GET", path);
    wait_done(&loop, &r);
    assert_int_equal(r.status, 200);
    assert_int_equal(r.content_length, BLOB_LEN);
    assert_int_equal(r.body_len, BLOB_LEN);
    assert_int_equal(r.done_status, 0);
    res_check_digest(&r, G.blob_digest);
    assert_false(r.cb_after_done);
    finish(&loop, up);
}

static void gets_a_range_of_a_blob(void **state)
{
    NEED_REGISTRY();
    uv_loop_t loop;
    struct res r;
    char path[256];
    uv_loop_init(&loop);
    struct am_upstream *up = new_up(&loop, G.plain_url, NULL, false, NULL, NULL, NULL);
    res_init(&r);
    snprintf(path, sizeof path, "/v2/t/blobs/%s", G.blob_digest);
    start_full(up, &r, "GET", path, NULL, "bytes=10-19", NULL);
    wait_done(&loop, &r);
    assert_int_equal(r.status, 206);
    assert_int_equal(r.content_length, 10);
    assert_int_equal(r.body_len, 10);
    assert_memory_equal(r.body, G.blob + 10, 10);
    finish(&loop, up);
}

static void head_delivers_the_head_without_a_body(void **state)
{
    NEED_REGISTRY();
    uv_loop_t loop;
    struct res r;
    char path[256];
    uv_loop_init(&loop);
    struct am_upstream *up = new_up(&loop, G.plain_url, NULL, false, NULL, NULL, NULL);
    res_init(&r);
    snprintf(path, sizeof path, "/v2/t/blobs/%s", G.blob_digest);
    start(up, &r, "HEAD", path);
    wait_done(&loop, &r);
    assert_int_equal(r.status, 200);
    assert_int_equal(r.content_length, BLOB_LEN);
    assert_int_equal(r.bodies, 0);
    assert_int_equal(r.done_status, 0);
    /* The connection stays usable after a bodiless HEAD response. */
    res_init(&r);
    start(up, &r, "GET", "/v2/");
    wait_done(&loop, &r);
    assert_int_equal(r.status, 200);
    assert_int_equal(stats_of(up).connections, 1);
    finish(&loop, up);
}

static void delivers_404_for_an_unknown_blob_through_on_head(void **state)
{
    NEED_REGISTRY();
    uv_loop_t loop;
    struct res r;
    uv_loop_init(&loop);
    struct am_upstream *up = new_up(&loop, G.plain_url, NULL, false, NULL, NULL, NULL);
    res_init(&r);
    start(up, &r, "GET",
          "/v2/t/blobs/sha256:0000000000000000000000000000000000000000000000000000000000000000");
    wait_done(&loop, &r);
    assert_int_equal(r.heads, 1);
    assert_int_equal(r.status, 404);
    assert_int_equal(r.done_status, 0);
    assert_non_null(strstr(r.body, "BLOB_UNKNOWN"));
    finish(&loop, up);
}

static void reuses_one_connection_for_sequential_requests(void **state)
{
    NEED_REGISTRY();
    uv_loop_t loop;
    struct res r;
    uv_loop_init(&loop);
    struct am_upstream *up = new_up(&loop, G.plain_url, NULL, false, NULL, NULL, NULL);
    for (int i = 0; i < 5; i++) {
        res_init(&r);
        start(up, &r, "GET", "/v2/");
        wait_done(&loop, &r);
        assert_int_equal(r.status, 200);
        assert_int_equal(r.done_status, 0);
    }
    struct am_upstream_stats s = stats_of(up);
    assert_int_equal(s.connections, 1);
    assert_int_equal(s.requests, 5);
    assert_int_equal(s.token_fetches, 0);
    finish(&loop, up);
}

/* Pauses in every on_body and resumes from an idle callback: no byte may arrive while
 * paused, and every byte must arrive in order. */
static void stream_with_pauses(const char *url, const char *ca)
{
    uv_loop_t loop;
    struct res r;
    char path[256];
    uv_loop_init(&loop);
    struct am_upstream *up = new_up(&loop, url, ca, false, NULL, NULL, NULL);
    res_init(&r);
    res_hash(&r);
    r.pause_on_body = true;
    r.auto_resume = true;
    uv_idle_init(&loop, &r.resumer);
    r.resumer.data = &r;
    snprintf(path, sizeof path, "/v2/t/blobs/%s", G.blob_digest);
    start(up, &r, "GET", path);
    wait_done(&loop, &r);
    assert_int_equal(r.done_status, 0);
    assert_int_equal(r.body_len, BLOB_LEN);
    assert_true(r.pauses > 4);
    assert_false(r.body_while_paused);
    res_check_digest(&r, G.blob_digest);
    uv_close((uv_handle_t *)&r.resumer, NULL);
    finish(&loop, up);
}

static void pauses_and_resumes_a_blob_body(void **state)
{
    NEED_REGISTRY();
    stream_with_pauses(G.plain_url, NULL);
}

static void cancels_in_the_middle_of_a_body(void **state)
{
    NEED_REGISTRY();
    uv_loop_t loop;
    struct res r, r2;
    char path[256];
    uv_loop_init(&loop);
    struct am_upstream *up = new_up(&loop, G.plain_url, NULL, false, NULL, NULL, NULL);
    res_init(&r);
    r.cancel_on_first_body = true;
    snprintf(path, sizeof path, "/v2/t/blobs/%s", G.blob_digest);
    start(up, &r, "GET", path);
    run_until(&loop, &r.bodies, 1);
    /* Nothing more arrives for r, and its connection is not reused. */
    res_init(&r2);
    start(up, &r2, "GET", "/v2/");
    wait_done(&loop, &r2);
    assert_int_equal(r2.status, 200);
    assert_int_equal(r.bodies, 1);
    assert_int_equal(r.dones, 0);
    assert_int_equal(stats_of(up).connections, 2);
    finish(&loop, up);
}

static void free_cancels_requests_in_flight(void **state)
{
    NEED_REGISTRY();
    uv_loop_t loop;
    struct res r;
    char path[256];
    uv_loop_init(&loop);
    struct am_upstream *up = new_up(&loop, G.plain_url, NULL, false, NULL, NULL, NULL);
    res_init(&r);
    r.pause_on_body = true; /* never resumed: the request stays in flight */
    snprintf(path, sizeof path, "/v2/t/blobs/%s", G.blob_digest);
    start(up, &r, "GET", path);
    run_until(&loop, &r.bodies, 1);
    am_upstream_free(up);
    assert_int_equal(r.dones, 1);
    assert_int_equal(r.done_status, AM_ECANCELED);
    drain(&loop);
}

/* --- TLS -------------------------------------------------------------------------------------- */

static void tls_verifies_the_registry_with_the_configured_ca(void **state)
{
    NEED_TLS();
    uv_loop_t loop;
    struct res r;
    uv_loop_init(&loop);
    struct am_upstream *up = new_up(&loop, G.tls_url, G.ca_file, false, NULL, NULL, NULL);
    for (int i = 0; i < 3; i++) {
        res_init(&r);
        start(up, &r, "GET", "/v2/");
        wait_done(&loop, &r);
        assert_int_equal(r.done_status, 0);
        assert_int_equal(r.status, 200);
        assert_string_equal(r.api, "registry/2.0");
    }
    assert_int_equal(stats_of(up).connections, 1);
    finish(&loop, up);
}

static void tls_streams_a_blob_with_pauses(void **state)
{
    NEED_TLS();
    stream_with_pauses(G.tls_url, G.ca_file);
}

static void tls_refuses_a_certificate_the_system_store_does_not_trust(void **state)
{
    NEED_TLS();
    uv_loop_t loop;
    struct res r;
    uv_loop_init(&loop);
    struct am_upstream *up = new_up(&loop, G.tls_url, NULL, false, NULL, NULL, NULL);
    res_init(&r);
    start(up, &r, "GET", "/v2/");
    wait_done(&loop, &r);
    assert_int_equal(r.heads, 0);
    assert_int_equal(r.done_status, AM_EUPSTREAM_TLS);
    assert_non_null(strstr(r.msg, "certificate verify failed: self-signed certificate in "
                                  "certificate chain"));
    finish(&loop, up);
}

static void tls_refuses_a_certificate_for_another_host(void **state)
{
    NEED_TLS();
    uv_loop_t loop;
    struct res r;
    char url[64];
    uv_loop_init(&loop);
    /* The certificate names IP 127.0.0.1 only; "localhost" may resolve to ::1 first, where
     * nothing listens, and the next address is tried. */
    snprintf(url, sizeof url, "https://localhost:%d", G.tls_port);
    struct am_upstream *up = new_up(&loop, url, G.ca_file, false, NULL, NULL, NULL);
    res_init(&r);
    start(up, &r, "GET", "/v2/");
    wait_done(&loop, &r);
    assert_int_equal(r.done_status, AM_EUPSTREAM_TLS);
    assert_non_null(strstr(r.msg, "certificate verify failed"));
    assert_non_null(strstr(r.msg, "mismatch"));
    finish(&loop, up);
}

static void tls_insecure_skips_verification(void **state)
{
    NEED_TLS();
    uv_loop_t loop;
    struct res r;
    uv_loop_init(&loop);
    struct am_upstream *up = new_up(&loop, G.tls_url, NULL, true, NULL, NULL, NULL);
    res_init(&r);
    start(up, &r, "GET", "/v2/");
    wait_done(&loop, &r);
    assert_int_equal(r.done_status, 0);
    assert_int_equal(r.status, 200);
    finish(&loop, up);
}

static void tls_to_a_plain_server_fails_cleanly(void **state)
{
    NEED_REGISTRY();
    uv_loop_t loop;
    struct res r;
    char url[64];
    uv_loop_init(&loop);
    snprintf(url, sizeof url, "https://127.0.0.1:%d", G.plain_port);
    struct am_upstream *up = new_up(&loop, url, NULL, false, NULL, NULL, NULL);
    res_init(&r);
    start(up, &r, "GET", "/v2/");
    wait_done(&loop, &r);
    assert_int_equal(r.heads, 0);
    assert_int_equal(r.done_status, AM_EUPSTREAM_TLS);
    finish(&loop, up);
}

/* --- tests against fakes ------------------------------------------------------------------- */

static void reports_a_refused_connection_without_a_head(void **state)
{
    uv_loop_t loop;
    struct res r;
    char url[64];
    uv_loop_init(&loop);
    snprintf(url, sizeof url, "http://127.0.0.1:%d", free_port());
    struct am_upstream *up = new_up(&loop, url, NULL, false, NULL, NULL, NULL);
    res_init(&r);
    start(up, &r, "GET", "/v2/");
    wait_done(&loop, &r);
    assert_int_equal(r.heads, 0);
    assert_int_equal(r.done_status, AM_EUPSTREAM_CONNECT);
    assert_non_null(strstr(r.msg, "refused"));
    assert_int_equal(stats_of(up).connections, 0);
    finish(&loop, up);
}

static void sends_exactly_the_expected_request_head(void **state)
{
    uv_loop_t loop;
    struct fake f;
    struct res r;
    char url[64], want[512];
    uv_loop_init(&loop);
    fake_start(&loop, &f, h_ok);
    fake_url(&f, url, sizeof url);
    struct am_upstream *up = new_up(&loop, url, NULL, false, NULL, NULL, NULL);
    res_init(&r);
    start_full(up, &r, "GET", "/v2/t/blobs/x", "application/a, application/b", "bytes=0-9",
               "repository:t:pull");
    wait_done(&loop, &r);
    assert_int_equal(r.status, 200);
    assert_string_equal(r.body, "hello");
    snprintf(want, sizeof want,
             "GET /v2/t/blobs/x HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUser-Agent: archmirror/%s\r\n"
             "Accept: application/a, application/b\r\nRange: bytes=0-9\r\n"
             "Connection: keep-alive\r\n\r\n",
             f.port, AM_VERSION);
    assert_string_equal(f.last_head, want);
    fake_stop(&f);
    finish(&loop, up);
}

static void times_out_waiting_for_the_head(void **state)
{
    uv_loop_t loop;
    struct fake f;
    struct res r;
    char url[64];
    struct am_upstream_opts o = default_opts();
    o.header_timeout_ms = 50;
    uv_loop_init(&loop);
    fake_start(&loop, &f, h_stall);
    fake_url(&f, url, sizeof url);
    struct am_upstream *up = new_up(&loop, url, NULL, false, NULL, NULL, &o);
    res_init(&r);
    start(up, &r, "GET", "/v2/");
    wait_done(&loop, &r);
    assert_int_equal(r.heads, 0);
    assert_int_equal(r.done_status, AM_EUPSTREAM_TIMEOUT);
    assert_int_equal(f.requests, 1);
    fake_stop(&f);
    finish(&loop, up);
}

static void times_out_when_the_body_stalls(void **state)
{
    uv_loop_t loop;
    struct fake f;
    struct res r;
    char url[64];
    struct am_upstream_opts o = default_opts();
    o.idle_timeout_ms = 50;
    uv_loop_init(&loop);
    fake_start(&loop, &f, h_body_stall);
    fake_url(&f, url, sizeof url);
    struct am_upstream *up = new_up(&loop, url, NULL, false, NULL, NULL, &o);
    res_init(&r);
    start(up, &r, "GET", "/v2/");
    wait_done(&loop, &r);
    assert_int_equal(r.heads, 1);
    assert_int_equal(r.content_length, 100);
    assert_int_equal(r.body_len, 10);
    assert_int_equal(r.done_status, AM_EUPSTREAM_TIMEOUT);
    fake_stop(&f);
    finish(&loop, up);
}

static void reports_a_connection_closed_mid_body(void **state)
{
    uv_loop_t loop;
    struct fake f;
    struct res r;
    char url[64];
    uv_loop_init(&loop);
    fake_start(&loop, &f, h_close_mid_body);
    fake_url(&f, url, sizeof url);
    struct am_upstream *up = new_up(&loop, url, NULL, false, NULL, NULL, NULL);
    res_init(&r);
    start(up, &r, "GET", "/v2/");
    wait_done(&loop, &r);
    assert_int_equal(r.heads, 1);
    assert_int_equal(r.body_len, 10);
    assert_int_equal(r.done_status, AM_EUPSTREAM);
    fake_stop(&f);
    finish(&loop, up);
}

static void reads_chunked_close_delimited_and_interim_responses(void **state)
{
    uv_loop_t loop;
    struct fake f;
    struct res r;
    char url[64];
    uv_loop_init(&loop);
    fake_start(&loop, &f, h_framing);
    fake_url(&f, url, sizeof url);
    struct am_upstream *up = new_up(&loop, url, NULL, false, NULL, NULL, NULL);

    res_init(&r);
    start(up, &r, "GET", "/chunked");
    wait_done(&loop, &r);
    assert_int_equal(r.done_status, 0);
    assert_int_equal(r.content_length, -1);
    assert_string_equal(r.body, "hello world");

    res_init(&r);
    start(up, &r, "GET", "/interim");
    wait_done(&loop, &r);
    assert_int_equal(r.heads, 1);
    assert_int_equal(r.status, 200);
    assert_string_equal(r.body, "ok");
    assert_int_equal(stats_of(up).connections, 1); /* both kept the connection */

    res_init(&r);
    start(up, &r, "GET", "/eof");
    wait_done(&loop, &r);
    assert_int_equal(r.done_status, 0);
    assert_int_equal(r.content_length, -1);
    assert_string_equal(r.body, "until the end");
    fake_stop(&f);
    finish(&loop, up);
}

static void refuses_a_head_with_too_many_headers(void **state)
{
    uv_loop_t loop;
    struct fake f;
    struct res r;
    char url[64];
    uv_loop_init(&loop);
    fake_start(&loop, &f, h_many_headers);
    fake_url(&f, url, sizeof url);
    struct am_upstream *up = new_up(&loop, url, NULL, false, NULL, NULL, NULL);
    res_init(&r);
    start(up, &r, "GET", "/v2/");
    wait_done(&loop, &r);
    assert_int_equal(r.heads, 0);
    assert_int_equal(r.done_status, AM_EUPSTREAM_PROTOCOL);
    assert_non_null(strstr(r.msg, "header fields"));
    fake_stop(&f);
    finish(&loop, up);
}

static void refuses_an_oversized_head(void **state)
{
    uv_loop_t loop;
    struct fake f;
    struct res r;
    char url[64];
    uv_loop_init(&loop);
    fake_start(&loop, &f, h_huge_header);
    fake_url(&f, url, sizeof url);
    struct am_upstream *up = new_up(&loop, url, NULL, false, NULL, NULL, NULL);
    res_init(&r);
    start(up, &r, "GET", "/v2/");
    wait_done(&loop, &r);
    assert_int_equal(r.heads, 0);
    assert_int_equal(r.done_status, AM_EUPSTREAM_PROTOCOL);
    fake_stop(&f);
    finish(&loop, up);
}

static void retries_once_when_a_pooled_connection_was_closed(void **state)
{
    uv_loop_t loop;
    struct fake f;
    struct res r;
    char url[64];
    uv_loop_init(&loop);
    fake_start(&loop, &f, h_drop_second);
    fake_url(&f, url, sizeof url);
    struct am_upstream *up = new_up(&loop, url, NULL, false, NULL, NULL, NULL);
    for (int i = 0; i < 2; i++) {
        res_init(&r);
        start(up, &r, "GET", "/v2/");
        wait_done(&loop, &r);
        assert_int_equal(r.done_status, 0);
        assert_string_equal(r.body, "one");
    }
    struct am_upstream_stats s = stats_of(up);
    assert_int_equal(s.requests, 3); /* the second went twice */
    assert_int_equal(s.connections, 2);
    assert_int_equal(f.requests, 3);
    fake_stop(&f);
    finish(&loop, up);
}

static void discards_a_pooled_connection_the_server_closed(void **state)
{
    uv_loop_t loop;
    struct fake f;
    struct res r;
    char url[64];
    uv_loop_init(&loop);
    fake_start(&loop, &f, h_close_after);
    fake_url(&f, url, sizeof url);
    struct am_upstream *up = new_up(&loop, url, NULL, false, NULL, NULL, NULL);
    res_init(&r);
    start(up, &r, "GET", "/v2/");
    wait_done(&loop, &r);
    assert_int_equal(r.done_status, 0);
    run_until(&loop, &f.closed, 1);
    /* The FIN is already queued on our socket: one more poll sees it. */
    uv_run(&loop, UV_RUN_NOWAIT);
    uv_run(&loop, UV_RUN_NOWAIT);
    res_init(&r);
    start(up, &r, "GET", "/v2/");
    wait_done(&loop, &r);
    assert_int_equal(r.done_status, 0);
    struct am_upstream_stats s = stats_of(up);
    assert_int_equal(s.requests, 2); /* no retry was needed */
    assert_int_equal(s.connections, 2);
    fake_stop(&f);
    finish(&loop, up);
}

static void follows_a_redirect_to_another_port_without_authorization(void **state)
{
    uv_loop_t loop;
    struct fake a, b;
    struct res r;
    char url[64];
    uv_loop_init(&loop);
    fake_start(&loop, &a, h_basic_redirect);
    fake_start(&loop, &b, h_peer);
    a.peer_port = b.port;
    fake_url(&a, url, sizeof url);
    struct am_upstream *up = new_up(&loop, url, NULL, false, "user", "pass", NULL);
    res_init(&r);
    start(up, &r, "GET", "/v2/t/blobs/x");
    wait_done(&loop, &r);
    assert_int_equal(r.done_status, 0);
    assert_int_equal(r.status, 200);
    assert_string_equal(r.body, "redirected");
    assert_int_equal(a.unauth, 1);
    assert_int_equal(a.authed, 1);
    assert_int_equal(b.requests, 1);
    assert_string_equal(b.peer_auth, ""); /* credentials stay with the upstream */

    /* Having answered a Basic challenge, later requests send it up front. */
    res_init(&r);
    start(up, &r, "GET", "/v2/t/blobs/y");
    wait_done(&loop, &r);
    assert_int_equal(r.status, 200);
    assert_int_equal(a.unauth, 1);
    assert_int_equal(a.authed, 2);
    fake_stop(&a);
    fake_stop(&b);
    finish(&loop, up);
}

static void keeps_authorization_on_a_same_origin_redirect(void **state)
{
    uv_loop_t loop;
    struct fake a;
    struct res r;
    char url[64];
    uv_loop_init(&loop);
    fake_start(&loop, &a, h_basic_redirect);
    fake_url(&a, url, sizeof url);
    struct am_upstream *up = new_up(&loop, url, NULL, false, "user", "pass", NULL);
    res_init(&r);
    start(up, &r, "GET", "/v2/same");
    wait_done(&loop, &r);
    assert_int_equal(r.done_status, 0);
    assert_int_equal(r.status, 200);
    assert_string_equal(r.body, "same-site");
    /* "../v2/./final?x=1#frag" against /v2/same */
    assert_non_null(strstr(a.last_head, "GET /v2/final?x=1 HTTP/1.1\r\n"));
    assert_int_equal(a.unauth, 1);
    assert_int_equal(a.authed, 2);
    assert_int_equal(stats_of(up).connections, 1);
    fake_stop(&a);
    finish(&loop, up);
}

static void stops_a_redirect_loop(void **state)
{
    uv_loop_t loop;
    struct fake a;
    struct res r;
    char url[64];
    struct am_upstream_opts o = default_opts();
    o.max_redirects = 3;
    uv_loop_init(&loop);
    fake_start(&loop, &a, h_loop);
    fake_url(&a, url, sizeof url);
    struct am_upstream *up = new_up(&loop, url, NULL, false, NULL, NULL, &o);
    res_init(&r);
    start(up, &r, "GET", "/v2/loop");
    wait_done(&loop, &r);
    assert_int_equal(r.heads, 0);
    assert_int_equal(r.done_status, AM_EREDIRECT);
    assert_non_null(strstr(r.msg, "redirects"));
    assert_int_equal(a.requests, 4);
    fake_stop(&a);
    finish(&loop, up);
}

/* A non-loopback address of this machine, or false. */
static bool public_ipv4(char *out, size_t n)
{
    uv_interface_address_t *ifs;
    int count;
    bool found = false;
    if (uv_interface_addresses(&ifs, &count)) return false;
    for (int i = 0; i < count && !found; i++) {
        if (ifs[i].is_internal || ifs[i].address.address4.sin_family != AF_INET) continue;
        uv_ip4_name(&ifs[i].address.address4, out, n);
        found = strncmp(out, "169.254.", 8) != 0;
    }
    uv_free_interface_addresses(ifs, count);
    return found;
}

static void refuses_a_redirect_to_loopback_unless_allowed(void **state)
{
    char ip[64], url[96];
    if (!public_ipv4(ip, sizeof ip)) skip();
    for (int allow = 0; allow < 2; allow++) {
        uv_loop_t loop;
        struct fake a, b;
        struct res r;
        struct am_upstream_opts o = default_opts();
        o.allow_private_redirects = allow;
        uv_loop_init(&loop);
        fake_start_on(&loop, &a, h_to_loopback, "0.0.0.0");
        fake_start(&loop, &b, h_peer);
        a.peer_port = b.port;
        snprintf(url, sizeof url, "http://%s:%d", ip, a.port);
        struct am_upstream *up = new_up(&loop, url, NULL, false, NULL, NULL, &o);
        res_init(&r);
        start(up, &r, "GET", "/v2/x");
        wait_done(&loop, &r);
        if (allow) {
            assert_int_equal(r.done_status, 0);
            assert_string_equal(r.body, "redirected");
            assert_int_equal(b.requests, 1);
        } else {
            assert_int_equal(r.heads, 0);
            assert_int_equal(r.done_status, AM_EREDIRECT);
            assert_non_null(strstr(r.msg, "loopback"));
            assert_int_equal(b.requests, 0);
        }
        fake_stop(&a);
        fake_stop(&b);
        finish(&loop, up);
    }
}

static void fetches_one_token_for_concurrent_requests(void **state)
{
    uv_loop_t loop;
    struct fake f;
    struct res r[4];
    char url[64];
    uv_loop_init(&loop);
    fake_start(&loop, &f, h_bearer);
    fake_url(&f, url, sizeof url);
    struct am_upstream *up = new_up(&loop, url, NULL, false, "user", "pass", NULL);
    int done = 0;
    for (int i = 0; i < 3; i++) {
        res_init(&r[i]);
        start_full(up, &r[i], "GET", "/v2/t/manifests/latest", NULL, NULL, "repository:t:pull");
    }
    while (done < 3) {
        uv_run(&loop, UV_RUN_ONCE);
        done = r[0].dones + r[1].dones + r[2].dones;
    }
    for (int i = 0; i < 3; i++) {
        assert_int_equal(r[i].done_status, 0);
        assert_int_equal(r[i].heads, 1);
        assert_int_equal(r[i].status, 200);
        assert_string_equal(r[i].body, "secret");
    }
    assert_int_equal(f.tokens, 1);
    assert_int_equal(f.unauth, 3);
    assert_string_equal(f.token_auth, "Basic dXNlcjpwYXNz");
    assert_string_equal(f.token_query, "/token?service=fake-registry&scope=repository%3At%3Apull");

    /* The cached token goes out up front: no 401, no token request. */
    res_init(&r[3]);
    start_full(up, &r[3], "GET", "/v2/t/manifests/latest", NULL, NULL, "repository:t:pull");
    wait_done(&loop, &r[3]);
    assert_int_equal(r[3].status, 200);
    assert_int_equal(f.unauth, 3);
    assert_int_equal(f.tokens, 1);
    assert_int_equal(f.authed, 4);
    assert_int_equal(stats_of(up).token_fetches, 1);
    fake_stop(&f);
    finish(&loop, up);
}

static void delivers_the_401_when_the_token_is_refused(void **state)
{
    uv_loop_t loop;
    struct fake f;
    struct res r;
    char url[64];
    uv_loop_init(&loop);
    fake_start(&loop, &f, h_bearer);
    f.token_value = "not-accepted";
    fake_url(&f, url, sizeof url);
    struct am_upstream *up = new_up(&loop, url, NULL, false, NULL, NULL, NULL);
    res_init(&r);
    start(up, &r, "GET", "/v2/t/manifests/latest"); /* no scope: the challenge's is used */
    wait_done(&loop, &r);
    assert_int_equal(r.heads, 1);
    assert_int_equal(r.status, 401);
    assert_int_equal(r.done_status, 0);
    assert_int_equal(f.tokens, 1);
    assert_int_equal(f.unauth, 2);
    assert_string_equal(f.token_auth, ""); /* anonymous without credentials */
    assert_non_null(strstr(f.last_head, "Authorization: Bearer not-accepted\r\n"));
    fake_stop(&f);
    finish(&loop, up);
}

static void reports_unauthorized_when_the_token_endpoint_fails(void **state)
{
    uv_loop_t loop;
    struct fake f;
    struct res r;
    char url[64];
    uv_loop_init(&loop);
    fake_start(&loop, &f, h_bearer);
    f.token_fail = true;
    fake_url(&f, url, sizeof url);
    struct am_upstream *up = new_up(&loop, url, NULL, false, NULL, NULL, NULL);
    res_init(&r);
    start_full(up, &r, "GET", "/v2/t/manifests/latest", NULL, NULL, "repository:t:pull");
    wait_done(&loop, &r);
    assert_int_equal(r.heads, 0);
    assert_int_equal(r.done_status, AM_EUNAUTHORIZED);
    assert_non_null(strstr(r.msg, "127.0.0.1"));
    assert_non_null(strstr(r.msg, "500"));
    fake_stop(&f);
    finish(&loop, up);
}

static void rejects_invalid_requests_without_callbacks(void **state)
{
    uv_loop_t loop;
    struct res r;
    struct am_upstream_req *req = NULL;
    uv_loop_init(&loop);
    struct am_upstream *up = new_up(&loop, "http://127.0.0.1:9", NULL, false, NULL, NULL, NULL);
    res_init(&r);
    struct am_upstream_request_opts bad[] = {
        {.method = "POST", .path = "/v2/"},
        {.method = "GET", .path = "v2/"},
        {.method = "GET", .path = "/v2/ x"},
        {.method = "GET", .path = "/v2/", .range = "bytes=0-1\r\nX: y"},
        {.method = "GET", .path = "/v2/", .accept = "a\nb"},
        {.method = NULL, .path = "/v2/"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        assert_int_equal(am_upstream_request(up, &bad[i], &cbs, &r, &req), AM_EINVAL);
    am_upstream_free(up);
    struct am_upstream_request_opts ok = {.method = "GET", .path = "/v2/"};
    assert_int_equal(am_upstream_request(up, &ok, &cbs, &r, &req), AM_ECANCELED);
    drain(&loop);
    assert_int_equal(r.heads + r.bodies + r.dones, 0);
}

static void rejects_bad_configuration(void **state)
{
    uv_loop_t loop;
    struct am_upstream *up = NULL;
    struct am_upstream_opts o = default_opts();
    char msg[256];
    uv_loop_init(&loop);
    const char *urls[] = {"ftp://x",    "http://",       "http://a:0",  "http://a:99999",
                          "http://u@h", "http://h/path", "http://[::1", "http://bad host"};
    for (size_t i = 0; i < sizeof urls / sizeof urls[0]; i++) {
        struct am_upstream_conf c = {.name = "x", .url = (char *)urls[i]};
        assert_int_equal(am_upstream_new(&loop, &c, &o, &up, msg, sizeof msg), AM_ECONFIG);
        assert_non_null(strstr(msg, "url"));
    }
    struct am_upstream_conf c = {.name = "x", .url = "https://h", .ca_file = "/nonexistent/ca.pem"};
    assert_int_equal(am_upstream_new(&loop, &c, &o, &up, msg, sizeof msg), AM_EUPSTREAM_TLS);
    assert_non_null(strstr(msg, "/nonexistent/ca.pem"));
    struct am_upstream_conf ok = {.name = "x", .url = "https://[::1]:5000/"};
    assert_int_equal(am_upstream_new(&loop, &ok, &o, &up, msg, sizeof msg), 0);
    finish(&loop, up);
}

static void trims_header_values(void **state)
{
    uv_loop_t loop;
    struct fake f;
    struct res r;
    char url[64];
    uv_loop_init(&loop);
    fake_start(&loop, &f, h_framing);
    fake_url(&f, url, sizeof url);
    struct am_upstream *up = new_up(&loop, url, NULL, false, NULL, NULL, NULL);
    res_init(&r);
    r.grab = "x-trail";
    start(up, &r, "GET", "/interim");
    wait_done(&loop, &r);
    assert_int_equal(r.status, 200);
    assert_string_equal(r.grabbed, "[spaced]");
    fake_stop(&f);
    finish(&loop, up);
}

static void pauses_from_on_head_before_any_body_byte(void **state)
{
    NEED_REGISTRY();
    uv_loop_t loop;
    struct res r;
    char path[256];
    uv_loop_init(&loop);
    struct am_upstream *up = new_up(&loop, G.plain_url, NULL, false, NULL, NULL, NULL);
    res_init(&r);
    res_hash(&r);
    r.pause_on_head = true;
    r.auto_resume = true;
    uv_idle_init(&loop, &r.resumer);
    r.resumer.data = &r;
    snprintf(path, sizeof path, "/v2/t/blobs/%s", G.blob_digest);
    start(up, &r, "GET", path);
    wait_done(&loop, &r);
    assert_int_equal(r.pauses, 1);
    assert_false(r.body_while_paused);
    assert_int_equal(r.done_status, 0);
    assert_int_equal(r.body_len, BLOB_LEN);
    res_check_digest(&r, G.blob_digest);
    uv_close((uv_handle_t *)&r.resumer, NULL);
    finish(&loop, up);
}

static void frees_the_upstream_from_inside_a_callback(void **state)
{
    NEED_REGISTRY();
    uv_loop_t loop;
    struct res r, other;
    char path[256];
    uv_loop_init(&loop);
    struct am_upstream *up = new_up(&loop, G.plain_url, NULL, false, NULL, NULL, NULL);
    res_init(&r);
    res_init(&other);
    r.free_on_body = true;
    r.up = up;
    other.pause_on_head = true; /* never resumed: still in flight when r frees */
    snprintf(path, sizeof path, "/v2/t/blobs/%s", G.blob_digest);
    start(up, &other, "GET", path);
    run_until(&loop, &other.heads, 1);
    start(up, &r, "GET", path);
    run_until(&loop, &r.dones, 1);
    /* Both end with ECANCELED, once, and nothing arrives after. */
    assert_int_equal(r.done_status, AM_ECANCELED);
    assert_int_equal(other.dones, 1);
    assert_int_equal(other.done_status, AM_ECANCELED);
    int bodies = r.bodies;
    drain(&loop);
    assert_int_equal(r.bodies, bodies);
    assert_int_equal(r.dones, 1);
    assert_false(r.cb_after_done);
    assert_false(other.cb_after_done);
}

static void frees_the_upstream_while_resolving(void **state)
{
    uv_loop_t loop;
    struct res r;
    uv_loop_init(&loop);
    struct am_upstream *up = new_up(&loop, "http://localhost:9", NULL, false, NULL, NULL, NULL);
    res_init(&r);
    start(up, &r, "GET", "/v2/");
    am_upstream_free(up); /* the getaddrinfo is cancelled or its answer dropped */
    assert_int_equal(r.done_status, AM_ECANCELED);
    drain(&loop);
    assert_int_equal(r.dones, 1);
}

static void joins_a_token_fetch_in_flight_without_a_401(void **state)
{
    uv_loop_t loop;
    struct fake f;
    struct res a, b;
    char url[64];
    uv_loop_init(&loop);
    fake_start(&loop, &f, h_bearer);
    f.token_hold = true;
    fake_url(&f, url, sizeof url);
    struct am_upstream *up = new_up(&loop, url, NULL, false, NULL, NULL, NULL);
    res_init(&a);
    res_init(&b);
    start_full(up, &a, "GET", "/v2/t/manifests/a", NULL, NULL, "repository:t:pull");
    run_until(&loop, &f.tokens, 1);
    /* The token request is in flight: b waits for it instead of collecting a 401. */
    start_full(up, &b, "HEAD", "/v2/t/manifests/b", NULL, NULL, "repository:t:pull");
    for (int i = 0; i < 5; i++) uv_run(&loop, UV_RUN_NOWAIT);
    assert_int_equal(f.requests, 2); /* a's 401 and the token request */
    fake_send_token(&f, f.held);
    wait_done(&loop, &a);
    wait_done(&loop, &b);
    assert_int_equal(a.status, 200);
    assert_string_equal(a.body, "secret");
    assert_int_equal(b.status, 200);
    assert_int_equal(b.content_length, 6);
    assert_int_equal(b.bodies, 0);
    assert_int_equal(f.unauth, 1);
    assert_int_equal(f.tokens, 1);
    assert_int_equal(f.authed, 2);
    fake_stop(&f);
    finish(&loop, up);
}

static void runs_the_token_flow_for_head(void **state)
{
    uv_loop_t loop;
    struct fake f;
    struct res r;
    char url[64];
    uv_loop_init(&loop);
    fake_start(&loop, &f, h_bearer);
    fake_url(&f, url, sizeof url);
    struct am_upstream *up = new_up(&loop, url, NULL, false, NULL, NULL, NULL);
    res_init(&r);
    start_full(up, &r, "HEAD", "/v2/t/manifests/latest", NULL, NULL, "repository:t:pull");
    wait_done(&loop, &r);
    assert_int_equal(r.done_status, 0);
    assert_int_equal(r.status, 200);
    assert_int_equal(r.bodies, 0);
    assert_int_equal(f.unauth, 1);
    assert_int_equal(f.tokens, 1);
    assert_int_equal(stats_of(up).connections, 1); /* 401, token and retry on one */
    fake_stop(&f);
    finish(&loop, up);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(gets_v2_with_the_api_version_header),
        cmocka_unit_test(gets_a_blob_whose_bytes_match_its_digest),
        cmocka_unit_test(gets_a_range_of_a_blob),
        cmocka_unit_test(head_delivers_the_head_without_a_body),
        cmocka_unit_test(delivers_404_for_an_unknown_blob_through_on_head),
        cmocka_unit_test(reuses_one_connection_for_sequential_requests),
        cmocka_unit_test(pauses_and_resumes_a_blob_body),
        cmocka_unit_test(cancels_in_the_middle_of_a_body),
        cmocka_unit_test(free_cancels_requests_in_flight),
        cmocka_unit_test(pauses_from_on_head_before_any_body_byte),
        cmocka_unit_test(frees_the_upstream_from_inside_a_callback),
        cmocka_unit_test(frees_the_upstream_while_resolving),
        cmocka_unit_test(tls_verifies_the_registry_with_the_configured_ca),
        cmocka_unit_test(tls_streams_a_blob_with_pauses),
        cmocka_unit_test(tls_refuses_a_certificate_the_system_store_does_not_trust),
        cmocka_unit_test(tls_refuses_a_certificate_for_another_host),
        cmocka_unit_test(tls_insecure_skips_verification),
        cmocka_unit_test(tls_to_a_plain_server_fails_cleanly),
        cmocka_unit_test(reports_a_refused_connection_without_a_head),
        cmocka_unit_test(sends_exactly_the_expected_request_head),
        cmocka_unit_test(times_out_waiting_for_the_head),
        cmocka_unit_test(times_out_when_the_body_stalls),
        cmocka_unit_test(reports_a_connection_closed_mid_body),
        cmocka_unit_test(reads_chunked_close_delimited_and_interim_responses),
        cmocka_unit_test(trims_header_values),
        cmocka_unit_test(refuses_a_head_with_too_many_headers),
        cmocka_unit_test(refuses_an_oversized_head),
        cmocka_unit_test(retries_once_when_a_pooled_connection_was_closed),
        cmocka_unit_test(discards_a_pooled_connection_the_server_closed),
        cmocka_unit_test(follows_a_redirect_to_another_port_without_authorization),
        cmocka_unit_test(keeps_authorization_on_a_same_origin_redirect),
        cmocka_unit_test(stops_a_redirect_loop),
        cmocka_unit_test(refuses_a_redirect_to_loopback_unless_allowed),
        cmocka_unit_test(fetches_one_token_for_concurrent_requests),
        cmocka_unit_test(delivers_the_401_when_the_token_is_refused),
        cmocka_unit_test(reports_unauthorized_when_the_token_endpoint_fails),
        cmocka_unit_test(joins_a_token_fetch_in_flight_without_a_401),
        cmocka_unit_test(runs_the_token_flow_for_head),
        cmocka_unit_test(rejects_invalid_requests_without_callbacks),
        cmocka_unit_test(rejects_bad_configuration),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}

/*
 * fuzz_upstream — the upstream response head parser of src/upstream.c (llhttp with our
 * callbacks: status, header views, interim responses, Content-Length/chunked/close
 * framing) and what the client does with a head: the token flow (WWW-Authenticate →
 * realm → token JSON → retry), redirects (Location resolution), Basic credentials,
 * pause/resume. All through the public API (am_upstream_new/request/free).
 *
 * The client speaks TCP only, so each input gets a fake registry on loopback, in
 * process: a uv_tcp listener on 127.0.0.1 (port AM_FUZZ_UPSTREAM_PORT, 18473 by default,
 * so corpus Location/realm URLs can point back at it; an ephemeral port when taken)
 * answers its k-th connection with the input's k-th segment — segments are separated
 * by the line "~~next~~" — then half-closes and reads until the client closes. A
 * connection beyond the last segment is closed at once. The upstream is created fresh
 * for each input (no TLS store loaded: insecure), freed at the end, and the loop must
 * then have no handle left.
 *
 * Name resolution is hermetic: this program defines getaddrinfo/freeaddrinfo, which the
 * dynamic linker prefers over libc's for libuv's thread-pool lookups, and resolves every
 * name to 127.0.0.1. A realm or redirect to "auth.docker.io:18473" thus reaches the fake
 * registry, and one to port 443 finds nothing listening (connection refused). The
 * fuzzer never touches the network.
 *
 * The first input byte sets the request: bit 0 HEAD, bit 1 Basic credentials, bit 2 a
 * token scope, bit 3 a Range header, bit 4 pause+resume on every body chunk, bit 5
 * cancel from on_head, bit 6 allow_private_redirects, bit 7 pool_size 0.
 *
 * Known bug switch: AM_FUZZ_SKIP_KNOWN=1 in the environment relaxes the status-code
 * check that upstream/crashes/two-digit-status-accepted fails today (llhttp 8.1.0 takes
 * "HTTP/1.1 29 X" as status 29) and the on_body-before-on_head check that
 * interim-response-body-delivered fails (a 1xx with Content-Length has its "body"
 * delivered to the caller), so a campaign can look past them. Replay never sets it.
 */
#include <arpa/inet.h>
#include <netdb.h>
#include <signal.h>
#include <string.h>
#include <uv.h>

#include "archmirror/error.h"
#include "archmirror/log.h"
#include "archmirror/upstream.h"
#include "fuzz.h"

#define SEP          "~~next~~\n"
#define MAX_SEGS     8
#define DEFAULT_PORT 18473

/* --- hermetic name resolution ---------------------------------------------------------- */

struct fake_ai {
    struct addrinfo ai;
    struct sockaddr_in sin;
};

int getaddrinfo(const char *node, const char *service, const struct addrinfo *hints,
                struct addrinfo **res)
{
    (void)hints;
    if (!node || !node[0]) return EAI_NONAME;
    struct fake_ai *f = calloc(1, sizeof *f);
    if (!f) return EAI_MEMORY;
    f->sin.sin_family = AF_INET;
    f->sin.sin_port = htons((uint16_t)(service ? atoi(service) : 0));
    f->sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    f->ai.ai_family = AF_INET;
    f->ai.ai_socktype = SOCK_STREAM;
    f->ai.ai_protocol = IPPROTO_TCP;
    f->ai.ai_addrlen = sizeof f->sin;
    f->ai.ai_addr = (struct sockaddr *)&f->sin;
    *res = &f->ai;
    return 0;
}

void freeaddrinfo(struct addrinfo *res)
{
    free(res); /* the fake_ai it is the first member of */
}

/* --- the fake registry ----------------------------------------------------------------- */

struct seg {
    const char *p;
    size_t n;
};

struct sconn {
    uv_tcp_t tcp;
    uv_write_t w;
    uv_shutdown_t s;
    struct sconn *next;
    bool closing;
};

static uv_loop_t loop;
static uv_tcp_t listener;
static int port;
static struct seg segs[MAX_SEGS];
static size_t n_segs, next_seg;
static struct sconn *sconns;
static char sbuf[16384];
static bool skip_known;
static bool input_has_secret;

static void on_sconn_closed(uv_handle_t *h)
{
    struct sconn *c = h->data;
    for (struct sconn **pp = &sconns; *pp; pp = &(*pp)->next)
        if (*pp == c) {
            *pp = c->next;
            break;
        }
    free(c);
}

static void sconn_close(struct sconn *c)
{
    if (c->closing) return;
    c->closing = true;
    uv_close((uv_handle_t *)&c->tcp, on_sconn_closed);
}

static void on_salloc(uv_handle_t *h, size_t hint, uv_buf_t *buf)
{
    (void)h;
    (void)hint;
    *buf = uv_buf_init(sbuf, sizeof sbuf);
}

static void on_sread(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    (void)buf;
    if (nread < 0) sconn_close(s->data);
}

static void on_sshutdown(uv_shutdown_t *req, int status)
{
    (void)req;
    (void)status;
}

static void on_swrite(uv_write_t *req, int status)
{
    struct sconn *c = req->data;
    if (c->closing) return;
    if (status) {
        sconn_close(c);
        return;
    }
    c->s.data = c;
    if (uv_shutdown(&c->s, (uv_stream_t *)&c->tcp, on_sshutdown)) sconn_close(c);
}

static void on_sconnection(uv_stream_t *server, int status)
{
    if (status) return;
    struct sconn *c = calloc(1, sizeof *c);
    FUZZ_CHECK(c != NULL);
    uv_tcp_init(&loop, &c->tcp);
    c->tcp.data = c->w.data = c;
    c->next = sconns;
    sconns = c;
    if (uv_accept(server, (uv_stream_t *)&c->tcp) || next_seg >= n_segs) {
        sconn_close(c);
        return;
    }
    struct seg *sg = &segs[next_seg++];
    uv_read_start((uv_stream_t *)&c->tcp, on_salloc, on_sread);
    uv_buf_t b = uv_buf_init((char *)(uintptr_t)sg->p, (unsigned)sg->n);
    if (sg->n == 0) {
        on_swrite(&c->w, 0);
        return;
    }
    if (uv_write(&c->w, (uv_stream_t *)&c->tcp, &b, 1, on_swrite)) sconn_close(c);
}

static int listen_on(int p)
{
    struct sockaddr_in sa;
    uv_ip4_addr("127.0.0.1", p, &sa);
    uv_tcp_init(&loop, &listener);
    int rc = uv_tcp_bind(&listener, (const struct sockaddr *)&sa, 0);
    if (!rc) rc = uv_listen((uv_stream_t *)&listener, 64, on_sconnection);
    if (!rc) {
        struct sockaddr_storage ss;
        int len = sizeof ss;
        rc = uv_tcp_getsockname(&listener, (struct sockaddr *)&ss, &len);
        if (!rc) port = ntohs(((struct sockaddr_in *)&ss)->sin_port);
    }
    if (rc) {
        uv_close((uv_handle_t *)&listener, NULL);
        uv_run(&loop, UV_RUN_NOWAIT);
    }
    return rc;
}

/* --- the client side ------------------------------------------------------------------- */

struct result {
    bool done, cancel, pause;
    bool saw_head;
    int status;
    struct am_upstream_req *req;
    uint64_t body;
};

static void on_head(void *arg, const struct am_upstream_response *resp)
{
    struct result *r = arg;
    FUZZ_CHECK(!r->saw_head && !r->done);
    r->saw_head = true;
    /* RFC 9112 §4: status-code = 3DIGIT; RFC 9110 §15: 100-599 are the defined classes. */
    if (!skip_known) FUZZ_CHECK(resp->status >= 100 && resp->status <= 599);
    FUZZ_CHECK(resp->reason != NULL && resp->n_headers <= AM_UPSTREAM_MAX_HEADERS);
    FUZZ_CHECK(resp->content_length >= -1);
    volatile unsigned sum = 0; /* touch every byte of every view: ASan checks the bounds */
    for (size_t i = 0; i < resp->reason_len; i++) sum += (unsigned char)resp->reason[i];
    for (size_t i = 0; i < resp->n_headers; i++) {
        const struct am_http_header *h = &resp->headers[i];
        for (size_t k = 0; k < h->name_len; k++) sum += (unsigned char)h->name[k];
        for (size_t k = 0; k < h->value_len; k++) sum += (unsigned char)h->value[k];
        if (h->value_len) FUZZ_CHECK(h->value[h->value_len - 1] != ' ');
    }
    (void)sum;
    if (r->cancel && r->req) {
        am_upstream_req_cancel(r->req);
        r->done = true;
    }
}

static void on_body(void *arg, const char *data, size_t len)
{
    struct result *r = arg;
    FUZZ_CHECK((r->saw_head || skip_known) && !r->done && len > 0);
    volatile unsigned sum = 0;
    for (size_t i = 0; i < len; i++) sum += (unsigned char)data[i];
    (void)sum;
    r->body += len;
    if (r->pause && r->req) {
        am_upstream_req_pause(r->req);
        am_upstream_req_resume(r->req);
    }
}

static void on_done(void *arg, int status)
{
    struct result *r = arg;
    FUZZ_CHECK(!r->done);
    r->done = true;
    r->status = status;
    FUZZ_CHECK(status <= 0);
    const char *m = am_upstream_req_message(r->req);
    FUZZ_CHECK(m != NULL && strnlen(m, 1024) < 1024);
    /* Never the password or the Basic credential, unless the fake registry itself sent
     * those bytes (a host name in a Location, say). */
    if (!input_has_secret) {
        FUZZ_CHECK(strstr(m, "s3cret") == NULL);
        FUZZ_CHECK(strstr(m, "ZnV6emVyOnMzY3JldA") == NULL); /* base64 "fuzzer:s3cret" */
    }
}

static void on_listener_closed(uv_handle_t *h)
{
    (void)h;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static bool inited;
    static int want_port = DEFAULT_PORT;
    if (!inited) {
        signal(SIGPIPE, SIG_IGN);
        am_log_set_level(AM_LOG_ERROR);
        const char *e = getenv("AM_FUZZ_UPSTREAM_PORT");
        if (e) want_port = atoi(e);
        const char *k = getenv("AM_FUZZ_SKIP_KNOWN");
        skip_known = k && k[0] == '1';
        FUZZ_CHECK(uv_loop_init(&loop) == 0);
        inited = true;
    }
    if (size == 0) return 0;
    unsigned flags = data[0];
    input_has_secret =
        memmem(data, size, "s3cret", 6) || memmem(data, size, "ZnV6emVyOnMzY3JldA", 18);
    const char *p = (const char *)data + 1, *end = (const char *)data + size;
    n_segs = next_seg = 0;
    while (n_segs < MAX_SEGS) {
        const char *s = memmem(p, (size_t)(end - p), SEP, sizeof SEP - 1);
        segs[n_segs].p = p;
        segs[n_segs].n = s ? (size_t)(s - p) : (size_t)(end - p);
        n_segs++;
        if (!s) break;
        p = s + sizeof SEP - 1;
    }
    if (listen_on(want_port) && listen_on(0)) return 0;

    char url[64];
    snprintf(url, sizeof url, "http://127.0.0.1:%d", port);
    struct am_upstream_conf conf = {
        .name = "fuzz.registry",
        .url = url,
        .insecure = true,
        .username = (flags & 2) ? "fuzzer" : NULL,
        .password = (flags & 2) ? "s3cret" : NULL,
    };
    struct am_upstream_opts opts = {
        .connect_timeout_ms = 2000,
        .header_timeout_ms = 2000,
        .idle_timeout_ms = 2000,
        .pool_size = (flags & 128) ? 0 : 4,
        .max_redirects = 3,
        .allow_private_redirects = (flags & 64) != 0,
    };
    struct am_upstream *up = NULL;
    char msg[256];
    FUZZ_CHECK(am_upstream_new(&loop, &conf, &opts, &up, msg, sizeof msg) == 0);

    struct result r = {.cancel = (flags & 32) != 0, .pause = (flags & 16) != 0};
    struct am_upstream_request_opts ro = {
        .method = (flags & 1) ? "HEAD" : "GET",
        .path = "/v2/library/alpine/manifests/3.20",
        .accept =
            "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json",
        .range = (flags & 8) ? "bytes=0-1023" : NULL,
        .scope = (flags & 4) ? "repository:library/alpine:pull" : NULL,
    };
    struct am_upstream_cbs cbs = {on_head, on_body, on_done};
    int rc = am_upstream_request(up, &ro, &cbs, &r, &r.req);
    FUZZ_CHECK(rc == 0);
    while (!r.done) uv_run(&loop, UV_RUN_ONCE);
    if (r.status == 0 && !r.cancel) FUZZ_CHECK(r.saw_head);

    am_upstream_free(up);
    uv_close((uv_handle_t *)&listener, on_listener_closed);
    for (struct sconn *c = sconns; c; c = c->next) sconn_close(c);
    uv_run(&loop, UV_RUN_DEFAULT);
    FUZZ_CHECK(sconns == NULL && uv_loop_alive(&loop) == 0);
    return 0;
}

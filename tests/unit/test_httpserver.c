/*
 * test_httpserver — the HTTP/1.1 server over real loopback sockets.
 *
 * Each test runs the server on port 0 in its own loop on the main thread and drives it
 * from a second thread doing blocking socket I/O. The client thread only records what it
 * saw; assertions run on the main thread after the loop has ended (cmocka is not
 * thread-safe). When the client is done it wakes the loop with a uv_async, which drains
 * the server; every test ends with uv_loop_close() == 0. No sleeps, no timing asserts:
 * timeouts in tests are tiny and only their outcome (the status) is checked; socket
 * receive timeouts are a safety net against hangs, never a synchronisation.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>
#include <uv.h>

#include "archmirror/error.h"
#include "archmirror/http.h"
#include "archmirror/httpserver.h"
#include "archmirror/log.h"

/* --- blocking client (runs on the client thread) ------------------------------------- */

struct cli {
    int fd;
    size_t len;
    char buf[64 * 1024];
};

struct resp {
    int status;
    char head[4096];
    char body[8192]; /* the first bytes of the body */
    size_t body_len; /* all body bytes read */
    long long clen;  /* -1: no Content-Length */
};

static int cli_connect_addr(struct cli *c, const struct sockaddr *sa, socklen_t len)
{
    c->len = 0;
    c->fd = socket(sa->sa_family, SOCK_STREAM, 0);
    if (c->fd < 0) return -1;
    struct timeval tv = {30, 0}; /* a hang guard, not a synchronisation */
    setsockopt(c->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(c->fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(c->fd, sa, len) != 0) {
        close(c->fd);
        c->fd = -1;
        return -1;
    }
    return 0;
}

static int cli_connect(struct cli *c, int port)
{
    struct sockaddr_in sin;
    memset(&sin, 0, sizeof sin);
    sin.sin_family = AF_INET;
    sin.sin_port = htons((uint16_t)port);
    sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    return cli_connect_addr(c, (struct sockaddr *)&sin, sizeof sin);
}

static int cli_connect6(struct cli *c, int port)
{
    struct sockaddr_in6 sin6;
    memset(&sin6, 0, sizeof sin6);
    sin6.sin6_family = AF_INET6;
    sin6.sin6_port = htons((uint16_t)port);
    sin6.sin6_addr = in6addr_loopback;
    return cli_connect_addr(c, (struct sockaddr *)&sin6, sizeof sin6);
}

static int cli_send_n(struct cli *c, const char *p, size_t n)
{
    while (n) {
        ssize_t w = send(c->fd, p, n, MSG_NOSIGNAL);
        if (w <= 0) return -1;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

static int cli_send(struct cli *c, const char *s)
{
    return cli_send_n(c, s, strlen(s));
}

static void cli_close(struct cli *c)
{
    if (c->fd >= 0) close(c->fd);
    c->fd = -1;
}

/* Returns bytes added, 0 on EOF, -1 on error/timeout/full buffer. */
static ssize_t cli_fill(struct cli *c)
{
    if (c->len == sizeof c->buf) return -1;
    ssize_t n = recv(c->fd, c->buf + c->len, sizeof c->buf - c->len, 0);
    if (n > 0) c->len += (size_t)n;
    return n;
}

static void cli_consume(struct cli *c, size_t n)
{
    memmove(c->buf, c->buf + n, c->len - n);
    c->len -= n;
}

/* Reads one response; for a HEAD request only its head. Returns 0, or -1 if the
 * connection ended (or failed) before the response was complete. */
static int cli_response(struct cli *c, bool head_req, struct resp *r)
{
    memset(r, 0, sizeof *r);
    r->clen = -1;
    char *end;
    while (!(end = memmem(c->buf, c->len, "\r\n\r\n", 4))) {
        if (cli_fill(c) <= 0) return -1;
    }
    size_t hlen = (size_t)(end + 4 - c->buf);
    size_t keep = hlen < sizeof r->head - 1 ? hlen : sizeof r->head - 1;
    memcpy(r->head, c->buf, keep);
    r->head[keep] = '\0';
    if (sscanf(r->head, "HTTP/1.1 %d", &r->status) != 1) r->status = -1;
    const char *cl = strcasestr(r->head, "\r\nContent-Length:");
    if (cl) r->clen = strtoll(cl + 17, NULL, 10);
    cli_consume(c, hlen);
    if (head_req || r->clen <= 0) return 0;
    size_t need = (size_t)r->clen;
    while (need) {
        if (c->len == 0 && cli_fill(c) <= 0) return -1;
        size_t take = c->len < need ? c->len : need;
        if (r->body_len < sizeof r->body - 1) {
            size_t room = sizeof r->body - 1 - r->body_len;
            memcpy(r->body + r->body_len, c->buf, take < room ? take : room);
        }
        r->body_len += take;
        cli_consume(c, take);
        need -= take;
    }
    return 0;
}

/* Reads until the server closes. Returns true on EOF (or reset after EOF-like close);
 * *extra gets the bytes that arrived first. */
static bool cli_eof(struct cli *c, size_t *extra)
{
    size_t n = c->len;
    c->len = 0;
    for (;;) {
        ssize_t r = recv(c->fd, c->buf, sizeof c->buf, 0);
        if (r > 0) {
            n += (size_t)r;
            continue;
        }
        if (extra) *extra = n;
        return r == 0 || (r < 0 && errno == ECONNRESET);
    }
}

/* --- fixture ------------------------------------------------------------------------- */

struct fx;
typedef void (*client_fn)(struct fx *f);
typedef void (*handler_fn)(struct fx *f, struct am_http_exchange *ex);

struct fx {
    uv_loop_t loop;
    struct am_httpserver *srv;
    struct am_httpserver_opts opts;
    int port, port6;
    bool with_v6;
    uv_async_t async;
    uv_thread_t thread;
    client_fn client;
    handler_fn handler;

    /* loop side */
    bool drain_called;
    bool drained;
    int calls;
    int gone;
    bool gone_before_drain;
    bool wait_gone; /* drain only once on_gone ran (watchdog otherwise) */
    bool client_done;
    uv_timer_t watchdog;
    bool watchdog_on;
    int drains;
    int end_rc;
    bool slow_responded;
    bool slow_responded_before_done;
    char methods[8][16];
    char paths[8][64];
    char queries[8][64];
    char hdr_x[8][64];
    size_t n_hdr_x[8];
    uint64_t stream_total, stream_written;
    struct am_http_exchange *held;
    uv_sem_t sem;
    bool use_sem;

    /* client side */
    struct resp r[8];
    int rc[8];
    bool eof[8];
    size_t extra[8];
    int n_ok;
    int first_bad;
    size_t big_read;
};

static struct am_httpserver_opts default_opts(void)
{
    struct am_httpserver_opts o = {
        .max_connections = 100,
        .max_header_bytes = 8192,
        .max_headers = 32,
        .header_timeout_ms = 10000,
        .idle_timeout_ms = 10000,
        .drain_timeout_ms = 10000,
    };
    return o;
}

static struct fx *fx_new(client_fn client, handler_fn handler)
{
    struct fx *f = calloc(1, sizeof *f);
    assert_non_null(f);
    f->opts = default_opts();
    f->client = client;
    f->handler = handler;
    f->end_rc = 1;
    return f;
}

static void on_drained(void *arg)
{
    struct fx *f = arg;
    f->drained = true;
    f->slow_responded_before_done = f->slow_responded;
}

static void fx_drain(struct fx *f)
{
    f->drain_called = true;
    am_httpserver_drain(f->srv, on_drained, f);
}

static void on_watchdog(uv_timer_t *t)
{
    struct fx *f = t->data;
    uv_close((uv_handle_t *)&f->watchdog, NULL);
    f->watchdog_on = false;
    fx_drain(f);
}

static void on_client_done(uv_async_t *a)
{
    struct fx *f = a->data;
    uv_close((uv_handle_t *)&f->async, NULL);
    f->client_done = true;
    if (f->wait_gone && !f->gone) {
        uv_timer_init(&f->loop, &f->watchdog);
        f->watchdog.data = f;
        f->watchdog_on = true;
        uv_timer_start(&f->watchdog, on_watchdog, 20000, 0);
        return;
    }
    fx_drain(f); /* ignored when the test drained already */
}

static void client_main(void *arg)
{
    struct fx *f = arg;
    f->client(f);
    uv_async_send(&f->async);
}

static void handler_tramp(void *ctx, struct am_http_exchange *ex)
{
    struct fx *f = ctx;
    const struct am_http_request *req = am_http_request_of(ex);
    if (f->calls < 8) {
        int i = f->calls;
        snprintf(f->methods[i], sizeof f->methods[i], "%s", req->method);
        snprintf(f->paths[i], sizeof f->paths[i], "%s", req->path);
        snprintf(f->queries[i], sizeof f->queries[i], "%s", req->query);
        assert_int_equal(strlen(req->path), req->path_len);
        assert_int_equal(strlen(req->query), req->query_len);
        size_t n = 0;
        const char *x = am_http_req_header(ex, "x-test", &n);
        if (x) snprintf(f->hdr_x[i], sizeof f->hdr_x[i], "%.*s", (int)n, x);
        n = 0;
        for (size_t k = 0; k < req->n_headers; k++)
            if (am_http_token_eq(req->headers[k].name, req->headers[k].name_len, "x-test")) n++;
        f->n_hdr_x[i] = n;
    }
    f->calls++;
    assert_ptr_equal(am_http_loop(ex), &f->loop);
    f->handler(f, ex);
}

static void fx_run(struct fx *f)
{
    char msg[128];
    assert_int_equal(uv_loop_init(&f->loop), 0);
    assert_int_equal(am_httpserver_new(&f->loop, &f->opts, handler_tramp, f, &f->srv), 0);
    assert_int_equal(am_httpserver_listen(f->srv, "127.0.0.1:0", msg, sizeof msg), 0);
    f->port = am_httpserver_port(f->srv, 0);
    assert_true(f->port > 0);
    if (f->with_v6) {
        assert_int_equal(am_httpserver_listen(f->srv, "[::1]:0", msg, sizeof msg), 0);
        f->port6 = am_httpserver_port(f->srv, 1);
        assert_true(f->port6 > 0);
    }
    assert_int_equal(uv_async_init(&f->loop, &f->async, on_client_done), 0);
    f->async.data = f;
    if (f->use_sem) assert_int_equal(uv_sem_init(&f->sem, 0), 0);
    assert_int_equal(uv_thread_create(&f->thread, client_main, f), 0);
    assert_int_equal(uv_run(&f->loop, UV_RUN_DEFAULT), 0);
    assert_int_equal(uv_thread_join(&f->thread), 0);
    assert_true(f->drained);
    am_httpserver_free(f->srv);
    assert_int_equal(uv_loop_close(&f->loop), 0);
    if (f->use_sem) uv_sem_destroy(&f->sem);
}

/* --- handlers (loop side) ------------------------------------------------------------ */

static const struct am_http_header x_test = {"X-Test", 6, "yes", 3};

/* "GET /path q" as body. */
static void respond_echo(struct am_http_exchange *ex)
{
    const struct am_http_request *req = am_http_request_of(ex);
    char body[256];
    int n = snprintf(body, sizeof body, "%s %s %s", req->method, req->path, req->query);
    assert_int_equal(am_http_respond(ex, 200, NULL, &x_test, 1, body, (size_t)n), 0);
}

static void h_echo(struct fx *f, struct am_http_exchange *ex)
{
    respond_echo(ex);
}

struct later {
    uv_timer_t t;
    struct fx *f;
    struct am_http_exchange *ex;
};

static void on_later_closed(uv_handle_t *h)
{
    free(h);
}

static void on_later(uv_timer_t *t)
{
    struct later *l = t->data;
    struct fx *f = l->f;
    const struct am_http_request *req = am_http_request_of(l->ex);
    if (strcmp(req->path, "/slow") == 0) {
        assert_int_equal(am_http_respond(l->ex, 200, NULL, NULL, 0, "slow", 4), 0);
        f->slow_responded = true;
    } else {
        respond_echo(l->ex);
    }
    uv_close((uv_handle_t *)&l->t, on_later_closed);
}

static void answer_later(struct fx *f, struct am_http_exchange *ex)
{
    struct later *l = calloc(1, sizeof *l);
    assert_non_null(l);
    l->f = f;
    l->ex = ex;
    uv_timer_init(&f->loop, &l->t);
    l->t.data = l;
    uv_timer_start(&l->t, on_later, 0, 0);
}

/* Paths starting "/async" answer from a 0 ms timer, the rest at once. */
static void h_mixed(struct fx *f, struct am_http_exchange *ex)
{
    if (strncmp(am_http_request_of(ex)->path, "/async", 6) == 0)
        answer_later(f, ex);
    else
        respond_echo(ex);
}

static void h_async(struct fx *f, struct am_http_exchange *ex)
{
    answer_later(f, ex);
}

/* --- simple requests ----------------------------------------------------------------- */

static void c_get_and_head(struct fx *f)
{
    struct cli c;
    if (cli_connect(&c, f->port)) return;
    cli_send(&c, "GET /hello?x=1 HTTP/1.1\r\nHost: t\r\nX-Test:  padded \t\r\n\r\n");
    f->rc[0] = cli_response(&c, false, &f->r[0]);
    cli_send(&c, "HEAD /hello HTTP/1.1\r\nHost: t\r\n\r\n");
    f->rc[1] = cli_response(&c, true, &f->r[1]);
    /* Any HEAD body bytes would corrupt this next response. */
    cli_send(&c, "GET /after HTTP/1.1\r\nHost: t\r\n\r\n");
    f->rc[2] = cli_response(&c, false, &f->r[2]);
    cli_close(&c);
}

static void serves_a_simple_get_and_head(void **state)
{
    struct fx *f = fx_new(c_get_and_head, h_echo);
    fx_run(f);
    assert_int_equal(f->rc[0], 0);
    assert_int_equal(f->r[0].status, 200);
    assert_string_equal(f->r[0].body, "GET /hello x=1");
    assert_non_null(strstr(f->r[0].head, "\r\nDate: "));
    assert_non_null(strstr(f->r[0].head, "\r\nContent-Length: 14\r\n"));
    assert_non_null(strstr(f->r[0].head, "\r\nX-Test: yes\r\n"));
    assert_null(strstr(f->r[0].head, "Connection:"));
    assert_string_equal(f->hdr_x[0], "padded"); /* trimmed */
    assert_string_equal(f->methods[0], "GET");
    assert_string_equal(f->paths[0], "/hello");
    assert_string_equal(f->queries[0], "x=1");

    assert_int_equal(f->rc[1], 0);
    assert_int_equal(f->r[1].status, 200);
    assert_int_equal(f->r[1].clen, (long long)strlen("HEAD /hello "));
    assert_string_equal(f->methods[1], "HEAD");
    assert_string_equal(f->queries[1], "");

    assert_int_equal(f->rc[2], 0);
    assert_int_equal(f->r[2].status, 200);
    assert_string_equal(f->r[2].body, "GET /after ");
    assert_int_equal(f->calls, 3);
    free(f);
}

static void c_two_sequential(struct fx *f)
{
    struct cli c;
    if (cli_connect(&c, f->port)) return;
    cli_send(&c, "GET /one HTTP/1.1\r\nHost: t\r\n\r\n");
    f->rc[0] = cli_response(&c, false, &f->r[0]);
    cli_send(&c, "GET /two HTTP/1.1\r\nHost: t\r\nX-Test: a\r\nX-Test: b\r\n\r\n");
    f->rc[1] = cli_response(&c, false, &f->r[1]);
    cli_close(&c);
}

static void keep_alive_serves_two_sequential_requests_on_one_connection(void **state)
{
    struct fx *f = fx_new(c_two_sequential, h_echo);
    fx_run(f);
    assert_int_equal(f->rc[0], 0);
    assert_string_equal(f->r[0].body, "GET /one ");
    assert_int_equal(f->rc[1], 0);
    assert_string_equal(f->r[1].body, "GET /two ");
    assert_int_equal(f->calls, 2);
    /* Repeated headers stay separate entries; lookup finds the first. */
    assert_int_equal(f->n_hdr_x[1], 2);
    assert_string_equal(f->hdr_x[1], "a");
    free(f);
}

static void c_pipelined(struct fx *f)
{
    struct cli c;
    if (cli_connect(&c, f->port)) return;
    cli_send(&c, "GET /async-a HTTP/1.1\r\nHost: t\r\n\r\nGET /b HTTP/1.1\r\nHost: t\r\n\r\n"
                 "GET /async-c HTTP/1.1\r\nHost: t\r\n\r\n");
    for (int i = 0; i < 3; i++) f->rc[i] = cli_response(&c, false, &f->r[i]);
    cli_close(&c);
}

static void pipelined_requests_get_responses_in_order(void **state)
{
    struct fx *f = fx_new(c_pipelined, h_mixed);
    fx_run(f);
    assert_int_equal(f->rc[0], 0);
    assert_string_equal(f->r[0].body, "GET /async-a ");
    assert_int_equal(f->rc[1], 0);
    assert_string_equal(f->r[1].body, "GET /b ");
    assert_int_equal(f->rc[2], 0);
    assert_string_equal(f->r[2].body, "GET /async-c ");
    free(f);
}

static void c_async(struct fx *f)
{
    struct cli c;
    if (cli_connect(&c, f->port)) return;
    cli_send(&c, "GET /async?q HTTP/1.1\r\nHost: t\r\n\r\n");
    f->rc[0] = cli_response(&c, false, &f->r[0]);
    cli_send(&c, "HEAD /async HTTP/1.1\r\nHost: t\r\n\r\n");
    f->rc[1] = cli_response(&c, true, &f->r[1]);
    cli_send(&c, "GET /async2 HTTP/1.1\r\nHost: t\r\n\r\n");
    f->rc[2] = cli_response(&c, false, &f->r[2]);
    cli_close(&c);
}

static void handler_that_answers_asynchronously_works(void **state)
{
    struct fx *f = fx_new(c_async, h_async);
    fx_run(f);
    assert_int_equal(f->rc[0], 0);
    assert_string_equal(f->r[0].body, "GET /async q");
    assert_int_equal(f->rc[1], 0);
    assert_int_equal(f->r[1].clen, (long long)strlen("HEAD /async "));
    assert_int_equal(f->rc[2], 0);
    assert_string_equal(f->r[2].body, "GET /async2 ");
    free(f);
}

/* 2000 pipelined requests in one send, each answered asynchronously: parsing pauses per
 * exchange and the socket stops being read while the buffer is full. */
static void c_flood(struct fx *f)
{
    struct cli c;
    if (cli_connect(&c, f->port)) return;
    enum { N = 2000 };
    size_t cap = (size_t)N * 64, len = 0;
    char *all = malloc(cap);
    if (!all) return;
    for (int i = 0; i < N; i++)
        len += (size_t)snprintf(all + len, cap - len, "GET /p%d HTTP/1.1\r\nHost: t\r\n\r\n", i);
    cli_send_n(&c, all, len);
    free(all);
    f->first_bad = -1;
    for (int i = 0; i < N; i++) {
        struct resp r;
        char want[64];
        snprintf(want, sizeof want, "GET /p%d ", i);
        if (cli_response(&c, false, &r) || strcmp(r.body, want) != 0) {
            f->first_bad = i;
            break;
        }
        f->n_ok++;
    }
    cli_close(&c);
}

static void a_pipelined_flood_is_answered_in_order(void **state)
{
    struct fx *f = fx_new(c_flood, h_async);
    fx_run(f);
    assert_int_equal(f->first_bad, -1);
    assert_int_equal(f->n_ok, 2000);
    assert_int_equal(f->calls, 2000);
    free(f);
}

/* 64 KiB bodies to a client that sends 100 requests before reading any response: the
 * server stops parsing while a lot is queued and resumes as the client reads. */
static char big_body[64 * 1024];

static void h_big(struct fx *f, struct am_http_exchange *ex)
{
    assert_int_equal(am_http_respond(ex, 200, NULL, NULL, 0, big_body, sizeof big_body), 0);
}

static void c_late_reader(struct fx *f)
{
    struct cli c;
    if (cli_connect(&c, f->port)) return;
    for (int i = 0; i < 100; i++) cli_send(&c, "GET /big HTTP/1.1\r\nHost: t\r\n\r\n");
    f->first_bad = -1;
    for (int i = 0; i < 100; i++) {
        struct resp r;
        if (cli_response(&c, false, &r) || r.body_len != sizeof big_body ||
            memcmp(r.body, big_body, sizeof r.body - 1) != 0) {
            f->first_bad = i;
            break;
        }
        f->n_ok++;
    }
    cli_close(&c);
}

static void pipelined_requests_are_answered_when_the_client_reads_late(void **state)
{
    for (size_t i = 0; i < sizeof big_body; i++) big_body[i] = (char)('a' + i % 26);
    struct fx *f = fx_new(c_late_reader, h_big);
    fx_run(f);
    assert_int_equal(f->first_bad, -1);
    assert_int_equal(f->n_ok, 100);
    free(f);
}

/* --- streaming ----------------------------------------------------------------------- */

static void h_stream(struct fx *f, struct am_http_exchange *ex)
{
    static const struct am_http_header ct = {"Content-Type", 12, "text/plain", 10};
    assert_int_equal(am_http_start(ex, 200, NULL, &ct, 1, 11), 0);
    assert_int_equal(am_http_write(ex, "hello ", 6), 0);
    assert_int_equal(am_http_write(ex, "world", 5), 0);
    assert_int_equal(am_http_write(ex, "!", 1), AM_EINVAL); /* beyond Content-Length */
    assert_int_equal(am_http_end(ex), 0);
}

static void c_stream(struct fx *f)
{
    struct cli c;
    if (cli_connect(&c, f->port)) return;
    cli_send(&c, "GET /s HTTP/1.1\r\nHost: t\r\n\r\n");
    f->rc[0] = cli_response(&c, false, &f->r[0]);
    cli_send(&c, "HEAD /s HTTP/1.1\r\nHost: t\r\n\r\n");
    f->rc[1] = cli_response(&c, true, &f->r[1]);
    cli_send(&c, "GET /s HTTP/1.1\r\nHost: t\r\n\r\n");
    f->rc[2] = cli_response(&c, false, &f->r[2]);
    cli_close(&c);
}

static void streaming_start_write_end_with_content_length(void **state)
{
    struct fx *f = fx_new(c_stream, h_stream);
    fx_run(f);
    assert_int_equal(f->rc[0], 0);
    assert_int_equal(f->r[0].clen, 11);
    assert_string_equal(f->r[0].body, "hello world");
    assert_non_null(strstr(f->r[0].head, "\r\nContent-Type: text/plain\r\n"));
    assert_int_equal(f->rc[1], 0); /* HEAD: head only, writes discarded */
    assert_int_equal(f->r[1].clen, 11);
    assert_int_equal(f->rc[2], 0);
    assert_string_equal(f->r[2].body, "hello world");
    free(f);
}

/* Writes 1 MiB chunks until the kernel refuses some (the client is not reading yet),
 * then continues from on_drain. */
#define DRAIN_TOTAL (64ull * 1024 * 1024)
static char chunk[1024 * 1024];

static void pump(struct fx *f)
{
    struct am_http_exchange *ex = f->held;
    while (f->stream_written < f->stream_total && am_http_queued(ex) == 0) {
        assert_int_equal(am_http_write(ex, chunk, sizeof chunk), 0);
        f->stream_written += sizeof chunk;
    }
    if (f->stream_written == f->stream_total && am_http_queued(ex) == 0) {
        f->end_rc = am_http_end(ex);
        f->held = NULL;
    }
}

static void on_pump_drain(void *arg)
{
    struct fx *f = arg;
    f->drains++;
    if (f->held) pump(f);
}

static void on_gone_count(void *arg)
{
    struct fx *f = arg;
    f->gone++;
    f->gone_before_drain = !f->drain_called;
    f->held = NULL;
    if (f->wait_gone && f->client_done) {
        if (f->watchdog_on) {
            uv_close((uv_handle_t *)&f->watchdog, NULL);
            f->watchdog_on = false;
        }
        fx_drain(f);
    }
}

static void h_drain(struct fx *f, struct am_http_exchange *ex)
{
    assert_int_equal(am_http_start(ex, 200, NULL, NULL, 0, DRAIN_TOTAL), 0);
    am_http_set_callbacks(ex, on_pump_drain, on_gone_count, f);
    f->held = ex;
    f->stream_total = DRAIN_TOTAL;
    pump(f);
    assert_true(am_http_queued(ex) > 0);
    uv_sem_post(&f->sem); /* now the client may read */
}

static void c_drain(struct fx *f)
{
    struct cli c;
    if (cli_connect(&c, f->port)) return;
    cli_send(&c, "GET /big HTTP/1.1\r\nHost: t\r\n\r\n");
    uv_sem_wait(&f->sem);
    f->rc[0] = cli_response(&c, false, &f->r[0]);
    f->big_read = f->r[0].body_len;
    cli_close(&c);
}

static void on_drain_is_called_after_queued_bytes_flush(void **state)
{
    struct fx *f = fx_new(c_drain, h_drain);
    f->use_sem = true;
    fx_run(f);
    assert_int_equal(f->rc[0], 0);
    assert_int_equal(f->r[0].clen, (long long)DRAIN_TOTAL);
    assert_int_equal(f->big_read, DRAIN_TOTAL);
    assert_true(f->drains >= 1);
    assert_int_equal(f->end_rc, 0);
    assert_int_equal(f->gone, 0);
    free(f);
}

static void h_stream_forever(struct fx *f, struct am_http_exchange *ex)
{
    assert_int_equal(am_http_start(ex, 200, NULL, NULL, 0, 1000), 0);
    am_http_set_callbacks(ex, NULL, on_gone_count, f);
    assert_int_equal(am_http_write(ex, "0123456789", 10), 0);
    f->held = ex; /* never finished: the client leaves */
}

static void c_leave_mid_body(struct fx *f)
{
    struct cli c;
    if (cli_connect(&c, f->port)) return;
    cli_send(&c, "GET /forever HTTP/1.1\r\nHost: t\r\n\r\n");
    while (!memmem(c.buf, c.len, "0123456789", 10))
        if (cli_fill(&c) <= 0) break;
    f->rc[0] = memmem(c.buf, c.len, "0123456789", 10) ? 0 : -1;
    cli_close(&c);
}

static void client_disconnect_during_streaming_calls_on_gone(void **state)
{
    struct fx *f = fx_new(c_leave_mid_body, h_stream_forever);
    f->wait_gone = true;
    fx_run(f);
    assert_int_equal(f->rc[0], 0);
    assert_int_equal(f->gone, 1);
    assert_true(f->gone_before_drain);
    free(f);
}

static void h_short(struct fx *f, struct am_http_exchange *ex)
{
    assert_int_equal(am_http_start(ex, 200, NULL, NULL, 0, 10), 0);
    assert_int_equal(am_http_write(ex, "12345", 5), 0);
    f->end_rc = am_http_end(ex);
}

static void c_short(struct fx *f)
{
    struct cli c;
    if (cli_connect(&c, f->port)) return;
    cli_send(&c, "GET /short HTTP/1.1\r\nHost: t\r\n\r\n");
    f->rc[0] = cli_response(&c, false, &f->r[0]);
    f->eof[0] = cli_eof(&c, &f->extra[0]);
    cli_close(&c);
}

static void ending_a_short_body_closes_the_connection(void **state)
{
    struct fx *f = fx_new(c_short, h_short);
    fx_run(f);
    assert_int_equal(f->end_rc, AM_EIO);
    assert_int_equal(f->rc[0], -1); /* the client sees an incomplete response */
    assert_int_equal(f->r[0].body_len, 5);
    assert_true(f->eof[0]);
    assert_int_equal(f->extra[0], 0);
    free(f);
}

/* --- refused requests ---------------------------------------------------------------- */

/* Sends raw bytes, reads one response and then expects the server to close. */
static void exchange_and_eof(struct fx *f, int i, const char *raw, size_t len)
{
    struct cli c;
    if (cli_connect(&c, f->port)) return;
    cli_send_n(&c, raw, len);
    f->rc[i] = cli_response(&c, false, &f->r[i]);
    f->eof[i] = cli_eof(&c, &f->extra[i]);
    cli_close(&c);
}

static void c_oversized(struct fx *f)
{
    static char raw[20000];
    int n = snprintf(raw, sizeof raw, "GET / HTTP/1.1\r\nHost: t\r\nX-Big: ");
    memset(raw + n, 'a', 12000);
    memcpy(raw + n + 12000, "\r\n\r\n", 4);
    exchange_and_eof(f, 0, raw, (size_t)n + 12004);
    struct cli c;
    if (cli_connect(&c, f->port)) return;
    cli_send(&c, "GET /next HTTP/1.1\r\nHost: t\r\n\r\n");
    f->rc[1] = cli_response(&c, false, &f->r[1]);
    cli_close(&c);
}

static void assert_refused(struct fx *f, int i, int status, const char *code)
{
    assert_int_equal(f->rc[i], 0);
    assert_int_equal(f->r[i].status, status);
    assert_non_null(strstr(f->r[i].head, "\r\nConnection: close\r\n"));
    assert_non_null(strstr(f->r[i].head, "\r\nContent-Type: application/json\r\n"));
    assert_non_null(strstr(f->r[i].body, "{\"errors\":[{\"code\":\""));
    if (code) assert_non_null(strstr(f->r[i].body, code));
    assert_true(f->eof[i]);
    assert_int_equal(f->extra[i], 0);
}

static void oversized_head_gets_431_and_server_still_serves_a_new_connection(void **state)
{
    struct fx *f = fx_new(c_oversized, h_echo);
    fx_run(f);
    assert_refused(f, 0, 431, NULL);
    assert_int_equal(f->rc[1], 0);
    assert_int_equal(f->r[1].status, 200);
    assert_string_equal(f->r[1].body, "GET /next ");
    assert_int_equal(f->calls, 1);
    free(f);
}

static void c_many_headers(struct fx *f)
{
    char raw[2048];
    size_t n = (size_t)snprintf(raw, sizeof raw, "GET / HTTP/1.1\r\nHost: t\r\n");
    for (int i = 0; i < 10; i++) n += (size_t)snprintf(raw + n, sizeof raw - n, "X-H%d: v\r\n", i);
    n += (size_t)snprintf(raw + n, sizeof raw - n, "\r\n");
    exchange_and_eof(f, 0, raw, n);
}

static void too_many_headers_gets_431(void **state)
{
    struct fx *f = fx_new(c_many_headers, h_echo);
    f->opts.max_headers = 4;
    fx_run(f);
    assert_refused(f, 0, 431, NULL);
    assert_int_equal(f->calls, 0);
    free(f);
}

#define RAW(s) (s), (sizeof(s) - 1)

static void c_bare_cr(struct fx *f)
{
    exchange_and_eof(f, 0, RAW("GET / HTTP/1.1\r\nHost: t\r\nX-A: a\rb\r\n\r\n"));
    exchange_and_eof(f, 1, RAW("GET / HTTP/1.1\rHost: t\r\n\r\n"));
}

static void bare_cr_gets_400(void **state)
{
    struct fx *f = fx_new(c_bare_cr, h_echo);
    fx_run(f);
    assert_refused(f, 0, 400, NULL);
    assert_refused(f, 1, 400, NULL);
    assert_int_equal(f->calls, 0);
    free(f);
}

static void c_cl_te(struct fx *f)
{
    exchange_and_eof(f, 0,
                     RAW("POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n"
                         "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"));
    exchange_and_eof(f, 1,
                     RAW("POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n"
                         "Content-Length: 5\r\n\r\n0\r\n\r\n"));
}

static void content_length_with_transfer_encoding_gets_400(void **state)
{
    struct fx *f = fx_new(c_cl_te, h_echo);
    fx_run(f);
    assert_refused(f, 0, 400, NULL);
    assert_refused(f, 1, 400, NULL);
    assert_int_equal(f->calls, 0);
    free(f);
}

static void c_dup_cl(struct fx *f)
{
    exchange_and_eof(f, 0,
                     RAW("POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n"
                         "Content-Length: 3\r\n\r\nabc"));
    exchange_and_eof(f, 1,
                     RAW("POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n"
                         "Content-Length: 4\r\n\r\nabcd"));
}

static void duplicate_content_length_gets_400(void **state)
{
    struct fx *f = fx_new(c_dup_cl, h_echo);
    fx_run(f);
    assert_refused(f, 0, 400, NULL);
    assert_refused(f, 1, 400, NULL);
    assert_int_equal(f->calls, 0);
    free(f);
}

static void c_malformed(struct fx *f)
{
    exchange_and_eof(f, 0, RAW("GET foo HTTP/1.1\r\nHost: t\r\n\r\n"));
    exchange_and_eof(f, 1, RAW("GET / HTTP/1.1\r\n\r\n"));
    exchange_and_eof(f, 2, RAW("GET / HTTP/1.1\r\nHost: t\r\nX-A: a\r\n  folded\r\n\r\n"));
    exchange_and_eof(f, 3, RAW("G@T / HTTP/1.1\r\nHost: t\r\n\r\n"));
}

static void malformed_requests_get_400(void **state)
{
    /* target without '/', HTTP/1.1 without Host, obs-fold, a bad method token */
    struct fx *f = fx_new(c_malformed, h_echo);
    fx_run(f);
    for (int i = 0; i < 4; i++) assert_refused(f, i, 400, NULL);
    assert_int_equal(f->calls, 0);
    free(f);
}

static void c_slow_head(struct fx *f)
{
    exchange_and_eof(f, 0, RAW("GET / HTTP/1.1\r\nHost: t\r\n"));
}

static void header_timeout_gets_408(void **state)
{
    struct fx *f = fx_new(c_slow_head, h_echo);
    f->opts.header_timeout_ms = 50;
    fx_run(f);
    assert_refused(f, 0, 408, NULL);
    assert_int_equal(f->calls, 0);
    free(f);
}

static void c_idle(struct fx *f)
{
    struct cli c;
    if (cli_connect(&c, f->port)) return;
    cli_send(&c, "GET / HTTP/1.1\r\nHost: t\r\n\r\n");
    f->rc[0] = cli_response(&c, false, &f->r[0]);
    f->eof[0] = cli_eof(&c, &f->extra[0]);
    cli_close(&c);
}

static void idle_keep_alive_connection_is_closed_silently(void **state)
{
    struct fx *f = fx_new(c_idle, h_echo);
    f->opts.idle_timeout_ms = 50;
    fx_run(f);
    assert_int_equal(f->rc[0], 0);
    assert_int_equal(f->r[0].status, 200);
    assert_true(f->eof[0]);
    assert_int_equal(f->extra[0], 0);
    free(f);
}

static void c_max_conn(struct fx *f)
{
    struct cli a, b;
    if (cli_connect(&a, f->port)) return;
    cli_send(&a, "GET /a HTTP/1.1\r\nHost: t\r\n\r\n");
    f->rc[0] = cli_response(&a, false, &f->r[0]);
    if (cli_connect(&b, f->port) == 0) {
        cli_send(&b, "GET /b HTTP/1.1\r\nHost: t\r\n\r\n");
        f->rc[1] = cli_response(&b, false, &f->r[1]);
        f->eof[1] = cli_eof(&b, &f->extra[1]);
        cli_close(&b);
    }
    cli_send(&a, "GET /a2 HTTP/1.1\r\nHost: t\r\n\r\n");
    f->rc[2] = cli_response(&a, false, &f->r[2]);
    cli_close(&a);
}

static void max_connections_1_gives_503_to_a_second_concurrent_connection(void **state)
{
    struct fx *f = fx_new(c_max_conn, h_echo);
    f->opts.max_connections = 1;
    fx_run(f);
    assert_int_equal(f->rc[0], 0);
    assert_int_equal(f->r[0].status, 200);
    assert_refused(f, 1, 503, "\"UNAVAILABLE\"");
    assert_int_equal(f->rc[2], 0);
    assert_string_equal(f->r[2].body, "GET /a2 ");
    assert_int_equal(f->calls, 2);
    free(f);
}

/* --- bodies -------------------------------------------------------------------------- */

static void h_refuse_writes(struct fx *f, struct am_http_exchange *ex)
{
    const struct am_http_request *req = am_http_request_of(ex);
    if (strcmp(req->method, "GET") == 0)
        respond_echo(ex);
    else
        assert_int_equal(am_http_respond_error(ex, AM_EUNSUPPORTED, NULL, NULL, NULL, 0), 0);
}

static void c_put(struct fx *f)
{
    struct cli c;
    if (cli_connect(&c, f->port)) return;
    static char raw[6000];
    int n =
        snprintf(raw, sizeof raw, "PUT /up HTTP/1.1\r\nHost: t\r\nContent-Length: 5000\r\n\r\n");
    memset(raw + n, 'G', 5000); /* looks like requests if it were parsed as such */
    cli_send_n(&c, raw, (size_t)n + 5000);
    f->rc[0] = cli_response(&c, false, &f->r[0]);
    cli_send(&c, "POST /up HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                 "5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n");
    f->rc[1] = cli_response(&c, false, &f->r[1]);
    cli_send(&c, "GET /after HTTP/1.1\r\nHost: t\r\n\r\n");
    f->rc[2] = cli_response(&c, false, &f->r[2]);
    cli_close(&c);
}

static void put_with_body_gets_handler_response_and_body_is_discarded(void **state)
{
    struct fx *f = fx_new(c_put, h_refuse_writes);
    fx_run(f);
    assert_int_equal(f->rc[0], 0);
    assert_int_equal(f->r[0].status, 405);
    assert_non_null(strstr(f->r[0].body, "\"UNSUPPORTED\""));
    assert_null(strstr(f->r[0].head, "Connection: close"));
    assert_int_equal(f->rc[1], 0);
    assert_int_equal(f->r[1].status, 405);
    assert_int_equal(f->rc[2], 0);
    assert_string_equal(f->r[2].body, "GET /after ");
    assert_int_equal(f->calls, 3);
    assert_string_equal(f->methods[0], "PUT");
    assert_string_equal(f->methods[1], "POST");
    free(f);
}

/* "<len>:<first 64 bytes>" of the request body; checks its NUL terminator. */
static void respond_body(struct am_http_exchange *ex)
{
    size_t len = 12345;
    const char *b = am_http_req_body(ex, &len);
    assert_non_null(b);
    assert_int_equal(b[len], '\0');
    assert_ptr_equal(am_http_req_body(ex, NULL), b);
    char out[128];
    size_t n = (size_t)snprintf(out, sizeof out, "%zu:", len), k = len < 64 ? len : 64;
    memcpy(out + n, b, k); /* not %.*s: a body may hold NULs */
    assert_int_equal(am_http_respond(ex, 200, NULL, NULL, 0, out, n + k), 0);
}

struct body_later {
    uv_timer_t t;
    struct am_http_exchange *ex;
};

static void on_body_later(uv_timer_t *t)
{
    struct body_later *l = t->data;
    respond_body(l->ex); /* the body is still there while the exchange is ours */
    uv_close((uv_handle_t *)&l->t, on_later_closed);
}

/* "/later" answers from a 0 ms timer, everything else at once. */
static void h_body(struct fx *f, struct am_http_exchange *ex)
{
    if (strcmp(am_http_request_of(ex)->path, "/later") != 0) {
        respond_body(ex);
        return;
    }
    struct body_later *l = calloc(1, sizeof *l);
    assert_non_null(l);
    l->ex = ex;
    uv_timer_init(&f->loop, &l->t);
    l->t.data = l;
    uv_timer_start(&l->t, on_body_later, 0, 0);
}

static char big_req[700000];

static void c_bodies(struct fx *f)
{
    struct cli c;
    if (cli_connect(&c, f->port)) return;
    cli_send(&c, "POST /b HTTP/1.1\r\nHost: t\r\nContent-Length: 11\r\n\r\nhello world");
    f->rc[0] = cli_response(&c, false, &f->r[0]);
    cli_send(&c, "POST /later HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                 "5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n");
    f->rc[1] = cli_response(&c, false, &f->r[1]);
    /* A request without a body after ones with: nothing of theirs is left over. */
    cli_send(&c, "GET /b HTTP/1.1\r\nHost: t\r\n\r\n");
    f->rc[2] = cli_response(&c, false, &f->r[2]);
    char head[128];
    int n = snprintf(head, sizeof head, "PUT /b HTTP/1.1\r\nHost: t\r\nContent-Length: %zu\r\n\r\n",
                     sizeof big_req);
    cli_send_n(&c, head, (size_t)n);
    cli_send_n(&c, big_req, sizeof big_req);
    f->rc[3] = cli_response(&c, false, &f->r[3]);
    /* Pipelined: two bodies in one write, each seen by its own request only. */
    cli_send(&c, "POST /b HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\none"
                 "POST /later HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nthree"
                 "POST /b HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n");
    f->rc[4] = cli_response(&c, false, &f->r[4]);
    f->rc[5] = cli_response(&c, false, &f->r[5]);
    f->rc[6] = cli_response(&c, false, &f->r[6]);
    cli_close(&c);
}

static void request_bodies_are_kept_for_the_handler_until_the_exchange_ends(void **state)
{
    for (size_t i = 0; i < sizeof big_req; i++) big_req[i] = (char)('A' + i % 23);
    big_req[5] = '\0'; /* bodies are bytes, not strings */
    struct fx *f = fx_new(c_bodies, h_body);
    fx_run(f);
    for (int i = 0; i < 7; i++) {
        assert_int_equal(f->rc[i], 0);
        assert_int_equal(f->r[i].status, 200);
    }
    assert_string_equal(f->r[0].body, "11:hello world");
    assert_string_equal(f->r[1].body, "11:hello world");
    assert_string_equal(f->r[2].body, "0:");
    assert_int_equal(f->r[3].body_len, strlen("700000:") + 64);
    assert_memory_equal(f->r[3].body, "700000:ABCDE\0GHIJ", 17);
    assert_string_equal(f->r[4].body, "3:one");
    assert_string_equal(f->r[5].body, "5:three");
    assert_string_equal(f->r[6].body, "0:");
    assert_int_equal(f->calls, 7);
    free(f);
}

static void c_huge_body(struct fx *f)
{
    exchange_and_eof(f, 0, RAW("PUT /up HTTP/1.1\r\nHost: t\r\nContent-Length: 2000000\r\n\r\n"));
    /* A chunked body is only known to be too large while it is read. */
    struct cli c;
    if (cli_connect(&c, f->port)) return;
    size_t total = 1200 * 1024, len = 0;
    char *raw = malloc(total + 128 * 1024); /* chunk framing on top of total */
    if (!raw) return;
    len +=
        (size_t)sprintf(raw, "POST /up HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n");
    for (size_t sent = 0; sent < total; sent += 65536) {
        len += (size_t)sprintf(raw + len, "10000\r\n");
        memset(raw + len, 'x', 65536);
        len += 65536;
        len += (size_t)sprintf(raw + len, "\r\n");
    }
    cli_send_n(&c, raw, len);
    free(raw);
    f->rc[1] = cli_response(&c, false, &f->r[1]);
    f->eof[1] = cli_eof(&c, &f->extra[1]);
    cli_close(&c);
}

static void request_body_over_1_mib_gets_413(void **state)
{
    struct fx *f = fx_new(c_huge_body, h_refuse_writes);
    fx_run(f);
    assert_refused(f, 0, 413, NULL);
    assert_refused(f, 1, 413, NULL);
    assert_int_equal(f->calls, 0);
    free(f);
}

static void c_endless_trailers(struct fx *f)
{
    struct cli c;
    if (cli_connect(&c, f->port)) return;
    /* A chunked body, then trailer fields well past the 8 KiB head limit. */
    size_t cap = 64 * 1024, len = 0;
    char *raw = malloc(cap);
    if (!raw) return;
    len += (size_t)sprintf(raw, "POST /up HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n"
                                "\r\n0\r\n");
    for (int i = 0; len < cap - 64; i++)
        len += (size_t)sprintf(raw + len, "X-T%d: %040d\r\n", i, i);
    cli_send_n(&c, raw, len);
    free(raw);
    f->rc[0] = cli_response(&c, false, &f->r[0]);
    f->eof[0] = cli_eof(&c, &f->extra[0]);
    cli_close(&c);
}

static void endless_trailer_fields_get_431(void **state)
{
    struct fx *f = fx_new(c_endless_trailers, h_echo);
    fx_run(f);
    assert_refused(f, 0, 431, NULL);
    assert_int_equal(f->calls, 0);
    free(f);
}

/* --- HTTP/1.0 ------------------------------------------------------------------------ */

static void c_http10(struct fx *f)
{
    struct cli c;
    if (cli_connect(&c, f->port)) return;
    cli_send(&c, "GET /old HTTP/1.0\r\n\r\n");
    f->rc[0] = cli_response(&c, false, &f->r[0]);
    f->eof[0] = cli_eof(&c, &f->extra[0]);
    cli_close(&c);
    if (cli_connect(&c, f->port)) return;
    cli_send(&c, "GET /ka HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
    f->rc[1] = cli_response(&c, false, &f->r[1]);
    cli_send(&c, "GET /ka2 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    f->rc[2] = cli_response(&c, false, &f->r[2]);
    f->eof[2] = cli_eof(&c, &f->extra[2]);
    cli_close(&c);
}

static void http_1_0_without_keep_alive_closes_after_response(void **state)
{
    struct fx *f = fx_new(c_http10, h_echo);
    fx_run(f);
    assert_int_equal(f->rc[0], 0);
    assert_string_equal(f->r[0].body, "GET /old ");
    assert_non_null(strstr(f->r[0].head, "\r\nConnection: close\r\n"));
    assert_true(f->eof[0]);
    assert_int_equal(f->extra[0], 0);
    /* HTTP/1.0 keep-alive is answered explicitly; "Connection: close" is honoured. */
    assert_int_equal(f->rc[1], 0);
    assert_non_null(strstr(f->r[1].head, "\r\nConnection: keep-alive\r\n"));
    assert_int_equal(f->rc[2], 0);
    assert_string_equal(f->r[2].body, "GET /ka2 ");
    assert_non_null(strstr(f->r[2].head, "\r\nConnection: close\r\n"));
    assert_true(f->eof[2]);
    free(f);
}

/* --- response heads ------------------------------------------------------------------ */

static void h_reason(struct fx *f, struct am_http_exchange *ex)
{
    const struct am_http_request *req = am_http_request_of(ex);
    if (strcmp(req->path, "/plain") == 0) {
        assert_int_equal(am_http_respond(ex, 502, "upstream said: Too Slow", NULL, 0, "x", 1), 0);
    } else if (strcmp(req->path, "/evil") == 0) {
        assert_int_equal(
            am_http_respond(ex, 200, "Bad\r\nX-Injected: 1\x01\xc3\xa9", NULL, 0, "x", 1), 0);
    } else {
        struct am_http_header h[] = {
            {"X-Relay", 7, "a\r\nX-Injected: 2", 16},
            {"Bad Name", 8, "v", 1},
            {"Content-Length", 14, "999", 3},
            {"X-Ok", 4, "fine", 4},
        };
        assert_int_equal(am_http_respond(ex, 404, NULL, h, 4, "x", 1), 0);
    }
}

static void c_reason(struct fx *f)
{
    struct cli c;
    if (cli_connect(&c, f->port)) return;
    cli_send(&c, "GET /plain HTTP/1.1\r\nHost: t\r\n\r\n");
    f->rc[0] = cli_response(&c, false, &f->r[0]);
    cli_send(&c, "GET /evil HTTP/1.1\r\nHost: t\r\n\r\n");
    f->rc[1] = cli_response(&c, false, &f->r[1]);
    cli_send(&c, "GET /headers HTTP/1.1\r\nHost: t\r\n\r\n");
    f->rc[2] = cli_response(&c, false, &f->r[2]);
    cli_close(&c);
}

static void custom_reason_phrase_appears_verbatim_and_cr_lf_are_sanitised(void **state)
{
    struct fx *f = fx_new(c_reason, h_reason);
    fx_run(f);
    assert_int_equal(f->rc[0], 0);
    assert_int_equal(strncmp(f->r[0].head, "HTTP/1.1 502 upstream said: Too Slow\r\n", 38), 0);
    assert_int_equal(f->rc[1], 0);
    assert_int_equal(strncmp(f->r[1].head, "HTTP/1.1 200 Bad??X-Injected: 1???\r\n", 36), 0);
    assert_null(strstr(f->r[1].head, "\r\nX-Injected"));
    assert_string_equal(f->r[1].body, "x");
    /* Handler header values cannot split the head; bad names and framing are dropped. */
    assert_int_equal(f->rc[2], 0);
    assert_int_equal(strncmp(f->r[2].head, "HTTP/1.1 404 Not Found\r\n", 24), 0);
    assert_non_null(strstr(f->r[2].head, "\r\nX-Relay: a  X-Injected: 2\r\n"));
    assert_null(strstr(f->r[2].head, "\r\nX-Injected"));
    assert_null(strstr(f->r[2].head, "Bad Name"));
    assert_null(strstr(f->r[2].head, "999"));
    assert_non_null(strstr(f->r[2].head, "\r\nContent-Length: 1\r\n"));
    assert_non_null(strstr(f->r[2].head, "\r\nX-Ok: fine\r\n"));
    assert_string_equal(f->r[2].body, "x");
    free(f);
}

/* --- drain --------------------------------------------------------------------------- */

static void h_drain_during(struct fx *f, struct am_http_exchange *ex)
{
    if (strcmp(am_http_request_of(ex)->path, "/slow") == 0) {
        fx_drain(f);
        answer_later(f, ex);
    } else {
        respond_echo(ex);
    }
}

static void c_drain_during(struct fx *f)
{
    struct cli idle, busy;
    if (cli_connect(&idle, f->port)) return;
    cli_send(&idle, "GET /first HTTP/1.1\r\nHost: t\r\n\r\n");
    f->rc[0] = cli_response(&idle, false, &f->r[0]);
    if (cli_connect(&busy, f->port) == 0) {
        cli_send(&busy, "GET /slow HTTP/1.1\r\nHost: t\r\n\r\n");
        f->rc[1] = cli_response(&busy, false, &f->r[1]);
        f->eof[1] = cli_eof(&busy, &f->extra[1]);
        cli_close(&busy);
    }
    f->eof[0] = cli_eof(&idle, &f->extra[0]); /* closed by the drain */
    cli_close(&idle);
}

static void drain_lets_an_active_exchange_finish_and_then_done_runs(void **state)
{
    struct fx *f = fx_new(c_drain_during, h_drain_during);
    fx_run(f); /* asserts done ran and the loop closes with no live handle */
    assert_int_equal(f->rc[0], 0);
    assert_true(f->eof[0]);
    assert_int_equal(f->extra[0], 0);
    assert_int_equal(f->rc[1], 0);
    assert_string_equal(f->r[1].body, "slow");
    assert_non_null(strstr(f->r[1].head, "\r\nConnection: close\r\n"));
    assert_true(f->eof[1]);
    assert_true(f->slow_responded_before_done);
    free(f);
}

static void h_hang(struct fx *f, struct am_http_exchange *ex)
{
    am_http_set_callbacks(ex, NULL, on_gone_count, f);
    f->held = ex;
    fx_drain(f);
}

static void c_hang(struct fx *f)
{
    struct cli c;
    if (cli_connect(&c, f->port)) return;
    cli_send(&c, "GET /hang HTTP/1.1\r\nHost: t\r\n\r\n");
    f->eof[0] = cli_eof(&c, &f->extra[0]);
    cli_close(&c);
}

static void drain_timeout_force_closes_and_calls_on_gone(void **state)
{
    struct fx *f = fx_new(c_hang, h_hang);
    f->opts.drain_timeout_ms = 50;
    fx_run(f);
    assert_true(f->eof[0]);
    assert_int_equal(f->extra[0], 0); /* nothing that could look like a response */
    assert_int_equal(f->gone, 1);
    assert_null(f->held);
    free(f);
}

/* --- listeners ----------------------------------------------------------------------- */

static void c_both(struct fx *f)
{
    struct cli c;
    if (cli_connect(&c, f->port) == 0) {
        cli_send(&c, "GET /v4 HTTP/1.1\r\nHost: t\r\n\r\n");
        f->rc[0] = cli_response(&c, false, &f->r[0]);
        cli_close(&c);
    }
    if (cli_connect6(&c, f->port6) == 0) {
        cli_send(&c, "GET /v6 HTTP/1.1\r\nHost: t\r\n\r\n");
        f->rc[1] = cli_response(&c, false, &f->r[1]);
        cli_close(&c);
    } else {
        f->rc[1] = -2;
    }
}

static bool have_ipv6_loopback(void)
{
    int fd = socket(AF_INET6, SOCK_STREAM, 0);
    if (fd < 0) return false;
    struct sockaddr_in6 s;
    memset(&s, 0, sizeof s);
    s.sin6_family = AF_INET6;
    s.sin6_addr = in6addr_loopback;
    bool ok = bind(fd, (struct sockaddr *)&s, sizeof s) == 0;
    close(fd);
    return ok;
}

static void serves_on_several_listeners_including_ipv6(void **state)
{
    if (!have_ipv6_loopback()) skip();
    struct fx *f = fx_new(c_both, h_echo);
    f->with_v6 = true;
    fx_run(f);
    assert_int_equal(f->rc[0], 0);
    assert_string_equal(f->r[0].body, "GET /v4 ");
    assert_int_equal(f->rc[1], 0);
    assert_string_equal(f->r[1].body, "GET /v6 ");
    free(f);
}

static void h_never(void *ctx, struct am_http_exchange *ex)
{
    fail();
}

static void listen_rejects_bad_addresses_and_reports_a_port_in_use(void **state)
{
    uv_loop_t loop;
    struct am_httpserver *srv;
    struct am_httpserver_opts o = default_opts();
    char msg[128], want[128];
    assert_int_equal(uv_loop_init(&loop), 0);
    assert_int_equal(am_httpserver_new(&loop, &o, h_never, NULL, &srv), 0);
    const char *bad[] = {"localhost:5000", "::1:5000",    "127.0.0.1", "127.0.0.1:99999",
                         "127.0.0.1:",     ":5000",       "[::1]5000", "[::1:5000",
                         "1.2.3:80",       "127.0.0.1:5x"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        assert_int_equal(am_httpserver_listen(srv, bad[i], msg, sizeof msg), AM_EINVAL);
        assert_non_null(strstr(msg, bad[i]));
    }
    assert_int_equal(am_httpserver_listen(srv, "127.0.0.1:0", msg, sizeof msg), 0);
    int port = am_httpserver_port(srv, 0);
    assert_true(port > 0);
    assert_int_equal(am_httpserver_port(srv, 1), AM_EINVAL);
    char hp[64];
    snprintf(hp, sizeof hp, "127.0.0.1:%d", port);
    assert_int_equal(am_httpserver_listen(srv, hp, msg, sizeof msg), AM_EIO);
    snprintf(want, sizeof want, "listen 127.0.0.1:%d: address already in use", port);
    assert_string_equal(msg, want);
    assert_int_equal(am_httpserver_port(srv, 1), AM_EINVAL);

    am_httpserver_drain(srv, NULL, NULL); /* closes the listener; done may be NULL */
    assert_int_equal(uv_run(&loop, UV_RUN_DEFAULT), 0);
    am_httpserver_free(srv);
    assert_int_equal(uv_loop_close(&loop), 0);
}

static void a_server_that_never_listened_can_be_freed_at_once(void **state)
{
    uv_loop_t loop;
    struct am_httpserver *srv;
    struct am_httpserver_opts o = default_opts();
    assert_int_equal(uv_loop_init(&loop), 0);
    assert_int_equal(am_httpserver_new(&loop, &o, h_never, NULL, &srv), 0);
    am_httpserver_free(srv);
    am_httpserver_free(NULL);
    assert_int_equal(uv_loop_close(&loop), 0);
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN);
    if (getenv("AM_TEST_DEBUG")) am_log_set_level(AM_LOG_DEBUG);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(serves_a_simple_get_and_head),
        cmocka_unit_test(keep_alive_serves_two_sequential_requests_on_one_connection),
        cmocka_unit_test(pipelined_requests_get_responses_in_order),
        cmocka_unit_test(handler_that_answers_asynchronously_works),
        cmocka_unit_test(a_pipelined_flood_is_answered_in_order),
        cmocka_unit_test(pipelined_requests_are_answered_when_the_client_reads_late),
        cmocka_unit_test(streaming_start_write_end_with_content_length),
        cmocka_unit_test(on_drain_is_called_after_queued_bytes_flush),
        cmocka_unit_test(client_disconnect_during_streaming_calls_on_gone),
        cmocka_unit_test(ending_a_short_body_closes_the_connection),
        cmocka_unit_test(oversized_head_gets_431_and_server_still_serves_a_new_connection),
        cmocka_unit_test(too_many_headers_gets_431),
        cmocka_unit_test(bare_cr_gets_400),
        cmocka_unit_test(content_length_with_transfer_encoding_gets_400),
        cmocka_unit_test(duplicate_content_length_gets_400),
        cmocka_unit_test(malformed_requests_get_400),
        cmocka_unit_test(header_timeout_gets_408),
        cmocka_unit_test(idle_keep_alive_connection_is_closed_silently),
        cmocka_unit_test(max_connections_1_gives_503_to_a_second_concurrent_connection),
        cmocka_unit_test(put_with_body_gets_handler_response_and_body_is_discarded),
        cmocka_unit_test(request_body_over_1_mib_gets_413),
        cmocka_unit_test(endless_trailer_fields_get_431),
        cmocka_unit_test(request_bodies_are_kept_for_the_handler_until_the_exchange_ends),
        cmocka_unit_test(http_1_0_without_keep_alive_closes_after_response),
        cmocka_unit_test(custom_reason_phrase_appears_verbatim_and_cr_lf_are_sanitised),
        cmocka_unit_test(drain_lets_an_active_exchange_finish_and_then_done_runs),
        cmocka_unit_test(drain_timeout_force_closes_and_calls_on_gone),
        cmocka_unit_test(serves_on_several_listeners_including_ipv6),
        cmocka_unit_test(listen_rejects_bad_addresses_and_reports_a_port_in_use),
        cmocka_unit_test(a_server_that_never_listened_can_be_freed_at_once),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

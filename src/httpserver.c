/*
 * httpserver — the HTTP/1.1 server; see include/archmirror/httpserver.h.
 *
 * DESIGN
 * Everything runs on one libuv loop. A connection owns one uv_tcp_t, one uv_timer_t
 * (used for exactly one purpose at a time: idle, header, body, linger or "resume
 * parsing"), a fixed read buffer and reusable buffers for the request head and the
 * response head, so a keep-alive connection serving small GETs allocates nothing per
 * request once warm. The exchange is embedded in the connection and reused.
 *
 * Request heads are checked by our own scanner before llhttp sees a byte: bare CR
 * (llhttp 8.1.0 predates the CVE-2023-30589 fix), obsolete line folding, the
 * max_header_bytes bound and the end of the head. Only then is the head fed to llhttp,
 * so its callbacks copy method, target and headers into the connection's head buffer.
 * on_message_complete pauses llhttp, which leaves pipelined bytes unread in the read
 * buffer; they are parsed once the handler's response is fully queued. While a handler
 * owns an exchange (or too many response bytes are queued) the socket stops being read
 * once half the read buffer is full.
 *
 * Writes try uv_try_write first and copy only what the kernel did not take into a write
 * request that lives until its callback. The handler is never called from inside an
 * llhttp callback, and ending an exchange never runs the next pipelined request's
 * handler on the caller's stack (it is deferred to a 0 ms timer unless the loop that
 * called the handler is still on the stack and picks it up).
 *
 * A connection is freed only after both its handles have closed and no handler holds
 * its exchange; on_gone is called from the close callback. This module must never
 * block, never let a client see a short body that looks complete, and never frame a
 * response with anything but Content-Length.
 */
#include "archmirror/httpserver.h"

#include <arpa/inet.h>
#include <assert.h>
#include <errno.h>
#include <llhttp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "archmirror/buf.h"
#include "archmirror/error.h"
#include "archmirror/log.h"
#include "archmirror/tls.h"

#define RBUF_SIZE                (16 * 1024)            /* per-connection read buffer */
#define MAX_BODY                 AM_HTTPSERVER_MAX_BODY /* request bodies are kept up to this */
#define BBUF_KEEP                (64 * 1024) /* a body buffer larger than this is freed after use */
#define OBUF_MAX                 (1024 * 1024) /* response head */
#define EBUF_MAX                 (64 * 1024)   /* OCI error body */
#define OUT_HIGH                 (1024 * 1024) /* queued response bytes that stop parsing */
#define REASON_MAX               256           /* custom reason phrase bytes kept (diagnostics) */
#define LINGER_MS                2000          /* reading after our FIN, so the client sees it */
#define WREQ_SMALL               4096          /* write requests at most this big are cached */
#define WREQ_CACHE               256
#define RBUF_CACHE               64 /* idle read buffers kept for reuse */
#define LISTEN_BACKLOG           1024
#define DEFAULT_MAX_HEADER_BYTES (16 * 1024)
#define DEFAULT_MAX_HEADERS      64

#define LIT(s) (s), (sizeof(s) - 1)

enum phase {
    PH_HEAD,    /* reading a request head (or waiting for one) */
    PH_BODY,    /* head complete, discarding the body */
    PH_ACTIVE,  /* the handler owns the exchange; parsing paused */
    PH_CLOSING, /* response queued; then shutdown, linger, close */
    PH_CLOSED,  /* uv_close called */
};

enum timer_kind { T_NONE, T_IDLE, T_HANDSHAKE, T_HEADER, T_BODY, T_LINGER, T_RESUME };

struct am_http_exchange {
    struct am_http_request req;
    bool owned;    /* the handler holds it */
    bool started;  /* am_http_start sent the head */
    bool bodyless; /* HEAD, 204, 304: body bytes are not sent */
    int status;
    uint64_t content_length;
    uint64_t written;
    uint64_t start_ns; /* uv_hrtime() when the handler got it, for on_complete */
    void (*on_drain)(void *arg);
    void (*on_gone)(void *arg);
    void *arg;
};

/* Offsets of one header inside the head buffer, which may move while it grows. */
struct hspan {
    size_t name_off, name_len, value_off, value_len;
};

struct conn {
    uv_tcp_t tcp;
    uv_timer_t timer;
    uv_shutdown_t shutdown_req;
    struct am_httpserver *srv; /* NULL for a zombie outliving the server */
    uv_loop_t *loop;
    struct conn *prev, *next;
    uint64_t id;
    uint64_t req_seq;
    int handles_open;
    enum phase phase;
    enum timer_kind timer_kind;
    bool rejected; /* over max_connections: 503 and close */
    bool counted;  /* counts toward max_connections */
    bool reading;
    bool eof;
    bool in_process;
    bool out_blocked; /* too many queued response bytes: parsing paused */
    bool shutting;
    bool in_gone;
    bool zombie;      /* handles closed, exchange still held by a handler without on_gone */
    bool close_after; /* close once the current response is queued */
    bool keep_alive;  /* of the current request */
    bool http10;
    char peer[64];

    /* request parsing */
    llhttp_t parser;
    uint64_t head_bytes;
    bool line_start;
    bool seen_content;
    int hstate; /* 0 between headers, 1 in a name, 2 in a value */
    bool url_started;
    bool headers_done;
    uint64_t trailer_bytes; /* trailer fields seen after a chunked body, discarded */
    bool msg_done;
    unsigned cl_count, te_count, host_count;
    uint64_t body_bytes;
    int err_status; /* set by a parser callback that refused the request */
    int err_code;
    const char *err_why;
    size_t method_len;
    size_t url_off, url_len;
    struct am_buf hbuf;
    struct am_buf bbuf; /* the request body, for am_http_req_body */
    struct hspan *spans;
    struct am_http_header *hdrs;
    size_t n_hdrs, cap_hdrs;

    /* response */
    struct am_buf obuf;
    struct am_buf ebuf;
    int out_err;
    size_t queued;
    unsigned writes_pending;

    struct am_http_exchange ex;

    /* Zero-copy bodies: sendfile(2) bypasses libuv's write queue, so libuv never says
     * when the socket is writable again; a poll on a dup of the socket does. */
    uv_poll_t *wpoll; /* owned; NULL until the first am_http_sendfile */
    int wpoll_fd;
    bool corked; /* TCP_CORK set for a sendfile body: full segments, uncorked at its end */

    /* TLS listeners: ciphertext is read into the server's shared cipher buffer, fed to
     * the session, and decrypted into rbuf as room allows; responses are encrypted in
     * conn_send. */
    struct am_tls *tls; /* owned; NULL on plain HTTP */
    bool tls_done;      /* handshake complete */
    bool tls_eof;       /* the client sent close_notify */

    size_t rpos, rlen; /* unconsumed bytes are rbuf[rpos, rlen) */
    char *rbuf;        /* RBUF_SIZE; held only while there is input (rbuf_get/_put) */
};

struct listener {
    uv_tcp_t tcp;
    struct am_httpserver *srv;
    int port;
    bool open;
};

struct wreq {
    uv_write_t req;
    struct conn *c;
    size_t len, cap;
    struct wreq *next_free;
    char data[];
};

struct am_httpserver {
    uv_loop_t *loop;
    struct am_httpserver_opts opts;
    am_http_handler_fn handler;
    void *ctx;
    llhttp_settings_t settings;

    struct listener **listeners;
    size_t n_listeners;
    size_t listeners_open;

    struct conn *conns; /* live connections and zombies */
    size_t n_live;      /* connections whose handles are not closed yet */
    uint64_t n_counted;
    uint64_t next_id;

    bool draining;
    bool drain_timer_open;
    bool drain_closing;
    uv_timer_t drain_timer;
    void (*done)(void *arg);
    void *done_arg;

    struct wreq *free_wreqs;
    size_t n_free_wreqs;

    time_t date_sec;
    char date[40];
    size_t date_len;

    struct am_tls_ctx *tls_ctx; /* owned; new connections speak TLS when set */
    char discard[RBUF_SIZE];    /* read target of closing connections */
    char cipher[RBUF_SIZE];     /* read target of TLS connections, fed at once */

    /* Read buffers of connections between requests go back here: an idle keep-alive
     * connection holds none (thousands of them stay small), a busy one reuses one. */
    void *free_rbufs; /* singly linked through each buffer's first bytes */
    size_t n_free_rbufs;
};

#define EX_CONN(ex) ((struct conn *)((char *)(ex)-offsetof(struct conn, ex)))

static void close_now(struct conn *c);
static void conn_closed(struct conn *c);
static void uncork(struct conn *c);
static void close_gracefully(struct conn *c);
static void process_input(struct conn *c);
static void update_reading(struct conn *c);

/* --- small helpers ------------------------------------------------------------------ */

static unsigned long long ull(uint64_t v)
{
    return (unsigned long long)v;
}

static const char *srv_date(struct am_httpserver *srv)
{
    time_t now = time(NULL);
    if (now != srv->date_sec || !srv->date_len) {
        am_http_date(srv->date, sizeof srv->date);
        srv->date_len = strlen(srv->date);
        srv->date_sec = now;
    }
    return srv->date;
}

static bool is_tchar(unsigned char ch)
{
    /* RFC 9110 §5.6.2 token characters. */
    if ((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9'))
        return true;
    return ch && strchr("!#$%&'*+-.^_`|~", ch) != NULL;
}

static void timer_stop(struct conn *c)
{
    if (c->timer_kind != T_NONE) uv_timer_stop(&c->timer);
    c->timer_kind = T_NONE;
}

static void on_conn_timer(uv_timer_t *t);

/* A timeout of 0 ms means "no timeout", except for T_RESUME. */
static void timer_start(struct conn *c, enum timer_kind kind, uint64_t ms)
{
    if (c->phase == PH_CLOSED) return;
    if (ms == 0 && kind != T_RESUME) {
        timer_stop(c);
        return;
    }
    c->timer_kind = kind;
    uv_timer_start(&c->timer, on_conn_timer, ms, 0);
}

/* --- writes ------------------------------------------------------------------------- */

static struct wreq *wreq_get(struct am_httpserver *srv, size_t len)
{
    struct wreq *w;
    if (len <= WREQ_SMALL && srv->free_wreqs) {
        w = srv->free_wreqs;
        srv->free_wreqs = w->next_free;
        srv->n_free_wreqs--;
    } else {
        size_t cap = len <= WREQ_SMALL ? WREQ_SMALL : len;
        w = malloc(sizeof *w + cap);
        if (!w) return NULL;
        w->cap = cap;
    }
    w->len = len;
    return w;
}

/* The connection's read buffer, taken from the cache or allocated; NULL when out of
 * memory. */
static char *rbuf_get(struct conn *c)
{
    struct am_httpserver *srv = c->srv;
    if (c->rbuf) return c->rbuf;
    if (srv && srv->free_rbufs) {
        c->rbuf = srv->free_rbufs;
        memcpy(&srv->free_rbufs, c->rbuf, sizeof(void *));
        srv->n_free_rbufs--;
    } else {
        c->rbuf = malloc(RBUF_SIZE);
    }
    c->rpos = c->rlen = 0;
    return c->rbuf;
}

/* Gives the read buffer back when nothing unparsed is left in it. */
static void rbuf_put(struct conn *c)
{
    struct am_httpserver *srv = c->srv;
    if (!c->rbuf || c->rpos != c->rlen) return;
    if (srv && srv->n_free_rbufs < RBUF_CACHE) {
        memcpy(c->rbuf, &srv->free_rbufs, sizeof(void *));
        srv->free_rbufs = c->rbuf;
        srv->n_free_rbufs++;
    } else {
        free(c->rbuf);
    }
    c->rbuf = NULL;
    c->rpos = c->rlen = 0;
}

static void wreq_put(struct am_httpserver *srv, struct wreq *w)
{
    if (srv && w->cap == WREQ_SMALL && srv->n_free_wreqs < WREQ_CACHE) {
        w->next_free = srv->free_wreqs;
        srv->free_wreqs = w;
        srv->n_free_wreqs++;
        return;
    }
    free(w);
}

static void on_write(uv_write_t *req, int status);

/* Sends bufs in order after anything already queued, copying what the kernel does not
 * take at once. Returns 0 or a libuv error (nothing was queued then). */
/* Queues w (its data: what the kernel did not take) after the writes in flight; w is
 * freed on failure or in on_write. Returns 0 or a libuv error. */
static int wreq_submit(struct conn *c, struct wreq *w)
{
    uv_buf_t b = uv_buf_init(w->data, (unsigned)w->len);
    int rc = uv_write(&w->req, (uv_stream_t *)&c->tcp, &b, 1, on_write);
    if (rc) {
        wreq_put(c->srv, w);
        return rc;
    }
    c->queued += w->len;
    c->writes_pending++;
    return 0;
}

/* Puts the session's waiting ciphertext on the wire (TLS). Returns 0 or a libuv error. */
static int tls_send(struct conn *c)
{
    size_t pend = am_tls_pending(c->tls);
    if (pend == 0) return 0;
    struct wreq *w = wreq_get(c->srv, pend);
    if (!w) return UV_ENOMEM;
    w->c = c;
    w->len = am_tls_take(c->tls, w->data, pend);
    size_t done = 0;
    if (c->writes_pending == 0) {
        uv_buf_t b = uv_buf_init(w->data, (unsigned)w->len);
        int n = uv_try_write((uv_stream_t *)&c->tcp, &b, 1);
        if (n >= 0) {
            done = (size_t)n;
        } else if (n != UV_EAGAIN) {
            wreq_put(c->srv, w);
            return n;
        }
    }
    if (done == w->len) {
        wreq_put(c->srv, w);
        return 0;
    }
    if (done) {
        memmove(w->data, w->data + done, w->len - done);
        w->len -= done;
    }
    return wreq_submit(c, w);
}

static int conn_send(struct conn *c, const uv_buf_t *bufs, unsigned nbufs)
{
    size_t total = 0, done = 0;
    if (c->tls) {
        char msg[160];
        for (unsigned i = 0; i < nbufs; i++) {
            if (!bufs[i].len) continue;
            int rc = am_tls_write(c->tls, bufs[i].base, bufs[i].len, msg, sizeof msg);
            if (rc) {
                AM_DEBUG("c%llu %s", ull(c->id), rc == AM_ENOMEM ? "out of memory" : msg);
                return rc == AM_ENOMEM ? UV_ENOMEM : UV_EPROTO;
            }
        }
        return tls_send(c);
    }
    for (unsigned i = 0; i < nbufs; i++) total += bufs[i].len;
    if (total == 0) return 0;
    if (c->writes_pending == 0) {
        int n = uv_try_write((uv_stream_t *)&c->tcp, bufs, nbufs);
        if (n >= 0)
            done = (size_t)n;
        else if (n != UV_EAGAIN)
            return n;
        if (done == total) return 0;
    }
    struct wreq *w = wreq_get(c->srv, total - done);
    if (!w) return UV_ENOMEM;
    w->c = c;
    size_t skip = done, at = 0;
    for (unsigned i = 0; i < nbufs; i++) {
        size_t len = bufs[i].len;
        if (skip >= len) {
            skip -= len;
            continue;
        }
        memcpy(w->data + at, bufs[i].base + skip, len - skip);
        at += len - skip;
        skip = 0;
    }
    return wreq_submit(c, w);
}

static void begin_shutdown(struct conn *c);

static void on_write(uv_write_t *req, int status)
{
    struct wreq *w = (struct wreq *)((char *)req - offsetof(struct wreq, req));
    struct conn *c = w->c;
    c->queued -= w->len;
    c->writes_pending--;
    wreq_put(c->srv, w);
    if (c->phase == PH_CLOSED) return;
    if (status < 0) {
        AM_DEBUG("c%llu write: %s", ull(c->id), uv_strerror(status));
        close_now(c);
        return;
    }
    if (c->phase == PH_CLOSING) {
        if (c->writes_pending == 0) begin_shutdown(c);
        return;
    }
    if (c->phase == PH_ACTIVE && c->ex.owned && c->ex.started && c->queued == 0 && c->ex.on_drain) {
        c->ex.on_drain(c->ex.arg); /* may end the exchange or close c (never frees it) */
        if (c->phase == PH_CLOSED || c->phase == PH_CLOSING) return;
    }
    if (c->out_blocked && c->queued <= OUT_HIGH / 2) {
        c->out_blocked = false;
        if (c->phase == PH_HEAD && c->rlen > c->rpos) process_input(c);
    }
    if (c->phase == PH_HEAD && c->writes_pending == 0 && c->head_bytes == 0 &&
        c->timer_kind == T_NONE)
        timer_start(c, T_IDLE, c->srv->opts.idle_timeout_ms);
    update_reading(c);
}

/* --- response heads ----------------------------------------------------------------- */

static void out(struct conn *c, const void *p, size_t n)
{
    if (!c->out_err) c->out_err = am_buf_append(&c->obuf, p, n);
}

static void out_u64(struct conn *c, uint64_t v)
{
    char tmp[24];
    size_t i = sizeof tmp;
    do {
        tmp[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    out(c, tmp + i, sizeof tmp - i);
}

/* Appends a field value with control characters (CR, LF, NUL …) replaced by spaces, so
 * nothing a handler relays can split the response (RFC 9110 §5.5). */
static void out_value(struct conn *c, const char *v, size_t n)
{
    size_t mark = c->obuf.len;
    out(c, v, n);
    if (c->out_err) return;
    for (size_t i = mark; i < c->obuf.len; i++) {
        unsigned char ch = (unsigned char)c->obuf.data[i];
        if ((ch < 0x20 && ch != '\t') || ch == 0x7f) c->obuf.data[i] = ' ';
    }
}

static void out_header(struct conn *c, const struct am_http_header *h, bool *close)
{
    if (am_http_token_eq(h->name, h->name_len, "content-length") ||
        am_http_token_eq(h->name, h->name_len, "transfer-encoding") ||
        am_http_token_eq(h->name, h->name_len, "date") ||
        am_http_token_eq(h->name, h->name_len, "keep-alive"))
        return; /* framing and these are ours */
    if (am_http_token_eq(h->name, h->name_len, "connection")) {
        if (am_http_token_eq(h->value, h->value_len, "close")) *close = true;
        return;
    }
    if (h->name_len == 0) return;
    for (size_t i = 0; i < h->name_len; i++) {
        if (!is_tchar((unsigned char)h->name[i])) {
            AM_WARN("c%llu dropping response header with an invalid name", ull(c->id));
            return;
        }
    }
    out(c, h->name, h->name_len);
    out(c, LIT(": "));
    out_value(c, h->value, h->value_len);
    out(c, LIT("\r\n"));
}

/* Builds the response head into c->obuf. Returns 0, AM_EINVAL (status) or the buffer's
 * error. Sets c->close_after when the connection will close after this response. */
static int build_head(struct conn *c, int status, const char *reason,
                      const struct am_http_header *hdrs, size_t n_hdrs,
                      const struct am_http_header *extra, uint64_t content_length)
{
    struct am_httpserver *srv = c->srv;
    if (status < 200 || status > 999) return AM_EINVAL;
    am_buf_reset(&c->obuf);
    c->out_err = 0;
    char sl[16] = "HTTP/1.1 ";
    sl[9] = (char)('0' + status / 100);
    sl[10] = (char)('0' + status / 10 % 10);
    sl[11] = (char)('0' + status % 10);
    sl[12] = ' ';
    out(c, sl, 13);
    if (reason) {
        /* Diagnostic phrases come from our handlers but may quote upstream text: only
         * printable ASCII goes out (RFC 9112 §4 reason-phrase), bounded. */
        size_t n = strnlen(reason, REASON_MAX);
        size_t mark = c->obuf.len;
        out(c, reason, n);
        if (!c->out_err) {
            for (size_t i = mark; i < c->obuf.len; i++) {
                unsigned char ch = (unsigned char)c->obuf.data[i];
                if (ch < 0x20 || ch > 0x7e) c->obuf.data[i] = '?';
            }
        }
    } else {
        const char *r = am_http_reason(status);
        out(c, r, strlen(r));
    }
    out(c, LIT("\r\nDate: "));
    srv_date(srv);
    out(c, srv->date, srv->date_len);
    out(c, LIT("\r\n"));
    /* RFC 9110 §8.6: never in 204; in 304 only as the length a 200 would have. */
    if (status != 204 && !(status == 304 && content_length == 0)) {
        out(c, LIT("Content-Length: "));
        out_u64(c, content_length);
        out(c, LIT("\r\n"));
    }
    bool close = false;
    for (size_t i = 0; i < n_hdrs; i++) out_header(c, &hdrs[i], &close);
    if (extra) out_header(c, extra, &close);
    if (close || !c->keep_alive || c->close_after || srv->draining) {
        c->close_after = true;
        out(c, LIT("Connection: close\r\n"));
    } else if (c->http10) {
        out(c, LIT("Connection: keep-alive\r\n"));
    }
    out(c, LIT("\r\n"));
    return c->out_err;
}

/* A response the server itself sends (bad request, timeouts, limits), then closes. */
static void send_error_and_close(struct conn *c, int status, int err, const char *message)
{
    timer_stop(c);
    c->close_after = true;
    am_buf_reset(&c->ebuf);
    if (am_error_format_json(err, message, &c->ebuf) == 0) {
        static const struct am_http_header ct = {LIT("Content-Type"), LIT("application/json")};
        if (build_head(c, status, NULL, NULL, 0, &ct, c->ebuf.len) == 0) {
            uv_buf_t b[2] = {uv_buf_init(c->obuf.data, (unsigned)c->obuf.len),
                             uv_buf_init(c->ebuf.data, (unsigned)c->ebuf.len)};
            if (conn_send(c, b, 2) != 0) {
                close_now(c);
                return;
            }
        }
    }
    close_gracefully(c);
}

/* A client mistake: logged at INFO, answered, connection closed. */
static void reject(struct conn *c, int status, int err, const char *why)
{
    AM_INFO("c%llu %s: %d %s", ull(c->id), c->peer, status, why);
    send_error_and_close(c, status, err, why);
}

/* --- connection lifecycle ----------------------------------------------------------- */

static void srv_maybe_done(struct am_httpserver *srv);

static void conn_free(struct conn *c)
{
    struct am_httpserver *srv = c->srv;
    if (srv) {
        if (c->prev)
            c->prev->next = c->next;
        else
            srv->conns = c->next;
        if (c->next) c->next->prev = c->prev;
    }
    am_buf_cleanup(&c->hbuf);
    am_buf_cleanup(&c->bbuf);
    am_buf_cleanup(&c->obuf);
    am_buf_cleanup(&c->ebuf);
    am_tls_free(c->tls);
    c->rpos = c->rlen;
    rbuf_put(c);
    free(c->spans);
    free(c->hdrs);
    free(c);
}

static void conn_closed(struct conn *c)
{
    struct am_httpserver *srv = c->srv;
    srv->n_live--;
    AM_DEBUG("c%llu closed", ull(c->id));
    if (c->ex.owned) {
        if (c->ex.on_gone) {
            c->in_gone = true;
            c->ex.on_gone(c->ex.arg);
            c->in_gone = false;
            c->ex.owned = false;
        } else {
            /* The handler ends it later; ending calls return AM_ECANCELED and free c. */
            c->zombie = true;
            srv_maybe_done(srv);
            return;
        }
    }
    conn_free(c);
    srv_maybe_done(srv);
}

static void on_conn_handle_closed(uv_handle_t *h)
{
    struct conn *c = h->data;
    if (--c->handles_open == 0) conn_closed(c);
}

/* The dup is closed only after the poll handle, which watched it, is gone. */
static void on_wpoll_closed(uv_handle_t *h)
{
    struct conn *c = h->data;
    close(c->wpoll_fd);
    c->wpoll = NULL;
    free(h);
    if (--c->handles_open == 0) conn_closed(c);
}

static void close_now(struct conn *c)
{
    if (c->phase == PH_CLOSED) return;
    c->phase = PH_CLOSED;
    c->timer_kind = T_NONE;
    if (c->counted) {
        c->srv->n_counted--;
        c->counted = false;
    }
    c->reading = false;
    uv_close((uv_handle_t *)&c->tcp, on_conn_handle_closed);
    uv_close((uv_handle_t *)&c->timer, on_conn_handle_closed);
    if (c->wpoll) uv_close((uv_handle_t *)c->wpoll, on_wpoll_closed);
}

static void on_shutdown(uv_shutdown_t *req, int status)
{
    struct conn *c = req->data;
    if (c->phase == PH_CLOSED) return;
    if (status < 0 || c->eof) {
        close_now(c);
        return;
    }
    /* Keep reading (and discarding) until the client closes, so that request bytes we
     * never read cannot make the kernel answer with a RST that destroys the response
     * before the client has read it (RFC 9112 §9.6). */
    timer_start(c, T_LINGER, LINGER_MS);
    update_reading(c);
}

static void begin_shutdown(struct conn *c)
{
    if (c->shutting) return;
    c->shutting = true;
    if (c->tls && c->tls_done) {
        am_tls_close_notify(c->tls); /* a clean end of the TLS stream, then FIN */
        tls_send(c);
    }
    c->shutdown_req.data = c;
    if (uv_shutdown(&c->shutdown_req, (uv_stream_t *)&c->tcp, on_shutdown) != 0) close_now(c);
}

/* Closes after everything queued has been written. */
static void close_gracefully(struct conn *c)
{
    if (c->phase == PH_CLOSING || c->phase == PH_CLOSED) return;
    c->phase = PH_CLOSING;
    c->out_blocked = false;
    timer_stop(c);
    update_reading(c);
    if (c->phase == PH_CLOSING && c->writes_pending == 0) begin_shutdown(c);
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf);

static void on_alloc(uv_handle_t *h, size_t hint, uv_buf_t *buf)
{
    struct conn *c = h->data;
    if (c->phase >= PH_CLOSING || c->rejected) {
        *buf = uv_buf_init(c->srv->discard, sizeof c->srv->discard);
        return;
    }
    if (c->tls) {
        *buf = uv_buf_init(c->srv->cipher, sizeof c->srv->cipher);
        return;
    }
    if (!rbuf_get(c)) {
        *buf = uv_buf_init(NULL, 0); /* libuv reports UV_ENOBUFS: the read ends */
        return;
    }
    if (c->rpos == c->rlen) {
        c->rpos = c->rlen = 0;
    } else if (c->rpos > 0 && RBUF_SIZE - c->rlen < RBUF_SIZE / 4) {
        memmove(c->rbuf, c->rbuf + c->rpos, c->rlen - c->rpos);
        c->rlen -= c->rpos;
        c->rpos = 0;
    }
    *buf = uv_buf_init(c->rbuf + c->rlen, (unsigned)(RBUF_SIZE - c->rlen));
}

/* Reads unless the connection is closed, saw EOF, or holds half a buffer of unparsed
 * bytes it cannot parse now (an active exchange or a blocked output): backpressure
 * against pipelining floods. */
static void update_reading(struct conn *c)
{
    if (c->phase == PH_CLOSED || c->eof) return;
    bool full = c->rlen - c->rpos >= RBUF_SIZE / 2;
    bool want = c->phase == PH_CLOSING || !((c->phase == PH_ACTIVE || c->out_blocked) && full);
    if (want && !c->reading) {
        int rc = uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
        if (rc) {
            AM_DEBUG("c%llu read start: %s", ull(c->id), uv_strerror(rc));
            close_now(c);
            return;
        }
        c->reading = true;
    } else if (!want && c->reading) {
        uv_read_stop((uv_stream_t *)&c->tcp);
        c->reading = false;
    }
}

/* The client's stream ended (err UV_EOF, or a read error). */
static void read_end(struct conn *c, ssize_t nread)
{
    {
        c->reading = false;
        if (nread == UV_EOF) c->eof = true;
        switch (c->phase) {
        case PH_ACTIVE:
            /* Like nginx: a client that stops sending while we work has gone away. */
            AM_DEBUG("c%llu r%llu client went away: %s", ull(c->id), ull(c->ex.req.id),
                     uv_strerror((int)nread));
            close_now(c);
            break;
        case PH_HEAD:
            if (nread == UV_EOF && c->head_bytes == 0 && c->writes_pending) {
                close_gracefully(c); /* finish sending the last response */
                break;
            }
            /* fall through */
        default:
            AM_DEBUG("c%llu read: %s", ull(c->id), uv_strerror((int)nread));
            close_now(c);
            break;
        }
    }
}

/* Drives the handshake, then moves decrypted input into rbuf as room allows, and sends
 * whatever the session produced (handshake messages, alerts, key updates). Returns false
 * when it closed the connection. */
static bool tls_fill(struct conn *c)
{
    char msg[160];
    int rc;
    if (!c->tls_done) {
        rc = am_tls_handshake(c->tls, msg, sizeof msg);
        int wrc = tls_send(c);
        if (rc < 0 || wrc) {
            AM_DEBUG("c%llu %s: %s", ull(c->id), c->peer, rc < 0 ? msg : uv_strerror(wrc));
            close_now(c);
            return false;
        }
        if (rc == 0) return true;
        c->tls_done = true;
        AM_DEBUG("c%llu %s %s", ull(c->id), am_tls_version(c->tls), am_tls_cipher(c->tls));
        if (c->timer_kind == T_HANDSHAKE) timer_start(c, T_IDLE, c->srv->opts.idle_timeout_ms);
    }
    while (!c->tls_eof && am_tls_has_input(c->tls)) {
        if (!rbuf_get(c)) {
            AM_WARN("c%llu read buffer: out of memory", ull(c->id));
            close_now(c);
            return false;
        }
        if (c->rpos == c->rlen) {
            c->rpos = c->rlen = 0;
        } else if (c->rpos > 0 && RBUF_SIZE - c->rlen < RBUF_SIZE / 4) {
            memmove(c->rbuf, c->rbuf + c->rpos, c->rlen - c->rpos);
            c->rlen -= c->rpos;
            c->rpos = 0;
        }
        size_t room = RBUF_SIZE - c->rlen, n = 0;
        if (room == 0) break;
        rc = am_tls_read(c->tls, c->rbuf + c->rlen, room, &n, msg, sizeof msg);
        if (rc == AM_TLS_CLOSED) {
            c->tls_eof = true;
        } else if (rc < 0) {
            AM_DEBUG("c%llu %s: %s", ull(c->id), c->peer, msg);
            close_now(c);
            return false;
        } else if (n == 0) {
            break;
        }
        c->rlen += n;
    }
    rc = tls_send(c);
    if (rc) {
        AM_DEBUG("c%llu write: %s", ull(c->id), uv_strerror(rc));
        close_now(c);
        return false;
    }
    return true;
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    struct conn *c = s->data;
    if (c->phase == PH_CLOSED) return;
    if (nread == 0) {
        rbuf_put(c); /* EAGAIN: the buffer lent by on_alloc goes back if it is empty */
        return;
    }
    if (nread < 0) {
        read_end(c, nread);
        return;
    }
    if (buf->base == c->srv->discard) return;
    if (buf->base == c->srv->cipher) {
        if (am_tls_feed(c->tls, buf->base, (size_t)nread) != 0) {
            AM_WARN("c%llu TLS input: out of memory", ull(c->id));
            close_now(c);
            return;
        }
        if (!tls_fill(c)) return;
    } else {
        c->rlen += (size_t)nread;
    }
    if (c->phase == PH_HEAD || c->phase == PH_BODY) process_input(c);
    if (c->tls_eof && !c->eof && c->phase != PH_CLOSED) {
        read_end(c, UV_EOF);
        return;
    }
    update_reading(c);
}

/* --- request parsing ---------------------------------------------------------------- */

static void request_reset(struct conn *c)
{
    am_buf_reset(&c->hbuf);
    /* Bodies are rare (the pull API has none): a big one's memory is not kept for the
     * rest of a keep-alive connection. */
    if (c->bbuf.cap > BBUF_KEEP) am_buf_cleanup(&c->bbuf);
    am_buf_reset(&c->bbuf);
    c->head_bytes = 0;
    c->line_start = true;
    c->seen_content = false;
    c->hstate = 0;
    c->url_started = false;
    c->headers_done = false;
    c->trailer_bytes = 0;
    c->msg_done = false;
    c->cl_count = c->te_count = c->host_count = 0;
    c->body_bytes = 0;
    c->err_status = 0;
    c->err_code = 0;
    c->err_why = NULL;
    c->method_len = 0;
    c->url_off = c->url_len = 0;
    c->n_hdrs = 0;
    c->keep_alive = false;
    c->http10 = false;
}

static int refuse(struct conn *c, int status, int err, const char *why)
{
    if (!c->err_status) {
        c->err_status = status;
        c->err_code = err;
        c->err_why = why;
    }
    return -1;
}

static int head_append(struct conn *c, const char *at, size_t len)
{
    int rc = am_buf_append(&c->hbuf, at, len);
    if (rc == AM_ETOO_LARGE) return refuse(c, 431, AM_EHEADERS_TOO_LARGE, "request head too large");
    if (rc) return refuse(c, 500, AM_ENOMEM, "out of memory");
    return 0;
}

static struct conn *pconn(llhttp_t *p)
{
    return p->data;
}

static int cb_method(llhttp_t *p, const char *at, size_t len)
{
    return head_append(pconn(p), at, len);
}

static int cb_method_complete(llhttp_t *p)
{
    struct conn *c = pconn(p);
    c->method_len = c->hbuf.len;
    return head_append(c, "", 1);
}

static int cb_url(llhttp_t *p, const char *at, size_t len)
{
    struct conn *c = pconn(p);
    if (!c->url_started) {
        c->url_started = true;
        c->url_off = c->hbuf.len;
    }
    return head_append(c, at, len);
}

static int cb_url_complete(llhttp_t *p)
{
    struct conn *c = pconn(p);
    c->url_len = c->hbuf.len - c->url_off;
    if (c->url_len == 0 || c->hbuf.data[c->url_off] != '/')
        return refuse(c, 400, AM_EBAD_REQUEST, "request-target must start with '/'");
    return head_append(c, "", 1);
}

static bool is_ows(char ch)
{
    return ch == ' ' || ch == '\t';
}

static int finish_header(struct conn *c)
{
    struct hspan *s = &c->spans[c->n_hdrs];
    c->hstate = 0;
    s->value_len = c->hbuf.len - s->value_off;
    const char *base = c->hbuf.data;
    while (s->value_len && is_ows(base[s->value_off])) s->value_off++, s->value_len--;
    while (s->value_len && is_ows(base[s->value_off + s->value_len - 1])) s->value_len--;
    c->n_hdrs++;
    const char *name = base + s->name_off;
    /* RFC 9112 §6.3: a message with both, or with conflicting lengths, is an attempt at
     * request smuggling; llhttp checks too, but the rule is ours to keep. */
    if (am_http_token_eq(name, s->name_len, "content-length"))
        c->cl_count++;
    else if (am_http_token_eq(name, s->name_len, "transfer-encoding"))
        c->te_count++;
    else if (am_http_token_eq(name, s->name_len, "host"))
        c->host_count++;
    if (c->cl_count > 1) return refuse(c, 400, AM_EBAD_REQUEST, "duplicate Content-Length");
    if (c->cl_count && c->te_count)
        return refuse(c, 400, AM_EBAD_REQUEST, "both Content-Length and Transfer-Encoding");
    return 0;
}

static int count_trailer(struct conn *c, size_t len)
{
    c->trailer_bytes += len;
    if (c->trailer_bytes > c->srv->opts.max_header_bytes)
        return refuse(c, 431, AM_EHEADERS_TOO_LARGE, "request trailer fields too large");
    return 0;
}

static int cb_header_field(llhttp_t *p, const char *at, size_t len)
{
    struct conn *c = pconn(p);
    /* Trailer fields after a chunked body (RFC 9112 §7.1.2) are discarded with the body:
     * the request's header views were built at headers_complete and must not move. They
     * are bounded like a head, so a client cannot stream them forever. */
    if (c->headers_done) return count_trailer(c, len);
    if (c->hstate == 2 && finish_header(c)) return -1;
    if (c->hstate == 0) {
        struct am_httpserver *srv = c->srv;
        if (c->n_hdrs >= srv->opts.max_headers)
            return refuse(c, 431, AM_EHEADERS_TOO_LARGE, "too many request headers");
        if (c->n_hdrs == c->cap_hdrs) {
            size_t cap = c->cap_hdrs ? c->cap_hdrs * 2 : 16;
            if (cap > srv->opts.max_headers) cap = (size_t)srv->opts.max_headers;
            struct hspan *s = realloc(c->spans, cap * sizeof *s);
            if (!s) return refuse(c, 500, AM_ENOMEM, "out of memory");
            c->spans = s;
            struct am_http_header *h = realloc(c->hdrs, cap * sizeof *h);
            if (!h) return refuse(c, 500, AM_ENOMEM, "out of memory");
            c->hdrs = h;
            c->cap_hdrs = cap;
        }
        c->spans[c->n_hdrs].name_off = c->hbuf.len;
        c->hstate = 1;
    }
    return head_append(c, at, len);
}

static int cb_header_field_complete(llhttp_t *p)
{
    struct conn *c = pconn(p);
    if (c->headers_done) return 0;
    /* RFC 9110 §5.1: field-name = token; RFC 9112 §5.1: no whitespace before the colon
     * (llhttp 8.1.0 lets both through for names it does not know). */
    if (c->hstate != 1) return refuse(c, 400, AM_EBAD_REQUEST, "empty header field name");
    struct hspan *s = &c->spans[c->n_hdrs];
    s->name_len = c->hbuf.len - s->name_off;
    for (size_t i = 0; i < s->name_len; i++)
        if (!is_tchar((unsigned char)c->hbuf.data[s->name_off + i]))
            return refuse(c, 400, AM_EBAD_REQUEST, "invalid header field name");
    if (s->name_len == 0) return refuse(c, 400, AM_EBAD_REQUEST, "empty header field name");
    s->value_off = c->hbuf.len;
    c->hstate = 2;
    return 0;
}

static int cb_header_value(llhttp_t *p, const char *at, size_t len)
{
    struct conn *c = pconn(p);
    if (c->headers_done) return count_trailer(c, len);
    if (c->hstate != 2) return 0;
    return head_append(c, at, len);
}

static int cb_header_value_complete(llhttp_t *p)
{
    struct conn *c = pconn(p);
    if (c->hstate != 2) return 0;
    return finish_header(c);
}

static int cb_headers_complete(llhttp_t *p)
{
    struct conn *c = pconn(p);
    if (c->hstate == 2 && finish_header(c)) return -1;
    if (p->http_major != 1) return refuse(c, 505, AM_EBAD_REQUEST, "HTTP version not supported");
    if (p->method == HTTP_CONNECT) return refuse(c, 400, AM_EBAD_REQUEST, "CONNECT refused");
    /* RFC 9112 §3.2: exactly one Host in HTTP/1.1. */
    if (p->http_minor >= 1 && c->host_count != 1)
        return refuse(c, 400, AM_EBAD_REQUEST, "HTTP/1.1 request needs exactly one Host");
    if ((p->flags & F_CONTENT_LENGTH) && p->content_length > MAX_BODY)
        return refuse(c, 413, AM_ETOO_LARGE, "request body too large");
    const char *base = c->hbuf.data;
    for (size_t i = 0; i < c->n_hdrs; i++) {
        const struct hspan *s = &c->spans[i];
        c->hdrs[i] = (struct am_http_header){base + s->name_off, s->name_len, base + s->value_off,
                                             s->value_len};
    }
    c->headers_done = true;
    return 0;
}

static int cb_body(llhttp_t *p, const char *at, size_t len)
{
    struct conn *c = pconn(p);
    c->body_bytes += len;
    if (c->body_bytes > MAX_BODY) return refuse(c, 413, AM_ETOO_LARGE, "request body too large");
    if (am_buf_append(&c->bbuf, at, len)) return refuse(c, 500, AM_ENOMEM, "out of memory");
    return 0;
}

static int cb_message_complete(llhttp_t *p)
{
    struct conn *c = pconn(p);
    c->msg_done = true;
    /* Before llhttp resets its flags; an upgrade we do not speak ends the connection. */
    c->keep_alive = llhttp_should_keep_alive(p) && !p->upgrade;
    c->http10 = p->http_major == 1 && p->http_minor == 0;
    return HPE_PAUSED;
}

/* Scans new head bytes before llhttp sees them. Returns 0 with *len bytes safe to feed
 * (a trailing CR is held back until its successor arrives) and *end when they end the
 * head, or an HTTP status for a refused head. Runs once per byte: state carries over. */
static int scan_head(struct conn *c, size_t *len, bool *end, const char **why)
{
    const char *p = c->rbuf + c->rpos;
    size_t n = c->rlen - c->rpos, i = 0;
    *end = false;
    for (; i < n; i++) {
        char ch = p[i];
        if (ch == '\r') {
            if (i + 1 == n) break;
            if (p[i + 1] != '\n') {
                *why = "bare CR in request head";
                return 400;
            }
        } else if (ch == '\n') {
            if (c->line_start && c->seen_content) {
                i++;
                *end = true;
                break;
            }
            c->line_start = true;
        } else {
            /* RFC 9112 §5.2: obs-fold is refused rather than unfolded. */
            if (c->line_start && c->seen_content && (ch == ' ' || ch == '\t')) {
                *why = "obsolete line folding in request head";
                return 400;
            }
            c->line_start = false;
            c->seen_content = true;
        }
    }
    c->head_bytes += i;
    if (c->head_bytes > c->srv->opts.max_header_bytes) {
        *why = "request head too large";
        return 431;
    }
    *len = i;
    return 0;
}

static void dispatch(struct conn *c)
{
    struct am_httpserver *srv = c->srv;
    struct am_http_exchange *ex = &c->ex;
    c->phase = PH_ACTIVE;
    timer_stop(c);
    if (srv->draining) c->close_after = true;

    memset(ex, 0, sizeof *ex);
    struct am_http_request *r = &ex->req;
    char *base = c->hbuf.data;
    r->conn_id = c->id;
    r->id = ++c->req_seq;
    r->method = base;
    r->is_head = c->parser.method == HTTP_HEAD;
    char *path = base + c->url_off;
    char *q = memchr(path, '?', c->url_len);
    r->path = path;
    if (q) {
        *q = '\0';
        r->path_len = (size_t)(q - path);
        r->query = q + 1;
        r->query_len = c->url_len - r->path_len - 1;
    } else {
        r->path_len = c->url_len;
        r->query = path + c->url_len; /* its NUL: "" */
        r->query_len = 0;
    }
    r->headers = c->hdrs;
    r->n_headers = c->n_hdrs;
    r->peer = c->peer;
    ex->owned = true;
    ex->status = 0;
    ex->written = 0;
    ex->start_ns = srv->opts.on_complete ? uv_hrtime() : 0;
    AM_DEBUG("c%llu r%llu %s %s%s%s", ull(c->id), ull(r->id), r->method, r->path,
             r->query_len ? "?" : "", r->query);
    srv->handler(srv->ctx, ex);
}

static void parse_failed(struct conn *c, llhttp_errno_t e)
{
    if (c->err_status) {
        reject(c, c->err_status, c->err_code, c->err_why);
        return;
    }
    AM_INFO("c%llu %s: 400 malformed request: %s (%s)", ull(c->id), c->peer, llhttp_errno_name(e),
            llhttp_get_error_reason(&c->parser));
    send_error_and_close(c, 400, AM_EBAD_REQUEST, NULL);
}

/* Parses buffered bytes and dispatches complete requests until the connection must wait
 * (for bytes, for a handler, for output to drain) or closes. Never re-entered. */
static void process_input(struct conn *c)
{
    if (c->in_process) return;
    if (c->tls && c->tls_done && c->phase <= PH_BODY && am_tls_has_input(c->tls) && !tls_fill(c))
        return;
    c->in_process = true;
    struct am_httpserver *srv = c->srv;
    while (c->phase == PH_HEAD || c->phase == PH_BODY) {
        if (c->rlen == c->rpos) break;
        if (c->phase == PH_HEAD && c->queued > OUT_HIGH) {
            c->out_blocked = true; /* the client is not reading our responses */
            break;
        }
        size_t len = c->rlen - c->rpos;
        bool end = false;
        if (c->phase == PH_HEAD) {
            bool had = c->head_bytes > 0;
            const char *why = NULL;
            int st = scan_head(c, &len, &end, &why);
            if (st) {
                reject(c, st, st == 431 ? AM_EHEADERS_TOO_LARGE : AM_EBAD_REQUEST, why);
                break;
            }
            if (!had && c->head_bytes > 0) timer_start(c, T_HEADER, srv->opts.header_timeout_ms);
            if (len == 0) break;
        }
        const char *data = c->rbuf + c->rpos;
        llhttp_errno_t e = llhttp_execute(&c->parser, data, len);
        if (e == HPE_PAUSED && c->msg_done) {
            c->rpos += (size_t)(llhttp_get_error_pos(&c->parser) - data);
        } else if (e == HPE_OK) {
            c->rpos += len;
        } else {
            parse_failed(c, e);
            break;
        }
        if (c->phase == PH_HEAD && end) {
            if (!c->headers_done) {
                parse_failed(c, HPE_INVALID_EOF_STATE);
                break;
            }
            c->phase = PH_BODY;
        }
        if (c->msg_done) {
            dispatch(c); /* may finish synchronously and return to PH_HEAD */
        } else if (c->phase == PH_BODY && c->timer_kind != T_BODY) {
            /* One deadline for the whole body, like the head's: restarting it on every
             * byte would let a client dribble a body forever (slow POST). */
            timer_start(c, T_BODY, srv->opts.header_timeout_ms);
        }
    }
    if (c->phase == PH_HEAD && c->head_bytes == 0 && c->timer_kind == T_NONE &&
        c->writes_pending == 0)
        timer_start(c, T_IDLE, srv->opts.idle_timeout_ms);
    if (c->phase != PH_CLOSED) rbuf_put(c); /* only when all of it was parsed */
    c->in_process = false;
}

/* The response is fully queued: next request, or close. */
static void next_request(struct conn *c)
{
    if (!c->keep_alive || c->close_after || c->srv->draining) {
        close_gracefully(c);
        return;
    }
    request_reset(c);
    c->phase = PH_HEAD;
    llhttp_resume(&c->parser);
    if (c->rlen > c->rpos || (c->tls && am_tls_has_input(c->tls))) {
        /* Pipelined bytes: the caller's stack may be a handler's, so parse them from
         * the loop unless the dispatching loop is still below us. */
        if (c->in_process)
            timer_stop(c);
        else
            timer_start(c, T_RESUME, 0);
    } else if (c->writes_pending == 0) {
        timer_start(c, T_IDLE, c->srv->opts.idle_timeout_ms);
    } else {
        timer_stop(c); /* armed by on_write once the response is out */
    }
    update_reading(c);
}

static void on_conn_timer(uv_timer_t *t)
{
    struct conn *c = t->data;
    enum timer_kind kind = c->timer_kind;
    c->timer_kind = T_NONE;
    switch (kind) {
    case T_IDLE:
        AM_DEBUG("c%llu idle timeout", ull(c->id));
        close_now(c);
        break;
    case T_HEADER: reject(c, 408, AM_EBAD_REQUEST, "request head not received in time"); break;
    case T_BODY: reject(c, 408, AM_EBAD_REQUEST, "request body not received in time"); break;
    case T_LINGER: close_now(c); break;
    case T_HANDSHAKE:
        AM_DEBUG("c%llu %s: TLS handshake not completed in time", ull(c->id), c->peer);
        close_now(c);
        break;
    case T_RESUME:
        process_input(c);
        update_reading(c);
        break;
    case T_NONE: break;
    }
}

/* --- exchange API ------------------------------------------------------------------- */

/* The handler let go of the exchange. ok: the response is complete and queued. */
static void ex_end(struct conn *c, bool ok)
{
    struct am_httpserver *srv = c->srv;
    if (srv && srv->opts.on_complete && c->ex.owned)
        srv->opts.on_complete(srv->ctx, &c->ex.req, c->ex.status, c->ex.written, ok,
                              uv_hrtime() - c->ex.start_ns);
    c->ex.owned = false;
    c->ex.on_drain = NULL;
    c->ex.on_gone = NULL;
    if (c->wpoll) uv_poll_stop(c->wpoll);
    uncork(c);
    if (c->zombie && !c->in_gone) {
        conn_free(c);
        return;
    }
    if (c->phase != PH_ACTIVE) return;
    if (ok)
        next_request(c);
    else
        close_now(c);
}

const struct am_http_request *am_http_request_of(const struct am_http_exchange *ex)
{
    return &ex->req;
}

uv_loop_t *am_http_loop(const struct am_http_exchange *ex)
{
    return EX_CONN(ex)->loop;
}

const char *am_http_req_header(const struct am_http_exchange *ex, const char *name, size_t *len)
{
    const struct am_http_header *h = am_http_header_find(ex->req.headers, ex->req.n_headers, name);
    if (len) *len = h ? h->value_len : 0;
    return h ? h->value : NULL;
}

const char *am_http_req_body(const struct am_http_exchange *ex, size_t *len)
{
    const struct conn *c = EX_CONN(ex);
    if (len) *len = c->bbuf.len;
    return c->bbuf.data ? c->bbuf.data : "";
}

void am_http_set_callbacks(struct am_http_exchange *ex, void (*on_drain)(void *arg),
                           void (*on_gone)(void *arg), void *arg)
{
    assert(ex->owned);
    ex->on_drain = on_drain;
    ex->on_gone = on_gone;
    ex->arg = arg;
}

size_t am_http_queued(const struct am_http_exchange *ex)
{
    return EX_CONN(ex)->queued;
}

static bool is_bodyless(const struct am_http_exchange *ex, int status)
{
    return ex->req.is_head || status == 204 || status == 304;
}

static int respond(struct am_http_exchange *ex, int status, const char *reason,
                   const struct am_http_header *hdrs, size_t n_hdrs,
                   const struct am_http_header *extra, const void *body, size_t len)
{
    struct conn *c = EX_CONN(ex);
    assert(ex->owned && !ex->started);
    if (!ex->owned || ex->started) return AM_EINVAL;
    if (c->phase != PH_ACTIVE) {
        ex_end(c, false);
        return AM_ECANCELED;
    }
    if (len > UINT32_MAX / 2) {
        ex_end(c, false);
        return AM_EINVAL; /* uv_buf_t lengths are 32-bit; stream such bodies */
    }
    ex->status = status;
    bool bodyless = is_bodyless(ex, status);
    ex->written = bodyless ? 0 : len;
    int rc = build_head(c, status, reason, hdrs, n_hdrs, extra, status == 204 ? 0 : len);
    if (rc) {
        AM_ERROR("c%llu r%llu response head for %d: %s", ull(c->id), ull(ex->req.id), status,
                 am_error_message(rc));
        ex_end(c, false);
        return rc;
    }
    uv_buf_t b[2] = {uv_buf_init(c->obuf.data, (unsigned)c->obuf.len),
                     uv_buf_init((char *)body, (unsigned)len)};
    rc = conn_send(c, b, bodyless || !len ? 1 : 2);
    AM_DEBUG("c%llu r%llu %d %zu bytes%s", ull(c->id), ull(ex->req.id), status, len,
             rc ? " (write failed)" : "");
    if (rc) {
        ex_end(c, false);
        return rc == UV_ENOMEM ? AM_ENOMEM : AM_EIO;
    }
    ex_end(c, true);
    return 0;
}

int am_http_respond(struct am_http_exchange *ex, int status, const char *reason,
                    const struct am_http_header *hdrs, size_t n_hdrs, const void *body, size_t len)
{
    return respond(ex, status, reason, hdrs, n_hdrs, NULL, body, len);
}

int am_http_respond_error(struct am_http_exchange *ex, int err, const char *reason,
                          const char *message, const struct am_http_header *hdrs, size_t n_hdrs)
{
    struct conn *c = EX_CONN(ex);
    static const struct am_http_header ct = {LIT("Content-Type"), LIT("application/json")};
    am_buf_reset(&c->ebuf);
    int rc = am_error_format_json(err, message, &c->ebuf);
    if (rc) {
        /* A message too long for the body: the table's own message always fits. */
        am_buf_reset(&c->ebuf);
        rc = am_error_format_json(err, NULL, &c->ebuf);
    }
    if (rc) {
        if (ex->owned) ex_end(c, false);
        return rc;
    }
    return respond(ex, am_error_http_status(err), reason, hdrs, n_hdrs, &ct, c->ebuf.data,
                   c->ebuf.len);
}

int am_http_start(struct am_http_exchange *ex, int status, const char *reason,
                  const struct am_http_header *hdrs, size_t n_hdrs, uint64_t content_length)
{
    struct conn *c = EX_CONN(ex);
    assert(ex->owned && !ex->started);
    if (!ex->owned || ex->started) return AM_EINVAL;
    if (c->phase != PH_ACTIVE) {
        ex_end(c, false);
        return AM_ECANCELED;
    }
    ex->status = status;
    int rc = build_head(c, status, reason, hdrs, n_hdrs, NULL, content_length);
    if (rc) {
        AM_ERROR("c%llu r%llu response head for %d: %s", ull(c->id), ull(ex->req.id), status,
                 am_error_message(rc));
        ex_end(c, false);
        return rc;
    }
    uv_buf_t b = uv_buf_init(c->obuf.data, (unsigned)c->obuf.len);
    rc = conn_send(c, &b, 1);
    if (rc) {
        ex_end(c, false);
        return rc == UV_ENOMEM ? AM_ENOMEM : AM_EIO;
    }
    ex->started = true;
    ex->bodyless = is_bodyless(ex, status);
    ex->content_length = content_length;
    ex->written = 0;
    AM_DEBUG("c%llu r%llu %d streaming %llu bytes", ull(c->id), ull(ex->req.id), status,
             ull(content_length));
    return 0;
}

int am_http_write(struct am_http_exchange *ex, const void *data, size_t len)
{
    struct conn *c = EX_CONN(ex);
    assert(ex->owned && ex->started);
    if (!ex->owned || !ex->started) return AM_EINVAL;
    if (c->phase != PH_ACTIVE) return AM_ECANCELED;
    if (len > ex->content_length - ex->written || len > UINT32_MAX / 2) return AM_EINVAL;
    if (ex->bodyless || len == 0) {
        ex->written += len; /* HEAD: counted, not sent */
        return 0;
    }
    uv_buf_t b = uv_buf_init((char *)data, (unsigned)len);
    int rc = conn_send(c, &b, 1);
    if (rc) {
        /* The handler hears on_gone (or ends the exchange first). */
        AM_DEBUG("c%llu r%llu write: %s", ull(c->id), ull(ex->req.id), uv_strerror(rc));
        close_now(c);
        return rc == UV_ENOMEM ? AM_ENOMEM : AM_EIO;
    }
    ex->written += len;
    return 0;
}

int am_http_end(struct am_http_exchange *ex)
{
    struct conn *c = EX_CONN(ex);
    assert(ex->owned);
    if (!ex->owned) return AM_EINVAL;
    if (c->phase != PH_ACTIVE) {
        ex_end(c, false);
        return AM_ECANCELED;
    }
    if (!ex->started || (!ex->bodyless && ex->written != ex->content_length)) {
        AM_DEBUG("c%llu r%llu body ended at %llu of %llu bytes: aborting", ull(c->id),
                 ull(ex->req.id), ull(ex->written), ull(ex->content_length));
        int rc = ex->started ? AM_EIO : AM_EINVAL;
        ex_end(c, false);
        return rc;
    }
    ex_end(c, true);
    return 0;
}

bool am_http_can_sendfile(const struct am_http_exchange *ex)
{
    const struct conn *c = (const struct conn *)((const char *)ex - offsetof(struct conn, ex));
    return ex->owned && ex->started && !ex->bodyless && c->phase == PH_ACTIVE && c->srv &&
           !c->srv->opts.no_sendfile && !c->tls && c->queued == 0 && c->writes_pending == 0;
}

/* Clearing TCP_CORK sends what it held back. */
static void uncork(struct conn *c)
{
    uv_os_fd_t sock;
    int off = 0;
    if (!c->corked) return;
    c->corked = false;
    if (c->phase != PH_CLOSED && uv_fileno((uv_handle_t *)&c->tcp, &sock) == 0)
        setsockopt(sock, IPPROTO_TCP, TCP_CORK, &off, sizeof off);
}

static void on_wpoll(uv_poll_t *p, int status, int events)
{
    struct conn *c = p->data;
    (void)events;
    uv_poll_stop(p);
    if (c->phase != PH_ACTIVE) return;
    if (status < 0) {
        AM_DEBUG("c%llu poll: %s", ull(c->id), uv_strerror(status));
        close_now(c);
        return;
    }
    if (c->ex.owned && c->ex.started && c->queued == 0 && c->ex.on_drain) c->ex.on_drain(c->ex.arg);
}

static int wpoll_open(struct conn *c, int sock)
{
    uv_poll_t *p = malloc(sizeof *p);
    if (!p) return AM_ENOMEM;
    int fd = dup(sock);
    if (fd < 0) {
        free(p);
        return AM_ENOMEM; /* out of descriptors: the caller copies instead */
    }
    if (uv_poll_init(c->loop, p, fd)) {
        close(fd);
        free(p);
        return AM_ENOMEM;
    }
    p->data = c;
    c->wpoll = p;
    c->wpoll_fd = fd;
    c->handles_open++;
    return 0;
}

int am_http_sendfile(struct am_http_exchange *ex, int fd, uint64_t off, size_t len, size_t *sent)
{
    struct conn *c = EX_CONN(ex);
    *sent = 0;
    if (ex->owned && c->phase != PH_ACTIVE) return AM_ECANCELED;
    if (!am_http_can_sendfile(ex) || len > ex->content_length - ex->written) return AM_EINVAL;
    if (len == 0) return 0;
    uv_os_fd_t sock;
    if (uv_fileno((uv_handle_t *)&c->tcp, &sock)) return AM_EINVAL;
    if (!c->wpoll) {
        int rc = wpoll_open(c, sock);
        if (rc) return rc;
    }
    if (!c->corked) {
        /* Like nginx's tcp_nopush: without it TCP_NODELAY sends a short segment at the
         * end of every sendfile call. */
        int on = 1;
        c->corked = setsockopt(sock, IPPROTO_TCP, TCP_CORK, &on, sizeof on) == 0;
    }
    off_t o = (off_t)off;
    ssize_t n = sendfile(sock, fd, &o, len);
    if (n <= 0 && !(n < 0 && (errno == EAGAIN || errno == EINTR))) {
        /* 0: the file ended before the range did; a short body must not look whole. */
        AM_DEBUG("c%llu r%llu sendfile: %s", ull(c->id), ull(ex->req.id),
                 n == 0 ? "unexpected end of file" : strerror(errno));
        close_now(c);
        return AM_EIO;
    }
    if (n < 0) n = 0;
    ex->written += (uint64_t)n;
    *sent = (size_t)n;
    if (ex->written == ex->content_length) uncork(c); /* the tail goes now, not at the end */
    int rc = uv_poll_start(c->wpoll, UV_WRITABLE, on_wpoll);
    if (rc) {
        AM_DEBUG("c%llu poll start: %s", ull(c->id), uv_strerror(rc));
        close_now(c);
        return AM_EIO;
    }
    return 0;
}

void am_http_abort(struct am_http_exchange *ex)
{
    struct conn *c = EX_CONN(ex);
    assert(ex->owned);
    if (!ex->owned) return;
    AM_DEBUG("c%llu r%llu aborted", ull(c->id), ull(ex->req.id));
    ex_end(c, false);
}

/* --- accepting ---------------------------------------------------------------------- */

static struct conn *conn_new(struct am_httpserver *srv, bool rejected)
{
    struct conn *c = malloc(sizeof *c);
    if (!c) return NULL;
    memset(c, 0, sizeof *c);
    c->srv = srv;
    c->loop = srv->loop;
    c->id = ++srv->next_id;
    c->rejected = rejected;
    if (uv_tcp_init(srv->loop, &c->tcp)) {
        free(c);
        return NULL;
    }
    uv_timer_init(srv->loop, &c->timer);
    c->tcp.data = c->timer.data = c;
    c->handles_open = 2;
    c->next = srv->conns;
    if (srv->conns) srv->conns->prev = c;
    srv->conns = c;
    srv->n_live++;
    am_buf_init(&c->hbuf, (size_t)srv->opts.max_header_bytes + 16);
    am_buf_init(&c->bbuf, MAX_BODY);
    am_buf_init(&c->obuf, OBUF_MAX);
    am_buf_init(&c->ebuf, EBUF_MAX);
    llhttp_init(&c->parser, HTTP_REQUEST, &srv->settings);
    c->parser.data = c;
    request_reset(c);
    return c;
}

static void free_handle(uv_handle_t *h)
{
    free(h);
}

/* Out of memory: the connection must still leave the backlog, or libuv would stop
 * watching the listener until the next successful accept. */
static void accept_and_drop(uv_stream_t *server)
{
    uv_tcp_t *t = malloc(sizeof *t);
    if (!t || uv_tcp_init(server->loop, t)) {
        free(t);
        AM_ERROR("accept: out of memory");
        return;
    }
    uv_accept(server, (uv_stream_t *)t);
    uv_close((uv_handle_t *)t, free_handle);
    AM_ERROR("accept: out of memory; connection dropped");
}

static void format_peer(struct conn *c)
{
    struct sockaddr_storage ss;
    int len = sizeof ss;
    char ip[48]; /* INET6_ADDRSTRLEN */
    strcpy(c->peer, "?");
    if (uv_tcp_getpeername(&c->tcp, (struct sockaddr *)&ss, &len)) return;
    if (ss.ss_family == AF_INET) {
        const struct sockaddr_in *s4 = (const struct sockaddr_in *)&ss;
        if (uv_ip4_name(s4, ip, sizeof ip) == 0)
            snprintf(c->peer, sizeof c->peer, "%s:%u", ip, (unsigned)ntohs(s4->sin_port));
    } else if (ss.ss_family == AF_INET6) {
        const struct sockaddr_in6 *s6 = (const struct sockaddr_in6 *)&ss;
        if (uv_ip6_name(s6, ip, sizeof ip) == 0)
            snprintf(c->peer, sizeof c->peer, "[%s]:%u", ip, (unsigned)ntohs(s6->sin6_port));
    }
}

static void on_connection(uv_stream_t *server, int status)
{
    struct listener *l = server->data;
    struct am_httpserver *srv = l->srv;
    if (status < 0) {
        AM_WARN("accept on port %d: %s", l->port, uv_strerror(status));
        return;
    }
    bool full = srv->opts.max_connections && srv->n_counted >= srv->opts.max_connections;
    struct conn *c = conn_new(srv, full);
    if (!c) {
        accept_and_drop(server);
        return;
    }
    int rc = uv_accept(server, (uv_stream_t *)&c->tcp);
    if (rc) {
        AM_WARN("accept on port %d: %s", l->port, uv_strerror(rc));
        close_now(c);
        return;
    }
    uv_tcp_nodelay(&c->tcp, 1);
    format_peer(c);
    if (full && srv->tls_ctx) {
        /* A plain-text 503 means nothing to a TLS client: just close. */
        AM_INFO("c%llu %s: connection limit %llu reached: closed", ull(c->id), c->peer,
                ull(srv->opts.max_connections));
        close_now(c);
        return;
    }
    if (full) {
        /* Accept and refuse rather than leave the kernel backlog to fill. */
        AM_INFO("c%llu %s: 503 connection limit %llu reached", ull(c->id), c->peer,
                ull(srv->opts.max_connections));
        send_error_and_close(c, 503, AM_EUNAVAILABLE, NULL);
        return;
    }
    c->counted = true;
    srv->n_counted++;
    AM_DEBUG("c%llu accepted from %s%s", ull(c->id), c->peer, srv->tls_ctx ? " (TLS)" : "");
    if (srv->tls_ctx) {
        if (am_tls_accept(srv->tls_ctx, &c->tls) != 0) {
            AM_ERROR("c%llu TLS session: out of memory", ull(c->id));
            close_now(c);
            return;
        }
        /* The handshake gets the head's deadline: a silent client is not kept idle. */
        timer_start(c, T_HANDSHAKE,
                    srv->opts.header_timeout_ms ? srv->opts.header_timeout_ms
                                                : srv->opts.idle_timeout_ms);
    } else {
        timer_start(c, T_IDLE, srv->opts.idle_timeout_ms);
    }
    update_reading(c);
}

void am_httpserver_set_tls(struct am_httpserver *srv, struct am_tls_ctx *ctx)
{
    am_tls_ctx_free(srv->tls_ctx); /* sessions keep their own reference */
    srv->tls_ctx = ctx;
}

/* --- server ------------------------------------------------------------------------- */

int am_httpserver_new(uv_loop_t *loop, const struct am_httpserver_opts *opts,
                      am_http_handler_fn handler, void *ctx, struct am_httpserver **out)
{
    struct am_httpserver *srv = calloc(1, sizeof *srv);
    if (!srv) return AM_ENOMEM;
    srv->loop = loop;
    srv->opts = *opts;
    if (!srv->opts.max_header_bytes) srv->opts.max_header_bytes = DEFAULT_MAX_HEADER_BYTES;
    if (!srv->opts.max_headers) srv->opts.max_headers = DEFAULT_MAX_HEADERS;
    srv->handler = handler;
    srv->ctx = ctx;
    llhttp_settings_init(&srv->settings);
    srv->settings.on_method = cb_method;
    srv->settings.on_method_complete = cb_method_complete;
    srv->settings.on_url = cb_url;
    srv->settings.on_url_complete = cb_url_complete;
    srv->settings.on_header_field = cb_header_field;
    srv->settings.on_header_field_complete = cb_header_field_complete;
    srv->settings.on_header_value = cb_header_value;
    srv->settings.on_header_value_complete = cb_header_value_complete;
    srv->settings.on_headers_complete = cb_headers_complete;
    srv->settings.on_body = cb_body;
    srv->settings.on_message_complete = cb_message_complete;
    *out = srv;
    return 0;
}

/* "1.2.3.4:80" or "[::1]:80" → host (brackets removed), port. */
static int parse_hostport(const char *hp, char *host, size_t hostlen, int *port, bool *v6)
{
    const char *colon;
    size_t hlen;
    if (hp[0] == '[') {
        const char *rb = strchr(hp, ']');
        if (!rb || rb[1] != ':') return AM_EINVAL;
        hlen = (size_t)(rb - hp - 1);
        memcpy(host, hp + 1, hlen < hostlen ? hlen : 0);
        colon = rb + 1;
        *v6 = true;
    } else {
        colon = strrchr(hp, ':');
        if (!colon) return AM_EINVAL;
        hlen = (size_t)(colon - hp);
        if (memchr(hp, ':', hlen)) return AM_EINVAL; /* IPv6 needs brackets */
        memcpy(host, hp, hlen < hostlen ? hlen : 0);
        *v6 = false;
    }
    if (hlen == 0 || hlen >= hostlen) return AM_EINVAL;
    host[hlen] = '\0';
    const char *ps = colon + 1;
    size_t plen = strlen(ps);
    uint64_t v;
    if (plen > 5 || am_http_parse_u64(ps, plen, &v) || v > 65535) return AM_EINVAL;
    *port = (int)v;
    return 0;
}

static void on_listener_closed(uv_handle_t *h)
{
    struct listener *l = h->data;
    l->srv->listeners_open--;
    srv_maybe_done(l->srv);
}

int am_httpserver_listen(struct am_httpserver *srv, const char *hostport, char *msg, size_t msglen)
{
    char host[64];
    int port;
    bool v6;
    union {
        struct sockaddr sa;
        struct sockaddr_in s4;
        struct sockaddr_in6 s6;
        struct sockaddr_storage ss;
    } addr;
    if (msg && msglen) msg[0] = '\0';
    if (srv->draining) {
        if (msg) snprintf(msg, msglen, "listen %s: server is draining", hostport);
        return AM_EINVAL;
    }
    if (parse_hostport(hostport, host, sizeof host, &port, &v6) ||
        (v6 ? uv_ip6_addr(host, port, &addr.s6) : uv_ip4_addr(host, port, &addr.s4))) {
        if (msg) snprintf(msg, msglen, "listen %s: expected IPv4:port or [IPv6]:port", hostport);
        return AM_EINVAL;
    }
    struct listener **arr = realloc(srv->listeners, (srv->n_listeners + 1) * sizeof *arr);
    if (!arr) return AM_ENOMEM;
    srv->listeners = arr;
    struct listener *l = calloc(1, sizeof *l);
    if (!l) return AM_ENOMEM;
    int rc = uv_tcp_init(srv->loop, &l->tcp);
    if (rc) {
        free(l);
        if (msg) snprintf(msg, msglen, "listen %s: %s", hostport, uv_strerror(rc));
        return AM_EIO;
    }
    l->tcp.data = l;
    l->srv = srv;
    /* libuv sets SO_REUSEADDR on bind; IPV6ONLY lets "[::]:p" and "0.0.0.0:p" coexist. */
    rc = uv_tcp_bind(&l->tcp, &addr.sa, v6 ? UV_TCP_IPV6ONLY : 0);
    if (!rc) rc = uv_listen((uv_stream_t *)&l->tcp, LISTEN_BACKLOG, on_connection);
    int len = sizeof addr;
    if (!rc) rc = uv_tcp_getsockname(&l->tcp, &addr.sa, &len);
    if (rc) {
        if (msg) snprintf(msg, msglen, "listen %s: %s", hostport, uv_strerror(rc));
        /* Closes on its own: nothing of srv is referenced. */
        uv_close((uv_handle_t *)&l->tcp, free_handle);
        return rc == UV_ENOMEM ? AM_ENOMEM : AM_EIO;
    }
    l->port = ntohs(addr.sa.sa_family == AF_INET6 ? addr.s6.sin6_port : addr.s4.sin_port);
    l->open = true;
    srv->listeners[srv->n_listeners++] = l;
    srv->listeners_open++;
    AM_DEBUG("listening on %s (port %d)", hostport, l->port);
    return 0;
}

int am_httpserver_port(const struct am_httpserver *srv, size_t i)
{
    return i < srv->n_listeners ? srv->listeners[i]->port : AM_EINVAL;
}

static void on_drain_timer_closed(uv_handle_t *h)
{
    struct am_httpserver *srv = h->data;
    srv->drain_timer_open = false;
    AM_DEBUG("server drained");
    if (srv->done) srv->done(srv->done_arg);
}

static void srv_maybe_done(struct am_httpserver *srv)
{
    if (!srv->draining || srv->n_live || srv->listeners_open || srv->drain_closing) return;
    srv->drain_closing = true;
    uv_close((uv_handle_t *)&srv->drain_timer, on_drain_timer_closed);
}

static void on_drain_timeout(uv_timer_t *t)
{
    struct am_httpserver *srv = t->data;
    size_t n = 0;
    for (struct conn *c = srv->conns; c; c = c->next) {
        if (c->phase == PH_CLOSED) continue;
        close_now(c);
        n++;
    }
    if (n) AM_INFO("drain timeout: closed %zu connections", n);
}

void am_httpserver_drain(struct am_httpserver *srv, void (*done)(void *arg), void *arg)
{
    if (srv->draining) return;
    srv->draining = true;
    srv->done = done;
    srv->done_arg = arg;
    for (size_t i = 0; i < srv->n_listeners; i++) {
        struct listener *l = srv->listeners[i];
        if (!l->open) continue;
        l->open = false;
        uv_close((uv_handle_t *)&l->tcp, on_listener_closed);
    }
    uv_timer_init(srv->loop, &srv->drain_timer);
    srv->drain_timer.data = srv;
    srv->drain_timer_open = true;
    uv_timer_start(&srv->drain_timer, on_drain_timeout, srv->opts.drain_timeout_ms, 0);
    for (struct conn *c = srv->conns; c; c = c->next) {
        switch (c->phase) {
        case PH_HEAD:
            if (c->head_bytes == 0 && c->rlen == c->rpos) {
                if (c->writes_pending)
                    close_gracefully(c);
                else
                    close_now(c); /* idle keep-alive */
                break;
            }
            c->close_after = true;
            break;
        case PH_BODY:
        case PH_ACTIVE: c->close_after = true; break;
        default: break;
        }
    }
    AM_DEBUG("draining: %zu connections open", srv->n_live);
    srv_maybe_done(srv);
}

void am_httpserver_free(struct am_httpserver *srv)
{
    if (!srv) return;
    assert(srv->n_live == 0 && srv->listeners_open == 0 && !srv->drain_timer_open);
    /* Zombies (exchanges still held by handlers) free themselves when ended. */
    for (struct conn *c = srv->conns, *next; c; c = next) {
        next = c->next;
        c->srv = NULL;
        c->prev = c->next = NULL;
    }
    for (size_t i = 0; i < srv->n_listeners; i++) free(srv->listeners[i]);
    free(srv->listeners);
    am_tls_ctx_free(srv->tls_ctx);
    while (srv->free_wreqs) {
        struct wreq *w = srv->free_wreqs;
        srv->free_wreqs = w->next_free;
        free(w);
    }
    while (srv->free_rbufs) {
        void *b = srv->free_rbufs;
        memcpy(&srv->free_rbufs, b, sizeof(void *));
        free(b);
    }
    free(srv);
}

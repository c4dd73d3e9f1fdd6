/*
 * upstream — the async HTTP/1.1 client for one upstream registry; see
 * include/archmirror/upstream.h.
 *
 * DESIGN
 * Three kinds of object, all owned by the upstream and living on its loop:
 *  - conn: one TCP connection (optionally TLS) to one origin (scheme, host, port): DNS on
 *    the thread pool (IP literals skip it), each address tried in turn, the handshake, a
 *    llhttp response parser and one timer for whichever deadline applies (connect, head,
 *    body idle, pool idle). Idle conns sit in the pool still reading, so a close by the
 *    server is noticed at once and the conn discarded.
 *  - xchg: one request/response on one conn. If a reused conn fails before any response
 *    byte (the server closed it while we wrote), the xchg is retried once on a new conn.
 *  - the policies on top of xchgs: a request (struct am_upstream_req: auth, redirects,
 *    delivery to the caller) and a token fetch (single-flight per scope via tokenauth).
 * The token realm and redirect targets may be other origins; they use the same pool and
 * TLS context. Only the upstream's own origin ever gets its Authorization header (the
 * realm gets the configured Basic credentials, per the token spec). Both kinds of foreign
 * target are refused on loopback/link-local addresses unless allowed or the upstream
 * itself lives there, and an https upstream never leads to plain http.
 *
 * Lifetimes: nothing a caller's callback can reach is freed synchronously. Conns are
 * freed from their handles' close callbacks; finished requests go to a graveyard emptied
 * by the upstream's idle handle in a later loop iteration; the upstream frees itself once
 * that handle and every conn closed. So after each callback the code only checks flags
 * (request done, conn closing, conn given to another xchg) and unwinds.
 *
 * Bytes: body data reaches the caller as views into the conn's read buffer (plain TCP)
 * or its TLS plaintext buffer, never copied. Pausing stops the parser at the exact byte
 * (HPE_PAUSED from on_body / on_headers_complete) and stops reading; the unparsed rest
 * stays in its buffer until resume, which runs from the idle handle, never inside the
 * caller's am_upstream_req_resume.
 */
#include "archmirror/upstream.h"

#include <arpa/inet.h>
#include <llhttp.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include <openssl/evp.h>

#include "archmirror/buf.h"
#include "archmirror/error.h"
#include "archmirror/log.h"
#include "archmirror/metrics.h"
#include "archmirror/tls.h"
#include "archmirror/tokenauth.h"
#include "archmirror/wwwauth.h"

#define READ_BUF_SIZE  65536
#define TLS_PLAIN_SIZE 16384  /* one TLS record's plaintext at most (RFC 8446 §5.1) */
#define DRAIN_MAX      65536  /* a 401/3xx body up to this is read to keep the conn */
#define WIRE_MAX       131072 /* request head: path, Accept, token */
#define PATH_MAX_LEN   16384  /* redirect / realm targets */
#define MAX_CHALLENGES 4
#define MSG_LEN        256

#define container_of(ptr, type, member) ((type *)(void *)((char *)(ptr)-offsetof(type, member)))

/* --- small helpers ---------------------------------------------------------------------- */

struct link {
    struct link *prev, *next;
};

static void link_init(struct link *l)
{
    l->prev = l->next = l;
}
static bool link_empty(const struct link *h)
{
    return h->next == h;
}

static void link_insert(struct link *at, struct link *l)
{
    l->prev = at->prev;
    l->next = at;
    at->prev->next = l;
    at->prev = l;
}
static void link_push_back(struct link *h, struct link *l)
{
    link_insert(h, l);
}
static void link_push_front(struct link *h, struct link *l)
{
    link_insert(h->next, l);
}

/* Unlinks l; a no-op on an unlinked (self-looped) node. */
static void link_remove(struct link *l)
{
    l->prev->next = l->next;
    l->next->prev = l->prev;
    link_init(l);
}

static void vset_msg(char *msg, const char *fmt, va_list ap)
{
    vsnprintf(msg, MSG_LEN, fmt, ap);
}

static void set_msg(char *msg, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void set_msg(char *msg, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vset_msg(msg, fmt, ap);
    va_end(ap);
}

/* Releases memory that held a credential or token. */
static void free_secret(char *s)
{
    if (!s) return;
    explicit_bzero(s, strlen(s));
    free(s);
}

/* Bytes allowed in a request-target we send: visible ASCII (RFC 9112 §3.2). */
static bool target_safe(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)s[i] < 0x21 || (unsigned char)s[i] > 0x7e) return false;
    return true;
}

/* A header value we send: no CR, LF, NUL or other controls but HTAB (RFC 9110 §5.5). */
static bool value_safe(const char *s)
{
    for (; *s; s++)
        if (((unsigned char)*s < 0x20 && *s != '\t') || *s == 0x7f) return false;
    return true;
}

/* --- origins and URLs ------------------------------------------------------------------- */

struct origin {
    bool https;
    uint16_t port;
    char host[256]; /* DNS name or IP literal, without brackets */
};

static bool origin_eq(const struct origin *a, const struct origin *b)
{
    return a->https == b->https && a->port == b->port && strcasecmp(a->host, b->host) == 0;
}

/* "host", "host:port" or "[v6]:port" as the Host header wants it (RFC 9110 §7.2). */
static void origin_hostport(const struct origin *o, char *out, size_t n)
{
    bool v6 = strchr(o->host, ':') != NULL;
    bool dflt = o->port == (o->https ? 443 : 80);
    if (dflt)
        snprintf(out, n, v6 ? "[%s]" : "%s", o->host);
    else
        snprintf(out, n, v6 ? "[%s]:%u" : "%s:%u", o->host, (unsigned)o->port);
}

static bool host_char(char c, bool v6)
{
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9')) return true;
    if (c == '.' || c == '-' || c == '_') return true;
    return v6 && (c == ':' || c == '%');
}

/* Parses an absolute http(s) URL's scheme and authority (RFC 3986 §3); *rest gets the
 * path and query (possibly empty), fragment cut. Userinfo is refused. Returns 0 or
 * AM_EINVAL. */
static int url_parse(const char *s, size_t len, struct origin *o, const char **rest,
                     size_t *rest_len)
{
    size_t i;
    if (len >= 8 && strncasecmp(s, "https://", 8) == 0) {
        o->https = true;
        i = 8;
    } else if (len >= 7 && strncasecmp(s, "http://", 7) == 0) {
        o->https = false;
        i = 7;
    } else {
        return AM_EINVAL;
    }
    const char *a = s + i;
    while (i < len && s[i] != '/' && s[i] != '?' && s[i] != '#') i++;
    size_t alen = (size_t)(s + i - a);
    if (alen == 0 || memchr(a, '@', alen)) return AM_EINVAL;

    const char *host = a, *port = NULL;
    size_t hl, pl = 0;
    bool v6 = a[0] == '[';
    if (v6) {
        const char *rb = memchr(a, ']', alen);
        if (!rb) return AM_EINVAL;
        host = a + 1;
        hl = (size_t)(rb - host);
        size_t used = (size_t)(rb + 1 - a);
        if (used < alen) {
            if (rb[1] != ':') return AM_EINVAL;
            port = rb + 2;
            pl = alen - used - 1;
        }
    } else {
        const char *colon = memchr(a, ':', alen);
        hl = colon ? (size_t)(colon - a) : alen;
        if (colon) {
            port = colon + 1;
            pl = alen - hl - 1;
        }
    }
    if (hl == 0 || hl >= sizeof o->host) return AM_EINVAL;
    for (size_t k = 0; k < hl; k++)
        if (!host_char(host[k], v6)) return AM_EINVAL;
    memcpy(o->host, host, hl);
    o->host[hl] = '\0';
    if (v6) {
        unsigned char tmp[16];
        char plain[sizeof o->host];
        snprintf(plain, sizeof plain, "%s", o->host);
        char *zone = strchr(plain, '%');
        if (zone) *zone = '\0';
        if (inet_pton(AF_INET6, plain, tmp) != 1) return AM_EINVAL;
    }
    if (port) {
        uint64_t v;
        if (am_http_parse_u64(port, pl, &v) || v == 0 || v > 65535) return AM_EINVAL;
        o->port = (uint16_t)v;
    } else {
        o->port = o->https ? 443 : 80;
    }
    const char *r = s + i;
    const char *hash = memchr(r, '#', len - i);
    *rest = r;
    *rest_len = hash ? (size_t)(hash - r) : len - i;
    return 0;
}

/* RFC 3986 §5.2.4 on the path part of s (up to '?'), in place; s starts with '/'. */
static void remove_dot_segments(char *s)
{
    char *q = strchr(s, '?');
    size_t plen = q ? (size_t)(q - s) : strlen(s);
    size_t i = 0, o = 0;
    while (i < plen) {
        size_t j = i + 1;
        while (j < plen && s[j] != '/') j++;
        size_t seg = j - i - 1;
        if (seg == 1 && s[i + 1] == '.') {
            if (j == plen) s[o++] = '/';
        } else if (seg == 2 && s[i + 1] == '.' && s[i + 2] == '.') {
            while (o > 0) {
                if (s[--o] == '/') break;
            }
            if (j == plen) s[o++] = '/';
        } else {
            memmove(s + o, s + i, j - i);
            o += j - i;
        }
        i = j;
    }
    if (o == 0) s[o++] = '/';
    memmove(s + o, s + plen, strlen(s + plen) + 1);
}

/* Resolves a Location value (RFC 9110 §10.2.2: a URI-reference, RFC 3986 §5.2) against
 * the current target. Returns 0 with *o and *path (owned, free()) or AM_EINVAL/ENOMEM. */
static int resolve_location(const struct origin *base, const char *base_path, const char *ref,
                            size_t len, struct origin *o, char **path)
{
    const char *hash = memchr(ref, '#', len);
    if (hash) len = (size_t)(hash - ref);
    if (len == 0 || !target_safe(ref, len)) return AM_EINVAL;

    size_t k = 0;
    while (k < len && ((ref[k] >= 'a' && ref[k] <= 'z') || (ref[k] >= 'A' && ref[k] <= 'Z') ||
                       (k > 0 && ((ref[k] >= '0' && ref[k] <= '9') || ref[k] == '+' ||
                                  ref[k] == '-' || ref[k] == '.'))))
        k++;
    bool has_scheme = k > 0 && k < len && ref[k] == ':';

    struct am_buf b, tmp;
    am_buf_init(&b, PATH_MAX_LEN);
    am_buf_init(&tmp, PATH_MAX_LEN);
    int rc;
    const char *rest;
    size_t rl;
    if (has_scheme || (len >= 2 && ref[0] == '/' && ref[1] == '/')) {
        const char *u = ref;
        size_t ul = len;
        if (!has_scheme) { /* network-path reference: the base's scheme */
            if ((rc = am_buf_append_str(&tmp, base->https ? "https:" : "http:")) ||
                (rc = am_buf_append(&tmp, ref, len)))
                goto fail;
            u = tmp.data;
            ul = tmp.len;
        }
        if ((rc = url_parse(u, ul, o, &rest, &rl))) goto fail;
        if (rl == 0 || rest[0] != '/') rc = am_buf_append_str(&b, "/");
        if (rc || (rc = am_buf_append(&b, rest, rl))) goto fail;
    } else {
        *o = *base;
        size_t bl = strcspn(base_path, "?");
        if (ref[0] == '/') {
            rc = 0;
        } else if (ref[0] == '?') {
            rc = am_buf_append(&b, base_path, bl);
        } else {
            while (bl > 0 && base_path[bl - 1] != '/') bl--;
            rc = bl ? am_buf_append(&b, base_path, bl) : am_buf_append_str(&b, "/");
        }
        if (rc || (rc = am_buf_append(&b, ref, len))) goto fail;
    }
    remove_dot_segments(b.data);
    am_buf_cleanup(&tmp);
    *path = am_buf_steal(&b, NULL);
    return *path ? 0 : AM_ENOMEM;

fail:
    am_buf_cleanup(&b);
    am_buf_cleanup(&tmp);
    return rc == AM_ENOMEM ? AM_ENOMEM : AM_EINVAL;
}

/* Appends s[0..n) percent-encoded except the unreserved set (RFC 3986 §2.3). */
static int append_urlenc(struct am_buf *b, const char *s, size_t n)
{
    static const char hex[] = "0123456789ABCDEF";
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        bool unreserved = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
                          (c >= '0' && c <= '9') || c == '-' || c == '.' || c == '_' || c == '~';
        char e[3] = {'%', hex[c >> 4], hex[c & 15]};
        int rc = unreserved ? am_buf_append(b, &s[i], 1) : am_buf_append(b, e, 3);
        if (rc) return rc;
    }
    return 0;
}

/* Loopback, link-local and unspecified addresses (where a redirect must not lead us
 * unless allowed): 127/8, 0/8, 169.254/16, ::1, ::, fe80::/10, and their v4-mapped
 * forms. */
/* 169.254/16 and fe80::/10: where cloud metadata services answer (169.254.169.254). */
static bool addr_is_link_local(const struct sockaddr *sa)
{
    if (sa->sa_family == AF_INET) {
        uint32_t a = ntohl(((const struct sockaddr_in *)(const void *)sa)->sin_addr.s_addr);
        return (a >> 16) == 0xa9fe;
    }
    if (sa->sa_family == AF_INET6) {
        const uint8_t *b = ((const struct sockaddr_in6 *)(const void *)sa)->sin6_addr.s6_addr;
        static const uint8_t zero[10];
        if (b[0] == 0xfe && (b[1] & 0xc0) == 0x80) return true;
        return memcmp(b, zero, 10) == 0 && b[10] == 0xff && b[11] == 0xff && b[12] == 169 &&
               b[13] == 254;
    }
    return false;
}

static bool addr_is_private(const struct sockaddr *sa)
{
    if (sa->sa_family == AF_INET) {
        uint32_t a = ntohl(((const struct sockaddr_in *)(const void *)sa)->sin_addr.s_addr);
        return (a >> 24) == 127 || (a >> 24) == 0 || (a >> 16) == 0xa9fe;
    }
    if (sa->sa_family == AF_INET6) {
        const uint8_t *b = ((const struct sockaddr_in6 *)(const void *)sa)->sin6_addr.s6_addr;
        static const uint8_t zero[16];
        if (memcmp(b, zero, 15) == 0 && (b[15] == 0 || b[15] == 1)) return true;
        if (b[0] == 0xfe && (b[1] & 0xc0) == 0x80) return true;
        if (memcmp(b, zero, 10) == 0 && b[10] == 0xff && b[11] == 0xff)
            return b[12] == 127 || b[12] == 0 || (b[12] == 169 && b[13] == 254);
        return false;
    }
    return true;
}

/* --- object layouts --------------------------------------------------------------------- */

struct conn;
struct xchg;

/* What happens to the body of a response whose head was just seen. */
enum body_mode {
    XB_DELIVER, /* to ops->on_body */
    XB_DRAIN,   /* read and dropped to keep the conn (bounded; else as XB_CLOSE) */
    XB_CLOSE,   /* not wanted: the conn is closed and on_done(0) runs at once */
};

struct xchg_ops {
    enum body_mode (*on_head)(struct xchg *x, const struct am_upstream_response *resp);
    /* XB_DELIVER bytes (view valid during the call); false abandons like XB_CLOSE. */
    bool (*on_body)(struct xchg *x, const char *p, size_t n);
    /* Once per xchg_start that returned 0: 0 when the response ended (or was abandoned),
     * else an error with x->msg. The conn is already detached. */
    void (*on_done)(struct xchg *x, int status);
    bool is_token; /* counted in stats.token_fetches */
};

struct xchg {
    struct am_upstream *up;
    const struct xchg_ops *ops;
    struct origin org;
    struct am_buf wire; /* the request head, kept for a retry; holds secrets */
    size_t method_len;  /* request line parts inside wire, for the log line */
    size_t target_len;
    bool is_head;
    bool private_ok;    /* may connect to loopback/link-local addresses */
    bool link_local_ok; /* … and to link-local ones in particular */
    bool log_query;     /* the query is ours, not a redirect's (maybe signed) one */
    bool paused;
    bool reused;    /* on a pooled conn */
    bool retried;   /* the one retry on a new conn was used */
    bool got_bytes; /* any response byte arrived */
    enum body_mode mode;
    size_t drained;
    struct conn *conn; /* borrowed while attached */
    char msg[MSG_LEN];
};

enum conn_state { C_RESOLVING, C_CONNECTING, C_HANDSHAKE, C_READY, C_CLOSING };
enum conn_phase { PH_CONNECT, PH_HEAD, PH_BODY, PH_IDLE };
enum hdr_state { HS_NONE, HS_FIELD, HS_VALUE };

struct hdr_pos {
    uint32_t name_off, name_len, value_off, value_len;
};

struct conn {
    struct am_upstream *up;
    struct link link;  /* up->pool (idle) or up->busy */
    struct link defer; /* up->resumes while a resume is queued */
    uint64_t id;
    enum conn_state state;
    enum conn_phase phase;
    struct origin org;
    bool private_ok;
    bool link_local_ok;
    bool pooled;
    uv_timer_t timer;
    uv_tcp_t tcp;
    uv_getaddrinfo_t gai;
    uv_connect_t creq;
    int handles;   /* uv handles not yet closed */
    bool tcp_open; /* tcp initialised and not closing */
    bool gai_pending;
    struct addrinfo *ai_list; /* owned (uv_freeaddrinfo) */
    struct addrinfo *ai_next; /* next address to try */
    struct addrinfo lit_ai;   /* an IP literal as a one-entry list */
    struct sockaddr_storage lit;
    struct sockaddr_storage peer;
    int last_err; /* libuv error of the last failed attempt */
    bool skipped_private;
    bool peer_private;
    bool reading;
    uint64_t last_rx;
    struct am_tls *tls; /* owned, https only */
    llhttp_t parser;
    char *rbuf;       /* owned: socket reads */
    char *pbuf;       /* owned: TLS plaintext */
    const char *pend; /* unparsed bytes while the parser is paused */
    size_t pend_len;
    bool parser_paused;
    /* the response being parsed */
    struct am_buf head; /* reason phrase, then names and values */
    size_t reason_len;  /* the reason phrase is head.data[0..reason_len) */
    struct hdr_pos hdrs[AM_UPSTREAM_MAX_HEADERS];
    size_t n_hdrs;
    enum hdr_state hstate;
    size_t head_fed; /* bytes fed while the head was incomplete */
    bool interim, head_done, msg_done, keepalive, abandon;
    int fail;       /* error decided inside a parser callback */
    struct xchg *x; /* borrowed: the exchange in progress, NULL when idle */
    char msg[MSG_LEN];
};

enum rq_state { RQ_WAIT_TOKEN, RQ_XCHG, RQ_DONE };
enum rq_next { NEXT_NONE, NEXT_FAIL, NEXT_RESEND, NEXT_REDIRECT, NEXT_TOKEN };

struct am_upstream_req {
    struct am_upstream *up;
    struct link link; /* up->reqs while live, up->grave once done */
    struct xchg x;
    struct am_tokenauth_waiter waiter;
    struct am_upstream_cbs cbs;
    void *arg;
    bool is_head;
    char *accept, *range, *scope; /* owned or NULL */
    struct origin org;            /* current target */
    char *path;                   /* owned: current target's path and query */
    bool from_location;
    enum rq_state state;
    enum rq_next next; /* what the response being read leads to */
    int next_status;
    bool auth_retried;
    bool basic_sent;
    char *auth;                /* owned secret: Authorization for the upstream origin */
    char *token;               /* owned secret: the bearer token inside auth */
    char *auth_scope;          /* owned: scope of the token flow */
    struct am_challenge *chal; /* owned: the Bearer challenge being answered */
    struct origin next_org;
    char *next_path;   /* owned: redirect target */
    uint64_t start_ns; /* uv_hrtime() at am_upstream_request, for metrics */
    int final_status;  /* the status delivered by on_head, 0 before */
    unsigned redirects;
};

struct fetch {
    struct am_upstream *up;
    struct link link; /* up->fetches */
    struct xchg x;
    char *scope; /* owned: the cache key */
    int http_status;
    bool too_large;
    struct am_buf body;
};

struct am_upstream {
    uv_loop_t *loop;
    char *name; /* owned */
    struct am_upstream_opts opts;
    struct origin origin;
    char *basic;                 /* owned secret: "Basic …" or NULL */
    bool use_basic;              /* a Basic challenge was answered: send it up front */
    bool self_private;           /* the upstream itself is on a loopback/link-local address */
    struct am_tls_ctx *tls;      /* owned */
    struct am_tokenauth *tokens; /* owned */
    uv_idle_t idle;              /* graveyard and deferred resumes */
    bool idle_closed;
    bool closing;
    struct link reqs, grave, fetches, pool, busy, resumes;
    size_t n_pool;
    size_t n_conns;
    uint64_t next_conn_id;
    struct am_upstream_stats stats;
    char token_msg[MSG_LEN]; /* why the last token fetch failed */
};

/* --- forward declarations --------------------------------------------------------------- */

static void conn_close(struct conn *c);
static void conn_fail(struct conn *c, int status);
static void conn_failf(struct conn *c, int status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static int conn_try_next(struct conn *c);
static void conn_tls_pump(struct conn *c);
static int xchg_start(struct xchg *x, bool fresh);
static void up_maybe_free(struct am_upstream *up);
static void up_schedule(struct am_upstream *up);

/* --- connections: lifetime -------------------------------------------------------------- */

static void conn_maybe_free(struct conn *c)
{
    if (c->state != C_CLOSING || c->handles > 0 || c->gai_pending) return;
    struct am_upstream *up = c->up;
    if (c->ai_list) uv_freeaddrinfo(c->ai_list);
    am_tls_free(c->tls);
    am_buf_cleanup(&c->head);
    free(c->rbuf);
    free(c->pbuf);
    free(c);
    up->n_conns--;
    up_maybe_free(up);
}

static void on_handle_closed(uv_handle_t *h)
{
    struct conn *c = h->data;
    c->handles--;
    conn_maybe_free(c);
}

/* Detaches c's exchange (no callback) and closes c; memory goes with the handles. */
static void conn_close(struct conn *c)
{
    if (c->state == C_CLOSING) return;
    c->state = C_CLOSING;
    if (c->pooled) {
        c->pooled = false;
        c->up->n_pool--;
    }
    link_remove(&c->link);
    link_remove(&c->defer);
    if (c->x) {
        c->x->conn = NULL;
        c->x = NULL;
    }
    uv_close((uv_handle_t *)&c->timer, on_handle_closed);
    if (c->tcp_open) {
        c->tcp_open = false;
        uv_close((uv_handle_t *)&c->tcp, on_handle_closed);
    }
    if (c->gai_pending) uv_cancel((uv_req_t *)&c->gai);
}

static void xchg_failed(struct xchg *x, int status)
{
    struct am_upstream *up = x->up;
    /* RFC 9112 §9.3.1: a request on a reused connection may race the server's close;
     * GET and HEAD are idempotent, so one retry on a new connection is safe. */
    if (status == AM_EUPSTREAM && x->reused && !x->got_bytes && !x->retried && !up->closing) {
        x->retried = true;
        AM_DEBUG("upstream %s: pooled connection failed before a response (%s); retrying", up->name,
                 x->msg);
        int rc = xchg_start(x, true);
        if (rc == 0) return;
        status = rc;
    }
    x->ops->on_done(x, status);
}

/* Ends c's exchange with status (c->msg says why) and closes c. */
static void conn_fail(struct conn *c, int status)
{
    struct xchg *x = c->x;
    if (x) memcpy(x->msg, c->msg, sizeof x->msg);
    conn_close(c);
    if (x) xchg_failed(x, status);
}

static void conn_failf(struct conn *c, int status, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vset_msg(c->msg, fmt, ap);
    va_end(ap);
    conn_fail(c, status);
}

static void conn_hostport(const struct conn *c, char *out, size_t n)
{
    origin_hostport(&c->org, out, n);
}

/* --- connections: deadlines ------------------------------------------------------------- */

static uint64_t phase_ms(const struct conn *c, enum conn_phase ph)
{
    const struct am_upstream_opts *o = &c->up->opts;
    switch (ph) {
    case PH_CONNECT: return o->connect_timeout_ms;
    case PH_HEAD: return o->header_timeout_ms;
    case PH_BODY: return o->idle_timeout_ms;
    case PH_IDLE: return AM_UPSTREAM_POOL_IDLE_MS;
    }
    return 0;
}

static void on_timer(uv_timer_t *t);

/* Enters ph and arms its deadline (0 = none). */
static void conn_arm(struct conn *c, enum conn_phase ph)
{
    uint64_t ms = phase_ms(c, ph);
    c->phase = ph;
    if (ph == PH_BODY) c->last_rx = uv_now(c->up->loop);
    if (ms)
        uv_timer_start(&c->timer, on_timer, ms, 0);
    else
        uv_timer_stop(&c->timer);
}

static void on_timer(uv_timer_t *t)
{
    struct conn *c = t->data;
    uint64_t ms = phase_ms(c, c->phase);
    char hp[300];
    conn_hostport(c, hp, sizeof hp);
    switch (c->phase) {
    case PH_IDLE: conn_close(c); return;
    case PH_BODY: {
        /* Reads only stamp last_rx; the timer catches up here instead of being re-armed on
         * every read. */
        uint64_t idle = uv_now(c->up->loop) - c->last_rx;
        if (idle < ms) {
            uv_timer_start(&c->timer, on_timer, ms - idle, 0);
            return;
        }
        conn_failf(c, AM_EUPSTREAM_TIMEOUT, "no body data from %s for %llu ms", hp,
                   (unsigned long long)ms);
        return;
    }
    case PH_HEAD:
        conn_failf(c, AM_EUPSTREAM_TIMEOUT, "no response head from %s within %llu ms", hp,
                   (unsigned long long)ms);
        return;
    case PH_CONNECT:
        conn_failf(c, AM_EUPSTREAM_TIMEOUT, "connecting to %s timed out after %llu ms", hp,
                   (unsigned long long)ms);
        return;
    }
}

static void conn_stop_reading(struct conn *c)
{
    if (c->reading) {
        uv_read_stop((uv_stream_t *)&c->tcp);
        c->reading = false;
    }
    uv_timer_stop(&c->timer);
}

/* --- connections: writing --------------------------------------------------------------- */

struct wreq {
    uv_write_t req;
    char data[]; /* owned with the request */
};

static void on_write(uv_write_t *req, int status)
{
    struct conn *c = req->data;
    free(container_of(req, struct wreq, req));
    if (status == 0 || c->state == C_CLOSING) return;
    char hp[300];
    conn_hostport(c, hp, sizeof hp);
    conn_failf(c, am_error_from_uv(status), "writing to %s failed: %s", hp, uv_strerror(status));
}

/* Sends w->data[0..n) (w taken). Returns 0 or an AM_E* code. */
static int conn_write_owned(struct conn *c, struct wreq *w, size_t n)
{
    uv_buf_t b = uv_buf_init(w->data, (unsigned)n);
    w->req.data = c;
    int rc = uv_write(&w->req, (uv_stream_t *)&c->tcp, &b, 1, on_write);
    if (rc) {
        free(w);
        return am_error_from_uv(rc);
    }
    return 0;
}

/* Moves the TLS session's outgoing ciphertext to the socket. */
static int conn_tls_flush(struct conn *c)
{
    size_t n;
    while ((n = am_tls_pending(c->tls)) > 0) {
        struct wreq *w = malloc(sizeof *w + n);
        if (!w) return AM_ENOMEM;
        size_t got = am_tls_take(c->tls, w->data, n);
        if (got == 0) {
            free(w);
            return AM_EUPSTREAM_TLS;
        }
        int rc = conn_write_owned(c, w, got);
        if (rc) return rc;
    }
    return 0;
}

/* Writes plaintext p[0..n) (borrowed). */
static int conn_write(struct conn *c, const char *p, size_t n)
{
    if (c->tls) {
        int rc = am_tls_write(c->tls, p, n, c->msg, sizeof c->msg);
        return rc ? rc : conn_tls_flush(c);
    }
    struct wreq *w = malloc(sizeof *w + n);
    if (!w) return AM_ENOMEM;
    memcpy(w->data, p, n);
    return conn_write_owned(c, w, n);
}

/* --- connections: the response parser -------------------------------------------------- */

static void head_reset(struct conn *c)
{
    am_buf_reset(&c->head);
    c->reason_len = 0;
    c->n_hdrs = 0;
    c->hstate = HS_NONE;
}

static int head_append(struct conn *c, const char *at, size_t len)
{
    int rc = am_buf_append(&c->head, at, len);
    if (rc == 0) return 0;
    c->fail = rc == AM_ENOMEM ? AM_ENOMEM : AM_EUPSTREAM_PROTOCOL;
    set_msg(c->msg, "response head from %s is larger than %d bytes", c->org.host,
            AM_UPSTREAM_MAX_HEAD_BYTES);
    return -1;
}

static int on_message_begin(llhttp_t *p)
{
    head_reset(p->data);
    return 0;
}

static int on_status(llhttp_t *p, const char *at, size_t len)
{
    struct conn *c = p->data;
    /* The reason phrase is always the first thing in head. */
    if (head_append(c, at, len)) return -1;
    c->reason_len += len;
    return 0;
}

static void header_finish(struct conn *c)
{
    struct hdr_pos *h = &c->hdrs[c->n_hdrs];
    while (h->value_len > 0 && (c->head.data[h->value_off + h->value_len - 1] == ' ' ||
                                c->head.data[h->value_off + h->value_len - 1] == '\t'))
        h->value_len--;
    c->n_hdrs++;
    c->hstate = HS_NONE;
}

static int on_header_field(llhttp_t *p, const char *at, size_t len)
{
    struct conn *c = p->data;
    if (c->hstate == HS_VALUE) header_finish(c);
    if (c->hstate == HS_NONE) {
        if (c->n_hdrs == AM_UPSTREAM_MAX_HEADERS) {
            c->fail = AM_EUPSTREAM_PROTOCOL;
            set_msg(c->msg, "response from %s has more than %d header fields", c->org.host,
                    AM_UPSTREAM_MAX_HEADERS);
            return -1;
        }
        struct hdr_pos *h = &c->hdrs[c->n_hdrs];
        h->name_off = (uint32_t)c->head.len;
        h->name_len = h->value_off = h->value_len = 0;
        c->hstate = HS_FIELD;
    }
    if (head_append(c, at, len)) return -1;
    c->hdrs[c->n_hdrs].name_len += (uint32_t)len;
    return 0;
}

static int on_header_field_complete(llhttp_t *p)
{
    struct conn *c = p->data;
    c->hdrs[c->n_hdrs].value_off = (uint32_t)c->head.len;
    c->hstate = HS_VALUE;
    return 0;
}

static int on_header_value(llhttp_t *p, const char *at, size_t len)
{
    struct conn *c = p->data;
    if (head_append(c, at, len)) return -1;
    c->hdrs[c->n_hdrs].value_len += (uint32_t)len;
    return 0;
}

static int on_header_value_complete(llhttp_t *p)
{
    struct conn *c = p->data;
    if (c->hstate == HS_VALUE) header_finish(c);
    return 0;
}

static int on_headers_complete(llhttp_t *p)
{
    struct conn *c = p->data;
    struct xchg *x = c->x;
    int status = llhttp_get_status_code(p);
    if (c->hstate == HS_VALUE) header_finish(c);
    if (status < 100 || status > 599) { /* RFC 9112 §4: 3DIGIT; RFC 9110 §15: 100-599 */
        c->fail = AM_EUPSTREAM_PROTOCOL;
        set_msg(c->msg, "%s sent an invalid status code %d", c->org.host, status);
        return -1;
    }
    if (status >= 100 && status < 200) {
        /* Interim responses (RFC 9110 §15.2) precede the real one; 101 would switch
         * protocols, which we never asked for. */
        if (status == 101) {
            c->fail = AM_EUPSTREAM_PROTOCOL;
            set_msg(c->msg, "%s switched protocols unasked", c->org.host);
            return -1;
        }
        c->interim = true;
        return 1; /* RFC 9110 §15.2: a 1xx ends with its header section, no content */
    }
    c->head_done = true;

    struct am_http_header hv[AM_UPSTREAM_MAX_HEADERS];
    const char *base = c->head.data ? c->head.data : "";
    for (size_t i = 0; i < c->n_hdrs; i++) {
        hv[i].name = base + c->hdrs[i].name_off;
        hv[i].name_len = c->hdrs[i].name_len;
        hv[i].value = base + c->hdrs[i].value_off;
        hv[i].value_len = c->hdrs[i].value_len;
    }
    struct am_upstream_response resp = {
        .status = status,
        .reason = base,
        .reason_len = c->reason_len,
        .headers = hv,
        .n_headers = c->n_hdrs,
        .content_length = (p->flags & F_CONTENT_LENGTH) && !(p->flags & F_CHUNKED)
                              ? (int64_t)p->content_length
                              : -1,
    };
    conn_arm(c, PH_BODY);

    enum body_mode m = x->ops->on_head(x, &resp);
    if (c->state == C_CLOSING || c->x != x) return -1; /* cancelled inside the callback */
    x->mode = m;
    x->drained = 0;
    /* A response to HEAD has no body whatever its headers say (RFC 9110 §9.3.2). */
    if (x->is_head) return 1;
    if (m == XB_DRAIN && (llhttp_message_needs_eof(p) ||
                          ((p->flags & F_CONTENT_LENGTH) && p->content_length > DRAIN_MAX)))
        m = XB_CLOSE;
    if (m == XB_CLOSE) {
        c->abandon = true;
        return -1;
    }
    if (m == XB_DELIVER && x->paused) return HPE_PAUSED;
    return 0;
}

static int on_body(llhttp_t *p, const char *at, size_t len)
{
    struct conn *c = p->data;
    struct xchg *x = c->x;
    /* llhttp reopens a body span on every execute, so a resume with nothing left in the
     * buffer yields an empty one: not data, and no reason to call anyone. */
    if (len == 0) return 0;
    if (x->mode == XB_DRAIN) {
        x->drained += len;
        if (x->drained <= DRAIN_MAX) return 0;
        c->abandon = true;
        return -1;
    }
    bool more = x->ops->on_body(x, at, len);
    if (c->state == C_CLOSING || c->x != x) return -1;
    if (!more) {
        c->abandon = true;
        return -1;
    }
    return x->paused ? HPE_PAUSED : 0;
}

static int on_message_complete(llhttp_t *p)
{
    struct conn *c = p->data;
    if (c->interim) {
        c->interim = false;
        return 0;
    }
    c->msg_done = true;
    c->keepalive = llhttp_should_keep_alive(p);
    /* Stop right at the end of this response; what follows is not ours. */
    return HPE_PAUSED;
}

static const llhttp_settings_t parser_settings = {
    .on_message_begin = on_message_begin,
    .on_status = on_status,
    .on_header_field = on_header_field,
    .on_header_value = on_header_value,
    .on_header_field_complete = on_header_field_complete,
    .on_header_value_complete = on_header_value_complete,
    .on_headers_complete = on_headers_complete,
    .on_body = on_body,
    .on_message_complete = on_message_complete,
};

/* --- connections: pool and completion --------------------------------------------------- */

static void on_alloc(uv_handle_t *h, size_t hint, uv_buf_t *buf);
static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf);

static int conn_start_reading(struct conn *c)
{
    if (c->reading) return 0;
    int rc = uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
    if (rc == 0) c->reading = true;
    return rc;
}

static void conn_pool(struct conn *c)
{
    struct am_upstream *up = c->up;
    link_remove(&c->link);
    link_push_front(&up->pool, &c->link);
    c->pooled = true;
    up->n_pool++;
    c->pend = NULL;
    c->pend_len = 0;
    conn_arm(c, PH_IDLE);
    /* Keep reading: that is how a close by the server is noticed. */
    if (conn_start_reading(c)) {
        conn_close(c);
        return;
    }
    while (up->n_pool > up->opts.pool_size)
        conn_close(container_of(up->pool.prev, struct conn, link));
}

/* The response ended; c goes back to the pool or away, then the exchange hears. */
static void conn_complete(struct conn *c)
{
    struct xchg *x = c->x;
    struct am_upstream *up = c->up;
    bool reuse = c->keepalive && !up->closing && up->opts.pool_size > 0 &&
                 (!c->tls || am_tls_buffered(c->tls) == 0);
    c->x = NULL;
    x->conn = NULL;
    if (reuse)
        conn_pool(c);
    else
        conn_close(c);
    x->ops->on_done(x, 0);
}

/* The exchange does not want the rest of this response. */
static void conn_abandon(struct conn *c)
{
    struct xchg *x = c->x;
    conn_close(c);
    x->ops->on_done(x, 0);
}

/* Feeds response bytes p[0..n) (a view into rbuf or pbuf) to the parser. */
static void conn_parse(struct conn *c, const char *p, size_t n)
{
    struct xchg *x = c->x;
    if (!c->head_done) {
        if (c->head_fed > AM_UPSTREAM_MAX_HEAD_BYTES) {
            conn_failf(c, AM_EUPSTREAM_PROTOCOL, "response head from %s is larger than %d bytes",
                       c->org.host, AM_UPSTREAM_MAX_HEAD_BYTES);
            return;
        }
        c->head_fed += n;
    }
    if (n) x->got_bytes = true;
    llhttp_errno_t err = llhttp_execute(&c->parser, p, n);
    if (c->state == C_CLOSING || c->x != x) return;
    if (err == HPE_OK) return;
    if (err == HPE_PAUSED) {
        const char *at = llhttp_get_error_pos(&c->parser);
        if (!at) at = p + n;
        if (c->msg_done) {
            if (at != p + n) c->keepalive = false; /* bytes beyond the response */
            conn_complete(c);
            return;
        }
        /* Flow control: keep the rest where it is until resume. */
        c->parser_paused = true;
        c->pend = at;
        c->pend_len = (size_t)(p + n - at);
        conn_stop_reading(c);
        return;
    }
    if (c->abandon) {
        conn_abandon(c);
        return;
    }
    if (c->fail) {
        conn_fail(c, c->fail);
        return;
    }
    char hp[300];
    conn_hostport(c, hp, sizeof hp);
    conn_failf(c, AM_EUPSTREAM_PROTOCOL, "invalid response from %s: %s (%s)", hp,
               llhttp_errno_name(err), llhttp_get_error_reason(&c->parser));
}

/* The peer ended the stream (err UV_EOF or close_notify) or the read failed. */
static void conn_on_eof(struct conn *c, int err)
{
    char hp[300];
    conn_hostport(c, hp, sizeof hp);
    if (!c->x) {
        AM_DEBUG("upstream %s: conn %llu to %s closed while idle", c->up->name,
                 (unsigned long long)c->id, hp);
        conn_close(c);
        return;
    }
    if (c->state == C_HANDSHAKE) {
        AM_WARN("upstream %s: TLS with %s failed: connection closed during the handshake",
                c->up->name, hp);
        conn_failf(c, AM_EUPSTREAM_TLS, "TLS handshake with %s failed: connection closed", hp);
        return;
    }
    if (err != UV_EOF) {
        conn_failf(c, am_error_from_uv(err), "reading from %s failed: %s", hp, uv_strerror(err));
        return;
    }
    if (!c->x->got_bytes) {
        conn_failf(c, AM_EUPSTREAM, "%s closed the connection before responding", hp);
        return;
    }
    struct xchg *x = c->x;
    llhttp_finish(&c->parser); /* completes a close-delimited body (RFC 9112 §6.3 ¶8) */
    if (c->state == C_CLOSING || c->x != x) return;
    if (c->msg_done) {
        c->keepalive = false;
        conn_complete(c);
        return;
    }
    conn_failf(c, AM_EUPSTREAM, "%s closed the connection in the middle of the response", hp);
}

static void on_alloc(uv_handle_t *h, size_t hint, uv_buf_t *buf)
{
    struct conn *c = h->data;
    *buf = uv_buf_init(c->rbuf, READ_BUF_SIZE);
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    struct conn *c = s->data;
    if (c->state == C_CLOSING || nread == 0) return;
    if (nread < 0) {
        conn_on_eof(c, (int)nread);
        return;
    }
    c->last_rx = uv_now(c->up->loop);
    if (c->tls) {
        if (am_tls_feed(c->tls, buf->base, (size_t)nread)) {
            set_msg(c->msg, "out of memory");
            conn_fail(c, AM_ENOMEM);
            return;
        }
        conn_tls_pump(c);
        return;
    }
    if (!c->x) {
        AM_DEBUG("upstream %s: conn %llu got bytes while idle; discarded", c->up->name,
                 (unsigned long long)c->id);
        conn_close(c);
        return;
    }
    conn_parse(c, buf->base, (size_t)nread);
}

/* --- connections: establishing ---------------------------------------------------------- */

/* Sends c->x's request on a ready conn. Returns 0 or an error (c->msg filled). */
static int conn_send(struct conn *c)
{
    struct xchg *x = c->x;
    struct am_upstream *up = c->up;
    llhttp_init(&c->parser, HTTP_RESPONSE, &parser_settings);
    c->parser.data = c;
    head_reset(c);
    c->interim = c->head_done = c->msg_done = c->keepalive = c->abandon = false;
    c->parser_paused = false;
    c->fail = 0;
    c->pend = NULL;
    c->pend_len = 0;
    c->head_fed = 0;
    int rc = conn_write(c, x->wire.data, x->wire.len);
    if (rc) {
        if (!c->msg[0] || rc != AM_EUPSTREAM_TLS)
            set_msg(c->msg, "sending the request to %s failed: %s", c->org.host,
                    am_error_message(rc));
        return rc;
    }
    up->stats.requests++;
    if (x->ops->is_token) up->stats.token_fetches++;
    if (AM_LOG_DEBUG <= am_log_current_level) {
        char hp[300];
        const char *target = x->wire.data + x->method_len + 1;
        size_t tl = x->target_len;
        const char *q = memchr(target, '?', tl);
        bool cut = q && !x->log_query;
        if (cut) tl = (size_t)(q - target);
        conn_hostport(c, hp, sizeof hp);
        AM_DEBUG("upstream %s: conn %llu%s %.*s %s://%s%.*s%s", up->name, (unsigned long long)c->id,
                 x->reused ? " (reused)" : "", (int)x->method_len, x->wire.data,
                 c->org.https ? "https" : "http", hp, (int)tl, target, cut ? "?…" : "");
    }
    conn_arm(c, PH_HEAD);
    return 0;
}

static void conn_ready(struct conn *c)
{
    c->state = C_READY;
    if (!c->x) return;
    int rc = conn_send(c);
    if (rc) conn_fail(c, rc);
}

static void conn_tls_handshake(struct conn *c)
{
    char hp[300];
    int rc = am_tls_handshake(c->tls, c->msg, sizeof c->msg);
    int frc = conn_tls_flush(c);
    conn_hostport(c, hp, sizeof hp);
    if (rc < 0) {
        AM_WARN("upstream %s: TLS with %s failed: %s", c->up->name, hp, c->msg);
        conn_fail(c, AM_EUPSTREAM_TLS);
        return;
    }
    if (frc) {
        conn_failf(c, frc, "sending the TLS handshake to %s failed: %s", hp, am_error_message(frc));
        return;
    }
    if (rc == 1) {
        AM_DEBUG("upstream %s: conn %llu %s %s with %s", c->up->name, (unsigned long long)c->id,
                 am_tls_version(c->tls), am_tls_cipher(c->tls), hp);
        conn_ready(c);
    }
}

/* Decrypts and parses what the TLS session holds, as far as flow control allows. */
static void conn_tls_pump(struct conn *c)
{
    if (c->state == C_HANDSHAKE) {
        conn_tls_handshake(c);
        if (c->state != C_READY) return;
    }
    while (c->state == C_READY && !c->pend && !(c->x && c->x->paused && c->head_done)) {
        size_t n = 0;
        int rc = am_tls_read(c->tls, c->pbuf, TLS_PLAIN_SIZE, &n, c->msg, sizeof c->msg);
        int frc = conn_tls_flush(c); /* key updates, alerts */
        if (rc == AM_TLS_CLOSED) {
            conn_on_eof(c, UV_EOF);
            return;
        }
        if (rc < 0) {
            conn_fail(c, rc);
            return;
        }
        if (frc) {
            conn_failf(c, frc, "writing to %s failed: %s", c->org.host, am_error_message(frc));
            return;
        }
        if (n == 0) return;
        if (!c->x) {
            AM_DEBUG("upstream %s: conn %llu got data while idle; discarded", c->up->name,
                     (unsigned long long)c->id);
            conn_close(c);
            return;
        }
        conn_parse(c, c->pbuf, n);
    }
}

static void on_connect(uv_connect_t *req, int status);
static void on_attempt_closed(uv_handle_t *h);

static void on_connect(uv_connect_t *req, int status)
{
    struct conn *c = req->data;
    struct am_upstream *up = c->up;
    char hp[300];
    if (c->state == C_CLOSING) return;
    if (status < 0) {
        c->last_err = status;
        c->tcp_open = false;
        uv_close((uv_handle_t *)&c->tcp, on_attempt_closed);
        return;
    }
    conn_hostport(c, hp, sizeof hp);
    c->peer_private = addr_is_private((const struct sockaddr *)&c->peer);
    if (c->peer_private && origin_eq(&c->org, &up->origin)) up->self_private = true;
    up->stats.connections++;
    if (AM_LOG_DEBUG <= am_log_current_level) {
        char ip[64] = "?";
        if (c->peer.ss_family == AF_INET)
            uv_ip4_name((const struct sockaddr_in *)(const void *)&c->peer, ip, sizeof ip);
        else
            uv_ip6_name((const struct sockaddr_in6 *)(const void *)&c->peer, ip, sizeof ip);
        AM_DEBUG("upstream %s: conn %llu connected to %s (%s)", up->name, (unsigned long long)c->id,
                 hp, ip);
    }
    int rc = conn_start_reading(c);
    if (rc) {
        conn_failf(c, AM_EUPSTREAM_CONNECT, "reading from %s failed: %s", hp, uv_strerror(rc));
        return;
    }
    if (!c->org.https) {
        conn_ready(c);
        return;
    }
    rc = am_tls_new(up->tls, c->org.host, &c->tls, c->msg, sizeof c->msg);
    if (rc) {
        if (rc == AM_ENOMEM) set_msg(c->msg, "out of memory");
        conn_fail(c, rc == AM_ENOMEM ? AM_ENOMEM : AM_EUPSTREAM_TLS);
        return;
    }
    c->state = C_HANDSHAKE;
    conn_tls_handshake(c);
}

static void on_attempt_closed(uv_handle_t *h)
{
    struct conn *c = h->data;
    c->handles--;
    if (c->state == C_CLOSING) {
        conn_maybe_free(c);
        return;
    }
    int rc = conn_try_next(c);
    if (rc) conn_fail(c, rc);
}

/* Starts connecting to the next usable address. Returns 0 when an attempt is under way
 * (its outcome comes by callback), or the final error with c->msg filled. */
static int conn_try_next(struct conn *c)
{
    struct am_upstream *up = c->up;
    char hp[300];
    struct addrinfo *ai;
    while ((ai = c->ai_next)) {
        c->ai_next = ai->ai_next;
        if ((ai->ai_family != AF_INET && ai->ai_family != AF_INET6) ||
            ai->ai_addrlen > sizeof c->peer)
            continue;
        if ((!c->private_ok && addr_is_private(ai->ai_addr)) ||
            (!c->link_local_ok && addr_is_link_local(ai->ai_addr))) {
            c->skipped_private = true;
            continue;
        }
        memcpy(&c->peer, ai->ai_addr, ai->ai_addrlen);
        if (ai->ai_family == AF_INET)
            ((struct sockaddr_in *)(void *)&c->peer)->sin_port = htons(c->org.port);
        else
            ((struct sockaddr_in6 *)(void *)&c->peer)->sin6_port = htons(c->org.port);
        int rc = uv_tcp_init(up->loop, &c->tcp);
        if (rc) {
            c->last_err = rc;
            break;
        }
        c->tcp.data = c;
        c->tcp_open = true;
        c->handles++;
        c->state = C_CONNECTING;
        uv_tcp_nodelay(&c->tcp, 1);
        c->creq.data = c;
        rc = uv_tcp_connect(&c->creq, &c->tcp, (const struct sockaddr *)&c->peer, on_connect);
        if (rc) {
            c->last_err = rc;
            c->tcp_open = false;
            uv_close((uv_handle_t *)&c->tcp, on_attempt_closed); /* tries the next one */
        }
        return 0;
    }
    conn_hostport(c, hp, sizeof hp);
    if (!c->last_err && c->skipped_private) {
        set_msg(c->msg,
                "%s resolves only to loopback/link-local addresses; refused "
                "(allow_private_redirects is off)",
                hp);
        return AM_EREDIRECT;
    }
    set_msg(c->msg, "cannot connect to %s: %s", hp,
            c->last_err ? uv_strerror(c->last_err) : "no usable address");
    /* The kernel giving up on SYNs is a timeout; everything else is "cannot connect". */
    return c->last_err == UV_ETIMEDOUT ? AM_EUPSTREAM_TIMEOUT : AM_EUPSTREAM_CONNECT;
}

static void on_resolved(uv_getaddrinfo_t *req, int status, struct addrinfo *res)
{
    struct conn *c = req->data;
    c->gai_pending = false;
    if (c->state == C_CLOSING) {
        if (res) uv_freeaddrinfo(res);
        conn_maybe_free(c);
        return;
    }
    if (status < 0) {
        conn_failf(c, AM_EUPSTREAM_CONNECT, "cannot resolve %s: %s", c->org.host,
                   uv_strerror(status));
        return;
    }
    c->ai_list = res;
    c->ai_next = res;
    int rc = conn_try_next(c);
    if (rc) conn_fail(c, rc);
}

/* Opens a new conn for x (attached on success). Returns 0 (outcome by callbacks) or an
 * error with x->msg filled (x detached, nothing will call back). */
static int conn_new(struct xchg *x)
{
    struct am_upstream *up = x->up;
    struct conn *c = calloc(1, sizeof *c);
    if (!c) goto nomem;
    c->rbuf = malloc(READ_BUF_SIZE);
    if (x->org.https) c->pbuf = malloc(TLS_PLAIN_SIZE);
    if (!c->rbuf || (x->org.https && !c->pbuf)) {
        free(c->rbuf);
        free(c->pbuf);
        free(c);
        goto nomem;
    }
    c->up = up;
    c->org = x->org;
    c->private_ok = x->private_ok;
    c->link_local_ok = x->link_local_ok;
    c->id = ++up->next_conn_id;
    c->state = C_RESOLVING;
    link_init(&c->defer);
    am_buf_init(&c->head, AM_UPSTREAM_MAX_HEAD_BYTES);
    uv_timer_init(up->loop, &c->timer);
    c->timer.data = c;
    c->handles = 1;
    up->n_conns++;
    link_push_back(&up->busy, &c->link);
    c->x = x;
    x->conn = c;
    conn_arm(c, PH_CONNECT);

    int rc;
    struct sockaddr_in *s4 = (struct sockaddr_in *)(void *)&c->lit;
    struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)(void *)&c->lit;
    if (uv_ip4_addr(c->org.host, c->org.port, s4) == 0 ||
        uv_ip6_addr(c->org.host, c->org.port, s6) == 0) {
        /* An IP literal needs no thread-pool round trip. */
        c->lit_ai.ai_family = c->lit.ss_family;
        c->lit_ai.ai_socktype = SOCK_STREAM;
        c->lit_ai.ai_addr = (struct sockaddr *)&c->lit;
        c->lit_ai.ai_addrlen = c->lit.ss_family == AF_INET ? sizeof *s4 : sizeof *s6;
        c->ai_next = &c->lit_ai;
        rc = conn_try_next(c);
    } else {
        struct addrinfo hints = {
            .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM, .ai_protocol = IPPROTO_TCP};
        c->gai.data = c;
        rc = uv_getaddrinfo(up->loop, &c->gai, on_resolved, c->org.host, NULL, &hints);
        if (rc == 0) {
            c->gai_pending = true;
        } else {
            set_msg(c->msg, "cannot resolve %s: %s", c->org.host, uv_strerror(rc));
            rc = AM_EUPSTREAM_CONNECT;
        }
    }
    if (rc) {
        memcpy(x->msg, c->msg, sizeof x->msg);
        conn_close(c); /* detaches x */
        return rc;
    }
    return 0;

nomem:
    set_msg(x->msg, "out of memory");
    return AM_ENOMEM;
}

/* --- exchanges -------------------------------------------------------------------------- */

static void xchg_init(struct xchg *x, struct am_upstream *up, const struct xchg_ops *ops)
{
    memset(x, 0, sizeof *x);
    x->up = up;
    x->ops = ops;
    am_buf_init(&x->wire, WIRE_MAX);
}

static void xchg_cleanup(struct xchg *x)
{
    if (x->wire.data) explicit_bzero(x->wire.data, x->wire.len); /* may hold a token */
    am_buf_cleanup(&x->wire);
}

/* Serialises a request (RFC 9112 §3) for org into x->wire. Strings borrowed. Never
 * Accept-Encoding: blob bytes must arrive exactly as their digest says. */
static int xchg_prepare(struct xchg *x, const struct origin *org, bool is_head, const char *path,
                        const char *accept, const char *range, const char *auth, bool log_query)
{
    struct am_upstream *up = x->up;
    char hp[300];
    const char *method = is_head ? "HEAD" : "GET";
    x->org = *org;
    x->is_head = is_head;
    x->private_ok =
        origin_eq(org, &up->origin) || up->opts.allow_private_redirects || up->self_private;
    /* An upstream that is itself on loopback (a test or sidecar registry) may redirect
     * to loopback, but never to the cloud metadata range unless configured to. */
    x->link_local_ok = origin_eq(org, &up->origin) || up->opts.allow_private_redirects;
    x->log_query = log_query;
    x->retried = false;
    x->method_len = strlen(method);
    x->target_len = strlen(path);
    if (x->wire.data) explicit_bzero(x->wire.data, x->wire.len);
    am_buf_reset(&x->wire);
    origin_hostport(org, hp, sizeof hp);
    int rc = am_buf_appendf(&x->wire, "%s %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: archmirror/%s\r\n",
                            method, path, hp, AM_VERSION);
    if (!rc && accept) rc = am_buf_appendf(&x->wire, "Accept: %s\r\n", accept);
    if (!rc && range) rc = am_buf_appendf(&x->wire, "Range: %s\r\n", range);
    if (!rc && auth) rc = am_buf_appendf(&x->wire, "Authorization: %s\r\n", auth);
    if (!rc) rc = am_buf_append_str(&x->wire, "Connection: keep-alive\r\n\r\n");
    if (rc) set_msg(x->msg, "request too large");
    return rc == AM_ETOO_LARGE ? AM_EINVAL : rc;
}

/* Sends x on a pooled conn to its origin or a new one (fresh: always new). Returns 0
 * (x->ops->on_done follows) or an error (x->msg filled; no callback). */
static int xchg_start(struct xchg *x, bool fresh)
{
    struct am_upstream *up = x->up;
    x->reused = x->got_bytes = false;
    x->msg[0] = '\0';
    if (!fresh) {
        for (struct link *l = up->pool.next; l != &up->pool; l = l->next) {
            struct conn *c = container_of(l, struct conn, link);
            if (!origin_eq(&c->org, &x->org) || (c->peer_private && !x->private_ok) ||
                (!x->link_local_ok && addr_is_link_local((const struct sockaddr *)&c->peer)))
                continue;
            link_remove(&c->link);
            link_push_back(&up->busy, &c->link);
            c->pooled = false;
            up->n_pool--;
            c->x = x;
            x->conn = c;
            x->reused = true;
            c->msg[0] = '\0';
            if (conn_send(c) == 0) return 0;
            conn_close(c); /* broken: a new conn instead */
            x->reused = false;
            break;
        }
    }
    return conn_new(x);
}

/* --- token fetches ---------------------------------------------------------------------- */

static void fetch_free(struct fetch *f)
{
    free(f->scope);
    xchg_cleanup(&f->x);
    if (f->body.data) explicit_bzero(f->body.data, f->body.len);
    am_buf_cleanup(&f->body);
    free(f);
}

static enum body_mode fetch_on_head(struct xchg *x, const struct am_upstream_response *resp)
{
    struct fetch *f = container_of(x, struct fetch, x);
    f->http_status = resp->status;
    return resp->status == 200 ? XB_DELIVER : XB_DRAIN;
}

static bool fetch_on_body(struct xchg *x, const char *p, size_t n)
{
    struct fetch *f = container_of(x, struct fetch, x);
    if (am_buf_append(&f->body, p, n) == 0) return true;
    f->too_large = true;
    return false;
}

static void fetch_on_done(struct xchg *x, int status)
{
    struct fetch *f = container_of(x, struct fetch, x);
    struct am_upstream *up = f->up;
    char msg[MSG_LEN];
    char *token = NULL;
    uint64_t ttl = 0;
    int rc = status;
    link_remove(&f->link);
    if (rc) {
        memcpy(msg, x->msg, sizeof msg);
    } else if (f->too_large) {
        rc = AM_EUPSTREAM_PROTOCOL;
        set_msg(msg, "token response larger than %d bytes", AM_UPSTREAM_MAX_TOKEN_BODY);
    } else if (f->http_status != 200) {
        rc = AM_EUNAUTHORIZED;
        set_msg(msg, "token endpoint answered %d", f->http_status);
    } else {
        rc = am_tokenauth_parse(f->body.data ? f->body.data : "", f->body.len, (int64_t)time(NULL),
                                &token, &ttl, msg, sizeof msg);
    }
    if (rc) {
        AM_WARN("upstream %s: token request to %s failed: %s", up->name, x->org.host, msg);
        set_msg(up->token_msg, "token request to %s failed: %s", x->org.host, msg);
    } else {
        AM_DEBUG("upstream %s: token for scope \"%s\" from %s, valid %llu s", up->name, f->scope,
                 x->org.host, (unsigned long long)(ttl / 1000));
    }
    am_tokenauth_finish(up->tokens, f->scope, rc ? AM_EUNAUTHORIZED : 0, token, ttl,
                        uv_now(up->loop));
    free_secret(token);
    fetch_free(f);
}

static const struct xchg_ops fetch_ops = {fetch_on_head, fetch_on_body, fetch_on_done, true};

/* GET realm?service=…&scope=… (distribution token spec, "Requesting a Token"), with the
 * upstream's Basic credentials if any. Returns 0 (finish comes later) or an error with
 * up->token_msg filled. */
static int fetch_start(struct am_upstream *up, const char *scope, const struct am_challenge *ch)
{
    struct origin org;
    const char *rest;
    size_t rl;
    struct am_buf path;
    int rc;
    am_buf_init(&path, PATH_MAX_LEN);
    if (url_parse(ch->realm, strlen(ch->realm), &org, &rest, &rl) || !target_safe(rest, rl)) {
        AM_WARN("upstream %s: token realm \"%s\" is not a usable http(s) URL", up->name, ch->realm);
        set_msg(up->token_msg, "token realm is not a usable http(s) URL");
        return AM_EUNAUTHORIZED;
    }
    /* The same rule as for redirects: what an https upstream sends (credentials here)
     * never travels in clear text. */
    if (up->origin.https && !org.https) {
        AM_WARN("upstream %s: refusing the plain-http token realm on %s", up->name, org.host);
        set_msg(up->token_msg, "refusing the plain-http token realm on %s", org.host);
        return AM_EUNAUTHORIZED;
    }
    struct fetch *f = calloc(1, sizeof *f);
    if (!f) {
        set_msg(up->token_msg, "out of memory");
        return AM_ENOMEM;
    }
    xchg_init(&f->x, up, &fetch_ops);
    link_init(&f->link);
    f->up = up;
    am_buf_init(&f->body, AM_UPSTREAM_MAX_TOKEN_BODY);
    rc = (f->scope = strdup(scope)) ? 0 : AM_ENOMEM;
    if (!rc && (rl == 0 || rest[0] != '/')) rc = am_buf_append_str(&path, "/");
    if (!rc) rc = am_buf_append(&path, rest, rl);
    char sep = memchr(rest, '?', rl) ? '&' : '?';
    if (!rc && ch->service[0]) {
        if (!(rc = am_buf_appendf(&path, "%cservice=", sep)))
            rc = append_urlenc(&path, ch->service, strlen(ch->service));
        sep = '&';
    }
    /* Several scopes are separate parameters. */
    for (const char *s = scope; !rc && *s;) {
        size_t n = strcspn(s, " ");
        if (n) {
            if (!(rc = am_buf_appendf(&path, "%cscope=", sep))) rc = append_urlenc(&path, s, n);
            sep = '&';
        }
        s += n;
        while (*s == ' ') s++;
    }
    if (!rc)
        rc = xchg_prepare(&f->x, &org, false, path.data, "application/json", NULL, up->basic, true);
    if (!rc) rc = xchg_start(&f->x, false);
    if (rc) {
        AM_WARN("upstream %s: token request to %s failed: %s", up->name, org.host,
                f->x.msg[0] ? f->x.msg : am_error_message(rc));
        set_msg(up->token_msg, "token request to %s failed: %s", org.host,
                f->x.msg[0] ? f->x.msg : am_error_message(rc));
        goto fail;
    }
    am_buf_cleanup(&path);
    link_push_back(&up->fetches, &f->link);
    return 0;

fail:
    am_buf_cleanup(&path);
    fetch_free(f);
    return rc;
}

/* --- requests --------------------------------------------------------------------------- */

static void req_free(struct am_upstream_req *r)
{
    free(r->accept);
    free(r->range);
    free(r->scope);
    free(r->path);
    free(r->next_path);
    free_secret(r->auth);
    free_secret(r->token);
    free(r->auth_scope);
    free(r->chal);
    xchg_cleanup(&r->x);
    free(r);
}

/* Ends r without a callback: detached from its conn or token queue, moved to the
 * graveyard (freed on a later loop iteration, so frames still holding r stay valid). */
static void req_retire(struct am_upstream_req *r)
{
    struct am_upstream *up = r->up;
    r->state = RQ_DONE;
    am_tokenauth_cancel(&r->waiter);
    if (r->x.conn) conn_close(r->x.conn);
    link_remove(&r->link);
    link_push_back(&up->grave, &r->link);
    up_schedule(up);
}

static void req_finish(struct am_upstream_req *r, int status)
{
    if (r->state == RQ_DONE) return;
    req_retire(r);
    am_metrics_count_upstream(r->up->name,
                              status != 0 || r->final_status >= 500 || r->final_status == 429,
                              uv_hrtime() - r->start_ns);
    if (status)
        AM_DEBUG("upstream %s: request failed: %s (%s)", r->up->name, am_error_name(status),
                 r->x.msg);
    r->cbs.on_done(r->arg, status);
}

static int req_send(struct am_upstream_req *r)
{
    struct am_upstream *up = r->up;
    bool ours = origin_eq(&r->org, &up->origin);
    int rc = xchg_prepare(&r->x, &r->org, r->is_head, r->path, r->accept, r->range,
                          ours ? r->auth : NULL, !r->from_location);
    if (rc) return rc;
    r->state = RQ_XCHG;
    r->next = NEXT_NONE;
    return xchg_start(&r->x, false);
}

static int req_set_auth(struct am_upstream_req *r, const char *bearer, const char *basic)
{
    free_secret(r->auth);
    free_secret(r->token);
    r->auth = r->token = NULL;
    if (basic) {
        r->auth = strdup(basic);
        return r->auth ? 0 : AM_ENOMEM;
    }
    size_t n = strlen(bearer);
    r->token = strdup(bearer);
    r->auth = malloc(n + sizeof "Bearer ");
    if (!r->token || !r->auth) return AM_ENOMEM;
    memcpy(r->auth, "Bearer ", 7);
    memcpy(r->auth + 7, bearer, n + 1);
    return 0;
}

static void req_on_token(struct am_tokenauth_waiter *w, int status, const char *token)
{
    struct am_upstream_req *r = container_of(w, struct am_upstream_req, waiter);
    if (r->state != RQ_WAIT_TOKEN) return;
    if (status) {
        memcpy(r->x.msg, r->up->token_msg, sizeof r->x.msg);
        req_finish(r, AM_EUNAUTHORIZED);
        return;
    }
    int rc = req_set_auth(r, token, NULL);
    if (!rc) rc = req_send(r);
    if (rc) req_finish(r, rc);
}

/* After a 401 with a Bearer challenge: a token for auth_scope, then the same request.
 * Returns 0 (progress comes by callback) or an error. */
static int req_get_token(struct am_upstream_req *r)
{
    struct am_upstream *up = r->up;
    r->auth_retried = true;
    const char *tok = am_tokenauth_get(up->tokens, r->auth_scope, uv_now(up->loop));
    if (tok && (!r->token || strcmp(tok, r->token) != 0)) {
        /* Someone else fetched a token while ours was rejected or missing. */
        int rc = req_set_auth(r, tok, NULL);
        return rc ? rc : req_send(r);
    }
    int w = am_tokenauth_wait(up->tokens, r->auth_scope, &r->waiter);
    if (w < 0) return w;
    r->state = RQ_WAIT_TOKEN;
    if (w == 1) {
        int rc = fetch_start(up, r->auth_scope, r->chal);
        if (rc) /* tells every waiter, r included */
            am_tokenauth_finish(up->tokens, r->auth_scope, rc, NULL, 0, uv_now(up->loop));
    }
    return 0;
}

/* 401 from the upstream: plans the auth retry. Returns false when there is none to try
 * (the 401 goes to the caller). */
static bool req_plan_auth(struct am_upstream_req *r, const struct am_upstream_response *resp)
{
    struct am_upstream *up = r->up;
    struct am_challenge ch[MAX_CHALLENGES];
    size_t k = 0;
    for (size_t i = 0; i < resp->n_headers && k < MAX_CHALLENGES; i++) {
        const struct am_http_header *h = &resp->headers[i];
        size_t n = 0;
        if (!am_http_token_eq(h->name, h->name_len, "WWW-Authenticate")) continue;
        if (am_wwwauth_parse(h->value, h->value_len, ch + k, MAX_CHALLENGES - k, &n) == 0) k += n;
    }
    const struct am_challenge *bearer = NULL, *basic = NULL;
    for (size_t i = 0; i < k; i++) {
        if (ch[i].scheme == AM_AUTH_BEARER && ch[i].realm[0] && !bearer) bearer = &ch[i];
        if (ch[i].scheme == AM_AUTH_BASIC && !basic) basic = &ch[i];
    }
    if (bearer) {
        const char *scope = r->scope ? r->scope : bearer->scope;
        if (!r->chal && !(r->chal = malloc(sizeof *r->chal))) return false;
        char *s = strdup(scope);
        if (!s) return false;
        *r->chal = *bearer;
        free(r->auth_scope);
        r->auth_scope = s;
        /* The token we sent was refused: nobody else should send it again. */
        if (r->token) am_tokenauth_del(up->tokens, r->auth_scope, r->token);
        r->next = NEXT_TOKEN;
        return true;
    }
    if (basic && up->basic && !r->basic_sent) {
        if (req_set_auth(r, NULL, up->basic)) return false;
        r->basic_sent = true;
        r->auth_retried = true;
        r->next = NEXT_RESEND;
        return true;
    }
    return false;
}

/* A redirect (RFC 9110 §15.4): plans following it. Returns false when the response
 * goes to the caller as it is (no Location). */
static bool req_plan_redirect(struct am_upstream_req *r, const struct am_upstream_response *resp)
{
    struct am_upstream *up = r->up;
    const struct am_http_header *loc =
        am_http_header_find(resp->headers, resp->n_headers, "Location");
    char hp[300];
    if (!loc || loc->value_len == 0) return false;
    origin_hostport(&r->x.org, hp, sizeof hp);
    r->next = NEXT_FAIL;
    r->next_status = AM_EREDIRECT;
    if (r->redirects >= up->opts.max_redirects) {
        set_msg(r->x.msg, "more than %llu redirects (last from %s)",
                (unsigned long long)up->opts.max_redirects, hp);
        return true;
    }
    free(r->next_path);
    r->next_path = NULL;
    int rc = resolve_location(&r->x.org, r->path, loc->value, loc->value_len, &r->next_org,
                              &r->next_path);
    if (rc) {
        r->next_status = rc == AM_ENOMEM ? AM_ENOMEM : AM_EREDIRECT;
        set_msg(r->x.msg, "%d from %s has an unusable Location", resp->status, hp);
        return true;
    }
    if (r->x.org.https && !r->next_org.https) {
        set_msg(r->x.msg, "refusing a redirect from https://%s to http://%s", hp, r->next_org.host);
        return true;
    }
    r->next = NEXT_REDIRECT;
    return true;
}

static bool is_redirect(int status)
{
    return status == 301 || status == 302 || status == 303 || status == 307 || status == 308;
}

static enum body_mode req_on_head(struct xchg *x, const struct am_upstream_response *resp)
{
    struct am_upstream_req *r = container_of(x, struct am_upstream_req, x);
    struct am_upstream *up = r->up;
    bool ours = origin_eq(&x->org, &up->origin);
    r->next = NEXT_NONE;
    if (resp->status == 401 && ours && !r->auth_retried && req_plan_auth(r, resp)) return XB_DRAIN;
    /* The upstream took our Basic credentials (whatever it answers next). */
    if (ours && r->basic_sent && resp->status != 401) up->use_basic = true;
    if (is_redirect(resp->status) && req_plan_redirect(r, resp))
        return r->next == NEXT_FAIL ? XB_CLOSE : XB_DRAIN;
    r->final_status = resp->status;
    r->cbs.on_head(r->arg, resp);
    return XB_DELIVER;
}

static bool req_on_body(struct xchg *x, const char *p, size_t n)
{
    struct am_upstream_req *r = container_of(x, struct am_upstream_req, x);
    r->cbs.on_body(r->arg, p, n);
    return true;
}

static void req_on_done(struct xchg *x, int status)
{
    struct am_upstream_req *r = container_of(x, struct am_upstream_req, x);
    struct am_upstream *up = r->up;
    int rc = 0;
    /* For a 401 or redirect, only the head mattered: how its body ended does not. */
    switch (r->next) {
    case NEXT_NONE: req_finish(r, status); return;
    case NEXT_FAIL: req_finish(r, r->next_status); return;
    case NEXT_RESEND: rc = req_send(r); break;
    case NEXT_TOKEN: rc = req_get_token(r); break;
    case NEXT_REDIRECT:
        r->redirects++;
        free(r->path);
        r->path = r->next_path;
        r->next_path = NULL;
        r->org = r->next_org;
        r->from_location = true;
        AM_DEBUG("upstream %s: following redirect %u to %s://%s", up->name, r->redirects,
                 r->org.https ? "https" : "http", r->org.host);
        rc = req_send(r);
        break;
    }
    if (rc) req_finish(r, rc);
}

static const struct xchg_ops req_ops = {req_on_head, req_on_body, req_on_done, false};

static int dup_opt(const char *s, char **out)
{
    *out = NULL;
    if (!s) return 0;
    if (!value_safe(s)) return AM_EINVAL;
    *out = strdup(s);
    return *out ? 0 : AM_ENOMEM;
}

int am_upstream_request(struct am_upstream *up, const struct am_upstream_request_opts *opts,
                        const struct am_upstream_cbs *cbs, void *arg, struct am_upstream_req **out)
{
    if (up->closing) return AM_ECANCELED;
    if (!opts->method || !opts->path || opts->path[0] != '/' ||
        !target_safe(opts->path, strlen(opts->path)))
        return AM_EINVAL;
    bool is_head = strcmp(opts->method, "HEAD") == 0;
    if (!is_head && strcmp(opts->method, "GET") != 0) return AM_EINVAL;

    struct am_upstream_req *r = calloc(1, sizeof *r);
    if (!r) return AM_ENOMEM;
    r->start_ns = uv_hrtime();
    xchg_init(&r->x, up, &req_ops);
    link_init(&r->link);
    r->up = up;
    r->cbs = *cbs;
    r->arg = arg;
    r->is_head = is_head;
    r->org = up->origin;
    r->waiter.on_token = req_on_token;
    int rc = dup_opt(opts->accept, &r->accept);
    if (!rc) rc = dup_opt(opts->range, &r->range);
    if (!rc) rc = dup_opt(opts->scope, &r->scope);
    if (!rc) rc = (r->path = strdup(opts->path)) ? 0 : AM_ENOMEM;
    if (rc) goto fail;

    /* A token already known for this scope goes out with the first request, so the
     * issuer is asked once per scope, not once per request; a fetch in flight for it is
     * joined rather than provoking another 401. */
    const char *key = r->scope ? r->scope : "";
    const char *tok = am_tokenauth_get(up->tokens, key, uv_now(up->loop));
    if (tok) {
        rc = req_set_auth(r, tok, NULL);
    } else if (am_tokenauth_fetching(up->tokens, key)) {
        if (!(r->auth_scope = strdup(key))) {
            rc = AM_ENOMEM;
            goto fail;
        }
        rc = am_tokenauth_wait(up->tokens, key, &r->waiter);
        if (rc < 0) goto fail;
        r->state = RQ_WAIT_TOKEN;
        link_push_back(&up->reqs, &r->link);
        if (out) *out = r;
        return 0;
    } else if (up->use_basic) {
        rc = req_set_auth(r, NULL, up->basic);
        r->basic_sent = true;
    }
    if (!rc) rc = req_send(r);
    if (rc) goto fail;
    link_push_back(&up->reqs, &r->link);
    if (out) *out = r;
    return 0;

fail:
    am_tokenauth_cancel(&r->waiter);
    req_free(r);
    return rc;
}

void am_upstream_req_pause(struct am_upstream_req *r)
{
    if (r->state == RQ_DONE || r->x.paused) return;
    r->x.paused = true;
    struct conn *c = r->x.conn;
    if (c && c->state == C_READY && c->head_done) conn_stop_reading(c);
}

/* Continues a paused conn: the bytes kept in place first, then the socket. */
static void conn_resume(struct conn *c)
{
    struct xchg *x = c->x;
    if (c->state != C_READY || !x || x->paused) return;
    if (c->parser_paused) {
        const char *p = c->pend;
        size_t n = c->pend_len;
        c->parser_paused = false;
        c->pend = NULL;
        c->pend_len = 0;
        llhttp_resume(&c->parser);
        /* Even with n == 0: the parser may owe the end of the message. */
        conn_parse(c, p, n);
        if (c->state != C_READY || c->x != x || c->pend) return;
    }
    if (c->tls) {
        conn_tls_pump(c);
        if (c->state != C_READY || c->x != x || c->pend || x->paused) return;
    }
    if (conn_start_reading(c)) {
        conn_failf(c, AM_EUPSTREAM, "reading from %s failed", c->org.host);
        return;
    }
    conn_arm(c, PH_BODY);
}

void am_upstream_req_resume(struct am_upstream_req *r)
{
    if (r->state == RQ_DONE || !r->x.paused) return;
    r->x.paused = false;
    struct conn *c = r->x.conn;
    if (c && c->state == C_READY && c->head_done) {
        link_remove(&c->defer);
        link_push_back(&r->up->resumes, &c->defer);
        up_schedule(r->up);
    }
}

void am_upstream_req_cancel(struct am_upstream_req *r)
{
    if (!r || r->state == RQ_DONE) return;
    req_retire(r);
}

const char *am_upstream_req_message(const struct am_upstream_req *r)
{
    return r->x.msg;
}

/* --- the upstream ----------------------------------------------------------------------- */

static void on_idle(uv_idle_t *h)
{
    struct am_upstream *up = h->data;
    while (!link_empty(&up->grave)) {
        struct am_upstream_req *r = container_of(up->grave.next, struct am_upstream_req, link);
        link_remove(&r->link);
        req_free(r);
    }
    while (!up->closing && !link_empty(&up->resumes)) {
        struct conn *c = container_of(up->resumes.next, struct conn, defer);
        link_remove(&c->defer);
        conn_resume(c);
    }
    if (!up->closing && link_empty(&up->grave) && link_empty(&up->resumes)) uv_idle_stop(h);
}

static void up_schedule(struct am_upstream *up)
{
    if (!up->closing) uv_idle_start(&up->idle, on_idle);
}

static void up_destroy(struct am_upstream *up)
{
    while (!link_empty(&up->grave)) {
        struct am_upstream_req *r = container_of(up->grave.next, struct am_upstream_req, link);
        link_remove(&r->link);
        req_free(r);
    }
    am_tokenauth_free(up->tokens);
    am_tls_ctx_free(up->tls);
    free_secret(up->basic);
    free(up->name);
    free(up);
}

static void up_maybe_free(struct am_upstream *up)
{
    if (up->closing && up->idle_closed && up->n_conns == 0) up_destroy(up);
}

static void on_idle_closed(uv_handle_t *h)
{
    struct am_upstream *up = h->data;
    up->idle_closed = true;
    up_maybe_free(up);
}

/* "Basic base64(user:pass)" (RFC 7617 §2); owned secret or NULL. */
static char *make_basic(const char *user, const char *pass)
{
    size_t n = strlen(user) + 1 + strlen(pass);
    char *plain = malloc(n + 1);
    char *out = malloc(6 + 4 * ((n + 2) / 3) + 1);
    if (!plain || !out || n > INT32_MAX / 2) {
        free(plain);
        free(out);
        return NULL;
    }
    snprintf(plain, n + 1, "%s:%s", user, pass);
    memcpy(out, "Basic ", 6);
    EVP_EncodeBlock((unsigned char *)out + 6, (const unsigned char *)plain, (int)n);
    free_secret(plain);
    return out;
}

int am_upstream_new(uv_loop_t *loop, const struct am_upstream_conf *conf,
                    const struct am_upstream_opts *opts, struct am_upstream **out, char *msg,
                    size_t msglen)
{
    char why[MSG_LEN];
    const char *rest;
    size_t rl;
    int rc;
    struct am_upstream *up = calloc(1, sizeof *up);
    if (!up) return AM_ENOMEM;
    up->loop = loop;
    up->opts = *opts;
    link_init(&up->reqs);
    link_init(&up->grave);
    link_init(&up->fetches);
    link_init(&up->pool);
    link_init(&up->busy);
    link_init(&up->resumes);
    const char *name = conf->name ? conf->name : "";
    if (!(up->name = strdup(name))) goto nomem;
    if (!conf->url || url_parse(conf->url, strlen(conf->url), &up->origin, &rest, &rl) ||
        !(rl == 0 || (rl == 1 && rest[0] == '/'))) {
        snprintf(msg, msglen, "upstream %s: url \"%s\" is not http(s)://host[:port]", name,
                 conf->url ? conf->url : "");
        rc = AM_ECONFIG;
        goto fail;
    }
    if (conf->username) {
        if (strchr(conf->username, ':') || !value_safe(conf->username)) {
            snprintf(msg, msglen, "upstream %s: username must not contain ':' or controls", name);
            rc = AM_ECONFIG;
            goto fail;
        }
        if (!(up->basic = make_basic(conf->username, conf->password ? conf->password : "")))
            goto nomem;
    }
    if ((rc = am_tls_ctx_new(conf->ca_file, conf->insecure, &up->tls, why, sizeof why))) {
        snprintf(msg, msglen, "upstream %s: %s", name, rc == AM_ENOMEM ? "out of memory" : why);
        goto fail;
    }
    if ((rc = am_tokenauth_new(&up->tokens))) goto nomem;
    uv_idle_init(loop, &up->idle);
    up->idle.data = up;
    *out = up;
    return 0;

nomem:
    snprintf(msg, msglen, "out of memory");
    rc = AM_ENOMEM;
fail:
    am_tokenauth_free(up->tokens);
    am_tls_ctx_free(up->tls);
    free_secret(up->basic);
    free(up->name);
    free(up);
    return rc;
}

void am_upstream_free(struct am_upstream *up)
{
    if (!up || up->closing) return;
    up->closing = true;
    while (!link_empty(&up->reqs)) {
        struct am_upstream_req *r = container_of(up->reqs.next, struct am_upstream_req, link);
        req_retire(r);
        set_msg(r->x.msg, "upstream client shut down");
        r->cbs.on_done(r->arg, AM_ECANCELED);
    }
    while (!link_empty(&up->fetches)) {
        struct fetch *f = container_of(up->fetches.next, struct fetch, link);
        link_remove(&f->link);
        if (f->x.conn) conn_close(f->x.conn);
        fetch_free(f);
    }
    while (!link_empty(&up->pool)) conn_close(container_of(up->pool.next, struct conn, link));
    while (!link_empty(&up->busy)) conn_close(container_of(up->busy.next, struct conn, link));
    uv_close((uv_handle_t *)&up->idle, on_idle_closed);
}

const char *am_upstream_name(const struct am_upstream *up)
{
    return up->name;
}

void am_upstream_get_stats(const struct am_upstream *up, struct am_upstream_stats *out)
{
    *out = up->stats;
}

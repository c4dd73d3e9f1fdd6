/*
 * upstream — the async HTTP/1.1 client for one upstream registry.
 *
 * Owns, per upstream: the base URL, a TLS context (OpenSSL; system CA store by default,
 * or the configured CA file; SNI and hostname verification; `insecure` opt-out), a
 * keep-alive pool, and a cache of bearer tokens per scope until expiry. A request
 * transparently runs the registry token flow (401 + WWW-Authenticate → token from the
 * realm with service and scope, anonymous or with configured credentials; Basic when the
 * challenge says so) and follows redirects (307/302/303/301/308, at most max_redirects;
 * Authorization dropped when the host changes; targets on loopback/link-local refused
 * unless allowed). Credentials and tokens are never logged.
 * The caller sees only the final response. Connect, response-head and body-idle timeouts
 * end a request with AM_EUPSTREAM_TIMEOUT. This module never blocks the loop.
 */
#ifndef ARCHMIRROR_UPSTREAM_H
#define ARCHMIRROR_UPSTREAM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "archmirror/config.h"
#include "archmirror/http.h"

struct am_upstream;
struct am_upstream_req;

/* Limits of the client, in one place. */
#define AM_UPSTREAM_MAX_HEAD_BYTES 65536 /* response status line + headers */
#define AM_UPSTREAM_MAX_HEADERS    100   /* response header fields */
#define AM_UPSTREAM_POOL_IDLE_MS   30000 /* an idle pooled connection is closed after this */
#define AM_UPSTREAM_MAX_TOKEN_BODY 65536 /* token endpoint response body */

/* Timeouts of 0 mean none. */
struct am_upstream_opts {
    uint64_t connect_timeout_ms; /* DNS + TCP connect + TLS handshake */
    uint64_t header_timeout_ms;  /* request sent → whole response head received */
    uint64_t idle_timeout_ms;    /* longest silence while a body streams (not while paused) */
    uint64_t pool_size;          /* idle keep-alive connections kept; 0 = no reuse */
    uint64_t max_redirects;      /* 0 = a redirect ends the request with AM_EREDIRECT */
    bool allow_private_redirects;
};

/* conf is copied. Returns 0 with *out owned (am_upstream_free), or AM_ECONFIG /
 * AM_EUPSTREAM_TLS (bad CA file…) with msg filled, or AM_ENOMEM. */
int am_upstream_new(uv_loop_t *loop, const struct am_upstream_conf *conf,
                    const struct am_upstream_opts *opts, struct am_upstream **out, char *msg,
                    size_t msglen);
/* Cancels in-flight requests (their on_done runs with AM_ECANCELED, inside this call),
 * closes pooled connections, and frees once every handle is closed (asynchronously: run
 * the loop). Accepts NULL; a second call before the loop ran is a no-op. */
void am_upstream_free(struct am_upstream *up);
const char *am_upstream_name(const struct am_upstream *up);

struct am_upstream_response {
    int status;
    const char *reason;
    size_t reason_len;
    const struct am_http_header *headers;
    size_t n_headers;
    int64_t content_length; /* -1 when unknown (chunked / close-delimited) */
};

struct am_upstream_cbs {
    /* The final response's head (after auth and redirects). Views valid during the call. */
    void (*on_head)(void *arg, const struct am_upstream_response *resp);
    /* A piece of the body; view valid during the call. Not called for HEAD. */
    void (*on_body)(void *arg, const char *data, size_t len);
    /* Exactly once, unless cancelled: 0 when the whole body arrived (its length matched
     * Content-Length), else an AM_E* code. May come without on_head (connect error,
     * token endpoint failure…). The codes: AM_EUPSTREAM_CONNECT (DNS, refused, no
     * address), AM_EUPSTREAM_TLS (handshake, certificate), AM_EUPSTREAM_TIMEOUT,
     * AM_EUPSTREAM_PROTOCOL (unparseable or oversized head), AM_EUPSTREAM (closed or
     * reset mid-response), AM_EREDIRECT (too many, https→http, Location unusable, target
     * on a loopback/link-local address), AM_EUNAUTHORIZED (token endpoint failed),
     * AM_ECANCELED (am_upstream_free), AM_ENOMEM. am_upstream_req_message says more. */
    void (*on_done)(void *arg, int status);
};

struct am_upstream_request_opts {
    const char *method; /* "GET" or "HEAD" */
    const char *path;   /* absolute path on the upstream, "/v2/library/alpine/manifests/3.20" */
    const char *accept; /* NULL → none */
    const char *range;  /* NULL → none; the Range header value */
    const char *scope;  /* token scope, "repository:library/alpine:pull"; NULL → none */
};

/* Starts a request; opts strings are copied, cbs copied, arg kept until on_done or
 * cancel. Returns 0 (callbacks will follow) or an error (no callback will run). *out
 * (may be NULL) is valid until on_done returns or cancel. Callbacks never run inside
 * this call. Errors: AM_EINVAL (method not GET/HEAD, path not "/…" visible ASCII, a
 * header value with control bytes), AM_ECANCELED (after am_upstream_free), AM_ENOMEM,
 * AM_EUPSTREAM_CONNECT (nothing to connect to). Callbacks may cancel this or any other
 * request, start requests and call am_upstream_free. */
int am_upstream_request(struct am_upstream *up, const struct am_upstream_request_opts *opts,
                        const struct am_upstream_cbs *cbs, void *arg, struct am_upstream_req **out);
/* Flow control: stop/continue reading the body (a slow client downstream). After pause
 * returns (also when called inside on_head/on_body) no on_body runs until resume; resume
 * continues from a later loop iteration, never inside the call. Both are no-ops on a
 * finished request. */
void am_upstream_req_pause(struct am_upstream_req *req);
void am_upstream_req_resume(struct am_upstream_req *req);
/* No callback runs after this returns; the connection is discarded, not pooled. */
void am_upstream_req_cancel(struct am_upstream_req *req);

/* During on_done with an error: one line saying what failed ("cannot connect to
 * 127.0.0.1:5000: connection refused", "certificate verify failed: …"), "" otherwise.
 * Returns a view valid until on_done returns; it never contains credentials or tokens. */
const char *am_upstream_req_message(const struct am_upstream_req *req);

/* Counters for tests and logs. */
struct am_upstream_stats {
    uint64_t requests;      /* requests sent on the wire, retries and token requests included */
    uint64_t token_fetches; /* token endpoint requests */
    uint64_t connections;   /* connections established (TCP connected) */
};
void am_upstream_get_stats(const struct am_upstream *up, struct am_upstream_stats *out);

#endif

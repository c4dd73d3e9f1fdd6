/*
 * httpserver — the HTTP/1.1 server: libuv listeners (IPv4/IPv6), llhttp parsing,
 * keep-alive and pipelining, bounded request heads, header/idle timeouts, a connection
 * cap, and graceful drain.
 *
 * One exchange (request + response) is active per connection at a time; pipelined
 * requests wait in the read buffer until the previous response is queued. The server
 * owns every exchange; a handler borrows it from the handler call until it finishes the
 * response (am_http_respond / am_http_end / am_http_abort) or until on_gone returns.
 * This module knows nothing about registries and must never block the loop.
 *
 * Optionally TLS (am_httpserver_set_tls), with the session as a byte transformer between
 * the socket and the parser; and zero-copy bodies (am_http_sendfile) on plain TCP.
 *
 * The process must ignore SIGPIPE (main.c does): libuv writes with write(2).
 */
#ifndef ARCHMIRROR_HTTPSERVER_H
#define ARCHMIRROR_HTTPSERVER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "archmirror/http.h"

struct am_httpserver;
struct am_http_exchange;

struct am_http_request {
    uint64_t conn_id; /* for log context: "c<conn_id> r<id>" */
    uint64_t id;
    const char *method; /* "GET", "HEAD", … NUL-terminated */
    bool is_head;
    const char *path; /* raw request-target up to '?', NUL-terminated, not decoded */
    size_t path_len;
    const char *query; /* after '?', NUL-terminated, "" when absent */
    size_t query_len;
    const struct am_http_header *headers;
    size_t n_headers;
    const char *peer; /* "127.0.0.1:41234" or "[::1]:41234" */
};

/* Longest request body the server accepts; a longer one gets 413 and the connection
 * closes, without the handler being called. */
#define AM_HTTPSERVER_MAX_BODY (1024 * 1024)

/* Called once per request after the whole request (head and any body, which the server
 * keeps for am_http_req_body) was read. */
typedef void (*am_http_handler_fn)(void *ctx, struct am_http_exchange *ex);

/* 0 means: no limit (max_connections), no timeout (header/idle), close at once on drain
 * (drain_timeout_ms), or the default 16 KiB / 64 (max_header_bytes / max_headers). */
struct am_httpserver_opts {
    uint64_t max_connections;   /* beyond it, new connections get 503 and close */
    uint64_t max_header_bytes;  /* request line + headers; beyond → 431 and close */
    uint64_t max_headers;       /* count; beyond → 431 and close */
    uint64_t header_timeout_ms; /* a started head must complete in this time → 408;
                                 * also the longest pause inside a request body */
    uint64_t idle_timeout_ms;   /* keep-alive connection with no request → closed */
    uint64_t drain_timeout_ms;  /* on drain, in-flight exchanges get this long */
    /* Optional: runs once per exchange as it ends, with the status sent (0 if none), the
     * body bytes written by the handler, whether it completed (false: aborted or the
     * client went away) and its duration. For metrics and access logs; ctx is the
     * handler's. req is a view valid during the call. */
    void (*on_complete)(void *ctx, const struct am_http_request *req, int status,
                        uint64_t body_bytes, bool completed, uint64_t duration_ns);
    /* true: am_http_can_sendfile always says no, so every body is copied (to compare
     * zero-copy with read+write in bench/, and as an escape hatch). */
    bool no_sendfile;
};

/* Returns 0 with *out owned (am_httpserver_free after drain completed) or AM_ENOMEM.
 * handler/ctx are kept until free. */
int am_httpserver_new(uv_loop_t *loop, const struct am_httpserver_opts *opts,
                      am_http_handler_fn handler, void *ctx, struct am_httpserver **out);
/* Binds and listens on "host:port" / "[v6]:port" (port 0 = ephemeral). Returns 0, or
 * AM_EINVAL (unparseable), AM_EIO with msg "address already in use …" etc. */
int am_httpserver_listen(struct am_httpserver *srv, const char *hostport, char *msg, size_t msglen);
/* Speaks TLS on every listener of srv for connections accepted from now on: takes ctx (a
 * server context from am_tls_server_ctx_new), freeing the one it replaces; NULL: plain
 * HTTP again. Connections already open keep the context they started with (a certificate
 * reload never breaks them). The handshake must finish within header_timeout_ms. On TLS
 * connections bodies are always copied (am_http_can_sendfile says no). */
struct am_tls_ctx;
void am_httpserver_set_tls(struct am_httpserver *srv, struct am_tls_ctx *ctx);
/* The port actually bound by the i-th successful listen (for port 0). */
int am_httpserver_port(const struct am_httpserver *srv, size_t i);
/* Stops accepting, closes idle connections, lets active exchanges finish for
 * drain_timeout_ms, then closes the rest; done(arg) runs when no handle is left (always
 * from a callback, never inside this call). done may be NULL. A second call is ignored. */
void am_httpserver_drain(struct am_httpserver *srv, void (*done)(void *arg), void *arg);
/* Call after drain's done ran (or the loop ran dry after a drain), or when no listen
 * ever succeeded. Accepts NULL. */
void am_httpserver_free(struct am_httpserver *srv);

/* --- exchange API (all take a borrowed live exchange) --- */
const struct am_http_request *am_http_request_of(const struct am_http_exchange *ex);
/* The loop the exchange runs on. */
uv_loop_t *am_http_loop(const struct am_http_exchange *ex);
/* First value of a request header, or NULL; *len gets its length. View valid while ex. */
const char *am_http_req_header(const struct am_http_exchange *ex, const char *name, size_t *len);
/* The request body as received (Content-Length or chunked, de-chunked), at most
 * AM_HTTPSERVER_MAX_BODY bytes; "" with *len 0 when there was none. NUL-terminated after
 * the last byte (not counted in *len); it may also contain NULs. len may be NULL.
 * View valid until the exchange ends (or on_gone returns). */
const char *am_http_req_body(const struct am_http_exchange *ex, size_t *len);

/* on_drain: the response's queued bytes fell to zero after writes (use it to resume a
 * paused producer; it may also come when nothing was paused). on_gone: the client went
 * away (or the server force-closed) before the handler finished; ex is invalid after
 * on_gone returns and the handler must not call into it again. Either may be NULL. arg
 * is kept. */
void am_http_set_callbacks(struct am_http_exchange *ex, void (*on_drain)(void *arg),
                           void (*on_gone)(void *arg), void *arg);

/* Ending calls on an exchange whose connection is already gone (client reset, write
 * error) return AM_ECANCELED and still end it; am_http_write then returns AM_ECANCELED
 * and on_gone follows unless the handler ends the exchange first.
 *
 * A complete response with a body copied from body[0..len). reason NULL → standard.
 * Adds Date, Content-Length and Connection as needed; for HEAD the body is not sent but
 * Content-Length still says len. hdrs are copied. Ends the exchange. Returns 0 or an
 * error (the exchange has ended either way). */
int am_http_respond(struct am_http_exchange *ex, int status, const char *reason,
                    const struct am_http_header *hdrs, size_t n_hdrs, const void *body, size_t len);
/* An OCI error response for err (status and code from the error table), message may be
 * NULL. reason NULL → standard phrase. Ends the exchange. */
int am_http_respond_error(struct am_http_exchange *ex, int err, const char *reason,
                          const char *message, const struct am_http_header *hdrs, size_t n_hdrs);

/* Streaming: start with a known content_length (>= 0). For HEAD, start then end.
 * Writes copy their data. The total written must equal content_length before end;
 * otherwise end behaves like abort. */
int am_http_start(struct am_http_exchange *ex, int status, const char *reason,
                  const struct am_http_header *hdrs, size_t n_hdrs, uint64_t content_length);
int am_http_write(struct am_http_exchange *ex, const void *data, size_t len);
/* Bytes written by the handler but not yet accepted by the kernel. */
size_t am_http_queued(const struct am_http_exchange *ex);
int am_http_end(struct am_http_exchange *ex);

/* Zero-copy bodies. Whether am_http_sendfile may be called now: a started response with a
 * body, on a plain-TCP connection, with nothing queued (its bytes must follow the queued
 * ones), sendfile not disabled. */
bool am_http_can_sendfile(const struct am_http_exchange *ex);
/* Sends up to len body bytes of the regular file fd (borrowed; it must stay open until
 * the call returns) from off, straight from the page cache with sendfile(2), without
 * blocking on the socket: the caller must know the range is resident (pagecache.h), or
 * the loop would wait for the disk. Returns 0 with *sent (possibly 0: the socket is full);
 * on_drain follows when the socket can take more, so the caller continues from there
 * (one call per wakeup keeps a fast client from starving the others). AM_EINVAL when
 * am_http_can_sendfile is false or len exceeds the rest of the body, AM_ENOMEM (nothing
 * sent: use am_http_write), AM_ECANCELED (connection gone), AM_EIO (send failed: the
 * connection is closed and on_gone follows). */
int am_http_sendfile(struct am_http_exchange *ex, int fd, uint64_t off, size_t len, size_t *sent);
/* Ends the exchange by closing the connection (used when a body cannot be completed:
 * a client must never see a short response that looks whole). */
void am_http_abort(struct am_http_exchange *ex);

#endif

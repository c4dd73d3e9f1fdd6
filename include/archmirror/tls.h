/*
 * tls — TLS (OpenSSL) as a pure byte transformer, so it runs on any libuv stream: client
 * sessions to upstreams, server sessions on archmirror's own listeners.
 *
 * A session never touches a socket: ciphertext read from the peer goes in with
 * am_tls_feed, plaintext comes out of am_tls_read; plaintext to send goes in with
 * am_tls_write and the ciphertext to put on the wire comes out of am_tls_take. Both sides
 * are OpenSSL memory BIOs, the only copies TLS itself needs.
 *
 * A context (one per upstream) fixes the trust: the system CA store, or exactly the
 * configured CA file; TLS 1.2 or later; ALPN "http/1.1"; no renegotiation. A session
 * sends SNI for DNS names and verifies the certificate against the host name
 * (RFC 6125 via X509_VERIFY_PARAM, no partial wildcards) or the IP address. The
 * `insecure` context skips verification, an explicit opt-out. Verification failures are
 * reported with OpenSSL's reason ("certificate verify failed: self-signed certificate in
 * certificate chain").
 *
 * A server context holds one certificate chain and its private key (read from PEM files
 * when it is made; a reload is a new context), TLS 1.2 or later, ALPN "http/1.1" when the
 * client offers it, no renegotiation, no client certificates. Its sessions release their
 * record buffers while idle, so thousands of idle keep-alive connections stay small.
 *
 * This module never logs and never blocks (server contexts read their files when made,
 * at start-up or on SIGHUP, before any session uses them). The only secret it holds is a
 * server context's private key, inside OpenSSL; it never copies it out.
 */
#ifndef ARCHMIRROR_TLS_H
#define ARCHMIRROR_TLS_H

#include <stdbool.h>
#include <stddef.h>

struct am_tls_ctx;
struct am_tls;

/* am_tls_read's return when the peer sent close_notify (a clean end of stream). */
#define AM_TLS_CLOSED 1

/* ca_file borrowed (NULL: the system store). Returns 0 with *out owned
 * (am_tls_ctx_free), AM_EUPSTREAM_TLS with msg (CA file unreadable or without a
 * certificate, OpenSSL setup failure), or AM_ENOMEM. */
int am_tls_ctx_new(const char *ca_file, bool insecure, struct am_tls_ctx **out, char *msg,
                   size_t msglen);
/* Accepts NULL. Sessions hold a reference, so they may outlive the context. */
void am_tls_ctx_free(struct am_tls_ctx *ctx);

/* A server context from cert_file (PEM: the leaf certificate first, then intermediates)
 * and key_file (PEM private key matching it), both borrowed. Returns 0 with *out owned
 * (am_tls_ctx_free), AM_EINVAL with msg (a file unreadable, not PEM, or a key that does
 * not match the certificate; msg names the file and OpenSSL's reason, never key bytes),
 * AM_EUPSTREAM_TLS with msg (OpenSSL setup failure) or AM_ENOMEM. */
int am_tls_server_ctx_new(const char *cert_file, const char *key_file, struct am_tls_ctx **out,
                          char *msg, size_t msglen);
/* One line about a server context's certificate for logs: subject, serial and notAfter,
 * e.g. "CN=mirror.internal serial 1F expires Dec  1 00:00:00 2027 GMT". */
void am_tls_ctx_describe(const struct am_tls_ctx *ctx, char *buf, size_t len);

/* Starts a server session on a server context (the session keeps its own reference to
 * it). Returns 0 with *out owned (am_tls_free) or AM_ENOMEM. Its am_tls_handshake
 * waits for the ClientHello; its errors come back as AM_EUPSTREAM_TLS too (any TLS
 * failure, whichever side). */
int am_tls_accept(struct am_tls_ctx *ctx, struct am_tls **out);
/* Whether a session holds input it has not returned yet: decrypted bytes or ciphertext
 * fed but not yet decrypted (a pipelined request may wait there with the socket quiet). */
bool am_tls_has_input(const struct am_tls *t);
/* Queues a close_notify alert (take it with am_tls_take) before a clean close. */
void am_tls_close_notify(struct am_tls *t);

/* Starts a client session for host (borrowed; a DNS name or an IPv4/IPv6 literal without
 * brackets). Returns 0 with *out owned (am_tls_free), AM_EINVAL (host unusable for
 * verification, msg filled) or AM_ENOMEM. The first am_tls_handshake produces the
 * ClientHello. */
int am_tls_new(struct am_tls_ctx *ctx, const char *host, struct am_tls **out, char *msg,
               size_t msglen);
void am_tls_free(struct am_tls *t); /* accepts NULL */

/* Queues len bytes of ciphertext received from the peer (copied). Returns 0 or
 * AM_ENOMEM. */
int am_tls_feed(struct am_tls *t, const void *data, size_t len);

/* Advances the handshake. Returns 1 once it completed (certificate verified), 0 when it
 * needs more input (send am_tls_take's output first), or AM_EUPSTREAM_TLS with msg. */
int am_tls_handshake(struct am_tls *t, char *msg, size_t msglen);

/* Decrypts into buf[0..cap). Returns 0 with *n > 0 bytes, 0 with *n == 0 when it needs
 * more input, AM_TLS_CLOSED after the peer's close_notify, or AM_EUPSTREAM_TLS with msg.
 * Reading may produce ciphertext to send (key updates): check am_tls_pending after. */
int am_tls_read(struct am_tls *t, char *buf, size_t cap, size_t *n, char *msg, size_t msglen);
/* Decrypted bytes already buffered inside the session (readable without more input). */
size_t am_tls_buffered(const struct am_tls *t);

/* Encrypts len bytes (borrowed) into the outgoing ciphertext. Only after the handshake.
 * Returns 0, AM_ENOMEM or AM_EUPSTREAM_TLS with msg. */
int am_tls_write(struct am_tls *t, const void *data, size_t len, char *msg, size_t msglen);
/* Bytes of ciphertext waiting to be sent. */
size_t am_tls_pending(const struct am_tls *t);
/* Moves up to cap bytes of waiting ciphertext into out; returns how many. */
size_t am_tls_take(struct am_tls *t, void *out, size_t cap);

/* "TLSv1.3" etc. and the negotiated cipher; static strings, for DEBUG logs. */
const char *am_tls_version(const struct am_tls *t);
const char *am_tls_cipher(const struct am_tls *t);

#endif

/*
 * tls — OpenSSL client sessions over memory BIOs; see include/archmirror/tls.h.
 *
 * The two BIOs are plain BIO_s_mem buffers: the read BIO holds ciphertext the caller fed
 * and OpenSSL has not consumed yet (a partial record), the write BIO holds ciphertext
 * OpenSSL produced and the caller has not taken yet. An empty read BIO reports "retry",
 * never end-of-file, so OpenSSL answers SSL_ERROR_WANT_READ and the caller's event loop
 * decides when the stream really ended. OpenSSL's error queue is per thread and shared,
 * so every operation clears it first and drains it when it reports a failure.
 */
#include "archmirror/tls.h"

#include <arpa/inet.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include "archmirror/error.h"

struct am_tls_ctx {
    SSL_CTX *ctx; /* owned reference */
    bool insecure;
    bool server;
};

struct am_tls {
    SSL *ssl;  /* owned; owns both BIOs and a reference to the SSL_CTX */
    BIO *rbio; /* borrowed from ssl: ciphertext in */
    BIO *wbio; /* borrowed from ssl: ciphertext out */
};

/* ALPN protocol list (RFC 7301 §3.1): length-prefixed names. */
static const unsigned char alpn_http11[] = "\x08http/1.1";

/* The most specific reason OpenSSL queued, as text; empties the queue. */
static void openssl_reason(char *buf, size_t len)
{
    unsigned long e = ERR_peek_last_error();
    const char *reason = e ? ERR_reason_error_string(e) : NULL;
    if (reason) {
        snprintf(buf, len, "%s", reason);
    } else if (e) {
        ERR_error_string_n(e, buf, len);
    } else {
        snprintf(buf, len, "unknown error");
    }
    ERR_clear_error();
}

/* What every context shares: TLS 1.2 or later (1.0/1.1 are deprecated, RFC 8996), no
 * renegotiation, no compression (CRIME). Returns the SSL_CTX owned, or NULL with msg. */
static SSL_CTX *base_ctx(const SSL_METHOD *method, uint64_t options, char *msg, size_t msglen)
{
    char why[256];
    ERR_clear_error();
    SSL_CTX *ctx = SSL_CTX_new(method);
    if (!ctx) {
        openssl_reason(why, sizeof why);
        am_error_setmsg(msg, msglen, "cannot create a TLS context: %s", why);
        return NULL;
    }
    if (SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION) != 1) {
        openssl_reason(why, sizeof why);
        am_error_setmsg(msg, msglen, "cannot require TLS 1.2: %s", why);
        SSL_CTX_free(ctx);
        return NULL;
    }
    SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION | SSL_OP_NO_COMPRESSION | options);
    return ctx;
}

int am_tls_ctx_new(const char *ca_file, bool insecure, struct am_tls_ctx **out, char *msg,
                   size_t msglen)
{
    char why[256];
    struct am_tls_ctx *c = calloc(1, sizeof *c);
    if (!c) return AM_ENOMEM;
    c->insecure = insecure;
    if (!(c->ctx = base_ctx(TLS_client_method(), 0, msg, msglen))) goto fail;
    /* SSL_CTX_set_alpn_protos returns 0 on success, unlike the rest of the API. */
    if (SSL_CTX_set_alpn_protos(c->ctx, alpn_http11, sizeof alpn_http11 - 1) != 0) {
        openssl_reason(why, sizeof why);
        am_error_setmsg(msg, msglen, "cannot set ALPN: %s", why);
        goto fail;
    }
    if (insecure) {
        SSL_CTX_set_verify(c->ctx, SSL_VERIFY_NONE, NULL);
    } else {
        SSL_CTX_set_verify(c->ctx, SSL_VERIFY_PEER, NULL);
        int ok = ca_file ? SSL_CTX_load_verify_locations(c->ctx, ca_file, NULL)
                         : SSL_CTX_set_default_verify_paths(c->ctx);
        if (ok != 1) {
            openssl_reason(why, sizeof why);
            if (ca_file)
                am_error_setmsg(msg, msglen, "cannot load CA file %s: %s", ca_file, why);
            else
                am_error_setmsg(msg, msglen, "cannot load the system CA store: %s", why);
            goto fail;
        }
    }
    *out = c;
    return 0;

fail:
    am_tls_ctx_free(c);
    return AM_EUPSTREAM_TLS;
}

void am_tls_ctx_free(struct am_tls_ctx *ctx)
{
    if (!ctx) return;
    SSL_CTX_free(ctx->ctx);
    free(ctx);
}

/* ALPN on the server: http/1.1 if offered; otherwise carry on without ALPN (RFC 7301
 * §3.2 allows a fatal alert, but a client offering only h2 can still speak HTTP/1.1). */
static int select_alpn(SSL *ssl, const unsigned char **out, unsigned char *outlen,
                       const unsigned char *in, unsigned int inlen, void *arg)
{
    (void)ssl;
    (void)arg;
    unsigned char *sel = NULL;
    if (SSL_select_next_proto(&sel, outlen, alpn_http11, sizeof alpn_http11 - 1, in, inlen) ==
        OPENSSL_NPN_NEGOTIATED) {
        *out = sel;
        return SSL_TLSEXT_ERR_OK;
    }
    return SSL_TLSEXT_ERR_NOACK;
}

int am_tls_server_ctx_new(const char *cert_file, const char *key_file, struct am_tls_ctx **out,
                          char *msg, size_t msglen)
{
    char why[256];
    int rc = AM_EUPSTREAM_TLS;
    struct am_tls_ctx *c = calloc(1, sizeof *c);
    if (!c) return AM_ENOMEM;
    c->server = true;
    if (!(c->ctx = base_ctx(TLS_server_method(), SSL_OP_CIPHER_SERVER_PREFERENCE, msg, msglen)))
        goto fail;
    SSL_CTX_set_mode(c->ctx, SSL_MODE_RELEASE_BUFFERS);
    SSL_CTX_set_verify(c->ctx, SSL_VERIFY_NONE, NULL);
    SSL_CTX_set_alpn_select_cb(c->ctx, select_alpn, NULL);
    rc = AM_EINVAL;
    if (SSL_CTX_use_certificate_chain_file(c->ctx, cert_file) != 1) {
        openssl_reason(why, sizeof why);
        am_error_setmsg(msg, msglen, "certificate file %s: %s", cert_file, why);
        goto fail;
    }
    if (SSL_CTX_use_PrivateKey_file(c->ctx, key_file, SSL_FILETYPE_PEM) != 1) {
        bool mismatch = ERR_GET_REASON(ERR_peek_last_error()) == X509_R_KEY_VALUES_MISMATCH;
        openssl_reason(why, sizeof why);
        if (mismatch)
            am_error_setmsg(msg, msglen, "key file %s does not match certificate file %s", key_file,
                            cert_file);
        else
            am_error_setmsg(msg, msglen, "key file %s: %s", key_file, why);
        goto fail;
    }
    if (SSL_CTX_check_private_key(c->ctx) != 1) {
        openssl_reason(why, sizeof why);
        am_error_setmsg(msg, msglen, "key file %s does not match certificate file %s: %s", key_file,
                        cert_file, why);
        goto fail;
    }
    *out = c;
    return 0;

fail:
    am_tls_ctx_free(c);
    return rc;
}

void am_tls_ctx_describe(const struct am_tls_ctx *ctx, char *buf, size_t len)
{
    X509 *x = ctx && ctx->ctx ? SSL_CTX_get0_certificate(ctx->ctx) : NULL;
    if (!len) return;
    snprintf(buf, len, "no certificate");
    if (!x) return;
    char subj[256] = "?", serial[80] = "?", until[64] = "?";
    X509_NAME_oneline(X509_get_subject_name(x), subj, sizeof subj);
    BIGNUM *bn = ASN1_INTEGER_to_BN(X509_get0_serialNumber(x), NULL);
    char *hex = bn ? BN_bn2hex(bn) : NULL;
    if (hex) snprintf(serial, sizeof serial, "%s", hex);
    OPENSSL_free(hex);
    BN_free(bn);
    BIO *m = BIO_new(BIO_s_mem());
    if (m && ASN1_TIME_print(m, X509_get0_notAfter(x)) == 1) {
        int n = BIO_read(m, until, (int)sizeof until - 1);
        until[n > 0 ? n : 0] = '\0';
    }
    BIO_free(m);
    ERR_clear_error();
    snprintf(buf, len, "%s serial %s expires %s", subj, serial, until);
}

/* The session object both kinds share: SSL plus the two memory BIOs. */
static int session_new(struct am_tls_ctx *ctx, struct am_tls **out)
{
    struct am_tls *t = calloc(1, sizeof *t);
    if (!t) return AM_ENOMEM;
    ERR_clear_error();
    t->ssl = SSL_new(ctx->ctx);
    if (!t->ssl) goto nomem;
    t->rbio = BIO_new(BIO_s_mem());
    t->wbio = BIO_new(BIO_s_mem());
    if (!t->rbio || !t->wbio) {
        BIO_free(t->rbio);
        BIO_free(t->wbio);
        goto nomem;
    }
    /* Empty means "no input yet", not end of stream. */
    BIO_set_mem_eof_return(t->rbio, -1);
    SSL_set_bio(t->ssl, t->rbio, t->wbio);
    *out = t;
    return 0;

nomem:
    ERR_clear_error();
    am_tls_free(t);
    return AM_ENOMEM;
}

int am_tls_accept(struct am_tls_ctx *ctx, struct am_tls **out)
{
    struct am_tls *t;
    int rc = session_new(ctx, &t);
    if (rc) return rc;
    SSL_set_accept_state(t->ssl);
    *out = t;
    return 0;
}

bool am_tls_has_input(const struct am_tls *t)
{
    return SSL_pending(t->ssl) > 0 || BIO_ctrl_pending(t->rbio) > 0;
}

void am_tls_close_notify(struct am_tls *t)
{
    ERR_clear_error();
    if (SSL_is_init_finished(t->ssl)) SSL_shutdown(t->ssl); /* 0: sent, not yet answered */
    ERR_clear_error();
}

int am_tls_new(struct am_tls_ctx *ctx, const char *host, struct am_tls **out, char *msg,
               size_t msglen)
{
    unsigned char ipbuf[16];
    bool is_ip = inet_pton(AF_INET, host, ipbuf) == 1 || inet_pton(AF_INET6, host, ipbuf) == 1;
    struct am_tls *t;
    int rc = session_new(ctx, &t);
    if (rc) return rc;
    SSL_set_connect_state(t->ssl);

    /* SNI carries DNS names only (RFC 6066 §3). */
    if (!is_ip && SSL_set_tlsext_host_name(t->ssl, host) != 1) {
        am_error_setmsg(msg, msglen, "host name %s cannot be sent as SNI", host);
        goto inval;
    }
    if (!ctx->insecure) {
        X509_VERIFY_PARAM *param = SSL_get0_param(t->ssl);
        X509_VERIFY_PARAM_set_hostflags(param, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
        int ok = is_ip ? X509_VERIFY_PARAM_set1_ip_asc(param, host) : SSL_set1_host(t->ssl, host);
        if (ok != 1) {
            am_error_setmsg(msg, msglen, "host %s cannot be verified", host);
            goto inval;
        }
    }
    *out = t;
    return 0;

inval:
    ERR_clear_error();
    am_tls_free(t);
    return AM_EINVAL;
}

void am_tls_free(struct am_tls *t)
{
    if (!t) return;
    SSL_free(t->ssl); /* frees both BIOs once SSL_set_bio ran */
    free(t);
}

int am_tls_feed(struct am_tls *t, const void *data, size_t len)
{
    size_t written = 0;
    if (len == 0) return 0;
    if (BIO_write_ex(t->rbio, data, len, &written) != 1 || written != len) {
        ERR_clear_error();
        return AM_ENOMEM;
    }
    return 0;
}

/* Text for a failed handshake or record operation. */
static void describe_failure(struct am_tls *t, int sslerr, const char *what, char *msg,
                             size_t msglen)
{
    char why[256];
    long vr = SSL_get_verify_result(t->ssl);
    if (vr != X509_V_OK) {
        ERR_clear_error();
        am_error_setmsg(msg, msglen, "certificate verify failed: %s",
                        X509_verify_cert_error_string(vr));
        return;
    }
    if (sslerr == SSL_ERROR_ZERO_RETURN) {
        ERR_clear_error();
        am_error_setmsg(msg, msglen, "%s: peer closed the TLS session", what);
        return;
    }
    openssl_reason(why, sizeof why);
    am_error_setmsg(msg, msglen, "%s: %s", what, why);
}

int am_tls_handshake(struct am_tls *t, char *msg, size_t msglen)
{
    ERR_clear_error();
    int rc = SSL_do_handshake(t->ssl);
    if (rc == 1) return 1;
    int err = SSL_get_error(t->ssl, rc);
    if (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE) return 0;
    describe_failure(t, err, "TLS handshake failed", msg, msglen);
    return AM_EUPSTREAM_TLS;
}

int am_tls_read(struct am_tls *t, char *buf, size_t cap, size_t *n, char *msg, size_t msglen)
{
    size_t got = 0;
    *n = 0;
    ERR_clear_error();
    if (SSL_read_ex(t->ssl, buf, cap, &got) == 1) {
        *n = got;
        return 0;
    }
    int err = SSL_get_error(t->ssl, 0);
    switch (err) {
    case SSL_ERROR_WANT_READ:
    case SSL_ERROR_WANT_WRITE: return 0;
    case SSL_ERROR_ZERO_RETURN: return AM_TLS_CLOSED;
    default: describe_failure(t, err, "TLS read failed", msg, msglen); return AM_EUPSTREAM_TLS;
    }
}

size_t am_tls_buffered(const struct am_tls *t)
{
    int n = SSL_pending(t->ssl);
    return n > 0 ? (size_t)n : 0;
}

int am_tls_write(struct am_tls *t, const void *data, size_t len, char *msg, size_t msglen)
{
    size_t written = 0;
    ERR_clear_error();
    /* Memory BIOs grow, so without partial-write mode a write either takes everything
     * or fails. */
    if (SSL_write_ex(t->ssl, data, len, &written) == 1 && written == len) return 0;
    int err = SSL_get_error(t->ssl, 0);
    if (err == SSL_ERROR_SSL && ERR_GET_REASON(ERR_peek_last_error()) == ERR_R_MALLOC_FAILURE) {
        ERR_clear_error();
        return AM_ENOMEM;
    }
    describe_failure(t, err, "TLS write failed", msg, msglen);
    return AM_EUPSTREAM_TLS;
}

size_t am_tls_pending(const struct am_tls *t)
{
    return BIO_ctrl_pending(t->wbio);
}

size_t am_tls_take(struct am_tls *t, void *out, size_t cap)
{
    size_t got = 0;
    if (cap == 0) return 0;
    if (BIO_read_ex(t->wbio, out, cap, &got) != 1) {
        ERR_clear_error();
        return 0;
    }
    return got;
}

const char *am_tls_version(const struct am_tls *t)
{
    return SSL_get_version(t->ssl);
}

const char *am_tls_cipher(const struct am_tls *t)
{
    const char *c = SSL_get_cipher_name(t->ssl);
    return c ? c : "none";
}

/* Unit tests for src/tls.c: server contexts from PEM files and a client and a server
 * session talking to each other through memory only (no sockets), so the handshake,
 * ALPN, records both ways, buffered input and close_notify are checked byte for byte.
 * Certificates are made here with OpenSSL (a CA and a leaf for 127.0.0.1) in a mkdtemp
 * directory under $AM_TEST_TMP. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509v3.h>

#include "archmirror/error.h"
#include "archmirror/tls.h"

static char dir[512];
static char ca_pem[600], cert_pem[600], key_pem[600], other_key_pem[600], junk_pem[600];

static EVP_PKEY *new_key(void)
{
    EVP_PKEY *k = EVP_EC_gen("P-256");
    assert_non_null(k);
    return k;
}

static void add_ext(X509 *x, X509 *issuer, int nid, const char *value)
{
    X509V3_CTX v3;
    X509V3_set_ctx(&v3, issuer, x, NULL, NULL, 0);
    X509_EXTENSION *e = X509V3_EXT_conf_nid(NULL, &v3, nid, value);
    assert_non_null(e);
    assert_int_equal(X509_add_ext(x, e, -1), 1);
    X509_EXTENSION_free(e);
}

/* A certificate for key, signed by issuer_key (issuer NULL: self-signed). */
static X509 *new_cert(EVP_PKEY *key, const char *cn, long serial, X509 *issuer,
                      EVP_PKEY *issuer_key, bool ca)
{
    X509 *x = X509_new();
    assert_non_null(x);
    X509_set_version(x, 2);
    ASN1_INTEGER_set(X509_get_serialNumber(x), serial);
    X509_gmtime_adj(X509_getm_notBefore(x), -60);
    X509_gmtime_adj(X509_getm_notAfter(x), 3600);
    X509_set_pubkey(x, key);
    X509_NAME *n = X509_get_subject_name(x);
    X509_NAME_add_entry_by_txt(n, "CN", MBSTRING_ASC, (const unsigned char *)cn, -1, -1, 0);
    X509_set_issuer_name(x, issuer ? X509_get_subject_name(issuer) : n);
    add_ext(x, issuer ? issuer : x, NID_basic_constraints, ca ? "critical,CA:TRUE" : "CA:FALSE");
    if (!ca) add_ext(x, issuer, NID_subject_alt_name, "IP:127.0.0.1,DNS:localhost");
    assert_true(X509_sign(x, issuer_key ? issuer_key : key, EVP_sha256()) > 0);
    return x;
}

static void write_cert(const char *path, X509 *x)
{
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    assert_int_equal(PEM_write_X509(f, x), 1);
    fclose(f);
}

static void write_key(const char *path, EVP_PKEY *k)
{
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    assert_int_equal(PEM_write_PrivateKey(f, k, NULL, NULL, 0, NULL, NULL), 1);
    fclose(f);
}

static int setup(void **state)
{
    (void)state;
    const char *base = getenv("AM_TEST_TMP");
    if (!base) base = "/tmp";
    mkdir(base, 0700);
    snprintf(dir, sizeof dir, "%s/tls-XXXXXX", base);
    if (!mkdtemp(dir)) return -1;
    snprintf(ca_pem, sizeof ca_pem, "%s/ca.pem", dir);
    snprintf(cert_pem, sizeof cert_pem, "%s/cert.pem", dir);
    snprintf(key_pem, sizeof key_pem, "%s/key.pem", dir);
    snprintf(other_key_pem, sizeof other_key_pem, "%s/other.key", dir);
    snprintf(junk_pem, sizeof junk_pem, "%s/junk.pem", dir);
    EVP_PKEY *ca_key = new_key(), *key = new_key(), *other = new_key();
    X509 *ca = new_cert(ca_key, "unit test CA", 1, NULL, NULL, true);
    X509 *leaf = new_cert(key, "127.0.0.1", 0x2a, ca, ca_key, false);
    write_cert(ca_pem, ca);
    write_cert(cert_pem, leaf);
    write_key(key_pem, key);
    write_key(other_key_pem, other);
    FILE *f = fopen(junk_pem, "w");
    fputs("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n", f);
    fclose(f);
    X509_free(ca);
    X509_free(leaf);
    EVP_PKEY_free(ca_key);
    EVP_PKEY_free(key);
    EVP_PKEY_free(other);
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    const char *files[] = {ca_pem, cert_pem, key_pem, other_key_pem, junk_pem};
    for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) unlink(files[i]);
    rmdir(dir);
    return 0;
}

/* Moves all waiting ciphertext from one session to the other; returns bytes moved. */
static size_t pipe_bytes(struct am_tls *from, struct am_tls *to)
{
    char buf[16384];
    size_t total = 0, n;
    while ((n = am_tls_take(from, buf, sizeof buf)) > 0) {
        assert_int_equal(am_tls_feed(to, buf, n), 0);
        total += n;
    }
    return total;
}

struct pair {
    struct am_tls_ctx *sctx, *cctx;
    struct am_tls *srv, *cli;
};

static void handshake(struct pair *p)
{
    char msg[256];
    assert_int_equal(am_tls_server_ctx_new(cert_pem, key_pem, &p->sctx, msg, sizeof msg), 0);
    assert_int_equal(am_tls_ctx_new(ca_pem, false, &p->cctx, msg, sizeof msg), 0);
    assert_int_equal(am_tls_accept(p->sctx, &p->srv), 0);
    assert_int_equal(am_tls_new(p->cctx, "127.0.0.1", &p->cli, msg, sizeof msg), 0);
    int cs = 0, ss = 0;
    for (int round = 0; round < 10 && (cs != 1 || ss != 1); round++) {
        if (cs != 1) cs = am_tls_handshake(p->cli, msg, sizeof msg);
        assert_true(cs >= 0);
        pipe_bytes(p->cli, p->srv);
        if (ss != 1) ss = am_tls_handshake(p->srv, msg, sizeof msg);
        assert_true(ss >= 0);
        pipe_bytes(p->srv, p->cli);
    }
    assert_int_equal(cs, 1);
    assert_int_equal(ss, 1);
}

static void pair_free(struct pair *p)
{
    am_tls_free(p->srv);
    am_tls_free(p->cli);
    am_tls_ctx_free(p->sctx);
    am_tls_ctx_free(p->cctx);
}

static void client_verifies_the_server_and_records_flow_both_ways(void **state)
{
    (void)state;
    struct pair p = {0};
    char msg[256], buf[64];
    size_t n;
    handshake(&p);
    assert_string_equal(am_tls_version(p.srv), am_tls_version(p.cli));
    assert_int_equal(am_tls_write(p.cli, "GET / HTTP/1.1\r\n\r\n", 18, msg, sizeof msg), 0);
    pipe_bytes(p.cli, p.srv);
    assert_true(am_tls_has_input(p.srv));
    assert_int_equal(am_tls_read(p.srv, buf, sizeof buf, &n, msg, sizeof msg), 0);
    assert_int_equal(n, 18);
    assert_memory_equal(buf, "GET / HTTP/1.1\r\n\r\n", 18);
    assert_false(am_tls_has_input(p.srv));
    assert_int_equal(am_tls_write(p.srv, "HTTP/1.1 200 OK\r\n", 17, msg, sizeof msg), 0);
    pipe_bytes(p.srv, p.cli);
    assert_int_equal(am_tls_read(p.cli, buf, sizeof buf, &n, msg, sizeof msg), 0);
    assert_int_equal(n, 17);
    assert_memory_equal(buf, "HTTP/1.1 200 OK\r\n", 17);
    pair_free(&p);
}

static void input_left_in_the_session_is_reported_until_read(void **state)
{
    (void)state;
    struct pair p = {0};
    char msg[256], buf[8];
    size_t n, got = 0;
    handshake(&p);
    /* Two records; the server reads a few bytes at a time (a full read buffer). */
    assert_int_equal(am_tls_write(p.cli, "first request;", 14, msg, sizeof msg), 0);
    assert_int_equal(am_tls_write(p.cli, "second one", 10, msg, sizeof msg), 0);
    pipe_bytes(p.cli, p.srv);
    char all[32];
    while (am_tls_has_input(p.srv)) {
        assert_int_equal(am_tls_read(p.srv, buf, sizeof buf, &n, msg, sizeof msg), 0);
        assert_true(n > 0);
        memcpy(all + got, buf, n);
        got += n;
    }
    assert_int_equal(got, 24);
    assert_memory_equal(all, "first request;second one", 24);
    pair_free(&p);
}

static void close_notify_reaches_the_client_as_a_clean_close(void **state)
{
    (void)state;
    struct pair p = {0};
    char msg[256], buf[8];
    size_t n;
    handshake(&p);
    am_tls_close_notify(p.srv);
    assert_true(am_tls_pending(p.srv) > 0);
    pipe_bytes(p.srv, p.cli);
    assert_int_equal(am_tls_read(p.cli, buf, sizeof buf, &n, msg, sizeof msg), AM_TLS_CLOSED);
    pair_free(&p);
}

static void server_ctx_is_described_by_subject_serial_and_expiry(void **state)
{
    (void)state;
    struct am_tls_ctx *c;
    char msg[256], desc[400];
    assert_int_equal(am_tls_server_ctx_new(cert_pem, key_pem, &c, msg, sizeof msg), 0);
    am_tls_ctx_describe(c, desc, sizeof desc);
    assert_non_null(strstr(desc, "CN=127.0.0.1"));
    assert_non_null(strstr(desc, "serial 2A"));
    assert_non_null(strstr(desc, "expires "));
    am_tls_ctx_free(c);
}

static void key_that_does_not_match_is_refused_naming_both_files(void **state)
{
    (void)state;
    struct am_tls_ctx *c = NULL;
    char msg[512];
    assert_int_equal(am_tls_server_ctx_new(cert_pem, other_key_pem, &c, msg, sizeof msg),
                     AM_EINVAL);
    assert_null(c);
    assert_non_null(strstr(msg, "does not match"));
    assert_non_null(strstr(msg, other_key_pem));
    assert_non_null(strstr(msg, cert_pem));
}

static void unreadable_or_junk_files_are_refused_with_their_name(void **state)
{
    (void)state;
    struct am_tls_ctx *c = NULL;
    char msg[512], missing[600];
    snprintf(missing, sizeof missing, "%s/missing.pem", dir);
    assert_int_equal(am_tls_server_ctx_new(missing, key_pem, &c, msg, sizeof msg), AM_EINVAL);
    assert_non_null(strstr(msg, missing));
    assert_int_equal(am_tls_server_ctx_new(junk_pem, key_pem, &c, msg, sizeof msg), AM_EINVAL);
    assert_non_null(strstr(msg, junk_pem));
    assert_int_equal(am_tls_server_ctx_new(cert_pem, junk_pem, &c, msg, sizeof msg), AM_EINVAL);
    assert_non_null(strstr(msg, junk_pem));
    assert_null(c);
}

static void client_that_does_not_trust_the_issuer_fails_the_handshake(void **state)
{
    (void)state;
    struct am_tls_ctx *sctx, *cctx;
    struct am_tls *srv, *cli;
    char msg[256];
    assert_int_equal(am_tls_server_ctx_new(cert_pem, key_pem, &sctx, msg, sizeof msg), 0);
    /* Trusting only the leaf's own file is not trusting its issuer. */
    assert_int_equal(am_tls_ctx_new(cert_pem, false, &cctx, msg, sizeof msg), 0);
    assert_int_equal(am_tls_accept(sctx, &srv), 0);
    assert_int_equal(am_tls_new(cctx, "127.0.0.1", &cli, msg, sizeof msg), 0);
    int cs = 0;
    for (int round = 0; round < 10 && cs == 0; round++) {
        cs = am_tls_handshake(cli, msg, sizeof msg);
        pipe_bytes(cli, srv);
        char smsg[256];
        (void)am_tls_handshake(srv, smsg, sizeof smsg); /* it hears the client's alert */
        pipe_bytes(srv, cli);
    }
    assert_int_equal(cs, AM_EUPSTREAM_TLS);
    assert_non_null(strstr(msg, "certificate verify failed"));
    am_tls_free(srv);
    am_tls_free(cli);
    am_tls_ctx_free(sctx);
    am_tls_ctx_free(cctx);
}

static void sessions_outlive_the_context_they_were_made_from(void **state)
{
    (void)state;
    struct pair p = {0};
    char msg[256], buf[8];
    size_t n;
    handshake(&p);
    am_tls_ctx_free(p.sctx); /* a certificate reload frees the old context */
    p.sctx = NULL;
    assert_int_equal(am_tls_write(p.cli, "ping", 4, msg, sizeof msg), 0);
    pipe_bytes(p.cli, p.srv);
    assert_int_equal(am_tls_read(p.srv, buf, sizeof buf, &n, msg, sizeof msg), 0);
    assert_int_equal(n, 4);
    pair_free(&p);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(client_verifies_the_server_and_records_flow_both_ways),
        cmocka_unit_test(input_left_in_the_session_is_reported_until_read),
        cmocka_unit_test(close_notify_reaches_the_client_as_a_clean_close),
        cmocka_unit_test(server_ctx_is_described_by_subject_serial_and_expiry),
        cmocka_unit_test(key_that_does_not_match_is_refused_naming_both_files),
        cmocka_unit_test(unreadable_or_junk_files_are_refused_with_their_name),
        cmocka_unit_test(client_that_does_not_trust_the_issuer_fails_the_handshake),
        cmocka_unit_test(sessions_outlive_the_context_they_were_made_from),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}

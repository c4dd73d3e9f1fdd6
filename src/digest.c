/*
 * digest — content digests; see include/archmirror/digest.h.
 *
 * The grammar is the OCI image spec's (descriptor.md, "Digests"):
 *   digest    := algorithm ":" encoded
 * restricted to the two registered algorithms, whose encoded part is lowercase hex of
 * exactly 64 (sha256) or 128 (sha512) characters. Uppercase hex is refused rather than
 * folded: the spec says implementations SHOULD NOT accept it, and two spellings of one
 * digest would give two cache keys for one blob.
 *
 * Hashing goes through OpenSSL EVP. The one-shot and streaming calls cannot report an
 * error (their header returns void), so a failure inside OpenSSL (in practice only an
 * allocation failure) fails closed: the result is an empty digest string, which
 * am_digest_equal never considers equal to anything. Content hashed that way can never
 * be accepted as verified.
 */
#include "archmirror/digest.h"

#include <string.h>

#include <openssl/evp.h>

#include "archmirror/error.h"

struct alg_info {
    const char *prefix; /* "sha256:" */
    size_t prefix_len;
    size_t hex_len;
};

static const struct alg_info algs[] = {
    [AM_DIGEST_SHA256] = {"sha256:", 7, 64},
    [AM_DIGEST_SHA512] = {"sha512:", 7, 128},
};

static const EVP_MD *evp_md(enum am_digest_alg alg)
{
    return alg == AM_DIGEST_SHA512 ? EVP_sha512() : EVP_sha256();
}

static bool is_lower_hex(char c)
{
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f');
}

int am_digest_parse(const char *s, size_t len, struct am_digest *out)
{
    for (size_t a = 0; a < sizeof algs / sizeof algs[0]; a++) {
        const struct alg_info *ai = &algs[a];
        if (len != ai->prefix_len + ai->hex_len || memcmp(s, ai->prefix, ai->prefix_len) != 0)
            continue;
        for (size_t i = ai->prefix_len; i < len; i++)
            if (!is_lower_hex(s[i])) return AM_EDIGEST_INVALID;
        out->alg = (enum am_digest_alg)a;
        memcpy(out->str, s, len);
        out->str[len] = '\0';
        return 0;
    }
    return AM_EDIGEST_INVALID;
}

bool am_digest_equal(const struct am_digest *a, const struct am_digest *b)
{
    /* An empty string is the fail-closed result of a hash that could not be computed. */
    return a->alg == b->alg && a->str[0] != '\0' && strcmp(a->str, b->str) == 0;
}

/* Writes prefix + lowercase hex of md into out->str. */
static void format_digest(enum am_digest_alg alg, const unsigned char *md, unsigned int md_len,
                          struct am_digest *out)
{
    static const char hex[] = "0123456789abcdef";
    const struct alg_info *ai = &algs[alg];
    char *p = out->str;

    out->alg = alg;
    if ((size_t)md_len * 2 != ai->hex_len) {
        out->str[0] = '\0';
        return;
    }
    memcpy(p, ai->prefix, ai->prefix_len);
    p += ai->prefix_len;
    for (unsigned int i = 0; i < md_len; i++) {
        *p++ = hex[md[i] >> 4];
        *p++ = hex[md[i] & 0xf];
    }
    *p = '\0';
}

static void fail_closed(enum am_digest_alg alg, struct am_digest *out)
{
    out->alg = alg;
    out->str[0] = '\0';
}

void am_digest_of(enum am_digest_alg alg, const void *p, size_t len, struct am_digest *out)
{
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int md_len = 0;

    if (EVP_Digest(p, len, md, &md_len, evp_md(alg), NULL) != 1) {
        fail_closed(alg, out);
        return;
    }
    format_digest(alg, md, md_len, out);
}

int am_hasher_init(struct am_hasher *h, enum am_digest_alg alg)
{
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();

    h->ctx = NULL;
    h->alg = alg;
    if (!ctx) return AM_ENOMEM;
    if (EVP_DigestInit_ex(ctx, evp_md(alg), NULL) != 1) {
        EVP_MD_CTX_free(ctx);
        return AM_ENOMEM;
    }
    h->ctx = ctx;
    return 0;
}

/* A failed update drops the context, so that final yields the fail-closed empty digest
 * instead of the hash of a silently shortened input. */
void am_hasher_update(struct am_hasher *h, const void *p, size_t len)
{
    if (!h->ctx || len == 0) return;
    if (EVP_DigestUpdate(h->ctx, p, len) != 1) {
        EVP_MD_CTX_free(h->ctx);
        h->ctx = NULL;
    }
}

void am_hasher_final(struct am_hasher *h, struct am_digest *out)
{
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int md_len = 0;

    if (!h->ctx || EVP_DigestFinal_ex(h->ctx, md, &md_len) != 1) {
        fail_closed(h->alg, out);
        return;
    }
    format_digest(h->alg, md, md_len, out);
}

void am_hasher_cleanup(struct am_hasher *h)
{
    if (!h) return;
    EVP_MD_CTX_free(h->ctx); /* accepts NULL */
    h->ctx = NULL;
}

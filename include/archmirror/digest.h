/*
 * digest — content digests: parsing, formatting and incremental hashing.
 *
 * A digest names immutable content ("sha256:<64 hex>"); archmirror trusts nothing it has
 * not hashed itself. Parsing follows the OCI image spec's descriptor grammar
 * (algorithm ":" encoded) and accepts only the registered sha256 and sha512 with
 * lowercase hex of the exact length. Hashing goes through OpenSSL EVP. This module must
 * never accept a digest it cannot verify.
 */
#ifndef ARCHMIRROR_DIGEST_H
#define ARCHMIRROR_DIGEST_H

#include <stdbool.h>
#include <stddef.h>

enum am_digest_alg { AM_DIGEST_SHA256 = 0, AM_DIGEST_SHA512 = 1 };

#define AM_DIGEST_STR_MAX (7 + 128) /* "sha512:" + 128 hex */

struct am_digest {
    enum am_digest_alg alg;
    char str[AM_DIGEST_STR_MAX + 1]; /* canonical text, NUL-terminated */
};

/* Parses s[0..len). Returns 0, or AM_EDIGEST_INVALID (bad grammar, unknown algorithm,
 * wrong length, uppercase hex). out is written only on success. */
int am_digest_parse(const char *s, size_t len, struct am_digest *out);
bool am_digest_equal(const struct am_digest *a, const struct am_digest *b);
/* Hashes a whole buffer. */
void am_digest_of(enum am_digest_alg alg, const void *p, size_t len, struct am_digest *out);

struct am_hasher {
    void *ctx; /* EVP_MD_CTX*, owned */
    enum am_digest_alg alg;
};

/* Returns 0 or AM_ENOMEM. Pair with am_hasher_cleanup. */
int am_hasher_init(struct am_hasher *h, enum am_digest_alg alg);
void am_hasher_update(struct am_hasher *h, const void *p, size_t len);
/* Finishes the hash into out; the hasher may then only be cleaned up. */
void am_hasher_final(struct am_hasher *h, struct am_digest *out);
void am_hasher_cleanup(struct am_hasher *h); /* accepts a zeroed or cleaned hasher */

#endif

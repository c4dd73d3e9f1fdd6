/*
 * error — archmirror's one table of failure kinds.
 *
 * Every fallible function returns 0 or a negative AM_E* code from this table. Each
 * entry carries the HTTP status and the OCI distribution error code a client sees, so a
 * handler picks an error and the table writes the response (OCI distribution spec,
 * "Error Codes"). Foreign errors (libuv, LMDB, OpenSSL, jansson) are converted once at
 * their boundary. This module must never allocate on the error path it reports.
 */
#ifndef ARCHMIRROR_ERROR_H
#define ARCHMIRROR_ERROR_H

#include <stdbool.h>
#include <stddef.h>

struct am_buf;

/* X(name, message, http status, OCI code) */
#define AM_ERRORS(X)                                                                               \
    X(NOMEM, "out of memory", 500, "UNKNOWN")                                                      \
    X(INVAL, "invalid argument", 400, "UNKNOWN")                                                   \
    X(BAD_REQUEST, "malformed request", 400, "UNKNOWN")                                            \
    X(HEADERS_TOO_LARGE, "request header fields too large", 431, "UNKNOWN")                        \
    X(NAME_INVALID, "invalid repository name", 400, "NAME_INVALID")                                \
    X(TAG_INVALID, "invalid tag", 400, "TAG_INVALID")                                              \
    X(DIGEST_INVALID, "provided digest did not match uploaded content", 400, "DIGEST_INVALID")     \
    X(MANIFEST_UNKNOWN, "manifest unknown", 404, "MANIFEST_UNKNOWN")                               \
    X(BLOB_UNKNOWN, "blob unknown to registry", 404, "BLOB_UNKNOWN")                               \
    X(NAME_UNKNOWN, "repository name not known to registry", 404, "NAME_UNKNOWN")                  \
    X(NOT_FOUND, "not found", 404, "NOT_FOUND")                                                    \
    X(UNAUTHORIZED, "authentication required", 401, "UNAUTHORIZED")                                \
    X(DENIED, "requested access to the resource is denied", 403, "DENIED")                         \
    X(NS_DENIED, "registry is not an upstream of this mirror", 403, "DENIED")                      \
    X(TOOMANYREQUESTS, "too many requests", 429, "TOOMANYREQUESTS")                                \
    X(UNSUPPORTED, "the operation is unsupported", 405, "UNSUPPORTED")                             \
    X(RANGE, "requested range not satisfiable", 416, "UNKNOWN")                                    \
    X(TOO_LARGE, "content exceeds the configured size limit", 502, "SIZE_INVALID")                 \
    X(MANIFEST_INVALID, "manifest invalid", 502, "MANIFEST_INVALID")                               \
    X(DIGEST_MISMATCH, "upstream content does not match its digest", 502, "DIGEST_INVALID")        \
    X(UPSTREAM, "upstream registry failed", 502, "UNAVAILABLE")                                    \
    X(UPSTREAM_CONNECT, "cannot connect to the upstream registry", 502, "UNAVAILABLE")             \
    X(UPSTREAM_TLS, "TLS with the upstream registry failed", 502, "UNAVAILABLE")                   \
    X(UPSTREAM_TIMEOUT, "upstream registry timed out", 504, "UNAVAILABLE")                         \
    X(UPSTREAM_PROTOCOL, "upstream registry sent an invalid response", 502, "UNAVAILABLE")         \
    X(REDIRECT, "upstream redirect refused", 502, "UNAVAILABLE")                                   \
    X(STORE, "cache store failed", 500, "UNKNOWN")                                                 \
    X(STORE_FULL, "cache store is full", 507, "UNKNOWN")                                           \
    X(STORE_READONLY, "cache store is read-only", 500, "UNKNOWN")                                  \
    X(UNAVAILABLE, "service unavailable", 503, "UNAVAILABLE")                                      \
    X(CANCELED, "operation canceled", 499, "UNKNOWN")                                              \
    X(IO, "I/O error", 500, "UNKNOWN")                                                             \
    X(CONFIG, "invalid configuration", 500, "UNKNOWN")

enum am_err {
    AM_OK = 0,
#define AM_ERR_ENUM_(name, msg, status, code) AM_E##name,
    AM_ERR_FIRST_ = -1000,
    AM_ERRORS(AM_ERR_ENUM_) AM_ERR_LAST_
#undef AM_ERR_ENUM_
};

/* Each returns a static string/number; unknown codes map to AM_EIO's entry. */
const char *am_error_name(int err);     /* "NOMEM" */
const char *am_error_message(int err);  /* "out of memory" */
int am_error_http_status(int err);      /* 500 */
const char *am_error_oci_code(int err); /* "UNKNOWN" */

/* Appends the OCI error body {"errors":[{"code":…,"message":…}]} to out.
 * message: borrowed, may be NULL (the table's message is used); it is JSON-escaped and
 * non-ASCII bytes become '?'. Returns 0 or AM_ENOMEM/AM_ETOO_LARGE. */
int am_error_format_json(int err, const char *message, struct am_buf *out);

/* The error a client should see for an upstream's final non-success status: 401, 403,
 * 404 (BLOB_ or MANIFEST_UNKNOWN), 416, 429, 504 map to their own codes, anything else
 * is AM_EUPSTREAM. */
int am_error_from_upstream_status(int status, bool blob);

/* Converts a libuv error (negative errno) into the closest AM_E* code. */
int am_error_from_uv(int uverr);

/* Formats the one-line message that accompanies an error return into msg[0..msglen),
 * truncated to fit. msg may be NULL or msglen 0: the caller wanted no message. */
void am_error_setmsg(char *msg, size_t msglen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

#endif

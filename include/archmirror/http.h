/*
 * http — HTTP/1.1 vocabulary shared by the server and the upstream client: header
 * views, case-insensitive lookup, standard reason phrases, date formatting.
 *
 * Views point into a parser's buffer and are valid only as long as the owner says.
 * This module holds no state and never allocates.
 */
#ifndef ARCHMIRROR_HTTP_H
#define ARCHMIRROR_HTTP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct am_http_header {
    const char *name;
    size_t name_len;
    const char *value; /* leading/trailing whitespace already trimmed */
    size_t value_len;
};

/* First header named name (case-insensitive), or NULL. */
const struct am_http_header *am_http_header_find(const struct am_http_header *h, size_t n,
                                                 const char *name);
/* Case-insensitive equality of a view and a C string. */
bool am_http_token_eq(const char *s, size_t len, const char *lit);
/* "Not Found" for 404 …; "Unknown" for codes it does not know. */
const char *am_http_reason(int status);
/* IMF-fixdate (RFC 9110 §5.6.7) of now into out (at least 30 bytes). */
void am_http_date(char *out, size_t outlen);
/* Parses a non-negative decimal (Content-Length) strictly; returns 0 or AM_EINVAL. */
int am_http_parse_u64(const char *s, size_t len, uint64_t *out);
/* Parses a Range header value (RFC 9110 §14.1.2) against a representation of size bytes:
 * "bytes=N-", "bytes=N-M", "bytes=-SUFFIX". Returns 0 with [*start, *end) (end
 * exclusive, clamped to size), AM_ERANGE when the range cannot be satisfied (answer 416),
 * or AM_EINVAL when the value is malformed or asks for several ranges (RFC 9110 §14.2:
 * the server then ignores it and sends the whole representation). */
int am_http_parse_range(const char *s, size_t len, uint64_t size, uint64_t *start, uint64_t *end);

#endif

/*
 * wwwauth — parsing of WWW-Authenticate challenges (RFC 7235 §4.1, RFC 6750 §3).
 *
 * Registries answer 401 with `Bearer realm="…",service="…",scope="…"` (docker token
 * spec) or `Basic realm="…"`. The header is untrusted: quoted-strings with escapes,
 * several challenges in one header, odd spacing and garbage must parse or fail cleanly.
 */
#ifndef ARCHMIRROR_WWWAUTH_H
#define ARCHMIRROR_WWWAUTH_H

#include <stddef.h>

enum am_auth_scheme { AM_AUTH_OTHER = 0, AM_AUTH_BASIC, AM_AUTH_BEARER };

struct am_challenge {
    enum am_auth_scheme scheme;
    char realm[1024];
    char service[256];
    char scope[1024];
    char error[64];
};

/* Parses one header value into up to max challenges; *n gets the count. Unknown
 * parameters are skipped; an over-long value fails. Returns 0 or AM_EUPSTREAM_PROTOCOL. */
int am_wwwauth_parse(const char *s, size_t len, struct am_challenge *out, size_t max, size_t *n);

#endif

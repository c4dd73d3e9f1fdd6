/*
 * tokenauth — bearer tokens of the registry token flow (distribution "Token
 * Authentication Specification"): the token endpoint's JSON answer, and one upstream's
 * token cache per scope with single-flight fetches.
 *
 * The cache only decides; the caller (upstream) performs the HTTP fetch. A scope with no
 * usable token and no fetch in flight makes its first waiter the fetcher; later waiters
 * queue until am_tokenauth_finish, so N concurrent requests for one scope cost one token
 * request. Tokens are kept until their lifetime minus a margin (so a token is never sent
 * in its last seconds). Times are the caller's monotonic milliseconds (uv_now). This
 * module never logs, and never lets a token reach anything but its waiters and callers.
 */
#ifndef ARCHMIRROR_TOKENAUTH_H
#define ARCHMIRROR_TOKENAUTH_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define AM_TOKENAUTH_DEFAULT_TTL_S 60    /* expires_in absent (spec: "defaults to 60") */
#define AM_TOKENAUTH_MIN_TTL_S     60    /* spec: never less than 60 s to live */
#define AM_TOKENAUTH_MAX_TTL_S     86400 /* longer claims are cut to a day */
#define AM_TOKENAUTH_MARGIN_MS     10000 /* cached until expiry minus min(this, ttl/4) */
#define AM_TOKENAUTH_MAX_ENTRIES   1024  /* scopes cached per upstream */
#define AM_TOKENAUTH_MAX_TOKEN     16384 /* bytes; a longer token is refused */

/* Parses a token endpoint response body (borrowed). now_unix: the wall clock, seconds,
 * used with "issued_at" (RFC 3339) to shorten the lifetime of a token issued in the past;
 * one claimed in the future (clock skew) is taken as issued now. Takes "token", or
 * "access_token" when "token" is absent (OAuth2 form); it must be visible ASCII.
 * "expires_in" absent or not a positive number means 60 s; it is clamped to
 * [AM_TOKENAUTH_MIN_TTL_S, AM_TOKENAUTH_MAX_TTL_S] before issued_at is applied, so
 * *ttl_ms may be 0 for a token that is already stale. Returns 0 with *token owned (free())
 * and *ttl_ms, or AM_EUPSTREAM_PROTOCOL with msg (not JSON, no token, bad token) or
 * AM_ENOMEM. msg never contains the token. */
int am_tokenauth_parse(const char *json, size_t len, int64_t now_unix, char **token,
                       uint64_t *ttl_ms, char *msg, size_t msglen);

struct am_tokenauth;

/* A queued interest in one scope's token. The caller zero-initialises it and sets
 * on_token; the links are private. on_token runs once from am_tokenauth_finish with
 * status 0 and the token (a view valid during the call), or an error and NULL; the
 * waiter is unlinked before the call, so it may wait again or be freed in it. */
struct am_tokenauth_waiter {
    void (*on_token)(struct am_tokenauth_waiter *w, int status, const char *token);
    struct am_tokenauth_waiter *prev, *next; /* private */
};

/* Returns 0 with *out owned (am_tokenauth_free) or AM_ENOMEM. */
int am_tokenauth_new(struct am_tokenauth **out);
/* Frees every token. Waiters still queued are unlinked without a callback. NULL ok. */
void am_tokenauth_free(struct am_tokenauth *ta);

/* The cached token for scope (borrowed; "" for none) if it is still usable at now_ms,
 * else NULL. Returns a view valid until the next call that changes ta. */
const char *am_tokenauth_get(struct am_tokenauth *ta, const char *scope, uint64_t now_ms);
/* Whether a fetch for scope is in flight. */
bool am_tokenauth_fetching(const struct am_tokenauth *ta, const char *scope);
/* Queues w (kept until its on_token or am_tokenauth_cancel) for scope's next token.
 * Returns 1 when no fetch was in flight: the caller must now fetch and call
 * am_tokenauth_finish; 0 when it joined a fetch in flight; AM_ENOMEM (w not queued). */
int am_tokenauth_wait(struct am_tokenauth *ta, const char *scope, struct am_tokenauth_waiter *w);
/* Unlinks w if it is queued; no callback runs. */
void am_tokenauth_cancel(struct am_tokenauth_waiter *w);
/* Ends scope's fetch: on status 0, caches token (borrowed, copied) for ttl_ms from
 * now_ms (less the margin; not cached when that leaves nothing), then calls every
 * waiter's on_token with (status, token). Waiters may re-enter ta. */
void am_tokenauth_finish(struct am_tokenauth *ta, const char *scope, int status, const char *token,
                         uint64_t ttl_ms, uint64_t now_ms);
/* Forgets scope's cached token if it still equals token (the upstream rejected it), so
 * the next request fetches a fresh one. */
void am_tokenauth_del(struct am_tokenauth *ta, const char *scope, const char *token);

#endif

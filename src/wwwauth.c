/*
 * wwwauth — WWW-Authenticate challenge parsing; see include/archmirror/wwwauth.h.
 *
 * Grammar (RFC 9110 §11.6.1 and §11.2, which restate RFC 7235 §4.1 and §2.1):
 *   WWW-Authenticate = 1#challenge
 *   challenge   = auth-scheme [ 1*SP ( token68 / #auth-param ) ]
 *   auth-param  = token BWS "=" BWS ( token / quoted-string )
 *   token68     = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
 * The comma separates both challenges and the auth-params of one challenge, so after a
 * comma the parser looks ahead: `token BWS "="` continues the current challenge, any
 * other token starts a new one. Empty list elements (",,") are allowed (RFC 9110
 * §5.6.1). Scheme and parameter names are case-insensitive (§11.1, §11.2); a parameter
 * may occur once per challenge (§11.2). Values are bounded by struct am_challenge;
 * unknown parameters are validated and dropped. Bytes outside the grammar, including
 * obs-text, fail the whole header: the realm becomes a URL we fetch, so nothing but
 * printable ASCII is ever stored. Nothing here allocates.
 */
#include "archmirror/wwwauth.h"

#include <stdbool.h>
#include <string.h>
#include <strings.h>

#include "archmirror/error.h"

struct lexer {
    const char *s;
    size_t len;
    size_t i;
};

/* Where a parameter's value goes; dst NULL means "validate and drop". */
struct sink {
    char *dst;
    size_t size;
    unsigned bit; /* for the once-per-challenge rule; 0 for unknown parameters */
};

static bool is_alnum(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
}

/* RFC 9110 §5.6.2 tchar. */
static bool is_tchar(char c)
{
    return is_alnum(c) || (c != '\0' && strchr("!#$%&'*+-.^_`|~", c) != NULL);
}

static bool is_token68_char(char c)
{
    return is_alnum(c) || (c != '\0' && strchr("-._~+/", c) != NULL);
}

static bool at_end(const struct lexer *lx)
{
    return lx->i >= lx->len;
}

static char peek(const struct lexer *lx)
{
    return at_end(lx) ? '\0' : lx->s[lx->i];
}

static void skip_ows(struct lexer *lx)
{
    while (!at_end(lx) && (lx->s[lx->i] == ' ' || lx->s[lx->i] == '\t')) lx->i++;
}

static size_t token_len_at(const struct lexer *lx, size_t i)
{
    size_t j = i;
    while (j < lx->len && is_tchar(lx->s[j])) j++;
    return j - i;
}

/* Whether `token BWS "=" BWS (token / quoted-string)` starts at the cursor. */
static bool looks_like_param(const struct lexer *lx)
{
    struct lexer la = *lx;
    size_t t = token_len_at(&la, la.i);

    if (t == 0) return false;
    la.i += t;
    skip_ows(&la);
    if (peek(&la) != '=') return false;
    la.i++;
    skip_ows(&la);
    return peek(&la) == '"' || is_tchar(peek(&la));
}

/* Appends c to the sink; fails when the value would not fit. */
static int put(const struct sink *k, size_t *n, char c)
{
    if (!k->dst) return 0;
    if (*n + 1 >= k->size) return AM_EUPSTREAM_PROTOCOL;
    k->dst[(*n)++] = c;
    k->dst[*n] = '\0';
    return 0;
}

/* quoted-string = DQUOTE *( qdtext / quoted-pair ) DQUOTE (RFC 9110 §5.6.4), with the
 * backslash escapes removed. obs-text is refused (see the file comment). */
static int read_quoted(struct lexer *lx, const struct sink *k)
{
    size_t n = 0;

    lx->i++; /* opening quote */
    while (!at_end(lx)) {
        char c = lx->s[lx->i++];
        if (c == '"') return 0;
        if (c == '\\') {
            if (at_end(lx)) break;
            c = lx->s[lx->i++];
        }
        if (c != '\t' && (c < 0x20 || c > 0x7e)) return AM_EUPSTREAM_PROTOCOL;
        if (put(k, &n, c)) return AM_EUPSTREAM_PROTOCOL;
    }
    return AM_EUPSTREAM_PROTOCOL; /* unterminated */
}

static int read_token(struct lexer *lx, const struct sink *k)
{
    size_t t = token_len_at(lx, lx->i), n = 0;

    if (t == 0) return AM_EUPSTREAM_PROTOCOL;
    for (size_t j = 0; j < t; j++)
        if (put(k, &n, lx->s[lx->i + j])) return AM_EUPSTREAM_PROTOCOL;
    lx->i += t;
    return 0;
}

static struct sink sink_for(const char *name, size_t len, struct am_challenge *ch)
{
    static const char *const names[] = {"realm", "service", "scope", "error"};
    char *dsts[] = {ch->realm, ch->service, ch->scope, ch->error};
    size_t sizes[] = {sizeof ch->realm, sizeof ch->service, sizeof ch->scope, sizeof ch->error};
    struct sink k = {NULL, 0, 0};

    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        if (strlen(names[i]) == len && strncasecmp(name, names[i], len) == 0) {
            k.dst = dsts[i];
            k.size = sizes[i];
            k.bit = 1u << i;
        }
    }
    return k;
}

/* One auth-param; *seen tracks which known names this challenge already had. */
static int parse_param(struct lexer *lx, struct am_challenge *ch, unsigned *seen)
{
    size_t t = token_len_at(lx, lx->i);
    struct sink k = sink_for(lx->s + lx->i, t, ch);

    if (k.bit & *seen) return AM_EUPSTREAM_PROTOCOL;
    *seen |= k.bit;
    lx->i += t;
    skip_ows(lx);
    lx->i++; /* '=', checked by looks_like_param */
    skip_ows(lx);
    if (k.dst) k.dst[0] = '\0';
    return peek(lx) == '"' ? read_quoted(lx, &k) : read_token(lx, &k);
}

/* #auth-param: parameters until the end or a comma followed by a new scheme. */
static int parse_params(struct lexer *lx, struct am_challenge *ch)
{
    unsigned seen = 0;

    for (;;) {
        int rc = parse_param(lx, ch, &seen);
        if (rc) return rc;
        skip_ows(lx);
        if (at_end(lx)) return 0;
        if (peek(lx) != ',') return AM_EUPSTREAM_PROTOCOL;
        while (peek(lx) == ',' || peek(lx) == ' ' || peek(lx) == '\t') lx->i++;
        if (!looks_like_param(lx)) return 0; /* next challenge (or the end) */
    }
}

/* token68 is opaque to us (Negotiate, Basic with credentials); validated, not stored. */
static int parse_token68(struct lexer *lx)
{
    size_t start = lx->i;

    while (!at_end(lx) && is_token68_char(lx->s[lx->i])) lx->i++;
    if (lx->i == start) return AM_EUPSTREAM_PROTOCOL;
    while (peek(lx) == '=') lx->i++;
    skip_ows(lx);
    return at_end(lx) || peek(lx) == ',' ? 0 : AM_EUPSTREAM_PROTOCOL;
}

static enum am_auth_scheme scheme_of(const char *s, size_t len)
{
    if (len == 5 && strncasecmp(s, "Basic", 5) == 0) return AM_AUTH_BASIC;
    if (len == 6 && strncasecmp(s, "Bearer", 6) == 0) return AM_AUTH_BEARER;
    return AM_AUTH_OTHER;
}

static int parse_challenge(struct lexer *lx, struct am_challenge *ch)
{
    size_t t = token_len_at(lx, lx->i);

    memset(ch, 0, sizeof *ch);
    if (t == 0) return AM_EUPSTREAM_PROTOCOL;
    ch->scheme = scheme_of(lx->s + lx->i, t);
    lx->i += t;
    if (at_end(lx) || peek(lx) == ',') return 0; /* a scheme without parameters */
    if (peek(lx) != ' ' && peek(lx) != '\t') return AM_EUPSTREAM_PROTOCOL;
    skip_ows(lx);
    if (at_end(lx) || peek(lx) == ',') return 0;
    return looks_like_param(lx) ? parse_params(lx, ch) : parse_token68(lx);
}

int am_wwwauth_parse(const char *s, size_t len, struct am_challenge *out, size_t max, size_t *n)
{
    struct lexer lx = {s, len, 0};
    struct am_challenge scratch;
    size_t total = 0;

    *n = 0;
    for (;;) {
        while (peek(&lx) == ',' || peek(&lx) == ' ' || peek(&lx) == '\t') lx.i++;
        if (at_end(&lx)) break;
        /* Challenges beyond max are still parsed, so garbage anywhere fails. */
        struct am_challenge *ch = total < max ? &out[total] : &scratch;
        int rc = parse_challenge(&lx, ch);
        if (rc) {
            *n = 0;
            return rc;
        }
        total++;
    }
    if (total == 0) return AM_EUPSTREAM_PROTOCOL; /* 1#challenge: at least one */
    *n = total < max ? total : max;
    return 0;
}

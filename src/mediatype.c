/*
 * mediatype — manifest media types and Accept negotiation; see
 * include/archmirror/mediatype.h.
 *
 * Media types compare case-insensitively (RFC 9110 §8.3.1). Accept (RFC 9110 §12.5.1)
 * is a comma-separated list of media ranges with parameters; a "q" parameter weighs the
 * range and q=0 means "not acceptable". When several ranges match a type the most
 * specific one decides, so "*" "/" "*, application/vnd.oci.image.index.v1+json;q=0"
 * refuses indexes. Parameters other than q are ignored for matching: registry clients
 * never put meaningful ones on manifest types, and refusing a manifest because a client
 * wrote ";charset=utf-8" would break pulls for no benefit. Parameter values may be
 * quoted strings containing ',' or ';', so the list is split by a small tokenizer rather
 * than by strchr.
 */
#include "archmirror/mediatype.h"

#include <string.h>
#include <strings.h>

static bool is_ows(char c)
{
    return c == ' ' || c == '\t';
}

/* Trims optional whitespace from both ends of s[0..*len); returns the new start. */
static const char *trim(const char *s, size_t *len)
{
    while (*len > 0 && is_ows(s[0])) {
        s++;
        (*len)--;
    }
    while (*len > 0 && is_ows(s[*len - 1])) (*len)--;
    return s;
}

static bool eq_nocase(const char *s, size_t len, const char *lit)
{
    return strlen(lit) == len && strncasecmp(s, lit, len) == 0;
}

enum am_media_kind am_mediatype_classify(const char *s, size_t len)
{
    static const struct {
        const char *type;
        enum am_media_kind kind;
    } known[] = {
        {AM_MT_OCI_MANIFEST_S, AM_MT_OCI_MANIFEST},
        {AM_MT_OCI_INDEX_S, AM_MT_OCI_INDEX},
        {AM_MT_DOCKER_MANIFEST_S, AM_MT_DOCKER_MANIFEST},
        {AM_MT_DOCKER_LIST_S, AM_MT_DOCKER_LIST},
        {AM_MT_DOCKER_V1_S, AM_MT_DOCKER_V1},
        {AM_MT_DOCKER_V1_SIGNED_S, AM_MT_DOCKER_V1},
    };
    const char *semi = s ? memchr(s, ';', len) : NULL;

    if (!s) return AM_MT_UNKNOWN;
    if (semi) len = (size_t)(semi - s);
    s = trim(s, &len);
    for (size_t i = 0; i < sizeof known / sizeof known[0]; i++)
        if (eq_nocase(s, len, known[i].type)) return known[i].kind;
    return AM_MT_UNKNOWN;
}

bool am_mediatype_is_index(enum am_media_kind k)
{
    return k == AM_MT_OCI_INDEX || k == AM_MT_DOCKER_LIST;
}

bool am_mediatype_is_manifest(enum am_media_kind k)
{
    return k != AM_MT_UNKNOWN;
}

/* ---- Accept ---------------------------------------------------------------------- */

/* Returns the end of the list element or parameter starting at s[i], stopping at an
 * unquoted stop byte (',' or ';') or at len. Quoted strings (RFC 9110 §5.6.4) are
 * skipped with their backslash escapes; an unterminated one runs to len. (A single
 * stop byte compared directly: every manifest request's Accept passes through here, and
 * strchr per byte was 12 % of a warm HEAD.) */
static size_t scan_until(const char *s, size_t len, size_t i, char stop)
{
    bool quoted = false;

    for (; i < len; i++) {
        char c = s[i];
        if (quoted) {
            if (c == '\\' && i + 1 < len)
                i++;
            else if (c == '"')
                quoted = false;
        } else if (c == '"') {
            quoted = true;
        } else if (c == stop) {
            break;
        }
    }
    return i;
}

/* Parses a qvalue (RFC 9110 §12.4.2): "0" ["." 0*3DIGIT] / "1" ["." 0*3"0"], into
 * thousandths. Returns false when malformed. */
static bool parse_qvalue(const char *s, size_t len, int *out)
{
    int v, scale = 1000;

    if (len == 0 || (s[0] != '0' && s[0] != '1')) return false;
    if (len > 1 && (s[1] != '.' || len > 5)) return false;
    v = (s[0] - '0') * 1000;
    for (size_t i = 2; i < len; i++) {
        if (s[i] < '0' || s[i] > '9') return false;
        scale /= 10;
        v += (s[i] - '0') * scale;
    }
    if (v > 1000) return false; /* "1.001" */
    *out = v;
    return true;
}

/* How well the range type/subtype matches mt: 3 exact, 2 "type" "/" "*", 1 "*" "/" "*",
 * 0 no match, -1 not a media range. */
static int match_range(const char *r, size_t rlen, const char *mt)
{
    const char *slash = memchr(r, '/', rlen);
    const char *mslash = strchr(mt, '/');
    size_t tlen, slen;

    if (!slash || !mslash) return -1;
    tlen = (size_t)(slash - r);
    slen = rlen - tlen - 1;
    if (tlen == 0 || slen == 0) return -1;
    if (tlen == 1 && r[0] == '*') return slen == 1 && slash[1] == '*' ? 1 : -1;
    if (tlen != (size_t)(mslash - mt) || strncasecmp(r, mt, tlen) != 0) return 0;
    if (slen == 1 && slash[1] == '*') return 2;
    return eq_nocase(slash + 1, slen, mslash + 1) ? 3 : 0;
}

/* Finds the q parameter among the parameters in s[0..len) (the text after the range's
 * first ';'). Returns false when a q value is malformed, which makes the caller ignore
 * the whole element rather than guess its weight; *q is 1000 when q is absent. */
static bool find_q(const char *s, size_t len, int *q)
{
    size_t i = 0;

    *q = 1000;
    while (i < len) {
        size_t end = scan_until(s, len, i, ';');
        size_t plen = end - i;
        const char *p = trim(s + i, &plen);
        const char *eq = memchr(p, '=', plen);
        if (eq) {
            size_t nlen = (size_t)(eq - p), vlen = plen - nlen - 1;
            const char *name = trim(p, &nlen);
            const char *val = trim(eq + 1, &vlen);
            if (eq_nocase(name, nlen, "q") && !parse_qvalue(val, vlen, q)) return false;
        }
        i = end + 1;
    }
    return true;
}

bool am_mediatype_accepts(const char *accept, size_t accept_len, const char *mt)
{
    int best_spec = 0, best_q = 0;
    bool any = false;
    size_t i = 0;

    if (!accept) return true;
    while (i < accept_len) {
        size_t end = scan_until(accept, accept_len, i, ',');
        size_t elen = end - i;
        const char *e = trim(accept + i, &elen);
        size_t semi = scan_until(e, elen, 0, ';');
        size_t rlen = semi;
        const char *r = trim(e, &rlen);
        int spec, q;

        i = end + 1;
        if (elen == 0) continue; /* RFC 9110 §5.6.1: empty list elements are ignored */
        any = true;
        spec = match_range(r, rlen, mt);
        if (spec <= 0) continue;
        q = 1000;
        if (semi < elen && !find_q(e + semi + 1, elen - semi - 1, &q)) continue;
        /* The most specific matching range decides; among equals the highest q. */
        if (spec > best_spec || (spec == best_spec && q > best_q)) {
            best_spec = spec;
            best_q = q;
        }
    }
    if (!any) return true;
    return best_spec > 0 && best_q > 0;
}

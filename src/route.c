/*
 * route — the /v2 request-target router; see include/archmirror/route.h.
 *
 * Repository names contain '/', so an endpoint is recognised from the end of the path,
 * as distribution's router does (registry/api/v2/routes.go anchors
 * "^/v2/{name}/manifests/{reference}$" with a name regexp that cannot contain the
 * reference): the last segment is the reference/digest/uuid and the segment before it
 * names the endpoint. "/v2/a/manifests/manifests/x" is therefore repository
 * "a/manifests", tag "x". Whatever precedes the endpoint must then pass the name
 * grammar, which is what refuses "..", "%2e", "//", uppercase and over-long names.
 *
 * The path is never percent-decoded (see the header). The query is: containerd's
 * mirror requests carry "?ns=<registry>" built with Go's url.Values.Encode, so the value
 * is decoded the way Go's url.ParseQuery does ('+' is a space, %XX must be two hex
 * digits) and then has to be a registry host[:port]. Other parameters are ignored.
 */
#include "archmirror/route.h"

#include <stdio.h>
#include <string.h>

#include "archmirror/error.h"

struct view {
    const char *p;
    size_t len;
};

static bool view_eq(struct view v, const char *lit)
{
    return v.len == strlen(lit) && memcmp(v.p, lit, v.len) == 0;
}

/* If v ends with "/<suffix>", stores what precedes that '/' in *head and returns true.
 * *head may be empty: the name is validated afterwards, so "/v2//manifests/x" is
 * NAME_INVALID rather than an unknown endpoint. */
static bool strip_endpoint(struct view v, const char *suffix, struct view *head)
{
    size_t n = strlen(suffix);

    if (v.len < n + 1 || v.p[v.len - n - 1] != '/' || memcmp(v.p + v.len - n, suffix, n) != 0)
        return false;
    head->p = v.p;
    head->len = v.len - n - 1;
    return true;
}

static int set_name(struct view name, struct am_route *out, char *msg, size_t msglen)
{
    if (am_reference_validate_name(name.p, name.len) != 0) {
        am_error_setmsg(msg, msglen, "invalid repository name");
        return AM_ENAME_INVALID;
    }
    memcpy(out->name, name.p, name.len);
    out->name[name.len] = '\0';
    return 0;
}

static int set_digest(struct view d, struct am_route *out, char *msg, size_t msglen)
{
    if (am_digest_parse(d.p, d.len, &out->digest) != 0) {
        am_error_setmsg(msg, msglen, "invalid digest");
        return AM_EDIGEST_INVALID;
    }
    return 0;
}

/* A manifest reference is a digest when it has ':' (which the tag grammar excludes). */
static int set_reference(struct view ref, struct am_route *out, char *msg, size_t msglen)
{
    if (memchr(ref.p, ':', ref.len)) {
        out->by_digest = true;
        return set_digest(ref, out, msg, msglen);
    }
    if (am_reference_validate_tag(ref.p, ref.len) != 0) {
        am_error_setmsg(msg, msglen, "invalid tag");
        return AM_ETAG_INVALID;
    }
    memcpy(out->tag, ref.p, ref.len);
    out->tag[ref.len] = '\0';
    return 0;
}

static int set_digest_route(enum am_route_kind kind, struct view name, struct view digest,
                            struct am_route *out, char *msg, size_t msglen)
{
    int rc;

    out->kind = kind;
    if ((rc = set_name(name, out, msg, msglen))) return rc;
    return set_digest(digest, out, msg, msglen);
}

/* Classifies rest, the path after "/v2/", from its last two segments. */
static int parse_endpoint(struct view rest, struct am_route *out, char *msg, size_t msglen)
{
    const char *slash = NULL;
    struct view head, last, name;
    int rc;

    for (size_t i = rest.len; i > 0 && !slash; i--)
        if (rest.p[i - 1] == '/') slash = rest.p + i - 1;
    out->kind = AM_ROUTE_UNKNOWN_V2;
    if (!slash) return 0;
    head = (struct view){rest.p, (size_t)(slash - rest.p)};
    last = (struct view){slash + 1, rest.len - head.len - 1};

    /* Each branch sets the kind first, so that a failure still says which endpoint. */
    if (strip_endpoint(head, "manifests", &name)) {
        out->kind = AM_ROUTE_MANIFEST;
        if ((rc = set_name(name, out, msg, msglen))) return rc;
        return set_reference(last, out, msg, msglen);
    }
    /* "/blobs/uploads/" and "/blobs/uploads/<uuid>"; "/blobs/uploads" without the slash
     * too, which distribution's router (StrictSlash) redirects to the former. */
    if (strip_endpoint(head, "blobs/uploads", &name) ||
        (view_eq(last, "uploads") && strip_endpoint(head, "blobs", &name))) {
        out->kind = AM_ROUTE_UPLOAD;
        return set_name(name, out, msg, msglen);
    }
    if (strip_endpoint(head, "blobs", &name))
        return set_digest_route(AM_ROUTE_BLOB, name, last, out, msg, msglen);
    if (strip_endpoint(head, "referrers", &name))
        return set_digest_route(AM_ROUTE_REFERRERS, name, last, out, msg, msglen);
    if (view_eq(last, "list") && strip_endpoint(head, "tags", &name)) {
        out->kind = AM_ROUTE_TAGS;
        return set_name(name, out, msg, msglen);
    }
    return 0;
}

/* ---- query ------------------------------------------------------------------------ */

static int hex_value(char c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* Decodes a query value into dst[dstsize] as Go's url.QueryUnescape does. Refuses
 * malformed escapes, NUL (raw or %00) and values that do not fit. */
static bool query_unescape(struct view v, char *dst, size_t dstsize, size_t *out_len)
{
    size_t n = 0;

    for (size_t i = 0; i < v.len; i++) {
        char c = v.p[i];
        if (c == '%') {
            int hi, lo;
            if (i + 2 >= v.len) return false; /* "%" or "%4" at the end */
            hi = hex_value(v.p[i + 1]);
            lo = hex_value(v.p[i + 2]);
            if (hi < 0 || lo < 0) return false;
            c = (char)(hi << 4 | lo);
            i += 2;
        } else if (c == '+') {
            c = ' ';
        }
        if (c == '\0' || n + 1 >= dstsize) return false;
        dst[n++] = c;
    }
    dst[n] = '\0';
    *out_len = n;
    return true;
}

static int set_ns(struct view value, struct am_route *out, char *msg, size_t msglen)
{
    size_t len;

    if (out->has_ns) {
        am_error_setmsg(msg, msglen, "ns: given more than once");
        return AM_EBAD_REQUEST;
    }
    if (!query_unescape(value, out->ns, sizeof out->ns, &len)) {
        am_error_setmsg(msg, msglen, "ns: malformed percent-encoding or too long");
        return AM_EBAD_REQUEST;
    }
    if (am_reference_validate_registry(out->ns, len) != 0) {
        am_error_setmsg(msg, msglen, "ns: not a registry host[:port]");
        return AM_EBAD_REQUEST;
    }
    out->has_ns = true;
    return 0;
}

/* Splits the query on '&' (Go's ParseQuery no longer splits on ';') and applies ns. */
static int parse_query(struct view q, struct am_route *out, char *msg, size_t msglen)
{
    size_t i = 0;

    while (i < q.len) {
        const char *amp = memchr(q.p + i, '&', q.len - i);
        size_t end = amp ? (size_t)(amp - q.p) : q.len;
        struct view param = {q.p + i, end - i};
        const char *eq = memchr(param.p, '=', param.len);
        struct view key = {param.p, eq ? (size_t)(eq - param.p) : param.len};
        int rc;

        i = end + 1;
        if (!view_eq(key, "ns")) continue;
        /* "ns" with no '=' is an empty value, which is not a registry. */
        rc = set_ns(
            (struct view){param.p + key.len + (eq ? 1 : 0), param.len - key.len - (eq ? 1 : 0)},
            out, msg, msglen);
        if (rc) return rc;
    }
    return 0;
}

int am_route_parse(const char *path, size_t path_len, const char *query, size_t query_len,
                   struct am_route *out, char *msg, size_t msglen)
{
    struct view p = {path, path_len};
    int rc;

    memset(out, 0, sizeof *out);
    if (msg && msglen > 0) msg[0] = '\0';
    if (view_eq(p, "/v2") || view_eq(p, "/v2/")) {
        out->kind = AM_ROUTE_BASE;
    } else if (p.len > 4 && memcmp(p.p, "/v2/", 4) == 0) {
        rc = parse_endpoint((struct view){p.p + 4, p.len - 4}, out, msg, msglen);
        if (rc) return rc;
    } else {
        out->kind = AM_ROUTE_NONE;
        return 0; /* not ours: the query belongs to whoever serves this path */
    }
    return parse_query((struct view){query ? query : "", query ? query_len : 0}, out, msg, msglen);
}

int am_route_upstream_name(const char *upstream, const char *name, char *out, size_t outlen)
{
    /* Docker Hub keeps official images under library/ (distribution/reference
     * normalize.go); clients other than containerd may send the short name. */
    const char *prefix = strcmp(upstream, "docker.io") == 0 && !strchr(name, '/') ? "library/" : "";
    size_t n = strlen(prefix) + strlen(name);

    if (n > AM_NAME_MAX || n >= outlen) return AM_ENAME_INVALID;
    snprintf(out, outlen, "%s%s", prefix, name);
    return 0;
}

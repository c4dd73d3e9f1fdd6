/*
 * reference — repository names, tags, registry hosts and image references; see
 * include/archmirror/reference.h.
 *
 * The validators are hand-written matchers of the OCI distribution spec grammar
 * (spec.md, "Pulling manifests") and of distribution/reference's domain grammar
 * (reference/regexp.go). They work on (pointer, length) so that a NUL byte in the middle
 * of untrusted input is just another byte outside the grammar. Nothing here allocates.
 *
 * Registry hosts are stricter than docker's grammar on purpose: the ns= value and the
 * registry of a reference become cache keys and upstream names, so only one spelling
 * of each host is let through (lowercase, no leading zeros in ports or IPv4 octets).
 */
#include "archmirror/reference.h"

#include <arpa/inet.h>
#include <stdio.h>
#include <string.h>

#include "archmirror/error.h"

#define DNS_LABEL_MAX 63 /* RFC 1035 §2.3.4 */
#define IPV6_TEXT_MAX 45 /* INET6_ADDRSTRLEN - 1 */

static bool is_lower_alnum(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9');
}

static bool is_digit(char c)
{
    return c >= '0' && c <= '9';
}

static bool is_upper(char c)
{
    return c >= 'A' && c <= 'Z';
}

/* Matches one path component, [a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*, at s[*pos..len) and
 * advances *pos past it. Returns false when no component starts at *pos. */
static bool match_component(const char *s, size_t len, size_t *pos)
{
    size_t i = *pos;

    if (i >= len || !is_lower_alnum(s[i])) return false;
    while (i < len && is_lower_alnum(s[i])) i++;
    while (i < len && s[i] != '/') {
        if (s[i] == '.') {
            i++;
        } else if (s[i] == '_') {
            i++;
            if (i < len && s[i] == '_') i++;
        } else if (s[i] == '-') {
            while (i < len && s[i] == '-') i++;
        } else {
            return false;
        }
        /* A separator must be followed by alphanumerics: no "a.", "a._b", "a___b". */
        if (i >= len || !is_lower_alnum(s[i])) return false;
        while (i < len && is_lower_alnum(s[i])) i++;
    }
    *pos = i;
    return true;
}

int am_reference_validate_name(const char *s, size_t len)
{
    size_t pos = 0;

    if (len == 0 || len > AM_NAME_MAX) return AM_ENAME_INVALID;
    for (;;) {
        if (!match_component(s, len, &pos)) return AM_ENAME_INVALID;
        if (pos == len) return 0;
        /* match_component stops only at '/' or the end; a '/' must start another
         * component, which rules out "a//b" and a trailing "a/". */
        pos++;
    }
}

int am_reference_validate_tag(const char *s, size_t len)
{
    if (len == 0 || len > AM_TAG_MAX) return AM_ETAG_INVALID;
    for (size_t i = 0; i < len; i++) {
        char c = s[i];
        bool ok = is_lower_alnum(c) || is_upper(c) || c == '_' || (i > 0 && (c == '.' || c == '-'));
        if (!ok) return AM_ETAG_INVALID;
    }
    return 0;
}

/* One DNS label: [a-z0-9] or [a-z0-9][a-z0-9-]*[a-z0-9], at most 63 bytes. */
static bool valid_label(const char *s, size_t len)
{
    if (len == 0 || len > DNS_LABEL_MAX) return false;
    if (!is_lower_alnum(s[0]) || !is_lower_alnum(s[len - 1])) return false;
    for (size_t i = 1; i + 1 < len; i++)
        if (!is_lower_alnum(s[i]) && s[i] != '-') return false;
    return true;
}

/* Decimal without leading zeros, value in [lo, hi]. */
static bool valid_decimal(const char *s, size_t len, unsigned long lo, unsigned long hi)
{
    unsigned long v = 0;

    if (len == 0 || len > 5 || (len > 1 && s[0] == '0')) return false;
    for (size_t i = 0; i < len; i++) {
        if (!is_digit(s[i])) return false;
        v = v * 10 + (unsigned long)(s[i] - '0');
    }
    return v >= lo && v <= hi;
}

static bool all_digits(const char *s, size_t len)
{
    for (size_t i = 0; i < len; i++)
        if (!is_digit(s[i])) return false;
    return len > 0;
}

/* Dotted-quad IPv4 with each octet 0..255 and no leading zeros (which inet_aton would
 * read as octal, giving a second spelling of the address). */
static bool valid_ipv4(const char *s, size_t len)
{
    size_t start = 0;
    int octets = 0;

    for (size_t i = 0; i <= len; i++) {
        if (i < len && s[i] != '.') continue;
        if (!valid_decimal(s + start, i - start, 0, 255)) return false;
        octets++;
        start = i + 1;
    }
    return octets == 4;
}

/* DNS name or IPv4. RFC 3696 §2: a top-level label is never all-numeric, so a host whose
 * last label is numeric must be an IPv4 address ("999.1.1.1" and "1.2.3" are refused). */
static bool valid_hostname(const char *s, size_t len)
{
    size_t start = 0, last_start = 0;

    if (len == 0) return false;
    for (size_t i = 0; i <= len; i++) {
        if (i < len && s[i] != '.') continue;
        if (!valid_label(s + start, i - start)) return false;
        last_start = start;
        start = i + 1;
    }
    if (all_digits(s + last_start, len - last_start)) return valid_ipv4(s, len);
    return true;
}

/* "[" IPv6 "]" checked with inet_pton; zone identifiers ("%eth0") and uppercase hex are
 * refused so that the text stays one canonical-enough cache key. */
static bool valid_ipv6_literal(const char *s, size_t len)
{
    char text[IPV6_TEXT_MAX + 1];
    struct in6_addr addr;

    if (len < 3 || s[0] != '[' || s[len - 1] != ']' || len - 2 > IPV6_TEXT_MAX) return false;
    for (size_t i = 1; i + 1 < len; i++) {
        char c = s[i];
        if (!is_digit(c) && !(c >= 'a' && c <= 'f') && c != ':' && c != '.') return false;
    }
    memcpy(text, s + 1, len - 2);
    text[len - 2] = '\0';
    return inet_pton(AF_INET6, text, &addr) == 1;
}

int am_reference_validate_registry(const char *s, size_t len)
{
    size_t host_len = len;

    if (len == 0 || len > AM_REGISTRY_MAX) return AM_EINVAL;
    /* The port is after the last ':' that follows the host; inside brackets ':' belongs
     * to the IPv6 address. */
    if (s[0] == '[') {
        const char *close = memchr(s, ']', len);
        if (!close) return AM_EINVAL;
        host_len = (size_t)(close - s) + 1;
        if (host_len < len && s[host_len] != ':') return AM_EINVAL;
        if (!valid_ipv6_literal(s, host_len)) return AM_EINVAL;
    } else {
        const char *colon = memchr(s, ':', len);
        if (colon) host_len = (size_t)(colon - s);
        if (!valid_hostname(s, host_len)) return AM_EINVAL;
    }
    if (host_len < len && !valid_decimal(s + host_len + 1, len - host_len - 1, 1, 65535))
        return AM_EINVAL;
    return 0;
}

/* ---- image references ---------------------------------------------------------- */

static bool has_upper(const char *s, size_t len)
{
    for (size_t i = 0; i < len; i++)
        if (is_upper(s[i])) return true;
    return false;
}

/* distribution/reference splitDockerDomain: the first component names a registry when
 * it contains '.' or ':', is "localhost", or has uppercase letters (which a repository
 * cannot have; our registry grammar then refuses them too). */
static bool first_component_is_registry(const char *s, size_t len)
{
    return memchr(s, '.', len) || memchr(s, ':', len) ||
           (len == 9 && memcmp(s, "localhost", 9) == 0) || has_upper(s, len);
}

/* Copies s[0..len) into dst as a C string. Callers have validated len against the
 * grammar's maximum, which the destination fields are sized for. */
static void copy_str(char *dst, const char *s, size_t len)
{
    memcpy(dst, s, len);
    dst[len] = '\0';
}

static bool is_identifier(const char *s, size_t len)
{
    if (len != 64) return false;
    for (size_t i = 0; i < len; i++)
        if (!is_digit(s[i]) && !(s[i] >= 'a' && s[i] <= 'f')) return false;
    return true;
}

/* Sets out->registry from the domain part, normalising docker hub's aliases. */
static int parse_registry(const char *s, size_t len, struct am_reference *out, char *msg,
                          size_t msglen)
{
    if (am_reference_validate_registry(s, len) != 0) {
        am_error_setmsg(msg, msglen, "invalid reference format: invalid registry host");
        return AM_ENAME_INVALID;
    }
    /* docker normalises "index.docker.io" (its legacy default domain); containerd users
     * also write the v2 endpoint "registry-1.docker.io". Both are Docker Hub. */
    if ((len == 15 && memcmp(s, "index.docker.io", 15) == 0) ||
        (len == 20 && memcmp(s, "registry-1.docker.io", 20) == 0)) {
        s = "docker.io";
        len = 9;
    }
    copy_str(out->registry, s, len);
    return 0;
}

/* Sets out->repository from the path, adding "library/" to one-component hub names. */
static int parse_repository(const char *s, size_t len, struct am_reference *out, char *msg,
                            size_t msglen)
{
    bool hub = strcmp(out->registry, "docker.io") == 0;
    size_t prefix = hub && !memchr(s, '/', len) ? 8 : 0;

    if (has_upper(s, len)) {
        am_error_setmsg(msg, msglen, "invalid reference format: repository name must be lowercase");
        return AM_ENAME_INVALID;
    }
    if (am_reference_validate_name(s, len) != 0) {
        am_error_setmsg(msg, msglen, "invalid reference format: invalid repository name");
        return AM_ENAME_INVALID;
    }
    /* distribution/reference limits the whole normalised name (registry "/" path). */
    if (strlen(out->registry) + 1 + prefix + len > AM_NAME_MAX) {
        am_error_setmsg(msg, msglen, "repository name must not be more than %d characters",
                        AM_NAME_MAX);
        return AM_ENAME_INVALID;
    }
    memcpy(out->repository, "library/", prefix);
    copy_str(out->repository + prefix, s, len);
    return 0;
}

/* Splits "name[:tag]" (no registry) and fills repository and tag. */
static int parse_name_tag(const char *s, size_t len, struct am_reference *out, char *msg,
                          size_t msglen)
{
    const char *colon = memchr(s, ':', len);
    size_t name_len = colon ? (size_t)(colon - s) : len;
    int rc = parse_repository(s, name_len, out, msg, msglen);

    if (rc || !colon) return rc;
    if (am_reference_validate_tag(colon + 1, len - name_len - 1) != 0) {
        am_error_setmsg(msg, msglen, "invalid reference format: invalid tag");
        return AM_ETAG_INVALID;
    }
    copy_str(out->tag, colon + 1, len - name_len - 1);
    out->has_tag = true;
    return 0;
}

int am_reference_parse(const char *s, size_t len, struct am_reference *out, char *msg,
                       size_t msglen)
{
    const char *at = memchr(s, '@', len);
    size_t left = at ? (size_t)(at - s) : len; /* s[0..left) is [registry/]name[:tag] */
    const char *slash = memchr(s, '/', left);
    const char *path = s;
    struct am_reference ref;
    int rc;

    memset(&ref, 0, sizeof ref);
    if (len == 0) {
        am_error_setmsg(msg, msglen, "invalid reference format: empty reference");
        return AM_ENAME_INVALID;
    }
    /* distribution/reference ParseNormalizedNamed: a bare 64-hex string is an image ID,
     * not a name, and is refused to avoid ambiguity. */
    if (is_identifier(s, len)) {
        am_error_setmsg(msg, msglen,
                        "invalid repository name: cannot specify 64-byte hexadecimal strings");
        return AM_ENAME_INVALID;
    }
    if (at) {
        if (am_digest_parse(at + 1, len - left - 1, &ref.digest) != 0) {
            am_error_setmsg(msg, msglen, "invalid reference format: invalid digest");
            return AM_EDIGEST_INVALID;
        }
        ref.has_digest = true;
    }
    if (slash && first_component_is_registry(s, (size_t)(slash - s))) {
        if ((rc = parse_registry(s, (size_t)(slash - s), &ref, msg, msglen))) return rc;
        path = slash + 1;
    } else {
        strcpy(ref.registry, "docker.io");
    }
    if ((rc = parse_name_tag(path, left - (size_t)(path - s), &ref, msg, msglen))) return rc;
    /* docker's default when the reference names neither a tag nor a digest. */
    if (!ref.has_tag && !ref.has_digest) {
        strcpy(ref.tag, "latest");
        ref.has_tag = true;
    }
    *out = ref;
    return 0;
}

void am_reference_format(const struct am_reference *ref, char *out, size_t outlen)
{
    if (outlen == 0) return;
    snprintf(out, outlen, "%s/%s%s%s%s%s", ref->registry, ref->repository, ref->has_tag ? ":" : "",
             ref->has_tag ? ref->tag : "", ref->has_digest ? "@" : "",
             ref->has_digest ? ref->digest.str : "");
}

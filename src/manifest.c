/*
 * manifest — parsing of image manifests and indexes; see include/archmirror/manifest.h.
 *
 * Understood formats (all JSON objects):
 *   OCI image manifest / OCI image index   (OCI image spec manifest.md, image-index.md)
 *   Docker image manifest schema 2 / list  (distribution docs/spec/manifest-v2-2.md)
 *   Docker schema 1, signed or not         (kind only: passed through, never inspected)
 *
 * The kind comes from the JSON mediaType when present, otherwise from the upstream's
 * Content-Type, otherwise (schema 2 only) from the shape of the document, as containerd
 * does for OCI manifests written before mediaType became recommended (image spec
 * v1.0.2). A JSON mediaType and a Content-Type that name different kinds are refused:
 * serving bytes under a type other than the one they declare is how a manifest gets
 * misread downstream (OCI distribution spec, "Pulling manifests").
 *
 * Input is untrusted. Duplicate keys are refused (two parsers could pick different
 * values), every field is type-checked, digests go through am_digest_parse, sizes are
 * non-negative integers, strings are bounded by the struct fields, and the number of
 * descriptors is capped. Messages are one line naming the JSON path that failed.
 */
#include "archmirror/manifest.h"

#include <jansson.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "archmirror/error.h"

/* Upper bound on manifests[] or layers[]; real images have a few dozen at most. */
#define MANIFEST_ENTRIES_MAX 10000
/* Room for "manifests[9999].platform.os.version" and similar paths. */
#define WHERE_MAX 64

/* A message sink: msg may be NULL. */
struct report {
    char *msg;
    size_t msglen;
};

static int fail(const struct report *r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static int fail(const struct report *r, const char *fmt, ...)
{
    va_list ap;

    if (r->msg && r->msglen > 0) {
        va_start(ap, fmt);
        vsnprintf(r->msg, r->msglen, fmt, ap);
        va_end(ap);
    }
    return AM_EMANIFEST_INVALID;
}

/* Replaces control and non-ASCII bytes so a message built from jansson's error text
 * (which quotes input) stays one printable line. */
static void sanitize(char *s)
{
    for (; s && *s; s++)
        if ((unsigned char)*s < 0x20 || (unsigned char)*s > 0x7e) *s = '?';
}

/* Media types and platform strings are printable ASCII: they end up in HTTP headers,
 * log lines and LMDB keys. */
static bool printable(const char *s, size_t len)
{
    for (size_t i = 0; i < len; i++)
        if ((unsigned char)s[i] < 0x21 || (unsigned char)s[i] > 0x7e) return false;
    return true;
}

/* Copies the string member key of obj into dst[dstsize]. An absent member leaves dst
 * empty and is an error only when required. */
static int get_string(json_t *obj, const char *key, bool required, char *dst, size_t dstsize,
                      const char *where, const struct report *r)
{
    json_t *v = json_object_get(obj, key);
    size_t len;

    dst[0] = '\0';
    if (!v) return required ? fail(r, "%s%s: missing", where, key) : 0;
    if (!json_is_string(v)) return fail(r, "%s%s: not a string", where, key);
    len = json_string_length(v);
    if (len >= dstsize) return fail(r, "%s%s: longer than %zu bytes", where, key, dstsize - 1);
    if (!printable(json_string_value(v), len))
        return fail(r, "%s%s: contains non-printable bytes", where, key);
    memcpy(dst, json_string_value(v), len);
    dst[len] = '\0';
    return 0;
}

/* OCI image-index.md "platform": os and architecture, optional variant, os.version and
 * os.features. Absent strings stay empty, as in containerd's Go decoding; wrong types
 * and over-long values are refused. */
static int parse_platform(json_t *p, const char *where, struct am_platform *out,
                          const struct report *r)
{
    char w[WHERE_MAX];
    json_t *features;
    int rc;

    snprintf(w, sizeof w, "%splatform.", where);
    if (!json_is_object(p)) return fail(r, "%splatform: not an object", where);
    if ((rc = get_string(p, "os", false, out->os, sizeof out->os, w, r)) ||
        (rc = get_string(p, "architecture", false, out->architecture, sizeof out->architecture, w,
                         r)) ||
        (rc = get_string(p, "variant", false, out->variant, sizeof out->variant, w, r)) ||
        (rc = get_string(p, "os.version", false, out->os_version, sizeof out->os_version, w, r)))
        return rc;
    features = json_object_get(p, "os.features");
    if (!features) return 0;
    if (!json_is_array(features)) return fail(r, "%sos.features: not an array", w);
    for (size_t i = 0; i < json_array_size(features); i++)
        if (!json_is_string(json_array_get(features, i)))
            return fail(r, "%sos.features[%zu]: not a string", w, i);
    return 0;
}

/* OCI annotations are a string-to-string map (annotations.md). buildx marks its
 * provenance/SBOM entries in an index with vnd.docker.reference.type (buildkit
 * docs/attestations/attestation-storage.md). */
static int parse_annotations(json_t *a, const char *where, bool *is_attestation,
                             const struct report *r)
{
    if (!json_is_object(a)) return fail(r, "%sannotations: not an object", where);
    for (void *it = json_object_iter(a); it; it = json_object_iter_next(a, it)) {
        const char *key = json_object_iter_key(it);
        json_t *v = json_object_iter_value(it);
        if (!json_is_string(v)) return fail(r, "%sannotations: value is not a string", where);
        if (strcmp(key, "vnd.docker.reference.type") == 0 &&
            strcmp(json_string_value(v), "attestation-manifest") == 0)
            *is_attestation = true;
    }
    return 0;
}

static int parse_size(json_t *d, const char *where, int64_t *out, const struct report *r)
{
    json_t *v = json_object_get(d, "size");

    if (!v) return fail(r, "%ssize: missing", where);
    /* A real (12.0, 1e3) is not an integer; jansson refuses integers beyond int64. */
    if (!json_is_integer(v)) return fail(r, "%ssize: not an integer", where);
    if (json_integer_value(v) < 0) return fail(r, "%ssize: negative", where);
    *out = (int64_t)json_integer_value(v);
    return 0;
}

static int parse_digest(json_t *d, const char *where, struct am_digest *out, const struct report *r)
{
    json_t *v = json_object_get(d, "digest");

    if (!v) return fail(r, "%sdigest: missing", where);
    if (!json_is_string(v)) return fail(r, "%sdigest: not a string", where);
    if (am_digest_parse(json_string_value(v), json_string_length(v), out) != 0)
        return fail(r, "%sdigest: invalid digest", where);
    return 0;
}

/* One descriptor (OCI descriptor.md). where is the JSON path prefix with its trailing
 * '.', e.g. "manifests[2].". */
static int parse_descriptor(json_t *d, const char *where, bool need_media_type,
                            struct am_descriptor *out, const struct report *r)
{
    json_t *platform, *annotations;
    int rc;

    if (!json_is_object(d)) return fail(r, "%.*s: not an object", (int)strlen(where) - 1, where);
    if ((rc = get_string(d, "mediaType", need_media_type, out->media_type, sizeof out->media_type,
                         where, r)) ||
        (rc = parse_digest(d, where, &out->digest, r)) ||
        (rc = parse_size(d, where, &out->size, r)))
        return rc;
    platform = json_object_get(d, "platform");
    if (platform) {
        if ((rc = parse_platform(platform, where, &out->platform, r))) return rc;
        out->has_platform = true;
    }
    annotations = json_object_get(d, "annotations");
    if (annotations && (rc = parse_annotations(annotations, where, &out->is_attestation, r)))
        return rc;
    return 0;
}

/* Parses the array member key (manifests[] or layers[]) into out->entries. */
static int parse_entries(json_t *root, const char *key, bool need_media_type,
                         struct am_manifest *out, const struct report *r)
{
    json_t *arr = json_object_get(root, key);
    char where[WHERE_MAX];
    size_t n;
    int rc;

    if (!arr) return fail(r, "%s: missing", key);
    if (!json_is_array(arr)) return fail(r, "%s: not an array", key);
    n = json_array_size(arr);
    if (n > MANIFEST_ENTRIES_MAX)
        return fail(r, "%s: more than %d entries", key, MANIFEST_ENTRIES_MAX);
    if (n == 0) return 0;
    out->entries = calloc(n, sizeof *out->entries);
    if (!out->entries) return AM_ENOMEM;
    for (size_t i = 0; i < n; i++) {
        snprintf(where, sizeof where, "%s[%zu].", key, i);
        rc = parse_descriptor(json_array_get(arr, i), where, need_media_type, &out->entries[i], r);
        if (rc) return rc;
        out->n_entries = i + 1;
    }
    return 0;
}

static const char *kind_media_type(enum am_media_kind kind, bool signed_v1)
{
    switch (kind) {
    case AM_MT_OCI_MANIFEST: return AM_MT_OCI_MANIFEST_S;
    case AM_MT_OCI_INDEX: return AM_MT_OCI_INDEX_S;
    case AM_MT_DOCKER_MANIFEST: return AM_MT_DOCKER_MANIFEST_S;
    case AM_MT_DOCKER_LIST: return AM_MT_DOCKER_LIST_S;
    case AM_MT_DOCKER_V1: return signed_v1 ? AM_MT_DOCKER_V1_SIGNED_S : AM_MT_DOCKER_V1_S;
    default: return "";
    }
}

/* Decides out->kind and out->media_type. Without a JSON mediaType the stored type is
 * the canonical spelling of the kind; for schema 1 "signatures" tells a JWS-signed
 * manifest from an unsigned one (distribution's schema1 package). */
static int decide_kind(json_t *root, const char *content_type, struct am_manifest *out,
                       const struct report *r)
{
    enum am_media_kind ct_kind =
        content_type ? am_mediatype_classify(content_type, strlen(content_type)) : AM_MT_UNKNOWN;
    int rc;

    if ((rc = get_string(root, "mediaType", false, out->media_type, sizeof out->media_type, "", r)))
        return rc;
    if (out->media_type[0]) {
        out->kind = am_mediatype_classify(out->media_type, strlen(out->media_type));
        if (out->kind == AM_MT_UNKNOWN) return fail(r, "mediaType: not a manifest media type");
    } else if (out->schema_version == 1) {
        out->kind = AM_MT_DOCKER_V1;
    } else if (ct_kind != AM_MT_UNKNOWN) {
        out->kind = ct_kind;
    } else if (json_object_get(root, "manifests")) {
        out->kind = AM_MT_OCI_INDEX;
    } else if (json_object_get(root, "config")) {
        out->kind = AM_MT_OCI_MANIFEST;
    } else {
        return fail(r, "mediaType: missing, and Content-Type names no manifest type");
    }
    if (ct_kind != AM_MT_UNKNOWN && ct_kind != out->kind)
        return fail(r, "mediaType: contradicts the Content-Type");
    if ((out->kind == AM_MT_DOCKER_V1) != (out->schema_version == 1))
        return fail(r, "schemaVersion: %d does not match the media type", out->schema_version);
    if (!out->media_type[0])
        strcpy(out->media_type,
               kind_media_type(out->kind, json_object_get(root, "signatures") != NULL));
    return 0;
}

static int parse_schema_version(json_t *root, struct am_manifest *out, const struct report *r)
{
    json_t *v = json_object_get(root, "schemaVersion");

    if (!v) return fail(r, "schemaVersion: missing");
    if (!json_is_integer(v)) return fail(r, "schemaVersion: not an integer");
    if (json_integer_value(v) != 1 && json_integer_value(v) != 2)
        return fail(r, "schemaVersion: unsupported value");
    out->schema_version = (int)json_integer_value(v);
    return 0;
}

static int parse_root(json_t *root, const char *content_type, struct am_manifest *out,
                      const struct report *r)
{
    json_t *config;
    int rc;

    if (!json_is_object(root)) return fail(r, "manifest is not a JSON object");
    if ((rc = parse_schema_version(root, out, r)) || (rc = decide_kind(root, content_type, out, r)))
        return rc;
    if (out->kind == AM_MT_DOCKER_V1) return 0; /* passed through uninspected */
    /* Index entries may omit mediaType (early OCI indexes did); a manifest's config and
     * layers must carry one (descriptor.md: mediaType REQUIRED). */
    if (am_mediatype_is_index(out->kind)) return parse_entries(root, "manifests", false, out, r);
    config = json_object_get(root, "config");
    if (!config) return fail(r, "config: missing");
    if ((rc = parse_descriptor(config, "config.", true, &out->config, r))) return rc;
    out->has_config = true;
    return parse_entries(root, "layers", true, out, r);
}

int am_manifest_parse(const char *bytes, size_t len, const char *content_type,
                      struct am_manifest *out, char *msg, size_t msglen)
{
    const struct report r = {msg, msglen};
    json_error_t jerr;
    json_t *root;
    int rc;

    memset(out, 0, sizeof *out);
    if (msg && msglen > 0) msg[0] = '\0';
    if (len == 0) return fail(&r, "manifest is empty");
    /* JSON_REJECT_DUPLICATES: see the file comment. NUL inside strings is refused by
     * jansson unless JSON_ALLOW_NUL; trailing bytes after the object are refused. */
    root = json_loadb(bytes, len, JSON_REJECT_DUPLICATES, &jerr);
    if (!root) {
        if (json_error_code(&jerr) == json_error_out_of_memory) return AM_ENOMEM;
        rc = fail(&r, "invalid JSON at line %d column %d: %s", jerr.line, jerr.column, jerr.text);
        if (msg && msglen > 0) sanitize(msg);
        return rc;
    }
    rc = parse_root(root, content_type, out, &r);
    json_decref(root);
    if (rc) am_manifest_cleanup(out);
    return rc;
}

void am_manifest_cleanup(struct am_manifest *m)
{
    if (!m) return;
    free(m->entries);
    m->entries = NULL;
    m->n_entries = 0;
}

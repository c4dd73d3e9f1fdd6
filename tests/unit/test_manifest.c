/* Unit tests for src/manifest.c: the five manifest formats, kind negotiation with
 * Content-Type, and refusal of malformed, mistyped and oversized input. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "archmirror/buf.h"
#include "archmirror/error.h"
#include "archmirror/manifest.h"

#define DA "sha256:4bcff63911fcb4448bd4fdacec207030997caf25e9bea4045fa6c8c44de311d1"
#define DB "sha256:a5ff4b0b6d9f3b9ad2b0e1d41dde4d1b1a4c07d3ea89c6d1f9ba0a3c4b5d6e7f"
#define DC "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
#define DD "sha256:fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210"

/* The shape of a buildx `--provenance` push: one image manifest plus its attestation
 * manifest, whose platform is unknown/unknown (buildkit attestation-storage.md). */
static const char oci_index_with_attestation[] =
    "{\n"
    "  \"schemaVersion\": 2,\n"
    "  \"mediaType\": \"application/vnd.oci.image.index.v1+json\",\n"
    "  \"manifests\": [\n"
    "    {\n"
    "      \"mediaType\": \"application/vnd.oci.image.manifest.v1+json\",\n"
    "      \"digest\": \"" DA "\",\n"
    "      \"size\": 1021,\n"
    "      \"platform\": {\"architecture\": \"amd64\", \"os\": \"linux\"}\n"
    "    },\n"
    "    {\n"
    "      \"mediaType\": \"application/vnd.oci.image.manifest.v1+json\",\n"
    "      \"digest\": \"" DB "\",\n"
    "      \"size\": 566,\n"
    "      \"annotations\": {\n"
    "        \"vnd.docker.reference.digest\": \"" DA "\",\n"
    "        \"vnd.docker.reference.type\": \"attestation-manifest\"\n"
    "      },\n"
    "      \"platform\": {\"architecture\": \"unknown\", \"os\": \"unknown\"}\n"
    "    }\n"
    "  ]\n"
    "}\n";

/* Docker Hub's style of list (library images), including arm/v7 and a Windows entry. */
static const char docker_list[] =
    "{\n"
    "   \"manifests\": [\n"
    "      {\n"
    "         \"digest\": \"" DA "\",\n"
    "         \"mediaType\": \"application/vnd.docker.distribution.manifest.v2+json\",\n"
    "         \"platform\": {\"architecture\": \"amd64\", \"os\": \"linux\"},\n"
    "         \"size\": 528\n"
    "      },\n"
    "      {\n"
    "         \"digest\": \"" DB "\",\n"
    "         \"mediaType\": \"application/vnd.docker.distribution.manifest.v2+json\",\n"
    "         \"platform\": {\"architecture\": \"arm\", \"os\": \"linux\", \"variant\": \"v7\"},\n"
    "         \"size\": 528\n"
    "      },\n"
    "      {\n"
    "         \"digest\": \"" DC "\",\n"
    "         \"mediaType\": \"application/vnd.docker.distribution.manifest.v2+json\",\n"
    "         \"platform\": {\"architecture\": \"amd64\", \"os\": \"windows\",\n"
    "                      \"os.version\": \"10.0.17763.5458\", \"os.features\": [\"win32k\"]},\n"
    "         \"size\": 1125\n"
    "      }\n"
    "   ],\n"
    "   \"mediaType\": \"application/vnd.docker.distribution.manifest.list.v2+json\",\n"
    "   \"schemaVersion\": 2\n"
    "}\n";

static const char docker_manifest[] =
    "{\n"
    "   \"schemaVersion\": 2,\n"
    "   \"mediaType\": \"application/vnd.docker.distribution.manifest.v2+json\",\n"
    "   \"config\": {\n"
    "      \"mediaType\": \"application/vnd.docker.container.image.v1+json\",\n"
    "      \"size\": 1472,\n"
    "      \"digest\": \"" DC "\"\n"
    "   },\n"
    "   \"layers\": [\n"
    "      {\n"
    "         \"mediaType\": \"application/vnd.docker.image.rootfs.diff.tar.gzip\",\n"
    "         \"size\": 3408729,\n"
    "         \"digest\": \"" DD "\"\n"
    "      }\n"
    "   ]\n"
    "}";

/* A signed schema 1 manifest as distribution 2.x served it (abridged JWS). */
static const char schema1_signed[] =
    "{\n"
    "   \"schemaVersion\": 1,\n"
    "   \"name\": \"library/hello-world\",\n"
    "   \"tag\": \"latest\",\n"
    "   \"architecture\": \"amd64\",\n"
    "   \"fsLayers\": [{\"blobSum\": \"" DA "\"}],\n"
    "   \"history\": [{\"v1Compatibility\": \"{\\\"id\\\":\\\"x\\\"}\"}],\n"
    "   \"signatures\": [{\"header\": {\"alg\": \"ES256\"}, \"signature\": \"c2ln\",\n"
    "                   \"protected\": \"eyJmb3JtYXRMZW5ndGgiOjF9\"}]\n"
    "}";

struct parsed {
    struct am_manifest m;
    char msg[256];
    int rc;
};

static struct parsed parse_ct(const char *json, const char *content_type)
{
    struct parsed p;
    memset(&p, 0, sizeof p);
    p.rc = am_manifest_parse(json, strlen(json), content_type, &p.m, p.msg, sizeof p.msg);
    return p;
}

/* Parses json that must fail, checks the message, and that nothing leaked or stayed. */
static void expect_invalid(const char *json, const char *content_type, const char *msg)
{
    struct parsed p = parse_ct(json, content_type);
    if (p.rc != AM_EMANIFEST_INVALID) fail_msg("accepted (%s): %s", am_error_name(p.rc), json);
    if (!strstr(p.msg, msg)) fail_msg("message \"%s\", want \"%s\"", p.msg, msg);
    assert_null(strchr(p.msg, '\n'));
    assert_null(p.m.entries);
    assert_int_equal(p.m.n_entries, 0);
}

static void parses_oci_index_and_flags_the_attestation(void **state)
{
    struct parsed p = parse_ct(oci_index_with_attestation, AM_MT_OCI_INDEX_S);
    assert_int_equal(p.rc, 0);
    assert_int_equal(p.m.kind, AM_MT_OCI_INDEX);
    assert_string_equal(p.m.media_type, AM_MT_OCI_INDEX_S);
    assert_int_equal(p.m.schema_version, 2);
    assert_false(p.m.has_config);
    assert_int_equal(p.m.n_entries, 2);

    const struct am_descriptor *img = &p.m.entries[0], *att = &p.m.entries[1];
    assert_string_equal(img->media_type, AM_MT_OCI_MANIFEST_S);
    assert_string_equal(img->digest.str, DA);
    assert_int_equal(img->size, 1021);
    assert_true(img->has_platform);
    assert_string_equal(img->platform.os, "linux");
    assert_string_equal(img->platform.architecture, "amd64");
    assert_string_equal(img->platform.variant, "");
    assert_false(img->is_attestation);

    assert_string_equal(att->digest.str, DB);
    assert_int_equal(att->size, 566);
    assert_true(att->is_attestation);
    assert_string_equal(att->platform.architecture, "unknown");
    am_manifest_cleanup(&p.m);
    assert_null(p.m.entries);
}

static void parses_docker_list_with_variants_and_os_version(void **state)
{
    struct parsed p = parse_ct(docker_list, AM_MT_DOCKER_LIST_S);
    assert_int_equal(p.rc, 0);
    assert_int_equal(p.m.kind, AM_MT_DOCKER_LIST);
    assert_string_equal(p.m.media_type, AM_MT_DOCKER_LIST_S);
    assert_int_equal(p.m.n_entries, 3);
    assert_string_equal(p.m.entries[1].platform.architecture, "arm");
    assert_string_equal(p.m.entries[1].platform.variant, "v7");
    assert_string_equal(p.m.entries[1].digest.str, DB);
    assert_string_equal(p.m.entries[2].platform.os, "windows");
    assert_string_equal(p.m.entries[2].platform.os_version, "10.0.17763.5458");
    assert_int_equal(p.m.entries[2].size, 1125);
    for (size_t i = 0; i < p.m.n_entries; i++) assert_false(p.m.entries[i].is_attestation);
    am_manifest_cleanup(&p.m);
}

static void parses_docker_schema2_manifest(void **state)
{
    struct parsed p = parse_ct(docker_manifest, NULL);
    assert_int_equal(p.rc, 0);
    assert_int_equal(p.m.kind, AM_MT_DOCKER_MANIFEST);
    assert_true(p.m.has_config);
    assert_string_equal(p.m.config.media_type, "application/vnd.docker.container.image.v1+json");
    assert_string_equal(p.m.config.digest.str, DC);
    assert_int_equal(p.m.config.size, 1472);
    assert_false(p.m.config.has_platform);
    assert_int_equal(p.m.n_entries, 1);
    assert_string_equal(p.m.entries[0].media_type,
                        "application/vnd.docker.image.rootfs.diff.tar.gzip");
    assert_int_equal(p.m.entries[0].size, 3408729);
    am_manifest_cleanup(&p.m);
}

static void parses_schema1_as_docker_v1_without_entries(void **state)
{
    struct parsed p = parse_ct(schema1_signed, AM_MT_DOCKER_V1_SIGNED_S);
    assert_int_equal(p.rc, 0);
    assert_int_equal(p.m.kind, AM_MT_DOCKER_V1);
    assert_int_equal(p.m.schema_version, 1);
    assert_string_equal(p.m.media_type, AM_MT_DOCKER_V1_SIGNED_S);
    assert_int_equal(p.m.n_entries, 0);
    assert_null(p.m.entries);
    am_manifest_cleanup(&p.m);
}

static void names_schema1_signed_or_not_from_its_signatures(void **state)
{
    struct parsed p = parse_ct(schema1_signed, "application/json");
    assert_int_equal(p.rc, 0);
    assert_string_equal(p.m.media_type, AM_MT_DOCKER_V1_SIGNED_S);
    p = parse_ct("{\"schemaVersion\":1,\"name\":\"a\",\"fsLayers\":[]}", NULL);
    assert_int_equal(p.rc, 0);
    assert_int_equal(p.m.kind, AM_MT_DOCKER_V1);
    assert_string_equal(p.m.media_type, AM_MT_DOCKER_V1_S);
}

static void parses_an_oci_manifest_with_empty_layers(void **state)
{
    struct parsed p = parse_ct("{\"schemaVersion\":2,\"mediaType\":\"" AM_MT_OCI_MANIFEST_S
                               "\",\"config\":{\"mediaType\":\"application/vnd.oci.empty.v1+"
                               "json\",\"digest\":\"" DA "\",\"size\":2},\"layers\":[]}",
                               NULL);
    assert_int_equal(p.rc, 0);
    assert_int_equal(p.m.kind, AM_MT_OCI_MANIFEST);
    assert_int_equal(p.m.n_entries, 0);
    assert_null(p.m.entries);
}

static void accepts_index_entries_without_media_type(void **state)
{
    struct parsed p = parse_ct("{\"schemaVersion\":2,\"mediaType\":\"" AM_MT_OCI_INDEX_S
                               "\",\"manifests\":[{\"digest\":\"" DA "\",\"size\":7}]}",
                               NULL);
    assert_int_equal(p.rc, 0);
    assert_int_equal(p.m.n_entries, 1);
    assert_string_equal(p.m.entries[0].media_type, "");
    assert_false(p.m.entries[0].has_platform);
    am_manifest_cleanup(&p.m);
}

static void takes_the_kind_from_content_type_when_json_has_none(void **state)
{
    const char *json = "{\"schemaVersion\":2,\"manifests\":[]}";
    struct parsed p = parse_ct(json, " application/VND.docker.distribution.manifest.list.v2+json"
                                     "; charset=utf-8");
    assert_int_equal(p.rc, 0);
    assert_int_equal(p.m.kind, AM_MT_DOCKER_LIST);
    /* The stored type is the canonical spelling, not the header's. */
    assert_string_equal(p.m.media_type, AM_MT_DOCKER_LIST_S);
}

static void infers_oci_kinds_from_shape_without_any_type(void **state)
{
    struct parsed p = parse_ct("{\"schemaVersion\":2,\"manifests\":[]}", NULL);
    assert_int_equal(p.rc, 0);
    assert_int_equal(p.m.kind, AM_MT_OCI_INDEX);
    assert_string_equal(p.m.media_type, AM_MT_OCI_INDEX_S);
    p = parse_ct("{\"schemaVersion\":2,\"config\":{\"mediaType\":\"a/b\",\"digest\":\"" DA
                 "\",\"size\":1},\"layers\":[]}",
                 "application/octet-stream");
    assert_int_equal(p.rc, 0);
    assert_int_equal(p.m.kind, AM_MT_OCI_MANIFEST);
    expect_invalid("{\"schemaVersion\":2}", NULL, "mediaType: missing");
}

static void prefers_json_media_type_over_unknown_content_type(void **state)
{
    struct parsed p = parse_ct(docker_manifest, "application/json");
    assert_int_equal(p.rc, 0);
    assert_int_equal(p.m.kind, AM_MT_DOCKER_MANIFEST);
    am_manifest_cleanup(&p.m);
    p = parse_ct(docker_manifest, "");
    assert_int_equal(p.rc, 0);
    am_manifest_cleanup(&p.m);
}

static void rejects_media_type_contradicting_content_type(void **state)
{
    expect_invalid(docker_manifest, AM_MT_OCI_MANIFEST_S, "contradicts the Content-Type");
    expect_invalid(oci_index_with_attestation, AM_MT_DOCKER_LIST_S, "contradicts the Content-Type");
    expect_invalid(schema1_signed, AM_MT_DOCKER_MANIFEST_S, "contradicts the Content-Type");
}

static void rejects_schema_version_that_does_not_match_the_type(void **state)
{
    expect_invalid("{\"schemaVersion\":1,\"mediaType\":\"" AM_MT_OCI_MANIFEST_S "\"}", NULL,
                   "schemaVersion: 1 does not match");
    expect_invalid("{\"schemaVersion\":2,\"mediaType\":\"" AM_MT_DOCKER_V1_S "\"}", NULL,
                   "schemaVersion: 2 does not match");
    expect_invalid("{\"schemaVersion\":3,\"manifests\":[]}", NULL, "schemaVersion: unsupported");
    expect_invalid("{\"manifests\":[]}", NULL, "schemaVersion: missing");
}

static void rejects_unknown_or_malformed_media_types(void **state)
{
    expect_invalid("{\"schemaVersion\":2,\"mediaType\":\"application/json\"}", NULL,
                   "mediaType: not a manifest media type");
    expect_invalid("{\"schemaVersion\":2,\"mediaType\":7}", NULL, "mediaType: not a string");
    expect_invalid("{\"schemaVersion\":2,\"mediaType\":\"" AM_MT_OCI_INDEX_S "\\r\\n\"}", NULL,
                   "mediaType: contains non-printable bytes");
}

static void rejects_malformed_json(void **state)
{
    expect_invalid("{", NULL, "invalid JSON at line 1");
    expect_invalid("{\"schemaVersion\":2,}", NULL, "invalid JSON");
    expect_invalid("{\"schemaVersion\":2} trailing", NULL, "invalid JSON");
    expect_invalid("\xff\xfe{}", NULL, "invalid JSON");
    expect_invalid("[]", NULL, "not a JSON object");
    expect_invalid("null", NULL, "invalid JSON");
    expect_invalid("", NULL, "empty");
}

static void keeps_json_error_messages_printable(void **state)
{
    /* jansson quotes the offending token; a control byte there must not reach a log. */
    struct parsed p = parse_ct("{\"a\":1\x1b[31m}", NULL);
    assert_int_equal(p.rc, AM_EMANIFEST_INVALID);
    assert_non_null(strstr(p.msg, "near '?'"));
    for (const char *c = p.msg; *c; c++) assert_true(*c >= 0x20 && *c < 0x7f);
}

static void rejects_duplicate_keys(void **state)
{
    expect_invalid("{\"schemaVersion\":2,\"schemaVersion\":1,\"manifests\":[]}", NULL, "duplicate");
}

static void rejects_nul_inside_strings(void **state)
{
    static const char json[] =
        "{\"schemaVersion\":2,\"mediaType\":\"" AM_MT_OCI_INDEX_S "\\u0000\",\"manifests\":[]}";
    expect_invalid(json, NULL, "invalid JSON");
    /* A raw NUL byte inside the document, with the length covering it. */
    static const char raw[] = "{\"schemaVersion\":2,\"manifests\":[]}\0{}";
    struct am_manifest m;
    assert_int_equal(am_manifest_parse(raw, sizeof raw - 1, NULL, &m, NULL, 0),
                     AM_EMANIFEST_INVALID);
}

static void rejects_wrong_types_with_the_json_path(void **state)
{
#define IDX(entry)                                                                                 \
    "{\"schemaVersion\":2,\"manifests\":[{\"digest\":\"" DA "\",\"size\":1}," entry "]}"
    expect_invalid("{\"schemaVersion\":\"2\"}", NULL, "schemaVersion: not an integer");
    expect_invalid("{\"schemaVersion\":2.0}", NULL, "schemaVersion: not an integer");
    expect_invalid("{\"schemaVersion\":2,\"manifests\":{}}", NULL, "manifests: not an array");
    expect_invalid(IDX("7"), NULL, "manifests[1]: not an object");
    expect_invalid(IDX("{\"digest\":7,\"size\":1}"), NULL, "manifests[1].digest: not a string");
    expect_invalid(IDX("{\"size\":1}"), NULL, "manifests[1].digest: missing");
    expect_invalid(IDX("{\"digest\":\"sha256:abc\",\"size\":1}"), NULL,
                   "manifests[1].digest: invalid digest");
    expect_invalid(IDX("{\"digest\":\"" DA "\"}"), NULL, "manifests[1].size: missing");
    expect_invalid(IDX("{\"digest\":\"" DA "\",\"size\":\"1\"}"), NULL,
                   "manifests[1].size: not an integer");
    expect_invalid(IDX("{\"digest\":\"" DA "\",\"size\":1.5}"), NULL,
                   "manifests[1].size: not an integer");
    expect_invalid(IDX("{\"digest\":\"" DA "\",\"size\":1e3}"), NULL,
                   "manifests[1].size: not an integer");
    expect_invalid(IDX("{\"digest\":\"" DA "\",\"size\":-1}"), NULL, "manifests[1].size: negative");
    expect_invalid(IDX("{\"digest\":\"" DA "\",\"size\":1,\"mediaType\":[]}"), NULL,
                   "manifests[1].mediaType: not a string");
    expect_invalid(IDX("{\"digest\":\"" DA "\",\"size\":1,\"platform\":\"linux/amd64\"}"), NULL,
                   "manifests[1].platform: not an object");
    expect_invalid(IDX("{\"digest\":\"" DA "\",\"size\":1,\"platform\":{\"os\":5}}"), NULL,
                   "manifests[1].platform.os: not a string");
    expect_invalid(IDX("{\"digest\":\"" DA "\",\"size\":1,\"platform\":{\"os.features\":\"x\"}}"),
                   NULL, "manifests[1].platform.os.features: not an array");
    expect_invalid(IDX("{\"digest\":\"" DA "\",\"size\":1,\"platform\":{\"os.features\":[1]}}"),
                   NULL, "manifests[1].platform.os.features[0]: not a string");
    expect_invalid(IDX("{\"digest\":\"" DA "\",\"size\":1,\"annotations\":[]}"), NULL,
                   "manifests[1].annotations: not an object");
    expect_invalid(IDX("{\"digest\":\"" DA "\",\"size\":1,\"annotations\":{\"a\":1}}"), NULL,
                   "manifests[1].annotations: value is not a string");
#undef IDX
}

static void requires_config_and_layer_media_types_in_manifests(void **state)
{
#define MAN(config, layers)                                                                        \
    "{\"schemaVersion\":2,\"mediaType\":\"" AM_MT_OCI_MANIFEST_S "\",\"config\":" config           \
    ",\"layers\":" layers "}"
    expect_invalid("{\"schemaVersion\":2,\"mediaType\":\"" AM_MT_OCI_MANIFEST_S "\",\"layers\":[]}",
                   NULL, "config: missing");
    expect_invalid(MAN("[]", "[]"), NULL, "config: not an object");
    expect_invalid(MAN("{\"digest\":\"" DA "\",\"size\":1}", "[]"), NULL,
                   "config.mediaType: missing");
    expect_invalid(MAN("{\"mediaType\":\"a/b\",\"digest\":\"" DA "\",\"size\":1}",
                       "[{\"digest\":\"" DA "\",\"size\":1}]"),
                   NULL, "layers[0].mediaType: missing");
    expect_invalid(MAN("{\"mediaType\":\"a/b\",\"digest\":\"" DA "\",\"size\":1}", "{}"), NULL,
                   "layers: not an array");
    expect_invalid("{\"schemaVersion\":2,\"mediaType\":\"" AM_MT_OCI_MANIFEST_S
                   "\",\"config\":{\"mediaType\":\"a/b\",\"digest\":\"" DA "\",\"size\":1}}",
                   NULL, "layers: missing");
#undef MAN
}

static void handles_huge_numbers(void **state)
{
    /* INT64_MAX is a valid (if absurd) size; one more does not fit jansson's integer. */
    struct parsed p = parse_ct("{\"schemaVersion\":2,\"manifests\":[{\"digest\":\"" DA
                               "\",\"size\":9223372036854775807}]}",
                               NULL);
    assert_int_equal(p.rc, 0);
    assert_int_equal(p.m.entries[0].size, INT64_MAX);
    am_manifest_cleanup(&p.m);
    expect_invalid("{\"schemaVersion\":2,\"manifests\":[{\"digest\":\"" DA
                   "\",\"size\":9223372036854775808}]}",
                   NULL, "invalid JSON");
    expect_invalid("{\"schemaVersion\":2,\"manifests\":[{\"digest\":\"" DA
                   "\",\"size\":99999999999999999999999999}]}",
                   NULL, "invalid JSON");
    expect_invalid("{\"schemaVersion\":1e400}", NULL, "invalid JSON");
    expect_invalid("{\"schemaVersion\":4294967298}", NULL, "schemaVersion: unsupported");
}

static void bounds_platform_and_media_type_strings(void **state)
{
    char json[1024], field[300];
    memset(field, 'a', 64);
    field[64] = '\0';
    snprintf(json, sizeof json,
             "{\"schemaVersion\":2,\"manifests\":[{\"digest\":\"" DA
             "\",\"size\":1,\"platform\":{\"os\":\"linux\",\"variant\":\"%s\"}}]}",
             field);
    expect_invalid(json, NULL, "manifests[0].platform.variant: longer than 63 bytes");
    field[63] = '\0';
    snprintf(json, sizeof json,
             "{\"schemaVersion\":2,\"manifests\":[{\"digest\":\"" DA
             "\",\"size\":1,\"platform\":{\"os\":\"linux\",\"variant\":\"%s\"}}]}",
             field);
    struct parsed p = parse_ct(json, NULL);
    assert_int_equal(p.rc, 0);
    assert_int_equal(strlen(p.m.entries[0].platform.variant), 63);
    am_manifest_cleanup(&p.m);

    memset(field, 'b', 256);
    field[256] = '\0';
    snprintf(json, sizeof json,
             "{\"schemaVersion\":2,\"manifests\":[{\"mediaType\":\"%s\",\"digest\":\"" DA
             "\",\"size\":1}]}",
             field);
    expect_invalid(json, NULL, "manifests[0].mediaType: longer than 255 bytes");
}

/* An index of n minimal entries. */
static char *index_of(size_t n)
{
    struct am_buf b;
    am_buf_init(&b, 1 << 24);
    assert_int_equal(am_buf_append_str(&b, "{\"schemaVersion\":2,\"manifests\":["), 0);
    for (size_t i = 0; i < n; i++)
        assert_int_equal(
            am_buf_appendf(&b, "%s{\"digest\":\"" DA "\",\"size\":%zu}", i ? "," : "", i), 0);
    assert_int_equal(am_buf_append_str(&b, "]}"), 0);
    return am_buf_steal(&b, NULL);
}

static void limits_the_number_of_entries(void **state)
{
    char *ok = index_of(10000), *big = index_of(10001);
    struct parsed p = parse_ct(ok, NULL);
    assert_int_equal(p.rc, 0);
    assert_int_equal(p.m.n_entries, 10000);
    assert_int_equal(p.m.entries[9999].size, 9999);
    am_manifest_cleanup(&p.m);
    expect_invalid(big, NULL, "manifests: more than 10000 entries");
    free(ok);
    free(big);
}

static void reports_the_failing_entry_index(void **state)
{
    expect_invalid("{\"schemaVersion\":2,\"manifests\":[{\"digest\":\"" DA "\",\"size\":1},"
                   "{\"digest\":\"" DB "\",\"size\":2},{\"digest\":\"" DC "x\",\"size\":3}]}",
                   NULL, "manifests[2].digest: invalid digest");
}

static void accepts_a_null_message_buffer(void **state)
{
    struct am_manifest m;
    assert_int_equal(am_manifest_parse("{", 1, NULL, &m, NULL, 0), AM_EMANIFEST_INVALID);
    assert_int_equal(am_manifest_parse("[]", 2, NULL, &m, NULL, 0), AM_EMANIFEST_INVALID);
    char tiny[1] = {'x'};
    assert_int_equal(am_manifest_parse("[]", 2, NULL, &m, tiny, 0), AM_EMANIFEST_INVALID);
    assert_int_equal(tiny[0], 'x');
}

static void cleanup_accepts_zeroed_and_null_manifests(void **state)
{
    struct am_manifest m;
    memset(&m, 0, sizeof m);
    am_manifest_cleanup(&m);
    am_manifest_cleanup(NULL);
    struct parsed p = parse_ct(docker_list, NULL);
    assert_int_equal(p.rc, 0);
    am_manifest_cleanup(&p.m);
    am_manifest_cleanup(&p.m);
    assert_int_equal(p.m.n_entries, 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(parses_oci_index_and_flags_the_attestation),
        cmocka_unit_test(parses_docker_list_with_variants_and_os_version),
        cmocka_unit_test(parses_docker_schema2_manifest),
        cmocka_unit_test(parses_schema1_as_docker_v1_without_entries),
        cmocka_unit_test(names_schema1_signed_or_not_from_its_signatures),
        cmocka_unit_test(parses_an_oci_manifest_with_empty_layers),
        cmocka_unit_test(accepts_index_entries_without_media_type),
        cmocka_unit_test(takes_the_kind_from_content_type_when_json_has_none),
        cmocka_unit_test(infers_oci_kinds_from_shape_without_any_type),
        cmocka_unit_test(prefers_json_media_type_over_unknown_content_type),
        cmocka_unit_test(rejects_media_type_contradicting_content_type),
        cmocka_unit_test(rejects_schema_version_that_does_not_match_the_type),
        cmocka_unit_test(rejects_unknown_or_malformed_media_types),
        cmocka_unit_test(rejects_malformed_json),
        cmocka_unit_test(keeps_json_error_messages_printable),
        cmocka_unit_test(rejects_duplicate_keys),
        cmocka_unit_test(rejects_nul_inside_strings),
        cmocka_unit_test(rejects_wrong_types_with_the_json_path),
        cmocka_unit_test(requires_config_and_layer_media_types_in_manifests),
        cmocka_unit_test(handles_huge_numbers),
        cmocka_unit_test(bounds_platform_and_media_type_strings),
        cmocka_unit_test(limits_the_number_of_entries),
        cmocka_unit_test(reports_the_failing_entry_index),
        cmocka_unit_test(accepts_a_null_message_buffer),
        cmocka_unit_test(cleanup_accepts_zeroed_and_null_manifests),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

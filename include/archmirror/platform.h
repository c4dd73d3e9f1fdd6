/*
 * platform — container platforms ("linux/arm64", "linux/arm/v7", "windows(10.0.17763)/amd64")
 * parsed, normalised, formatted and matched the way containerd does, and the platforms an
 * image ships.
 *
 * The rules are containerd's `platforms` package: github.com/containerd/platforms
 * (v1.0.0-rc.2+, vendored by containerd 2.2) and, where it differs, containerd v1.6.20's
 * platforms/ directory; src/platform.c cites the Go file and function for each rule.
 * Everything here is a pure function: no I/O, no allocation, no global state. This module
 * must never consult the host's own platform: the mirror's architecture says nothing
 * about the node that pulls (containerd's Parse fills missing parts from runtime.GOOS/
 * GOARCH; archmirror refuses an OS-only specifier and takes "linux" for an arch-only one).
 *
 * Normalised form (what every function here returns and compares): os lowercased, ""
 * → "linux", "macos" → "darwin"; aarch64 → arm64 and arm64 v8/8/v8.0 → "", 9/9.0/v9.0 →
 * v9; x86_64/x86-64 → amd64 and amd64 v1 → ""; i386 → 386 (i486/i586/i686 are NOT
 * normalised, as in containerd); armhf → arm/v7, armel → arm/v6, arm "" or 7 → v7,
 * arm 5/6/8 → v5/v6/v8. os.version is kept verbatim.
 */
#ifndef ARCHMIRROR_PLATFORM_H
#define ARCHMIRROR_PLATFORM_H

#include <stdbool.h>
#include <stddef.h>

#include "archmirror/manifest.h"

/* Longest platform specifier am_platform_parse accepts (bytes). */
#define AM_PLATFORM_SPEC_MAX 255
/* Most os.features one platform may carry (containerd has no limit; real images carry
 * at most "win32k"). */
#define AM_PLATFORM_FEATURES_MAX 8
/* Buffer sizes (including the NUL) that always suffice for am_platform_format and
 * am_platform_format_all: os/arch/variant, plus "(" version "+" features… ")" with every
 * byte of a value possibly %XX-encoded. */
#define AM_PLATFORM_FORMAT_SIZE (3 * (AM_PLATFORM_FIELD_MAX + 1))
#define AM_PLATFORM_FORMAT_ALL_SIZE                                                                \
    (AM_PLATFORM_FORMAT_SIZE + 2 + 3 * AM_PLATFORM_FIELD_MAX +                                     \
     AM_PLATFORM_FEATURES_MAX * (1 + 3 * AM_PLATFORM_FIELD_MAX))

/* OCI image-index.md platform "os.features". struct am_platform (manifest.h) has no
 * room for them, so they travel beside it. Normalised: sorted (strcmp), no duplicates,
 * no empty strings. */
struct am_platform_features {
    size_t n;
    char v[AM_PLATFORM_FEATURES_MAX][AM_PLATFORM_FIELD_MAX + 1];
};

/* Parses the containerd specifier syntax (containerd/platforms platforms.go Parse):
 *   <os>[(<os.version>[+<feature>]*)] "/" <arch> [ "/" <variant> ]   or   <arch>
 * e.g. "linux/arm64", "linux/arm64/v8", "Linux/aarch64", "arm64", "linux/arm" (→ arm/v7),
 * "linux/armhf", "linux/amd64/v3", "windows(10.0.17763)/amd64", "linux(+gpu)/amd64".
 * os.version and features are %XX-decoded. A single component must be a known
 * architecture; the os is then "linux". A single known OS ("linux") is refused: a
 * mirror has no default architecture. s[0..len) is borrowed and need not be
 * NUL-terminated. On success *out (and *features when not NULL) hold the normalised
 * platform — note containerd's Parse leaves arm v7 as "" and arm64/v8 as "v8", which
 * its matcher normalises later; here they are normalised at once.
 * Returns 0, or AM_EINVAL with a one-line reason in msg (msg may be NULL); out and
 * features are written only on success. */
int am_platform_parse(const char *s, size_t len, struct am_platform *out,
                      struct am_platform_features *features, char *msg, size_t msglen);

/* Normalises p in place (containerd platforms.go Normalize: database.go normalizeOS and
 * normalizeArch). Idempotent. */
void am_platform_normalize(struct am_platform *p);
/* Sorts and deduplicates f in place and drops empty strings (platforms.go Normalize). */
void am_platform_features_normalize(struct am_platform_features *f);

/* containerd's Format: "os/arch/variant" with empty parts left out, "unknown" when os is
 * empty. It formats p as given; normalise first for the canonical form ("linux/arm64",
 * "linux/arm/v7", "linux/amd64/v3"). Returns 0, or AM_EINVAL when outlen is too small
 * (out then holds a truncated, NUL-terminated prefix). AM_PLATFORM_FORMAT_SIZE bytes
 * always suffice. */
int am_platform_format(const struct am_platform *p, char *out, size_t outlen);
/* containerd's FormatAll: like am_platform_format, plus "(" os.version "+" features ")"
 * after the os when either is present, with %, +, (, ) and / %XX-encoded; features are
 * written sorted and deduplicated. features may be NULL. Returns as am_platform_format;
 * AM_PLATFORM_FORMAT_ALL_SIZE bytes always suffice. */
int am_platform_format_all(const struct am_platform *p, const struct am_platform_features *f,
                           char *out, size_t outlen);

/* Whether a and b name the same platform after normalisation (os, architecture,
 * variant, and os.version compared byte for byte). */
bool am_platform_equal(const struct am_platform *a, const struct am_platform *b);

/* How a node of platform `node` ranks an image entry of platform `candidate` under
 * containerd's platforms.Only(node) (compare.go platformVector + Ordered): 0 for an exact
 * match after normalisation, 1, 2, … for the compatible fallbacks in the order containerd
 * prefers them, -1 when containerd would not pull it. Fallbacks:
 *   amd64/vN → amd64/v(N-1) … v1, then 386;      amd64 → 386
 *   arm/vN   → arm/v(N-1) … v5 (N > 5)
 *   arm64    → arm/v8, v7, v6, v5
 *   arm64/v8.x → arm64/v8.(x-1) … v8, then arm/v8 … v5
 *   arm64/v9.x → arm64/v9.(x-1) … v9, v8.(x+5, max 9) … v8, then arm/v8 … v5
 * The os must be equal; for windows nodes os.version must be compatible
 * (platform_windows_compat.go). Never the other way: arm/v7 does not accept arm64, 386
 * does not accept amd64. Both arguments are borrowed and need not be normalised. */
int am_platform_match_rank(const struct am_platform *node, const struct am_platform *candidate);
/* am_platform_match_rank(node, candidate) >= 0. */
bool am_platform_matches(const struct am_platform *node, const struct am_platform *candidate);
/* The os.features half of containerd's matcher (platforms.go matcher.Match): true when
 * the candidate's features are a subset of the node's; for a windows node "win32k" on
 * the candidate is ignored (windowsStripFeaturesMatcher). Either list may be NULL
 * (= empty). Use together with am_platform_match_rank when the candidate's features are
 * known. */
bool am_platform_features_match(const struct am_platform *node,
                                const struct am_platform_features *node_features,
                                const struct am_platform_features *candidate_features);

/* One platform an image ships. */
struct am_platform_entry {
    struct am_platform platform; /* normalised */
    size_t index;                /* first entry of index->entries with this platform */
};

/* The platforms of an OCI index or Docker manifest list, in index order: entries with
 * a platform, minus attestation manifests (descriptor.is_attestation, buildx's
 * vnd.docker.reference.type=attestation-manifest) and unknown/unknown, deduplicated by
 * am_platform_equal. Entries without a platform (e.g. a nested index) are left out: this
 * looks at one index only. Descending into child indexes, as containerd does
 * (images/image.go Manifest), is imageinfo's job (it fetches them).
 * index is borrowed. Writes up to cap entries to out and their number to *n_out.
 * Returns 0, AM_EINVAL when index is not an index, or AM_ETOO_LARGE when more than cap
 * platforms exist (the first cap are written; cap = index->n_entries always suffices). */
int am_platform_list_from_index(const struct am_manifest *index, struct am_platform_entry *out,
                                size_t cap, size_t *n_out);

/* The entry of an index that containerd on a node of platform `node` would pull
 * (images/image.go Manifest, images/handlers.go LimitManifests: matching entries sorted
 * stably by Only(node).Less, first taken): the lowest am_platform_match_rank, the
 * earliest entry among equals. Attestations, unknown/unknown and entries without a
 * platform are never chosen. Both arguments are borrowed. Returns 0 with the position
 * in index->entries in *entry, AM_ENOT_FOUND when no entry matches, AM_EINVAL when index
 * is not an index. */
int am_platform_best_match(const struct am_manifest *index, const struct am_platform *node,
                           size_t *entry);

/* The platform of a single-arch image, from its config blob (OCI image-spec config.md:
 * "architecture" and "os" required, "variant", "os.version", "os.features" optional).
 * bytes[0..len) is borrowed. Types are checked; strings must be printable ASCII of at
 * most AM_PLATFORM_FIELD_MAX bytes; at most AM_PLATFORM_FEATURES_MAX features. On
 * success *out (and *features when not NULL) hold the normalised platform.
 * Returns 0, AM_EMANIFEST_INVALID (the upstream's content is at fault) with a one-line
 * reason in msg (msg may be NULL), or AM_ENOMEM. out and features are written only on
 * success. */
int am_platform_from_config_json(const char *bytes, size_t len, struct am_platform *out,
                                 struct am_platform_features *features, char *msg, size_t msglen);

#endif

/*
 * diagnostics — the judgement "can a node of this platform run this image?" and the
 * text that tells a person why not.
 *
 * The node's platform comes from the X-Node-Platform header that each node's hosts.toml
 * adds (containerd sends an array as repeated header lines: any of them may match). The
 * image's platforms come from its index, or a single-arch image's config. Matching uses
 * containerd's rules (platform.h), so nothing containerd would pull is called a mismatch.
 * The refusal text goes into an HTTP reason phrase — the only server text containerd
 * shows for a tag HEAD (see shared/reference/containerd-mirror.md §3) — so it is ASCII,
 * bounded and free of CR/LF whatever the image is called. This module does no I/O.
 */
#ifndef ARCHMIRROR_DIAGNOSTICS_H
#define ARCHMIRROR_DIAGNOSTICS_H

#include <stdbool.h>
#include <stddef.h>

#include "archmirror/http.h"
#include "archmirror/manifest.h"

#define AM_DIAG_NODE_MAX   4   /* X-Node-Platform values considered */
#define AM_DIAG_REASON_MAX 240 /* bytes of the reason phrase, NUL excluded */

/* The node platforms named by X-Node-Platform headers (each value may also be a comma
 * list). Unparseable values are skipped. Returns how many were stored in out. */
size_t am_diagnostics_node_platforms(const struct am_http_header *hdrs, size_t n_hdrs,
                                     struct am_platform *out, size_t max);

/* Whether any node platform can run any of the image's platforms (containerd's Only()
 * matcher). An image with no known platform is runnable (nothing to judge). */
bool am_diagnostics_runnable(const struct am_platform *node, size_t n_node,
                             const struct am_platform *has, size_t n_has);

/* The reason phrase: "no linux/arm64 variant of IMAGE (has linux/amd64); build
 * multi-arch or pin kubernetes.io/arch=amd64". IMAGE is shortened with "..." to keep the
 * phrase within AM_DIAG_REASON_MAX; every byte outside printable ASCII becomes '?'.
 * out must hold AM_DIAG_REASON_MAX + 1 bytes. */
void am_diagnostics_reason(const char *image, const struct am_platform *node,
                           const struct am_platform *has, size_t n_has, char *out);

/* The OCI error body for the refusal: {"errors":[{"code":"DENIED","message":<reason>,
 * "detail":{"image":…,"requested":[…],"available":[…]}}]}. Returns an owned string
 * (free()) or NULL on out-of-memory. */
char *am_diagnostics_body(const char *image, const struct am_platform *node, size_t n_node,
                          const struct am_platform *has, size_t n_has, const char *reason);

#endif

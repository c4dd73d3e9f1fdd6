/*
 * pulltrack — decides, from the manifest requests one node makes, when its pull of an
 * image completed and which platform pulled it, and hands that to the pull log.
 *
 * containerd resolves a tag (HEAD), fetches the index by digest, then only the child
 * manifest for its platform (shared/reference/containerd-mirror.md §1). So a pull of a
 * multi-arch image completes at the child manifest; its platform is the node's
 * X-Node-Platform header when hosts.toml sends one, else the platform of that child in
 * the index (inferred). A single-arch image completes when its manifest body is fetched;
 * its platform is the header's, else its config's. An index of indexes is one pull: the
 * child index fetched by digest continues the top index's pull (tag kept), and the leaf
 * completes it. A node completing the same pull again within pull_log.dedupe_window is
 * not recorded twice. This module keeps a bounded, expiring
 * table of what each node resolved last per repository; it does no I/O of its own.
 */
#ifndef ARCHMIRROR_PULLTRACK_H
#define ARCHMIRROR_PULLTRACK_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "archmirror/config.h"
#include "archmirror/digest.h"
#include "archmirror/imageinfo.h"
#include "archmirror/manifest.h"
#include "archmirror/pulllog.h"

#define AM_PULLTRACK_NODES  4096      /* (node, repository) pairs remembered */
#define AM_PULLTRACK_TTL_MS (600000u) /* a resolution older than this is forgotten */
#define AM_PULLTRACK_NESTED 4         /* child indexes of one pull followed (nesting) */
#define AM_PULLTRACK_RECENT 4096      /* completions remembered for pull_log.dedupe_window */

struct am_pulltrack;

/* cfg, ii and pl are borrowed (pl may be NULL: completed pulls are then only counted in
 * the metrics). Returns 0 with *out owned (am_pulltrack_free) or AM_ENOMEM. */
int am_pulltrack_new(const struct am_config *cfg, struct am_imageinfo *ii, struct am_pulllog *pl,
                     struct am_pulltrack **out);
void am_pulltrack_free(struct am_pulltrack *pt);

struct am_pulltrack_event {
    const char *peer;               /* client address "ip:port" */
    const struct am_platform *node; /* X-Node-Platform values, may be empty */
    size_t n_node;
    size_t up_idx;
    const char *repo;               /* as the upstream names it */
    const char *tag;                /* the request's tag, or NULL (by digest) */
    const char *media_type;         /* of the manifest served */
    const struct am_digest *digest; /* of the manifest served */
    const char *bytes;              /* its bytes, or NULL for a HEAD */
    uint64_t size;
    bool cache_hit;
};

/* A manifest was served with status 200. Records a pull when this request completed one;
 * returns true then. All pointers borrowed for the call. */
bool am_pulltrack_observe(struct am_pulltrack *pt, const struct am_pulltrack_event *ev);

/* Records an attempt that archmirror judged unrunnable for the node (diagnostics): a
 * pull-log record with the node's platform, the image's platforms and no child. */
void am_pulltrack_record_mismatch(struct am_pulltrack *pt, const struct am_pulltrack_event *ev,
                                  const struct am_imageinfo_image *image);

#endif

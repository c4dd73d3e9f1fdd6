/*
 * pagecache — asks the kernel whether a file range is already in memory.
 *
 * Zero-copy responses (sendfile(2)) run on the event loop, and a sendfile that has to
 * read from the disk would block it. So the caller first asks which prefix of the range
 * is resident (mincore(2) on a mapping that is never touched, so no page is faulted in)
 * and sends only that; a range that is not resident goes through a thread-pool read,
 * which also brings it into memory. This module never reads file data and never blocks
 * on I/O; it only maps, queries and unmaps.
 */
#ifndef ARCHMIRROR_PAGECACHE_H
#define ARCHMIRROR_PAGECACHE_H

#include <stddef.h>
#include <stdint.h>

/* How many bytes from off, at most len, are resident in the page cache without a gap,
 * counted in whole pages and capped at len (0: the first page is not resident, or the
 * query failed: treat as "not resident"). fd is borrowed and must be a regular file at
 * least off+len bytes long. */
size_t am_pagecache_resident(int fd, uint64_t off, size_t len);

#endif

/*
 * schema — the format version every LMDB store of archmirror keeps under its "schema"
 * key: 4 bytes, little-endian. One check for all of them, so a store written by a newer
 * archmirror is refused with the same clear message wherever it is opened. Pure; does
 * no I/O (the stores read and write the key themselves).
 */
#ifndef ARCHMIRROR_SCHEMA_H
#define ARCHMIRROR_SCHEMA_H

#include <stddef.h>
#include <stdint.h>

/* Checks a stored schema value data[0..len) against the version this build reads.
 * Returns 0, or AM_ESTORE with "<path>: …" in msg (msg may be NULL). */
int am_schema_check(const void *data, size_t len, uint32_t want, const char *path, char *msg,
                    size_t msglen);

#endif

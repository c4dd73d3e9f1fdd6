/*
 * buf — an owned, growable byte buffer with a maximum size fixed at creation.
 *
 * Everything that accumulates untrusted bytes (request heads, upstream manifests, JSON
 * bodies) goes through am_buf so that a limit is always in force. The buffer is always
 * NUL-terminated past len so it can be handed to string APIs. It must never grow past
 * its max, and never abort the process on out-of-memory.
 */
#ifndef ARCHMIRROR_BUF_H
#define ARCHMIRROR_BUF_H

#include <stdarg.h>
#include <stddef.h>

struct am_buf {
    char *data; /* owned; NULL until first append; data[len] == '\0' when data != NULL */
    size_t len;
    size_t cap;
    size_t max; /* appends that would exceed max fail with AM_ETOO_LARGE */
};

/* Initialises caller storage; allocates nothing. */
void am_buf_init(struct am_buf *b, size_t max);
/* Frees data; accepts an initialised-but-empty or NULL buffer. */
void am_buf_cleanup(struct am_buf *b);
/* Keeps the allocation, sets len to 0. */
void am_buf_reset(struct am_buf *b);
/* Returns 0, AM_ENOMEM or AM_ETOO_LARGE (buffer unchanged on failure). */
int am_buf_append(struct am_buf *b, const void *p, size_t n);
int am_buf_append_str(struct am_buf *b, const char *s);
int am_buf_appendf(struct am_buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
int am_buf_vappendf(struct am_buf *b, const char *fmt, va_list ap);
/* Appends s as the inside of a JSON string (quotes not included). */
int am_buf_append_json_escaped(struct am_buf *b, const char *s, size_t n);
/* Returns owned data (free()); the buffer is left empty. Never NULL on success: an empty
 * buffer yields an allocated "" . Returns NULL on out-of-memory. */
char *am_buf_steal(struct am_buf *b, size_t *len_out);

#endif

/* buf — bounded growable buffer; see include/archmirror/buf.h. */
#include "archmirror/buf.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "archmirror/error.h"

void am_buf_init(struct am_buf *b, size_t max)
{
    b->data = NULL;
    b->len = 0;
    b->cap = 0;
    b->max = max;
}

void am_buf_cleanup(struct am_buf *b)
{
    if (!b) return;
    free(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
}

void am_buf_reset(struct am_buf *b)
{
    b->len = 0;
    if (b->data) b->data[0] = '\0';
}

/* Makes room for n more bytes plus the terminator. */
static int reserve(struct am_buf *b, size_t n)
{
    if (n > b->max || b->len > b->max - n) return AM_ETOO_LARGE;
    size_t need = b->len + n + 1;
    if (need <= b->cap) return 0;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < need) cap = cap > SIZE_MAX / 2 ? need : cap * 2;
    size_t limit = b->max == SIZE_MAX ? SIZE_MAX : b->max + 1;
    if (cap > limit) cap = limit;
    char *p = realloc(b->data, cap);
    if (!p) return AM_ENOMEM;
    b->data = p;
    b->cap = cap;
    return 0;
}

int am_buf_append(struct am_buf *b, const void *p, size_t n)
{
    int rc = reserve(b, n);
    if (rc) return rc;
    if (n) memcpy(b->data + b->len, p, n);
    b->len += n;
    b->data[b->len] = '\0';
    return 0;
}

int am_buf_append_str(struct am_buf *b, const char *s)
{
    return am_buf_append(b, s, strlen(s));
}

int am_buf_vappendf(struct am_buf *b, const char *fmt, va_list ap)
{
    va_list ap2;
    va_copy(ap2, ap);
    int n = vsnprintf(NULL, 0, fmt, ap2);
    va_end(ap2);
    if (n < 0) return AM_EINVAL;
    int rc = reserve(b, (size_t)n);
    if (rc) return rc;
    vsnprintf(b->data + b->len, (size_t)n + 1, fmt, ap);
    b->len += (size_t)n;
    return 0;
}

int am_buf_appendf(struct am_buf *b, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int rc = am_buf_vappendf(b, fmt, ap);
    va_end(ap);
    return rc;
}

int am_buf_append_json_escaped(struct am_buf *b, const char *s, size_t n)
{
    size_t mark = b->len;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        int rc;
        if (c == '"' || c == '\\') {
            char esc[2] = {'\\', (char)c};
            rc = am_buf_append(b, esc, 2);
        } else if (c >= 0x80) {
            /* Messages are ASCII by design; a stray byte must not make the JSON invalid. */
            rc = am_buf_append(b, "?", 1);
        } else if (c < 0x20) {
            char esc[8];
            snprintf(esc, sizeof esc, "\\u%04x", c);
            rc = am_buf_append(b, esc, 6);
        } else {
            rc = am_buf_append(b, &s[i], 1);
        }
        if (rc) {
            b->len = mark;
            if (b->data) b->data[mark] = '\0';
            return rc;
        }
    }
    return 0;
}

char *am_buf_steal(struct am_buf *b, size_t *len_out)
{
    char *p = b->data;
    size_t len = b->len;
    if (!p) {
        p = malloc(1);
        if (!p) return NULL;
        p[0] = '\0';
    }
    b->data = NULL;
    b->len = b->cap = 0;
    if (len_out) *len_out = len;
    return p;
}

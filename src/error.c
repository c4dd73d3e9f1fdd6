/* error — the failure table; see include/archmirror/error.h. */
#include "archmirror/error.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <uv.h>

#include "archmirror/buf.h"

struct entry {
    const char *name;
    const char *message;
    int status;
    const char *code;
};

static const struct entry table[] = {
#define AM_ERR_ROW_(name, msg, status, code) {#name, msg, status, code},
    AM_ERRORS(AM_ERR_ROW_)
#undef AM_ERR_ROW_
};

static const struct entry *lookup(int err)
{
    int idx = err - (AM_ERR_FIRST_ + 1);
    if (err >= 0 || idx < 0 || idx >= (int)(sizeof table / sizeof table[0]))
        return &table[AM_EIO - (AM_ERR_FIRST_ + 1)];
    return &table[idx];
}

const char *am_error_name(int err)
{
    return err == 0 ? "OK" : lookup(err)->name;
}
const char *am_error_message(int err)
{
    return err == 0 ? "ok" : lookup(err)->message;
}
int am_error_http_status(int err)
{
    return err == 0 ? 200 : lookup(err)->status;
}
const char *am_error_oci_code(int err)
{
    return lookup(err)->code;
}

int am_error_format_json(int err, const char *message, struct am_buf *out)
{
    const struct entry *e = lookup(err);
    const char *msg = message ? message : e->message;
    int rc;
    size_t mark = out->len;

    if ((rc = am_buf_append_str(out, "{\"errors\":[{\"code\":\"")) ||
        (rc = am_buf_append_str(out, e->code)) ||
        (rc = am_buf_append_str(out, "\",\"message\":\"")) ||
        (rc = am_buf_append_json_escaped(out, msg, strlen(msg))) ||
        (rc = am_buf_append_str(out, "\"}]}\n"))) {
        out->len = mark;
        if (out->data) out->data[mark] = '\0';
        return rc;
    }
    return 0;
}

int am_error_from_uv(int uverr)
{
    switch (uverr) {
    case 0: return 0;
    case UV_ENOMEM: return AM_ENOMEM;
    case UV_ETIMEDOUT: return AM_EUPSTREAM_TIMEOUT;
    case UV_ECONNREFUSED:
    case UV_EHOSTUNREACH:
    case UV_ENETUNREACH:
    case UV_EAI_NONAME:
    case UV_EAI_AGAIN:
    case UV_EAI_FAIL:
    case UV_EADDRNOTAVAIL: return AM_EUPSTREAM_CONNECT;
    case UV_ECONNRESET:
    case UV_EPIPE:
    case UV_EOF: return AM_EUPSTREAM;
    case UV_ECANCELED: return AM_ECANCELED;
    case UV_ENOSPC: return AM_ESTORE_FULL;
    case UV_EROFS: return AM_ESTORE_READONLY;
    case UV_EINVAL: return AM_EINVAL;
    default: return AM_EIO;
    }
}

int am_error_from_upstream_status(int status, bool blob)
{
    switch (status) {
    case 401: return AM_EUNAUTHORIZED;
    case 403: return AM_EDENIED;
    case 404: return blob ? AM_EBLOB_UNKNOWN : AM_EMANIFEST_UNKNOWN;
    case 416: return AM_ERANGE;
    case 429: return AM_ETOOMANYREQUESTS;
    case 504: return AM_EUPSTREAM_TIMEOUT;
    default: return AM_EUPSTREAM;
    }
}

void am_error_setmsg(char *msg, size_t msglen, const char *fmt, ...)
{
    if (!msg || msglen == 0) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, msglen, fmt, ap);
    va_end(ap);
}

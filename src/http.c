/* http — shared HTTP/1.1 vocabulary; see include/archmirror/http.h. */
#include "archmirror/http.h"

#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "archmirror/error.h"

bool am_http_token_eq(const char *s, size_t len, const char *lit)
{
    return strlen(lit) == len && strncasecmp(s, lit, len) == 0;
}

const struct am_http_header *am_http_header_find(const struct am_http_header *h, size_t n,
                                                 const char *name)
{
    for (size_t i = 0; i < n; i++)
        if (am_http_token_eq(h[i].name, h[i].name_len, name)) return &h[i];
    return NULL;
}

const char *am_http_reason(int status)
{
    switch (status) {
    case 200: return "OK";
    case 201: return "Created";
    case 202: return "Accepted";
    case 204: return "No Content";
    case 206: return "Partial Content";
    case 301: return "Moved Permanently";
    case 302: return "Found";
    case 303: return "See Other";
    case 304: return "Not Modified";
    case 307: return "Temporary Redirect";
    case 308: return "Permanent Redirect";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 406: return "Not Acceptable";
    case 408: return "Request Timeout";
    case 409: return "Conflict";
    case 411: return "Length Required";
    case 413: return "Content Too Large";
    case 414: return "URI Too Long";
    case 416: return "Range Not Satisfiable";
    case 422: return "Unprocessable Content";
    case 429: return "Too Many Requests";
    case 431: return "Request Header Fields Too Large";
    case 499: return "Client Closed Request";
    case 500: return "Internal Server Error";
    case 501: return "Not Implemented";
    case 502: return "Bad Gateway";
    case 503: return "Service Unavailable";
    case 504: return "Gateway Timeout";
    case 505: return "HTTP Version Not Supported";
    case 507: return "Insufficient Storage";
    default: return "Unknown";
    }
}

void am_http_date(char *out, size_t outlen)
{
    static const char *const days[] = {"Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"};
    static const char *const months[] = {"Jan", "Feb", "Mar", "Apr", "May", "Jun",
                                         "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"};
    time_t t = time(NULL);
    struct tm tm;
    gmtime_r(&t, &tm);
    snprintf(out, outlen, "%s, %02d %s %04d %02d:%02d:%02d GMT", days[tm.tm_wday], tm.tm_mday,
             months[tm.tm_mon], tm.tm_year + 1900, tm.tm_hour, tm.tm_min, tm.tm_sec);
}

int am_http_parse_u64(const char *s, size_t len, uint64_t *out)
{
    uint64_t v = 0;
    if (len == 0 || len > 19) return AM_EINVAL;
    for (size_t i = 0; i < len; i++) {
        if (s[i] < '0' || s[i] > '9') return AM_EINVAL;
        v = v * 10 + (uint64_t)(s[i] - '0');
    }
    *out = v;
    return 0;
}

/* Reads digits at s[*i..len) into *out; returns false when there are none or they
 * overflow. */
static bool read_u64(const char *s, size_t len, size_t *i, uint64_t *out)
{
    size_t j = *i;
    uint64_t v = 0;
    while (j < len && s[j] >= '0' && s[j] <= '9') {
        unsigned d = (unsigned)(s[j] - '0');
        if (v > (UINT64_MAX - d) / 10) return false;
        v = v * 10 + d;
        j++;
    }
    if (j == *i) return false;
    *i = j;
    *out = v;
    return true;
}

int am_http_parse_range(const char *s, size_t len, uint64_t size, uint64_t *start, uint64_t *end)
{
    size_t i = 0;
    while (len && (s[len - 1] == ' ' || s[len - 1] == '\t')) len--;
    while (i < len && (s[i] == ' ' || s[i] == '\t')) i++;
    if (len - i < 6 || strncasecmp(s + i, "bytes=", 6) != 0) return AM_EINVAL;
    i += 6;
    uint64_t a = 0, b = 0;
    bool has_a = read_u64(s, len, &i, &a);
    if (i >= len || s[i] != '-') return AM_EINVAL;
    i++;
    bool has_b = read_u64(s, len, &i, &b);
    if (i != len) return AM_EINVAL; /* trailing bytes, or a second range after ',' */
    if (!has_a) {
        /* suffix: the last b bytes */
        if (!has_b) return AM_EINVAL;
        if (b == 0 || size == 0) return AM_ERANGE;
        *start = b >= size ? 0 : size - b;
        *end = size;
        return 0;
    }
    if (has_b && b < a) return AM_EINVAL;
    if (a >= size) return AM_ERANGE;
    *start = a;
    *end = has_b && b < size - 1 ? b + 1 : size;
    return 0;
}

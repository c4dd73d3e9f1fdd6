/* log — leveled stderr lines; see include/archmirror/log.h. */
#include "archmirror/log.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "archmirror/error.h"

enum am_log_level am_log_current_level = AM_LOG_INFO;

static const char *const names[] = {"error", "warn", "info", "debug"};

void am_log_set_level(enum am_log_level level)
{
    am_log_current_level = level;
}

int am_log_parse_level(const char *s, enum am_log_level *out)
{
    for (int i = 0; i < 4; i++) {
        if (strcmp(s, names[i]) == 0) {
            *out = (enum am_log_level)i;
            return 0;
        }
    }
    return AM_EINVAL;
}

void am_log_write(enum am_log_level level, const char *fmt, ...)
{
    char line[2048];
    struct timespec ts;
    struct tm tm;
    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    int n = snprintf(line, sizeof line, "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ %-5s ",
                     tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
                     ts.tv_nsec / 1000000, names[level]);
    va_list ap;
    va_start(ap, fmt);
    int m = vsnprintf(line + n, sizeof line - (size_t)n - 1, fmt, ap);
    va_end(ap);
    size_t len = (size_t)n + (m < 0 ? 0 : (size_t)m);
    if (len > sizeof line - 2) len = sizeof line - 2;
    /* One write per line so concurrent writers (thread pool) never interleave. */
    line[len++] = '\n';
    fwrite(line, 1, len, stderr);
}

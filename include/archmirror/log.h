/*
 * log — leveled diagnostic log lines on stderr.
 *
 * The macros test the level before any formatting happens, so a disabled DEBUG line
 * costs one comparison. Callers put their context first ("c12 r3 GET …"). Client
 * mistakes are INFO, not ERROR. Secrets (tokens, passwords, Authorization values) must
 * never be passed to this module.
 */
#ifndef ARCHMIRROR_LOG_H
#define ARCHMIRROR_LOG_H

enum am_log_level { AM_LOG_ERROR = 0, AM_LOG_WARN, AM_LOG_INFO, AM_LOG_DEBUG };

extern enum am_log_level am_log_current_level;

void am_log_set_level(enum am_log_level level);
/* Parses "error|warn|info|debug"; returns 0 or AM_EINVAL. */
int am_log_parse_level(const char *s, enum am_log_level *out);
void am_log_write(enum am_log_level level, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

#define AM_LOG_(lvl, ...)                                                                          \
    do {                                                                                           \
        if ((lvl) <= am_log_current_level) am_log_write((lvl), __VA_ARGS__);                       \
    } while (0)
#define AM_ERROR(...) AM_LOG_(AM_LOG_ERROR, __VA_ARGS__)
#define AM_WARN(...)  AM_LOG_(AM_LOG_WARN, __VA_ARGS__)
#define AM_INFO(...)  AM_LOG_(AM_LOG_INFO, __VA_ARGS__)
#define AM_DEBUG(...) AM_LOG_(AM_LOG_DEBUG, __VA_ARGS__)

#endif

/*
 * fuzz_config — a JSON config document merged over the defaults
 * (am_config_load_string), then am_config_validate and am_config_dump, plus the size and
 * duration parsers on the same bytes. Properties: the report never claims more recorded
 * problems than it holds and names each with a "$" path; failure and success both leave
 * a config that validates or reports without crashing and cleans up without leaks; a
 * dump (when no password is set) loads back over the defaults without problems.
 *
 * The document may name files (password_file, ca_file): they are only read, never
 * written, and a missing one is a reported problem, so the fuzzer touches nothing.
 */
#include <string.h>

#include "archmirror/config.h"
#include "archmirror/error.h"
#include "archmirror/log.h"
#include "fuzz.h"

static void check_report(const struct am_config_report *r)
{
    FUZZ_CHECK(r->n <= sizeof r->problems / sizeof r->problems[0]);
    FUZZ_CHECK(r->n <= r->total);
    for (size_t i = 0; i < r->n; i++) {
        const struct am_config_problem *p = &r->problems[i];
        FUZZ_CHECK(strnlen(p->path, sizeof p->path) < sizeof p->path);
        FUZZ_CHECK(strnlen(p->message, sizeof p->message) < sizeof p->message);
        FUZZ_CHECK(p->path[0] == '$');
    }
}

static bool has_password(const struct am_config *cfg)
{
    for (size_t i = 0; i < cfg->n_upstreams; i++)
        if (cfg->upstreams[i].password) return true;
    return false;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static bool inited;
    if (!inited) {
        am_log_set_level(AM_LOG_ERROR);
        inited = true;
    }
    char *json = malloc(size + 1);
    if (!json) return 0;
    memcpy(json, data, size);
    json[size] = '\0';

    uint64_t v;
    if (am_config_parse_size(json, &v) == 0) FUZZ_CHECK(size > 0);
    if (am_config_parse_duration_ms(json, &v) == 0) FUZZ_CHECK(size > 0);

    struct am_config cfg;
    struct am_config_report r;
    if (am_config_init_defaults(&cfg) != 0) {
        free(json);
        return 0;
    }
    int rc = am_config_load_string(&cfg, json, &r);
    check_report(&r);
    FUZZ_CHECK(rc == 0 || rc == AM_ECONFIG || rc == AM_ENOMEM);
    if (rc == AM_ECONFIG) FUZZ_CHECK(r.total > 0);
    FUZZ_CHECK(cfg.n_listen <= AM_CONFIG_MAX_LISTEN && cfg.n_upstreams <= AM_CONFIG_MAX_UPSTREAMS);

    struct am_config_report vr;
    memset(&vr, 0, sizeof vr);
    int vrc = am_config_validate(&cfg, &vr);
    check_report(&vr);
    if (rc == 0 && vrc == 0 && !has_password(&cfg)) {
        /* A valid config without passwords round-trips through its dump. */
        char *dump = am_config_dump(&cfg);
        if (dump) {
            struct am_config again;
            struct am_config_report ar;
            if (am_config_init_defaults(&again) == 0) {
                int arc = am_config_load_string(&again, dump, &ar);
                check_report(&ar);
                FUZZ_CHECK(arc == 0 || arc == AM_ENOMEM);
                if (arc == 0) {
                    char *dump2 = am_config_dump(&again);
                    if (dump2) FUZZ_CHECK(strcmp(dump, dump2) == 0);
                    free(dump2);
                }
                am_config_cleanup(&again);
            }
            free(dump);
        }
    } else {
        free(am_config_dump(&cfg)); /* must not crash on an invalid config either */
    }
    am_config_cleanup(&cfg);
    am_config_cleanup(&cfg);
    free(json);
    return 0;
}

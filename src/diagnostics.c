/* diagnostics — platform judgement and refusal text; see include/archmirror/diagnostics.h. */
#include "archmirror/diagnostics.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "archmirror/platform.h"

size_t am_diagnostics_node_platforms(const struct am_http_header *hdrs, size_t n_hdrs,
                                     struct am_platform *out, size_t max)
{
    size_t n = 0;
    for (size_t i = 0; i < n_hdrs && n < max; i++) {
        const struct am_http_header *h = &hdrs[i];
        if (!am_http_token_eq(h->name, h->name_len, "x-node-platform")) continue;
        const char *v = h->value, *end = h->value + h->value_len;
        while (v < end && n < max) {
            const char *comma = memchr(v, ',', (size_t)(end - v));
            const char *stop = comma ? comma : end;
            const char *a = v, *b = stop;
            while (a < b && (*a == ' ' || *a == '\t')) a++;
            while (b > a && (b[-1] == ' ' || b[-1] == '\t')) b--;
            if (b > a && am_platform_parse(a, (size_t)(b - a), &out[n], NULL, NULL, 0) == 0) n++;
            v = comma ? comma + 1 : end;
        }
    }
    return n;
}

bool am_diagnostics_runnable(const struct am_platform *node, size_t n_node,
                             const struct am_platform *has, size_t n_has)
{
    if (n_has == 0 || n_node == 0) return true;
    for (size_t i = 0; i < n_node; i++)
        for (size_t j = 0; j < n_has; j++)
            if (am_platform_matches(&node[i], &has[j])) return true;
    return false;
}

/* Copies s into out[*len..cap) as printable ASCII. */
static void put(char *out, size_t *len, size_t cap, const char *s)
{
    for (; *s && *len < cap; s++) {
        unsigned char c = (unsigned char)*s;
        out[(*len)++] = c >= 0x20 && c < 0x7f ? (char)c : '?';
    }
    out[*len] = '\0';
}

void am_diagnostics_reason(const char *image, const struct am_platform *node,
                           const struct am_platform *has, size_t n_has, char *out)
{
    char want[AM_PLATFORM_FORMAT_SIZE], list[160] = "", one[AM_PLATFORM_FORMAT_SIZE];
    const char *pin = NULL;
    am_platform_format(node, want, sizeof want);
    size_t ll = 0;
    for (size_t i = 0; i < n_has; i++) {
        am_platform_format(&has[i], one, sizeof one);
        if (ll + strlen(one) + 2 >= sizeof list - 4) {
            put(list, &ll, sizeof list - 1, ", ...");
            break;
        }
        if (i) put(list, &ll, sizeof list - 1, ", ");
        put(list, &ll, sizeof list - 1, one);
        /* The pin that keeps the workload where it runs: amd64 if it is there. */
        if (strcmp(has[i].os, "linux") == 0 && (!pin || strcmp(has[i].architecture, "amd64") == 0))
            pin = has[i].architecture;
    }
    char tail[sizeof list + AM_PLATFORM_FIELD_MAX + 80];
    if (pin)
        snprintf(tail, sizeof tail, " (has %s); build multi-arch or pin kubernetes.io/arch=%s",
                 n_has ? list : "no platforms", pin);
    else
        snprintf(tail, sizeof tail, " (has %s); build multi-arch", n_has ? list : "no platforms");

    char head[AM_PLATFORM_FORMAT_SIZE + 32];
    snprintf(head, sizeof head, "no %s variant of ", want);
    size_t fixed = strlen(head) + strlen(tail);
    size_t room = fixed < AM_DIAG_REASON_MAX ? AM_DIAG_REASON_MAX - fixed : 0;
    size_t len = 0;
    put(out, &len, AM_DIAG_REASON_MAX, head);
    if (strlen(image) <= room) {
        put(out, &len, AM_DIAG_REASON_MAX, image);
    } else if (room > 3) {
        /* Keep the end of the name: the repository and tag say the most. */
        put(out, &len, AM_DIAG_REASON_MAX, "...");
        put(out, &len, AM_DIAG_REASON_MAX, image + strlen(image) - (room - 3));
    }
    put(out, &len, AM_DIAG_REASON_MAX, tail);
}

static json_t *platform_array(const struct am_platform *p, size_t n)
{
    json_t *a = json_array();
    char s[AM_PLATFORM_FORMAT_SIZE];
    for (size_t i = 0; a && i < n; i++) {
        am_platform_format(&p[i], s, sizeof s);
        json_array_append_new(a, json_string(s));
    }
    return a;
}

char *am_diagnostics_body(const char *image, const struct am_platform *node, size_t n_node,
                          const struct am_platform *has, size_t n_has, const char *reason)
{
    json_t *detail =
        json_pack("{s:s, s:o, s:o}", "image", image, "requested", platform_array(node, n_node),
                  "available", platform_array(has, n_has));
    json_t *doc = detail ? json_pack("{s:[{s:s, s:s, s:o}]}", "errors", "code", "DENIED", "message",
                                     reason, "detail", detail)
                         : NULL;
    char *text = doc ? json_dumps(doc, JSON_COMPACT) : NULL;
    json_decref(doc);
    return text;
}

/*
 * fuzz_wwwauth — am_wwwauth_parse on an arbitrary WWW-Authenticate value (an upstream's
 * 401). Properties: at most max challenges, every string NUL-terminated inside its field,
 * the documented error code only.
 */
#include <string.h>

#include "archmirror/error.h"
#include "archmirror/wwwauth.h"
#include "fuzz.h"

#define MAX 4

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct am_challenge ch[MAX];
    memset(ch, 0xa5, sizeof ch); /* garbage, so an unterminated field shows */
    size_t n = 0;
    int rc = am_wwwauth_parse((const char *)data, size, ch, MAX, &n);
    if (rc) {
        FUZZ_CHECK(rc == AM_EUPSTREAM_PROTOCOL);
        return 0;
    }
    FUZZ_CHECK(n <= MAX);
    for (size_t i = 0; i < n; i++) {
        FUZZ_CHECK(ch[i].scheme == AM_AUTH_OTHER || ch[i].scheme == AM_AUTH_BASIC ||
                   ch[i].scheme == AM_AUTH_BEARER);
        FUZZ_CHECK(strnlen(ch[i].realm, sizeof ch[i].realm) < sizeof ch[i].realm);
        FUZZ_CHECK(strnlen(ch[i].service, sizeof ch[i].service) < sizeof ch[i].service);
        FUZZ_CHECK(strnlen(ch[i].scope, sizeof ch[i].scope) < sizeof ch[i].scope);
        FUZZ_CHECK(strnlen(ch[i].error, sizeof ch[i].error) < sizeof ch[i].error);
    }
    /* With room for one, the first challenge must come out the same. */
    struct am_challenge one;
    size_t n1 = 0;
    if (n > 0 && am_wwwauth_parse((const char *)data, size, &one, 1, &n1) == 0) {
        FUZZ_CHECK(n1 == 1 && one.scheme == ch[0].scheme);
        FUZZ_CHECK(strcmp(one.realm, ch[0].realm) == 0 && strcmp(one.scope, ch[0].scope) == 0);
    }
    return 0;
}

/*
 * fuzz_tokenauth — am_tokenauth_parse on an arbitrary token endpoint body. Properties:
 * a token comes back only when it is visible ASCII and within AM_TOKENAUTH_MAX_TOKEN;
 * the lifetime never exceeds AM_TOKENAUTH_MAX_TTL_S; the message never contains the token.
 */
#include <string.h>

#include "archmirror/error.h"
#include "archmirror/tokenauth.h"
#include "fuzz.h"

#define NOW 1750000000 /* 2025-06-15T15:06:40Z, a fixed clock keeps runs reproducible */

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *token = NULL;
    uint64_t ttl = 0;
    char msg[256];
    msg[0] = '\0';
    int rc = am_tokenauth_parse((const char *)data, size, NOW, &token, &ttl, msg, sizeof msg);
    if (rc) {
        FUZZ_CHECK(rc == AM_EUPSTREAM_PROTOCOL || rc == AM_ENOMEM);
        FUZZ_CHECK(token == NULL); /* not handed out on failure */
        FUZZ_CHECK(strnlen(msg, sizeof msg) < sizeof msg);
        return 0;
    }
    FUZZ_CHECK(token != NULL);
    size_t n = strlen(token);
    FUZZ_CHECK(n > 0 && n <= AM_TOKENAUTH_MAX_TOKEN);
    for (size_t i = 0; i < n; i++)
        FUZZ_CHECK((unsigned char)token[i] > 0x20 && (unsigned char)token[i] < 0x7f);
    FUZZ_CHECK(ttl <= (uint64_t)AM_TOKENAUTH_MAX_TTL_S * 1000);
    if (n >= 4) FUZZ_CHECK(strstr(msg, token) == NULL);
    free(token);
    return 0;
}

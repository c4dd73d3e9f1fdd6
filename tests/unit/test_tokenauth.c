/* Unit tests for src/tokenauth.c: token endpoint JSON and the per-scope token cache. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "archmirror/error.h"
#include "archmirror/tokenauth.h"

#define NOW 1700000000 /* 2023-11-14T22:13:20Z */

static int parse(const char *json, char **tok, uint64_t *ttl, char *msg)
{
    *tok = NULL;
    *ttl = 12345;
    return am_tokenauth_parse(json, strlen(json), NOW, tok, ttl, msg, 256);
}

static void takes_the_token_field(void **state)
{
    char *tok, msg[256];
    uint64_t ttl;
    assert_int_equal(parse("{\"token\":\"abc.def\",\"expires_in\":300}", &tok, &ttl, msg), 0);
    assert_string_equal(tok, "abc.def");
    assert_int_equal(ttl, 300000);
    free(tok);
}

static void falls_back_to_access_token(void **state)
{
    char *tok, msg[256];
    uint64_t ttl;
    assert_int_equal(parse("{\"access_token\":\"oauth2\",\"expires_in\":120}", &tok, &ttl, msg), 0);
    assert_string_equal(tok, "oauth2");
    assert_int_equal(ttl, 120000);
    free(tok);
}

static void prefers_token_over_access_token(void **state)
{
    char *tok, msg[256];
    uint64_t ttl;
    assert_int_equal(parse("{\"access_token\":\"b\",\"token\":\"a\"}", &tok, &ttl, msg), 0);
    assert_string_equal(tok, "a");
    free(tok);
    /* An empty "token" does not hide a usable access_token. */
    assert_int_equal(parse("{\"token\":\"\",\"access_token\":\"b\"}", &tok, &ttl, msg), 0);
    assert_string_equal(tok, "b");
    free(tok);
}

static void defaults_expires_in_to_60_seconds(void **state)
{
    char *tok, msg[256];
    uint64_t ttl;
    assert_int_equal(parse("{\"token\":\"t\"}", &tok, &ttl, msg), 0);
    assert_int_equal(ttl, 60000);
    free(tok);
}

static void ignores_nonpositive_or_nonnumeric_expires_in(void **state)
{
    const char *docs[] = {
        "{\"token\":\"t\",\"expires_in\":0}",       "{\"token\":\"t\",\"expires_in\":-5}",
        "{\"token\":\"t\",\"expires_in\":\"300\"}", "{\"token\":\"t\",\"expires_in\":null}",
        "{\"token\":\"t\",\"expires_in\":0.5}",     "{\"token\":\"t\",\"expires_in\":[1]}",
    };
    for (size_t i = 0; i < sizeof docs / sizeof docs[0]; i++) {
        char *tok, msg[256];
        uint64_t ttl;
        assert_int_equal(parse(docs[i], &tok, &ttl, msg), 0);
        assert_int_equal(ttl, 60000);
        free(tok);
    }
}

static void clamps_expires_in_to_its_bounds(void **state)
{
    char *tok, msg[256];
    uint64_t ttl;
    assert_int_equal(parse("{\"token\":\"t\",\"expires_in\":5}", &tok, &ttl, msg), 0);
    assert_int_equal(ttl, (uint64_t)AM_TOKENAUTH_MIN_TTL_S * 1000);
    free(tok);
    assert_int_equal(parse("{\"token\":\"t\",\"expires_in\":99999999999}", &tok, &ttl, msg), 0);
    assert_int_equal(ttl, (uint64_t)AM_TOKENAUTH_MAX_TTL_S * 1000);
    free(tok);
    assert_int_equal(parse("{\"token\":\"t\",\"expires_in\":1e300}", &tok, &ttl, msg), 0);
    assert_int_equal(ttl, (uint64_t)AM_TOKENAUTH_MAX_TTL_S * 1000);
    free(tok);
    assert_int_equal(parse("{\"token\":\"t\",\"expires_in\":90.9}", &tok, &ttl, msg), 0);
    assert_int_equal(ttl, 90000);
    free(tok);
}

static void shortens_lifetime_by_the_age_from_issued_at(void **state)
{
    char *tok, msg[256];
    uint64_t ttl;
    /* Issued 100 s before NOW (22:11:40Z), valid 300 s: 200 s left. */
    assert_int_equal(parse("{\"token\":\"t\",\"expires_in\":300,"
                           "\"issued_at\":\"2023-11-14T22:11:40Z\"}",
                           &tok, &ttl, msg),
                     0);
    assert_int_equal(ttl, 200000);
    free(tok);
    /* Same instant with a fraction and an offset. */
    assert_int_equal(parse("{\"token\":\"t\",\"expires_in\":300,"
                           "\"issued_at\":\"2023-11-15T00:11:40.123456+02:00\"}",
                           &tok, &ttl, msg),
                     0);
    assert_int_equal(ttl, 200000);
    free(tok);
}

static void gives_zero_lifetime_to_a_token_issued_long_ago(void **state)
{
    char *tok, msg[256];
    uint64_t ttl;
    assert_int_equal(parse("{\"token\":\"t\",\"expires_in\":60,"
                           "\"issued_at\":\"2020-01-01T00:00:00Z\"}",
                           &tok, &ttl, msg),
                     0);
    assert_int_equal(ttl, 0);
    free(tok);
}

static void ignores_issued_at_in_the_future_or_unparseable(void **state)
{
    const char *docs[] = {
        "{\"token\":\"t\",\"expires_in\":300,\"issued_at\":\"2030-01-01T00:00:00Z\"}",
        "{\"token\":\"t\",\"expires_in\":300,\"issued_at\":\"yesterday\"}",
        "{\"token\":\"t\",\"expires_in\":300,\"issued_at\":\"2023-13-01T00:00:00Z\"}",
        "{\"token\":\"t\",\"expires_in\":300,\"issued_at\":\"2023-11-14T22:11:40\"}",
        "{\"token\":\"t\",\"expires_in\":300,\"issued_at\":12}",
    };
    for (size_t i = 0; i < sizeof docs / sizeof docs[0]; i++) {
        char *tok, msg[256];
        uint64_t ttl;
        assert_int_equal(parse(docs[i], &tok, &ttl, msg), 0);
        assert_int_equal(ttl, 300000);
        free(tok);
    }
}

static void rejects_garbage(void **state)
{
    const char *docs[] = {
        "",
        "not json",
        "[\"token\"]",
        "\"token\"",
        "{}",
        "{\"token\":42}",
        "{\"token\":\"\"}",
        "{\"token\":null,\"access_token\":false}",
        "{\"token\":\"a b\"}",
        "{\"token\":\"a\\r\\nX-Injected: 1\"}",
        "{\"token\":\"caf\\u00e9\"}",
        "{\"token\":\"t\"",
    };
    for (size_t i = 0; i < sizeof docs / sizeof docs[0]; i++) {
        char *tok, msg[256] = "";
        uint64_t ttl;
        assert_int_equal(parse(docs[i], &tok, &ttl, msg), AM_EUPSTREAM_PROTOCOL);
        assert_null(tok);
        assert_int_equal(ttl, 12345);
        assert_true(msg[0] != '\0');
    }
}

static void never_puts_the_token_in_the_message(void **state)
{
    char *tok, msg[256];
    uint64_t ttl;
    assert_int_equal(parse("{\"token\":\"SECRET\\u0001\"}", &tok, &ttl, msg),
                     AM_EUPSTREAM_PROTOCOL);
    assert_null(strstr(msg, "SECRET"));
    /* Not JSON: jansson's reason quotes a short lexeme near the error ("near '\"SECRET'"). */
    const char *broken[] = {
        "{\"token\" \"SECRET\"}",     /* ':' expected near '"SECRET"' */
        "{\"token\":\"SECRET\x01\"}", /* control character near '"SECRET' */
        "{\"token\":\"SECRET\n\"}",   /* unexpected newline near '"SECRET' */
        "{\"token\":\"SECRET\\q\"}",  /* invalid escape */
        "[\"SECRET\" \"x\"]",         /* ']' expected near '"x"' */
        "{\"token\":SECRET}",         /* invalid token near 'S' */
    };
    for (size_t i = 0; i < sizeof broken / sizeof broken[0]; i++) {
        assert_int_equal(parse(broken[i], &tok, &ttl, msg), AM_EUPSTREAM_PROTOCOL);
        assert_non_null(strstr(msg, "not JSON"));
        assert_null(strstr(msg, "SECRET"));
        assert_null(strstr(msg, "SEC"));
    }
}

static void rejects_an_overlong_token(void **state)
{
    size_t n = AM_TOKENAUTH_MAX_TOKEN + 1;
    char *doc = malloc(n + 32);
    assert_non_null(doc);
    strcpy(doc, "{\"token\":\"");
    memset(doc + 10, 'a', n);
    strcpy(doc + 10 + n, "\"}");
    char *tok, msg[256];
    uint64_t ttl;
    assert_int_equal(parse(doc, &tok, &ttl, msg), AM_EUPSTREAM_PROTOCOL);
    /* One byte less is fine. */
    strcpy(doc + 10 + n - 1, "\"}");
    assert_int_equal(parse(doc, &tok, &ttl, msg), 0);
    assert_int_equal(strlen(tok), AM_TOKENAUTH_MAX_TOKEN);
    free(tok);
    free(doc);
}

/* --- cache ------------------------------------------------------------------------------ */

struct waiter {
    struct am_tokenauth_waiter w;
    int calls;
    int status;
    char token[64];
    struct am_tokenauth *ta; /* for re-entry */
    int again;               /* result of a wait made inside the callback */
    bool rewait;
};

static void on_token(struct am_tokenauth_waiter *w, int status, const char *token)
{
    struct waiter *x = (struct waiter *)(void *)w;
    x->calls++;
    x->status = status;
    snprintf(x->token, sizeof x->token, "%s", token ? token : "(null)");
    if (x->rewait) {
        x->rewait = false;
        x->again = am_tokenauth_wait(x->ta, "s", w);
    }
}

static void waiter_init(struct waiter *x)
{
    memset(x, 0, sizeof *x);
    x->w.on_token = on_token;
}

static void is_empty_at_first(void **state)
{
    struct am_tokenauth *ta;
    assert_int_equal(am_tokenauth_new(&ta), 0);
    assert_null(am_tokenauth_get(ta, "repository:a:pull", 0));
    assert_false(am_tokenauth_fetching(ta, "repository:a:pull"));
    am_tokenauth_free(ta);
}

static void first_waiter_fetches_and_later_ones_join(void **state)
{
    struct am_tokenauth *ta;
    struct waiter a, b, c;
    waiter_init(&a);
    waiter_init(&b);
    waiter_init(&c);
    assert_int_equal(am_tokenauth_new(&ta), 0);
    assert_int_equal(am_tokenauth_wait(ta, "s", &a.w), 1);
    assert_true(am_tokenauth_fetching(ta, "s"));
    assert_int_equal(am_tokenauth_wait(ta, "s", &b.w), 0);
    assert_int_equal(am_tokenauth_wait(ta, "s", &c.w), 0);
    /* Another scope is independent. */
    struct waiter d;
    waiter_init(&d);
    assert_int_equal(am_tokenauth_wait(ta, "other", &d.w), 1);

    am_tokenauth_finish(ta, "s", 0, "tok", 60000, 1000);
    assert_int_equal(a.calls, 1);
    assert_int_equal(b.calls, 1);
    assert_int_equal(c.calls, 1);
    assert_string_equal(b.token, "tok");
    assert_int_equal(d.calls, 0);
    assert_false(am_tokenauth_fetching(ta, "s"));
    assert_string_equal(am_tokenauth_get(ta, "s", 1000), "tok");
    am_tokenauth_free(ta); /* d still queued: dropped without a call */
    assert_int_equal(d.calls, 0);
}

static void keeps_a_token_until_expiry_minus_the_margin(void **state)
{
    struct am_tokenauth *ta;
    struct waiter a;
    waiter_init(&a);
    assert_int_equal(am_tokenauth_new(&ta), 0);
    assert_int_equal(am_tokenauth_wait(ta, "s", &a.w), 1);
    am_tokenauth_finish(ta, "s", 0, "tok", 60000, 1000);
    /* 60 s lifetime, 10 s margin: usable until 1000 + 50000. */
    assert_non_null(am_tokenauth_get(ta, "s", 50999));
    assert_null(am_tokenauth_get(ta, "s", 51000));
    assert_null(am_tokenauth_get(ta, "s", 50999)); /* expired means gone */
    am_tokenauth_free(ta);
}

static void uses_a_quarter_of_a_short_lifetime_as_margin(void **state)
{
    struct am_tokenauth *ta;
    struct waiter a;
    waiter_init(&a);
    assert_int_equal(am_tokenauth_new(&ta), 0);
    assert_int_equal(am_tokenauth_wait(ta, "s", &a.w), 1);
    am_tokenauth_finish(ta, "s", 0, "tok", 8000, 0);
    assert_non_null(am_tokenauth_get(ta, "s", 5999));
    assert_null(am_tokenauth_get(ta, "s", 6000));
    am_tokenauth_free(ta);
}

static void does_not_cache_a_token_without_lifetime(void **state)
{
    struct am_tokenauth *ta;
    struct waiter a;
    waiter_init(&a);
    assert_int_equal(am_tokenauth_new(&ta), 0);
    assert_int_equal(am_tokenauth_wait(ta, "s", &a.w), 1);
    am_tokenauth_finish(ta, "s", 0, "stale", 0, 0);
    assert_int_equal(a.status, 0);
    assert_string_equal(a.token, "stale"); /* the waiter still gets it once */
    assert_null(am_tokenauth_get(ta, "s", 0));
    am_tokenauth_free(ta);
}

static void reports_a_failed_fetch_to_every_waiter(void **state)
{
    struct am_tokenauth *ta;
    struct waiter a, b;
    waiter_init(&a);
    waiter_init(&b);
    assert_int_equal(am_tokenauth_new(&ta), 0);
    assert_int_equal(am_tokenauth_wait(ta, "s", &a.w), 1);
    assert_int_equal(am_tokenauth_wait(ta, "s", &b.w), 0);
    am_tokenauth_finish(ta, "s", AM_EUNAUTHORIZED, NULL, 0, 0);
    assert_int_equal(a.status, AM_EUNAUTHORIZED);
    assert_int_equal(b.status, AM_EUNAUTHORIZED);
    assert_string_equal(b.token, "(null)");
    assert_null(am_tokenauth_get(ta, "s", 0));
    /* The next waiter starts a new fetch. */
    assert_int_equal(am_tokenauth_wait(ta, "s", &a.w), 1);
    am_tokenauth_free(ta);
}

static void does_not_call_a_cancelled_waiter(void **state)
{
    struct am_tokenauth *ta;
    struct waiter a, b;
    waiter_init(&a);
    waiter_init(&b);
    assert_int_equal(am_tokenauth_new(&ta), 0);
    assert_int_equal(am_tokenauth_wait(ta, "s", &a.w), 1);
    assert_int_equal(am_tokenauth_wait(ta, "s", &b.w), 0);
    am_tokenauth_cancel(&b.w);
    am_tokenauth_cancel(&b.w); /* twice is harmless */
    am_tokenauth_finish(ta, "s", 0, "tok", 60000, 0);
    assert_int_equal(a.calls, 1);
    assert_int_equal(b.calls, 0);
    am_tokenauth_free(ta);
}

static void lets_a_waiter_wait_again_from_its_callback(void **state)
{
    struct am_tokenauth *ta;
    struct waiter a;
    waiter_init(&a);
    assert_int_equal(am_tokenauth_new(&ta), 0);
    a.ta = ta;
    a.rewait = true;
    assert_int_equal(am_tokenauth_wait(ta, "s", &a.w), 1);
    am_tokenauth_finish(ta, "s", AM_EUNAUTHORIZED, NULL, 0, 0);
    assert_int_equal(a.calls, 1);
    assert_int_equal(a.again, 1); /* the failed flight ended before the call */
    am_tokenauth_finish(ta, "s", 0, "second", 60000, 0);
    assert_int_equal(a.calls, 2);
    assert_string_equal(a.token, "second");
    am_tokenauth_free(ta);
}

static void forgets_only_the_rejected_token(void **state)
{
    struct am_tokenauth *ta;
    struct waiter a;
    waiter_init(&a);
    assert_int_equal(am_tokenauth_new(&ta), 0);
    assert_int_equal(am_tokenauth_wait(ta, "s", &a.w), 1);
    am_tokenauth_finish(ta, "s", 0, "new", 60000, 0);
    am_tokenauth_del(ta, "s", "old"); /* someone refreshed it meanwhile */
    assert_string_equal(am_tokenauth_get(ta, "s", 0), "new");
    am_tokenauth_del(ta, "s", "new");
    assert_null(am_tokenauth_get(ta, "s", 0));
    am_tokenauth_del(ta, "unknown", "x");
    am_tokenauth_free(ta);
}

static void stays_bounded_when_many_scopes_are_cached(void **state)
{
    struct am_tokenauth *ta;
    struct waiter w;
    char scope[64];
    assert_int_equal(am_tokenauth_new(&ta), 0);
    for (int i = 0; i < AM_TOKENAUTH_MAX_ENTRIES + 10; i++) {
        waiter_init(&w);
        snprintf(scope, sizeof scope, "repository:r%d:pull", i);
        assert_int_equal(am_tokenauth_wait(ta, scope, &w.w), 1);
        /* Later scopes live longer, so the earliest are evicted first. */
        am_tokenauth_finish(ta, scope, 0, "t", 60000 + (uint64_t)i * 1000, 0);
    }
    assert_null(am_tokenauth_get(ta, "repository:r0:pull", 0));
    assert_null(am_tokenauth_get(ta, "repository:r9:pull", 0));
    snprintf(scope, sizeof scope, "repository:r%d:pull", AM_TOKENAUTH_MAX_ENTRIES + 9);
    assert_non_null(am_tokenauth_get(ta, scope, 0));
    assert_non_null(am_tokenauth_get(ta, "repository:r10:pull", 0));
    am_tokenauth_free(ta);
}

static void never_evicts_a_scope_with_a_fetch_in_flight(void **state)
{
    struct am_tokenauth *ta;
    struct waiter first, w;
    char scope[64];
    waiter_init(&first);
    assert_int_equal(am_tokenauth_new(&ta), 0);
    assert_int_equal(am_tokenauth_wait(ta, "pending", &first.w), 1);
    for (int i = 0; i < AM_TOKENAUTH_MAX_ENTRIES + 10; i++) {
        waiter_init(&w);
        snprintf(scope, sizeof scope, "s%d", i);
        assert_int_equal(am_tokenauth_wait(ta, scope, &w.w), 1);
        am_tokenauth_finish(ta, scope, 0, "t", 60000, 0);
    }
    assert_true(am_tokenauth_fetching(ta, "pending"));
    am_tokenauth_finish(ta, "pending", 0, "p", 60000, 0);
    assert_int_equal(first.calls, 1);
    assert_string_equal(am_tokenauth_get(ta, "pending", 0), "p");
    am_tokenauth_free(ta);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(takes_the_token_field),
        cmocka_unit_test(falls_back_to_access_token),
        cmocka_unit_test(prefers_token_over_access_token),
        cmocka_unit_test(defaults_expires_in_to_60_seconds),
        cmocka_unit_test(ignores_nonpositive_or_nonnumeric_expires_in),
        cmocka_unit_test(clamps_expires_in_to_its_bounds),
        cmocka_unit_test(shortens_lifetime_by_the_age_from_issued_at),
        cmocka_unit_test(gives_zero_lifetime_to_a_token_issued_long_ago),
        cmocka_unit_test(ignores_issued_at_in_the_future_or_unparseable),
        cmocka_unit_test(rejects_garbage),
        cmocka_unit_test(never_puts_the_token_in_the_message),
        cmocka_unit_test(rejects_an_overlong_token),
        cmocka_unit_test(is_empty_at_first),
        cmocka_unit_test(first_waiter_fetches_and_later_ones_join),
        cmocka_unit_test(keeps_a_token_until_expiry_minus_the_margin),
        cmocka_unit_test(uses_a_quarter_of_a_short_lifetime_as_margin),
        cmocka_unit_test(does_not_cache_a_token_without_lifetime),
        cmocka_unit_test(reports_a_failed_fetch_to_every_waiter),
        cmocka_unit_test(does_not_call_a_cancelled_waiter),
        cmocka_unit_test(lets_a_waiter_wait_again_from_its_callback),
        cmocka_unit_test(forgets_only_the_rejected_token),
        cmocka_unit_test(stays_bounded_when_many_scopes_are_cached),
        cmocka_unit_test(never_evicts_a_scope_with_a_fetch_in_flight),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

/*
 * tokenauth — token endpoint responses and the per-scope token cache; see
 * include/archmirror/tokenauth.h.
 *
 * DESIGN: one entry per scope holds the cached token (if any), its expiry and the queue
 * of waiters of the fetch in flight. Entries live in a small array searched linearly: an
 * upstream sees tens of hot scopes, and a scan of short strings beats hashing them. The
 * array is bounded; when full, the entry closest to expiry (an expired or tokenless one
 * first) that has no fetch in flight makes room. Entry addresses are stable (the waiter
 * queue's head lives in the entry), so the array holds pointers. Tokens are wiped before
 * their memory is released.
 */
#include "archmirror/tokenauth.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "archmirror/error.h"

struct entry {
    char *scope;         /* owned */
    char *token;         /* owned or NULL */
    uint64_t expires_ms; /* usable while now < expires_ms */
    bool fetching;
    struct am_tokenauth_waiter queue; /* list head; on_token unused */
};

struct am_tokenauth {
    struct entry **v; /* owned array of owned entries */
    size_t n;
    size_t cap;
};

/* --- waiter queues (circular, head sentinel) ---------------------------------------- */

static void queue_init(struct am_tokenauth_waiter *head)
{
    head->prev = head->next = head;
}

static bool queue_empty(const struct am_tokenauth_waiter *head)
{
    return head->next == head;
}

static void queue_push(struct am_tokenauth_waiter *head, struct am_tokenauth_waiter *w)
{
    w->prev = head->prev;
    w->next = head;
    head->prev->next = w;
    head->prev = w;
}

void am_tokenauth_cancel(struct am_tokenauth_waiter *w)
{
    if (!w->next) return;
    w->prev->next = w->next;
    w->next->prev = w->prev;
    w->prev = w->next = NULL;
}

/* Moves every waiter of from onto the (initialised, empty) head to. */
static void queue_move(struct am_tokenauth_waiter *from, struct am_tokenauth_waiter *to)
{
    if (queue_empty(from)) return;
    to->next = from->next;
    to->prev = from->prev;
    to->next->prev = to;
    to->prev->next = to;
    queue_init(from);
}

/* --- token secrecy ------------------------------------------------------------------- */

static void free_secret(char *s)
{
    if (!s) return;
    explicit_bzero(s, strlen(s));
    free(s);
}

/* --- response parsing ----------------------------------------------------------------- */

static bool digits(const char **p, int n, int *out)
{
    int v = 0;
    for (int i = 0; i < n; i++) {
        char c = (*p)[i];
        if (c < '0' || c > '9') return false;
        v = v * 10 + (c - '0');
    }
    *p += n;
    *out = v;
    return true;
}

/* RFC 3339 §5.6 date-time into Unix seconds (fraction dropped). */
static bool parse_rfc3339(const char *s, int64_t *out)
{
    int Y, M, D, h, m, sec, oh = 0, om = 0, sign = 0;
    const char *p = s;
    if (!digits(&p, 4, &Y) || *p++ != '-' || !digits(&p, 2, &M) || *p++ != '-' ||
        !digits(&p, 2, &D) || (*p != 'T' && *p != 't'))
        return false;
    p++;
    if (!digits(&p, 2, &h) || *p++ != ':' || !digits(&p, 2, &m) || *p++ != ':' ||
        !digits(&p, 2, &sec))
        return false;
    if (*p == '.') {
        p++;
        if (*p < '0' || *p > '9') return false;
        while (*p >= '0' && *p <= '9') p++;
    }
    if (*p == 'Z' || *p == 'z') {
        p++;
    } else if (*p == '+' || *p == '-') {
        sign = *p++ == '+' ? 1 : -1;
        if (!digits(&p, 2, &oh) || *p++ != ':' || !digits(&p, 2, &om)) return false;
    } else {
        return false;
    }
    if (*p != '\0' || M < 1 || M > 12 || D < 1 || D > 31 || h > 23 || m > 59 || sec > 60 ||
        oh > 23 || om > 59)
        return false;
    struct tm tm = {.tm_year = Y - 1900,
                    .tm_mon = M - 1,
                    .tm_mday = D,
                    .tm_hour = h,
                    .tm_min = m,
                    .tm_sec = sec};
    time_t t = timegm(&tm);
    if (t == (time_t)-1) return false;
    *out = (int64_t)t - sign * (int64_t)(oh * 3600 + om * 60);
    return true;
}

/* A non-empty string member, else NULL. */
static const char *string_member(json_t *obj, const char *key, size_t *len)
{
    json_t *v = json_object_get(obj, key);
    if (!json_is_string(v) || json_string_length(v) == 0) return NULL;
    *len = json_string_length(v);
    return json_string_value(v);
}

int am_tokenauth_parse(const char *json, size_t len, int64_t now_unix, char **token,
                       uint64_t *ttl_ms, char *msg, size_t msglen)
{
    json_error_t jerr;
    int rc = AM_EUPSTREAM_PROTOCOL;
    json_t *root = json_loadb(json, len, 0, &jerr);
    if (!root) {
        /* jansson appends " near '<lexeme>'" (up to 20 bytes of the input), which here
         * can be the token or the start of it: keep only the reason before it. */
        char *near = strstr(jerr.text, " near '");
        if (near) *near = '\0';
        snprintf(msg, msglen, "token response is not JSON: %s at byte %d", jerr.text,
                 jerr.position);
        return AM_EUPSTREAM_PROTOCOL;
    }
    if (!json_is_object(root)) {
        snprintf(msg, msglen, "token response is not a JSON object");
        goto out;
    }
    size_t tlen = 0;
    const char *t = string_member(root, "token", &tlen);
    if (!t) t = string_member(root, "access_token", &tlen);
    if (!t) {
        snprintf(msg, msglen, "token response has no \"token\" or \"access_token\"");
        goto out;
    }
    if (tlen > AM_TOKENAUTH_MAX_TOKEN) {
        snprintf(msg, msglen, "token is longer than %d bytes", AM_TOKENAUTH_MAX_TOKEN);
        goto out;
    }
    /* It goes into an Authorization header: visible ASCII only (RFC 6750 §2.1 b64token
     * is narrower; be liberal but never let CR/LF, spaces or NUL through). */
    for (size_t i = 0; i < tlen; i++) {
        unsigned char c = (unsigned char)t[i];
        if (c < 0x21 || c > 0x7e) {
            snprintf(msg, msglen, "token contains a byte outside visible ASCII");
            goto out;
        }
    }

    int64_t ttl = AM_TOKENAUTH_DEFAULT_TTL_S;
    json_t *ex = json_object_get(root, "expires_in");
    if (json_is_integer(ex) && json_integer_value(ex) > 0) {
        ttl = (int64_t)json_integer_value(ex);
    } else if (json_is_real(ex) && json_real_value(ex) >= 1.0) {
        double d = json_real_value(ex);
        ttl = d >= (double)AM_TOKENAUTH_MAX_TTL_S ? AM_TOKENAUTH_MAX_TTL_S : (int64_t)d;
    }
    if (ttl < AM_TOKENAUTH_MIN_TTL_S) ttl = AM_TOKENAUTH_MIN_TTL_S;
    if (ttl > AM_TOKENAUTH_MAX_TTL_S) ttl = AM_TOKENAUTH_MAX_TTL_S;

    size_t ilen = 0;
    const char *issued = string_member(root, "issued_at", &ilen);
    int64_t issued_unix;
    if (issued && parse_rfc3339(issued, &issued_unix) && issued_unix < now_unix) {
        int64_t age = now_unix - issued_unix;
        ttl = age >= ttl ? 0 : ttl - age;
    }

    char *copy = malloc(tlen + 1);
    if (!copy) {
        rc = AM_ENOMEM;
        goto out;
    }
    memcpy(copy, t, tlen);
    copy[tlen] = '\0';
    *token = copy;
    *ttl_ms = (uint64_t)ttl * 1000;
    rc = 0;

out:
    json_decref(root);
    return rc;
}

/* --- the cache -------------------------------------------------------------------------- */

int am_tokenauth_new(struct am_tokenauth **out)
{
    struct am_tokenauth *ta = calloc(1, sizeof *ta);
    if (!ta) return AM_ENOMEM;
    *out = ta;
    return 0;
}

static void entry_free(struct entry *e)
{
    while (!queue_empty(&e->queue)) am_tokenauth_cancel(e->queue.next);
    free(e->scope);
    free_secret(e->token);
    free(e);
}

void am_tokenauth_free(struct am_tokenauth *ta)
{
    if (!ta) return;
    for (size_t i = 0; i < ta->n; i++) entry_free(ta->v[i]);
    free(ta->v);
    free(ta);
}

static struct entry *find(const struct am_tokenauth *ta, const char *scope)
{
    for (size_t i = 0; i < ta->n; i++)
        if (strcmp(ta->v[i]->scope, scope) == 0) return ta->v[i];
    return NULL;
}

/* Drops the idle entry closest to expiry, if any; returns whether one went. */
static bool evict_one(struct am_tokenauth *ta)
{
    size_t best = ta->n;
    for (size_t i = 0; i < ta->n; i++) {
        const struct entry *e = ta->v[i];
        if (e->fetching || !queue_empty(&e->queue)) continue;
        uint64_t exp = e->token ? e->expires_ms : 0;
        if (best == ta->n || exp < (ta->v[best]->token ? ta->v[best]->expires_ms : 0)) best = i;
    }
    if (best == ta->n) return false;
    entry_free(ta->v[best]);
    ta->v[best] = ta->v[--ta->n];
    return true;
}

/* Finds or creates scope's entry; NULL on out-of-memory. */
static struct entry *obtain(struct am_tokenauth *ta, const char *scope)
{
    struct entry *e = find(ta, scope);
    if (e) return e;
    if (ta->n >= AM_TOKENAUTH_MAX_ENTRIES) evict_one(ta);
    if (ta->n == ta->cap) {
        size_t cap = ta->cap ? ta->cap * 2 : 8;
        struct entry **v = realloc(ta->v, cap * sizeof *v);
        if (!v) return NULL;
        ta->v = v;
        ta->cap = cap;
    }
    e = calloc(1, sizeof *e);
    if (!e) return NULL;
    e->scope = strdup(scope);
    if (!e->scope) {
        free(e);
        return NULL;
    }
    queue_init(&e->queue);
    ta->v[ta->n++] = e;
    return e;
}

const char *am_tokenauth_get(struct am_tokenauth *ta, const char *scope, uint64_t now_ms)
{
    struct entry *e = find(ta, scope);
    if (!e || !e->token) return NULL;
    if (now_ms >= e->expires_ms) {
        free_secret(e->token);
        e->token = NULL;
        return NULL;
    }
    return e->token;
}

bool am_tokenauth_fetching(const struct am_tokenauth *ta, const char *scope)
{
    const struct entry *e = find(ta, scope);
    return e && e->fetching;
}

int am_tokenauth_wait(struct am_tokenauth *ta, const char *scope, struct am_tokenauth_waiter *w)
{
    struct entry *e = obtain(ta, scope);
    if (!e) return AM_ENOMEM;
    am_tokenauth_cancel(w);
    queue_push(&e->queue, w);
    if (e->fetching) return 0;
    e->fetching = true;
    return 1;
}

void am_tokenauth_finish(struct am_tokenauth *ta, const char *scope, int status, const char *token,
                         uint64_t ttl_ms, uint64_t now_ms)
{
    struct am_tokenauth_waiter local;
    char *copy = NULL;
    queue_init(&local);
    if (status == 0 && !token) status = AM_EUPSTREAM_PROTOCOL;
    /* Waiters get their own copy: one of them may replace the cached token. */
    if (status == 0 && !(copy = strdup(token))) status = AM_ENOMEM;

    struct entry *e = find(ta, scope);
    if (e) {
        e->fetching = false;
        uint64_t margin = ttl_ms / 4 < AM_TOKENAUTH_MARGIN_MS ? ttl_ms / 4 : AM_TOKENAUTH_MARGIN_MS;
        if (status == 0 && ttl_ms > margin) {
            char *keep = strdup(token);
            if (keep) {
                free_secret(e->token);
                e->token = keep;
                e->expires_ms = now_ms + ttl_ms - margin;
            }
        }
        queue_move(&e->queue, &local);
    }
    /* e may be evicted by a waiter from here on; only the local queue is used. */
    while (!queue_empty(&local)) {
        struct am_tokenauth_waiter *w = local.next;
        am_tokenauth_cancel(w);
        w->on_token(w, status, status == 0 ? copy : NULL);
    }
    free_secret(copy);
}

void am_tokenauth_del(struct am_tokenauth *ta, const char *scope, const char *token)
{
    struct entry *e = find(ta, scope);
    if (e && e->token && token && strcmp(e->token, token) == 0) {
        free_secret(e->token);
        e->token = NULL;
    }
}

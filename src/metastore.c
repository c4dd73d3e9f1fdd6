/*
 * metastore — the LMDB store of manifests and tags; see include/archmirror/metastore.h.
 *
 * This module must never make the loop wait on a write or an fsync, never hand out a
 * pointer into the map, and never trust a byte it reads back from disk.
 *
 * DESIGN
 *
 * Layout. One env, <dir>/meta.lmdb (MDB_NOSUBDIR, so the lock file is
 * <dir>/meta.lmdb-lock beside it), MDB_NOTLS so a reader slot belongs to a transaction,
 * not to a thread. Named DBs:
 *   "meta"       "schema" → u32 LE schema version (SCHEMA_VERSION). A newer version is
 *                refused at open; a version is never silently upgraded.
 *   "manifests"  key(upstream, repo, digest) → value
 *   "tags"       key(upstream, repo, tag)    → value
 *   "platforms"  key(upstream, repo, manifest digest) → value: the platform of a
 *                single-arch manifest, read from its config blob (added after schema 1
 *                shipped; a file without it gets it at open, which is why the schema
 *                version did not change: older builds never open it and are unaffected)
 *   "access"     key(upstream, repo, digest) → u64 LE last_use_ms of that manifest: its
 *                last read, or its put (added like "platforms"; a manifest without one
 *                counts as last used when it was stored). Written with the manifest's put,
 *                deleted with it, and rewritten from the index in the writer's batches;
 *                never once per read.
 *
 * Keys. upstream "\0" repo "\0" digest-or-tag. Every component is non-empty printable
 * ASCII without spaces (0x21..0x7e), so the NULs split it unambiguously. The bounded
 * components can add up to 647 bytes, more than LMDB's 511-byte key limit; a key longer
 * than mdb_env_get_maxkeysize() is stored as 0xff followed by the sha256 digest text of
 * the natural key. 0xff cannot begin a natural key, so the two forms never meet.
 *
 * Values. A 24-byte header, all integers little-endian:
 *    0  u16  format version (VALUE_VERSION)
 *    2  u8   kind (KIND_MANIFEST or KIND_TAG)
 *    3  u8   media type length m (<= AM_MEDIATYPE_MAX)
 *    4  u8   digest text length d (tags; 0 for manifests)
 *    5  u8*3 reserved, zero
 *    8  u64  time: stored_at_ms (manifest) or fetched_at_ms (tag)
 *   16  u64  size: byte count of the manifest (manifest) or the tagged manifest (tag)
 *   24  media type (m bytes, no NUL), digest text (d bytes), manifest bytes (manifests)
 * A value is accepted only if its length is exactly what the header announces, the
 * reserved bytes are zero, the media type has no NUL and the digest text parses.
 * Anything else is AM_ESTORE: LMDB has no checksums, so the header is all we can check.
 *
 * Platform values (KIND_PLATFORM) use the same header with m = 0, d = the length of the
 * config digest text, time = stored_at_ms and size = the byte count of what follows the
 * digest text: os, architecture, variant and os.version, each as a u8 length (<=
 * AM_PLATFORM_FIELD_MAX) and that many printable ASCII bytes. Decoded by decode_platform,
 * which is as strict as decode_value.
 *
 * Threads and ordering. Reads and all bookkeeping run on the loop thread. A put copies
 * its inputs into one allocation (an op) appended to `pending`. When no batch runs, the
 * pending ops (up to BATCH_MAX_OPS / BATCH_MAX_BYTES) move to `batch` and one
 * uv_queue_work runs them in a single write transaction on the thread pool; only that
 * worker touches `batch` until its after-work callback, which runs on the loop, counts,
 * logs, and calls each op's callback. Ops put meanwhile (also from those callbacks) wait
 * in `pending` for the next batch, so there is one writer and commit order is put order.
 * Close stops new work, lets the batches drain, then queues a last work request that
 * closes the env off the loop; its after-work callback frees the store and calls done.
 * No handle is ever created, so the loop can end as soon as the store is closed.
 *
 * Index and budget. The loop keeps every manifest in memory (struct entry: its key, its
 * bytes and its last use): a hash table by key, an LRU list (head = least recently used)
 * and a list of entries whose last use has not reached "access" yet. The index is what
 * the store holds once the queued writes commit: a put adds or updates its entry at
 * once, an eviction removes it at once (the queued delete makes reads AM_ENOT_FOUND at
 * once, as a queued put makes them see it). It is built at open from one read txn over
 * "manifests" (key and value length, never the value's pages, except the header of a
 * manifest without an access record) and "access". Sizes are the bytes of key and value,
 * kept as a running total, rather than mdb_stat's page counts: pages cannot be attributed
 * to one manifest, so they cannot say what deleting it frees, and they change only when a
 * txn commits on the worker; the byte total is exact, known on the loop as each put is
 * made, and the same on every machine. LMDB's overhead (half-full pages, an overflow
 * value rounded up to whole pages, copy-on-write free pages) is why the budget must stay
 * well below the map. A read moves its entry to the LRU tail and onto the dirty list;
 * the dirty entries' times are written by the next batch (first in it, so a delete or put
 * of the same key later in the batch wins), or on their own once ACCESS_FLUSH_N have
 * accumulated, and at close. A crash loses at most those, which only steer eviction.
 * Each manifest put, once queued, checks the budget: above high_bytes, entries are taken
 * from the LRU head, removed from the index, and queued as deletes (manifest and access
 * record) until the total is at most low_bytes. Readers get copies, so no read can be
 * broken by a delete. A batch that fails is reconciled key by key with what LMDB holds
 * (a failed put leaves the index, a failed delete comes back as least recently used);
 * only puts start eviction, so a store that fails every write cannot loop.
 *
 * Map full. If a batch still hits MDB_MAP_FULL (the budget is too close to the map, or
 * unbounded), the worker deletes the oldest quarter of the manifests by their recorded
 * access time, in one txn, and retries; it hands the deleted keys to the loop, which
 * removes them from the index. This is a last resort, not the eviction policy.
 */
#include "archmirror/metastore.h"

#include <assert.h>
#include <errno.h>
#include <lmdb.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "archmirror/dirs.h"
#include "archmirror/dlist.h"
#include "archmirror/error.h"
#include "archmirror/le.h"
#include "archmirror/log.h"
#include "archmirror/metrics.h"
#include "archmirror/reference.h"
#include "archmirror/schema.h"

#define SCHEMA_VERSION 1u
#define VALUE_VERSION  1u
#define KIND_MANIFEST  1u
#define KIND_TAG       2u
#define KIND_PLATFORM  3u
#define HDR_LEN        24u

#define DB_FILE "meta.lmdb"
#define N_DBS   5

/* A batch is one transaction; bounding it keeps it far from MDB_TXN_FULL and keeps one
 * failure (which fails the whole batch) from taking too many writes with it. */
#define BATCH_MAX_OPS   1024u
#define BATCH_MAX_BYTES ((size_t)64 << 20)
/* Last-read times accumulated before they are written without waiting for other work,
 * and the most one batch carries. */
#define ACCESS_FLUSH_N   256u
#define ACCESS_BATCH_MAX 1024u
#define ACCESS_LEN       8u

#define HASH_INIT_BUCKETS 1024u

/* upstream \0 repo \0 digest (the longest last component). */
#define KEY_NATURAL_MAX (AM_REGISTRY_MAX + 1 + AM_NAME_MAX + 1 + AM_DIGEST_STR_MAX)
#define KEY_HASHED_MARK 0xffu

struct key {
    unsigned char buf[KEY_NATURAL_MAX];
    size_t len;
};

#define container_of(p, type, member) ((type *)((char *)(p)-offsetof(type, member)))

/* Intrusive circular doubly-linked lists with a head node. */
/* One manifest of the index. Loop thread only. */
struct entry {
    struct entry *hnext;   /* hash chain */
    struct am_dlink lru;   /* in ms->lru, least recently used first */
    struct am_dlink dirty; /* in ms->dirty while last_use_ms is not in "access" */
    uint64_t hash;
    uint64_t bytes; /* key and value length as stored */
    uint64_t last_use_ms;
    size_t klen;
    unsigned char key[];
};

/* One queued write. key and value live in data[], in that order. */
struct op {
    struct op *next;
    am_metastore_cb cb;
    void *arg;
    MDB_dbi dbi;
    bool del;      /* delete the key (a manifest: also its access record) */
    bool internal; /* an eviction or an access record: not a caller's write, not counted */
    size_t klen;
    size_t vlen;
    unsigned char data[];
};

struct op_list {
    struct op *head;
    struct op *tail;
    size_t n;
};

struct am_metastore {
    uv_loop_t *loop; /* kept */
    MDB_env *env;    /* owned; closed by the close work request */
    MDB_dbi dbi_manifests;
    MDB_dbi dbi_tags;
    MDB_dbi dbi_meta;
    MDB_dbi dbi_platforms;
    MDB_dbi dbi_access;
    MDB_txn *rtxn;          /* owned; the reset read txn reused by every get, or NULL */
    bool rtxn_live;         /* rtxn holds a snapshot until read_end */
    char *path;             /* owned; <dir>/meta.lmdb, for log lines */
    struct op_list pending; /* loop thread only */
    struct op_list batch;   /* the worker's while `running`; then the loop's */
    int batch_rc;           /* LMDB/errno result of the batch, written by the worker */
    struct op_list room;    /* the worker's: manifests it deleted in a full map (del ops) */
    uv_work_t work;         /* the one work request in flight (batch or close) */
    bool running;           /* a work request is in flight or its callbacks are running */
    bool closing;
    void (*close_done)(void *arg);
    void *close_arg;

    /* The index (see DESIGN); stats.manifests and stats.manifest_bytes are its totals. */
    struct entry **buckets; /* owned */
    size_t nbuckets;        /* a power of two */
    struct am_dlink lru;
    struct am_dlink dirty;
    size_t ndirty;
    uint64_t max_bytes, high_bytes, low_bytes; /* max_bytes 0: unbounded */

    struct am_metastore_stats stats;
};

/* ---- small helpers ---- */

/* Converts an LMDB or errno result, once, at the boundary. */
static int from_mdb(int rc)
{
    switch (rc) {
    case MDB_SUCCESS: return 0;
    case MDB_NOTFOUND: return AM_ENOT_FOUND;
    case MDB_MAP_FULL:
    case ENOSPC:
    case EDQUOT: return AM_ESTORE_FULL;
    case EACCES:
    case EPERM:
    case EROFS: return AM_ESTORE_READONLY;
    case ENOMEM: return AM_ENOMEM;
    default: return AM_ESTORE;
    }
}

/* A key component: 1..max bytes of printable ASCII without space. Returns its length or
 * 0 when invalid. */
static size_t component_len(const char *s, size_t max)
{
    if (!s) return 0;
    size_t n = strnlen(s, max + 1);
    if (n == 0 || n > max) return 0;
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)s[i] < 0x21 || (unsigned char)s[i] > 0x7e) return 0;
    return n;
}

/* Whether d holds a canonical digest (what am_digest_parse would produce). */
static bool digest_ok(const struct am_digest *d)
{
    struct am_digest tmp;
    if (!d) return false;
    size_t n = strnlen(d->str, sizeof d->str);
    return n < sizeof d->str && am_digest_parse(d->str, n, &tmp) == 0 && tmp.alg == d->alg;
}

/* Builds the key for (upstream, repo, last). Returns 0, AM_EINVAL or AM_ENOMEM (the
 * hash of an over-long key could not be computed). */
static int make_key(const struct am_metastore *ms, const char *upstream, const char *repo,
                    const char *last, size_t last_max, struct key *k)
{
    size_t ul = component_len(upstream, AM_REGISTRY_MAX);
    size_t rl = component_len(repo, AM_NAME_MAX);
    size_t ll = component_len(last, last_max);
    if (!ul || !rl || !ll) return AM_EINVAL;

    unsigned char *p = k->buf;
    memcpy(p, upstream, ul);
    p += ul;
    *p++ = '\0';
    memcpy(p, repo, rl);
    p += rl;
    *p++ = '\0';
    memcpy(p, last, ll);
    p += ll;
    k->len = (size_t)(p - k->buf);

    if (k->len > (size_t)mdb_env_get_maxkeysize(ms->env)) {
        struct am_digest h;
        am_digest_of(AM_DIGEST_SHA256, k->buf, k->len, &h);
        size_t hl = strlen(h.str);
        if (hl == 0) return AM_ENOMEM; /* digest.c fails closed on OpenSSL failure */
        k->buf[0] = KEY_HASHED_MARK;
        memcpy(k->buf + 1, h.str, hl);
        k->len = 1 + hl;
    }
    return 0;
}

/* ---- the index ---- */

/* FNV-1a. The keys end in digests or hashes, so this only has to be cheap. */
static uint64_t key_hash(const unsigned char *k, size_t n)
{
    uint64_t h = 0xcbf29ce484222325u;
    for (size_t i = 0; i < n; i++) {
        h ^= k[i];
        h *= 0x100000001b3u;
    }
    return h;
}

static struct entry *idx_find(const struct am_metastore *ms, const unsigned char *k, size_t n)
{
    if (!ms->nbuckets) return NULL;
    uint64_t h = key_hash(k, n);
    for (struct entry *e = ms->buckets[h & (ms->nbuckets - 1)]; e; e = e->hnext)
        if (e->hash == h && e->klen == n && memcmp(e->key, k, n) == 0) return e;
    return NULL;
}

/* Doubles the table; out of memory only makes the chains longer. */
static void idx_grow(struct am_metastore *ms)
{
    size_t nb = ms->nbuckets ? ms->nbuckets * 2 : HASH_INIT_BUCKETS;
    struct entry **b = calloc(nb, sizeof *b);
    if (!b) return;
    for (size_t i = 0; i < ms->nbuckets; i++) {
        for (struct entry *e = ms->buckets[i], *next; e; e = next) {
            next = e->hnext;
            e->hnext = b[e->hash & (nb - 1)];
            b[e->hash & (nb - 1)] = e;
        }
    }
    free(ms->buckets);
    ms->buckets = b;
    ms->nbuckets = nb;
}

/* The entry of key k, added (no bytes, not yet in the LRU list: the caller places it) if
 * there is none. NULL: out of memory. */
static struct entry *idx_get_or_add(struct am_metastore *ms, const unsigned char *k, size_t n)
{
    struct entry *e = idx_find(ms, k, n);
    if (e) return e;
    if (ms->stats.manifests >= ms->nbuckets) idx_grow(ms);
    if (!ms->nbuckets || !(e = malloc(sizeof *e + n))) return NULL;
    e->hash = key_hash(k, n);
    e->bytes = 0;
    e->last_use_ms = 0;
    e->klen = n;
    memcpy(e->key, k, n);
    am_dl_init(&e->lru);
    am_dl_init(&e->dirty);
    e->hnext = ms->buckets[e->hash & (ms->nbuckets - 1)];
    ms->buckets[e->hash & (ms->nbuckets - 1)] = e;
    ms->stats.manifests++;
    return e;
}

static void idx_set_bytes(struct am_metastore *ms, struct entry *e, uint64_t bytes)
{
    ms->stats.manifest_bytes = ms->stats.manifest_bytes - e->bytes + bytes;
    e->bytes = bytes;
}

static void clear_dirty(struct am_metastore *ms, struct entry *e)
{
    if (!am_dl_linked(&e->dirty)) return;
    am_dl_remove(&e->dirty);
    ms->ndirty--;
}

static void idx_remove(struct am_metastore *ms, struct entry *e)
{
    struct entry **pp = &ms->buckets[e->hash & (ms->nbuckets - 1)];
    while (*pp != e) pp = &(*pp)->hnext;
    *pp = e->hnext;
    am_dl_remove(&e->lru);
    clear_dirty(ms, e);
    idx_set_bytes(ms, e, 0);
    ms->stats.manifests--;
    free(e);
}

static void idx_free(struct am_metastore *ms)
{
    for (size_t i = 0; i < ms->nbuckets; i++) {
        for (struct entry *e = ms->buckets[i], *next; e; e = next) {
            next = e->hnext;
            free(e);
        }
    }
    free(ms->buckets);
    ms->buckets = NULL;
    ms->nbuckets = 0;
}

/* Makes e the most recently used at now_ms. A read's time waits on the dirty list for a
 * batch; a put writes its own (so `dirty` false also takes e off that list). */
static void idx_use(struct am_metastore *ms, struct entry *e, uint64_t now_ms, bool dirty)
{
    e->last_use_ms = now_ms;
    am_dl_remove(&e->lru);
    am_dl_push_tail(&ms->lru, &e->lru);
    if (!dirty) {
        clear_dirty(ms, e);
    } else if (!am_dl_linked(&e->dirty)) {
        am_dl_push_tail(&ms->dirty, &e->dirty);
        ms->ndirty++;
    }
}

/* The index's totals, for /metrics. */
static void publish(const struct am_metastore *ms)
{
    am_metrics_set_manifest_cache(ms->stats.manifest_bytes, ms->stats.manifests, ms->max_bytes);
}

/* ---- opening ---- */

/* Checks the schema version in an open "meta" DB. Returns 0, MDB_NOTFOUND (no version
 * recorded) or AM_ESTORE with msg filled. */
static int check_schema(MDB_txn *txn, MDB_dbi dbi, const char *path, char *msg, size_t msglen)
{
    MDB_val k = {.mv_size = 6, .mv_data = "schema"};
    MDB_val v;
    int rc = mdb_get(txn, dbi, &k, &v);
    if (rc == MDB_NOTFOUND) return rc;
    if (rc) {
        am_error_setmsg(msg, msglen, "%s: reading schema version: %s", path, mdb_strerror(rc));
        return from_mdb(rc) == AM_ENOMEM ? AM_ENOMEM : AM_ESTORE;
    }
    return am_schema_check(v.mv_data, v.mv_size, SCHEMA_VERSION, path, msg, msglen);
}

/* First open of a new file: creates the DBs and records the schema, in one write txn. */
static int create_dbs(struct am_metastore *ms, char *msg, size_t msglen)
{
    MDB_txn *txn = NULL;
    const char *what = "beginning the first transaction";
    int rc = mdb_txn_begin(ms->env, NULL, 0, &txn);
    if (rc) goto fail;
    what = "creating the databases";
    if ((rc = mdb_dbi_open(txn, "meta", MDB_CREATE, &ms->dbi_meta)) ||
        (rc = mdb_dbi_open(txn, "manifests", MDB_CREATE, &ms->dbi_manifests)) ||
        (rc = mdb_dbi_open(txn, "tags", MDB_CREATE, &ms->dbi_tags)) ||
        (rc = mdb_dbi_open(txn, "platforms", MDB_CREATE, &ms->dbi_platforms)) ||
        (rc = mdb_dbi_open(txn, "access", MDB_CREATE, &ms->dbi_access)))
        goto fail;
    int src = check_schema(txn, ms->dbi_meta, ms->path, msg, msglen);
    if (src == MDB_NOTFOUND) {
        unsigned char ver[4] = {SCHEMA_VERSION & 0xff, 0, 0, 0};
        MDB_val k = {.mv_size = 6, .mv_data = "schema"};
        MDB_val v = {.mv_size = sizeof ver, .mv_data = ver};
        what = "recording the schema version";
        if ((rc = mdb_put(txn, ms->dbi_meta, &k, &v, 0))) goto fail;
    } else if (src) {
        mdb_txn_abort(txn);
        return src;
    }
    what = "committing the first transaction";
    rc = mdb_txn_commit(txn);
    txn = NULL;
    if (rc) goto fail;
    return 0;

fail:
    if (txn) mdb_txn_abort(txn);
    am_error_setmsg(msg, msglen, "%s: %s: %s", ms->path, what, mdb_strerror(rc));
    return from_mdb(rc) == AM_ENOT_FOUND ? AM_ESTORE : from_mdb(rc);
}

/* Adds the "platforms" and/or "access" DB to a file made before they existed: one small
 * write txn, once. */
static int add_dbs(struct am_metastore *ms, bool platforms, bool access, char *msg, size_t msglen)
{
    MDB_txn *txn = NULL;
    int rc = mdb_txn_begin(ms->env, NULL, 0, &txn);
    if (!rc && platforms) rc = mdb_dbi_open(txn, "platforms", MDB_CREATE, &ms->dbi_platforms);
    if (!rc && access) rc = mdb_dbi_open(txn, "access", MDB_CREATE, &ms->dbi_access);
    if (!rc) {
        rc = mdb_txn_commit(txn);
        txn = NULL;
    }
    if (!rc) return 0;
    if (txn) mdb_txn_abort(txn);
    am_error_setmsg(msg, msglen, "%s: adding the %s database: %s", ms->path,
                    platforms && access ? "platforms and access"
                    : platforms         ? "platforms"
                                        : "access",
                    mdb_strerror(rc));
    rc = from_mdb(rc);
    return rc == AM_ENOT_FOUND ? AM_ESTORE : rc;
}

/* Opens the DBs of an existing file with a read txn (no write lock, no fsync); a file
 * without them yet goes to create_dbs. */
static int open_dbs(struct am_metastore *ms, char *msg, size_t msglen)
{
    MDB_txn *txn = NULL;
    int rc = mdb_txn_begin(ms->env, NULL, MDB_RDONLY, &txn);
    if (rc) {
        am_error_setmsg(msg, msglen, "%s: %s", ms->path, mdb_strerror(rc));
        return from_mdb(rc);
    }
    rc = mdb_dbi_open(txn, "meta", 0, &ms->dbi_meta);
    if (rc == MDB_NOTFOUND) {
        mdb_txn_abort(txn);
        return create_dbs(ms, msg, msglen);
    }
    if (rc) {
        am_error_setmsg(msg, msglen, "%s: opening the meta database: %s", ms->path,
                        mdb_strerror(rc));
        goto fail;
    }
    int src = check_schema(txn, ms->dbi_meta, ms->path, msg, msglen);
    if (src == MDB_NOTFOUND) {
        am_error_setmsg(msg, msglen, "%s: meta database without a schema version", ms->path);
        goto fail;
    }
    if (src) {
        mdb_txn_abort(txn);
        return src;
    }
    if ((rc = mdb_dbi_open(txn, "manifests", 0, &ms->dbi_manifests)) ||
        (rc = mdb_dbi_open(txn, "tags", 0, &ms->dbi_tags))) {
        am_error_setmsg(msg, msglen, "%s: opening the databases: %s", ms->path, mdb_strerror(rc));
        goto fail;
    }
    /* "platforms" and "access" came after the first release: a file without them gets
     * them below. */
    rc = mdb_dbi_open(txn, "platforms", 0, &ms->dbi_platforms);
    bool add_platforms = rc == MDB_NOTFOUND;
    if (rc && !add_platforms) {
        am_error_setmsg(msg, msglen, "%s: opening the platforms database: %s", ms->path,
                        mdb_strerror(rc));
        goto fail;
    }
    rc = mdb_dbi_open(txn, "access", 0, &ms->dbi_access);
    bool add_access = rc == MDB_NOTFOUND;
    if (rc && !add_access) {
        am_error_setmsg(msg, msglen, "%s: opening the access database: %s", ms->path,
                        mdb_strerror(rc));
        goto fail;
    }
    /* Commit, not abort: an aborted txn would close the DBI handles it opened. */
    rc = mdb_txn_commit(txn);
    txn = NULL;
    if (rc) {
        am_error_setmsg(msg, msglen, "%s: %s", ms->path, mdb_strerror(rc));
        goto fail;
    }
    if (add_platforms || add_access) return add_dbs(ms, add_platforms, add_access, msg, msglen);
    return 0;

fail:
    if (txn) mdb_txn_abort(txn);
    return rc == ENOMEM ? AM_ENOMEM : AM_ESTORE;
}

static struct op *op_new(MDB_dbi dbi, const unsigned char *key, size_t klen, size_t vlen,
                         am_metastore_cb cb, void *arg);
static void enqueue(struct am_metastore *ms, struct op *o);

static int cmp_last_use(const void *a, const void *b)
{
    const struct entry *x = *(struct entry *const *)a, *y = *(struct entry *const *)b;
    return x->last_use_ms < y->last_use_ms ? -1 : x->last_use_ms > y->last_use_ms;
}

/* Builds the index in one read txn: every manifest's key and length (the value's pages
 * are not read, except the header of a manifest without an access record), its last use
 * from "access", then the LRU list in that order. Access records without a manifest (an
 * older build deleted it) are queued for deletion. Returns 0, or AM_ENOMEM / AM_ESTORE
 * with msg filled; on failure the caller frees what was indexed. */
static int load_index(struct am_metastore *ms, char *msg, size_t msglen)
{
    MDB_txn *txn = NULL;
    MDB_cursor *cur = NULL;
    struct entry **all = NULL;
    struct op *orphans = NULL;
    size_t n = 0, cap = 0;
    MDB_val k, v, a;
    int rc = mdb_txn_begin(ms->env, NULL, MDB_RDONLY, &txn);
    if (rc || (rc = mdb_cursor_open(txn, ms->dbi_manifests, &cur))) goto fail;
    for (rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST); rc == 0;
         rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
        if (n == cap) {
            size_t ncap = cap ? cap * 2 : 1024;
            struct entry **na = realloc(all, ncap * sizeof *na);
            if (!na) goto nomem;
            all = na;
            cap = ncap;
        }
        struct entry *e = idx_get_or_add(ms, k.mv_data, k.mv_size);
        if (!e) goto nomem;
        idx_set_bytes(ms, e, (uint64_t)k.mv_size + v.mv_size);
        if (mdb_get(txn, ms->dbi_access, &k, &a) == 0 && a.mv_size == ACCESS_LEN)
            e->last_use_ms = am_le_get64(a.mv_data);
        else if (v.mv_size >= HDR_LEN)
            e->last_use_ms = am_le_get64((const unsigned char *)v.mv_data + 8); /* stored_at */
        all[n++] = e;
    }
    if (rc != MDB_NOTFOUND) goto fail;
    mdb_cursor_close(cur);
    cur = NULL;
    if ((rc = mdb_cursor_open(txn, ms->dbi_access, &cur))) goto fail;
    for (rc = mdb_cursor_get(cur, &k, &a, MDB_FIRST); rc == 0;
         rc = mdb_cursor_get(cur, &k, &a, MDB_NEXT)) {
        if (idx_find(ms, k.mv_data, k.mv_size)) continue;
        struct op *o = op_new(ms->dbi_access, k.mv_data, k.mv_size, 0, NULL, NULL);
        if (!o) goto nomem;
        o->del = o->internal = true;
        o->next = orphans;
        orphans = o;
    }
    if (rc != MDB_NOTFOUND) goto fail;
    mdb_cursor_close(cur);
    mdb_txn_abort(txn);

    if (n) qsort(all, n, sizeof *all, cmp_last_use); /* all is NULL for an empty store */
    for (size_t i = 0; i < n; i++) am_dl_push_tail(&ms->lru, &all[i]->lru);
    free(all);
    while (orphans) {
        struct op *o = orphans;
        orphans = o->next;
        enqueue(ms, o);
    }
    return 0;

nomem:
    rc = ENOMEM;
fail:
    if (cur) mdb_cursor_close(cur);
    if (txn) mdb_txn_abort(txn);
    free(all);
    while (orphans) {
        struct op *o = orphans;
        orphans = o->next;
        free(o);
    }
    am_error_setmsg(msg, msglen, "%s: reading the manifest index: %s", ms->path,
                    rc == ENOMEM ? "out of memory" : mdb_strerror(rc));
    return rc == ENOMEM ? AM_ENOMEM : AM_ESTORE;
}

int am_metastore_open(uv_loop_t *loop, const char *dir, uint64_t map_bytes,
                      struct am_metastore **out, char *msg, size_t msglen)
{
    struct am_metastore *ms = NULL;
    int rc, err;

    if (!loop || !dir || !out || map_bytes > SIZE_MAX) {
        am_error_setmsg(msg, msglen, "metastore: invalid arguments");
        return AM_EINVAL;
    }
    if ((err = am_dirs_make(dir)) != 0) {
        am_error_setmsg(msg, msglen, "%s: cannot create the data directory: %s", dir,
                        strerror(err));
        return from_mdb(err);
    }
    ms = calloc(1, sizeof *ms);
    if (!ms) goto nomem;
    ms->loop = loop;
    am_dl_init(&ms->lru);
    am_dl_init(&ms->dirty);
    size_t plen = strlen(dir) + sizeof "/" DB_FILE;
    if (!(ms->path = malloc(plen))) goto nomem;
    snprintf(ms->path, plen, "%s/%s", dir, DB_FILE);

    if ((err = mdb_env_create(&ms->env)) != 0) {
        ms->env = NULL;
        am_error_setmsg(msg, msglen, "%s: %s", ms->path, mdb_strerror(err));
        rc = from_mdb(err);
        goto fail;
    }
    if ((err = mdb_env_set_maxdbs(ms->env, N_DBS)) != 0 ||
        (map_bytes && (err = mdb_env_set_mapsize(ms->env, (size_t)map_bytes)) != 0) ||
        (err = mdb_env_open(ms->env, ms->path, MDB_NOSUBDIR | MDB_NOTLS, 0640)) != 0) {
        am_error_setmsg(msg, msglen, "%s: %s", ms->path, mdb_strerror(err));
        rc = from_mdb(err);
        if (rc == AM_ENOT_FOUND) rc = AM_ESTORE;
        goto fail;
    }
    /* Reader slots of a crashed earlier process would pin old pages forever. */
    int dead = 0;
    (void)mdb_reader_check(ms->env, &dead);
    if ((rc = open_dbs(ms, msg, msglen)) != 0 || (rc = load_index(ms, msg, msglen)) != 0) goto fail;
    publish(ms);
    *out = ms;
    return 0;

nomem:
    am_error_setmsg(msg, msglen, "metastore: out of memory");
    rc = AM_ENOMEM;
fail:
    if (ms) {
        if (ms->env) mdb_env_close(ms->env);
        idx_free(ms);
        free(ms->path);
        free(ms);
    }
    return rc;
}

/* ---- reads ---- */

/* The newest queued (not yet committed) write of key k to dbi, or NULL. A client that
 * was just answered from an upstream fetch asks again at once (containerd's HEAD, then
 * GET by digest): it must see what that fetch stored, not wait for the commit. The
 * worker only reads the batch's ops, and only the loop frees them, so scanning both
 * lists here is safe. */
static const struct op *find_queued(const struct am_metastore *ms, MDB_dbi dbi, const struct key *k)
{
    const struct op *found = NULL;
    const struct op *lists[2] = {ms->batch.head, ms->pending.head};
    for (int i = 0; i < 2; i++)
        for (const struct op *o = lists[i]; o; o = o->next)
            if (o->dbi == dbi && o->klen == k->len && memcmp(o->data, k->buf, k->len) == 0)
                found = o;
    return found;
}

/* Gets key from dbi in an LMDB snapshot, ignoring queued writes; as read_begin. */
static int read_stored(struct am_metastore *ms, MDB_dbi dbi, const struct key *k, MDB_val *v)
{
    int rc;
    if (ms->rtxn) {
        rc = mdb_txn_renew(ms->rtxn);
        if (rc) {
            mdb_txn_abort(ms->rtxn);
            ms->rtxn = NULL;
        }
    }
    if (!ms->rtxn && (rc = mdb_txn_begin(ms->env, NULL, MDB_RDONLY, &ms->rtxn)) != 0) {
        ms->rtxn = NULL;
        AM_WARN("metastore: %s: read transaction: %s", ms->path, mdb_strerror(rc));
        return from_mdb(rc) == AM_ENOMEM ? AM_ENOMEM : AM_ESTORE;
    }
    MDB_val kv = {.mv_size = k->len, .mv_data = (void *)k->buf};
    rc = mdb_get(ms->rtxn, dbi, &kv, v);
    if (rc == 0) {
        ms->rtxn_live = true;
        return 0;
    }
    mdb_txn_reset(ms->rtxn);
    if (rc == MDB_NOTFOUND) return AM_ENOT_FOUND;
    AM_WARN("metastore: %s: read: %s", ms->path, mdb_strerror(rc));
    return AM_ESTORE;
}

/* Gets key from dbi into a fresh view (a queued write, or an LMDB snapshot); the caller
 * must call read_end afterwards, and must not use the view after it. Returns 0,
 * AM_ENOT_FOUND (also: a queued delete) or AM_ESTORE/AM_ENOMEM. */
static int read_begin(struct am_metastore *ms, MDB_dbi dbi, const struct key *k, MDB_val *v)
{
    const struct op *q = find_queued(ms, dbi, k);
    if (q) {
        if (q->del) return AM_ENOT_FOUND;
        v->mv_size = q->vlen;
        v->mv_data = (void *)(q->data + q->klen);
        return 0;
    }
    return read_stored(ms, dbi, k, v);
}

/* Releases the snapshot; the handle is kept for the next read. */
static void read_end(struct am_metastore *ms)
{
    if (!ms->rtxn_live) return;
    ms->rtxn_live = false;
    mdb_txn_reset(ms->rtxn);
}

/* The parts of a value, pointing into the MDB_val it was decoded from. */
struct decoded {
    uint64_t time_ms;
    uint64_t size;
    const char *media_type;
    size_t mt_len;
    const char *digest;
    size_t digest_len;
    const unsigned char *body;
    size_t body_len;
};

/* Validates a value of the given kind. Returns 0 or AM_ESTORE (logged). */
static int decode_value(const struct am_metastore *ms, const MDB_val *v, unsigned kind,
                        struct decoded *d)
{
    const unsigned char *p = v->mv_data;
    const char *why = NULL;
    unsigned ver, k, mt_len, dg_len;
    size_t rest;

    if (v->mv_size < HDR_LEN) {
        why = "shorter than its header";
        goto bad;
    }
    ver = am_le_get16(p);
    k = p[2];
    mt_len = p[3];
    dg_len = p[4];
    if (ver != VALUE_VERSION) {
        why = "unknown format version";
        goto bad;
    }
    if (k != kind || p[5] || p[6] || p[7]) {
        why = "wrong kind or reserved bytes set";
        goto bad;
    }
    d->time_ms = am_le_get64(p + 8);
    d->size = am_le_get64(p + 16);
    rest = v->mv_size - HDR_LEN;
    if (mt_len > AM_MEDIATYPE_MAX || dg_len > AM_DIGEST_STR_MAX ||
        (kind == KIND_MANIFEST && dg_len != 0) || (kind == KIND_TAG && dg_len == 0) ||
        (size_t)mt_len + dg_len > rest) {
        why = "field lengths exceed the value";
        goto bad;
    }
    rest -= (size_t)mt_len + dg_len;
    if (kind == KIND_MANIFEST ? d->size != rest : rest != 0) {
        why = "length does not match its header";
        goto bad;
    }
    d->media_type = (const char *)p + HDR_LEN;
    d->mt_len = mt_len;
    if (memchr(d->media_type, '\0', mt_len)) {
        why = "NUL in media type";
        goto bad;
    }
    d->digest = d->media_type + mt_len;
    d->digest_len = dg_len;
    d->body = (const unsigned char *)d->digest + dg_len;
    d->body_len = rest;
    return 0;

bad:
    AM_WARN("metastore: %s: corrupt %s record (%zu bytes): %s", ms->path,
            kind == KIND_MANIFEST ? "manifest" : "tag", v->mv_size, why);
    return AM_ESTORE;
}

static void maybe_start(struct am_metastore *ms);

/* A manifest of k and vlen value bytes was read: the index learns its use. No write. */
static void note_read(struct am_metastore *ms, const struct key *k, size_t vlen)
{
    struct entry *e = idx_find(ms, k->buf, k->len);
    if (!e) {
        /* Only after a reconciliation that could not run (out of memory, a read error):
         * index what LMDB holds rather than leave it outside the budget. */
        if (!(e = idx_get_or_add(ms, k->buf, k->len))) return;
        idx_set_bytes(ms, e, (uint64_t)k->len + vlen);
        publish(ms);
    }
    idx_use(ms, e, am_metastore_now_ms(), true);
    if (ms->ndirty >= ACCESS_FLUSH_N) maybe_start(ms);
}

int am_metastore_get_manifest(struct am_metastore *ms, const char *upstream, const char *repo,
                              const struct am_digest *digest, struct am_manifest_rec *out)
{
    struct key k;
    MDB_val v;
    struct decoded d;
    char *bytes;
    size_t vlen;
    int rc;

    if (!out) return AM_EINVAL;
    memset(out, 0, sizeof *out);
    if (!ms) return AM_EINVAL;
    if (ms->closing) return AM_EUNAVAILABLE;
    if (!digest_ok(digest)) return AM_EINVAL;
    if ((rc = make_key(ms, upstream, repo, digest->str, AM_DIGEST_STR_MAX, &k))) return rc;
    if ((rc = read_begin(ms, ms->dbi_manifests, &k, &v))) return rc;
    /* From here the view v is live: every path goes through read_end. */
    if ((rc = decode_value(ms, &v, KIND_MANIFEST, &d))) goto done;
    /* +1: a NUL after the bytes, for string APIs; never counted in len. */
    bytes = malloc(d.body_len + 1);
    if (!bytes) {
        rc = AM_ENOMEM;
        goto done;
    }
    memcpy(bytes, d.body, d.body_len);
    bytes[d.body_len] = '\0';
    memcpy(out->media_type, d.media_type, d.mt_len);
    out->media_type[d.mt_len] = '\0';
    out->digest = *digest;
    out->bytes = bytes;
    out->len = d.body_len;
    out->stored_at_ms = d.time_ms;
done:
    vlen = v.mv_size;
    read_end(ms);
    if (rc == 0) note_read(ms, &k, vlen);
    return rc;
}

void am_manifest_rec_cleanup(struct am_manifest_rec *rec)
{
    if (!rec) return;
    free(rec->bytes);
    rec->bytes = NULL;
    rec->len = 0;
}

int am_metastore_get_tag(struct am_metastore *ms, const char *upstream, const char *repo,
                         const char *tag, struct am_tag_rec *out)
{
    struct key k;
    MDB_val v;
    struct decoded d;
    struct am_digest dg;
    int rc;

    if (!out) return AM_EINVAL;
    memset(out, 0, sizeof *out);
    if (!ms) return AM_EINVAL;
    if (ms->closing) return AM_EUNAVAILABLE;
    if ((rc = make_key(ms, upstream, repo, tag, AM_TAG_MAX, &k))) return rc;
    if ((rc = read_begin(ms, ms->dbi_tags, &k, &v))) return rc;
    /* From here the view v is live: every path goes through read_end. */
    if ((rc = decode_value(ms, &v, KIND_TAG, &d))) goto done;
    if (am_digest_parse(d.digest, d.digest_len, &dg) != 0) {
        AM_WARN("metastore: %s: corrupt tag record: invalid digest", ms->path);
        rc = AM_ESTORE;
        goto done;
    }
    out->digest = dg;
    memcpy(out->media_type, d.media_type, d.mt_len);
    out->media_type[d.mt_len] = '\0';
    out->size = d.size;
    out->fetched_at_ms = d.time_ms;
done:
    read_end(ms);
    return rc;
}

/* The four platform fields in value order. */
static char *platform_field(struct am_platform *p, int i)
{
    switch (i) {
    case 0: return p->os;
    case 1: return p->architecture;
    case 2: return p->variant;
    default: return p->os_version;
    }
}

/* A platform field as stored: at most AM_PLATFORM_FIELD_MAX printable ASCII bytes. */
static bool platform_field_ok(const char *s, size_t n)
{
    if (n > AM_PLATFORM_FIELD_MAX) return false;
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)s[i] < 0x20 || (unsigned char)s[i] > 0x7e) return false;
    return true;
}

/* Validates and decodes a platform value into out. Returns 0 or AM_ESTORE (logged). */
static int decode_platform(const struct am_metastore *ms, const MDB_val *v,
                           struct am_platform_rec *out)
{
    const unsigned char *p = v->mv_data;
    const char *why = NULL;
    size_t rest, at;
    unsigned dg_len;

    if (v->mv_size < HDR_LEN) {
        why = "shorter than its header";
        goto bad;
    }
    dg_len = p[4];
    if (am_le_get16(p) != VALUE_VERSION || p[2] != KIND_PLATFORM || p[3] || p[5] || p[6] || p[7]) {
        why = "wrong version, kind or reserved bytes";
        goto bad;
    }
    rest = v->mv_size - HDR_LEN;
    if (dg_len == 0 || dg_len > AM_DIGEST_STR_MAX || dg_len > rest ||
        am_le_get64(p + 16) != rest - dg_len) {
        why = "length does not match its header";
        goto bad;
    }
    if (am_digest_parse((const char *)p + HDR_LEN, dg_len, &out->config) != 0) {
        why = "invalid config digest";
        goto bad;
    }
    at = HDR_LEN + dg_len;
    for (int i = 0; i < 4; i++) {
        if (at >= v->mv_size || p[at] > v->mv_size - at - 1) {
            why = "platform fields exceed the value";
            goto bad;
        }
        size_t n = p[at];
        const char *s = (const char *)p + at + 1;
        if (!platform_field_ok(s, n)) {
            why = "invalid platform field";
            goto bad;
        }
        char *dst = platform_field(&out->platform, i);
        memcpy(dst, s, n);
        dst[n] = '\0';
        at += 1 + n;
    }
    if (at != v->mv_size) {
        why = "bytes after the platform fields";
        goto bad;
    }
    out->stored_at_ms = am_le_get64(p + 8);
    return 0;

bad:
    memset(out, 0, sizeof *out);
    AM_WARN("metastore: %s: corrupt platform record (%zu bytes): %s", ms->path, v->mv_size, why);
    return AM_ESTORE;
}

int am_metastore_get_platform(struct am_metastore *ms, const char *upstream, const char *repo,
                              const struct am_digest *manifest, struct am_platform_rec *out)
{
    struct key k;
    MDB_val v;
    int rc;

    if (!out) return AM_EINVAL;
    memset(out, 0, sizeof *out);
    if (!ms) return AM_EINVAL;
    if (ms->closing) return AM_EUNAVAILABLE;
    if (!digest_ok(manifest)) return AM_EINVAL;
    if ((rc = make_key(ms, upstream, repo, manifest->str, AM_DIGEST_STR_MAX, &k))) return rc;
    if ((rc = read_begin(ms, ms->dbi_platforms, &k, &v))) return rc;
    /* From here the view v is live: every path goes through read_end. */
    rc = decode_platform(ms, &v, out);
    read_end(ms);
    return rc;
}

bool am_metastore_tag_is_fresh(const struct am_tag_rec *rec, uint64_t now_ms, uint64_t window_ms)
{
    /* Written so that no subtraction can wrap: see the header for the rule. */
    return rec->fetched_at_ms <= now_ms && now_ms - rec->fetched_at_ms < window_ms;
}

uint64_t am_metastore_now_ms(void)
{
    struct timespec ts;
    if (clock_gettime(CLOCK_REALTIME, &ts) != 0 || ts.tv_sec < 0) return 0;
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

void am_metastore_get_stats(const struct am_metastore *ms, struct am_metastore_stats *out)
{
    *out = ms->stats;
}

/* ---- writes ---- */

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* When a manifest was last used, as the worker knows it: its access record, else the time
 * it was stored. */
static uint64_t stored_last_use(struct am_metastore *ms, MDB_txn *txn, MDB_val *k, const MDB_val *v)
{
    MDB_val a;
    if (mdb_get(txn, ms->dbi_access, k, &a) == 0 && a.mv_size == ACCESS_LEN)
        return am_le_get64(a.mv_data);
    return v->mv_size >= HDR_LEN ? am_le_get64((const unsigned char *)v->mv_data + 8) : 0;
}

/* Worker thread, when the map is full although the budget should have kept it from
 * filling (a budget too close to the map, or none): deletes the quarter of the manifests
 * used longest ago, by the times LMDB has (the index is the loop's), with their access
 * records, in one transaction, so the cache stays bounded by its map instead of refusing
 * every new manifest. Manifests are immutable and content-addressed: one evicted while
 * still in use is fetched again by digest on its next request. Tags are small and stay.
 * The deleted keys go to ms->room for the loop's index. Returns how many were deleted. */
static size_t evict_oldest_manifests(struct am_metastore *ms)
{
    MDB_txn *txn = NULL;
    MDB_cursor *cur = NULL;
    uint64_t *times = NULL;
    struct op_list room = {0};
    size_t n = 0, cap = 0;
    MDB_val k, v;
    if (mdb_txn_begin(ms->env, NULL, 0, &txn) || mdb_cursor_open(txn, ms->dbi_manifests, &cur))
        goto fail;
    for (int rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST); rc == 0;
         rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
        if (n == cap) {
            size_t ncap = cap ? cap * 2 : 1024;
            uint64_t *t = realloc(times, ncap * sizeof *t);
            if (!t) goto fail;
            times = t;
            cap = ncap;
        }
        times[n++] = stored_last_use(ms, txn, &k, &v);
    }
    if (n == 0) goto fail;
    qsort(times, n, sizeof *times, cmp_u64);
    uint64_t cutoff = times[n / 4];
    for (int rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST); rc == 0;
         rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
        if (stored_last_use(ms, txn, &k, &v) > cutoff) continue;
        struct op *o = op_new(ms->dbi_manifests, k.mv_data, k.mv_size, 0, NULL, NULL);
        if (!o) break;
        o->del = o->internal = true;
        int drc = mdb_del(txn, ms->dbi_access, &k, NULL);
        if ((drc != 0 && drc != MDB_NOTFOUND) || mdb_cursor_del(cur, 0) != 0) {
            free(o);
            goto fail; /* a half-done delete: abort them all */
        }
        if (room.tail)
            room.tail->next = o;
        else
            room.head = o;
        room.tail = o;
        room.n++;
    }
    mdb_cursor_close(cur);
    cur = NULL;
    int crc = mdb_txn_commit(txn);
    txn = NULL;
    if (crc) goto fail;
    free(times);
    ms->room = room;
    return room.n;

fail:
    if (cur) mdb_cursor_close(cur);
    if (txn) mdb_txn_abort(txn);
    free(times);
    while (room.head) {
        struct op *o = room.head;
        room.head = o->next;
        free(o);
    }
    return 0;
}

/* A one-record write (the time of the last eviction) that moves LMDB's txn id on. */
static int touch_meta(struct am_metastore *ms)
{
    MDB_txn *txn = NULL;
    unsigned char now[8];
    am_le_put64(now, am_metastore_now_ms());
    MDB_val k = {.mv_size = 10, .mv_data = (void *)"evicted_at"},
            v = {.mv_size = 8, .mv_data = now};
    int rc = mdb_txn_begin(ms->env, NULL, 0, &txn);
    if (rc == 0 && (rc = mdb_put(txn, ms->dbi_meta, &k, &v, 0)) == 0) return mdb_txn_commit(txn);
    if (txn) mdb_txn_abort(txn);
    return rc;
}

/* One write transaction for the whole batch; nothing of a failed batch is applied. A
 * manifest's access record is written and deleted with it. Worker thread: touches only
 * ms->env, the DBI handles (fixed since open) and ms->batch. */
static int write_batch(struct am_metastore *ms)
{
    MDB_txn *txn = NULL;
    int rc = mdb_txn_begin(ms->env, NULL, 0, &txn);
    for (struct op *o = ms->batch.head; rc == 0 && o; o = o->next) {
        MDB_val k = {.mv_size = o->klen, .mv_data = o->data};
        MDB_val v = {.mv_size = o->vlen, .mv_data = o->data + o->klen};
        bool manifest = o->dbi == ms->dbi_manifests;
        if (o->del) {
            rc = mdb_del(txn, o->dbi, &k, NULL);
            if (rc == MDB_NOTFOUND) rc = 0;
            if (rc == 0 && manifest &&
                (rc = mdb_del(txn, ms->dbi_access, &k, NULL)) == MDB_NOTFOUND)
                rc = 0;
        } else {
            rc = mdb_put(txn, o->dbi, &k, &v, 0);
            if (rc == 0 && manifest) {
                /* Stored counts as used: the header's stored_at_ms. */
                MDB_val a = {.mv_size = ACCESS_LEN, .mv_data = o->data + o->klen + 8};
                rc = mdb_put(txn, ms->dbi_access, &k, &a, 0);
            }
        }
    }
    if (txn) {
        if (rc == 0)
            rc = mdb_txn_commit(txn); /* frees txn whatever it returns */
        else
            mdb_txn_abort(txn);
    }
    return rc;
}

static void on_batch_work(uv_work_t *w)
{
    struct am_metastore *ms = w->data;
    int rc = write_batch(ms);
    if (rc == MDB_MAP_FULL) {
        size_t freed = evict_oldest_manifests(ms);
        /* LMDB reuses the pages a transaction freed only once a later transaction has
         * committed (the meta pages are double-buffered): commit a small one first. */
        if (freed && touch_meta(ms) == 0) rc = write_batch(ms);
    }
    ms->batch_rc = rc;
}

/* After a failed batch or a full-map eviction: makes the index entry of key kb agree with
 * what LMDB holds, unless a queued write of that key (which the index already reflects)
 * is still to come. A manifest that is back (its delete failed) is the next to go. */
static void reconcile(struct am_metastore *ms, const unsigned char *kb, size_t klen)
{
    struct key k;
    MDB_val v;
    if (ms->closing || klen > sizeof k.buf) return; /* no more reads once closing */
    memcpy(k.buf, kb, klen);
    k.len = klen;
    if (find_queued(ms, ms->dbi_manifests, &k)) return;
    struct entry *e = idx_find(ms, k.buf, k.len);
    int rc = read_stored(ms, ms->dbi_manifests, &k, &v);
    if (rc == AM_ENOT_FOUND) {
        if (e) idx_remove(ms, e);
        return;
    }
    if (rc) return;
    uint64_t bytes = (uint64_t)k.len + v.mv_size;
    read_end(ms);
    if (!e) {
        if (!(e = idx_get_or_add(ms, k.buf, k.len))) return;
        am_dl_push_head(&ms->lru, &e->lru);
    }
    idx_set_bytes(ms, e, bytes);
}

static void free_ops(struct op *o)
{
    while (o) {
        struct op *next = o->next;
        free(o);
        o = next;
    }
}

/* Loop thread: counts, logs once, and runs each op's callback with the batch's status. */
static void on_batch_done(uv_work_t *w, int uvstatus)
{
    struct am_metastore *ms = w->data;
    struct op_list done = ms->batch, room = ms->room;
    int mrc = uvstatus ? uvstatus : ms->batch_rc;
    int status = uvstatus ? AM_ESTORE : from_mdb(ms->batch_rc);
    size_t n_user = 0, n_access = 0;
    if (status == AM_ENOT_FOUND) status = AM_ESTORE;

    ms->batch = (struct op_list){0};
    ms->room = (struct op_list){0};
    ms->stats.write_txns++;
    for (struct op *o = done.head; o; o = o->next) {
        if (!o->internal)
            n_user++;
        else if (o->dbi == ms->dbi_access && !o->del)
            n_access++;
    }
    if (room.n) {
        AM_WARN("metastore: %s: map full: evicted the %zu manifests used longest ago "
                "(cache.manifest_max_size too close to metastore_map_size?)",
                ms->path, room.n);
        ms->stats.evicted_map_full += room.n;
        am_metrics_count_manifest_evictions(true, room.n);
        for (struct op *o = room.head; o; o = o->next) reconcile(ms, o->data, o->klen);
        free_ops(room.head);
    }
    if (status == 0) {
        ms->stats.committed += n_user;
        ms->stats.access_records += n_access;
    } else {
        ms->stats.failed += n_user;
        AM_WARN("metastore: %s: write of %zu record%s failed: %s (%s)", ms->path, done.n,
                done.n == 1 ? "" : "s", uvstatus ? uv_strerror(uvstatus) : mdb_strerror(mrc),
                am_error_name(status));
        for (struct op *o = done.head; o; o = o->next)
            if (o->dbi == ms->dbi_manifests) reconcile(ms, o->data, o->klen);
    }
    publish(ms);
    /* `running` stays set while the callbacks run, so puts they make queue for the next
     * batch instead of starting one per callback. */
    for (struct op *o = done.head, *next; o; o = next) {
        next = o->next;
        am_metastore_cb cb = o->cb;
        void *arg = o->arg;
        free(o);
        if (cb) cb(arg, status);
    }
    ms->running = false;
    maybe_start(ms);
}

/* Worker thread: no transaction can be open any more (rtxn was aborted at close). */
static void on_close_work(uv_work_t *w)
{
    struct am_metastore *ms = w->data;
    mdb_env_close(ms->env);
    ms->env = NULL;
}

static void on_close_done(uv_work_t *w, int uvstatus)
{
    struct am_metastore *ms = w->data;
    void (*done)(void *) = ms->close_done;
    void *arg = ms->close_arg;
    (void)uvstatus; /* never canceled: we never call uv_cancel */
    idx_free(ms);
    free(ms->path);
    free(ms);
    if (done) done(arg);
}

/* Moves up to ACCESS_BATCH_MAX read times from the dirty list into ops at the end of
 * *into. Closing cannot wait for memory: what cannot be copied then is dropped. */
static void take_access_records(struct am_metastore *ms, struct op_list *into)
{
    size_t n = 0;
    while (ms->ndirty > 0 && n < ACCESS_BATCH_MAX) {
        struct entry *e = container_of(ms->dirty.next, struct entry, dirty);
        struct op *o = op_new(ms->dbi_access, e->key, e->klen, ACCESS_LEN, NULL, NULL);
        if (!o) {
            if (ms->closing) {
                AM_WARN("metastore: %s: out of memory: %zu last-read times not written", ms->path,
                        ms->ndirty);
                while (ms->ndirty > 0)
                    clear_dirty(ms, container_of(ms->dirty.next, struct entry, dirty));
            }
            break;
        }
        o->internal = true;
        am_le_put64(o->data + o->klen, e->last_use_ms);
        clear_dirty(ms, e);
        if (into->tail)
            into->tail->next = o;
        else
            into->head = o;
        into->tail = o;
        into->n++;
        n++;
    }
}

/* Starts the next batch, or the close, if nothing runs. Loop thread. */
static void maybe_start(struct am_metastore *ms)
{
    struct op_list batch = {0};
    int rc;
    if (ms->running) return;
    ms->work.data = ms;
    /* Read times ride with any batch; alone only when enough have accumulated. They go
     * first: a put or delete of the same key later in the batch must win. */
    if (ms->ndirty > 0 && (ms->pending.head || ms->ndirty >= ACCESS_FLUSH_N || ms->closing))
        take_access_records(ms, &batch);
    if (ms->pending.head) {
        /* Move the first ops (at least one) from pending into the batch. */
        struct op *first = ms->pending.head, *o = first, *last = NULL;
        size_t n = 0, bytes = 0;
        while (o && (n == 0 || (n < BATCH_MAX_OPS && bytes + o->vlen <= BATCH_MAX_BYTES))) {
            bytes += o->vlen;
            n++;
            last = o;
            o = o->next;
        }
        last->next = NULL;
        ms->pending.head = o;
        ms->pending.n -= n;
        if (!o) ms->pending.tail = NULL;
        if (batch.tail)
            batch.tail->next = first;
        else
            batch.head = first;
        batch.tail = last;
        batch.n += n;
    }
    if (batch.head) {
        ms->batch = batch;
        ms->running = true;
        rc = uv_queue_work(ms->loop, &ms->work, on_batch_work, on_batch_done);
    } else if (ms->closing) {
        ms->running = true;
        rc = uv_queue_work(ms->loop, &ms->work, on_close_work, on_close_done);
    } else {
        return;
    }
    /* uv_queue_work fails only for a NULL work callback. */
    assert(rc == 0);
    (void)rc;
}

/* Queues o (owned by the store from here on) and kicks the writer. */
static void enqueue(struct am_metastore *ms, struct op *o)
{
    o->next = NULL;
    if (ms->pending.tail)
        ms->pending.tail->next = o;
    else
        ms->pending.head = o;
    ms->pending.tail = o;
    ms->pending.n++;
    if (!o->internal) ms->stats.puts++;
    maybe_start(ms);
}

/* Allocates an op with room for key and a value of vlen; copies the key. Thread-safe (the
 * worker allocates the ops of a full-map eviction). */
static struct op *op_new(MDB_dbi dbi, const unsigned char *key, size_t klen, size_t vlen,
                         am_metastore_cb cb, void *arg)
{
    if (vlen > SIZE_MAX - sizeof(struct op) - klen) return NULL;
    struct op *o = malloc(sizeof *o + klen + vlen);
    if (!o) return NULL;
    o->next = NULL;
    o->cb = cb;
    o->arg = arg;
    o->dbi = dbi;
    o->del = false;
    o->internal = false;
    o->klen = klen;
    o->vlen = vlen;
    memcpy(o->data, key, klen);
    return o;
}

/* Above the high watermark, queues deletes of the least recently used manifests until
 * the total is at most the low one. Loop thread; runs after each manifest put. */
static void maybe_evict(struct am_metastore *ms)
{
    size_t n = 0;
    uint64_t freed = 0;
    if (ms->closing || ms->max_bytes == 0 || ms->stats.manifest_bytes <= ms->high_bytes) return;
    while (ms->stats.manifest_bytes > ms->low_bytes && am_dl_linked(&ms->lru)) {
        struct entry *e = container_of(ms->lru.next, struct entry, lru);
        struct op *o = op_new(ms->dbi_manifests, e->key, e->klen, 0, NULL, NULL);
        if (!o) break; /* the next put tries again */
        o->del = o->internal = true;
        freed += e->bytes;
        n++;
        idx_remove(ms, e);
        enqueue(ms, o);
    }
    if (n == 0) return;
    ms->stats.evicted += n;
    ms->stats.evicted_bytes += freed;
    am_metrics_count_manifest_evictions(false, n);
    publish(ms);
    AM_INFO("metastore: %s: over the manifest budget: evicting the %zu least recently used "
            "(%llu bytes); %llu bytes in %llu manifests remain",
            ms->path, n, (unsigned long long)freed, (unsigned long long)ms->stats.manifest_bytes,
            (unsigned long long)ms->stats.manifests);
}

int am_metastore_set_budget(struct am_metastore *ms, uint64_t max_bytes, unsigned high_pct,
                            unsigned low_pct)
{
    if (!ms || high_pct < 1 || high_pct > 100 || low_pct < 1 || low_pct > high_pct)
        return AM_EINVAL;
    if (ms->closing) return AM_EUNAVAILABLE;
    ms->max_bytes = max_bytes;
    /* Divide last for small budgets; max_bytes * 100 cannot overflow below 2^57. */
    ms->high_bytes =
        max_bytes > UINT64_MAX / 100 ? max_bytes / 100 * high_pct : max_bytes * high_pct / 100;
    ms->low_bytes =
        max_bytes > UINT64_MAX / 100 ? max_bytes / 100 * low_pct : max_bytes * low_pct / 100;
    maybe_evict(ms);
    publish(ms);
    return 0;
}

static void encode_header(unsigned char *p, unsigned kind, size_t mt_len, size_t dg_len,
                          uint64_t time_ms, uint64_t size)
{
    am_le_put16(p, VALUE_VERSION);
    p[2] = (unsigned char)kind;
    p[3] = (unsigned char)mt_len;
    p[4] = (unsigned char)dg_len;
    p[5] = p[6] = p[7] = 0;
    am_le_put64(p + 8, time_ms);
    am_le_put64(p + 16, size);
}

int am_metastore_put_manifest(struct am_metastore *ms, const char *upstream, const char *repo,
                              const struct am_digest *digest, const char *media_type,
                              const char *bytes, size_t len, am_metastore_cb cb, void *arg)
{
    struct key k;
    int rc;

    if (!ms || !media_type || (!bytes && len)) return AM_EINVAL;
    if (ms->closing) return AM_EUNAVAILABLE;
    if (len > AM_METASTORE_MANIFEST_MAX) return AM_ETOO_LARGE;
    size_t mt_len = strnlen(media_type, AM_MEDIATYPE_MAX + 1);
    if (mt_len > AM_MEDIATYPE_MAX || !digest_ok(digest)) return AM_EINVAL;
    if ((rc = make_key(ms, upstream, repo, digest->str, AM_DIGEST_STR_MAX, &k))) return rc;

    size_t vlen = HDR_LEN + mt_len + len;
    /* A record over the low watermark would evict everything else, then itself. */
    if (ms->max_bytes && (uint64_t)k.len + vlen > ms->low_bytes) return AM_ETOO_LARGE;

    struct op *o = op_new(ms->dbi_manifests, k.buf, k.len, vlen, cb, arg);
    if (!o) return AM_ENOMEM;
    struct entry *e = idx_get_or_add(ms, k.buf, k.len);
    if (!e) {
        free(o);
        return AM_ENOMEM;
    }
    uint64_t now = am_metastore_now_ms();
    unsigned char *v = o->data + o->klen;
    encode_header(v, KIND_MANIFEST, mt_len, 0, now, len);
    memcpy(v + HDR_LEN, media_type, mt_len);
    if (len) memcpy(v + HDR_LEN + mt_len, bytes, len);
    idx_set_bytes(ms, e, (uint64_t)k.len + vlen);
    idx_use(ms, e, now, false); /* the put writes its own access record */
    enqueue(ms, o);
    maybe_evict(ms); /* queued behind the put: same batch, same order */
    publish(ms);
    return 0;
}

int am_metastore_put_tag(struct am_metastore *ms, const char *upstream, const char *repo,
                         const char *tag, const struct am_tag_rec *rec, am_metastore_cb cb,
                         void *arg)
{
    struct key k;
    int rc;

    if (!ms || !rec) return AM_EINVAL;
    if (ms->closing) return AM_EUNAVAILABLE;
    size_t mt_len = strnlen(rec->media_type, sizeof rec->media_type);
    if (mt_len > AM_MEDIATYPE_MAX || !digest_ok(&rec->digest)) return AM_EINVAL;
    size_t dg_len = strlen(rec->digest.str);
    if ((rc = make_key(ms, upstream, repo, tag, AM_TAG_MAX, &k))) return rc;

    struct op *o = op_new(ms->dbi_tags, k.buf, k.len, HDR_LEN + mt_len + dg_len, cb, arg);
    if (!o) return AM_ENOMEM;
    unsigned char *v = o->data + o->klen;
    encode_header(v, KIND_TAG, mt_len, dg_len, rec->fetched_at_ms, rec->size);
    memcpy(v + HDR_LEN, rec->media_type, mt_len);
    memcpy(v + HDR_LEN + mt_len, rec->digest.str, dg_len);
    enqueue(ms, o);
    return 0;
}

int am_metastore_put_platform(struct am_metastore *ms, const char *upstream, const char *repo,
                              const struct am_digest *manifest, const struct am_platform_rec *rec,
                              am_metastore_cb cb, void *arg)
{
    struct key k;
    size_t lens[4], body = 0;
    int rc;

    if (!ms || !rec) return AM_EINVAL;
    if (ms->closing) return AM_EUNAVAILABLE;
    if (!digest_ok(manifest) || !digest_ok(&rec->config)) return AM_EINVAL;
    struct am_platform pf = rec->platform; /* platform_field wants a mutable one */
    for (int i = 0; i < 4; i++) {
        const char *s = platform_field(&pf, i);
        lens[i] = strnlen(s, AM_PLATFORM_FIELD_MAX + 1);
        if (!platform_field_ok(s, lens[i])) return AM_EINVAL;
        body += 1 + lens[i];
    }
    size_t dg_len = strlen(rec->config.str);
    if ((rc = make_key(ms, upstream, repo, manifest->str, AM_DIGEST_STR_MAX, &k))) return rc;

    struct op *o = op_new(ms->dbi_platforms, k.buf, k.len, HDR_LEN + dg_len + body, cb, arg);
    if (!o) return AM_ENOMEM;
    unsigned char *v = o->data + o->klen;
    encode_header(v, KIND_PLATFORM, 0, dg_len, am_metastore_now_ms(), body);
    unsigned char *w = v + HDR_LEN;
    memcpy(w, rec->config.str, dg_len);
    w += dg_len;
    for (int i = 0; i < 4; i++) {
        *w++ = (unsigned char)lens[i];
        memcpy(w, platform_field(&pf, i), lens[i]);
        w += lens[i];
    }
    enqueue(ms, o);
    return 0;
}

void am_metastore_close(struct am_metastore *ms, void (*done)(void *arg), void *arg)
{
    assert(!ms->closing); /* closing twice is our bug */
    ms->closing = true;
    ms->close_done = done;
    ms->close_arg = arg;
    if (ms->rtxn) {
        mdb_txn_abort(ms->rtxn);
        ms->rtxn = NULL;
    }
    maybe_start(ms);
}

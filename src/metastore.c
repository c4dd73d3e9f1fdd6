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
 */
#include "archmirror/metastore.h"

#include <assert.h>
#include <errno.h>
#include <lmdb.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "archmirror/dirs.h"
#include "archmirror/error.h"
#include "archmirror/le.h"
#include "archmirror/log.h"
#include "archmirror/schema.h"
#include "archmirror/reference.h"

#define SCHEMA_VERSION 1u
#define VALUE_VERSION  1u
#define KIND_MANIFEST  1u
#define KIND_TAG       2u
#define KIND_PLATFORM  3u
#define HDR_LEN        24u

#define DB_FILE "meta.lmdb"
#define N_DBS   4

/* A batch is one transaction; bounding it keeps it far from MDB_TXN_FULL and keeps one
 * failure (which fails the whole batch) from taking too many writes with it. */
#define BATCH_MAX_OPS   1024u
#define BATCH_MAX_BYTES ((size_t)64 << 20)

/* upstream \0 repo \0 digest (the longest last component). */
#define KEY_NATURAL_MAX (AM_REGISTRY_MAX + 1 + AM_NAME_MAX + 1 + AM_DIGEST_STR_MAX)
#define KEY_HASHED_MARK 0xffu

struct key {
    unsigned char buf[KEY_NATURAL_MAX];
    size_t len;
};

/* One queued write. key and value live in data[], in that order. */
struct op {
    struct op *next;
    am_metastore_cb cb;
    void *arg;
    MDB_dbi dbi;
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
    MDB_txn *rtxn;          /* owned; the reset read txn reused by every get, or NULL */
    bool rtxn_live;         /* rtxn holds a snapshot until read_end */
    char *path;             /* owned; <dir>/meta.lmdb, for log lines */
    struct op_list pending; /* loop thread only */
    struct op_list batch;   /* the worker's while `running`; then the loop's */
    int batch_rc;           /* LMDB/errno result of the batch, written by the worker */
    size_t batch_evicted;   /* manifests the worker evicted to make room, this batch */
    uv_work_t work;         /* the one work request in flight (batch or close) */
    bool running;           /* a work request is in flight or its callbacks are running */
    bool closing;
    void (*close_done)(void *arg);
    void *close_arg;
    struct am_metastore_stats stats;
};

/* ---- small helpers ---- */

static void fill_msg(char *msg, size_t msglen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void fill_msg(char *msg, size_t msglen, const char *fmt, ...)
{
    if (!msg || msglen == 0) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, msglen, fmt, ap);
    va_end(ap);
}

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
        fill_msg(msg, msglen, "%s: reading schema version: %s", path, mdb_strerror(rc));
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
        (rc = mdb_dbi_open(txn, "platforms", MDB_CREATE, &ms->dbi_platforms)))
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
    fill_msg(msg, msglen, "%s: %s: %s", ms->path, what, mdb_strerror(rc));
    return from_mdb(rc) == AM_ENOT_FOUND ? AM_ESTORE : from_mdb(rc);
}

/* Adds the "platforms" DB to a file made before it existed: one small write txn, once. */
static int add_platforms_db(struct am_metastore *ms, char *msg, size_t msglen)
{
    MDB_txn *txn = NULL;
    int rc = mdb_txn_begin(ms->env, NULL, 0, &txn);
    if (!rc) rc = mdb_dbi_open(txn, "platforms", MDB_CREATE, &ms->dbi_platforms);
    if (!rc) {
        rc = mdb_txn_commit(txn);
        txn = NULL;
    }
    if (!rc) return 0;
    if (txn) mdb_txn_abort(txn);
    fill_msg(msg, msglen, "%s: adding the platforms database: %s", ms->path, mdb_strerror(rc));
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
        fill_msg(msg, msglen, "%s: %s", ms->path, mdb_strerror(rc));
        return from_mdb(rc);
    }
    rc = mdb_dbi_open(txn, "meta", 0, &ms->dbi_meta);
    if (rc == MDB_NOTFOUND) {
        mdb_txn_abort(txn);
        return create_dbs(ms, msg, msglen);
    }
    if (rc) {
        fill_msg(msg, msglen, "%s: opening the meta database: %s", ms->path, mdb_strerror(rc));
        goto fail;
    }
    int src = check_schema(txn, ms->dbi_meta, ms->path, msg, msglen);
    if (src == MDB_NOTFOUND) {
        fill_msg(msg, msglen, "%s: meta database without a schema version", ms->path);
        goto fail;
    }
    if (src) {
        mdb_txn_abort(txn);
        return src;
    }
    if ((rc = mdb_dbi_open(txn, "manifests", 0, &ms->dbi_manifests)) ||
        (rc = mdb_dbi_open(txn, "tags", 0, &ms->dbi_tags))) {
        fill_msg(msg, msglen, "%s: opening the databases: %s", ms->path, mdb_strerror(rc));
        goto fail;
    }
    /* "platforms" came after the first release: a file without it gets it below. */
    rc = mdb_dbi_open(txn, "platforms", 0, &ms->dbi_platforms);
    bool add_platforms = rc == MDB_NOTFOUND;
    if (rc && !add_platforms) {
        fill_msg(msg, msglen, "%s: opening the platforms database: %s", ms->path, mdb_strerror(rc));
        goto fail;
    }
    /* Commit, not abort: an aborted txn would close the DBI handles it opened. */
    rc = mdb_txn_commit(txn);
    txn = NULL;
    if (rc) {
        fill_msg(msg, msglen, "%s: %s", ms->path, mdb_strerror(rc));
        goto fail;
    }
    if (add_platforms) return add_platforms_db(ms, msg, msglen);
    return 0;

fail:
    if (txn) mdb_txn_abort(txn);
    return rc == ENOMEM ? AM_ENOMEM : AM_ESTORE;
}

int am_metastore_open(uv_loop_t *loop, const char *dir, uint64_t map_bytes,
                      struct am_metastore **out, char *msg, size_t msglen)
{
    struct am_metastore *ms = NULL;
    int rc, err;

    if (!loop || !dir || !out || map_bytes > SIZE_MAX) {
        fill_msg(msg, msglen, "metastore: invalid arguments");
        return AM_EINVAL;
    }
    if ((err = am_dirs_make(dir)) != 0) {
        fill_msg(msg, msglen, "%s: cannot create the data directory: %s", dir, strerror(err));
        return from_mdb(err);
    }
    ms = calloc(1, sizeof *ms);
    if (!ms) goto nomem;
    ms->loop = loop;
    size_t plen = strlen(dir) + sizeof "/" DB_FILE;
    if (!(ms->path = malloc(plen))) goto nomem;
    snprintf(ms->path, plen, "%s/%s", dir, DB_FILE);

    if ((err = mdb_env_create(&ms->env)) != 0) {
        ms->env = NULL;
        fill_msg(msg, msglen, "%s: %s", ms->path, mdb_strerror(err));
        rc = from_mdb(err);
        goto fail;
    }
    if ((err = mdb_env_set_maxdbs(ms->env, N_DBS)) != 0 ||
        (map_bytes && (err = mdb_env_set_mapsize(ms->env, (size_t)map_bytes)) != 0) ||
        (err = mdb_env_open(ms->env, ms->path, MDB_NOSUBDIR | MDB_NOTLS, 0640)) != 0) {
        fill_msg(msg, msglen, "%s: %s", ms->path, mdb_strerror(err));
        rc = from_mdb(err);
        if (rc == AM_ENOT_FOUND) rc = AM_ESTORE;
        goto fail;
    }
    /* Reader slots of a crashed earlier process would pin old pages forever. */
    int dead = 0;
    (void)mdb_reader_check(ms->env, &dead);
    if ((rc = open_dbs(ms, msg, msglen)) != 0) goto fail;
    *out = ms;
    return 0;

nomem:
    fill_msg(msg, msglen, "metastore: out of memory");
    rc = AM_ENOMEM;
fail:
    if (ms) {
        if (ms->env) mdb_env_close(ms->env);
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

/* Gets key from dbi into a fresh view (a queued write, or an LMDB snapshot); the caller
 * must call read_end afterwards, and must not use the view after it. Returns 0,
 * AM_ENOT_FOUND or AM_ESTORE/AM_ENOMEM. */
static int read_begin(struct am_metastore *ms, MDB_dbi dbi, const struct key *k, MDB_val *v)
{
    int rc;
    const struct op *q = find_queued(ms, dbi, k);
    if (q) {
        v->mv_size = q->vlen;
        v->mv_data = (void *)(q->data + q->klen);
        return 0;
    }
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

int am_metastore_get_manifest(struct am_metastore *ms, const char *upstream, const char *repo,
                              const struct am_digest *digest, struct am_manifest_rec *out)
{
    struct key k;
    MDB_val v;
    struct decoded d;
    char *bytes;
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
    read_end(ms);
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

static void maybe_start(struct am_metastore *ms);

/* Worker thread: the whole batch in one write transaction. Touches only ms->env,
 * ms->batch and ms->batch_rc. */
static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* Worker thread, when the map is full: deletes the oldest quarter of the manifests (by
 * the time they were stored) in one transaction, so the cache stays bounded by its map
 * instead of refusing every new manifest. Manifests are immutable and content-addressed:
 * one evicted while still in use is fetched again by digest on its next request. Tags
 * are small and stay. Returns how many were deleted. */
static size_t evict_oldest_manifests(struct am_metastore *ms)
{
    MDB_txn *txn = NULL;
    MDB_cursor *cur = NULL;
    uint64_t *times = NULL;
    size_t n = 0, cap = 0, deleted = 0;
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
        times[n++] = v.mv_size >= HDR_LEN ? am_le_get64((const unsigned char *)v.mv_data + 8) : 0;
    }
    if (n == 0) goto fail;
    qsort(times, n, sizeof *times, cmp_u64);
    uint64_t cutoff = times[n / 4];
    for (int rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST); rc == 0;
         rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
        uint64_t t = v.mv_size >= HDR_LEN ? am_le_get64((const unsigned char *)v.mv_data + 8) : 0;
        if (t <= cutoff && mdb_cursor_del(cur, 0) == 0) deleted++;
    }
    mdb_cursor_close(cur);
    cur = NULL;
    if (mdb_txn_commit(txn)) deleted = 0;
    txn = NULL;
fail:
    if (cur) mdb_cursor_close(cur);
    if (txn) mdb_txn_abort(txn);
    free(times);
    return deleted;
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

/* One write transaction for the whole batch; nothing of a failed batch is applied. */
static int write_batch(struct am_metastore *ms)
{
    MDB_txn *txn = NULL;
    int rc = mdb_txn_begin(ms->env, NULL, 0, &txn);
    for (struct op *o = ms->batch.head; rc == 0 && o; o = o->next) {
        MDB_val k = {.mv_size = o->klen, .mv_data = o->data};
        MDB_val v = {.mv_size = o->vlen, .mv_data = o->data + o->klen};
        rc = mdb_put(txn, o->dbi, &k, &v, 0);
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
        ms->batch_evicted = freed;
        /* LMDB reuses the pages a transaction freed only once a later transaction has
         * committed (the meta pages are double-buffered): commit a small one first. */
        if (freed && touch_meta(ms) == 0) rc = write_batch(ms);
    }
    ms->batch_rc = rc;
}

/* Loop thread: counts, logs once, and runs each op's callback with the batch's status. */
static void on_batch_done(uv_work_t *w, int uvstatus)
{
    struct am_metastore *ms = w->data;
    struct op_list done = ms->batch;
    int mrc = uvstatus ? uvstatus : ms->batch_rc;
    int status = uvstatus ? AM_ESTORE : from_mdb(ms->batch_rc);
    if (status == AM_ENOT_FOUND) status = AM_ESTORE;

    ms->batch = (struct op_list){0};
    ms->stats.write_txns++;
    if (ms->batch_evicted) {
        AM_INFO("metastore: %s: map full: evicted the oldest %zu manifests", ms->path,
                ms->batch_evicted);
        ms->stats.evicted += ms->batch_evicted;
        ms->batch_evicted = 0;
    }
    if (status == 0) {
        ms->stats.committed += done.n;
    } else {
        ms->stats.failed += done.n;
        AM_WARN("metastore: %s: write of %zu record%s failed: %s (%s)", ms->path, done.n,
                done.n == 1 ? "" : "s", uvstatus ? uv_strerror(uvstatus) : mdb_strerror(mrc),
                am_error_name(status));
    }
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
    free(ms->path);
    free(ms);
    if (done) done(arg);
}

/* Starts the next batch, or the close, if nothing runs. Loop thread. */
static void maybe_start(struct am_metastore *ms)
{
    int rc;
    if (ms->running) return;
    ms->work.data = ms;
    if (ms->pending.head) {
        /* Move the first ops (at least one) from pending into the batch. */
        struct op *o = ms->pending.head, *last = NULL;
        size_t n = 0, bytes = 0;
        while (o && (n == 0 || (n < BATCH_MAX_OPS && bytes + o->vlen <= BATCH_MAX_BYTES))) {
            bytes += o->vlen;
            n++;
            last = o;
            o = o->next;
        }
        ms->batch = (struct op_list){.head = ms->pending.head, .tail = last, .n = n};
        last->next = NULL;
        ms->pending.head = o;
        ms->pending.n -= n;
        if (!o) ms->pending.tail = NULL;
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
    ms->stats.puts++;
    maybe_start(ms);
}

/* Allocates an op with room for key and a value of vlen; copies the key. */
static struct op *op_new(MDB_dbi dbi, const struct key *k, size_t vlen, am_metastore_cb cb,
                         void *arg)
{
    if (vlen > SIZE_MAX - sizeof(struct op) - k->len) return NULL;
    struct op *o = malloc(sizeof *o + k->len + vlen);
    if (!o) return NULL;
    o->next = NULL;
    o->cb = cb;
    o->arg = arg;
    o->dbi = dbi;
    o->klen = k->len;
    o->vlen = vlen;
    memcpy(o->data, k->buf, k->len);
    return o;
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

    struct op *o = op_new(ms->dbi_manifests, &k, HDR_LEN + mt_len + len, cb, arg);
    if (!o) return AM_ENOMEM;
    unsigned char *v = o->data + o->klen;
    encode_header(v, KIND_MANIFEST, mt_len, 0, am_metastore_now_ms(), len);
    memcpy(v + HDR_LEN, media_type, mt_len);
    if (len) memcpy(v + HDR_LEN + mt_len, bytes, len);
    enqueue(ms, o);
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

    struct op *o = op_new(ms->dbi_tags, &k, HDR_LEN + mt_len + dg_len, cb, arg);
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

    struct op *o = op_new(ms->dbi_platforms, &k, HDR_LEN + dg_len + body, cb, arg);
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

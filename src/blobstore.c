/*
 * blobstore — the content-addressed blob store; see include/archmirror/blobstore.h.
 *
 * This module must never make the loop wait on a data write, an fsync, an unlink or an
 * LMDB write, never put a byte at a content address before the whole blob is verified
 * and fsynced, and never unlink a blob under an open reader.
 *
 * DESIGN
 *
 * Index. The loop thread keeps every blob in memory (struct blob, about 250 bytes): a
 * hash table by digest, an LRU list of the visible blobs (head = least recently used),
 * and a list of blobs whose access record has not reached LMDB yet. The index, not LMDB,
 * is the truth while the store is open; LMDB is its durable copy, rewritten from it.
 * A blob's state:
 *   FINALIZING  a commit is fsyncing and renaming it (invisible, not counted)
 *   PRESENT     at its address, visible, counted in bytes_used, on the LRU list
 *   DOOMED      deleted while readers had it open: invisible, unlinked at last close
 *   UNLINKING   queued for, or in, the reaper's unlink (invisible)
 * FINALIZING and UNLINKING mean a worker is about to touch the blob's path, so a commit
 * of the same digest waits on the blob (its `waiters`) until that settles; this per-digest
 * ordering on the loop is why a plain rename(2) is enough. A commit that finds the blob
 * PRESENT removes its own temp file and reports 0. One that finds it DOOMED renames its
 * verified file over the deleted one (whose readers keep the old inode) and takes the
 * blob over, cancelling its unlink: a deleted blob may have been damaged, so it is never
 * revived as it was.
 *
 * Writers. A writer owns one uv_fs_t used for one request at a time (open, then ordered
 * writes, then the final close) and one uv_work_t (finalize or discard). Appends are
 * hashed on the loop as they arrive and queued as chunks; one pwritev at a time gathers
 * up to WRITE_MAX_BUFS queued chunks at offset `written`, and a short write is resumed
 * where it stopped, so the file always holds exactly the first `written` bytes. Commit
 * drains the queue, compares size and digest on the loop, then one work request fsyncs
 * the file, mkdirs the <hh> directory, renames the file into place and fsyncs the
 * directory (and its parent when the directory is new). The blob becomes PRESENT when
 * that work returns; its metadata is then queued to LMDB; the temp fd is closed
 * (uv_fs_close) after the metadata write, so that followers can dup it until then; then
 * the commit's callback runs. Any failure goes to the discard work: close the fd, unlink
 * the temp file (only if our open created it), release the queued chunks, callback.
 *
 * Crash safety. The ordering above means the only states a crash can leave are: a temp
 * file (removed at startup), a verified and fsynced blob without metadata (crash between
 * rename and the LMDB commit), or metadata without a blob (crash between an unlink and
 * its LMDB delete). Startup therefore ADOPTS a correctly named file without metadata,
 * taking its size from stat: only a verified file is ever renamed to a content address,
 * so no rehash is needed (rehashing a large cache at every start would be too slow), and
 * the size is recorded so later damage is noticed. Metadata without a file is deleted. A
 * file whose size differs from its metadata was damaged outside archmirror and is removed
 * with its record. A file in the tree that is not named like a blob of its directory is
 * removed. Records that do not decode are deleted (their file, if any, is adopted).
 *
 * Readers. am_blobstore_open runs open(2) and fstat(2) on the loop: both are metadata
 * operations on an existing file, like an LMDB read, and the caller needs the fd at once.
 * A size that no longer matches drops the blob instead of serving it. The reader count
 * per blob keeps eviction away (it skips blobs being read) and defers deletion.
 *
 * Eviction. After a commit, a reader's last close, and at startup: once bytes_used has
 * exceeded the high watermark, the LRU list is walked from its head and blobs without
 * readers are moved to UNLINKING until bytes_used is at most the low watermark; a pass
 * that stops short because the rest is being read resumes at the next reader's close.
 * The reaper unlinks the queued blobs in one work request at a time, then queues their
 * LMDB deletes (unlink first: a crash in between leaves metadata without a file, which
 * startup deletes). An unlink that fails other than ENOENT is logged; the blob leaves the
 * index and keeps its record, so the next startup reconciles it.
 *
 * Metadata. One env, <data_dir>/blobs.lmdb (MDB_NOSUBDIR, MDB_NOTLS), named DBs "meta"
 * ("schema" → u32 LE SCHEMA_VERSION; a newer version is refused) and "blobs": key = the
 * digest text ("sha256:…"), value, integers little-endian:
 *    0  u16  format version (VALUE_VERSION)
 *    2  u8   media type length m (<= AM_MEDIATYPE_MAX)
 *    3  u8*5 reserved, zero
 *    8  u64  size
 *   16  u64  stored_at_ms
 *   24  u64  last_access_ms
 *   32  u64  hits
 *   40  media type (m bytes, no NUL)
 * Writes go to a single writer on the thread pool that batches them into one transaction
 * (as in metastore.c): puts and deletes in the order they were queued, then the access
 * records of blobs read since the last batch, each a full record copied from the index at
 * batch time. Hits therefore cost no LMDB write on the loop; they are written with the next
 * batch, when ACCESS_FLUSH_N have accumulated, on am_blobstore_flush, and at close.
 *
 * Threads. Workers touch only what their request names (a writer's fd and paths, the
 * reaper's list, the batch) and read the store's immutable paths; everything else is the
 * loop's. No handle is ever created, so the loop can end as soon as the store is closed.
 */
#include "archmirror/blobstore.h"

#include <assert.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <lmdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#include "archmirror/dirs.h"
#include "archmirror/dlist.h"
#include "archmirror/error.h"
#include "archmirror/le.h"
#include "archmirror/log.h"
#include "archmirror/schema.h"

#define SCHEMA_VERSION 1u
#define VALUE_VERSION  1u
#define HDR_LEN        40u
#define DB_FILE        "blobs.lmdb"
#define N_DBS          2

/* Sparse, so only address space: about 200 bytes per blob fit ~5 million blobs. A full
 * map would fail metadata writes (and the adoption of those blobs at the next start). */
#define DEFAULT_MAP_BYTES ((uint64_t)1 << 30)
#define DEFAULT_HIGH_PCT  95u
#define DEFAULT_LOW_PCT   90u

/* One LMDB transaction: bounded so one failure cannot take too many writes with it. */
#define BATCH_MAX_OPS 1024u
/* Access records accumulated before they are written without waiting for other work. */
#define ACCESS_FLUSH_N 256u
/* Chunks gathered into one pwritev. */
#define WRITE_MAX_BUFS  64u
#define WRITE_MAX_SLICE ((size_t)1 << 30)

#define HASH_INIT_BUCKETS 1024u
#define ALG_LEN           6u /* "sha256", "sha512" */
/* <alg>/<hh>/<128 hex>, the longest part under blobs/. */
#define BLOB_REL_MAX (ALG_LEN + 1 + 2 + 1 + 128)
/* <pid>-<seq>-<16 hex>.part */
#define TMP_NAME_MAX 64u

#define container_of(p, type, member) ((type *)((char *)(p)-offsetof(type, member)))

/* ---- types ---- */

enum blob_state { B_FINALIZING, B_PRESENT, B_DOOMED, B_UNLINKING };

struct blob {
    struct blob *hnext;                  /* hash chain */
    struct am_dlink lru;                 /* in bs->lru while PRESENT */
    struct am_dlink dirty;               /* in bs->dirty while its access record is unwritten */
    struct blob *reap_next;              /* in the reaper's lists while UNLINKING */
    struct am_blobstore_writer *waiters; /* commits of this digest waiting for it to settle */
    char *media_type;                    /* owned, or NULL when unknown */
    uint64_t size;
    uint64_t stored_at_ms;
    uint64_t last_access_ms;
    uint64_t hits;
    unsigned readers;
    enum blob_state state;
    int unlink_err;    /* errno of the reaper's unlink, written by the worker */
    bool on_disk_only; /* startup: found on disk, no record yet */
    bool was_doomed;   /* FINALIZING over a deleted blob's file (see place) */
    struct am_digest digest;
};

/* One queued LMDB write; key then value in data[]. */
struct op {
    struct op *next;
    am_blobstore_cb cb; /* may be NULL */
    void *arg;
    bool del;
    size_t klen;
    size_t vlen;
    unsigned char data[];
};

struct op_list {
    struct op *head;
    struct op *tail;
    size_t n;
};

struct am_blobstore {
    uv_loop_t *loop; /* kept */
    MDB_env *env;    /* owned; closed by the close work request */
    MDB_dbi dbi_blobs;
    MDB_dbi dbi_meta;
    char *dir;     /* owned; <data_dir>/blobs (immutable: workers read it) */
    char *tmp_dir; /* owned; <data_dir>/blobs/tmp */
    char *db_path; /* owned; <data_dir>/blobs.lmdb, for log lines */
    uint64_t max_bytes, high_bytes, low_bytes;
    bool evict_wanted; /* over the high watermark since last under the low one */

    struct blob **buckets; /* owned */
    size_t nbuckets;       /* a power of two */
    size_t nindexed;       /* blobs in the hash, any state */
    struct am_dlink lru;   /* PRESENT blobs, least recently used first */
    struct am_dlink dirty; /* blobs with an unwritten access record */
    size_t ndirty;

    struct blob *reap_pending; /* UNLINKING, waiting for the reaper (loop's) */
    struct blob *reaping;      /* the worker's while reap_running */
    bool reap_running;
    uv_work_t reap_work;

    struct op_list pending; /* loop thread only */
    struct op_list batch;   /* the worker's while meta_running */
    int batch_rc;           /* LMDB/errno result of the batch, written by the worker */
    bool meta_running;
    bool flush_requested;
    uv_work_t meta_work; /* a batch, or the final env close */

    uint64_t tmp_seq;
    unsigned active_writers; /* begun, neither committed nor aborted */
    bool closing;
    bool close_started;
    void (*close_done)(void *arg);
    void *close_arg;
    struct am_blobstore_stats stats;
};

struct chunk {
    struct chunk *next;
    const unsigned char *data;
    size_t len;
    void (*release)(void *arg); /* NULL for a copied chunk */
    void *release_arg;
    unsigned char copy[]; /* the bytes of a copied chunk */
};

enum writer_end { W_ACTIVE, W_COMMITTED, W_ABORTED };
/* What happens after the queue has drained. */
enum writer_stage { S_NONE, S_FINALIZE, S_WAIT, S_META, S_CLOSE, S_DISCARD };

struct am_blobstore_writer {
    struct am_blobstore *bs;
    struct am_digest digest;
    int64_t expected; /* -1: unknown */
    char *media_type; /* owned or NULL; moves to the blob at commit */
    uv_file fd;       /* -1 until the open completes, and after the close */
    bool created;     /* our open created tmp_path: only then may we unlink it */
    bool fd_closing;  /* a close of fd is queued: no more dups */
    bool req_busy;    /* req (open or write) in flight */
    bool shared;      /* the commit found the blob already present */
    uv_fs_t req;
    uv_work_t work; /* finalize or discard */
    int work_errno; /* written by the worker */
    struct chunk *head, *tail;
    size_t head_off; /* bytes of head already written */
    uint64_t appended;
    uint64_t written;
    struct am_hasher hasher;
    int error; /* latched AM_E* */
    enum writer_end end;
    enum writer_stage stage;
    am_blobstore_cb cb;
    void *cb_arg;
    am_blobstore_written_cb on_written;
    void (*on_verified)(void *arg); /* once, when size and digest matched at commit */
    void *on_verified_arg;
    void *on_written_arg;
    struct am_blobstore_writer *wait_next; /* in a blob's waiters */
    struct blob *entry;                    /* the FINALIZING blob, during S_FINALIZE */
    char tmp_path[];
};

struct am_blobstore_reader {
    struct am_blobstore *bs;
    struct blob *blob;
    uv_file fd;
};

/* ---- small helpers ---- */

/* Converts an errno value, once, at the boundary. */
static int from_errno(int e)
{
    switch (e) {
    case 0: return 0;
    case ENOSPC:
    case EDQUOT:
    case EFBIG: return AM_ESTORE_FULL;
    case EROFS:
    case EACCES:
    case EPERM: return AM_ESTORE_READONLY;
    case ENOMEM: return AM_ENOMEM;
    case EMFILE:
    case ENFILE: return AM_EUNAVAILABLE;
    default: return AM_ESTORE;
    }
}

/* LMDB results are errno values or MDB_* codes. */
static int from_mdb(int rc)
{
    if (rc == MDB_MAP_FULL) return AM_ESTORE_FULL;
    if (rc == MDB_NOTFOUND) return AM_ENOT_FOUND;
    if (rc > 0) return from_errno(rc);
    return rc == 0 ? 0 : AM_ESTORE;
}

static uint64_t now_ms(void)
{
    struct timespec ts;
    if (clock_gettime(CLOCK_REALTIME, &ts) != 0 || ts.tv_sec < 0) return 0;
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* Whether d holds a canonical digest (what am_digest_parse would produce). */
static bool digest_ok(const struct am_digest *d)
{
    struct am_digest tmp;
    if (!d) return false;
    size_t n = strnlen(d->str, sizeof d->str);
    return n < sizeof d->str && am_digest_parse(d->str, n, &tmp) == 0 && tmp.alg == d->alg;
}

static bool is_lower_hex(char c)
{
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f');
}

/* The parts of a blob's path: what = 0 the file, 1 its <hh> directory, 2 the <alg> one. */
enum { P_FILE = 0, P_HH_DIR = 1, P_ALG_DIR = 2 };
static void blob_path(const struct am_blobstore *bs, const struct am_digest *d, int what, char *out,
                      size_t outlen)
{
    const char *hex = d->str + ALG_LEN + 1;
    if (what == P_ALG_DIR)
        snprintf(out, outlen, "%s/%.6s", bs->dir, d->str);
    else if (what == P_HH_DIR)
        snprintf(out, outlen, "%s/%.6s/%.2s", bs->dir, d->str, hex);
    else
        snprintf(out, outlen, "%s/%.6s/%.2s/%s", bs->dir, d->str, hex, hex);
}

/* fsync of a directory, so that an entry renamed or created in it is durable. Returns 0
 * or an errno value. Worker threads. */
static int fsync_dir(const char *path)
{
    int fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) return errno;
    int err = fsync(fd) == 0 ? 0 : errno;
    close(fd);
    /* Some filesystems cannot fsync a directory; their rename is durable without it. */
    return err == EINVAL ? 0 : err;
}

/* ---- the index ---- */

static size_t hash_digest(const struct am_digest *d)
{
    /* FNV-1a over the text. Only digests of content this store verified are indexed. */
    uint64_t h = 1469598103934665603u;
    for (const char *p = d->str; *p; p++) h = (h ^ (unsigned char)*p) * 1099511628211u;
    return (size_t)(h ^ (h >> 32));
}

static struct blob *index_find(const struct am_blobstore *bs, const struct am_digest *d)
{
    for (struct blob *b = bs->buckets[hash_digest(d) & (bs->nbuckets - 1)]; b; b = b->hnext)
        if (strcmp(b->digest.str, d->str) == 0) return b;
    return NULL;
}

/* Doubles the table when it is full; on out-of-memory keeps the old one (longer chains). */
static void index_grow(struct am_blobstore *bs)
{
    if (bs->nindexed < bs->nbuckets || bs->nbuckets > SIZE_MAX / 2 / sizeof(struct blob *)) return;
    size_t n = bs->nbuckets * 2;
    struct blob **nb = calloc(n, sizeof *nb);
    if (!nb) return;
    for (size_t i = 0; i < bs->nbuckets; i++) {
        for (struct blob *b = bs->buckets[i], *next; b; b = next) {
            next = b->hnext;
            size_t j = hash_digest(&b->digest) & (n - 1);
            b->hnext = nb[j];
            nb[j] = b;
        }
    }
    free(bs->buckets);
    bs->buckets = nb;
    bs->nbuckets = n;
}

/* Allocates a blob for d and puts it in the hash. Returns NULL on out-of-memory. */
static struct blob *index_add(struct am_blobstore *bs, const struct am_digest *d,
                              enum blob_state state)
{
    struct blob *b = calloc(1, sizeof *b);
    if (!b) return NULL;
    am_dl_init(&b->lru);
    am_dl_init(&b->dirty);
    b->digest = *d;
    b->state = state;
    index_grow(bs);
    size_t i = hash_digest(d) & (bs->nbuckets - 1);
    b->hnext = bs->buckets[i];
    bs->buckets[i] = b;
    bs->nindexed++;
    return b;
}

static void index_unlink(struct am_blobstore *bs, struct blob *b)
{
    struct blob **pp = &bs->buckets[hash_digest(&b->digest) & (bs->nbuckets - 1)];
    while (*pp != b) pp = &(*pp)->hnext;
    *pp = b->hnext;
    bs->nindexed--;
}

static void blob_free(struct blob *b)
{
    if (!b) return;
    free(b->media_type);
    free(b);
}

static void mark_dirty(struct am_blobstore *bs, struct blob *b)
{
    if (am_dl_linked(&b->dirty)) return;
    am_dl_push_tail(&bs->dirty, &b->dirty);
    bs->ndirty++;
}

static void clear_dirty(struct am_blobstore *bs, struct blob *b)
{
    if (!am_dl_linked(&b->dirty)) return;
    am_dl_remove(&b->dirty);
    bs->ndirty--;
}

/* Makes a blob visible: LRU tail (most recent), counted. */
static void make_present(struct am_blobstore *bs, struct blob *b)
{
    b->state = B_PRESENT;
    am_dl_push_tail(&bs->lru, &b->lru);
    bs->stats.bytes_used += b->size;
    bs->stats.blobs++;
}

/* Makes a PRESENT blob invisible (before DOOMED or UNLINKING). */
static void make_invisible(struct am_blobstore *bs, struct blob *b)
{
    assert(b->state == B_PRESENT);
    am_dl_remove(&b->lru);
    clear_dirty(bs, b);
    bs->stats.bytes_used -= b->size;
    bs->stats.blobs--;
}

/* ---- metadata records ---- */

static size_t record_len(const struct blob *b)
{
    return HDR_LEN + (b->media_type ? strlen(b->media_type) : 0);
}

static void record_encode(const struct blob *b, unsigned char *p)
{
    size_t m = b->media_type ? strlen(b->media_type) : 0;
    am_le_put16(p, VALUE_VERSION);
    p[2] = (unsigned char)m;
    memset(p + 3, 0, 5);
    am_le_put64(p + 8, b->size);
    am_le_put64(p + 16, b->stored_at_ms);
    am_le_put64(p + 24, b->last_access_ms);
    am_le_put64(p + 32, b->hits);
    if (m) memcpy(p + HDR_LEN, b->media_type, m);
}

struct record {
    uint64_t size, stored_at_ms, last_access_ms, hits;
    const char *media_type; /* a view into the value */
    size_t mt_len;
};

/* Validates a value. Returns 0 or AM_ESTORE. */
static int record_decode(const MDB_val *v, struct record *r)
{
    const unsigned char *p = v->mv_data;
    if (v->mv_size < HDR_LEN || am_le_get16(p) != VALUE_VERSION) return AM_ESTORE;
    for (int i = 3; i < 8; i++)
        if (p[i]) return AM_ESTORE;
    r->mt_len = p[2];
    if (v->mv_size != HDR_LEN + r->mt_len) return AM_ESTORE;
    r->size = am_le_get64(p + 8);
    r->stored_at_ms = am_le_get64(p + 16);
    r->last_access_ms = am_le_get64(p + 24);
    r->hits = am_le_get64(p + 32);
    r->media_type = (const char *)p + HDR_LEN;
    if (memchr(r->media_type, '\0', r->mt_len)) return AM_ESTORE;
    return 0;
}

/* ---- the metadata writer ---- */

static void meta_kick(struct am_blobstore *bs);
static void maybe_finish_close(struct am_blobstore *bs);

static struct op *op_new(const struct am_digest *d, size_t vlen, am_blobstore_cb cb, void *arg)
{
    size_t klen = strlen(d->str);
    struct op *o = malloc(sizeof *o + klen + vlen);
    if (!o) return NULL;
    o->next = NULL;
    o->cb = cb;
    o->arg = arg;
    o->del = false;
    o->klen = klen;
    o->vlen = vlen;
    memcpy(o->data, d->str, klen);
    return o;
}

/* A put of b's whole record, copied now. */
static struct op *op_put(const struct blob *b, am_blobstore_cb cb, void *arg)
{
    struct op *o = op_new(&b->digest, record_len(b), cb, arg);
    if (o) record_encode(b, o->data + o->klen);
    return o;
}

static void list_push(struct op_list *l, struct op *o)
{
    o->next = NULL;
    if (l->tail)
        l->tail->next = o;
    else
        l->head = o;
    l->tail = o;
    l->n++;
}

/* Queues o (owned by the store from here on) and kicks the writer. */
static void meta_enqueue(struct am_blobstore *bs, struct op *o)
{
    list_push(&bs->pending, o);
    meta_kick(bs);
}

/* Queues the delete of d's record, without a callback. */
static void meta_enqueue_del(struct am_blobstore *bs, const struct am_digest *d)
{
    struct op *o = op_new(d, 0, NULL, NULL);
    if (!o) {
        /* The record outlives its file; startup will delete it. */
        AM_WARN("blobstore: %s: out of memory queueing the metadata delete", d->str);
        return;
    }
    o->del = true;
    meta_enqueue(bs, o);
}

/* Worker: the whole batch in one write transaction. */
static void on_meta_work(uv_work_t *req)
{
    struct am_blobstore *bs = req->data;
    MDB_txn *txn = NULL;
    int rc = mdb_txn_begin(bs->env, NULL, 0, &txn);
    for (struct op *o = bs->batch.head; rc == 0 && o; o = o->next) {
        MDB_val k = {.mv_size = o->klen, .mv_data = o->data};
        if (o->del) {
            rc = mdb_del(txn, bs->dbi_blobs, &k, NULL);
            if (rc == MDB_NOTFOUND) rc = 0;
        } else {
            MDB_val v = {.mv_size = o->vlen, .mv_data = o->data + o->klen};
            rc = mdb_put(txn, bs->dbi_blobs, &k, &v, 0);
        }
    }
    if (txn) {
        if (rc == 0)
            rc = mdb_txn_commit(txn);
        else
            mdb_txn_abort(txn);
    }
    bs->batch_rc = rc;
}

static void on_meta_done(uv_work_t *req, int uvstatus)
{
    struct am_blobstore *bs = req->data;
    struct op_list done = bs->batch;
    int status = uvstatus ? AM_ESTORE : from_mdb(bs->batch_rc);
    if (status == AM_ENOT_FOUND) status = AM_ESTORE;

    bs->batch = (struct op_list){0};
    if (status) {
        bs->stats.meta_failures++;
        AM_WARN("blobstore: %s: write of %zu record%s failed: %s (%s)", bs->db_path, done.n,
                done.n == 1 ? "" : "s",
                uvstatus ? uv_strerror(uvstatus) : mdb_strerror(bs->batch_rc),
                am_error_name(status));
    }
    /* meta_running stays set while the callbacks run, so what they queue goes into the
     * next batch rather than one batch per callback. */
    for (struct op *o = done.head, *next; o; o = next) {
        next = o->next;
        am_blobstore_cb cb = o->cb;
        void *arg = o->arg;
        free(o);
        if (cb) cb(arg, status);
    }
    bs->meta_running = false;
    meta_kick(bs);
    maybe_finish_close(bs);
}

/* Starts a batch if none runs and there is something worth a transaction. Loop thread. */
static void meta_kick(struct am_blobstore *bs)
{
    if (bs->meta_running || bs->close_started) return;
    bool access_due =
        bs->ndirty > 0 && (bs->ndirty >= ACCESS_FLUSH_N || bs->flush_requested || bs->closing);
    if (!bs->pending.head && !access_due) return;

    struct op_list batch = {0};
    while (bs->pending.head && batch.n < BATCH_MAX_OPS) {
        struct op *o = bs->pending.head;
        bs->pending.head = o->next;
        if (!bs->pending.head) bs->pending.tail = NULL;
        bs->pending.n--;
        list_push(&batch, o);
    }
    /* Access records ride along, after the queued writes (a commit's put comes first). */
    while (bs->ndirty > 0 && batch.n < 2 * BATCH_MAX_OPS) {
        struct blob *b = container_of(bs->dirty.next, struct blob, dirty);
        struct op *o = op_put(b, NULL, NULL);
        if (!o) {
            if (bs->closing) {
                /* Closing cannot wait for memory: these access records are lost. */
                AM_WARN("blobstore: out of memory: %zu access records not written", bs->ndirty);
                while (bs->ndirty > 0)
                    clear_dirty(bs, container_of(bs->dirty.next, struct blob, dirty));
            }
            break;
        }
        clear_dirty(bs, b);
        list_push(&batch, o);
    }
    if (bs->ndirty == 0) bs->flush_requested = false;
    if (!batch.head) return;
    bs->batch = batch;
    bs->meta_running = true;
    bs->meta_work.data = bs;
    int rc = uv_queue_work(bs->loop, &bs->meta_work, on_meta_work, on_meta_done);
    assert(rc == 0); /* fails only for a NULL work callback */
    (void)rc;
}

void am_blobstore_flush(struct am_blobstore *bs)
{
    if (!bs || bs->ndirty == 0) return;
    bs->flush_requested = true;
    meta_kick(bs);
}

/* ---- the reaper (unlinks) and eviction ---- */

static void settle_waiters(struct blob *b);
static void maybe_evict(struct am_blobstore *bs);

static void on_reap_work(uv_work_t *req)
{
    struct am_blobstore *bs = req->data;
    char path[PATH_MAX];
    for (struct blob *b = bs->reaping; b; b = b->reap_next) {
        blob_path(bs, &b->digest, P_FILE, path, sizeof path);
        b->unlink_err = unlink(path) == 0 || errno == ENOENT ? 0 : errno;
    }
}

static void reap_kick(struct am_blobstore *bs);

static void on_reap_done(uv_work_t *req, int uvstatus)
{
    struct am_blobstore *bs = req->data;
    struct blob *list = bs->reaping;
    (void)uvstatus; /* never canceled: we never call uv_cancel */
    bs->reaping = NULL;
    bs->reap_running = false;
    for (struct blob *b = list, *next; b; b = next) {
        next = b->reap_next;
        if (b->unlink_err == 0) {
            meta_enqueue_del(bs, &b->digest);
        } else {
            /* Its record stays: the next startup reconciles the file with it. */
            AM_WARN("blobstore: %s: unlink failed: %s; left for the next startup", b->digest.str,
                    strerror(b->unlink_err));
        }
        index_unlink(bs, b);
        settle_waiters(b);
        blob_free(b);
    }
    reap_kick(bs);
    maybe_evict(bs);
    maybe_finish_close(bs);
}

static void reap_kick(struct am_blobstore *bs)
{
    if (bs->reap_running || !bs->reap_pending) return;
    bs->reaping = bs->reap_pending;
    bs->reap_pending = NULL;
    bs->reap_running = true;
    bs->reap_work.data = bs;
    int rc = uv_queue_work(bs->loop, &bs->reap_work, on_reap_work, on_reap_done);
    assert(rc == 0);
    (void)rc;
}

/* Queues an invisible blob without readers for unlinking. */
static void reap(struct am_blobstore *bs, struct blob *b)
{
    assert(b->readers == 0 && !am_dl_linked(&b->lru));
    b->state = B_UNLINKING;
    b->reap_next = bs->reap_pending;
    bs->reap_pending = b;
    reap_kick(bs);
}

/* Removes a PRESENT blob from view: unlinked now, or after its last reader closes. */
static void drop(struct am_blobstore *bs, struct blob *b)
{
    make_invisible(bs, b);
    bs->stats.deletions++;
    if (b->readers > 0)
        b->state = B_DOOMED;
    else
        reap(bs, b);
}

/* Hysteresis: a pass starts above the high watermark and the store keeps wanting to evict
 * until it is at or under the low one, so a pass cut short by blobs being read resumes
 * when one of their readers closes. */
static void maybe_evict(struct am_blobstore *bs)
{
    if (bs->closing || bs->max_bytes == 0) return;
    if (bs->stats.bytes_used > bs->high_bytes) bs->evict_wanted = true;
    if (!bs->evict_wanted) return;
    struct am_dlink *l = bs->lru.next;
    while (l != &bs->lru && bs->stats.bytes_used > bs->low_bytes) {
        struct blob *b = container_of(l, struct blob, lru);
        l = l->next;
        if (b->readers > 0) continue; /* never under a reader */
        make_invisible(bs, b);
        bs->stats.evictions++;
        bs->stats.evicted_bytes += b->size;
        AM_DEBUG("blobstore: evicting %s (%llu bytes)", b->digest.str, (unsigned long long)b->size);
        reap(bs, b);
    }
    if (bs->stats.bytes_used <= bs->low_bytes) bs->evict_wanted = false;
}

/* ---- writers ---- */

static void advance(struct am_blobstore_writer *w);
static void place(struct am_blobstore_writer *w);
static void start_finalize(struct am_blobstore_writer *w, struct blob *b);

static void notify(struct am_blobstore_writer *w, int status)
{
    if (w->end != W_ABORTED && w->on_written) w->on_written(w->on_written_arg, w->written, status);
}

/* Latches an asynchronous failure and tells the observer once. */
static void fail_async(struct am_blobstore_writer *w, int err)
{
    if (w->error) return;
    w->error = err;
    notify(w, err);
}

static void chunks_free(struct am_blobstore_writer *w)
{
    for (struct chunk *c = w->head, *next; c; c = next) {
        next = c->next;
        if (c->release) c->release(c->release_arg);
        free(c);
    }
    w->head = w->tail = NULL;
    w->head_off = 0;
}

/* Frees a writer that has reached its end; then runs the commit's callback, if any. */
static void writer_finish(struct am_blobstore_writer *w, int status)
{
    struct am_blobstore *bs = w->bs;
    bool call = w->end == W_COMMITTED;
    am_blobstore_cb cb = w->cb;
    void *arg = w->cb_arg;

    chunks_free(w);
    am_hasher_cleanup(&w->hasher);
    free(w->media_type);
    free(w);
    bs->stats.writers--;
    if (call) {
        if (status) bs->stats.commit_failures++;
        if (cb) cb(arg, status);
    }
    maybe_finish_close(bs);
}

static void on_open(uv_fs_t *req)
{
    struct am_blobstore_writer *w = req->data;
    ssize_t result = req->result;
    uv_fs_req_cleanup(req);
    w->req_busy = false;
    if (result < 0) {
        AM_WARN("blobstore: %s: %s: %s", w->digest.str, w->tmp_path, uv_strerror((int)result));
        fail_async(w, from_errno((int)-result));
    } else {
        w->fd = (uv_file)result;
        w->created = true;
        notify(w, 0);
    }
    advance(w);
}

static void on_write(uv_fs_t *req)
{
    struct am_blobstore_writer *w = req->data;
    ssize_t result = req->result;
    uv_fs_req_cleanup(req);
    w->req_busy = false;
    if (result <= 0) {
        /* 0 from a regular file would loop forever: treat it as an I/O error. */
        int e = result == 0 ? EIO : (int)-result;
        AM_WARN("blobstore: %s: writing %s: %s", w->digest.str, w->tmp_path, strerror(e));
        fail_async(w, from_errno(e));
        advance(w);
        return;
    }
    /* Consume what was written; a short write resumes inside its chunk. */
    size_t n = (size_t)result;
    w->written += n;
    while (n > 0) {
        struct chunk *c = w->head;
        size_t avail = c->len - w->head_off;
        if (n < avail) {
            w->head_off += n;
            break;
        }
        n -= avail;
        w->head = c->next;
        if (!w->head) w->tail = NULL;
        w->head_off = 0;
        if (c->release) c->release(c->release_arg);
        free(c);
    }
    notify(w, 0);
    advance(w);
}

/* Issues the next ordered write. Requires an open fd, no request in flight, a queue. */
static void pump(struct am_blobstore_writer *w)
{
    uv_buf_t bufs[WRITE_MAX_BUFS];
    unsigned n = 0;
    if (w->fd < 0 || w->req_busy || !w->head || w->error) return;
    for (struct chunk *c = w->head; c && n < WRITE_MAX_BUFS; c = c->next) {
        size_t off = c == w->head ? w->head_off : 0, left = c->len - off;
        /* uv_buf_t lengths are unsigned int: a huge chunk goes out in slices, alone. */
        bool slice = left > WRITE_MAX_SLICE;
        bufs[n++] = uv_buf_init((char *)c->data + off, (unsigned)(slice ? WRITE_MAX_SLICE : left));
        if (slice) break;
    }
    w->req.data = w;
    int rc = uv_fs_write(w->bs->loop, &w->req, w->fd, bufs, n, (int64_t)w->written, on_write);
    if (rc < 0) {
        /* Only for arguments libuv refuses. Latched without notifying: pump may run inside
         * an append, and callbacks never run from within a call. */
        w->error = from_errno(-rc);
        return;
    }
    w->req_busy = true;
}

static void on_discard_work(uv_work_t *req)
{
    struct am_blobstore_writer *w = req->data;
    w->work_errno = 0;
    if (w->fd >= 0) close(w->fd);
    if (w->created && unlink(w->tmp_path) != 0 && errno != ENOENT) w->work_errno = errno;
}

static void on_discard_done(uv_work_t *req, int uvstatus)
{
    struct am_blobstore_writer *w = req->data;
    (void)uvstatus;
    w->fd = -1;
    if (w->work_errno)
        AM_WARN("blobstore: %s: cannot remove %s: %s", w->digest.str, w->tmp_path,
                strerror(w->work_errno));
    if (w->shared) w->bs->stats.commits_shared++;
    writer_finish(w, w->shared ? 0 : w->error);
}

/* Closes the fd and removes the temp file (if ours) off the loop, then finishes. */
static void start_discard(struct am_blobstore_writer *w)
{
    w->stage = S_DISCARD;
    w->fd_closing = true;
    w->work.data = w;
    int rc = uv_queue_work(w->bs->loop, &w->work, on_discard_work, on_discard_done);
    assert(rc == 0);
    (void)rc;
}

static void on_close_fd(uv_fs_t *req)
{
    struct am_blobstore_writer *w = req->data;
    uv_fs_req_cleanup(req);
    w->fd = -1;
    writer_finish(w, 0);
}

/* The blob's metadata is written (or failed, which the batch logged): close the fd. */
static void on_commit_meta(void *arg, int status)
{
    struct am_blobstore_writer *w = arg;
    (void)status; /* the blob is in place either way; see the header */
    w->stage = S_CLOSE;
    w->fd_closing = true;
    w->req.data = w;
    if (uv_fs_close(w->bs->loop, &w->req, w->fd, on_close_fd) != 0) {
        /* Only for arguments libuv refuses; close here rather than leak the fd. */
        close(w->fd);
        w->fd = -1;
        writer_finish(w, 0);
    }
}

/* Worker: fsync, then rename into the content address, then make the rename durable. */
static void on_finalize_work(uv_work_t *req)
{
    struct am_blobstore_writer *w = req->data;
    const struct am_blobstore *bs = w->bs;
    char final[PATH_MAX], hh[PATH_MAX], alg[PATH_MAX];
    bool new_dir = false;
    int err = 0;

    if (fsync(w->fd) != 0) {
        err = errno;
        goto out;
    }
    blob_path(bs, &w->digest, P_FILE, final, sizeof final);
    blob_path(bs, &w->digest, P_HH_DIR, hh, sizeof hh);
    blob_path(bs, &w->digest, P_ALG_DIR, alg, sizeof alg);
    if (mkdir(hh, 0750) == 0) {
        new_dir = true;
    } else if (errno == ENOENT) {
        /* The <alg> directory itself went missing: recreate both. */
        if (mkdir(alg, 0750) != 0 && errno != EEXIST) {
            err = errno;
            goto out;
        }
        if (mkdir(hh, 0750) != 0 && errno != EEXIST) {
            err = errno;
            goto out;
        }
        new_dir = true;
    } else if (errno != EEXIST) {
        err = errno;
        goto out;
    }
    if (new_dir && (err = fsync_dir(alg)) != 0) goto out;
    if (rename(w->tmp_path, final) != 0) {
        err = errno;
        goto out;
    }
    if ((err = fsync_dir(hh)) != 0) {
        /* Not durable: take it back rather than report a blob that may vanish. */
        unlink(final);
        goto out;
    }
out:
    w->work_errno = err;
}

static void on_finalize_done(uv_work_t *req, int uvstatus)
{
    struct am_blobstore_writer *w = req->data;
    struct am_blobstore *bs = w->bs;
    struct blob *b = w->entry;
    (void)uvstatus;
    w->entry = NULL;
    w->stage = S_NONE;

    if (w->work_errno) {
        AM_WARN("blobstore: %s: committing %s: %s", w->digest.str, w->tmp_path,
                strerror(w->work_errno));
        w->error = from_errno(w->work_errno);
        if (b->readers > 0) {
            /* It replaced a deleted blob still being read: deleted it stays. */
            b->state = B_DOOMED;
            settle_waiters(b);
        } else if (b->was_doomed) {
            reap(bs, b); /* the deleted file may still be at the address */
        } else {
            index_unlink(bs, b);
            settle_waiters(b);
            blob_free(b);
        }
        start_discard(w);
        return;
    }
    b->was_doomed = false;
    b->size = w->appended;
    b->stored_at_ms = b->last_access_ms = now_ms();
    if (!b->media_type) {
        /* Never replaced once set: readers hold views of it until they close. */
        b->media_type = w->media_type;
        w->media_type = NULL;
    }
    make_present(bs, b);
    bs->stats.commits++;
    AM_DEBUG("blobstore: committed %s (%llu bytes)", b->digest.str, (unsigned long long)b->size);

    w->stage = S_META;
    struct op *o = op_put(b, on_commit_meta, w);
    if (o) {
        meta_enqueue(bs, o);
    } else {
        bs->stats.meta_failures++;
        AM_WARN("blobstore: %s: out of memory queueing its metadata; adopted at next startup",
                b->digest.str);
        on_commit_meta(w, AM_ENOMEM);
    }
    settle_waiters(b);
    maybe_evict(bs);
}

/* Queues the fsync and rename of a verified writer into FINALIZING blob b. */
static void start_finalize(struct am_blobstore_writer *w, struct blob *b)
{
    w->entry = b;
    w->stage = S_FINALIZE;
    w->work.data = w;
    int rc = uv_queue_work(w->bs->loop, &w->work, on_finalize_work, on_finalize_done);
    assert(rc == 0);
    (void)rc;
}

/* Runs the commits that waited for b to settle (b already out of the hash, or PRESENT). */
static void settle_waiters(struct blob *b)
{
    struct am_blobstore_writer *list = b->waiters;
    b->waiters = NULL;
    while (list) {
        struct am_blobstore_writer *w = list;
        list = w->wait_next;
        w->wait_next = NULL;
        w->stage = S_NONE;
        place(w);
    }
}

/* A verified writer: puts its blob in place, or finds it there, or waits for its digest. */
static void place(struct am_blobstore_writer *w)
{
    struct am_blobstore *bs = w->bs;
    struct blob *b = index_find(bs, &w->digest);

    if (b && b->state == B_PRESENT) {
        if (!b->media_type && w->media_type) {
            b->media_type = w->media_type; /* learnt now: record it with the next batch */
            w->media_type = NULL;
            mark_dirty(bs, b);
        }
        w->shared = true;
        start_discard(w);
        return;
    }
    if (b && b->state == B_DOOMED) {
        /* Deleted (perhaps found damaged) but still read: the verified file is renamed
         * over it, its readers keep the old inode, and its pending unlink is cancelled. */
        b->state = B_FINALIZING;
        b->was_doomed = true;
        start_finalize(w, b);
        return;
    }
    if (b) {
        /* FINALIZING or UNLINKING: a worker is about to touch this path. Wait, in order. */
        struct am_blobstore_writer **pp = &b->waiters;
        while (*pp) pp = &(*pp)->wait_next;
        *pp = w;
        w->stage = S_WAIT;
        return;
    }
    b = index_add(bs, &w->digest, B_FINALIZING);
    if (!b) {
        w->error = AM_ENOMEM;
        start_discard(w);
        return;
    }
    start_finalize(w, b);
}

/* Compares what was appended with what begin announced. */
static int verify(struct am_blobstore_writer *w)
{
    struct am_digest got;
    if (w->expected >= 0 && w->appended != (uint64_t)w->expected) {
        AM_WARN("blobstore: %s: %llu bytes, expected %lld; refused", w->digest.str,
                (unsigned long long)w->appended, (long long)w->expected);
        return AM_EDIGEST_MISMATCH;
    }
    am_hasher_final(&w->hasher, &got);
    if (!am_digest_equal(&got, &w->digest)) {
        AM_WARN("blobstore: %s: content hashes to %s; refused", w->digest.str,
                got.str[0] ? got.str : "(hash failed)");
        return AM_EDIGEST_MISMATCH;
    }
    return 0;
}

/* Moves the writer on from wherever it is; idempotent, safe to call after any event. */
static void advance(struct am_blobstore_writer *w)
{
    if (w->req_busy || w->stage != S_NONE) return;
    switch (w->end) {
    case W_ACTIVE:
        if (!w->error) pump(w);
        return;
    case W_ABORTED: start_discard(w); return;
    case W_COMMITTED:
        if (!w->error && w->head) {
            pump(w);
            if (w->req_busy) return;
        }
        if (!w->error) w->error = verify(w);
        if (w->error) {
            start_discard(w);
            return;
        }
        if (w->on_verified) {
            void (*cb)(void *) = w->on_verified;
            w->on_verified = NULL;
            cb(w->on_verified_arg); /* the bytes are right; durability follows */
        }
        place(w);
        return;
    }
}

int am_blobstore_begin(struct am_blobstore *bs, const struct am_digest *digest,
                       int64_t expected_size, struct am_blobstore_writer **out)
{
    struct am_blobstore_writer *w;
    unsigned char rnd[8] = {0};
    char name[TMP_NAME_MAX];
    int rc;

    if (!out) return AM_EINVAL;
    *out = NULL;
    if (!bs || !digest_ok(digest) || expected_size < -1) return AM_EINVAL;
    if (bs->closing) return AM_EUNAVAILABLE;
    if (bs->max_bytes && expected_size > 0 && (uint64_t)expected_size > bs->max_bytes)
        return AM_ETOO_LARGE;

    /* Unique within the directory: our pid and a counter; the random part keeps a
     * restarted process from meeting a name it used before a crash. O_EXCL checks. */
    if (getrandom(rnd, sizeof rnd, GRND_NONBLOCK) != (ssize_t)sizeof rnd) {
        uint64_t t = now_ms() ^ (uint64_t)(uintptr_t)&rnd;
        memcpy(rnd, &t, sizeof rnd);
    }
    snprintf(name, sizeof name, "%ld-%llu-%02x%02x%02x%02x%02x%02x%02x%02x.part", (long)getpid(),
             (unsigned long long)++bs->tmp_seq, rnd[0], rnd[1], rnd[2], rnd[3], rnd[4], rnd[5],
             rnd[6], rnd[7]);
    size_t plen = strlen(bs->tmp_dir) + 1 + strlen(name) + 1;
    if (!(w = calloc(1, sizeof *w + plen))) return AM_ENOMEM;
    snprintf(w->tmp_path, plen, "%s/%s", bs->tmp_dir, name);
    w->bs = bs;
    w->digest = *digest;
    w->expected = expected_size;
    w->fd = -1;
    if ((rc = am_hasher_init(&w->hasher, digest->alg)) != 0) {
        free(w);
        return rc;
    }
    w->req.data = w;
    rc = uv_fs_open(bs->loop, &w->req, w->tmp_path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0640,
                    on_open);
    if (rc < 0) {
        am_hasher_cleanup(&w->hasher);
        free(w);
        return from_errno(-rc);
    }
    w->req_busy = true;
    bs->stats.writers++;
    bs->active_writers++;
    *out = w;
    return 0;
}

int am_blobstore_writer_set_media_type(struct am_blobstore_writer *w, const char *mt)
{
    if (!w || !mt || w->end != W_ACTIVE) return AM_EINVAL;
    size_t n = strnlen(mt, AM_MEDIATYPE_MAX + 1);
    if (n > AM_MEDIATYPE_MAX) return AM_EINVAL;
    char *copy = NULL;
    if (n > 0 && !(copy = strdup(mt))) return AM_ENOMEM;
    free(w->media_type);
    w->media_type = copy;
    return 0;
}

void am_blobstore_writer_set_on_verified(struct am_blobstore_writer *w, void (*cb)(void *arg),
                                         void *arg)
{
    if (!w) return;
    w->on_verified = cb;
    w->on_verified_arg = arg;
}

void am_blobstore_writer_set_on_written(struct am_blobstore_writer *w, am_blobstore_written_cb cb,
                                        void *arg)
{
    if (!w) return;
    w->on_written = cb;
    w->on_written_arg = arg;
}

/* Checks and hashes an append; returns 0 or the (now latched) error. */
static int accept_bytes(struct am_blobstore_writer *w, const void *data, size_t len)
{
    if (w->error) return w->error;
    if (w->expected >= 0 && len > (uint64_t)w->expected - w->appended) {
        AM_WARN("blobstore: %s: more than the %lld bytes expected; refused", w->digest.str,
                (long long)w->expected);
        return w->error = AM_EDIGEST_MISMATCH;
    }
    if (w->bs->max_bytes && len > w->bs->max_bytes - w->appended) return w->error = AM_ETOO_LARGE;
    am_hasher_update(&w->hasher, data, len);
    w->appended += len;
    return 0;
}

static void queue_chunk(struct am_blobstore_writer *w, struct chunk *c)
{
    c->next = NULL;
    if (w->tail)
        w->tail->next = c;
    else
        w->head = c;
    w->tail = c;
    pump(w);
}

int am_blobstore_writer_append(struct am_blobstore_writer *w, const void *data, size_t len)
{
    if (!w || w->end != W_ACTIVE || (!data && len)) return AM_EINVAL;
    if (w->error) return w->error;
    if (len == 0) return 0;
    if (len > SIZE_MAX - sizeof(struct chunk)) return w->error = AM_ENOMEM;
    struct chunk *c = malloc(sizeof *c + len);
    if (!c) return w->error = AM_ENOMEM;
    int rc = accept_bytes(w, data, len);
    if (rc) {
        free(c);
        return rc;
    }
    memcpy(c->copy, data, len);
    c->data = c->copy;
    c->len = len;
    c->release = NULL;
    c->release_arg = NULL;
    queue_chunk(w, c);
    return 0;
}

int am_blobstore_writer_append_ref(struct am_blobstore_writer *w, const void *data, size_t len,
                                   void (*release)(void *arg), void *release_arg)
{
    if (!w || w->end != W_ACTIVE || !data || len == 0 || !release) return AM_EINVAL;
    if (w->error) return w->error;
    struct chunk *c = malloc(sizeof *c);
    if (!c) return w->error = AM_ENOMEM;
    int rc = accept_bytes(w, data, len);
    if (rc) {
        free(c);
        return rc;
    }
    c->data = data;
    c->len = len;
    c->release = release;
    c->release_arg = release_arg;
    queue_chunk(w, c);
    return 0;
}

uint64_t am_blobstore_writer_written_bytes(const struct am_blobstore_writer *w)
{
    return w->written;
}

uint64_t am_blobstore_writer_appended_bytes(const struct am_blobstore_writer *w)
{
    return w->appended;
}

int am_blobstore_writer_status(const struct am_blobstore_writer *w)
{
    return w->error;
}

const char *am_blobstore_writer_temp_path(const struct am_blobstore_writer *w)
{
    return w->tmp_path;
}

int am_blobstore_writer_open_reader(struct am_blobstore_writer *w, uv_file *fd)
{
    if (!w || !fd) return AM_EINVAL;
    *fd = -1;
    if (w->error) return w->error;
    if (w->fd < 0 || w->fd_closing) return AM_EUNAVAILABLE;
    int nfd = fcntl(w->fd, F_DUPFD_CLOEXEC, 0);
    if (nfd < 0) return errno == EMFILE || errno == ENFILE ? AM_EUNAVAILABLE : AM_ESTORE;
    *fd = nfd;
    return 0;
}

int am_blobstore_writer_commit(struct am_blobstore_writer *w, am_blobstore_cb cb, void *arg)
{
    if (!w || w->end != W_ACTIVE) return AM_EINVAL;
    w->end = W_COMMITTED;
    w->cb = cb;
    w->cb_arg = arg;
    w->bs->active_writers--;
    /* Every path from here ends in a work or fs request, so cb never runs in this call. */
    advance(w);
    return 0;
}

void am_blobstore_writer_abort(struct am_blobstore_writer *w)
{
    if (!w) return;
    assert(w->end == W_ACTIVE); /* aborting twice or after commit is our bug */
    w->end = W_ABORTED;
    w->bs->active_writers--;
    advance(w);
}

/* ---- readers ---- */

int am_blobstore_open(struct am_blobstore *bs, const struct am_digest *digest,
                      struct am_blobstore_reader **out)
{
    char path[PATH_MAX];
    struct stat st;

    if (!out) return AM_EINVAL;
    *out = NULL;
    if (!bs || !digest_ok(digest)) return AM_EINVAL;
    if (bs->closing) return AM_EUNAVAILABLE;
    struct blob *b = index_find(bs, digest);
    if (!b || b->state != B_PRESENT) {
        bs->stats.misses++;
        return AM_ENOT_FOUND;
    }
    blob_path(bs, digest, P_FILE, path, sizeof path);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        int e = errno;
        if (e != ENOENT) return from_errno(e);
        AM_WARN("blobstore: %s: file missing; dropped", digest->str);
        drop(bs, b);
        bs->stats.misses++;
        return AM_ENOT_FOUND;
    }
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || (uint64_t)st.st_size != b->size) {
        AM_WARN("blobstore: %s: file is not the %llu bytes committed; dropped", digest->str,
                (unsigned long long)b->size);
        close(fd);
        drop(bs, b);
        bs->stats.misses++;
        return AM_ENOT_FOUND;
    }
    struct am_blobstore_reader *r = malloc(sizeof *r);
    if (!r) {
        close(fd);
        return AM_ENOMEM;
    }
    r->bs = bs;
    r->blob = b;
    r->fd = fd;
    b->readers++;
    b->hits++;
    b->last_access_ms = now_ms();
    am_dl_remove(&b->lru);
    am_dl_push_tail(&bs->lru, &b->lru);
    mark_dirty(bs, b);
    bs->stats.hits++;
    bs->stats.readers++;
    meta_kick(bs);
    *out = r;
    return 0;
}

uv_file am_blobstore_reader_fd(const struct am_blobstore_reader *r)
{
    return r->fd;
}
uint64_t am_blobstore_reader_size(const struct am_blobstore_reader *r)
{
    return r->blob->size;
}

const char *am_blobstore_reader_media_type(const struct am_blobstore_reader *r)
{
    return r->blob->media_type ? r->blob->media_type : "";
}

void am_blobstore_close_reader(struct am_blobstore_reader *r)
{
    if (!r) return;
    struct am_blobstore *bs = r->bs;
    struct blob *b = r->blob;
    close(r->fd); /* a read-only fd: nothing to flush */
    free(r);
    bs->stats.readers--;
    assert(b->readers > 0);
    if (--b->readers > 0) return;
    if (b->state == B_DOOMED)
        reap(bs, b);
    else
        maybe_evict(bs); /* a pass may have skipped this blob for its reader */
}

int am_blobstore_stat(struct am_blobstore *bs, const struct am_digest *digest,
                      struct am_blobstore_info *out)
{
    if (!bs || !out || !digest_ok(digest)) return AM_EINVAL;
    struct blob *b = index_find(bs, digest);
    if (!b || b->state != B_PRESENT) return AM_ENOT_FOUND;
    out->size = b->size;
    snprintf(out->media_type, sizeof out->media_type, "%s", b->media_type ? b->media_type : "");
    out->stored_at_ms = b->stored_at_ms;
    out->last_access_ms = b->last_access_ms;
    out->hits = b->hits;
    out->readers = b->readers;
    return 0;
}

int am_blobstore_del(struct am_blobstore *bs, const struct am_digest *digest)
{
    if (!bs || !digest_ok(digest)) return AM_EINVAL;
    if (bs->closing) return AM_EUNAVAILABLE;
    struct blob *b = index_find(bs, digest);
    if (!b || b->state != B_PRESENT) return AM_ENOT_FOUND;
    drop(bs, b);
    return 0;
}

void am_blobstore_get_stats(const struct am_blobstore *bs, struct am_blobstore_stats *out)
{
    *out = bs->stats;
}

/* ---- closing ---- */

static void free_index(struct am_blobstore *bs)
{
    for (size_t i = 0; i < bs->nbuckets; i++) {
        for (struct blob *b = bs->buckets[i], *next; b; b = next) {
            next = b->hnext;
            blob_free(b);
        }
    }
    free(bs->buckets);
    bs->buckets = NULL;
}

static void store_free(struct am_blobstore *bs)
{
    if (!bs) return;
    if (bs->env) mdb_env_close(bs->env);
    free_index(bs);
    free(bs->dir);
    free(bs->tmp_dir);
    free(bs->db_path);
    free(bs);
}

static void on_close_work(uv_work_t *req)
{
    struct am_blobstore *bs = req->data;
    mdb_env_close(bs->env); /* may fsync: off the loop */
    bs->env = NULL;
}

static void on_close_done(uv_work_t *req, int uvstatus)
{
    struct am_blobstore *bs = req->data;
    void (*done)(void *) = bs->close_done;
    void *arg = bs->close_arg;
    (void)uvstatus;
    store_free(bs);
    if (done) done(arg);
}

/* Closes the env once nothing is left in flight. */
static void maybe_finish_close(struct am_blobstore *bs)
{
    if (!bs->closing || bs->close_started) return;
    if (bs->stats.writers || bs->reap_running || bs->reap_pending || bs->meta_running ||
        bs->pending.head || bs->ndirty)
        return;
    bs->close_started = true;
    bs->meta_work.data = bs;
    int rc = uv_queue_work(bs->loop, &bs->meta_work, on_close_work, on_close_done);
    assert(rc == 0);
    (void)rc;
}

void am_blobstore_close_store(struct am_blobstore *bs, void (*done)(void *arg), void *arg)
{
    assert(!bs->closing);            /* closing twice is our bug */
    assert(bs->active_writers == 0); /* every writer committed or aborted */
    assert(bs->stats.readers == 0);  /* every reader closed */
    bs->closing = true;
    bs->close_done = done;
    bs->close_arg = arg;
    meta_kick(bs); /* writes the access records */
    maybe_finish_close(bs);
}

/* ---- opening: LMDB ---- */

static int check_schema(MDB_txn *txn, MDB_dbi dbi, const char *path, char *msg, size_t msglen)
{
    MDB_val k = {.mv_size = 6, .mv_data = "schema"};
    MDB_val v;
    int rc = mdb_get(txn, dbi, &k, &v);
    if (rc == MDB_NOTFOUND) {
        unsigned char ver[4] = {SCHEMA_VERSION & 0xff, 0, 0, 0};
        MDB_val nv = {.mv_size = sizeof ver, .mv_data = ver};
        rc = mdb_put(txn, dbi, &k, &nv, 0);
        if (rc)
            am_error_setmsg(msg, msglen, "%s: recording the schema: %s", path, mdb_strerror(rc));
        return rc ? from_mdb(rc) : 0;
    }
    if (rc) {
        am_error_setmsg(msg, msglen, "%s: reading the schema version: %s", path, mdb_strerror(rc));
        return from_mdb(rc);
    }
    return am_schema_check(v.mv_data, v.mv_size, SCHEMA_VERSION, path, msg, msglen);
}

/* ---- opening: the files ---- */

/* Removes blobs/tmp/ *.part: writers of an earlier process that never finished. */
static int remove_stale_temps(struct am_blobstore *bs, char *msg, size_t msglen)
{
    DIR *d = opendir(bs->tmp_dir);
    if (!d) {
        am_error_setmsg(msg, msglen, "%s: %s", bs->tmp_dir, strerror(errno));
        return from_errno(errno);
    }
    struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        size_t n = strlen(de->d_name);
        if (n <= 5 || strcmp(de->d_name + n - 5, ".part") != 0) continue;
        if (unlinkat(dirfd(d), de->d_name, 0) == 0)
            bs->stats.startup_temp_removed++;
        else
            AM_WARN("blobstore: %s/%s: %s", bs->tmp_dir, de->d_name, strerror(errno));
    }
    closedir(d);
    return 0;
}

/* Removes a file that is not a blob of the directory it is in. */
static void remove_foreign(struct am_blobstore *bs, int dfd, const char *dir, const char *name)
{
    struct stat st;
    if (fstatat(dfd, name, &st, AT_SYMLINK_NOFOLLOW) != 0 || S_ISDIR(st.st_mode)) {
        AM_WARN("blobstore: %s/%s: unexpected directory, left alone", dir, name);
        return;
    }
    AM_WARN("blobstore: %s/%s: not a blob of this directory; removed", dir, name);
    if (unlinkat(dfd, name, 0) == 0) bs->stats.startup_removed++;
}

/* Indexes the files of one <alg>/<hh> directory. */
static int scan_hh(struct am_blobstore *bs, int algfd, const char *algdir, const char *hh,
                   enum am_digest_alg alg, size_t hexlen, char *msg, size_t msglen)
{
    char dir[PATH_MAX];
    int len = snprintf(dir, sizeof dir, "%s/%.2s", algdir, hh);
    if (len < 0 || (size_t)len >= sizeof dir) return AM_EINVAL; /* bounded at open_store */
    int fd = openat(algfd, hh, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    DIR *d = fd >= 0 ? fdopendir(fd) : NULL;
    if (!d) {
        int e = errno;
        if (fd >= 0) close(fd);
        am_error_setmsg(msg, msglen, "%s: %s", dir, strerror(e));
        return from_errno(e);
    }
    struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        const char *name = de->d_name;
        if (strcmp(name, ".") == 0 || strcmp(name, "..") == 0) continue;
        bool ok = strlen(name) == hexlen && name[0] == hh[0] && name[1] == hh[1];
        for (size_t i = 0; ok && i < hexlen; i++) ok = is_lower_hex(name[i]);
        struct stat st;
        if (!ok || fstatat(dirfd(d), name, &st, AT_SYMLINK_NOFOLLOW) != 0 || !S_ISREG(st.st_mode)) {
            remove_foreign(bs, dirfd(d), dir, name);
            continue;
        }
        struct am_digest dg;
        char text[AM_DIGEST_STR_MAX + 1];
        int n = snprintf(text, sizeof text, "%s:%s", alg == AM_DIGEST_SHA512 ? "sha512" : "sha256",
                         name);
        if (am_digest_parse(text, (size_t)n, &dg) != 0) {
            remove_foreign(bs, dirfd(d), dir, name);
            continue;
        }
        struct blob *b = index_add(bs, &dg, B_PRESENT);
        if (!b) {
            closedir(d);
            am_error_setmsg(msg, msglen, "blobstore: out of memory indexing %s", dir);
            return AM_ENOMEM;
        }
        b->size = (uint64_t)st.st_size;
        b->stored_at_ms = b->last_access_ms =
            (uint64_t)st.st_mtim.tv_sec * 1000u + (uint64_t)st.st_mtim.tv_nsec / 1000000u;
        b->on_disk_only = true;
    }
    closedir(d);
    return 0;
}

static int scan_alg(struct am_blobstore *bs, const char *algname, enum am_digest_alg alg,
                    size_t hexlen, char *msg, size_t msglen)
{
    char dir[PATH_MAX];
    int rc = 0;
    snprintf(dir, sizeof dir, "%s/%s", bs->dir, algname);
    DIR *d = opendir(dir);
    if (!d) {
        am_error_setmsg(msg, msglen, "%s: %s", dir, strerror(errno));
        return from_errno(errno);
    }
    struct dirent *de;
    while (rc == 0 && (de = readdir(d)) != NULL) {
        const char *name = de->d_name;
        if (strcmp(name, ".") == 0 || strcmp(name, "..") == 0) continue;
        struct stat st;
        if (strlen(name) != 2 || !is_lower_hex(name[0]) || !is_lower_hex(name[1]) ||
            fstatat(dirfd(d), name, &st, AT_SYMLINK_NOFOLLOW) != 0 || !S_ISDIR(st.st_mode)) {
            remove_foreign(bs, dirfd(d), dir, name);
            continue;
        }
        rc = scan_hh(bs, dirfd(d), dir, name, alg, hexlen, msg, msglen);
    }
    closedir(d);
    return rc;
}

static int cmp_lru(const void *pa, const void *pb)
{
    const struct blob *a = *(const struct blob *const *)pa, *b = *(const struct blob *const *)pb;
    if (a->last_access_ms != b->last_access_ms)
        return a->last_access_ms < b->last_access_ms ? -1 : 1;
    if (a->stored_at_ms != b->stored_at_ms) return a->stored_at_ms < b->stored_at_ms ? -1 : 1;
    return strcmp(a->digest.str, b->digest.str);
}

/* Links every indexed blob into the LRU list, oldest access first, and counts them. */
static int build_lru(struct am_blobstore *bs, char *msg, size_t msglen)
{
    if (bs->nindexed == 0) return 0;
    struct blob **all = malloc(bs->nindexed * sizeof *all);
    if (!all) {
        am_error_setmsg(msg, msglen, "blobstore: out of memory ordering %zu blobs", bs->nindexed);
        return AM_ENOMEM;
    }
    size_t n = 0;
    for (size_t i = 0; i < bs->nbuckets; i++)
        for (struct blob *b = bs->buckets[i]; b; b = b->hnext) all[n++] = b;
    qsort(all, n, sizeof *all, cmp_lru);
    for (size_t i = 0; i < n; i++) make_present(bs, all[i]);
    free(all);
    return 0;
}

/* Reconciles the records with the indexed files in one write transaction (see DESIGN). */
static int reconcile(struct am_blobstore *bs, MDB_txn *txn, char *msg, size_t msglen)
{
    MDB_cursor *cur = NULL;
    MDB_val k, v;
    char path[PATH_MAX];
    const char *what = "opening a cursor";
    int rc = mdb_cursor_open(txn, bs->dbi_blobs, &cur);
    if (rc) goto fail;

    what = "reading the records";
    for (rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST); rc == 0;
         rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
        struct am_digest dg;
        struct record r = {0};
        struct blob *b = NULL;
        bool key_ok = am_digest_parse(k.mv_data, k.mv_size, &dg) == 0;
        bool val_ok = key_ok && record_decode(&v, &r) == 0;
        if (key_ok) b = index_find(bs, &dg);
        if (!val_ok || !b) {
            AM_DEBUG("blobstore: %.*s: %s record deleted", (int)(k.mv_size > 140 ? 140 : k.mv_size),
                     (const char *)k.mv_data, val_ok ? "orphan" : "corrupt");
            bs->stats.startup_orphans++;
            what = "deleting a record";
            if ((rc = mdb_cursor_del(cur, 0)) != 0) goto fail;
            continue;
        }
        if (r.size != b->size) {
            AM_WARN("blobstore: %s: file has %llu bytes, its record %llu; removed", dg.str,
                    (unsigned long long)b->size, (unsigned long long)r.size);
            blob_path(bs, &dg, P_FILE, path, sizeof path);
            if (unlink(path) != 0 && errno != ENOENT) {
                am_error_setmsg(msg, msglen, "%s: %s", path, strerror(errno));
                rc = errno;
                goto fail_errno;
            }
            index_unlink(bs, b);
            blob_free(b);
            bs->stats.startup_removed++;
            what = "deleting a record";
            if ((rc = mdb_cursor_del(cur, 0)) != 0) goto fail;
            continue;
        }
        b->on_disk_only = false;
        b->stored_at_ms = r.stored_at_ms;
        b->last_access_ms = r.last_access_ms;
        b->hits = r.hits;
        if (r.mt_len && !(b->media_type = strndup(r.media_type, r.mt_len))) {
            rc = ENOMEM;
            what = "copying a media type";
            goto fail;
        }
    }
    if (rc != MDB_NOTFOUND) goto fail;
    mdb_cursor_close(cur);
    cur = NULL;

    /* Files without records: verified before their rename, so adopted as they are. */
    what = "recording an adopted blob";
    for (size_t i = 0; i < bs->nbuckets; i++) {
        for (struct blob *b = bs->buckets[i]; b; b = b->hnext) {
            if (!b->on_disk_only) continue;
            unsigned char val[HDR_LEN];
            b->on_disk_only = false;
            record_encode(b, val);
            k = (MDB_val){.mv_size = strlen(b->digest.str), .mv_data = b->digest.str};
            v = (MDB_val){.mv_size = HDR_LEN, .mv_data = val};
            if ((rc = mdb_put(txn, bs->dbi_blobs, &k, &v, 0)) != 0) goto fail;
            bs->stats.startup_adopted++;
        }
    }
    return 0;

fail:
    am_error_setmsg(msg, msglen, "%s: %s: %s", bs->db_path, what, mdb_strerror(rc));
fail_errno:
    if (cur) mdb_cursor_close(cur);
    return from_mdb(rc) == AM_ENOT_FOUND ? AM_ESTORE : from_mdb(rc);
}

int am_blobstore_open_store(uv_loop_t *loop, const char *data_dir,
                            const struct am_blobstore_options *opts, struct am_blobstore **out,
                            char *msg, size_t msglen)
{
    struct am_blobstore_options o = opts ? *opts : (struct am_blobstore_options){0};
    struct am_blobstore *bs = NULL;
    MDB_txn *txn = NULL;
    char path[PATH_MAX];
    int rc, err;

    if (out) *out = NULL;
    if (!o.high_pct) o.high_pct = DEFAULT_HIGH_PCT;
    if (!o.low_pct) o.low_pct = o.high_pct < DEFAULT_LOW_PCT ? o.high_pct : DEFAULT_LOW_PCT;
    if (!o.map_bytes) o.map_bytes = DEFAULT_MAP_BYTES;
    if (!loop || !data_dir || !*data_dir || !out || o.high_pct > 100 || o.low_pct > o.high_pct ||
        o.map_bytes > SIZE_MAX) {
        am_error_setmsg(msg, msglen, "blobstore: invalid arguments");
        return AM_EINVAL;
    }
    /* The longest path we build: <data_dir>/blobs/<alg>/<hh>/<hex>. */
    if (strlen(data_dir) + sizeof "/blobs/" + BLOB_REL_MAX + TMP_NAME_MAX >= PATH_MAX) {
        am_error_setmsg(msg, msglen, "%s: data directory path too long", data_dir);
        return AM_EINVAL;
    }
    if (!(bs = calloc(1, sizeof *bs))) goto nomem;
    bs->loop = loop;
    am_dl_init(&bs->lru);
    am_dl_init(&bs->dirty);
    bs->max_bytes = o.max_bytes;
    bs->high_bytes = o.max_bytes / 100 * o.high_pct + o.max_bytes % 100 * o.high_pct / 100;
    bs->low_bytes = o.max_bytes / 100 * o.low_pct + o.max_bytes % 100 * o.low_pct / 100;
    if (asprintf(&bs->dir, "%s/blobs", data_dir) < 0) bs->dir = NULL;
    if (asprintf(&bs->tmp_dir, "%s/blobs/tmp", data_dir) < 0) bs->tmp_dir = NULL;
    if (asprintf(&bs->db_path, "%s/%s", data_dir, DB_FILE) < 0) bs->db_path = NULL;
    bs->nbuckets = HASH_INIT_BUCKETS;
    bs->buckets = calloc(bs->nbuckets, sizeof *bs->buckets);
    if (!bs->dir || !bs->tmp_dir || !bs->db_path || !bs->buckets) goto nomem;

    static const char *const subdirs[] = {"tmp", "sha256", "sha512"};
    for (size_t i = 0; i < sizeof subdirs / sizeof subdirs[0]; i++) {
        snprintf(path, sizeof path, "%s/%s", bs->dir, subdirs[i]);
        if ((err = am_dirs_make(path)) != 0) {
            am_error_setmsg(msg, msglen, "%s: cannot create the directory: %s", path,
                            strerror(err));
            rc = err == ENOTDIR || err == EEXIST ? AM_ESTORE : from_errno(err);
            goto fail;
        }
    }

    if ((err = mdb_env_create(&bs->env)) != 0) {
        bs->env = NULL;
        am_error_setmsg(msg, msglen, "%s: %s", bs->db_path, mdb_strerror(err));
        rc = from_mdb(err);
        goto fail;
    }
    if ((err = mdb_env_set_maxdbs(bs->env, N_DBS)) != 0 ||
        (err = mdb_env_set_mapsize(bs->env, (size_t)o.map_bytes)) != 0 ||
        (err = mdb_env_open(bs->env, bs->db_path, MDB_NOSUBDIR | MDB_NOTLS, 0640)) != 0) {
        am_error_setmsg(msg, msglen, "%s: %s", bs->db_path, mdb_strerror(err));
        rc = from_mdb(err);
        if (rc == AM_ENOT_FOUND) rc = AM_ESTORE;
        goto fail;
    }
    int dead = 0;
    (void)mdb_reader_check(bs->env, &dead);

    if ((err = mdb_txn_begin(bs->env, NULL, 0, &txn)) != 0 ||
        (err = mdb_dbi_open(txn, "meta", MDB_CREATE, &bs->dbi_meta)) != 0 ||
        (err = mdb_dbi_open(txn, "blobs", MDB_CREATE, &bs->dbi_blobs)) != 0) {
        am_error_setmsg(msg, msglen, "%s: opening the databases: %s", bs->db_path,
                        mdb_strerror(err));
        rc = from_mdb(err) == AM_ENOT_FOUND ? AM_ESTORE : from_mdb(err);
        goto fail;
    }
    if ((rc = check_schema(txn, bs->dbi_meta, bs->db_path, msg, msglen)) != 0) goto fail;
    if ((rc = remove_stale_temps(bs, msg, msglen)) != 0) goto fail;
    if ((rc = scan_alg(bs, "sha256", AM_DIGEST_SHA256, 64, msg, msglen)) != 0) goto fail;
    if ((rc = scan_alg(bs, "sha512", AM_DIGEST_SHA512, 128, msg, msglen)) != 0) goto fail;
    if ((rc = reconcile(bs, txn, msg, msglen)) != 0) goto fail;
    err = mdb_txn_commit(txn);
    txn = NULL;
    if (err) {
        am_error_setmsg(msg, msglen, "%s: committing the reconciliation: %s", bs->db_path,
                        mdb_strerror(err));
        rc = from_mdb(err);
        goto fail;
    }
    if ((rc = build_lru(bs, msg, msglen)) != 0) goto fail;
    if (bs->stats.startup_temp_removed || bs->stats.startup_adopted || bs->stats.startup_orphans ||
        bs->stats.startup_removed)
        AM_INFO("blobstore: %s: startup removed %llu temp files and %llu stray files, adopted "
                "%llu blobs, deleted %llu records",
                bs->dir, (unsigned long long)bs->stats.startup_temp_removed,
                (unsigned long long)bs->stats.startup_removed,
                (unsigned long long)bs->stats.startup_adopted,
                (unsigned long long)bs->stats.startup_orphans);
    maybe_evict(bs); /* the budget may have shrunk since the last run */
    *out = bs;
    return 0;

nomem:
    am_error_setmsg(msg, msglen, "blobstore: out of memory");
    rc = AM_ENOMEM;
fail:
    if (txn) mdb_txn_abort(txn);
    store_free(bs);
    return rc;
}

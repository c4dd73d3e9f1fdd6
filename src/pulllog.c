/*
 * pulllog — the JSON-lines pull log and its LMDB aggregates; see
 * include/archmirror/pulllog.h.
 *
 * This module must never make the loop wait on the disk, never let a failed write reach
 * the request that was served, never hand out a pointer into the LMDB map, and never
 * trust a byte it reads back from disk.
 *
 * DESIGN
 *
 * Threads and ordering (metastore's pattern). am_pulllog_record validates and copies a
 * record into one allocation appended to `pending`, on the loop. A batch starts when no
 * batch runs and one of: the flush timer fired (`due`), pending reached flush_bytes,
 * flush_interval_ms is 0, someone waits in am_pulllog_flush, or close began. Starting
 * moves up to BATCH_MAX_RECORDS records into `batch` and queues one uv_queue_work; only
 * that worker touches `batch`, the file descriptor, the file offset and the worker
 * buffers until its after-work callback, which runs on the loop, counts, logs (the
 * worker never logs), frees the records and completes the flush waiters whose records
 * are now written. So there is one writer, and records reach the file and the
 * aggregates in the order they were recorded. A flush with nothing pending runs an empty
 * batch, so its callback always comes from the loop. The timer is one-shot, armed when
 * a record waits and no batch is due; it is the only handle, and close closes it. Close
 * lets the batches drain, then queues a last work request that closes the file and the
 * env off the loop; its after-work callback frees everything and calls done.
 *
 * The file. pulls.jsonl is opened O_APPEND at open; the worker tracks its size. Before a
 * line that would take it past rotate_bytes (unless the file is empty), the worker
 * writes what it has, closes the file, renames pulls.jsonl.(k-1) → .k … .1 → .2 (the
 * rename onto .keep_files drops the oldest), pulls.jsonl → .1, and opens a new one. A
 * failed write is cut back with ftruncate to the last whole line, so a torn line never
 * joins the next; if even that fails (or an earlier process died mid-line, seen at
 * open), the next write starts with a newline. A failed rotation is not retried within
 * the batch (each retry would rename every file again).
 *
 * The aggregates. One env, <dir>/pulls.lmdb (MDB_NOSUBDIR, MDB_NOTLS), named DBs:
 *   "meta"    "schema" → u32 LE SCHEMA_VERSION; a newer version is refused at open.
 *   "pulls"   key(entry) → value (kind AGG_PULLS)
 *   "images"  key(image) → value (kind AGG_IMAGE)
 *   "nodes"   key(entry or image) node → u64 LE first-seen ms: the exactly tracked nodes
 * key(x) is the sha256 digest text (71 bytes) of the natural key: kind byte 'p' or 'i',
 * registry \0 repository \0 ref [\0 platform], where ref is the tag or "@" digest. The
 * components can add up to ~850 bytes, past LMDB's 511-byte key limit, so keys are always
 * hashed and values carry their components (queries read values only).
 *
 * Values, integers little-endian:
 *    0  u16  format version (AGG_VERSION)
 *    2  u8   kind (AGG_PULLS or AGG_IMAGE)
 *    3  u8   flags (AGG_FLAG_OVERFLOW: a node beyond AM_PULLLOG_NODES_EXACT was seen)
 *    4  u32  nodes tracked exactly (<= AM_PULLLOG_NODES_EXACT)
 *    8  u64  pulls         16 u64 first pull ms    24 u64 last pull ms
 *   32  u64  cache hits    40 u64 bytes            48 u64[4] pulls per source
 *   80  u64  platforms_at_ms (images: time of the record that gave the platforms; else 0)
 *   88  u8[256] HyperLogLog registers over every node seen (each <= 57)
 *  344  u16  string count n, then n × (u16 length, bytes): registry, repository, tag
 *            ("" for a pull by digest), digest (the key's for a pull by digest, else the
 *            latest served), then the platform (pulls: exactly one, "" when unknown) or
 *            the image's platforms (images: zero or more).
 * A value is accepted only when its length is exactly what it announces and every field
 * is in range; anything else counts as corrupt: a query skips it, a write restarts it.
 *
 * Distinct nodes: a record's node goes into "nodes" (MDB_NOOVERWRITE tells new from
 * seen) while fewer than AM_PULLLOG_NODES_EXACT are tracked; after that a node not found
 * there sets AGG_FLAG_OVERFLOW. Every node also goes into the HyperLogLog (p = 8, 64-bit
 * hash), whose raw estimate (the range correction is never needed: it is consulted only
 * past 1024 distinct nodes, four times the register count) is reported, never below
 * AM_PULLLOG_NODES_EXACT, once the exact set overflowed.
 */
#include "archmirror/pulllog.h"

#include <assert.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <lmdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "archmirror/buf.h"
#include "archmirror/config.h"
#include "archmirror/digest.h"
#include "archmirror/dirs.h"
#include "archmirror/error.h"
#include "archmirror/http.h"
#include "archmirror/httpserver.h"
#include "archmirror/le.h"
#include "archmirror/log.h"
#include "archmirror/schema.h"
#include "archmirror/platform.h"
#include "archmirror/reference.h"

#define SCHEMA_VERSION 1u
#define DB_FILE        "pulls.lmdb"
#define LOG_FILE       "pulls.jsonl"
#define N_DBS          4

#define AGG_VERSION       1u
#define AGG_PULLS         1u
#define AGG_IMAGE         2u
#define AGG_FLAG_OVERFLOW 1u
#define HLL_M             256u
#define HLL_REG_MAX       57u /* 64-bit hash, 8 index bits: rho <= 56 + 1 */
#define AGG_HDR           344u
#define N_SOURCES         4
#define S_REGISTRY        0
#define S_REPOSITORY      1
#define S_TAG             2
#define S_DIGEST          3
#define S_PLATFORM        4 /* pulls: the platform; images: the first of the platforms */
#define AGG_STR_MAX       (4 + AM_PULLLOG_PLATFORMS_MAX)

/* A batch is one transaction and one run of writes; bounding it keeps a failure (which
 * fails its whole transaction) from taking too many records with it. */
#define BATCH_MAX_RECORDS 2048u
#define KEEP_FILES_MAX    10000u
/* Worker buffers: a value, a line, the lines between two rotations. */
#define VALUE_BUF_MAX ((size_t)1 << 20)
#define LINE_BUF_MAX  ((size_t)1 << 20)
#define CHUNK_BUF_MAX ((size_t)64 << 20)
/* Query answers (the handler's buffer) and query parameters. */
#define ANSWER_BUF_MAX ((size_t)64 << 20)
#define PARAM_MAX      512u

#define DEFAULT_ROTATE_BYTES ((uint64_t)64 << 20)
#define DEFAULT_KEEP_FILES   5u
#define DEFAULT_MAP_BYTES    ((uint64_t)256 << 20)
#define DEFAULT_INTERVAL_MS  1000u
#define DEFAULT_FLUSH_BYTES  ((uint64_t)64 << 10)
#define DEFAULT_BUFFER_BYTES ((uint64_t)16 << 20)

/* One accepted record; its strings live in data[]. */
struct rec {
    struct rec *next;
    uint64_t seq;
    size_t size; /* of the allocation, for buffer accounting */
    uint64_t time_ms;
    uint64_t bytes;
    bool cache_hit;
    enum am_pulllog_source source;
    const char *client, *node, *platform, *registry, *repository, *tag, *digest, *platform_digest;
    size_t n_platforms;
    const char *platforms; /* n_platforms NUL-terminated strings, one after another */
    char data[];
};

struct rec_list {
    struct rec *head;
    struct rec *tail;
    size_t n;
    uint64_t bytes;
};

struct waiter {
    struct waiter *next;
    uint64_t target; /* seq of the last record it waits for */
    void (*cb)(void *arg);
    void *arg;
};

/* What a batch did, written by the worker, read by its after-work callback. */
struct batch_out {
    uint64_t lines_written;
    uint64_t lines_dropped;
    uint64_t rotations;
    uint64_t corrupt;
    int file_err;          /* errno of the first file failure, or 0 */
    const char *file_what; /* what failed: "opening", "writing", "rotating", "formatting" */
    int mdb_rc;            /* result of the aggregate transaction (LMDB or errno) */
};

struct am_pulllog {
    uv_loop_t *loop; /* kept */
    uv_timer_t timer;
    bool timer_closed;
    bool due; /* the timer fired: write what waits */

    /* settings */
    uint64_t rotate_bytes;
    uint32_t keep_files;
    uint64_t interval_ms;
    uint64_t flush_bytes;
    uint64_t max_buffer_bytes;

    char *dir;       /* owned */
    char *file_path; /* owned; <dir>/pulls.jsonl */
    char *db_path;   /* owned; <dir>/pulls.lmdb */

    /* the file: the worker's while `running`, the loop's otherwise (open and close) */
    int fd;
    uint64_t file_size;
    bool need_newline;
    struct am_buf vbuf, lbuf, cbuf; /* worker buffers */

    MDB_env *env;
    MDB_dbi dbi_meta, dbi_pulls, dbi_images, dbi_nodes;
    MDB_txn *rtxn; /* owned; the reset read txn reused by every query, or NULL */

    struct rec_list pending; /* loop thread only */
    struct rec_list batch;   /* the worker's while `running` */
    struct batch_out bout;
    uint64_t buffered_bytes; /* pending + batch */
    uint64_t seq_accepted;   /* seq of the last accepted record */
    uint64_t seq_done;       /* seq of the last record whose batch finished */
    struct waiter *waiters, *waiters_tail;

    uv_work_t work;
    bool running;
    bool closing;
    void (*close_done)(void *arg);
    void *close_arg;

    bool file_warned, store_warned, buffer_warned;
    uint64_t refused_since_warn;
    struct am_pulllog_stats stats;
};

/* ---- small helpers ---- */

/* Converts an LMDB or errno result, once, at the boundary. */
static int from_mdb(int rc)
{
    switch (rc) {
    case MDB_SUCCESS: return 0;
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

static const char *mdb_or_errno_str(int rc)
{
    return mdb_strerror(rc); /* covers errno values too */
}

static uint64_t now_ms(void)
{
    struct timespec ts;
    if (clock_gettime(CLOCK_REALTIME, &ts) != 0 || ts.tv_sec < 0) return 0;
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* Whether s[0..n) is printable ASCII without space (0x21..0x7e). */
static bool printable(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)s[i] < 0x21 || (unsigned char)s[i] > 0x7e) return false;
    return true;
}

/* Length of an optional string field (NULL = ""), or SIZE_MAX when over max or not
 * printable. */
static size_t field_len(const char *s, size_t max)
{
    if (!s) return 0;
    size_t n = strnlen(s, max + 1);
    if (n > max || !printable(s, n)) return SIZE_MAX;
    return n;
}

/* Room for format_time's output as the compiler counts it (each %d up to 11 bytes). */
#define TIME_STR_SIZE 96
/* 9999-12-31T23:59:59.999Z, the last time RFC 3339 can write. */
#define TIME_MAX_MS ((uint64_t)253402300799999u)

/* RFC 3339 UTC with milliseconds: "2024-05-01T12:00:00.123Z"; times past year 9999 are
 * written as TIME_MAX_MS. */
static void format_time(uint64_t ms, char out[TIME_STR_SIZE])
{
    if (ms > TIME_MAX_MS) ms = TIME_MAX_MS;
    time_t secs = (time_t)(ms / 1000u);
    struct tm tm;
    if (!gmtime_r(&secs, &tm)) memset(&tm, 0, sizeof tm);
    snprintf(out, TIME_STR_SIZE, "%04d-%02d-%02dT%02d:%02d:%02d.%03uZ", tm.tm_year + 1900,
             tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, (unsigned)(ms % 1000u));
}

/* The node of a client address: the address without its port. "10.0.3.7:41234" →
 * "10.0.3.7", "[fd00::7]:41234" → "fd00::7"; a bare IPv6 address (several colons, no
 * brackets) or an address without port is kept whole. */
static void node_of(const char *client, size_t len, const char **node, size_t *node_len)
{
    *node = client;
    *node_len = len;
    if (len && client[0] == '[') {
        const char *close = memchr(client, ']', len);
        if (close) {
            *node = client + 1;
            *node_len = (size_t)(close - client - 1);
        }
        return;
    }
    const char *colon = memchr(client, ':', len);
    if (colon && !memchr(colon + 1, ':', len - (size_t)(colon + 1 - client)))
        *node_len = (size_t)(colon - client);
}

const char *am_pulllog_source_name(enum am_pulllog_source s)
{
    switch (s) {
    case AM_PULLLOG_SOURCE_HEADER: return "header";
    case AM_PULLLOG_SOURCE_CHILD_MANIFEST: return "child-manifest";
    case AM_PULLLOG_SOURCE_CONFIG: return "config";
    case AM_PULLLOG_SOURCE_UNKNOWN:
    default: return "unknown";
    }
}

/* Normalises a platform specifier into its canonical text (am_platform_format_all).
 * Returns 0 or AM_EINVAL. */
static int normalize_platform(const char *s, size_t len, char out[AM_PLATFORM_FORMAT_ALL_SIZE])
{
    struct am_platform p;
    struct am_platform_features f;
    if (am_platform_parse(s, len, &p, &f, NULL, 0) != 0) return AM_EINVAL;
    return am_platform_format_all(&p, &f, out, AM_PLATFORM_FORMAT_ALL_SIZE) ? AM_EINVAL : 0;
}

/* ---- HyperLogLog ---- */

static uint64_t hash64(const char *s, size_t n)
{
    /* FNV-1a, then splitmix64's finaliser to spread the bits over the whole word. */
    uint64_t h = 0xcbf29ce484222325u;
    for (size_t i = 0; i < n; i++) {
        h ^= (unsigned char)s[i];
        h *= 0x100000001b3u;
    }
    h ^= h >> 30;
    h *= 0xbf58476d1ce4e5b9u;
    h ^= h >> 27;
    h *= 0x94d049bb133111ebu;
    h ^= h >> 31;
    return h;
}

static void hll_add(uint8_t *reg, const char *s, size_t n)
{
    uint64_t h = hash64(s, n);
    unsigned idx = (unsigned)(h >> 56);
    uint64_t w = h << 8;
    unsigned rho = w ? (unsigned)__builtin_clzll(w) + 1u : HLL_REG_MAX;
    if (rho > HLL_REG_MAX) rho = HLL_REG_MAX;
    if (reg[idx] < rho) reg[idx] = (uint8_t)rho;
}

static uint64_t hll_estimate(const uint8_t *reg)
{
    double sum = 0;
    for (unsigned i = 0; i < HLL_M; i++) sum += 1.0 / (double)((uint64_t)1 << reg[i]);
    double alpha = 0.7213 / (1.0 + 1.079 / HLL_M);
    double e = alpha * HLL_M * HLL_M / sum;
    return (uint64_t)(e + 0.5);
}

/* ---- aggregate values ---- */

struct agg {
    unsigned kind;
    unsigned flags;
    uint32_t tracked;
    uint64_t pulls, first_ms, last_ms, hits, bytes, platforms_at_ms;
    uint64_t src[N_SOURCES];
    uint8_t hll[HLL_M];
    size_t n_str;
    const char *str[AGG_STR_MAX]; /* views: into a value, a record or a copy */
    size_t len[AGG_STR_MAX];
};

static uint64_t agg_nodes(const struct agg *a)
{
    if (!(a->flags & AGG_FLAG_OVERFLOW)) return a->tracked;
    uint64_t e = hll_estimate(a->hll);
    return e > AM_PULLLOG_NODES_EXACT ? e : AM_PULLLOG_NODES_EXACT;
}

/* Validates and decodes a value of the given kind; a's strings view into p. Returns 0
 * or -1 (corrupt). */
static int agg_decode(const void *data, size_t n, unsigned kind, struct agg *a)
{
    const unsigned char *p = data;
    if (n < AGG_HDR + 2 || am_le_get16(p) != AGG_VERSION || p[2] != kind ||
        (p[3] & ~AGG_FLAG_OVERFLOW))
        return -1;
    a->kind = kind;
    a->flags = p[3];
    a->tracked = am_le_get32(p + 4);
    a->pulls = am_le_get64(p + 8);
    a->first_ms = am_le_get64(p + 16);
    a->last_ms = am_le_get64(p + 24);
    a->hits = am_le_get64(p + 32);
    a->bytes = am_le_get64(p + 40);
    for (int i = 0; i < N_SOURCES; i++) a->src[i] = am_le_get64(p + 48 + 8 * i);
    a->platforms_at_ms = am_le_get64(p + 80);
    memcpy(a->hll, p + 88, HLL_M);
    if (a->tracked > AM_PULLLOG_NODES_EXACT || a->pulls == 0 || a->first_ms > a->last_ms ||
        a->hits > a->pulls)
        return -1;
    for (unsigned i = 0; i < HLL_M; i++)
        if (a->hll[i] > HLL_REG_MAX) return -1;
    size_t count = am_le_get16(p + AGG_HDR);
    if (kind == AGG_PULLS ? count != 5 : (count < 4 || count > AGG_STR_MAX)) return -1;
    size_t off = AGG_HDR + 2;
    for (size_t i = 0; i < count; i++) {
        if (n - off < 2) return -1;
        size_t l = am_le_get16(p + off);
        off += 2;
        if (n - off < l) return -1;
        a->str[i] = (const char *)p + off;
        a->len[i] = l;
        if (!printable(a->str[i], l)) return -1;
        off += l;
    }
    if (off != n) return -1;
    a->n_str = count;
    if (!a->len[S_REGISTRY] || !a->len[S_REPOSITORY] || !a->len[S_DIGEST]) return -1;
    if (kind == AGG_IMAGE)
        for (size_t i = S_PLATFORM; i < count; i++)
            if (!a->len[i]) return -1;
    return 0;
}

/* Encodes a into b (reset first). Returns 0 or AM_ENOMEM/AM_ETOO_LARGE. */
static int agg_encode(const struct agg *a, struct am_buf *b)
{
    unsigned char hdr[AGG_HDR + 2];
    am_le_put16(hdr, AGG_VERSION);
    hdr[2] = (unsigned char)a->kind;
    hdr[3] = (unsigned char)a->flags;
    am_le_put32(hdr + 4, a->tracked);
    am_le_put64(hdr + 8, a->pulls);
    am_le_put64(hdr + 16, a->first_ms);
    am_le_put64(hdr + 24, a->last_ms);
    am_le_put64(hdr + 32, a->hits);
    am_le_put64(hdr + 40, a->bytes);
    for (int i = 0; i < N_SOURCES; i++) am_le_put64(hdr + 48 + 8 * i, a->src[i]);
    am_le_put64(hdr + 80, a->platforms_at_ms);
    memcpy(hdr + 88, a->hll, HLL_M);
    am_le_put16(hdr + AGG_HDR, (uint16_t)a->n_str);
    am_buf_reset(b);
    int rc = am_buf_append(b, hdr, sizeof hdr);
    for (size_t i = 0; rc == 0 && i < a->n_str; i++) {
        unsigned char l[2];
        am_le_put16(l, (uint16_t)a->len[i]);
        if ((rc = am_buf_append(b, l, 2)) == 0 && a->len[i])
            rc = am_buf_append(b, a->str[i], a->len[i]);
    }
    return rc;
}

/* ---- records ---- */

/* Validates r and copies it into one allocation. Returns 0, AM_EINVAL or AM_ENOMEM. */
static int rec_new(const struct am_pulllog_record *r, struct rec **out)
{
    char plat[AM_PLATFORM_FORMAT_ALL_SIZE] = "";
    char tmp[AM_PLATFORM_FORMAT_ALL_SIZE];
    struct am_digest dg;

    size_t client_l = field_len(r->client, AM_PULLLOG_CLIENT_MAX);
    size_t reg_l = field_len(r->registry, AM_REGISTRY_MAX);
    size_t repo_l = field_len(r->repository, AM_NAME_MAX);
    size_t tag_l = field_len(r->tag, AM_TAG_MAX);
    size_t dg_l = field_len(r->digest, AM_DIGEST_STR_MAX);
    size_t pdg_l = field_len(r->platform_digest, AM_DIGEST_STR_MAX);
    if (client_l == SIZE_MAX || reg_l == SIZE_MAX || !reg_l || repo_l == SIZE_MAX || !repo_l ||
        tag_l == SIZE_MAX || dg_l == SIZE_MAX || !dg_l || pdg_l == SIZE_MAX)
        return AM_EINVAL;
    if (am_digest_parse(r->digest, dg_l, &dg) != 0) return AM_EINVAL;
    if (pdg_l && am_digest_parse(r->platform_digest, pdg_l, &dg) != 0) return AM_EINVAL;
    if ((unsigned)r->platform_source > AM_PULLLOG_SOURCE_CONFIG) return AM_EINVAL;
    if (r->n_image_platforms > AM_PULLLOG_PLATFORMS_MAX ||
        (r->n_image_platforms && !r->image_platforms))
        return AM_EINVAL;
    enum am_pulllog_source source = r->platform_source;
    if (r->node_platform && r->node_platform[0]) {
        size_t n = strnlen(r->node_platform, AM_PLATFORM_SPEC_MAX + 1);
        if (n > AM_PLATFORM_SPEC_MAX || normalize_platform(r->node_platform, n, plat))
            return AM_EINVAL;
    } else {
        source = AM_PULLLOG_SOURCE_UNKNOWN;
    }
    /* First pass over the image platforms: validate and size them. */
    size_t plats_l = 0;
    for (size_t i = 0; i < r->n_image_platforms; i++) {
        const char *s = r->image_platforms[i];
        size_t n = s ? strnlen(s, AM_PLATFORM_SPEC_MAX + 1) : 0;
        if (!n || n > AM_PLATFORM_SPEC_MAX || normalize_platform(s, n, tmp)) return AM_EINVAL;
        plats_l += strlen(tmp) + 1;
    }

    const char *node;
    size_t node_l;
    node_of(r->client ? r->client : "", client_l, &node, &node_l);
    size_t plat_l = strlen(plat);
    size_t strings = client_l + node_l + plat_l + reg_l + repo_l + tag_l + dg_l + pdg_l + 8;
    size_t size = sizeof(struct rec) + strings + plats_l;
    struct rec *c = malloc(size);
    if (!c) return AM_ENOMEM;
    memset(c, 0, sizeof *c);
    c->size = size;
    c->time_ms = r->time_ms ? r->time_ms : now_ms();
    c->bytes = r->bytes;
    c->cache_hit = r->cache_hit;
    c->source = source;
    char *p = c->data;
#define COPY_FIELD(dst, src, n)                                                                    \
    do {                                                                                           \
        (dst) = p;                                                                                 \
        if (n) memcpy(p, (src), (n));                                                              \
        p[(n)] = '\0';                                                                             \
        p += (n) + 1;                                                                              \
    } while (0)
    COPY_FIELD(c->client, r->client, client_l);
    COPY_FIELD(c->node, node, node_l);
    COPY_FIELD(c->platform, plat, plat_l);
    COPY_FIELD(c->registry, r->registry, reg_l);
    COPY_FIELD(c->repository, r->repository, repo_l);
    COPY_FIELD(c->tag, r->tag, tag_l);
    COPY_FIELD(c->digest, r->digest, dg_l);
    COPY_FIELD(c->platform_digest, r->platform_digest, pdg_l);
#undef COPY_FIELD
    /* Second pass: normalised, deduplicated, in the order given. */
    c->platforms = p;
    for (size_t i = 0; i < r->n_image_platforms; i++) {
        const char *s = r->image_platforms[i];
        normalize_platform(s, strlen(s), tmp);
        bool dup = false;
        for (const char *q = c->platforms; q < p && !dup; q += strlen(q) + 1)
            dup = strcmp(q, tmp) == 0;
        if (dup) continue;
        size_t n = strlen(tmp) + 1;
        memcpy(p, tmp, n);
        p += n;
        c->n_platforms++;
    }
    *out = c;
    return 0;
}

/* ---- opening ---- */

static char *path_join(const char *dir, const char *name)
{
    size_t n = strlen(dir) + 1 + strlen(name) + 1;
    char *p = malloc(n);
    if (p) snprintf(p, n, "%s/%s", dir, name);
    return p;
}

/* Opens pulls.jsonl for appending. Returns the fd or -1 (errno set). */
static int open_log_file(const char *path)
{
    int fd;
    do {
        fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0640);
    } while (fd < 0 && errno == EINTR);
    return fd;
}

/* Reads the size of the open file and whether its last byte ends a line. */
static void read_tail(struct am_pulllog *pl)
{
    struct stat st;
    char c;
    pl->file_size = 0;
    pl->need_newline = false;
    if (fstat(pl->fd, &st) != 0 || !S_ISREG(st.st_mode) || st.st_size <= 0) return;
    pl->file_size = (uint64_t)st.st_size;
    /* The descriptor is write-only; read the last byte through a second one. */
    int rfd = open(pl->file_path, O_RDONLY | O_CLOEXEC);
    if (rfd < 0) return;
    if (pread(rfd, &c, 1, st.st_size - 1) == 1 && c != '\n') pl->need_newline = true;
    close(rfd);
}

/* Removes pulls.jsonl.N for N > keep_files (left by an earlier, larger setting). */
static void remove_extra_rotated(const struct am_pulllog *pl)
{
    DIR *d = opendir(pl->dir);
    if (!d) return;
    const size_t pre = sizeof LOG_FILE; /* "pulls.jsonl." */
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        const char *s = e->d_name;
        if (strncmp(s, LOG_FILE ".", pre) != 0 || !s[pre]) continue;
        unsigned long long n = 0;
        bool digits = true;
        for (const char *q = s + pre; *q && digits; q++) {
            if (*q < '0' || *q > '9' || n > 1000000u) digits = false;
            n = n * 10u + (unsigned)(*q - '0');
        }
        if (!digits || n <= pl->keep_files) continue;
        char *path = path_join(pl->dir, s);
        if (path && unlink(path) == 0)
            AM_INFO("pulllog: removed %s (keep_files is %u)", path, pl->keep_files);
        free(path);
    }
    closedir(d);
}

/* Checks the schema version in "meta", recording it in a new store. */
static int check_schema(struct am_pulllog *pl, MDB_txn *txn, char *msg, size_t msglen)
{
    MDB_val k = {.mv_size = 6, .mv_data = "schema"};
    MDB_val v;
    int rc = mdb_get(txn, pl->dbi_meta, &k, &v);
    if (rc == MDB_NOTFOUND) {
        unsigned char ver[4];
        am_le_put32(ver, SCHEMA_VERSION);
        v.mv_size = sizeof ver;
        v.mv_data = ver;
        if ((rc = mdb_put(txn, pl->dbi_meta, &k, &v, 0)) == 0) return 0;
    }
    if (rc) {
        am_error_setmsg(msg, msglen, "%s: schema version: %s", pl->db_path, mdb_strerror(rc));
        return from_mdb(rc);
    }
    return am_schema_check(v.mv_data, v.mv_size, SCHEMA_VERSION, pl->db_path, msg, msglen);
}

/* Opens the env and its DBs (creating them) in one write transaction. Startup only. */
static int open_store(struct am_pulllog *pl, uint64_t map_bytes, char *msg, size_t msglen)
{
    MDB_txn *txn = NULL;
    int rc;
    if ((rc = mdb_env_create(&pl->env)) != 0) {
        pl->env = NULL;
        goto fail;
    }
    if ((rc = mdb_env_set_maxdbs(pl->env, N_DBS)) != 0 ||
        (map_bytes && (rc = mdb_env_set_mapsize(pl->env, (size_t)map_bytes)) != 0) ||
        (rc = mdb_env_open(pl->env, pl->db_path, MDB_NOSUBDIR | MDB_NOTLS, 0640)) != 0)
        goto fail;
    int dead = 0;
    (void)mdb_reader_check(pl->env, &dead);
    if ((rc = mdb_txn_begin(pl->env, NULL, 0, &txn)) != 0 ||
        (rc = mdb_dbi_open(txn, "meta", MDB_CREATE, &pl->dbi_meta)) != 0 ||
        (rc = mdb_dbi_open(txn, "pulls", MDB_CREATE, &pl->dbi_pulls)) != 0 ||
        (rc = mdb_dbi_open(txn, "images", MDB_CREATE, &pl->dbi_images)) != 0 ||
        (rc = mdb_dbi_open(txn, "nodes", MDB_CREATE, &pl->dbi_nodes)) != 0)
        goto fail;
    int src = check_schema(pl, txn, msg, msglen);
    if (src) {
        mdb_txn_abort(txn);
        return src;
    }
    rc = mdb_txn_commit(txn);
    txn = NULL;
    if (rc) goto fail;
    return 0;

fail:
    if (txn) mdb_txn_abort(txn);
    am_error_setmsg(msg, msglen, "%s: %s", pl->db_path, mdb_strerror(rc));
    return from_mdb(rc);
}

void am_pulllog_opts_init(struct am_pulllog_opts *o)
{
    memset(o, 0, sizeof *o);
    o->rotate_bytes = DEFAULT_ROTATE_BYTES;
    o->keep_files = DEFAULT_KEEP_FILES;
    o->map_bytes = DEFAULT_MAP_BYTES;
    o->flush_interval_ms = DEFAULT_INTERVAL_MS;
    o->flush_bytes = DEFAULT_FLUSH_BYTES;
    o->max_buffer_bytes = DEFAULT_BUFFER_BYTES;
}

static void free_pulllog(struct am_pulllog *pl)
{
    am_buf_cleanup(&pl->vbuf);
    am_buf_cleanup(&pl->lbuf);
    am_buf_cleanup(&pl->cbuf);
    free(pl->dir);
    free(pl->file_path);
    free(pl->db_path);
    free(pl);
}

int am_pulllog_open(uv_loop_t *loop, const struct am_pulllog_opts *opts, struct am_pulllog **out,
                    char *msg, size_t msglen)
{
    struct am_pulllog *pl = NULL;
    int rc, err;

    if (!loop || !opts || !out || !opts->dir || !opts->dir[0] || opts->map_bytes > SIZE_MAX ||
        opts->keep_files > KEEP_FILES_MAX) {
        am_error_setmsg(msg, msglen, "pulllog: invalid arguments");
        return AM_EINVAL;
    }
    if ((err = am_dirs_make(opts->dir)) != 0) {
        am_error_setmsg(msg, msglen, "%s: cannot create the pull log directory: %s", opts->dir,
                        strerror(err));
        return from_mdb(err);
    }
    if (!(pl = calloc(1, sizeof *pl))) goto nomem;
    pl->loop = loop;
    pl->fd = -1;
    pl->rotate_bytes = opts->rotate_bytes;
    pl->keep_files = opts->keep_files;
    pl->interval_ms = opts->flush_interval_ms;
    pl->flush_bytes = opts->flush_bytes;
    pl->max_buffer_bytes = opts->max_buffer_bytes ? opts->max_buffer_bytes : DEFAULT_BUFFER_BYTES;
    am_buf_init(&pl->vbuf, VALUE_BUF_MAX);
    am_buf_init(&pl->lbuf, LINE_BUF_MAX);
    am_buf_init(&pl->cbuf, CHUNK_BUF_MAX);
    if (!(pl->dir = strdup(opts->dir)) || !(pl->file_path = path_join(opts->dir, LOG_FILE)) ||
        !(pl->db_path = path_join(opts->dir, DB_FILE)))
        goto nomem;

    if ((pl->fd = open_log_file(pl->file_path)) < 0) {
        err = errno;
        am_error_setmsg(msg, msglen, "%s: %s", pl->file_path, strerror(err));
        rc = from_mdb(err);
        goto fail;
    }
    read_tail(pl);
    if ((rc = open_store(pl, opts->map_bytes, msg, msglen)) != 0) goto fail;
    remove_extra_rotated(pl);
    /* uv_timer_init cannot fail on a valid loop. */
    rc = uv_timer_init(loop, &pl->timer);
    assert(rc == 0);
    (void)rc;
    pl->timer.data = pl;
    *out = pl;
    return 0;

nomem:
    am_error_setmsg(msg, msglen, "pulllog: out of memory");
    rc = AM_ENOMEM;
fail:
    if (pl) {
        if (pl->env) mdb_env_close(pl->env);
        if (pl->fd >= 0) close(pl->fd);
        free_pulllog(pl);
    }
    return rc;
}

/* ---- the worker: lines ---- */

static int append_json_str(struct am_buf *b, const char *s)
{
    int rc = am_buf_append(b, "\"", 1);
    if (rc == 0) rc = am_buf_append_json_escaped(b, s, strlen(s));
    if (rc == 0) rc = am_buf_append(b, "\"", 1);
    return rc;
}

/* Appends r's JSON line (with its newline) to b. */
static int format_line(const struct rec *r, struct am_buf *b)
{
    char t[TIME_STR_SIZE];
    format_time(r->time_ms, t);
    int rc = am_buf_appendf(b, "{\"time\":\"%s\",\"client\":", t);
    if (!rc) rc = append_json_str(b, r->client);
    if (!rc) rc = am_buf_append_str(b, ",\"node\":");
    if (!rc) rc = append_json_str(b, r->node);
    if (!rc) rc = am_buf_append_str(b, ",\"nodePlatform\":");
    if (!rc) rc = append_json_str(b, r->platform);
    if (!rc)
        rc = am_buf_appendf(
            b, ",\"platformSource\":\"%s\",\"registry\":", am_pulllog_source_name(r->source));
    if (!rc) rc = append_json_str(b, r->registry);
    if (!rc) rc = am_buf_append_str(b, ",\"repository\":");
    if (!rc) rc = append_json_str(b, r->repository);
    if (!rc) rc = am_buf_append_str(b, ",\"tag\":");
    if (!rc) rc = append_json_str(b, r->tag);
    if (!rc) rc = am_buf_append_str(b, ",\"digest\":");
    if (!rc) rc = append_json_str(b, r->digest);
    if (!rc) rc = am_buf_append_str(b, ",\"platformDigest\":");
    if (!rc) rc = append_json_str(b, r->platform_digest);
    if (!rc)
        rc = am_buf_appendf(b, ",\"cacheHit\":%s,\"bytes\":%llu,\"imagePlatforms\":[",
                            r->cache_hit ? "true" : "false", (unsigned long long)r->bytes);
    const char *q = r->platforms;
    for (size_t i = 0; !rc && i < r->n_platforms; i++, q += strlen(q) + 1) {
        if (i) rc = am_buf_append(b, ",", 1);
        if (!rc) rc = append_json_str(b, q);
    }
    if (!rc) rc = am_buf_append_str(b, "]}\n");
    return rc;
}

static void note_file_err(struct batch_out *o, int err, const char *what)
{
    if (!o->file_err) {
        o->file_err = err ? err : EIO;
        o->file_what = what;
    }
}

/* Writes all of p[0..n). Returns 0 or an errno value; *written gets the bytes written. */
static int write_all(int fd, const char *p, size_t n, size_t *written)
{
    *written = 0;
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR) continue;
            return errno;
        }
        if (w == 0) return EIO;
        p += w;
        n -= (size_t)w;
        *written += (size_t)w;
    }
    return 0;
}

/* Writes the lines collected in cbuf; they are dropped (counted) if that fails. */
static void flush_chunk(struct am_pulllog *pl, size_t nlines, struct batch_out *o)
{
    size_t written;
    int err;
    if (nlines == 0) return;
    if (pl->fd < 0) {
        if ((pl->fd = open_log_file(pl->file_path)) < 0) {
            note_file_err(o, errno, "opening");
            o->lines_dropped += nlines;
            am_buf_reset(&pl->cbuf);
            return;
        }
        read_tail(pl);
    }
    if (pl->need_newline && write_all(pl->fd, "\n", 1, &written) == 0) {
        pl->file_size++;
        pl->need_newline = false;
    }
    err = write_all(pl->fd, pl->cbuf.data, pl->cbuf.len, &written);
    if (err) {
        /* Cut a torn line off, so that the next write does not complete it wrongly. */
        if (written && ftruncate(pl->fd, (off_t)pl->file_size) != 0) {
            pl->file_size += written;
            pl->need_newline = true;
        }
        note_file_err(o, err, "writing");
        o->lines_dropped += nlines;
    } else {
        pl->file_size += pl->cbuf.len;
        o->lines_written += nlines;
    }
    am_buf_reset(&pl->cbuf);
}

/* pulls.jsonl.<i>, or pulls.jsonl for i == 0, into out. */
static void rotated_name(const struct am_pulllog *pl, uint32_t i, char *out, size_t outlen)
{
    if (i == 0)
        snprintf(out, outlen, "%s", pl->file_path);
    else
        snprintf(out, outlen, "%s.%u", pl->file_path, i);
}

/* Shifts the rotated files by one and starts a new pulls.jsonl. Returns 0 or an errno
 * value; the file descriptor is then open again when at all possible. */
static int rotate(struct am_pulllog *pl)
{
    size_t n = strlen(pl->file_path) + 16;
    char *from = malloc(n), *to = malloc(n);
    int err = 0;
    if (!from || !to) {
        free(from);
        free(to);
        return ENOMEM;
    }
    close(pl->fd);
    pl->fd = -1;
    if (pl->keep_files == 0) {
        if (unlink(pl->file_path) != 0 && errno != ENOENT) err = errno;
    } else {
        for (uint32_t i = pl->keep_files; i >= 1 && !err; i--) {
            rotated_name(pl, i - 1, from, n);
            rotated_name(pl, i, to, n);
            if (rename(from, to) != 0 && errno != ENOENT) err = errno;
        }
    }
    free(from);
    free(to);
    if ((pl->fd = open_log_file(pl->file_path)) < 0) {
        if (!err) err = errno;
    } else {
        read_tail(pl);
    }
    return err;
}

/* Worker: formats the batch's lines and writes them, rotating on the way. */
static void write_lines(struct am_pulllog *pl, struct batch_out *o)
{
    size_t nlines = 0;
    bool rotate_failed = false;
    am_buf_reset(&pl->cbuf);
    for (const struct rec *r = pl->batch.head; r; r = r->next) {
        am_buf_reset(&pl->lbuf);
        if (format_line(r, &pl->lbuf) != 0) {
            note_file_err(o, ENOMEM, "formatting");
            o->lines_dropped++;
            continue;
        }
        uint64_t would = pl->file_size + pl->cbuf.len + pl->lbuf.len;
        if (pl->rotate_bytes && !rotate_failed && pl->file_size + pl->cbuf.len > 0 &&
            would > pl->rotate_bytes) {
            flush_chunk(pl, nlines, o);
            nlines = 0;
            int err = rotate(pl);
            if (err) {
                note_file_err(o, err, "rotating");
                rotate_failed = true;
            } else {
                o->rotations++;
            }
        }
        if (am_buf_append(&pl->cbuf, pl->lbuf.data, pl->lbuf.len) != 0) {
            /* The chunk is at its limit: write it and start another. */
            flush_chunk(pl, nlines, o);
            nlines = 0;
            if (am_buf_append(&pl->cbuf, pl->lbuf.data, pl->lbuf.len) != 0) {
                note_file_err(o, ENOMEM, "formatting");
                o->lines_dropped++;
                continue;
            }
        }
        nlines++;
    }
    flush_chunk(pl, nlines, o);
    /* Keep the worker buffers small between batches. */
    if (pl->cbuf.cap > ((size_t)1 << 20)) {
        am_buf_cleanup(&pl->cbuf);
        am_buf_init(&pl->cbuf, CHUNK_BUF_MAX);
    }
}

/* ---- the worker: aggregates ---- */

/* The hashed key of r's entry (kind AGG_PULLS) or image (AGG_IMAGE) into key (71 bytes
 * of digest text, NUL-terminated). Returns 0 or ENOMEM. */
static int agg_key(unsigned kind, const char *registry, size_t reg_l, const char *repo,
                   size_t repo_l, const char *tag, size_t tag_l, const char *digest, size_t dg_l,
                   const char *platform, size_t plat_l, char key[AM_DIGEST_STR_MAX + 1],
                   size_t *klen)
{
    unsigned char nat[1 + AM_REGISTRY_MAX + 1 + AM_NAME_MAX + 1 + 1 + AM_DIGEST_STR_MAX + 1 +
                      AM_PLATFORM_FORMAT_ALL_SIZE];
    size_t n = 0;
    if (reg_l > AM_REGISTRY_MAX || repo_l > AM_NAME_MAX || tag_l > AM_TAG_MAX ||
        dg_l > AM_DIGEST_STR_MAX || plat_l >= AM_PLATFORM_FORMAT_ALL_SIZE)
        return ENOMEM; /* cannot happen: records and values are bounded */
    nat[n++] = kind == AGG_PULLS ? 'p' : 'i';
    memcpy(nat + n, registry, reg_l);
    n += reg_l;
    nat[n++] = '\0';
    memcpy(nat + n, repo, repo_l);
    n += repo_l;
    nat[n++] = '\0';
    if (tag_l) {
        memcpy(nat + n, tag, tag_l);
        n += tag_l;
    } else {
        nat[n++] = '@';
        memcpy(nat + n, digest, dg_l);
        n += dg_l;
    }
    if (kind == AGG_PULLS) {
        nat[n++] = '\0';
        memcpy(nat + n, platform, plat_l);
        n += plat_l;
    }
    struct am_digest d;
    am_digest_of(AM_DIGEST_SHA256, nat, n, &d);
    *klen = strlen(d.str);
    if (*klen == 0) return ENOMEM; /* digest.c fails closed on OpenSSL failure */
    memcpy(key, d.str, *klen + 1);
    return 0;
}

/* Worker: folds r into its entry or image, inside txn. Returns 0 or an LMDB/errno. */
static int agg_apply(struct am_pulllog *pl, MDB_txn *txn, unsigned kind, const struct rec *r,
                     struct batch_out *o)
{
    MDB_dbi dbi = kind == AGG_PULLS ? pl->dbi_pulls : pl->dbi_images;
    char key[AM_DIGEST_STR_MAX + 1];
    size_t klen;
    struct agg a;
    int rc;

    size_t tag_l = strlen(r->tag);
    if ((rc = agg_key(kind, r->registry, strlen(r->registry), r->repository, strlen(r->repository),
                      r->tag, tag_l, r->digest, strlen(r->digest), r->platform, strlen(r->platform),
                      key, &klen)))
        return rc;
    MDB_val k = {.mv_size = klen, .mv_data = key}, v;
    bool fresh = true;
    rc = mdb_get(txn, dbi, &k, &v);
    if (rc == 0) {
        if (agg_decode(v.mv_data, v.mv_size, kind, &a) == 0)
            fresh = false;
        else
            o->corrupt++;
    } else if (rc != MDB_NOTFOUND) {
        return rc;
    }
    if (fresh) {
        memset(&a, 0, sizeof a);
        a.kind = kind;
        a.first_ms = a.last_ms = r->time_ms;
    }
    bool newest = fresh || r->time_ms >= a.last_ms;
    a.pulls++;
    if (r->cache_hit) a.hits++;
    a.bytes += r->bytes;
    a.src[r->source]++;
    if (r->time_ms < a.first_ms) a.first_ms = r->time_ms;
    if (r->time_ms > a.last_ms) a.last_ms = r->time_ms;

    /* Strings: from r, except what an older value knows better. Views into v stay valid
     * until the next write in txn, so the value is encoded before the node writes. */
    const char *fields[4] = {r->registry, r->repository, r->tag, r->digest};
    for (int i = 0; i < 4; i++) {
        if (i == S_DIGEST && !newest) continue; /* keep the latest digest served */
        a.str[i] = fields[i];
        a.len[i] = strlen(fields[i]);
    }
    if (kind == AGG_PULLS) {
        a.str[S_PLATFORM] = r->platform;
        a.len[S_PLATFORM] = strlen(r->platform);
        a.n_str = 5;
    } else {
        if (fresh) a.n_str = 4;
        if (r->n_platforms &&
            (fresh || a.platforms_at_ms == 0 || r->time_ms >= a.platforms_at_ms)) {
            const char *q = r->platforms;
            for (size_t i = 0; i < r->n_platforms; i++, q += strlen(q) + 1) {
                a.str[S_PLATFORM + i] = q;
                a.len[S_PLATFORM + i] = strlen(q);
            }
            a.n_str = S_PLATFORM + r->n_platforms;
            a.platforms_at_ms = r->time_ms ? r->time_ms : 1;
        }
    }
    if ((rc = agg_encode(&a, &pl->vbuf)) != 0) return ENOMEM;

    /* Distinct nodes. */
    unsigned char nk[AM_DIGEST_STR_MAX + 1 + AM_PULLLOG_CLIENT_MAX];
    size_t node_l = strlen(r->node);
    memcpy(nk, key, klen);
    memcpy(nk + klen, r->node, node_l);
    MDB_val nkv = {.mv_size = klen + node_l, .mv_data = nk}, nvv;
    if (a.tracked < AM_PULLLOG_NODES_EXACT) {
        unsigned char seen[8];
        am_le_put64(seen, r->time_ms);
        nvv.mv_size = sizeof seen;
        nvv.mv_data = seen;
        rc = mdb_put(txn, pl->dbi_nodes, &nkv, &nvv, MDB_NOOVERWRITE);
        if (rc == 0)
            a.tracked++;
        else if (rc != MDB_KEYEXIST)
            return rc;
    } else {
        rc = mdb_get(txn, pl->dbi_nodes, &nkv, &nvv);
        if (rc == MDB_NOTFOUND)
            a.flags |= AGG_FLAG_OVERFLOW;
        else if (rc)
            return rc;
    }
    hll_add(a.hll, r->node, node_l);
    unsigned char *p = (unsigned char *)pl->vbuf.data;
    p[3] = (unsigned char)a.flags;
    am_le_put32(p + 4, a.tracked);
    memcpy(p + 88, a.hll, HLL_M);

    MDB_val nv = {.mv_size = pl->vbuf.len, .mv_data = pl->vbuf.data};
    return mdb_put(txn, dbi, &k, &nv, 0);
}

/* Worker: the batch's aggregates in one write transaction. */
static int write_aggregates(struct am_pulllog *pl, struct batch_out *o)
{
    MDB_txn *txn = NULL;
    if (!pl->batch.head) return 0;
    int rc = mdb_txn_begin(pl->env, NULL, 0, &txn);
    for (const struct rec *r = pl->batch.head; rc == 0 && r; r = r->next) {
        rc = agg_apply(pl, txn, AGG_PULLS, r, o);
        if (rc == 0) rc = agg_apply(pl, txn, AGG_IMAGE, r, o);
    }
    if (txn) {
        if (rc == 0)
            rc = mdb_txn_commit(txn); /* frees txn whatever it returns */
        else
            mdb_txn_abort(txn); /* nothing of a failed batch is applied */
    }
    if (pl->vbuf.cap > ((size_t)256 << 10)) {
        am_buf_cleanup(&pl->vbuf);
        am_buf_init(&pl->vbuf, VALUE_BUF_MAX);
    }
    return rc;
}

/* Worker thread: touches only the batch, the file state, the worker buffers, the env
 * and bout. */
static void on_batch_work(uv_work_t *w)
{
    struct am_pulllog *pl = w->data;
    struct batch_out *o = &pl->bout;
    memset(o, 0, sizeof *o);
    if (!pl->batch.head) return;
    write_lines(pl, o);
    o->mdb_rc = write_aggregates(pl, o);
}

/* ---- the loop side of the writer ---- */

static void maybe_start(struct am_pulllog *pl);

static void list_append(struct rec_list *l, struct rec *r)
{
    r->next = NULL;
    if (l->tail)
        l->tail->next = r;
    else
        l->head = r;
    l->tail = r;
    l->n++;
    l->bytes += r->size;
}

static void on_batch_done(uv_work_t *w, int uvstatus)
{
    struct am_pulllog *pl = w->data;
    struct rec_list done = pl->batch;
    struct batch_out o = pl->bout;
    pl->batch = (struct rec_list){0};
    (void)uvstatus; /* never canceled: we never call uv_cancel */

    pl->stats.batches++;
    pl->stats.lines_written += o.lines_written;
    pl->stats.lines_dropped += o.lines_dropped;
    pl->stats.rotations += o.rotations;
    pl->stats.corrupt += o.corrupt;
    if (o.corrupt)
        AM_WARN("pulllog: %s: %llu corrupt aggregate record%s restarted", pl->db_path,
                (unsigned long long)o.corrupt, o.corrupt == 1 ? "" : "s");
    if (o.file_err) {
        if (!pl->file_warned)
            AM_WARN("pulllog: %s: %s failed: %s; pull lines are dropped (and counted) until "
                    "writes succeed again",
                    pl->file_path, o.file_what, strerror(o.file_err));
        pl->file_warned = true;
    } else if (pl->file_warned && o.lines_written) {
        AM_INFO("pulllog: %s: writes succeed again (%llu lines dropped since open)", pl->file_path,
                (unsigned long long)pl->stats.lines_dropped);
        pl->file_warned = false;
    }
    if (done.n) {
        if (o.mdb_rc == 0) {
            pl->stats.aggregated += done.n;
            if (pl->store_warned)
                AM_INFO("pulllog: %s: aggregate writes succeed again", pl->db_path);
            pl->store_warned = false;
        } else {
            pl->stats.aggregates_dropped += done.n;
            if (!pl->store_warned)
                AM_WARN("pulllog: %s: aggregate write of %zu record%s failed: %s (%s); "
                        "aggregates are dropped (and counted) until writes succeed again",
                        pl->db_path, done.n, done.n == 1 ? "" : "s", mdb_or_errno_str(o.mdb_rc),
                        am_error_name(from_mdb(o.mdb_rc)));
            pl->store_warned = true;
        }
    }
    for (struct rec *r = done.head, *next; r; r = next) {
        next = r->next;
        pl->buffered_bytes -= r->size;
        pl->seq_done = r->seq;
        free(r);
    }

    /* `running` stays set while the callbacks run, so records and flushes they make wait
     * for the next batch instead of starting one each. */
    struct waiter *ready = NULL, **tail = &ready;
    while (pl->waiters && pl->waiters->target <= pl->seq_done) {
        struct waiter *wt = pl->waiters;
        pl->waiters = wt->next;
        if (!pl->waiters) pl->waiters_tail = NULL;
        wt->next = NULL;
        *tail = wt;
        tail = &wt->next;
    }
    for (struct waiter *wt = ready, *next; wt; wt = next) {
        next = wt->next;
        void (*cb)(void *) = wt->cb;
        void *arg = wt->arg;
        free(wt);
        cb(arg);
    }
    pl->running = false;
    maybe_start(pl);
}

/* Worker thread: nothing else can run any more. */
static void on_close_work(uv_work_t *w)
{
    struct am_pulllog *pl = w->data;
    if (pl->fd >= 0) close(pl->fd);
    pl->fd = -1;
    mdb_env_close(pl->env);
    pl->env = NULL;
}

static void on_close_done(uv_work_t *w, int uvstatus)
{
    struct am_pulllog *pl = w->data;
    void (*done)(void *) = pl->close_done;
    void *arg = pl->close_arg;
    (void)uvstatus;
    assert(!pl->waiters && !pl->pending.head);
    free_pulllog(pl);
    if (done) done(arg);
}

static void on_timer(uv_timer_t *t)
{
    struct am_pulllog *pl = t->data;
    pl->due = true;
    maybe_start(pl);
}

static void on_timer_closed(uv_handle_t *h)
{
    struct am_pulllog *pl = h->data;
    pl->timer_closed = true;
    maybe_start(pl);
}

/* Starts the next batch, arms the timer, or starts the close. Loop thread. */
static void maybe_start(struct am_pulllog *pl)
{
    int rc;
    if (pl->running) return;
    bool want = pl->waiters != NULL;
    if (pl->pending.head)
        want = want || pl->closing || pl->due || pl->interval_ms == 0 ||
               pl->pending.bytes >= pl->flush_bytes;
    pl->work.data = pl;
    if (want) {
        /* Move the first records (up to BATCH_MAX_RECORDS, maybe none) into the batch. */
        struct rec *r = pl->pending.head, *last = NULL;
        size_t n = 0;
        uint64_t bytes = 0;
        while (r && n < BATCH_MAX_RECORDS) {
            bytes += r->size;
            n++;
            last = r;
            r = r->next;
        }
        if (last) {
            pl->batch =
                (struct rec_list){.head = pl->pending.head, .tail = last, .n = n, .bytes = bytes};
            last->next = NULL;
            pl->pending.head = r;
            pl->pending.n -= n;
            pl->pending.bytes -= bytes;
            if (!r) pl->pending.tail = NULL;
        }
        if (!pl->pending.head) {
            pl->due = false;
            if (!pl->timer_closed && !pl->closing) uv_timer_stop(&pl->timer);
        }
        pl->running = true;
        rc = uv_queue_work(pl->loop, &pl->work, on_batch_work, on_batch_done);
    } else if (pl->pending.head) {
        if (!pl->closing && !uv_is_active((uv_handle_t *)&pl->timer))
            uv_timer_start(&pl->timer, on_timer, pl->interval_ms, 0);
        return;
    } else if (pl->closing && pl->timer_closed) {
        pl->running = true;
        rc = uv_queue_work(pl->loop, &pl->work, on_close_work, on_close_done);
    } else {
        return;
    }
    /* uv_queue_work fails only for a NULL work callback. */
    assert(rc == 0);
    (void)rc;
}

int am_pulllog_record(struct am_pulllog *pl, const struct am_pulllog_record *r)
{
    struct rec *c;
    int rc;
    if (!pl) return AM_EINVAL;
    if (!r) {
        rc = AM_EINVAL;
    } else if (pl->closing) {
        rc = AM_EUNAVAILABLE;
    } else if ((rc = rec_new(r, &c)) == 0 && pl->buffered_bytes + c->size > pl->max_buffer_bytes) {
        free(c);
        rc = AM_ETOO_LARGE;
        if (!pl->buffer_warned)
            AM_WARN("pulllog: %s: %llu bytes of records wait for the disk; dropping records "
                    "(and counting them) until it catches up",
                    pl->dir, (unsigned long long)pl->buffered_bytes);
        pl->buffer_warned = true;
    }
    if (rc) {
        pl->stats.refused++;
        return rc;
    }
    if (pl->buffer_warned) {
        AM_INFO("pulllog: %s: accepting records again (%llu refused since open)", pl->dir,
                (unsigned long long)pl->stats.refused);
        pl->buffer_warned = false;
    }
    c->seq = ++pl->seq_accepted;
    list_append(&pl->pending, c);
    pl->buffered_bytes += c->size;
    pl->stats.recorded++;
    maybe_start(pl);
    return 0;
}

int am_pulllog_flush(struct am_pulllog *pl, void (*cb)(void *arg), void *arg)
{
    if (!pl || !cb) return AM_EINVAL;
    if (pl->closing) return AM_EUNAVAILABLE;
    struct waiter *w = malloc(sizeof *w);
    if (!w) return AM_ENOMEM;
    w->next = NULL;
    w->target = pl->seq_accepted;
    w->cb = cb;
    w->arg = arg;
    if (pl->waiters_tail)
        pl->waiters_tail->next = w;
    else
        pl->waiters = w;
    pl->waiters_tail = w;
    maybe_start(pl);
    return 0;
}

void am_pulllog_close(struct am_pulllog *pl, void (*done)(void *arg), void *arg)
{
    assert(!pl->closing); /* closing twice is our bug */
    pl->closing = true;
    pl->close_done = done;
    pl->close_arg = arg;
    if (pl->rtxn) {
        mdb_txn_abort(pl->rtxn);
        pl->rtxn = NULL;
    }
    uv_close((uv_handle_t *)&pl->timer, on_timer_closed);
    maybe_start(pl);
}

void am_pulllog_get_stats(const struct am_pulllog *pl, struct am_pulllog_stats *out)
{
    *out = pl->stats;
}

/* ---- queries: parameters ---- */

enum view { VIEW_PULLS, VIEW_READINESS };

#define P_SINCE    1u
#define P_ARCH     2u
#define P_PLATFORM 4u
#define P_IMAGE    8u
#define P_TARGET   16u

struct params {
    unsigned seen;
    char since[PARAM_MAX + 1];
    char arch[PARAM_MAX + 1];
    char platform[PARAM_MAX + 1];
    char image[PARAM_MAX + 1];
    char target[PARAM_MAX + 1];
};

enum image_mode { IMAGE_ANY, IMAGE_SUBSTRING, IMAGE_EXACT };

struct query {
    enum view view;
    bool has_since;
    uint64_t since_ms;
    bool has_arch;
    char arch[AM_PLATFORM_FIELD_MAX + 1];
    bool has_platform;
    struct am_platform platform;
    enum image_mode image_mode;
    char image[PARAM_MAX + 1];
    struct am_reference ref;
    struct am_platform target;
    struct am_platform_features target_features;
    char target_str[AM_PLATFORM_FORMAT_ALL_SIZE];
};

static int hexval(char c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* %XX-decodes s[0..n) into out (at most max bytes and a NUL). Returns 0, or -1 for a
 * bad escape, a NUL or control byte, or overflow. */
static int pct_decode(const char *s, size_t n, char *out, size_t max)
{
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        int c = (unsigned char)s[i];
        if (c == '%') {
            int h, l;
            if (i + 2 >= n || (h = hexval(s[i + 1])) < 0 || (l = hexval(s[i + 2])) < 0) return -1;
            c = h * 16 + l;
            i += 2;
        }
        if (c < 0x20 || c == 0x7f || o >= max) return -1;
        out[o++] = (char)c;
    }
    out[o] = '\0';
    return 0;
}

static int parse_params(const char *q, size_t len, unsigned allowed, struct params *p, char *msg,
                        size_t msglen)
{
    static const struct {
        const char *name;
        unsigned bit;
        size_t off;
    } known[] = {
        {"since", P_SINCE, offsetof(struct params, since)},
        {"arch", P_ARCH, offsetof(struct params, arch)},
        {"platform", P_PLATFORM, offsetof(struct params, platform)},
        {"image", P_IMAGE, offsetof(struct params, image)},
        {"target", P_TARGET, offsetof(struct params, target)},
    };
    memset(p, 0, sizeof *p);
    size_t i = 0;
    while (i < len) {
        const char *pair = q + i;
        const char *amp = memchr(pair, '&', len - i);
        size_t plen = amp ? (size_t)(amp - pair) : len - i;
        i += plen + 1;
        if (plen == 0) continue;
        const char *eq = memchr(pair, '=', plen);
        size_t klen = eq ? (size_t)(eq - pair) : plen;
        char key[16];
        if (pct_decode(pair, klen, key, sizeof key - 1) != 0) {
            am_error_setmsg(msg, msglen, "unknown query parameter \"%.*s\"",
                            (int)(klen > 32 ? 32 : klen), pair);
            return AM_EBAD_REQUEST;
        }
        size_t k;
        for (k = 0; k < sizeof known / sizeof known[0]; k++)
            if ((known[k].bit & allowed) && strcmp(key, known[k].name) == 0) break;
        if (k == sizeof known / sizeof known[0]) {
            am_error_setmsg(msg, msglen, "unknown query parameter \"%s\"", key);
            return AM_EBAD_REQUEST;
        }
        if (p->seen & known[k].bit) {
            am_error_setmsg(msg, msglen, "%s: given more than once", key);
            return AM_EBAD_REQUEST;
        }
        char *val = (char *)p + known[k].off;
        const char *v = eq ? eq + 1 : pair + plen;
        size_t vlen = eq ? plen - klen - 1 : 0;
        if (pct_decode(v, vlen, val, PARAM_MAX) != 0) {
            am_error_setmsg(msg, msglen,
                            "%s: longer than %u bytes, a bad %%-escape or a control byte", key,
                            PARAM_MAX);
            return AM_EBAD_REQUEST;
        }
        if (val[0]) p->seen |= known[k].bit;
    }
    return 0;
}

static bool all_digits(const char *s)
{
    if (!*s) return false;
    for (; *s; s++)
        if (*s < '0' || *s > '9') return false;
    return true;
}

/* n decimal digits at s into *out. */
static bool digits_at(const char *s, int n, int *out)
{
    int v = 0;
    for (int i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9') return false;
        v = v * 10 + (s[i] - '0');
    }
    *out = v;
    return true;
}

/* RFC 3339 date-time (section 5.6), or a bare full-date, into ms since the epoch. */
static bool parse_rfc3339(const char *s, uint64_t *out)
{
    int y, mo, d, h = 0, mi = 0, sec = 0, oh = 0, om = 0;
    uint64_t frac_ms = 0;
    if (!digits_at(s, 4, &y) || s[4] != '-' || !digits_at(s + 5, 2, &mo) || s[7] != '-' ||
        !digits_at(s + 8, 2, &d))
        return false;
    const char *p = s + 10;
    int sign = 0;
    if (*p) {
        if ((*p != 'T' && *p != 't' && *p != ' ') || !digits_at(p + 1, 2, &h) || p[3] != ':' ||
            !digits_at(p + 4, 2, &mi) || p[6] != ':' || !digits_at(p + 7, 2, &sec))
            return false;
        p += 9;
        if (*p == '.') {
            int nd = 0;
            for (p++; *p >= '0' && *p <= '9'; p++, nd++)
                if (nd < 3) frac_ms = frac_ms * 10 + (uint64_t)(*p - '0');
            if (nd == 0) return false;
            for (; nd < 3; nd++) frac_ms *= 10;
        }
        if (*p == 'Z' || *p == 'z') {
            p++;
        } else if (*p == '+' || *p == '-') {
            sign = *p == '+' ? 1 : -1;
            if (!digits_at(p + 1, 2, &oh) || p[3] != ':' || !digits_at(p + 4, 2, &om)) return false;
            p += 6;
        } else {
            return false;
        }
        if (*p) return false;
    }
    static const int mdays[12] = {31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    if (y < 1970 || mo < 1 || mo > 12 || d < 1 || d > mdays[mo - 1] || h > 23 || mi > 59 ||
        sec > 60 || oh > 23 || om > 59)
        return false;
    bool leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    if (mo == 2 && d == 29 && !leap) return false;
    struct tm tm = {.tm_year = y - 1900,
                    .tm_mon = mo - 1,
                    .tm_mday = d,
                    .tm_hour = h,
                    .tm_min = mi,
                    .tm_sec = sec == 60 ? 59 : sec};
    time_t t = timegm(&tm);
    if (t == (time_t)-1) return false;
    long long secs = (long long)t - sign * (oh * 3600LL + om * 60LL);
    if (secs < 0) return false;
    *out = (uint64_t)secs * 1000u + frac_ms;
    return true;
}

/* since: RFC 3339, unix seconds or a duration back from now_ms. */
static int parse_since(const char *s, uint64_t now, uint64_t *out, char *msg, size_t msglen)
{
    uint64_t v;
    if (all_digits(s)) {
        if (strlen(s) > 12) goto bad; /* beyond year 33000 */
        v = strtoull(s, NULL, 10);
        *out = v * 1000u;
        return 0;
    }
    if (strlen(s) >= 10 && s[4] == '-') {
        if (!parse_rfc3339(s, out)) goto bad;
        return 0;
    }
    if (am_config_parse_duration_ms(s, &v) == 0) {
        *out = now > v ? now - v : 0;
        return 0;
    }
bad:
    am_error_setmsg(msg, msglen,
                    "since: cannot parse \"%.64s\": expected an RFC 3339 time "
                    "(2024-05-01T12:00:00Z), unix seconds or a duration (24h, 90m)",
                    s);
    return AM_EBAD_REQUEST;
}

/* Whether the image filter names a tag or digest: '@', or ':' after the last '/'. */
static bool names_tag_or_digest(const char *s)
{
    if (strchr(s, '@')) return true;
    const char *slash = strrchr(s, '/');
    return strchr(slash ? slash : s, ':') != NULL;
}

static int parse_query(enum view view, const char *qs, size_t len, uint64_t now, struct query *q,
                       char *msg, size_t msglen)
{
    struct params p;
    unsigned allowed = view == VIEW_PULLS ? (P_SINCE | P_ARCH | P_PLATFORM | P_IMAGE)
                                          : (P_SINCE | P_IMAGE | P_TARGET);
    int rc = parse_params(qs ? qs : "", qs ? len : 0, allowed, &p, msg, msglen);
    if (rc) return rc;
    memset(q, 0, sizeof *q);
    q->view = view;
    char why[160] = "";
    if (p.seen & P_SINCE) {
        if ((rc = parse_since(p.since, now, &q->since_ms, msg, msglen))) return rc;
        q->has_since = true;
    }
    if (p.seen & P_ARCH) {
        struct am_platform a;
        if (strchr(p.arch, '/') ||
            am_platform_parse(p.arch, strlen(p.arch), &a, NULL, why, sizeof why) != 0) {
            am_error_setmsg(msg, msglen,
                            "arch: \"%.64s\" is not an architecture (arm64, amd64, arm, 386…); use "
                            "platform= for os/arch/variant",
                            p.arch);
            return AM_EBAD_REQUEST;
        }
        snprintf(q->arch, sizeof q->arch, "%s", a.architecture);
        q->has_arch = true;
    }
    if (p.seen & P_PLATFORM) {
        if (am_platform_parse(p.platform, strlen(p.platform), &q->platform, NULL, why,
                              sizeof why) != 0) {
            am_error_setmsg(msg, msglen, "platform: %s", why);
            return AM_EBAD_REQUEST;
        }
        q->has_platform = true;
    }
    if (p.seen & P_IMAGE) {
        snprintf(q->image, sizeof q->image, "%s", p.image);
        q->image_mode = IMAGE_SUBSTRING;
        if (names_tag_or_digest(p.image)) {
            if (am_reference_parse(p.image, strlen(p.image), &q->ref, why, sizeof why) != 0) {
                am_error_setmsg(msg, msglen, "image: %s", why);
                return AM_EBAD_REQUEST;
            }
            q->image_mode = IMAGE_EXACT;
        }
    }
    if (view == VIEW_READINESS) {
        if (!(p.seen & P_TARGET)) {
            am_error_setmsg(msg, msglen, "target: required, a platform such as linux/arm64");
            return AM_EBAD_REQUEST;
        }
        if (am_platform_parse(p.target, strlen(p.target), &q->target, &q->target_features, why,
                              sizeof why) != 0) {
            am_error_setmsg(msg, msglen, "target: %s", why);
            return AM_EBAD_REQUEST;
        }
        am_platform_format_all(&q->target, &q->target_features, q->target_str,
                               sizeof q->target_str);
    }
    return 0;
}

/* ---- queries: reading ---- */

/* One matching entry or image, copied out of the map: strings after the struct. */
struct entry {
    uint64_t pulls, nodes, hits, bytes, first_ms, last_ms;
    uint64_t src[N_SOURCES];
    size_t n_str;
    const char *str[]; /* n_str NUL-terminated strings, stored after the array */
};

struct entries {
    struct entry **v;
    size_t n, cap;
};

static void entries_free(struct entries *e)
{
    for (size_t i = 0; i < e->n; i++) free(e->v[i]);
    free(e->v);
    e->v = NULL;
    e->n = e->cap = 0;
}

static int entries_add(struct entries *e, const struct agg *a)
{
    if (e->n == e->cap) {
        size_t cap = e->cap ? e->cap * 2 : 64;
        struct entry **v = realloc(e->v, cap * sizeof *v);
        if (!v) return AM_ENOMEM;
        e->v = v;
        e->cap = cap;
    }
    size_t strings = 0;
    for (size_t i = 0; i < a->n_str; i++) strings += a->len[i] + 1;
    struct entry *x = malloc(sizeof *x + a->n_str * sizeof(char *) + strings);
    if (!x) return AM_ENOMEM;
    x->pulls = a->pulls;
    x->nodes = agg_nodes(a);
    x->hits = a->hits;
    x->bytes = a->bytes;
    x->first_ms = a->first_ms;
    x->last_ms = a->last_ms;
    memcpy(x->src, a->src, sizeof x->src);
    x->n_str = a->n_str;
    char *p = (char *)(x->str + a->n_str);
    for (size_t i = 0; i < a->n_str; i++) {
        memcpy(p, a->str[i], a->len[i]);
        p[a->len[i]] = '\0';
        x->str[i] = p;
        p += a->len[i] + 1;
    }
    e->v[e->n++] = x;
    return 0;
}

static bool view_eq(const char *s, size_t n, const char *lit)
{
    return strlen(lit) == n && memcmp(s, lit, n) == 0;
}

/* Whether a passes the since and image filters. */
static bool match_common(const struct query *q, const struct agg *a)
{
    if (q->has_since && a->last_ms < q->since_ms) return false;
    if (q->image_mode == IMAGE_SUBSTRING) {
        char name[AM_REGISTRY_MAX + 1 + AM_NAME_MAX + 1];
        snprintf(name, sizeof name, "%.*s/%.*s", (int)a->len[S_REGISTRY], a->str[S_REGISTRY],
                 (int)a->len[S_REPOSITORY], a->str[S_REPOSITORY]);
        if (!strstr(name, q->image)) return false;
    } else if (q->image_mode == IMAGE_EXACT) {
        const struct am_reference *r = &q->ref;
        if (!view_eq(a->str[S_REGISTRY], a->len[S_REGISTRY], r->registry) ||
            !view_eq(a->str[S_REPOSITORY], a->len[S_REPOSITORY], r->repository))
            return false;
        if (r->has_tag && !view_eq(a->str[S_TAG], a->len[S_TAG], r->tag)) return false;
        if (!r->has_tag && a->len[S_TAG]) return false; /* by digest only */
        if (r->has_digest && !view_eq(a->str[S_DIGEST], a->len[S_DIGEST], r->digest.str))
            return false;
    }
    return true;
}

static bool match_pulls(const struct query *q, const struct agg *a)
{
    if (!match_common(q, a)) return false;
    if (!q->has_arch && !q->has_platform) return true;
    struct am_platform p;
    if (!a->len[S_PLATFORM] ||
        am_platform_parse(a->str[S_PLATFORM], a->len[S_PLATFORM], &p, NULL, NULL, 0) != 0)
        return false;
    if (q->has_arch && strcmp(p.architecture, q->arch) != 0) return false;
    if (q->has_platform && !am_platform_equal(&p, &q->platform)) return false;
    return true;
}

/* Readiness: 1 when no platform of the image runs on the target, 0 when one does, -1
 * when its platforms are unknown. */
static int readiness_class(const struct query *q, const struct agg *a)
{
    if (a->n_str <= S_PLATFORM) return -1;
    for (size_t i = S_PLATFORM; i < a->n_str; i++) {
        struct am_platform p;
        struct am_platform_features f;
        if (am_platform_parse(a->str[i], a->len[i], &p, &f, NULL, 0) != 0) continue;
        if (am_platform_matches(&q->target, &p) &&
            am_platform_features_match(&q->target, &q->target_features, &f))
            return 0;
    }
    return 1;
}

/* Runs q over the committed aggregates: entries for /pulls; not-ready and unknown
 * images for /readiness. Returns 0, AM_ENOMEM, AM_ESTORE or AM_EUNAVAILABLE. */
static int scan(struct am_pulllog *pl, const struct query *q, struct entries *out,
                struct entries *unknown)
{
    MDB_cursor *cur = NULL;
    MDB_val k, v;
    int rc;
    uint64_t bad = 0;

    if (!pl || pl->closing) return AM_EUNAVAILABLE;
    if (pl->rtxn && mdb_txn_renew(pl->rtxn) != 0) {
        mdb_txn_abort(pl->rtxn);
        pl->rtxn = NULL;
    }
    if (!pl->rtxn && (rc = mdb_txn_begin(pl->env, NULL, MDB_RDONLY, &pl->rtxn)) != 0) {
        pl->rtxn = NULL;
        AM_WARN("pulllog: %s: read transaction: %s", pl->db_path, mdb_strerror(rc));
        return from_mdb(rc) == AM_ENOMEM ? AM_ENOMEM : AM_ESTORE;
    }
    unsigned kind = q->view == VIEW_PULLS ? AGG_PULLS : AGG_IMAGE;
    MDB_dbi dbi = kind == AGG_PULLS ? pl->dbi_pulls : pl->dbi_images;
    if ((rc = mdb_cursor_open(pl->rtxn, dbi, &cur)) != 0) {
        AM_WARN("pulllog: %s: cursor: %s", pl->db_path, mdb_strerror(rc));
        rc = AM_ESTORE;
        goto done;
    }
    int op = MDB_FIRST;
    while ((rc = mdb_cursor_get(cur, &k, &v, (MDB_cursor_op)op)) == 0) {
        op = MDB_NEXT;
        struct agg a;
        if (agg_decode(v.mv_data, v.mv_size, kind, &a) != 0) {
            bad++;
            continue;
        }
        if (kind == AGG_PULLS) {
            if (match_pulls(q, &a) && (rc = entries_add(out, &a)) != 0) goto done;
        } else if (match_common(q, &a)) {
            int c = readiness_class(q, &a);
            if (c == 1 && (rc = entries_add(out, &a)) != 0) goto done;
            if (c == -1 && (rc = entries_add(unknown, &a)) != 0) goto done;
        }
    }
    if (rc == MDB_NOTFOUND) {
        rc = 0;
    } else {
        AM_WARN("pulllog: %s: reading aggregates: %s", pl->db_path, mdb_strerror(rc));
        rc = AM_ESTORE;
    }
done:
    if (cur) mdb_cursor_close(cur);
    mdb_txn_reset(pl->rtxn);
    if (bad) {
        pl->stats.corrupt += bad;
        AM_WARN("pulllog: %s: skipped %llu corrupt aggregate record%s", pl->db_path,
                (unsigned long long)bad, bad == 1 ? "" : "s");
    }
    return rc;
}

static int cmp_image(const struct entry *a, const struct entry *b)
{
    int c = strcmp(a->str[S_REGISTRY], b->str[S_REGISTRY]);
    if (!c) c = strcmp(a->str[S_REPOSITORY], b->str[S_REPOSITORY]);
    if (!c) c = strcmp(a->str[S_TAG], b->str[S_TAG]);
    if (!c) c = strcmp(a->str[S_DIGEST], b->str[S_DIGEST]);
    return c;
}

static int cmp_pulls_entry(const void *pa, const void *pb)
{
    const struct entry *a = *(const struct entry *const *)pa, *b = *(const struct entry *const *)pb;
    int c = cmp_image(a, b);
    /* By the name shown: "" is "unknown". */
    return c ? c
             : strcmp(a->str[S_PLATFORM][0] ? a->str[S_PLATFORM] : "unknown",
                      b->str[S_PLATFORM][0] ? b->str[S_PLATFORM] : "unknown");
}

static int cmp_readiness_entry(const void *pa, const void *pb)
{
    const struct entry *a = *(const struct entry *const *)pa, *b = *(const struct entry *const *)pb;
    if (a->pulls != b->pulls) return a->pulls > b->pulls ? -1 : 1;
    return cmp_image(a, b);
}

/* ---- queries: JSON ---- */

static int append_time(struct am_buf *b, uint64_t ms)
{
    char t[TIME_STR_SIZE];
    format_time(ms, t);
    return am_buf_appendf(b, "\"%s\"", t);
}

static int append_pulls_entry(struct am_buf *b, const struct entry *e)
{
    int rc = am_buf_append_str(b, "{\"image\":\"");
    if (!rc) rc = am_buf_append_json_escaped(b, e->str[S_REGISTRY], strlen(e->str[S_REGISTRY]));
    if (!rc) rc = am_buf_append(b, "/", 1);
    if (!rc) rc = am_buf_append_json_escaped(b, e->str[S_REPOSITORY], strlen(e->str[S_REPOSITORY]));
    if (!rc) rc = am_buf_append_str(b, "\",\"tag\":");
    if (!rc) rc = append_json_str(b, e->str[S_TAG]);
    if (!rc) rc = am_buf_append_str(b, ",\"digest\":");
    if (!rc) rc = append_json_str(b, e->str[S_DIGEST]);
    if (!rc) rc = am_buf_append_str(b, ",\"platform\":");
    if (!rc) rc = append_json_str(b, e->str[S_PLATFORM][0] ? e->str[S_PLATFORM] : "unknown");
    if (!rc)
        rc = am_buf_appendf(b,
                            ",\"pulls\":%llu,\"nodes\":%llu,\"cacheHits\":%llu,\"bytes\":%llu,"
                            "\"sources\":{\"header\":%llu,\"child-manifest\":%llu,"
                            "\"config\":%llu,\"unknown\":%llu},\"firstPull\":",
                            (unsigned long long)e->pulls, (unsigned long long)e->nodes,
                            (unsigned long long)e->hits, (unsigned long long)e->bytes,
                            (unsigned long long)e->src[AM_PULLLOG_SOURCE_HEADER],
                            (unsigned long long)e->src[AM_PULLLOG_SOURCE_CHILD_MANIFEST],
                            (unsigned long long)e->src[AM_PULLLOG_SOURCE_CONFIG],
                            (unsigned long long)e->src[AM_PULLLOG_SOURCE_UNKNOWN]);
    if (!rc) rc = append_time(b, e->first_ms);
    if (!rc) rc = am_buf_append_str(b, ",\"lastPull\":");
    if (!rc) rc = append_time(b, e->last_ms);
    if (!rc) rc = am_buf_append(b, "}", 1);
    return rc;
}

static int append_image_entry(struct am_buf *b, const struct entry *e)
{
    int rc = am_buf_append_str(b, "{\"image\":\"");
    if (!rc) rc = am_buf_append_json_escaped(b, e->str[S_REGISTRY], strlen(e->str[S_REGISTRY]));
    if (!rc) rc = am_buf_append(b, "/", 1);
    if (!rc) rc = am_buf_append_json_escaped(b, e->str[S_REPOSITORY], strlen(e->str[S_REPOSITORY]));
    if (!rc) rc = am_buf_append(b, e->str[S_TAG][0] ? ":" : "@", 1);
    const char *ref = e->str[S_TAG][0] ? e->str[S_TAG] : e->str[S_DIGEST];
    if (!rc) rc = am_buf_append_json_escaped(b, ref, strlen(ref));
    if (!rc) rc = am_buf_append_str(b, "\",\"tag\":");
    if (!rc) rc = append_json_str(b, e->str[S_TAG]);
    if (!rc) rc = am_buf_append_str(b, ",\"digest\":");
    if (!rc) rc = append_json_str(b, e->str[S_DIGEST]);
    if (!rc) rc = am_buf_append_str(b, ",\"platforms\":[");
    for (size_t i = S_PLATFORM; !rc && i < e->n_str; i++) {
        if (i > S_PLATFORM) rc = am_buf_append(b, ",", 1);
        if (!rc) rc = append_json_str(b, e->str[i]);
    }
    if (!rc)
        rc = am_buf_appendf(b, "],\"pulls\":%llu,\"nodes\":%llu,\"firstPull\":",
                            (unsigned long long)e->pulls, (unsigned long long)e->nodes);
    if (!rc) rc = append_time(b, e->first_ms);
    if (!rc) rc = am_buf_append_str(b, ",\"lastPull\":");
    if (!rc) rc = append_time(b, e->last_ms);
    if (!rc) rc = am_buf_append(b, "}", 1);
    return rc;
}

/* Appends "name":[…] of at most AM_PULLLOG_QUERY_MAX_ENTRIES entries; *truncated is set
 * when some were left out. */
static int append_list(struct am_buf *b, const char *name, const struct entries *e,
                       int (*one)(struct am_buf *, const struct entry *), bool *truncated)
{
    int rc = am_buf_appendf(b, "\"%s\":[", name);
    size_t n = e->n;
    if (n > AM_PULLLOG_QUERY_MAX_ENTRIES) {
        n = AM_PULLLOG_QUERY_MAX_ENTRIES;
        *truncated = true;
    }
    for (size_t i = 0; !rc && i < n; i++) {
        if (i) rc = am_buf_append(b, ",", 1);
        if (!rc) rc = one(b, e->v[i]);
    }
    if (!rc) rc = am_buf_append(b, "]", 1);
    return rc;
}

static int format_answer(struct am_pulllog *pl, const struct query *q, struct am_buf *out)
{
    struct entries list = {0}, unknown = {0};
    size_t mark = out->len;
    bool truncated = false;
    int rc = scan(pl, q, &list, &unknown);
    if (rc) goto done;
    /* qsort's array must not be NULL, even for no elements. */
    if (q->view == VIEW_PULLS) {
        if (list.n > 1) qsort(list.v, list.n, sizeof *list.v, cmp_pulls_entry);
        rc = am_buf_append_str(out, "{\"since\":");
    } else {
        if (list.n > 1) qsort(list.v, list.n, sizeof *list.v, cmp_readiness_entry);
        if (unknown.n > 1) qsort(unknown.v, unknown.n, sizeof *unknown.v, cmp_readiness_entry);
        rc = am_buf_append_str(out, "{\"target\":");
        if (!rc) rc = append_json_str(out, q->target_str);
        if (!rc) rc = am_buf_append_str(out, ",\"since\":");
    }
    if (!rc) rc = q->has_since ? append_time(out, q->since_ms) : am_buf_append_str(out, "null");
    if (!rc) rc = am_buf_append(out, ",", 1);
    if (q->view == VIEW_PULLS) {
        if (!rc) rc = append_list(out, "pulls", &list, append_pulls_entry, &truncated);
    } else {
        if (!rc) rc = append_list(out, "images", &list, append_image_entry, &truncated);
        if (!rc) rc = am_buf_append(out, ",", 1);
        if (!rc) rc = append_list(out, "unknown", &unknown, append_image_entry, &truncated);
    }
    if (!rc) rc = am_buf_appendf(out, ",\"truncated\":%s}", truncated ? "true" : "false");
done:
    entries_free(&list);
    entries_free(&unknown);
    if (rc && out->data) {
        out->len = mark;
        out->data[mark] = '\0';
    }
    return rc;
}

static int query_view(struct am_pulllog *pl, enum view view, const char *qs, size_t len,
                      uint64_t now, struct am_buf *out, char *msg, size_t msglen)
{
    struct query *q = malloc(sizeof *q);
    if (!q) return AM_ENOMEM;
    int rc = parse_query(view, qs, len, now, q, msg, msglen);
    if (rc == 0) rc = format_answer(pl, q, out);
    free(q);
    return rc;
}

int am_pulllog_query_pulls(struct am_pulllog *pl, const char *query, size_t len, uint64_t now_ms,
                           struct am_buf *out, char *msg, size_t msglen)
{
    return query_view(pl, VIEW_PULLS, query, len, now_ms, out, msg, msglen);
}

int am_pulllog_query_readiness(struct am_pulllog *pl, const char *query, size_t len,
                               uint64_t now_ms, struct am_buf *out, char *msg, size_t msglen)
{
    return query_view(pl, VIEW_READINESS, query, len, now_ms, out, msg, msglen);
}

/* ---- the HTTP handler ---- */

struct http_query {
    struct am_pulllog *pl;
    struct am_http_exchange *ex; /* NULL once the client went away */
    struct query q;
};

static struct am_http_header hdr(const char *name, const char *value)
{
    struct am_http_header h = {name, strlen(name), value, strlen(value)};
    return h;
}

/* {"error":{"code":…,"message":…}} with the table's status for err. */
static void respond_error(struct am_http_exchange *ex, int err, const char *message, bool allow)
{
    struct am_buf b;
    am_buf_init(&b, 4096);
    int rc = am_buf_appendf(&b, "{\"error\":{\"code\":\"%s\",\"message\":", am_error_name(err));
    if (!rc) rc = append_json_str(&b, message && *message ? message : am_error_message(err));
    if (!rc) rc = am_buf_append_str(&b, "}}");
    struct am_http_header h[] = {hdr("Content-Type", "application/json"),
                                 hdr("Cache-Control", "no-store"), hdr("Allow", "GET, HEAD")};
    if (rc)
        am_http_respond(ex, 500, NULL, h, 2, NULL, 0);
    else
        am_http_respond(ex, am_error_http_status(err), NULL, h, allow ? 3 : 2, b.data, b.len);
    am_buf_cleanup(&b);
}

static void on_query_gone(void *arg)
{
    struct http_query *hq = arg;
    hq->ex = NULL;
}

static void on_query_flushed(void *arg)
{
    struct http_query *hq = arg;
    struct am_http_exchange *ex = hq->ex;
    if (ex) {
        struct am_buf b;
        am_buf_init(&b, ANSWER_BUF_MAX);
        am_http_set_callbacks(ex, NULL, NULL, NULL);
        int rc = format_answer(hq->pl->closing ? NULL : hq->pl, &hq->q, &b);
        if (rc) {
            respond_error(ex, rc, NULL, false);
        } else {
            struct am_http_header h[] = {hdr("Content-Type", "application/json"),
                                         hdr("Cache-Control", "no-store")};
            am_http_respond(ex, 200, NULL, h, 2, b.data, b.len);
        }
        am_buf_cleanup(&b);
    }
    free(hq);
}

bool am_pulllog_handle(struct am_pulllog *pl, struct am_http_exchange *ex)
{
    const struct am_http_request *req = am_http_request_of(ex);
    enum view view;
    char msg[256];

    if (strcmp(req->path, "/api/v1/pulls") == 0)
        view = VIEW_PULLS;
    else if (strcmp(req->path, "/api/v1/readiness") == 0)
        view = VIEW_READINESS;
    else
        return false;
    if (strcmp(req->method, "GET") != 0 && !req->is_head) {
        respond_error(ex, AM_EUNSUPPORTED, "this endpoint answers GET and HEAD only", true);
        return true;
    }
    if (!pl || pl->closing) {
        respond_error(ex, AM_EUNAVAILABLE, "the pull log is not open", false);
        return true;
    }
    struct http_query *hq = malloc(sizeof *hq);
    if (!hq) {
        respond_error(ex, AM_ENOMEM, NULL, false);
        return true;
    }
    int rc = parse_query(view, req->query, req->query_len, now_ms(), &hq->q, msg, sizeof msg);
    if (rc) {
        AM_INFO("c%llu r%llu %s %s: %s", (unsigned long long)req->conn_id,
                (unsigned long long)req->id, req->method, req->path, msg);
        respond_error(ex, rc, msg, false);
        free(hq);
        return true;
    }
    hq->pl = pl;
    hq->ex = ex;
    /* Flush first, so the answer includes every pull recorded before this request. */
    am_http_set_callbacks(ex, NULL, on_query_gone, hq);
    if (am_pulllog_flush(pl, on_query_flushed, hq) != 0) {
        am_http_set_callbacks(ex, NULL, NULL, NULL);
        respond_error(ex, AM_ENOMEM, NULL, false);
        free(hq);
    }
    return true;
}

/*
 * blobflight — one upstream fetch per blob, streamed to every waiter; hits from the store.
 * See include/archmirror/blobflight.h.
 *
 * DESIGN. A `flight` owns the upstream request and the store writer of one digest; a
 * `waiter` is one client response. A waiter is either LIVE (it has sent every byte the
 * flight received, and is written each new chunk as it arrives) or reads the file (the
 * flight's temp file through a dup'ed fd, or the committed blob) at its own offset on
 * the thread pool. A LIVE waiter whose socket backs up (queued bytes above HIGH_WATER)
 * drops to file mode, and a file-mode waiter that catches up with the flight goes LIVE
 * again, so the fetch never waits for anyone. Every waiter may send at most end-1 bytes
 * until the store verified the blob (size, digest, fsync, rename); only then does it send
 * its last byte, from the file. The fetch itself is paused only when the disk falls
 * behind the network by more than DISK_LAG_MAX bytes, which bounds memory.
 */
#include "archmirror/blobflight.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "archmirror/error.h"
#include "archmirror/http.h"
#include "archmirror/log.h"
#include "archmirror/metrics.h"
#include "archmirror/pagecache.h"

#define READ_CHUNK      (256u * 1024)
#define SENDFILE_CHUNK  (2u << 20)
#define SENDFILE_BURST  4
#define RESIDENT_WINDOW (16u << 20)
#define HIGH_WATER      (1u << 20)
#define DISK_LAG_MAX    (16u << 20)
#define DISK_LAG_RESUME (4u << 20)

struct flight;

struct waiter {
    struct waiter *prev, *next; /* in the flight's list while attached */
    struct am_blobflights *bf;
    struct flight *fl;                  /* NULL when not (or no longer) attached */
    struct am_http_exchange *ex;        /* NULL once the response has ended */
    struct am_blobstore_reader *reader; /* owned: a committed blob being read, or NULL */
    uv_file fd;                         /* -1: none yet */
    bool own_fd;                        /* fd is a dup of the temp file, closed by us */
    uint64_t pos, end;                  /* next byte to send; end exclusive */
    uint64_t resident_end;              /* [pos, resident_end) was in the page cache */
    uint64_t size;                      /* the whole blob's */
    bool verified;                      /* the blob is committed: the last byte may go */
    bool live;
    bool reading; /* req is in flight; the waiter is freed in its callback */
    bool dead;    /* ended while reading */
    bool head_sent;
    bool joined; /* came into a fetch someone else started */
    int status;  /* 200 or 206 */
    struct am_digest digest;
    uv_fs_t req;
    char *buf; /* owned, READ_CHUNK bytes, allocated at the first file read */
};

/* An internal reader of a small blob (imageinfo's config), not a client. */
struct small {
    struct small *next;                 /* in the flight's list while it waits */
    struct flight *fl;                  /* while waiting for the fetch */
    struct am_blobstore_reader *reader; /* owned while reading */
    uv_fs_t req;
    char *buf;
    size_t max;
    int err; /* decided before the read: answered in its callback */
    bool reading;
    bool canceled;
    am_blobflight_small_cb cb;
    void *arg;
};

struct flight {
    struct flight *prev, *next;
    struct small *smalls;
    struct am_blobflights *bf;
    struct am_digest digest;
    struct am_upstream_req *ureq;       /* NULL once done or cancelled */
    struct am_blobstore_writer *writer; /* NULL once committed or aborted */
    struct waiter *waiters;
    bool got_head;
    int status;
    int64_t size; /* Content-Length of the upstream's 200, -1 unknown */
    char retry_after[32];
    uint64_t received; /* bytes appended to the writer */
    uint64_t written;  /* bytes in the temp file */
    bool paused;
    bool committing;
    bool verified; /* the store matched size and digest: the last bytes may go */
    bool orphan;   /* failed or cancelled while committing: on_commit only frees it */
};

struct am_blobflights {
    uv_loop_t *loop;
    struct am_blobstore *bs;
    struct flight *flights;
    struct am_blobflight_stats stats;
};

static struct am_http_header hdr(const char *name, const char *value)
{
    struct am_http_header h = {name, strlen(name), value, strlen(value)};
    return h;
}

/* --- waiters ------------------------------------------------------------------------- */

static void waiter_detach(struct waiter *w)
{
    struct flight *fl = w->fl;
    if (!fl) return;
    if (w->prev)
        w->prev->next = w->next;
    else
        fl->waiters = w->next;
    if (w->next) w->next->prev = w->prev;
    w->prev = w->next = NULL;
    w->fl = NULL;
}

/* Frees w now, or marks it so that its pending read frees it. */
static void waiter_free(struct waiter *w)
{
    waiter_detach(w);
    w->ex = NULL;
    if (w->reading) {
        w->dead = true;
        return;
    }
    if (w->own_fd && w->fd >= 0) {
        uv_fs_t req;
        uv_fs_close(w->bf->loop, &req, w->fd, NULL); /* close(2) of a read fd: no I/O wait */
        uv_fs_req_cleanup(&req);
    }
    am_blobstore_close_reader(w->reader);
    free(w->buf);
    free(w);
}

static void waiter_fail(struct waiter *w, int err, const char *retry_after)
{
    if (w->ex) {
        if (w->head_sent) {
            am_http_abort(w->ex);
        } else if (err == AM_ETOOMANYREQUESTS && retry_after && retry_after[0]) {
            struct am_http_header h[] = {hdr("Docker-Distribution-API-Version", "registry/2.0"),
                                         hdr("Retry-After", retry_after)};
            am_http_respond_error(w->ex, err, NULL, NULL, h, 2);
        } else {
            struct am_http_header h[] = {hdr("Docker-Distribution-API-Version", "registry/2.0")};
            am_http_respond_error(w->ex, err, NULL, NULL, h, 1);
        }
    }
    waiter_free(w);
}

static void on_waiter_gone(void *arg)
{
    struct waiter *w = arg;
    w->ex = NULL;
    waiter_free(w);
}

static void waiter_pump(struct waiter *w);

/* With several waiters on one fetch, each following from the temp file by sendfile costs
 * one copy less per byte than being written every chunk live (loopback and NIC alike);
 * the price is following the disk writer instead of the network by one thread-pool hop,
 * which a lone waiter does not pay. */
static bool prefer_file(const struct waiter *w)
{
    return w->fl && w->fl->waiters && w->fl->waiters->next && w->ex && am_http_can_sendfile(w->ex);
}

static void on_waiter_drain(void *arg)
{
    waiter_pump(arg);
}

static struct waiter *waiter_new(struct am_blobflights *bf, struct am_http_exchange *ex,
                                 const struct am_digest *digest)
{
    struct waiter *w = calloc(1, sizeof *w);
    if (!w) return NULL;
    w->bf = bf;
    w->digest = *digest;
    w->ex = ex;
    w->fd = -1;
    w->status = 200;
    am_http_set_callbacks(ex, on_waiter_drain, on_waiter_gone, w);
    return w;
}

/* Sends the response head for a blob of size bytes (w->end/pos/status already set). */
static int waiter_send_head(struct waiter *w, uint64_t size, const char *cache_state)
{
    char crange[96];
    struct am_http_header h[7];
    size_t n = 0;
    h[n++] = hdr("Content-Type", "application/octet-stream");
    h[n++] = hdr("Docker-Content-Digest", w->digest.str);
    h[n++] = hdr("Accept-Ranges", "bytes");
    h[n++] = hdr("Docker-Distribution-API-Version", "registry/2.0");
    h[n++] = hdr("X-Archmirror-Cache", cache_state);
    if (w->status == 206) {
        snprintf(crange, sizeof crange, "bytes %llu-%llu/%llu", (unsigned long long)w->pos,
                 (unsigned long long)(w->end - 1), (unsigned long long)size);
        h[n++] = hdr("Content-Range", crange);
    }
    return am_http_start(w->ex, w->status, NULL, h, n, w->end - w->pos);
}

/* The end of what w may send before the blob is verified. The blob's final byte is held
 * back, so no response that reaches the end of the blob can look complete before the
 * digest matched. A range that stops short of it is answered from the bytes as they
 * arrive (issue #3: a covered range never waits for the whole blob); the client cannot
 * verify a part anyway, and containerd checks the digest of what it assembles. */
static uint64_t waiter_cap(const struct waiter *w)
{
    return w->verified || w->end == 0 || w->end < w->size ? w->end : w->end - 1;
}

/* How far w may send now: what its source holds, up to its cap. */
static uint64_t waiter_limit(const struct waiter *w)
{
    uint64_t cap = waiter_cap(w);
    uint64_t avail = w->fl ? w->fl->written : w->end;
    return avail < cap ? avail : cap;
}

static void on_file_read(uv_fs_t *req)
{
    struct waiter *w = req->data;
    ssize_t n = req->result;
    uv_fs_req_cleanup(req);
    w->reading = false;
    if (w->dead) {
        waiter_free(w);
        return;
    }
    if (n <= 0) {
        AM_WARN("blob read at %llu failed: %s", (unsigned long long)w->pos,
                n == 0 ? "unexpected end of file" : uv_strerror((int)n));
        waiter_fail(w, AM_EIO, NULL);
        return;
    }
    if (am_http_write(w->ex, w->buf, (size_t)n) != 0) return; /* on_gone follows */
    w->pos += (uint64_t)n;
    w->bf->stats.copied_bytes += (uint64_t)n;
    waiter_pump(w);
}

/* Moves w forward in file mode: ends it, goes LIVE, or reads the next piece. */
static void waiter_pump(struct waiter *w)
{
    if (!w->ex || w->reading || w->live || !w->head_sent) return;
    if (w->pos >= w->end) {
        struct am_http_exchange *ex = w->ex;
        w->ex = NULL;
        am_http_end(ex);
        waiter_free(w);
        return;
    }
    if (am_http_queued(w->ex) >= HIGH_WATER) return; /* on_drain brings us back */
    if (w->fl && w->pos == w->fl->received) {
        if (!prefer_file(w)) w->live = true; /* caught up: follow the fetch */
        return;                              /* (or the file: on_written brings us back) */
    }
    uint64_t lim = waiter_limit(w);
    if (w->pos >= lim) return; /* more is on its way: on_written or the commit */
    if (w->fd < 0) {
        int rc = w->fl ? am_blobstore_writer_open_reader(w->fl->writer, &w->fd) : AM_EINVAL;
        if (rc == AM_EUNAVAILABLE) return; /* the temp file is not created yet */
        if (rc) {
            waiter_fail(w, rc, NULL);
            return;
        }
        w->own_fd = true;
    }
    uint64_t want = lim - w->pos;
    if (am_http_can_sendfile(w->ex)) {
        /* Zero-copy from the page cache; a range that is not resident is read on the
         * thread pool below (which brings it in), so the loop never waits for the disk.
         * At most SENDFILE_BURST chunks per wakeup, so one fast client cannot starve
         * the others. */
        bool sent_any = false;
        for (int burst = 0; burst < SENDFILE_BURST && w->pos < lim; burst++) {
            uint64_t left = lim - w->pos;
            size_t chunk = left < SENDFILE_CHUNK ? (size_t)left : SENDFILE_CHUNK;
            if (w->pos + chunk > w->resident_end) {
                /* One query covers RESIDENT_WINDOW: the mapping and mincore cost ~10 % of
                 * a 64 MiB hit when asked per chunk. Pages evicted between the query and
                 * the send only make that send wait for the disk once. */
                size_t win = left < RESIDENT_WINDOW ? (size_t)left : RESIDENT_WINDOW;
                w->resident_end = w->pos + am_pagecache_resident(w->fd, w->pos, win);
            }
            size_t res = w->resident_end > w->pos ? (size_t)(w->resident_end - w->pos) : 0;
            if (res > chunk) res = chunk;
            if (!res) break;
            size_t sent;
            int rc = am_http_sendfile(w->ex, w->fd, w->pos, res, &sent);
            if (rc != 0) {
                if (rc != AM_ENOMEM && rc != AM_EINVAL) return; /* gone: on_gone follows */
                break;
            }
            w->pos += sent;
            w->bf->stats.sendfile_bytes += sent;
            sent_any = true;
            if (sent < res) break; /* the socket is full */
        }
        if (sent_any) return; /* on_drain brings us back when the socket takes more */
        want = lim - w->pos;
    }
    if (!w->buf && !(w->buf = malloc(READ_CHUNK))) {
        waiter_fail(w, AM_ENOMEM, NULL);
        return;
    }
    uv_buf_t b = uv_buf_init(w->buf, want < READ_CHUNK ? (unsigned)want : READ_CHUNK);
    w->req.data = w;
    int rc = uv_fs_read(w->bf->loop, &w->req, w->fd, &b, 1, (int64_t)w->pos, on_file_read);
    if (rc) {
        waiter_fail(w, am_error_from_uv(rc), NULL);
        return;
    }
    w->reading = true;
}

/* --- flights ------------------------------------------------------------------------- */

static struct flight *flight_find(struct am_blobflights *bf, const struct am_digest *d)
{
    for (struct flight *fl = bf->flights; fl; fl = fl->next)
        if (am_digest_equal(&fl->digest, d)) return fl;
    return NULL;
}

static void flight_unlink(struct flight *fl)
{
    struct am_blobflights *bf = fl->bf;
    if (fl->prev)
        fl->prev->next = fl->next;
    else if (bf->flights == fl)
        bf->flights = fl->next;
    if (fl->next) fl->next->prev = fl->prev;
    fl->prev = fl->next = NULL;
    bf->stats.active--;
}

static void on_small_read(uv_fs_t *req)
{
    struct small *sm = req->data;
    ssize_t n = req->result;
    uv_fs_req_cleanup(req);
    if (!sm->canceled) {
        uint64_t size = am_blobstore_reader_size(sm->reader); /* only cancel drops it */
        if (sm->err)
            sm->cb(sm->arg, sm->err, NULL, 0);
        else if (n < 0 || (uint64_t)n != size)
            sm->cb(sm->arg, AM_EIO, NULL, 0);
        else
            sm->cb(sm->arg, 0, sm->buf, (size_t)n);
    }
    am_blobstore_close_reader(sm->reader);
    free(sm->buf);
    free(sm);
}

/* Reads a committed blob for sm; its callback answers. Returns 0 or an error (sm is then
 * still the caller's). */
static int small_read(struct am_blobflights *bf, struct small *sm, const struct am_digest *d)
{
    int rc = am_blobstore_open(bf->bs, d, &sm->reader);
    if (rc) return rc;
    uint64_t size = am_blobstore_reader_size(sm->reader);
    size_t want = size > sm->max ? 0 : (size_t)size;
    if (size > sm->max) sm->err = AM_ETOO_LARGE;
    if (!(sm->buf = malloc(want ? want : 1))) {
        am_blobstore_close_reader(sm->reader);
        sm->reader = NULL;
        return AM_ENOMEM;
    }
    uv_buf_t b = uv_buf_init(sm->buf, (unsigned)want);
    sm->req.data = sm;
    rc =
        uv_fs_read(bf->loop, &sm->req, am_blobstore_reader_fd(sm->reader), &b, 1, 0, on_small_read);
    if (rc) {
        am_blobstore_close_reader(sm->reader);
        sm->reader = NULL;
        free(sm->buf);
        sm->buf = NULL;
        return am_error_from_uv(rc);
    }
    sm->reading = true;
    return 0;
}

/* The fetch a small reader waited for ended: read the blob, or pass the error on. */
static void smalls_finish(struct am_blobflights *bf, struct flight *fl, int err)
{
    while (fl->smalls) {
        struct small *sm = fl->smalls;
        fl->smalls = sm->next;
        sm->fl = NULL;
        int rc = err ? err : small_read(bf, sm, &fl->digest);
        if (rc) {
            sm->cb(sm->arg, rc, NULL, 0);
            free(sm);
        }
    }
}

/* Ends a fetch that cannot complete: every waiter's response is aborted (or answered
 * with err if it has not started), the temp file goes, and the next request starts over. */
static void flight_fail(struct flight *fl, int err)
{
    struct am_blobflights *bf = fl->bf;
    if (err == AM_EDIGEST_MISMATCH)
        AM_ERROR("blob %s: upstream bytes do not match the digest; %s", fl->digest.str,
                 "every waiting response aborted, nothing cached");
    else if (err != AM_ECANCELED)
        AM_WARN("blob %s: fetch failed after %llu bytes: %s", fl->digest.str,
                (unsigned long long)fl->received, am_error_message(err));
    bf->stats.failed++;
    flight_unlink(fl);
    while (fl->waiters) waiter_fail(fl->waiters, err, fl->retry_after);
    smalls_finish(bf, fl, err);
    if (fl->ureq) {
        am_upstream_req_cancel(fl->ureq);
        fl->ureq = NULL;
    }
    if (fl->committing) {
        /* The store still owns the writer and will call on_commit: free the flight there. */
        fl->orphan = true;
        fl->bf = NULL;
        return;
    }
    if (fl->writer) am_blobstore_writer_abort(fl->writer);
    free(fl);
}

/* The bytes are verified (durability is still on its way): every waiter may finish from
 * the temp file now instead of waiting for the fsyncs and the rename. */
static void on_verified(void *arg)
{
    struct flight *fl = arg;
    fl->verified = true;
    for (struct waiter *w = fl->waiters, *next; w; w = next) {
        next = w->next;              /* pump may end and free w */
        if (!w->head_sent) continue; /* an empty blob: its head goes out at on_commit */
        w->verified = true;
        w->live = false;
        waiter_pump(w);
    }
}

static void on_commit(void *arg, int status)
{
    struct flight *fl = arg;
    fl->writer = NULL; /* the store freed it before calling us */
    if (fl->orphan) {
        free(fl);
        return;
    }
    if (status) {
        fl->committing = false;
        flight_fail(fl, status);
        return;
    }
    AM_DEBUG("blob %s: cached (%llu bytes)", fl->digest.str, (unsigned long long)fl->received);
    flight_unlink(fl);
    smalls_finish(fl->bf, fl, 0);
    /* Verified: every waiter may now finish, reading its remaining bytes from the file. */
    while (fl->waiters) {
        struct waiter *w = fl->waiters;
        waiter_detach(w);
        w->verified = true;
        w->live = false;
        if (!w->head_sent) {
            /* Only an empty blob gets here: its head waited for the verification. */
            w->end = w->size = fl->received;
            if (waiter_send_head(w, w->end, w->joined ? "joined" : "miss") != 0) {
                waiter_free(w);
                continue;
            }
            w->head_sent = true;
        }
        if (w->fd < 0 && am_blobstore_open(fl->bf->bs, &fl->digest, &w->reader) == 0)
            w->fd = am_blobstore_reader_fd(w->reader);
        if (w->fd < 0 && w->pos < w->end) {
            waiter_fail(w, AM_ESTORE, NULL);
            continue;
        }
        waiter_pump(w);
    }
    free(fl);
}

static void on_written(void *arg, uint64_t written, int status)
{
    struct flight *fl = arg;
    fl->written = written;
    if (status && !fl->committing) {
        flight_fail(fl, status);
        return;
    }
    if (fl->paused && fl->ureq && fl->received - written < DISK_LAG_RESUME) {
        fl->paused = false;
        am_upstream_req_resume(fl->ureq);
    }
    for (struct waiter *w = fl->waiters, *next; w; w = next) {
        next = w->next; /* pump may end and free w */
        if (!w->live) waiter_pump(w);
    }
}

static void on_up_head(void *arg, const struct am_upstream_response *r)
{
    struct flight *fl = arg;
    fl->got_head = true;
    fl->status = r->status;
    fl->size = r->content_length;
    const struct am_http_header *h = am_http_header_find(r->headers, r->n_headers, "retry-after");
    if (h) {
        size_t n =
            h->value_len < sizeof fl->retry_after - 1 ? h->value_len : sizeof fl->retry_after - 1;
        memcpy(fl->retry_after, h->value, n);
        fl->retry_after[n] = '\0';
    }
    /* Errors are answered in on_done; an empty blob's head waits for its verification. */
    if (r->status != 200 || r->content_length <= 0) return;
    for (struct waiter *w = fl->waiters, *next; w; w = next) {
        next = w->next;
        w->end = w->size = (uint64_t)r->content_length;
        if (waiter_send_head(w, w->end, w->joined ? "joined" : "miss") == 0) {
            w->head_sent = true;
            w->live = !prefer_file(w);
        } else {
            waiter_free(w);
        }
    }
}

static void on_up_body(void *arg, const char *data, size_t len)
{
    struct flight *fl = arg;
    if (fl->status != 200 || fl->size < 0) return; /* an error body: dropped */
    uint64_t off = fl->received;
    int rc = am_blobstore_writer_append(fl->writer, data, len);
    if (rc) {
        flight_fail(fl, rc);
        return;
    }
    for (struct waiter *w = fl->waiters; w; w = w->next) {
        if (!w->live || !w->ex || w->pos != off) continue;
        uint64_t cap = waiter_cap(w);
        uint64_t stop = off + len < cap ? off + len : cap;
        if (stop > w->pos && am_http_write(w->ex, data + (w->pos - off), stop - w->pos) == 0)
            w->pos = stop;
        if (w->ex && am_http_queued(w->ex) >= HIGH_WATER) w->live = false;
    }
    fl->received += len;
    /* A live waiter that stopped short of the chunk (its last byte is held) reads later. */
    for (struct waiter *w = fl->waiters; w; w = w->next)
        if (w->live && w->pos != fl->received) w->live = false;
    if (!fl->paused && fl->received - fl->written > DISK_LAG_MAX) {
        fl->paused = true;
        am_upstream_req_pause(fl->ureq);
    }
}

static void on_up_done(void *arg, int err)
{
    struct flight *fl = arg;
    const char *why = fl->ureq ? am_upstream_req_message(fl->ureq) : NULL;
    fl->ureq = NULL;
    if (err) {
        if (why && why[0]) AM_WARN("blob %s: upstream: %s", fl->digest.str, why);
        flight_fail(fl, err);
    } else if (!fl->got_head) {
        flight_fail(fl, AM_EUPSTREAM_PROTOCOL);
    } else if (fl->status != 200) {
        flight_fail(fl, am_error_from_upstream_status(fl->status, true));
    } else if (fl->size < 0 || fl->received != (uint64_t)fl->size) {
        flight_fail(fl, AM_EUPSTREAM_PROTOCOL);
    } else {
        fl->committing = true;
        if (am_blobstore_writer_commit(fl->writer, on_commit, fl) != 0) {
            fl->committing = false;
            flight_fail(fl, AM_ESTORE);
        }
    }
}

static const struct am_upstream_cbs flight_cbs = {on_up_head, on_up_body, on_up_done};

/* --- serving ------------------------------------------------------------------------- */

/* Answers a Range that cannot be satisfied (RFC 9110 §15.5.17). */
static void respond_416(struct am_http_exchange *ex, uint64_t size)
{
    char crange[48];
    snprintf(crange, sizeof crange, "bytes */%llu", (unsigned long long)size);
    struct am_http_header h[] = {hdr("Docker-Distribution-API-Version", "registry/2.0"),
                                 hdr("Content-Range", crange)};
    am_http_respond_error(ex, AM_ERANGE, NULL, NULL, h, 2);
}

/* Applies the request's Range to a blob of size bytes. Returns 0 (w->pos/end/status
 * set), or AM_ERANGE (416 answered). A malformed Range is ignored (RFC 9110 §14.2). */
static int apply_range(struct waiter *w, const char *range, size_t rlen, uint64_t size)
{
    uint64_t a, b;
    w->pos = 0;
    w->end = w->size = size;
    w->status = 200;
    if (!range) return 0;
    int rc = am_http_parse_range(range, rlen, size, &a, &b);
    if (rc == AM_ERANGE) return rc;
    if (rc == 0) {
        w->pos = a;
        w->end = b;
        w->status = 206;
    }
    return 0;
}

static enum am_blobflight_outcome serve_hit(struct am_blobflights *bf, struct am_http_exchange *ex,
                                            struct am_blobstore_reader *reader,
                                            const struct am_digest *digest)
{
    const struct am_http_request *req = am_http_request_of(ex);
    size_t rlen = 0;
    const char *range = am_http_req_header(ex, "range", &rlen);
    uint64_t size = am_blobstore_reader_size(reader);
    struct waiter *w = waiter_new(bf, ex, digest);
    if (!w) {
        am_blobstore_close_reader(reader);
        am_http_respond_error(ex, AM_ENOMEM, NULL, NULL, NULL, 0);
        return AM_BLOBFLIGHT_SERVED;
    }
    bf->stats.hits++;
    am_metrics_count_cache(true, true);
    w->reader = reader;
    w->fd = am_blobstore_reader_fd(reader);
    w->verified = true;
    if (apply_range(w, range, rlen, size)) {
        w->ex = NULL;
        respond_416(ex, size);
        waiter_free(w);
        return AM_BLOBFLIGHT_SERVED;
    }
    if (waiter_send_head(w, size, "hit") != 0) {
        waiter_free(w); /* the exchange has ended */
        return AM_BLOBFLIGHT_SERVED;
    }
    w->head_sent = true;
    if (req->is_head) w->pos = w->end; /* headers only; pump ends it */
    waiter_pump(w);
    return AM_BLOBFLIGHT_SERVED;
}

/* Joins an existing flight; declines what it cannot answer from it. */
static enum am_blobflight_outcome join(struct am_blobflights *bf, struct flight *fl,
                                       struct am_http_exchange *ex)
{
    const struct am_http_request *req = am_http_request_of(ex);
    size_t rlen = 0;
    const char *range = am_http_req_header(ex, "range", &rlen);
    bool sized = fl->got_head && fl->status == 200 && fl->size > 0; /* heads can go out */
    if ((req->is_head || range) && !sized) return AM_BLOBFLIGHT_DECLINED;

    struct waiter probe = {.status = 200};
    if (sized && apply_range(&probe, range, rlen, (uint64_t)fl->size)) {
        respond_416(ex, (uint64_t)fl->size);
        return AM_BLOBFLIGHT_SERVED;
    }
    /* A range far ahead of the fetch is better asked of the upstream directly. */
    if (range && probe.status == 206 && probe.pos > fl->received) return AM_BLOBFLIGHT_DECLINED;

    struct waiter *w = waiter_new(bf, ex, &fl->digest);
    if (!w) {
        am_http_respond_error(ex, AM_ENOMEM, NULL, NULL, NULL, 0);
        return AM_BLOBFLIGHT_SERVED;
    }
    /* A flight whose bytes are all here and verified (only its fsync and rename are left)
     * answers like the cache it is about to be. */
    if (fl->verified)
        bf->stats.hits++;
    else
        bf->stats.joined++;
    am_metrics_count_cache(true, fl->verified);
    w->joined = true;
    w->verified = fl->verified;
    w->fl = fl;
    w->next = fl->waiters;
    if (fl->waiters) fl->waiters->prev = w;
    fl->waiters = w;
    if (!sized) return AM_BLOBFLIGHT_SERVED; /* on_up_head sends the head */
    w->pos = probe.pos;
    w->end = probe.end;
    w->size = probe.size;
    w->status = probe.status;
    if (waiter_send_head(w, (uint64_t)fl->size, fl->verified ? "hit" : "joined") != 0) {
        waiter_free(w);
        return AM_BLOBFLIGHT_SERVED;
    }
    w->head_sent = true;
    if (req->is_head) {
        w->verified = true; /* nothing of the body is sent */
        w->pos = w->end;
    }
    waiter_pump(w);
    return AM_BLOBFLIGHT_SERVED;
}

/* Starts the upstream fetch of d into the store. Returns 0 with *out, AM_EUNAVAILABLE
 * when the store takes no writer now, or the upstream's error. */
static int flight_begin(struct am_blobflights *bf, struct am_upstream *up, const char *path,
                        const char *scope, const struct am_digest *d, struct flight **out)
{
    struct flight *fl = calloc(1, sizeof *fl);
    if (!fl) return AM_ENOMEM;
    fl->bf = bf;
    fl->digest = *d;
    fl->size = -1;
    if (am_blobstore_begin(bf->bs, d, -1, &fl->writer) != 0) {
        free(fl);
        return AM_EUNAVAILABLE;
    }
    am_blobstore_writer_set_on_written(fl->writer, on_written, fl);
    am_blobstore_writer_set_on_verified(fl->writer, on_verified, fl);
    struct am_upstream_request_opts o = {.method = "GET", .path = path, .scope = scope};
    int rc = am_upstream_request(up, &o, &flight_cbs, fl, &fl->ureq);
    if (rc) {
        am_blobstore_writer_abort(fl->writer);
        free(fl);
        return rc;
    }
    fl->next = bf->flights;
    if (bf->flights) bf->flights->prev = fl;
    bf->flights = fl;
    bf->stats.flights++;
    bf->stats.active++;
    *out = fl;
    return 0;
}

static enum am_blobflight_outcome start_flight(struct am_blobflights *bf,
                                               struct am_http_exchange *ex, struct am_upstream *up,
                                               const char *path, const char *scope,
                                               const struct am_digest *d)
{
    struct flight *fl;
    int rc = flight_begin(bf, up, path, scope, d, &fl);
    if (rc == AM_EUNAVAILABLE || rc == AM_ENOMEM) return AM_BLOBFLIGHT_DECLINED;
    if (rc) {
        struct am_http_header h[] = {hdr("Docker-Distribution-API-Version", "registry/2.0")};
        am_http_respond_error(ex, rc, NULL, NULL, h, 1);
        return AM_BLOBFLIGHT_SERVED;
    }
    am_metrics_count_cache(true, false);

    struct waiter *w = waiter_new(bf, ex, d);
    if (!w) {
        am_http_respond_error(ex, AM_ENOMEM, NULL, NULL, NULL, 0);
        return AM_BLOBFLIGHT_SERVED; /* the fetch goes on and fills the cache */
    }
    w->fl = fl;
    fl->waiters = w;
    return AM_BLOBFLIGHT_SERVED;
}

enum am_blobflight_outcome am_blobflights_serve(struct am_blobflights *bf,
                                                struct am_http_exchange *ex, struct am_upstream *up,
                                                const char *path, const char *scope,
                                                const struct am_digest *digest)
{
    const struct am_http_request *req = am_http_request_of(ex);
    struct am_blobstore_reader *reader;
    if (am_blobstore_open(bf->bs, digest, &reader) == 0) return serve_hit(bf, ex, reader, digest);

    struct flight *fl = flight_find(bf, digest);
    if (fl) return join(bf, fl, ex);
    size_t rlen;
    /* A cold HEAD or Range gains nothing from starting a whole fetch now. */
    if (req->is_head || am_http_req_header(ex, "range", &rlen)) return AM_BLOBFLIGHT_DECLINED;
    return start_flight(bf, ex, up, path, scope, digest);
}

int am_blobflights_new(uv_loop_t *loop, struct am_blobstore *bs, struct am_blobflights **out)
{
    struct am_blobflights *bf = calloc(1, sizeof *bf);
    if (!bf) return AM_ENOMEM;
    bf->loop = loop;
    bf->bs = bs;
    *out = bf;
    return 0;
}

void am_blobflights_free(struct am_blobflights *bf)
{
    if (!bf) return;
    while (bf->flights) flight_fail(bf->flights, AM_ECANCELED);
    free(bf);
}

void am_blobflights_get_stats(const struct am_blobflights *bf, struct am_blobflight_stats *out)
{
    *out = bf->stats;
}

int am_blobflights_fetch_small(struct am_blobflights *bf, struct am_upstream *up, const char *path,
                               const char *scope, const struct am_digest *digest, size_t max,
                               am_blobflight_small_cb cb, void *arg, void **handle)
{
    struct small *sm = calloc(1, sizeof *sm);
    if (!sm) return AM_ENOMEM;
    sm->max = max;
    sm->cb = cb;
    sm->arg = arg;
    if (small_read(bf, sm, digest) == 0) {
        *handle = sm;
        return 0;
    }
    struct flight *fl = flight_find(bf, digest);
    if (!fl) {
        int rc = flight_begin(bf, up, path, scope, digest, &fl);
        if (rc) {
            free(sm);
            return rc;
        }
    }
    sm->fl = fl;
    sm->next = fl->smalls;
    fl->smalls = sm;
    *handle = sm;
    return 0;
}

void am_blobflights_cancel_small(struct am_blobflights *bf, void *handle)
{
    struct small *sm = handle;
    (void)bf;
    if (!sm) return;
    if (sm->reading) {
        /* The read finishes on the thread pool and frees sm; its reader is released
         * now, so a closing store never waits for it. */
        sm->canceled = true;
        am_blobstore_close_reader(sm->reader);
        sm->reader = NULL;
        return;
    }
    if (sm->fl) {
        struct small **pp = &sm->fl->smalls;
        while (*pp && *pp != sm) pp = &(*pp)->next;
        if (*pp) *pp = sm->next;
    }
    free(sm);
}

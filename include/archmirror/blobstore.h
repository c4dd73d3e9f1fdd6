/*
 * blobstore — the content-addressed store of blobs (layers, configs) under the data dir.
 *
 * A blob enters the store only through a writer: its bytes stream into a temp file while
 * they are hashed, and only a complete, size- and digest-verified, fsynced file is renamed
 * to its content address. Readers get a plain fd on a committed blob (for sendfile or
 * uv_fs_read); a blob with open readers is never unlinked under them. The store keeps
 * itself under a byte budget by evicting least-recently-used blobs on the thread pool.
 * This module must never make the loop wait on a data write, an fsync, an unlink or an
 * LMDB write, and must never let an unverified byte appear at a content address.
 *
 * On disk, under <data_dir>:
 *   blobs/sha256/<first 2 hex>/<64 hex>   committed blobs (sha512 likewise, 128 hex)
 *   blobs/tmp/<unique>.part                 writers' temp files (removed at open_store)
 *   blobs.lmdb, blobs.lmdb-lock             per-blob metadata (LMDB, owned by this module)
 * The blobs/ tree belongs to this module: a file in blobs/<alg>/ or blobs/<alg>/<hh>/ that
 * is not named as a blob of that directory is removed at open_store. The metadata layout
 * and the startup reconciliation rules are in src/blobstore.c (DESIGN).
 *
 * Threads. Every function here is called on the loop thread of the loop given to
 * am_blobstore_open_store; every callback runs on that loop, never from within the call
 * that registered it. A call that returns an error never runs its callback; one that
 * returns 0 runs it exactly once.
 *
 * Single flight. The store does not coalesce: two writers of one digest may run at once
 * and both commit successfully (the second finds the blob present, removes its temp file
 * and reports 0; if the first fails, the second is put in place). The caller keeps one
 * writer per digest, registers itself as the writer's one on_written observer, and lets
 * each late joiner read the temp file through am_blobstore_writer_open_reader up to
 * written_bytes, then follow on each on_written; once commit's cb reports 0 new joiners
 * open the committed blob instead.
 */
#ifndef ARCHMIRROR_BLOBSTORE_H
#define ARCHMIRROR_BLOBSTORE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "archmirror/digest.h"
#include "archmirror/manifest.h" /* AM_MEDIATYPE_MAX */

struct am_blobstore;
struct am_blobstore_writer;
struct am_blobstore_reader;

/* Zeroed fields take the defaults in brackets. */
struct am_blobstore_options {
    uint64_t max_bytes; /* budget for committed blobs; 0: unbounded [0] */
    unsigned high_pct;  /* eviction starts when bytes used exceed max_bytes*high/100 [95] */
    unsigned low_pct;   /* ... and frees down to max_bytes*low/100 [90]; low <= high <= 100 */
    uint64_t map_bytes; /* LMDB map size of blobs.lmdb [1 GiB] */
};

/* ---- the store ---- */

/* Opens (creating, mkdir -p) the store under data_dir: removes stale temp files,
 * reconciles the metadata with the files on disk (see src/blobstore.c), and evicts in the
 * background if the store is over its budget. Synchronous: meant for startup, before the
 * loop serves. data_dir and opts (may be NULL: defaults) borrowed; loop kept until
 * close's done. Returns 0 with *out owned (release with am_blobstore_close_store), or
 * AM_EINVAL (bad options, path too long), AM_ESTORE (also: schema version newer than
 * this build), AM_ESTORE_READONLY, AM_ESTORE_FULL or AM_ENOMEM, with msg filled (msg may
 * be NULL). */
int am_blobstore_open_store(uv_loop_t *loop, const char *data_dir,
                            const struct am_blobstore_options *opts, struct am_blobstore **out,
                            char *msg, size_t msglen);

/* Stops accepting writers, opens and deletions (they fail with AM_EUNAVAILABLE from now
 * on); lets commits, aborts and evictions in flight finish and their callbacks run;
 * writes the batched access records; closes LMDB; frees the store; then calls done(arg)
 * on the loop, never from within this call. done may be NULL. Every writer must have been
 * committed or aborted and every reader closed before this call (asserted). Call once. */
void am_blobstore_close_store(struct am_blobstore *bs, void (*done)(void *arg), void *arg);

/* Counters since open, for diagnostics and tests. */
struct am_blobstore_stats {
    uint64_t bytes_used;     /* sum of the sizes of committed, visible blobs */
    uint64_t blobs;          /* how many */
    uint64_t hits;           /* am_blobstore_open calls that returned a reader */
    uint64_t misses;         /* ... that returned AM_ENOT_FOUND */
    uint64_t commits;        /* commits that put a new blob at its address */
    uint64_t commits_shared; /* commits that found their blob already there (0 returned) */
    uint64_t commit_failures;
    uint64_t evictions; /* blobs unlinked by the budget */
    uint64_t evicted_bytes;
    uint64_t deletions;     /* blobs unlinked by am_blobstore_del or found corrupt */
    uint64_t meta_failures; /* LMDB batches that failed (logged at WARN) */
    uint64_t writers;       /* live writer objects (including committing/aborting ones) */
    uint64_t readers;       /* open readers */
    /* What open_store found and repaired. */
    uint64_t startup_temp_removed; /* stale temp files (blobs/tmp/NAME.part) */
    uint64_t startup_adopted;      /* files without metadata, given metadata */
    uint64_t startup_orphans;      /* metadata without a file (or corrupt), deleted */
    uint64_t startup_removed;      /* files removed: foreign names, size != metadata */
};
/* Copies the counters into *out. */
void am_blobstore_get_stats(const struct am_blobstore *bs, struct am_blobstore_stats *out);

/* Writes the batched hit counts and access times to LMDB now (in the background) instead
 * of when enough have accumulated. They are also written with every other metadata write
 * and at close; a crash loses at most the unwritten ones, which only steer eviction. */
void am_blobstore_flush(struct am_blobstore *bs);

/* ---- writers ---- */

/* Completion of a commit: 0 (the blob is at its address and can be opened; also when it
 * already was), AM_EDIGEST_MISMATCH (size or digest of the bytes differ from what begin
 * announced), AM_ETOO_LARGE, AM_ESTORE_FULL, AM_ESTORE_READONLY, AM_ENOMEM or AM_ESTORE.
 * On an error the temp file has been removed and nothing is visible. */
typedef void (*am_blobstore_cb)(void *arg, int status);

/* Progress of a writer: written is am_blobstore_writer_written_bytes; status 0, or the
 * error that has just failed the writer (then appends fail with it and the caller must
 * still commit or abort). Runs once when the temp file has been created (written 0), after
 * every write to it, and once on failure; never after abort, never after commit's cb. */
typedef void (*am_blobstore_written_cb)(void *arg, uint64_t written, int status);

/* Starts a blob: queues the creation of a temp file (on the thread pool) and returns at
 * once; appends made before the file exists are queued. expected_size is the size from
 * the descriptor or Content-Length, or -1 when unknown. digest borrowed (copied). Returns
 * 0 with *out (commit or abort it, exactly once), AM_EINVAL (digest not canonical,
 * expected_size < -1), AM_ETOO_LARGE (expected_size over the store's max_bytes),
 * AM_EUNAVAILABLE (store closing) or AM_ENOMEM. A failure to create the file is reported
 * through on_written and commit. A digest already in the store may be written again. */
int am_blobstore_begin(struct am_blobstore *bs, const struct am_digest *digest,
                       int64_t expected_size, struct am_blobstore_writer **out);

/* Records the media type stored with the blob, if known (before commit). mt borrowed.
 * Returns 0, AM_EINVAL (longer than AM_MEDIATYPE_MAX) or AM_ENOMEM. */
int am_blobstore_writer_set_media_type(struct am_blobstore_writer *w, const char *mt);

/* Registers the progress callback (replacing any earlier one; NULL removes it). arg kept
 * until the writer's end (abort, or commit's cb). */
void am_blobstore_writer_set_on_written(struct am_blobstore_writer *w, am_blobstore_written_cb cb,
                                        void *arg);

/* Appends bytes: hashes them (on the loop, as they stream), copies them and queues an
 * ordered write; returns at once. data borrowed. Returns 0, or the writer's latched
 * error: AM_EDIGEST_MISMATCH (more bytes than expected_size), AM_ETOO_LARGE (more than
 * max_bytes), AM_ENOMEM, or the write error reported by on_written. A failed append
 * fails the writer. len 0 does nothing. Not after commit or abort. */
int am_blobstore_writer_append(struct am_blobstore_writer *w, const void *data, size_t len);
/* Calls cb(arg) once during a commit, as soon as every byte is in the temp file and the
 * size and digest matched — before the fsyncs, the rename and the metadata, which only
 * make the blob durable. It may run inside am_blobstore_writer_commit. After it the temp
 * file's bytes are known right (readers of am_blobstore_writer_open_reader may serve
 * them in full); the commit's own cb still reports whether the blob was stored. */
void am_blobstore_writer_set_on_verified(struct am_blobstore_writer *w, void (*cb)(void *arg),
                                         void *arg);

/* As append, without the copy: keeps data[0..len) until it has been written (or the
 * writer is discarded), then calls release(release_arg) on the loop. Returns 0 (release
 * will run exactly once, never from within this call) or an error as append (release
 * will not run; the caller still owns data). len must be > 0 (else AM_EINVAL). */
int am_blobstore_writer_append_ref(struct am_blobstore_writer *w, const void *data, size_t len,
                                   void (*release)(void *arg), void *release_arg);

/* Bytes written to the temp file so far: a reader of that file (see open_reader) can read
 * [0, written) now. Not yet fsynced: that happens at commit. */
uint64_t am_blobstore_writer_written_bytes(const struct am_blobstore_writer *w);
/* Bytes appended (and hashed) so far; appended - written are queued in memory, which a
 * caller uses for backpressure. */
uint64_t am_blobstore_writer_appended_bytes(const struct am_blobstore_writer *w);
/* 0 or the writer's latched error. */
int am_blobstore_writer_status(const struct am_blobstore_writer *w);
/* The temp file's path: returns a view valid until the writer's end. The file exists from
 * the first on_written call until commit renames or abort removes it. */
const char *am_blobstore_writer_temp_path(const struct am_blobstore_writer *w);

/* Returns in *fd a new descriptor (owned: close it) of the temp file, for a late joiner to
 * read what has been written and then follow live. Read it with an explicit offset
 * (pread, uv_fs_read with offset >= 0): it shares the writer's file position. It stays
 * valid whatever becomes of the writer (rename, abort). Returns 0, AM_EUNAVAILABLE (the
 * file is not created yet, or its descriptor has been closed after a commit: open the
 * committed blob instead), the writer's latched error, or AM_ESTORE (dup failed). */
int am_blobstore_writer_open_reader(struct am_blobstore_writer *w, uv_file *fd);

/* Finishes the blob: waits for the queued writes, verifies size and digest, fsyncs,
 * renames it to its address (fsyncing the directory), records its metadata, then calls
 * cb(arg, status) (see am_blobstore_cb). Keeps w until cb on return 0: until then only
 * the accessors (written_bytes, appended_bytes, status, temp_path, open_reader) may be
 * used, so that followers can keep reading; w is freed before cb runs. A failure to
 * write the metadata after the rename does not fail the commit: the blob is verified and
 * in place, and open_store would adopt it (logged, counted in meta_failures). Committing
 * a failed writer is allowed: cb gets its error. Returns 0, or AM_EINVAL (w NULL or
 * already ended: then cb will not run). */
int am_blobstore_writer_commit(struct am_blobstore_writer *w, am_blobstore_cb cb, void *arg);

/* Abandons the blob: takes w; the temp file is removed in the background, queued chunks
 * are released, no callback of w runs any more. Accepts NULL. */
void am_blobstore_writer_abort(struct am_blobstore_writer *w);

/* ---- readers ---- */

/* Opens a committed blob for reading. The open(2) runs on the loop thread: opening an
 * existing file is a metadata operation like an LMDB read, and a reader needs the fd now.
 * Records a hit and the access time (written to LMDB in batches, off the loop). The blob
 * is never unlinked while the reader is open. digest borrowed. Returns 0 with *out
 * (release with am_blobstore_close_reader), AM_ENOT_FOUND (not committed, being removed,
 * or its file was missing or had the wrong size: then it is dropped), AM_EINVAL,
 * AM_EUNAVAILABLE (store closing, or out of file descriptors) or AM_ENOMEM. */
int am_blobstore_open(struct am_blobstore *bs, const struct am_digest *digest,
                      struct am_blobstore_reader **out);
/* The reader's fd, size and media type ("" when unknown): views valid until close. */
uv_file am_blobstore_reader_fd(const struct am_blobstore_reader *r);
uint64_t am_blobstore_reader_size(const struct am_blobstore_reader *r);
const char *am_blobstore_reader_media_type(const struct am_blobstore_reader *r);
/* Closes the fd (close(2) of a read-only fd, on the loop) and frees r; a blob deleted or
 * evicted while read is unlinked after its last reader closes. Accepts NULL. */
void am_blobstore_close_reader(struct am_blobstore_reader *r);

struct am_blobstore_info {
    uint64_t size;
    char media_type[AM_MEDIATYPE_MAX + 1]; /* "" when unknown */
    uint64_t stored_at_ms;                 /* wall clock, ms since the epoch */
    uint64_t last_access_ms;
    uint64_t hits;
    unsigned readers; /* open readers now */
};
/* Describes a committed blob without opening it or counting a hit. Returns 0, or
 * AM_ENOT_FOUND / AM_EINVAL; out is written only on success. */
int am_blobstore_stat(struct am_blobstore *bs, const struct am_digest *digest,
                      struct am_blobstore_info *out);

/* Removes a committed blob (it was found corrupt, or an operator purges it): invisible at
 * once, unlinked in the background after its last reader closes. A commit of the same
 * digest before then renames its new, verified file over the old one (whose readers keep
 * reading the old inode) and cancels the unlink. Returns 0, AM_ENOT_FOUND, AM_EINVAL or
 * AM_EUNAVAILABLE (store closing). */
int am_blobstore_del(struct am_blobstore *bs, const struct am_digest *digest);

#endif

#!/usr/bin/python3
"""The blob cache seen from the client, the upstream and the disk.

upstream: docker-registry with incompressible blobs behind the faultproxy; archmirror
--upstream example.com=<proxy>; the store is <data>/blobs/sha256/<2hex>/<64hex>, temp
files <data>/blobs/tmp/*.part.

BlobCacheTest (default cache config):
* test_1: a hit makes no upstream request, also with the upstream refusing connections;
  exact bytes, Content-Length, Docker-Content-Digest, Accept-Ranges, X-Archmirror-Cache:
  hit; HEAD → 200 with the same headers and no body; the file at the content address
  hashes to its name.
* test_2: Range on a hit: bytes=N-, bytes=N-M (also M past the end: clamped, RFC 9110),
  first/last byte → 206, Content-Range bytes N-M/SIZE, exact bytes; start >= size → 416;
  a suffix range (bytes=-N) is either honoured or ignored (200, whole body), never wrong;
  no upstream request for any of them.
* test_3: Range on a cold blob with no fetch in progress → passed upstream as a range
  GET, 206 with the upstream's bytes.
* test_4: Range on a blob whose fetch is in progress (upstream paused at half): a range
  inside the fetched half is answered from it (no new upstream request); a range beyond
  it does not wait for the paused fetch.
* test_5: SIGTERM, upstream down, start on the same data dir: cached blobs still served
  (GET, HEAD, Range).
* test_6: kill -9 while a blob is being fetched, upstream down, restart: that blob is an
  error (not a short or wrong 200), no *.part left, nothing at its address, every
  committed blob still hashes to its name and is served; upstream back → fetched whole.

BlobEvictionTest (max_size 6MiB, watermarks 95/90):
* test_1: after 10 distinct 1 MiB blobs the bytes under blobs/sha256 are <= 6 MiB
  (eviction is asynchronous: polled); the newest is still a hit, the least recently
  used is gone and is fetched from upstream again on request.
* test_2: a slow download of a cached 4 MiB blob, while other pulls push it out of the
  cache, still gets exact bytes.
"""
import hashlib
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import blobs, faultproxy, httpc, images, testbase  # noqa: E402
from harness.faultproxy import TimedGetThread  # noqa: E402

MiB = 1024 * 1024
REPO = "library/cached"


def Ref(blob, keep=False):
    return blobs.Ref(blob, REPO, keep=keep)




def store_files(data_dir):
    """{path: size} of every file under blobs/sha256."""
    out = {}
    for dirpath, _, files in os.walk(os.path.join(data_dir, "blobs", "sha256")):
        for f in files:
            p = os.path.join(dirpath, f)
            try:
                out[p] = os.path.getsize(p)
            except FileNotFoundError:
                pass
    return out


def file_digest(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


blob_file, part_files, poll = blobs.blob_file, blobs.part_files, testbase.poll


class _Base(testbase.IntegrationCase):
    def setUp(self):
        self.fp.clear_faults()
        self.fp.reset()

    def tearDown(self):
        self.fp.clear_faults()
        if self.fp.mode is not None:
            self.fp.set_up()

    @classmethod
    def push(cls, key, keep=False, **kw):
        b = images.large_blob("cache-" + key, **kw)
        cls.client.push_blob(REPO, b)
        return Ref(b, keep)

    def ctx(self, *results):
        lines = ["--- clients:"] + ["  %r" % (r,) for r in results if r is not None]
        return "\n".join(lines) + self.context(self.am)

    def fetch(self, ref, what="GET"):
        """A complete, exact GET; waits until the blob is committed."""
        r = faultproxy.timed_get(self.am.port, ref.path)
        ctx = "%s: %r%s" % (what, r, self.ctx())
        self.assertEqual(r.status, 200, ctx)
        self.assertTrue(r.complete, ctx)
        self.assertEqual(r.digest, ref.digest, ctx)
        self.assertTrue(poll(lambda: os.path.isfile(blob_file(self.am.data_dir, ref.digest))),
                        "blob not at its content address after a good fetch" + ctx)
        return r

    def assertHit(self, ref, what):
        before = self.fp.total()
        r = faultproxy.timed_get(self.am.port, ref.path)
        ctx = "%s: %r%s" % (what, r, self.ctx())
        self.assertEqual(r.status, 200, ctx)
        self.assertTrue(r.complete, ctx)
        self.assertEqual(r.digest, ref.digest, ctx)
        self.assertEqual(r.content_length, ref.size, ctx)
        self.assertEqual(r.header("Docker-Content-Digest"), ref.digest, ctx)
        self.assertEqual(r.header("Accept-Ranges"), "bytes", ctx)
        self.assertEqual(r.header("X-Archmirror-Cache"), "hit", ctx)
        self.assertEqual(self.fp.total(), before, "a hit made upstream requests" + ctx)
        return r

    def assertHead(self, ref, what):
        before = self.fp.total()
        r = httpc.request(self.am.port, "HEAD", ref.path)
        ctx = "%s: %r%s" % (what, r, self.ctx())
        self.assertEqual(r.status, 200, ctx)
        self.assertEqual(r.header("Content-Length"), str(ref.size), ctx)
        self.assertEqual(r.header("Docker-Content-Digest"), ref.digest, ctx)
        self.assertEqual(r.body, b"", ctx)
        self.assertEqual(self.fp.total(), before, "HEAD of a cached blob went upstream" + ctx)


class BlobCacheTest(_Base):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        testbase.require_archmirror()
        cls.registry = cls.start_registry()
        cls.client = cls.registry.client()
        cls.blobs = {
            "hit": cls.push("hit", mib=4),
            "range": cls.push("range", keep=True, size=2 * MiB + 12345),
            "coldrange": cls.push("coldrange", keep=True, mib=8),
            "inflight": cls.push("inflight", keep=True, mib=16),
            "persist-small": cls.push("persist-small", keep=True, size=300 * 1024 + 7),
            "persist-big": cls.push("persist-big", mib=3),
            "committed": cls.push("committed", mib=2),
            "killed": cls.push("killed", mib=32),
        }
        cls.fp = cls.start_faultproxy(cls.registry)
        cls.am = cls.start_archmirror(upstreams=[("example.com", cls.fp.url)])

    def test_1_hit_without_upstream_even_when_it_is_down(self):
        ref = self.blobs["hit"]
        r = self.fetch(ref, "first GET")
        self.assertEqual(r.header("X-Archmirror-Cache"), "miss", repr(r))
        self.assertEqual(self.fp.count(method="GET", path=ref.up_path), 1, self.ctx())
        path = blob_file(self.am.data_dir, ref.digest)
        self.assertEqual(os.path.getsize(path), ref.size)
        self.assertEqual(file_digest(path), ref.digest, "the cached file is not the blob")
        self.fp.reset()
        self.assertHit(ref, "second GET")
        self.assertHead(ref, "HEAD")
        self.fp.set_down("refuse")
        try:
            self.assertHit(ref, "GET with the upstream refusing connections")
            self.assertHead(ref, "HEAD with the upstream refusing connections")
        finally:
            self.fp.set_up()
        self.assertEqual(self.fp.total(), 0, "hits went upstream" + self.ctx())

    def assertRange(self, ref, spec, first, last, what="", timeout=10):
        """206 with exactly bytes first..last, within timeout seconds (a stall fails)."""
        r = faultproxy.timed_get(self.am.port, ref.path, headers={"Range": spec},
                                 keep_body=True, timeout=timeout)
        ctx = "%s Range %s: %r%s" % (what, spec, r, self.ctx())
        self.assertEqual(r.status, 206, ctx)
        self.assertEqual(r.header("Content-Range"), "bytes %d-%d/%d" % (first, last, ref.size),
                         ctx)
        self.assertEqual(r.header("Content-Length"), str(last - first + 1), ctx)
        self.assertTrue(r.complete, "range response not complete within %ss: %s" % (
            timeout, ctx))
        self.assertEqual(len(r.body), last - first + 1, ctx)
        self.assertTrue(r.body == ref.data[first:last + 1], "wrong bytes for " + ctx)
        return r

    def test_2_ranges_on_a_hit(self):
        ref = self.blobs["range"]
        self.fetch(ref)
        self.fp.reset()
        s = ref.size
        for spec, first, last in (("bytes=0-0", 0, 0), ("bytes=0-", 0, s - 1),
                                  ("bytes=100-", 100, s - 1), ("bytes=1000-1999", 1000, 1999),
                                  ("bytes=1048576-1114111", 1048576, 1114111),
                                  ("bytes=%d-" % (s - 1), s - 1, s - 1),
                                  ("bytes=%d-%d" % (s - 1, s - 1), s - 1, s - 1),
                                  ("bytes=%d-%d" % (s - 10, s + 100), s - 10, s - 1)):
            with self.subTest(range=spec):
                self.assertRange(ref, spec, first, last, "hit")
        for spec in ("bytes=%d-" % s, "bytes=%d-%d" % (s + 100, s + 200)):
            with self.subTest(range=spec):
                r = httpc.request(self.am.port, "GET", ref.path, headers={"Range": spec})
                ctx = "Range %s: %r%s" % (spec, r, self.ctx())
                self.assertEqual(r.status, 416, ctx)
                cr = r.header("Content-Range")
                if cr is not None:
                    self.assertEqual(cr, "bytes */%d" % s, ctx)
        with self.subTest(range="bytes=-500 (suffix)"):
            r = httpc.request(self.am.port, "GET", ref.path, headers={"Range": "bytes=-500"})
            ctx = "suffix range: %r%s" % (r, self.ctx())
            self.assertIn(r.status, (200, 206), ctx)
            if r.status == 206:
                self.assertEqual(r.header("Content-Range"), "bytes %d-%d/%d" % (s - 500, s - 1, s),
                                 ctx)
                self.assertTrue(r.body == ref.data[-500:], ctx)
            else:
                self.assertTrue(r.body == ref.data, ctx)
        self.assertEqual(self.fp.total(), 0, "range requests on a hit went upstream" +
                         self.ctx())

    def test_3_range_on_a_cold_blob_goes_upstream(self):
        ref = self.blobs["coldrange"]
        first, last = 3 * MiB + 17, 3 * MiB + 17 + 65535
        self.assertRange(ref, "bytes=%d-%d" % (first, last), first, last, "cold")
        ranged = [e for e in self.fp.entries(method="GET", path=ref.up_path) if e["range"]]
        self.assertTrue(ranged, "the cold range was not passed upstream as a range GET" +
                        self.ctx())
        path = blob_file(self.am.data_dir, ref.digest)
        if os.path.exists(path):        # a background fill is allowed; a wrong file is not
            self.assertEqual(file_digest(path), ref.digest, "a wrong file at the content "
                             "address after a cold range request" + self.ctx())

    def test_4_range_during_a_fetch_in_progress(self):
        ref = self.blobs["inflight"]
        half = ref.size // 2
        self.fp.gate(ref.up_path, half)
        leader = TimedGetThread(self.am.port, ref.path, name="leader")
        leader.start()
        try:
            self.assertIsNotNone(self.fp.wait_gated(ref.up_path, 20),
                                 "upstream body never reached half" + self.ctx())
            self.assertTrue(poll(lambda: any(os.path.getsize(p) >= half
                                             for p in part_files(self.am.data_dir)), 15),
                            "no *.part file holding the fetched half (%s)%s" % (
                                part_files(self.am.data_dir), self.ctx()))
            for spec, first, last in (("bytes=0-1023", 0, 1023),
                                      ("bytes=%d-%d" % (4 * MiB, 6 * MiB - 1), 4 * MiB,
                                       6 * MiB - 1)):
                with self.subTest(covered=spec):
                    self.assertRange(ref, spec, first, last, "covered by the fetch")
            self.assertEqual(self.fp.count(method="GET", path=ref.up_path), 1,
                             "a range inside the fetched part went upstream" + self.ctx())
            # beyond what was fetched: must not wait for the paused fetch (the gate is
            # still closed while this runs)
            first = ref.size - 4096
            t0 = time.monotonic()
            with self.subTest(beyond="bytes=%d-" % first):
                self.assertRange(ref, "bytes=%d-" % first, first, ref.size - 1,
                                 "beyond the fetched part")
            self.assertIsNone(leader.result, "the leader finished while the fetch was held")
            self.assertLess(time.monotonic() - t0, 10, "range beyond the fetch stalled")
        finally:
            self.fp.release(ref.up_path)
        lres = leader.wait(60)
        self.assertTrue(lres.complete and lres.digest == ref.digest, repr(lres) + self.ctx())
        self.assertTrue(poll(lambda: os.path.isfile(blob_file(self.am.data_dir, ref.digest))),
                        "blob not committed" + self.ctx())

    def test_5_restart_keeps_the_cache(self):
        refs = [self.blobs["persist-small"], self.blobs["persist-big"]]
        for ref in refs:
            self.fetch(ref)
        self.am.stop()          # SIGTERM; raises unless exit 0 and no sanitizer report
        self.fp.set_down("refuse")
        try:
            self.am.port = None
            self.am.start()
            for ref in refs:
                with self.subTest(blob=ref.size):
                    self.assertHit(ref, "after restart, upstream down")
                    self.assertHead(ref, "HEAD after restart, upstream down")
            small = refs[0]
            self.assertRange(small, "bytes=1000-2999", 1000, 2999, "after restart")
        finally:
            self.fp.set_up()

    def test_6_kill_9_during_a_fetch(self):
        good = self.blobs["committed"]
        ref = self.blobs["killed"]
        self.fetch(good)
        self.fp.gate(ref.up_path, 12 * MiB)
        leader = TimedGetThread(self.am.port, ref.path, name="leader", timeout=20)
        leader.start()
        try:
            self.assertIsNotNone(self.fp.wait_gated(ref.up_path, 20),
                                 "the fetch never reached 12 MiB" + self.ctx())
            self.assertTrue(poll(lambda: any(os.path.getsize(p) > 0
                                             for p in part_files(self.am.data_dir)), 15),
                            "no *.part file during the fetch" + self.ctx())
            self.am.proc.kill()                 # SIGKILL to the process group
            self.am.proc = None
        finally:
            self.fp.set_down("refuse")
            self.fp.release(ref.up_path)
        lres = leader.wait(30)
        self.assertFalse(lres.complete, "a killed fetch looked complete: %r" % lres)

        self.am.port = None
        self.am.start()             # LMDB and the store must open after SIGKILL
        d = self.am.data_dir
        try:
            self.assertTrue(poll(lambda: not part_files(d), 3),
                            "stale temp files after restart: %s%s" % (part_files(d),
                                                                      self.ctx()))
            self.assertFalse(os.path.exists(blob_file(d, ref.digest)),
                             "the killed fetch is at its content address" + self.ctx())
            for path, size in store_files(d).items():
                with self.subTest(file=path):
                    name = "sha256:" + os.path.basename(path)
                    self.assertEqual(file_digest(path), name,
                                     "a cached file does not match its name" + self.ctx())
            r = faultproxy.timed_get(self.am.port, ref.path, timeout=20)
            self.assertNotIn(r.status, (200, 206), "the killed fetch's blob was served with "
                             "the upstream down: %r%s" % (r, self.ctx()))
            self.assertIsNotNone(r.status, "no answer at all: %r%s" % (r, self.ctx()))
            h = httpc.request(self.am.port, "HEAD", ref.path)
            self.assertNotEqual(h.status, 200, "HEAD of the killed fetch's blob: %r%s" % (
                h, self.ctx()))
            self.assertHit(good, "committed blob after kill -9 and restart")
        finally:
            self.fp.set_up()
        self.fp.reset()
        r = self.fetch(ref, "upstream back")
        self.assertEqual(self.fp.count(method="GET", path=ref.up_path), 1, self.ctx())


class BlobEvictionTest(_Base):
    MAX = 6 * MiB

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        testbase.require_archmirror()
        cls.registry = cls.start_registry()
        cls.client = cls.registry.client()
        cls.small = [cls.push("evict-%d" % i, mib=1) for i in range(10)]
        cls.big = cls.push("evict-big", mib=4)
        cls.more = [cls.push("evict-more-%d" % i, mib=1) for i in range(4)]
        cls.fp = cls.start_faultproxy(cls.registry)
        cls.am = cls.start_archmirror(
            upstreams=[("example.com", cls.fp.url)],
            config={"cache": {"max_size": "6MiB", "evict_high_watermark": 95,
                              "evict_low_watermark": 90}})

    def stored(self):
        return sum(store_files(self.am.data_dir).values())

    def test_1_bounded_disk_lru(self):
        peak = 0
        for i, ref in enumerate(self.small):
            self.fetch(ref, "blob %d" % i)
            peak = max(peak, self.stored())
            time.sleep(0.25)    # distinct access times, even at 1 s resolution
        ok = poll(lambda: self.stored() <= self.MAX, timeout=5)
        files = store_files(self.am.data_dir)
        self.assertTrue(ok, "blobs/sha256 holds %d bytes > max_size %d (peak %d): %s%s" % (
            self.stored(), self.MAX, peak, sorted(files.values()), self.ctx()))
        present = [os.path.isfile(blob_file(self.am.data_dir, r.digest)) for r in self.small]
        self.assertTrue(present[-1], "the most recently used blob was evicted: %s" % present)
        self.assertFalse(present[0], "the least recently used blob is still cached while "
                         "%d bytes of newer ones are: %s" % (self.stored(), present))
        self.fp.reset()
        self.assertHit(self.small[-1], "newest blob after eviction")
        r = faultproxy.timed_get(self.am.port, self.small[0].path)
        self.assertTrue(r.complete and r.digest == self.small[0].digest, repr(r) + self.ctx())
        self.assertEqual(self.fp.count(method="GET", path=self.small[0].up_path), 1,
                         "an evicted blob was not fetched from upstream again" + self.ctx())
        self.assertTrue(poll(lambda: self.stored() <= self.MAX, timeout=5),
                        "over max_size after the re-fetch" + self.ctx())

    def test_2_eviction_never_breaks_a_download(self):
        big = self.big
        self.fetch(big, "the 4 MiB blob")
        # ~1.3 MiB/s through a 32 KiB receive buffer: ~3 s for 4 MiB
        started = threading.Event()
        slow = TimedGetThread(self.am.port, big.path, name="slow", read_size=32 * 1024,
                              pace=(32 * 1024, 0.025), rcvbuf=32 * 1024,
                              on_headers=lambda r: started.set())
        slow.start()
        self.assertTrue(started.wait(10), "the slow download got no response head" +
                        self.ctx())
        evicted_during = False
        for i, ref in enumerate(self.more):
            self.fetch(ref, "pushing it out, blob %d" % i)
            if not os.path.exists(blob_file(self.am.data_dir, big.digest)) and slow.is_alive():
                evicted_during = True
        res = slow.wait(60)
        self.assertEqual(res.status, 200, repr(res) + self.ctx())
        self.assertTrue(res.complete and res.digest == big.digest,
                        "a download broken by eviction (evicted during it: %s): %r%s" % (
                            evicted_during, res, self.ctx()))
        self.assertTrue(poll(lambda: self.stored() <= self.MAX, timeout=5),
                        "over max_size: %d%s" % (self.stored(), self.ctx()))


if __name__ == "__main__":
    testbase.main()

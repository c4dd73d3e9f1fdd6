#!/usr/bin/python3
"""Blob fetches that fail: upstream cut mid-body, bytes that do not match the digest.

upstream: docker-registry with large incompressible blobs behind the faultproxy;
archmirror --upstream example.com=<proxy>. A gate holds the upstream body early on so
that every waiter is attached to the one fetch before the fault happens.

Whatever the fault, for every waiter: the response is aborted before it is complete (the
final byte is held back until the blob is verified, so a client sees an IncompleteRead or
a reset, never a body of Content-Length bytes); then nothing is at the content address,
no <data>/blobs/**/*.part is left (polled briefly), and the next GET starts a fresh
upstream fetch that returns the right bytes.

* test_1: cut after 8 of 16 MiB with four waiters; retry → second upstream GET, exact.
* test_2: cut (reset) on every fetch: each GET, even one right after a failure, is a new
  upstream fetch and is aborted; once the cut stops, exact bytes.
* test_3: cut at the edges: right after the headers, after 1 byte, one byte short.
* test_4: one byte flipped at 20 MiB of a 32 MiB blob with four waiters → all aborted,
  an error/warning naming the digest in archmirror's log; retry → exact.
* test_5: the flipped byte is the first one, or the last one (the held-back byte itself).
* test_6: a blob the upstream does not have, asked by several clients at once: each gets
  404 BLOB_UNKNOWN (an OCI error, not a 200), nothing is stored, no temp file is left.
"""
import os
import re
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import blobs, faultproxy, httpc, images, testbase  # noqa: E402
from harness.faultproxy import TimedGetThread  # noqa: E402

MiB = 1024 * 1024
REPO = "library/faulty"


def Ref(blob):
    return blobs.Ref(blob, REPO)




blob_file, part_files, poll = blobs.blob_file, blobs.part_files, testbase.poll


class BlobFaultsTest(testbase.IntegrationCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        testbase.require_archmirror()
        cls.registry = cls.start_registry()
        client = cls.registry.client()
        cls.blobs = {}
        for key, mib in (("cut", 16), ("cutalways", 8), ("edges", 4), ("flip", 32),
                         ("flipedges", 4)):
            b = images.large_blob("faults-" + key, mib=mib)
            client.push_blob(REPO, b)
            cls.blobs[key] = Ref(b)
            del b
        cls.fp = cls.start_faultproxy(cls.registry)
        cls.am = cls.start_archmirror(upstreams=[("example.com", cls.fp.url)])

    def setUp(self):
        self.fp.clear_faults()
        self.fp.reset()

    def tearDown(self):
        self.fp.clear_faults()

    # -- helpers -----------------------------------------------------------------------
    def ctx(self, results=()):
        lines = ["--- clients:"] + ["  %r" % (r,) for r in results if r is not None]
        return "\n".join(lines) + self.context(self.am)

    def herd(self, ref, n, gate_at):
        """n clients attached to one fetch held at gate_at; releases the gate once every
        client has its response head; returns their results."""
        self.fp.gate(ref.up_path, gate_at)
        heads = threading.Semaphore(0)
        clients = [TimedGetThread(self.am.port, ref.path, name="w%d" % i,
                                  on_headers=lambda r: heads.release())
                   for i in range(n)]
        try:
            clients[0].start()
            self.assertIsNotNone(self.fp.wait_gated(ref.up_path, 20),
                                 "upstream body never reached the gate" + self.ctx())
            for c in clients[1:]:
                c.start()
            deadline = time.monotonic() + 20
            for i in range(n):
                if not heads.acquire(timeout=max(0.1, deadline - time.monotonic())):
                    self.fail("only %d of %d waiters got a response head while the fetch "
                              "was held%s" % (i, n, self.ctx()))
        finally:
            self.fp.release(ref.up_path)
        return [c.wait(60) for c in clients]

    def assertAborted(self, r, ref, what, results=()):
        ctx = "%s: %r%s" % (what, r, self.ctx(results))
        self.assertEqual(r.status, 200, ctx)
        self.assertEqual(r.content_length, ref.size, ctx)
        self.assertFalse(r.complete, "a failed fetch looked complete to the client: " + ctx)
        self.assertLess(r.nbytes, ref.size, ctx)
        self.assertIn(r.error_type, ("IncompleteRead", "ConnectionResetError"), ctx)

    def assertNothingCached(self, ref, results=()):
        d = self.am.data_dir
        left = poll(lambda: not part_files(d) and not os.path.exists(blob_file(d, ref.digest)),
                    timeout=5)
        self.assertFalse(os.path.exists(blob_file(d, ref.digest)),
                         "a failed fetch was committed to its content address" +
                         self.ctx(results))
        self.assertTrue(left, "temp files left after a failed fetch: %s%s" % (
            part_files(d), self.ctx(results)))

    def assertFreshFetchExact(self, ref, fetches_before):
        r = faultproxy.timed_get(self.am.port, ref.path)
        ctx = "%r%s" % (r, self.ctx())
        self.assertEqual(r.status, 200, ctx)
        self.assertTrue(r.complete, ctx)
        self.assertEqual(r.digest, ref.digest, ctx)
        self.assertEqual(r.header("Docker-Content-Digest"), ref.digest, ctx)
        self.assertEqual(r.header("X-Archmirror-Cache"), "miss", ctx)
        self.assertEqual(self.fp.count(method="GET", path=ref.up_path), fetches_before + 1,
                         "the retry did not start exactly one new upstream fetch" + ctx)
        self.assertTrue(poll(lambda: os.path.isfile(blob_file(self.am.data_dir, ref.digest))),
                        "blob not committed after a good fetch" + ctx)
        r = faultproxy.timed_get(self.am.port, ref.path)
        self.assertTrue(r.complete and r.digest == ref.digest, repr(r) + self.ctx())
        self.assertEqual(r.header("X-Archmirror-Cache"), "hit", repr(r) + self.ctx())
        self.assertEqual(self.fp.count(method="GET", path=ref.up_path), fetches_before + 1,
                         "a hit went upstream" + self.ctx())

    # -- tests -------------------------------------------------------------------------
    def test_1_cut_mid_body_aborts_every_waiter(self):
        ref = self.blobs["cut"]
        self.fp.cut(ref.up_path, 8 * MiB)
        results = self.herd(ref, 4, gate_at=2 * MiB)
        self.assertEqual(self.fp.cuts, 1, "the proxy did not cut" + self.ctx(results))
        for i, r in enumerate(results):
            with self.subTest(waiter=i):
                self.assertAborted(r, ref, "waiter %d" % i, results)
                self.assertLessEqual(r.nbytes, 8 * MiB, repr(r))
        self.assertEqual(self.fp.count(method="GET", path=ref.up_path), 1,
                         "the waiters did not share one fetch" + self.ctx(results))
        self.assertNothingCached(ref, results)
        self.assertFreshFetchExact(ref, 1)
        self.assertTrue(self.am.alive(), "archmirror died" + self.ctx())

    def test_2_cut_every_time_each_get_is_a_new_fetch(self):
        ref = self.blobs["cutalways"]
        self.fp.cut(ref.up_path, 3 * MiB, once=False, mode="reset")
        results = []
        for i in range(3):      # back to back: a retry right after a failure
            r = faultproxy.timed_get(self.am.port, ref.path)
            results.append(r)
            if r.status is None:
                continue        # reset before the head: aborted too, nothing to check
            self.assertAborted(r, ref, "attempt %d" % i, results)
        self.assertEqual(self.fp.count(method="GET", path=ref.up_path), 3,
                         "each GET after a failure must be a fresh upstream fetch" +
                         self.ctx(results))
        self.assertNothingCached(ref, results)
        self.fp.uncut(ref.up_path)
        self.assertFreshFetchExact(ref, 3)

    def test_3_cut_at_the_edges(self):
        ref = self.blobs["edges"]
        fetches = 0
        for after in (0, 1, ref.size - 1):
            with self.subTest(cut_after=after):
                self.fp.cut(ref.up_path, after)
                r = faultproxy.timed_get(self.am.port, ref.path)
                fetches += 1
                self.assertEqual(self.fp.count(method="GET", path=ref.up_path), fetches,
                                 repr(r) + self.ctx())
                if after == 0 and r.status != 200:
                    # nothing of the body arrived before the head went out: an error
                    # status is an honest answer too, but never a 2xx
                    self.assertGreaterEqual(r.status or 500, 500, repr(r) + self.ctx())
                else:
                    self.assertAborted(r, ref, "cut after %d bytes" % after)
                self.assertNothingCached(ref, [r])
        self.fp.uncut()
        self.assertFreshFetchExact(ref, fetches)

    def test_4_corrupted_byte_aborts_every_waiter(self):
        ref = self.blobs["flip"]
        self.fp.flip(ref.up_path, offset=20 * MiB)
        results = self.herd(ref, 4, gate_at=1 * MiB)
        self.assertGreaterEqual(self.fp.flipped, 1, "the proxy never flipped" + self.ctx())
        up = self.fp.wait_body_end(ref.up_path)
        self.assertEqual(up and up["outcome"], "complete",
                         "the corrupted body should reach archmirror whole" + self.ctx(results))
        for i, r in enumerate(results):
            with self.subTest(waiter=i):
                self.assertAborted(r, ref, "waiter %d" % i, results)
        self.assertEqual(self.fp.count(method="GET", path=ref.up_path), 1,
                         "the waiters did not share one fetch" + self.ctx(results))
        self.assertNothingCached(ref, results)
        self.assertLogsMismatch(ref)
        self.fp.unflip(ref.up_path)
        self.assertFreshFetchExact(ref, 1)

    def test_5_corrupted_first_or_last_byte(self):
        ref = self.blobs["flipedges"]
        fetches = 0
        for off in (0, ref.size - 1):
            with self.subTest(flip_at=off):
                self.fp.flip(ref.up_path, offset=off)
                r = faultproxy.timed_get(self.am.port, ref.path)
                fetches += 1
                self.assertAborted(r, ref, "byte %d flipped" % off)
                self.assertEqual(self.fp.count(method="GET", path=ref.up_path), fetches,
                                 repr(r) + self.ctx())
                self.assertNothingCached(ref, [r])
                self.fp.unflip()
        self.assertLogsMismatch(ref)
        self.assertFreshFetchExact(ref, fetches)

    def assertLogsMismatch(self, ref):
        pat = re.compile(r"\b(error|warn)\b.*" + re.escape(ref.digest))
        found = poll(lambda: any(pat.search(l) for l in self.am.log().splitlines()), timeout=3)
        self.assertTrue(found, "no error/warn line naming %s in archmirror's log%s" % (
            ref.digest, self.ctx()))


    def test_6_upstream_404_for_every_waiter(self):
        missing = images.large_blob("faults-never-pushed", size=1000)
        path = "/v2/%s/blobs/%s?ns=example.com" % (REPO, missing.digest)
        clients = [TimedGetThread(self.am.port, path, name="n%d" % i, keep_body=True)
                   for i in range(4)]
        for c in clients:
            c.start()
        results = [c.wait(30) for c in clients]
        for i, r in enumerate(results):
            with self.subTest(client=i):
                ctx = "%r%s" % (r, self.ctx(results))
                self.assertEqual(r.status, 404, ctx)
                self.assertIn("BLOB_UNKNOWN", httpc.oci_error_codes(r.body), ctx)
        self.assertGreaterEqual(self.fp.count(method="GET", path="/v2/%s/blobs/%s" % (
            REPO, missing.digest)), 1, self.ctx())
        ref = Ref(missing)
        self.assertNothingCached(ref, results)

if __name__ == "__main__":
    testbase.main()

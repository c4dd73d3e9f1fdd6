#!/usr/bin/python3
"""Blob single-flight: one upstream fetch per blob, streamed to every waiter as it arrives.

upstream: docker-registry with large incompressible blobs (images.large_blob) behind the
faultproxy (throttled, gated); archmirror --upstream example.com=<proxy>. Every test uses
its own uncached blob. Event order is compared on one clock (faultproxy.now): the proxy
stamps when it sent the upstream body, the clients (faultproxy.timed_get) when they got
bytes.

* test_1: 20 concurrent clients on one uncached 64 MiB blob, upstream throttled to
  64 MiB/s: exactly one upstream GET and never two open at once; all 20 bodies hash to
  the digest; exactly one response says X-Archmirror-Cache: miss, the others joined; at
  least one client (in fact every client that asked well before the end) got its first
  byte before the upstream body had finished.
* test_2: a slow reader (the one that started the fetch, reading with sleeps) still gets
  exact bytes, and neither the upstream fetch nor three fast joiners wait for it: all of
  them finish before the slow reader has half the blob.
* test_3: the client that started the fetch disconnects early, so does a joiner; the
  fetch goes on, the other joiners get exact bytes, the blob ends up cached (next GET is
  a hit with no upstream request).
* test_4: a late joiner arriving when half the body is fetched (upstream paused there)
  gets that half from the temp file without waiting for the upstream, then follows live;
  exact bytes, X-Archmirror-Cache: joined.
* test_5: clients keep arriving every 50 ms from before the fetch starts until after it
  was committed (16 MiB at 16 MiB/s): every one gets exact bytes, one upstream GET, and
  the labels follow the timeline: one miss, then joined, then hit (no race at commit).
"""
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import blobs, faultproxy, images, testbase  # noqa: E402
from harness.faultproxy import TimedGetThread  # noqa: E402

MiB = 1024 * 1024
REPO = "library/big"


def Ref(blob):
    return blobs.Ref(blob, REPO)




blob_file, part_files, poll = blobs.blob_file, blobs.part_files, testbase.poll


class BlobSingleFlightTest(testbase.IntegrationCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        testbase.require_archmirror()
        cls.registry = cls.start_registry()
        client = cls.registry.client()
        cls.blobs = {}
        for key, mib in (("herd", 64), ("slow", 32), ("gone", 16), ("late", 32),
                         ("stagger", 16)):
            b = images.large_blob("singleflight-" + key, mib=mib)
            client.push_blob(REPO, b)
            cls.blobs[key] = Ref(b)
            del b
        cls.fp = cls.start_faultproxy(cls.registry)
        cls.am = cls.start_archmirror(upstreams=[("example.com", cls.fp.url)])

    def setUp(self):
        self.fp.clear_faults()
        self.fp.reset()

    def tearDown(self):
        self.fp.clear_faults()          # never leave a proxy thread parked at a gate

    # -- helpers -----------------------------------------------------------------------
    def ctx(self, results=()):
        lines = ["--- clients:"] + ["  %r" % (r,) for r in results if r is not None]
        return "\n".join(lines) + self.context(self.am)

    def assertExact(self, r, ref, what, results=()):
        ctx = "%s: %r%s" % (what, r, self.ctx(results))
        self.assertEqual(r.status, 200, ctx)
        self.assertEqual(r.content_length, ref.size, ctx)
        self.assertEqual(r.header("Docker-Content-Digest"), ref.digest, ctx)
        self.assertTrue(r.complete, ctx)
        self.assertEqual(r.nbytes, ref.size, ctx)
        self.assertEqual(r.digest, ref.digest, ctx)

    def assertOneUpstreamFetch(self, ref, results=()):
        ctx = self.ctx(results)
        self.assertEqual(self.fp.count(method="GET", path=ref.up_path), 1,
                         "expected exactly one upstream GET of the blob" + ctx)
        self.assertEqual(self.fp.max_concurrency(ref.up_path, "GET"), 1,
                         "more than one upstream GET of the blob open at once" + ctx)

    def upstream_entry(self, ref, timeout=20):
        e = self.fp.wait_body_end(ref.up_path, timeout=timeout)
        self.assertIsNotNone(e, "the upstream body never finished" + self.ctx())
        self.assertEqual(e["outcome"], "complete",
                         "upstream body not delivered whole to archmirror" + self.ctx())
        return e

    def assertCachedHit(self, ref):
        before = self.fp.total()
        r = faultproxy.timed_get(self.am.port, ref.path)
        self.assertExact(r, ref, "GET after the fetch")
        self.assertEqual(r.header("X-Archmirror-Cache"), "hit", repr(r) + self.ctx())
        self.assertEqual(self.fp.total(), before, "a hit went upstream" + self.ctx())

    # -- tests -------------------------------------------------------------------------
    def test_1_herd_of_20_one_upstream_fetch_streamed(self):
        ref = self.blobs["herd"]
        self.fp.throttle(64 * MiB, path=ref.up_path)    # ~1 s upstream transfer
        n = 20
        barrier = threading.Barrier(n)
        clients = [TimedGetThread(self.am.port, ref.path, barrier=barrier, name="c%d" % i)
                   for i in range(n)]
        for c in clients:
            c.start()
        results = [c.wait(60) for c in clients]
        up = self.upstream_entry(ref)
        for i, r in enumerate(results):
            with self.subTest(client=i):
                self.assertExact(r, ref, "client %d" % i)
                self.assertEqual(r.header("Accept-Ranges"), "bytes", repr(r))
        self.assertOneUpstreamFetch(ref, results)

        done = up["t_body_done"]
        early = [r for r in results if r.t_first is not None and r.t_first < done]
        self.assertGreaterEqual(
            len(early), 1, "no client received a byte before the upstream body finished "
            "(upstream body %.3f..%.3f s, first bytes at %s)%s" % (
                up["t_first_byte"] - up["t_request"], done - up["t_request"],
                sorted(round(r.t_first - up["t_request"], 3) for r in results), self.ctx()))
        # Stronger: everyone who asked well before the end was streamed to, not made
        # to wait for the whole blob.
        asked_early = [r for r in results if r.t_sent < done - 0.5]
        late_first = [r for r in asked_early if r.t_first is None or r.t_first >= done]
        self.assertFalse(late_first, "%d of %d clients that asked >0.5 s before the upstream "
                         "body finished got their first byte only after it:\n%s%s" % (
                             len(late_first), len(asked_early),
                             "\n".join(map(repr, late_first)), self.ctx()))
        self.assertCachedHit(ref)
        # Checked last so the streaming assertions above report on their own.
        states = [r.header("X-Archmirror-Cache") for r in results]
        self.assertEqual(states.count("miss"), 1, "X-Archmirror-Cache over the herd (one "
                         "request started the fetch, the others joined it): %s%s"
                         % (states, self.ctx()))
        for r, s in zip(results, states):
            if r.t_sent < done:
                self.assertIn(s, ("miss", "joined"),
                              "a client that asked during the fetch: %r" % r)

    def test_2_slow_reader_slows_nobody(self):
        ref = self.blobs["slow"]
        self.fp.throttle(32 * MiB, path=ref.up_path)    # ~1 s upstream transfer
        half = ref.size // 2
        # ~4 MiB/s with a small receive buffer: ~8 s for 32 MiB. It starts the fetch.
        slow = TimedGetThread(self.am.port, ref.path, name="slow", read_size=64 * 1024,
                              pace=(64 * 1024, 0.015), rcvbuf=64 * 1024, marks=(half,))
        slow.start()
        self.assertIsNotNone(self.fp.wait_entry(lambda e: e["t_headers"] is not None,
                                                "GET", ref.up_path, timeout=20),
                             "archmirror never asked upstream" + self.ctx())
        fast = [TimedGetThread(self.am.port, ref.path, name="fast%d" % i) for i in range(3)]
        for c in fast:
            c.start()
        fres = [c.wait(60) for c in fast]
        sres = slow.wait(60)
        allres = fres + [sres]
        up = self.upstream_entry(ref)
        self.assertExact(sres, ref, "slow client", allres)
        for i, r in enumerate(fres):
            self.assertExact(r, ref, "fast client %d" % i, allres)
        self.assertOneUpstreamFetch(ref, allres)
        self.assertEqual(sres.header("X-Archmirror-Cache"), "miss", repr(sres))
        for r in fres:
            self.assertEqual(r.header("X-Archmirror-Cache"), "joined", repr(r))

        t_half = sres.marks.get(half)
        self.assertIsNotNone(t_half, repr(sres))
        ctx = ("\nupstream body done at +%.2fs, fast clients done at %s, slow client half at "
               "+%.2fs, done at +%.2fs%s" % (
                   up["t_body_done"] - sres.t_start,
                   [round(r.t_done - sres.t_start, 2) for r in fres],
                   t_half - sres.t_start, sres.t_done - sres.t_start, self.ctx(allres)))
        self.assertLess(up["t_body_done"], sres.t_done,
                        "the upstream body finished only after the slow client" + ctx)
        self.assertLess(up["t_body_done"], t_half,
                        "the upstream fetch was paced by the slow client" + ctx)
        for r in fres:
            self.assertLess(r.t_done, t_half, "a fast client was paced by the slow one" + ctx)
        self.assertCachedHit(ref)

    def test_3_disconnecting_clients_affect_nobody(self):
        ref = self.blobs["gone"]
        self.fp.gate(ref.up_path, 4 * MiB)      # the fetch stays in progress until released
        # A starts the fetch and hangs up (with unread data: a reset) after 1 MiB.
        a = faultproxy.timed_get(self.am.port, ref.path, stop_after=1 * MiB, read_size=65536)
        self.assertEqual(a.status, 200, repr(a) + self.ctx())
        self.assertTrue(a.stopped_early and a.nbytes >= 1 * MiB, repr(a))
        self.assertIsNotNone(self.fp.wait_gated(ref.up_path, 20),
                             "upstream body never reached 4 MiB" + self.ctx([a]))
        b = TimedGetThread(self.am.port, ref.path, name="B")
        c = TimedGetThread(self.am.port, ref.path, name="C")
        d = TimedGetThread(self.am.port, ref.path, name="D", stop_after=2 * MiB,
                           read_size=65536)
        for t in (b, c, d):
            t.start()
        dres = d.wait(30)           # D reads 2 MiB of the 4 already fetched, hangs up
        try:
            self.assertEqual(dres.status, 200, repr(dres) + self.ctx([a, dres]))
            self.assertTrue(dres.stopped_early, "joiner D could not read 2 MiB of the 4 MiB "
                            "already fetched: %r%s" % (dres, self.ctx([a, dres])))
        finally:
            time.sleep(0.2)
            self.fp.release(ref.up_path)
        bres, cres = b.wait(60), c.wait(60)
        allres = [a, bres, cres, dres]
        self.upstream_entry(ref)
        self.assertExact(bres, ref, "joiner B", allres)
        self.assertExact(cres, ref, "joiner C", allres)
        self.assertOneUpstreamFetch(ref, allres)
        self.assertEqual(a.header("X-Archmirror-Cache"), "miss", repr(a))
        for r in (bres, cres, dres):
            self.assertEqual(r.header("X-Archmirror-Cache"), "joined", repr(r))
        self.assertTrue(poll(lambda: os.path.isfile(blob_file(self.am.data_dir, ref.digest))),
                        "blob not committed after the fetch" + self.ctx(allres))
        self.assertCachedHit(ref)
        self.assertTrue(self.am.alive(), "archmirror died" + self.ctx())

    def test_4_late_joiner_reads_temp_file_then_follows_live(self):
        ref = self.blobs["late"]
        half = ref.size // 2
        self.fp.gate(ref.up_path, half)
        leader = TimedGetThread(self.am.port, ref.path, name="leader")
        leader.start()
        try:
            self.assertIsNotNone(self.fp.wait_gated(ref.up_path, 20),
                                 "upstream body never reached half" + self.ctx())
            # archmirror has written what it got: the temp file holds half the blob
            parts = poll(lambda: [p for p in part_files(self.am.data_dir)
                                  if os.path.getsize(p) >= half], timeout=15)
            self.assertTrue(parts, "no <data>/blobs/tmp/*.part file with %d bytes while the "
                            "upstream is paused at half (found: %s)%s" % (
                                half, {p: os.path.getsize(p) for p in
                                       part_files(self.am.data_dir)}, self.ctx()))
            got_half = threading.Event()

            def progress(r):
                if r.nbytes >= half:
                    got_half.set()
                return False            # keep reading
            joiner = TimedGetThread(self.am.port, ref.path, name="joiner", on_progress=progress)
            joiner.start()
            reached = got_half.wait(20)
            self.assertTrue(reached, "the late joiner did not get the %d bytes already in the "
                            "temp file while the upstream was paused" % half + self.ctx())
            self.assertIsNone(joiner.result, "joiner ended early: %r" % joiner.result)
            self.assertEqual(self.fp.count(method="GET", path=ref.up_path), 1,
                             "the late joiner caused another upstream GET" + self.ctx())
        finally:
            self.fp.release(ref.up_path)
        jres = joiner.wait(60)
        lres = leader.wait(60)
        allres = [lres, jres]
        self.upstream_entry(ref)
        self.assertExact(lres, ref, "leader", allres)
        self.assertExact(jres, ref, "late joiner", allres)
        self.assertEqual(lres.header("X-Archmirror-Cache"), "miss", repr(lres))
        self.assertEqual(jres.header("X-Archmirror-Cache"), "joined", repr(jres))
        self.assertOneUpstreamFetch(ref, allres)
        self.assertCachedHit(ref)


    def test_5_staggered_arrivals_across_fetch_and_commit(self):
        ref = self.blobs["stagger"]
        self.fp.throttle(16 * MiB, path=ref.up_path)    # ~1 s upstream transfer
        clients = []
        for i in range(30):                             # 0 .. 1.45 s
            c = TimedGetThread(self.am.port, ref.path, name="s%d" % i)
            c.start()
            clients.append(c)
            time.sleep(0.05)
        results = [c.wait(60) for c in clients]
        up = self.upstream_entry(ref)
        for i, r in enumerate(results):
            with self.subTest(client=i):
                self.assertExact(r, ref, "client %d" % i)
        self.assertOneUpstreamFetch(ref, results)
        states = [r.header("X-Archmirror-Cache") for r in results]
        self.assertEqual(states[0], "miss", states)
        self.assertEqual(states.count("miss"), 1, states)
        rank = {"miss": 0, "joined": 1, "hit": 2}
        seq = [rank.get(x, -1) for x in states]
        self.assertEqual(seq, sorted(seq), "labels out of timeline order: %s" % states)
        self.assertIn("hit", states, "nobody arrived after the commit? %s (upstream body "
                      "took %.2fs)" % (states, up["t_body_done"] - up["t_headers"]))

if __name__ == "__main__":
    testbase.main()

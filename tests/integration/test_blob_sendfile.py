#!/usr/bin/python3
"""Blob bodies sent zero-copy (sendfile) and copied, seen from the client and /metrics.

upstream: docker-registry with incompressible blobs; two archmirrors on it, one with the
default server.sendfile=true, one with server.sendfile=false. The counter
archmirror_blob_file_bytes_total{path="sendfile"|"copy"} says which way each byte went.

* test_1: a hit just after its fill (pages in memory) goes out by sendfile: exact bytes,
  the sendfile counter grows by the blob's size and the copy counter not at all.
* test_2: unaligned ranges on a hit (first byte not on a page boundary, last byte short
  of the end) by sendfile: exact bytes.
* test_3: a slow reader with a 32 KiB receive buffer (the socket fills, sendfile returns
  EAGAIN, the write poll wakes it) and 8 concurrent readers of the same hit: exact bytes.
* test_4: a blob whose pages were dropped from memory (POSIX_FADV_DONTNEED) is read on the
  thread pool, not sent from the disk on the loop: the copy counter grows, exact bytes.
* test_5: with server.sendfile=false every byte of a hit is copied: sendfile counter 0.
"""
import os
import re
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import blobs, faultproxy, httpc, images, testbase  # noqa: E402
from harness.faultproxy import TimedGetThread  # noqa: E402

MiB = 1024 * 1024
REPO = "library/zerocopy"



blob_file, poll = blobs.blob_file, testbase.poll


def Ref(blob):
    return blobs.Ref(blob, REPO, keep=True)


class BlobSendfileTest(testbase.IntegrationCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        testbase.require_archmirror()
        cls.registry = cls.start_registry()
        client = cls.registry.client()
        cls.blobs = {}
        for key, size in (("hit", 8 * MiB + 4321), ("range", 3 * MiB + 777),
                          ("slow", 6 * MiB), ("cold", 5 * MiB + 99), ("copy", 4 * MiB + 1)):
            b = images.large_blob("sendfile-" + key, size=size)
            client.push_blob(REPO, b)
            cls.blobs[key] = Ref(b)
        url = "http://127.0.0.1:%d" % cls.registry.port
        cls.am = cls.start_archmirror(upstreams=[("example.com", url)])
        cls.am_copy = cls.start_archmirror(upstreams=[("example.com", url)], name="am-copy",
                                           config={"server": {"sendfile": False}})

    def counters(self, am):
        r = httpc.request(am.port, "GET", "/metrics")
        self.assertEqual(r.status, 200, repr(r))
        text = r.body.decode()
        out = {}
        for path in ("sendfile", "copy"):
            m = re.search(r'^archmirror_blob_file_bytes_total\{path="%s"\} (\d+)$' % path, text,
                          re.M)
            self.assertIsNotNone(m, "no %s counter in /metrics:\n%s" % (path, text[-2000:]))
            out[path] = int(m.group(1))
        return out

    def fill(self, am, ref):
        r = faultproxy.timed_get(am.port, ref.path)
        self.assertTrue(r.status == 200 and r.complete and r.digest == ref.digest,
                        repr(r) + self.context(am))
        self.assertTrue(poll(lambda: os.path.isfile(blob_file(am.data_dir, ref.digest))),
                        "not committed" + self.context(am))

    def get_hit(self, am, ref, **kw):
        r = faultproxy.timed_get(am.port, ref.path, **kw)
        ctx = repr(r) + self.context(am)
        self.assertEqual(r.status, 200, ctx)
        self.assertEqual(r.header("X-Archmirror-Cache"), "hit", ctx)
        self.assertTrue(r.complete, ctx)
        self.assertEqual(r.digest, ref.digest, ctx)
        return r

    def test_1_hit_in_memory_goes_by_sendfile(self):
        ref = self.blobs["hit"]
        self.fill(self.am, ref)
        before = self.counters(self.am)
        self.get_hit(self.am, ref)
        after = self.counters(self.am)
        self.assertEqual(after["sendfile"] - before["sendfile"], ref.size,
                         "a hit in memory was not sent by sendfile: %r -> %r" % (before, after))
        self.assertEqual(after["copy"], before["copy"], "%r -> %r" % (before, after))

    def test_2_unaligned_ranges_by_sendfile(self):
        ref = self.blobs["range"]
        self.fill(self.am, ref)
        s = ref.size
        before = self.counters(self.am)
        sent = 0
        for first, last in ((1, s - 2), (4095, 4096), (12345, 2 * MiB + 3), (s - 5000, s - 1)):
            with self.subTest(first=first, last=last):
                r = faultproxy.timed_get(self.am.port, ref.path, keep_body=True,
                                         headers={"Range": "bytes=%d-%d" % (first, last)})
                ctx = repr(r) + self.context(self.am)
                self.assertEqual(r.status, 206, ctx)
                self.assertEqual(r.header("Content-Range"), "bytes %d-%d/%d" % (first, last, s),
                                 ctx)
                self.assertTrue(r.complete, ctx)
                self.assertTrue(r.body == ref.data[first:last + 1], "wrong bytes: " + ctx)
                sent += last - first + 1
        after = self.counters(self.am)
        self.assertEqual(after["sendfile"] - before["sendfile"], sent, "%r -> %r" % (before, after))

    def test_3_slow_and_concurrent_readers(self):
        ref = self.blobs["slow"]
        self.fill(self.am, ref)
        before = self.counters(self.am)
        slow = TimedGetThread(self.am.port, ref.path, name="slow", read_size=32 * 1024,
                              pace=(64 * 1024, 0.01), rcvbuf=32 * 1024)
        slow.start()
        results = [None] * 8

        def one(i):
            results[i] = faultproxy.timed_get(self.am.port, ref.path, timeout=60)
        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(results))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        res = slow.wait(90)
        for r in results + [res]:
            self.assertTrue(r is not None and r.status == 200 and r.complete and
                            r.digest == ref.digest, repr(r) + self.context(self.am))
        after = self.counters(self.am)
        self.assertEqual(after["sendfile"] - before["sendfile"], 9 * ref.size,
                         "%r -> %r" % (before, after))

    def test_4_pages_not_in_memory_are_read_on_the_thread_pool(self):
        ref = self.blobs["cold"]
        self.fill(self.am, ref)
        fd = os.open(blob_file(self.am.data_dir, ref.digest), os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        before = self.counters(self.am)
        self.get_hit(self.am, ref)
        after = self.counters(self.am)
        moved = (after["sendfile"] - before["sendfile"]) + (after["copy"] - before["copy"])
        self.assertEqual(moved, ref.size, "%r -> %r" % (before, after))
        self.assertGreater(after["copy"] - before["copy"], 0,
                           "dropped pages were not read through the thread pool: %r -> %r" % (
                               before, after))

    def test_5_sendfile_off_copies_everything(self):
        ref = self.blobs["copy"]
        self.fill(self.am_copy, ref)
        before = self.counters(self.am_copy)
        self.get_hit(self.am_copy, ref)
        after = self.counters(self.am_copy)
        self.assertEqual(after["sendfile"], 0, repr(after))
        self.assertEqual(after["copy"] - before["copy"], ref.size, "%r -> %r" % (before, after))


if __name__ == "__main__":
    testbase.main()

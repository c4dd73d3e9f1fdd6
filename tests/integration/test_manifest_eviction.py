#!/usr/bin/python3
"""The manifest cache's budget (cache.manifest_max_size), seen from the client, the
upstream and the LMDB file.

upstream: docker-registry behind the faultproxy, N single-arch OCI images
library/mevict-<i>:v1 (one manifest of ~450 bytes each); archmirror --upstream
example.com=<proxy> with manifest_max_size 12KiB (about 18 of those records), watermarks
95/90, tag_freshness 1h (the tags stay fresh throughout, so an evicted manifest is
refetched by digest, not by tag).

* test_1: a GET by tag of every image, image 0 read again after each: the bytes the
  store counts (/metrics archmirror_manifest_cache_bytes) never exceed the budget, nor do
  the key and value bytes of the "manifests" DB on disk (read with mdb_dump, when
  lmdb-utils is installed); evictions are counted as reason="lru", none as map_full;
  image 0, kept in use, is still a hit (no upstream request).
* test_2: a GET by tag of image 1 (least recently used, so evicted) → 200 with the exact
  bytes, one upstream GET by digest and no upstream request for the tag; then a hit.
* test_3: upstream refusing connections: a GET by tag of evicted image 2 → 502 OCI error
  UNAVAILABLE (never 500, never other bytes), a cached image is still served.
* test_3b: the tag of evicted image 3 moved upstream to a new manifest and the old one
  was deleted: archmirror's GET by the old digest gets 404, it falls back to the tag and
  serves the new manifest (exact bytes, its digest), which is then a hit.
* test_4: SIGTERM and restart on the same data dir: the index rebuilt from LMDB is within
  the budget and the recently used images are hits without the upstream.
"""
import os
import re
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import httpc, images, testbase  # noqa: E402

N = 40
BUDGET = 12 * 1024
TAG = "v1"


def repo(i):
    return "library/mevict-%02d" % i


def poll(fn, timeout=5.0):
    return testbase.poll(fn, timeout)


class ManifestEvictionTest(testbase.IntegrationCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        testbase.require_archmirror()
        cls.registry = cls.start_registry()
        client = cls.client = cls.registry.client()
        cls.images = []
        for i in range(N):
            m = images.single_manifest("mevict-%d" % i, "amd64", oci=True)
            img = {"kind": "oci-single", "top": m["manifest"], "children": {}, "image": m}
            client.push_image(repo(i), TAG, img)
            cls.images.append(m["manifest"])
        cls.fp = cls.start_faultproxy(cls.registry)
        cls.am = cls.start_archmirror(
            upstreams=[("example.com", cls.fp.url)],
            config={"cache": {"manifest_max_size": "12KiB", "evict_high_watermark": 95,
                              "evict_low_watermark": 90, "tag_freshness": "1h"}})

    def setUp(self):
        self.fp.reset()

    def tearDown(self):
        if self.fp.mode is not None:
            self.fp.set_up()

    # -- helpers -----------------------------------------------------------------------
    def pull(self, i):
        return self.get(self.am, "/v2/%s/manifests/%s?ns=example.com" % (repo(i), TAG),
                        accept=images.ALL_MANIFEST_TYPES)

    def metric(self, name):
        r = httpc.request(self.am.port, "GET", "/metrics")
        self.assertEqual(r.status, 200, repr(r))
        m = re.search(r"^%s (\d+)$" % re.escape(name), r.body.decode(), re.M)
        self.assertIsNotNone(m, "%s not in /metrics" % name)
        return int(m.group(1))

    def disk_bytes(self):
        """Key plus value bytes of the "manifests" DB, or None without mdb_dump."""
        if not shutil.which("mdb_dump"):
            return None
        path = os.path.join(self.am.data_dir, "meta.lmdb")
        out = subprocess.run(["mdb_dump", "-n", "-s", "manifests", path], check=True,
                             capture_output=True, text=True, timeout=30).stdout
        body = out.split("HEADER=END\n", 1)[1].split("DATA=END", 1)[0]
        return sum(len(line.strip()) // 2 for line in body.splitlines() if line.strip())

    def up_paths(self, i):
        base = "/v2/%s/manifests/" % repo(i)
        return base + TAG, base + self.images[i].digest

    # -- tests -------------------------------------------------------------------------
    def test_1_store_stays_under_the_budget(self):
        peak = 0
        for i in range(N):
            r = self.pull(i)
            self.assertManifestResponse(r, self.images[i], "GET", "first pull of image %d" % i)
            r = self.pull(0)
            self.assertManifestResponse(r, self.images[0], "GET", "image 0 after %d" % i)
            counted = self.metric("archmirror_manifest_cache_bytes")
            peak = max(peak, counted)
            self.assertLessEqual(counted, BUDGET, "after image %d%s" % (i, self.context()))
        self.assertGreater(peak, BUDGET * 80 // 100, "the cache never filled: peak %d" % peak)
        self.assertGreater(
            self.metric('archmirror_manifest_cache_evictions_total{reason="lru"}'), 0)
        self.assertEqual(
            self.metric('archmirror_manifest_cache_evictions_total{reason="map_full"}'), 0)
        self.assertEqual(self.metric("archmirror_manifest_cache_max_bytes"), BUDGET)
        if self.disk_bytes() is not None:
            self.assertTrue(poll(lambda: self.disk_bytes() <= BUDGET),
                            "manifests DB holds %d bytes > %d%s" % (
                                self.disk_bytes(), BUDGET, self.context()))
        self.fp.reset()
        r = self.pull(0)
        self.assertManifestResponse(r, self.images[0], "GET", "image 0, kept in use")
        self.assertEqual(r.header("X-Archmirror-Cache"), "hit", repr(r))
        self.assertEqual(self.fp.total(), 0, "image 0 went upstream" + self.context())

    def test_2_evicted_manifest_is_refetched_by_digest(self):
        by_tag, by_digest = self.up_paths(1)
        r = self.pull(1)
        self.assertManifestResponse(r, self.images[1], "GET", "evicted image 1")
        self.assertEqual(r.header("X-Archmirror-Cache"), "miss", repr(r) + self.context())
        self.assertEqual(self.fp.count(method="GET", path=by_digest), 1, self.context())
        self.assertEqual(self.fp.count(path=by_tag), 0,
                         "the fresh tag was asked upstream again" + self.context())
        r = self.pull(1)
        self.assertManifestResponse(r, self.images[1], "GET", "image 1 again")
        self.assertEqual(r.header("X-Archmirror-Cache"), "hit", repr(r))
        self.assertEqual(self.fp.total(), 1, self.context())
        self.assertLessEqual(self.metric("archmirror_manifest_cache_bytes"), BUDGET)

    def test_3_evicted_manifest_with_the_upstream_down_is_a_clear_error(self):
        self.fp.set_down("refuse")
        r = self.pull(2)
        self.assertOCIError(r, 502, "UNAVAILABLE", "evicted image 2, upstream down")
        self.assertNotEqual(r.body, self.images[2].data)
        r = self.pull(N - 1)
        self.assertManifestResponse(r, self.images[N - 1], "GET", "cached image, upstream down")

    def test_3b_evicted_manifest_deleted_upstream_falls_back_to_the_tag(self):
        old = self.images[3]
        m = images.single_manifest("mevict-3-moved", "amd64", oci=True)
        self.client.push_image(repo(3), TAG, {"kind": "oci-single", "top": m["manifest"],
                                              "children": {}, "image": m})
        self.client.delete_manifest(repo(3), old.digest)
        new = m["manifest"]
        by_tag, by_old = self.up_paths(3)
        r = self.pull(3)
        self.assertManifestResponse(r, new, "GET", "image 3 after its tag moved upstream")
        self.assertEqual(r.header("X-Archmirror-Cache"), "miss", repr(r))
        self.assertEqual(self.fp.count(method="GET", path=by_old), 1,
                         "the fresh tag's (evicted) manifest was not asked by digest first" +
                         self.context())
        self.assertEqual(self.fp.count(method="GET", path=by_tag), 1,
                         "no fallback to the tag after the digest's 404" + self.context())
        self.fp.reset()
        r = self.pull(3)
        self.assertManifestResponse(r, new, "GET", "image 3 again")
        self.assertEqual(r.header("X-Archmirror-Cache"), "hit", repr(r))
        # (The config blob may still be fetched in the background: the pull log reads a
        # new single-arch image's platform from it.)
        for path in (by_tag, "/v2/%s/manifests/%s" % (repo(3), new.digest)):
            self.assertEqual(self.fp.count(path=path), 0, path + self.context())
        self.images[3] = new

    def test_4_restart_keeps_the_budget_and_the_recent_manifests(self):
        self.am.stop()
        self.am.start()
        counted = self.metric("archmirror_manifest_cache_bytes")
        self.assertGreater(counted, 0, "the index was not rebuilt" + self.context())
        self.assertLessEqual(counted, BUDGET, self.context())
        self.fp.set_down("refuse")
        for i in (0, 1, N - 1):
            r = self.pull(i)
            self.assertManifestResponse(r, self.images[i], "GET", "image %d after restart" % i)
            self.assertEqual(r.header("X-Archmirror-Cache"), "hit", repr(r))


if __name__ == "__main__":
    testbase.main()

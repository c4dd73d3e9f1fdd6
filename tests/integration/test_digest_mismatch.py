#!/usr/bin/python3
"""Integrity and freshness, seen from both sides of archmirror (faultproxy counts).

* A manifest fetched by digest whose body the proxy corrupted (one byte flipped,
  headers unchanged) → 502 DIGEST_INVALID, nothing cached: once the proxy stops
  flipping, the next GET goes upstream again and returns the right bytes.
* Within the tag freshness window (default 5m) a second tag GET/HEAD causes no
  upstream request at all; outside it (tag_freshness 1s) a HEAD by tag causes exactly
  one upstream HEAD.
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import images, registry, testbase  # noqa: E402


class DigestMismatchTest(testbase.IntegrationCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        testbase.require_archmirror()
        cls.registry = cls.start_registry()
        cls.seeded = registry.seed_standard(cls.registry.client())
        cls.fp = cls.start_faultproxy(cls.registry)
        up = [("example.com", cls.fp.url)]
        cls.am_mm = cls.start_archmirror(name="am-mismatch", upstreams=up)
        cls.am_fresh = cls.start_archmirror(name="am-fresh", upstreams=up)
        cls.am_short = cls.start_archmirror(name="am-short", upstreams=up,
                                            config={"cache": {"tag_freshness": "1s"}})

    def setUp(self):
        self.fp.unflip()
        self.fp.reset()

    def test_digest_mismatch_502_and_nothing_cached(self):
        cases = [("oci-manifest", "multi", images.platform_manifest(self.seeded["multi"][2],
                                                                   "linux/arm64")),
                 ("oci-index", "multi", self.seeded["multi"][2]["top"]),
                 ("docker-list", "list", self.seeded["list"][2]["top"]),
                 ("docker-manifest", "single", self.seeded["single"][2]["top"])]
        for label, key, m in cases:
            repo = self.seeded[key][0]
            up_path = "/v2/%s/manifests/%s" % (repo, m.digest)
            path = up_path + "?ns=example.com"
            with self.subTest(manifest=label):
                self.fp.reset()
                self.fp.flip(up_path)
                r = self.get(self.am_mm, path, accept=m.media_type + ", */*")
                self.assertOCIError(r, 502, "DIGEST_INVALID", "corrupted upstream body")
                self.assertNotEqual(r.body, m.data)
                self.assertGreaterEqual(self.fp.flipped, 1, "the proxy never flipped a body"
                                        + self.context())
                # still corrupted upstream → still refused (the bad body was not cached)
                r = self.get(self.am_mm, path, accept=m.media_type + ", */*")
                self.assertOCIError(r, 502, "DIGEST_INVALID", "second try, still corrupted")
                # a HEAD must not answer from a poisoned cache either
                r = self.get(self.am_mm, path, accept=m.media_type + ", */*", method="HEAD")
                if r.status == 200:
                    self.assertEqual(r.header("Docker-Content-Digest"), m.digest, repr(r))
                    self.assertEqual(r.header("Content-Length"), str(m.size), repr(r))
                self.fp.unflip(up_path)
                before = self.fp.count(method="GET", path=up_path)
                r = self.get(self.am_mm, path, accept=m.media_type + ", */*")
                self.assertManifestResponse(r, m, "GET", "after the proxy stopped flipping")
                self.assertGreaterEqual(self.fp.count(method="GET", path=up_path), before + 1,
                                        "archmirror did not go upstream again" + self.context())

    def test_corrupted_blob_never_completes_for_the_client(self):
        """A streamed blob whose bytes do not hash to its digest: the client must not get
        a response that looks complete (the final byte is held until verification)."""
        import http.client
        repo, _, img = self.seeded["single"]
        layer = img["image"]["blobs"][-1]
        up_path = "/v2/%s/blobs/%s" % (repo, layer.digest)
        self.fp.flip(up_path)
        conn = http.client.HTTPConnection("127.0.0.1", self.am_mm.port, timeout=10)
        try:
            conn.request("GET", up_path + "?ns=example.com")
            resp = conn.getresponse()
            self.assertEqual(resp.status, 200, "blob head" + self.context(self.am_mm))
            self.assertEqual(int(resp.getheader("Content-Length")), layer.size)
            with self.assertRaises(http.client.IncompleteRead,
                                   msg="a corrupted blob was delivered whole"):
                resp.read()
        finally:
            conn.close()
        self.assertGreaterEqual(self.fp.flipped, 1, "the proxy never flipped" + self.context())
        self.assertIn(layer.digest, self.am_mm.log(),
                      "archmirror did not log the mismatch")
        self.fp.unflip(up_path)
        r = self.get(self.am_mm, up_path + "?ns=example.com")
        self.assertBlobResponse(r, layer, "GET", "after the proxy stopped flipping")

    def test_freshness_window_no_upstream_request(self):
        repo, tag, img = self.seeded["single"]
        path = "/v2/%s/manifests/%s?ns=example.com" % (repo, tag)
        r = self.get(self.am_fresh, path, accept=images.CONTAINERD_RESOLVE_ACCEPT)
        self.assertManifestResponse(r, img["top"], "GET", "first tag GET")
        self.assertGreaterEqual(self.fp.total(), 1, "first GET did not reach upstream")
        self.fp.reset()
        r = self.get(self.am_fresh, path, accept=images.CONTAINERD_RESOLVE_ACCEPT)
        self.assertManifestResponse(r, img["top"], "GET", "second tag GET")
        r = self.get(self.am_fresh, path, accept=images.CONTAINERD_RESOLVE_ACCEPT, method="HEAD")
        self.assertManifestResponse(r, img["top"], "HEAD", "tag HEAD")
        r = self.get(self.am_fresh, "/v2/%s/manifests/%s?ns=example.com" % (repo, img["top"].digest),
                     accept=img["top"].media_type)
        self.assertManifestResponse(r, img["top"], "GET", "by digest")
        self.assertEqual(self.fp.count(prefix="/v2/%s/manifests/" % repo), 0,
                         "manifest requests upstream inside the freshness window:"
                         + self.context())
        # The only other upstream request allowed: the single-arch image's config blob,
        # read once (ever) so the pull log knows its platform.
        cfg = img["image"]["blobs"][0]
        self.assertEqual(self.fp.total() - self.fp.count(path="/v2/%s/blobs/%s" % (repo, cfg.digest)),
                         0, "unexpected upstream requests:" + self.context())
        self.assertLessEqual(self.fp.count(path="/v2/%s/blobs/%s" % (repo, cfg.digest)), 1)

    def test_freshness_expired_one_upstream_head(self):
        repo, tag, img = self.seeded["list"]
        up_path = "/v2/%s/manifests/%s" % (repo, tag)
        path = up_path + "?ns=example.com"
        r = self.get(self.am_short, path, accept=images.CONTAINERD_RESOLVE_ACCEPT)
        self.assertManifestResponse(r, img["top"], "GET", "first tag GET")
        time.sleep(1.5)
        self.fp.reset()
        r = self.get(self.am_short, path, accept=images.CONTAINERD_RESOLVE_ACCEPT, method="HEAD")
        self.assertManifestResponse(r, img["top"], "HEAD", "tag HEAD after the window")
        ctx = self.context(self.am_short)
        self.assertEqual(self.fp.count(method="HEAD", path=up_path), 1,
                         "expected exactly one upstream HEAD of the tag" + ctx)
        self.assertEqual(self.fp.count(method="GET", path=up_path), 0,
                         "unchanged tag re-downloaded" + ctx)
        self.assertEqual(self.fp.count(prefix="/v2/%s/" % repo), 1,
                         "other upstream requests besides the one HEAD" + ctx)


if __name__ == "__main__":
    testbase.main()

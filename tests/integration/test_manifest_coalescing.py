#!/usr/bin/python3
"""Concurrent identical manifest misses share one upstream request (issue 3).

The counting proxy holds the upstream's answer (gate) while several clients ask for the
same uncached tag or digest; only one request may reach the upstream, and every client
gets the exact bytes once the gate opens. Event order is controlled by the gate, never
by timing.
"""
import os
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import httpc, images, registry, testbase  # noqa: E402

CLIENTS = 8


class ManifestCoalescingTest(testbase.IntegrationCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        testbase.require_archmirror()
        cls.registry = cls.start_registry()
        cls.seeded = registry.seed_standard(cls.registry.client())
        cls.fp = cls.start_faultproxy(cls.registry)
        cls.am = cls.start_archmirror(upstreams=[("example.com", cls.fp.url)])

    def herd(self, path, method="GET"):
        results = [None] * CLIENTS

        def one(i):
            results[i] = httpc.request(self.am.port, method, path,
                                       headers={"Accept": images.CONTAINERD_RESOLVE_ACCEPT})

        threads = [threading.Thread(target=one, args=(i,)) for i in range(CLIENTS)]
        for t in threads:
            t.start()
        return threads, results

    def check_herd(self, up_path, path, manifest, method):
        self.fp.reset()
        self.fp.gate(up_path, 1)
        threads, results = self.herd(path, method)
        self.fp.wait_gated(up_path)
        # Let every client's request reach archmirror before the answer is released:
        # a second upstream request would show up here as a second gated entry.
        for _ in range(50):
            if self.am.log().count(path.split("?")[0]) >= CLIENTS:
                break
            threading.Event().wait(0.05)
        self.fp.release(up_path)
        for t in threads:
            t.join(30)
        for r in results:
            self.assertIsNotNone(r)
            self.assertManifestResponse(r, manifest, method, "coalesced client")
        self.assertEqual(self.fp.count(path=up_path), 1,
                         "upstream saw more than one request for %s%s" % (up_path,
                                                                           self.context()))

    def test_tag_get_herd_is_one_upstream_get(self):
        repo, tag, img = self.seeded["multi"]
        up_path = "/v2/%s/manifests/%s" % (repo, tag)
        self.check_herd(up_path, up_path + "?ns=example.com", img["top"], "GET")

    def test_digest_get_herd_is_one_upstream_get(self):
        repo, _, img = self.seeded["list"]
        child = images.platform_manifest(img, "linux/arm64")
        up_path = "/v2/%s/manifests/%s" % (repo, child.digest)
        self.check_herd(up_path, up_path + "?ns=example.com", child, "GET")


if __name__ == "__main__":
    testbase.main()

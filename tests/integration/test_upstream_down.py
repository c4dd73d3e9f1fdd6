#!/usr/bin/python3
"""Upstream down after a first pull: cached tags and digests are still served.

archmirror runs with {"cache":{"tag_freshness":"1s"}}; we wait > 1 s so revalidation is
attempted and fails, and the stale copy is served with correct headers and bytes.
Two kinds of "down": the registry stopped (connection refused) and a proxy that resets
every connection (which also shows the revalidation attempt reached the network).
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import images, registry, testbase  # noqa: E402

FRESHNESS_S = 1.0


class UpstreamDownTest(testbase.IntegrationCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        testbase.require_archmirror()
        cls.registry = cls.start_registry()
        cls.seeded = registry.seed_standard(cls.registry.client())
        cls.fp = cls.start_faultproxy(cls.registry)
        cls.am = cls.start_archmirror(upstreams=[("example.com", cls.fp.url)],
                                      config={"cache": {"tag_freshness": "1s"}})

    def pulled(self, img):
        """What a first pull fetched: the tag, the top by digest and each child."""
        out = [img["top"]]
        for plat in ("linux/arm64", "linux/amd64"):
            m = images.platform_manifest(img, plat)
            if m not in out:
                out.append(m)
        return out

    def check_served(self, label):
        for key, (repo, tag, img) in self.seeded.items():
            with self.subTest(phase=label, image=key, ref="tag"):
                path = "/v2/%s/manifests/%s?ns=example.com" % (repo, tag)
                r = self.get(self.am, path, accept=images.CONTAINERD_RESOLVE_ACCEPT, method="HEAD")
                self.assertManifestResponse(r, img["top"], "HEAD", label)
                r = self.get(self.am, path, accept=images.CONTAINERD_RESOLVE_ACCEPT)
                self.assertManifestResponse(r, img["top"], "GET", label)
            for m in self.pulled(img):
                with self.subTest(phase=label, image=key, ref=m.digest[:19]):
                    path = "/v2/%s/manifests/%s?ns=example.com" % (repo, m.digest)
                    for method in ("HEAD", "GET"):
                        r = self.get(self.am, path, accept=m.media_type + ", */*", method=method)
                        self.assertManifestResponse(r, m, method, label)

    def test_1_first_pull_upstream_up(self):
        self.check_served("upstream up")
        for key, (repo, tag, img) in self.seeded.items():
            self.assertGreaterEqual(self.fp.count(path="/v2/%s/manifests/%s" % (repo, tag)), 1,
                                    "tag never fetched upstream" + self.context())

    def test_2_upstream_resets_connections(self):
        self.fp.set_down("reset")
        self.fp.reset()
        time.sleep(FRESHNESS_S + 0.5)
        self.check_served("upstream resets connections")
        tag_attempts = sum(self.fp.count(path="/v2/%s/manifests/%s" % (repo, tag))
                           for repo, tag, _ in self.seeded.values())
        self.assertGreaterEqual(tag_attempts, 1,
                                "no revalidation attempt reached the upstream after the "
                                "freshness window" + self.context())

    def test_3_upstream_stopped(self):
        self.registry.stop()
        self.fp.set_down("refuse")
        time.sleep(FRESHNESS_S + 0.5)
        self.check_served("upstream stopped (connection refused)")
        time.sleep(FRESHNESS_S + 0.2)
        self.check_served("upstream stopped, second round")
        self.assertTrue(self.am.alive(), "archmirror died" + self.context())


if __name__ == "__main__":
    testbase.main()

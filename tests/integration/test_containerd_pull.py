#!/usr/bin/python3
"""Real containerd 1.6 pulls through archmirror (hosts.toml mirror, dead `server`).

upstream: docker-registry seeded with an OCI index (amd64, arm64/v8, attestation), a
Docker manifest list (amd64, arm64/v8, arm/v7) and a single-arch Docker schema2 amd64
image, behind a counting faultproxy; archmirror --upstream example.com=<proxy>.
containerd's hosts.toml: server = a dead port, [host."<archmirror>"] pull+resolve, so a
successful pull proves archmirror served it.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import containerd, images, proc, registry, testbase  # noqa: E402

PLATFORMS = ("linux/arm64", "linux/amd64")


class ContainerdPullTest(testbase.IntegrationCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        testbase.require_archmirror()
        cls.registry = cls.start_registry()
        cls.seeded = registry.seed_standard(cls.registry.client())
        cls.fp = cls.start_faultproxy(cls.registry)
        cls.am = cls.start_archmirror(upstreams=[("example.com", cls.fp.url)])
        cls.dead = proc.DeadPort()
        cls.addClassCleanup(cls.dead.close)
        cls.hosts = {}
        for plat in PLATFORMS:
            d = os.path.join(cls.workdir, "hosts-" + plat.replace("/", "-"))
            containerd.write_hosts_toml(d, "example.com", cls.dead.url, cls.am.url, platform=plat)
            cls.hosts[plat] = d
        cls.ctd = cls.start_containerd()

    def ref(self, key):
        repo, tag, _ = self.seeded[key]
        return "example.com/%s:%s" % (repo, tag)

    def expected_content(self, key, plat):
        """Digests containerd must have fetched for this platform."""
        img = self.seeded[key][2]
        if img["kind"] == "docker-single":
            parts = img["image"]
            return {img["top"].digest} | {b.digest for b in parts["blobs"]}
        child = img["children"][plat]
        return {img["top"].digest, child["manifest"].digest} | {b.digest for b in child["blobs"]}

    def test_1_pull_every_image_both_platforms(self):
        for key in ("multi", "list", "single"):
            repo, tag, img = self.seeded[key]
            tag_path = "/v2/%s/manifests/%s" % (repo, tag)
            for i, plat in enumerate(PLATFORMS):
                with self.subTest(image=key, platform=plat):
                    before_tag = self.fp.count(path=tag_path)
                    pr = self.ctd.pull(self.ref(key), plat, self.hosts[plat])
                    self.assertTrue(pr.ok, "%r%s" % (pr, self.context()))
                    self.assertEqual(pr.digest, img["top"].digest,
                                     "pulled digest != seeded %s digest" % img["kind"])
                    have = self.ctd.content_digests()
                    missing = self.expected_content(key, plat) - have
                    self.assertFalse(missing, "content missing after pull: %s" % missing)
                    # The upstream saw the platform's blobs (archmirror fetched them).
                    for d in self.expected_content(key, plat) - {img["top"].digest}:
                        if d in {m.digest for m in images.all_manifests(img)}:
                            continue
                        self.assertGreaterEqual(
                            self.fp.count(method="GET", path="/v2/%s/blobs/%s" % (repo, d)), 1,
                            "upstream never asked for blob %s%s" % (d, self.context()))
                    if i > 0:
                        # same tag again within the 5m freshness window: no tag request upstream
                        self.assertEqual(self.fp.count(path=tag_path), before_tag,
                                         "tag revalidated upstream inside the freshness "
                                         "window%s" % self.context())
            self.assertGreaterEqual(self.fp.count(path=tag_path), 1,
                                    "archmirror never asked upstream for %s" % tag_path)

    def test_2_upstream_down_tags_and_manifests_from_cache(self):
        """Upstream stopped: tag HEAD (containerd's resolve request) and manifest GETs by
        digest are still answered from archmirror's cache, byte-exact."""
        self.__class__.upstream_down()
        for key in ("multi", "list", "single"):
            repo, tag, img = self.seeded[key]
            with self.subTest(image=key):
                r = self.get(self.am, "/v2/%s/manifests/%s?ns=example.com" % (repo, tag),
                             accept=images.CONTAINERD_RESOLVE_ACCEPT, method="HEAD",
                             headers={"X-Node-Platform": "linux/arm64"})
                self.assertManifestResponse(r, img["top"], "HEAD", "tag HEAD, upstream down")
                # the manifests containerd fetched by digest: top + the two platform children
                pulled = {img["top"].digest: img["top"]}
                for plat in PLATFORMS:
                    m = images.platform_manifest(img, plat)
                    pulled[m.digest] = m
                for m in pulled.values():
                    r = self.get(self.am, "/v2/%s/manifests/%s?ns=example.com" % (repo, m.digest),
                                 accept=m.media_type + ", */*")
                    self.assertManifestResponse(r, m, "GET", "GET by digest, upstream down")

    def test_3_full_pull_with_upstream_down(self):
        """EXPLICIT FULL-PULL ASSERTION (upstream down, fresh containerd content store per
        platform): every image test_1 pulled, for linux/arm64 and linux/amd64, is pulled
        and unpacked again from archmirror's cache alone (manifests and blobs)."""
        self.__class__.upstream_down()
        for plat in PLATFORMS:
            ctd2 = self.start_containerd(name="containerd-fresh-" + plat.replace("/", "-"))
            for key in ("multi", "list", "single"):
                with self.subTest(image=key, platform=plat):
                    pr = ctd2.pull(self.ref(key), plat, self.hosts[plat])
                    self.assertTrue(pr.ok, "FULL containerd pull with the upstream down "
                                    "failed: %r%s" % (pr, self.context()))
                    self.assertEqual(pr.digest, self.seeded[key][2]["top"].digest)
                    missing = self.expected_content(key, plat) - ctd2.content_digests()
                    self.assertFalse(missing, "content missing after the offline pull: %s"
                                     % missing)

    @classmethod
    def upstream_down(cls):
        if cls.registry.proc is not None:
            cls.registry.stop()
            cls.fp.set_down("refuse")


if __name__ == "__main__":
    testbase.main()

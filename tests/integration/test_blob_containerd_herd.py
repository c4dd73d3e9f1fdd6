#!/usr/bin/python3
"""A real herd: several containerd instances pull the same uncached image at once.

upstream: docker-registry with a single-arch linux/amd64 OCI image whose layer is a real
tar.gz of 24 MiB of incompressible bytes, behind the faultproxy (layer throttled to
24 MiB/s, so the fetch lasts ~1 s and the pulls overlap); archmirror --upstream
example.com=<proxy>; three containerd daemons, each with its own content store, hosts.toml
server = a dead port and archmirror as the only mirror.

* all three `ctr images pull` (with unpack) succeed with the pushed manifest's digest;
* the upstream saw exactly one GET of the layer and of the config, never two open at
  once: archmirror coalesced the herd;
* afterwards, with the upstream stopped, a fourth fresh containerd pulls the image from
  the cache alone.
"""
import gzip
import io
import os
import sys
import tarfile
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import containerd, images, proc, testbase  # noqa: E402

MiB = 1024 * 1024
REPO = "library/herd"
TAG = "1.0"
PLATFORM = "linux/amd64"
N_CONTAINERD = 3


def big_image(seed, mib):
    """(layer, config, manifest) Blobs: an OCI image with one real gzip'd tar layer."""
    payload = images.large_blob(seed, mib=mib).data
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        ti = tarfile.TarInfo("data/big.bin")
        ti.size = len(payload)
        ti.mode = 0o644
        ti.mtime = 1700000000
        tf.addfile(ti, io.BytesIO(payload))
    del payload
    tar = raw.getvalue()
    gz = io.BytesIO()
    with gzip.GzipFile(fileobj=gz, mode="wb", mtime=0, compresslevel=1) as g:
        g.write(tar)
    layer = images.Blob(gz.getvalue(), images.OCI_LAYER)
    cfg = images.Blob(images.config_json("amd64", diff_ids=[images.sha256(tar)], seed=seed),
                      images.OCI_CONFIG)
    m = {"schemaVersion": 2, "mediaType": images.OCI_MANIFEST, "config": cfg.descriptor(),
         "layers": [layer.descriptor()]}
    return layer, cfg, images.Blob(images.canonical(m), images.OCI_MANIFEST)


class ContainerdHerdTest(testbase.IntegrationCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        testbase.require_archmirror()
        cls.registry = cls.start_registry()
        client = cls.registry.client()
        cls.layer, cls.cfg, cls.manifest = big_image("containerd-herd", 24)
        client.push_blob(REPO, cls.layer)
        client.push_blob(REPO, cls.cfg)
        client.push_manifest(REPO, TAG, cls.manifest)
        cls.layer_path = "/v2/%s/blobs/%s" % (REPO, cls.layer.digest)
        cls.cfg_path = "/v2/%s/blobs/%s" % (REPO, cls.cfg.digest)
        cls.layer_size = cls.layer.size
        cls.layer = cls.layer.digest            # the bytes are no longer needed
        cls.fp = cls.start_faultproxy(cls.registry)
        cls.am = cls.start_archmirror(upstreams=[("example.com", cls.fp.url)])
        cls.dead = proc.DeadPort()
        cls.addClassCleanup(cls.dead.close)
        cls.hosts = os.path.join(cls.workdir, "hosts")
        containerd.write_hosts_toml(cls.hosts, "example.com", cls.dead.url, cls.am.url,
                                    platform=PLATFORM)
        cls.ctds = [cls.start_containerd(name="containerd-%d" % i) for i in range(N_CONTAINERD)]

    def test_1_herd_one_upstream_get_per_blob(self):
        ref = "example.com/%s:%s" % (REPO, TAG)
        self.fp.throttle(24 * MiB, path=self.layer_path)
        barrier = threading.Barrier(N_CONTAINERD)
        results = [None] * N_CONTAINERD

        def pull(i):
            barrier.wait(30)
            results[i] = self.ctds[i].pull(ref, PLATFORM, self.hosts)
        threads = [threading.Thread(target=pull, args=(i,), daemon=True)
                   for i in range(N_CONTAINERD)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(150)
        self.fp.unthrottle()
        for i, pr in enumerate(results):
            with self.subTest(containerd=i):
                self.assertIsNotNone(pr, "pull %d never finished" % i)
                self.assertTrue(pr.ok, "%r%s" % (pr, self.context()))
                self.assertEqual(pr.digest, self.manifest.digest)
                have = self.ctds[i].content_digests()
                self.assertLessEqual({self.layer, self.cfg.digest, self.manifest.digest}, have)
        ctx = self.context()
        self.assertEqual(self.fp.count(method="GET", path=self.layer_path), 1,
                         "upstream GETs of the layer for a herd of %d" % N_CONTAINERD + ctx)
        self.assertEqual(self.fp.max_concurrency(self.layer_path, "GET"), 1, ctx)
        self.assertEqual(self.fp.count(method="GET", path=self.cfg_path), 1,
                         "upstream GETs of the config" + ctx)
        up = self.fp.wait_body_done(self.layer_path, timeout=5)
        self.assertIsNotNone(up, "the layer's upstream body never completed" + ctx)

    def test_2_fresh_containerd_pulls_from_the_cache_alone(self):
        ref = "example.com/%s:%s" % (REPO, TAG)
        self.registry.stop()
        self.fp.set_down("refuse")
        try:
            ctd = self.start_containerd(name="containerd-offline")
            pr = ctd.pull(ref, PLATFORM, self.hosts)
            self.assertTrue(pr.ok, "offline pull: %r%s" % (pr, self.context()))
            self.assertEqual(pr.digest, self.manifest.digest)
        finally:
            self.fp.set_up()


if __name__ == "__main__":
    testbase.main()

#!/usr/bin/python3
"""Manifests and blobs come back byte-for-byte as the upstream stored them.

skopeo (which sends no ?ns=, so example.com is the default upstream) and http.client with
several Accept headers; GET and HEAD; Content-Type = stored media type,
Docker-Content-Digest and Content-Length correct.
"""
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import images, registry, testbase  # noqa: E402

SKOPEO = "/usr/bin/skopeo"


def accept_variants(mt):
    """Accept headers a real client may send when it wants a manifest of type mt."""
    return [
        ("containerd-resolve", images.CONTAINERD_RESOLVE_ACCEPT),
        ("containerd-fetch", mt + ", */*"),
        ("exact", mt),
        ("all-manifest-types", images.ALL_MANIFEST_TYPES),
    ]


class BytesExactTest(testbase.IntegrationCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        testbase.require_archmirror()
        cls.registry = cls.start_registry()
        cls.seeded = registry.seed_standard(cls.registry.client())
        cls.am = cls.start_archmirror(upstreams=[("example.com", cls.registry.url)])

    def manifests(self):
        """(label, repo, ref, Blob) for every manifest, by tag (top) and by digest."""
        out = []
        for key, (repo, tag, img) in self.seeded.items():
            out.append(("%s:tag" % key, repo, tag, img["top"]))
            for m in images.all_manifests(img):
                out.append(("%s@%s" % (key, m.digest[7:19]), repo, m.digest, m))
        return out

    def skopeo_raw(self, ref):
        cp = subprocess.run(
            [SKOPEO, "--insecure-policy", "inspect", "--raw", "--tls-verify=false",
             "docker://%s/%s" % (self.am.hostport, ref)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60,
            env=dict(os.environ, HOME=self.workdir))
        return cp

    def test_skopeo_inspect_raw(self):
        for label, repo, ref, blob in self.manifests():
            sep = "@" if ref.startswith("sha256:") else ":"
            with self.subTest(manifest=label):
                cp = self.skopeo_raw(repo + sep + ref)
                self.assertEqual(cp.returncode, 0, "skopeo failed: %s%s" % (
                    cp.stderr.decode(errors="replace"), self.context()))
                self.assertEqual(images.sha256(cp.stdout), blob.digest)
                self.assertEqual(cp.stdout, blob.data)

    def test_manifest_get_and_head_with_client_accept_headers(self):
        for label, repo, ref, blob in self.manifests():
            for ns in ("", "?ns=example.com"):
                path = "/v2/%s/manifests/%s%s" % (repo, ref, ns)
                for alabel, accept in accept_variants(blob.media_type):
                    for method in ("GET", "HEAD"):
                        with self.subTest(manifest=label, ns=ns, accept=alabel, method=method):
                            r = self.get(self.am, path, accept=accept, method=method)
                            self.assertManifestResponse(r, blob, method, path)

    def test_manifest_without_specific_accept(self):
        """No Accept / '*/*': archmirror still serves the stored bytes and type (the
        contract: byte-for-byte as stored; distribution itself would 404 an OCI index or
        convert schema2 to schema1 here)."""
        for label, repo, ref, blob in self.manifests():
            path = "/v2/%s/manifests/%s?ns=example.com" % (repo, ref)
            for alabel, accept in (("none", None), ("star", "*/*")):
                for method in ("GET", "HEAD"):
                    with self.subTest(manifest=label, accept=alabel, method=method):
                        r = self.get(self.am, path, accept=accept, method=method)
                        self.assertManifestResponse(r, blob, method, path)

    def test_blobs_exact(self):
        for key, (repo, tag, img) in self.seeded.items():
            for b in images.all_blobs(img):
                for ns in ("", "?ns=example.com"):
                    path = "/v2/%s/blobs/%s%s" % (repo, b.digest, ns)
                    for method in ("GET", "HEAD"):
                        with self.subTest(image=key, blob=b.digest[7:19], ns=ns, method=method):
                            r = self.get(self.am, path, method=method,
                                         accept=b.media_type + ", */*")
                            self.assertBlobResponse(r, b, method, path)
                            self.assertEqual(r.header("Docker-Content-Digest"), b.digest,
                                             repr(r))
                            self.assertIsNone(r.header("Content-Encoding"),
                                              "blob must not carry Content-Encoding: %r" % r)

    def test_keep_alive_sequence(self):
        """Many manifest and blob requests on one connection: each exact."""
        from harness import httpc
        c = httpc.Client(self.am.port)
        try:
            for _ in range(2):
                for label, repo, ref, blob in self.manifests():
                    r = c.request("GET", "/v2/%s/manifests/%s" % (repo, ref),
                                  headers={"Accept": images.CONTAINERD_RESOLVE_ACCEPT})
                    self.assertManifestResponse(r, blob, "GET", label)
            self.assertEqual(c.connections, 1, "server closed the keep-alive connection")
        finally:
            c.close()


if __name__ == "__main__":
    testbase.main()

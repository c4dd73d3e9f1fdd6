#!/usr/bin/python3
"""HTTPS upstream with a private CA.

* --config JSON with upstreams[].ca_file = the CA that signed the registry: pulls work.
* --upstream + --upstream-ca NAME=FILE (command line): pulls work.
* ca_file = an unrelated CA: archmirror answers a 5xx OCI error and logs a clear
  certificate-verification message; nothing is served.
"""
import os
import re
import ssl
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import images, registry, testbase  # noqa: E402

CERT_MSG = re.compile(
    r"certificate verify failed|verif\w*[^\n]{0,80}certif|certif\w*[^\n]{0,80}verif"
    r"|unable to get (local )?issuer certificate|self[- ]signed certificate|x509",
    re.I)


class TLSUpstreamTest(testbase.IntegrationCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        testbase.require_archmirror()
        cls.pki = cls.pki()
        cls.registry = cls.start_registry(tls=(cls.pki.server_cert, cls.pki.server_key))
        seeder = registry.OCIClient("127.0.0.1", cls.registry.port, tls=True,
                                    ssl_context=ssl.create_default_context(cafile=cls.pki.ca_cert))
        cls.seeded = registry.seed_standard(seeder)

        def conf(ca):
            return {"upstreams": [{"name": "example.com", "url": cls.registry.url, "ca_file": ca}],
                    "default_upstream": "example.com"}
        cls.am_ok = cls.start_archmirror(name="am-goodca", config=conf(cls.pki.ca_cert))
        cls.am_cli = cls.start_archmirror(
            name="am-cli-ca", upstreams=[("example.com", cls.registry.url)],
            upstream_ca=[("example.com", cls.pki.ca_cert)])
        cls.am_bad = cls.start_archmirror(name="am-wrongca", config=conf(cls.pki.other_ca_cert))

    def check_pull_works(self, am):
        for key, (repo, tag, img) in self.seeded.items():
            with self.subTest(mirror=am.name, image=key):
                r = self.get(am, "/v2/%s/manifests/%s?ns=example.com" % (repo, tag),
                             accept=images.CONTAINERD_RESOLVE_ACCEPT, method="HEAD")
                self.assertManifestResponse(r, img["top"], "HEAD")
                r = self.get(am, "/v2/%s/manifests/%s?ns=example.com" % (repo, img["top"].digest),
                             accept=img["top"].media_type + ", */*")
                self.assertManifestResponse(r, img["top"], "GET")
                m = images.platform_manifest(img, "linux/arm64")
                r = self.get(am, "/v2/%s/manifests/%s?ns=example.com" % (repo, m.digest),
                             accept=m.media_type + ", */*")
                self.assertManifestResponse(r, m, "GET")
                for b in images.all_blobs(img)[:2]:
                    r = self.get(am, "/v2/%s/blobs/%s?ns=example.com" % (repo, b.digest))
                    self.assertBlobResponse(r, b, "GET")

    def test_config_ca_file(self):
        self.check_pull_works(self.am_ok)

    def test_cli_upstream_ca(self):
        self.check_pull_works(self.am_cli)

    def test_wrong_ca(self):
        repo, tag, img = self.seeded["multi"]
        for path in ("/v2/%s/manifests/%s?ns=example.com" % (repo, tag),
                     "/v2/%s/manifests/%s?ns=example.com" % (repo, img["top"].digest),
                     "/v2/%s/blobs/%s?ns=example.com" % (repo, images.all_blobs(img)[0].digest)):
            with self.subTest(path=path):
                r = self.get(self.am_bad, path, accept=images.ALL_MANIFEST_TYPES)
                ctx = "%r%s" % (r, self.context(self.am_bad))
                self.assertGreaterEqual(r.status, 500, ctx)
                self.assertLess(r.status, 600, ctx)
                self.assertTrue(r.error_codes, "no OCI error body: " + ctx)
                self.assertNotIn(img["top"].data, r.body)
        log = self.am_bad.log()
        self.assertRegex(log, CERT_MSG, "no certificate-verification message in the log:\n"
                         + "\n".join(log.splitlines()[-30:]))
        # and the good mirrors' logs have none
        self.assertNotRegex(self.am_ok.log(), re.compile(r"certificate verify failed", re.I))


if __name__ == "__main__":
    testbase.main()

#!/usr/bin/python3
"""The admin side (issue 7, access control): /metrics and /api/v1/* on a separate listener
behind a bearer token from a file; probes open everywhere; the token never in a log.

upstream: docker-registry seeded with the standard images; archmirror with
admin.listen = another loopback port and admin.token_file.
"""
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import archmirror, httpc, proc, registry, testbase  # noqa: E402

TOKEN = "s3cret-admin-token-4f1c9a"


class AdminAccessTest(testbase.IntegrationCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        testbase.require_archmirror()
        cls.registry = cls.start_registry()
        cls.seeded = registry.seed_standard(cls.registry.client())
        cls.token_file = os.path.join(cls.workdir, "admin-token")
        with open(cls.token_file, "w") as f:
            f.write(TOKEN + "\n")
        cls.admin_port = proc.free_port()
        cls.am = cls.start_archmirror(
            upstreams=[("example.com", cls.registry.url)],
            config={"admin": {"listen": "127.0.0.1:%d" % cls.admin_port,
                              "token_file": cls.token_file}})
        cls.shared = cls.start_archmirror(name="am-shared",
                                          upstreams=[("example.com", cls.registry.url)],
                                          config={"admin": {"token_file": cls.token_file}})

    def admin(self, path, token=TOKEN, port=None):
        h = {"Authorization": "Bearer " + token} if token else {}
        return httpc.request(port or self.admin_port, "GET", path, headers=h)

    def test_registry_listener_does_not_serve_the_admin_side(self):
        for path in ("/metrics", "/api/v1/pulls", "/api/v1/platforms?image=example.com/library/multi:1.0"):
            r = httpc.request(self.am.port, "GET", path,
                              headers={"Authorization": "Bearer " + TOKEN})
            self.assertEqual(r.status, 404, "%s on the registry listener: %r" % (path, r))
        r = httpc.request(self.am.port, "GET", "/v2/library/multi/manifests/1.0?ns=example.com",
                          headers={"Accept": "application/vnd.oci.image.index.v1+json"})
        self.assertEqual(r.status, 200, repr(r))

    def test_admin_side_needs_the_token(self):
        for token in (None, "wrong", TOKEN + "x", TOKEN[:-1]):
            r = self.admin("/metrics", token=token)
            self.assertEqual(r.status, 401, "token %r: %r" % (token, r))
            self.assertIn("Bearer", r.header("WWW-Authenticate") or "")
        r = self.admin("/metrics")
        self.assertEqual(r.status, 200, repr(r))
        self.assertIn(b"archmirror_requests_total", r.body)
        r = self.admin("/api/v1/platforms?image=example.com/library/multi:1.0")
        self.assertEqual(r.status, 200, repr(r))
        self.assertIn(b'"multiArch"', r.body)
        r = self.admin("/v2/")
        self.assertEqual(r.status, 404, "the admin listener is not a registry: %r" % r)

    def test_probes_need_no_token_on_any_listener(self):
        for port in (self.am.port, self.admin_port, self.shared.port):
            for path in ("/healthz", "/readyz"):
                r = httpc.request(port, "GET", path)
                self.assertEqual(r.status, 200, "%s on %d: %r" % (path, port, r))

    def test_shared_listener_protects_only_the_admin_paths(self):
        self.assertEqual(httpc.request(self.shared.port, "GET", "/metrics").status, 401)
        self.assertEqual(self.admin("/metrics", port=self.shared.port).status, 200)
        self.assertEqual(httpc.request(self.shared.port, "GET", "/v2/").status, 200)

    def test_cli_uses_the_token_file(self):
        base = [archmirror.binary(), "platforms", "--server",
                "http://127.0.0.1:%d" % self.admin_port, "example.com/library/multi:1.0"]
        r = subprocess.run(base, capture_output=True, text=True, timeout=30)
        self.assertEqual(r.returncode, 3, "without the token: %r" % (r,))
        r = subprocess.run(base[:2] + ["--token-file", self.token_file] + base[2:],
                           capture_output=True, text=True, timeout=30)
        self.assertEqual(r.returncode, 0, "with the token: %r" % (r,))
        self.assertIn("linux/arm64", r.stdout)

    def test_zz_the_token_never_appears_in_a_log(self):
        self.admin("/metrics", token="wrong")
        self.admin("/metrics")
        for m in (self.am, self.shared):
            self.assertNotIn(TOKEN, m.log(), "%s logged the admin token" % m.name)


if __name__ == "__main__":
    testbase.main()

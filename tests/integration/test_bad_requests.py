#!/usr/bin/python3
"""Malformed and refused requests: the right OCI error, nothing sent upstream, and the
server keeps serving (on the same keep-alive connection when the error is not fatal).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import httpc, images, registry, testbase  # noqa: E402

HEX = "0123456789abcdef" * 4

BAD_NAMES = [
    ("uppercase", "Library/Multi"),
    ("dotdot", "library/../multi"),
    ("dotdot-only", ".."),
    ("pct-dotdot", "library/%2e%2e/multi"),
    ("pct-dotdot-upper", "library/%2E%2E/multi"),
    ("double-slash", "library//multi"),
    ("trailing-slash", "library/multi/"),
    ("300-chars", "a" * 300),
    ("leading-dash", "library/-multi"),
]
BAD_TAGS = [
    ("leading-dot", ".hidden"),
    ("leading-dash", "-dash"),
    ("129-chars", "a" * 129),
]
BAD_DIGESTS = [
    ("sha256-short", "sha256:abc123"),
    ("md5", "md5:" + HEX[:32]),
    ("sha256-uppercase", "sha256:" + HEX.upper()),
    ("sha256-65-hex", "sha256:" + HEX + "0"),
    ("sha256-nonhex", "sha256:" + "g" * 64),
    ("empty-hex", "sha256:"),
]


class BadRequestsTest(testbase.IntegrationCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        testbase.require_archmirror()
        cls.registry = cls.start_registry()
        cls.seeded = registry.seed_standard(cls.registry.client())
        cls.fp = cls.start_faultproxy(cls.registry)
        cls.am = cls.start_archmirror(upstreams=[("example.com", cls.fp.url)])

    def setUp(self):
        self.fp.reset()
        self.client = httpc.Client(self.am.port)

    def tearDown(self):
        self.client.close()

    def expect(self, method, path, status, code, body=None, headers=None, upstream=False):
        """Send on the test's keep-alive connection, check status/code, then GET /v2/
        on the same connection (a new one only if the server said Connection: close)."""
        h = {"Accept": images.ALL_MANIFEST_TYPES}
        h.update(headers or {})
        before = self.fp.total()
        r = self.client.request(method, path, headers=h, body=body)
        conns = self.client.connections
        ctx = "%r%s" % (r, self.context())
        self.assertEqual(r.status, status, ctx)
        if method != "HEAD" and code:
            self.assertIn(code, r.error_codes, ctx)
            self.assertTrue(r.header("Content-Type", "").startswith("application/json"), ctx)
        if method == "HEAD":
            self.assertEqual(r.body, b"", ctx)
        if not upstream:
            self.assertEqual(self.fp.total(), before, "request reached the upstream: " + ctx)
        closed = r.will_close
        ping = self.client.request("GET", "/v2/")
        self.assertEqual(ping.status, 200, "GET /v2/ after %s %s: %r" % (method, path, ping))
        self.assertEqual(ping.header("Docker-Distribution-API-Version"), "registry/2.0")
        if not closed:
            self.assertEqual(self.client.connections, conns,
                             "connection not kept alive after %s %s" % (method, path))
        return r

    def test_invalid_names(self):
        for label, name in BAD_NAMES:
            for kind, ref in (("manifests", "1.0"), ("blobs", "sha256:" + HEX)):
                for method in ("GET", "HEAD"):
                    with self.subTest(name=label, kind=kind, method=method):
                        self.expect(method, "/v2/%s/%s/%s?ns=example.com" % (name, kind, ref),
                                    400, "NAME_INVALID")

    def test_invalid_tags(self):
        for label, tag in BAD_TAGS:
            for method in ("GET", "HEAD"):
                with self.subTest(tag=label, method=method):
                    self.expect(method, "/v2/library/multi/manifests/%s?ns=example.com" % tag,
                                400, "TAG_INVALID")

    def test_invalid_digests(self):
        for label, dg in BAD_DIGESTS:
            for kind in ("manifests", "blobs"):
                for method in ("GET", "HEAD"):
                    with self.subTest(digest=label, kind=kind, method=method):
                        self.expect(method, "/v2/library/multi/%s/%s?ns=example.com" % (kind, dg),
                                    400, "DIGEST_INVALID")

    def test_namespace_not_configured(self):
        repo, tag, img = self.seeded["multi"]
        for path in ("/v2/%s/manifests/%s" % (repo, tag),
                     "/v2/%s/manifests/%s" % (repo, img["top"].digest),
                     "/v2/%s/blobs/%s" % (repo, images.all_blobs(img)[0].digest)):
            for method in ("GET", "HEAD"):
                with self.subTest(path=path, method=method):
                    self.expect(method, path + "?ns=not-configured.example", 403, "DENIED")

    def test_push_methods_unsupported(self):
        repo, tag, img = self.seeded["multi"]
        cases = [
            ("POST", "/v2/%s/blobs/uploads/" % repo, b""),
            ("POST", "/v2/%s/blobs/uploads/?digest=sha256:%s" % (repo, HEX), b"x" * 100),
            ("PUT", "/v2/%s/manifests/%s" % (repo, tag), img["top"].data),
            ("PUT", "/v2/%s/blobs/uploads/some-uuid?digest=sha256:%s" % (repo, HEX), b"abc"),
            ("PATCH", "/v2/%s/blobs/uploads/some-uuid" % repo, b"chunk" * 10),
            ("DELETE", "/v2/%s/manifests/%s" % (repo, img["top"].digest), None),
            ("DELETE", "/v2/%s/blobs/%s" % (repo, images.all_blobs(img)[0].digest), None),
        ]
        for method, path, body in cases:
            with self.subTest(method=method, path=path):
                headers = {"Content-Type": "application/octet-stream"}
                if body is not None:
                    headers["Content-Length"] = str(len(body))
                self.expect(method, path + ("&" if "?" in path else "?") + "ns=example.com",
                            405, "UNSUPPORTED", body=body, headers=headers)

    def test_unknown_manifest_and_blob(self):
        """These do go upstream (404 there) and must come back as OCI 404s."""
        self.expect("GET", "/v2/library/multi/manifests/no-such-tag?ns=example.com",
                    404, "MANIFEST_UNKNOWN", upstream=True)
        self.expect("GET", "/v2/library/multi/manifests/sha256:%s?ns=example.com" % HEX,
                    404, "MANIFEST_UNKNOWN", upstream=True)
        self.expect("GET", "/v2/library/multi/blobs/sha256:%s?ns=example.com" % HEX,
                    404, "BLOB_UNKNOWN", upstream=True)
        self.expect("HEAD", "/v2/library/multi/blobs/sha256:%s?ns=example.com" % HEX,
                    404, None, upstream=True)
        self.assertGreaterEqual(self.fp.total(), 1)

    def test_oversized_header_431(self):
        req = (b"GET /v2/library/multi/manifests/1.0?ns=example.com HTTP/1.1\r\n"
               b"Host: 127.0.0.1\r\nX-Big: " + b"a" * 40960 + b"\r\n\r\n")
        status, hdrs, body, err = httpc.raw_exchange(self.am.port, req)
        self.assertEqual(status, 431, "got %r %r %r (socket error: %r)%s" % (
            status, hdrs, body[:300], err, self.context()))
        self.assertEqual(self.fp.total(), 0, "oversized request reached the upstream")
        # many small headers adding up to 40 KiB
        req = (b"GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\n" +
               b"".join(b"X-H%04d: %s\r\n" % (i, b"b" * 100) for i in range(400)) + b"\r\n")
        status, hdrs, body, err = httpc.raw_exchange(self.am.port, req)
        self.assertEqual(status, 431, "many headers: got %r (%r)" % (status, err))
        r = httpc.request(self.am.port, "GET", "/v2/")
        self.assertEqual(r.status, 200, repr(r))

    def test_server_survives(self):
        """After the error cases (unittest runs methods alphabetically), a real pull still
        works on the same connection."""
        repo, tag, img = self.seeded["list"]
        r = self.client.request("GET", "/v2/%s/manifests/%s?ns=example.com" % (repo, tag),
                                headers={"Accept": images.CONTAINERD_RESOLVE_ACCEPT})
        self.assertManifestResponse(r, img["top"])
        self.assertTrue(self.am.alive())


if __name__ == "__main__":
    testbase.main()

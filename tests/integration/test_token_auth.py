#!/usr/bin/python3
"""Upstream registry with `auth: token` (docker token spec).

archmirror pulls tags, digests and blobs several times; the token issuer is asked once
per scope (repository:<name>:pull), not once per request; the client never sees a 401.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import images, registry, testbase  # noqa: E402

ROUNDS = 3


class TokenAuthTest(testbase.IntegrationCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        testbase.require_archmirror()
        cls.issuer = cls.start_token_issuer()
        cls.registry = cls.start_registry(token=cls.issuer.registry_auth())
        cls.seeded = registry.seed_standard(cls.registry.client())
        cls.issuer.reset_counts()
        cls.fp = cls.start_faultproxy(cls.registry)
        cls.am = cls.start_archmirror(upstreams=[("example.com", cls.fp.url)])

    def test_pulls_ask_issuer_once_per_scope(self):
        seen_statuses = []
        for rnd in range(ROUNDS):
            for key in ("multi", "list"):
                repo, tag, img = self.seeded[key]
                with self.subTest(round=rnd, image=key):
                    r = self.get(self.am, "/v2/%s/manifests/%s?ns=example.com" % (repo, tag),
                                 accept=images.CONTAINERD_RESOLVE_ACCEPT, method="HEAD")
                    seen_statuses.append(r.status)
                    self.assertManifestResponse(r, img["top"], "HEAD")
                    r = self.get(self.am, "/v2/%s/manifests/%s?ns=example.com" % (repo, tag),
                                 accept=images.CONTAINERD_RESOLVE_ACCEPT)
                    seen_statuses.append(r.status)
                    self.assertManifestResponse(r, img["top"], "GET")
                    m = images.platform_manifest(img, "linux/arm64")
                    r = self.get(self.am, "/v2/%s/manifests/%s?ns=example.com" % (repo, m.digest),
                                 accept=m.media_type + ", */*")
                    seen_statuses.append(r.status)
                    self.assertManifestResponse(r, m, "GET")
                    for b in images.all_blobs(img):
                        r = self.get(self.am, "/v2/%s/blobs/%s?ns=example.com" % (repo, b.digest))
                        seen_statuses.append(r.status)
                        self.assertBlobResponse(r, b, "GET")
        self.assertNotIn(401, seen_statuses, "the client saw a 401")
        counts = self.issuer.counts()
        ctx = "issuer requests: %s%s" % (dict(counts), self.context())
        for key in ("multi", "list"):
            scope = "repository:%s:pull" % self.seeded[key][0]
            self.assertEqual(counts.get(scope), 1, "scope %s: %s" % (scope, ctx))
        for scope, n in counts.items():
            self.assertEqual(n, 1, "scope %r asked %d times; %s" % (scope, n, ctx))
        # the upstream did get authorized requests (tokens were used, not bypassed)
        authed = [e for e in self.fp.requests()
                  if e["headers"].get("Authorization", "").startswith("Bearer ")]
        self.assertTrue(authed, "no upstream request carried a Bearer token" + ctx)
        self.assertFalse([e for e in authed if e["status"] == 401],
                         "a request with a token was refused" + ctx)

    def test_unknown_repo_no_401(self):
        r = self.get(self.am, "/v2/library/absent/manifests/1.0?ns=example.com",
                     accept=images.ALL_MANIFEST_TYPES)
        self.assertNotEqual(r.status, 401, repr(r))
        self.assertEqual(r.status, 404, repr(r))
        self.assertTrue(set(r.error_codes) & {"MANIFEST_UNKNOWN", "NAME_UNKNOWN"}, repr(r))
        self.assertIsNone(r.header("WWW-Authenticate"), "upstream challenge leaked: %r" % r)


if __name__ == "__main__":
    testbase.main()

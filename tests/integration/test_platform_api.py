#!/usr/bin/python3
"""The platform API (/api/v1/platforms) against a seeded docker-registry behind the
counting proxy (upstream "example.com").

* GET for the OCI index: linux/amd64 + linux/arm64 (the buildx attestation left out),
  multiArch true, digests and sizes of the child manifests; from the upstream first, then
  from the cache. HEAD answers the same head.
* GET for the Docker manifest list: amd64, arm64 (v8 normalised away), arm/v7.
* GET for the single-arch image: the platform of its config blob (linux/amd64), multiArch
  false; the upstream sees the config blob GET exactly once, across repeated queries, a
  query by digest, and a restart of archmirror (the platform is kept in LMDB).
* POST batch with require linux/arm64 (and arm/v7): one entry per distinct image string,
  "missing" lists the images that containerd on the required platform could not pull,
  "matches" names the entry it would; an unknown tag, an unknown registry and a bad
  reference each get their own error entry; identical images are looked up once.
* An OCI index of indexes (harness images.nested_index_image): the leaf manifests'
  platforms with the leaf digests (a leaf without a platform takes its child index's),
  the child indexes read once upstream and kept in the cache; POST with require matches
  leaves and lists what is missing; a child index the upstream lost fails that image
  (MANIFEST_INVALID naming the child), not silently drops its platforms.
* A batch of 12 uncached manifests runs at most 8 upstream lookups at a time (the proxy
  holds every answer until the test releases them all).
* Bad input: malformed JSON, wrong shape, too many images, missing image=, bad reference,
  unknown registry, wrong method, unknown path → 4xx JSON errors saying what was wrong,
  and none of it reaches the upstream.
"""
import datetime
import json
import os
import sys
import threading
import time
import urllib.parse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import httpc, images, registry, testbase  # noqa: E402

API = "/api/v1/platforms"


def plat(p):
    """"linux/arm/v7" of a platform entry."""
    return "/".join(x for x in (p["os"], p["architecture"], p["variant"]) if x)


class PlatformAPITest(testbase.IntegrationCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        testbase.require_archmirror()
        cls.registry = cls.start_registry()
        client = cls.registry.client()
        cls.seeded = registry.seed_standard(client)
        for key in ("nested", "nested-broken"):
            repo = "library/" + key
            cls.seeded[key] = (repo, "1.0", client.push_image(
                repo, "1.0", images.nested_index_image(key)))
        # The upstream loses child index A of nested-broken after the push.
        img = cls.seeded["nested-broken"][2]
        client.delete_manifest("library/nested-broken", img["indexes"][0].digest)
        cls.fp = cls.start_faultproxy(cls.registry)
        up = [("example.com", cls.fp.url)]
        cls.am = cls.start_archmirror(name="am", upstreams=up)
        cls.am_batch = cls.start_archmirror(name="am-batch", upstreams=up)
        cls.am_conc = cls.start_archmirror(name="am-conc", upstreams=up)

    def setUp(self):
        self.fp.reset()

    # -- helpers ---------------------------------------------------------------------
    def image(self, key, digest=False):
        repo, tag, img = self.seeded[key]
        if digest:
            return "example.com/%s@%s" % (repo, img["top"].digest)
        return "example.com/%s:%s" % (repo, tag)

    def api_get(self, image, am=None, method="GET"):
        path = API + "?image=" + urllib.parse.quote(image, safe="")
        return httpc.request((am or self.am).port, method, path)

    def api_post(self, doc, am=None, raw=None):
        body = raw if raw is not None else json.dumps(doc).encode()
        return httpc.request((am or self.am).port, "POST", API, body=body,
                             headers={"Content-Type": "application/json",
                                      "Content-Length": str(len(body))})

    def doc(self, r, status=200):
        ctx = "%r%s" % (r, self.context())
        self.assertEqual(r.status, status, ctx)
        self.assertEqual(r.header("Content-Type"), "application/json", ctx)
        try:
            return json.loads(r.body)
        except ValueError:
            self.fail("not JSON: %s" % ctx)

    def assertApiError(self, r, status, code, says=None):
        d = self.doc(r, status)
        self.assertIn("error", d, repr(d))
        self.assertEqual(d["error"]["code"], code, repr(d))
        self.assertTrue(d["error"]["message"], repr(d))
        if says:
            self.assertIn(says, d["error"]["message"], repr(d))
        return d

    def assertChecked(self, d):
        t = datetime.datetime.strptime(d["checkedAt"], "%Y-%m-%dT%H:%M:%S.%fZ")
        age = datetime.datetime.utcnow() - t
        self.assertLess(abs(age.total_seconds()), 600, d["checkedAt"])

    def assertChildren(self, d, key, platforms):
        img = self.seeded[key][2]
        self.assertEqual([plat(p) for p in d["platforms"]], platforms, repr(d))
        for p, name in zip(d["platforms"], platforms):
            child = img["children"][name]["manifest"]
            self.assertEqual(p["digest"], child.digest, name)
            self.assertEqual(p["size"], child.size, name)
            self.assertEqual(p["platform"], name)

    # -- GET -------------------------------------------------------------------------
    def test_oci_index_lists_amd64_and_arm64_without_the_attestation(self):
        _, _, img = self.seeded["multi"]
        r = self.api_get(self.image("multi"))
        d = self.doc(r)
        self.assertEqual(d["image"], self.image("multi"))
        self.assertEqual(d["registry"], "example.com")
        self.assertEqual(d["repository"], "library/multi")
        self.assertEqual(d["tag"], "1.0")
        self.assertEqual(d["digest"], img["top"].digest)
        self.assertEqual(d["mediaType"], img["top"].media_type)
        self.assertIs(d["multiArch"], True)
        self.assertChildren(d, "multi", ["linux/amd64", "linux/arm64"])
        att = img["children"]["attestation"]["manifest"].digest
        self.assertNotIn(att, r.body.decode())
        self.assertEqual(d["platforms"][1]["variant"], "")  # arm64/v8 normalised
        self.assertChecked(d)
        first_source = d["source"]

        r2 = self.api_get(self.image("multi"))
        again = self.doc(r2)
        self.assertEqual(again["source"], "cache")
        self.assertEqual(again["cacheState"], "hit")
        self.assertEqual(again["platforms"], d["platforms"])
        if first_source == "upstream":
            self.assertEqual(self.fp.count(method="GET", prefix="/v2/library/multi/manifests/"),
                             1, self.context())
        # HEAD: the same head, no body.
        h = self.api_get(self.image("multi"), method="HEAD")
        self.assertEqual(h.status, 200)
        self.assertEqual(h.body, b"")
        self.assertEqual(int(h.header("Content-Length")), len(r2.body))

    def test_docker_list_lists_three_platforms_including_arm_v7(self):
        _, _, img = self.seeded["list"]
        d = self.doc(self.api_get(self.image("list")))
        self.assertEqual(d["mediaType"], img["top"].media_type)
        self.assertIs(d["multiArch"], True)
        self.assertChildren(d, "list", ["linux/amd64", "linux/arm64", "linux/arm/v7"])
        self.assertEqual(d["platforms"][2]["architecture"], "arm")
        self.assertEqual(d["platforms"][2]["variant"], "v7")
        # By digest: same platforms, no tag, nothing more from the upstream.
        before = self.fp.total()
        d2 = self.doc(self.api_get(self.image("list", digest=True)))
        self.assertIsNone(d2["tag"])
        self.assertEqual(d2["platforms"], d["platforms"])
        self.assertEqual(d2["source"], "cache")
        self.assertEqual(self.fp.total(), before, self.context())

    def test_single_arch_platform_comes_from_its_config_fetched_once(self):
        repo, _, img = self.seeded["single"]
        cfg = img["image"]["config"]
        cfg_path = "/v2/%s/blobs/%s" % (repo, cfg.digest)
        d = self.doc(self.api_get(self.image("single")))
        self.assertIs(d["multiArch"], False)
        self.assertEqual(d["mediaType"], img["top"].media_type)
        self.assertEqual(d["digest"], img["top"].digest)
        self.assertEqual(len(d["platforms"]), 1, repr(d))
        p = d["platforms"][0]
        self.assertEqual(plat(p), "linux/amd64")
        self.assertEqual(p["digest"], img["top"].digest)
        self.assertEqual(p["size"], img["top"].size)
        self.assertEqual(d["source"], "upstream")
        self.assertEqual(self.fp.count(method="GET", path=cfg_path), 1, self.context())

        d2 = self.doc(self.api_get(self.image("single")))
        self.assertEqual(d2["source"], "cache")
        self.assertEqual(d2["platforms"], d["platforms"])
        d3 = self.doc(self.api_get(self.image("single", digest=True)))
        self.assertEqual(d3["source"], "cache")
        self.assertEqual(d3["platforms"], d["platforms"])
        self.assertEqual(self.fp.count(method="GET", path=cfg_path), 1,
                         "config blob fetched again" + self.context())

        # The platform is kept in LMDB: a restarted archmirror does not fetch it again.
        self.am.restart()
        d4 = self.doc(self.api_get(self.image("single")))
        self.assertEqual(d4["source"], "cache", repr(d4))
        self.assertEqual(d4["platforms"], d["platforms"])
        self.assertEqual(self.fp.count(method="GET", path=cfg_path), 1,
                         "config blob fetched again after a restart" + self.context())

    def test_get_errors(self):
        self.assertApiError(self.api_get("example.com/library/nope:1.0"), 404,
                            "MANIFEST_UNKNOWN")
        self.fp.reset()
        d = self.assertApiError(self.api_get("quay.io/prometheus/node-exporter:v1"), 403,
                                "REGISTRY_UNKNOWN", '"quay.io"')
        self.assertEqual(d["image"], "quay.io/prometheus/node-exporter:v1")
        self.assertApiError(self.api_get("Example.com/UPPER:1"), 400, "REFERENCE_INVALID")
        self.assertApiError(self.api_get("example.com/a:b:c"), 400, "REFERENCE_INVALID")
        self.assertApiError(httpc.request(self.am.port, "GET", API), 400, "BAD_REQUEST",
                            "image=")
        self.assertApiError(httpc.request(self.am.port, "GET", API + "?image=a&image=b"), 400,
                            "BAD_REQUEST")
        self.assertApiError(httpc.request(self.am.port, "GET", API + "?image=%zz"), 400,
                            "BAD_REQUEST")
        self.assertApiError(httpc.request(self.am.port, "GET", API + "/sub?image=x"), 404,
                            "NOT_FOUND")
        r = httpc.request(self.am.port, "DELETE", API + "?image=x")
        self.assertApiError(r, 405, "METHOD_NOT_ALLOWED")
        self.assertEqual(r.header("Allow"), "GET, HEAD, POST")
        self.assertEqual(self.fp.total(), 0, "bad input reached the upstream" + self.context())

    # -- nested indexes --------------------------------------------------------------
    def test_nested_index_lists_the_leaf_manifests_with_their_digests(self):
        repo, _, img = self.seeded["nested"]
        a, b = img["indexes"]
        r = self.api_get(self.image("nested"))
        d = self.doc(r)
        self.assertEqual(d["digest"], img["top"].digest)
        self.assertEqual(d["mediaType"], images.OCI_INDEX)
        self.assertIs(d["multiArch"], True)
        # B carries a platform, A none: containerd prefers B's entry, then descends into A.
        self.assertChildren(d, "nested", ["linux/arm/v7", "linux/amd64", "linux/arm64"])
        body = r.body.decode()
        for gone in (a.digest, b.digest, img["children"]["attestation"]["manifest"].digest):
            self.assertNotIn(gone, body)
        self.assertEqual(d["source"], "upstream")
        for child in (a, b):
            path = "/v2/%s/manifests/%s" % (repo, child.digest)
            self.assertEqual(self.fp.count(method="GET", path=path), 1, self.context())

        # Cached: the second answer and the child indexes a node asks for next need no
        # upstream request.
        before = self.fp.total()
        again = self.doc(self.api_get(self.image("nested")))
        self.assertEqual(again["source"], "cache")
        self.assertEqual(again["platforms"], d["platforms"])
        for child in (a, b):
            mr = self.get(self.am, "/v2/%s/manifests/%s?ns=example.com" % (repo, child.digest),
                          accept=images.ALL_MANIFEST_TYPES)
            self.assertManifestResponse(mr, child)
        self.assertEqual(self.fp.total(), before, self.context())

    def test_batch_require_matches_leaves_of_a_nested_index(self):
        nested = self.image("nested")
        leaf = {k: c["manifest"].digest for k, c in self.seeded["nested"][2]["children"].items()}
        d = self.doc(self.api_post({"images": [nested],
                                    "require": ["linux/arm64", "linux/arm/v7", "linux/s390x"]},
                                   am=self.am_batch))
        self.assertEqual(d["missing"], [{"image": nested, "platforms": ["linux/s390x"]}])
        self.assertEqual(d["results"][0]["matches"], {
            "linux/arm64": {"platform": "linux/arm64", "digest": leaf["linux/arm64"]},
            "linux/arm/v7": {"platform": "linux/arm/v7", "digest": leaf["linux/arm/v7"]},
            "linux/s390x": None})
        d = self.doc(self.api_post({"images": [nested], "require": ["linux/amd64"]},
                                   am=self.am_batch))
        self.assertEqual(d["missing"], [])
        self.assertEqual(d["results"][0]["matches"]["linux/amd64"]["digest"], leaf["linux/amd64"])

    def test_nested_index_whose_child_is_gone_upstream_is_an_error(self):
        lost = self.seeded["nested-broken"][2]["indexes"][0].digest
        broken = self.image("nested-broken")
        self.assertApiError(self.api_get(broken), 502, "MANIFEST_INVALID", lost)
        d = self.doc(self.api_post({"images": [broken, self.image("nested")],
                                    "require": ["linux/arm64"]}, am=self.am_batch))
        by = {x["image"]: x for x in d["results"]}
        self.assertEqual(by[broken]["error"]["code"], "MANIFEST_INVALID", repr(d))
        self.assertIn(lost, by[broken]["error"]["message"])
        self.assertNotIn("platforms", by[broken])
        self.assertEqual(d["missing"], [])  # an error is reported as such, not as missing

    # -- POST ------------------------------------------------------------------------
    def test_batch_reports_missing_platforms_and_errors_per_image(self):
        multi, lst, single = self.image("multi"), self.image("list"), self.image("single")
        images = [multi, lst, single, "example.com/library/nope:1.0", "quay.io/x/y:1",
                  "Not A Reference", multi, self.image("multi", digest=True)]
        r = self.api_post({"images": images, "require": ["linux/arm64"]}, am=self.am_batch)
        d = self.doc(r)
        results = d["results"]
        self.assertEqual([x["image"] for x in results],
                         [multi, lst, single, "example.com/library/nope:1.0", "quay.io/x/y:1",
                          "Not A Reference", self.image("multi", digest=True)])
        by = {x["image"]: x for x in results}
        self.assertEqual([plat(p) for p in by[multi]["platforms"]],
                         ["linux/amd64", "linux/arm64"])
        self.assertEqual(len(by[lst]["platforms"]), 3)
        self.assertEqual([plat(p) for p in by[single]["platforms"]], ["linux/amd64"])
        self.assertIs(by[single]["multiArch"], False)
        self.assertEqual(by["example.com/library/nope:1.0"]["error"]["code"], "MANIFEST_UNKNOWN")
        self.assertEqual(by["quay.io/x/y:1"]["error"]["code"], "REGISTRY_UNKNOWN")
        self.assertEqual(by["Not A Reference"]["error"]["code"], "REFERENCE_INVALID")
        self.assertEqual(d["missing"], [{"image": single, "platforms": ["linux/arm64"]}])
        arm64 = self.seeded["list"][2]["children"]["linux/arm64"]["manifest"].digest
        self.assertEqual(by[lst]["matches"],
                         {"linux/arm64": {"platform": "linux/arm64", "digest": arm64}})
        self.assertEqual(by[single]["matches"], {"linux/arm64": None})
        # Each image once upstream: the tag of multi twice in the list, its digest too.
        self.assertEqual(self.fp.count(method="GET", path="/v2/library/multi/manifests/1.0"), 1,
                         self.context())
        self.assertFalse(any(e["path"].startswith("/v2/x/") for e in self.fp.requests()))

        # arm/v7 needs an arm entry: the OCI index (amd64, arm64) does not have one; arm64
        # alone would not do on a 32-bit node.
        d = self.doc(self.api_post({"images": [multi, lst, single],
                                    "require": ["linux/arm64/v8", "linux/arm/v7"]},
                                   am=self.am_batch))
        self.assertEqual(d["missing"], [
            {"image": multi, "platforms": ["linux/arm/v7"]},
            {"image": single, "platforms": ["linux/arm64", "linux/arm/v7"]}])
        for x in d["results"]:
            self.assertEqual(x["source"], "cache", repr(x))

        # Without require: no "missing" entries and no "matches".
        d = self.doc(self.api_post({"images": [single]}, am=self.am_batch))
        self.assertEqual(d["missing"], [])
        self.assertNotIn("matches", d["results"][0])

    def test_batch_runs_at_most_8_lookups_at_a_time(self):
        images, paths = [], []
        for key in ("multi", "list", "single"):
            repo, tag, img = self.seeded[key]
            refs = [tag, img["top"].digest] + [c["manifest"].digest
                                               for c in img["children"].values()]
            for ref in refs:
                sep = ":" if ref == tag else "@"
                images.append("example.com/%s%s%s" % (repo, sep, ref))
                paths.append("/v2/%s/manifests/%s" % (repo, ref))
        self.assertEqual(len(set(paths)), 12)
        for p in paths:
            self.fp.gate(p, 0)
        out = {}

        def post():
            out["r"] = self.api_post({"images": images}, am=self.am_conc)

        t = threading.Thread(target=post)
        t.start()
        try:
            deadline = time.monotonic() + 30
            while self.fp.count(method="GET", prefix="/v2/") < 8 and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(0.3)  # a 9th lookup would show up here (a safety margin, not a sync)
            self.assertEqual(self.fp.count(method="GET", prefix="/v2/"), 8, self.context())
        finally:
            self.fp.release()
            t.join(60)
        d = self.doc(out["r"])
        self.assertEqual(len(d["results"]), 12)
        want = {"multi": 2, "list": 3, "single": 1}
        for x, path in zip(d["results"], paths):
            self.assertNotIn("error", x, repr(x))
            top = x["image"].endswith(":1.0") or x["digest"] == self.seeded[
                x["repository"].split("/")[1]][2]["top"].digest
            n = want[x["repository"].split("/")[1]] if top else 1
            self.assertEqual(len(x["platforms"]), n, repr(x))
        self.assertEqual(self.fp.count(method="GET", prefix="/v2/library/single/manifests/"), 2)

    def test_batch_bad_input(self):
        am = self.am_batch
        self.assertApiError(self.api_post(None, am=am, raw=b'{"images": ["a",'), 400,
                            "JSON_INVALID", "line 1")
        self.assertApiError(self.api_post(None, am=am, raw=b""), 400, "JSON_INVALID")
        self.assertApiError(self.api_post(["nginx"], am=am), 400, "BODY_INVALID")
        self.assertApiError(self.api_post({"images": "nginx"}, am=am), 400, "BODY_INVALID")
        self.assertApiError(self.api_post({"images": ["a"], "extra": 1}, am=am), 400,
                            "BODY_INVALID", '"extra"')
        self.assertApiError(self.api_post({"images": ["a"], "require": ["linux"]}, am=am),
                            400, "PLATFORM_INVALID")
        many = ["example.com/img%d:1" % i for i in range(1001)]
        self.assertApiError(self.api_post({"images": many}, am=am), 413, "TOO_MANY_IMAGES")
        self.assertEqual(self.fp.total(), 0, "bad input reached the upstream" + self.context())
        # The connection-level contract still holds after all that: a good request works.
        d = self.doc(self.api_post({"images": []}, am=am))
        self.assertEqual(d, {"results": [], "missing": []})


if __name__ == "__main__":
    testbase.main()

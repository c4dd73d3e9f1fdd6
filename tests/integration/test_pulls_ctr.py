#!/usr/bin/python3
"""The pull log as real containerd 1.6 pulls fill it (GET /api/v1/pulls, pulls.jsonl).

upstream: docker-registry seeded twice: library/{multi,list,single}:1.0 (seed_standard:
OCI index amd64 + arm64/v8 + attestation, Docker list amd64/arm64/arm-v7, single-arch
amd64 schema2) for the nodes that send X-Node-Platform, and plain/{multi,list,single}:1.0,
the same kinds built from other seeds (so different digests: nothing archmirror learnt
from the first set helps it with the second) for the node that sends no header.
archmirror --upstream example.com=<registry>, default settings (pull log on, diagnostics
warn). Three private containerds play three nodes; hosts.toml: server = a dead port,
[host."<archmirror>"] pull+resolve, with header X-Node-Platform linux/arm64 resp.
linux/amd64, or none.

All nodes connect from 127.0.0.1, so archmirror (which counts distinct nodes by address)
sees one node; what this test asserts is the per-platform pull counts and the platform
source:
  * header: the arm64 and the amd64 node each pull the OCI index and the Docker list →
    /api/v1/pulls shows exactly one pull per (image, platform), source "header", tag 1.0,
    the index digest; ?arch= and ?since= filter; pulls.jsonl has one line per pull with
    the child manifest the node fetched.
  * inference: the header-less node pulls the index for linux/arm64 and the list for
    linux/arm/v7 → attributed to those platforms from the child manifest it fetched
    (platformSource "child-manifest").
  * single-arch: the amd64 node's pull is attributed by header; the header-less node's
    pull of the same image (whose config archmirror has read by then) to the config's
    platform (linux/amd64, platformSource "config"); and so is the header-less pull of a
    single-arch image archmirror has never looked at (plain/single: the first pull of
    every new single-arch image or digest).
  * nested: an index of one index (library/nested:1.0) pulled by the arm64 node (header)
    and the header-less node for linux/amd64 is one pull each, recorded against the tag
    and the top index with the leaf the node fetched (not a tagless pull of the child
    index).
"""
import datetime
import json
import os
import sys
import urllib.parse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import containerd, httpc, images, proc, registry, testbase  # noqa: E402

PULLS = "/api/v1/pulls"
REG = "example.com"


def seed_plain(client):
    """plain/{multi,list,single}:1.0, built from seeds of their own (other digests)."""
    out = {}
    for key, builder in (("multi", images.oci_index_image), ("list", images.docker_list_image),
                         ("single", images.docker_single_image)):
        repo = "plain/%s" % key
        img = builder("plain-" + key)
        client.push_image(repo, "1.0", img)
        out[key] = (repo, "1.0", img)
    return out


def index_of_index(seed):
    """An OCI index whose one entry (no platform) is the OCI index of oci_index_image.
    (images.nested_index_image also has an arm/v7 child index, which containerd 1.6's
    unpack reads even on an arm64 node that did not fetch it.)"""
    inner = images.oci_index_image(seed)
    top = images.Blob(images.canonical({"schemaVersion": 2, "mediaType": images.OCI_INDEX,
                                        "manifests": [inner["top"].descriptor()]}),
                      images.OCI_INDEX)
    return {"kind": "oci-nested", "top": top, "indexes": [inner["top"]],
            "children": inner["children"]}


def parse_time(s):
    return datetime.datetime.strptime(s, "%Y-%m-%dT%H:%M:%S.%fZ").replace(
        tzinfo=datetime.timezone.utc)


class PullLogCtrTest(testbase.IntegrationCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        testbase.require_archmirror()
        cls.registry = cls.start_registry()
        client = cls.registry.client()
        cls.seeded = registry.seed_standard(client)
        cls.plain = seed_plain(client)
        nested = index_of_index("pulls-nested")
        client.push_image("library/nested", "1.0", nested)
        cls.nested = {"nested": ("library/nested", "1.0", nested)}
        cls.am = cls.start_archmirror(upstreams=[(REG, cls.registry.url)])
        cls.dead = proc.DeadPort()
        cls.addClassCleanup(cls.dead.close)
        cls.hosts = {}
        for plat in ("linux/arm64", "linux/amd64", None):
            name = (plat or "none").replace("/", "-")
            d = os.path.join(cls.workdir, "hosts-" + name)
            containerd.write_hosts_toml(d, REG, cls.dead.url, cls.am.url, platform=plat)
            cls.hosts[plat] = d
        cls.nodes = {
            "linux/arm64": cls.start_containerd(name="node-arm64"),
            "linux/amd64": cls.start_containerd(name="node-amd64"),
            None: cls.start_containerd(name="node-plain"),
        }
        cls.t_start = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(
            seconds=2)

    # -- helpers ---------------------------------------------------------------------
    @staticmethod
    def ref(seeded, key):
        repo, tag, _ = seeded[key]
        return "%s/%s:%s" % (REG, repo, tag)

    def pull(self, node_header, seeded, key, platform):
        """Node (by the header its hosts.toml sends; None: no header) pulls with ctr."""
        repo, tag, img = seeded[key]
        pr = self.nodes[node_header].pull(self.ref(seeded, key), platform,
                                          self.hosts[node_header])
        self.assertTrue(pr.ok, "%r%s" % (pr, self.context()))
        self.assertEqual(pr.digest, img["top"].digest, "pulled digest != seeded digest")
        return pr

    def query(self, **params):
        path = PULLS + ("?" + urllib.parse.urlencode(params) if params else "")
        r = httpc.request(self.am.port, "GET", path)
        ctx = "%r%s" % (r, self.context())
        self.assertEqual(r.status, 200, ctx)
        self.assertEqual(r.header("Content-Type"), "application/json", ctx)
        doc = json.loads(r.body)
        self.assertFalse(doc.get("truncated"), ctx)
        return doc

    def entries(self, seeded, key, **params):
        """{platform: entry} of /api/v1/pulls?image=<ref> (one entry per platform)."""
        doc = self.query(image=self.ref(seeded, key), **params)
        out = {}
        for e in doc["pulls"]:
            self.assertNotIn(e["platform"], out, "two entries for one platform: %s" % doc)
            out[e["platform"]] = e
        return out

    def lines(self):
        """pulls.jsonl records (the API flushes first, so query before reading)."""
        self.query()
        path = os.path.join(self.am.data_dir, "pulls", "pulls.jsonl")
        with open(path) as f:
            return [json.loads(l) for l in f if l.strip()]

    def lines_for(self, seeded, key):
        repo = seeded[key][0]
        return [l for l in self.lines() if l["repository"] == repo]

    def assertEntry(self, e, seeded, key, platform, pulls, sources, msg=""):
        repo, tag, img = seeded[key]
        ctx = "%s\nentry: %s%s" % (msg, json.dumps(e, indent=1), self.context())
        self.assertEqual(e["image"], "%s/%s" % (REG, repo), ctx)
        self.assertEqual(e["tag"], tag, ctx)
        self.assertEqual(e["platform"], platform, ctx)
        self.assertEqual(e["digest"], img["top"].digest, ctx)
        self.assertEqual(e["pulls"], pulls, ctx)
        self.assertEqual(e["nodes"], 1, "every node is 127.0.0.1: " + ctx)
        want = {"header": 0, "child-manifest": 0, "config": 0, "unknown": 0}
        want.update(sources)
        self.assertEqual(e["sources"], want, ctx)
        first, last = parse_time(e["firstPull"]), parse_time(e["lastPull"])
        now = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=2)
        self.assertTrue(self.t_start <= first <= last <= now, ctx)

    def assertLine(self, line, seeded, key, platform, source, child_platform=None, msg=""):
        repo, tag, img = seeded[key]
        ctx = "%s\nline: %s%s" % (msg, json.dumps(line), self.context())
        self.assertEqual(line["registry"], REG, ctx)
        self.assertEqual(line["repository"], repo, ctx)
        self.assertEqual(line["tag"], tag, ctx)
        self.assertEqual(line["digest"], img["top"].digest, ctx)
        self.assertEqual(line["nodePlatform"], platform, ctx)
        self.assertEqual(line["platformSource"], source, ctx)
        self.assertEqual(line["node"], "127.0.0.1", ctx)
        self.assertTrue(line["client"].startswith("127.0.0.1:"), ctx)
        if img["kind"] == "docker-single":
            self.assertEqual(line["platformDigest"], "", ctx)
            self.assertEqual(line["imagePlatforms"], ["linux/amd64"], ctx)
        else:
            child = img["children"][child_platform or platform]["manifest"]
            self.assertEqual(line["platformDigest"], child.digest, ctx)
            self.assertEqual(set(line["imagePlatforms"]),
                             set(p for p in img["children"] if p != "attestation"), ctx)

    # -- tests -----------------------------------------------------------------------
    def test_1_two_nodes_by_header(self):
        """arm64 and amd64 nodes (X-Node-Platform) pull the index and the list: one pull
        per platform, source header."""
        for key in ("multi", "list"):
            for plat in ("linux/arm64", "linux/amd64"):
                self.pull(plat, self.seeded, key, plat)
        for key in ("multi", "list"):
            with self.subTest(image=key):
                got = self.entries(self.seeded, key)
                self.assertEqual(set(got), {"linux/arm64", "linux/amd64"},
                                 "platforms in /api/v1/pulls: %s%s" % (got, self.context()))
                for plat in ("linux/arm64", "linux/amd64"):
                    self.assertEntry(got[plat], self.seeded, key, plat, 1, {"header": 1})
                lines = self.lines_for(self.seeded, key)
                self.assertEqual(len(lines), 2, "pulls.jsonl lines for %s: %s" % (key, lines))
                self.assertEqual({l["nodePlatform"] for l in lines},
                                 {"linux/arm64", "linux/amd64"}, lines)
                for l in lines:
                    self.assertLine(l, self.seeded, key, l["nodePlatform"], "header")
        # filters: arch, platform, since
        doc = self.query(arch="arm64", image="%s/library/" % REG)
        self.assertEqual(sorted((e["image"], e["platform"]) for e in doc["pulls"]),
                         [("%s/library/list" % REG, "linux/arm64"),
                          ("%s/library/multi" % REG, "linux/arm64")], doc)
        doc = self.query(platform="linux/amd64", image="%s/library/" % REG)
        self.assertEqual(sorted((e["image"], e["platform"]) for e in doc["pulls"]),
                         [("%s/library/list" % REG, "linux/amd64"),
                          ("%s/library/multi" % REG, "linux/amd64")], doc)
        doc = self.query(since="10m", image="%s/library/multi:1.0" % REG)
        self.assertEqual(len(doc["pulls"]), 2, doc)
        future = (datetime.datetime.now(datetime.timezone.utc) +
                  datetime.timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
        doc = self.query(since=future, image="%s/library/multi:1.0" % REG)
        self.assertEqual(doc["pulls"], [], "since in the future still lists: %s" % doc)

    def test_2_no_header_inferred_from_child_manifest(self):
        """A node without X-Node-Platform: the platform is the one of the child manifest
        it fetched after the index."""
        self.pull(None, self.plain, "multi", "linux/arm64")
        self.pull(None, self.plain, "list", "linux/arm/v7")
        for key, plat in (("multi", "linux/arm64"), ("list", "linux/arm/v7")):
            with self.subTest(image=key, platform=plat):
                got = self.entries(self.plain, key)
                self.assertEqual(set(got), {plat}, "platforms in /api/v1/pulls: %s%s"
                                 % (got, self.context()))
                self.assertEntry(got[plat], self.plain, key, plat, 1, {"child-manifest": 1})
                lines = self.lines_for(self.plain, key)
                self.assertEqual(len(lines), 1, "pulls.jsonl lines for %s: %s" % (key, lines))
                self.assertLine(lines[0], self.plain, key, plat, "child-manifest")

    def test_3_single_arch_header_and_known_config(self):
        """Single-arch: by header from the amd64 node; then the header-less node pulls
        the same image, whose config archmirror has read already: the config's
        platform."""
        self.pull("linux/amd64", self.seeded, "single", "linux/amd64")
        got = self.entries(self.seeded, "single")
        self.assertEqual(set(got), {"linux/amd64"}, "%s%s" % (got, self.context()))
        self.assertEntry(got["linux/amd64"], self.seeded, "single", "linux/amd64", 1,
                         {"header": 1})
        lines = self.lines_for(self.seeded, "single")
        self.assertEqual(len(lines), 1, lines)
        self.assertLine(lines[0], self.seeded, "single", "linux/amd64", "header")
        # archmirror knows this image's platform now (it is what the API answers).
        r = httpc.request(self.am.port, "GET", "/api/v1/platforms?image=" + urllib.parse.quote(
            self.ref(self.seeded, "single"), safe=""))
        self.assertEqual(r.status, 200, r)
        self.assertEqual([p["platform"] for p in json.loads(r.body)["platforms"]],
                         ["linux/amd64"], r)

        self.pull(None, self.seeded, "single", "linux/amd64")
        got = self.entries(self.seeded, "single")
        self.assertEqual(set(got), {"linux/amd64"}, "%s%s" % (got, self.context()))
        self.assertEntry(got["linux/amd64"], self.seeded, "single", "linux/amd64", 2,
                         {"header": 1, "config": 1})
        lines = self.lines_for(self.seeded, "single")
        self.assertEqual(len(lines), 2, lines)
        self.assertLine(lines[1], self.seeded, "single", "linux/amd64", "config")

    def test_4_single_arch_first_pull_without_header(self):
        """The header-less node pulls a single-arch image archmirror has never looked at
        (nothing asked for its platform before): still attributed to its config's
        platform, linux/amd64, source config: archmirror fetches that config for the
        node within the same pull."""
        self.pull(None, self.plain, "single", "linux/amd64")
        got = self.entries(self.plain, "single")
        pull_lines = [l for l in self.am.log().splitlines() if "debug pull: " in l]
        self.assertEqual(set(got), {"linux/amd64"},
                         "header-less first pull of a single-arch image not attributed to "
                         "its config's platform: /api/v1/pulls:\n%s\narchmirror's pull "
                         "lines:\n%s" % (json.dumps(got, indent=1), "\n".join(pull_lines)))
        self.assertEntry(got["linux/amd64"], self.plain, "single", "linux/amd64", 1,
                         {"config": 1})
        lines = self.lines_for(self.plain, "single")
        self.assertEqual(len(lines), 1, lines)
        self.assertLine(lines[0], self.plain, "single", "linux/amd64", "config")


    def test_5_index_of_indexes_is_one_pull(self):
        self.pull("linux/arm64", self.nested, "nested", "linux/arm64")
        self.pull(None, self.nested, "nested", "linux/amd64")
        got = self.entries(self.nested, "nested")
        self.assertEqual(set(got), {"linux/arm64", "linux/amd64"}, "%s%s" % (got, self.context()))
        self.assertEntry(got["linux/arm64"], self.nested, "nested", "linux/arm64", 1,
                         {"header": 1})
        self.assertEntry(got["linux/amd64"], self.nested, "nested", "linux/amd64", 1,
                         {"child-manifest": 1})
        lines = self.lines_for(self.nested, "nested")
        self.assertEqual(len(lines), 2, "one record per pull, none for the child index: %s"
                         % json.dumps(lines, indent=1))
        by = {l["nodePlatform"]: l for l in lines}
        self.assertLine(by["linux/arm64"], self.nested, "nested", "linux/arm64", "header")
        self.assertLine(by["linux/amd64"], self.nested, "nested", "linux/amd64", "child-manifest")


if __name__ == "__main__":
    testbase.main()

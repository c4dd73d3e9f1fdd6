#!/usr/bin/python3
"""Diagnostics (off | warn | enforce) as a real containerd 1.6 and a plain HTTP client
meet them.

upstream: docker-registry seeded with seed_standard (library/multi:1.0 OCI index amd64 +
arm64/v8 + attestation, library/list:1.0 Docker list amd64/arm64/arm-v7,
library/single:1.0 single-arch amd64 schema2) plus single-arch amd64 images under
team/backend/payments-service (tags 2024.05.01 and warn) and under a ~205-character
repository name. Three archmirrors on it: --diagnostics enforce, the
config key "diagnostics": "warn", --diagnostics off.

containerd's hosts.toml is mirror-only (server = archmirror, root [header]
X-Node-Platform, empty [host] table), so archmirror is the last host containerd tries and
its refusal reaches ctr (shared/reference/containerd-mirror.md §3).

  * enforce: `ctr images pull --platform linux/arm64` of the amd64-only single-arch image
    fails, and ctr's error carries the status line
    `409 no linux/arm64 variant of example.com/library/single:1.0 (has linux/amd64);
    build multi-arch or pin kubernetes.io/arch=amd64`; the mismatch metric went up by
    one; the index and the list still pull for arm64, the single-arch image for amd64.
  * enforce, over HTTP: the tag HEAD with X-Node-Platform linux/arm64 (also linux/aarch64)
    is 409 with exactly that reason phrase (raw status line: ASCII, no CR/LF, at most
    240 bytes); the tag GET is 409 with OCI error JSON (DENIED, detail.available
    ["linux/amd64"]); an amd64 node, a repeated header naming amd64 too, a pull by
    digest and the multi-arch tag are not refused. A 52-character image name gives a
    146-byte phrase that goes out whole (on the wire and in ctr's error); a
    ~220-character one is shortened with "..." within the bound and keeps the platforms,
    the tag and the hint.
  * warn: the same ctr pull succeeds (containerd does not check a single-arch image's
    platform), archmirror_platform_mismatch_total{image="example.com/library/single:1.0",
    platform="linux/arm64"} went up by exactly one, a WARN line names image and
    platforms, the pull log has that one pull (not two), /api/v1/readiness lists the image
    for linux/arm64; an arm64 pull of the index changes no mismatch counter.
  * off: the same pull succeeds and no mismatch is counted or logged.
"""
import json
import os
import re
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import containerd, httpc, images, registry, testbase  # noqa: E402

REG = "example.com"
SINGLE = "%s/library/single:1.0" % REG
REASON = ("no linux/arm64 variant of example.com/library/single:1.0 (has linux/amd64); "
          "build multi-arch or pin kubernetes.io/arch=amd64")
# A realistic name whose phrase (146 bytes) needs no shortening within the 240-byte bound.
MEDIUM_REPO, MEDIUM_TAG = "team/backend/payments-service", "2024.05.01"
MEDIUM = "%s/%s:%s" % (REG, MEDIUM_REPO, MEDIUM_TAG)
MEDIUM_REASON = ("no linux/arm64 variant of %s (has linux/amd64); build multi-arch or pin "
                 "kubernetes.io/arch=amd64" % MEDIUM)
LONG_REPO = "library/" + "/".join("averyveryverylongpathcomponent%02d" % i for i in range(6))
MISMATCH_RE = re.compile(r'^archmirror_platform_mismatch_total\{image="((?:[^"\\]|\\.)*)",'
                         r'platform="((?:[^"\\]|\\.)*)"\} (\d+)$')


def raw_request(port, lines, timeout=10):
    """Sends a request head (list of lines) and reads the response head and, when
    Content-Length says so, the body. Returns (status line bytes, headers dict lower-case,
    body bytes)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
        head, _, body = buf.partition(b"\r\n\r\n")
        status, _, rest = head.partition(b"\r\n")
        hdrs = {}
        for l in rest.split(b"\r\n"):
            k, _, v = l.partition(b":")
            hdrs[k.strip().lower().decode()] = v.strip().decode("latin-1")
        is_head = lines[0].startswith("HEAD ")
        want = 0 if is_head else int(hdrs.get("content-length", "0"))
        while len(body) < want:
            chunk = s.recv(65536)
            if not chunk:
                break
            body += chunk
        return status, hdrs, body
    finally:
        s.close()


class DiagnosticsCtrTest(testbase.IntegrationCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        testbase.require_archmirror()
        cls.registry = cls.start_registry()
        client = cls.registry.client()
        cls.seeded = registry.seed_standard(client)
        cls.long_img = images.docker_single_image("long-name")
        client.push_image(LONG_REPO, "1.0", cls.long_img)
        client.push_image(MEDIUM_REPO, MEDIUM_TAG, images.docker_single_image("medium"))
        client.push_image(MEDIUM_REPO, "warn", images.docker_single_image("medium-warn"))
        up = [(REG, cls.registry.url)]
        cls.am = {
            "enforce": cls.start_archmirror(name="am-enforce", upstreams=up,
                                            extra_args=["--diagnostics", "enforce"]),
            "warn": cls.start_archmirror(name="am-warn", upstreams=up,
                                         config={"diagnostics": "warn"}),
            "off": cls.start_archmirror(name="am-off", upstreams=up,
                                        extra_args=["--diagnostics", "off"]),
        }
        cls.hosts = {}
        for mode, am in cls.am.items():
            for plat in ("linux/arm64", "linux/amd64"):
                d = os.path.join(cls.workdir, "hosts-%s-%s" % (mode, plat.replace("/", "-")))
                containerd.write_hosts_toml_mirror_only(d, REG, am.url, platform=plat)
                cls.hosts[mode, plat] = d
        cls.ctd = {mode: cls.start_containerd(name="ctd-" + mode) for mode in cls.am}

    # -- helpers ---------------------------------------------------------------------
    def ref(self, key):
        repo, tag, _ = self.seeded[key]
        return "%s/%s:%s" % (REG, repo, tag)

    def mismatches(self, mode):
        """{(image, platform): count} from GET /metrics."""
        r = httpc.request(self.am[mode].port, "GET", "/metrics")
        self.assertEqual(r.status, 200, r)
        out = {}
        for line in r.body.decode().splitlines():
            m = MISMATCH_RE.match(line)
            if m:
                out[m.group(1), m.group(2)] = int(m.group(3))
        return out

    def wait_mismatch(self, mode, key, want, timeout=10):
        """The counter reaches want (the warn check may still be fetching the config when
        the pull is done), then stays there for a moment."""
        deadline = time.monotonic() + timeout
        got = self.mismatches(mode).get(key, 0)
        while got < want and time.monotonic() < deadline:
            time.sleep(0.05)
            got = self.mismatches(mode).get(key, 0)
        if got == want:
            time.sleep(0.3)
            got = self.mismatches(mode).get(key, 0)
        return got

    def pull(self, mode, key, plat):
        return self.ctd[mode].pull(self.ref(key), plat, self.hosts[mode, plat])

    def am_log_lines(self, mode, text):
        return [l for l in self.am[mode].log().splitlines() if text in l]

    def head_tag(self, mode, repo, ref, platforms, method="HEAD"):
        lines = ["%s /v2/%s/manifests/%s?ns=%s HTTP/1.1" % (method, repo, ref, REG),
                 "Host: %s" % self.am[mode].hostport,
                 "Accept: " + images.CONTAINERD_RESOLVE_ACCEPT,
                 "User-Agent: containerd/1.6.20~ds1",
                 "Connection: close"]
        lines += ["X-Node-Platform: %s" % p for p in platforms]
        return raw_request(self.am[mode].port, lines)

    def assertReasonLine(self, status, reason, ctx=""):
        """status line == HTTP/1.1 409 <reason>, printable ASCII, bounded."""
        ctx = "status line %r%s%s" % (status, ctx, self.context())
        self.assertNotIn(b"\r", status, ctx)
        self.assertNotIn(b"\n", status, ctx)
        self.assertTrue(all(0x20 <= c < 0x7f for c in status), ctx)
        self.assertTrue(status.startswith(b"HTTP/1.1 409 "), ctx)
        phrase = status[len(b"HTTP/1.1 409 "):].decode()
        self.assertLessEqual(len(phrase), 240, ctx)
        if reason is not None:
            self.assertEqual(phrase, reason, ctx)
        return phrase

    # -- enforce ---------------------------------------------------------------------
    def test_enforce_1_ctr_single_arch_refused(self):
        k = (SINGLE, "linux/arm64")
        before = self.mismatches("enforce").get(k, 0)
        pr = self.pull("enforce", "single", "linux/arm64")
        self.assertFalse(pr.ok, "enforce: arm64 pull of an amd64-only image succeeded: %r%s"
                         % (pr, self.context(self.am["enforce"])))
        ctx = "ctr stderr:\n%s%s" % (pr.stderr, self.context(self.am["enforce"]))
        self.assertIn("no linux/arm64 variant of", pr.stderr, ctx)
        self.assertIn("(has linux/amd64)", pr.stderr, ctx)
        # containerd 1.6.20: "pulling from host H failed with status code [manifests 1.0]:
        # <status line>"; later 1.6/1.7: "unexpected status from HEAD request to URL: ..."
        self.assertIn("409 " + REASON, pr.stderr, ctx)
        self.assertIsNone(self.ctd["enforce"].image_digest(self.ref("single")), ctx)
        self.assertEqual(self.wait_mismatch("enforce", k, before + 1), before + 1,
                         "mismatch metric after one refused pull" + ctx)
        self.assertTrue(any(REASON in l for l in self.am_log_lines("enforce", " warn ")),
                        "no WARN line with the diagnosis" + ctx)

    def test_enforce_2_ctr_runnable_pulls_proceed(self):
        before = self.mismatches("enforce")
        for key, plat in (("multi", "linux/arm64"), ("list", "linux/arm64"),
                          ("single", "linux/amd64"), ("multi", "linux/amd64")):
            with self.subTest(image=key, platform=plat):
                pr = self.pull("enforce", key, plat)
                self.assertTrue(pr.ok, "%r%s" % (pr, self.context(self.am["enforce"])))
                self.assertEqual(pr.digest, self.seeded[key][2]["top"].digest)
        self.assertEqual(self.mismatches("enforce"), before,
                         "runnable pulls counted as mismatches")

    def test_enforce_3_http_head_and_get(self):
        repo, tag, img = self.seeded["single"]
        # HEAD: 409 and the diagnosis in the reason phrase, no body
        status, hdrs, body = self.head_tag("enforce", repo, tag, ["linux/arm64"])
        self.assertReasonLine(status, REASON)
        self.assertEqual(body, b"")
        # containerd's normalisation: aarch64 is arm64
        status, _, _ = self.head_tag("enforce", repo, tag, ["linux/aarch64"])
        self.assertReasonLine(status, REASON, " (X-Node-Platform: linux/aarch64)")
        # GET of the tag: the same, with the OCI error JSON
        status, hdrs, body = self.head_tag("enforce", repo, tag, ["linux/arm64"], method="GET")
        self.assertReasonLine(status, REASON, " (GET)")
        ctx = "GET body %r, headers %r%s" % (body, hdrs, self.context(self.am["enforce"]))
        self.assertEqual(hdrs.get("content-type"), "application/json", ctx)
        doc = json.loads(body)
        err = doc["errors"][0]
        self.assertEqual(err["code"], "DENIED", ctx)
        self.assertEqual(err["message"], REASON, ctx)
        self.assertEqual(err["detail"]["available"], ["linux/amd64"], ctx)
        self.assertEqual(err["detail"]["requested"], ["linux/arm64"], ctx)
        self.assertEqual(err["detail"]["image"], SINGLE, ctx)
        # not refused: an amd64 node; a node that also names amd64 (repeated header
        # lines, as containerd sends an array); a comma list; by digest; the index tag
        for plats in (["linux/amd64"], ["linux/arm64", "linux/amd64"],
                      ["linux/arm64, linux/amd64"]):
            status, hdrs, _ = self.head_tag("enforce", repo, tag, plats)
            self.assertTrue(status.startswith(b"HTTP/1.1 200"), "%r for %r%s" % (
                status, plats, self.context(self.am["enforce"])))
            self.assertEqual(hdrs.get("docker-content-digest"), img["top"].digest)
        status, hdrs, _ = self.head_tag("enforce", repo, img["top"].digest, ["linux/arm64"])
        self.assertTrue(status.startswith(b"HTTP/1.1 200"), "by digest: %r" % status)
        mrepo, mtag, mimg = self.seeded["multi"]
        status, hdrs, _ = self.head_tag("enforce", mrepo, mtag, ["linux/arm64"])
        self.assertTrue(status.startswith(b"HTTP/1.1 200"), "multi-arch tag: %r" % status)
        self.assertEqual(hdrs.get("docker-content-digest"), mimg["top"].digest)

    def test_enforce_4_longer_names(self):
        """A 52-character image name: the phrase (146 bytes, within the 240-byte bound)
        goes out whole, on the wire and in ctr's error. A ~220-character name: the name
        is shortened with "..." and the platforms and the hint are still there."""
        status, _, _ = self.head_tag("enforce", MEDIUM_REPO, MEDIUM_TAG, ["linux/arm64"])
        self.assertReasonLine(status, MEDIUM_REASON, " (%d-char image name)" % len(MEDIUM))
        pr = self.ctd["enforce"].pull(MEDIUM, "linux/arm64", self.hosts["enforce", "linux/arm64"])
        self.assertFalse(pr.ok, "%r" % pr)
        self.assertIn("409 " + MEDIUM_REASON, pr.stderr,
                      "ctr stderr:\n%s%s" % (pr.stderr, self.context(self.am["enforce"])))

        status, _, _ = self.head_tag("enforce", LONG_REPO, "1.0", ["linux/arm64"])
        phrase = self.assertReasonLine(status, None, " (long name, %d chars)" % len(LONG_REPO))
        self.assertTrue(phrase.startswith("no linux/arm64 variant of "), phrase)
        self.assertTrue(phrase.endswith(":1.0 (has linux/amd64); build multi-arch or pin "
                                        "kubernetes.io/arch=amd64"),
                        "long name: phrase lost its tail: %r (%d bytes)" % (phrase, len(phrase)))
        self.assertIn("...", phrase)
        status, hdrs, body = self.head_tag("enforce", LONG_REPO, "1.0", ["linux/arm64"],
                                           method="GET")
        err = json.loads(body)["errors"][0]
        self.assertEqual(err["code"], "DENIED")
        self.assertEqual(err["detail"]["image"], "%s/%s:1.0" % (REG, LONG_REPO),
                         "the JSON names the full image")

    # -- warn ------------------------------------------------------------------------
    def test_warn_1_ctr_single_arch_proceeds_and_counts(self):
        k = (SINGLE, "linux/arm64")
        before = self.mismatches("warn")
        pr = self.pull("warn", "single", "linux/arm64")
        self.assertTrue(pr.ok, "warn: the pull must proceed: %r%s"
                        % (pr, self.context(self.am["warn"])))
        self.assertEqual(pr.digest, self.seeded["single"][2]["top"].digest)
        ctx = self.context(self.am["warn"])
        self.assertEqual(self.wait_mismatch("warn", k, before.get(k, 0) + 1),
                         before.get(k, 0) + 1, "mismatch metric after one warn pull" + ctx)
        after = self.mismatches("warn")
        after[k] -= 1
        self.assertEqual({x: v for x, v in after.items() if v}, {
            x: v for x, v in before.items() if v}, "other mismatch counters moved" + ctx)
        self.assertEqual(len([l for l in self.am_log_lines("warn", " warn ") if REASON in l]), 1,
                         "WARN lines with the diagnosis" + ctx)
        # an arm64 pull of the index: nothing to warn about
        before = self.mismatches("warn")
        pr = self.pull("warn", "multi", "linux/arm64")
        self.assertTrue(pr.ok, "%r%s" % (pr, ctx))
        time.sleep(0.3)
        self.assertEqual(self.mismatches("warn"), before, "index pull counted as a mismatch")

    def test_warn_2_pull_log_and_readiness(self):
        """One warned pull: one pull in the pull log (the mismatch is not recorded a
        second time) and the image on the linux/arm64 readiness list with its platform."""
        ref = "%s/%s:warn" % (REG, MEDIUM_REPO)
        pr = self.ctd["warn"].pull(ref, "linux/arm64", self.hosts["warn", "linux/arm64"])
        self.assertTrue(pr.ok, "%r" % pr)
        k = (ref, "linux/arm64")
        self.assertEqual(self.wait_mismatch("warn", k, 1), 1)
        ctx = self.context(self.am["warn"], lines=60)
        r = httpc.request(self.am["warn"].port, "GET", "/api/v1/pulls?image=" + ref)
        pulls = json.loads(r.body)["pulls"]
        self.assertEqual([(e["platform"], e["pulls"], e["sources"]["header"]) for e in pulls],
                         [("linux/arm64", 1, 1)],
                         "pull log for one warned pull: %s%s" % (pulls, ctx))
        r = httpc.request(self.am["warn"].port, "GET",
                          "/api/v1/readiness?target=linux/arm64&image=" + ref)
        doc = json.loads(r.body)
        self.assertEqual([(e["image"], e["platforms"]) for e in doc["images"]],
                         [(ref, ["linux/amd64"])],
                         "readiness for linux/arm64 after a warned arm64 pull of an amd64-only "
                         "image: %s%s" % (json.dumps(doc, indent=1), ctx))
        self.assertEqual(doc["unknown"], [], doc)

    # -- off -------------------------------------------------------------------------
    def test_off_ctr_single_arch_no_diagnostics(self):
        pr = self.pull("off", "single", "linux/arm64")
        self.assertTrue(pr.ok, "%r%s" % (pr, self.context(self.am["off"])))
        self.assertEqual(pr.digest, self.seeded["single"][2]["top"].digest)
        repo, tag, _ = self.seeded["single"]
        status, _, _ = self.head_tag("off", repo, tag, ["linux/arm64"])
        self.assertTrue(status.startswith(b"HTTP/1.1 200"), status)
        time.sleep(0.3)
        self.assertEqual(self.mismatches("off"), {}, "off: mismatches counted")
        self.assertEqual(self.am_log_lines("off", "variant of"), [], "off: diagnosis logged")


if __name__ == "__main__":
    testbase.main()

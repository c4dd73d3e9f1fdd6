#!/usr/bin/python3
"""Upstream faults: what the client sees, and that nothing wrong was cached.

upstream: docker-registry behind the faultproxy (fake / stall / cut / set_down), or a
small raw TCP switch in front of an HTTPS docker-registry (TLS cases). Every test pushes
its own image, so each checks three objects no earlier test has cached: a tag (Docker
manifest list), a child manifest by digest and a layer blob. For each fault:

* the client gets the documented error (OCI JSON body, status and code);
* "nothing wrong was cached": once the fault is removed, a GET of each object returns
  exactly the upstream's bytes AND reaches the upstream again (the proxy counts it). The
  follow-ups go digest first, then tag (a tag GET stores its manifest by digest too), then
  blob.

UpstreamFaultsTest (archmirror: header_timeout 1s, idle_timeout 2s, max_redirects 3,
max_manifest_size 16KiB; tag_freshness default 5m, so a tag that reaches the upstream
again was not cached):
* test_refused: the proxy stops listening → 502 UNAVAILABLE, "connection refused" in
  the log.
* test_reset_mid_body: a manifest body cut with RST (and, separately, FIN) halfway →
  502 UNAVAILABLE for tag and digest.
* test_stall_beyond_header_timeout: no response head for longer than header_timeout →
  504 UNAVAILABLE (GET and HEAD of the tag, digest, blob).
* test_stall_mid_body_beyond_idle_timeout: a manifest body that stops halfway for longer
  than idle_timeout → 504 (any 5xx accepted).
* test_429_retry_after: 429 with Retry-After: 7 → 429 TOOMANYREQUESTS with
  Retry-After: 7 (GET and HEAD of the tag, digest, blob).
* test_5xx_without_cached_copy: 500 / 503 / 502 from the upstream → 502 UNAVAILABLE.
* test_redirect_loop: 307 to itself (relative and absolute Location) → 502 after exactly
  max_redirects + 1 upstream requests; the log says why.
* test_oversized_manifest: a 32 KiB manifest pushed to the registry → 502 SIZE_INVALID by
  tag and by digest, every time (each attempt reaches the upstream again); one of exactly
  16 KiB is served; a fake 32 KiB tag body (also chunked, no Content-Length) → 502
  SIZE_INVALID, and once the fake is gone the real tag is served.
* test_invalid_json_manifest: bodies that are not a manifest (truncated JSON, binary,
  a JSON array, null, an object that is not a manifest) served by the digest they hash to
  → 502 MANIFEST_INVALID, not cached (the next GET reaches the upstream, which has no such
  manifest: 404); the same body under a tag with a matching Docker-Content-Digest → 502
  MANIFEST_INVALID, then the real tag.
* test_tag_digest_header_mismatch: a tag answered with a Docker-Content-Digest that the
  body does not hash to → 502 DIGEST_INVALID, tag not cached.

StaleOn5xxTest (tag_freshness 0s: every tag request revalidates): a cached tag whose
revalidation gets 500 / 503 / 429 is served stale (GET and HEAD, exact bytes and headers),
the attempt reached the upstream; a 404 is not papered over; an uncached tag in the same
state is a 502 (429 for 429).

TlsHandshakeTest (https:// upstream, CA given, pool_size 0, connect_timeout 1s): a TCP
server that answers the ClientHello with garbage (an HTTP response, then random bytes) →
502 UNAVAILABLE and a warn/error line naming TLS and the upstream's address; one that
accepts and never speaks → 504 (connect_timeout covers the handshake); switched to relay
to the real TLS registry → exact bytes.

RedirectPolicyTest (the upstream on a NON-loopback address of this machine, so it is not
"on loopback" itself; skipped with the reason when there is none): a redirect to a
loopback proxy (127.0.0.1, localhost, [::1], 0.0.0.0) or to 169.254.169.254 → 502
UNAVAILABLE, no connection reaches the loopback proxy, the log says refused
(allow_private_redirects is off); a second archmirror with allow_private_redirects true
follows the same redirect to the loopback proxy and serves exact bytes.
"""
import json
import os
import random
import re
import socket
import sys
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import faultproxy, images, registry, testbase  # noqa: E402

NS = "example.com"
OCI_ERR_JSON = b'{"errors":[{"code":"%s","message":"faked by the test"}]}'
KiB = 1024


class Obj:
    """One object archmirror serves: a tag, a manifest by digest or a blob."""

    def __init__(self, label, repo, ref, blob, kind):
        self.label = label
        self.repo = repo
        self.blob = blob
        self.kind = kind                    # "tag" | "digest" | "blob"
        what = "blobs" if kind == "blob" else "manifests"
        self.up_path = "/v2/%s/%s/%s" % (repo, what, ref)
        self.path = self.up_path + "?ns=" + NS

    @property
    def is_manifest(self):
        return self.kind != "blob"

    def __repr__(self):
        return "<%s %s>" % (self.label, self.up_path)


def image_objects(client, key):
    """Pushes a fresh Docker manifest list image to faults/<key>; returns its tag, one
    child manifest by digest and one layer blob (all uncached by construction)."""
    img = images.docker_list_image("upstream-faults-" + key)
    repo = "faults/" + key
    client.push_image(repo, "1.0", img)
    child = images.platform_manifest(img, "linux/amd64")
    layer = img["children"]["linux/amd64"]["layers"][0]
    return [Obj("tag", repo, "1.0", img["top"], "tag"),
            Obj("digest", repo, child.digest, child, "digest"),
            Obj("blob", repo, layer.digest, layer, "blob")]


def padded_oci_manifest(config, layer, size):
    """An OCI image manifest of exactly `size` bytes (an annotation pads it)."""
    def build(pad):
        return images.canonical({
            "schemaVersion": 2, "mediaType": images.OCI_MANIFEST,
            "config": config.descriptor(), "layers": [layer.descriptor()],
            "annotations": {"org.example.padding": "p" * pad}})
    base = len(build(0))
    assert size >= base, (size, base)
    data = build(size - base)
    assert len(data) == size
    return images.Blob(data, images.OCI_MANIFEST)


def chunked(data, piece=4096):
    out = b""
    for i in range(0, len(data), piece):
        c = data[i:i + piece]
        out += b"%x\r\n" % len(c) + c + b"\r\n"
    return out + b"0\r\n\r\n"


def poll(fn, timeout=5.0):
    return testbase.poll(fn, timeout)


class FaultCase(testbase.IntegrationCase):
    """Shared assertions (no tests of its own)."""

    fp = None
    am = None

    def request(self, obj, method="GET", am=None):
        am = am or self.am
        accept = images.ALL_MANIFEST_TYPES if obj.is_manifest else None
        return self.get(am, obj.path, accept=accept, method=method)

    def assertError(self, r, status, code, what, am=None):
        ctx = "%s: %r%s" % (what, r, self.context(am or self.am))
        self.assertEqual(r.status, status, ctx)
        if r.method != "HEAD":
            self.assertIn(code, r.error_codes, ctx)
            self.assertTrue(r.header("Content-Type", "").startswith("application/json"), ctx)
        return r

    def assertServedFromUpstream(self, obj, what, am=None, fp=None, method="GET"):
        """GET (or HEAD) returns exactly obj.blob, and the request reached the upstream."""
        am = am or self.am
        fp = fp or self.fp
        before = fp.count(path=obj.up_path)
        r = self.request(obj, method=method, am=am)
        msg = "%s: %s after the fault was removed" % (what, obj.label)
        if obj.is_manifest:
            self.assertManifestResponse(r, obj.blob, method, msg)
        else:
            self.assertBlobResponse(r, obj.blob, method, msg)
        self.assertGreater(fp.count(path=obj.up_path), before,
                           "%s: %s was answered without reaching the upstream, so the failed "
                           "attempt left something cached%s" % (what, obj.label,
                                                                 self.context(am)))
        return r

    def assertNothingCached(self, objs, what, am=None, fp=None):
        order = {"digest": 0, "tag": 1, "blob": 2}
        for obj in sorted(objs, key=lambda o: order[o.kind]):
            with self.subTest(fault=what, object=obj.label, check="follow-up"):
                self.assertServedFromUpstream(obj, what, am=am, fp=fp)

    def assertLog(self, pattern, what, am=None):
        am = am or self.am
        pat = re.compile(pattern, re.I)
        found = poll(lambda: any(pat.search(l) for l in am.log().splitlines()), timeout=3)
        self.assertTrue(found, "%s: no log line matching %r%s" % (what, pattern,
                                                                  self.context(am, 40)))


class UpstreamFaultsTest(FaultCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        testbase.require_archmirror()
        cls.registry = cls.start_registry()
        cls.client = cls.registry.client()
        cls.fp = cls.start_faultproxy(cls.registry)
        cls.am = cls.start_archmirror(
            upstreams=[(NS, cls.fp.url)],
            config={"upstream_client": {"header_timeout": "1s", "idle_timeout": "2s",
                                        "max_redirects": 3},
                    "cache": {"max_manifest_size": "16KiB"}})

    def setUp(self):
        self.fp.clear_faults()
        self.fp.set_up()
        self.fp.reset()

    def tearDown(self):
        self.fp.clear_faults()
        self.fp.set_up()

    def test_refused(self):
        objs = image_objects(self.client, "refused")
        self.fp.set_down("refuse")
        for obj in objs:
            for method in ("GET", "HEAD"):
                with self.subTest(object=obj.label, method=method):
                    r = self.request(obj, method)
                    self.assertError(r, 502, "UNAVAILABLE", "connection refused")
        self.assertLog(r"connection refused", "refused")
        self.fp.set_up()
        self.assertNothingCached(objs, "refused")

    def test_reset_mid_body(self):
        for mode in ("reset", "close"):
            objs = image_objects(self.client, "cut-" + mode)
            for obj in objs[:2]:            # the manifests (blobs: test_blob_faults)
                with self.subTest(mode=mode, object=obj.label):
                    self.fp.cut(obj.up_path, obj.blob.size // 2, mode=mode)
                    r = self.request(obj)
                    self.assertError(r, 502, "UNAVAILABLE", "manifest body cut (%s)" % mode)
                    self.assertEqual(self.fp.cuts, 1, "the proxy did not cut" +
                                     self.context())
                    self.fp.reset()
            self.assertNothingCached(objs[:2], "cut (%s)" % mode)

    def test_stall_beyond_header_timeout(self):
        objs = image_objects(self.client, "stall")
        for obj in objs:
            self.fp.stall(obj.up_path)
        try:
            for obj in objs:
                for method in ("GET", "HEAD"):
                    with self.subTest(object=obj.label, method=method):
                        t0 = time.monotonic()
                        r = self.request(obj, method)
                        took = time.monotonic() - t0
                        self.assertError(r, 504, "UNAVAILABLE",
                                         "stalled upstream (%.1fs)" % took)
                        self.assertGreaterEqual(took, 0.9, "504 before header_timeout?")
            self.assertLog(r"no response head .* within", "stall")
        finally:
            self.fp.unstall()
        self.assertNothingCached(objs, "stall")

    def test_stall_mid_body_beyond_idle_timeout(self):
        objs = image_objects(self.client, "stallbody")
        for obj in objs[:2]:
            with self.subTest(object=obj.label):
                self.fp.gate(obj.up_path, obj.blob.size // 2)
                try:
                    r = self.request(obj)
                finally:
                    self.fp.release(obj.up_path)
                ctx = "%r%s" % (r, self.context())
                self.assertIn(r.status, (502, 504), ctx)
                self.assertIn("UNAVAILABLE", r.error_codes, ctx)
                self.assertEqual(r.status, 504, "a body stalled past idle_timeout should be "
                                 "a timeout (504): " + ctx)
        self.assertNothingCached(objs[:2], "stalled body")

    def test_429_retry_after(self):
        objs = image_objects(self.client, "429")
        for obj in objs:
            self.fp.fake(obj.up_path, 429, {"Retry-After": "7",
                                            "Content-Type": "application/json"},
                         OCI_ERR_JSON % b"TOOMANYREQUESTS")
        for obj in objs:
            for method in ("GET", "HEAD"):
                with self.subTest(object=obj.label, method=method):
                    r = self.request(obj, method)
                    self.assertError(r, 429, "TOOMANYREQUESTS", "upstream 429")
                    self.assertEqual(r.header("Retry-After"), "7",
                                     "Retry-After not passed through: %r" % r)
        self.assertGreaterEqual(self.fp.faked, 6, self.context())
        self.fp.unfake()
        self.assertNothingCached(objs, "429")

    def test_5xx_without_cached_copy(self):
        for status in (500, 503, 502):
            objs = image_objects(self.client, "status-%d" % status)
            for obj in objs:
                self.fp.fake(obj.up_path, status, {"Content-Type": "application/json"},
                             OCI_ERR_JSON % b"UNKNOWN")
            for obj in objs:
                for method in ("GET", "HEAD"):
                    with self.subTest(status=status, object=obj.label, method=method):
                        r = self.request(obj, method)
                        self.assertError(r, 502, "UNAVAILABLE", "upstream %d" % status)
            self.fp.unfake()
            self.assertNothingCached(objs, "upstream %d" % status)

    def test_redirect_loop(self):
        objs = image_objects(self.client, "redirect-loop")
        for location in ("relative", "absolute"):
            for obj in objs:
                with self.subTest(location=location, object=obj.label):
                    loc = obj.up_path if location == "relative" else "{proxy}" + obj.up_path
                    self.fp.fake(obj.up_path, 307, {"Location": loc})
                    self.fp.reset()
                    r = self.request(obj)
                    self.assertError(r, 502, "UNAVAILABLE", "redirect loop")
                    self.assertEqual(self.fp.count(path=obj.up_path), 3 + 1,
                                     "expected the first request plus max_redirects (3) "
                                     "redirects followed" + self.context())
                    self.fp.unfake()
        self.assertLog(r"more than 3 redirects", "redirect loop")
        self.assertNothingCached(objs, "redirect loop")

    def test_oversized_manifest(self):
        cfg = images.Blob(json.dumps({"architecture": "amd64", "os": "linux",
                                      "rootfs": {"type": "layers", "diff_ids": []}}).encode(),
                          images.OCI_CONFIG)
        layer = images.Blob(b"oversized-manifest-layer", images.OCI_LAYER)
        repo = "faults/oversized"
        for b in (cfg, layer):
            self.client.push_blob(repo, b)
        big = padded_oci_manifest(cfg, layer, 32 * KiB)
        exact = padded_oci_manifest(cfg, layer, 16 * KiB)
        over1 = padded_oci_manifest(cfg, layer, 16 * KiB + 1)
        self.client.push_manifest(repo, "big", big)
        self.client.push_manifest(repo, "exact", exact)
        self.client.push_manifest(repo, "over1", over1)
        cases = [Obj("tag big", repo, "big", big, "tag"),
                 Obj("digest big", repo, big.digest, big, "digest"),
                 Obj("digest 16KiB+1", repo, over1.digest, over1, "digest"),
                 Obj("tag 16KiB+1", repo, "over1", over1, "tag")]
        for obj in cases:
            with self.subTest(object=obj.label):
                for attempt in range(2):
                    before = self.fp.count(path=obj.up_path)
                    r = self.request(obj)
                    self.assertError(r, 502, "SIZE_INVALID", "%s attempt %d" % (obj, attempt))
                    self.assertGreater(self.fp.count(path=obj.up_path), before,
                                       "attempt %d did not reach the upstream: the oversized "
                                       "manifest was cached?%s" % (attempt, self.context()))
        with self.subTest(object="exactly max_manifest_size"):
            self.assertServedFromUpstream(Obj("digest 16KiB", repo, exact.digest, exact,
                                              "digest"), "at the limit")
            self.assertServedFromUpstream(Obj("tag 16KiB", repo, "exact", exact, "tag"),
                                          "at the limit")
        # a fake oversized body for a real tag: with and without Content-Length
        objs = image_objects(self.client, "oversized-fake")
        tag = objs[0]
        for framing in ("content-length", "chunked"):
            with self.subTest(fake=framing):
                h = {"Content-Type": images.OCI_MANIFEST,
                     "Docker-Content-Digest": big.digest}
                body = big.data
                if framing == "chunked":
                    h["Transfer-Encoding"] = "chunked"
                    body = chunked(big.data)
                self.fp.fake(tag.up_path, 200, h, body, method="GET")
                r = self.request(tag)
                self.assertError(r, 502, "SIZE_INVALID", "fake oversized tag (%s)" % framing)
                self.fp.unfake()
        self.assertLog(r"exceeds", "oversized manifest")
        self.assertNothingCached([tag], "oversized fake tag")

    def test_invalid_json_manifest(self):
        bodies = [
            ("truncated", images.canonical({"schemaVersion": 2, "mediaType": images.OCI_MANIFEST,
                                            "config": {"mediaType": images.OCI_CONFIG}})[:-20]),
            ("binary", bytes(random.Random("invalid-json").randbytes(700))),
            ("array", b"[]"),
            ("null", b"null"),
            ("not-a-manifest", b'{"hello": "world"}'),
            ("trailing-garbage", images.canonical({
                "schemaVersion": 2, "mediaType": images.OCI_MANIFEST,
                "config": {"mediaType": images.OCI_CONFIG, "size": 2,
                           "digest": images.sha256(b"{}")},
                "layers": []}) + b"}garbage"),
        ]
        repo = "faults/invalid"
        for label, body in bodies:
            d = images.sha256(body)
            obj = Obj(label, repo, d, images.Blob(body, images.OCI_MANIFEST), "digest")
            with self.subTest(body=label):
                self.fp.fake(obj.up_path, 200, {"Content-Type": images.OCI_MANIFEST,
                                                "Docker-Content-Digest": d}, body)
                for attempt in range(2):
                    before = self.fp.count(path=obj.up_path)
                    r = self.request(obj)
                    self.assertError(r, 502, "MANIFEST_INVALID",
                                     "invalid manifest %s, attempt %d" % (label, attempt))
                    self.assertGreater(self.fp.count(path=obj.up_path), before,
                                       "cached an invalid manifest?" + self.context())
                self.fp.unfake()
                before = self.fp.count(path=obj.up_path)
                r = self.request(obj)
                self.assertError(r, 404, "MANIFEST_UNKNOWN",
                                 "after the fake is gone the upstream has no such manifest")
                self.assertGreater(self.fp.count(path=obj.up_path), before, self.context())
        objs = image_objects(self.client, "invalid-tag")
        tag = objs[0]
        body = bodies[0][1]
        self.fp.fake(tag.up_path, 200, {"Content-Type": images.DOCKER_LIST,
                                        "Docker-Content-Digest": images.sha256(body)}, body)
        r = self.request(tag)
        self.assertError(r, 502, "MANIFEST_INVALID", "invalid manifest under a tag")
        self.fp.unfake()
        self.assertLog(r"is invalid", "invalid manifest")
        self.assertNothingCached([tag], "invalid manifest under a tag")

    def test_tag_digest_header_mismatch(self):
        objs = image_objects(self.client, "tag-mismatch")
        tag = objs[0]
        other = images.sha256(b"not these bytes")
        self.fp.fake(tag.up_path, 200, {"Content-Type": images.DOCKER_LIST,
                                        "Docker-Content-Digest": other}, tag.blob.data,
                     method="GET")
        r = self.request(tag)
        self.assertError(r, 502, "DIGEST_INVALID", "tag body vs Docker-Content-Digest")
        self.fp.unfake()
        self.assertNothingCached([tag], "tag digest mismatch")


class StaleOn5xxTest(FaultCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        testbase.require_archmirror()
        cls.registry = cls.start_registry()
        cls.client = cls.registry.client()
        cls.fp = cls.start_faultproxy(cls.registry)
        cls.am = cls.start_archmirror(upstreams=[(NS, cls.fp.url)],
                                      config={"cache": {"tag_freshness": "0s"}})

    def setUp(self):
        self.fp.clear_faults()
        self.fp.reset()

    def test_cached_tag_served_stale(self):
        for status in (500, 503, 429):
            cached = image_objects(self.client, "stale-%d" % status)[0]
            cold = image_objects(self.client, "cold-%d" % status)[0]
            with self.subTest(status=status):
                self.assertServedFromUpstream(cached, "first pull")
                headers = {"Content-Type": "application/json"}
                if status == 429:
                    headers["Retry-After"] = "7"
                for obj in (cached, cold):
                    self.fp.fake(obj.up_path, status, headers, OCI_ERR_JSON % b"UNKNOWN")
                for method in ("GET", "HEAD"):
                    before = self.fp.count(path=cached.up_path)
                    r = self.request(cached, method)
                    self.assertManifestResponse(r, cached.blob, method,
                                                "cached tag, upstream %d" % status)
                    self.assertGreater(self.fp.count(path=cached.up_path), before,
                                       "no revalidation attempt (tag_freshness 0s)" +
                                       self.context())
                    r = self.request(cold, method)
                    if status == 429:
                        self.assertError(r, 429, "TOOMANYREQUESTS", "uncached tag, 429")
                        self.assertEqual(r.header("Retry-After"), "7", repr(r))
                    else:
                        self.assertError(r, 502, "UNAVAILABLE", "uncached tag, %d" % status)
                self.fp.unfake()
                self.assertServedFromUpstream(cached, "upstream back")
                self.assertServedFromUpstream(cold, "upstream back")
        self.assertLog(r"serving cached .* stale", "stale")

    def test_404_is_not_served_stale(self):
        cached = image_objects(self.client, "stale-404")[0]
        self.assertServedFromUpstream(cached, "first pull")
        self.fp.fake(cached.up_path, 404, {"Content-Type": "application/json"},
                     OCI_ERR_JSON % b"MANIFEST_UNKNOWN")
        r = self.request(cached)
        self.assertError(r, 404, "MANIFEST_UNKNOWN", "a tag the upstream says is gone")
        self.fp.unfake()
        self.assertServedFromUpstream(cached, "tag back")


class LoopbackUpstreamRedirectTest(FaultCase):
    """An upstream that is itself on loopback (a sidecar or test registry) may redirect to
    loopback, but never to the link-local range where cloud metadata answers."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        testbase.require_archmirror()
        cls.registry = cls.start_registry()
        cls.client = cls.registry.client()
        cls.fp = cls.start_faultproxy(cls.registry)
        cls.am = cls.start_archmirror(upstreams=[("example.com", cls.fp.url)])

    def test_link_local_refused_even_for_a_loopback_upstream(self):
        objs = image_objects(self.client, "loopback-link-local")
        for obj in (objs[0], objs[2]):
            with self.subTest(object=obj.label):
                self.fp.fake(obj.up_path, 307, {"Location": "http://169.254.169.254" + obj.up_path})
                r = self.request(obj)
                self.assertError(r, 502, "UNAVAILABLE", "redirect to 169.254.169.254")
                self.fp.unfake()
        self.assertLog(r"169\.254\.169\.254(:\d+)? resolves only to loopback/link-local", "metadata")
        self.assertNothingCached([objs[0], objs[2]], "redirect to the metadata address")

    def test_loopback_redirect_followed_for_a_loopback_upstream(self):
        objs = image_objects(self.client, "loopback-loopback")
        blob = objs[2]
        self.fp.fake(blob.up_path, 307,
                     {"Location": "http://127.0.0.1:%d%s" % (self.registry.port, blob.up_path)},
                     times=1)
        r = self.request(blob)
        self.assertBlobResponse(r, blob.blob, "GET", "loopback redirect from a loopback upstream")


class TcpSwitch:
    """A loopback TCP listener whose mode decides what each new connection gets:
    "pipe" relays bytes to target (host, port); "garbage" reads the first bytes (the
    ClientHello), answers with an HTTP response and random bytes, and closes; "silent"
    accepts and says nothing until the mode changes or stop(). Counts connections."""

    def __init__(self, target):
        self.target = target
        self.mode = "pipe"
        self.accepted = {"pipe": 0, "garbage": 0, "silent": 0}
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.stopped = threading.Event()
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._accept_loop, daemon=True)
        self.thread.start()

    def _accept_loop(self):
        self.sock.settimeout(0.1)
        while not self.stopped.is_set():
            try:
                c, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            mode = self.mode
            with self.lock:
                self.accepted[mode] += 1
            threading.Thread(target=getattr(self, "_" + mode), args=(c,), daemon=True).start()

    def _garbage(self, c):
        try:
            c.settimeout(5)
            c.recv(4096)
            c.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n" +
                      random.Random("garbage").randbytes(2048))
        except OSError:
            pass
        finally:
            c.close()

    def _silent(self, c):
        mode = self.mode
        while not self.stopped.is_set() and self.mode == mode:
            time.sleep(0.05)
        c.close()

    def _pipe(self, c):
        try:
            u = socket.create_connection(self.target, timeout=5)
        except OSError:
            c.close()
            return

        def copy(a, b):
            try:
                a.settimeout(None)
                while True:
                    d = a.recv(65536)
                    if not d:
                        break
                    b.sendall(d)
            except OSError:
                pass
            finally:
                for s in (a, b):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
        t = threading.Thread(target=copy, args=(u, c), daemon=True)
        t.start()
        copy(c, u)
        t.join(10)
        c.close()
        u.close()

    def stop(self):
        self.stopped.set()
        try:
            self.sock.close()
        except OSError:
            pass


class CountingSwitch:
    """Adapter so FaultCase's "reached the upstream" check counts relayed connections
    (pool_size 0: one connection per upstream request)."""

    def __init__(self, sw):
        self.sw = sw

    def count(self, path=None):
        return self.sw.accepted["pipe"]


class TlsHandshakeTest(FaultCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        testbase.require_archmirror()
        pki = cls.pki()
        cls.registry = cls.start_registry(tls=(pki.server_cert, pki.server_key))
        cls.client = registry.OCIClient("127.0.0.1", cls.registry.port, tls=True)
        cls.switch = TcpSwitch(("127.0.0.1", cls.registry.port))
        cls.addClassCleanup(cls.switch.stop)
        cls.fp = CountingSwitch(cls.switch)
        cls.am = cls.start_archmirror(
            upstreams=[(NS, "https://127.0.0.1:%d" % cls.switch.port)],
            upstream_ca=[(NS, pki.ca_cert)],
            config={"upstream_client": {"pool_size": 0, "connect_timeout": "1s"}})

    def test_handshake_garbage_then_silence_then_ok(self):
        objs = image_objects(self.client, "tls")
        self.switch.mode = "garbage"
        for obj in objs:
            with self.subTest(mode="garbage", object=obj.label):
                r = self.request(obj)
                self.assertError(r, 502, "UNAVAILABLE", "TLS handshake answered with garbage")
                self.assertNotIn(b"400 Bad Request", r.body)
        self.assertGreaterEqual(self.switch.accepted["garbage"], len(objs))
        self.assertLog(r"\b(warn|error)\b.*TLS.*127\.0\.0\.1:%d" % self.switch.port,
                       "garbage instead of a TLS handshake")
        self.switch.mode = "silent"
        for obj in objs:
            with self.subTest(mode="silent", object=obj.label):
                r = self.request(obj)
                self.assertError(r, 504, "UNAVAILABLE", "TLS handshake never answered")
        self.switch.mode = "pipe"
        self.assertNothingCached(objs, "TLS handshake failure")


def non_loopback_ipv4():
    """An IPv4 address of this machine that archmirror does not consider loopback or
    link-local (so an upstream there is not "on loopback"), or None."""
    cands = []
    for probe in ("192.0.2.1", "10.255.255.255", "8.8.8.8"):
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.connect((probe, 9))
                cands.append(s.getsockname()[0])
        except OSError:
            pass
    try:
        cands += socket.gethostbyname_ex(socket.gethostname())[2]
    except OSError:
        pass
    for ip in cands:
        if ip.startswith(("127.", "169.254.", "0.")):
            continue
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind((ip, 0))
            return ip
        except OSError:
            continue
    return None


class RedirectPolicyTest(FaultCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        testbase.require_archmirror()
        cls.ext_ip = non_loopback_ipv4()
        if cls.ext_ip is None:
            raise unittest.SkipTest("no non-loopback IPv4 address on this machine to put "
                                    "the upstream on (a loopback upstream may redirect to "
                                    "loopback and link-local addresses by design)")
        cls.registry = cls.start_registry()
        cls.client = cls.registry.client()
        cls.fp = faultproxy.FaultProxy("127.0.0.1", cls.registry.port, name="fp-public",
                                       listen_host=cls.ext_ip)
        cls.addClassCleanup(cls.fp.stop)
        cls.fp.start()
        cls.proxies.append(cls.fp)
        cls.lo = cls.start_faultproxy(cls.registry, name="fp-loopback")
        up = [(NS, cls.fp.url)]
        cls.am = cls.start_archmirror(name="am-deny", upstreams=up)
        cls.am_allow = cls.start_archmirror(
            name="am-allow", upstreams=up,
            config={"upstream_client": {"allow_private_redirects": True}})

    def setUp(self):
        for p in (self.fp, self.lo):
            p.clear_faults()
            p.reset()

    def test_1_upstream_is_off_loopback(self):
        """Control: plain fetches through the public address work, and a redirect to
        the same public address (not private) is followed."""
        objs = image_objects(self.client, "redirect-control")
        self.assertServedFromUpstream(objs[1], "control")
        blob = objs[2]
        self.fp.fake(blob.up_path, 307, {"Location": "{proxy}" + blob.up_path}, times=1)
        self.assertServedFromUpstream(blob, "redirect to the upstream itself")
        self.assertEqual(self.fp.faked, 1, self.context())

    def test_2_private_targets_refused(self):
        lo_port = self.lo.port
        targets = [("127.0.0.1", "http://127.0.0.1:%d" % lo_port),
                   ("localhost", "http://localhost:%d" % lo_port),
                   ("[::1]", "http://[::1]:%d" % lo_port),
                   ("0.0.0.0", "http://0.0.0.0:%d" % lo_port),
                   ("127.1.2.3", "http://127.1.2.3:%d" % lo_port),
                   ("169.254.169.254", "http://169.254.169.254"),
                   ("169.254.0.1", "http://169.254.0.1:%d" % lo_port)]
        for i, (label, base) in enumerate(targets):
            objs = image_objects(self.client, "redirect-private-%d" % i)
            for obj in (objs[0], objs[2]):
                with self.subTest(target=label, object=obj.label):
                    self.fp.fake(obj.up_path, 307, {"Location": base + obj.up_path})
                    r = self.request(obj)
                    self.assertError(r, 502, "UNAVAILABLE", "redirect to %s" % label)
                    self.assertEqual(self.lo.total(), 0,
                                     "archmirror connected to the private redirect target" +
                                     self.context())
                    self.fp.unfake()
            # refused before any connection attempt (a connect to 169.254.x.x would hang
            # until connect_timeout and be a 504, not this)
            self.assertLog(re.escape(label) + r"(:\d+)? resolves only to loopback/link-local "
                           r"addresses; refused \(allow_private_redirects is off\)",
                           "redirect to %s" % label)
            self.assertNothingCached([objs[0], objs[2]], "redirect to %s" % label)

    def test_3_private_redirect_allowed_by_config(self):
        objs = image_objects(self.client, "redirect-allowed")
        for obj in (objs[0], objs[2]):
            with self.subTest(object=obj.label):
                self.fp.fake(obj.up_path, 307,
                             {"Location": "http://127.0.0.1:%d%s" % (self.lo.port, obj.up_path)})
                before = self.lo.count(path=obj.up_path)
                r = self.request(obj, am=self.am_allow)
                if obj.is_manifest:
                    self.assertManifestResponse(r, obj.blob, "GET", "allowed private redirect")
                else:
                    self.assertBlobResponse(r, obj.blob, "GET", "allowed private redirect")
                self.assertEqual(self.lo.count(path=obj.up_path), before + 1, self.context())
                self.fp.unfake()


if __name__ == "__main__":
    testbase.main()

#!/usr/bin/python3
"""Hostile clients: each gets a clean 4xx (or a closed connection), and the server keeps
serving everyone else.

archmirror (server.header_timeout 1s, server.idle_timeout 3s) in front of a counting
faultproxy whose upstream is a dead port: any request that reaches the proxy is counted,
and none of the requests here may reach it. After every hostile exchange a normal
request on a NEW connection must be served.

HostileClientsTest:
* test_slow_head_byte_by_byte: three clients send a request head one byte every 0.2 s
  (the whole head would take > 20 s); each is answered 408 or closed long before it
  finishes (within 10 s), while a normal client is served on fresh connections all along.
  Also a head that starts and then stops sending → 408.
* test_idle_connection_closed: a connection that never sends a byte, and a kept-alive one
  after its request, are closed (idle_timeout) within a generous bound.
* test_slow_body_dribble: a declared request body dribbled one byte every 0.5 s gets 408
  or a closed connection within 6 s (the body has one deadline, like the head; it used to
  restart on every byte).
* test_oversized_heads: a 20 KiB request line, a 17 KiB header, 65 headers (max_headers
  64) → 431; a 1 MiB head streamed without an end → 431 before it is all sent; 64 headers
  and a 15 KiB head are served (the limits are not off by much).
* test_request_smuggling: Content-Length + Transfer-Encoding (both orders, also a CL.TE
  body hiding a second request), duplicate Content-Length (same and different values),
  a Content-Length list, "+0", bare CR in the request line / a header / the final line,
  bare LF line ends, obs-fold (SP and HTAB), unknown / stacked Transfer-Encoding,
  whitespace before the colon, NUL in a value, two Host fields → 400, Connection: close,
  exactly one response (the hidden request is never answered or sent upstream), then EOF.
* test_path_tricks: %2e%2e, %2f, %5c, backslash, dot segments, %00, invalid UTF-8
  (%ff, overlong %c0%ae), a bidi control (%e2%80%ae), double encoding (%252e), raw 0xff and
  raw UTF-8 bytes, a tab → 400 NAME_INVALID; traversal in the tag / digest → 400
  TAG_INVALID / DIGEST_INVALID; "/v2/.." → 404; a bad ns= → 400; nothing goes upstream.
* test_methods: OPTIONS, TRACE, PROPFIND, MKCOL, COPY, MOVE, LOCK, PURGE, REPORT, SEARCH,
  LINK, POST, PUT, PATCH, DELETE on /v2/, manifests, blobs, tags/list and uploads →
  405 UNSUPPORTED with Allow: GET, HEAD, on a connection that stays usable; an unknown
  method, a lowercase "get", CONNECT → 400 and close.
* test_protocol_oddities: HTTP/0.9, the HTTP/2 preface, HTTP/1.2 and 3.0, an absolute-form
  target, "OPTIONS *" → 4xx or 505 and close; Upgrade: websocket / h2c → an ordinary
  HTTP/1.1 response, never 101.

ManyConnectionsTest (default server config):
* test_2000_idle_keepalive_connections: 2000 connections, each after one GET /v2/, held
  idle: archmirror's VmRSS stays under 64 MiB (uninstrumented builds; under ASan or
  valgrind the bound is on the growth: 2000 connections may add at most 96 MiB), a new
  client is served, a sample of the idle connections still works.
* test_max_connections: a second archmirror with server.max_connections 32: the 33rd
  connection gets 503 and is closed; once one is closed, a new one is served.

SoakTest (skipped unless AM_SOAK_REQUESTS is set; `make soak` sets 1000000): archmirror
(log level warn) against a seeded registry, hammered with warm requests in slices of
AM_SOAK_SLICE seconds (2) at concurrency 16, cycling through: a platform manifest by
digest (GET), the tag (HEAD and GET), a layer blob (GET, HEAD) and containerd-style pulls
of the index image with every blob's sha256 verified. Uses bench/loadgen
(<AM_BUILD_DIR or build/dev>/bench/loadgen) when it exists, else a Python keep-alive
client. VmRSS is sampled every second. Warm-up: every kind once and the first 20% of the
requests. After it (the soak runs at least 3 s past it) the RSS where it settles (the
highest sample in the last 20% of the requests) may exceed the warm-up peak by at most 10%
(AM_SOAK_MAX_GROWTH) plus 2 MiB (AM_SOAK_SLACK_MIB: bounded buffers fill and drain under
load: the pull log buffers up to 16 MiB of records when its writer is behind — every GET
of a platform manifest is a pull record —, the server caches 256 x 4 KiB write requests);
a transient peak may not pass 64 MiB (AM_SOAK_MAX_RSS_MIB); and the least-squares slope of RSS over requests in the
second half of the post-warm-up time, extrapolated over all post-warm-up requests, must
stay under 10% of the warm-up peak (a per-request leak does not level off). Any failed
request fails the soak. Prints the timeline (VmRSS / RssAnon / RssFile).
"""
import json
import os
import select
import subprocess
import socket
import sys
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import archmirror, faultproxy, httpc, images, proc, registry, testbase  # noqa: E402

NS = "?ns=example.com"
HEX = "0123456789abcdef" * 4
MANIFEST = "/v2/library/multi/manifests/1.0"
BLOB = "/v2/library/multi/blobs/sha256:" + HEX
MiB = 1024 * 1024


def instrumented():
    """True when the binary under test runs under ASan or valgrind (RSS is inflated)."""
    path = archmirror.binary()
    try:
        with open(path, "rb") as f:
            head = f.read(2)
            if head == b"#!":
                return True         # a wrapper script (valgrind, qemu)
            f.seek(0)
            data = f.read()
    except OSError:
        return False
    return b"__asan_init" in data or b"__tsan_init" in data


def proc_status(pid, keys=("VmRSS", "RssAnon", "RssFile")):
    """{key: bytes} from /proc/<pid>/status."""
    out = {}
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in keys:
                out[k] = int(v.split()[0]) * 1024
    return out


def vm_rss(pid):
    v = proc_status(pid, ("VmRSS",)).get("VmRSS")
    if v is None:
        raise AssertionError("no VmRSS for pid %d" % pid)
    return v


class Raw:
    """One raw TCP connection; reads responses (by Content-Length) or EOF."""

    def __init__(self, port, timeout=10):
        self.s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""
        self.eof = False
        self.error = None

    def send(self, data):
        try:
            self.s.sendall(data)
            return True
        except OSError as e:
            self.error = e
            return False

    def _fill(self, timeout):
        self.s.settimeout(timeout)
        try:
            d = self.s.recv(65536)
        except socket.timeout:
            return False
        except OSError as e:
            self.error = e
            self.eof = True
            return False
        if not d:
            self.eof = True
            return False
        self.buf += d
        return True

    def response(self, timeout=10):
        """(status, headers lower-case, body) of the next response, or None at EOF."""
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in self.buf:
            if self.eof or time.monotonic() > deadline:
                return None
            self._fill(max(0.01, deadline - time.monotonic()))
        head, _, rest = self.buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        hdrs = {}
        for l in lines[1:]:
            k, _, v = l.partition(":")
            hdrs[k.strip().lower()] = v.strip()
        n = int(hdrs.get("content-length", "0"))
        while len(rest) < n and not self.eof and time.monotonic() < deadline:
            if self._fill(max(0.01, deadline - time.monotonic())):
                head, _, rest = self.buf.partition(b"\r\n\r\n")
        self.buf = rest[n:]
        return status, hdrs, rest[:n]

    def wait_eof(self, timeout=10):
        """True when the server closes (FIN or reset) within timeout; extra bytes that
        arrive first stay in self.buf."""
        deadline = time.monotonic() + timeout
        while not self.eof and time.monotonic() < deadline:
            self._fill(max(0.01, deadline - time.monotonic()))
        return self.eof

    def close(self):
        try:
            self.s.close()
        except OSError:
            pass


def request_bytes(method, target, headers=(("Host", "127.0.0.1"),), body=b""):
    h = "".join("%s: %s\r\n" % kv for kv in headers)
    return ("%s %s HTTP/1.1\r\n%s\r\n" % (method, target, h)).encode("latin-1") + body


class HostileCase(testbase.IntegrationCase):
    am = None
    fp = None

    def assertServing(self, what):
        """A normal request on a new connection is served."""
        r = httpc.request(self.am.port, "GET", "/v2/", timeout=10)
        self.assertEqual(r.status, 200, "after %s: %r%s" % (what, r, self.context()))
        self.assertEqual(r.header("Docker-Distribution-API-Version"), "registry/2.0")
        self.assertTrue(self.am.alive(), "archmirror died after %s" % what)

    def assertNoUpstream(self, what):
        self.assertEqual(self.fp.total(), 0, "%s reached the upstream%s" % (what, self.context()))


class HostileClientsTest(HostileCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        testbase.require_archmirror()
        cls.dead = proc.DeadPort()
        cls.addClassCleanup(cls.dead.close)
        cls.fp = faultproxy.FaultProxy("127.0.0.1", cls.dead.port, name="counting-proxy")
        cls.addClassCleanup(cls.fp.stop)
        cls.fp.start()
        cls.proxies.append(cls.fp)
        cls.am = cls.start_archmirror(
            upstreams=[("example.com", cls.fp.url)],
            config={"server": {"header_timeout": "1s", "idle_timeout": "3s"}})

    def setUp(self):
        self.fp.reset()

    # -- slow and idle ---------------------------------------------------------------------
    def slow_client(self, out, interval=0.2):
        head = request_bytes("GET", MANIFEST + NS, (("Host", "127.0.0.1"),
                                                    ("User-Agent", "slowloris/1.0"),
                                                    ("Accept", "*/*")))
        c = Raw(self.am.port, timeout=30)
        out.update(total=len(head), sent=0, status=None, closed=False, t_closed=None)
        t0 = time.monotonic()
        try:
            for i in range(len(head)):
                if not c.send(head[i:i + 1]):
                    out["closed"] = True
                    break
                out["sent"] = i + 1
                r, _, _ = select.select([c.s], [], [], interval)
                if r:
                    resp = c.response(timeout=5)
                    if resp is not None:
                        out["status"] = resp[0]
                    out["closed"] = c.wait_eof(5)
                    break
            out["t_closed"] = time.monotonic() - t0
        finally:
            c.close()

    def test_slow_head_byte_by_byte(self):
        results = [dict() for _ in range(3)]
        threads = [threading.Thread(target=self.slow_client, args=(r,), daemon=True)
                   for r in results]
        for t in threads:
            t.start()
        served = 0
        while any(t.is_alive() for t in threads):
            r = httpc.request(self.am.port, "GET", "/v2/", timeout=5)
            self.assertEqual(r.status, 200, "normal client while slow clients hang on: %r" % r)
            served += 1
            time.sleep(0.1)
        for t in threads:
            t.join(30)
        self.assertGreaterEqual(served, 3, "the normal client hardly ran")
        for i, r in enumerate(results):
            with self.subTest(slow_client=i):
                ctx = "%r%s" % (r, self.context())
                self.assertTrue(r["closed"] or r["status"] is not None, ctx)
                self.assertIn(r["status"], (408, None), ctx)
                self.assertLess(r["sent"], r["total"], "the server waited for the whole head "
                                "sent at one byte per 0.2 s (header_timeout 1s): " + ctx)
                self.assertLess(r["t_closed"], 10.0, ctx)
        # a head that starts, then stops
        c = Raw(self.am.port, timeout=30)
        try:
            c.send(b"GET /v2/ HTTP/1.1\r\nHo")
            resp = c.response(timeout=15)
            self.assertIsNotNone(resp, "no answer to a stalled head%s" % self.context())
            self.assertEqual(resp[0], 408, repr(resp))
            self.assertTrue(c.wait_eof(5), "connection left open after 408")
        finally:
            c.close()
        self.assertNoUpstream("slow heads")
        self.assertServing("slow heads")

    def test_idle_connection_closed(self):
        silent = Raw(self.am.port, timeout=30)
        kept = Raw(self.am.port, timeout=30)
        try:
            kept.send(request_bytes("GET", "/v2/"))
            resp = kept.response()
            self.assertEqual(resp and resp[0], 200, repr(resp))
            self.assertNotEqual(resp[1].get("connection"), "close")
            self.assertTrue(silent.wait_eof(20), "a connection that never sent a byte is "
                            "still open 20 s later (idle_timeout 3s)")
            self.assertTrue(kept.wait_eof(20), "an idle keep-alive connection is still open "
                            "20 s later (idle_timeout 3s)")
            self.assertEqual(silent.buf, b"", "an idle connection got bytes: %r" % silent.buf)
        finally:
            silent.close()
            kept.close()
        self.assertServing("idle connections")

    def test_slow_body_dribble(self):
        """A declared body dribbled one byte at a time (slow POST, R.U.D.Y.) must complete
        within header_timeout like the head, or get 408 and lose its connection."""
        c = Raw(self.am.port, timeout=30)
        try:
            c.send(b"POST /api/v1/platforms HTTP/1.1\r\nHost: x\r\n"
                   b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n")
            t0 = time.monotonic()
            closed = False
            while time.monotonic() - t0 < 6.0:
                if not c.send(b" "):
                    closed = True
                    break
                r, _, _ = select.select([c.s], [], [], 0.5)
                if r:
                    c.response(timeout=2)
                    closed = c.wait_eof(2)
                    break
            self.assertTrue(closed, "a body dribbled one byte per 0.5 s (header_timeout 1s) "
                            "kept its connection for 6 s")
        finally:
            c.close()
            self.assertServing("slow body")

    # -- heads -----------------------------------------------------------------------------
    def test_oversized_heads(self):
        cases = [
            ("20KiB request line", request_bytes("GET", "/v2/" + "a" * 20480 + "/manifests/1"),
             431),
            ("17KiB header", request_bytes("GET", "/v2/", (("Host", "x"),
                                                          ("X-Big", "b" * 17 * 1024))), 431),
            ("65 headers", request_bytes("GET", "/v2/", [("Host", "x")] +
                                         [("X-H%02d" % i, "v") for i in range(64)]), 431),
            ("64 headers", request_bytes("GET", "/v2/", [("Host", "x")] +
                                         [("X-H%02d" % i, "v") for i in range(63)]), 200),
            ("15KiB head", request_bytes("GET", "/v2/", (("Host", "x"),
                                                        ("X-Big", "b" * 15 * 1024))), 200),
        ]
        for label, data, want in cases:
            with self.subTest(head=label):
                c = Raw(self.am.port)
                try:
                    c.send(data)
                    resp = c.response()
                    self.assertIsNotNone(resp, "%s: no response (%r)" % (label, c.error))
                    self.assertEqual(resp[0], want, "%s: %r%s" % (label, resp, self.context()))
                    if want == 431:
                        self.assertTrue(c.wait_eof(5), "%s: connection left open" % label)
                finally:
                    c.close()
                self.assertServing(label)
        # a head that never ends: the server must answer (and stop reading) at its limit
        c = Raw(self.am.port)
        try:
            c.send(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n")
            chunk = b"X-Filler: " + b"f" * 1000 + b"\r\n"
            sent = 0
            while sent < MiB:
                if not c.send(chunk):
                    break
                sent += len(chunk)
                if select.select([c.s], [], [], 0)[0]:
                    break
            resp = c.response(timeout=10)
            self.assertIsNotNone(resp, "no 431 for an endless head (sent %d bytes, %r)"
                                 % (sent, c.error))
            self.assertEqual(resp[0], 431, repr(resp))
            # How much the client managed to send says more about loopback socket buffers
            # than about the server; what the server must do is stop: close the connection.
            self.assertTrue(c.wait_eof(5), "connection left open after the 431 (sent %d)" % sent)
        finally:
            c.close()
        self.assertNoUpstream("oversized heads")
        self.assertServing("an endless head")

    def test_request_smuggling(self):
        inner = ("GET %s%s HTTP/1.1\r\nHost: x\r\n\r\n" % (MANIFEST, NS)).encode()
        h = b"GET /v2/ HTTP/1.1\r\nHost: x\r\n"
        cases = [
            ("CL+TE", h + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
            ("TE+CL", h + b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n"),
            ("CL.TE hiding a request",
             b"POST /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n"
             b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n" % (5 + len(inner)) + inner),
            ("TE.CL hiding a request",
             b"POST /v2/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
             b"Content-Length: 4\r\n\r\n%x\r\n" % len(inner) + inner + b"\r\n0\r\n\r\n"),
            ("duplicate CL, different", h + b"Content-Length: 0\r\nContent-Length: 5\r\n\r\nhello"),
            ("duplicate CL, same", h + b"Content-Length: 0\r\nContent-Length: 0\r\n\r\n"),
            ("CL list", h + b"Content-Length: 0, 0\r\n\r\n"),
            ("CL +0", h + b"Content-Length: +0\r\n\r\n"),
            ("CL hex", h + b"Content-Length: 0x10\r\n\r\n"),
            ("bare CR, request line", b"GET /v2/ HTTP/1.1\rHost: x\r\n\r\n"),
            ("bare CR, header", h + b"X-A: 1\rContent-Length: 40\r\n\r\n" + inner),
            ("bare CR, last line", h + b"\r\r\n"),
            ("bare LF line ends", b"GET /v2/ HTTP/1.1\nHost: x\n\n"),
            ("obs-fold SP", h + b"X-A: a\r\n b\r\n\r\n"),
            ("obs-fold HTAB", h + b"X-A: a\r\n\tb\r\n\r\n"),
            ("obs-fold of Transfer-Encoding", h + b"Transfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n"),
            ("TE xchunked", h + b"Transfer-Encoding: xchunked\r\n\r\n"),
            ("TE chunked then identity", h + b"Transfer-Encoding: chunked\r\n"
             b"Transfer-Encoding: identity\r\n\r\n"),
            ("TE identity", h + b"Transfer-Encoding: identity\r\n\r\n"),
            ("space before colon", h + b"Content-Length : 5\r\n\r\nhello"),
            ("NUL in a value", h + b"X-A: a\x00b\r\n\r\n"),
            ("two Host fields", b"GET /v2/ HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n"),
        ]
        for label, data in cases:
            with self.subTest(attempt=label):
                c = Raw(self.am.port)
                try:
                    c.send(data)
                    resp = c.response()
                    ctx = "%s: %r, then %r%s" % (label, resp, c.buf[:300], self.context())
                    self.assertIsNotNone(resp, ctx)
                    self.assertEqual(resp[0], 400, ctx)
                    self.assertEqual(resp[1].get("connection"), "close", ctx)
                    self.assertTrue(httpc.oci_error_codes(resp[2]), ctx)
                    self.assertTrue(c.wait_eof(5), "connection left open: " + ctx)
                    self.assertNotIn(b"HTTP/1.1", c.buf, "a second response: " + ctx)
                finally:
                    c.close()
                self.assertServing(label)
        self.assertNoUpstream("smuggling attempts")

    def test_path_tricks(self):
        names = ["library%2fmulti", "library/%2e%2e%2fmulti", "library/%2E%2e/multi",
                 "library/.%2e/multi", "library/%2e./multi", "library/./multi",
                 "library/%2e/multi", "library\\..\\multi", "library%5c..%5cmulti",
                 "library/multi%00", "library/%ff", "library/%c0%ae%c0%ae/multi",
                 "library/%e2%80%ae", "library/%252e%252e/multi", "library/multi%2f",
                 "%2flibrary/multi", "library/multi;x=y", "library/mu%6cti"]
        for name in names:
            for kind in ("manifests/1.0", "blobs/sha256:" + HEX):
                for method in ("GET", "HEAD"):
                    with self.subTest(name=name, kind=kind[:5], method=method):
                        r = httpc.request(self.am.port, method, "/v2/%s/%s%s" % (name, kind, NS))
                        self.assertEqual(r.status, 400, repr(r))
                        if method == "GET":
                            self.assertIn("NAME_INVALID", r.error_codes, repr(r))
        raw_targets = [b"/v2/library/\xff/manifests/1.0", b"/v2/library/\xc3\xa9/manifests/1.0",
                       b"/v2/library/\xc0\xae\xc0\xae/manifests/1.0",
                       b"/v2/library/a\tb/manifests/1.0"]
        for t in raw_targets:
            with self.subTest(raw=t):
                c = Raw(self.am.port)
                try:
                    c.send(b"GET " + t + NS.encode() + b" HTTP/1.1\r\nHost: x\r\n\r\n")
                    resp = c.response()
                    self.assertIsNotNone(resp, "no response to %r" % t)
                    self.assertEqual(resp[0], 400, repr(resp))
                    self.assertIn("NAME_INVALID", httpc.oci_error_codes(resp[2]), repr(resp))
                finally:
                    c.close()
        others = [(MANIFEST.replace("1.0", "..%2f..%2fetc"), 400, "TAG_INVALID"),
                  (MANIFEST.replace("1.0", "%2e%2e"), 400, "TAG_INVALID"),
                  ("/v2/library/multi/manifests/1.0%00", 400, "TAG_INVALID"),
                  ("/v2/library/multi/blobs/sha256%3a" + HEX, 400, "DIGEST_INVALID"),
                  ("/v2/library/multi/blobs/sha256:" + HEX + "%2f..", 400, "DIGEST_INVALID"),
                  ("/v2/..", 404, "NOT_FOUND"), ("/v2/%2e%2e/", 404, "NOT_FOUND"),
                  ("/v2/../api/v1/pulls", 404, "NOT_FOUND")]
        for path, status, code in others:
            with self.subTest(path=path):
                r = httpc.request(self.am.port, "GET", path + ("" if "?" in path else NS))
                self.assertEqual(r.status, status, repr(r))
                self.assertIn(code, r.error_codes, repr(r))
        for q in ("?ns=../../etc", "?ns=example.com%2f..", "?ns=example.com&ns=other",
                  "?ns=example.com%00"):
            with self.subTest(query=q):
                r = httpc.request(self.am.port, "GET", MANIFEST + q)
                self.assertIn(r.status, (400, 403), repr(r))
                self.assertTrue(r.error_codes, repr(r))
        self.assertNoUpstream("path tricks")
        self.assertServing("path tricks")

    def test_methods(self):
        methods = ["OPTIONS", "TRACE", "PROPFIND", "PROPPATCH", "MKCOL", "COPY", "MOVE",
                   "LOCK", "UNLOCK", "PURGE", "REPORT", "SEARCH", "LINK", "POST", "PUT",
                   "PATCH", "DELETE"]
        paths = ["/v2/", MANIFEST + NS, BLOB + NS, "/v2/library/multi/tags/list" + NS,
                 "/v2/library/multi/blobs/uploads/" + NS]
        client = httpc.Client(self.am.port)
        try:
            for path in paths:
                for m in methods:
                    with self.subTest(method=m, path=path):
                        body = b"x" * 10 if m in ("POST", "PUT", "PATCH") else None
                        r = client.request(m, path, body=body,
                                           headers={"Content-Length": str(len(body))}
                                           if body else None)
                        self.assertEqual(r.status, 405, repr(r))
                        self.assertIn("UNSUPPORTED", r.error_codes, repr(r))
                        self.assertEqual(r.header("Allow"), "GET, HEAD", repr(r))
            ping = client.request("GET", "/v2/")
            self.assertEqual(ping.status, 200, repr(ping))
        finally:
            client.close()
        for label, data in (("unknown method", request_bytes("FOO", "/v2/")),
                            ("lowercase get", request_bytes("get", "/v2/")),
                            ("CONNECT", request_bytes("CONNECT", "/v2/")),
                            ("CONNECT authority", request_bytes("CONNECT", "evil.example:443")),
                            ("method with a slash", request_bytes("G/ET", "/v2/"))):
            with self.subTest(method=label):
                c = Raw(self.am.port)
                try:
                    c.send(data)
                    resp = c.response()
                    self.assertIsNotNone(resp, label)
                    self.assertEqual(resp[0], 400, "%s: %r" % (label, resp))
                    self.assertTrue(c.wait_eof(5), "%s: connection left open" % label)
                finally:
                    c.close()
                self.assertServing(label)
        self.assertNoUpstream("other methods")

    def test_protocol_oddities(self):
        for label, data in (("HTTP/0.9", b"GET /v2/\r\n\r\n"),
                            ("HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
                            ("HTTP/1.2", b"GET /v2/ HTTP/1.2\r\nHost: x\r\n\r\n"),
                            ("HTTP/3.0", b"GET /v2/ HTTP/3.0\r\nHost: x\r\n\r\n"),
                            ("absolute-form", request_bytes("GET", "http://evil.example/v2/")),
                            ("OPTIONS *", request_bytes("OPTIONS", "*")),
                            ("TLS ClientHello", b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03"
                             + b"\x00" * 64)):
            with self.subTest(oddity=label):
                c = Raw(self.am.port)
                try:
                    c.send(data)
                    resp = c.response()
                    if resp is not None:
                        self.assertTrue(400 <= resp[0] < 500 or resp[0] == 505,
                                        "%s: %r" % (label, resp))
                    self.assertTrue(c.wait_eof(5), "%s: connection left open" % label)
                finally:
                    c.close()
                self.assertServing(label)
        for label, hdrs in (("websocket", (("Host", "x"), ("Connection", "Upgrade"),
                                           ("Upgrade", "websocket"))),
                            ("h2c", (("Host", "x"), ("Connection", "Upgrade, HTTP2-Settings"),
                                     ("Upgrade", "h2c"), ("HTTP2-Settings", "AAMAAABkAAQAAP__")))):
            with self.subTest(upgrade=label):
                c = Raw(self.am.port)
                try:
                    c.send(request_bytes("GET", "/v2/", hdrs))
                    resp = c.response()
                    self.assertIsNotNone(resp, label)
                    self.assertNotEqual(resp[0], 101, "%s: switched protocols" % label)
                    self.assertIn(resp[0], (200, 400), "%s: %r" % (label, resp))
                finally:
                    c.close()
        self.assertNoUpstream("protocol oddities")
        self.assertServing("protocol oddities")


class ManyConnectionsTest(HostileCase):
    N = 2000

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        testbase.require_archmirror()
        cls.dead = proc.DeadPort()
        cls.addClassCleanup(cls.dead.close)
        cls.fp = faultproxy.FaultProxy("127.0.0.1", cls.dead.port, name="counting-proxy")
        cls.addClassCleanup(cls.fp.stop)
        cls.fp.start()
        cls.proxies.append(cls.fp)
        cls.am = cls.start_archmirror(upstreams=[("example.com", cls.fp.url)])

    def open_idle(self, port, n):
        conns = []
        req = request_bytes("GET", "/v2/")
        try:
            for i in range(n):
                c = Raw(port, timeout=20)
                conns.append(c)
                c.send(req)
            for i, c in enumerate(conns):
                resp = c.response(timeout=20)
                self.assertEqual(resp and resp[0], 200, "idle connection %d: %r" % (i, resp))
        except BaseException:
            for c in conns:
                c.close()
            raise
        return conns

    def test_2000_idle_keepalive_connections(self):
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < self.N + 200:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, self.N + 1000), hard))
        pid = self.am.proc.pid
        for _ in range(20):             # warm: the code paths the idle ones will take
            self.assertServing("warm-up")
        base = vm_rss(pid)
        conns = self.open_idle(self.am.port, self.N)
        try:
            time.sleep(0.5)
            rss = vm_rss(pid)
            self.assertServing("%d idle connections" % self.N)
            r = httpc.request(self.am.port, "GET", MANIFEST + "?ns=not-configured.example")
            self.assertEqual(r.status, 403, repr(r))
            # they are still open and usable (default idle_timeout 60s)
            for c in conns[::200]:
                c.send(request_bytes("GET", "/v2/"))
                resp = c.response(timeout=10)
                self.assertEqual(resp and resp[0], 200, "an idle connection stopped working")
            rss2 = vm_rss(pid)
        finally:
            for c in conns:
                c.close()
        peak = max(rss, rss2)
        msg = ("VmRSS %.1f MiB before, %.1f MiB with %d idle connections (%.1f KiB each)%s"
               % (base / MiB, peak / MiB, self.N, (peak - base) / 1024.0 / self.N,
                  " [instrumented build]" if instrumented() else ""))
        sys.stderr.write("\n  %s\n" % msg)
        if instrumented():
            self.assertLess(peak - base, 96 * MiB, msg)
        else:
            self.assertLess(peak, 64 * MiB, msg)
        self.assertServing("closing the idle connections")

    def test_max_connections(self):
        am = self.start_archmirror(name="am-max32", upstreams=[("example.com", self.fp.url)],
                                   config={"server": {"max_connections": 32}})
        conns = self.open_idle(am.port, 32)
        try:
            extra = Raw(am.port)
            try:
                extra.send(request_bytes("GET", "/v2/"))
                resp = extra.response(timeout=10)
                if resp is not None:
                    self.assertEqual(resp[0], 503, repr(resp))
                self.assertTrue(extra.wait_eof(10), "the 33rd connection was left open")
            finally:
                extra.close()
            conns.pop().close()
            ok = False
            deadline = time.monotonic() + 10
            while not ok and time.monotonic() < deadline:
                try:
                    r = httpc.request(am.port, "GET", "/v2/", timeout=5)
                    ok = r.status == 200
                except OSError:
                    pass
                if not ok:
                    time.sleep(0.05)
            self.assertTrue(ok, "no room for a new connection after one closed")
        finally:
            for c in conns:
                c.close()


SOAK_REQUESTS = int(os.environ.get("AM_SOAK_REQUESTS", "0") or 0)


def loadgen_path():
    build = os.environ.get("AM_BUILD_DIR") or os.path.join(
        os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
        "build", "dev")
    for cand in (os.environ.get("AM_LOADGEN"), os.path.join(build, "bench", "loadgen"),
                 os.path.join(os.path.dirname(archmirror.binary()), "bench", "loadgen")):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


class RssSampler(threading.Thread):
    def __init__(self, pid, interval=2.0):
        super().__init__(daemon=True)
        self.pid = pid
        self.interval = interval
        self.samples = []           # (t, requests so far, VmRSS, RssAnon, RssFile) bytes
        self.requests = 0           # updated by the driver
        self.stop_ev = threading.Event()
        self.t0 = time.monotonic()

    def sample(self):
        st = proc_status(self.pid)
        self.samples.append((time.monotonic() - self.t0, self.requests, st["VmRSS"],
                             st.get("RssAnon", 0), st.get("RssFile", 0)))

    def run(self):
        while not self.stop_ev.wait(self.interval):
            try:
                self.sample()
            except (OSError, AssertionError):
                return


def python_slice(port, method, path, headers, seconds, conc=16):
    """A keep-alive loop per thread for `seconds`; returns (requests, errors, first)."""
    stop = time.monotonic() + seconds
    counts = [0] * conc
    errors = [0] * conc
    first = []

    def worker(i):
        c = httpc.Client(port, timeout=30)
        try:
            while time.monotonic() < stop:
                try:
                    r = c.request(method, path, headers=headers)
                except (OSError, http_client.HTTPException) as e:
                    errors[i] += 1
                    first.append(repr(e))
                    c.close()
                    continue
                counts[i] += 1
                if r.status != 200:
                    errors[i] += 1
                    first.append(repr(r))
        finally:
            c.close()
    import http.client as http_client
    ts = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(conc)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(seconds + 60)
    return sum(counts), sum(errors), first[:3]


@unittest.skipUnless(SOAK_REQUESTS, "soak: set AM_SOAK_REQUESTS (make soak)")
class SoakTest(testbase.IntegrationCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        testbase.require_archmirror()
        cls.registry = cls.start_registry()
        cls.seeded = registry.seed_standard(cls.registry.client())
        cls.am = cls.start_archmirror(upstreams=[("docker.io", cls.registry.url)],
                                      log_level="warn",
                                      config={"server": {"max_connections": 20000}})

    def slices(self):
        repo, tag, img = self.seeded["multi"]
        man = images.platform_manifest(img, "linux/amd64")
        layer = img["children"]["linux/amd64"]["layers"][0]
        acc = images.CONTAINERD_RESOLVE_ACCEPT
        return [
            ("manifest GET", "get", "/v2/%s/manifests/%s" % (repo, man.digest), man.media_type),
            ("tag HEAD", "head", "/v2/%s/manifests/%s" % (repo, tag), acc),
            ("blob GET", "get", "/v2/%s/blobs/%s" % (repo, layer.digest), None),
            ("tag GET", "get", "/v2/%s/manifests/%s" % (repo, tag), acc),
            ("blob HEAD", "head", "/v2/%s/blobs/%s" % (repo, layer.digest), None),
            ("pull --verify", "pull", "%s:%s" % (repo, tag), None),
        ]

    def run_slice(self, lg, kind, mode, path, accept, seconds, pulls=400):
        if lg is None:
            if mode == "pull":
                return None
            return python_slice(self.am.port, mode.upper(), path,
                                {"Accept": accept} if accept else {}, seconds)
        argv = [lg, "--target", "archmirror=" + self.am.url, "--mode", mode,
                "--markdown", os.devnull, "--timeout", str(int(seconds) + 120)]
        if mode == "pull":
            argv += ["--image", path, "--nodes", "16", "--pulls-per-node", str(pulls),
                     "--platforms", "linux/amd64:50,linux/arm64:50", "--verify"]
        else:
            argv += ["--path", path, "--concurrency", "16", "--duration", str(seconds),
                     "--warmup", "0"]
            if accept:
                argv += ["--accept", accept]
        cp = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            timeout=seconds + 300)
        try:
            out = json.loads(cp.stdout)[0]
        except (ValueError, IndexError) as e:
            self.fail("loadgen output unreadable (%r, exit %d): %r %r" % (
                e, cp.returncode, cp.stdout[-500:], cp.stderr[-2000:]))
        return out["requests"], out["errors"], [out.get("first_error") or cp.stderr[-500:]
                                                ] if out["errors"] else []

    def test_soak(self):
        lg = loadgen_path()
        seconds = float(os.environ.get("AM_SOAK_SLICE", "2"))
        max_growth = float(os.environ.get("AM_SOAK_MAX_GROWTH", "0.10"))
        target = SOAK_REQUESTS
        for _, mode, path, accept in self.slices():     # warm the cache
            if mode != "pull":
                r = httpc.request(self.am.port, mode.upper(), path,
                                  headers={"Accept": accept} if accept else {})
                self.assertEqual(r.status, 200, repr(r))
        sampler = RssSampler(self.am.proc.pid, interval=1.0)
        sampler.sample()
        sampler.start()
        t0 = time.monotonic()
        done = 0
        per_kind = {}
        t_warm = None               # warm-up: every kind once, and 10% of the requests
        try:
            i = 0
            slices = self.slices()
            while done < target or t_warm is None or sampler.samples[-1][0] < t_warm + 3:
                label, mode, path, accept = slices[i % len(slices)]
                i += 1
                res = self.run_slice(lg, label, mode, path, accept, seconds,
                                     pulls=max(10, int(seconds * 80)))
                if res is None:
                    continue
                n, errs, first = res
                self.assertEqual(errs, 0, "%s: %d of %d requests failed: %s%s" % (
                    label, errs, n, first, self.context(lines=10)))
                done += n
                per_kind[label] = per_kind.get(label, 0) + n
                sampler.requests = done
                self.assertTrue(self.am.alive(), "archmirror died during the soak")
                sampler.sample()
                if t_warm is None and i >= len(slices) and done >= target * 0.20:
                    t_warm = sampler.samples[-1][0]
        finally:
            sampler.stop_ev.set()
            sampler.join(10)
        sampler.sample()
        took = time.monotonic() - t0
        samples = sampler.samples
        if t_warm is None:
            t_warm = samples[-1][0]
        warm = [s for s in samples if s[0] <= t_warm]
        after = [s for s in samples if s[0] > t_warm] or samples[-1:]
        base = max(s[2] for s in warm)
        peak = max(s[2] for s in after)
        final = samples[-1][2]
        # where it settled: the highest sample in the last 20% (by requests) of the run
        n_end = after[0][1] + 0.8 * (done - after[0][1])
        settled = max([s[2] for s in after if s[1] >= n_end] or [final])
        max_rss = float(os.environ.get("AM_SOAK_MAX_RSS_MIB", "64")) * MiB
        slack = float(os.environ.get("AM_SOAK_SLACK_MIB", "2")) * MiB
        # A leak is a slope that does not level off: least squares of VmRSS over requests
        # in the second half (by requests) of the time after the warm-up, extrapolated over
        # every request served after the warm-up. (A one-off step, e.g. a bounded buffer
        # filling, levels off and does not count; it is bounded by the peak check.)
        n0 = after[0][1]
        mid = n0 + (done - n0) / 2.0
        pts = [(n, r) for _, n, r, _, _ in after if n >= mid]
        slope = 0.0
        if len(pts) >= 3 and pts[-1][0] > pts[0][0]:
            mx = sum(n for n, _ in pts) / len(pts)
            my = sum(r for _, r in pts) / len(pts)
            den = sum((n - mx) ** 2 for n, _ in pts)
            slope = sum((n - mx) * (r - my) for n, r in pts) / den if den else 0.0
        trend = slope * max(0, done - n0)
        lines = ["soak: %d requests in %.0fs (%.0f req/s) with %s" % (
            done, took, done / took, lg or "the Python client"),
            "  per kind: %s" % per_kind,
            "  VmRSS at start %.1f MiB; warm-up (%.0fs) peak %.1f MiB; after it: transient peak "
            "%.1f MiB, settled (last 20%%) %.1f MiB (%+.1f%%), final %.1f MiB; trend %+.2f MiB "
            "(%.3f bytes/request)" % (samples[0][2] / MiB, t_warm, base / MiB, peak / MiB,
                                      settled / MiB, (settled - base) * 100.0 / base,
                                      final / MiB, trend / MiB, slope),
            "  timeline (s, requests, VmRSS/RssAnon/RssFile MiB): " + ", ".join(
                "(%.0f, %d, %.1f/%.1f/%.1f)" % (t, n, r / MiB, a / MiB, f / MiB)
                for t, n, r, a, f in samples[::max(1, len(samples) // 40)])]
        sys.stderr.write("\n" + "\n".join(lines) + "\n")
        self.assertLessEqual(settled, base * (1 + max_growth) + slack,
                             "RSS grew more than %d%% (+%.1f MiB for bounded buffers) after "
                             "warm-up:\n%s" % (max_growth * 100, slack / MiB, "\n".join(lines)))
        self.assertLessEqual(peak, max_rss, "RSS peaked over %.0f MiB:\n%s" % (
            max_rss / MiB, "\n".join(lines)))
        self.assertLessEqual(trend, base * max_growth,
                             "RSS keeps growing with requests after warm-up:\n%s"
                             % "\n".join(lines))


if __name__ == "__main__":
    testbase.main()

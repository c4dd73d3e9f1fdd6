#!/usr/bin/python3
"""HTTPS on archmirror's own listeners, and certificate reload on SIGHUP.

upstream: plain docker-registry seeded with the standard images and an 8 MiB blob.
archmirror: server.tls_cert_file/tls_key_file (cert A, signed by the test CA) on the
registry listener; admin.listen with admin.tls_* (its own cert) for /metrics;
server.header_timeout 1s (the TLS handshake's deadline).

* test_1: HTTPS verifies against the CA, ALPN says http/1.1, TLS < 1.2 is refused; a
  plain-HTTP request on the TLS port gets no HTTP answer; the admin side speaks HTTPS too.
* test_2: manifests and an 8 MiB blob over TLS, exact bytes (miss, then hit), a Range;
  three pipelined requests in one TLS write get three answers in order; blob bodies on
  TLS are copied (the sendfile counter does not move).
* test_3: real containerd pulls (arm64 and amd64) through the https mirror with the CA
  in hosts.toml; the pulled digests are the seeded ones.
* test_4: SIGHUP with cert B in place: new connections get B, a keep-alive connection
  opened before keeps working on A; a broken pair on the next SIGHUP is refused with an
  error in the log and B stays.
* test_5: a client that connects and never says hello is closed by the handshake
  deadline while others are served; garbage instead of a ClientHello is closed.
* test_6: a key that does not match the certificate stops the start with a message
  naming the file; a cert without key fails --check-config at $.server.tls_key_file.
"""
import hashlib
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import archmirror, images, proc, registry, testbase, tlsutil  # noqa: E402

MiB = 1024 * 1024
PLATFORMS = ("linux/arm64", "linux/amd64")


poll = testbase.poll


class HTTPSConn:
    """A raw keep-alive HTTPS connection: requests out, (status, headers, body) back."""

    def __init__(self, port, ctx, timeout=20):
        raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.s = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
        self.buf = b""

    def peer_der(self):
        return self.s.getpeercert(binary_form=True)

    def send(self, data):
        self.s.sendall(data)

    def _fill(self):
        d = self.s.recv(1 << 20)
        if not d:
            raise ConnectionError("closed by the server")
        self.buf += d

    def response(self):
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        hdrs = {}
        for ln in lines[1:]:
            k, v = ln.split(":", 1)
            hdrs[k.strip().lower()] = v.strip()
        n = int(hdrs.get("content-length", "0"))
        while len(self.buf) < n:
            self._fill()
        body, self.buf = self.buf[:n], self.buf[n:]
        return status, hdrs, body

    def get(self, path, extra=""):
        self.send(("GET %s HTTP/1.1\r\nHost: mirror\r\n%s\r\n" % (path, extra)).encode())
        return self.response()

    def close(self):
        self.s.close()


def der_of(pem_path):
    with open(pem_path) as f:
        return ssl.PEM_cert_to_DER_cert(f.read())


class TLSListenerTest(testbase.IntegrationCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        testbase.require_archmirror()
        cls.reg = cls.start_registry()
        client = cls.reg.client()
        cls.seeded = registry.seed_standard(client)
        cls.blob = images.large_blob("tls-listener", size=8 * MiB + 17)
        client.push_blob("library/big", cls.blob)
        pki = cls.pki()
        cls.ca = pki.ca_cert
        d = pki.dir
        cls.cert_a = tlsutil.make_server_cert(d, (pki.ca_cert, pki.ca_key), name="mirror-a")
        cls.cert_b = tlsutil.make_server_cert(d, (pki.ca_cert, pki.ca_key), name="mirror-b")
        cls.admin_cert = tlsutil.make_server_cert(d, (pki.ca_cert, pki.ca_key), name="admin")
        # archmirror reads these two paths; the tests replace their contents.
        cls.live_cert = os.path.join(cls.workdir, "live-cert.pem")
        cls.live_key = os.path.join(cls.workdir, "live-key.pem")
        shutil.copy(cls.cert_a[0], cls.live_cert)
        shutil.copy(cls.cert_a[1], cls.live_key)
        cls.admin_port = proc.free_port()
        cls.am = cls.start_archmirror(
            upstreams=[("example.com", "http://127.0.0.1:%d" % cls.reg.port)],
            tls_ca=cls.ca,
            config={"server": {"tls_cert_file": cls.live_cert, "tls_key_file": cls.live_key,
                               "header_timeout": "1s"},
                    "admin": {"listen": "127.0.0.1:%d" % cls.admin_port,
                              "tls_cert_file": cls.admin_cert[0],
                              "tls_key_file": cls.admin_cert[1]}})
        cls.ctx = ssl.create_default_context(cafile=cls.ca)

    def conn(self, ctx=None, port=None):
        c = HTTPSConn(port or self.am.port, ctx or self.ctx)
        self.addCleanup(c.close)
        return c

    def ref(self, key):
        repo, tag, _ = self.seeded[key]
        return repo, tag

    def sendfile_bytes(self):
        c = self.conn(port=self.admin_port)
        st, _, body = c.get("/metrics")
        self.assertEqual(st, 200)
        m = re.search(rb'^archmirror_blob_file_bytes_total\{path="sendfile"\} (\d+)$', body, re.M)
        self.assertIsNotNone(m, body[-1500:])
        return int(m.group(1))

    def test_1_https_verified_and_plain_http_refused(self):
        c = self.conn()
        st, h, _ = c.get("/v2/")
        self.assertEqual(st, 200, self.context(self.am))
        self.assertEqual(h.get("docker-distribution-api-version"), "registry/2.0")
        self.assertEqual(c.peer_der(), der_of(self.cert_a[0]))
        # ALPN
        ctx = ssl.create_default_context(cafile=self.ca)
        ctx.set_alpn_protocols(["h2", "http/1.1"])
        c2 = self.conn(ctx)
        self.assertEqual(c2.s.selected_alpn_protocol(), "http/1.1")
        self.assertEqual(c2.get("/v2/")[0], 200)
        # Old protocol versions are refused.
        old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        old.load_verify_locations(self.ca)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                old.minimum_version = ssl.TLSVersion.TLSv1
                old.maximum_version = ssl.TLSVersion.TLSv1_1
            old.set_ciphers("ALL:@SECLEVEL=0")
        except (ValueError, ssl.SSLError) as e:
            self.skipTest("this OpenSSL cannot even offer TLS 1.1: %s" % e)
        with self.assertRaises((ssl.SSLError, ConnectionError, OSError)):
            HTTPSConn(self.am.port, old).get("/v2/")
        # Plain HTTP on the TLS port: no HTTP response comes back.
        with socket.create_connection(("127.0.0.1", self.am.port), timeout=5) as s:
            s.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
            got = b""
            try:
                while True:
                    d = s.recv(4096)
                    if not d:
                        break
                    got += d
            except (ConnectionResetError, socket.timeout):
                pass
        self.assertFalse(got.startswith(b"HTTP/"), got[:200])
        # The admin side has its own certificate.
        a = self.conn(port=self.admin_port)
        self.assertEqual(a.get("/metrics")[0], 200)
        self.assertEqual(a.peer_der(), der_of(self.admin_cert[0]))
        self.assertTrue(self.am.alive())

    def test_2_content_over_tls(self):
        repo, tag = self.ref("multi")
        img = self.seeded["multi"][2]
        c = self.conn()
        st, h, body = c.get("/v2/%s/manifests/%s?ns=example.com" % (repo, tag),
                            "Accept: application/vnd.oci.image.index.v1+json\r\n")
        self.assertEqual(st, 200, self.context(self.am))
        self.assertEqual(body, img["top"].data)
        before = self.sendfile_bytes()
        path = "/v2/library/big/blobs/%s?ns=example.com" % self.blob.digest
        for what in ("miss", "hit"):
            st, h, body = c.get(path)
            self.assertEqual(st, 200, what + self.context(self.am))
            self.assertEqual("sha256:" + hashlib.sha256(body).hexdigest(), self.blob.digest, what)
        st, h, body = c.get(path, "Range: bytes=4097-1048576\r\n")
        self.assertEqual(st, 206)
        self.assertEqual(body, bytes(self.blob.data[4097:1048577]))
        self.assertEqual(self.sendfile_bytes(), before, "a TLS body went by sendfile")
        # Three pipelined requests in one TLS record.
        amd = images.platform_manifest(img, "linux/amd64")
        paths = ["/v2/", "/v2/%s/manifests/%s?ns=example.com" % (repo, amd.digest), "/v2/"]
        c.send(b"".join(("GET %s HTTP/1.1\r\nHost: m\r\nAccept: %s\r\n\r\n" % (
            p, amd.media_type)).encode() for p in paths))
        got = [c.response() for _ in paths]
        self.assertEqual([g[0] for g in got], [200, 200, 200], self.context(self.am))
        self.assertEqual(got[1][2], amd.data)

    def test_3_containerd_pulls_through_the_https_mirror(self):
        ctd = self.start_containerd()
        dead = proc.DeadPort()
        self.addCleanup(dead.close)
        for plat in PLATFORMS:
            hd = os.path.join(self.workdir, "hosts-tls-" + plat.replace("/", "-"))
            d = os.path.join(hd, "example.com")
            os.makedirs(d, exist_ok=True)
            with open(os.path.join(d, "hosts.toml"), "w") as f:
                f.write('server = "%s"\n\n[host."%s"]\n  capabilities = ["pull", "resolve"]\n'
                        '  ca = "%s"\n' % (dead.url, self.am.url, self.ca))
            for key in ("multi", "list"):
                repo, tag = self.ref(key)
                img = self.seeded[key][2]
                r = ctd.pull("example.com/%s:%s" % (repo, tag), plat, hd)
                self.assertTrue(r.ok, "%r%s" % (r, self.context(self.am)))
                self.assertEqual(r.digest, img["top"].digest, repr(r))
                ctd.remove_image("example.com/%s:%s" % (repo, tag))

    def test_4_sighup_reloads_the_certificate(self):
        old = self.conn()
        self.assertEqual(old.get("/v2/")[0], 200)
        self.assertEqual(old.peer_der(), der_of(self.cert_a[0]))
        shutil.copy(self.cert_b[0], self.live_cert)
        shutil.copy(self.cert_b[1], self.live_key)
        os.kill(self.am.proc.pid, signal.SIGHUP)

        def new_cert():
            c = HTTPSConn(self.am.port, self.ctx)
            try:
                return c.peer_der() == der_of(self.cert_b[0])
            finally:
                c.close()
        self.assertTrue(poll(new_cert), "new connections still get cert A after SIGHUP" +
                        self.context(self.am))
        self.assertIn("new connections use", self.am.log())
        st, _, _ = old.get("/v2/")
        self.assertEqual(st, 200, "a connection opened before the reload broke")
        # A broken pair (key of A, cert B) is refused; B stays.
        shutil.copy(self.cert_a[1], self.live_key)
        os.kill(self.am.proc.pid, signal.SIGHUP)
        self.assertTrue(poll(lambda: "keep the previous certificate" in self.am.log()),
                        self.context(self.am))
        c = self.conn()
        self.assertEqual(c.get("/v2/")[0], 200)
        self.assertEqual(c.peer_der(), der_of(self.cert_b[0]))
        shutil.copy(self.cert_b[1], self.live_key)
        self.assertTrue(self.am.alive())

    def test_5_handshake_deadline_and_garbage(self):
        silent = socket.create_connection(("127.0.0.1", self.am.port), timeout=10)
        self.addCleanup(silent.close)
        t0 = time.monotonic()
        c = self.conn()
        self.assertEqual(c.get("/v2/")[0], 200)
        try:
            d = silent.recv(100)
        except ConnectionResetError:
            d = b""
        waited = time.monotonic() - t0
        self.assertEqual(d, b"", "a silent client got bytes")
        self.assertLess(waited, 8, "a silent client was not closed by the 1 s handshake "
                        "deadline (%.1f s)" % waited)
        with socket.create_connection(("127.0.0.1", self.am.port), timeout=5) as g:
            g.sendall(b"\x16\x03\x01\x00\x05hello" + os.urandom(200))
            try:
                while g.recv(4096):
                    pass
            except (ConnectionResetError, socket.timeout):
                pass
        self.assertEqual(self.conn().get("/v2/")[0], 200)
        self.assertTrue(self.am.alive())

    def test_6_bad_pairs_are_refused_at_start(self):
        am = archmirror.Archmirror(
            self.workdir, name="am-badkey",
            upstreams=[("example.com", "http://127.0.0.1:%d" % self.reg.port)],
            config={"server": {"tls_cert_file": self.cert_a[0],
                               "tls_key_file": self.cert_b[1]}})
        am.port = proc.free_port()
        p = subprocess.run(am.argv(), capture_output=True, text=True, timeout=30)
        self.assertNotEqual(p.returncode, 0, p.stderr)
        self.assertIn("does not match certificate file", p.stderr)
        self.assertIn(self.cert_b[1], p.stderr)
        cfg = os.path.join(self.workdir, "half.json")
        with open(cfg, "w") as f:
            f.write('{"server": {"tls_cert_file": "%s"}}' % self.cert_a[0])
        p = subprocess.run([archmirror.binary(), "--check-config", cfg], capture_output=True,
                           text=True, timeout=30)
        self.assertNotEqual(p.returncode, 0)
        self.assertIn("$.server.tls_key_file", p.stderr)


if __name__ == "__main__":
    testbase.main()

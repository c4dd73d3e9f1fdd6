"""unittest glue: per-class work dir, service starters that register their own
cleanup, context for assertion messages, and main()."""
import os
import shutil
import sys
import tempfile
import time
import unittest

from . import archmirror, containerd, faultproxy, httpc, proc, registry, tlsutil, tokenissuer
from .images import sha256

_workdirs = []
KEEP = os.environ.get("AM_KEEP_WORKDIR") == "1"


def poll(fn, timeout=10.0, interval=0.05):
    """fn() until it returns something true or timeout seconds pass; returns its last
    value (so a failed wait can be asserted and described)."""
    deadline = time.monotonic() + timeout
    while True:
        v = fn()
        if v or time.monotonic() >= deadline:
            return v
        time.sleep(interval)


def new_workdir(tag):
    base = os.environ.get("AM_TEST_TMP") or None
    if base:
        os.makedirs(base, exist_ok=True)
    d = tempfile.mkdtemp(prefix="am-it-%s-" % tag, dir=base)
    _workdirs.append(d)
    return d


def require_archmirror():
    """Skip (binary not built yet, ARCHMIRROR_BIN unset) or fail (ARCHMIRROR_BIN set
    but missing: ctest always sets it)."""
    if archmirror.available():
        return
    if os.environ.get("ARCHMIRROR_BIN"):
        raise AssertionError("ARCHMIRROR_BIN=%s is not an executable" % archmirror.binary())
    raise unittest.SkipTest("archmirror binary not built (%s)" % archmirror.binary())


class IntegrationCase(unittest.TestCase):
    """Class-level services. Every start_* registers a class cleanup (LIFO), so a
    failing setUpClass still stops everything; archmirror's stop raises (→ test error)
    on sanitizer reports / signal deaths / non-zero exit."""

    maxDiff = None
    workdir = None
    mirrors = ()
    proxies = ()

    @classmethod
    def setUpClass(cls):
        cls.workdir = new_workdir(cls.__name__)
        cls.mirrors = []
        cls.proxies = []
        cls.t0 = time.monotonic()

    # -- starters --------------------------------------------------------------------
    @classmethod
    def start_registry(cls, name="registry", **kw):
        r = registry.Registry(cls.workdir, name=name, **kw)
        cls.addClassCleanup(r.stop)
        return r.start()

    @classmethod
    def start_token_issuer(cls, **kw):
        t = tokenissuer.TokenIssuer(cls.workdir, **kw).start()
        cls.addClassCleanup(t.stop)
        return t

    @classmethod
    def start_faultproxy(cls, reg, name="faultproxy"):
        fp = faultproxy.FaultProxy("127.0.0.1", reg.port, upstream_tls=bool(reg.tls), name=name)
        cls.addClassCleanup(fp.stop)
        fp.start()
        cls.proxies.append(fp)
        return fp

    @classmethod
    def start_archmirror(cls, **kw):
        require_archmirror()
        am = archmirror.Archmirror(cls.workdir, **kw)
        cls.addClassCleanup(am.stop)
        am.start()
        cls.mirrors.append(am)
        return am

    @classmethod
    def start_containerd(cls, name="containerd"):
        c = containerd.Containerd(cls.workdir, name=name)
        cls.addClassCleanup(c.stop)
        return c.start()

    @classmethod
    def pki(cls):
        return tlsutil.PKI(cls.workdir)

    # -- helpers ---------------------------------------------------------------------
    def context(self, am=None, lines=25):
        """Text appended to assertion messages: upstream request log + archmirror log."""
        out = []
        for fp in self.proxies:
            out.append("--- upstream requests seen by %s:\n%s" % (fp.name, fp.describe()))
        for m in ([am] if am else self.mirrors):
            if m is not None and m.proc is not None:
                t = m.proc.stderr_text().splitlines()
                out.append("--- %s stderr (last %d lines):\n%s" % (m.name, lines,
                                                                   "\n".join(t[-lines:])))
        return "\n" + "\n".join(out)

    def assertManifestResponse(self, r, blob, method="GET", msg=""):
        """Status 200, exact bytes (GET), Content-Type, Docker-Content-Digest, Content-Length."""
        ctx = "%s\n%r%s" % (msg, r, self.context())
        self.assertEqual(r.status, 200, ctx)
        self.assertEqual(r.header("Content-Type"), blob.media_type, ctx)
        self.assertEqual(r.header("Docker-Content-Digest"), blob.digest, ctx)
        self.assertEqual(r.header("Content-Length"), str(blob.size), ctx)
        if method == "GET":
            self.assertEqual(sha256(r.body), blob.digest, ctx)
            self.assertEqual(r.body, blob.data, ctx)
        else:
            self.assertEqual(r.body, b"", ctx)

    def assertBlobResponse(self, r, blob, method="GET", msg=""):
        ctx = "%s\n%r%s" % (msg, r, self.context())
        self.assertEqual(r.status, 200, ctx)
        self.assertEqual(r.header("Content-Length"), str(blob.size), ctx)
        dcd = r.header("Docker-Content-Digest")
        if dcd is not None:
            self.assertEqual(dcd, blob.digest, ctx)
        if method == "GET":
            self.assertEqual(r.body, blob.data, ctx)

    def assertOCIError(self, r, status, code, msg=""):
        ctx = "%s\n%r%s" % (msg, r, self.context())
        self.assertEqual(r.status, status, ctx)
        if r.method != "HEAD":
            self.assertIn(code, r.error_codes, ctx)

    def get(self, am, path, accept=None, method="GET", headers=None):
        h = dict(headers or {})
        if accept is not None:
            h["Accept"] = accept
        return httpc.request(am.port, method, path, headers=h)


def main():
    """unittest.main, then remove work dirs on success (kept and listed on failure or
    with AM_KEEP_WORKDIR=1); exit status non-zero on any failure/error."""
    prog = unittest.main(exit=False, verbosity=2)
    ok = prog.result.wasSuccessful()
    proc.kill_all()
    if ok and not KEEP:
        for d in _workdirs:
            shutil.rmtree(d, ignore_errors=True)
    else:
        for d in _workdirs:
            sys.stderr.write("work dir kept: %s\n" % d)
    sys.exit(0 if ok else 1)

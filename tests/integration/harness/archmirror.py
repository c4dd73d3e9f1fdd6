"""Runs the archmirror binary under test (CLI contract in the integration README)."""
import json
import os
import re
import signal

from . import proc

DEFAULT_BIN = "/work/main/build/dev/archmirror"

SANITIZER_PATTERNS = ("ERROR: AddressSanitizer", "runtime error:", "LeakSanitizer",
                      "ERROR: ThreadSanitizer", "WARNING: ThreadSanitizer")


def binary():
    return os.environ.get("ARCHMIRROR_BIN") or DEFAULT_BIN


def available():
    b = binary()
    return os.path.isfile(b) and os.access(b, os.X_OK)


class ArchmirrorError(AssertionError):
    pass


class Archmirror:
    """archmirror --listen 127.0.0.1:PORT --data-dir DIR --upstream NAME=URL ...

    upstreams: list of (name, url) (first one = default upstream); upstream_ca:
    list of (name, file); config: dict written to <workdir>/<name>-config.json and
    passed with --config. stderr goes to <workdir>/<name>.stderr. env: variables added to
    (or, with value None, removed from) this process's environment for the binary."""

    def __init__(self, workdir, upstreams=(), upstream_ca=(), config=None, name="archmirror",
                 log_level="debug", extra_args=(), data_dir=None, env=None, tls_ca=None):
        self.workdir = workdir
        self.name = name
        self.upstreams = list(upstreams)
        self.upstream_ca = list(upstream_ca)
        self.config = config
        self.log_level = log_level
        self.extra_args = list(extra_args)
        self.data_dir = data_dir or os.path.join(workdir, name + "-data")
        self.env = dict(env or {})
        # tls_ca: the registry listener speaks HTTPS (server.tls_* in config) with a
        # certificate this CA file verifies; readiness and url use https then.
        self.tls_ca = tls_ca
        self.port = None
        self.proc = None
        self.exit_status = None
        self.starts = 0

    @property
    def url(self):
        return "%s://127.0.0.1:%d" % ("https" if self.tls_ca else "http", self.port)

    def ssl_context(self):
        """A client context that trusts tls_ca (None without TLS)."""
        if not self.tls_ca:
            return None
        import ssl
        return ssl.create_default_context(cafile=self.tls_ca)

    @property
    def hostport(self):
        return "127.0.0.1:%d" % self.port

    def argv(self):
        a = [binary(), "--listen", self.hostport, "--data-dir", self.data_dir]
        for n, u in self.upstreams:
            a += ["--upstream", "%s=%s" % (n, u)]
        for n, f in self.upstream_ca:
            a += ["--upstream-ca", "%s=%s" % (n, f)]
        if self.config is not None:
            path = os.path.join(self.workdir, self.name + "-config.json")
            with open(path, "w") as f:
                json.dump(self.config, f, indent=2)
            a += ["--config", path]
        if self.log_level:
            a += ["--log-level", self.log_level]
        return a + self.extra_args

    def start(self, timeout=30):
        if not available():
            raise ArchmirrorError("archmirror binary not found at %s (set ARCHMIRROR_BIN)"
                                  % binary())
        os.makedirs(self.data_dir, exist_ok=True)
        keep_port = self.port is not None
        for attempt in range(3):
            if not keep_port:
                self.port = proc.free_port()
            self.starts += 1
            pname = self.name if self.starts == 1 else "%s.%d" % (self.name, self.starts)
            self.proc = proc.spawn(self.argv(), pname, self.workdir, env=self.environ())
            try:
                proc.wait_http_ready(
                    self.port, "/v2/", proc=self.proc, timeout=timeout,
                    https_context=self.ssl_context(),
                    check=lambda r, b: r.getheader("Docker-Distribution-API-Version") ==
                    "registry/2.0")
                return self
            except proc.NotReady:
                err = self.proc.stderr_text()
                self.proc.stop(timeout=5)
                self.check_sanitizers(err)
                if re.search(r"address already in use|EADDRINUSE", err, re.I) and \
                        attempt < 2 and not keep_port:
                    continue
                raise
        return self

    def environ(self):
        """The binary's environment: None (inherit) unless env was given."""
        if not self.env:
            return None
        e = dict(os.environ)
        for k, v in self.env.items():
            if v is None:
                e.pop(k, None)
            else:
                e[k] = v
        return e

    def log(self):
        return self.proc.stderr_text() if self.proc else ""

    def alive(self):
        return self.proc is not None and self.proc.alive()

    @staticmethod
    def check_sanitizers(text):
        for pat in SANITIZER_PATTERNS:
            if pat in text:
                i = text.find(pat)
                raise ArchmirrorError("sanitizer report in archmirror stderr (%s):\n%s"
                                      % (pat, text[max(0, i - 2000):i + 6000]))

    def stop(self, timeout=15, check=True):
        """SIGTERM, wait (SIGKILL after timeout). With check, raises ArchmirrorError if
        it died of a signal, exited non-zero, needed SIGKILL, or printed a sanitizer
        report. Safe to call twice."""
        if self.proc is None:
            return self.exit_status
        p = self.proc
        died_before = not p.alive()
        rc = p.stop(timeout=timeout, sig=signal.SIGTERM)
        self.exit_status = rc
        self.proc = None
        if not check:
            return rc
        text = p.stderr_text()
        self.check_sanitizers(text)
        tail = "\n".join(text.splitlines()[-30:])
        if died_before:
            raise ArchmirrorError("archmirror was no longer running before SIGTERM (exit "
                                  "status %s); stderr tail:\n%s" % (rc, tail))
        if p.killed_after_timeout:
            raise ArchmirrorError("archmirror did not exit within %ss of SIGTERM (SIGKILLed)"
                                  "; stderr tail:\n%s" % (timeout, tail))
        if rc is not None and rc < 0:
            raise ArchmirrorError("archmirror %s by signal %d (%s); stderr tail:\n%s" % (
                "died on SIGTERM", -rc,
                signal.Signals(-rc).name, tail))
        if rc != 0:
            raise ArchmirrorError("archmirror exited %d on SIGTERM; stderr tail:\n%s" % (
                rc, tail))
        return rc

    def restart(self, timeout=30):
        self.stop()
        return self.start(timeout=timeout)

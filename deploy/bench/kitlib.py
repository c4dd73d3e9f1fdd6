"""Shared helpers of the EKS bench kit (deploy/bench/README.md): loading bench/run as a
module (so the Jobs seed and measure with the harness's own code, not a copy of it),
tiny HTTP helpers, and the seed marker.

Python 3 standard library only. The bench image lays the repository out as
/opt/archmirror-bench/{bench,tests/integration/harness,deploy/bench}, the same relative
paths as a checkout, so these scripts also run from a checkout (offline rehearsal:
deploy/bench/README.md, "Rehearse offline").
"""
import http.client
import importlib.machinery
import importlib.util
import json
import os
import sys
import time
import urllib.parse

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.environ.get("AM_BENCH_ROOT") or os.path.join(HERE, "..", ".."))

# The seed Job pushes this tag last; its config blob is the seed description (what
# bench/run's seed_upstream returns, plus the cold images). The bench Jobs wait for it.
KIT_SEED_VERSION = 1
SEED_REPO = "bench/seed-info"
SEED_MEDIA_TYPE = "application/vnd.oci.image.config.v1+json"

# Markers around the result JSON in a bench Job's log (compare.py reads either a log
# with these markers or the bare JSON file).
BEGIN = "----- BEGIN archmirror-bench-json %s -----"
END = "----- END archmirror-bench-json %s -----"

_bench_run = None


def bench_run():
    """bench/run, imported as a module (it guards main() with __name__)."""
    global _bench_run
    if _bench_run is None:
        path = os.path.join(ROOT, "bench", "run")
        loader = importlib.machinery.SourceFileLoader("bench_run", path)
        spec = importlib.util.spec_from_loader("bench_run", loader)
        mod = importlib.util.module_from_spec(spec)
        keep = sys.dont_write_bytecode
        sys.dont_write_bytecode = True   # no bench/__pycache__/run*.pyc in the checkout
        try:
            loader.exec_module(mod)
        finally:
            sys.dont_write_bytecode = keep
        _bench_run = mod
    return _bench_run


def seed_tag():
    return "kit%d-seed%d" % (KIT_SEED_VERSION, bench_run().SEED_VERSION)


def split_url(url):
    """'http://host:port' -> (scheme, host, port)."""
    u = urllib.parse.urlsplit(url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise ValueError("not an http(s) URL: %r" % url)
    return u.scheme, u.hostname, u.port or (443 if u.scheme == "https" else 80)


def request(base, method, path, headers=None, body=None, timeout=30):
    """(status, headers, body) of one request to base ('http://host:port')."""
    scheme, host, port = split_url(base)
    if scheme == "https":
        import ssl
        c = http.client.HTTPSConnection(host, port, timeout=timeout,
                                        context=ssl.create_default_context())
    else:
        c = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        return r.status, r.headers, r.read()
    finally:
        c.close()


def wait_http(base, path, ok=(200,), timeout=300, what=None, log=None):
    """Polls base+path until it answers one of ok; raises TimeoutError."""
    deadline = time.time() + timeout
    last = None
    n = 0
    while time.time() < deadline:
        try:
            st, _, _ = request(base, "GET", path, timeout=5)
            if st in ok:
                return st
            last = "HTTP %d" % st
        except OSError as e:
            last = str(e)
        n += 1
        if log and n % 10 == 1:
            log("waiting for %s (%s%s): %s" % (what or base, base, path, last))
        time.sleep(2)
    raise TimeoutError("%s (%s%s) not ready after %d s: %s" % (what or base, base, path,
                                                              timeout, last))


def fetch_seed(registry, timeout=0, log=None):
    """The seed description the seed Job pushed to registry, or None if absent (after
    waiting up to timeout seconds for it)."""
    accept = "application/vnd.oci.image.manifest.v1+json"
    deadline = time.time() + timeout
    n = 0
    while True:
        try:
            st, _, body = request(registry, "GET", "/v2/%s/manifests/%s" % (SEED_REPO, seed_tag()),
                                  headers={"Accept": accept})
        except OSError as e:
            st, body = None, str(e).encode()
        if st == 200:
            m = json.loads(body)
            st, _, cfg = request(registry, "GET", "/v2/%s/blobs/%s" % (
                SEED_REPO, m["config"]["digest"]), timeout=60)
            if st != 200:
                raise RuntimeError("seed marker config blob: HTTP %d" % st)
            return json.loads(cfg)
        if time.time() >= deadline:
            return None
        n += 1
        if log and n % 6 == 1:
            log("waiting for the seed Job (%s/v2/%s/manifests/%s: %s)" % (
                registry, SEED_REPO, seed_tag(), st or body[:200]))
        time.sleep(5)

#!/usr/bin/python3
"""Crash safety under load: kill -9 archmirror 20 times at varied points while several
clients pull through it, restart it on the same data dir each time, and check that it
never serves a wrong byte.

upstream: docker-registry behind the faultproxy, blob bodies throttled (2 MiB/s per
response) so kills land while blobs stream; archmirror keeps one data dir across all
runs and gets a new port on every start.

Content: a pool of 21 distinct small OCI images (each: an index with one
linux/amd64 manifest, a config, three incompressible layers of 256 KiB - 1.25 MiB), so
every round pulls cold content, plus the harness's standard three images (pulled warm
in every round too).

Each round i (0..19):
1. start archmirror (LMDB opens after SIGKILL, or start fails the test); within 5 s of
   being ready no *.part is left under <data>/blobs (the startup sweep of blobs/tmp);
2. every file under <data>/blobs/sha256 hashes to its name (store consistent);
3. every object of the images pulled in earlier rounds (tag, index, manifest, config,
   layers) is GOT with the throttle off: 200 with exactly the right bytes — a blob that
   was cut by a kill is fetched again (miss), never served short or wrong;
4. four clients pull image i (cold) and one re-pulls a standard image (warm), throttled;
   every response that arrives complete (Content-Length bytes, no error) must hash to its
   digest even though a kill is coming;
5. kill -9 at the round's point, cycling through: a seeded random delay (0-1.2 s); when a
   layer's upstream body is half sent; the instant a layer's upstream body is complete
   (the commit window); while the tag's upstream response is held before its body; right
   after startup while step 3's GETs are running (those rounds verify before killing).
A last start verifies everything, then SIGTERM must give exit status 0.

Runtime: ~16 s on the dev build, ~20 s under ASan, ~90 s under valgrind (per-round times
with AM_CRASH_VERBOSE=1; AM_CRASH_ROUNDS changes the number of kills).
"""
import hashlib
import json
import os
import random
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import archmirror, blobs, faultproxy, images, registry, testbase  # noqa: E402

KiB = 1024
MiB = 1024 * KiB
ROUNDS = int(os.environ.get("AM_CRASH_ROUNDS", "20"))
RATE = 2 * MiB
NS = "?ns=example.com"
VERBOSE = os.environ.get("AM_CRASH_VERBOSE") == "1"
POINTS = ("random", "mid-body", "body-done", "tag-held", "during-verify")


def file_digest(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


part_files = blobs.part_files


def store_files(data_dir):
    out = []
    for dirpath, _, files in os.walk(os.path.join(data_dir, "blobs", "sha256")):
        out += [os.path.join(dirpath, f) for f in files]
    return out


def poll(fn, timeout=5.0):
    return testbase.poll(fn, timeout)


class Obj:
    """An object to GET through archmirror and the digest its bytes must have."""

    def __init__(self, repo, kind, ref, blob, accept=None):
        self.kind = kind                # "tag" | "manifest" | "blob"
        self.blob = blob
        what = "blobs" if kind == "blob" else "manifests"
        self.up_path = "/v2/%s/%s/%s" % (repo, what, ref)
        self.path = self.up_path + NS
        self.accept = accept

    def headers(self):
        return {"Accept": self.accept} if self.accept else {}

    def __repr__(self):
        return "<%s %s (%d bytes)>" % (self.kind, self.up_path, self.blob.size)


def crash_image(i):
    """An OCI index -> one linux/amd64 manifest -> config + 3 layers (sizes vary)."""
    rnd = random.Random("crash-sizes-%d" % i)
    layers = [images.large_blob("crash-%d-%d" % (i, j), size=rnd.randrange(256, 1280) * KiB)
              for j in range(3)]
    cfg = images.Blob(json.dumps({
        "architecture": "amd64", "os": "linux", "config": {},
        "rootfs": {"type": "layers", "diff_ids": [l.digest for l in layers]}},
        sort_keys=True).encode(), images.OCI_CONFIG)
    man = images.Blob(images.canonical({
        "schemaVersion": 2, "mediaType": images.OCI_MANIFEST, "config": cfg.descriptor(),
        "layers": [l.descriptor() for l in layers]}), images.OCI_MANIFEST)
    idx = images.Blob(images.canonical({
        "schemaVersion": 2, "mediaType": images.OCI_INDEX, "manifests": [
            man.descriptor(platform={"architecture": "amd64", "os": "linux"})]}),
        images.OCI_INDEX)
    return {"repo": "crash/img%02d" % i, "index": idx, "manifest": man, "config": cfg,
            "layers": layers}


def objects_of(img):
    repo = img["repo"]
    out = [Obj(repo, "tag", "1.0", img["index"], images.CONTAINERD_RESOLVE_ACCEPT),
           Obj(repo, "manifest", img["index"].digest, img["index"], images.OCI_INDEX),
           Obj(repo, "manifest", img["manifest"].digest, img["manifest"], images.OCI_MANIFEST),
           Obj(repo, "blob", img["config"].digest, img["config"])]
    out += [Obj(repo, "blob", l.digest, l) for l in img["layers"]]
    return out


def standard_objects(repo, tag, img):
    out = [Obj(repo, "tag", tag, img["top"], images.CONTAINERD_RESOLVE_ACCEPT)]
    for m in images.all_manifests(img):
        out.append(Obj(repo, "manifest", m.digest, m, m.media_type))
    for b in images.all_blobs(img):
        out.append(Obj(repo, "blob", b.digest, b))
    return out


class Puller(threading.Thread):
    """Pulls a list of objects (manifests first, then blobs two at a time), recording every
    result; a kill just ends it with errors."""

    def __init__(self, port, objs, name):
        super().__init__(daemon=True, name=name)
        self.port = port
        self.objs = objs
        self.results = []           # (obj, TimedResult)
        self.lock = threading.Lock()

    def get(self, obj):
        r = faultproxy.timed_get(self.port, obj.path, headers=obj.headers(), timeout=20)
        with self.lock:
            self.results.append((obj, r))
        return r

    def run(self):
        manifests = [o for o in self.objs if o.kind != "blob"]
        blobs = [o for o in self.objs if o.kind == "blob"]
        for o in manifests:
            if self.get(o).status is None:
                return                  # archmirror is gone
        for i in range(0, len(blobs), 2):
            ts = [threading.Thread(target=self.get, args=(o,), daemon=True)
                  for o in blobs[i:i + 2]]
            for t in ts:
                t.start()
            for t in ts:
                t.join(30)
            with self.lock:
                if any(r.status is None for _, r in self.results[-len(ts):]):
                    return


class CrashSafetyTest(testbase.IntegrationCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        testbase.require_archmirror()
        cls.registry = cls.start_registry()
        client = cls.registry.client()
        cls.standard = registry.seed_standard(client)
        cls.crash_images = []
        for i in range(ROUNDS + 1):
            img = crash_image(i)
            for b in [img["config"]] + img["layers"]:
                client.push_blob(img["repo"], b)
            client.push_manifest(img["repo"], img["manifest"].digest, img["manifest"])
            client.push_manifest(img["repo"], "1.0", img["index"])
            cls.crash_images.append(img)
        cls.fp = cls.start_faultproxy(cls.registry)
        testbase.require_archmirror()
        cls.am = archmirror.Archmirror(cls.workdir, upstreams=[("example.com", cls.fp.url)])
        cls.addClassCleanup(cls.am.stop, check=False)
        cls.mirrors.append(cls.am)
        cls.stats = {"hit": 0, "miss": 0, "joined": 0, "other": 0,
                     "complete_under_load": 0, "cut_under_load": 0,
                     "parts_at_kill": 0}

    # -- phases ----------------------------------------------------------------------------
    def ctx(self, extra=""):
        return "%s%s" % (extra, self.context(self.am, 40))

    def start(self, rnd):
        self.am.port = None
        t0 = time.monotonic()
        self.am.start(timeout=30)          # fails the test if it cannot open its stores
        d = self.am.data_dir
        left = poll(lambda: not part_files(d), timeout=5)
        self.assertTrue(left, "round %d: *.part files still there after startup: %s%s" % (
            rnd, part_files(d), self.ctx()))
        return time.monotonic() - t0

    def check_store(self, rnd):
        for path in store_files(self.am.data_dir):
            try:
                got = file_digest(path)
            except FileNotFoundError:
                continue                    # evicted meanwhile
            self.assertEqual(got, "sha256:" + os.path.basename(path),
                             "round %d: a stored blob does not hash to its name: %s%s" % (
                                 rnd, path, self.ctx()))

    def verify(self, objs, rnd, killing=None):
        """GET every object; exact bytes. killing: an Event set just before a kill during
        verification; once it is set, stops quietly (what follows is the kill's doing)."""
        for o in objs:
            r = faultproxy.timed_get(self.am.port, o.path, headers=o.headers(), timeout=30)
            if killing is not None and killing.is_set():
                if r.complete:
                    self.assertEqual(r.digest, o.blob.digest, self.ctx(
                        "WRONG BYTES round %d: %r: %r" % (rnd, o, r)))
                return False
            ctx = "round %d: %r: %r" % (rnd, o, r)
            self.assertEqual(r.status, 200, self.ctx(ctx))
            self.assertTrue(r.complete, self.ctx(ctx))
            self.assertEqual(r.digest, o.blob.digest, self.ctx("WRONG BYTES " + ctx))
            if o.kind != "tag":
                dcd = r.header("Docker-Content-Digest")
                if dcd is not None:
                    self.assertEqual(dcd, o.blob.digest, self.ctx(ctx))
            if o.kind == "blob":
                state = r.header("X-Archmirror-Cache", "other")
                self.stats[state if state in self.stats else "other"] += 1
        return True

    def kill(self):
        p = self.am.proc
        p.kill()
        self.am.proc = None
        self.stats["parts_at_kill"] += len(part_files(self.am.data_dir))
        archmirror.Archmirror.check_sanitizers(p.stderr_text())
        return p

    def load(self, rnd):
        img = self.crash_images[rnd]
        cold = objects_of(img)
        repo, tag, std = self.standard[("multi", "list", "single")[rnd % 3]]
        warm = standard_objects(repo, tag, std)
        pullers = [Puller(self.am.port, cold, "cold%d" % k) for k in range(4)]
        pullers.append(Puller(self.am.port, warm, "warm"))
        return img, pullers

    def kill_at(self, point, rnd, img, pullers, rng):
        fp = self.fp
        layers = [l for l in img["layers"]]
        layer_paths = ["/v2/%s/blobs/%s" % (img["repo"], l.digest) for l in layers]
        big = max(range(3), key=lambda j: layers[j].size)
        tag_path = "/v2/%s/manifests/1.0" % img["repo"]
        if point == "tag-held":
            fp.gate(tag_path, 0)
        for p in pullers:
            p.start()
        if point == "random":
            time.sleep(rng.uniform(0.0, 1.2))
        elif point == "mid-body":
            fp.wait_sent(layer_paths[big], layers[big].size // 2, timeout=20)
        elif point == "body-done":
            fp.wait_body_done(layer_paths[rng.randrange(3)], timeout=20)
        elif point == "tag-held":
            fp.wait_gated(tag_path, timeout=20)
        self.kill()
        fp.release()

    # -- the test ----------------------------------------------------------------------------
    def test_kill_9_twenty_times_under_load(self):
        rng = random.Random("crash-safety")
        pulled = []                 # objects of rounds already run (verified after each start)
        for o in self.standard.values():
            pulled += standard_objects(*o)
        t_all = time.monotonic()
        for rnd in range(ROUNDS):
            t0 = time.monotonic()
            point = POINTS[rnd % len(POINTS)]
            self.fp.clear_faults()
            self.fp.reset()
            t_start = self.start(rnd)
            self.check_store(rnd)
            if point == "during-verify":
                killing = threading.Event()

                def kill_now():
                    killing.set()
                    self.kill()
                killer = threading.Timer(rng.uniform(0.05, 0.4), kill_now)
                killer.start()
                self.verify(pulled, rnd, killing=killing)
                killer.join()
                pullers = []
            else:
                self.verify(pulled, rnd)
                self.fp.throttle(RATE, prefix="/v2/crash/")
                img, pullers = self.load(rnd)
                self.kill_at(point, rnd, img, pullers, rng)
                pulled += objects_of(img)
            for p in pullers:
                p.join(30)
                self.assertFalse(p.is_alive(), "a client hung after the kill")
                for obj, r in p.results:
                    if r.complete:
                        self.stats["complete_under_load"] += 1
                        self.assertEqual(r.digest, obj.blob.digest,
                                         "WRONG BYTES served under load in round %d: %r %r%s"
                                         % (rnd, obj, r, self.ctx()))
                    elif r.status is not None:
                        self.stats["cut_under_load"] += 1
            if VERBOSE:
                sys.stderr.write("\n  round %2d %-13s start %.2fs total %.2fs" % (
                    rnd, point, t_start, time.monotonic() - t0))
        self.fp.clear_faults()
        self.start(ROUNDS)
        self.check_store(ROUNDS)
        self.verify(pulled, ROUNDS)
        self.assertEqual(self.am.stop(), 0)
        sys.stderr.write("\n  %d kills in %.1fs; blob GETs after restarts: %s\n" % (
            ROUNDS, time.monotonic() - t_all, self.stats))
        self.assertGreater(self.stats["miss"], 0, "no blob was ever refetched after a kill: "
                           "the kills never hit a fetch in progress")


if __name__ == "__main__":
    testbase.main()

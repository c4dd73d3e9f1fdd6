#!/usr/bin/python3
"""deploy/bench/eksbench.py — what a bench Job runs on one node type (c7g or c7i): loadgen
against that node type's archmirror and against the upstream directly (each through its
own relay link, bench/relay.py), cold and warm, in rounds; writes the same JSON document
bench/run writes (meta, summary, results with loadgen's own JSON per row, failures, seed).

    eksbench.py --node-type c7g --archmirror http://archmirror-c7g:5000 \\
        --upstream http://relay-c7g:7002 --relay-control http://relay-c7g:7000 \\
        --registry http://bench-upstream:5000 --out /results/c7g.json

Scenarios (names as in bench/run; --scenarios picks a subset):
  cold-single      1 node (this node's platform) pulls a bench/cold-NNN image the mirror has
                   never seen; targets archmirror and upstream (straight through the relay)
  warm-single      the same image again, right after
  cold-herd-N      N nodes (linux/arm64:30,linux/amd64:70) pull one never-seen image at once
  warm-herd-N      the same image again
  cold-single-rtt100  cold-single with the relay at 100 ms (not in the default set)
  manifest-get-cC, manifest-head-cC   warm manifest GET/HEAD at concurrency C (archmirror)
  blob-1m, blob-64m                   warm blob GET, c=4 / c=1 (archmirror)
Every cold archmirror row is checked against the relay's counters: if the mirror fetched
less than the image from upstream, it was not cold, and the run lists a failure.

The JSON goes to --out and to stdout between two marker lines (kitlib.BEGIN/END), so
`kubectl logs` alone recovers it; --linger keeps the pod alive for `kubectl cp`.
Python 3 standard library only; needs bench/run and tests/integration/harness next to it
(the bench image has them, deploy/bench/Dockerfile).
"""
import argparse
import datetime
import json
import os
import platform
import ssl
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kitlib  # noqa: E402

DEFAULT_SCENARIOS = ["cold-single", "warm-single", "cold-herd-16", "warm-herd-16",
                     "manifest-get-c1", "manifest-get-c16", "manifest-head-c16",
                     "blob-1m", "blob-64m"]


def log(msg):
    print("eksbench %s: %s" % (time.strftime("%H:%M:%S"), msg), file=sys.stderr, flush=True)


def native_platform():
    m = platform.machine()
    return {"aarch64": "linux/arm64", "arm64": "linux/arm64",
            "x86_64": "linux/amd64", "amd64": "linux/amd64"}.get(m, "linux/" + m)


def cpu_features():
    """The CPU flags that decide OpenSSL's sha256 path: sha_ni (x86 SHA extensions) or
    sha2 (ARMv8 SHA-2 instructions), plus what /proc/cpuinfo calls the CPU."""
    out = {"machine": platform.machine()}
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return out
    flags = set()
    for line in text.splitlines():
        k, _, v = line.partition(":")
        k = k.strip().lower()
        if k in ("flags", "features"):
            flags |= set(v.split())
        elif k in ("model name", "cpu part", "cpu implementer") and k not in out:
            out[k] = v.strip()
    out["sha256_extensions"] = sorted(flags & {"sha_ni", "sha2", "sha512", "sha3"})
    out["aes_extensions"] = sorted(flags & {"aes", "vaes", "pmull", "vpclmulqdq"})
    out["avx512f"] = "avx512f" in flags
    return out


def openssl_speed():
    """`openssl speed -evp` for sha256 (digest verification on a cold miss) and
    aes-128-gcm (TLS bulk, for a real upstream), one core, 16 KiB blocks: bytes/s, on
    this node (the bench image has the openssl CLI; the product image does not)."""
    out = {}
    for alg in ("sha256", "aes-128-gcm"):
        try:
            cp = subprocess.run(["openssl", "speed", "-seconds", "1", "-bytes", "16384",
                                 "-evp", alg], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as e:
            out[alg] = {"error": str(e)}
            continue
        val = None
        for line in cp.stdout.splitlines():
            parts = line.split()
            if parts and parts[-1].endswith("k") and alg.split("-")[0] in line.lower():
                try:
                    val = float(parts[-1][:-1]) * 1000
                except ValueError:
                    pass
        out[alg] = {"bytes_per_s": val, "output_tail": cp.stdout.strip().splitlines()[-2:]}
    return out


class Relay:
    """The relay's control port (bench/relay.py: GET /stats, POST /reset, POST /config)."""

    def __init__(self, url):
        self.url = url

    def _req(self, method, path):
        st, _, body = kitlib.request(self.url, method, path, timeout=10)
        if st != 200:
            raise RuntimeError("relay %s %s: HTTP %d" % (method, path, st))
        return json.loads(body)

    def stats(self):
        return self._req("GET", "/stats")

    def reset(self):
        self._req("POST", "/reset")

    def set(self, rtt_ms=None, mbps=None):
        q = []
        if rtt_ms is not None:
            q.append("rtt_ms=%s" % rtt_ms)
        if mbps is not None:
            q.append("mbps=%s" % mbps)
        return self._req("POST", "/config?" + "&".join(q))

    def wait_quiet(self, link, timeout=10):
        """As bench/run: read the counters once the link has been quiet for 0.3 s."""
        deadline = time.time() + timeout
        last = None
        while time.time() < deadline:
            s = self.stats()["links"][link]
            cur = (s["down_bytes"], s["requests"])
            if cur == last:
                return s
            last = cur
            time.sleep(0.3)
        return self.stats()["links"][link]


class Kit:
    def __init__(self, a):
        self.a = a
        self.br = kitlib.bench_run()
        self.results = []
        self.failures = []
        self.relay = Relay(a.relay_control) if a.relay_control else None
        self.targets = {"archmirror": (a.archmirror, a.link_archmirror),
                        "upstream": (a.upstream, a.link_upstream)}
        self.cold_used = 0
        self.speed = None

    # -- plumbing ----------------------------------------------------------------------
    def loadgen(self, target, args, label=None):
        url = self.targets[target][0]
        argv = [self.a.loadgen, "--target", "%s=%s" % (target, url)] + [str(x) for x in args]
        if label:
            argv += ["--label", label]
        cp = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            timeout=self.a.timeout + 60)
        try:
            return json.loads(cp.stdout)[0]
        except (ValueError, IndexError):
            raise RuntimeError("loadgen failed (%d): %s\n%s" % (cp.returncode, " ".join(argv),
                                                                cp.stderr[-3000:]))

    def measure(self, scenario, round_no, target, args, kind, settle=False, extra=None):
        """One row, in bench/run's shape (Bench.measure)."""
        link = self.targets[target][1] if self.relay else None
        if self.relay:
            self.relay.reset()
        t0 = time.time()
        out = self.loadgen(target, args, label=scenario)
        elapsed = time.time() - t0
        up = None
        if link:
            up = self.relay.wait_quiet(link) if settle else self.relay.stats()["links"][link]
        row = {"scenario": scenario, "round": round_no, "target": target, "kind": kind,
               "elapsed_s": elapsed, "loadgen": out,
               # The mirror runs in another pod: its RSS is not visible from here
               # (kubectl top / Container Insights; its CPU: run.sh reads cpu.stat).
               "peak_rss_kib": None, "rss_during_kib": None, "upstream": up,
               "node_type": self.a.node_type}
        if extra:
            row.update(extra)
        if out.get("errors"):
            self.failures.append("%s round %d %s: %d errors, e.g. %s" % (
                scenario, round_no, target, out["errors"], (out.get("error_examples") or [""])[0]))
        self.results.append(row)
        log("%-20s r%d %-10s %s" % (scenario, round_no, target, self.br.Bench.brief(row)))
        return row

    def order(self, names, round_no):
        k = (round_no - 1) % len(names)
        return names[k:] + names[:k]

    def next_cold(self):
        cold = self.seed.get("cold") or []
        if self.cold_used >= len(cold):
            raise RuntimeError("out of cold images: the seed has %d; seed more with "
                               "seed.py --cold-images (rounds x cold scenarios)" % len(cold))
        self.cold_used += 1
        return cold[self.cold_used - 1]

    def pull_args(self, ref, nodes, platforms):
        return ["--mode", "pull", "--image", ref, "--nodes", nodes, "--platforms", platforms,
                "--timeout", self.a.timeout, "--max-samples", self.a.max_samples]

    # -- set-up ------------------------------------------------------------------------
    def setup(self):
        a = self.a
        if not a.no_openssl_speed:
            self.speed = openssl_speed()
        self.seed = kitlib.fetch_seed(a.registry, timeout=a.wait_seed, log=log)
        if self.seed is None:
            raise RuntimeError("no seed in %s after %d s: run the seed Job first "
                               "(deploy/bench/README.md)" % (a.registry, a.wait_seed))
        kitlib.wait_http(a.archmirror, "/readyz", timeout=a.wait_ready, what="archmirror", log=log)
        if self.relay:
            kitlib.wait_http(a.relay_control, "/stats", timeout=a.wait_ready, what="relay", log=log)
            self.relay.set(rtt_ms=a.rtt_ms, mbps=a.mbps)
        kitlib.wait_http(a.upstream, "/v2/", timeout=a.wait_ready, what="upstream link", log=log)
        # Warm the mirror for the warm serving scenarios (bench/run's Bench.warm): the bench
        # image on both platforms and the two blobs, once.
        m = self.seed["multi"]
        self.loadgen("archmirror", ["--mode", "pull", "--image", m["ref"], "--nodes", 2,
                                    "--platforms", "linux/amd64:1,linux/arm64:1",
                                    "--timeout", a.timeout])
        for k in ("1m", "64m"):
            self.loadgen("archmirror", ["--mode", "get", "--path",
                                        "/v2/bench/blobs/blobs/" + self.seed["blobs"][k],
                                        "--duration", 0.1, "--warmup", 0])

    # -- scenarios ---------------------------------------------------------------------
    def pulls(self, sel):
        a = self.a
        plans = []
        if "cold-single" in sel or "warm-single" in sel:
            plans.append(("single", 1, "%s:1" % a.platform, a.rtt_ms))
        if "cold-single-rtt100" in sel:
            plans.append(("single-rtt100", 1, "%s:1" % a.platform, 100))
        for s in sel:
            if s.startswith(("cold-herd-", "warm-herd-")):
                n = int(s.rsplit("-", 1)[1])
                if "herd-%d" % n not in [p[0] for p in plans]:
                    plans.append(("herd-%d" % n, n, self.br.PLATFORMS, a.rtt_ms))
        for name, nodes, plats, rtt in plans:
            if self.relay:
                self.relay.set(rtt_ms=rtt)
            cold_sc = "cold-" + name
            warm_sc = "warm-" + name if name != "single-rtt100" else None
            for r in range(1, a.rounds + 1):
                img = self.next_cold()
                order = self.order(["archmirror", "upstream"], r)
                extra = {"rtt_ms": rtt, "nodes": nodes, "image": img["ref"]}
                if cold_sc in sel:
                    for t in order:
                        row = self.measure(cold_sc, r, t, self.pull_args(img["ref"], nodes, plats),
                                           "pull", settle=True, extra=extra)
                        self.check_cold(row)
                else:
                    # The warm pull still needs the mirror to have fetched the image once.
                    self.loadgen("archmirror", self.pull_args(img["ref"], nodes, plats))
                if warm_sc and warm_sc in sel:
                    for t in order:
                        self.measure(warm_sc, r, t, self.pull_args(img["ref"], nodes, plats),
                                     "pull", settle=True, extra=extra)
        if self.relay:
            self.relay.set(rtt_ms=a.rtt_ms)

    def check_cold(self, row):
        up = row["upstream"]
        o = row["loadgen"]
        if row["target"] != "archmirror" or up is None or not o.get("image_bytes"):
            return
        ratio = up["down_body_bytes"] / o["image_bytes"]
        if ratio < 0.99:
            self.failures.append(
                "%s round %d: archmirror was not cold (fetched %.2f x the image from upstream): "
                "restart the mirror (kubectl -n archmirror-bench rollout restart statefulset) "
                "or seed more cold images" % (row["scenario"], row["round"], ratio))

    def simple(self, sel):
        a = self.a
        m = self.seed["multi"]
        mpath = "/v2/bench/multi/manifests/" + m["manifests"]["linux/amd64"]
        plans = []
        for s in sel:
            for mode in ("get", "head"):
                p = "manifest-%s-c" % mode
                if s.startswith(p):
                    plans.append((s, mode, mpath, int(s[len(p):]), self.br.ACCEPT))
        if "blob-1m" in sel:
            plans.append(("blob-1m", "get", "/v2/bench/blobs/blobs/" + self.seed["blobs"]["1m"],
                          4, None))
        if "blob-64m" in sel:
            plans.append(("blob-64m", "get", "/v2/bench/blobs/blobs/" + self.seed["blobs"]["64m"],
                          1, None))
        for s, mode, path, conc, accept in plans:
            for r in range(1, a.rounds + 1):
                args = ["--mode", mode, "--path", path, "--concurrency", conc,
                        "--duration", a.duration, "--warmup", a.warmup]
                if accept:
                    args += ["--accept", accept]
                self.measure(s, r, "archmirror", args, "simple",
                             extra={"concurrency": conc, "mode": mode})

    def meta(self, sel, t_start):
        a = self.a
        return {
            "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "mode": "eks",
            "node_type": a.node_type, "instance_type": os.environ.get("INSTANCE_TYPE"),
            "node_name": os.environ.get("NODE_NAME"), "pod_name": os.environ.get("POD_NAME"),
            "platform": a.platform, "rounds": a.rounds, "rtt_ms": a.rtt_ms, "mbps": a.mbps,
            "relay": bool(self.relay), "duration_s": a.duration, "warmup_s": a.warmup,
            "scenarios": sel, "targets": {k: v[0] for k, v in self.targets.items()},
            "machine": self.br.machine(), "cpu": cpu_features(),
            "loadgen_openssl": ssl.OPENSSL_VERSION, "openssl_speed": self.speed,
            "wall_s": time.time() - t_start,
            "note": "loadgen runs on a node of this type; archmirror on another node of the "
                    "same type; the upstream registry and the relay on the infra node",
        }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--node-type", required=True, help="label of this run: c7g, c7i, ...")
    ap.add_argument("--archmirror", required=True, help="this node type's archmirror URL")
    ap.add_argument("--upstream", required=True,
                    help="the upstream as a client reaches it directly (the relay's upstream link)")
    ap.add_argument("--registry", required=True, help="the upstream registry itself (seed marker)")
    ap.add_argument("--relay-control", default="",
                    help="relay control URL; empty: no relay (real upstream, no byte counts)")
    ap.add_argument("--link-archmirror", default="archmirror", help="relay link of archmirror")
    ap.add_argument("--link-upstream", default="upstream", help="relay link of the direct target")
    ap.add_argument("--platform", default=native_platform(), help="single-pull node platform")
    ap.add_argument("--scenarios", default=",".join(DEFAULT_SCENARIOS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per get/head scenario")
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--rtt-ms", type=float, default=20.0, help="relay RTT (bench/run's default)")
    ap.add_argument("--mbps", type=float, default=1000.0, help="relay link, 0 = unlimited")
    ap.add_argument("--timeout", type=float, default=600, help="loadgen --timeout")
    ap.add_argument("--max-samples", type=int, default=2000, help="loadgen --max-samples")
    ap.add_argument("--loadgen", default=os.environ.get("AM_LOADGEN", "/usr/local/bin/loadgen"))
    ap.add_argument("--out", default="", help="also write the JSON here")
    ap.add_argument("--wait-seed", type=float, default=1800, help="seconds to wait for the seed")
    ap.add_argument("--wait-ready", type=float, default=600)
    ap.add_argument("--no-openssl-speed", action="store_true",
                    help="skip the `openssl speed` sha256/aes-128-gcm sample of this node")
    ap.add_argument("--linger", type=float, default=0,
                    help="seconds to stay alive after writing --out (for kubectl cp)")
    a = ap.parse_args(argv)
    sel = [s for s in a.scenarios.split(",") if s]
    t_start = time.time()
    kit = Kit(a)
    error = None
    try:
        kit.setup()
        kit.pulls(sel)
        kit.simple(sel)
    except Exception as e:  # still write what was measured
        error = "%s: %s" % (type(e).__name__, e)
        kit.failures.append(error)
        log("stopped: " + error)
    doc = {"meta": kit.meta(sel, t_start), "summary": kit.br.summarize(kit.results),
           "results": kit.results, "failures": kit.failures,
           "seed": getattr(kit, "seed", None)}
    text = json.dumps(doc, indent=1)
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            f.write(text + "\n")
    sys.stdout.write(kitlib.BEGIN % a.node_type + "\n" + text + "\n" + kitlib.END % a.node_type + "\n")
    sys.stdout.flush()
    for f_ in kit.failures[:20]:
        log("failure: " + f_)
    log("done in %.0f s, %d measurements, %d failures%s" % (
        time.time() - t_start, len(kit.results), len(kit.failures),
        (", JSON in " + a.out) if a.out else ""))
    if a.linger > 0 and a.out:
        log("lingering %.0f s: kubectl cp <namespace>/<this pod>:%s ./%s.json"
            % (a.linger, a.out, a.node_type))
        time.sleep(a.linger)
    return 1 if kit.failures else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/python3
"""deploy/bench/rehearse.py — the EKS bench's moving parts, on this machine's loopback.

    deploy/bench/rehearse.py --out /tmp/rehearsal [--archmirror build/dev/archmirror]
                             [--loadgen build/dev/bench/loadgen]

Runs, with the same scripts the cluster runs (nothing here is a copy): docker-registry
(the bench upstream), deploy/bench/seed.py against it, bench/relay.py on loopback, archmirror with its upstream on the relay's
"archmirror" link, then deploy/bench/eksbench.py twice (labelled "first" and "second":
both on THIS machine, so their ratio only shows the noise of a run) and
deploy/bench/compare.py on the two JSON files. Small images and short runs (~15 s here).

It proves the kit's plumbing (seed marker, relay links, cold check, JSON, compare) and
measures nothing about c7g or c7i. Every process is on 127.0.0.1 and stopped by PID.
tests/integration/test_deploy.py runs it when bench/loadgen is built.
"""
import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))
from harness import proc, registry  # noqa: E402

PY = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable


def run(argv, log_path, timeout):
    with open(log_path, "w") as err:
        cp = subprocess.run(argv, stdout=subprocess.PIPE, stderr=err, text=True, timeout=timeout)
    if cp.returncode not in (0, 1):
        with open(log_path) as f:
            raise RuntimeError("%s exited %d:\n%s" % (argv[1], cp.returncode, f.read()[-3000:]))
    return cp


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="work dir: logs, first.json, second.json, compare.md")
    ap.add_argument("--archmirror", default=os.environ.get(
        "ARCHMIRROR_BIN", os.path.join(ROOT, "build", "dev", "archmirror")))
    ap.add_argument("--loadgen", default=os.environ.get(
        "AM_LOADGEN", os.path.join(ROOT, "build", "dev", "bench", "loadgen")))
    ap.add_argument("--scenarios", default="cold-single,warm-single,cold-herd-4,warm-herd-4,"
                                           "manifest-get-c4,blob-1m")
    ap.add_argument("--rtt-ms", default="5")
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    for b in (a.archmirror, a.loadgen):
        if not os.access(b, os.X_OK):
            sys.exit("rehearse: %s is not built" % b)
    up = registry.Registry(a.out, name="bench-upstream").start()
    relay = am = None
    try:
        run([PY, os.path.join(HERE, "seed.py"), "--registry", up.url, "--cold-images", "4",
             "--layers", "0.25,0.25,0.5", "--work", os.path.join(a.out, "seed")],
            os.path.join(a.out, "seed.log"), 300)
        ctl, l_mirror, l_up = proc.free_port(), proc.free_port(), proc.free_port()
        relay = proc.spawn([PY, os.path.join(ROOT, "bench", "relay.py"), "--upstream", up.hostport,
                            "--listen", "archmirror=%d" % l_mirror, "--listen", "upstream=%d" % l_up,
                            "--control", str(ctl), "--rtt-ms", a.rtt_ms, "--mbps", "1000"],
                           "relay", a.out)
        for p in (ctl, l_mirror, l_up):
            proc.wait_port(p, proc=relay)
        am_port = proc.free_port()
        cfg = os.path.join(a.out, "archmirror.json")
        with open(os.path.join(HERE, "kubernetes", "mirror", "c7g", "archmirror.json")) as f:
            c = json.load(f)
        c.update({"listen": ["127.0.0.1:%d" % am_port],
                  "data_dir": os.path.join(a.out, "archmirror-data"),
                  "upstreams": [{"name": "docker.io", "url": "http://127.0.0.1:%d" % l_mirror}]})
        with open(cfg, "w") as f:
            json.dump(c, f, indent=1)
        am = proc.spawn([a.archmirror, "--config", cfg], "archmirror", a.out)
        proc.wait_http_ready(am_port, "/readyz", proc=am, timeout=30)
        docs = []
        for label in ("first", "second"):
            out = os.path.join(a.out, label + ".json")
            cp = run([PY, os.path.join(HERE, "eksbench.py"), "--node-type", label,
                      "--archmirror", "http://127.0.0.1:%d" % am_port,
                      "--upstream", "http://127.0.0.1:%d" % l_up,
                      "--relay-control", "http://127.0.0.1:%d" % ctl,
                      "--registry", up.url, "--loadgen", a.loadgen, "--rounds", "1",
                      "--scenarios", a.scenarios, "--duration", "0.3", "--warmup", "0.1",
                      "--rtt-ms", a.rtt_ms, "--out", out, "--wait-seed", "10"],
                     os.path.join(a.out, label + ".log"), 300)
            with open(os.path.join(a.out, label + ".stdout"), "w") as f:
                f.write(cp.stdout)
            docs.append(out)
            # The second run needs never-seen images too: the seed has 4 cold images,
            # two per run (cold-single, cold-herd-4); restart the mirror empty anyway, as
            # the README says to between runs.
            am.stop()
            subprocess.run(["rm", "-rf", c["data_dir"]], check=True)
            am = proc.spawn([a.archmirror, "--config", cfg], "archmirror", a.out)
            proc.wait_http_ready(am_port, "/readyz", proc=am, timeout=30)
        cp = subprocess.run([PY, os.path.join(HERE, "compare.py"), docs[0], docs[1],
                             "--out", os.path.join(a.out, "compare.md")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=60)
        if cp.returncode != 0:
            raise RuntimeError("compare.py: %s" % cp.stderr)
        sys.stdout.write(cp.stdout)
    finally:
        for p in (am, relay):
            if p is not None:
                p.stop()
        up.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

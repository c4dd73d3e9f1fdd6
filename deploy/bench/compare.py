#!/usr/bin/python3
"""deploy/bench/compare.py — two bench results (c7g and c7i) side by side, as Markdown.

    compare.py results/c7g.json results/c7i.json [--out compare.md]

Each input is the JSON a bench Job wrote (deploy/bench/eksbench.py; bench/run's format:
meta, summary, results with loadgen's JSON per row), or a saved `kubectl logs` of the Job,
from which the JSON between the BEGIN/END marker lines is taken.

Per scenario and target, the headline metric is the one bench/run uses (primary()):
pull p50 for pulls (lower is better), MB/s for blob-* (higher), p50 for tag-* (lower),
req/s otherwise (higher); the value is the median over the rounds. The ratio column is
in the "better" direction, as everywhere in bench/: **> 1 means the first file (c7g)
did better**, < 1 means the second (c7i) did. The two runs were measured at different
times on different nodes, so the ratio is of medians, not per round.

Python 3 standard library only.
"""
import argparse
import json
import re
import statistics
import sys

MARK = re.compile(r"^----- (BEGIN|END) archmirror-bench-json (\S+) -----$")


def load(path):
    """The result document in path: a JSON file, or a log containing the markers."""
    with open(path) as f:
        text = f.read()
    s = text.lstrip()
    if s.startswith("{"):
        return json.loads(s)
    inside, lines = False, []
    for line in text.splitlines():
        m = MARK.match(line.strip())
        if m and m.group(1) == "BEGIN":
            inside, lines = True, []
        elif m and m.group(1) == "END" and inside:
            return json.loads("\n".join(lines))
        elif inside:
            lines.append(line)
    raise ValueError("%s: neither JSON nor a log with archmirror-bench-json markers" % path)


def primary(row):
    """(value, unit, higher_is_better): the same choice as bench/run's primary()."""
    o = row["loadgen"]
    sc = row["scenario"]
    if o["mode"] == "pull":
        return o["pull_latency_s"]["p50"], "s", False
    if o["mode"] == "idle":
        return (row.get("peak_rss_kib") or 0) / 1024, "MiB", False
    if sc.startswith("blob-"):
        return o["bytes_per_s"] / 1e6, "MB/s", True
    if sc.startswith("tag-"):
        return o["request_latency_s"]["p50"], "s", False
    return o["req_per_s"], "req/s", True


def p99(row):
    o = row["loadgen"]
    if o["mode"] == "pull":
        return o["pull_latency_s"]["p99"]
    if o["mode"] in ("get", "head"):
        return o["request_latency_s"]["p99"]
    return None


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def per_key(doc):
    """{(scenario, target): {value, unit, higher, p99, rounds, errors, up_ratio}} in order."""
    groups = {}
    for row in doc.get("results") or []:
        groups.setdefault((row["scenario"], row["target"]), []).append(row)
    out = {}
    for key, rows in groups.items():
        vals = [primary(r) for r in rows]
        ups = [r["upstream"]["down_body_bytes"] / r["loadgen"]["image_bytes"]
               for r in rows if r.get("upstream") and r["loadgen"].get("image_bytes")]
        out[key] = {"value": med([v[0] for v in vals]), "unit": vals[0][1],
                    "higher": vals[0][2], "p99": med([p99(r) for r in rows]),
                    "rounds": len(rows), "errors": sum(r["loadgen"].get("errors", 0) for r in rows),
                    "up_ratio": med(ups)}
    return out


def ratio(a, b, higher):
    """a vs b in the better direction (> 1: a better); None if either is missing or 0."""
    if not a or not b:
        return None
    return a / b if higher else b / a


def fmt(v, unit):
    if v is None:
        return "–"
    if unit == "s":
        if v < 0.001:
            return "%.3f ms" % (v * 1e3)
        return "%.1f ms" % (v * 1e3) if v < 10 else "%.1f s" % v
    if unit == "req/s":
        return "%.0f req/s" % v
    if unit == "MB/s":
        return "%.0f MB/s" % v
    if unit == "MiB":
        return "%.1f MiB" % v
    return "%g %s" % (v, unit)


def fr(x):
    return "–" if x is None else "%.2f" % x


def metric_name(scenario, unit):
    if unit == "s":
        return "pull p50" if scenario.startswith(("cold-", "warm-", "fleet-")) else "p50"
    return unit


def compare(doc_a, doc_b):
    """Rows of the main table: one per (scenario, target) measured in both."""
    ka, kb = per_key(doc_a), per_key(doc_b)
    rows = []
    for key in list(ka) + [k for k in kb if k not in ka]:
        if key not in ka or key not in kb:
            continue
        a, b = ka[key], kb[key]
        rows.append({"scenario": key[0], "target": key[1], "unit": a["unit"],
                     "higher": a["higher"], "a": a["value"], "b": b["value"],
                     "ratio": ratio(a["value"], b["value"], a["higher"]),
                     "p99_a": a["p99"], "p99_b": b["p99"], "rounds_a": a["rounds"],
                     "rounds_b": b["rounds"], "errors": a["errors"] + b["errors"],
                     "up_a": a["up_ratio"], "up_b": b["up_ratio"]})
    return rows


def mirror_vs_upstream(doc):
    """{scenario: archmirror vs upstream (> 1: the mirror is better)} on one node type."""
    k = per_key(doc)
    out = {}
    for (sc, t), d in k.items():
        if t == "archmirror" and (sc, "upstream") in k:
            out[sc] = ratio(d["value"], k[(sc, "upstream")]["value"], d["higher"])
    return out


def cpu_seconds(doc):
    c = (doc.get("meta") or {}).get("mirror_cpu") or {}
    try:
        return (c["after_usec"] - c["before_usec"]) / 1e6
    except (KeyError, TypeError):
        return None


def describe(doc):
    m = doc.get("meta") or {}
    mach = m.get("machine") or {}
    lscpu = mach.get("lscpu") or {}
    cpu = m.get("cpu") or {}
    speed = m.get("openssl_speed") or {}

    def gbs(alg):
        v = (speed.get(alg) or {}).get("bytes_per_s")
        return "%.2f GB/s" % (v / 1e9) if v else "–"
    return {
        "sha_speed": gbs("sha256"), "aes_speed": gbs("aes-128-gcm"),
        "instance": m.get("instance_type") or "?",
        "cpu": lscpu.get("Model name") or cpu.get("model name") or cpu.get("cpu part") or "?",
        "vcpus": "%s (threads per core %s)" % (lscpu.get("CPU(s)", "?"),
                                             lscpu.get("Thread(s) per core", "?")),
        "sha": ", ".join(cpu.get("sha256_extensions") or []) or "none seen",
        "openssl": m.get("loadgen_openssl") or "?",
        "kernel": mach.get("kernel") or "?",
        "link": ("relay RTT %g ms, %g Mbit/s" % (m.get("rtt_ms", 0), m.get("mbps", 0))
                 if m.get("relay") else "no relay (real upstream)"),
        "date": m.get("date") or "?",
        "failures": str(len(doc.get("failures") or [])),
    }


def markdown(doc_a, doc_b, la, lb):
    da, db = describe(doc_a), describe(doc_b)
    out = ["# archmirror on EKS: %s vs %s" % (la, lb), "",
           "| | %s | %s |" % (la, lb), "|---|---|---|"]
    for k, title in (("instance", "instance type"), ("cpu", "CPU"), ("vcpus", "vCPUs"),
                     ("sha", "SHA extensions (/proc/cpuinfo)"), ("openssl", "OpenSSL (bench image)"),
                     ("sha_speed", "openssl speed -evp sha256, 1 core"),
                     ("aes_speed", "openssl speed -evp aes-128-gcm, 1 core"),
                     ("kernel", "kernel"), ("link", "upstream link"), ("date", "measured"),
                     ("failures", "failures")):
        out.append("| %s | %s | %s |" % (title, da[k], db[k]))
    out += ["", "Median over rounds. Ratio > 1: %s did better; < 1: %s did better." % (la, lb), "",
            "| scenario | target | metric | %s | %s | %s vs %s | p99 %s | p99 %s | upstream bytes ÷ image %s / %s | rounds |"
            % (la, lb, la, lb, la, lb, la, lb),
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in compare(doc_a, doc_b):
        unit = r["unit"]
        p_unit = "s"
        out.append("| %s | %s | %s | %s | %s | %s | %s | %s | %s / %s | %d / %d |" % (
            r["scenario"], r["target"], metric_name(r["scenario"], unit), fmt(r["a"], unit),
            fmt(r["b"], unit), fr(r["ratio"]), fmt(r["p99_a"], p_unit), fmt(r["p99_b"], p_unit),
            fr(r["up_a"]), fr(r["up_b"]), r["rounds_a"], r["rounds_b"]))
    ma, mb = mirror_vs_upstream(doc_a), mirror_vs_upstream(doc_b)
    scs = [s for s in ma if s in mb]
    if scs:
        out += ["", "archmirror vs pulling straight from the upstream, on each node type "
                "(> 1: the mirror is faster):", "",
                "| scenario | %s | %s |" % (la, lb), "|---|---|---|"]
        for s in scs:
            out.append("| %s | %s | %s |" % (s, fr(ma[s]), fr(mb[s])))
    ca, cb = cpu_seconds(doc_a), cpu_seconds(doc_b)
    if ca is not None and cb is not None:
        out += ["", "archmirror's CPU time during the whole Job (cgroup cpu.stat, same work on "
                "both; > 1: %s used less):" % la, "",
                "| | %s | %s | %s vs %s |" % (la, lb, la, lb), "|---|---|---|---|",
                "| archmirror CPU seconds | %.2f | %.2f | %s |" % (ca, cb, fr(ratio(ca, cb, False)))]
    for label, doc in ((la, doc_a), (lb, doc_b)):
        for f in (doc.get("failures") or [])[:10]:
            out.append("- %s failure: %s" % (label, f))
    return "\n".join(out) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("first", help="c7g result (JSON or kubectl log)")
    ap.add_argument("second", help="c7i result (JSON or kubectl log)")
    ap.add_argument("--labels", help="two labels, comma-separated (default: meta.node_type)")
    ap.add_argument("--out", help="write the Markdown here as well as to stdout")
    a = ap.parse_args(argv)
    da, db = load(a.first), load(a.second)
    if a.labels:
        la, lb = a.labels.split(",", 1)
    else:
        la = (da.get("meta") or {}).get("node_type") or "first"
        lb = (db.get("meta") or {}).get("node_type") or "second"
    md = markdown(da, db, la, lb)
    if a.out:
        with open(a.out, "w") as f:
            f.write(md)
    sys.stdout.write(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

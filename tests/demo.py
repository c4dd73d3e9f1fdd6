#!/usr/bin/python3
"""archmirror demo, offline: a local registry, archmirror in front of it, containerd
pulling through archmirror for linux/arm64 — and a readable tour of what happened.

    /usr/bin/python3 tests/demo.py --archmirror ./build/dev/archmirror [--keep]

Wiring (every port is a free loopback port):

    ctr/containerd --> [tap A] --> archmirror --> [tap B] --> docker-registry
                        hosts.toml                  --upstream example.com=<tap B>
                        server = a dead port

Taps are counting HTTP proxies from the integration harness, so the tour can show
what the node asked for and what actually reached the upstream.
"""
import argparse
import json
import subprocess
import os
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "integration"))
from harness import httpc, archmirror, containerd, faultproxy, images, proc, registry  # noqa: E402

PLATFORM = "linux/arm64"


def short(d):
    return d[:19] + "…" if d and len(d) > 20 else str(d)


def say(*a):
    print(*a, flush=True)


def section(title):
    say("")
    say("== " + title + " " + "=" * max(0, 70 - len(title)))


def names_for(seeded):
    """digest -> human label, for the request listing."""
    out = {}
    for key, (repo, tag, img) in seeded.items():
        out[img["top"].digest] = "%s %s" % (key, img["kind"])
        for plat, c in img["children"].items():
            out[c["manifest"].digest] = "%s %s manifest" % (key, plat)
            out[c["config"].digest] = "%s %s config" % (key, plat)
            for i, l in enumerate(c["layers"]):
                out[l.digest] = "%s %s layer%d" % (key, plat, i)
        if "image" in img:
            out[img["image"]["config"].digest] = "%s config" % key
            for i, l in enumerate(img["image"]["layers"]):
                out[l.digest] = "%s layer%d" % (key, i)
    return out


def show_requests(tap, labels, indent="    "):
    reqs = tap.requests()
    if not reqs:
        say(indent + "(none)")
    for e in reqs:
        path = e["path"]
        what = ""
        for d, lab in labels.items():
            if path.endswith(d):
                what = "  <- " + lab
                path = path.replace(d, short(d))
                break
        q = "?" + e["target"].split("?", 1)[1] if "?" in e["target"] else ""
        say("%s%-4s %s%s -> %s%s" % (indent, e["method"], path, q, e["status"], what))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archmirror", default=os.environ.get("ARCHMIRROR_BIN",
                                                           archmirror.DEFAULT_BIN))
    ap.add_argument("--keep", action="store_true", help="keep the work dir")
    args = ap.parse_args()
    os.environ["ARCHMIRROR_BIN"] = os.path.abspath(args.archmirror)
    if not archmirror.available():
        say("archmirror binary not found: %s (run `make build`)" % args.archmirror)
        return 2
    wd = tempfile.mkdtemp(prefix="archmirror-demo-")
    stoppers = []
    ok = False
    try:
        section("1. upstream: a local docker-registry (distribution 2.8)")
        reg = registry.Registry(wd).start()
        stoppers.append(reg.stop)
        client = reg.client()
        multi = images.oci_index_image("demo-multi")
        single = images.docker_single_image("demo-single")
        client.push_image("library/multi", "1.0", multi)
        client.push_image("library/single", "1.0", single)
        seeded = {"multi": ("library/multi", "1.0", multi),
                  "single": ("library/single", "1.0", single)}
        labels = names_for(seeded)
        say("registry on %s, seeded with:" % reg.url)
        say("  example.com/library/multi:1.0   OCI index %s" % short(multi["top"].digest))
        for plat, c in multi["children"].items():
            say("      %-12s %s (%s)" % (plat, short(c["manifest"].digest),
                                        c["manifest"].media_type.rsplit(".", 2)[-2]))
        say("  example.com/library/single:1.0  Docker schema2 amd64 %s" % short(single["top"].digest))

        tap_b = faultproxy.FaultProxy("127.0.0.1", reg.port, name="tap-B").start()
        stoppers.append(tap_b.stop)

        section("2. archmirror")
        am = archmirror.Archmirror(wd, upstreams=[("example.com", tap_b.url)], log_level="info")
        am.start()
        stoppers.append(am.stop)
        say("$ " + " ".join(am.argv()))
        say("ready on %s (GET /v2/ -> 200, Docker-Distribution-API-Version: registry/2.0)" % am.url)

        tap_a = faultproxy.FaultProxy("127.0.0.1", am.port, name="tap-A").start()
        stoppers.append(tap_a.stop)

        section("3. containerd configured with archmirror as mirror")
        dead = proc.DeadPort()
        stoppers.append(dead.close)
        hosts = os.path.join(wd, "certs.d")
        path = containerd.write_hosts_toml(hosts, "example.com", dead.url, tap_a.url,
                                           platform=PLATFORM)
        say("%s:" % path)
        for line in open(path).read().splitlines():
            say("    " + line)
        say("(server is a dead port: anything that works came through archmirror)")
        ctd = containerd.Containerd(wd).start()
        stoppers.append(ctd.stop)

        results = {}
        for rnd in (1, 2):
            section("4.%d %s pull for %s" % (rnd, "first (cold)" if rnd == 1 else
                                              "second (fresh containerd store, warm mirror)",
                                              PLATFORM))
            tap_a.reset()
            tap_b.reset()
            if rnd == 2:
                ctd.stop()
                ctd.remove_state()
                ctd = containerd.Containerd(wd).start()
                stoppers.append(ctd.stop)
            for key in ("multi", "single"):
                repo, tag, img = seeded[key]
                ref = "example.com/%s:%s" % (repo, tag)
                pr = ctd.pull(ref, PLATFORM, hosts)
                if not pr.ok:
                    say("PULL FAILED: %r" % pr)
                    say("archmirror log tail:\n" + am.proc.tail())
                    return 1
                match = "== seeded" if pr.digest == img["top"].digest else "!= seeded (WRONG)"
                say("$ ctr images pull --platform %s --hosts-dir … %s" % (PLATFORM, ref))
                say("  -> %s in %.2fs, image digest %s %s" % ("ok", pr.duration, short(pr.digest), match))
                results[(rnd, key)] = pr.digest == img["top"].digest
            say("  containerd -> archmirror (what the node asked):")
            show_requests(tap_a, labels)
            say("  archmirror -> upstream registry (what reached the upstream):")
            show_requests(tap_b, labels)
            if rnd == 2:
                man = [e for e in tap_b.requests() if "/manifests/" in e["path"]]
                blobs = [e for e in tap_b.requests() if "/blobs/" in e["path"]]
                say("")
                say("  cache: %d manifest request(s) reached the upstream on the second pull%s"
                    % (len(man), " -> tags and manifests were CACHE HITS" if not man else ""))
                if blobs:
                    say("  (%d blob request(s) still went upstream: NOT expected, blobs are "
                        "cached)" % len(blobs))
                    results[(2, "blob-cache")] = False
                else:
                    say("  blobs were cache hits too: nothing reached the upstream")
        section("5. what archmirror knows about these images")
        for key in ("multi", "single"):
            ref = "example.com/library/%s:1.0" % key
            r = httpc.request(am.port, "GET", "/api/v1/platforms?image=" + ref)
            say("$ curl '%s/api/v1/platforms?image=%s'" % (am.url, ref))
            doc = json.loads(r.body)
            plats = ", ".join("/".join(x for x in (p["os"], p["architecture"], p.get("variant"))
                                       if x) for p in doc.get("platforms", []))
            say("  -> multiArch=%s platforms: %s" % (doc.get("multiArch"), plats))
        r = httpc.request(am.port, "GET", "/api/v1/pulls")
        say("$ curl %s/api/v1/pulls" % am.url)
        for p in json.loads(r.body).get("pulls", []):
            say("  -> %-36s %-12s pulls=%s nodes=%s" % (p.get("image"), p.get("platform"),
                                                       p.get("pulls"), p.get("nodes")))
        r = httpc.request(am.port, "GET", "/api/v1/readiness?target=linux/arm64")
        say("$ curl '%s/api/v1/readiness?target=linux/arm64'   # the migration work list" % am.url)
        for img in json.loads(r.body).get("images", []):
            say("  -> %s has only %s" % (img.get("image"), ", ".join(img.get("platforms", []))))
        say("$ echo example.com/library/multi:1.0 example.com/library/single:1.0 | "
            "archmirror audit --require linux/arm64 --server %s -" % am.url)
        audit = subprocess.run([os.environ["ARCHMIRROR_BIN"], "audit", "--require", "linux/arm64",
                                "--server", am.url, "-"],
                               input="example.com/library/multi:1.0 example.com/library/single:1.0",
                               capture_output=True, text=True, timeout=30)
        for line in audit.stdout.splitlines():
            say("  " + line)
        say("  (exit status %d: non-zero because an image misses linux/arm64)" % audit.returncode)
        results[(3, "audit-exit-1")] = audit.returncode == 1
        say("archmirror's log (diagnostics: warn — the node said linux/arm64):")
        for line in am.log().splitlines():
            if "variant of" in line:
                say("  " + line.split(" ", 2)[-1])
                break
        say("  (with --diagnostics enforce, and archmirror as the node's only host, that "
            "text is\n   the 409 reason phrase that ctr and the kubelet event show)")
        section("6. summary")
        for (rnd, key), good in sorted(results.items()):
            if key in ("multi", "single"):
                say("  pull %d %-6s digest matches seeded: %s" % (rnd, key, "yes" if good else "NO"))
            else:
                say("  check %-14s %s" % (key, "ok" if good else "FAILED"))
        ok = all(results.values())
        return 0 if ok else 1
    finally:
        section("stopping everything")
        for stop in reversed(stoppers):
            try:
                stop()
            except Exception as e:   # archmirror sanitizer/exit problems end up here
                say("  stop problem: %s" % e)
                ok = False
        proc.kill_all()
        if args.keep or not ok:
            say("work dir kept: %s" % wd)
        else:
            shutil.rmtree(wd, ignore_errors=True)
        say("done.")


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/python3
"""deploy/bench/seed.py — seeds the bench upstream (a docker-registry) with the harness's
own image set, then with the cold images the EKS bench Jobs pull, then pushes a marker.

    seed.py --registry http://bench-upstream:5000 [--cold-images 12] [--layers 1,2,4,8]

What it pushes (every byte is what `bench/run` pushes on a laptop, made by the same code,
bench/run's seed_upstream() and index_image(): incompressible random bytes, seeded by
name, so both node types and every re-run see identical images):

  bench/multi:1.0         OCI index, linux/amd64 + linux/arm64/v8 (+ attestation), 4 layers
                          of --layers MiB per platform (15 MiB per platform by default);
  bench/blobs             one 1 MiB and one 64 MiB blob (warm blob scenarios);
  bench/fleet-NNN:1.0     only with --fleet-images N (default 0: the EKS Jobs run no fleet);
  bench/cold-NNN:1.0      --cold-images images shaped like bench/multi, each with its own
                          bytes: every cold measurement pulls an image the mirror has never
                          seen (a Job cannot restart the mirror between rounds);
  bench/seed-info:<tag>   last, the marker: its config blob is the description (digests,
                          sizes, refs) that the bench Jobs read (deploy/bench/kitlib.py).

The description is also printed to stdout. Python 3 standard library only.
"""
import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kitlib  # noqa: E402


def log(msg):
    print("seed %s: %s" % (time.strftime("%H:%M:%S"), msg), file=sys.stderr, flush=True)


class Upstream:
    """What bench/run's seed_upstream() needs of its upstream: .client()."""

    def __init__(self, url):
        self.scheme, self.host, self.port = kitlib.split_url(url)

    def client(self):
        from harness import registry
        return registry.OCIClient(self.host, self.port, tls=self.scheme == "https",
                                  timeout=300)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--registry", required=True, help="the upstream registry, http://HOST:PORT")
    ap.add_argument("--cold-images", type=int, default=12,
                    help="distinct cold images (each bench Job uses rounds x cold scenarios)")
    ap.add_argument("--layers", default="1,2,4,8", help="MiB per layer, per platform")
    ap.add_argument("--fleet-images", type=int, default=0)
    ap.add_argument("--work", default=None, help="scratch dir (default: a temp dir)")
    ap.add_argument("--wait", type=float, default=300, help="seconds to wait for the registry")
    a = ap.parse_args(argv)
    br = kitlib.bench_run()
    from harness import images
    kitlib.wait_http(a.registry, "/v2/", ok=(200,), timeout=a.wait, what="registry", log=log)
    t0 = time.time()
    work = a.work or tempfile.mkdtemp(prefix="archmirror-bench-seed-")
    os.makedirs(work, exist_ok=True)
    ns = argparse.Namespace(work=work, layers=[float(x) for x in a.layers.split(",")],
                            fleet_images=a.fleet_images)
    up = Upstream(a.registry)
    # bench/run keeps a stamp in its work dir and skips seeding when it matches; a fresh
    # work dir always seeds (pushing blobs that exist is harmless).
    desc = br.seed_upstream(up, ns, os.path.join(work, "static"))
    sizes = [int(x * br.MiB) for x in ns.layers]
    c = up.client()
    cold = []
    for i in range(1, a.cold_images + 1):
        repo = "bench/cold-%03d" % i
        img = br.index_image("cold-%03d" % i, sizes)
        c.push_image(repo, "1.0", img)
        cold.append({"ref": repo + ":1.0", "index_digest": img["top"].digest,
                     "bytes": {p: img["children"][p]["manifest"].size +
                               sum(b.size for b in img["children"][p]["blobs"])
                               for p in ("linux/amd64", "linux/arm64")}})
        log("pushed %s" % cold[-1]["ref"])
    desc["cold"] = cold
    desc["kit"] = {"version": kitlib.KIT_SEED_VERSION, "seed_tag": kitlib.seed_tag(),
                   "registry": a.registry, "seeded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                      time.gmtime()),
                   "seed_s": round(time.time() - t0, 1)}
    # The marker, last: an ordinary OCI image manifest whose config is the description.
    cfg = images.Blob(json.dumps(desc, indent=1).encode() + b"\n", kitlib.SEED_MEDIA_TYPE)
    layer = images.Blob(b"archmirror bench seed marker\n", images.OCI_LAYER)
    man = {"schemaVersion": 2, "mediaType": images.OCI_MANIFEST, "config": cfg.descriptor(),
           "layers": [layer.descriptor()]}
    c.push_blob(kitlib.SEED_REPO, cfg)
    c.push_blob(kitlib.SEED_REPO, layer)
    c.push_manifest(kitlib.SEED_REPO, kitlib.seed_tag(),
                    images.Blob(images.canonical(man), images.OCI_MANIFEST))
    log("seeded in %.1f s; marker %s:%s" % (time.time() - t0, kitlib.SEED_REPO, kitlib.seed_tag()))
    print(json.dumps(desc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Deterministic image content: real gzip'd tar layers, configs, manifests, indexes.

Everything here is pure (no I/O); registry.OCIClient pushes the result. Each builder
returns a dict with the exact bytes, digests and media types so tests can compare
byte-for-byte.
"""
import gzip
import hashlib
import io
import json
import random
import tarfile

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
INTOTO = "application/vnd.in-toto+json"

# What containerd 1.6 sends when resolving a tag (HEAD), see containerd-mirror.md.
CONTAINERD_RESOLVE_ACCEPT = ", ".join([DOCKER_MANIFEST, DOCKER_LIST, OCI_MANIFEST, OCI_INDEX, "*/*"])
ALL_MANIFEST_TYPES = ", ".join([OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST])


def sha256(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical(obj):
    """Stable JSON encoding (what we push is exactly these bytes)."""
    return json.dumps(obj, indent=3, sort_keys=False).encode() + b"\n"


class Blob:
    def __init__(self, data, media_type):
        self.data = data
        self.media_type = media_type
        self.digest = sha256(data)
        self.size = len(data)

    def descriptor(self, **extra):
        d = {"mediaType": self.media_type, "size": self.size, "digest": self.digest}
        d.update(extra)
        return d

    def as_dict(self):
        return {"digest": self.digest, "size": self.size, "media_type": self.media_type,
                "bytes": self.data}


def large_blob(seed, mib=None, size=None, media_type=OCI_LAYER):
    """A Blob of incompressible pseudo-random bytes: `mib` MiB (or exactly `size`
    bytes), the same bytes for the same seed on every run (random.Random(str) is
    seeded via SHA-512, stable across Python 3 versions). 64 MiB takes ~0.3 s and
    about its own size in memory: the bytes are made 1 MiB at a time into one
    bytearray, which is Blob.data here (bytes-like: hashlib, http.client, ==, slices).
    Push it with registry.OCIClient.push_blob (monolithic POST + PUT)."""
    assert (mib is None) != (size is None), "give exactly one of mib, size"
    n = mib * 1024 * 1024 if size is None else size
    rnd = random.Random("large-blob-%s-%d" % (seed, n))
    data = bytearray(n)
    step = 1 << 20
    for i in range(0, n, step):
        k = min(step, n - i)
        data[i:i + k] = rnd.randbytes(k)
    return Blob(data, media_type)


def layer_tar(seed, files=3, size=2048):
    """A small real layer: (uncompressed_tar, gzipped). Deterministic per seed."""
    rnd = random.Random("layer-%s" % seed)
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        d = tarfile.TarInfo("data")
        d.type = tarfile.DIRTYPE
        d.mode = 0o755
        d.mtime = 1700000000
        tf.addfile(d)
        for i in range(files):
            content = ("seed=%s file=%d\n" % (seed, i)).encode() + bytes(
                rnd.getrandbits(8) for _ in range(size))
            ti = tarfile.TarInfo("data/file-%s-%d.bin" % (seed, i))
            ti.size = len(content)
            ti.mode = 0o644
            ti.mtime = 1700000000
            tf.addfile(ti, io.BytesIO(content))
    tar = raw.getvalue()
    gz = io.BytesIO()
    with gzip.GzipFile(fileobj=gz, mode="wb", mtime=0, compresslevel=6) as g:
        g.write(tar)
    return tar, gz.getvalue()


def config_json(arch, variant=None, os_="linux", diff_ids=(), seed=""):
    cfg = {
        "architecture": arch,
        "os": os_,
        "created": "2024-01-01T00:00:00Z",
        "config": {"Env": ["PATH=/usr/bin:/bin", "ARCHMIRROR_SEED=%s" % seed],
                   "Cmd": ["/bin/true"]},
        "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
        "history": [{"created": "2024-01-01T00:00:00Z", "created_by": "archmirror test %s" % seed}],
    }
    if variant:
        cfg["variant"] = variant
    return json.dumps(cfg, sort_keys=True).encode()


def single_manifest(seed, arch, variant=None, oci=True, n_layers=1):
    """One image manifest plus its config and layers. Returns dict."""
    layer_mt = OCI_LAYER if oci else DOCKER_LAYER
    layers = []
    diff_ids = []
    for i in range(n_layers):
        tar, gz = layer_tar("%s-%s-%d" % (seed, arch + (variant or ""), i))
        layers.append(Blob(gz, layer_mt))
        diff_ids.append(sha256(tar))
    cfg = Blob(config_json(arch, variant, diff_ids=diff_ids, seed=seed),
               OCI_CONFIG if oci else DOCKER_CONFIG)
    mt = OCI_MANIFEST if oci else DOCKER_MANIFEST
    m = {"schemaVersion": 2, "mediaType": mt, "config": cfg.descriptor(),
         "layers": [l.descriptor() for l in layers]}
    man = Blob(canonical(m), mt)
    platform = {"architecture": arch, "os": "linux"}
    if variant:
        platform["variant"] = variant
    return {"manifest": man, "config": cfg, "layers": layers, "platform": platform,
            "blobs": [cfg] + layers}


def attestation_manifest(seed, subject_digest):
    """A buildx-style attestation manifest (in-toto layer)."""
    stmt = json.dumps({
        "_type": "https://in-toto.io/Statement/v0.1",
        "predicateType": "https://spdx.dev/Document",
        "subject": [{"name": "pkg:docker/example/%s" % seed,
                     "digest": {"sha256": subject_digest.split(":", 1)[1]}}],
        "predicate": {"spdxVersion": "SPDX-2.3", "name": "archmirror-test"},
    }, sort_keys=True).encode()
    layer = Blob(stmt, INTOTO)
    cfg = Blob(json.dumps({"architecture": "unknown", "os": "unknown", "config": {},
                           "rootfs": {"type": "layers", "diff_ids": [layer.digest]}},
                          sort_keys=True).encode(), OCI_CONFIG)
    m = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": cfg.descriptor(),
         "layers": [layer.descriptor(annotations={
             "in-toto.io/predicate-type": "https://spdx.dev/Document"})]}
    return {"manifest": Blob(canonical(m), OCI_MANIFEST), "config": cfg, "layers": [layer],
            "blobs": [cfg, layer]}


def oci_index_image(seed="multi"):
    """(a) OCI index: linux/amd64 + linux/arm64/v8 OCI manifests + attestation."""
    amd = single_manifest(seed, "amd64", oci=True)
    arm = single_manifest(seed, "arm64", "v8", oci=True)
    att = attestation_manifest(seed, amd["manifest"].digest)
    idx = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        amd["manifest"].descriptor(platform=amd["platform"]),
        arm["manifest"].descriptor(platform=arm["platform"]),
        att["manifest"].descriptor(
            platform={"architecture": "unknown", "os": "unknown"},
            annotations={"vnd.docker.reference.digest": amd["manifest"].digest,
                         "vnd.docker.reference.type": "attestation-manifest"}),
    ]}
    top = Blob(canonical(idx), OCI_INDEX)
    return {"kind": "oci-index", "top": top,
            "children": {"linux/amd64": amd, "linux/arm64": arm, "attestation": att}}


def docker_list_image(seed="list"):
    """(b) Docker manifest list: amd64, arm64/v8, arm/v7 Docker schema2 manifests."""
    amd = single_manifest(seed, "amd64", oci=False)
    arm64 = single_manifest(seed, "arm64", "v8", oci=False)
    arm7 = single_manifest(seed, "arm", "v7", oci=False)
    ml = {"schemaVersion": 2, "mediaType": DOCKER_LIST, "manifests": [
        c["manifest"].descriptor(platform=c["platform"]) for c in (amd, arm64, arm7)]}
    top = Blob(canonical(ml), DOCKER_LIST)
    return {"kind": "docker-list", "top": top,
            "children": {"linux/amd64": amd, "linux/arm64": arm64, "linux/arm/v7": arm7}}


def docker_single_image(seed="single"):
    """(c) single-arch Docker schema2 amd64 image."""
    amd = single_manifest(seed, "amd64", oci=False, n_layers=2)
    return {"kind": "docker-single", "top": amd["manifest"], "children": {}, "image": amd}


def nested_index_image(seed="nested"):
    """(d) OCI index of indexes. children holds the leaf manifests, indexes the child
    indexes (in push order: after the leaves, before the top):
      top: [A (no platform), B (platform linux/arm/v7)]
      A:   linux/amd64 + linux/arm64/v8 OCI manifests + attestation
      B:   one arm/v7 OCI manifest whose descriptor carries no platform (it inherits B's)
    containerd on arm/v7 pulls B's manifest, on amd64/arm64 A's."""
    amd = single_manifest(seed, "amd64", oci=True)
    arm64 = single_manifest(seed, "arm64", "v8", oci=True)
    arm7 = single_manifest(seed, "arm", "v7", oci=True)
    att = attestation_manifest(seed, amd["manifest"].digest)
    a = Blob(canonical({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        amd["manifest"].descriptor(platform=amd["platform"]),
        arm64["manifest"].descriptor(platform=arm64["platform"]),
        att["manifest"].descriptor(
            platform={"architecture": "unknown", "os": "unknown"},
            annotations={"vnd.docker.reference.digest": amd["manifest"].digest,
                         "vnd.docker.reference.type": "attestation-manifest"}),
    ]}), OCI_INDEX)
    b = Blob(canonical({"schemaVersion": 2, "mediaType": OCI_INDEX,
                        "manifests": [arm7["manifest"].descriptor()]}), OCI_INDEX)
    top = Blob(canonical({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        a.descriptor(), b.descriptor(platform=arm7["platform"])]}), OCI_INDEX)
    return {"kind": "oci-nested", "top": top, "indexes": [a, b],
            "children": {"linux/amd64": amd, "linux/arm64": arm64, "linux/arm/v7": arm7,
                         "attestation": att}}


def all_manifests(img):
    """Every manifest Blob of an image (top first, then child indexes, then leaves)."""
    out = [img["top"]] + list(img.get("indexes", ()))
    for c in img["children"].values():
        out.append(c["manifest"])
    return out


def all_blobs(img):
    """Every non-manifest Blob (configs and layers), de-duplicated."""
    seen = {}
    parts = list(img["children"].values())
    if "image" in img:
        parts.append(img["image"])
    for c in parts:
        for b in c["blobs"]:
            seen[b.digest] = b
    return list(seen.values())


def platform_manifest(img, platform):
    """The manifest Blob containerd selects for platform ("linux/arm64")."""
    if img["kind"] == "docker-single":
        return img["top"]
    return img["children"][platform]["manifest"]


def summary(img):
    """Plain-dict view: every digest, size, media type and the bytes."""
    out = {"kind": img["kind"], "top": img["top"].as_dict(), "children": {}}
    for k, c in img["children"].items():
        out["children"][k] = {"manifest": c["manifest"].as_dict(),
                              "config": c["config"].as_dict(),
                              "layers": [l.as_dict() for l in c["layers"]]}
    if "indexes" in img:
        out["indexes"] = [i.as_dict() for i in img["indexes"]]
    if "image" in img:
        out["config"] = img["image"]["config"].as_dict()
        out["layers"] = [l.as_dict() for l in img["image"]["layers"]]
    return out

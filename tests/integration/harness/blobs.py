"""What the blob tests share: a pushed blob as the tests address it, and where
archmirror keeps blobs on disk (<data>/blobs/sha256/<2 hex>/<64 hex>, temp files
<data>/blobs/tmp/*.part)."""
import glob
import os


class Ref:
    """A pushed blob: digest, size, its path upstream (up_path) and through archmirror
    with ?ns= (path); its bytes only with keep=True (64 MiB blobs are dropped after the
    push)."""

    def __init__(self, blob, repo, ns="example.com", keep=False):
        self.digest = blob.digest
        self.size = blob.size
        self.data = blob.data if keep else None
        self.up_path = "/v2/%s/blobs/%s" % (repo, blob.digest)
        self.path = self.up_path + "?ns=" + ns


def blob_file(data_dir, digest):
    alg, hexd = digest.split(":", 1)
    return os.path.join(data_dir, "blobs", alg, hexd[:2], hexd)


def part_files(data_dir):
    return glob.glob(os.path.join(data_dir, "blobs", "**", "*.part"), recursive=True)

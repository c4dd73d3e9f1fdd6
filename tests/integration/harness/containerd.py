"""A private containerd 1.6 daemon and `ctr images pull --hosts-dir` through a mirror."""
import os
import shutil
import subprocess
import time

from . import proc

CONTAINERD_BIN = os.environ.get("AM_CONTAINERD", "/usr/bin/containerd")
CTR_BIN = os.environ.get("AM_CTR", "/usr/bin/ctr")

_DISABLED = [
    "io.containerd.grpc.v1.cri",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.snapshotter.v1.overlayfs",
    "io.containerd.tracing.processor.v1.otlp",
    "io.containerd.internal.v1.tracing",
]


def write_hosts_toml(hosts_dir, registry_host, server_url, mirror_url, platform=None,
                     capabilities=("pull", "resolve"), extra_headers=None):
    """<hosts_dir>/<registry_host>/hosts.toml with `server` (e.g. a dead port, so a
    successful pull proves the mirror served it) and one [host."mirror_url"] entry."""
    d = os.path.join(hosts_dir, registry_host)
    os.makedirs(d, exist_ok=True)
    lines = ['server = "%s"' % server_url, "",
             '[host."%s"]' % mirror_url,
             "  capabilities = [%s]" % ", ".join('"%s"' % c for c in capabilities)]
    headers = dict(extra_headers or {})
    if platform:
        headers["X-Node-Platform"] = platform
    if headers:
        lines.append('  [host."%s".header]' % mirror_url)
        for k, v in headers.items():
            lines.append('    %s = "%s"' % (k, v))
    path = os.path.join(d, "hosts.toml")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def write_hosts_toml_mirror_only(hosts_dir, registry_host, mirror_url, platform=None,
                                 extra_headers=None):
    """<hosts_dir>/<registry_host>/hosts.toml in mirror-only mode: `server` = the mirror
    (so it is the last, and only, host containerd tries and its errors reach ctr), the
    root [header] table (which applies to `server`) and an EMPTY [host] table, without
    which containerd 1.6/1.7 reject the file ("invalid `host` tree") and ignore it
    (shared/reference/containerd-mirror.md §2)."""
    d = os.path.join(hosts_dir, registry_host)
    os.makedirs(d, exist_ok=True)
    lines = ['server = "%s"' % mirror_url, ""]
    headers = dict(extra_headers or {})
    if platform:
        headers["X-Node-Platform"] = platform
    if headers:
        lines.append("[header]")
        for k, v in headers.items():
            lines.append('  %s = "%s"' % (k, v))
        lines.append("")
    lines.append("[host]")
    path = os.path.join(d, "hosts.toml")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


class PullResult:
    def __init__(self, ref, platform, returncode, stdout, stderr, duration, digest):
        self.ref = ref
        self.platform = platform
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        self.duration = duration
        self.digest = digest

    @property
    def ok(self):
        return self.returncode == 0

    def __repr__(self):
        return "PullResult(%s %s rc=%d digest=%s %.2fs)\nstdout:\n%s\nstderr:\n%s" % (
            self.ref, self.platform, self.returncode, self.digest, self.duration,
            self.stdout[-3000:], self.stderr[-3000:])


class Containerd:
    """containerd --config <workdir>/<name>/config.toml with its own root, state and a
    unix socket in the work dir; CRI disabled; the "native" snapshotter."""

    def __init__(self, workdir, name="containerd"):
        self.workdir = workdir
        self.name = name
        self.base = os.path.join(workdir, name)
        self.root = os.path.join(self.base, "root")
        self.state = os.path.join(self.base, "state")
        self.sock = os.path.join(self.base, "c.sock")
        self.config_path = os.path.join(self.base, "config.toml")
        self.proc = None
        self.namespace = "amtest"

    def _write_config(self):
        for d in (self.root, self.state):
            os.makedirs(d, exist_ok=True)
        cfg = [
            "version = 2",
            'root = "%s"' % self.root,
            'state = "%s"' % self.state,
            'temp = "%s"' % os.path.join(self.base, "tmp"),
            "disabled_plugins = [%s]" % ", ".join('"%s"' % p for p in _DISABLED),
            "",
            "[grpc]",
            '  address = "%s"' % self.sock,
            "[ttrpc]",
            '  address = "%s"' % (self.sock + ".ttrpc"),
            "[debug]",
            '  address = ""',
            '  level = "info"',
            "[metrics]",
            '  address = ""',
            '[plugins."io.containerd.internal.v1.opt"]',
            '  path = "%s"' % os.path.join(self.base, "opt"),
        ]
        os.makedirs(os.path.join(self.base, "tmp"), exist_ok=True)
        with open(self.config_path, "w") as f:
            f.write("\n".join(cfg) + "\n")

    def start(self, timeout=30):
        self._write_config()
        self.proc = proc.spawn([CONTAINERD_BIN, "--config", self.config_path],
                               self.name, self.workdir)
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if not self.proc.alive():
                raise proc.NotReady("containerd exited %s:\n%s" % (self.proc.popen.returncode,
                                                                   self.proc.tail()))
            if os.path.exists(self.sock):
                cp = self.ctr(["version"], check=False, timeout=10)
                if cp.returncode == 0:
                    return self
                last = cp.stderr
            time.sleep(0.1)
        raise proc.NotReady("containerd not ready: %s\n%s" % (last, self.proc.tail()))

    def stop(self, timeout=15):
        if self.proc is None:
            return None
        rc = self.proc.stop(timeout=timeout)
        self.proc = None
        return rc

    def remove_state(self):
        """Deletes root/state (a fresh content store on the next start)."""
        if self.proc is not None:
            raise RuntimeError("stop containerd first")
        # native snapshots may contain read-only dirs; make them writable first
        for dirpath, dirnames, _ in os.walk(self.base):
            for d in dirnames:
                try:
                    os.chmod(os.path.join(dirpath, d), 0o755)
                except OSError:
                    pass
        shutil.rmtree(self.base, ignore_errors=True)

    def ctr(self, args, check=True, timeout=120):
        argv = [CTR_BIN, "--address", self.sock, "--namespace", self.namespace] + list(args)
        return proc.run(argv, timeout=timeout, check=check)

    def pull(self, ref, platform, hosts_dir, timeout=120, extra=()):
        """ctr images pull --platform P --hosts-dir D --snapshotter native REF.
        Returns a PullResult (never raises on a failed pull)."""
        t = time.monotonic()
        argv = ["images", "pull", "--platform", platform, "--hosts-dir", hosts_dir,
                "--snapshotter", "native"] + list(extra) + [ref]
        try:
            cp = self.ctr(argv, check=False, timeout=timeout)
            rc, out, err = cp.returncode, cp.stdout, cp.stderr
        except subprocess.TimeoutExpired as e:
            rc, out, err = -1, str(e.stdout or ""), "timeout after %ss" % timeout
        dt = time.monotonic() - t
        digest = self.image_digest(ref) if rc == 0 else None
        return PullResult(ref, platform, rc, out, err, dt, digest)

    def images(self):
        """{ref: digest} from `ctr images ls`."""
        cp = self.ctr(["images", "ls"], timeout=30)
        out = {}
        for line in cp.stdout.splitlines()[1:]:
            parts = line.split()
            if len(parts) >= 3:
                out[parts[0]] = parts[2]
        return out

    def image_digest(self, ref):
        return self.images().get(ref)

    def remove_image(self, ref):
        self.ctr(["images", "rm", "--sync", ref], check=False)

    def content_digests(self):
        """Set of digests in the content store."""
        cp = self.ctr(["content", "ls", "-q"], timeout=30)
        return set(l.strip() for l in cp.stdout.splitlines() if l.strip())

    def check_image(self, ref):
        """`ctr images check` line for ref ('complete' / 'incomplete' ...)."""
        cp = self.ctr(["images", "check", "name==" + ref], check=False, timeout=30)
        return cp.stdout

"""Processes, ports and readiness for the integration harness.

Every spawned process gets its own session/process group (start_new_session) and, via
util-linux setpriv, PR_SET_PDEATHSIG=KILL so it dies even if this Python process is
SIGKILLed (ctest timeout). An atexit hook (and SIGTERM/SIGINT handlers) kill whatever
is still running. Output goes to files in the caller's work dir.
"""
import atexit
import http.client
import os
import shutil
import signal
import socket
import subprocess
import threading
import time

_live = {}          # pid -> Proc
_live_lock = threading.Lock()
_SETPRIV = shutil.which("setpriv")


def free_port(host="127.0.0.1"):
    """A port the kernel just handed out for host (bound to port 0, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, 0))
        return s.getsockname()[1]


class DeadPort:
    """A loopback port that is bound but never listens: connecting is refused, and no
    other process can take it while this object lives."""

    def __init__(self, host="127.0.0.1"):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind((host, 0))
        self.host = host
        self.port = self.sock.getsockname()[1]

    @property
    def url(self):
        return "http://%s:%d" % (self.host, self.port)

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class Proc:
    """A spawned child process with stdout/stderr in files."""

    def __init__(self, argv, name, workdir, env=None, cwd=None):
        self.argv = list(argv)
        self.name = name
        self.stdout_path = os.path.join(workdir, name + ".stdout")
        self.stderr_path = os.path.join(workdir, name + ".stderr")
        self.returncode = None
        full = list(argv)
        if _SETPRIV:
            full = [_SETPRIV, "--pdeathsig", "KILL", "--"] + full
        self._out = open(self.stdout_path, "ab")
        self._err = open(self.stderr_path, "ab")
        self.popen = subprocess.Popen(
            full, stdin=subprocess.DEVNULL, stdout=self._out, stderr=self._err,
            env=env, cwd=cwd, start_new_session=True, close_fds=True)
        self.pid = self.popen.pid
        with _live_lock:
            _live[self.pid] = self

    # -- state ---------------------------------------------------------------------
    def alive(self):
        return self.popen.poll() is None

    def stderr_text(self):
        try:
            with open(self.stderr_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def stdout_text(self):
        try:
            with open(self.stdout_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def tail(self, n=40):
        lines = self.stderr_text().splitlines()
        return "\n".join(lines[-n:])

    # -- stopping ------------------------------------------------------------------
    def stop(self, timeout=10.0, sig=signal.SIGTERM):
        """SIGTERM (to the pid), wait up to timeout, then SIGKILL the whole group.
        Returns the Popen returncode (negative = killed by that signal). Also sweeps
        the process group so no grandchild survives. Idempotent."""
        if self.returncode is None:
            if self.popen.poll() is None:
                try:
                    os.kill(self.pid, sig)
                except ProcessLookupError:
                    pass
                try:
                    self.popen.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.killed_after_timeout = True
                    _killpg(self.pid, signal.SIGKILL)
                    self.popen.wait(5)
            self.returncode = self.popen.returncode
        _killpg(self.pid, signal.SIGKILL)   # leftovers in the group, if any
        self._close_files()
        with _live_lock:
            _live.pop(self.pid, None)
        return self.returncode

    def kill(self):
        _killpg(self.pid, signal.SIGKILL)
        try:
            self.popen.wait(5)
        except subprocess.TimeoutExpired:
            pass
        return self.stop()

    def _close_files(self):
        for f in (self._out, self._err):
            try:
                f.close()
            except Exception:
                pass

    killed_after_timeout = False


def _killpg(pgid, sig):
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def spawn(argv, name, workdir, env=None, cwd=None):
    return Proc(argv, name, workdir, env=env, cwd=cwd)


def kill_all():
    """Safety net: SIGKILL every process group still registered."""
    with _live_lock:
        procs = list(_live.values())
    for p in procs:
        try:
            _killpg(p.pid, signal.SIGKILL)
            p.popen.wait(5)
        except Exception:
            pass
        with _live_lock:
            _live.pop(p.pid, None)


atexit.register(kill_all)


def _on_signal(signum, frame):
    kill_all()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


for _s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    try:
        if signal.getsignal(_s) in (signal.SIG_DFL, signal.default_int_handler):
            signal.signal(_s, _on_signal)
    except (ValueError, OSError):   # not main thread
        pass


class NotReady(Exception):
    pass


def wait_http_ready(port, path="/v2/", host="127.0.0.1", timeout=20.0, proc=None,
                    ok=(200,), check=None, https_context=None):
    """Poll until GET path answers a status in ok (and check(resp, body) is truthy).
    Raises NotReady (with the process's stderr tail) if proc dies or time runs out."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise NotReady("%s exited with %s before becoming ready; stderr tail:\n%s"
                           % (proc.name, proc.popen.returncode, proc.tail()))
        try:
            if https_context is not None:
                c = http.client.HTTPSConnection(host, port, timeout=2, context=https_context)
            else:
                c = http.client.HTTPConnection(host, port, timeout=2)
            c.request("GET", path)
            r = c.getresponse()
            body = r.read()
            c.close()
            if r.status in ok and (check is None or check(r, body)):
                return r
            last = "status %d %r" % (r.status, body[:200])
        except (OSError, http.client.HTTPException) as e:
            last = repr(e)
        time.sleep(0.05)
    raise NotReady("%s:%d%s not ready after %.0fs (last: %s)%s" % (
        host, port, path, timeout, last,
        ("; stderr tail:\n" + proc.tail()) if proc is not None else ""))


def wait_port(port, host="127.0.0.1", timeout=20.0, proc=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise NotReady("%s exited with %s; stderr tail:\n%s"
                           % (proc.name, proc.popen.returncode, proc.tail()))
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise NotReady("port %d not listening after %.0fs" % (port, timeout))


def run(argv, timeout=60, check=True, env=None, input=None):
    """Run a short command to completion; returns CompletedProcess (text)."""
    cp = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                        timeout=timeout, env=env, input=input, text=True)
    if check and cp.returncode != 0:
        raise RuntimeError("%s exited %d\nstdout:\n%s\nstderr:\n%s" % (
            " ".join(argv), cp.returncode, cp.stdout[-4000:], cp.stderr[-4000:]))
    return cp

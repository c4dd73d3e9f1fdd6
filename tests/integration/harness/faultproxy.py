"""A loopback HTTP/1.1 proxy in front of a registry, for counting and fault injection.

* Counts every request by (method, path-without-query) and keeps a log (method, target,
  headers, status) so tests can assert what the upstream received.
* flip(path): GET responses (200) for that path get exactly one byte changed, headers
  and Content-Length unchanged, so the body no longer matches its digest. The byte is
  chosen to keep JSON valid (an indentation space becomes a tab) when possible.
  flip(path, offset=N): the same for large bodies, streamed: the byte at offset N is
  XORed (default 0x01) as it passes, nothing is buffered.
* set_down("503" | "reset" | "refuse") / set_up(): answer 503 with an OCI error, reset
  the connection, or stop listening altogether (connection refused); set_up() listens
  again on the same port.
* Bodies are streamed in 64 KiB chunks (except legacy-flipped ones, which are small
  manifests and are buffered).

Large-body faults (GET responses; all settable at runtime, from any thread):
* throttle(rate, path=|prefix=): pace response bodies (200 and 206) to rate bytes/s;
  a change applies to bodies already in flight from their next chunk.
* cut(path, after, once=True, mode="close"|"reset"): send exactly `after` body bytes of a
  200 response, then close the connection (FIN) or reset it (RST; unsent bytes lost).
* gate(path, offset): the next 200 response for path pauses after `offset` body bytes
  until release(path); wait_gated(path) blocks until a response is paused there.
* Per request timing on one clock, now() (time.monotonic), stored in the log entry:
  t_request, t_headers, t_first_byte, t_body_end (streaming stopped for any reason),
  t_body_done (the whole body was sent: None otherwise), body_sent (bytes so far, live),
  body_length, outcome ("complete", "cut", "client-gone", ...). timed_get() is a client
  that stamps its own events with the same clock, so tests can compare event ORDER.
* Concurrency: requests open at the same time per path (from arrival to the end of the
  response), current and maximum seen: concurrency(), max_concurrency().

Canned answers and stalls (any method unless one is given; settable at runtime):
* fake(path, status, headers, body, method=, times=): answer requests for path with this
  response instead of forwarding (HEAD gets the head only, Content-Length of body unless
  headers set one or Transfer-Encoding: the body is then sent as given, e.g. already
  chunked); times=N removes the rule after N answers. unfake(path=None).
  Headers may contain the placeholder "{proxy}" (replaced by this proxy's URL) so a
  Location can point back here.
* stall(path, method=, timeout=60): requests for path get no response at all until
  unstall(path) (or timeout / stop), then the connection is closed without one.
  stalled(path) = requests parked right now.
* listen_host= (constructor): the address to listen on (default 127.0.0.1), e.g. a
  non-loopback address of this machine so the upstream is not "on loopback".
"""
import collections
import hashlib
import http.client
import http.server
import socket
import socketserver
import ssl
import struct
import threading
import time
import urllib.parse

HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
              "trailers", "transfer-encoding", "upgrade", "proxy-connection"}

now = time.monotonic       # the one clock for every event time recorded here


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False

    def handle_error(self, request, client_address):
        pass        # client went away / connection reset on purpose: not interesting


class Gate:
    """A pause point in one response body (see FaultProxy.gate)."""

    def __init__(self, path, offset):
        self.path = path
        self.offset = offset
        self.entry = None                   # log entry of the response that took it
        self.reached = threading.Event()    # the body is paused at offset
        self.released = threading.Event()
        self.t_reached = None

    def wait_reached(self, timeout=30):
        return self.reached.wait(timeout)

    def release(self):
        self.released.set()


class FaultProxy:
    def __init__(self, upstream_host, upstream_port, upstream_tls=False, ssl_context=None,
                 name="faultproxy", listen_host="127.0.0.1"):
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.upstream_tls = upstream_tls
        self.ssl_context = ssl_context or (ssl._create_unverified_context() if upstream_tls else None)
        self.name = name
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)   # notified on every log change
        self.counts = collections.Counter()
        self.log = []
        self.flip_paths = set()
        self.flip_offsets = {}      # path -> (offset, xor): streamed one-byte flip
        self.flipped = 0
        self.throttles = {}         # ("path"|"prefix", value) -> bytes/s
        self.cut_rules = {}         # path -> {"after", "once", "mode"}
        self.cuts = 0               # connections cut so far
        self.gates = {}             # path -> armed Gate (not yet taken by a response)
        self.gates_taken = []
        self.open_now = collections.Counter()   # (method|"*", path) -> open requests
        self.open_max = collections.Counter()   # (method|"*", path) -> max seen
        self.mode = None
        self.port = None
        self.server = None
        self.thread = None
        self.delay = 0.0
        self.listen_host = listen_host
        self.fakes = {}             # path -> {"status", "headers", "body", "method", "times"}
        self.faked = 0              # canned answers sent so far
        self.stalls = {}            # path -> {"method", "timeout", "event"}
        self.stalled_now = collections.Counter()   # path -> requests parked right now

    # -- control -------------------------------------------------------------------
    @property
    def url(self):
        return "http://%s:%d" % (self.listen_host, self.port)

    def start(self):
        self._listen(self.port or 0)
        return self

    def _listen(self, port):
        proxy = self

        class Handler(_Handler):
            pass
        Handler.proxy = proxy
        self.server = _Server((self.listen_host, port), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def _unlisten(self):
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def stop(self):
        self.release()          # no handler thread stays parked at a gate
        self.unstall()          # nor at a stall
        self._unlisten()

    def set_down(self, mode="refuse"):
        assert mode in ("503", "reset", "refuse")
        self.mode = mode
        if mode == "refuse":
            self._unlisten()

    def set_up(self):
        was_refusing = self.mode == "refuse"
        self.mode = None
        if was_refusing or self.server is None:
            for _ in range(50):
                try:
                    self._listen(self.port)
                    break
                except OSError:
                    time.sleep(0.05)

    def flip(self, path, offset=None, xor=0x01):
        """offset None: buffer the (small) 200 body and change one byte (flip_one_byte).
        offset N: stream it and XOR the byte at body offset N with xor."""
        with self.lock:
            if offset is None:
                self.flip_paths.add(path)
            else:
                assert offset >= 0 and 0 < xor < 256
                self.flip_offsets[path] = (offset, xor)

    def unflip(self, path=None):
        with self.lock:
            if path is None:
                self.flip_paths.clear()
                self.flip_offsets.clear()
            else:
                self.flip_paths.discard(path)
                self.flip_offsets.pop(path, None)

    def throttle(self, rate, path=None, prefix=None):
        """Pace GET response bodies (200/206) for path (exact) or prefix to rate bytes/s.
        rate None or 0 removes that rule. With several matching rules the slowest wins."""
        assert (path is None) != (prefix is None), "give exactly one of path, prefix"
        key = ("path", path) if path is not None else ("prefix", prefix)
        with self.lock:
            if rate:
                self.throttles[key] = float(rate)
            else:
                self.throttles.pop(key, None)

    def unthrottle(self, path=None, prefix=None):
        if path is None and prefix is None:
            with self.lock:
                self.throttles.clear()
        else:
            self.throttle(None, path=path, prefix=prefix)

    def rate_for(self, path):
        with self.lock:
            rates = [r for (kind, v), r in self.throttles.items()
                     if (kind == "path" and v == path) or (kind == "prefix" and path.startswith(v))]
        return min(rates) if rates else None

    def cut(self, path, after, once=True, mode="close"):
        """The next (once) or every (once=False) GET 200 response for path sends exactly
        `after` body bytes, then the connection is closed (FIN) or reset (RST)."""
        assert mode in ("close", "reset") and after >= 0
        with self.lock:
            self.cut_rules[path] = {"after": int(after), "once": once, "mode": mode}

    def uncut(self, path=None):
        with self.lock:
            if path is None:
                self.cut_rules.clear()
            else:
                self.cut_rules.pop(path, None)

    def gate(self, path, offset):
        """Arms a one-shot gate: the next GET 200 response for path pauses after sending
        `offset` body bytes (0 = right after the headers) until release(path).
        Returns the Gate."""
        g = Gate(path, int(offset))
        with self.lock:
            old = self.gates.pop(path, None)
            self.gates[path] = g
        if old is not None:
            old.release()
        return g

    def release(self, path=None):
        """Releases armed and taken gates (for path, or all), so paused bodies go on."""
        with self.lock:
            gs = [g for g in list(self.gates.values()) + self.gates_taken
                  if path is None or g.path == path]
            for g in gs:
                if self.gates.get(g.path) is g:
                    del self.gates[g.path]
        for g in gs:
            g.release()

    def wait_gated(self, path, timeout=30):
        """Blocks until a response for path is paused at its gate; returns the Gate, or
        None on timeout."""
        deadline = now() + timeout
        while now() < deadline:
            with self.lock:
                for g in self.gates_taken:
                    if g.path == path and g.reached.is_set() and not g.released.is_set():
                        return g
            time.sleep(0.01)
        return None

    def clear_faults(self):
        """Removes every flip, throttle, cut, gate, fake and stall (releasing paused
        bodies and stalled requests)."""
        self.unflip()
        self.unthrottle()
        self.uncut()
        self.release()
        self.unfake()
        self.unstall()
        self.delay = 0.0

    def fake(self, path, status, headers=None, body=b"", method=None, times=None):
        """Requests for path (and method, if given) get this canned response instead of
        being forwarded; times=N: only the next N of them. See the module docstring."""
        if isinstance(body, str):
            body = body.encode()
        with self.lock:
            self.fakes[path] = {"status": int(status), "headers": list((headers or {}).items()),
                                "body": bytes(body), "method": method, "times": times}

    def unfake(self, path=None):
        with self.lock:
            if path is None:
                self.fakes.clear()
            else:
                self.fakes.pop(path, None)

    def stall(self, path, method=None, timeout=60.0):
        """Requests for path (and method) get no response until unstall(path), timeout
        or stop(); then their connection is closed without an answer."""
        with self.lock:
            old = self.stalls.get(path)
            self.stalls[path] = {"method": method, "timeout": float(timeout),
                                 "event": threading.Event()}
        if old is not None:
            old["event"].set()

    def unstall(self, path=None):
        with self.lock:
            gone = [self.stalls.pop(p) for p in list(self.stalls)
                    if path is None or p == path]
        for st in gone:
            st["event"].set()

    def stalled(self, path):
        with self.lock:
            return self.stalled_now[path]

    def wait_stalled(self, path, n=1, timeout=30):
        """Blocks until at least n requests for path are parked; returns the truth."""
        deadline = now() + timeout
        while now() < deadline:
            if self.stalled(path) >= n:
                return True
            time.sleep(0.01)
        return False

    def _take_fake(self, method, path):
        with self.lock:
            f = self.fakes.get(path)
            if f is None or (f["method"] is not None and f["method"] != method):
                return None
            if f["times"] is not None:
                f["times"] -= 1
                if f["times"] <= 0:
                    del self.fakes[path]
            self.faked += 1
            return dict(f)

    def _take_stall(self, method, path):
        with self.lock:
            st = self.stalls.get(path)
            if st is None or (st["method"] is not None and st["method"] != method):
                return None
            return st

    def reset(self):
        with self.lock:
            self.counts.clear()
            self.log.clear()
            self.flipped = 0
            self.cuts = 0
            self.open_max = collections.Counter(
                {k: v for k, v in self.open_now.items() if v > 0})

    def count(self, method=None, path=None, prefix=None):
        with self.lock:
            n = 0
            for (m, p), c in self.counts.items():
                if method is not None and m != method:
                    continue
                if path is not None and p != path:
                    continue
                if prefix is not None and not p.startswith(prefix):
                    continue
                n += c
            return n

    def total(self):
        with self.lock:
            return sum(self.counts.values())

    def requests(self):
        with self.lock:
            return list(self.log)

    def entries(self, method=None, path=None, prefix=None):
        """Log entries (the live dicts: body fields keep changing while a body streams)."""
        with self.lock:
            return [e for e in self.log
                    if (method is None or e["method"] == method)
                    and (path is None or e["path"] == path)
                    and (prefix is None or e["path"].startswith(prefix))]

    def wait_entry(self, pred, method=None, path=None, timeout=30):
        """Blocks until an entry for (method, path) satisfies pred(entry); returns it or
        None on timeout."""
        deadline = now() + timeout
        with self.lock:
            while True:
                for e in self.log:
                    if (method is None or e["method"] == method) and \
                            (path is None or e["path"] == path) and pred(e):
                        return e
                left = deadline - now()
                if left <= 0:
                    return None
                self.changed.wait(min(left, 0.05))

    def wait_body_end(self, path, method="GET", timeout=30):
        """The first entry for path whose body stopped streaming (any outcome)."""
        return self.wait_entry(lambda e: e.get("t_body_end") is not None, method, path,
                               timeout)

    def wait_body_done(self, path, method="GET", timeout=30):
        """The first entry for path whose whole body was sent."""
        return self.wait_entry(lambda e: e.get("t_body_done") is not None, method, path,
                               timeout)

    def wait_sent(self, path, nbytes, method="GET", timeout=30):
        """The first entry for path that has sent at least nbytes of body."""
        return self.wait_entry(lambda e: e.get("body_sent", 0) >= nbytes, method, path,
                               timeout)

    def concurrency(self, path, method=None):
        with self.lock:
            return self.open_now[(method or "*", path)]

    def max_concurrency(self, path, method=None):
        """Most requests for path (and method, if given) open at the same time since the
        last reset()."""
        with self.lock:
            return self.open_max[(method or "*", path)]

    def describe(self):
        """Human-readable request log (for assertion messages)."""
        def one(e):
            s = "%s %s -> %s" % (e["method"], e["target"], e["status"])
            if e.get("range"):
                s += " [Range: %s]" % e["range"]
            if e.get("body_length") is not None or e.get("body_sent"):
                s += " body %s/%s %s" % (e.get("body_sent", 0), e.get("body_length"),
                                         e.get("outcome") or "streaming")
            return s
        return "\n".join(one(e) for e in self.requests()) or "(no requests)"

    # -- used by the handler ---------------------------------------------------------
    def _record(self, method, target, headers):
        path = urllib.parse.urlsplit(target).path
        entry = {"method": method, "target": target, "path": path,
                 "headers": dict(headers.items()), "status": None, "time": time.time(),
                 "t_request": now(), "range": headers.get("Range"),
                 "t_headers": None, "t_first_byte": None, "t_body_end": None,
                 "t_body_done": None, "t_end": None, "body_sent": 0, "body_length": None,
                 "outcome": None}
        with self.lock:
            self.counts[(method, path)] += 1
            self.log.append(entry)
            for k in ((method, path), ("*", path)):
                self.open_now[k] += 1
                if self.open_now[k] > self.open_max[k]:
                    self.open_max[k] = self.open_now[k]
            self.changed.notify_all()
        return entry

    def _closed(self, entry):
        with self.lock:
            entry["t_end"] = now()
            for k in ((entry["method"], entry["path"]), ("*", entry["path"])):
                self.open_now[k] -= 1
            self.changed.notify_all()

    def _update(self, entry, **kw):
        with self.lock:
            entry.update(kw)
            self.changed.notify_all()

    def _upstream_conn(self):
        if self.upstream_tls:
            return http.client.HTTPSConnection(self.upstream_host, self.upstream_port,
                                               timeout=30, context=self.ssl_context)
        return http.client.HTTPConnection(self.upstream_host, self.upstream_port, timeout=30)


def flip_one_byte(body):
    b = bytearray(body)
    i = b.find(b"   ")
    if i >= 0:
        b[i] = 0x09                 # ' ' -> '\t': still valid JSON, different digest
    elif b:
        b[len(b) // 2] ^= 0x01
    return bytes(b)


class _Cut(Exception):
    pass


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    proxy = None

    def log_message(self, *a):
        pass

    def setup(self):
        super().setup()
        try:    # headers and body are separate writes: avoid Nagle/delayed-ACK stalls
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass

    def finish(self):
        try:
            super().finish()
        except (OSError, ValueError):
            pass

    def do_GET(self):
        entry = self.proxy._record(self.command, self.path, self.headers)
        try:
            self._forward(entry)
        finally:
            self.proxy._closed(entry)

    do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_GET

    def _read_request_body(self):
        te = self.headers.get("Transfer-Encoding", "").lower()
        if "chunked" in te:
            chunks = []
            while True:
                line = self.rfile.readline()
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else None

    def _forward(self, entry):
        p = self.proxy
        body = self._read_request_body()
        if p.delay:
            time.sleep(p.delay)
        if p.mode == "reset" or p.mode == "refuse":
            entry["status"] = "reset"
            self._reset()
            return
        path_only = urllib.parse.urlsplit(self.path).path
        st = p._take_stall(self.command, path_only)
        if st is not None:
            with p.lock:
                p.stalled_now[path_only] += 1
            entry["status"] = "stalled"
            try:
                st["event"].wait(st["timeout"])
            finally:
                with p.lock:
                    p.stalled_now[path_only] -= 1
            self._reset()
            return
        if p.mode is None:
            f = p._take_fake(self.command, path_only)
            if f is not None:
                self._send_fake(entry, f)
                return
        if p.mode == "503":
            entry["status"] = 503
            data = b'{"errors":[{"code":"UNAVAILABLE","message":"faultproxy down"}]}'
            self.send_response(503, "Service Unavailable")
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
            return
        headers = {}
        for k, v in self.headers.items():
            if k.lower() in HOP_BY_HOP:
                continue
            if k.lower() == "content-length":
                continue
            headers[k] = v
        if body is not None:
            headers["Content-Length"] = str(len(body))
        conn = p._upstream_conn()
        try:
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
        except OSError as e:
            entry["status"] = "upstream-error %r" % e
            conn.close()
            data = b'{"errors":[{"code":"UNAVAILABLE","message":"faultproxy: upstream unreachable"}]}'
            self.send_response(502)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
            return
        entry["status"] = resp.status
        try:
            path = urllib.parse.urlsplit(self.path).path
            with p.lock:
                do_flip = (self.command == "GET" and resp.status == 200 and path in p.flip_paths)
            self.send_response_only(resp.status, resp.reason)
            length = resp.getheader("Content-Length")
            chunked = False
            for k, v in resp.getheaders():
                if k.lower() in HOP_BY_HOP:
                    continue
                self.send_header(k, v)
            if self.command == "HEAD" or resp.status in (204, 304) or 100 <= resp.status < 200:
                self.end_headers()
                p._update(entry, t_headers=now())
                resp.read()
                return
            if length is None:
                chunked = True
                self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            p._update(entry, t_headers=now(),
                      body_length=int(length) if length is not None else None)
            if do_flip:
                data = flip_one_byte(resp.read())
                with p.lock:
                    p.flipped += 1
                entry["flipped"] = True
                self._write(data, chunked)
                p._update(entry, body_sent=len(data), t_first_byte=now())
            else:
                try:
                    self._stream(resp, entry, path, chunked)
                except _Cut:
                    return
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
            t = now()
            p._update(entry, t_body_end=t, t_body_done=t, outcome="complete")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            p._update(entry, t_body_end=now(), outcome="client-gone")
        except (OSError, http.client.HTTPException) as e:   # upstream died mid-body
            self.close_connection = True
            p._update(entry, t_body_end=now(), outcome="upstream-error %r" % e)
        finally:
            conn.close()

    def _stream(self, resp, entry, path, chunked):
        """Copies the body in chunks, applying throttle / streamed flip / gate / cut."""
        p = self.proxy
        is_get = self.command == "GET"
        cut = gate = None
        flip_at = None
        with p.lock:
            if is_get and resp.status == 200:
                c = p.cut_rules.get(path)
                if c is not None:
                    cut = dict(c)
                    if c["once"]:
                        del p.cut_rules[path]
                if path in p.flip_offsets:
                    flip_at = p.flip_offsets[path]
                gate = p.gates.pop(path, None)
                if gate is not None:
                    gate.entry = entry
                    p.gates_taken.append(gate)
        sent = 0
        pace_rate = pace_t0 = None
        pace_bytes = 0
        while True:
            rate = p.rate_for(path) if is_get else None
            size = 65536 if not rate else max(4096, min(65536, int(rate // 50)))
            chunk = resp.read(size)
            if not chunk:
                break
            if flip_at is not None and sent <= flip_at[0] < sent + len(chunk):
                b = bytearray(chunk)
                b[flip_at[0] - sent] ^= flip_at[1]
                chunk = bytes(b)
                with p.lock:
                    p.flipped += 1
                entry["flipped"] = True
                entry["flipped_at"] = flip_at[0]
            pos = 0
            while pos < len(chunk):
                if gate is not None and sent >= gate.offset:
                    self._park(gate, entry)
                    gate = None
                    pace_rate = None            # no burst to catch up after the pause
                if cut is not None and sent >= cut["after"]:
                    self._cut(cut, entry, chunked)
                end = len(chunk)
                if gate is not None:
                    end = min(end, pos + gate.offset - sent)
                if cut is not None:
                    end = min(end, pos + cut["after"] - sent)
                piece = chunk[pos:end]
                pos = end
                self._write(piece, chunked)
                sent += len(piece)
                with p.lock:
                    entry["body_sent"] = sent
                    if entry["t_first_byte"] is None:
                        entry["t_first_byte"] = now()
                    p.changed.notify_all()
                if rate:
                    if pace_rate != rate:
                        pace_rate, pace_t0, pace_bytes = rate, now(), 0
                    pace_bytes += len(piece)
                    d = pace_t0 + pace_bytes / rate - now()
                    if d > 0:
                        time.sleep(d)
                else:
                    pace_rate = None

    def _park(self, gate, entry):
        p = self.proxy
        gate.t_reached = now()
        p._update(entry, gated_at=gate.offset, t_gated=gate.t_reached)
        gate.reached.set()
        while not gate.released.wait(0.05):
            if p.server is None and p.mode != "refuse":
                break                               # proxy stopped
        p._update(entry, t_released=now())

    def _cut(self, cut, entry, chunked):
        p = self.proxy
        with p.lock:
            p.cuts += 1
        entry["cut"] = cut["after"]
        self.close_connection = True
        try:
            if cut["mode"] == "reset":
                self._reset()
            else:
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        p._update(entry, t_body_end=now(), outcome="cut")
        raise _Cut()

    def _send_fake(self, entry, f):
        p = self.proxy
        entry["status"] = f["status"]
        entry["faked"] = True
        body = f["body"]
        self.send_response_only(f["status"])
        have_len = False
        for k, v in f["headers"]:
            v = str(v).replace("{proxy}", p.url)
            have_len = have_len or k.lower() in ("content-length", "transfer-encoding")
            self.send_header(k, v)
        if not have_len:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        p._update(entry, t_headers=now(), body_length=len(body))
        if self.command != "HEAD" and body:
            self.wfile.write(body)
        self.wfile.flush()
        t = now()
        p._update(entry, body_sent=0 if self.command == "HEAD" else len(body),
                  t_body_end=t, t_body_done=t, outcome="complete")

    def _write(self, data, chunked):
        if chunked:
            self.wfile.write(b"%x\r\n" % len(data) + data + b"\r\n")
        else:
            self.wfile.write(data)

    def _reset(self):
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                       struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.close_connection = True
        try:
            self.connection.close()
        except OSError:
            pass


# -- a client that stamps its events with the proxy's clock ------------------------------
class TimedResult:
    """What timed_get saw. Times are now() values (comparable with log entries)."""

    def __init__(self, method, path):
        self.method = method
        self.path = path
        self.status = None
        self.reason = None
        self.headers = None
        self.content_length = None
        self.nbytes = 0
        self.digest = None          # "sha256:<hex>" of the bytes received
        self.body = None            # only with keep_body=True
        self.t_start = None         # before connecting
        self.t_sent = None          # request written
        self.t_headers = None       # response head parsed
        self.t_first = None         # first body byte received
        self.t_done = None          # last byte read, EOF, error or early stop
        self.marks = {}             # byte threshold -> time it was reached
        self.error = None           # repr of the exception ending the body, if any
        self.error_type = None      # "IncompleteRead" for EOF before Content-Length
        self.stopped_early = False  # the caller closed the connection on purpose

    def header(self, name, default=None):
        return self.headers.get(name, default) if self.headers is not None else default

    @property
    def complete(self):
        """A body of exactly Content-Length bytes, no error: the client would accept it."""
        return (self.error is None and not self.stopped_early and self.status is not None
                and self.content_length is not None and self.nbytes == self.content_length)

    @property
    def aborted(self):
        """The server ended the body before Content-Length (EOF or reset)."""
        return not self.stopped_early and self.error is not None

    def __repr__(self):
        hs = "".join("\n    %s: %s" % kv for kv in (self.headers.items() if self.headers else ()))
        return ("<timed %s %s -> %s %s%s\n  got %d/%s bytes %s error=%s early_stop=%s>" % (
            self.method, self.path, self.status, self.reason, hs, self.nbytes,
            self.content_length, self.digest, self.error, self.stopped_early))


def timed_get(port, path, headers=None, method="GET", host="127.0.0.1", timeout=20,
              read_size=262144, pace=None, rcvbuf=None, stop_after=None, marks=(),
              keep_body=False, on_headers=None, on_progress=None):
    """GET path, hashing the body as it arrives, never holding it (unless keep_body).

    pace=(nbytes, seconds): after each nbytes read, sleep seconds (a slow reader).
    rcvbuf: SO_RCVBUF set before connecting (keeps the kernel from buffering much for a
    slow reader). stop_after=N: close the connection once N body bytes arrived (a client
    that goes away). marks: byte counts whose arrival times go to result.marks.
    on_headers(result) / on_progress(result) are called from the reading thread; a true
    return value from either stops reading (like stop_after).
    An EOF before Content-Length is recorded as error_type "IncompleteRead" (what
    http.client's read() raises); a reset as "ConnectionResetError"."""
    r = TimedResult(method, path)
    h = hashlib.sha256()
    chunks = [] if keep_body else None
    r.t_start = now()
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    s = None
    try:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        s.settimeout(timeout)
        s.connect((host, port))
        conn.sock = s
        conn.request(method, path, headers=dict(headers or {}))
        r.t_sent = now()
        resp = conn.getresponse()
        r.t_headers = now()
        r.status, r.reason, r.headers = resp.status, resp.reason, resp.headers
        cl = resp.getheader("Content-Length")
        r.content_length = int(cl) if cl is not None else None
        pending = sorted(marks)
        early = bool(on_headers and on_headers(r))
        since_pause = 0
        while not early and method != "HEAD":
            if r.content_length is not None and r.nbytes >= r.content_length:
                break
            want = read_size
            if stop_after is not None:
                if r.nbytes >= stop_after:
                    early = True
                    break
                want = min(want, stop_after - r.nbytes)
            if pace:
                want = min(want, pace[0] - since_pause)
            try:
                data = resp.read1(want)     # what has arrived (up to want), not want bytes
            except (OSError, http.client.HTTPException) as e:
                r.error = repr(e)
                r.error_type = type(e).__name__
                break
            if not data:
                if r.content_length is not None and r.nbytes < r.content_length:
                    r.error = "IncompleteRead(%d bytes read, %d more expected)" % (
                        r.nbytes, r.content_length - r.nbytes)
                    r.error_type = "IncompleteRead"
                break
            t = now()
            if r.t_first is None:
                r.t_first = t
            r.nbytes += len(data)
            h.update(data)
            if chunks is not None:
                chunks.append(data)
            while pending and r.nbytes >= pending[0]:
                r.marks[pending.pop(0)] = t
            if on_progress and on_progress(r):
                early = True
                break
            if pace:
                since_pause += len(data)
                if since_pause >= pace[0]:
                    since_pause = 0
                    time.sleep(pace[1])
        if early and (r.content_length is None or r.nbytes < r.content_length):
            r.stopped_early = True
    except (OSError, http.client.HTTPException) as e:
        if r.error is None:
            r.error = repr(e)
            r.error_type = type(e).__name__
    finally:
        r.t_done = now()
        r.digest = "sha256:" + h.hexdigest()
        if chunks is not None:
            r.body = b"".join(chunks)
        conn.close()
        if s is not None and conn.sock is None:
            s.close()           # connect() failed: the socket never reached conn
    return r


class TimedGetThread(threading.Thread):
    """timed_get in a daemon thread: t = TimedGetThread(port, path, **kw); t.start();
    t.join(timeout); t.result (a TimedResult; None while running). barrier: a
    threading.Barrier waited on just before connecting (release a herd at once)."""

    def __init__(self, port, path, barrier=None, name=None, **kw):
        super().__init__(daemon=True, name=name)
        self.port = port
        self.path = path
        self.barrier = barrier
        self.kw = kw
        self.result = None
        self.exc = None

    def run(self):
        try:
            if self.barrier is not None:
                self.barrier.wait(30)
            self.result = timed_get(self.port, self.path, **self.kw)
        except BaseException as e:      # reported by the test, never lost in a thread
            self.exc = e

    def wait(self, timeout=60):
        """join; returns the result or raises AssertionError if still running / failed."""
        self.join(timeout)
        if self.is_alive():
            raise AssertionError("client %s still reading %s after %ss" % (
                self.name, self.path, timeout))
        if self.exc is not None:
            raise AssertionError("client %s failed: %r" % (self.name, self.exc))
        return self.result

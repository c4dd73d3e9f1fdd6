"""A loopback HTTP/1.1 proxy in front of a registry, for counting and fault injection.

* Counts every request by (method, path-without-query) and keeps a log (method, target,
  headers, status) so tests can assert what the upstream received.
* flip(path): GET responses (200) for that path get exactly one byte changed, headers
  and Content-Length unchanged, so the body no longer matches its digest. The byte is
  chosen to keep JSON valid (an indentation space becomes a tab) when possible.
* set_down("503" | "reset" | "refuse") / set_up(): answer 503 with an OCI error, reset
  the connection, or stop listening altogether (connection refused); set_up() listens
  again on the same port.
* Bodies are streamed in 64 KiB chunks (except flipped ones, which are small manifests).
"""
import collections
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


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False

    def handle_error(self, request, client_address):
        pass        # client went away / connection reset on purpose: not interesting


class FaultProxy:
    def __init__(self, upstream_host, upstream_port, upstream_tls=False, ssl_context=None,
                 name="faultproxy"):
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.upstream_tls = upstream_tls
        self.ssl_context = ssl_context or (ssl._create_unverified_context() if upstream_tls else None)
        self.name = name
        self.lock = threading.Lock()
        self.counts = collections.Counter()
        self.log = []
        self.flip_paths = set()
        self.flipped = 0
        self.mode = None
        self.port = None
        self.server = None
        self.thread = None
        self.delay = 0.0

    # -- control -------------------------------------------------------------------
    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.port

    def start(self):
        self._listen(self.port or 0)
        return self

    def _listen(self, port):
        proxy = self

        class Handler(_Handler):
            pass
        Handler.proxy = proxy
        self.server = _Server(("127.0.0.1", port), Handler)
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

    def flip(self, path):
        with self.lock:
            self.flip_paths.add(path)

    def unflip(self, path=None):
        with self.lock:
            if path is None:
                self.flip_paths.clear()
            else:
                self.flip_paths.discard(path)

    def reset(self):
        with self.lock:
            self.counts.clear()
            self.log.clear()
            self.flipped = 0

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

    def describe(self):
        """Human-readable request log (for assertion messages)."""
        return "\n".join("%s %s -> %s" % (e["method"], e["target"], e["status"])
                         for e in self.requests()) or "(no requests)"

    # -- used by the handler ---------------------------------------------------------
    def _record(self, method, target, headers):
        path = urllib.parse.urlsplit(target).path
        entry = {"method": method, "target": target, "path": path,
                 "headers": dict(headers.items()), "status": None, "time": time.time()}
        with self.lock:
            self.counts[(method, path)] += 1
            self.log.append(entry)
        return entry

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
        self._forward()

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

    def _forward(self):
        p = self.proxy
        entry = p._record(self.command, self.path, self.headers)
        body = self._read_request_body()
        if p.delay:
            time.sleep(p.delay)
        if p.mode == "reset" or p.mode == "refuse":
            entry["status"] = "reset"
            self._reset()
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
                resp.read()
                return
            if length is None:
                chunked = True
                self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            if do_flip:
                data = flip_one_byte(resp.read())
                with p.lock:
                    p.flipped += 1
                entry["flipped"] = True
                self._write(data, chunked)
            else:
                while True:
                    chunk = resp.read(65536)
                    if not chunk:
                        break
                    self._write(chunk, chunked)
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            conn.close()

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

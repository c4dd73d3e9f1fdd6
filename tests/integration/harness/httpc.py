"""http.client helpers for talking to archmirror in tests."""
import http.client
import json
import socket
import time


class Resp:
    def __init__(self, status, reason, headers, body, method, path):
        self.status = status
        self.reason = reason
        self.headers = headers          # http.client.HTTPMessage (case-insensitive)
        self.body = body
        self.method = method
        self.path = path

    def header(self, name, default=None):
        return self.headers.get(name, default)

    @property
    def error_codes(self):
        return oci_error_codes(self.body)

    @property
    def will_close(self):
        return (self.headers.get("Connection", "").lower() == "close")

    def __repr__(self):
        hs = "".join("\n    %s: %s" % kv for kv in self.headers.items())
        b = self.body[:600]
        return "<%s %s -> %d %s%s\n  body(%d): %r>" % (self.method, self.path, self.status,
                                                       self.reason, hs, len(self.body), b)


def oci_error_codes(body):
    """['NAME_INVALID', ...] from an OCI error body, [] when it is not one."""
    try:
        doc = json.loads(body)
        return [e.get("code") for e in doc.get("errors", [])]
    except (ValueError, AttributeError, TypeError):
        return []


class Client:
    """One keep-alive connection; reconnects (and records it) when the server closed."""

    def __init__(self, port, host="127.0.0.1", timeout=30):
        self.host = host
        self.port = port
        self.timeout = timeout
        self.conn = None
        self.reconnects = 0      # connections replaced on request (reuse=False)
        self.connections = 0     # connections opened in total
        self.requests = 0

    def _connect(self):
        self.connections += 1
        self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)

    def request(self, method, path, headers=None, body=None, reuse=True):
        """Sends on the current connection (new one if none). reuse=False forces a new
        connection first. Raises on a dead kept-alive connection: tests use that to
        assert the server kept the connection open."""
        if self.conn is None or not reuse:
            if self.conn is not None:
                self.conn.close()
                self.reconnects += 1
            self._connect()
        h = dict(headers or {})
        self.conn.request(method, path, body=body, headers=h)
        r = self.conn.getresponse()
        data = r.read()
        self.requests += 1
        resp = Resp(r.status, r.reason, r.headers, data, method, path)
        if r.will_close or resp.will_close:
            self.conn.close()
            self.conn = None
        return resp

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def request(port, method, path, headers=None, body=None, host="127.0.0.1", timeout=30):
    c = Client(port, host, timeout)
    try:
        return c.request(method, path, headers=headers, body=body)
    finally:
        c.close()


def raw_exchange(port, data, host="127.0.0.1", timeout=10):
    """Writes raw bytes, reads until the server closes or a full response (by
    Content-Length) has arrived. Returns (status, headers dict lower-case, body, error)."""
    s = socket.create_connection((host, port), timeout=timeout)
    err = None
    buf = b""
    try:
        try:
            s.sendall(data)
        except OSError as e:     # server may answer and close before reading it all
            err = e
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            except OSError as e:
                err = e
                break
            if not chunk:
                break
            buf += chunk
            head, sep, body = buf.partition(b"\r\n\r\n")
            if sep:
                hdrs = _parse_head(head)[1]
                cl = hdrs.get("content-length")
                if cl is not None and len(body) >= int(cl):
                    break
    finally:
        s.close()
    if not buf:
        return None, {}, b"", err
    head, _, body = buf.partition(b"\r\n\r\n")
    status, hdrs = _parse_head(head)
    return status, hdrs, body, err


def _parse_head(head):
    lines = head.decode("latin-1").split("\r\n")
    try:
        status = int(lines[0].split()[1])
    except (IndexError, ValueError):
        status = None
    hdrs = {}
    for l in lines[1:]:
        k, _, v = l.partition(":")
        hdrs[k.strip().lower()] = v.strip()
    return status, hdrs

#!/usr/bin/python3
"""relay — a delaying loopback TCP relay that emulates the WAN between a mirror and its
upstream registry, and counts what crosses it.

    relay.py --upstream 127.0.0.1:5100 --listen NAME=PORT [--listen NAME=PORT ...]
             --control PORT [--rtt-ms 20] [--mbps 1000]

Each NAME is one link (one per target, so every target's upstream traffic is counted on
its own). The emulation, per link:

  * Propagation: every chunk of bytes, in both directions, is delivered RTT/2 after it
    was read (a FIFO delay line), so one request/response exchange costs one RTT.
  * Connection set-up: a new connection's first bytes are forwarded no earlier than one
    RTT after it was accepted (the TCP handshake a real client pays before it can send).
    TLS is not emulated.
  * Bandwidth: the downstream direction (upstream -> mirror) of all connections of one
    link shares one FIFO link of --mbps (serialisation delay n*8/rate per chunk, queued
    behind earlier chunks). 0 = unlimited. Requests are not throttled.
  * Flow control: at most 16 MiB are buffered per direction per connection; beyond that
    the relay stops reading, as a TCP window would.

Counters, per link: connections, requests (one per HTTP/1.1 request head sent upstream,
by kind: base, manifest-tag, manifest-digest, blob, other; method included), bytes each
way, and the downstream *body* bytes (response heads parsed, Content-Length bodies
counted; a HEAD, 204 or 304 has none). The control port speaks tiny HTTP:
  GET  /stats                 -> JSON {link: counters}
  POST /reset                 -> zero every counter
  POST /config?rtt_ms=&mbps=  -> change the emulation (applies to new chunks at once)
This file has no dependencies beyond Python 3.9's standard library.
"""
import argparse
import asyncio
import collections
import json
import re
import socket
import sys
import time
import urllib.parse

CHUNK = 256 * 1024
BUF_MAX = 16 << 20

_REQ_RE = re.compile(rb"^([A-Z]+) (\S+) HTTP/1\.[01]")
_DIGEST_RE = re.compile(r"/manifests/sha(256|512):[0-9a-f]+$")


class Conf:
    rtt = 0.020
    mbps = 1000.0


def _kind(method, path):
    p = path.split("?", 1)[0]
    if p in ("/v2/", "/v2"):
        k = "base"
    elif "/manifests/" in p:
        k = "manifest-digest" if _DIGEST_RE.search(p) else "manifest-tag"
    elif "/blobs/uploads" in p:
        k = "upload"
    elif "/blobs/" in p:
        k = "blob"
    else:
        k = "other"
    return "%s %s" % (method, k)


class Link:
    """One named listener: its counters and its shared downstream link."""

    def __init__(self, name):
        self.name = name
        self.next_free = 0.0  # when the downstream link can start the next chunk
        self.reset()

    def reset(self):
        self.connections = 0
        self.active = 0
        self.requests = 0
        self.by_kind = collections.Counter()
        self.paths = collections.Counter()
        self.up_bytes = 0        # mirror -> upstream
        self.down_bytes = 0      # upstream -> mirror, raw
        self.down_body_bytes = 0  # upstream -> mirror, response bodies only

    def stats(self):
        return {"connections": self.connections, "active": self.active,
                "requests": self.requests, "requests_by_kind": dict(self.by_kind),
                "top_paths": dict(self.paths.most_common(20)),
                "up_bytes": self.up_bytes, "down_bytes": self.down_bytes,
                "down_body_bytes": self.down_body_bytes}


class ReqCounter:
    """Splits the mirror->upstream byte stream into request heads (bodies are only
    expected on pushes, which carry Content-Length and are skipped)."""

    def __init__(self, link, methods):
        self.link = link
        self.methods = methods  # FIFO shared with the response parser
        self.buf = b""
        self.skip = 0

    def feed(self, data):
        if self.skip:
            n = min(self.skip, len(data))
            self.skip -= n
            data = data[n:]
        self.buf += data
        while True:
            if self.skip:
                n = min(self.skip, len(self.buf))
                self.skip -= n
                self.buf = self.buf[n:]
                if self.skip:
                    return
            i = self.buf.find(b"\r\n\r\n")
            if i < 0:
                if len(self.buf) > 1 << 20:
                    self.buf = b""
                return
            head, self.buf = self.buf[:i], self.buf[i + 4:]
            m = _REQ_RE.match(head)
            if not m:
                continue
            method = m.group(1).decode()
            path = m.group(2).decode("latin-1")
            self.link.requests += 1
            self.link.by_kind[_kind(method, path)] += 1
            self.link.paths["%s %s" % (method, urllib.parse.urlsplit(path).path)] += 1
            self.methods.append(method)
            cl = re.search(rb"\r\ncontent-length:\s*(\d+)", head, re.I)
            if cl:
                self.skip = int(cl.group(1))


class RespCounter:
    """Counts response body bytes by parsing response heads (Content-Length framing;
    chunked bodies are counted raw, chunk headers included)."""

    def __init__(self, link, methods):
        self.link = link
        self.methods = methods
        self.buf = b""
        self.body_left = 0
        self.chunked = False

    def feed(self, data):
        while data:
            if self.chunked:
                self.link.down_body_bytes += len(data)
                return
            if self.body_left:
                n = min(self.body_left, len(data))
                self.body_left -= n
                self.link.down_body_bytes += n
                data = data[n:]
                continue
            self.buf += data
            data = b""
            i = self.buf.find(b"\r\n\r\n")
            if i < 0:
                if len(self.buf) > 1 << 20:
                    self.buf = b""
                return
            head, rest = self.buf[:i], self.buf[i + 4:]
            self.buf = b""
            method = self.methods.popleft() if self.methods else "GET"
            m = re.match(rb"HTTP/1\.[01] (\d{3})", head)
            status = int(m.group(1)) if m else 0
            if 100 <= status < 200:
                self.methods.appendleft(method)
            elif method == "HEAD" or status in (204, 304):
                pass
            elif re.search(rb"\r\ntransfer-encoding:\s*chunked", head, re.I):
                self.chunked = True
            else:
                cl = re.search(rb"\r\ncontent-length:\s*(\d+)", head, re.I)
                self.body_left = int(cl.group(1)) if cl else 0
            data = rest


async def pipe(reader, writer, link, accepted_at, downstream, counter):
    """Moves bytes reader -> writer through the delay line."""
    loop = asyncio.get_running_loop()
    q = collections.deque()
    buffered = 0
    have = asyncio.Event()
    room = asyncio.Event()
    room.set()
    eof = False

    async def pump_in():
        nonlocal buffered, eof
        try:
            while True:
                if buffered > BUF_MAX:
                    room.clear()
                    await room.wait()
                data = await reader.read(CHUNK)
                if not data:
                    break
                now = loop.time()
                if downstream:
                    link.down_bytes += len(data)
                else:
                    link.up_bytes += len(data)
                counter.feed(data)
                # Arrival time at the far end: propagation, handshake, serialisation.
                depart = max(now, accepted_at + Conf.rtt) if not downstream else now
                if downstream and Conf.mbps > 0:
                    start = max(depart, link.next_free)
                    link.next_free = start + len(data) * 8 / (Conf.mbps * 1e6)
                    depart = link.next_free
                q.append((depart + Conf.rtt / 2, data))
                buffered += len(data)
                have.set()
        except (ConnectionError, OSError):
            pass
        finally:
            eof = True
            have.set()

    async def pump_out():
        nonlocal buffered
        try:
            while True:
                if not q:
                    if eof:
                        break
                    have.clear()
                    await have.wait()
                    continue
                at, data = q[0]
                delay = at - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                q.popleft()
                writer.write(data)
                buffered -= len(data)
                if buffered <= BUF_MAX:
                    room.set()
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            try:
                if writer.can_write_eof():
                    writer.write_eof()
            except (OSError, RuntimeError):
                pass

    await asyncio.gather(pump_in(), pump_out())


async def handle(link, up_host, up_port, creader, cwriter):
    loop = asyncio.get_running_loop()
    accepted_at = loop.time()
    link.connections += 1
    link.active += 1
    try:
        ureader, uwriter = await asyncio.open_connection(up_host, up_port)
    except OSError:
        link.active -= 1
        cwriter.close()
        return
    methods = collections.deque()
    try:
        await asyncio.gather(
            pipe(creader, uwriter, link, accepted_at, False, ReqCounter(link, methods)),
            pipe(ureader, cwriter, link, accepted_at, True, RespCounter(link, methods)))
    finally:
        link.active -= 1
        for w in (uwriter, cwriter):
            try:
                w.close()
            except Exception:
                pass


async def control(links, reader, writer):
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        writer.close()
        return
    line = head.split(b"\r\n", 1)[0].decode("latin-1")
    method, target = line.split(" ")[:2]
    u = urllib.parse.urlsplit(target)
    q = dict(urllib.parse.parse_qsl(u.query))
    status, body = 200, {}
    if method == "GET" and u.path == "/stats":
        body = {"rtt_ms": Conf.rtt * 1000, "mbps": Conf.mbps, "time": time.time(),
                "links": {n: l.stats() for n, l in links.items()}}
    elif method == "POST" and u.path == "/reset":
        for l in links.values():
            l.reset()
        body = {"ok": True}
    elif method == "POST" and u.path == "/config":
        if "rtt_ms" in q:
            Conf.rtt = float(q["rtt_ms"]) / 1000
        if "mbps" in q:
            Conf.mbps = float(q["mbps"])
        body = {"rtt_ms": Conf.rtt * 1000, "mbps": Conf.mbps}
    else:
        status, body = 404, {"error": "unknown"}
    data = json.dumps(body).encode()
    writer.write(b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                 b"Connection: close\r\n\r\n" % (status, len(data)) + data)
    try:
        await writer.drain()
    finally:
        writer.close()


async def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--upstream", required=True, help="HOST:PORT of the real upstream")
    ap.add_argument("--listen", action="append", required=True, help="NAME=PORT")
    ap.add_argument("--control", type=int, required=True)
    ap.add_argument("--rtt-ms", type=float, default=20.0)
    ap.add_argument("--mbps", type=float, default=1000.0, help="downstream link, 0 = unlimited")
    ap.add_argument("--bind", default="127.0.0.1",
                    help="address of the listeners and the control port (0.0.0.0 in a Pod)")
    a = ap.parse_args()
    Conf.rtt = a.rtt_ms / 1000
    Conf.mbps = a.mbps
    host, port = a.upstream.rsplit(":", 1)
    # Resolved once: a name looked up on every new connection (a Service in a cluster)
    # would add a DNS round trip that is not part of the emulated WAN.
    try:
        host = socket.getaddrinfo(host, int(port), socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
    except OSError as e:
        sys.exit("relay: cannot resolve %s: %s" % (host, e))
    links = {}
    servers = []
    for spec in a.listen:
        name, lport = spec.split("=", 1)
        link = links[name] = Link(name)
        servers.append(await asyncio.start_server(
            lambda r, w, link=link: handle(link, host, int(port), r, w),
            a.bind, int(lport), backlog=1024, limit=1 << 20))
    servers.append(await asyncio.start_server(
        lambda r, w: control(links, r, w), a.bind, a.control))
    print("relay: ready", flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)

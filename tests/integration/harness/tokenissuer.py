"""Docker token-spec issuer for distribution's `auth: token` (in-process, threaded).

GET /token?service=S&scope=repository:NAME:pull[,push][&scope=...] answers
{"token": JWT, "access_token": JWT, "expires_in": N, "issued_at": RFC3339}. The JWT is
ES256-signed; its header carries "kid" in libtrust format (so distribution finds the
key through the certificate in rootcertbundle) and, optionally, "x5c".
Requests are counted per scope string (and per User-Agent) for assertions.

Optional: credentials={user: password} checks an Authorization: Basic header (a wrong one
gets 401; none gets an anonymous token unless require_credentials); every token made is
kept in `issued` (so a test can look for it where it must not be); mangle=f(token) -> bytes
answers 200 with that body instead of the JSON document (a broken issuer).
"""
import base64
import collections
import datetime
import hashlib
import http.server
import json
import os
import threading
import time
import urllib.parse
import uuid

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def libtrust_kid(public_key):
    """libtrust KeyID: sha256(DER SubjectPublicKeyInfo)[:30] -> base32, no padding,
    grouped by 4 with ':' (12 groups)."""
    der = public_key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    s = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode().rstrip("=")
    return ":".join(s[i:i + 4] for i in range(0, len(s), 4))


class TokenIssuer:
    def __init__(self, workdir, service="archmirror-test-registry",
                 issuer="archmirror-test-issuer", expires_in=300, use_x5c=False,
                 grant_push=True, credentials=None, require_credentials=False):
        self.workdir = workdir
        self.service = service
        self.issuer = issuer
        self.expires_in = expires_in
        self.use_x5c = use_x5c
        self.grant_push = grant_push
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "archmirror token signer")])
        self.cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(hours=1))
                     .not_valid_after(now + datetime.timedelta(days=2))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
                     .sign(self.key, hashes.SHA256()))
        self.rootcertbundle = os.path.join(workdir, "token-signer.pem")
        with open(self.rootcertbundle, "wb") as f:
            f.write(self.cert.public_bytes(serialization.Encoding.PEM))
        self.kid = libtrust_kid(self.key.public_key())
        self.lock = threading.Lock()
        self.requests = []                       # (scopes tuple, user-agent, auth header)
        self.scope_counts = collections.Counter()
        self.fail_with = None                    # int status to answer instead of a token
        self.credentials = dict(credentials or {})   # user -> password (Basic)
        self.require_credentials = require_credentials
        self.mangle = None                       # f(token str) -> body bytes (status 200)
        self.issued = []                         # every token made, in order
        self.subjects = []                       # (subject, scopes) per token answered
        self.server = None
        self.thread = None

    # -- token -----------------------------------------------------------------------
    def make_token(self, scopes, subject="anonymous"):
        access = []
        for sc in scopes:
            parts = sc.split(":")
            if len(parts) < 3:
                continue
            typ, name, actions = parts[0], ":".join(parts[1:-1]), parts[-1].split(",")
            allowed = ["pull"] + (["push"] if self.grant_push else [])
            granted = [a for a in actions if a in allowed]
            access.append({"type": typ, "name": name, "actions": granted})
        now = int(time.time())
        header = {"typ": "JWT", "alg": "ES256", "kid": self.kid}
        if self.use_x5c:
            header["x5c"] = [base64.b64encode(
                self.cert.public_bytes(serialization.Encoding.DER)).decode()]
        claims = {"iss": self.issuer, "sub": subject, "aud": self.service,
                  "exp": now + self.expires_in, "nbf": now - 10, "iat": now,
                  "jti": uuid.uuid4().hex, "access": access}
        signing_input = (b64url(json.dumps(header, separators=(",", ":")).encode()) + "." +
                         b64url(json.dumps(claims, separators=(",", ":")).encode()))
        der = self.key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        sig = r.to_bytes(32, "big") + s.to_bytes(32, "big")
        tok = signing_input + "." + b64url(sig)
        with self.lock:
            self.issued.append(tok)
        return tok

    def check_basic(self, header):
        """(ok, subject) for an Authorization header value (None: anonymous)."""
        if not header:
            return (not self.require_credentials), "anonymous"
        scheme, _, b64 = header.partition(" ")
        if scheme.lower() != "basic":
            return False, None
        try:
            user, sep, pw = base64.b64decode(b64, validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return False, None
        if not sep or self.credentials.get(user) != pw:
            return False, None
        return True, user

    # -- server ------------------------------------------------------------------------
    def start(self):
        issuer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_GET(self):
                u = urllib.parse.urlsplit(self.path)
                q = urllib.parse.parse_qs(u.query)
                if u.path != "/token":
                    return self._send(404, {"errors": [{"code": "NOT_FOUND"}]})
                scopes = tuple(q.get("scope", []))
                with issuer.lock:
                    issuer.requests.append((scopes, self.headers.get("User-Agent", ""),
                                            self.headers.get("Authorization")))
                    for sc in scopes or ("",):
                        issuer.scope_counts[sc] += 1
                if issuer.fail_with:
                    return self._send(issuer.fail_with, {"details": "configured failure"})
                if q.get("service", [""])[0] != issuer.service:
                    return self._send(400, {"details": "unknown service"})
                ok, subject = True, "anonymous"
                if issuer.credentials or issuer.require_credentials:
                    ok, subject = issuer.check_basic(self.headers.get("Authorization"))
                if not ok:
                    return self._send(401, {"details": "incorrect username or password"})
                tok = issuer.make_token(scopes, subject=subject)
                with issuer.lock:
                    issuer.subjects.append((subject, scopes))
                if issuer.mangle is not None:
                    return self._send_raw(200, issuer.mangle(tok))
                issued = datetime.datetime.now(datetime.timezone.utc).strftime(
                    "%Y-%m-%dT%H:%M:%SZ")
                self._send(200, {"token": tok, "access_token": tok,
                                 "expires_in": issuer.expires_in, "issued_at": issued})

            def _send(self, status, doc):
                self._send_raw(status, json.dumps(doc).encode())

            def _send_raw(self, status, body):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    @property
    def realm(self):
        return "http://127.0.0.1:%d/token" % self.port

    def registry_auth(self):
        """The dict registry.Registry(token=...) wants."""
        return {"realm": self.realm, "service": self.service, "issuer": self.issuer,
                "rootcertbundle": self.rootcertbundle}

    def reset_counts(self):
        with self.lock:
            self.requests.clear()
            self.scope_counts.clear()

    def counts(self, exclude_agent="archmirror-test-seeder"):
        """Counter of scope -> requests, ignoring the seeding client's requests."""
        c = collections.Counter()
        with self.lock:
            for scopes, agent, _ in self.requests:
                if exclude_agent and agent == exclude_agent:
                    continue
                for sc in scopes or ("",):
                    c[sc] += 1
        return c

    def stop(self):
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

"""Debian docker-registry (distribution 2.8.2) runner and an OCI push/pull client."""
import base64
import http.client
import json
import os
import re
import ssl
import urllib.parse

from . import images, proc

REGISTRY_BIN = os.environ.get("AM_DOCKER_REGISTRY", "/usr/bin/docker-registry")


def _yaml_str(s):
    return json.dumps(str(s))   # JSON strings are valid YAML scalars


class Registry:
    """docker-registry serve <generated config> on 127.0.0.1:<free port>.

    tls=(cert, key) serves HTTPS. token=dict(realm=, service=, issuer=, rootcertbundle=)
    turns on `auth: token`; htpasswd=<file> turns on `auth: htpasswd` (bcrypt entries, realm
    HTPASSWD_REALM) instead. log_level: distribution's log level. Storage lives in
    <workdir>/<name>-storage and survives stop()/start() (so an upstream can be taken down
    and brought back)."""

    HTPASSWD_REALM = "archmirror-test-basic"

    def __init__(self, workdir, name="registry", tls=None, token=None, port=None,
                 htpasswd=None, log_level="warn"):
        assert not (token and htpasswd), "one auth method"
        self.workdir = workdir
        self.name = name
        self.tls = tls
        self.token = token
        self.htpasswd = htpasswd
        self.log_level = log_level
        self.port = port
        self.proc = None
        self.storage = os.path.join(workdir, name + "-storage")
        os.makedirs(self.storage, exist_ok=True)
        self.config_path = os.path.join(workdir, name + "-config.yml")

    @property
    def scheme(self):
        return "https" if self.tls else "http"

    @property
    def hostport(self):
        return "127.0.0.1:%d" % self.port

    @property
    def url(self):
        return "%s://127.0.0.1:%d" % (self.scheme, self.port)

    def _write_config(self):
        lines = [
            "version: 0.1",
            "log:",
            "  level: %s" % self.log_level,
            "  accesslog:",
            "    disabled: true",
            "storage:",
            "  filesystem:",
            "    rootdirectory: %s" % _yaml_str(self.storage),
            "  delete:",
            "    enabled: true",
            "  maintenance:",
            "    uploadpurging:",
            "      enabled: false",
            "http:",
            "  addr: %s" % _yaml_str(self.hostport),
            "  secret: archmirror-test-secret",
        ]
        if self.tls:
            lines += ["  tls:",
                      "    certificate: %s" % _yaml_str(self.tls[0]),
                      "    key: %s" % _yaml_str(self.tls[1])]
        lines += ["  debug:", "    addr: \"\""]
        if self.token:
            t = self.token
            lines += ["auth:", "  token:",
                      "    realm: %s" % _yaml_str(t["realm"]),
                      "    service: %s" % _yaml_str(t["service"]),
                      "    issuer: %s" % _yaml_str(t["issuer"]),
                      "    rootcertbundle: %s" % _yaml_str(t["rootcertbundle"])]
        if self.htpasswd:
            lines += ["auth:", "  htpasswd:",
                      "    realm: %s" % _yaml_str(self.HTPASSWD_REALM),
                      "    path: %s" % _yaml_str(self.htpasswd)]
        with open(self.config_path, "w") as f:
            f.write("\n".join(lines) + "\n")

    def ssl_context(self, cafile=None):
        if not self.tls:
            return None
        ctx = ssl.create_default_context(cafile=cafile)
        if cafile is None:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    def start(self, timeout=20):
        keep_port = self.port is not None
        for attempt in range(3):
            if not keep_port:
                self.port = proc.free_port()
            self._write_config()
            env = dict(os.environ)
            env.pop("REGISTRY_HTTP_ADDR", None)
            self.proc = proc.spawn([REGISTRY_BIN, "serve", self.config_path],
                                   self.name, self.workdir, env=env)
            try:
                proc.wait_http_ready(self.port, "/v2/", proc=self.proc, timeout=timeout,
                                     ok=(200, 401), https_context=self.ssl_context())
                return self
            except proc.NotReady:
                err = self.proc.stderr_text()
                self.proc.stop(timeout=2)
                if "address already in use" in err and attempt < 2 and not keep_port:
                    continue
                raise
        return self

    def stop(self, timeout=10):
        """Stops the registry; returns its exit status (None if not running)."""
        if self.proc is None:
            return None
        rc = self.proc.stop(timeout=timeout)
        self.proc = None
        return rc

    def client(self, token_auth=None, basic=None):
        """basic=(user, password): sent as Authorization: Basic on every request."""
        return OCIClient("127.0.0.1", self.port, tls=bool(self.tls), basic=basic)


class HTTPError(Exception):
    def __init__(self, method, path, status, reason, body):
        super().__init__("%s %s -> %d %s: %r" % (method, path, status, reason, body[:500]))
        self.status = status
        self.body = body


def parse_www_authenticate(value):
    """'Bearer realm="x",service="y",scope="z"' -> ('bearer', {realm:..})."""
    scheme, _, rest = value.strip().partition(" ")
    params = dict(re.findall(r'(\w+)="([^"]*)"', rest))
    return scheme.lower(), params


class OCIClient:
    """Minimal OCI distribution client over http.client (push + get), with Bearer
    token support (anonymous token request, as the docker token spec allows)."""

    def __init__(self, host, port, tls=False, ssl_context=None, timeout=30, basic=None):
        self.host = host
        self.basic = None
        if basic:
            self.basic = "Basic " + base64.b64encode(("%s:%s" % basic).encode()).decode()
        self.port = port
        self.tls = tls
        self.timeout = timeout
        if tls and ssl_context is None:
            ssl_context = ssl._create_unverified_context()
        self.ssl_context = ssl_context
        self.tokens = {}          # scope -> token
        self.token_requests = 0

    def _conn(self):
        if self.tls:
            return http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout,
                                               context=self.ssl_context)
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)

    def _fetch_token(self, params, scope):
        q = {"service": params.get("service", "")}
        if scope:
            q["scope"] = scope
        u = urllib.parse.urlsplit(params["realm"])
        path = u.path + "?" + urllib.parse.urlencode(q)
        c = (http.client.HTTPSConnection(u.hostname, u.port, timeout=self.timeout,
                                         context=ssl._create_unverified_context())
             if u.scheme == "https" else
             http.client.HTTPConnection(u.hostname, u.port, timeout=self.timeout))
        try:
            c.request("GET", path, headers={"User-Agent": "archmirror-test-seeder"})
            r = c.getresponse()
            body = r.read()
            if r.status != 200:
                raise HTTPError("GET", path, r.status, r.reason, body)
            self.token_requests += 1
            doc = json.loads(body)
            return doc.get("token") or doc.get("access_token")
        finally:
            c.close()

    def request(self, method, path, body=None, headers=None, scope=None):
        """Returns (status, reason, headers(HTTPMessage), body). Handles one 401."""
        headers = dict(headers or {})
        headers.setdefault("User-Agent", "archmirror-test-seeder")
        for attempt in range(2):
            h = dict(headers)
            tok = self.tokens.get(scope)
            if tok:
                h["Authorization"] = "Bearer " + tok
            elif self.basic:
                h["Authorization"] = self.basic
            c = self._conn()
            try:
                c.request(method, path, body=body, headers=h)
                r = c.getresponse()
                data = r.read()
            finally:
                c.close()
            if r.status == 401 and attempt == 0:
                scheme, params = parse_www_authenticate(r.getheader("WWW-Authenticate", ""))
                if scheme != "bearer":
                    break
                self.tokens[scope] = self._fetch_token(params, params.get("scope") or scope)
                continue
            return r.status, r.reason, r.headers, data
        return r.status, r.reason, r.headers, data

    # -- push ----------------------------------------------------------------------
    def push_blob(self, repo, blob):
        scope = "repository:%s:pull,push" % repo
        st, reason, h, data = self.request("POST", "/v2/%s/blobs/uploads/" % repo, body=b"",
                                           headers={"Content-Length": "0"}, scope=scope)
        if st != 202:
            raise HTTPError("POST", repo, st, reason, data)
        loc = h["Location"]
        u = urllib.parse.urlsplit(loc)
        path = u.path + "?" + (u.query + "&" if u.query else "") + urllib.parse.urlencode(
            {"digest": blob.digest})
        st, reason, h, data = self.request(
            "PUT", path, body=blob.data,
            headers={"Content-Type": "application/octet-stream",
                     "Content-Length": str(len(blob.data))}, scope=scope)
        if st != 201:
            raise HTTPError("PUT", path, st, reason, data)

    def push_manifest(self, repo, ref, blob):
        scope = "repository:%s:pull,push" % repo
        path = "/v2/%s/manifests/%s" % (repo, ref)
        st, reason, h, data = self.request(
            "PUT", path, body=blob.data,
            headers={"Content-Type": blob.media_type, "Content-Length": str(len(blob.data))},
            scope=scope)
        if st != 201:
            raise HTTPError("PUT", path, st, reason, data)
        got = h.get("Docker-Content-Digest")
        if got and got != blob.digest:
            raise AssertionError("registry computed %s for manifest %s" % (got, blob.digest))

    def push_image(self, repo, tag, img):
        """Pushes blobs, child manifests (by digest), child indexes of a nested index (by
        digest, in order: distribution checks an index's entries exist), then the top
        manifest by tag."""
        for b in images.all_blobs(img):
            self.push_blob(repo, b)
        for c in img["children"].values():
            self.push_manifest(repo, c["manifest"].digest, c["manifest"])
        for i in img.get("indexes", ()):
            self.push_manifest(repo, i.digest, i)
        self.push_manifest(repo, tag, img["top"])
        return img

    def delete_manifest(self, repo, digest):
        """DELETE by digest (the test registry has storage.delete enabled)."""
        path = "/v2/%s/manifests/%s" % (repo, digest)
        st, reason, h, data = self.request("DELETE", path,
                                           scope="repository:%s:pull,push,delete" % repo)
        if st != 202:
            raise HTTPError("DELETE", path, st, reason, data)

    def get_manifest(self, repo, ref, accept=images.ALL_MANIFEST_TYPES, method="GET"):
        return self.request(method, "/v2/%s/manifests/%s" % (repo, ref),
                            headers={"Accept": accept},
                            scope="repository:%s:pull" % repo)


def seed_standard(client, repo_prefix="library"):
    """Pushes the three standard images; returns {key: (repo, tag, img)}:
      multi  -> <prefix>/multi:1.0   OCI index amd64 + arm64/v8 + attestation
      list   -> <prefix>/list:1.0    Docker manifest list amd64, arm64/v8, arm/v7
      single -> <prefix>/single:1.0  Docker schema2 amd64
    """
    out = {}
    for key, builder in (("multi", images.oci_index_image), ("list", images.docker_list_image),
                         ("single", images.docker_single_image)):
        repo = "%s/%s" % (repo_prefix, key)
        img = builder(key)
        client.push_image(repo, "1.0", img)
        out[key] = (repo, "1.0", img)
    return out

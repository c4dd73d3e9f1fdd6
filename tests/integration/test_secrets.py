#!/usr/bin/python3
"""Upstream credentials (issue 7): read from a file or the environment, never logged,
never sent to another host.

Upstreams (one archmirror, log level debug, pull log on), each behind a faultproxy that
records the headers it receives:
  token.test    docker-registry `auth: token` (harness token issuer, which checks Basic
                credentials and keeps every token it issues); password_file
  basic.test    docker-registry `auth: htpasswd` (bcrypt, via the stdlib crypt module);
                password_env
  badbasic.test the htpasswd registry with a wrong password (password_env)
  badtoken.test the token registry with a wrong password (inline "password")
Traffic: curl pulls (tag HEAD/GET, child manifest, every blob) and `ctr images pull`
through archmirror as a mirror (hosts.toml); failure paths that log: wrong password
(registry 401, issuer 401), token endpoint 500 and malformed token responses that
contain a real token; blob redirects to another host (127.0.0.2) and to another port,
a redirect target that answers 401 with a Basic or a Bearer challenge (its realm on a
third server); a client that sends its own Authorization header; --check-config and
--print-config with the real config and with broken ones.

What is asserted:
  * the credentials were used: the issuer got Basic user:password from archmirror, the
    upstreams got the issued Bearer tokens and the Basic header (so the greps below look
    for strings that really passed through archmirror);
  * the redirect targets and the foreign realm got no Authorization header and none of
    the secrets in any header, whatever they answered; the client's own Authorization
    never reaches an upstream;
  * no secret in any file of the work dir after archmirror stopped: archmirror's stderr
    and stdout (every run, CLI runs included), the pull log (pulls.jsonl*), its data dir
    (every file, binary too), curl and ctr output, containerd's logs and root, the
    registries' logs (debug level; a sanity control: they see the credentials) and the
    redirect targets' request log. Secrets: every password, base64(user:password) (also
    as JSON would escape it), the client's credentials, and every token the issuer made
    (whole, and its payload and signature segments). Excluded, because they hold the
    secrets on purpose: the inputs this test wrote (password file, archmirror's config
    file with the inline password, broken configs) and the record of what the issuer and
    the upstream proxies received (in-process, no file: they must see the credentials).
    The control: the same scanner finds every kind of secret in those excluded inputs
    and records, so a miss is not a broken grep.

The token realm (the issuer, on another port) does get the Basic credentials: the
docker token spec sends them there; archmirror only does so for a realm named by its
own upstream's challenge, never for a challenge from a redirect target.
"""
import base64
import json
import os
import secrets
import subprocess
import sys
import unittest
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (archmirror, containerd, faultproxy, images, proc,  # noqa: E402
                     registry, testbase)

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    try:
        import crypt      # stdlib until Python 3.13; libxcrypt does bcrypt ($2b$)
    except ImportError:   # pragma: no cover
        crypt = None

TAG = "1.0"
USER_T, USER_B = "mirror-bot-t", "mirror-bot-b"
PW_T = "pwT-" + secrets.token_hex(12)            # token.test, password_file
PW_B = "pwB-" + secrets.token_hex(12)            # basic.test, password_env
PW_WRONG_B = "pwWB-" + secrets.token_hex(12)     # badbasic.test, password_env
PW_WRONG_T = "pwWT-" + secrets.token_hex(12)     # badtoken.test, inline password
PW_CFG = "pwC-" + secrets.token_hex(12)          # only in broken configs
PW_SHORT = "pwS-" + secrets.token_hex(6)         # 16 bytes: jansson quotes up to 20
SHORT_TOKEN = "st-" + secrets.token_hex(7)       # an opaque token as short as that
NUM_CFG = 700000 + secrets.randbelow(99999)      # a password written as a number
CLIENT_AUTH = ("node-user", "pwN-" + secrets.token_hex(12))   # a client's own credentials
ENV_B, ENV_WRONG = "AM_TEST_BASIC_PASSWORD", "AM_TEST_WRONG_PASSWORD"
SCAN_MAX = 256 * 1024 * 1024


def b64(s):
    return base64.b64encode(s.encode()).decode()


def bcrypt_hash(pw):
    """A bcrypt hash (cost 4: distribution checks it on every request) or None."""
    if crypt is not None and crypt.METHOD_BLOWFISH in crypt.methods:
        h = crypt.crypt(pw, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16))
        if h and h.startswith("$2"):
            return h
    try:
        import bcrypt     # python3-bcrypt, where crypt is gone
    except ImportError:
        return None
    return bcrypt.hashpw(pw.encode(), bcrypt.gensalt(4)).decode()


class Needles:
    """Secrets to look for: label -> bytes, with the forms a log could hold them in."""

    def __init__(self):
        self.items = {}

    def add(self, label, value):
        v = value.encode() if isinstance(value, str) else value
        self.items[label] = v
        if b"/" in v:       # how a JSON writer may escape it
            self.items[label + " (JSON-escaped)"] = v.replace(b"/", b"\\/")

    def add_password(self, label, user, pw):
        self.add(label + " password", pw)
        full = b64("%s:%s" % (user, pw))
        self.add(label + " base64(user:password)", full)
        if full.endswith("="):
            self.add(label + " base64(user:password) unpadded", full.rstrip("="))

    def add_tokens(self, tokens):
        for i, t in enumerate(tokens):
            parts = t.split(".")
            self.add("bearer token #%d" % i, t)
            if len(parts) == 3:     # the header segment is the same for every token
                self.add("bearer token #%d payload" % i, parts[1])
                self.add("bearer token #%d signature" % i, parts[2])

    def find(self, data):
        return [(label, data.find(v)) for label, v in self.items.items() if v in data]


def scan_tree(root, needles, exclude=()):
    """[(path, label, context)] for every regular file under root (not excluded)."""
    hits = []
    excl = set(os.path.realpath(p) for p in exclude)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames
                       if os.path.realpath(os.path.join(dirpath, d)) not in excl]
        for fn in filenames:
            path = os.path.join(dirpath, fn)
            if os.path.realpath(path) in excl or os.path.islink(path):
                continue
            try:
                if not os.path.isfile(path) or os.path.getsize(path) > SCAN_MAX:
                    continue
                with open(path, "rb") as f:
                    data = f.read()
            except OSError:
                continue
            for label, at in needles.find(data):
                ctx = data[max(0, at - 80):at + 80].decode("utf-8", "replace")
                hits.append((os.path.relpath(path, root), label, ctx))
    return hits


class SecretsTest(testbase.IntegrationCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        testbase.require_archmirror()
        if bcrypt_hash("probe") is None:
            raise unittest.SkipTest("no bcrypt for the htpasswd file: Python's crypt module "
                                    "is gone; install python3-bcrypt")
        cls.inputs = os.path.join(cls.workdir, "inputs")     # secrets on purpose
        cls.out = os.path.join(cls.workdir, "out")           # curl, ctr, CLI output
        os.makedirs(cls.inputs)
        os.makedirs(cls.out)
        cls.n_out = 0

        # token.test: `auth: token`; the issuer wants USER_T's Basic credentials once
        # seeding (anonymous, push) is done.
        cls.issuer = cls.start_token_issuer(credentials={USER_T: PW_T})
        cls.reg_t = cls.start_registry(name="reg-token", token=cls.issuer.registry_auth(),
                                       log_level="debug")
        ct = cls.reg_t.client()
        cls.seeded_t = registry.seed_standard(ct)
        cls.redir_t = cls.redirect_image(ct, "redir/t")
        cls.issuer.require_credentials = True

        # basic.test: `auth: htpasswd`
        htpasswd = os.path.join(cls.inputs, "htpasswd")
        with open(htpasswd, "w") as f:
            f.write("%s:%s\n" % (USER_B, bcrypt_hash(PW_B)))
        cls.reg_b = cls.start_registry(name="reg-basic", htpasswd=htpasswd, log_level="debug")
        cb = cls.reg_b.client(basic=(USER_B, PW_B))
        cls.seeded_b = registry.seed_standard(cb)
        cls.redir_b = cls.redirect_image(cb, "redir/b")

        cls.fp_t = cls.start_faultproxy(cls.reg_t, name="fp-token")
        cls.fp_b = cls.start_faultproxy(cls.reg_b, name="fp-basic")
        # Other hosts: blob storage a redirect points at (another address, another port)
        # and a token realm a redirect target's challenge names. Canned answers only.
        cls.dead = proc.DeadPort()
        cls.addClassCleanup(cls.dead.close)
        cls.st_host = cls.foreign("127.0.0.2", "storage-127.0.0.2")
        cls.st_port = cls.foreign("127.0.0.1", "storage-other-port")
        cls.evil = cls.foreign("127.0.0.2", "foreign-realm")
        cls.evil.fake("/token", 200, {"Content-Type": "application/json"},
                      json.dumps({"token": "foreign-token", "expires_in": 300}))

        cls.pw_file = os.path.join(cls.inputs, "token-password")
        with open(cls.pw_file, "w") as f:
            f.write(PW_T + "\n")
        cls.env = {ENV_B: PW_B, ENV_WRONG: PW_WRONG_B}
        with open(os.path.join(cls.inputs, "archmirror.env"), "w") as f:
            f.write("".join("%s=%s\n" % kv for kv in cls.env.items()))
        cls.config = {
            "log_level": "debug",
            "pull_log": {"enabled": True},
            "upstreams": [
                {"name": "token.test", "url": cls.fp_t.url, "username": USER_T,
                 "password_file": cls.pw_file},
                {"name": "basic.test", "url": cls.fp_b.url, "username": USER_B,
                 "password_env": ENV_B},
                {"name": "badbasic.test", "url": cls.fp_b.url, "username": USER_B,
                 "password_env": ENV_WRONG},
                {"name": "badtoken.test", "url": cls.fp_t.url, "username": USER_T,
                 "password": PW_WRONG_T},
            ],
        }
        cls.am = cls.start_archmirror(config=cls.config, env=cls.env, log_level="debug")
        cls.config_path = os.path.join(cls.workdir, cls.am.name + "-config.json")

    @classmethod
    def redirect_image(cls, client, repo):
        m = images.single_manifest(repo, "amd64", oci=False, n_layers=4)
        img = {"kind": "docker-single", "top": m["manifest"], "children": {}, "image": m}
        client.push_image(repo, TAG, img)
        return img

    @classmethod
    def foreign(cls, host, name):
        fp = faultproxy.FaultProxy("127.0.0.1", cls.dead.port, name=name, listen_host=host)
        cls.addClassCleanup(fp.stop)
        fp.start()
        cls.proxies.append(fp)
        return fp

    # -- helpers -----------------------------------------------------------------------
    def out_path(self, label):
        type(self).n_out += 1
        return os.path.join(self.out, "%02d-%s" % (self.n_out, label.replace("/", "_")))

    def curl(self, label, path, method="GET", accept=None, headers=()):
        """curl against archmirror; head and body kept in out/. Returns (status, body)."""
        base = self.out_path(label)
        argv = ["curl", "-sS", "--max-time", "60", "-w", "%{http_code}"]
        if method == "HEAD":
            argv += ["-I", "-o", base + ".head"]
        else:
            argv += ["-D", base + ".head", "-o", base + ".body"]
        if accept:
            argv += ["-H", "Accept: " + accept]
        for h in headers:
            argv += ["-H", h]
        cp = proc.run(argv + [self.am.url + path], timeout=90, check=False)
        shown = [a if a == "-H" or not argv[i - 1] == "-H" else a.split(":")[0] + ": ..."
                 for i, a in enumerate(argv)]      # our own inputs may be secrets
        with open(base + ".curl", "w") as f:
            f.write("%s %s\nrc=%d\nstdout=%s\nstderr=%s\n" % (
                " ".join(shown), path, cp.returncode, cp.stdout, cp.stderr))
        body = b""
        if method != "HEAD" and os.path.exists(base + ".body"):
            with open(base + ".body", "rb") as f:
                body = f.read()
        try:
            return int(cp.stdout.strip()[-3:]), body
        except ValueError:
            return None, body

    def pull_with_curl(self, ns, repo, img, platform="linux/arm64"):
        statuses = []
        q = "?ns=" + ns
        st, _ = self.curl("%s-%s-head" % (ns, repo), "/v2/%s/manifests/%s%s" % (repo, TAG, q),
                          "HEAD", images.CONTAINERD_RESOLVE_ACCEPT)
        statuses.append(st)
        st, body = self.curl("%s-%s-tag" % (ns, repo), "/v2/%s/manifests/%s%s" % (repo, TAG, q),
                             accept=images.CONTAINERD_RESOLVE_ACCEPT)
        self.assertEqual((st, body), (200, img["top"].data), "%s %s tag%s" % (ns, repo,
                                                                             self.context()))
        m = images.platform_manifest(img, platform)
        st, body = self.curl("%s-%s-child" % (ns, repo), "/v2/%s/manifests/%s%s"
                             % (repo, m.digest, q), accept=m.media_type + ", */*")
        self.assertEqual((st, body), (200, m.data), "%s %s child%s" % (ns, repo, self.context()))
        for b in images.all_blobs(img):
            st, body = self.curl("%s-%s-blob" % (ns, repo), "/v2/%s/blobs/%s%s"
                                 % (repo, b.digest, q))
            statuses.append(st)
            self.assertEqual(st, 200, "%s %s blob %s%s" % (ns, repo, b.digest, self.context()))
            self.assertEqual(images.sha256(body), b.digest)
        return statuses

    def auth_headers(self, fp):
        return [e["headers"].get("Authorization") for e in fp.requests()
                if e["headers"].get("Authorization")]

    def archmirror_requests(self, fp):
        return [e for e in fp.requests()
                if e["headers"].get("User-Agent", "").startswith("archmirror/")]

    def needles(self, with_cfg=True):
        n = Needles()
        n.add_password("token.test", USER_T, PW_T)
        n.add_password("basic.test", USER_B, PW_B)
        n.add_password("badbasic.test", USER_B, PW_WRONG_B)
        n.add_password("badtoken.test", USER_T, PW_WRONG_T)
        n.add_password("client", *CLIENT_AUTH)
        n.add("short opaque token", SHORT_TOKEN)
        if with_cfg:
            n.add("broken-config password", PW_CFG)
            n.add("broken-config numeric password", str(NUM_CFG))
            n.add("broken-config short password", PW_SHORT)
        with self.issuer.lock:
            n.add_tokens(list(self.issuer.issued))
        return n

    def assertNoSecret(self, text, what, needles=None):
        data = text.encode() if isinstance(text, str) else text
        found = (needles or self.needles()).find(data)
        self.assertFalse(found, "%s contains %s:\n%s" % (what, [l for l, _ in found],
                                                         data[:3000].decode("utf-8", "replace")))

    # -- traffic -----------------------------------------------------------------------
    def test_1_curl_pulls_use_the_configured_credentials(self):
        for ns, seeded in (("token.test", self.seeded_t), ("basic.test", self.seeded_b)):
            for key in ("multi", "list"):
                repo, _, img = seeded[key]
                with self.subTest(ns=ns, image=key):
                    self.assertNotIn(401, self.pull_with_curl(ns, repo, img))
        # the password file's and the environment's passwords were really used
        got = [(a, ua) for _, ua, a in self.issuer.requests if ua.startswith("archmirror/")]
        self.assertTrue(got, "archmirror never asked the issuer" + self.context())
        self.assertEqual(set(a for a, _ in got), {"Basic " + b64("%s:%s" % (USER_T, PW_T))},
                         "what archmirror sent the token realm")
        with self.issuer.lock:
            issued = set(self.issuer.issued)
        bearer = [a for a in self.auth_headers(self.fp_t) if a.startswith("Bearer ")]
        self.assertTrue(bearer and all(a[7:] in issued for a in bearer),
                        "token.test did not get issued tokens: %r" % bearer[:3])
        self.assertFalse([a for a in self.auth_headers(self.fp_t) if a.startswith("Basic ")],
                         "token.test (the registry, not its realm) got Basic credentials")
        basic = set(self.auth_headers(self.fp_b))
        self.assertEqual(basic, {"Basic " + b64("%s:%s" % (USER_B, PW_B))}, "basic.test got")

    def test_1b_a_clients_own_authorization_stays_with_archmirror(self):
        repo, _, img = self.seeded_b["single"]
        before = len(self.fp_b.requests()) + len(self.fp_t.requests())
        client = "Authorization: Basic " + b64("%s:%s" % CLIENT_AUTH)
        with open(os.path.join(self.inputs, "client-authorization"), "w") as f:
            f.write("%s:%s\n%s\n" % (CLIENT_AUTH + (client,)))
        for ns in ("basic.test", "token.test"):
            st, _ = self.curl("client-auth-" + ns, "/v2/%s/manifests/%s?ns=%s" % (repo, TAG, ns),
                              accept=images.ALL_MANIFEST_TYPES, headers=[client])
            self.assertEqual(st, 200, ns + self.context())
        self.assertGreater(len(self.fp_b.requests()) + len(self.fp_t.requests()), before)
        for fp in (self.fp_b, self.fp_t):
            for e in fp.requests():
                self.assertNotIn(b64("%s:%s" % CLIENT_AUTH), json.dumps(e["headers"]),
                                 "%s got the client's credentials" % fp.name)

    def test_2_ctr_pulls_through_the_mirror(self):
        hosts = os.path.join(self.workdir, "hosts")
        for ns in ("token.test", "basic.test"):
            containerd.write_hosts_toml(hosts, ns, self.dead.url, self.am.url)
        node = self.start_containerd(name="node")
        for ns, seeded in (("token.test", self.seeded_t), ("basic.test", self.seeded_b)):
            repo, tag, img = seeded["single"]
            ref = "%s/%s:%s" % (ns, repo, tag)
            r = node.pull(ref, "linux/amd64", hosts)
            with open(self.out_path("ctr-" + ns), "w") as f:
                f.write(repr(r))
            self.assertTrue(r.ok, "%r%s" % (r, self.context()))
            self.assertEqual(r.digest, img["top"].digest)

    def test_3_a_wrong_password_is_refused_upstream(self):
        for ns, seeded, up, auth in (
                ("badbasic.test", self.seeded_b, self.fp_b,
                 "Basic " + b64("%s:%s" % (USER_B, PW_WRONG_B))),
                ("badtoken.test", self.seeded_t, None,
                 "Basic " + b64("%s:%s" % (USER_T, PW_WRONG_T)))):
            repo, _, img = seeded["list"]
            with self.subTest(ns=ns):
                st, body = self.curl("wrong-" + ns, "/v2/%s/manifests/%s?ns=%s" % (repo, TAG, ns),
                                     accept=images.ALL_MANIFEST_TYPES)
                self.assertNotEqual(st, 200, ns + self.context())
                self.assertGreaterEqual(st or 0, 400, ns)
                self.assertNoSecret(body, "the error body for " + ns)
                # archmirror did send the wrong credentials (so the grep has a target)
                sent = (self.auth_headers(up) if up else
                        [a for _, ua, a in self.issuer.requests if ua.startswith("archmirror/")])
                self.assertIn(auth, sent, ns)
        self.assertRegex(self.am.log(), r"(?i)badtoken\.test.*(token|401|unauthori)",
                         "the refused token request is not in the log")

    def test_4_token_endpoint_failures(self):
        cases = [
            ("500", lambda: setattr(self.issuer, "fail_with", 500)),
            # malformed answers that contain a real token: a parse error must not quote it
            ("control-byte", lambda: setattr(self.issuer, "mangle", lambda t: (
                '{"token":"%s\x01","expires_in":300}' % t).encode())),
            ("missing-colon", lambda: setattr(self.issuer, "mangle", lambda t: (
                '{"token" "%s"}' % t).encode())),
            ("truncated", lambda: setattr(self.issuer, "mangle", lambda t: (
                '{"token":"%s' % t).encode())),
            ("token-with-space", lambda: setattr(self.issuer, "mangle", lambda t: (
                '{"token":"%s %s"}' % (t, t)).encode())),
            # jansson quotes up to 20 bytes near a syntax error: a short opaque token
            ("short-missing-colon", lambda: setattr(self.issuer, "mangle", lambda t: (
                '{"token" "%s"}' % SHORT_TOKEN).encode())),
            ("short-control-byte", lambda: setattr(self.issuer, "mangle", lambda t: (
                '{"token":"%s\x01"}' % SHORT_TOKEN).encode())),
            ("short-newline", lambda: setattr(self.issuer, "mangle", lambda t: (
                '{"token":"%s\n"}' % SHORT_TOKEN).encode())),
        ]
        try:
            for label, arm in cases:
                with self.subTest(case=label):
                    self.issuer.fail_with, self.issuer.mangle = None, None
                    n_issued = len(self.issuer.issued)
                    arm()
                    repo = "library/tokfail-" + label
                    st, body = self.curl("tokfail-" + label, "/v2/%s/manifests/%s?ns=token.test"
                                         % (repo, TAG), accept=images.ALL_MANIFEST_TYPES)
                    self.assertGreaterEqual(st or 0, 400, label + self.context())
                    self.assertNoSecret(body, "the error body (%s)" % label)
                    if label != "500":
                        self.assertGreater(len(self.issuer.issued), n_issued,
                                           "the issuer made no token to leak")
        finally:
            self.issuer.fail_with, self.issuer.mangle = None, None
        self.assertIn("token request to", self.am.log())

    def test_5_redirects_to_other_hosts_get_no_credentials(self):
        for ns, img, fp, repo in (("token.test", self.redir_t, self.fp_t, "redir/t"),
                                  ("basic.test", self.redir_b, self.fp_b, "redir/b")):
            blobs = img["image"]["layers"]    # the config is fetched with the manifest
            self.assertEqual(len(blobs), 4)
            with self.subTest(ns=ns):
                # the manifest first: archmirror then holds a token (or knows Basic) for
                # this repository, so the blob requests carry credentials upstream
                st, _ = self.curl("redir-manifest-" + ns, "/v2/%s/manifests/%s?ns=%s"
                                  % (repo, TAG, ns), accept=images.ALL_MANIFEST_TYPES)
                self.assertEqual(st, 200, ns + self.context())
                plan = [(blobs[0], self.st_host, "/bucket/", 307, 200),
                        (blobs[1], self.st_port, "/bucket/", 302, 200),
                        (blobs[2], self.st_host, "/basic-challenge/", 307, 401),
                        (blobs[3], self.st_host, "/bearer-challenge/", 307, 401)]
                for b, st_fp, prefix, code, answer in plan:
                    target = "%s%s-%s" % (prefix, ns, b.digest[7:])
                    if answer == 200:
                        st_fp.fake(target, 200, {"Content-Type": "application/octet-stream"},
                                   b.data)
                    elif prefix == "/basic-challenge/":
                        st_fp.fake(target, 401, {"WWW-Authenticate": 'Basic realm="storage"'},
                                   b"denied")
                    else:
                        st_fp.fake(target, 401, {"WWW-Authenticate":
                                                 'Bearer realm="%s/token",service="storage",'
                                                 'scope="repository:%s:pull"' % (self.evil.url,
                                                                                repo)}, b"")
                    fp.fake("/v2/%s/blobs/%s" % (repo, b.digest), code,
                            {"Location": "%s%s?X-Amz-Signature=%s" % (st_fp.url, target,
                                                                      secrets.token_hex(8))})
                    st, body = self.curl("redir-%s-%d" % (ns, answer),
                                         "/v2/%s/blobs/%s?ns=%s" % (repo, b.digest, ns))
                    if answer == 200:
                        self.assertEqual(st, 200, "%s via %s%s" % (ns, st_fp.name, self.context()))
                        self.assertEqual(images.sha256(body), b.digest)
                    else:
                        self.assertNotEqual(st, 200, ns + target)
                    self.assertTrue(st_fp.entries(path=target),
                                    "archmirror did not follow the redirect to %s" % target)
                    up = fp.entries(path="/v2/%s/blobs/%s" % (repo, b.digest))
                    self.assertTrue(up and up[-1]["headers"].get("Authorization"),
                                    "the upstream blob request carried no credentials, so "
                                    "this proves nothing" + self.context())
        needles = self.needles()
        for fp in (self.st_host, self.st_port, self.evil):
            for e in fp.requests():
                self.assertIsNone(e["headers"].get("Authorization"),
                                  "%s got %s %s with Authorization" % (fp.name, e["method"],
                                                                       e["target"]))
                self.assertNoSecret(json.dumps(e), "a request to " + fp.name, needles)
        self.assertEqual(self.evil.requests(), [],
                         "a redirect target's challenge sent archmirror to another realm")

    # -- the command line ----------------------------------------------------------------
    def cli(self, label, args, env=None, save=True):
        e = dict(os.environ)
        e.update(env or {})
        cp = subprocess.run([archmirror.binary()] + args, capture_output=True, text=True,
                            timeout=30, env=e)
        if save:
            with open(self.out_path("cli-" + label), "w") as f:
                f.write("argv: %r\nrc: %d\n--- stdout\n%s--- stderr\n%s"
                        % (args, cp.returncode, cp.stdout, cp.stderr))
        archmirror.Archmirror.check_sanitizers(cp.stderr)
        return cp

    def broken_config(self, label, upstream=None, text=None):
        path = os.path.join(self.inputs, "broken-%s.json" % label)
        if text is None:
            u = {"name": "x.test", "url": "http://127.0.0.1:1", "username": USER_B}
            u.update(upstream or {})
            text = json.dumps({"upstreams": [u]}, indent=2)
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_6_check_config_and_print_config(self):
        cp = self.cli("check-config", ["--check-config", self.config_path], env=self.env)
        self.assertEqual(cp.returncode, 0, cp.stderr)
        self.assertIn("OK", cp.stdout)
        cp = self.cli("print-config", ["--config", self.config_path, "--print-config"],
                      env=self.env)
        self.assertEqual(cp.returncode, 0, cp.stderr)
        dump = json.loads(cp.stdout)
        ups = {u["name"]: u for u in dump["upstreams"]}
        for name in ("token.test", "basic.test", "badbasic.test", "badtoken.test"):
            self.assertEqual(ups[name].get("password"), "***", "%s in %s" % (name, cp.stdout))
        self.assertNoSecret(cp.stdout + cp.stderr, "--print-config")
        # with the password source missing the config is refused, naming only the source
        cp = self.cli("check-config-no-env", ["--check-config", self.config_path],
                      env={ENV_B: "", ENV_WRONG: ""})
        self.assertEqual(cp.returncode, 2, cp.stderr)
        self.assertIn(ENV_B, cp.stderr)

    def test_7_config_problems_do_not_echo_passwords(self):
        two_lines = os.path.join(self.inputs, "pw-two-lines")
        with open(two_lines, "w") as f:
            f.write(PW_CFG + "\nsecond line\n")
        large = os.path.join(self.inputs, "pw-large")
        with open(large, "w") as f:
            f.write((PW_CFG + " ") * 400)
        cases = {
            "inline-and-bad-type": {"password": PW_CFG, "insecure": "yes"},
            "number": {"password": NUM_CFG},
            "array": {"password": [PW_CFG]},
            "two-sources": {"password": PW_CFG, "password_env": ENV_B},
            "no-username": {"username": None, "password": PW_CFG},
            "file-two-lines": {"password_file": two_lines},
            "file-too-large": {"password_file": large},
            "unknown-key": {"pasword": PW_CFG},
            "username-with-colon": {"username": "u:" + PW_CFG, "password": PW_CFG},
        }
        for label, u in cases.items():
            with self.subTest(case=label):
                cp = self.cli("broken-" + label, ["--check-config",
                                                  self.broken_config(label, u)], env=self.env)
                out = cp.stdout + cp.stderr
                if label == "username-with-colon":   # checked when the upstream is made
                    cp = self.cli("broken-start-" + label, [
                        "--config", self.broken_config(label, u), "--listen",
                        "127.0.0.1:%d" % proc.free_port(), "--data-dir",
                        os.path.join(self.workdir, "broken-data")], env=self.env)
                    out += cp.stdout + cp.stderr
                self.assertNotEqual(cp.returncode, 0, "%s accepted:\n%s" % (label, out))
                self.assertNoSecret(out, "the problem report for " + label)

    # Problem reports that once quoted a password (config.c: a URL with userinfo, jansson's
    # "near '<text>'"). Their output is not saved in the work dir, so the global scan
    # stays meaningful.
    def assertProblemHidesPassword(self, label, args):
        cp = self.cli(label, args, env=self.env, save=False)
        self.assertNotEqual(cp.returncode, 0, label)
        self.assertNoSecret(cp.stdout + cp.stderr, "the problem report for " + label)

    def test_7b_url_with_credentials_in_the_file(self):
        url = "http://%s:%s@127.0.0.1:1" % (USER_B, PW_CFG)
        self.assertProblemHidesPassword("url-in-file", [
            "--check-config", self.broken_config("url", {"url": url, "username": None})])

    def test_7c_url_with_credentials_on_the_command_line(self):
        url = "http://%s:%s@127.0.0.1:1" % (USER_B, PW_CFG)
        self.assertProblemHidesPassword("url-flag", [
            "--upstream", "x.test=" + url, "--check-config",
            self.broken_config("plain", {"username": None})])

    def test_7d_json_syntax_error_next_to_an_inline_password(self):
        for label, text in (("missing-colon", '"password" "%s"' % PW_SHORT),
                            ("newline-in-string", '"password": "%s\n"' % PW_SHORT)):
            with self.subTest(case=label):
                self.assertProblemHidesPassword("json-" + label, ["--check-config",
                    self.broken_config("json-" + label, text=(
                        '{"upstreams": [{"name": "x.test", "url": "http://127.0.0.1:1",\n'
                        '  "username": "%s", %s}]}\n' % (USER_B, text)))])

    # -- the grep ------------------------------------------------------------------------
    def test_9_no_secret_in_any_log(self):
        for path in ("/metrics", "/api/v1/pulls", "/api/v1/readiness",
                     "/api/v1/platforms?image=token.test/library/multi:1.0"):
            self.curl("admin" + path.split("?")[0], path)
        self.am.stop()      # flushes the pull log
        needles = self.needles()
        # Control: the scanner finds each kind of secret where it is meant to be.
        control = os.path.join(self.inputs, "control")
        os.makedirs(control, exist_ok=True)
        with self.issuer.lock:
            seen_issuer = [{"authorization": a, "agent": ua} for _, ua, a in self.issuer.requests]
            issued = list(self.issuer.issued)
        with open(os.path.join(control, "issuer-received.json"), "w") as f:
            # SHORT_TOKEN: what the mangled answers carried instead of a JWT
            json.dump({"requests": seen_issuer, "issued": issued, "sent": [SHORT_TOKEN]}, f)
        with open(os.path.join(control, "upstreams-received.json"), "w") as f:
            json.dump({fp.name: [e["headers"] for e in fp.requests()]
                       for fp in (self.fp_t, self.fp_b)}, f)
        # The other hosts' record is scanned with the logs: it must be clean.
        with open(os.path.join(self.workdir, "foreign-hosts-received.json"), "w") as f:
            json.dump({fp.name: fp.requests() for fp in (self.st_host, self.st_port, self.evil)},
                      f, default=str)
        found = set(label for _, label, _ in scan_tree(self.inputs, needles))
        with open(self.config_path, "rb") as f:     # the inline password
            found |= set(label for label, _ in needles.find(f.read()))
        expect = [label for label in needles.items          # (not the alternative forms)
                  if not label.startswith("bearer token") and "JSON-escaped" not in label]
        for i in range(len(issued)):
            expect += ["bearer token #%d%s" % (i, part) for part in ("", " payload", " signature")]
        missing = [label for label in expect if label not in found]
        self.assertFalse(missing, "control: the scanner missed these where they are")
        # What was scanned: archmirror's logs and pull log exist and are not empty.
        pulls = os.path.join(self.am.data_dir, "pulls", "pulls.jsonl")
        for p in (os.path.join(self.workdir, self.am.name + ".stderr"), pulls):
            self.assertTrue(os.path.isfile(p) and os.path.getsize(p) > 0, "nothing in " + p)
        hits = scan_tree(self.workdir, needles, exclude=[self.inputs, self.config_path])
        self.assertFalse(hits, "secrets found:\n" + "\n".join(
            "  %s: %s\n      ...%s..." % (p, l, c.replace("\n", "\\n")) for p, l, c in hits))


if __name__ == "__main__":
    testbase.main()

#!/usr/bin/python3
"""deploy/ validated without a cluster.

Static (no processes):
  - every YAML file under deploy/ parses; every Kubernetes object has apiVersion, kind,
    metadata.name; workload selectors match their pod template labels; probes point at
    paths the product serves (/healthz, /readyz; the Envoy router's /healthz comes from
    its health_check filter) and at ports the container declares; kustomizations name
    files that exist;
  - consistency: the mirror address every node uses (node-setup.env, the AL2023 userData,
    the Bottlerocket settings, the daemonset overlay) is the base Service's fixed
    clusterIP:port (or the node-local listener); the registries sent to archmirror are
    archmirror upstreams; the config's listen port and data_dir match the containers;
    the Envoy ring lists exactly the StatefulSet's pods; the AL2023 userData embeds the
    node-setup script byte for byte; Dockerfile runtime stage, Terraform NodePools;
  - PrometheusRules: `promtool check rules` and `promtool test rules` (Debian's
    prometheus package; skipped without promtool).
Rendered: `kubectl kustomize` of base, every overlay and monitoring kustomization, then
  Services/PDBs/NetworkPolicies/ServiceMonitor select existing pods and name declared
  ports, StatefulSets have their headless Service, referenced ConfigMaps exist, and the
  generated archmirror config passes --check-config (skipped when no kubectl with
  kustomize v4+ is on PATH; Debian 12's kubernetes-client 1.20 has kustomize v2.0.3).
With processes:
  - every archmirror JSON config in deploy/ passes `archmirror --check-config`;
  - archmirror serves the probe paths; the Dockerfile's HEALTHCHECK command (bash
    /dev/tcp) reports it healthy;
  - the hosts.toml files the node-setup script writes (arm64 and amd64, fallback and
    mirror-only, _default and per-registry, DIRECT_REGISTRIES) are accepted by the real
    containerd 1.6: `ctr images pull --hosts-dir` through archmirror, every request
    arriving with the node's X-Node-Platform; fallback reaches the registry itself when
    archmirror is down, mirror-only does not.
Debian packages: python3-yaml (+ containerd, docker-registry as for the other tests);
optional: prometheus (promtool), a kubectl with kustomize v4+.
"""
import email
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import unittest
import urllib.parse

try:
    import tomllib
except ImportError:     # Python < 3.11
    tomllib = None

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import archmirror, faultproxy, proc, registry, testbase  # noqa: E402

try:
    import yaml
except ImportError:
    yaml = None

SRC = os.environ.get("AM_SOURCE_DIR") or os.path.abspath(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
DEPLOY = os.path.join(SRC, "deploy")
K8S = os.path.join(DEPLOY, "kubernetes")
BASE = os.path.join(K8S, "base")
OVERLAYS = os.path.join(K8S, "overlays")
NODE_SETUP_DIR = os.path.join(OVERLAYS, "node-setup")
NODE_SETUP_SCRIPT = os.path.join(NODE_SETUP_DIR, "archmirror-node-setup.sh")
KARPENTER = os.path.join(DEPLOY, "karpenter")
ENVOY_CONFIG = os.path.join(OVERLAYS, "replicas", "envoy.yaml")

# YAML files that are not Kubernetes objects (configuration that a ConfigMap carries).
NON_OBJECT_YAML = {ENVOY_CONFIG}
KUSTOMIZE_KINDS = {"Kustomization", "Component"}
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet"}
# What each image serves (the only paths a probe may use).
ARCHMIRROR_PROBE_PATHS = {"/healthz", "/readyz"}
ENVOY_PROBE_PATHS = {"/healthz"}       # envoy.yaml's health_check filter
KUSTOMIZE_DIRS = [BASE] + sorted(
    os.path.join(OVERLAYS, d) for d in os.listdir(OVERLAYS)
    if os.path.isfile(os.path.join(OVERLAYS, d, "kustomization.yaml"))) + [
    os.path.join(DEPLOY, "monitoring", "cluster"),
    os.path.join(DEPLOY, "monitoring", "with-metrics")]


def need_yaml():
    if yaml is None:
        raise unittest.SkipTest("python3-yaml is not installed (Debian package python3-yaml, "
                                "in TEST_PKGS): the deploy/ manifests cannot be parsed")


def rel(path):
    return os.path.relpath(path, SRC)


def read(path):
    with open(path) as f:
        return f.read()


def read_json(path):
    with open(path) as f:
        return json.load(f)


def yaml_files():
    out = []
    for dirpath, _, files in os.walk(DEPLOY):
        for f in files:
            if f.endswith((".yaml", ".yml")):
                out.append(os.path.join(dirpath, f))
    return sorted(out)


def load_all(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def objects(path):
    """Kubernetes objects of a YAML file (kustomizations excluded)."""
    if path in NON_OBJECT_YAML:
        return []
    return [d for d in load_all(path) if d.get("kind") not in KUSTOMIZE_KINDS]


def all_objects():
    out = []
    for p in yaml_files():
        if os.path.basename(p) in ("kustomization.yaml", "kustomization.yml"):
            continue
        for d in objects(p):
            out.append((p, d))
    return out


def pod_spec(obj):
    return obj["spec"]["template"]["spec"]


def pod_labels(obj):
    return obj["spec"]["template"].get("metadata", {}).get("labels", {}) or {}


def containers(obj):
    ps = pod_spec(obj)
    return list(ps.get("initContainers") or []) + list(ps.get("containers") or [])


def selects(selector, labels):
    """matchLabels/matchExpressions semantics (In, NotIn, Exists, DoesNotExist)."""
    if selector is None:
        return False
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions") or []:
        k, op, vals = e["key"], e["operator"], e.get("values") or []
        if op == "In" and labels.get(k) not in vals:
            return False
        if op == "NotIn" and labels.get(k) in vals:
            return False
        if op == "Exists" and k not in labels:
            return False
        if op == "DoesNotExist" and k in labels:
            return False
    return True


def selects_map(sel_map, labels):
    return bool(sel_map) and all(labels.get(k) == v for k, v in sel_map.items())


def declared_ports(container):
    names, numbers = set(), set()
    for p in container.get("ports") or []:
        numbers.add(p["containerPort"])
        if p.get("name"):
            names.add(p["name"])
    return names, numbers


def port_declared(port, pods_containers):
    for c in pods_containers:
        names, numbers = declared_ports(c)
        if (isinstance(port, str) and port in names) or port in numbers:
            return True
    return False


def is_envoy(container):
    return "envoy" in container.get("image", "")


def read_env_file(path):
    env = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                k, _, v = line.partition("=")
                env[k] = v
    return env


def base_service():
    for d in load_all(os.path.join(BASE, "service.yaml")):
        if d["metadata"]["name"] == "archmirror":
            return d
    raise AssertionError("base/service.yaml has no Service archmirror")


def base_mirror_url():
    svc = base_service()
    return "http://%s:%d" % (svc["spec"]["clusterIP"], svc["spec"]["ports"][0]["port"])


def base_config():
    with open(os.path.join(BASE, "archmirror.json")) as f:
        return json.load(f)


def userdata_al2023():
    d = load_all(os.path.join(KARPENTER, "ec2nodeclass-al2023.yaml"))[0]
    msg = email.message_from_string(d["spec"]["userData"])
    return d, msg


def userdata_shell(msg):
    parts = [p for p in msg.get_payload() if p.get_content_type() == "text/x-shellscript"]
    if len(parts) != 1:
        raise AssertionError("AL2023 userData: expected one text/x-shellscript part, got %d"
                             % len(parts))
    return parts[0].get_payload()


def userdata_embedded_script(shell):
    m = re.search(r"^cat > /usr/local/sbin/archmirror-node-setup <<'ARCHMIRROR_NODE_SETUP'\n"
                  r"(.*?)^ARCHMIRROR_NODE_SETUP$", shell, re.S | re.M)
    if not m:
        raise AssertionError("AL2023 userData: no ARCHMIRROR_NODE_SETUP heredoc")
    return m.group(1)


def userdata_invocation_env(shell):
    """KEY="value" assignments on the line(s) that run the script."""
    m = re.search(r"^chmod 0755 /usr/local/sbin/archmirror-node-setup\n(.*?)"
                  r"^\s*/usr/local/sbin/archmirror-node-setup\s*$", shell, re.S | re.M)
    if not m:
        raise AssertionError("AL2023 userData: no invocation of /usr/local/sbin/archmirror-node-setup")
    return dict(re.findall(r'^([A-Z_]+)="([^"]*)"\s*\\$', m.group(1), re.M))


def find_kubectl():
    """(path, reason): a kubectl whose kustomize can render these kustomizations."""
    cand = os.environ.get("AM_KUBECTL") or shutil.which("kubectl")
    if not cand:
        return None, ("no kubectl on PATH (Debian 12's kubernetes-client 1.20 ships kustomize "
                      "v2.0.3, too old for resources-as-directories and envs; set AM_KUBECTL)")
    try:
        cp = subprocess.run([cand, "version", "--client"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, "%s version --client failed: %s" % (cand, e)
    m = re.search(r"Kustomize Version: v?(\d+)\.", cp.stdout)
    if not m:
        v = re.search(r'GitVersion:"([^"]+)"', cp.stdout)
        return None, ("%s (%s) embeds kustomize v2 (kubectl < 1.21; Debian 12's "
                      "kubernetes-client 1.20 has v2.0.3): these kustomizations need v4+"
                      % (cand, v.group(1) if v else "unknown version"))
    if int(m.group(1)) < 4:
        return None, "%s embeds kustomize v%s: these kustomizations need v4+" % (cand, m.group(1))
    return cand, None


def run_node_setup(certs_d, **env):
    e = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "CERTS_D": certs_d,
         "CONTAINERD_CONFIG": "/nonexistent/config.toml", "INTERVAL": "0"}
    e.update({k: str(v) for k, v in env.items()})
    cp = subprocess.run(["/bin/sh", NODE_SETUP_SCRIPT], env=e, stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE, text=True, timeout=30)
    if cp.returncode != 0:
        raise AssertionError("node-setup script exited %d:\n%s" % (cp.returncode, cp.stderr))
    return cp


def header(entry, name):
    for k, v in entry["headers"].items():
        if k.lower() == name.lower():
            return v
    return None


# ---------------------------------------------------------------------------------------
class ManifestTest(unittest.TestCase):
    """Static checks of every file in deploy/."""

    maxDiff = None

    @classmethod
    def setUpClass(cls):
        need_yaml()

    def test_every_yaml_parses(self):
        files = yaml_files()
        self.assertGreater(len(files), 15, "deploy/ lost its manifests?")
        for p in files:
            with self.subTest(file=rel(p)):
                docs = load_all(p)
                self.assertTrue(docs, "empty YAML file")
                for d in docs:
                    self.assertIsInstance(d, dict, "a YAML document that is not a mapping")

    def test_objects_have_required_fields(self):
        n = 0
        for p, d in all_objects():
            with self.subTest(file=rel(p), kind=d.get("kind")):
                self.assertIsInstance(d.get("apiVersion"), str, "apiVersion missing")
                self.assertIsInstance(d.get("kind"), str, "kind missing")
                name = (d.get("metadata") or {}).get("name")
                self.assertIsInstance(name, str, "metadata.name missing")
                self.assertRegex(name, r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
                                 "metadata.name is not a DNS-1123 name")
                self.assertLessEqual(len(name), 253)
                n += 1
        self.assertGreater(n, 20)

    def test_workload_selectors_match_templates(self):
        seen = 0
        for p, d in all_objects():
            if d["kind"] not in WORKLOAD_KINDS:
                continue
            seen += 1
            with self.subTest(file=rel(p), workload=d["metadata"]["name"]):
                sel = d["spec"].get("selector")
                self.assertTrue(sel and (sel.get("matchLabels") or sel.get("matchExpressions")),
                                "no spec.selector")
                self.assertTrue(selects(sel, pod_labels(d)),
                                "selector %s does not match template labels %s"
                                % (sel, pod_labels(d)))
                for tsc in pod_spec(d).get("topologySpreadConstraints") or []:
                    self.assertTrue(selects(tsc["labelSelector"], pod_labels(d)),
                                    "topologySpreadConstraint on %s does not select the "
                                    "workload's own pods" % tsc["topologyKey"])
        self.assertGreaterEqual(seen, 4)

    def test_probes_use_served_paths_and_declared_ports(self):
        seen = 0
        with open(ENVOY_CONFIG) as f:
            envoy = yaml.safe_load(f)
        envoy_health = json.dumps(envoy)
        for p, d in all_objects():
            if d["kind"] not in WORKLOAD_KINDS:
                continue
            for c in containers(d):
                names, numbers = declared_ports(c)
                for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                    pr = c.get(probe)
                    if not pr:
                        continue
                    seen += 1
                    with self.subTest(file=rel(p), container=c["name"], probe=probe):
                        if "exec" in pr:
                            self.assertTrue(pr["exec"].get("command"))
                            continue
                        h = pr.get("httpGet") or pr.get("tcpSocket")
                        self.assertIsNotNone(h, "probe without httpGet/tcpSocket/exec")
                        port = h["port"]
                        self.assertTrue((isinstance(port, str) and port in names)
                                        or port in numbers,
                                        "probe port %r is not declared by the container "
                                        "(ports: %s %s)" % (port, names, numbers))
                        if "httpGet" in pr:
                            allowed = ENVOY_PROBE_PATHS if is_envoy(c) else ARCHMIRROR_PROBE_PATHS
                            self.assertIn(h["path"], allowed,
                                          "probe path not served by %s" % c["image"])
                            if is_envoy(c):
                                self.assertIn("envoy.filters.http.health_check", envoy_health)
                                self.assertIn(h["path"], envoy_health)
                        if d["spec"]["template"]["spec"].get("hostNetwork") and "httpGet" in pr:
                            self.assertEqual(h.get("host"), "127.0.0.1",
                                             "hostNetwork archmirror listens on loopback only")
        self.assertGreaterEqual(seen, 8)

    def test_kustomizations_name_existing_files(self):
        for kdir in KUSTOMIZE_DIRS:
            k = load_all(os.path.join(kdir, "kustomization.yaml"))[0]
            with self.subTest(kustomization=rel(kdir)):
                for r in k.get("resources") or []:
                    path = os.path.normpath(os.path.join(kdir, r))
                    self.assertTrue(os.path.isfile(path) or os.path.isfile(
                        os.path.join(path, "kustomization.yaml")), "missing resource %s" % r)
                for g in k.get("configMapGenerator") or []:
                    for f in (g.get("files") or []) + (g.get("envs") or []):
                        self.assertTrue(os.path.isfile(os.path.join(kdir, f.split("=")[-1])),
                                        "missing generator input %s" % f)

    def test_config_matches_the_containers(self):
        cfg = base_config()
        sts = load_all(os.path.join(BASE, "statefulset.yaml"))[0]
        c = containers(sts)[0]
        port = int(cfg["listen"][0].rsplit(":", 1)[1])
        self.assertEqual(cfg["listen"][0].rsplit(":", 1)[0], "0.0.0.0")
        self.assertIn(port, declared_ports(c)[1], "listen port not declared by the container")
        self.assertEqual(c["args"], ["--config", "/etc/archmirror/archmirror.json"])
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        self.assertEqual(mounts["cache"], cfg["data_dir"], "data_dir is not the PVC mount")
        self.assertEqual(mounts["config"], "/etc/archmirror")
        self.assertIn("cache", [v["metadata"]["name"] for v in sts["spec"]["volumeClaimTemplates"]])
        # Service ports target the container port.
        svc = base_service()
        self.assertEqual(svc["spec"]["ports"][0]["port"], port)
        self.assertIn(svc["spec"]["ports"][0]["targetPort"], declared_ports(c)[0])
        # drain: preStop + server.drain_timeout fit in the grace period
        drain = int(cfg["server"]["drain_timeout"].rstrip("s"))
        self.assertGreater(pod_spec(sts)["terminationGracePeriodSeconds"], drain + 5)
        # daemonset overlay: loopback listener on the declared port, cache mounted
        dcfg = read_json(os.path.join(OVERLAYS, "daemonset", "archmirror.json"))
        ds = load_all(os.path.join(OVERLAYS, "daemonset", "daemonset.yaml"))[0]
        dc = containers(ds)[0]
        host, dport = dcfg["listen"][0].rsplit(":", 1)
        self.assertEqual(host, "127.0.0.1")
        self.assertIn(int(dport), declared_ports(dc)[1])
        self.assertTrue(pod_spec(ds)["hostNetwork"])
        self.assertEqual({m["name"]: m["mountPath"] for m in dc["volumeMounts"]}["cache"],
                         dcfg["data_dir"])

    def test_every_node_uses_the_same_mirror_address(self):
        url = base_mirror_url()
        upstreams = {u["name"] for u in base_config()["upstreams"]}
        ns_env = read_env_file(os.path.join(NODE_SETUP_DIR, "node-setup.env"))
        self.assertEqual(ns_env["MIRROR_URL"], url, "node-setup.env MIRROR_URL != base Service")
        self.assertIn(ns_env["MODE"], ("fallback", "mirror-only"))
        regs = ns_env["REGISTRIES"].split()
        self.assertTrue(set(regs) <= upstreams,
                        "node-setup sends registries archmirror does not serve: %s"
                        % (set(regs) - upstreams))
        # AL2023 userData
        _, msg = userdata_al2023()
        inv = userdata_invocation_env(userdata_shell(msg))
        self.assertEqual(inv.get("MIRROR_URL"), url, "AL2023 userData MIRROR_URL != base Service")
        self.assertIn(inv.get("MODE"), ("fallback", "mirror-only"))
        self.assertTrue(set(inv["REGISTRIES"].split()) <= upstreams)
        # Bottlerocket
        if tomllib is not None:
            br = load_all(os.path.join(KARPENTER, "ec2nodeclass-bottlerocket.yaml"))[0]
            mirrors = tomllib.loads(br["spec"]["userData"])["settings"]["container-registry"]["mirrors"]
            self.assertTrue(mirrors)
            for m in mirrors:
                self.assertEqual(m["endpoint"], [url], m)
                self.assertIn(m["registry"], upstreams, m)
        # daemonset overlay: node-setup points at the node-local listener
        k = load_all(os.path.join(OVERLAYS, "daemonset", "kustomization.yaml"))[0]
        lits = [lit for g in k["configMapGenerator"] if g["name"] == "archmirror-node-setup"
                for lit in g.get("literals", [])]
        dcfg = read_json(os.path.join(OVERLAYS, "daemonset", "archmirror.json"))
        self.assertIn("MIRROR_URL=http://%s" % dcfg["listen"][0], lits)

    def test_userdata_embeds_the_node_setup_script(self):
        d, msg = userdata_al2023()
        self.assertEqual(d["kind"], "EC2NodeClass")
        self.assertTrue(msg.is_multipart())
        self.assertEqual(msg.get_content_type(), "multipart/mixed")
        shell = userdata_shell(msg)
        self.assertTrue(shell.startswith("#!/bin/bash"))
        with open(NODE_SETUP_SCRIPT) as f:
            script = f.read()
        self.assertEqual(userdata_embedded_script(shell), script,
                         "the script in deploy/karpenter/ec2nodeclass-al2023.yaml differs from "
                         "%s: run deploy/karpenter/sync-node-setup.py" % rel(NODE_SETUP_SCRIPT))
        self.assertEqual(d["spec"]["amiSelectorTerms"], [{"alias": "al2023@latest"}])
        # The bash part must be valid shell.
        cp = subprocess.run(["/bin/bash", "-n"], input=shell, text=True,
                            stderr=subprocess.PIPE, timeout=10)
        self.assertEqual(cp.returncode, 0, cp.stderr)
        cp = subprocess.run(["/bin/sh", "-n", NODE_SETUP_SCRIPT], stderr=subprocess.PIPE,
                            text=True, timeout=10)
        self.assertEqual(cp.returncode, 0, cp.stderr)

    def test_userdata_invocation_runs(self):
        """The settings on the AL2023 invocation line produce valid files."""
        _, msg = userdata_al2023()
        inv = userdata_invocation_env(userdata_shell(msg))
        with tempfile.TemporaryDirectory() as d:
            run_node_setup(d, NODE_ARCH="aarch64", **inv)
            f = read(os.path.join(d, "_default", "hosts.toml"))
            self.assertIn('X-Node-Platform = "linux/arm64"', f)
            self.assertIn(inv["MIRROR_URL"], f)

    def test_bottlerocket_userdata(self):
        if tomllib is None:
            self.skipTest("tomllib needs Python 3.11")
        docs = load_all(os.path.join(KARPENTER, "ec2nodeclass-bottlerocket.yaml"))
        nc = docs[0]
        self.assertEqual(nc["kind"], "EC2NodeClass")
        self.assertEqual(nc["spec"]["amiSelectorTerms"], [{"alias": "bottlerocket@latest"}])
        settings = tomllib.loads(nc["spec"]["userData"])
        for m in settings["settings"]["container-registry"]["mirrors"]:
            self.assertEqual(set(m), {"registry", "endpoint"},
                             "Bottlerocket mirrors have only registry and endpoint")
        pool = docs[1]
        self.assertEqual(pool["spec"]["template"]["spec"]["nodeClassRef"]["name"],
                         nc["metadata"]["name"])
        self.assertEqual(pool["spec"]["template"]["metadata"]["labels"]
                         ["archmirror.io/hosts-toml"], "bootstrap")

    def test_node_setup_daemonset_skips_bootstrapped_nodes(self):
        ds = load_all(os.path.join(NODE_SETUP_DIR, "daemonset.yaml"))[0]
        terms = pod_spec(ds)["affinity"]["nodeAffinity"][
            "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
        exprs = [e for t in terms for e in t["matchExpressions"]]
        self.assertIn({"key": "archmirror.io/hosts-toml", "operator": "NotIn",
                       "values": ["bootstrap"]}, exprs)
        c = containers(ds)[0]
        self.assertEqual(c["command"][-1].rsplit("/", 1)[1], os.path.basename(NODE_SETUP_SCRIPT))
        env = {e["name"]: e.get("value") for e in c["env"]}
        self.assertTrue(env["CERTS_D"].startswith("/host/etc/containerd"))
        self.assertFalse(c["securityContext"]["privileged"])
        self.assertEqual(c["securityContext"]["capabilities"]["drop"], ["ALL"])

    def test_replicas_ring_lists_the_statefulset_pods(self):
        with open(ENVOY_CONFIG) as f:
            envoy = yaml.safe_load(f)
        k = load_all(os.path.join(OVERLAYS, "replicas", "kustomization.yaml"))[0]
        replicas = None
        for ptc in k["patches"]:
            if ptc["target"]["kind"] == "StatefulSet":
                replicas = yaml.safe_load(ptc["patch"])[0]["value"]
        self.assertIsInstance(replicas, int)
        sts = load_all(os.path.join(BASE, "statefulset.yaml"))[0]
        ns = load_all(os.path.join(BASE, "kustomization.yaml"))[0]["namespace"]
        cluster = envoy["static_resources"]["clusters"][0]
        self.assertEqual(cluster["lb_policy"], "RING_HASH")
        self.assertTrue(cluster["common_lb_config"]["consistent_hashing_lb_config"]
                        ["use_hostname_for_hashing"])
        eps = [e["endpoint"] for g in cluster["load_assignment"]["endpoints"]
               for e in g["lb_endpoints"]]
        want = ["%s-%d.%s.%s.svc.cluster.local" % (sts["metadata"]["name"], i,
                                                   sts["spec"]["serviceName"], ns)
                for i in range(replicas)]
        self.assertEqual([e["address"]["socket_address"]["address"] for e in eps], want,
                         "envoy.yaml endpoints must list exactly the StatefulSet's pods")
        self.assertEqual([e["hostname"] for e in eps],
                         ["%s-%d" % (sts["metadata"]["name"], i) for i in range(replicas)])
        port = int(base_config()["listen"][0].rsplit(":", 1)[1])
        self.assertEqual({e["address"]["socket_address"]["port_value"] for e in eps}, {port})
        self.assertEqual(cluster["health_checks"][0]["http_health_check"]["path"], "/readyz")
        text = json.dumps(envoy)
        self.assertEqual(text.count('"forward_reason_phrase": true'), 2,
                         "reason phrases (enforce diagnostics) must survive both hops")
        route = envoy["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
            "typed_config"]["route_config"]["virtual_hosts"][0]["routes"][0]["route"]
        rx = route["hash_policy"][0]["header"]["regex_rewrite"]["pattern"]["regex"]
        sub = route["hash_policy"][0]["header"]["regex_rewrite"]["substitution"]
        self.assertEqual(route["hash_policy"][1], {"query_parameter": {"name": "ns"}})
        # The hash key is the repository for every request of one pull (Python's re and
        # RE2 agree on this pattern).
        key = lambda path: re.sub(rx, sub.replace("\\1", r"\1"), path)  # noqa: E731
        repo = "library/nginx"
        for path in ("/v2/library/nginx/manifests/1.27?ns=docker.io",
                     "/v2/library/nginx/manifests/sha256:" + "a" * 64 + "?ns=docker.io",
                     "/v2/library/nginx/blobs/sha256:" + "b" * 64 + "?ns=docker.io"):
            self.assertEqual(key(path), repo, path)
        self.assertEqual(key("/v2/a/b/c/manifests/x"), "a/b/c")

    def test_dockerfile(self):
        with open(os.path.join(DEPLOY, "Dockerfile")) as f:
            text = f.read()
        logical = re.sub(r"\\\n", " ", text)
        froms = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", logical, re.M)
        self.assertEqual(len(froms), 2, "multi-stage: build + runtime")
        args = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", logical, re.M))
        self.assertEqual(args["DEBIAN_BUILD_IMAGE"], "debian:12")
        self.assertEqual(args["DEBIAN_RUNTIME_IMAGE"], "debian:12-slim")
        runtime = logical.split("AS runtime", 1)[1]
        m = re.search(r"apt-get install -y --no-install-recommends\s+([^&]+)&&", runtime)
        self.assertEqual(sorted(m.group(1).split()),
                         sorted(["libuv1", "liblmdb0", "libjansson4", "libssl3",
                                 "ca-certificates"]), "runtime packages")
        user = re.search(r"^USER\s+(\S+)", runtime, re.M).group(1)
        self.assertNotIn(user.split(":")[0], ("0", "root"))
        self.assertIn('VOLUME ["%s"]' % base_config()["data_dir"], runtime)
        port = base_config()["listen"][0].rsplit(":", 1)[1]
        self.assertRegex(runtime, r"(?m)^EXPOSE %s$" % port)
        sts = load_all(os.path.join(BASE, "statefulset.yaml"))[0]
        sc = pod_spec(sts)["securityContext"]
        self.assertEqual("%s:%s" % (sc["runAsUser"], sc["runAsGroup"]), user,
                         "the pod runs as the image's user")
        self.assertIsNotNone(dockerfile_healthcheck())
        self.assertIn('ENTRYPOINT ["/usr/bin/archmirror"]', runtime)
        ign = os.path.join(DEPLOY, "Dockerfile.dockerignore")
        self.assertTrue(os.path.isfile(ign))
        self.assertIn("build", read(ign).split())

    def test_terraform_nodepools(self):
        tf = ""
        for f in sorted(os.listdir(os.path.join(DEPLOY, "terraform"))):
            if f.endswith(".tf"):
                tf += read(os.path.join(DEPLOY, "terraform", f)) + "\n"
        # No terraform binary in Debian: structural checks only.
        code = re.sub(r"(?m)#.*$", "", tf)
        self.assertEqual(code.count("{"), code.count("}"), "unbalanced braces")
        self.assertEqual(len(re.findall(r'(?<!\$)\$\{[A-Z_]+\}', code)), 0,
                         'a literal "${UPPER}" in HCL must be written "$${UPPER}"')
        pools = dict(re.findall(r'name\s*=\s*"(graviton|general)"\s*\n.*?weight\s*=\s*(\d+)',
                                code, re.S))
        self.assertEqual(pools, {"graviton": "30", "general": "10"})
        g = code.split('name   = "graviton"', 1)[1].split('resource "', 1)[0]
        self.assertRegex(g, r'"kubernetes.io/arch", operator = "In", values = \["arm64"\]')
        self.assertRegex(code, r'default\s*=\s*\["c7g", "m7g", "r7g"\]')
        gen = code.split('name   = "general"', 1)[1]
        self.assertRegex(gen, r'"kubernetes.io/arch", operator = "In", values = \["amd64"\]')
        self.assertEqual(code.count('"archmirror.io/hosts-toml" = "bootstrap"'), 1)
        m = re.search(r'file\("\$\{path.module\}/([^"]+)"\)', code)
        nc = os.path.normpath(os.path.join(DEPLOY, "terraform", m.group(1)))
        self.assertTrue(os.path.isfile(nc), nc)
        self.assertIn("${CLUSTER_NAME}", read(nc))
        self.assertIn('default     = "%s"' % load_all(nc)[0]["metadata"]["name"], code)

    def test_monitoring_objects(self):
        sm = load_all(os.path.join(DEPLOY, "monitoring", "with-metrics", "servicemonitor.yaml"))[0]
        services = [d for d in load_all(os.path.join(BASE, "service.yaml"))]
        picked = [s["metadata"]["name"] for s in services
                  if selects(sm["spec"]["selector"], s["metadata"]["labels"])]
        self.assertEqual(picked, ["archmirror-headless"],
                         "scrape the mirror pods through the headless Service only")
        ports = {p["name"] for p in services[1]["spec"]["ports"]}
        for ep in sm["spec"]["endpoints"]:
            self.assertIn(ep["port"], ports)
            self.assertEqual(ep["path"], "/metrics")
        rules = {}
        for f in ("cluster/prometheusrule-cluster.yaml", "with-metrics/prometheusrule-archmirror.yaml"):
            for g in load_all(os.path.join(DEPLOY, "monitoring", f))[0]["spec"]["groups"]:
                for r in g["rules"]:
                    rules[r.get("alert") or r.get("record")] = r["expr"]
        for a in ("ArchmirrorPlatformMismatch", "ArchmirrorUpstreamErrors",
                  "ArchmirrorCacheNearFull", "ArchmirrorCacheVolumeNearFull",
                  "ArchmirrorMirrorUnreachable", "KubePodImagePullBackOff"):
            self.assertIn(a, rules)
        planned = ("archmirror_requests_total", "archmirror_upstream_errors_total",
                   "archmirror_cache_bytes", "archmirror_cache_max_bytes",
                   "archmirror_platform_mismatch_total")
        used = set(re.findall(r"\barchmirror_[a-z_]+", " ".join(rules.values())))
        self.assertTrue(used <= set(planned), "metric outside the documented plan: %s"
                        % (used - set(planned)))
        cluster_exprs = " ".join(r["expr"] for g in load_all(os.path.join(
            DEPLOY, "monitoring", "cluster", "prometheusrule-cluster.yaml"))[0]["spec"]["groups"]
            for r in g["rules"])
        self.assertNotRegex(cluster_exprs, r"\barchmirror_",
                            "monitoring/cluster must work before /metrics exists")


class PromtoolTest(unittest.TestCase):
    """promtool (Debian package prometheus) checks and unit-tests the alert rules."""

    @classmethod
    def setUpClass(cls):
        need_yaml()
        cls.promtool = shutil.which("promtool")
        if not cls.promtool:
            raise unittest.SkipTest("promtool not installed (Debian package prometheus)")
        cls.tmp = tempfile.mkdtemp(prefix="am-promtool-")
        cls.files, cls.bare_files = [], []
        for name, f in (("cluster", "cluster/prometheusrule-cluster.yaml"),
                        ("archmirror", "with-metrics/prometheusrule-archmirror.yaml")):
            spec = load_all(os.path.join(DEPLOY, "monitoring", f))[0]["spec"]
            out = os.path.join(cls.tmp, name + ".rules.yml")
            with open(out, "w") as fh:
                yaml.safe_dump({"groups": spec["groups"]}, fh)
            cls.files.append(out)
            # For `promtool test rules`, which compares annotations exactly: the same
            # rules without them (check_rules validates the annotation templates).
            for g in spec["groups"]:
                for r in g["rules"]:
                    r.pop("annotations", None)
            out = os.path.join(cls.tmp, name + ".bare.rules.yml")
            with open(out, "w") as fh:
                yaml.safe_dump({"groups": spec["groups"]}, fh)
            cls.bare_files.append(out)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def test_check_rules(self):
        cp = subprocess.run([self.promtool, "check", "rules"] + self.files,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60)
        self.assertEqual(cp.returncode, 0, cp.stdout)

    def test_alerts_fire(self):
        tests = {
            "rule_files": self.bare_files,
            "evaluation_interval": "1m",
            "tests": [
                {   # an arm64 node cannot pull: the alert names the node's architecture
                    "interval": "1m",
                    "input_series": [
                        {"series": 'kube_pod_container_status_waiting_reason{namespace="shop",pod="web-1",container="web",reason="ImagePullBackOff"}',
                         "values": "1x20"},
                        {"series": 'kube_pod_info{namespace="shop",pod="web-1",node="ip-10-0-1-5"}',
                         "values": "1x20"},
                        {"series": 'kube_node_labels{node="ip-10-0-1-5",label_kubernetes_io_arch="arm64"}',
                         "values": "1x20"},
                        {"series": 'kube_statefulset_status_replicas_ready{namespace="archmirror",statefulset="archmirror"}',
                         "values": "2 2 2 0x17"},
                        {"series": 'kube_statefulset_replicas{namespace="archmirror",statefulset="archmirror"}',
                         "values": "2x20"},
                        {"series": 'archmirror_platform_mismatch_total{job="archmirror",pod="archmirror-0",image="docker.io/acme/legacy:1.0",platform="linux/arm64"}',
                         "values": "0 0 1 1 1"},
                    ],
                    "alert_rule_test": [
                        {"eval_time": "10m", "alertname": "KubePodImagePullBackOff",
                         "exp_alerts": [{"exp_labels": {
                             "severity": "warning", "namespace": "shop", "pod": "web-1",
                             "container": "web", "node": "ip-10-0-1-5",
                             "label_kubernetes_io_arch": "arm64"}}]},
                        {"eval_time": "10m", "alertname": "ArchmirrorMirrorUnreachable",
                         "exp_alerts": [{"exp_labels": {
                             "severity": "critical", "namespace": "archmirror",
                             "statefulset": "archmirror"}}]},
                        {"eval_time": "1m", "alertname": "ArchmirrorMirrorUnreachable",
                         "exp_alerts": []},
                        {"eval_time": "4m", "alertname": "ArchmirrorPlatformMismatch",
                         "exp_alerts": [{"exp_labels": {
                             "severity": "warning", "image": "docker.io/acme/legacy:1.0",
                             "platform": "linux/arm64"}}]},
                    ],
                },
            ],
        }
        path = os.path.join(self.tmp, "tests.yml")
        with open(path, "w") as fh:
            yaml.safe_dump(tests, fh)
        cp = subprocess.run([self.promtool, "test", "rules", path], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, timeout=60)
        self.assertEqual(cp.returncode, 0, cp.stdout)


class KustomizeRenderTest(unittest.TestCase):
    """`kubectl kustomize` of every kustomization, then cross-object checks on the output."""

    maxDiff = None

    @classmethod
    def setUpClass(cls):
        need_yaml()
        cls.kubectl, reason = find_kubectl()
        if not cls.kubectl:
            raise unittest.SkipTest("kustomize render skipped: " + reason)
        cls.rendered = {}
        for d in KUSTOMIZE_DIRS:
            cp = subprocess.run([cls.kubectl, "kustomize", d], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, timeout=120,
                                env=dict(os.environ, KUBECONFIG="/dev/null"))
            cls.rendered[d] = (cp.returncode, cp.stderr,
                               [x for x in yaml.safe_load_all(cp.stdout) if x] if
                               cp.returncode == 0 else [])

    def each(self):
        for d, (rc, err, docs) in self.rendered.items():
            with self.subTest(kustomization=rel(d)):
                self.assertEqual(rc, 0, "kubectl kustomize %s failed:\n%s" % (rel(d), err))
                yield d, docs

    def test_renders(self):
        for d, docs in self.each():
            self.assertTrue(docs)
            for o in docs:
                self.assertTrue(o.get("apiVersion") and o.get("kind") and o["metadata"].get("name"))

    def test_services_select_pods_and_target_declared_ports(self):
        for d, docs in self.each():
            workloads = [o for o in docs if o["kind"] in WORKLOAD_KINDS]
            for svc in (o for o in docs if o["kind"] == "Service"):
                ns = svc["metadata"].get("namespace")
                pods = [w for w in workloads if w["metadata"].get("namespace") == ns
                        and selects_map(svc["spec"].get("selector"), pod_labels(w))]
                self.assertTrue(pods, "Service %s selects no pods" % svc["metadata"]["name"])
                for p in svc["spec"]["ports"]:
                    tp = p.get("targetPort", p["port"])
                    for w in pods:
                        self.assertTrue(port_declared(tp, containers(w)),
                                        "Service %s targetPort %r not declared by %s"
                                        % (svc["metadata"]["name"], tp, w["metadata"]["name"]))

    def test_selectors_and_references_resolve(self):
        for d, docs in self.each():
            by_kind = {}
            for o in docs:
                by_kind.setdefault(o["kind"], {})[(o["metadata"].get("namespace"),
                                                   o["metadata"]["name"])] = o
            workloads = [o for o in docs if o["kind"] in WORKLOAD_KINDS]
            for (ns, name), sts in by_kind.get("StatefulSet", {}).items():
                hs = by_kind.get("Service", {}).get((ns, sts["spec"]["serviceName"]))
                self.assertIsNotNone(hs, "StatefulSet %s: no Service %s" % (name, sts["spec"]["serviceName"]))
                self.assertEqual(hs["spec"].get("clusterIP"), "None")
            for kind in ("PodDisruptionBudget", "NetworkPolicy"):
                for (ns, name), o in by_kind.get(kind, {}).items():
                    sel = o["spec"].get("selector") or o["spec"].get("podSelector")
                    pods = [w for w in workloads if w["metadata"].get("namespace") == ns
                            and selects(sel, pod_labels(w))]
                    self.assertTrue(pods, "%s %s selects no pods" % (kind, name))
                    if kind == "NetworkPolicy":
                        for rule in o["spec"].get("ingress") or []:
                            for p in rule.get("ports") or []:
                                for w in pods:
                                    self.assertTrue(port_declared(p["port"], containers(w)),
                                                    "NetworkPolicy %s port %r not declared"
                                                    % (name, p["port"]))
            cms = {k for k in by_kind.get("ConfigMap", {})}
            for w in workloads:
                ns = w["metadata"].get("namespace")
                refs = [v["configMap"]["name"] for v in pod_spec(w).get("volumes") or []
                        if "configMap" in v]
                refs += [e["configMapRef"]["name"] for c in containers(w)
                         for e in c.get("envFrom") or [] if "configMapRef" in e]
                for r in refs:
                    self.assertIn((ns, r), cms, "%s refers to missing ConfigMap %s"
                                  % (w["metadata"]["name"], r))
                for c in containers(w):
                    self.assertNotIn(c["image"], ("archmirror",),
                                     "image placeholder not rewritten by images:")
                    self.assertIn(":", c["image"].rsplit("/", 1)[-1], "untagged image")
                if pod_spec(w).get("priorityClassName", "").startswith("archmirror"):
                    self.assertIn((None, pod_spec(w)["priorityClassName"]),
                                  by_kind.get("PriorityClass", {}))
            for (ns, name), sm in by_kind.get("ServiceMonitor", {}).items():
                self.assertTrue(sm["spec"]["endpoints"])

    def test_rendered_archmirror_config_passes_check_config(self):
        testbase.require_archmirror()
        n = 0
        with tempfile.TemporaryDirectory() as tmp:
            for d, docs in self.each():
                for cm in (o for o in docs if o["kind"] == "ConfigMap"):
                    if "archmirror.json" not in (cm.get("data") or {}):
                        continue
                    n += 1
                    path = os.path.join(tmp, "%s.json" % cm["metadata"]["name"])
                    with open(path, "w") as f:
                        f.write(cm["data"]["archmirror.json"])
                    cp = subprocess.run([archmirror.binary(), "--check-config", path],
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, timeout=30)
                    self.assertEqual(cp.returncode, 0, "%s: %s" % (rel(d), cp.stdout))
        self.assertGreaterEqual(n, 3)


def dockerfile_healthcheck():
    """The HEALTHCHECK CMD of deploy/Dockerfile, exec form, as an argv list."""
    with open(os.path.join(DEPLOY, "Dockerfile")) as f:
        logical = re.sub(r"\\\n", " ", f.read())
    m = re.search(r"^HEALTHCHECK\s.*?\bCMD\s+(\[.*\])\s*$", logical, re.M)
    return json.loads(m.group(1)) if m else None


class ArchmirrorServesDeployTest(testbase.IntegrationCase):
    """The binary accepts every config in deploy/ and serves what the probes and the
    image's HEALTHCHECK ask for."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        testbase.require_archmirror()
        cls.dead = proc.DeadPort()
        cls.addClassCleanup(cls.dead.close)
        cls.am = cls.start_archmirror(upstreams=[("docker.io", cls.dead.url)], log_level="info")

    def test_configs_pass_check_config(self):
        n = 0
        for dirpath, _, files in os.walk(DEPLOY):
            for f in files:
                if f.endswith(".json") and "archmirror" in f:
                    n += 1
                    path = os.path.join(dirpath, f)
                    with self.subTest(config=rel(path)):
                        cp = subprocess.run([archmirror.binary(), "--check-config", path],
                                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                            text=True, timeout=30)
                        self.assertEqual(cp.returncode, 0, cp.stdout)
                        self.assertIn("OK", cp.stdout)
        self.assertGreaterEqual(n, 2)

    def test_healthz_served(self):
        r = self.get(self.am, "/healthz")
        self.assertEqual(r.status, 200)

    def test_readyz_served(self):
        r = self.get(self.am, "/readyz")
        if r.status == 404 and os.environ.get("AM_REQUIRE_READYZ") != "1":
            self.skipTest("GET /readyz is not served yet (404): the readiness probes in "
                          "deploy/ use it; AM_REQUIRE_READYZ=1 makes this a failure")
        self.assertEqual(r.status, 200)

    def test_dockerfile_healthcheck_command(self):
        argv = dockerfile_healthcheck()
        self.assertIsNotNone(argv, "no exec-form HEALTHCHECK CMD in deploy/Dockerfile")
        env = dict(os.environ, ARCHMIRROR_HEALTH_PORT=str(self.am.port))
        cp = subprocess.run(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, timeout=10)
        self.assertEqual(cp.returncode, 0, "HEALTHCHECK against a serving archmirror: %s"
                         % cp.stderr)
        env["ARCHMIRROR_HEALTH_PORT"] = str(self.dead.port)
        cp = subprocess.run(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, timeout=10)
        self.assertNotEqual(cp.returncode, 0, "HEALTHCHECK must fail on a dead port")


class NodeSetupContainerdTest(testbase.IntegrationCase):
    """The hosts.toml files the node-setup script writes, fed to the real containerd.

    docker-registry (seeded) <- archmirror (upstream named 127.0.0.1:<registry port>)
    <- "mirror-tap" (a recording proxy: the mirror URL in the files) <- containerd 1.6
    via `ctr images pull --hosts-dir`. The reference is 127.0.0.1:<registry port>/...,
    so without archmirror containerd's own last host is the registry itself."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        need_yaml()
        testbase.require_archmirror()
        cls.registry = cls.start_registry()
        cls.seeded = registry.seed_standard(cls.registry.client())
        cls.reg = cls.registry.hostport
        cls.am = cls.start_archmirror(upstreams=[(cls.reg, cls.registry.url)], log_level="info")
        cls.tap = faultproxy.FaultProxy("127.0.0.1", cls.am.port, name="mirror-tap")
        cls.addClassCleanup(cls.tap.stop)
        cls.tap.start()
        cls.proxies.append(cls.tap)
        cls.ctd = cls.start_containerd()
        cls.defaults = read_env_file(os.path.join(NODE_SETUP_DIR, "node-setup.env"))

    def write(self, name, **env):
        d = os.path.join(self.workdir, "certs.d-" + name)
        shutil.rmtree(d, ignore_errors=True)
        e = dict(self.defaults)
        e.update(MIRROR_URL=self.tap.url)
        e.update(env)
        run_node_setup(d, **e)
        return d

    def ref(self, key="multi"):
        repo, tag, _ = self.seeded[key]
        return "%s/%s:%s" % (self.reg, repo, tag)

    def pull(self, hosts_dir, platform, key="multi"):
        self.ctd.remove_image(self.ref(key))
        return self.ctd.pull(self.ref(key), platform, hosts_dir, timeout=60)

    def assertThroughMirror(self, pr, platform, key="multi"):
        ctx = "%r%s" % (pr, self.context())
        self.assertTrue(pr.ok, ctx)
        self.assertEqual(pr.digest, self.seeded[key][2]["top"].digest, ctx)
        repo, tag, _ = self.seeded[key]
        reqs = self.tap.requests()
        self.assertTrue(reqs, "containerd never contacted the mirror URL: the file was "
                        "ignored" + ctx)
        heads = [e for e in reqs if e["method"] == "HEAD"
                 and e["path"] == "/v2/%s/manifests/%s" % (repo, tag)]
        self.assertTrue(heads, "no tag HEAD through the mirror" + ctx)
        for e in reqs:
            self.assertEqual(header(e, "X-Node-Platform"), platform,
                             "%s %s without the node's platform%s" % (e["method"], e["target"], ctx))
            self.assertIn("ns=" + self.reg, urllib.parse.unquote(e["target"]))

    def test_1_both_modes_both_architectures(self):
        for mode in ("fallback", "mirror-only"):
            for arch, platform in (("aarch64", "linux/arm64"), ("x86_64", "linux/amd64")):
                with self.subTest(mode=mode, arch=arch, file="_default"):
                    d = self.write("%s-%s" % (mode, arch), MODE=mode, NODE_ARCH=arch,
                                   REGISTRIES="docker.io")
                    text = read(os.path.join(d, "_default", "hosts.toml"))
                    self.assertIn('X-Node-Platform = "%s"' % platform, text)
                    if mode == "mirror-only":
                        self.assertIn('server = "%s"' % self.tap.url, text)
                        self.assertRegex(text, r"(?m)^\[host\]$")
                    else:
                        self.assertNotRegex(text, r"(?m)^server")
                        self.assertIn('[host."%s"]' % self.tap.url, text)
                    self.tap.reset()
                    self.assertThroughMirror(self.pull(d, platform), platform)

    def test_2_per_registry_file(self):
        """certs.d/<registry>/hosts.toml (what the script writes for REGISTRIES), no _default."""
        for mode in ("fallback", "mirror-only"):
            with self.subTest(mode=mode):
                d = self.write("per-registry-" + mode, MODE=mode, NODE_ARCH="aarch64",
                               REGISTRIES=self.reg, WRITE_DEFAULT="no")
                self.assertEqual(os.listdir(d), [self.reg])
                self.tap.reset()
                self.assertThroughMirror(self.pull(d, "linux/arm64", "list"), "linux/arm64", "list")

    def test_3_mirror_down(self):
        """fallback: containerd reaches the registry itself; mirror-only: it does not."""
        fb = self.write("down-fallback", MODE="fallback", NODE_ARCH="x86_64", REGISTRIES="")
        mo = self.write("down-mirror-only", MODE="mirror-only", NODE_ARCH="x86_64", REGISTRIES="")
        self.tap.set_down("refuse")
        try:
            pr = self.pull(fb, "linux/amd64", "single")
            self.assertTrue(pr.ok, "fallback mode, mirror down: %r" % pr)
            self.assertEqual(pr.digest, self.seeded["single"][2]["top"].digest)
            pr = self.pull(mo, "linux/amd64", "single")
            self.assertFalse(pr.ok, "mirror-only mode must not reach the registry: %r" % pr)
            self.assertIn(str(self.tap.port), pr.stderr)
        finally:
            self.tap.set_up()

    def test_4_direct_registries_bypass_the_mirror(self):
        d = self.write("direct", MODE="mirror-only", NODE_ARCH="aarch64", REGISTRIES="",
                       DIRECT_REGISTRIES=self.reg)
        text = read(os.path.join(d, self.reg, "hosts.toml"))
        self.assertIn('server = "https://%s"' % self.reg, text)
        # The test registry is plain HTTP: point the generated file at it the way the
        # script would for an http registry (the script writes https://, as registries
        # on the internet are). Everything else about the file is kept.
        with open(os.path.join(d, self.reg, "hosts.toml"), "w") as f:
            f.write(text.replace("https://" + self.reg, self.registry.url))
        self.tap.reset()
        pr = self.pull(d, "linux/arm64")
        self.assertTrue(pr.ok, "%r" % pr)
        self.assertEqual(self.tap.requests(), [], "a DIRECT registry went through the mirror")


if __name__ == "__main__":
    testbase.main()

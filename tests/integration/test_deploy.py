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
deploy/bench/ (the c7g-vs-c7i kit; nothing here needs a cluster or AWS):
  - its YAML parses; Jobs, mirror overlays and the Terraform NodePools select the same
    arch / instance type / pool label and the same taint; the Jobs, mirrors, relays and
    upstream point at each other's Service names and ports; every script the Jobs run is
    in the bench image and survives its dockerignore; the scripts compile and answer
    --help; run.sh passes bash -n (and shellcheck when installed); bench/run still has
    what the kit imports from it;
  - Terraform without terraform: delimiters balanced, every var./local. reference
    declared and every variable used (deploy/terraform too); with a terraform binary,
    `fmt -check`, then `validate` and `plan` of a copy where kubectl_manifest is
    terraform_data (no provider download), reading the NodePools back from the plan;
  - the rendered bench (kubectl kustomize): one namespace, no fixed ClusterIP, no
    PriorityClass, one emptyDir-cached mirror per node type, each Service selecting only
    its own mirror, the NetworkPolicy's DNS peer untouched;
  - compare.py on two sample results (one a log with the markers): the ratios it prints;
  - deploy/bench/rehearse.py end to end on loopback when bench/loadgen is built.
Debian packages: python3-yaml (+ containerd, docker-registry as for the other tests);
optional: prometheus (promtool), a kubectl with kustomize v4+, terraform, shellcheck.
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
DISTRIBUTION_PROBE_PATHS = {"/v2/"}    # docker-registry, the bench's upstream
# deploy/bench/: the c7g-vs-c7i kit (deploy/bench/README.md).
BENCH = os.path.join(DEPLOY, "bench")
BENCH_K8S = os.path.join(BENCH, "kubernetes")
BENCH_JOBS = os.path.join(BENCH_K8S, "jobs")
BENCH_TF = os.path.join(BENCH, "terraform")
BENCH_NODES = {"c7g": "arm64", "c7i": "amd64"}     # node type -> kubernetes.io/arch
BENCH_KUSTOMIZE_DIRS = [BENCH_K8S, BENCH_JOBS, os.path.join(BENCH_K8S, "images"),
                        os.path.join(BENCH_K8S, "mirror", "component")] + [
    os.path.join(BENCH_K8S, "mirror", n) for n in BENCH_NODES]
KUSTOMIZE_DIRS = [BASE] + sorted(
    os.path.join(OVERLAYS, d) for d in os.listdir(OVERLAYS)
    if os.path.isfile(os.path.join(OVERLAYS, d, "kustomization.yaml"))) + [
    os.path.join(DEPLOY, "monitoring", "cluster"),
    os.path.join(DEPLOY, "monitoring", "with-metrics"),
    BENCH_K8S, BENCH_JOBS]


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


def is_distribution(container):
    """distribution's image (registry:TAG, docker.io/library/registry:TAG, a copy)."""
    return container.get("image", "").rsplit("/", 1)[-1].split(":")[0] == "registry"


def probe_paths(container):
    if is_envoy(container):
        return ENVOY_PROBE_PATHS
    if is_distribution(container):
        return DISTRIBUTION_PROBE_PATHS
    return ARCHMIRROR_PROBE_PATHS


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
                            allowed = probe_paths(c)
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


# ---------------------------------------------------------------------------------------
# deploy/bench/: the c7g-vs-c7i kit. Offline only: no cluster, no terraform providers,
# no Docker engine.

def hcl_scan(text):
    """(code, problems) of HCL text: comments removed, the literal parts of strings
    blanked (their ${...} interpolations kept), delimiters checked for balance."""
    out, problems, stack = [], [], []
    modes = ["code"]       # "code" | "str" | "interp"
    depth = [0]            # brace depth inside each interpolation
    i, n, line = 0, len(text), 1
    while i < n:
        c = text[i]
        if c == "\n":
            line += 1
        mode = modes[-1]
        if mode == "str":
            if c == "\\" and i + 1 < n:
                out.append("  ")
                i += 2
                continue
            if text.startswith("$${", i) or text.startswith("%%{", i):
                out.append("   ")        # an escaped, literal "${" / "%{"
                i += 3
                continue
            if text.startswith("${", i) or text.startswith("%{", i):
                modes.append("interp")
                depth.append(0)
                out.append("${")
                i += 2
                continue
            if c == '"':
                modes.pop()
                out.append('"')
            elif c == "\n":
                problems.append("line %d: newline inside a string" % line)
                out.append(c)
            else:
                out.append(" ")
            i += 1
            continue
        # code or interpolation
        if c == "#" or text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
            continue
        if text.startswith("/*", i):
            j = text.find("*/", i + 2)
            if j < 0:
                problems.append("line %d: unterminated /* comment" % line)
                break
            line += text.count("\n", i, j)
            i = j + 2
            continue
        if c == '"':
            modes.append("str")
            out.append(c)
            i += 1
            continue
        if mode == "interp" and c == "}" and depth[-1] == 0:
            modes.pop()
            depth.pop()
            out.append(c)
            i += 1
            continue
        if c in "([{":
            stack.append((c, line))
            if mode == "interp" and c == "{":
                depth[-1] += 1
        elif c in ")]}":
            want = {")": "(", "]": "[", "}": "{"}[c]
            if not stack or stack[-1][0] != want:
                problems.append("line %d: unmatched %r" % (line, c))
            else:
                stack.pop()
            if mode == "interp" and c == "}":
                depth[-1] -= 1
        out.append(c)
        i += 1
    for c, ln in stack:
        problems.append("line %d: %r never closed" % (ln, c))
    if len(modes) > 1:
        problems.append("unterminated string or interpolation")
    return "".join(out), problems


def hcl_module(directory):
    """{file: text} of a module's .tf files."""
    return {f: read(os.path.join(directory, f)) for f in sorted(os.listdir(directory))
            if f.endswith(".tf")}


def hcl_locals(code):
    names = set()
    for m in re.finditer(r"(?m)^locals\s*\{\n(.*?)^\}", code, re.S):
        names |= set(re.findall(r"(?m)^  ([A-Za-z_][A-Za-z0-9_]*)\s*=", m.group(1)))
    return names


def check_hcl_module(tc, directory):
    """Structural checks of a Terraform module without terraform: balanced delimiters,
    every var./local. reference declared, every variable used, tfvars keys declared."""
    code = ""
    for f, text in hcl_module(directory).items():
        c, problems = hcl_scan(text)
        tc.assertEqual(problems, [], "%s: %s" % (rel(os.path.join(directory, f)), problems))
        code += c + "\n"
    raw = "\n".join(hcl_module(directory).values())
    declared = set(re.findall(r'(?m)^variable\s+"([A-Za-z_][A-Za-z0-9_]*)"', raw))
    used = set(re.findall(r"\bvar\.([A-Za-z_][A-Za-z0-9_]*)", code))
    tc.assertTrue(declared, "no variables in %s" % rel(directory))
    tc.assertEqual(used - declared, set(), "%s: var.* not declared" % rel(directory))
    tc.assertEqual(declared - used, set(), "%s: variables never used" % rel(directory))
    loc = hcl_locals(raw)
    used_l = set(re.findall(r"\blocal\.([A-Za-z_][A-Za-z0-9_]*)", code))
    tc.assertEqual(used_l - loc, set(), "%s: local.* not defined" % rel(directory))
    for m in re.finditer(r'(?m)^variable\s+"(\w+)"\s*\{(.*?)^\}', raw, re.S):
        tc.assertRegex(m.group(2), r'description\s*=\s*"', "variable %s: no description" % m.group(1))
        tc.assertRegex(m.group(2), r"type\s*=", "variable %s: no type" % m.group(1))
    tc.assertEqual(len(re.findall(r'(?<!\$)\$\{[A-Z_]+\}', code)), 0,
                   'a literal "${UPPER}" in HCL must be written "$${UPPER}"')
    ex = os.path.join(directory, "terraform.tfvars.example")
    if os.path.isfile(ex):
        keys = set(re.findall(r"(?m)^#?\s*([a-z_][a-z0-9_]*)\s*=", read(ex)))
        tc.assertTrue(keys)
        tc.assertEqual(keys - declared, set(), "terraform.tfvars.example: unknown variables")
    return raw, declared


def hcl_default(raw, name):
    m = re.search(r'(?ms)^variable\s+"%s"\s*\{.*?default\s*=\s*("?)([^"\n]*)\1\s*$' % name, raw)
    return m.group(2) if m else None


def bench_job(node):
    return load_all(os.path.join(BENCH_JOBS, "bench-%s.yaml" % node))[0]


def job_args(job):
    args = containers(job)[0]["args"]
    return {args[i]: args[i + 1] for i in range(0, len(args) - 1)
            if args[i].startswith("--") and not args[i + 1].startswith("--")}


def mirror_node_selector(node):
    k = load_all(os.path.join(BENCH_K8S, "mirror", node, "kustomization.yaml"))[0]
    for p in k["patches"]:
        for op in yaml.safe_load(p["patch"]):
            if op["path"] == "/spec/template/spec/nodeSelector":
                return op["value"]
    raise AssertionError("mirror/%s sets no nodeSelector" % node)


def relay_listens(node):
    d = next(x for x in load_all(os.path.join(BENCH_K8S, "relays.yaml"))
             if x["kind"] == "Deployment" and x["metadata"]["name"] == "relay-" + node)
    args = containers(d)[0]["args"]
    out = {}
    for i, a in enumerate(args):
        if a == "--listen":
            name, port = args[i + 1].split("=")
            out[name] = int(port)
        elif a == "--control":
            out["control"] = int(args[i + 1])
        elif a == "--upstream":
            out["upstream_addr"] = args[i + 1]
    return d, out


def hostport(url):
    u = urllib.parse.urlsplit(url)
    return u.hostname, u.port


def import_bench(name):
    """A deploy/bench/ module, imported without writing __pycache__ into the checkout."""
    import importlib
    keep = sys.dont_write_bytecode
    sys.dont_write_bytecode = True
    sys.path.insert(0, BENCH)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(BENCH)
        sys.dont_write_bytecode = keep


def bench_loadgen():
    p = os.environ.get("AM_LOADGEN") or os.path.join(
        os.environ.get("AM_BUILD_DIR") or os.path.join(SRC, "build", "dev"), "bench", "loadgen")
    return p if os.access(p, os.X_OK) else None


def sample_bench_doc(node, pull_p50s, get_rps, blob_mbs, upstream_p50s, cpu_usec=None):
    """A small result document in eksbench.py's (= bench/run's) shape."""
    results = []
    for r, (a, b, c, d) in enumerate(zip(pull_p50s, get_rps, blob_mbs, upstream_p50s), 1):
        for target, p50 in (("archmirror", a), ("upstream", d)):
            results.append({
                "scenario": "cold-single", "round": r, "target": target, "kind": "pull",
                "loadgen": {"mode": "pull", "errors": 0, "image_bytes": 1000,
                            "pull_latency_s": {"p50": p50, "p90": p50, "p99": p50 * 1.5,
                                               "max": p50 * 2}},
                "upstream": {"requests": 7, "down_body_bytes": 1000,
                             "requests_by_kind": {"GET blob": 4}}})
        results.append({
            "scenario": "manifest-get-c16", "round": r, "target": "archmirror", "kind": "simple",
            "loadgen": {"mode": "get", "errors": 0, "req_per_s": b, "bytes_per_s": b * 1000.0,
                        "requests": int(b), "request_latency_s": {"p50": 0.0002, "p99": 0.004}},
            "upstream": {"requests": 0, "down_body_bytes": 0, "requests_by_kind": {}}})
        results.append({
            "scenario": "blob-1m", "round": r, "target": "archmirror", "kind": "simple",
            "loadgen": {"mode": "get", "errors": 0, "req_per_s": c, "bytes_per_s": c * 1e6,
                        "requests": int(c), "request_latency_s": {"p50": 0.001, "p99": 0.008}},
            "upstream": None})
    meta = {"node_type": node, "instance_type": node + ".xlarge", "relay": True,
            "rtt_ms": 20, "mbps": 1000,
            "cpu": {"sha256_extensions": ["sha2"] if node == "c7g" else ["sha_ni"]},
            "openssl_speed": {"sha256": {"bytes_per_s": 1.6e9}}}
    if cpu_usec:
        meta["mirror_cpu"] = {"before_usec": 0, "after_usec": cpu_usec}
    return {"meta": meta, "summary": {}, "results": results, "failures": []}


def md_row(md, *cells, ncells=None):
    """The Markdown table row starting with these cells (and of ncells cells), split."""
    for line in md.splitlines():
        parts = [p.strip() for p in line.strip().strip("|").split("|")]
        if parts[:len(cells)] == list(cells) and ncells in (None, len(parts)):
            return parts
    raise AssertionError("no row %s in:\n%s" % (cells, md))


class BenchKitTest(unittest.TestCase):
    """deploy/bench/: manifests, Terraform, scripts, image recipe, compare.py."""

    maxDiff = None

    @classmethod
    def setUpClass(cls):
        need_yaml()

    def test_every_bench_yaml_parses(self):
        files = [p for p in yaml_files() if p.startswith(BENCH + os.sep)]
        self.assertGreaterEqual(len(files), 12, "deploy/bench lost its manifests?")
        for p in files:
            with self.subTest(file=rel(p)):
                docs = load_all(p)
                self.assertTrue(docs)
                for d in docs:
                    self.assertIsInstance(d, dict)
                    self.assertTrue(d.get("apiVersion") and d.get("kind"))

    def test_bench_kustomizations_name_existing_files(self):
        for kdir in BENCH_KUSTOMIZE_DIRS:
            k = load_all(os.path.join(kdir, "kustomization.yaml"))[0]
            with self.subTest(kustomization=rel(kdir)):
                for r in (k.get("resources") or []) + (k.get("components") or []):
                    path = os.path.normpath(os.path.join(kdir, r))
                    self.assertTrue(os.path.isfile(path) or os.path.isfile(
                        os.path.join(path, "kustomization.yaml")), "missing %s" % r)
                for g in k.get("configMapGenerator") or []:
                    for f in g.get("files") or []:
                        self.assertTrue(os.path.isfile(os.path.join(kdir, f.split("=")[-1])))
                for c in k.get("components") or []:
                    ck = load_all(os.path.join(kdir, c, "kustomization.yaml"))[0]
                    self.assertEqual(ck["kind"], "Component")
        # the mirrors are overlays of the product's base, not copies of it
        for n in BENCH_NODES:
            k = load_all(os.path.join(BENCH_K8S, "mirror", n, "kustomization.yaml"))[0]
            self.assertIn("../../../../kubernetes/base", k["resources"])
            self.assertEqual(os.path.normpath(os.path.join(BENCH_K8S, "mirror", n,
                                                           k["resources"][0])), BASE)
            self.assertEqual(k["nameSuffix"], "-" + n)

    def test_terraform_module(self):
        raw, declared = check_hcl_module(self, BENCH_TF)
        for v in ("cluster_name", "node_class_name", "node_count", "c7g_instance_type",
                  "c7i_instance_type", "zone"):
            self.assertIn(v, declared)
        c7g, c7i = hcl_default(raw, "c7g_instance_type"), hcl_default(raw, "c7i_instance_type")
        self.assertEqual((c7g, c7i), ("c7g.xlarge", "c7i.xlarge"))
        self.assertEqual(c7g.split(".")[1], c7i.split(".")[1], "the pair must be equal size")
        self.assertEqual(hcl_default(raw, "node_class_name"),
                         load_all(os.path.join(KARPENTER, "ec2nodeclass-al2023.yaml"))[0]
                         ["metadata"]["name"], "default node class = deploy/karpenter's")
        self.assertRegex(raw, r'source\s*=\s*"gavinbunney/kubectl"', "the deploy/terraform style")
        self.assertRegex(raw, r'(?s)c7g = \{\s*arch\s*=\s*"arm64"\s*instance_type\s*=\s*var.c7g_instance_type')
        self.assertRegex(raw, r'(?s)c7i = \{\s*arch\s*=\s*"amd64"\s*instance_type\s*=\s*var.c7i_instance_type')
        self.assertRegex(raw, r'(?s)c7g = \{[^}]*count\s*=\s*var.node_count')
        self.assertRegex(raw, r'(?s)c7i = \{[^}]*count\s*=\s*var.node_count')
        self.assertRegex(raw, r'cpu = tostring\(each.value.count \* each.value.vcpus\)')
        # the label and taint the manifests select and tolerate
        self.assertRegex(raw, r'pool_label_key = "archmirror.io/bench-pool"')
        self.assertRegex(raw, r'(?s)taint = \{\s*key\s*=\s*"archmirror.io/bench"\s*value\s*=\s*"true"'
                              r'\s*effect\s*=\s*"NoSchedule"')
        # and deploy/terraform passes the same structural checks
        check_hcl_module(self, os.path.join(DEPLOY, "terraform"))

    def test_pods_land_only_on_their_pools(self):
        taint = {"key": "archmirror.io/bench", "operator": "Equal", "value": "true",
                 "effect": "NoSchedule"}
        raw = "\n".join(hcl_module(BENCH_TF).values())
        for n, arch in BENCH_NODES.items():
            with self.subTest(node=n):
                job = bench_job(n)
                ps = pod_spec(job)
                want = {"kubernetes.io/arch": arch,
                        "node.kubernetes.io/instance-type": hcl_default(raw, "%s_instance_type" % n),
                        "archmirror.io/bench-pool": n}
                self.assertEqual(ps["nodeSelector"], want, "Job bench-%s" % n)
                self.assertEqual(mirror_node_selector(n), want, "mirror/%s" % n)
                self.assertIn(taint, ps["tolerations"])
                self.assertTrue(job["spec"]["suspend"], "bench Jobs start suspended (one at a time)")
                self.assertEqual(job["spec"]["backoffLimit"], 0, "a failed run is not retried")
                anti = ps["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]
                self.assertEqual(anti["topologyKey"], "kubernetes.io/hostname")
                self.assertEqual(anti["labelSelector"]["matchLabels"],
                                 {"app.kubernetes.io/component": "mirror"})
                env = {e["name"]: e.get("value") for e in containers(job)[0]["env"]}
                self.assertEqual(env["INSTANCE_TYPE"], want["node.kubernetes.io/instance-type"])
                args = job_args(job)
                self.assertEqual(args["--node-type"], n)
                self.assertEqual(args["--platform"], "linux/" + arch)
                self.assertEqual(job["metadata"]["annotations"] if "annotations" in job["metadata"]
                                 else job["spec"]["template"]["metadata"]["annotations"],
                                 {"karpenter.sh/do-not-disrupt": "true"})
        comp = load_all(os.path.join(BENCH_K8S, "mirror", "component", "kustomization.yaml"))[0]
        ops = [op for p in comp["patches"] for op in (yaml.safe_load(p["patch"]) or [])
               if isinstance(op, dict) and op.get("path") == "/spec/template/spec/tolerations"]
        self.assertEqual([op["value"] for op in ops], [[taint]], "mirrors tolerate the taint")
        # what is not under test runs on the infra pool
        infra = [d for f in ("upstream.yaml", "relays.yaml")
                 for d in load_all(os.path.join(BENCH_K8S, f)) if d["kind"] == "Deployment"]
        infra.append(load_all(os.path.join(BENCH_JOBS, "seed-job.yaml"))[0])
        self.assertEqual(len(infra), 4)
        for d in infra:
            with self.subTest(workload=d["metadata"]["name"]):
                self.assertEqual(pod_spec(d)["nodeSelector"], {"archmirror.io/bench-pool": "infra"})
                self.assertIn(taint, pod_spec(d)["tolerations"])

    def test_wiring_between_jobs_mirrors_relays_and_upstream(self):
        up_svc = next(d for d in load_all(os.path.join(BENCH_K8S, "upstream.yaml"))
                      if d["kind"] == "Service")
        up_port = up_svc["spec"]["ports"][0]["port"]
        seed = job_args(load_all(os.path.join(BENCH_JOBS, "seed-job.yaml"))[0])
        self.assertEqual(hostport(seed["--registry"]), (up_svc["metadata"]["name"], up_port))
        mirror_port = base_service()["spec"]["ports"][0]["port"]
        for n in BENCH_NODES:
            with self.subTest(node=n):
                relay, listens = relay_listens(n)
                self.assertEqual(listens["upstream_addr"], "%s:%d" % (up_svc["metadata"]["name"], up_port))
                svc = next(d for d in load_all(os.path.join(BENCH_K8S, "relays.yaml"))
                           if d["kind"] == "Service" and d["metadata"]["name"] == "relay-" + n)
                self.assertTrue(selects_map(svc["spec"]["selector"], pod_labels(relay)))
                svc_ports = {p["port"] for p in svc["spec"]["ports"]}
                self.assertEqual(svc_ports, {listens["control"], listens["archmirror"],
                                             listens["upstream"]})
                args = job_args(bench_job(n))
                self.assertEqual(hostport(args["--archmirror"]), ("archmirror-" + n, mirror_port))
                self.assertEqual(hostport(args["--upstream"]), ("relay-" + n, listens["upstream"]))
                self.assertEqual(hostport(args["--relay-control"]), ("relay-" + n, listens["control"]))
                self.assertEqual(hostport(args["--registry"]), (up_svc["metadata"]["name"], up_port))
                cfg = read_json(os.path.join(BENCH_K8S, "mirror", n, "archmirror.json"))
                ups = {u["name"]: u["url"] for u in cfg["upstreams"]}
                self.assertEqual(hostport(ups["docker.io"]), ("relay-" + n, listens["archmirror"]))
                self.assertEqual(cfg["default_upstream"], "docker.io")
                # the same data_dir / listen as the base, so the base's mounts and probes fit
                self.assertEqual(cfg["listen"], base_config()["listen"])
                self.assertEqual(cfg["data_dir"], base_config()["data_dir"])
                # bench/run's archmirror settings
                self.assertEqual(cfg["cache"]["tag_freshness"], "5m")
                self.assertEqual(cfg["upstream_client"]["pool_size"], 64)
        comp = load_all(os.path.join(BENCH_K8S, "mirror", "component", "kustomization.yaml"))[0]
        egress = [op["value"] for p in comp["patches"] for op in (yaml.safe_load(p["patch"]) or [])
                  if isinstance(op, dict) and op.get("path") == "/spec/egress/-"]
        self.assertEqual([[x["port"] for x in e["ports"]] for e in egress],
                         [[relay_listens(n)[1]["archmirror"]] for n in ["c7g"]],
                         "the mirrors' NetworkPolicy lets them reach the relay link")
        self.assertEqual({relay_listens(n)[1]["archmirror"] for n in BENCH_NODES}, {7001})

    def test_scripts(self):
        import py_compile
        scripts = ["kitlib.py", "seed.py", "eksbench.py", "compare.py",
                   "rehearse.py"]
        for f in scripts:
            with self.subTest(script=f):
                py_compile.compile(os.path.join(BENCH, f), doraise=True,
                                   cfile=os.path.join(tempfile.gettempdir(), "am-bench-%s.pyc" % f))
                if f != "kitlib.py":
                    cp = subprocess.run(["/usr/bin/python3", os.path.join(BENCH, f), "--help"],
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        timeout=60)
                    self.assertEqual(cp.returncode, 0, cp.stdout)
                    self.assertIn("usage:", cp.stdout)
        cp = subprocess.run(["/bin/bash", "-n", os.path.join(BENCH, "run.sh")],
                            stderr=subprocess.PIPE, text=True, timeout=30)
        self.assertEqual(cp.returncode, 0, cp.stderr)
        if shutil.which("shellcheck"):
            cp = subprocess.run(["shellcheck", os.path.join(BENCH, "run.sh")],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                timeout=60)
            self.assertEqual(cp.returncode, 0, cp.stdout)
        # every script a Job runs is in the bench image
        docker = read(os.path.join(BENCH, "Dockerfile"))
        for f in (os.path.join(BENCH_JOBS, x) for x in os.listdir(BENCH_JOBS) if x != "kustomization.yaml"):
            cmd = containers(load_all(f)[0])[0]["command"]
            self.assertTrue(cmd[-1].startswith("/opt/archmirror-bench/deploy/bench/"), cmd)
            self.assertIn("deploy/bench/" + os.path.basename(cmd[-1]), docker)

    def test_bench_run_is_importable_by_the_kit(self):
        """The Jobs reuse bench/run's code: fail here, not in a cluster, when it moves."""
        br = import_bench("kitlib").bench_run()
        for name in ("seed_upstream", "index_image", "summarize", "primary", "machine",
                     "ACCEPT", "PLATFORMS", "SEED_VERSION", "MiB"):
            self.assertTrue(hasattr(br, name), "bench/run has no %s" % name)
        self.assertTrue(callable(br.Bench.brief))
        img = br.index_image("cold-001", [1024, 2048])
        self.assertEqual(sorted(img["children"]), ["attestation", "linux/amd64", "linux/arm64"])
        self.assertEqual(img["top"].digest, br.index_image("cold-001", [1024, 2048])["top"].digest,
                         "seeded images must be the same bytes in every run")

    def test_dockerfile(self):
        path = os.path.join(BENCH, "Dockerfile")
        logical = re.sub(r"\\\n", " ", read(path))
        froms = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", logical, re.M)
        self.assertEqual([f[1] for f in froms], ["build", "bench"])
        self.assertIn("--target loadgen", logical)
        self.assertIn("-DAM_TESTS=OFF", logical)
        runtime = logical.split("AS bench", 1)[1]
        pkgs = re.search(r"apt-get install -y --no-install-recommends\s+([^&]+)&&", runtime).group(1).split()
        self.assertTrue({"libuv1", "liblmdb0", "libjansson4", "libssl3", "python3"} <= set(pkgs), pkgs)
        user = re.search(r"^USER\s+(\S+)", runtime, re.M).group(1)
        self.assertNotIn(user.split(":")[0], ("0", "root"))
        # the product image stays the product alone
        self.assertNotIn("loadgen", read(os.path.join(DEPLOY, "Dockerfile")))
        # every COPY source exists and survives the dockerignore
        ignore = [l.strip() for l in read(os.path.join(BENCH, "Dockerfile.dockerignore")).splitlines()
                  if l.strip() and not l.startswith("#")]

        def ignored(p):
            out = False
            for pat in ignore:
                neg = pat.startswith("!")
                pat = pat.lstrip("!")
                if pat.startswith("**/"):
                    hit = re.fullmatch(pat[3:].replace(".", r"\.").replace("*", "[^/]*"),
                                       os.path.basename(p)) is not None
                else:
                    hit = p == pat or p.startswith(pat + "/")
                if hit:
                    out = not neg
            return out
        n = 0
        for m in re.finditer(r"^COPY\s+(?!--from)(.*)$", runtime, re.M):
            srcs = m.group(1).split()[:-1]
            for s_ in srcs:
                n += 1
                self.assertTrue(os.path.exists(os.path.join(SRC, s_)), "COPY %s: no such file" % s_)
                self.assertFalse(ignored(s_), "COPY %s: excluded by the dockerignore" % s_)
        self.assertGreaterEqual(n, 10)
        for needed in ("CMakeLists.txt", "src", "include", "bench/loadgen.c", "bench/CMakeLists.txt"):
            self.assertFalse(ignored(needed), "%s is needed by the build stage" % needed)
        # the scripts' imports are all in the image: lay out exactly what the runtime
        # stage COPYs under /opt/archmirror-bench and run the Jobs' scripts from there
        with tempfile.TemporaryDirectory() as img:
            opt = "/opt/archmirror-bench/"
            for m in re.finditer(r"^COPY\s+(?!--from)(.*)$", runtime, re.M):
                parts = m.group(1).split()
                dest = parts[-1]
                self.assertTrue(dest.startswith(opt) and dest.endswith("/"), dest)
                d = os.path.join(img, dest[len(opt):])
                os.makedirs(d, exist_ok=True)
                for s_ in parts[:-1]:
                    shutil.copy(os.path.join(SRC, s_), d)
            code = ("import sys; sys.path.insert(0, %r); import kitlib; br = kitlib.bench_run(); "
                    "from harness import images, registry, proc; "
                    "assert br.index_image('x', [64])['top'].digest; print('ok')"
                    % os.path.join(img, "deploy", "bench"))
            cp = subprocess.run(["/usr/bin/python3", "-I", "-B", "-c", code], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, timeout=60, cwd=img)
            self.assertEqual(cp.stdout.strip(), "ok", "the bench image lacks a module:\n" + cp.stdout)
            for script in ("deploy/bench/seed.py", "deploy/bench/eksbench.py",
                           "bench/relay.py", "deploy/bench/compare.py"):
                cp = subprocess.run(["/usr/bin/python3", "-I", "-B",
                                     os.path.join(img, script), "--help"],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    timeout=60, cwd=img)
                self.assertEqual(cp.returncode, 0, "%s in the image layout: %s" % (script, cp.stdout))

    def test_compare_computes_the_ratio(self):
        c7g = sample_bench_doc("c7g", pull_p50s=[0.30, 0.28, 0.35], get_rps=[1200, 1000, 1100],
                               blob_mbs=[900, 1000, 950], upstream_p50s=[0.32, 0.31, 0.33],
                               cpu_usec=8_000_000)
        c7i = sample_bench_doc("c7i", pull_p50s=[0.40, 0.36, 0.45], get_rps=[1000, 900, 950],
                               blob_mbs=[1000, 1100, 1050], upstream_p50s=[0.32, 0.33, 0.31],
                               cpu_usec=10_000_000)
        with tempfile.TemporaryDirectory() as d:
            a = os.path.join(d, "c7g.json")
            with open(a, "w") as f:
                json.dump(c7g, f)
            # the second input as a saved `kubectl logs` of the Job, with the markers
            b = os.path.join(d, "bench-c7i.log")
            with open(b, "w") as f:
                f.write("eksbench 12:00:00: cold-single r1 ...\n"
                        "----- BEGIN archmirror-bench-json c7i -----\n%s\n"
                        "----- END archmirror-bench-json c7i -----\n"
                        "eksbench 12:30:00: done\n" % json.dumps(c7i, indent=1))
            out = os.path.join(d, "compare.md")
            cp = subprocess.run(["/usr/bin/python3", os.path.join(BENCH, "compare.py"), a, b,
                                 "--out", out], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, timeout=60)
            self.assertEqual(cp.returncode, 0, cp.stderr)
            md = read(out)
        self.assertEqual(md, cp.stdout)
        head = md_row(md, "scenario", "target", "metric")
        self.assertEqual(head[3:6], ["c7g", "c7i", "c7g vs c7i"])
        # pull p50: medians 0.30 s vs 0.40 s, lower is better -> 0.40 / 0.30 = 1.33
        row = md_row(md, "cold-single", "archmirror")
        self.assertEqual(row[2:6], ["pull p50", "300.0 ms", "400.0 ms", "1.33"])
        self.assertEqual(row[8], "1.00 / 1.00", "upstream bytes / image")
        # req/s: medians 1100 vs 950, higher is better -> 1.16
        row = md_row(md, "manifest-get-c16", "archmirror")
        self.assertEqual(row[2:6], ["req/s", "1100 req/s", "950 req/s", "1.16"])
        # MB/s: 950 vs 1050: c7i better -> 0.90
        self.assertEqual(md_row(md, "blob-1m", "archmirror")[3:6], ["950 MB/s", "1050 MB/s", "0.90"])
        # upstream straight: equal medians -> 1.00
        self.assertEqual(md_row(md, "cold-single", "upstream")[5], "1.00")
        # archmirror vs upstream on each node type: 0.32/0.30 and 0.32/0.40
        self.assertEqual(md_row(md, "cold-single", ncells=3)[1:3], ["1.07", "0.80"])
        # CPU seconds, lower is better: 10 / 8
        self.assertEqual(md_row(md, "archmirror CPU seconds")[1:4], ["8.00", "10.00", "1.25"])
        self.assertEqual(md_row(md, "SHA extensions (/proc/cpuinfo)")[1:3], ["sha2", "sha_ni"])
        # and compare.py's metric choice is bench/run's
        compare = import_bench("compare")
        br = import_bench("kitlib").bench_run()
        for row in c7g["results"]:
            self.assertEqual(compare.primary(row), br.primary(row))
        rows = {(r["scenario"], r["target"]): r for r in compare.compare(c7g, c7i)}
        self.assertAlmostEqual(rows[("cold-single", "archmirror")]["ratio"], 0.40 / 0.30)
        self.assertAlmostEqual(rows[("manifest-get-c16", "archmirror")]["ratio"], 1100 / 950)


class BenchTerraformPlanTest(unittest.TestCase):
    """`terraform validate` + `terraform plan` of deploy/bench/terraform and
    deploy/terraform, offline: the modules are copied with kubectl_manifest replaced by
    terraform's built-in terraform_data (no provider to download), so variables, locals,
    for_each and yamlencode are evaluated for real and the NodePools' YAML can be read
    back. Skipped without a terraform binary (not in Debian)."""

    @classmethod
    def setUpClass(cls):
        need_yaml()
        cls.terraform = os.environ.get("AM_TERRAFORM") or shutil.which("terraform")
        if not cls.terraform:
            raise unittest.SkipTest("no terraform on PATH (not packaged in Debian); the "
                                    "structural HCL checks in BenchKitTest still ran")
        cls.tmp = tempfile.mkdtemp(prefix="am-tf-")
        cls.addClassCleanup(shutil.rmtree, cls.tmp, True)
        rc = os.path.join(cls.tmp, "terraformrc")
        open(rc, "w").close()
        cls.env = dict(os.environ, CHECKPOINT_DISABLE="1", TF_IN_AUTOMATION="1",
                       TF_CLI_CONFIG_FILE=rc, TF_INPUT="0")

    def stub(self, rel_dir, extra_dirs=()):
        root = tempfile.mkdtemp(dir=self.tmp)
        for d in (rel_dir,) + tuple(extra_dirs):
            shutil.copytree(os.path.join(SRC, d), os.path.join(root, d))
        mod = os.path.join(root, rel_dir)
        for f in os.listdir(mod):
            if not f.endswith(".tf"):
                continue
            s = read(os.path.join(mod, f))
            i = s.find("required_providers")
            if i >= 0:
                j, depth = s.index("{", i), 0
                for k in range(j, len(s)):
                    depth += {"{": 1, "}": -1}.get(s[k], 0)
                    if depth == 0:
                        break
                s = s[:i] + s[k + 1:]
            s = (s.replace('resource "kubectl_manifest"', 'resource "terraform_data"')
                 .replace("kubectl_manifest.", "terraform_data.").replace("yaml_body =", "input ="))
            with open(os.path.join(mod, f), "w") as fh:
                fh.write(s)
        return mod

    def tf(self, mod, *args, timeout=180):
        cp = subprocess.run([self.terraform, "-chdir=" + mod] + list(args), env=self.env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            timeout=timeout)
        self.assertEqual(cp.returncode, 0, "terraform %s:\n%s" % (" ".join(args), cp.stdout))
        return cp.stdout

    def plan(self, mod, *var_args):
        self.tf(mod, "init", "-backend=false", "-input=false", "-no-color")
        self.assertIn("The configuration is valid", self.tf(mod, "validate", "-no-color"))
        self.tf(mod, "plan", "-input=false", "-no-color", "-lock=false", "-out=plan.bin", *var_args)
        show = json.loads(self.tf(mod, "show", "-json", "plan.bin"))
        return {rc["address"]: yaml.safe_load(rc["change"]["after"]["input"])
                for rc in show["resource_changes"]}, show

    def test_fmt(self):
        for d in (BENCH_TF, os.path.join(DEPLOY, "terraform")):
            with self.subTest(module=rel(d)):
                cp = subprocess.run([self.terraform, "fmt", "-check", "-diff", d], env=self.env,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    timeout=60)
                if d == BENCH_TF:
                    self.assertEqual(cp.returncode, 0, cp.stdout)

    def test_bench_nodepools_plan(self):
        mod = self.stub(os.path.join("deploy", "bench", "terraform"))
        pools, show = self.plan(mod, "-var", "cluster_name=test-cluster", "-var", "zone=us-east-1a")
        by_name = {p["metadata"]["name"]: p for p in pools.values()}
        self.assertEqual(sorted(by_name), ["bench-c7g", "bench-c7i", "bench-infra"])
        for n, arch in list(BENCH_NODES.items()) + [("infra", "amd64")]:
            p = by_name["bench-" + n]
            with self.subTest(pool=p["metadata"]["name"]):
                self.assertEqual(p["apiVersion"], "karpenter.sh/v1")
                self.assertEqual(p["kind"], "NodePool")
                t = p["spec"]["template"]
                req = {r["key"]: r["values"] for r in t["spec"]["requirements"]}
                self.assertEqual(req["kubernetes.io/arch"], [arch])
                self.assertEqual(req["topology.kubernetes.io/zone"], ["us-east-1a"])
                self.assertEqual(req["karpenter.sh/capacity-type"], ["on-demand"])
                self.assertEqual(t["spec"]["taints"], [{"key": "archmirror.io/bench",
                                                        "value": "true", "effect": "NoSchedule"}])
                self.assertEqual(t["metadata"]["labels"], {"archmirror.io/bench-pool": n})
                self.assertEqual(t["spec"]["nodeClassRef"]["name"], "archmirror-al2023")
                self.assertEqual(p["spec"]["disruption"]["consolidationPolicy"], "WhenEmpty")
                if n in BENCH_NODES:
                    # what the Pods select is exactly what this pool launches
                    sel = pod_spec(bench_job(n))["nodeSelector"]
                    self.assertEqual(req["node.kubernetes.io/instance-type"],
                                     [sel["node.kubernetes.io/instance-type"]])
                    self.assertEqual([sel["kubernetes.io/arch"]], req["kubernetes.io/arch"])
                    self.assertEqual(sel["archmirror.io/bench-pool"], n)
                    self.assertEqual(p["spec"]["limits"], {"cpu": "8"}, "2 nodes x 4 vCPUs")
        self.assertEqual(by_name["bench-c7g"]["spec"]["limits"], by_name["bench-c7i"]["spec"]["limits"],
                         "equal size")
        # no zone: no zone requirement
        mod = self.stub(os.path.join("deploy", "bench", "terraform"))
        pools, _ = self.plan(mod, "-var", "cluster_name=test-cluster", "-var", "node_count=3")
        for p in pools.values():
            keys = [r["key"] for r in p["spec"]["template"]["spec"]["requirements"]]
            self.assertNotIn("topology.kubernetes.io/zone", keys)
        self.assertEqual({p["metadata"]["name"]: p["spec"]["limits"]["cpu"] for p in pools.values()},
                         {"bench-c7g": "12", "bench-c7i": "12", "bench-infra": "4"})

    def test_deploy_terraform_plan(self):
        mod = self.stub(os.path.join("deploy", "terraform"), extra_dirs=(os.path.join("deploy", "karpenter"),))
        objs, _ = self.plan(mod, "-var", "cluster_name=test-cluster")
        kinds = sorted((o["kind"], o["metadata"]["name"]) for o in objs.values())
        self.assertEqual(kinds, [("EC2NodeClass", "archmirror-al2023"), ("NodePool", "general"),
                                 ("NodePool", "graviton")])
        nc = next(o for o in objs.values() if o["kind"] == "EC2NodeClass")
        self.assertEqual(nc["spec"]["role"], "KarpenterNodeRole-test-cluster")


class BenchKustomizeRenderTest(unittest.TestCase):
    """The rendered bench: two mirrors that do not collide with each other or with a
    production archmirror."""

    @classmethod
    def setUpClass(cls):
        need_yaml()
        kubectl, reason = find_kubectl()
        if not kubectl:
            raise unittest.SkipTest("kustomize render skipped: " + reason)
        cls.docs = {}
        for d in (BENCH_K8S, BENCH_JOBS):
            cp = subprocess.run([kubectl, "kustomize", d], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, timeout=120,
                                env=dict(os.environ, KUBECONFIG="/dev/null"))
            if cp.returncode != 0:
                raise AssertionError("kubectl kustomize %s:\n%s" % (rel(d), cp.stderr))
            cls.docs[d] = [x for x in yaml.safe_load_all(cp.stdout) if x]

    def test_namespace_and_no_collisions(self):
        docs = self.docs[BENCH_K8S] + self.docs[BENCH_JOBS]
        for o in docs:
            with self.subTest(kind=o["kind"], name=o["metadata"]["name"]):
                if o["kind"] == "Namespace":
                    self.assertEqual(o["metadata"]["name"], "archmirror-bench")
                else:
                    self.assertEqual(o["metadata"].get("namespace"), "archmirror-bench")
                self.assertNotEqual(o["kind"], "PriorityClass", "no cluster-wide objects")
        for svc in (o for o in docs if o["kind"] == "Service"):
            self.assertIn(svc["spec"].get("clusterIP"), (None, "None"),
                          "%s: a fixed ClusterIP would collide with production's 10.100.50.50"
                          % svc["metadata"]["name"])

    def test_one_cold_mirror_per_node_type(self):
        docs = self.docs[BENCH_K8S]
        sts = {o["metadata"]["name"]: o for o in docs if o["kind"] == "StatefulSet"}
        self.assertEqual(sorted(sts), ["archmirror-%s" % n for n in sorted(BENCH_NODES)])
        pods = {n: pod_labels(s) for n, s in sts.items()}
        for n, arch in BENCH_NODES.items():
            s = sts["archmirror-" + n]
            with self.subTest(node=n):
                self.assertEqual(s["spec"]["replicas"], 1)
                self.assertNotIn("volumeClaimTemplates", s["spec"], "cache on emptyDir: cold on restart")
                cache = [v for v in pod_spec(s)["volumes"] if v["name"] == "cache"]
                self.assertEqual(len(cache), 1)
                self.assertIn("emptyDir", cache[0])
                self.assertNotIn("topologySpreadConstraints", pod_spec(s))
                self.assertNotIn("priorityClassName", pod_spec(s))
                self.assertEqual(pod_spec(s)["nodeSelector"], pod_spec(bench_job(n))["nodeSelector"])
                c = containers(s)[0]
                self.assertNotIn("cpu", c["resources"].get("limits", {}), "no CFS throttling")
                self.assertEqual(c["image"], "registry.example.com/platform/archmirror:0.1.0")
                # each Service reaches its own mirror only
                svc = next(o for o in docs if o["kind"] == "Service"
                           and o["metadata"]["name"] == "archmirror-" + n)
                picked = [m for m, labels in pods.items() if selects_map(svc["spec"]["selector"], labels)]
                self.assertEqual(picked, ["archmirror-" + n])
                cm = next(o for o in docs if o["kind"] == "ConfigMap" and
                          o["metadata"]["name"] == next(v["configMap"]["name"] for v in pod_spec(s)["volumes"]
                                                         if "configMap" in v))
                cfg = json.loads(cm["data"]["archmirror.json"])
                self.assertEqual(cfg["upstreams"][0]["url"], "http://relay-%s:7001" % n)
        # the NetworkPolicy's DNS peer must not have picked up the node-type label
        for np_ in (o for o in docs if o["kind"] == "NetworkPolicy" and o["metadata"]["name"].startswith("archmirror-")):
            dns = [p for e in np_["spec"]["egress"] for p in e.get("to", [])
                   if "namespaceSelector" in p]
            self.assertEqual(dns[0]["podSelector"]["matchLabels"], {"k8s-app": "kube-dns"})
            ports = [p["port"] for e in np_["spec"]["egress"] for p in e.get("ports", [])]
            self.assertIn(7001, ports)

    def test_jobs_render(self):
        jobs = {o["metadata"]["name"]: o for o in self.docs[BENCH_JOBS] if o["kind"] == "Job"}
        self.assertEqual(sorted(jobs), ["bench-c7g", "bench-c7i", "bench-seed"])
        images = {c["image"] for j in jobs.values() for c in containers(j)}
        self.assertEqual(images, {"registry.example.com/platform/archmirror-bench:0.1.0"})
        relays = [o for o in self.docs[BENCH_K8S] if o["kind"] == "Deployment"]
        self.assertEqual({c["image"] for d in relays for c in containers(d)},
                         {"registry.example.com/platform/archmirror-bench:0.1.0",
                          "docker.io/library/registry:2.8.2"})


class BenchRehearsalTest(unittest.TestCase):
    """deploy/bench/rehearse.py: the kit's scripts end to end on loopback (docker-registry,
    seed.py, bench/relay.py, archmirror, eksbench.py twice, compare.py). Needs bench/loadgen
    built (`make bench` or `cmake --build <dir> --target loadgen`); skipped otherwise."""

    def test_rehearsal(self):
        testbase.require_archmirror()
        loadgen = bench_loadgen()
        if not loadgen:
            self.skipTest("bench/loadgen not built (cmake --build <build dir> --target loadgen)")
        if not os.access(registry.REGISTRY_BIN, os.X_OK):
            self.skipTest("docker-registry not installed")
        out = testbase.new_workdir("bench-rehearsal")
        cp = subprocess.run(["/usr/bin/python3", os.path.join(BENCH, "rehearse.py"), "--out", out,
                             "--archmirror", archmirror.binary(), "--loadgen", loadgen],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=240)
        self.assertEqual(cp.returncode, 0, "rehearse.py:\n%s\n%s" % (cp.stdout, cp.stderr))
        for label in ("first", "second"):
            with self.subTest(run=label):
                doc = read_json(os.path.join(out, label + ".json"))
                self.assertEqual(doc["failures"], [], read(os.path.join(out, label + ".log")))
                self.assertEqual(set(doc), {"meta", "summary", "results", "failures", "seed"})
                rows = {(r["scenario"], r["target"]): r for r in doc["results"]}
                for key in (("cold-single", "archmirror"), ("cold-single", "upstream"),
                            ("warm-single", "archmirror"), ("cold-herd-4", "archmirror"),
                            ("manifest-get-c4", "archmirror"), ("blob-1m", "archmirror")):
                    self.assertIn(key, rows)
                    self.assertEqual(rows[key]["loadgen"]["errors"], 0)
                cold = rows[("cold-single", "archmirror")]
                self.assertAlmostEqual(cold["upstream"]["down_body_bytes"] /
                                       cold["loadgen"]["image_bytes"], 1.0, places=2)
                self.assertEqual(rows[("warm-single", "archmirror")]["upstream"]["requests"], 0,
                                 "a warm pull inside the freshness window asks upstream nothing")
                self.assertAlmostEqual(rows[("cold-herd-4", "archmirror")]["upstream"]["down_body_bytes"] /
                                       rows[("cold-herd-4", "archmirror")]["loadgen"]["image_bytes"],
                                       1.0, places=2)
                self.assertIn("ratio_median", doc["summary"]["cold-single"]["upstream"])
                self.assertIn("sha256", doc["meta"]["openssl_speed"])
        md = read(os.path.join(out, "compare.md"))
        self.assertEqual(md_row(md, "cold-single", "archmirror")[2], "pull p50")
        self.assertIn("| warm-herd-4 |", md)


if __name__ == "__main__":
    testbase.main()

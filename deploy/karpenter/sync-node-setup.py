#!/usr/bin/python3
"""Copies deploy/kubernetes/overlays/node-setup/archmirror-node-setup.sh into the userData
of ec2nodeclass-al2023.yaml (between the ARCHMIRROR_NODE_SETUP heredoc markers), so that
new Karpenter nodes run exactly the script the node-setup DaemonSet runs.
tests/integration/test_deploy.py fails when the two differ; run this to fix it."""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "..", "kubernetes", "overlays", "node-setup", "archmirror-node-setup.sh")
TARGET = os.path.join(HERE, "ec2nodeclass-al2023.yaml")
START = "cat > /usr/local/sbin/archmirror-node-setup <<'ARCHMIRROR_NODE_SETUP'"
END = "ARCHMIRROR_NODE_SETUP"
INDENT = "    "


def main():
    script = open(SCRIPT).read().splitlines()
    lines = open(TARGET).read().splitlines()
    try:
        s = next(i for i, l in enumerate(lines) if l.strip() == START)
        e = next(i for i in range(s + 1, len(lines)) if lines[i].strip() == END)
    except StopIteration:
        sys.exit("markers not found in %s" % TARGET)
    body = [(INDENT + l) if l else "" for l in script]
    out = lines[:s + 1] + body + lines[e:]
    with open(TARGET, "w") as f:
        f.write("\n".join(out) + "\n")
    print("updated %s (%d script lines)" % (TARGET, len(script)))


if __name__ == "__main__":
    main()

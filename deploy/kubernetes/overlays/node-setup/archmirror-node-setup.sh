#!/bin/sh
# archmirror node setup: writes containerd's hosts.toml files so that this node pulls
# through archmirror and tells it the node's own platform (X-Node-Platform).
#
# One script, three callers (keep them identical; tests/integration/test_deploy.py checks):
#   - the node-setup DaemonSet (deploy/kubernetes/overlays/node-setup), for existing nodes;
#   - Karpenter EC2NodeClass userData for AL2023 (deploy/karpenter/ec2nodeclass-al2023.yaml),
#     for new nodes, before containerd and kubelet start;
#   - tests/integration/test_deploy.py, which feeds the files to a real containerd.
#
# Environment:
#   MIRROR_URL         archmirror as containerd must reach it from the HOST network
#                      (containerd does not use cluster DNS): http://<fixed ClusterIP>:5000,
#                      or http://127.0.0.1:5000 for the node-local DaemonSet. Required.
#   MODE               fallback     archmirror first, then the registry itself (default);
#                      mirror-only  archmirror is the only host: required for archmirror's
#                                   enforce diagnostics to reach the kubelet event.
#   REGISTRIES         registries that get their own certs.d/<registry>/hosts.toml (they
#                      must be archmirror upstreams): default "docker.io ghcr.io quay.io
#                      registry.k8s.io public.ecr.aws mcr.microsoft.com".
#   WRITE_DEFAULT      yes (default): also certs.d/_default/hosts.toml, for every other
#                      registry. In mirror-only mode that sends EVERY registry to
#                      archmirror, which refuses registries it does not serve (DENIED):
#                      list those in DIRECT_REGISTRIES.
#   DIRECT_REGISTRIES  registries that must bypass archmirror (private ECR, the registry
#                      that holds the archmirror image itself): certs.d/<registry>/hosts.toml
#                      pointing at the registry only.
#   CERTS_D            default /etc/containerd/certs.d (the DaemonSet: /host/etc/containerd/certs.d).
#   CONTAINERD_CONFIG  checked for config_path (a warning if it is missing); default
#                      /etc/containerd/config.toml.
#   NODE_ARCH          overrides `uname -m` (tests). NODE_PLATFORM overrides the result.
#   INTERVAL           seconds between re-checks; 0 (default) writes once and exits.
#   STATUS_FILE        touched after every successful pass (the DaemonSet's readiness).
#   ACTION             write (default) | remove (deletes the files this script manages).
#
# Files are written atomically (temp file + rename; containerd re-reads hosts.toml on
# every pull, no restart needed) and only when their content changes. Files that this
# script did not write (no "managed-by" line) are never touched.
set -eu

MARK="# managed-by: archmirror-node-setup"
MODE=${MODE:-fallback}
REGISTRIES=${REGISTRIES-docker.io ghcr.io quay.io registry.k8s.io public.ecr.aws mcr.microsoft.com}
DIRECT_REGISTRIES=${DIRECT_REGISTRIES:-}
WRITE_DEFAULT=${WRITE_DEFAULT:-yes}
CERTS_D=${CERTS_D:-/etc/containerd/certs.d}
CONTAINERD_CONFIG=${CONTAINERD_CONFIG:-/etc/containerd/config.toml}
INTERVAL=${INTERVAL:-0}
ACTION=${ACTION:-write}
STATUS_FILE=${STATUS_FILE:-}

log() { printf 'archmirror-node-setup: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 2; }

# The node's platform in containerd's normalised form (platforms.Normalize):
# x86_64 -> amd64, aarch64 -> arm64 (v8 is the default variant and is not written).
node_platform() {
    if [ -n "${NODE_PLATFORM:-}" ]; then printf '%s\n' "$NODE_PLATFORM"; return; fi
    m=${NODE_ARCH:-$(uname -m)}
    case "$m" in
        x86_64|amd64)           echo linux/amd64 ;;
        aarch64|arm64|armv8*)   echo linux/arm64 ;;
        armv7*|armhf)           echo linux/arm/v7 ;;
        armv6*)                 echo linux/arm/v6 ;;
        ppc64le)                echo linux/ppc64le ;;
        s390x)                  echo linux/s390x ;;
        riscv64)                echo linux/riscv64 ;;
        *) die "unknown machine '$m' (set NODE_PLATFORM)" ;;
    esac
}

# The registry's own endpoint, as containerd would use it without any hosts.toml.
registry_url() {
    case "$1" in
        docker.io) echo https://registry-1.docker.io ;;
        *)         echo "https://$1" ;;
    esac
}

validate() {
    case "$MIRROR_URL" in
        http://*|https://*) ;;
        *) die "MIRROR_URL must be http://HOST:PORT or https://HOST:PORT, got '$MIRROR_URL'" ;;
    esac
    case "$MIRROR_URL" in *'"'*|*' '*|*\\*) die "MIRROR_URL contains a quote, space or backslash" ;; esac
    case "$MODE" in fallback|mirror-only) ;; *) die "MODE must be fallback or mirror-only, got '$MODE'" ;; esac
    for r in $REGISTRIES $DIRECT_REGISTRIES; do
        case "$r" in
            _default|*/*|*'"'*|.*|'') die "bad registry name '$r'" ;;
        esac
    done
}

# hosts.toml for a registry that goes through archmirror, in the configured MODE.
mirrored_hosts_toml() {  # $1: registry (or _default), $2: platform
    echo "$MARK"
    echo "# $1 -> archmirror ($MODE); X-Node-Platform is this node's platform."
    if [ "$MODE" = mirror-only ]; then
        cat <<TOML
# archmirror is the ONLY host: a mirror error (e.g. 409 "no linux/arm64 variant ...")
# reaches the kubelet event instead of falling through to the registry.
server = "$MIRROR_URL"
capabilities = ["pull", "resolve"]

[header]
  X-Node-Platform = "$2"

# containerd 1.6/1.7 silently ignore a hosts.toml that has no [host] table
# ("invalid \`host\` tree"); this empty table is the workaround. 2.x accepts it too.
[host]
TOML
    else
        cat <<TOML
# archmirror first; on any error or outage containerd falls through to the registry
# itself (no server line: containerd appends the registry's own endpoint as last host).
[host."$MIRROR_URL"]
  capabilities = ["pull", "resolve"]
  [host."$MIRROR_URL".header]
    X-Node-Platform = "$2"
TOML
    fi
}

# hosts.toml for a registry that must not go through archmirror.
direct_hosts_toml() {  # $1: registry
    echo "$MARK"
    cat <<TOML
# $1 bypasses archmirror (DIRECT_REGISTRIES): the registry itself is the only host.
server = "$(registry_url "$1")"

# Empty [host] table: containerd 1.6/1.7 ignore the file without one.
[host]
TOML
}

changed=0
write_file() {  # $1: directory name under CERTS_D, $2: content
    dir="$CERTS_D/$1"
    f="$dir/hosts.toml"
    mkdir -p "$dir"
    tmp="$dir/.hosts.toml.$$"
    printf '%s\n' "$2" >"$tmp"
    if [ -e "$f" ] && ! grep -qxF "$MARK" "$f"; then
        rm -f "$tmp"
        log "warning: $f exists and is not managed by archmirror-node-setup; left alone"
        return 0
    fi
    if [ -e "$f" ] && cmp -s "$tmp" "$f"; then
        rm -f "$tmp"
        return 0
    fi
    chmod 0644 "$tmp"
    mv -f "$tmp" "$f"
    changed=$((changed + 1))
    log "wrote $f"
}

# Managed files that the current settings no longer produce (a registry dropped from
# REGISTRIES, WRITE_DEFAULT=no, ACTION=remove) are deleted.
prune() {  # $*: directory names that must stay
    for f in "$CERTS_D"/*/hosts.toml; do
        [ -e "$f" ] || continue
        grep -qxF "$MARK" "$f" || continue
        d=${f%/hosts.toml}; d=${d##*/}
        keep=0
        for k in "$@"; do [ "$k" = "$d" ] && keep=1; done
        [ $keep -eq 1 ] && continue
        rm -f "$f"
        rmdir "$CERTS_D/$d" 2>/dev/null || true
        changed=$((changed + 1))
        log "removed $f"
    done
}

check_containerd_config() {
    [ -r "$CONTAINERD_CONFIG" ] || { log "note: $CONTAINERD_CONFIG not readable; not checked"; return 0; }
    if ! grep -q 'config_path' "$CONTAINERD_CONFIG"; then
        log "warning: $CONTAINERD_CONFIG sets no registry config_path: the kubelet's pulls (CRI) will NOT read hosts.toml files"
    fi
}

one_pass() {
    changed=0
    if [ "$ACTION" = remove ]; then
        prune
        log "removed $changed managed file(s) from $CERTS_D"
        return 0
    fi
    [ "$ACTION" = write ] || die "ACTION must be write or remove, got '$ACTION'"
    platform=$(node_platform)
    keep=""
    for r in $REGISTRIES; do
        skip=0
        for d in $DIRECT_REGISTRIES; do [ "$d" = "$r" ] && skip=1; done
        [ $skip -eq 1 ] && continue
        write_file "$r" "$(mirrored_hosts_toml "$r" "$platform")"
        keep="$keep $r"
    done
    for d in $DIRECT_REGISTRIES; do
        write_file "$d" "$(direct_hosts_toml "$d")"
        keep="$keep $d"
    done
    if [ "$WRITE_DEFAULT" = yes ]; then
        write_file _default "$(mirrored_hosts_toml _default "$platform")"
        keep="$keep _default"
    fi
    # shellcheck disable=SC2086
    prune $keep
    [ -z "$STATUS_FILE" ] || : >"$STATUS_FILE"
    [ $changed -eq 0 ] || log "platform $platform, mode $MODE, mirror $MIRROR_URL: $changed change(s) in $CERTS_D"
}

[ "$ACTION" = remove ] || { [ -n "${MIRROR_URL:-}" ] || die "MIRROR_URL is required"; validate; }
mkdir -p "$CERTS_D"
[ "$ACTION" = remove ] || check_containerd_config
one_pass
[ "$INTERVAL" -gt 0 ] 2>/dev/null || exit 0

# DaemonSet: keep the files in place (a node image update or a hand edit may remove
# them) and exit promptly on SIGTERM.
trap 'exit 0' TERM INT
while :; do
    sleep "$INTERVAL" &
    wait $! || true
    one_pass
done

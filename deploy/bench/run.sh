#!/bin/bash
# deploy/bench/run.sh — the c7g-vs-c7i bench, end to end, with kubectl (deploy/bench/README.md).
#
#   deploy/bench/run.sh [OUT_DIR]          # default OUT_DIR: bench-results-<date>
#
# Needs: kubectl pointed at the cluster, the NodePools of deploy/bench/terraform applied,
# the images set in deploy/bench/kubernetes/images/kustomization.yaml, python3.
# Steps: apply the mirrors/upstream/relays, wait for them; restart both mirrors so their
# caches are empty; (re)create the Jobs; wait for the seed; run bench-c7g, then bench-c7i
# (never both at once); save each Job's log and JSON; read each mirror's CPU time
# (cgroup cpu.stat) before and after its run; write OUT_DIR/compare.md.
# Environment: NS (archmirror-bench), TIMEOUT (seconds per Job, 5400), ORDER ("c7g c7i";
# "c7i c7g" for the reversed repeat), KEEP_JOBS=1 to reuse existing Jobs instead of
# recreating them.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
NS="${NS:-archmirror-bench}"
TIMEOUT="${TIMEOUT:-5400}"
ORDER="${ORDER:-c7g c7i}"
OUT="${1:-bench-results-$(date +%Y%m%d-%H%M%S)}"
K="kubectl -n $NS"
mkdir -p "$OUT"

log() { printf 'run.sh %s: %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# Waits until Job $1 has succeeded (0) or failed (1).
wait_job() {
    local job="$1" deadline=$(( $(date +%s) + TIMEOUT )) s f
    while [ "$(date +%s)" -lt "$deadline" ]; do
        s="$($K get job "$job" -o jsonpath='{.status.succeeded}' 2>/dev/null || true)"
        f="$($K get job "$job" -o jsonpath='{.status.failed}' 2>/dev/null || true)"
        if [ "${s:-0}" -ge 1 ]; then return 0; fi
        if [ "${f:-0}" -ge 1 ]; then return 1; fi
        # A bench Job lingers after writing its JSON (for kubectl cp): done when the
        # marker line is in its log.
        if $K logs "job/$job" 2>/dev/null | grep -q -- '----- END archmirror-bench-json'; then
            return 0
        fi
        sleep 15
    done
    log "timed out waiting for job/$job"
    return 1
}

# cpu.stat usage_usec of the mirror container (cgroup v2; cgroup v1: cpuacct.usage in ns).
mirror_cpu_usec() {
    local pod="archmirror-$1-0" v
    v="$($K exec "$pod" -c archmirror -- cat /sys/fs/cgroup/cpu.stat 2>/dev/null \
         | awk '$1 == "usage_usec" {print $2}')" || true
    if [ -z "$v" ]; then
        v="$($K exec "$pod" -c archmirror -- cat /sys/fs/cgroup/cpuacct/cpuacct.usage 2>/dev/null \
             | awk '{printf "%d", $1 / 1000}')" || true
    fi
    echo "${v:-}"
}

log "applying deploy/bench/kubernetes"
kubectl apply -k "$HERE/kubernetes"
log "restarting both mirrors (empty caches)"
$K rollout restart statefulset/archmirror-c7g statefulset/archmirror-c7i
for d in deployment/bench-upstream deployment/relay-c7g deployment/relay-c7i \
         statefulset/archmirror-c7g statefulset/archmirror-c7i; do
    $K rollout status "$d" --timeout=20m
done

if [ "${KEEP_JOBS:-0}" != 1 ]; then
    $K delete job bench-seed bench-c7g bench-c7i --ignore-not-found --wait=true
fi
kubectl apply -k "$HERE/kubernetes/jobs"
log "waiting for the seed Job"
wait_job bench-seed || { $K logs job/bench-seed | tail -50; exit 1; }
$K logs job/bench-seed > "$OUT/seed.log" 2>&1 || true

status=0
for node in $ORDER; do
    before="$(mirror_cpu_usec "$node")"
    log "running bench-$node"
    $K patch job "bench-$node" --type=merge -p '{"spec":{"suspend":false}}'
    ok=0
    wait_job "bench-$node" || ok=1
    after="$(mirror_cpu_usec "$node")"
    $K logs "job/bench-$node" > "$OUT/bench-$node.log" 2>&1 || true
    # The JSON: from the Pod while it lingers (kubectl cp), else from the log's markers.
    pod="$($K get pods -l job-name="bench-$node" -o jsonpath='{.items[0].metadata.name}')"
    if ! $K cp "$pod:/results/$node.json" "$OUT/$node.json" >/dev/null 2>&1; then
        python3 - "$OUT/bench-$node.log" "$OUT/$node.json" <<'EOF'
import json, sys
lines, inside = [], False
for line in open(sys.argv[1]):
    if line.startswith("----- BEGIN archmirror-bench-json"):
        inside, lines = True, []
    elif line.startswith("----- END archmirror-bench-json"):
        break
    elif inside:
        lines.append(line)
json.dump(json.loads("".join(lines)), open(sys.argv[2], "w"), indent=1)
EOF
    fi
    # Record the mirror's CPU time for this run in the result (compare.py reads it).
    python3 - "$OUT/$node.json" "$before" "$after" <<'EOF'
import json, sys
path, before, after = sys.argv[1:4]
doc = json.load(open(path))
if before and after:
    doc["meta"]["mirror_cpu"] = {"before_usec": int(before), "after_usec": int(after),
                                 "source": "cgroup cpu.stat of archmirror's container"}
json.dump(doc, open(path, "w"), indent=1)
EOF
    if [ "$ok" != 0 ]; then
        log "bench-$node failed (see $OUT/bench-$node.log)"
        status=1
    fi
done

python3 "$HERE/compare.py" "$OUT/c7g.json" "$OUT/c7i.json" --out "$OUT/compare.md"
log "results in $OUT/ (c7g.json, c7i.json, compare.md, logs)"
exit "$status"

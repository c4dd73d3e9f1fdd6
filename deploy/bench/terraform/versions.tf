# Karpenter NodePools for the c7g-vs-c7i bench (deploy/bench/README.md): two pools of
# equal size, "bench-c7g" (c7g.xlarge, arm64, Graviton3) and "bench-c7i" (c7i.xlarge,
# amd64, Sapphire Rapids), plus "bench-infra", one node for what is not under test (the
# upstream registry, the relays, the seed Job). All three:
#   - launch only their one instance type, on-demand, in ONE zone (var.zone), from one
#     EC2NodeClass (al2023@latest resolves to the arm64 or x86_64 AMI per instance type,
#     so both node types run the same OS, kernel line, containerd and kubelet);
#   - label their nodes archmirror.io/bench-pool=<c7g|c7i|infra> (the bench Pods'
#     nodeSelector, next to kubernetes.io/arch and node.kubernetes.io/instance-type);
#   - taint them archmirror.io/bench=true:NoSchedule, so nothing else lands there and the
#     bench Pods (which tolerate it) land nowhere else;
#   - are capped by `limits` at var.node_count nodes each (the mirror on one node, the
#     load generator on another), and consolidate only when empty.
#
# Same style as deploy/terraform: the kubectl provider (kubectl_manifest), which does not
# need the Karpenter CRDs at plan time. Karpenter v1 must be installed in the cluster, and
# the EC2NodeClass named by var.node_class_name must exist (deploy/terraform creates
# archmirror-al2023; any AL2023 class works).
terraform {
  required_version = ">= 1.3"
  required_providers {
    kubectl = {
      # alekc/kubectl is a maintained fork with the same resources; either works.
      source  = "gavinbunney/kubectl"
      version = ">= 1.14"
    }
  }
}

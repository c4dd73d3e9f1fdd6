# Two Karpenter NodePools for a mixed-architecture EKS cluster (the pattern a platform
# team starts from): "graviton" (arm64, c7g/m7g/r7g, weight 30: preferred) and "general"
# (amd64, weight 10: for images that are still amd64-only and Pods pinned with
# nodeSelector kubernetes.io/arch: amd64). Both use the archmirror-al2023 EC2NodeClass, so
# every node they launch pulls through archmirror and tells it its platform.
#
# Applied with the kubectl provider (kubectl_manifest), which, unlike the kubernetes
# provider's kubernetes_manifest, does not need the Karpenter CRDs to exist at plan time.
# Karpenter v1 (karpenter.sh/v1, karpenter.k8s.aws/v1) must be installed in the cluster.
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

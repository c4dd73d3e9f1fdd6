locals {
  # Nodes of these pools get their hosts.toml from the EC2NodeClass userData: the
  # node-setup DaemonSet (deploy/kubernetes/overlays/node-setup) skips this label.
  node_labels = {
    "archmirror.io/hosts-toml" = "bootstrap"
  }

  disruption = {
    consolidationPolicy = "WhenEmptyOrUnderutilized"
    consolidateAfter    = "1m"
  }
}

resource "kubectl_manifest" "node_class" {
  count = var.manage_node_class ? 1 : 0
  # The YAML is also usable on its own (envsubst '${CLUSTER_NAME}'); only the cluster
  # name is substituted here. "$${" is HCL for a literal "${".
  yaml_body = replace(
    file("${path.module}/../karpenter/ec2nodeclass-al2023.yaml"),
    "$${CLUSTER_NAME}",
    var.cluster_name,
  )
}

# Graviton: preferred (higher weight) for every Pod that does not pin amd64. Graviton 3
# costs about 20% less than the equivalent c7i/m7i/r7i; the price is that every image a
# Pod uses here must have a linux/arm64 variant, which archmirror checks and reports.
resource "kubectl_manifest" "nodepool_graviton" {
  depends_on = [kubectl_manifest.node_class]
  yaml_body = yamlencode({
    apiVersion = "karpenter.sh/v1"
    kind       = "NodePool"
    metadata = {
      name   = "graviton"
      labels = { "app.kubernetes.io/part-of" = "archmirror" }
    }
    spec = {
      weight = 30
      template = {
        metadata = { labels = local.node_labels }
        spec = {
          nodeClassRef = {
            group = "karpenter.k8s.aws"
            kind  = "EC2NodeClass"
            name  = var.node_class_name
          }
          requirements = [
            { key = "kubernetes.io/arch", operator = "In", values = ["arm64"] },
            { key = "kubernetes.io/os", operator = "In", values = ["linux"] },
            { key = "karpenter.k8s.aws/instance-family", operator = "In", values = var.graviton_instance_families },
            { key = "karpenter.sh/capacity-type", operator = "In", values = var.capacity_types },
          ]
          expireAfter = "720h"
        }
      }
      limits     = { cpu = var.graviton_cpu_limit }
      disruption = local.disruption
    }
  })
}

# General: amd64, for amd64-only images and Pods with nodeSelector kubernetes.io/arch: amd64.
resource "kubectl_manifest" "nodepool_general" {
  depends_on = [kubectl_manifest.node_class]
  yaml_body = yamlencode({
    apiVersion = "karpenter.sh/v1"
    kind       = "NodePool"
    metadata = {
      name   = "general"
      labels = { "app.kubernetes.io/part-of" = "archmirror" }
    }
    spec = {
      weight = 10
      template = {
        metadata = { labels = local.node_labels }
        spec = {
          nodeClassRef = {
            group = "karpenter.k8s.aws"
            kind  = "EC2NodeClass"
            name  = var.node_class_name
          }
          requirements = [
            { key = "kubernetes.io/arch", operator = "In", values = ["amd64"] },
            { key = "kubernetes.io/os", operator = "In", values = ["linux"] },
            { key = "karpenter.k8s.aws/instance-category", operator = "In", values = ["c", "m", "r"] },
            { key = "karpenter.k8s.aws/instance-generation", operator = "Gt", values = ["5"] },
            { key = "karpenter.sh/capacity-type", operator = "In", values = var.capacity_types },
          ]
          expireAfter = "720h"
        }
      }
      limits     = { cpu = var.general_cpu_limit }
      disruption = local.disruption
    }
  })
}

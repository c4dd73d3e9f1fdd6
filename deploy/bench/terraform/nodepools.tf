locals {
  # The label and taint the bench Pods select and tolerate (deploy/bench/kubernetes).
  pool_label_key = "archmirror.io/bench-pool"
  taint = {
    key    = "archmirror.io/bench"
    value  = "true"
    effect = "NoSchedule"
  }

  # Pools under test: equal size, one instance type each.
  pools = {
    c7g = {
      arch          = "arm64"
      instance_type = var.c7g_instance_type
      count         = var.node_count
      vcpus         = var.node_vcpus
    }
    c7i = {
      arch          = "amd64"
      instance_type = var.c7i_instance_type
      count         = var.node_count
      vcpus         = var.node_vcpus
    }
    infra = {
      arch          = "amd64"
      instance_type = var.infra_instance_type
      count         = var.infra_node_count
      vcpus         = var.infra_node_vcpus
    }
  }

  zone_requirement = var.zone == "" ? [] : [
    { key = "topology.kubernetes.io/zone", operator = "In", values = [var.zone] },
  ]

  # A run must not be disturbed: consolidate a node only once it is empty, never expire.
  disruption = {
    consolidationPolicy = "WhenEmpty"
    consolidateAfter    = "10m"
  }
}

resource "kubectl_manifest" "bench_nodepool" {
  for_each = local.pools
  yaml_body = yamlencode({
    apiVersion = "karpenter.sh/v1"
    kind       = "NodePool"
    metadata = {
      name = "bench-${each.key}"
      labels = {
        "app.kubernetes.io/part-of" = "archmirror"
        "archmirror.io/bench"       = "true"
        "archmirror.io/cluster"     = var.cluster_name
      }
    }
    spec = {
      template = {
        metadata = {
          labels = merge(var.extra_node_labels, { (local.pool_label_key) = each.key })
        }
        spec = {
          nodeClassRef = {
            group = "karpenter.k8s.aws"
            kind  = "EC2NodeClass"
            name  = var.node_class_name
          }
          taints = [local.taint]
          requirements = concat([
            { key = "kubernetes.io/arch", operator = "In", values = [each.value.arch] },
            { key = "kubernetes.io/os", operator = "In", values = ["linux"] },
            { key = "node.kubernetes.io/instance-type", operator = "In", values = [each.value.instance_type] },
            { key = "karpenter.sh/capacity-type", operator = "In", values = var.capacity_types },
          ], local.zone_requirement)
          expireAfter = "Never"
        }
      }
      # At most `count` nodes: Karpenter launches no node that would exceed the limit.
      limits = {
        cpu = tostring(each.value.count * each.value.vcpus)
      }
      disruption = local.disruption
    }
  })
}

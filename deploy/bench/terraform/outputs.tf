output "nodepools" {
  description = "The bench NodePools and what each launches."
  value = {
    for k, p in local.pools : "bench-${k}" => "${p.count} x ${p.instance_type} (${p.arch}), label ${local.pool_label_key}=${k}, taint ${local.taint.key}=${local.taint.value}:${local.taint.effect}"
  }
}

variable "cluster_name" {
  description = "EKS cluster name: substituted for $${CLUSTER_NAME} in the EC2NodeClass (IAM role KarpenterNodeRole-<name>, karpenter.sh/discovery tags)."
  type        = string
}

variable "manage_node_class" {
  description = "Also apply deploy/karpenter/ec2nodeclass-al2023.yaml (the EC2NodeClass whose userData writes hosts.toml). Set false if you manage EC2NodeClasses elsewhere."
  type        = bool
  default     = true
}

variable "node_class_name" {
  description = "EC2NodeClass the NodePools use; it must write the archmirror hosts.toml (see deploy/karpenter/)."
  type        = string
  default     = "archmirror-al2023"
}

variable "capacity_types" {
  description = "karpenter.sh/capacity-type values for both NodePools."
  type        = list(string)
  default     = ["spot", "on-demand"]
}

variable "graviton_instance_families" {
  description = "arm64 (Graviton 3) instance families of the graviton NodePool."
  type        = list(string)
  default     = ["c7g", "m7g", "r7g"]
}

variable "graviton_cpu_limit" {
  description = "Most vCPUs the graviton NodePool may provision."
  type        = string
  default     = "200"
}

variable "general_cpu_limit" {
  description = "Most vCPUs the general (amd64) NodePool may provision."
  type        = string
  default     = "200"
}

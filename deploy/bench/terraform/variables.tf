variable "cluster_name" {
  description = "EKS cluster name (recorded on the NodePools as a label; the EC2NodeClass carries the cluster's subnets and IAM role)."
  type        = string
}

variable "node_class_name" {
  description = "EC2NodeClass of all three bench NodePools. It must use an AL2023 AMI alias (al2023@latest) so both architectures run the same OS; deploy/terraform creates archmirror-al2023."
  type        = string
  default     = "archmirror-al2023"
}

variable "zone" {
  description = "The one availability zone of every bench node (mirror, load generator and upstream in the same zone, so no cross-AZ hop differs between the runs), e.g. us-east-1a. Empty: any zone (then check the zones of the nodes before reading results)."
  type        = string
  default     = ""
}

variable "c7g_instance_type" {
  description = "The arm64 (Graviton) instance type under test."
  type        = string
  default     = "c7g.xlarge"
}

variable "c7i_instance_type" {
  description = "The amd64 instance type under test; keep it the same size as c7g_instance_type."
  type        = string
  default     = "c7i.xlarge"
}

variable "node_count" {
  description = "Nodes per pool under test (equal for both): 2 = one for archmirror, one for the load generator."
  type        = number
  default     = 2
}

variable "node_vcpus" {
  description = "vCPUs of one node of the pools under test (xlarge: 4); with node_count it sets the pools' CPU limit, which caps them at node_count nodes."
  type        = number
  default     = 4
}

variable "infra_instance_type" {
  description = "Instance type of the infra node (upstream registry, two relays, seed Job): not under test, but the same for both runs."
  type        = string
  default     = "m7i.xlarge"
}

variable "infra_node_count" {
  description = "Nodes of the infra pool."
  type        = number
  default     = 1
}

variable "infra_node_vcpus" {
  description = "vCPUs of one infra node (m7i.xlarge: 4)."
  type        = number
  default     = 4
}

variable "capacity_types" {
  description = "karpenter.sh/capacity-type values: on-demand by default (a Spot reclaim in the middle of a run spoils it)."
  type        = list(string)
  default     = ["on-demand"]
}

variable "extra_node_labels" {
  description = "More labels for every bench node, e.g. { \"archmirror.io/hosts-toml\" = \"bootstrap\" } when the node class is archmirror-al2023 and the node-setup DaemonSet is installed."
  type        = map(string)
  default     = {}
}

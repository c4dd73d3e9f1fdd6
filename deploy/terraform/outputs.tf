output "nodepools" {
  description = "NodePools created, highest weight first."
  value       = ["graviton (arm64, weight 30)", "general (amd64, weight 10)"]
}

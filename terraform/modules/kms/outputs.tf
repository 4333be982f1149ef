output "key_arn" {
  description = "ARN of the deployment's customer-managed key."
  value       = aws_kms_key.this.arn
}

output "identifiers" {
  description = "RDS instance identifier of each database."
  value       = { for k, db in aws_db_instance.this : k => db.identifier }
}

output "endpoints" {
  description = "host:port of each database (control, data)."
  value       = { for k, db in aws_db_instance.this : k => db.endpoint }
}

output "secret_arns" {
  description = "The Secrets Manager secret holding each database's master credentials (JSON with username and password)."
  value       = { for k, db in aws_db_instance.this : k => db.master_user_secret[0].secret_arn }
}

output "security_group_id" {
  description = "The databases' security group."
  value       = aws_security_group.db.id
}

output "queue_arns" {
  description = "ARN of each main queue, by name (wakeups, buffers, alerts)."
  value       = { for k, q in aws_sqs_queue.main : k => q.arn }
}

output "dlq_arns" {
  description = "ARN of each dead-letter queue, by its main queue's name."
  value       = { for k, q in aws_sqs_queue.dlq : k => q.arn }
}

output "dlq_names" {
  description = "Name of each dead-letter queue, by its main queue's name (the alarms watch them)."
  value       = { for k, q in aws_sqs_queue.dlq : k => q.name }
}

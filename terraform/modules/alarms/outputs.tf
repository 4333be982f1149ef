output "topic_arn" {
  description = "The SNS topic every alarm notifies; subscribe the on-call rota to it."
  value       = aws_sns_topic.alarms.arn
}

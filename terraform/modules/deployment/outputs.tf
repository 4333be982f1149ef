output "api_url" {
  description = "Where workers and operators reach the API."
  value       = var.api_url
}

output "bucket" {
  description = "The objects bucket (DISPATCHER_S3_BUCKET)."
  value       = module.storage.bucket
}

output "queue_prefix" {
  description = "DISPATCHER_SQS_QUEUE_PREFIX of every process."
  value       = local.queue_prefix
}

output "database_endpoints" {
  description = "host:port of the control and data databases."
  value       = module.database.endpoints
}

output "task_objects_role_arn" {
  description = "The role the dispatcher mints task credentials from (DISPATCHER_STS_ROLE_ARN)."
  value       = module.iam.role_arns.task_objects
}

output "cluster_name" {
  description = "The ECS cluster; `aws ecs execute-command` reaches a dispatcher task for `dispatcher admin …`."
  value       = module.service.cluster_name
}

output "alarm_topic_arn" {
  description = "SNS topic of every alarm."
  value       = module.alarms.topic_arn
}

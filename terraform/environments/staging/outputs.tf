output "deployment" {
  description = "What the processes and operators need: api_url, bucket, queue_prefix, database_endpoints, task_objects_role_arn, cluster_name, alarm_topic_arn (modules/deployment/outputs.tf)."
  value       = module.deployment
}

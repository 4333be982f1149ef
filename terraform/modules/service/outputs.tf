output "cluster_name" {
  description = "The ECS cluster."
  value       = aws_ecs_cluster.this.name
}

output "service_names" {
  description = "The dispatcher and worker services."
  value       = { dispatcher = aws_ecs_service.dispatcher.name, worker = aws_ecs_service.worker.name }
}

output "lb_arn_suffix" {
  description = "The API load balancer's ARN suffix (CloudWatch dimension)."
  value       = aws_lb.api.arn_suffix
}

output "log_groups" {
  description = "The services' log groups."
  value       = { for k, g in aws_cloudwatch_log_group.this : k => g.name }
}

output "security_group_ids" {
  description = "Security groups of the API load balancer (alb), the dispatcher's tasks and the workers' tasks."
  value = {
    alb        = aws_security_group.alb.id
    dispatcher = aws_security_group.dispatcher.id
    worker     = aws_security_group.worker.id
  }
}

output "function_template" {
  description = "The worker's WORKER_LAMBDA_FUNCTION: the functions' names with {org} and {bundle} to fill."
  value       = "${var.function_prefix}-{org}-{bundle}"
}

output "function_names" {
  description = "Each function's name, by its key in var.functions."
  value       = { for k, f in aws_lambda_function.runner : k => f.function_name }
}

output "role_arn" {
  description = "The functions' role (logs, ENIs, traces; nothing of the service)."
  value       = aws_iam_role.runner.arn
}

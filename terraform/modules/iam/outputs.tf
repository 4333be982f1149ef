output "role_arns" {
  description = "ARN of each role: dispatcher, worker, task_objects (DISPATCHER_STS_ROLE_ARN), execution."
  value = {
    dispatcher   = aws_iam_role.dispatcher.arn
    worker       = aws_iam_role.worker.arn
    task_objects = aws_iam_role.task_objects.arn
    execution    = aws_iam_role.execution.arn
  }
}

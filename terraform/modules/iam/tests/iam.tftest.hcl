mock_provider "aws" {
  source = "../../mocks"
}

variables {
  name            = "dispatcher-test"
  account_id      = "123456789012"
  region          = "eu-west-1"
  cluster_name    = "dispatcher-test"
  function_prefix = "udf-test"
  queue_arns = {
    wakeups = "arn:aws:sqs:eu-west-1:123456789012:t-wakeups"
    buffers = "arn:aws:sqs:eu-west-1:123456789012:t-buffers"
    alerts  = "arn:aws:sqs:eu-west-1:123456789012:t-alerts"
  }
  dlq_arns = {
    wakeups = "arn:aws:sqs:eu-west-1:123456789012:t-wakeups-dlq"
    buffers = "arn:aws:sqs:eu-west-1:123456789012:t-buffers-dlq"
    alerts  = "arn:aws:sqs:eu-west-1:123456789012:t-alerts-dlq"
  }
  bucket_arn  = "arn:aws:s3:::t-objects"
  kms_key_arn = "arn:aws:kms:eu-west-1:123456789012:key/00000000-0000-0000-0000-000000000000"
  secret_arns = ["arn:aws:secretsmanager:eu-west-1:123456789012:secret:t"]
}

# The SDK calls of dispatcher/src (objects/s3.rs, queue/sqs.rs,
# objects/sts.rs) and worker-wrapper/src/wakeups.rs, as IAM actions; the
# Rust test `terraform_iam_grants_exactly_the_calls_the_code_makes` checks
# this list against the code.
run "each_role_grants_exactly_the_calls_its_code_makes" {
  command = apply

  assert {
    condition = toset(flatten(data.aws_iam_policy_document.dispatcher.statement[*].actions)) == toset([
      "sqs:SendMessage", "sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:ChangeMessageVisibility", "sqs:GetQueueUrl",
      "s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:ListBucket",
      "kms:GenerateDataKey", "kms:Decrypt", "sts:AssumeRole",
    ])
    error_message = "the dispatcher's actions"
  }
  assert {
    condition = toset(flatten(data.aws_iam_policy_document.worker.statement[*].actions)) == toset([
      "sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:ChangeMessageVisibility", "sqs:GetQueueUrl",
      "ecs:UpdateTaskProtection", "lambda:InvokeFunction",
    ])
    error_message = "the worker's actions: the wake-up queue, its scale-in protection and the runner functions, nothing else"
  }
  assert {
    condition = flatten(data.aws_iam_policy_document.worker.statement[*].resources) == [
      var.queue_arns.wakeups, "arn:aws:ecs:eu-west-1:123456789012:task/dispatcher-test/*",
      "arn:aws:lambda:eu-west-1:123456789012:function:udf-test-*",
    ]
    error_message = "the worker reaches the wake-up queue alone (ADR 0009) and its cluster's tasks' protection"
  }
  assert {
    condition = toset(flatten(data.aws_iam_policy_document.task_objects.statement[*].actions)) == toset([
      "s3:PutObject", "s3:AbortMultipartUpload", "s3:GetObject", "kms:GenerateDataKey", "kms:Decrypt",
    ])
    error_message = "the task-objects ceiling: the session policy's actions"
  }
  assert {
    condition = alltrue([for s in concat(data.aws_iam_policy_document.dispatcher.statement, data.aws_iam_policy_document.worker.statement, data.aws_iam_policy_document.task_objects.statement) :
    !contains(s.resources, "*") && alltrue([for a in s.actions : !endswith(a, "*")])])
    error_message = "no wildcard action and no * resource"
  }
}

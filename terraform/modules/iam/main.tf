# One least-privilege role per service, each granting exactly the calls the
# code makes (docs: terraform/README.md, "IAM"):
# * dispatcher: the six queues (send, receive, delete, visibility, URL),
#   the objects bucket (get and head, put, delete, list), the key, and
#   AssumeRole on the task-objects role alone;
# * worker: the wake-up queue alone (receive, delete, visibility, URL),
#   its own task's scale-in protection (through the ECS agent), and the
#   invocation of the UDF runner functions, `<function_prefix>-*` (ADR 0026); no
#   bucket, no database (ADR 0009);
# * task-objects: what `POST /v1/task/credentials` hands a task, under a
#   session policy that narrows it to one attempt's prefix (ADR 0010);
# * execution: pulls images, writes logs, reads the database secrets.

data "aws_partition" "current" {}

locals {
  p = data.aws_partition.current.partition
}

data "aws_iam_policy_document" "ecs_tasks_assume" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["ecs-tasks.amazonaws.com"]
    }
    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [var.account_id]
    }
  }
}

# --- dispatcher ---------------------------------------------------------

data "aws_iam_policy_document" "dispatcher" {
  statement {
    sid = "Queues"
    actions = [
      "sqs:SendMessage",
      "sqs:ReceiveMessage",
      "sqs:DeleteMessage",
      "sqs:ChangeMessageVisibility",
      "sqs:GetQueueUrl",
    ]
    resources = concat(values(var.queue_arns), values(var.dlq_arns))
  }
  statement {
    sid       = "Objects"
    actions   = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject"]
    resources = ["${var.bucket_arn}/*"]
  }
  statement {
    sid       = "ListObjects"
    actions   = ["s3:ListBucket"]
    resources = [var.bucket_arn]
  }
  statement {
    sid       = "ObjectKey"
    actions   = ["kms:GenerateDataKey", "kms:Decrypt"]
    resources = [var.kms_key_arn]
  }
  statement {
    sid       = "MintTaskCredentials"
    actions   = ["sts:AssumeRole"]
    resources = [aws_iam_role.task_objects.arn]
  }
}

resource "aws_iam_role" "dispatcher" {
  name               = "${var.name}-dispatcher"
  assume_role_policy = data.aws_iam_policy_document.ecs_tasks_assume.json
}

resource "aws_iam_role_policy" "dispatcher" {
  name   = "dispatcher"
  role   = aws_iam_role.dispatcher.id
  policy = data.aws_iam_policy_document.dispatcher.json
}

# --- worker -------------------------------------------------------------

data "aws_iam_policy_document" "worker" {
  statement {
    sid = "WakeUps"
    actions = [
      "sqs:ReceiveMessage",
      "sqs:DeleteMessage",
      "sqs:ChangeMessageVisibility",
      "sqs:GetQueueUrl",
    ]
    resources = [var.queue_arns["wakeups"]]
  }
  statement {
    sid       = "ScaleInProtection"
    actions   = ["ecs:UpdateTaskProtection"]
    resources = ["arn:${local.p}:ecs:${var.region}:${var.account_id}:task/${var.cluster_name}/*"]
  }
  statement {
    sid       = "InvokeRunners"
    actions   = ["lambda:InvokeFunction"]
    resources = ["arn:${local.p}:lambda:${var.region}:${var.account_id}:function:${var.function_prefix}-*"]
  }
}

resource "aws_iam_role" "worker" {
  name               = "${var.name}-worker"
  assume_role_policy = data.aws_iam_policy_document.ecs_tasks_assume.json
}

resource "aws_iam_role_policy" "worker" {
  name   = "worker"
  role   = aws_iam_role.worker.id
  policy = data.aws_iam_policy_document.worker.json
}

# --- task-objects (assumed by the dispatcher for one attempt) ------------

data "aws_iam_policy_document" "task_objects_assume" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "AWS"
      identifiers = [aws_iam_role.dispatcher.arn]
    }
  }
}

# The ceiling; each session's policy narrows it to one attempt's prefix
# and the keys it may read (`dispatcher::objects::sts::session_policy`).
data "aws_iam_policy_document" "task_objects" {
  statement {
    sid       = "AttemptObjects"
    actions   = ["s3:PutObject", "s3:AbortMultipartUpload", "s3:GetObject"]
    resources = ["${var.bucket_arn}/orgs/*"]
  }
  statement {
    sid       = "ObjectKey"
    actions   = ["kms:GenerateDataKey", "kms:Decrypt"]
    resources = [var.kms_key_arn]
  }
}

resource "aws_iam_role" "task_objects" {
  name                 = "${var.name}-task-objects"
  assume_role_policy   = data.aws_iam_policy_document.task_objects_assume.json
  max_session_duration = 3600
}

resource "aws_iam_role_policy" "task_objects" {
  name   = "task-objects"
  role   = aws_iam_role.task_objects.id
  policy = data.aws_iam_policy_document.task_objects.json
}

# --- execution (ECS agent: images, logs, secrets) -----------------------

data "aws_iam_policy_document" "execution" {
  statement {
    sid       = "DatabaseSecrets"
    actions   = ["secretsmanager:GetSecretValue"]
    resources = var.secret_arns
  }
  statement {
    sid       = "DecryptSecrets"
    actions   = ["kms:Decrypt"]
    resources = [var.kms_key_arn]
  }
}

resource "aws_iam_role" "execution" {
  name               = "${var.name}-ecs-execution"
  assume_role_policy = data.aws_iam_policy_document.ecs_tasks_assume.json
}

resource "aws_iam_role_policy_attachment" "execution" {
  role       = aws_iam_role.execution.name
  policy_arn = "arn:${local.p}:iam::aws:policy/service-role/AmazonECSTaskExecutionRolePolicy"
}

resource "aws_iam_role_policy" "execution" {
  name   = "secrets"
  role   = aws_iam_role.execution.id
  policy = data.aws_iam_policy_document.execution.json
}

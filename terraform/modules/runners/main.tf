# The UDF runner functions (ADR 0026): one Lambda function per org and
# bundle, invoked by the worker with the attempt's capability token alone.
# A function's package is the bundle's files with the project's runner
# beside them (scripts/package-lambda); Python and Node run on Lambda's
# managed runtime with the runner as its exec wrapper, Rust as a custom
# runtime (the bundle's own `bootstrap`).
#
# Lambda puts the function role's credentials where a UDF can read them, so
# the role may do nothing of ours: write its own logs, manage its ENIs and
# send traces. The functions reach the dispatcher's internal load balancer
# (HTTPS inside the VPC) and nothing else.

data "aws_partition" "current" {}

locals {
  p = data.aws_partition.current.partition
  # The worker's template (WORKER_LAMBDA_FUNCTION) names the same functions.
  names = {
    for k, f in var.functions : k => "${var.function_prefix}-${f.org}-${f.bundle}"
  }
  runtimes = {
    python = "python3.12"
    node   = "nodejs20.x"
    rust   = "provided.al2023"
  }
}

data "aws_iam_policy_document" "assume" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["lambda.amazonaws.com"]
    }
    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [var.account_id]
    }
  }
}

resource "aws_iam_role" "runner" {
  name               = "${var.function_prefix}-runner"
  assume_role_policy = data.aws_iam_policy_document.assume.json
}

data "aws_iam_policy_document" "logs" {
  statement {
    sid       = "OwnLogs"
    actions   = ["logs:CreateLogStream", "logs:PutLogEvents"]
    resources = ["arn:${local.p}:logs:${var.region}:${var.account_id}:log-group:/aws/lambda/${var.function_prefix}-*:*"]
  }
}

resource "aws_iam_role_policy" "logs" {
  name   = "own-logs"
  role   = aws_iam_role.runner.id
  policy = data.aws_iam_policy_document.logs.json
}

# ENIs in the VPC and X-Ray traces: AWS's managed policies, which hold
# exactly those calls.
resource "aws_iam_role_policy_attachment" "eni" {
  role       = aws_iam_role.runner.name
  policy_arn = "arn:${local.p}:iam::aws:policy/service-role/AWSLambdaENIManagementAccess"
}

resource "aws_iam_role_policy_attachment" "xray" {
  role       = aws_iam_role.runner.name
  policy_arn = "arn:${local.p}:iam::aws:policy/AWSXRayDaemonWriteAccess"
}

resource "aws_security_group" "runner" {
  name        = "${var.function_prefix}-runners"
  description = "UDF runner functions: HTTPS to the dispatcher's load balancer and the VPC endpoints, nothing else"
  vpc_id      = var.vpc_id

  egress {
    description = "HTTPS inside the VPC (the dispatcher API, the interface endpoints)"
    from_port   = 443
    to_port     = 443
    protocol    = "tcp"
    cidr_blocks = [var.vpc_cidr]
  }
}

resource "aws_cloudwatch_log_group" "runner" {
  for_each          = local.names
  name              = "/aws/lambda/${each.value}"
  retention_in_days = var.log_retention_days
  kms_key_id        = var.kms_key_arn
}

resource "aws_lambda_function" "runner" {
  #checkov:skip=CKV_AWS_116:Invoked synchronously (RequestResponse) by the worker; a DLQ only receives failed asynchronous events.
  #checkov:skip=CKV_AWS_272:Packages are built by scripts/package-lambda from a bundle checked by its digest; no signing profile.
  for_each      = var.functions
  function_name = local.names[each.key]
  description   = "UDF runner: bundle ${each.value.bundle} of org ${each.value.org} (${each.value.runtime})"
  role          = aws_iam_role.runner.arn
  package_type  = "Zip"
  s3_bucket     = var.package_bucket
  s3_key        = each.value.package_key
  runtime       = local.runtimes[each.value.runtime]
  # The runner reads the bundle's handler from _HANDLER, which Lambda sets
  # from this.
  handler                        = each.value.handler
  memory_size                    = each.value.memory_mb
  timeout                        = each.value.timeout_seconds
  reserved_concurrent_executions = each.value.reserved_concurrency
  kms_key_arn                    = var.kms_key_arn

  dynamic "environment" {
    for_each = each.value.runtime == "rust" ? [] : [1]
    content {
      variables = {
        # The managed runtime starts the project's runner instead of its
        # own client (the package's wrapper execs it).
        AWS_LAMBDA_EXEC_WRAPPER = "/var/task/.dispatcher/wrapper"
      }
    }
  }

  vpc_config {
    subnet_ids         = var.subnet_ids
    security_group_ids = [aws_security_group.runner.id]
  }

  tracing_config {
    mode = "Active"
  }

  depends_on = [aws_cloudwatch_log_group.runner, aws_iam_role_policy_attachment.eni]
}

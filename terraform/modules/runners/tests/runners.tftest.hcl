mock_provider "aws" {
  source = "../../mocks"
}

variables {
  function_prefix = "udf-test"
  account_id      = "123456789012"
  region          = "eu-west-1"
  vpc_id          = "vpc-0123456789abcdef0"
  vpc_cidr        = "10.40.0.0/16"
  subnet_ids      = ["subnet-0123456789abcdef0", "subnet-0123456789abcdef1"]
  kms_key_arn     = "arn:aws:kms:eu-west-1:123456789012:key/00000000-0000-0000-0000-000000000000"
  package_bucket  = "t-objects"
  functions = {
    probe = {
      org     = "0123456789abcdef0123456789abcdef", bundle = "a1b2c3d4e5f6", runtime = "python",
      handler = "probe.handler", package_key = "lambda/probe.zip", reserved_concurrency = 5, timeout_seconds = 60
    }
    native = {
      org     = "fedcba9876543210fedcba9876543210", bundle = "0f0f0f0f0f0f", runtime = "rust",
      handler = "bootstrap", package_key = "lambda/native.zip"
    }
  }
}

run "functions_are_named_as_the_worker_invokes_them_capped_per_org_and_inside_the_vpc" {
  command = plan

  assert {
    condition     = aws_lambda_function.runner["probe"].function_name == "udf-test-0123456789abcdef0123456789abcdef-a1b2c3d4e5f6"
    error_message = "the name the worker's template makes"
  }
  assert {
    condition     = length(aws_lambda_function.runner["probe"].function_name) <= 64
    error_message = "Lambda's name limit"
  }
  assert {
    condition     = output.function_template == "udf-test-{org}-{bundle}"
    error_message = "the worker's WORKER_LAMBDA_FUNCTION"
  }
  assert {
    condition     = aws_lambda_function.runner["probe"].reserved_concurrent_executions == 5 && aws_lambda_function.runner["native"].reserved_concurrent_executions == 10
    error_message = "reserved concurrency per org and bundle"
  }
  assert {
    condition     = aws_lambda_function.runner["probe"].runtime == "python3.12" && aws_lambda_function.runner["native"].runtime == "provided.al2023"
    error_message = "managed runtime for Python, a custom one for Rust"
  }
  assert {
    condition     = aws_lambda_function.runner["probe"].environment[0].variables.AWS_LAMBDA_EXEC_WRAPPER == "/var/task/.dispatcher/wrapper" && length(aws_lambda_function.runner["native"].environment) == 0
    error_message = "the project's runner starts as the exec wrapper; nothing else is in the environment"
  }
  assert {
    condition     = length(aws_lambda_function.runner["probe"].vpc_config) == 1 && aws_lambda_function.runner["probe"].tracing_config[0].mode == "Active"
    error_message = "in the VPC, traced"
  }
  assert {
    condition     = aws_lambda_function.runner["probe"].timeout == 60 && aws_lambda_function.runner["native"].timeout == 900
    error_message = "timeouts"
  }
}

run "the_runner_role_may_only_write_its_logs_manage_enis_and_send_traces" {
  command = apply

  assert {
    condition     = toset(flatten(data.aws_iam_policy_document.logs.statement[*].actions)) == toset(["logs:CreateLogStream", "logs:PutLogEvents"])
    error_message = "its own logs alone"
  }
  assert {
    condition     = flatten(data.aws_iam_policy_document.logs.statement[*].resources) == ["arn:aws:logs:eu-west-1:123456789012:log-group:/aws/lambda/udf-test-*:*"]
    error_message = "the runner functions' log groups alone"
  }
  assert {
    condition = toset([aws_iam_role_policy_attachment.eni.policy_arn, aws_iam_role_policy_attachment.xray.policy_arn]) == toset([
      "arn:aws:iam::aws:policy/service-role/AWSLambdaENIManagementAccess", "arn:aws:iam::aws:policy/AWSXRayDaemonWriteAccess",
    ])
    error_message = "ENIs and traces, nothing of the service's"
  }
  assert {
    condition     = length(aws_security_group.runner.ingress) == 0 && alltrue([for e in aws_security_group.runner.egress : e.from_port == 443 && e.to_port == 443 && length(e.cidr_blocks) == 1 && contains(e.cidr_blocks, "10.40.0.0/16")])
    error_message = "no ingress; HTTPS inside the VPC only"
  }
}

run "a_prefix_too_long_for_lambda_names_is_refused" {
  command = plan
  variables {
    function_prefix = "dispatcher-production"
  }
  expect_failures = [var.function_prefix]
}

run "a_function_without_a_full_org_id_is_refused" {
  command = plan
  variables {
    functions = {
      bad = { org = "0123", bundle = "a1b2c3d4e5f6", runtime = "python", handler = "h.h", package_key = "k" }
    }
  }
  expect_failures = [var.functions]
}

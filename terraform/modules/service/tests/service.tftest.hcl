mock_provider "aws" {
  source = "../../mocks"
}

variables {
  name                         = "dispatcher-test"
  region                       = "eu-west-1"
  vpc_id                       = "vpc-0123456789abcdef0"
  subnet_ids                   = ["subnet-0123456789abcdef0", "subnet-0123456789abcdef1"]
  vpc_cidr                     = "10.40.0.0/16"
  role_arns                    = { dispatcher = "arn:aws:iam::123456789012:role/d", worker = "arn:aws:iam::123456789012:role/w", task_objects = "arn:aws:iam::123456789012:role/t", execution = "arn:aws:iam::123456789012:role/e" }
  kms_key_arn                  = "arn:aws:kms:eu-west-1:123456789012:key/00000000-0000-0000-0000-000000000000"
  lb_log_bucket                = "t-access-logs"
  certificate_arn              = "arn:aws:acm:eu-west-1:123456789012:certificate/00000000-0000-0000-0000-000000000000"
  api_url                      = "https://dispatcher.internal.example"
  queue_prefix                 = "t-"
  bucket                       = "t-objects"
  database_endpoints           = { control = "c.example:5432", data = "d.example:5432" }
  database_secret_arns         = { control = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:c", data = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:d" }
  signing_key_secret_arn       = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:k"
  worker_credential_secret_arn = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:w"
  dispatcher_image             = "123456789012.dkr.ecr.eu-west-1.amazonaws.com/dispatcher@sha256:0000"
  worker_image                 = "123456789012.dkr.ecr.eu-west-1.amazonaws.com/worker@sha256:0000"
}

run "the_worker_fleet_scales_on_the_backlog_per_slot" {
  command = plan

  assert {
    condition     = aws_appautoscaling_policy.worker_backlog.policy_type == "TargetTrackingScaling"
    error_message = "target tracking"
  }
  assert {
    condition = one([for m in aws_appautoscaling_policy.worker_backlog.target_tracking_scaling_policy_configuration[0].customized_metric_specification[0].metrics :
    m.expression if m.return_data]) == "MAX([r_python, r_node, r_rust])"
    error_message = "the returned series is the busiest runtime's backlog"
  }
  assert {
    condition = alltrue([for m in aws_appautoscaling_policy.worker_backlog.target_tracking_scaling_policy_configuration[0].customized_metric_specification[0].metrics :
    m.metric_stat[0].metric[0].metric_name == "ReadyTasksPerSlot" && m.metric_stat[0].metric[0].namespace == "Dispatcher" if !m.return_data])
    error_message = "each input is the published dispatcher_ready_tasks_per_slot"
  }
  assert {
    condition     = aws_appautoscaling_policy.worker_backlog.target_tracking_scaling_policy_configuration[0].target_value == 1
    error_message = "one ready task per slot"
  }
  assert {
    condition     = aws_appautoscaling_target.worker.min_capacity >= 1
    error_message = "target tracking cannot scale up from zero"
  }
}

run "the_api_is_internal_https_and_the_tasks_private" {
  command = plan

  assert {
    condition = alltrue([for sg in [aws_security_group.alb, aws_security_group.dispatcher, aws_security_group.worker] :
    alltrue([for r in sg.ingress : !contains(coalesce(r.cidr_blocks, []), "0.0.0.0/0")])])
    error_message = "no security group takes traffic from the internet"
  }
  assert {
    condition     = aws_lb.api.internal && aws_lb_listener.api.protocol == "HTTPS"
    error_message = "the API is internal and HTTPS"
  }
  assert {
    condition     = !aws_ecs_service.dispatcher.network_configuration[0].assign_public_ip && !aws_ecs_service.worker.network_configuration[0].assign_public_ip
    error_message = "no task has a public address"
  }
  assert {
    condition     = alltrue([for c in jsondecode(aws_ecs_task_definition.worker.container_definitions) : c.stopTimeout >= 25])
    error_message = "a stopping worker has its 20 s drain and 5 s hand-back"
  }
  assert {
    condition = alltrue([for c in jsondecode(aws_ecs_task_definition.worker.container_definitions) :
    !anytrue([for e in c.environment : can(regex("DATABASE|SIGNING|STS", e.name))])])
    error_message = "a worker holds no database, signing or STS setting"
  }
  assert {
    condition     = alltrue([for c in concat(jsondecode(aws_ecs_task_definition.worker.container_definitions), jsondecode(aws_ecs_task_definition.dispatcher.container_definitions)) : c.readonlyRootFilesystem])
    error_message = "read-only root filesystems"
  }
}

run "a_fleet_of_zero_is_refused" {
  command = plan
  variables {
    worker_min = 0
  }
  expect_failures = [var.worker_min]
}

run "workers_invoke_the_runner_functions_only_when_lambda_runtimes_are_set" {
  command = plan
  variables {
    lambda_function = "udf-test-{org}-{bundle}"
    lambda_runtimes = ["python", "node"]
  }

  assert {
    condition     = contains(jsondecode(aws_ecs_task_definition.worker.container_definitions)[0].environment, { name = "WORKER_LAMBDA_FUNCTION", value = "udf-test-{org}-{bundle}" }) && contains(jsondecode(aws_ecs_task_definition.worker.container_definitions)[0].environment, { name = "WORKER_LAMBDA_RUNTIMES", value = "python,node" })
    error_message = "the worker's template and runtimes"
  }
}

run "without_lambda_runtimes_every_task_runs_on_the_workers" {
  command = plan

  assert {
    condition     = length([for e in jsondecode(aws_ecs_task_definition.worker.container_definitions)[0].environment : e if startswith(e.name, "WORKER_LAMBDA_")]) == 0
    error_message = "no Lambda settings by default"
  }
}

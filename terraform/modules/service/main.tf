# The ECS services: the dispatcher (every role, ADR 0021; behind an
# internal HTTPS load balancer that workers and operators reach) and the
# worker fleet, which scales on the backlog per worker slot.

data "aws_partition" "current" {}

locals {
  p        = data.aws_partition.current.partition
  keys_dir = "/run/dispatcher"
  log_config = { for svc in ["dispatcher", "worker"] : svc => {
    logDriver = "awslogs"
    options = {
      awslogs-group         = aws_cloudwatch_log_group.this[svc].name
      awslogs-region        = var.region
      awslogs-stream-prefix = svc
    }
  } }
  common_env = [
    { name = "DISPATCHER_PROFILE", value = "aws" },
    { name = "DISPATCHER_WAKEUPS", value = "queue" },
    { name = "AWS_REGION", value = var.region },
    { name = "DISPATCHER_SQS_QUEUE_PREFIX", value = var.queue_prefix },
    { name = "LOG_FORMAT", value = "json" },
  ]
  db_url = { for k, e in var.database_endpoints : k =>
    "postgres://dispatcher@${e}/dispatcher?sslmode=${var.database_sslmode}&sslrootcert=${var.database_ca_file}"
  }
  # Secrets arrive as environment variables; the signing key and the
  # worker credential are files to the binaries, written to a tmpfs-like
  # task volume (the root filesystem is read-only) before exec.
  dispatcher_start = "umask 077 && printf '%s' \"$SIGNING_KEY_PEM\" > ${local.keys_dir}/signing.pem && unset SIGNING_KEY_PEM && exec dispatcher serve"
  worker_start     = "umask 077 && printf '%s' \"$WORKER_CREDENTIAL\" > ${local.keys_dir}/worker.jwt && unset WORKER_CREDENTIAL && exec worker-wrapper run"
}

resource "aws_ecs_cluster" "this" {
  name = var.name
  setting {
    name  = "containerInsights"
    value = "enabled"
  }
}

resource "aws_cloudwatch_log_group" "this" {
  for_each          = toset(["dispatcher", "worker"])
  name              = "/${var.name}/${each.key}"
  retention_in_days = var.log_retention_days
  kms_key_id        = var.kms_key_arn
}

# The services' security groups (the databases let the dispatcher's in).
resource "aws_security_group" "alb" {
  name        = "${var.name}-api-lb"
  description = "The dispatcher API's internal load balancer"
  vpc_id      = var.vpc_id

  ingress {
    description = "HTTPS from workers, runners and operators inside the VPC"
    from_port   = 443
    to_port     = 443
    protocol    = "tcp"
    cidr_blocks = [var.vpc_cidr]
  }

  egress {
    description = "To the dispatcher tasks"
    from_port   = 8080
    to_port     = 8080
    protocol    = "tcp"
    cidr_blocks = [var.vpc_cidr]
  }
}

resource "aws_security_group" "dispatcher" {
  name        = "${var.name}-dispatcher"
  description = "Dispatcher tasks: the API from the load balancer, metrics from inside the VPC"
  vpc_id      = var.vpc_id

  ingress {
    description     = "API from the load balancer"
    from_port       = 8080
    to_port         = 8080
    protocol        = "tcp"
    security_groups = [aws_security_group.alb.id]
  }

  ingress {
    description = "Prometheus scrapes of /metrics and /health"
    from_port   = 9464
    to_port     = 9464
    protocol    = "tcp"
    cidr_blocks = [var.vpc_cidr]
  }

  egress {
    description = "HTTPS: AWS APIs and webhook receivers"
    from_port   = 443
    to_port     = 443
    protocol    = "tcp"
    cidr_blocks = ["0.0.0.0/0"]
  }

  egress {
    description = "Postgres inside the VPC"
    from_port   = 5432
    to_port     = 5432
    protocol    = "tcp"
    cidr_blocks = [var.vpc_cidr]
  }
}

resource "aws_security_group" "worker" {
  name        = "${var.name}-worker"
  description = "Worker tasks: no inbound but metrics; out to the API and AWS over HTTPS"
  vpc_id      = var.vpc_id

  ingress {
    description = "Prometheus scrapes of the worker /metrics"
    from_port   = 9465
    to_port     = 9465
    protocol    = "tcp"
    cidr_blocks = [var.vpc_cidr]
  }

  egress {
    description = "HTTPS: the dispatcher API, SQS, S3, ECR"
    from_port   = 443
    to_port     = 443
    protocol    = "tcp"
    cidr_blocks = ["0.0.0.0/0"]
  }
}

# --- the API's internal load balancer ------------------------------------

resource "aws_lb" "api" {
  #checkov:skip=CKV2_AWS_28:Internal load balancer reached only from inside the VPC; a WAF fronts public endpoints.
  name                       = "${var.name}-api"
  internal                   = true
  load_balancer_type         = "application"
  security_groups            = [aws_security_group.alb.id]
  subnets                    = var.subnet_ids
  drop_invalid_header_fields = true
  enable_deletion_protection = true
  idle_timeout               = 60 # longer than the longest long-poll (20 s)
  access_logs {
    bucket  = var.lb_log_bucket
    prefix  = "api-lb"
    enabled = true
  }
}

resource "aws_lb_target_group" "api" {
  name                 = "${var.name}-api"
  port                 = 8080
  protocol             = "HTTP"
  target_type          = "ip"
  vpc_id               = var.vpc_id
  deregistration_delay = 15 # the dispatcher's drain: 5 s not ready, then 10 s for requests in flight
  health_check {
    path                = "/readyz"
    matcher             = "200"
    interval            = 5
    healthy_threshold   = 2
    unhealthy_threshold = 2
  }
}

resource "aws_lb_listener" "api" {
  load_balancer_arn = aws_lb.api.arn
  port              = 443
  protocol          = "HTTPS"
  ssl_policy        = "ELBSecurityPolicy-TLS13-1-2-2021-06"
  certificate_arn   = var.certificate_arn
  default_action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.api.arn
  }
}

# --- the dispatcher --------------------------------------------------------

resource "aws_ecs_task_definition" "dispatcher" {
  family                   = "${var.name}-dispatcher"
  requires_compatibilities = ["FARGATE"]
  network_mode             = "awsvpc"
  cpu                      = var.dispatcher_cpu
  memory                   = var.dispatcher_memory
  execution_role_arn       = var.role_arns.execution
  task_role_arn            = var.role_arns.dispatcher
  volume {
    name = "keys"
  }
  container_definitions = jsonencode([{
    name                   = "dispatcher"
    image                  = var.dispatcher_image
    essential              = true
    readonlyRootFilesystem = true
    entryPoint             = ["/bin/sh", "-c"]
    command                = [local.dispatcher_start]
    stopTimeout            = 30
    portMappings = [
      { containerPort = 8080, protocol = "tcp" },
      { containerPort = 9464, protocol = "tcp" },
    ]
    mountPoints = [{ sourceVolume = "keys", containerPath = local.keys_dir }]
    environment = concat(local.common_env, [
      { name = "DISPATCHER_BIND", value = "0.0.0.0:8080" },
      { name = "DISPATCHER_METRICS_BIND", value = "0.0.0.0:9464" },
      { name = "DISPATCHER_PUBLIC_URL", value = var.api_url },
      { name = "DISPATCHER_S3_BUCKET", value = var.bucket },
      { name = "DISPATCHER_STS_ROLE_ARN", value = var.role_arns.task_objects },
      { name = "DISPATCHER_S3_KMS_KEY_ARN", value = var.kms_key_arn },
      { name = "DISPATCHER_SIGNING_KEY_FILE", value = "${local.keys_dir}/signing.pem" },
      { name = "DISPATCHER_ISSUER", value = var.issuer },
      { name = "DATABASE_URL", value = local.db_url.control },
      { name = "DATA_DATABASE_URL", value = local.db_url.data },
      { name = "DISPATCHER_BACKLOG_EMF_NAMESPACE", value = var.metric_namespace },
    ])
    secrets = [
      { name = "SIGNING_KEY_PEM", valueFrom = var.signing_key_secret_arn },
      { name = "DATABASE_PASSWORD", valueFrom = "${var.database_secret_arns.control}:password::" },
      { name = "DATA_DATABASE_PASSWORD", valueFrom = "${var.database_secret_arns.data}:password::" },
    ]
    healthCheck = {
      command  = ["CMD", "dispatcher", "healthcheck", "--url", "http://127.0.0.1:8080/readyz"]
      interval = 10
      timeout  = 5
      retries  = 3
    }
    logConfiguration = local.log_config.dispatcher
  }])
}

resource "aws_ecs_service" "dispatcher" {
  name                               = "${var.name}-dispatcher"
  cluster                            = aws_ecs_cluster.this.id
  task_definition                    = aws_ecs_task_definition.dispatcher.arn
  desired_count                      = var.dispatcher_count
  launch_type                        = "FARGATE"
  deployment_minimum_healthy_percent = 100
  deployment_maximum_percent         = 200
  network_configuration {
    subnets          = var.subnet_ids
    security_groups  = [aws_security_group.dispatcher.id]
    assign_public_ip = false
  }
  load_balancer {
    target_group_arn = aws_lb_target_group.api.arn
    container_name   = "dispatcher"
    container_port   = 8080
  }
  depends_on = [aws_lb_listener.api]
}

# --- the worker fleet ------------------------------------------------------

resource "aws_ecs_task_definition" "worker" {
  family                   = "${var.name}-worker"
  requires_compatibilities = ["FARGATE"]
  network_mode             = "awsvpc"
  cpu                      = var.worker_cpu
  memory                   = var.worker_memory
  execution_role_arn       = var.role_arns.execution
  task_role_arn            = var.role_arns.worker
  volume {
    name = "keys"
  }
  volume {
    name = "scratch"
  }
  container_definitions = jsonencode([{
    name                   = "worker"
    image                  = var.worker_image
    essential              = true
    readonlyRootFilesystem = true
    entryPoint             = ["/bin/sh", "-c"]
    command                = [local.worker_start]
    # The worker's drain: 20 s for running tasks, then 5 s to hand the
    # rest back (docs/standards/operations.md); ECS waits 30 s.
    stopTimeout  = 30
    portMappings = [{ containerPort = 9465, protocol = "tcp" }]
    mountPoints = [
      { sourceVolume = "keys", containerPath = local.keys_dir },
      { sourceVolume = "scratch", containerPath = "/scratch" },
    ]
    environment = concat(local.common_env, [
      { name = "DISPATCHER_URL", value = var.api_url },
      { name = "WORKER_CREDENTIAL_FILE", value = "${local.keys_dir}/worker.jwt" },
      { name = "WORKER_CONCURRENCY", value = tostring(var.worker_slots) },
      { name = "WORKER_SCRATCH_DIR", value = "/scratch" },
      { name = "WORKER_METRICS_BIND", value = "0.0.0.0:9465" },
      { name = "WORKER_ECS_TASK_PROTECTION", value = "true" },
      ], length(var.lambda_runtimes) == 0 ? [] : [
      { name = "WORKER_LAMBDA_FUNCTION", value = var.lambda_function },
      { name = "WORKER_LAMBDA_RUNTIMES", value = join(",", var.lambda_runtimes) },
    ])
    secrets = [
      { name = "WORKER_CREDENTIAL", valueFrom = var.worker_credential_secret_arn },
    ]
    logConfiguration = local.log_config.worker
  }])
}

resource "aws_ecs_service" "worker" {
  name                               = "${var.name}-worker"
  cluster                            = aws_ecs_cluster.this.id
  task_definition                    = aws_ecs_task_definition.worker.arn
  desired_count                      = var.worker_min
  launch_type                        = "FARGATE"
  deployment_minimum_healthy_percent = 50
  deployment_maximum_percent         = 200
  network_configuration {
    subnets          = var.subnet_ids
    security_groups  = [aws_security_group.worker.id]
    assign_public_ip = false
  }
  lifecycle {
    ignore_changes = [desired_count] # the autoscaler owns it
  }
}

resource "aws_appautoscaling_target" "worker" {
  service_namespace  = "ecs"
  resource_id        = "service/${aws_ecs_cluster.this.name}/${aws_ecs_service.worker.name}"
  scalable_dimension = "ecs:service:DesiredCount"
  min_capacity       = var.worker_min
  max_capacity       = var.worker_max
}

# Target tracking on the dispatcher's backlog signal: ready tasks per
# worker slot (`dispatcher_ready_tasks_per_slot`, published to CloudWatch
# by the dispatcher as `ReadyTasksPerSlot` by runtime), the busiest
# runtime's. Target 1: every ready task has a slot to go to.
resource "aws_appautoscaling_policy" "worker_backlog" {
  name               = "${var.name}-worker-backlog"
  policy_type        = "TargetTrackingScaling"
  service_namespace  = aws_appautoscaling_target.worker.service_namespace
  resource_id        = aws_appautoscaling_target.worker.resource_id
  scalable_dimension = aws_appautoscaling_target.worker.scalable_dimension

  target_tracking_scaling_policy_configuration {
    target_value       = var.backlog_target
    scale_out_cooldown = 60
    scale_in_cooldown  = 300
    customized_metric_specification {
      dynamic "metrics" {
        for_each = var.runtimes
        content {
          id          = "r_${metrics.value}"
          label       = "ReadyTasksPerSlot ${metrics.value}"
          return_data = false
          metric_stat {
            stat = "Maximum"
            metric {
              namespace   = var.metric_namespace
              metric_name = "ReadyTasksPerSlot"
              dimensions {
                name  = "Runtime"
                value = metrics.value
              }
            }
          }
        }
      }
      metrics {
        id          = "backlog"
        label       = "Ready tasks per worker slot, busiest runtime"
        expression  = "MAX([${join(", ", [for r in var.runtimes : "r_${r}"])}])"
        return_data = true
      }
    }
  }
}

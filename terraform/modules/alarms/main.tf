# CloudWatch alarms on what the runbooks act on, each naming its runbook,
# all to one encrypted SNS topic the operators subscribe to.

resource "aws_sns_topic" "alarms" {
  name              = "${var.name}-alarms"
  kms_master_key_id = var.kms_key_arn
}

locals {
  dlq_runbook = {
    wakeups = "runbooks/dlq-replay.md"
    buffers = "runbooks/sink-dead-batches.md"
    alerts  = "runbooks/alert-dead-deliveries.md"
  }
  # The dispatcher's published gauges (namespace var.metric_namespace).
  published = {
    outbox_dead = {
      metric    = "OutboxDeadRows"
      threshold = 0
      minutes   = 1
      runbook   = "runbooks/outbox-dead-rows.md"
      what      = "outbox rows the relay gave up on"
    }
    relay_lag = {
      metric    = "OutboxOldestPendingAgeSeconds"
      threshold = 60
      minutes   = 5
      runbook   = "runbooks/outbox-dead-rows.md"
      what      = "the relay is more than a minute behind"
    }
    sink_lag = {
      metric    = "SinkOldestPendingAgeSeconds"
      threshold = 300
      minutes   = 10
      runbook   = "runbooks/sink-dead-batches.md"
      what      = "the sink is more than five minutes behind"
    }
  }
}

resource "aws_cloudwatch_metric_alarm" "dlq" {
  for_each            = var.dlq_names
  alarm_name          = "${var.name}-${each.key}-dlq"
  alarm_description   = "Messages in ${each.value}: see ${local.dlq_runbook[each.key]}"
  namespace           = "AWS/SQS"
  metric_name         = "ApproximateNumberOfMessagesVisible"
  dimensions          = { QueueName = each.value }
  statistic           = "Maximum"
  period              = 60
  evaluation_periods  = 1
  threshold           = 0
  comparison_operator = "GreaterThanThreshold"
  treat_missing_data  = "notBreaching"
  alarm_actions       = [aws_sns_topic.alarms.arn]
  ok_actions          = [aws_sns_topic.alarms.arn]
}

resource "aws_cloudwatch_metric_alarm" "published" {
  for_each            = local.published
  alarm_name          = "${var.name}-${replace(each.key, "_", "-")}"
  alarm_description   = "${each.value.what}: see ${each.value.runbook}"
  namespace           = var.metric_namespace
  metric_name         = each.value.metric
  statistic           = "Maximum"
  period              = 60
  evaluation_periods  = each.value.minutes
  threshold           = each.value.threshold
  comparison_operator = "GreaterThanThreshold"
  treat_missing_data  = "breaching" # no data: no dispatcher is publishing
  alarm_actions       = [aws_sns_topic.alarms.arn]
  ok_actions          = [aws_sns_topic.alarms.arn]
}

resource "aws_cloudwatch_metric_alarm" "api_5xx" {
  alarm_name          = "${var.name}-api-5xx"
  alarm_description   = "The API answers 5xx: read the dispatcher's log and GET /health (runbooks/worker-death-and-stuck-tasks.md)"
  namespace           = "AWS/ApplicationELB"
  metric_name         = "HTTPCode_Target_5XX_Count"
  dimensions          = { LoadBalancer = var.lb_arn_suffix }
  statistic           = "Sum"
  period              = 60
  evaluation_periods  = 5
  threshold           = var.api_5xx_per_minute
  comparison_operator = "GreaterThanThreshold"
  treat_missing_data  = "notBreaching"
  alarm_actions       = [aws_sns_topic.alarms.arn]
  ok_actions          = [aws_sns_topic.alarms.arn]
}

resource "aws_cloudwatch_metric_alarm" "db_storage" {
  for_each            = var.database_ids
  alarm_name          = "${var.name}-${each.key}-db-storage"
  alarm_description   = "The ${each.key} database has less than 10 GiB free: check retention (runbooks/dataset-retention.md)"
  namespace           = "AWS/RDS"
  metric_name         = "FreeStorageSpace"
  dimensions          = { DBInstanceIdentifier = each.value }
  statistic           = "Minimum"
  period              = 300
  evaluation_periods  = 1
  threshold           = 10 * 1024 * 1024 * 1024
  comparison_operator = "LessThanThreshold"
  alarm_actions       = [aws_sns_topic.alarms.arn]
  ok_actions          = [aws_sns_topic.alarms.arn]
}

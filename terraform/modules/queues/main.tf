# The three queues the code names (`dispatcher::queue`): wake-ups, buffer
# pointers and alerts, each with its dead-letter queue `<name>-dlq` and a
# redrive policy after `max_receives` receives. Names are
# `<queue_prefix><name>`, as `DISPATCHER_SQS_QUEUE_PREFIX` expects.

locals {
  queues = toset(["wakeups", "buffers", "alerts"])
}

resource "aws_sqs_queue" "dlq" {
  for_each                  = local.queues
  name                      = "${var.queue_prefix}${each.key}-dlq"
  message_retention_seconds = 1209600 # 14 days: the most SQS keeps; time for a replay
  sqs_managed_sse_enabled   = true
}

resource "aws_sqs_queue" "main" {
  for_each                   = local.queues
  name                       = "${var.queue_prefix}${each.key}"
  visibility_timeout_seconds = 60
  message_retention_seconds  = 345600 # 4 days
  receive_wait_time_seconds  = 20
  sqs_managed_sse_enabled    = true
  redrive_policy = jsonencode({
    deadLetterTargetArn = aws_sqs_queue.dlq[each.key].arn
    maxReceiveCount     = var.max_receives
  })
}

resource "aws_sqs_queue_redrive_allow_policy" "dlq" {
  for_each  = local.queues
  queue_url = aws_sqs_queue.dlq[each.key].id
  redrive_allow_policy = jsonencode({
    redrivePermission = "byQueue"
    sourceQueueArns   = [aws_sqs_queue.main[each.key].arn]
  })
}

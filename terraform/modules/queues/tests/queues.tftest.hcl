mock_provider "aws" {
  source = "../../mocks"
}

variables {
  queue_prefix = "dispatcher-test-"
  max_receives = 5
}

run "every_queue_has_a_dlq_with_redrive_and_encryption" {
  command = apply

  assert {
    condition     = toset(keys(aws_sqs_queue.main)) == toset(["wakeups", "buffers", "alerts"])
    error_message = "the code's three queues"
  }
  assert {
    condition = alltrue([for k, q in aws_sqs_queue.main :
      jsondecode(q.redrive_policy).deadLetterTargetArn == aws_sqs_queue.dlq[k].arn
      && jsondecode(q.redrive_policy).maxReceiveCount == 5
    ])
    error_message = "each main queue redrives to its own DLQ after max_receives"
  }
  assert {
    condition     = alltrue([for k, q in aws_sqs_queue.dlq : q.name == "dispatcher-test-${k}-dlq"])
    error_message = "DLQs are named <prefix><queue>-dlq, as dispatcher::queue::dlq says"
  }
  assert {
    condition     = alltrue([for q in concat(values(aws_sqs_queue.main), values(aws_sqs_queue.dlq)) : q.sqs_managed_sse_enabled])
    error_message = "every queue is encrypted at rest"
  }
}

run "max_receives_is_bounded" {
  command = plan
  variables {
    max_receives = 0
  }
  expect_failures = [var.max_receives]
}

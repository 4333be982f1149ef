variable "queue_prefix" {
  description = "Prepended to each queue's name; the dispatcher and workers get it as DISPATCHER_SQS_QUEUE_PREFIX."
  type        = string
}

variable "max_receives" {
  description = "Receives before a message moves to its DLQ (the dispatcher's --max-receives; operations.md)."
  type        = number
  default     = 5
  validation {
    condition     = var.max_receives >= 1 && var.max_receives <= 1000
    error_message = "SQS allows 1 to 1000 receives."
  }
}

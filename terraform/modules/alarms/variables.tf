variable "name" {
  description = "Name prefix of every resource of the deployment."
  type        = string
}

variable "kms_key_arn" {
  description = "The key that encrypts the alarm topic."
  type        = string
}

variable "dlq_names" {
  description = "Each dead-letter queue's name by its main queue's name."
  type        = map(string)
}

variable "database_ids" {
  description = "RDS instance identifiers by database (control, data)."
  type        = map(string)
}

variable "lb_arn_suffix" {
  description = "The API load balancer's ARN suffix."
  type        = string
}

variable "metric_namespace" {
  description = "CloudWatch namespace the dispatcher publishes its gauges to."
  type        = string
  default     = "Dispatcher"
}

variable "api_5xx_per_minute" {
  description = "5xx answers a minute, five minutes running, that page."
  type        = number
  default     = 10
}

variable "name" {
  description = "Name prefix of every resource of the deployment."
  type        = string
}

variable "account_id" {
  description = "The AWS account id: only its ECS tasks may assume the service roles."
  type        = string
}

variable "queue_arns" {
  description = "ARN of each main queue by name (wakeups, buffers, alerts)."
  type        = map(string)
}

variable "dlq_arns" {
  description = "ARN of each dead-letter queue by its main queue's name."
  type        = map(string)
}

variable "bucket_arn" {
  description = "The objects bucket's ARN."
  type        = string
}

variable "kms_key_arn" {
  description = "The deployment's key (objects are SSE-KMS)."
  type        = string
}

variable "secret_arns" {
  description = "The database secrets the dispatcher's tasks receive at start."
  type        = list(string)
}

variable "region" {
  description = "The AWS region (task ARNs are built from it)."
  type        = string
}

variable "cluster_name" {
  description = "The ECS cluster the workers run in (their scale-in protection is limited to its tasks)."
  type        = string
}

variable "function_prefix" {
  description = "Name prefix of the UDF runner functions (modules/runners): the worker may invoke those alone."
  type        = string
}

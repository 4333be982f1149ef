variable "bucket" {
  description = "The objects bucket's name (globally unique); the dispatcher gets it as DISPATCHER_S3_BUCKET."
  type        = string
}

variable "account_id" {
  description = "The AWS account id: only its own buckets may deliver access logs here."
  type        = string
}

variable "kms_key_arn" {
  description = "The key that encrypts every object (SSE-KMS with a bucket key)."
  type        = string
}

variable "noncurrent_days" {
  description = "Days a replaced or deleted object's old version is kept."
  type        = number
  default     = 30
}

variable "access_log_days" {
  description = "Days server access logs are kept."
  type        = number
  default     = 365
}

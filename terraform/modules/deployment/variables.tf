variable "name" {
  description = "Name of the deployment; every resource is named <name>-<environment>-…"
  type        = string
  default     = "dispatcher"
}

variable "environment" {
  description = "The environment's name (production, staging)."
  type        = string
}

variable "region" {
  description = "The AWS region."
  type        = string
}

variable "account_id" {
  description = "The AWS account id (12 digits); passed in, not looked up, so a plan needs no STS call."
  type        = string
  validation {
    condition     = can(regex("^[0-9]{12}$", var.account_id))
    error_message = "An AWS account id is 12 digits."
  }
}

variable "azs" {
  description = "Availability zones of the private subnets (at least two)."
  type        = list(string)
}

variable "vpc_cidr" {
  description = "The VPC's address range."
  type        = string
  default     = "10.40.0.0/16"
}

variable "nat" {
  description = "A NAT gateway for webhook deliveries (about 33 USD a month plus 0.048 USD per GB)."
  type        = bool
  default     = true
}

variable "bucket" {
  description = "The objects bucket's name (globally unique)."
  type        = string
}

variable "max_receives" {
  description = "Receives before a queue message moves to its DLQ."
  type        = number
  default     = 5
}

variable "database_instance_class" {
  description = "Instance class of the control and data databases (db.m7g.large: about 130 USD a month, twice Multi-AZ)."
  type        = map(string)
  default     = { control = "db.m7g.large", data = "db.t4g.medium" }
}

variable "database_storage_gb" {
  description = "Initial storage of each database in GiB (grows to 4x by itself)."
  type        = map(number)
  default     = { control = 100, data = 100 }
}

variable "multi_az" {
  description = "A standby database in a second AZ (doubles the database cost)."
  type        = bool
  default     = true
}

variable "certificate_arn" {
  description = "ACM certificate for api_url's host, on the internal load balancer."
  type        = string
}

variable "api_url" {
  description = "https:// URL of the API inside the VPC (a private DNS name for the load balancer)."
  type        = string
  validation {
    condition     = startswith(var.api_url, "https://")
    error_message = "The API is served over HTTPS only."
  }
}

variable "signing_key_secret_arn" {
  description = "Secrets Manager secret with the token signing key PEM (created by the operator: terraform/README.md)."
  type        = string
}

variable "worker_credential_secret_arn" {
  description = "Secrets Manager secret with the workers' credential (created by the operator)."
  type        = string
}

variable "dispatcher_image" {
  description = "The dispatcher's image (ECR, pinned by digest)."
  type        = string
}

variable "worker_image" {
  description = "The worker wrapper's image (ECR, pinned by digest)."
  type        = string
}

variable "dispatcher_count" {
  description = "Dispatcher replicas (1 vCPU / 2 GiB each, about 36 USD a month)."
  type        = number
  default     = 2
}

variable "worker_min" {
  description = "Fewest workers (at least 1)."
  type        = number
  default     = 2
}

variable "worker_max" {
  description = "Most workers (2 vCPU / 4 GiB each, about 72 USD a month)."
  type        = number
  default     = 20
}

variable "worker_slots" {
  description = "Tasks one worker runs at once."
  type        = number
  default     = 4
}

variable "backlog_target" {
  description = "Ready tasks per worker slot the autoscaler holds the fleet at."
  type        = number
  default     = 1
}

variable "function_prefix" {
  description = "Name prefix of the UDF runner functions (at most 18 characters; default udf-<first 4 letters of the environment>)."
  type        = string
  default     = null
}

variable "runner_functions" {
  description = "The UDF runner functions, one per org and bundle (modules/runners: its variable `functions`). Each costs nothing idle; invocations are billed per GB-second."
  type = map(object({
    org                  = string
    bundle               = string
    runtime              = string
    handler              = string
    package_key          = string
    memory_mb            = optional(number, 1024)
    timeout_seconds      = optional(number, 900)
    reserved_concurrency = optional(number, 10)
  }))
  default = {}
}

variable "lambda_runtimes" {
  description = "The runtimes the workers run as Lambda functions (python, node, rust); empty: every task runs on the workers."
  type        = list(string)
  default     = []
}

variable "function_prefix" {
  description = "Name prefix of the runner functions; the worker invokes `<prefix>-<org>-<bundle>` and may invoke nothing else. At most 18 characters: a name holds 32 hex digits of the org and 12 of the bundle, and Lambda allows 64."
  type        = string
  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{0,17}$", var.function_prefix))
    error_message = "Lower-case letters, digits and dashes, at most 18 characters."
  }
}

variable "account_id" {
  description = "The AWS account id (only Lambda in it may assume the runner role)."
  type        = string
}

variable "region" {
  description = "The AWS region."
  type        = string
}

variable "vpc_id" {
  description = "The VPC the functions run in."
  type        = string
}

variable "vpc_cidr" {
  description = "The VPC's address range: the functions' only egress (HTTPS)."
  type        = string
}

variable "subnet_ids" {
  description = "Private subnets of the functions' ENIs."
  type        = list(string)
}

variable "kms_key_arn" {
  description = "The key that encrypts the functions' environment and log groups."
  type        = string
}

variable "package_bucket" {
  description = "The bucket holding the functions' packages (scripts/package-lambda output, uploaded under package_key)."
  type        = string
}

variable "log_retention_days" {
  description = "How long the functions' logs are kept."
  type        = number
  default     = 365
}

variable "functions" {
  description = <<-EOT
    The runner functions, by any key: the org id (32 hex digits, no dashes),
    12 hex digits of the bundle's digest, its runtime (python, node, rust),
    the bundle's handler, the package's key in package_bucket, memory (MB,
    about 0.0000167 USD per GB-second), timeout (at most 900 s; a task's
    timeout_seconds cannot exceed it) and reserved concurrency (the org's
    cap for this bundle: a 429 beyond it hands the task back).
  EOT
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
  validation {
    condition = alltrue([for f in values(var.functions) :
      can(regex("^[0-9a-f]{32}$", f.org)) && can(regex("^[0-9a-f]{12}$", f.bundle))
      && contains(["python", "node", "rust"], f.runtime)
      && f.timeout_seconds >= 1 && f.timeout_seconds <= 900
      && f.reserved_concurrency >= 1
    ])
    error_message = "Each function needs org (32 hex), bundle (12 hex), a runtime of python, node or rust, a timeout of 1 to 900 s and a reserved concurrency of at least 1."
  }
}

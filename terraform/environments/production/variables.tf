# What only the operator knows: the account, names, the certificate, the
# images and the secrets made outside Terraform (terraform/README.md).
# Sizing is in main.tf, per environment.

variable "account_id" {
  description = "The AWS account id (12 digits)."
  type        = string
}

variable "region" {
  description = "The AWS region."
  type        = string
  default     = "eu-west-1"
}

variable "azs" {
  description = "Availability zones of the private subnets (at least two)."
  type        = list(string)
  default     = ["eu-west-1a", "eu-west-1b"]
}

variable "bucket" {
  description = "The objects bucket's name (globally unique)."
  type        = string
}

variable "certificate_arn" {
  description = "ACM certificate for api_url's host."
  type        = string
}

variable "api_url" {
  description = "https:// URL of the API inside the VPC."
  type        = string
}

variable "signing_key_secret_arn" {
  description = "Secrets Manager secret with the token signing key PEM."
  type        = string
}

variable "worker_credential_secret_arn" {
  description = "Secrets Manager secret with the workers' credential."
  type        = string
}

variable "dispatcher_image" {
  description = "The dispatcher's image, pinned by digest."
  type        = string
}

variable "worker_image" {
  description = "The worker wrapper's image, pinned by digest."
  type        = string
}

variable "runner_functions" {
  description = "The UDF runner functions, one per org and bundle (terraform/README.md, \"Lambda runners\")."
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
  description = "The runtimes the workers run as Lambda functions; empty: all on the workers."
  type        = list(string)
  default     = []
}

variable "name" {
  description = "Name prefix of every resource of the deployment."
  type        = string
}

variable "region" {
  description = "The AWS region (endpoint service names are built from it)."
  type        = string
}

variable "cidr" {
  description = "The VPC's address range; each private subnet is a /20 of a /16."
  type        = string
  default     = "10.40.0.0/16"
}

variable "azs" {
  description = "Availability zones for the private subnets (at least two: RDS Multi-AZ and the load balancer need them)."
  type        = list(string)
  validation {
    condition     = length(var.azs) >= 2
    error_message = "Give at least two availability zones."
  }
}

variable "nat" {
  description = "Whether a NAT gateway gives the private subnets egress to the internet (webhook deliveries need it; about 33 USD a month plus data)."
  type        = bool
  default     = true
}

variable "interface_endpoints" {
  description = "AWS services reached through interface endpoints (each about 7.50 USD a month per AZ)."
  type        = list(string)
  default     = ["sqs", "sts", "logs", "kms", "ecr.api", "ecr.dkr", "lambda", "secretsmanager"]
}

variable "kms_key_arn" {
  description = "The key that encrypts the flow log group."
  type        = string
}

variable "log_retention_days" {
  description = "How long flow logs are kept."
  type        = number
  default     = 365
}

variable "name" {
  description = "Name prefix of every resource of the deployment."
  type        = string
}

variable "account_id" {
  description = "The AWS account id (12 digits) the deployment lives in."
  type        = string
}

variable "region" {
  description = "The AWS region the deployment lives in."
  type        = string
}

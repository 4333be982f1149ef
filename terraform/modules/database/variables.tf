variable "name" {
  description = "Name prefix of every resource of the deployment."
  type        = string
}

variable "vpc_id" {
  description = "The VPC the databases live in."
  type        = string
}

variable "subnet_ids" {
  description = "Private subnets (two AZs at least) of the databases."
  type        = list(string)
}

variable "client_security_groups" {
  description = "Security groups allowed to connect on 5432, by a name of their own (the dispatcher's tasks; workers never connect)."
  type        = map(string)
}

variable "kms_key_arn" {
  description = "The key that encrypts storage, Performance Insights and the master password's secret."
  type        = string
}

variable "engine_version" {
  description = "Postgres major version (the parameter group's family follows it: postgres16)."
  type        = string
  default     = "16"
}

variable "instance_class" {
  description = "Instance class of each database. db.t4g.medium costs about 50 USD a month per instance (twice that Multi-AZ)."
  type        = map(string)
  default     = { control = "db.m7g.large", data = "db.t4g.medium" }
}

variable "storage_gb" {
  description = "Initial gp3 storage of each database in GiB (autoscaled to 4x; about 0.115 USD per GiB-month)."
  type        = map(number)
  default     = { control = 100, data = 100 }
}

variable "multi_az" {
  description = "A standby in a second AZ (doubles the instance cost; the control database is the single point of truth)."
  type        = bool
  default     = true
}

variable "backup_days" {
  description = "Days of automated backups (point-in-time recovery window)."
  type        = number
  default     = 14
}

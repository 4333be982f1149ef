variable "name" {
  description = "Name prefix of every resource of the deployment."
  type        = string
}

variable "region" {
  description = "The AWS region."
  type        = string
}

variable "vpc_id" {
  description = "The VPC the services run in."
  type        = string
}

variable "subnet_ids" {
  description = "Private subnets of the tasks and the internal load balancer."
  type        = list(string)
}

variable "vpc_cidr" {
  description = "The VPC's address range (the load balancer and metrics ports admit it)."
  type        = string
}

variable "role_arns" {
  description = "Roles from the iam module: dispatcher, worker, task_objects, execution."
  type        = object({ dispatcher = string, worker = string, task_objects = string, execution = string })
}

variable "kms_key_arn" {
  description = "The key that encrypts the services' log groups and the objects bucket (named in task session policies)."
  type        = string
}

variable "log_retention_days" {
  description = "How long the services' logs are kept."
  type        = number
  default     = 365
}

variable "lb_log_bucket" {
  description = "Bucket receiving the load balancer's access logs (the storage module's access-log bucket)."
  type        = string
}

variable "certificate_arn" {
  description = "ACM certificate of the API's internal name (api_url's host), for the HTTPS listener."
  type        = string
}

variable "api_url" {
  description = "The URL workers and runners reach the dispatcher at (https://<internal name>), served by the load balancer."
  type        = string
}

variable "issuer" {
  description = "The tokens' issuer (DISPATCHER_ISSUER); every replica shares it."
  type        = string
  default     = "dispatcher"
}

variable "queue_prefix" {
  description = "DISPATCHER_SQS_QUEUE_PREFIX of the queues module."
  type        = string
}

variable "bucket" {
  description = "The objects bucket's name."
  type        = string
}

variable "database_endpoints" {
  description = "host:port of the control and data databases."
  type        = object({ control = string, data = string })
}

variable "database_secret_arns" {
  description = "The RDS-managed secret of each database (its JSON key password is injected as DATABASE_PASSWORD / DATA_DATABASE_PASSWORD)."
  type        = object({ control = string, data = string })
}

variable "database_sslmode" {
  description = "sslmode of the database URLs; RDS forces TLS (rds.force_ssl)."
  type        = string
  default     = "verify-full"
  validation {
    condition     = contains(["require", "verify-ca", "verify-full"], var.database_sslmode)
    error_message = "RDS refuses plaintext: require, verify-ca or verify-full."
  }
}

variable "database_ca_file" {
  description = "Path inside the dispatcher image of the RDS CA bundle (global-bundle.pem) that verify-full checks the server against."
  type        = string
  default     = "/etc/ssl/certs/rds-global-bundle.pem"
}

variable "signing_key_secret_arn" {
  description = "Secrets Manager secret holding the Ed25519 signing key PEM (`dispatcher token keygen`); created by the operator, never by Terraform (it would land in the state)."
  type        = string
}

variable "worker_credential_secret_arn" {
  description = "Secrets Manager secret holding the workers' credential (`dispatcher token worker`); created and rotated by the operator."
  type        = string
}

variable "dispatcher_image" {
  description = "The dispatcher's container image (ECR URI with a digest or an immutable tag)."
  type        = string
}

variable "worker_image" {
  description = "The worker wrapper's container image, with the Node, Python and Rust runners."
  type        = string
}

variable "dispatcher_count" {
  description = "Dispatcher replicas (each runs every role; two for availability)."
  type        = number
  default     = 2
}

variable "dispatcher_cpu" {
  description = "Fargate CPU units of a dispatcher task (1024 = 1 vCPU, about 30 USD a month)."
  type        = number
  default     = 1024
}

variable "dispatcher_memory" {
  description = "Fargate memory (MiB) of a dispatcher task."
  type        = number
  default     = 2048
}

variable "worker_cpu" {
  description = "Fargate CPU units of a worker task."
  type        = number
  default     = 2048
}

variable "worker_memory" {
  description = "Fargate memory (MiB) of a worker task."
  type        = number
  default     = 4096
}

variable "worker_slots" {
  description = "Tasks one worker runs at once (WORKER_CONCURRENCY)."
  type        = number
  default     = 4
}

variable "worker_min" {
  description = "Fewest workers. At least 1: target tracking cannot scale a service up from zero tasks."
  type        = number
  default     = 1
  validation {
    condition     = var.worker_min >= 1
    error_message = "Target tracking cannot scale up from zero: keep at least one worker."
  }
}

variable "worker_max" {
  description = "Most workers (bounds the fleet's cost: 2 vCPU / 4 GiB Fargate is about 72 USD a month each)."
  type        = number
  default     = 20
}

variable "backlog_target" {
  description = "Target of ready tasks per worker slot (operations.md, Autoscaling): above it the fleet grows."
  type        = number
  default     = 1
}

variable "runtimes" {
  description = "Runtimes whose backlog the worker fleet scales on (the fleet runs them all)."
  type        = list(string)
  default     = ["python", "node", "rust"]
}

variable "metric_namespace" {
  description = "CloudWatch namespace of the dispatcher's published backlog (DISPATCHER_BACKLOG_EMF_NAMESPACE)."
  type        = string
  default     = "Dispatcher"
}

variable "lambda_function" {
  description = "The worker's WORKER_LAMBDA_FUNCTION template (modules/runners output), used when lambda_runtimes is not empty."
  type        = string
  default     = ""
}

variable "lambda_runtimes" {
  description = "The runtimes the workers run as Lambda functions (ADR 0026); empty: none."
  type        = list(string)
  default     = []
  validation {
    condition     = alltrue([for r in var.lambda_runtimes : contains(["python", "node", "rust"], r)])
    error_message = "Runtimes are python, node or rust."
  }
}

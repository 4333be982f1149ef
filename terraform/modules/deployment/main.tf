# One deployment of the dispatcher on AWS: network, key, queues, bucket,
# the two databases, roles, the ECS services and the alarms. Each
# environment (terraform/environments/*) is a root over this module.

locals {
  name         = "${var.name}-${var.environment}"
  queue_prefix = "${local.name}-"
  udf_prefix   = coalesce(var.function_prefix, "udf-${substr(var.environment, 0, 4)}")
}

module "kms" {
  source     = "../kms"
  name       = local.name
  account_id = var.account_id
  region     = var.region
}

module "network" {
  source      = "../network"
  name        = local.name
  region      = var.region
  cidr        = var.vpc_cidr
  azs         = var.azs
  nat         = var.nat
  kms_key_arn = module.kms.key_arn
}

module "queues" {
  source       = "../queues"
  queue_prefix = local.queue_prefix
  max_receives = var.max_receives
}

module "storage" {
  source      = "../storage"
  bucket      = var.bucket
  account_id  = var.account_id
  kms_key_arn = module.kms.key_arn
}

module "database" {
  source                 = "../database"
  name                   = local.name
  vpc_id                 = module.network.vpc_id
  subnet_ids             = module.network.private_subnet_ids
  client_security_groups = { dispatcher = module.service.security_group_ids.dispatcher }
  kms_key_arn            = module.kms.key_arn
  instance_class         = var.database_instance_class
  storage_gb             = var.database_storage_gb
  multi_az               = var.multi_az
}

module "iam" {
  source       = "../iam"
  name         = local.name
  account_id   = var.account_id
  region       = var.region
  cluster_name = local.name
  queue_arns   = module.queues.queue_arns
  dlq_arns     = module.queues.dlq_arns
  bucket_arn   = module.storage.bucket_arn
  kms_key_arn  = module.kms.key_arn
  # The worker may invoke the runner functions alone.
  function_prefix = local.udf_prefix
  secret_arns     = concat(values(module.database.secret_arns), [var.signing_key_secret_arn, var.worker_credential_secret_arn])
}

module "service" {
  source                       = "../service"
  name                         = local.name
  region                       = var.region
  vpc_id                       = module.network.vpc_id
  subnet_ids                   = module.network.private_subnet_ids
  vpc_cidr                     = module.network.cidr
  role_arns                    = module.iam.role_arns
  kms_key_arn                  = module.kms.key_arn
  lb_log_bucket                = module.storage.access_log_bucket
  certificate_arn              = var.certificate_arn
  api_url                      = var.api_url
  queue_prefix                 = local.queue_prefix
  bucket                       = module.storage.bucket
  database_endpoints           = module.database.endpoints
  database_secret_arns         = module.database.secret_arns
  signing_key_secret_arn       = var.signing_key_secret_arn
  worker_credential_secret_arn = var.worker_credential_secret_arn
  dispatcher_image             = var.dispatcher_image
  worker_image                 = var.worker_image
  dispatcher_count             = var.dispatcher_count
  worker_min                   = var.worker_min
  worker_max                   = var.worker_max
  worker_slots                 = var.worker_slots
  backlog_target               = var.backlog_target
  lambda_function              = module.runners.function_template
  lambda_runtimes              = var.lambda_runtimes
}

module "runners" {
  source          = "../runners"
  function_prefix = local.udf_prefix
  account_id      = var.account_id
  region          = var.region
  vpc_id          = module.network.vpc_id
  vpc_cidr        = module.network.cidr
  subnet_ids      = module.network.private_subnet_ids
  kms_key_arn     = module.kms.key_arn
  package_bucket  = module.storage.bucket
  functions       = var.runner_functions
}

module "alarms" {
  source        = "../alarms"
  name          = local.name
  kms_key_arn   = module.kms.key_arn
  dlq_names     = module.queues.dlq_names
  database_ids  = module.database.identifiers
  lb_arn_suffix = module.service.lb_arn_suffix
}

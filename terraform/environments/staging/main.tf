# Staging: the same deployment, smaller: small (still Multi-AZ) databases, one
# dispatcher, 1 to 4 workers.

module "deployment" {
  source                       = "../../modules/deployment"
  environment                  = "staging"
  account_id                   = var.account_id
  region                       = var.region
  azs                          = var.azs
  bucket                       = var.bucket
  certificate_arn              = var.certificate_arn
  api_url                      = var.api_url
  signing_key_secret_arn       = var.signing_key_secret_arn
  worker_credential_secret_arn = var.worker_credential_secret_arn
  dispatcher_image             = var.dispatcher_image
  worker_image                 = var.worker_image
  vpc_cidr                     = "10.41.0.0/16"
  multi_az                     = true # failover is rehearsed here before production
  database_instance_class      = { control = "db.t4g.medium", data = "db.t4g.small" }
  database_storage_gb          = { control = 20, data = 20 }
  dispatcher_count             = 1
  worker_min                   = 1
  worker_max                   = 4
  runner_functions             = var.runner_functions
  lambda_runtimes              = var.lambda_runtimes
}

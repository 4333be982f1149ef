# Production: Multi-AZ databases, two dispatcher replicas, 2 to 20 workers.

module "deployment" {
  source                       = "../../modules/deployment"
  environment                  = "production"
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
  multi_az                     = true
  dispatcher_count             = 2
  worker_min                   = 2
  worker_max                   = 20
  runner_functions             = var.runner_functions
  lambda_runtimes              = var.lambda_runtimes
}

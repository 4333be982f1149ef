# Placeholder inputs for the offline plan of scripts/check-terraform; no
# real account, certificate, image or secret.
account_id                   = "123456789012"
bucket                       = "dispatcher-ci-objects-123456789012"
certificate_arn              = "arn:aws:acm:eu-west-1:123456789012:certificate/00000000-0000-0000-0000-000000000000"
api_url                      = "https://dispatcher.internal.example"
signing_key_secret_arn       = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:dispatcher/signing-key-AbCdEf"
worker_credential_secret_arn = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:dispatcher/worker-credential-AbCdEf"
dispatcher_image             = "123456789012.dkr.ecr.eu-west-1.amazonaws.com/dispatcher@sha256:0000000000000000000000000000000000000000000000000000000000000000"
worker_image                 = "123456789012.dkr.ecr.eu-west-1.amazonaws.com/worker@sha256:0000000000000000000000000000000000000000000000000000000000000000"
# One runner function, so that the plan scan judges one.
lambda_runtimes = ["python"]
runner_functions = {
  probe = {
    org     = "0123456789abcdef0123456789abcdef", bundle = "a1b2c3d4e5f6", runtime = "python",
    handler = "probe.handler", package_key = "lambda/udf-0123456789abcdef0123456789abcdef-a1b2c3d4e5f6.zip"
  }
}

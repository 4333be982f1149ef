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

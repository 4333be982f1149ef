mock_provider "aws" {
  source = "../../mocks"
}

variables {
  name                   = "dispatcher-test"
  vpc_id                 = "vpc-0123456789abcdef0"
  subnet_ids             = ["subnet-0123456789abcdef0", "subnet-0123456789abcdef1"]
  client_security_groups = { dispatcher = "sg-0123456789abcdef0" }
  kms_key_arn            = "arn:aws:kms:eu-west-1:123456789012:key/00000000-0000-0000-0000-000000000000"
}

run "both_databases_are_encrypted_private_backed_up_and_protected" {
  command = plan

  assert {
    condition     = toset(keys(aws_db_instance.this)) == toset(["control", "data"])
    error_message = "a control and a data database (ADR 0006)"
  }
  assert {
    condition = alltrue([for db in aws_db_instance.this :
      db.storage_encrypted && !db.publicly_accessible && db.deletion_protection
      && db.manage_master_user_password && db.backup_retention_period >= 7 && db.multi_az
    ])
    error_message = "encrypted, not public, deletion-protected, managed password, backups, Multi-AZ"
  }
  assert {
    condition = alltrue([for p in ["rds.force_ssl", "synchronous_commit"] :
    contains([for x in aws_db_parameter_group.this.parameter : x.name], p)])
    error_message = "TLS forced and synchronous_commit on, as operations.md asks"
  }
  assert {
    condition     = one([for x in aws_db_parameter_group.this.parameter : x.value if x.name == "synchronous_commit"]) == "on"
    error_message = "synchronous_commit stays on server-wide (ADR 0018)"
  }
  assert {
    condition     = alltrue([for r in aws_vpc_security_group_ingress_rule.db : r.from_port == 5432 && r.referenced_security_group_id == "sg-0123456789abcdef0"])
    error_message = "only the dispatcher's tasks reach Postgres"
  }
}

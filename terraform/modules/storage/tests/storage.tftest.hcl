mock_provider "aws" {
  source = "../../mocks"
}

variables {
  bucket      = "dispatcher-test-objects"
  account_id  = "123456789012"
  kms_key_arn = "arn:aws:kms:eu-west-1:123456789012:key/00000000-0000-0000-0000-000000000000"
}

run "the_objects_bucket_is_private_encrypted_versioned_and_logged" {
  command = plan

  assert {
    condition = alltrue([for b in values(aws_s3_bucket_public_access_block.this) :
    b.block_public_acls && b.block_public_policy && b.ignore_public_acls && b.restrict_public_buckets])
    error_message = "nothing public: every public access block is on"
  }
  assert {
    condition     = aws_s3_bucket_ownership_controls.this["objects"].rule[0].object_ownership == "BucketOwnerEnforced"
    error_message = "ACLs are off: the bucket owner owns every object"
  }
  assert {
    condition     = one(aws_s3_bucket_server_side_encryption_configuration.objects.rule[*].apply_server_side_encryption_by_default[0].sse_algorithm) == "aws:kms"
    error_message = "objects are SSE-KMS"
  }
  assert {
    condition     = one(aws_s3_bucket_server_side_encryption_configuration.objects.rule[*].apply_server_side_encryption_by_default[0].kms_master_key_id) == var.kms_key_arn
    error_message = "with the deployment's key"
  }
  assert {
    condition     = aws_s3_bucket_versioning.objects.versioning_configuration[0].status == "Enabled"
    error_message = "versioning keeps a committed part's bytes if it is overwritten"
  }
  assert {
    condition     = aws_s3_bucket_logging.objects.target_prefix == "objects/"
    error_message = "access logging is on"
  }
  assert {
    condition     = alltrue([for r in aws_s3_bucket_lifecycle_configuration.objects.rule : length(r.expiration) == 0])
    error_message = "no lifecycle rule expires current objects: retention is the dispatcher's"
  }
}

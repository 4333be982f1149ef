mock_provider "aws" {
  source = "../../mocks"
}

variables {
  name        = "dispatcher-test"
  region      = "eu-west-1"
  azs         = ["eu-west-1a", "eu-west-1b"]
  kms_key_arn = "arn:aws:kms:eu-west-1:123456789012:key/00000000-0000-0000-0000-000000000000"
}

run "nothing_is_public_and_aws_apis_need_no_nat" {
  command = plan

  assert {
    condition     = alltrue([for s in concat(aws_subnet.private, aws_subnet.public) : !s.map_public_ip_on_launch])
    error_message = "no subnet hands out public addresses"
  }
  assert {
    condition     = aws_vpc_endpoint.s3.vpc_endpoint_type == "Gateway" && contains(keys(aws_vpc_endpoint.interface), "sqs")
    error_message = "S3 and SQS are reached through endpoints"
  }
  assert {
    condition     = !contains(coalesce(one(aws_security_group.endpoints.ingress).cidr_blocks, []), "0.0.0.0/0")
    error_message = "the endpoints take traffic from the VPC only"
  }
  assert {
    condition     = aws_flow_log.this.traffic_type == "ALL"
    error_message = "flow logs record everything"
  }
}

run "at_least_two_azs" {
  command = plan
  variables {
    azs = ["eu-west-1a"]
  }
  expect_failures = [var.azs]
}

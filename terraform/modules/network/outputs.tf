output "vpc_id" {
  description = "The VPC's id."
  value       = aws_vpc.this.id
}

output "cidr" {
  description = "The VPC's address range."
  value       = aws_vpc.this.cidr_block
}

output "private_subnet_ids" {
  description = "The private subnets every task, database and runner lives in."
  value       = aws_subnet.private[*].id
}

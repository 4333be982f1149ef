output "bucket" {
  description = "The objects bucket's name."
  value       = aws_s3_bucket.objects.bucket
}

output "bucket_arn" {
  description = "The objects bucket's ARN."
  value       = aws_s3_bucket.objects.arn
}

output "access_log_bucket" {
  description = "The access-log bucket (the load balancer logs here too)."
  value       = aws_s3_bucket.access_logs.bucket
}

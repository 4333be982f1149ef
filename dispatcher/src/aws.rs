//! What the AWS adapters (SQS, S3, STS) share: the SDK configuration and
//! how static credentials may be shown.

use aws_sdk_sqs::config::{Credentials, Region};

/// Static AWS credentials as `Debug` may show them: the key id, never the
/// secret.
pub fn redacted_credentials(c: &Option<(String, String)>) -> Option<(String, &'static str)> {
    c.as_ref().map(|(id, _)| (id.clone(), "[redacted]"))
}

/// The AWS SDK configuration shared by the SQS and S3 adapters: a region,
/// an optional endpoint override (an SQS/S3-compatible server), and static
/// credentials or, without them, the SDK's default chain.
pub async fn sdk_config(
    region: &str,
    endpoint_url: Option<&str>,
    static_credentials: Option<&(String, String)>,
) -> aws_config::SdkConfig {
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(Region::new(region.to_owned()));
    if let Some(url) = endpoint_url {
        loader = loader.endpoint_url(url);
    }
    if let Some((id, secret)) = static_credentials {
        loader = loader.credentials_provider(Credentials::new(id, secret, None, None, "static"));
    }
    loader.load().await
}

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

/// An SDK error as one short line for logs and operators: the service's
/// code and message when it answered, otherwise what failed and its root
/// cause (for example `Connection refused`). `DisplayErrorContext` would
/// print the whole chain with its `Debug` dumps: kilobytes per line.
pub fn sdk_error_line<E, R>(service: &str, e: &aws_sdk_sqs::error::SdkError<E, R>) -> String
where
    E: aws_sdk_sqs::error::ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    use aws_sdk_sqs::error::SdkError;
    if let SdkError::ServiceError(se) = e {
        let err = se.err();
        return match (err.code(), err.message()) {
            (Some(code), Some(message)) => format!("{service} answered {code}: {message}"),
            (Some(code), None) => format!("{service} answered {code}"),
            _ => format!("{service} answered an error: {err}"),
        };
    }
    let what = match e {
        SdkError::DispatchFailure(_) => format!("cannot reach {service}"),
        SdkError::TimeoutError(_) => format!("{service} did not answer in time"),
        SdkError::ResponseError(_) => format!("{service}'s answer could not be read"),
        SdkError::ConstructionFailure(_) => format!("the {service} request could not be made"),
        _ => format!("{service} call failed"),
    };
    let mut root: &dyn std::error::Error = e;
    while let Some(next) = root.source() {
        root = next;
    }
    let cause = root.to_string();
    if cause.is_empty() || cause == e.to_string() {
        what
    } else {
        format!("{what}: {cause}")
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn an_unreachable_endpoint_is_one_short_line_naming_the_cause() {
        let cfg = super::sdk_config(
            "us-east-1",
            Some("http://127.0.0.1:1"),
            Some(&("AKIDEXAMPLE".into(), "secret".into())),
        )
        .await;
        let client = aws_sdk_sqs::Client::new(&cfg);
        let e = client
            .get_queue_url()
            .queue_name("q")
            .send()
            .await
            .expect_err("nothing listens on port 1");
        let line = super::sdk_error_line("SQS", &e);
        assert!(line.starts_with("cannot reach SQS: "), "{line}");
        assert!(line.contains("refused"), "{line}");
        assert!(!line.contains('\n') && line.len() < 200, "{line}");
    }
}

//! The aws profile's queue: Amazon SQS through `aws-sdk-sqs`, or any server
//! speaking the SQS protocol (an endpoint override).
//!
//! Where SQS differs from [`super::PgQueue`] (ADR 0009):
//! * `delete` with a receipt of an earlier delivery deletes nothing, but SQS
//!   does not say so: it answers `true`;
//! * the DLQ move is SQS's redrive policy (`maxReceiveCount`), configured on
//!   the queue, not by this code;
//! * a delayed send is capped at 15 minutes, a long poll at 20 s, a
//!   visibility timeout at 12 hours (SQS's limits; larger values are
//!   clamped).

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_sqs::types::{MessageSystemAttributeName, QueueAttributeName};
use aws_sdk_sqs::Client;
use serde_json::Value;

use super::{all_queues, Delivery, Queue, QueueError};

/// Where the queues are and what they are called.
#[derive(Clone)]
pub struct SqsConfig {
    pub region: String,
    /// An SQS-compatible endpoint (e.g. a local test server); `None` for AWS.
    pub endpoint_url: Option<String>,
    /// Prepended to every queue name (`{prefix}wakeups`, `{prefix}wakeups-dlq`, …).
    pub queue_prefix: String,
    /// Static credentials; `None` uses the SDK's default chain
    /// (environment, profile, instance or task role).
    pub static_credentials: Option<(String, String)>,
}

/// Never prints the secret key.
impl std::fmt::Debug for SqsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqsConfig")
            .field("region", &self.region)
            .field("endpoint_url", &self.endpoint_url)
            .field("queue_prefix", &self.queue_prefix)
            .field(
                "static_credentials",
                &crate::aws::redacted_credentials(&self.static_credentials),
            )
            .finish()
    }
}

pub struct SqsQueue {
    client: Client,
    /// Our queue name (`wakeups`) → the queue's URL.
    urls: HashMap<String, String>,
}

fn secs_i32(d: Duration, max: u64) -> i32 {
    i32::try_from(d.as_secs().min(max)).unwrap_or(i32::MAX)
}

fn unavailable(e: impl std::fmt::Display) -> QueueError {
    QueueError::Unavailable(e.to_string())
}

/// An SQS call's failure, in one line (`crate::aws::sdk_error_line`).
fn sdk_error<E, R>(e: &aws_sdk_sqs::error::SdkError<E, R>) -> QueueError
where
    E: aws_sdk_sqs::error::ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    QueueError::Unavailable(crate::aws::sdk_error_line("SQS", e))
}

/// The service error's code, when SQS answered (not a transport error).
fn service_code<E: aws_sdk_sqs::error::ProvideErrorMetadata, R>(
    e: &aws_sdk_sqs::error::SdkError<E, R>,
) -> Option<&str> {
    e.as_service_error().and_then(|se| se.code())
}

/// Whether SQS said the receipt handle is stale or unknown: the typed
/// errors, or the `InvalidParameterValue` code SQS (and its compatible
/// servers) answer for a handle that was never valid.
fn stale_receipt_code(code: Option<&str>) -> bool {
    matches!(
        code,
        Some("ReceiptHandleIsInvalid" | "MessageNotInflight" | "InvalidParameterValue")
            | Some("AWS.SimpleQueueService.MessageNotInflight")
    )
}

impl SqsQueue {
    pub async fn client(cfg: &SqsConfig) -> Client {
        let shared = crate::aws::sdk_config(
            &cfg.region,
            cfg.endpoint_url.as_deref(),
            cfg.static_credentials.as_ref(),
        )
        .await;
        Client::new(&shared)
    }

    /// Connects and resolves every queue's URL; fails naming each queue
    /// that does not exist.
    pub async fn connect(cfg: &SqsConfig) -> Result<Self, QueueError> {
        Self::connect_to(cfg, &all_queues()).await
    }

    /// Connects to the named queues only (a worker needs just `wakeups`,
    /// and its IAM role may allow nothing else); fails naming each missing one.
    pub async fn connect_to(cfg: &SqsConfig, names: &[String]) -> Result<Self, QueueError> {
        let client = Self::client(cfg).await;
        let mut urls = HashMap::new();
        let mut missing = Vec::new();
        for name in names.iter().cloned() {
            let full = format!("{}{name}", cfg.queue_prefix);
            match client.get_queue_url().queue_name(&full).send().await {
                Ok(out) => {
                    let url = out.queue_url().unwrap_or_default().to_owned();
                    urls.insert(name, url);
                }
                Err(e)
                    if e.as_service_error()
                        .is_some_and(|se| se.is_queue_does_not_exist())
                        || matches!(
                            service_code(&e),
                            Some("AWS.SimpleQueueService.NonExistentQueue")
                        ) =>
                {
                    missing.push(full)
                }
                Err(e) => return Err(sdk_error(&e)),
            }
        }
        if !missing.is_empty() {
            return Err(QueueError::Unavailable(format!(
                "SQS queues missing: {} (create them, each with a redrive policy to its -dlq: `dispatcher admin sqs create-queues`)",
                missing.join(", ")
            )));
        }
        Ok(SqsQueue { client, urls })
    }

    /// Creates every queue (DLQs first), each main queue with a redrive
    /// policy to its DLQ after `max_receives` receives. Idempotent.
    pub async fn create_queues(cfg: &SqsConfig, max_receives: u32) -> Result<(), QueueError> {
        let client = Self::client(cfg).await;
        for base in [super::WAKEUPS, super::BUFFERS, super::ALERTS] {
            let dlq_name = format!("{}{}", cfg.queue_prefix, super::dlq(base));
            let dlq_url = client
                .create_queue()
                .queue_name(&dlq_name)
                .send()
                .await
                .map_err(|e| sdk_error(&e))?
                .queue_url()
                .unwrap_or_default()
                .to_owned();
            let arn = client
                .get_queue_attributes()
                .queue_url(&dlq_url)
                .attribute_names(QueueAttributeName::QueueArn)
                .send()
                .await
                .map_err(|e| sdk_error(&e))?
                .attributes()
                .and_then(|a| a.get(&QueueAttributeName::QueueArn).cloned())
                .ok_or_else(|| QueueError::Unavailable(format!("no ARN for {dlq_name}")))?;
            let redrive =
                serde_json::json!({"deadLetterTargetArn": arn, "maxReceiveCount": max_receives})
                    .to_string();
            client
                .create_queue()
                .queue_name(format!("{}{base}", cfg.queue_prefix))
                .attributes(QueueAttributeName::RedrivePolicy, redrive)
                .send()
                .await
                .map_err(|e| sdk_error(&e))?;
        }
        Ok(())
    }

    fn url(&self, queue: &str) -> Result<&str, QueueError> {
        self.urls
            .get(queue)
            .map(String::as_str)
            .ok_or_else(|| QueueError::UnknownQueue(queue.to_owned()))
    }
}

#[async_trait]
impl Queue for SqsQueue {
    async fn send(&self, queue: &str, body: &Value, delay: Duration) -> Result<String, QueueError> {
        let out = self
            .client
            .send_message()
            .queue_url(self.url(queue)?)
            .message_body(body.to_string())
            .delay_seconds(secs_i32(delay, 900))
            .send()
            .await
            .map_err(|e| sdk_error(&e))?;
        Ok(out.message_id().unwrap_or_default().to_owned())
    }

    async fn send_batch(
        &self,
        queue: &str,
        bodies: &[Value],
    ) -> Result<Vec<Result<String, String>>, QueueError> {
        use aws_sdk_sqs::types::SendMessageBatchRequestEntry;
        let url = self.url(queue)?;
        let bodies: Vec<String> = bodies.iter().map(Value::to_string).collect();
        let mut out = Vec::with_capacity(bodies.len());
        for chunk in send_batches(&bodies) {
            let entries = chunk
                .iter()
                .enumerate()
                .map(|(i, body)| {
                    SendMessageBatchRequestEntry::builder()
                        .id(i.to_string())
                        .message_body(body.as_str())
                        .build()
                        .map_err(unavailable)
                })
                .collect::<Result<Vec<_>, _>>()?;
            let result = self
                .client
                .send_message_batch()
                .queue_url(url)
                .set_entries(Some(entries))
                .send()
                .await
                .map_err(|e| sdk_error(&e))?;
            // Entries answer by the id given above: their index in `chunk`.
            let mut answers: Vec<Result<String, String>> =
                vec![Err("SQS did not answer for this entry".to_owned()); chunk.len()];
            let sent = result
                .successful()
                .iter()
                .map(|ok| (ok.id(), Ok(ok.message_id().to_owned())));
            let refused = result.failed().iter().map(|f| {
                let why = f.message().unwrap_or("send failed");
                (f.id(), Err(format!("{}: {why}", f.code())))
            });
            for (id, answer) in sent.chain(refused) {
                if let Some(slot) = id.parse::<usize>().ok().and_then(|i| answers.get_mut(i)) {
                    *slot = answer;
                }
            }
            out.extend(answers);
        }
        Ok(out)
    }

    async fn receive(
        &self,
        queue: &str,
        max: u32,
        wait: Duration,
        visibility: Duration,
    ) -> Result<Vec<Delivery>, QueueError> {
        let out = self
            .client
            .receive_message()
            .queue_url(self.url(queue)?)
            .max_number_of_messages(i32::try_from(max.clamp(1, 10)).unwrap_or(1))
            .wait_time_seconds(secs_i32(wait, 20))
            .visibility_timeout(secs_i32(visibility, 43_200))
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            .send()
            .await
            .map_err(|e| sdk_error(&e))?;
        Ok(out
            .messages()
            .iter()
            .map(|m| {
                let raw = m.body().unwrap_or_default();
                Delivery {
                    message_id: m.message_id().unwrap_or_default().to_owned(),
                    receipt_handle: m.receipt_handle().unwrap_or_default().to_owned(),
                    // A body that is not JSON is handed on as a string, for
                    // the consumer to reject.
                    body: serde_json::from_str(raw)
                        .unwrap_or_else(|_| Value::String(raw.to_owned())),
                    receive_count: m
                        .attributes()
                        .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
                        .and_then(|c| c.parse().ok())
                        .unwrap_or(1),
                }
            })
            .collect())
    }

    async fn change_visibility(
        &self,
        queue: &str,
        receipt: &str,
        visibility: Duration,
    ) -> Result<bool, QueueError> {
        match self
            .client
            .change_message_visibility()
            .queue_url(self.url(queue)?)
            .receipt_handle(receipt)
            .visibility_timeout(secs_i32(visibility, 43_200))
            .send()
            .await
        {
            Ok(_) => Ok(true),
            Err(e)
                if e.as_service_error().is_some_and(|se| {
                    se.is_message_not_inflight() || se.is_receipt_handle_is_invalid()
                }) || stale_receipt_code(service_code(&e)) =>
            {
                Ok(false)
            }
            Err(e) => Err(sdk_error(&e)),
        }
    }

    async fn delete_batch(
        &self,
        queue: &str,
        receipts: &[String],
    ) -> Result<Vec<bool>, QueueError> {
        use aws_sdk_sqs::types::DeleteMessageBatchRequestEntry;
        let url = self.url(queue)?;
        let mut out = Vec::with_capacity(receipts.len());
        for chunk in receipts.chunks(10) {
            let entries = chunk
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    DeleteMessageBatchRequestEntry::builder()
                        .id(i.to_string())
                        .receipt_handle(r)
                        .build()
                        .map_err(unavailable)
                })
                .collect::<Result<Vec<_>, _>>()?;
            let result = self
                .client
                .delete_message_batch()
                .queue_url(url)
                .set_entries(Some(entries))
                .send()
                .await
                .map_err(|e| sdk_error(&e))?;
            let failed: std::collections::HashSet<&str> =
                result.failed().iter().map(|f| f.id()).collect();
            out.extend((0..chunk.len()).map(|i| !failed.contains(i.to_string().as_str())));
        }
        Ok(out)
    }

    async fn delete(&self, queue: &str, receipt: &str) -> Result<bool, QueueError> {
        match self
            .client
            .delete_message()
            .queue_url(self.url(queue)?)
            .receipt_handle(receipt)
            .send()
            .await
        {
            Ok(_) => Ok(true),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|se| se.is_receipt_handle_is_invalid())
                    || stale_receipt_code(service_code(&e)) =>
            {
                Ok(false)
            }
            Err(e) => Err(sdk_error(&e)),
        }
    }
}

/// Splits message bodies into `SendMessageBatch` calls: at most 10 entries
/// and 256 KiB of bodies per call (a body over the limit goes alone, for SQS
/// to refuse by itself).
fn send_batches(bodies: &[String]) -> Vec<&[String]> {
    const MAX_ENTRIES: usize = 10;
    const MAX_BYTES: usize = 256 * 1024;
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, body) in bodies.iter().enumerate() {
        if i > start && (i - start == MAX_ENTRIES || bytes + body.len() > MAX_BYTES) {
            out.push(&bodies[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += body.len();
    }
    if start < bodies.len() {
        out.push(&bodies[start..]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::send_batches;

    #[test]
    fn send_batches_hold_at_most_ten_entries_and_256_kib() {
        let small: Vec<String> = (0..23).map(|i| i.to_string()).collect();
        let sizes: Vec<usize> = send_batches(&small).iter().map(|b| b.len()).collect();
        assert_eq!(sizes, vec![10, 10, 3]);

        let big: Vec<String> = (0..5).map(|_| "x".repeat(100 * 1024)).collect();
        let sizes: Vec<usize> = send_batches(&big).iter().map(|b| b.len()).collect();
        assert_eq!(sizes, vec![2, 2, 1]);

        let huge = vec!["x".repeat(300 * 1024), "y".into()];
        let sizes: Vec<usize> = send_batches(&huge).iter().map(|b| b.len()).collect();
        assert_eq!(sizes, vec![1, 1]);
        assert!(send_batches(&[]).is_empty());
    }
}

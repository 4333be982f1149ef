//! The queue boundary: wake-ups (and later buffer pointers and alerts)
//! travel through a queue with SQS semantics. The queue is a hint; Postgres
//! is the truth (invariant 6).
//!
//! Implementations, which must all pass the conformance suite
//! (`tests/tests/it/services.rs`, ADR 0009):
//! * [`PgQueue`], the local profile's: a table with a visibility timeout, a
//!   receive count, a receipt handle per delivery, and a dead-letter queue
//!   (`<name>-dlq`) after the maximum number of receives;
//! * [`SqsQueue`], the aws profile's: Amazon SQS (or any server speaking its
//!   protocol) through `aws-sdk-sqs`, with a redrive policy to each DLQ.

mod guarded;
mod pg;
mod sqs;

pub use guarded::Guarded;
pub use pg::PgQueue;
pub use sqs::{SqsConfig, SqsQueue};

use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;

/// The queues the dispatcher knows, by outbox topic.
pub const WAKEUPS: &str = "wakeups";
pub const BUFFERS: &str = "buffers";
pub const ALERTS: &str = "alerts";

/// The queue an outbox topic is published to.
pub fn queue_for_topic(topic: &str) -> Option<&'static str> {
    match topic {
        "wakeup" => Some(WAKEUPS),
        "buffer" => Some(BUFFERS),
        "alert" => Some(ALERTS),
        _ => None,
    }
}

/// The dead-letter queue of a queue.
pub fn dlq(queue: &str) -> String {
    format!("{queue}-dlq")
}

/// Every queue the dispatcher uses, DLQs included.
pub fn all_queues() -> Vec<String> {
    [WAKEUPS, BUFFERS, ALERTS]
        .into_iter()
        .flat_map(|q| [q.to_owned(), dlq(q)])
        .collect()
}

/// Whether `name` is a queue workers may use (a known queue or its DLQ).
pub fn is_known_queue(name: &str) -> bool {
    let base = name.strip_suffix("-dlq").unwrap_or(name);
    matches!(base, WAKEUPS | BUFFERS | ALERTS)
}

/// One delivery of a message (the wire type: the HTTP queue serves it as is).
pub use dispatcher_wire::QueueMessage as Delivery;

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("receipt handle is malformed")]
    BadReceipt,
    #[error("no queue {0:?}")]
    UnknownQueue(String),
    #[error("queue unavailable: {0}")]
    Unavailable(String),
    /// Refused at once: the queue's circuit breaker is open.
    #[error("queue unavailable: {0}")]
    Open(#[from] crate::breaker::Open),
}

impl From<sqlx::Error> for QueueError {
    fn from(e: sqlx::Error) -> Self {
        QueueError::Unavailable(e.to_string())
    }
}

/// SQS semantics: at-least-once delivery, visibility timeout, receive count,
/// dead-letter queue after `max_receives`.
#[async_trait]
pub trait Queue: Send + Sync {
    /// Sends a message, invisible for `delay`.
    async fn send(&self, queue: &str, body: &Value, delay: Duration) -> Result<String, QueueError>;

    /// Sends several messages at once, visible at once; one answer per
    /// body, in order: the message id, or why that message was not sent.
    /// `Err` means none was sent. Implementations with a batch call
    /// override it (SQS: `SendMessageBatch`, 10 entries or 256 KiB per call;
    /// `PgQueue`: one `INSERT`).
    async fn send_batch(
        &self,
        queue: &str,
        bodies: &[Value],
    ) -> Result<Vec<Result<String, String>>, QueueError> {
        let mut out = Vec::with_capacity(bodies.len());
        for body in bodies {
            out.push(
                self.send(queue, body, Duration::ZERO)
                    .await
                    .map_err(|e| e.to_string()),
            );
        }
        Ok(out)
    }

    /// Receives up to `max` visible messages (1..=10), waiting up to `wait`
    /// for one to arrive; each stays invisible for `visibility`.
    async fn receive(
        &self,
        queue: &str,
        max: u32,
        wait: Duration,
        visibility: Duration,
    ) -> Result<Vec<Delivery>, QueueError>;

    /// Makes the delivery invisible for `visibility` from now. `false` if
    /// the receipt no longer names the current delivery.
    async fn change_visibility(
        &self,
        queue: &str,
        receipt: &str,
        visibility: Duration,
    ) -> Result<bool, QueueError>;

    /// Deletes the delivered message. A receipt that no longer names the
    /// current delivery (the message was delivered again since) deletes
    /// nothing; `PgQueue` then answers `false`, SQS may still answer `true`
    /// (it does not say), so callers must not rely on the answer for safety.
    async fn delete(&self, queue: &str, receipt: &str) -> Result<bool, QueueError>;

    /// Deletes several deliveries; one answer per receipt, as `delete`.
    /// Implementations with a batch call override it (SQS: batches of 10).
    async fn delete_batch(
        &self,
        queue: &str,
        receipts: &[String],
    ) -> Result<Vec<bool>, QueueError> {
        let mut out = Vec::with_capacity(receipts.len());
        for r in receipts {
            out.push(self.delete(queue, r).await?);
        }
        Ok(out)
    }
}

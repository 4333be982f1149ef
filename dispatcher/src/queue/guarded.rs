//! A queue behind a circuit breaker (`crate::breaker`): while the queue
//! keeps failing, calls fail at once with [`QueueError::Open`]. Only
//! [`QueueError::Unavailable`] counts as a failure; a malformed receipt or
//! an unknown queue is the queue answering, and so is an empty receive.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;

use super::{Delivery, Queue, QueueError};
use crate::breaker::Breaker;

pub struct Guarded {
    inner: Arc<dyn Queue>,
    breaker: Arc<Breaker>,
}

impl Guarded {
    pub fn new(inner: Arc<dyn Queue>, breaker: Arc<Breaker>) -> Self {
        Guarded { inner, breaker }
    }

    async fn call<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, QueueError>>,
    ) -> Result<T, QueueError> {
        self.breaker
            .call(call, |e| match e {
                QueueError::Unavailable(why) => Some(why.clone()),
                _ => None,
            })
            .await?
    }
}

#[async_trait]
impl Queue for Guarded {
    async fn send(&self, queue: &str, body: &Value, delay: Duration) -> Result<String, QueueError> {
        self.call(self.inner.send(queue, body, delay)).await
    }

    async fn send_batch(
        &self,
        queue: &str,
        bodies: &[Value],
    ) -> Result<Vec<Result<String, String>>, QueueError> {
        self.call(self.inner.send_batch(queue, bodies)).await
    }

    async fn receive(
        &self,
        queue: &str,
        max: u32,
        wait: Duration,
        visibility: Duration,
    ) -> Result<Vec<Delivery>, QueueError> {
        self.call(self.inner.receive(queue, max, wait, visibility))
            .await
    }

    async fn change_visibility(
        &self,
        queue: &str,
        receipt: &str,
        visibility: Duration,
    ) -> Result<bool, QueueError> {
        self.call(self.inner.change_visibility(queue, receipt, visibility))
            .await
    }

    async fn delete(&self, queue: &str, receipt: &str) -> Result<bool, QueueError> {
        self.call(self.inner.delete(queue, receipt)).await
    }

    async fn delete_batch(
        &self,
        queue: &str,
        receipts: &[String],
    ) -> Result<Vec<bool>, QueueError> {
        self.call(self.inner.delete_batch(queue, receipts)).await
    }
}

//! The local profile's queue: a Postgres table with SQS semantics.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use sqlx::PgPool;
use tokio::sync::Notify;
use uuid::Uuid;

use super::{dlq, Delivery, Queue, QueueError};
use crate::millis;

/// The Postgres-backed queue of the local profile.
#[derive(Clone)]
pub struct PgQueue {
    pool: PgPool,
    max_receives: u32,
    arrivals: Arc<Notify>,
}

fn parse_receipt(receipt: &str) -> Result<(i64, Uuid), QueueError> {
    let (id, r) = receipt.split_once(':').ok_or(QueueError::BadReceipt)?;
    Ok((
        id.parse().map_err(|_| QueueError::BadReceipt)?,
        r.parse().map_err(|_| QueueError::BadReceipt)?,
    ))
}

impl PgQueue {
    /// `arrivals` is notified when messages may have arrived (see
    /// [`PgQueue::listen`]); long polls wait on it.
    pub fn new(pool: PgPool, max_receives: u32, arrivals: Arc<Notify>) -> Self {
        PgQueue {
            pool,
            max_receives,
            arrivals,
        }
    }

    /// Forwards `queue_messages` insert notifications to `arrivals` until
    /// `shutdown`. Long polls still re-check every second, so a lost
    /// notification costs at most that.
    pub async fn listen(
        pool: PgPool,
        arrivals: Arc<Notify>,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        loop {
            let mut listener = match sqlx::postgres::PgListener::connect_with(&pool).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, "queue listener cannot connect; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            };
            if let Err(e) = listener.listen("queue_messages").await {
                tracing::warn!(error = %e, "queue listener cannot LISTEN; retrying");
                continue;
            }
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    n = listener.recv() => match n {
                        Ok(_) => arrivals.notify_waiters(),
                        Err(e) => {
                            tracing::warn!(error = %e, "queue listener lost its connection");
                            break;
                        }
                    },
                }
            }
        }
    }

    async fn receive_now(
        &self,
        queue: &str,
        max: u32,
        visibility: Duration,
    ) -> Result<Vec<Delivery>, QueueError> {
        // One statement picks the head of the queue. A picked message that
        // has already been received `max_receives` times goes to the
        // dead-letter queue instead of being delivered once more (as SQS
        // moves it on the receive that would exceed maxReceiveCount); the
        // rest are delivered. Only the picked rows are looked at, so a
        // receive costs the same however long the queue is. When every
        // picked message was dead-lettered, look again.
        let max_receives = i32::try_from(self.max_receives).unwrap_or(i32::MAX);
        let dead_letter = if queue.ends_with("-dlq") {
            None
        } else {
            Some(dlq(queue))
        };
        loop {
            // Moved messages come back with no receipt.
            let rows: Vec<(i64, Option<Value>, Option<Uuid>, i32)> = sqlx::query!(
                r#"WITH picked AS (
                     SELECT id, $5::text IS NOT NULL AND receive_count >= $4 AS dead
                       FROM queue_messages
                      WHERE queue = $1 AND visible_at <= now()
                      ORDER BY visible_at, id
                      LIMIT $2
                      FOR UPDATE SKIP LOCKED),
                 moved AS (
                     UPDATE queue_messages m
                        SET queue = $5, receive_count = 0, receipt = NULL, visible_at = now()
                       FROM picked
                      WHERE m.id = picked.id AND picked.dead
                  RETURNING m.id),
                 delivered AS (
                     UPDATE queue_messages m
                        SET receive_count = m.receive_count + 1, receipt = gen_random_uuid(),
                            visible_at = now() + $3 * interval '1 millisecond'
                       FROM picked
                      WHERE m.id = picked.id AND NOT picked.dead
                  RETURNING m.id, m.body, m.receipt, m.receive_count)
                 SELECT id AS "id!", body, receipt, receive_count AS "receive_count!" FROM delivered
                 UNION ALL
                 SELECT id, NULL, NULL, 0 FROM moved"#,
                queue,
                i64::from(max),
                millis(visibility) as f64,
                max_receives,
                dead_letter.as_deref(),
            )
            .fetch_all(&self.pool)
            .await?
            .into_iter()
            .map(|r| (r.id, r.body, r.receipt, r.receive_count))
            .collect();
            let picked = rows.len();
            let delivered: Vec<Delivery> = rows
                .into_iter()
                .filter_map(|(id, body, receipt, count)| {
                    Some(Delivery {
                        message_id: id.to_string(),
                        receipt_handle: format!("{id}:{}", receipt?),
                        body: body?,
                        receive_count: u32::try_from(count).unwrap_or(0),
                    })
                })
                .collect();
            let moved = picked - delivered.len();
            if moved > 0 {
                tracing::info!(
                    queue,
                    moved,
                    "messages past their maximum receive count moved to the dead-letter queue"
                );
            }
            if !delivered.is_empty() || moved == 0 {
                return Ok(delivered);
            }
        }
    }
}

#[async_trait]
impl Queue for PgQueue {
    async fn send(&self, queue: &str, body: &Value, delay: Duration) -> Result<String, QueueError> {
        let id: i64 = sqlx::query_scalar!(
            "INSERT INTO queue_messages (queue, body, visible_at)
             VALUES ($1, $2, now() + $3 * interval '1 millisecond') RETURNING id",
            queue,
            body,
            millis(delay) as f64,
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(id.to_string())
    }

    async fn send_batch(
        &self,
        queue: &str,
        bodies: &[Value],
    ) -> Result<Vec<Result<String, String>>, QueueError> {
        if bodies.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<i64> = sqlx::query_scalar!(
            "INSERT INTO queue_messages (queue, body)
             SELECT $1, body FROM unnest($2::jsonb[]) WITH ORDINALITY AS b(body, n)
              ORDER BY n
             RETURNING id",
            queue,
            bodies,
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(ids.into_iter().map(|id| Ok(id.to_string())).collect())
    }

    async fn receive(
        &self,
        queue: &str,
        max: u32,
        wait: Duration,
        visibility: Duration,
    ) -> Result<Vec<Delivery>, QueueError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Register interest before looking, so an arrival between the
            // look and the wait is not missed.
            let arrived = self.arrivals.notified();
            let got = self
                .receive_now(queue, max.clamp(1, 10), visibility)
                .await?;
            let now = tokio::time::Instant::now();
            if !got.is_empty() || now >= deadline {
                return Ok(got);
            }
            let nap = (deadline - now).min(Duration::from_secs(1));
            tokio::select! {
                _ = arrived => {}
                _ = tokio::time::sleep(nap) => {}
            }
        }
    }

    async fn change_visibility(
        &self,
        queue: &str,
        receipt: &str,
        visibility: Duration,
    ) -> Result<bool, QueueError> {
        let (id, r) = parse_receipt(receipt)?;
        let n = sqlx::query!(
            "UPDATE queue_messages SET visible_at = now() + $4 * interval '1 millisecond'
              WHERE id = $1 AND queue = $2 AND receipt = $3",
            id,
            queue,
            r,
            millis(visibility) as f64,
        )
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n == 1)
    }

    async fn delete(&self, queue: &str, receipt: &str) -> Result<bool, QueueError> {
        let (id, r) = parse_receipt(receipt)?;
        let n = sqlx::query!(
            "DELETE FROM queue_messages WHERE id = $1 AND queue = $2 AND receipt = $3",
            id,
            queue,
            r,
        )
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n == 1)
    }
}

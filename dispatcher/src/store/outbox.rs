//! The outbox (invariant 5) as the relay sees it, and the maintenance
//! queries of the lease reaper.

use std::time::Duration;

use serde_json::Value;
use sqlx::{Postgres, Transaction};
use uuid::Uuid;

use super::Store;
use crate::error::StoreError;
use crate::millis;

/// A pending outbox row, locked by the relay's transaction.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct OutboxRow {
    pub id: i64,
    pub topic: String,
    pub payload: Value,
    pub tries: i32,
}

/// Due outbox rows, locked (`FOR UPDATE SKIP LOCKED`) so that several relays
/// share the work; the locks last until [`OutboxBatch::finish`].
pub struct OutboxBatch {
    tx: Transaction<'static, Postgres>,
    pub rows: Vec<OutboxRow>,
}

impl OutboxBatch {
    /// Marks `sent` as published and records failures: each failed row is
    /// retried after its delay, or marked `dead` once it has used `max_tries`.
    /// Commits; a crash before this leaves every row pending (a duplicate
    /// publish later, never a loss).
    pub async fn finish(
        mut self,
        sent: &[i64],
        failed: &[(i64, String, Duration)],
        max_tries: u32,
    ) -> Result<(), StoreError> {
        if !sent.is_empty() {
            sqlx::query(
                "UPDATE outbox SET state = 'sent', sent_at = now(), tries = tries + 1, last_error = NULL
                  WHERE id = ANY($1)",
            )
            .bind(sent)
            .execute(&mut *self.tx)
            .await?;
        }
        for (id, error, delay) in failed {
            sqlx::query(
                "UPDATE outbox
                    SET tries = tries + 1, last_error = $2,
                        state = CASE WHEN tries + 1 >= $3 THEN 'dead' ELSE 'pending' END,
                        available_at = now() + $4 * interval '1 millisecond'
                  WHERE id = $1",
            )
            .bind(id)
            .bind(error)
            .bind(i32::try_from(max_tries).unwrap_or(i32::MAX))
            .bind(millis(*delay))
            .execute(&mut *self.tx)
            .await?;
        }
        self.tx.commit().await?;
        Ok(())
    }
}

/// An outbox row the relay gave up on.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DeadRow {
    pub id: i64,
    pub topic: String,
    pub payload: Value,
    pub tries: i32,
    pub last_error: Option<String>,
    pub created_at: chrono::DateTime<chrono::Utc>,
}

/// Counts of outbox rows by state, for operators and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OutboxCounts {
    pub pending: i64,
    pub sent: i64,
    pub dead: i64,
}

impl Store {
    /// Locks up to `limit` due pending rows, oldest first.
    pub async fn outbox_due(&self, limit: u32) -> Result<OutboxBatch, StoreError> {
        let mut tx = self.pool.begin().await?;
        let rows = sqlx::query_as(
            "SELECT id, topic, payload, tries FROM outbox
              WHERE state = 'pending' AND available_at <= now()
              ORDER BY id LIMIT $1
              FOR UPDATE SKIP LOCKED",
        )
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await?;
        Ok(OutboxBatch { tx, rows })
    }

    pub async fn outbox_counts(&self) -> Result<OutboxCounts, StoreError> {
        let (pending, sent, dead) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE state = 'pending'), count(*) FILTER (WHERE state = 'sent'),
                    count(*) FILTER (WHERE state = 'dead')
               FROM outbox",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(OutboxCounts {
            pending,
            sent,
            dead,
        })
    }

    /// Dead rows, oldest first: id, topic, payload, tries, last error.
    pub async fn outbox_dead(&self, limit: u32) -> Result<Vec<DeadRow>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT id, topic, payload, tries, last_error, created_at FROM outbox
              WHERE state = 'dead' ORDER BY id LIMIT $1",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?)
    }

    /// Puts dead outbox rows back to pending (all, or those given).
    pub async fn outbox_requeue_dead(&self, ids: Option<&[i64]>) -> Result<u64, StoreError> {
        let n = sqlx::query(
            "UPDATE outbox SET state = 'pending', tries = 0, available_at = now()
              WHERE state = 'dead' AND ($1::bigint[] IS NULL OR id = ANY($1))",
        )
        .bind(ids)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n)
    }

    /// Tasks whose lease has expired, soonest-expired first.
    pub async fn expired_leases(&self, limit: u32) -> Result<Vec<Uuid>, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT id FROM tasks WHERE state = 'leased' AND lease_expires_at <= now()
              ORDER BY lease_expires_at LIMIT $1",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?)
    }

    /// Writes a fresh wake-up for ready tasks nobody has claimed for
    /// `after` (their wake-up was lost, dead-lettered or dropped). Returns
    /// how many were woken. Safe with several reapers (`SKIP LOCKED`).
    pub async fn rewake_stale_ready(&self, after: Duration, limit: u32) -> Result<u64, StoreError> {
        let mut tx = self.pool.begin().await?;
        let woken: Vec<Uuid> = sqlx::query_scalar(
            "UPDATE tasks SET updated_at = now()
              WHERE id IN (SELECT id FROM tasks
                            WHERE state = 'ready'
                              AND greatest(updated_at, coalesce(not_before, updated_at))
                                  <= now() - $1 * interval '1 millisecond'
                            LIMIT $2
                            FOR UPDATE SKIP LOCKED)
          RETURNING id",
        )
        .bind(millis(after))
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await?;
        super::tasks::enqueue_wakeups(&mut tx, &woken, None).await?;
        tx.commit().await?;
        Ok(woken.len() as u64)
    }

    /// Deletes sent outbox rows older than `retention`, a bounded batch.
    pub async fn purge_sent_outbox(&self, retention: Duration) -> Result<u64, StoreError> {
        Ok(sqlx::query(
            "DELETE FROM outbox WHERE id IN (
                 SELECT id FROM outbox WHERE state = 'sent'
                    AND sent_at < now() - $1 * interval '1 millisecond' LIMIT 1000)",
        )
        .bind(millis(retention))
        .execute(&self.pool)
        .await?
        .rows_affected())
    }
}

//! The outbox (invariant 5) as the relay sees it, and the maintenance
//! queries of the lease reaper.

use std::time::Duration;

use serde_json::Value;
use uuid::Uuid;

use super::Store;
use crate::error::StoreError;
use crate::millis;

/// A pending outbox row a relay has taken (hidden from other relays until
/// its hold ends).
#[derive(Debug, Clone)]
pub struct OutboxRow {
    pub id: i64,
    pub topic: String,
    pub payload: Value,
    pub tries: i32,
}

/// An outbox row the relay gave up on.
#[derive(Debug, Clone)]
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
    /// Takes up to `limit` due pending rows, longest due first, and hides them
    /// from other relays for `hold`: one statement, committed at once, so no
    /// transaction stays open while the rows are published. A relay that
    /// dies before [`Store::outbox_finish`] leaves them pending; they are
    /// due again when the hold ends (a duplicate publish, never a loss).
    pub async fn outbox_take(
        &self,
        limit: u32,
        hold: Duration,
    ) -> Result<Vec<OutboxRow>, StoreError> {
        let mut rows: Vec<OutboxRow> = sqlx::query_as!(
            OutboxRow,
            "UPDATE outbox SET available_at = now() + $2 * interval '1 millisecond'
              WHERE id IN (SELECT id FROM outbox
                            WHERE state = 'pending' AND available_at <= now()
                            -- The order of outbox_pending_idx: the first
                            -- rows of the index, whatever the backlog
                            -- (ordering by id alone read every due row).
                            ORDER BY available_at, id LIMIT $1
                              FOR UPDATE SKIP LOCKED)
          RETURNING id, topic, payload, tries",
            i64::from(limit),
            millis(hold) as f64,
        )
        .fetch_all(&self.pool)
        .await?;
        rows.sort_by_key(|r| r.id);
        Ok(rows)
    }

    /// Records what became of taken rows: `sent` are marked sent; each of
    /// `failed` is retried after its delay, or marked `dead` once it has
    /// used `max_tries`. One short transaction.
    pub async fn outbox_finish(
        &self,
        sent: &[i64],
        failed: &[(i64, String, Duration)],
        max_tries: u32,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        if !sent.is_empty() {
            sqlx::query!(
                "UPDATE outbox SET state = 'sent', sent_at = now(), tries = tries + 1, last_error = NULL
                  WHERE id = ANY($1) AND state = 'pending'",
                sent,
            )
            .execute(&mut *tx)
            .await?;
        }
        if !failed.is_empty() {
            let ids: Vec<i64> = failed.iter().map(|f| f.0).collect();
            let errors: Vec<&str> = failed.iter().map(|f| f.1.as_str()).collect();
            let delays: Vec<i64> = failed.iter().map(|f| millis(f.2)).collect();
            sqlx::query!(
                "UPDATE outbox o
                    SET tries = o.tries + 1, last_error = f.error,
                        state = CASE WHEN o.tries + 1 >= $4 THEN 'dead' ELSE 'pending' END,
                        available_at = now() + f.delay_ms * interval '1 millisecond'
                   FROM unnest($1::bigint[], $2::text[], $3::bigint[]) AS f(id, error, delay_ms)
                  WHERE o.id = f.id AND o.state = 'pending'",
                &ids,
                &errors as _,
                &delays,
                i32::try_from(max_tries).unwrap_or(i32::MAX),
            )
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn outbox_counts(&self) -> Result<OutboxCounts, StoreError> {
        Ok(sqlx::query_as!(
            OutboxCounts,
            r#"SELECT count(*) FILTER (WHERE state = 'pending') AS "pending!",
                      count(*) FILTER (WHERE state = 'sent') AS "sent!",
                      count(*) FILTER (WHERE state = 'dead') AS "dead!"
                 FROM outbox"#,
        )
        .fetch_one(&self.pool)
        .await?)
    }

    /// Dead rows, oldest first: id, topic, payload, tries, last error.
    pub async fn outbox_dead(&self, limit: u32) -> Result<Vec<DeadRow>, StoreError> {
        Ok(sqlx::query_as!(
            DeadRow,
            "SELECT id, topic, payload, tries, last_error, created_at FROM outbox
              WHERE state = 'dead' ORDER BY id LIMIT $1",
            i64::from(limit),
        )
        .fetch_all(&self.pool)
        .await?)
    }

    /// Puts dead outbox rows back to pending (all, or those given).
    pub async fn outbox_requeue_dead(&self, ids: Option<&[i64]>) -> Result<u64, StoreError> {
        let n = sqlx::query!(
            "UPDATE outbox SET state = 'pending', tries = 0, available_at = now()
              WHERE state = 'dead' AND ($1::bigint[] IS NULL OR id = ANY($1))",
            ids,
        )
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n)
    }

    /// How long until the earliest lease expires (zero if one already
    /// has); `None` when nothing is leased. Reads the leased tasks through
    /// `tasks_leased_idx` (migration 0014: no index holds the lease's end,
    /// so that heartbeats are HOT updates); they are the running tasks.
    pub async fn next_lease_expiry(&self) -> Result<Option<std::time::Duration>, StoreError> {
        let ms: Option<f64> = sqlx::query_scalar!(
            "SELECT (extract(epoch FROM min(lease_expires_at) - clock_timestamp()) * 1000)::float8
               FROM tasks WHERE state = 'leased'",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(ms.map(|ms| std::time::Duration::from_micros((ms.max(0.0) * 1000.0) as u64)))
    }

    /// Tasks whose lease has expired, soonest-expired first (read as
    /// `next_lease_expiry` reads them).
    pub async fn expired_leases(&self, limit: u32) -> Result<Vec<Uuid>, StoreError> {
        Ok(sqlx::query_scalar!(
            "SELECT id FROM tasks WHERE state = 'leased' AND lease_expires_at <= now()
              ORDER BY lease_expires_at LIMIT $1",
            i64::from(limit),
        )
        .fetch_all(&self.pool)
        .await?)
    }

    /// Writes a fresh wake-up for ready tasks nobody has claimed for
    /// `after` (their wake-up was lost, dead-lettered or dropped). Returns
    /// how many were woken. Safe with several reapers (`SKIP LOCKED`).
    /// Without wake-up messages (`Wakeups::Notify`) there is nothing to
    /// lose: every long-polled claim reads the tasks table itself.
    pub async fn rewake_stale_ready(&self, after: Duration, limit: u32) -> Result<u64, StoreError> {
        if self.settings.wakeups == crate::settings::Wakeups::Notify {
            return Ok(0);
        }
        let mut tx = self.pool.begin().await?;
        let woken: Vec<Uuid> = sqlx::query_scalar!(
            "UPDATE tasks SET updated_at = now()
              WHERE id IN (SELECT id FROM tasks
                            WHERE state = 'ready'
                              AND greatest(updated_at, coalesce(not_before, updated_at))
                                  <= now() - $1 * interval '1 millisecond'
                            LIMIT $2
                            FOR UPDATE SKIP LOCKED)
          RETURNING id",
            millis(after) as f64,
            i64::from(limit),
        )
        .fetch_all(&mut *tx)
        .await?;
        super::transitions::enqueue_wakeups(&mut tx, self.settings.wakeups, &woken, None).await?;
        tx.commit().await?;
        Ok(woken.len() as u64)
    }

    /// Deletes sent outbox rows older than `retention`, a bounded batch.
    pub async fn purge_sent_outbox(&self, retention: Duration) -> Result<u64, StoreError> {
        Ok(sqlx::query!(
            "DELETE FROM outbox WHERE id IN (
                 SELECT id FROM outbox WHERE state = 'sent'
                    AND sent_at < now() - $1 * interval '1 millisecond' LIMIT 1000)",
            millis(retention) as f64,
        )
        .execute(&self.pool)
        .await?
        .rows_affected())
    }
}

//! The workers seen recently (`POST /internal/worker-presence`): their
//! slots, busy slots and runtimes, for the backlog per slot and the
//! operator's list of workers.

use chrono::{DateTime, Utc};

use super::Store;
use crate::error::StoreError;

/// Slots of the workers seen in the last 30 s that run one runtime (a
/// worker of several runtimes counts in each).
#[derive(Debug)]
pub struct RuntimeSlots {
    pub runtime: String,
    pub slots: i64,
    pub busy: i64,
}

/// A worker as it last reported itself.
#[derive(Debug)]
pub struct WorkerSeen {
    pub worker_id: String,
    pub credential: String,
    pub slots: i32,
    pub busy: i32,
    pub runtimes: Vec<String>,
    pub started_at: DateTime<Utc>,
    pub seen_at: DateTime<Utc>,
}

/// How recently a worker must have reported to count as running.
pub const PRESENT_SECONDS: f64 = 30.0;

impl Store {
    /// Records a worker's report (its id, the credential it spoke with,
    /// its capacity).
    pub async fn worker_present(
        &self,
        worker_id: &str,
        credential: &str,
        slots: i32,
        busy: i32,
        runtimes: &[String],
    ) -> Result<(), StoreError> {
        sqlx::query!(
            "INSERT INTO worker_presence (worker_id, credential, slots, busy, runtimes)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (worker_id) DO UPDATE
                SET credential = EXCLUDED.credential, slots = EXCLUDED.slots,
                    busy = EXCLUDED.busy, runtimes = EXCLUDED.runtimes, seen_at = now()",
            worker_id,
            credential,
            slots,
            busy,
            runtimes,
        )
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Slots and busy slots per runtime of the workers seen recently.
    pub async fn slots_by_runtime(&self) -> Result<Vec<RuntimeSlots>, StoreError> {
        Ok(sqlx::query_as!(
            RuntimeSlots,
            r#"SELECT r AS "runtime!", sum(slots)::bigint AS "slots!", sum(busy)::bigint AS "busy!"
                 FROM worker_presence, unnest(runtimes) AS r
                WHERE seen_at > now() - make_interval(secs => $1)
                GROUP BY r"#,
            PRESENT_SECONDS,
        )
        .fetch_all(&self.pool)
        .await?)
    }

    /// The workers seen within `within_seconds`, most recent first.
    pub async fn workers_seen(&self, within_seconds: f64) -> Result<Vec<WorkerSeen>, StoreError> {
        Ok(sqlx::query_as!(
            WorkerSeen,
            "SELECT worker_id, credential, slots, busy, runtimes, started_at, seen_at
               FROM worker_presence
              WHERE seen_at > now() - make_interval(secs => $1)
              ORDER BY seen_at DESC, worker_id",
            within_seconds,
        )
        .fetch_all(&self.pool)
        .await?)
    }

    /// Forgets workers not seen for a day.
    pub async fn forget_old_workers(&self) -> Result<u64, StoreError> {
        Ok(
            sqlx::query!("DELETE FROM worker_presence WHERE seen_at < now() - interval '1 day'")
                .execute(&self.pool)
                .await?
                .rows_affected(),
        )
    }
}

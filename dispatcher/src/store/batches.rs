//! Buffer batches as the sink, the API and operators see them (ADR 0006).
//! The state database holds each batch's verdict (`pending`, `ingested`,
//! `dead` with its reason); the rows and the per-batch dedup record are in
//! the data database (`crate::services::sink`).

use std::time::Duration;

use chrono::{DateTime, Utc};
use dispatcher_wire::{BatchReason, BatchView, Column};
use uuid::Uuid;

use super::Store;
use crate::error::StoreError;
use crate::rows::RowError;

/// Everything the sink needs to ingest one batch.
#[derive(Debug, Clone)]
pub struct SinkBatch {
    pub org_id: Uuid,
    pub batch_id: Uuid,
    pub task_id: Uuid,
    pub attempt: i32,
    pub dataset_id: Uuid,
    pub dataset: String,
    pub columns: Vec<Column>,
    pub object_key: String,
    pub rows: i64,
    pub sha256: String,
    pub state: String,
}

/// A dead batch, for `dispatcher admin sink dead list`.
#[derive(Debug, Clone)]
pub struct DeadBatch {
    pub org_id: Uuid,
    pub batch_id: Uuid,
    pub dataset: String,
    pub task_id: Uuid,
    pub attempt: i32,
    pub object_key: String,
    pub rows: i64,
    pub sha256: String,
    pub reason_code: String,
    pub reason_line: Option<i64>,
    pub reason_message: Option<String>,
    pub replays: i32,
    pub created_at: DateTime<Utc>,
    pub dead_at: Option<DateTime<Utc>>,
}

/// A batch still pending, for `dispatcher admin sink pending`.
#[derive(Debug, Clone)]
pub struct PendingBatch {
    pub org_id: Uuid,
    pub batch_id: Uuid,
    pub dataset: String,
    pub created_at: DateTime<Utc>,
    pub pointer_at: DateTime<Utc>,
    pub transient_failures: i32,
    pub last_error: Option<String>,
}

/// Which dead batches an operator command acts on. Every field narrows;
/// an empty filter means every dead batch.
#[derive(Debug, Clone, Default)]
pub struct DeadFilter {
    pub org_id: Option<Uuid>,
    pub dataset: Option<String>,
    pub batch_ids: Vec<Uuid>,
}

impl Store {
    /// The batch a buffer pointer names, with its dataset's schema; `None`
    /// if there is no such batch (purged by an operator) or its dataset is
    /// gone.
    pub async fn sink_batch(
        &self,
        org_id: Uuid,
        batch_id: Uuid,
    ) -> Result<Option<SinkBatch>, StoreError> {
        let row = sqlx::query!(
            "SELECT b.task_id, b.attempt, d.id, b.dataset, d.columns, b.object_key, b.rows,
                    b.sha256, b.state
               FROM buffer_publishes b
               JOIN datasets d ON d.org_id = b.org_id AND d.name = b.dataset
              WHERE b.org_id = $1 AND b.batch_id = $2",
            org_id,
            batch_id,
        )
        .fetch_optional(&self.pool)
        .await?
        .map(|r| {
            (
                r.task_id,
                r.attempt,
                r.id,
                r.dataset,
                r.columns,
                r.object_key,
                r.rows,
                r.sha256,
                r.state,
            )
        });
        let Some((task_id, attempt, dataset_id, dataset, columns, object_key, rows, sha256, state)) =
            row
        else {
            return Ok(None);
        };
        let columns: Vec<Column> = serde_json::from_value(columns).map_err(|e| {
            StoreError::Db(sqlx::Error::Decode(format!("stored columns: {e}").into()))
        })?;
        Ok(Some(SinkBatch {
            org_id,
            batch_id,
            task_id,
            attempt,
            dataset_id,
            dataset,
            columns,
            object_key,
            rows,
            sha256,
            state,
        }))
    }

    /// Records that the batch's rows are in the data database.
    pub async fn mark_batch_ingested(
        &self,
        org_id: Uuid,
        batch_id: Uuid,
    ) -> Result<(), StoreError> {
        sqlx::query!(
            "UPDATE buffer_publishes SET state = 'ingested', ingested_at = now(), last_error = NULL
              WHERE org_id = $1 AND batch_id = $2 AND state = 'pending'",
            org_id,
            batch_id,
        )
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Makes a pending batch dead with its reason. `false` if it was not
    /// pending (ingested meanwhile, or already dead).
    pub async fn mark_batch_dead(
        &self,
        org_id: Uuid,
        batch_id: Uuid,
        reason: &RowError,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query!(
            "UPDATE buffer_publishes
                SET state = 'dead', dead_at = now(), reason_code = $3, reason_line = $4,
                    reason_message = $5
              WHERE org_id = $1 AND batch_id = $2 AND state = 'pending'",
            org_id,
            batch_id,
            reason.code.as_str(),
            reason.line.and_then(|l| i64::try_from(l).ok()),
            &reason.message,
        )
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Counts a transient failure (the batch stays pending) and notes that
    /// a new pointer is on its way, so the reaper does not send another.
    pub async fn note_batch_retry(
        &self,
        org_id: Uuid,
        batch_id: Uuid,
        error: &str,
    ) -> Result<(), StoreError> {
        sqlx::query!(
            "UPDATE buffer_publishes
                SET transient_failures = transient_failures + 1, last_error = left($3, 2000),
                    pointer_at = now()
              WHERE org_id = $1 AND batch_id = $2 AND state = 'pending'",
            org_id,
            batch_id,
            error,
        )
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// A batch of one of the org's datasets, as the contract shows it.
    pub async fn batch_view(
        &self,
        org_id: Uuid,
        dataset: &str,
        batch_id: Uuid,
    ) -> Result<BatchView, StoreError> {
        let row = sqlx::query!(
            "SELECT state, rows, reason_code, reason_line, reason_message
                   FROM buffer_publishes WHERE org_id = $1 AND dataset = $2 AND batch_id = $3",
            org_id,
            dataset,
            batch_id,
        )
        .fetch_optional(&self.pool)
        .await?
        .map(|r| {
            (
                r.state,
                r.rows,
                r.reason_code,
                r.reason_line,
                r.reason_message,
            )
        });
        let (status, rows, code, line, message) = row.ok_or_else(|| {
            StoreError::NotFound(format!("no batch {batch_id} of dataset {dataset:?}"))
        })?;
        Ok(BatchView {
            batch_id,
            status,
            rows: u64::try_from(rows).unwrap_or(0),
            reason: code.map(|code| BatchReason {
                code,
                line: line.and_then(|l| u64::try_from(l).ok()),
                message: message.unwrap_or_default(),
            }),
        })
    }

    /// Batches published longer than `older_than` ago and still pending,
    /// oldest first: the sink is behind, or failing transiently
    /// (`last_error`).
    pub async fn pending_batches(
        &self,
        older_than: Duration,
        limit: u32,
    ) -> Result<Vec<PendingBatch>, StoreError> {
        Ok(sqlx::query_as!(
            PendingBatch,
            "SELECT org_id, batch_id, dataset, created_at, pointer_at, transient_failures, last_error
               FROM buffer_publishes
              WHERE state = 'pending'
                AND created_at < now() - make_interval(secs => $1::double precision / 1000)
              ORDER BY created_at LIMIT $2",
            crate::millis(older_than) as f64,
            i64::from(limit),
        )
        .fetch_all(&self.pool)
        .await?)
    }

    /// Dead batches matching `filter`, oldest first.
    pub async fn dead_batches(
        &self,
        filter: &DeadFilter,
        limit: u32,
    ) -> Result<Vec<DeadBatch>, StoreError> {
        // The filter is written out in each query (a macro takes one
        // literal); `purge_dead_batches` uses the same one.
        Ok(sqlx::query_as!(
            DeadBatch,
            r#"SELECT b.org_id, b.batch_id, b.dataset, b.task_id, b.attempt, b.object_key, b.rows,
                    b.sha256, b.reason_code AS "reason_code!", b.reason_line, b.reason_message,
                    b.replays, b.created_at, b.dead_at
               FROM buffer_publishes b
              WHERE b.state = 'dead'
                AND ($1::uuid IS NULL OR b.org_id = $1)
                AND ($2::text IS NULL OR b.dataset = $2)
                AND (cardinality($3::uuid[]) = 0 OR b.batch_id = ANY($3))
              ORDER BY b.dead_at, b.batch_id LIMIT $4"#,
            filter.org_id,
            filter.dataset.as_deref(),
            &filter.batch_ids,
            i64::from(limit),
        )
        .fetch_all(&self.pool)
        .await?)
    }

    /// Sends one dead batch back to the sink: it becomes pending, its
    /// reason is cleared, and a pointer is written to the outbox, in one
    /// statement. With `accept` (the object's current checksum and row
    /// count, for an object an operator fixed), the batch takes those and
    /// keeps the published ones as `replaced_*`. `false` if the batch was
    /// not dead.
    pub async fn replay_dead_batch(
        &self,
        org_id: Uuid,
        batch_id: Uuid,
        accept: Option<(&str, i64)>,
    ) -> Result<bool, StoreError> {
        let (sha, rows) = accept.unzip();
        let replayed: bool = sqlx::query_scalar!(
            r#"WITH up AS (
                 UPDATE buffer_publishes
                    SET state = 'pending', reason_code = NULL, reason_line = NULL,
                        reason_message = NULL, dead_at = NULL, replays = replays + 1,
                        pointer_at = now(),
                        replaced_sha256 = CASE WHEN $3::text IS NULL THEN replaced_sha256
                                               ELSE sha256 END,
                        replaced_rows = CASE WHEN $3::text IS NULL THEN replaced_rows ELSE rows END,
                        sha256 = coalesce($3, sha256),
                        rows = coalesce($4, rows)
                  WHERE org_id = $1 AND batch_id = $2 AND state = 'dead'
                 RETURNING org_id, batch_id
             ), wake AS (
                 INSERT INTO outbox (topic, payload)
                 SELECT 'buffer', jsonb_build_object('org_id', org_id, 'batch_id', batch_id) FROM up
             )
             SELECT EXISTS (SELECT 1 FROM up) AS "replayed!""#,
            org_id,
            batch_id,
            sha,
            rows,
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(replayed)
    }

    /// Deletes the records of dead batches matching `filter`; their objects
    /// become unreferenced and retention removes them past its floor.
    pub async fn purge_dead_batches(&self, filter: &DeadFilter) -> Result<u64, StoreError> {
        let done = sqlx::query!(
            "DELETE FROM buffer_publishes b
              WHERE b.state = 'dead'
                AND ($1::uuid IS NULL OR b.org_id = $1)
                AND ($2::text IS NULL OR b.dataset = $2)
                AND (cardinality($3::uuid[]) = 0 OR b.batch_id = ANY($3))",
            filter.org_id,
            filter.dataset.as_deref(),
            &filter.batch_ids,
        )
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    /// Writes a new pointer for batches still pending `after` their latest
    /// one (lost, or dead-lettered by the queue after too many receives):
    /// the queue is a hint, the batch row is the truth. At most `limit`.
    pub async fn repoint_stale_batches(
        &self,
        after: Duration,
        limit: u32,
    ) -> Result<u64, StoreError> {
        let n: i64 = sqlx::query_scalar!(
            r#"WITH stale AS (
                 SELECT org_id, batch_id FROM buffer_publishes
                  WHERE state = 'pending'
                    AND pointer_at < now() - make_interval(secs => $1::double precision / 1000)
                  ORDER BY pointer_at LIMIT $2
                    FOR UPDATE SKIP LOCKED
             ), up AS (
                 UPDATE buffer_publishes b SET pointer_at = now()
                   FROM stale s WHERE b.org_id = s.org_id AND b.batch_id = s.batch_id
                 RETURNING b.org_id, b.batch_id
             ), wake AS (
                 INSERT INTO outbox (topic, payload)
                 SELECT 'buffer', jsonb_build_object('org_id', org_id, 'batch_id', batch_id) FROM up
             )
             SELECT count(*) AS "n!" FROM up"#,
            crate::millis(after) as f64,
            i64::from(limit),
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(u64::try_from(n).unwrap_or(0))
    }
}

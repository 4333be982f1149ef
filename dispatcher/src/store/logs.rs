//! Attempt logs (issue 25, migration 0021): where each attempt's captured
//! output is in the object store, and the queue of objects the pruner
//! deletes after their jobs.

use uuid::Uuid;

use super::tasks::fence_error;
use super::{Fence, Store};
use crate::error::StoreError;

/// Where an attempt's stored log is, and its size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredLog {
    pub key: String,
    pub bytes: u64,
    pub dropped_bytes: u64,
}

impl Store {
    /// Records that the fenced attempt's log is stored at `log.key`
    /// (replacing what an earlier upload recorded). The attempt must still
    /// hold its lease: otherwise the fence's error, and nothing changes.
    pub async fn record_log(&self, fence: Fence, log: &StoredLog) -> Result<(), StoreError> {
        let mut conn = self.pool.acquire().await?;
        let done = sqlx::query!(
            "UPDATE attempts a
                SET log_key = $4, log_bytes = $5, log_dropped_bytes = $6
               FROM tasks t
              WHERE a.task_id = $1 AND a.attempt = $3
                AND t.id = a.task_id AND t.job_id = $2 AND t.attempt = $3
                AND t.state = 'leased' AND t.lease_expires_at > clock_timestamp()",
            fence.task_id,
            fence.job_id,
            fence.attempt_i32(),
            log.key,
            i64::try_from(log.bytes).unwrap_or(i64::MAX),
            i64::try_from(log.dropped_bytes).unwrap_or(i64::MAX),
        )
        .execute(&mut *conn)
        .await?;
        if done.rows_affected() == 1 {
            Ok(())
        } else {
            Err(fence_error(&mut conn, fence).await)
        }
    }

    /// The stored log of attempt `attempt` of the org's task, or why there
    /// is none (`NotFound` either way: another org's task is not shown).
    pub async fn attempt_log(
        &self,
        org_id: Uuid,
        job_id: Uuid,
        key: &str,
        attempt: u32,
    ) -> Result<StoredLog, StoreError> {
        let row = sqlx::query!(
            r#"SELECT a.attempt AS "attempt?", a.log_key, a.log_bytes, a.log_dropped_bytes
                 FROM task_specs s
                 JOIN jobs j ON j.id = s.job_id
                 LEFT JOIN attempts a ON a.task_id = s.task_id AND a.attempt = $4
                WHERE s.job_id = $1 AND s.key = $2 AND j.org_id = $3"#,
            job_id,
            key,
            org_id,
            i32::try_from(attempt).unwrap_or(i32::MAX),
        )
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("job {job_id} has no task {key:?}")))?;
        if row.attempt.is_none() {
            return Err(StoreError::NotFound(format!(
                "task {key:?} has no attempt {attempt}"
            )));
        }
        match (row.log_key, row.log_bytes) {
            (Some(key), Some(bytes)) => Ok(StoredLog {
                key,
                bytes: bytes as u64,
                dropped_bytes: row.log_dropped_bytes.unwrap_or(0) as u64,
            }),
            _ => Err(StoreError::NotFound(format!(
                "attempt {attempt} of task {key:?} has no log: it is still running, printed \
                 nothing, or its worker stored none"
            ))),
        }
    }

    /// Up to `limit` objects queued for deletion, oldest first. Two
    /// pruners may take the same keys: deleting an object twice is
    /// harmless.
    pub async fn object_deletions(&self, limit: u32) -> Result<Vec<String>, StoreError> {
        Ok(sqlx::query_scalar!(
            "SELECT key FROM object_deletions ORDER BY enqueued_at, key LIMIT $1",
            i64::from(limit),
        )
        .fetch_all(&self.pool)
        .await?)
    }

    /// Forgets queued deletions that are done.
    pub async fn forget_object_deletions(&self, keys: &[String]) -> Result<(), StoreError> {
        sqlx::query!(
            "DELETE FROM object_deletions WHERE key = ANY($1)",
            keys as &[String],
        )
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}

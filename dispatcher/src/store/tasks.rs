//! The task lifecycle: claim, heartbeat, events, buffer publishes,
//! completion and lease expiry.
//!
//! Every write made on behalf of an attempt carries the fence
//! `id = $task AND job_id = $job AND attempt = $attempt AND state = 'leased'
//! AND lease_expires_at > clock_timestamp()` in the same statement as the write (ADR
//! 0001). Zero rows means the caller lost; [`fence_error`] then says how.
//! Postgres' clock is the only clock leases are judged by (ADR 0003); a
//! fence reads it with `clock_timestamp()`, the moment of the write, not
//! `now()`, which is the start of the transaction and may be long past
//! after a wait on a lock.
//!
//! The lifecycle is split by concern: `claim` (taking leases), `attempt_writes`
//! (heartbeats, events, buffer publishes), `completion`, and `transitions`
//! (what a state change causes, and lease expiry). This module holds what
//! they share: the fence and its error.

use std::time::Duration;

use chrono::{DateTime, Utc};
use dispatcher_wire::{TaskSpec, TaskState};
use sqlx::PgConnection;
use uuid::Uuid;

use super::Store;
use crate::error::{task_state, StoreError};

/// A granted lease: what the claim answers and what the token is minted for.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub task_id: Uuid,
    pub job_id: Uuid,
    pub org_id: Uuid,
    pub attempt: u32,
    pub lease: Duration,
    pub lease_expires_at: DateTime<Utc>,
    pub spec: TaskSpec,
    /// Seconds the task could have been claimed before this claim (since it
    /// became ready, or its last lease expired), by the database's clock.
    pub queued_seconds: f64,
    /// The job's trace context (ADR 0023).
    pub traceparent: Option<String>,
}

/// The identity a capability token speaks for. Every fenced write names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fence {
    pub task_id: Uuid,
    pub job_id: Uuid,
    pub attempt: u32,
}

impl Fence {
    pub(super) fn attempt_i32(&self) -> i32 {
        i32::try_from(self.attempt).unwrap_or(i32::MAX)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct LeaseRenewal {
    pub lease_expires_at: DateTime<Utc>,
    pub cancel_requested: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventsOutcome {
    pub accepted: u32,
    pub duplicates: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishOutcome {
    /// Recorded now.
    Accepted,
    /// The same batch was recorded before; nothing changed.
    Duplicate,
}

pub(super) fn secs_i32(d: Duration) -> i32 {
    i32::try_from(d.as_secs().max(1)).unwrap_or(i32::MAX)
}

pub(super) fn to_u32(n: i32) -> u32 {
    u32::try_from(n).unwrap_or(0)
}

/// Explains why a fenced write matched no row. Read-only.
struct FenceRow {
    state: String,
    attempt: i32,
    job_id: Uuid,
    live: bool,
    outcome: Option<String>,
}

pub(crate) async fn fence_error(conn: &mut PgConnection, fence: Fence) -> StoreError {
    let row = sqlx::query_as!(
        FenceRow,
        r#"SELECT t.state, t.attempt, t.job_id,
                  coalesce(t.lease_expires_at > clock_timestamp(), false) AS "live!",
                  a.outcome
             FROM tasks t
             LEFT JOIN attempts a ON a.task_id = t.id AND a.attempt = $2
            WHERE t.id = $1"#,
        fence.task_id,
        fence.attempt_i32(),
    )
    .fetch_optional(&mut *conn)
    .await;
    let FenceRow {
        state,
        attempt: current,
        job_id,
        live,
        outcome,
    } = match row {
        Ok(Some(r)) => r,
        Ok(None) => return StoreError::TaskNotFound(fence.task_id),
        Err(e) => return StoreError::Db(e),
    };
    let current = to_u32(current);
    if job_id != fence.job_id || current < fence.attempt {
        return StoreError::Forbidden(format!(
            "token does not match task {} (job or attempt unknown)",
            fence.task_id
        ));
    }
    if current > fence.attempt {
        return StoreError::StaleAttempt {
            task_id: fence.task_id,
            attempt: fence.attempt,
            current,
        };
    }
    match (state.as_str(), outcome.as_deref()) {
        ("leased", None) if !live => StoreError::LeaseExpired {
            task_id: fence.task_id,
            attempt: fence.attempt,
        },
        (_, Some("lease_expired")) => StoreError::LeaseExpired {
            task_id: fence.task_id,
            attempt: fence.attempt,
        },
        ("leased", None) => {
            // The fence failed but the lease looks live now: only a
            // concurrent change can do that. Nothing was written; retryable.
            StoreError::Retry(format!(
                "task {} changed while this call ran; nothing was written, retry",
                fence.task_id
            ))
        }
        (state, _) => StoreError::AttemptFinished {
            task_id: fence.task_id,
            attempt: fence.attempt,
            state: state.to_owned(),
        },
    }
}

impl Store {
    /// A task's current state, if the task exists.
    pub async fn task_state(&self, task_id: Uuid) -> Result<Option<TaskState>, StoreError> {
        let state = sqlx::query_scalar!("SELECT state FROM tasks WHERE id = $1", task_id)
            .fetch_optional(&self.pool)
            .await?;
        state.as_deref().map(task_state).transpose()
    }

    /// When the fenced attempt's lease ends, if the fence holds now (the
    /// end bounds what a session credential may do, review H1).
    pub async fn lease_end(&self, fence: Fence) -> Result<DateTime<Utc>, StoreError> {
        let mut conn = self.pool.acquire().await?;
        let end = sqlx::query_scalar!(
            "SELECT lease_expires_at AS \"end!\" FROM tasks
              WHERE id = $1 AND job_id = $2 AND attempt = $3
                AND state = 'leased' AND lease_expires_at > clock_timestamp()",
            fence.task_id,
            fence.job_id,
            fence.attempt_i32(),
        )
        .fetch_optional(&mut *conn)
        .await?;
        match end {
            Some(end) => Ok(end),
            None => Err(fence_error(&mut conn, fence).await),
        }
    }

    /// Whether the fence holds now (the current attempt, its lease live):
    /// for calls that write nothing here but act for the attempt (minting
    /// presigned URLs).
    pub async fn check_fence(&self, fence: Fence) -> Result<(), StoreError> {
        let mut conn = self.pool.acquire().await?;
        let live = sqlx::query_scalar!(
            "SELECT 1 AS one FROM tasks
              WHERE id = $1 AND job_id = $2 AND attempt = $3
                AND state = 'leased' AND lease_expires_at > clock_timestamp()",
            fence.task_id,
            fence.job_id,
            fence.attempt_i32(),
        )
        .fetch_optional(&mut *conn)
        .await?;
        match live {
            Some(_) => Ok(()),
            None => Err(fence_error(&mut conn, fence).await),
        }
    }
}

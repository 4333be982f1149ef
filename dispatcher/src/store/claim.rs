//! Claims: taking a task's lease for a new attempt (one, given ones, or
//! ready ones), and why a claim was refused.

use std::time::Duration;

use chrono::{DateTime, Utc};
use dispatcher_wire::{Runtime, TaskSpec};
use serde_json::Value;
use uuid::Uuid;

use super::tasks::*;
use super::Store;
use crate::error::StoreError;

/// Which tasks a claim takes.
#[derive(Debug, Clone, Copy)]
pub enum Pick<'a> {
    /// These tasks, each if it is claimable.
    Ids(&'a [Uuid]),
    /// Up to this many ready tasks of any job, of these runtimes only
    /// when given (what the claiming worker can run).
    Ready(u32, Option<&'a [dispatcher_wire::Runtime]>),
}

struct ClaimRow {
    task_id: Uuid,
    job_id: Uuid,
    attempt: i32,
    lease_expires_at: DateTime<Utc>,
    key: String,
    runtime: String,
    bundle: String,
    inputs: Value,
    outputs: Vec<String>,
    reads: Vec<String>,
    org_id: Uuid,
    timeout_seconds: Option<i32>,
    queued_seconds: f64,
    traceparent: Option<String>,
}

struct RefusalRow {
    state: String,
    attempt: i32,
    max_attempts: i32,
    pending_deps: i32,
    cancel_requested: bool,
    not_before: Option<DateTime<Utc>>,
    lease_expires_at: Option<DateTime<Utc>>,
    expired: bool,
}

impl Store {
    /// Claims a task for a new attempt. Succeeds when the task is `ready`
    /// (and past its retry backoff) or `leased` with an expired lease, while
    /// attempts remain. Commits at once; no transaction outlives the call.
    pub async fn claim(
        &self,
        task_id: Uuid,
        worker_id: &str,
        lease: Duration,
    ) -> Result<Claimed, StoreError> {
        match self
            .claim_many(Pick::Ids(&[task_id]), worker_id, lease)
            .await?
            .pop()
        {
            Some(c) => Ok(c),
            None => Err(self.claim_refusal(task_id).await),
        }
    }

    /// Claims, in one statement (one transaction), every claimable task of
    /// `pick`: the given ids (those not claimable are simply absent from
    /// the answer; `claim_refusal` says why), or up to N ready tasks of any
    /// job, skipping rows other claims hold.
    pub async fn claim_many(
        &self,
        pick: Pick<'_>,
        worker_id: &str,
        lease: Duration,
    ) -> Result<Vec<Claimed>, StoreError> {
        let (ids, limit, runtimes): (Vec<Uuid>, i64, Option<Vec<String>>) = match pick {
            Pick::Ids(ids) => (ids.to_vec(), 0, None),
            Pick::Ready(n, runtimes) => (
                Vec::new(),
                i64::from(n),
                runtimes.map(|r| r.iter().map(|r| r.as_str().to_owned()).collect()),
            ),
        };
        // Take the lease (incrementing the attempt), end a reclaimed expired
        // attempt, record the new one, and read what the worker needs.
        let granted = sqlx::query_as!(
            ClaimRow,
            r#"WITH ready AS (
                 SELECT id FROM tasks
                  WHERE $4::bigint > 0 AND state = 'ready' AND NOT cancel_requested
                    AND attempt < max_attempts
                    -- Written so that no index on not_before matches: the
                    -- oldest first, read in order from tasks_ready_fifo_idx,
                    -- whatever the statistics say (migration 0012).
                    AND coalesce(not_before, '-infinity') <= now()
                    AND ($5::text[] IS NULL OR EXISTS (
                          SELECT 1 FROM task_specs s
                           WHERE s.task_id = tasks.id AND s.runtime = ANY($5::text[])))
                    -- Not of a paused runtime of its org (migration 0019).
                    AND (NOT EXISTS (SELECT 1 FROM paused_runtimes)
                         OR NOT EXISTS (SELECT 1 FROM paused_runtimes p
                                          JOIN jobs j ON j.org_id = p.org_id
                                          JOIN task_specs s ON s.runtime = p.runtime
                                         WHERE j.id = tasks.job_id AND s.task_id = tasks.id))
                  ORDER BY updated_at LIMIT $4::bigint
                    FOR UPDATE SKIP LOCKED
             ), picked AS (
                 SELECT unnest($1::uuid[]) AS id
                 UNION ALL
                 SELECT id FROM ready
             ), was AS (
                 -- Since when each picked task could be claimed, read from
                 -- the statement's snapshot (before the update below): the
                 -- queued-to-claimed histogram's start.
                 SELECT id AS was_id,
                        CASE WHEN state = 'leased' THEN lease_expires_at
                             ELSE greatest(updated_at, not_before) END AS since
                   FROM tasks WHERE id IN (SELECT id FROM picked)
             ), claimed AS (
                 UPDATE tasks
                    SET state = 'leased', attempt = attempt + 1, lease_seconds = $2::int,
                        lease_expires_at = now() + $2::int * interval '1 second',
                        not_before = NULL, updated_at = now()
                   FROM was
                  WHERE tasks.id = was.was_id AND tasks.id IN (SELECT id FROM picked)
                    AND attempt < max_attempts
                    AND NOT cancel_requested
                    AND ((state = 'ready' AND (not_before IS NULL OR not_before <= now()))
                      OR (state = 'leased' AND lease_expires_at <= now()))
                    AND (NOT EXISTS (SELECT 1 FROM paused_runtimes)
                         OR NOT EXISTS (SELECT 1 FROM paused_runtimes p
                                          JOIN jobs j ON j.org_id = p.org_id
                                          JOIN task_specs s ON s.runtime = p.runtime
                                         WHERE j.id = tasks.job_id AND s.task_id = tasks.id))
              RETURNING tasks.id, tasks.job_id, tasks.attempt, tasks.lease_expires_at,
                        greatest(extract(epoch FROM now() - was.since), 0)::float8 AS queued_seconds
             ), ended AS (
                 UPDATE attempts a SET finished_at = now(), outcome = 'lease_expired'
                   FROM claimed c
                  WHERE a.task_id = c.id AND a.attempt = c.attempt - 1 AND a.finished_at IS NULL
             ), recorded AS (
                 INSERT INTO attempts (task_id, attempt, worker_id)
                 SELECT id, attempt, $3 FROM claimed
             )
             SELECT c.id AS "task_id!", c.job_id AS "job_id!", c.attempt AS "attempt!",
                    c.lease_expires_at AS "lease_expires_at!",
                    s.key, s.runtime, s.bundle, s.inputs, s.outputs, s.reads, j.org_id,
                    s.timeout_seconds, c.queued_seconds AS "queued_seconds!", j.traceparent
               FROM claimed c
               JOIN task_specs s ON s.task_id = c.id
               JOIN jobs j ON j.id = c.job_id"#,
            &ids,
            secs_i32(lease),
            worker_id,
            limit,
            runtimes.as_deref(),
        )
        .fetch_all(&self.pool)
        .await?;
        if !granted.is_empty() {
            self.settings.failpoint("claim_after_commit");
        }
        granted
            .into_iter()
            .map(|row| {
                let runtime = Runtime::parse(&row.runtime).ok_or_else(|| {
                    StoreError::Db(sqlx::Error::Decode(
                        format!("unknown runtime {:?}", row.runtime).into(),
                    ))
                })?;
                Ok(Claimed {
                    task_id: row.task_id,
                    job_id: row.job_id,
                    org_id: row.org_id,
                    attempt: to_u32(row.attempt),
                    lease,
                    lease_expires_at: row.lease_expires_at,
                    queued_seconds: row.queued_seconds,
                    traceparent: row.traceparent,
                    spec: TaskSpec {
                        key: row.key,
                        runtime,
                        bundle: row.bundle,
                        inputs: row.inputs,
                        outputs: row.outputs,
                        reads: row.reads,
                        timeout_seconds: row
                            .timeout_seconds
                            .and_then(|t| u32::try_from(t).ok())
                            .unwrap_or(0),
                    },
                })
            })
            .collect()
    }

    /// How long until the earliest retry backoff of a ready task ends, by
    /// the database's clock (zero if it ended in the last 100 ms, so one
    /// that ended while its notification travelled is not missed); `None`
    /// when no ready task waits for one. Reads `tasks_retry_due_idx`
    /// (migration 0013), so its cost does not grow with the backlog.
    pub async fn next_retry_due(&self) -> Result<Option<Duration>, StoreError> {
        let ms = sqlx::query_scalar!(
            "SELECT extract(epoch FROM min(not_before) - now())::float8 * 1000 AS ms FROM tasks
              WHERE state = 'ready' AND not_before > now() - interval '100 milliseconds'",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(ms.map(|ms| Duration::from_millis(ms.max(0.0).ceil() as u64)))
    }

    /// Why a claim matched no row. An expired lease that cannot be reclaimed
    /// (out of attempts, or cancel requested) is ended here, by the same rules
    /// as the lease reaper, so the task does not linger as `leased`.
    pub async fn claim_refusal(&self, task_id: Uuid) -> StoreError {
        let row = sqlx::query_as!(
            RefusalRow,
            r#"SELECT state, attempt, max_attempts, pending_deps, cancel_requested, not_before,
                      lease_expires_at, coalesce(lease_expires_at <= now(), false) AS "expired!"
                 FROM tasks WHERE id = $1"#,
            task_id,
        )
        .fetch_optional(&self.pool)
        .await;
        let RefusalRow {
            state,
            attempt,
            max_attempts,
            pending_deps: pending,
            cancel_requested: cancel,
            not_before,
            lease_expires_at: lease_until,
            expired,
        } = match row {
            Ok(Some(r)) => r,
            Ok(None) => return StoreError::TaskNotFound(task_id),
            Err(e) => return StoreError::Db(e),
        };
        let reason = match state.as_str() {
            "leased" if expired => {
                if let Err(e) = self.expire_lease(task_id).await {
                    return e;
                }
                if cancel {
                    "its job was stopped; the task is now cancelled".to_owned()
                } else {
                    format!("the lease expired and all {max_attempts} attempts are used; the task has failed")
                }
            }
            "leased" => format!(
                "attempt {attempt} holds a live lease until {}",
                lease_until.map(|t| t.to_rfc3339()).unwrap_or_default()
            ),
            "blocked" => format!("waiting for {pending} unfinished dependencies"),
            "ready" if not_before.is_some() => format!(
                "retry backoff until {}",
                not_before.map(|t| t.to_rfc3339()).unwrap_or_default()
            ),
            "ready" => match self.paused_runtime_of(task_id).await {
                Ok(Some(runtime)) => format!(
                    "runtime {runtime:?} is paused in this org (DELETE /v1/pauses/{runtime} resumes it)"
                ),
                Ok(None) => "the task changed concurrently; try again".to_owned(),
                Err(e) => return e,
            },
            other => format!("the task is {other}"),
        };
        StoreError::NotClaimable { task_id, reason }
    }
}

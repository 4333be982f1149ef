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

use std::time::Duration;

use chrono::{DateTime, Utc};
use dispatcher_wire::{CommittedVersion, CompleteResponse, Runtime, TaskSpec, TaskState};
use serde_json::Value;
use sqlx::PgConnection;
use uuid::Uuid;

use super::Store;
use crate::domain::{Completion, NewBufferBatch, NewEvent};
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
}

/// The identity a capability token speaks for. Every fenced write names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fence {
    pub task_id: Uuid,
    pub job_id: Uuid,
    pub attempt: u32,
}

impl Fence {
    fn attempt_i32(&self) -> i32 {
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

fn secs_i32(d: Duration) -> i32 {
    i32::try_from(d.as_secs().max(1)).unwrap_or(i32::MAX)
}

fn to_u32(n: i32) -> u32 {
    u32::try_from(n).unwrap_or(0)
}

/// Explains why a fenced write matched no row. Read-only.
#[derive(sqlx::FromRow)]
struct FenceRow {
    state: String,
    attempt: i32,
    job_id: Uuid,
    live: bool,
    outcome: Option<String>,
}

pub(crate) async fn fence_error(conn: &mut PgConnection, fence: Fence) -> StoreError {
    let row: Result<Option<FenceRow>, _> = sqlx::query_as(
        "SELECT t.state, t.attempt, t.job_id,
                coalesce(t.lease_expires_at > clock_timestamp(), false) AS live,
                a.outcome
           FROM tasks t
           LEFT JOIN attempts a ON a.task_id = t.id AND a.attempt = $2
          WHERE t.id = $1",
    )
    .bind(fence.task_id)
    .bind(fence.attempt_i32())
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

/// Writes one wake-up per task into the outbox, in the caller's transaction.
pub(crate) async fn enqueue_wakeups(
    conn: &mut PgConnection,
    task_ids: &[Uuid],
    available_at: Option<DateTime<Utc>>,
) -> Result<(), sqlx::Error> {
    if task_ids.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO outbox (topic, payload, available_at)
         SELECT 'wakeup', jsonb_build_object('task_id', id), coalesce($2, now())
           FROM unnest($1::uuid[]) AS id",
    )
    .bind(task_ids)
    .bind(available_at)
    .execute(conn)
    .await?;
    Ok(())
}

/// Locks a job row; the first lock of every multi-row transaction.
pub(crate) async fn lock_job(
    conn: &mut PgConnection,
    job_id: Uuid,
) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT state FROM jobs WHERE id = $1 FOR NO KEY UPDATE")
        .bind(job_id)
        .fetch_optional(conn)
        .await
}

/// Ends a running job as `failed` or `cancelled`: unstarted tasks are
/// cancelled at once, leased ones are asked to stop (their heartbeat answers
/// `cancel_requested: true`; the worker then completes them as cancelled,
/// or their lease runs out and the reaper cancels them).
///
/// One statement: a task that leaves `leased` concurrently (a lease expiry
/// turning it `ready` for a retry) is either seen by it as `ready` and
/// cancelled, or sees `cancel_requested` itself and ends cancelled. With
/// several statements a retry could slip between them and run inside an
/// ended job.
pub(crate) async fn end_job(
    conn: &mut PgConnection,
    job_id: Uuid,
    state: &'static str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "WITH ended AS (
             UPDATE jobs SET state = $2, finished_at = now()
              WHERE id = $1 AND state = 'running'
          RETURNING id
         )
         UPDATE tasks t
            SET state = CASE WHEN t.state = 'leased' THEN 'leased' ELSE 'cancelled' END,
                cancel_requested = true,
                not_before = NULL,
                updated_at = now()
           FROM ended
          WHERE t.job_id = ended.id AND t.state IN ('blocked', 'ready', 'leased')",
    )
    .bind(job_id)
    .bind(state)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// The consequences of a task reaching `state`, in the same transaction:
/// release dependants and wake them, schedule a retry's wake-up, or end the
/// job. The job row must already be locked by the caller.
async fn after_transition(
    conn: &mut PgConnection,
    task_id: Uuid,
    job_id: Uuid,
    state: TaskState,
    retry_at: Option<DateTime<Utc>>,
) -> Result<(), sqlx::Error> {
    match state {
        TaskState::Succeeded => {
            let dependants: Vec<(Uuid, String)> = sqlx::query_as(
                "UPDATE tasks t
                    SET pending_deps = t.pending_deps - 1,
                        state = CASE WHEN t.pending_deps = 1 THEN 'ready' ELSE t.state END,
                        updated_at = now()
                   FROM task_deps d
                  WHERE d.depends_on = $1 AND t.id = d.task_id AND t.state = 'blocked'
              RETURNING t.id, t.state",
            )
            .bind(task_id)
            .fetch_all(&mut *conn)
            .await?;
            let released: Vec<Uuid> = dependants
                .into_iter()
                .filter(|(_, s)| s == "ready")
                .map(|(id, _)| id)
                .collect();
            enqueue_wakeups(conn, &released, None).await?;
            sqlx::query(
                "UPDATE jobs
                    SET tasks_unfinished = tasks_unfinished - 1,
                        state = CASE WHEN tasks_unfinished = 1 AND state = 'running'
                                     THEN 'succeeded' ELSE state END,
                        finished_at = CASE WHEN tasks_unfinished = 1 AND state = 'running'
                                           THEN now() ELSE finished_at END
                  WHERE id = $1",
            )
            .bind(job_id)
            .execute(&mut *conn)
            .await?;
        }
        TaskState::Ready => enqueue_wakeups(conn, &[task_id], retry_at).await?,
        TaskState::Failed => end_job(conn, job_id, "failed").await?,
        TaskState::Cancelled | TaskState::Blocked | TaskState::Leased => {}
    }
    Ok(())
}

/// Commits one new version of each dataset the attempt staged parts for,
/// inside the completion's transaction (after its fenced task update).
/// Dataset rows are locked in id order (`FOR UPDATE`), which serialises
/// concurrent commits to one dataset: no appender loses parts, and version
/// numbers have no gaps. A staged dataset without a written manifest (parts
/// staged while the completion ran) aborts the whole completion, retryably.
async fn commit_versions(
    conn: &mut PgConnection,
    fence: Fence,
    manifests: &[super::datasets::WrittenManifest],
) -> Result<Vec<CommittedVersion>, StoreError> {
    let attempt = fence.attempt_i32();
    let staged: Vec<(Uuid, String, String)> = sqlx::query_as(
        "SELECT DISTINCT s.dataset_id, d.name, d.mode
           FROM staged_parts s JOIN datasets d ON d.id = s.dataset_id
          WHERE s.task_id = $1 AND s.attempt = $2
          ORDER BY s.dataset_id",
    )
    .bind(fence.task_id)
    .bind(attempt)
    .fetch_all(&mut *conn)
    .await?;
    let mut committed = Vec::with_capacity(staged.len());
    for (dataset_id, name, mode) in staged {
        let Some(manifest) = manifests.iter().find(|m| m.dataset_id == dataset_id) else {
            return Err(StoreError::Retry(format!(
                "parts of dataset {name:?} were staged while the completion ran; nothing was \
                 committed, retry"
            )));
        };
        let current: Option<i32> =
            sqlx::query_scalar("SELECT current_version FROM datasets WHERE id = $1 FOR UPDATE")
                .bind(dataset_id)
                .fetch_one(&mut *conn)
                .await?;
        let version = current.unwrap_or(0) + 1;
        sqlx::query(
            "INSERT INTO dataset_versions (dataset_id, version, parent, task_id, attempt, rows, manifest_key)
             SELECT $1, $2, $3, $4, $5,
                    coalesce((SELECT rows FROM dataset_versions
                               WHERE $6 = 'append' AND dataset_id = $1 AND version = $3), 0)
                    + coalesce(sum(s.rows), 0),
                    $7
               FROM staged_parts s
              WHERE s.task_id = $4 AND s.attempt = $5 AND s.dataset_id = $1",
        )
        .bind(dataset_id)
        .bind(version)
        .bind(current)
        .bind(fence.task_id)
        .bind(attempt)
        .bind(&mode)
        .bind(&manifest.key)
        .execute(&mut *conn)
        .await?;
        sqlx::query(
            "INSERT INTO dataset_parts (dataset_id, version, key, rows, bytes, sha256)
             SELECT $1, $2, key, rows, bytes, sha256 FROM staged_parts
              WHERE task_id = $3 AND attempt = $4 AND dataset_id = $1",
        )
        .bind(dataset_id)
        .bind(version)
        .bind(fence.task_id)
        .bind(attempt)
        .execute(&mut *conn)
        .await?;
        sqlx::query("UPDATE datasets SET current_version = $2 WHERE id = $1")
            .bind(dataset_id)
            .bind(version)
            .execute(&mut *conn)
            .await?;
        committed.push(CommittedVersion {
            dataset: name,
            version: u32::try_from(version).unwrap_or(0),
        });
    }
    Ok(committed)
}

/// Which tasks a claim takes.
#[derive(Debug, Clone, Copy)]
pub enum Pick<'a> {
    /// These tasks, each if it is claimable.
    Ids(&'a [Uuid]),
    /// Up to this many ready tasks of any job.
    Ready(u32),
}

#[derive(sqlx::FromRow)]
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
}

#[derive(sqlx::FromRow)]
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
    /// A task's current state, if the task exists.
    pub async fn task_state(&self, task_id: Uuid) -> Result<Option<TaskState>, StoreError> {
        let state: Option<String> = sqlx::query_scalar("SELECT state FROM tasks WHERE id = $1")
            .bind(task_id)
            .fetch_optional(&self.pool)
            .await?;
        state.as_deref().map(task_state).transpose()
    }

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
        let (ids, limit): (Vec<Uuid>, i64) = match pick {
            Pick::Ids(ids) => (ids.to_vec(), 0),
            Pick::Ready(n) => (Vec::new(), i64::from(n)),
        };
        // Take the lease (incrementing the attempt), end a reclaimed expired
        // attempt, record the new one, and read what the worker needs.
        let granted: Vec<ClaimRow> = sqlx::query_as(
            "WITH ready AS (
                 SELECT id FROM tasks
                  WHERE $4 > 0 AND state = 'ready' AND NOT cancel_requested
                    AND attempt < max_attempts AND (not_before IS NULL OR not_before <= now())
                  ORDER BY updated_at LIMIT $4
                    FOR UPDATE SKIP LOCKED
             ), picked AS (
                 SELECT unnest($1::uuid[]) AS id
                 UNION ALL
                 SELECT id FROM ready
             ), claimed AS (
                 UPDATE tasks
                    SET state = 'leased', attempt = attempt + 1, lease_seconds = $2,
                        lease_expires_at = now() + $2 * interval '1 second',
                        not_before = NULL, updated_at = now()
                  WHERE id IN (SELECT id FROM picked)
                    AND attempt < max_attempts
                    AND NOT cancel_requested
                    AND ((state = 'ready' AND (not_before IS NULL OR not_before <= now()))
                      OR (state = 'leased' AND lease_expires_at <= now()))
              RETURNING id, job_id, attempt, lease_expires_at
             ), ended AS (
                 UPDATE attempts a SET finished_at = now(), outcome = 'lease_expired'
                   FROM claimed c
                  WHERE a.task_id = c.id AND a.attempt = c.attempt - 1 AND a.finished_at IS NULL
             ), recorded AS (
                 INSERT INTO attempts (task_id, attempt, worker_id)
                 SELECT id, attempt, $3 FROM claimed
             )
             SELECT c.id AS task_id, c.job_id, c.attempt, c.lease_expires_at,
                    s.key, s.runtime, s.bundle, s.inputs, s.outputs, s.reads, j.org_id,
                    s.timeout_seconds
               FROM claimed c
               JOIN task_specs s ON s.task_id = c.id
               JOIN jobs j ON j.id = c.job_id",
        )
        .bind(&ids)
        .bind(secs_i32(lease))
        .bind(worker_id)
        .bind(limit)
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

    /// Why a claim matched no row. An expired lease that cannot be reclaimed
    /// (out of attempts, or cancel requested) is ended here, by the same rules
    /// as the lease reaper, so the task does not linger as `leased`.
    pub async fn claim_refusal(&self, task_id: Uuid) -> StoreError {
        let row: Result<Option<RefusalRow>, _> = sqlx::query_as(
            "SELECT state, attempt, max_attempts, pending_deps, cancel_requested, not_before,
                    lease_expires_at, coalesce(lease_expires_at <= now(), false) AS expired
               FROM tasks WHERE id = $1",
        )
        .bind(task_id)
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
            "ready" => "the task changed concurrently; try again".to_owned(),
            other => format!("the task is {other}"),
        };
        StoreError::NotClaimable { task_id, reason }
    }

    /// Ends an expired lease by the rules of a retryable failure: a retry
    /// (with backoff) while attempts remain, else the task and its job fail;
    /// a task whose job was stopped becomes cancelled. Returns the new state,
    /// or `None` when the lease was not (or no longer) expired.
    pub async fn expire_lease(&self, task_id: Uuid) -> Result<Option<TaskState>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let Some((job_id, attempt, max_attempts)): Option<(Uuid, i32, i32)> =
            sqlx::query_as("SELECT job_id, attempt, max_attempts FROM tasks WHERE id = $1")
                .bind(task_id)
                .fetch_optional(&mut *tx)
                .await?
        else {
            return Err(StoreError::TaskNotFound(task_id));
        };
        // Only a final failure touches the job row (to end the job), so only
        // then is the job lock taken, first as the lock order demands. A
        // retry or a cancellation changes the task alone.
        if attempt >= max_attempts {
            lock_job(&mut tx, job_id).await?;
        }
        let ended: Option<(String, Option<DateTime<Utc>>)> = sqlx::query_as(
            "UPDATE tasks
                SET state = CASE WHEN cancel_requested THEN 'cancelled'
                                 WHEN attempt < max_attempts THEN 'ready'
                                 ELSE 'failed' END,
                    -- Backoff counts from the last sign of life: the silent
                    -- lease already waited lease_seconds of it.
                    not_before = CASE WHEN NOT cancel_requested AND attempt < max_attempts
                                      THEN now() + greatest(0, $3 - lease_seconds * 1000::bigint)
                                                   * interval '1 millisecond' END,
                    lease_expires_at = NULL, updated_at = now()
              WHERE id = $1 AND attempt = $2 AND state = 'leased' AND lease_expires_at <= now()
          RETURNING state, not_before",
        )
        .bind(task_id)
        .bind(attempt)
        .bind(crate::millis(self.retry_delay(attempt)))
        .fetch_optional(&mut *tx)
        .await?;
        let Some((state, retry_at)) = ended else {
            tx.rollback().await?;
            return Ok(None);
        };
        let state = task_state(&state)?;
        sqlx::query(
            "UPDATE attempts SET finished_at = now(), outcome = 'lease_expired'
              WHERE task_id = $1 AND attempt = $2 AND finished_at IS NULL",
        )
        .bind(task_id)
        .bind(attempt)
        .execute(&mut *tx)
        .await?;
        after_transition(&mut tx, task_id, job_id, state, retry_at).await?;
        tx.commit().await?;
        Ok(Some(state))
    }

    /// Whether the fence holds now (the current attempt, its lease live):
    /// for calls that write nothing here but act for the attempt (minting
    /// presigned URLs).
    pub async fn check_fence(&self, fence: Fence) -> Result<(), StoreError> {
        let mut conn = self.pool.acquire().await?;
        let live: Option<i32> = sqlx::query_scalar(
            "SELECT 1 FROM tasks
              WHERE id = $1 AND job_id = $2 AND attempt = $3
                AND state = 'leased' AND lease_expires_at > clock_timestamp()",
        )
        .bind(fence.task_id)
        .bind(fence.job_id)
        .bind(fence.attempt_i32())
        .fetch_optional(&mut *conn)
        .await?;
        match live {
            Some(_) => Ok(()),
            None => Err(fence_error(&mut conn, fence).await),
        }
    }

    /// Extends the lease of the current attempt by its lease duration.
    pub async fn heartbeat(
        &self,
        fence: Fence,
        progress: Option<&Value>,
    ) -> Result<LeaseRenewal, StoreError> {
        self.heartbeat_many(&[(fence, progress)])
            .await?
            .pop()
            .unwrap_or_else(|| Err(StoreError::TaskNotFound(fence.task_id)))
    }

    /// Heartbeats of several attempts in one statement (one transaction),
    /// each fenced on its own: the lease extension and, only where it
    /// passed, the attempt's progress. Answers in order; an entry whose
    /// fence failed gets the fencing error the single call would.
    pub async fn heartbeat_many(
        &self,
        entries: &[(Fence, Option<&Value>)],
    ) -> Result<Vec<Result<LeaseRenewal, StoreError>>, StoreError> {
        let ids: Vec<Uuid> = entries.iter().map(|(f, _)| f.task_id).collect();
        let jobs: Vec<Uuid> = entries.iter().map(|(f, _)| f.job_id).collect();
        let attempts: Vec<i32> = entries.iter().map(|(f, _)| f.attempt_i32()).collect();
        let progress: Vec<Option<&Value>> = entries.iter().map(|(_, p)| *p).collect();
        let mut conn = self.pool.acquire().await?;
        let renewed: Vec<(Uuid, Uuid, i32, DateTime<Utc>, bool)> = sqlx::query_as(
            "WITH f AS (
                 SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::int[], $4::jsonb[])
                          AS f(id, job_id, attempt, progress)
             ), renewed AS (
                 UPDATE tasks t
                    SET lease_expires_at = clock_timestamp() + t.lease_seconds * interval '1 second'
                   FROM (SELECT DISTINCT id, job_id, attempt FROM f) k
                  WHERE t.id = k.id AND t.job_id = k.job_id AND t.attempt = k.attempt
                    AND t.state = 'leased' AND t.lease_expires_at > clock_timestamp()
              RETURNING t.id, t.job_id, t.attempt, t.lease_expires_at, t.cancel_requested
             ), progressed AS (
                 UPDATE attempts a SET progress = p.progress
                   FROM (SELECT DISTINCT ON (f.id) f.id, f.attempt, f.progress
                           FROM f JOIN renewed r ON r.id = f.id AND r.attempt = f.attempt
                          WHERE f.progress IS NOT NULL) p
                  WHERE a.task_id = p.id AND a.attempt = p.attempt
             )
             SELECT id, job_id, attempt, lease_expires_at, cancel_requested FROM renewed",
        )
        .bind(&ids)
        .bind(&jobs)
        .bind(&attempts)
        .bind(&progress)
        .fetch_all(&mut *conn)
        .await?;
        let mut answers = Vec::with_capacity(entries.len());
        for (fence, _) in entries {
            let hit = renewed.iter().find(|(id, job, att, _, _)| {
                *id == fence.task_id && *job == fence.job_id && *att == fence.attempt_i32()
            });
            answers.push(match hit {
                Some((_, _, _, lease_expires_at, cancel_requested)) => Ok(LeaseRenewal {
                    lease_expires_at: *lease_expires_at,
                    cancel_requested: *cancel_requested,
                }),
                None => Err(fence_error(&mut conn, *fence).await),
            });
        }
        Ok(answers)
    }

    /// Stores events once per (task, attempt, seq). A replayed seq with the
    /// same body counts as a duplicate; with another body the whole call is
    /// a conflict and nothing is stored.
    pub async fn record_events(
        &self,
        fence: Fence,
        events: &[NewEvent],
    ) -> Result<EventsOutcome, StoreError> {
        let seqs: Vec<i64> = events.iter().map(|e| e.seq).collect();
        let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
        let payloads: Vec<&Value> = events.iter().map(|e| &e.payload).collect();
        let mut tx = self.pool.begin().await?;
        // The fenced insert and, in the same statement, the attempt's running
        // totals (the attempt row serialises concurrent calls).
        let (live, inserted, events_total, bytes_total): (bool, i64, Option<i32>, Option<i64>) =
            sqlx::query_as(
                "WITH fence AS (
                 SELECT id FROM tasks
                  WHERE id = $1 AND job_id = $2 AND attempt = $3
                    AND state = 'leased' AND lease_expires_at > clock_timestamp()
                    FOR SHARE
             ), ins AS (
                 INSERT INTO task_events (task_id, attempt, seq, kind, payload)
                 SELECT $1, $3, e.seq, e.kind, e.payload
                   FROM unnest($4::bigint[], $5::text[], $6::jsonb[]) AS e(seq, kind, payload)
                  WHERE EXISTS (SELECT 1 FROM fence)
                     ON CONFLICT (task_id, attempt, seq) DO NOTHING
                 RETURNING octet_length(payload::text) AS bytes
             ), totals AS (
                 UPDATE attempts
                    SET events = events + (SELECT count(*) FROM ins),
                        event_bytes = event_bytes + (SELECT coalesce(sum(bytes), 0) FROM ins)
                  WHERE task_id = $1 AND attempt = $3 AND EXISTS (SELECT 1 FROM ins)
              RETURNING events, event_bytes
             )
             SELECT EXISTS (SELECT 1 FROM fence), (SELECT count(*) FROM ins),
                    (SELECT events FROM totals), (SELECT event_bytes FROM totals)",
            )
            .bind(fence.task_id)
            .bind(fence.job_id)
            .bind(fence.attempt_i32())
            .bind(&seqs)
            .bind(&kinds)
            .bind(&payloads)
            .fetch_one(&mut *tx)
            .await?;
        if !live {
            let err = fence_error(&mut tx, fence).await;
            tx.rollback().await?;
            return Err(err);
        }
        let max_events = self.settings.max_events_per_attempt;
        let max_bytes = self.settings.max_event_bytes_per_attempt;
        if events_total.is_some_and(|n| u32::try_from(n).unwrap_or(u32::MAX) > max_events)
            || bytes_total.is_some_and(|b| u64::try_from(b).unwrap_or(u64::MAX) > max_bytes)
        {
            tx.rollback().await?;
            return Err(StoreError::Limit(format!(
                "attempt {} of task {} may store at most {max_events} events and {max_bytes} \
                 bytes of event payloads; this call would pass that, and nothing of it was stored",
                fence.attempt, fence.task_id
            )));
        }
        let inserted = u32::try_from(inserted).unwrap_or(0);
        let total = u32::try_from(events.len()).unwrap_or(u32::MAX);
        if inserted < total {
            let differing: Option<i64> = sqlx::query_scalar(
                "SELECT t.seq FROM task_events t
                   JOIN unnest($3::bigint[], $4::text[], $5::jsonb[]) AS e(seq, kind, payload)
                     ON t.seq = e.seq
                  WHERE t.task_id = $1 AND t.attempt = $2
                    AND (t.kind <> e.kind OR t.payload <> e.payload)
                  LIMIT 1",
            )
            .bind(fence.task_id)
            .bind(fence.attempt_i32())
            .bind(&seqs)
            .bind(&kinds)
            .bind(&payloads)
            .fetch_optional(&mut *tx)
            .await?;
            if let Some(seq) = differing {
                tx.rollback().await?;
                return Err(StoreError::Conflict(format!(
                    "event seq {seq} of attempt {} was already stored with a different body",
                    fence.attempt
                )));
            }
        }
        tx.commit().await?;
        Ok(EventsOutcome {
            accepted: inserted,
            duplicates: total - inserted,
        })
    }

    /// Records a buffer batch once per (org, batch id) and, in the same
    /// statement, the outbox row that hands it to the buffer sink. The
    /// dataset must be one of the org's `stream` datasets.
    ///
    /// A later publish of the same batch id with the same body (dataset,
    /// object key, rows, checksum) by any attempt of the same task changes
    /// nothing; another body is a conflict (contract: "Buffered sinks").
    /// `under_prefix` says whether the object lies under this attempt's
    /// own prefix: only such a publish may record a new batch; a replay of
    /// an earlier attempt's identical publish (whose key lies under that
    /// attempt's prefix) is answered as the duplicate it is.
    pub async fn publish_buffer(
        &self,
        fence: Fence,
        batch: &NewBufferBatch,
        under_prefix: bool,
    ) -> Result<PublishOutcome, StoreError> {
        let mut tx = self.pool.begin().await?;
        let (live, mode, inserted): (bool, Option<String>, bool) = sqlx::query_as(
            "WITH fence AS (
                 SELECT t.id, j.org_id FROM tasks t JOIN jobs j ON j.id = t.job_id
                  WHERE t.id = $1 AND t.job_id = $2 AND t.attempt = $3
                    AND t.state = 'leased' AND t.lease_expires_at > clock_timestamp()
                    FOR SHARE OF t
             ), ds AS (
                 SELECT d.mode FROM datasets d JOIN fence ON d.org_id = fence.org_id
                  WHERE d.name = $5
             ), ins AS (
                 INSERT INTO buffer_publishes
                        (org_id, batch_id, task_id, attempt, dataset, object_key, rows, sha256)
                 SELECT fence.org_id, $4, $1, $3, $5, $6, $7, $8 FROM fence, ds
                  WHERE ds.mode = 'stream' AND $9
                     ON CONFLICT (org_id, batch_id) DO NOTHING
                 RETURNING org_id, batch_id
             ), wake AS (
                 INSERT INTO outbox (topic, payload)
                 SELECT 'buffer', jsonb_build_object('org_id', org_id, 'batch_id', batch_id) FROM ins
             )
             SELECT EXISTS (SELECT 1 FROM fence), (SELECT mode FROM ds), EXISTS (SELECT 1 FROM ins)",
        )
        .bind(fence.task_id)
        .bind(fence.job_id)
        .bind(fence.attempt_i32())
        .bind(batch.batch_id)
        .bind(&batch.dataset)
        .bind(&batch.object_key)
        .bind(batch.rows)
        .bind(&batch.sha256)
        .bind(under_prefix)
        .fetch_one(&mut *tx)
        .await?;
        if !live {
            let err = fence_error(&mut tx, fence).await;
            tx.rollback().await?;
            return Err(err);
        }
        match mode.as_deref() {
            None => {
                return Err(StoreError::NotFound(format!(
                    "no dataset {:?} (create it with POST /v1/datasets, mode stream)",
                    batch.dataset
                )))
            }
            Some("stream") => {}
            Some(other) => {
                return Err(StoreError::Invalid(crate::domain::Invalid::new(
                    "dataset",
                    format!(
                        "{:?} is a {other} dataset; buffer batches go to stream datasets \
                         (stage parts of {other} datasets with /v1/task/dataset-stage)",
                        batch.dataset
                    ),
                )))
            }
        }
        if inserted {
            tx.commit().await?;
            return Ok(PublishOutcome::Accepted);
        }
        // `None`: no such batch; else whether its body is this one (the
        // checksum and row count an operator replay replaced count too).
        let same: Option<bool> = sqlx::query_scalar(
            "SELECT coalesce(b.task_id = $2 AND b.dataset = $3 AND b.object_key = $6
                    AND ((b.sha256 = $5 AND b.rows = $4)
                         OR (b.replaced_sha256 = $5 AND b.replaced_rows = $4)), false)
               FROM buffer_publishes b JOIN tasks t ON t.id = $2 JOIN jobs j ON j.id = t.job_id
              WHERE b.org_id = j.org_id AND b.batch_id = $1",
        )
        .bind(batch.batch_id)
        .bind(fence.task_id)
        .bind(&batch.dataset)
        .bind(batch.rows)
        .bind(&batch.sha256)
        .bind(&batch.object_key)
        .fetch_optional(&mut *tx)
        .await?;
        tx.rollback().await?;
        match same {
            Some(true) => Ok(PublishOutcome::Duplicate),
            Some(false) => Err(StoreError::Conflict(format!(
                "batch {} was already published with a different body",
                batch.batch_id
            ))),
            None => Err(StoreError::Forbidden(
                "object_key must lie under the attempt's own prefix".into(),
            )),
        }
    }

    /// Completes the current attempt. Exactly one completion per attempt is
    /// committed; a replay of it returns the original answer, a different
    /// completion for the same attempt is a conflict.
    /// A `succeeded` completion commits, in its own transaction, one new
    /// version of every dataset the attempt staged parts for; `manifests`
    /// names the manifest written (create-only) for each before the call.
    pub async fn complete(
        &self,
        fence: Fence,
        completion: &Completion,
        manifests: &[super::datasets::WrittenManifest],
    ) -> Result<CompleteResponse, StoreError> {
        self.complete_many(&[(fence, completion, manifests)])
            .await?
            .pop()
            .unwrap_or_else(|| Err(StoreError::TaskNotFound(fence.task_id)))
    }

    /// Completions of several attempts in **one transaction**, each in a
    /// savepoint of its own: an entry that fails (fenced, conflicting, or a
    /// database error of its own) rolls back alone and is answered with the
    /// error the single call would give; a replay is answered after the
    /// commit, from what is then committed. Entries run in job order (the
    /// job row is locked first, as everywhere), answers come in the order
    /// given.
    pub async fn complete_many(
        &self,
        entries: &[(Fence, &Completion, &[super::datasets::WrittenManifest])],
    ) -> Result<Vec<Result<CompleteResponse, StoreError>>, StoreError> {
        let mut order: Vec<usize> = (0..entries.len()).collect();
        order.sort_by_key(|&i| (entries[i].0.job_id, entries[i].0.task_id));
        let mut answers: Vec<Option<Result<CompleteResponse, StoreError>>> =
            (0..entries.len()).map(|_| None).collect();
        let mut replays = Vec::new();
        let mut tx = self.pool.begin().await?;
        for i in order {
            let (fence, completion, manifests) = entries[i];
            let mut entry = sqlx::Connection::begin(&mut *tx).await?;
            match self
                .complete_step(&mut entry, fence, completion, manifests)
                .await
            {
                Ok(Some(response)) => {
                    entry.commit().await?;
                    answers[i] = Some(Ok(response));
                }
                Ok(None) => {
                    entry.rollback().await?;
                    replays.push(i);
                }
                Err(e) => {
                    entry.rollback().await?;
                    answers[i] = Some(Err(e));
                }
            }
        }
        tx.commit().await?;
        if answers.iter().any(|a| matches!(a, Some(Ok(_)))) {
            self.settings.failpoint("complete_after_commit");
        }
        for i in replays {
            let (fence, completion, _) = entries[i];
            answers[i] = Some(self.completion_replay(fence, &completion.to_json()).await);
        }
        Ok(answers
            .into_iter()
            .map(|a| a.unwrap_or_else(|| Err(StoreError::Retry("no answer".into()))))
            .collect())
    }

    /// One completion inside the caller's transaction: `None` when the
    /// fence matched no row (a replay, or a fenced caller: the caller
    /// answers it after its commit).
    async fn complete_step(
        &self,
        tx: &mut PgConnection,
        fence: Fence,
        completion: &Completion,
        manifests: &[super::datasets::WrittenManifest],
    ) -> Result<Option<CompleteResponse>, StoreError> {
        let (succeeded, retryable) = match completion {
            Completion::Succeeded { .. } => (true, false),
            Completion::Failed { retryable, .. } => (false, *retryable),
            Completion::Cancelled => (false, false),
        };
        let canonical = completion.to_json();
        lock_job(&mut *tx, fence.job_id).await?;
        if *completion == Completion::Cancelled {
            // Only a task asked to stop may end as cancelled. The flag only
            // ever goes from false to true, so checking first is safe.
            let asked: Option<bool> = sqlx::query_scalar(
                "SELECT cancel_requested FROM tasks
                  WHERE id = $1 AND job_id = $2 AND attempt = $3 AND state = 'leased'",
            )
            .bind(fence.task_id)
            .bind(fence.job_id)
            .bind(fence.attempt_i32())
            .fetch_optional(&mut *tx)
            .await?;
            if asked == Some(false) {
                return Err(StoreError::Conflict(format!(
                    "task {} was not asked to stop: outcome \"cancelled\" is only for a task \
                     whose heartbeat answered cancel_requested",
                    fence.task_id
                )));
            }
        }
        let ended: Option<(String, Option<DateTime<Utc>>)> = sqlx::query_as(
            "UPDATE tasks
                SET state = CASE WHEN cancel_requested THEN 'cancelled'
                                 WHEN $4 THEN 'succeeded'
                                 WHEN $5 AND attempt < max_attempts THEN 'ready'
                                 ELSE 'failed' END,
                    not_before = CASE WHEN NOT cancel_requested AND NOT $4 AND $5
                                           AND attempt < max_attempts
                                      THEN now() + $6 * interval '1 millisecond' END,
                    lease_expires_at = NULL, updated_at = now()
              WHERE id = $1 AND job_id = $2 AND attempt = $3
                AND state = 'leased' AND lease_expires_at > clock_timestamp()
          RETURNING state, not_before",
        )
        .bind(fence.task_id)
        .bind(fence.job_id)
        .bind(fence.attempt_i32())
        .bind(succeeded)
        .bind(retryable)
        .bind(crate::millis(self.retry_delay(fence.attempt_i32())))
        .fetch_optional(&mut *tx)
        .await?;
        let Some((state, retry_at)) = ended else {
            return Ok(None);
        };
        let state = task_state(&state)?;
        let versions = if state == TaskState::Succeeded {
            commit_versions(&mut *tx, fence, manifests).await?
        } else {
            Vec::new()
        };
        let response = CompleteResponse {
            task_id: fence.task_id,
            attempt: fence.attempt,
            state,
            retry_at,
            versions,
        };
        sqlx::query(
            "UPDATE attempts
                SET finished_at = now(), outcome = $3, completion = $4, response = $5
              WHERE task_id = $1 AND attempt = $2",
        )
        .bind(fence.task_id)
        .bind(fence.attempt_i32())
        .bind(match completion {
            Completion::Succeeded { .. } => "succeeded",
            Completion::Failed { .. } => "failed",
            Completion::Cancelled => "cancelled",
        })
        .bind(&canonical)
        .bind(
            serde_json::to_value(&response)
                .map_err(|e| StoreError::Db(sqlx::Error::Encode(e.into())))?,
        )
        .execute(&mut *tx)
        .await?;
        after_transition(&mut *tx, fence.task_id, fence.job_id, state, retry_at).await?;
        Ok(Some(response))
    }

    /// The answer to a completion whose fence matched no row: the original
    /// answer if this attempt already completed the same way, a conflict if
    /// it completed another way, else the fencing error.
    async fn completion_replay(
        &self,
        fence: Fence,
        canonical: &Value,
    ) -> Result<CompleteResponse, StoreError> {
        let mut conn = self.pool.acquire().await?;
        let earlier: Option<(bool, Value)> = sqlx::query_as(
            "SELECT completion = $3, response FROM attempts
              WHERE task_id = $1 AND attempt = $2 AND completion IS NOT NULL",
        )
        .bind(fence.task_id)
        .bind(fence.attempt_i32())
        .bind(canonical)
        .fetch_optional(&mut *conn)
        .await?;
        match earlier {
            Some((true, response)) => serde_json::from_value(response)
                .map_err(|e| StoreError::Db(sqlx::Error::Decode(e.into()))),
            Some((false, _)) => Err(StoreError::Conflict(format!(
                "attempt {} of task {} already completed with a different result",
                fence.attempt, fence.task_id
            ))),
            None => Err(fence_error(&mut conn, fence).await),
        }
    }
}

//! Retries and bulk actions on jobs (issue 25), each recorded in
//! `job_actions`.
//!
//! A retry reopens a failed or cancelled job: the tasks chosen (every
//! failed and cancelled task of the job, or one task and the job's
//! cancelled ones) go back to `blocked` with their pending dependencies
//! counted again, those with none become `ready` and are woken, and the
//! job runs again (a deadline moves with it). A task that has used all
//! its attempts gets one more (as River's retry does); its attempt counter,
//! the fence, is never reset. A job with a task still leased (a cancel
//! being drained) is refused: it is not finished yet.

use dispatcher_wire as wire;
use serde_json::{json, Value};
use uuid::Uuid;

use super::transitions::{end_job, enqueue_wakeups, lock_job};
use super::Store;
use crate::domain::JobFilter;
use crate::error::StoreError;

/// What a retry reopens.
#[derive(Debug, Clone, Copy)]
pub enum RetryScope<'a> {
    /// Every failed and cancelled task of the job.
    Job,
    /// This task (failed or cancelled) and the job's cancelled tasks.
    Task(&'a str),
}

/// A bulk action: what, on which jobs (`described` is the filter as the
/// caller gave it, for the record), at most how many, and whether only to
/// count.
#[derive(Debug, Clone, Copy)]
pub struct BulkAction<'a> {
    pub action: wire::JobActionKind,
    pub filter: &'a JobFilter,
    pub described: &'a Value,
    pub cap: u32,
    pub dry_run: bool,
}

impl Store {
    /// Retries a job of the org (or one of its tasks), recording who did;
    /// how many tasks run again.
    pub async fn retry(
        &self,
        org_id: Uuid,
        user_id: Option<Uuid>,
        job_id: Uuid,
        scope: RetryScope<'_>,
    ) -> Result<u32, StoreError> {
        let mut tx = self.pool.begin().await?;
        let owner: Option<Uuid> =
            sqlx::query_scalar!("SELECT org_id FROM jobs WHERE id = $1", job_id)
                .fetch_optional(&mut *tx)
                .await?;
        if owner != Some(org_id) {
            return Err(StoreError::JobNotFound(job_id));
        }
        let tasks = self.reopen(&mut tx, job_id, scope).await?;
        let target = match scope {
            RetryScope::Job => json!({"job_id": job_id}),
            RetryScope::Task(key) => json!({"job_id": job_id, "task": key}),
        };
        record(
            &mut tx,
            org_id,
            user_id,
            wire::JobActionKind::Retry,
            &target,
            1,
            tasks,
        )
        .await?;
        tx.commit().await?;
        tracing::info!(%job_id, tasks, "job retried");
        Ok(tasks)
    }

    /// The retry itself, in the caller's transaction.
    async fn reopen(
        &self,
        tx: &mut sqlx::PgConnection,
        job_id: Uuid,
        scope: RetryScope<'_>,
    ) -> Result<u32, StoreError> {
        let state = lock_job(&mut *tx, job_id)
            .await?
            .ok_or(StoreError::JobNotFound(job_id))?;
        if state != "failed" && state != "cancelled" {
            return Err(StoreError::Conflict(format!(
                "job {job_id} is {state}: only a failed or cancelled job can be retried"
            )));
        }
        let states = sqlx::query!(
            r#"SELECT s.key, t.id, t.state FROM tasks t JOIN task_specs s ON s.task_id = t.id
                WHERE t.job_id = $1"#,
            job_id
        )
        .fetch_all(&mut *tx)
        .await?;
        if let Some(t) = states.iter().find(|t| t.state == "leased") {
            return Err(StoreError::Conflict(format!(
                "task {:?} of job {job_id} is still stopping; retry once it has",
                t.key
            )));
        }
        let chosen: Vec<Uuid> = match scope {
            RetryScope::Job => states
                .iter()
                .filter(|t| t.state == "failed" || t.state == "cancelled")
                .map(|t| t.id)
                .collect(),
            RetryScope::Task(key) => {
                let task = states.iter().find(|t| t.key == key).ok_or_else(|| {
                    StoreError::NotFound(format!("job {job_id} has no task {key:?}"))
                })?;
                if task.state != "failed" && task.state != "cancelled" {
                    return Err(StoreError::Conflict(format!(
                        "task {key:?} is {}: only a failed or cancelled task can be retried",
                        task.state
                    )));
                }
                if let Some(other) = states.iter().find(|t| t.state == "failed" && t.key != key) {
                    return Err(StoreError::Conflict(format!(
                        "task {:?} of job {job_id} failed too; retry the job",
                        other.key
                    )));
                }
                states
                    .iter()
                    .filter(|t| t.id == task.id || t.state == "cancelled")
                    .map(|t| t.id)
                    .collect()
            }
        };
        sqlx::query!(
            "UPDATE tasks t
                SET state = 'blocked',
                    cancel_requested = false,
                    not_before = NULL,
                    max_attempts = CASE WHEN t.attempt >= t.max_attempts
                                        THEN t.attempt + 1 ELSE t.max_attempts END,
                    pending_deps = (SELECT count(*) FROM task_deps d JOIN tasks u ON u.id = d.depends_on
                                     WHERE d.task_id = t.id AND u.state <> 'succeeded'),
                    updated_at = now()
              WHERE t.id = ANY($1)",
            &chosen,
        )
        .execute(&mut *tx)
        .await?;
        let ready: Vec<Uuid> = sqlx::query_scalar!(
            "UPDATE tasks SET state = 'ready'
              WHERE id = ANY($1) AND state = 'blocked' AND pending_deps = 0
          RETURNING id",
            &chosen,
        )
        .fetch_all(&mut *tx)
        .await?;
        enqueue_wakeups(&mut *tx, self.settings.wakeups, &ready, None).await?;
        sqlx::query!(
            "UPDATE jobs SET state = 'running', finished_at = NULL,
                    deadline_at = now() + (deadline_at - created_at)
              WHERE id = $1",
            job_id
        )
        .execute(&mut *tx)
        .await?;
        Ok(u32::try_from(chosen.len()).unwrap_or(u32::MAX))
    }

    /// Retries or cancels every job of the org the filter selects that the
    /// action applies to (retry: failed or cancelled jobs with no task
    /// still stopping; cancel: running jobs), newest first, at most `cap`;
    /// each job in a transaction of its own. A dry run counts the same jobs
    /// and tasks and changes nothing. Returns (jobs, tasks, capped, the
    /// audit record's id).
    pub async fn bulk_action(
        &self,
        org_id: Uuid,
        user_id: Option<Uuid>,
        bulk: &BulkAction<'_>,
    ) -> Result<(u32, u32, bool, Option<Uuid>), StoreError> {
        let BulkAction {
            action,
            filter,
            described,
            cap,
            dry_run,
        } = *bulk;
        let eligible = match action {
            wire::JobActionKind::Retry => {
                [wire::JobState::Failed, wire::JobState::Cancelled].to_vec()
            }
            wire::JobActionKind::Cancel => [wire::JobState::Running].to_vec(),
        };
        let states: Vec<wire::JobState> = if filter.states.is_empty() {
            eligible
        } else {
            filter
                .states
                .iter()
                .copied()
                .filter(|s| eligible.contains(s))
                .collect()
        };
        if states.is_empty() {
            return Ok((0, 0, false, None));
        }
        let scoped = JobFilter {
            states,
            ..filter.clone()
        };
        let (jobs, next) = self.list_jobs(org_id, &scoped, None, cap).await?;
        let capped = next.is_some();
        let targets: Vec<(Uuid, u32)> = jobs
            .iter()
            .filter(|j| action == wire::JobActionKind::Cancel || j.tasks.leased == 0)
            .map(|j| {
                let t = &j.tasks;
                let n = match action {
                    wire::JobActionKind::Retry => t.failed + t.cancelled,
                    wire::JobActionKind::Cancel => t.blocked + t.ready + t.leased,
                };
                (j.job_id, n)
            })
            .collect();
        if dry_run {
            let tasks = targets.iter().map(|(_, n)| n).sum();
            return Ok((targets.len() as u32, tasks, capped, None));
        }
        let (mut done_jobs, mut done_tasks) = (0u32, 0u32);
        for (job_id, _) in &targets {
            let mut tx = self.pool.begin().await?;
            let outcome = match action {
                wire::JobActionKind::Retry => self.reopen(&mut tx, *job_id, RetryScope::Job).await,
                wire::JobActionKind::Cancel => cancel_running(&mut tx, *job_id).await,
            };
            match outcome {
                Ok(n) => {
                    tx.commit().await?;
                    done_jobs += 1;
                    done_tasks += n;
                }
                // Changed since it was listed (finished, retried, stopping):
                // left as it is.
                Err(StoreError::Conflict(_)) => tx.rollback().await?,
                Err(e) => return Err(e),
            }
        }
        let mut tx = self.pool.begin().await?;
        let id = record(
            &mut tx,
            org_id,
            user_id,
            action,
            &json!({"filter": described}),
            done_jobs,
            done_tasks,
        )
        .await?;
        tx.commit().await?;
        tracing::info!(%org_id, action = action.as_str(), jobs = done_jobs, tasks = done_tasks, "bulk job action");
        Ok((done_jobs, done_tasks, capped, Some(id)))
    }

    /// The org's recorded actions, newest first.
    pub async fn job_actions(
        &self,
        org_id: Uuid,
        limit: u32,
    ) -> Result<Vec<wire::JobActionView>, StoreError> {
        let rows = sqlx::query!(
            "SELECT id, action, user_id, target, jobs, tasks, created_at FROM job_actions
              WHERE org_id = $1 ORDER BY created_at DESC, id DESC LIMIT $2",
            org_id,
            i64::from(limit),
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| wire::JobActionView {
                action_id: r.id,
                action: if r.action == "retry" {
                    wire::JobActionKind::Retry
                } else {
                    wire::JobActionKind::Cancel
                },
                user_id: r.user_id,
                target: r.target,
                jobs: r.jobs as u32,
                tasks: r.tasks as u32,
                created_at: r.created_at,
            })
            .collect())
    }
}

/// Cancels a running job under its lock; how many of its tasks it stopped.
async fn cancel_running(tx: &mut sqlx::PgConnection, job_id: Uuid) -> Result<u32, StoreError> {
    let state = lock_job(&mut *tx, job_id)
        .await?
        .ok_or(StoreError::JobNotFound(job_id))?;
    if state != "running" {
        return Err(StoreError::Conflict(format!("job {job_id} is {state}")));
    }
    let n: i64 = sqlx::query_scalar!(
        r#"SELECT count(*) AS "n!" FROM tasks WHERE job_id = $1 AND state IN ('blocked', 'ready', 'leased')"#,
        job_id
    )
    .fetch_one(&mut *tx)
    .await?;
    end_job(&mut *tx, job_id, "cancelled").await?;
    Ok(u32::try_from(n).unwrap_or(u32::MAX))
}

async fn record(
    tx: &mut sqlx::PgConnection,
    org_id: Uuid,
    user_id: Option<Uuid>,
    action: wire::JobActionKind,
    target: &Value,
    jobs: u32,
    tasks: u32,
) -> Result<Uuid, StoreError> {
    let id = Uuid::now_v7();
    sqlx::query!(
        "INSERT INTO job_actions (id, org_id, user_id, action, target, jobs, tasks)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
        id,
        org_id,
        user_id,
        action.as_str(),
        target,
        i32::try_from(jobs).unwrap_or(i32::MAX),
        i32::try_from(tasks).unwrap_or(i32::MAX),
    )
    .execute(&mut *tx)
    .await?;
    Ok(id)
}

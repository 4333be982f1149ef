//! Jobs: submission of a validated DAG, reads, cancellation. Every query is
//! scoped by org: a job of another org is simply not found.

use chrono::{DateTime, Utc};
use dispatcher_wire::{JobState, JobView, TaskView};
use serde_json::Value;
use uuid::Uuid;

use super::transitions::{end_job, enqueue_wakeups, lock_job};
use super::Store;
use crate::domain::NewJob;
use crate::error::{task_state, StoreError};

pub(super) fn job_state(s: &str) -> Result<JobState, StoreError> {
    JobState::parse(s).ok_or_else(|| {
        StoreError::Db(sqlx::Error::Decode(
            format!("unknown job state {s:?}").into(),
        ))
    })
}

struct JobRow {
    name: String,
    state: String,
    created_at: DateTime<Utc>,
    finished_at: Option<DateTime<Utc>>,
    deadline_at: Option<DateTime<Utc>>,
}

/// One page of a job's tasks, in submission order: those after the
/// cursor `after` (a task's position), at most `limit`.
#[derive(Debug, Clone, Copy)]
pub struct TaskPage {
    pub after: Option<i32>,
    pub limit: u32,
}

impl TaskPage {
    /// The first page of the default size.
    pub const FIRST: TaskPage = TaskPage {
        after: None,
        limit: 1_000,
    };
}

impl Store {
    /// Inserts the job, its tasks, specs and dependency edges, and the
    /// wake-ups of its root tasks, in one transaction.
    pub async fn submit_job(
        &self,
        org_id: Uuid,
        created_by: Option<Uuid>,
        job: &NewJob,
    ) -> Result<JobView, StoreError> {
        let job_id = Uuid::now_v7();
        let n = job.tasks.len();
        let ids: Vec<Uuid> = job.tasks.iter().map(|t| t.id).collect();
        let states: Vec<&str> = job
            .tasks
            .iter()
            .map(|t| {
                if t.depends_on.is_empty() {
                    "ready"
                } else {
                    "blocked"
                }
            })
            .collect();
        let max_attempts: Vec<i32> = job
            .tasks
            .iter()
            .map(|t| i32::try_from(t.max_attempts).unwrap_or(i32::MAX))
            .collect();
        let pending: Vec<i32> = job
            .tasks
            .iter()
            .map(|t| i32::try_from(t.depends_on.len()).unwrap_or(i32::MAX))
            .collect();
        let ords: Vec<i32> = (0..n)
            .map(|i| i32::try_from(i).unwrap_or(i32::MAX))
            .collect();
        let keys: Vec<&str> = job.tasks.iter().map(|t| t.key.as_str()).collect();
        let runtimes: Vec<&str> = job.tasks.iter().map(|t| t.runtime.as_str()).collect();
        let inputs: Vec<&Value> = job.tasks.iter().map(|t| &t.inputs).collect();
        // text[][] cannot be ragged, so each task's outputs travel as JSON.
        let outputs: Vec<Value> = job
            .tasks
            .iter()
            .map(|t| Value::from(t.outputs.clone()))
            .collect();
        let reads: Vec<Value> = job
            .tasks
            .iter()
            .map(|t| Value::from(t.reads.clone()))
            .collect();
        let (dep_from, dep_on): (Vec<Uuid>, Vec<Uuid>) = job
            .tasks
            .iter()
            .flat_map(|t| t.depends_on.iter().map(move |&d| (t.id, job.tasks[d].id)))
            .unzip();
        let roots: Vec<Uuid> = job
            .tasks
            .iter()
            .filter(|t| t.depends_on.is_empty())
            .map(|t| t.id)
            .collect();

        let mut tx = self.pool.begin().await?;
        // A bundle task runs the digest its bundle or tag names now; its
        // timeout is its own, else its bundle's, else the default.
        let mut bundles: Vec<String> = Vec::with_capacity(n);
        let mut timeouts: Vec<i32> = Vec::with_capacity(n);
        let mut resolved: std::collections::HashMap<(&str, &str), super::ResolvedBundle> =
            Default::default();
        for (i, t) in job.tasks.iter().enumerate() {
            let mut bundle_timeout = None;
            if t.runtime == dispatcher_wire::Runtime::Exec {
                bundles.push(t.bundle.clone());
            } else {
                let key = (t.runtime.as_str(), t.bundle.as_str());
                if let std::collections::hash_map::Entry::Vacant(slot) = resolved.entry(key) {
                    let field = format!("tasks[{i}].bundle");
                    let r = super::bundles::resolve(&mut tx, org_id, &field, t.runtime, &t.bundle)
                        .await?;
                    slot.insert(r);
                }
                let r = &resolved[&key];
                bundles.push(r.digest.clone());
                bundle_timeout = r.timeout_seconds;
            }
            let secs = t
                .timeout_seconds
                .or(bundle_timeout)
                .map(u64::from)
                .unwrap_or(self.settings.task_timeout_default.as_secs())
                .min(self.settings.task_timeout_max.as_secs());
            timeouts.push(i32::try_from(secs).unwrap_or(i32::MAX));
        }
        let deadline_secs: Option<f64> = job.deadline.map(|d| d.as_secs_f64());
        let inserted = sqlx::query!(
            "INSERT INTO jobs (id, org_id, name, state, created_by, tasks_unfinished, deadline_at,
                               traceparent)
             VALUES ($1, $2, $3, 'running', $4, $5, now() + $6 * interval '1 second', $7)
             RETURNING created_at, deadline_at",
            job_id,
            org_id,
            &job.name,
            created_by,
            i32::try_from(n).unwrap_or(i32::MAX),
            deadline_secs,
            job.traceparent.as_deref(),
        )
        .fetch_one(&mut *tx)
        .await?;
        let (created_at, deadline_at) = (inserted.created_at, inserted.deadline_at);
        sqlx::query!(
            "INSERT INTO tasks (id, job_id, state, max_attempts, pending_deps)
             SELECT id, $1, state, max_attempts, pending
               FROM unnest($2::uuid[], $3::text[], $4::int[], $5::int[])
                    AS t(id, state, max_attempts, pending)",
            job_id,
            &ids,
            &states as _,
            &max_attempts,
            &pending,
        )
        .execute(&mut *tx)
        .await?;
        sqlx::query!(
            "INSERT INTO task_specs (task_id, job_id, ord, key, runtime, bundle, inputs, outputs,
                                     reads, timeout_seconds)
             SELECT id, $1, ord, key, runtime, bundle, inputs,
                    ARRAY(SELECT jsonb_array_elements_text(outputs)),
                    ARRAY(SELECT jsonb_array_elements_text(reads)), timeout_seconds
               FROM unnest($2::uuid[], $3::int[], $4::text[], $5::text[], $6::text[],
                           $7::jsonb[], $8::jsonb[], $9::jsonb[], $10::int[])
                    AS s(id, ord, key, runtime, bundle, inputs, outputs, reads, timeout_seconds)",
            job_id,
            &ids,
            &ords,
            &keys as _,
            &runtimes as _,
            &bundles,
            &inputs as _,
            &outputs,
            &reads,
            &timeouts,
        )
        .execute(&mut *tx)
        .await?;
        if !dep_from.is_empty() {
            sqlx::query!(
                "INSERT INTO task_deps (task_id, depends_on)
                 SELECT * FROM unnest($1::uuid[], $2::uuid[])",
                &dep_from,
                &dep_on,
            )
            .execute(&mut *tx)
            .await?;
        }
        enqueue_wakeups(&mut tx, self.settings.wakeups, &roots, None).await?;
        tx.commit().await?;

        Ok(JobView {
            job_id,
            name: job.name.clone(),
            state: JobState::Running,
            created_at,
            finished_at: None,
            deadline_at,
            tasks: job
                .tasks
                .iter()
                .zip(&states)
                .map(|(t, s)| TaskView {
                    key: t.key.clone(),
                    task_id: t.id,
                    state: dispatcher_wire::TaskState::parse(s)
                        .unwrap_or(dispatcher_wire::TaskState::Blocked),
                    attempt: 0,
                    max_attempts: t.max_attempts,
                })
                .collect(),
            next_cursor: None,
        })
    }

    /// The job with one page of its tasks' states and attempts, if it
    /// belongs to `org_id`; `next_cursor` names the next page.
    pub async fn get_job(
        &self,
        org_id: Uuid,
        job_id: Uuid,
        page: TaskPage,
    ) -> Result<JobView, StoreError> {
        let mut conn = self.pool.acquire().await?;
        let job: Option<JobRow> = sqlx::query_as!(
            JobRow,
            "SELECT name, state, created_at, finished_at, deadline_at
               FROM jobs WHERE id = $1 AND org_id = $2",
            job_id,
            org_id,
        )
        .fetch_optional(&mut *conn)
        .await?;
        let Some(JobRow {
            name,
            state,
            created_at,
            finished_at,
            deadline_at,
        }) = job
        else {
            return Err(StoreError::JobNotFound(job_id));
        };
        let mut rows: Vec<(String, Uuid, String, i32, i32, i32)> = sqlx::query!(
            "SELECT s.key, t.id, t.state, t.attempt, t.max_attempts, s.ord
               FROM task_specs s JOIN tasks t ON t.id = s.task_id
              WHERE s.job_id = $1 AND s.ord > $2
              ORDER BY s.ord
              LIMIT $3",
            job_id,
            page.after.unwrap_or(-1),
            i64::from(page.limit) + 1,
        )
        .fetch_all(&mut *conn)
        .await?
        .into_iter()
        .map(|r| (r.key, r.id, r.state, r.attempt, r.max_attempts, r.ord))
        .collect();
        let next_cursor = if rows.len() > page.limit as usize {
            rows.truncate(page.limit as usize);
            rows.last().map(|r| r.5.to_string())
        } else {
            None
        };
        let tasks = rows
            .into_iter()
            .map(|(key, task_id, state, attempt, max_attempts, _)| {
                Ok(TaskView {
                    key,
                    task_id,
                    state: task_state(&state)?,
                    attempt: u32::try_from(attempt).unwrap_or(0),
                    max_attempts: u32::try_from(max_attempts).unwrap_or(0),
                })
            })
            .collect::<Result<_, StoreError>>()?;
        Ok(JobView {
            job_id,
            name,
            state: job_state(&state)?,
            created_at,
            finished_at,
            deadline_at,
            tasks,
            next_cursor,
        })
    }

    /// Cancels a running job: unstarted tasks end as cancelled at once,
    /// leased tasks are asked to stop. Cancelling a cancelled job is a no-op;
    /// a job that already succeeded or failed is a conflict.
    pub async fn cancel_job(
        &self,
        org_id: Uuid,
        job_id: Uuid,
        page: TaskPage,
    ) -> Result<JobView, StoreError> {
        let mut tx = self.pool.begin().await?;
        let owner: Option<Uuid> =
            sqlx::query_scalar!("SELECT org_id FROM jobs WHERE id = $1", job_id,)
                .fetch_optional(&mut *tx)
                .await?;
        if owner != Some(org_id) {
            return Err(StoreError::JobNotFound(job_id));
        }
        let state = lock_job(&mut tx, job_id)
            .await?
            .ok_or(StoreError::JobNotFound(job_id))?;
        match state.as_str() {
            "running" => end_job(&mut tx, job_id, "cancelled").await?,
            "cancelled" => {}
            other => {
                return Err(StoreError::Conflict(format!(
                    "job {job_id} has already {other}; it cannot be cancelled"
                )))
            }
        }
        tx.commit().await?;
        self.get_job(org_id, job_id, page).await
    }

    /// Cancels running jobs whose deadline has passed (ADR 0004's rules:
    /// unfinished tasks end `cancelled`, leased ones are asked to stop), at
    /// most `limit` per call, each in a transaction of its own; how many.
    pub async fn cancel_overdue_jobs(&self, limit: u32) -> Result<u64, StoreError> {
        let due: Vec<Uuid> = sqlx::query_scalar!(
            "SELECT id FROM jobs
              WHERE state = 'running' AND deadline_at IS NOT NULL AND deadline_at <= now()
              ORDER BY deadline_at LIMIT $1",
            i64::from(limit),
        )
        .fetch_all(&self.pool)
        .await?;
        let mut cancelled = 0;
        for job_id in due {
            let mut tx = self.pool.begin().await?;
            // Under the job lock: a job that just finished stays as it is.
            if lock_job(&mut tx, job_id).await?.as_deref() == Some("running") {
                end_job(&mut tx, job_id, "cancelled").await?;
                cancelled += 1;
                tracing::info!(%job_id, "job cancelled: its deadline passed");
            }
            tx.commit().await?;
        }
        Ok(cancelled)
    }

    /// Deletes up to `limit` jobs that finished more than `older_than`
    /// ago, oldest first, with everything of theirs (ON DELETE CASCADE),
    /// except a job with a buffer batch the sink has not ingested (pending,
    /// or dead and awaiting an operator's replay or purge). Rows another
    /// transaction holds are skipped. How many jobs it deleted.
    pub async fn prune_finished_jobs(
        &self,
        older_than: std::time::Duration,
        limit: u32,
    ) -> Result<u64, StoreError> {
        // One statement: the jobs go (their tasks, attempts, events and
        // publishes by cascade) and their attempts' logs join the deletion
        // queue, which the same snapshot still sees.
        let pruned = sqlx::query_scalar!(
            r#"WITH gone AS (
                 DELETE FROM jobs j
                  USING (SELECT x.id FROM jobs x
                          WHERE x.state <> 'running'
                            AND x.finished_at < now() - $1 * interval '1 millisecond'
                            AND NOT EXISTS (
                                  SELECT 1 FROM tasks t JOIN buffer_publishes b ON b.task_id = t.id
                                   WHERE t.job_id = x.id AND b.state <> 'ingested')
                          ORDER BY x.finished_at
                          LIMIT $2
                            FOR UPDATE SKIP LOCKED) old
                  WHERE j.id = old.id
              RETURNING j.id),
               logs AS (
                 INSERT INTO object_deletions (key)
                 SELECT a.log_key FROM attempts a JOIN tasks t ON t.id = a.task_id
                  WHERE t.job_id IN (SELECT id FROM gone) AND a.log_key IS NOT NULL
                 ON CONFLICT DO NOTHING)
             SELECT count(*) AS "n!" FROM gone"#,
            crate::millis(older_than) as f64,
            i64::from(limit),
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(pruned as u64)
    }
}

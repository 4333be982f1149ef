//! What users read of their jobs (issue 25): the listing with its filters,
//! a task's detail with every attempt, and its events. Every read is
//! scoped to the org in its `WHERE` clause: another org's job is not found.

use chrono::{DateTime, Utc};
use dispatcher_wire as wire;
use serde_json::Value;
use uuid::Uuid;

use super::jobs::job_state;
use super::Store;
use crate::domain::{JobCursor, JobFilter};
use crate::error::{task_state, StoreError};

/// A page of events starts after this (attempt, seq).
pub type EventCursor = (u32, u64);

fn count(n: Option<i64>) -> u32 {
    u32::try_from(n.unwrap_or(0)).unwrap_or(u32::MAX)
}

impl Store {
    /// The org's jobs matching `filter`, newest first (by creation, then
    /// id), `limit` of them after `after`; and the cursor of the next page.
    pub async fn list_jobs(
        &self,
        org_id: Uuid,
        filter: &JobFilter,
        after: Option<JobCursor>,
        limit: u32,
    ) -> Result<(Vec<wire::JobSummary>, Option<JobCursor>), StoreError> {
        let mut conn = self.pool.acquire().await?;
        let rows = sqlx::query!(
            r#"SELECT j.id, j.name, j.state, j.created_at, j.finished_at
                 FROM jobs j
                WHERE j.org_id = $1
                  AND (cardinality($2::text[]) = 0 OR j.state = ANY($2))
                  AND ($3::text IS NULL OR j.name LIKE $3)
                  AND ($4::timestamptz IS NULL OR j.created_at >= $4)
                  AND ($5::timestamptz IS NULL OR j.created_at < $5)
                  AND ($6::timestamptz IS NULL OR j.finished_at >= $6)
                  AND ($7::timestamptz IS NULL OR j.finished_at < $7)
                  AND ($8::boolean IS NULL OR $8 = EXISTS (
                        SELECT 1 FROM tasks t WHERE t.job_id = j.id AND t.state = 'failed'))
                  AND ($9::timestamptz IS NULL OR (j.created_at, j.id) < ($9, $10::uuid))
                ORDER BY j.created_at DESC, j.id DESC
                LIMIT $11"#,
            org_id,
            &filter
                .states
                .iter()
                .map(|s| s.as_str().to_owned())
                .collect::<Vec<_>>(),
            filter.name_like.as_deref(),
            filter.created_after,
            filter.created_before,
            filter.finished_after,
            filter.finished_before,
            filter.has_failed_tasks,
            after.map(|c| c.created_at),
            after.map(|c| c.job_id),
            i64::from(limit) + 1,
        )
        .fetch_all(&mut *conn)
        .await?;
        let more = rows.len() > limit as usize;
        let rows = &rows[..rows.len().min(limit as usize)];
        let ids: Vec<Uuid> = rows.iter().map(|r| r.id).collect();
        let counts = sqlx::query!(
            r#"SELECT job_id, state, count(*) AS "n!"
                 FROM tasks WHERE job_id = ANY($1) GROUP BY job_id, state"#,
            &ids,
        )
        .fetch_all(&mut *conn)
        .await?;
        let mut jobs = Vec::with_capacity(rows.len());
        for r in rows {
            let mut tasks = wire::TaskCounts::default();
            for c in counts.iter().filter(|c| c.job_id == r.id) {
                let slot = match c.state.as_str() {
                    "blocked" => &mut tasks.blocked,
                    "ready" => &mut tasks.ready,
                    "leased" => &mut tasks.leased,
                    "succeeded" => &mut tasks.succeeded,
                    "failed" => &mut tasks.failed,
                    _ => &mut tasks.cancelled,
                };
                *slot = count(Some(c.n));
            }
            jobs.push(wire::JobSummary {
                job_id: r.id,
                name: r.name.clone(),
                state: job_state(&r.state)?,
                created_at: r.created_at,
                finished_at: r.finished_at,
                tasks,
            });
        }
        let next = match (more, rows.last()) {
            (true, Some(last)) => Some(JobCursor {
                created_at: last.created_at,
                job_id: last.id,
            }),
            _ => None,
        };
        Ok((jobs, next))
    }

    /// A task of the org's job, by key: its spec, state, dependencies, and
    /// every attempt with its outcome, error, output, and what it produced.
    pub async fn task_detail(
        &self,
        org_id: Uuid,
        job_id: Uuid,
        key: &str,
    ) -> Result<wire::TaskDetail, StoreError> {
        let mut conn = self.pool.acquire().await?;
        let t = sqlx::query!(
            r#"SELECT t.id, t.state, t.attempt, t.max_attempts, t.not_before,
                      s.runtime, s.bundle, s.inputs, s.outputs, s.reads, s.timeout_seconds
                 FROM task_specs s
                 JOIN tasks t ON t.id = s.task_id
                 JOIN jobs j ON j.id = s.job_id
                WHERE s.job_id = $1 AND s.key = $2 AND j.org_id = $3"#,
            job_id,
            key,
            org_id,
        )
        .fetch_optional(&mut *conn)
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("job {job_id} has no task {key:?}")))?;
        let depends_on: Vec<String> = sqlx::query_scalar!(
            "SELECT s.key FROM task_deps d JOIN task_specs s ON s.task_id = d.depends_on
              WHERE d.task_id = $1 ORDER BY s.ord",
            t.id,
        )
        .fetch_all(&mut *conn)
        .await?;
        let attempts = sqlx::query!(
            r#"SELECT attempt, worker_id, claimed_at, finished_at, outcome, progress,
                      completion, events, log_bytes, log_dropped_bytes
                 FROM attempts WHERE task_id = $1 ORDER BY attempt"#,
            t.id,
        )
        .fetch_all(&mut *conn)
        .await?;
        let versions = sqlx::query!(
            r#"SELECT v.attempt, d.name, v.version, v.rows
                 FROM dataset_versions v JOIN datasets d ON d.id = v.dataset_id
                WHERE v.task_id = $1 ORDER BY d.name"#,
            t.id,
        )
        .fetch_all(&mut *conn)
        .await?;
        let batches = sqlx::query!(
            r#"SELECT attempt, batch_id, dataset, rows, state
                 FROM buffer_publishes WHERE task_id = $1 ORDER BY created_at, batch_id"#,
            t.id,
        )
        .fetch_all(&mut *conn)
        .await?;
        let runtime = wire::Runtime::parse(&t.runtime).ok_or_else(|| {
            StoreError::Internal(format!("task {} has unknown runtime {:?}", t.id, t.runtime))
        })?;
        let attempts = attempts
            .into_iter()
            .map(|a| {
                let (error, output) = what_it_reported(a.outcome.as_deref(), a.completion);
                wire::AttemptView {
                    attempt: a.attempt as u32,
                    duration_ms: a.finished_at.map(|f| millis_between(a.claimed_at, f)),
                    worker_id: a.worker_id,
                    claimed_at: a.claimed_at,
                    finished_at: a.finished_at,
                    outcome: a.outcome,
                    error,
                    output,
                    progress: a.progress,
                    events: a.events as u32,
                    dataset_versions: versions
                        .iter()
                        .filter(|v| v.attempt == a.attempt)
                        .map(|v| wire::ProducedVersion {
                            dataset: v.name.clone(),
                            version: v.version as u32,
                            rows: v.rows as u64,
                        })
                        .collect(),
                    buffer_batches: batches
                        .iter()
                        .filter(|b| b.attempt == a.attempt)
                        .map(|b| wire::ProducedBatch {
                            batch_id: b.batch_id,
                            dataset: b.dataset.clone(),
                            rows: b.rows as u64,
                            state: b.state.clone(),
                        })
                        .collect(),
                    log: a.log_bytes.map(|bytes| wire::LogInfo {
                        bytes: bytes as u64,
                        dropped_bytes: a.log_dropped_bytes.unwrap_or(0) as u64,
                    }),
                }
            })
            .collect();
        Ok(wire::TaskDetail {
            job_id,
            task_id: t.id,
            state: task_state(&t.state)?,
            attempt: t.attempt as u32,
            max_attempts: t.max_attempts as u32,
            not_before: t.not_before,
            spec: wire::TaskSpec {
                key: key.to_owned(),
                runtime,
                bundle: t.bundle,
                inputs: t.inputs,
                outputs: t.outputs,
                reads: t.reads,
                timeout_seconds: t.timeout_seconds.map(|s| s as u32).unwrap_or(0),
            },
            depends_on,
            attempts,
        })
    }

    /// A page of the events of a task of the org's job, by attempt then
    /// sequence number, after `after`.
    pub async fn task_events(
        &self,
        org_id: Uuid,
        job_id: Uuid,
        key: &str,
        after: Option<EventCursor>,
        limit: u32,
    ) -> Result<wire::EventPage, StoreError> {
        let mut conn = self.pool.acquire().await?;
        let task_id: Uuid = sqlx::query_scalar!(
            "SELECT s.task_id FROM task_specs s JOIN jobs j ON j.id = s.job_id
              WHERE s.job_id = $1 AND s.key = $2 AND j.org_id = $3",
            job_id,
            key,
            org_id,
        )
        .fetch_optional(&mut *conn)
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("job {job_id} has no task {key:?}")))?;
        let (att, seq) = after.map_or((0i32, -1i64), |(a, s)| {
            (a as i32, i64::try_from(s).unwrap_or(i64::MAX))
        });
        let rows = sqlx::query!(
            r#"SELECT attempt, seq, kind, payload, created_at FROM task_events
                WHERE task_id = $1 AND (attempt, seq) > ($2, $3)
                ORDER BY attempt, seq LIMIT $4"#,
            task_id,
            att,
            seq,
            i64::from(limit) + 1,
        )
        .fetch_all(&mut *conn)
        .await?;
        let more = rows.len() > limit as usize;
        let events: Vec<wire::EventView> = rows
            .into_iter()
            .take(limit as usize)
            .map(|r| wire::EventView {
                attempt: r.attempt as u32,
                seq: r.seq as u64,
                kind: r.kind,
                payload: r.payload,
                created_at: r.created_at,
            })
            .collect();
        let next_cursor = match (more, events.last()) {
            (true, Some(e)) => Some(format!("{}.{}", e.attempt, e.seq)),
            _ => None,
        };
        Ok(wire::EventPage {
            events,
            next_cursor,
        })
    }
}

fn millis_between(from: DateTime<Utc>, to: DateTime<Utc>) -> u64 {
    u64::try_from((to - from).num_milliseconds()).unwrap_or(0)
}

/// An attempt's error and output from its outcome and stored completion
/// (`domain::Completion::to_json`): a task's own failure is `task_failed`,
/// an expired lease `lease_expired`.
fn what_it_reported(
    outcome: Option<&str>,
    completion: Option<Value>,
) -> (Option<wire::ErrorDetail>, Option<Value>) {
    let completion = completion.unwrap_or(Value::Null);
    match outcome {
        Some("succeeded") => (None, completion.get("output").cloned()),
        Some("failed") => {
            let e = completion.get("error");
            (
                Some(wire::ErrorDetail {
                    code: "task_failed".into(),
                    message: e
                        .and_then(|e| e.get("message"))
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_owned(),
                    retryable: e
                        .and_then(|e| e.get("retryable"))
                        .and_then(Value::as_bool)
                        .unwrap_or(false),
                }),
                None,
            )
        }
        Some("released") => (
            Some(wire::ErrorDetail {
                code: "released".into(),
                message: "the worker was stopping and handed the task back; it ran again".into(),
                retryable: true,
            }),
            None,
        ),
        Some("lease_expired") => (
            Some(wire::ErrorDetail {
                code: "lease_expired".into(),
                message: "the worker stopped heartbeating; the lease expired".into(),
                retryable: true,
            }),
            None,
        ),
        _ => (None, None),
    }
}

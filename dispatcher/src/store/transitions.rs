//! What a task's state change causes, in the caller's transaction
//! (release dependants, wake-ups, ending jobs), and the expiry of a lease.

use chrono::{DateTime, Utc};
use dispatcher_wire::TaskState;
use sqlx::PgConnection;
use uuid::Uuid;

use super::{Fence, Store};
use crate::error::{task_state, StoreError};
use crate::settings::Wakeups;

/// Tells workers that `task_ids` are ready (from `available_at`, default
/// now), in the caller's transaction, as `mode` says (ADR 0017):
///
/// * `Queue`: one wake-up per task into the outbox;
/// * `Notify`: one `NOTIFY tasks_ready`, delivered at commit (Postgres
///   folds equal notifications of one transaction into one). Its payload is
///   empty for work ready now, or `later` for a retry whose backoff has not
///   ended (listeners then ask when it ends: `Store::next_retry_due`).
pub(crate) async fn enqueue_wakeups(
    conn: &mut PgConnection,
    mode: Wakeups,
    task_ids: &[Uuid],
    available_at: Option<DateTime<Utc>>,
) -> Result<(), sqlx::Error> {
    if task_ids.is_empty() {
        return Ok(());
    }
    match mode {
        Wakeups::Queue => {
            sqlx::query!(
                "INSERT INTO outbox (topic, payload, available_at)
                 SELECT 'wakeup', jsonb_build_object('task_id', id), coalesce($2, now())
                   FROM unnest($1::uuid[]) AS id",
                task_ids,
                available_at,
            )
            .execute(conn)
            .await?;
        }
        Wakeups::Notify => {
            // A retry's backoff end is judged by the database's clock.
            sqlx::query!(
                "SELECT pg_notify($1, CASE WHEN coalesce($2 > now(), false) THEN $3 ELSE '' END)",
                crate::store::ready::CHANNEL,
                available_at,
                crate::store::ready::LATER,
            )
            .execute(conn)
            .await?;
        }
    }
    Ok(())
}

/// Locks a job row; the first lock of every multi-row transaction.
pub(crate) async fn lock_job(
    conn: &mut PgConnection,
    job_id: Uuid,
) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar!(
        "SELECT state FROM jobs WHERE id = $1 FOR NO KEY UPDATE",
        job_id,
    )
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
    sqlx::query!(
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
        job_id,
        state,
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// The consequences of a task reaching `state`, in the same transaction:
/// release dependants and wake them, schedule a retry's wake-up, or fail the
/// job. The job row must already be locked by the caller, except for a
/// success of a task without dependants (which touches no other row).
pub(super) async fn after_transition(
    conn: &mut PgConnection,
    mode: Wakeups,
    task_id: Uuid,
    job_id: Uuid,
    state: TaskState,
    retry_at: Option<DateTime<Utc>>,
) -> Result<(), sqlx::Error> {
    match state {
        TaskState::Succeeded => {
            let dependants = sqlx::query!(
                "UPDATE tasks t
                    SET pending_deps = t.pending_deps - 1,
                        state = CASE WHEN t.pending_deps = 1 THEN 'ready' ELSE t.state END,
                        updated_at = now()
                   FROM task_deps d
                  WHERE d.depends_on = $1 AND t.id = d.task_id AND t.state = 'blocked'
              RETURNING t.id, t.state",
                task_id,
            )
            .fetch_all(&mut *conn)
            .await?;
            let released: Vec<Uuid> = dependants
                .into_iter()
                .filter(|r| r.state == "ready")
                .map(|r| r.id)
                .collect();
            enqueue_wakeups(conn, mode, &released, None).await?;
            // The job's end is judged after the commit (`finish_jobs_if_done`):
            // a success does not touch the job's row.
        }
        TaskState::Ready => enqueue_wakeups(conn, mode, &[task_id], retry_at).await?,
        TaskState::Failed => end_job(conn, job_id, "failed").await?,
        TaskState::Cancelled | TaskState::Blocked | TaskState::Leased => {}
    }
    Ok(())
}

impl Store {
    /// Ends an expired lease by the rules of a retryable failure: a retry
    /// (with backoff) while attempts remain, else the task and its job fail;
    /// a task whose job was stopped becomes cancelled. Returns the new state,
    /// or `None` when the lease was not (or no longer) expired.
    pub async fn expire_lease(&self, task_id: Uuid) -> Result<Option<TaskState>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let Some(task) = sqlx::query!(
            "SELECT job_id, attempt, max_attempts FROM tasks WHERE id = $1",
            task_id,
        )
        .fetch_optional(&mut *tx)
        .await?
        else {
            return Err(StoreError::TaskNotFound(task_id));
        };
        let (job_id, attempt, max_attempts) = (task.job_id, task.attempt, task.max_attempts);
        // Only a final failure touches the job row (to end the job), so only
        // then is the job lock taken, first as the lock order demands. A
        // retry or a cancellation changes the task alone.
        if attempt >= max_attempts {
            lock_job(&mut tx, job_id).await?;
        }
        let ended = sqlx::query!(
            "UPDATE tasks
                SET state = CASE WHEN cancel_requested THEN 'cancelled'
                                 WHEN attempt < max_attempts THEN 'ready'
                                 ELSE 'failed' END,
                    -- Backoff counts from the last sign of life: the silent
                    -- lease already waited lease_seconds of it.
                    not_before = CASE WHEN NOT cancel_requested AND attempt < max_attempts
                                      THEN now() + greatest(0, $3 - lease_seconds * 1000::bigint)
                                                   * interval '1 millisecond' END,
                    -- The ready queue's order (tasks_ready_fifo_idx): the
                    -- task takes back the place it had when its attempt
                    -- was claimed, ahead of work that became ready since.
                    updated_at = coalesce((SELECT a.claimed_at FROM attempts a
                                            WHERE a.task_id = $1 AND a.attempt = $2), now()),
                    lease_expires_at = NULL
              WHERE id = $1 AND attempt = $2 AND state = 'leased' AND lease_expires_at <= now()
          RETURNING state, not_before",
            task_id,
            attempt,
            crate::millis(self.retry_delay(attempt)),
        )
        .fetch_optional(&mut *tx)
        .await?
        .map(|r| (r.state, r.not_before));
        let Some((state, retry_at)) = ended else {
            tx.rollback().await?;
            return Ok(None);
        };
        let state = task_state(&state)?;
        sqlx::query!(
            "UPDATE attempts SET finished_at = now(), outcome = 'lease_expired'
              WHERE task_id = $1 AND attempt = $2 AND finished_at IS NULL",
            task_id,
            attempt,
        )
        .execute(&mut *tx)
        .await?;
        after_transition(
            &mut tx,
            self.settings.wakeups,
            task_id,
            job_id,
            state,
            retry_at,
        )
        .await?;
        tx.commit().await?;
        Ok(Some(state))
    }

    /// Hands a leased task back because its worker is stopping (fenced):
    /// the attempt ends `released` and the task is `ready` at once, in the
    /// place it had in the queue, with the attempt given back (its
    /// `max_attempts` grows by one, so a drain costs the task no try); a
    /// task whose cancel was requested ends `cancelled`. The new state.
    pub async fn release(&self, fence: Fence) -> Result<TaskState, StoreError> {
        let mut tx = self.pool.begin().await?;
        let ended = sqlx::query_scalar!(
            "UPDATE tasks
                SET state = CASE WHEN cancel_requested THEN 'cancelled' ELSE 'ready' END,
                    max_attempts = CASE WHEN cancel_requested THEN max_attempts
                                        ELSE max_attempts + 1 END,
                    not_before = NULL,
                    updated_at = coalesce((SELECT a.claimed_at FROM attempts a
                                            WHERE a.task_id = $1 AND a.attempt = $3), now()),
                    lease_expires_at = NULL
              WHERE id = $1 AND job_id = $2 AND attempt = $3
                AND state = 'leased' AND lease_expires_at > clock_timestamp()
          RETURNING state",
            fence.task_id,
            fence.job_id,
            fence.attempt_i32(),
        )
        .fetch_optional(&mut *tx)
        .await?;
        let Some(state) = ended else {
            let e = super::tasks::fence_error(&mut tx, fence).await;
            tx.rollback().await?;
            return Err(e);
        };
        let state = task_state(&state)?;
        sqlx::query!(
            "UPDATE attempts SET finished_at = now(), outcome = 'released'
              WHERE task_id = $1 AND attempt = $2 AND finished_at IS NULL",
            fence.task_id,
            fence.attempt_i32(),
        )
        .execute(&mut *tx)
        .await?;
        after_transition(
            &mut tx,
            self.settings.wakeups,
            fence.task_id,
            fence.job_id,
            state,
            None,
        )
        .await?;
        tx.commit().await?;
        Ok(state)
    }

    /// Ends each of `job_ids` that is running with no unfinished task as
    /// `succeeded`, in one statement. Called after successes commit: of
    /// two successes that end a job, whichever commits last sees the other
    /// committed, so the job ends exactly when its last task has (and
    /// running it twice changes nothing). Returns how many jobs it ended.
    pub async fn finish_jobs_if_done(&self, job_ids: &[Uuid]) -> Result<u64, StoreError> {
        if job_ids.is_empty() {
            return Ok(0);
        }
        // Locked in id order, the order every transaction locks jobs in.
        let done = sqlx::query!(
            "UPDATE jobs j SET state = 'succeeded', finished_at = now()
               FROM (SELECT x.id FROM jobs x
                      WHERE x.id = ANY($1) AND x.state = 'running'
                        AND NOT EXISTS (SELECT 1 FROM tasks t
                                         WHERE t.job_id = x.id AND t.state <> 'succeeded')
                      ORDER BY x.id
                        FOR NO KEY UPDATE) done
              WHERE j.id = done.id",
            job_ids,
        )
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    /// Running jobs whose every task has succeeded (a crash came between a
    /// last success's commit and its `finish_jobs_if_done`); ends up to
    /// `limit` of them. Rows another transaction holds are skipped.
    pub async fn finish_done_jobs(&self, limit: u32) -> Result<u64, StoreError> {
        let done = sqlx::query!(
            "UPDATE jobs j SET state = 'succeeded', finished_at = now()
               FROM (SELECT x.id FROM jobs x
                      WHERE x.state = 'running'
                        AND NOT EXISTS (SELECT 1 FROM tasks t
                                         WHERE t.job_id = x.id AND t.state <> 'succeeded')
                      ORDER BY x.id
                      LIMIT $1
                        FOR NO KEY UPDATE SKIP LOCKED) done
              WHERE j.id = done.id",
            i64::from(limit),
        )
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }
}

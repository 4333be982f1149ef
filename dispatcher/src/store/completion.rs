//! Completion: one transaction per call or per batch, a savepoint per
//! entry; a succeeded completion commits the attempt's dataset versions.

use dispatcher_wire::{CommittedVersion, CompleteResponse, TaskState};
use serde_json::Value;
use sqlx::PgConnection;
use uuid::Uuid;

use super::tasks::*;
use super::transitions::after_transition;
use super::Store;
use crate::domain::Completion;
use crate::error::{task_state, StoreError};

/// Commits one new version of each dataset the attempt staged parts for,
/// inside the completion's transaction (after its fenced task update).
/// Dataset rows are locked in id order (`FOR UPDATE`), which serialises
/// concurrent commits to one dataset: no appender loses parts, and version
/// numbers have no gaps. A staged dataset without a written manifest, or
/// whose staged parts (read under the task row's lock, which a stage also
/// takes) are not exactly the manifest's (parts staged while the
/// completion ran), aborts the whole completion, retryably: a version and
/// its manifest always agree (review M1).
async fn commit_versions(
    conn: &mut PgConnection,
    fence: Fence,
    manifests: &[super::datasets::WrittenManifest],
) -> Result<Vec<CommittedVersion>, StoreError> {
    let attempt = fence.attempt_i32();
    let staged: Vec<(Uuid, String, String)> = sqlx::query!(
        "SELECT DISTINCT s.dataset_id, d.name, d.mode
           FROM staged_parts s JOIN datasets d ON d.id = s.dataset_id
          WHERE s.task_id = $1 AND s.attempt = $2
          ORDER BY s.dataset_id",
        fence.task_id,
        attempt,
    )
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .map(|r| (r.dataset_id, r.name, r.mode))
    .collect();
    let mut committed = Vec::with_capacity(staged.len());
    for (dataset_id, name, mode) in staged {
        let Some(manifest) = manifests.iter().find(|m| m.dataset_id == dataset_id) else {
            return Err(StoreError::Retry(format!(
                "parts of dataset {name:?} were staged while the completion ran; nothing was \
                 committed, retry"
            )));
        };
        let staged_keys: Vec<String> = sqlx::query_scalar!(
            "SELECT key FROM staged_parts
              WHERE task_id = $1 AND attempt = $2 AND dataset_id = $3 ORDER BY key COLLATE \"C\"",
            fence.task_id,
            attempt,
            dataset_id,
        )
        .fetch_all(&mut *conn)
        .await?;
        if staged_keys != manifest.parts {
            return Err(StoreError::Retry(format!(
                "parts of dataset {name:?} were staged while the completion ran (the manifest \
                 lists {}, {} are staged); nothing was committed, retry",
                manifest.parts.len(),
                staged_keys.len()
            )));
        }
        let current: Option<i32> = sqlx::query_scalar!(
            "SELECT current_version FROM datasets WHERE id = $1 FOR UPDATE",
            dataset_id,
        )
        .fetch_one(&mut *conn)
        .await?;
        let version = current.unwrap_or(0) + 1;
        sqlx::query!(
            "INSERT INTO dataset_versions (dataset_id, version, parent, task_id, attempt, rows, manifest_key)
             SELECT $1, $2, $3, $4, $5,
                    coalesce((SELECT rows FROM dataset_versions
                               WHERE $6 = 'append' AND dataset_id = $1 AND version = $3), 0)
                    + coalesce(sum(s.rows), 0),
                    $7
               FROM staged_parts s
              WHERE s.task_id = $4 AND s.attempt = $5 AND s.dataset_id = $1",
            dataset_id,
            version,
            current,
            fence.task_id,
            attempt,
            &mode,
            &manifest.key,
        )
        .execute(&mut *conn)
        .await?;
        sqlx::query!(
            "INSERT INTO dataset_parts (dataset_id, version, key, rows, bytes, sha256)
             SELECT $1, $2, key, rows, bytes, sha256 FROM staged_parts
              WHERE task_id = $3 AND attempt = $4 AND dataset_id = $1",
            dataset_id,
            version,
            fence.task_id,
            attempt,
        )
        .execute(&mut *conn)
        .await?;
        sqlx::query!(
            "UPDATE datasets SET current_version = $2 WHERE id = $1",
            dataset_id,
            version,
        )
        .execute(&mut *conn)
        .await?;
        committed.push(CommittedVersion {
            dataset: name,
            version: u32::try_from(version).unwrap_or(0),
        });
    }
    Ok(committed)
}

/// The entries of a completion batch, in job order, for its job locks:
/// each entry's job and task, and whether it is a success.
#[derive(Clone, Copy)]
struct JobLocks<'a> {
    jobs: &'a [Uuid],
    tasks: &'a [Uuid],
    succeeded: &'a [bool],
}

impl Store {
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
        // The jobs first, in id order, each in the mode its entries need.
        let (jobs, tasks, succeeded): (Vec<Uuid>, Vec<Uuid>, Vec<bool>) = order
            .iter()
            .map(|&i| {
                let (fence, completion, _) = entries[i];
                let ok = matches!(completion, Completion::Succeeded { .. });
                (fence.job_id, fence.task_id, ok)
            })
            .collect();
        let locks = JobLocks {
            jobs: &jobs,
            tasks: &tasks,
            succeeded: &succeeded,
        };
        for (i, response) in self.complete_leaves(&mut tx, entries, locks).await? {
            answers[i] = Some(Ok(response));
        }
        // Then every dataset the remaining entries commit to, once, in id
        // order: each entry's own `commit_versions` locks only its own
        // datasets, so two batches naming them in other orders could
        // deadlock (review M5). After the jobs, as everywhere.
        let mut datasets: Vec<Uuid> = entries
            .iter()
            .zip(&answers)
            .filter(|(e, a)| a.is_none() && matches!(e.1, Completion::Succeeded { .. }))
            .flat_map(|(e, _)| e.2.iter().map(|m| m.dataset_id))
            .collect();
        if datasets.len() > 1 {
            datasets.sort();
            datasets.dedup();
            sqlx::query!(
                "SELECT id FROM datasets WHERE id = ANY($1) ORDER BY id FOR UPDATE",
                &datasets,
            )
            .fetch_all(&mut *tx)
            .await?;
        }
        for i in order {
            if answers[i].is_some() {
                continue;
            }
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
        // Each job a success of this call may have finished.
        let mut finished: Vec<Uuid> = entries
            .iter()
            .zip(&answers)
            .filter(|(_, a)| {
                matches!(a, Some(Ok(r)) if r.state == dispatcher_wire::TaskState::Succeeded)
            })
            .map(|((fence, _, _), _)| fence.job_id)
            .collect();
        finished.sort();
        finished.dedup();
        self.finish_jobs_if_done(&finished).await?;
        for i in replays {
            let (fence, completion, _) = entries[i];
            answers[i] = Some(self.completion_replay(fence, &completion.to_json()).await);
        }
        Ok(answers
            .into_iter()
            .map(|a| a.unwrap_or_else(|| Err(StoreError::Retry("no answer".into()))))
            .collect())
    }

    /// Takes the batch's job locks (`lock_completion_jobs`, in job id
    /// order) and runs the fast path of a batch: every entry that is the
    /// success of a leaf (no dependants, nothing staged, not asked to stop)
    /// ends its task and records its attempt in **one call** for all of
    /// them (`complete_leaf_successes`, migration 0015, ADR 0020); the
    /// entry is then exactly what `complete_step` would have written for
    /// it. An entry the call did not end (fenced, a replay, or not a leaf)
    /// is left to `complete_step`. If the update fails, or an attempt turns
    /// out to have staged parts (committed while the update waited on its
    /// task row), the function undoes its writes and ends nothing, and
    /// every entry takes the ordinary path. Returns (entry index, answer).
    async fn complete_leaves(
        &self,
        tx: &mut PgConnection,
        entries: &[(Fence, &Completion, &[super::datasets::WrittenManifest])],
        locks: JobLocks<'_>,
    ) -> Result<Vec<(usize, CompleteResponse)>, StoreError> {
        // A task named twice in one batch goes the ordinary way, which
        // answers the second entry as a replay (or a conflict).
        let named_once = |i: usize| {
            entries
                .iter()
                .filter(|e| e.0.task_id == entries[i].0.task_id)
                .count()
                == 1
        };
        let candidates: Vec<usize> = (0..entries.len())
            .filter(|&i| {
                matches!(entries[i].1, Completion::Succeeded { .. })
                    && entries[i].2.is_empty()
                    && named_once(i)
            })
            .collect();
        if candidates.is_empty() {
            sqlx::query!(
                "SELECT lock_completion_jobs($1, $2, $3)",
                locks.jobs,
                locks.tasks,
                locks.succeeded,
            )
            .fetch_one(&mut *tx)
            .await?;
            return Ok(Vec::new());
        }
        let mut task_ids = Vec::with_capacity(candidates.len());
        let mut job_ids = Vec::with_capacity(candidates.len());
        let mut attempts = Vec::with_capacity(candidates.len());
        let mut completions = Vec::with_capacity(candidates.len());
        let mut responses = Vec::with_capacity(candidates.len());
        let mut answers = Vec::with_capacity(candidates.len());
        for &i in &candidates {
            let (fence, completion, _) = entries[i];
            let response = CompleteResponse {
                task_id: fence.task_id,
                attempt: fence.attempt,
                state: TaskState::Succeeded,
                retry_at: None,
                versions: Vec::new(),
            };
            task_ids.push(fence.task_id);
            job_ids.push(fence.job_id);
            attempts.push(fence.attempt_i32());
            completions.push(completion.to_json());
            responses.push(
                serde_json::to_value(&response)
                    .map_err(|e| StoreError::Db(sqlx::Error::Encode(e.into())))?,
            );
            answers.push(response);
        }
        let ended: Vec<Uuid> = sqlx::query_scalar!(
            r#"SELECT complete_leaf_successes($1, $2, $3, $4, $5, $6, $7, $8) AS "ended!""#,
            locks.jobs,
            locks.tasks,
            locks.succeeded,
            &task_ids,
            &job_ids,
            &attempts,
            &completions,
            &responses,
        )
        .fetch_one(&mut *tx)
        .await?;
        Ok(candidates
            .into_iter()
            .zip(answers)
            .filter(|(i, _)| ended.contains(&entries[*i].0.task_id))
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
        if *completion == Completion::Cancelled {
            // Only a task asked to stop may end as cancelled. The flag only
            // ever goes from false to true, so checking first is safe.
            let asked: Option<bool> = sqlx::query_scalar!(
                "SELECT cancel_requested FROM tasks
                  WHERE id = $1 AND job_id = $2 AND attempt = $3 AND state = 'leased'",
                fence.task_id,
                fence.job_id,
                fence.attempt_i32(),
            )
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
        let ended = sqlx::query!(
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
            fence.task_id,
            fence.job_id,
            fence.attempt_i32(),
            succeeded,
            retryable,
            crate::millis(self.retry_delay(fence.attempt_i32())) as f64,
        )
        .fetch_optional(&mut *tx)
        .await?
        .map(|r| (r.state, r.not_before));
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
        sqlx::query!(
            "UPDATE attempts
                SET finished_at = now(), outcome = $3, completion = $4, response = $5
              WHERE task_id = $1 AND attempt = $2",
            fence.task_id,
            fence.attempt_i32(),
            match completion {
                Completion::Succeeded { .. } => "succeeded",
                Completion::Failed { .. } => "failed",
                Completion::Cancelled => "cancelled",
            },
            &canonical,
            serde_json::to_value(&response)
                .map_err(|e| StoreError::Db(sqlx::Error::Encode(e.into())))?,
        )
        .execute(&mut *tx)
        .await?;
        after_transition(
            &mut *tx,
            self.settings.wakeups,
            fence.task_id,
            fence.job_id,
            state,
            retry_at,
        )
        .await?;
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
        let earlier = sqlx::query!(
            r#"SELECT completion = $3 AS "same!", response AS "response!" FROM attempts
                WHERE task_id = $1 AND attempt = $2 AND completion IS NOT NULL"#,
            fence.task_id,
            fence.attempt_i32(),
            canonical,
        )
        .fetch_optional(&mut *conn)
        .await?
        .map(|r| (r.same, r.response));
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

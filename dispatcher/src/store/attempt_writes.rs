//! Writes an attempt makes while it runs: heartbeats, events, buffer
//! publishes, each fenced in its statement.

use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

use super::tasks::*;
use super::Store;
use crate::domain::{NewBufferBatch, NewEvent};
use crate::error::StoreError;

impl Store {
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
        // A lease never reaches past the attempt's timeout plus one lease of
        // grace (review M6): the platform wrapper kills the task at its
        // timeout and reports it, but a contract worker that keeps
        // heartbeating must not hold the task for ever. Past that end the
        // heartbeat answers `lease_expired` and the reaper takes the task
        // back like any expired lease.
        let default_timeout =
            i32::try_from(self.settings.task_timeout_default.as_secs()).unwrap_or(i32::MAX);
        let mut conn = self.pool.acquire().await?;
        // Committed without waiting for the WAL flush (ADR 0018): a
        // heartbeat lost in a database crash shortens a lease, which costs
        // liveness, never safety. `set_config(…, true)` lasts until this
        // statement's transaction ends, so nothing else on the connection
        // is relaxed.
        let renewed: Vec<(Uuid, Uuid, i32, DateTime<Utc>, bool)> = sqlx::query!(
            r#"WITH f AS (
                 SELECT f.* FROM unnest($1::uuid[], $2::uuid[], $3::int[], $4::jsonb[])
                          AS f(id, job_id, attempt, progress),
                        (SELECT set_config('synchronous_commit', 'off', true)) AS relaxed
             ), renewed AS (
                 UPDATE tasks t
                    SET lease_expires_at = GREATEST(t.lease_expires_at, LEAST(
                            clock_timestamp() + t.lease_seconds * interval '1 second',
                            a.claimed_at + (COALESCE(s.timeout_seconds, $5::int) + t.lease_seconds)
                                           * interval '1 second'))
                   FROM (SELECT DISTINCT id, job_id, attempt FROM f) k, task_specs s, attempts a
                  WHERE t.id = k.id AND t.job_id = k.job_id AND t.attempt = k.attempt
                    AND s.task_id = t.id AND a.task_id = t.id AND a.attempt = t.attempt
                    AND t.state = 'leased' AND t.lease_expires_at > clock_timestamp()
              RETURNING t.id, t.job_id, t.attempt, t.lease_expires_at, t.cancel_requested
             ), progressed AS (
                 UPDATE attempts a SET progress = p.progress
                   FROM (SELECT DISTINCT ON (f.id) f.id, f.attempt, f.progress
                           FROM f JOIN renewed r ON r.id = f.id AND r.attempt = f.attempt
                          WHERE f.progress IS NOT NULL) p
                  WHERE a.task_id = p.id AND a.attempt = p.attempt
             )
             SELECT id AS "id!", job_id AS "job_id!", attempt AS "attempt!",
                    lease_expires_at AS "lease_expires_at!",
                    cancel_requested AS "cancel_requested!"
               FROM renewed"#,
            &ids,
            &jobs,
            &attempts,
            &progress as _,
            default_timeout,
        )
        .fetch_all(&mut *conn)
        .await?
        .into_iter()
        .map(|r| {
            (
                r.id,
                r.job_id,
                r.attempt,
                r.lease_expires_at,
                r.cancel_requested,
            )
        })
        .collect();
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
        let totals = sqlx::query!(
            r#"WITH fence AS (
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
             SELECT EXISTS (SELECT 1 FROM fence) AS "live!", (SELECT count(*) FROM ins) AS "inserted!",
                    (SELECT events FROM totals) AS events_total,
                    (SELECT event_bytes FROM totals) AS bytes_total"#,
            fence.task_id,
            fence.job_id,
            fence.attempt_i32(),
            &seqs,
            &kinds as _,
            &payloads as _,
        )
        .fetch_one(&mut *tx)
        .await?;
        let (live, inserted, events_total, bytes_total) = (
            totals.live,
            totals.inserted,
            totals.events_total,
            totals.bytes_total,
        );
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
            let differing = sqlx::query_scalar!(
                "SELECT t.seq FROM task_events t
                   JOIN unnest($3::bigint[], $4::text[], $5::jsonb[]) AS e(seq, kind, payload)
                     ON t.seq = e.seq
                  WHERE t.task_id = $1 AND t.attempt = $2
                    AND (t.kind <> e.kind OR t.payload <> e.payload)
                  LIMIT 1",
                fence.task_id,
                fence.attempt_i32(),
                &seqs,
                &kinds as _,
                &payloads as _,
            )
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
        let published = sqlx::query!(
            r#"WITH fence AS (
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
             SELECT EXISTS (SELECT 1 FROM fence) AS "live!", (SELECT mode FROM ds) AS mode,
                    EXISTS (SELECT 1 FROM ins) AS "inserted!""#,
            fence.task_id,
            fence.job_id,
            fence.attempt_i32(),
            batch.batch_id,
            &batch.dataset,
            &batch.object_key,
            batch.rows,
            &batch.sha256,
            under_prefix,
        )
        .fetch_one(&mut *tx)
        .await?;
        let (live, mode, inserted) = (published.live, published.mode, published.inserted);
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
        let same = sqlx::query_scalar!(
            r#"SELECT coalesce(b.task_id = $2 AND b.dataset = $3 AND b.object_key = $6
                    AND ((b.sha256 = $5 AND b.rows = $4)
                         OR (b.replaced_sha256 = $5 AND b.replaced_rows = $4)), false) AS "same!"
               FROM buffer_publishes b JOIN tasks t ON t.id = $2 JOIN jobs j ON j.id = t.job_id
              WHERE b.org_id = j.org_id AND b.batch_id = $1"#,
            batch.batch_id,
            fence.task_id,
            &batch.dataset,
            batch.rows,
            &batch.sha256,
            &batch.object_key,
        )
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
}

//! The buffer sink (ADR 0006): a role of `dispatcher serve` that consumes
//! buffer pointers from the `buffers` queue and ingests each batch into the
//! data database at most once and wholly or not at all (invariant 8).
//!
//! For each pointer: load the batch (the state database is the truth; a
//! batch that is not `pending` is skipped), fetch its object, check its
//! sha256, parse every line strictly with the parser staging uses
//! (`crate::rows`), check the row count, then in **one data-database
//! transaction** record the batch in `sink_batches` under the unique key
//! (org, batch id) and insert its rows. A second delivery, a replayed
//! publish or a crash between that commit and the queue delete finds the
//! key taken and inserts nothing. Only then is the batch marked `ingested`
//! in the state database and the pointer deleted.
//!
//! A malformed batch inserts nothing and becomes `dead` with the contract's
//! reason code and line; operators replay or purge it
//! (`dispatcher admin sink dead …`). A transient failure (object store,
//! data or state database down) never makes a batch dead: the pointer is
//! sent again with a growing delay, and the reaper sends a new one for any
//! batch left pending past `batch_repoint_after`.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dispatcher_wire::{Column, ColumnType};
use serde::{Deserialize, Serialize};
use sha2::Digest;
use sqlx::PgPool;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::datadb::quote_ident;
use crate::error::StoreError;
use crate::objects::{ObjectError, ObjectStore};
use crate::queue::{Delivery, Queue, QueueError, BUFFERS};
use crate::rows::{ReasonCode, RowError};
use crate::settings::Settings;
use crate::store::{SinkBatch, Store};

/// Rows go to the data database in statements of at most this many bytes
/// of JSON, so a large batch never becomes one huge parameter.
const CHUNK_BYTES: usize = 4 * 1024 * 1024;

/// The body of a buffer pointer (an outbox row of topic `buffer`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Pointer {
    pub org_id: Uuid,
    pub batch_id: Uuid,
    /// Transient failures so far (the sink's own re-sends count them).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub retry: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// What became of one batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Its rows are in the data database now.
    Ingested { rows: u64 },
    /// It was already there (a duplicate delivery or replayed publish).
    Duplicate,
    /// Malformed: nothing inserted; the batch is `dead` with this reason.
    Dead(RowError),
    /// Nothing to do: the batch is not pending (ingested, dead, purged).
    Skipped(String),
}

/// A failure that says nothing about the batch; it is tried again later.
#[derive(Debug, thiserror::Error)]
pub enum Transient {
    #[error("object store: {0}")]
    Objects(ObjectError),
    #[error("data database: {0}")]
    Data(sqlx::Error),
    #[error("state database: {0}")]
    State(StoreError),
    #[error("queue: {0}")]
    Queue(QueueError),
}

impl From<StoreError> for Transient {
    fn from(e: StoreError) -> Self {
        Transient::State(e)
    }
}

pub struct Sink {
    store: Store,
    data: PgPool,
    queue: Arc<dyn Queue>,
    objects: Arc<dyn ObjectStore>,
    settings: Arc<Settings>,
    /// Datasets whose row table this process has made sure of.
    tables: Mutex<HashSet<Uuid>>,
}

impl Sink {
    pub fn new(
        store: Store,
        data: PgPool,
        queue: Arc<dyn Queue>,
        objects: Arc<dyn ObjectStore>,
        settings: Arc<Settings>,
    ) -> Arc<Self> {
        Arc::new(Sink {
            store,
            data,
            queue,
            objects,
            settings,
            tables: Mutex::new(HashSet::new()),
        })
    }

    /// The data database's table of a stream dataset's rows.
    pub fn table_name(dataset_id: Uuid) -> String {
        format!("stream_{}", dataset_id.simple())
    }

    /// Consumes the `buffers` queue until `shutdown`; batches in hand are
    /// finished first.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        tracing::info!(
            concurrency = self.settings.sink_concurrency,
            "buffer sink started"
        );
        let mut failures = 0u32;
        loop {
            // Only the wait for pointers is cut short by a shutdown; the
            // batches received are handled to the end.
            let received = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = self.receive(self.settings.queue_max_wait) => r,
            };
            crate::metrics::role_pass("sink", &received);
            match received {
                Ok(got) => {
                    failures = 0;
                    self.handle_all(got).await;
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    let pause = self.settings.sink_retry_delay(failures, rand::random());
                    tracing::warn!(error = %e, pause_ms = pause.as_millis() as u64, "buffer sink could not receive");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(pause) => {}
                    }
                }
            }
        }
        tracing::info!("buffer sink stopped");
    }

    /// Receives one round of pointers (waiting up to `wait` for one) and
    /// handles them, `sink_concurrency` at a time. The number handled.
    pub async fn poll(self: &Arc<Self>, wait: Duration) -> Result<usize, QueueError> {
        let got = self.receive(wait).await?;
        let n = got.len();
        self.handle_all(got).await;
        Ok(n)
    }

    async fn receive(&self, wait: Duration) -> Result<Vec<Delivery>, QueueError> {
        let max = u32::try_from(self.settings.sink_concurrency.clamp(1, 10)).unwrap_or(10);
        self.queue
            .receive(BUFFERS, max, wait, self.settings.sink_visibility)
            .await
    }

    async fn handle_all(self: &Arc<Self>, got: Vec<Delivery>) {
        let mut running = JoinSet::new();
        for d in got {
            let me = self.clone();
            running.spawn(async move { me.handle(d).await });
        }
        while running.join_next().await.is_some() {}
    }

    /// Handles one delivery: ingests its batch and deletes it, or on a
    /// transient failure sends the pointer again after a backoff.
    pub async fn handle(&self, d: Delivery) {
        let pointer: Pointer = match serde_json::from_value(d.body.clone()) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, body = %d.body, "dropping a malformed buffer pointer");
                self.delete(&d.receipt_handle).await;
                return;
            }
        };
        // While the batch is in hand its pointer stays hidden: the
        // visibility is extended every third of it, so a short visibility
        // (fast takeover after a crash) never lets a slow batch go to a
        // second sink.
        let ingest = self.ingest(pointer.org_id, pointer.batch_id);
        tokio::pin!(ingest);
        let every = (self.settings.sink_visibility / 3).max(Duration::from_millis(100));
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        let result = loop {
            tokio::select! {
                r = &mut ingest => break r,
                _ = tick.tick() => {
                    if let Err(e) = self
                        .queue
                        .change_visibility(BUFFERS, &d.receipt_handle, self.settings.sink_visibility)
                        .await
                    {
                        tracing::debug!(error = %e, "could not extend a buffer pointer's visibility");
                    }
                }
            }
        };
        match result {
            Ok(outcome) => {
                let counted = match &outcome {
                    Outcome::Ingested { .. } => Some("ingested"),
                    Outcome::Duplicate => Some("duplicate"),
                    Outcome::Dead(_) => Some("dead"),
                    Outcome::Skipped(_) => None,
                };
                if let Some(result) = counted {
                    metrics::counter!(crate::metrics::SINK_BATCHES, "result" => result)
                        .increment(1);
                }
                match &outcome {
                    Outcome::Ingested { rows } => {
                        tracing::info!(batch_id = %pointer.batch_id, rows, "buffer batch ingested")
                    }
                    Outcome::Duplicate => {
                        tracing::info!(batch_id = %pointer.batch_id, "buffer batch was already ingested")
                    }
                    Outcome::Dead(why) => {
                        tracing::warn!(batch_id = %pointer.batch_id, reason = %why, "buffer batch is dead")
                    }
                    Outcome::Skipped(why) => {
                        tracing::debug!(batch_id = %pointer.batch_id, why, "buffer pointer skipped")
                    }
                }
                self.delete(&d.receipt_handle).await;
            }
            Err(e) => self.retry_later(&d, pointer, &e).await,
        }
    }

    async fn delete(&self, receipt: &str) {
        if let Err(e) = self.queue.delete(BUFFERS, receipt).await {
            // The pointer comes back after its visibility timeout and is
            // then a duplicate: harmless.
            tracing::warn!(error = %e, "could not delete a buffer pointer");
        }
    }

    /// A fresh pointer with the failure counted, delayed by the backoff
    /// (which also resets the queue's receive count, so a transient
    /// failure never sends a pointer to the DLQ); failing that, the
    /// delivery itself comes back after the backoff.
    async fn retry_later(&self, d: &Delivery, pointer: Pointer, error: &Transient) {
        let retry = pointer.retry.saturating_add(1);
        let delay = self.settings.sink_retry_delay(retry, rand::random());
        tracing::warn!(batch_id = %pointer.batch_id, retry, delay_ms = delay.as_millis() as u64,
            error = %error, "buffer batch failed transiently; it will be tried again");
        if let Err(e) = self
            .store
            .note_batch_retry(pointer.org_id, pointer.batch_id, &error.to_string())
            .await
        {
            tracing::debug!(error = %e, "could not count the transient failure");
        }
        let next = Pointer { retry, ..pointer };
        let body = serde_json::to_value(&next).unwrap_or_default();
        match self.queue.send(BUFFERS, &body, delay).await {
            Ok(_) => self.delete(&d.receipt_handle).await,
            Err(e) => {
                tracing::warn!(error = %e, "could not re-send a buffer pointer; the delivery will return");
                let _ = self
                    .queue
                    .change_visibility(BUFFERS, &d.receipt_handle, delay)
                    .await;
            }
        }
    }

    /// Ingests one batch (see the module documentation).
    pub async fn ingest(&self, org_id: Uuid, batch_id: Uuid) -> Result<Outcome, Transient> {
        let Some(batch) = self.store.sink_batch(org_id, batch_id).await? else {
            return Ok(Outcome::Skipped("no such batch".into()));
        };
        if batch.state != "pending" {
            return Ok(Outcome::Skipped(format!("the batch is {}", batch.state)));
        }
        let body = match self.fetch(&batch).await? {
            Ok(body) => body,
            Err(why) => return self.dead(&batch, why).await,
        };
        let rows = match crate::rows::parse_rows(
            &body,
            &batch.columns,
            self.settings.max_row_bytes,
            |_| {},
        ) {
            Ok(n) => n,
            Err(why) => return self.dead(&batch, why).await,
        };
        if i64::try_from(rows).ok() != Some(batch.rows) {
            let why = RowError {
                code: ReasonCode::RowCountMismatch,
                line: None,
                message: format!("the object has {rows} rows, not {}", batch.rows),
            };
            return self.dead(&batch, why).await;
        }
        self.ensure_table(&batch).await?;
        match self.insert(&batch, &body).await {
            Ok(true) => {}
            Ok(false) => {
                // Already ingested: by a duplicate delivery, or before a
                // crash that left the state database behind.
                let stored = sqlx::query_scalar!(
                    "SELECT sha256 FROM sink_batches WHERE org_id = $1 AND batch_id = $2",
                    batch.org_id,
                    batch.batch_id,
                )
                .fetch_optional(&self.data)
                .await
                .map_err(Transient::Data)?;
                if stored.as_deref().is_some_and(|s| s != batch.sha256) {
                    let why = RowError {
                        code: ReasonCode::ChecksumMismatch,
                        line: None,
                        message: format!(
                            "batch {} was already ingested with sha256 {}; it is never ingested twice",
                            batch.batch_id,
                            stored.unwrap_or_default()
                        ),
                    };
                    return self.dead(&batch, why).await;
                }
                self.store
                    .mark_batch_ingested(batch.org_id, batch.batch_id)
                    .await?;
                return Ok(Outcome::Duplicate);
            }
            // The data database refused a value the parser let through
            // (a float past double precision, say): the batch is at fault.
            Err(sqlx::Error::Database(e))
                if e.code().as_deref().is_some_and(|c| c.starts_with("22")) =>
            {
                let why = RowError {
                    code: ReasonCode::WrongType,
                    line: None,
                    message: format!("the data database refused a value: {}", e.message()),
                };
                return self.dead(&batch, why).await;
            }
            Err(e) => return Err(Transient::Data(e)),
        }
        self.settings.failpoint("sink_after_ingest");
        self.store
            .mark_batch_ingested(batch.org_id, batch.batch_id)
            .await?;
        Ok(Outcome::Ingested { rows })
    }

    /// The batch's bytes, checked against its published size bound and
    /// checksum; `Ok(Err(_))` is a verdict on the batch.
    async fn fetch(&self, batch: &SinkBatch) -> Result<Result<Vec<u8>, RowError>, Transient> {
        let missing = |message: String| RowError {
            code: ReasonCode::ObjectMissing,
            line: None,
            message,
        };
        let meta = match self.objects.head(&batch.object_key).await {
            Ok(m) => m,
            Err(ObjectError::NotFound(k)) => return Ok(Err(missing(format!("no object {k:?}")))),
            Err(e) => return Err(Transient::Objects(e)),
        };
        if meta.size > self.settings.max_part_bytes {
            return Ok(Err(RowError {
                code: ReasonCode::RowTooLarge,
                line: None,
                message: format!(
                    "the batch object has {} bytes; a batch may have at most {}",
                    meta.size, self.settings.max_part_bytes
                ),
            }));
        }
        let body = match self.objects.get(&batch.object_key).await {
            Ok(b) => b,
            Err(ObjectError::NotFound(k)) => return Ok(Err(missing(format!("no object {k:?}")))),
            Err(e) => return Err(Transient::Objects(e)),
        };
        let sum = hex::encode(sha2::Sha256::digest(&body));
        if sum != batch.sha256 {
            return Ok(Err(RowError {
                code: ReasonCode::ChecksumMismatch,
                line: None,
                message: format!(
                    "the object's sha256 is {sum}, the publish said {}",
                    batch.sha256
                ),
            }));
        }
        Ok(Ok(body))
    }

    async fn dead(&self, batch: &SinkBatch, why: RowError) -> Result<Outcome, Transient> {
        self.store
            .mark_batch_dead(batch.org_id, batch.batch_id, &why)
            .await?;
        Ok(Outcome::Dead(why))
    }

    /// Creates the dataset's row table in the data database if needed
    /// (once per process and dataset; concurrent sinks serialise on an
    /// advisory lock).
    async fn ensure_table(&self, batch: &SinkBatch) -> Result<(), Transient> {
        if self
            .tables
            .lock()
            .expect("tables")
            .contains(&batch.dataset_id)
        {
            return Ok(());
        }
        let ddl = table_ddl(&Self::table_name(batch.dataset_id), &batch.columns);
        let mut tx = self.data.begin().await.map_err(Transient::Data)?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('dispatcher-sink-ddl'))")
            .execute(&mut *tx)
            .await
            .map_err(Transient::Data)?;
        sqlx::query(&ddl)
            .execute(&mut *tx)
            .await
            .map_err(Transient::Data)?;
        tx.commit().await.map_err(Transient::Data)?;
        self.tables.lock().expect("tables").insert(batch.dataset_id);
        Ok(())
    }

    /// Records the batch and inserts its rows in one transaction; `false`
    /// (and nothing inserted) if the batch was recorded before. `body` has
    /// been parsed strictly already: every line is one JSON object whose
    /// keys are column names.
    async fn insert(&self, batch: &SinkBatch, body: &[u8]) -> Result<bool, sqlx::Error> {
        let mut tx = self.data.begin().await?;
        let recorded = sqlx::query!(
            "INSERT INTO sink_batches (org_id, batch_id, dataset_id, rows, sha256, task_id, attempt)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (org_id, batch_id) DO NOTHING",
            batch.org_id,
            batch.batch_id,
            batch.dataset_id,
            batch.rows,
            &batch.sha256,
            batch.task_id,
            batch.attempt,
        )
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if !recorded {
            tx.rollback().await?;
            return Ok(false);
        }
        let insert = insert_sql(&Self::table_name(batch.dataset_id), &batch.columns);
        for (first_line, array) in json_chunks(body, CHUNK_BYTES) {
            sqlx::query(&insert)
                .bind(array)
                .bind(batch.batch_id)
                .bind(i32::try_from(first_line - 1).unwrap_or(i32::MAX))
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(true)
    }
}

/// Dead batches one operator command handles at most; run it again for
/// more.
pub const ADMIN_BATCH_LIMIT: u32 = 100_000;

/// One dead batch an operator replay handled (or, dry, would handle).
#[derive(Debug, Clone)]
pub struct Replayed {
    pub batch: crate::store::DeadBatch,
    /// With `--accept-current-object`: the object's checksum and row count
    /// now, which the batch takes.
    pub accepted: Option<(String, i64)>,
    /// Whether it went back to pending (always `false` when dry).
    pub replayed: bool,
}

/// `dispatcher admin sink dead replay`: sends the dead batches matching
/// `filter` back to the sink. The sink checks them again against their
/// published checksum and row count, so a replay ingests a batch whose
/// object was restored; `accept_current_object` instead takes the
/// object's current checksum and row count (an operator fixed its
/// content). A replayed batch is ingested once however often it is
/// replayed: once ingested it is no longer dead, and the data database
/// refuses a batch id twice.
pub async fn replay_dead(
    store: &Store,
    objects: &dyn ObjectStore,
    filter: &crate::store::DeadFilter,
    accept_current_object: bool,
    dry_run: bool,
) -> anyhow::Result<Vec<Replayed>> {
    let dead = store.dead_batches(filter, ADMIN_BATCH_LIMIT).await?;
    let mut out = Vec::with_capacity(dead.len());
    for batch in dead {
        let accepted = if accept_current_object {
            match objects.get(&batch.object_key).await {
                Ok(body) => {
                    let sha = hex::encode(sha2::Sha256::digest(&body));
                    let trimmed = body.strip_suffix(b"\n").unwrap_or(&body);
                    let rows = if trimmed.is_empty() {
                        0
                    } else {
                        trimmed.split(|b| *b == b'\n').count()
                    };
                    Some((sha, i64::try_from(rows).unwrap_or(i64::MAX)))
                }
                Err(ObjectError::NotFound(k)) => {
                    anyhow::bail!(
                        "batch {}: no object {k:?} to accept; upload the fixed batch there first",
                        batch.batch_id
                    )
                }
                Err(e) => return Err(e.into()),
            }
        } else {
            None
        };
        let replayed = if dry_run {
            false
        } else {
            store
                .replay_dead_batch(
                    batch.org_id,
                    batch.batch_id,
                    accepted.as_ref().map(|(s, r)| (s.as_str(), *r)),
                )
                .await?
        };
        out.push(Replayed {
            batch,
            accepted,
            replayed,
        });
    }
    Ok(out)
}

fn sql_type(kind: ColumnType) -> &'static str {
    match kind {
        ColumnType::String => "text",
        ColumnType::Int64 => "bigint",
        ColumnType::Float64 => "double precision",
        ColumnType::Bool => "boolean",
        ColumnType::Timestamp => "timestamptz",
        ColumnType::Json => "jsonb",
    }
}

/// `CREATE TABLE IF NOT EXISTS` of a stream dataset's rows: `_batch_id`,
/// `_line` (1-based, within the batch; together the primary key) and one
/// typed column per schema column. Column names match
/// `^[a-z][a-z0-9_]{0,62}$` (the registry checks), so none starts with `_`.
fn table_ddl(table: &str, columns: &[Column]) -> String {
    let mut cols = String::from("_batch_id uuid NOT NULL, _line integer NOT NULL");
    for c in columns {
        cols.push_str(&format!(
            ", {} {}{}",
            quote_ident(&c.name),
            sql_type(c.kind),
            if c.nullable { "" } else { " NOT NULL" }
        ));
    }
    format!(
        "CREATE TABLE IF NOT EXISTS {} ({cols}, PRIMARY KEY (_batch_id, _line))",
        quote_ident(table)
    )
}

/// Inserts the rows of one JSON array (`$1`) of a batch (`$2`) whose first
/// line is `$3 + 1`; Postgres converts each value to its column's type.
fn insert_sql(table: &str, columns: &[Column]) -> String {
    let table = quote_ident(table);
    let names: Vec<String> = columns.iter().map(|c| quote_ident(&c.name)).collect();
    let picked: Vec<String> = names.iter().map(|n| format!("r.{n}")).collect();
    format!(
        "INSERT INTO {table} (_batch_id, _line{sep}{cols})
         SELECT $2, $3 + e.ord::integer{sep}{picked}
           FROM jsonb_array_elements($1::text::jsonb) WITH ORDINALITY AS e(doc, ord),
                LATERAL jsonb_populate_record(NULL::{table}, e.doc) AS r",
        sep = if names.is_empty() { "" } else { ", " },
        cols = names.join(", "),
        picked = picked.join(", "),
    )
}

/// The lines of a (strictly parsed) JSON Lines body as JSON arrays of at
/// most about `max_bytes` each, with the 1-based number of each array's
/// first line.
fn json_chunks(body: &[u8], max_bytes: usize) -> Vec<(usize, String)> {
    let body = body.strip_suffix(b"\n").unwrap_or(body);
    let mut out = Vec::new();
    if body.is_empty() {
        return out;
    }
    let mut current = String::from("[");
    let mut first = 1usize;
    for (i, raw) in body.split(|b| *b == b'\n').enumerate() {
        // Parsed already: every line is UTF-8 (a trailing `\r` is JSON
        // whitespace).
        let line = String::from_utf8_lossy(raw);
        if current.len() > 1 && current.len() + line.len() > max_bytes {
            current.push(']');
            out.push((first, std::mem::replace(&mut current, String::from("["))));
            first = i + 1;
        }
        if current.len() > 1 {
            current.push(',');
        }
        current.push_str(&line);
    }
    current.push(']');
    out.push((first, current));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_keep_every_line_once_with_its_number() {
        let body = b"{\"a\":1}\n{\"a\":2}\n{\"a\":3}\n";
        assert_eq!(
            json_chunks(body, 1 << 20),
            vec![(1, "[{\"a\":1},{\"a\":2},{\"a\":3}]".to_owned())]
        );
        assert_eq!(
            json_chunks(body, 10),
            vec![
                (1, "[{\"a\":1}]".to_owned()),
                (2, "[{\"a\":2}]".to_owned()),
                (3, "[{\"a\":3}]".to_owned())
            ]
        );
        assert!(json_chunks(b"", 10).is_empty());
    }

    #[test]
    fn pointers_round_trip_and_old_ones_have_no_retry() {
        let p: Pointer = serde_json::from_value(serde_json::json!({
            "org_id": Uuid::nil(), "batch_id": Uuid::nil()}))
        .unwrap();
        assert_eq!(p.retry, 0);
        let again = Pointer { retry: 3, ..p };
        let v = serde_json::to_value(&again).unwrap();
        assert_eq!(v["retry"], 3);
    }
}

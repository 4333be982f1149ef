//! Outbox relay: publishes outbox rows to their queues (invariant 5).
//!
//! Takes due rows in batches (one committed statement, `SKIP LOCKED`, so
//! several replicas share the work; taken rows are hidden from other relays
//! for `relay_hold`), publishes them with no transaction open (one batch
//! call per queue: SQS `SendMessageBatch`, one `INSERT` locally), then marks
//! each row by the queue's own answer for it: sent only on an explicit
//! success; a row the queue did not answer is a failure. A crash between
//! publish and mark-sent leaves the rows pending, due again when their hold
//! ends, so they are published again: duplicates, never loss.
//! Failed publishes are retried with exponential backoff and jitter; after
//! `relay_max_tries` a row is marked `dead`, where operators see and requeue
//! it (`dispatcher admin outbox`). Wakes on `LISTEN outbox` (registered
//! before the first query) and polls every `relay_poll` as a fallback.

use std::collections::BTreeMap;
use std::sync::Arc;

use sqlx::postgres::PgListener;
use tokio_util::sync::CancellationToken;

use crate::queue::{queue_for_topic, Queue};
use crate::settings::Settings;
use crate::store::Store;

pub struct Relay {
    store: Store,
    queue: Arc<dyn Queue>,
    settings: Arc<Settings>,
}

impl Relay {
    pub fn new(store: Store, queue: Arc<dyn Queue>, settings: Arc<Settings>) -> Self {
        Relay {
            store,
            queue,
            settings,
        }
    }

    /// Publishes one batch of due rows; returns how many rows it handled.
    pub async fn relay_once(&self) -> Result<usize, crate::error::StoreError> {
        let rows = self
            .store
            .outbox_take(self.settings.relay_batch, self.settings.relay_hold)
            .await?;
        if rows.is_empty() {
            return Ok(0);
        }
        // Publish per queue, in batches (one call per queue where the queue
        // has a batch call), keeping each row's own outcome. A row counts
        // as sent only when the queue answered success for it.
        let mut by_queue: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        let mut outcomes: Vec<Result<(), String>> = Vec::with_capacity(rows.len());
        for (i, row) in rows.iter().enumerate() {
            match queue_for_topic(&row.topic) {
                Some(queue) => {
                    by_queue.entry(queue).or_default().push(i);
                    outcomes.push(Err("the queue gave no answer for this message".into()));
                }
                None => outcomes.push(Err(format!("no queue for topic {:?}", row.topic))),
            }
        }
        for (queue, members) in by_queue {
            let bodies: Vec<_> = members.iter().map(|&i| rows[i].payload.clone()).collect();
            match self.queue.send_batch(queue, &bodies).await {
                Ok(answers) => {
                    // `zip` stops at the shorter list: entries the queue did
                    // not answer keep their "no answer" failure.
                    for (&i, answer) in members.iter().zip(answers) {
                        outcomes[i] = answer.map(drop);
                    }
                }
                Err(e) => {
                    for &i in &members {
                        outcomes[i] = Err(e.to_string());
                    }
                }
            }
        }
        let mut sent = Vec::with_capacity(rows.len());
        let mut failed = Vec::new();
        for (row, outcome) in rows.iter().zip(outcomes) {
            match outcome {
                Ok(()) => sent.push(row.id),
                Err(error) => {
                    let tries = u32::try_from(row.tries).unwrap_or(0) + 1;
                    tracing::warn!(outbox_id = row.id, tries, error, "outbox publish failed");
                    let delay = self.settings.relay_retry_delay(tries, rand::random());
                    failed.push((row.id, error, delay));
                }
            }
        }
        self.settings.failpoint("relay_after_publish");
        self.store
            .outbox_finish(&sent, &failed, self.settings.relay_max_tries)
            .await?;
        Ok(rows.len())
    }

    /// Runs until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut listener = self.listen().await;
        tracing::info!(notify = listener.is_some(), "outbox relay started");
        loop {
            let pass = self.relay_once().await;
            crate::metrics::role_pass("relay", &pass);
            match pass {
                Ok(n) if n >= self.settings.relay_batch as usize => continue,
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "outbox relay pass failed"),
            }
            let notified = async {
                match listener.as_mut() {
                    Some(l) => l.recv().await.map(drop),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                r = notified => if r.is_err() {
                    tracing::warn!("outbox listener lost; polling until it is back");
                    listener = self.listen().await;
                },
                _ = tokio::time::sleep(self.settings.relay_poll) => {}
            }
        }
        tracing::info!("outbox relay stopped");
    }

    async fn listen(&self) -> Option<PgListener> {
        let mut l = PgListener::connect_with(self.store.pool()).await.ok()?;
        l.listen("outbox").await.ok()?;
        Some(l)
    }
}

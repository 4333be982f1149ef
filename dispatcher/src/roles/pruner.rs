//! The pruner role (issue 25): keeps the state database the size of its
//! retention. Every `job_prune_interval` it deletes finished jobs older
//! than `job_retention` with their tasks, attempts, events and publishes,
//! `job_prune_batch` jobs per statement with a pause between statements,
//! skipping rows another transaction holds: it never waits on the hot path.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::error::StoreError;
use crate::settings::Settings;
use crate::store::Store;

pub struct Pruner {
    store: Store,
    settings: Arc<Settings>,
}

impl Pruner {
    pub fn new(store: Store, settings: Arc<Settings>) -> Self {
        Pruner { store, settings }
    }

    /// One pass: batches until one deletes fewer than a batch, or
    /// `shutdown`. How many jobs it deleted.
    pub async fn prune_once(&self, shutdown: &CancellationToken) -> Result<u64, StoreError> {
        let mut total = 0;
        loop {
            let n = self
                .store
                .prune_finished_jobs(self.settings.job_retention, self.settings.job_prune_batch)
                .await?;
            total += n;
            if n < u64::from(self.settings.job_prune_batch) || shutdown.is_cancelled() {
                return Ok(total);
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(total),
                _ = tokio::time::sleep(self.settings.job_prune_pause) => {}
            }
        }
    }

    pub async fn run(self, shutdown: CancellationToken) {
        tracing::info!(
            retention_hours = self.settings.job_retention.as_secs() / 3600,
            "job pruner started"
        );
        loop {
            match self.prune_once(&shutdown).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(jobs = n, "pruned finished jobs past their retention"),
                Err(e) => tracing::warn!(error = %e, "pruning jobs failed; trying again later"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(self.settings.job_prune_interval) => {}
            }
        }
    }
}

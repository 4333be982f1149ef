//! The pruner role (issue 25): keeps the state database the size of its
//! retention. Every `job_prune_interval` it deletes finished jobs older
//! than `job_retention` with their tasks, attempts, events and publishes,
//! `job_prune_batch` jobs per statement with a pause between statements,
//! skipping rows another transaction holds: it never waits on the hot path.
//! The attempts' logs of the jobs it deletes join a deletion queue in the
//! same statement; each pass then deletes queued objects from the object
//! store, `job_prune_batch` at a time (`services::logs::delete_queued`).

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::error::StoreError;
use crate::objects::ObjectStore;
use crate::settings::Settings;
use crate::store::Store;

pub struct Pruner {
    store: Store,
    objects: Arc<dyn ObjectStore>,
    settings: Arc<Settings>,
}

/// What one pass deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    pub jobs: u64,
    /// Objects (logs of pruned jobs) deleted from the object store.
    pub objects: u64,
}

impl Pruner {
    pub fn new(store: Store, objects: Arc<dyn ObjectStore>, settings: Arc<Settings>) -> Self {
        Pruner {
            store,
            objects,
            settings,
        }
    }

    /// One pass: batches of jobs, then of queued objects, each until one
    /// deletes fewer than a batch, or `shutdown`.
    pub async fn prune_once(&self, shutdown: &CancellationToken) -> Result<Pruned, StoreError> {
        let mut total = Pruned::default();
        let batch = self.settings.job_prune_batch;
        let mut jobs_left = true;
        loop {
            if jobs_left {
                let n = self
                    .store
                    .prune_finished_jobs(self.settings.job_retention, batch)
                    .await?;
                total.jobs += n;
                metrics::counter!(crate::metrics::RETENTION_DELETIONS, "kind" => "job")
                    .increment(n);
                jobs_left = n == u64::from(batch);
            }
            let n = crate::services::logs::delete_queued(&self.store, self.objects.as_ref(), batch)
                .await? as u64;
            total.objects += n;
            metrics::counter!(crate::metrics::RETENTION_DELETIONS, "kind" => "log_object")
                .increment(n);
            if (!jobs_left && n < u64::from(batch)) || shutdown.is_cancelled() {
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
            retention_seconds = self.settings.job_retention.as_secs(),
            interval_seconds = self.settings.job_prune_interval.as_secs(),
            "job pruner started"
        );
        loop {
            let pass = self.prune_once(&shutdown).await;
            crate::metrics::role_pass("pruner", &pass);
            match pass {
                Ok(Pruned {
                    jobs: 0,
                    objects: 0,
                }) => {}
                Ok(Pruned { jobs, objects }) => {
                    tracing::info!(jobs, objects, "pruned finished jobs past their retention")
                }
                Err(e) => tracing::warn!(error = %e, "pruning jobs failed; trying again later"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(self.settings.job_prune_interval) => {}
            }
        }
    }
}

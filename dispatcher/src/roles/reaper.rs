//! Lease reaper: ends expired leases by the rules of a retryable failure
//! (retry with backoff while attempts remain, else the task and job fail; a
//! task whose job was stopped becomes cancelled), wakes ready tasks whose
//! wake-up went missing, sends a new pointer for buffer batches left pending
//! long after their last one, cancels jobs past their deadline, ends jobs a
//! crash left running with every task succeeded, and purges
//! old sent outbox rows. Every step is
//! fenced or `SKIP LOCKED`, so several replicas may run it.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::error::StoreError;
use crate::settings::Settings;
use crate::store::Store;

/// Lease expirations run at once by one reaper pass.
/// The shortest wait between expiry checks.
const MIN_EXPIRY_WAIT: std::time::Duration = std::time::Duration::from_millis(50);
const REAPER_CONCURRENCY: usize = 8;

pub struct Reaper {
    store: Store,
    settings: Arc<Settings>,
}

/// What one pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReapReport {
    pub expired: u64,
    pub rewoken: u64,
    pub repointed: u64,
    pub purged: u64,
    /// Jobs cancelled because their deadline passed.
    pub overdue: u64,
    /// Running jobs ended `succeeded` because every task had (a crash came
    /// between the last success's commit and the job's end).
    pub finished: u64,
}

impl Reaper {
    pub fn new(store: Store, settings: Arc<Settings>) -> Self {
        Reaper { store, settings }
    }

    /// Ends the leases that have expired (up to a batch); returns how many.
    pub async fn expire_due(&self) -> Result<u64, StoreError> {
        // Expirations are independent transactions (each fenced), so they
        // run a few at a time: recovery time should not grow with the
        // number of leases a dead worker held.
        let due = self
            .store
            .expired_leases(self.settings.reaper_batch)
            .await?;
        let mut expired = 0;
        let mut pending = due.into_iter();
        let mut running = tokio::task::JoinSet::new();
        loop {
            while running.len() < REAPER_CONCURRENCY {
                let Some(task_id) = pending.next() else { break };
                let store = self.store.clone();
                running.spawn(async move { (task_id, store.expire_lease(task_id).await) });
            }
            let Some(done) = running.join_next().await else {
                break;
            };
            match done {
                Ok((task_id, Ok(Some(state)))) => {
                    tracing::info!(%task_id, state = state.as_str(), "expired lease reaped");
                    expired += 1;
                    metrics::counter!(crate::metrics::LEASE_EXPIRIES).increment(1);
                }
                Ok((_, Ok(None))) => {}
                Ok((task_id, Err(e))) => {
                    tracing::warn!(%task_id, error = %e, "expiring a lease failed")
                }
                Err(e) => tracing::warn!(error = %e, "expiry task panicked"),
            }
        }
        Ok(expired)
    }

    pub async fn reap_once(&self) -> Result<ReapReport, StoreError> {
        let mut report = ReapReport {
            expired: self.expire_due().await?,
            ..ReapReport::default()
        };
        report.rewoken = self
            .store
            .rewake_stale_ready(self.settings.rewake_after, self.settings.reaper_batch)
            .await?;
        if report.rewoken > 0 {
            tracing::info!(
                count = report.rewoken,
                "woke ready tasks whose wake-up went missing"
            );
        }
        report.repointed = self
            .store
            .repoint_stale_batches(
                self.settings.batch_repoint_after,
                self.settings.reaper_batch,
            )
            .await?;
        if report.repointed > 0 {
            tracing::info!(
                count = report.repointed,
                "sent new pointers for buffer batches still pending"
            );
        }
        report.overdue = self
            .store
            .cancel_overdue_jobs(self.settings.reaper_batch)
            .await?;
        report.finished = self
            .store
            .finish_done_jobs(self.settings.reaper_batch)
            .await?;
        if report.finished > 0 {
            tracing::info!(
                count = report.finished,
                "ended jobs whose every task had succeeded"
            );
        }
        report.purged = self
            .store
            .purge_sent_outbox(self.settings.outbox_retention)
            .await?;
        metrics::counter!(crate::metrics::RETENTION_DELETIONS, "kind" => "outbox_row")
            .increment(report.purged);
        self.store.forget_old_workers().await?;
        Ok(report)
    }

    pub async fn run(self, shutdown: CancellationToken) {
        tracing::info!(
            period_ms = self.settings.reaper_period.as_millis() as u64,
            "lease reaper started"
        );
        // The full pass runs every period; between passes the reaper also
        // wakes when the earliest lease is due (at most every 50 ms), so a
        // dead worker's task is re-offered at its lease's end, not up to a
        // period later.
        let period = self.settings.reaper_period;
        let mut next_pass = tokio::time::Instant::now();
        loop {
            if tokio::time::Instant::now() >= next_pass {
                let pass = self.reap_once().await;
                crate::metrics::role_pass("reaper", &pass);
                if let Err(e) = pass {
                    tracing::warn!(error = %e, "reaper pass failed");
                }
                next_pass = tokio::time::Instant::now() + period;
            }
            let due = match self.store.next_lease_expiry().await {
                Ok(due) => due,
                Err(e) => {
                    tracing::warn!(error = %e, "reading the next lease expiry failed");
                    None
                }
            };
            let wake = match due {
                Some(d) => (tokio::time::Instant::now() + d.max(MIN_EXPIRY_WAIT)).min(next_pass),
                None => next_pass,
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep_until(wake) => {
                    if wake < next_pass {
                        if let Err(e) = self.expire_due().await {
                            tracing::warn!(error = %e, "expiring leases failed");
                        }
                    }
                }
            }
        }
        tracing::info!("lease reaper stopped");
    }
}

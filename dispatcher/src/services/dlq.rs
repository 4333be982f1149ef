//! DLQ replay for wake-ups, on any [`Queue`] implementation: receive from
//! `wakeups-dlq`, re-check each task in Postgres, send the wake-ups of
//! tasks that can still run back to `wakeups`, and delete every handled
//! message from the DLQ. Finished, cancelled and unknown tasks are counted
//! and dropped; malformed bodies are counted and left in the DLQ for a human.
//! (SQS's `StartMessageMoveTask` would move blindly; the re-check is needed
//! anyway, and test servers lack it.)

use std::collections::HashSet;
use std::time::Duration;

use dispatcher_wire::WakeUp;

use crate::queue::{dlq, Queue, QueueError, WAKEUPS};
use crate::store::Store;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplayReport {
    /// Sent back to the source queue (in a dry run: would be).
    pub replayed: u64,
    /// The task has finished or was cancelled: dropped.
    pub skipped_finished: u64,
    /// No such task (deleted by retention, or never ours): dropped.
    pub skipped_unknown: u64,
    /// Not a wake-up: left in the DLQ.
    pub malformed: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error(transparent)]
    Store(#[from] crate::error::StoreError),
}

/// Replays `wakeups-dlq`. Each received message stays hidden for `hold`
/// while the run handles it. With `dry_run`, only counts: nothing is sent or
/// deleted, and the messages reappear in the DLQ when `hold` ends. The run
/// ends when the DLQ has nothing new to offer.
pub async fn replay_wakeups(
    queue: &dyn Queue,
    store: &Store,
    dry_run: bool,
    hold: Duration,
) -> Result<ReplayReport, ReplayError> {
    replay_wakeups_reporting(queue, store, dry_run, hold, |_| {}).await
}

/// `replay_wakeups`, showing `progress` the report so far after each batch
/// of up to 10 messages (the command prints it now and then).
pub async fn replay_wakeups_reporting(
    queue: &dyn Queue,
    store: &Store,
    dry_run: bool,
    hold: Duration,
    mut progress: impl FnMut(&ReplayReport),
) -> Result<ReplayReport, ReplayError> {
    let source = WAKEUPS;
    let dead = dlq(source);
    let mut report = ReplayReport::default();
    let mut seen = HashSet::new();
    loop {
        let mut handled = Vec::new();
        let batch = queue
            .receive(&dead, 10, Duration::from_secs(1), hold)
            .await?;
        if batch.iter().all(|m| seen.contains(&m.message_id)) {
            return Ok(report);
        }
        for msg in batch {
            if !seen.insert(msg.message_id.clone()) {
                continue;
            }
            let Ok(wake) = serde_json::from_value::<WakeUp>(msg.body.clone()) else {
                report.malformed += 1;
                continue;
            };
            let replay = match store.task_state(wake.task_id).await? {
                None => {
                    report.skipped_unknown += 1;
                    false
                }
                Some(state) if state.is_terminal() => {
                    report.skipped_finished += 1;
                    false
                }
                Some(_) => {
                    report.replayed += 1;
                    true
                }
            };
            if dry_run {
                continue;
            }
            if replay {
                queue.send(source, &msg.body, Duration::ZERO).await?;
            }
            handled.push(msg.receipt_handle);
        }
        // Delete after the sends: a crash between leaves a duplicate
        // wake-up, which the claim makes harmless.
        if !handled.is_empty() {
            queue.delete_batch(&dead, &handled).await?;
        }
        progress(&report);
    }
}

//! Wake-ups without messages (ADR 0017): how a long-polled claim learns
//! that work may be there.
//!
//! A transaction that makes tasks ready sends `NOTIFY tasks_ready` (see
//! `store::transitions::enqueue_wakeups`); Postgres delivers it at commit,
//! and folds equal notifications of one transaction into one. Each API
//! process keeps one `LISTEN` connection and turns notifications into a
//! generation counter that waiting claims watch. The payload is empty for
//! work ready now and `later` for a retry whose backoff ends later; the
//! listener then asks the database when the next backoff ends and wakes the
//! waiting claims at that moment.
//!
//! Nothing here decides anything: a woken claim still claims with
//! `SKIP LOCKED` and may get nothing. A lost notification (the connection
//! dropped) costs at most `claim_poll`, after which every waiting claim
//! looks again, and a reconnect wakes every waiting claim at once.

use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Store;

/// The channel of ready-task notifications.
pub const CHANNEL: &str = "tasks_ready";

/// The payload of a notification about a retry that is due later.
pub const LATER: &str = "later";

/// What waiting claims watch: bumped whenever tasks may have become ready.
#[derive(Clone)]
pub struct ReadySignal {
    tx: std::sync::Arc<watch::Sender<u64>>,
}

impl Default for ReadySignal {
    fn default() -> Self {
        let (tx, _) = watch::channel(0);
        ReadySignal {
            tx: std::sync::Arc::new(tx),
        }
    }
}

impl ReadySignal {
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.tx.subscribe()
    }

    fn bump(&self) {
        self.tx.send_modify(|g| *g = g.wrapping_add(1));
    }

    /// Forwards `tasks_ready` notifications to the waiting claims until
    /// `shutdown`, and wakes them when the earliest retry backoff ends.
    pub async fn listen(self, store: Store, shutdown: CancellationToken) {
        loop {
            let mut listener = match sqlx::postgres::PgListener::connect_with(store.pool()).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, "ready listener cannot connect; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            };
            if let Err(e) = listener.listen(CHANNEL).await {
                tracing::warn!(error = %e, "ready listener cannot LISTEN; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
            // Work may have become ready while nobody listened.
            self.bump();
            let mut due_at = retry_due(&store).await;
            loop {
                let due = due_at.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    n = listener.recv() => match n {
                        Ok(n) if n.payload() == LATER => {
                            due_at = retry_due(&store).await;
                        }
                        Ok(_) => self.bump(),
                        Err(e) => {
                            tracing::warn!(error = %e, "ready listener lost its connection");
                            break;
                        }
                    },
                    _ = tokio::time::sleep_until(due), if due_at.is_some() => {
                        self.bump();
                        due_at = retry_due(&store).await;
                    }
                }
            }
        }
    }
}

/// When the earliest retry backoff ends, by the database's clock (ADR
/// 0003), as an instant of this process; in a second if the database
/// cannot say.
async fn retry_due(store: &Store) -> Option<Instant> {
    match store.next_retry_due().await {
        Ok(Some(after)) => Some(Instant::now() + after.max(Duration::from_millis(5))),
        Ok(None) => None,
        Err(e) => {
            tracing::warn!(error = %e, "reading the next retry's time failed");
            Some(Instant::now() + Duration::from_secs(1))
        }
    }
}

//! ECS task scale-in protection (issue 27): while this worker runs a task,
//! it asks the ECS agent to keep its task out of a scale-in, so the
//! autoscaler stops idle workers first and a busy one finishes its work.
//!
//! The agent's endpoint is `$ECS_AGENT_URI/task-protection/v1/state`
//! (`PUT {"ProtectionEnabled": true, "ExpiresInMinutes": N}`). Protection
//! is asked for when the first slot turns busy, renewed every half of its
//! expiry while busy, and dropped when the last slot is free. A worker that
//! dies keeps no protection past its expiry. A failed call is logged and
//! tried again on the next change: protection is an optimisation, the
//! drain on SIGTERM is what keeps a scale-in from losing work.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

/// How long one protection lasts unless renewed.
const EXPIRES_MINUTES: u64 = 60;

pub struct Protection {
    http: reqwest::Client,
    url: String,
    /// When protection was last granted (while it is on).
    since: Option<Instant>,
}

impl Protection {
    /// The agent of this task (`ECS_AGENT_URI`, which ECS sets in every
    /// container of a task).
    pub fn new(agent_uri: &str) -> Self {
        Protection {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .unwrap_or_default(),
            url: format!(
                "{}/task-protection/v1/state",
                agent_uri.trim_end_matches('/')
            ),
            since: None,
        }
    }

    /// Asks for what `busy` calls for, if that differs from what holds or
    /// the protection is due for renewal.
    pub async fn follow(&mut self, busy: bool) {
        let renew = Duration::from_secs(EXPIRES_MINUTES * 60 / 2);
        let due = match (busy, self.since) {
            (true, None) => true,
            (true, Some(at)) => at.elapsed() >= renew,
            (false, Some(_)) => true,
            (false, None) => false,
        };
        if !due {
            return;
        }
        let body = match busy {
            true => {
                serde_json::json!({"ProtectionEnabled": true, "ExpiresInMinutes": EXPIRES_MINUTES})
            }
            false => serde_json::json!({"ProtectionEnabled": false}),
        };
        match self.http.put(&self.url).json(&body).send().await {
            Ok(r) if r.status().is_success() => {
                self.since = busy.then(Instant::now);
                tracing::debug!(protected = busy, "task scale-in protection set");
            }
            Ok(r) => tracing::warn!(status = %r.status(), protected = busy,
                                    "the ECS agent refused the task's scale-in protection"),
            Err(e) => tracing::warn!(error = %e.without_url(), protected = busy,
                                     "the ECS agent did not answer about scale-in protection"),
        }
    }
}

/// Follows the busy slots every `every` until `shutdown`.
pub async fn protect_while_busy(
    mut protection: Protection,
    busy: Arc<AtomicUsize>,
    every: Duration,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        protection.follow(busy.load(Ordering::Relaxed) > 0).await;
    }
}

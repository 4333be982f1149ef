//! Where work comes from, by profile and wake-up mode (ADR 0009, 0017):
//!
//! * `local`, `notify` (the default): no messages; the worker long-polls
//!   `task-claim-batch` with `max_tasks` and gets claims directly;
//! * `local`, `queue`: the dispatcher's `/internal/queues/{queue}/…`
//!   endpoints, with the worker credential (the Postgres queue behind them);
//! * `aws`: SQS directly, through the same adapter the dispatcher uses
//!   (`dispatcher::queue::SqsQueue`). The worker needs only receive,
//!   change-visibility and delete on its one queue; no database, S3 or
//!   send permission.
//!
//! Either way the message is only a hint: the claim decides (invariant 6).

use std::sync::Arc;
use std::time::Duration;

use dispatcher::profile::QueueProfileArgs;
use dispatcher::queue::{Queue, SqsQueue};
use dispatcher_wire::QueueMessage;

use crate::client::Client;

/// Why a receive gave nothing.
#[derive(Debug)]
pub enum ReceiveError {
    /// The dispatcher refused the worker credential (401/403).
    CredentialRefused(String),
    /// Anything else: worth trying again later.
    Other(String),
}

pub enum Wakeups {
    /// Ready work claimed directly: there is no message to receive.
    Claims,
    Dispatcher {
        client: Arc<Client>,
        queue: String,
    },
    Sqs {
        sqs: SqsQueue,
        queue: String,
    },
}

impl Wakeups {
    /// Opens the profile's source of `queue`; on aws, fails naming the queue
    /// if it does not exist.
    pub async fn open(
        profile: &QueueProfileArgs,
        client: Arc<Client>,
        queue: &str,
    ) -> anyhow::Result<Self> {
        if profile.wakeups()? == dispatcher::settings::Wakeups::Notify {
            return Ok(Wakeups::Claims);
        }
        if !profile.is_aws() {
            return Ok(Wakeups::Dispatcher {
                client,
                queue: queue.to_owned(),
            });
        }
        let sqs = SqsQueue::connect_to(&profile.sqs(), &[queue.to_owned()]).await?;
        Ok(Wakeups::Sqs {
            sqs,
            queue: queue.to_owned(),
        })
    }

    pub fn describe(&self) -> String {
        match self {
            Wakeups::Claims => "ready tasks claimed directly".to_owned(),
            Wakeups::Dispatcher { queue, .. } => format!("dispatcher queue {queue}"),
            Wakeups::Sqs { queue, .. } => format!("SQS queue {queue}"),
        }
    }

    /// Up to `max` (≤ 10) wake-ups, long-polling up to `wait_secs`.
    pub async fn receive(
        &self,
        max: u32,
        wait_secs: u32,
        visibility_secs: u32,
    ) -> Result<Vec<QueueMessage>, ReceiveError> {
        match self {
            Wakeups::Claims => Ok(Vec::new()),
            Wakeups::Dispatcher { client, queue } => client
                .receive(queue, max, wait_secs, visibility_secs)
                .await
                .map_err(|e| match e.is_credential_refusal() {
                    true => ReceiveError::CredentialRefused(e.to_string()),
                    false => ReceiveError::Other(e.to_string()),
                }),
            Wakeups::Sqs { sqs, queue } => sqs
                .receive(
                    queue,
                    max,
                    Duration::from_secs(wait_secs.into()),
                    Duration::from_secs(visibility_secs.into()),
                )
                .await
                .map_err(|e| ReceiveError::Other(e.to_string())),
        }
    }

    /// Keeps the delivery hidden for `secs` more (heartbeats call it; 0
    /// makes it visible again at once). Best effort: a failure only risks a
    /// duplicate or a later wake-up.
    pub async fn extend(&self, receipt: Option<&str>, secs: u32) {
        let Some(receipt) = receipt else { return };
        let result = match self {
            Wakeups::Claims => Ok(()),
            Wakeups::Dispatcher { client, queue } => client
                .change_visibility(queue, receipt, secs)
                .await
                .map(drop)
                .map_err(|e| e.to_string()),
            Wakeups::Sqs { sqs, queue } => sqs
                .change_visibility(queue, receipt, Duration::from_secs(secs.into()))
                .await
                .map(drop)
                .map_err(|e| e.to_string()),
        };
        if let Err(e) = result {
            tracing::debug!(error = e, "extending the wake-up's visibility failed");
        }
    }

    /// Deletes the delivery. Best effort: a wake-up left behind is
    /// redelivered and refused by the claim.
    pub async fn delete(&self, receipt: Option<&str>) {
        let Some(receipt) = receipt else { return };
        let result = match self {
            Wakeups::Claims => Ok(()),
            Wakeups::Dispatcher { client, queue } => client
                .delete(queue, receipt)
                .await
                .map(drop)
                .map_err(|e| e.to_string()),
            Wakeups::Sqs { sqs, queue } => sqs
                .delete(queue, receipt)
                .await
                .map(drop)
                .map_err(|e| e.to_string()),
        };
        if let Err(e) = result {
            tracing::debug!(error = e, "deleting the wake-up failed");
        }
    }
}

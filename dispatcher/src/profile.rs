//! The deployment profile: where queues and objects live.
//!
//! * `local` (default): the Postgres queue in the state database, objects in
//!   a directory;
//! * `aws`: SQS and S3 (or servers speaking their protocols, through an
//!   endpoint override). At start the dispatcher checks that every queue and
//!   the bucket exist, and names what is missing.

use std::sync::Arc;

use crate::breaker::{Breaker, BreakerConfig};
use crate::objects::{Guarded, S3Config, S3Store};
use crate::queue::{Queue, SqsConfig, SqsQueue};
use crate::settings::{Settings, Wakeups};
use crate::store::Store;

/// The profile and where its queues live: what the admin queue commands and
/// the worker wrapper (`worker-wrapper run --profile`) need.
#[derive(clap::Args, Debug, Clone)]
pub struct QueueProfileArgs {
    /// local: queues in Postgres (workers reach them through the
    /// dispatcher); aws: SQS (and S3 for the dispatcher's objects).
    #[arg(long, env = "DISPATCHER_PROFILE", default_value = "local", value_parser = ["local", "aws"])]
    pub profile: String,
    #[arg(long, env = "AWS_REGION", default_value = "us-east-1")]
    pub aws_region: String,
    /// An SQS/S3-compatible endpoint instead of AWS.
    #[arg(long, env = "AWS_ENDPOINT_URL")]
    pub aws_endpoint_url: Option<String>,
    /// Prepended to every SQS queue name.
    #[arg(
        long,
        env = "DISPATCHER_SQS_QUEUE_PREFIX",
        default_value = "dispatcher-"
    )]
    pub sqs_queue_prefix: String,
    /// How ready tasks reach workers (ADR 0017). notify (the local
    /// default): workers long-poll `task-claim-batch` and the dispatcher
    /// answers when `NOTIFY tasks_ready` says work is there; no wake-up
    /// messages are written. queue: one wake-up message per ready task
    /// through the outbox (the aws profile's only way, on SQS; on the local
    /// profile, served at `/internal/queues/wakeups/*`). The dispatcher and
    /// its workers must agree.
    #[arg(long, env = "DISPATCHER_WAKEUPS", value_parser = ["notify", "queue"])]
    pub wakeups: Option<String>,
}

impl QueueProfileArgs {
    pub fn is_aws(&self) -> bool {
        self.profile == "aws"
    }

    /// The wake-up mode: as asked, else the profile's default.
    pub fn wakeups(&self) -> anyhow::Result<Wakeups> {
        match (self.wakeups.as_deref(), self.is_aws()) {
            (Some("notify"), true) => anyhow::bail!(
                "--wakeups notify needs the local profile: on aws, wake-ups are SQS messages"
            ),
            (Some(mode), _) => mode.parse().map_err(anyhow::Error::msg),
            (None, true) => Ok(Wakeups::Queue),
            (None, false) => Ok(Wakeups::Notify),
        }
    }

    pub fn sqs(&self) -> SqsConfig {
        SqsConfig {
            region: self.aws_region.clone(),
            endpoint_url: self.aws_endpoint_url.clone(),
            queue_prefix: self.sqs_queue_prefix.clone(),
            static_credentials: None,
        }
    }

    /// The worker wrapper's environment for this profile (its own
    /// `--profile`: on aws it receives wake-ups from SQS directly).
    pub fn worker_env(&self) -> Vec<(&'static str, String)> {
        let mut env = vec![
            ("DISPATCHER_PROFILE", self.profile.clone()),
            ("AWS_REGION", self.aws_region.clone()),
            ("DISPATCHER_SQS_QUEUE_PREFIX", self.sqs_queue_prefix.clone()),
        ];
        if let Some(mode) = &self.wakeups {
            env.push(("DISPATCHER_WAKEUPS", mode.clone()));
        }
        if let Some(url) = &self.aws_endpoint_url {
            env.push(("AWS_ENDPOINT_URL", url.clone()));
        }
        env
    }

    /// The profile's queue for one-off commands (DLQ replay).
    pub async fn open(&self, store: &Store, settings: &Settings) -> anyhow::Result<Arc<dyn Queue>> {
        Ok(match self.is_aws() {
            true => Arc::new(SqsQueue::connect(&self.sqs()).await?),
            false => local_queue(store, settings).0,
        })
    }
}

/// Where the dispatcher's objects live, as `services::run` takes it.
pub enum Objects {
    /// The local profile: a directory; its presigned URLs are served by
    /// the API at `public_url` (default: the API's own address).
    LocalDir {
        dir: std::path::PathBuf,
        public_url: Option<String>,
    },
    /// Any other store (S3 on the aws profile).
    Store(Arc<dyn crate::objects::ObjectStore>),
}

/// The dispatcher's profile: its queues and, on aws, its bucket.
#[derive(clap::Args, Debug, Clone)]
pub struct ProfileArgs {
    #[command(flatten)]
    pub queues: QueueProfileArgs,
    /// The S3 bucket for datasets and buffer batches.
    #[arg(
        long,
        env = "DISPATCHER_S3_BUCKET",
        default_value = "dispatcher-objects"
    )]
    pub s3_bucket: String,
    /// local: the directory that holds datasets and buffer batches.
    #[arg(
        long,
        env = "DISPATCHER_OBJECTS_DIR",
        default_value = "dispatcher-objects"
    )]
    pub objects_dir: std::path::PathBuf,
    /// local: the URL workers reach this dispatcher at, for presigned URLs
    /// (default: the address it listens on; set it when listening on
    /// 0.0.0.0 or behind a proxy).
    #[arg(long, env = "DISPATCHER_PUBLIC_URL")]
    pub public_url: Option<String>,
}

impl ProfileArgs {
    pub fn is_aws(&self) -> bool {
        self.queues.is_aws()
    }

    pub fn s3(&self) -> S3Config {
        S3Config {
            region: self.queues.aws_region.clone(),
            endpoint_url: self.queues.aws_endpoint_url.clone(),
            bucket: self.s3_bucket.clone(),
            static_credentials: None,
        }
    }

    /// The profile's object store: the directory (local) or the bucket,
    /// which must exist (aws), behind a circuit breaker.
    pub async fn objects(&self, breaker: BreakerConfig) -> anyhow::Result<Objects> {
        if self.is_aws() {
            let s3 = Arc::new(S3Store::connect(&self.s3()).await?);
            let name = format!("s3:{}", self.s3_bucket);
            let guarded = Guarded::new(s3, Breaker::new("s3", name, breaker));
            return Ok(Objects::Store(Arc::new(guarded)));
        }
        Ok(Objects::LocalDir {
            dir: self.objects_dir.clone(),
            public_url: self.public_url.clone(),
        })
    }

    /// Creates the aws profile's queues and bucket if missing (local set-ups
    /// against a test server; production creates them with infrastructure).
    pub async fn create_aws_resources(&self, max_receives: u32) -> anyhow::Result<()> {
        SqsQueue::create_queues(&self.queues.sqs(), max_receives).await?;
        S3Store::create_bucket(&self.s3()).await?;
        Ok(())
    }

    /// The profile's queue for `services::run`: `None` for local (the
    /// Postgres queue), SQS behind a circuit breaker for aws after checking
    /// that every queue and the bucket exist.
    pub async fn services_queue(
        &self,
        breaker: BreakerConfig,
    ) -> anyhow::Result<Option<Arc<dyn Queue>>> {
        if !self.is_aws() {
            return Ok(None);
        }
        let sqs = SqsQueue::connect(&self.queues.sqs()).await;
        let s3 = S3Store::connect(&self.s3()).await;
        match (sqs, s3) {
            (Ok(q), Ok(_)) => {
                let name = format!("sqs:{}*", self.queues.sqs_queue_prefix);
                let breaker = Breaker::new("sqs", name, breaker);
                Ok(Some(Arc::new(crate::queue::Guarded::new(
                    Arc::new(q),
                    breaker,
                ))))
            }
            (q, s) => {
                let problems: Vec<String> = [
                    q.err().map(|e| e.to_string()),
                    s.err().map(|e| e.to_string()),
                ]
                .into_iter()
                .flatten()
                .collect();
                anyhow::bail!("the aws profile is not ready: {}", problems.join("; "))
            }
        }
    }
}

/// The local profile's queue over the store's database, and the task that
/// forwards its arrival notifications (run it in the same shutdown scope).
pub fn local_queue(
    store: &Store,
    settings: &Settings,
) -> (Arc<crate::queue::PgQueue>, Arc<tokio::sync::Notify>) {
    let arrivals = Arc::new(tokio::sync::Notify::new());
    let queue = Arc::new(crate::queue::PgQueue::new(
        store.pool().clone(),
        settings.queue_max_receives,
        arrivals.clone(),
    ));
    (queue, arrivals)
}

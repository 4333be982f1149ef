//! `dispatcher serve`: the roles of one process, configured by flags and environment.

use anyhow::{bail, Context, Result};
use clap::Args;
use dispatcher::roles::{self, Roles};
use dispatcher::settings::{Rate, Settings};
use std::path::PathBuf;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

use super::*;

#[derive(Args)]
pub(crate) struct ServeArgs {
    #[command(flatten)]
    db: DbArgs,
    #[command(flatten)]
    keys: KeyArgs,
    /// Address to listen on.
    #[arg(long, env = "DISPATCHER_BIND", default_value = "127.0.0.1:8080")]
    bind: String,
    /// Serve Prometheus metrics at `GET /metrics` on this address (its own
    /// port, kept off the API's load balancer: the series name orgs;
    /// docs/standards/metrics.md). Off when unset.
    #[arg(long, env = "DISPATCHER_METRICS_BIND")]
    metrics_bind: Option<String>,
    /// Print the backlog signal and the lags the alarms watch to stdout as
    /// CloudWatch Embedded Metric Format lines in this namespace, every
    /// `--backlog-emf-seconds` (the ECS log driver ships them; the worker
    /// fleet's autoscaling reads them: terraform/). Off when unset.
    #[arg(long, env = "DISPATCHER_BACKLOG_EMF_NAMESPACE")]
    backlog_emf_namespace: Option<String>,
    #[arg(long, env = "DISPATCHER_BACKLOG_EMF_SECONDS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
    backlog_emf_seconds: u64,
    /// Apply migrations before serving.
    #[arg(long, env = "DISPATCHER_MIGRATE")]
    migrate: bool,
    /// Largest number of pooled database connections.
    #[arg(long, env = "DISPATCHER_DB_MAX_CONNECTIONS", default_value_t = 16)]
    max_connections: u32,
    #[command(flatten)]
    profile: dispatcher::profile::ProfileArgs,
    /// Roles to run: any of api, relay, reaper, sink, router, delivery,
    /// pruner, or all.
    #[arg(long, env = "DISPATCHER_ROLES", default_value = "all", value_parser = Roles::parse)]
    roles: Roles,
    #[command(flatten)]
    limits: LimitArgs,
    #[command(flatten)]
    sink: SinkArgs,
    #[command(flatten)]
    idp: IdpArgs,
    /// aws profile: the IAM role tasks get session credentials of from
    /// `POST /v1/task/credentials`, narrowed by a session policy to their
    /// attempt (its policy must allow S3 reads and writes on the bucket).
    #[arg(long, env = "DISPATCHER_STS_ROLE_ARN")]
    sts_role_arn: Option<String>,
    /// aws profile: the bucket's SSE-KMS key; each task's session policy
    /// then allows it through S3 (without it, tasks cannot read or write
    /// SSE-KMS objects with their credentials).
    #[arg(long, env = "DISPATCHER_S3_KMS_KEY_ARN", requires = "sts_role_arn")]
    s3_kms_key_arn: Option<String>,
}

/// Users from an identity provider (ADR 0012): its tokens are accepted on
/// user endpoints beside the dispatcher's own user tokens.
#[derive(Args)]
pub(crate) struct IdpArgs {
    /// The IdP's `iss`; enables IdP tokens (with an audience and keys).
    #[arg(long, env = "DISPATCHER_IDP_ISSUER", requires = "idp_audience")]
    idp_issuer: Option<String>,
    /// The `aud` IdP tokens must carry.
    #[arg(long, env = "DISPATCHER_IDP_AUDIENCE")]
    idp_audience: Option<String>,
    /// The IdP's public keys as a JWKS file (each key's algorithm from its
    /// `alg`, or its key type: RSA → RS256, EC P-256 → ES256, OKP → EdDSA).
    #[arg(
        long,
        env = "DISPATCHER_IDP_JWKS_FILE",
        conflicts_with_all = ["idp_key_file", "idp_jwks_url"]
    )]
    idp_jwks_file: Option<PathBuf>,
    /// Or the IdP's JWKS URL: fetched at start (required), every
    /// `--idp-jwks-refresh-minutes`, and when a token names an unknown
    /// `kid` (at most every 30 s).
    #[arg(long, env = "DISPATCHER_IDP_JWKS_URL", conflicts_with = "idp_key_file")]
    idp_jwks_url: Option<String>,
    #[arg(
        long,
        env = "DISPATCHER_IDP_JWKS_REFRESH_MINUTES",
        default_value_t = 10
    )]
    idp_jwks_refresh_minutes: u64,
    /// Or one public key in PEM ...
    #[arg(long, env = "DISPATCHER_IDP_KEY_FILE")]
    idp_key_file: Option<PathBuf>,
    /// ... pinned to this algorithm: RS256, ES256 or EdDSA ...
    #[arg(long, env = "DISPATCHER_IDP_KEY_ALG", default_value = "RS256")]
    idp_key_alg: String,
    /// ... with this `kid` (optional).
    #[arg(long, env = "DISPATCHER_IDP_KEY_ID")]
    idp_key_id: Option<String>,
    /// The claim that names the user.
    #[arg(long, env = "DISPATCHER_IDP_SUBJECT_CLAIM", default_value = "sub")]
    idp_subject_claim: String,
}

impl IdpArgs {
    async fn idp(&self, leeway_secs: u64) -> Result<Option<Arc<dispatcher::idp::Idp>>> {
        let Some(issuer) = &self.idp_issuer else {
            return Ok(None);
        };
        let audience = self.idp_audience.as_deref().unwrap_or_default();
        let read = |p: &PathBuf| {
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
        };
        if let Some(url) = &self.idp_jwks_url {
            let idp = dispatcher::idp::Idp::from_jwks_url(
                issuer,
                audience,
                &self.idp_subject_claim,
                url,
                leeway_secs,
            )
            .await
            .map_err(anyhow::Error::msg)?;
            return Ok(Some(Arc::new(idp)));
        }
        let idp = match (&self.idp_jwks_file, &self.idp_key_file) {
            (Some(jwks), None) => dispatcher::idp::Idp::from_jwks(
                issuer,
                audience,
                &self.idp_subject_claim,
                &read(jwks)?,
                leeway_secs,
            ),
            (None, Some(pem)) => dispatcher::idp::Idp::from_pem(
                issuer,
                audience,
                &self.idp_subject_claim,
                &read(pem)?,
                dispatcher::idp::parse_alg(&self.idp_key_alg).map_err(anyhow::Error::msg)?,
                self.idp_key_id.clone(),
                leeway_secs,
            ),
            _ => bail!("--idp-issuer needs --idp-jwks-url, --idp-jwks-file or --idp-key-file"),
        }
        .map_err(anyhow::Error::msg)?;
        Ok(Some(Arc::new(idp)))
    }
}

/// The buffer sink's knobs (defaults: docs/standards/operations.md).
#[derive(Args)]
pub(crate) struct SinkArgs {
    /// Batches one sink ingests at once (1 to 10).
    #[arg(long, env = "DISPATCHER_SINK_CONCURRENCY", value_parser = clap::value_parser!(u16).range(1..=10))]
    sink_concurrency: Option<u16>,
    /// Seconds a received buffer pointer stays hidden from other sinks
    /// (extended every third of it while its batch is in hand).
    #[arg(long, env = "DISPATCHER_SINK_VISIBILITY_SECONDS", value_parser = clap::value_parser!(u64).range(1..=43_200))]
    sink_visibility_seconds: Option<u64>,
    /// Data-database connections of the sink.
    #[arg(long, env = "DISPATCHER_DATA_DB_MAX_CONNECTIONS", default_value_t = 8)]
    data_max_connections: u32,
    /// Hosts alerts may reach although they resolve to loopback, private,
    /// link-local or other internal addresses, comma-separated (names or
    /// IP literals as written in destination URLs; every other host is
    /// refused when it resolves there: a destination must not reach this
    /// network).
    #[arg(long, env = "DISPATCHER_ALERTS_ALLOW_HOSTS", value_delimiter = ',')]
    alerts_allow_hosts: Vec<String>,
    /// Tries of an alert delivery before it is dead.
    #[arg(long, env = "DISPATCHER_ALERT_MAX_TRIES", value_parser = clap::value_parser!(u32).range(1..=100))]
    alert_max_tries: Option<u32>,
    /// First retry delay of an alert delivery, in milliseconds (doubles
    /// per try, with jitter).
    #[arg(long, env = "DISPATCHER_ALERT_RETRY_BASE_MS", value_parser = clap::value_parser!(u64).range(1..=600_000))]
    alert_retry_base_ms: Option<u64>,
    /// Seconds an alert delivery in flight is held before another
    /// delivery role may take it.
    #[arg(long, env = "DISPATCHER_ALERT_LEASE_SECONDS", value_parser = clap::value_parser!(u64).range(1..=3600))]
    alert_lease_seconds: Option<u64>,
    /// Failures in a row of SQS, S3 or one webhook destination that open
    /// its circuit breaker (calls then fail fast).
    #[arg(long, env = "DISPATCHER_BREAKER_FAILURES", value_parser = clap::value_parser!(u32).range(1..=1000))]
    breaker_failures: Option<u32>,
    /// Seconds an open breaker fails calls fast before one probe goes.
    #[arg(long, env = "DISPATCHER_BREAKER_OPEN_SECONDS", value_parser = clap::value_parser!(u64).range(1..=3600))]
    breaker_open_seconds: Option<u64>,
}

impl SinkArgs {
    fn apply(&self, s: &mut Settings) {
        s.alert_allow_hosts = self.alerts_allow_hosts.clone();
        if let Some(n) = self.alert_max_tries {
            s.alert_delivery_max_tries = n;
        }
        if let Some(ms) = self.alert_retry_base_ms {
            s.alert_retry_base = std::time::Duration::from_millis(ms);
        }
        if let Some(t) = self.alert_lease_seconds {
            s.alert_delivery_lease = std::time::Duration::from_secs(t);
            // A webhook try ends before its lease does.
            s.alert_delivery_timeout = s.alert_delivery_timeout.min(s.alert_delivery_lease / 2);
        }
        if let Some(n) = self.breaker_failures {
            s.breaker.failures = n;
        }
        if let Some(t) = self.breaker_open_seconds {
            s.breaker.open_for = std::time::Duration::from_secs(t);
        }
        if let Some(n) = self.sink_concurrency {
            s.sink_concurrency = usize::from(n);
        }
        if let Some(t) = self.sink_visibility_seconds {
            s.sink_visibility = std::time::Duration::from_secs(t);
        }
    }
}

/// Overrides of the API's limits (defaults and reasons:
/// docs/standards/operations.md). Rates are `PER_SECOND[,BURST]`.
#[derive(Args)]
pub(crate) struct LimitArgs {
    /// Requests per org (its users' and tasks' together).
    #[arg(long, env = "DISPATCHER_RATE_PER_ORG")]
    rate_per_org: Option<Rate>,
    /// Requests per user.
    #[arg(long, env = "DISPATCHER_RATE_PER_USER")]
    rate_per_user: Option<Rate>,
    /// Requests per task (capability tokens of all its attempts).
    #[arg(long, env = "DISPATCHER_RATE_PER_TASK")]
    rate_per_task: Option<Rate>,
    /// Requests per worker credential.
    #[arg(long, env = "DISPATCHER_RATE_PER_WORKER")]
    rate_per_worker: Option<Rate>,
    /// Requests served at once.
    #[arg(long, env = "DISPATCHER_MAX_CONCURRENT_REQUESTS")]
    max_concurrent_requests: Option<usize>,
    /// Queue long-polls held at once.
    #[arg(long, env = "DISPATCHER_MAX_CONCURRENT_LONG_POLLS")]
    max_concurrent_long_polls: Option<usize>,
    /// Seconds before a request that has not answered gets 503.
    #[arg(long, env = "DISPATCHER_REQUEST_TIMEOUT_SECONDS")]
    request_timeout_seconds: Option<u64>,
    /// A capability token outlives its lease by this many seconds.
    #[arg(long, env = "DISPATCHER_TOKEN_GRACE_SECONDS", value_parser = clap::value_parser!(u64).range(1..=3600))]
    token_grace_seconds: Option<u64>,
    /// Finished jobs are deleted (with their tasks, attempts, events and
    /// publishes) this many hours after they finished (the pruner role;
    /// default 168, a week).
    #[arg(long, env = "DISPATCHER_JOB_RETENTION_HOURS", value_parser = clap::value_parser!(u64).range(1..=87_600))]
    job_retention_hours: Option<u64>,
    /// The same retention in seconds, for soaks and drills that must see
    /// jobs go within minutes (not for production: a failed job is gone
    /// before anyone looks at it).
    #[arg(long, env = "DISPATCHER_JOB_RETENTION_SECONDS", conflicts_with = "job_retention_hours",
          value_parser = clap::value_parser!(u64).range(1..=315_360_000))]
    job_retention_seconds: Option<u64>,
    /// On SIGTERM, seconds `/readyz` answers 503 while requests are still
    /// served, before the listener closes (default 5; 0 for no load
    /// balancer).
    #[arg(long, env = "DISPATCHER_DRAIN_NOT_READY_SECONDS", value_parser = clap::value_parser!(u64).range(0..=300))]
    drain_not_ready_seconds: Option<u64>,
    /// Seconds requests in flight get after the listener closes (default
    /// 10); long-polls answer at once.
    #[arg(long, env = "DISPATCHER_DRAIN_TIMEOUT_SECONDS", value_parser = clap::value_parser!(u64).range(0..=300))]
    drain_timeout_seconds: Option<u64>,
    /// Seconds between the pruner's passes (default 60).
    #[arg(long, env = "DISPATCHER_JOB_PRUNE_INTERVAL_SECONDS", value_parser = clap::value_parser!(u64).range(1..=86_400))]
    job_prune_interval_seconds: Option<u64>,
}

impl LimitArgs {
    fn apply(&self, s: &mut Settings) {
        if let Some(h) = self.job_retention_hours {
            s.job_retention = std::time::Duration::from_secs(h * 3600);
        }
        if let Some(secs) = self.job_retention_seconds {
            s.job_retention = std::time::Duration::from_secs(secs);
        }
        if let Some(secs) = self.drain_not_ready_seconds {
            s.drain_not_ready = std::time::Duration::from_secs(secs);
        }
        if let Some(secs) = self.drain_timeout_seconds {
            s.drain_timeout = std::time::Duration::from_secs(secs);
        }
        if let Some(secs) = self.job_prune_interval_seconds {
            s.job_prune_interval = std::time::Duration::from_secs(secs);
        }
        if let Some(r) = self.rate_per_org {
            s.rate_per_org = r;
        }
        if let Some(r) = self.rate_per_user {
            s.rate_per_user = r;
        }
        if let Some(r) = self.rate_per_task {
            s.rate_per_task = r;
        }
        if let Some(r) = self.rate_per_worker {
            s.rate_per_worker = r;
        }
        if let Some(n) = self.max_concurrent_requests {
            s.max_concurrent_requests = n;
        }
        if let Some(n) = self.max_concurrent_long_polls {
            s.max_concurrent_long_polls = n;
        }
        if let Some(t) = self.request_timeout_seconds {
            s.request_timeout = std::time::Duration::from_secs(t);
        }
        if let Some(t) = self.token_grace_seconds {
            s.token_grace = std::time::Duration::from_secs(t);
        }
    }
}

pub(crate) async fn serve(args: ServeArgs) -> Result<()> {
    let mut settings = Settings {
        issuer: args.keys.issuer.clone(),
        failpoints: failpoints_from_env(),
        wakeups: args.profile.queues.wakeups()?,
        ..Settings::default()
    };
    args.limits.apply(&mut settings);
    args.sink.apply(&mut settings);
    if settings.request_timeout <= settings.queue_max_wait {
        bail!(
            "--request-timeout-seconds must be longer than the longest queue long-poll ({} s)",
            settings.queue_max_wait.as_secs()
        );
    }
    let settings = Arc::new(settings);
    let keys = Arc::new(args.keys.keyring(settings.token_leeway.as_secs())?);
    let idp = args.idp.idp(settings.token_leeway.as_secs()).await?;
    let store = connect(&args.db, settings.clone(), args.max_connections).await?;
    if args.migrate {
        args.db.migrate(&store).await?;
    }
    let data = args.roles.need_data().then(|| {
        args.db
            .data_options()
            .map(|o| dispatcher::datadb::lazy_pool(o, args.sink.data_max_connections))
    });
    let data = data.transpose()?;
    let queue = args.profile.services_queue(settings.breaker).await?;
    let objects = args.profile.objects(settings.breaker).await?;
    let sts = match (&args.sts_role_arn, args.profile.is_aws()) {
        (Some(arn), true) => Some(Arc::new(
            dispatcher::objects::sts::StsIssuer::new(&args.profile.s3(), arn)
                .await
                .with_kms_key(args.s3_kms_key_arn.clone()),
        )),
        (Some(_), false) => bail!("--sts-role-arn needs --profile aws"),
        (None, _) => None,
    };
    tracing::info!(
        profile = args.profile.queues.profile,
        "queues and objects ready"
    );
    let listener = if args.roles.api {
        let l = tokio::net::TcpListener::bind(&args.bind)
            .await
            .with_context(|| format!("binding {}", args.bind))?;
        tracing::info!(addr = %l.local_addr()?, kid = keys.signing_kid(), "dispatcher listening");
        Some(l)
    } else {
        None
    };
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    if let Some(bind) = &args.metrics_bind {
        let handle = dispatcher::metrics::install()?;
        let l = tokio::net::TcpListener::bind(bind)
            .await
            .with_context(|| format!("binding the metrics address {bind}"))?;
        tracing::info!(addr = %l.local_addr()?, "metrics at /metrics");
        tokio::spawn(dispatcher::metrics::serve(
            l,
            handle,
            store.clone(),
            shutdown.clone(),
        ));
    }
    if let Some(namespace) = args.backlog_emf_namespace.clone() {
        let every = std::time::Duration::from_secs(args.backlog_emf_seconds);
        tokio::spawn(dispatcher::metrics::publish_emf(
            store.clone(),
            namespace,
            every,
            shutdown.clone(),
        ));
    }
    if let Some(idp) = &idp {
        let every = std::time::Duration::from_secs(args.idp.idp_jwks_refresh_minutes.max(1) * 60);
        tokio::spawn(idp.clone().refresh_periodically(every, shutdown.clone()));
    }
    roles::run(
        listener,
        store,
        keys,
        settings,
        args.roles,
        roles::Adapters {
            queue,
            objects,
            data,
            idp,
            sts,
        },
        shutdown,
    )
    .await?;
    tracing::info!("dispatcher stopped");
    Ok(())
}

/// `DISPATCHER_FAILPOINTS=claim_after_commit,…` arms crash points in debug
/// builds (tests of crash recovery); release builds ignore it.
pub(crate) fn failpoints_from_env() -> Vec<String> {
    let armed: Vec<String> = std::env::var("DISPATCHER_FAILPOINTS")
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    if !armed.is_empty() {
        if cfg!(debug_assertions) {
            tracing::warn!(
                ?armed,
                "failpoints armed: this process will crash on purpose"
            );
        } else {
            tracing::warn!(
                ?armed,
                "failpoints are compiled out of release builds; ignored"
            );
        }
    }
    armed
}

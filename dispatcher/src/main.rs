//! The `dispatcher` binary: a thin CLI over the library.

mod dev;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use chrono::Utc;
use clap::{Args, Parser, Subcommand};
use dispatcher::domain::Role;
use dispatcher::queue::SqsQueue;
use dispatcher::roles::{self, Roles};
use dispatcher::settings::{Rate, Settings};
use dispatcher::store::Store;
use dispatcher::tokens::{self, Keyring};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

#[derive(Parser)]
#[command(
    name = "dispatcher",
    version,
    about = "Lease-based task dispatcher backed by Postgres"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the HTTP API (worker contract, jobs API, JWKS, health).
    Serve(Box<ServeArgs>),
    /// The whole local stack with zero configuration: database, key, all
    /// roles, workers, and a sample job.
    Dev(dev::DevArgs),
    /// Apply pending database migrations and exit.
    Migrate(DbArgs),
    /// Signing keys and credentials.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Operator commands: orgs, users, memberships.
    #[command(subcommand)]
    Admin(AdminCommand),
    /// UDF bundles: pack and push a directory, tag a bundle.
    #[command(subcommand)]
    Bundle(BundleCommand),
}

/// Where the API is and who calls it (a user token of the org).
#[derive(Args)]
pub(crate) struct ApiArgs {
    #[arg(long, env = "DISPATCHER_URL", default_value = "http://127.0.0.1:8080")]
    pub(crate) url: String,
    /// A user token (`dispatcher token user`, or the identity provider's).
    #[arg(long, env = "DISPATCHER_TOKEN", hide_env_values = true)]
    pub(crate) token: String,
    /// The org, for a user of several (the `Dispatcher-Org` header).
    #[arg(long, env = "DISPATCHER_ORG")]
    pub(crate) org: Option<String>,
}

#[derive(Subcommand)]
enum BundleCommand {
    /// Pack DIR (which holds a `bundle.json`) and push it; prints its
    /// digest (`sha256:…`), which tasks name as their `bundle`.
    Push {
        dir: std::path::PathBuf,
        /// Also point this tag at the pushed bundle.
        #[arg(long)]
        tag: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Pack DIR and print the digest it would have, pushing nothing.
    Digest { dir: std::path::PathBuf },
    /// Point TAG at DIGEST (one of the org's bundles).
    Tag {
        tag: String,
        digest: String,
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(Args)]
struct DbArgs {
    /// Postgres connection URL.
    #[arg(
        long,
        env = "DATABASE_URL",
        hide_env_values = true,
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    database_url: String,
    /// The data database, where the buffer sink ingests stream rows.
    /// Default: the state database's name with `_data` appended, on the
    /// same server (created by `migrate`).
    #[arg(long, env = "DATA_DATABASE_URL", hide_env_values = true)]
    data_database_url: Option<String>,
}

impl DbArgs {
    fn data_options(&self) -> Result<sqlx::postgres::PgConnectOptions> {
        dispatcher::datadb::options(&self.database_url, self.data_database_url.as_deref())
            .context("DATA_DATABASE_URL is not a Postgres URL")
    }

    /// Applies the state migrations through `store`, then creates the data
    /// database if needed and applies its migrations.
    async fn migrate(&self, store: &Store) -> Result<()> {
        store.migrate().await.context("applying migrations")?;
        let server: sqlx::postgres::PgConnectOptions = self
            .database_url
            .parse()
            .context("DATABASE_URL is not a Postgres URL")?;
        dispatcher::datadb::ensure(&server, &self.data_options()?)
            .await
            .context("creating or migrating the data database")
    }
}

#[derive(Args)]
struct KeyArgs {
    /// PKCS#8 PEM Ed25519 private key used to sign tokens.
    #[arg(long, env = "DISPATCHER_SIGNING_KEY_FILE")]
    signing_key: PathBuf,
    /// Extra SPKI PEM public keys accepted for verification (key rotation).
    #[arg(
        long = "verify-key",
        env = "DISPATCHER_VERIFY_KEY_FILES",
        value_delimiter = ','
    )]
    verify_keys: Vec<PathBuf>,
    /// Token issuer (`iss`).
    #[arg(long, env = "DISPATCHER_ISSUER", default_value = "dispatcher")]
    issuer: String,
}

impl KeyArgs {
    fn keyring(&self, leeway_secs: u64) -> Result<Keyring> {
        let signing = std::fs::read_to_string(&self.signing_key)
            .with_context(|| format!("reading signing key {}", self.signing_key.display()))?;
        let extra = self
            .verify_keys
            .iter()
            .map(|p| {
                std::fs::read_to_string(p)
                    .with_context(|| format!("reading verification key {}", p.display()))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Keyring::from_pem(
            &self.issuer,
            &signing,
            &extra,
            leeway_secs,
        )?)
    }
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    db: DbArgs,
    #[command(flatten)]
    keys: KeyArgs,
    /// Address to listen on.
    #[arg(long, env = "DISPATCHER_BIND", default_value = "127.0.0.1:8080")]
    bind: String,
    /// Apply migrations before serving.
    #[arg(long, env = "DISPATCHER_MIGRATE")]
    migrate: bool,
    /// Largest number of pooled database connections.
    #[arg(long, env = "DISPATCHER_DB_MAX_CONNECTIONS", default_value_t = 16)]
    max_connections: u32,
    #[command(flatten)]
    profile: dispatcher::profile::ProfileArgs,
    /// Roles to run: any of api, relay, reaper, sink, router, delivery, or all.
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
}

/// Users from an identity provider (ADR 0012): its tokens are accepted on
/// user endpoints beside the dispatcher's own user tokens.
#[derive(Args)]
struct IdpArgs {
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
struct SinkArgs {
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
struct LimitArgs {
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
}

impl LimitArgs {
    fn apply(&self, s: &mut Settings) {
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

#[derive(Subcommand)]
enum TokenCommand {
    /// Generate an Ed25519 signing key: PATH (private) and PATH.pub (public).
    Keygen {
        #[arg(long)]
        out: PathBuf,
    },
    /// Mint a worker credential.
    Worker {
        #[command(flatten)]
        keys: KeyArgs,
        #[arg(long)]
        worker_id: String,
        #[arg(long, default_value_t = 24)]
        ttl_hours: i64,
    },
    /// Mint a user token for acting in one org.
    User {
        #[command(flatten)]
        keys: KeyArgs,
        #[arg(long)]
        user_id: Uuid,
        #[arg(long)]
        org_id: Uuid,
        #[arg(long, default_value_t = 1)]
        ttl_hours: i64,
    },
}

use dispatcher::profile::QueueProfileArgs as QueueArgs;

#[derive(Subcommand)]
enum DlqCommand {
    /// Send the wake-ups of tasks that can still run from wakeups-dlq back
    /// to wakeups; drop those of finished or unknown tasks.
    Replay {
        #[command(flatten)]
        db: DbArgs,
        #[command(flatten)]
        queues: QueueArgs,
        /// Only count; send and delete nothing.
        #[arg(long)]
        dry_run: bool,
        /// Seconds each received message stays hidden during the run.
        #[arg(long, default_value_t = 60)]
        hold_seconds: u64,
    },
}

#[derive(Subcommand)]
enum SqsCommand {
    /// Create every queue and its DLQ with a redrive policy (idempotent).
    CreateQueues {
        #[command(flatten)]
        queues: QueueArgs,
        /// Receives before a message moves to the DLQ.
        #[arg(long, default_value_t = 5)]
        max_receives: u32,
    },
}

#[derive(Subcommand)]
enum OutboxCommand {
    /// Counts by state, and the dead rows with their last error.
    Status {
        #[command(flatten)]
        db: DbArgs,
        /// Dead rows to list.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Put dead rows back to pending so the relay publishes them again.
    Requeue {
        #[command(flatten)]
        db: DbArgs,
        /// Only these rows (repeatable); all dead rows when omitted.
        #[arg(long = "id")]
        ids: Vec<i64>,
    },
}

#[derive(Subcommand)]
enum RetentionCommand {
    /// Delete dataset objects no version can reference: staged parts and
    /// uploads of attempts that ended without committing, and orphan
    /// manifests, once their attempt ended longer ago than the cutoff.
    Run {
        #[command(flatten)]
        db: DbArgs,
        #[command(flatten)]
        profile: dispatcher::profile::ProfileArgs,
        /// Only list what would be deleted.
        #[arg(long)]
        dry_run: bool,
        /// The cutoff: attempts that ended longer ago than this. Refused
        /// below the floor (longest lease + token grace + 1 h).
        #[arg(long, default_value_t = 24)]
        older_than_hours: u64,
    },
}

/// Which dead batches a command acts on; every flag narrows.
#[derive(Args)]
struct DeadFilterArgs {
    /// Only this org's batches.
    #[arg(long)]
    org_id: Option<Uuid>,
    /// Only this dataset's batches.
    #[arg(long)]
    dataset: Option<String>,
    /// Only these batches (repeatable).
    #[arg(long = "batch")]
    batch_ids: Vec<Uuid>,
}

impl DeadFilterArgs {
    fn filter(&self) -> dispatcher::store::DeadFilter {
        dispatcher::store::DeadFilter {
            org_id: self.org_id,
            dataset: self.dataset.clone(),
            batch_ids: self.batch_ids.clone(),
        }
    }

    fn is_empty(&self) -> bool {
        self.org_id.is_none() && self.dataset.is_none() && self.batch_ids.is_empty()
    }
}

#[derive(Subcommand)]
enum AlertsCommand {
    /// Make a webhook destination of an org; prints its id and secret.
    AddDestination {
        #[command(flatten)]
        db: DbArgs,
        #[arg(long)]
        org_id: uuid::Uuid,
        #[arg(long)]
        name: String,
        #[arg(long)]
        url: String,
        /// `whsec_…` (default: a new random one).
        #[arg(long, env = "DISPATCHER_WEBHOOK_SECRET", hide_env_values = true)]
        secret: Option<String>,
    },
    /// Route the events of a stream dataset that match a `where` map to a
    /// destination.
    AddRoute {
        #[command(flatten)]
        db: DbArgs,
        #[arg(long)]
        org_id: uuid::Uuid,
        #[arg(long)]
        name: String,
        #[arg(long, default_value = "alert_events")]
        dataset: String,
        /// The destination's name.
        #[arg(long)]
        destination: String,
        /// A `where` map, e.g. '{"severity": {"eq": "critical"}}' (default:
        /// every event).
        #[arg(long = "match")]
        matcher: Option<String>,
    },
    /// An org's destinations and routes.
    List {
        #[command(flatten)]
        db: DbArgs,
        #[arg(long)]
        org_id: uuid::Uuid,
    },
    /// Deliveries that ran out of tries: list, replay.
    #[command(subcommand)]
    Dead(DeadDeliveriesCommand),
}

#[derive(Subcommand)]
enum DeadDeliveriesCommand {
    /// Dead deliveries with their last status and error, oldest first.
    List {
        #[command(flatten)]
        db: DbArgs,
        #[arg(long)]
        org_id: Option<uuid::Uuid>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Make dead deliveries pending again with fresh tries (same
    /// `webhook-id`): those named by `--id`, else every dead one (of
    /// `--org-id`).
    Replay {
        #[command(flatten)]
        db: DbArgs,
        #[arg(long)]
        org_id: Option<uuid::Uuid>,
        #[arg(long = "id")]
        ids: Vec<uuid::Uuid>,
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Subcommand)]
enum SinkCommand {
    /// Buffer batches the sink refused (malformed): list, replay, purge.
    #[command(subcommand)]
    Dead(Box<DeadCommand>),
    /// Batches still pending a while after their publish, with the
    /// transient failures the sink met (is the sink running? behind?).
    Pending {
        #[command(flatten)]
        db: DbArgs,
        /// Only batches published longer ago than this.
        #[arg(long, default_value_t = 5)]
        older_than_minutes: u64,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
}

#[derive(Subcommand)]
enum DeadCommand {
    /// Dead batches with their reason code, line and message.
    List {
        #[command(flatten)]
        db: DbArgs,
        #[command(flatten)]
        filter: DeadFilterArgs,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Send dead batches back to the sink, which checks them again and
    /// ingests each at most once.
    Replay {
        #[command(flatten)]
        db: DbArgs,
        #[command(flatten)]
        profile: dispatcher::profile::ProfileArgs,
        #[command(flatten)]
        filter: DeadFilterArgs,
        /// Take the object's current checksum and row count (after you
        /// fixed its content) instead of the published ones.
        #[arg(long)]
        accept_current_object: bool,
        /// Only list what would be replayed.
        #[arg(long)]
        dry_run: bool,
    },
    /// Delete the records of dead batches: they are never ingested, and
    /// retention later removes their objects. Needs a filter or --all.
    Purge {
        #[command(flatten)]
        db: DbArgs,
        #[command(flatten)]
        filter: DeadFilterArgs,
        /// Every dead batch of every org.
        #[arg(long)]
        all: bool,
        /// Only list what would be purged.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Alert destinations, routes, and dead deliveries (ADR 0014).
    #[command(subcommand)]
    Alerts(Box<AlertsCommand>),
    /// The buffer sink's dead batches.
    #[command(subcommand)]
    Sink(SinkCommand),
    /// Dataset object retention.
    #[command(subcommand)]
    Retention(RetentionCommand),
    /// Dead-letter queues.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// SQS set-up.
    #[command(subcommand)]
    Sqs(SqsCommand),
    /// Inspect and requeue outbox rows the relay dead-lettered.
    #[command(subcommand)]
    Outbox(OutboxCommand),
    /// Create an org (or find it by name); prints its id.
    CreateOrg {
        #[command(flatten)]
        db: DbArgs,
        #[arg(long)]
        name: String,
    },
    /// Create a user (or find it by e-mail), grant a role in an org; prints the user id.
    AddMember {
        #[command(flatten)]
        db: DbArgs,
        #[arg(long)]
        org_id: Uuid,
        #[arg(long)]
        email: String,
        /// owner, admin, member or viewer. Changing an existing member's
        /// role keeps at least one admin in the org.
        #[arg(long, default_value = "member")]
        role: String,
        /// Link the user to its identity at the identity provider (only a
        /// user with no identity yet; users are otherwise bound at their
        /// first sign-in from the token's verified e-mail): the provider's
        /// issuer (`--idp-issuer` of `serve`) ...
        #[arg(long, requires = "idp_subject")]
        idp_issuer: Option<String>,
        /// ... and the user's subject there.
        #[arg(long, requires = "idp_issuer")]
        idp_subject: Option<String>,
    },
    /// Remove the IdP identity bound to a user (its next sign-in binds
    /// again, from a verified e-mail): for a user whose IdP account was
    /// replaced. No API call can do this (ADR 0012).
    UnbindIdentity {
        #[command(flatten)]
        db: DbArgs,
        #[arg(long)]
        email: String,
    },
    /// Remove a member (never the org's last admin).
    RemoveMember {
        #[command(flatten)]
        db: DbArgs,
        #[arg(long)]
        org_id: Uuid,
        #[arg(long)]
        email: String,
    },
    /// List an org's members and their roles.
    ListMembers {
        #[command(flatten)]
        db: DbArgs,
        #[arg(long)]
        org_id: Uuid,
    },
}

async fn connect(db: &DbArgs, settings: Arc<Settings>, max: u32) -> Result<Store> {
    Store::connect(&db.database_url, max, settings)
        .await
        .context("connecting to Postgres (set DATABASE_URL)")
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    // `dev` prints its own progress; its services log warnings only.
    let default_filter = match cli.command {
        Command::Dev(_) => "warn",
        _ => "info,sqlx=warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default_filter.into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli.command {
        Command::Serve(args) => serve(*args).await,
        Command::Dev(args) => dev::run(args).await,
        Command::Migrate(db) => {
            let store = connect(&db, Arc::new(Settings::default()), 2).await?;
            db.migrate(&store).await?;
            eprintln!("migrations applied (state and data databases)");
            Ok(())
        }
        Command::Token(cmd) => token(cmd),
        Command::Admin(cmd) => admin(cmd).await,
        Command::Bundle(cmd) => bundle(cmd).await,
    }
}

async fn bundle(cmd: BundleCommand) -> Result<()> {
    match cmd {
        BundleCommand::Digest { dir } => {
            let (bytes, _) = dispatcher::bundles::pack(&dir)
                .with_context(|| format!("packing {}", dir.display()))?;
            println!("{}", dispatcher::bundles::digest(&bytes));
        }
        BundleCommand::Push { dir, tag, api } => {
            let view = push_bundle(&api, &dir, tag.as_deref()).await?;
            println!("{}", view.digest);
        }
        BundleCommand::Tag { tag, digest, api } => {
            tag_bundle(&api, &tag, &digest).await?;
            println!("{digest}");
        }
    }
    Ok(())
}

/// Packs `dir`, pushes it through the API and, if given, tags it.
pub(crate) async fn push_bundle(
    api: &ApiArgs,
    dir: &std::path::Path,
    tag: Option<&str>,
) -> Result<dispatcher_wire::BundleView> {
    let (bytes, manifest) =
        dispatcher::bundles::pack(dir).with_context(|| format!("packing {}", dir.display()))?;
    let size = bytes.len();
    let view: dispatcher_wire::BundleView = api_call(
        api,
        reqwest::Method::POST,
        "/v1/bundles",
        Some(("application/gzip", bytes)),
    )
    .await?;
    eprintln!(
        "pushed a {} bundle ({} bytes, handler {})",
        manifest.runtime.as_str(),
        size,
        manifest.handler
    );
    if let Some(tag) = tag {
        tag_bundle(api, tag, &view.digest).await?;
        eprintln!("tagged {tag}");
    }
    Ok(view)
}

async fn tag_bundle(api: &ApiArgs, tag: &str, digest: &str) -> Result<()> {
    let body = serde_json::to_vec(&dispatcher_wire::BundleTagRequest {
        digest: digest.to_owned(),
    })?;
    let _: dispatcher_wire::BundleView = api_call(
        api,
        reqwest::Method::PUT,
        &format!("/v1/bundles/tags/{tag}"),
        Some(("application/json", body)),
    )
    .await?;
    Ok(())
}

/// One call of the user API; a refusal becomes an error with its code.
async fn api_call<T: serde::de::DeserializeOwned>(
    api: &ApiArgs,
    method: reqwest::Method,
    path: &str,
    body: Option<(&str, Vec<u8>)>,
) -> Result<T> {
    let url = format!("{}{path}", api.url.trim_end_matches('/'));
    let mut req = reqwest::Client::new()
        .request(method, &url)
        .bearer_auth(&api.token);
    if let Some(org) = &api.org {
        req = req.header("dispatcher-org", org);
    }
    if let Some((content_type, bytes)) = body {
        req = req.header("content-type", content_type).body(bytes);
    }
    let resp = req.send().await.with_context(|| format!("calling {url}"))?;
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    if !status.is_success() {
        bail!("{url} answered {status}: {text}");
    }
    serde_json::from_str(&text).with_context(|| format!("{url} answered {text:?}"))
}

async fn serve(args: ServeArgs) -> Result<()> {
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
    let queue = args.profile.services_queue().await?;
    let objects = args.profile.objects().await?;
    let sts = match (&args.sts_role_arn, args.profile.is_aws()) {
        (Some(arn), true) => Some(Arc::new(
            dispatcher::objects::sts::StsIssuer::new(&args.profile.s3(), arn).await,
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
fn failpoints_from_env() -> Vec<String> {
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

/// The profile's object store for operator commands, which read, list and
/// delete but never presign.
async fn operator_objects(
    profile: &dispatcher::profile::ProfileArgs,
) -> Result<Arc<dyn dispatcher::objects::ObjectStore>> {
    Ok(match profile.objects().await? {
        dispatcher::profile::Objects::Store(s) => s,
        dispatcher::profile::Objects::LocalDir { dir, .. } => Arc::new(
            // No URL is presigned here, so any secret does; a random one.
            dispatcher::objects::LocalDirStore::new(
                dir,
                "http://127.0.0.1",
                rand::random::<[u8; 32]>().to_vec(),
            )?,
        ),
    })
}

fn print_dead(b: &dispatcher::store::DeadBatch) {
    println!(
        "{}  org {}  dataset {}  task {} attempt {}  {} rows  {}{}: {}  (object {}, replays {})",
        b.batch_id,
        b.org_id,
        b.dataset,
        b.task_id,
        b.attempt,
        b.rows,
        b.reason_code,
        b.reason_line
            .map(|l| format!(" at line {l}"))
            .unwrap_or_default(),
        b.reason_message.as_deref().unwrap_or(""),
        b.object_key,
        b.replays
    );
}

async fn data_pool(db: &DbArgs) -> Result<sqlx::PgPool> {
    Ok(dispatcher::datadb::lazy_pool(db.data_options()?, 2))
}

async fn alerts(cmd: AlertsCommand, settings: Arc<Settings>) -> Result<()> {
    match cmd {
        AlertsCommand::AddDestination {
            db,
            org_id,
            name,
            url,
            secret,
        } => {
            let store = connect(&db, settings, 2).await?;
            let secret = secret.unwrap_or_else(dispatcher::services::alerts::new_secret);
            if dispatcher::services::alerts::secret_key(&secret).is_none() {
                bail!("--secret must be whsec_ followed by base64 of 24 to 64 bytes");
            }
            let parsed = reqwest::Url::parse(&url).context("--url")?;
            if !matches!(parsed.scheme(), "http" | "https") {
                bail!("--url must be http or https");
            }
            let d = store
                .create_alert_destination(org_id, &name, parsed.as_str(), &secret)
                .await?;
            println!("{}", d.id);
            println!("{secret}");
        }
        AlertsCommand::AddRoute {
            db,
            org_id,
            name,
            dataset,
            destination,
            matcher,
        } => {
            let store = connect(&db, settings, 2).await?;
            let matcher: Option<serde_json::Value> = matcher
                .map(|m| serde_json::from_str(&m))
                .transpose()
                .context("--match is not JSON")?;
            let (dataset_id, mode, columns, _) = store.dataset_for_query(org_id, &dataset).await?;
            if mode != dispatcher_wire::DatasetMode::Stream {
                bail!("{dataset} is not a stream dataset");
            }
            dispatcher::services::alerts::matcher_plan(&dataset, &columns, matcher.as_ref())
                .map_err(|e| anyhow::anyhow!("{}: {}", e.field, e.message))?;
            let id = store
                .create_alert_route(org_id, &name, dataset_id, &destination, matcher.as_ref())
                .await?;
            println!("{id}");
        }
        AlertsCommand::List { db, org_id } => {
            let store = connect(&db, settings, 2).await?;
            for d in store.alert_destinations(org_id).await? {
                println!("destination {} {} {}", d.id, d.name, d.url);
            }
            for r in store.alert_route_views(org_id).await? {
                let m = r
                    .matcher
                    .map(|m| m.to_string())
                    .unwrap_or_else(|| "(every event)".into());
                println!(
                    "route {} {}: {} -> {} where {m}",
                    r.id, r.name, r.dataset, r.destination
                );
            }
        }
        AlertsCommand::Dead(DeadDeliveriesCommand::List { db, org_id, limit }) => {
            let store = connect(&db, settings, 2).await?;
            let data = data_pool(&db).await?;
            let dead =
                dispatcher::services::alerts::dead_deliveries(&store, &data, org_id, limit).await?;
            for d in &dead {
                println!(
                    "{} event {} -> {} (route {}): {} tries, last {} {}",
                    d.delivery_id,
                    d.event_id,
                    d.destination,
                    d.route,
                    d.tries,
                    d.last_status
                        .map(|s| s.to_string())
                        .unwrap_or_else(|| "-".into()),
                    d.last_error.as_deref().unwrap_or("")
                );
            }
            eprintln!("{} dead delivery(ies) shown (at most {limit})", dead.len());
        }
        AlertsCommand::Dead(DeadDeliveriesCommand::Replay {
            db,
            org_id,
            ids,
            dry_run,
        }) => {
            let data = data_pool(&db).await?;
            let n = dispatcher::services::alerts::replay_dead(&data, org_id, &ids, dry_run).await?;
            let verb = if dry_run { "would replay" } else { "replayed" };
            println!("{verb} {n} dead delivery(ies)");
        }
    }
    Ok(())
}

async fn sink_dead(cmd: DeadCommand, settings: Arc<Settings>) -> Result<()> {
    match cmd {
        DeadCommand::List { db, filter, limit } => {
            let store = connect(&db, settings, 2).await?;
            let dead = store.dead_batches(&filter.filter(), limit).await?;
            for b in &dead {
                print_dead(b);
            }
            eprintln!("{} dead batch(es) shown (at most {limit})", dead.len());
        }
        DeadCommand::Replay {
            db,
            profile,
            filter,
            accept_current_object,
            dry_run,
        } => {
            let store = connect(&db, settings, 2).await?;
            let objects = operator_objects(&profile).await?;
            let done = dispatcher::services::sink::replay_dead(
                &store,
                objects.as_ref(),
                &filter.filter(),
                accept_current_object,
                dry_run,
            )
            .await?;
            for r in &done {
                let accepted = match &r.accepted {
                    Some((sha, rows)) => format!(" (accepting sha256 {sha}, {rows} rows)"),
                    None => String::new(),
                };
                let verb = match (dry_run, r.replayed) {
                    (true, _) => "would replay",
                    (false, true) => "replayed",
                    (false, false) => "not dead any more",
                };
                println!("{verb} {}{accepted}", r.batch.batch_id);
            }
            let n = done.iter().filter(|r| r.replayed || dry_run).count();
            eprintln!(
                "{} {n} dead batch(es); the sink ingests each at most once",
                if dry_run { "would replay" } else { "replayed" }
            );
        }
        DeadCommand::Purge {
            db,
            filter,
            all,
            dry_run,
        } => {
            if filter.is_empty() && !all {
                bail!("name the batches to purge (--org-id, --dataset, --batch) or pass --all");
            }
            let store = connect(&db, settings, 2).await?;
            let f = filter.filter();
            if dry_run {
                let dead = store
                    .dead_batches(&f, dispatcher::services::sink::ADMIN_BATCH_LIMIT)
                    .await?;
                for b in &dead {
                    print!("would purge ");
                    print_dead(b);
                }
                eprintln!("would purge {} dead batch(es)", dead.len());
            } else {
                let n = store.purge_dead_batches(&f).await?;
                eprintln!("purged {n} dead batch(es); retention removes their objects later");
            }
        }
    }
    Ok(())
}

/// Cancels `shutdown` on SIGINT or SIGTERM.
async fn stop_on_signal(shutdown: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutdown requested; draining");
    shutdown.cancel();
}

fn token(cmd: TokenCommand) -> Result<()> {
    match cmd {
        TokenCommand::Keygen { out } => {
            let (private, public) = tokens::generate_key_pem();
            let pub_path = PathBuf::from(format!("{}.pub", out.display()));
            write_private(&out, &private)?;
            std::fs::write(&pub_path, public)
                .with_context(|| format!("writing {}", pub_path.display()))?;
            let ring = Keyring::from_pem("dispatcher", &private, &[], 0)?;
            println!("{}", ring.signing_kid());
            eprintln!(
                "wrote {} and {} (kid above)",
                out.display(),
                pub_path.display()
            );
        }
        TokenCommand::Worker {
            keys,
            worker_id,
            ttl_hours,
        } => {
            let ring = keys.keyring(0)?;
            let id = dispatcher::domain::worker_id(&worker_id)?;
            println!(
                "{}",
                ring.mint_worker(&id, Utc::now() + chrono::Duration::hours(ttl_hours))
            );
        }
        TokenCommand::User {
            keys,
            user_id,
            org_id,
            ttl_hours,
        } => {
            let ring = keys.keyring(0)?;
            println!(
                "{}",
                ring.mint_user(
                    user_id,
                    org_id,
                    Utc::now() + chrono::Duration::hours(ttl_hours)
                )
            );
        }
    }
    Ok(())
}

fn write_private(path: &PathBuf, pem: &str) -> Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts
        .open(path)
        .with_context(|| format!("creating {} (it must not exist yet)", path.display()))?;
    f.write_all(pem.as_bytes())?;
    Ok(())
}

async fn admin(cmd: AdminCommand) -> Result<()> {
    let settings = Arc::new(Settings::default());
    match cmd {
        AdminCommand::Dlq(DlqCommand::Replay {
            db,
            queues,
            dry_run,
            hold_seconds,
        }) => {
            let store = connect(&db, settings.clone(), 4).await?;
            let queue = queues.open(&store, &settings).await?;
            let r = dispatcher::services::dlq::replay_wakeups(
                queue.as_ref(),
                &store,
                dry_run,
                std::time::Duration::from_secs(hold_seconds),
            )
            .await?;
            let verb = if dry_run { "would replay" } else { "replayed" };
            println!(
                "{verb} {}; skipped {} finished and {} unknown tasks; {} malformed left in the DLQ",
                r.replayed, r.skipped_finished, r.skipped_unknown, r.malformed
            );
        }
        AdminCommand::Sqs(SqsCommand::CreateQueues {
            queues,
            max_receives,
        }) => {
            SqsQueue::create_queues(&queues.sqs(), max_receives).await?;
            SqsQueue::connect(&queues.sqs()).await?;
            println!("queues ready (prefix {:?})", queues.sqs_queue_prefix);
        }
        AdminCommand::Alerts(cmd) => alerts(*cmd, settings).await?,
        AdminCommand::Sink(SinkCommand::Dead(cmd)) => sink_dead(*cmd, settings).await?,
        AdminCommand::Sink(SinkCommand::Pending {
            db,
            older_than_minutes,
            limit,
        }) => {
            let store = connect(&db, settings, 2).await?;
            let older = std::time::Duration::from_secs(older_than_minutes.saturating_mul(60));
            let pending = store.pending_batches(older, limit).await?;
            for b in &pending {
                println!(
                    "{}  org {}  dataset {}  published {}  last pointer {}  transient failures {}{}",
                    b.batch_id,
                    b.org_id,
                    b.dataset,
                    b.created_at.to_rfc3339(),
                    b.pointer_at.to_rfc3339(),
                    b.transient_failures,
                    b.last_error
                        .as_deref()
                        .map(|e| format!("  last error: {e}"))
                        .unwrap_or_default()
                );
            }
            eprintln!(
                "{} batch(es) pending for more than {older_than_minutes} min (at most {limit} shown)",
                pending.len()
            );
        }
        AdminCommand::Retention(RetentionCommand::Run {
            db,
            profile,
            dry_run,
            older_than_hours,
        }) => {
            let store = connect(&db, settings, 2).await?;
            let objects = operator_objects(&profile).await?;
            let cutoff = std::time::Duration::from_secs(older_than_hours.saturating_mul(3600));
            let report = dispatcher::services::retention::run(
                &store,
                objects.as_ref(),
                cutoff,
                dry_run,
                |line| eprintln!("{line}"),
            )
            .await?;
            for key in &report.deleted {
                println!("{} {key}", if dry_run { "would delete" } else { "deleted" });
            }
            eprintln!(
                "{} {} of {} objects ({} bytes); {} scanned",
                if dry_run { "would delete" } else { "deleted" },
                report.deleted.len(),
                report.candidates,
                report.deleted_bytes,
                report.scanned
            );
        }
        AdminCommand::Outbox(OutboxCommand::Status { db, limit }) => {
            let store = connect(&db, settings, 2).await?;
            let c = store.outbox_counts().await?;
            println!("pending {}  sent {}  dead {}", c.pending, c.sent, c.dead);
            for row in store.outbox_dead(limit).await? {
                println!(
                    "dead #{} {} {} tries={} created={} error={}",
                    row.id,
                    row.topic,
                    row.payload,
                    row.tries,
                    row.created_at.to_rfc3339(),
                    row.last_error.unwrap_or_default()
                );
            }
        }
        AdminCommand::Outbox(OutboxCommand::Requeue { db, ids }) => {
            let store = connect(&db, settings, 2).await?;
            let only = (!ids.is_empty()).then_some(ids.as_slice());
            println!("requeued {}", store.outbox_requeue_dead(only).await?);
        }
        AdminCommand::CreateOrg { db, name } => {
            let name = name.trim();
            if name.is_empty() || name.len() > 200 {
                bail!("--name must be 1 to 200 bytes");
            }
            let store = connect(&db, settings, 2).await?;
            println!("{}", store.ensure_org(name).await?);
        }
        AdminCommand::AddMember {
            db,
            org_id,
            email,
            role,
            idp_issuer,
            idp_subject,
        } => {
            let Some(role) = Role::parse(&role) else {
                bail!("--role must be owner, admin, member or viewer");
            };
            if !email.contains('@') {
                bail!("--email must be an e-mail address");
            }
            let store = connect(&db, settings, 2).await?;
            let user = store.ensure_user(&email).await?;
            if let (Some(issuer), Some(subject)) = (&idp_issuer, &idp_subject) {
                store.set_user_subject(user, issuer, subject).await?;
            }
            if store.change_membership(org_id, user, Some(role)).await? {
                store.accept_membership(org_id, user).await?;
            } else {
                store.set_membership(org_id, user, role).await?;
            }
            println!("{user}");
        }
        AdminCommand::UnbindIdentity { db, email } => {
            let store = connect(&db, settings, 2).await?;
            match store.unbind_identity(&email).await? {
                Some(user) => eprintln!("user {user} ({email}) has no identity bound now"),
                None => bail!("no user has the e-mail {email}, or it has no identity bound"),
            }
        }
        AdminCommand::RemoveMember { db, org_id, email } => {
            let store = connect(&db, settings, 2).await?;
            let user = store.ensure_user(&email).await?;
            if store.remove_membership(org_id, user).await? {
                eprintln!("removed {email} from org {org_id}");
            } else {
                bail!("{email} is not a member of org {org_id}");
            }
        }
        AdminCommand::ListMembers { db, org_id } => {
            let store = connect(&db, settings, 2).await?;
            let members = store.list_members(org_id).await?;
            if members.is_empty() {
                eprintln!("org {org_id} has no members");
            }
            for m in members {
                println!(
                    "{}  {:<7} {}{}{}",
                    m.user_id,
                    m.role,
                    m.email,
                    if m.accepted { "" } else { "  (invited)" },
                    m.idp_subject
                        .map(|s| format!("  (idp subject {s})"))
                        .unwrap_or_default()
                );
            }
        }
    }
    Ok(())
}

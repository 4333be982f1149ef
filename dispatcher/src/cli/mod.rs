//! The `dispatcher` command line: the argument types every command shares,
//! and `main`, which dispatches to a module per area (`admin`, `alerts`,
//! `bundle`, `dev`, `serve`, `sink`, `token`).

mod admin;
mod alerts;
mod bundle;
mod dev;
mod jobs;
mod serve;
mod sink;
mod token;

use admin::*;
use alerts::*;
use anyhow::{bail, Context, Result};
use bundle::*;
use clap::{Args, Parser, Subcommand};
use dispatcher::settings::Settings;
use dispatcher::store::Store;
use dispatcher::tokens::Keyring;
use jobs::*;
use serve::*;
use sink::*;
use std::path::PathBuf;
use std::sync::Arc;
use token::*;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "dispatcher",
    version,
    about = "Lease-based task dispatcher backed by Postgres"
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
pub(crate) enum Command {
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
    /// The org's jobs through the API: list, show, retry, cancel, bulk
    /// actions and their record.
    #[command(subcommand)]
    Jobs(JobsCommand),
    /// A task's detail and events, through the API.
    #[command(subcommand)]
    Tasks(TasksCommand),
    /// Pause a runtime in the org: its ready tasks are not claimed.
    Pause(PauseArgs),
    /// Resume a paused runtime.
    Resume(PauseArgs),
    /// The org's paused runtimes.
    Pauses(PausesArgs),
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

/// Databases a Postgres server makes for itself; never the dispatcher's.
const MAINTENANCE_DATABASES: [&str; 3] = ["postgres", "template0", "template1"];

#[derive(Args)]
pub(crate) struct DbArgs {
    /// Postgres URL of the dispatcher's own database (required; never the
    /// server's maintenance database `postgres`).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// The data database, where the buffer sink ingests stream rows.
    /// Default: the state database's name with `_data` appended, on the
    /// same server (created by `migrate`).
    #[arg(long, env = "DATA_DATABASE_URL", hide_env_values = true)]
    data_database_url: Option<String>,
}

impl DbArgs {
    /// The database URL: given, a Postgres URL, and not a maintenance
    /// database (a forgotten `DATABASE_URL` must not put the schema into
    /// `postgres`, nor read it there and fail on a missing table).
    fn url(&self) -> Result<&str> {
        let Some(url) = self
            .database_url
            .as_deref()
            .filter(|u| !u.trim().is_empty())
        else {
            bail!(
                "no database: set DATABASE_URL (or --database-url) to the dispatcher's own \
                 database, e.g. postgres://postgres@127.0.0.1:5432/dispatcher \
                 (`createdb dispatcher`, then `dispatcher migrate`)"
            );
        };
        let opts: sqlx::postgres::PgConnectOptions = url
            .parse()
            .map_err(|_| anyhow::anyhow!("DATABASE_URL is not a Postgres URL"))?;
        let name = opts
            .get_database()
            .map(str::to_owned)
            .unwrap_or_else(|| opts.get_username().to_owned());
        if MAINTENANCE_DATABASES.contains(&name.as_str()) {
            bail!(
                "DATABASE_URL names the maintenance database {name:?}: the dispatcher's tables do \
                 not belong there; create a database of its own (`createdb dispatcher`) and name \
                 it in DATABASE_URL"
            );
        }
        Ok(url)
    }

    fn data_options(&self) -> Result<sqlx::postgres::PgConnectOptions> {
        dispatcher::datadb::options(self.url()?, self.data_database_url.as_deref())
            .context("DATA_DATABASE_URL is not a Postgres URL")
    }

    /// Applies the state migrations through `store`, then creates the data
    /// database if needed and applies its migrations.
    async fn migrate(&self, store: &Store) -> Result<()> {
        store.migrate().await.context("applying migrations")?;
        let server: sqlx::postgres::PgConnectOptions = self
            .url()?
            .parse()
            .context("DATABASE_URL is not a Postgres URL")?;
        dispatcher::datadb::ensure(&server, &self.data_options()?)
            .await
            .context("creating or migrating the data database")
    }
}

#[derive(Args)]
pub(crate) struct KeyArgs {
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

pub(crate) async fn connect(db: &DbArgs, settings: Arc<Settings>, max: u32) -> Result<Store> {
    Store::connect(db.url()?, max, settings)
        .await
        .context("connecting to Postgres (set DATABASE_URL)")
}

pub async fn main() -> Result<()> {
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
        Command::Jobs(cmd) => jobs::jobs(cmd).await,
        Command::Tasks(cmd) => tasks(cmd).await,
        Command::Pause(args) => pause(args, true).await,
        Command::Resume(args) => pause(args, false).await,
        Command::Pauses(args) => pauses(args).await,
    }
}

pub(crate) async fn data_pool(db: &DbArgs) -> Result<sqlx::PgPool> {
    Ok(dispatcher::datadb::lazy_pool(db.data_options()?, 2))
}

/// Cancels `shutdown` on SIGINT or SIGTERM.
pub(crate) async fn stop_on_signal(shutdown: CancellationToken) {
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

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
    about = "Lease-based task dispatcher backed by Postgres",
    // Ours below: clap's own `help` refuses `dispatcher help --help`.
    disable_help_subcommand = true
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
    /// Signing keys and credentials: keygen, worker, user.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Operator commands on the database: orgs and their members
    /// (create-org, add-member, remove-member, list-members,
    /// unbind-identity), alerts, the sink's batches, dataset retention, the
    /// wake-ups dlq, sqs set-up, the outbox, the workers seen recently.
    #[command(subcommand)]
    Admin(AdminCommand),
    /// UDF bundles: push a directory, print its digest, tag a bundle.
    #[command(subcommand)]
    Bundle(BundleCommand),
    /// The org's jobs through the API: list, show, retry, cancel, bulk
    /// actions and their record.
    #[command(subcommand)]
    Jobs(JobsCommand),
    /// A task through the API: show its detail and attempts, its attempts'
    /// logs, its events.
    #[command(subcommand)]
    Tasks(TasksCommand),
    /// Pause a runtime in the org: its ready tasks are not claimed.
    Pause(PauseArgs),
    /// Resume a paused runtime.
    Resume(PauseArgs),
    /// The org's paused runtimes.
    Pauses(PausesArgs),
    /// Exit 0 when a dispatcher answers its readiness probe, 1 otherwise,
    /// with one line: for container health checks without curl.
    Healthcheck(HealthcheckArgs),
    /// Print the help of a command: `dispatcher help admin alerts` is
    /// `dispatcher admin alerts --help`.
    Help {
        /// The command's path (none: this program's help).
        command: Vec<String>,
    },
}

#[derive(Args)]
pub(crate) struct HealthcheckArgs {
    /// The dispatcher to ask (`/readyz` is appended unless the URL has a
    /// path).
    #[arg(long, env = "DISPATCHER_URL", default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Ask `/livez` instead (the process answers; no dependency checked).
    #[arg(long)]
    live: bool,
    /// Seconds to wait for the answer.
    #[arg(long, default_value_t = 5)]
    timeout_seconds: u64,
}

async fn healthcheck(args: HealthcheckArgs) -> Result<()> {
    let mut url = reqwest::Url::parse(&args.url).context("--url is not a URL")?;
    if url.path() == "/" || url.path().is_empty() {
        url.set_path(if args.live { "/livez" } else { "/readyz" });
    }
    let answer = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(args.timeout_seconds.max(1)))
        .build()?
        .get(url.clone())
        .send()
        .await;
    match answer {
        Ok(r) if r.status().is_success() => {
            println!("{url}: {}", r.status());
            Ok(())
        }
        Ok(r) => {
            let status = r.status();
            let body: serde_json::Value = r.json().await.unwrap_or_default();
            let why = body["error"]["message"]
                .as_str()
                .unwrap_or("no reason given");
            bail!("{url}: {status}: {why}")
        }
        Err(e) => bail!(
            "{url}: no answer: {}",
            std::error::Error::source(&e)
                .map(|s| s.to_string())
                .unwrap_or_else(|| e.to_string())
        ),
    }
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
    /// The state database's password, when DATABASE_URL holds none (a
    /// secret injected on its own, e.g. the RDS-managed one's `password`).
    #[arg(long, env = "DATABASE_PASSWORD", hide_env_values = true)]
    database_password: Option<String>,
    /// The data database's password, when DATA_DATABASE_URL holds none
    /// (default: DATABASE_PASSWORD when the data database is derived from
    /// DATABASE_URL).
    #[arg(long, env = "DATA_DATABASE_PASSWORD", hide_env_values = true)]
    data_database_password: Option<String>,
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

    /// The state database's connection options: the URL, with
    /// DATABASE_PASSWORD when given.
    fn options(&self) -> Result<sqlx::postgres::PgConnectOptions> {
        let opts = dispatcher::store::parse_url(self.url()?)
            .context("DATABASE_URL is not a Postgres URL")?;
        Ok(match &self.database_password {
            Some(p) => opts.password(p),
            None => opts,
        })
    }

    fn data_options(&self) -> Result<sqlx::postgres::PgConnectOptions> {
        let opts = dispatcher::datadb::options(self.url()?, self.data_database_url.as_deref())
            .context("DATA_DATABASE_URL is not a Postgres URL")?;
        let password = match &self.data_database_url {
            Some(_) => self.data_database_password.as_ref(),
            None => self
                .data_database_password
                .as_ref()
                .or(self.database_password.as_ref()),
        };
        Ok(match password {
            Some(p) => opts.password(p),
            None => opts,
        })
    }

    /// Applies the state migrations through `store`, then creates the data
    /// database if needed and applies its migrations.
    async fn migrate(&self, store: &Store) -> Result<()> {
        let pending = store
            .pending_migrations()
            .await
            .context("reading the applied migrations")?;
        eprintln!(
            "{}",
            dispatcher::datadb::progress_line("state database", &pending)
        );
        let started = std::time::Instant::now();
        store.migrate().await.context("applying migrations")?;
        if !pending.is_empty() {
            eprintln!(
                "state database: applied {} in {:.1} s",
                pending.len(),
                started.elapsed().as_secs_f64()
            );
        }
        let server = self.options()?;
        dispatcher::datadb::ensure_reporting(&server, &self.data_options()?, |line| {
            eprintln!("{line}")
        })
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
    Store::connect_with(db.options()?, max, settings)
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
    // Services log JSON lines by default, the one-shot commands and `dev`
    // text (`LOG_FORMAT` chooses).
    let format = match std::env::var("LOG_FORMAT") {
        Ok(f) => f.parse().map_err(anyhow::Error::msg)?,
        Err(_) => match cli.command {
            Command::Serve(_) => dispatcher_telemetry::LogFormat::Json,
            _ => dispatcher_telemetry::LogFormat::Text,
        },
    };
    let telemetry = dispatcher_telemetry::init("dispatcher", default_filter, format)?;
    let result = run(cli).await;
    // The spans still buffered go out (blocking, so off the runtime's threads).
    let _ = tokio::task::spawn_blocking(move || drop(telemetry)).await;
    result
}

async fn run(cli: Cli) -> Result<()> {
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
        Command::Healthcheck(args) => healthcheck(args).await,
        Command::Help { command } => {
            // Parsing `dispatcher PATH… --help` prints that command's help
            // (and exits), or says which part of the path is unknown.
            let argv = std::iter::once("dispatcher".to_owned())
                .chain(command)
                .chain(std::iter::once("--help".to_owned()));
            match Cli::try_parse_from(argv) {
                Err(e) => e.exit(),
                Ok(_) => unreachable!("--help never parses"),
            }
        }
    }
}

/// Progress of a long command on stderr, at most one line per period (the
/// first after one period: a quick command prints only its final line).
/// The period is 1 s, or `DISPATCHER_PROGRESS_SECONDS` (0: every step).
pub(crate) struct Every {
    period: std::time::Duration,
    last: std::time::Instant,
}

impl Every {
    pub(crate) fn second() -> Self {
        let secs = std::env::var("DISPATCHER_PROGRESS_SECONDS")
            .ok()
            .and_then(|s| s.parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s >= 0.0)
            .unwrap_or(1.0);
        Every {
            period: std::time::Duration::from_secs_f64(secs),
            last: std::time::Instant::now(),
        }
    }

    pub(crate) fn say(&mut self, line: impl FnOnce() -> String) {
        if self.last.elapsed() >= self.period {
            self.last = std::time::Instant::now();
            eprintln!("{}", line());
        }
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

#[cfg(test)]
mod tests {
    use super::Cli;
    use clap::{CommandFactory, Parser};

    /// Every group's one-line description (what its parent's listing
    /// shows) names each of its commands, so `--help` at any level says
    /// what the group holds.
    #[test]
    fn every_command_group_says_what_it_holds() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for sub in cmd.get_subcommands() {
                let here = format!("{path} {}", sub.get_name());
                let children: Vec<&str> = sub
                    .get_subcommands()
                    .map(|c| c.get_name())
                    .filter(|n| *n != "help")
                    .collect();
                if !children.is_empty() {
                    let about = sub
                        .get_about()
                        .map(|a| a.to_string().to_lowercase())
                        .unwrap_or_default();
                    let words: Vec<String> = about
                        .split(|c: char| !(c.is_alphanumeric() || c == '-'))
                        .map(str::to_owned)
                        .collect();
                    for child in children {
                        let spaced = child.replace('-', " ");
                        if !words.iter().any(|w| w == child) && !about.contains(&spaced) {
                            missing.push(format!("{here}: {child} (about: {about:?})"));
                        }
                    }
                }
                walk(sub, &here, missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "dispatcher", &mut missing);
        assert!(
            missing.is_empty(),
            "groups that do not name a command:\n{}",
            missing.join("\n")
        );
    }

    /// The commands the runbooks, operations.md and the README quote: each
    /// path (`dispatcher admin sink dead replay`) exists and each `--flag`
    /// is one of its options. (`a|b` means either; `[…]`, `…`, `<x>` and
    /// upper-case words are placeholders.)
    #[test]
    fn every_command_the_runbooks_and_docs_quote_exists_with_its_flags() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut files = vec![
            root.join("README.md"),
            root.join("docs/standards/operations.md"),
            root.join("terraform/README.md"),
        ];
        for dir in ["runbooks", "docs"] {
            for e in std::fs::read_dir(root.join(dir)).unwrap() {
                let path = e.unwrap().path();
                if path.extension().is_some_and(|x| x == "md") {
                    files.push(path);
                }
            }
        }
        let mut quoted = Vec::new();
        for file in &files {
            let text = std::fs::read_to_string(file).unwrap();
            let name = file.strip_prefix(&root).unwrap().display().to_string();
            // Inline code, and lines of code blocks (indented or fenced).
            for span in text.split('`').skip(1).step_by(2) {
                if let Some(rest) = span.strip_prefix("dispatcher ") {
                    quoted.push((name.clone(), rest.to_owned()));
                }
            }
            for line in text.lines() {
                let line = line.trim_start().trim_start_matches("$ ");
                if let Some(rest) = line.strip_prefix("dispatcher ") {
                    let rest = rest.split('#').next().unwrap_or_default();
                    // Prose that starts a line with the word.
                    if rest.split_whitespace().next().is_some_and(|w| {
                        Cli::command().get_subcommands().any(|c| c.get_name() == w)
                    }) {
                        quoted.push((name.clone(), rest.to_owned()));
                    }
                }
            }
        }
        assert!(
            quoted.len() > 30,
            "found only {} quoted commands",
            quoted.len()
        );
        let mut wrong = Vec::new();
        for (file, rest) in &quoted {
            let words: Vec<&str> = rest
                .split_whitespace()
                .map(|w| w.trim_matches(|c| c == '[' || c == ']' || c == '\\'))
                .filter(|w| !w.is_empty() && !w.starts_with('…') && !w.starts_with("..."))
                .collect();
            let cli = Cli::command();
            let mut cmds = vec![&cli];
            let mut path = String::from("dispatcher");
            for w in &words {
                if w.starts_with('-') {
                    let flag = w
                        .trim_start_matches('-')
                        .split('=')
                        .next()
                        .unwrap_or_default();
                    for flag in flag.split('|') {
                        let flag = flag.trim_start_matches('-');
                        let known = flag == "help"
                            || cmds
                                .iter()
                                .any(|c| c.get_arguments().any(|a| a.get_long() == Some(flag)));
                        if !known {
                            wrong.push(format!("{file}: `{path}` has no --{flag}"));
                        }
                    }
                    continue;
                }
                let alternatives: Vec<&str> = w.split('|').collect();
                let parents = std::mem::take(&mut cmds);
                let groups = parents.iter().any(|c| c.has_subcommands());
                if !groups {
                    cmds = parents; // an argument: stay on this command
                    continue;
                }
                for alt in &alternatives {
                    match parents.iter().find_map(|c| c.find_subcommand(alt)) {
                        Some(sub) => cmds.push(sub),
                        None => wrong.push(format!("{file}: `{path}` has no command {alt:?}")),
                    }
                }
                if cmds.is_empty() {
                    break;
                }
                path = format!("{path} {w}");
            }
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }

    #[test]
    fn help_of_help_and_help_of_a_path_parse() {
        let e = match Cli::try_parse_from(["dispatcher", "help", "--help"]) {
            Err(e) => e,
            Ok(_) => panic!("--help printed nothing"),
        };
        assert_eq!(e.kind(), clap::error::ErrorKind::DisplayHelp);
        assert!(e.to_string().contains("Print the help of a command"), "{e}");
        let e = match Cli::try_parse_from(["dispatcher", "admin", "alerts", "--help"]) {
            Err(e) => e,
            Ok(_) => panic!("--help printed nothing"),
        };
        assert_eq!(e.kind(), clap::error::ErrorKind::DisplayHelp);
        assert!(e.to_string().contains("add-destination"), "{e}");
    }
}

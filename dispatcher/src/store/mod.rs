//! The store: the only source of truth. Each public operation is one short
//! Postgres transaction; lease fencing lives in the SQL `WHERE` clauses.
//!
//! Lock order, to keep transactions free of deadlocks: a transaction that
//! touches a job row and task rows locks the **job row first**, then tasks;
//! several job rows are locked in id order. Operations on a single task
//! (claim, heartbeat, events, publishes) take no job lock; the successes
//! of tasks without dependants share theirs (`FOR SHARE`, ADR 0016).

mod actions;
mod alerts;
mod attempt_writes;
pub mod backlog;
mod batches;
mod bundles;
mod claim;
mod completion;
mod datasets;
mod inspection;
mod jobs;
mod logs;
mod orgs;
mod outbox;
mod pauses;
pub mod ready;
pub mod replicas;
mod tasks;
mod transitions;
pub mod workers;

pub use alerts::{Destination, RouteSpec};
pub use batches::{DeadBatch, DeadFilter, PendingBatch, SinkBatch};
pub use bundles::ResolvedBundle;
pub use datasets::{NewPart, StagedDataset, WrittenManifest};
pub use jobs::TaskPage;
pub use logs::StoredLog;
pub use orgs::MemberRow;
pub use outbox::{DeadRow, OutboxCounts, OutboxRow};

pub use actions::{BulkAction, RetryScope};
pub use claim::Pick;
pub use inspection::EventCursor;
pub use tasks::*;

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

use crate::settings::Settings;

/// The migrations in `migrations/`, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

#[derive(Clone, Debug)]
pub struct Store {
    pool: PgPool,
    settings: Arc<Settings>,
}

/// A Postgres URL's options, with one default of our own: a URL naming no
/// `sslmode` and a loopback host (or a Unix socket) connects without TLS.
/// sqlx's default, `prefer`, would negotiate TLS with any server that has
/// it on, which costs the local profile a fifth of its database time for
/// nothing; any other host keeps `prefer`, and an explicit `sslmode` always
/// wins (RDS: `verify-full`, docs/standards/operations.md).
pub fn parse_url(url: &str) -> Result<PgConnectOptions, sqlx::Error> {
    let options: PgConnectOptions = url.parse()?;
    let local = options.get_socket().is_some()
        || matches!(
            options.get_host(),
            "localhost" | "127.0.0.1" | "::1" | "[::1]"
        )
        || options.get_host().starts_with('/');
    Ok(match (url.contains("sslmode="), local) {
        (false, true) => options.ssl_mode(sqlx::postgres::PgSslMode::Disable),
        _ => options,
    })
}

impl Store {
    pub fn new(pool: PgPool, settings: Arc<Settings>) -> Self {
        Store { pool, settings }
    }

    /// Connects with a bounded pool. `max_connections` bounds the load this
    /// process puts on Postgres.
    pub async fn connect(
        url: &str,
        max_connections: u32,
        settings: Arc<Settings>,
    ) -> Result<Self, sqlx::Error> {
        Self::connect_with(parse_url(url)?, max_connections, settings).await
    }

    /// As [`Store::connect`], with options built elsewhere (a password
    /// given apart from the URL).
    pub async fn connect_with(
        options: PgConnectOptions,
        max_connections: u32,
        settings: Arc<Settings>,
    ) -> Result<Self, sqlx::Error> {
        // No ping before each checkout (sqlx's default): it costs a round
        // trip per transaction. A connection that died is found by the
        // statement that uses it; that call answers 503 (retryable) and the
        // pool drops the connection.
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .test_before_acquire(false)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options.application_name("dispatcher"))
            .await?;
        Ok(Store { pool, settings })
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The backoff before the attempt after `failed_attempt`, jittered.
    fn retry_delay(&self, failed_attempt: i32) -> Duration {
        let n = u32::try_from(failed_attempt).unwrap_or(1);
        self.settings.retry_delay(n, rand::random::<f64>())
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub async fn migrate(&self) -> Result<(), sqlx::migrate::MigrateError> {
        MIGRATOR.run(&self.pool).await
    }

    /// The state migrations not applied yet, as `0024 replicas`.
    pub async fn pending_migrations(&self) -> Result<Vec<String>, sqlx::Error> {
        pending_migrations(&MIGRATOR, &self.pool).await
    }

    /// Readiness: the database answers.
    pub async fn ping(&self) -> Result<(), sqlx::Error> {
        sqlx::query!("SELECT 1 AS one")
            .fetch_one(&self.pool)
            .await
            .map(|_| ())
    }
}

/// How many state migrations this build knows.
pub fn migration_count() -> usize {
    MIGRATOR
        .iter()
        .filter(|m| m.migration_type.is_up_migration())
        .count()
}

/// `migrator`'s migrations not applied (successfully) to `pool`'s database
/// yet, oldest first, as `0024 replicas`: what `dispatcher migrate` says
/// it is about to do. Dynamic SQL: `_sqlx_migrations` is sqlx's own table,
/// absent before the first migration, so no query macro can describe it.
pub async fn pending_migrations(
    migrator: &sqlx::migrate::Migrator,
    pool: &PgPool,
) -> Result<Vec<String>, sqlx::Error> {
    let table: Option<String> = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations')::text")
        .fetch_one(pool)
        .await?;
    let applied: std::collections::HashSet<i64> = match table {
        Some(_) => sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
            .fetch_all(pool)
            .await?
            .into_iter()
            .collect(),
        None => Default::default(),
    };
    Ok(migrator
        .iter()
        .filter(|m| m.migration_type.is_up_migration() && !applied.contains(&m.version))
        .map(|m| format!("{:04} {}", m.version, m.description))
        .collect())
}

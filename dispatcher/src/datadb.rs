//! The data database (ADR 0006): where the buffer sink ingests the rows of
//! `stream` datasets. By default it is a second database on the state
//! database's server, named after it with `_data` appended, and
//! `dispatcher migrate` creates it, so the local profile needs no set-up;
//! `DATA_DATABASE_URL` points it anywhere else (RDS "data" in the aws
//! profile).

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgPool};

/// The migrations in `migrations/data/`, embedded in the binary.
pub static DATA_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/data");

/// The data database's connection options: `explicit` if given, else the
/// state database's with `_data` appended to its name.
pub fn options(state_url: &str, explicit: Option<&str>) -> Result<PgConnectOptions, sqlx::Error> {
    match explicit {
        Some(url) => crate::store::parse_url(url),
        None => {
            let state = crate::store::parse_url(state_url)?;
            let name = format!("{}_data", state.get_database().unwrap_or("postgres"));
            Ok(state.database(&name))
        }
    }
}

/// A pool over the data database that connects lazily: a data database
/// that is down makes the sink retry, never fail to start.
pub fn lazy_pool(options: PgConnectOptions, max_connections: u32) -> PgPool {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy_with(options.application_name("dispatcher-sink"))
}

/// Creates the data database if it does not exist (connecting to the
/// server through `server`, any database on it), then applies the data
/// migrations. Idempotent, and safe when several processes run it at once.
pub async fn ensure(server: &PgConnectOptions, data: &PgConnectOptions) -> anyhow::Result<()> {
    ensure_reporting(server, data, |_| {}).await
}

/// `ensure`, telling `report` what it does (the data database created,
/// the migrations pending, applied): `dispatcher migrate`'s progress.
pub async fn ensure_reporting(
    server: &PgConnectOptions,
    data: &PgConnectOptions,
    mut report: impl FnMut(&str),
) -> anyhow::Result<()> {
    match data.connect().await {
        Ok(conn) => {
            conn.close().await.ok();
        }
        // 3D000: invalid_catalog_name (no such database).
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("3D000") => {
            let name = data.get_database().unwrap_or("postgres").to_owned();
            let mut conn = server.connect().await?;
            let created = sqlx::query(&format!("CREATE DATABASE {}", quote_ident(&name)))
                .execute(&mut conn)
                .await;
            conn.close().await.ok();
            match created {
                Ok(_) => {
                    tracing::info!(database = %name, "created the data database");
                    report(&format!("data database: created {name}"));
                }
                // 42P04 duplicate_database, 23505: another process won the race.
                Err(sqlx::Error::Database(e))
                    if matches!(e.code().as_deref(), Some("42P04") | Some("23505")) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Err(e) => return Err(e.into()),
    }
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(data.clone())
        .await?;
    let pending = crate::store::pending_migrations(&DATA_MIGRATOR, &pool).await?;
    report(&progress_line("data database", &pending));
    let started = std::time::Instant::now();
    DATA_MIGRATOR.run(&pool).await?;
    if !pending.is_empty() {
        report(&format!(
            "data database: applied {} in {:.1} s",
            pending.len(),
            started.elapsed().as_secs_f64()
        ));
    }
    pool.close().await;
    Ok(())
}

/// `"name"`, with any `"` doubled.
pub(crate) fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// What `dispatcher migrate` says before it applies `pending` to `db`.
pub fn progress_line(db: &str, pending: &[String]) -> String {
    match pending {
        [] => format!("{db}: up to date"),
        [one] => format!("{db}: applying {one}"),
        many => format!(
            "{db}: applying {} migrations ({} … {})",
            many.len(),
            many[0],
            many[many.len() - 1]
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_data_database_is_the_state_database_with_a_suffix() {
        let o = options("postgres://u:p@db:5433/state?sslmode=disable", None).unwrap();
        assert_eq!(o.get_database(), Some("state_data"));
        assert_eq!(o.get_host(), "db");
        assert_eq!(o.get_port(), 5433);
        let o = options(
            "postgres://u@db/state",
            Some("postgres://v@other/analytics"),
        )
        .unwrap();
        assert_eq!(o.get_database(), Some("analytics"));
        assert_eq!(o.get_host(), "other");
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }
}

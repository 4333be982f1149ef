//! The dispatcher: a lease-based task dispatcher backed by Postgres.
//!
//! `docs/architecture.md` is the map of this crate.

pub mod dlq;
pub mod domain;
pub mod error;
pub mod http;
pub mod objects;
pub mod profile;
pub mod queue;
pub mod reaper;
pub mod relay;
pub mod services;
pub mod settings;
pub mod store;
pub mod tokens;

/// A duration in whole milliseconds as Postgres `bigint`, saturating.
pub(crate) fn millis(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

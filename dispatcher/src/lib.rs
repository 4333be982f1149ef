//! The dispatcher: a lease-based task dispatcher backed by Postgres.
//!
//! `docs/architecture.md` is the map of this crate.

pub mod aws;
pub mod breaker;
pub mod bundles;
pub mod datadb;
pub mod domain;
pub mod egress;
pub mod error;
pub mod http;
pub mod idp;
pub mod metrics;
pub mod objects;
pub mod profile;
pub mod queue;
pub mod roles;
pub mod rows;
pub mod services;
pub mod settings;
pub mod store;
pub mod tokens;

/// A duration in whole milliseconds as Postgres `bigint`, saturating.
pub(crate) fn millis(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// A connection URL as it may be shown: the password, if any, replaced by
/// `***` (`postgres://user:***@host/db`).
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let rest = &url[scheme_end..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_owned();
    };
    match rest[..at].find(':') {
        Some(colon) => format!(
            "{}{}:***{}",
            &url[..scheme_end],
            &rest[..colon],
            &rest[at..]
        ),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn redact_url_hides_only_the_password() {
        assert_eq!(
            super::redact_url("postgres://ada:hunter2@db:5432/x?sslmode=require"),
            "postgres://ada:***@db:5432/x?sslmode=require"
        );
        assert_eq!(
            super::redact_url("postgres://ada@db/x"),
            "postgres://ada@db/x"
        );
        assert_eq!(
            super::redact_url("postgres://a:p%40ss@db/x@y"),
            "postgres://a:***@db/x@y"
        );
        assert_eq!(super::redact_url("not a url"), "not a url");
    }
}

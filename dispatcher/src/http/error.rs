//! The one error of the HTTP layer: [`ApiError`], rendered as the
//! contract's `{"error": {"code", "message", "retryable"}}` body, and its
//! mapping from what the domain, the store and the token service decided.
//! Internal details are logged, never sent.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use dispatcher_wire::{ErrorBody, ErrorDetail};

use crate::domain::Invalid;
use crate::error::StoreError;
use crate::tokens::TokenError;

/// The one error type of the HTTP layer.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub retryable: bool,
    pub retry_after_secs: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            retryable: false,
            retry_after_secs: None,
        }
    }

    pub fn invalid(field: &str, message: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("{field}: {message}"),
        )
    }

    pub fn unauthenticated(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthenticated", message)
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// `500 integrity_error`: stored data is not what was committed; the
    /// caller should not retry (an operator must restore the object).
    pub fn integrity(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "integrity_error",
            message,
        )
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", message)
    }

    pub fn payload_too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("request body is larger than the limit of {limit} bytes"),
        )
    }

    /// `413 payload_too_large` for a limit other than the body size.
    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", message)
    }

    /// `429` (`rate_limited` or `overloaded`) with `Retry-After` (whole
    /// seconds, at least 1).
    pub fn rate_limited(
        code: &'static str,
        message: impl Into<String>,
        retry_after: std::time::Duration,
    ) -> Self {
        let mut e = Self::new(StatusCode::TOO_MANY_REQUESTS, code, message);
        e.retryable = true;
        e.retry_after_secs = Some(retry_after.as_secs_f64().ceil().max(1.0) as u64);
        e
    }

    pub fn method_not_allowed() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request",
            "method not allowed on this path",
        )
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message);
        e.retryable = true;
        e.retry_after_secs = Some(1);
        e
    }

    /// `503 unavailable` for a call refused by an open circuit breaker,
    /// with `Retry-After` until its probe.
    pub fn circuit_open(open: &crate::breaker::Open) -> Self {
        let mut e = Self::unavailable(format!(
            "{} is failing; calls to it fail fast for now",
            open.name
        ));
        e.retry_after_secs = Some(open.retry_after.as_secs_f64().ceil().max(1.0) as u64);
        e
    }

    pub fn internal() -> Self {
        let mut e = Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; it has been logged",
        );
        e.retryable = true;
        e
    }
}

impl From<Invalid> for ApiError {
    fn from(e: Invalid) -> Self {
        ApiError::invalid(&e.field, e.message)
    }
}

impl From<TokenError> for ApiError {
    fn from(e: TokenError) -> Self {
        ApiError::unauthenticated(e.to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        let message = e.to_string();
        match e {
            StoreError::TaskNotFound(_) | StoreError::JobNotFound(_) | StoreError::NotFound(_) => {
                ApiError::not_found(message)
            }
            StoreError::StaleAttempt { .. } | StoreError::AttemptFinished { .. } => {
                ApiError::new(StatusCode::CONFLICT, "stale_attempt", message)
            }
            StoreError::LeaseExpired { .. } => {
                ApiError::new(StatusCode::CONFLICT, "lease_expired", message)
            }
            StoreError::NotClaimable { .. } => {
                ApiError::new(StatusCode::CONFLICT, "not_claimable", message)
            }
            StoreError::Conflict(_) => ApiError::conflict(message),
            StoreError::Forbidden(_) => ApiError::forbidden(message),
            StoreError::Invalid(e) => e.into(),
            StoreError::Retry(_) => ApiError::unavailable(message),
            StoreError::Limit(_) => ApiError::too_large(message),
            StoreError::Internal(why) => {
                tracing::error!(why, "internal error");
                ApiError::internal()
            }
            StoreError::Db(db) => match db {
                sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) => {
                    tracing::warn!(error = %db, "database unavailable");
                    ApiError::unavailable("database unavailable")
                }
                // A deadlock or serialization failure rolled the statement
                // back: nothing was written, the same call may succeed.
                sqlx::Error::Database(ref e)
                    if matches!(e.code().as_deref(), Some("40P01" | "40001")) =>
                {
                    tracing::warn!(error = %db, "transaction aborted by the database; retryable");
                    ApiError::unavailable(
                        "the database aborted this call's transaction (deadlock or \
                         serialization failure); nothing was written, retry",
                    )
                }
                other => {
                    tracing::error!(error = %other, "database error");
                    ApiError::internal()
                }
            },
        }
    }
}

impl ApiError {
    /// The error as one entry of a batch answers it.
    pub fn detail(&self) -> ErrorDetail {
        ErrorDetail {
            code: self.code.to_owned(),
            message: self.message.clone(),
            retryable: self.retryable,
        }
    }
}

/// The stable code of an error answer, in the response's extensions.
#[derive(Debug, Clone, Copy)]
pub struct ErrorCode(pub &'static str);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(code = self.code, message = %self.message, "request failed");
        } else {
            tracing::debug!(code = self.code, message = %self.message, "request refused");
        }
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_owned(),
                message: self.message,
                retryable: self.retryable,
            },
        };
        let mut resp = (self.status, axum::Json(body)).into_response();
        // For the request metrics (`http::track`): which refusal this was.
        resp.extensions_mut().insert(ErrorCode(self.code));
        if let Some(secs) = self.retry_after_secs {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::path::Path;

    /// `(status, code)` pairs as the source constructs them: every
    /// `StatusCode::X, "code"` here and every `rate_limited("code", …)`.
    fn codes_in_source() -> BTreeSet<(u16, String)> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut found = BTreeSet::new();
        let own = std::fs::read_to_string(dir.join("http").join("error.rs")).unwrap();
        let own = own.split("#[cfg(test)]").next().unwrap();
        for (i, _) in own.match_indices("StatusCode::") {
            let rest = &own[i + "StatusCode::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_uppercase() || *c == '_')
                .collect();
            let after = rest[name.len()..].trim_start();
            let Some(after) = after.strip_prefix(',') else {
                continue;
            };
            let Some(lit) = after.trim_start().strip_prefix('"') else {
                continue;
            };
            let code: String = lit.chars().take_while(|c| *c != '"').collect();
            let status = match name.as_str() {
                "BAD_REQUEST" | "METHOD_NOT_ALLOWED" => 400,
                "UNAUTHORIZED" => 401,
                "FORBIDDEN" => 403,
                "NOT_FOUND" => 404,
                "CONFLICT" => 409,
                "PAYLOAD_TOO_LARGE" => 413,
                "TOO_MANY_REQUESTS" => 429,
                "INTERNAL_SERVER_ERROR" => 500,
                "SERVICE_UNAVAILABLE" => 503,
                other => panic!("a status errors.md does not list: {other}"),
            };
            if code.chars().all(|c| c.is_ascii_lowercase() || c == '_') && !code.is_empty() {
                found.insert((status, code));
            }
        }
        let mut stack = vec![dir];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(d).unwrap().flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else if p.extension().is_some_and(|x| x == "rs") {
                    let text = std::fs::read_to_string(&p).unwrap();
                    let text = text.split("#[cfg(test)]").next().unwrap();
                    for (i, _) in text.match_indices("rate_limited(") {
                        let lit = text[i + "rate_limited(".len()..].trim_start();
                        if let Some(lit) = lit.strip_prefix('"') {
                            let code: String = lit.chars().take_while(|c| *c != '"').collect();
                            found.insert((429, code));
                        }
                    }
                }
            }
        }
        found
    }

    #[test]
    fn every_error_code_the_api_answers_is_in_errors_md_and_the_openapi_enum_and_no_other() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let source = codes_in_source();
        assert!(source.len() >= 14, "{source:?}");

        let md = std::fs::read_to_string(root.join("docs/errors.md")).unwrap();
        let documented: BTreeSet<(u16, String)> = md
            .lines()
            .filter_map(|l| {
                let cells: Vec<&str> = l.split('|').map(str::trim).collect();
                let status: u16 = cells.get(1)?.parse().ok()?;
                let code = cells.get(2)?.strip_prefix('`')?.strip_suffix('`')?;
                Some((status, code.to_owned()))
            })
            .collect();
        assert_eq!(documented, source, "docs/errors.md and the source disagree");

        let api = std::fs::read_to_string(root.join("docs/openapi.yaml")).unwrap();
        let at = api.find("    Error:\n").expect("the Error schema");
        let en = &api[at..];
        let list = &en[en.find("enum: [").unwrap() + "enum: [".len()..];
        let list = &list[..list.find(']').unwrap()];
        let enum_codes: BTreeSet<String> = list
            .split(',')
            .map(|c| c.trim().to_owned())
            .filter(|c| !c.is_empty())
            .collect();
        let source_codes: BTreeSet<String> = source.into_iter().map(|(_, c)| c).collect();
        assert_eq!(
            enum_codes, source_codes,
            "openapi Error.code and the source disagree"
        );
    }
}

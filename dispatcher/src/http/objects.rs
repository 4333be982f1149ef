//! The local profile's presigned URLs, served: `/objects/{key}` answers
//! a GET or PUT whose signature [`LocalDirStore::verify`] accepts.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{Method, StatusCode};
use axum::routing::get;
use axum::Router;

use super::error::ApiError;
use crate::objects::{LocalDirStore, ObjectError, ObjectStore};

#[derive(serde::Deserialize)]
struct Signed {
    method: String,
    expires: i64,
    sig: String,
}

/// Serves presigned URLs of `store` at `/objects/{key}` (GET and PUT). A
/// URL works for its one key and method until it expires; anything else is
/// `403 forbidden`.
pub fn router(store: Arc<LocalDirStore>) -> Router {
    router_with_limit(store, 256 * 1024 * 1024)
}

/// [`router`] with a bound on the size of a `PUT` (`413` past it).
pub fn router_with_limit(store: Arc<LocalDirStore>, max_bytes: usize) -> Router {
    Router::new()
        .route("/objects/{*key}", get(serve).put(serve))
        .layer(axum::extract::DefaultBodyLimit::max(max_bytes))
        .with_state(store)
}

async fn serve(
    State(store): State<Arc<LocalDirStore>>,
    method: Method,
    UrlPath(key): UrlPath<String>,
    Query(q): Query<Signed>,
    body: Bytes,
) -> Result<(StatusCode, Vec<u8>), ApiError> {
    if q.method != method.as_str() || !store.verify(&q.method, &key, q.expires, &q.sig) {
        return Err(ApiError::forbidden(
            "the URL is not signed for this key and method, or has expired",
        ));
    }
    let outcome = if method == Method::PUT {
        store
            .put(&key, body.to_vec())
            .await
            .map(|()| (StatusCode::OK, Vec::new()))
    } else {
        store.get(&key).await.map(|b| (StatusCode::OK, b))
    };
    outcome.map_err(|e| match e {
        ObjectError::NotFound(k) => ApiError::not_found(format!("no object {k:?}")),
        ObjectError::InvalidKey(k, why) => ApiError::invalid("key", format!("{k:?} {why}")),
        ObjectError::Open(open) => ApiError::circuit_open(&open),
        other => {
            tracing::warn!(error = %other, "object store failed");
            ApiError::unavailable("object store unavailable")
        }
    })
}

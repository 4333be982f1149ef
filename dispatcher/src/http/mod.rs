//! The HTTP API: routes, shared state, and serving with graceful shutdown.

mod datasets;
mod extract;
mod jobs;
pub mod limits;
mod orgs;
mod queues;
mod worker;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{Method, Uri};
use axum::routing::{get, post};
use axum::{Json, Router};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::error::ApiError;
use crate::objects::{LocalDirStore, ObjectStore};
use crate::queue::Queue;
use crate::settings::Settings;
use crate::store::Store;
use crate::tokens::Keyring;

/// Everything a handler may use. Cheap to clone; no globals.
#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub keys: Arc<Keyring>,
    pub settings: Arc<Settings>,
    /// The queue served at `/internal/queues/*` (the local profile's).
    pub queue: Arc<dyn Queue>,
    /// Request rates, concurrency and timeouts.
    pub limits: Arc<limits::Limits>,
    /// Where datasets and batches live (presigned URLs, staging checks).
    pub objects: Arc<dyn ObjectStore>,
    /// The local profile's store, whose presigned URLs this API serves.
    pub local_objects: Option<Arc<LocalDirStore>>,
    /// The data database, where `POST /v1/query` reads stream datasets.
    pub data: Option<sqlx::PgPool>,
    /// The identity provider whose user tokens are accepted (ADR 0012).
    pub idp: Option<Arc<crate::idp::Idp>>,
}

impl AppState {
    pub fn new(
        store: Store,
        keys: Arc<Keyring>,
        settings: Arc<Settings>,
        queue: Arc<dyn Queue>,
        objects: Arc<dyn ObjectStore>,
        local_objects: Option<Arc<LocalDirStore>>,
    ) -> Self {
        let limits = Arc::new(limits::Limits::new(&settings));
        AppState {
            store,
            keys,
            settings,
            queue,
            limits,
            objects,
            local_objects,
            data: None,
            idp: None,
        }
    }

    /// Accept user tokens of this identity provider too.
    pub fn with_idp(mut self, idp: Option<Arc<crate::idp::Idp>>) -> Self {
        self.idp = idp;
        self
    }

    /// The data database stream queries read.
    pub fn with_data(mut self, data: Option<sqlx::PgPool>) -> Self {
        self.data = data;
        self
    }
}

pub fn router(state: AppState) -> Router {
    let limit = state.settings.max_body_bytes;
    let local_objects = state
        .local_objects
        .clone()
        .map(|s| crate::objects::local::router_with_limit(s, state.settings.max_object_bytes));
    let api = Router::new()
        .route("/.well-known/jwks.json", get(jwks))
        .route("/internal/task-claim", post(worker::claim))
        .route("/v1/task/heartbeat", post(worker::heartbeat))
        .route("/v1/task/events", post(worker::events))
        .route("/v1/task/buffer-publish", post(worker::buffer_publish))
        .route("/v1/task/complete", post(worker::complete))
        .route("/v1/task/objects", post(worker::objects))
        .route("/v1/task/dataset-stage", post(worker::dataset_stage))
        .route("/internal/queues/{queue}/receive", post(queues::receive))
        .route(
            "/internal/queues/{queue}/visibility",
            post(queues::change_visibility),
        )
        .route("/internal/queues/{queue}/delete", post(queues::delete))
        .route("/v1/datasets", post(datasets::create).get(datasets::list))
        .route("/v1/query", post(datasets::query))
        .route("/v1/orgs", post(orgs::create))
        .route("/v1/org/members", get(orgs::members).put(orgs::put_member))
        .route(
            "/v1/org/members/{user_id}",
            axum::routing::delete(orgs::remove_member),
        )
        .route("/v1/datasets/{name}", get(datasets::get))
        .route(
            "/v1/datasets/{name}/versions/{version}",
            get(datasets::manifest),
        )
        .route(
            "/v1/datasets/{name}/batches/{batch_id}",
            get(datasets::batch),
        )
        .route("/v1/jobs", post(jobs::submit))
        .route("/v1/jobs/{job_id}", get(jobs::get))
        .route("/v1/jobs/{job_id}/cancel", post(jobs::cancel))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            limits::bound,
        ))
        // Health answers even when every request slot is taken.
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state);
    // Presigned URLs carry their own authority (a signature), not a token.
    match local_objects {
        Some(objects) => api.merge(objects),
        None => api,
    }
}

async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

async fn readyz(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    state
        .store
        .ping()
        .await
        .map_err(|_| ApiError::unavailable("database unreachable"))?;
    Ok(Json(serde_json::json!({"status": "ready"})))
}

async fn jwks(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(state.keys.jwks())
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::not_found(format!("no route for {method} {}", uri.path()))
}

async fn method_not_allowed() -> ApiError {
    ApiError::method_not_allowed()
}

/// Serves until `shutdown` is cancelled, then stops accepting and lets
/// in-flight requests finish.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let limits = state.limits.clone();
    let pruning = shutdown.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(60));
        loop {
            tokio::select! {
                _ = pruning.cancelled() => break,
                _ = tick.tick() => limits.prune(),
            }
        }
    });
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

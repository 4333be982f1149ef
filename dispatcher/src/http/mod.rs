//! The HTTP API: routes, shared state, and serving with graceful shutdown.

mod alerts;
mod bundles;
mod datasets;
pub mod error;
mod extract;
mod jobs;
pub mod limits;
pub mod objects;
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

use self::error::ApiError;
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
    /// STS, for `POST /v1/task/credentials` (aws profile with a role).
    pub sts: Option<Arc<crate::objects::sts::StsIssuer>>,
    /// Wakes long-polled claims when tasks may have become ready.
    pub ready: crate::store::ready::ReadySignal,
    /// Where a shutdown stands: not ready, then closing.
    pub drain: Drain,
}

/// A shutdown in two steps (docs/standards/operations.md): first
/// `not_ready` (`/readyz` answers `503 draining`, everything else is still
/// served), then `closing` (the listener closes and waiting long-polls
/// answer with what they have).
#[derive(Clone, Default)]
pub struct Drain {
    pub not_ready: CancellationToken,
    pub closing: CancellationToken,
}

impl AppState {
    /// What the worker-contract services borrow from this state.
    pub fn ctx(&self) -> crate::services::Ctx<'_> {
        crate::services::Ctx {
            store: &self.store,
            keys: &self.keys,
            objects: self.objects.as_ref(),
            settings: &self.settings,
        }
    }

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
            sts: None,
            ready: Default::default(),
            drain: Drain::default(),
        }
    }

    /// Long-polled claims wait on this signal.
    pub fn with_ready(mut self, ready: crate::store::ready::ReadySignal) -> Self {
        self.ready = ready;
        self
    }

    /// Mint scoped STS credentials for tasks.
    pub fn with_sts(mut self, sts: Option<Arc<crate::objects::sts::StsIssuer>>) -> Self {
        self.sts = sts;
        self
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

/// Who may call a route. `ROUTES` is the router's one list of routes:
/// `router` registers exactly these, and the cross-org test
/// (`tests/tests/it/access.rs`) walks every user route of it, so no
/// endpoint can be added without its access being tested.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// No token (the JWKS).
    Public,
    /// A worker credential.
    Worker,
    /// A capability token of a live attempt.
    Task,
    /// A member of the org with at least this role, or (`task_too`) a task
    /// within its scope.
    User {
        min_role: crate::domain::Role,
        task_too: bool,
    },
    /// Any signed-in user, whatever its memberships (creating an org).
    SignedIn,
}

/// One route: method, path template, and who may call it.
#[derive(Debug, Clone, Copy)]
pub struct RouteSpec {
    pub method: &'static str,
    pub path: &'static str,
    pub access: Access,
}

const fn route(method: &'static str, path: &'static str, access: Access) -> RouteSpec {
    RouteSpec {
        method,
        path,
        access,
    }
}

const VIEWER: Access = Access::User {
    min_role: crate::domain::Role::Viewer,
    task_too: false,
};
const WRITER: Access = Access::User {
    min_role: crate::domain::Role::Member,
    task_too: false,
};
const ADMIN: Access = Access::User {
    min_role: crate::domain::Role::Admin,
    task_too: false,
};

/// Every route of the API (health checks and the local store's presigned
/// URLs aside: they take no token).
pub const ROUTES: &[RouteSpec] = &[
    route("GET", "/.well-known/jwks.json", Access::Public),
    route("POST", "/internal/task-claim", Access::Worker),
    route("POST", "/internal/task-claim-batch", Access::Worker),
    route("POST", "/internal/task-release", Access::Worker),
    route("POST", "/internal/worker-presence", Access::Worker),
    route("POST", "/v1/task/heartbeat-batch", Access::Worker),
    route("POST", "/v1/task/complete-batch", Access::Worker),
    route("POST", "/internal/queues/{queue}/receive", Access::Worker),
    route(
        "POST",
        "/internal/queues/{queue}/visibility",
        Access::Worker,
    ),
    route("POST", "/internal/queues/{queue}/delete", Access::Worker),
    route("POST", "/v1/task/heartbeat", Access::Task),
    route("POST", "/v1/task/events", Access::Task),
    route("POST", "/v1/task/buffer-publish", Access::Task),
    route("POST", "/v1/task/complete", Access::Task),
    route("POST", "/v1/task/objects", Access::Task),
    route("POST", "/internal/task-logs", Access::Worker),
    route("POST", "/v1/task/dataset-stage", Access::Task),
    route("POST", "/v1/task/credentials", Access::Task),
    route("POST", "/v1/jobs", WRITER),
    route("GET", "/v1/jobs", VIEWER),
    route("GET", "/v1/jobs/{job_id}", VIEWER),
    route("GET", "/v1/jobs/{job_id}/tasks/{key}", VIEWER),
    route("GET", "/v1/jobs/{job_id}/tasks/{key}/events", VIEWER),
    route(
        "GET",
        "/v1/jobs/{job_id}/tasks/{key}/attempts/{attempt}/logs",
        VIEWER,
    ),
    route("POST", "/v1/jobs/{job_id}/cancel", WRITER),
    route("POST", "/v1/jobs/{job_id}/retry", WRITER),
    route("POST", "/v1/jobs/{job_id}/tasks/{key}/retry", WRITER),
    route("POST", "/v1/job-actions", WRITER),
    route("GET", "/v1/job-actions", VIEWER),
    route("GET", "/v1/pauses", VIEWER),
    route("PUT", "/v1/pauses/{runtime}", WRITER),
    route("DELETE", "/v1/pauses/{runtime}", WRITER),
    route("POST", "/v1/datasets", WRITER),
    route("GET", "/v1/datasets", VIEWER),
    route("GET", "/v1/datasets/{name}", VIEWER),
    route("GET", "/v1/datasets/{name}/versions/{version}", VIEWER),
    route("GET", "/v1/datasets/{name}/batches/{batch_id}", VIEWER),
    route(
        "POST",
        "/v1/query",
        Access::User {
            min_role: crate::domain::Role::Viewer,
            task_too: true,
        },
    ),
    route("POST", "/v1/bundles", WRITER),
    route("GET", "/v1/bundles/{bundle}", VIEWER),
    route("PUT", "/v1/bundles/tags/{tag}", WRITER),
    route("POST", "/v1/alerts/destinations", ADMIN),
    route("GET", "/v1/alerts/destinations", VIEWER),
    route("POST", "/v1/alerts/routes", ADMIN),
    route("GET", "/v1/alerts/routes", VIEWER),
    route("DELETE", "/v1/alerts/routes/{route_id}", ADMIN),
    route("GET", "/v1/alerts/events/{event_id}", VIEWER),
    route("POST", "/v1/orgs", Access::SignedIn),
    route("GET", "/v1/org/members", VIEWER),
    route("PUT", "/v1/org/members", ADMIN),
    route("DELETE", "/v1/org/members/{user_id}", ADMIN),
];

/// The handler of one route of `ROUTES`.
fn handler(spec: &RouteSpec, settings: &Settings) -> axum::routing::MethodRouter<AppState> {
    use axum::routing::{delete, put};
    if let Some(h) = worker_handler(spec, settings) {
        return h;
    }
    match (spec.method, spec.path) {
        ("GET", "/.well-known/jwks.json") => get(jwks),
        ("POST", "/v1/jobs") => post(jobs::submit),
        ("GET", "/v1/jobs") => get(jobs::list),
        ("GET", "/v1/jobs/{job_id}") => get(jobs::get),
        ("GET", "/v1/jobs/{job_id}/tasks/{key}") => get(jobs::task),
        ("GET", "/v1/jobs/{job_id}/tasks/{key}/events") => get(jobs::events),
        ("GET", "/v1/jobs/{job_id}/tasks/{key}/attempts/{attempt}/logs") => get(jobs::logs),
        ("POST", "/v1/jobs/{job_id}/cancel") => post(jobs::cancel),
        ("POST", "/v1/jobs/{job_id}/retry") => post(jobs::retry),
        ("POST", "/v1/jobs/{job_id}/tasks/{key}/retry") => post(jobs::retry_task),
        ("POST", "/v1/job-actions") => post(jobs::bulk),
        ("GET", "/v1/job-actions") => get(jobs::actions),
        ("GET", "/v1/pauses") => get(jobs::pauses),
        ("PUT", "/v1/pauses/{runtime}") => put(jobs::pause),
        ("DELETE", "/v1/pauses/{runtime}") => delete(jobs::resume),
        ("POST", "/v1/datasets") => post(datasets::create),
        ("GET", "/v1/datasets") => get(datasets::list),
        ("GET", "/v1/datasets/{name}") => get(datasets::get),
        ("GET", "/v1/datasets/{name}/versions/{version}") => get(datasets::manifest),
        ("GET", "/v1/datasets/{name}/batches/{batch_id}") => get(datasets::batch),
        ("POST", "/v1/query") => post(datasets::query),
        ("POST", "/v1/bundles") => {
            post(bundles::push).layer(DefaultBodyLimit::max(settings.bundle_max_bytes))
        }
        ("GET", "/v1/bundles/{bundle}") => get(bundles::get),
        ("PUT", "/v1/bundles/tags/{tag}") => put(bundles::tag),
        ("POST", "/v1/alerts/destinations") => post(alerts::create_destination),
        ("GET", "/v1/alerts/destinations") => get(alerts::destinations),
        ("POST", "/v1/alerts/routes") => post(alerts::create_route),
        ("GET", "/v1/alerts/routes") => get(alerts::routes),
        ("DELETE", "/v1/alerts/routes/{route_id}") => delete(alerts::delete_route),
        ("GET", "/v1/alerts/events/{event_id}") => get(alerts::event),
        ("POST", "/v1/orgs") => post(orgs::create),
        ("GET", "/v1/org/members") => get(orgs::members),
        ("PUT", "/v1/org/members") => put(orgs::put_member),
        ("DELETE", "/v1/org/members/{user_id}") => delete(orgs::remove_member),
        (method, path) => panic!("ROUTES names {method} {path}, which has no handler"),
    }
}

/// The handler of a worker or task route of `ROUTES` (`None`: another's).
fn worker_handler(
    spec: &RouteSpec,
    settings: &Settings,
) -> Option<axum::routing::MethodRouter<AppState>> {
    Some(match (spec.method, spec.path) {
        ("POST", "/internal/task-claim") => post(worker::claim),
        ("POST", "/internal/task-claim-batch") => post(worker::claim_batch),
        ("POST", "/v1/task/heartbeat-batch") => post(worker::heartbeat_batch),
        ("POST", "/v1/task/complete-batch") => post(worker::complete_batch),
        ("POST", "/internal/queues/{queue}/receive") => post(queues::receive),
        ("POST", "/internal/queues/{queue}/visibility") => post(queues::change_visibility),
        ("POST", "/internal/queues/{queue}/delete") => post(queues::delete),
        ("POST", "/v1/task/heartbeat") => post(worker::heartbeat),
        ("POST", "/v1/task/events") => post(worker::events),
        ("POST", "/v1/task/buffer-publish") => post(worker::buffer_publish),
        ("POST", "/v1/task/complete") => post(worker::complete),
        ("POST", "/v1/task/objects") => post(worker::objects),
        ("POST", "/internal/task-release") => post(worker::release),
        ("POST", "/internal/worker-presence") => post(worker::presence),
        // A log's text may be escaped up to six times its size in JSON.
        ("POST", "/internal/task-logs") => post(worker::logs).layer(DefaultBodyLimit::max(
            settings.max_log_bytes.saturating_mul(6) + 64 * 1024,
        )),
        ("POST", "/v1/task/dataset-stage") => post(worker::dataset_stage),
        ("POST", "/v1/task/credentials") => post(worker::credentials),
        _ => return None,
    })
}

pub fn router(state: AppState) -> Router {
    let limit = state.settings.max_body_bytes;
    let local_objects = state
        .local_objects
        .clone()
        .map(|s| objects::router_with_limit(s, state.settings.max_object_bytes));
    // One method router per path, merged from the table's entries.
    let mut paths: Vec<(&str, axum::routing::MethodRouter<AppState>)> = Vec::new();
    for spec in ROUTES {
        match paths.iter_mut().find(|(p, _)| *p == spec.path) {
            Some((_, mr)) => *mr = std::mem::take(mr).merge(handler(spec, &state.settings)),
            None => paths.push((spec.path, handler(spec, &state.settings))),
        }
    }
    let mut api = Router::new();
    for (path, mr) in paths {
        api = api.route(path, mr);
    }
    let api = api
        .route_layer(axum::middleware::from_fn(track))
        .route_layer(axum::middleware::from_fn(trace))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            limits::bound,
        ))
        // Health answers even when every request slot is taken.
        .route("/healthz", get(healthz))
        .route("/livez", get(healthz))
        .route("/readyz", get(readyz))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state);
    // Presigned URLs carry their own authority (a signature), not a token.
    match local_objects {
        Some(objects) => api.merge(objects),
        None => api,
    }
}

/// Runs each routed request in a server span named by its method and route
/// template, continuing the caller's `traceparent`; its trace id is on
/// every log line written while it is served (ADR 0023).
async fn trace(
    path: axum::extract::MatchedPath,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use tracing::Instrument as _;
    let span = tracing::info_span!(
        "request",
        otel.name = format!("{} {}", req.method(), path.as_str()),
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        http.request.method = %req.method(),
        http.route = path.as_str(),
        http.response.status_code = tracing::field::Empty,
        org_id = tracing::field::Empty,
        trace_id = tracing::field::Empty,
    );
    let incoming = req
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok());
    dispatcher_telemetry::continue_from(&span, incoming);
    let resp = next.run(req).instrument(span.clone()).await;
    span.record("http.response.status_code", resp.status().as_u16());
    if resp.status().is_server_error() {
        span.record("otel.status_code", "ERROR");
    }
    resp
}

/// Records each routed request's duration by route template, method and
/// status, and counts fence refusals by route (`crate::metrics`).
async fn track(
    path: axum::extract::MatchedPath,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    if !crate::metrics::enabled() {
        return next.run(req).await;
    }
    let started = std::time::Instant::now();
    let method = req.method().as_str().to_owned();
    let resp = next.run(req).await;
    let route = path.as_str().to_owned();
    if matches!(
        resp.extensions().get::<error::ErrorCode>(),
        Some(error::ErrorCode("stale_attempt" | "lease_expired"))
    ) {
        metrics::counter!(crate::metrics::FENCE_REJECTIONS, "route" => route.clone()).increment(1);
    }
    metrics::histogram!(
        crate::metrics::HTTP_DURATION,
        "route" => route,
        "method" => method,
        "status" => resp.status().as_str().to_owned()
    )
    .record(started.elapsed().as_secs_f64());
    resp
}

async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

async fn readyz(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    if state.drain.not_ready.is_cancelled() {
        return Err(ApiError::unavailable(
            "draining: this replica is shutting down",
        ));
    }
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

/// Serves until `shutdown` is cancelled, then drains: `/readyz` answers
/// `503 draining` for `drain_not_ready` while requests are still served,
/// then the listener closes, long-polls answer at once, and requests in
/// flight get `drain_timeout` to finish before they are cut.
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
    let drain = state.drain.clone();
    let (not_ready, bound) = (state.settings.drain_not_ready, state.settings.drain_timeout);
    let closing = drain.closing.clone();
    tokio::spawn(async move {
        shutdown.cancelled().await;
        drain.not_ready.cancel();
        if !not_ready.is_zero() {
            tracing::info!(
                seconds = not_ready.as_secs_f64(),
                "draining: /readyz answers 503 before the listener closes"
            );
            tokio::time::sleep(not_ready).await;
        }
        drain.closing.cancel();
    });
    let server = std::future::IntoFuture::into_future(
        axum::serve(listener, router(state))
            .with_graceful_shutdown(closing.clone().cancelled_owned()),
    );
    tokio::select! {
        served = server => served,
        _ = async { closing.cancelled().await; tokio::time::sleep(bound).await } => {
            tracing::warn!(
                seconds = bound.as_secs_f64(),
                "requests still in flight after the drain bound; cutting them"
            );
            Ok(())
        }
    }
}

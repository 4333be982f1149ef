//! The worker contract: claim with a worker credential, then heartbeat,
//! events, buffer publishes and completion with the capability token.
//! Handlers validate, call the store, and shape answers; no SQL here.

use axum::extract::State;
use axum::Json;
use chrono::{DateTime, Utc};
use dispatcher_wire as wire;

use super::extract::{ApiJson, TaskAuth, WorkerAuth};
use super::AppState;
use crate::domain;
use crate::error::ApiError;
use crate::settings::Settings;
use crate::store::{Fence, PublishOutcome};
use crate::tokens::{TaskClaims, TaskScope};

fn fence(claims: &TaskClaims) -> Fence {
    Fence {
        task_id: claims.sub,
        job_id: claims.job,
        attempt: claims.att,
    }
}

/// Token lifetime: the lease plus a grace period (see `Settings`).
fn token_expiry(state: &AppState, lease_expires_at: DateTime<Utc>) -> DateTime<Utc> {
    let grace = chrono::Duration::from_std(state.settings.token_grace).unwrap_or_default();
    lease_expires_at + grace
}

pub async fn claim(
    State(state): State<AppState>,
    WorkerAuth(worker): WorkerAuth,
    ApiJson(req): ApiJson<wire::ClaimRequest>,
) -> Result<Json<wire::ClaimResponse>, ApiError> {
    let worker_id = domain::worker_id(&req.worker_id)?;
    let lease = state.settings.clamp_lease(req.lease_seconds);
    let claimed = state.store.claim(req.task_id, &worker_id, lease).await?;
    let scope = TaskScope {
        task_id: claimed.task_id,
        job_id: claimed.job_id,
        org_id: claimed.org_id,
        attempt: claimed.attempt,
        datasets: claimed.spec.outputs.clone(),
        reads: claimed.spec.reads.clone(),
    };
    let token_expires_at = token_expiry(&state, claimed.lease_expires_at);
    let capability_token = state.keys.mint_task(&scope, token_expires_at);
    tracing::info!(
        task_id = %claimed.task_id,
        attempt = claimed.attempt,
        worker_id,
        credential = worker.sub,
        "task claimed"
    );
    Ok(Json(wire::ClaimResponse {
        task_id: claimed.task_id,
        job_id: claimed.job_id,
        attempt: claimed.attempt,
        lease_expires_at: claimed.lease_expires_at,
        heartbeat_interval_seconds: u32::try_from(
            Settings::heartbeat_interval(claimed.lease).as_secs(),
        )
        .unwrap_or(u32::MAX),
        capability_token,
        token_expires_at,
        task: claimed.spec,
        object_prefix: scope.attempt_prefix(),
    }))
}

pub async fn heartbeat(
    State(state): State<AppState>,
    TaskAuth(claims): TaskAuth,
    ApiJson(req): ApiJson<wire::HeartbeatRequest>,
) -> Result<Json<wire::HeartbeatResponse>, ApiError> {
    if let Some(progress) = &req.progress {
        domain::storable_json("progress", progress)?;
    }
    let renewal = state
        .store
        .heartbeat(fence(&claims), req.progress.as_ref())
        .await?;
    let token_expires_at = token_expiry(&state, renewal.lease_expires_at);
    let scope = TaskScope {
        task_id: claims.sub,
        job_id: claims.job,
        org_id: claims.org,
        attempt: claims.att,
        datasets: claims.datasets,
        reads: claims.reads,
    };
    Ok(Json(wire::HeartbeatResponse {
        lease_expires_at: renewal.lease_expires_at,
        capability_token: state.keys.mint_task(&scope, token_expires_at),
        token_expires_at,
        cancel_requested: renewal.cancel_requested,
    }))
}

pub async fn events(
    State(state): State<AppState>,
    TaskAuth(claims): TaskAuth,
    ApiJson(req): ApiJson<wire::EventsRequest>,
) -> Result<Json<wire::EventsResponse>, ApiError> {
    let events = domain::events(req, &state.settings)?;
    let outcome = state.store.record_events(fence(&claims), &events).await?;
    Ok(Json(wire::EventsResponse {
        accepted: outcome.accepted,
        duplicates: outcome.duplicates,
    }))
}

pub async fn buffer_publish(
    State(state): State<AppState>,
    TaskAuth(claims): TaskAuth,
    ApiJson(req): ApiJson<wire::BufferPublishRequest>,
) -> Result<Json<wire::BufferPublishResponse>, ApiError> {
    let batch = domain::buffer_batch(req)?;
    if !claims.datasets.contains(&batch.dataset) {
        return Err(ApiError::forbidden(format!(
            "dataset {:?} is not among the task's outputs",
            batch.dataset
        )));
    }
    if !claims
        .prefixes
        .iter()
        .any(|p| batch.object_key.starts_with(p.as_str()))
    {
        return Err(ApiError::forbidden(format!(
            "object_key must lie under the attempt's prefix {:?}",
            claims.prefixes.first().map(String::as_str).unwrap_or("")
        )));
    }
    let outcome = state.store.publish_buffer(fence(&claims), &batch).await?;
    if outcome == PublishOutcome::Accepted {
        tracing::info!(task_id = %claims.sub, attempt = claims.att, batch_id = %batch.batch_id, "buffer batch published");
    }
    Ok(Json(wire::BufferPublishResponse {
        batch_id: batch.batch_id,
        status: "accepted".to_owned(),
    }))
}

pub async fn complete(
    State(state): State<AppState>,
    TaskAuth(claims): TaskAuth,
    ApiJson(req): ApiJson<wire::CompleteRequest>,
) -> Result<Json<wire::CompleteResponse>, ApiError> {
    let completion = domain::completion(req)?;
    let answer = state.store.complete(fence(&claims), &completion).await?;
    tracing::info!(task_id = %claims.sub, attempt = claims.att, state = answer.state.as_str(), "task completed");
    Ok(Json(answer))
}

/// Presigned URLs (contract: "Objects a task may touch"): `PUT` under the
/// attempt's own prefix only; `GET` of parts of committed versions of the
/// datasets the task may read, or under its own prefix. One key out of
/// scope refuses the whole call (`403`) and mints nothing. Fenced like every
/// task call.
pub async fn objects(
    State(state): State<AppState>,
    TaskAuth(claims): TaskAuth,
    ApiJson(req): ApiJson<wire::ObjectsRequest>,
) -> Result<Json<wire::ObjectsResponse>, ApiError> {
    let max = state.settings.max_object_keys_per_call;
    if req.keys.is_empty() || req.keys.len() > max {
        return Err(ApiError::invalid("keys", format!("give 1 to {max} keys")));
    }
    let prefix = claims
        .prefixes
        .first()
        .cloned()
        .ok_or_else(|| ApiError::forbidden("the token names no object prefix"))?;
    let mut keys = Vec::with_capacity(req.keys.len());
    for (i, key) in req.keys.iter().enumerate() {
        let absolute = match req.method {
            wire::ObjectMethod::Put => {
                crate::objects::check_key(key).map_err(|e| object_key_error(i, e))?;
                format!("{prefix}{key}")
            }
            wire::ObjectMethod::Get => key.clone(),
        };
        crate::objects::check_key(&absolute).map_err(|e| object_key_error(i, e))?;
        keys.push(absolute);
    }
    state.store.check_fence(fence(&claims)).await?;
    if req.method == wire::ObjectMethod::Get {
        let others: Vec<String> = keys
            .iter()
            .filter(|k| !k.starts_with(&prefix))
            .cloned()
            .collect();
        let readable = state
            .store
            .readable_parts(claims.org, &claims.reads, &others)
            .await?;
        if let Some(k) = others.iter().find(|k| !readable.contains(*k)) {
            return Err(ApiError::forbidden(format!(
                "key {k:?} is neither under this attempt's prefix nor a part of a committed \
                 version of a dataset the task may read; no URL was minted"
            )));
        }
    }
    let now = chrono::Utc::now();
    let token_left = chrono::DateTime::from_timestamp(claims.exp, 0)
        .map(|exp| (exp - now).to_std().unwrap_or_default())
        .unwrap_or_default();
    let ttl = state.settings.object_url_ttl.min(token_left);
    let expires_at = now + chrono::Duration::from_std(ttl).unwrap_or_default();
    let mut urls = Vec::with_capacity(keys.len());
    for key in keys {
        let url = match req.method {
            wire::ObjectMethod::Put => state.objects.presign_put(&key, ttl).await,
            wire::ObjectMethod::Get => state.objects.presign_get(&key, ttl).await,
        }
        .map_err(|e| {
            tracing::warn!(error = %e, "presigning failed");
            ApiError::unavailable("the object store could not presign a URL")
        })?;
        urls.push(wire::ObjectUrl {
            key,
            url,
            expires_at,
        });
    }
    Ok(Json(wire::ObjectsResponse { urls }))
}

fn object_key_error(i: usize, e: crate::objects::ObjectError) -> ApiError {
    match e {
        crate::objects::ObjectError::InvalidKey(_, why) => {
            ApiError::invalid(&format!("keys[{i}]"), why)
        }
        other => ApiError::invalid(&format!("keys[{i}]"), other),
    }
}

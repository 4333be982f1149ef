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

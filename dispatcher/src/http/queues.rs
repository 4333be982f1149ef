//! The local profile's wake-up queue, served to workers (worker credential)
//! so they never hold database credentials. A worker credential reaches the
//! wake-up queue only: never the buffer or alert queues, nor any DLQ (those
//! are the dispatcher's and its operators').

use std::time::Duration;

use axum::extract::{Path, State};
use axum::Json;
use dispatcher_wire as wire;

use super::error::ApiError;
use super::extract::{ApiJson, WorkerAuth};
use super::AppState;
use crate::queue::{is_known_queue, QueueError, WAKEUPS};

const MAX_VISIBILITY_SECS: u32 = 43_200;

/// The queue a worker may use: the wake-up queue alone.
fn queue_name(raw: String) -> Result<String, ApiError> {
    if raw == WAKEUPS {
        Ok(raw)
    } else if is_known_queue(&raw) {
        Err(ApiError::forbidden(format!(
            "a worker credential reaches the {WAKEUPS:?} queue only, not {raw:?}"
        )))
    } else {
        Err(ApiError::not_found(format!("no queue {raw:?}")))
    }
}

fn visibility(secs: u32) -> Result<Duration, ApiError> {
    if secs > MAX_VISIBILITY_SECS {
        return Err(ApiError::invalid(
            "visibility_timeout_seconds",
            format!("must be at most {MAX_VISIBILITY_SECS}"),
        ));
    }
    Ok(Duration::from_secs(u64::from(secs)))
}

impl From<QueueError> for ApiError {
    fn from(e: QueueError) -> Self {
        match e {
            QueueError::BadReceipt => ApiError::invalid("receipt_handle", "is malformed"),
            QueueError::UnknownQueue(q) => ApiError::not_found(format!("no queue {q:?}")),
            QueueError::Unavailable(m) => {
                tracing::warn!(error = m, "queue unavailable");
                ApiError::unavailable("queue unavailable")
            }
            QueueError::Open(open) => ApiError::circuit_open(&open),
        }
    }
}

pub async fn receive(
    State(state): State<AppState>,
    _worker: WorkerAuth,
    Path(queue): Path<String>,
    ApiJson(req): ApiJson<wire::ReceiveRequest>,
) -> Result<Json<wire::ReceiveResponse>, ApiError> {
    let queue = queue_name(queue)?;
    let max = req.max_messages.unwrap_or(1);
    if !(1..=10).contains(&max) {
        return Err(ApiError::invalid("max_messages", "must be 1 to 10"));
    }
    let wait = super::limits::Limits::long_poll_wait(&state.settings, req.wait_seconds)?;
    let vis = visibility(req.visibility_timeout_seconds.unwrap_or(30))?;
    // A long-poll holds a slot while it waits; a receive that does not wait
    // needs none.
    let _slot = if wait.is_zero() {
        None
    } else {
        Some(state.limits.long_poll()?)
    };
    // When the API closes, a waiting receive answers empty at once (a
    // message it had just taken shows again after its visibility timeout,
    // as with SQS).
    let closing = &state.drain.closing;
    let wait = if closing.is_cancelled() {
        Duration::ZERO
    } else {
        wait
    };
    let messages = tokio::select! {
        got = state.queue.receive(&queue, max, wait, vis) => got?,
        _ = closing.cancelled(), if !wait.is_zero() => Vec::new(),
    };
    Ok(Json(wire::ReceiveResponse { messages }))
}

pub async fn change_visibility(
    State(state): State<AppState>,
    _worker: WorkerAuth,
    Path(queue): Path<String>,
    ApiJson(req): ApiJson<wire::VisibilityRequest>,
) -> Result<Json<wire::ReceiptResponse>, ApiError> {
    let queue = queue_name(queue)?;
    let vis = visibility(req.visibility_timeout_seconds)?;
    let ok = state
        .queue
        .change_visibility(&queue, &req.receipt_handle, vis)
        .await?;
    Ok(Json(wire::ReceiptResponse { ok }))
}

pub async fn delete(
    State(state): State<AppState>,
    _worker: WorkerAuth,
    Path(queue): Path<String>,
    ApiJson(req): ApiJson<wire::DeleteRequest>,
) -> Result<Json<wire::ReceiptResponse>, ApiError> {
    let queue = queue_name(queue)?;
    let ok = state.queue.delete(&queue, &req.receipt_handle).await?;
    Ok(Json(wire::ReceiptResponse { ok }))
}

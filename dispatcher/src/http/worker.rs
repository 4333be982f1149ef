//! The worker contract: claim with a worker credential, then heartbeat,
//! events, buffer publishes and completion with the capability token.
//! Handlers parse, authorise, call the store or a service (`services::leases`,
//! `services::staging`, `services::task_objects`) and shape answers.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use dispatcher_wire as wire;

use super::error::ApiError;
use super::extract::{ApiJson, TaskAuth, WorkerAuth};
use super::AppState;
use crate::domain::{self, MAX_BATCH};
use crate::services::{fence, leases, logs, staging, task_objects};
use crate::store::PublishOutcome;
use crate::tokens::TaskClaims;

pub async fn claim(
    State(state): State<AppState>,
    WorkerAuth(worker): WorkerAuth,
    ApiJson(req): ApiJson<wire::ClaimRequest>,
) -> Result<Json<wire::ClaimResponse>, ApiError> {
    let worker_id = domain::worker_id(&req.worker_id)?;
    let lease = state.settings.clamp_lease(req.lease_seconds);
    let claimed = state.store.claim(req.task_id, &worker_id, lease).await?;
    tracing::info!(
        task_id = %claimed.task_id,
        attempt = claimed.attempt,
        worker_id,
        credential = worker.sub,
        "task claimed"
    );
    Ok(Json(leases::claim_answer(state.ctx(), claimed).await?))
}

/// `POST /internal/task-claim-batch`: the given tasks, or up to
/// `max_tasks` ready ones, in one statement; each id answered on its own,
/// in order (a refused id with the single claim's error).
pub async fn claim_batch(
    State(state): State<AppState>,
    WorkerAuth(worker): WorkerAuth,
    ApiJson(req): ApiJson<wire::ClaimBatchRequest>,
) -> Result<Json<wire::ClaimBatchResponse>, ApiError> {
    let worker_id = domain::worker_id(&req.worker_id)?;
    let lease = state.settings.clamp_lease(req.lease_seconds);
    let wait = super::limits::Limits::long_poll_wait(&state.settings, req.wait_seconds)?;
    let ask = domain::claim_ask(&req, !wait.is_zero())?;
    // A long-poll holds a slot while it waits.
    let _slot = match wait.is_zero() {
        true => None,
        false => Some(state.limits.long_poll()?),
    };
    let answers = leases::claim_batch(
        state.ctx(),
        &state.ready,
        &state.drain.closing,
        &ask,
        &worker_id,
        lease,
        wait,
    )
    .await?;
    // An idle worker's long-polls come back empty every few seconds: no
    // line for those, unless asked for (RUST_LOG=dispatcher=debug).
    let claimed = answers.iter().filter(|(_, a)| a.is_ok()).count();
    if claimed > 0 {
        tracing::info!(
            claimed,
            worker_id,
            credential = worker.sub,
            "tasks claimed (batch)"
        );
    } else {
        tracing::debug!(worker_id, credential = worker.sub, "no ready task to claim");
    }
    let claims = answers
        .into_iter()
        .map(|(task_id, answer)| match answer {
            Ok(claim) => wire::ClaimBatchEntry {
                task_id,
                claim: Some(Box::new(claim)),
                error: None,
            },
            Err(e) => wire::ClaimBatchEntry {
                task_id,
                claim: None,
                error: Some(ApiError::from(e).detail()),
            },
        })
        .collect();
    Ok(Json(wire::ClaimBatchResponse { claims }))
}

/// `POST /v1/task/heartbeat-batch`: each entry's token verified and its
/// task admitted on its own, then every valid entry in one statement;
/// answers in order, each as the single heartbeat would.
pub async fn heartbeat_batch(
    State(state): State<AppState>,
    WorkerAuth(_worker): WorkerAuth,
    ApiJson(req): ApiJson<wire::TaskBatchRequest>,
) -> Result<Json<wire::TaskBatchResponse>, ApiError> {
    if req.entries.is_empty() || req.entries.len() > MAX_BATCH {
        return Err(ApiError::invalid(
            "entries",
            format!("must hold 1 to {MAX_BATCH} entries"),
        ));
    }
    // Each entry: its claims and request, or its error.
    let mut checked: Vec<Checked<wire::HeartbeatRequest>> = Vec::with_capacity(req.entries.len());
    for (i, e) in req.entries.into_iter().enumerate() {
        checked.push(check_entry(&state, i, e).and_then(|(claims, body)| {
            let req: wire::HeartbeatRequest =
                domain::entry_body(i, body).map_err(|e| (Some(claims.sub), e.into()))?;
            if let Some(progress) = &req.progress {
                domain::storable_json(&format!("entries[{i}].body.progress"), progress)
                    .map_err(|e| (Some(claims.sub), e.into()))?;
            }
            Ok((claims, req))
        }));
    }
    let valid: Vec<(crate::store::Fence, Option<&serde_json::Value>)> = checked
        .iter()
        .filter_map(|c| c.as_ref().ok())
        .map(|(claims, req)| (fence(claims), req.progress.as_ref()))
        .collect();
    let renewals = state.store.heartbeat_many(&valid).await?;
    let results = batch_results(&checked, renewals, |claims, renewal| {
        serde_json::to_value(leases::heartbeat_answer(state.ctx(), claims, renewal))
            .map_err(|_| ApiError::internal())
    })?;
    Ok(Json(wire::TaskBatchResponse { results }))
}

/// A batch entry after its checks: its claims and request, or the error it
/// is answered with (and its task, when the token could be read).
type Checked<T> = Result<(TaskClaims, T), (Option<uuid::Uuid>, ApiError)>;

/// A batch's results in the order given: an entry refused before the
/// store keeps its error; the others take, in order, the store's answers
/// (one per valid entry), each turned into its result by `answer`.
fn batch_results<T, A>(
    checked: &[Checked<T>],
    answers: Vec<Result<A, crate::error::StoreError>>,
    answer: impl Fn(&TaskClaims, A) -> Result<serde_json::Value, ApiError>,
) -> Result<Vec<wire::TaskBatchResult>, ApiError> {
    let mut answers = answers.into_iter();
    let mut results = Vec::with_capacity(checked.len());
    for c in checked {
        let (task_id, outcome) = match c {
            Err((task_id, e)) => (*task_id, Err(e.detail())),
            Ok((claims, _)) => match answers.next() {
                Some(Ok(a)) => (Some(claims.sub), Ok(answer(claims, a)?)),
                Some(Err(e)) => (Some(claims.sub), Err(ApiError::from(e).detail())),
                None => return Err(ApiError::internal()),
            },
        };
        results.push(match outcome {
            Ok(result) => wire::TaskBatchResult {
                task_id,
                result: Some(result),
                error: None,
            },
            Err(error) => wire::TaskBatchResult {
                task_id,
                result: None,
                error: Some(error),
            },
        });
    }
    Ok(results)
}

/// An entry's token, verified as a task token and admitted under its
/// task's and org's rates, and its body.
fn check_entry(state: &AppState, i: usize, e: wire::TaskBatchEntry) -> Checked<serde_json::Value> {
    let claims: TaskClaims = state
        .keys
        .verify(&e.capability_token, crate::tokens::TokenKind::Task)
        .map_err(|err| {
            let mut api = ApiError::from(err);
            api.message = format!("entries[{i}].capability_token: {}", api.message);
            (None, api)
        })?;
    state
        .limits
        .admit_task(claims.sub, claims.org)
        .map_err(|err| (Some(claims.sub), err))?;
    Ok((claims, e.body))
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
    Ok(Json(leases::heartbeat_answer(
        state.ctx(),
        &claims,
        renewal,
    )))
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
    // A new batch must lie under this attempt's prefix; the store answers
    // a replay of an earlier attempt's identical publish as a duplicate
    // and refuses anything else outside the prefix.
    let under_prefix = claims
        .prefixes
        .iter()
        .any(|p| batch.object_key.starts_with(p.as_str()));
    let outcome = state
        .store
        .publish_buffer(fence(&claims), &batch, under_prefix)
        .await
        .map_err(|e| match e {
            crate::error::StoreError::Forbidden(_) => ApiError::forbidden(format!(
                "object_key must lie under the attempt's prefix {:?}",
                claims.prefixes.first().map(String::as_str).unwrap_or("")
            )),
            other => other.into(),
        })?;
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
    let manifests = match completion {
        domain::Completion::Succeeded { .. } => {
            staging::write_manifests(state.ctx(), &claims).await?
        }
        _ => Vec::new(),
    };
    state.settings.failpoint("complete_after_manifest");
    let answer = state
        .store
        .complete(fence(&claims), &completion, &manifests)
        .await?;
    crate::metrics::completed(&completion, &answer);
    tracing::info!(task_id = %claims.sub, attempt = claims.att, state = answer.state.as_str(), "task completed");
    Ok(Json(answer))
}

/// `POST /v1/task/complete-batch`: each entry checked on its own (token,
/// rates, body, manifests written as the single call does), then every
/// valid entry in one transaction, each in a savepoint; answers in order,
/// each as the single completion would.
pub async fn complete_batch(
    State(state): State<AppState>,
    WorkerAuth(_worker): WorkerAuth,
    ApiJson(req): ApiJson<wire::TaskBatchRequest>,
) -> Result<Json<wire::TaskBatchResponse>, ApiError> {
    if req.entries.is_empty() || req.entries.len() > MAX_BATCH {
        return Err(ApiError::invalid(
            "entries",
            format!("must hold 1 to {MAX_BATCH} entries"),
        ));
    }
    let mut checked: Vec<Checked<Completing>> = Vec::with_capacity(req.entries.len());
    for (i, e) in req.entries.into_iter().enumerate() {
        checked.push(check_entry(&state, i, e).and_then(|(claims, body)| {
            let task = Some(claims.sub);
            let completion = domain::entry_body(i, body)
                .map_err(ApiError::from)
                .and_then(|req: wire::CompleteRequest| {
                    domain::completion(req).map_err(|mut e| {
                        e.field = format!("entries[{i}].body.{}", e.field);
                        ApiError::from(e)
                    })
                })
                .map_err(|e| (task, e))?;
            Ok((claims, (completion, Vec::new())))
        }));
    }
    attach_manifests(&state, &mut checked).await?;
    let valid: Vec<(
        crate::store::Fence,
        &domain::Completion,
        &[crate::store::WrittenManifest],
    )> = checked
        .iter()
        .filter_map(|c| c.as_ref().ok())
        .map(|(claims, (completion, manifests))| (fence(claims), completion, manifests.as_slice()))
        .collect();
    let answers = state.store.complete_many(&valid).await?;
    for ((_, completion, _), answer) in valid.iter().zip(&answers) {
        if let Ok(answer) = answer {
            crate::metrics::completed(completion, answer);
        }
    }
    let results = batch_results(&checked, answers, |claims, answer| {
        tracing::info!(task_id = %claims.sub, attempt = claims.att, state = answer.state.as_str(), "task completed (batch)");
        serde_json::to_value(answer).map_err(|_| ApiError::internal())
    })?;
    Ok(Json(wire::TaskBatchResponse { results }))
}

type Completing = (domain::Completion, Vec<crate::store::WrittenManifest>);

/// Manifests, as the single call writes them, for the successes whose
/// attempt staged parts: which ones is one query for the whole batch. An
/// entry whose manifests cannot be written is answered with that error.
async fn attach_manifests(
    state: &AppState,
    checked: &mut [Checked<Completing>],
) -> Result<(), ApiError> {
    let succeeded: Vec<(uuid::Uuid, u32)> = checked
        .iter()
        .filter_map(|c| c.as_ref().ok())
        .filter(|(_, (completion, _))| matches!(completion, domain::Completion::Succeeded { .. }))
        .map(|(claims, _)| (claims.sub, claims.att))
        .collect();
    let staged = state.store.attempts_with_staged_parts(&succeeded).await?;
    for c in checked.iter_mut() {
        let Ok((claims, (completion, manifests))) = c else {
            continue;
        };
        if matches!(completion, domain::Completion::Succeeded { .. })
            && staged.contains(&(claims.sub, claims.att))
        {
            match staging::write_manifests(state.ctx(), claims).await {
                Ok(written) => *manifests = written,
                Err(e) => *c = Err((Some(claims.sub), e.into())),
            }
        }
    }
    Ok(())
}

/// Presigned URLs (contract: "Objects a task may touch";
/// `services::task_objects::urls`).
pub async fn objects(
    State(state): State<AppState>,
    TaskAuth(claims): TaskAuth,
    ApiJson(req): ApiJson<wire::ObjectsRequest>,
) -> Result<Json<wire::ObjectsResponse>, ApiError> {
    let urls = task_objects::urls(state.ctx(), &claims, &req).await?;
    Ok(Json(wire::ObjectsResponse { urls }))
}

/// Hands an attempt's task back: its worker is stopping
/// (`Store::release`). The worker credential authenticates the call and
/// the capability token in the body names the attempt (fenced); a task's
/// own code, which holds only its token, cannot hand itself back.
pub async fn release(
    State(state): State<AppState>,
    WorkerAuth(_worker): WorkerAuth,
    ApiJson(req): ApiJson<wire::ReleaseRequest>,
) -> Result<Json<wire::ReleaseResponse>, ApiError> {
    let claims = attempt_named(&state, &req.capability_token)?;
    let task_state = state.store.release(fence(&claims)).await?;
    tracing::info!(task_id = %claims.sub, attempt = claims.att, state = task_state.as_str(), "task handed back by its worker");
    Ok(Json(wire::ReleaseResponse { state: task_state }))
}

/// Records a worker's capacity (`Store::worker_present`): its slots, busy
/// slots and runtimes, for the backlog per slot. `204`; a report out of
/// range is `400 invalid_request` and records nothing.
pub async fn presence(
    State(state): State<AppState>,
    WorkerAuth(worker): WorkerAuth,
    ApiJson(req): ApiJson<wire::WorkerPresence>,
) -> Result<StatusCode, ApiError> {
    let p = domain::worker_presence(req)?;
    state
        .store
        .worker_present(&p.worker_id, &worker.sub, p.slots, p.busy, &p.runtimes)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The attempt a worker call names by its capability token in the body
/// (checked as the bearer token would be, and counted against the task's
/// rate).
fn attempt_named(state: &AppState, capability_token: &str) -> Result<TaskClaims, ApiError> {
    let claims: TaskClaims = state
        .keys
        .verify(capability_token, crate::tokens::TokenKind::Task)
        .map_err(|e| {
            let mut api = ApiError::from(e);
            api.message = format!("capability_token: {}", api.message);
            api
        })?;
    state.limits.admit_task(claims.sub, claims.org)?;
    Ok(claims)
}

/// Stores what the attempt printed (`services::logs::store`): bounded,
/// redacted, fenced. The worker credential authenticates the call and the
/// capability token in the body names the attempt: a task's own code,
/// which holds only its token, cannot write its log.
pub async fn logs(
    State(state): State<AppState>,
    WorkerAuth(_worker): WorkerAuth,
    ApiJson(req): ApiJson<wire::TaskLogUpload>,
) -> Result<Json<wire::TaskLogResponse>, ApiError> {
    let claims = attempt_named(&state, &req.capability_token)?;
    let log = wire::TaskLogRequest {
        log: req.log,
        dropped_bytes: req.dropped_bytes,
    };
    Ok(Json(logs::store(state.ctx(), &claims, &log).await?))
}

/// Stages parts of a dataset the task may write (contract: "Staging and
/// commit"; `services::staging::stage`). Fenced.
pub async fn dataset_stage(
    State(state): State<AppState>,
    TaskAuth(claims): TaskAuth,
    ApiJson(req): ApiJson<wire::StageRequest>,
) -> Result<Json<wire::StageResponse>, ApiError> {
    let (dataset, staged_parts) = staging::stage(state.ctx(), &claims, &req).await?;
    Ok(Json(wire::StageResponse {
        dataset,
        staged_parts,
    }))
}

/// `POST /v1/task/credentials` (aws profile, `--sts-role-arn`): STS
/// credentials scoped to the attempt (`services::task_objects::credentials`).
pub async fn credentials(
    State(state): State<AppState>,
    TaskAuth(claims): TaskAuth,
) -> Result<Json<wire::TaskCredentialsResponse>, ApiError> {
    let sts = state.sts.clone().ok_or_else(|| {
        ApiError::not_found(
            "this dispatcher mints no STS credentials (local profile, or no --sts-role-arn); \
             use POST /v1/task/objects",
        )
    })?;
    Ok(Json(
        task_objects::credentials(state.ctx(), &sts, &claims).await?,
    ))
}

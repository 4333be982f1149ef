//! The worker contract: claim with a worker credential, then heartbeat,
//! events, buffer publishes and completion with the capability token.
//! Handlers validate, call the store, and shape answers; no SQL here.

use axum::extract::State;
use axum::Json;
use chrono::{DateTime, Utc};
use dispatcher_wire as wire;

use super::error::ApiError;
use super::extract::{ApiJson, TaskAuth, WorkerAuth};
use super::AppState;
use crate::domain;
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
    tracing::info!(
        task_id = %claimed.task_id,
        attempt = claimed.attempt,
        worker_id,
        credential = worker.sub,
        "task claimed"
    );
    Ok(Json(claim_answer(&state, claimed).await?))
}

/// What a worker gets for a claim: the attempt's capability token and, for
/// a bundle task, a presigned URL of its bundle.
async fn claim_answer(
    state: &AppState,
    claimed: crate::store::Claimed,
) -> Result<wire::ClaimResponse, ApiError> {
    let scope = TaskScope {
        task_id: claimed.task_id,
        job_id: claimed.job_id,
        org_id: claimed.org_id,
        attempt: claimed.attempt,
        datasets: claimed.spec.outputs.clone(),
        reads: claimed.spec.reads.clone(),
    };
    let token_expires_at = token_expiry(state, claimed.lease_expires_at);
    let capability_token = state.keys.mint_task(&scope, token_expires_at);
    // A bundle task's archive: fetched by the worker, checked against the
    // digest the task names (content addressing, not this URL, is the trust).
    let bundle_url = if claimed.spec.runtime == wire::Runtime::Exec {
        None
    } else {
        let key = crate::bundles::object_key(claimed.org_id, &claimed.spec.bundle);
        Some(
            state
                .objects
                .presign_get(&key, state.settings.object_url_ttl)
                .await
                .map_err(|e| {
                    tracing::warn!(error = %e, "presigning a bundle failed");
                    ApiError::unavailable("the object store could not presign the bundle")
                })?,
        )
    };
    Ok(wire::ClaimResponse {
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
        org_id: claimed.org_id,
        bundle_url,
    })
}

/// Entries one batch call may hold (the contract's bound).
const MAX_BATCH: usize = 100;

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
    let (pick, ids) = match (&req.task_ids, req.max_tasks) {
        (Some(ids), None) if !ids.is_empty() && ids.len() <= MAX_BATCH => {
            (crate::store::Pick::Ids(ids), ids.clone())
        }
        (None, Some(n)) if (1..=MAX_BATCH as u32).contains(&n) => (
            crate::store::Pick::Ready(n, req.runtimes.as_deref()),
            Vec::new(),
        ),
        _ => {
            return Err(ApiError::invalid(
                "body",
                format!(
                    "name task_ids (1 to {MAX_BATCH}) or max_tasks (1 to {MAX_BATCH}), not both"
                ),
            ))
        }
    };
    if req.runtimes.is_some() && req.max_tasks.is_none() {
        return Err(ApiError::invalid(
            "runtimes",
            "only a claim of ready work (max_tasks) may name runtimes",
        ));
    }
    if req.runtimes.as_ref().is_some_and(|r| r.is_empty()) {
        return Err(ApiError::invalid(
            "runtimes",
            "name at least one runtime, or leave it out for any",
        ));
    }
    let wait = super::limits::Limits::long_poll_wait(&state.settings, req.wait_seconds)?;
    if !wait.is_zero() && req.max_tasks.is_none() {
        return Err(ApiError::invalid(
            "wait_seconds",
            "only a claim of ready work (max_tasks) may wait",
        ));
    }
    let claimed = if wait.is_zero() {
        state.store.claim_many(pick, &worker_id, lease).await?
    } else {
        // A long-poll holds a slot while it waits.
        let _slot = state.limits.long_poll()?;
        claim_waiting(&state, pick, &worker_id, lease, wait).await?
    };
    tracing::info!(
        claimed = claimed.len(),
        worker_id,
        credential = worker.sub,
        "tasks claimed (batch)"
    );
    let mut granted = std::collections::HashMap::with_capacity(claimed.len());
    let mut order = Vec::with_capacity(claimed.len());
    for c in claimed {
        order.push(c.task_id);
        granted.insert(c.task_id, claim_answer(&state, c).await?);
    }
    let mut claims = Vec::new();
    // By ids: each in the order asked; by max_tasks: what was granted.
    let asked = if ids.is_empty() { order } else { ids };
    for task_id in asked {
        let entry = match granted.remove(&task_id) {
            Some(claim) => wire::ClaimBatchEntry {
                task_id,
                claim: Some(Box::new(claim)),
                error: None,
            },
            None => wire::ClaimBatchEntry {
                task_id,
                claim: None,
                error: Some(ApiError::from(state.store.claim_refusal(task_id).await).detail()),
            },
        };
        claims.push(entry);
    }
    Ok(Json(wire::ClaimBatchResponse { claims }))
}

/// Claims ready work, waiting up to `wait` for some: looks again whenever
/// the ready signal says tasks may have become ready (ADR 0017), and at
/// least every `claim_poll`. Answers as soon as one claim is granted.
async fn claim_waiting(
    state: &AppState,
    pick: crate::store::Pick<'_>,
    worker_id: &str,
    lease: std::time::Duration,
    wait: std::time::Duration,
) -> Result<Vec<crate::store::Claimed>, ApiError> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut ready = state.ready.subscribe();
    loop {
        // Seen before the claim looks, so a signal sent while it looks is
        // not missed.
        ready.borrow_and_update();
        let claimed = state.store.claim_many(pick, worker_id, lease).await?;
        let now = tokio::time::Instant::now();
        if !claimed.is_empty() || now >= deadline {
            return Ok(claimed);
        }
        let look_again = deadline.min(now + state.settings.claim_poll);
        tokio::select! {
            changed = ready.changed() => {
                if changed.is_err() {
                    // The signal is gone (shutting down): poll instead.
                    tokio::time::sleep_until(look_again).await;
                }
            }
            _ = tokio::time::sleep_until(look_again) => {}
        }
    }
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
        serde_json::to_value(heartbeat_answer(&state, claims, renewal))
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

fn heartbeat_answer(
    state: &AppState,
    claims: &TaskClaims,
    renewal: crate::store::LeaseRenewal,
) -> wire::HeartbeatResponse {
    let token_expires_at = token_expiry(state, renewal.lease_expires_at);
    let scope = TaskScope {
        task_id: claims.sub,
        job_id: claims.job,
        org_id: claims.org,
        attempt: claims.att,
        datasets: claims.datasets.clone(),
        reads: claims.reads.clone(),
    };
    wire::HeartbeatResponse {
        lease_expires_at: renewal.lease_expires_at,
        capability_token: state.keys.mint_task(&scope, token_expires_at),
        token_expires_at,
        cancel_requested: renewal.cancel_requested,
    }
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
    Ok(Json(heartbeat_answer(&state, &claims, renewal)))
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
        domain::Completion::Succeeded { .. } => write_manifests(&state, &claims).await?,
        _ => Vec::new(),
    };
    state.settings.failpoint("complete_after_manifest");
    let answer = state
        .store
        .complete(fence(&claims), &completion, &manifests)
        .await?;
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
    type Ready = (domain::Completion, Vec<crate::store::WrittenManifest>);
    let mut checked: Vec<Checked<Ready>> = Vec::with_capacity(req.entries.len());
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
    // Manifests, as the single call writes them, for the successes whose
    // attempt staged parts: which ones is one query for the whole batch.
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
            match write_manifests(&state, claims).await {
                Ok(written) => *manifests = written,
                Err(e) => *c = Err((Some(claims.sub), e)),
            }
        }
    }
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
    let results = batch_results(&checked, answers, |claims, answer| {
        tracing::info!(task_id = %claims.sub, attempt = claims.att, state = answer.state.as_str(), "task completed (batch)");
        serde_json::to_value(answer).map_err(|_| ApiError::internal())
    })?;
    Ok(Json(wire::TaskBatchResponse { results }))
}

/// Writes, create-only, the manifest of every dataset the attempt staged
/// parts for, at an immutable key named by its content: a retried or
/// replayed completion finds its own manifest there (same content, same
/// key) and goes on; nothing is ever overwritten or deleted here. A manifest
/// whose transaction does not commit is an orphan, never a version
/// (retention removes it).
async fn write_manifests(
    state: &AppState,
    claims: &TaskClaims,
) -> Result<Vec<crate::store::WrittenManifest>, ApiError> {
    use crate::objects::ObjectError;
    let staged = state.store.staged_datasets(claims.sub, claims.att).await?;
    let mut written = Vec::with_capacity(staged.len());
    for ds in staged {
        let body = serde_json::to_vec(&ds).map_err(|e| {
            tracing::error!(error = %e, "encoding a manifest");
            ApiError::internal()
        })?;
        let sum = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&body));
        let key = format!(
            "orgs/{}/datasets/{}/manifests/{}-{}-{sum}.json",
            claims.org, ds.dataset, claims.sub, claims.att
        );
        let unavailable = |e: ObjectError| {
            tracing::warn!(error = %e, key, "writing a manifest failed");
            ApiError::unavailable("the object store is unavailable; nothing was committed")
        };
        match state.objects.put_if_absent(&key, body.clone()).await {
            Ok(()) => {}
            // Our own earlier write (a lost answer, a retry): the key names
            // the content, so re-read to be sure, never delete.
            Err(ObjectError::AlreadyExists(_)) => {
                let existing = state.objects.get(&key).await.map_err(unavailable)?;
                if existing != body {
                    tracing::error!(key, "a manifest key holds other content");
                    return Err(ApiError::internal());
                }
            }
            Err(e) => return Err(unavailable(e)),
        }
        let mut parts: Vec<String> = ds.parts.iter().map(|p| p.key.clone()).collect();
        parts.sort();
        written.push(crate::store::WrittenManifest {
            dataset_id: ds.dataset_id,
            key,
            parts,
        });
    }
    Ok(written)
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

/// Stages parts of a dataset the task may write (contract: "Staging and
/// commit"): each part must lie under the attempt's prefix, exist with the
/// given size and sha256, and parse line by line against the schema with
/// the given row count (the buffer sink's parser). Any mismatch is `400`
/// naming the part and the first bad line, and nothing is staged. Fenced.
pub async fn dataset_stage(
    State(state): State<AppState>,
    TaskAuth(claims): TaskAuth,
    ApiJson(req): ApiJson<wire::StageRequest>,
) -> Result<Json<wire::StageResponse>, ApiError> {
    let settings = &state.settings;
    let name = domain::dataset_name("dataset", &req.dataset)?;
    let max = settings.max_parts_per_stage;
    if req.parts.is_empty() || req.parts.len() > max {
        return Err(ApiError::invalid("parts", format!("give 1 to {max} parts")));
    }
    for (i, p) in req.parts.iter().enumerate() {
        crate::objects::check_key(&p.key).map_err(|e| match e {
            crate::objects::ObjectError::InvalidKey(_, why) => {
                ApiError::invalid(&format!("parts[{i}].key"), why)
            }
            other => ApiError::invalid(&format!("parts[{i}].key"), other),
        })?;
        if p.sha256.len() != 64 || !p.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ApiError::invalid(
                &format!("parts[{i}].sha256"),
                "must be 64 hexadecimal characters",
            ));
        }
        if p.bytes > settings.max_part_bytes {
            return Err(ApiError::invalid(
                &format!("parts[{i}].bytes"),
                format!("a part may have at most {} bytes", settings.max_part_bytes),
            ));
        }
    }
    if !claims.datasets.contains(&name) {
        return Err(ApiError::forbidden(format!(
            "dataset {name:?} is not among the task's outputs"
        )));
    }
    let prefix = claims.prefixes.first().map(String::as_str).unwrap_or("");
    if let Some((i, p)) = req
        .parts
        .iter()
        .enumerate()
        .find(|(_, p)| prefix.is_empty() || !p.key.starts_with(prefix))
    {
        return Err(ApiError::forbidden(format!(
            "parts[{i}].key {:?} is not under the attempt's prefix {prefix:?}",
            p.key
        )));
    }
    let (dataset_id, mode, columns) = state.store.dataset_schema(claims.org, &name).await?;
    if mode == wire::DatasetMode::Stream {
        return Err(ApiError::invalid(
            "dataset",
            format!("{name:?} is a stream dataset: its rows arrive through buffer-publish"),
        ));
    }
    // A fenced attempt learns it before any part is read.
    state.store.check_fence(fence(&claims)).await?;
    let mut parts = Vec::with_capacity(req.parts.len());
    for (i, p) in req.parts.iter().enumerate() {
        let field = format!("parts[{i}]");
        let committed = crate::objects::committed_key(claims.org, &p.key);
        verify_part(&state, &columns, p, &committed)
            .await
            .map_err(|e| match e {
                PartError::Refused(e) => {
                    ApiError::invalid(&field, format!("{e} (object {:?})", p.key))
                }
                PartError::Rewritten => ApiError::conflict(format!(
                    "{field}: {:?} was staged before with other bytes; a part is staged once",
                    p.key
                )),
                PartError::Store(e) => {
                    tracing::warn!(error = %e, "reading a staged part failed");
                    ApiError::unavailable("the object store is unavailable; nothing was staged")
                }
            })?;
        parts.push(crate::store::NewPart {
            key: committed,
            rows: i64::try_from(p.rows).unwrap_or(i64::MAX),
            bytes: i64::try_from(p.bytes).unwrap_or(i64::MAX),
            sha256: p.sha256.to_ascii_lowercase(),
        });
    }
    let staged = state
        .store
        .stage_parts(fence(&claims), dataset_id, &parts)
        .await?;
    Ok(Json(wire::StageResponse {
        dataset: name,
        staged_parts: staged,
    }))
}

enum PartError {
    Refused(crate::rows::RowError),
    /// The committed copy exists with other bytes.
    Rewritten,
    Store(crate::objects::ObjectError),
}

fn refused(code: crate::rows::ReasonCode, message: String) -> PartError {
    PartError::Refused(crate::rows::RowError {
        code,
        line: None,
        message,
    })
}

/// Checks one part against what the task says of it and the schema, and
/// writes the bytes it checked to `committed` (create-only): what a version
/// names is exactly what was verified, whatever the task's URL or
/// credentials write to the staged key afterwards (no check-then-use gap).
async fn verify_part(
    state: &AppState,
    columns: &[wire::Column],
    part: &wire::StagedPart,
    committed: &str,
) -> Result<(), PartError> {
    use crate::objects::ObjectError;
    use crate::rows::ReasonCode;
    let missing = |_| {
        refused(
            ReasonCode::ObjectMissing,
            "no object at this key (upload it first through a PUT URL)".into(),
        )
    };
    let meta = match state.objects.head(&part.key).await {
        Ok(m) => m,
        Err(ObjectError::NotFound(k)) => return Err(missing(k)),
        Err(e) => return Err(PartError::Store(e)),
    };
    if meta.size != part.bytes {
        return Err(refused(
            ReasonCode::ChecksumMismatch,
            format!("the object has {} bytes, not {}", meta.size, part.bytes),
        ));
    }
    let body = match state.objects.get(&part.key).await {
        Ok(b) => b,
        Err(ObjectError::NotFound(k)) => return Err(missing(k)),
        Err(e) => return Err(PartError::Store(e)),
    };
    let sum = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&body));
    if !sum.eq_ignore_ascii_case(&part.sha256) {
        return Err(refused(
            ReasonCode::ChecksumMismatch,
            format!("the object's sha256 is {sum}, not {}", part.sha256),
        ));
    }
    let rows = crate::rows::parse_rows(&body, columns, state.settings.max_row_bytes, |_| {})
        .map_err(PartError::Refused)?;
    if rows != part.rows {
        return Err(refused(
            ReasonCode::RowCountMismatch,
            format!("the object has {rows} rows, not {}", part.rows),
        ));
    }
    match state.objects.put_if_absent(committed, body).await {
        Ok(()) => {}
        Err(ObjectError::AlreadyExists(_)) => {
            // Staged again (a retried call): the same bytes are the same part.
            let kept = state
                .objects
                .get(committed)
                .await
                .map_err(PartError::Store)?;
            let kept_sum = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&kept));
            if !kept_sum.eq_ignore_ascii_case(&part.sha256) {
                return Err(PartError::Rewritten);
            }
        }
        Err(e) => return Err(PartError::Store(e)),
    }
    Ok(())
}

/// `POST /v1/task/credentials` (aws profile, `--sts-role-arn`): STS
/// credentials whose session policy allows `PutObject` under the attempt's
/// prefix and `GetObject` there and on the committed parts of the task's
/// `reads`, for runners that write many parts. Fenced; they live as long
/// as the token (at least the 15 minutes STS requires, at most an hour).
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
    let lease_end = state.store.lease_end(fence(&claims)).await?;
    let prefix = claims
        .prefixes
        .first()
        .cloned()
        .ok_or_else(|| ApiError::forbidden("the token names no object prefix"))?;
    let readable = state
        .store
        .committed_part_keys(claims.org, &claims.reads)
        .await?;
    let policy = crate::objects::sts::session_policy(&sts.bucket, &prefix, &readable, lease_end)
        .map_err(|len| {
            ApiError::too_large(format!(
                "a session policy for the {} readable parts would be {len} characters; \
                 STS takes {}: read them through POST /v1/task/objects",
                readable.len(),
                crate::objects::sts::MAX_POLICY_CHARS
            ))
        })?;
    let left = (crate::tokens::from_timestamp(claims.exp) - Utc::now())
        .to_std()
        .unwrap_or_default();
    let session = format!("task-{}-{}", claims.sub.simple(), claims.att);
    let creds = sts.issue(&session, &policy, left).await.map_err(|e| {
        tracing::warn!(error = %e, "STS refused");
        ApiError::unavailable("STS did not answer")
    })?;
    Ok(Json(wire::TaskCredentialsResponse {
        access_key_id: creds.access_key_id,
        secret_access_key: creds.secret_access_key,
        session_token: creds.session_token,
        expires_at: creds.expires_at.min(lease_end),
        region: sts.region.clone(),
        bucket: sts.bucket.clone(),
        prefix,
        policy: serde_json::from_str(&policy).unwrap_or_default(),
    }))
}

//! The jobs API: submit, read, list, cancel, and a task's detail and
//! events. Every call checks the caller's membership and role in Postgres
//! (in the extractors, before the body is read); another org's job answers
//! 404, never its contents, and is in no listing.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use dispatcher_wire as wire;
use serde::Deserialize;
use uuid::Uuid;

use super::error::ApiError;
use super::extract::{ApiJson, Member, Writer};
use super::AppState;
use crate::domain;
use crate::store::TaskPage;

fn job_id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|e| ApiError::invalid("job_id", e))
}

/// Paging of a job's tasks: `?limit=N&after=<next_cursor>`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    limit: Option<u32>,
    after: Option<String>,
}

fn page(state: &AppState, q: Option<PageQuery>) -> Result<TaskPage, ApiError> {
    let q = q.unwrap_or(PageQuery {
        limit: None,
        after: None,
    });
    let max = state.settings.job_page_size;
    let limit = q.limit.unwrap_or(max);
    if limit == 0 || limit > max {
        return Err(ApiError::invalid("limit", format!("must be 1 to {max}")));
    }
    let after = match q.after {
        None => None,
        Some(c) => Some(
            c.parse::<i32>()
                .ok()
                .filter(|n| *n >= 0)
                .ok_or_else(|| ApiError::invalid("after", "is not a cursor this API gave"))?,
        ),
    };
    Ok(TaskPage { after, limit })
}

pub async fn submit(
    State(state): State<AppState>,
    Writer(user): Writer,
    headers: axum::http::HeaderMap,
    ApiJson(req): ApiJson<wire::SubmitJobRequest>,
) -> Result<(StatusCode, Json<wire::JobView>), ApiError> {
    let mut job = domain::new_job(req, &state.settings)?;
    // Its attempts continue this request's span when traces are on, else
    // the caller's context as given; a malformed one is ignored, as the
    // W3C recommendation says.
    job.traceparent =
        dispatcher_telemetry::traceparent_of(&tracing::Span::current()).or_else(|| {
            headers
                .get("traceparent")
                .and_then(|v| v.to_str().ok())
                .and_then(dispatcher_telemetry::parse)
                .map(|sc| dispatcher_telemetry::format(&sc))
        });
    let view = state
        .store
        .submit_job(user.org, Some(user.sub), &job)
        .await?;
    tracing::info!(job_id = %view.job_id, org = %user.org, tasks = view.tasks.len(), "job submitted");
    Ok((StatusCode::CREATED, Json(view)))
}

pub async fn get(
    State(state): State<AppState>,
    Member { user, .. }: Member,
    Path(raw): Path<String>,
    query: Result<Query<PageQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<wire::JobView>, ApiError> {
    let id = job_id(&raw)?;
    let query = query.map_err(|e| ApiError::invalid("query", e.body_text()))?;
    let page = page(&state, Some(query.0))?;
    Ok(Json(state.store.get_job(user.org, id, page).await?))
}

pub async fn cancel(
    State(state): State<AppState>,
    Writer(user): Writer,
    Path(raw): Path<String>,
) -> Result<Json<wire::JobView>, ApiError> {
    let id = job_id(&raw)?;
    let view = state
        .store
        .cancel_job(user.org, id, page(&state, None)?)
        .await?;
    tracing::info!(job_id = %id, org = %user.org, "job cancelled");
    Ok(Json(view))
}

/// A query string of the type `T`, or `400 invalid_request` naming it.
fn query_of<T>(
    q: Result<Query<T>, axum::extract::rejection::QueryRejection>,
) -> Result<T, ApiError> {
    q.map(|q| q.0)
        .map_err(|e| ApiError::invalid("query", e.body_text()))
}

/// `GET /v1/jobs`: the org's jobs matching the filters, newest first.
pub async fn list(
    State(state): State<AppState>,
    Member { user, .. }: Member,
    query: Result<Query<wire::JobListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<wire::JobListResponse>, ApiError> {
    let q = query_of(query)?;
    let (filter, after, limit) = domain::job_listing(&q, state.settings.job_list_page_size)?;
    let (jobs, next) = state
        .store
        .list_jobs(user.org, &filter, after, limit)
        .await?;
    let paused = state.store.pauses(user.org).await?;
    Ok(Json(wire::JobListResponse {
        jobs,
        paused_runtimes: paused.into_iter().map(|p| p.runtime).collect(),
        next_cursor: next.map(|c| c.encode()),
    }))
}

/// `GET /v1/jobs/{job_id}/tasks/{key}`: the task's spec and every attempt.
pub async fn task(
    State(state): State<AppState>,
    Member { user, .. }: Member,
    Path((raw, key)): Path<(String, String)>,
) -> Result<Json<wire::TaskDetail>, ApiError> {
    let id = job_id(&raw)?;
    Ok(Json(state.store.task_detail(user.org, id, &key).await?))
}

/// `GET /v1/jobs/{job_id}/tasks/{key}/attempts/{attempt}/logs`: what the
/// attempt printed, as its worker stored it (`services::logs::read`).
pub async fn logs(
    State(state): State<AppState>,
    Member { user, .. }: Member,
    Path((raw, key, attempt)): Path<(String, String, String)>,
) -> Result<Json<wire::AttemptLog>, ApiError> {
    let id = job_id(&raw)?;
    let attempt = attempt
        .parse::<u32>()
        .ok()
        .filter(|n| *n >= 1)
        .ok_or_else(|| ApiError::invalid("attempt", "must be a whole number from 1"))?;
    let log = crate::services::logs::read(
        &state.store,
        state.objects.as_ref(),
        user.org,
        id,
        &key,
        attempt,
    )
    .await?;
    Ok(Json(log))
}

/// Paging of a task's events: `?limit=N&after=<next_cursor>`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    limit: Option<u32>,
    after: Option<String>,
}

/// `GET /v1/jobs/{job_id}/tasks/{key}/events`: a page of the task's events.
pub async fn events(
    State(state): State<AppState>,
    Member { user, .. }: Member,
    Path((raw, key)): Path<(String, String)>,
    query: Result<Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<wire::EventPage>, ApiError> {
    let id = job_id(&raw)?;
    let q = query_of(query)?;
    let max = state.settings.event_page_size;
    let limit = q.limit.unwrap_or(max);
    if limit == 0 || limit > max {
        return Err(ApiError::invalid("limit", format!("must be 1 to {max}")));
    }
    let after = match q.after {
        None => None,
        Some(c) => Some(
            c.split_once('.')
                .and_then(|(a, s)| Some((a.parse().ok()?, s.parse().ok()?)))
                .ok_or_else(|| ApiError::invalid("after", "is not a cursor this API gave"))?,
        ),
    };
    Ok(Json(
        state
            .store
            .task_events(user.org, id, &key, after, limit)
            .await?,
    ))
}

/// Retries `scope` of the org's job `raw` and answers the job.
async fn retried(
    state: &AppState,
    user: &super::extract::UserIdentity,
    raw: &str,
    scope: crate::store::RetryScope<'_>,
) -> Result<Json<wire::JobView>, ApiError> {
    let id = job_id(raw)?;
    let store = &state.store;
    store.retry(user.org, Some(user.sub), id, scope).await?;
    Ok(Json(store.get_job(user.org, id, page(state, None)?).await?))
}

/// `POST /v1/jobs/{job_id}/retry`: the job's failed and cancelled tasks run
/// again (`store::actions`); answers the job.
pub async fn retry(
    State(state): State<AppState>,
    Writer(user): Writer,
    Path(raw): Path<String>,
) -> Result<Json<wire::JobView>, ApiError> {
    retried(&state, &user, &raw, crate::store::RetryScope::Job).await
}

/// `POST /v1/jobs/{job_id}/tasks/{key}/retry`: the task and the job's
/// cancelled tasks run again; answers the job.
pub async fn retry_task(
    State(state): State<AppState>,
    Writer(user): Writer,
    Path((raw, key)): Path<(String, String)>,
) -> Result<Json<wire::JobView>, ApiError> {
    retried(&state, &user, &raw, crate::store::RetryScope::Task(&key)).await
}

/// `POST /v1/job-actions`: a bulk retry or cancel by the listing's
/// filters, at most `job_action_max` jobs per call, recorded.
pub async fn bulk(
    State(state): State<AppState>,
    Writer(user): Writer,
    ApiJson(req): ApiJson<wire::JobActionRequest>,
) -> Result<Json<wire::JobActionResponse>, ApiError> {
    if req.filter.limit.is_some() || req.filter.after.is_some() {
        return Err(ApiError::invalid(
            "filter",
            "takes the listing's filters, not limit or after (a call acts on at most job_action_max jobs)",
        ));
    }
    let max = state.settings.job_list_page_size;
    let (filter, _, _) = domain::job_listing(&req.filter, max).map_err(|mut e| {
        e.field = format!("filter.{}", e.field);
        e
    })?;
    let described = serde_json::to_value(&req.filter).map_err(|_| ApiError::internal())?;
    let (jobs, tasks, capped, action_id) = state
        .store
        .bulk_action(
            user.org,
            Some(user.sub),
            &crate::store::BulkAction {
                action: req.action,
                filter: &filter,
                described: &described,
                cap: state.settings.job_action_max,
                dry_run: req.dry_run,
            },
        )
        .await?;
    Ok(Json(wire::JobActionResponse {
        action_id,
        action: req.action,
        dry_run: req.dry_run,
        jobs,
        tasks,
        capped,
    }))
}

/// `GET /v1/job-actions`: the org's last 100 recorded actions.
pub async fn actions(
    State(state): State<AppState>,
    Member { user, .. }: Member,
) -> Result<Json<wire::JobActionList>, ApiError> {
    let actions = state.store.job_actions(user.org, 100).await?;
    Ok(Json(wire::JobActionList { actions }))
}

fn runtime(raw: &str) -> Result<wire::Runtime, ApiError> {
    wire::Runtime::parse(raw)
        .ok_or_else(|| ApiError::invalid("runtime", "must be exec, node, python or rust"))
}

/// `PUT /v1/pauses/{runtime}`: the org's ready tasks of the runtime are no
/// longer claimed (leased ones run on); answers the org's pauses.
pub async fn pause(
    State(state): State<AppState>,
    Writer(user): Writer,
    Path(raw): Path<String>,
) -> Result<Json<wire::PauseList>, ApiError> {
    let runtime = runtime(&raw)?;
    if state.store.pause(user.org, runtime, Some(user.sub)).await? {
        tracing::info!(org = %user.org, runtime = runtime.as_str(), "runtime paused");
    }
    let paused = state.store.pauses(user.org).await?;
    Ok(Json(wire::PauseList { paused }))
}

/// `DELETE /v1/pauses/{runtime}`: claims resume and the waiting tasks are
/// woken; `404` if it was not paused.
pub async fn resume(
    State(state): State<AppState>,
    Writer(user): Writer,
    Path(raw): Path<String>,
) -> Result<Json<wire::PauseList>, ApiError> {
    let runtime = runtime(&raw)?;
    let woken = state
        .store
        .resume(user.org, runtime)
        .await?
        .ok_or_else(|| {
            ApiError::not_found(format!("runtime {:?} is not paused", runtime.as_str()))
        })?;
    tracing::info!(org = %user.org, runtime = runtime.as_str(), woken, "runtime resumed");
    let paused = state.store.pauses(user.org).await?;
    Ok(Json(wire::PauseList { paused }))
}

/// `GET /v1/pauses`: the org's paused runtimes.
pub async fn pauses(
    State(state): State<AppState>,
    Member { user, .. }: Member,
) -> Result<Json<wire::PauseList>, ApiError> {
    let paused = state.store.pauses(user.org).await?;
    Ok(Json(wire::PauseList { paused }))
}

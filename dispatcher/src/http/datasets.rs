//! The dataset registry API (contract: "Datasets"). Every call checks the
//! caller's membership (and, to create, its role) in Postgres before the
//! body is read; another org's dataset answers 404, never its existence.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use dispatcher_wire as wire;

use super::error::ApiError;
use super::extract::{ApiJson, Member, Reader, Writer};
use super::AppState;
use crate::domain;
use crate::services::{self, query};

fn name(raw: &str) -> Result<String, ApiError> {
    Ok(domain::dataset_name("name", raw)?)
}

pub async fn create(
    State(state): State<AppState>,
    Writer(user): Writer,
    ApiJson(req): ApiJson<wire::CreateDatasetRequest>,
) -> Result<(StatusCode, Json<wire::DatasetView>), ApiError> {
    let ds = domain::new_dataset(req)?;
    let view = state.store.create_dataset(user.org, user.sub, &ds).await?;
    tracing::info!(org = %user.org, dataset = ds.name, mode = ds.mode.as_str(), "dataset created");
    Ok((StatusCode::CREATED, Json(view)))
}

pub async fn list(
    State(state): State<AppState>,
    Member { user, .. }: Member,
) -> Result<Json<wire::DatasetList>, ApiError> {
    Ok(Json(wire::DatasetList {
        datasets: state.store.list_datasets(user.org).await?,
    }))
}

pub async fn get(
    State(state): State<AppState>,
    Member { user, .. }: Member,
    Path(raw): Path<String>,
) -> Result<Json<wire::DatasetView>, ApiError> {
    Ok(Json(state.store.get_dataset(user.org, &name(&raw)?).await?))
}

pub async fn manifest(
    State(state): State<AppState>,
    Member { user, .. }: Member,
    Path((raw, version)): Path<(String, String)>,
) -> Result<Json<wire::ManifestView>, ApiError> {
    let version: u32 = version
        .parse()
        .ok()
        .filter(|v| *v >= 1)
        .ok_or_else(|| ApiError::invalid("version", "must be a version number (1 or more)"))?;
    Ok(Json(
        state
            .store
            .manifest(user.org, &name(&raw)?, version)
            .await?,
    ))
}

/// `GET /v1/datasets/{name}/batches/{batch_id}`: a buffer batch's status
/// (`pending`, `ingested`, or `dead` with its reason).
pub async fn batch(
    State(state): State<AppState>,
    Member { user, .. }: Member,
    Path((raw, batch)): Path<(String, String)>,
) -> Result<Json<wire::BatchView>, ApiError> {
    let batch_id: uuid::Uuid = batch
        .parse()
        .map_err(|_| ApiError::invalid("batch_id", "must be a UUID"))?;
    Ok(Json(
        state
            .store
            .batch_view(user.org, &name(&raw)?, batch_id)
            .await?,
    ))
}

/// `POST /v1/query` (contract: "Query"; ADR 0007): one committed version
/// (default: the current one) or a stream's ingested rows, filtered by a
/// structured `where`. A user reads any dataset of its org; a task only
/// those in its `reads`, while its attempt is live.
pub async fn query(
    State(state): State<AppState>,
    reader: Reader,
    ApiJson(req): ApiJson<wire::QueryRequest>,
) -> Result<Json<wire::QueryResponse>, ApiError> {
    let name = domain::dataset_name("dataset", &req.dataset)?;
    let org = match &reader {
        Reader::User(m) => m.user.org,
        Reader::Task(claims) => {
            if !claims.reads.contains(&name) {
                return Err(ApiError::forbidden(format!(
                    "dataset {name:?} is not among the task's reads"
                )));
            }
            state.store.check_fence(services::fence(claims)).await?;
            claims.org
        }
    };
    let _slot = state.limits.query(org)?;
    let answer = query::answer(state.ctx(), state.data.as_ref(), org, name, &req)
        .await
        .map_err(|e| match e {
            query::Failed::Refused(e) => ApiError::from(e),
            query::Failed::Read(e) => read_error(e),
        })?;
    Ok(Json(answer))
}

fn read_error(e: query::QueryError) -> ApiError {
    use query::QueryError;
    match e {
        QueryError::TooLarge(m) => ApiError::too_large(m),
        QueryError::Timeout(_) => ApiError::unavailable(e.to_string()),
        QueryError::Objects(_) | QueryError::Data(_) => {
            tracing::warn!(error = %e, "query failed");
            ApiError::unavailable("the object store or the data database did not answer")
        }
        QueryError::Integrity { .. } => {
            // The metric is this event (`metric` field) until the
            // telemetry issue exports counters.
            tracing::error!(metric = "dataset_part_integrity_failures_total", error = %e, "a committed part is not the bytes its version recorded");
            ApiError::integrity(e.to_string())
        }
        QueryError::Corrupt { .. } => {
            tracing::error!(error = %e, "a committed part does not parse");
            ApiError::internal()
        }
    }
}

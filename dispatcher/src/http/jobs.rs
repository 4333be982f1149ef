//! The minimal jobs API. Every call checks the caller's membership and role
//! in Postgres; another org's job answers 404, never its contents.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use dispatcher_wire as wire;
use uuid::Uuid;

use super::extract::{ApiJson, UserAuth};
use super::AppState;
use crate::domain::{self, Role};
use crate::error::ApiError;
use crate::tokens::UserClaims;

async fn role(state: &AppState, user: &UserClaims) -> Result<Role, ApiError> {
    state
        .store
        .member_role(user.org, user.sub)
        .await?
        .ok_or_else(|| {
            ApiError::forbidden(format!(
                "user {} is not a member of org {}",
                user.sub, user.org
            ))
        })
}

async fn writer(state: &AppState, user: &UserClaims) -> Result<(), ApiError> {
    let role = role(state, user).await?;
    if role.can_write_jobs() {
        Ok(())
    } else {
        Err(ApiError::forbidden(format!(
            "role {} may read jobs but not submit or cancel them",
            role.as_str()
        )))
    }
}

fn job_id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|e| ApiError::invalid("job_id", e))
}

pub async fn submit(
    State(state): State<AppState>,
    UserAuth(user): UserAuth,
    ApiJson(req): ApiJson<wire::SubmitJobRequest>,
) -> Result<(StatusCode, Json<wire::JobView>), ApiError> {
    let job = domain::new_job(req, &state.settings)?;
    writer(&state, &user).await?;
    let view = state
        .store
        .submit_job(user.org, Some(user.sub), &job)
        .await?;
    tracing::info!(job_id = %view.job_id, org = %user.org, tasks = view.tasks.len(), "job submitted");
    Ok((StatusCode::CREATED, Json(view)))
}

pub async fn get(
    State(state): State<AppState>,
    UserAuth(user): UserAuth,
    Path(raw): Path<String>,
) -> Result<Json<wire::JobView>, ApiError> {
    let id = job_id(&raw)?;
    role(&state, &user).await?;
    Ok(Json(state.store.get_job(user.org, id).await?))
}

pub async fn cancel(
    State(state): State<AppState>,
    UserAuth(user): UserAuth,
    Path(raw): Path<String>,
) -> Result<Json<wire::JobView>, ApiError> {
    let id = job_id(&raw)?;
    writer(&state, &user).await?;
    let view = state.store.cancel_job(user.org, id).await?;
    tracing::info!(job_id = %id, org = %user.org, "job cancelled");
    Ok(Json(view))
}

//! Org administration (ADR 0012): create an org, list, add or change and
//! remove its members. Roles come only from Postgres; an org always keeps
//! at least one admin.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use dispatcher_wire as wire;

use super::error::ApiError;
use super::extract::{ApiJson, Member, OrgAdmin, UserAuth};
use super::AppState;
use crate::domain::Role;

fn role(raw: &str) -> Result<Role, ApiError> {
    Role::parse(raw)
        .ok_or_else(|| ApiError::invalid("role", "must be admin, member or viewer (or owner)"))
}

fn email(raw: &str) -> Result<String, ApiError> {
    let e = raw.trim();
    if e.len() < 3 || e.len() > 320 || !e.contains('@') || e.chars().any(char::is_control) {
        return Err(ApiError::invalid("email", "must be an e-mail address"));
    }
    Ok(e.to_owned())
}

/// `POST /v1/orgs`: any signed-in user creates an org and becomes its
/// admin. A taken name is `409`.
pub async fn create(
    State(state): State<AppState>,
    UserAuth(user): UserAuth,
    ApiJson(req): ApiJson<wire::CreateOrgRequest>,
) -> Result<(StatusCode, Json<wire::OrgView>), ApiError> {
    let name = req.name.trim();
    if name.is_empty() || name.len() > 200 || name.chars().any(char::is_control) {
        return Err(ApiError::invalid("name", "must be 1 to 200 characters"));
    }
    let org_id = state.store.create_org(name, user.sub).await?;
    Ok((
        StatusCode::CREATED,
        Json(wire::OrgView {
            org_id,
            name: name.to_owned(),
        }),
    ))
}

fn view(m: crate::store::MemberRow) -> wire::MemberView {
    wire::MemberView {
        user_id: m.user_id,
        email: m.email,
        idp_subject: m.idp_subject,
        role: m.role,
        accepted: m.accepted,
    }
}

/// `GET /v1/org/members`: any member may see who else is.
pub async fn members(
    State(state): State<AppState>,
    Member { user, .. }: Member,
) -> Result<Json<wire::MemberList>, ApiError> {
    let members = state
        .store
        .list_members(user.org)
        .await?
        .into_iter()
        .map(view)
        .collect();
    Ok(Json(wire::MemberList { members }))
}

/// `PUT /v1/org/members` (admin): invites the user with this e-mail (a user
/// row with only the e-mail is made if there is none) or changes a
/// member's role. It writes only this org's membership, never the user's
/// row: identities are bound at sign-in (ADR 0012).
pub async fn put_member(
    State(state): State<AppState>,
    OrgAdmin(admin): OrgAdmin,
    ApiJson(req): ApiJson<wire::PutMemberRequest>,
) -> Result<Json<wire::MemberView>, ApiError> {
    let email = email(&req.email)?;
    let role = role(&req.role)?;
    let user_id = state.store.ensure_user(&email).await?;
    if !state
        .store
        .change_membership(admin.org, user_id, Some(role))
        .await?
        && !state
            .store
            .invite_member(admin.org, user_id, role, admin.sub)
            .await?
    {
        // Invited by another admin meanwhile: set the role asked for.
        state
            .store
            .change_membership(admin.org, user_id, Some(role))
            .await?;
    }
    tracing::info!(org = %admin.org, %user_id, role = role.as_str(), by = %admin.sub, "membership set");
    let member = state
        .store
        .member(admin.org, user_id)
        .await?
        .ok_or_else(|| ApiError::conflict("the membership was removed meanwhile; try again"))?;
    Ok(Json(view(member)))
}

/// `DELETE /v1/org/members/{user_id}` (admin): `404` if not a member,
/// `409` for the org's last admin.
pub async fn remove_member(
    State(state): State<AppState>,
    OrgAdmin(admin): OrgAdmin,
    Path(raw): Path<String>,
) -> Result<StatusCode, ApiError> {
    let user_id: uuid::Uuid = raw
        .parse()
        .map_err(|_| ApiError::invalid("user_id", "must be a UUID"))?;
    if !state.store.remove_membership(admin.org, user_id).await? {
        return Err(ApiError::not_found(format!(
            "user {user_id} is not a member of this org"
        )));
    }
    tracing::info!(org = %admin.org, %user_id, by = %admin.sub, "membership removed");
    Ok(StatusCode::NO_CONTENT)
}

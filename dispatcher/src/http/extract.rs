//! The project's own extractors. Handlers use these, never axum's `Json` or
//! raw headers, so every rejection is the contract's error body.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE};
use axum::http::request::Parts;
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use super::error::ApiError;
use super::AppState;
use crate::domain::Role;
use crate::tokens::{TaskClaims, TokenKind, UserClaims, WorkerClaims};

/// A JSON body, parsed strictly: `Content-Type` must be JSON, the size limit
/// answers `413 payload_too_large`, and a parse error names the field. An
/// empty body reads as `{}` so that all-optional requests may omit it.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let json_type = req
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| {
                let mime = v.split(';').next().unwrap_or("").trim();
                mime.eq_ignore_ascii_case("application/json")
            });
        let limit = state.settings.max_body_bytes;
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::payload_too_large(limit)
            } else {
                ApiError::invalid("body", rejection.body_text())
            }
        })?;
        let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
            b"{}"
        } else {
            if json_type != Some(true) {
                return Err(ApiError::invalid(
                    "Content-Type",
                    "must be application/json",
                ));
            }
            &bytes
        };
        let mut de = serde_json::Deserializer::from_slice(bytes);
        let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let path = e.path().to_string();
            let field = if path == "." { "body".to_owned() } else { path };
            ApiError::invalid(&field, e.into_inner())
        })?;
        de.end().map_err(|e| ApiError::invalid("body", e))?;
        Ok(ApiJson(value))
    }
}

fn bearer(parts: &Parts) -> Result<&str, ApiError> {
    let value = parts
        .headers
        .get(AUTHORIZATION)
        .ok_or_else(|| ApiError::unauthenticated("missing Authorization header"))?
        .to_str()
        .map_err(|_| ApiError::unauthenticated("Authorization header is not ASCII"))?;
    let (scheme, token) = value
        .split_once(' ')
        .ok_or_else(|| ApiError::unauthenticated("Authorization must be `Bearer <token>`"))?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(ApiError::unauthenticated(
            "Authorization must be `Bearer <token>`",
        ));
    }
    Ok(token.trim())
}

/// A verified per-attempt capability token (`/v1/task/*`).
pub struct TaskAuth(pub TaskClaims);

/// A verified worker credential (`/internal/*`).
pub struct WorkerAuth(pub WorkerClaims);

/// A verified user token (`/v1/jobs*`). Membership is checked by the handler
/// against Postgres.
/// Who a user call is from: the user and the org it acts in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserIdentity {
    pub sub: uuid::Uuid,
    pub org: uuid::Uuid,
}

/// The header naming the org an identity-provider user acts in (a
/// dispatcher-signed user token names its org itself).
pub const ORG_HEADER: &str = "dispatcher-org";

pub struct UserAuth(pub UserIdentity);

// Each token extractor verifies the token, then admits the request under
// its rate limits. Extractors of the request parts run before the body is
// read, so a caller is authenticated (and limited) before its body is
// validated.

impl FromRequestParts<AppState> for TaskAuth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let claims: TaskClaims = state.keys.verify(bearer(parts)?, TokenKind::Task)?;
        state.limits.admit_task(claims.sub, claims.org)?;
        Ok(TaskAuth(claims))
    }
}

impl FromRequestParts<AppState> for WorkerAuth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let claims: WorkerClaims = state.keys.verify(bearer(parts)?, TokenKind::Worker)?;
        state.limits.admit_worker(&claims.sub)?;
        Ok(WorkerAuth(claims))
    }
}

impl FromRequestParts<AppState> for UserAuth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = bearer(parts)?;
        if let Some(idp) = &state.idp {
            // A token not signed by one of our keys may be the IdP's.
            let ours = jsonwebtoken::decode_header(token)
                .ok()
                .and_then(|h| h.kid)
                .is_some_and(|kid| state.keys.knows_kid(&kid));
            if !ours {
                let identity = idp.verify(token).await?;
                let user = signed_in_user(state, idp, &identity).await?;
                let org = match parts.headers.get(ORG_HEADER) {
                    Some(v) => v
                        .to_str()
                        .ok()
                        .and_then(|v| v.trim().parse::<uuid::Uuid>().ok())
                        .ok_or_else(|| {
                            ApiError::invalid(ORG_HEADER, "must be an org id (a UUID)")
                        })?,
                    None => state.store.sole_org(user).await?.ok_or_else(|| {
                        ApiError::invalid(
                            ORG_HEADER,
                            "name the org to act in: the user has accepted no membership or several \
                             (naming an org accepts its invitation)",
                        )
                    })?,
                };
                state.limits.admit_user(user, org)?;
                return Ok(UserAuth(UserIdentity { sub: user, org }));
            }
        }
        let claims: UserClaims = state.keys.verify(token, TokenKind::User)?;
        state.limits.admit_user(claims.sub, claims.org)?;
        Ok(UserAuth(UserIdentity {
            sub: claims.sub,
            org: claims.org,
        }))
    }
}

/// The user an IdP identity names (ADR 0012). A known identity is its
/// user. An unknown one is bound here, at its first sign-in, to the one
/// user whose e-mail is the token's verified e-mail and who has no identity
/// yet (the invitation it claims); nothing else ever binds an identity.
async fn signed_in_user(
    state: &AppState,
    idp: &crate::idp::Idp,
    identity: &crate::idp::IdpIdentity,
) -> Result<uuid::Uuid, ApiError> {
    let subject = &identity.subject;
    if let Some(user) = state.store.user_by_subject(idp.issuer(), subject).await? {
        return Ok(user);
    }
    let Some(email) = &identity.verified_email else {
        return Err(ApiError::forbidden(format!(
            "no user has the identity {subject:?}, and the token carries no verified e-mail \
             to claim an invitation with; an org admin invites members by e-mail"
        )));
    };
    match state
        .store
        .bind_identity_by_email(idp.issuer(), subject, email)
        .await?
    {
        Some(user) => {
            tracing::info!(%user, subject = %subject, "identity bound at first sign-in");
            Ok(user)
        }
        None => Err(ApiError::forbidden(format!(
            "no user has the identity {subject:?}, and no invited user without an identity \
             has the e-mail {email:?}; an org admin invites members by e-mail"
        ))),
    }
}

pub struct Member {
    pub user: UserIdentity,
    pub role: Role,
}

impl FromRequestParts<AppState> for Member {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let UserAuth(user) = UserAuth::from_request_parts(parts, state).await?;
        let role = state
            .store
            .member_role(user.org, user.sub)
            .await?
            .ok_or_else(|| {
                ApiError::forbidden(format!(
                    "user {} is not a member of org {}",
                    user.sub, user.org
                ))
            })?;
        Ok(Member { user, role })
    }
}

/// A member whose role may write: submit and cancel jobs, create datasets.
/// A caller that may read datasets: a member of the org (user token), or
/// a task (capability token), whose reach is its `reads`.
pub enum Reader {
    User(Member),
    Task(TaskClaims),
}

impl FromRequestParts<AppState> for Reader {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        // The unverified header only picks which verification to run; that
        // verification checks signature, audience and `typ` in full.
        let says_task = jsonwebtoken::decode_header(bearer(parts)?)
            .ok()
            .and_then(|h| h.typ)
            .as_deref()
            == Some(TokenKind::Task.typ());
        if says_task {
            let TaskAuth(claims) = TaskAuth::from_request_parts(parts, state).await?;
            Ok(Reader::Task(claims))
        } else {
            Ok(Reader::User(
                Member::from_request_parts(parts, state).await?,
            ))
        }
    }
}

pub struct Writer(pub UserIdentity);

impl FromRequestParts<AppState> for Writer {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let Member { user, role } = Member::from_request_parts(parts, state).await?;
        if !role.can_write_jobs() {
            return Err(ApiError::forbidden(format!(
                "role {} may read but not write (submit or cancel jobs, create datasets)",
                role.as_str()
            )));
        }
        Ok(Writer(user))
    }
}

/// A member whose role is admin (or owner): org administration.
pub struct OrgAdmin(pub UserIdentity);

impl FromRequestParts<AppState> for OrgAdmin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let Member { user, role } = Member::from_request_parts(parts, state).await?;
        if role < Role::Admin {
            return Err(ApiError::forbidden(format!(
                "role {} may not administer the org (admin needed)",
                role.as_str()
            )));
        }
        Ok(OrgAdmin(user))
    }
}

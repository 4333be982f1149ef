//! UDF bundles (issue 13): push an archive, read a bundle, tag one. The
//! archive is checked (`crate::bundles::inspect`) before it is stored, and
//! stored under the org and its digest; pushing it again changes nothing.

use axum::body::Bytes;
use axum::extract::{FromRequest, Path, Request, State};
use axum::http::StatusCode;
use axum::Json;
use dispatcher_wire as wire;

use super::error::ApiError;
use super::extract::{ApiJson, Member, Writer};
use super::AppState;
use crate::bundles;

/// `POST /v1/bundles`: the body is the archive (`bundle push` makes it).
pub async fn push(
    State(state): State<AppState>,
    Writer(user): Writer,
    req: Request,
) -> Result<(StatusCode, Json<wire::BundleView>), ApiError> {
    let limit = state.settings.bundle_max_bytes;
    let _slot = state.limits.bundle_push()?;
    let body = Bytes::from_request(req, &state)
        .await
        .map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::payload_too_large(limit)
            } else {
                ApiError::invalid("body", rejection.body_text())
            }
        })?;
    let max_unpacked = state.settings.bundle_max_unpacked_bytes;
    let archive = body.clone();
    let manifest = tokio::task::spawn_blocking(move || bundles::inspect(&archive, max_unpacked))
        .await
        .map_err(|_| ApiError::internal())?
        .map_err(|e| match e {
            bundles::BundleError::TooLarge(m) => {
                ApiError::too_large(format!("not a valid bundle: {m}"))
            }
            e => ApiError::invalid("body", format!("not a valid bundle: {e}")),
        })?;
    let digest = bundles::digest(&body);
    let key = bundles::object_key(user.org, &digest);
    let size = body.len() as u64;
    // The checker's clone is gone: this takes the buffer without a copy.
    state
        .objects
        .put(&key, Vec::from(body))
        .await
        .map_err(|e| {
            tracing::warn!(error = %e, "storing a bundle failed");
            ApiError::unavailable("the object store could not store the bundle")
        })?;
    let view = state
        .store
        .insert_bundle(user.org, Some(user.sub), &digest, &manifest, size, &key)
        .await?;
    tracing::info!(org = %user.org, digest, runtime = manifest.runtime.as_str(), size, "bundle pushed");
    Ok((StatusCode::CREATED, Json(view)))
}

/// `GET /v1/bundles/{bundle}`: by digest or tag.
pub async fn get(
    State(state): State<AppState>,
    Member { user, .. }: Member,
    Path(name): Path<String>,
) -> Result<Json<wire::BundleView>, ApiError> {
    if !bundles::is_digest(&name) && bundles::check_tag(&name).is_err() {
        return Err(ApiError::invalid(
            "bundle",
            "must be a digest (sha256:…) or a tag",
        ));
    }
    state
        .store
        .bundle(user.org, &name)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no bundle or tag {name:?}")))
}

/// `PUT /v1/bundles/tags/{tag}` with `{"digest": "sha256:…"}`.
pub async fn tag(
    State(state): State<AppState>,
    Writer(user): Writer,
    Path(tag): Path<String>,
    ApiJson(req): ApiJson<wire::BundleTagRequest>,
) -> Result<Json<wire::BundleView>, ApiError> {
    bundles::check_tag(&tag).map_err(|e| ApiError::invalid("tag", e))?;
    if !bundles::is_digest(&req.digest) {
        return Err(ApiError::invalid(
            "digest",
            "must be sha256: and 64 lowercase hex digits",
        ));
    }
    let view = state.store.tag_bundle(user.org, &tag, &req.digest).await?;
    tracing::info!(org = %user.org, tag, digest = req.digest, "bundle tagged");
    Ok(Json(view))
}

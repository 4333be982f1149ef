//! Alert destinations, routes, and the delivery state of an event
//! (ADR 0014). Destinations and routes are an admin's; any member reads
//! them and an event's deliveries.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use dispatcher_wire as wire;
use uuid::Uuid;

use super::error::ApiError;
use super::extract::{ApiJson, Member, OrgAdmin};
use super::AppState;
use crate::domain::Role;

fn name(field: &str, s: &str) -> Result<(), ApiError> {
    if s.trim().is_empty() || s.len() > 200 || s.chars().any(char::is_control) {
        return Err(ApiError::invalid(
            field,
            "must be 1 to 200 characters, no control",
        ));
    }
    Ok(())
}

pub async fn create_destination(
    State(state): State<AppState>,
    OrgAdmin(user): OrgAdmin,
    ApiJson(req): ApiJson<wire::CreateDestinationRequest>,
) -> Result<(StatusCode, Json<wire::AlertDestinationView>), ApiError> {
    name("name", &req.name)?;
    let url = reqwest::Url::parse(&req.url).map_err(|e| ApiError::invalid("url", e))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() || req.url.len() > 2048
    {
        return Err(ApiError::invalid(
            "url",
            "must be an http or https URL with a host",
        ));
    }
    let secret = match req.secret {
        Some(s) if crate::services::alerts::secret_key(&s).is_some() => s,
        Some(_) => {
            return Err(ApiError::invalid(
                "secret",
                "must be whsec_ followed by base64 of 24 to 64 bytes",
            ))
        }
        None => crate::services::alerts::new_secret(),
    };
    let view = state
        .store
        .create_alert_destination(user.org, req.name.trim(), url.as_str(), &secret)
        .await?;
    tracing::info!(org = %user.org, destination = view.name, "alert destination created");
    Ok((StatusCode::CREATED, Json(view)))
}

pub async fn destinations(
    State(state): State<AppState>,
    Member { user, role }: Member,
) -> Result<Json<serde_json::Value>, ApiError> {
    let mut list = state.store.alert_destinations(user.org).await?;
    // A webhook URL often carries its token in the path or query (Slack's
    // does): only admins, who set it, read it whole; others see where it
    // goes (review M11).
    if role < Role::Admin {
        for d in &mut list {
            d.url = origin_only(&d.url);
        }
    }
    Ok(Json(serde_json::json!({"destinations": list})))
}

pub async fn create_route(
    State(state): State<AppState>,
    OrgAdmin(user): OrgAdmin,
    ApiJson(req): ApiJson<wire::CreateRouteRequest>,
) -> Result<(StatusCode, Json<wire::AlertRouteView>), ApiError> {
    name("name", &req.name)?;
    let dataset = crate::domain::dataset_name("dataset", &req.dataset)?;
    let (dataset_id, mode, columns, _) = state.store.dataset_for_query(user.org, &dataset).await?;
    if mode != wire::DatasetMode::Stream {
        return Err(ApiError::invalid(
            "dataset",
            format!(
                "{dataset:?} is a {} dataset; routes read stream datasets",
                mode.as_str()
            ),
        ));
    }
    crate::services::alerts::matcher_plan(&dataset, &columns, req.matcher.as_ref())?;
    let id = state
        .store
        .create_alert_route(
            user.org,
            req.name.trim(),
            dataset_id,
            &req.destination,
            req.matcher.as_ref(),
        )
        .await?;
    let view = state
        .store
        .alert_route_views(user.org)
        .await?
        .into_iter()
        .find(|r| r.id == id)
        .ok_or_else(ApiError::internal)?;
    tracing::info!(org = %user.org, route = view.name, "alert route created");
    Ok((StatusCode::CREATED, Json(view)))
}

pub async fn routes(
    State(state): State<AppState>,
    Member { user, .. }: Member,
) -> Result<Json<serde_json::Value>, ApiError> {
    let list = state.store.alert_route_views(user.org).await?;
    Ok(Json(serde_json::json!({"routes": list})))
}

pub async fn delete_route(
    State(state): State<AppState>,
    OrgAdmin(user): OrgAdmin,
    Path(raw): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id = Uuid::parse_str(&raw).map_err(|e| ApiError::invalid("route_id", e))?;
    state.store.delete_alert_route(user.org, id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /v1/alerts/events/{event_id}`: where each delivery of the event is.
pub async fn event(
    State(state): State<AppState>,
    Member { user, .. }: Member,
    Path(event_id): Path<String>,
) -> Result<Json<wire::EventDeliveries>, ApiError> {
    let valid = event_id.len() > 37
        && Uuid::parse_str(&event_id[..36]).is_ok()
        && event_id.as_bytes()[36] == b'-'
        && event_id[37..].parse::<u32>().is_ok();
    if !valid {
        return Err(ApiError::invalid("event_id", "must be <batch id>-<line>"));
    }
    let data = state
        .data
        .as_ref()
        .ok_or_else(|| ApiError::unavailable("the data database is not configured"))?;
    let deliveries =
        crate::services::alerts::event_deliveries(&state.store, data, user.org, &event_id).await?;
    if deliveries.is_empty() {
        return Err(ApiError::not_found(format!(
            "no deliveries of event {event_id}"
        )));
    }
    Ok(Json(wire::EventDeliveries {
        event_id,
        deliveries,
    }))
}

/// `scheme://host[:port]/…`: where a URL goes, without its path and query.
fn origin_only(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(u) => format!("{}/…", u.origin().ascii_serialization()),
        Err(_) => "(hidden)".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_destination_url_shown_to_non_admins_keeps_only_its_origin() {
        assert_eq!(
            super::origin_only("https://hooks.slack.com/services/T0/B0/secret?x=1"),
            "https://hooks.slack.com/…"
        );
        assert_eq!(
            super::origin_only("http://user:pw@example.com:8080/p"),
            "http://example.com:8080/…"
        );
        assert_eq!(super::origin_only("not a url"), "(hidden)");
    }
}

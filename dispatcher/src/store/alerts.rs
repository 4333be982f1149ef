//! Alert destinations and routes (state database). Events and deliveries
//! live in the data database (`crate::services::alerts`).

use chrono::{DateTime, Utc};
use dispatcher_wire::{AlertDestinationView, AlertRouteView, Column};
use serde_json::Value;
use uuid::Uuid;

use super::Store;
use crate::domain::Invalid;
use crate::error::StoreError;

/// A route as the router uses it.
#[derive(Debug, Clone)]
pub struct RouteSpec {
    pub id: Uuid,
    pub org_id: Uuid,
    pub name: String,
    pub dataset_id: Uuid,
    pub dataset: String,
    pub columns: Vec<Column>,
    pub destination_id: Uuid,
    pub matcher: Option<Value>,
    /// A route receives only batches ingested from then on (review M3).
    pub created_at: DateTime<Utc>,
}

/// Where a delivery goes.
#[derive(Debug, Clone)]
pub struct Destination {
    pub url: String,
    pub secret: String,
}

struct RouteRow {
    id: Uuid,
    org_id: Uuid,
    name: String,
    dataset_id: Uuid,
    dataset: String,
    columns: Value,
    destination_id: Uuid,
    matcher: Option<Value>,
    created_at: DateTime<Utc>,
}

struct RouteViewRow {
    id: Uuid,
    name: String,
    dataset: String,
    destination: String,
    matcher: Option<Value>,
    created_at: DateTime<Utc>,
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|d| d.code())
        .is_some_and(|c| c == "23505")
}

impl Store {
    pub async fn create_alert_destination(
        &self,
        org_id: Uuid,
        name: &str,
        url: &str,
        secret: &str,
    ) -> Result<AlertDestinationView, StoreError> {
        let id = Uuid::now_v7();
        let created: Result<DateTime<Utc>, sqlx::Error> = sqlx::query_scalar!(
            "INSERT INTO alert_destinations (id, org_id, name, url, secret)
             VALUES ($1, $2, $3, $4, $5) RETURNING created_at",
            id,
            org_id,
            name,
            url,
            secret,
        )
        .fetch_one(&self.pool)
        .await;
        match created {
            Ok(created_at) => Ok(AlertDestinationView {
                id,
                name: name.to_owned(),
                url: url.to_owned(),
                secret: Some(secret.to_owned()),
                created_at,
            }),
            Err(e) if is_unique_violation(&e) => Err(StoreError::Conflict(format!(
                "a destination named {name:?} exists"
            ))),
            Err(e) => Err(e.into()),
        }
    }

    /// The org's destinations (their secrets are not answered again).
    pub async fn alert_destinations(
        &self,
        org_id: Uuid,
    ) -> Result<Vec<AlertDestinationView>, StoreError> {
        let rows = sqlx::query!(
            "SELECT id, name, url, created_at FROM alert_destinations WHERE org_id = $1 ORDER BY name",
            org_id,
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| AlertDestinationView {
                id: r.id,
                name: r.name,
                url: r.url,
                secret: None,
                created_at: r.created_at,
            })
            .collect())
    }

    /// Where a delivery to `destination_id` goes, if it still exists.
    pub async fn alert_destination(
        &self,
        destination_id: Uuid,
    ) -> Result<Option<Destination>, StoreError> {
        let row = sqlx::query!(
            "SELECT url, secret FROM alert_destinations WHERE id = $1",
            destination_id,
        )
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| Destination {
            url: r.url,
            secret: r.secret,
        }))
    }

    /// Makes a route of the org: events of its stream `dataset` matching
    /// `matcher` (already checked against the schema) go to the
    /// destination named `destination`.
    pub async fn create_alert_route(
        &self,
        org_id: Uuid,
        name: &str,
        dataset_id: Uuid,
        destination: &str,
        matcher: Option<&Value>,
    ) -> Result<Uuid, StoreError> {
        let id = Uuid::now_v7();
        let done = sqlx::query!(
            "INSERT INTO alert_routes (id, org_id, name, dataset_id, destination_id, matcher)
             SELECT $1, $2, $3, $4, d.id, $6 FROM alert_destinations d
              WHERE d.org_id = $2 AND d.name = $5",
            id,
            org_id,
            name,
            dataset_id,
            destination,
            matcher,
        )
        .execute(&self.pool)
        .await;
        match done {
            Ok(r) if r.rows_affected() == 0 => Err(StoreError::Invalid(Invalid::new(
                "destination",
                format!("no destination named {destination:?} in this org"),
            ))),
            Ok(_) => Ok(id),
            Err(e) if is_unique_violation(&e) => Err(StoreError::Conflict(format!(
                "a route named {name:?} exists"
            ))),
            Err(e) => Err(e.into()),
        }
    }

    /// Routes of one org (`Some`) or of every org (`None`, the router's).
    pub async fn alert_routes(&self, org_id: Option<Uuid>) -> Result<Vec<RouteSpec>, StoreError> {
        let rows: Vec<RouteRow> = sqlx::query_as!(
            RouteRow,
            "SELECT r.id, r.org_id, r.name, r.dataset_id, d.name AS dataset, d.columns,
                    r.destination_id, r.matcher, r.created_at
               FROM alert_routes r JOIN datasets d ON d.id = r.dataset_id
              WHERE $1::uuid IS NULL OR r.org_id = $1
              ORDER BY r.org_id, r.name",
            org_id,
        )
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|r| {
                Ok(RouteSpec {
                    id: r.id,
                    org_id: r.org_id,
                    name: r.name,
                    dataset_id: r.dataset_id,
                    dataset: r.dataset,
                    columns: serde_json::from_value(r.columns)
                        .map_err(|e| StoreError::Db(sqlx::Error::Decode(e.to_string().into())))?,
                    destination_id: r.destination_id,
                    matcher: r.matcher,
                    created_at: r.created_at,
                })
            })
            .collect()
    }

    /// The org's routes as the API answers them.
    pub async fn alert_route_views(&self, org_id: Uuid) -> Result<Vec<AlertRouteView>, StoreError> {
        let rows: Vec<RouteViewRow> = sqlx::query_as!(
            RouteViewRow,
            "SELECT r.id, r.name, d.name AS dataset, x.name AS destination, r.matcher, r.created_at
               FROM alert_routes r JOIN datasets d ON d.id = r.dataset_id
               JOIN alert_destinations x ON x.id = r.destination_id
              WHERE r.org_id = $1 ORDER BY r.name",
            org_id,
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| AlertRouteView {
                id: r.id,
                name: r.name,
                dataset: r.dataset,
                destination: r.destination,
                matcher: r.matcher,
                created_at: r.created_at,
            })
            .collect())
    }

    pub async fn delete_alert_route(&self, org_id: Uuid, route_id: Uuid) -> Result<(), StoreError> {
        let done = sqlx::query!(
            "DELETE FROM alert_routes WHERE org_id = $1 AND id = $2",
            org_id,
            route_id,
        )
        .execute(&self.pool)
        .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("no route {route_id}")));
        }
        Ok(())
    }
}

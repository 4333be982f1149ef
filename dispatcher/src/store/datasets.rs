//! The dataset registry: datasets of an org, their committed versions and
//! manifests. Every query is scoped by org in the same statement: another
//! org's dataset is simply not found.

use chrono::{DateTime, Utc};
use dispatcher_wire::{Column, DatasetMode, DatasetView, ManifestView, PartView, VersionView};
use serde_json::Value;
use uuid::Uuid;

use super::Store;
use crate::domain::NewDataset;
use crate::error::StoreError;

/// Versions listed by `GET /v1/datasets/{name}`, newest first.
const VERSIONS_SHOWN: i64 = 1_000;

#[derive(sqlx::FromRow)]
struct DatasetRow {
    id: Uuid,
    name: String,
    mode: String,
    columns: Value,
    current_version: Option<i32>,
    created_at: DateTime<Utc>,
}

impl DatasetRow {
    fn view(self, versions: Vec<VersionView>) -> Result<DatasetView, StoreError> {
        let decode = |m: String| StoreError::Db(sqlx::Error::Decode(m.into()));
        Ok(DatasetView {
            mode: DatasetMode::parse(&self.mode)
                .ok_or_else(|| decode(format!("unknown dataset mode {:?}", self.mode)))?,
            columns: serde_json::from_value::<Vec<Column>>(self.columns)
                .map_err(|e| decode(format!("stored columns: {e}")))?,
            name: self.name,
            current_version: self.current_version.and_then(|v| u32::try_from(v).ok()),
            versions,
            created_at: self.created_at,
        })
    }
}

#[derive(sqlx::FromRow)]
struct VersionRow {
    version: i32,
    parent: Option<i32>,
    task_id: Uuid,
    attempt: i32,
    rows: i64,
    committed_at: DateTime<Utc>,
}

fn u32_of(n: i32) -> u32 {
    u32::try_from(n).unwrap_or(0)
}

fn u64_of(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

impl Store {
    /// Creates a dataset in `org_id`; a name already used there is a
    /// conflict.
    pub async fn create_dataset(
        &self,
        org_id: Uuid,
        created_by: Uuid,
        ds: &NewDataset,
    ) -> Result<DatasetView, StoreError> {
        let columns = serde_json::to_value(&ds.columns)
            .map_err(|e| StoreError::Db(sqlx::Error::Encode(e.into())))?;
        let row: Option<DatasetRow> = sqlx::query_as(
            "INSERT INTO datasets (id, org_id, name, mode, columns, created_by)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (org_id, name) DO NOTHING
             RETURNING id, name, mode, columns, current_version, created_at",
        )
        .bind(Uuid::now_v7())
        .bind(org_id)
        .bind(&ds.name)
        .bind(ds.mode.as_str())
        .bind(&columns)
        .bind(created_by)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(row) => row.view(Vec::new()),
            None => Err(StoreError::Conflict(format!(
                "a dataset named {:?} already exists in this org",
                ds.name
            ))),
        }
    }

    async fn dataset_row(&self, org_id: Uuid, name: &str) -> Result<DatasetRow, StoreError> {
        sqlx::query_as(
            "SELECT id, name, mode, columns, current_version, created_at
               FROM datasets WHERE org_id = $1 AND name = $2",
        )
        .bind(org_id)
        .bind(name)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("no dataset {name:?}")))
    }

    /// The org's datasets, by name, without their versions.
    pub async fn list_datasets(&self, org_id: Uuid) -> Result<Vec<DatasetView>, StoreError> {
        let rows: Vec<DatasetRow> = sqlx::query_as(
            "SELECT id, name, mode, columns, current_version, created_at
               FROM datasets WHERE org_id = $1 ORDER BY name",
        )
        .bind(org_id)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(|r| r.view(Vec::new())).collect()
    }

    /// A dataset of the org with its newest versions.
    pub async fn get_dataset(&self, org_id: Uuid, name: &str) -> Result<DatasetView, StoreError> {
        let row = self.dataset_row(org_id, name).await?;
        let versions: Vec<VersionRow> = sqlx::query_as(
            "SELECT version, parent, task_id, attempt, rows, committed_at
               FROM dataset_versions WHERE dataset_id = $1
              ORDER BY version DESC LIMIT $2",
        )
        .bind(row.id)
        .bind(VERSIONS_SHOWN)
        .fetch_all(&self.pool)
        .await?;
        let versions = versions
            .into_iter()
            .map(|v| VersionView {
                version: u32_of(v.version),
                parent: v.parent.map(u32_of),
                task_id: v.task_id,
                attempt: u32_of(v.attempt),
                rows: u64_of(v.rows),
                committed_at: v.committed_at,
            })
            .collect();
        row.view(versions)
    }

    /// Which of `keys` are parts of a committed version of one of the
    /// org's datasets named in `datasets`.
    pub async fn readable_parts(
        &self,
        org_id: Uuid,
        datasets: &[String],
        keys: &[String],
    ) -> Result<std::collections::HashSet<String>, StoreError> {
        if keys.is_empty() || datasets.is_empty() {
            return Ok(Default::default());
        }
        let found: Vec<String> = sqlx::query_scalar(
            "SELECT DISTINCT p.key FROM dataset_parts p
               JOIN datasets d ON d.id = p.dataset_id
              WHERE d.org_id = $1 AND d.name = ANY($2) AND p.key = ANY($3)",
        )
        .bind(org_id)
        .bind(datasets)
        .bind(keys)
        .fetch_all(&self.pool)
        .await?;
        Ok(found.into_iter().collect())
    }

    /// The manifest of a committed version: an `append` version's parts are
    /// those added by it and every earlier version; a `replace` version's
    /// only its own.
    pub async fn manifest(
        &self,
        org_id: Uuid,
        name: &str,
        version: u32,
    ) -> Result<ManifestView, StoreError> {
        let row = self.dataset_row(org_id, name).await?;
        let v = i32::try_from(version).unwrap_or(i32::MAX);
        let head: Option<(Option<i32>, i64)> = sqlx::query_as(
            "SELECT parent, rows FROM dataset_versions WHERE dataset_id = $1 AND version = $2",
        )
        .bind(row.id)
        .bind(v)
        .fetch_optional(&self.pool)
        .await?;
        let Some((parent, rows)) = head else {
            return Err(StoreError::NotFound(format!(
                "dataset {name:?} has no version {version}"
            )));
        };
        let parts: Vec<(String, i64, i64, String)> = sqlx::query_as(
            "SELECT key, rows, bytes, sha256 FROM dataset_parts
              WHERE dataset_id = $1
                AND CASE WHEN $3 = 'append' THEN version <= $2 ELSE version = $2 END
              ORDER BY version, key",
        )
        .bind(row.id)
        .bind(v)
        .bind(&row.mode)
        .fetch_all(&self.pool)
        .await?;
        Ok(ManifestView {
            version,
            parent: parent.map(u32_of),
            rows: u64_of(rows),
            parts: parts
                .into_iter()
                .map(|(key, rows, bytes, sha256)| PartView {
                    key,
                    rows: u64_of(rows),
                    bytes: u64_of(bytes),
                    sha256,
                })
                .collect(),
        })
    }
}

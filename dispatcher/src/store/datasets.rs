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

/// A part an attempt stages, verified by the caller.
#[derive(Debug, Clone)]
pub struct NewPart {
    pub key: String,
    pub rows: i64,
    pub bytes: i64,
    pub sha256: String,
}

/// What an attempt staged for one dataset: the manifest's content.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct StagedDataset {
    pub dataset_id: Uuid,
    pub dataset: String,
    pub task_id: Uuid,
    pub attempt: u32,
    pub parts: Vec<PartView>,
}

/// A manifest written (create-only) before the completion's transaction.
#[derive(Debug, Clone)]
pub struct WrittenManifest {
    pub dataset_id: Uuid,
    pub key: String,
    /// The part keys the manifest lists, sorted: the version must hold
    /// exactly these (review M1).
    pub parts: Vec<String>,
}

impl Store {
    /// The datasets the attempt staged parts for, with those parts, by
    /// dataset id.
    pub async fn staged_datasets(
        &self,
        task_id: Uuid,
        attempt: u32,
    ) -> Result<Vec<StagedDataset>, StoreError> {
        let rows: Vec<(Uuid, String, String, i64, i64, String)> = sqlx::query!(
            "SELECT s.dataset_id, d.name, s.key, s.rows, s.bytes, s.sha256
               FROM staged_parts s JOIN datasets d ON d.id = s.dataset_id
              WHERE s.task_id = $1 AND s.attempt = $2
              ORDER BY s.dataset_id, s.key",
            task_id,
            i32::try_from(attempt).unwrap_or(i32::MAX),
        )
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(|r| (r.dataset_id, r.name, r.key, r.rows, r.bytes, r.sha256))
        .collect();
        let mut out: Vec<StagedDataset> = Vec::new();
        for (dataset_id, name, key, rows, bytes, sha256) in rows {
            if out.last().map(|d| d.dataset_id) != Some(dataset_id) {
                out.push(StagedDataset {
                    dataset_id,
                    dataset: name,
                    task_id,
                    attempt,
                    parts: Vec::new(),
                });
            }
            if let Some(last) = out.last_mut() {
                last.parts.push(PartView {
                    key,
                    rows: u64_of(rows),
                    bytes: u64_of(bytes),
                    sha256,
                });
            }
        }
        Ok(out)
    }

    /// Which of `attempts` (task, attempt) have staged parts: one query
    /// for a whole completion batch, so that only those look further.
    pub async fn attempts_with_staged_parts(
        &self,
        attempts: &[(Uuid, u32)],
    ) -> Result<std::collections::HashSet<(Uuid, u32)>, StoreError> {
        if attempts.is_empty() {
            return Ok(Default::default());
        }
        let (tasks, numbers): (Vec<Uuid>, Vec<i32>) = attempts
            .iter()
            .map(|&(t, a)| (t, i32::try_from(a).unwrap_or(i32::MAX)))
            .unzip();
        let found: Vec<(Uuid, i32)> = sqlx::query!(
            "SELECT DISTINCT s.task_id, s.attempt
               FROM unnest($1::uuid[], $2::int[]) AS i(task_id, attempt)
               JOIN staged_parts s ON s.task_id = i.task_id AND s.attempt = i.attempt",
            &tasks,
            &numbers,
        )
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(|r| (r.task_id, r.attempt))
        .collect();
        Ok(found
            .into_iter()
            .map(|(t, a)| (t, u32::try_from(a).unwrap_or(0)))
            .collect())
    }

    /// Which of `keys` something must keep: a part of a committed version,
    /// a committed version's manifest, or a buffer batch.
    pub async fn referenced_objects(
        &self,
        keys: &[String],
    ) -> Result<std::collections::HashSet<String>, StoreError> {
        let found: Vec<String> = sqlx::query_scalar!(
            r#"SELECT key AS "key!" FROM dataset_parts WHERE key = ANY($1)
               UNION SELECT manifest_key FROM dataset_versions WHERE manifest_key = ANY($1)
               UNION SELECT object_key FROM buffer_publishes WHERE object_key = ANY($1)"#,
            keys,
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(found.into_iter().collect())
    }

    /// For each attempt, whether it ended longer than `ago` ago (by
    /// Postgres' clock). Attempts still running, or not yet recorded, are
    /// false; one whose job the pruner deleted (no task row is left) counts
    /// as ended.
    pub async fn attempts_ended_before(
        &self,
        attempts: &[(Uuid, u32)],
        ago: std::time::Duration,
    ) -> Result<std::collections::HashMap<(Uuid, u32), bool>, StoreError> {
        let tasks: Vec<Uuid> = attempts.iter().map(|a| a.0).collect();
        let numbers: Vec<i32> = attempts
            .iter()
            .map(|a| i32::try_from(a.1).unwrap_or(i32::MAX))
            .collect();
        let rows: Vec<(Uuid, i32, bool)> = sqlx::query!(
            r#"SELECT w.task_id AS "task_id!", w.attempt AS "attempt!",
                    CASE WHEN a.task_id IS NOT NULL
                         THEN a.finished_at IS NOT NULL
                              AND a.finished_at < now() - $3 * interval '1 millisecond'
                         -- The job was pruned (it finished a retention ago).
                         ELSE NOT EXISTS (SELECT 1 FROM tasks t WHERE t.id = w.task_id)
                    END AS "ended!"
               FROM unnest($1::uuid[], $2::int[]) AS w(task_id, attempt)
               LEFT JOIN attempts a ON a.task_id = w.task_id AND a.attempt = w.attempt"#,
            &tasks,
            &numbers,
            crate::millis(ago) as f64,
        )
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(|r| (r.task_id, r.attempt, r.ended))
        .collect();
        Ok(rows
            .into_iter()
            .map(|(t, n, ended)| ((t, u32::try_from(n).unwrap_or(0)), ended))
            .collect())
    }

    /// A dataset's id, mode and columns, if the org has it.
    pub async fn dataset_schema(
        &self,
        org_id: Uuid,
        name: &str,
    ) -> Result<(Uuid, DatasetMode, Vec<Column>), StoreError> {
        let row = self.dataset_row(org_id, name).await?;
        let id = row.id;
        let view = row.view(Vec::new())?;
        Ok((id, view.mode, view.columns))
    }

    /// Every committed part of the org's datasets named in `datasets`.
    pub async fn committed_part_keys(
        &self,
        org_id: Uuid,
        datasets: &[String],
    ) -> Result<Vec<String>, StoreError> {
        if datasets.is_empty() {
            return Ok(Vec::new());
        }
        Ok(sqlx::query_scalar!(
            "SELECT DISTINCT p.key FROM dataset_parts p
               JOIN datasets d ON d.id = p.dataset_id
              WHERE d.org_id = $1 AND d.name = ANY($2) ORDER BY p.key",
            org_id,
            datasets,
        )
        .fetch_all(&self.pool)
        .await?)
    }

    /// What a query needs of a dataset: id, mode, columns and the current
    /// version (`None` before the first commit).
    pub async fn dataset_for_query(
        &self,
        org_id: Uuid,
        name: &str,
    ) -> Result<(Uuid, DatasetMode, Vec<Column>, Option<u32>), StoreError> {
        let row = self.dataset_row(org_id, name).await?;
        let id = row.id;
        let current = row.current_version.and_then(|v| u32::try_from(v).ok());
        let view = row.view(Vec::new())?;
        Ok((id, view.mode, view.columns, current))
    }

    /// Records parts staged by the fenced attempt for a dataset, in one
    /// statement with the fence. Staging a part again with the same size,
    /// rows and checksum changes nothing; with others it is a conflict and
    /// nothing of the call is staged. Returns how many parts the attempt
    /// has staged for the dataset.
    pub async fn stage_parts(
        &self,
        fence: super::Fence,
        dataset_id: Uuid,
        parts: &[NewPart],
    ) -> Result<u32, StoreError> {
        let keys: Vec<&str> = parts.iter().map(|p| p.key.as_str()).collect();
        let rows: Vec<i64> = parts.iter().map(|p| p.rows).collect();
        let bytes: Vec<i64> = parts.iter().map(|p| p.bytes).collect();
        let sums: Vec<&str> = parts.iter().map(|p| p.sha256.as_str()).collect();
        let attempt = i32::try_from(fence.attempt).unwrap_or(i32::MAX);
        let mut tx = self.pool.begin().await?;
        let staged = sqlx::query!(
            r#"WITH fence AS (
                 SELECT id FROM tasks
                  WHERE id = $1 AND job_id = $2 AND attempt = $3
                    AND state = 'leased' AND lease_expires_at > clock_timestamp()
                    FOR SHARE
             ), given AS (
                 SELECT * FROM unnest($5::text[], $6::bigint[], $7::bigint[], $8::text[])
                          AS p(key, rows, bytes, sha256)
             ), ins AS (
                 INSERT INTO staged_parts (task_id, attempt, dataset_id, key, rows, bytes, sha256)
                 SELECT $1, $3, $4, g.key, g.rows, g.bytes, g.sha256 FROM given g
                  WHERE EXISTS (SELECT 1 FROM fence)
                     ON CONFLICT (task_id, attempt, dataset_id, key) DO NOTHING
                 RETURNING key
             )
             SELECT EXISTS (SELECT 1 FROM fence) AS "live!",
                    (SELECT s.key FROM staged_parts s JOIN given g ON g.key = s.key
                      WHERE s.task_id = $1 AND s.attempt = $3 AND s.dataset_id = $4
                        AND (s.rows, s.bytes, s.sha256) IS DISTINCT FROM (g.rows, g.bytes, g.sha256)
                      LIMIT 1) AS differing"#,
            fence.task_id,
            fence.job_id,
            attempt,
            dataset_id,
            &keys as _,
            &rows,
            &bytes,
            &sums as _,
        )
        .fetch_one(&mut *tx)
        .await?;
        let (live, differing) = (staged.live, staged.differing);
        if !live {
            let err = super::tasks::fence_error(&mut tx, fence).await;
            tx.rollback().await?;
            return Err(err);
        }
        if let Some(key) = differing {
            tx.rollback().await?;
            return Err(StoreError::Conflict(format!(
                "part {key:?} was already staged by this attempt with another size, row count \
                 or checksum; nothing of this call was staged"
            )));
        }
        let total: i64 = sqlx::query_scalar!(
            r#"SELECT count(*) AS "n!" FROM staged_parts WHERE task_id = $1 AND attempt = $2 AND dataset_id = $3"#,
            fence.task_id,
            attempt,
            dataset_id,
        )
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(u32::try_from(total).unwrap_or(u32::MAX))
    }

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
        let row: Option<DatasetRow> = sqlx::query_as!(
            DatasetRow,
            "INSERT INTO datasets (id, org_id, name, mode, columns, created_by)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (org_id, name) DO NOTHING
             RETURNING id, name, mode, columns, current_version, created_at",
            Uuid::now_v7(),
            org_id,
            &ds.name,
            ds.mode.as_str(),
            &columns,
            created_by,
        )
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
        sqlx::query_as!(
            DatasetRow,
            "SELECT id, name, mode, columns, current_version, created_at
               FROM datasets WHERE org_id = $1 AND name = $2",
            org_id,
            name,
        )
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("no dataset {name:?}")))
    }

    /// The org's datasets, by name, without their versions.
    pub async fn list_datasets(&self, org_id: Uuid) -> Result<Vec<DatasetView>, StoreError> {
        let rows: Vec<DatasetRow> = sqlx::query_as!(
            DatasetRow,
            "SELECT id, name, mode, columns, current_version, created_at
               FROM datasets WHERE org_id = $1 ORDER BY name",
            org_id,
        )
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(|r| r.view(Vec::new())).collect()
    }

    /// A dataset of the org with its newest versions.
    pub async fn get_dataset(&self, org_id: Uuid, name: &str) -> Result<DatasetView, StoreError> {
        let row = self.dataset_row(org_id, name).await?;
        let versions: Vec<VersionRow> = sqlx::query_as!(
            VersionRow,
            "SELECT version, parent, task_id, attempt, rows, committed_at
               FROM dataset_versions WHERE dataset_id = $1
              ORDER BY version DESC LIMIT $2",
            row.id,
            VERSIONS_SHOWN,
        )
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
        let found: Vec<String> = sqlx::query_scalar!(
            "SELECT DISTINCT p.key FROM dataset_parts p
               JOIN datasets d ON d.id = p.dataset_id
              WHERE d.org_id = $1 AND d.name = ANY($2) AND p.key = ANY($3)",
            org_id,
            datasets,
            keys,
        )
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
        let head: Option<(Option<i32>, i64)> = sqlx::query!(
            "SELECT parent, rows FROM dataset_versions WHERE dataset_id = $1 AND version = $2",
            row.id,
            v,
        )
        .fetch_optional(&self.pool)
        .await?
        .map(|r| (r.parent, r.rows));
        let Some((parent, rows)) = head else {
            return Err(StoreError::NotFound(format!(
                "dataset {name:?} has no version {version}"
            )));
        };
        let parts: Vec<(String, i64, i64, String)> = sqlx::query!(
            "SELECT key, rows, bytes, sha256 FROM dataset_parts
              WHERE dataset_id = $1
                AND CASE WHEN $3 = 'append' THEN version <= $2 ELSE version = $2 END
              ORDER BY version, key",
            row.id,
            v,
            &row.mode,
        )
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(|r| (r.key, r.rows, r.bytes, r.sha256))
        .collect();
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

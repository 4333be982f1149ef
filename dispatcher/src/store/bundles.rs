//! Bundles an org has pushed, and its tags. A task names a bundle by
//! digest or tag; the tag is resolved once, when its job is submitted.

use chrono::{DateTime, Utc};
use dispatcher_wire::{BundleManifest, BundleView, Runtime};
use uuid::Uuid;

use super::Store;
use crate::domain::Invalid;
use crate::error::StoreError;

struct BundleRow {
    digest: String,
    runtime: String,
    handler: String,
    memory_mb: Option<i32>,
    timeout_seconds: Option<i32>,
    size_bytes: i64,
    created_at: DateTime<Utc>,
    tags: Vec<String>,
}

impl BundleRow {
    fn view(self) -> Result<BundleView, StoreError> {
        Ok(BundleView {
            runtime: Runtime::parse(&self.runtime).ok_or_else(|| {
                StoreError::Db(sqlx::Error::Decode(
                    format!("unknown runtime {:?}", self.runtime).into(),
                ))
            })?,
            digest: self.digest,
            handler: self.handler,
            memory_mb: self.memory_mb.and_then(|m| u32::try_from(m).ok()),
            timeout_seconds: self.timeout_seconds.and_then(|m| u32::try_from(m).ok()),
            size_bytes: u64::try_from(self.size_bytes).unwrap_or(0),
            created_at: self.created_at,
            tags: self.tags,
        })
    }
}

/// A task's bundle as its job is submitted: the digest it runs and the
/// bundle's default timeout.
pub struct ResolvedBundle {
    pub digest: String,
    pub timeout_seconds: Option<u32>,
}

impl Store {
    /// Records a bundle whose archive is stored at `object_key`. Pushing
    /// the same archive again changes nothing and answers the same.
    pub async fn insert_bundle(
        &self,
        org_id: Uuid,
        created_by: Option<Uuid>,
        digest: &str,
        manifest: &BundleManifest,
        size_bytes: u64,
        object_key: &str,
    ) -> Result<BundleView, StoreError> {
        sqlx::query!(
            "INSERT INTO bundles (org_id, digest, runtime, handler, memory_mb, timeout_seconds,
                                  size_bytes, object_key, created_by)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
             ON CONFLICT (org_id, digest) DO NOTHING",
            org_id,
            digest,
            manifest.runtime.as_str(),
            &manifest.handler,
            manifest
                .memory_mb
                .map(|m| i32::try_from(m).unwrap_or(i32::MAX)),
            manifest
                .timeout_seconds
                .map(|m| i32::try_from(m).unwrap_or(i32::MAX)),
            i64::try_from(size_bytes).unwrap_or(i64::MAX),
            object_key,
            created_by,
        )
        .execute(&self.pool)
        .await?;
        self.bundle(org_id, digest)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("no bundle {digest}")))
    }

    /// One of the org's bundles, by digest or tag.
    pub async fn bundle(&self, org_id: Uuid, name: &str) -> Result<Option<BundleView>, StoreError> {
        let row = sqlx::query_as!(
            BundleRow,
            r#"SELECT b.digest, b.runtime, b.handler, b.memory_mb, b.timeout_seconds,
                      b.size_bytes, b.created_at,
                      ARRAY(SELECT t.name FROM bundle_tags t
                             WHERE t.org_id = b.org_id AND t.digest = b.digest
                             ORDER BY t.name) AS "tags!"
                 FROM bundles b
                WHERE b.org_id = $1
                  AND b.digest = COALESCE((SELECT digest FROM bundle_tags
                                            WHERE org_id = $1 AND name = $2), $2)"#,
            org_id,
            name,
        )
        .fetch_optional(&self.pool)
        .await?;
        row.map(BundleRow::view).transpose()
    }

    /// Points the org's tag `name` at one of its bundles (moving it if it
    /// named another).
    pub async fn tag_bundle(
        &self,
        org_id: Uuid,
        name: &str,
        digest: &str,
    ) -> Result<BundleView, StoreError> {
        let done = sqlx::query!(
            "INSERT INTO bundle_tags (org_id, name, digest)
             SELECT org_id, $2, digest FROM bundles WHERE org_id = $1 AND digest = $3
             ON CONFLICT (org_id, name) DO UPDATE SET digest = EXCLUDED.digest, updated_at = now()",
            org_id,
            name,
            digest,
        )
        .execute(&self.pool)
        .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("no bundle {digest}")));
        }
        self.bundle(org_id, digest)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("no bundle {digest}")))
    }
}

/// Resolves the bundle a task names (digest or tag) within its org, and
/// checks that the bundle is of the task's runtime.
pub(super) async fn resolve(
    tx: &mut sqlx::PgConnection,
    org_id: Uuid,
    field: &str,
    runtime: Runtime,
    name: &str,
) -> Result<ResolvedBundle, StoreError> {
    let row = sqlx::query!(
        "SELECT b.digest, b.runtime, b.timeout_seconds FROM bundles b
          WHERE b.org_id = $1
            AND b.digest = COALESCE((SELECT digest FROM bundle_tags WHERE org_id = $1 AND name = $2), $2)",
        org_id,
        name,
    )
    .fetch_optional(&mut *tx)
    .await?
    .map(|r| (r.digest, r.runtime, r.timeout_seconds));
    let Some((digest, bundle_runtime, timeout)) = row else {
        return Err(StoreError::Invalid(Invalid::new(
            field,
            format!(
                "no bundle or tag {name:?} in this org (push it with `dispatcher bundle push`)"
            ),
        )));
    };
    if bundle_runtime != runtime.as_str() {
        return Err(StoreError::Invalid(Invalid::new(
            field,
            format!(
                "{digest} is a {bundle_runtime} bundle; the task's runtime is {}",
                runtime.as_str()
            ),
        )));
    }
    Ok(ResolvedBundle {
        digest,
        timeout_seconds: timeout.and_then(|t| u32::try_from(t).ok()),
    })
}

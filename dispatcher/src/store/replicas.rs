//! The API replicas running now and their signing keys (migration 0024):
//! how a replica learns at start that a peer signs with a key it cannot
//! verify, or cannot verify its key (`roles::replicas`).

use std::time::Duration;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::Store;
use crate::error::StoreError;

/// One replica as it registered.
#[derive(Debug, Clone)]
pub struct Replica {
    pub id: Uuid,
    pub name: String,
    pub signing_kid: String,
    pub verify_kids: Vec<String>,
    pub seen_at: DateTime<Utc>,
}

/// Serializes joins, so two replicas starting at once see each other.
const JOIN_LOCK: i64 = 0x7265_706c_6963_6173; // "replicas"

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Registers `me`, or marks it seen.
async fn upsert(ex: impl sqlx::PgExecutor<'_>, me: &Replica) -> Result<(), StoreError> {
    sqlx::query!(
        "INSERT INTO api_replicas (id, name, signing_kid, verify_kids) VALUES ($1, $2, $3, $4)
         ON CONFLICT (id) DO UPDATE SET seen_at = now()",
        me.id,
        me.name,
        me.signing_kid,
        &me.verify_kids,
    )
    .execute(ex)
    .await?;
    Ok(())
}

/// The replicas other than `me` seen within `stale`, newest first.
async fn live(
    ex: impl sqlx::PgExecutor<'_>,
    me: &Replica,
    stale: Duration,
) -> Result<Vec<Replica>, StoreError> {
    Ok(sqlx::query_as!(
        Replica,
        "SELECT id, name, signing_kid, verify_kids, seen_at FROM api_replicas
          WHERE id <> $1 AND seen_at > now() - $2 * interval '1 millisecond'
          ORDER BY seen_at DESC",
        me.id,
        millis(stale) as f64,
    )
    .fetch_all(ex)
    .await?)
}

impl Store {
    /// Registers `me` unless a replica seen within `stale` conflicts with
    /// it (by `conflicts`); answers the conflicting ones (none: joined).
    pub async fn join_replicas(
        &self,
        me: &Replica,
        stale: Duration,
        conflicts: impl Fn(&Replica) -> bool,
    ) -> Result<Vec<Replica>, StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query!("SELECT pg_advisory_xact_lock($1)", JOIN_LOCK)
            .execute(&mut *tx)
            .await?;
        let bad: Vec<Replica> = live(&mut *tx, me, stale)
            .await?
            .into_iter()
            .filter(|p| conflicts(p))
            .collect();
        if !bad.is_empty() {
            return Ok(bad);
        }
        upsert(&mut *tx, me).await?;
        // Rows of replicas long gone (killed without a clean stop).
        sqlx::query!("DELETE FROM api_replicas WHERE seen_at < now() - interval '1 day'")
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Vec::new())
    }

    /// Marks `me` seen (registering it again if its row went) and answers
    /// the other replicas seen within `stale`.
    pub async fn replica_heartbeat(
        &self,
        me: &Replica,
        stale: Duration,
    ) -> Result<Vec<Replica>, StoreError> {
        upsert(&self.pool, me).await?;
        live(&self.pool, me, stale).await
    }

    /// Removes `me` (a clean stop).
    pub async fn leave_replicas(&self, id: Uuid) -> Result<(), StoreError> {
        sqlx::query!("DELETE FROM api_replicas WHERE id = $1", id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

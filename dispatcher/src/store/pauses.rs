//! Paused runtimes (issue 25, migration 0019): while an org's runtime is
//! paused, the claim skips its ready tasks; they stay `ready`, and leased
//! ones run on. Resuming wakes the tasks that waited.

use dispatcher_wire as wire;
use uuid::Uuid;

use super::transitions::enqueue_wakeups;
use super::Store;
use crate::error::StoreError;

impl Store {
    /// Pauses `runtime` in the org (again: no change). Whether it was
    /// running before.
    pub async fn pause(
        &self,
        org_id: Uuid,
        runtime: wire::Runtime,
        user_id: Option<Uuid>,
    ) -> Result<bool, StoreError> {
        let n = sqlx::query!(
            "INSERT INTO paused_runtimes (org_id, runtime, paused_by) VALUES ($1, $2, $3)
             ON CONFLICT DO NOTHING",
            org_id,
            runtime.as_str(),
            user_id,
        )
        .execute(&self.pool)
        .await?;
        Ok(n.rows_affected() == 1)
    }

    /// Resumes `runtime` in the org and wakes its ready tasks; how many it
    /// woke (`None`: it was not paused).
    pub async fn resume(
        &self,
        org_id: Uuid,
        runtime: wire::Runtime,
    ) -> Result<Option<u64>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let gone = sqlx::query!(
            "DELETE FROM paused_runtimes WHERE org_id = $1 AND runtime = $2",
            org_id,
            runtime.as_str(),
        )
        .execute(&mut *tx)
        .await?;
        if gone.rows_affected() == 0 {
            return Ok(None);
        }
        let ready: Vec<Uuid> = sqlx::query_scalar!(
            "SELECT t.id FROM tasks t
               JOIN jobs j ON j.id = t.job_id
               JOIN task_specs s ON s.task_id = t.id
              WHERE t.state = 'ready' AND j.org_id = $1 AND s.runtime = $2",
            org_id,
            runtime.as_str(),
        )
        .fetch_all(&mut *tx)
        .await?;
        enqueue_wakeups(&mut tx, self.settings.wakeups, &ready, None).await?;
        tx.commit().await?;
        Ok(Some(ready.len() as u64))
    }

    /// The org's paused runtimes, each with who paused it, when, and how
    /// many of its tasks wait ready.
    pub async fn pauses(&self, org_id: Uuid) -> Result<Vec<wire::PauseView>, StoreError> {
        let rows = sqlx::query!(
            r#"SELECT p.runtime, p.paused_by, p.paused_at,
                      (SELECT count(*) FROM tasks t
                         JOIN jobs j ON j.id = t.job_id
                         JOIN task_specs s ON s.task_id = t.id
                        WHERE t.state = 'ready' AND j.org_id = p.org_id
                          AND s.runtime = p.runtime) AS "ready!"
                 FROM paused_runtimes p WHERE p.org_id = $1 ORDER BY p.runtime"#,
            org_id,
        )
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|r| {
                Ok(wire::PauseView {
                    runtime: wire::Runtime::parse(&r.runtime).ok_or_else(|| {
                        StoreError::Internal(format!("unknown runtime {:?}", r.runtime))
                    })?,
                    paused_by: r.paused_by,
                    paused_at: r.paused_at,
                    ready_tasks: r.ready as u64,
                })
            })
            .collect()
    }

    /// The paused runtime a task waits on, if any.
    pub(super) async fn paused_runtime_of(
        &self,
        task_id: Uuid,
    ) -> Result<Option<String>, StoreError> {
        Ok(sqlx::query_scalar!(
            "SELECT p.runtime FROM paused_runtimes p
               JOIN jobs j ON j.org_id = p.org_id
               JOIN tasks t ON t.job_id = j.id
               JOIN task_specs s ON s.task_id = t.id AND s.runtime = p.runtime
              WHERE t.id = $1",
            task_id,
        )
        .fetch_optional(&self.pool)
        .await?)
    }
}

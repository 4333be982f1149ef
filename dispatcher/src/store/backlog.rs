//! The backlog as the metrics sample it (`crate::metrics`): ready tasks
//! per org and runtime with the oldest one's wait, leased tasks per runtime.

use uuid::Uuid;

use super::Store;
use crate::error::StoreError;

/// Ready tasks of one org and runtime.
#[derive(Debug, Clone)]
pub struct ReadyCount {
    pub org_id: Uuid,
    pub runtime: String,
    pub ready: i64,
    /// Seconds since the oldest task claimable now became ready (0 when
    /// every ready one waits out a retry backoff).
    pub oldest_age_seconds: f64,
}

#[derive(Debug, Clone, Default)]
pub struct Backlog {
    pub ready: Vec<ReadyCount>,
    pub leased: Vec<(String, i64)>,
}

/// How far behind the relay and the sink are.
#[derive(Debug)]
pub struct Lag {
    pub relay_seconds: f64,
    pub sink_pending: i64,
    pub sink_seconds: f64,
}

impl Store {
    /// The oldest pending outbox row's age, and the pending buffer batches
    /// with the oldest one's age (each from its partial index).
    pub async fn lag_sample(&self) -> Result<Lag, StoreError> {
        Ok(sqlx::query_as!(
            Lag,
            r#"SELECT coalesce((SELECT extract(epoch FROM now() - min(created_at))
                                  FROM outbox WHERE state = 'pending'), 0)::float8 AS "relay_seconds!",
                      (SELECT count(*) FROM buffer_publishes WHERE state = 'pending') AS "sink_pending!",
                      coalesce((SELECT extract(epoch FROM now() - min(created_at))
                                  FROM buffer_publishes WHERE state = 'pending'), 0)::float8 AS "sink_seconds!""#,
        )
        .fetch_one(&self.pool)
        .await?)
    }

    /// One look at the backlog (reads `tasks_ready_fifo_idx`'s rows only for
    /// ready tasks, and the leased ones).
    pub async fn backlog_sample(&self) -> Result<Backlog, StoreError> {
        let ready = sqlx::query_as!(
            ReadyCount,
            r#"SELECT j.org_id, s.runtime, count(*) AS "ready!",
                      coalesce(extract(epoch FROM now() - min(greatest(t.updated_at, t.not_before))
                                 FILTER (WHERE coalesce(t.not_before, '-infinity') <= now())),
                               0)::float8 AS "oldest_age_seconds!"
                 FROM tasks t
                 JOIN jobs j ON j.id = t.job_id
                 JOIN task_specs s ON s.task_id = t.id
                WHERE t.state = 'ready'
                GROUP BY j.org_id, s.runtime"#,
        )
        .fetch_all(&self.pool)
        .await?;
        let leased = sqlx::query!(
            r#"SELECT s.runtime, count(*) AS "n!"
                 FROM tasks t JOIN task_specs s ON s.task_id = t.id
                WHERE t.state = 'leased'
                GROUP BY s.runtime"#,
        )
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(|r| (r.runtime, r.n))
        .collect();
        Ok(Backlog { ready, leased })
    }
}

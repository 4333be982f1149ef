//! Jobs and leases, as a worker sees them: what a claim answers (the
//! attempt's capability token, its bundle's URL), what a heartbeat renews,
//! and a claim that waits for work (ADR 0017).

use chrono::{DateTime, Utc};
use dispatcher_wire as wire;

use super::Ctx;
use crate::domain::ClaimAsk;
use crate::error::StoreError;
use crate::settings::Settings;
use crate::store::ready::ReadySignal;
use crate::store::{Claimed, LeaseRenewal, Pick};
use crate::tokens::{TaskClaims, TaskScope};

/// Token lifetime: the lease plus a grace period (see `Settings`).
pub fn token_expiry(settings: &Settings, lease_expires_at: DateTime<Utc>) -> DateTime<Utc> {
    let grace = chrono::Duration::from_std(settings.token_grace).unwrap_or_default();
    lease_expires_at + grace
}

/// What a worker gets for a claim: the attempt's capability token and, for
/// a bundle task, a presigned URL of its bundle.
pub async fn claim_answer(
    ctx: Ctx<'_>,
    claimed: Claimed,
) -> Result<wire::ClaimResponse, StoreError> {
    let scope = TaskScope {
        task_id: claimed.task_id,
        job_id: claimed.job_id,
        org_id: claimed.org_id,
        attempt: claimed.attempt,
        datasets: claimed.spec.outputs.clone(),
        reads: claimed.spec.reads.clone(),
    };
    let runtime = claimed.spec.runtime.as_str();
    metrics::counter!(crate::metrics::CLAIMS, "runtime" => runtime).increment(1);
    metrics::histogram!(crate::metrics::QUEUED_TO_CLAIMED, "runtime" => runtime)
        .record(claimed.queued_seconds);
    let token_expires_at = token_expiry(ctx.settings, claimed.lease_expires_at);
    let capability_token = ctx.keys.mint_task(&scope, token_expires_at);
    // A bundle task's archive: fetched by the worker, checked against the
    // digest the task names (content addressing, not this URL, is the trust).
    let bundle_url = if claimed.spec.runtime == wire::Runtime::Exec {
        None
    } else {
        let key = crate::bundles::object_key(claimed.org_id, &claimed.spec.bundle);
        Some(
            ctx.objects
                .presign_get(&key, ctx.settings.object_url_ttl)
                .await
                .map_err(|e| {
                    tracing::warn!(error = %e, "presigning a bundle failed");
                    StoreError::Retry("the object store could not presign the bundle".into())
                })?,
        )
    };
    Ok(wire::ClaimResponse {
        task_id: claimed.task_id,
        job_id: claimed.job_id,
        attempt: claimed.attempt,
        lease_expires_at: claimed.lease_expires_at,
        heartbeat_interval_seconds: u32::try_from(
            Settings::heartbeat_interval(claimed.lease).as_secs(),
        )
        .unwrap_or(u32::MAX),
        capability_token,
        token_expires_at,
        task: claimed.spec,
        object_prefix: scope.attempt_prefix(),
        org_id: claimed.org_id,
        bundle_url,
        traceparent: claimed.traceparent,
    })
}

/// A renewed lease as a heartbeat answers it: a fresh token for the new
/// lease end.
pub fn heartbeat_answer(
    ctx: Ctx<'_>,
    claims: &TaskClaims,
    renewal: LeaseRenewal,
) -> wire::HeartbeatResponse {
    let token_expires_at = token_expiry(ctx.settings, renewal.lease_expires_at);
    let scope = TaskScope {
        task_id: claims.sub,
        job_id: claims.job,
        org_id: claims.org,
        attempt: claims.att,
        datasets: claims.datasets.clone(),
        reads: claims.reads.clone(),
    };
    wire::HeartbeatResponse {
        lease_expires_at: renewal.lease_expires_at,
        capability_token: ctx.keys.mint_task(&scope, token_expires_at),
        token_expires_at,
        cancel_requested: renewal.cancel_requested,
    }
}

/// Claims ready work, waiting up to `wait` for some: looks again whenever
/// the ready signal says tasks may have become ready (ADR 0017), and at
/// least every `claim_poll`. Answers as soon as one claim is granted, or
/// with nothing when `stop` is cancelled (the API is closing): a claim in
/// progress is never cut, only the wait.
pub async fn claim_waiting(
    ctx: Ctx<'_>,
    ready: &ReadySignal,
    stop: &tokio_util::sync::CancellationToken,
    pick: Pick<'_>,
    worker_id: &str,
    lease: std::time::Duration,
    wait: std::time::Duration,
) -> Result<Vec<Claimed>, StoreError> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut ready = ready.subscribe();
    loop {
        // Seen before the claim looks, so a signal sent while it looks is
        // not missed.
        ready.borrow_and_update();
        let claimed = ctx.store.claim_many(pick, worker_id, lease).await?;
        let now = tokio::time::Instant::now();
        if !claimed.is_empty() || now >= deadline || stop.is_cancelled() {
            return Ok(claimed);
        }
        let look_again = deadline.min(now + ctx.settings.claim_poll);
        tokio::select! {
            _ = stop.cancelled() => return Ok(claimed),
            changed = ready.changed() => {
                if changed.is_err() {
                    // The signal is gone (shutting down): poll instead.
                    tokio::time::sleep_until(look_again).await;
                }
            }
            _ = tokio::time::sleep_until(look_again) => {}
        }
    }
}

/// A batch claim: the tasks asked for, or up to `max` ready ones, waiting
/// up to `wait` for some. Each id answered on its own, in the order asked
/// (a refused one with the single claim's refusal); ready work in the
/// order granted.
pub async fn claim_batch(
    ctx: Ctx<'_>,
    ready: &ReadySignal,
    stop: &tokio_util::sync::CancellationToken,
    ask: &ClaimAsk,
    worker_id: &str,
    lease: std::time::Duration,
    wait: std::time::Duration,
) -> Result<Vec<(uuid::Uuid, Result<wire::ClaimResponse, StoreError>)>, StoreError> {
    let (pick, ids) = match ask {
        ClaimAsk::Ids(ids) => (Pick::Ids(ids), ids.clone()),
        ClaimAsk::Ready { max, runtimes } => (Pick::Ready(*max, runtimes.as_deref()), Vec::new()),
    };
    let claimed = if wait.is_zero() {
        ctx.store.claim_many(pick, worker_id, lease).await?
    } else {
        claim_waiting(ctx, ready, stop, pick, worker_id, lease, wait).await?
    };
    let mut granted = std::collections::HashMap::with_capacity(claimed.len());
    let mut order = Vec::with_capacity(claimed.len());
    for c in claimed {
        order.push(c.task_id);
        granted.insert(c.task_id, claim_answer(ctx, c).await?);
    }
    // By ids: each in the order asked; by max_tasks: what was granted.
    let asked = if ids.is_empty() { order } else { ids };
    let mut answers = Vec::with_capacity(asked.len());
    for task_id in asked {
        let answer = match granted.remove(&task_id) {
            Some(claim) => Ok(claim),
            None => Err(ctx.store.claim_refusal(task_id).await),
        };
        answers.push((task_id, answer));
    }
    Ok(answers)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::testing::{claims, Parts};

    #[tokio::test]
    async fn a_renewed_token_outlives_the_lease_by_the_grace_and_keeps_the_attempts_scope() {
        let parts = Parts::new();
        let c = claims(60);
        let lease_end = Utc::now() + chrono::Duration::seconds(90);
        let answer = heartbeat_answer(
            parts.ctx(),
            &c,
            LeaseRenewal {
                lease_expires_at: lease_end,
                cancel_requested: false,
            },
        );
        let grace = chrono::Duration::from_std(parts.settings.token_grace).unwrap();
        assert_eq!(answer.token_expires_at, lease_end + grace);
        let renewed: TaskClaims = parts
            .keys
            .verify(&answer.capability_token, crate::tokens::TokenKind::Task)
            .unwrap();
        assert_eq!(
            (
                renewed.sub,
                renewed.att,
                renewed.org,
                &renewed.datasets,
                &renewed.reads,
                &renewed.prefixes
            ),
            (c.sub, c.att, c.org, &c.datasets, &c.reads, &c.prefixes)
        );
    }
}

//! Invariants 1 (fencing), 2 (one clock) and 3 (attempts only grow).

use dispatcher_tests::{batch_body, TestApp};
use reqwest::StatusCode;
use serde_json::json;
use uuid::Uuid;

/// The fenced writes, each with a valid body for `claim`'s attempt.
fn fenced_calls(claim: &dispatcher_wire::ClaimResponse) -> Vec<(&'static str, serde_json::Value)> {
    vec![
        ("/v1/task/heartbeat", json!({"progress": {"pct": 50}})),
        (
            "/v1/task/events",
            json!({"events": [{"seq": 7, "kind": "log", "payload": {"msg": "late"}}]}),
        ),
        (
            "/v1/task/buffer-publish",
            batch_body(claim, Uuid::new_v4(), 3),
        ),
        (
            "/v1/task/complete",
            json!({"outcome": "succeeded", "output": {"stale": true}}),
        ),
    ]
}

#[tokio::test]
async fn invariant_1_fencing_stale_attempt_writes_are_refused_and_change_nothing() {
    let app = TestApp::spawn().await;
    let task = app.single_task(3).await;
    let first = app.claim(task).await;
    app.expire_lease(task).await;
    let second = app.claim(task).await;
    assert_eq!(second.attempt, first.attempt + 1);

    for (path, body) in fenced_calls(&first) {
        let before = app.snapshot(task).await;
        let r = app.post(path, &first.capability_token, &body).await;
        assert_eq!(r.status, StatusCode::CONFLICT, "{path}: {}", r.body);
        assert_eq!(r.code(), "stale_attempt", "{path}: {}", r.body);
        assert_eq!(r.body["error"]["retryable"], false);
        assert_eq!(
            app.snapshot(task).await,
            before,
            "{path} changed the database"
        );
    }

    // The current attempt is unaffected and can finish.
    let r = app.complete_ok(&second.capability_token, json!({})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
}

#[tokio::test]
async fn invariant_1_fencing_expired_lease_cannot_write_and_task_is_claimed_again_as_next_attempt()
{
    let app = TestApp::spawn().await;
    let task = app.single_task(3).await;
    let claim = app.claim(task).await;
    app.expire_lease(task).await;

    for (path, body) in fenced_calls(&claim) {
        let before = app.snapshot(task).await;
        let r = app.post(path, &claim.capability_token, &body).await;
        assert_eq!(r.status, StatusCode::CONFLICT, "{path}: {}", r.body);
        assert_eq!(r.code(), "lease_expired", "{path}: {}", r.body);
        assert_eq!(
            app.snapshot(task).await,
            before,
            "{path} changed the database"
        );
    }

    let again = app.claim(task).await;
    assert_eq!(again.attempt, claim.attempt + 1);
    // The old attempt is now stale, not merely expired.
    let r = app
        .post("/v1/task/heartbeat", &claim.capability_token, &json!({}))
        .await;
    assert_eq!(r.code(), "stale_attempt", "{}", r.body);
}

#[tokio::test]
async fn invariant_1_fencing_live_lease_is_not_claimable() {
    let app = TestApp::spawn().await;
    let task = app.single_task(3).await;
    app.claim(task).await;
    let before = app.snapshot(task).await;
    let r = app.try_claim(task, "intruder").await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    assert_eq!(r.code(), "not_claimable", "{}", r.body);
    assert_eq!(app.snapshot(task).await, before);
}

#[tokio::test]
async fn invariant_1_fencing_finished_attempt_cannot_write_again() {
    let app = TestApp::spawn().await;
    let task = app.single_task(3).await;
    let claim = app.claim(task).await;
    assert_eq!(
        app.complete_ok(&claim.capability_token, json!({}))
            .await
            .status,
        StatusCode::OK
    );
    // Every fenced write but the completion (whose replay is answered).
    for (path, body) in fenced_calls(&claim)
        .into_iter()
        .filter(|(p, _)| !p.ends_with("/complete"))
    {
        let before = app.snapshot(task).await;
        let r = app.post(path, &claim.capability_token, &body).await;
        assert_eq!(r.code(), "stale_attempt", "{path}: {}", r.body);
        assert_eq!(app.snapshot(task).await, before);
    }
    // The log too, which the worker stores with its credential.
    let before = app.snapshot(task).await;
    let r = app
        .upload_log(&claim.capability_token, json!({"log": "late\n"}))
        .await;
    assert_eq!(r.code(), "stale_attempt", "{}", r.body);
    assert_eq!(app.snapshot(task).await, before);
}

#[tokio::test]
async fn invariant_2_one_clock_lease_is_judged_by_postgres_now() {
    let app = TestApp::spawn().await;
    let task = app.single_task(3).await;
    let claim = app.claim(task).await;

    // The granted expiry is the database's own value, not a process clock's.
    let (db_expiry, lease_secs): (chrono::DateTime<chrono::Utc>, f64) = sqlx::query_as(
        "SELECT lease_expires_at, extract(epoch FROM lease_expires_at - now())::float8 FROM tasks WHERE id = $1",
    )
    .bind(task)
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(claim.lease_expires_at, db_expiry);
    assert!(
        lease_secs > 50.0 && lease_secs <= 60.0,
        "lease {lease_secs}s"
    );

    // The token is still valid by every process clock, but the database says
    // the lease is over: the write is refused.
    app.expire_lease(task).await;
    let r = app
        .post("/v1/task/heartbeat", &claim.capability_token, &json!({}))
        .await;
    assert_eq!(r.code(), "lease_expired", "{}", r.body);

    // And a lease the database holds live is honoured, however the process
    // clock would judge the original grant.
    sqlx::query("UPDATE tasks SET lease_expires_at = now() + interval '1 hour' WHERE id = $1")
        .bind(task)
        .execute(&app.db.pool)
        .await
        .unwrap();
    let r = app
        .post("/v1/task/heartbeat", &claim.capability_token, &json!({}))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let renewed: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT lease_expires_at FROM tasks WHERE id = $1")
            .bind(task)
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    assert_eq!(r.body["lease_expires_at"], json!(renewed));
}

#[tokio::test]
async fn invariant_3_attempts_only_grow_across_expiry_retry_and_restart() {
    let app = TestApp::spawn().await;
    let task = app.single_task(4).await;
    let mut seen = vec![];

    let c1 = app.claim(task).await;
    seen.push(c1.attempt);
    app.expire_lease(task).await;
    let c2 = app.claim(task).await;
    seen.push(c2.attempt);
    let r = app
        .complete_failed(&c2.capability_token, "boom", true)
        .await;
    assert_eq!(r.body["state"], "ready", "{}", r.body);
    app.skip_backoff(task).await;

    // A "restart": a second server over the same database continues the count.
    let restarted = dispatcher::store::Store::new(app.db.pool.clone(), app.settings.clone());
    let c3 = restarted
        .claim(task, "after-restart", std::time::Duration::from_secs(30))
        .await
        .unwrap();
    seen.push(c3.attempt);
    assert_eq!(seen, vec![1, 2, 3]);
    let stored: i32 = sqlx::query_scalar("SELECT attempt FROM tasks WHERE id = $1")
        .bind(task)
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(stored, 3);
}

#[tokio::test]
async fn heartbeat_extends_the_lease_and_refreshes_the_token() {
    let app = TestApp::spawn().await;
    let task = app.single_task(3).await;
    let claim = app.claim(task).await;
    sqlx::query("UPDATE tasks SET lease_expires_at = now() + interval '2 seconds' WHERE id = $1")
        .bind(task)
        .execute(&app.db.pool)
        .await
        .unwrap();
    let r = app
        .post(
            "/v1/task/heartbeat",
            &claim.capability_token,
            &json!({"progress": {"pct": 10}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let hb: dispatcher_wire::HeartbeatResponse = serde_json::from_value(r.body).unwrap();
    assert!(hb.lease_expires_at > claim.lease_expires_at - chrono::Duration::seconds(1));
    assert!(!hb.cancel_requested);
    assert_ne!(hb.capability_token, claim.capability_token);
    // The refreshed token speaks for the same attempt and works.
    let claims = dispatcher_tests::decode_claims(&hb.capability_token);
    assert_eq!(claims["att"], 1);
    let r = app.complete_ok(&hb.capability_token, json!({})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let progress: serde_json::Value =
        sqlx::query_scalar("SELECT progress FROM attempts WHERE task_id = $1 AND attempt = 1")
            .bind(task)
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    assert_eq!(progress, json!({"pct": 10}));
}

/// Review M6: the timeout is the dispatcher's rule too, not only the
/// platform wrapper's. A worker that keeps heartbeating past its attempt's
/// `timeout_seconds` plus one lease of grace gets no further lease, then
/// `lease_expired`, and the task goes to its next attempt.
#[tokio::test]
async fn a_heartbeating_worker_cannot_hold_a_task_past_its_timeout_plus_one_lease() {
    let app = TestApp::spawn().await;
    let task = app.single_task(3).await;
    let claim = app.claim(task).await;
    // Claimed an hour ago with a one-second timeout; two seconds of lease left.
    sqlx::query("UPDATE task_specs SET timeout_seconds = 1 WHERE task_id = $1")
        .bind(task)
        .execute(&app.db.pool)
        .await
        .unwrap();
    sqlx::query("UPDATE attempts SET claimed_at = now() - interval '1 hour' WHERE task_id = $1;")
        .bind(task)
        .execute(&app.db.pool)
        .await
        .unwrap();
    let left: chrono::DateTime<chrono::Utc> = sqlx::query_scalar(
        "UPDATE tasks SET lease_expires_at = clock_timestamp() + interval '2 seconds'
          WHERE id = $1 RETURNING lease_expires_at",
    )
    .bind(task)
    .fetch_one(&app.db.pool)
    .await
    .unwrap();

    let r = app
        .post("/v1/task/heartbeat", &claim.capability_token, &json!({}))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let hb: dispatcher_wire::HeartbeatResponse = serde_json::from_value(r.body).unwrap();
    assert_eq!(
        hb.lease_expires_at, left,
        "the lease was extended past the timeout"
    );

    tokio::time::sleep(std::time::Duration::from_millis(2200)).await;
    let r = app
        .post("/v1/task/heartbeat", &hb.capability_token, &json!({}))
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    assert_eq!(r.code(), "lease_expired", "{}", r.body);
    let again = app.claim(task).await;
    assert_eq!(again.attempt, claim.attempt + 1);

    // A fresh attempt of the same task gets its full lease again.
    let r = app
        .post("/v1/task/heartbeat", &again.capability_token, &json!({}))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
}

#[tokio::test]
async fn claim_clamps_the_requested_lease_to_configured_bounds() {
    let app = TestApp::spawn().await;
    for (asked, granted) in [(0u64, 1i64), (5, 5), (10_000_000, 3600)] {
        let task = app.single_task(1).await;
        let r = app
            .post(
                "/internal/task-claim",
                &app.worker_token,
                &json!({"task_id": task, "worker_id": "w", "lease_seconds": asked}),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        let c: dispatcher_wire::ClaimResponse = serde_json::from_value(r.body).unwrap();
        let secs: i32 = sqlx::query_scalar("SELECT lease_seconds FROM tasks WHERE id = $1")
            .bind(task)
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
        assert_eq!(i64::from(secs), granted, "asked {asked}");
        assert!(c.heartbeat_interval_seconds >= 1);
    }
}

#[tokio::test]
async fn claim_of_an_unknown_task_is_404() {
    let app = TestApp::spawn().await;
    let r = app.try_claim(Uuid::new_v4(), "w").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.code(), "not_found");
}

/// A store on a one-connection pool (so the test sees the connection the
/// store used), and a task it claimed: the pool, the store, the claim, its
/// fence.
async fn claimed_on_one_connection(
    app: &TestApp,
) -> (
    sqlx::PgPool,
    dispatcher::store::Store,
    dispatcher::store::Claimed,
    dispatcher::store::Fence,
) {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&app.db.url())
        .await
        .unwrap();
    let store = dispatcher::store::Store::new(pool.clone(), app.settings.clone());
    let task = app.single_task(3).await;
    let claimed = store
        .claim(task, "w", std::time::Duration::from_secs(30))
        .await
        .unwrap();
    let fence = dispatcher::store::Fence {
        task_id: claimed.task_id,
        job_id: claimed.job_id,
        attempt: claimed.attempt,
    };
    (pool, store, claimed, fence)
}

/// ADR 0018: a heartbeat commits without waiting for the WAL flush, and
/// that relaxation ends with its transaction. On a one-connection pool,
/// the transactions after a heartbeat (a claim, here) are synchronous again.
#[tokio::test]
async fn rule_a_heartbeats_relaxed_commit_does_not_outlive_its_transaction() {
    let app = TestApp::spawn().await;
    let (pool, store, claimed, fence) = claimed_on_one_connection(&app).await;
    let task = claimed.task_id;
    let progress = json!({"pct": 10});
    let renewal = store.heartbeat(fence, Some(&progress)).await.unwrap();
    assert!(renewal.lease_expires_at > claimed.lease_expires_at - chrono::Duration::seconds(1));
    let after: String = sqlx::query_scalar("SHOW synchronous_commit")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        after, "on",
        "the heartbeat's setting leaked to its connection"
    );
    let kept: serde_json::Value =
        sqlx::query_scalar("SELECT progress FROM attempts WHERE task_id = $1 AND attempt = 1")
            .bind(task)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(kept, progress, "the heartbeat committed");
}

/// Updates of `relname` so far, and how many of them were HOT (in place on
/// the page, no new index entries), once this pool's backend has flushed
/// its statistics.
async fn updates_of(pool: &sqlx::PgPool, relname: &str) -> (i64, i64) {
    sqlx::query("SELECT pg_stat_force_next_flush()")
        .execute(pool)
        .await
        .unwrap();
    // The flush happens when the backend next goes idle: read from a new
    // transaction each time, until the counters stop moving.
    let mut last = (-1, -1);
    for _ in 0..50 {
        let now: (i64, i64) = sqlx::query_as(
            "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = $1",
        )
        .bind(relname)
        .fetch_one(pool)
        .await
        .unwrap();
        if now == last {
            return now;
        }
        last = now;
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    last
}

/// ADR 0020: a heartbeat changes no indexed column of the task (nor of the
/// attempt, for its progress), so Postgres updates both rows in place (HOT)
/// without writing an entry into any index. Migration 0014 took
/// `lease_expires_at` out of every index for that.
#[tokio::test]
async fn heartbeats_are_hot_updates_of_the_task_and_attempt_rows() {
    let app = TestApp::spawn().await;
    let (pool, store, _, fence) = claimed_on_one_connection(&app).await;
    let (tasks_before, tasks_hot_before) = updates_of(&pool, "tasks").await;
    let (attempts_before, attempts_hot_before) = updates_of(&pool, "attempts").await;
    const BEATS: i64 = 20;
    for i in 0..BEATS {
        store
            .heartbeat(fence, Some(&json!({ "pct": i })))
            .await
            .unwrap();
    }
    let (tasks_after, tasks_hot_after) = updates_of(&pool, "tasks").await;
    let (attempts_after, attempts_hot_after) = updates_of(&pool, "attempts").await;
    assert_eq!(
        tasks_after - tasks_before,
        BEATS,
        "one task update per beat"
    );
    assert_eq!(
        tasks_hot_after - tasks_hot_before,
        BEATS,
        "every lease extension was a HOT update"
    );
    assert_eq!(attempts_after - attempts_before, BEATS);
    assert_eq!(
        attempts_hot_after - attempts_hot_before,
        BEATS,
        "every progress update was a HOT update"
    );
}

/// Issue 30: `POST /internal/task-release` (worker credential, the attempt
/// by its token) hands a leased task back at once: the attempt ends
/// `released`, the task is ready and claimable now with its attempt given
/// back, and the released token is fenced out. A task's own token alone
/// cannot hand its task back.
#[tokio::test]
async fn a_released_task_is_ready_at_once_with_its_attempt_given_back_and_the_old_token_fenced() {
    let app = TestApp::spawn().await;
    let task = app.single_task(1).await;
    let first = app.claim(task).await;
    let release = |token: &str| json!({"capability_token": token});
    // The task's own code holds its token, not the worker credential.
    let r = app
        .post(
            "/internal/task-release",
            &first.capability_token,
            &release(&first.capability_token),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.body);
    let state: String = sqlx::query_scalar("SELECT state FROM tasks WHERE id = $1")
        .bind(task)
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(state, "leased", "the task's token alone changed nothing");
    let r = app
        .post(
            "/internal/task-release",
            &app.worker_token,
            &release(&first.capability_token),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["state"], "ready");
    let (state, max_attempts): (String, i32) =
        sqlx::query_as("SELECT state, max_attempts FROM tasks WHERE id = $1")
            .bind(task)
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    assert_eq!((state.as_str(), max_attempts), ("ready", 2));
    // The released token can do nothing more, releasing again included.
    let r = app
        .post(
            "/internal/task-release",
            &app.worker_token,
            &release(&first.capability_token),
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "release again: {}", r.body);
    let r = app
        .post("/v1/task/heartbeat", &first.capability_token, &json!({}))
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    // Claimable now (no backoff), as attempt 2, which may still succeed
    // although the task allowed one attempt.
    let second = app.claim(task).await;
    assert_eq!(second.attempt, 2);
    let r = app.complete_ok(&second.capability_token, json!({})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let view = app.job(second.job_id).await;
    let detail = app
        .get(
            &format!("/v1/jobs/{}/tasks/{}", view.job_id, second.task.key),
            &app.user_token,
        )
        .await;
    assert_eq!(
        detail.body["attempts"][0]["outcome"], "released",
        "{}",
        detail.body
    );
    assert_eq!(detail.body["attempts"][0]["error"]["code"], "released");
    assert_eq!(detail.body["state"], "succeeded");
}

//! Races the store must win, forced into their bad interleaving with row
//! locks held by the test (no sleeps to move time: `pg_stat_activity` says
//! when a call is waiting on a lock).

use std::time::{Duration, Instant};

use dispatcher_tests::TestApp;
use reqwest::StatusCode;
use serde_json::json;
use sqlx::{Connection, PgConnection};
use uuid::Uuid;

/// Waits until `n` backends of this database wait on a lock.
async fn wait_lock_waiters(app: &TestApp, n: i64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
              WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
        if waiting >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{waiting} of {n} calls wait on a lock"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Sends a completion over HTTP in a task of its own (it may wait on a
/// lock the test holds).
fn spawn_completion(
    app: &TestApp,
    token: &str,
    body: serde_json::Value,
) -> tokio::task::JoinHandle<dispatcher_tests::Response> {
    let (url, client, token) = (
        app.url("/v1/task/complete"),
        app.client.clone(),
        token.to_owned(),
    );
    tokio::spawn(async move {
        let resp = client
            .post(url)
            .bearer_auth(token)
            .json(&body)
            .send()
            .await
            .unwrap();
        TestApp::read(resp).await
    })
}

async fn connection(app: &TestApp) -> PgConnection {
    PgConnection::connect(&app.db.url()).await.expect("connect")
}

async fn states(app: &TestApp, job_id: Uuid) -> Vec<String> {
    sqlx::query_scalar("SELECT state FROM tasks WHERE job_id = $1 ORDER BY id")
        .bind(job_id)
        .fetch_all(&app.db.pool)
        .await
        .unwrap()
}

/// A job cancelled while one of its tasks' leases expires ends with no task
/// `ready`, `leased` or `succeeded`: the lease expiry's retry commits first,
/// while the cancellation waits on the task row; the cancellation must still
/// end that task (ending a job is one statement).
#[tokio::test]
async fn rule_ending_a_job_is_one_statement_a_concurrent_lease_expiry_cannot_revive_a_task() {
    let app = TestApp::spawn().await;
    let job = app
        .submit(&json!({"name": "race", "tasks": [
            {"key": "a", "runtime": "exec", "bundle": "/bin/true", "max_attempts": 3},
            {"key": "b", "runtime": "exec", "bundle": "/bin/true", "max_attempts": 3}
        ]}))
        .await;
    let a = job.tasks[0].task_id;
    app.claim(a).await;
    app.expire_lease(a).await;

    // Hold the task row so both calls queue behind us: the expiry first.
    let mut holder = connection(&app).await;
    sqlx::query("BEGIN").execute(&mut holder).await.unwrap();
    sqlx::query("SELECT 1 FROM tasks WHERE id = $1 FOR UPDATE")
        .bind(a)
        .execute(&mut holder)
        .await
        .unwrap();
    let store = app.store.clone();
    let expiry = tokio::spawn(async move { store.expire_lease(a).await });
    wait_lock_waiters(&app, 1).await;
    let store = app.store.clone();
    let org = app.org_id;
    let cancel = tokio::spawn(async move {
        store
            .cancel_job(org, job.job_id, dispatcher::store::TaskPage::FIRST)
            .await
    });
    wait_lock_waiters(&app, 2).await;
    sqlx::query("ROLLBACK").execute(&mut holder).await.unwrap();

    let expired = expiry.await.unwrap().expect("expiry");
    assert_eq!(
        expired.map(|s| s.as_str()),
        Some("ready"),
        "the expiry ran first and scheduled a retry"
    );
    cancel.await.unwrap().expect("cancel");
    assert_eq!(states(&app, job.job_id).await, ["cancelled", "cancelled"]);
    let r = app.try_claim(a, "w").await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::CONFLICT, "not_claimable")
    );
}

/// The other order: the cancellation holds the task first; the expiry then
/// sees the request and ends the task cancelled, not ready.
#[tokio::test]
async fn rule_a_lease_expiring_after_its_job_ended_ends_the_task_cancelled() {
    let app = TestApp::spawn().await;
    let job = app
        .submit(&json!({"name": "race", "tasks": [
            {"key": "a", "runtime": "exec", "bundle": "/bin/true", "max_attempts": 3}
        ]}))
        .await;
    let a = job.tasks[0].task_id;
    app.claim(a).await;
    app.store
        .cancel_job(app.org_id, job.job_id, dispatcher::store::TaskPage::FIRST)
        .await
        .unwrap();
    assert_eq!(states(&app, job.job_id).await, ["leased"]);
    app.expire_lease(a).await;
    let ended = app.store.expire_lease(a).await.unwrap();
    assert_eq!(ended.map(|s| s.as_str()), Some("cancelled"));
}

/// Completes `claim` while the test holds `lock_sql` (one row, `FOR
/// UPDATE`) and ends the lease during the wait; the completion must be
/// refused as `lease_expired` and commit nothing.
async fn complete_while_the_lease_ends(
    app: &TestApp,
    claim: &dispatcher_wire::ClaimResponse,
    lock_sql: &str,
    lock_id: Uuid,
) {
    let mut holder = connection(app).await;
    sqlx::query("BEGIN").execute(&mut holder).await.unwrap();
    sqlx::query(lock_sql)
        .bind(lock_id)
        .execute(&mut holder)
        .await
        .unwrap();
    let completion = spawn_completion(
        app,
        &claim.capability_token,
        json!({"outcome": "succeeded", "output": {"late": true}}),
    );
    wait_lock_waiters(app, 1).await;
    // The completion's transaction began before this point; the lease ends
    // now, while it waits (written by the holder, which may hold the task).
    tokio::time::sleep(Duration::from_millis(20)).await;
    sqlx::query(
        "UPDATE tasks SET lease_expires_at = clock_timestamp() - interval '1 millisecond' WHERE id = $1",
    )
    .bind(claim.task_id)
    .execute(&mut holder)
    .await
    .unwrap();
    sqlx::query("COMMIT").execute(&mut holder).await.unwrap();
    let r = completion.await.unwrap();
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::CONFLICT, "lease_expired"),
        "{}",
        r.body
    );
    assert_eq!(app.committed_completions(claim.task_id).await, 0);
}

/// Completion judges the lease at the moment of its write: a completion
/// that waited on the job row (a task with a dependant locks it) past its
/// lease's end is refused, even though the lease was live when its
/// transaction began.
#[tokio::test]
async fn rule_completion_judges_the_lease_at_the_moment_of_its_write() {
    let app = TestApp::spawn().await;
    let job = app
        .submit(&json!({"name": "race", "tasks": [
            {"key": "a", "runtime": "exec", "bundle": "/bin/true", "max_attempts": 3},
            {"key": "b", "runtime": "exec", "bundle": "/bin/true", "depends_on": ["a"]}
        ]}))
        .await;
    let a = job.tasks.iter().find(|t| t.key == "a").unwrap().task_id;
    let claim = app.claim(a).await;
    complete_while_the_lease_ends(
        &app,
        &claim,
        "SELECT 1 FROM jobs WHERE id = $1 FOR UPDATE",
        job.job_id,
    )
    .await;
}

/// The same for a leaf, whose success takes no job lock: it waits on its
/// own task row, and the lease is judged when that wait ends.
#[tokio::test]
async fn rule_completion_of_a_leaf_judges_the_lease_at_the_moment_of_its_write() {
    let app = TestApp::spawn().await;
    let task = app.single_task(3).await;
    let claim = app.claim(task).await;
    complete_while_the_lease_ends(
        &app,
        &claim,
        "SELECT 1 FROM tasks WHERE id = $1 FOR UPDATE",
        task,
    )
    .await;
}

/// Successes of leaves take no job lock and do not touch the job row; the
/// job ends after they commit, when one of them finds no unfinished
/// sibling. Twenty leaves completed at once end their job exactly once,
/// and a job with one task still leased is not ended.
#[tokio::test]
async fn rule_concurrent_leaf_successes_end_their_job_once_the_last_commits() {
    let app = TestApp::spawn().await;
    let job_state = |job_id: Uuid| {
        let pool = app.db.pool.clone();
        async move {
            sqlx::query_as::<_, (String, bool)>(
                "SELECT state, finished_at IS NOT NULL FROM jobs WHERE id = $1",
            )
            .bind(job_id)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    for round in 0..3 {
        let tasks: Vec<_> = (0..21)
            .map(|i| json!({"key": format!("t{i}"), "runtime": "exec", "bundle": "/bin/true"}))
            .collect();
        let job = app.submit(&json!({"name": "leaves", "tasks": tasks})).await;
        let mut claims = Vec::new();
        for t in &job.tasks {
            claims.push(app.claim(t.task_id).await);
        }
        // Round 0 keeps one task leased: its job must stay running. The
        // other rounds complete every task at once.
        let held = (round == 0).then(|| claims.pop().unwrap());
        let mut done = tokio::task::JoinSet::new();
        for c in claims {
            let (url, client) = (app.url("/v1/task/complete"), app.client.clone());
            done.spawn(async move {
                let resp = client
                    .post(url)
                    .bearer_auth(&c.capability_token)
                    .json(&json!({"outcome": "succeeded"}))
                    .send()
                    .await
                    .unwrap();
                TestApp::read(resp).await
            });
        }
        while let Some(r) = done.join_next().await {
            let r = r.unwrap();
            assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        }
        if let Some(last) = held {
            assert_eq!(job_state(job.job_id).await, ("running".to_string(), false));
            let r = app.complete_ok(&last.capability_token, json!({})).await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        }
        assert_eq!(
            job_state(job.job_id).await,
            ("succeeded".to_string(), true),
            "round {round}"
        );
    }
}

/// A part staged by the attempt while its completion waited on the task
/// row (the stage holds it `FOR SHARE` until it commits) must not be lost
/// by the one-statement path of leaves' successes: the completion is
/// refused retryably and commits nothing, as the ordinary path refuses it.
#[tokio::test]
async fn rule_a_part_staged_while_a_leaf_completes_is_never_silently_dropped() {
    let app = TestApp::spawn().await;
    app.create_dataset(
        "staged_late",
        "append",
        json!([{"name": "n", "type": "int64", "nullable": false}]),
    )
    .await;
    let task = app.single_task(3).await;
    let claim = app.claim(task).await;
    let mut holder = connection(&app).await;
    sqlx::query("BEGIN").execute(&mut holder).await.unwrap();
    sqlx::query("SELECT 1 FROM tasks WHERE id = $1 FOR SHARE")
        .bind(task)
        .execute(&mut holder)
        .await
        .unwrap();
    let completion = spawn_completion(
        &app,
        &claim.capability_token,
        json!({"outcome": "succeeded"}),
    );
    wait_lock_waiters(&app, 1).await;
    sqlx::query(
        "INSERT INTO staged_parts (task_id, attempt, dataset_id, key, rows, bytes, sha256)
         SELECT $1, $2, id, 'late-part', 1, 1, repeat('0', 64) FROM datasets WHERE name = 'staged_late'",
    )
    .bind(task)
    .bind(claim.attempt as i32)
    .execute(&mut holder)
    .await
    .unwrap();
    sqlx::query("COMMIT").execute(&mut holder).await.unwrap();
    let r = completion.await.unwrap();
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.body);
    assert_eq!(app.committed_completions(task).await, 0);
    let state: String = sqlx::query_scalar("SELECT state FROM tasks WHERE id = $1")
        .bind(task)
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(state, "leased");
}

/// `cancelled` is an outcome only for a task whose job asked it to stop;
/// then it ends the task now and the attempt history says `cancelled`.
#[tokio::test]
async fn rule_a_worker_may_complete_cancelled_only_after_a_cancel_request() {
    let app = TestApp::spawn().await;
    let task = app.single_task(3).await;
    let claim = app.claim(task).await;
    let before = app.snapshot(task).await;
    let cancelled = json!({"outcome": "cancelled"});
    let r = app
        .post("/v1/task/complete", &claim.capability_token, &cancelled)
        .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::CONFLICT, "conflict"),
        "{}",
        r.body
    );
    assert_eq!(
        app.snapshot(task).await,
        before,
        "a refused call changed nothing"
    );

    let r = app
        .post(
            &format!("/v1/jobs/{}/cancel", claim.job_id),
            &app.user_token,
            &json!({}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let hb = app
        .post("/v1/task/heartbeat", &claim.capability_token, &json!({}))
        .await;
    assert_eq!(hb.body["cancel_requested"], true);
    let r = app
        .post("/v1/task/complete", &claim.capability_token, &cancelled)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["state"], "cancelled");
    let replay = app
        .post("/v1/task/complete", &claim.capability_token, &cancelled)
        .await;
    assert_eq!(replay.body, r.body, "a replay answers the original");
    let outcome: String =
        sqlx::query_scalar("SELECT outcome FROM attempts WHERE task_id = $1 AND attempt = 1")
            .bind(task)
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    assert_eq!(outcome, "cancelled");
    let r = app
        .post(
            "/v1/task/complete",
            &claim.capability_token,
            &json!({"outcome": "cancelled", "output": {}}),
        )
        .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::BAD_REQUEST, "invalid_request")
    );
}

//! DAG release, cancellation, retries and final failure, and invariant 5
//! (atomic outbox).

use std::collections::HashMap;

use dispatcher_tests::TestApp;
use dispatcher_wire::{JobState, JobView, TaskState};
use reqwest::StatusCode;
use serde_json::{json, Value};
use uuid::Uuid;

fn task(key: &str, deps: &[&str]) -> Value {
    json!({"key": key, "runtime": "exec", "bundle": "/bin/true", "depends_on": deps})
}

fn ids(job: &JobView) -> HashMap<String, Uuid> {
    job.tasks
        .iter()
        .map(|t| (t.key.clone(), t.task_id))
        .collect()
}

async fn states(app: &TestApp, job_id: Uuid) -> HashMap<String, TaskState> {
    app.job(job_id)
        .await
        .tasks
        .into_iter()
        .map(|t| (t.key, t.state))
        .collect()
}

fn expect(pairs: &[(&str, TaskState)]) -> HashMap<String, TaskState> {
    pairs.iter().map(|(k, s)| (k.to_string(), *s)).collect()
}

use TaskState::{Blocked, Cancelled, Failed, Leased, Ready, Succeeded};

#[tokio::test]
async fn dag_chain_releases_one_task_at_a_time() {
    let app = TestApp::spawn().await;
    let job = app
        .submit(&json!({"name": "chain", "tasks": [task("a", &[]), task("b", &["a"]), task("c", &["b"])]}))
        .await;
    let id = ids(&job);
    assert_eq!(
        states(&app, job.job_id).await,
        expect(&[("a", Ready), ("b", Blocked), ("c", Blocked)])
    );
    let r = app.try_claim(id["b"], "w").await;
    assert_eq!(
        r.code(),
        "not_claimable",
        "a blocked task cannot be claimed"
    );
    app.run_ok(id["a"]).await;
    assert_eq!(
        states(&app, job.job_id).await,
        expect(&[("a", Succeeded), ("b", Ready), ("c", Blocked)])
    );
    app.run_ok(id["b"]).await;
    app.run_ok(id["c"]).await;
    let view = app.job(job.job_id).await;
    assert_eq!(view.state, JobState::Succeeded);
    assert!(view.finished_at.is_some());
}

#[tokio::test]
async fn dag_fan_out_releases_all_dependants_together() {
    let app = TestApp::spawn_queued().await;
    let job = app
        .submit(&json!({"name": "fan", "tasks": [
            task("root", &[]), task("x", &["root"]), task("y", &["root"]), task("z", &["root"])]}))
        .await;
    let id = ids(&job);
    app.run_ok(id["root"]).await;
    assert_eq!(
        states(&app, job.job_id).await,
        expect(&[
            ("root", Succeeded),
            ("x", Ready),
            ("y", Ready),
            ("z", Ready)
        ])
    );
    for k in ["x", "y", "z"] {
        assert_eq!(app.wakeups(id[k]).await, 1, "{k} woken once");
    }
}

#[tokio::test]
async fn dag_join_waits_for_every_dependency() {
    let app = TestApp::spawn_queued().await;
    let job = app
        .submit(&json!({"name": "join", "tasks": [
            task("p", &[]), task("q", &[]), task("r", &[]), task("sink", &["p", "q", "r"])]}))
        .await;
    let id = ids(&job);
    app.run_ok(id["p"]).await;
    app.run_ok(id["q"]).await;
    assert_eq!(states(&app, job.job_id).await["sink"], Blocked);
    assert_eq!(app.wakeups(id["sink"]).await, 0);
    app.run_ok(id["r"]).await;
    assert_eq!(states(&app, job.job_id).await["sink"], Ready);
    assert_eq!(app.wakeups(id["sink"]).await, 1);
    app.run_ok(id["sink"]).await;
    assert_eq!(app.job(job.job_id).await.state, JobState::Succeeded);
}

#[tokio::test]
async fn dag_diamond_runs_the_tip_once_after_both_sides() {
    let app = TestApp::spawn_queued().await;
    let job = app
        .submit(&json!({"name": "diamond", "tasks": [
            task("a", &[]), task("b", &["a"]), task("c", &["a"]), task("d", &["b", "c"])]}))
        .await;
    let id = ids(&job);
    app.run_ok(id["a"]).await;
    app.run_ok(id["c"]).await;
    assert_eq!(states(&app, job.job_id).await["d"], Blocked);
    app.run_ok(id["b"]).await;
    assert_eq!(states(&app, job.job_id).await["d"], Ready);
    app.run_ok(id["d"]).await;
    assert_eq!(app.wakeups(id["d"]).await, 1);
    assert_eq!(app.job(job.job_id).await.state, JobState::Succeeded);
}

#[tokio::test]
async fn dag_cycle_duplicate_and_unknown_keys_are_rejected_and_write_nothing() {
    let app = TestApp::spawn().await;
    let before = app.table_counts().await;
    let cases = [
        (
            json!([task("a", &["c"]), task("b", &["a"]), task("c", &["b"])]),
            "tasks: dependency cycle",
        ),
        (
            json!([task("a", &["a"])]),
            "tasks: dependency cycle: a -> a",
        ),
        (
            json!([task("a", &[]), task("a", &[])]),
            "tasks[1].key: duplicate key",
        ),
        (
            json!([task("a", &["ghost"])]),
            "tasks[0].depends_on[0]: unknown task key \"ghost\"",
        ),
    ];
    for (tasks, message) in cases {
        let r = app
            .post(
                "/v1/jobs",
                &app.user_token,
                &json!({"name": "bad", "tasks": tasks}),
            )
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
        assert_eq!(r.code(), "invalid_request");
        let got = r.body["error"]["message"].as_str().unwrap();
        assert!(
            got.starts_with(message),
            "{got:?} should start with {message:?}"
        );
    }
    assert_eq!(app.table_counts().await, before);
}

#[tokio::test]
async fn cancel_stops_unstarted_tasks_and_asks_leased_ones_to_stop() {
    let app = TestApp::spawn_queued().await;
    let job = app
        .submit(&json!({"name": "cancel", "tasks": [task("a", &[]), task("b", &[]), task("c", &["a"])]}))
        .await;
    let id = ids(&job);
    let running = app.claim(id["a"]).await;

    let r = app
        .post(
            &format!("/v1/jobs/{}/cancel", job.job_id),
            &app.user_token,
            &json!({}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["state"], "cancelled");
    assert_eq!(
        states(&app, job.job_id).await,
        expect(&[("a", Leased), ("b", Cancelled), ("c", Cancelled)])
    );

    // The leased attempt learns of it on its next heartbeat...
    let hb = app
        .post("/v1/task/heartbeat", &running.capability_token, &json!({}))
        .await;
    assert_eq!(hb.status, StatusCode::OK);
    assert_eq!(hb.body["cancel_requested"], true);
    // ... and whatever it reports, the task ends cancelled and releases nothing.
    let done = app.complete_ok(&running.capability_token, json!({})).await;
    assert_eq!(done.body["state"], "cancelled", "{}", done.body);
    assert_eq!(
        states(&app, job.job_id).await,
        expect(&[("a", Cancelled), ("b", Cancelled), ("c", Cancelled)])
    );
    assert_eq!(app.wakeups(id["c"]).await, 0);
    assert_eq!(app.try_claim(id["b"], "w").await.code(), "not_claimable");

    // Cancelling again is a no-op; the job stays cancelled.
    let again = app
        .post(
            &format!("/v1/jobs/{}/cancel", job.job_id),
            &app.user_token,
            &json!({}),
        )
        .await;
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(app.job(job.job_id).await.state, JobState::Cancelled);
}

#[tokio::test]
async fn cancelled_task_whose_worker_vanished_ends_cancelled_at_next_claim() {
    let app = TestApp::spawn().await;
    let job = app
        .submit(&json!({"name": "c", "tasks": [task("a", &[])]}))
        .await;
    let a = job.tasks[0].task_id;
    app.claim(a).await;
    app.post(
        &format!("/v1/jobs/{}/cancel", job.job_id),
        &app.user_token,
        &json!({}),
    )
    .await;
    app.expire_lease(a).await;
    let r = app.try_claim(a, "w").await;
    assert_eq!(r.code(), "not_claimable", "{}", r.body);
    assert_eq!(states(&app, job.job_id).await["a"], Cancelled);
}

#[tokio::test]
async fn cancelling_a_finished_job_is_a_conflict() {
    let app = TestApp::spawn().await;
    let job = app
        .submit(&json!({"name": "done", "tasks": [task("a", &[])]}))
        .await;
    app.run_ok(job.tasks[0].task_id).await;
    let r = app
        .post(
            &format!("/v1/jobs/{}/cancel", job.job_id),
            &app.user_token,
            &json!({}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    assert_eq!(app.job(job.job_id).await.state, JobState::Succeeded);
}

#[tokio::test]
async fn retryable_failure_schedules_the_next_attempt_after_backoff() {
    let app = TestApp::spawn_queued().await;
    let task = app.single_task(3).await;
    let c1 = app.claim(task).await;
    let r = app
        .complete_failed(&c1.capability_token, "flaky", true)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["state"], "ready");
    let retry_at: chrono::DateTime<chrono::Utc> =
        serde_json::from_value(r.body["retry_at"].clone()).unwrap();

    // Backoff of the first retry: base 2 s with equal jitter, so 1..=2 s.
    let (delay, wake_at): (f64, chrono::DateTime<chrono::Utc>) = sqlx::query_as(
        "SELECT extract(epoch FROM t.not_before - a.finished_at)::float8, o.available_at
           FROM tasks t
           JOIN attempts a ON a.task_id = t.id AND a.attempt = 1
           JOIN outbox o ON o.payload->>'task_id' = t.id::text
          WHERE t.id = $1
          ORDER BY o.id DESC LIMIT 1",
    )
    .bind(task)
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert!((0.99..=2.01).contains(&delay), "delay {delay}s");
    assert_eq!(
        wake_at, retry_at,
        "the retry's wake-up is delayed to the backoff"
    );

    let early = app.try_claim(task, "w").await;
    assert_eq!(early.code(), "not_claimable");
    assert!(early.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("backoff"));

    app.skip_backoff(task).await;
    let c2 = app.claim(task).await;
    assert_eq!(c2.attempt, 2);
}

#[tokio::test]
async fn retry_backoff_grows_exponentially_per_attempt() {
    let app = TestApp::spawn().await;
    let task = app.single_task(4).await;
    let mut delays = vec![];
    for _ in 0..3 {
        let c = app.claim(task).await;
        app.complete_failed(&c.capability_token, "again", true)
            .await;
        let d: f64 = sqlx::query_scalar(
            "SELECT extract(epoch FROM t.not_before - a.finished_at)::float8
               FROM tasks t JOIN attempts a ON a.task_id = t.id AND a.attempt = t.attempt WHERE t.id = $1",
        )
        .bind(task)
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
        delays.push(d);
        app.skip_backoff(task).await;
    }
    // Equal jitter: attempt n waits in [2^n / 2, 2^n] seconds.
    for (i, d) in delays.iter().enumerate() {
        let full = 2f64.powi(i as i32 + 1);
        assert!(
            (full / 2.0 - 0.01..=full + 0.01).contains(d),
            "attempt {}: {d}s",
            i + 1
        );
    }
}

#[tokio::test]
async fn final_failure_fails_the_task_and_job_and_cancels_what_cannot_run() {
    let app = TestApp::spawn().await;
    let job = app
        .submit(&json!({"name": "fails", "tasks": [
            {"key": "a", "runtime": "exec", "bundle": "x", "max_attempts": 2},
            task("b", &["a"]), task("other", &[])]}))
        .await;
    let id = ids(&job);
    let other = app.claim(id["other"]).await;
    for attempt in 1..=2 {
        let c = app.claim(id["a"]).await;
        assert_eq!(c.attempt, attempt);
        let r = app
            .complete_failed(&c.capability_token, "bad input", true)
            .await;
        let expected = if attempt == 1 { "ready" } else { "failed" };
        assert_eq!(r.body["state"], expected, "{}", r.body);
        app.skip_backoff(id["a"]).await;
    }
    let view = app.job(job.job_id).await;
    assert_eq!(view.state, JobState::Failed);
    let s = states(&app, job.job_id).await;
    assert_eq!(s["a"], Failed);
    assert_eq!(s["b"], Cancelled);
    // The independent running task is asked to stop.
    let hb = app
        .post("/v1/task/heartbeat", &other.capability_token, &json!({}))
        .await;
    assert_eq!(hb.body["cancel_requested"], true);
    assert_eq!(app.try_claim(id["a"], "w").await.code(), "not_claimable");
}

#[tokio::test]
async fn non_retryable_failure_fails_at_once() {
    let app = TestApp::spawn().await;
    let task = app.single_task(5).await;
    let c = app.claim(task).await;
    let r = app
        .complete_failed(&c.capability_token, "schema mismatch", false)
        .await;
    assert_eq!(r.body["state"], "failed", "{}", r.body);
}

#[tokio::test]
async fn expired_lease_on_the_last_attempt_fails_the_task() {
    let app = TestApp::spawn().await;
    let task = app.single_task(1).await;
    app.claim(task).await;
    app.expire_lease(task).await;
    let r = app.try_claim(task, "w").await;
    assert_eq!(r.code(), "not_claimable", "{}", r.body);
    let state: String = sqlx::query_scalar("SELECT state FROM tasks WHERE id = $1")
        .bind(task)
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(state, "failed");
}

#[tokio::test]
async fn invariant_5_atomic_outbox_every_wakeup_is_written_with_its_state_change() {
    let app = TestApp::spawn_queued().await;
    let job = app
        .submit(&json!({"name": "outbox", "tasks": [task("a", &[]), task("b", &["a"])]}))
        .await;
    let id = ids(&job);
    // Submission wakes the root only.
    assert_eq!(
        (app.wakeups(id["a"]).await, app.wakeups(id["b"]).await),
        (1, 0)
    );

    // A refused completion (stale) writes no wake-up.
    let c1 = app.claim(id["a"]).await;
    app.expire_lease(id["a"]).await;
    let c2 = app.claim(id["a"]).await;
    app.complete_ok(&c1.capability_token, json!({})).await;
    assert_eq!(app.wakeups(id["b"]).await, 0);

    // The committed completion writes the dependant's wake-up with it.
    app.complete_ok(&c2.capability_token, json!({})).await;
    assert_eq!(app.wakeups(id["b"]).await, 1);

    // Every wake-up body is {"task_id"} and nothing else, and all are pending
    // for the relay.
    let rows: Vec<(Value, String)> =
        sqlx::query_as("SELECT payload, state FROM outbox WHERE topic = 'wakeup'")
            .fetch_all(&app.db.pool)
            .await
            .unwrap();
    for (payload, state) in rows {
        assert_eq!(payload.as_object().unwrap().len(), 1, "{payload}");
        assert!(payload["task_id"].is_string());
        assert_eq!(state, "pending");
    }
}

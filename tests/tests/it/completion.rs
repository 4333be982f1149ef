//! Invariant 4 (exactly one committed completion per task) and the
//! idempotency rules of events and buffer publishes.

use std::sync::Arc;

use dispatcher_tests::{batch_body, Response, TestApp};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::sync::Barrier;
use uuid::Uuid;

/// Fires all `(token, body)` completions at once, released by one barrier.
async fn complete_concurrently(app: &Arc<TestApp>, calls: Vec<(String, Value)>) -> Vec<Response> {
    let barrier = Arc::new(Barrier::new(calls.len()));
    let handles: Vec<_> = calls
        .into_iter()
        .map(|(token, body)| {
            let app = app.clone();
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                app.post("/v1/task/complete", &token, &body).await
            })
        })
        .collect();
    let mut out = vec![];
    for h in handles {
        out.push(h.await.expect("task"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invariant_4_fifty_concurrent_completions_of_one_attempt_commit_once() {
    let app = Arc::new(TestApp::spawn_queued().await);
    let job = app
        .submit(&json!({"name": "c", "tasks": [
            {"key": "a", "runtime": "exec", "bundle": "x"},
            {"key": "b", "runtime": "exec", "bundle": "x", "depends_on": ["a"]}
        ]}))
        .await;
    let (a, b) = (job.tasks[0].task_id, job.tasks[1].task_id);
    let claim = app.claim(a).await;
    let body = json!({"outcome": "succeeded", "output": {"rows": 42}});
    let calls = (0..50)
        .map(|_| (claim.capability_token.clone(), body.clone()))
        .collect();

    let answers = complete_concurrently(&app, calls).await;

    for r in &answers {
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        assert_eq!(
            r.body, answers[0].body,
            "every replay returns the original answer"
        );
    }
    assert_eq!(answers[0].body["state"], "succeeded");
    assert_eq!(app.committed_completions(a).await, 1);
    // The dependant was released exactly once: one wake-up, one decrement.
    assert_eq!(app.wakeups(b).await, 1);
    let (state, pending): (String, i32) =
        sqlx::query_as("SELECT state, pending_deps FROM tasks WHERE id = $1")
            .bind(b)
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    assert_eq!((state.as_str(), pending), ("ready", 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invariant_4_fifty_concurrent_completions_from_two_attempts_commit_once() {
    let app = Arc::new(TestApp::spawn().await);
    let task = app.single_task(3).await;
    let old = app.claim(task).await;
    app.expire_lease(task).await;
    let new = app.claim(task).await;
    let calls = (0..50)
        .map(|i| {
            let (token, n) = if i % 2 == 0 {
                (&old.capability_token, 1)
            } else {
                (&new.capability_token, 2)
            };
            (
                token.clone(),
                json!({"outcome": "succeeded", "output": {"by": n}}),
            )
        })
        .collect();

    let answers = complete_concurrently(&app, calls).await;

    let ok: Vec<_> = answers
        .iter()
        .filter(|r| r.status == StatusCode::OK)
        .collect();
    let stale = answers
        .iter()
        .filter(|r| r.code() == "stale_attempt")
        .count();
    assert_eq!(ok.len(), 25, "the current attempt's calls all answer 200");
    assert_eq!(stale, 25, "the old attempt's calls are all refused");
    assert!(ok.iter().all(|r| r.body["attempt"] == 2));
    assert_eq!(app.committed_completions(task).await, 1);
    let output: Value = sqlx::query_scalar(
        "SELECT completion->'output' FROM attempts WHERE task_id = $1 AND completion IS NOT NULL",
    )
    .bind(task)
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(output, json!({"by": 2}));
}

#[tokio::test]
async fn invariant_4_completion_replay_returns_the_original_answer_and_conflicting_replay_is_409() {
    let app = TestApp::spawn().await;
    let task = app.single_task(3).await;
    let claim = app.claim(task).await;
    let first = app
        .complete_ok(&claim.capability_token, json!({"n": 1, "m": [1, 2]}))
        .await;
    assert_eq!(first.status, StatusCode::OK);

    // Same body (keys in another order): the original answer.
    let replay = app
        .post(
            "/v1/task/complete",
            &claim.capability_token,
            &json!({"output": {"m": [1, 2], "n": 1}, "outcome": "succeeded"}),
        )
        .await;
    assert_eq!(replay.status, StatusCode::OK);
    assert_eq!(replay.body, first.body);

    let before = app.snapshot(task).await;
    for other in [
        json!({"outcome": "succeeded", "output": {"n": 2}}),
        json!({"outcome": "failed", "error": {"message": "x", "retryable": false}}),
    ] {
        let r = app
            .post("/v1/task/complete", &claim.capability_token, &other)
            .await;
        assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
        assert_eq!(r.code(), "conflict");
    }
    assert_eq!(app.snapshot(task).await, before);
}

#[tokio::test]
async fn invariant_4_terminal_state_never_changes() {
    let app = TestApp::spawn().await;
    let task = app.single_task(3).await;
    app.run_ok(task).await;
    let before = app.snapshot(task).await;
    let r = app.try_claim(task, "late").await;
    assert_eq!(r.code(), "not_claimable", "{}", r.body);
    assert_eq!(app.snapshot(task).await, before);
}

#[tokio::test]
async fn events_are_stored_once_per_seq_and_a_different_body_is_a_conflict() {
    let app = TestApp::spawn().await;
    let task = app.single_task(3).await;
    let claim = app.claim(task).await;
    let token = &claim.capability_token;
    let batch = json!({"events": [
        {"seq": 0, "kind": "log", "payload": {"m": "a"}},
        {"seq": 1, "kind": "progress", "payload": {"pct": 50}}
    ]});
    let r = app.post("/v1/task/events", token, &batch).await;
    assert_eq!(r.body, json!({"accepted": 2, "duplicates": 0}));
    let r = app.post("/v1/task/events", token, &batch).await;
    assert_eq!(r.body, json!({"accepted": 0, "duplicates": 2}));
    // A mix of a new seq and a replayed one.
    let r = app
        .post(
            "/v1/task/events",
            token,
            &json!({"events": [{"seq": 1, "kind": "progress", "payload": {"pct": 50}},
                               {"seq": 2, "kind": "log", "payload": null}]}),
        )
        .await;
    assert_eq!(r.body, json!({"accepted": 1, "duplicates": 1}));

    // A replayed seq with another body: 409, and the new seq in the same call
    // is not stored either.
    let before = app.snapshot(task).await;
    let r = app
        .post(
            "/v1/task/events",
            token,
            &json!({"events": [{"seq": 3, "kind": "log", "payload": {}},
                               {"seq": 0, "kind": "log", "payload": {"m": "changed"}}]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    assert_eq!(r.code(), "conflict");
    assert_eq!(app.snapshot(task).await, before);
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM task_events WHERE task_id = $1")
        .bind(task)
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(n, 3);
}

#[tokio::test]
async fn buffer_publishes_are_recorded_once_per_batch_id() {
    let app = TestApp::spawn().await;
    let task = app.single_task(3).await;
    let claim = app.claim(task).await;
    let token = &claim.capability_token;
    let batch_id = Uuid::new_v4();
    let body = batch_body(&claim, batch_id, 120);
    for _ in 0..3 {
        let r = app.post("/v1/task/buffer-publish", token, &body).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        assert_eq!(r.body, json!({"batch_id": batch_id, "status": "accepted"}));
    }
    let (publishes, pointers): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM buffer_publishes WHERE batch_id = $1),
                (SELECT count(*) FROM outbox WHERE topic = 'buffer' AND payload->>'batch_id' = $1::text)",
    )
    .bind(batch_id)
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(
        (publishes, pointers),
        (1, 1),
        "one record and one sink pointer"
    );

    let before = app.snapshot(task).await;
    let mut changed = body.clone();
    changed["rows"] = json!(121);
    let r = app.post("/v1/task/buffer-publish", token, &changed).await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    assert_eq!(r.code(), "conflict");
    assert_eq!(app.snapshot(task).await, before);
}

#[tokio::test]
async fn buffer_publish_outside_the_token_scope_is_forbidden() {
    let app = TestApp::spawn().await;
    let task = app.single_task(3).await;
    let claim = app.claim(task).await;
    let before = app.snapshot(task).await;

    let mut other_prefix = batch_body(&claim, Uuid::new_v4(), 1);
    other_prefix["object_key"] = json!(format!(
        "orgs/{}/jobs/x/tasks/y/attempts/1/b.jsonl",
        Uuid::new_v4()
    ));
    let mut other_attempt = batch_body(&claim, Uuid::new_v4(), 1);
    let key = other_attempt["object_key"]
        .as_str()
        .unwrap()
        .replace("/attempts/1/", "/attempts/2/");
    other_attempt["object_key"] = json!(key);
    let mut other_dataset = batch_body(&claim, Uuid::new_v4(), 1);
    other_dataset["dataset"] = json!("payments");

    for body in [other_prefix, other_attempt, other_dataset] {
        let r = app
            .post("/v1/task/buffer-publish", &claim.capability_token, &body)
            .await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
        assert_eq!(r.code(), "forbidden");
    }
    assert_eq!(app.snapshot(task).await, before);
}

//! Bad input gets a clear error with a stable code, names the field, and
//! changes nothing.

use dispatcher::settings::Settings;
use dispatcher_tests::{batch_body, TestApp};
use reqwest::StatusCode;
use serde_json::{json, Value};
use uuid::Uuid;

async fn assert_rejected(app: &TestApp, path: &str, token: &str, body: Value, field: &str) {
    let before = app.table_counts().await;
    let r = app.post(path, token, &body).await;
    assert_eq!(
        r.status,
        StatusCode::BAD_REQUEST,
        "{path} {body}: {}",
        r.body
    );
    assert_eq!(r.code(), "invalid_request");
    assert_eq!(r.body["error"]["retryable"], false);
    let message = r.body["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with(field),
        "{path} {body}: message {message:?} should name {field:?}"
    );
    assert_eq!(
        app.table_counts().await,
        before,
        "{path} {body} wrote something"
    );
}

#[tokio::test]
async fn malformed_worker_requests_answer_400_naming_the_field() {
    let app = TestApp::spawn().await;
    let task = app.single_task(3).await;
    let w = app.worker_token.clone();
    assert_rejected(
        &app,
        "/internal/task-claim",
        &w,
        json!({"task_id": "nope", "worker_id": "w"}),
        "task_id",
    )
    .await;
    assert_rejected(
        &app,
        "/internal/task-claim",
        &w,
        json!({"worker_id": "w"}),
        "body",
    )
    .await;
    assert_rejected(
        &app,
        "/internal/task-claim",
        &w,
        json!({"task_id": task, "worker_id": ""}),
        "worker_id",
    )
    .await;
    assert_rejected(
        &app,
        "/internal/task-claim",
        &w,
        json!({"task_id": task, "worker_id": "w", "lease_seconds": -5}),
        "lease_seconds",
    )
    .await;
    assert_rejected(
        &app,
        "/internal/task-claim",
        &w,
        json!({"task_id": task, "worker_id": "w", "lease_seconds": "60"}),
        "lease_seconds",
    )
    .await;
    assert_rejected(
        &app,
        "/internal/task-claim",
        &w,
        json!({"task_id": task, "worker_id": "w", "leese_seconds": 5}),
        "leese_seconds: unknown field",
    )
    .await;

    let claim = app.claim(task).await;
    let t = claim.capability_token.clone();
    assert_rejected(&app, "/v1/task/events", &t, json!({"events": []}), "events").await;
    assert_rejected(
        &app,
        "/v1/task/events",
        &t,
        json!({"events": [{"seq": -1, "kind": "log"}]}),
        "events[0].seq",
    )
    .await;
    assert_rejected(
        &app,
        "/v1/task/events",
        &t,
        json!({"events": [{"seq": 0, "kind": ""}]}),
        "events[0].kind",
    )
    .await;
    assert_rejected(
        &app,
        "/v1/task/events",
        &t,
        json!({"events": [{"seq": 0, "kind": "a"}, {"seq": 0, "kind": "b"}]}),
        "events[1].seq",
    )
    .await;
    let good = batch_body(&claim, Uuid::new_v4(), 1);
    for (field, value) in [
        ("sha256", json!("xyz")),
        ("rows", json!(-1)),
        ("batch_id", json!("1")),
        ("dataset", json!("Bad-Name")),
        ("object_key", json!("a/../b")),
    ] {
        let mut body = good.clone();
        body[field] = value;
        assert_rejected(&app, "/v1/task/buffer-publish", &t, body, field).await;
    }
    assert_rejected(
        &app,
        "/v1/task/complete",
        &t,
        json!({"outcome": "maybe"}),
        "outcome",
    )
    .await;
    assert_rejected(
        &app,
        "/v1/task/complete",
        &t,
        json!({"outcome": "failed"}),
        "error",
    )
    .await;
    assert_rejected(
        &app,
        "/v1/task/complete",
        &t,
        json!({"outcome": "succeeded", "error": {"message": "x"}}),
        "error",
    )
    .await;
    assert_rejected(
        &app,
        "/v1/task/heartbeat",
        &t,
        json!({"progress": 1, "extra": true}),
        "extra: unknown field",
    )
    .await;
}

#[tokio::test]
async fn malformed_jobs_answer_400_naming_the_field() {
    let app = TestApp::spawn().await;
    let u = app.user_token.clone();
    let t = |extra: Value| {
        let mut task = json!({"key": "a", "runtime": "exec", "bundle": "x"});
        for (k, v) in extra.as_object().unwrap() {
            task[k] = v.clone();
        }
        json!({"name": "j", "tasks": [task]})
    };
    assert_rejected(
        &app,
        "/v1/jobs",
        &u,
        json!({"name": "", "tasks": []}),
        "name",
    )
    .await;
    assert_rejected(
        &app,
        "/v1/jobs",
        &u,
        json!({"name": "j", "tasks": []}),
        "tasks",
    )
    .await;
    assert_rejected(
        &app,
        "/v1/jobs",
        &u,
        t(json!({"runtime": "cobol"})),
        "tasks[0].runtime",
    )
    .await;
    assert_rejected(
        &app,
        "/v1/jobs",
        &u,
        t(json!({"key": "has space"})),
        "tasks[0].key",
    )
    .await;
    assert_rejected(
        &app,
        "/v1/jobs",
        &u,
        t(json!({"max_attempts": 0})),
        "tasks[0].max_attempts",
    )
    .await;
    assert_rejected(
        &app,
        "/v1/jobs",
        &u,
        t(json!({"max_attempts": 1000})),
        "tasks[0].max_attempts",
    )
    .await;
    assert_rejected(
        &app,
        "/v1/jobs",
        &u,
        t(json!({"inputs": [1, 2]})),
        "tasks[0].inputs",
    )
    .await;
    assert_rejected(
        &app,
        "/v1/jobs",
        &u,
        t(json!({"bundle": ""})),
        "tasks[0].bundle",
    )
    .await;
    assert_rejected(
        &app,
        "/v1/jobs",
        &u,
        t(json!({"outputs": ["UPPER"]})),
        "tasks[0].outputs[0]",
    )
    .await;
    assert_rejected(
        &app,
        "/v1/jobs",
        &u,
        t(json!({"depends_on": "a"})),
        "tasks[0].depends_on",
    )
    .await;
}

#[tokio::test]
async fn non_json_bodies_and_wrong_content_type_answer_400() {
    let app = TestApp::spawn().await;
    for (ctype, body) in [
        ("application/json", "{not json"),
        ("text/plain", "{}"),
        ("application/json", "{} trailing"),
    ] {
        let r = app
            .client
            .post(app.url("/v1/jobs"))
            .bearer_auth(&app.user_token)
            .header("content-type", ctype)
            .body(body)
            .send()
            .await
            .unwrap();
        let r = TestApp::read(r).await;
        assert_eq!(
            r.status,
            StatusCode::BAD_REQUEST,
            "{ctype} {body}: {}",
            r.body
        );
        assert_eq!(r.code(), "invalid_request");
    }
}

#[tokio::test]
async fn oversized_body_answers_413_and_writes_nothing() {
    let settings = Settings {
        max_body_bytes: 4096,
        ..Settings::default()
    };
    let app = TestApp::spawn_with(settings).await;
    let before = app.table_counts().await;
    let big = json!({"name": "big", "tasks": [{"key": "a", "runtime": "exec", "bundle": "x",
                     "inputs": {"blob": "x".repeat(8192)}}]});
    let r = app.post("/v1/jobs", &app.user_token, &big).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", r.body);
    assert_eq!(r.code(), "payload_too_large");
    assert_eq!(app.table_counts().await, before);
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_the_error_body() {
    let app = TestApp::spawn().await;
    let r = app.get("/v1/nothing-here", &app.user_token).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.code(), "not_found");
    let r = app.get("/v1/task/complete", &app.user_token).await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(r.code(), "invalid_request");
}

/// Postgres stores no NUL character: an output, error message, event
/// payload, progress or input holding one is a `400` naming the place (it
/// was a `500` on every retry before), and changes nothing.
#[tokio::test]
async fn rule_a_nul_character_is_a_400_naming_its_place_not_a_500() {
    let app = TestApp::spawn().await;
    let task = app.single_task(3).await;
    let claim = app.claim(task).await;
    let token = claim.capability_token.as_str();
    let nul = "a\u{0}b";
    for (path, body, field) in [
        (
            "/v1/task/complete",
            json!({"outcome": "succeeded", "output": {"x": [nul]}}),
            "output.x[0]",
        ),
        (
            "/v1/task/complete",
            json!({"outcome": "failed", "error": {"message": nul}}),
            "error.message",
        ),
        (
            "/v1/task/events",
            json!({"events": [{"seq": 0, "kind": "log", "payload": {"m": nul}}]}),
            "events[0].payload.m",
        ),
        (
            "/v1/task/heartbeat",
            json!({"progress": {"p": nul}}),
            "progress.p",
        ),
    ] {
        assert_rejected(&app, path, token, body, field).await;
    }
    let r = app
        .post(
            "/v1/jobs",
            &app.user_token,
            &json!({"name": "j", "tasks": [{"key": "a", "runtime": "exec", "bundle": "x", "inputs": {"k": nul}}]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("tasks[0].inputs.k"),
        "{}",
        r.body
    );
}

//! `POST /v1/task/dataset-stage` (contract: "Staging and commit"): parts
//! are verified (size, sha256, every row against the schema, row count)
//! before anything is recorded; staging is fenced, scoped and idempotent.

use std::sync::Arc;

use dispatcher_tests::{Response, TestApp};
use dispatcher_wire::ClaimResponse;
use reqwest::StatusCode;
use serde_json::json;
use sha2::Digest;

pub const ROWS: &str = "{\"ts\": \"2026-01-01T00:00:00Z\", \"user_id\": \"a\", \"value\": 1.5}\n\
                    {\"ts\": \"2026-01-01T00:01:00Z\", \"user_id\": \"b\", \"value\": null}\n";

pub async fn create_datasets(app: &TestApp) {
    let columns = json!([
        {"name": "ts", "type": "timestamp", "nullable": false},
        {"name": "user_id", "type": "string", "nullable": false},
        {"name": "value", "type": "float64", "nullable": true}]);
    for (name, mode) in [
        ("clicks", "append"),
        ("events", "stream"),
        ("other", "replace"),
    ] {
        app.create_dataset(name, mode, columns.clone()).await;
    }
}

/// A claimed task that may write `clicks` and `events`.
pub async fn writer(app: &TestApp) -> ClaimResponse {
    let job = app
        .submit(&json!({"name": "j", "tasks": [
            {"key": "w", "runtime": "exec", "bundle": "x", "outputs": ["clicks", "events"], "max_attempts": 3}]}))
        .await;
    app.claim(job.tasks[0].task_id).await
}

/// Uploads `body` as the task would (a presigned PUT); the absolute key.
pub async fn upload(app: &TestApp, claim: &ClaimResponse, name: &str, body: &[u8]) -> String {
    let r = app
        .post(
            "/v1/task/objects",
            &claim.capability_token,
            &json!({"method": "PUT", "keys": [name]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let url = r.body["urls"][0]["url"].as_str().unwrap().to_owned();
    let put = reqwest::Client::new()
        .put(url)
        .body(body.to_vec())
        .send()
        .await
        .unwrap();
    assert!(put.status().is_success(), "{}", put.status());
    r.body["urls"][0]["key"].as_str().unwrap().to_owned()
}

pub fn part(key: &str, body: &[u8], rows: u64) -> serde_json::Value {
    json!({"key": key, "rows": rows, "bytes": body.len(), "sha256": hex::encode(sha2::Sha256::digest(body))})
}

pub async fn stage(
    app: &TestApp,
    claim: &ClaimResponse,
    dataset: &str,
    parts: Vec<serde_json::Value>,
) -> Response {
    app.post(
        "/v1/task/dataset-stage",
        &claim.capability_token,
        &json!({"dataset": dataset, "parts": parts}),
    )
    .await
}

async fn staged(app: &TestApp) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM staged_parts")
        .fetch_one(&app.db.pool)
        .await
        .unwrap()
}

async fn good_part_stages_once(app: &TestApp) {
    create_datasets(app).await;
    let claim = writer(app).await;
    let key = upload(app, &claim, "part-0.jsonl", ROWS.as_bytes()).await;
    let r = stage(app, &claim, "clicks", vec![part(&key, ROWS.as_bytes(), 2)]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body, json!({"dataset": "clicks", "staged_parts": 1}));
    let again = stage(app, &claim, "clicks", vec![part(&key, ROWS.as_bytes(), 2)]).await;
    assert_eq!(again.body, r.body, "staging a part again is idempotent");
    assert_eq!(staged(app).await, 1);
}

#[tokio::test]
async fn a_verified_part_is_staged_once_on_the_local_store() {
    good_part_stages_once(&TestApp::spawn().await).await;
}

#[tokio::test]
async fn a_verified_part_is_staged_once_on_s3() {
    let moto = dispatcher_tests::moto::Moto::start().await;
    let s3 = Arc::new(moto.s3_store().await);
    good_part_stages_once(&TestApp::spawn_with_objects(Default::default(), Some(s3)).await).await;
}

#[tokio::test]
async fn every_bad_part_is_refused_naming_the_part_and_line_and_nothing_is_staged() {
    let app = TestApp::spawn().await;
    create_datasets(&app).await;
    let claim = writer(&app).await;
    let good = upload(&app, &claim, "good.jsonl", ROWS.as_bytes()).await;
    let cases: Vec<(&str, &[u8], u64, &str)> = vec![
        (
            "bad-json.jsonl",
            b"{\"ts\": \"2026-01-01T00:00:00Z\", \"user_id\": \"a\"}\n{oops\n",
            2,
            "invalid_json at line 2",
        ),
        (
            "unknown.jsonl",
            b"{\"ts\": \"2026-01-01T00:00:00Z\", \"user_id\": \"a\", \"who\": 1}\n",
            1,
            "unknown_column at line 1",
        ),
        (
            "missing.jsonl",
            b"{\"ts\": \"2026-01-01T00:00:00Z\"}\n",
            1,
            "missing_column at line 1",
        ),
        (
            "type.jsonl",
            b"{\"ts\": \"2026-01-01T00:00:00Z\", \"user_id\": 5}\n",
            1,
            "wrong_type at line 1",
        ),
        (
            "utf8.jsonl",
            b"{\"ts\": \"2026-01-01T00:00:00Z\", \"user_id\": \"\xff\"}\n",
            1,
            "invalid_json at line 1",
        ),
        ("count.jsonl", ROWS.as_bytes(), 3, "row_count_mismatch"),
    ];
    for (name, body, rows, expect) in cases {
        let key = upload(&app, &claim, name, body).await;
        // The good part first: a bad second part refuses the whole call.
        let r = stage(
            &app,
            &claim,
            "clicks",
            vec![part(&good, ROWS.as_bytes(), 2), part(&key, body, rows)],
        )
        .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{name}: {}", r.body);
        let message = r.body["error"]["message"].as_str().unwrap();
        assert!(
            message.starts_with("parts[1]: ") && message.contains(expect),
            "{name}: {message}"
        );
        assert!(
            message.contains(&key),
            "{name}: the part is named: {message}"
        );
    }
    // A checksum or size that does not match the object, and no object.
    let mut wrong_sum = part(&good, ROWS.as_bytes(), 2);
    wrong_sum["sha256"] = json!("0".repeat(64));
    let mut wrong_size = part(&good, ROWS.as_bytes(), 2);
    wrong_size["bytes"] = json!(3);
    let absent = part(&format!("{}absent.jsonl", claim.object_prefix), b"", 0);
    for (p, expect) in [
        (wrong_sum, "checksum_mismatch"),
        (wrong_size, "checksum_mismatch"),
        (absent, "object_missing"),
    ] {
        let r = stage(&app, &claim, "clicks", vec![p]).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
        assert!(
            r.body["error"]["message"]
                .as_str()
                .unwrap()
                .contains(expect),
            "{}",
            r.body
        );
    }
    assert_eq!(staged(&app).await, 0, "nothing was staged");
}

#[tokio::test]
async fn staging_is_scoped_and_fenced() {
    let app = TestApp::spawn().await;
    create_datasets(&app).await;
    let claim = writer(&app).await;
    let key = upload(&app, &claim, "p.jsonl", ROWS.as_bytes()).await;
    let p = || vec![part(&key, ROWS.as_bytes(), 2)];
    // Not among the task's outputs; not a dataset of the org; a stream.
    let r = stage(&app, &claim, "other", p()).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
    let job = app
        .submit(&json!({"name": "j", "tasks": [{"key": "x", "runtime": "exec", "bundle": "x", "outputs": ["nope"]}]}))
        .await;
    let other = app.claim(job.tasks[0].task_id).await;
    let k2 = upload(&app, &other, "p.jsonl", ROWS.as_bytes()).await;
    let r = stage(&app, &other, "nope", vec![part(&k2, ROWS.as_bytes(), 2)]).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::NOT_FOUND, "not_found"),
        "{}",
        r.body
    );
    let r = stage(&app, &claim, "events", p()).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
    // Another attempt's object cannot be staged as one's own.
    let r = stage(&app, &other, "nope", vec![part(&key, ROWS.as_bytes(), 2)]).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);

    // Same key, other metadata: conflict, nothing staged.
    assert_eq!(
        stage(&app, &claim, "clicks", p()).await.status,
        StatusCode::OK
    );
    let longer = format!("{ROWS}{{\"ts\": \"2026-01-01T00:02:00Z\", \"user_id\": \"c\"}}\n");
    upload(&app, &claim, "p.jsonl", longer.as_bytes()).await;
    let r = stage(
        &app,
        &claim,
        "clicks",
        vec![part(&key, longer.as_bytes(), 3)],
    )
    .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::CONFLICT, "conflict"),
        "{}",
        r.body
    );

    // A fenced attempt stages nothing: expired, then superseded.
    let task = claim.task_id;
    app.expire_lease(task).await;
    let r = stage(&app, &claim, "clicks", p()).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::CONFLICT, "lease_expired"),
        "{}",
        r.body
    );
    let _next = app.claim(task).await;
    let r = stage(&app, &claim, "clicks", p()).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::CONFLICT, "stale_attempt"),
        "{}",
        r.body
    );
    assert_eq!(staged(&app).await, 1, "only the first, live staging");
}

/// Commits a version of `clicks` from one staged part, then re-PUTs other
/// (valid) rows through the very URL the task was given: the committed
/// version reads back unchanged. Then tampers with the committed object
/// behind the dispatcher: the query answers `integrity_error`.
async fn a_committed_version_never_changes(app: &TestApp) {
    create_datasets(app).await;
    let claim = writer(app).await;
    let r = app
        .post(
            "/v1/task/objects",
            &claim.capability_token,
            &json!({"method": "PUT", "keys": ["part-0.jsonl"]}),
        )
        .await;
    let url = r.body["urls"][0]["url"].as_str().unwrap().to_owned();
    let key = r.body["urls"][0]["key"].as_str().unwrap().to_owned();
    let http = reqwest::Client::new();
    let put = |body: &'static str| {
        let (http, url) = (http.clone(), url.clone());
        async move { http.put(url).body(body).send().await.unwrap().status() }
    };
    assert!(put(ROWS).await.is_success());
    let r = stage(app, &claim, "clicks", vec![part(&key, ROWS.as_bytes(), 2)]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    // Between stage and commit, and after the commit, the task rewrites
    // its staged key with other rows through its URL.
    const OTHER: &str = "{\"ts\": \"2026-01-01T00:00:00Z\", \"user_id\": \"EVIL\", \"value\": 9}\n\
                         {\"ts\": \"2026-01-01T00:01:00Z\", \"user_id\": \"EVIL\", \"value\": 9}\n";
    let _ = put(OTHER).await;
    let r = app
        .post(
            "/v1/task/complete",
            &claim.capability_token,
            &json!({"outcome": "succeeded"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let _ = put(OTHER).await;
    let query =
        json!({"dataset": "clicks", "select": ["user_id"], "order_by": [{"column": "user_id"}]});
    let q = app.post("/v1/query", &app.user_token, &query).await;
    assert_eq!(q.status, StatusCode::OK, "{}", q.body);
    assert_eq!(q.body["rows"], json!([["a"], ["b"]]), "the committed rows");
    // The version names a key no URL or session policy of the task covers.
    let m = app
        .get("/v1/datasets/clicks/versions/1", &app.user_token)
        .await;
    let committed = m.body["parts"][0]["key"].as_str().unwrap().to_owned();
    assert_ne!(committed, key, "{}", m.body);
    assert!(!committed.starts_with(&claim.object_prefix), "{committed}");
    // Staging the same key again with other bytes is refused.
    let again = stage(app, &claim, "clicks", vec![part(&key, OTHER.as_bytes(), 2)]).await;
    assert_ne!(again.status, StatusCode::OK, "{}", again.body);
    // Tampered with behind the dispatcher: detected on read.
    app.objects
        .put(&committed, OTHER.as_bytes().to_vec())
        .await
        .unwrap();
    let q = app.post("/v1/query", &app.user_token, &query).await;
    assert_eq!(q.status, StatusCode::INTERNAL_SERVER_ERROR, "{}", q.body);
    assert_eq!(q.body["error"]["code"], "integrity_error", "{}", q.body);
    assert!(!q.body.to_string().contains("EVIL"));
}

#[tokio::test]
async fn invariant_7_a_committed_version_never_changes_whatever_the_task_writes_on_the_local_store()
{
    a_committed_version_never_changes(&TestApp::spawn().await).await;
}

#[tokio::test]
async fn invariant_7_a_committed_version_never_changes_whatever_the_task_writes_on_s3() {
    let moto = dispatcher_tests::moto::Moto::start().await;
    let s3 = Arc::new(moto.s3_store().await);
    a_committed_version_never_changes(
        &TestApp::spawn_with_objects(Default::default(), Some(s3)).await,
    )
    .await;
}

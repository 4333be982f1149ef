//! Bundles through the API: push (content-addressed, checked, bounded),
//! tags resolved at submission, bad input refused with nothing stored, and
//! the claim's bundle URL serving exactly the digest's bytes.

use dispatcher_tests::{bundle_archive, unthrottled, Response, TestApp};
use reqwest::StatusCode;
use serde_json::{json, Value};
use sha2::Digest;

async fn push(app: &TestApp, body: Vec<u8>) -> Response {
    let resp = app
        .client
        .post(app.url("/v1/bundles"))
        .bearer_auth(&app.user_token)
        .header("content-type", "application/gzip")
        .body(body)
        .send()
        .await
        .unwrap();
    TestApp::read(resp).await
}

async fn tag(app: &TestApp, name: &str, digest: &str) -> Response {
    let resp = app
        .client
        .put(app.url(&format!("/v1/bundles/tags/{name}")))
        .bearer_auth(&app.user_token)
        .json(&json!({"digest": digest}))
        .send()
        .await
        .unwrap();
    TestApp::read(resp).await
}

async fn bundles_stored(app: &TestApp) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM bundles")
        .fetch_one(&app.db.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_pushed_bundle_is_named_by_its_content_and_pushing_it_again_changes_nothing() {
    let app = TestApp::spawn_with(unthrottled()).await;
    let archive = bundle_archive("python", 1);
    let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&archive)));
    let r = push(&app, archive.clone()).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    assert_eq!(r.body["digest"], digest.as_str());
    assert_eq!(r.body["runtime"], "python");
    assert_eq!(r.body["handler"], "main.handler");
    let again = push(&app, archive).await;
    assert_eq!(again.body["digest"], digest.as_str());
    assert_eq!(again.body["created_at"], r.body["created_at"]);
    assert_eq!(bundles_stored(&app).await, 1);
    let got = app
        .get(&format!("/v1/bundles/{digest}"), &app.user_token)
        .await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(tag(&app, "etl", &digest).await.status, StatusCode::OK);
    let by_tag = app.get("/v1/bundles/etl", &app.user_token).await;
    assert_eq!(by_tag.body["digest"], digest.as_str());
    assert_eq!(by_tag.body["tags"], json!(["etl"]));
}

#[tokio::test]
async fn bad_bundles_are_refused_with_a_reason_and_nothing_is_stored() {
    let mut settings = unthrottled();
    settings.bundle_max_bytes = 64 * 1024;
    let app = TestApp::spawn_with(settings).await;
    let not_gzip = push(&app, b"hello".to_vec()).await;
    assert_eq!(not_gzip.status, StatusCode::BAD_REQUEST);
    assert_eq!(not_gzip.body["error"]["code"], "invalid_request");
    assert!(
        not_gzip.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not a valid bundle"),
        "{}",
        not_gzip.body
    );
    // Over the size bound.
    let big = vec![0u8; 65 * 1024];
    let r = push(&app, big).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", r.body);
    assert_eq!(r.body["error"]["code"], "payload_too_large");
    assert_eq!(bundles_stored(&app).await, 0);
    // Names that are neither a digest nor a tag; a tag of no bundle.
    let r = app.get("/v1/bundles/a%20b", &app.user_token).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let nothing = format!("sha256:{}", "0".repeat(64));
    assert_eq!(tag(&app, "x", &nothing).await.status, StatusCode::NOT_FOUND);
    assert_eq!(
        tag(&app, "x", "sha256:zz").await.status,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        tag(&app, "sha256:x", &nothing).await.status,
        StatusCode::BAD_REQUEST
    );
}

#[tokio::test]
async fn a_task_names_its_bundle_by_digest_or_tag_resolved_when_the_job_is_submitted() {
    let app = TestApp::spawn_with(unthrottled()).await;
    let py = push(&app, bundle_archive("python", 1)).await.body["digest"]
        .as_str()
        .unwrap()
        .to_owned();
    let node = push(&app, bundle_archive("node", 1)).await.body["digest"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(tag(&app, "etl", &py).await.status, StatusCode::OK);
    let bad = |task: Value| json!({"name": "j", "tasks": [task]});
    for (task, field) in [
        (
            json!({"key": "a", "runtime": "python", "bundle": format!("sha256:{}", "1".repeat(64))}),
            "tasks[0].bundle",
        ),
        (
            json!({"key": "a", "runtime": "python", "bundle": node}),
            "tasks[0].bundle",
        ),
        (
            json!({"key": "a", "runtime": "python", "bundle": "no such tag"}),
            "tasks[0].bundle",
        ),
        (
            json!({"key": "a", "runtime": "python", "bundle": "etl", "timeout_seconds": 0}),
            "tasks[0].timeout_seconds",
        ),
    ] {
        let r = app.post("/v1/jobs", &app.user_token, &bad(task)).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
        assert!(
            r.body["error"]["message"]
                .as_str()
                .unwrap()
                .starts_with(field),
            "{}",
            r.body
        );
    }
    let r = app
        .post(
            "/v1/jobs",
            &app.user_token,
            &json!({"name": "j", "deadline_seconds": 0,
                    "tasks": [{"key": "a", "runtime": "exec", "bundle": "x"}]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(jobs, 0, "nothing was written");

    // By tag: the task runs the digest the tag named at submission, even
    // after the tag moves.
    let job = app
        .submit(
            &json!({"name": "j", "tasks": [{"key": "a", "runtime": "python", "bundle": "etl"}]}),
        )
        .await;
    let py2 = push(&app, bundle_archive("python", 2)).await.body["digest"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(tag(&app, "etl", &py2).await.status, StatusCode::OK);
    let claim = app.claim(job.tasks[0].task_id).await;
    assert_eq!(claim.task.bundle, py);
    assert_eq!(claim.org_id, app.org_id);
    assert_eq!(claim.task.timeout_seconds, 900, "the default");
    // The claim's URL serves exactly the digest's bytes.
    let url = claim.bundle_url.expect("a bundle URL");
    let bytes = reqwest::get(&url).await.unwrap().bytes().await.unwrap();
    assert_eq!(
        format!("sha256:{}", hex::encode(sha2::Sha256::digest(&bytes))),
        py
    );
    // An exec task gets no bundle URL; its own timeout is kept.
    let job = app
        .submit(
            &json!({"name": "e", "tasks": [{"key": "a", "runtime": "exec", "bundle": "x",
                                               "timeout_seconds": 7}]}),
        )
        .await;
    let claim = app.claim(job.tasks[0].task_id).await;
    assert!(claim.bundle_url.is_none());
    assert_eq!(claim.task.timeout_seconds, 7);
    // A job's deadline is answered with it.
    let job = app
        .submit(&json!({"name": "d", "deadline_seconds": 60,
                        "tasks": [{"key": "a", "runtime": "exec", "bundle": "x"}]}))
        .await;
    let deadline = job.deadline_at.expect("deadline_at");
    assert_eq!((deadline - job.created_at).num_seconds(), 60);
    assert_eq!(app.job(job.job_id).await.deadline_at, Some(deadline));
}

//! The dataset commit protocol (invariant 7): a `succeeded` completion
//! commits one version per staged dataset in its own transaction; failed,
//! fenced or cancelled attempts' parts are never referenced.

use std::sync::Arc;

use dispatcher_tests::TestApp;
use dispatcher_wire::ClaimResponse;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::staging::{create_datasets, part, stage, upload, writer, ROWS};

/// Uploads and stages one part named `name` for `dataset`; its key.
/// Uploads and stages one part; the key a version then names (staging's
/// verified copy, outside the attempt's prefix).
async fn stage_one(app: &TestApp, claim: &ClaimResponse, dataset: &str, name: &str) -> String {
    let key = upload(app, claim, name, ROWS.as_bytes()).await;
    let r = stage(app, claim, dataset, vec![part(&key, ROWS.as_bytes(), 2)]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    dispatcher::objects::committed_key(app.org_id, &key)
}

async fn manifest(app: &TestApp, dataset: &str, version: u32) -> Value {
    let r = app
        .get(
            &format!("/v1/datasets/{dataset}/versions/{version}"),
            &app.user_token,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    r.body
}

fn keys(m: &Value) -> Vec<String> {
    m["parts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["key"].as_str().unwrap().to_owned())
        .collect()
}

async fn versions(app: &TestApp) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM dataset_versions")
        .fetch_one(&app.db.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn invariant_7_a_failed_attempts_parts_never_appear_and_its_retry_commits_one_version() {
    let app = TestApp::spawn().await;
    create_datasets(&app).await;
    let first = writer(&app).await;
    let failed_key = stage_one(&app, &first, "clicks", "a.jsonl").await;
    let r = app
        .complete_failed(&first.capability_token, "boom", true)
        .await;
    assert_eq!(r.body["state"], "ready", "{}", r.body);
    assert_eq!(r.body["versions"], json!([]));
    assert_eq!(versions(&app).await, 0, "a failed attempt commits nothing");

    app.skip_backoff(first.task_id).await;
    let retry = app.claim(first.task_id).await;
    let kept = stage_one(&app, &retry, "clicks", "b.jsonl").await;
    let r = app.complete_ok(&retry.capability_token, json!({})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(
        r.body["versions"],
        json!([{"dataset": "clicks", "version": 1}])
    );
    let m = manifest(&app, "clicks", 1).await;
    assert_eq!(keys(&m), std::slice::from_ref(&kept));
    assert!(!keys(&m).contains(&failed_key));
    assert_eq!(m["rows"], 2);
    let ds = app.get("/v1/datasets/clicks", &app.user_token).await;
    assert_eq!(ds.body["current_version"], 1);
    assert_eq!(ds.body["versions"][0]["attempt"], 2);
}

#[tokio::test]
async fn invariant_7_a_fenced_attempt_cannot_commit_and_its_parts_are_never_referenced() {
    let app = TestApp::spawn().await;
    create_datasets(&app).await;
    let stale = writer(&app).await;
    let stale_key = stage_one(&app, &stale, "clicks", "stale.jsonl").await;
    app.expire_lease(stale.task_id).await;
    let fresh = app.claim(stale.task_id).await;
    let fresh_key = stage_one(&app, &fresh, "clicks", "fresh.jsonl").await;
    let r = app.complete_ok(&fresh.capability_token, json!({})).await;
    assert_eq!(
        r.body["versions"],
        json!([{"dataset": "clicks", "version": 1}])
    );
    let r = app.complete_ok(&stale.capability_token, json!({})).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::CONFLICT, "stale_attempt"),
        "{}",
        r.body
    );
    assert_eq!(versions(&app).await, 1);
    let referenced: i64 = sqlx::query_scalar("SELECT count(*) FROM dataset_parts WHERE key = $1")
        .bind(&stale_key)
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(referenced, 0);
    assert_eq!(keys(&manifest(&app, "clicks", 1).await), [fresh_key]);
}

#[tokio::test]
async fn invariant_7_twenty_concurrent_appenders_make_twenty_versions_and_lose_no_part() {
    const N: usize = 20;
    let app = Arc::new(TestApp::spawn().await);
    create_datasets(&app).await;
    let mut claims = vec![];
    let mut all_keys = vec![];
    for i in 0..N {
        let c = writer(&app).await;
        all_keys.push(stage_one(&app, &c, "clicks", &format!("p{i}.jsonl")).await);
        claims.push(c);
    }
    let barrier = Arc::new(tokio::sync::Barrier::new(N));
    let mut running = tokio::task::JoinSet::new();
    for c in claims {
        let (app, barrier) = (app.clone(), barrier.clone());
        running.spawn(async move {
            barrier.wait().await;
            app.complete_ok(&c.capability_token, json!({})).await
        });
    }
    let mut numbers = vec![];
    while let Some(r) = running.join_next().await {
        let r = r.unwrap();
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        numbers.push(r.body["versions"][0]["version"].as_u64().unwrap());
    }
    numbers.sort();
    assert_eq!(
        numbers,
        (1..=N as u64).collect::<Vec<_>>(),
        "one version each, no gaps"
    );
    let last = manifest(&app, "clicks", N as u32).await;
    let mut got = keys(&last);
    got.sort();
    all_keys.sort();
    assert_eq!(got, all_keys, "the last version holds every appended part");
    assert_eq!(last["rows"], 2 * N as u64);
}

#[tokio::test]
async fn invariant_7_a_replayed_completion_answers_the_same_version_and_deletes_nothing() {
    let app = TestApp::spawn().await;
    create_datasets(&app).await;
    let claim = writer(&app).await;
    stage_one(&app, &claim, "clicks", "a.jsonl").await;
    let first = app
        .complete_ok(&claim.capability_token, json!({"n": 1}))
        .await;
    // The answer was lost; the worker replays the same completion.
    let replay = app
        .complete_ok(&claim.capability_token, json!({"n": 1}))
        .await;
    assert_eq!(replay.status, StatusCode::OK, "{}", replay.body);
    assert_eq!(replay.body, first.body);
    assert_eq!(versions(&app).await, 1);
    let manifest_key: String = sqlx::query_scalar("SELECT manifest_key FROM dataset_versions")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    let on_disk = app.objects_dir.join(&manifest_key);
    let body: Value =
        serde_json::from_slice(&std::fs::read(&on_disk).expect("the manifest is kept")).unwrap();
    assert_eq!(body["parts"].as_array().unwrap().len(), 1);
    assert_eq!(body["task_id"], json!(claim.task_id));
    let manifests = std::fs::read_dir(on_disk.parent().unwrap())
        .unwrap()
        .count();
    assert_eq!(manifests, 1, "the replay wrote no second manifest");
}

#[tokio::test]
async fn invariant_7_a_replace_version_holds_only_its_own_parts_and_a_cancelled_task_commits_nothing(
) {
    let app = TestApp::spawn().await;
    create_datasets(&app).await;
    let submit = || async {
        let job = app
            .submit(&json!({"name": "j", "tasks": [
                {"key": "w", "runtime": "exec", "bundle": "x", "outputs": ["other"]}]}))
            .await;
        app.claim(job.tasks[0].task_id).await
    };
    let one = submit().await;
    stage_one(&app, &one, "other", "v1.jsonl").await;
    app.complete_ok(&one.capability_token, json!({})).await;
    let two = submit().await;
    let second = stage_one(&app, &two, "other", "v2.jsonl").await;
    let r = app.complete_ok(&two.capability_token, json!({})).await;
    assert_eq!(
        r.body["versions"],
        json!([{"dataset": "other", "version": 2}])
    );
    let m = manifest(&app, "other", 2).await;
    assert_eq!(
        (keys(&m), m["rows"].clone(), m["parent"].clone()),
        (vec![second], json!(2), json!(1))
    );

    let three = submit().await;
    stage_one(&app, &three, "other", "v3.jsonl").await;
    let r = app
        .post(
            &format!("/v1/jobs/{}/cancel", three.job_id),
            &app.user_token,
            &json!({}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = app.complete_ok(&three.capability_token, json!({})).await;
    assert_eq!(r.body["state"], "cancelled", "{}", r.body);
    assert_eq!(r.body["versions"], json!([]));
    assert_eq!(versions(&app).await, 2);
}

#[tokio::test]
async fn invariant_7_a_version_and_its_manifest_list_the_same_parts() {
    let app = TestApp::spawn().await;
    create_datasets(&app).await;
    let claim = writer(&app).await;
    let a = stage_one(&app, &claim, "clicks", "a.jsonl").await;
    let fence = dispatcher::store::Fence {
        task_id: claim.task_id,
        job_id: claim.job_id,
        attempt: claim.attempt,
    };
    let (dataset_id, _, _) = app
        .store
        .dataset_schema(app.org_id, "clicks")
        .await
        .unwrap();
    let done = dispatcher::domain::Completion::Succeeded { output: json!({}) };
    // A manifest written before a second part was staged (a stage racing
    // the completion): the commit is refused, retryably, and nothing is
    // committed.
    let b = stage_one(&app, &claim, "clicks", "b.jsonl").await;
    let stale = dispatcher::store::WrittenManifest {
        dataset_id,
        key: "orgs/x/datasets/clicks/manifests/stale.json".into(),
        parts: vec![a.clone()],
    };
    let r = app.store.complete(fence, &done, &[stale]).await;
    assert!(
        matches!(r, Err(dispatcher::error::StoreError::Retry(_))),
        "{r:?}"
    );
    assert_eq!(versions(&app).await, 0);
    // Through the API: the manifest object lists exactly the version's parts.
    let r = app.complete_ok(&claim.capability_token, json!({})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let m = manifest(&app, "clicks", 1).await;
    let mut in_version = keys(&m);
    in_version.sort();
    let manifest_key: String = sqlx::query_scalar("SELECT manifest_key FROM dataset_versions")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    let object: Value =
        serde_json::from_slice(&app.objects.get(&manifest_key).await.unwrap()).unwrap();
    let mut in_manifest: Vec<String> = object["parts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["key"].as_str().unwrap().to_owned())
        .collect();
    in_manifest.sort();
    let mut want = vec![a, b];
    want.sort();
    assert_eq!(in_version, want);
    assert_eq!(in_manifest, want, "the manifest and the version agree");
}

/// Review M5: two batches whose entries commit to the same two datasets in
/// opposite orders. Each batch locks every dataset it commits to once, in
/// id order, after its jobs, so neither waits on the other in a cycle:
/// every entry of every round commits its version.
#[tokio::test]
async fn invariant_7_concurrent_batches_committing_to_the_same_datasets_in_opposite_orders_all_commit(
) {
    const ROUNDS: usize = 8;
    let app = Arc::new(TestApp::spawn().await);
    let columns = json!([
        {"name": "ts", "type": "timestamp", "nullable": false},
        {"name": "user_id", "type": "string", "nullable": false},
        {"name": "value", "type": "float64", "nullable": true}]);
    for name in ["d1", "d2"] {
        app.create_dataset(name, "append", columns.clone()).await;
    }
    let mut by_id: Vec<(uuid::Uuid, &str)> = Vec::new();
    for name in ["d1", "d2"] {
        let id: uuid::Uuid = sqlx::query_scalar("SELECT id FROM datasets WHERE name = $1")
            .bind(name)
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
        by_id.push((id, name));
    }
    by_id.sort();
    let (low, high) = (by_id[0].1, by_id[1].1);
    let mut committed = 0;
    for round in 0..ROUNDS {
        let mut claims = Vec::new();
        for _ in 0..4 {
            let job = app
                .submit(&json!({"name": "j", "tasks": [
                    {"key": "w", "runtime": "exec", "bundle": "x", "outputs": ["d1", "d2"]}]}))
                .await;
            claims.push((job.job_id, app.claim(job.tasks[0].task_id).await));
        }
        // A batch's entries run in job id order: X = the first two jobs
        // (high, then low), Y = the last two (low, then high).
        claims.sort_by_key(|(job, _)| *job);
        let mut batches = vec![Vec::new(), Vec::new()];
        for (i, (_, claim)) in claims.iter().enumerate() {
            let dataset = [high, low, low, high][i];
            let key = upload(&app, claim, &format!("r{round}-{i}.jsonl"), ROWS.as_bytes()).await;
            let r = stage(&app, claim, dataset, vec![part(&key, ROWS.as_bytes(), 2)]).await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.body);
            batches[i / 2].push(json!({"capability_token": claim.capability_token,
                                       "body": {"outcome": "succeeded", "output": {}}}));
        }
        let barrier = Arc::new(tokio::sync::Barrier::new(2));
        let mut running = tokio::task::JoinSet::new();
        for entries in batches {
            let (app, barrier) = (app.clone(), barrier.clone());
            running.spawn(async move {
                barrier.wait().await;
                app.post(
                    "/v1/task/complete-batch",
                    &app.worker_token,
                    &json!({"entries": entries}),
                )
                .await
            });
        }
        while let Some(r) = running.join_next().await {
            let r = r.unwrap();
            assert_eq!(r.status, StatusCode::OK, "{}", r.body);
            for entry in r.body["results"].as_array().unwrap() {
                assert!(
                    entry["result"]["versions"][0]["version"].is_u64(),
                    "round {round}: {entry}"
                );
                committed += 1;
            }
        }
    }
    assert_eq!(committed, 4 * ROUNDS);
    for name in ["d1", "d2"] {
        let ds = app
            .get(&format!("/v1/datasets/{name}"), &app.user_token)
            .await;
        assert_eq!(ds.body["current_version"], 2 * ROUNDS, "{}", ds.body);
    }
}

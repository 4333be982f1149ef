//! The commit protocol against a real dispatcher process that dies
//! (debug failpoint, like SIGKILL) after writing a manifest and before the
//! completion's transaction: no version is visible, the task's retry
//! commits exactly once, and retention removes the orphan manifest.

use std::time::Duration;

use chrono::Utc;
use dispatcher::objects::{LocalDirStore, ObjectStore};
use dispatcher_tests::stack::{Caller, Stack};
use serde_json::{json, Value};
use sha2::Digest;

const ROWS: &str = "{\"a\": 1}\n{\"a\": 2}\n";

/// Uploads and stages one part of `clicks`; the key a version then names
/// (staging's verified copy, outside the attempt's prefix).
async fn stage(caller: &Caller, claim: &Value, name: &str) -> String {
    let token = claim["capability_token"].as_str().unwrap();
    let key = caller.upload(claim, name, ROWS.as_bytes()).await;
    let part = json!({"key": key, "rows": 2, "bytes": ROWS.len(),
                      "sha256": hex::encode(sha2::Sha256::digest(ROWS.as_bytes()))});
    let (status, body) = caller
        .post(
            "/v1/task/dataset-stage",
            token,
            json!({"dataset": "clicks", "parts": [part]}),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let org: uuid::Uuid = claim["org_id"].as_str().unwrap().parse().unwrap();
    dispatcher::objects::committed_key(org, &key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invariant_7_a_crash_between_manifest_and_commit_leaves_no_version_and_the_retry_commits_once(
) {
    let mut stack = Stack::new().await;
    let store = dispatcher::store::Store::new(stack.db.pool.clone(), Default::default());
    let user = store.ensure_user("ada@e2e.test").await.unwrap();
    let ds = dispatcher::domain::new_dataset(
        serde_json::from_value(json!({"name": "clicks", "mode": "append",
            "columns": [{"name": "a", "type": "int64", "nullable": false}]}))
        .unwrap(),
    )
    .unwrap();
    store.create_dataset(stack.org_id, user, &ds).await.unwrap();
    let (_, ids) = stack
        .submit(
            json!({"name": "d", "tasks": [{"key": "w", "runtime": "exec", "bundle": "x",
                                               "outputs": ["clicks"], "max_attempts": 5}]}),
        )
        .await;
    let task = ids[0];
    let worker = stack
        .keys
        .mint_worker("e2e", Utc::now() + chrono::Duration::hours(1));
    let caller = Caller::new(&stack);

    stack.start_dispatcher("complete_after_manifest").await;
    let first = caller.claim(&worker, task, 2).await;
    let lost = stage(&caller, &first, "first.jsonl").await;
    let crashed = caller
        .post(
            "/v1/task/complete",
            first["capability_token"].as_str().unwrap(),
            json!({"outcome": "succeeded", "output": {}}),
        )
        .await;
    assert!(
        crashed.is_err(),
        "the completion got an answer: {crashed:?}"
    );
    assert!(stack.wait_dispatcher_exit(Duration::from_secs(10)).await);
    let pool = stack.db.pool.clone();
    let versions = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM dataset_versions")
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    assert_eq!(versions().await, 0, "no version is visible after the crash");
    let objects = LocalDirStore::new(stack.dir.join("objects"), "http://x", vec![2; 32]).unwrap();
    let manifests = objects
        .list(&format!("orgs/{}/datasets/clicks/manifests/", stack.org_id))
        .await
        .unwrap();
    assert_eq!(
        manifests.len(),
        1,
        "the manifest was written before the crash"
    );
    let orphan = manifests[0].key.clone();

    // The lease runs out; the retry (a new attempt) stages and commits once.
    let metrics_port = dispatcher_tests::free_port();
    stack.profile_env.push((
        "DISPATCHER_METRICS_BIND".into(),
        format!("127.0.0.1:{metrics_port}"),
    ));
    stack.start_dispatcher("").await;
    let second = caller.claim(&worker, task, 2).await;
    assert_eq!(second["attempt"], 2);
    let kept = stage(&caller, &second, "second.jsonl").await;
    let token = second["capability_token"].as_str().unwrap();
    let done = json!({"outcome": "succeeded", "output": {}});
    let (status, answer) = caller
        .post("/v1/task/complete", token, done.clone())
        .await
        .unwrap();
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer["versions"],
        json!([{"dataset": "clicks", "version": 1}])
    );
    let (_, replay) = caller.post("/v1/task/complete", token, done).await.unwrap();
    assert_eq!(replay, answer, "a replay answers the same");
    assert_eq!(versions().await, 1, "the retried task committed once");
    // The commit counter counts versions per completion answered 200: the
    // commit and its replay (docs/standards/metrics.md).
    let scraped = reqwest::get(format!("http://127.0.0.1:{metrics_port}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        scraped
            .lines()
            .any(|l| l == "dispatcher_dataset_commits_total 2"),
        "{scraped}"
    );
    let parts: Vec<String> = sqlx::query_scalar("SELECT key FROM dataset_parts")
        .fetch_all(&stack.db.pool)
        .await
        .unwrap();
    assert_eq!(parts, std::slice::from_ref(&kept));

    // Retention removes the orphan manifest and the first attempt's part.
    sqlx::query("UPDATE attempts SET finished_at = finished_at - interval '3 days' WHERE finished_at IS NOT NULL")
        .execute(&stack.db.pool)
        .await
        .unwrap();
    let report = dispatcher::services::retention::run(
        &store,
        &objects,
        Duration::from_secs(24 * 3600),
        false,
        |_| {},
    )
    .await
    .unwrap();
    let mut deleted = report.deleted.clone();
    deleted.sort();
    // Both attempts' uploads go too: versions name staging's copies.
    let upload_of = |k: &str| k.replacen("/committed/", "/", 1);
    let mut expected = vec![upload_of(&lost), upload_of(&kept), orphan, lost];
    expected.sort();
    assert_eq!(deleted, expected);
    assert!(objects.head(&kept).await.is_ok());
}

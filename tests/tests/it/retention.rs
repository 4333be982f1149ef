//! Retention (`dispatcher admin retention run`): deletes staged parts of
//! attempts that ended without committing and orphan manifests, past a
//! floor it enforces, and never anything a version references.

use std::path::Path;
use std::time::Duration;

use dispatcher::objects::{LocalDirStore, ObjectStore};
use dispatcher::services::retention;
use dispatcher_tests::TestApp;
use reqwest::StatusCode;
use serde_json::json;

use crate::staging::{create_datasets, part, stage, upload, writer, ROWS};

fn store_of(dir: &Path) -> LocalDirStore {
    LocalDirStore::new(dir, "http://127.0.0.1", vec![1; 32]).unwrap()
}

/// Moves every finished attempt's end `days` into the past (the database
/// clock is the one retention reads).
async fn age_attempts(app: &TestApp, days: i32) {
    sqlx::query(
        "UPDATE attempts SET finished_at = finished_at - $1 * interval '1 day' WHERE finished_at IS NOT NULL",
    )
    .bind(days)
    .execute(&app.db.pool)
    .await
    .unwrap();
}

#[tokio::test]
async fn retention_deletes_unreferenced_staging_and_orphan_manifests_and_never_a_referenced_part() {
    let app = TestApp::spawn().await;
    create_datasets(&app).await;
    // Attempt 1 stages a part and fails; attempt 2 stages another and commits.
    let first = writer(&app).await;
    let lost = upload(&app, &first, "lost.jsonl", ROWS.as_bytes()).await;
    stage(
        &app,
        &first,
        "clicks",
        vec![part(&lost, ROWS.as_bytes(), 2)],
    )
    .await;
    app.complete_failed(&first.capability_token, "boom", true)
        .await;
    // A manifest left by a transaction that did not commit (attempt 1's).
    let objects = store_of(&app.objects_dir);
    let orphan = format!(
        "orgs/{}/datasets/clicks/manifests/{}-1-{}.json",
        app.org_id,
        first.task_id,
        "c".repeat(64)
    );
    objects.put(&orphan, b"{}".to_vec()).await.unwrap();
    app.skip_backoff(first.task_id).await;
    let second = app.claim(first.task_id).await;
    let kept = upload(&app, &second, "kept.jsonl", ROWS.as_bytes()).await;
    stage(
        &app,
        &second,
        "clicks",
        vec![part(&kept, ROWS.as_bytes(), 2)],
    )
    .await;
    let r = app.complete_ok(&second.capability_token, json!({})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let manifest: String = sqlx::query_scalar("SELECT manifest_key FROM dataset_versions")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    // A still-running attempt's upload, and a buffer batch, are kept too.
    let running = writer(&app).await;
    let in_flight = upload(&app, &running, "in-flight.jsonl", ROWS.as_bytes()).await;

    // Fresh: nothing is old enough.
    let day = Duration::from_secs(24 * 3600);
    let report = retention::run(&app.store, &objects, day, false, |_| {})
        .await
        .unwrap();
    assert!(report.deleted.is_empty(), "{report:?}");

    age_attempts(&app, 3).await;
    let dry = retention::run(&app.store, &objects, day, true, |_| {})
        .await
        .unwrap();
    // Staging copied each verified part outside the attempt's prefix; the
    // version references the copy, so the uploads are garbage, and so is
    // the failed attempt's copy.
    let committed = |k: &str| dispatcher::objects::committed_key(app.org_id, k);
    let (lost_copy, kept_copy) = (committed(&lost), committed(&kept));
    let mut expected = vec![
        lost.clone(),
        orphan.clone(),
        lost_copy.clone(),
        kept.clone(),
    ];
    expected.sort();
    let mut got = dry.deleted.clone();
    got.sort();
    assert_eq!(got, expected, "the dry run names exactly the garbage");
    assert!(
        objects.head(&lost).await.is_ok(),
        "a dry run deletes nothing"
    );

    let report = retention::run(&app.store, &objects, day, false, |_| {})
        .await
        .unwrap();
    assert_eq!(report.deleted.len(), 4);
    for gone in [&lost, &orphan, &lost_copy, &kept] {
        assert!(objects.head(gone).await.is_err(), "{gone} was kept");
    }
    for live in [&kept_copy, &manifest, &in_flight] {
        assert!(objects.head(live).await.is_ok(), "{live} was deleted");
    }
    // The committed version still reads whole.
    let m = app
        .get("/v1/datasets/clicks/versions/1", &app.user_token)
        .await;
    assert_eq!(m.body["parts"][0]["key"], kept_copy.as_str());
}

#[tokio::test]
async fn retention_refuses_a_cutoff_below_its_floor() {
    let app = TestApp::spawn().await;
    let objects = store_of(&app.objects_dir);
    let floor = retention::floor(&app.settings);
    assert!(floor >= app.settings.lease_max + app.settings.token_grace);
    let err = retention::run(
        &app.store,
        &objects,
        floor - Duration::from_secs(1),
        false,
        |_| {},
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("below the floor"), "{err}");
    assert!(retention::run(&app.store, &objects, floor, true, |_| {})
        .await
        .is_ok());
}

//! The dataset registry (contract: "Datasets"): creation, org scoping,
//! strict validation, versions and manifests, and `reads` in a task's
//! capability scope.

use chrono::Utc;
use dispatcher::domain::Role;
use dispatcher_tests::{decode_claims, TestApp};
use reqwest::StatusCode;
use serde_json::{json, Value};
use uuid::Uuid;

fn clicks() -> Value {
    json!({"name": "clicks", "mode": "append", "columns": [
        {"name": "ts", "type": "timestamp", "nullable": false},
        {"name": "user_id", "type": "string", "nullable": false},
        {"name": "value", "type": "float64", "nullable": true}]})
}

async fn user_of(app: &TestApp, org: Uuid, email: &str, role: Role) -> String {
    let user = app.store.ensure_user(email).await.unwrap();
    app.store.set_membership(org, user, role).await.unwrap();
    app.keys
        .mint_user(user, org, Utc::now() + chrono::Duration::hours(1))
}

#[tokio::test]
async fn datasets_are_created_listed_and_read_within_their_org() {
    let app = TestApp::spawn().await;
    let r = app.post("/v1/datasets", &app.user_token, &clicks()).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    assert_eq!(r.body["name"], "clicks");
    assert_eq!(r.body["mode"], "append");
    assert_eq!(r.body["current_version"], Value::Null);
    assert_eq!(r.body["versions"], json!([]));
    assert_eq!(r.body["columns"], clicks()["columns"]);

    let again = app.post("/v1/datasets", &app.user_token, &clicks()).await;
    assert_eq!(
        (again.status, again.code()),
        (StatusCode::CONFLICT, "conflict")
    );

    let list = app.get("/v1/datasets", &app.user_token).await;
    assert_eq!(list.status, StatusCode::OK);
    assert_eq!(list.body["datasets"][0]["name"], "clicks");

    // A viewer reads but cannot create.
    let viewer = user_of(&app, app.org_id, "vic@acme.test", Role::Viewer).await;
    assert_eq!(
        app.get("/v1/datasets/clicks", &viewer).await.status,
        StatusCode::OK
    );
    let r = app
        .post(
            "/v1/datasets",
            &viewer,
            &json!({"name": "other", "mode": "stream", "columns": [{"name": "a", "type": "json"}]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);

    // Another org: not found, never its existence; and its own namespace.
    let globex = app.store.ensure_org("globex").await.unwrap();
    let outsider = user_of(&app, globex, "hank@globex.test", Role::Member).await;
    let r = app.get("/v1/datasets/clicks", &outsider).await;
    assert_eq!((r.status, r.code()), (StatusCode::NOT_FOUND, "not_found"));
    let r = app.get("/v1/datasets/clicks/versions/1", &outsider).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(
        app.get("/v1/datasets", &outsider).await.body["datasets"],
        json!([])
    );
    let r = app.post("/v1/datasets", &outsider, &clicks()).await;
    assert_eq!(
        r.status,
        StatusCode::CREATED,
        "the same name in another org"
    );
}

#[tokio::test]
async fn malformed_datasets_answer_400_naming_the_field_and_change_nothing() {
    let app = TestApp::spawn().await;
    let col = |n: &str, t: &str| json!({"name": n, "type": t});
    for (body, field) in [
        (
            json!({"name": "Bad", "mode": "append", "columns": [col("a", "string")]}),
            "name",
        ),
        (
            json!({"name": "x", "mode": "sometimes", "columns": [col("a", "string")]}),
            "mode",
        ),
        (
            json!({"name": "x", "mode": "append", "columns": []}),
            "columns",
        ),
        (
            json!({"name": "x", "mode": "append", "columns": [col("a", "decimal")]}),
            "columns[0].type",
        ),
        (
            json!({"name": "x", "mode": "append", "columns": [col("A b", "string")]}),
            "columns[0].name",
        ),
        (
            json!({"name": "x", "mode": "append", "columns": [col("a", "string"), col("a", "bool")]}),
            "columns[1].name",
        ),
        (
            json!({"name": "x", "mode": "append", "columns": [{"name": "a", "type": "bool", "extra": 1}]}),
            "columns[0]",
        ),
        (
            json!({"name": "x", "mode": "append", "columns": [col("a", "string")], "owner": "me"}),
            "owner",
        ),
    ] {
        let r = app.post("/v1/datasets", &app.user_token, &body).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}: {}", r.body);
        let message = r.body["error"]["message"].as_str().unwrap();
        assert!(
            message.starts_with(field) || message.contains(field),
            "{body}: {message:?} should name {field:?}"
        );
    }
    assert_eq!(
        app.get("/v1/datasets", &app.user_token).await.body["datasets"],
        json!([])
    );
    for bad in [
        "/v1/datasets/Nope",
        "/v1/datasets/clicks/versions/0",
        "/v1/datasets/clicks/versions/x",
    ] {
        let r = app.get(bad, &app.user_token).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}: {}", r.body);
    }
    let r = app.get("/v1/datasets/clicks", &app.user_token).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}

/// Commits a version by hand (the commit protocol is a later slice): the
/// version row and the parts it adds.
async fn commit_by_hand(app: &TestApp, name: &str, version: i32, parts: &[(&str, i64)]) {
    let rows: i64 = parts.iter().map(|p| p.1).sum();
    let mut tx = app.db.pool.begin().await.unwrap();
    let (id, mode): (Uuid, String) =
        sqlx::query_as("SELECT id, mode FROM datasets WHERE name = $1 AND org_id = $2")
            .bind(name)
            .bind(app.org_id)
            .fetch_one(&mut *tx)
            .await
            .unwrap();
    let parent_rows: i64 = if mode == "append" && version > 1 {
        sqlx::query_scalar(
            "SELECT rows FROM dataset_versions WHERE dataset_id = $1 AND version = $2",
        )
        .bind(id)
        .bind(version - 1)
        .fetch_one(&mut *tx)
        .await
        .unwrap()
    } else {
        0
    };
    sqlx::query(
        "INSERT INTO dataset_versions (dataset_id, version, parent, task_id, attempt, rows, manifest_key)
         VALUES ($1, $2, $3, $4, 1, $5, 'm')",
    )
    .bind(id)
    .bind(version)
    .bind((version > 1).then_some(version - 1))
    .bind(Uuid::now_v7())
    .bind(parent_rows + rows)
    .execute(&mut *tx)
    .await
    .unwrap();
    for (key, rows) in parts {
        sqlx::query(
            "INSERT INTO dataset_parts (dataset_id, version, key, rows, bytes, sha256)
             VALUES ($1, $2, $3, $4, 10, $5)",
        )
        .bind(id)
        .bind(version)
        .bind(key)
        .bind(rows)
        .bind("a".repeat(64))
        .execute(&mut *tx)
        .await
        .unwrap();
    }
    sqlx::query("UPDATE datasets SET current_version = $2 WHERE id = $1")
        .bind(id)
        .bind(version)
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
}

fn keys(manifest: &Value) -> Vec<&str> {
    manifest["parts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["key"].as_str().unwrap())
        .collect()
}

#[tokio::test]
async fn an_append_version_holds_its_parents_parts_and_a_replace_version_only_its_own() {
    let app = TestApp::spawn().await;
    app.post("/v1/datasets", &app.user_token, &clicks()).await;
    let mut replaced = clicks();
    replaced["name"] = json!("snapshot");
    replaced["mode"] = json!("replace");
    app.post("/v1/datasets", &app.user_token, &replaced).await;
    for ds in ["clicks", "snapshot"] {
        commit_by_hand(&app, ds, 1, &[("p1", 10), ("p2", 5)]).await;
        commit_by_hand(&app, ds, 2, &[("p3", 7)]).await;
    }
    let append = app
        .get("/v1/datasets/clicks/versions/2", &app.user_token)
        .await;
    assert_eq!(append.status, StatusCode::OK, "{}", append.body);
    assert_eq!(keys(&append.body), ["p1", "p2", "p3"]);
    assert_eq!(
        (append.body["rows"].clone(), append.body["parent"].clone()),
        (json!(22), json!(1))
    );
    let first = app
        .get("/v1/datasets/clicks/versions/1", &app.user_token)
        .await;
    assert_eq!(keys(&first.body), ["p1", "p2"]);
    let replace = app
        .get("/v1/datasets/snapshot/versions/2", &app.user_token)
        .await;
    assert_eq!(keys(&replace.body), ["p3"]);
    assert_eq!(replace.body["rows"], 7);
    let view = app.get("/v1/datasets/clicks", &app.user_token).await;
    assert_eq!(view.body["current_version"], 2);
    let versions: Vec<i64> = view.body["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["version"].as_i64().unwrap())
        .collect();
    assert_eq!(versions, [2, 1], "newest first");
    let r = app
        .get("/v1/datasets/clicks/versions/3", &app.user_token)
        .await;
    assert_eq!((r.status, r.code()), (StatusCode::NOT_FOUND, "not_found"));
}

#[tokio::test]
async fn reads_are_carried_into_the_task_spec_and_the_capability_token() {
    let app = TestApp::spawn().await;
    let job = app
        .submit(&json!({"name": "j", "tasks": [
            {"key": "a", "runtime": "exec", "bundle": "x", "outputs": ["out"], "reads": ["clicks", "users"]}
        ]}))
        .await;
    let claim = app.claim(job.tasks[0].task_id).await;
    assert_eq!(claim.task.reads, ["clicks", "users"]);
    let claims = decode_claims(&claim.capability_token);
    assert_eq!(claims["reads"], json!(["clicks", "users"]));
    assert_eq!(claims["datasets"], json!(["out"]));
    let hb = app
        .post("/v1/task/heartbeat", &claim.capability_token, &json!({}))
        .await;
    let refreshed = decode_claims(hb.body["capability_token"].as_str().unwrap());
    assert_eq!(
        refreshed["reads"],
        json!(["clicks", "users"]),
        "kept by heartbeats"
    );
    let r = app
        .post(
            "/v1/jobs",
            &app.user_token,
            &json!({"name": "j", "tasks": [{"key": "a", "runtime": "exec", "bundle": "x", "reads": ["Bad"]}]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.body["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("tasks[0].reads[0]"));
}

//! `POST /v1/task/objects` (contract: "Objects a task may touch"): a task
//! gets presigned URLs only inside its scope, on the local profile served by
//! the dispatcher itself.

use dispatcher_tests::TestApp;
use reqwest::StatusCode;
use serde_json::json;
use uuid::Uuid;

async fn urls(
    app: &TestApp,
    token: &str,
    method: &str,
    keys: &[&str],
) -> dispatcher_tests::Response {
    app.post(
        "/v1/task/objects",
        token,
        &json!({"method": method, "keys": keys}),
    )
    .await
}

fn url_of(r: &dispatcher_tests::Response, i: usize) -> String {
    r.body["urls"][i]["url"].as_str().expect("url").to_owned()
}

#[tokio::test]
async fn a_task_puts_and_gets_under_its_own_prefix_through_presigned_urls() {
    let app = TestApp::spawn().await;
    let task = app.single_task(3).await;
    let claim = app.claim(task).await;
    let token_prefix = dispatcher_tests::decode_claims(&claim.capability_token)["prefixes"][0]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        claim.object_prefix, token_prefix,
        "the claim names the prefix"
    );
    assert!(claim
        .object_prefix
        .contains(&format!("/attempts/{}/", claim.attempt)));

    let r = urls(
        &app,
        &claim.capability_token,
        "PUT",
        &["parts/part-00000.jsonl"],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let key = format!("{}parts/part-00000.jsonl", claim.object_prefix);
    assert_eq!(r.body["urls"][0]["key"], key.as_str());
    assert!(r.body["urls"][0]["expires_at"].is_string());
    let http = reqwest::Client::new();
    let put = http
        .put(url_of(&r, 0))
        .body("{\"a\": 1}\n")
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), StatusCode::OK);
    // The URL names one key: it cannot write another.
    let other = url_of(&r, 0).replace("part-00000", "part-00001");
    assert_eq!(
        http.put(other).body("x").send().await.unwrap().status(),
        StatusCode::FORBIDDEN
    );

    let r = urls(&app, &claim.capability_token, "GET", &[&key]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let got = http.get(url_of(&r, 0)).send().await.unwrap();
    assert_eq!(got.text().await.unwrap(), "{\"a\": 1}\n");
}

#[tokio::test]
async fn keys_outside_the_scope_are_refused_and_nothing_is_minted() {
    let app = TestApp::spawn().await;
    let job = app
        .submit(&json!({"name": "j", "tasks": [
            {"key": "a", "runtime": "exec", "bundle": "x", "reads": ["clicks"]},
            {"key": "b", "runtime": "exec", "bundle": "x"}
        ]}))
        .await;
    let a = app.claim(job.tasks[0].task_id).await;
    let b = app.claim(job.tasks[1].task_id).await;
    let token = a.capability_token.as_str();

    for (bad, field) in [
        ("../escape", "keys[0]"),
        ("/abs", "keys[0]"),
        ("a//b", "keys[0]"),
    ] {
        let r = urls(&app, token, "PUT", &[bad]).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}: {}", r.body);
        assert!(r.body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with(field));
    }
    let r = urls(&app, token, "PUT", &[]).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = app
        .post(
            "/v1/task/objects",
            token,
            &json!({"method": "DELETE", "keys": ["x"]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);

    // Another attempt's objects, even of the same job: refused, and a call
    // mixing an allowed key with it mints nothing.
    let mine = format!("{}ok.jsonl", a.object_prefix);
    let theirs = format!("{}secret.jsonl", b.object_prefix);
    let r = urls(&app, token, "GET", &[&mine, &theirs]).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::FORBIDDEN, "forbidden"),
        "{}",
        r.body
    );
    assert!(r.body.get("urls").is_none());

    // A part of a committed version of a dataset in `reads` is readable;
    // the same key is not for a task that may not read the dataset.
    let part = "orgs/x/datasets/clicks/part-1.jsonl";
    commit_part(&app, "clicks", part).await;
    let r = urls(&app, token, "GET", &[part]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let r = urls(&app, &b.capability_token, "GET", &[part]).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
    // A dataset of that name in another org does not make it readable.
    let other_part = "orgs/y/datasets/clicks/part-9.jsonl";
    let globex = app.store.ensure_org("globex").await.unwrap();
    commit_part_in(&app, globex, "clicks", other_part).await;
    let r = urls(&app, token, "GET", &[other_part]).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
}

#[tokio::test]
async fn a_fenced_attempt_gets_no_urls() {
    let app = TestApp::spawn().await;
    let task = app.single_task(3).await;
    let first = app.claim(task).await;
    app.expire_lease(task).await;
    let r = urls(&app, &first.capability_token, "PUT", &["late.jsonl"]).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::CONFLICT, "lease_expired"),
        "{}",
        r.body
    );
    let _second = app.claim(task).await;
    let r = urls(&app, &first.capability_token, "PUT", &["late.jsonl"]).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::CONFLICT, "stale_attempt"),
        "{}",
        r.body
    );
}

async fn commit_part(app: &TestApp, dataset: &str, key: &str) {
    commit_part_in(app, app.org_id, dataset, key).await
}

/// A dataset with one committed version holding `key` (the commit protocol
/// is a later slice; the registry's tables are written by hand here).
async fn commit_part_in(app: &TestApp, org: Uuid, dataset: &str, key: &str) {
    let id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO datasets (id, org_id, name, mode, columns, current_version)
         VALUES ($1, $2, $3, 'append', $4, 1)",
    )
    .bind(id)
    .bind(org)
    .bind(dataset)
    .bind(json!([{"name": "a", "type": "int64", "nullable": true}]))
    .execute(&app.db.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO dataset_versions (dataset_id, version, task_id, attempt, rows, manifest_key)
         VALUES ($1, 1, $2, 1, 1, 'm')",
    )
    .bind(id)
    .bind(Uuid::now_v7())
    .execute(&app.db.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO dataset_parts (dataset_id, version, key, rows, bytes, sha256)
         VALUES ($1, 1, $2, 1, 9, $3)",
    )
    .bind(id)
    .bind(key)
    .bind("b".repeat(64))
    .execute(&app.db.pool)
    .await
    .unwrap();
}

/// On the aws profile the same call presigns S3: a task's URL writes its
/// object into the bucket, and only that key.
#[tokio::test]
async fn on_s3_a_task_puts_through_a_presigned_url() {
    use dispatcher::objects::ObjectStore;
    let moto = dispatcher_tests::moto::Moto::start().await;
    let s3 = std::sync::Arc::new(moto.s3_store().await);
    let app = TestApp::spawn_with_objects(Default::default(), Some(s3.clone())).await;
    let task = app.single_task(3).await;
    let claim = app.claim(task).await;
    let r = urls(&app, &claim.capability_token, "PUT", &["part-0.jsonl"]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let put = reqwest::Client::new()
        .put(url_of(&r, 0))
        .body("{\"a\": 1}\n")
        .send()
        .await
        .unwrap();
    assert!(put.status().is_success(), "{}", put.status());
    let key = format!("{}part-0.jsonl", claim.object_prefix);
    assert_eq!(s3.get(&key).await.unwrap(), b"{\"a\": 1}\n");
}

/// `POST /v1/task/credentials` on the aws profile (STS on moto's server):
/// the session policy names exactly the attempt's prefix (write, read)
/// and the committed copies of its `reads`' parts (read, never the
/// staging attempt's keys, which that attempt could still rewrite); a stale attempt gets
/// nothing; the local profile has no STS. moto's STS returns credentials
/// without enforcing the policy (nor does its S3 check them), so the
/// policy is checked as the dispatcher sends it; AWS enforces it.
#[tokio::test]
async fn invariant_9_sts_credentials_are_scoped_to_the_attempt_prefix_and_readable_parts() {
    let moto = dispatcher_tests::moto::Moto::start().await;
    let cfg = moto.s3_config().await;
    let s3 = std::sync::Arc::new(dispatcher::objects::S3Store::connect(&cfg).await.unwrap());
    let sts =
        dispatcher::objects::sts::StsIssuer::new(&cfg, "arn:aws:iam::123456789012:role/tasks")
            .await;
    let app = TestApp::spawn_with_sts(s3, sts).await;
    app.create_dataset("clicks", "append", json!([{"name": "a", "type": "string"}]))
        .await;
    let writer = app
        .submit(&json!({"name": "w", "tasks": [{"key": "w", "runtime": "exec", "bundle": "x", "outputs": ["clicks"]}]}))
        .await;
    let w = app.claim(writer.tasks[0].task_id).await;
    let body = b"{\"a\": \"x\"}\n";
    let part = format!("{}p.jsonl", w.object_prefix);
    app.objects.put(&part, body.to_vec()).await.unwrap();
    let r = app
        .post(
            "/v1/task/dataset-stage",
            &w.capability_token,
            &json!({"dataset": "clicks", "parts": [{"key": part, "rows": 1, "bytes": body.len(),
                    "sha256": hex::encode(<sha2::Sha256 as sha2::Digest>::digest(body))}]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    app.complete_ok(&w.capability_token, json!({})).await;

    let (task, claim) = app.claimed_reader(&["clicks"]).await;
    let r = app
        .post("/v1/task/credentials", &claim.capability_token, &json!({}))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let own = format!("arn:aws:s3:::{}/{}*", cfg.bucket, claim.object_prefix);
    assert_eq!(r.body["prefix"], json!(claim.object_prefix));
    assert_eq!(r.body["bucket"], json!(cfg.bucket));
    assert_eq!(r.body["policy"]["Statement"][0]["Resource"], json!([own]));
    assert_eq!(
        r.body["policy"]["Statement"][1]["Resource"],
        json!([
            own,
            format!(
                "arn:aws:s3:::{}/{}",
                cfg.bucket,
                dispatcher::objects::committed_key(app.org_id, &part)
            )
        ])
    );
    for field in ["access_key_id", "secret_access_key", "session_token"] {
        assert!(!r.body[field].as_str().unwrap().is_empty(), "{field}");
    }
    // STS sessions last at least 15 minutes; the policy's power ends with
    // the lease, and the answer says so.
    let lease_end = claim
        .lease_expires_at
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    for st in r.body["policy"]["Statement"].as_array().unwrap() {
        assert_eq!(
            st["Condition"],
            json!({"DateLessThan": {"aws:CurrentTime": lease_end}}),
            "{st}"
        );
    }
    let expires: chrono::DateTime<chrono::Utc> =
        serde_json::from_value(r.body["expires_at"].clone()).unwrap();
    assert!(
        (expires - claim.lease_expires_at).num_seconds().abs() <= 1,
        "{expires} vs the lease's {}",
        claim.lease_expires_at
    );

    // A superseded attempt gets nothing.
    app.supersede(task).await;
    let r = app
        .post("/v1/task/credentials", &claim.capability_token, &json!({}))
        .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::CONFLICT, "stale_attempt"),
        "{}",
        r.body
    );

    // The local profile mints none.
    let local = TestApp::spawn().await;
    let t = local.single_task(1).await;
    let c = local.claim(t).await;
    let r = local
        .post("/v1/task/credentials", &c.capability_token, &json!({}))
        .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::NOT_FOUND, "not_found"),
        "{}",
        r.body
    );
}

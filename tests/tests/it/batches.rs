//! Batched calls (contract: "Batched calls"): `task-claim-batch` by ids and
//! by `max_tasks`, and `heartbeat-batch`, each entry fenced, authorized and
//! answered on its own, in order, exactly as the single call would be.

use dispatcher_tests::{unthrottled, TestApp};
use proptest::test_runner::TestRunner;
use reqwest::StatusCode;
use serde_json::{json, Value};
use uuid::Uuid;

async fn flat(app: &TestApp, n: usize) -> Vec<Uuid> {
    let tasks: Vec<Value> = (0..n)
        .map(|i| json!({"key": format!("t{i}"), "runtime": "exec", "bundle": "x", "max_attempts": 5}))
        .collect();
    app.submit(&json!({"name": "b", "tasks": tasks}))
        .await
        .tasks
        .iter()
        .map(|t| t.task_id)
        .collect()
}

async fn claim_batch(app: &TestApp, body: Value) -> (StatusCode, Value) {
    let r = app
        .post("/internal/task-claim-batch", &app.worker_token, &body)
        .await;
    (r.status, r.body)
}

#[tokio::test]
async fn claim_batch_by_ids_answers_each_id_in_order_as_the_single_claim_would() {
    let app = TestApp::spawn_with(unthrottled()).await;
    let job = app
        .submit(&json!({"name": "b", "tasks": [
            {"key": "a", "runtime": "exec", "bundle": "x"},
            {"key": "b", "runtime": "exec", "bundle": "x", "depends_on": ["a"]}]}))
        .await;
    let (a, b) = (job.tasks[0].task_id, job.tasks[1].task_id);
    let unknown = Uuid::new_v4();
    let (s, body) = claim_batch(
        &app,
        json!({"worker_id": "w1", "task_ids": [b, a, unknown, a], "lease_seconds": 30}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let claims = body["claims"].as_array().unwrap();
    assert_eq!(claims.len(), 4);
    assert_eq!(claims[0]["task_id"], b.to_string());
    assert_eq!(claims[0]["error"]["code"], "not_claimable");
    assert_eq!(claims[1]["claim"]["attempt"], 1);
    assert_eq!(claims[2]["error"]["code"], "not_found");
    // The same id twice: one claim; the second is answered as a second
    // single claim would be (the task is now leased).
    assert_eq!(claims[3]["error"]["code"], "not_claimable");
    // The claim's token works.
    let token = claims[1]["claim"]["capability_token"].as_str().unwrap();
    let r = app.post("/v1/task/heartbeat", token, &json!({})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
}

#[tokio::test]
async fn claim_batch_by_max_tasks_takes_ready_work_without_a_wakeup_and_never_twice() {
    let app = TestApp::spawn_with(unthrottled()).await;
    let ids = flat(&app, 5).await;
    let (s, first) = claim_batch(&app, json!({"worker_id": "w1", "max_tasks": 3})).await;
    assert_eq!(s, StatusCode::OK, "{first}");
    let (_, second) = claim_batch(&app, json!({"worker_id": "w2", "max_tasks": 5})).await;
    let (_, third) = claim_batch(&app, json!({"worker_id": "w3", "max_tasks": 5})).await;
    let taken = |v: &Value| -> Vec<String> {
        v["claims"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                assert!(c.get("error").is_none(), "{c}");
                c["claim"]["task_id"].as_str().unwrap().to_owned()
            })
            .collect()
    };
    let (a, b, c) = (taken(&first), taken(&second), taken(&third));
    assert_eq!((a.len(), b.len(), c.len()), (3, 2, 0));
    let mut all: Vec<String> = a.into_iter().chain(b).collect();
    all.sort();
    let mut want: Vec<String> = ids.iter().map(Uuid::to_string).collect();
    want.sort();
    assert_eq!(all, want, "every ready task claimed exactly once");
}

#[tokio::test]
async fn rule_a_claim_of_ready_work_takes_only_tasks_of_the_runtimes_it_names() {
    let app = TestApp::spawn_with(unthrottled()).await;
    let ids = flat(&app, 3).await;
    // A worker without exec (say, a Python-only host) is given none.
    let (s, none) = claim_batch(
        &app,
        json!({"worker_id": "py", "max_tasks": 5, "runtimes": ["python", "node"]}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{none}");
    assert_eq!(none["claims"], json!([]), "{none}");
    let (_, some) = claim_batch(
        &app,
        json!({"worker_id": "ex", "max_tasks": 5, "runtimes": ["node", "exec"]}),
    )
    .await;
    assert_eq!(
        some["claims"].as_array().unwrap().len(),
        ids.len(),
        "{some}"
    );
}

#[tokio::test]
async fn claim_batch_refuses_bad_input_and_non_worker_tokens_and_claims_nothing() {
    let app = TestApp::spawn_with(unthrottled()).await;
    let ids = flat(&app, 2).await;
    let too_many: Vec<Uuid> = (0..101).map(|_| Uuid::new_v4()).collect();
    for body in [
        json!({"worker_id": "w", "task_ids": ids, "max_tasks": 1}),
        json!({"worker_id": "w"}),
        json!({"worker_id": "w", "task_ids": []}),
        json!({"worker_id": "w", "task_ids": too_many}),
        json!({"worker_id": "w", "max_tasks": 0}),
        json!({"worker_id": "bad id!", "max_tasks": 1}),
        json!({"worker_id": "w", "max_tasks": 1, "runtimes": []}),
        json!({"worker_id": "w", "max_tasks": 1, "runtimes": ["cobol"]}),
        json!({"worker_id": "w", "task_ids": ids, "runtimes": ["exec"]}),
    ] {
        let (s, answer) = claim_batch(&app, body.clone()).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}: {answer}");
        assert_eq!(answer["error"]["code"], "invalid_request");
    }
    let r = app
        .post(
            "/internal/task-claim-batch",
            &app.user_token,
            &json!({"worker_id": "w", "max_tasks": 1}),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let leased: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks WHERE state = 'leased'")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(leased, 0);
}

/// What an entry of a random batch is.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Live,
    Stale,
    Expired,
    BadToken,
    BadBody,
}

fn kind(n: u8) -> Kind {
    match n % 5 {
        0 => Kind::Live,
        1 => Kind::Stale,
        2 => Kind::Expired,
        3 => Kind::BadToken,
        _ => Kind::BadBody,
    }
}

/// The status and error code of a single heartbeat or of a batch entry.
fn verdict(status: StatusCode, body: &Value) -> (bool, String) {
    (
        status.is_success(),
        body["error"]["code"].as_str().unwrap_or("").to_owned(),
    )
}

async fn heartbeat_case(app: &TestApp, kinds: Vec<u8>) {
    let ids = flat(app, kinds.len()).await;
    let mut entries = Vec::new();
    for (n, id) in kinds.iter().zip(&ids) {
        let claim = app.claim(*id).await;
        let (token, body) = match kind(*n) {
            Kind::Live => (claim.capability_token, json!({"progress": {"n": n}})),
            Kind::Stale => {
                app.supersede(*id).await;
                (claim.capability_token, json!({}))
            }
            Kind::Expired => {
                app.expire_lease(*id).await;
                (claim.capability_token, json!({}))
            }
            Kind::BadToken => (format!("{}x", claim.capability_token), json!({})),
            Kind::BadBody => (
                claim.capability_token,
                json!({"progress": 1, "extra": true}),
            ),
        };
        entries.push(json!({"capability_token": token, "body": body}));
    }
    let r = app
        .post(
            "/v1/task/heartbeat-batch",
            &app.worker_token,
            &json!({"entries": entries}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let results = r.body["results"].as_array().unwrap().clone();
    assert_eq!(results.len(), entries.len());
    for (i, (entry, result)) in entries.iter().zip(&results).enumerate() {
        // The single call, with the same token and body, now.
        let single = app
            .post(
                "/v1/task/heartbeat",
                entry["capability_token"].as_str().unwrap(),
                &entry["body"],
            )
            .await;
        let batch = (
            result.get("result").is_some(),
            result["error"]["code"].as_str().unwrap_or("").to_owned(),
        );
        assert_eq!(
            batch,
            verdict(single.status, &single.body),
            "entry {i} ({:?}): batch {result}, single {}",
            kind(kinds[i]),
            single.body
        );
        if let Some(ok) = result.get("result") {
            assert!(ok["capability_token"].is_string());
            assert_eq!(result["task_id"], ids[i].to_string());
        }
    }
}

#[test]
fn heartbeat_batch_random_mixes_of_live_stale_expired_and_malformed_entries_answer_each_as_the_single_call(
) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let app = rt.block_on(TestApp::spawn_with(unthrottled()));
    let mut config = dispatcher_tests::proptest_config();
    config.cases = config.cases.min(16);
    let mut runner = TestRunner::new(config);
    let result = runner.run(&proptest::collection::vec(0u8..5, 1..12), |kinds| {
        rt.block_on(heartbeat_case(&app, kinds));
        Ok(())
    });
    drop(app);
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// What an entry of a random completion batch is.
#[derive(Debug, Clone, Copy)]
enum Done {
    Succeed,
    FailRetryable,
    Stale,
    Expired,
    /// Completed (the same way) by a single call before the batch.
    Replay,
    /// Completed another way before the batch.
    Conflict,
    BadBody,
}

fn done(n: u8) -> Done {
    match n % 7 {
        0 => Done::Succeed,
        1 => Done::FailRetryable,
        2 => Done::Stale,
        3 => Done::Expired,
        4 => Done::Replay,
        5 => Done::Conflict,
        _ => Done::BadBody,
    }
}

async fn complete_case(app: &TestApp, kinds: Vec<u8>) {
    let ids = flat(app, kinds.len()).await;
    let ok = json!({"outcome": "succeeded", "output": {"n": 1}});
    let mut entries = Vec::new();
    for (n, id) in kinds.iter().zip(&ids) {
        let claim = app.claim(*id).await;
        let token = claim.capability_token.clone();
        let body = match done(*n) {
            Done::Succeed => ok.clone(),
            Done::FailRetryable => {
                json!({"outcome": "failed", "error": {"message": "boom", "retryable": true}})
            }
            Done::Stale => {
                app.supersede(*id).await;
                ok.clone()
            }
            Done::Expired => {
                app.expire_lease(*id).await;
                ok.clone()
            }
            Done::Replay => {
                let r = app.post("/v1/task/complete", &token, &ok).await;
                assert_eq!(r.status, StatusCode::OK);
                ok.clone()
            }
            Done::Conflict => {
                let r = app
                    .post(
                        "/v1/task/complete",
                        &token,
                        &json!({"outcome": "succeeded", "output": {"other": true}}),
                    )
                    .await;
                assert_eq!(r.status, StatusCode::OK);
                ok.clone()
            }
            Done::BadBody => json!({"outcome": "bogus"}),
        };
        entries.push(json!({"capability_token": token, "body": body}));
    }
    let r = app
        .post(
            "/v1/task/complete-batch",
            &app.worker_token,
            &json!({"entries": entries}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let results = r.body["results"].as_array().unwrap().clone();
    assert_eq!(results.len(), entries.len());
    for (i, (entry, result)) in entries.iter().zip(&results).enumerate() {
        // The single call now: a replay of what the batch committed gets
        // the very answer; a refusal, the same code.
        let single = app
            .post(
                "/v1/task/complete",
                entry["capability_token"].as_str().unwrap(),
                &entry["body"],
            )
            .await;
        match result.get("result") {
            Some(answer) => {
                assert_eq!(single.status, StatusCode::OK, "entry {i}: {}", single.body);
                assert_eq!(answer, &single.body, "entry {i} ({:?})", done(kinds[i]));
            }
            None => assert_eq!(
                result["error"]["code"],
                single.body["error"]["code"],
                "entry {i} ({:?}): batch {result}, single {}",
                done(kinds[i]),
                single.body
            ),
        }
    }
    // And the tasks are where the answers say.
    for (n, id) in kinds.iter().zip(&ids) {
        let state: String = sqlx::query_scalar("SELECT state FROM tasks WHERE id = $1")
            .bind(id)
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
        let want = match done(*n) {
            Done::Succeed | Done::Replay | Done::Conflict => "succeeded",
            Done::FailRetryable => "ready",
            Done::Stale | Done::BadBody => "leased",
            Done::Expired => "leased",
        };
        assert_eq!(state, want, "{:?}", done(*n));
    }
}

#[test]
fn complete_batch_random_mixes_answer_each_entry_as_the_single_call_and_commit_the_same() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let app = rt.block_on(TestApp::spawn_with(unthrottled()));
    let mut config = dispatcher_tests::proptest_config();
    config.cases = config.cases.min(16);
    let mut runner = TestRunner::new(config);
    let result = runner.run(&proptest::collection::vec(0u8..7, 1..12), |kinds| {
        rt.block_on(complete_case(&app, kinds));
        Ok(())
    });
    drop(app);
    if let Err(e) = result {
        panic!("{e}");
    }
}

#[tokio::test]
async fn complete_batch_commits_dataset_versions_exactly_as_single_completions() {
    let app = TestApp::spawn_with(unthrottled()).await;
    app.create_dataset("clicks", "append", json!([{"name": "a", "type": "int64"}]))
        .await;
    let job = app
        .submit(&json!({"name": "d", "tasks": [
            {"key": "w1", "runtime": "exec", "bundle": "x", "outputs": ["clicks"]},
            {"key": "w2", "runtime": "exec", "bundle": "x", "outputs": ["clicks"]}]}))
        .await;
    let mut entries = Vec::new();
    for t in &job.tasks {
        let claim = app.claim(t.task_id).await;
        let body = b"{\"a\": 1}\n{\"a\": 2}\n";
        let key = format!("{}part.jsonl", claim.object_prefix);
        app.objects.put(&key, body.to_vec()).await.unwrap();
        let sum = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(body));
        let r = app
            .post(
                "/v1/task/dataset-stage",
                &claim.capability_token,
                &json!({"dataset": "clicks", "parts": [{"key": key, "rows": 2, "bytes": body.len(), "sha256": sum}]}),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        entries.push(json!({"capability_token": claim.capability_token,
                            "body": {"outcome": "succeeded", "output": {}}}));
    }
    let r = app
        .post(
            "/v1/task/complete-batch",
            &app.worker_token,
            &json!({"entries": entries}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let mut versions: Vec<u64> = r.body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["result"]["versions"][0]["version"].as_u64().unwrap())
        .collect();
    versions.sort();
    assert_eq!(versions, [1, 2], "one version per task, in one transaction");
    let ds = app.get("/v1/datasets/clicks", &app.user_token).await;
    assert_eq!(ds.body["current_version"], 2);
    let manifest = app
        .get("/v1/datasets/clicks/versions/2", &app.user_token)
        .await;
    assert_eq!(manifest.status, StatusCode::OK, "{}", manifest.body);
    assert_eq!(manifest.body["parts"].as_array().map(Vec::len), Some(2));
}

/// The successes of leaves take the batch's one-statement path; a task
/// with a dependant takes the ordinary one. Both must write the same: the
/// same answer and attempt record, the task in the same state. A task named
/// twice in one batch is answered once as a success and once as the single
/// call answers a second, different completion: a conflict.
#[tokio::test]
async fn complete_batch_leaf_path_writes_what_the_ordinary_path_writes() {
    let app = TestApp::spawn().await;
    let job = app
        .submit(&json!({"name": "paths", "tasks": [
            {"key": "root", "runtime": "exec", "bundle": "x"},
            {"key": "after", "runtime": "exec", "bundle": "x", "depends_on": ["root"]},
            {"key": "leaf", "runtime": "exec", "bundle": "x"},
            {"key": "twice", "runtime": "exec", "bundle": "x"}
        ]}))
        .await;
    let id = |key: &str| job.tasks.iter().find(|t| t.key == key).unwrap().task_id;
    let (root, leaf, twice) = (
        app.claim(id("root")).await,
        app.claim(id("leaf")).await,
        app.claim(id("twice")).await,
    );
    let ok = json!({"outcome": "succeeded", "output": {"n": 1}});
    let other = json!({"outcome": "succeeded", "output": {"n": 2}});
    let r = app
        .post(
            "/v1/task/complete-batch",
            &app.worker_token,
            &json!({"entries": [
                {"capability_token": root.capability_token, "body": ok},
                {"capability_token": leaf.capability_token, "body": ok},
                {"capability_token": twice.capability_token, "body": ok},
                {"capability_token": twice.capability_token, "body": other}
            ]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let results = r.body["results"].as_array().unwrap();
    let strip = |v: &Value| {
        let mut v = v.clone();
        v.as_object_mut().unwrap().remove("task_id");
        v
    };
    assert_eq!(strip(&results[0]["result"]), strip(&results[1]["result"]));
    assert_eq!(results[0]["result"]["state"], "succeeded");
    let twice_codes: Vec<Value> = results[2..]
        .iter()
        .map(|r| r.get("error").map_or(json!("ok"), |e| e["code"].clone()))
        .collect();
    assert_eq!(twice_codes, [json!("ok"), json!("conflict")]);
    type Row = (String, bool, bool, String, bool, Value, Value);
    let row = |task: Uuid| {
        let pool = app.db.pool.clone();
        async move {
            sqlx::query_as::<_, Row>(
                "SELECT t.state, t.lease_expires_at IS NULL, t.not_before IS NULL,
                        a.outcome, a.finished_at IS NOT NULL, a.completion,
                        a.response - 'task_id'
                   FROM tasks t JOIN attempts a ON a.task_id = t.id AND a.attempt = t.attempt
                  WHERE t.id = $1",
            )
            .bind(task)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    assert_eq!(row(root.task_id).await, row(leaf.task_id).await);
    // The dependant was released by the ordinary path.
    let after: String = sqlx::query_scalar("SELECT state FROM tasks WHERE id = $1")
        .bind(id("after"))
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(after, "ready");
}

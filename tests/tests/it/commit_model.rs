//! Property test of the commit protocol (invariant 7): random interleavings
//! of claim, stage, succeed, fail, lease expiry and backoff expiry for
//! several tasks writing one dataset (`append` or `replace`), through the
//! real API. After every step:
//! * the current version's parts are exactly the union of the parts of the
//!   attempts whose completion committed (`append`), or the last such
//!   attempt's parts (`replace`);
//! * no part of an attempt whose completion did not commit is referenced by
//!   any version;
//! * each committing completion got the next version number.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};

use dispatcher_tests::TestApp;
use dispatcher_wire::ClaimResponse;
use proptest::prelude::*;
use proptest::test_runner::{TestCaseError, TestRunner};
use reqwest::StatusCode;
use serde_json::json;
use sha2::Digest;

const TASKS: usize = 2;
const ROWS: &str = "{\"ts\": \"2026-01-01T00:00:00Z\", \"user_id\": \"a\"}\n";

#[derive(Debug, Clone)]
enum Op {
    Claim(usize),
    Stage(usize),
    Succeed(usize),
    Fail(usize),
    Expire(usize),
    EndBackoff(usize),
    /// The lease runs out and the task is claimed again at once (a dead
    /// worker's task retried): the interleaving that most tests the fence.
    Retry(usize),
}

fn op() -> impl Strategy<Value = Op> {
    let t = 0..TASKS;
    prop_oneof![
        3 => t.clone().prop_map(Op::Claim),
        3 => t.clone().prop_map(Op::Stage),
        2 => t.clone().prop_map(Op::Succeed),
        2 => t.clone().prop_map(Op::Fail),
        2 => t.clone().prop_map(Op::Expire),
        2 => t.clone().prop_map(Op::EndBackoff),
        3 => t.clone().prop_map(Op::Retry),
    ]
}

/// What the test knows of one task's newest attempt.
#[derive(Default)]
struct TaskModel {
    claim: Option<ClaimResponse>,
    staged: BTreeSet<String>,
    uploads: usize,
    /// Its completion was answered 200 (later ones are replays).
    done: bool,
}

static CASE: AtomicUsize = AtomicUsize::new(0);

/// Ends the task's lease now, if it is leased (moving the database clock).
async fn expire(app: &TestApp, task: uuid::Uuid) {
    sqlx::query(
        "UPDATE tasks SET lease_expires_at = now() - interval '1 second'
          WHERE id = $1 AND state = 'leased'",
    )
    .bind(task)
    .execute(&app.db.pool)
    .await
    .unwrap();
}

async fn run_case(app: &TestApp, append: bool, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let name = format!("ds{}", CASE.fetch_add(1, Ordering::SeqCst));
    let r = app
        .post(
            "/v1/datasets",
            &app.user_token,
            &json!({"name": name, "mode": if append { "append" } else { "replace" }, "columns": [
                {"name": "ts", "type": "timestamp", "nullable": false},
                {"name": "user_id", "type": "string", "nullable": false}]}),
        )
        .await;
    prop_assert_eq!(r.status, StatusCode::CREATED);
    let mut ids = vec![];
    for i in 0..TASKS {
        let job = app
            .submit(&json!({"name": format!("{name}-{i}"), "tasks": [
                {"key": "w", "runtime": "exec", "bundle": "x", "outputs": [name], "max_attempts": 100}]}))
            .await;
        ids.push(job.tasks[0].task_id);
    }
    let mut tasks: Vec<TaskModel> = (0..TASKS).map(|_| TaskModel::default()).collect();
    // Parts of attempts whose completion committed, in version order.
    let mut committed: Vec<BTreeSet<String>> = vec![];
    let http = reqwest::Client::new();
    for op in ops {
        let op = match op {
            Op::Retry(t) => {
                expire(app, ids[t]).await;
                app.skip_backoff(ids[t]).await;
                Op::Claim(t)
            }
            other => other,
        };
        match op {
            Op::Claim(t) => {
                let r = app.try_claim(ids[t], "model").await;
                if r.status == StatusCode::OK {
                    tasks[t].claim = Some(serde_json::from_value(r.body).unwrap());
                    tasks[t].staged.clear();
                    tasks[t].done = false;
                }
            }
            Op::Stage(t) => {
                let Some(claim) = tasks[t].claim.clone() else {
                    continue;
                };
                tasks[t].uploads += 1;
                let rel = format!("p{}.jsonl", tasks[t].uploads);
                let r = app
                    .post(
                        "/v1/task/objects",
                        &claim.capability_token,
                        &json!({"method": "PUT", "keys": [rel]}),
                    )
                    .await;
                if r.status != StatusCode::OK {
                    continue; // fenced: no URL
                }
                let key = r.body["urls"][0]["key"].as_str().unwrap().to_owned();
                let url = r.body["urls"][0]["url"].as_str().unwrap().to_owned();
                http.put(url).body(ROWS).send().await.unwrap();
                let part = json!({"key": key, "rows": 1, "bytes": ROWS.len(),
                                  "sha256": hex::encode(sha2::Sha256::digest(ROWS.as_bytes()))});
                let r = app
                    .post(
                        "/v1/task/dataset-stage",
                        &claim.capability_token,
                        &json!({"dataset": name, "parts": [part]}),
                    )
                    .await;
                if r.status == StatusCode::OK {
                    // A version names staging's verified copy.
                    tasks[t]
                        .staged
                        .insert(dispatcher::objects::committed_key(app.org_id, &key));
                } else {
                    prop_assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
                }
            }
            Op::Succeed(t) | Op::Fail(t) => {
                let Some(claim) = tasks[t].claim.clone() else {
                    continue;
                };
                let r = match op {
                    Op::Succeed(_) => app.complete_ok(&claim.capability_token, json!({})).await,
                    _ => {
                        app.complete_failed(&claim.capability_token, "x", true)
                            .await
                    }
                };
                if r.status != StatusCode::OK {
                    prop_assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
                    continue;
                }
                let versions = r.body["versions"].as_array().unwrap().clone();
                if tasks[t].done {
                    continue; // a replay of this attempt's completion
                }
                tasks[t].done = true;
                if r.body["state"] == "succeeded" && !tasks[t].staged.is_empty() {
                    prop_assert_eq!(versions.len(), 1, "{}", r.body);
                    let n = versions[0]["version"].as_u64().unwrap() as usize;
                    prop_assert_eq!(n, committed.len() + 1, "the next version number");
                    committed.push(tasks[t].staged.clone());
                } else {
                    prop_assert!(versions.is_empty(), "{}", r.body);
                }
            }
            Op::Expire(t) => expire(app, ids[t]).await,
            Op::EndBackoff(t) => app.skip_backoff(ids[t]).await,
            Op::Retry(_) => unreachable!("turned into a claim above"),
        }
        // The invariants, after every step.
        let referenced: BTreeSet<String> = sqlx::query_scalar(
            "SELECT p.key FROM dataset_parts p JOIN datasets d ON d.id = p.dataset_id WHERE d.name = $1",
        )
        .bind(&name)
        .fetch_all(&app.db.pool)
        .await
        .unwrap()
        .into_iter()
        .collect();
        let all_committed: BTreeSet<String> = committed.iter().flatten().cloned().collect();
        prop_assert!(
            referenced.is_subset(&all_committed),
            "uncommitted parts referenced: {:?}",
            referenced.difference(&all_committed).collect::<Vec<_>>()
        );
        let r = app
            .get(&format!("/v1/datasets/{name}"), &app.user_token)
            .await;
        let current = r.body["current_version"].as_u64().unwrap_or(0) as usize;
        prop_assert_eq!(current, committed.len());
        if current > 0 {
            let m = app
                .get(
                    &format!("/v1/datasets/{name}/versions/{current}"),
                    &app.user_token,
                )
                .await;
            let parts: BTreeSet<String> = m.body["parts"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["key"].as_str().unwrap().to_owned())
                .collect();
            let expected = if append {
                all_committed.clone()
            } else {
                committed.last().cloned().unwrap_or_default()
            };
            prop_assert_eq!(parts, expected);
        }
    }
    Ok(())
}

#[test]
fn invariant_7_random_interleavings_commit_exactly_the_committed_attempts_parts() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let app = rt.block_on(TestApp::spawn_with(dispatcher_tests::unthrottled()));
    let mut runner = TestRunner::new(dispatcher_tests::proptest_config());
    let strategy = (any::<bool>(), proptest::collection::vec(op(), 1..40));
    let result = runner.run(&strategy, |(append, ops)| {
        rt.block_on(run_case(&app, append, ops))
    });
    drop(app);
    if let Err(e) = result {
        panic!("{e}");
    }
}

//! Property test: random interleavings of claim, heartbeat, events, buffer
//! publishes, completion (success, retryable and final failure), lease
//! expiry and backoff expiry, across several simulated workers, against the
//! real store. Time moves in the database, never by sleeping.
//!
//! After every step:
//! * attempts never decrease;
//! * a terminal state, once reached, never changes, and at most one
//!   committed completion ended the task;
//! * a fenced write is accepted if and only if it came from the current
//!   attempt while its lease was live (so no stale write is accepted, and no
//!   live attempt is wrongly refused);
//! * a claim succeeds if and only if the task was claimable, and then
//!   yields exactly the next attempt.

use std::sync::Arc;
use std::time::Duration;

use dispatcher::domain::{self, Completion, NewBufferBatch, NewEvent};
use dispatcher::settings::Settings;
use dispatcher::store::{Fence, Store};
use dispatcher_tests::TestDb;
use proptest::prelude::*;
use proptest::test_runner::{TestCaseError, TestRunner};
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

const WORKERS: usize = 3;

#[derive(Debug, Clone)]
enum Op {
    Claim(usize),
    Heartbeat(usize),
    Event(usize, u8),
    Publish(usize, u8),
    Succeed(usize),
    Fail { worker: usize, retryable: bool },
    ExpireLease,
    EndBackoff,
}

fn op() -> impl Strategy<Value = Op> {
    let w = 0..WORKERS;
    prop_oneof![
        3 => w.clone().prop_map(Op::Claim),
        2 => w.clone().prop_map(Op::Heartbeat),
        2 => (w.clone(), 0u8..4).prop_map(|(w, s)| Op::Event(w, s)),
        1 => (w.clone(), 0u8..3).prop_map(|(w, b)| Op::Publish(w, b)),
        2 => w.clone().prop_map(Op::Succeed),
        2 => (w.clone(), any::<bool>()).prop_map(|(worker, retryable)| Op::Fail { worker, retryable }),
        2 => Just(Op::ExpireLease),
        2 => Just(Op::EndBackoff),
    ]
}

#[derive(Debug, Clone, PartialEq)]
struct Observed {
    state: String,
    attempt: u32,
    live: bool,
    claimable: bool,
}

async fn observe(pool: &PgPool, task: Uuid) -> Observed {
    let (state, attempt, live, claimable): (String, i32, bool, bool) = sqlx::query_as(
        "SELECT state, attempt, coalesce(lease_expires_at > now(), false),
                attempt < max_attempts AND NOT cancel_requested AND (
                    (state = 'ready' AND (not_before IS NULL OR not_before <= now()))
                 OR (state = 'leased' AND lease_expires_at <= now()))
           FROM tasks WHERE id = $1",
    )
    .bind(task)
    .fetch_one(pool)
    .await
    .expect("observe");
    Observed {
        state,
        attempt: u32::try_from(attempt).unwrap(),
        live,
        claimable,
    }
}

fn is_terminal(state: &str) -> bool {
    matches!(state, "succeeded" | "failed" | "cancelled")
}

async fn run_case(
    store: &Store,
    org: Uuid,
    max_attempts: u32,
    ops: Vec<Op>,
) -> Result<(), TestCaseError> {
    let settings = store.settings().clone();
    let job = domain::new_job(
        serde_json::from_value(json!({"name": "model", "tasks": [
            {"key": "t", "runtime": "exec", "bundle": "x", "max_attempts": max_attempts, "outputs": ["ds"]}
        ]}))
        .unwrap(),
        &settings,
    )
    .unwrap();
    let view = store.submit_job(org, None, &job).await.unwrap();
    let task = view.tasks[0].task_id;
    let pool = store.pool();
    let mut fences: [Option<Fence>; WORKERS] = [None; WORKERS];
    let mut last = observe(pool, task).await;
    let mut terminal: Option<String> = None;

    for op in ops {
        let before = observe(pool, task).await;
        // A fenced write must be accepted iff the worker is the live current attempt.
        let current = |f: &Option<Fence>| match f {
            Some(f) => f.attempt == before.attempt && before.state == "leased" && before.live,
            None => false,
        };
        match op {
            Op::Claim(w) => {
                let r = store
                    .claim(task, &format!("w{w}"), Duration::from_secs(60))
                    .await;
                prop_assert_eq!(
                    r.is_ok(),
                    before.claimable,
                    "claim result {:?} vs {:?}",
                    r.as_ref().err(),
                    before
                );
                if let Ok(c) = r {
                    prop_assert_eq!(c.attempt, before.attempt + 1);
                    fences[w] = Some(Fence {
                        task_id: task,
                        job_id: view.job_id,
                        attempt: c.attempt,
                    });
                }
            }
            Op::ExpireLease => {
                sqlx::query("UPDATE tasks SET lease_expires_at = now() - interval '1 second' WHERE id = $1 AND state = 'leased'")
                    .bind(task)
                    .execute(pool)
                    .await
                    .unwrap();
            }
            Op::EndBackoff => {
                sqlx::query(
                    "UPDATE tasks SET not_before = now() WHERE id = $1 AND state = 'ready'",
                )
                .bind(task)
                .execute(pool)
                .await
                .unwrap();
            }
            Op::Heartbeat(w)
            | Op::Event(w, _)
            | Op::Publish(w, _)
            | Op::Succeed(w)
            | Op::Fail { worker: w, .. } => {
                let Some(fence) = fences[w] else { continue };
                let expect_ok = current(&fences[w]);
                let result: Result<(), dispatcher::error::StoreError> = match op {
                    Op::Heartbeat(_) => store.heartbeat(fence, None).await.map(drop),
                    Op::Event(_, seq) => store
                        .record_events(
                            fence,
                            &[NewEvent {
                                seq: i64::from(seq),
                                kind: "log".into(),
                                payload: json!({"a": fence.attempt}),
                            }],
                        )
                        .await
                        .map(drop),
                    Op::Publish(_, b) => store
                        .publish_buffer(
                            fence,
                            &NewBufferBatch {
                                batch_id: Uuid::from_u128(
                                    (u128::from(fence.attempt) << 8)
                                        | u128::from(b)
                                        | (task.as_u128() & !0xffff),
                                ),
                                dataset: "ds".into(),
                                object_key: format!("k/{}/{b}", fence.attempt),
                                rows: 1,
                                sha256: "0".repeat(64),
                            },
                            true,
                        )
                        .await
                        .map(drop),
                    Op::Succeed(_) => store
                        .complete(
                            fence,
                            &Completion::Succeeded {
                                output: json!({"by": fence.attempt}),
                            },
                            &[],
                        )
                        .await
                        .map(drop),
                    Op::Fail { retryable, .. } => store
                        .complete(
                            fence,
                            &Completion::Failed {
                                message: "x".into(),
                                retryable,
                            },
                            &[],
                        )
                        .await
                        .map(drop),
                    _ => unreachable!(),
                };
                match (&result, expect_ok) {
                    (Ok(()), true) => {}
                    (Err(e), false) if e.is_fenced() => {}
                    // A replay of an identical completion by a finished
                    // attempt answers the original result: that is not a write.
                    (Ok(()), false) if matches!(op, Op::Succeed(_) | Op::Fail { .. }) => {
                        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM attempts WHERE task_id = $1 AND attempt = $2 AND completion IS NOT NULL")
                            .bind(task)
                            .bind(i32::try_from(fence.attempt).unwrap())
                            .fetch_one(pool)
                            .await
                            .unwrap();
                        prop_assert_eq!(n, 1, "a non-current attempt's completion was accepted without an earlier one");
                        prop_assert_eq!(
                            observe(pool, task).await,
                            before.clone(),
                            "a replay changed the task"
                        );
                    }
                    // A different completion by a finished attempt.
                    (Err(dispatcher::error::StoreError::Conflict(_)), false) => {}
                    (r, e) => prop_assert!(
                        false,
                        "{:?} by attempt {}: got {:?}, expected ok={} ({:?})",
                        op,
                        fence.attempt,
                        r,
                        e,
                        before
                    ),
                }
            }
        }

        let now = observe(pool, task).await;
        prop_assert!(
            now.attempt >= last.attempt,
            "attempt went down: {:?} -> {:?}",
            last,
            now
        );
        if let Some(t) = &terminal {
            prop_assert_eq!(&now.state, t, "a terminal state changed");
        } else if is_terminal(&now.state) {
            terminal = Some(now.state.clone());
        }
        let endings: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM attempts WHERE task_id = $1 AND response->>'state' IN ('succeeded', 'failed', 'cancelled')",
        )
        .bind(task)
        .fetch_one(pool)
        .await
        .unwrap();
        prop_assert!(endings <= 1, "{} completions ended the task", endings);
        last = now;
    }
    // No stored event or publish belongs to an attempt that never existed.
    let orphans: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM task_events e WHERE e.task_id = $1
                   AND NOT EXISTS (SELECT 1 FROM attempts a WHERE a.task_id = e.task_id AND a.attempt = e.attempt))
              + (SELECT count(*) FROM buffer_publishes b WHERE b.task_id = $1
                   AND NOT EXISTS (SELECT 1 FROM attempts a WHERE a.task_id = b.task_id AND a.attempt = b.attempt))",
    )
    .bind(task)
    .fetch_one(pool)
    .await
    .unwrap();
    prop_assert_eq!(orphans, 0);
    Ok(())
}

#[test]
fn model_random_interleavings_never_accept_a_stale_write_or_change_a_terminal_state() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let db = rt.block_on(TestDb::new());
    let store = Store::new(db.pool.clone(), Arc::new(Settings::default()));
    let org = rt.block_on(store.ensure_org("model")).unwrap();
    // The stream dataset the model's task publishes to.
    let user = rt.block_on(store.ensure_user("model@test")).unwrap();
    let stream = dispatcher::domain::new_dataset(
        serde_json::from_value(serde_json::json!({
            "name": "ds", "mode": "stream", "columns": [{"name": "a", "type": "string"}]}))
        .unwrap(),
    )
    .unwrap();
    rt.block_on(store.create_dataset(org, user, &stream))
        .unwrap();
    let mut runner = TestRunner::new(dispatcher_tests::proptest_config());
    let strategy = (1u32..=4, proptest::collection::vec(op(), 1..48));
    let result = runner.run(&strategy, |(max_attempts, ops)| {
        rt.block_on(run_case(&store, org, max_attempts, ops))
    });
    drop(store);
    drop(db);
    if let Err(e) = result {
        panic!("{e}");
    }
}

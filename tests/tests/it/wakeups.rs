//! Wake-ups without messages (ADR 0017), the local profile's default:
//! a transaction that makes tasks ready sends `NOTIFY tasks_ready` instead
//! of writing wake-up messages, and a claim of ready work that waits
//! (`task-claim-batch` with `max_tasks` and `wait_seconds`) is answered when
//! a notification, or the end of a retry's backoff, says work is there.
//!
//! The waiting claims here look again on their own only after
//! `claim_poll` = 10 minutes, far past their wait: a claim that gets work
//! got it because it was woken.

use std::time::Duration;

use dispatcher::settings::{Settings, Wakeups};
use dispatcher_tests::{unthrottled, TestApp};
use reqwest::StatusCode;
use serde_json::{json, Value};
use uuid::Uuid;

fn notify_settings() -> Settings {
    Settings {
        wakeups: Wakeups::Notify,
        claim_poll: Duration::from_secs(600),
        retry_base: Duration::from_secs(1),
        ..unthrottled()
    }
}

/// A waiting claim of up to `max` ready tasks; the granted task ids.
async fn wait_claim(app: &TestApp, worker: &str, max: u32, wait: u32) -> Vec<(Uuid, u64, String)> {
    let r = app
        .post(
            "/internal/task-claim-batch",
            &app.worker_token,
            &json!({"worker_id": worker, "max_tasks": max, "wait_seconds": wait, "lease_seconds": 30}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    r.body["claims"]
        .as_array()
        .expect("claims")
        .iter()
        .map(|c| {
            assert!(c.get("error").is_none(), "{c}");
            (
                c["task_id"].as_str().unwrap().parse().unwrap(),
                c["claim"]["attempt"].as_u64().unwrap(),
                c["claim"]["capability_token"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

async fn messages(app: &TestApp) -> (i64, i64) {
    sqlx::query_as(
        "SELECT (SELECT count(*) FROM outbox WHERE topic = 'wakeup'),
                (SELECT count(*) FROM queue_messages WHERE queue LIKE 'wakeups%')",
    )
    .fetch_one(&app.db.pool)
    .await
    .expect("counts")
}

fn chain() -> Value {
    json!({"name": "w", "tasks": [
        {"key": "a", "runtime": "exec", "bundle": "x", "max_attempts": 3},
        {"key": "b", "runtime": "exec", "bundle": "x", "depends_on": ["a"]}
    ]})
}

#[tokio::test]
async fn notify_mode_writes_no_wakeup_messages_for_roots_releases_retries_or_rewakes() {
    let app = TestApp::spawn_with(notify_settings()).await;
    let job = app.submit(&chain()).await;
    let (a, b) = (job.tasks[0].task_id, job.tasks[1].task_id);
    // A retry, then a success that releases b.
    let claim = app.claim(a).await;
    let r = app
        .complete_failed(&claim.capability_token, "flaky", true)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    app.skip_backoff(a).await;
    app.run_ok(a).await;
    assert_eq!(app.job(job.job_id).await.tasks[1].state.as_str(), "ready");
    // A ready task nobody claimed: the reaper has no message to re-send.
    sqlx::query("UPDATE tasks SET updated_at = now() - interval '1 hour' WHERE id = $1")
        .bind(b)
        .execute(&app.db.pool)
        .await
        .unwrap();
    let rewoken = app
        .store
        .rewake_stale_ready(Duration::from_secs(60), 100)
        .await
        .unwrap();
    assert_eq!(rewoken, 0);
    assert_eq!(
        messages(&app).await,
        (0, 0),
        "no wake-up message was written"
    );
    // And the queue mode still writes them (the aws profile's way).
    let queued = TestApp::spawn_with(Settings {
        wakeups: Wakeups::Queue,
        ..unthrottled()
    })
    .await;
    let job = queued.submit(&chain()).await;
    assert_eq!(queued.wakeups(job.tasks[0].task_id).await, 1);
}

#[tokio::test]
async fn a_waiting_claim_is_answered_when_a_job_makes_work_ready() {
    let app = TestApp::spawn_with(notify_settings()).await;
    let submit = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        app.submit(&chain()).await
    };
    let (claimed, job) = tokio::join!(wait_claim(&app, "w1", 10, 15), submit);
    assert_eq!(
        claimed.iter().map(|c| c.0).collect::<Vec<_>>(),
        vec![job.tasks[0].task_id],
        "the root, and only the root, is claimed"
    );
}

#[tokio::test]
async fn a_waiting_claim_is_answered_when_a_success_releases_a_dependant() {
    let app = TestApp::spawn_with(notify_settings()).await;
    let job = app.submit(&chain()).await;
    let a = app.claim(job.tasks[0].task_id).await;
    let release = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let r = app.complete_ok(&a.capability_token, json!({})).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    };
    let (claimed, ()) = tokio::join!(wait_claim(&app, "w2", 10, 15), release);
    assert_eq!(
        claimed.iter().map(|c| c.0).collect::<Vec<_>>(),
        vec![job.tasks[1].task_id]
    );
}

#[tokio::test]
async fn a_waiting_claim_takes_a_retry_when_its_backoff_ends() {
    let app = TestApp::spawn_with(notify_settings()).await;
    let job = app.submit(&chain()).await;
    let a = job.tasks[0].task_id;
    let first = app.claim(a).await;
    let r = app
        .complete_failed(&first.capability_token, "flaky", true)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let not_before: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("SELECT not_before FROM tasks WHERE id = $1")
            .bind(a)
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    assert!(not_before.is_some(), "the retry waits out a backoff");
    // Nothing is ready now; only the backoff's end can wake this claim.
    let claimed = wait_claim(&app, "w3", 10, 15).await;
    assert_eq!(
        claimed.iter().map(|c| (c.0, c.1)).collect::<Vec<_>>(),
        vec![(a, 2)]
    );
}

#[tokio::test]
async fn a_waiting_claim_answers_empty_when_its_wait_ends() {
    let app = TestApp::spawn_with(notify_settings()).await;
    let started = std::time::Instant::now();
    assert!(wait_claim(&app, "w4", 5, 1).await.is_empty());
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "it waited its wait out"
    );
}

#[tokio::test]
async fn a_lost_listener_connection_is_replaced_and_wakes_waiting_claims() {
    let app = TestApp::spawn_with(notify_settings()).await;
    // The listener's connection is dropped by the server, once it is
    // there (the API starts listening as it starts serving).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let ended = loop {
        let ended: Vec<bool> = sqlx::query_scalar(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
              WHERE datname = current_database() AND query ILIKE 'LISTEN%tasks_ready%'",
        )
        .fetch_all(&app.db.pool)
        .await
        .unwrap();
        if !ended.is_empty() || std::time::Instant::now() > deadline {
            break ended;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(ended, vec![true], "one listener per API process");
    let submit = async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        app.submit(&chain()).await
    };
    let (claimed, job) = tokio::join!(wait_claim(&app, "w5", 10, 15), submit);
    assert_eq!(
        claimed.iter().map(|c| c.0).collect::<Vec<_>>(),
        vec![job.tasks[0].task_id]
    );
}

#[tokio::test]
async fn waiting_claims_refuse_bad_waits_and_hold_a_long_poll_slot() {
    let app = TestApp::spawn_with(Settings {
        max_concurrent_long_polls: 1,
        ..notify_settings()
    })
    .await;
    let job = app.submit(&chain()).await;
    let before = app.snapshot(job.tasks[0].task_id).await;
    for body in [
        json!({"worker_id": "w", "task_ids": [job.tasks[0].task_id], "wait_seconds": 1}),
        json!({"worker_id": "w", "max_tasks": 1, "wait_seconds": 21}),
        json!({"worker_id": "w", "max_tasks": 1, "wait_seconds": -1}),
    ] {
        let r = app
            .post("/internal/task-claim-batch", &app.worker_token, &body)
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}: {}", r.body);
        assert_eq!(r.code(), "invalid_request", "{}", r.body);
    }
    assert_eq!(
        app.snapshot(job.tasks[0].task_id).await,
        before,
        "nothing claimed"
    );
    // The root is claimed; a second waiting claim finds nothing and holds
    // the only slot, so a third is refused as overloaded.
    assert_eq!(wait_claim(&app, "w6", 1, 1).await.len(), 1);
    let holder = wait_claim(&app, "w7", 1, 3);
    let refused = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        app.post(
            "/internal/task-claim-batch",
            &app.worker_token,
            &json!({"worker_id": "w8", "max_tasks": 1, "wait_seconds": 1}),
        )
        .await
    };
    let (held, refused) = tokio::join!(holder, refused);
    assert!(held.is_empty());
    assert_eq!(
        refused.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        refused.body
    );
    assert_eq!(refused.code(), "overloaded");
}

#[tokio::test]
async fn invariant_6_notify_mode_a_lost_notification_costs_at_most_the_claim_poll() {
    let app = TestApp::spawn_with(Settings {
        claim_poll: Duration::from_secs(1),
        ..notify_settings()
    })
    .await;
    // A job whose notification never comes: submitted by a store that
    // writes wake-up messages instead (as if the NOTIFY were lost).
    let silent = dispatcher::store::Store::new(
        app.db.pool.clone(),
        std::sync::Arc::new(Settings {
            wakeups: Wakeups::Queue,
            ..Settings::default()
        }),
    );
    let submit = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let job = dispatcher::domain::new_job(
            serde_json::from_value(chain()).unwrap(),
            &Settings::default(),
        )
        .unwrap();
        silent.submit_job(app.org_id, None, &job).await.unwrap()
    };
    let (claimed, job) = tokio::join!(wait_claim(&app, "w9", 10, 15), submit);
    assert_eq!(
        claimed.iter().map(|c| c.0).collect::<Vec<_>>(),
        vec![job.tasks[0].task_id],
        "the waiting claim looked again on its own"
    );
}

/// Listens on `tasks_ready` as the dispatcher does; the payloads received
/// within `within`.
async fn notifications(listener: &mut sqlx::postgres::PgListener, within: Duration) -> Vec<String> {
    let mut got = Vec::new();
    while let Ok(Ok(n)) = tokio::time::timeout(within, listener.recv()).await {
        got.push(n.payload().to_owned());
    }
    got
}

#[tokio::test]
async fn invariant_5_notify_mode_every_change_that_makes_work_ready_notifies_at_its_commit() {
    let app = TestApp::spawn_with(notify_settings()).await;
    let mut listener = sqlx::postgres::PgListener::connect_with(&app.db.pool)
        .await
        .unwrap();
    listener.listen("tasks_ready").await.unwrap();
    let quiet = Duration::from_millis(300);
    // Roots of a new job: one notification for the whole job.
    let job = app
        .submit(&json!({"name": "n", "tasks": [
            {"key": "a", "runtime": "exec", "bundle": "x", "max_attempts": 3},
            {"key": "a2", "runtime": "exec", "bundle": "x"},
            {"key": "b", "runtime": "exec", "bundle": "x", "depends_on": ["a", "a2"]}
        ]}))
        .await;
    assert_eq!(notifications(&mut listener, quiet).await, vec![""]);
    let (a, a2) = (job.tasks[0].task_id, job.tasks[1].task_id);
    // A retry with a backoff: `later`.
    let c = app.claim(a).await;
    app.complete_failed(&c.capability_token, "flaky", true)
        .await;
    assert_eq!(notifications(&mut listener, quiet).await, vec!["later"]);
    // A success that releases nothing: no notification.
    app.run_ok(a2).await;
    assert!(notifications(&mut listener, quiet).await.is_empty());
    // The success that releases b.
    app.skip_backoff(a).await;
    app.run_ok(a).await;
    assert_eq!(notifications(&mut listener, quiet).await, vec![""]);
    // A refused write commits nothing and notifies nothing.
    let r = app
        .complete_failed(&c.capability_token, "stale", true)
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    assert!(notifications(&mut listener, quiet).await.is_empty());
}

/// A task whose lease expired takes back its place in the ready queue: a
/// claim of ready work (oldest first) takes it before work that became
/// ready after its attempt was claimed, so a dead worker's task waits
/// behind no backlog that arrived while it ran.
#[tokio::test]
async fn a_reclaimed_task_is_taken_before_work_that_became_ready_after_its_claim() {
    let app = TestApp::spawn().await;
    let reclaimed = app.single_task(3).await;
    app.claim(reclaimed).await;
    let newer = app.single_task(3).await;
    app.expire_lease(reclaimed).await;
    assert_eq!(
        app.store.expire_lease(reclaimed).await.unwrap(),
        Some(dispatcher_wire::TaskState::Ready)
    );
    let taken = app
        .store
        .claim_many(
            dispatcher::store::Pick::Ready(1, None),
            "w",
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    let ids: Vec<Uuid> = taken.iter().map(|c| c.task_id).collect();
    assert_eq!(ids, [reclaimed], "newer ready task: {newer}");
    assert_eq!(taken[0].attempt, 2);
}

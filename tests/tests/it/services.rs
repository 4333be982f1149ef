//! The queue (conformance suite over the `Queue` trait), the outbox relay
//! and the lease reaper, against a real Postgres.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use dispatcher::queue::{Delivery, PgQueue, Queue, SqsQueue};
use dispatcher::roles::reaper::Reaper;
use dispatcher::roles::relay::Relay;
use dispatcher::services::dlq::replay_wakeups;
use dispatcher::settings::Settings;
use dispatcher_tests::moto::Moto;
use dispatcher_tests::{TestApp, TestDb};
use failing::{FailingQueue, Fault, FaultyQueue};
use serde_json::{json, Value};
use tokio::sync::Notify;

const Q: &str = "wakeups";

// ------------------------------------------------------------- queue ---
// One suite, written against the trait; every implementation must pass it.

async fn conformance_send_receive_delete(q: &dyn Queue) {
    q.send(Q, &json!({"n": 1}), Duration::ZERO).await.unwrap();
    let got = q
        .receive(Q, 10, Duration::from_secs(2), Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].body, json!({"n": 1}));
    assert_eq!(got[0].receive_count, 1);
    assert!(q.delete(Q, &got[0].receipt_handle).await.unwrap());
    assert!(q
        .receive(Q, 10, Duration::ZERO, Duration::from_secs(30))
        .await
        .unwrap()
        .is_empty());
}

async fn conformance_undeleted_message_reappears_after_visibility_timeout(
    q: &dyn Queue,
    caps: Caps,
) {
    q.send(Q, &json!({"n": 2}), Duration::ZERO).await.unwrap();
    let first = q
        .receive(Q, 1, Duration::from_secs(2), Duration::from_secs(1))
        .await
        .unwrap();
    assert_eq!(first.len(), 1);
    assert!(
        q.receive(Q, 1, Duration::ZERO, Duration::from_secs(1))
            .await
            .unwrap()
            .is_empty(),
        "hidden while in flight"
    );
    let again = q
        .receive(Q, 1, Duration::from_secs(5), Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(again.len(), 1, "visible again after the timeout");
    assert_eq!(again[0].message_id, first[0].message_id);
    assert_eq!(again[0].receive_count, 2);
    if caps.stale_receipt_is_inert {
        // A late delete with the first delivery's receipt deletes nothing:
        // the message is still there, in flight under the second receipt.
        q.delete(Q, &first[0].receipt_handle).await.unwrap();
        assert!(q
            .change_visibility(Q, &again[0].receipt_handle, Duration::ZERO)
            .await
            .unwrap());
        let third = q
            .receive(Q, 1, Duration::from_secs(5), Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(
            third.len(),
            1,
            "the late delete did not delete the redelivered message"
        );
        assert_eq!(third[0].message_id, first[0].message_id);
        assert!(q.delete(Q, &third[0].receipt_handle).await.unwrap());
    } else {
        assert!(q.delete(Q, &again[0].receipt_handle).await.unwrap());
    }
}

/// Receives `n` messages, in batches of up to 10.
async fn receive_n(q: &dyn Queue, n: usize) -> Vec<Delivery> {
    let mut all = Vec::new();
    while all.len() < n {
        let got = q
            .receive(Q, 10, Duration::from_secs(2), Duration::from_secs(30))
            .await
            .unwrap();
        assert!(!got.is_empty(), "only {} of {n} received", all.len());
        all.extend(got);
    }
    all
}

async fn conformance_batch_delete(q: &dyn Queue) {
    for n in 0..12 {
        q.send(Q, &json!({"batch": n}), Duration::ZERO)
            .await
            .unwrap();
    }
    let receipts: Vec<String> = receive_n(q, 12)
        .await
        .into_iter()
        .map(|m| m.receipt_handle)
        .collect();
    let answers = q.delete_batch(Q, &receipts).await.unwrap();
    assert_eq!(answers, vec![true; 12]);
    let rest = q
        .receive(Q, 10, Duration::ZERO, Duration::from_secs(30))
        .await
        .unwrap();
    assert!(
        rest.is_empty(),
        "{} messages survived the batch delete",
        rest.len()
    );
}

async fn conformance_batch_send(q: &dyn Queue) {
    assert!(q.send_batch(Q, &[]).await.unwrap().is_empty());
    let bodies: Vec<Value> = (0..12).map(|n| json!({"sent_in_batch": n})).collect();
    let answers = q.send_batch(Q, &bodies).await.unwrap();
    assert_eq!(answers.len(), 12, "one answer per body");
    let ids: HashSet<String> = answers.into_iter().map(|a| a.unwrap()).collect();
    assert_eq!(ids.len(), 12, "every message has its own id");
    let mut received = Vec::new();
    for m in receive_n(q, 12).await {
        assert!(
            ids.contains(&m.message_id),
            "an id send_batch did not answer"
        );
        assert!(q.delete(Q, &m.receipt_handle).await.unwrap());
        received.push(m.body["sent_in_batch"].as_i64().unwrap());
    }
    received.sort_unstable();
    assert_eq!(
        received,
        (0..12).collect::<Vec<i64>>(),
        "each body exactly once"
    );
}

async fn conformance_extending_visibility_keeps_the_message_hidden(q: &dyn Queue) {
    q.send(Q, &json!({"n": 3}), Duration::ZERO).await.unwrap();
    let got = q
        .receive(Q, 1, Duration::from_secs(2), Duration::from_secs(1))
        .await
        .unwrap();
    assert!(q
        .change_visibility(Q, &got[0].receipt_handle, Duration::from_secs(30))
        .await
        .unwrap());
    assert!(q
        .receive(Q, 1, Duration::from_secs(2), Duration::from_secs(30))
        .await
        .unwrap()
        .is_empty());
    assert!(q.delete(Q, &got[0].receipt_handle).await.unwrap());
}

async fn conformance_delayed_send_is_invisible_until_due(q: &dyn Queue) {
    q.send(Q, &json!({"n": 4}), Duration::from_secs(1))
        .await
        .unwrap();
    assert!(q
        .receive(Q, 1, Duration::ZERO, Duration::from_secs(30))
        .await
        .unwrap()
        .is_empty());
    let got = q
        .receive(Q, 1, Duration::from_secs(5), Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(got.len(), 1);
    q.delete(Q, &got[0].receipt_handle).await.unwrap();
}

/// `q` must move a message to the DLQ after `max_receives` receives.
async fn conformance_message_goes_to_dlq_after_max_receives(q: &dyn Queue, max_receives: u32) {
    q.send(Q, &json!({"n": 5}), Duration::ZERO).await.unwrap();
    for i in 1..=max_receives {
        let got = q
            .receive(Q, 1, Duration::from_secs(2), Duration::ZERO)
            .await
            .unwrap();
        assert_eq!(got.len(), 1, "receive {i}");
        assert_eq!(got[0].receive_count, i);
    }
    assert!(
        q.receive(Q, 1, Duration::from_secs(1), Duration::ZERO)
            .await
            .unwrap()
            .is_empty(),
        "not delivered again"
    );
    let dead = q
        .receive(
            "wakeups-dlq",
            1,
            Duration::from_secs(2),
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].body, json!({"n": 5}));
}

async fn pg_queue(db: &TestDb, max_receives: u32) -> PgQueue {
    let arrivals = Arc::new(Notify::new());
    let shutdown = tokio_util::sync::CancellationToken::new();
    tokio::spawn(PgQueue::listen(
        db.pool.clone(),
        arrivals.clone(),
        shutdown.child_token(),
    ));
    PgQueue::new(db.pool.clone(), max_receives, arrivals)
}

/// What an implementation promises beyond the trait's common core.
#[derive(Clone, Copy)]
struct Caps {
    /// A delete with the receipt of an earlier delivery deletes nothing.
    /// `PgQueue` promises it; SQS documents it, but SQS-compatible servers
    /// (moto) delete anyway, so the dispatcher never relies on it (ADR 0009).
    stale_receipt_is_inert: bool,
}

async fn conformance(q: &dyn Queue, max_receives: u32, caps: Caps) {
    conformance_send_receive_delete(q).await;
    conformance_undeleted_message_reappears_after_visibility_timeout(q, caps).await;
    conformance_batch_delete(q).await;
    conformance_batch_send(q).await;
    conformance_extending_visibility_keeps_the_message_hidden(q).await;
    conformance_delayed_send_is_invisible_until_due(q).await;
    conformance_message_goes_to_dlq_after_max_receives(q, max_receives).await;
}

#[tokio::test]
async fn queue_conformance_pg() {
    let db = TestDb::new().await;
    conformance(
        &pg_queue(&db, 3).await,
        3,
        Caps {
            stale_receipt_is_inert: true,
        },
    )
    .await;
}

async fn sqs_queue(moto: &Moto, max_receives: u32) -> SqsQueue {
    let cfg = moto.sqs();
    SqsQueue::create_queues(&cfg, max_receives)
        .await
        .expect("create queues");
    SqsQueue::connect(&cfg).await.expect("connect")
}

#[tokio::test]
async fn queue_conformance_sqs() {
    let moto = Moto::start().await;
    conformance(
        &sqs_queue(&moto, 3).await,
        3,
        Caps {
            stale_receipt_is_inert: false,
        },
    )
    .await;
}

#[tokio::test]
async fn sqs_connect_names_every_missing_queue() {
    let moto = Moto::start().await;
    let err = SqsQueue::connect(&moto.sqs())
        .await
        .err()
        .expect("no queues exist");
    let text = err.to_string();
    for q in ["wakeups", "wakeups-dlq", "buffers", "alerts-dlq"] {
        assert!(text.contains(q), "{text}");
    }
}

// ------------------------------------------------------------- DLQ replay ---

/// Dead-letters wake-ups for a runnable task, a finished one, an unknown
/// one and a malformed body; replays; checks that only the runnable task's
/// wake-up goes back, exactly once. (The test server runs no relay, so the
/// source queue holds only what the replay sends.)
async fn conformance_dlq_replay(app: &TestApp, q: &dyn Queue) {
    let runnable = app.single_task(1).await;
    let finished = app.single_task(1).await;
    app.run_ok(finished).await;
    let unknown = uuid::Uuid::new_v4();
    for body in [
        json!({"task_id": runnable}),
        json!({"task_id": finished}),
        json!({"task_id": unknown}),
        json!("garbage"),
    ] {
        q.send("wakeups-dlq", &body, Duration::ZERO).await.unwrap();
    }
    let hold = Duration::from_secs(1);

    let dry = replay_wakeups(q, &app.store, true, hold).await.unwrap();
    assert_eq!(
        (
            dry.replayed,
            dry.skipped_finished,
            dry.skipped_unknown,
            dry.malformed
        ),
        (1, 1, 1, 1),
        "dry run counts"
    );
    assert!(
        q.receive(Q, 10, Duration::from_secs(1), Duration::from_secs(30))
            .await
            .unwrap()
            .is_empty(),
        "a dry run sends nothing"
    );

    tokio::time::sleep(hold + Duration::from_millis(200)).await; // the dry run's hold ends
    let real = replay_wakeups(q, &app.store, false, hold).await.unwrap();
    assert_eq!(
        (
            real.replayed,
            real.skipped_finished,
            real.skipped_unknown,
            real.malformed
        ),
        (1, 1, 1, 1)
    );
    let back = q
        .receive(Q, 10, Duration::from_secs(2), Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(back.len(), 1, "exactly one wake-up sent back");
    assert_eq!(back[0].body, json!({"task_id": runnable}));

    tokio::time::sleep(hold + Duration::from_millis(200)).await;
    let again = replay_wakeups(q, &app.store, false, hold).await.unwrap();
    assert_eq!(
        (again.replayed, again.malformed),
        (0, 1),
        "nothing is replayed twice; the malformed body stays for a human"
    );
}

#[tokio::test]
async fn dlq_replay_pg() {
    let app = TestApp::spawn_queued().await;
    let (queue, _) = dispatcher::profile::local_queue(&app.store, &app.settings);
    conformance_dlq_replay(&app, queue.as_ref()).await;
}

#[tokio::test]
async fn dlq_replay_sqs() {
    let app = TestApp::spawn_queued().await;
    let moto = Moto::start().await;
    let q = sqs_queue(&moto, 3).await;
    conformance_dlq_replay(&app, &q).await;
}

#[tokio::test]
async fn queue_long_poll_wakes_on_arrival() {
    let db = TestDb::new().await;
    let q = Arc::new(pg_queue(&db, 3).await);
    let receiver = {
        let q = q.clone();
        tokio::spawn(async move {
            q.receive(Q, 1, Duration::from_secs(10), Duration::from_secs(30))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let sent = std::time::Instant::now();
    q.send(Q, &json!({"late": true}), Duration::ZERO)
        .await
        .unwrap();
    let got = receiver.await.unwrap().unwrap();
    assert_eq!(got.len(), 1);
    assert!(
        sent.elapsed() < Duration::from_secs(1),
        "woken by the notification, not the 1 s re-check"
    );
}

#[tokio::test]
async fn queue_http_endpoints_need_a_worker_credential_and_serve_the_queue() {
    let app = TestApp::spawn_queued().await;
    let task = app.single_task(1).await;
    let receive = json!({"max_messages": 10, "wait_seconds": 1});
    let r = app
        .post(
            "/internal/queues/wakeups/receive",
            &app.user_token,
            &receive,
        )
        .await;
    assert_eq!(r.status, reqwest::StatusCode::UNAUTHORIZED);
    // The API-only test server runs no relay: publish the outbox by hand.
    let (queue, _) = dispatcher::profile::local_queue(&app.store, &app.settings);
    Relay::new(app.store.clone(), queue, app.settings.clone())
        .relay_once()
        .await
        .unwrap();
    let r = app
        .post(
            "/internal/queues/wakeups/receive",
            &app.worker_token,
            &receive,
        )
        .await;
    assert_eq!(r.status, reqwest::StatusCode::OK, "{}", r.body);
    let messages = r.body["messages"].as_array().unwrap().clone();
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0]["body"], json!({"task_id": task}));
    let receipt = messages[0]["receipt_handle"].clone();
    let r = app
        .post(
            "/internal/queues/wakeups/visibility",
            &app.worker_token,
            &json!({"receipt_handle": receipt, "visibility_timeout_seconds": 60}),
        )
        .await;
    assert_eq!(r.body, json!({"ok": true}));
    let r = app
        .post(
            "/internal/queues/wakeups/delete",
            &app.worker_token,
            &json!({"receipt_handle": receipt}),
        )
        .await;
    assert_eq!(r.body, json!({"ok": true}));
    let r = app
        .post(
            "/internal/queues/wakeups/delete",
            &app.worker_token,
            &json!({"receipt_handle": receipt}),
        )
        .await;
    assert_eq!(
        r.body,
        json!({"ok": false}),
        "a second delete finds nothing"
    );
    let r = app
        .post("/internal/queues/nope/receive", &app.worker_token, &receive)
        .await;
    assert_eq!(r.status, reqwest::StatusCode::NOT_FOUND);
}

/// Least privilege: a worker credential reaches the wake-up queue only.
#[tokio::test]
async fn rule_worker_credentials_reach_the_wakeup_queue_only() {
    let app = TestApp::spawn_queued().await;
    let queue = dispatcher::profile::local_queue(&app.store, &app.settings).0;
    for q in [
        "buffers",
        "alerts",
        "wakeups-dlq",
        "buffers-dlq",
        "alerts-dlq",
    ] {
        queue
            .send(q, &json!({"secret": q}), Duration::ZERO)
            .await
            .unwrap();
        for op in ["receive", "visibility", "delete"] {
            let body = match op {
                "receive" => json!({"max_messages": 10}),
                "visibility" => {
                    json!({"receipt_handle": uuid::Uuid::nil().to_string(), "visibility_timeout_seconds": 0})
                }
                _ => json!({"receipt_handle": uuid::Uuid::nil().to_string()}),
            };
            let r = app
                .post(
                    &format!("/internal/queues/{q}/{op}"),
                    &app.worker_token,
                    &body,
                )
                .await;
            assert_eq!(
                (r.status, r.code()),
                (reqwest::StatusCode::FORBIDDEN, "forbidden"),
                "{op} on {q}: {}",
                r.body
            );
        }
    }
    // Nothing was taken from them.
    assert_eq!(queued(&app.db).await, 5);
}

#[tokio::test]
async fn queue_http_endpoints_refuse_bad_requests() {
    let app = TestApp::spawn_queued().await;
    let r = app
        .post(
            "/internal/queues/wakeups/receive",
            &app.worker_token,
            &json!({"max_messages": 11}),
        )
        .await;
    assert_eq!(r.status, reqwest::StatusCode::BAD_REQUEST);
    let r = app
        .post(
            "/internal/queues/wakeups/delete",
            &app.worker_token,
            &json!({"receipt_handle": "garbage"}),
        )
        .await;
    assert_eq!(r.status, reqwest::StatusCode::BAD_REQUEST);
}

// ------------------------------------------------------------- relay ---

mod failing {
    //! A queue whose sends fail: fault injection for the relay's retry path
    //! (the real queues are exercised everywhere else).
    use std::time::Duration;

    use dispatcher::queue::{Delivery, Queue, QueueError};
    use serde_json::Value;

    pub struct FailingQueue;

    #[async_trait::async_trait]
    impl Queue for FailingQueue {
        async fn send(&self, _: &str, _: &Value, _: Duration) -> Result<String, QueueError> {
            Err(QueueError::Unavailable("injected failure".into()))
        }
        async fn receive(
            &self,
            _: &str,
            _: u32,
            _: Duration,
            _: Duration,
        ) -> Result<Vec<Delivery>, QueueError> {
            Ok(vec![])
        }
        async fn change_visibility(
            &self,
            _: &str,
            _: &str,
            _: Duration,
        ) -> Result<bool, QueueError> {
            Ok(false)
        }
        async fn delete(&self, _: &str, _: &str) -> Result<bool, QueueError> {
            Ok(false)
        }
    }

    /// What a [`FaultyQueue`] does to batch sends.
    pub enum Fault {
        /// Deliver the first message and refuse the rest, as an SQS
        /// `SendMessageBatch` may.
        RefuseAllButFirst,
        /// Deliver every message but answer only for the first: a queue
        /// that answers fewer entries than it was given.
        AnswerOnlyFirst,
        /// Deliver normally, first counting the backends of `pool`'s
        /// database that sit idle inside a transaction (into `seen`).
        WatchTransactions(sqlx::PgPool, std::sync::Arc<std::sync::Mutex<Vec<i64>>>),
    }

    /// The real queue `inner` with a fault injected into batch sends.
    pub struct FaultyQueue(pub std::sync::Arc<dyn Queue>, pub Fault);

    #[async_trait::async_trait]
    impl Queue for FaultyQueue {
        async fn send(&self, q: &str, body: &Value, delay: Duration) -> Result<String, QueueError> {
            self.0.send(q, body, delay).await
        }
        async fn send_batch(
            &self,
            q: &str,
            bodies: &[Value],
        ) -> Result<Vec<Result<String, String>>, QueueError> {
            match &self.1 {
                Fault::RefuseAllButFirst => {
                    let mut answers = self.0.send_batch(q, &bodies[..bodies.len().min(1)]).await?;
                    answers.resize(bodies.len(), Err("injected entry failure".into()));
                    Ok(answers)
                }
                Fault::AnswerOnlyFirst => {
                    let mut answers = self.0.send_batch(q, bodies).await?;
                    answers.truncate(1);
                    Ok(answers)
                }
                Fault::WatchTransactions(pool, seen) => {
                    let idle: i64 = sqlx::query_scalar(
                        "SELECT count(*) FROM pg_stat_activity
                          WHERE datname = current_database()
                            AND state LIKE 'idle in transaction%'",
                    )
                    .fetch_one(pool)
                    .await
                    .expect("pg_stat_activity");
                    seen.lock().unwrap().push(idle);
                    self.0.send_batch(q, bodies).await
                }
            }
        }
        async fn receive(
            &self,
            q: &str,
            max: u32,
            wait: Duration,
            visibility: Duration,
        ) -> Result<Vec<Delivery>, QueueError> {
            self.0.receive(q, max, wait, visibility).await
        }
        async fn change_visibility(
            &self,
            q: &str,
            receipt: &str,
            visibility: Duration,
        ) -> Result<bool, QueueError> {
            self.0.change_visibility(q, receipt, visibility).await
        }
        async fn delete(&self, q: &str, receipt: &str) -> Result<bool, QueueError> {
            self.0.delete(q, receipt).await
        }
    }
}

async fn queued(db: &TestDb) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM queue_messages")
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn relay_publishes_pending_rows_and_marks_them_sent() {
    let app = TestApp::spawn_queued().await;
    for _ in 0..3 {
        app.single_task(1).await;
    }
    let (queue, _) = dispatcher::profile::local_queue(&app.store, &app.settings);
    let relay = Relay::new(app.store.clone(), queue, app.settings.clone());
    assert_eq!(relay.relay_once().await.unwrap(), 3);
    let counts = app.store.outbox_counts().await.unwrap();
    assert_eq!((counts.pending, counts.sent, counts.dead), (0, 3, 0));
    assert_eq!(queued(&app.db).await, 3);
    assert_eq!(
        relay.relay_once().await.unwrap(),
        0,
        "nothing is published twice"
    );
}

#[tokio::test]
async fn invariant_5_relay_batch_entry_failures_retry_only_the_refused_rows() {
    let app = TestApp::spawn_queued().await;
    for _ in 0..3 {
        app.single_task(1).await;
    }
    let (queue, _) = dispatcher::profile::local_queue(&app.store, &app.settings);
    let relay = Relay::new(
        app.store.clone(),
        Arc::new(FaultyQueue(queue, Fault::RefuseAllButFirst)),
        app.settings.clone(),
    );
    assert_eq!(relay.relay_once().await.unwrap(), 3);
    let counts = app.store.outbox_counts().await.unwrap();
    assert_eq!(
        (counts.pending, counts.sent, counts.dead),
        (2, 1, 0),
        "the delivered row is sent, the two refused ones wait for a retry"
    );
    assert_eq!(queued(&app.db).await, 1);
    let errors: Vec<Option<String>> =
        sqlx::query_scalar("SELECT last_error FROM outbox WHERE state = 'pending'")
            .fetch_all(&app.db.pool)
            .await
            .unwrap();
    assert!(errors
        .iter()
        .all(|e| e.as_deref() == Some("injected entry failure")));
}

#[tokio::test]
async fn invariant_5_relay_retries_with_backoff_then_dead_letters_visibly_and_operators_requeue() {
    let app = TestApp::spawn_queued().await;
    app.single_task(1).await;
    let settings = Arc::new(Settings {
        relay_max_tries: 2,
        ..Settings::default()
    });
    let failing = Relay::new(app.store.clone(), Arc::new(FailingQueue), settings.clone());
    failing.relay_once().await.unwrap();
    let (state, tries, backoff_ms, error): (String, i32, f64, Option<String>) = sqlx::query_as(
        "SELECT state, tries, extract(epoch FROM available_at - now())::float8 * 1000, last_error FROM outbox",
    )
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert_eq!((state.as_str(), tries), ("pending", 1));
    assert!(
        backoff_ms > 400.0,
        "retried after a backoff, not at once ({backoff_ms} ms)"
    );
    assert!(error.unwrap().contains("injected failure"));
    assert_eq!(failing.relay_once().await.unwrap(), 0, "not due yet");
    sqlx::query("UPDATE outbox SET available_at = now()")
        .execute(&app.db.pool)
        .await
        .unwrap();
    failing.relay_once().await.unwrap();
    let counts = app.store.outbox_counts().await.unwrap();
    assert_eq!(counts.dead, 1, "dead after max tries, visible to operators");

    assert_eq!(app.store.outbox_requeue_dead(None).await.unwrap(), 1);
    let (queue, _) = dispatcher::profile::local_queue(&app.store, &app.settings);
    Relay::new(app.store.clone(), queue, settings)
        .relay_once()
        .await
        .unwrap();
    assert_eq!(app.store.outbox_counts().await.unwrap().sent, 1);
    assert_eq!(queued(&app.db).await, 1);
}

/// Makes every pending outbox row due now (moves the clock in the
/// database, the only clock the relay obeys).
async fn make_outbox_due(app: &TestApp) {
    sqlx::query("UPDATE outbox SET available_at = now() WHERE state = 'pending'")
        .execute(&app.db.pool)
        .await
        .unwrap();
}

#[tokio::test]
async fn invariant_5_relay_crash_between_publish_and_mark_sent_duplicates_but_never_loses() {
    let app = TestApp::spawn_queued().await;
    let task = app.single_task(1).await;
    let (queue, _) = dispatcher::profile::local_queue(&app.store, &app.settings);
    // A relay that takes the rows, publishes them and dies before marking
    // them: they stay pending, hidden until their hold ends.
    let rows = app
        .store
        .outbox_take(10, app.settings.relay_hold)
        .await
        .unwrap();
    for row in &rows {
        queue
            .send("wakeups", &row.payload, Duration::ZERO)
            .await
            .unwrap();
    }
    drop(rows);
    assert_eq!(
        app.store.outbox_counts().await.unwrap().pending,
        1,
        "still pending after the crash"
    );
    let relay = Relay::new(app.store.clone(), queue, app.settings.clone());
    assert_eq!(
        relay.relay_once().await.unwrap(),
        0,
        "held by the dead relay"
    );
    make_outbox_due(&app).await;
    relay.relay_once().await.unwrap();
    assert_eq!(app.store.outbox_counts().await.unwrap().sent, 1);
    let copies: i64 =
        sqlx::query_scalar("SELECT count(*) FROM queue_messages WHERE body->>'task_id' = $1::text")
            .bind(task)
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    assert_eq!(copies, 2, "a duplicate, which the claim makes harmless");
}

/// The relay marks a row sent only on an explicit success answer for that
/// row: a queue that answers fewer entries than it was given leaves the
/// unanswered rows pending, and they are published later.
#[tokio::test]
async fn rule_relay_marks_sent_only_rows_the_queue_answered_success_for() {
    let app = TestApp::spawn_queued().await;
    for _ in 0..3 {
        app.single_task(1).await;
    }
    let (queue, _) = dispatcher::profile::local_queue(&app.store, &app.settings);
    let short = Relay::new(
        app.store.clone(),
        Arc::new(FaultyQueue(queue.clone(), Fault::AnswerOnlyFirst)),
        app.settings.clone(),
    );
    assert_eq!(short.relay_once().await.unwrap(), 3);
    let counts = app.store.outbox_counts().await.unwrap();
    assert_eq!(
        (counts.pending, counts.sent, counts.dead),
        (2, 1, 0),
        "only the answered row is sent"
    );
    make_outbox_due(&app).await;
    Relay::new(app.store.clone(), queue, app.settings.clone())
        .relay_once()
        .await
        .unwrap();
    let counts = app.store.outbox_counts().await.unwrap();
    assert_eq!((counts.pending, counts.sent, counts.dead), (0, 3, 0));
}

/// The relay holds no transaction open while it publishes: a slow or hung
/// queue must not pin row locks and a connection.
#[tokio::test]
async fn rule_relay_holds_no_transaction_open_across_a_publish() {
    let app = TestApp::spawn_queued().await;
    for _ in 0..3 {
        app.single_task(1).await;
    }
    let (queue, _) = dispatcher::profile::local_queue(&app.store, &app.settings);
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let relay = Relay::new(
        app.store.clone(),
        Arc::new(FaultyQueue(
            queue,
            Fault::WatchTransactions(app.db.pool.clone(), seen.clone()),
        )),
        app.settings.clone(),
    );
    assert_eq!(relay.relay_once().await.unwrap(), 3);
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen, vec![0], "transactions open during the publish");
    assert_eq!(app.store.outbox_counts().await.unwrap().sent, 3);
}

// ------------------------------------------------------------ reaper ---

fn reaper(app: &TestApp) -> Reaper {
    Reaper::new(app.store.clone(), app.settings.clone())
}

#[tokio::test]
async fn reaper_turns_an_expired_lease_into_a_woken_retry() {
    let app = TestApp::spawn_queued().await;
    let task = app.single_task(3).await;
    app.claim(task).await;
    app.expire_lease(task).await;
    let report = reaper(&app).reap_once().await.unwrap();
    assert_eq!(report.expired, 1);
    let (state, attempt, outcome): (String, i32, Option<String>) = sqlx::query_as(
        "SELECT t.state, t.attempt, a.outcome FROM tasks t JOIN attempts a ON a.task_id = t.id AND a.attempt = t.attempt WHERE t.id = $1",
    )
    .bind(task)
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(
        (state.as_str(), attempt, outcome.as_deref()),
        ("ready", 1, Some("lease_expired"))
    );
    assert_eq!(app.wakeups(task).await, 2, "the retry is woken");
    // A second reaper pass (another replica) finds nothing more to do.
    assert_eq!(reaper(&app).reap_once().await.unwrap().expired, 0);
    let next = app.claim(task).await;
    assert_eq!(next.attempt, 2);
}

#[tokio::test]
async fn reaper_fails_the_task_and_job_when_the_last_attempt_expires() {
    let app = TestApp::spawn_queued().await;
    let task = app.single_task(1).await;
    app.claim(task).await;
    app.expire_lease(task).await;
    reaper(&app).reap_once().await.unwrap();
    let (state, job_state): (String, String) = sqlx::query_as(
        "SELECT t.state, j.state FROM tasks t JOIN jobs j ON j.id = t.job_id WHERE t.id = $1",
    )
    .bind(task)
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert_eq!((state.as_str(), job_state.as_str()), ("failed", "failed"));
}

#[tokio::test]
async fn invariant_6_reaper_wakes_a_ready_task_whose_wakeup_was_lost() {
    let app = TestApp::spawn_queued().await;
    let task = app.single_task(1).await;
    let fresh = reaper(&app).reap_once().await.unwrap();
    assert_eq!(fresh.rewoken, 0, "a recently woken task is left alone");
    sqlx::query("UPDATE tasks SET updated_at = now() - interval '2 hours' WHERE id = $1")
        .bind(task)
        .execute(&app.db.pool)
        .await
        .unwrap();
    let report = reaper(&app).reap_once().await.unwrap();
    assert_eq!(report.rewoken, 1);
    assert_eq!(app.wakeups(task).await, 2);
    assert_eq!(
        reaper(&app).reap_once().await.unwrap().rewoken,
        0,
        "not woken again at once"
    );
}

/// A success ends its job after it commits; a crash in between leaves the
/// job running with every task succeeded, and the reaper ends it.
#[tokio::test]
async fn reaper_ends_a_job_a_crash_left_running_with_every_task_succeeded() {
    let app = TestApp::spawn_queued().await;
    let task = app.single_task(1).await;
    let claim = app.claim(task).await;
    let r = app.complete_ok(&claim.capability_token, json!({})).await;
    assert_eq!(r.status, reqwest::StatusCode::OK, "{}", r.body);
    let job_state = |app: &TestApp| {
        let pool = app.db.pool.clone();
        async move {
            sqlx::query_scalar::<_, String>("SELECT state FROM jobs WHERE id = $1")
                .bind(claim.job_id)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    assert_eq!(job_state(&app).await, "succeeded");
    // The crash: the success committed, the job's end did not.
    sqlx::query("UPDATE jobs SET state = 'running', finished_at = NULL WHERE id = $1")
        .bind(claim.job_id)
        .execute(&app.db.pool)
        .await
        .unwrap();
    let report = reaper(&app).reap_once().await.unwrap();
    assert_eq!(report.finished, 1);
    assert_eq!(job_state(&app).await, "succeeded");
    assert_eq!(reaper(&app).reap_once().await.unwrap().finished, 0);
}

#[tokio::test]
async fn reaper_purges_sent_outbox_rows_past_retention() {
    let app = TestApp::spawn_queued().await;
    app.single_task(1).await;
    sqlx::query("UPDATE outbox SET state = 'sent', sent_at = now() - interval '2 days'")
        .execute(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(reaper(&app).reap_once().await.unwrap().purged, 1);
}

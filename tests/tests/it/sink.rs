//! The buffer sink (contract: "Buffered sinks"; ADR 0006; invariant 8): a
//! published batch is ingested into the data database at most once and
//! wholly or not at all, on both profiles' queues and object stores; a
//! malformed batch ends `dead` with its reason and line and inserts
//! nothing; a transient failure never makes a batch dead.

use std::sync::Arc;
use std::time::Duration;

use dispatcher::queue::{Queue, BUFFERS};
use dispatcher::services::sink::{Outcome, Sink};
use dispatcher::store::DeadFilter;
use dispatcher_tests::{Response, TestApp};
use dispatcher_wire::ClaimResponse;
use rand::seq::SliceRandom;
use reqwest::StatusCode;
use serde_json::{json, Value};
use sha2::Digest;
use sqlx::PgPool;
use uuid::Uuid;

const ROWS: &str = "{\"ts\": \"2026-01-01T00:00:00Z\", \"user_id\": \"a\", \"n\": 1}\n\
                    {\"ts\": \"2026-01-01T00:01:00+02:00\", \"user_id\": \"b\", \"n\": null, \"value\": 2.5}\n\
                    {\"ts\": \"2026-01-01T00:02:00Z\", \"user_id\": \"c\", \"n\": -9007199254740991}\n";

pub struct Fixture {
    pub app: TestApp,
    pub claim: ClaimResponse,
    pub data: PgPool,
}

pub fn sha(body: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(body))
}

/// An app with a stream dataset `events` (ts, user_id, value, n int64) and
/// a claimed task that may publish to it.
pub async fn fixture(app: TestApp) -> Fixture {
    app.create_dataset(
        "events",
        "stream",
        json!([{"name": "ts", "type": "timestamp", "nullable": false},
               {"name": "user_id", "type": "string", "nullable": false},
               {"name": "value", "type": "float64", "nullable": true},
               {"name": "n", "type": "int64", "nullable": true}]),
    )
    .await;
    let job = app
        .submit(&json!({"name": "j", "tasks": [
            {"key": "w", "runtime": "exec", "bundle": "x", "outputs": ["events"], "max_attempts": 3}]}))
        .await;
    let claim = app.claim(job.tasks[0].task_id).await;
    let data = app.db.data().await;
    Fixture { app, claim, data }
}

impl Fixture {
    /// Writes `body` under the attempt's prefix (as a presigned PUT would);
    /// the absolute key.
    pub async fn put(&self, name: &str, body: &[u8]) -> String {
        let key = format!("{}{name}", self.claim.object_prefix);
        self.app.objects.put(&key, body.to_vec()).await.unwrap();
        key
    }

    pub async fn publish(&self, batch_id: Uuid, key: &str, rows: u64, sha256: &str) -> Response {
        self.app
            .post(
                "/v1/task/buffer-publish",
                &self.claim.capability_token,
                &json!({"batch_id": batch_id, "dataset": "events", "object_key": key,
                        "rows": rows, "sha256": sha256}),
            )
            .await
    }

    /// Uploads and publishes a batch; its id.
    pub async fn publish_batch(&self, body: &[u8], rows: u64) -> Uuid {
        let batch_id = Uuid::new_v4();
        let key = self.put(&format!("buffers/{batch_id}.jsonl"), body).await;
        let r = self.publish(batch_id, &key, rows, &sha(body)).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        batch_id
    }

    pub async fn status(&self, batch_id: Uuid) -> Value {
        let r = self
            .app
            .get(
                &format!("/v1/datasets/events/batches/{batch_id}"),
                &self.app.user_token,
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        r.body
    }

    pub async fn table(&self) -> String {
        let id: Uuid = sqlx::query_scalar("SELECT id FROM datasets WHERE name = 'events'")
            .fetch_one(&self.app.db.pool)
            .await
            .unwrap();
        Sink::table_name(id)
    }

    /// Rows of `batch_id` in the data database (0 if the table is not
    /// there yet).
    pub async fn rows_of(&self, batch_id: Uuid) -> i64 {
        let table = self.table().await;
        let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(&table)
            .fetch_one(&self.data)
            .await
            .unwrap();
        if !exists {
            return 0;
        }
        sqlx::query_scalar(&format!(
            "SELECT count(*) FROM {table} WHERE _batch_id = $1"
        ))
        .bind(batch_id)
        .fetch_one(&self.data)
        .await
        .unwrap()
    }

    /// Moves outbox rows to the local queue (the API-only app runs no
    /// relay).
    pub async fn relay(&self) {
        let (queue, _) = dispatcher::profile::local_queue(&self.app.store, &self.app.settings);
        dispatcher::roles::relay::Relay::new(
            self.app.store.clone(),
            queue,
            self.app.settings.clone(),
        )
        .relay_once()
        .await
        .unwrap();
    }
}

/// Polls until no pointer is visible.
pub async fn drain(sink: &Arc<Sink>) {
    while sink.poll(Duration::ZERO).await.unwrap() > 0 {}
}

async fn ingests_once(f: Fixture, sink: Arc<Sink>) {
    let batch = f.publish_batch(ROWS.as_bytes(), 3).await;
    assert_eq!(f.status(batch).await["status"], "pending");
    f.relay().await;
    drain(&sink).await;
    assert_eq!(
        f.status(batch).await,
        json!({"batch_id": batch, "status": "ingested", "rows": 3, "reason": null})
    );
    assert_eq!(f.rows_of(batch).await, 3);
    let typed: (i64, Option<f64>, String) = sqlx::query_as(&format!(
        "SELECT extract(epoch FROM ts)::bigint, value, user_id FROM {} WHERE _line = 2",
        f.table().await
    ))
    .fetch_one(&f.data)
    .await
    .unwrap();
    assert_eq!(
        typed,
        (1_767_225_660 - 7200, Some(2.5), "b".to_owned()),
        "values land typed"
    );

    // The same publish again changes nothing; so does a second delivery.
    let key = format!("{}buffers/{batch}.jsonl", f.claim.object_prefix);
    let r = f.publish(batch, &key, 3, &sha(ROWS.as_bytes())).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let pointer = json!({"org_id": f.app.org_id, "batch_id": batch});
    let (queue, _) = dispatcher::profile::local_queue(&f.app.store, &f.app.settings);
    queue.send(BUFFERS, &pointer, Duration::ZERO).await.unwrap();
    assert_eq!(
        sink.ingest(f.app.org_id, batch).await.unwrap(),
        Outcome::Skipped("the batch is ingested".into())
    );
    // Even with the state database behind (a crash after the data
    // commit), the data database refuses the batch a second time.
    sqlx::query("UPDATE buffer_publishes SET state = 'pending' WHERE batch_id = $1")
        .bind(batch)
        .execute(&f.app.db.pool)
        .await
        .unwrap();
    assert_eq!(
        sink.ingest(f.app.org_id, batch).await.unwrap(),
        Outcome::Duplicate
    );
    drain(&sink).await;
    assert_eq!(f.rows_of(batch).await, 3, "every row exactly once");
    assert_eq!(f.status(batch).await["status"], "ingested");
}

#[tokio::test]
async fn invariant_8_buffered_sinks_a_batch_is_ingested_once_and_wholly_on_the_local_profile() {
    let f = fixture(TestApp::spawn().await).await;
    let sink = f.app.sink().await;
    ingests_once(f, sink).await;
}

#[tokio::test]
async fn invariant_8_buffered_sinks_a_batch_is_ingested_once_and_wholly_on_s3_and_sqs() {
    let moto = dispatcher_tests::moto::Moto::start().await;
    let s3 = Arc::new(moto.s3_store().await);
    let f = fixture(TestApp::spawn_with_objects(Default::default(), Some(s3)).await).await;
    let sqs = moto.sqs();
    dispatcher::queue::SqsQueue::create_queues(&sqs, 5)
        .await
        .unwrap();
    let queue: Arc<dyn Queue> = Arc::new(dispatcher::queue::SqsQueue::connect(&sqs).await.unwrap());
    // The relay moves pointers to SQS; the sink consumes them there.
    let batch = f.publish_batch(ROWS.as_bytes(), 3).await;
    dispatcher::roles::relay::Relay::new(
        f.app.store.clone(),
        queue.clone(),
        f.app.settings.clone(),
    )
    .relay_once()
    .await
    .unwrap();
    let sink = Sink::new(
        f.app.store.clone(),
        f.data.clone(),
        queue.clone(),
        f.app.objects.clone(),
        f.app.settings.clone(),
    );
    drain(&sink).await;
    assert_eq!(f.status(batch).await["status"], "ingested");
    assert_eq!(f.rows_of(batch).await, 3);
    // A duplicate pointer on SQS inserts nothing.
    queue
        .send(
            BUFFERS,
            &json!({"org_id": f.app.org_id, "batch_id": batch}),
            Duration::ZERO,
        )
        .await
        .unwrap();
    drain(&sink).await;
    assert_eq!(f.rows_of(batch).await, 3);
}

#[tokio::test]
async fn a_thousand_batches_each_delivered_twice_in_shuffled_order_are_ingested_exactly_once() {
    let f = fixture(TestApp::spawn_with(dispatcher_tests::unthrottled()).await).await;
    let mut batches = Vec::new();
    for i in 0..1_000u32 {
        let rows = 1 + i % 5;
        let body: String = (0..rows)
            .map(|r| {
                format!("{{\"ts\": \"2026-01-01T00:00:00Z\", \"user_id\": \"u{i}\", \"n\": {r}}}\n")
            })
            .collect();
        batches.push((
            f.publish_batch(body.as_bytes(), u64::from(rows)).await,
            rows,
        ));
    }
    // The pointers the publishes wrote stay in the outbox; these are the
    // deliveries: every batch twice, shuffled.
    let mut pointers: Vec<Value> = batches
        .iter()
        .flat_map(|(b, _)| {
            let p = json!({"org_id": f.app.org_id, "batch_id": b});
            [p.clone(), p]
        })
        .collect();
    pointers.shuffle(&mut rand::thread_rng());
    let (queue, _) = dispatcher::profile::local_queue(&f.app.store, &f.app.settings);
    for chunk in pointers.chunks(100) {
        queue.send_batch(BUFFERS, chunk).await.unwrap();
    }
    // Two sinks at once, so duplicates also race each other.
    let (a, b) = (f.app.sink().await, f.app.sink().await);
    tokio::join!(drain(&a), drain(&b));

    let per_batch: Vec<(Uuid, i64)> = sqlx::query_as(&format!(
        "SELECT _batch_id, count(*) FROM {} GROUP BY _batch_id",
        f.table().await
    ))
    .fetch_all(&f.data)
    .await
    .unwrap();
    let got: std::collections::HashMap<Uuid, i64> = per_batch.into_iter().collect();
    assert_eq!(got.len(), 1_000, "every batch ingested");
    for (b, rows) in &batches {
        assert_eq!(
            got[b],
            i64::from(*rows),
            "batch {b}: every row exactly once"
        );
    }
    let (recorded, ingested): (i64, i64) = (
        sqlx::query_scalar("SELECT count(*) FROM sink_batches")
            .fetch_one(&f.data)
            .await
            .unwrap(),
        sqlx::query_scalar("SELECT count(*) FROM buffer_publishes WHERE state = 'ingested'")
            .fetch_one(&f.app.db.pool)
            .await
            .unwrap(),
    );
    assert_eq!((recorded, ingested), (1_000, 1_000));
}

/// The malformed kinds: a name, the body, the rows and checksum published,
/// the reason code and line the sink must give, and the fix.
struct Bad {
    name: &'static str,
    body: Vec<u8>,
    rows: u64,
    sha256: Option<String>,
    upload: bool,
    code: &'static str,
    line: Option<u64>,
    /// The object to put before the replay, and whether the replay must
    /// accept its current checksum and row count.
    fixed: Vec<u8>,
    accept: bool,
}

fn malformed() -> Vec<Bad> {
    let good = ROWS.as_bytes().to_vec();
    let line = |l: &str| format!("{{\"ts\": \"2026-01-01T00:00:00Z\", \"user_id\": \"a\"}}\n{l}\n");
    let content = |name, l: &str, code, line_no| Bad {
        name,
        body: line(l).into_bytes(),
        rows: 2,
        sha256: None,
        upload: true,
        code,
        line: line_no,
        fixed: good.clone(),
        accept: true,
    };
    let mut invalid_utf8 =
        line("{\"ts\": \"2026-01-01T00:00:00Z\", \"user_id\": \"XX\"}").into_bytes();
    let at = invalid_utf8.len() - 4;
    invalid_utf8[at] = 0xff;
    vec![
        content("bad JSON", "{\"ts\": ", "invalid_json", Some(2)),
        content(
            "unknown column",
            "{\"ts\": \"2026-01-01T00:00:00Z\", \"user_id\": \"a\", \"colour\": 1}",
            "unknown_column",
            Some(2),
        ),
        content(
            "missing required column",
            "{\"ts\": \"2026-01-01T00:00:00Z\"}",
            "missing_column",
            Some(2),
        ),
        content(
            "wrong type",
            "{\"ts\": \"2026-01-01T00:00:00Z\", \"user_id\": 7}",
            "wrong_type",
            Some(2),
        ),
        content(
            "int64 past 2^53",
            "{\"ts\": \"2026-01-01T00:00:00Z\", \"user_id\": \"a\", \"n\": 9007199254740993}",
            "wrong_type",
            Some(2),
        ),
        Bad {
            body: invalid_utf8,
            ..content("invalid UTF-8", "", "invalid_json", Some(2))
        },
        content(
            "row too large",
            &format!(
                "{{\"ts\": \"2026-01-01T00:00:00Z\", \"user_id\": \"{}\"}}",
                "x".repeat(2048)
            ),
            "row_too_large",
            Some(2),
        ),
        Bad {
            name: "checksum mismatch",
            body: good.clone(),
            rows: 3,
            sha256: Some(sha(b"other bytes")),
            upload: true,
            code: "checksum_mismatch",
            line: None,
            fixed: good.clone(),
            accept: true,
        },
        Bad {
            name: "row count mismatch",
            body: good.clone(),
            rows: 4,
            sha256: None,
            upload: true,
            code: "row_count_mismatch",
            line: None,
            fixed: good.clone(),
            accept: true,
        },
        // The fix for a missing object: upload the very bytes published.
        Bad {
            name: "object missing",
            body: good.clone(),
            rows: 3,
            sha256: None,
            upload: false,
            code: "object_missing",
            line: None,
            fixed: good.clone(),
            accept: false,
        },
    ]
}

#[tokio::test]
async fn every_malformed_kind_is_dead_with_its_reason_and_line_then_a_replay_after_the_fix_ingests_once(
) {
    let settings = dispatcher::settings::Settings {
        max_row_bytes: 1024,
        ..Default::default()
    };
    let f = fixture(TestApp::spawn_with(settings).await).await;
    let sink = f.app.sink().await;
    let mut published = Vec::new();
    for bad in malformed() {
        let batch_id = Uuid::new_v4();
        let key = format!("{}buffers/{batch_id}.jsonl", f.claim.object_prefix);
        if bad.upload {
            f.app.objects.put(&key, bad.body.clone()).await.unwrap();
        }
        let sha256 = bad.sha256.clone().unwrap_or_else(|| sha(&bad.body));
        let r = f.publish(batch_id, &key, bad.rows, &sha256).await;
        assert_eq!(r.status, StatusCode::OK, "{}: {}", bad.name, r.body);
        published.push((bad, batch_id, key));
    }
    f.relay().await;
    drain(&sink).await;
    for (bad, batch_id, _) in &published {
        let s = f.status(*batch_id).await;
        assert_eq!(s["status"], "dead", "{}: {s}", bad.name);
        assert_eq!(s["reason"]["code"], bad.code, "{}: {s}", bad.name);
        assert_eq!(s["reason"]["line"], json!(bad.line), "{}: {s}", bad.name);
        assert!(!s["reason"]["message"].as_str().unwrap().is_empty());
        assert_eq!(
            f.rows_of(*batch_id).await,
            0,
            "{}: no row inserted",
            bad.name
        );
    }
    let dead = f
        .app
        .store
        .dead_batches(&DeadFilter::default(), 100)
        .await
        .unwrap();
    assert_eq!(dead.len(), published.len(), "every dead batch is listed");

    // A dry replay changes nothing.
    let dry = dispatcher::services::sink::replay_dead(
        &f.app.store,
        f.app.objects.as_ref(),
        &DeadFilter::default(),
        false,
        true,
    )
    .await
    .unwrap();
    assert_eq!(dry.len(), published.len());
    assert!(dry.iter().all(|r| !r.replayed));

    // The fix, then the replay: twice, and the pointers delivered twice.
    for (bad, _, key) in &published {
        f.app.objects.put(key, bad.fixed.clone()).await.unwrap();
    }
    for accept in [true, false] {
        let ids: Vec<Uuid> = published
            .iter()
            .filter(|(b, _, _)| b.accept == accept)
            .map(|(_, id, _)| *id)
            .collect();
        let filter = DeadFilter {
            batch_ids: ids.clone(),
            ..Default::default()
        };
        for round in 0..2 {
            let done = dispatcher::services::sink::replay_dead(
                &f.app.store,
                f.app.objects.as_ref(),
                &filter,
                accept,
                false,
            )
            .await
            .unwrap();
            assert_eq!(done.len(), if round == 0 { ids.len() } else { 0 });
        }
    }
    f.relay().await;
    f.relay().await;
    drain(&sink).await;
    for (bad, batch_id, key) in &published {
        let s = f.status(*batch_id).await;
        assert_eq!(s["status"], "ingested", "{}: {s}", bad.name);
        assert_eq!(s["rows"], 3, "{}: {s}", bad.name);
        assert_eq!(f.rows_of(*batch_id).await, 3, "{}: ingested once", bad.name);
        // The task's own replay of the original publish is still a
        // duplicate, not a conflict.
        let r = f
            .publish(
                *batch_id,
                key,
                bad.rows,
                &bad.sha256.clone().unwrap_or_else(|| sha(&bad.body)),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}: {}", bad.name, r.body);
    }
}

#[tokio::test]
async fn a_transient_failure_retries_with_backoff_and_never_dead_letters() {
    let f = fixture(TestApp::spawn().await).await;
    let batch = f.publish_batch(ROWS.as_bytes(), 3).await;
    f.relay().await;
    let (queue, _) = dispatcher::profile::local_queue(&f.app.store, &f.app.settings);

    // A data database that does not answer (nothing listens there), then
    // an object store that does not.
    let closed = dispatcher_tests::free_port();
    let down = dispatcher::datadb::lazy_pool(
        format!("postgres://postgres@127.0.0.1:{closed}/nope")
            .parse()
            .unwrap(),
        1,
    );
    let no_data = Sink::new(
        f.app.store.clone(),
        down,
        queue.clone(),
        f.app.objects.clone(),
        f.app.settings.clone(),
    );
    // An S3 server that stops answering after the store connected.
    let moto = dispatcher_tests::moto::Moto::start().await;
    let s3_down = moto.s3_store().await;
    drop(moto);
    let no_objects = Sink::new(
        f.app.store.clone(),
        f.data.clone(),
        queue.clone(),
        Arc::new(s3_down),
        f.app.settings.clone(),
    );
    for (round, sink) in [no_data, no_objects].into_iter().enumerate() {
        let got = queue
            .receive(BUFFERS, 10, Duration::ZERO, Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(got.len(), 1, "round {round}: one pointer");
        sink.handle(got.into_iter().next().unwrap()).await;
        let row: (String, i32) = sqlx::query_as(
            "SELECT state, transient_failures FROM buffer_publishes WHERE batch_id = $1",
        )
        .bind(batch)
        .fetch_one(&f.app.db.pool)
        .await
        .unwrap();
        assert_eq!(row, ("pending".to_owned(), round as i32 + 1), "never dead");
        // The pointer went back delayed, with the failure counted and its
        // receive count reset: nothing is in the DLQ.
        let (visible, retry, dlq): (i64, i64, i64) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE visible_at <= now()),
                    max((body->>'retry')::bigint),
                    (SELECT count(*) FROM queue_messages WHERE queue = 'buffers-dlq')
               FROM queue_messages WHERE queue = 'buffers'",
        )
        .fetch_one(&f.app.db.pool)
        .await
        .unwrap();
        assert_eq!((visible, retry, dlq), (0, round as i64 + 1, 0));
        // Skip the backoff.
        sqlx::query("UPDATE queue_messages SET visible_at = now() WHERE queue = 'buffers'")
            .execute(&f.app.db.pool)
            .await
            .unwrap();
    }
    // Healthy again: ingested once.
    drain(&f.app.sink().await).await;
    assert_eq!(f.status(batch).await["status"], "ingested");
    assert_eq!(f.rows_of(batch).await, 3);
}

#[tokio::test]
async fn a_batch_left_pending_gets_a_new_pointer_from_the_reaper() {
    let f = fixture(TestApp::spawn().await).await;
    let batch = f.publish_batch(ROWS.as_bytes(), 3).await;
    let reaper =
        dispatcher::roles::reaper::Reaper::new(f.app.store.clone(), f.app.settings.clone());
    assert_eq!(
        reaper.reap_once().await.unwrap().repointed,
        0,
        "not stale yet"
    );
    sqlx::query("UPDATE buffer_publishes SET pointer_at = now() - interval '1 hour'")
        .execute(&f.app.db.pool)
        .await
        .unwrap();
    assert_eq!(reaper.reap_once().await.unwrap().repointed, 1);
    assert_eq!(reaper.reap_once().await.unwrap().repointed, 0, "once");
    let pointers: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM outbox WHERE topic = 'buffer' AND payload->>'batch_id' = $1::text",
    )
    .bind(batch)
    .fetch_one(&f.app.db.pool)
    .await
    .unwrap();
    assert_eq!(pointers, 2, "the publish's pointer and the reaper's");
    f.relay().await;
    drain(&f.app.sink().await).await;
    assert_eq!(f.rows_of(batch).await, 3);
}

#[tokio::test]
async fn buffer_publish_needs_a_stream_dataset_of_the_org() {
    let f = fixture(TestApp::spawn().await).await;
    let job = f
        .app
        .submit(&json!({"name": "j", "tasks": [
            {"key": "w", "runtime": "exec", "bundle": "x", "outputs": ["clicks", "nowhere"]}]}))
        .await;
    f.app
        .create_dataset("clicks", "append", json!([{"name": "a", "type": "string"}]))
        .await;
    let claim = f.app.claim(job.tasks[0].task_id).await;
    for (dataset, status, code) in [
        ("clicks", StatusCode::BAD_REQUEST, "invalid_request"),
        ("nowhere", StatusCode::NOT_FOUND, "not_found"),
    ] {
        let r = f
            .app
            .post(
                "/v1/task/buffer-publish",
                &claim.capability_token,
                &json!({"batch_id": Uuid::new_v4(), "dataset": dataset,
                        "object_key": format!("{}b.jsonl", claim.object_prefix),
                        "rows": 1, "sha256": sha(b"x")}),
            )
            .await;
        assert_eq!(
            (r.status, r.code()),
            (status, code),
            "{dataset}: {}",
            r.body
        );
    }
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM buffer_publishes")
        .fetch_one(&f.app.db.pool)
        .await
        .unwrap();
    assert_eq!(n, 0, "nothing recorded");
}

#[tokio::test]
async fn batch_ids_are_unique_per_org_and_another_orgs_batch_is_not_found() {
    let f = fixture(TestApp::spawn().await).await;
    let batch = f.publish_batch(ROWS.as_bytes(), 3).await;

    // Another org: same dataset name, same batch id: its own batch.
    let other = f.app.store.ensure_org("globex").await.unwrap();
    let user = f.app.store.ensure_user("hal@globex.test").await.unwrap();
    f.app
        .store
        .set_membership(other, user, dispatcher::domain::Role::Member)
        .await
        .unwrap();
    let token = f
        .app
        .keys
        .mint_user(user, other, chrono::Utc::now() + chrono::Duration::hours(1));
    let r = f
        .app
        .get(&format!("/v1/datasets/events/batches/{batch}"), &token)
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);
    let r = f
        .app
        .post(
            "/v1/datasets",
            &token,
            &json!({"name": "events", "mode": "stream", "columns": [{"name": "a", "type": "string"}]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let job = f
        .app
        .post(
            "/v1/jobs",
            &token,
            &json!({"name": "j", "tasks": [{"key": "w", "runtime": "exec", "bundle": "x", "outputs": ["events"]}]}),
        )
        .await;
    let task: Uuid = serde_json::from_value(job.body["tasks"][0]["task_id"].clone()).unwrap();
    let claim = f.app.claim(task).await;
    let body = b"{\"a\": \"x\"}\n";
    let key = format!("{}b.jsonl", claim.object_prefix);
    f.app.objects.put(&key, body.to_vec()).await.unwrap();
    let r = f
        .app
        .post(
            "/v1/task/buffer-publish",
            &claim.capability_token,
            &json!({"batch_id": batch, "dataset": "events", "object_key": key, "rows": 1, "sha256": sha(body)}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    f.relay().await;
    drain(&f.app.sink().await).await;
    assert_eq!(f.status(batch).await["rows"], 3, "the first org's batch");
    let r = f
        .app
        .get(&format!("/v1/datasets/events/batches/{batch}"), &token)
        .await;
    assert_eq!(
        r.body,
        json!({"batch_id": batch, "status": "ingested", "rows": 1, "reason": null})
    );
    let r = f
        .app
        .get("/v1/datasets/events/batches/not-a-uuid", &f.app.user_token)
        .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::BAD_REQUEST, "invalid_request")
    );
}

#[tokio::test]
async fn a_later_attempt_replaying_the_same_publish_changes_nothing_and_another_body_is_409() {
    let f = fixture(TestApp::spawn().await).await;
    let batch = f.publish_batch(ROWS.as_bytes(), 3).await;
    let key = format!("{}buffers/{batch}.jsonl", f.claim.object_prefix);
    let sum = sha(ROWS.as_bytes());
    let task = f.claim.task_id;
    let second = f.app.supersede(task).await;
    let publish = |body: Value| {
        let app = &f.app;
        let token = second.capability_token.clone();
        async move { app.post("/v1/task/buffer-publish", &token, &body).await }
    };
    let before = f.app.snapshot(task).await;
    // The same body (its key under the first attempt's prefix): accepted,
    // nothing recorded.
    let r = publish(
        json!({"batch_id": batch, "dataset": "events", "object_key": key,
                           "rows": 3, "sha256": sum}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body, json!({"batch_id": batch, "status": "accepted"}));
    // Another body for the same batch id, even under its own prefix: 409.
    let own = format!("{}buffers/{batch}.jsonl", second.object_prefix);
    let r = publish(
        json!({"batch_id": batch, "dataset": "events", "object_key": own,
                           "rows": 3, "sha256": sum}),
    )
    .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::CONFLICT, "conflict"),
        "{}",
        r.body
    );
    // A new batch outside its own prefix: 403.
    let r = publish(
        json!({"batch_id": Uuid::new_v4(), "dataset": "events", "object_key": key,
                           "rows": 3, "sha256": sum}),
    )
    .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::FORBIDDEN, "forbidden"),
        "{}",
        r.body
    );
    assert_eq!(f.app.snapshot(task).await, before, "nothing changed");
}

#[tokio::test]
async fn invariant_12_a_batch_past_the_size_bound_is_dead_and_inserts_nothing() {
    let f = fixture(
        TestApp::spawn_with(dispatcher::settings::Settings {
            max_part_bytes: 64,
            ..Default::default()
        })
        .await,
    )
    .await;
    let batch = f.publish_batch(ROWS.as_bytes(), 3).await;
    f.relay().await;
    drain(&f.app.sink().await).await;
    let s = f.status(batch).await;
    assert_eq!(s["status"], "dead", "{s}");
    assert_eq!(s["reason"]["code"], "row_too_large");
    assert_eq!(s["reason"]["line"], Value::Null);
    assert_eq!(f.rows_of(batch).await, 0);
}

#[tokio::test]
async fn a_pointer_stays_hidden_while_its_batch_is_in_hand() {
    let f = fixture(
        TestApp::spawn_with(dispatcher::settings::Settings {
            sink_visibility: Duration::from_secs(1),
            ..Default::default()
        })
        .await,
    )
    .await;
    let batch = f.publish_batch(ROWS.as_bytes(), 3).await;
    f.relay().await;
    let sink = f.app.sink().await;
    // Make the sink's insert wait: another transaction holds the batch's
    // dedup key, uncommitted.
    let dataset: Uuid = sqlx::query_scalar("SELECT id FROM datasets WHERE name = 'events'")
        .fetch_one(&f.app.db.pool)
        .await
        .unwrap();
    let mut blocker = f.data.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO sink_batches (org_id, batch_id, dataset_id, rows, sha256, task_id, attempt)
         VALUES ($1, $2, $3, 3, $4, $5, 1)",
    )
    .bind(f.app.org_id)
    .bind(batch)
    .bind(dataset)
    .bind(sha(ROWS.as_bytes()))
    .bind(f.claim.task_id)
    .execute(&mut *blocker)
    .await
    .unwrap();
    let running = tokio::spawn({
        let sink = sink.clone();
        async move { sink.poll(Duration::ZERO).await.unwrap() }
    });
    // Three visibilities later the pointer is still hidden: extended.
    tokio::time::sleep(Duration::from_millis(3_000)).await;
    let hidden: bool = sqlx::query_scalar(
        "SELECT bool_and(visible_at > now()) FROM queue_messages WHERE queue = 'buffers'",
    )
    .fetch_one(&f.app.db.pool)
    .await
    .unwrap();
    assert!(
        hidden,
        "the pointer became visible while its batch was in hand"
    );
    assert!(!running.is_finished());
    blocker.rollback().await.unwrap();
    assert_eq!(running.await.unwrap(), 1);
    assert_eq!(f.status(batch).await["status"], "ingested");
    assert_eq!(f.rows_of(batch).await, 3);
}

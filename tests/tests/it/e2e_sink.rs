//! The buffer sink in a real dispatcher process: killed (debug failpoint,
//! like SIGKILL) between its data-database commit and its queue delete, it
//! inserts nothing twice after the restart; and the operator commands
//! `dispatcher admin sink dead list|replay|purge` on a dead batch.

use std::process::Command;
use std::time::{Duration, Instant};

use chrono::Utc;
use dispatcher_tests::stack::{binary, Caller, Stack};
use serde_json::{json, Value};
use sha2::Digest;
use uuid::Uuid;

fn rows(task: &str) -> String {
    (0..4)
        .map(|n| {
            format!("{{\"ts\": \"2026-01-01T00:00:00Z\", \"task\": \"{task}\", \"attempt\": 1, \"n\": {n}}}\n")
        })
        .collect()
}

async fn publish(caller: &Caller, claim: &Value, body: &str, sha256: &str) -> Uuid {
    let batch = Uuid::new_v4();
    let key = caller
        .upload(claim, &format!("buffers/{batch}.jsonl"), body.as_bytes())
        .await;
    let (status, answer) = caller
        .post(
            "/v1/task/buffer-publish",
            claim["capability_token"].as_str().unwrap(),
            json!({"batch_id": batch, "dataset": "sample_events", "object_key": key,
                   "rows": 4, "sha256": sha256}),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{answer}");
    batch
}

async fn state(stack: &Stack, batch: Uuid) -> String {
    sqlx::query_scalar("SELECT state FROM buffer_publishes WHERE batch_id = $1")
        .bind(batch)
        .fetch_one(&stack.db.pool)
        .await
        .unwrap()
}

async fn wait_state(stack: &Stack, batch: Uuid, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while state(stack, batch).await != want {
        assert!(Instant::now() < deadline, "batch {batch} never {want}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn admin(stack: &Stack, args: &[&str]) -> (bool, String) {
    let out = Command::new(binary("dispatcher"))
        .args(["admin", "sink", "dead"])
        .args(args)
        .env("DATABASE_URL", stack.db.url())
        .env("DISPATCHER_OBJECTS_DIR", stack.dir.join("objects"))
        .output()
        .expect("dispatcher admin");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invariant_8_a_sink_killed_between_its_insert_and_its_queue_delete_inserts_nothing_twice() {
    // The harness gives the sink a 2 s visibility: the pointer the killed
    // sink held comes back after it.
    let mut stack = Stack::new().await;
    let (_, ids) = stack
        .submit(
            json!({"name": "s", "tasks": [{"key": "w", "runtime": "exec", "bundle": "x",
                                               "outputs": ["sample_events"]}]}),
        )
        .await;
    let worker = stack
        .keys
        .mint_worker("e2e", Utc::now() + chrono::Duration::hours(1));
    let caller = Caller::new(&stack);

    stack.start_dispatcher("sink_after_ingest").await;
    let claim = caller.claim(&worker, ids[0], 120).await;
    let body = rows("w");
    let sum = hex::encode(sha2::Sha256::digest(body.as_bytes()));
    let batch = publish(&caller, &claim, &body, &sum).await;
    assert!(
        stack.wait_dispatcher_exit(Duration::from_secs(20)).await,
        "the sink's failpoint never fired"
    );
    let data = sqlx::PgPool::connect(&stack.db.data_url()).await.unwrap();
    let stream: Uuid = sqlx::query_scalar("SELECT id FROM datasets WHERE name = 'sample_events'")
        .fetch_one(&stack.db.pool)
        .await
        .unwrap();
    let table = dispatcher::services::sink::Sink::table_name(stream);
    let count = || async {
        sqlx::query_scalar::<_, i64>(&format!(
            "SELECT count(*) FROM {table} WHERE _batch_id = $1"
        ))
        .bind(batch)
        .fetch_one(&data)
        .await
        .unwrap()
    };
    assert_eq!(count().await, 4, "the rows were committed before the crash");
    assert_eq!(
        state(&stack, batch).await,
        "pending",
        "the crash came before the state database heard of it"
    );

    // Restarted, the sink gets the pointer again (its visibility ran out):
    // the data database refuses the batch id, the state catches up.
    stack.start_dispatcher("").await;
    wait_state(&stack, batch, "ingested").await;
    assert_eq!(count().await, 4, "every row exactly once");
    let recorded: i64 = sqlx::query_scalar("SELECT count(*) FROM sink_batches")
        .fetch_one(&data)
        .await
        .unwrap();
    assert_eq!(recorded, 1);

    // A batch published with the wrong checksum ends dead; the operator
    // commands list, dry-run and purge it.
    let bad = publish(&caller, &claim, &body, &"0".repeat(64)).await;
    wait_state(&stack, bad, "dead").await;
    let (ok, out) = admin(&stack, &["list"]);
    assert!(ok, "{out}");
    assert!(
        out.contains(&bad.to_string()) && out.contains("checksum_mismatch"),
        "{out}"
    );
    let (ok, out) = admin(
        &stack,
        &["replay", "--batch", &bad.to_string(), "--dry-run"],
    );
    assert!(ok && out.contains(&format!("would replay {bad}")), "{out}");
    let (ok, out) = admin(&stack, &["purge"]);
    assert!(
        !ok && out.contains("--all"),
        "an unfiltered purge is refused: {out}"
    );
    let (ok, out) = admin(&stack, &["purge", "--batch", &bad.to_string(), "--dry-run"]);
    assert!(ok && out.contains("would purge 1"), "{out}");
    assert_eq!(state(&stack, bad).await, "dead", "dry runs change nothing");
    let (ok, out) = admin(&stack, &["purge", "--batch", &bad.to_string()]);
    assert!(ok && out.contains("purged 1"), "{out}");
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM buffer_publishes WHERE batch_id = $1")
        .bind(bad)
        .fetch_one(&stack.db.pool)
        .await
        .unwrap();
    assert_eq!(left, 0);
    assert_eq!(count().await, 4);
}

//! The datasets benchmark (`scripts/bench-datasets`): the real
//! `dispatcher serve` binary (local profile) on a database of its own.
//!
//! 1. **Stage and commit.** `--tasks` tasks of one `append` dataset, run by
//!    `--workers` simulated workers: claim, upload one part of `--rows`
//!    rows through a presigned URL, stage it (the dispatcher reads the
//!    object, checks size and sha256 and parses every row), complete
//!    (which commits the version in the completion's transaction). Prints
//!    the latency percentiles of `stage` and of `complete`.
//! 2. **Sink.** `--batches` buffer batches of `--rows` rows are published
//!    with the sink stopped; then a dispatcher with the sink role starts
//!    and the time until every batch is ingested gives batches/s and
//!    rows/s.
//! 3. **Query.** A version of `--query-rows` rows (10 parts) is committed;
//!    `--queries` filtered reads of it, and of the stream the sink filled,
//!    give p50/p99 latency.
//!
//! Usage: `datasets-bench [--tasks N] [--workers W] [--rows R] [--batches B]
//! [--query-rows Q] [--queries K]` (defaults 200, 8, 100, 2000, 100 000, 50).

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use dispatcher_tests::stack::{Caller, Stack};
use serde_json::{json, Value};
use sha2::Digest;
use tokio::sync::Mutex;

struct Args {
    tasks: usize,
    workers: usize,
    rows: usize,
    batches: usize,
    query_rows: usize,
    queries: usize,
}

fn args() -> Args {
    let mut a = Args {
        tasks: 200,
        workers: 8,
        rows: 100,
        batches: 2000,
        query_rows: 100_000,
        queries: 50,
    };
    dispatcher_tests::numeric_flags(
        "datasets-bench [--tasks N] [--workers W] [--rows R] [--batches B] [--query-rows Q] [--queries K]",
        &mut [
            ("tasks", &mut a.tasks),
            ("workers", &mut a.workers),
            ("rows", &mut a.rows),
            ("batches", &mut a.batches),
            ("query-rows", &mut a.query_rows),
            ("queries", &mut a.queries),
        ],
    );
    a
}

fn body(rows: usize, tag: usize) -> String {
    (0..rows)
        .map(|n| {
            format!("{{\"ts\": \"2026-01-01T00:00:00Z\", \"task\": \"t{tag}\", \"attempt\": 1, \"n\": {n}}}\n")
        })
        .collect()
}

fn percentiles(name: &str, mut v: Vec<Duration>) {
    v.sort();
    let at = |p: f64| v[((v.len() as f64 * p) as usize).min(v.len() - 1)];
    println!(
        "  {name:<9} p50 {:>7.1} ms   p99 {:>7.1} ms   ({} calls)",
        at(0.5).as_secs_f64() * 1e3,
        at(0.99).as_secs_f64() * 1e3,
        v.len()
    );
}

async fn post(caller: &Caller, path: &str, token: &str, body: Value) -> (Duration, Value) {
    let started = Instant::now();
    let (status, answer) = caller
        .post(path, token, body)
        .await
        .unwrap_or_else(|e| panic!("{path}: {e}"));
    let took = started.elapsed();
    assert_eq!(status, 200, "{path}: {answer}");
    (took, answer)
}

#[tokio::main]
async fn main() {
    let args = args();
    let mut stack = Stack::new().await;
    let store = dispatcher::store::Store::new(stack.db.pool.clone(), Default::default());
    let user = store.ensure_user("bench@test").await.expect("user");
    let ds = dispatcher::domain::new_dataset(dispatcher_wire::CreateDatasetRequest {
        name: "bench_rows".into(),
        mode: dispatcher_wire::DatasetMode::Append,
        columns: dispatcher_wire::sample_columns(),
    })
    .expect("dataset");
    store
        .create_dataset(stack.org_id, user, &ds)
        .await
        .expect("bench_rows");
    let worker = stack
        .keys
        .mint_worker("bench", Utc::now() + chrono::Duration::hours(2));
    let rate = "1000000,1000000";
    for (k, v) in [
        ("DISPATCHER_RATE_PER_ORG", rate),
        ("DISPATCHER_RATE_PER_TASK", rate),
        ("DISPATCHER_RATE_PER_WORKER", rate),
        ("DISPATCHER_ROLES", "api,relay,reaper"),
    ] {
        stack.profile_env.push((k.into(), v.into()));
    }
    stack.start_dispatcher("").await;

    // 1. Stage and commit.
    let tasks: Vec<Value> = (0..args.tasks)
        .map(|i| json!({"key": format!("t{i}"), "runtime": "exec", "bundle": "x", "outputs": ["bench_rows"]}))
        .collect();
    let (_, ids) = stack.submit(json!({"name": "bench", "tasks": tasks})).await;
    let queue = Arc::new(Mutex::new(ids));
    let part = body(args.rows, 0);
    let started = Instant::now();
    let mut running = tokio::task::JoinSet::new();
    for _ in 0..args.workers {
        let (queue, worker, part) = (queue.clone(), worker.clone(), part.clone());
        let caller = Caller::new(&stack);
        running.spawn(async move {
            let (mut stage, mut complete) = (Vec::new(), Vec::new());
            loop {
                let Some(task) = queue.lock().await.pop() else {
                    break;
                };
                let claim = caller.claim(&worker, task, 60).await;
                let token = claim["capability_token"].as_str().unwrap().to_owned();
                let key = caller.upload(&claim, "part-0.jsonl", part.as_bytes()).await;
                let sha = hex::encode(sha2::Sha256::digest(part.as_bytes()));
                let (took, _) = post(
                    &caller,
                    "/v1/task/dataset-stage",
                    &token,
                    json!({"dataset": "bench_rows", "parts": [
                        {"key": key, "rows": part.lines().count(), "bytes": part.len(), "sha256": sha}]}),
                )
                .await;
                stage.push(took);
                let (took, answer) = post(
                    &caller,
                    "/v1/task/complete",
                    &token,
                    json!({"outcome": "succeeded", "output": {}}),
                )
                .await;
                assert_eq!(answer["versions"][0]["dataset"], "bench_rows");
                complete.push(took);
            }
            (stage, complete)
        });
    }
    let (mut stage, mut complete) = (Vec::new(), Vec::new());
    while let Some(r) = running.join_next().await {
        let (s, c) = r.expect("worker");
        stage.extend(s);
        complete.extend(c);
    }
    let elapsed = started.elapsed();
    let versions: i64 = sqlx::query_scalar("SELECT count(*) FROM dataset_versions")
        .fetch_one(&stack.db.pool)
        .await
        .unwrap();
    assert_eq!(versions as usize, args.tasks, "one version per task");
    println!(
        "stage + commit: {} tasks, one {}-row part each ({} bytes), {} workers, {:.1} s ({:.0} tasks/s)",
        args.tasks,
        args.rows,
        part.len(),
        args.workers,
        elapsed.as_secs_f64(),
        args.tasks as f64 / elapsed.as_secs_f64()
    );
    percentiles("stage", stage);
    percentiles("complete", complete);

    // 2. The sink: publish with the sink stopped, then time the ingest.
    let (_, ids) = stack
        .submit(json!({"name": "pub", "tasks": [{"key": "p", "runtime": "exec", "bundle": "x", "outputs": ["sample_events"]}]}))
        .await;
    let caller = Caller::new(&stack);
    let claim = caller.claim(&worker, ids[0], 3600).await;
    let token = claim["capability_token"].as_str().unwrap().to_owned();
    let batch = body(args.rows, 1);
    let sha = hex::encode(sha2::Sha256::digest(batch.as_bytes()));
    let started = Instant::now();
    for i in 0..args.batches {
        let id = uuid::Uuid::new_v4();
        let key = caller
            .upload(&claim, &format!("buffers/{i}.jsonl"), batch.as_bytes())
            .await;
        post(
            &caller,
            "/v1/task/buffer-publish",
            &token,
            json!({"batch_id": id, "dataset": "sample_events", "object_key": key,
                   "rows": args.rows, "sha256": sha}),
        )
        .await;
    }
    println!(
        "publish: {} batches in {:.1} s",
        args.batches,
        started.elapsed().as_secs_f64()
    );
    // The relay has moved the pointers to the queue when the outbox is
    // empty of pending rows.
    loop {
        let pending: i64 =
            sqlx::query_scalar("SELECT count(*) FROM outbox WHERE state = 'pending'")
                .fetch_one(&stack.db.pool)
                .await
                .unwrap();
        if pending == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stack.kill_dispatcher();
    stack.profile_env.retain(|(k, _)| k != "DISPATCHER_ROLES");
    stack
        .profile_env
        .push(("DISPATCHER_ROLES".into(), "api,sink".into()));
    let started = Instant::now();
    stack.start_dispatcher("").await;
    loop {
        let pending: i64 =
            sqlx::query_scalar("SELECT count(*) FROM buffer_publishes WHERE state <> 'ingested'")
                .fetch_one(&stack.db.pool)
                .await
                .unwrap();
        if pending == 0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "{pending} batches not ingested after 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let data = sqlx::PgPool::connect(&stack.db.data_url()).await.unwrap();
    // The ingest window as the data database recorded it: first to last
    // batch committed (the process start is not the sink's work).
    let (recorded, window): (i64, f64) = sqlx::query_as(
        "SELECT coalesce(sum(rows), 0)::bigint,
                extract(epoch FROM max(ingested_at) - min(ingested_at))::float8 FROM sink_batches",
    )
    .fetch_one(&data)
    .await
    .unwrap();
    assert_eq!(recorded as usize, args.batches * args.rows);
    println!(
        "sink: {} batches of {} rows ingested in {:.2} s, first to last commit (concurrency 4): {:.0} batches/s, {:.0} rows/s",
        args.batches,
        args.rows,
        window,
        args.batches as f64 / window,
        (args.batches * args.rows) as f64 / window
    );

    // 3. Query latency: a filtered, ordered read of a committed version and
    // of the stream.
    let ds = dispatcher::domain::new_dataset(dispatcher_wire::CreateDatasetRequest {
        name: "bench_query".into(),
        mode: dispatcher_wire::DatasetMode::Replace,
        columns: dispatcher_wire::sample_columns(),
    })
    .expect("dataset");
    store
        .create_dataset(stack.org_id, user, &ds)
        .await
        .expect("bench_query");
    let (_, ids) = stack
        .submit(json!({"name": "q", "tasks": [{"key": "q", "runtime": "exec", "bundle": "x", "outputs": ["bench_query"]}]}))
        .await;
    let claim = caller.claim(&worker, ids[0], 3600).await;
    let token = claim["capability_token"].as_str().unwrap().to_owned();
    let per_part = args.query_rows.div_ceil(10);
    let mut parts = Vec::new();
    for p in 0..10 {
        let part = body(per_part, p);
        let key = caller
            .upload(&claim, &format!("q-{p}.jsonl"), part.as_bytes())
            .await;
        parts.push(json!({"key": key, "rows": per_part, "bytes": part.len(),
                          "sha256": hex::encode(sha2::Sha256::digest(part.as_bytes()))}));
    }
    post(
        &caller,
        "/v1/task/dataset-stage",
        &token,
        json!({"dataset": "bench_query", "parts": parts}),
    )
    .await;
    post(
        &caller,
        "/v1/task/complete",
        &token,
        json!({"outcome": "succeeded", "output": {}}),
    )
    .await;
    store
        .set_membership(stack.org_id, user, dispatcher::domain::Role::Member)
        .await
        .expect("membership");
    let reader = stack
        .keys
        .mint_user(user, stack.org_id, Utc::now() + chrono::Duration::hours(1));
    for dataset in ["bench_query", "sample_events"] {
        let q = json!({"dataset": dataset,
            "where": {"and": [{"n": {"gte": 10}}, {"task": {"in": ["t1", "t3", "t5"]}},
                              {"not": {"attempt": {"ne": 1}}}]},
            "order_by": [{"column": "n", "desc": true}], "limit": 100});
        let mut took = Vec::with_capacity(args.queries);
        for _ in 0..args.queries {
            let (t, answer) = post(&caller, "/v1/query", &reader, q.clone()).await;
            assert!(answer["rows"].is_array(), "{answer}");
            took.push(t);
        }
        let rows = if dataset == "bench_query" {
            10 * per_part
        } else {
            args.batches * args.rows
        };
        println!(
            "query: filtered, ordered read (limit 100) of {} ({rows} rows)",
            if dataset == "bench_query" {
                "a committed version, 10 parts"
            } else {
                "the stream"
            }
        );
        percentiles("query", took);
    }
    stack.kill_dispatcher();
}

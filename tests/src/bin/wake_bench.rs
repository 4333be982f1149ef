//! Wake-up → claim latency at low load (`scripts/bench-wake`): the real
//! dispatcher (all roles, local profile) and one real worker wrapper; one
//! one-task job at a time, each submitted when the previous one has
//! finished. The latency is Postgres's own: from the job's `created_at`
//! (the submission's commit) to its attempt's `claimed_at`, so it holds the
//! outbox relay, the queue long-poll and the claim.
//!
//! Usage: `wake_bench [--jobs N]` (default 200).

use std::time::{Duration, Instant};

use dispatcher_tests::stack::{Stack, WorkerOpts};
use serde_json::json;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[(((sorted.len() - 1) as f64) * p).round() as usize]
}

#[tokio::main]
async fn main() {
    let mut jobs = 200;
    dispatcher_tests::numeric_flags("wake_bench [--jobs N]", &mut [("jobs", &mut jobs)]);
    let mut stack = Stack::new().await;
    stack.start_dispatcher("").await;
    let mut opts = WorkerOpts::new("wake-bench");
    opts.concurrency = 4;
    opts.lease_seconds = 30;
    let _worker = stack.start_worker(&opts);
    // Warm-up: the worker's first receive and connections.
    for i in 0..jobs + 5 {
        let (job, _) = stack
            .submit(json!({"name": format!("w{i}"), "tasks": [
                {"key": "t", "runtime": "exec", "bundle": "/bin/true"}]}))
            .await;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let state: String = sqlx::query_scalar("SELECT state FROM jobs WHERE id = $1")
                .bind(job)
                .fetch_one(&stack.db.pool)
                .await
                .unwrap();
            if state != "running" {
                break;
            }
            assert!(Instant::now() < deadline, "job {job} did not finish");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let mut ms: Vec<f64> = sqlx::query_scalar(
        "SELECT extract(epoch FROM a.claimed_at - j.created_at)::float8 * 1000
           FROM attempts a JOIN tasks t ON t.id = a.task_id JOIN jobs j ON j.id = t.job_id
          WHERE a.attempt = 1 ORDER BY j.created_at OFFSET 5",
    )
    .fetch_all(&stack.db.pool)
    .await
    .unwrap();
    ms.sort_by(f64::total_cmp);
    println!(
        "wake-up -> claim at low load ({} one-task jobs, one at a time; real worker wrapper, local profile): p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        ms.len(),
        percentile(&ms, 0.5),
        percentile(&ms, 0.9),
        percentile(&ms, 0.99),
        percentile(&ms, 1.0)
    );
}

//! `GET /v1/jobs` at scale (`scripts/bench-jobs`, issue 25): an API server
//! in this process over a database of its own holding `--jobs N` jobs
//! (default 100 000) of one org with three tasks each (a tenth failed), and
//! 10 000 jobs of another org; then `--calls C` (default 300) listings of
//! each kind, one at a time, timed at the client. Prints p50/p99/max per
//! kind.

use std::time::{Duration, Instant};

use dispatcher_tests::{unthrottled, TestApp};
use reqwest::StatusCode;

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = (((sorted.len() - 1) as f64) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() {
    let (mut jobs, mut calls) = (100_000usize, 300usize);
    dispatcher_tests::numeric_flags(
        "jobs_bench [--jobs N] [--calls C]",
        &mut [("jobs", &mut jobs), ("calls", &mut calls)],
    );
    let app = TestApp::spawn_with(unthrottled()).await;
    let pool = &app.db.pool;
    let t0 = Instant::now();
    sqlx::query(
        "INSERT INTO jobs (id, org_id, name, state, tasks_unfinished, created_at, finished_at)
         SELECT gen_random_uuid(), $1, 'etl-' || (i % 50),
                CASE WHEN i % 10 = 0 THEN 'failed' ELSE 'succeeded' END, 0,
                now() - i * interval '1 second', now() - i * interval '1 second' + interval '2 seconds'
           FROM generate_series(1, $2) AS i",
    )
    .bind(app.org_id)
    .bind(jobs as i64)
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO tasks (id, job_id, state, attempt, max_attempts, pending_deps)
         SELECT gen_random_uuid(), j.id,
                CASE WHEN j.state = 'failed' AND k = 1 THEN 'failed'
                     WHEN j.state = 'failed' THEN 'cancelled' ELSE 'succeeded' END,
                1, 3, 0
           FROM jobs j, generate_series(1, 3) AS k",
    )
    .execute(pool)
    .await
    .unwrap();
    let other = app.store.ensure_org("globex").await.unwrap();
    sqlx::query(
        "INSERT INTO jobs (id, org_id, name, state, tasks_unfinished)
         SELECT gen_random_uuid(), $1, 'etl-0', 'running', 0 FROM generate_series(1, 10000)",
    )
    .bind(other)
    .execute(pool)
    .await
    .unwrap();
    sqlx::query("ANALYZE").execute(pool).await.unwrap();
    eprintln!(
        "{jobs} jobs ({} tasks) loaded in {:.1} s",
        jobs * 3,
        t0.elapsed().as_secs_f64()
    );

    let time = |path: String| {
        let app = &app;
        async move {
            let start = Instant::now();
            let r = app.get(&path, &app.user_token).await;
            assert_eq!(r.status, StatusCode::OK, "{path}: {}", r.body);
            (
                start.elapsed(),
                r.body["next_cursor"].as_str().map(str::to_owned),
            )
        }
    };
    // A cursor deep in the listing: 100 pages in (fewer for a small run).
    let depth = (jobs / 100).clamp(1, 101) - 1;
    let mut deep = None;
    for _ in 0..depth.max(1) {
        let path = match &deep {
            None => "/v1/jobs?limit=100".to_owned(),
            Some(c) => format!("/v1/jobs?limit=100&after={c}"),
        };
        deep = time(path).await.1;
    }
    let deep = deep.expect("a second page");
    let kinds = [
        ("first page (100 jobs)", "/v1/jobs".to_owned()),
        ("a deep page (cursor)", format!("/v1/jobs?after={deep}")),
        ("state=failed", "/v1/jobs?state=failed".to_owned()),
        ("name_prefix=etl-7", "/v1/jobs?name_prefix=etl-7".to_owned()),
        (
            "has_failed_tasks=true",
            "/v1/jobs?has_failed_tasks=true".to_owned(),
        ),
        ("limit=10", "/v1/jobs?limit=10".to_owned()),
    ];
    println!(
        "GET /v1/jobs over {jobs} jobs of one org ({} tasks) and 10 000 of another; {calls} calls each, one at a time",
        jobs * 3
    );
    println!(
        "{:<24} {:>9} {:>9} {:>9}",
        "listing (ms)", "p50", "p99", "max"
    );
    for (name, path) in kinds {
        for _ in 0..10 {
            time(path.clone()).await;
        }
        let mut took = Vec::with_capacity(calls);
        for _ in 0..calls {
            took.push(time(path.clone()).await.0);
        }
        took.sort();
        println!(
            "{name:<24} {:>9.2} {:>9.2} {:>9.2}",
            percentile(&took, 0.5),
            percentile(&took, 0.99),
            percentile(&took, 1.0)
        );
    }
}

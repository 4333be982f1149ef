//! The runners benchmark (`scripts/bench-runners`): cold and warm
//! invocation latency per language, with the real dispatcher and worker
//! wrapper (release builds), measured by the wrapper from the moment it
//! has a claimed task until the runner's answer.
//!
//! * **warm**: `--warm` tasks in a row on one bundle: the same runner
//!   process answers each (no-op handler).
//! * **cold**: `--cold` tasks, each of a bundle of its own (the probe plus
//!   a salt file, so a new digest): fetching and checking the bundle,
//!   unpacking it, starting the runner and its init, then the invocation.
//!
//! Usage: `runners_bench [--warm N] [--cold N]` (defaults 50 and 10).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use dispatcher_tests::stack::{binary, Stack, WorkerOpts};
use serde_json::json;
use uuid::Uuid;

fn args() -> (usize, usize) {
    let mut warm = 50;
    let mut cold = 10;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let v = it.next().and_then(|v| v.parse().ok());
        match (a.as_str(), v) {
            ("--warm", Some(v)) => warm = v,
            ("--cold", Some(v)) => cold = v,
            _ => {
                eprintln!("usage: runners_bench [--warm N] [--cold N]");
                std::process::exit(2);
            }
        }
    }
    (warm, cold)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// A copy of a probe bundle with a salt file (a digest of its own).
fn salted(source: &Path, salt: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("bench-bundle-{}", Uuid::new_v4().simple()));
    copy_dir(source, &dir);
    std::fs::write(dir.join("salt"), salt).unwrap();
    dir
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn run_one(stack: &Stack, runtime: &str, bundle: &str) {
    let (job, _) = stack
        .submit(
            json!({"name": "bench", "tasks": [{"key": "t", "runtime": runtime,
                        "bundle": bundle, "inputs": {"do": "noop"}, "max_attempts": 1}]}),
        )
        .await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let state: String = sqlx::query_scalar("SELECT state FROM jobs WHERE id = $1")
            .bind(job)
            .fetch_one(&stack.db.pool)
            .await
            .unwrap();
        if state == "succeeded" {
            return;
        }
        assert!(state == "running", "bench job {job} ended {state}");
        assert!(Instant::now() < deadline, "bench job {job} still running");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// `(cold, ms)` of every "invocation ended" line of the worker's log for
/// `runtime`.
fn timings(log: &str, runtime: &str) -> Vec<(bool, f64)> {
    log.lines()
        .filter(|l| l.contains("invocation ended") && l.contains(&format!("runtime=\"{runtime}\"")))
        .filter_map(|l| {
            let cold = l.contains("cold=true");
            let ms = l
                .split("ms=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()?;
            Some((cold, ms))
        })
        .collect()
}

#[tokio::main]
async fn main() {
    let (warm_n, cold_n) = args();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/bundles");
    let rust_dir = std::env::temp_dir().join(format!("bench-rust-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&rust_dir).unwrap();
    std::fs::copy(binary("udf-rust-probe"), rust_dir.join("bootstrap")).unwrap();
    std::fs::write(
        rust_dir.join("bundle.json"),
        r#"{"runtime": "rust", "handler": "bootstrap"}"#,
    )
    .unwrap();
    let languages = [
        ("python", root.join("python-probe")),
        ("node", root.join("node-probe")),
        ("rust", rust_dir.clone()),
    ];

    let mut stack = Stack::new().await;
    stack.start_dispatcher("").await;
    let mut opts = WorkerOpts::new("bench-runners");
    opts.concurrency = 1;
    opts.lease_seconds = 30;
    let worker = stack.start_worker(&opts);

    for (runtime, dir) in &languages {
        let digest = stack.push_bundle(dir, None);
        for _ in 0..warm_n + 1 {
            run_one(&stack, runtime, &digest).await;
        }
        for i in 0..cold_n {
            let salted = salted(dir, &format!("{i}"));
            let digest = stack.push_bundle(&salted, None);
            run_one(&stack, runtime, &digest).await;
            let _ = std::fs::remove_dir_all(&salted);
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = worker.log_text();
    println!(
        "runner invocation latency, ms (the wrapper's claim-to-answer; {} on this machine)",
        std::env::consts::ARCH
    );
    println!(
        "{:<8} {:>6} {:>9} {:>9} {:>6} {:>9} {:>9}",
        "runtime", "cold n", "cold p50", "cold p99", "warm n", "warm p50", "warm p99"
    );
    for (runtime, _) in &languages {
        let t = timings(&log, runtime);
        // The first run of the warm series is cold (it starts the runner).
        let mut cold: Vec<f64> = t.iter().filter(|(c, _)| *c).map(|(_, ms)| *ms).collect();
        let mut warm: Vec<f64> = t.iter().filter(|(c, _)| !*c).map(|(_, ms)| *ms).collect();
        cold.sort_by(f64::total_cmp);
        warm.sort_by(f64::total_cmp);
        println!(
            "{:<8} {:>6} {:>9.1} {:>9.1} {:>6} {:>9.2} {:>9.2}",
            runtime,
            cold.len(),
            percentile(&cold, 0.5),
            percentile(&cold, 0.99),
            warm.len(),
            percentile(&warm, 0.5),
            percentile(&warm, 0.99)
        );
    }
    let _ = std::fs::remove_dir_all(&rust_dir);
}

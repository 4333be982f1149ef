//! The dispatcher benchmark (`scripts/bench`): the real `dispatcher serve`
//! binary (all roles, local profile) on a database of its own, and
//! simulated workers speaking the worker contract over HTTP as fast as they
//! can: receive a wake-up, claim, heartbeat, emit one event, complete,
//! delete the wake-up (the `queue` wake-up mode). No task process is spawned, so the figures are the
//! dispatcher's and Postgres's, not `fork`/`exec`'s.
//!
//! Prints tasks/s, latency percentiles per call, and the dispatcher's
//! memory (peak and final RSS), then checks the run's invariants (every
//! task succeeded exactly once, every outbox row published).
//!
//! With `--batch B`, each worker instead takes work through the batched
//! calls: `task-claim-batch` with `max_tasks` B, long-polled (ready tasks
//! straight from Postgres, woken by NOTIFY: the local profile's default
//! `notify` wake-ups, no wake-up messages, ADR 0017), then one
//! `complete-batch` for what it got
//! (no heartbeat or event: a no-op task's burn-down, as the Postgres job
//! queues it is compared with measure it).
//!
//! With `--report-every R` (the soak, `scripts/soak`), jobs are submitted
//! while the run goes (at most two jobs ahead of the workers, so the tables
//! grow as a service's do), and every R tasks a line gives the interval's
//! tasks/s, the dispatcher's RSS, and the dead tuples and size of the hot
//! tables.
//!
//! With `--retention-seconds S`, the dispatcher's pruner deletes finished
//! jobs S seconds after they finished (a pass every 5 s), and the reports
//! show whether the tables stop growing.
//!
//! Usage: `bench [--tasks N] [--workers W] [--tasks-per-job J] [--batch B]
//! [--report-every R] [--retention-seconds S]` (defaults 5000, 32, 10 000 — one job, the most a job
//! may hold —, 0: single calls, and 0: no reports).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use chrono::Utc;
use dispatcher_tests::stack::Stack;
use dispatcher_wire as wire;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::json;

const CALLS: [&str; 6] = [
    "receive",
    "claim",
    "heartbeat",
    "event",
    "complete",
    "delete",
];

struct Args {
    tasks: usize,
    tasks_per_job: usize,
    workers: usize,
    batch: usize,
    report_every: usize,
    retention_seconds: usize,
}

fn args() -> Args {
    let mut a = Args {
        tasks: 5000,
        tasks_per_job: 10_000,
        workers: 32,
        batch: 0,
        report_every: 0,
        retention_seconds: 0,
    };
    dispatcher_tests::numeric_flags(
        "bench [--tasks N] [--workers W] [--tasks-per-job J] [--batch B] [--report-every R] [--retention-seconds S]",
        &mut [
            ("tasks", &mut a.tasks),
            ("tasks-per-job", &mut a.tasks_per_job),
            ("workers", &mut a.workers),
            ("batch", &mut a.batch),
            ("report-every", &mut a.report_every),
            ("retention-seconds", &mut a.retention_seconds),
        ],
    );
    a.tasks_per_job = a.tasks_per_job.min(10_000);
    a.batch = a.batch.min(100);
    a
}

/// One simulated worker's HTTP client.
struct Worker {
    http: reqwest::Client,
    base: String,
    credential: String,
    /// Latencies per call, indexed as `CALLS`.
    samples: Vec<Vec<Duration>>,
    /// When the completion of the run's last task was answered: the end of
    /// the burn-down, which workers still in a long poll then outlast.
    last_done: Arc<OnceLock<Instant>>,
}

impl Worker {
    /// Counts `n` more tasks done; the call that completes the last one
    /// marks the end of the burn-down.
    fn count_done(&self, done: &AtomicUsize, n: usize, total: usize) {
        if done.fetch_add(n, Ordering::Relaxed) + n >= total {
            let _ = self.last_done.set(Instant::now());
        }
    }

    async fn call<B: Serialize, R: DeserializeOwned>(
        &mut self,
        which: usize,
        path: &str,
        token: Option<&str>,
        body: &B,
    ) -> R {
        self.try_call(which, path, token, body, None)
            .await
            .expect("a refusal no call of the bench expects")
    }

    /// Deletes a received wake-up.
    async fn delete(&mut self, receipt_handle: String) {
        let _: wire::ReceiptResponse = self
            .call(
                5,
                "/internal/queues/wakeups/delete",
                None,
                &wire::DeleteRequest { receipt_handle },
            )
            .await;
    }

    /// As `call`, but a refusal with the code `tolerated` is `None`.
    async fn try_call<B: Serialize, R: DeserializeOwned>(
        &mut self,
        which: usize,
        path: &str,
        token: Option<&str>,
        body: &B,
        tolerated: Option<&str>,
    ) -> Option<R> {
        let token = token.unwrap_or(&self.credential).to_owned();
        let started = Instant::now();
        let resp = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(token)
            .json(body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        let status = resp.status();
        let bytes = resp.bytes().await.expect("body");
        self.samples[which].push(started.elapsed());
        if let Some(code) = tolerated {
            let refused: Option<wire::ErrorBody> = serde_json::from_slice(&bytes).ok();
            if !status.is_success() && refused.is_some_and(|r| r.error.code == code) {
                return None;
            }
        }
        assert!(
            status.is_success(),
            "{path}: {status} {}",
            String::from_utf8_lossy(&bytes)
        );
        Some(serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{path}: {e}")))
    }

    /// The batched loop: claim up to `batch` ready tasks, complete them
    /// in one call. Samples: claim-batch as "claim", complete-batch as
    /// "complete".
    async fn run_batched(
        mut self,
        id: usize,
        batch: usize,
        done: Arc<AtomicUsize>,
        total: usize,
    ) -> Vec<Vec<Duration>> {
        let worker_id = format!("bench-{id}");
        while done.load(Ordering::Relaxed) < total {
            let claimed: wire::ClaimBatchResponse = self
                .call(
                    1,
                    "/internal/task-claim-batch",
                    None,
                    &wire::ClaimBatchRequest {
                        worker_id: worker_id.clone(),
                        task_ids: None,
                        max_tasks: Some(batch as u32),
                        lease_seconds: None,
                        // A long-poll, as the worker wrapper's: answered
                        // when work is there (ADR 0017).
                        wait_seconds: Some(1),
                        runtimes: None,
                    },
                )
                .await;
            if claimed.claims.is_empty() {
                continue;
            }
            let entries: Vec<wire::TaskBatchEntry> = claimed
                .claims
                .iter()
                .filter_map(|c| c.claim.as_ref())
                .map(|c| wire::TaskBatchEntry {
                    capability_token: c.capability_token.clone(),
                    body: json!({"outcome": "succeeded", "output": {"ok": true}}),
                })
                .collect();
            let n = entries.len();
            let answer: wire::TaskBatchResponse = self
                .call(
                    4,
                    "/v1/task/complete-batch",
                    None,
                    &wire::TaskBatchRequest { entries },
                )
                .await;
            assert!(
                answer.results.iter().all(|r| r.error.is_none()),
                "a batched completion was refused: {:?}",
                answer.results.iter().find_map(|r| r.error.as_ref())
            );
            self.count_done(&done, n, total);
        }
        self.samples
    }

    async fn run(mut self, id: usize, done: Arc<AtomicUsize>, total: usize) -> Vec<Vec<Duration>> {
        let worker_id = format!("bench-{id}");
        while done.load(Ordering::Relaxed) < total {
            let received: wire::ReceiveResponse = self
                .call(
                    0,
                    "/internal/queues/wakeups/receive",
                    None,
                    &wire::ReceiveRequest {
                        max_messages: Some(1),
                        wait_seconds: Some(1),
                        visibility_timeout_seconds: Some(30),
                    },
                )
                .await;
            for msg in received.messages {
                let wake: wire::WakeUp = serde_json::from_value(msg.body).expect("wake-up");
                // A duplicate wake-up (the reaper re-wakes a task left ready
                // for 60 s) finds its task done: delete it, as workers do.
                let claim: Option<wire::ClaimResponse> = self
                    .try_call(
                        1,
                        "/internal/task-claim",
                        None,
                        &wire::ClaimRequest {
                            task_id: wake.task_id,
                            worker_id: worker_id.clone(),
                            lease_seconds: None,
                        },
                        Some("not_claimable"),
                    )
                    .await;
                let Some(claim) = claim else {
                    self.delete(msg.receipt_handle).await;
                    continue;
                };
                let token = claim.capability_token;
                let hb: wire::HeartbeatResponse = self
                    .call(
                        2,
                        "/v1/task/heartbeat",
                        Some(&token),
                        &wire::HeartbeatRequest::default(),
                    )
                    .await;
                let token = hb.capability_token;
                let _: wire::EventsResponse = self
                    .call(
                        3,
                        "/v1/task/events",
                        Some(&token),
                        &wire::EventsRequest {
                            events: vec![wire::Event {
                                seq: 1,
                                kind: "progress".into(),
                                payload: json!({"done": 1}),
                            }],
                        },
                    )
                    .await;
                let _: wire::CompleteResponse = self
                    .call(
                        4,
                        "/v1/task/complete",
                        Some(&token),
                        &wire::CompleteRequest {
                            outcome: wire::Outcome::Succeeded,
                            output: Some(json!({"ok": true})),
                            error: None,
                        },
                    )
                    .await;
                self.delete(msg.receipt_handle).await;
                self.count_done(&done, 1, total);
            }
        }
        self.samples
    }
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

/// `VmHWM` (peak RSS) and `VmRSS` of a process, in MiB.
fn memory(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// Submits `tasks` no-op tasks in jobs of `per_job`; with `ahead`, waits
/// before each job until fewer than `ahead` submitted tasks are not done.
async fn submit_all(
    store: dispatcher::store::Store,
    org: uuid::Uuid,
    tasks: usize,
    per_job: usize,
    ahead: Option<(usize, Arc<AtomicUsize>)>,
) {
    let settings = dispatcher::settings::Settings::default();
    let (mut submitted, mut chunk) = (0, 0);
    while submitted < tasks {
        if let Some((ahead, done)) = &ahead {
            while submitted - done.load(Ordering::Relaxed) >= *ahead {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let n = (tasks - submitted).min(per_job);
        let specs: Vec<_> = (0..n)
            .map(|i| json!({"key": format!("t{i}"), "runtime": "exec", "bundle": "bench"}))
            .collect();
        let job = json!({"name": format!("bench-{chunk}"), "tasks": specs});
        let job = dispatcher::domain::new_job(serde_json::from_value(job).expect("job"), &settings)
            .expect("valid job");
        store.submit_job(org, None, &job).await.expect("submit");
        submitted += n;
        chunk += 1;
    }
}

/// Every `every` tasks: the interval's rate, the dispatcher's RSS, and the
/// live and dead tuples and size of the hot tables.
async fn report(pool: sqlx::PgPool, pid: u32, every: usize, total: usize, done: Arc<AtomicUsize>) {
    println!(
        "  {:>9} {:>9} {:>9}   live / dead tuples / size MiB of tasks, attempts, jobs, outbox",
        "tasks", "tasks/s", "RSS MiB"
    );
    let (mut next, mut last_at, mut last_n) = (every, Instant::now(), 0);
    while next <= total {
        let n = done.load(Ordering::Relaxed);
        if n < next {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        let rate = (n - last_n) as f64 / last_at.elapsed().as_secs_f64();
        (last_at, last_n) = (Instant::now(), n);
        let tables: Vec<(String, i64, i64, i64)> = sqlx::query_as(
            "SELECT relname::text, n_live_tup, n_dead_tup, pg_total_relation_size(relid)
               FROM pg_stat_user_tables
              WHERE relname IN ('tasks', 'attempts', 'jobs', 'outbox')
              ORDER BY array_position(ARRAY['tasks', 'attempts', 'jobs', 'outbox'], relname::text)",
        )
        .fetch_all(&pool)
        .await
        .expect("table statistics");
        let tables: Vec<String> = tables
            .iter()
            .map(|(_, live, dead, size)| {
                format!("{live} / {dead} / {:.1}", *size as f64 / 1048576.0)
            })
            .collect();
        println!(
            "  {n:>9} {rate:>9.0} {:>9.1}   {}",
            memory(pid).1,
            tables.join(", ")
        );
        next += every;
    }
}

#[tokio::main]
async fn main() {
    let args = args();
    let mut stack = Stack::new().await;
    // Single calls take work from wake-up messages (the `queue` mode);
    // batched calls claim ready work directly (`notify`, the default).
    let wakeups = match args.batch {
        0 => dispatcher::settings::Wakeups::Queue,
        _ => dispatcher::settings::Wakeups::Notify,
    };
    if wakeups == dispatcher::settings::Wakeups::Queue {
        stack
            .profile_env
            .push(("DISPATCHER_WAKEUPS".to_owned(), "queue".to_owned()));
    }
    let store = dispatcher::store::Store::new(
        stack.db.pool.clone(),
        std::sync::Arc::new(dispatcher::settings::Settings {
            wakeups,
            ..Default::default()
        }),
    );
    let done = Arc::new(AtomicUsize::new(0));
    // Jobs hold at most 10 000 tasks: submit in chunks of `tasks_per_job`,
    // all before the run, or (a soak) during it.
    let submitter = if args.report_every > 0 {
        Some(tokio::spawn(submit_all(
            store,
            stack.org_id,
            args.tasks,
            args.tasks_per_job,
            Some((2 * args.tasks_per_job, done.clone())),
        )))
    } else {
        submit_all(store, stack.org_id, args.tasks, args.tasks_per_job, None).await;
        None
    };
    // One org does all the work here: its rate limits (3 000 calls/s by
    // default, counted per batch entry) would measure the limit, not the
    // dispatcher. The limits themselves are tested in `limits`.
    for (k, v) in [
        ("DISPATCHER_RATE_PER_ORG", "1000000"),
        ("DISPATCHER_RATE_PER_WORKER", "1000000"),
    ] {
        stack.profile_env.push((k.to_owned(), v.to_owned()));
    }
    if args.retention_seconds > 0 {
        for (k, v) in [
            (
                "DISPATCHER_JOB_RETENTION_SECONDS",
                args.retention_seconds.to_string(),
            ),
            ("DISPATCHER_JOB_PRUNE_INTERVAL_SECONDS", "5".to_owned()),
        ] {
            stack.profile_env.push((k.to_owned(), v));
        }
    }
    stack.start_dispatcher("").await;
    let pid = stack.dispatcher.as_ref().expect("dispatcher").id();
    let (_, rss_before) = memory(pid);
    let reporter = (args.report_every > 0).then(|| {
        tokio::spawn(report(
            stack.db.pool.clone(),
            pid,
            args.report_every,
            args.tasks,
            done.clone(),
        ))
    });

    let started = Instant::now();
    let last_done = Arc::new(OnceLock::new());
    let mut handles = Vec::new();
    for id in 0..args.workers {
        let worker = Worker {
            http: reqwest::Client::new(),
            base: stack.url(),
            credential: stack.keys.mint_worker(
                &format!("bench-{id}"),
                Utc::now() + chrono::Duration::hours(1),
            ),
            samples: vec![Vec::new(); CALLS.len()],
            last_done: last_done.clone(),
        };
        handles.push(if args.batch > 0 {
            tokio::spawn(worker.run_batched(id, args.batch, done.clone(), args.tasks))
        } else {
            tokio::spawn(worker.run(id, done.clone(), args.tasks))
        });
    }
    let mut samples: Vec<Vec<Duration>> = vec![Vec::new(); CALLS.len()];
    for h in handles {
        for (all, mine) in samples.iter_mut().zip(h.await.expect("worker")) {
            all.extend(mine);
        }
    }
    // The burn-down ends with its last completion, not when the last
    // worker's long poll (up to 1 s, answered empty) returns.
    let elapsed = last_done
        .get()
        .map_or_else(|| started.elapsed(), |t| t.duration_since(started));
    let (peak, rss_after) = memory(pid);
    for task in [submitter, reporter].into_iter().flatten() {
        task.await.expect("submitter or reporter");
    }
    // Batched workers claim without wake-ups, but the relay still
    // publishes one per task: how far behind it is, and how long it takes
    // to catch up (the checks below demand every outbox row published).
    if args.report_every > 0 {
        let waited = Instant::now();
        let backlog = pending_outbox(&stack).await;
        while pending_outbox(&stack).await > 0 {
            assert!(
                waited.elapsed() < Duration::from_secs(1800),
                "the relay did not catch up"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        println!(
            "  outbox: {backlog} rows pending when the last task was done, published {:.1} s later",
            waited.elapsed().as_secs_f64()
        );
    }

    println!(
        "dispatcher benchmark: {} tasks in jobs of up to {}, {} simulated workers, local profile, {} build",
        args.tasks,
        args.tasks_per_job,
        args.workers,
        if cfg!(debug_assertions) { "debug" } else { "release" }
    );
    let each = if args.batch > 0 {
        format!(
            "batched: task-claim-batch of up to {} ready tasks, then one complete-batch; no wake-up queue",
            args.batch
        )
    } else {
        "each task = receive, claim, heartbeat, event, complete, delete".to_owned()
    };
    println!(
        "  throughput: {:.0} tasks/s ({} tasks in {:.2} s; {each})",
        args.tasks as f64 / elapsed.as_secs_f64(),
        args.tasks,
        elapsed.as_secs_f64()
    );
    println!(
        "  {:<10} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "call (ms)", "p50", "p95", "p99", "max", "count"
    );
    for (name, s) in CALLS.iter().zip(samples.iter_mut()) {
        s.sort();
        println!(
            "  {:<10} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8}",
            name,
            percentile(s, 0.50),
            percentile(s, 0.95),
            percentile(s, 0.99),
            percentile(s, 1.0),
            s.len()
        );
    }
    println!(
        "  dispatcher memory: RSS {rss_before:.1} MiB at start, {rss_after:.1} MiB at end, peak {peak:.1} MiB"
    );
    println!(
        "  machine: {} cores, {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model()
    );
    let pruned = args.retention_seconds > 0;
    stack
        .assert_clean_after_pruning(args.tasks as i64, pruned)
        .await;
    println!(
        "  checked: every task {}succeeded exactly once; every outbox row published",
        if pruned { "not yet pruned " } else { "" }
    );
}

async fn pending_outbox(stack: &Stack) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM outbox WHERE state = 'pending'")
        .fetch_one(&stack.db.pool)
        .await
        .expect("pending outbox rows")
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

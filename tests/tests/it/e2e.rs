//! End to end, with the real binaries: the dispatcher (all roles) and
//! worker-wrapper processes running `sample-task`, against a test database.
//! Every scenario runs at least 200 tasks and ends with `assert_clean`:
//! every task succeeded exactly once, no stale write was accepted, no outbox
//! row was lost.

use std::time::Duration;

use dispatcher_tests::moto::Moto;
use dispatcher_tests::stack::{Stack, WorkerOpts};
use serde_json::json;

const TASKS: usize = 200;

/// Waits until at least `n` tasks are leased (30 s at most).
async fn wait_leased(stack: &Stack, n: i64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while counts(stack, "SELECT count(*) FROM tasks WHERE state = 'leased'").await < n {
        assert!(
            std::time::Instant::now() < deadline,
            "fewer than {n} tasks were ever leased at once"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
const FINISH: Duration = Duration::from_secs(180);

/// Sends SIGTERM to the worker alone and waits (at most `within`) for it
/// to exit; its status, and the worker (for its log).
async fn terminate(
    mut worker: dispatcher_tests::stack::Worker,
    within: Duration,
) -> (std::process::ExitStatus, dispatcher_tests::stack::Worker) {
    worker.signal(libc::SIGTERM);
    let exited = tokio::task::spawn_blocking(move || {
        let status = worker.child.wait().expect("wait");
        (status, worker)
    });
    tokio::time::timeout(within, exited)
        .await
        .unwrap_or_else(|_| panic!("the worker did not exit within {within:?} of SIGTERM"))
        .unwrap()
}

async fn counts(stack: &Stack, sql: &str) -> i64 {
    sqlx::query_scalar(sql)
        .fetch_one(&stack.db.pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_happy_path_wakeup_claim_event_publish_complete() {
    let stack = happy_path(Stack::new().await).await;
    // Buffer pointers went through the local queue; wake-ups were
    // notifications, not messages (`assert_clean` checks that none was
    // written), and the workers claimed ready work directly (ADR 0017).
    assert!(
        counts(
            &stack,
            "SELECT count(*) FROM outbox WHERE state = 'sent' AND topic = 'buffer'"
        )
        .await
            >= TASKS as i64,
        "buffer pointers went through the local queue"
    );
    assert_workers_took_work_from(&stack, "ready tasks claimed directly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_happy_path_on_the_local_profile_with_queued_wakeups() {
    let mut stack = Stack::new().await;
    stack
        .profile_env
        .push(("DISPATCHER_WAKEUPS".into(), "queue".into()));
    let stack = happy_path(stack).await;
    assert!(
        counts(&stack, "SELECT count(*) FROM outbox WHERE state = 'sent'").await
            >= 2 * TASKS as i64,
        "wake-ups and buffer pointers went through the local queue"
    );
    assert_workers_took_work_from(&stack, "dispatcher queue wakeups");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_happy_path_on_the_aws_profile() {
    let moto = Moto::start().await;
    let mut stack = Stack::new().await;
    stack.use_aws_profile(&moto).await;
    let stack = happy_path(stack).await;
    // The wake-ups and buffer pointers travelled through SQS, not Postgres.
    assert_eq!(
        counts(&stack, "SELECT count(*) FROM queue_messages").await,
        0
    );
    // And the workers received them from SQS themselves (`--profile aws`),
    // not through the dispatcher's HTTP queue.
    assert_workers_took_work_from(&stack, "SQS queue wakeups");
}

/// Both workers of `happy_path` logged `source` as where their work came from.
fn assert_workers_took_work_from(stack: &Stack, source: &str) {
    for w in ["w1", "w2"] {
        let log = std::fs::read_to_string(stack.dir.join(format!("{w}.log"))).expect("worker log");
        // (The worker logs JSON lines by default.)
        assert!(
            log.contains(&format!("\"source\":\"{source}\"")),
            "{w} did not take its work from {source}:\n{log}"
        );
    }
}

/// 200 tasks, each with one event and one buffer publish, on two workers.
async fn happy_path(mut stack: Stack) -> Stack {
    stack.submit(stack.flat_job(TASKS, json!({}))).await;
    stack.start_dispatcher("").await;
    let _w1 = stack.start_worker(&WorkerOpts::new("w1"));
    let _w2 = stack.start_worker(&WorkerOpts::new("w2"));
    stack.wait_all_finished(FINISH).await;
    stack.assert_clean(TASKS as i64).await;
    assert_eq!(
        counts(&stack, "SELECT count(*) FROM task_events").await,
        TASKS as i64,
        "one event per task"
    );
    assert_eq!(
        counts(&stack, "SELECT count(*) FROM buffer_publishes").await,
        TASKS as i64,
        "one publish per task"
    );
    assert_eq!(
        counts(
            &stack,
            "SELECT count(*) FROM outbox WHERE topic = 'buffer' AND state = 'sent'"
        )
        .await,
        TASKS as i64,
        "every publish handed to the buffer queue"
    );
    stack
}

/// Arms `failpoint`, lets it kill the dispatcher `crashes` times (restarting
/// it armed each time), then runs clean until every task is done.
async fn crash_and_recover(failpoint: &str, crashes: usize, submit_first: bool) {
    let mut stack = Stack::new().await;
    if submit_first {
        stack.submit(stack.flat_job(TASKS, json!({}))).await;
    }
    let mut workers = vec![];
    for crash in 0..crashes {
        stack.start_dispatcher(failpoint).await;
        if workers.is_empty() {
            workers.push(stack.start_worker(&WorkerOpts::new("w1")));
            workers.push(stack.start_worker(&WorkerOpts::new("w2")));
        }
        if !submit_first && crash == 0 {
            stack.submit(stack.flat_job(TASKS, json!({}))).await;
        }
        assert!(
            stack.wait_dispatcher_exit(Duration::from_secs(60)).await,
            "failpoint {failpoint} did not fire (crash {crash}); logs in {}",
            stack.dir.display()
        );
    }
    stack.start_dispatcher("").await;
    stack.wait_all_finished(FINISH).await;
    stack.assert_clean(TASKS as i64).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_dispatcher_sigkilled_after_claim_commits_before_answering() {
    crash_and_recover("claim_after_commit", 3, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_dispatcher_sigkilled_after_completion_commits_before_answering() {
    crash_and_recover("complete_after_commit", 3, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_dispatcher_sigkilled_in_relay_between_publish_and_mark_sent() {
    // All wake-ups are pending when the relay first runs: its first batch is
    // published, then the process dies before marking it sent.
    crash_and_recover("relay_after_publish", 2, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_stopped_worker_past_its_lease_is_fenced_when_resumed() {
    let mut stack = Stack::new().await;
    stack
        .submit(stack.flat_job(TASKS, json!({"sleep_ms": 1500})))
        .await;
    stack.start_dispatcher("").await;
    let stale = stack.start_worker(&WorkerOpts {
        concurrency: 40,
        ..WorkerOpts::new("stale")
    });
    // Wait until the soon-to-be-stale worker holds leases.
    wait_leased(&stack, 20).await;
    stale.signal_group(libc::SIGSTOP);
    let held: Vec<uuid::Uuid> = sqlx::query_scalar(
        "SELECT t.id FROM tasks t JOIN attempts a ON a.task_id = t.id AND a.attempt = t.attempt
          WHERE t.state = 'leased' AND a.worker_id = 'stale'",
    )
    .fetch_all(&stack.db.pool)
    .await
    .unwrap();
    assert!(!held.is_empty());

    // Its leases expire, the reaper re-offers the tasks, a fresh worker
    // claims them as new attempts and finishes everything.
    let fresh = stack.start_worker(&WorkerOpts {
        concurrency: 40,
        ..WorkerOpts::new("fresh")
    });
    stack.wait_all_finished(FINISH).await;

    // Resume the stale worker and its tasks: their heartbeats, events,
    // publishes and completions must all be refused.
    stale.signal_group(libc::SIGCONT);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let log = stale.log_text();
        let refused = log.matches("abandoned").count() + log.matches("completion refused").count();
        if refused >= held.len() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the resumed worker reported {refused} refusals for {} stale leases:\n{log}",
            held.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(fresh);
    stack.assert_clean(TASKS as i64).await;
    let by_first_attempt: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM attempts WHERE task_id = ANY($1) AND attempt = 1 AND completion IS NOT NULL",
    )
    .bind(&held)
    .fetch_one(&stack.db.pool)
    .await
    .unwrap();
    assert_eq!(
        by_first_attempt, 0,
        "a stale attempt's completion was committed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invariant_6_queue_is_a_hint_every_wakeup_delivered_twice_and_out_of_order() {
    let mut stack = Stack::new().await;
    // Wake-up messages (the aws profile's way; the local default has none).
    stack
        .profile_env
        .push(("DISPATCHER_WAKEUPS".into(), "queue".into()));
    // 100 chains a -> b: the b tasks get wake-ups long before they are ready.
    let bundle = stack.sample_bundle();
    let tasks: Vec<_> = (0..TASKS / 2)
        .flat_map(|i| {
            [
                json!({"key": format!("a{i}"), "runtime": "exec", "bundle": bundle, "outputs": ["sample_events"]}),
                json!({"key": format!("b{i}"), "runtime": "exec", "bundle": bundle, "outputs": ["sample_events"],
                       "depends_on": [format!("a{i}")]}),
            ]
        })
        .collect();
    let (_, ids) = stack
        .submit(json!({"name": "chains", "tasks": tasks}))
        .await;
    // Two extra deliveries of every task's wake-up, newest task first.
    for round in 0..2 {
        for id in ids.iter().rev() {
            sqlx::query("INSERT INTO queue_messages (queue, body) VALUES ('wakeups', $1)")
                .bind(json!({"task_id": id}))
                .execute(&stack.db.pool)
                .await
                .unwrap_or_else(|e| panic!("inject round {round}: {e}"));
        }
    }
    stack.start_dispatcher("").await;
    let _w1 = stack.start_worker(&WorkerOpts::new("w1"));
    let _w2 = stack.start_worker(&WorkerOpts::new("w2"));
    stack.wait_all_finished(FINISH).await;
    stack.assert_clean(TASKS as i64).await;
    // Every duplicate was consumed and dropped, none is left to linger.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let left = counts(
            &stack,
            "SELECT count(*) FROM queue_messages WHERE queue = 'wakeups'",
        )
        .await;
        if left == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{left} wake-ups never consumed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Invariant 10: a dead worker's task is offered again (and claimed) within
/// lease duration + reaper period + relay lag. Prints the figure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invariant_10_bounded_recovery_after_a_worker_dies() {
    const LEASE: f64 = 2.0;
    const REAPER: f64 = 1.0;
    let n = 20;
    let mut stack = Stack::new().await;
    let (_, ids) = stack
        .submit(stack.flat_job(n, json!({"sleep_ms": 3000})))
        .await;
    stack.start_dispatcher("").await;
    let doomed = stack.start_worker(&WorkerOpts {
        concurrency: n,
        ..WorkerOpts::new("doomed")
    });
    wait_leased(&stack, n as i64).await;
    // Let a heartbeat or two pass, then kill the worker and its tasks.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    doomed.signal_group(libc::SIGKILL);
    let killed_at: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT now()")
        .fetch_one(&stack.db.pool)
        .await
        .unwrap();
    drop(doomed);
    let _survivor = stack.start_worker(&WorkerOpts {
        concurrency: n,
        ..WorkerOpts::new("survivor")
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut delays: Vec<f64> = loop {
        let d: Vec<f64> = sqlx::query_scalar(
            "SELECT extract(epoch FROM claimed_at - $2)::float8 FROM attempts WHERE task_id = ANY($1) AND attempt = 2",
        )
        .bind(&ids)
        .bind(killed_at)
        .fetch_all(&stack.db.pool)
        .await
        .unwrap();
        if d.len() == n {
            break d;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "only {} of {n} tasks were claimed again",
            d.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    delays.sort_by(f64::total_cmp);
    let median = delays[n / 2];
    let max = delays[n - 1];
    println!(
        "recovery after worker death ({n} tasks, lease {LEASE} s, reaper period {REAPER} s): median {median:.2} s, max {max:.2} s"
    );
    assert!(
        max <= LEASE + REAPER + 1.0,
        "recovery took {max:.2} s, over lease + reaper period + 1 s"
    );
    stack.wait_all_finished(FINISH).await;
    stack.assert_clean(n as i64).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_sigterm_drains_running_tasks_then_the_worker_exits() {
    let mut stack = Stack::new().await;
    let n = 4;
    stack
        .submit(stack.flat_job(n, json!({"sleep_ms": 1500})))
        .await;
    stack.start_dispatcher("").await;
    let worker = stack.start_worker(&WorkerOpts {
        concurrency: n,
        ..WorkerOpts::new("draining")
    });
    wait_leased(&stack, n as i64).await;
    // SIGTERM to the wrapper alone: it stops receiving and lets its tasks finish.
    let (status, worker) = terminate(worker, Duration::from_secs(30)).await;
    assert!(
        status.success(),
        "worker exit status {status}:\n{}",
        worker.log_text()
    );
    assert_eq!(
        counts(
            &stack,
            "SELECT count(*) FROM tasks WHERE state = 'succeeded'"
        )
        .await,
        n as i64,
        "the running tasks finished before the worker exited"
    );
    assert!(worker.log_text().contains("draining"));
    stack.assert_clean(n as i64).await;
}

/// Issue 30: a worker whose drain bound passes with tasks still running
/// stops them and hands them back; another worker claims them within a
/// second of the hand-back, not a lease later, and the first exits 75.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_a_drained_worker_hands_its_running_tasks_back_and_another_claims_them_at_once() {
    const LEASE: u32 = 30;
    let mut stack = Stack::new().await;
    let n = 3;
    // Long on the first attempt only, so the second worker's run ends.
    let (_, ids) = stack
        .submit(stack.flat_job(n, json!({"sleep_ms": 60000, "sleep_attempts": 1})))
        .await;
    stack
        .profile_env
        .push(("WORKER_DRAIN_SECONDS".into(), "1".into()));
    stack.start_dispatcher("").await;
    let first = stack.start_worker(&WorkerOpts {
        concurrency: n,
        lease_seconds: LEASE,
        ..WorkerOpts::new("leaving")
    });
    wait_leased(&stack, n as i64).await;
    // Another worker, idle: nothing is ready until the first hands back.
    let second = stack.start_worker(&WorkerOpts {
        concurrency: n,
        lease_seconds: LEASE,
        ..WorkerOpts::new("arriving")
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    // It must exit within its drain (1 s) and hand-back (5 s) bounds.
    let (status, first) = terminate(first, Duration::from_secs(15)).await;
    assert_eq!(status.code(), Some(75), "{}", first.log_text());
    stack.wait_all_finished(Duration::from_secs(30)).await;
    // Each task: attempt 1 ended `released` by the first worker, attempt 2
    // claimed by the second within a second of that, and succeeded; the
    // released attempt was given back (max_attempts 10 + 1).
    let rows: Vec<(String, String, String, f64, i32)> = sqlx::query_as(
        "SELECT t.state, a1.outcome, a2.worker_id,
                extract(epoch FROM a2.claimed_at - a1.finished_at)::float8, t.max_attempts
           FROM tasks t
           JOIN attempts a1 ON a1.task_id = t.id AND a1.attempt = 1
           JOIN attempts a2 ON a2.task_id = t.id AND a2.attempt = 2
          WHERE t.id = ANY($1)",
    )
    .bind(&ids)
    .fetch_all(&stack.db.pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), n, "{}\n{}", first.log_text(), second.log_text());
    for (state, outcome, worker, gap, max_attempts) in rows {
        assert_eq!(
            (
                state.as_str(),
                outcome.as_str(),
                worker.as_str(),
                max_attempts
            ),
            ("succeeded", "released", "arriving", 11)
        );
        assert!(
            gap < 1.0,
            "claimed {gap:.3} s after the hand-back, not within a second (the lease is {LEASE} s)"
        );
    }
    assert!(first.log_text().contains("handed back"));
}

/// A cancelled running task ends `cancelled` within a heartbeat interval,
/// not a lease: the heartbeat answers `cancel_requested`, the wrapper kills
/// the task's process group and completes the attempt as `cancelled`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rule_a_cancelled_running_task_ends_cancelled_within_a_heartbeat_interval() {
    const LEASE: u32 = 9; // heartbeat every 3 s
    let mut stack = Stack::new().await;
    let (job_id, ids) = stack
        .submit(stack.flat_job(1, json!({"sleep_ms": 60000})))
        .await;
    stack.start_dispatcher("").await;
    let worker = stack.start_worker(&WorkerOpts {
        lease_seconds: LEASE,
        ..WorkerOpts::new("w")
    });
    wait_leased(&stack, 1).await;
    let store = dispatcher::store::Store::new(stack.db.pool.clone(), Default::default());
    store
        .cancel_job(stack.org_id, job_id, dispatcher::store::TaskPage::FIRST)
        .await
        .unwrap();
    let cancelled_at = std::time::Instant::now();
    let deadline = cancelled_at + Duration::from_secs(30);
    loop {
        let state: String = sqlx::query_scalar("SELECT state FROM tasks WHERE id = $1")
            .bind(ids[0])
            .fetch_one(&stack.db.pool)
            .await
            .unwrap();
        if state == "cancelled" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "task still {state}:\n{}",
            worker.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = cancelled_at.elapsed();
    assert!(
        took < Duration::from_secs(u64::from(LEASE / 3) + 2),
        "the cancel took {took:?}, more than a heartbeat interval"
    );
    let outcome: Option<String> =
        sqlx::query_scalar("SELECT outcome FROM attempts WHERE task_id = $1 AND attempt = 1")
            .bind(ids[0])
            .fetch_one(&stack.db.pool)
            .await
            .unwrap();
    assert_eq!(outcome.as_deref(), Some("cancelled"), "the attempt history");
    // The task's process is gone (it would have slept for a minute).
    let marks = format!("DISPATCHER_TASK_ID={}", ids[0]);
    let running = std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
        std::fs::read(e.path().join("environ"))
            .map(|env| env.split(|b| *b == 0).any(|kv| kv == marks.as_bytes()))
            .unwrap_or(false)
    });
    assert!(!running, "the cancelled task's process still runs");
}

/// Scale-out: two `dispatcher serve` replicas (every role in each: relay,
/// reaper and sink are `SKIP LOCKED` or fenced) on one Postgres, a worker
/// on each. One replica is SIGKILLed mid-run; its worker can no longer
/// complete, its leases run out, and the surviving replica's reaper and
/// worker finish everything: every task committed exactly once, no stale
/// write accepted, every outbox row published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_two_replicas_one_sigkilled_mid_run_every_task_committed_once() {
    let mut stack = Stack::new().await;
    stack
        .submit(stack.flat_job(TASKS, json!({"sleep_ms": 100})))
        .await;
    stack.start_dispatcher("").await;
    let mut doomed = stack.start_replica("b", None).await;
    let _w1 = stack.start_worker(&WorkerOpts::new("w1"));
    let _w2 = stack.start_worker(&WorkerOpts {
        dispatcher_url: Some(doomed.url.clone()),
        ..WorkerOpts::new("w2")
    });
    // Both replicas serve: each worker has committed work through its own.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let by_worker: Vec<(String, i64)> = sqlx::query_as(
            "SELECT worker_id, count(*) FROM attempts WHERE outcome = 'succeeded' GROUP BY worker_id",
        )
        .fetch_all(&stack.db.pool)
        .await
        .unwrap();
        if by_worker.len() == 2 && by_worker.iter().all(|(_, n)| *n >= 10) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "both workers should commit through their replica: {by_worker:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let left = counts(
        &stack,
        "SELECT count(*) FROM tasks WHERE state <> 'succeeded'",
    )
    .await;
    assert!(left > 0, "the kill should come mid-run");
    doomed.kill();
    stack.wait_all_finished(FINISH).await;
    stack.assert_clean(TASKS as i64).await;
}

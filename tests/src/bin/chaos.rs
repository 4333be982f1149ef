//! The chaos run (`scripts/chaos`): real tasks (the sample task: an event
//! and a buffer publish each) on two `dispatcher serve` replicas and four
//! worker wrappers, while a driver SIGKILLs workers, SIGSTOPs workers past
//! their leases (then resumes them), and SIGKILLs a dispatcher replica
//! (then restarts it on its port). Jobs of 50 are submitted as the run
//! goes, while fewer than 32 tasks wait. At the end it prints double commits,
//! lost tasks, stale writes accepted, and the takeover time of every
//! attempt a victim held: from the blow to the next attempt's claim.
//!
//! Usage: `chaos [--tasks N] [--blows B]` (defaults 10 000 tasks; 30 blows,
//! one every 1.5 s).

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use dispatcher_tests::stack::{Replica, Stack, Worker, WorkerOpts};
use serde_json::json;
use uuid::Uuid;

const LEASE: u32 = 2;
const WORKERS: usize = 4;

/// A worker slot: which replica it talks to and the worker now in it.
struct Slot {
    on_replica: bool,
    worker: Worker,
    id: String,
    stopped_until: Option<Instant>,
}

/// The attempts `worker_ids` held when the blow came.
async fn held(stack: &Stack, worker_ids: &[String]) -> Vec<(Uuid, i32)> {
    sqlx::query_as(
        "SELECT a.task_id, a.attempt FROM attempts a JOIN tasks t
            ON t.id = a.task_id AND t.attempt = a.attempt AND t.state = 'leased'
          WHERE a.worker_id = ANY($1) AND a.finished_at IS NULL",
    )
    .bind(worker_ids)
    .fetch_all(&stack.db.pool)
    .await
    .expect("held attempts")
}

async fn now(stack: &Stack) -> DateTime<Utc> {
    sqlx::query_scalar("SELECT clock_timestamp()")
        .fetch_one(&stack.db.pool)
        .await
        .expect("now")
}

fn start(stack: &Stack, n: usize, generation: usize, url: String) -> (Worker, String) {
    let id = format!("w{n}-{generation}");
    let worker = stack.start_worker(&WorkerOpts {
        concurrency: 16,
        lease_seconds: LEASE,
        dispatcher_url: Some(url),
        ..WorkerOpts::new(&id)
    });
    (worker, id)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let (mut tasks, mut blows) = (10_000, 30);
    dispatcher_tests::numeric_flags(
        "chaos [--tasks N] [--blows B]",
        &mut [("tasks", &mut tasks), ("blows", &mut blows)],
    );
    let mut stack = Stack::new().await;
    stack.start_dispatcher("").await;
    // Jobs of 50 are submitted while fewer than 32 tasks wait (half the
    // workers' slots): takeover then measures recovery, not a backlog.
    let submitter = {
        let store = dispatcher::store::Store::new(stack.db.pool.clone(), Default::default());
        let (org, pool) = (stack.org_id, stack.db.pool.clone());
        let spec: dispatcher_wire::SubmitJobRequest =
            serde_json::from_value(stack.flat_job(50, json!({"sleep_ms": 20}))).expect("job");
        tokio::spawn(async move {
            let settings = dispatcher::settings::Settings::default();
            let mut submitted = 0;
            while submitted < tasks {
                let waiting: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM tasks WHERE state IN ('ready', 'blocked')",
                )
                .fetch_one(&pool)
                .await
                .expect("waiting");
                if waiting >= 32 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
                let mut spec = spec.clone();
                spec.tasks.truncate(tasks - submitted);
                let n = spec.tasks.len();
                let job = dispatcher::domain::new_job(spec, &settings).expect("valid job");
                store.submit_job(org, None, &job).await.expect("submit");
                submitted += n;
            }
        })
    };
    let mut replica: Replica = stack.start_replica("b-0", None).await;
    let replica_port = replica.port;
    let mut slots: Vec<Slot> = (0..WORKERS)
        .map(|n| {
            let on_replica = n % 2 == 1;
            let url = if on_replica {
                replica.url.clone()
            } else {
                stack.url()
            };
            let (worker, id) = start(&stack, n, 0, url);
            Slot {
                on_replica,
                worker,
                id,
                stopped_until: None,
            }
        })
        .collect();

    let started = Instant::now();
    let mut victims: Vec<(Uuid, i32, DateTime<Utc>, &'static str)> = Vec::new();
    let mut counts = [0usize; 3];
    let mut generation = 1;
    for blow in 0..blows {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        for slot in slots.iter_mut() {
            if slot.stopped_until.is_some_and(|t| Instant::now() >= t) {
                slot.worker.signal_group(libc::SIGCONT);
                slot.stopped_until = None;
            }
        }
        let open: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks WHERE state <> 'succeeded'")
            .fetch_one(&stack.db.pool)
            .await
            .expect("count");
        if open < 200 && submitter.is_finished() {
            println!("stopping the blows after {blow}: the run is nearly done");
            break;
        }
        let n = rand::random::<usize>() % WORKERS;
        match blow % 3 {
            0 => {
                // SIGKILL a worker and its tasks; a new worker takes the slot.
                let id = slots[n].id.clone();
                let at = now(&stack).await;
                let held = held(&stack, std::slice::from_ref(&id)).await;
                slots[n].worker.signal_group(libc::SIGKILL);
                victims.extend(held.into_iter().map(|(t, a)| (t, a, at, "worker SIGKILL")));
                let url = if slots[n].on_replica {
                    replica.url.clone()
                } else {
                    stack.url()
                };
                let (worker, id) = start(&stack, n, generation, url);
                generation += 1;
                slots[n] = Slot {
                    on_replica: slots[n].on_replica,
                    worker,
                    id,
                    stopped_until: None,
                };
                counts[0] += 1;
            }
            1 if slots[n].stopped_until.is_none() => {
                // SIGSTOP a worker past its leases; it resumes later and
                // every write of its old attempts must be refused.
                let at = now(&stack).await;
                let held = held(&stack, std::slice::from_ref(&slots[n].id)).await;
                slots[n].worker.signal_group(libc::SIGSTOP);
                slots[n].stopped_until =
                    Some(Instant::now() + Duration::from_secs(u64::from(LEASE) + 2));
                victims.extend(held.into_iter().map(|(t, a)| (t, a, at, "worker SIGSTOP")));
                counts[1] += 1;
            }
            _ => {
                // SIGKILL the replica; its workers' leases run out (their
                // calls fail) until it is back on the same port.
                let ids: Vec<String> = slots
                    .iter()
                    .filter(|s| s.on_replica)
                    .map(|s| s.id.clone())
                    .collect();
                let at = now(&stack).await;
                let held = held(&stack, &ids).await;
                replica.kill();
                victims.extend(held.into_iter().map(|(t, a)| (t, a, at, "replica SIGKILL")));
                tokio::time::sleep(Duration::from_millis(u64::from(LEASE) * 1000 + 500)).await;
                replica = stack
                    .start_replica(&format!("b-{blow}"), Some(replica_port))
                    .await;
                counts[2] += 1;
            }
        }
    }
    for slot in slots.iter_mut() {
        if slot.stopped_until.take().is_some() {
            slot.worker.signal_group(libc::SIGCONT);
        }
    }
    submitter.await.expect("submitter");
    stack.wait_all_finished(Duration::from_secs(600)).await;
    let elapsed = started.elapsed();

    let pool = &stack.db.pool;
    let double: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT task_id FROM attempts WHERE response->>'state' = 'succeeded'
                                GROUP BY task_id HAVING count(*) > 1) x",
    )
    .fetch_one(pool)
    .await
    .expect("double commits");
    let lost: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks WHERE state <> 'succeeded'")
        .fetch_one(pool)
        .await
        .expect("lost");
    let stale = stack.stale_writes_accepted().await;
    // Takeover: from the blow to the end of the held attempt's lease
    // (the reaper's expiry: the task is offered again) and to the claim of
    // the next attempt (none when the victim's completion got in first).
    // A retry after a second or later failure waits its backoff on top,
    // so the first attempts are also given apart.
    let (mut takeovers, mut firsts, mut reoffers, mut finished_by_victim) =
        (Vec::new(), Vec::new(), Vec::new(), 0);
    for (task, attempt, at, _) in &victims {
        let (expired, next): (Option<DateTime<Utc>>, Option<DateTime<Utc>>) = sqlx::query_as(
            "SELECT (SELECT finished_at FROM attempts
                      WHERE task_id = $1 AND attempt = $2 AND outcome = 'lease_expired'),
                    (SELECT claimed_at FROM attempts WHERE task_id = $1 AND attempt = $2 + 1)",
        )
        .bind(task)
        .bind(attempt)
        .fetch_one(pool)
        .await
        .expect("next attempt");
        let secs = |t: DateTime<Utc>| (t - *at).num_milliseconds() as f64 / 1000.0;
        if let Some(e) = expired {
            reoffers.push(secs(e));
        }
        match next {
            Some(claimed) => {
                takeovers.push(secs(claimed));
                if *attempt == 1 {
                    firsts.push(secs(claimed));
                }
            }
            None => finished_by_victim += 1,
        }
    }
    reoffers.sort_by(f64::total_cmp);
    firsts.sort_by(f64::total_cmp);
    takeovers.sort_by(f64::total_cmp);
    println!(
        "chaos: {tasks} sample tasks (an event and a buffer publish each), 2 dispatcher replicas, \
         {WORKERS} workers (16 slots, lease {LEASE} s), {:.1} s",
        elapsed.as_secs_f64()
    );
    println!(
        "  blows: {} worker SIGKILLs, {} worker SIGSTOPs past the lease, {} replica SIGKILLs",
        counts[0], counts[1], counts[2]
    );
    println!("  double commits: {double}");
    println!("  lost tasks: {lost}");
    println!("  stale writes accepted: {stale}");
    let line = |what: &str, v: &[f64]| {
        println!(
            "  {what} ({} attempts, s): p50 {:.2}, p90 {:.2}, p99 {:.2}, max {:.2}",
            v.len(),
            percentile(v, 0.5),
            percentile(v, 0.9),
            percentile(v, 0.99),
            percentile(v, 1.0),
        )
    };
    println!(
        "  takeover, from the blow (bound: lease + 2 s = {} s; {finished_by_victim} held attempts \
         were completed by their holder first):",
        LEASE + 2
    );
    line("  to the lease's expiry (offered again)", &reoffers);
    line("  to the next claim, first attempts (no backoff)", &firsts);
    line(
        "  to the next claim, all (retries back off: 2 s x 2^(n-1) - lease)",
        &takeovers,
    );
    stack.assert_clean(tasks as i64).await;
    println!("  checked: every task succeeded exactly once; every outbox row published");
}

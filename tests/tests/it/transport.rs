//! No task is lost to a transport-level answer (issue 23, review H2, H5):
//! a real worker-wrapper talks to a real dispatcher through a proxy that
//! fails batch and single calls (503 before the dispatcher saw them, 502
//! after it committed them), with outputs large enough that a window's
//! completions are over the body limit together; and a worker whose
//! credential expires mid-task reads its file again and keeps working.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::IntoResponse;
use chrono::Utc;
use dispatcher_tests::stack::{Stack, WorkerOpts};
use serde_json::json;

#[derive(Default)]
struct Seen {
    /// (path, request bytes, entries, dispatcher's status or None when the
    /// proxy answered itself, what the worker got)
    calls: Vec<(String, usize, usize, Option<u16>, u16)>,
    /// (path, when the call reached the proxy), every call.
    arrived: Vec<(String, std::time::Instant)>,
}

/// Which calls a proxy fails: given the path and how many calls to it came
/// before and this one (from 1), whether to answer 503 without forwarding,
/// and whether to forward and then replace the answer by 502.
type Rule = Arc<dyn Fn(&str, usize) -> (bool, bool) + Send + Sync>;

/// The first complete-batch fails with 503 unforwarded, the second is
/// forwarded and its answer replaced by 502; every third heartbeat-batch
/// 503; the first two single completes 503 unforwarded and the third
/// forwarded then 502.
fn chaos(path: &str, n: usize) -> (bool, bool) {
    match path {
        "/v1/task/complete-batch" => (n == 1, n == 2),
        "/v1/task/heartbeat-batch" => (n % 3 == 0, false),
        "/v1/task/complete" => (n <= 2, n == 3),
        _ => (false, false),
    }
}

/// Forwards to `upstream`, failing the calls `rule` says.
async fn chaos_proxy(upstream: String, rule: Rule) -> (String, Arc<Mutex<Seen>>) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let counts: Arc<Mutex<std::collections::HashMap<String, usize>>> = Default::default();
    let http = reqwest::Client::new();
    let (seen2, counts2) = (seen.clone(), counts.clone());
    let app = axum::Router::new().fallback(
        move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
            let (seen, counts, http, upstream, rule) = (
                seen2.clone(),
                counts2.clone(),
                http.clone(),
                upstream.clone(),
                rule.clone(),
            );
            async move {
                let path = uri.path().to_owned();
                seen.lock()
                    .unwrap()
                    .arrived
                    .push((path.clone(), std::time::Instant::now()));
                let n = {
                    let mut c = counts.lock().unwrap();
                    let n = c.entry(path.clone()).or_default();
                    *n += 1;
                    *n
                };
                let entries = serde_json::from_slice::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v["entries"].as_array().map(|a| a.len()))
                    .unwrap_or(1);
                // (fail before forwarding, replace the answer after it)
                let (before, after) = rule(&path, n);
                if before {
                    seen.lock()
                        .unwrap()
                        .calls
                        .push((path, body.len(), entries, None, 503));
                    return (StatusCode::SERVICE_UNAVAILABLE, "injected").into_response();
                }
                let mut req = http.request(
                    method,
                    format!(
                        "{upstream}{}",
                        uri.path_and_query().map_or("", |p| p.as_str())
                    ),
                );
                for k in ["authorization", "content-type"] {
                    if let Some(v) = headers.get(k) {
                        req = req.header(k, v.clone());
                    }
                }
                let resp = match req.body(body.clone()).send().await {
                    Ok(r) => r,
                    Err(_) => return StatusCode::BAD_GATEWAY.into_response(),
                };
                let status = resp.status().as_u16();
                let ctype = resp.headers().get("content-type").cloned();
                let bytes = resp.bytes().await.unwrap_or_default();
                let answered = if after { 502 } else { status };
                seen.lock().unwrap().calls.push((
                    path,
                    body.len(),
                    entries,
                    Some(status),
                    answered,
                ));
                if after {
                    return (StatusCode::BAD_GATEWAY, "injected after commit").into_response();
                }
                let mut out = (StatusCode::from_u16(status).unwrap(), bytes).into_response();
                if let Some(c) = ctype {
                    out.headers_mut().insert("content-type", c);
                }
                out
            }
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (url, seen)
}

/// A script that waits until the epoch second `at` of its inputs, then
/// prints a JSON output of `kb` KiB (any uid may run it).
fn big_output_bundle(stack: &Stack) -> String {
    let path = stack.dir.join("big-output.py");
    std::fs::write(
        &path,
        "#!/usr/bin/env python3\nimport json, sys, time\n\
         i = json.load(sys.stdin)\n\
         time.sleep(max(0.0, i['at'] - time.time()))\n\
         print(json.dumps({'blob': 'a' * (i['kb'] * 1024)}))\n",
    )
    .unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    path.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rule_no_task_is_failed_by_a_transport_answer_batches_over_the_body_limit_and_injected_5xx_end_with_every_task_completed_once(
) {
    let mut stack = Stack::new().await;
    // A wide window: the tasks finishing together share calls.
    stack
        .profile_env
        .push(("WORKER_BATCH_WINDOW_MS".into(), "300".into()));
    stack.start_dispatcher("").await;
    let (proxy, seen) = chaos_proxy(stack.url(), Arc::new(chaos)).await;
    let n = 16;
    let at = Utc::now().timestamp() + 6;
    let bundle = big_output_bundle(&stack);
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            json!({"key": format!("t{i}"), "runtime": "exec", "bundle": bundle,
                   "inputs": {"at": at, "kb": 100}, "max_attempts": 1})
        })
        .collect();
    let (_, ids) = stack.submit(json!({"name": "big", "tasks": tasks})).await;
    let worker = stack.start_worker(&WorkerOpts {
        concurrency: n,
        lease_seconds: 10,
        dispatcher_url: Some(proxy),
        ..WorkerOpts::new("chaos")
    });
    stack.wait_all_finished(Duration::from_secs(90)).await;
    // Each task succeeded with its whole output, on its one attempt
    // (max_attempts 1: a failure by transport would have been final).
    let rows: Vec<(String, i64, i32)> = sqlx::query_as(
        "SELECT t.state, length(a.completion->'output'->>'blob')::bigint, t.attempt
           FROM tasks t JOIN attempts a ON a.task_id = t.id WHERE t.id = ANY($1)",
    )
    .bind(&ids)
    .fetch_all(&stack.db.pool)
    .await
    .unwrap();
    assert_eq!(
        rows.len(),
        n,
        "one attempt each: {rows:?}\n{}",
        worker.log_text()
    );
    for (state, blob, attempt) in &rows {
        assert_eq!(state, "succeeded", "{}", worker.log_text());
        assert_eq!(*blob, 100 * 1024);
        assert_eq!(*attempt, 1);
    }
    stack.assert_clean(n as i64).await;
    let seen = seen.lock().unwrap();
    let batches: Vec<_> = seen
        .calls
        .iter()
        .filter(|c| c.0 == "/v1/task/complete-batch")
        .collect();
    // Every completion went to the batcher first: together they were
    // over 1 MiB, yet no call was.
    let total: usize = batches.iter().map(|c| c.1).sum();
    assert!(total > 1 << 20, "{total} bytes of completions in batches");
    assert!(
        batches.iter().all(|c| c.1 < 1 << 20 && c.3 != Some(413)),
        "a batch over the body limit: {batches:?}"
    );
    assert!(
        batches.iter().any(|c| c.2 > 1),
        "batches of several: {batches:?}"
    );
    // The injected failures happened, and were resent alone.
    assert!(seen
        .calls
        .iter()
        .any(|c| c.0 == "/v1/task/complete-batch" && c.4 == 502 && c.3 == Some(200)));
    assert!(
        seen.calls
            .iter()
            .filter(|c| c.0 == "/v1/task/complete")
            .count()
            >= 3
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rule_a_worker_credential_expiring_during_long_tasks_is_read_again_from_its_file() {
    let mut stack = Stack::new().await;
    stack.start_dispatcher("").await;
    let bundle = big_output_bundle(&stack);
    let at = Utc::now().timestamp() + 8;
    let tasks: Vec<_> = (0..4)
        .map(|i| {
            json!({"key": format!("t{i}"), "runtime": "exec", "bundle": bundle,
                   "inputs": {"at": at, "kb": 1}, "max_attempts": 1})
        })
        .collect();
    stack.submit(json!({"name": "long", "tasks": tasks})).await;
    // A credential that expires in 3 s, while the tasks run for 8.
    let short = stack
        .keys
        .mint_worker("rotating", Utc::now() + chrono::Duration::seconds(3));
    let worker = stack.start_worker(&WorkerOpts {
        credential: Some(short),
        lease_seconds: 10,
        ..WorkerOpts::new("rotating")
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    // The operator rotates it: a new credential in the same file.
    let file = stack.credential_file("rotating");
    let fresh = stack
        .keys
        .mint_worker("rotating", Utc::now() + chrono::Duration::hours(1));
    let tmp = file.with_extension("new");
    std::fs::write(&tmp, &fresh).unwrap();
    std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    std::fs::rename(&tmp, &file).unwrap();
    stack.wait_all_finished(Duration::from_secs(60)).await;
    stack.assert_clean(4).await;
    // Past the old credential's expiry, the worker still claims new work.
    tokio::time::sleep(Duration::from_secs(3)).await;
    stack.submit(stack.flat_job(2, json!({}))).await;
    stack.wait_all_finished(Duration::from_secs(60)).await;
    stack.assert_clean(6).await;
    let log = worker.log_text();
    assert!(log.contains("worker credential reloaded"), "{log}");
    assert!(!log.contains("refused the worker credential"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rule_a_completion_that_takes_longer_than_the_lease_keeps_it_alive_until_it_lands() {
    let mut stack = Stack::new().await;
    stack.start_dispatcher("").await;
    // Every completion is refused with 503 for 5 s after the first one
    // arrives: the worker's retries outlast its 2 s lease several times.
    let first: Arc<std::sync::OnceLock<std::time::Instant>> = Default::default();
    let rule: Rule = Arc::new(move |path: &str, _n: usize| {
        if !path.starts_with("/v1/task/complete") {
            return (false, false);
        }
        let since = first.get_or_init(std::time::Instant::now).elapsed();
        (since < Duration::from_secs(5), false)
    });
    let (proxy, seen) = chaos_proxy(stack.url(), rule).await;
    let (_, ids) = stack
        .submit(json!({"name": "slow-completion", "tasks": [
            {"key": "t", "runtime": "exec", "bundle": "/bin/true", "max_attempts": 1}]}))
        .await;
    let worker = stack.start_worker(&WorkerOpts {
        dispatcher_url: Some(proxy),
        ..WorkerOpts::new("slow-completion")
    });
    stack.wait_all_finished(Duration::from_secs(60)).await;
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT t.state, a.outcome FROM tasks t JOIN attempts a ON a.task_id = t.id
          WHERE t.id = ANY($1)",
    )
    .bind(&ids)
    .fetch_all(&stack.db.pool)
    .await
    .unwrap();
    assert_eq!(
        rows,
        vec![("succeeded".to_owned(), "succeeded".to_owned())],
        "{}",
        worker.log_text()
    );
    // Heartbeats went on between the first refused completion and the
    // one that landed.
    let seen = seen.lock().unwrap();
    let completes: Vec<usize> = (0..seen.calls.len())
        .filter(|&i| seen.calls[i].0.starts_with("/v1/task/complete"))
        .collect();
    let (from, to) = (completes[0], *completes.last().unwrap());
    assert_eq!(seen.calls[to].4, 200, "{:?}", seen.calls);
    let beats = seen.calls[from..to]
        .iter()
        .filter(|c| c.0.starts_with("/v1/task/heartbeat") && c.4 == 200)
        .count();
    assert!(beats >= 2, "heartbeats while completing: {:?}", seen.calls);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rule_heartbeats_keep_one_schedule_from_the_claim_through_running_and_completing() {
    let mut stack = Stack::new().await;
    stack.start_dispatcher("").await;
    // The task ends 1.9 s after its claim, 0.9 s after its first heartbeat
    // (lease 2 s, interval 1 s); its completions are refused for 3 s. A
    // heartbeat loop that started again with the completion would leave
    // 1.9 s between two renewals of a 2 s lease.
    let first: Arc<std::sync::OnceLock<std::time::Instant>> = Default::default();
    let rule: Rule = Arc::new(move |path: &str, _n: usize| {
        if !path.starts_with("/v1/task/complete") {
            return (false, false);
        }
        let since = first.get_or_init(std::time::Instant::now).elapsed();
        (since < Duration::from_secs(3), false)
    });
    let (proxy, seen) = chaos_proxy(stack.url(), rule).await;
    stack
        .submit(json!({"name": "one-schedule", "tasks": [
            {"key": "t", "runtime": "exec", "bundle": "/bin/sleep 1.9", "max_attempts": 1}]}))
        .await;
    let worker = stack.start_worker(&WorkerOpts {
        dispatcher_url: Some(proxy),
        ..WorkerOpts::new("one-schedule")
    });
    stack.wait_all_finished(Duration::from_secs(60)).await;
    let outcome: String = sqlx::query_scalar("SELECT outcome FROM attempts")
        .fetch_one(&stack.db.pool)
        .await
        .unwrap();
    assert_eq!(outcome, "succeeded", "{}", worker.log_text());
    let seen = seen.lock().unwrap();
    // The renewals of the lease: the claim that took it, then every
    // heartbeat until the completion that landed.
    let claimed = seen
        .arrived
        .iter()
        .position(|(p, _)| p.starts_with("/internal/task-claim"))
        .expect("a claim");
    let landed = seen
        .arrived
        .iter()
        .rposition(|(p, _)| p.starts_with("/v1/task/complete"))
        .unwrap();
    // (Later claims are the worker's other slots asking for more.)
    let renewals: Vec<std::time::Instant> = std::iter::once(seen.arrived[claimed].1)
        .chain(
            seen.arrived[claimed..landed]
                .iter()
                .filter(|(p, _)| p.starts_with("/v1/task/heartbeat"))
                .map(|(_, at)| *at),
        )
        .collect();
    assert!(renewals.len() >= 4, "{:?}", seen.arrived);
    let widest = renewals.windows(2).map(|w| w[1] - w[0]).max().unwrap();
    assert!(
        widest < Duration::from_millis(1_500),
        "{widest:?} between two renewals of a 2 s lease (interval 1 s): {:?}",
        seen.arrived
    );
}

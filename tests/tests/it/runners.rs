//! UDF runners with the real worker wrapper, per language: bundles pushed
//! with `dispatcher bundle push`, run behind the wrapper's Runtime API
//! host. Success, warm reuse, handler exception, timeout, crash, init
//! failure, oversized response, the environment allowlist, and a task that
//! outlives its first capability token. The same suite runs on both
//! paths: the worker's own runners, and the Lambda path (ADR 0026), where
//! the worker invokes each bundle's function through `aws-sdk-lambda`
//! against `worker-wrapper invoke-server`. (Protocol misuse with raw HTTP is
//! in `worker-wrapper/src/runtime_api.rs`.)

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use dispatcher_tests::invoke::InvokeServer;
use dispatcher_tests::stack::{Stack, Worker, WorkerOpts};
use serde_json::{json, Value};
use uuid::Uuid;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/bundles")
        .join(name)
}

/// One attempt as the store recorded it.
#[derive(Debug)]
struct Attempt {
    outcome: String,
    completion: Value,
}

impl Attempt {
    fn output(&self) -> &Value {
        &self.completion["output"]
    }
    fn error(&self) -> String {
        self.completion["error"]["message"]
            .as_str()
            .unwrap_or("")
            .to_owned()
    }
    fn retryable(&self) -> bool {
        self.completion["error"]["retryable"]
            .as_bool()
            .unwrap_or(false)
    }
}

/// Where a bundle task runs.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Via {
    /// On the worker's own runner, behind its runtime host.
    Local,
    /// As the bundle's Lambda function, invoked by the worker.
    Lambda,
}

struct Lab {
    stack: Stack,
    worker: Worker,
    runtime: &'static str,
    digest: String,
    /// The Invoke API, on the Lambda path.
    invoke: Option<InvokeServer>,
}

impl Lab {
    async fn new(runtime: &'static str, bundle: &Path, path: Via) -> Lab {
        let mut stack = Stack::new().await;
        // A token outlives its lease by 1 s here (60 s by default), so a
        // task of a few seconds outlives its first token.
        stack
            .profile_env
            .push(("DISPATCHER_TOKEN_GRACE_SECONDS".into(), "1".into()));
        stack.start_dispatcher("").await;
        let mut opts = WorkerOpts::new(&format!("runner-{runtime}"));
        opts.concurrency = 1;
        let invoke = (path == Via::Lambda).then(InvokeServer::start);
        if let Some(server) = &invoke {
            opts.env = vec![
                ("WORKER_LAMBDA_FUNCTION".into(), "udf-{org}-{bundle}".into()),
                ("WORKER_LAMBDA_ENDPOINT_URL".into(), server.url.clone()),
                ("AWS_ACCESS_KEY_ID".into(), "invoke-test".into()),
                ("AWS_SECRET_ACCESS_KEY".into(), "invoke-test".into()),
            ];
        }
        let worker = stack.start_worker(&opts);
        let mut lab = Lab {
            stack,
            worker,
            runtime,
            digest: String::new(),
            invoke,
        };
        lab.digest = lab.push(bundle, Some(&format!("{runtime}-probe")));
        lab
    }

    /// Pushes a bundle (and, on the Lambda path, deploys it as its org's
    /// function, with a 30 s timeout); its digest.
    fn push(&self, bundle: &Path, tag: Option<&str>) -> String {
        let digest = self.stack.push_bundle(bundle, tag);
        if let Some(server) = &self.invoke {
            server.deploy(
                &self.function(&digest),
                bundle,
                json!({"timeout_seconds": 30}),
            );
        }
        digest
    }

    fn function(&self, digest: &str) -> String {
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        format!("udf-{}-{}", self.stack.org_id.simple(), &hex[..12])
    }

    /// How many times an environment of the bundle was started (its init).
    fn cold_starts(&self, digest: &str) -> usize {
        match &self.invoke {
            None => self
                .worker
                .log_text()
                .lines()
                .filter(|l| l.contains("runner starting (cold)") && l.contains(digest))
                .count(),
            Some(server) => server
                .log_text()
                .lines()
                .filter(|l| l.contains("cold start") && l.contains(&self.function(digest)))
                .count(),
        }
    }

    /// Submits a one-task job and waits for it to end; its attempts.
    async fn run(&self, bundle: &str, inputs: Value, extra: Value) -> Vec<Attempt> {
        let mut task = json!({"key": "t", "runtime": self.runtime, "bundle": bundle,
                              "inputs": inputs, "max_attempts": 1});
        for (k, v) in extra.as_object().cloned().unwrap_or_default() {
            task[k] = v;
        }
        let (job, ids) = self
            .stack
            .submit(json!({"name": "runner", "tasks": [task]}))
            .await;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let state: String = sqlx::query_scalar("SELECT state FROM jobs WHERE id = $1")
                .bind(job)
                .fetch_one(&self.stack.db.pool)
                .await
                .unwrap();
            if state != "running" {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "job {job} still running after 60 s; worker log:\n{}",
                self.worker.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.attempts(ids[0]).await
    }

    async fn attempts(&self, task: Uuid) -> Vec<Attempt> {
        let rows: Vec<(Option<String>, Option<Value>)> = sqlx::query_as(
            "SELECT outcome, completion FROM attempts WHERE task_id = $1 ORDER BY attempt",
        )
        .bind(task)
        .fetch_all(&self.stack.db.pool)
        .await
        .unwrap();
        rows.into_iter()
            .map(|(outcome, completion)| Attempt {
                outcome: outcome.unwrap_or_default(),
                completion: completion.unwrap_or(Value::Null),
            })
            .collect()
    }

    /// The log of attempt `n` of the newest job's task, as the API serves it.
    async fn log_of_newest(&self, n: u32) -> Value {
        let job: Uuid = sqlx::query_scalar("SELECT id FROM jobs ORDER BY created_at DESC LIMIT 1")
            .fetch_one(&self.stack.db.pool)
            .await
            .unwrap();
        let resp = reqwest::Client::new()
            .get(format!(
                "{}/v1/jobs/{job}/tasks/t/attempts/{n}/logs",
                self.stack.url()
            ))
            .bearer_auth(self.stack.user_token())
            .send()
            .await
            .unwrap();
        let status = resp.status();
        let body: Value = resp.json().await.unwrap();
        assert_eq!(status, 200, "{body}\n{}", self.worker.log_text());
        body
    }

    async fn ok(&self, inputs: Value) -> Value {
        let attempts = self.run(&self.digest, inputs, json!({})).await;
        let last = attempts.last().expect("an attempt");
        assert_eq!(
            last.outcome,
            "succeeded",
            "{attempts:?}\n{}",
            self.worker.log_text()
        );
        last.output().clone()
    }
}

fn alive(pid: i64) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid as i32, 0) == 0 }
}

/// The variables a runner gets, and nothing else (ADR 0013).
fn allowlist(runtime: &str) -> BTreeSet<String> {
    let mut keys: BTreeSet<String> = [
        "AWS_LAMBDA_RUNTIME_API",
        "_HANDLER",
        "LAMBDA_TASK_ROOT",
        "LAMBDA_RUNTIME_DIR",
        "AWS_LAMBDA_FUNCTION_NAME",
        "AWS_LAMBDA_FUNCTION_VERSION",
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
        "AWS_LAMBDA_LOG_GROUP_NAME",
        "AWS_LAMBDA_LOG_STREAM_NAME",
        "AWS_LAMBDA_INITIALIZATION_TYPE",
        "AWS_REGION",
        "TZ",
        "LANG",
        "PATH",
        "HOME",
        "TMPDIR",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    if runtime == "python" {
        keys.insert("PYTHONUNBUFFERED".into());
        keys.insert("PYTHONDONTWRITEBYTECODE".into());
    }
    keys
}

async fn scenarios(
    runtime: &'static str,
    bundle: &Path,
    exception: &str,
    init_error: &str,
    path: Via,
) {
    let lab = Lab::new(runtime, bundle, path).await;

    // Success, then warm reuse: the same process, its module state kept.
    let first = lab.ok(json!({})).await;
    assert_eq!(first["calls"], 1, "{first}");
    let pid = first["pid"].as_i64().unwrap();
    assert!(first["remaining_ms"].as_i64().unwrap() > 25_000, "{first}");
    let second = lab.ok(json!({})).await;
    assert_eq!(
        (second["pid"].as_i64(), second["calls"].as_i64()),
        (Some(pid), Some(2))
    );
    // By tag too (resolved at submission).
    let attempts = lab
        .run(&format!("{runtime}-probe"), json!({}), json!({}))
        .await;
    assert_eq!(attempts[0].outcome, "succeeded");
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM task_events WHERE kind = 'log'")
        .fetch_one(&lab.stack.db.pool)
        .await
        .unwrap();
    assert_eq!(events, 3, "each call emitted one event through the client");

    // What a warm runner prints during an invocation is that attempt's log
    // (stdout and stderr), with the token it printed redacted; the next
    // invocation's log holds only its own lines.
    for _ in 0..2 {
        let calls = lab.ok(json!({"do": "print"})).await["calls"]
            .as_i64()
            .unwrap();
        let log = lab.log_of_newest(1).await;
        let text = log["log"].as_str().unwrap();
        assert!(
            text.contains(&format!("probe stdout call {calls}\n")),
            "{text}"
        );
        assert!(text.contains("probe stderr token=[REDACTED]\n"), "{text}");
        assert!(!text.contains("eyJ"), "a token survived: {text}");
        assert_eq!(text.matches("probe stdout").count(), 1, "{text}");
        assert_eq!(log["dropped_bytes"], 0);
    }

    // A handler exception: classified from the error body; the process
    // survives (the next task runs warm on it).
    let failed = lab
        .run(&lab.digest, json!({"do": "raise"}), json!({}))
        .await;
    assert_eq!(failed[0].outcome, "failed");
    assert!(
        failed[0].error().starts_with(exception),
        "{}",
        failed[0].error()
    );
    assert!(failed[0].retryable());
    let after = lab.ok(json!({})).await;
    assert_eq!(
        (after["pid"].as_i64(), after["calls"].as_i64()),
        (Some(pid), Some(7))
    );

    // Timeout: the group is killed, the attempt fails retryably, and the
    // retry starts a fresh runner.
    let timed = lab
        .run(
            &lab.digest,
            json!({"do": "sleep_first", "seconds": 60}),
            json!({"timeout_seconds": 2, "max_attempts": 2}),
        )
        .await;
    assert_eq!(timed.len(), 2, "{timed:?}");
    assert_eq!(timed[0].outcome, "failed");
    assert_eq!(
        timed[0].error(),
        "Sandbox.Timedout: Task timed out after 2.00 seconds"
    );
    assert!(timed[0].retryable());
    assert_eq!(timed[1].outcome, "succeeded");
    let fresh = timed[1].output();
    assert_ne!(fresh["pid"].as_i64(), Some(pid));
    assert_eq!(fresh["calls"], 1, "a new runner re-initialised");
    if path == Via::Local {
        assert!(!alive(pid), "the timed-out runner's process is gone");
    } else {
        // Nothing stops a Lambda function before its own timeout (30 s
        // here): it runs on, its calls fenced, and ends then.
        assert!(alive(pid), "the timed-out function runs on");
    }
    let pid = fresh["pid"].as_i64().unwrap();

    // A crash mid-invocation: Runtime.ExitError, then a restart.
    let crashed = lab
        .run(
            &lab.digest,
            json!({"do": "exit_first"}),
            json!({"max_attempts": 2}),
        )
        .await;
    assert_eq!(crashed.len(), 2, "{crashed:?}");
    assert!(
        crashed[0]
            .error()
            .contains("Runtime.ExitError: RequestId: ")
            && crashed[0]
                .error()
                .contains("Error: Runtime exited with error: exit status: 3"),
        "{}",
        crashed[0].error()
    );
    assert_eq!(crashed[1].outcome, "succeeded");
    assert_ne!(crashed[1].output()["pid"].as_i64(), Some(pid));
    assert_eq!(crashed[1].output()["calls"], 1);

    // A response over 6,291,556 bytes (the JSON string adds two quotes).
    let big = lab
        .run(
            &lab.digest,
            json!({"do": "big", "n": 6_291_556 - 1}),
            json!({"max_attempts": 3}),
        )
        .await;
    assert_eq!(big.len(), 1, "not retried: {big:?}");
    assert!(
        big[0].error().starts_with("Function.ResponseSizeTooLarge"),
        "{}",
        big[0].error()
    );
    assert!(!big[0].retryable());
    // Exactly at the limit, the host takes it; the dispatcher stores
    // outputs of up to its body limit (1 MiB), so the task fails saying so
    // (large results go to datasets), and the runner stays warm.
    let at_limit = lab
        .run(
            &lab.digest,
            json!({"do": "big", "n": 6_291_556 - 2}),
            json!({}),
        )
        .await;
    assert!(
        at_limit[0]
            .error()
            .starts_with("the task's output was refused: request body is larger than"),
        "{at_limit:?}"
    );
    assert!(!at_limit[0].retryable());
    let warm = lab.ok(json!({})).await;
    assert_ne!(warm["calls"], 1, "the runner survived both: {warm}");

    // The environment the runner started with (`/proc/self/environ`) is
    // exactly the allowlist, with no secret in it.
    let env = lab.ok(json!({"do": "env"})).await;
    let keys: BTreeSet<String> = env.as_object().unwrap().keys().cloned().collect();
    let added: BTreeSet<String> = keys.difference(&allowlist(runtime)).cloned().collect();
    assert!(
        added.is_empty(),
        "variables beyond the allowlist: {added:?}"
    );
    assert_eq!(keys, allowlist(runtime));
    let text = env.to_string();
    let credential =
        std::fs::read_to_string(lab.stack.credential_file(&format!("runner-{runtime}"))).unwrap();
    assert!(!credential.trim().is_empty());
    assert!(
        !text.contains(credential.trim()),
        "the worker credential leaked"
    );
    assert!(!text.contains("WORKER_CREDENTIAL") && !text.contains("DATABASE_URL"));

    // A task that outlives its first token (lease 2 s + grace 1 s + leeway 5 s): the
    // client refreshes it from the host and its call is accepted.
    let long = lab.ok(json!({"do": "long", "seconds": 10})).await;
    assert!(long["calls"].as_i64().unwrap() >= 1, "{long}");

    // Init failure: reported once, the task fails without a retry, and no
    // runner is started again for it (no hot loop).
    let broken = std::env::temp_dir().join(format!("broken-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::write(
        broken.join("bundle.json"),
        format!(r#"{{"runtime": "{runtime}", "handler": "missing.handler"}}"#),
    )
    .unwrap();
    let broken_digest = lab.push(&broken, None);
    let init = lab
        .run(&broken_digest, json!({}), json!({"max_attempts": 3}))
        .await;
    assert_eq!(init.len(), 1, "{init:?}");
    assert!(
        init[0].error().starts_with(init_error),
        "{}",
        init[0].error()
    );
    assert!(!init[0].retryable());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        lab.cold_starts(&broken_digest),
        1,
        "one init for the broken bundle"
    );
    if path == Via::Lambda {
        // Every task ran as its function; the worker started no runner.
        assert!(
            !lab.worker.log_text().contains("runner starting"),
            "{}",
            lab.worker.log_text()
        );
        let events = lab.invoke.as_ref().unwrap().events().len();
        assert!(events >= 15, "{events} invocations");
    }
    let _ = std::fs::remove_dir_all(&broken);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_runner_success_warm_exception_timeout_crash_init_size_env_and_token_refresh() {
    scenarios(
        "python",
        &fixture("python-probe"),
        "ValueError: boom from python",
        "Runtime.ImportModuleError",
        Via::Local,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lambda_path_python_runner_success_warm_exception_timeout_crash_init_size_env_and_token_refresh(
) {
    scenarios(
        "python",
        &fixture("python-probe"),
        "ValueError: boom from python",
        "Runtime.ImportModuleError",
        Via::Lambda,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_runner_success_warm_exception_timeout_crash_init_size_env_and_token_refresh() {
    scenarios(
        "node",
        &fixture("node-probe"),
        "TypeError: boom from node",
        "Runtime.ImportModuleError",
        Via::Local,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lambda_path_node_runner_success_warm_exception_timeout_crash_init_size_env_and_token_refresh(
) {
    scenarios(
        "node",
        &fixture("node-probe"),
        "TypeError: boom from node",
        "Runtime.ImportModuleError",
        Via::Lambda,
    )
    .await;
}

/// The Rust probe (`tests/fixtures/bundles/rust-probe`, built with the
/// workspace) as a bundle: its binary as `bootstrap`.
fn rust_bundle() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("rust-probe-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(
        dispatcher_tests::stack::binary("udf-rust-probe"),
        dir.join("bootstrap"),
    )
    .expect("the rust probe is built (cargo build --workspace --bins)");
    std::fs::write(
        dir.join("bundle.json"),
        r#"{"runtime": "rust", "handler": "bootstrap", "timeout_seconds": 30}"#,
    )
    .unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_runner_success_warm_exception_timeout_crash_init_size_env_and_token_refresh() {
    let bundle = rust_bundle();
    scenarios(
        "rust",
        &bundle,
        "ProbeError: boom from rust",
        "Runtime.InvalidEntrypoint",
        Via::Local,
    )
    .await;
    let _ = std::fs::remove_dir_all(bundle);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lambda_path_rust_runner_success_warm_exception_timeout_crash_init_size_env_and_token_refresh(
) {
    let bundle = rust_bundle();
    scenarios(
        "rust",
        &bundle,
        "ProbeError: boom from rust",
        "Runtime.InvalidEntrypoint",
        Via::Lambda,
    )
    .await;
    let _ = std::fs::remove_dir_all(bundle);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_a_task_past_timeout_seconds_is_killed_and_retried_and_a_job_past_deadline_seconds_ends_cancelled(
) {
    let mut stack = Stack::new().await;
    stack.start_dispatcher("").await;
    let worker = stack.start_worker(&WorkerOpts::new("deadlines"));
    let pool = stack.db.pool.clone();
    let wait_job = |job: Uuid, secs: u64| {
        let pool = pool.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(secs);
            loop {
                let state: String = sqlx::query_scalar("SELECT state FROM jobs WHERE id = $1")
                    .bind(job)
                    .fetch_one(&pool)
                    .await
                    .unwrap();
                if state != "running" || Instant::now() > deadline {
                    return state;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };

    // An exec task that sleeps past its 1 s timeout, twice.
    let started = Instant::now();
    let (job, ids) = stack
        .submit(json!({"name": "timeouts", "tasks": [
            {"key": "slow", "runtime": "exec", "bundle": "/bin/sleep 30",
             "timeout_seconds": 1, "max_attempts": 2}]}))
        .await;
    assert_eq!(wait_job(job, 30).await, "failed", "{}", worker.log_text());
    assert!(started.elapsed() < Duration::from_secs(20));
    let errors: Vec<(String, Value)> = sqlx::query_as(
        "SELECT outcome, completion FROM attempts WHERE task_id = $1 ORDER BY attempt",
    )
    .bind(ids[0])
    .fetch_all(&stack.db.pool)
    .await
    .unwrap();
    assert_eq!(errors.len(), 2, "killed, then retried: {errors:?}");
    for (outcome, completion) in &errors {
        assert_eq!(outcome, "failed");
        assert_eq!(
            completion["error"]["message"],
            "Sandbox.Timedout: Task timed out after 1.00 seconds"
        );
        assert_eq!(completion["error"]["retryable"], true);
    }

    // A job whose 2 s deadline passes while its task runs (its own
    // timeout is far off): the job ends cancelled and the task is stopped.
    let (job, ids) = stack
        .submit(json!({"name": "deadline", "deadline_seconds": 2, "tasks": [
            {"key": "slow", "runtime": "exec", "bundle": "/bin/sleep 60", "timeout_seconds": 600},
            {"key": "after", "runtime": "exec", "bundle": "/bin/true", "depends_on": ["slow"]}]}))
        .await;
    let started = Instant::now();
    assert_eq!(wait_job(job, 30).await, "cancelled");
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(1500), "{took:?}");
    // The worker stops the running attempt at its next heartbeat.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let outcome: Option<String> =
            sqlx::query_scalar("SELECT outcome FROM attempts WHERE task_id = $1 AND attempt = 1")
                .bind(ids[0])
                .fetch_one(&stack.db.pool)
                .await
                .unwrap();
        if outcome.as_deref() == Some("cancelled") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "attempt not stopped: {outcome:?}\n{}",
            worker.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let states: Vec<String> = sqlx::query_scalar(
        "SELECT t.state FROM tasks t JOIN task_specs s ON s.task_id = t.id
          WHERE t.job_id = $1 ORDER BY s.ord",
    )
    .bind(job)
    .fetch_all(&stack.db.pool)
    .await
    .unwrap();
    // Leased, it was asked to stop (ADR 0004); now both are cancelled.
    assert_eq!(states, ["cancelled", "cancelled"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mixed_language_example_runs_end_to_end_from_its_readme_command() {
    let db = dispatcher_tests::TestDb::new().await;
    let state = std::env::temp_dir().join(format!("example-{}", Uuid::new_v4().simple()));
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = tokio::process::Command::new(root.join("scripts/example"))
        .arg("--state-dir")
        .arg(&state)
        .env("DATABASE_URL", db.url())
        .env("DISPATCHER_BIND", "127.0.0.1:0")
        .kill_on_drop(true)
        .output()
        .await
        .expect("running scripts/example");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("succeeded in") && stdout.contains("output of report"),
        "{stdout}"
    );
    // Each step committed its dataset; the report read the stats.
    let versions: Vec<(String, i32, i64)> = sqlx::query_as(
        "SELECT d.name, v.version, v.rows FROM dataset_versions v JOIN datasets d ON d.id = v.dataset_id
          ORDER BY d.name",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        versions,
        [
            ("readings".to_owned(), 1, 100),
            ("sensor_stats".to_owned(), 1, 5)
        ]
    );
    let output = |key: &'static str| {
        sqlx::query_scalar::<_, Value>(
            "SELECT a.completion -> 'output' FROM attempts a JOIN task_specs s ON s.task_id = a.task_id
              WHERE s.key = $1 AND a.outcome = 'succeeded'",
        )
        .bind(key)
        .fetch_one(&db.pool)
    };
    let report = output("report").await.unwrap();
    assert_eq!(
        report["lines"].as_array().map(Vec::len),
        Some(5),
        "{report}"
    );
    let runtimes: Vec<String> = sqlx::query_scalar("SELECT runtime FROM task_specs ORDER BY ord")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(runtimes, ["python", "rust", "node", "python"]);
    // The alert evaluation published its alerts to the stream, and the
    // sink ingested them before the command ended.
    assert!(
        stdout.contains("stream alert_events: 1 batch(es) ingested"),
        "{stdout}"
    );
    let alerts = output("alerts").await.unwrap();
    assert_eq!(alerts["alerts"], 4, "{alerts}");
    let _ = std::fs::remove_dir_all(&state);
}

/// Review M2: a bundle task cancelled while it runs leaves nothing running
/// under its uid, not even a daemon that left the runner's process group
/// (two forks and `setsid`): dropping the attempt sweeps the uid at once,
/// not when the uid's next holder takes it (hours later on a big range).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invariant_11_a_cancelled_bundle_task_leaves_no_process_running_under_its_uid() {
    assert_eq!(
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() },
        0,
        "this test needs root: tasks run under uids of their own only then"
    );
    let lab = Lab::new("python", &fixture("python-probe"), Via::Local).await;
    let mark = format!("PROBE_MARK=m2-{}", Uuid::new_v4().simple());
    let (job, _) = lab
        .stack
        .submit(json!({"name": "daemon", "deadline_seconds": 4, "tasks": [
            {"key": "t", "runtime": "python", "bundle": lab.digest, "max_attempts": 1,
             "timeout_seconds": 600,
             "inputs": {"do": "daemon", "mark": mark.trim_start_matches("PROBE_MARK="),
                        "seconds": 120}}]}))
        .await;
    // The daemon starts while the task runs...
    let marks = [mark.clone()];
    let deadline = Instant::now() + Duration::from_secs(30);
    let daemon = loop {
        if let Some((pid, _)) = crate::isolation::find_process(&marks) {
            break pid;
        }
        assert!(
            Instant::now() < deadline,
            "the daemon never started:\n{}",
            lab.worker.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let status = std::fs::read_to_string(format!("/proc/{daemon}/status")).unwrap_or_default();
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_default()
        .to_owned();
    assert!(
        !uid.is_empty() && uid != "0",
        "the task ran as root: {status}"
    );
    // ...and is gone soon after the job's deadline cancels the task.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let state: String = sqlx::query_scalar("SELECT state FROM jobs WHERE id = $1")
            .bind(job)
            .fetch_one(&lab.stack.db.pool)
            .await
            .unwrap();
        let outcome: Option<String> = sqlx::query_scalar(
            "SELECT a.outcome FROM attempts a JOIN tasks t ON t.id = a.task_id
              WHERE t.job_id = $1",
        )
        .bind(job)
        .fetch_one(&lab.stack.db.pool)
        .await
        .unwrap();
        let running = crate::isolation::find_process(&marks).is_some();
        if state == "cancelled" && outcome.as_deref() == Some("cancelled") && !running {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "job {state}, attempt {outcome:?}, daemon (uid {uid}) still running: {running}\n{}",
            lab.worker.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Review M12: a member's `exec` task names a host program. A worker with
/// `--exec off` never claims one; with an allow-list it runs only the
/// programs named, and fails any other at once, without retrying it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_tasks_run_only_programs_the_worker_allows() {
    let mut stack = Stack::new().await;
    stack.start_dispatcher("").await;
    // Two jobs: a failed task fails its job and cancels the job's other
    // tasks, so one job would race the allowed task against that cancel.
    let (_, allowed) = stack
        .submit(json!({"name": "exec-allowed", "tasks": [
            {"key": "allowed", "runtime": "exec", "bundle": "/bin/true", "max_attempts": 3}]}))
        .await;
    let (_, other) = stack
        .submit(json!({"name": "exec-other", "tasks": [
            {"key": "other", "runtime": "exec", "bundle": "/bin/echo hi", "max_attempts": 3}]}))
        .await;
    let ids = [allowed[0], other[0]];
    let off = stack.start_worker(&WorkerOpts {
        exec: Some("off".into()),
        ..WorkerOpts::new("exec-off")
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    let claimed: i64 = sqlx::query_scalar("SELECT count(*) FROM attempts")
        .fetch_one(&stack.db.pool)
        .await
        .unwrap();
    assert_eq!(
        claimed,
        0,
        "an --exec off worker claimed: {}",
        off.log_text()
    );

    let listed = stack.start_worker(&WorkerOpts {
        exec: Some("/bin/true".into()),
        ..WorkerOpts::new("exec-listed")
    });
    stack.wait_all_finished(Duration::from_secs(30)).await;
    let rows: Vec<(Uuid, String, i32, Option<Value>)> = sqlx::query_as(
        "SELECT t.id, t.state, t.attempt, a.completion FROM tasks t
           JOIN attempts a ON a.task_id = t.id AND a.attempt = t.attempt",
    )
    .fetch_all(&stack.db.pool)
    .await
    .unwrap();
    let of = |id: Uuid| rows.iter().find(|r| r.0 == id).expect("task row").clone();
    let (_, state, attempt, _) = of(ids[0]);
    assert_eq!(
        (state.as_str(), attempt),
        ("succeeded", 1),
        "{}",
        listed.log_text()
    );
    let (_, state, attempt, completion) = of(ids[1]);
    assert_eq!((state.as_str(), attempt), ("failed", 1), "not retried");
    let completion = completion.expect("completion");
    assert_eq!(completion["error"]["retryable"], false, "{completion}");
    assert!(
        completion["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not allowed on this worker"),
        "{completion}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exec_tasks_stderr_is_its_attempts_log_bounded_with_its_token_redacted() {
    let mut stack = Stack::new().await;
    stack
        .profile_env
        .push(("WORKER_LOG_MAX_BYTES".into(), "2048".into()));
    stack.start_dispatcher("").await;
    // A script any task uid can read: 500 lines on stderr, then the token.
    let dir = std::env::temp_dir().join(format!("exec-log-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let script = dir.join("noisy.sh");
    std::fs::write(
        &script,
        "echo '{\"ignored\": true}'\n\
         i=1; while [ $i -le 500 ]; do echo \"err line $i\" >&2; i=$((i+1)); done\n\
         echo \"token=$DISPATCHER_TASK_TOKEN\" >&2\nexit 3\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    for (path, mode) in [(&dir, 0o755), (&script, 0o644)] {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    let (job, ids) = stack
        .submit(
            json!({"name": "noisy", "tasks": [{"key": "t", "runtime": "exec",
            "bundle": format!("/bin/sh {}", script.display()), "max_attempts": 1}]}),
        )
        .await;
    let worker = stack.start_worker(&WorkerOpts::new("exec-log"));
    stack.wait_all_finished(Duration::from_secs(30)).await;
    let resp = reqwest::Client::new()
        .get(format!(
            "{}/v1/jobs/{job}/tasks/t/attempts/1/logs",
            stack.url()
        ))
        .bearer_auth(stack.user_token())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{}", worker.log_text());
    let log: Value = resp.json().await.unwrap();
    let text = log["log"].as_str().unwrap();
    assert!(text.len() <= 2048, "{} bytes", text.len());
    assert!(
        text.starts_with("err line 1\nerr line 2\n"),
        "the head: {text}"
    );
    assert!(
        text.ends_with("err line 500\ntoken=[REDACTED]\n"),
        "the tail: {text}"
    );
    let dropped = log["dropped_bytes"].as_u64().unwrap();
    assert!(dropped > 3000, "{log}");
    assert!(
        text.contains(&format!("[… {dropped} bytes dropped …]\n")),
        "{text}"
    );
    assert!(
        !text.contains("ignored"),
        "stdout is the output, not the log"
    );
    assert!(!text.contains("eyJ"), "{text}");
    // The failure message, the end of stderr, does not carry the token
    // either.
    let completion: Value =
        sqlx::query_scalar("SELECT completion FROM attempts WHERE task_id = $1")
            .bind(ids[0])
            .fetch_one(&stack.db.pool)
            .await
            .unwrap();
    let message = completion["error"]["message"].as_str().unwrap();
    assert!(message.contains("token=[REDACTED]"), "{message}");
    assert!(!message.contains("eyJ"), "{message}");
    let _ = std::fs::remove_dir_all(&dir);
}

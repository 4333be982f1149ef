//! Bundle tasks run as Lambda functions (ADR 0026): the real worker
//! invokes each task's function through `aws-sdk-lambda` against
//! `worker-wrapper invoke-server`, which serves the Invoke API and runs the
//! same runners as the local path behind the runtime host.

use std::path::{Path, PathBuf};
use std::time::Duration;

use dispatcher_tests::invoke::InvokeServer;
use dispatcher_tests::stack::{Stack, WorkerOpts};
use serde_json::{json, Value};
use uuid::Uuid;

fn probe() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/bundles/python-probe")
}

/// Its attempts: (outcome, completion).
async fn run(stack: &Stack, task: Value) -> (Uuid, Vec<(String, Value)>) {
    let (job, ids) = stack
        .submit(json!({"name": "lambda", "tasks": [task]}))
        .await;
    stack.job_ended(job, Duration::from_secs(60)).await;
    let rows: Vec<(Option<String>, Option<Value>)> = sqlx::query_as(
        "SELECT outcome, completion FROM attempts WHERE task_id = $1 ORDER BY attempt",
    )
    .bind(ids[0])
    .fetch_all(&stack.db.pool)
    .await
    .unwrap();
    let attempts = rows
        .into_iter()
        .map(|(o, c)| (o.unwrap_or_default(), c.unwrap_or(Value::Null)))
        .collect();
    (ids[0], attempts)
}

fn error(completion: &Value) -> &str {
    completion["error"]["message"].as_str().unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lambda_a_task_runs_through_the_invoke_path_output_dataset_errors_timeout_throttle_and_an_event_holding_only_its_token(
) {
    let mut stack = Stack::new().await;
    // A token outlives its lease by 1 s: a task of 10 s outlives its
    // first token, so the function must refresh it itself.
    stack
        .profile_env
        .push(("DISPATCHER_TOKEN_GRACE_SECONDS".into(), "1".into()));
    stack.start_dispatcher("").await;
    let store = dispatcher::store::Store::new(stack.db.pool.clone(), Default::default());
    let ds = dispatcher::domain::new_dataset(
        serde_json::from_value(json!({"name": "clicks", "mode": "append",
            "columns": [{"name": "a", "type": "int64", "nullable": false}]}))
        .unwrap(),
    )
    .unwrap();
    store
        .create_dataset(stack.org_id, stack.user_id, &ds)
        .await
        .unwrap();
    let digest = stack.push_bundle(&probe(), None);
    let server = InvokeServer::start();
    let org = stack.org_id.simple().to_string();
    let hex = digest.strip_prefix("sha256:").unwrap();
    let function = format!("udf-{org}-{}", &hex[..12]);
    // Reserved concurrency 1: a second call at once is throttled (429).
    server.deploy(
        &function,
        &probe(),
        json!({"timeout_seconds": 12, "reserved_concurrency": 1}),
    );
    let mut opts = WorkerOpts::new("lambda-worker");
    opts.concurrency = 2;
    opts.env = vec![
        ("WORKER_LAMBDA_FUNCTION".into(), "udf-{org}-{bundle}".into()),
        ("WORKER_LAMBDA_ENDPOINT_URL".into(), server.url.clone()),
        ("AWS_ACCESS_KEY_ID".into(), "invoke-test".into()),
        ("AWS_SECRET_ACCESS_KEY".into(), "invoke-test".into()),
    ];
    let worker = stack.start_worker(&opts);
    let task = |inputs: Value, extra: Value| {
        let mut t = json!({"key": "t", "runtime": "python", "bundle": digest,
                           "inputs": inputs, "max_attempts": 1});
        for (k, v) in extra.as_object().cloned().unwrap_or_default() {
            t[k] = v;
        }
        t
    };

    // Success: the output is the function's answer; it ran in the invoke
    // server's runner (the worker started none), and what it printed is
    // the attempt's log.
    let (_, ok) = run(&stack, task(json!({"do": "print"}), json!({}))).await;
    assert_eq!(ok[0].0, "succeeded", "{ok:?}\n{}", worker.log_text());
    assert_eq!(ok[0].1["output"]["calls"], 1);
    assert!(!worker.log_text().contains("runner starting"));
    assert!(server.log_text().contains("cold start"));
    let job: Uuid = sqlx::query_scalar("SELECT id FROM jobs ORDER BY created_at DESC LIMIT 1")
        .fetch_one(&stack.db.pool)
        .await
        .unwrap();
    let log: Value = reqwest::Client::new()
        .get(format!(
            "{}/v1/jobs/{job}/tasks/t/attempts/1/logs",
            stack.url()
        ))
        .bearer_auth(stack.user_token())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let text = log["log"].as_str().unwrap_or_default();
    assert!(text.contains("probe stdout call 1"), "{log}");
    assert!(!text.contains("eyJ"), "a token survived: {text}");

    // A dataset version staged by the function and committed with the
    // task's success; warm (the same environment's second call).
    let rows = json!([{"a": 1}, {"a": 2}]);
    let (_, staged) = run(
        &stack,
        task(
            json!({"do": "stage", "dataset": "clicks", "rows": rows}),
            json!({"outputs": ["clicks"]}),
        ),
    )
    .await;
    assert_eq!(staged[0].0, "succeeded", "{staged:?}");
    assert_eq!(staged[0].1["output"]["calls"], 2, "warm: {staged:?}");
    let versions: i64 = sqlx::query_scalar("SELECT count(*) FROM dataset_versions")
        .fetch_one(&stack.db.pool)
        .await
        .unwrap();
    assert_eq!(versions, 1, "one committed version");

    // A handler's exception: a function error, failed retryably.
    let (_, raised) = run(&stack, task(json!({"do": "raise"}), json!({}))).await;
    assert_eq!(raised[0].0, "failed");
    assert!(
        error(&raised[0].1).starts_with("ValueError: boom from python"),
        "{raised:?}"
    );
    assert_eq!(raised[0].1["error"]["retryable"], true);

    // The function's own timeout (12 s): Sandbox.Timedout, retryable; the
    // retry runs on a fresh environment.
    let (timed_id, timed) = run(
        &stack,
        task(
            json!({"do": "sleep_first", "seconds": 30}),
            json!({"max_attempts": 2}),
        ),
    )
    .await;
    let why: (String, i32, i32) =
        sqlx::query_as("SELECT state::text, attempt, max_attempts FROM tasks WHERE id = $1")
            .bind(timed_id)
            .fetch_one(&stack.db.pool)
            .await
            .unwrap();
    assert_eq!(timed.len(), 2, "{timed:?} {why:?}");
    assert!(
        error(&timed[0].1).starts_with("Sandbox.Timedout: RequestId: ")
            && error(&timed[0].1).ends_with("Task timed out after 12.00 seconds"),
        "{timed:?}"
    );
    assert_eq!(timed[0].1["error"]["retryable"], true);
    assert_eq!(timed[1].0, "succeeded");
    assert_eq!(timed[1].1["output"]["calls"], 1, "a fresh environment");

    // A task longer than its first token (lease 2 s + grace 1 s + leeway
    // 5 s): the function's client refreshes the token by heartbeat while
    // the worker heartbeats the lease.
    let (_, long) = run(
        &stack,
        task(json!({"do": "long", "seconds": 10}), json!({})),
    )
    .await;
    assert_eq!(long[0].0, "succeeded", "{long:?}\n{}", worker.log_text());

    // Throttled: two tasks at once against a reserved concurrency of 1.
    // The second is handed back with its attempt given back, and runs
    // after the first: both succeed on their first attempt.
    let (job, ids) = stack
        .submit(json!({"name": "throttle", "tasks": [
            task(json!({"do": "sleep_first", "seconds": 1}), json!({"key": "a"})),
            task(json!({"do": "sleep_first", "seconds": 1}), json!({"key": "b"})),
        ]}))
        .await;
    assert_eq!(
        stack.job_ended(job, Duration::from_secs(60)).await,
        "succeeded",
        "{}",
        worker.log_text()
    );
    let attempts: Vec<i32> = sqlx::query_scalar(
        "SELECT max(attempt) FROM attempts WHERE task_id = ANY($1) AND outcome = 'succeeded' GROUP BY task_id",
    )
    .bind(&ids)
    .fetch_all(&stack.db.pool)
    .await
    .unwrap();
    assert_eq!(attempts.len(), 2);
    assert!(
        worker
            .log_text()
            .contains("throttled; handing the task back"),
        "no throttle seen: {}",
        worker.log_text()
    );

    // Every event the function got holds the task and the attempt's
    // capability token, and no credential of the worker or the platform.
    let credential = std::fs::read_to_string(stack.credential_file("lambda-worker")).unwrap();
    let events = server.events();
    assert!(events.len() >= 8, "{} events", events.len());
    for e in &events {
        let mut keys: Vec<&str> = e.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["dispatcher", "inputs", "task"]);
        let mut d: Vec<&str> = e["dispatcher"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        d.sort_unstable();
        assert_eq!(d, ["refresh_seconds", "token", "url"]);
        let token = e["dispatcher"]["token"].as_str().unwrap();
        let payload = token.split('.').nth(1).unwrap();
        let claims: Value = serde_json::from_slice(
            &base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, payload)
                .unwrap(),
        )
        .unwrap();
        assert_eq!(claims["aud"], "dispatcher:task", "{claims}");
        assert_eq!(claims["sub"], e["task"]["task_id"], "{claims}");
        assert_eq!(claims["att"], e["task"]["attempt"], "{claims}");
        let text = e.to_string();
        assert!(
            !text.contains(credential.trim()),
            "the worker credential leaked"
        );
        assert!(!text.contains("invoke-test"), "an AWS credential leaked");
    }
}

/// Unpacks a zip with its files' modes (as Lambda does into /var/task).
fn unzip(zip: &Path, into: &Path) {
    let script = "import sys, zipfile, os\n\
                  z = zipfile.ZipFile(sys.argv[1])\n\
                  for i in z.infolist():\n\
                  \x20   p = z.extract(i, sys.argv[2])\n\
                  \x20   os.chmod(p, (i.external_attr >> 16) & 0o777)\n";
    let ok = std::process::Command::new("python3")
        .args(["-c", script])
        .arg(zip)
        .arg(into)
        .status()
        .unwrap()
        .success();
    assert!(ok, "unzipping {}", zip.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lambda_a_package_of_package_lambda_starts_its_own_runner_through_the_exec_wrapper() {
    let mut stack = Stack::new().await;
    stack.start_dispatcher("").await;
    let server = InvokeServer::start();
    let mut opts = WorkerOpts::new("lambda-packaged");
    opts.env = vec![
        ("WORKER_LAMBDA_FUNCTION".into(), "udf-{org}-{bundle}".into()),
        ("WORKER_LAMBDA_ENDPOINT_URL".into(), server.url.clone()),
        ("AWS_ACCESS_KEY_ID".into(), "invoke-test".into()),
        ("AWS_SECRET_ACCESS_KEY".into(), "invoke-test".into()),
    ];
    let worker = stack.start_worker(&opts);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let work = std::env::temp_dir().join(format!("packaged-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&work).unwrap();
    for (runtime, bootstrap) in [("python", "bootstrap.py"), ("node", "bootstrap.mjs")] {
        let bundle = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures/bundles")
            .join(format!("{runtime}-probe"));
        let zip = work.join(format!("{runtime}.zip"));
        let out = std::process::Command::new(root.join("scripts/package-lambda"))
            .arg(&bundle)
            .arg(&zip)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let unpacked = work.join(runtime);
        assert!(!unpacked.exists());
        unzip(&zip, &unpacked);
        let digest = stack.push_bundle(&bundle, None);
        let hex = digest.strip_prefix("sha256:").unwrap();
        server.deploy(
            &format!("udf-{}-{}", stack.org_id.simple(), &hex[..12]),
            &unpacked,
            json!({"timeout_seconds": 30}),
        );
        let (_, ok) = run(
            &stack,
            json!({"key": "t", "runtime": runtime, "bundle": digest, "inputs": {},
                   "max_attempts": 1}),
        )
        .await;
        assert_eq!(ok[0].0, "succeeded", "{ok:?}\n{}", worker.log_text());
        // The warm environment's process is the package's own runner, as
        // its wrapper started it.
        let pid = ok[0].1["output"]["pid"].as_i64().unwrap();
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        assert!(
            cmdline.contains(&format!("/.dispatcher/runner/{bootstrap}")),
            "{cmdline}"
        );
    }
    // A bundle without a manifest is refused with a clear message.
    let out = std::process::Command::new(root.join("scripts/package-lambda"))
        .arg(&work)
        .arg(work.join("none.zip"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no readable bundle.json"));
    let _ = std::fs::remove_dir_all(&work);
}

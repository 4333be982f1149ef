//! Untrusted code stays untrusted (invariant 11, ADR 0010), with the real
//! binaries run as CI runs them (root): a hostile task cannot read the
//! worker credential or another task's token and files, and sees only the
//! allowlisted environment. And a worker whose credential is refused stops
//! without deleting work it could not judge.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use chrono::Utc;
use dispatcher_tests::moto::Moto;
use dispatcher_tests::stack::{Stack, WorkerOpts};
use serde_json::{json, Value};
use uuid::Uuid;

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

/// The environment of the process whose environment holds all of `marks`
/// (read as root), and its pid.
pub(crate) fn find_process(marks: &[String]) -> Option<(u32, Vec<(String, String)>)> {
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(raw) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        let vars: Vec<(String, String)> = raw
            .split(|b| *b == 0)
            .filter_map(|kv| {
                let kv = String::from_utf8_lossy(kv);
                kv.split_once('=')
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
            })
            .collect();
        let has = |m: &String| vars.iter().any(|(k, v)| format!("{k}={v}") == *m);
        if marks.iter().all(has) {
            return Some((pid, vars));
        }
    }
    None
}

async fn task_output(stack: &Stack, task_id: Uuid, timeout: Duration) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let row: Option<(String, Option<Value>)> = sqlx::query_as(
            "SELECT t.state, a.completion FROM tasks t
               LEFT JOIN attempts a ON a.task_id = t.id AND a.attempt = t.attempt
              WHERE t.id = $1",
        )
        .bind(task_id)
        .fetch_optional(&stack.db.pool)
        .await
        .unwrap();
        if let Some((state, Some(completion))) = row {
            assert_eq!(state, "succeeded", "the probe failed: {completion}");
            return completion["output"].clone();
        }
        if Instant::now() > deadline {
            let logs: Vec<String> = std::fs::read_dir(&stack.dir)
                .unwrap()
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
                .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
                .collect();
            panic!("the probe did not finish ({row:?}):\n{}", logs.join("\n"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invariant_11_untrusted_code_cannot_reach_the_worker_credential_or_another_task() {
    assert_eq!(
        euid(),
        0,
        "this test proves the isolation a root worker gives; run it as root (CI does)"
    );
    let mut stack = Stack::new().await;
    let targets = stack.dir.join("targets.json");
    let (job_id, ids) = stack
        .submit(json!({"name": "hostile", "tasks": [
            {"key": "peer", "runtime": "exec", "bundle": "/bin/sleep 60"},
            {"key": "probe", "runtime": "exec", "bundle": stack.probe_bundle(),
             "inputs": {"targets": targets.display().to_string()}}
        ]}))
        .await;
    stack.start_dispatcher("").await;
    let worker = stack.start_worker(&WorkerOpts {
        concurrency: 2,
        lease_seconds: 30,
        ..WorkerOpts::new("isolating")
    });
    let credential = std::fs::read_to_string(stack.credential_file("isolating")).unwrap();

    // Find the running peer task (as root) and tell the probe where it is.
    let deadline = Instant::now() + Duration::from_secs(30);
    let marks = [
        format!("DISPATCHER_JOB_ID={job_id}"),
        "DISPATCHER_TASK_KEY=peer".to_owned(),
    ];
    let (peer_pid, peer_env) = loop {
        if let Some(found) = find_process(&marks) {
            break found;
        }
        assert!(
            Instant::now() < deadline,
            "the peer task never ran:\n{}",
            worker.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let peer_var = |k: &str| {
        peer_env
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("peer has no {k}"))
    };
    let peer_token_file = peer_var("DISPATCHER_TASK_TOKEN_FILE");
    let peer_token = std::fs::read_to_string(&peer_token_file).expect("root reads the peer token");
    let tmp = targets.with_extension("tmp");
    std::fs::write(
        &tmp,
        json!({
            "credential_file": stack.credential_file("isolating"),
            "peer_pid": peer_pid,
            "peer_home": peer_var("HOME"),
            "peer_token_file": peer_token_file,
        })
        .to_string(),
    )
    .unwrap();
    std::fs::rename(&tmp, &targets).unwrap();

    let out = task_output(&stack, ids[1], Duration::from_secs(60)).await;
    let report = out.to_string();
    assert!(
        !report.contains(credential.trim()),
        "the worker credential leaked to the task: {report}"
    );
    assert!(
        !report.contains(peer_token.trim()),
        "another task's token leaked: {report}"
    );
    for t in out["tries"].as_array().expect("tries") {
        if t["what"] == "parent cmdline" {
            // Readable by anyone, by design of /proc: it must hold no secret
            // (the credential never goes on a command line).
            continue;
        }
        assert_eq!(t["ok"], false, "the task could read {t}");
    }

    // The environment is the allowlist, exactly.
    let env = out["env"].as_object().expect("env");
    let names: BTreeSet<&str> = env.keys().map(String::as_str).collect();
    let mut expected: BTreeSet<&str> = [
        "DISPATCHER_URL",
        "DISPATCHER_TASK_TOKEN",
        "DISPATCHER_TASK_TOKEN_FILE",
        "DISPATCHER_TASK_ID",
        "DISPATCHER_JOB_ID",
        "DISPATCHER_TASK_KEY",
        "DISPATCHER_ATTEMPT",
        "DISPATCHER_OBJECT_PREFIX",
        "DISPATCHER_OUTPUTS",
        "PATH",
        "HOME",
        "TMPDIR",
    ]
    .into_iter()
    .collect();
    // LANG and TZ pass through only when the wrapper has them.
    for k in ["LANG", "TZ"] {
        if std::env::var_os(k).is_some() {
            expected.insert(k);
        }
    }
    assert_eq!(
        names, expected,
        "the task's environment is not the allowlist"
    );
    let home = env["HOME"].as_str().unwrap();
    assert_eq!(env["TMPDIR"].as_str(), Some(home));
    assert_eq!(
        env["DISPATCHER_TASK_TOKEN_FILE"].as_str(),
        Some(format!("{home}/token").as_str())
    );

    // Its own identity: an unprivileged uid of its own, no extra groups,
    // its own process group, a private scratch directory and token file.
    let uid: Vec<u32> = out["uid"]
        .as_str()
        .unwrap()
        .split_whitespace()
        .map(|u| u.parse().unwrap())
        .collect();
    assert!(uid.iter().all(|&u| u == uid[0] && u != 0), "uid {uid:?}");
    let peer_uid = std::fs::metadata(format!("/proc/{peer_pid}"))
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
        .unwrap();
    assert_ne!(uid[0], peer_uid, "two running tasks share a uid");
    assert_eq!(out["groups"], "", "supplementary groups: {}", out["groups"]);
    assert_eq!(
        out["pgid_is_own_pid"], true,
        "not in a process group of its own"
    );
    assert_eq!(out["home_mode"], 0o700);
    assert_eq!(out["home_owner"], uid[0]);
    assert_eq!(out["token_file_mode"], 0o600);
    assert_eq!(out["token_file_owner"], uid[0]);
    // The probe's scratch directory went with its attempt.
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::path::Path::new(home).exists() {
        assert!(Instant::now() < deadline, "{home} outlived its attempt");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(worker);
}

/// Not run as root, the wrapper cannot give tasks uids of their own: it
/// refuses to start unless `--insecure-shared-uid` says tasks may share
/// its user (review H7). Even then, being non-dumpable keeps its memory
/// and environment (where `WORKER_CREDENTIAL` may have been) out of its
/// tasks' reach.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invariant_11_a_non_root_wrapper_refuses_to_start_without_the_insecure_flag_and_is_not_readable_by_its_own_tasks(
) {
    assert_eq!(
        euid(),
        0,
        "this test starts the wrapper under another uid; run it as root"
    );
    let mut stack = Stack::new().await;
    let targets = stack.dir.join("targets.json");
    let (_, ids) = stack
        .submit(json!({"name": "hostile", "tasks": [
            {"key": "probe", "runtime": "exec", "bundle": stack.probe_bundle(),
             "inputs": {"targets": targets.display().to_string()}}
        ]}))
        .await;
    std::fs::write(
        &targets,
        json!({"credential_file": "", "peer_pid": 0, "peer_home": "", "peer_token_file": ""})
            .to_string(),
    )
    .unwrap();
    stack.start_dispatcher("").await;
    let uid = 1_899_999_000;
    // Fails closed: no flag, no start, nothing claimed.
    let mut refused = stack.start_worker(&WorkerOpts {
        run_as: Some(uid),
        ..WorkerOpts::new("unprivileged")
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = refused.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "a non-root wrapper without the flag kept running:\n{}",
            refused.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(!status.success());
    assert!(
        refused.log_text().contains("--insecure-shared-uid"),
        "{}",
        refused.log_text()
    );
    let claimed: i64 = sqlx::query_scalar("SELECT count(*) FROM attempts")
        .fetch_one(&stack.db.pool)
        .await
        .unwrap();
    assert_eq!(claimed, 0, "a refused wrapper claims nothing");
    let worker = stack.start_worker(&WorkerOpts {
        run_as: Some(uid),
        insecure_shared_uid: true,
        ..WorkerOpts::new("unprivileged")
    });
    let out = task_output(&stack, ids[0], Duration::from_secs(60)).await;
    assert!(
        out["uid"].as_str().unwrap().starts_with(&uid.to_string()),
        "the task should share the wrapper's uid here: {}",
        out["uid"]
    );
    let credential = std::fs::read_to_string(stack.credential_file("unprivileged")).unwrap();
    for t in out["tries"].as_array().unwrap() {
        match t["what"].as_str().unwrap() {
            "parent environ" | "parent mem" => {
                assert_eq!(t["ok"], false, "a same-user task could read {t}")
            }
            "parent cmdline" => assert!(!t.to_string().contains(credential.trim())),
            _ => {}
        }
    }
    assert!(worker
        .log_text()
        .contains("--insecure-shared-uid: tasks run as this user"));
}

/// Starts a worker with `credential` against a job whose wake-ups are
/// queued; expects it to exit non-zero soon, naming the credential.
async fn expect_refused_exit(stack: &Stack, id: &str, credential: String) -> String {
    let mut worker = stack.start_worker(&WorkerOpts {
        credential: Some(credential),
        ..WorkerOpts::new(id)
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = worker.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "worker {id} kept running with a refused credential:\n{}",
            worker.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let log = worker.log_text();
    assert!(!status.success(), "worker {id} exited successfully:\n{log}");
    assert!(
        log.contains("refused the worker credential"),
        "worker {id} did not name the credential problem:\n{log}"
    );
    log
}

/// A worker credential signed by a key the dispatcher does not trust.
fn untrusted_credential() -> String {
    dispatcher::tokens::Keyring::generate("dispatcher", 5)
        .mint_worker("w", Utc::now() + chrono::Duration::hours(1))
}

async fn queued_wakeups(stack: &Stack) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM queue_messages WHERE queue = 'wakeups'")
        .fetch_one(&stack.db.pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rule_a_worker_with_a_refused_credential_exits_and_deletes_no_wakeup() {
    let mut stack = Stack::new().await;
    // Wake-up messages, so that there is something to delete.
    stack
        .profile_env
        .push(("DISPATCHER_WAKEUPS".into(), "queue".into()));
    let n = 5;
    stack.submit(stack.flat_job(n, json!({}))).await;
    stack.start_dispatcher("").await;
    // Every wake-up is in the queue before any worker starts.
    let deadline = Instant::now() + Duration::from_secs(20);
    while queued_wakeups(&stack).await < n as i64 {
        assert!(Instant::now() < deadline, "the relay did not publish");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let other_key = dispatcher::tokens::Keyring::generate("dispatcher", 5);
    let wrong = other_key.mint_worker("w", Utc::now() + chrono::Duration::hours(1));
    expect_refused_exit(&stack, "wrong-key", wrong).await;
    let expired = stack
        .keys
        .mint_worker("w", Utc::now() - chrono::Duration::hours(1));
    expect_refused_exit(&stack, "expired", expired).await;
    assert_eq!(queued_wakeups(&stack).await, n as i64, "a wake-up was lost");
    // A worker claiming ready work directly (the notify mode) exits too.
    stack
        .profile_env
        .push(("DISPATCHER_WAKEUPS".into(), "notify".into()));
    expect_refused_exit(&stack, "claims", untrusted_credential()).await;
    stack.profile_env.pop();
    let claimed: i64 = sqlx::query_scalar("SELECT count(*) FROM attempts")
        .fetch_one(&stack.db.pool)
        .await
        .unwrap();
    assert_eq!(claimed, 0);

    // A credential file others can read is refused before anything runs.
    let loose = stack.dir.join("loose.credential");
    std::fs::write(
        &loose,
        stack
            .keys
            .mint_worker("w", Utc::now() + chrono::Duration::hours(1)),
    )
    .unwrap();
    std::fs::set_permissions(&loose, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let out = std::process::Command::new(dispatcher_tests::stack::binary("worker-wrapper"))
        .arg("run")
        .env("DISPATCHER_URL", stack.url())
        .env("WORKER_CREDENTIAL_FILE", &loose)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("mode 0644"), "{stderr}");

    // A good worker then runs everything: nothing was lost.
    let _w = stack.start_worker(&WorkerOpts::new("good"));
    stack.wait_all_finished(Duration::from_secs(60)).await;
    stack.assert_clean(n as i64).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rule_a_worker_whose_claim_is_refused_on_the_aws_profile_exits_and_leaves_every_wakeup() {
    // On aws the worker receives from SQS with its own AWS identity, so the
    // wake-ups reach it; the claim is what refuses the credential.
    let moto = Moto::start().await;
    let mut stack = Stack::new().await;
    stack.use_aws_profile(&moto).await;
    let n = 5;
    stack.submit(stack.flat_job(n, json!({}))).await;
    stack.start_dispatcher("").await;
    let sqs = dispatcher::queue::SqsQueue::connect(&moto_sqs(&stack))
        .await
        .expect("sqs");
    let other_key = dispatcher::tokens::Keyring::generate("dispatcher", 5);
    let wrong = other_key.mint_worker("w", Utc::now() + chrono::Duration::hours(1));
    // Wait until the relay has published every wake-up.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let sent: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM outbox WHERE topic = 'wakeup' AND state = 'sent'",
        )
        .fetch_one(&stack.db.pool)
        .await
        .unwrap();
        if sent == n as i64 {
            break;
        }
        assert!(Instant::now() < deadline, "the relay did not publish");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = expect_refused_exit(&stack, "wrong-key", wrong).await;
    assert!(log.contains("SQS queue"), "{log}");
    // Every wake-up is still there: receive them all back.
    let mut seen = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.len() < n {
        use dispatcher::queue::Queue as _;
        for m in sqs
            .receive(
                "wakeups",
                10,
                Duration::from_secs(1),
                Duration::from_secs(30),
            )
            .await
            .unwrap()
        {
            seen.insert(m.body["task_id"].as_str().unwrap().to_owned());
        }
        assert!(
            Instant::now() < deadline,
            "only {} of {n} wake-ups are left in SQS",
            seen.len()
        );
    }
}

fn moto_sqs(stack: &Stack) -> dispatcher::queue::SqsConfig {
    let env = |k: &str| {
        stack
            .profile_env
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .unwrap()
    };
    dispatcher::queue::SqsConfig {
        region: env("AWS_REGION"),
        endpoint_url: Some(env("AWS_ENDPOINT_URL")),
        queue_prefix: env("DISPATCHER_SQS_QUEUE_PREFIX"),
        static_credentials: Some((env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY"))),
    }
}

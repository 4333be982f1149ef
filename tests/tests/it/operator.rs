//! What an operator trips over first (issue 30): commands that fail safe
//! and say so in one line.

use dispatcher_tests::stack::binary;
use sqlx::Connection;

/// The maintenance database of the test server (`DATABASE_URL`'s server).
fn maintenance_url() -> String {
    let mut url = reqwest::Url::parse(&dispatcher_tests::database_url()).unwrap();
    url.set_path("/postgres");
    url.to_string()
}

async fn run(args: &[&str], database_url: Option<&str>) -> (bool, String) {
    let mut cmd = tokio::process::Command::new(binary("dispatcher"));
    cmd.args(args)
        // Static credentials: the SDK must not look for others (IMDS).
        .env("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
        .env("AWS_SECRET_ACCESS_KEY", "secret")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env_remove("DATABASE_URL")
        .env_remove("DATA_DATABASE_URL")
        // A backtrace is not what an operator needs; the error is one line.
        .env("RUST_BACKTRACE", "1")
        .env_remove("DISPATCHER_DEBUG");
    if let Some(url) = database_url {
        cmd.env("DATABASE_URL", url);
    }
    let out = cmd
        .output()
        .await
        .expect("the dispatcher binary runs (cargo build --workspace --bins)");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn admin_commands_without_a_database_fail_in_one_line_naming_it_and_write_nothing_to_the_maintenance_database(
) {
    let maintenance = maintenance_url();
    let tables = || async {
        let mut conn = sqlx::PgConnection::connect(&maintenance).await.unwrap();
        let found: Option<String> = sqlx::query_scalar(
            "SELECT coalesce(to_regclass('public.jobs'), to_regclass('public._sqlx_migrations'))::text",
        )
        .fetch_one(&mut conn)
        .await
        .unwrap();
        found
    };
    let before = tables().await;
    for args in [
        vec!["migrate"],
        vec!["admin", "create-org", "--name", "acme"],
        vec!["admin", "outbox", "status"],
    ] {
        let (ok, err) = run(&args, None).await;
        assert!(!ok, "{args:?} ran without a database");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(
            err.starts_with("error: no database: set DATABASE_URL"),
            "{args:?}: {err}"
        );
        let (ok, err) = run(&args, Some(&maintenance)).await;
        assert!(!ok, "{args:?} ran on the maintenance database");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(
            err.contains("names the maintenance database \"postgres\""),
            "{args:?}: {err}"
        );
    }
    assert_eq!(
        tables().await,
        before,
        "the maintenance database gained the schema"
    );
}

/// SIGTERM to a dispatcher: `/readyz` answers 503 at once while the rest is
/// still served, a long-poll in flight answers (empty) when the listener
/// closes instead of waiting out its 20 s, and the process exits within
/// its two bounds.
#[tokio::test]
async fn a_dispatcher_told_to_stop_answers_not_ready_first_then_ends_its_long_polls_and_exits_within_its_bounds(
) {
    use dispatcher_tests::stack::Stack;
    use std::time::{Duration, Instant};
    let mut stack = Stack::new().await;
    stack.profile_env.extend([
        ("DISPATCHER_DRAIN_NOT_READY_SECONDS".into(), "2".into()),
        ("DISPATCHER_DRAIN_TIMEOUT_SECONDS".into(), "3".into()),
    ]);
    stack.start_dispatcher("").await;
    let base = stack.url();
    let http = reqwest::Client::new();
    let status = |path: &'static str| {
        let (http, base) = (http.clone(), base.clone());
        async move {
            http.get(format!("{base}{path}"))
                .send()
                .await
                .map(|r| r.status().as_u16())
                .ok()
        }
    };
    assert_eq!(status("/readyz").await, Some(200));
    let (ok, err) = run(&["healthcheck", "--url", &base], None).await;
    assert!(ok, "{err}");
    let worker = stack
        .keys
        .mint_worker("w", chrono::Utc::now() + chrono::Duration::hours(1));
    // Nothing is ready: this waits its whole 20 s unless the drain ends it.
    let poll = tokio::spawn({
        let (http, base) = (http.clone(), base.clone());
        async move {
            let resp = http
                .post(format!("{base}/internal/task-claim-batch"))
                .bearer_auth(worker)
                .json(&serde_json::json!({"worker_id": "w", "max_tasks": 4, "wait_seconds": 20}))
                .send()
                .await
                .expect("the long-poll is answered, not cut");
            let status = resp.status().as_u16();
            let body: serde_json::Value = resp.json().await.expect("a JSON answer");
            (status, body, Instant::now())
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pid = stack.dispatcher.as_ref().unwrap().id() as i32;
    let signalled = Instant::now();
    // SAFETY: kill(2) on our own child; no memory is shared.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    // Not ready at once, while everything else is still served.
    let mut not_ready_after = None;
    while signalled.elapsed() < Duration::from_millis(1500) {
        if status("/readyz").await == Some(503) {
            not_ready_after = Some(signalled.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let not_ready_after = not_ready_after.expect("/readyz never answered 503 while draining");
    assert!(
        not_ready_after < Duration::from_millis(500),
        "{not_ready_after:?}"
    );
    assert_eq!(
        status("/healthz").await,
        Some(200),
        "served while not ready"
    );
    assert!(
        !poll.is_finished(),
        "the long-poll ended before the listener closed"
    );
    assert_eq!(status("/livez").await, Some(200), "alive while not ready");
    // The container health check says the same, in one line.
    let (ok, err) = run(&["healthcheck", "--url", &base], None).await;
    assert!(!ok, "healthcheck passed while draining");
    assert!(err.contains("503") && err.contains("draining"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let (ok, err) = run(&["healthcheck", "--live", "--url", &base], None).await;
    assert!(ok, "{err}");
    let (code, body, answered) = poll.await.unwrap();
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["claims"], serde_json::json!([]), "{body}");
    let answered = answered - signalled;
    assert!(
        answered >= Duration::from_millis(1800) && answered < Duration::from_secs(4),
        "the long-poll answered {answered:?} after SIGTERM (not ready for 2 s, then closing)"
    );
    assert!(
        stack.wait_dispatcher_exit(Duration::from_secs(6)).await,
        "the dispatcher did not exit within its drain bounds"
    );
    assert!(signalled.elapsed() < Duration::from_secs(2 + 3 + 2));
    assert_eq!(status("/healthz").await, None, "still listening after exit");
}

/// A replica that signs with another key, or that its peers could not
/// verify, refuses to start and says which peer and what to do; one that
/// verifies both (the rotation's second step) starts.
#[tokio::test]
async fn a_second_replica_with_another_signing_key_is_refused_at_start_naming_the_peer() {
    use dispatcher_tests::stack::{write_secret, Stack};
    use std::time::{Duration, Instant};
    let mut stack = Stack::new().await;
    stack.start_dispatcher("").await;
    let first_kid = stack.keys.signing_kid().to_owned();
    let (other_pem, other_public) = dispatcher::tokens::generate_key_pem();
    let other = dispatcher::tokens::Keyring::from_pem("dispatcher", &other_pem, &[], 5).unwrap();
    let other_kid = other.signing_kid().to_owned();
    let other_key = stack.dir.join("other.pem");
    write_secret(&other_key, &other_pem);
    let other_pub = stack.dir.join("other.pem.pub");
    std::fs::write(&other_pub, other_public).unwrap();
    let first_pub = stack.dir.join("first.pem.pub");
    std::fs::write(&first_pub, stack.keys.signing_public_pem()).unwrap();

    let exits = |mut replica: dispatcher_tests::stack::Replica, name: &str| {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = replica.child.try_wait().unwrap() {
                return status.success();
            }
            assert!(
                Instant::now() < deadline,
                "replica {name} neither refused nor stopped"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let other_key_s = other_key.to_str().unwrap();
    let log = |name: &str| {
        std::fs::read_to_string(stack.dir.join(format!("dispatcher-{name}.log"))).unwrap()
    };
    // Another key outright.
    let replica = stack.spawn_replica(
        "other-key",
        None,
        &[("DISPATCHER_SIGNING_KEY_FILE", other_key_s)],
    );
    assert!(
        !exits(replica, "other-key"),
        "a replica with another key started"
    );
    let text = log("other-key");
    let error = text.lines().last().unwrap_or_default();
    assert!(error.starts_with("error: signing-key mismatch"), "{text}");
    assert!(error.contains(&first_kid), "{error}");
    assert!(error.contains("--verify-key"), "{error}");
    // The new key, verifying the old one, beside a replica that does not
    // verify the new one (the rotation's second step skipped).
    let replica = stack.spawn_replica(
        "skipped-step",
        None,
        &[
            ("DISPATCHER_SIGNING_KEY_FILE", other_key_s),
            ("DISPATCHER_VERIFY_KEY_FILES", first_pub.to_str().unwrap()),
        ],
    );
    assert!(!exits(replica, "skipped-step"));
    let text = log("skipped-step");
    assert!(
        text.contains(&format!(
            "does not verify this replica's signing key {other_kid}"
        )),
        "{text}"
    );
    // The old key, verifying the new one too (the rotation's second step):
    // it starts and serves.
    let mut replica = stack.spawn_replica(
        "step-two",
        None,
        &[("DISPATCHER_VERIFY_KEY_FILES", other_pub.to_str().unwrap())],
    );
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        assert!(
            replica.child.try_wait().unwrap().is_none(),
            "{}",
            log("step-two")
        );
        if http
            .get(format!("{}/readyz", replica.url))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            break;
        }
        assert!(Instant::now() < deadline, "step two never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    replica.kill();
}

/// An idle worker and its dispatcher stay quiet: the empty long-polls
/// every second add no line to either log.
#[tokio::test]
async fn an_idle_worker_and_its_dispatcher_log_nothing_between_empty_long_polls() {
    use dispatcher_tests::stack::{Stack, WorkerOpts};
    use std::time::{Duration, Instant};
    let mut stack = Stack::new().await;
    stack
        .profile_env
        .push(("WORKER_WAIT_SECONDS".into(), "1".into()));
    stack.start_dispatcher("").await;
    let worker = stack.start_worker(&WorkerOpts::new("idle"));
    let deadline = Instant::now() + Duration::from_secs(20);
    while !worker.log_text().contains("worker started") {
        assert!(Instant::now() < deadline, "{}", worker.log_text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let dispatcher_log = stack.dir.join("dispatcher-0.log");
    // Let the first long-polls start, then watch four more come back empty.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = (
        std::fs::read_to_string(&dispatcher_log).unwrap(),
        worker.log_text(),
    );
    tokio::time::sleep(Duration::from_secs(4)).await;
    let after = (
        std::fs::read_to_string(&dispatcher_log).unwrap(),
        worker.log_text(),
    );
    assert_eq!(
        &after.0[before.0.len()..],
        "",
        "the dispatcher logged while the worker idled"
    );
    assert_eq!(&after.1[before.1.len()..], "", "the idle worker logged");
}

/// `migrate` says what it is about to apply and what it applied, per
/// database, and says so when there is nothing to do.
#[tokio::test]
async fn migrate_names_the_pending_migrations_then_says_up_to_date() {
    let admin = dispatcher_tests::database_url();
    let name = format!("migrate_{}", uuid::Uuid::new_v4().simple());
    let mut conn = sqlx::PgConnection::connect(&admin).await.unwrap();
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .unwrap();
    let mut url = reqwest::Url::parse(&admin).unwrap();
    url.set_path(&format!("/{name}"));
    let newest = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../migrations"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|f| f.ends_with(".sql"))
        .max()
        .unwrap();
    let newest = newest.trim_end_matches(".sql").replace('_', " ");
    let (ok, first) = run(&["migrate"], Some(url.as_str())).await;
    let (ok2, second) = run(&["migrate"], Some(url.as_str())).await;
    for db in [name.clone(), format!("{name}_data")] {
        sqlx::query(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
            .execute(&mut conn)
            .await
            .unwrap();
    }
    assert!(ok, "{first}");
    assert!(
        first.contains("state database: applying ") && first.contains(&format!("… {newest})")),
        "{first}"
    );
    assert!(first.contains("state database: applied "), "{first}");
    assert!(
        first.contains(&format!("data database: created {name}_data")),
        "{first}"
    );
    assert!(first.contains("data database: applied "), "{first}");
    assert!(ok2, "{second}");
    assert!(second.contains("state database: up to date"), "{second}");
    assert!(second.contains("data database: up to date"), "{second}");
}

/// `admin dlq replay` shows its progress while it works (here after every
/// batch of ten), then its total.
#[tokio::test]
async fn dlq_replay_shows_progress_then_its_total() {
    use dispatcher::queue::Queue as _;
    let db = dispatcher_tests::TestDb::new().await;
    let store = dispatcher::store::Store::new(db.pool.clone(), Default::default());
    let (queue, _) = dispatcher::profile::local_queue(&store, &Default::default());
    for _ in 0..25 {
        queue
            .send(
                "wakeups-dlq",
                &serde_json::json!({"task_id": uuid::Uuid::new_v4()}),
                std::time::Duration::ZERO,
            )
            .await
            .unwrap();
    }
    let mut cmd = tokio::process::Command::new(binary("dispatcher"));
    cmd.args([
        "admin",
        "dlq",
        "replay",
        "--profile",
        "local",
        "--hold-seconds",
        "5",
    ])
    .env("DATABASE_URL", db.url())
    .env("DISPATCHER_PROGRESS_SECONDS", "0");
    let out = cmd.output().await.unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{err}");
    let progress: Vec<&str> = err.lines().filter(|l| l.starts_with("… ")).collect();
    assert!(progress.len() >= 3, "{err}");
    assert!(progress[0].contains("10 skipped"), "{err}");
    assert!(
        stdout.contains("replayed 0; skipped 0 finished and 25 unknown tasks"),
        "{stdout}"
    );
}

/// `admin sqs create-queues` honours `--profile` (the local profile has no
/// SQS queues to make) and an unreachable SQS is one short line; an empty
/// listing says it is empty.
#[tokio::test]
async fn create_queues_honours_the_profile_sdk_errors_are_one_line_and_empty_listings_say_so() {
    let (ok, err) = run(
        &["admin", "sqs", "create-queues", "--profile", "local"],
        None,
    )
    .await;
    assert!(!ok);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("pass --profile aws"), "{err}");
    let (ok, err) = run(
        &[
            "admin",
            "sqs",
            "create-queues",
            "--profile",
            "aws",
            "--aws-endpoint-url",
            "http://127.0.0.1:1",
        ],
        None,
    )
    .await;
    assert!(!ok);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("cannot reach SQS: ") && err.contains("refused"),
        "{err}"
    );
    assert!(err.len() < 300, "{} bytes: {err}", err.len());

    let db = dispatcher_tests::TestDb::new().await;
    let org = uuid::Uuid::new_v4().to_string();
    let (ok, err) = run(
        &["admin", "alerts", "list", "--org-id", &org],
        Some(&db.url()),
    )
    .await;
    assert!(ok, "{err}");
    assert!(
        err.contains("has no alert destinations and no routes"),
        "{err}"
    );
}

/// RDS refuses plaintext (`rds.force_ssl`, terraform/modules/database):
/// the store and the binaries speak TLS when the URL asks for it, and take
/// the password apart from the URL (`DATABASE_PASSWORD`, as ECS injects the
/// RDS-managed secret's `password`).
#[tokio::test]
async fn the_database_is_reached_over_tls_when_the_url_asks_and_the_password_may_come_apart() {
    let db = dispatcher_tests::TestDb::new().await;
    let url = db.url();
    let tls = format!(
        "{url}{}sslmode=require",
        if url.contains('?') { '&' } else { '?' }
    );
    let store = dispatcher::store::Store::connect(&tls, 2, Default::default())
        .await
        .expect("a TLS connection (sqlx built with rustls)");
    let ssl: bool = sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert!(ssl, "the connection is encrypted");
    // Without an sslmode, a loopback server is reached in plain text
    // (TLS there costs time and protects nothing).
    let plain = dispatcher::store::Store::connect(&url, 1, Default::default())
        .await
        .unwrap();
    let ssl: bool = sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(plain.pool())
        .await
        .unwrap();
    assert!(!ssl, "no TLS on loopback unless asked for");
    let out = tokio::process::Command::new(binary("dispatcher"))
        .args(["admin", "workers"])
        .env("DATABASE_URL", &tls)
        .env("DATABASE_PASSWORD", "injected-apart")
        .env_remove("DATA_DATABASE_URL")
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("injected-apart"), "{stderr}");
}

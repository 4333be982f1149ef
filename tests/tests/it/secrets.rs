//! No secrets in errors, logs, `--help` or `Debug`: database passwords,
//! AWS secret keys, tokens.

use std::process::Command;
use std::time::Duration;

use dispatcher::objects::S3Config;
use dispatcher::queue::SqsConfig;
use dispatcher_tests::stack::{binary, write_secret};
use dispatcher_tests::{free_port, TestDb};

const PASSWORD: &str = "hunter2-very-secret";

#[test]
fn rule_debug_never_shows_an_aws_secret_key() {
    let creds = Some(("AKIDEXAMPLE".to_owned(), PASSWORD.to_owned()));
    let sqs = SqsConfig {
        region: "eu-west-1".into(),
        endpoint_url: None,
        queue_prefix: "p-".into(),
        static_credentials: creds.clone(),
    };
    let s3 = S3Config {
        region: "eu-west-1".into(),
        endpoint_url: None,
        bucket: "b".into(),
        static_credentials: creds,
    };
    for shown in [format!("{sqs:?}"), format!("{s3:?}")] {
        assert!(!shown.contains(PASSWORD), "{shown}");
        assert!(
            shown.contains("AKIDEXAMPLE"),
            "the key id may show: {shown}"
        );
    }
}

#[tokio::test]
async fn rule_debug_of_the_store_never_shows_the_database_password() {
    // Trust authentication accepts any password, so this URL connects.
    let db = TestDb::new().await;
    let url = db
        .url()
        .replacen("://postgres@", &format!("://postgres:{PASSWORD}@"), 1);
    assert!(
        url.contains(PASSWORD),
        "the test URL has no password: {url}"
    );
    let store = dispatcher::store::Store::connect(&url, 1, Default::default())
        .await
        .expect("connect");
    let shown = format!("{store:?}");
    assert!(!shown.contains(PASSWORD), "{shown}");
}

fn unreachable_db() -> String {
    format!("postgres://ada:{PASSWORD}@127.0.0.1:{}/x", free_port())
}

#[test]
fn rule_help_and_errors_never_show_the_database_password() {
    let dir = std::env::temp_dir().join(format!("secrets-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let key = dir.join("signing.pem");
    write_secret(&key, &dispatcher::tokens::generate_key_pem().0);
    let runs: Vec<(&str, Vec<&str>)> = vec![
        ("serve --help", vec!["serve", "--help"]),
        ("dev --help", vec!["dev", "--help"]),
        ("serve", vec!["serve"]),
        ("migrate", vec!["migrate"]),
        ("dev", vec!["dev", "--no-sample", "--state-dir"]),
    ];
    for (name, mut args) in runs {
        let state = dir.join("dev-state").display().to_string();
        if name == "dev" {
            args.push(&state);
        }
        let out = Command::new(binary("dispatcher"))
            .args(&args)
            .env("DATABASE_URL", unreachable_db())
            .env("DISPATCHER_SIGNING_KEY_FILE", &key)
            .env("DISPATCHER_BIND", format!("127.0.0.1:{}", free_port()))
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if !name.ends_with("--help") {
            assert!(
                !out.status.success(),
                "{name} reached an unreachable database"
            );
        }
        assert!(
            !text.contains(PASSWORD),
            "{name} showed the password:\n{text}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn rule_the_worker_never_logs_its_credential() {
    let credential = format!("eyJ.{PASSWORD}.sig");
    let child = Command::new(binary("worker-wrapper"))
        .args(["run", "--wait-seconds", "1"])
        .env("WORKER_CREDENTIAL", &credential)
        .env(
            "DISPATCHER_URL",
            format!("http://127.0.0.1:{}", free_port()),
        )
        .env("RUST_LOG", "debug")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    // SIGTERM: the worker drains (nothing runs) and removes its scratch root.
    // SAFETY: kill(2) on our own child; no memory is shared.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("claiming ready work failed"),
        "the worker did not try: {text}"
    );
    assert!(
        !text.contains(PASSWORD),
        "the credential was logged:\n{text}"
    );
}

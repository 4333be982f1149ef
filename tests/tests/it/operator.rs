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

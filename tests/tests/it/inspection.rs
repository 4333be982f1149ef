//! Issue 25: what a user can see of their jobs through the API: the
//! listing with its filters and pages, a task's detail with every attempt
//! (error, output, worker, duration, what it produced), its events; and
//! that another org sees none of it.

use chrono::Utc;
use dispatcher::domain::Role;
use dispatcher_tests::{unthrottled, TestApp};
use reqwest::StatusCode;
use serde_json::{json, Value};
use uuid::Uuid;

/// A token of the admin of another org.
async fn other_org_admin(app: &TestApp) -> String {
    let other = app.store.ensure_org("globex").await.unwrap();
    let user = app.store.ensure_user("admin@globex.test").await.unwrap();
    app.store
        .set_membership(other, user, Role::Admin)
        .await
        .unwrap();
    app.keys
        .mint_user(user, other, Utc::now() + chrono::Duration::hours(1))
}

#[tokio::test]
async fn a_failed_job_shows_each_tasks_error_output_worker_and_events_and_no_other_org_sees_it() {
    let app = TestApp::spawn_with(unthrottled()).await;
    let job = app
        .submit(&json!({"name": "nightly-etl", "tasks": [
            {"key": "extract", "runtime": "exec", "bundle": "x", "inputs": {"day": "2026-12-06"}},
            {"key": "load", "runtime": "exec", "bundle": "x", "max_attempts": 1},
            {"key": "report", "runtime": "exec", "bundle": "x", "depends_on": ["extract", "load"]}]}))
        .await;
    let id = |key: &str| job.tasks.iter().find(|t| t.key == key).unwrap().task_id;

    let extract = app.claim(id("extract")).await;
    let r = app
        .post(
            "/v1/task/events",
            &extract.capability_token,
            &json!({"events": [
                {"seq": 0, "kind": "progress", "payload": {"pct": 50}},
                {"seq": 1, "kind": "rows", "payload": {"n": 3}},
                {"seq": 2, "kind": "done", "payload": {}}]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let r = app
        .complete_ok(&extract.capability_token, json!({"rows": 3}))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let load = app.claim(id("load")).await;
    let r = app
        .complete_failed(
            &load.capability_token,
            "the warehouse refused the schema",
            false,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);

    let base = format!("/v1/jobs/{}/tasks", job.job_id);
    let r = app.get(&format!("{base}/extract"), &app.user_token).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["state"], "succeeded");
    assert_eq!(r.body["spec"]["inputs"], json!({"day": "2026-12-06"}));
    assert_eq!(r.body["spec"]["runtime"], "exec");
    let a = &r.body["attempts"][0];
    assert_eq!(a["attempt"], 1);
    assert_eq!(a["worker_id"], "test-worker");
    assert_eq!(a["outcome"], "succeeded");
    assert_eq!(a["output"], json!({"rows": 3}));
    assert_eq!(a["error"], Value::Null);
    assert_eq!(a["events"], 3);
    assert!(a["duration_ms"].as_u64().is_some(), "{a}");

    let r = app.get(&format!("{base}/load"), &app.user_token).await;
    assert_eq!(r.body["state"], "failed", "{}", r.body);
    let a = &r.body["attempts"][0];
    assert_eq!(a["outcome"], "failed");
    assert_eq!(
        a["error"],
        json!({"code": "task_failed", "message": "the warehouse refused the schema", "retryable": false})
    );
    assert_eq!(a["output"], Value::Null);

    let r = app.get(&format!("{base}/report"), &app.user_token).await;
    assert_eq!(
        r.body["depends_on"],
        json!(["extract", "load"]),
        "{}",
        r.body
    );
    assert_eq!(r.body["attempts"], json!([]));

    // Events, two pages of at most two.
    let r = app
        .get(&format!("{base}/extract/events?limit=2"), &app.user_token)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let kinds: Vec<&str> = r.body["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["progress", "rows"]);
    let next = r.body["next_cursor"]
        .as_str()
        .expect("a next page")
        .to_owned();
    let r = app
        .get(
            &format!("{base}/extract/events?limit=2&after={next}"),
            &app.user_token,
        )
        .await;
    assert_eq!(r.body["events"][0]["kind"], "done", "{}", r.body);
    assert_eq!(r.body["events"][0]["payload"], json!({}));
    assert_eq!(r.body["next_cursor"], Value::Null);

    // The listing finds the job by its failed task and by its state.
    for filter in [
        "has_failed_tasks=true",
        "state=failed",
        "name_prefix=nightly",
    ] {
        let r = app
            .get(&format!("/v1/jobs?{filter}"), &app.user_token)
            .await;
        assert_eq!(r.status, StatusCode::OK, "{filter}: {}", r.body);
        let jobs = r.body["jobs"].as_array().unwrap();
        assert_eq!(jobs.len(), 1, "{filter}: {}", r.body);
        assert_eq!(jobs[0]["job_id"], json!(job.job_id));
        assert_eq!(
            jobs[0]["tasks"],
            json!({"blocked": 0, "ready": 0, "leased": 0, "succeeded": 1, "failed": 1, "cancelled": 1})
        );
    }
    let r = app
        .get("/v1/jobs?has_failed_tasks=false", &app.user_token)
        .await;
    assert_eq!(r.body["jobs"], json!([]), "{}", r.body);

    // Another org: not found, and not listed.
    let other = other_org_admin(&app).await;
    for path in [
        format!("{base}/extract"),
        format!("{base}/extract/events"),
        format!("/v1/jobs/{}", job.job_id),
    ] {
        let r = app.get(&path, &other).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{path}: {}", r.body);
    }
    let r = app.get("/v1/jobs", &other).await;
    assert_eq!(r.body["jobs"], json!([]), "{}", r.body);
    // A key the job does not have.
    let r = app.get(&format!("{base}/nope"), &app.user_token).await;
    assert_eq!((r.status, r.code()), (StatusCode::NOT_FOUND, "not_found"));
}

#[tokio::test]
async fn the_job_listing_filters_and_pages_over_thousands_of_jobs_newest_first() {
    let app = TestApp::spawn_with(unthrottled()).await;
    // 3 000 jobs of this org, one a second back from now: names etl-0,
    // etl-1, etl_2 by turn; every tenth failed with a failed task, the
    // rest succeeded; and 50 jobs of another org.
    let pool = &app.db.pool;
    sqlx::query(
        "INSERT INTO jobs (id, org_id, name, state, tasks_unfinished, created_at, finished_at)
         SELECT gen_random_uuid(), $1,
                CASE i % 3 WHEN 0 THEN 'etl-0' WHEN 1 THEN 'etl-1' ELSE 'etl_2' END,
                CASE WHEN i % 10 = 0 THEN 'failed' ELSE 'succeeded' END,
                0, now() - i * interval '1 second', now() - i * interval '1 second' + interval '1 second'
           FROM generate_series(1, 3000) AS i",
    )
    .bind(app.org_id)
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO tasks (id, job_id, state, attempt, max_attempts, pending_deps)
         SELECT gen_random_uuid(), id, 'failed', 1, 1, 0 FROM jobs WHERE state = 'failed'",
    )
    .execute(pool)
    .await
    .unwrap();
    let other = other_org_admin(&app).await;
    let other_org = app.store.ensure_org("globex").await.unwrap();
    sqlx::query(
        "INSERT INTO jobs (id, org_id, name, state, tasks_unfinished)
         SELECT gen_random_uuid(), $1, 'etl-0', 'running', 0 FROM generate_series(1, 50)",
    )
    .bind(other_org)
    .execute(pool)
    .await
    .unwrap();

    // Every page, newest first, each job once.
    let pages = |filter: &'static str| {
        let app = &app;
        async move {
            let mut seen: Vec<(String, Uuid)> = Vec::new();
            let mut after: Option<String> = None;
            let mut pages = 0;
            loop {
                let mut path = format!("/v1/jobs?limit=100{filter}");
                if let Some(a) = &after {
                    path.push_str(&format!("&after={a}"));
                }
                let r = app.get(&path, &app.user_token).await;
                assert_eq!(r.status, StatusCode::OK, "{path}: {}", r.body);
                pages += 1;
                for j in r.body["jobs"].as_array().unwrap() {
                    seen.push((
                        j["created_at"].as_str().unwrap().to_owned(),
                        serde_json::from_value(j["job_id"].clone()).unwrap(),
                    ));
                }
                match r.body["next_cursor"].as_str() {
                    Some(c) => after = Some(c.to_owned()),
                    None => break,
                }
            }
            let mut sorted = seen.clone();
            sorted.sort_by(|a, b| b.cmp(a));
            sorted.dedup();
            assert_eq!(sorted.len(), seen.len(), "{filter}: a job twice");
            (seen.len(), pages)
        }
    };
    assert_eq!(pages("").await, (3000, 30));
    assert_eq!(pages("&name_prefix=etl-").await.0, 2000);
    // `_` is a character, not a wildcard.
    assert_eq!(pages("&name_prefix=etl_").await.0, 1000);
    assert_eq!(pages("&state=failed").await.0, 300);
    assert_eq!(pages("&has_failed_tasks=true").await.0, 300);
    assert_eq!(
        pages("&has_failed_tasks=false&state=succeeded").await.0,
        2700
    );
    let r = app.get("/v1/jobs?limit=1", &app.user_token).await;
    let newest = r.body["jobs"][0]["created_at"].as_str().unwrap().to_owned();
    let since =
        chrono::DateTime::parse_from_rfc3339(&newest).unwrap() - chrono::Duration::seconds(100);
    let since = since.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let path = format!("/v1/jobs?created_after={since}");
    let r = app.get(&path, &app.user_token).await;
    assert_eq!(
        r.body["jobs"].as_array().unwrap().len(),
        100,
        "{path}: {}",
        r.body
    );
    // The other org sees its own 50 and none of these.
    let r = app.get("/v1/jobs", &other).await;
    assert_eq!(r.body["jobs"].as_array().unwrap().len(), 50);
    assert!(r.body["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .all(|j| j["state"] == "running"));

    // Bad input: a clear error, naming the field.
    for (query, field) in [
        ("limit=0", "limit"),
        ("limit=101", "limit"),
        ("after=garbage", "after"),
        ("state=sleeping", "query"),
        ("colour=red", "query"),
        (
            "created_after=2026-12-02T00:00:00Z&created_before=2026-12-01T00:00:00Z",
            "created_after",
        ),
    ] {
        let r = app.get(&format!("/v1/jobs?{query}"), &app.user_token).await;
        assert_eq!(
            (r.status, r.code()),
            (StatusCode::BAD_REQUEST, "invalid_request"),
            "{query}: {}",
            r.body
        );
        let message = r.body["error"]["message"].as_str().unwrap();
        assert!(message.starts_with(field), "{query}: {message}");
    }
}

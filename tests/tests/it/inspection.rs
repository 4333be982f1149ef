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

/// Claims every ready task through `POST /internal/task-claim-batch`, 100
/// at a time, until none is left; each claim's (task, attempt, token).
async fn claim_all(app: &TestApp) -> Vec<(Uuid, u32, String)> {
    let mut all = Vec::new();
    loop {
        let r = app
            .post(
                "/internal/task-claim-batch",
                &app.worker_token,
                &json!({"worker_id": "bulk-worker", "max_tasks": 100}),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        let claims = r.body["claims"].as_array().unwrap();
        if claims.is_empty() {
            return all;
        }
        for c in claims {
            let claim = &c["claim"];
            all.push((
                serde_json::from_value(claim["task_id"].clone()).unwrap(),
                claim["attempt"].as_u64().unwrap() as u32,
                claim["capability_token"].as_str().unwrap().to_owned(),
            ));
        }
    }
}

/// Completes each claim as failed (not retryable) through
/// `POST /v1/task/complete-batch`, 100 at a time.
async fn fail_all(app: &TestApp, claims: &[(Uuid, u32, String)]) {
    for chunk in claims.chunks(100) {
        let entries: Vec<Value> = chunk
            .iter()
            .map(|(_, _, token)| {
                json!({"capability_token": token,
                       "body": {"outcome": "failed", "error": {"message": "boom", "retryable": false}}})
            })
            .collect();
        let r = app
            .post(
                "/v1/task/complete-batch",
                &app.worker_token,
                &json!({"entries": entries}),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        assert!(
            r.body["results"]
                .as_array()
                .unwrap()
                .iter()
                .all(|e| e["error"].is_null()),
            "{}",
            r.body
        );
    }
}

#[tokio::test]
async fn a_retried_task_runs_again_with_its_cancelled_dependants_and_the_job_can_succeed() {
    let app = TestApp::spawn_with(unthrottled()).await;
    let job = app
        .submit(&json!({"name": "retry-me", "tasks": [
            {"key": "a", "runtime": "exec", "bundle": "x", "max_attempts": 1},
            {"key": "b", "runtime": "exec", "bundle": "x", "depends_on": ["a"]},
            {"key": "c", "runtime": "exec", "bundle": "x"}]}))
        .await;
    let id = |key: &str| job.tasks.iter().find(|t| t.key == key).unwrap().task_id;
    let a = app.claim(id("a")).await;
    app.complete_failed(&a.capability_token, "flaky upstream", false)
        .await;
    assert_eq!(
        app.job(job.job_id).await.state,
        dispatcher_wire::JobState::Failed
    );
    let retry = format!("/v1/jobs/{}/tasks/a/retry", job.job_id);

    // A viewer reads only; another org does not find the job.
    let viewer = app.store.ensure_user("viewer@acme.test").await.unwrap();
    app.store
        .set_membership(app.org_id, viewer, Role::Viewer)
        .await
        .unwrap();
    let viewer = app
        .keys
        .mint_user(viewer, app.org_id, Utc::now() + chrono::Duration::hours(1));
    let r = app.post(&retry, &viewer, &json!({})).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
    let r = app
        .post(&retry, &other_org_admin(&app).await, &json!({}))
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);
    // A task that did not fail is not retried alone.
    let r = app
        .post(
            &format!("/v1/jobs/{}/tasks/nope/retry", job.job_id),
            &app.user_token,
            &json!({}),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);

    let r = app.post(&retry, &app.user_token, &json!({})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["state"], "running");
    let states: Vec<(&str, &str)> = r.body["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["key"].as_str().unwrap(), t["state"].as_str().unwrap()))
        .collect();
    assert_eq!(states, [("a", "ready"), ("b", "blocked"), ("c", "ready")]);
    // One more attempt for a task that had used them all; the fence goes on.
    let again = app.claim(id("a")).await;
    assert_eq!(again.attempt, 2);
    assert!(app
        .complete_ok(&a.capability_token, json!({}))
        .await
        .status
        .is_client_error());
    let r = app
        .complete_ok(&again.capability_token, json!({"ok": 1}))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    app.run_ok(id("c")).await;
    app.run_ok(id("b")).await;
    assert_eq!(
        app.job(job.job_id).await.state,
        dispatcher_wire::JobState::Succeeded
    );
    let r = app
        .get(&format!("/v1/jobs/{}/tasks/a", job.job_id), &app.user_token)
        .await;
    let outcomes: Vec<&str> = r.body["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, ["failed", "succeeded"]);
    // A succeeded job is not retried; the retry was recorded.
    let r = app
        .post(
            &format!("/v1/jobs/{}/retry", job.job_id),
            &app.user_token,
            &json!({}),
        )
        .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::CONFLICT, "conflict"),
        "{}",
        r.body
    );
    let r = app.get("/v1/job-actions", &app.user_token).await;
    assert_eq!(r.body["actions"].as_array().unwrap().len(), 1, "{}", r.body);
    assert_eq!(
        r.body["actions"][0]["target"],
        json!({"job_id": job.job_id, "task": "a"})
    );
    assert_eq!(r.body["actions"][0]["tasks"], 3);
    assert_eq!(r.body["actions"][0]["user_id"], json!(app.user_id));
}

#[tokio::test]
async fn a_bulk_retry_of_a_thousand_failed_tasks_counts_them_dry_runs_each_once_and_is_recorded() {
    let app = TestApp::spawn_with(unthrottled()).await;
    // Submitted through the store (the API's own submit path, without a
    // thousand HTTP round trips).
    for i in 0..1000 {
        let req = serde_json::from_value(json!({"name": format!("batch-{}", i % 2), "tasks": [
            {"key": "only", "runtime": "exec", "bundle": "x", "max_attempts": 1}]}))
        .unwrap();
        let job = dispatcher::domain::new_job(req, &app.settings).unwrap();
        app.store
            .submit_job(app.org_id, Some(app.user_id), &job)
            .await
            .unwrap();
    }
    // A job that must not be touched: running, same prefix.
    let untouched = app
        .submit(&json!({"name": "batch-x", "tasks": [
            {"key": "only", "runtime": "exec", "bundle": "x", "depends_on": []}]}))
        .await;
    let first = claim_all(&app).await;
    assert_eq!(first.len(), 1001);
    let failing: Vec<_> = first
        .into_iter()
        .filter(|(t, _, _)| *t != untouched.tasks[0].task_id)
        .collect();
    fail_all(&app, &failing).await;

    let ask = |dry_run: bool| {
        json!({"action": "retry", "dry_run": dry_run,
                                     "filter": {"name_prefix": "batch-"}})
    };
    let r = app
        .post("/v1/job-actions", &app.user_token, &ask(true))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(
        (
            &r.body["jobs"],
            &r.body["tasks"],
            &r.body["capped"],
            &r.body["action_id"]
        ),
        (&json!(1000), &json!(1000), &json!(false), &Value::Null)
    );
    let r = app
        .get("/v1/jobs?state=failed&limit=1", &app.user_token)
        .await;
    assert_eq!(
        r.body["jobs"].as_array().unwrap().len(),
        1,
        "a dry run changes nothing"
    );

    let r = app
        .post("/v1/job-actions", &app.user_token, &ask(false))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(
        (&r.body["jobs"], &r.body["tasks"]),
        (&json!(1000), &json!(1000))
    );
    let action_id = r.body["action_id"].clone();
    assert!(action_id.is_string(), "{}", r.body);

    // Every one runs again exactly once: 1 000 distinct claims at attempt 2.
    let second = claim_all(&app).await;
    let mut ids: Vec<Uuid> = second.iter().map(|(t, _, _)| *t).collect();
    ids.sort();
    ids.dedup();
    assert_eq!((second.len(), ids.len()), (1000, 1000));
    assert!(second.iter().all(|(_, attempt, _)| *attempt == 2));
    let failed: std::collections::HashSet<Uuid> = failing.iter().map(|(t, _, _)| *t).collect();
    assert!(ids.iter().all(|t| failed.contains(t)));

    let r = app.get("/v1/job-actions", &app.user_token).await;
    let record = &r.body["actions"][0];
    assert_eq!(record["action_id"], action_id);
    assert_eq!(record["action"], "retry");
    assert_eq!(
        record["target"],
        json!({"filter": {"name_prefix": "batch-"}})
    );
    assert_eq!(
        (&record["jobs"], &record["tasks"]),
        (&json!(1000), &json!(1000))
    );

    // Bulk cancel by the same filters.
    let r = app
        .post(
            "/v1/job-actions",
            &app.user_token,
            &json!({"action": "cancel", "filter": {"name_prefix": "batch-1"}}),
        )
        .await;
    assert_eq!(
        (&r.body["jobs"], &r.body["tasks"]),
        (&json!(500), &json!(500)),
        "{}",
        r.body
    );
    let r = app
        .get(
            "/v1/jobs?state=cancelled&name_prefix=batch-&limit=100",
            &app.user_token,
        )
        .await;
    assert!(r.body["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .all(|j| j["name"] == "batch-1"));
    // Bad input changes nothing.
    let r = app
        .post(
            "/v1/job-actions",
            &app.user_token,
            &json!({"action": "retry", "filter": {"limit": 5}}),
        )
        .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::BAD_REQUEST, "invalid_request")
    );
}

#[tokio::test]
async fn a_paused_runtime_keeps_its_tasks_ready_and_unclaimed_in_its_org_only_and_resume_claims_them(
) {
    let app = TestApp::spawn_with(unthrottled()).await;
    let job = app
        .submit(&json!({"name": "paused", "tasks": [
            {"key": "running", "runtime": "exec", "bundle": "x"},
            {"key": "a", "runtime": "exec", "bundle": "x"},
            {"key": "b", "runtime": "exec", "bundle": "x"}]}))
        .await;
    let id = |key: &str| job.tasks.iter().find(|t| t.key == key).unwrap().task_id;
    let running = app.claim(id("running")).await;

    let r = app.put_json("/v1/pauses/exec", &app.user_token).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["paused"][0]["runtime"], "exec");
    assert_eq!(r.body["paused"][0]["ready_tasks"], 2);
    // Another org's exec work is not paused.
    let other = other_org_admin(&app).await;
    let r = app
        .post(
            "/v1/jobs",
            &other,
            &json!({"name": "theirs", "tasks": [
            {"key": "t", "runtime": "exec", "bundle": "x"}]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let theirs: Uuid = serde_json::from_value(r.body["tasks"][0]["task_id"].clone()).unwrap();

    // For as long as the pause lasts, neither a wake-up's claim nor a
    // claim of ready work takes ours.
    for _ in 0..3 {
        let r = app.try_claim(id("a"), "w").await;
        assert_eq!(
            (r.status, r.code()),
            (StatusCode::CONFLICT, "not_claimable"),
            "{}",
            r.body
        );
        assert!(
            r.body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("paused"),
            "{}",
            r.body
        );
        let claimed = claim_all(&app).await;
        assert!(claimed.iter().all(|(t, _, _)| *t == theirs), "{claimed:?}");
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
    // The running task finishes.
    let r = app
        .post("/v1/task/heartbeat", &running.capability_token, &json!({}))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let r = app.complete_ok(&running.capability_token, json!({})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    // Visible in the listing; the tasks wait ready.
    let r = app.get("/v1/jobs", &app.user_token).await;
    assert_eq!(r.body["paused_runtimes"], json!(["exec"]));
    assert_eq!(r.body["jobs"][0]["tasks"]["ready"], 2, "{}", r.body);
    let r = app.get("/v1/jobs", &other).await;
    assert_eq!(r.body["paused_runtimes"], json!([]));

    let r = app.delete("/v1/pauses/exec", &app.user_token).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["paused"], json!([]));
    let claimed: Vec<Uuid> = claim_all(&app)
        .await
        .into_iter()
        .map(|(t, _, _)| t)
        .collect();
    let mut want = vec![id("a"), id("b")];
    want.sort();
    let mut got = claimed.clone();
    got.sort();
    assert_eq!(got, want);
    let r = app.delete("/v1/pauses/exec", &app.user_token).await;
    assert_eq!((r.status, r.code()), (StatusCode::NOT_FOUND, "not_found"));
    let r = app.put_json("/v1/pauses/cobol", &app.user_token).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::BAD_REQUEST, "invalid_request")
    );
}

/// Runs the `dispatcher` binary against the app with `token` (without
/// blocking the runtime that serves the app); its exit status, stdout and
/// stderr.
async fn cli(app: &TestApp, token: &str, args: &[&str]) -> (bool, String, String) {
    let out = tokio::process::Command::new(dispatcher_tests::stack::binary("dispatcher"))
        .args(args)
        .env("DISPATCHER_URL", format!("http://{}", app.addr))
        .env("DISPATCHER_TOKEN", token)
        .env_remove("DISPATCHER_ORG")
        .output()
        .await
        .expect("the dispatcher binary runs (cargo build --workspace --bins)");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn the_cli_lists_shows_retries_and_pauses_through_the_api_with_a_user_token() {
    let app = TestApp::spawn_with(unthrottled()).await;
    let job = app
        .submit(&json!({"name": "cli-job", "tasks": [
            {"key": "load", "runtime": "exec", "bundle": "x", "max_attempts": 1}]}))
        .await;
    let c = app.claim(job.tasks[0].task_id).await;
    let r = app
        .upload_log(
            &c.capability_token,
            json!({"log": "writing /data/out\nENOSPC\n"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    app.complete_failed(&c.capability_token, "disk full", false)
        .await;
    let token = app.user_token.clone();
    let job_id = job.job_id.to_string();

    let (ok, out, err) = cli(&app, &token, &["jobs", "list", "--json"]).await;
    assert!(ok, "{err}");
    let listed: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(listed["jobs"][0]["job_id"], json!(job.job_id), "{out}");
    let (ok, out, err) = cli(&app, &token, &["jobs", "list", "--state", "failed"]).await;
    assert!(
        ok && out.contains(&job_id) && out.contains("failed"),
        "{out}{err}"
    );

    let (ok, out, err) = cli(&app, &token, &["tasks", "show", &job_id, "load"]).await;
    assert!(ok && out.contains("task_failed: disk full"), "{out}{err}");
    assert!(out.contains("log 25 bytes"), "{out}");
    // The newest attempt's log, as it was printed.
    let (ok, out, err) = cli(&app, &token, &["tasks", "logs", &job_id, "load"]).await;
    assert!(ok, "{err}");
    assert_eq!(out, "writing /data/out\nENOSPC\n");
    let (ok, _, err) = cli(
        &app,
        &token,
        &["tasks", "logs", &job_id, "load", "--attempt", "2"],
    )
    .await;
    assert!(
        !ok && err.contains("404") && err.contains("no attempt 2"),
        "{err}"
    );
    let (ok, out, _) = cli(&app, &token, &["tasks", "show", &job_id, "load", "--json"]).await;
    assert!(ok);
    let detail: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(detail["attempts"][0]["error"]["message"], "disk full");

    let (ok, out, err) = cli(
        &app,
        &token,
        &["jobs", "bulk", "retry", "--state", "failed", "--dry-run"],
    )
    .await;
    assert!(ok && out.contains("1 jobs, 1 tasks"), "{out}{err}");
    assert!(
        err.contains("would act on 1 jobs"),
        "a progress line: {err}"
    );
    let (ok, out, err) = cli(&app, &token, &["jobs", "retry", &job_id]).await;
    assert!(ok && out.contains("running"), "{out}{err}");

    let (ok, out, err) = cli(&app, &token, &["pause", "exec"]).await;
    assert!(
        ok && out.contains("exec") && out.contains("1 tasks waiting"),
        "{out}{err}"
    );
    let (ok, out, _) = cli(&app, &token, &["pauses", "--json"]).await;
    assert!(ok && out.contains("\"exec\""), "{out}");
    let (ok, out, err) = cli(&app, &token, &["resume", "exec"]).await;
    assert!(ok && out.contains("no runtime is paused"), "{out}{err}");

    // A viewer reads but does not act; the refusal is an error exit.
    let viewer = app.store.ensure_user("viewer@acme.test").await.unwrap();
    app.store
        .set_membership(app.org_id, viewer, Role::Viewer)
        .await
        .unwrap();
    let viewer = app
        .keys
        .mint_user(viewer, app.org_id, Utc::now() + chrono::Duration::hours(1));
    let (ok, _, err) = cli(&app, &viewer, &["jobs", "cancel", &job_id]).await;
    assert!(!ok && err.contains("403"), "{err}");
    let (ok, out, _) = cli(&app, &viewer, &["jobs", "actions"]).await;
    assert!(ok && out.contains("retry"), "{out}");
}

#[tokio::test]
async fn the_pruner_deletes_exactly_the_finished_jobs_older_than_the_retention_with_their_logs_and_nothing_running(
) {
    let settings = dispatcher::settings::Settings {
        job_retention: std::time::Duration::from_secs(3600),
        job_prune_batch: 7,
        job_prune_pause: std::time::Duration::from_millis(1),
        ..unthrottled()
    };
    let app = TestApp::spawn_with(settings).await;
    let pool = &app.db.pool;
    let one = |name: &str| {
        json!({"name": name, "tasks": [
        {"key": "a", "runtime": "exec", "bundle": "x", "max_attempts": 1},
        {"key": "b", "runtime": "exec", "bundle": "x", "depends_on": ["a"]}]})
    };
    // 20 finished two hours ago (half succeeded, half failed), with events.
    let mut old = Vec::new();
    for i in 0..20 {
        let job = app.submit(&one(&format!("old-{i}"))).await;
        let a = app.claim(job.tasks[0].task_id).await;
        app.post(
            "/v1/task/events",
            &a.capability_token,
            &json!({"events": [{"seq": 0, "kind": "k", "payload": {}}]}),
        )
        .await;
        let r = app
            .upload_log(
                &a.capability_token,
                json!({"log": format!("old job {i} printed this\n")}),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        if i % 2 == 0 {
            app.complete_ok(&a.capability_token, json!({})).await;
            app.run_ok(job.tasks[1].task_id).await;
        } else {
            app.complete_failed(&a.capability_token, "no", false).await;
        }
        old.push(job.job_id);
    }
    // Kept: one finished a minute ago, one running for two hours, and one
    // finished two hours ago whose buffer batch the sink has not ingested.
    let recent = app.submit(&one("recent")).await;
    app.run_ok(recent.tasks[0].task_id).await;
    app.run_ok(recent.tasks[1].task_id).await;
    let running = app.submit(&one("running")).await;
    let pending = app.submit(&one("pending")).await;
    let p = app.claim(pending.tasks[0].task_id).await;
    app.complete_failed(&p.capability_token, "no", false).await;
    sqlx::query(
        "INSERT INTO buffer_publishes (batch_id, org_id, task_id, attempt, dataset, object_key, rows, sha256)
         VALUES (gen_random_uuid(), $1, $2, 1, 'events', 'k', 1, repeat('a', 64))",
    )
    .bind(app.org_id)
    .bind(pending.tasks[0].task_id)
    .execute(pool)
    .await
    .unwrap();
    let mut backdated = old.clone();
    backdated.push(pending.job_id);
    sqlx::query(
        "UPDATE jobs SET created_at = now() - interval '3 hours',
                         finished_at = now() - interval '2 hours' WHERE id = ANY($1)",
    )
    .bind(&backdated)
    .execute(pool)
    .await
    .unwrap();
    sqlx::query("UPDATE jobs SET created_at = now() - interval '2 hours' WHERE id = $1")
        .bind(running.job_id)
        .execute(pool)
        .await
        .unwrap();
    let finished: i64 =
        sqlx::query_scalar("SELECT count(*) FROM jobs WHERE id = ANY($1) AND state <> 'running'")
            .bind(&old)
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(finished, 20);

    let logs_of = |org: Uuid| format!("orgs/{org}/logs/");
    assert_eq!(
        app.objects.list(&logs_of(app.org_id)).await.unwrap().len(),
        20
    );
    let pruner = dispatcher::roles::pruner::Pruner::new(
        app.store.clone(),
        app.objects.clone(),
        app.settings.clone(),
    );
    let deleted = pruner
        .prune_once(&tokio_util::sync::CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(
        deleted,
        dispatcher::roles::pruner::Pruned {
            jobs: 20,
            objects: 20
        },
        "in batches of 7, with the pruned attempts' logs"
    );
    assert!(
        app.objects
            .list(&logs_of(app.org_id))
            .await
            .unwrap()
            .is_empty(),
        "the pruned jobs' logs are gone from the object store"
    );
    let queued: i64 = sqlx::query_scalar("SELECT count(*) FROM object_deletions")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(queued, 0, "the deletion queue is drained");
    let mut left: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM jobs")
        .fetch_all(pool)
        .await
        .unwrap();
    left.sort();
    let mut want = vec![recent.job_id, running.job_id, pending.job_id];
    want.sort();
    assert_eq!(left, want);
    for table in ["tasks", "task_specs", "attempts", "task_events"] {
        let n: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM {table} x WHERE NOT EXISTS (SELECT 1 FROM tasks t WHERE t.id = x.{})",
            if table == "tasks" { "id" } else { "task_id" }
        ))
        .fetch_one(pool)
        .await
        .unwrap();
        assert_eq!(n, 0, "{table} rows of pruned tasks");
    }
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM task_events")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(
        events, 0,
        "the pruned jobs' events are gone (the kept jobs emitted none)"
    );
    assert_eq!(
        pruner
            .prune_once(&tokio_util::sync::CancellationToken::new())
            .await
            .unwrap(),
        dispatcher::roles::pruner::Pruned::default(),
        "a second pass finds nothing"
    );
    // What is kept is still readable.
    let r = app
        .get(
            &format!("/v1/jobs/{}/tasks/a", recent.job_id),
            &app.user_token,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = app
        .get(&format!("/v1/jobs/{}", old[0]), &app.user_token)
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn an_attempts_log_is_stored_bounded_and_redacted_and_served_to_its_org_only() {
    let settings = dispatcher::settings::Settings {
        max_log_bytes: 4096,
        ..unthrottled()
    };
    let app = TestApp::spawn_with(settings).await;
    let job = app
        .submit(&json!({"name": "logged", "tasks": [
            {"key": "a", "runtime": "exec", "bundle": "x", "max_attempts": 3}]}))
        .await;
    let task = job.tasks[0].task_id;
    let logs = |n: u32| format!("/v1/jobs/{}/tasks/a/attempts/{n}/logs", job.job_id);
    let first = app.claim(task).await;
    // Running and silent so far: no log yet.
    let r = app.get(&logs(1), &app.user_token).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);
    // The task's own code holds only its token: it cannot write its log,
    // with the token as the bearer nor on the old task route.
    let forged = json!({"capability_token": first.capability_token, "log": "all fine\n"});
    let r = app
        .post("/internal/task-logs", &first.capability_token, &forged)
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.body);
    let r = app
        .post(
            "/v1/task/logs",
            &first.capability_token,
            &json!({"log": "all fine\n"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);
    let r = app.get(&logs(1), &app.user_token).await;
    assert_eq!(
        r.status,
        StatusCode::NOT_FOUND,
        "nothing stored: {}",
        r.body
    );
    let printed = format!(
        "starting\nmy token is {}\nGET http://x/objects/k?method=GET&expires=1&sig=abcdef0123\n\
         [... 900 bytes dropped ...]\ndone\n",
        first.capability_token
    );
    let r = app
        .upload_log(
            &first.capability_token,
            json!({"log": printed, "dropped_bytes": 900}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["redactions"], 2, "{}", r.body);
    assert_eq!(r.body["dropped_bytes"], 900);
    // Too big: refused, and the stored log is unchanged.
    let r = app
        .upload_log(&first.capability_token, json!({"log": "x".repeat(4097)}))
        .await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", r.body);
    app.complete_failed(&first.capability_token, "boom", true)
        .await;

    let r = app.get(&logs(1), &app.user_token).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let text = r.body["log"].as_str().unwrap().to_owned();
    assert!(
        text.starts_with("starting\nmy token is [REDACTED]\n"),
        "{text}"
    );
    assert!(
        text.contains("sig=[REDACTED]") && text.ends_with("done\n"),
        "{text}"
    );
    assert!(!text.contains(first.capability_token.as_str()) && !text.contains("abcdef0123"));
    assert_eq!(r.body["dropped_bytes"], 900);
    assert_eq!(r.body["bytes"], text.len());
    // The task's detail says which attempts have a log, and how big.
    let detail = app
        .get(&format!("/v1/jobs/{}/tasks/a", job.job_id), &app.user_token)
        .await;
    assert_eq!(
        detail.body["attempts"][0]["log"],
        json!({"bytes": text.len(), "dropped_bytes": 900})
    );

    // A superseded attempt's upload is fenced and changes nothing.
    app.skip_backoff(task).await;
    let second = app.claim(task).await;
    let r = app
        .upload_log(&first.capability_token, json!({"log": "zombie\n"}))
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    assert_eq!(r.code(), "stale_attempt");
    let again = app.get(&logs(1), &app.user_token).await;
    assert_eq!(again.body["log"], text);
    let r = app.get(&logs(2), &app.user_token).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "no log for attempt 2 yet");
    // An upload again replaces the attempt's log.
    for body in ["one\n", "two\n"] {
        let r = app
            .upload_log(&second.capability_token, json!({"log": body}))
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    }
    let r = app.get(&logs(2), &app.user_token).await;
    assert_eq!(r.body["log"], "two\n");

    // Bad attempt numbers, unknown tasks, and another org: clear errors.
    for (path, status) in [
        (
            format!("/v1/jobs/{}/tasks/a/attempts/0/logs", job.job_id),
            StatusCode::BAD_REQUEST,
        ),
        (
            format!("/v1/jobs/{}/tasks/a/attempts/x/logs", job.job_id),
            StatusCode::BAD_REQUEST,
        ),
        (logs(9), StatusCode::NOT_FOUND),
        (
            format!("/v1/jobs/{}/tasks/zz/attempts/1/logs", job.job_id),
            StatusCode::NOT_FOUND,
        ),
    ] {
        let r = app.get(&path, &app.user_token).await;
        assert_eq!(r.status, status, "{path}: {}", r.body);
    }
    let other = app.store.ensure_org("globex").await.unwrap();
    let stranger = app.store.ensure_user("admin@globex.test").await.unwrap();
    app.store
        .set_membership(other, stranger, Role::Admin)
        .await
        .unwrap();
    let stranger = app
        .keys
        .mint_user(stranger, other, Utc::now() + chrono::Duration::hours(1));
    let r = app.get(&logs(1), &stranger).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);
    // The log lies outside every attempt's writable prefix.
    let key = dispatcher::services::logs::log_key(app.org_id, job.job_id, task, 1);
    assert!(!key.starts_with(&first.object_prefix) && !key.starts_with(&second.object_prefix));
}

//! Bounded everything (invariant 12, OWASP API4): request rates per
//! credential and per org, requests and long-polls at once, a request
//! timeout, events per attempt, dependencies per task, pages of tasks, and
//! authorisation before the body is even read.

use std::time::Duration;

use chrono::Utc;
use dispatcher::domain::Role;
use dispatcher::settings::{Rate, Settings};
use dispatcher_tests::{Response, TestApp};
use reqwest::StatusCode;
use serde_json::{json, Value};

const SLOW: Rate = Rate {
    per_second: 1,
    burst: 3,
};
const FAST: Rate = Rate {
    per_second: 10_000,
    burst: 10_000,
};

/// GET with the headers kept.
async fn get_with_headers(app: &TestApp, path: &str, token: &str) -> (Response, Option<u64>) {
    let resp = app
        .client
        .get(app.url(path))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    read_with_retry_after(resp).await
}

/// The answer and its `Retry-After` (seconds), if any.
async fn read_with_retry_after(resp: reqwest::Response) -> (Response, Option<u64>) {
    let retry_after = resp
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().parse().unwrap());
    (TestApp::read(resp).await, retry_after)
}

/// A second member of `org` and a user token for it.
async fn member(app: &TestApp, org: uuid::Uuid, email: &str, role: Role) -> String {
    let user = app.store.ensure_user(email).await.unwrap();
    app.store.set_membership(org, user, role).await.unwrap();
    app.keys
        .mint_user(user, org, Utc::now() + chrono::Duration::hours(1))
}

fn assert_limited(r: &Response, retry_after: Option<u64>, code: &str) {
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{}", r.body);
    assert_eq!(r.code(), code, "{}", r.body);
    assert_eq!(r.body["error"]["retryable"], true);
    assert!(
        retry_after.is_some_and(|s| s >= 1),
        "Retry-After: {retry_after:?}"
    );
}

#[tokio::test]
async fn invariant_12_a_credential_over_its_rate_gets_429_and_others_are_unaffected() {
    let app = TestApp::spawn_with(Settings {
        rate_per_user: SLOW,
        rate_per_org: FAST,
        ..Settings::default()
    })
    .await;
    let job = app
        .submit(&json!({"name": "j", "tasks": [{"key": "a", "runtime": "exec", "bundle": "x"}]}))
        .await; // the first of the burst of 3
    let path = format!("/v1/jobs/{}", job.job_id);
    for _ in 0..2 {
        let (r, _) = get_with_headers(&app, &path, &app.user_token).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    }
    let (r, retry_after) = get_with_headers(&app, &path, &app.user_token).await;
    assert_limited(&r, retry_after, "rate_limited");
    // Another user of the same org and the worker credential are unaffected.
    let other = member(&app, app.org_id, "bob@acme.test", Role::Viewer).await;
    let (r, _) = get_with_headers(&app, &path, &other).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let claim = app.try_claim(job.tasks[0].task_id, "w").await;
    assert_eq!(claim.status, StatusCode::OK, "{}", claim.body);
}

#[tokio::test]
async fn invariant_12_an_org_over_its_rate_gets_429_and_other_orgs_are_unaffected() {
    let app = TestApp::spawn_with(Settings {
        rate_per_user: FAST,
        rate_per_org: SLOW,
        ..Settings::default()
    })
    .await;
    let second = member(&app, app.org_id, "bob@acme.test", Role::Member).await;
    let other_org = app.store.ensure_org("globex").await.unwrap();
    let outsider = member(&app, other_org, "hank@globex.test", Role::Member).await;
    let path = format!("/v1/jobs/{}", uuid::Uuid::now_v7());
    // Three requests of the org (404: no such job), from two users.
    for token in [&app.user_token, &second, &app.user_token] {
        let (r, _) = get_with_headers(&app, &path, token).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);
    }
    let (r, retry_after) = get_with_headers(&app, &path, &second).await;
    assert_limited(&r, retry_after, "rate_limited");
    let (r, _) = get_with_headers(&app, &path, &outsider).await;
    assert_eq!(
        r.status,
        StatusCode::NOT_FOUND,
        "another org is unaffected: {}",
        r.body
    );
}

#[tokio::test]
async fn invariant_12_an_events_flood_past_the_per_attempt_bound_is_refused_and_stores_nothing_more(
) {
    let app = TestApp::spawn_with(Settings {
        max_events_per_attempt: 5,
        max_event_bytes_per_attempt: 1_000,
        ..Settings::default()
    })
    .await;
    let task = app.single_task(3).await;
    let claim = app.claim(task).await;
    let events = |from: u64, n: u64, payload: Value| {
        json!({"events": (from..from + n)
            .map(|seq| json!({"seq": seq, "kind": "log", "payload": payload}))
            .collect::<Vec<_>>()})
    };
    let post = |body: Value| {
        let token = claim.capability_token.clone();
        let app = &app;
        async move { app.post("/v1/task/events", &token, &body).await }
    };
    let stored = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM task_events WHERE task_id = $1")
            .bind(task)
            .fetch_one(&app.db.pool)
            .await
            .unwrap()
    };
    assert_eq!(post(events(0, 3, json!({}))).await.status, StatusCode::OK);
    let r = post(events(3, 3, json!({}))).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
        "{}",
        r.body
    );
    assert_eq!(stored().await, 3, "a refused call stores nothing");
    // Replays do not count; the bound is reached exactly.
    assert_eq!(post(events(0, 3, json!({}))).await.body["duplicates"], 3);
    assert_eq!(post(events(3, 2, json!({}))).await.status, StatusCode::OK);
    assert_eq!(stored().await, 5);
    let r = post(events(5, 1, json!({}))).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(stored().await, 5);

    // The byte bound, on a fresh attempt.
    app.expire_lease(task).await;
    let claim2 = app.claim(task).await;
    let big = json!({"events": [{"seq": 0, "kind": "log", "payload": {"x": "y".repeat(2_000)}}]});
    let r = app
        .post("/v1/task/events", &claim2.capability_token, &big)
        .await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", r.body);
    assert_eq!(stored().await, 5);
}

#[tokio::test]
async fn invariant_12_long_polls_at_once_are_bounded_and_slow_requests_time_out() {
    let app = TestApp::spawn_with(Settings {
        max_concurrent_long_polls: 1,
        request_timeout: Duration::from_secs(1),
        ..Settings::default()
    })
    .await;
    let receive = |wait: u32| {
        let app = &app;
        async move {
            let resp = app
                .client
                .post(app.url("/internal/queues/wakeups/receive"))
                .bearer_auth(&app.worker_token)
                .json(&json!({"max_messages": 1, "wait_seconds": wait}))
                .send()
                .await
                .unwrap();
            read_with_retry_after(resp).await
        }
    };
    // One long-poll waits on the empty queue (and times out after the 1 s
    // request timeout); a second one is refused at once; a receive that
    // does not wait needs no long-poll slot.
    let first = receive(5);
    let others = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        (receive(5).await, receive(0).await)
    };
    let ((timed_out, _), ((second, second_retry), (quick, _))) = tokio::join!(first, others);
    assert_limited(&second, second_retry, "overloaded");
    assert_eq!(quick.status, StatusCode::OK, "{}", quick.body);
    assert_eq!(
        (timed_out.status, timed_out.code()),
        (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        "{}",
        timed_out.body
    );
}

#[tokio::test]
async fn invariant_12_requests_past_the_concurrency_bound_get_429_overloaded() {
    let app = TestApp::spawn_with(Settings {
        max_concurrent_requests: 1,
        ..Settings::default()
    })
    .await;
    let body = json!({"max_messages": 1, "wait_seconds": 2});
    let hold = app.post("/internal/queues/wakeups/receive", &app.worker_token, &body);
    let probe = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        get_with_headers(&app, "/v1/jobs/x", &app.user_token).await
    };
    let (held, (refused, retry_after)) = tokio::join!(hold, probe);
    assert_eq!(held.status, StatusCode::OK, "{}", held.body);
    assert_limited(&refused, retry_after, "overloaded");
    let health = app.client.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
}

#[tokio::test]
async fn rule_authorisation_comes_before_body_validation() {
    let app = TestApp::spawn().await;
    let viewer = member(&app, app.org_id, "vic@acme.test", Role::Viewer).await;
    let outsider_org = app.store.ensure_org("globex").await.unwrap();
    let outsider_user = app.store.ensure_user("hank@globex.test").await.unwrap();
    // A token for acme held by someone who is not a member of it.
    let outsider = app.keys.mint_user(
        outsider_user,
        app.org_id,
        Utc::now() + chrono::Duration::hours(1),
    );
    let _ = outsider_org;
    let garbage = json!({"tasks": "not a list", "surprise": true});
    let r = app.post("/v1/jobs", "not-a-token", &garbage).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.body);
    let r = app.post("/v1/jobs", &outsider, &garbage).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
    let r = app.post("/v1/jobs", &viewer, &garbage).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
    let r = app.post("/v1/jobs", &app.user_token, &garbage).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
}

#[tokio::test]
async fn invariant_12_dependencies_per_task_are_bounded() {
    let app = TestApp::spawn_with(Settings {
        max_deps_per_task: 2,
        ..Settings::default()
    })
    .await;
    let task = |k: &str, deps: &[&str]| json!({"key": k, "runtime": "exec", "bundle": "x", "depends_on": deps});
    let r = app
        .post(
            "/v1/jobs",
            &app.user_token,
            &json!({"name": "j", "tasks": [task("a", &[]), task("b", &[]), task("c", &[]),
                                            task("d", &["a", "b", "c"])]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("tasks[3].depends_on"),
        "{}",
        r.body
    );
    assert_eq!(app.table_counts().await["jobs"], 0);
}

#[tokio::test]
async fn invariant_12_the_tasks_of_a_job_are_read_in_pages() {
    let app = TestApp::spawn_with(Settings {
        job_page_size: 2,
        ..Settings::default()
    })
    .await;
    let tasks: Vec<Value> = (0..5)
        .map(|i| json!({"key": format!("t{i}"), "runtime": "exec", "bundle": "x"}))
        .collect();
    let job = app.submit(&json!({"name": "j", "tasks": tasks})).await;
    assert_eq!(job.tasks.len(), 5, "submission answers every task");
    let mut seen = vec![];
    let mut after: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &after {
            Some(c) => format!("/v1/jobs/{}?after={c}", job.job_id),
            None => format!("/v1/jobs/{}", job.job_id),
        };
        let r = app.get(&path, &app.user_token).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        pages += 1;
        for t in r.body["tasks"].as_array().unwrap() {
            seen.push(t["key"].as_str().unwrap().to_owned());
        }
        match r.body["next_cursor"].as_str() {
            Some(c) => after = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, ["t0", "t1", "t2", "t3", "t4"]);
    for bad in ["?limit=0", "?limit=3", "?after=zz", "?after=-4", "?page=2"] {
        let r = app
            .get(&format!("/v1/jobs/{}{bad}", job.job_id), &app.user_token)
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}: {}", r.body);
        assert_eq!(r.code(), "invalid_request");
    }
}

//! The access matrix, generated from the router's own route list
//! (`dispatcher::http::ROUTES`): every user endpoint × {admin, member,
//! viewer of the org; a user of no membership; another org's admin} gets
//! the documented status, and every worker or task endpoint refuses a user
//! token. A route added to the table without a fixture here fails the
//! test, so no endpoint escapes it.

use chrono::Utc;
use dispatcher::domain::Role;
use dispatcher::http::{Access, RouteSpec, ROUTES};
use dispatcher_tests::{unthrottled, TestApp};
use reqwest::StatusCode;
use serde_json::{json, Value};
use sha2::Digest;
use uuid::Uuid;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Caller {
    Admin,
    Member,
    Viewer,
    Outsider,
    OtherOrgAdmin,
}

struct World {
    app: TestApp,
    tokens: Vec<(Caller, String)>,
    job: Uuid,
    batch: Uuid,
    /// One of the org's bundles.
    bundle: String,
    /// An alert event of the org with a delivery.
    event: String,
}

/// A request body: JSON, or raw bytes (a bundle archive).
enum Body {
    Json(Value),
    Raw(Vec<u8>),
}

fn j(v: Value) -> Option<Body> {
    Some(Body::Json(v))
}

async fn world() -> World {
    let app = TestApp::spawn_with(unthrottled()).await;
    let exp = Utc::now() + chrono::Duration::hours(1);
    let org = app.org_id;
    let other = app.store.ensure_org("globex").await.unwrap();
    let mut tokens = Vec::new();
    for (caller, email, org_of_token, membership) in [
        (
            Caller::Admin,
            "admin@acme.test",
            org,
            Some((org, Role::Admin)),
        ),
        (
            Caller::Member,
            "member@acme.test",
            org,
            Some((org, Role::Member)),
        ),
        (
            Caller::Viewer,
            "viewer@acme.test",
            org,
            Some((org, Role::Viewer)),
        ),
        (Caller::Outsider, "outsider@nowhere.test", org, None),
        (
            Caller::OtherOrgAdmin,
            "admin@globex.test",
            other,
            Some((other, Role::Admin)),
        ),
    ] {
        let user = app.store.ensure_user(email).await.unwrap();
        if let Some((o, role)) = membership {
            app.store.set_membership(o, user, role).await.unwrap();
        }
        tokens.push((caller, app.keys.mint_user(user, org_of_token, exp)));
    }
    // The org's resources: a job with an attempt's log, a committed version
    // of `clicks`, a batch of the stream `events`.
    app.create_dataset("clicks", "append", json!([{"name": "a", "type": "string"}]))
        .await;
    app.create_dataset("events", "stream", json!([{"name": "a", "type": "string"}]))
        .await;
    let job = app
        .submit(
            &json!({"name": "j", "tasks": [{"key": "w", "runtime": "exec", "bundle": "x",
                                                 "outputs": ["clicks", "events"]}]}),
        )
        .await;
    let claim = app.claim(job.tasks[0].task_id).await;
    let body = b"{\"a\": \"x\"}\n";
    let sum = hex::encode(sha2::Sha256::digest(body));
    let key = format!("{}p.jsonl", claim.object_prefix);
    app.objects.put(&key, body.to_vec()).await.unwrap();
    let r = app
        .post(
            "/v1/task/dataset-stage",
            &claim.capability_token,
            &json!({"dataset": "clicks", "parts": [{"key": key, "rows": 1, "bytes": body.len(), "sha256": sum}]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let batch = Uuid::new_v4();
    let r = app
        .post(
            "/v1/task/buffer-publish",
            &claim.capability_token,
            &json!({"batch_id": batch, "dataset": "events", "object_key": key, "rows": 1, "sha256": sum}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let r = app
        .upload_log(&claim.capability_token, json!({"log": "hello\n"}))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(
        app.complete_ok(&claim.capability_token, json!({}))
            .await
            .status,
        StatusCode::OK
    );
    let r = app
        .client
        .post(app.url("/v1/bundles"))
        .bearer_auth(&app.user_token)
        .body(dispatcher_tests::bundle_archive("python", 0))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let bundle = r.json::<Value>().await.unwrap()["digest"]
        .as_str()
        .unwrap()
        .to_owned();
    // Alerts: a destination `ops`, and an event of `events` delivered to it.
    let dest = app
        .store
        .create_alert_destination(
            app.org_id,
            "ops",
            "http://example.com/hook",
            &dispatcher::services::alerts::new_secret(),
        )
        .await
        .unwrap();
    let (events_id, _, _, _) = app
        .store
        .dataset_for_query(app.org_id, "events")
        .await
        .unwrap();
    let route = app
        .store
        .create_alert_route(app.org_id, "all", events_id, "ops", None)
        .await
        .unwrap();
    let event = format!("{batch}-1");
    sqlx::query(
        "INSERT INTO alert_deliveries (id, org_id, event_id, dataset_id, route_id, destination_id, payload)
         VALUES ($1, $2, $3, $4, $5, $6, '{}')",
    )
    .bind(Uuid::new_v4())
    .bind(app.org_id)
    .bind(&event)
    .bind(events_id)
    .bind(route)
    .bind(dest.id)
    .execute(&app.db.data().await)
    .await
    .unwrap();
    World {
        app,
        tokens,
        job: job.job_id,
        batch,
        bundle,
        event,
    }
}

/// A request of one route for one call: the concrete path, the body, and
/// whether it names a resource of the org (which another org must not
/// see: `404`). Mutating routes get fresh resources each call.
async fn request(w: &World, spec: &RouteSpec, n: usize) -> (String, Option<Body>, bool) {
    let app = &w.app;
    match (spec.method, spec.path) {
        ("POST", "/v1/jobs") => (
            spec.path.into(),
            j(json!({"name": "m", "tasks": [{"key": "a", "runtime": "exec", "bundle": "x"}]})),
            false,
        ),
        ("GET", "/v1/jobs") => (spec.path.into(), None, false),
        ("GET", "/v1/jobs/{job_id}") => (format!("/v1/jobs/{}", w.job), None, true),
        ("GET", "/v1/jobs/{job_id}/tasks/{key}") => (format!("/v1/jobs/{}/tasks/w", w.job), None, true),
        ("GET", "/v1/jobs/{job_id}/tasks/{key}/events") => {
            (format!("/v1/jobs/{}/tasks/w/events", w.job), None, true)
        }
        ("GET", "/v1/jobs/{job_id}/tasks/{key}/attempts/{attempt}/logs") => {
            (format!("/v1/jobs/{}/tasks/w/attempts/1/logs", w.job), None, true)
        }
        ("POST", "/v1/jobs/{job_id}/cancel") => {
            let fresh = app
                .submit(&json!({"name": "c", "tasks": [{"key": "a", "runtime": "exec", "bundle": "x"}]}))
                .await;
            (format!("/v1/jobs/{}/cancel", fresh.job_id), j(json!({})), true)
        }
        ("POST", "/v1/jobs/{job_id}/retry") | ("POST", "/v1/jobs/{job_id}/tasks/{key}/retry") => {
            // A job of its own per call, failed, so each allowed retry
            // succeeds.
            let fresh = app
                .submit(&json!({"name": "r", "tasks": [{"key": "a", "runtime": "exec", "bundle": "x", "max_attempts": 1}]}))
                .await;
            let c = app.claim(fresh.tasks[0].task_id).await;
            app.complete_failed(&c.capability_token, "no", false).await;
            let path = if spec.path.contains("/tasks/") {
                format!("/v1/jobs/{}/tasks/a/retry", fresh.job_id)
            } else {
                format!("/v1/jobs/{}/retry", fresh.job_id)
            };
            (path, j(json!({})), true)
        }
        ("POST", "/v1/job-actions") => (
            spec.path.into(),
            j(json!({"action": "retry", "dry_run": true, "filter": {"state": "failed"}})),
            false,
        ),
        ("GET", "/v1/job-actions") => (spec.path.into(), None, false),
        ("GET", "/v1/pauses") => (spec.path.into(), None, false),
        ("PUT", "/v1/pauses/{runtime}") => ("/v1/pauses/python".into(), j(json!({})), false),
        ("DELETE", "/v1/pauses/{runtime}") => {
            // Paused anew for each call, so each allowed resume finds it.
            app.store.pause(app.org_id, dispatcher_wire::Runtime::Node, None).await.unwrap();
            ("/v1/pauses/node".into(), None, true)
        }
        ("POST", "/v1/datasets") => (
            spec.path.into(),
            j(json!({"name": format!("d{n}"), "mode": "append", "columns": [{"name": "a", "type": "string"}]})),
            false,
        ),
        ("GET", "/v1/datasets") => (spec.path.into(), None, false),
        ("GET", "/v1/datasets/{name}") => ("/v1/datasets/clicks".into(), None, true),
        ("GET", "/v1/datasets/{name}/versions/{version}") => {
            ("/v1/datasets/clicks/versions/1".into(), None, true)
        }
        ("GET", "/v1/datasets/{name}/batches/{batch_id}") => {
            (format!("/v1/datasets/events/batches/{}", w.batch), None, true)
        }
        ("POST", "/v1/query") => (spec.path.into(), j(json!({"dataset": "clicks"})), true),
        ("POST", "/v1/bundles") => (
            spec.path.into(),
            Some(Body::Raw(dispatcher_tests::bundle_archive("node", n))),
            false,
        ),
        ("GET", "/v1/bundles/{bundle}") => (format!("/v1/bundles/{}", w.bundle), None, true),
        ("PUT", "/v1/bundles/tags/{tag}") => (
            format!("/v1/bundles/tags/t{n}"),
            j(json!({"digest": w.bundle})),
            true,
        ),
        ("POST", "/v1/alerts/destinations") => (
            spec.path.into(),
            j(json!({"name": format!("d{n}"), "url": "https://example.com/hook"})),
            false,
        ),
        ("GET", "/v1/alerts/destinations") => (spec.path.into(), None, false),
        ("POST", "/v1/alerts/routes") => (
            spec.path.into(),
            j(json!({"name": format!("r{n}"), "dataset": "events", "destination": "ops"})),
            true,
        ),
        ("GET", "/v1/alerts/routes") => (spec.path.into(), None, false),
        ("DELETE", "/v1/alerts/routes/{route_id}") => {
            let (events_id, _, _, _) = app.store.dataset_for_query(app.org_id, "events").await.unwrap();
            let route = app
                .store
                .create_alert_route(app.org_id, &format!("del{n}"), events_id, "ops", None)
                .await
                .unwrap();
            (format!("/v1/alerts/routes/{route}"), None, true)
        }
        ("GET", "/v1/alerts/events/{event_id}") => (format!("/v1/alerts/events/{}", w.event), None, true),
        ("POST", "/v1/orgs") => (spec.path.into(), j(json!({"name": format!("org-{n}")})), false),
        ("GET", "/v1/org/members") => (spec.path.into(), None, false),
        ("PUT", "/v1/org/members") => (
            spec.path.into(),
            j(json!({"email": format!("new{n}@acme.test"), "role": "viewer"})),
            false,
        ),
        ("DELETE", "/v1/org/members/{user_id}") => {
            let fresh = app
                .store
                .ensure_user(&format!("leaving{n}@acme.test"))
                .await
                .unwrap();
            app.store
                .set_membership(app.org_id, fresh, Role::Viewer)
                .await
                .unwrap();
            (format!("/v1/org/members/{fresh}"), None, true)
        }
        (method, path) => panic!(
            "no fixture for {method} {path}: add one to tests/tests/it/access.rs with its expected access"
        ),
    }
}

async fn call(
    app: &TestApp,
    method: &str,
    path: &str,
    token: &str,
    body: Option<Body>,
) -> (StatusCode, Value) {
    let method: reqwest::Method = method.parse().unwrap();
    let mut req = app.client.request(method, app.url(path)).bearer_auth(token);
    match body {
        Some(Body::Json(b)) => req = req.json(&b),
        Some(Body::Raw(b)) => req = req.body(b),
        None => {}
    }
    let resp = req.send().await.unwrap();
    let status = resp.status();
    (status, resp.json().await.unwrap_or(Value::Null))
}

fn role_of(c: Caller) -> Option<Role> {
    match c {
        Caller::Admin | Caller::OtherOrgAdmin => Some(Role::Admin),
        Caller::Member => Some(Role::Member),
        Caller::Viewer => Some(Role::Viewer),
        Caller::Outsider => None,
    }
}

#[tokio::test]
async fn every_user_endpoint_answers_each_caller_as_documented_and_no_other_org_sees_a_resource() {
    let w = world().await;
    let mut n = 0;
    let mut checked = 0;
    for spec in ROUTES {
        let user_route = matches!(spec.access, Access::User { .. } | Access::SignedIn);
        if !user_route {
            // Worker, task and public routes: a user token is no key.
            let path = spec.path.replace("{queue}", "wakeups");
            let (s, answer) =
                call(&w.app, spec.method, &path, &w.app.user_token, j(json!({}))).await;
            match spec.access {
                Access::Public => assert!(s.is_success(), "{} {}: {s}", spec.method, spec.path),
                _ => assert_eq!(
                    s,
                    StatusCode::UNAUTHORIZED,
                    "{} {}: {answer}",
                    spec.method,
                    spec.path
                ),
            }
            continue;
        }
        for (caller, token) in &w.tokens {
            n += 1;
            let (path, body, names_resource) = request(&w, spec, n).await;
            let (s, answer) = call(&w.app, spec.method, &path, token, body).await;
            let what = format!("{} {} as {caller:?}: {s} {answer}", spec.method, path);
            match spec.access {
                Access::SignedIn => assert!(s.is_success(), "{what}"),
                Access::User { min_role, .. } => match caller {
                    Caller::Outsider => assert_eq!(s, StatusCode::FORBIDDEN, "{what}"),
                    Caller::OtherOrgAdmin if names_resource => {
                        assert_eq!(s, StatusCode::NOT_FOUND, "{what}")
                    }
                    c if role_of(*c).is_some_and(|r| r >= min_role) => {
                        assert!(s.is_success(), "{what}")
                    }
                    _ => assert_eq!(s, StatusCode::FORBIDDEN, "{what}"),
                },
                _ => unreachable!(),
            }
            checked += 1;
        }
    }
    assert!(checked >= 5 * 13, "only {checked} calls checked");
}

/// Issue 25: a task's detail names the dataset version it committed and
/// the buffer batch it published (the world's task `w` did both).
#[tokio::test]
async fn a_tasks_detail_names_the_dataset_versions_and_buffer_batches_it_produced() {
    let w = world().await;
    let (s, answer) = call(
        &w.app,
        "GET",
        &format!("/v1/jobs/{}/tasks/w", w.job),
        &w.app.user_token,
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{answer}");
    let attempts = answer["attempts"].as_array().unwrap();
    let produced: Vec<(&Value, &Value)> = attempts
        .iter()
        .map(|a| (&a["dataset_versions"], &a["buffer_batches"]))
        .collect();
    assert!(
        attempts.iter().any(|a| a["dataset_versions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["dataset"] == "clicks" && v["version"] == 1)),
        "{produced:?}"
    );
    assert!(
        attempts.iter().any(|a| a["buffer_batches"]
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b["batch_id"] == json!(w.batch) && b["dataset"] == "events")),
        "{produced:?}"
    );
}

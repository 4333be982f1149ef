//! The alert pipeline end to end against a local webhook receiver:
//! ingested events routed by their fields, delivered at least once by the
//! Standard Webhooks spec (the same `webhook-id` on every retry and replay,
//! signatures that verify, `Retry-After` honoured), dead after the last
//! try and delivered by a replay; a delivery role killed mid-delivery
//! loses nothing.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use dispatcher::domain::Role;
use dispatcher::services::alerts::{sign, AlertDelivery, AlertRouter};
use dispatcher::settings::Settings;
use dispatcher_tests::{unthrottled, TestApp};
use serde_json::{json, Value};
use uuid::Uuid;

use super::sink::{drain, fixture, Fixture};

#[derive(Debug, Clone)]
pub(super) struct Seen {
    id: String,
    timestamp: String,
    signature: String,
    body: Vec<u8>,
    status: u16,
    at: Instant,
}

#[derive(Default)]
pub(super) struct Behaviour {
    /// The first N calls fail (the first with 429 and `Retry-After: 1`).
    pub(super) fail_first: usize,
    /// Every call fails (503).
    pub(super) never: bool,
    /// The first call hangs this long before answering 200.
    pub(super) hang_first: Option<Duration>,
    pub(super) calls: usize,
    pub(super) seen: Vec<Seen>,
}

pub(super) struct Receiver {
    pub(super) url: String,
    pub(super) state: Arc<Mutex<Behaviour>>,
}

impl Receiver {
    pub(super) async fn start(b: Behaviour) -> Receiver {
        let state = Arc::new(Mutex::new(b));
        let shared = state.clone();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: HeaderMap, body: axum::body::Bytes| {
                let shared = shared.clone();
                async move {
                    let (n, hang, never, fail_first) = {
                        let mut s = shared.lock().unwrap();
                        s.calls += 1;
                        (s.calls, s.hang_first, s.never, s.fail_first)
                    };
                    let (status, retry_after) = if never {
                        (StatusCode::SERVICE_UNAVAILABLE, None)
                    } else if n <= fail_first {
                        if n == 1 {
                            (StatusCode::TOO_MANY_REQUESTS, Some("1"))
                        } else {
                            (StatusCode::INTERNAL_SERVER_ERROR, None)
                        }
                    } else {
                        (StatusCode::OK, None)
                    };
                    let h = |k: &str| {
                        headers
                            .get(k)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_owned()
                    };
                    shared.lock().unwrap().seen.push(Seen {
                        id: h("webhook-id"),
                        timestamp: h("webhook-timestamp"),
                        signature: h("webhook-signature"),
                        body: body.to_vec(),
                        status: status.as_u16(),
                        at: Instant::now(),
                    });
                    // Recorded on arrival: a caller that goes away during
                    // the hang drops this handler.
                    if n == 1 {
                        if let Some(d) = hang {
                            tokio::time::sleep(d).await;
                        }
                    }
                    let mut resp = status.into_response();
                    if let Some(r) = retry_after {
                        resp.headers_mut().insert("retry-after", r.parse().unwrap());
                    }
                    resp
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Receiver { url, state }
    }

    /// The `webhook-id` of every call, in order.
    pub(super) fn ids(&self) -> Vec<String> {
        self.seen().into_iter().map(|s| s.id).collect()
    }

    fn seen(&self) -> Vec<Seen> {
        self.state.lock().unwrap().seen.clone()
    }
}

fn settings(max_tries: u32) -> Settings {
    Settings {
        alert_allow_hosts: vec!["127.0.0.1".into()],
        alert_retry_base: Duration::from_millis(20),
        alert_retry_cap: Duration::from_secs(2),
        alert_delivery_max_tries: max_tries,
        alert_delivery_lease: Duration::from_secs(2),
        ..unthrottled()
    }
}

/// An admin's token of the app's org.
async fn admin_token(app: &TestApp) -> String {
    let admin = app.store.ensure_user("admin@acme.test").await.unwrap();
    app.store
        .set_membership(app.org_id, admin, Role::Admin)
        .await
        .unwrap();
    app.keys.mint_user(
        admin,
        app.org_id,
        chrono::Utc::now() + chrono::Duration::hours(1),
    )
}

/// A destination `ops` at the receiver and a route of `events` with
/// `value >= 10`; the destination's secret.
async fn wire_up(f: &Fixture, receiver: &Receiver) -> String {
    let admin = admin_token(&f.app).await;
    let destination = |token: &str, url: &str| {
        let body = json!({"name": "ops", "url": url});
        let token = token.to_owned();
        async move { f.app.post("/v1/alerts/destinations", &token, &body).await }
    };
    // A member may not make destinations; bad input is refused.
    let r = destination(&f.app.user_token, &receiver.url).await;
    assert_eq!(r.status, reqwest::StatusCode::FORBIDDEN);
    let r = destination(&admin, "ftp://x").await;
    assert_eq!(r.status, reqwest::StatusCode::BAD_REQUEST);
    let r = destination(&admin, &receiver.url).await;
    assert_eq!(r.status, reqwest::StatusCode::CREATED, "{}", r.body);
    let secret = r.body["secret"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("whsec_"));
    let listed = f.app.get("/v1/alerts/destinations", &admin).await;
    assert!(listed.body["destinations"][0].get("secret").is_none());
    let r = f
        .app
        .post(
            "/v1/alerts/routes",
            &admin,
            &json!({"name": "big", "dataset": "events", "destination": "ops",
                    "match": {"nope": {"eq": 1}}}),
        )
        .await;
    assert_eq!(r.status, reqwest::StatusCode::BAD_REQUEST);
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("match"),
        "{}",
        r.body
    );
    let r = f
        .app
        .post(
            "/v1/alerts/routes",
            &admin,
            &json!({"name": "big", "dataset": "events", "destination": "ops",
                    "match": {"value": {"gte": 10}}}),
        )
        .await;
    assert_eq!(r.status, reqwest::StatusCode::CREATED, "{}", r.body);
    secret
}

/// Publishes `n` events (value = 2 × i) and has the sink ingest them.
async fn events(f: &Fixture, n: usize) -> Uuid {
    let body: String = (0..n)
        .map(|i| {
            format!(
                "{{\"ts\": \"2026-11-24T00:00:{i:02}Z\", \"user_id\": \"u{i}\", \"value\": {}}}\n",
                2 * i
            )
        })
        .collect();
    let batch = f.publish_batch(body.as_bytes(), n as u64).await;
    f.relay().await;
    drain(&f.app.sink().await).await;
    assert_eq!(f.status(batch).await["status"], "ingested");
    batch
}

async fn deliveries(f: &Fixture) -> Vec<(Uuid, String, String)> {
    sqlx::query_as("SELECT id, event_id, state FROM alert_deliveries ORDER BY event_id")
        .fetch_all(&f.data)
        .await
        .unwrap()
}

/// Runs delivery passes until no delivery is pending (or `within` passes).
async fn deliver_all(f: &Fixture, within: Duration) {
    let delivery = AlertDelivery::new(f.app.store.clone(), f.data.clone(), f.app.settings.clone());
    let deadline = Instant::now() + within;
    while deliveries(f).await.iter().any(|(_, _, s)| s == "pending") {
        assert!(Instant::now() < deadline, "{:?}", deliveries(f).await);
        delivery.deliver_once().await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_every_matching_event_is_delivered_at_least_once_with_one_webhook_id_and_a_valid_signature(
) {
    let f = fixture(TestApp::spawn_with(settings(8)).await).await;
    let receiver = Receiver::start(Behaviour {
        fail_first: 3,
        ..Default::default()
    })
    .await;
    let secret = wire_up(&f, &receiver).await;
    let batch = events(&f, 10).await;

    let router = AlertRouter::new(f.app.store.clone(), f.data.clone(), f.app.settings.clone());
    assert_eq!(router.route_once().await.unwrap(), 1);
    assert_eq!(
        router.route_once().await.unwrap(),
        0,
        "a batch is routed once"
    );
    let routed = deliveries(&f).await;
    // value = 2i >= 10: i = 5..9, lines 6..10.
    let expected: Vec<String> = (6..=10).map(|l| format!("{batch}-{l}")).collect();
    let mut got: Vec<String> = routed.iter().map(|(_, e, _)| e.clone()).collect();
    got.sort();
    let mut want = expected.clone();
    want.sort();
    assert_eq!(got, want);

    deliver_all(&f, Duration::from_secs(30)).await;
    let seen = receiver.seen();
    assert_eq!(seen.len(), 5 + 3, "five deliveries and three failures");
    let ids: std::collections::BTreeSet<String> =
        routed.iter().map(|(id, _, _)| id.to_string()).collect();
    for s in &seen {
        assert!(
            ids.contains(&s.id),
            "webhook-id {} is a delivery's id",
            s.id
        );
        let ts: i64 = s.timestamp.parse().unwrap();
        assert!((chrono::Utc::now().timestamp() - ts).abs() < 60);
        assert_eq!(
            sign(&secret, &s.id, ts, &s.body).unwrap(),
            s.signature,
            "the signature verifies"
        );
        let body: Value = serde_json::from_slice(&s.body).unwrap();
        assert_eq!(body["type"], "alert.event");
        assert!(body["data"]["event"]["value"].as_f64().unwrap() >= 10.0);
        assert_eq!(body["data"]["route"], "big");
    }
    // Every failed try was retried under the same webhook-id until it
    // succeeded; each delivery succeeded once.
    for id in &ids {
        let tries: Vec<&Seen> = seen.iter().filter(|s| &s.id == id).collect();
        assert_eq!(tries.iter().filter(|s| s.status == 200).count(), 1, "{id}");
        assert_eq!(tries.last().unwrap().status, 200);
        let bodies: std::collections::BTreeSet<&Vec<u8>> = tries.iter().map(|s| &s.body).collect();
        assert_eq!(bodies.len(), 1, "every try sends the same body");
    }
    // The 429 asked for a second: the retry waited for it.
    let first = &seen[0];
    assert_eq!(first.status, 429);
    let retry = seen[1..].iter().find(|s| s.id == first.id).unwrap();
    assert!(
        retry.at - first.at >= Duration::from_millis(950),
        "{:?}",
        retry.at - first.at
    );
    // The event's delivery state through the API.
    let r = f
        .app
        .get(
            &format!("/v1/alerts/events/{}", expected[0]),
            &f.app.user_token,
        )
        .await;
    assert_eq!(r.status, reqwest::StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["deliveries"][0]["state"], "delivered");
    assert_eq!(r.body["deliveries"][0]["destination"], "ops");
    let r = f
        .app
        .get(&format!("/v1/alerts/events/{batch}-1"), &f.app.user_token)
        .await;
    assert_eq!(
        r.status,
        reqwest::StatusCode::NOT_FOUND,
        "a non-matching event has no delivery"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_a_receiver_that_never_succeeds_ends_in_the_dead_list_and_a_replay_delivers_it() {
    let f = fixture(TestApp::spawn_with(settings(3)).await).await;
    let receiver = Receiver::start(Behaviour {
        never: true,
        ..Default::default()
    })
    .await;
    wire_up(&f, &receiver).await;
    events(&f, 6).await; // one matching event: value 10
    let router = AlertRouter::new(f.app.store.clone(), f.data.clone(), f.app.settings.clone());
    router.route_once().await.unwrap();
    deliver_all(&f, Duration::from_secs(30)).await;
    let [(id, _, state)] = &deliveries(&f).await[..] else {
        panic!("one delivery")
    };
    assert_eq!(state, "dead");
    assert_eq!(receiver.seen().len(), 3, "three tries");

    // The operator's commands, as the runbook gives them.
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(dispatcher_tests::stack::binary("dispatcher"))
            .args(["admin", "alerts", "dead"])
            .args(args)
            .env("DATABASE_URL", f.app.db.url())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let listed = cli(&["list"]);
    assert!(listed.contains(&id.to_string()), "{listed}");
    assert!(listed.contains("503"), "{listed}");
    assert_eq!(
        cli(&["replay", "--dry-run"]).trim(),
        "would replay 1 dead delivery(ies)"
    );
    assert_eq!(
        deliveries(&f).await[0].2,
        "dead",
        "a dry run changes nothing"
    );
    receiver.state.lock().unwrap().never = false;
    assert_eq!(cli(&["replay"]).trim(), "replayed 1 dead delivery(ies)");
    deliver_all(&f, Duration::from_secs(30)).await;
    assert_eq!(deliveries(&f).await[0].2, "delivered");
    let seen = receiver.seen();
    assert_eq!(seen.len(), 4);
    assert!(
        seen.iter().all(|s| s.id == id.to_string()),
        "the replay kept the webhook-id"
    );
    assert!(cli(&["list"]).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_killing_the_delivery_role_mid_delivery_loses_nothing() {
    let f = fixture(TestApp::spawn_with(settings(8)).await).await;
    let receiver = Receiver::start(Behaviour {
        hang_first: Some(Duration::from_secs(5)),
        ..Default::default()
    })
    .await;
    wire_up(&f, &receiver).await;
    events(&f, 6).await;
    let router = AlertRouter::new(f.app.store.clone(), f.data.clone(), f.app.settings.clone());
    router.route_once().await.unwrap();

    // The role, running, is killed while its webhook call is in flight.
    let role = AlertDelivery::new(f.app.store.clone(), f.data.clone(), f.app.settings.clone());
    let running = tokio::spawn(role.run(tokio_util::sync::CancellationToken::new()));
    let deadline = Instant::now() + Duration::from_secs(10);
    while receiver.state.lock().unwrap().calls == 0 {
        assert!(Instant::now() < deadline, "the delivery never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    running.abort();
    let _ = running.await;
    assert_eq!(deliveries(&f).await[0].2, "pending", "nothing was recorded");

    // Another delivery role takes it once its lease (2 s) has passed.
    let other = AlertDelivery::new(f.app.store.clone(), f.data.clone(), f.app.settings.clone());
    assert_eq!(other.deliver_once().await.unwrap(), 0, "still leased");
    deliver_all(&f, Duration::from_secs(30)).await;
    let [(id, _, state)] = &deliveries(&f).await[..] else {
        panic!("one delivery")
    };
    assert_eq!(state, "delivered");
    // The receiver got the in-flight try and the redelivery, with one id
    // (at least once; its webhook-id lets it drop the duplicate).
    let seen = receiver.seen();
    assert!(seen.len() >= 2, "{seen:?}");
    assert!(seen.iter().all(|s| s.id == id.to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_a_real_dispatcher_sigkilled_mid_delivery_loses_nothing() {
    use dispatcher_tests::stack::{Stack, WorkerOpts};
    let receiver = Receiver::start(Behaviour {
        hang_first: Some(Duration::from_secs(30)),
        ..Default::default()
    })
    .await;
    let mut stack = Stack::new().await;
    for (k, v) in [
        ("DISPATCHER_ALERTS_ALLOW_HOSTS", "127.0.0.1"),
        ("DISPATCHER_ALERT_LEASE_SECONDS", "2"),
    ] {
        stack.profile_env.push((k.into(), v.into()));
    }
    // Every event of the sample stream goes to the receiver.
    route_samples_to(&stack, &receiver).await;
    stack.start_dispatcher("").await;
    let _worker = stack.start_worker(&WorkerOpts::new("alerts"));
    stack
        .submit(stack.flat_job(1, json!({"rows": 3, "events": false})))
        .await;

    // The first webhook call hangs: the dispatcher (every role) is killed
    // with it in flight.
    let deadline = Instant::now() + Duration::from_secs(30);
    while receiver.state.lock().unwrap().calls == 0 {
        assert!(Instant::now() < deadline, "no delivery started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stack.kill_dispatcher();
    stack.start_dispatcher("").await;

    let data = stack.db.data().await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let states: Vec<String> = sqlx::query_scalar("SELECT state FROM alert_deliveries")
            .fetch_all(&data)
            .await
            .unwrap();
        if states.len() == 3 && states.iter().all(|s| s == "delivered") {
            break;
        }
        assert!(Instant::now() < deadline, "deliveries: {states:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Three events, each delivered; the one in flight when the process
    // died was sent again under the same webhook-id. Delivery is at least
    // once: another call answered 200 just before the kill, but not yet
    // marked delivered, is sent again too (under load the kill can land
    // in that gap), never more than once more.
    let seen = receiver.seen();
    let ids: std::collections::BTreeSet<&str> = seen.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids.len(), 3, "{seen:?}");
    for id in &ids {
        let n = seen.iter().filter(|s| s.id == *id).count();
        assert!((1..=2).contains(&n), "{id} sent {n} times: {seen:?}");
    }
    assert_eq!(
        seen.iter().filter(|s| s.id == seen[0].id).count(),
        2,
        "the interrupted delivery was retried under its webhook-id"
    );
}

/// A destination `ops` at the receiver and a route of every event of the
/// stack's sample stream to it (before the dispatcher starts); the
/// destination's id.
pub(super) async fn route_samples_to(
    stack: &dispatcher_tests::stack::Stack,
    receiver: &Receiver,
) -> Uuid {
    let store = dispatcher::store::Store::new(stack.db.pool.clone(), Default::default());
    let destination = store
        .create_alert_destination(
            stack.org_id,
            "ops",
            &receiver.url,
            &dispatcher::services::alerts::new_secret(),
        )
        .await
        .unwrap();
    let (stream, _, _, _) = store
        .dataset_for_query(stack.org_id, "sample_events")
        .await
        .unwrap();
    store
        .create_alert_route(stack.org_id, "all", stream, "ops", None)
        .await
        .unwrap();
    destination.id
}

/// A TCP listener on loopback that counts the connections it accepts.
async fn counting_listener() -> (u16, Arc<std::sync::atomic::AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let n = accepted.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            drop(socket);
        }
    });
    (port, accepted)
}

/// One destination and one catch-all route per URL of `urls`, one event
/// routed to each, every delivery tried until it ends; (url, state,
/// last_status, last_error) per destination.
async fn deliver_to(f: &Fixture, urls: &[String]) -> Vec<(String, String, Option<i32>, String)> {
    let (stream, _, _, _) = f
        .app
        .store
        .dataset_for_query(f.app.org_id, "events")
        .await
        .unwrap();
    for (i, url) in urls.iter().enumerate() {
        f.app
            .store
            .create_alert_destination(
                f.app.org_id,
                &format!("d{i}"),
                url,
                &dispatcher::services::alerts::new_secret(),
            )
            .await
            .unwrap();
        f.app
            .store
            .create_alert_route(
                f.app.org_id,
                &format!("r{i}"),
                stream,
                &format!("d{i}"),
                None,
            )
            .await
            .unwrap();
    }
    events(f, 1).await;
    let router = AlertRouter::new(f.app.store.clone(), f.data.clone(), f.app.settings.clone());
    assert_eq!(router.route_once().await.unwrap(), 1);
    deliver_all(f, Duration::from_secs(30)).await;
    let ended: Vec<(Uuid, String, Option<i32>, String)> = sqlx::query_as(
        "SELECT destination_id, state, last_status, coalesce(last_error, '')
           FROM alert_deliveries",
    )
    .fetch_all(&f.data)
    .await
    .unwrap();
    let urls: std::collections::HashMap<Uuid, String> =
        sqlx::query_as("SELECT id, url FROM alert_destinations")
            .fetch_all(&f.app.db.pool)
            .await
            .unwrap()
            .into_iter()
            .collect();
    ended
        .into_iter()
        .map(|(d, state, status, error)| (urls[&d].clone(), state, status, error))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_a_destination_resolving_to_an_internal_address_is_never_connected_whatever_its_spelling(
) {
    // No host is allowed: the production setting.
    let f = fixture(
        TestApp::spawn_with(Settings {
            alert_allow_hosts: vec![],
            ..settings(2)
        })
        .await,
    )
    .await;
    let (port, accepted) = counting_listener().await;
    let urls: Vec<String> = [
        "127.0.0.1",
        "127.1",
        "2130706433",
        "0x7f000001",
        "[::ffff:127.0.0.1]",
        "0.0.0.0",
        "localhost",
    ]
    .iter()
    .map(|h| format!("http://{h}:{port}/hook"))
    .chain(["http://169.254.169.254/latest/meta-data/".to_owned()])
    .collect();
    let ended = deliver_to(&f, &urls).await;
    assert_eq!(ended.len(), urls.len(), "{ended:?}");
    for (url, state, status, error) in &ended {
        assert_eq!(state, "dead", "{url}: refused at once, not retried");
        assert_eq!(*status, None, "{url}");
        assert!(error.contains("internal address"), "{url}: {error}");
    }
    assert_eq!(
        accepted.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the loopback listener received nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_a_receiver_redirecting_elsewhere_is_not_followed() {
    let f = fixture(TestApp::spawn_with(settings(1)).await).await;
    let (port, accepted) = counting_listener().await;
    // An allowed receiver that answers 307 to another (allowed) address.
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move || async move {
            (
                StatusCode::TEMPORARY_REDIRECT,
                [("location", format!("http://127.0.0.1:{port}/hook"))],
            )
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let ended = deliver_to(&f, &[url]).await;
    let [(_, state, status, _)] = &ended[..] else {
        panic!("{ended:?}")
    };
    assert_eq!(state, "dead");
    assert_eq!(*status, Some(307), "the redirect is the answer");
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_a_route_receives_only_batches_ingested_after_it_was_created() {
    let f = fixture(TestApp::spawn_with(settings(2)).await).await;
    let receiver = Receiver::start(Behaviour::default()).await;
    // History before any route: never posted, not even to the first route.
    events(&f, 6).await;
    let (stream, _, _, _) = f
        .app
        .store
        .dataset_for_query(f.app.org_id, "events")
        .await
        .unwrap();
    let store = &f.app.store;
    for (name, dest) in [("first", "d1"), ("second", "d2")] {
        store
            .create_alert_destination(
                f.app.org_id,
                dest,
                &receiver.url,
                &dispatcher::services::alerts::new_secret(),
            )
            .await
            .unwrap();
        if name == "first" {
            store
                .create_alert_route(f.app.org_id, name, stream, dest, None)
                .await
                .unwrap();
        }
    }
    let router = AlertRouter::new(f.app.store.clone(), f.data.clone(), f.app.settings.clone());
    assert_eq!(
        router.route_once().await.unwrap(),
        0,
        "the history is not routed"
    );
    let after_first = events(&f, 1).await;
    store
        .create_alert_route(f.app.org_id, "second", stream, "d2", None)
        .await
        .unwrap();
    let after_second = events(&f, 1).await;
    assert_eq!(router.route_once().await.unwrap(), 2);
    let routed: Vec<(String, Uuid)> =
        sqlx::query_as("SELECT event_id, route_id FROM alert_deliveries ORDER BY event_id")
            .fetch_all(&f.data)
            .await
            .unwrap();
    let routes: std::collections::HashMap<Uuid, String> =
        sqlx::query_as("SELECT id, name FROM alert_routes")
            .fetch_all(&f.app.db.pool)
            .await
            .unwrap()
            .into_iter()
            .collect();
    let mut got: Vec<(String, String)> = routed
        .into_iter()
        .map(|(e, r)| (e, routes[&r].clone()))
        .collect();
    got.sort();
    let mut want = vec![
        (format!("{after_first}-1"), "first".to_owned()),
        (format!("{after_second}-1"), "first".to_owned()),
        (format!("{after_second}-1"), "second".to_owned()),
    ];
    want.sort();
    assert_eq!(got, want);
}

/// Review M11: a webhook URL's path often is its credential. A failed send
/// records why without the URL, and only admins read the URL whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_a_destination_url_token_reaches_neither_last_error_nor_a_non_admin() {
    let f = fixture(TestApp::spawn_with(settings(1)).await).await;
    // A closed port on an allowed host: the send fails at connect.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("http://127.0.0.1:{closed}/services/T0/B0/TOKEN-s3cr3t?sig=TOKEN-q");
    let ended = deliver_to(&f, std::slice::from_ref(&url)).await;
    let [(_, state, status, error)] = &ended[..] else {
        panic!("{ended:?}")
    };
    assert_eq!(state, "dead");
    assert_eq!(*status, None);
    assert!(error.starts_with("sending:"), "{error}");
    assert!(
        !error.contains("TOKEN"),
        "the URL leaked into last_error: {error}"
    );

    let admin = admin_token(&f.app).await;
    let whole = f.app.get("/v1/alerts/destinations", &admin).await;
    assert_eq!(whole.body["destinations"][0]["url"], url.as_str());
    let member = f
        .app
        .get("/v1/alerts/destinations", &f.app.user_token)
        .await;
    assert_eq!(member.status, StatusCode::OK, "{}", member.body);
    assert_eq!(
        member.body["destinations"][0]["url"],
        format!("http://127.0.0.1:{closed}/…").as_str()
    );
}

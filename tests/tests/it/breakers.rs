//! Circuit breakers (issue 26, ADR 0024): a dependency that keeps failing
//! opens its breaker, calls then fail fast without reaching it, the open
//! breaker shows in `/metrics` and the health detail, and once the
//! dependency is back the work resumes with nothing lost.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dispatcher::breaker::{Breaker, BreakerConfig};
use dispatcher::objects::{Guarded, ObjectError, ObjectStore, S3Config, S3Store};
use dispatcher::queue::{Queue, QueueError, SqsQueue};
use dispatcher_tests::moto::Moto;
use dispatcher_tests::stack::{Stack, WorkerOpts};
use dispatcher_tests::{Switch, TestApp};
use serde_json::{json, Value};

use super::alerts::{route_samples_to, Behaviour, Receiver};

fn breaker(name: &str) -> Arc<Breaker> {
    Breaker::new(
        "s3",
        format!("{name}-{}", uuid::Uuid::new_v4().simple()),
        BreakerConfig {
            failures: 2,
            open_for: Duration::from_secs(1),
        },
    )
}

fn state_of(name: &str) -> &'static str {
    dispatcher::breaker::all()
        .into_iter()
        .find(|b| b.name == name)
        .map(|b| b.state)
        .expect("the breaker is listed")
}

#[tokio::test]
async fn breakers_an_unreachable_object_store_and_queue_fail_fast_once_open_and_serve_again_after_recovery(
) {
    let app = TestApp::spawn().await;
    let moto = Moto::start().await;
    let switch = Switch::start(([127, 0, 0, 1], moto.port).into()).await;
    let bucket = moto.s3_config().await.bucket;
    let cfg = S3Config {
        endpoint_url: Some(switch.url()),
        bucket,
        ..moto.s3_config().await
    };
    let s3_breaker = breaker("s3-test");
    let s3 = Guarded::new(
        Arc::new(S3Store::connect(&cfg).await.unwrap()),
        s3_breaker.clone(),
    );
    let sqs_cfg = dispatcher::queue::SqsConfig {
        endpoint_url: Some(switch.url()),
        ..moto.sqs()
    };
    SqsQueue::create_queues(&sqs_cfg, 5).await.unwrap();
    let sqs_breaker = breaker("sqs-test");
    let sqs = dispatcher::queue::Guarded::new(
        Arc::new(SqsQueue::connect(&sqs_cfg).await.unwrap()),
        sqs_breaker.clone(),
    );
    s3.put("orgs/x/kept", b"before the outage".to_vec())
        .await
        .unwrap();
    sqs.send("wakeups", &json!({"n": 1}), Duration::ZERO)
        .await
        .unwrap();
    // An answer that is not a failure of the store leaves the breaker closed.
    for _ in 0..3 {
        assert!(matches!(
            s3.get("orgs/x/missing").await,
            Err(ObjectError::NotFound(_))
        ));
    }
    assert_eq!(state_of(s3_breaker.name()), "closed");

    switch.set_up(false);
    for _ in 0..2 {
        let e = s3.get("orgs/x/kept").await.unwrap_err();
        assert!(matches!(e, ObjectError::Unavailable(_)), "{e}");
    }
    // Open: the next calls fail at once, without a connection.
    let reached = switch.refused();
    let started = Instant::now();
    let e = s3.get("orgs/x/kept").await.unwrap_err();
    let ObjectError::Open(open) = &e else {
        panic!("{e}")
    };
    assert!(started.elapsed() < Duration::from_millis(50));
    assert_eq!(
        switch.refused(),
        reached,
        "an open breaker made a connection"
    );
    assert_eq!(state_of(s3_breaker.name()), "open");
    // A caller waiting on it gets 503 with Retry-After until the probe.
    let answer = axum::response::IntoResponse::into_response(
        dispatcher::http::error::ApiError::circuit_open(open),
    );
    assert_eq!(answer.status(), 503);
    assert_eq!(answer.headers()["retry-after"], "1");
    // The health detail names it and is degraded.
    let health = dispatcher::metrics::health_detail(&app.store).await;
    assert_eq!(health["status"], "degraded", "{health}");
    let listed = health["breakers"].as_array().unwrap();
    assert!(listed
        .iter()
        .any(|b| b["name"] == s3_breaker.name() && b["state"] == "open"));
    let problems = health["problems"].to_string();
    assert!(problems.contains(s3_breaker.name()), "{problems}");

    for _ in 0..2 {
        let e = sqs
            .send("wakeups", &json!({"n": 2}), Duration::ZERO)
            .await
            .unwrap_err();
        assert!(matches!(e, QueueError::Unavailable(_)), "{e}");
    }
    let reached = switch.refused();
    let started = Instant::now();
    let q = sqs
        .send("wakeups", &json!({"n": 3}), Duration::ZERO)
        .await
        .unwrap_err();
    assert!(matches!(q, QueueError::Open(_)), "{q}");
    assert!(started.elapsed() < Duration::from_millis(50));
    assert_eq!(
        switch.refused(),
        reached,
        "an open breaker made a connection"
    );
    assert_eq!(state_of(sqs_breaker.name()), "open");
    // Recovery: after the open time one probe goes through and closes it;
    // what was stored before the outage is all there.
    switch.set_up(true);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        s3.get("orgs/x/kept").await.unwrap(),
        b"before the outage".to_vec()
    );
    assert_eq!(state_of(s3_breaker.name()), "closed");
    tokio::time::sleep(Duration::from_millis(100)).await;
    sqs.send("wakeups", &json!({"n": 4}), Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(state_of(sqs_breaker.name()), "closed");
    let got = sqs
        .receive(
            "wakeups",
            10,
            Duration::from_secs(1),
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    let bodies: BTreeSet<String> = got.iter().map(|d| d.body.to_string()).collect();
    assert!(bodies.contains(&json!({"n": 1}).to_string()), "{bodies:?}");
    assert!(bodies.contains(&json!({"n": 4}).to_string()), "{bodies:?}");
}

/// One scrape: `name{labels}` → value.
async fn scrape(url: &str) -> std::collections::BTreeMap<String, f64> {
    let text = reqwest::get(url).await.unwrap().text().await.unwrap();
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_owned(), v.parse().ok()?))
        })
        .collect()
}

async fn states(data: &sqlx::PgPool) -> Vec<(String, i32)> {
    sqlx::query_as("SELECT state, tries FROM alert_deliveries ORDER BY event_id")
        .fetch_all(data)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breakers_a_failing_webhook_destination_is_left_alone_while_open_and_gets_every_delivery_after_recovery(
) {
    let receiver = Receiver::start(Behaviour {
        never: true,
        ..Default::default()
    })
    .await;
    let mut stack = Stack::new().await;
    let metrics_port = dispatcher_tests::free_port();
    for (k, v) in [
        ("DISPATCHER_ALERTS_ALLOW_HOSTS", "127.0.0.1".to_owned()),
        (
            "DISPATCHER_METRICS_BIND",
            format!("127.0.0.1:{metrics_port}"),
        ),
        ("DISPATCHER_BREAKER_FAILURES", "3".into()),
        ("DISPATCHER_BREAKER_OPEN_SECONDS", "2".into()),
        // Without the breaker, every delivery would be dead within a second.
        ("DISPATCHER_ALERT_MAX_TRIES", "3".into()),
        ("DISPATCHER_ALERT_RETRY_BASE_MS", "50".into()),
    ] {
        stack.profile_env.push((k.into(), v));
    }
    let destination = route_samples_to(&stack, &receiver).await;
    stack.start_dispatcher("").await;
    let _worker = stack.start_worker(&WorkerOpts::new("breaker"));
    stack
        .submit(stack.flat_job(1, json!({"rows": 10, "events": false})))
        .await;

    // The destination fails: after three failures its breaker opens.
    let name = format!("webhook:{destination}");
    let health_url = format!("http://127.0.0.1:{metrics_port}/health");
    let deadline = Instant::now() + Duration::from_secs(60);
    let health: Value = loop {
        let h: Value = reqwest::get(&health_url)
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let open = h["breakers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b["name"] == name.as_str() && b["state"] == "open");
        if open {
            break h;
        }
        assert!(Instant::now() < deadline, "never opened: {h}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(health["status"], "degraded");
    assert!(health["problems"].to_string().contains(&name), "{health}");
    let m = scrape(&format!("http://127.0.0.1:{metrics_port}/metrics")).await;
    assert_eq!(
        m.get("dispatcher_breakers{kind=\"webhook\",state=\"open\"}"),
        Some(&1.0),
        "{m:#?}"
    );
    assert!(m["dispatcher_breaker_opened_total{kind=\"webhook\"}"] >= 1.0);

    // While it is down (two open periods), only the probes reach it, one at
    // a time, and no delivery spends its tries: none is dead.
    let data = stack.db.data().await;
    let calls_at_open = receiver.state.lock().unwrap().calls;
    tokio::time::sleep(Duration::from_millis(4500)).await;
    let probes = receiver.state.lock().unwrap().calls - calls_at_open;
    assert!(probes <= 3, "{probes} calls while open");
    let now = states(&data).await;
    assert_eq!(now.len(), 10, "{now:?}");
    assert!(now.iter().all(|(s, t)| s == "pending" && *t < 3), "{now:?}");
    let m = scrape(&format!("http://127.0.0.1:{metrics_port}/metrics")).await;
    assert!(
        m["dispatcher_alert_deliveries_total{result=\"deferred\"}"] >= 1.0,
        "a failed probe is deferred: {m:#?}"
    );

    // Back up: the next probe closes the breaker and every event arrives.
    receiver.state.lock().unwrap().never = false;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = states(&data).await;
        if now.iter().all(|(s, _)| s == "delivered") {
            break;
        }
        assert!(Instant::now() < deadline, "{now:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let delivered: BTreeSet<String> = receiver.ids().into_iter().collect();
    assert_eq!(delivered.len(), 10, "every event once or more");
    let h: Value = reqwest::get(&health_url)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let b = h["breakers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == name.as_str())
        .cloned()
        .unwrap();
    assert_eq!(b["state"], "closed", "{b}");
    let m = scrape(&format!("http://127.0.0.1:{metrics_port}/metrics")).await;
    assert_eq!(
        m.get("dispatcher_breakers{kind=\"webhook\",state=\"closed\"}"),
        Some(&1.0)
    );
    // Each delivery is counted delivered once; the failures before the
    // breaker opened were retries, and nothing died.
    let count = |result: &str| {
        m.get(&format!(
            "dispatcher_alert_deliveries_total{{result=\"{result}\"}}"
        ))
        .copied()
        .unwrap_or(0.0)
    };
    assert_eq!(count("delivered"), 10.0, "{m:#?}");
    assert!(count("retry") >= 3.0, "{m:#?}");
    assert_eq!(count("dead"), 0.0);
}

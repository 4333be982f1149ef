//! Autoscaling (issue 27): a worker busy with a task asks the ECS agent to
//! keep its task out of a scale-in, and gives the protection up once idle.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dispatcher_tests::stack::{Stack, WorkerOpts};
use serde_json::{json, Value};

/// An ECS agent's task-protection endpoint that records each request.
async fn agent() -> (String, Arc<Mutex<Vec<(Instant, Value)>>>) {
    let seen: Arc<Mutex<Vec<(Instant, Value)>>> = Arc::default();
    let log = seen.clone();
    let app = axum::Router::new().route(
        "/api/task-1/task-protection/v1/state",
        axum::routing::put(move |axum::Json(body): axum::Json<Value>| {
            let log = log.clone();
            async move {
                log.lock().unwrap().push((Instant::now(), body));
                axum::Json(json!({"protection": {"ProtectionEnabled": true}}))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/api/task-1", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (url, seen)
}

#[tokio::test]
async fn a_busy_worker_protects_its_ecs_task_from_scale_in_and_gives_it_up_when_idle() {
    let (uri, seen) = agent().await;
    let mut stack = Stack::new().await;
    stack
        .profile_env
        .push(("WORKER_ECS_TASK_PROTECTION".into(), "true".into()));
    stack.profile_env.push(("ECS_AGENT_URI".into(), uri));
    stack.start_dispatcher("").await;
    let worker = stack.start_worker(&WorkerOpts::new("protected"));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        seen.lock().unwrap().is_empty(),
        "an idle worker asks nothing"
    );

    let submitted = Instant::now();
    stack
        .submit(stack.flat_job(1, json!({"sleep_ms": 3000})))
        .await;
    stack.wait_all_finished(Duration::from_secs(60)).await;
    let finished = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(10);
    let calls = loop {
        let calls = seen.lock().unwrap().clone();
        if calls.len() >= 2 {
            break calls;
        }
        assert!(
            Instant::now() < deadline,
            "{calls:?}\n{}",
            worker.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        seen.lock().unwrap().len(),
        calls.len(),
        "an idle worker asks no more"
    );
    // Protected while the task ran, for an hour unless renewed; released
    // after it ended; nothing else.
    assert_eq!(
        calls[0].1,
        json!({"ProtectionEnabled": true, "ExpiresInMinutes": 60})
    );
    assert!(calls[0].0 > submitted && calls[0].0 < finished);
    assert_eq!(calls[1].1, json!({"ProtectionEnabled": false}));
    assert!(calls[1].0 >= finished - Duration::from_secs(1));
    assert_eq!(calls.len(), 2, "{calls:?}");
}

//! Telemetry (issue 26): the dispatcher's Prometheus metrics, scraped from
//! a real `dispatcher serve` after a small job.

use std::collections::BTreeMap;
use std::time::Duration;

use dispatcher_tests::stack::{Stack, WorkerOpts};
use serde_json::json;

/// One scrape: `name{labels}` → value, as the text format writes them.
async fn scrape(url: &str) -> BTreeMap<String, f64> {
    let text = reqwest::get(url)
        .await
        .expect("the metrics listener answers")
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// The sum of every series of `name` whose labels contain each of `with`.
fn sum(m: &BTreeMap<String, f64>, name: &str, with: &[&str]) -> f64 {
    m.iter()
        .filter(|(series, _)| {
            let (n, labels) = series.split_once('{').unwrap_or((series.as_str(), ""));
            n == name && with.iter().all(|w| labels.contains(w))
        })
        .map(|(_, v)| v)
        .sum()
}

#[tokio::test]
async fn metrics_after_a_small_job_count_its_claims_completions_backlog_and_requests() {
    let mut stack = Stack::new().await;
    let port = dispatcher_tests::free_port();
    stack.profile_env.push((
        "DISPATCHER_METRICS_BIND".into(),
        format!("127.0.0.1:{port}"),
    ));
    // One user request a second: a burst of them shows as refusals.
    stack
        .profile_env
        .push(("DISPATCHER_RATE_PER_USER".into(), "1,1".into()));
    // The backlog for CloudWatch, every second (terraform/ scales on it).
    for (k, v) in [
        ("DISPATCHER_BACKLOG_EMF_NAMESPACE", "DispatcherTest"),
        ("DISPATCHER_BACKLOG_EMF_SECONDS", "1"),
    ] {
        stack.profile_env.push((k.into(), v.into()));
    }
    // The pruner looks every second (the retention counters, at the end).
    stack
        .profile_env
        .push(("DISPATCHER_JOB_PRUNE_INTERVAL_SECONDS".into(), "1".into()));
    stack.start_dispatcher("").await;
    let url = format!("http://127.0.0.1:{port}/metrics");
    // Three ready tasks and no worker: the backlog is what the gauges say.
    stack
        .submit(stack.flat_job(3, json!({"sleep_ms": 10})))
        .await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let before = scrape(&url).await;
    // The sink and relay lag gauges are sampled (and read 0 with nothing pending).
    assert_eq!(before.get("dispatcher_sink_batches_pending"), Some(&0.0));
    let org = format!("org=\"{}\"", stack.org_id);
    assert_eq!(
        sum(
            &before,
            "dispatcher_tasks_ready",
            &[&org, "runtime=\"exec\""]
        ),
        3.0,
        "{before:#?}"
    );
    let age = sum(
        &before,
        "dispatcher_tasks_oldest_ready_age_seconds",
        &[&org],
    );
    assert!((1.0..60.0).contains(&age), "oldest ready age {age}");
    assert_eq!(sum(&before, "dispatcher_claims_total", &[]), 0.0);
    // The same signal as CloudWatch Embedded Metric Format lines on stdout:
    // the exec runtime's, and every other runtime's at 0.
    let emf: Vec<serde_json::Value> = stack
        .dispatcher_stdout()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let of = |runtime: &str| {
        emf.iter()
            .rev()
            .find(|l| l["Runtime"] == runtime)
            .cloned()
            .unwrap_or_else(|| panic!("no EMF line for {runtime}: {emf:?}"))
    };
    let exec = of("exec");
    assert_eq!(exec["ReadyTasksPerSlot"], 3.0, "{exec}");
    assert_eq!(exec["ReadyTasks"], 3);
    let declared = &exec["_aws"]["CloudWatchMetrics"][0];
    assert_eq!(declared["Namespace"], "DispatcherTest");
    assert_eq!(declared["Dimensions"], json!([["Runtime"]]));
    assert!(declared["Metrics"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["Name"] == "ReadyTasksPerSlot"));
    assert_eq!(of("rust")["ReadyTasksPerSlot"], 0.0);
    let totals = emf
        .iter()
        .rev()
        .find(|l| l.get("OutboxDeadRows").is_some())
        .expect("the outbox and lag line");
    assert_eq!(totals["OutboxDeadRows"], 0);
    // No worker yet: the backlog per slot is the ready count itself.
    assert_eq!(
        sum(
            &before,
            "dispatcher_ready_tasks_per_slot",
            &["runtime=\"exec\""]
        ),
        3.0
    );

    let worker_port = dispatcher_tests::free_port();
    stack.profile_env.push((
        "WORKER_METRICS_BIND".into(),
        format!("127.0.0.1:{worker_port}"),
    ));
    let _worker = stack.start_worker(&WorkerOpts {
        concurrency: 4,
        ..WorkerOpts::new("metrics")
    });
    stack.wait_all_finished(Duration::from_secs(60)).await;
    let after = scrape(&url).await;
    // The worker's own: its slots, all free again, and its three attempts
    // with their durations (each sample task sleeps 10 ms).
    let worker = scrape(&format!("http://127.0.0.1:{worker_port}/metrics")).await;
    assert_eq!(
        worker.get("worker_wrapper_slots"),
        Some(&4.0),
        "{worker:#?}"
    );
    assert_eq!(worker.get("worker_wrapper_slots_busy"), Some(&0.0));
    let ok = ["runtime=\"exec\"", "outcome=\"succeeded\""];
    assert_eq!(sum(&worker, "worker_wrapper_attempts_total", &ok), 3.0);
    assert_eq!(sum(&worker, "worker_wrapper_attempts_total", &[]), 3.0);
    assert_eq!(
        sum(
            &worker,
            "worker_wrapper_attempt_duration_seconds_count",
            &ok
        ),
        3.0
    );
    let ran = sum(&worker, "worker_wrapper_attempt_duration_seconds_sum", &ok);
    assert!((0.03..60.0).contains(&ran), "attempts took {ran} s in all");
    // The worker reported its 4 slots (at its start, then every 10 s): the
    // dispatcher counts them for the runtimes it runs, and nothing waits.
    let exec = ["runtime=\"exec\""];
    assert_eq!(
        sum(
            &after,
            "dispatcher_worker_slots",
            &[exec[0], "state=\"total\""]
        ),
        4.0,
        "{after:#?}"
    );
    assert_eq!(
        sum(
            &after,
            "dispatcher_worker_slots",
            &[exec[0], "state=\"busy\""]
        ),
        0.0
    );
    assert_eq!(sum(&after, "dispatcher_ready_tasks_per_slot", &exec), 0.0);
    // The operator's health detail, beside /metrics: every role looped
    // lately without a failure, nothing lags, the slots are the worker's,
    // every migration is applied.
    let health: serde_json::Value = reqwest::get(format!("http://127.0.0.1:{port}/health"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["status"], "ok", "{health:#}");
    for role in [
        "relay",
        "reaper",
        "pruner",
        "sink",
        "alert_router",
        "alert_delivery",
        "replicas",
    ] {
        let r = &health["roles"][role];
        let ago = r["last_pass_seconds_ago"].as_f64().unwrap_or(f64::MAX);
        assert!(ago < 30.0 && r["failures"] == 0, "{role}: {r}");
    }
    assert_eq!(health["lag"]["sink_pending"], 0, "{health:#}");
    assert_eq!(health["capacity"]["exec"]["slots"], 4, "{health:#}");
    assert_eq!(health["capacity"]["exec"]["ready_per_slot"], 0.0);
    assert_eq!(health["migrations"]["pending"], json!([]));
    assert!(health["migrations"]["known"].as_u64().unwrap() >= 26);
    assert!(health["pool"]["max"].as_u64().unwrap() >= 1);
    // The operator's list says the same.
    let listed = std::process::Command::new(dispatcher_tests::stack::binary("dispatcher"))
        .args(["admin", "workers"])
        .env("DATABASE_URL", stack.db.url())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&listed.stdout);
    assert!(listed.status.success(), "{text}");
    let line = text
        .lines()
        .find(|l| l.starts_with("metrics "))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        line.contains("slots=4  busy=0") && line.contains("exec"),
        "{line}"
    );
    assert_eq!(
        sum(&after, "dispatcher_claims_total", &["runtime=\"exec\""]),
        3.0,
        "{after:#?}"
    );
    assert_eq!(
        sum(
            &after,
            "dispatcher_completions_total",
            &["outcome=\"succeeded\""]
        ),
        3.0
    );
    assert_eq!(sum(&after, "dispatcher_completions_total", &[]), 3.0);
    // Each task waited over a second for the worker to start.
    let queued = "dispatcher_task_queued_to_claimed_seconds";
    assert_eq!(
        sum(&after, &format!("{queued}_count"), &["runtime=\"exec\""]),
        3.0
    );
    let waited = sum(&after, &format!("{queued}_sum"), &[]);
    assert!(
        (3.0..180.0).contains(&waited),
        "queued for {waited} s in all"
    );
    assert_eq!(
        sum(&after, &format!("{queued}_bucket"), &["le=\"0.5\""]),
        0.0,
        "no task was claimed within half a second"
    );
    // The backlog drained: its series read zero, not their last value.
    assert_eq!(sum(&after, "dispatcher_tasks_ready", &[&org]), 0.0);
    assert_eq!(
        sum(&after, "dispatcher_tasks_oldest_ready_age_seconds", &[&org]),
        0.0
    );
    assert_eq!(sum(&after, "dispatcher_tasks_leased", &[]), 0.0);
    assert_eq!(
        sum(&after, "dispatcher_outbox_rows", &["state=\"dead\""]),
        0.0
    );
    assert!(
        sum(
            &after,
            "dispatcher_db_pool_connections",
            &["state=\"idle\""]
        ) >= 1.0
    );
    assert_eq!(sum(&after, "dispatcher_lease_expiries_total", &[]), 0.0);
    // Requests by route template (never a concrete path): the worker's
    // claims and completions.
    let count = |route: &str| {
        sum(
            &after,
            "dispatcher_http_request_duration_seconds_count",
            &[&format!("route=\"{route}\""), "status=\"200\""],
        )
    };
    assert!(count("/internal/task-claim-batch") >= 1.0, "{after:#?}");
    assert!(count("/v1/task/complete") + count("/v1/task/complete-batch") >= 1.0);
    assert!(
        after
            .keys()
            .all(|k| !k.contains("route=\"/v1/jobs/") || k.contains("{id}")),
        "a concrete path as a route label"
    );
    let buckets = sum(
        &after,
        "dispatcher_http_request_duration_seconds_bucket",
        &["le=\"+Inf\""],
    );
    let counted = sum(
        &after,
        "dispatcher_http_request_duration_seconds_count",
        &[],
    );
    assert!(
        counted >= 4.0 && buckets == counted,
        "{counted} requests, {buckets} in +Inf"
    );
    // The sink ingests each published batch once, after its task ended.
    let published = count("/v1/task/buffer-publish");
    assert!(published >= 3.0, "{published} batches published");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let m = scrape(&url).await;
        let ingested = sum(
            &m,
            "dispatcher_sink_batches_total",
            &["result=\"ingested\""],
        );
        if ingested == published {
            assert_eq!(
                sum(&m, "dispatcher_sink_batches_total", &["result=\"dead\""]),
                0.0
            );
            // Nothing is left for the sink or the relay: no lag.
            for gauge in [
                "dispatcher_sink_batches_pending",
                "dispatcher_sink_oldest_pending_age_seconds",
                "dispatcher_outbox_oldest_pending_age_seconds",
            ] {
                assert_eq!(m.get(gauge), Some(&0.0), "{gauge}: {m:#?}");
            }
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{ingested} of {published} ingested"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Refusals by the user's rate, counted by scope.
    let http = reqwest::Client::new();
    let mut refused = 0.0;
    for _ in 0..5 {
        let r = http
            .get(format!("{}/v1/jobs", stack.url()))
            .bearer_auth(stack.user_token())
            .send()
            .await
            .unwrap();
        if r.status() == 429 {
            refused += 1.0;
        }
    }
    assert!(refused >= 3.0, "only {refused} of 5 refused");
    let limited = scrape(&url).await;
    assert_eq!(
        sum(
            &limited,
            "dispatcher_rate_limited_total",
            &["scope=\"user\""]
        ),
        refused
    );
    assert!(
        after
            .keys()
            .all(|k| !k.contains(&stack.org_id.to_string()) || k.contains("org=")),
        "an org id outside the org label"
    );
    assert_eq!(
        sum(&after, "dispatcher_retention_deletions_total", &[]),
        0.0
    );

    // The job ages past its retention (7 days): the pruner deletes it and
    // the log objects of its three attempts, and counts each.
    let logs: i64 = sqlx::query_scalar("SELECT count(*) FROM attempts WHERE log_key IS NOT NULL")
        .fetch_one(&stack.db.pool)
        .await
        .unwrap();
    sqlx::query("UPDATE jobs SET finished_at = now() - interval '8 days'")
        .execute(&stack.db.pool)
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let m = scrape(&url).await;
        let jobs = sum(
            &m,
            "dispatcher_retention_deletions_total",
            &["kind=\"job\""],
        );
        let objects = sum(
            &m,
            "dispatcher_retention_deletions_total",
            &["kind=\"log_object\""],
        );
        if jobs == 1.0 && objects == logs as f64 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{jobs} jobs and {objects} of {logs} log objects deleted"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A span as the in-process OTLP receiver got it.
#[derive(Debug, Clone)]
struct Got {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent: String,
    attributes: BTreeMap<String, String>,
}

/// An OTLP/HTTP trace receiver (`POST /v1/traces`, protobuf): its base URL
/// and what it received.
async fn otlp_receiver() -> (String, std::sync::Arc<std::sync::Mutex<Vec<Got>>>) {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::any_value::Value as V;
    use prost::Message as _;
    let got: std::sync::Arc<std::sync::Mutex<Vec<Got>>> = Default::default();
    let sink = got.clone();
    let text = |v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>| match v
        .as_ref()
        .and_then(|v| v.value.as_ref())
    {
        Some(V::StringValue(s)) => s.clone(),
        Some(V::IntValue(i)) => i.to_string(),
        Some(V::BoolValue(b)) => b.to_string(),
        Some(V::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    };
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let sink = sink.clone();
            async move {
                let req = ExportTraceServiceRequest::decode(body).expect("an OTLP trace export");
                let mut spans = sink.lock().unwrap();
                for rs in req.resource_spans {
                    let service = rs
                        .resource
                        .iter()
                        .flat_map(|r| &r.attributes)
                        .find(|kv| kv.key == "service.name")
                        .map(|kv| text(&kv.value))
                        .unwrap_or_default();
                    for s in rs.scope_spans.into_iter().flat_map(|ss| ss.spans) {
                        spans.push(Got {
                            service: service.clone(),
                            name: s.name,
                            trace_id: hex::encode(&s.trace_id),
                            span_id: hex::encode(&s.span_id),
                            parent: hex::encode(&s.parent_span_id),
                            attributes: s
                                .attributes
                                .iter()
                                .map(|kv| (kv.key.clone(), text(&kv.value)))
                                .collect(),
                        });
                    }
                }
                axum::http::StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (url, got)
}

#[tokio::test]
async fn traces_a_submitted_traceparent_reaches_each_attempts_span_and_the_udf_as_its_child() {
    let mut stack = Stack::new().await;
    let (otlp, got) = otlp_receiver().await;
    for (k, v) in [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ("LOG_FORMAT", "json"),
    ] {
        stack.profile_env.push((k.into(), v.into()));
    }
    let worker_port = dispatcher_tests::free_port();
    stack.profile_env.push((
        "WORKER_METRICS_BIND".into(),
        format!("127.0.0.1:{worker_port}"),
    ));
    stack.start_dispatcher("").await;
    // Each task prints the TRACEPARENT it was given.
    let probe = stack.dir.join("print-traceparent.sh");
    std::fs::write(
        &probe,
        "#!/bin/sh\nprintf '{\"traceparent\": \"%s\"}' \"$TRACEPARENT\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&probe, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller = "00f067aa0ba902b7";
    // One task of each kind: a program, and a Python, a Node and a Rust
    // handler (whose runner clients set TRACEPARENT per invocation).
    let fixture = |name: &str| {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures/bundles")
            .join(name)
    };
    let python = stack.push_bundle(&fixture("python-probe"), None);
    let node = stack.push_bundle(&fixture("node-probe"), None);
    let rust_dir = stack.dir.join("rust-probe");
    std::fs::create_dir_all(&rust_dir).unwrap();
    std::fs::copy(
        dispatcher_tests::stack::binary("udf-rust-probe"),
        rust_dir.join("bootstrap"),
    )
    .expect("the rust probe is built (cargo build --workspace --bins)");
    std::fs::write(
        rust_dir.join("bundle.json"),
        r#"{"runtime": "rust", "handler": "bootstrap", "timeout_seconds": 30}"#,
    )
    .unwrap();
    let rust = stack.push_bundle(&rust_dir, None);
    let tasks = json!([
        {"key": "exec", "runtime": "exec", "bundle": probe.display().to_string()},
        {"key": "python", "runtime": "python", "bundle": python, "inputs": {"do": "traceparent"}},
        {"key": "node", "runtime": "node", "bundle": node, "inputs": {"do": "traceparent"}},
        {"key": "rust", "runtime": "rust", "bundle": rust, "inputs": {"do": "traceparent"}},
    ]);
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/jobs", stack.url()))
        .bearer_auth(stack.user_token())
        .header("traceparent", format!("00-{trace}-{caller}-01"))
        .json(&json!({"name": "traced", "tasks": tasks}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let job: serde_json::Value = resp.json().await.unwrap();
    let job_id = job["job_id"].as_str().unwrap().to_owned();
    let worker = stack.start_worker(&WorkerOpts::new("traced"));
    stack.wait_all_finished(Duration::from_secs(60)).await;

    // The job stored its submission's span, a child of the caller's.
    let stored: Option<String> =
        sqlx::query_scalar("SELECT traceparent FROM jobs WHERE id = $1::uuid")
            .bind(&job_id)
            .fetch_one(&stack.db.pool)
            .await
            .unwrap();
    let stored = stored.expect("the job stores a traceparent");
    assert!(stored.starts_with(&format!("00-{trace}-")), "{stored}");
    let submission = stored.split('-').nth(2).unwrap().to_owned();
    assert_ne!(submission, caller);

    // Each UDF saw a TRACEPARENT of the submitted trace.
    let outputs: Vec<(uuid::Uuid, String, serde_json::Value)> = sqlx::query_as(
        "SELECT t.id, s.key, a.completion->'output' FROM tasks t
           JOIN task_specs s ON s.task_id = t.id
           JOIN attempts a ON a.task_id = t.id WHERE t.job_id = $1::uuid",
    )
    .bind(&job_id)
    .fetch_all(&stack.db.pool)
    .await
    .unwrap();
    assert_eq!(outputs.len(), 4, "{outputs:?}");

    // Spans arrive within the batch delay (100 ms) of ending.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let attempts = loop {
        let spans = got.lock().unwrap().clone();
        let attempts: Vec<Got> = spans
            .iter()
            .filter(|s| s.name == "task.attempt")
            .cloned()
            .collect();
        let submitted = spans
            .iter()
            .any(|s| s.name == "POST /v1/jobs" && s.span_id == submission);
        let handler_calls = spans
            .iter()
            .filter(|s| s.name == "POST /v1/task/events" && s.trace_id == trace)
            .count();
        if attempts.len() >= 4 && submitted && handler_calls >= 3 {
            break attempts;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "spans so far: {spans:#?}\n{}",
            worker.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let spans = got.lock().unwrap().clone();
    let post = spans
        .iter()
        .find(|s| s.name == "POST /v1/jobs" && s.span_id == submission)
        .unwrap();
    assert_eq!(
        (
            post.service.as_str(),
            post.trace_id.as_str(),
            post.parent.as_str()
        ),
        ("dispatcher", trace, caller)
    );
    assert_eq!(post.attributes["http.route"], "/v1/jobs");
    assert_eq!(post.attributes["http.response.status_code"], "201");
    for (task_id, key, output) in &outputs {
        let seen = output["traceparent"]
            .as_str()
            .unwrap_or_else(|| panic!("{key}: {output}"));
        let span = attempts
            .iter()
            .find(|s| s.attributes.get("task_id") == Some(&task_id.to_string()))
            .unwrap_or_else(|| panic!("no attempt span for {task_id}: {attempts:#?}"));
        assert_eq!(span.service, "worker-wrapper");
        assert_eq!(span.trace_id, trace);
        assert_eq!(span.parent, submission, "the attempt continues the job");
        assert_eq!(span.attributes["job_id"], job_id);
        assert_eq!(span.attributes["attempt"], "1");
        assert_eq!(span.attributes["org_id"], stack.org_id.to_string());
        assert_eq!(span.attributes["outcome"], "succeeded");
        // The UDF's context is a child of its attempt's span.
        assert_eq!(seen, format!("00-{trace}-{}-01", span.span_id), "{key}");
        if key == "rust" {
            assert_eq!(output["client"], seen, "the Rust client's own copy");
        }
        if key != "exec" {
            // The runtime API's X-Ray form of the same context.
            assert_eq!(
                output["xray"],
                format!(
                    "Root=1-{}-{};Parent={};Sampled=1",
                    &trace[..8],
                    &trace[8..],
                    span.span_id
                ),
                "{key}"
            );
            // The handler's call to the dispatcher carried it: the
            // dispatcher's span of that call is the attempt's child.
            assert!(
                spans.iter().any(|s| s.name == "POST /v1/task/events"
                    && s.service == "dispatcher"
                    && s.trace_id == trace
                    && s.parent == span.span_id),
                "{key}: no dispatcher span under {}: {spans:#?}",
                span.span_id
            );
        }
    }
    // One cold start per bundle runtime, each invocation timed.
    let metrics = scrape(&format!("http://127.0.0.1:{worker_port}/metrics")).await;
    for runtime in ["python", "node", "rust"] {
        let r = format!("runtime=\"{runtime}\"");
        assert_eq!(
            sum(&metrics, "worker_wrapper_runner_cold_starts_total", &[&r]),
            1.0,
            "{metrics:#?}"
        );
        assert_eq!(
            sum(
                &metrics,
                "worker_wrapper_invoke_duration_seconds_count",
                &[&r, "start=\"cold\""]
            ),
            1.0
        );
    }
    // Every log line of an attempt carries its ids and trace id (JSON).
    let log = worker.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("\"completed\""))
        .unwrap_or_else(|| panic!("{log}"));
    let line: serde_json::Value = serde_json::from_str(line).unwrap();
    let span = line["spans"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == "task.attempt"))
        .unwrap_or_else(|| panic!("{line}"));
    assert_eq!(span["trace_id"], trace);
    assert_eq!(span["job_id"], job_id.as_str());
    assert!(
        span["task_id"].is_string() && span["attempt"] == 1,
        "{span}"
    );
}

#[tokio::test]
async fn traces_a_jobs_traceparent_is_stored_as_given_or_not_at_all_and_handed_to_its_claim() {
    let app = dispatcher_tests::TestApp::spawn().await;
    let given = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let submit = |traceparent: &'static str| {
        let app = &app;
        async move {
            let r = app
                .client
                .post(app.url("/v1/jobs"))
                .bearer_auth(&app.user_token)
                .header("traceparent", traceparent)
                .json(&json!({"name": "t", "tasks": [
                    {"key": "a", "runtime": "exec", "bundle": "/bin/true"}]}))
                .send()
                .await
                .unwrap();
            // A malformed context is ignored (the W3C recommendation), never
            // a refusal of the job.
            assert_eq!(r.status(), 201, "{traceparent:?}");
            let job: serde_json::Value = r.json().await.unwrap();
            let id = uuid::Uuid::parse_str(job["job_id"].as_str().unwrap()).unwrap();
            let task = uuid::Uuid::parse_str(job["tasks"][0]["task_id"].as_str().unwrap()).unwrap();
            let stored: Option<String> =
                sqlx::query_scalar("SELECT traceparent FROM jobs WHERE id = $1")
                    .bind(id)
                    .fetch_one(&app.db.pool)
                    .await
                    .unwrap();
            (stored, task)
        }
    };
    // Traces are off in this process: the caller's context is kept as given.
    let (stored, task) = submit(given).await;
    assert_eq!(stored.as_deref(), Some(given));
    assert_eq!(app.claim(task).await.traceparent.as_deref(), Some(given));
    for bad in [
        "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "garbage",
    ] {
        let (stored, task) = submit(bad).await;
        assert_eq!(stored, None, "{bad:?}");
        assert_eq!(app.claim(task).await.traceparent, None);
    }
}

#[tokio::test]
async fn a_workers_presence_is_recorded_with_its_credential_and_a_report_out_of_range_changes_nothing(
) {
    let app = dispatcher_tests::TestApp::spawn().await;
    let rows = || async {
        sqlx::query_as::<_, (String, String, i32, i32, Vec<String>)>(
            "SELECT worker_id, credential, slots, busy, runtimes FROM worker_presence",
        )
        .fetch_all(&app.db.pool)
        .await
        .unwrap()
    };
    for (bad, field) in [
        (
            json!({"worker_id": "w", "slots": 0, "busy": 0, "runtimes": ["exec"]}),
            "slots",
        ),
        (
            json!({"worker_id": "w", "slots": 2, "busy": 3, "runtimes": ["exec"]}),
            "busy",
        ),
        (
            json!({"worker_id": "w", "slots": 2, "busy": 0, "runtimes": []}),
            "runtimes",
        ),
        (
            json!({"worker_id": " ", "slots": 2, "busy": 0, "runtimes": ["exec"]}),
            "worker_id",
        ),
        (
            json!({"worker_id": "w", "slots": 2, "busy": 0, "runtimes": ["cobol"]}),
            "runtimes",
        ),
        (
            json!({"worker_id": "w", "slots": 2, "busy": 0, "runtimes": ["exec"], "x": 1}),
            "x",
        ),
    ] {
        let r = app
            .post("/internal/worker-presence", &app.worker_token, &bad)
            .await;
        assert_eq!(r.status, 400, "{bad}: {}", r.body);
        assert_eq!(r.body["error"]["code"], "invalid_request", "{}", r.body);
        assert!(
            r.body["error"]["message"].as_str().unwrap().contains(field),
            "{}",
            r.body
        );
    }
    assert!(rows().await.is_empty(), "a refused report wrote nothing");
    // A task's token is no worker credential.
    let r = app
        .post("/internal/worker-presence", &app.user_token, &json!({}))
        .await;
    assert_eq!(r.status, 401);
    let ok =
        json!({"worker_id": "w", "slots": 4, "busy": 1, "runtimes": ["python", "exec", "python"]});
    let r = app
        .post("/internal/worker-presence", &app.worker_token, &ok)
        .await;
    assert_eq!(r.status, 204, "{}", r.body);
    assert_eq!(
        rows().await,
        vec![(
            "w".into(),
            "test-worker".into(),
            4,
            1,
            vec!["exec".into(), "python".into()]
        )]
    );
    let slots = app.store.slots_by_runtime().await.unwrap();
    let exec = slots.iter().find(|s| s.runtime == "exec").unwrap();
    assert_eq!((exec.slots, exec.busy), (4, 1));
}

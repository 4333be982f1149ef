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
    stack.start_dispatcher("").await;
    let url = format!("http://127.0.0.1:{port}/metrics");
    // Three ready tasks and no worker: the backlog is what the gauges say.
    stack
        .submit(stack.flat_job(3, json!({"sleep_ms": 10})))
        .await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let before = scrape(&url).await;
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

    let _worker = stack.start_worker(&WorkerOpts::new("metrics"));
    stack.wait_all_finished(Duration::from_secs(60)).await;
    let after = scrape(&url).await;
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
}

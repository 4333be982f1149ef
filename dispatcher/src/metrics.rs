//! Prometheus metrics (issue 26, ADR 0022): the one list of the
//! dispatcher's metrics, the recorder, and what is sampled on a scrape.
//!
//! Every metric is named here and only here ([`CATALOGUE`]); code records
//! through these constants, `docs/standards/metrics.md` documents each, and
//! a test fails when the two lists differ. Labels stay bounded: runtimes,
//! outcomes, routes as templates, org ids (orgs are few), never a task,
//! job or attempt id. Without `serve --metrics-bind` no recorder is
//! installed and every record is a no-op.

use std::collections::BTreeSet;
use std::sync::Mutex;

use metrics_exporter_prometheus::PrometheusHandle;

use crate::store::Store;

pub use dispatcher_telemetry::metrics::{enabled, Kind, Metric};

pub const CLAIMS: &str = "dispatcher_claims_total";
pub const COMPLETIONS: &str = "dispatcher_completions_total";
pub const QUEUED_TO_CLAIMED: &str = "dispatcher_task_queued_to_claimed_seconds";
pub const LEASE_EXPIRIES: &str = "dispatcher_lease_expiries_total";
pub const FENCE_REJECTIONS: &str = "dispatcher_fence_rejections_total";
pub const HTTP_DURATION: &str = "dispatcher_http_request_duration_seconds";
pub const RATE_LIMITED: &str = "dispatcher_rate_limited_total";
pub const SINK_BATCHES: &str = "dispatcher_sink_batches_total";
pub const TASKS_READY: &str = "dispatcher_tasks_ready";
pub const OLDEST_READY_AGE: &str = "dispatcher_tasks_oldest_ready_age_seconds";
pub const TASKS_LEASED: &str = "dispatcher_tasks_leased";
pub const OUTBOX_ROWS: &str = "dispatcher_outbox_rows";
pub const DB_POOL: &str = "dispatcher_db_pool_connections";
pub const RELAY_LAG: &str = "dispatcher_outbox_oldest_pending_age_seconds";
pub const SINK_PENDING: &str = "dispatcher_sink_batches_pending";
pub const SINK_LAG: &str = "dispatcher_sink_oldest_pending_age_seconds";
pub const ALERT_DELIVERIES: &str = "dispatcher_alert_deliveries_total";
pub const DATASET_COMMITS: &str = "dispatcher_dataset_commits_total";
pub const RETENTION_DELETIONS: &str = "dispatcher_retention_deletions_total";
pub const WORKER_SLOTS: &str = "dispatcher_worker_slots";
pub const READY_PER_SLOT: &str = "dispatcher_ready_tasks_per_slot";
pub const BREAKERS: &str = "dispatcher_breakers";
pub const BREAKER_FAST_FAILS: &str = "dispatcher_breaker_calls_failed_fast_total";
pub const BREAKER_OPENED: &str = "dispatcher_breaker_opened_total";

pub const CATALOGUE: &[Metric] = &[
    Metric {
        name: CLAIMS,
        kind: Kind::Counter,
        labels: &["runtime"],
        help: "Attempts granted by a claim (single or batch).",
    },
    Metric {
        name: QUEUED_TO_CLAIMED,
        kind: Kind::Histogram,
        labels: &["runtime"],
        help:
            "Seconds from when a task could be claimed (ready, or its lease expired) to its claim.",
    },
    Metric {
        name: COMPLETIONS,
        kind: Kind::Counter,
        labels: &["outcome"],
        help: "Completions answered 200, by the attempt's outcome (succeeded, failed, cancelled).",
    },
    Metric {
        name: LEASE_EXPIRIES,
        kind: Kind::Counter,
        labels: &[],
        help: "Leases the reaper ended because their worker stopped heartbeating.",
    },
    Metric {
        name: FENCE_REJECTIONS,
        kind: Kind::Counter,
        labels: &["route"],
        help: "Calls refused by the fence (stale_attempt or lease_expired), by route.",
    },
    Metric {
        name: HTTP_DURATION,
        kind: Kind::Histogram,
        labels: &["route", "method", "status"],
        help: "Seconds from a request's arrival to its answer, by route template.",
    },
    Metric {
        name: RATE_LIMITED,
        kind: Kind::Counter,
        labels: &["scope"],
        help: "Requests refused 429 rate_limited, by the rate that refused them (worker, task, user, org).",
    },
    Metric {
        name: SINK_BATCHES,
        kind: Kind::Counter,
        labels: &["result"],
        help: "Buffer batches the sink judged: ingested, duplicate (already ingested), dead (malformed).",
    },
    Metric {
        name: TASKS_READY,
        kind: Kind::Gauge,
        labels: &["org", "runtime"],
        help: "Ready tasks (retry backoffs included), sampled at the scrape.",
    },
    Metric {
        name: OLDEST_READY_AGE,
        kind: Kind::Gauge,
        labels: &["org", "runtime"],
        help: "Seconds the oldest ready task has waited since it became ready, at the scrape.",
    },
    Metric {
        name: TASKS_LEASED,
        kind: Kind::Gauge,
        labels: &["runtime"],
        help: "Tasks held by a worker's lease, sampled at the scrape.",
    },
    Metric {
        name: OUTBOX_ROWS,
        kind: Kind::Gauge,
        labels: &["state"],
        help: "Outbox rows pending publication or dead, sampled at the scrape.",
    },
    Metric {
        name: DB_POOL,
        kind: Kind::Gauge,
        labels: &["state"],
        help: "This process's pooled database connections, in use or idle.",
    },
    Metric {
        name: RELAY_LAG,
        kind: Kind::Gauge,
        labels: &[],
        help: "Seconds the oldest pending outbox row has waited for the relay (0: none pending), at the scrape.",
    },
    Metric {
        name: SINK_PENDING,
        kind: Kind::Gauge,
        labels: &[],
        help: "Buffer batches published and not yet ingested or dead, at the scrape.",
    },
    Metric {
        name: SINK_LAG,
        kind: Kind::Gauge,
        labels: &[],
        help: "Seconds the oldest pending buffer batch has waited for the sink (0: none pending), at the scrape.",
    },
    Metric {
        name: ALERT_DELIVERIES,
        kind: Kind::Counter,
        labels: &["result"],
        help: "Webhook delivery tries: delivered, retry (failed, tried again later), dead (given up).",
    },
    Metric {
        name: DATASET_COMMITS,
        kind: Kind::Counter,
        labels: &[],
        help: "Dataset versions committed by completions answered 200 (a replayed completion counts again).",
    },
    Metric {
        name: RETENTION_DELETIONS,
        kind: Kind::Counter,
        labels: &["kind"],
        help: "Rows and objects deleted past their retention: job (with its tasks), log_object, outbox_row.",
    },
    Metric {
        name: WORKER_SLOTS,
        kind: Kind::Gauge,
        labels: &["runtime", "state"],
        help: "Slots (state total) and busy slots (state busy) of the workers that reported in the last 30 s, by runtime they run.",
    },
    Metric {
        name: READY_PER_SLOT,
        kind: Kind::Gauge,
        labels: &["runtime"],
        help: "Ready tasks of every org per slot of the workers running the runtime (with no slot: the ready count), at the scrape.",
    },
    Metric {
        name: BREAKERS,
        kind: Kind::Gauge,
        labels: &["kind", "state"],
        help: "Circuit breakers of this process by what they guard (sqs, s3, webhook) and state (closed, open, half_open), at the scrape.",
    },
    Metric {
        name: BREAKER_FAST_FAILS,
        kind: Kind::Counter,
        labels: &["kind"],
        help: "Calls an open breaker failed at once, without reaching the dependency.",
    },
    Metric {
        name: BREAKER_OPENED,
        kind: Kind::Counter,
        labels: &["kind"],
        help: "Times a breaker opened (a failed probe opens it again).",
    },
];

/// Installs the process's Prometheus recorder with this catalogue.
pub fn install() -> anyhow::Result<PrometheusHandle> {
    dispatcher_telemetry::metrics::install(CATALOGUE)
}

/// Samples the gauges read from the database, then renders every metric in
/// the Prometheus text format. A failed sample leaves the gauges as they
/// were and is logged; the scrape still answers.
pub async fn scrape(handle: &PrometheusHandle, store: &Store) -> String {
    if let Err(e) = sample(store).await {
        tracing::warn!(error = %e, "sampling the database gauges failed");
    }
    set_breakers(&crate::breaker::all());
    handle.run_upkeep();
    handle.render()
}

async fn sample(store: &Store) -> Result<(), crate::error::StoreError> {
    let outbox = store.outbox_counts().await?;
    metrics::gauge!(OUTBOX_ROWS, "state" => "pending").set(outbox.pending as f64);
    metrics::gauge!(OUTBOX_ROWS, "state" => "dead").set(outbox.dead as f64);
    let backlog = store.backlog_sample().await?;
    set_backlog(&backlog);
    set_capacity(&backlog, &store.slots_by_runtime().await?);
    let lag = store.lag_sample().await?;
    metrics::gauge!(RELAY_LAG).set(lag.relay_seconds);
    metrics::gauge!(SINK_PENDING).set(lag.sink_pending as f64);
    metrics::gauge!(SINK_LAG).set(lag.sink_seconds);
    let pool = store.pool();
    let (size, idle) = (pool.size() as f64, pool.num_idle() as f64);
    metrics::gauge!(DB_POOL, "state" => "in_use").set(size - idle);
    metrics::gauge!(DB_POOL, "state" => "idle").set(idle);
    Ok(())
}

/// The backlog series set so far: (org, runtime) of ready, runtimes of
/// leased.
type Seen = (BTreeSet<(String, String)>, BTreeSet<String>);

/// Sets the backlog gauges from one sample.
fn set_backlog(backlog: &crate::store::backlog::Backlog) {
    // Series seen before and absent now go to zero, not stay as they were.
    static SEEN: Mutex<Seen> = Mutex::new((BTreeSet::new(), BTreeSet::new()));
    let mut seen = SEEN.lock().unwrap_or_else(|p| p.into_inner());
    let mut ready: BTreeSet<(String, String)> = BTreeSet::new();
    for b in &backlog.ready {
        let key = (b.org_id.to_string(), b.runtime.clone());
        let labels = [("org", key.0.clone()), ("runtime", key.1.clone())];
        metrics::gauge!(TASKS_READY, &labels).set(b.ready as f64);
        metrics::gauge!(OLDEST_READY_AGE, &labels).set(b.oldest_age_seconds);
        ready.insert(key);
    }
    for (org, runtime) in seen.0.difference(&ready) {
        let labels = [("org", org.clone()), ("runtime", runtime.clone())];
        metrics::gauge!(TASKS_READY, &labels).set(0.0);
        metrics::gauge!(OLDEST_READY_AGE, &labels).set(0.0);
    }
    let leased: BTreeSet<String> = backlog.leased.iter().map(|(r, _)| r.clone()).collect();
    for (runtime, n) in &backlog.leased {
        metrics::gauge!(TASKS_LEASED, "runtime" => runtime.clone()).set(*n as f64);
    }
    for runtime in seen.1.difference(&leased) {
        metrics::gauge!(TASKS_LEASED, "runtime" => runtime.clone()).set(0.0);
    }
    seen.0.extend(ready);
    seen.1.extend(leased);
}

/// Sets the worker slot gauges and the backlog per slot, for every runtime
/// with ready tasks or slots (a runtime seen before and gone reads 0).
fn set_capacity(
    backlog: &crate::store::backlog::Backlog,
    slots: &[crate::store::workers::RuntimeSlots],
) {
    static SEEN: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());
    let mut seen = SEEN.lock().unwrap_or_else(|p| p.into_inner());
    let mut ready: std::collections::BTreeMap<String, i64> = Default::default();
    for b in &backlog.ready {
        *ready.entry(b.runtime.clone()).or_default() += b.ready;
    }
    let mut now: BTreeSet<String> = ready.keys().cloned().collect();
    now.extend(slots.iter().map(|s| s.runtime.clone()));
    for runtime in now.iter().chain(seen.iter()) {
        let s = slots.iter().find(|s| &s.runtime == runtime);
        let (total, busy) = s.map_or((0, 0), |s| (s.slots, s.busy));
        let r = runtime.clone();
        metrics::gauge!(WORKER_SLOTS, "runtime" => r.clone(), "state" => "total").set(total as f64);
        metrics::gauge!(WORKER_SLOTS, "runtime" => r.clone(), "state" => "busy").set(busy as f64);
        let waiting = ready.get(runtime).copied().unwrap_or(0) as f64;
        metrics::gauge!(READY_PER_SLOT, "runtime" => r).set(waiting / total.max(1) as f64);
    }
    seen.extend(now);
}

/// Sets the breaker gauges and counters from the live breakers (every
/// kind and state is written, zero when none is in it).
fn set_breakers(all: &[crate::breaker::BreakerView]) {
    for kind in ["sqs", "s3", "webhook"] {
        let of: Vec<_> = all.iter().filter(|b| b.kind == kind).collect();
        for state in ["closed", "open", "half_open"] {
            let n = of.iter().filter(|b| b.state == state).count();
            metrics::gauge!(BREAKERS, "kind" => kind, "state" => state).set(n as f64);
        }
        let fast: u64 = of.iter().map(|b| b.calls_failed_fast).sum();
        metrics::counter!(BREAKER_FAST_FAILS, "kind" => kind).absolute(fast);
        let opened: u64 = of.iter().map(|b| b.times_opened).sum();
        metrics::counter!(BREAKER_OPENED, "kind" => kind).absolute(opened);
    }
}

/// Counts a completion answered 200, and the versions it committed.
pub fn completed(c: &crate::domain::Completion, answer: &dispatcher_wire::CompleteResponse) {
    if !answer.versions.is_empty() {
        metrics::counter!(DATASET_COMMITS).increment(answer.versions.len() as u64);
    }
    let outcome = match c {
        crate::domain::Completion::Succeeded { .. } => "succeeded",
        crate::domain::Completion::Failed { .. } => "failed",
        crate::domain::Completion::Cancelled => "cancelled",
    };
    metrics::counter!(COMPLETIONS, "outcome" => outcome).increment(1);
}

/// How each background role's passes went, for the health detail.
#[derive(Debug, Default, Clone)]
struct RolePasses {
    last: Option<chrono::DateTime<chrono::Utc>>,
    last_ok: Option<chrono::DateTime<chrono::Utc>>,
    passes: u64,
    failures: u64,
    last_error: Option<String>,
}

static ROLES: Mutex<std::collections::BTreeMap<&'static str, RolePasses>> =
    Mutex::new(std::collections::BTreeMap::new());

/// Records one pass of a background role's loop (`relay`, `reaper`,
/// `pruner`, `sink`, `alert_router`, `alert_delivery`, `replicas`) and
/// how it went; the health detail shows the last.
pub fn role_pass<T, E: std::fmt::Display>(role: &'static str, result: &Result<T, E>) {
    let now = chrono::Utc::now();
    let mut roles = ROLES.lock().unwrap_or_else(|p| p.into_inner());
    let r = roles.entry(role).or_default();
    r.last = Some(now);
    r.passes += 1;
    match result {
        Ok(_) => r.last_ok = Some(now),
        Err(e) => {
            r.failures += 1;
            r.last_error = Some(e.to_string());
        }
    }
}

/// The operator's health detail (`GET /health` on the metrics listener):
/// each background role's last pass, the relay's and sink's lag, the
/// backlog per slot, the circuit breakers, the pool, the migrations.
/// `status` is `ok`, or `degraded` with its `problems` (a role's last pass
/// failed, a sample failed, a breaker is not closed, or migrations are
/// pending); 200 either way (readiness is `/readyz`'s).
pub async fn health_detail(store: &Store) -> serde_json::Value {
    use serde_json::json;
    let now = chrono::Utc::now();
    let ago = |t: Option<chrono::DateTime<chrono::Utc>>| {
        t.map(|t| (now - t).num_milliseconds() as f64 / 1000.0)
    };
    let mut problems: Vec<String> = Vec::new();
    let roles: serde_json::Map<String, serde_json::Value> = ROLES
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .map(|(name, r)| {
            if r.last != r.last_ok {
                problems.push(format!("{name}: its last pass failed"));
            }
            let v = json!({
                "last_pass_seconds_ago": ago(r.last),
                "last_ok_seconds_ago": ago(r.last_ok),
                "passes": r.passes,
                "failures": r.failures,
                "last_error": r.last_error,
            });
            ((*name).to_owned(), v)
        })
        .collect();
    let lag = match store.lag_sample().await {
        Ok(l) => json!({"relay_seconds": l.relay_seconds, "sink_pending": l.sink_pending,
                        "sink_seconds": l.sink_seconds}),
        Err(e) => {
            problems.push(format!("lag: {e}"));
            serde_json::Value::Null
        }
    };
    let capacity = match (store.backlog_sample().await, store.slots_by_runtime().await) {
        (Ok(backlog), Ok(slots)) => capacity_detail(&backlog, &slots),
        (Err(e), _) | (_, Err(e)) => {
            problems.push(format!("capacity: {e}"));
            serde_json::Value::Null
        }
    };
    let breakers = crate::breaker::all();
    for b in breakers.iter().filter(|b| b.state != "closed") {
        problems.push(format!("breaker {} is {}", b.name, b.state));
    }
    let pool = store.pool();
    let migrations = match store.pending_migrations().await {
        Ok(pending) => {
            if !pending.is_empty() {
                problems.push(format!("{} migrations pending", pending.len()));
            }
            json!({"known": crate::store::migration_count(), "pending": pending})
        }
        Err(e) => {
            problems.push(format!("migrations: {e}"));
            serde_json::Value::Null
        }
    };
    json!({
        "status": if problems.is_empty() { "ok" } else { "degraded" },
        "problems": problems,
        "version": env!("CARGO_PKG_VERSION"),
        "roles": roles,
        "lag": lag,
        "capacity": capacity,
        "breakers": breakers,
        "pool": {"size": pool.size(), "idle": pool.num_idle(),
                 "max": pool.options().get_max_connections()},
        "migrations": migrations,
    })
}

/// Ready tasks, slots, busy slots and ready per slot, by runtime.
fn capacity_detail(
    backlog: &crate::store::backlog::Backlog,
    slots: &[crate::store::workers::RuntimeSlots],
) -> serde_json::Value {
    let mut by: std::collections::BTreeMap<String, (i64, i64, i64)> = Default::default();
    for b in &backlog.ready {
        by.entry(b.runtime.clone()).or_default().0 += b.ready;
    }
    for s in slots {
        let e = by.entry(s.runtime.clone()).or_default();
        (e.1, e.2) = (s.slots, s.busy);
    }
    by.into_iter()
        .map(|(runtime, (ready, slots, busy))| {
            let per_slot = ready as f64 / slots.max(1) as f64;
            let v = serde_json::json!({"ready": ready, "slots": slots, "busy": busy,
                                       "ready_per_slot": per_slot});
            (runtime, v)
        })
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// The CloudWatch Embedded Metric Format lines of one sample: per runtime
/// `ReadyTasksPerSlot` (the autoscaling signal, as
/// `dispatcher_ready_tasks_per_slot`), `ReadyTasks` and `WorkerSlots`
/// (dimension `Runtime`; every runtime, 0 when idle, so the series never
/// goes missing), and the lags and dead rows the alarms watch
/// (`OutboxDeadRows`, `OutboxOldestPendingAgeSeconds`,
/// `SinkOldestPendingAgeSeconds`, no dimension).
pub async fn emf_lines(
    store: &Store,
    namespace: &str,
) -> Result<Vec<String>, crate::error::StoreError> {
    use serde_json::json;
    let backlog = store.backlog_sample().await?;
    let slots = store.slots_by_runtime().await?;
    let outbox = store.outbox_counts().await?;
    let lag = store.lag_sample().await?;
    let ts = chrono::Utc::now().timestamp_millis();
    let metric = |names: &[&str], dims: &[&str]| {
        let metrics: Vec<_> = names
            .iter()
            .map(|n| {
                let unit = if n.ends_with("Seconds") {
                    "Seconds"
                } else {
                    "Count"
                };
                json!({"Name": n, "Unit": unit})
            })
            .collect();
        json!({"Timestamp": ts, "CloudWatchMetrics": [
            {"Namespace": namespace, "Dimensions": [dims], "Metrics": metrics}
        ]})
    };
    let mut runtimes: BTreeSet<String> =
        ["exec", "python", "node", "rust"].map(String::from).into();
    runtimes.extend(backlog.ready.iter().map(|b| b.runtime.clone()));
    runtimes.extend(slots.iter().map(|s| s.runtime.clone()));
    let mut lines = Vec::new();
    for runtime in runtimes {
        let ready: i64 = backlog
            .ready
            .iter()
            .filter(|b| b.runtime == runtime)
            .map(|b| b.ready)
            .sum();
        let total = slots
            .iter()
            .find(|s| s.runtime == runtime)
            .map_or(0, |s| s.slots);
        let line = json!({
            "_aws": metric(&["ReadyTasksPerSlot", "ReadyTasks", "WorkerSlots"], &["Runtime"]),
            "Runtime": runtime,
            "ReadyTasksPerSlot": ready as f64 / total.max(1) as f64,
            "ReadyTasks": ready,
            "WorkerSlots": total,
        });
        lines.push(line.to_string());
    }
    let names = [
        "OutboxDeadRows",
        "OutboxOldestPendingAgeSeconds",
        "SinkOldestPendingAgeSeconds",
    ];
    let line = json!({
        "_aws": metric(&names, &[]),
        "OutboxDeadRows": outbox.dead,
        "OutboxOldestPendingAgeSeconds": lag.relay_seconds,
        "SinkOldestPendingAgeSeconds": lag.sink_seconds,
    });
    lines.push(line.to_string());
    Ok(lines)
}

/// Prints [`emf_lines`] to stdout every `every` until `shutdown` (each
/// replica does; the alarms and the scaling policy read the Maximum, which
/// duplicates do not change).
pub async fn publish_emf(
    store: Store,
    namespace: String,
    every: std::time::Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let sample = emf_lines(&store, &namespace).await;
        role_pass("emf", &sample);
        match sample {
            Ok(lines) => {
                use std::io::Write as _;
                let mut out = std::io::stdout().lock();
                for line in lines {
                    let _ = writeln!(out, "{line}");
                }
                let _ = out.flush();
            }
            Err(e) => tracing::warn!(error = %e, "sampling the backlog for CloudWatch failed"),
        }
    }
}

/// Serves `GET /metrics` on its own listener until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    handle: PrometheusHandle,
    store: Store,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    let render = {
        let store = store.clone();
        move || {
            let (handle, store) = (handle.clone(), store.clone());
            async move { scrape(&handle, &store).await }
        }
    };
    let health = axum::Router::new().route(
        "/health",
        axum::routing::get(move || {
            let store = store.clone();
            async move { axum::Json(health_detail(&store).await) }
        }),
    );
    dispatcher_telemetry::metrics::serve(listener, render, health, async move {
        shutdown.cancelled().await
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn root() -> &'static Path {
        Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
    }

    #[test]
    fn the_catalogue_and_docs_standards_metrics_md_name_the_same_metrics() {
        let doc = std::fs::read_to_string(root().join("docs/standards/metrics.md")).unwrap();
        let wrong = dispatcher_telemetry::metrics::disagreements(CATALOGUE, &doc, "dispatcher_");
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }

    /// Every recording names its metric by a catalogue constant, so no
    /// metric can exist in the code without its catalogue entry (and so
    /// its documentation).
    #[test]
    fn no_metric_is_recorded_under_a_name_outside_the_catalogue() {
        let found = dispatcher_telemetry::metrics::unknown_recordings(
            &root().join("dispatcher/src"),
            &root().join("dispatcher/src/metrics.rs"),
            CATALOGUE,
        );
        assert!(
            found.is_empty(),
            "metrics recorded by a name not in the catalogue:\n{}",
            found.join("\n")
        );
    }
}

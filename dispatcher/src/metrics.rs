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
use std::sync::{Mutex, OnceLock};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::store::Store;

/// What kind of series a metric is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// One metric: its name, kind, labels and help text.
#[derive(Debug)]
pub struct Metric {
    pub name: &'static str,
    pub kind: Kind,
    pub labels: &'static [&'static str],
    pub help: &'static str,
}

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
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Whether a recorder is installed (`serve --metrics-bind`): callers that
/// would build labels for nothing ask first.
pub fn enabled() -> bool {
    HANDLE.get().is_some()
}

/// Installs the process's Prometheus recorder (once; later calls answer
/// the same handle). Latency histograms get buckets from 1 ms to 5 min.
pub fn install() -> anyhow::Result<PrometheusHandle> {
    if let Some(h) = HANDLE.get() {
        return Ok(h.clone());
    }
    let buckets = [
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
        300.0,
    ];
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &buckets)?
        .build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder)
        .map_err(|e| anyhow::anyhow!("installing the metrics recorder: {e}"))?;
    for m in CATALOGUE {
        match m.kind {
            Kind::Counter => metrics::describe_counter!(m.name, m.help),
            Kind::Gauge => metrics::describe_gauge!(m.name, m.help),
            Kind::Histogram => metrics::describe_histogram!(m.name, m.help),
        }
    }
    Ok(HANDLE.get_or_init(|| handle).clone())
}

/// Samples the gauges read from the database, then renders every metric in
/// the Prometheus text format. A failed sample leaves the gauges as they
/// were and is logged; the scrape still answers.
pub async fn scrape(handle: &PrometheusHandle, store: &Store) -> String {
    if let Err(e) = sample(store).await {
        tracing::warn!(error = %e, "sampling the database gauges failed");
    }
    handle.run_upkeep();
    handle.render()
}

async fn sample(store: &Store) -> Result<(), crate::error::StoreError> {
    set_backlog(&store.backlog_sample().await?);
    let outbox = store.outbox_counts().await?;
    metrics::gauge!(OUTBOX_ROWS, "state" => "pending").set(outbox.pending as f64);
    metrics::gauge!(OUTBOX_ROWS, "state" => "dead").set(outbox.dead as f64);
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

/// Counts a completion answered 200.
pub fn completed(c: &crate::domain::Completion) {
    let outcome = match c {
        crate::domain::Completion::Succeeded { .. } => "succeeded",
        crate::domain::Completion::Failed { .. } => "failed",
        crate::domain::Completion::Cancelled => "cancelled",
    };
    metrics::counter!(COMPLETIONS, "outcome" => outcome).increment(1);
}

/// Serves `GET /metrics` on its own listener until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    handle: PrometheusHandle,
    store: Store,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    use axum::routing::get;
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let (handle, store) = (handle.clone(), store.clone());
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    scrape(&handle, &store).await,
                )
            }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::path::Path;

    fn root() -> &'static Path {
        Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
    }

    /// `| `name` | type | labels | …` rows of docs/standards/metrics.md.
    fn documented() -> BTreeMap<String, (String, Vec<String>)> {
        let text = std::fs::read_to_string(root().join("docs/standards/metrics.md")).unwrap();
        text.lines()
            .filter(|l| l.starts_with("| `dispatcher_"))
            .map(|l| {
                let cells: Vec<&str> = l.split('|').map(str::trim).collect();
                let name = cells[1].trim_matches('`').to_owned();
                let kind = cells[2].split_whitespace().next().unwrap_or("").to_owned();
                let labels = cells[3]
                    .split(',')
                    .map(|c| c.trim().trim_matches('`').to_owned())
                    .filter(|c| !c.is_empty())
                    .collect();
                (name, (kind, labels))
            })
            .collect()
    }

    #[test]
    fn the_catalogue_and_docs_standards_metrics_md_name_the_same_metrics() {
        let docs = documented();
        let code: BTreeMap<String, (String, Vec<String>)> = CATALOGUE
            .iter()
            .map(|m| {
                let labels = m.labels.iter().map(|l| l.to_string()).collect();
                (m.name.to_owned(), (m.kind.as_str().to_owned(), labels))
            })
            .collect();
        for (name, row) in &code {
            assert_eq!(
                docs.get(name),
                Some(row),
                "{name}: the docs' row differs or is missing"
            );
        }
        for name in docs.keys() {
            assert!(
                code.contains_key(name),
                "{name} is documented but not in the code"
            );
        }
        for m in CATALOGUE {
            assert!(m.name.starts_with("dispatcher_"), "{}", m.name);
            match m.kind {
                Kind::Counter => assert!(m.name.ends_with("_total"), "{}", m.name),
                _ => assert!(!m.name.ends_with("_total"), "{}", m.name),
            }
        }
    }

    /// Every recording names its metric by a catalogue constant, so no
    /// metric can exist in the code without its catalogue entry (and so
    /// its documentation).
    #[test]
    fn no_metric_is_recorded_under_a_name_outside_the_catalogue() {
        fn walk(dir: &Path, found: &mut Vec<String>) {
            for e in std::fs::read_dir(dir).unwrap() {
                let path = e.unwrap().path();
                if path.is_dir() {
                    walk(&path, found);
                } else if path.extension().is_some_and(|x| x == "rs") {
                    let text = std::fs::read_to_string(&path).unwrap();
                    // Tests may record what they like.
                    let text = text.split("#[cfg(test)]").next().unwrap_or_default();
                    for macro_name in ["counter!(", "gauge!(", "histogram!("] {
                        for (i, _) in text.match_indices(macro_name) {
                            let arg = text[i + macro_name.len()..].trim_start();
                            let name: String = arg
                                .chars()
                                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                                .collect();
                            let constant = name.rsplit("::").next().unwrap_or_default();
                            // `m.name`: `install` describing the catalogue.
                            let known = constant == "m"
                                || source_constants()
                                    .get(constant)
                                    .is_some_and(|value| CATALOGUE.iter().any(|m| m.name == value));
                            if !known {
                                found.push(format!(
                                    "{}: {macro_name}{}",
                                    path.display(),
                                    &arg[..arg.len().min(40)]
                                ));
                            }
                        }
                    }
                }
            }
        }
        let mut found = Vec::new();
        walk(&root().join("dispatcher/src"), &mut found);
        assert!(
            found.is_empty(),
            "metrics recorded by a name not in the catalogue:\n{}",
            found.join("\n")
        );
    }

    /// This module's `pub const X: &str = "dispatcher_…";`, name → value.
    fn source_constants() -> BTreeMap<String, String> {
        let text = std::fs::read_to_string(root().join("dispatcher/src/metrics.rs")).unwrap();
        text.lines()
            .filter_map(|l| l.strip_prefix("pub const "))
            .filter_map(|l| {
                let (name, value) = l.split_once(": &str = ")?;
                Some((
                    name.to_owned(),
                    value.trim_end_matches(';').trim_matches('"').to_owned(),
                ))
            })
            .collect()
    }
}

//! The worker wrapper's Prometheus metrics (issue 26, ADR 0022), served on
//! `--metrics-bind` when given: its slots, its attempts and their
//! durations, its runners' cold starts and invocations. Named here only,
//! documented in `docs/standards/metrics.md` (a test keeps the two equal).
//! Labels are runtimes, outcomes and start kinds: never a task id.

use dispatcher_telemetry::metrics::{Kind, Metric};

pub const SLOTS: &str = "worker_wrapper_slots";
pub const SLOTS_BUSY: &str = "worker_wrapper_slots_busy";
pub const ATTEMPTS: &str = "worker_wrapper_attempts_total";
pub const ATTEMPT_DURATION: &str = "worker_wrapper_attempt_duration_seconds";
pub const COLD_STARTS: &str = "worker_wrapper_runner_cold_starts_total";
pub const INVOKE_DURATION: &str = "worker_wrapper_invoke_duration_seconds";

pub const CATALOGUE: &[Metric] = &[
    Metric {
        name: SLOTS,
        kind: Kind::Gauge,
        labels: &[],
        help: "Tasks this worker runs at once (--concurrency).",
    },
    Metric {
        name: SLOTS_BUSY,
        kind: Kind::Gauge,
        labels: &[],
        help: "Slots holding a claimed task now.",
    },
    Metric {
        name: ATTEMPTS,
        kind: Kind::Counter,
        labels: &["runtime", "outcome"],
        help: "Attempts this worker ended: succeeded, failed, cancelled (completed), handed_back, abandoned (lease lost).",
    },
    Metric {
        name: ATTEMPT_DURATION,
        kind: Kind::Histogram,
        labels: &["runtime", "outcome"],
        help: "Seconds from an attempt's claim to its end (the completion's answer, hand-back or loss).",
    },
    Metric {
        name: COLD_STARTS,
        kind: Kind::Counter,
        labels: &["runtime"],
        help: "Runners started for a bundle (fetch, unpack, start, init).",
    },
    Metric {
        name: INVOKE_DURATION,
        kind: Kind::Histogram,
        labels: &["runtime", "start"],
        help: "Seconds of one invocation on a runner, cold (start and init included) or warm.",
    },
];

/// Installs the recorder and serves `/metrics` on `listener` until
/// `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    slots: usize,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    let handle = dispatcher_telemetry::metrics::install(CATALOGUE)?;
    metrics::gauge!(SLOTS).set(slots as f64);
    metrics::gauge!(SLOTS_BUSY).set(0.0);
    let render = move || {
        let handle = handle.clone();
        async move {
            handle.run_upkeep();
            handle.render()
        }
    };
    dispatcher_telemetry::metrics::serve(listener, render, axum::Router::new(), async move {
        shutdown.cancelled().await
    })
    .await?;
    Ok(())
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
        let wrong =
            dispatcher_telemetry::metrics::disagreements(CATALOGUE, &doc, "worker_wrapper_");
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }

    #[test]
    fn no_metric_is_recorded_under_a_name_outside_the_catalogue() {
        let found = dispatcher_telemetry::metrics::unknown_recordings(
            &root().join("worker-wrapper/src"),
            &root().join("worker-wrapper/src/metrics.rs"),
            CATALOGUE,
        );
        assert!(found.is_empty(), "{}", found.join("\n"));
    }
}

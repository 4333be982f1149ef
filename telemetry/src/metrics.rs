//! Prometheus metrics shared by the dispatcher and the worker wrapper
//! (ADR 0022): a catalogue type, the recorder, the `/metrics` listener,
//! and the checks that keep a catalogue, its recordings and
//! `docs/standards/metrics.md` equal.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

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

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Whether a recorder is installed: callers that would build labels for
/// nothing ask first.
pub fn enabled() -> bool {
    HANDLE.get().is_some()
}

/// Installs the process's Prometheus recorder (once; later calls answer
/// the same handle) and describes `catalogue`. Latency histograms (names
/// ending `_seconds`) get buckets from 1 ms to 5 min.
pub fn install(catalogue: &[Metric]) -> anyhow::Result<PrometheusHandle> {
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
    for m in catalogue {
        match m.kind {
            Kind::Counter => metrics::describe_counter!(m.name, m.help),
            Kind::Gauge => metrics::describe_gauge!(m.name, m.help),
            Kind::Histogram => metrics::describe_histogram!(m.name, m.help),
        }
    }
    Ok(HANDLE.get_or_init(|| handle).clone())
}

/// Serves `GET /metrics` on its own listener until `shutdown` resolves,
/// answering what `render` gives (in the Prometheus text format), beside
/// the routes of `more` (such as an operator's health detail).
pub async fn serve<F, R>(
    listener: tokio::net::TcpListener,
    render: R,
    more: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()>
where
    R: Fn() -> F + Clone + Send + Sync + 'static,
    F: Future<Output = String> + Send + 'static,
{
    let app = more.route(
        "/metrics",
        axum::routing::get(move || {
            let render = render.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    render().await,
                )
            }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

// -------------------------------------------------------------- checks ---

/// `name → (kind, labels)` of a catalogue.
pub fn rows(catalogue: &[Metric]) -> BTreeMap<String, (String, Vec<String>)> {
    catalogue
        .iter()
        .map(|m| {
            let labels = m.labels.iter().map(|l| l.to_string()).collect();
            (m.name.to_owned(), (m.kind.as_str().to_owned(), labels))
        })
        .collect()
}

/// The `| `name` | type | labels | …` rows of a metrics document whose
/// names start with `prefix`.
pub fn documented(doc: &str, prefix: &str) -> BTreeMap<String, (String, Vec<String>)> {
    let start = format!("| `{prefix}");
    doc.lines()
        .filter(|l| l.starts_with(&start))
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

/// Where a catalogue and its documentation disagree, and names that break
/// the conventions (the prefix; `_total` on counters only).
pub fn disagreements(catalogue: &[Metric], doc: &str, prefix: &str) -> Vec<String> {
    let docs = documented(doc, prefix);
    let code = rows(catalogue);
    let mut out = Vec::new();
    for (name, row) in &code {
        if docs.get(name) != Some(row) {
            out.push(format!(
                "{name}: the docs' row {:?} differs from the code's {row:?}",
                docs.get(name)
            ));
        }
    }
    for name in docs.keys().filter(|n| !code.contains_key(*n)) {
        out.push(format!("{name} is documented but not in the code"));
    }
    for m in catalogue {
        if !m.name.starts_with(prefix) {
            out.push(format!("{}: not prefixed {prefix}", m.name));
        }
        if (m.kind == Kind::Counter) != m.name.ends_with("_total") {
            out.push(format!("{}: only counters end in _total", m.name));
        }
    }
    out
}

/// Recordings (`counter!(`, `gauge!(`, `histogram!(`) under `dir` whose
/// name is not one of `constants_file`'s `pub const X: &str = "…";` with a
/// value in `catalogue`: a metric that would exist in the code without its
/// catalogue entry (and so its documentation). Test code is not looked at.
pub fn unknown_recordings(dir: &Path, constants_file: &Path, catalogue: &[Metric]) -> Vec<String> {
    let constants: BTreeMap<String, String> = std::fs::read_to_string(constants_file)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("pub const "))
        .filter_map(|l| {
            let (name, value) = l.split_once(": &str = ")?;
            Some((
                name.to_owned(),
                value.trim_end_matches(';').trim_matches('"').to_owned(),
            ))
        })
        .collect();
    let mut found = Vec::new();
    walk(dir, &mut |path, text| {
        let text = text.split("#[cfg(test)]").next().unwrap_or_default();
        for macro_name in ["counter!(", "gauge!(", "histogram!("] {
            for (i, _) in text.match_indices(macro_name) {
                let arg = text[i + macro_name.len()..].trim_start();
                let name: String = arg
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                    .collect();
                let constant = name.rsplit("::").next().unwrap_or_default();
                // `m.name`: `install` describing a catalogue.
                let known = constant == "m"
                    || constants
                        .get(constant)
                        .is_some_and(|value| catalogue.iter().any(|m| m.name == value));
                if !known {
                    found.push(format!(
                        "{}: {macro_name}{}",
                        path.display(),
                        &arg[..arg.len().min(40)]
                    ));
                }
            }
        }
    });
    found
}

fn walk(dir: &Path, each: &mut dyn FnMut(&Path, &str)) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        if path.is_dir() {
            walk(&path, each);
        } else if path.extension().is_some_and(|x| x == "rs") {
            if let Ok(text) = std::fs::read_to_string(&path) {
                each(&path, &text);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO: &[Metric] = &[
        Metric {
            name: "x_calls_total",
            kind: Kind::Counter,
            labels: &["route"],
            help: "",
        },
        Metric {
            name: "x_busy",
            kind: Kind::Gauge,
            labels: &[],
            help: "",
        },
    ];

    #[test]
    fn a_catalogue_and_its_document_disagree_by_row_kind_label_and_convention() {
        let doc = "| `x_calls_total` | counter | `route` | calls | … |\n| `x_busy` | gauge (sampled) | | slots | … |\n";
        assert!(disagreements(TWO, doc, "x_").is_empty());
        let missing = "| `x_calls_total` | counter | `route` | calls | … |\n";
        assert_eq!(disagreements(TWO, missing, "x_").len(), 1);
        let other_label = doc.replace("`route`", "`method`");
        assert_eq!(disagreements(TWO, &other_label, "x_").len(), 1);
        let extra = format!("{doc}| `x_gone` | gauge | | s | … |\n");
        assert_eq!(disagreements(TWO, &extra, "x_").len(), 1);
        assert!(disagreements(TWO, doc, "y_").len() >= 2);
    }
}

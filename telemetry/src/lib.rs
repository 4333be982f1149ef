//! Logs and traces of the dispatcher and the worker wrapper (issue 26,
//! ADR 0023).
//!
//! - **Logs** go to stderr as text or as JSON lines ([`LogFormat`]); a JSON
//!   line carries the fields of every span it was written in (a request's
//!   route and org, an attempt's job, task and attempt, and the trace id).
//! - **Traces** are exported over OTLP/HTTP when the standard variables ask
//!   for it (`OTEL_EXPORTER_OTLP_ENDPOINT` or
//!   `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, unless `OTEL_TRACES_EXPORTER=none`;
//!   headers, timeout, protocol, sampler, batch delay and service name by
//!   their `OTEL_*` variables too), and are off otherwise: then no span is
//!   recorded and nothing of this costs more than a branch.
//! - **Context** crosses processes as a W3C `traceparent`: a job stores the
//!   one of its submission, a claim hands it to the worker, and the worker
//!   hands its attempt's to the UDF as `TRACEPARENT`.

pub mod metrics;

use std::collections::HashMap;
use std::sync::OnceLock;

use anyhow::{bail, Context as _, Result};
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{SpanContext, TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::WithHttpConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines (colours on a terminal).
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, the
    /// event's fields (`message` among them) and `spans`, the fields of
    /// each span the line was written in, outermost first.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("log format {other:?}: expected text or json")),
        }
    }
}

static ENABLED: OnceLock<bool> = OnceLock::new();

/// Whether traces are exported (set once by [`init`]).
pub fn enabled() -> bool {
    ENABLED.get().copied().unwrap_or(false)
}

/// Flushes the spans still buffered when dropped (or by [`Telemetry::shutdown`]).
#[must_use = "dropping it at once would stop the trace export"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports what is buffered and stops the exporter. Blocks (up to the
    /// exporter's timeout): call it off the async runtime's threads.
    pub fn shutdown(&mut self) {
        if let Some(p) = self.provider.take() {
            if let Err(e) = p.shutdown() {
                eprintln!("trace export: shutting down: {e}");
            }
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Whether the `OTEL_*` variables ask for trace export, and where.
fn otlp_requested() -> Result<bool> {
    let set = |k: &str| std::env::var(k).is_ok_and(|v| !v.trim().is_empty());
    match std::env::var("OTEL_TRACES_EXPORTER").as_deref() {
        Ok("none") => return Ok(false),
        Ok("otlp") | Err(_) => {}
        Ok(other) => bail!("OTEL_TRACES_EXPORTER={other:?}: only otlp and none are supported"),
    }
    Ok(set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

/// Installs the process's log subscriber (filter from `RUST_LOG`, else
/// `default_filter`) and, when the `OTEL_*` variables ask for it, the
/// trace exporter. Must run inside the Tokio runtime that the exporter's
/// HTTP calls will use.
pub fn init(service: &str, default_filter: &str, format: LogFormat) -> Result<Telemetry> {
    let filter = || {
        tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| default_filter.into())
    };
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(ansi)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .with_current_span(false)
            .with_span_list(true)
            .boxed(),
    };
    let provider = if otlp_requested()? {
        Some(provider(service)?)
    } else {
        None
    };
    let _ = ENABLED.set(provider.is_some());
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer(service.to_owned()))
            .with_filter(filter())
    });
    tracing_subscriber::registry()
        .with(fmt.with_filter(filter()))
        .with(otel)
        .try_init()
        .context("installing the log subscriber")?;
    if provider.is_some() {
        tracing::info!(service, "exporting traces over OTLP/HTTP");
    }
    Ok(Telemetry { provider })
}

fn provider(service: &str) -> Result<SdkTracerProvider> {
    let http = Http {
        client: reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(10))
            .build()
            .context("building the trace exporter's HTTP client")?,
        runtime: tokio::runtime::Handle::try_current()
            .context("the trace exporter needs the Tokio runtime")?,
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(http)
        .build()
        .context("configuring the OTLP trace exporter from OTEL_EXPORTER_OTLP_*")?;
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(service.to_owned());
    }
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build())
}

/// The exporter's HTTP client: the process's own `reqwest` on its Tokio
/// runtime (the SDK's batch processor runs on a thread of its own, where
/// no runtime is entered).
#[derive(Debug)]
struct Http {
    client: reqwest::Client,
    runtime: tokio::runtime::Handle,
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for Http {
    async fn send_bytes(
        &self,
        request: opentelemetry_http::Request<opentelemetry_http::Bytes>,
    ) -> Result<
        opentelemetry_http::Response<opentelemetry_http::Bytes>,
        opentelemetry_http::HttpError,
    > {
        let client = self.client.clone();
        let call = async move {
            let response = client.execute(reqwest::Request::try_from(request)?).await?;
            let status = response.status();
            let headers = response.headers().clone();
            let body = response.bytes().await?;
            let mut out = opentelemetry_http::Response::builder()
                .status(status)
                .body(body)?;
            *out.headers_mut() = headers;
            Ok::<_, opentelemetry_http::HttpError>(out)
        };
        self.runtime.spawn(call).await?
    }
}

// ------------------------------------------------------------- context ---

fn extract(traceparent: &str) -> opentelemetry::Context {
    let carrier = HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
    TraceContextPropagator::new().extract(&carrier)
}

/// The span context a W3C `traceparent` names, if it is well formed
/// (version `00`, non-zero trace and parent ids); `None` otherwise, as the
/// W3C recommendation says to treat a malformed one.
pub fn parse(traceparent: &str) -> Option<SpanContext> {
    let traceparent = traceparent.trim();
    // The shape first (the propagator takes shorter ids): lowercase hex
    // fields of 2, 32, 16 and 2 digits.
    let lengths: Vec<usize> = traceparent.split('-').map(str::len).collect();
    let hex = traceparent
        .bytes()
        .all(|b| b == b'-' || b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if lengths != [2, 32, 16, 2] || !hex {
        return None;
    }
    let cx = extract(traceparent);
    let sc = cx.span().span_context().clone();
    sc.is_valid().then_some(sc)
}

/// The `traceparent` of a span context.
pub fn format(sc: &SpanContext) -> String {
    format!(
        "00-{}-{}-{:02x}",
        sc.trace_id(),
        sc.span_id(),
        sc.trace_flags().to_u8()
    )
}

/// Makes `traceparent` (if well formed) the parent of `span`, and records
/// the trace id in its `trace_id` field (which the span must declare, as
/// `tracing::field::Empty`) so that log lines carry it, traces on or off.
pub fn continue_from(span: &tracing::Span, traceparent: Option<&str>) {
    if let Some(sc) = traceparent.and_then(parse) {
        if enabled() {
            let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(sc));
        } else {
            span.record("trace_id", sc.trace_id().to_string());
            return;
        }
    }
    record_trace_id(span);
}

/// Records the span's own trace id in its `trace_id` field, if it has one
/// (only when traces are on).
pub fn record_trace_id(span: &tracing::Span) {
    if let Some(sc) = recording(span) {
        span.record("trace_id", sc.trace_id().to_string());
    }
}

/// The span's context, if it is recorded (traces on, and sampled or not).
fn recording(span: &tracing::Span) -> Option<SpanContext> {
    if !enabled() {
        return None;
    }
    let sc = span.context().span().span_context().clone();
    sc.is_valid().then_some(sc)
}

/// The `traceparent` naming `span` as the parent, when traces are on.
pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
    recording(span).map(|sc| format(&sc))
}

/// The AWS X-Ray form of a `traceparent`, as Lambda's runtime API sends it
/// in `Lambda-Runtime-Trace-Id`: `Root=1-{8 hex}-{24 hex};Parent={16 hex};Sampled={0|1}`.
pub fn xray_trace_id(traceparent: &str) -> Option<String> {
    let sc = parse(traceparent)?;
    let trace = sc.trace_id().to_string();
    Some(format!(
        "Root=1-{}-{};Parent={};Sampled={}",
        &trace[..8],
        &trace[8..],
        sc.span_id(),
        u8::from(sc.is_sampled())
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traceparent_round_trips_and_malformed_ones_are_none() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let sc = parse(tp).unwrap();
        assert_eq!(format(&sc), tp);
        assert!(sc.is_sampled());
        for bad in [
            "",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "zz-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "not a traceparent",
        ] {
            assert!(parse(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn the_xray_form_splits_the_trace_id_after_its_first_eight_digits() {
        assert_eq!(
            xray_trace_id("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").as_deref(),
            Some("Root=1-4bf92f35-77b34da6a3ce929d0e0e4736;Parent=00f067aa0ba902b7;Sampled=1")
        );
        assert_eq!(
            xray_trace_id("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00")
                .unwrap()
                .rsplit('=')
                .next(),
            Some("0")
        );
    }

    #[test]
    fn log_formats_parse_and_others_are_refused_by_name() {
        assert_eq!("json".parse(), Ok(LogFormat::Json));
        assert_eq!("text".parse(), Ok(LogFormat::Text));
        assert!("yaml".parse::<LogFormat>().unwrap_err().contains("yaml"));
    }
}

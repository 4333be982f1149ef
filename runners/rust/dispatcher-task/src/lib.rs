//! Rust UDFs for the dispatcher.
//!
//! A Rust bundle is a program named by its manifest's `handler` (usually
//! `bootstrap`), built with this crate and AWS's `lambda_runtime`: it runs
//! unchanged under the worker wrapper's local Runtime API and as a Lambda
//! custom runtime. [`run`] serves invocations one at a time and hands the
//! handler the task's inputs and a [`Task`], a client of the task API that
//! holds the invocation's capability token and refreshes it from the host
//! before it expires.
//!
//! ```no_run
//! use dispatcher_task::{run, Task, UdfError};
//! use serde_json::{json, Value};
//!
//! #[tokio::main]
//! async fn main() -> Result<(), lambda_runtime::Error> {
//!     run(|inputs: Value, task: Task| async move {
//!         task.emit("log", json!({"msg": "hello"})).await?;
//!         Ok::<_, UdfError>(json!({"echo": inputs}))
//!     })
//!     .await
//! }
//! ```

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use lambda_runtime::{service_fn, Diagnostic, LambdaEvent};
use serde_json::{json, Value};
use sha2::Digest as _;

pub use lambda_runtime;

/// A handler's failure: its type and message reach the task's error as
/// `"{error_type}: {message}"`.
#[derive(Debug)]
pub struct UdfError {
    pub error_type: String,
    pub message: String,
}

impl UdfError {
    pub fn new(error_type: impl Into<String>, message: impl Into<String>) -> Self {
        UdfError {
            error_type: error_type.into(),
            message: message.into(),
        }
    }
}

impl std::fmt::Display for UdfError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.error_type, self.message)
    }
}

impl std::error::Error for UdfError {}

impl From<UdfError> for Diagnostic {
    fn from(e: UdfError) -> Diagnostic {
        Diagnostic {
            error_type: e.error_type,
            error_message: e.message,
        }
    }
}

impl From<TaskError> for UdfError {
    fn from(e: TaskError) -> UdfError {
        UdfError::new("TaskError", e.to_string())
    }
}

/// A refused or failed call of the task API.
#[derive(Debug)]
pub struct TaskError {
    /// `0` when no answer came.
    pub status: u16,
    /// The contract's error code (`stale_attempt`, `lease_expired`, …).
    pub code: String,
    pub message: String,
}

impl std::fmt::Display for TaskError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status, self.code, self.message)
    }
}

impl std::error::Error for TaskError {}

fn transport(e: reqwest::Error) -> TaskError {
    TaskError {
        status: 0,
        code: "transport".into(),
        message: e.to_string(),
    }
}

/// The task an invocation runs, and a client of its API.
pub struct Task {
    url: String,
    token: Arc<Mutex<String>>,
    token_url: Option<String>,
    /// As a Lambda function (no host to ask), how often the token is
    /// refreshed by a heartbeat of the attempt's own (ADR 0026).
    refresh_seconds: Option<u64>,
    http: reqwest::Client,
    seq: AtomicU64,
    pub task_id: String,
    pub job_id: String,
    pub key: String,
    pub attempt: u64,
    /// The W3C trace context the invocation runs under (the attempt's
    /// child), also set as `TRACEPARENT` and sent on every call, so spans
    /// the handler starts join the job's trace.
    pub traceparent: Option<String>,
    pub object_prefix: String,
    pub outputs: Vec<String>,
    pub reads: Vec<String>,
    /// The invocation's deadline (epoch milliseconds).
    pub deadline_ms: u64,
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// `exp` of a JWT, unverified (only to know when to refresh).
fn expiry(token: &str) -> u64 {
    token
        .split('.')
        .nth(1)
        .and_then(|p| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(p)
                .ok()
        })
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .and_then(|v| v["exp"].as_u64())
        .unwrap_or(0)
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn ndjson(rows: &[Value]) -> Vec<u8> {
    rows.iter()
        .flat_map(|r| {
            let mut line = serde_json::to_vec(r).unwrap_or_default();
            line.push(b'\n');
            line
        })
        .collect()
}

impl Task {
    /// The task of an invocation's event, and its inputs.
    pub fn from_event(event: &Value, deadline_ms: u64) -> (Task, Value) {
        let d = &event["dispatcher"];
        let t = &event["task"];
        let s = |v: &Value| v.as_str().unwrap_or("").to_owned();
        let task = Task {
            url: s(&d["url"]).trim_end_matches('/').to_owned(),
            token: Arc::new(Mutex::new(s(&d["token"]))),
            token_url: d["token_url"].as_str().map(str::to_owned),
            refresh_seconds: d["refresh_seconds"].as_u64().filter(|s| *s > 0),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(300))
                .build()
                .unwrap_or_default(),
            seq: AtomicU64::new(0),
            task_id: s(&t["task_id"]),
            job_id: s(&t["job_id"]),
            key: s(&t["key"]),
            attempt: t["attempt"].as_u64().unwrap_or(0),
            traceparent: None,
            object_prefix: s(&t["object_prefix"]),
            outputs: strings(&t["outputs"]),
            reads: strings(&t["reads"]),
            deadline_ms,
        };
        let inputs = event.get("inputs").cloned().unwrap_or_else(|| json!({}));
        (task, inputs)
    }

    /// Without a host to ask, refreshes the token every `refresh_seconds`
    /// with a heartbeat until the returned task is aborted (at the end of
    /// the invocation) or the attempt is over.
    fn refresher(&self) -> Option<tokio::task::JoinHandle<()>> {
        if self.token_url.is_some() {
            return None;
        }
        let every = Duration::from_secs(self.refresh_seconds?);
        let (http, url, token) = (self.http.clone(), self.url.clone(), self.token.clone());
        Some(tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let current = token.lock().map(|t| t.clone()).unwrap_or_default();
                let fresh = async {
                    let resp = http
                        .post(format!("{url}/v1/task/heartbeat"))
                        .bearer_auth(current)
                        .json(&json!({}))
                        .send()
                        .await
                        .ok()?;
                    if !resp.status().is_success() {
                        return None;
                    }
                    let v: Value = resp.json().await.ok()?;
                    v["capability_token"].as_str().map(str::to_owned)
                };
                match fresh.await {
                    Some(t) => {
                        if let Ok(mut cur) = token.lock() {
                            *cur = t;
                        }
                    }
                    // Stale or gone: the attempt is over.
                    None => return,
                }
            }
        }))
    }

    /// The newest capability token: asked of the host when it is within a
    /// minute of expiry (the wrapper's heartbeats refresh it).
    pub async fn token(&self, refresh: bool) -> String {
        let current = self.token.lock().map(|t| t.clone()).unwrap_or_default();
        let Some(url) = &self.token_url else {
            return current;
        };
        if !refresh && expiry(&current) > now_secs() + 60 {
            return current;
        }
        let fresh = async {
            let v: Value = self.http.get(url).send().await.ok()?.json().await.ok()?;
            v["token"].as_str().map(str::to_owned)
        };
        match fresh.await {
            Some(t) => {
                if let Ok(mut cur) = self.token.lock() {
                    cur.clone_from(&t);
                }
                t
            }
            None => current,
        }
    }

    /// POSTs `body` to the task API (retrying once with a fresh token on
    /// `401`).
    pub async fn call(&self, path: &str, body: &Value) -> Result<Value, TaskError> {
        for attempt in 1..=2 {
            let mut req = self
                .http
                .post(format!("{}{path}", self.url))
                .bearer_auth(self.token(attempt == 2).await)
                .json(body);
            if let Some(tp) = &self.traceparent {
                req = req.header("traceparent", tp);
            }
            let resp = req.send().await.map_err(transport)?;
            let status = resp.status().as_u16();
            let text = resp.text().await.map_err(transport)?;
            if (200..300).contains(&status) {
                return Ok(serde_json::from_str(&text).unwrap_or(Value::Null));
            }
            if status == 401 && attempt == 1 {
                continue;
            }
            let err: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
            return Err(TaskError {
                status,
                code: err["error"]["code"]
                    .as_str()
                    .unwrap_or("unknown")
                    .to_owned(),
                message: err["error"]["message"]
                    .as_str()
                    .map(str::to_owned)
                    .unwrap_or(text),
            });
        }
        unreachable!("the loop returns")
    }

    /// Records one event of this attempt.
    pub async fn emit(&self, kind: &str, payload: Value) -> Result<Value, TaskError> {
        let seq = self.seq.fetch_add(1, Ordering::SeqCst);
        self.call(
            "/v1/task/events",
            &json!({"events": [{"seq": seq, "kind": kind, "payload": payload}]}),
        )
        .await
    }

    /// Presigned URLs for `keys` (`method` `PUT` or `GET`).
    pub async fn object_urls(&self, keys: &[&str], method: &str) -> Result<Vec<Value>, TaskError> {
        let v = self
            .call("/v1/task/objects", &json!({"method": method, "keys": keys}))
            .await?;
        Ok(v["urls"].as_array().cloned().unwrap_or_default())
    }

    /// Uploads `body` at `name` under the attempt's prefix; the absolute key.
    pub async fn put_object(&self, name: &str, body: Vec<u8>) -> Result<String, TaskError> {
        let urls = self.object_urls(&[name], "PUT").await?;
        let u = urls.first().ok_or_else(|| TaskError {
            status: 0,
            code: "no_url".into(),
            message: "objects answered no URL".into(),
        })?;
        let resp = self
            .http
            .put(u["url"].as_str().unwrap_or(""))
            .body(body)
            .send()
            .await
            .map_err(transport)?;
        if !resp.status().is_success() {
            return Err(TaskError {
                status: resp.status().as_u16(),
                code: "upload_failed".into(),
                message: resp.text().await.unwrap_or_default(),
            });
        }
        Ok(u["key"].as_str().unwrap_or("").to_owned())
    }

    /// Downloads an object the task may read.
    pub async fn get_object(&self, key: &str) -> Result<Vec<u8>, TaskError> {
        let urls = self.object_urls(&[key], "GET").await?;
        let url = urls.first().and_then(|u| u["url"].as_str()).unwrap_or("");
        let resp = self.http.get(url).send().await.map_err(transport)?;
        if !resp.status().is_success() {
            return Err(TaskError {
                status: resp.status().as_u16(),
                code: "download_failed".into(),
                message: resp.text().await.unwrap_or_default(),
            });
        }
        Ok(resp.bytes().await.map_err(transport)?.to_vec())
    }

    /// Stages `rows` as one part of a new version of `dataset` (one of the
    /// task's outputs), committed when the task succeeds.
    pub async fn stage(
        &self,
        dataset: &str,
        rows: &[Value],
        part: u32,
    ) -> Result<Value, TaskError> {
        let body = ndjson(rows);
        let (sha, bytes) = (hex::encode(sha2::Sha256::digest(&body)), body.len());
        let key = self
            .put_object(&format!("{dataset}/part-{part}.jsonl"), body)
            .await?;
        self.call(
            "/v1/task/dataset-stage",
            &json!({"dataset": dataset, "parts": [{"key": key, "rows": rows.len(),
                    "sha256": sha, "bytes": bytes}]}),
        )
        .await
    }

    /// Publishes `rows` as one buffer batch to the stream `dataset`.
    pub async fn publish(&self, dataset: &str, rows: &[Value]) -> Result<Value, TaskError> {
        let batch_id = uuid::Uuid::new_v4();
        let body = ndjson(rows);
        let sha = hex::encode(sha2::Sha256::digest(&body));
        let key = self
            .put_object(&format!("buffers/{batch_id}.jsonl"), body)
            .await?;
        self.call(
            "/v1/task/buffer-publish",
            &json!({"batch_id": batch_id, "dataset": dataset, "object_key": key,
                    "rows": rows.len(), "sha256": sha}),
        )
        .await
    }

    /// Reads one of the task's `reads` through the query service; `query`
    /// holds `where`, `select`, `order_by`, `limit` as `POST /v1/query`
    /// takes them.
    pub async fn query(&self, dataset: &str, query: Value) -> Result<Value, TaskError> {
        let mut body = json!({"dataset": dataset});
        if let (Some(b), Some(q)) = (body.as_object_mut(), query.as_object()) {
            b.extend(q.clone());
        }
        self.call("/v1/query", &body).await
    }

    /// Milliseconds left before the invocation's deadline.
    pub fn remaining_ms(&self) -> u64 {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        self.deadline_ms.saturating_sub(now)
    }
}

/// The W3C `traceparent` of a Lambda trace header
/// (`Root=1-{8 hex}-{24 hex};Parent={16 hex};Sampled={0|1}`), when it has a
/// parent; the host derives the header from the attempt's context.
pub fn traceparent_from_xray(header: &str) -> Option<String> {
    let field = |name: &str| {
        header
            .split(';')
            .find_map(|kv| kv.trim().strip_prefix(name)?.strip_prefix('='))
    };
    let root = field("Root")?.strip_prefix("1-")?;
    let (time, rest) = root.split_once('-')?;
    let trace = format!("{time}{rest}");
    let parent = field("Parent")?;
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    if !hex(&trace, 32) || !hex(parent, 16) || trace.bytes().all(|b| b == b'0') {
        return None;
    }
    let sampled = if field("Sampled") == Some("1") {
        "01"
    } else {
        "00"
    };
    Some(format!(
        "00-{}-{}-{sampled}",
        trace.to_ascii_lowercase(),
        parent.to_ascii_lowercase()
    ))
}

/// Serves invocations with `handler(inputs, task)` until the process is
/// stopped. Each invocation's trace context (from the Lambda trace header)
/// is the task's `traceparent` and the process's `TRACEPARENT` while it
/// runs (invocations are served one at a time).
pub async fn run<F, Fut, E>(handler: F) -> Result<(), lambda_runtime::Error>
where
    F: Fn(Value, Task) -> Fut,
    Fut: Future<Output = Result<Value, E>>,
    E: Into<Diagnostic> + std::fmt::Debug,
{
    let handler = &handler;
    lambda_runtime::run(service_fn(move |event: LambdaEvent<Value>| {
        let (mut task, inputs) = Task::from_event(&event.payload, event.context.deadline);
        task.traceparent = event
            .context
            .xray_trace_id
            .as_deref()
            .and_then(traceparent_from_xray);
        match &task.traceparent {
            // One invocation at a time: the variable is this invocation's,
            // as `_X_AMZN_TRACE_ID` is (`lambda_runtime` sets it alike).
            Some(tp) => std::env::set_var("TRACEPARENT", tp),
            None => std::env::remove_var("TRACEPARENT"),
        }
        let refresher = task.refresher();
        let answer = handler(inputs, task);
        async move {
            let answer = answer.await;
            if let Some(r) = refresher {
                r.abort();
            }
            answer
        }
    }))
    .await
}

#[cfg(test)]
mod tests {
    use super::traceparent_from_xray;

    #[test]
    fn a_lambda_trace_header_becomes_the_traceparent_it_was_made_from() {
        let tp = traceparent_from_xray(
            "Root=1-4bf92f35-77b34da6a3ce929d0e0e4736;Parent=00f067aa0ba902b7;Sampled=1",
        );
        assert_eq!(
            tp.as_deref(),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        );
        let unsampled = traceparent_from_xray(
            "Root=1-4bf92f35-77b34da6a3ce929d0e0e4736;Parent=00f067aa0ba902b7;Sampled=0",
        );
        assert!(unsampled.unwrap().ends_with("-00"));
        for bad in [
            "",
            "Root=1-4bf92f35-77b34da6a3ce929d0e0e4736;Sampled=0",
            "Root=1-00000000-000000000000000000000000;Parent=00f067aa0ba902b7",
            "Root=1-4bf92f35-77b3;Parent=00f067aa0ba902b7",
        ] {
            assert_eq!(traceparent_from_xray(bad), None, "{bad}");
        }
    }
}

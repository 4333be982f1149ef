//! The AWS Lambda Runtime API, hosted on loopback for one runner process
//! (`../shared/research/runners.md` has the protocol). One listener per
//! runner: a runner sees only its own invocations.
//!
//! | call | answers |
//! |---|---|
//! | `GET  /2018-06-01/runtime/invocation/next` | `200` the event (long poll); the same event again while it is unanswered |
//! | `POST /2018-06-01/runtime/invocation/{id}/response` | `202`; `400` unknown id; `403` answered already; `410` past its deadline (not recorded); `413` over 6,291,556 bytes (the invocation fails with `Function.ResponseSizeTooLarge`) |
//! | `POST /2018-06-01/runtime/invocation/{id}/error` | `202`; `400`, `403`, `410` as above |
//! | `POST /2018-06-01/runtime/init/error` | `202` before the first `next`; `403` after |
//! | `GET  /2018-06-01/dispatcher/invocation/{id}/token` | ours: the invocation's newest capability token (heartbeats refresh it) |
//!
//! Errors have the host's body `{"errorMessage": …, "errorType": …}`.
//!
//! The API has no authentication of its own (as AWS's): the listener takes
//! a connection only from a socket owned by the runner's uid (looked up in
//! `/proc/net/tcp`), so another task, under another uid, cannot take this
//! runner's invocations or token.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::sync::{oneshot, Notify};

/// Largest response a runner may post (AWS's limit).
pub const MAX_RESPONSE_BYTES: usize = 6_291_556;

/// One invocation handed to the runner.
#[derive(Clone)]
pub struct Invocation {
    pub request_id: String,
    pub event: Vec<u8>,
    /// Epoch milliseconds.
    pub deadline_ms: i64,
    pub function_arn: String,
    /// The task's newest capability token, for the token endpoint.
    pub token: Arc<Mutex<String>>,
    /// The W3C trace context the handler runs under, sent as `traceparent`
    /// and, in X-Ray form, as `lambda-runtime-trace-id` (ADR 0023).
    pub traceparent: Option<String>,
}

/// How the runner answered an invocation.
#[derive(Debug)]
pub enum Answer {
    Response(Vec<u8>),
    Error {
        error_type: String,
        message: String,
        body: Value,
    },
    /// The response was over [`MAX_RESPONSE_BYTES`].
    TooLarge,
}

/// What the runner reported about its start.
#[derive(Debug, Clone)]
pub struct InitError {
    pub error_type: String,
    pub message: String,
}

struct Current {
    inv: Invocation,
    answer: Option<oneshot::Sender<Answer>>,
}

#[derive(Default)]
struct HostState {
    /// The first `next` arrived: init is over.
    started: bool,
    init_error: Option<InitError>,
    /// Handed to the host, not yet taken by `next`.
    pending: Option<Current>,
    /// Taken by `next`, not yet answered.
    current: Option<Current>,
    /// Ids answered (or expired) already: a second answer is `403`.
    finished: HashSet<String>,
}

struct Shared {
    state: Mutex<HostState>,
    /// Wakes `next` (an invocation) and the wrapper (start, init error).
    changed: Notify,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, HostState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A running host: its address, and the way to hand it invocations.
pub struct Host {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Host {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// A loopback listener that accepts only connections from sockets of
/// `uid` (any, when `None`).
struct PeerChecked {
    inner: tokio::net::TcpListener,
    uid: Option<u32>,
}

/// The uid owning the TCP socket `local` connected to `remote`, from
/// `/proc/net/tcp` (IPv4 loopback).
fn socket_uid(local: SocketAddr, remote: SocketAddr) -> Option<u32> {
    fn hex(addr: SocketAddr) -> Option<String> {
        match addr {
            SocketAddr::V4(a) => Some(format!(
                "{:08X}:{:04X}",
                u32::from_le_bytes(a.ip().octets()),
                a.port()
            )),
            SocketAddr::V6(_) => None,
        }
    }
    let (l, r) = (hex(local)?, hex(remote)?);
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        (f.len() > 7 && f[1] == l && f[2] == r)
            .then(|| f[7].parse().ok())
            .flatten()
    })
}

impl axum::serve::Listener for PeerChecked {
    type Io = tokio::net::TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (io, peer) = match self.inner.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "runtime API accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Some(want) = self.uid else {
                return (io, peer);
            };
            let ours = io.local_addr().ok();
            let owner = ours.and_then(|ours| socket_uid(peer, ours));
            if owner == Some(want) {
                return (io, peer);
            }
            tracing::warn!(%peer, ?owner, want, "refused a runtime API connection from another uid");
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

impl Host {
    /// Listens on `127.0.0.1:0`, for connections of `uid`'s sockets only
    /// (any, when `None`).
    pub async fn start(uid: Option<u32>) -> std::io::Result<Host> {
        let inner = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = inner.local_addr()?;
        let listener = PeerChecked { inner, uid };
        let shared = Arc::new(Shared {
            state: Mutex::new(HostState::default()),
            changed: Notify::new(),
        });
        let app = router(shared.clone());
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Host {
            addr,
            shared,
            server,
        })
    }

    /// `host:port`, the runner's `AWS_LAMBDA_RUNTIME_API`.
    pub fn address(&self) -> String {
        self.addr.to_string()
    }

    /// Queues an invocation for the runner's next `next`; the receiver
    /// gets its answer.
    pub fn invoke(&self, inv: Invocation) -> oneshot::Receiver<Answer> {
        let (tx, rx) = oneshot::channel();
        let mut s = self.shared.lock();
        s.pending = Some(Current {
            inv,
            answer: Some(tx),
        });
        drop(s);
        self.shared.changed.notify_waiters();
        rx
    }

    /// Ends an invocation that timed out: its answers are refused from now.
    pub fn expire(&self, request_id: &str) {
        let mut s = self.shared.lock();
        if s.current
            .as_ref()
            .is_some_and(|c| c.inv.request_id == request_id)
        {
            s.current = None;
        }
        if s.pending
            .as_ref()
            .is_some_and(|c| c.inv.request_id == request_id)
        {
            s.pending = None;
        }
        s.finished.insert(request_id.to_owned());
    }

    /// Waits until the runner has called `next` once (init done) or
    /// reported an init error.
    pub async fn started(&self) -> Result<(), InitError> {
        loop {
            let notified = self.shared.changed.notified();
            {
                let s = self.shared.lock();
                if let Some(e) = &s.init_error {
                    return Err(e.clone());
                }
                if s.started {
                    return Ok(());
                }
            }
            notified.await;
        }
    }

    /// The init error the runner reported, if any.
    pub fn init_error(&self) -> Option<InitError> {
        self.shared.lock().init_error.clone()
    }
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/2018-06-01/runtime/invocation/next", get(next))
        .route(
            "/2018-06-01/runtime/invocation/{id}/response",
            post(response).layer(DefaultBodyLimit::max(MAX_RESPONSE_BYTES)),
        )
        .route(
            "/2018-06-01/runtime/invocation/{id}/error",
            post(error).layer(DefaultBodyLimit::max(MAX_RESPONSE_BYTES)),
        )
        .route("/2018-06-01/runtime/init/error", post(init_error))
        .route("/2018-06-01/dispatcher/invocation/{id}/token", get(token))
        .fallback(|| async { host_error(StatusCode::NOT_FOUND, "NotFound", "no such path") })
        .method_not_allowed_fallback(|| async {
            host_error(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                "method not allowed",
            )
        })
        .with_state(shared)
}

fn host_error(status: StatusCode, error_type: &str, message: &str) -> Response {
    (
        status,
        Json(json!({"errorMessage": message, "errorType": error_type})),
    )
        .into_response()
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

async fn next(State(shared): State<Arc<Shared>>) -> Response {
    loop {
        let notified = shared.changed.notified();
        {
            let mut s = shared.lock();
            if !s.started {
                s.started = true;
                drop(s);
                shared.changed.notify_waiters();
                continue;
            }
            // `next` twice without an answer: the same event.
            if s.current.is_none() {
                s.current = s.pending.take();
            }
            if let Some(c) = &s.current {
                return event_response(&c.inv);
            }
        }
        notified.await;
    }
}

fn event_response(inv: &Invocation) -> Response {
    let mut headers = HeaderMap::new();
    let mut set = |name: &'static str, value: &str| {
        if let Ok(v) = HeaderValue::from_str(value) {
            headers.insert(name, v);
        }
    };
    set("lambda-runtime-aws-request-id", &inv.request_id);
    set("lambda-runtime-deadline-ms", &inv.deadline_ms.to_string());
    set("lambda-runtime-invoked-function-arn", &inv.function_arn);
    // The attempt's trace when it has one (the runner clients set
    // `TRACEPARENT` from it for the handler), else a fresh unsampled id.
    let xray = inv
        .traceparent
        .as_deref()
        .and_then(dispatcher_telemetry::xray_trace_id);
    if let Some(tp) = inv.traceparent.as_deref().filter(|_| xray.is_some()) {
        set("traceparent", tp);
    }
    set(
        "lambda-runtime-trace-id",
        &xray.unwrap_or_else(|| {
            format!(
                "Root=1-{:08x}-{};Sampled=0",
                now_ms() / 1000,
                &uuid::Uuid::new_v4().simple().to_string()[..24]
            )
        }),
    );
    set("content-type", "application/json");
    (StatusCode::OK, headers, inv.event.clone()).into_response()
}

/// Why an invocation cannot be answered: status, error type, message.
type Refusal = (StatusCode, &'static str, &'static str);

fn refused((status, error_type, message): Refusal) -> Response {
    host_error(status, error_type, message)
}

const ANSWERED: Refusal = (
    StatusCode::FORBIDDEN,
    "InvalidStateTransition",
    "this invocation was answered already",
);

/// Takes the answer slot of invocation `id`, or says why it cannot be
/// answered.
fn take_answer(shared: &Shared, id: &str) -> Result<oneshot::Sender<Answer>, Refusal> {
    let mut s = shared.lock();
    let current = s.current.as_mut().filter(|c| c.inv.request_id == id);
    let Some(c) = current else {
        return Err(if s.finished.contains(id) {
            ANSWERED
        } else {
            (
                StatusCode::BAD_REQUEST,
                "InvalidRequestID",
                "no invocation of this id is in progress",
            )
        });
    };
    if now_ms() > c.inv.deadline_ms {
        s.current = None;
        s.finished.insert(id.to_owned());
        return Err((
            StatusCode::GONE,
            "Sandbox.Timedout",
            "the invocation's deadline has passed; the answer was not recorded",
        ));
    }
    let tx = c.answer.take();
    s.current = None;
    s.finished.insert(id.to_owned());
    tx.ok_or(ANSWERED)
}

fn accepted() -> Response {
    (StatusCode::ACCEPTED, Json(json!({"status": "OK"}))).into_response()
}

async fn response(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    req: Request,
) -> Response {
    let body = Bytes::from_request(req, &()).await;
    match body {
        Ok(body) => match take_answer(&shared, &id) {
            Ok(tx) => {
                let _ = tx.send(Answer::Response(body.to_vec()));
                accepted()
            }
            Err(why) => refused(why),
        },
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            // The invocation fails; the runner's state moves on.
            if let Ok(tx) = take_answer(&shared, &id) {
                let _ = tx.send(Answer::TooLarge);
            }
            host_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "RequestEntityTooLarge",
                &format!("Exceeded maximum allowed payload size ({MAX_RESPONSE_BYTES} bytes)."),
            )
        }
        Err(rejection) => host_error(
            StatusCode::BAD_REQUEST,
            "InvalidRequest",
            &rejection.body_text(),
        ),
    }
}

/// Reads `{errorMessage, errorType, stackTrace}` leniently: a runtime's
/// error body is whatever it managed to send.
fn error_of(headers: &HeaderMap, body: &[u8]) -> (String, String, Value) {
    let parsed: Value = serde_json::from_slice(body).unwrap_or_else(
        |_| json!({"errorMessage": String::from_utf8_lossy(body), "errorType": "Unknown"}),
    );
    let header_type = headers
        .get("lambda-runtime-function-error-type")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let error_type = parsed
        .get("errorType")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .or(header_type)
        .unwrap_or_else(|| "Unhandled".into());
    let message = parsed
        .get("errorMessage")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    (error_type, message, parsed)
}

async fn error(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    req: Request,
) -> Response {
    let body = match Bytes::from_request(req, &()).await {
        Ok(b) => b,
        Err(rejection) => {
            return host_error(rejection.status(), "InvalidRequest", &rejection.body_text())
        }
    };
    match take_answer(&shared, &id) {
        Ok(tx) => {
            let (error_type, message, body) = error_of(&headers, &body);
            let _ = tx.send(Answer::Error {
                error_type,
                message,
                body,
            });
            accepted()
        }
        Err(why) => refused(why),
    }
}

async fn init_error(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut s = shared.lock();
    if s.started || s.init_error.is_some() {
        return host_error(
            StatusCode::FORBIDDEN,
            "InvalidStateTransition",
            "init errors are reported before the first next",
        );
    }
    let (error_type, message, _) = error_of(&headers, &body);
    s.init_error = Some(InitError {
        error_type,
        message,
    });
    drop(s);
    shared.changed.notify_waiters();
    accepted()
}

async fn token(State(shared): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    let s = shared.lock();
    match s.current.as_ref().filter(|c| c.inv.request_id == id) {
        Some(c) => {
            let token = c.inv.token.lock().map(|t| t.clone()).unwrap_or_default();
            Json(json!({"token": token})).into_response()
        }
        None => host_error(
            StatusCode::NOT_FOUND,
            "InvalidRequestID",
            "no invocation of this id is in progress",
        ),
    }
}

#[cfg(test)]
mod tests {
    //! Protocol misuse, with raw HTTP against a real host.
    use super::*;

    fn invocation(id: &str, deadline_ms: i64) -> Invocation {
        Invocation {
            request_id: id.into(),
            event: br#"{"x": 1}"#.to_vec(),
            deadline_ms,
            function_arn: "arn:aws:lambda:local:000000000000:function:t".into(),
            token: Arc::new(Mutex::new("tok".into())),
            traceparent: None,
        }
    }

    struct Raw {
        base: String,
        http: reqwest::Client,
    }

    impl Raw {
        fn new(host: &Host) -> Raw {
            Raw {
                base: format!("http://{}/2018-06-01", host.address()),
                http: reqwest::Client::new(),
            }
        }
        async fn next(&self) -> reqwest::Response {
            self.http
                .get(format!("{}/runtime/invocation/next", self.base))
                .send()
                .await
                .unwrap()
        }
        async fn post(&self, path: &str, body: Vec<u8>) -> (u16, Value) {
            let r = self
                .http
                .post(format!("{}{path}", self.base))
                .body(body)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            (status, r.json().await.unwrap_or(Value::Null))
        }
    }

    fn later() -> i64 {
        now_ms() + 60_000
    }

    #[tokio::test]
    async fn next_answers_the_event_with_its_headers_and_the_same_event_twice() {
        let host = Host::start(None).await.unwrap();
        let raw = Raw::new(&host);
        let _rx = host.invoke(invocation("r1", later()));
        let r = raw.next().await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["lambda-runtime-aws-request-id"], "r1");
        assert!(r.headers().contains_key("lambda-runtime-deadline-ms"));
        assert!(r
            .headers()
            .contains_key("lambda-runtime-invoked-function-arn"));
        assert!(r.headers().contains_key("lambda-runtime-trace-id"));
        assert_eq!(r.bytes().await.unwrap().as_ref(), br#"{"x": 1}"#);
        // No answer yet: next again hands out the same invocation.
        let again = raw.next().await;
        assert_eq!(again.headers()["lambda-runtime-aws-request-id"], "r1");
        assert!(host.started().await.is_ok());
    }

    #[tokio::test]
    async fn unknown_id_400_second_response_403_error_after_response_403() {
        let host = Host::start(None).await.unwrap();
        let raw = Raw::new(&host);
        let rx = host.invoke(invocation("r1", later()));
        raw.next().await;
        let (s, body) = raw
            .post("/runtime/invocation/nope/response", b"{}".to_vec())
            .await;
        assert_eq!(
            (s, body["errorType"].as_str()),
            (400, Some("InvalidRequestID"))
        );
        let (s, body) = raw
            .post("/runtime/invocation/r1/response", b"{\"ok\":1}".to_vec())
            .await;
        assert_eq!((s, body["status"].as_str()), (202, Some("OK")));
        assert!(matches!(rx.await.unwrap(), Answer::Response(b) if b == b"{\"ok\":1}"));
        let (s, body) = raw
            .post("/runtime/invocation/r1/response", b"{}".to_vec())
            .await;
        assert_eq!(
            (s, body["errorType"].as_str()),
            (403, Some("InvalidStateTransition"))
        );
        let (s, _) = raw
            .post("/runtime/invocation/r1/error", b"{}".to_vec())
            .await;
        assert_eq!(s, 403);
        // Unknown paths and methods.
        let (s, _) = raw.post("/runtime/nothing", vec![]).await;
        assert_eq!(s, 404);
        let (s, _) = raw.post("/runtime/invocation/next", vec![]).await;
        assert_eq!(s, 405);
    }

    #[tokio::test]
    async fn init_error_is_202_before_next_and_403_after() {
        let host = Host::start(None).await.unwrap();
        let raw = Raw::new(&host);
        let (s, _) = raw
            .post(
                "/runtime/init/error",
                br#"{"errorMessage": "no module", "errorType": "Runtime.ImportModuleError"}"#
                    .to_vec(),
            )
            .await;
        assert_eq!(s, 202);
        let e = host.started().await.unwrap_err();
        assert_eq!(e.error_type, "Runtime.ImportModuleError");
        // A second report is refused.
        let (s, _) = raw.post("/runtime/init/error", b"{}".to_vec()).await;
        assert_eq!(s, 403);

        let host = Host::start(None).await.unwrap();
        let raw = Raw::new(&host);
        let _rx = host.invoke(invocation("r1", later()));
        raw.next().await;
        let (s, body) = raw.post("/runtime/init/error", b"{}".to_vec()).await;
        assert_eq!(
            (s, body["errorType"].as_str()),
            (403, Some("InvalidStateTransition"))
        );
    }

    #[tokio::test]
    async fn a_late_response_after_the_deadline_is_refused_and_not_recorded() {
        let host = Host::start(None).await.unwrap();
        let raw = Raw::new(&host);
        let mut rx = host.invoke(invocation("r1", now_ms() + 300));
        raw.next().await;
        tokio::time::sleep(std::time::Duration::from_millis(400)).await;
        let (s, body) = raw
            .post("/runtime/invocation/r1/response", b"{}".to_vec())
            .await;
        assert_eq!(
            (s, body["errorType"].as_str()),
            (410, Some("Sandbox.Timedout"))
        );
        // Nothing reached the wrapper: the sender was dropped unanswered.
        assert!(rx.try_recv().is_err());
        let (s, _) = raw
            .post("/runtime/invocation/r1/response", b"{}".to_vec())
            .await;
        assert_eq!(s, 403);
    }

    #[tokio::test]
    async fn a_response_over_the_limit_is_413_and_fails_the_invocation() {
        let host = Host::start(None).await.unwrap();
        let raw = Raw::new(&host);
        let rx = host.invoke(invocation("r1", later()));
        raw.next().await;
        let (s, body) = raw
            .post(
                "/runtime/invocation/r1/response",
                vec![b' '; MAX_RESPONSE_BYTES + 1],
            )
            .await;
        assert_eq!(
            (s, body["errorType"].as_str()),
            (413, Some("RequestEntityTooLarge"))
        );
        assert!(matches!(rx.await.unwrap(), Answer::TooLarge));
        // Exactly the limit is accepted.
        let rx = host.invoke(invocation("r2", later()));
        raw.next().await;
        let (s, _) = raw
            .post(
                "/runtime/invocation/r2/response",
                vec![b' '; MAX_RESPONSE_BYTES],
            )
            .await;
        assert_eq!(s, 202);
        assert!(matches!(rx.await.unwrap(), Answer::Response(b) if b.len() == MAX_RESPONSE_BYTES));
    }

    #[tokio::test]
    async fn only_sockets_of_the_runners_uid_are_served() {
        // SAFETY: getuid has no preconditions.
        let me = unsafe { libc::getuid() };
        let host = Host::start(Some(me)).await.unwrap();
        let _rx = host.invoke(invocation("r1", later()));
        let r = Raw::new(&host).next().await;
        assert_eq!(r.headers()["lambda-runtime-aws-request-id"], "r1");
        // Another uid's runner: this process's connections are dropped.
        let other = Host::start(Some(me.wrapping_add(12345))).await.unwrap();
        let _rx = other.invoke(invocation("r2", later()));
        let refused = reqwest::Client::new()
            .get(format!(
                "http://{}/2018-06-01/runtime/invocation/next",
                other.address()
            ))
            .timeout(std::time::Duration::from_secs(2))
            .send()
            .await;
        assert!(refused.is_err(), "{refused:?}");
    }

    #[tokio::test]
    async fn an_error_is_classified_from_its_body_and_header() {
        let host = Host::start(None).await.unwrap();
        let raw = Raw::new(&host);
        let rx = host.invoke(invocation("r1", later()));
        raw.next().await;
        let (s, _) = raw
            .post(
                "/runtime/invocation/r1/error",
                br#"{"errorMessage": "boom", "errorType": "ValueError", "stackTrace": ["a"]}"#
                    .to_vec(),
            )
            .await;
        assert_eq!(s, 202);
        match rx.await.unwrap() {
            Answer::Error {
                error_type,
                message,
                body,
            } => {
                assert_eq!(
                    (error_type.as_str(), message.as_str()),
                    ("ValueError", "boom")
                );
                assert_eq!(body["stackTrace"][0], "a");
            }
            other => panic!("{other:?}"),
        }
        // The token endpoint serves only the invocation in progress.
        let r = reqwest::get(format!("{}/dispatcher/invocation/r1/token", raw.base))
            .await
            .unwrap();
        assert_eq!(r.status(), 404);
    }
}

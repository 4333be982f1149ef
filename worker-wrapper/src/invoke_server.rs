//! `worker-wrapper invoke-server`: the Lambda *Invoke* API served on this
//! machine (ADR 0026), so the Lambda path runs and is tested without AWS
//! (moto cannot run functions without Docker). Each function is a
//! directory `<functions>/<name>/` holding its package — a bundle's files
//! with their `bundle.json` — and optionally `<functions>/<name>.json`
//! (`{"timeout_seconds": 30, "reserved_concurrency": 2}`). A function's
//! execution environments are runner processes behind the runtime host
//! of `runtime_api`, started as Lambda starts them (the environment of
//! [`runners::runner_env`]), kept warm between invocations and scaled out
//! per concurrent call. Answers follow the Invoke API: `200` with
//! `X-Amz-Function-Error: Unhandled` for a handler's error, a crash
//! (`Runtime.ExitError`), a timeout (`Sandbox.Timedout`), an init failure
//! and an oversized response (`Function.ResponseSizeTooLarge`); `404
//! ResourceNotFoundException`, `413 RequestTooLargeException` and `429
//! TooManyRequestsException` when the function does not run. Not a
//! sandbox: the runners run as this user. Not for production.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use base64::Engine as _;
use dispatcher_wire as wire;
use serde_json::{json, Value};
use tokio::io::AsyncReadExt as _;

use crate::lambda::MAX_REQUEST_BYTES;
use crate::runners::{runner_env, write_runtime, RunnerEnv};
use crate::runtime_api::{Answer, Host, InitError, Invocation};

#[derive(clap::Args)]
pub struct Args {
    /// Where to listen.
    #[arg(long, default_value = "127.0.0.1:9001")]
    listen: SocketAddr,
    /// The directory of functions (`<name>/` and `<name>.json`).
    #[arg(long)]
    functions: PathBuf,
    /// The address bound is written here once listening.
    #[arg(long)]
    address_file: Option<PathBuf>,
    /// Each invocation's event is appended here as one JSON line.
    #[arg(long)]
    events_file: Option<PathBuf>,
    #[arg(long, default_value = "python3")]
    python: String,
    #[arg(long, default_value = "node")]
    node: String,
}

/// Lambda's default timeout of a function (3 s) is short for tasks; this
/// server's default is a minute.
const DEFAULT_TIMEOUT_SECONDS: u64 = 60;
const INIT_TIMEOUT: Duration = Duration::from_secs(10);
/// The end of what an invocation printed that Lambda returns (`Tail`).
const LOG_TAIL_BYTES: usize = 4096;

/// One execution environment: a runner process and its host.
struct Env {
    child: tokio::process::Child,
    host: Host,
    output: Arc<Mutex<Vec<u8>>>,
    _home: tempdir::Dir,
}

#[derive(Default)]
struct Function {
    idle: Vec<Env>,
    running: usize,
}

struct Server {
    functions: PathBuf,
    runtime_dir: tempdir::Dir,
    events: Option<Mutex<std::fs::File>>,
    python: String,
    node: String,
    state: Mutex<HashMap<String, Function>>,
}

/// A directory removed when dropped.
mod tempdir {
    pub struct Dir(pub std::path::PathBuf);
    impl Dir {
        pub fn new(tag: &str) -> std::io::Result<Dir> {
            let p = std::env::temp_dir().join(format!("{tag}-{}", uuid::Uuid::new_v4().simple()));
            std::fs::create_dir_all(&p)?;
            Ok(Dir(p))
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

pub async fn main(args: Args) -> anyhow::Result<()> {
    let runtime_dir = tempdir::Dir::new("invoke-server-runtime")?;
    write_runtime(&runtime_dir.0)?;
    let events = match &args.events_file {
        Some(p) => Some(Mutex::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .with_context(|| format!("opening {}", p.display()))?,
        )),
        None => None,
    };
    let server = Arc::new(Server {
        functions: args.functions.clone(),
        runtime_dir,
        events,
        python: interpreter(&args.python),
        node: interpreter(&args.node),
        state: Mutex::new(HashMap::new()),
    });
    let app = Router::new()
        .route("/2015-03-31/functions/{name}/invocations", post(invoke))
        .with_state(server);
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let addr = listener.local_addr()?;
    if let Some(p) = &args.address_file {
        std::fs::write(p, addr.to_string())?;
    }
    tracing::info!(%addr, functions = %args.functions.display(), "invoke server listening");
    axum::serve(listener, app).await?;
    Ok(())
}

/// The interpreter an environment runs: a program anyone may run first (as
/// the worker's runners pick it), so that a shim in root's home, which sets
/// variables of its own, is not what a function's environment shows.
fn interpreter(name: &str) -> String {
    crate::runners::program_for_tasks(name, true)
        .or_else(|| crate::runners::program_for_tasks(name, false))
        .unwrap_or_else(|| name.to_owned())
}

fn aws_error(status: StatusCode, error_type: &str, message: &str) -> Response {
    (
        status,
        [
            ("x-amzn-errortype", error_type),
            ("content-type", "application/json"),
        ],
        json!({"Type": "User", "message": message}).to_string(),
    )
        .into_response()
}

/// A function failed: `200` and the error object, as Lambda answers.
fn function_error(body: Value, log: Option<String>) -> Response {
    let mut headers = HeaderMap::new();
    headers.insert("x-amz-function-error", "Unhandled".parse().expect("ascii"));
    headers.insert("x-amz-executed-version", "$LATEST".parse().expect("ascii"));
    if let Some(l) = log.and_then(|l| l.parse().ok()) {
        headers.insert("x-amz-log-result", l);
    }
    (StatusCode::OK, headers, body.to_string()).into_response()
}

#[derive(serde::Deserialize, Default)]
struct Settings {
    timeout_seconds: Option<u64>,
    reserved_concurrency: Option<usize>,
}

/// `name` as the Invoke API takes it: a name, or an ARN (with a qualifier).
fn plain_name(name: &str) -> &str {
    let name = name.rsplit_once(":function:").map_or(name, |(_, n)| n);
    name.split(':').next().unwrap_or(name)
}

async fn invoke(
    State(server): State<Arc<Server>>,
    UrlPath(name): UrlPath<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let name = plain_name(&name).to_owned();
    let header = |h: &str| headers.get(h).and_then(|v| v.to_str().ok()).unwrap_or("");
    if body.len() > MAX_REQUEST_BYTES {
        return aws_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "RequestTooLargeException",
            "Request must be smaller than 6291456 bytes for the InvokeFunction operation",
        );
    }
    let dir = server.functions.join(&name);
    let valid = !name.is_empty() && !name.contains(['/', '.']) && dir.join("bundle.json").is_file();
    if !valid {
        return aws_error(
            StatusCode::NOT_FOUND,
            "ResourceNotFoundException",
            &format!("Function not found: {name}"),
        );
    }
    let settings: Settings = std::fs::read(server.functions.join(format!("{name}.json")))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    match header("x-amz-invocation-type") {
        "" | "RequestResponse" => {}
        "DryRun" => return StatusCode::NO_CONTENT.into_response(),
        other => {
            return aws_error(
                StatusCode::BAD_REQUEST,
                "InvalidParameterValueException",
                &format!("this server runs RequestResponse invocations only, not {other}"),
            )
        }
    }
    let tail = header("x-amz-log-type") == "Tail";
    // Reserve a slot, taking a warm environment if one is idle.
    let warm = {
        let mut state = server.state.lock().unwrap_or_else(|p| p.into_inner());
        let f = state.entry(name.clone()).or_default();
        if settings
            .reserved_concurrency
            .is_some_and(|n| f.running >= n)
        {
            return aws_error(
                StatusCode::TOO_MANY_REQUESTS,
                "TooManyRequestsException",
                "Rate Exceeded.",
            );
        }
        f.running += 1;
        f.idle.pop()
    };
    let timeout = settings
        .timeout_seconds
        .unwrap_or(DEFAULT_TIMEOUT_SECONDS)
        .max(1);
    if let Some(events) = &server.events {
        use std::io::Write as _;
        let mut f = events.lock().unwrap_or_else(|p| p.into_inner());
        let _ = f.write_all(&body);
        let _ = f.write_all(b"\n");
    }
    // As in Lambda, an invocation runs to its end even if the caller goes
    // away (a worker past the task's timeout): it runs in a task of its
    // own, which also gives its slot back.
    let done = tokio::spawn(async move {
        let (response, keep) = match warm {
            Some(env) => run(env, &body, timeout, tail).await,
            None => match server.start(&name, &dir).await {
                Ok(env) => run(env, &body, timeout, tail).await,
                Err(InitError {
                    error_type,
                    message,
                }) => (
                    function_error(
                        json!({"errorType": error_type, "errorMessage": message}),
                        None,
                    ),
                    None,
                ),
            },
        };
        let mut state = server.state.lock().unwrap_or_else(|p| p.into_inner());
        let f = state.entry(name).or_default();
        f.running -= 1;
        if let Some(env) = keep {
            f.idle.push(env);
        }
        response
    });
    done.await.unwrap_or_else(|e| {
        aws_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "ServiceException",
            &e.to_string(),
        )
    })
}

/// Runs one invocation on `env`; the answer, and the environment if it
/// stays warm.
async fn run(mut env: Env, event: &[u8], timeout: u64, tail: bool) -> (Response, Option<Env>) {
    let request_id = uuid::Uuid::new_v4().to_string();
    let token = serde_json::from_slice::<Value>(event)
        .ok()
        .and_then(|e| e["dispatcher"]["token"].as_str().map(str::to_owned))
        .unwrap_or_default();
    env.output.lock().unwrap_or_else(|p| p.into_inner()).clear();
    let rx = env.host.invoke(Invocation {
        request_id: request_id.clone(),
        event: event.to_vec(),
        deadline_ms: chrono::Utc::now().timestamp_millis() + (timeout * 1000) as i64,
        function_arn: "arn:aws:lambda:local:000000000000:function:local".into(),
        token: Arc::new(Mutex::new(token)),
        traceparent: None,
    });
    enum End {
        Answer(Answer),
        Exited(String),
        TimedOut,
    }
    let end = tokio::select! {
        a = rx => match a {
            Ok(a) => End::Answer(a),
            Err(_) => End::TimedOut,
        },
        status = env.child.wait() => End::Exited(
            status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string())
        ),
        _ = tokio::time::sleep(Duration::from_secs(timeout)) => {
            env.host.expire(&request_id);
            End::TimedOut
        }
    };
    // What the runner printed before answering reaches its reader.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let log = tail.then(|| {
        let out = env.output.lock().unwrap_or_else(|p| p.into_inner());
        let from = out.len().saturating_sub(LOG_TAIL_BYTES);
        base64::engine::general_purpose::STANDARD.encode(&out[from..])
    });
    let error = |error_type: &str, message: String| json!({"errorType": error_type, "errorMessage": message});
    match end {
        End::Answer(Answer::Response(body)) => {
            let mut headers = HeaderMap::new();
            headers.insert("x-amz-executed-version", "$LATEST".parse().expect("ascii"));
            if let Some(l) = log.and_then(|l| l.parse().ok()) {
                headers.insert("x-amz-log-result", l);
            }
            ((StatusCode::OK, headers, body).into_response(), Some(env))
        }
        End::Answer(Answer::Error {
            error_type,
            message,
            body,
        }) => {
            let mut body = if body.is_object() { body } else { json!({}) };
            body["errorType"] = json!(error_type);
            body["errorMessage"] = json!(message);
            (function_error(body, log), Some(env))
        }
        End::Answer(Answer::TooLarge) => (
            function_error(
                error(
                    "Function.ResponseSizeTooLarge",
                    "Response payload size exceeded maximum allowed payload size (6291556 bytes)."
                        .into(),
                ),
                log,
            ),
            Some(env),
        ),
        End::Exited(status) => (
            function_error(
                error(
                    "Runtime.ExitError",
                    format!("RequestId: {request_id} Error: Runtime exited with error: {status}"),
                ),
                log,
            ),
            None,
        ),
        End::TimedOut => {
            let _ = env.child.start_kill();
            (
                function_error(
                    error(
                        "Sandbox.Timedout",
                        format!("RequestId: {request_id} Error: Task timed out after {timeout}.00 seconds"),
                    ),
                    log,
                ),
                None,
            )
        }
    }
}

impl Server {
    /// Starts an execution environment of function `name` (its init).
    async fn start(&self, name: &str, dir: &Path) -> Result<Env, InitError> {
        let fail = |error_type: &str, message: String| InitError {
            error_type: error_type.into(),
            message,
        };
        let manifest: wire::BundleManifest = std::fs::read(dir.join("bundle.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| {
                fail(
                    "Runtime.InvalidEntrypoint",
                    "no readable bundle.json".into(),
                )
            })?;
        let home = tempdir::Dir::new("invoke-server-env")
            .map_err(|e| fail("Runtime.Unknown", e.to_string()))?;
        let host = Host::start(None)
            .await
            .map_err(|e| fail("Runtime.Unknown", e.to_string()))?;
        let digest = format!("sha256:{name}");
        let env = runner_env(&RunnerEnv {
            api: host.address(),
            manifest: &manifest,
            task_root: dir,
            runtime_dir: &self.runtime_dir.0,
            home: &home.0,
            digest: &digest,
            org: uuid::Uuid::nil(),
            worker_id: name,
        });
        let (program, args) = match manifest.runtime {
            wire::Runtime::Python => (
                self.python.clone(),
                vec![self.runtime_dir.0.join("python/bootstrap.py")],
            ),
            wire::Runtime::Node => (
                self.node.clone(),
                vec![self.runtime_dir.0.join("node/bootstrap.mjs")],
            ),
            _ => (dir.join(&manifest.handler).display().to_string(), vec![]),
        };
        // A package of scripts/package-lambda carries its own runner, which
        // Lambda's managed runtime starts through AWS_LAMBDA_EXEC_WRAPPER:
        // the wrapper gets the runtime's command as its arguments.
        let wrapper = dir.join(".dispatcher/wrapper");
        let (program, args) = if manifest.runtime != wire::Runtime::Rust && wrapper.is_file() {
            let mut wrapped = vec![PathBuf::from(&program)];
            wrapped.extend(args);
            (wrapper.display().to_string(), wrapped)
        } else {
            (program, args)
        };
        tracing::info!(
            function = name,
            runtime = manifest.runtime.as_str(),
            "cold start"
        );
        let mut cmd = tokio::process::Command::new(&program);
        cmd.env_clear()
            .envs(env)
            .args(&args)
            .current_dir(&home.0)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(|e| {
            fail(
                "Runtime.InvalidEntrypoint",
                format!("cannot start {program}: {e}"),
            )
        })?;
        let output = Arc::new(Mutex::new(Vec::new()));
        for pipe in [
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
        ]
        .into_iter()
        .flatten()
        {
            let output = output.clone();
            tokio::spawn(async move {
                let mut pipe = pipe;
                let mut buf = [0u8; 8192];
                while let Ok(n) = pipe.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    let mut out = output.lock().unwrap_or_else(|p| p.into_inner());
                    out.extend_from_slice(&buf[..n]);
                    // Bounded: only the tail is ever returned.
                    if out.len() > 4 * LOG_TAIL_BYTES {
                        let cut = out.len() - LOG_TAIL_BYTES;
                        out.drain(..cut);
                    }
                }
            });
        }
        let started = tokio::select! {
            s = host.started() => s,
            status = child.wait() => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                Err(host.init_error().unwrap_or_else(|| fail(
                    "Runtime.ExitError",
                    format!("Runtime exited during init: {}", status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string())),
                )))
            }
            _ = tokio::time::sleep(INIT_TIMEOUT) => Err(fail("Runtime.InitError", "init timed out".into())),
        };
        if let Err(e) = started {
            tracing::info!(function = name, error_type = e.error_type, "init failed");
            let _ = child.start_kill();
            return Err(e);
        }
        Ok(Env {
            child,
            host,
            output,
            _home: home,
        })
    }
}

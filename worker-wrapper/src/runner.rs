//! Handling one wake-up: claim, run the task in its sandbox, heartbeat,
//! complete, delete.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use dispatcher_wire as wire;
use reqwest::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::Instrument as _;

use crate::capture::{LogBuffer, Shared};
use crate::client::CallError;
use crate::runners::{Invoked, Runners};
use crate::runtime_api::{Answer, MAX_RESPONSE_BYTES};
use crate::sandbox::{Attempt, Sandbox};
use crate::wakeups::Wakeups;

/// What the worker is configured with.
pub struct WorkerConfig {
    pub dispatcher_url: String,
    pub worker_id: String,
    /// Where wake-ups come from (and are deleted and kept hidden).
    pub wakeups: Wakeups,
    pub lease_seconds: Option<u32>,
    /// Where and as whom tasks run.
    pub sandbox: Arc<Sandbox>,
    /// Runner processes of bundle tasks.
    pub runners: Arc<Runners>,
    /// Bundle tasks of these runtimes run as Lambda functions instead.
    pub lambda: Option<Arc<crate::lambda::Lambda>>,
    /// An exec task's bound when its claim names none.
    pub default_timeout: Duration,
    /// Which host programs `exec` tasks may start.
    pub exec: ExecPolicy,
    /// Heartbeats, completions and claims, batched or single.
    pub calls: Arc<crate::batch::Calls>,
    /// Bytes of an attempt's output kept for its log (0: no logs).
    pub log_max_bytes: usize,
    /// Cancelled when a drain's bound is reached: running tasks are
    /// stopped and handed back (`POST /internal/task-release`).
    pub hand_back: tokio_util::sync::CancellationToken,
}

/// Which host programs an `exec` task may start on this worker (review
/// M12): an `exec` task's bundle is a command line, so a member of any org
/// can run any program the worker can. `--exec` says: `off` (the worker
/// does not claim `exec` tasks; the aws profile's default), `any` (the
/// local profile's default), or a comma-separated list of the programs
/// allowed, each as the task names it (`/usr/bin/python3`, `sh`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExecPolicy {
    Off,
    Any,
    Only(Vec<String>),
}

impl ExecPolicy {
    /// `--exec`'s value, or the profile's default when there is none.
    pub fn parse(value: Option<&str>, profile: &str) -> Result<ExecPolicy, String> {
        let value = match value.map(str::trim) {
            None | Some("") => {
                return Ok(if profile == "aws" {
                    ExecPolicy::Off
                } else {
                    ExecPolicy::Any
                })
            }
            Some(v) => v,
        };
        Ok(match value {
            "off" => ExecPolicy::Off,
            "any" => ExecPolicy::Any,
            list => {
                let programs: Vec<String> = list
                    .split(',')
                    .map(str::trim)
                    .filter(|p| !p.is_empty())
                    .map(str::to_owned)
                    .collect();
                if programs.iter().any(|p| p.chars().any(char::is_whitespace))
                    || programs.is_empty()
                {
                    return Err(format!(
                        "--exec {value:?}: expected off, any, or a comma-separated list of programs"
                    ));
                }
                ExecPolicy::Only(programs)
            }
        })
    }

    /// Whether this worker claims `exec` tasks at all.
    pub fn claims_exec(&self) -> bool {
        *self != ExecPolicy::Off
    }

    /// Whether an `exec` task may start `program`.
    pub fn allows(&self, program: &str) -> bool {
        match self {
            ExecPolicy::Off => false,
            ExecPolicy::Any => true,
            ExecPolicy::Only(list) => list.iter().any(|p| p == program),
        }
    }
}

/// How handling a wake-up ended, as the receive loop needs to know.
pub enum Handled {
    Done,
    /// The dispatcher refused the worker credential (401/403): the worker
    /// must stop; the wake-up was left in the queue.
    CredentialRefused(String),
    /// The worker was stopping: the task was stopped and handed back.
    HandedBack,
}

/// How a run ended.
enum Ended {
    /// An exec task exited: its status, its stdout (the output), and the
    /// end of its stderr.
    Exited(std::process::ExitStatus, Vec<u8>, String),
    /// An exec task ran past its timeout and was killed.
    TimedOut(u64),
    /// A bundle task's invocation ended.
    Invoked(Invoked),
    /// A cancel was requested: the task was killed; the attempt completes
    /// as `cancelled`.
    Cancelled,
    /// The lease is gone: the task was killed and the attempt must not
    /// complete.
    Abandoned(String),
    /// The worker is stopping: the task was killed, to be handed back.
    HandBack,
    /// Lambda had no concurrency for the task's function: handed back,
    /// its attempt given back, to be claimed again after a pause.
    Throttled(String),
    SpawnFailed(String),
    /// The task asks for what this worker does not allow: failed, not
    /// retried (the fleet's policy answers every attempt the same).
    Refused(String),
}

/// Why the heartbeat loop stopped.
enum Stop {
    Cancel,
    Lost(String),
    HandBack,
}

const MAX_OUTPUT: usize = 1024 * 1024;

/// What a refused claim proves about its wake-up.
enum Verdict {
    /// The task does not exist or cannot be claimed: the message is useless.
    Useless,
    /// The worker's own credential was refused.
    BadCredential,
    /// Nothing is proven (dispatcher down, overloaded, a bad request of
    /// ours): leave the message to reappear.
    Unknown,
}

fn judge(e: &CallError) -> Verdict {
    match e {
        CallError::Refused { status, .. } if *status == StatusCode::NOT_FOUND => Verdict::Useless,
        CallError::Refused { status, code, .. }
            if *status == StatusCode::CONFLICT && code == "not_claimable" =>
        {
            Verdict::Useless
        }
        CallError::Refused { status, .. }
            if *status == StatusCode::UNAUTHORIZED || *status == StatusCode::FORBIDDEN =>
        {
            Verdict::BadCredential
        }
        _ => Verdict::Unknown,
    }
}

/// The task a wake-up names, or `None` (the malformed message is deleted).
pub async fn wake_target(cfg: &WorkerConfig, msg: &wire::QueueMessage) -> Option<uuid::Uuid> {
    match serde_json::from_value::<wire::WakeUp>(msg.body.clone()) {
        Ok(w) => Some(w.task_id),
        Err(e) => {
            tracing::warn!(message_id = msg.message_id, error = %e, "malformed wake-up; deleting it");
            cfg.wakeups.delete(Some(&msg.receipt_handle)).await;
            None
        }
    }
}

/// Handles one task from start to end, given its claim's answer and the
/// wake-up message that led to it (none when it was claimed as ready work,
/// ADR 0017). Never panics on bad input. A wake-up is deleted only when the
/// claim answer proves it useless or after the attempt it started has
/// ended; otherwise it is left to reappear.
pub async fn handle(
    cfg: Arc<WorkerConfig>,
    msg: Option<wire::QueueMessage>,
    task_id: uuid::Uuid,
    claimed: Result<wire::ClaimResponse, CallError>,
) -> Handled {
    let receipt = msg.as_ref().map(|m| m.receipt_handle.as_str());
    let claim = match claimed {
        Ok(c) => c,
        Err(e) => match judge(&e) {
            Verdict::Useless => {
                // Duplicate, late or stale wake-up: the claim decides (invariant 6).
                tracing::debug!(%task_id, error = %e, "wake-up not claimable; deleting it");
                cfg.wakeups.delete(receipt).await;
                return Handled::Done;
            }
            Verdict::BadCredential => {
                // Let another worker have it at once (best effort; it
                // reappears after its visibility timeout anyway).
                cfg.wakeups.extend(receipt, 0).await;
                return Handled::CredentialRefused(e.to_string());
            }
            Verdict::Unknown => {
                tracing::warn!(%task_id, error = %e, "claim failed; the wake-up will be redelivered");
                return Handled::Done;
            }
        },
    };
    // The attempt's span (ADR 0023): its fields are on every log line of
    // the attempt, and it continues the job's trace when traces are on.
    let span = tracing::info_span!(
        "task.attempt",
        otel.kind = "consumer",
        otel.status_code = tracing::field::Empty,
        job_id = %claim.job_id,
        task_id = %claim.task_id,
        attempt = claim.attempt,
        org_id = %claim.org_id,
        task_key = claim.task.key.as_str(),
        runtime = claim.task.runtime.as_str(),
        outcome = tracing::field::Empty,
        trace_id = tracing::field::Empty,
    );
    dispatcher_telemetry::continue_from(&span, claim.traceparent.as_deref());
    attempt(cfg, claim, receipt).instrument(span).await
}

/// The context a task's code runs under, handed to it as `TRACEPARENT`:
/// its attempt's span when traces are on, else the job's own.
pub fn udf_traceparent(claim: &wire::ClaimResponse) -> Option<String> {
    dispatcher_telemetry::traceparent_of(&tracing::Span::current())
        .or_else(|| claim.traceparent.clone())
}

/// Runs a claimed attempt to its end: the task, its log, its completion.
async fn attempt(
    cfg: Arc<WorkerConfig>,
    claim: wire::ClaimResponse,
    receipt: Option<&str>,
) -> Handled {
    let began = std::time::Instant::now();
    let runtime = claim.task.runtime.as_str();
    let (handled, outcome) = run_attempt(cfg, &claim, receipt).await;
    let labels = [("runtime", runtime), ("outcome", outcome)];
    metrics::counter!(crate::metrics::ATTEMPTS, &labels).increment(1);
    metrics::histogram!(crate::metrics::ATTEMPT_DURATION, &labels)
        .record(began.elapsed().as_secs_f64());
    handled
}

/// [`attempt`]'s work; also says how the attempt ended, for the metrics.
async fn run_attempt(
    cfg: Arc<WorkerConfig>,
    claim: &wire::ClaimResponse,
    receipt: Option<&str>,
) -> (Handled, &'static str) {
    tracing::info!(task_id = %claim.task_id, attempt = claim.attempt, key = claim.task.key, "claimed");
    // The newest capability token: heartbeats refresh it, completion uses it.
    let token = Arc::new(Mutex::new(claim.capability_token.clone()));
    // When the lease was last renewed (the claim took it): one schedule of
    // heartbeats runs through every phase of the attempt, so moving from
    // running to completing never leaves a gap longer than the interval.
    let beat = Mutex::new(tokio::time::Instant::now());
    // What the attempt prints, whichever way it ends.
    let log = LogBuffer::shared(cfg.log_max_bytes);
    let ended = if claim.task.runtime == wire::Runtime::Exec {
        run(&cfg, claim, receipt, &token, &beat, &log).await
    } else if let Some(lambda) = cfg.lambda.as_ref().filter(|l| l.runs(claim.task.runtime)) {
        invoke_lambda(&cfg, lambda, claim, receipt, &token, &beat, &log).await
    } else {
        invoke(&cfg, claim, receipt, &token, &beat, &log).await
    };
    if matches!(ended, Ended::HandBack) {
        let token = current(&token);
        store_log(&cfg, claim, &token, &log).await;
        release(&cfg, claim, &token).await;
        cfg.wakeups.delete(receipt).await;
        return (Handled::HandedBack, "handed_back");
    }
    if let Ended::Throttled(why) = &ended {
        tracing::warn!(task_id = %claim.task_id, attempt = claim.attempt, why, "throttled; handing the task back");
        release(&cfg, claim, &current(&token)).await;
        cfg.wakeups.delete(receipt).await;
        // The slot pauses, so that a throttled function is not invoked
        // again at once by this worker.
        tokio::time::sleep(THROTTLE_PAUSE).await;
        return (Handled::Done, "throttled");
    }
    let request = match ended {
        Ended::HandBack | Ended::Throttled(_) => None,
        Ended::Abandoned(why) => {
            tracing::warn!(task_id = %claim.task_id, attempt = claim.attempt, why, "attempt abandoned without completing");
            None
        }
        Ended::Cancelled => {
            tracing::info!(task_id = %claim.task_id, attempt = claim.attempt, "cancel requested; the task was stopped");
            Some(wire::CompleteRequest {
                outcome: wire::Outcome::Cancelled,
                output: None,
                error: None,
            })
        }
        Ended::Exited(status, stdout, stderr) => Some(outcome(status, &stdout, stderr)),
        Ended::TimedOut(secs) => Some(failed(
            format!("Sandbox.Timedout: Task timed out after {secs}.00 seconds"),
            true,
        )),
        Ended::Invoked(invoked) => Some(invoked_outcome(invoked)),
        // The worker's trouble (no free uid, fork, disk), not the task's:
        // another attempt, maybe elsewhere, may run it (review H6).
        Ended::SpawnFailed(why) => Some(failed(why, true)),
        Ended::Refused(why) => Some(failed(why, false)),
    };
    let mut ended_as = "abandoned";
    if let Some(mut req) = request {
        ended_as = match req.outcome {
            wire::Outcome::Succeeded => "succeeded",
            wire::Outcome::Failed => "failed",
            wire::Outcome::Cancelled => "cancelled",
        };
        // A failure message is the end of what the task printed: the
        // tokens it was handed do not go with it.
        if let Some(error) = req.error.as_mut() {
            for secret in [current(&token).as_str(), claim.capability_token.as_str()] {
                if !secret.is_empty() {
                    error.message = error.message.replace(secret, "[REDACTED]");
                }
            }
        }
        // The log upload (before the completion ends the lease, which
        // fences it) and the completion keep the lease alive: a large
        // output can take longer to send than a short lease lasts.
        let finish = async {
            store_log(&cfg, claim, &current(&token), &log).await;
            complete(&cfg, claim, &token, &req).await;
        };
        tokio::pin!(finish);
        tokio::select! {
            biased;
            () = &mut finish => {}
            // Lost, cancelled or handed back while completing: the
            // completion is still the attempt's last word.
            _ = keep_alive(&cfg, claim, receipt, None, &token, &beat) => finish.await,
        }
    }
    cfg.wakeups.delete(receipt).await;
    (Handled::Done, ended_as)
}

/// Hands the task back (`POST /internal/task-release`), retrying transient
/// errors for a few seconds: it is ready for another worker at once rather
/// than when its lease would have expired. If the call never lands, the
/// lease expires as it would have.
async fn release(cfg: &WorkerConfig, claim: &wire::ClaimResponse, token: &str) {
    let mut delay = Duration::from_millis(100);
    let give_up = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match cfg.calls.client().release(token).await {
            Ok(r) => {
                tracing::info!(task_id = %claim.task_id, attempt = claim.attempt, state = r.state.as_str(), "handed back");
                return;
            }
            Err(e) if e.is_transient() && tokio::time::Instant::now() < give_up => {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(1));
            }
            Err(e) => {
                tracing::warn!(task_id = %claim.task_id, attempt = claim.attempt, error = %e, "handing the task back failed; its lease will expire");
                return;
            }
        }
    }
}

/// Uploads what the attempt printed, if anything (`POST /internal/task-logs`),
/// with the tokens it was handed replaced. A log that cannot be stored is
/// not worth holding the completion for: it is reported and dropped.
async fn store_log(cfg: &WorkerConfig, claim: &wire::ClaimResponse, token: &str, log: &Shared) {
    let req = {
        let buffer = log.lock().unwrap_or_else(|p| p.into_inner());
        buffer.request(&[token, &claim.capability_token])
    };
    let Some(req) = req else { return };
    let call = cfg.calls.client().log(token, &req);
    match tokio::time::timeout(Duration::from_secs(10), call).await {
        Ok(Ok(stored)) => tracing::debug!(
            task_id = %claim.task_id,
            attempt = claim.attempt,
            bytes = stored.bytes,
            dropped_bytes = stored.dropped_bytes,
            redactions = stored.redactions,
            "log stored"
        ),
        Ok(Err(e)) => {
            tracing::warn!(task_id = %claim.task_id, attempt = claim.attempt, error = %e, "the task's log could not be stored")
        }
        Err(_) => {
            tracing::warn!(task_id = %claim.task_id, attempt = claim.attempt, "storing the task's log timed out")
        }
    }
}

/// The newest capability token (heartbeats replace it).
fn current(token: &Mutex<String>) -> String {
    token.lock().map(|t| t.clone()).unwrap_or_default()
}

fn failed(message: String, retryable: bool) -> wire::CompleteRequest {
    wire::CompleteRequest {
        outcome: wire::Outcome::Failed,
        output: None,
        error: Some(wire::TaskFailure { message, retryable }),
    }
}

/// The completion an invocation's end makes. A response is the output
/// (JSON; other text as `{"response": "…"}`). A handler's error, a
/// timeout and a crash fail retryably; an init failure, an oversized
/// response and a bundle that cannot be run do not (retrying cannot help).
fn invoked_outcome(invoked: Invoked) -> wire::CompleteRequest {
    match invoked {
        Invoked::Answered(Answer::Response(body)) => {
            let text = String::from_utf8_lossy(&body).replace('\0', "\u{FFFD}");
            let output = serde_json::from_str(text.trim())
                .unwrap_or_else(|_| serde_json::json!({"response": text}));
            wire::CompleteRequest {
                outcome: wire::Outcome::Succeeded,
                output: Some(output),
                error: None,
            }
        }
        Invoked::Answered(Answer::Error {
            error_type,
            message,
            body,
        }) => {
            // Python sends `stackTrace`, Node `trace`: a list of lines.
            let trace = body
                .get("stackTrace")
                .or_else(|| body.get("trace"))
                .and_then(|t| t.as_array())
                .map(|lines| {
                    lines
                        .iter()
                        .filter_map(|l| l.as_str())
                        .collect::<Vec<_>>()
                        .join("\n")
                })
                .unwrap_or_default();
            let message = format!("{error_type}: {message}\n{}", trace.trim());
            failed(last_chars(message.trim(), 4000), true)
        }
        Invoked::Answered(Answer::TooLarge) => failed(
            format!(
                "Function.ResponseSizeTooLarge: the handler's response is over {MAX_RESPONSE_BYTES} bytes"
            ),
            false,
        ),
        Invoked::TimedOut { seconds } => failed(
            format!("Sandbox.Timedout: Task timed out after {seconds}.00 seconds"),
            true,
        ),
        Invoked::Exited {
            request_id,
            status,
            tail,
        } => failed(
            format!(
                "Runtime.ExitError: RequestId: {request_id} Error: Runtime exited with error: {status}; {}",
                last_chars(&tail, 2000)
            ),
            true,
        ),
        Invoked::InitFailed {
            error_type,
            message,
        } => failed(format!("{error_type}: {}", last_chars(&message, 2000)), false),
        // The worker's infrastructure (a bundle fetch, a full disk, a
        // runtime that would not start): retryable (review H6).
        Invoked::Unavailable(why) => failed(format!("the worker could not run the bundle: {why}"), true),
    }
}

fn last_chars(s: &str, n: usize) -> String {
    let skip = s.chars().count().saturating_sub(n);
    s.chars().skip(skip).collect()
}

/// Runs a bundle task on a runner, heartbeating meanwhile.
async fn invoke(
    cfg: &WorkerConfig,
    claim: &wire::ClaimResponse,
    receipt: Option<&str>,
    token: &Arc<Mutex<String>>,
    beat: &Mutex<tokio::time::Instant>,
    log: &Shared,
) -> Ended {
    tokio::select! {
        invoked = cfg.runners.invoke(claim, &cfg.dispatcher_url, token.clone(), log.clone()) => Ended::Invoked(invoked),
        stop = keep_alive(cfg, claim, receipt, None, token, beat) => match stop {
            // The invocation's future is dropped: its runner's group is killed.
            Stop::Cancel => Ended::Cancelled,
            Stop::Lost(why) => Ended::Abandoned(why),
            Stop::HandBack => Ended::HandBack,
        },
    }
}

/// How long a slot pauses after Lambda throttled its task.
const THROTTLE_PAUSE: Duration = Duration::from_secs(1);

/// Runs a bundle task as its Lambda function, heartbeating meanwhile.
async fn invoke_lambda(
    cfg: &WorkerConfig,
    lambda: &crate::lambda::Lambda,
    claim: &wire::ClaimResponse,
    receipt: Option<&str>,
    token: &Arc<Mutex<String>>,
    beat: &Mutex<tokio::time::Instant>,
    log: &Shared,
) -> Ended {
    let secs = match claim.task.timeout_seconds {
        0 => cfg.default_timeout.as_secs(),
        s => u64::from(s),
    };
    let event = crate::runners::envelope(claim, &cfg.dispatcher_url, &current(token), None);
    let event = serde_json::to_vec(&event).unwrap_or_default();
    tracing::info!(function = lambda.function_name(claim), "invoking");
    tokio::select! {
        out = lambda.invoke(claim, event, secs, log) => match out {
            crate::lambda::Outcome::Invoked(invoked) => Ended::Invoked(invoked),
            crate::lambda::Outcome::Throttled(why) => Ended::Throttled(why),
            crate::lambda::Outcome::TooLargeEvent(n) => Ended::Refused(format!(
                "the task's event ({n} bytes) is over Lambda's {} byte request limit",
                crate::lambda::MAX_REQUEST_BYTES
            )),
        },
        // The call is dropped; the function may run on, fenced.
        stop = keep_alive(cfg, claim, receipt, None, token, beat) => match stop {
            Stop::Cancel => Ended::Cancelled,
            Stop::Lost(why) => Ended::Abandoned(why),
            Stop::HandBack => Ended::HandBack,
        },
    }
}

/// The completion a child's exit makes: exit 0 succeeds with stdout as JSON
/// output (empty: null; not JSON: `{"stdout": "…"}`); any other exit fails,
/// retryably, with the end of stderr as the message.
fn outcome(
    status: std::process::ExitStatus,
    stdout: &[u8],
    stderr_tail: String,
) -> wire::CompleteRequest {
    if status.success() {
        // Postgres stores no NUL character; a stray one is replaced.
        let text = String::from_utf8_lossy(stdout).replace('\0', "\u{FFFD}");
        let trimmed = text.trim();
        let output = if trimmed.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_str(trimmed).unwrap_or_else(|_| serde_json::json!({"stdout": trimmed}))
        };
        wire::CompleteRequest {
            outcome: wire::Outcome::Succeeded,
            output: Some(output),
            error: None,
        }
    } else {
        let tail = stderr_tail.replace('\0', "\u{FFFD}");
        wire::CompleteRequest {
            outcome: wire::Outcome::Failed,
            output: None,
            error: Some(wire::TaskFailure {
                message: format!("{status}: {}", tail.trim()),
                retryable: true,
            }),
        }
    }
}

/// How long a completion is retried through transient errors. Past it the
/// lease has long expired, and the dispatcher retries the task anyway.
const COMPLETE_RETRY_FOR: Duration = Duration::from_secs(15 * 60);

/// Completes, retrying transient errors (a replay is answered with the
/// original result, so retrying is safe) until the dispatcher gives its
/// verdict: an error about the transport never ends a task. A completion
/// refused as invalid (an output the dispatcher cannot store, said by the
/// single call: batches split and resend alone) is replaced by a failure
/// that says why, so the attempt still ends now.
async fn complete(
    cfg: &WorkerConfig,
    claim: &wire::ClaimResponse,
    token: &Mutex<String>,
    req: &wire::CompleteRequest,
) {
    let mut req = req.clone();
    let mut delay = Duration::from_millis(200);
    let give_up = tokio::time::Instant::now() + COMPLETE_RETRY_FOR;
    let mut refused_output = false;
    while tokio::time::Instant::now() < give_up {
        match cfg.calls.complete(&current(token), &req).await {
            Ok(r) => {
                let span = tracing::Span::current();
                let outcome = match req.outcome {
                    wire::Outcome::Succeeded => "succeeded",
                    wire::Outcome::Failed => {
                        span.record("otel.status_code", "ERROR");
                        "failed"
                    }
                    wire::Outcome::Cancelled => "cancelled",
                };
                span.record("outcome", outcome);
                tracing::info!(task_id = %claim.task_id, attempt = claim.attempt, state = r.state.as_str(), "completed");
                return;
            }
            Err(e) if e.is_transient() => {
                tracing::warn!(task_id = %claim.task_id, error = %e, "completion failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(CallError::Refused { code, message, .. })
                if matches!(code.as_str(), "invalid_request" | "payload_too_large")
                    && req.outcome == wire::Outcome::Succeeded
                    && !refused_output =>
            {
                refused_output = true;
                tracing::warn!(task_id = %claim.task_id, attempt = claim.attempt, message, "the task's output was refused; failing the attempt");
                req = wire::CompleteRequest {
                    outcome: wire::Outcome::Failed,
                    output: None,
                    error: Some(wire::TaskFailure {
                        message: format!("the task's output was refused: {message}"),
                        retryable: false,
                    }),
                };
            }
            Err(e) => {
                tracing::warn!(task_id = %claim.task_id, attempt = claim.attempt, error = %e, "completion refused");
                return;
            }
        }
    }
}

async fn run(
    cfg: &WorkerConfig,
    claim: &wire::ClaimResponse,
    receipt: Option<&str>,
    token: &Mutex<String>,
    beat: &Mutex<tokio::time::Instant>,
    log: &Shared,
) -> Ended {
    let mut argv = claim.task.bundle.split_whitespace();
    let Some(program) = argv.next() else {
        return Ended::SpawnFailed("empty bundle".into());
    };
    if !cfg.exec.allows(program) {
        return Ended::Refused(format!(
            "exec program {program:?} is not allowed on this worker (its --exec list)"
        ));
    }
    let attempt = match cfg.sandbox.enter().await {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "cannot prepare the task's sandbox");
            return Ended::SpawnFailed(format!("the worker could not prepare the task: {e:#}"));
        }
    };
    if let Err(e) = attempt.write_token(&claim.capability_token) {
        attempt.finish(None).await;
        return Ended::SpawnFailed(format!("cannot write the token file: {e}"));
    }
    let mut vars = vec![
        ("DISPATCHER_URL", cfg.dispatcher_url.clone()),
        ("DISPATCHER_TASK_TOKEN", claim.capability_token.clone()),
        (
            "DISPATCHER_TASK_TOKEN_FILE",
            attempt.token_file().display().to_string(),
        ),
        ("DISPATCHER_TASK_ID", claim.task_id.to_string()),
        ("DISPATCHER_JOB_ID", claim.job_id.to_string()),
        ("DISPATCHER_TASK_KEY", claim.task.key.clone()),
        ("DISPATCHER_ATTEMPT", claim.attempt.to_string()),
        ("DISPATCHER_OBJECT_PREFIX", claim.object_prefix.clone()),
        ("DISPATCHER_OUTPUTS", claim.task.outputs.join(",")),
    ];
    if let Some(tp) = udf_traceparent(claim) {
        vars.push(("TRACEPARENT", tp));
    }
    let mut cmd = attempt.command(program, &vars);
    cmd.args(argv)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            attempt.finish(None).await;
            return Ended::SpawnFailed(format!("cannot start {program:?}: {e}"));
        }
    };
    let pgid = child.id();
    let inputs = serde_json::to_vec(&claim.task.inputs).unwrap_or_default();
    let mut stdin = child.stdin.take();
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let feed = async move {
        if let Some(stdin) = stdin.as_mut() {
            let _ = stdin.write_all(&inputs).await;
            let _ = stdin.shutdown().await;
        }
        drop(stdin);
    };
    let read_out = async move { read_capped(stdout.as_mut()).await };
    let read_err = async move { pump(stderr.as_mut(), log).await };
    let child_done = async {
        let (_, out, (), status) = tokio::join!(feed, read_out, read_err, child.wait());
        (status, out)
    };
    let secs = match claim.task.timeout_seconds {
        0 => cfg.default_timeout.as_secs(),
        s => u64::from(s),
    };
    let ended = tokio::select! {
        (status, out) = child_done => match status {
            Ok(status) => {
                let tail = log.lock().unwrap_or_else(|p| p.into_inner()).tail_text(2000);
                Ended::Exited(status, out, tail)
            }
            Err(e) => Ended::SpawnFailed(format!("waiting for the task failed: {e}")),
        },
        _ = tokio::time::sleep(Duration::from_secs(secs)) => Ended::TimedOut(secs),
        stop = keep_alive(cfg, claim, receipt, Some(&attempt), token, beat) => match stop {
            Stop::Cancel => Ended::Cancelled,
            Stop::Lost(why) => Ended::Abandoned(why),
            Stop::HandBack => Ended::HandBack,
        },
    };
    // The task's whole process group goes (and, under a uid of its own,
    // anything it left running elsewhere), then its scratch directory.
    attempt.finish(pgid).await;
    ended
}

/// Heartbeats every interval until the lease is lost or a cancel is
/// requested; returns why it stopped. Each heartbeat refreshes the token file
/// and extends the message's visibility.
async fn keep_alive(
    cfg: &WorkerConfig,
    claim: &wire::ClaimResponse,
    receipt: Option<&str>,
    attempt: Option<&Attempt>,
    current: &Mutex<String>,
    beat: &Mutex<tokio::time::Instant>,
) -> Stop {
    let interval = Duration::from_secs(u64::from(claim.heartbeat_interval_seconds.max(1)));
    let visibility = claim.heartbeat_interval_seconds.saturating_mul(3).max(1);
    loop {
        let due = *beat.lock().unwrap_or_else(|p| p.into_inner()) + interval;
        tokio::select! {
            _ = tokio::time::sleep_until(due) => {}
            _ = cfg.hand_back.cancelled() => return Stop::HandBack,
        }
        let token = current.lock().map(|t| t.clone()).unwrap_or_default();
        let sent = tokio::time::Instant::now();
        match cfg.calls.heartbeat(&token).await {
            Ok(hb) => {
                *beat.lock().unwrap_or_else(|p| p.into_inner()) = sent;
                let token = hb.capability_token;
                if let Ok(mut t) = current.lock() {
                    t.clone_from(&token);
                }
                if let Some(Err(e)) = attempt.map(|a| a.write_token(&token)) {
                    tracing::warn!(error = %e, "cannot refresh the token file");
                }
                if hb.cancel_requested {
                    return Stop::Cancel;
                }
                cfg.wakeups.extend(receipt, visibility).await;
            }
            Err(CallError::Refused { code, message, .. })
                if matches!(
                    code.as_str(),
                    "stale_attempt"
                        | "lease_expired"
                        | "not_found"
                        | "forbidden"
                        | "unauthenticated"
                ) =>
            {
                return Stop::Lost(format!("lease lost: {code}: {message}"));
            }
            Err(e) => {
                tracing::warn!(task_id = %claim.task_id, error = %e, "heartbeat failed; retrying");
                // Tried again an interval on, not at once.
                *beat.lock().unwrap_or_else(|p| p.into_inner()) = sent;
            }
        }
    }
}

/// Copies a stream into the attempt's log buffer until it ends.
async fn pump<R: tokio::io::AsyncRead + Unpin>(r: Option<&mut R>, log: &Shared) {
    if let Some(r) = r {
        let mut buf = [0u8; 8192];
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => log
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(&buf[..n]),
            }
        }
    }
}

async fn read_capped<R: tokio::io::AsyncRead + Unpin>(r: Option<&mut R>) -> Vec<u8> {
    let mut out = Vec::new();
    if let Some(r) = r {
        let mut buf = [0u8; 8192];
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if out.len() < MAX_OUTPUT {
                        out.extend_from_slice(&buf[..n.min(MAX_OUTPUT - out.len())]);
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod exec_policy_tests {
    use super::ExecPolicy;

    #[test]
    fn exec_is_off_by_default_on_the_aws_profile_and_an_allow_list_names_programs_exactly() {
        assert_eq!(ExecPolicy::parse(None, "aws"), Ok(ExecPolicy::Off));
        assert_eq!(ExecPolicy::parse(None, "local"), Ok(ExecPolicy::Any));
        assert_eq!(ExecPolicy::parse(Some("any"), "aws"), Ok(ExecPolicy::Any));
        assert!(!ExecPolicy::Off.claims_exec());
        let only = ExecPolicy::parse(Some("/bin/true, sh"), "aws").unwrap();
        assert!(only.claims_exec());
        assert!(only.allows("/bin/true"));
        assert!(only.allows("sh"));
        assert!(!only.allows("/bin/sh"));
        assert!(!only.allows("true"));
        assert!(ExecPolicy::parse(Some(","), "local").is_err());
        assert!(ExecPolicy::parse(Some("/bin/sh -c"), "local").is_err());
    }
}

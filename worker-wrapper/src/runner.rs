//! Handling one wake-up: claim, run the task, heartbeat, complete, delete.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dispatcher_wire as wire;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

use crate::client::{CallError, Client};
use crate::wakeups::Wakeups;

/// What the worker is configured with.
pub struct WorkerConfig {
    pub dispatcher_url: String,
    pub worker_id: String,
    /// Where wake-ups come from (and are deleted and kept hidden).
    pub wakeups: Wakeups,
    pub lease_seconds: Option<u32>,
    /// Where task token files are written.
    pub scratch: PathBuf,
}

/// How a run ended.
enum Ended {
    Exited(std::process::ExitStatus, Vec<u8>, Vec<u8>),
    /// The lease is gone or a cancel was requested: the child was stopped
    /// and the attempt must not complete.
    Abandoned(String),
    SpawnFailed(String),
}

const MAX_OUTPUT: usize = 1024 * 1024;

/// Handles one delivered wake-up from start to end. Never panics on bad
/// input: a malformed message is deleted.
pub async fn handle(client: Arc<Client>, cfg: Arc<WorkerConfig>, msg: wire::QueueMessage) {
    let wake: wire::WakeUp = match serde_json::from_value(msg.body.clone()) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(message_id = msg.message_id, error = %e, "malformed wake-up; deleting it");
            cfg.wakeups.delete(&msg.receipt_handle).await;
            return;
        }
    };
    let claim = match client
        .claim(wake.task_id, &cfg.worker_id, cfg.lease_seconds)
        .await
    {
        Ok(c) => c,
        Err(e) if !e.is_transient() => {
            // Duplicate, late or stale wake-up: the claim decides (invariant 6).
            tracing::debug!(task_id = %wake.task_id, error = %e, "wake-up not claimable; deleting it");
            cfg.wakeups.delete(&msg.receipt_handle).await;
            return;
        }
        Err(e) => {
            // Leave the message: it becomes visible again and is retried.
            tracing::warn!(task_id = %wake.task_id, error = %e, "claim failed; the wake-up will be redelivered");
            return;
        }
    };
    tracing::info!(task_id = %claim.task_id, attempt = claim.attempt, key = claim.task.key, "claimed");
    // The newest capability token: heartbeats refresh it, completion uses it.
    let token = Mutex::new(claim.capability_token.clone());
    let ended = run(&client, &cfg, &claim, &msg, &token).await;
    let token = token.into_inner().unwrap_or_else(|p| p.into_inner());
    match ended {
        Ended::Abandoned(why) => {
            tracing::warn!(task_id = %claim.task_id, attempt = claim.attempt, why, "attempt abandoned without completing");
        }
        Ended::Exited(status, stdout, stderr) => {
            let req = outcome(status, &stdout, &stderr);
            complete(&client, &claim, &token, &req).await;
        }
        Ended::SpawnFailed(why) => {
            let req = wire::CompleteRequest {
                outcome: wire::Outcome::Failed,
                output: None,
                error: Some(wire::TaskFailure {
                    message: why,
                    retryable: false,
                }),
            };
            complete(&client, &claim, &token, &req).await;
        }
    }
    cfg.wakeups.delete(&msg.receipt_handle).await;
}

/// The completion a child's exit makes: exit 0 succeeds with stdout as JSON
/// output (empty: null; not JSON: `{"stdout": "…"}`); any other exit fails,
/// retryably, with the end of stderr as the message.
fn outcome(
    status: std::process::ExitStatus,
    stdout: &[u8],
    stderr: &[u8],
) -> wire::CompleteRequest {
    if status.success() {
        let text = String::from_utf8_lossy(stdout);
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
        let err = String::from_utf8_lossy(stderr);
        let tail: String = err
            .chars()
            .rev()
            .take(2000)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
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

/// Completes, retrying transient errors (a replay is answered with the
/// original result, so retrying is safe).
async fn complete(
    client: &Client,
    claim: &wire::ClaimResponse,
    token: &str,
    req: &wire::CompleteRequest,
) {
    let mut delay = Duration::from_millis(200);
    for _ in 0..8 {
        match client.complete(token, req).await {
            Ok(r) => {
                tracing::info!(task_id = %claim.task_id, attempt = claim.attempt, state = r.state.as_str(), "completed");
                return;
            }
            Err(e) if e.is_transient() => {
                tracing::warn!(task_id = %claim.task_id, error = %e, "completion failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(e) => {
                tracing::warn!(task_id = %claim.task_id, attempt = claim.attempt, error = %e, "completion refused");
                return;
            }
        }
    }
}

async fn run(
    client: &Client,
    cfg: &WorkerConfig,
    claim: &wire::ClaimResponse,
    msg: &wire::QueueMessage,
    token: &Mutex<String>,
) -> Ended {
    if claim.task.runtime != wire::Runtime::Exec {
        return Ended::SpawnFailed(format!(
            "runtime {:?} is not supported by this worker (only exec)",
            claim.task.runtime.as_str()
        ));
    }
    let mut argv = claim.task.bundle.split_whitespace();
    let Some(program) = argv.next() else {
        return Ended::SpawnFailed("empty bundle".into());
    };
    let token_file = cfg
        .scratch
        .join(format!("task-{}-{}.token", claim.task_id, claim.attempt));
    if let Err(e) = write_token(&token_file, &claim.capability_token).await {
        return Ended::SpawnFailed(format!("cannot write the token file: {e}"));
    }
    let prefix = prefix_of(&claim.capability_token);
    let mut cmd = Command::new(program);
    cmd.args(argv)
        // The child sees its own capability token, never the worker credential.
        .env_clear()
        .envs(std::env::vars().filter(|(k, _)| {
            matches!(k.as_str(), "PATH" | "HOME" | "LANG" | "TMPDIR" | "RUST_LOG")
        }))
        .env("DISPATCHER_URL", &cfg.dispatcher_url)
        .env("DISPATCHER_TASK_TOKEN", &claim.capability_token)
        .env("DISPATCHER_TASK_TOKEN_FILE", &token_file)
        .env("DISPATCHER_TASK_ID", claim.task_id.to_string())
        .env("DISPATCHER_JOB_ID", claim.job_id.to_string())
        .env("DISPATCHER_TASK_KEY", &claim.task.key)
        .env("DISPATCHER_ATTEMPT", claim.attempt.to_string())
        .env("DISPATCHER_OBJECT_PREFIX", prefix)
        .env("DISPATCHER_OUTPUTS", claim.task.outputs.join(","))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let _ = tokio::fs::remove_file(&token_file).await;
            return Ended::SpawnFailed(format!("cannot start {program:?}: {e}"));
        }
    };
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
    let read_err = async move { read_capped(stderr.as_mut()).await };
    let child_done = async {
        let (_, out, err, status) = tokio::join!(feed, read_out, read_err, child.wait());
        (status, out, err)
    };
    let ended = tokio::select! {
        (status, out, err) = child_done => match status {
            Ok(status) => Ended::Exited(status, out, err),
            Err(e) => Ended::SpawnFailed(format!("waiting for the task failed: {e}")),
        },
        why = keep_alive(client, cfg, claim, msg, &token_file, token) => Ended::Abandoned(why),
    };
    // Dropping the child future kills the child (kill_on_drop).
    let _ = tokio::fs::remove_file(&token_file).await;
    ended
}

/// Heartbeats every interval until the lease is lost or a cancel is
/// requested; returns why it stopped. Each heartbeat refreshes the token file
/// and extends the message's visibility.
async fn keep_alive(
    client: &Client,
    cfg: &WorkerConfig,
    claim: &wire::ClaimResponse,
    msg: &wire::QueueMessage,
    token_file: &PathBuf,
    current: &Mutex<String>,
) -> String {
    let interval = Duration::from_secs(u64::from(claim.heartbeat_interval_seconds.max(1)));
    let visibility = claim.heartbeat_interval_seconds.saturating_mul(3).max(1);
    loop {
        tokio::time::sleep(interval).await;
        let token = current.lock().map(|t| t.clone()).unwrap_or_default();
        match client.heartbeat(&token).await {
            Ok(hb) => {
                let token = hb.capability_token;
                if let Ok(mut t) = current.lock() {
                    t.clone_from(&token);
                }
                if let Err(e) = write_token(token_file, &token).await {
                    tracing::warn!(error = %e, "cannot refresh the token file");
                }
                if hb.cancel_requested {
                    return "cancel requested".into();
                }
                cfg.wakeups.extend(&msg.receipt_handle, visibility).await;
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
                return format!("lease lost: {code}: {message}");
            }
            Err(e) => {
                tracing::warn!(task_id = %claim.task_id, error = %e, "heartbeat failed; retrying")
            }
        }
    }
}

async fn write_token(path: &PathBuf, token: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    tokio::fs::write(&tmp, token).await?;
    tokio::fs::rename(&tmp, path).await
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

/// The attempt's object prefix, read from the token's claims (the worker
/// does not verify the token; the dispatcher does on every call).
fn prefix_of(token: &str) -> String {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine as _;
    token
        .split('.')
        .nth(1)
        .and_then(|p| URL_SAFE_NO_PAD.decode(p).ok())
        .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
        .and_then(|c| c["prefixes"][0].as_str().map(str::to_owned))
        .unwrap_or_default()
}

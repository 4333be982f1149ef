//! Coalescing of the wrapper's calls into the contract's batched calls:
//! heartbeats and completions of the running tasks that arrive within a
//! few milliseconds of each other go as one `heartbeat-batch` or
//! `complete-batch` call (at most 100 entries), and the wake-ups of one
//! receive are claimed with one `task-claim-batch`. Each entry is still
//! fenced and answered on its own; a caller gets exactly the answer (or the
//! error) the single call would have given it.

use std::sync::Arc;
use std::time::Duration;

use dispatcher_wire as wire;
use reqwest::StatusCode;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::client::{CallError, Client};

/// Entries one batch call may hold (the contract's bound).
const MAX_BATCH: usize = 100;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Heartbeat,
    Complete,
}

struct Job {
    kind: Kind,
    token: String,
    body: Value,
    reply: oneshot::Sender<Result<Value, CallError>>,
}

/// The status the single call would have answered with an entry's code.
fn status_of(code: &str) -> StatusCode {
    match code {
        "invalid_request" => StatusCode::BAD_REQUEST,
        "unauthenticated" => StatusCode::UNAUTHORIZED,
        "forbidden" => StatusCode::FORBIDDEN,
        "not_found" => StatusCode::NOT_FOUND,
        "stale_attempt" | "lease_expired" | "not_claimable" | "conflict" => StatusCode::CONFLICT,
        "payload_too_large" => StatusCode::PAYLOAD_TOO_LARGE,
        "rate_limited" | "overloaded" => StatusCode::TOO_MANY_REQUESTS,
        "unavailable" => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn entry_error(e: wire::ErrorDetail) -> CallError {
    CallError::Refused {
        status: status_of(&e.code),
        code: e.code,
        message: e.message,
    }
}

/// The same error for every entry of a batch call that failed as a whole.
fn copy(e: &CallError) -> CallError {
    match e {
        CallError::Refused {
            status,
            code,
            message,
        } => CallError::Refused {
            status: *status,
            code: code.clone(),
            message: message.clone(),
        },
        CallError::Transport(m) => CallError::Transport(m.clone()),
    }
}

/// The wrapper's task calls: batched when a window is set, single
/// otherwise.
pub struct Calls {
    client: Arc<Client>,
    queue: Option<mpsc::Sender<Job>>,
}

impl Calls {
    /// `window`: how long the first call of a batch waits for others
    /// (`None`: every call goes alone).
    pub fn new(client: Arc<Client>, window: Option<Duration>) -> Arc<Calls> {
        let queue = window.map(|w| {
            let (tx, rx) = mpsc::channel(4 * MAX_BATCH);
            tokio::spawn(run(client.clone(), rx, w));
            tx
        });
        Arc::new(Calls { client, queue })
    }

    pub fn batched(&self) -> bool {
        self.queue.is_some()
    }

    async fn send(&self, kind: Kind, token: &str, body: Value) -> Result<Value, CallError> {
        let Some(queue) = &self.queue else {
            unreachable!("send is only used when batching");
        };
        let (reply, answer) = oneshot::channel();
        queue
            .send(Job {
                kind,
                token: token.to_owned(),
                body,
                reply,
            })
            .await
            .map_err(|_| CallError::Transport("the batcher stopped".into()))?;
        answer
            .await
            .map_err(|_| CallError::Transport("the batcher stopped".into()))?
    }

    pub async fn heartbeat(&self, token: &str) -> Result<wire::HeartbeatResponse, CallError> {
        if !self.batched() {
            return self.client.heartbeat(token).await;
        }
        let v = self
            .send(Kind::Heartbeat, token, Value::Object(Default::default()))
            .await?;
        serde_json::from_value(v).map_err(|e| CallError::Transport(format!("bad answer: {e}")))
    }

    pub async fn complete(
        &self,
        token: &str,
        req: &wire::CompleteRequest,
    ) -> Result<wire::CompleteResponse, CallError> {
        if !self.batched() {
            return self.client.complete(token, req).await;
        }
        let body = serde_json::to_value(req).map_err(|e| CallError::Transport(e.to_string()))?;
        let v = self.send(Kind::Complete, token, body).await?;
        serde_json::from_value(v).map_err(|e| CallError::Transport(format!("bad answer: {e}")))
    }

    /// The client, for the calls that are never coalesced (claims of
    /// ready work: always one `task-claim-batch`).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Claims the tasks of one receive: one call when batching, else one
    /// each. Answers in the order of `task_ids`.
    pub async fn claim_all(
        &self,
        task_ids: &[Uuid],
        worker_id: &str,
        lease_seconds: Option<u32>,
    ) -> Vec<Result<wire::ClaimResponse, CallError>> {
        if !self.batched() || task_ids.len() < 2 {
            let mut out = Vec::with_capacity(task_ids.len());
            for id in task_ids {
                out.push(self.client.claim(*id, worker_id, lease_seconds).await);
            }
            return out;
        }
        match self
            .client
            .claim_batch(task_ids, worker_id, lease_seconds)
            .await
        {
            Ok(r) => {
                let mut by_id: std::collections::HashMap<Uuid, Vec<wire::ClaimBatchEntry>> =
                    Default::default();
                for c in r.claims {
                    by_id.entry(c.task_id).or_default().push(c);
                }
                task_ids
                    .iter()
                    .map(|id| {
                        let entry = by_id
                            .get_mut(id)
                            .and_then(|v| (!v.is_empty()).then(|| v.remove(0)));
                        match entry {
                            Some(wire::ClaimBatchEntry { claim: Some(c), .. }) => Ok(*c),
                            Some(wire::ClaimBatchEntry { error: Some(e), .. }) => {
                                Err(entry_error(e))
                            }
                            _ => Err(CallError::Transport(format!("no answer for task {id}"))),
                        }
                    })
                    .collect()
            }
            Err(e) => task_ids.iter().map(|_| Err(copy(&e))).collect(),
        }
    }
}

/// Collects jobs for `window` after the first, then sends each kind as one
/// batch call and hands every entry its own answer.
async fn run(client: Arc<Client>, mut rx: mpsc::Receiver<Job>, window: Duration) {
    while let Some(first) = rx.recv().await {
        let mut jobs = vec![first];
        let until = tokio::time::Instant::now() + window;
        while jobs.len() < 2 * MAX_BATCH {
            match tokio::time::timeout_at(until, rx.recv()).await {
                Ok(Some(job)) => jobs.push(job),
                Ok(None) | Err(_) => break,
            }
        }
        let (beats, dones): (Vec<Job>, Vec<Job>) =
            jobs.into_iter().partition(|j| j.kind == Kind::Heartbeat);
        for (kind, mine) in [(Kind::Heartbeat, beats), (Kind::Complete, dones)] {
            for chunk in chunks(mine) {
                // Calls of one window run side by side.
                tokio::spawn(send_batch(client.clone(), kind, chunk));
            }
        }
    }
}

fn chunks(mut jobs: Vec<Job>) -> Vec<Vec<Job>> {
    let mut out = Vec::new();
    while !jobs.is_empty() {
        let rest = jobs.split_off(jobs.len().min(MAX_BATCH));
        out.push(jobs);
        jobs = rest;
    }
    out
}

async fn send_batch(client: Arc<Client>, kind: Kind, jobs: Vec<Job>) {
    let path = match kind {
        Kind::Heartbeat => "/v1/task/heartbeat-batch",
        Kind::Complete => "/v1/task/complete-batch",
    };
    let req = wire::TaskBatchRequest {
        entries: jobs
            .iter()
            .map(|j| wire::TaskBatchEntry {
                capability_token: j.token.clone(),
                body: j.body.clone(),
            })
            .collect(),
    };
    match client.task_batch(path, &req).await {
        Ok(resp) if resp.results.len() == jobs.len() => {
            for (job, r) in jobs.into_iter().zip(resp.results) {
                let answer = match (r.result, r.error) {
                    (Some(v), _) => Ok(v),
                    (None, Some(e)) => Err(entry_error(e)),
                    (None, None) => Err(CallError::Transport("an empty batch entry".into())),
                };
                let _ = job.reply.send(answer);
            }
        }
        Ok(resp) => {
            let e = CallError::Transport(format!(
                "{} answers for {} entries",
                resp.results.len(),
                jobs.len()
            ));
            for job in jobs {
                let _ = job.reply.send(Err(copy(&e)));
            }
        }
        Err(e) => {
            for job in jobs {
                let _ = job.reply.send(Err(copy(&e)));
            }
        }
    }
}

//! Coalescing of the wrapper's calls into the contract's batched calls:
//! heartbeats and completions of the running tasks that arrive within a
//! few milliseconds of each other go as one `heartbeat-batch` or
//! `complete-batch` call (at most 100 entries and [`MAX_BATCH_BYTES`]), and
//! the wake-ups of one receive are claimed with one `task-claim-batch`.
//! Each entry is still fenced and answered on its own; a caller gets
//! exactly the answer (or the error) the single call would have given it.
//!
//! An error about the whole call (a `413`, a `401` of an expired worker
//! credential, a `5xx`, a timeout or reset) is never an entry's answer
//! (review H2, H5): every entry is then sent again alone, with its own
//! capability token, and answered by that call. Only the dispatcher's
//! verdict on an entry ends a task.

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

/// Bytes of entries one batch call may carry: under the dispatcher's
/// default body limit of 1 MiB, with room for the envelope. An entry
/// larger than this goes alone (the single call's limit is the same, so
/// its verdict is the dispatcher's).
pub const MAX_BATCH_BYTES: usize = 1024 * 1024 - 64 * 1024;

/// What an entry adds to a batch body besides its token and body.
const ENTRY_OVERHEAD: usize = 64;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Heartbeat,
    Complete,
}

struct Job {
    kind: Kind,
    token: String,
    body: Value,
    /// The entry's serialized size.
    bytes: usize,
    reply: oneshot::Sender<Result<Value, CallError>>,
}

impl Kind {
    fn batch_path(self) -> &'static str {
        match self {
            Kind::Heartbeat => "/v1/task/heartbeat-batch",
            Kind::Complete => "/v1/task/complete-batch",
        }
    }

    fn single_path(self) -> &'static str {
        match self {
            Kind::Heartbeat => "/v1/task/heartbeat",
            Kind::Complete => "/v1/task/complete",
        }
    }
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
        let bytes =
            serde_json::to_string(&body).map_or(0, |s| s.len()) + token.len() + ENTRY_OVERHEAD;
        queue
            .send(Job {
                kind,
                token: token.to_owned(),
                body,
                bytes,
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

/// Chunks of at most [`MAX_BATCH`] entries and [`MAX_BATCH_BYTES`]; an
/// entry over the byte bound is a chunk of its own (sent alone).
fn chunks(jobs: Vec<Job>) -> Vec<Vec<Job>> {
    chunk_sizes(&jobs.iter().map(|j| j.bytes).collect::<Vec<_>>())
        .into_iter()
        .scan(jobs.into_iter(), |it, n| {
            Some(it.by_ref().take(n).collect())
        })
        .collect()
}

/// How many consecutive entries of these sizes each chunk takes.
fn chunk_sizes(sizes: &[usize]) -> Vec<usize> {
    let mut out = Vec::new();
    let (mut n, mut bytes) = (0, 0);
    for &s in sizes {
        if n > 0 && (n == MAX_BATCH || bytes + s > MAX_BATCH_BYTES) {
            out.push(n);
            (n, bytes) = (0, 0);
        }
        n += 1;
        bytes += s;
    }
    if n > 0 {
        out.push(n);
    }
    out
}

/// Each entry alone, with its own token: the answer of the single call.
async fn send_singly(client: Arc<Client>, kind: Kind, jobs: Vec<Job>) {
    let mut calls = tokio::task::JoinSet::new();
    for job in jobs {
        let client = client.clone();
        calls.spawn(async move {
            let answer = client
                .task_call(kind.single_path(), &job.token, &job.body)
                .await;
            let _ = job.reply.send(answer);
        });
    }
    while calls.join_next().await.is_some() {}
}

async fn send_batch(client: Arc<Client>, kind: Kind, jobs: Vec<Job>) {
    if jobs.len() == 1 && jobs[0].bytes > MAX_BATCH_BYTES {
        return send_singly(client, kind, jobs).await;
    }
    let path = kind.batch_path();
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
            tracing::warn!(
                answers = resp.results.len(),
                entries = jobs.len(),
                "a batch call answered the wrong number of entries; sending each alone"
            );
            send_singly(client, kind, jobs).await;
        }
        Err(e) => {
            // About the call, not its entries: each goes again alone.
            tracing::warn!(path, entries = jobs.len(), error = %e, "a batch call failed as a whole; sending each entry alone");
            send_singly(client, kind, jobs).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_bounded_by_entries_and_by_bytes_and_a_big_entry_goes_alone() {
        assert_eq!(chunk_sizes(&[10; 250]), vec![100, 100, 50]);
        let kb100 = 100 * 1024;
        // Twelve 100 KB outputs: nine fit under the byte bound.
        assert_eq!(chunk_sizes(&[kb100; 12]), vec![9, 3]);
        assert_eq!(
            chunk_sizes(&[10, MAX_BATCH_BYTES + 1, 10]),
            vec![1, 1, 1],
            "an entry over the bound is a chunk of its own"
        );
        assert!(chunk_sizes(&[]).is_empty());
    }
}

//! The worker's HTTP client for the dispatcher: the worker contract and the
//! local queue endpoints.
//!
//! The worker credential is not fixed for the process's life (review H5):
//! when it came from a file, the file is read again every minute and
//! whenever the dispatcher refuses the credential, and a call refused
//! with an old credential is made once more with the new one. Rotating a
//! fleet's credential is writing the new one into each file before the
//! old one expires (`docs/runbooks`: worker credential rotation).

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use dispatcher_wire as wire;
use reqwest::StatusCode;
use serde::de::DeserializeOwned;
use serde::Serialize;
use uuid::Uuid;

#[derive(Debug)]
pub enum CallError {
    /// The dispatcher answered with an error body.
    Refused {
        status: StatusCode,
        code: String,
        message: String,
    },
    /// No answer (connection refused, reset, timeout) or an unreadable one.
    Transport(String),
}

impl CallError {
    /// The dispatcher refused the worker credential (401/403).
    pub fn is_credential_refusal(&self) -> bool {
        matches!(self, CallError::Refused { status, .. }
            if *status == StatusCode::UNAUTHORIZED || *status == StatusCode::FORBIDDEN)
    }

    /// Worth trying again: no answer, or a server-side / overload error.
    pub fn is_transient(&self) -> bool {
        match self {
            CallError::Transport(_) => true,
            CallError::Refused { status, .. } => {
                status.is_server_error() || *status == StatusCode::TOO_MANY_REQUESTS
            }
        }
    }
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Refused {
                status,
                code,
                message,
            } => write!(f, "{status} {code}: {message}"),
            CallError::Transport(e) => write!(f, "transport: {e}"),
        }
    }
}

#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    credential: Arc<RwLock<String>>,
    /// Where the credential is read again from (`None`: it came from the
    /// environment and cannot change).
    credential_file: Option<PathBuf>,
}

impl Client {
    pub fn new(
        base: &str,
        credential: &str,
        credential_file: Option<PathBuf>,
    ) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(40))
            .connect_timeout(Duration::from_secs(5))
            .build()?;
        Ok(Client {
            http,
            base: base.trim_end_matches('/').to_owned(),
            credential: Arc::new(RwLock::new(credential.to_owned())),
            credential_file,
        })
    }

    fn current_credential(&self) -> String {
        self.credential
            .read()
            .map(|c| c.clone())
            .unwrap_or_default()
    }

    /// Reads the credential file again; whether the credential changed.
    pub fn reload_credential(&self) -> bool {
        let Some(path) = &self.credential_file else {
            return false;
        };
        match crate::sandbox::read_credential_file(path) {
            Ok(new) => {
                let Ok(mut c) = self.credential.write() else {
                    return false;
                };
                if *c == new {
                    return false;
                }
                *c = new;
                tracing::info!(file = %path.display(), "worker credential reloaded");
                true
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "cannot read the worker credential file again; keeping the current one");
                false
            }
        }
    }

    /// Re-reads the credential file every `every` while `self` lives.
    pub fn reload_periodically(self: &Arc<Self>, every: Duration) {
        if self.credential_file.is_none() {
            return;
        }
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                match me.upgrade() {
                    Some(c) => {
                        c.reload_credential();
                    }
                    None => break,
                }
            }
        });
    }

    /// A call with the worker credential; refused (401/403), the file is
    /// read again and, if it holds a new credential, the call made again.
    async fn post_worker<B: Serialize, R: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<R, CallError> {
        match self.post(path, &self.current_credential(), body).await {
            Err(e) if e.is_credential_refusal() && self.reload_credential() => {
                self.post(path, &self.current_credential(), body).await
            }
            other => other,
        }
    }

    async fn post<B: Serialize, R: DeserializeOwned>(
        &self,
        path: &str,
        token: &str,
        body: &B,
    ) -> Result<R, CallError> {
        let resp = self
            .http
            .post(format!("{}{}", self.base, path))
            .bearer_auth(token)
            .json(body)
            .send()
            .await
            .map_err(|e| CallError::Transport(e.to_string()))?;
        let status = resp.status();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| CallError::Transport(e.to_string()))?;
        if status.is_success() {
            // A 204 has no body: read as `null` (a `()` answer).
            let body: &[u8] = if bytes.is_empty() { b"null" } else { &bytes };
            return serde_json::from_slice(body)
                .map_err(|e| CallError::Transport(format!("bad answer: {e}")));
        }
        match serde_json::from_slice::<wire::ErrorBody>(&bytes) {
            Ok(body) => Err(CallError::Refused {
                status,
                code: body.error.code,
                message: body.error.message,
            }),
            Err(_) => Err(CallError::Refused {
                status,
                code: "unknown".into(),
                message: String::from_utf8_lossy(&bytes).into_owned(),
            }),
        }
    }

    pub async fn receive(
        &self,
        queue: &str,
        max: u32,
        wait_secs: u32,
        visibility_secs: u32,
    ) -> Result<Vec<wire::QueueMessage>, CallError> {
        let req = wire::ReceiveRequest {
            max_messages: Some(max),
            wait_seconds: Some(wait_secs),
            visibility_timeout_seconds: Some(visibility_secs),
        };
        let r: wire::ReceiveResponse = self
            .post_worker(&format!("/internal/queues/{queue}/receive"), &req)
            .await?;
        Ok(r.messages)
    }

    pub async fn change_visibility(
        &self,
        queue: &str,
        receipt: &str,
        secs: u32,
    ) -> Result<bool, CallError> {
        let req = wire::VisibilityRequest {
            receipt_handle: receipt.to_owned(),
            visibility_timeout_seconds: secs,
        };
        let r: wire::ReceiptResponse = self
            .post_worker(&format!("/internal/queues/{queue}/visibility"), &req)
            .await?;
        Ok(r.ok)
    }

    pub async fn delete(&self, queue: &str, receipt: &str) -> Result<bool, CallError> {
        let req = wire::DeleteRequest {
            receipt_handle: receipt.to_owned(),
        };
        let r: wire::ReceiptResponse = self
            .post_worker(&format!("/internal/queues/{queue}/delete"), &req)
            .await?;
        Ok(r.ok)
    }

    pub async fn claim(
        &self,
        task_id: Uuid,
        worker_id: &str,
        lease_seconds: Option<u32>,
    ) -> Result<wire::ClaimResponse, CallError> {
        let req = wire::ClaimRequest {
            task_id,
            worker_id: worker_id.to_owned(),
            lease_seconds,
        };
        self.post_worker("/internal/task-claim", &req).await
    }

    /// `task-claim-batch` by ids.
    pub async fn claim_batch(
        &self,
        task_ids: &[Uuid],
        worker_id: &str,
        lease_seconds: Option<u32>,
    ) -> Result<wire::ClaimBatchResponse, CallError> {
        let req = wire::ClaimBatchRequest {
            worker_id: worker_id.to_owned(),
            task_ids: Some(task_ids.to_vec()),
            max_tasks: None,
            lease_seconds,
            wait_seconds: None,
            runtimes: None,
        };
        self.post_worker("/internal/task-claim-batch", &req).await
    }

    /// `task-claim-batch` of up to `max` ready tasks of any job and of the
    /// given runtimes, waiting up to `wait_secs` for some (ADR 0017): the
    /// granted claims.
    pub async fn claim_ready(
        &self,
        max: u32,
        worker_id: &str,
        lease_seconds: Option<u32>,
        wait_secs: u32,
        runtimes: &[wire::Runtime],
    ) -> Result<Vec<wire::ClaimResponse>, CallError> {
        let req = wire::ClaimBatchRequest {
            worker_id: worker_id.to_owned(),
            task_ids: None,
            max_tasks: Some(max),
            lease_seconds,
            wait_seconds: Some(wait_secs),
            runtimes: Some(runtimes.to_vec()),
        };
        let r: wire::ClaimBatchResponse =
            self.post_worker("/internal/task-claim-batch", &req).await?;
        Ok(r.claims
            .into_iter()
            .filter_map(|c| c.claim)
            .map(|c| *c)
            .collect())
    }

    /// `heartbeat-batch` or `complete-batch` (with the worker credential).
    pub async fn task_batch(
        &self,
        path: &str,
        req: &wire::TaskBatchRequest,
    ) -> Result<wire::TaskBatchResponse, CallError> {
        self.post_worker(path, req).await
    }

    /// A single task call with a body as the batch entry holds it.
    pub async fn task_call(
        &self,
        path: &str,
        token: &str,
        body: &serde_json::Value,
    ) -> Result<serde_json::Value, CallError> {
        self.post(path, token, body).await
    }

    pub async fn heartbeat(&self, token: &str) -> Result<wire::HeartbeatResponse, CallError> {
        self.post(
            "/v1/task/heartbeat",
            token,
            &wire::HeartbeatRequest::default(),
        )
        .await
    }

    pub async fn complete(
        &self,
        token: &str,
        req: &wire::CompleteRequest,
    ) -> Result<wire::CompleteResponse, CallError> {
        self.post("/v1/task/complete", token, req).await
    }

    pub async fn events(
        &self,
        token: &str,
        req: &wire::EventsRequest,
    ) -> Result<wire::EventsResponse, CallError> {
        self.post("/v1/task/events", token, req).await
    }

    pub async fn objects(
        &self,
        token: &str,
        req: &wire::ObjectsRequest,
    ) -> Result<wire::ObjectsResponse, CallError> {
        self.post("/v1/task/objects", token, req).await
    }

    pub async fn dataset_stage(
        &self,
        token: &str,
        req: &wire::StageRequest,
    ) -> Result<wire::StageResponse, CallError> {
        self.post("/v1/task/dataset-stage", token, req).await
    }

    /// Uploads `body` to a presigned `PUT` URL.
    pub async fn put_url(&self, url: &str, body: Vec<u8>) -> Result<(), CallError> {
        let resp = self
            .http
            .put(url)
            .body(body)
            .send()
            .await
            .map_err(|e| CallError::Transport(e.to_string()))?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(CallError::Transport(format!(
                "PUT to a presigned URL answered {}",
                resp.status()
            )))
        }
    }

    /// Hands an attempt back (worker credential; the attempt by its token).
    pub async fn release(&self, token: &str) -> Result<wire::ReleaseResponse, CallError> {
        self.post_worker(
            "/internal/task-release",
            &wire::ReleaseRequest {
                capability_token: token.to_owned(),
            },
        )
        .await
    }

    /// Reports this worker's capacity (`POST /internal/worker-presence`).
    pub async fn presence(&self, report: &wire::WorkerPresence) -> Result<(), CallError> {
        self.post_worker("/internal/worker-presence", report).await
    }

    pub async fn log(
        &self,
        token: &str,
        req: &wire::TaskLogRequest,
    ) -> Result<wire::TaskLogResponse, CallError> {
        self.post_worker("/internal/task-logs", &wire::TaskLogUpload::new(token, req))
            .await
    }

    pub async fn buffer_publish(
        &self,
        token: &str,
        req: &wire::BufferPublishRequest,
    ) -> Result<wire::BufferPublishResponse, CallError> {
        self.post("/v1/task/buffer-publish", token, req).await
    }
}

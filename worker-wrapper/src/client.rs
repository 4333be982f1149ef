//! The worker's HTTP client for the dispatcher: the worker contract and the
//! local queue endpoints.

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
    credential: String,
}

impl Client {
    pub fn new(base: &str, credential: &str) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(40))
            .connect_timeout(Duration::from_secs(5))
            .build()?;
        Ok(Client {
            http,
            base: base.trim_end_matches('/').to_owned(),
            credential: credential.to_owned(),
        })
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
            return serde_json::from_slice(&bytes)
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
            .post(
                &format!("/internal/queues/{queue}/receive"),
                &self.credential,
                &req,
            )
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
            .post(
                &format!("/internal/queues/{queue}/visibility"),
                &self.credential,
                &req,
            )
            .await?;
        Ok(r.ok)
    }

    pub async fn delete(&self, queue: &str, receipt: &str) -> Result<bool, CallError> {
        let req = wire::DeleteRequest {
            receipt_handle: receipt.to_owned(),
        };
        let r: wire::ReceiptResponse = self
            .post(
                &format!("/internal/queues/{queue}/delete"),
                &self.credential,
                &req,
            )
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
        self.post("/internal/task-claim", &self.credential, &req)
            .await
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
        };
        self.post("/internal/task-claim-batch", &self.credential, &req)
            .await
    }

    /// `task-claim-batch` of up to `max` ready tasks of any job, waiting up
    /// to `wait_secs` for some (ADR 0017): the granted claims.
    pub async fn claim_ready(
        &self,
        max: u32,
        worker_id: &str,
        lease_seconds: Option<u32>,
        wait_secs: u32,
    ) -> Result<Vec<wire::ClaimResponse>, CallError> {
        let req = wire::ClaimBatchRequest {
            worker_id: worker_id.to_owned(),
            task_ids: None,
            max_tasks: Some(max),
            lease_seconds,
            wait_seconds: Some(wait_secs),
        };
        let r: wire::ClaimBatchResponse = self
            .post("/internal/task-claim-batch", &self.credential, &req)
            .await?;
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
        self.post(path, &self.credential, req).await
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

    pub async fn buffer_publish(
        &self,
        token: &str,
        req: &wire::BufferPublishRequest,
    ) -> Result<wire::BufferPublishResponse, CallError> {
        self.post("/v1/task/buffer-publish", token, req).await
    }
}

//! Wire types of the worker contract (`shared/design/contract.md`) and the
//! minimal jobs API.
//!
//! This crate has no server dependencies so that workers can depend on it.
//! Request types reject unknown fields (a misspelt field is an error, not a
//! silent default); response types accept unknown fields, because the
//! contract allows fields to be added to answers.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

/// Body of every non-2xx answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ErrorDetail {
    /// Stable machine-readable code (`stale_attempt`, `lease_expired`, ...).
    pub code: String,
    pub message: String,
    pub retryable: bool,
}

/// Task states, as stored and as answered.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    Blocked,
    Ready,
    Leased,
    Succeeded,
    Failed,
    Cancelled,
}

impl TaskState {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Blocked => "blocked",
            TaskState::Ready => "ready",
            TaskState::Leased => "leased",
            TaskState::Succeeded => "succeeded",
            TaskState::Failed => "failed",
            TaskState::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "blocked" => TaskState::Blocked,
            "ready" => TaskState::Ready,
            "leased" => TaskState::Leased,
            "succeeded" => TaskState::Succeeded,
            "failed" => TaskState::Failed,
            "cancelled" => TaskState::Cancelled,
            _ => return None,
        })
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            TaskState::Succeeded | TaskState::Failed | TaskState::Cancelled
        )
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "running" => JobState::Running,
            "succeeded" => JobState::Succeeded,
            "failed" => JobState::Failed,
            "cancelled" => JobState::Cancelled,
            _ => return None,
        })
    }
}

/// What a task runs.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Runtime {
    Exec,
    Node,
    Python,
    Rust,
}

impl Runtime {
    pub fn as_str(self) -> &'static str {
        match self {
            Runtime::Exec => "exec",
            Runtime::Node => "node",
            Runtime::Python => "python",
            Runtime::Rust => "rust",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "exec" => Runtime::Exec,
            "node" => Runtime::Node,
            "python" => Runtime::Python,
            "rust" => Runtime::Rust,
            _ => return None,
        })
    }
}

// ---------------------------------------------------------------- claim ---

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimRequest {
    pub task_id: Uuid,
    pub worker_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_seconds: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClaimResponse {
    pub task_id: Uuid,
    pub job_id: Uuid,
    pub attempt: u32,
    pub lease_expires_at: DateTime<Utc>,
    pub heartbeat_interval_seconds: u32,
    pub capability_token: String,
    pub token_expires_at: DateTime<Utc>,
    pub task: TaskSpec,
    /// The object-store prefix of this attempt alone (also in the token).
    #[serde(default)]
    pub object_prefix: String,
    /// The org the task belongs to (also in the token).
    #[serde(default)]
    pub org_id: Uuid,
    /// For a bundle runtime: a presigned GET of the bundle's archive, whose
    /// SHA-256 is the task's `bundle` digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bundle_url: Option<String>,
    /// The job's W3C trace context, which the attempt's span continues
    /// (absent when the job has none). Not a credential.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskSpec {
    pub key: String,
    pub runtime: Runtime,
    pub bundle: String,
    pub inputs: Value,
    pub outputs: Vec<String>,
    #[serde(default)]
    pub reads: Vec<String>,
    /// How long one run of the task may take; past it the run is killed
    /// and the attempt fails retryably (`0`: the worker's own default).
    #[serde(default)]
    pub timeout_seconds: u32,
}

// -------------------------------------------------------------- bundles ---

/// A bundle's manifest: `bundle.json` at the root of its archive.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BundleManifest {
    pub runtime: Runtime,
    /// Python: `module.function`; Node: `file.export` (`.mjs`, `.js` or
    /// `.cjs`); Rust: the name of the program (`bootstrap`).
    pub handler: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u32>,
    /// The default timeout of the bundle's tasks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<u32>,
}

/// A stored bundle, as `POST /v1/bundles` and `GET /v1/bundles/{digest}`
/// answer it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BundleView {
    pub digest: String,
    pub runtime: Runtime,
    pub handler: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<u32>,
    pub size_bytes: u64,
    pub created_at: DateTime<Utc>,
    #[serde(default)]
    pub tags: Vec<String>,
}

/// `PUT /v1/bundles/tags/{name}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleTagRequest {
    pub digest: String,
}

// --------------------------------------------------------------- alerts ---

/// `POST /v1/alerts/destinations`: a webhook endpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateDestinationRequest {
    pub name: String,
    pub url: String,
    /// `whsec_` + base64 of 24 to 64 bytes; generated when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AlertDestinationView {
    pub id: Uuid,
    pub name: String,
    pub url: String,
    /// Answered once, when the destination is made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// `POST /v1/alerts/routes`: events of the stream `dataset` (default
/// `alert_events`) matching `match` (a `where` map) go to `destination`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateRouteRequest {
    pub name: String,
    #[serde(default = "alert_events")]
    pub dataset: String,
    pub destination: String,
    #[serde(default, rename = "match", skip_serializing_if = "Option::is_none")]
    pub matcher: Option<Value>,
}

fn alert_events() -> String {
    "alert_events".into()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AlertRouteView {
    pub id: Uuid,
    pub name: String,
    pub dataset: String,
    pub destination: String,
    #[serde(default, rename = "match", skip_serializing_if = "Option::is_none")]
    pub matcher: Option<Value>,
    pub created_at: DateTime<Utc>,
}

/// One delivery of an event to a destination.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeliveryView {
    /// Also the `webhook-id` of every try.
    pub delivery_id: Uuid,
    pub event_id: String,
    pub route: String,
    pub destination: String,
    /// `pending`, `delivered` or `dead`.
    pub state: String,
    pub tries: u32,
    #[serde(default)]
    pub next_attempt_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub last_status: Option<u16>,
    #[serde(default)]
    pub last_error: Option<String>,
    #[serde(default)]
    pub delivered_at: Option<DateTime<Utc>>,
}

/// `GET /v1/alerts/events/{event_id}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EventDeliveries {
    pub event_id: String,
    pub deliveries: Vec<DeliveryView>,
}

/// `POST /internal/worker-presence`: a worker's capacity, sent every few
/// seconds; the dispatcher's backlog-per-slot signal sums it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerPresence {
    pub worker_id: String,
    /// Tasks it runs at once (1 to 10 000).
    pub slots: u32,
    /// Slots holding a task now (at most `slots`).
    pub busy: u32,
    /// The runtimes it claims.
    pub runtimes: Vec<Runtime>,
}

// -------------------------------------------------------------- batches ---

/// `POST /internal/task-claim-batch`: the given `task_ids`, or up to
/// `max_tasks` ready tasks of any job (exactly one of the two). With
/// `max_tasks`, `wait_seconds` (at most 20) long-polls: the answer comes as
/// soon as at least one task is claimed, or empty when the wait ends.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimBatchRequest {
    pub worker_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_ids: Option<Vec<Uuid>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tasks: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_seconds: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_seconds: Option<u32>,
    /// With `max_tasks`: only tasks of these runtimes (what this worker
    /// can run); absent, any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtimes: Option<Vec<Runtime>>,
}

/// One entry of a batch claim's answer: its claim or its error.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClaimBatchEntry {
    pub task_id: Uuid,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim: Option<Box<ClaimResponse>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorDetail>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClaimBatchResponse {
    pub claims: Vec<ClaimBatchEntry>,
}

/// `POST /v1/task/heartbeat-batch` (and, to come, `complete-batch`): each
/// entry is a capability token and the single call's body.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskBatchRequest {
    pub entries: Vec<TaskBatchEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskBatchEntry {
    pub capability_token: String,
    #[serde(default)]
    pub body: Value,
}

/// One entry's answer: the single call's answer, or its error. `task_id`
/// is absent when the entry's token could not be read.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskBatchResult {
    #[serde(default)]
    pub task_id: Option<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorDetail>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskBatchResponse {
    pub results: Vec<TaskBatchResult>,
}

// ------------------------------------------------------------ heartbeat ---

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeartbeatResponse {
    pub lease_expires_at: DateTime<Utc>,
    pub capability_token: String,
    pub token_expires_at: DateTime<Utc>,
    pub cancel_requested: bool,
}

// --------------------------------------------------------------- events ---

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsRequest {
    pub events: Vec<Event>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Event {
    pub seq: u64,
    pub kind: String,
    #[serde(default)]
    pub payload: Value,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct EventsResponse {
    pub accepted: u32,
    pub duplicates: u32,
}

// ------------------------------------------------------- buffer publish ---

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BufferPublishRequest {
    pub batch_id: Uuid,
    pub dataset: String,
    pub object_key: String,
    pub rows: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BufferPublishResponse {
    pub batch_id: Uuid,
    pub status: String,
}

/// `GET /v1/datasets/{name}/batches/{batch_id}`: where a buffer batch is.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BatchView {
    pub batch_id: Uuid,
    /// `pending`, `ingested` or `dead`.
    pub status: String,
    pub rows: u64,
    pub reason: Option<BatchReason>,
}

/// Why a batch is dead: a contract reason code, the first bad line
/// (1-based) when a line is at fault, and a message for people.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BatchReason {
    pub code: String,
    pub line: Option<u64>,
    pub message: String,
}

// ------------------------------------------------------------- complete ---

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Succeeded,
    Failed,
    /// The worker stopped the task because its heartbeat answered
    /// `cancel_requested: true`; accepted only then.
    Cancelled,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompleteRequest {
    pub outcome: Outcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<TaskFailure>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TaskFailure {
    pub message: String,
    /// Whether another attempt may succeed. Defaults to `true`.
    #[serde(default = "default_true")]
    pub retryable: bool,
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CompleteResponse {
    pub task_id: Uuid,
    pub attempt: u32,
    /// The task's state after this completion: `succeeded`, `failed`,
    /// `cancelled`, or `ready` when a retry was scheduled.
    pub state: TaskState,
    /// When the retry becomes claimable, if one was scheduled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_at: Option<DateTime<Utc>>,
    /// The dataset versions this completion committed (a `succeeded`
    /// attempt that staged parts); a replay answers the same.
    #[serde(default)]
    pub versions: Vec<CommittedVersion>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CommittedVersion {
    pub dataset: String,
    pub version: u32,
}

// ----------------------------------------------------------------- jobs ---

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitJobRequest {
    pub name: String,
    pub tasks: Vec<TaskSubmission>,
    /// Past this many seconds from submission the job is cancelled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_seconds: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSubmission {
    pub key: String,
    pub runtime: Runtime,
    pub bundle: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inputs: Option<Value>,
    #[serde(default)]
    pub depends_on: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// Datasets the task may write (its capability token's dataset scope).
    #[serde(default)]
    pub outputs: Vec<String>,
    /// Datasets the task may read (its capability token's read scope).
    #[serde(default)]
    pub reads: Vec<String>,
    /// Bound of one run (default: the bundle's, else the dispatcher's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobView {
    pub job_id: Uuid,
    pub name: String,
    pub state: JobState,
    pub created_at: DateTime<Utc>,
    #[serde(default)]
    pub finished_at: Option<DateTime<Utc>>,
    /// When the job is cancelled if it is still running (its submission's
    /// `deadline_seconds`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_at: Option<DateTime<Utc>>,
    pub tasks: Vec<TaskView>,
    /// `GET /v1/jobs/{id}` answers a page of tasks; pass this as `after`
    /// for the next one. `null` on the last page (and on submission, which
    /// answers every task).
    #[serde(default)]
    pub next_cursor: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskView {
    pub key: String,
    pub task_id: Uuid,
    pub state: TaskState,
    pub attempt: u32,
    pub max_attempts: u32,
}

/// How many of a job's tasks are in each state.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct TaskCounts {
    pub blocked: u32,
    pub ready: u32,
    pub leased: u32,
    pub succeeded: u32,
    pub failed: u32,
    pub cancelled: u32,
}

/// The query of `GET /v1/jobs` (every filter optional; times RFC 3339).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JobListQuery {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<JobState>,
    /// Jobs whose name starts with this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name_prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_after: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_before: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_after: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_before: Option<DateTime<Utc>>,
    /// Only jobs with (true) or without (false) a failed task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub has_failed_tasks: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    /// The `next_cursor` of the previous page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
}

/// One job of `GET /v1/jobs`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JobSummary {
    pub job_id: Uuid,
    pub name: String,
    pub state: JobState,
    pub created_at: DateTime<Utc>,
    #[serde(default)]
    pub finished_at: Option<DateTime<Utc>>,
    pub tasks: TaskCounts,
}

/// `GET /v1/jobs`: the org's jobs matching the filters, newest first.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JobListResponse {
    pub jobs: Vec<JobSummary>,
    /// The org's paused runtimes: their ready tasks are not claimed.
    #[serde(default)]
    pub paused_runtimes: Vec<Runtime>,
    /// Pass as `after` for the next page; `null` on the last one.
    #[serde(default)]
    pub next_cursor: Option<String>,
}

/// What a bulk action does to the jobs it selects.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum JobActionKind {
    /// Failed and cancelled jobs run their failed and cancelled tasks again.
    Retry,
    /// Running jobs are cancelled.
    Cancel,
}

impl JobActionKind {
    pub fn as_str(self) -> &'static str {
        match self {
            JobActionKind::Retry => "retry",
            JobActionKind::Cancel => "cancel",
        }
    }
}

/// `POST /v1/job-actions`: retry or cancel every job the filter selects
/// (the listing's filters, without `limit` and `after`), at most
/// `job_action_max` per call; `dry_run` only counts.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JobActionRequest {
    pub action: JobActionKind,
    #[serde(default)]
    pub filter: JobListQuery,
    #[serde(default)]
    pub dry_run: bool,
}

/// What a bulk action did (or, dry, would do).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JobActionResponse {
    /// The audit record; `null` for a dry run.
    #[serde(default)]
    pub action_id: Option<Uuid>,
    pub action: JobActionKind,
    pub dry_run: bool,
    /// Jobs acted on (or that would be).
    pub jobs: u32,
    /// Their tasks that run again (retry) or are stopped (cancel).
    pub tasks: u32,
    /// More jobs matched than one call acts on: call again.
    pub capped: bool,
}

/// One audit record of `GET /v1/job-actions`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JobActionView {
    pub action_id: Uuid,
    pub action: JobActionKind,
    #[serde(default)]
    pub user_id: Option<Uuid>,
    pub target: Value,
    pub jobs: u32,
    pub tasks: u32,
    pub created_at: DateTime<Utc>,
}

/// `GET /v1/job-actions`: the org's audit records, newest first.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JobActionList {
    pub actions: Vec<JobActionView>,
}

/// A paused runtime of the org (`GET /v1/pauses`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PauseView {
    pub runtime: Runtime,
    #[serde(default)]
    pub paused_by: Option<Uuid>,
    pub paused_at: DateTime<Utc>,
    /// Its tasks waiting `ready` while it is paused.
    pub ready_tasks: u64,
}

/// `GET /v1/pauses`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PauseList {
    pub paused: Vec<PauseView>,
}

/// A dataset version an attempt committed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProducedVersion {
    pub dataset: String,
    pub version: u32,
    pub rows: u64,
}

/// A buffer batch an attempt published, and where the sink has it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProducedBatch {
    pub batch_id: Uuid,
    pub dataset: String,
    pub rows: u64,
    /// `pending`, `ingested` or `dead`.
    pub state: String,
}

/// One attempt of a task, as `GET /v1/jobs/{id}/tasks/{key}` answers it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AttemptView {
    pub attempt: u32,
    pub worker_id: String,
    pub claimed_at: DateTime<Utc>,
    #[serde(default)]
    pub finished_at: Option<DateTime<Utc>>,
    /// `finished_at - claimed_at`, when finished.
    #[serde(default)]
    pub duration_ms: Option<u64>,
    /// `succeeded`, `failed`, `lease_expired` or `cancelled`; `null` while
    /// the attempt runs.
    #[serde(default)]
    pub outcome: Option<String>,
    /// What a failed attempt reported (a lease expiry has code
    /// `lease_expired`; a task's own failure `task_failed`).
    #[serde(default)]
    pub error: Option<ErrorDetail>,
    /// The output a succeeded attempt committed.
    #[serde(default)]
    pub output: Option<Value>,
    /// The last progress a heartbeat reported.
    #[serde(default)]
    pub progress: Option<Value>,
    pub events: u32,
    pub dataset_versions: Vec<ProducedVersion>,
    pub buffer_batches: Vec<ProducedBatch>,
    /// The captured output the attempt's worker stored, if any
    /// (`GET …/attempts/{n}/logs` serves it).
    #[serde(default)]
    pub log: Option<LogInfo>,
}

/// How big an attempt's stored log is, and whether it was cut.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct LogInfo {
    /// Bytes stored (after redaction).
    pub bytes: u64,
    /// Bytes the worker dropped from the middle to keep within its bound
    /// (0: the log is whole).
    pub dropped_bytes: u64,
}

/// What an attempt printed, as the worker captured it (an `exec` task's
/// stderr; a bundle runner's stdout and stderr during the invocation).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskLogRequest {
    pub log: String,
    /// Bytes the worker left out (it marks the cut in `log` itself).
    #[serde(default)]
    pub dropped_bytes: u64,
}

/// `POST /internal/task-logs` (worker credential): an attempt's log, the
/// attempt named by its capability token. The worker credential is
/// required, not the task token alone: the task's own code holds its
/// token and must not write what its log says. A log already stored for
/// the attempt is replaced. Fenced.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskLogUpload {
    pub capability_token: String,
    pub log: String,
    #[serde(default)]
    pub dropped_bytes: u64,
}

impl TaskLogUpload {
    pub fn new(capability_token: &str, log: &TaskLogRequest) -> Self {
        TaskLogUpload {
            capability_token: capability_token.to_owned(),
            log: log.log.clone(),
            dropped_bytes: log.dropped_bytes,
        }
    }
}

/// `POST /internal/task-release` (worker credential): the attempt to hand
/// back, by its capability token. The worker credential is required, not
/// the task token alone: a task's own code holds its token, and must not
/// hand itself back (each hand-back gives the attempt back).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseRequest {
    pub capability_token: String,
}

/// `POST /internal/task-release`'s answer: the task's state after the hand-back
/// (`ready`, or `cancelled` when a cancel was requested).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReleaseResponse {
    pub state: TaskState,
}

/// `POST /internal/task-logs`'s answer: what was stored.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct TaskLogResponse {
    pub bytes: u64,
    pub dropped_bytes: u64,
    /// Secrets replaced by `[REDACTED]` before storing.
    pub redactions: u64,
}

/// `GET /v1/jobs/{job_id}/tasks/{key}/attempts/{n}/logs`: an attempt's log.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AttemptLog {
    pub task_key: String,
    pub attempt: u32,
    pub bytes: u64,
    pub dropped_bytes: u64,
    pub log: String,
}

/// `GET /v1/jobs/{job_id}/tasks/{key}`: the task's spec, its state, the
/// keys it depends on, and every attempt, oldest first.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskDetail {
    pub job_id: Uuid,
    pub task_id: Uuid,
    pub state: TaskState,
    pub attempt: u32,
    pub max_attempts: u32,
    /// When a retry may be claimed (a backoff), if it waits.
    #[serde(default)]
    pub not_before: Option<DateTime<Utc>>,
    pub spec: TaskSpec,
    pub depends_on: Vec<String>,
    pub attempts: Vec<AttemptView>,
}

/// One event a task emitted.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EventView {
    pub attempt: u32,
    pub seq: u64,
    pub kind: String,
    pub payload: Value,
    pub created_at: DateTime<Utc>,
}

/// `GET /v1/jobs/{job_id}/tasks/{key}/events`: a page of the task's
/// events, by attempt then sequence number.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EventPage {
    pub events: Vec<EventView>,
    #[serde(default)]
    pub next_cursor: Option<String>,
}

// -------------------------------------------------------------- objects ---

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum ObjectMethod {
    #[serde(rename = "GET")]
    Get,
    #[serde(rename = "PUT")]
    Put,
}

/// `POST /v1/task/objects`: presigned URLs. `PUT` keys are relative to the
/// attempt's `object_prefix`; `GET` keys are absolute.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObjectsRequest {
    pub method: ObjectMethod,
    pub keys: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ObjectUrl {
    /// The absolute key.
    pub key: String,
    pub url: String,
    pub expires_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ObjectsResponse {
    pub urls: Vec<ObjectUrl>,
}

/// `POST /v1/task/credentials` (aws profile): short-lived STS credentials
/// scoped by a session policy to the attempt's prefix (write, read) and
/// the committed parts of its `reads` (read).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TaskCredentialsResponse {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: String,
    /// When the credentials stop working: the attempt's lease end (the
    /// session policy holds only until then) or the STS session's end,
    /// whichever is first. After a heartbeat renews the lease, ask again.
    pub expires_at: DateTime<Utc>,
    pub region: String,
    pub bucket: String,
    /// The attempt's own prefix (writable).
    pub prefix: String,
    /// The session policy the credentials carry (what they can do).
    pub policy: serde_json::Value,
}

// ------------------------------------------------------------- datasets ---

/// Column types of a dataset's schema.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ColumnType {
    String,
    Int64,
    Float64,
    Bool,
    Timestamp,
    Json,
}

impl ColumnType {
    pub fn as_str(self) -> &'static str {
        match self {
            ColumnType::String => "string",
            ColumnType::Int64 => "int64",
            ColumnType::Float64 => "float64",
            ColumnType::Bool => "bool",
            ColumnType::Timestamp => "timestamp",
            ColumnType::Json => "json",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Column {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: ColumnType,
    #[serde(default = "yes")]
    pub nullable: bool,
}

/// The row shape `worker-wrapper sample-task` writes to every dataset it
/// stages or publishes (`{"ts", "task", "attempt", "n"}`); the local stack
/// and the tests create the sample's datasets with these columns.
pub fn sample_columns() -> Vec<Column> {
    [
        ("ts", ColumnType::Timestamp),
        ("task", ColumnType::String),
        ("attempt", ColumnType::Int64),
        ("n", ColumnType::Int64),
    ]
    .into_iter()
    .map(|(name, kind)| Column {
        name: name.into(),
        kind,
        nullable: false,
    })
    .collect()
}

fn yes() -> bool {
    true
}

/// How versions of a dataset are made.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DatasetMode {
    /// Each version is exactly the parts its task staged.
    Replace,
    /// Each version is its parent's parts plus the newly staged ones.
    Append,
    /// Rows arrive only through buffered sinks; no versions.
    Stream,
}

impl DatasetMode {
    pub fn as_str(self) -> &'static str {
        match self {
            DatasetMode::Replace => "replace",
            DatasetMode::Append => "append",
            DatasetMode::Stream => "stream",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "replace" => DatasetMode::Replace,
            "append" => DatasetMode::Append,
            "stream" => DatasetMode::Stream,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateDatasetRequest {
    pub name: String,
    pub mode: DatasetMode,
    pub columns: Vec<Column>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VersionView {
    pub version: u32,
    pub parent: Option<u32>,
    pub task_id: Uuid,
    pub attempt: u32,
    pub rows: u64,
    pub committed_at: DateTime<Utc>,
}

/// `GET /v1/datasets/{name}` (and the answer to its creation).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DatasetView {
    pub name: String,
    pub mode: DatasetMode,
    pub columns: Vec<Column>,
    pub current_version: Option<u32>,
    /// Newest first (at most the 1 000 newest).
    pub versions: Vec<VersionView>,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DatasetList {
    pub datasets: Vec<DatasetView>,
}

/// `POST /v1/task/dataset-stage`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageRequest {
    pub dataset: String,
    pub parts: Vec<StagedPart>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StagedPart {
    /// Absolute key, under the attempt's `object_prefix`.
    pub key: String,
    pub rows: u64,
    pub sha256: String,
    pub bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StageResponse {
    pub dataset: String,
    /// Parts this attempt has staged for the dataset, this call's included.
    pub staged_parts: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PartView {
    pub key: String,
    pub rows: u64,
    pub bytes: u64,
    pub sha256: String,
}

/// `GET /v1/datasets/{name}/versions/{n}`: a version's manifest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ManifestView {
    pub version: u32,
    pub parent: Option<u32>,
    pub rows: u64,
    pub parts: Vec<PartView>,
}

// ----------------------------------------------------------------- orgs ---

/// `POST /v1/orgs`: a new org; its creator becomes its admin.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CreateOrgRequest {
    pub name: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct OrgView {
    pub org_id: Uuid,
    pub name: String,
}

/// `PUT /v1/org/members`: invites a user by e-mail, or changes a member's
/// role. An identity is never set here: it is bound at the user's first
/// sign-in (ADR 0012), so the request has no `idp_subject` (it is refused
/// as an unknown field).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PutMemberRequest {
    pub email: String,
    /// `admin`, `member` or `viewer`.
    pub role: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MemberView {
    pub user_id: Uuid,
    pub email: String,
    /// The identity the user signed in with, once it has.
    pub idp_subject: Option<String>,
    pub role: String,
    /// Whether the user has accepted the membership (named the org in a
    /// call); until then it is an invitation, never the user's default org.
    #[serde(default)]
    pub accepted: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MemberList {
    pub members: Vec<MemberView>,
}

// ---------------------------------------------------------------- query ---

/// `POST /v1/query` (contract: "Query"). `where` is a structured map, never
/// SQL text; it is kept as JSON here and parsed against the dataset's
/// schema by the dispatcher.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct QueryRequest {
    pub dataset: String,
    /// Default: the current version (ignored for `stream` datasets).
    #[serde(default)]
    pub version: Option<u32>,
    /// Default: every column, in schema order.
    #[serde(default)]
    pub select: Option<Vec<String>>,
    #[serde(default, rename = "where")]
    pub filter: Option<serde_json::Value>,
    #[serde(default)]
    pub order_by: Vec<OrderBy>,
    #[serde(default)]
    pub limit: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct OrderBy {
    pub column: String,
    #[serde(default)]
    pub desc: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct QueryResponse {
    pub dataset: String,
    /// The version read; `null` for a `stream` dataset.
    pub version: Option<u32>,
    pub columns: Vec<String>,
    pub rows: Vec<Vec<serde_json::Value>>,
    /// More rows matched than were returned.
    pub truncated: bool,
}

// -------------------------------------------------------------- wake-up ---

/// The queue message body. Nothing else in a message is to be trusted.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct WakeUp {
    pub task_id: Uuid,
}

// --------------------------------------------------------------- queues ---
// `/internal/queues/{queue}/…`: the local profile's queue, served to workers
// over HTTP so they never hold database credentials. SQS semantics.

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiveRequest {
    /// 1 to 10; default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_messages: Option<u32>,
    /// Long-poll wait, 0 to 20 seconds; default 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_seconds: Option<u32>,
    /// How long received messages stay invisible, 0 to 43200; default 30.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub visibility_timeout_seconds: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct QueueMessage {
    pub message_id: String,
    pub receipt_handle: String,
    pub body: Value,
    pub receive_count: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReceiveResponse {
    pub messages: Vec<QueueMessage>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VisibilityRequest {
    pub receipt_handle: String,
    pub visibility_timeout_seconds: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeleteRequest {
    pub receipt_handle: String,
}

/// `changed` / `deleted` is false when the receipt no longer names the
/// current delivery (the message was delivered again since).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReceiptResponse {
    pub ok: bool,
}

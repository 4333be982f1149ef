//! What the store decided, other than success: [`StoreError`]. The HTTP
//! layer maps it to the contract's error body (`http::error::ApiError`).

use dispatcher_wire::TaskState;
use uuid::Uuid;

use crate::domain::Invalid;

/// Outcomes of store and service operations other than success.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("no task {0}")]
    TaskNotFound(Uuid),
    #[error("no job {0}")]
    JobNotFound(Uuid),
    /// Something else the caller cannot see (a dataset, a version).
    #[error("{0}")]
    NotFound(String),
    #[error("attempt {attempt} of task {task_id} was superseded by attempt {current}")]
    StaleAttempt {
        task_id: Uuid,
        attempt: u32,
        current: u32,
    },
    #[error("attempt {attempt} of task {task_id} has already finished (task is {state})")]
    AttemptFinished {
        task_id: Uuid,
        attempt: u32,
        state: String,
    },
    #[error("the lease of attempt {attempt} of task {task_id} has expired")]
    LeaseExpired { task_id: Uuid, attempt: u32 },
    #[error("task {task_id} is not claimable: {reason}")]
    NotClaimable { task_id: Uuid, reason: String },
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Forbidden(String),
    /// The request names something that exists but does not fit (a
    /// dataset of the wrong mode); `400 invalid_request`.
    #[error("{}: {}", .0.field, .0.message)]
    Invalid(Invalid),
    /// Nothing was written, and the same call may succeed if repeated.
    #[error("{0}")]
    Retry(String),
    /// A bound on what one attempt (or job) may store was reached; nothing
    /// of the call was written.
    #[error("{0}")]
    Limit(String),
    /// A bug or broken stored data, logged where it is found; the caller
    /// sees only that it happened.
    #[error("internal: {0}")]
    Internal(String),
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
}

impl StoreError {
    /// Whether a caller that lost its lease (in any way) got this error.
    pub fn is_fenced(&self) -> bool {
        matches!(
            self,
            StoreError::StaleAttempt { .. }
                | StoreError::AttemptFinished { .. }
                | StoreError::LeaseExpired { .. }
        )
    }
}

/// Parses a stored state, treating an unknown one as a bug.
pub(crate) fn task_state(s: &str) -> Result<TaskState, StoreError> {
    TaskState::parse(s).ok_or_else(|| {
        StoreError::Db(sqlx::Error::Decode(
            format!("unknown task state {s:?}").into(),
        ))
    })
}

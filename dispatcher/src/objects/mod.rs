//! The object-store boundary: dataset files and buffer batches live in an
//! object store, addressed by key (ADR 0009).
//!
//! Implementations, which must all pass the conformance suite
//! (`tests/tests/it/objects.rs`):
//! * [`LocalDirStore`], the local profile's: a directory on disk, with
//!   presigned URLs served by [`local::router`];
//! * [`S3Store`], the aws profile's: Amazon S3 (or any S3-compatible store
//!   through an endpoint override, path-style) through `aws-sdk-s3`.

mod guarded;
pub mod local;
mod s3;
pub mod sts;

pub use guarded::Guarded;
pub use local::LocalDirStore;
pub use s3::{S3Config, S3Store};

use std::time::Duration;

use async_trait::async_trait;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    pub key: String,
    pub size: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    #[error("no object {0:?}")]
    NotFound(String),
    /// A create-only put found the key taken; the existing object is intact.
    #[error("object {0:?} already exists")]
    AlreadyExists(String),
    #[error("invalid object key {0:?}: {1}")]
    InvalidKey(String, &'static str),
    #[error("object store unavailable: {0}")]
    Unavailable(String),
    /// Refused at once: the store's circuit breaker is open.
    #[error("object store unavailable: {0}")]
    Open(#[from] crate::breaker::Open),
}

/// Whether `key` is a key (`domain::object_key_rule`).
pub fn check_key(key: &str) -> Result<(), ObjectError> {
    crate::domain::object_key_rule(key).map_err(|why| ObjectError::InvalidKey(key.to_owned(), why))
}

/// Where a staged part's verified bytes are kept: outside every attempt
/// prefix (`orgs/<org>/committed/…`), so no presigned URL and no session
/// policy handed to a task can write it (review H1).
pub fn committed_key(org: uuid::Uuid, staged: &str) -> String {
    let own = format!("orgs/{org}/");
    let rest = staged.strip_prefix(&own).unwrap_or(staged);
    format!("orgs/{org}/committed/{rest}")
}

#[async_trait]
pub trait ObjectStore: Send + Sync {
    /// Writes the object, replacing any object with this key.
    async fn put(&self, key: &str, body: Vec<u8>) -> Result<(), ObjectError>;

    /// Writes the object only if the key is free; otherwise
    /// [`ObjectError::AlreadyExists`] and the existing object is untouched.
    async fn put_if_absent(&self, key: &str, body: Vec<u8>) -> Result<(), ObjectError>;

    async fn get(&self, key: &str) -> Result<Vec<u8>, ObjectError>;

    async fn head(&self, key: &str) -> Result<ObjectMeta, ObjectError>;

    /// Every object whose key starts with `prefix`, in key order.
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, ObjectError>;

    /// Deletes the object; deleting a missing key is not an error.
    async fn delete(&self, key: &str) -> Result<(), ObjectError>;

    /// A URL that reads this one key, valid for `expires_in`.
    async fn presign_get(&self, key: &str, expires_in: Duration) -> Result<String, ObjectError>;

    /// A URL that writes this one key with `PUT`, valid for `expires_in`.
    async fn presign_put(&self, key: &str, expires_in: Duration) -> Result<String, ObjectError>;
}

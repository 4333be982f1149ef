//! An object store behind a circuit breaker (`crate::breaker`): while the
//! store keeps failing, calls fail at once with [`ObjectError::Open`].
//! Only [`ObjectError::Unavailable`] counts as a failure; a missing or
//! taken key is the store answering. Presigning is local computation and
//! goes straight through.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::{ObjectError, ObjectMeta, ObjectStore};
use crate::breaker::Breaker;

pub struct Guarded {
    inner: Arc<dyn ObjectStore>,
    breaker: Arc<Breaker>,
}

impl Guarded {
    pub fn new(inner: Arc<dyn ObjectStore>, breaker: Arc<Breaker>) -> Self {
        Guarded { inner, breaker }
    }

    async fn call<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, ObjectError>>,
    ) -> Result<T, ObjectError> {
        self.breaker
            .call(call, |e| match e {
                ObjectError::Unavailable(why) => Some(why.clone()),
                _ => None,
            })
            .await?
    }
}

#[async_trait]
impl ObjectStore for Guarded {
    async fn put(&self, key: &str, body: Vec<u8>) -> Result<(), ObjectError> {
        self.call(self.inner.put(key, body)).await
    }

    async fn put_if_absent(&self, key: &str, body: Vec<u8>) -> Result<(), ObjectError> {
        self.call(self.inner.put_if_absent(key, body)).await
    }

    async fn get(&self, key: &str) -> Result<Vec<u8>, ObjectError> {
        self.call(self.inner.get(key)).await
    }

    async fn head(&self, key: &str) -> Result<ObjectMeta, ObjectError> {
        self.call(self.inner.head(key)).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, ObjectError> {
        self.call(self.inner.list(prefix)).await
    }

    async fn delete(&self, key: &str) -> Result<(), ObjectError> {
        self.call(self.inner.delete(key)).await
    }

    async fn presign_get(&self, key: &str, expires_in: Duration) -> Result<String, ObjectError> {
        self.inner.presign_get(key, expires_in).await
    }

    async fn presign_put(&self, key: &str, expires_in: Duration) -> Result<String, ObjectError> {
        self.inner.presign_put(key, expires_in).await
    }
}

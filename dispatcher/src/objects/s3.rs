//! The aws profile's object store: S3 through `aws-sdk-s3`, path-style, with
//! an optional endpoint override so that any S3-compatible store works.
//! Create-only writes are S3 conditional writes (`If-None-Match: *`).

use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::presigning::PresigningConfig;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::Client;

use super::{check_key, ObjectError, ObjectMeta, ObjectStore};

#[derive(Clone)]
pub struct S3Config {
    pub region: String,
    pub endpoint_url: Option<String>,
    pub bucket: String,
    /// Static credentials; `None` uses the SDK's default chain.
    pub static_credentials: Option<(String, String)>,
}

/// Never prints the secret key.
impl std::fmt::Debug for S3Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Config")
            .field("region", &self.region)
            .field("endpoint_url", &self.endpoint_url)
            .field("bucket", &self.bucket)
            .field(
                "static_credentials",
                &crate::aws::redacted_credentials(&self.static_credentials),
            )
            .finish()
    }
}

pub struct S3Store {
    client: Client,
    bucket: String,
}

fn unavailable<E, R>(e: SdkError<E, R>) -> ObjectError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    ObjectError::Unavailable(crate::aws::sdk_error_line("S3", &e))
}

/// The HTTP status of a service error, if the service answered.
fn status<E>(e: &SdkError<E, aws_sdk_s3::config::http::HttpResponse>) -> Option<u16> {
    e.raw_response().map(|r| r.status().as_u16())
}

impl S3Store {
    pub async fn client(cfg: &S3Config) -> Client {
        let shared = crate::aws::sdk_config(
            &cfg.region,
            cfg.endpoint_url.as_deref(),
            cfg.static_credentials.as_ref(),
        )
        .await;
        let conf = aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(true)
            .build();
        Client::from_conf(conf)
    }

    /// Connects and checks that the bucket exists, saying so if not.
    pub async fn connect(cfg: &S3Config) -> Result<Self, ObjectError> {
        let client = Self::client(cfg).await;
        match client.head_bucket().bucket(&cfg.bucket).send().await {
            Ok(_) => {}
            Err(e) if e.raw_response().map(|r| r.status().as_u16()) == Some(404) => {
                return Err(ObjectError::Unavailable(format!(
                    "S3 bucket {:?} does not exist",
                    cfg.bucket
                )));
            }
            Err(e) => {
                return Err(ObjectError::Unavailable(format!(
                    "S3 bucket {:?} is unreachable: {}",
                    cfg.bucket,
                    crate::aws::sdk_error_line("S3", &e)
                )))
            }
        }
        Ok(S3Store {
            client,
            bucket: cfg.bucket.clone(),
        })
    }

    /// Creates the bucket if it does not exist (tests and local set-ups).
    pub async fn create_bucket(cfg: &S3Config) -> Result<(), ObjectError> {
        let client = Self::client(cfg).await;
        match client.create_bucket().bucket(&cfg.bucket).send().await {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(
                    e.code(),
                    Some("BucketAlreadyOwnedByYou" | "BucketAlreadyExists")
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn put_object(
        &self,
        key: &str,
        body: Vec<u8>,
        create_only: bool,
    ) -> Result<(), ObjectError> {
        check_key(key)?;
        let mut req = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .body(ByteStream::from(body));
        if create_only {
            req = req.if_none_match("*");
        }
        match req.send().await {
            Ok(_) => Ok(()),
            Err(e)
                if create_only
                    && (status(&e) == Some(412) || e.code() == Some("PreconditionFailed")) =>
            {
                Err(ObjectError::AlreadyExists(key.to_owned()))
            }
            Err(e) => Err(unavailable(e)),
        }
    }

    fn presigning(expires_in: Duration) -> Result<PresigningConfig, ObjectError> {
        PresigningConfig::expires_in(expires_in)
            .map_err(|e| ObjectError::Unavailable(e.to_string()))
    }
}

#[async_trait]
impl ObjectStore for S3Store {
    async fn put(&self, key: &str, body: Vec<u8>) -> Result<(), ObjectError> {
        self.put_object(key, body, false).await
    }

    async fn put_if_absent(&self, key: &str, body: Vec<u8>) -> Result<(), ObjectError> {
        self.put_object(key, body, true).await
    }

    async fn get(&self, key: &str) -> Result<Vec<u8>, ObjectError> {
        check_key(key)?;
        match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(out) => out
                .body
                .collect()
                .await
                .map(|b| b.into_bytes().to_vec())
                .map_err(|e| ObjectError::Unavailable(e.to_string())),
            Err(e) if status(&e) == Some(404) => Err(ObjectError::NotFound(key.to_owned())),
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn head(&self, key: &str) -> Result<ObjectMeta, ObjectError> {
        check_key(key)?;
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(out) => Ok(ObjectMeta {
                key: key.to_owned(),
                size: u64::try_from(out.content_length().unwrap_or(0)).unwrap_or(0),
            }),
            Err(e) if status(&e) == Some(404) => Err(ObjectError::NotFound(key.to_owned())),
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, ObjectError> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(prefix)
                .set_continuation_token(token.take())
                .send()
                .await
                .map_err(unavailable)?;
            for o in page.contents() {
                out.push(ObjectMeta {
                    key: o.key().unwrap_or_default().to_owned(),
                    size: u64::try_from(o.size().unwrap_or(0)).unwrap_or(0),
                });
            }
            match page.next_continuation_token() {
                Some(t) if page.is_truncated() == Some(true) => token = Some(t.to_owned()),
                _ => break,
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    async fn delete(&self, key: &str) -> Result<(), ObjectError> {
        check_key(key)?;
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map(drop)
            .map_err(unavailable)
    }

    async fn presign_get(&self, key: &str, expires_in: Duration) -> Result<String, ObjectError> {
        check_key(key)?;
        let req = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .presigned(Self::presigning(expires_in)?)
            .await
            .map_err(unavailable)?;
        Ok(req.uri().to_owned())
    }

    async fn presign_put(&self, key: &str, expires_in: Duration) -> Result<String, ObjectError> {
        check_key(key)?;
        let req = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .presigned(Self::presigning(expires_in)?)
            .await
            .map_err(unavailable)?;
        Ok(req.uri().to_owned())
    }
}

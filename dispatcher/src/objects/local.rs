//! The local profile's object store: a directory on disk.
//!
//! Writes go to a temporary file first: `put` renames it over the key
//! (atomic replace), `put_if_absent` hard-links it to the key, which fails
//! if the key exists (atomic create-only). Presigned URLs are
//! `{base_url}/objects/{key}?method=GET&expires={unix}&sig={hex}`, where
//! `sig` is HMAC-SHA256 over method, key and expiry with the store's secret
//! (at least [`MIN_SECRET_BYTES`] bytes), and each segment of the key is
//! percent-encoded; `http::objects::router` serves them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::{check_key, ObjectError, ObjectMeta, ObjectStore};

/// The shortest secret a local store accepts: 256 bits, HMAC-SHA256's
/// strength.
pub const MIN_SECRET_BYTES: usize = 32;

/// Everything but unreserved characters (RFC 3986) is escaped in a key's
/// segments; `/` separates them.
const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

pub struct LocalDirStore {
    root: PathBuf,
    /// Where [`router`] is served, e.g. `http://127.0.0.1:8080`.
    base_url: String,
    secret: Vec<u8>,
}

fn io(e: std::io::Error) -> ObjectError {
    ObjectError::Unavailable(e.to_string())
}

impl std::fmt::Debug for LocalDirStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalDirStore")
            .field("root", &self.root)
            .field("base_url", &self.base_url)
            .field("secret", &"[redacted]")
            .finish()
    }
}

impl LocalDirStore {
    /// A store under `root` whose URLs are served at `base_url`, signed
    /// with `secret`; refused if the secret is shorter than
    /// [`MIN_SECRET_BYTES`].
    pub fn new(
        root: impl Into<PathBuf>,
        base_url: &str,
        secret: Vec<u8>,
    ) -> Result<Self, ObjectError> {
        if secret.len() < MIN_SECRET_BYTES {
            return Err(ObjectError::Unavailable(format!(
                "the presigned-URL secret must be at least {MIN_SECRET_BYTES} bytes, not {}",
                secret.len()
            )));
        }
        Ok(LocalDirStore {
            root: root.into(),
            base_url: base_url.trim_end_matches('/').to_owned(),
            secret,
        })
    }

    fn path(&self, key: &str) -> Result<PathBuf, ObjectError> {
        check_key(key)?;
        Ok(self.root.join(key))
    }

    async fn staged(&self, path: &Path, body: &[u8]) -> Result<PathBuf, ObjectError> {
        let dir = path.parent().unwrap_or(&self.root);
        tokio::fs::create_dir_all(dir).await.map_err(io)?;
        let tmp = dir.join(format!(".tmp-{}", uuid::Uuid::new_v4().simple()));
        tokio::fs::write(&tmp, body).await.map_err(io)?;
        Ok(tmp)
    }

    fn signature(&self, method: &str, key: &str, expires: i64) -> Hmac<Sha256> {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.secret).expect("HMAC takes any key length");
        mac.update(format!("{method}\n{key}\n{expires}").as_bytes());
        mac
    }

    fn presign(
        &self,
        method: &str,
        key: &str,
        expires_in: Duration,
    ) -> Result<String, ObjectError> {
        check_key(key)?;
        let expires = chrono::Utc::now().timestamp()
            + i64::try_from(expires_in.as_secs()).unwrap_or(i64::MAX / 2);
        let sig = hex::encode(self.signature(method, key, expires).finalize().into_bytes());
        let path: Vec<String> = key
            .split('/')
            .map(|s| percent_encoding::utf8_percent_encode(s, SEGMENT).to_string())
            .collect();
        Ok(format!(
            "{}/objects/{}?method={method}&expires={expires}&sig={sig}",
            self.base_url,
            path.join("/")
        ))
    }

    /// Whether `sig` signs `method` on `key` until `expires`, still valid.
    pub fn verify(&self, method: &str, key: &str, expires: i64, sig: &str) -> bool {
        if chrono::Utc::now().timestamp() > expires {
            return false;
        }
        let Ok(sig) = hex::decode(sig) else {
            return false;
        };
        // Constant-time comparison.
        self.signature(method, key, expires)
            .verify_slice(&sig)
            .is_ok()
    }

    fn walk(&self, dir: &Path, out: &mut Vec<ObjectMeta>) -> std::io::Result<()> {
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let path = entry.path();
            let meta = entry.metadata()?;
            if meta.is_dir() {
                self.walk(&path, out)?;
            } else if !entry.file_name().to_string_lossy().starts_with(".tmp-") {
                let key = path
                    .strip_prefix(&self.root)
                    .map(|p| p.to_string_lossy().replace('\\', "/"))
                    .unwrap_or_default();
                out.push(ObjectMeta {
                    key,
                    size: meta.len(),
                });
            }
        }
        Ok(())
    }
}

#[async_trait]
impl ObjectStore for LocalDirStore {
    async fn put(&self, key: &str, body: Vec<u8>) -> Result<(), ObjectError> {
        let path = self.path(key)?;
        let tmp = self.staged(&path, &body).await?;
        tokio::fs::rename(&tmp, &path).await.map_err(io)
    }

    async fn put_if_absent(&self, key: &str, body: Vec<u8>) -> Result<(), ObjectError> {
        let path = self.path(key)?;
        let tmp = self.staged(&path, &body).await?;
        let linked = tokio::fs::hard_link(&tmp, &path).await;
        let _ = tokio::fs::remove_file(&tmp).await;
        match linked {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                Err(ObjectError::AlreadyExists(key.to_owned()))
            }
            Err(e) => Err(io(e)),
        }
    }

    async fn get(&self, key: &str) -> Result<Vec<u8>, ObjectError> {
        match tokio::fs::read(self.path(key)?).await {
            Ok(b) => Ok(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(ObjectError::NotFound(key.to_owned()))
            }
            Err(e) => Err(io(e)),
        }
    }

    async fn head(&self, key: &str) -> Result<ObjectMeta, ObjectError> {
        match tokio::fs::metadata(self.path(key)?).await {
            Ok(m) if m.is_file() => Ok(ObjectMeta {
                key: key.to_owned(),
                size: m.len(),
            }),
            Ok(_) => Err(ObjectError::NotFound(key.to_owned())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(ObjectError::NotFound(key.to_owned()))
            }
            Err(e) => Err(io(e)),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, ObjectError> {
        let mut out = Vec::new();
        self.walk(&self.root, &mut out).map_err(io)?;
        out.retain(|m| m.key.starts_with(prefix));
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    async fn delete(&self, key: &str) -> Result<(), ObjectError> {
        match tokio::fs::remove_file(self.path(key)?).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(e)),
        }
    }

    async fn presign_get(&self, key: &str, expires_in: Duration) -> Result<String, ObjectError> {
        self.presign("GET", key, expires_in)
    }

    async fn presign_put(&self, key: &str, expires_in: Duration) -> Result<String, ObjectError> {
        self.presign("PUT", key, expires_in)
    }
}

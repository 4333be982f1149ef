//! A second S3-compatible server speaking the real protocol: `s3s-fs`
//! (crates.io), which verifies SigV4 signatures, presigned URLs and their
//! expiry, and `If-None-Match: *`, where moto's server accepts any
//! signature. Started on a free loopback port with its own credentials and
//! data directory for one test, killed and removed when dropped.
//! `scripts/ensure-s3s-fs` installs it (`scripts/test` runs that); a test
//! that cannot start it fails, naming the fix.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use dispatcher::objects::S3Config;

pub struct S3sFs {
    child: Child,
    root: PathBuf,
    pub port: u16,
}

impl Drop for S3sFs {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// The binary: `S3S_FS`, else `.tools/bin/s3s-fs` in the workspace.
fn binary() -> PathBuf {
    let path = std::env::var_os("S3S_FS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.tools/bin/s3s-fs"));
    assert!(
        path.exists(),
        "{} is missing: install it with `scripts/ensure-s3s-fs` (scripts/test does)",
        path.display()
    );
    path
}

pub const ACCESS_KEY: &str = "dispatcher-test";
pub const SECRET_KEY: &str = "dispatcher-test-secret";

impl S3sFs {
    pub async fn start() -> S3sFs {
        let port = crate::free_port();
        let root = std::env::temp_dir().join(format!("s3s-fs-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&root).expect("data directory");
        let bin = binary();
        let child = Command::new(&bin)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(&root)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
        let mut server = S3sFs { child, root, port };
        crate::wait_ready(
            &mut server.child,
            "s3s-fs",
            "",
            Duration::from_secs(20),
            || async move {
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
            },
        )
        .await;
        server
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// S3 settings for this server and a bucket name of the test's own.
    pub fn s3(&self) -> S3Config {
        S3Config {
            region: "us-east-1".into(),
            endpoint_url: Some(self.url()),
            bucket: format!("t{}", uuid::Uuid::new_v4().simple()),
            static_credentials: Some((ACCESS_KEY.into(), SECRET_KEY.into())),
        }
    }
}

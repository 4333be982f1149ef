//! An S3/SQS-compatible server speaking the real protocol: moto's server
//! (PyPI `moto[server]`), started on a free loopback port for one test and
//! killed when dropped. `.ci/run` installs it; a test that cannot start it
//! fails, naming the fix.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use dispatcher::queue::SqsConfig;

pub struct Moto {
    child: Child,
    pub port: u16,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Moto {
    pub async fn start() -> Moto {
        let port = crate::free_port();
        let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
        let child = Command::new(&python)
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {python}: {e}"));
        let mut moto = Moto { child, port };
        let client = reqwest::Client::new();
        let probe = format!("{}/moto-api/", moto.url());
        crate::wait_ready(
            &mut moto.child,
            "moto's server",
            ": install it with `python3 -m pip install 'moto[server]'` (.ci/run does)",
            Duration::from_secs(30),
            || async { client.get(&probe).send().await.is_ok() },
        )
        .await;
        moto
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// SQS settings for this server, with a queue prefix of the test's own.
    pub fn sqs(&self) -> SqsConfig {
        SqsConfig {
            region: "us-east-1".into(),
            endpoint_url: Some(self.url()),
            queue_prefix: format!("t{}-", uuid::Uuid::new_v4().simple()),
            static_credentials: Some(("test".into(), "test".into())),
        }
    }

    /// S3 settings of a fresh bucket of the test's own on this server.
    pub async fn s3_config(&self) -> dispatcher::objects::S3Config {
        let cfg = dispatcher::objects::S3Config {
            region: "us-east-1".into(),
            endpoint_url: Some(self.url()),
            bucket: format!("t{}", uuid::Uuid::new_v4().simple()),
            static_credentials: Some(("test".into(), "test".into())),
        };
        dispatcher::objects::S3Store::create_bucket(&cfg)
            .await
            .expect("bucket");
        cfg
    }

    /// An S3 store on this server, in a fresh bucket of the test's own.
    pub async fn s3_store(&self) -> dispatcher::objects::S3Store {
        dispatcher::objects::S3Store::connect(&self.s3_config().await)
            .await
            .expect("connect")
    }
}

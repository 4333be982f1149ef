//! `worker-wrapper invoke-server`, the Lambda Invoke API on this machine
//! (ADR 0026), as tests start it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use uuid::Uuid;

use crate::stack::binary;

/// A running invoke server; killed, and its functions removed, on drop.
pub struct InvokeServer {
    child: Child,
    /// Where the Invoke API answers (`http://127.0.0.1:port`).
    pub url: String,
    functions: PathBuf,
    events: PathBuf,
    log: PathBuf,
}

impl Drop for InvokeServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.functions);
    }
}

impl InvokeServer {
    /// Starts `worker-wrapper invoke-server` on a free port with an empty
    /// functions directory.
    pub fn start() -> InvokeServer {
        let dir = std::env::temp_dir().join(format!("invoke-{}", Uuid::new_v4().simple()));
        let functions = dir.join("functions");
        std::fs::create_dir_all(&functions).unwrap();
        let (address, events, log) = (
            dir.join("address"),
            dir.join("events.jsonl"),
            dir.join("server.log"),
        );
        let child = Command::new(binary("worker-wrapper"))
            .args(["invoke-server", "--listen", "127.0.0.1:0", "--functions"])
            .arg(&functions)
            .arg("--address-file")
            .arg(&address)
            .arg("--events-file")
            .arg(&events)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("invoke-server");
        let deadline = Instant::now() + Duration::from_secs(10);
        let addr = loop {
            if let Ok(a) = std::fs::read_to_string(&address) {
                if !a.is_empty() {
                    break a;
                }
            }
            assert!(Instant::now() < deadline, "the invoke server did not start");
            std::thread::sleep(Duration::from_millis(20));
        };
        InvokeServer {
            child,
            url: format!("http://{addr}"),
            functions,
            events,
            log,
        }
    }

    /// Deploys `bundle` (a directory) as function `name`.
    pub fn deploy(&self, name: &str, bundle: &Path, settings: Value) {
        std::os::unix::fs::symlink(bundle, self.functions.join(name)).unwrap();
        std::fs::write(
            self.functions.join(format!("{name}.json")),
            settings.to_string(),
        )
        .unwrap();
    }

    /// Every event the functions got, in order.
    pub fn events(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.events)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// What the server logged (cold starts, init failures).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

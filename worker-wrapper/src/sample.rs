//! `worker-wrapper sample-task`: a demonstration task used by the local
//! stack and the end-to-end tests. It behaves as any exec task may: it
//! reads its inputs on stdin, calls the dispatcher with its own capability
//! token, and prints its output as JSON.
//!
//! Inputs (all optional):
//! * `fail_attempts` (n): fail (exit 1) while `DISPATCHER_ATTEMPT` <= n;
//! * `sleep_ms`: work this long before finishing;
//! * `events` (bool, default true): report one `log` event;
//! * `publish` (bool, default true): publish one buffer batch to the first
//!   declared output, if any.

use std::time::Duration;

use anyhow::{Context, Result};
use dispatcher_wire as wire;
use tokio::io::AsyncReadExt;

use crate::client::Client;

fn env(name: &str) -> Result<String> {
    std::env::var(name)
        .with_context(|| format!("{name} is not set (run me through worker-wrapper)"))
}

pub async fn main() -> Result<()> {
    let mut raw = Vec::new();
    tokio::io::stdin().read_to_end(&mut raw).await?;
    let inputs: serde_json::Value = if raw.is_empty() {
        serde_json::json!({})
    } else {
        serde_json::from_slice(&raw)?
    };
    let attempt: u32 = env("DISPATCHER_ATTEMPT")?.parse()?;
    let key = env("DISPATCHER_TASK_KEY")?;
    // The token file holds the newest token (the wrapper refreshes it).
    let token = std::fs::read_to_string(env("DISPATCHER_TASK_TOKEN_FILE")?)
        .or_else(|_| env("DISPATCHER_TASK_TOKEN"))?;
    let client = Client::new(&env("DISPATCHER_URL")?, "")?;

    if inputs["events"].as_bool().unwrap_or(true) {
        let req = wire::EventsRequest {
            events: vec![wire::Event {
                seq: 0,
                kind: "log".into(),
                payload: serde_json::json!({"msg": format!("{key} attempt {attempt} started")}),
            }],
        };
        client
            .events(&token, &req)
            .await
            .map_err(|e| anyhow::anyhow!("events: {e}"))?;
    }
    if let Some(ms) = inputs["sleep_ms"].as_u64() {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if u64::from(attempt) <= inputs["fail_attempts"].as_u64().unwrap_or(0) {
        eprintln!("{key}: failing attempt {attempt} on purpose");
        std::process::exit(1);
    }
    let outputs = env("DISPATCHER_OUTPUTS").unwrap_or_default();
    let dataset = outputs.split(',').find(|s| !s.is_empty());
    let mut published = None;
    if let (Some(dataset), true) = (dataset, inputs["publish"].as_bool().unwrap_or(true)) {
        let batch_id = uuid::Uuid::new_v4();
        let req = wire::BufferPublishRequest {
            batch_id,
            dataset: dataset.to_owned(),
            object_key: format!(
                "{}buffers/{batch_id}.jsonl",
                env("DISPATCHER_OBJECT_PREFIX")?
            ),
            rows: 1,
            sha256: "0".repeat(64),
        };
        client
            .buffer_publish(&token, &req)
            .await
            .map_err(|e| anyhow::anyhow!("buffer-publish: {e}"))?;
        published = Some(batch_id);
    }
    println!(
        "{}",
        serde_json::json!({"task": key, "attempt": attempt, "published": published})
    );
    Ok(())
}

//! `worker-wrapper sample-task`: a demonstration task used by the local
//! stack and the end-to-end tests. It behaves as any exec task may: it
//! reads its inputs on stdin, calls the dispatcher with its own capability
//! token, and prints its output as JSON.
//!
//! Inputs (all optional):
//! * `fail_attempts` (n): fail (exit 1) while `DISPATCHER_ATTEMPT` <= n;
//! * `sleep_ms`: work this long before finishing (with `sleep_attempts`
//!   (n): only while `DISPATCHER_ATTEMPT` <= n);
//! * `events` (bool, default true): report one `log` event;
//! * `stage` (list of dataset names): stage one part of `rows` rows into
//!   each (they must be among the task's outputs), committed as a version
//!   when the task succeeds;
//! * `publish` (bool, default true): publish one buffer batch of `rows`
//!   rows to every other declared output (stream datasets);
//! * `rows` (default 3): rows per part and per batch.
//!
//! Rows have the shape of `dispatcher_wire::sample_columns`. Objects are
//! uploaded through presigned URLs (`POST /v1/task/objects`), as any task
//! would.

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
    let client = Client::new(&env("DISPATCHER_URL")?, "", None)?;

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
    let sleeps = inputs["sleep_attempts"]
        .as_u64()
        .is_none_or(|n| u64::from(attempt) <= n);
    if let Some(ms) = inputs["sleep_ms"].as_u64().filter(|_| sleeps) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if u64::from(attempt) <= inputs["fail_attempts"].as_u64().unwrap_or(0) {
        eprintln!("{key}: failing attempt {attempt} on purpose");
        std::process::exit(1);
    }
    let outputs: Vec<String> = env("DISPATCHER_OUTPUTS")
        .unwrap_or_default()
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    let stage: Vec<String> = serde_json::from_value(inputs["stage"].clone()).unwrap_or_default();
    let rows = inputs["rows"].as_u64().unwrap_or(3);
    let body: String = (0..rows)
        .map(|n| {
            serde_json::json!({"ts": chrono::Utc::now().to_rfc3339(), "task": key,
                               "attempt": attempt, "n": n})
            .to_string()
                + "\n"
        })
        .collect();
    let part = |name: String| wire::StagedPart {
        key: name,
        rows,
        sha256: hex::encode(<sha2::Sha256 as sha2::Digest>::digest(body.as_bytes())),
        bytes: body.len() as u64,
    };
    let mut staged = Vec::new();
    for dataset in &stage {
        let key = upload(&client, &token, &format!("{dataset}/part-0.jsonl"), &body).await?;
        let req = wire::StageRequest {
            dataset: dataset.clone(),
            parts: vec![part(key)],
        };
        client
            .dataset_stage(&token, &req)
            .await
            .map_err(|e| anyhow::anyhow!("dataset-stage {dataset}: {e}"))?;
        staged.push(dataset.clone());
    }
    let mut published = Vec::new();
    if inputs["publish"].as_bool().unwrap_or(true) {
        for dataset in outputs.iter().filter(|o| !stage.contains(o)) {
            let batch_id = uuid::Uuid::new_v4();
            let key = upload(&client, &token, &format!("buffers/{batch_id}.jsonl"), &body).await?;
            let p = part(key);
            let req = wire::BufferPublishRequest {
                batch_id,
                dataset: dataset.clone(),
                object_key: p.key,
                rows,
                sha256: p.sha256,
            };
            client
                .buffer_publish(&token, &req)
                .await
                .map_err(|e| anyhow::anyhow!("buffer-publish {dataset}: {e}"))?;
            published.push(batch_id);
        }
    }
    println!(
        "{}",
        serde_json::json!({"task": key, "attempt": attempt, "staged": staged, "published": published})
    );
    Ok(())
}

/// Uploads `body` at `name` under the attempt's prefix through a presigned
/// URL; the absolute key.
async fn upload(client: &Client, token: &str, name: &str, body: &str) -> Result<String> {
    let req = wire::ObjectsRequest {
        method: wire::ObjectMethod::Put,
        keys: vec![name.to_owned()],
    };
    let urls = client
        .objects(token, &req)
        .await
        .map_err(|e| anyhow::anyhow!("objects: {e}"))?;
    let url = urls
        .urls
        .into_iter()
        .next()
        .context("objects answered no URL")?;
    client
        .put_url(&url.url, body.as_bytes().to_vec())
        .await
        .map_err(|e| anyhow::anyhow!("upload of {name}: {e}"))?;
    Ok(url.key)
}

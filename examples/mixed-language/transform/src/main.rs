//! Transform (Rust): reads the current version of `readings` through the
//! query service and stages per-sensor statistics as a new version of
//! `sensor_stats`, committed when this task succeeds.

use std::collections::BTreeMap;

use dispatcher_task::{run, Task, UdfError};
use serde_json::{json, Value};

#[derive(Default)]
struct Stats {
    n: i64,
    sum: f64,
    min: f64,
    max: f64,
}

async fn handler(_inputs: Value, task: Task) -> Result<Value, UdfError> {
    let answer = task
        .query(
            "readings",
            json!({"select": ["sensor", "value"], "limit": 10000,
                   "order_by": [{"column": "sensor"}, {"column": "seq"}]}),
        )
        .await?;
    if answer["truncated"].as_bool().unwrap_or(false) {
        return Err(UdfError::new(
            "TooManyRows",
            "readings holds more than 10,000 rows",
        ));
    }
    let mut by_sensor: BTreeMap<String, Stats> = BTreeMap::new();
    for row in answer["rows"].as_array().into_iter().flatten() {
        let (Some(sensor), Some(value)) = (row[0].as_str(), row[1].as_f64()) else {
            return Err(UdfError::new("BadRow", format!("unexpected row {row}")));
        };
        let s = by_sensor.entry(sensor.to_owned()).or_default();
        if s.n == 0 {
            (s.min, s.max) = (value, value);
        }
        s.n += 1;
        s.sum += value;
        s.min = s.min.min(value);
        s.max = s.max.max(value);
    }
    let rows: Vec<Value> = by_sensor
        .iter()
        .map(|(sensor, s)| {
            json!({"sensor": sensor, "readings": s.n, "mean": s.sum / s.n as f64,
                   "min": s.min, "max": s.max})
        })
        .collect();
    task.stage("sensor_stats", &rows, 0).await?;
    task.emit(
        "log",
        json!({"msg": format!("{} sensors from version {}", rows.len(), answer["version"])}),
    )
    .await?;
    Ok(json!({"sensors": rows.len(), "readings_version": answer["version"]}))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), dispatcher_task::lambda_runtime::Error> {
    run(handler).await
}

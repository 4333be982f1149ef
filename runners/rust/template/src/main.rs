//! A Rust UDF: `handler(inputs, task)` returns the task's output.
//! Build it (`cargo build --release -p udf-template`), copy
//! `target/release/bootstrap` into a directory with a `bundle.json` of
//! `{"runtime": "rust", "handler": "bootstrap"}`, and push that directory
//! with `dispatcher bundle push`.

use dispatcher_task::{run, Task, UdfError};
use serde_json::{json, Value};

async fn handler(inputs: Value, task: Task) -> Result<Value, UdfError> {
    task.emit(
        "log",
        json!({"msg": format!("{} attempt {}", task.key, task.attempt)}),
    )
    .await?;
    Ok(json!({"echo": inputs}))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), dispatcher_task::lambda_runtime::Error> {
    run(handler).await
}

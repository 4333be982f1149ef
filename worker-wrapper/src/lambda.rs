//! Bundle tasks run as Lambda functions (ADR 0026): the worker claims the
//! lease as for any task, then invokes the function of the task's org and
//! bundle synchronously (`RequestResponse`) with the event of
//! [`crate::runners::envelope`] — the attempt's capability token and the
//! task, never a worker or platform credential — and heartbeats while the
//! call is open. The function runs the same runner (`runners/`) as a
//! Lambda runtime; what it answers becomes the completion as a local
//! runner's answer would.

use std::time::Duration;

use aws_sdk_lambda::error::ProvideErrorMetadata as _;
use aws_sdk_lambda::primitives::Blob;
use aws_sdk_lambda::types::{InvocationType, LogType};
use base64::Engine as _;
use dispatcher_wire as wire;
use serde_json::Value;

use crate::capture::Shared;
use crate::runners::Invoked;
use crate::runtime_api::Answer;

/// Lambda's limit on a synchronous invocation's request body (6 MB).
pub const MAX_REQUEST_BYTES: usize = 6 * 1024 * 1024;

/// The longest a function may run (15 minutes): no call waits longer.
const MAX_FUNCTION_SECONDS: u64 = 900;

/// How invoking ended, beyond a runner's answers.
pub enum Outcome {
    Invoked(Invoked),
    /// Lambda refused for lack of concurrency (429): the task goes back,
    /// its attempt given back, and is claimed again later.
    Throttled(String),
    /// The event is over Lambda's request limit: retrying cannot help.
    TooLargeEvent(usize),
}

/// Init error types a runtime reports (`/runtime/init/error`): the bundle
/// cannot start, so the attempt fails without a retry, as locally.
const INIT_ERRORS: &[&str] = &[
    "Runtime.ImportModuleError",
    "Runtime.HandlerNotFound",
    "Runtime.UserCodeSyntaxError",
    "Runtime.MalformedHandlerName",
    "Runtime.InvalidEntrypoint",
    "Runtime.InitError",
];

pub struct Lambda {
    client: aws_sdk_lambda::Client,
    template: String,
    runtimes: Vec<wire::Runtime>,
}

impl Lambda {
    /// `template` names the function of a task: `{org}` (the org id, 32
    /// hex digits), `{bundle}` (12 hex digits of the bundle's digest) and
    /// `{runtime}` are replaced. `runtimes` are the runtimes run this way.
    pub async fn new(
        template: &str,
        runtimes: Vec<wire::Runtime>,
        region: &str,
        endpoint_url: Option<&str>,
    ) -> anyhow::Result<Lambda> {
        if !template.contains("{bundle}") || !template.contains("{org}") {
            anyhow::bail!(
                "--lambda-function {template:?}: the name must hold {{org}} and {{bundle}}: a \
                 function serves one org's one bundle (warm environments are never shared)"
            );
        }
        let shared = dispatcher::aws::sdk_config(region, endpoint_url, None).await;
        // No SDK retry of an Invoke that may have run (the fence stops a
        // second completion, not a UDF's side effects), and no read
        // timeout below the longest a function may run.
        let conf = aws_sdk_lambda::config::Builder::from(&shared)
            .retry_config(aws_sdk_lambda::config::retry::RetryConfig::disabled())
            .timeout_config(
                aws_sdk_lambda::config::timeout::TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(10))
                    .read_timeout(Duration::from_secs(MAX_FUNCTION_SECONDS + 60))
                    .build(),
            )
            .build();
        Ok(Lambda {
            client: aws_sdk_lambda::Client::from_conf(conf),
            template: template.to_owned(),
            runtimes,
        })
    }

    /// Whether tasks of `runtime` run as Lambda functions here.
    pub fn runs(&self, runtime: wire::Runtime) -> bool {
        self.runtimes.contains(&runtime)
    }

    /// The function a task runs on.
    pub fn function_name(&self, claim: &wire::ClaimResponse) -> String {
        function_name(&self.template, claim)
    }

    /// Invokes the task's function with `event` and waits for its answer,
    /// at most `seconds` (the task's timeout); what the function printed
    /// (the last 4 KB Lambda returns) goes to `log`.
    pub async fn invoke(
        &self,
        claim: &wire::ClaimResponse,
        event: Vec<u8>,
        seconds: u64,
        log: &Shared,
    ) -> Outcome {
        if event.len() > MAX_REQUEST_BYTES {
            return Outcome::TooLargeEvent(event.len());
        }
        let name = self.function_name(claim);
        let call = self
            .client
            .invoke()
            .function_name(&name)
            .invocation_type(InvocationType::RequestResponse)
            .log_type(LogType::Tail)
            .payload(Blob::new(event))
            .send();
        let out = match tokio::time::timeout(Duration::from_secs(seconds), call).await {
            // The function may still run; its calls are fenced once this
            // attempt completes.
            Err(_) => return Outcome::Invoked(Invoked::TimedOut { seconds }),
            Ok(Err(e)) => return refused(&name, &e),
            Ok(Ok(out)) => out,
        };
        if let Some(tail) = out.log_result() {
            if let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(tail) {
                log.lock().unwrap_or_else(|p| p.into_inner()).push(&bytes);
            }
        }
        let body = out
            .payload()
            .map(|b| b.as_ref().to_vec())
            .unwrap_or_default();
        if out.function_error().is_none() {
            return Outcome::Invoked(Invoked::Answered(Answer::Response(body)));
        }
        let err: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let error_type = err["errorType"]
            .as_str()
            .unwrap_or("Runtime.Unknown")
            .to_owned();
        let message = err["errorMessage"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
        Outcome::Invoked(if error_type == "Function.ResponseSizeTooLarge" {
            Invoked::Answered(Answer::TooLarge)
        } else if INIT_ERRORS.contains(&error_type.as_str()) {
            Invoked::InitFailed {
                error_type,
                message,
            }
        } else {
            // A handler's error, a timeout (`Sandbox.Timedout`) or a crash
            // (`Runtime.ExitError`): retryable, as locally.
            Invoked::Answered(Answer::Error {
                error_type,
                message,
                body: err,
            })
        })
    }
}

fn function_name(template: &str, claim: &wire::ClaimResponse) -> String {
    let digest = claim
        .task
        .bundle
        .strip_prefix("sha256:")
        .unwrap_or(&claim.task.bundle);
    template
        .replace("{org}", &claim.org_id.simple().to_string())
        .replace("{bundle}", digest.get(..12).unwrap_or(digest))
        .replace("{runtime}", claim.task.runtime.as_str())
}

/// An Invoke that Lambda answered with an error of its own (the function
/// did not run, or its result is unknown).
fn refused<E, R>(name: &str, e: &aws_sdk_lambda::error::SdkError<E, R>) -> Outcome
where
    E: aws_sdk_lambda::error::ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    let code = e.code().unwrap_or("");
    let message = e.message().unwrap_or("");
    match code {
        "TooManyRequestsException" => {
            Outcome::Throttled(format!("Lambda throttled {name}: {message}"))
        }
        "RequestTooLargeException" => Outcome::TooLargeEvent(MAX_REQUEST_BYTES + 1),
        "ResourceNotFoundException" => Outcome::Invoked(Invoked::Unavailable(format!(
            "no Lambda function {name} (deploy the bundle as its org's function): {message}"
        ))),
        _ => Outcome::Invoked(Invoked::Unavailable(format!(
            "invoking {name}: {}",
            dispatcher::aws::sdk_error_line("lambda", e)
        ))),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_function_is_named_by_its_org_and_bundle() {
        let claim: dispatcher_wire::ClaimResponse = serde_json::from_value(serde_json::json!({
            "task_id": uuid::Uuid::nil(), "job_id": uuid::Uuid::nil(), "attempt": 1,
            "org_id": "0b5c3a8e-1111-4222-8333-444455556666",
            "lease_expires_at": "2026-01-01T00:00:00Z", "heartbeat_interval_seconds": 1,
            "capability_token": "t", "token_expires_at": "2026-01-01T00:00:00Z",
            "object_prefix": "p/",
            "task": {"key": "k", "runtime": "python", "bundle": "sha256:0123456789abcdef", "inputs": {}, "outputs": []}
        }))
        .expect("a claim");
        assert_eq!(
            super::function_name("udf-{org}-{bundle}-{runtime}", &claim),
            "udf-0b5c3a8e111142228333444455556666-0123456789ab-python"
        );
    }
}

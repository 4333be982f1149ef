//! Attempt logs (issue 25): what an attempt printed, as its worker
//! captured it, stored in the object store under the attempt with secrets
//! redacted, and served to the org's users.
//!
//! * **Where:** `orgs/{org}/logs/jobs/{job}/tasks/{task}/attempts/{n}.log`,
//!   outside every attempt's writable prefix (a task can neither overwrite
//!   nor read another log through presigned URLs), and outside what object
//!   retention judges; the pruner deletes a log with its job.
//! * **Bounded:** at most `max_log_bytes` of text per upload (`413`
//!   past it); the worker keeps the head and the tail of a longer output
//!   and marks the cut, and says how many bytes it dropped.
//! * **Secrets:** [`redact`] replaces capability tokens and other JWTs,
//!   presigned URL signatures and credentials, AWS access keys and the
//!   values of secret-named fields before anything is stored. The worker
//!   wrapper also removes the exact tokens it handed the task.

use std::sync::LazyLock;

use dispatcher_wire as wire;
use regex_lite::Regex;
use uuid::Uuid;

use super::{fence, Ctx};
use crate::error::StoreError;
use crate::objects::ObjectStore;
use crate::store::{Store, StoredLog};
use crate::tokens::TaskClaims;

/// What replaces a secret.
pub const REDACTED: &str = "[REDACTED]";

/// Where attempt `attempt`'s log is stored.
pub fn log_key(org: Uuid, job: Uuid, task: Uuid, attempt: u32) -> String {
    format!("orgs/{org}/logs/jobs/{job}/tasks/{task}/attempts/{attempt}.log")
}

/// Secrets whose whole match goes.
static WHOLE: LazyLock<Vec<Regex>> = LazyLock::new(|| {
    [
        // JWTs: capability tokens, user tokens, worker credentials.
        r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*",
        // AWS access key ids (long-lived and STS).
        r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b",
    ]
    .iter()
    .map(|p| Regex::new(p).expect("a valid pattern"))
    .collect()
});

/// Secrets after a name: the name stays, the value goes.
static VALUES: LazyLock<Vec<Regex>> = LazyLock::new(|| {
    [
        // Presigned URLs: S3's query authentication and the local store's.
        r"(?i)(X-Amz-(?:Signature|Credential|Security-Token)=)[^&\s'\x22]+",
        r"([?&]sig=)[^&\s'\x22]+",
        // `Authorization: Bearer …`, `Basic …`.
        r"(?i)(\b(?:bearer|basic)\s+)[A-Za-z0-9._~+/=-]{8,}",
        // `secret_access_key=…`, `"SessionToken": "…"`, `password: …`.
        r#"(?i)((?:secret[_-]?access[_-]?key|session[_-]?token|secret|password|passwd|api[_-]?key|access[_-]?token|client[_-]?secret|private[_-]?key)["']?\s*[:=]\s*["']?)[^\s"',;}&]+"#,
    ]
    .iter()
    .map(|p| Regex::new(p).expect("a valid pattern"))
    .collect()
});

/// `text` with every secret [`REDACTED`], and how many were.
pub fn redact(text: &str) -> (String, u64) {
    let mut out = text.to_owned();
    let mut count = 0u64;
    for re in WHOLE.iter() {
        let n = re.find_iter(&out).count() as u64;
        if n > 0 {
            count += n;
            out = re.replace_all(&out, REDACTED).into_owned();
        }
    }
    for re in VALUES.iter() {
        let n = re
            .captures_iter(&out)
            .filter(|c| !c[0].ends_with(REDACTED))
            .count() as u64;
        if n > 0 {
            count += n;
            out = re
                .replace_all(&out, |c: &regex_lite::Captures<'_>| {
                    if c[0].ends_with(REDACTED) {
                        c[0].to_owned()
                    } else {
                        format!("{}{REDACTED}", &c[1])
                    }
                })
                .into_owned();
        }
    }
    (out, count)
}

/// Stores the fenced attempt's log (replacing an earlier one): bounded,
/// redacted, then recorded on the attempt. A stale attempt's log is refused
/// like any of its calls, and nothing is written.
pub async fn store(
    ctx: Ctx<'_>,
    claims: &TaskClaims,
    req: &wire::TaskLogRequest,
) -> Result<wire::TaskLogResponse, StoreError> {
    let max = ctx.settings.max_log_bytes;
    if req.log.len() > max {
        return Err(StoreError::Limit(format!(
            "the log is {} bytes; an attempt's log holds at most {max} (keep its head and tail \
             and say how many bytes were dropped)",
            req.log.len()
        )));
    }
    ctx.store.check_fence(fence(claims)).await?;
    let (text, redactions) = redact(&req.log.replace('\0', "\u{FFFD}"));
    let key = log_key(claims.org, claims.job, claims.sub, claims.att);
    let bytes = text.len() as u64;
    ctx.objects
        .put(&key, text.into_bytes())
        .await
        .map_err(|e| unavailable("storing", e))?;
    let stored = StoredLog {
        key,
        bytes,
        dropped_bytes: req.dropped_bytes,
    };
    ctx.store.record_log(fence(claims), &stored).await?;
    if redactions > 0 {
        tracing::info!(task_id = %claims.sub, attempt = claims.att, redactions, "secrets redacted from a task's log");
    }
    Ok(wire::TaskLogResponse {
        bytes,
        dropped_bytes: req.dropped_bytes,
        redactions,
    })
}

/// The object store failed: logged here, and the caller may try again.
fn unavailable(doing: &str, e: crate::objects::ObjectError) -> StoreError {
    tracing::warn!(error = %e, "{doing} a task's log failed");
    StoreError::Retry(format!(
        "the object store failed {doing} the log; try again"
    ))
}

/// Attempt `attempt`'s log of the org's task `key`.
pub async fn read(
    store: &Store,
    objects: &dyn ObjectStore,
    org: Uuid,
    job: Uuid,
    key: &str,
    attempt: u32,
) -> Result<wire::AttemptLog, StoreError> {
    let stored = store.attempt_log(org, job, key, attempt).await?;
    let body = objects.get(&stored.key).await.map_err(|e| match e {
        crate::objects::ObjectError::NotFound(_) => StoreError::NotFound(format!(
            "the log of attempt {attempt} of task {key:?} is gone from the object store"
        )),
        e => unavailable("reading", e),
    })?;
    Ok(wire::AttemptLog {
        task_key: key.to_owned(),
        attempt,
        bytes: stored.bytes,
        dropped_bytes: stored.dropped_bytes,
        log: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// Deletes up to `limit` queued objects (logs of pruned jobs); how many.
/// An object already gone counts as deleted.
pub async fn delete_queued(
    store: &Store,
    objects: &dyn ObjectStore,
    limit: u32,
) -> Result<usize, StoreError> {
    let keys = store.object_deletions(limit).await?;
    let mut done = Vec::with_capacity(keys.len());
    for key in keys {
        match objects.delete(&key).await {
            Ok(()) | Err(crate::objects::ObjectError::NotFound(_)) => done.push(key),
            Err(e) => {
                tracing::warn!(key, error = %e, "deleting a pruned job's log failed; trying again later");
            }
        }
    }
    store.forget_object_deletions(&done).await?;
    Ok(done.len())
}

#[cfg(test)]
mod tests {
    use super::{redact, REDACTED};

    #[test]
    fn redaction_removes_tokens_signatures_keys_and_named_secrets() {
        let jwt = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ0YXNrIn0.c2lnbmF0dXJlX2J5dGVz";
        let text = format!(
            "token {jwt}\n\
             GET https://b.s3.amazonaws.com/k?X-Amz-Credential=ASIAQWERTYUIOPASDFGH%2F2026&X-Amz-Signature=abc123def&x=1\n\
             local http://127.0.0.1:8080/objects/k?method=PUT&expires=1&sig=deadbeef\n\
             {{\"AccessKeyId\": \"AKIAIOSFODNN7EXAMPLE\", \"SecretAccessKey\": \"wJalrXUtnFEMI/K7MDENG\", \"SessionToken\": \"FwoGZXIvYXdzEJr\"}}\n\
             AWS_SECRET_ACCESS_KEY=abcd1234 password: hunter2\n\
             Authorization: Bearer opaque-token-value-123\n\
             an ordinary line with secrets mentioned, and key=value\n"
        );
        let (out, n) = redact(&text);
        for secret in [
            jwt,
            "abc123def",
            "ASIAQWERTYUIOPASDFGH",
            "deadbeef",
            "AKIAIOSFODNN7EXAMPLE",
            "wJalrXUtnFEMI",
            "FwoGZXIvYXdzEJr",
            "abcd1234",
            "hunter2",
            "opaque-token-value-123",
        ] {
            assert!(!out.contains(secret), "{secret} left in:\n{out}");
        }
        assert!(out.contains(REDACTED));
        assert!(out.contains("an ordinary line with secrets mentioned, and key=value"));
        assert!(out.contains("X-Amz-Signature=[REDACTED]&x=1"), "{out}");
        assert!(n >= 10, "{n} redactions:\n{out}");
        // Nothing to redact: the text is kept as it is.
        assert_eq!(redact("hello\nworld"), ("hello\nworld".to_owned(), 0));
    }
}

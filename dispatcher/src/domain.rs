//! Validation at the edge: wire requests become domain values here, or an
//! [`Invalid`] error that names the offending field. Nothing past this module
//! sees unvalidated input.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use dispatcher_wire as wire;
use serde_json::Value;
use uuid::Uuid;

use crate::settings::Settings;

/// A request field that failed validation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct Invalid {
    pub field: String,
    pub message: String,
}

impl Invalid {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Invalid {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Roles of org members, weakest last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Viewer,
    Member,
    Admin,
    Owner,
}

impl Role {
    pub fn parse(s: &str) -> Option<Role> {
        Some(match s {
            "owner" => Role::Owner,
            "admin" => Role::Admin,
            "member" => Role::Member,
            "viewer" => Role::Viewer,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Owner => "owner",
            Role::Admin => "admin",
            Role::Member => "member",
            Role::Viewer => "viewer",
        }
    }

    /// Whether the role may submit and cancel jobs.
    pub fn can_write_jobs(self) -> bool {
        self >= Role::Member
    }
}

fn check_name(
    field: &str,
    value: &str,
    max: usize,
    allowed: impl Fn(char) -> bool,
) -> Result<(), Invalid> {
    if value.is_empty() {
        return Err(Invalid::new(field, "must not be empty"));
    }
    if value.len() > max {
        return Err(Invalid::new(field, format!("must be at most {max} bytes")));
    }
    if let Some(c) = value.chars().find(|c| !allowed(*c)) {
        return Err(Invalid::new(
            field,
            format!("character {c:?} is not allowed"),
        ));
    }
    Ok(())
}

/// A worker id: printable, short.
pub fn worker_id(value: &str) -> Result<String, Invalid> {
    check_name("worker_id", value, 128, |c| {
        c.is_ascii_alphanumeric() || "-_.:@/".contains(c)
    })?;
    Ok(value.to_owned())
}

/// Dataset names: lower-case identifiers (they become table names).
pub fn dataset_name(field: &str, value: &str) -> Result<String, Invalid> {
    check_name(field, value, 63, |c| {
        c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'
    })?;
    if !value.starts_with(|c: char| c.is_ascii_lowercase()) {
        return Err(Invalid::new(field, "must start with a lower-case letter"));
    }
    Ok(value.to_owned())
}

fn task_key(field: &str, value: &str) -> Result<(), Invalid> {
    check_name(field, value, 128, |c| {
        c.is_ascii_alphanumeric() || "-_.".contains(c)
    })
}

/// Postgres cannot store the NUL character (`\u0000`) in `jsonb` or
/// `text`: a value holding one is refused here, naming where, instead of
/// failing in the database.
pub fn storable_json(field: &str, value: &Value) -> Result<(), Invalid> {
    fn walk(v: &Value, path: &mut String) -> Option<String> {
        match v {
            Value::String(s) if s.contains('\0') => Some(path.clone()),
            Value::Array(items) => items.iter().enumerate().find_map(|(i, item)| {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                let found = walk(item, path);
                path.truncate(len);
                found
            }),
            Value::Object(map) => map.iter().find_map(|(k, item)| {
                if k.contains('\0') {
                    return Some(path.clone());
                }
                let len = path.len();
                path.push('.');
                path.push_str(k);
                let found = walk(item, path);
                path.truncate(len);
                found
            }),
            _ => None,
        }
    }
    match walk(value, &mut field.to_owned()) {
        Some(at) => Err(Invalid::new(
            at,
            "must not contain the NUL character (\\u0000)",
        )),
        None => Ok(()),
    }
}

fn storable_text(field: &str, value: &str) -> Result<(), Invalid> {
    if value.contains('\0') {
        return Err(Invalid::new(
            field,
            "must not contain the NUL character (\\u0000)",
        ));
    }
    Ok(())
}

// ------------------------------------------------------------------ jobs ---

/// A job that passed validation: unique keys, known dependencies, no cycle.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub name: String,
    /// In submission order.
    pub tasks: Vec<NewTask>,
    /// Past this long after submission the job is cancelled.
    pub deadline: Option<std::time::Duration>,
    /// The W3C `traceparent` its attempts continue (ADR 0023).
    pub traceparent: Option<String>,
}

#[derive(Debug, Clone)]
pub struct NewTask {
    pub id: Uuid,
    pub key: String,
    pub runtime: wire::Runtime,
    pub bundle: String,
    pub inputs: Value,
    pub outputs: Vec<String>,
    pub reads: Vec<String>,
    pub max_attempts: u32,
    /// As submitted; the store fills in the bundle's or the default.
    pub timeout_seconds: Option<u32>,
    /// Indexes into `NewJob::tasks`.
    pub depends_on: Vec<usize>,
}

pub fn new_job(req: wire::SubmitJobRequest, settings: &Settings) -> Result<NewJob, Invalid> {
    let name = req.name.trim().to_owned();
    if name.is_empty() || name.len() > 200 {
        return Err(Invalid::new("name", "must be 1 to 200 bytes"));
    }
    if req.tasks.is_empty() {
        return Err(Invalid::new("tasks", "a job needs at least one task"));
    }
    if req.tasks.len() > settings.max_tasks_per_job {
        return Err(Invalid::new(
            "tasks",
            format!(
                "a job may have at most {} tasks",
                settings.max_tasks_per_job
            ),
        ));
    }

    let mut index: HashMap<&str, usize> = HashMap::with_capacity(req.tasks.len());
    for (i, t) in req.tasks.iter().enumerate() {
        task_key(&format!("tasks[{i}].key"), &t.key)?;
        if let Some(first) = index.insert(t.key.as_str(), i) {
            return Err(Invalid::new(
                format!("tasks[{i}].key"),
                format!("duplicate key {:?} (first used by tasks[{first}])", t.key),
            ));
        }
    }

    let mut tasks = Vec::with_capacity(req.tasks.len());
    for (i, t) in req.tasks.iter().enumerate() {
        if t.bundle.is_empty() || t.bundle.len() > 4096 {
            return Err(Invalid::new(
                format!("tasks[{i}].bundle"),
                "must be 1 to 4096 bytes",
            ));
        }
        let inputs = t
            .inputs
            .clone()
            .unwrap_or_else(|| Value::Object(Default::default()));
        if !inputs.is_object() {
            return Err(Invalid::new(
                format!("tasks[{i}].inputs"),
                "must be a JSON object",
            ));
        }
        storable_json(&format!("tasks[{i}].inputs"), &inputs)?;
        storable_text(&format!("tasks[{i}].bundle"), &t.bundle)?;
        if t.runtime != wire::Runtime::Exec
            && !crate::bundles::is_digest(&t.bundle)
            && crate::bundles::check_tag(&t.bundle).is_err()
        {
            return Err(Invalid::new(
                format!("tasks[{i}].bundle"),
                "a node, python or rust task names a bundle by digest (sha256:…) or tag",
            ));
        }
        if let Some(secs) = t.timeout_seconds {
            let max = settings.task_timeout_max.as_secs();
            if secs == 0 || u64::from(secs) > max {
                return Err(Invalid::new(
                    format!("tasks[{i}].timeout_seconds"),
                    format!("must be 1 to {max}"),
                ));
            }
        }
        let max_attempts = t.max_attempts.unwrap_or(settings.default_max_attempts);
        if max_attempts == 0 || max_attempts > settings.max_attempts_limit {
            return Err(Invalid::new(
                format!("tasks[{i}].max_attempts"),
                format!("must be 1 to {}", settings.max_attempts_limit),
            ));
        }
        let mut outputs = Vec::with_capacity(t.outputs.len());
        for (j, o) in t.outputs.iter().enumerate() {
            outputs.push(dataset_name(&format!("tasks[{i}].outputs[{j}]"), o)?);
        }
        let mut reads = Vec::with_capacity(t.reads.len());
        for (j, r) in t.reads.iter().enumerate() {
            reads.push(dataset_name(&format!("tasks[{i}].reads[{j}]"), r)?);
        }
        if t.depends_on.len() > settings.max_deps_per_task {
            return Err(Invalid::new(
                format!("tasks[{i}].depends_on"),
                format!(
                    "a task may depend on at most {} tasks",
                    settings.max_deps_per_task
                ),
            ));
        }
        // Linear in the number of edges: a set per task, not a scan.
        let mut depends_on = Vec::with_capacity(t.depends_on.len());
        let mut seen = std::collections::HashSet::with_capacity(t.depends_on.len());
        for (j, dep) in t.depends_on.iter().enumerate() {
            let field = format!("tasks[{i}].depends_on[{j}]");
            let Some(&d) = index.get(dep.as_str()) else {
                return Err(Invalid::new(field, format!("unknown task key {dep:?}")));
            };
            if !seen.insert(d) {
                return Err(Invalid::new(field, format!("{dep:?} is listed twice")));
            }
            depends_on.push(d);
        }
        tasks.push(NewTask {
            id: Uuid::now_v7(),
            key: t.key.clone(),
            runtime: t.runtime,
            bundle: t.bundle.clone(),
            inputs,
            outputs,
            reads,
            max_attempts,
            timeout_seconds: t.timeout_seconds,
            depends_on,
        });
    }

    if let Some(cycle) = find_cycle(&tasks) {
        let path: Vec<&str> = cycle.iter().map(|&i| tasks[i].key.as_str()).collect();
        return Err(Invalid::new(
            "tasks",
            format!("dependency cycle: {}", path.join(" -> ")),
        ));
    }
    let deadline = match req.deadline_seconds {
        None => None,
        Some(secs) => {
            let max = settings.job_deadline_max.as_secs();
            if secs == 0 || u64::from(secs) > max {
                return Err(Invalid::new(
                    "deadline_seconds",
                    format!("must be 1 to {max}"),
                ));
            }
            Some(std::time::Duration::from_secs(u64::from(secs)))
        }
    };
    Ok(NewJob {
        name,
        tasks,
        deadline,
        traceparent: None,
    })
}

/// A cycle in the dependency graph, as a path that starts and ends at the
/// same task, or `None`. Iterative depth-first search (no recursion limit).
fn find_cycle(tasks: &[NewTask]) -> Option<Vec<usize>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        OnStack,
        Done,
    }
    let mut mark = vec![Mark::New; tasks.len()];
    for root in 0..tasks.len() {
        if mark[root] != Mark::New {
            continue;
        }
        // (node, next dependency index to visit)
        let mut stack: Vec<(usize, usize)> = vec![(root, 0)];
        mark[root] = Mark::OnStack;
        while let Some(&mut (node, ref mut next)) = stack.last_mut() {
            if let Some(&dep) = tasks[node].depends_on.get(*next) {
                *next += 1;
                match mark[dep] {
                    Mark::New => {
                        mark[dep] = Mark::OnStack;
                        stack.push((dep, 0));
                    }
                    Mark::OnStack => {
                        let start = stack.iter().position(|&(n, _)| n == dep).unwrap_or(0);
                        let mut path: Vec<usize> = stack[start..].iter().map(|&(n, _)| n).collect();
                        path.push(dep);
                        // Dependencies point backwards in time; show the
                        // cycle in execution order.
                        path.reverse();
                        return Some(path);
                    }
                    Mark::Done => {}
                }
            } else {
                mark[node] = Mark::Done;
                stack.pop();
            }
        }
    }
    None
}

// ------------------------------------------------------------- datasets ---

/// Largest number of columns of a dataset.
pub const MAX_COLUMNS: usize = 256;

/// A dataset that passed validation.
#[derive(Debug, Clone)]
pub struct NewDataset {
    pub name: String,
    pub mode: wire::DatasetMode,
    pub columns: Vec<wire::Column>,
}

pub fn new_dataset(req: wire::CreateDatasetRequest) -> Result<NewDataset, Invalid> {
    let name = dataset_name("name", &req.name)?;
    if req.columns.is_empty() || req.columns.len() > MAX_COLUMNS {
        return Err(Invalid::new(
            "columns",
            format!("a dataset has 1 to {MAX_COLUMNS} columns"),
        ));
    }
    let mut seen = std::collections::HashSet::with_capacity(req.columns.len());
    for (i, c) in req.columns.iter().enumerate() {
        dataset_name(&format!("columns[{i}].name"), &c.name)?;
        if !seen.insert(c.name.as_str()) {
            return Err(Invalid::new(
                format!("columns[{i}].name"),
                format!("{:?} is used twice", c.name),
            ));
        }
    }
    Ok(NewDataset {
        name,
        mode: req.mode,
        columns: req.columns,
    })
}

// --------------------------------------------------------- worker calls ---

#[derive(Debug, Clone)]
pub struct NewEvent {
    pub seq: i64,
    pub kind: String,
    pub payload: Value,
}

pub fn events(req: wire::EventsRequest, settings: &Settings) -> Result<Vec<NewEvent>, Invalid> {
    if req.events.is_empty() {
        return Err(Invalid::new("events", "must hold at least one event"));
    }
    if req.events.len() > settings.max_events_per_call {
        return Err(Invalid::new(
            "events",
            format!("at most {} events per call", settings.max_events_per_call),
        ));
    }
    let mut seen = std::collections::HashSet::with_capacity(req.events.len());
    req.events
        .into_iter()
        .enumerate()
        .map(|(i, e)| {
            let seq = i64::try_from(e.seq)
                .map_err(|_| Invalid::new(format!("events[{i}].seq"), "is too large"))?;
            if !seen.insert(seq) {
                return Err(Invalid::new(
                    format!("events[{i}].seq"),
                    format!("seq {seq} appears twice in this call"),
                ));
            }
            check_name(&format!("events[{i}].kind"), &e.kind, 64, |c| {
                c.is_ascii_alphanumeric() || "-_.".contains(c)
            })?;
            storable_json(&format!("events[{i}].payload"), &e.payload)?;
            Ok(NewEvent {
                seq,
                kind: e.kind,
                payload: e.payload,
            })
        })
        .collect()
}

#[derive(Debug, Clone, PartialEq)]
pub struct NewBufferBatch {
    pub batch_id: Uuid,
    pub dataset: String,
    pub object_key: String,
    pub rows: i64,
    pub sha256: String,
}

/// Object keys are relative paths of non-empty segments, without `.` or
/// `..`, so that no key can escape a prefix (or, on disk, the root
/// directory). The rule every object store applies (`objects::check_key`).
pub fn object_key_rule(key: &str) -> Result<(), &'static str> {
    if key.is_empty() || key.len() > 1024 {
        return Err("must be 1 to 1024 bytes");
    }
    if key.starts_with('/') || key.contains('\\') || key.chars().any(char::is_control) {
        return Err("must be relative, without backslashes or control characters");
    }
    if key
        .split('/')
        .any(|s| s.is_empty() || s == "." || s == "..")
    {
        return Err("must not have empty, `.` or `..` segments");
    }
    Ok(())
}

pub fn buffer_batch(req: wire::BufferPublishRequest) -> Result<NewBufferBatch, Invalid> {
    let dataset = dataset_name("dataset", &req.dataset)?;
    object_key_rule(&req.object_key).map_err(|why| Invalid::new("object_key", why))?;
    let rows = i64::try_from(req.rows).map_err(|_| Invalid::new("rows", "is too large"))?;
    if req.sha256.len() != 64 || !req.sha256.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(Invalid::new("sha256", "must be 64 hexadecimal characters"));
    }
    Ok(NewBufferBatch {
        batch_id: req.batch_id,
        dataset,
        object_key: req.object_key,
        rows,
        sha256: req.sha256.to_ascii_lowercase(),
    })
}

/// A completion, normalised so that a replay can be compared with the
/// original by value.
#[derive(Debug, Clone, PartialEq)]
pub enum Completion {
    Succeeded {
        output: Value,
    },
    Failed {
        message: String,
        retryable: bool,
    },
    /// The worker stopped the task after a cancel request.
    Cancelled,
}

impl Completion {
    /// The canonical JSON stored with the attempt and compared on replay.
    pub fn to_json(&self) -> Value {
        match self {
            Completion::Succeeded { output } => {
                serde_json::json!({"outcome": "succeeded", "output": output})
            }
            Completion::Failed { message, retryable } => serde_json::json!({
                "outcome": "failed",
                "error": {"message": message, "retryable": retryable}
            }),
            Completion::Cancelled => serde_json::json!({"outcome": "cancelled"}),
        }
    }
}

pub fn completion(req: wire::CompleteRequest) -> Result<Completion, Invalid> {
    match req.outcome {
        wire::Outcome::Succeeded => {
            if req.error.is_some() {
                return Err(Invalid::new(
                    "error",
                    "not allowed when outcome is \"succeeded\"",
                ));
            }
            let output = req.output.unwrap_or(Value::Null);
            storable_json("output", &output)?;
            Ok(Completion::Succeeded { output })
        }
        wire::Outcome::Failed => {
            if req.output.is_some() {
                return Err(Invalid::new(
                    "output",
                    "not allowed when outcome is \"failed\"",
                ));
            }
            let err = req
                .error
                .ok_or_else(|| Invalid::new("error", "required when outcome is \"failed\""))?;
            if err.message.len() > 64 * 1024 {
                return Err(Invalid::new("error.message", "must be at most 65536 bytes"));
            }
            storable_text("error.message", &err.message)?;
            Ok(Completion::Failed {
                message: err.message,
                retryable: err.retryable,
            })
        }
        wire::Outcome::Cancelled => {
            if req.output.is_some() || req.error.is_some() {
                return Err(Invalid::new(
                    if req.output.is_some() {
                        "output"
                    } else {
                        "error"
                    },
                    "not allowed when outcome is \"cancelled\"",
                ));
            }
            Ok(Completion::Cancelled)
        }
    }
}

/// The filters of a job listing, checked.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobFilter {
    /// Jobs in one of these states; empty: any.
    pub states: Vec<wire::JobState>,
    /// A `LIKE` pattern: the prefix with `%`, `_` and `\\` escaped, then `%`.
    pub name_like: Option<String>,
    pub created_after: Option<DateTime<Utc>>,
    pub created_before: Option<DateTime<Utc>>,
    pub finished_after: Option<DateTime<Utc>>,
    pub finished_before: Option<DateTime<Utc>>,
    pub has_failed_tasks: Option<bool>,
}

/// Where a job listing's page starts: after this job, newest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobCursor {
    pub created_at: DateTime<Utc>,
    pub job_id: Uuid,
}

impl JobCursor {
    /// `<microseconds since the epoch>.<job id>`.
    pub fn encode(&self) -> String {
        format!("{}.{}", self.created_at.timestamp_micros(), self.job_id)
    }

    pub fn decode(raw: &str) -> Option<JobCursor> {
        let (micros, id) = raw.split_once('.')?;
        Some(JobCursor {
            created_at: DateTime::from_timestamp_micros(micros.parse().ok()?)?,
            job_id: Uuid::parse_str(id).ok()?,
        })
    }
}

/// A job listing's query: its filters, page start and size (1 to `max`,
/// default `max`).
pub fn job_listing(
    q: &wire::JobListQuery,
    max: u32,
) -> Result<(JobFilter, Option<JobCursor>, u32), Invalid> {
    let name_like = match &q.name_prefix {
        None => None,
        Some(p) if p.len() > 200 => {
            return Err(Invalid::new("name_prefix", "must be at most 200 bytes"))
        }
        Some(p) => {
            let mut like = String::with_capacity(p.len() + 1);
            for c in p.chars() {
                if matches!(c, '%' | '_' | '\\') {
                    like.push('\\');
                }
                like.push(c);
            }
            like.push('%');
            Some(like)
        }
    };
    for (field, from, to) in [
        ("created_after", q.created_after, q.created_before),
        ("finished_after", q.finished_after, q.finished_before),
    ] {
        if let (Some(from), Some(to)) = (from, to) {
            if from > to {
                return Err(Invalid::new(field, "is later than its `_before`"));
            }
        }
    }
    let limit = q.limit.unwrap_or(max);
    if limit == 0 || limit > max {
        return Err(Invalid::new("limit", format!("must be 1 to {max}")));
    }
    let after = match &q.after {
        None => None,
        Some(raw) => Some(
            JobCursor::decode(raw)
                .ok_or_else(|| Invalid::new("after", "is not a cursor this API gave"))?,
        ),
    };
    Ok((
        JobFilter {
            states: q.state.into_iter().collect(),
            name_like,
            created_after: q.created_after,
            created_before: q.created_before,
            finished_after: q.finished_after,
            finished_before: q.finished_before,
            has_failed_tasks: q.has_failed_tasks,
        },
        after,
        limit,
    ))
}

/// Entries one batch call may hold (the contract's bound).
pub const MAX_BATCH: usize = 100;

/// What a batch claim asks for: these tasks, or up to `max` ready ones
/// (of these runtimes when given, waiting when `wait`).
#[derive(Debug, Clone, PartialEq)]
pub enum ClaimAsk {
    Ids(Vec<Uuid>),
    Ready {
        max: u32,
        runtimes: Option<Vec<wire::Runtime>>,
    },
}

/// The ask of `POST /internal/task-claim-batch`: `task_ids` or
/// `max_tasks`, each 1 to [`MAX_BATCH`]; runtimes and a wait only with
/// `max_tasks`, runtimes never an empty list.
pub fn claim_ask(req: &wire::ClaimBatchRequest, waits: bool) -> Result<ClaimAsk, Invalid> {
    let ask = match (&req.task_ids, req.max_tasks) {
        (Some(ids), None) if !ids.is_empty() && ids.len() <= MAX_BATCH => {
            ClaimAsk::Ids(ids.clone())
        }
        (None, Some(n)) if (1..=MAX_BATCH as u32).contains(&n) => ClaimAsk::Ready {
            max: n,
            runtimes: req.runtimes.clone(),
        },
        _ => {
            return Err(Invalid::new(
                "body",
                format!(
                    "name task_ids (1 to {MAX_BATCH}) or max_tasks (1 to {MAX_BATCH}), not both"
                ),
            ))
        }
    };
    if req.runtimes.is_some() && req.max_tasks.is_none() {
        return Err(Invalid::new(
            "runtimes",
            "only a claim of ready work (max_tasks) may name runtimes",
        ));
    }
    if req.runtimes.as_ref().is_some_and(|r| r.is_empty()) {
        return Err(Invalid::new(
            "runtimes",
            "name at least one runtime, or leave it out for any",
        ));
    }
    if waits && req.max_tasks.is_none() {
        return Err(Invalid::new(
            "wait_seconds",
            "only a claim of ready work (max_tasks) may wait",
        ));
    }
    Ok(ask)
}

/// A batch entry's body as the single call's request: decoded strictly,
/// errors named `entries[i].body…`.
pub fn entry_body<T: serde::de::DeserializeOwned>(i: usize, body: Value) -> Result<T, Invalid> {
    let body = if body.is_null() {
        Value::Object(Default::default())
    } else {
        body
    };
    serde_path_to_error::deserialize(body).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." {
            format!("entries[{i}].body")
        } else {
            format!("entries[{i}].body.{path}")
        };
        Invalid::new(field, e.into_inner().to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(key: &str, deps: &[&str]) -> wire::TaskSubmission {
        wire::TaskSubmission {
            key: key.into(),
            runtime: wire::Runtime::Exec,
            bundle: "true".into(),
            inputs: None,
            depends_on: deps.iter().map(|d| d.to_string()).collect(),
            max_attempts: None,
            outputs: vec![],
            reads: vec![],
            timeout_seconds: None,
        }
    }

    fn job(tasks: Vec<wire::TaskSubmission>) -> Result<NewJob, Invalid> {
        new_job(
            wire::SubmitJobRequest {
                name: "j".into(),
                tasks,
                deadline_seconds: None,
            },
            &Settings::default(),
        )
    }

    #[test]
    fn cycle_is_rejected_and_named() {
        let err = job(vec![
            task("a", &["c"]),
            task("b", &["a"]),
            task("c", &["b"]),
        ])
        .unwrap_err();
        assert_eq!(err.field, "tasks");
        assert!(err.message.contains("dependency cycle"), "{err}");
        for k in ["a", "b", "c"] {
            assert!(err.message.contains(k), "{err}");
        }
    }

    #[test]
    fn self_dependency_is_a_cycle() {
        let err = job(vec![task("a", &["a"])]).unwrap_err();
        assert_eq!(err.message, "dependency cycle: a -> a");
    }

    #[test]
    fn duplicate_and_unknown_keys_name_the_field() {
        let err = job(vec![task("a", &[]), task("a", &[])]).unwrap_err();
        assert_eq!(err.field, "tasks[1].key");
        let err = job(vec![task("a", &["zz"])]).unwrap_err();
        assert_eq!(err.field, "tasks[0].depends_on[0]");
    }

    #[test]
    fn diamond_is_accepted() {
        let j = job(vec![
            task("a", &[]),
            task("b", &["a"]),
            task("c", &["a"]),
            task("d", &["b", "c"]),
        ])
        .unwrap();
        assert_eq!(j.tasks[3].depends_on, vec![1, 2]);
    }

    #[test]
    fn nul_characters_are_refused_with_their_place() {
        let v = serde_json::json!({"a": [1, {"b": "x\u{0}y"}]});
        let err = storable_json("output", &v).unwrap_err();
        assert_eq!(err.field, "output.a[1].b");
        assert!(storable_json("output", &serde_json::json!({"a": "ok"})).is_ok());
    }

    #[test]
    fn object_keys_cannot_escape_their_prefix() {
        for bad in ["/abs", "a/../b", "a//b", "a/./b", "a\\b", ""] {
            let req = wire::BufferPublishRequest {
                batch_id: Uuid::nil(),
                dataset: "d".into(),
                object_key: bad.into(),
                rows: 1,
                sha256: "0".repeat(64),
            };
            assert!(buffer_batch(req).is_err(), "{bad:?} accepted");
        }
    }
}

/// A worker's capacity report, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presence {
    pub worker_id: String,
    pub slots: i32,
    pub busy: i32,
    pub runtimes: Vec<String>,
}

/// Checks a `POST /internal/worker-presence` body: an id of 1 to 200
/// characters, 1 to 10 000 slots, at most `slots` busy, at least one
/// runtime (each once).
pub fn worker_presence(p: wire::WorkerPresence) -> Result<Presence, Invalid> {
    let id = p.worker_id.trim();
    if id.is_empty() || id.chars().count() > 200 {
        return Err(Invalid::new("worker_id", "must be 1 to 200 characters"));
    }
    if !(1..=10_000).contains(&p.slots) {
        return Err(Invalid::new("slots", "must be 1 to 10000"));
    }
    if p.busy > p.slots {
        return Err(Invalid::new("busy", "must be at most slots"));
    }
    let mut runtimes: Vec<String> = p.runtimes.iter().map(|r| r.as_str().to_owned()).collect();
    runtimes.sort();
    runtimes.dedup();
    if runtimes.is_empty() {
        return Err(Invalid::new("runtimes", "must name at least one runtime"));
    }
    Ok(Presence {
        worker_id: id.to_owned(),
        slots: i32::try_from(p.slots).unwrap_or(i32::MAX),
        busy: i32::try_from(p.busy).unwrap_or(i32::MAX),
        runtimes,
    })
}

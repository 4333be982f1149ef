//! `dispatcher jobs`, `dispatcher tasks` and `dispatcher pause|resume|pauses`:
//! what a user sees of their jobs and the actions they take, through the
//! HTTP API with a user token (never the database). Tables by default,
//! the API's JSON with `--json`.

use anyhow::Result;
use clap::{Args, Subcommand};
use dispatcher_wire as wire;
use serde_json::{json, Value};

use super::*;

/// The listing's filters (`GET /v1/jobs`).
#[derive(Args, Clone, Default)]
pub(crate) struct FilterArgs {
    /// running, succeeded, failed or cancelled.
    #[arg(long)]
    state: Option<String>,
    #[arg(long)]
    name_prefix: Option<String>,
    /// RFC 3339 times; `_after` inclusive, `_before` exclusive.
    #[arg(long)]
    created_after: Option<String>,
    #[arg(long)]
    created_before: Option<String>,
    #[arg(long)]
    finished_after: Option<String>,
    #[arg(long)]
    finished_before: Option<String>,
    /// true: only jobs with a failed task; false: only jobs without.
    #[arg(long)]
    has_failed_tasks: Option<bool>,
}

impl FilterArgs {
    fn pairs(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        let mut put = |k: &'static str, v: &Option<String>| {
            if let Some(v) = v {
                out.push((k, v.clone()));
            }
        };
        put("state", &self.state);
        put("name_prefix", &self.name_prefix);
        put("created_after", &self.created_after);
        put("created_before", &self.created_before);
        put("finished_after", &self.finished_after);
        put("finished_before", &self.finished_before);
        if let Some(f) = self.has_failed_tasks {
            out.push(("has_failed_tasks", f.to_string()));
        }
        out
    }

    /// The filter as `POST /v1/job-actions` takes it.
    fn as_json(&self) -> Value {
        let mut m = serde_json::Map::new();
        for (k, v) in self.pairs() {
            let v = if k == "has_failed_tasks" {
                json!(v == "true")
            } else {
                json!(v)
            };
            m.insert(k.into(), v);
        }
        Value::Object(m)
    }
}

#[derive(Subcommand)]
pub(crate) enum JobsCommand {
    /// The org's jobs, newest first (a page; `--all` follows every page).
    List {
        #[command(flatten)]
        filter: FilterArgs,
        #[arg(long)]
        limit: Option<u32>,
        /// The `next_cursor` of the previous page.
        #[arg(long)]
        after: Option<String>,
        #[arg(long)]
        all: bool,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// A job and its tasks' states.
    Show {
        job_id: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Run a failed or cancelled job's failed and cancelled tasks again
    /// (`--task KEY`: that task and the job's cancelled ones).
    Retry {
        job_id: String,
        #[arg(long)]
        task: Option<String>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Cancel a running job.
    Cancel {
        job_id: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Retry or cancel every job the filters select, a call of at most
    /// 1 000 jobs at a time until none is left (`--dry-run`: count only).
    Bulk {
        /// retry or cancel.
        #[arg(value_parser = ["retry", "cancel"])]
        action: String,
        #[command(flatten)]
        filter: FilterArgs,
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// The org's recorded retries and bulk actions.
    Actions {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(Subcommand)]
pub(crate) enum TasksCommand {
    /// A task's spec and every attempt (worker, duration, outcome, error,
    /// output, what it produced).
    Show {
        job_id: String,
        key: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// What an attempt printed (its stored log): the newest attempt that
    /// has one, or `--attempt N`.
    Logs {
        job_id: String,
        key: String,
        #[arg(long)]
        attempt: Option<u32>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// A task's events, every page.
    Events {
        job_id: String,
        key: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
}

/// `dispatcher pause|resume RUNTIME`, `dispatcher pauses`.
#[derive(Args)]
pub(crate) struct PauseArgs {
    /// exec, node, python or rust.
    runtime: String,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    api: ApiArgs,
}

#[derive(Args)]
pub(crate) struct PausesArgs {
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    api: ApiArgs,
}

async fn get<T: serde::de::DeserializeOwned>(
    api: &ApiArgs,
    path: &str,
    query: &[(&str, String)],
) -> Result<T> {
    // The query string, encoded by the URL crate reqwest re-exports.
    let mut encoded = reqwest::Url::parse("http://query.invalid/")?;
    encoded
        .query_pairs_mut()
        .extend_pairs(query.iter().map(|(k, v)| (*k, v.as_str())));
    let path_and_query = match encoded.query() {
        Some(q) if !q.is_empty() => format!("{path}?{q}"),
        _ => path.to_owned(),
    };
    api_call(api, reqwest::Method::GET, &path_and_query, None).await
}

async fn send<T: serde::de::DeserializeOwned>(
    api: &ApiArgs,
    method: reqwest::Method,
    path: &str,
    body: Value,
) -> Result<T> {
    let bytes = serde_json::to_vec(&body)?;
    api_call(api, method, path, Some(("application/json", bytes))).await
}

fn print_json(v: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn when(t: Option<chrono::DateTime<chrono::Utc>>) -> String {
    t.map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_else(|| "-".into())
}

fn print_jobs(jobs: &[wire::JobSummary]) {
    for j in jobs {
        let t = &j.tasks;
        println!(
            "{:<36}  {:<9}  {:<19}  {:<19}  {:>5} ok {:>5} failed {:>5} other  {}",
            j.job_id,
            j.state.as_str(),
            when(Some(j.created_at)),
            when(j.finished_at),
            t.succeeded,
            t.failed,
            t.blocked + t.ready + t.leased + t.cancelled,
            j.name
        );
    }
}

fn print_job(job: &wire::JobView) {
    println!("job {}  {}  {}", job.job_id, job.state.as_str(), job.name);
    println!(
        "created {}  finished {}",
        when(Some(job.created_at)),
        when(job.finished_at)
    );
    for t in &job.tasks {
        println!(
            "  {:<24} {:<9} attempt {}/{}",
            t.key,
            t.state.as_str(),
            t.attempt,
            t.max_attempts
        );
    }
}

fn answer_job(job: &wire::JobView, json: bool) -> Result<()> {
    if json {
        print_json(job)
    } else {
        print_job(job);
        Ok(())
    }
}

pub(crate) async fn jobs(cmd: JobsCommand) -> Result<()> {
    match cmd {
        JobsCommand::List {
            filter,
            limit,
            after,
            all,
            json,
            api,
        } => {
            let mut after = after;
            let mut pages = Vec::new();
            loop {
                let mut q = filter.pairs();
                if let Some(l) = limit {
                    q.push(("limit", l.to_string()));
                }
                if let Some(a) = &after {
                    q.push(("after", a.clone()));
                }
                let page: wire::JobListResponse = get(&api, "/v1/jobs", &q).await?;
                if !json {
                    if pages.is_empty() && !page.paused_runtimes.is_empty() {
                        let names: Vec<&str> =
                            page.paused_runtimes.iter().map(|r| r.as_str()).collect();
                        println!("paused runtimes: {}", names.join(", "));
                    }
                    print_jobs(&page.jobs);
                }
                after = page.next_cursor.clone();
                pages.push(page);
                if !all || after.is_none() {
                    break;
                }
            }
            if json {
                let jobs: Vec<&wire::JobSummary> = pages.iter().flat_map(|p| &p.jobs).collect();
                print_json(&json!({
                    "jobs": jobs,
                    "paused_runtimes": pages[0].paused_runtimes,
                    "next_cursor": after,
                }))?;
            } else if let Some(a) = after {
                eprintln!("more: --after {a}");
            } else if pages.iter().all(|p| p.jobs.is_empty()) {
                eprintln!("no jobs match");
            }
        }
        JobsCommand::Show { job_id, json, api } => {
            let job: wire::JobView = get(&api, &format!("/v1/jobs/{job_id}"), &[]).await?;
            answer_job(&job, json)?;
        }
        JobsCommand::Retry {
            job_id,
            task,
            json,
            api,
        } => {
            let path = match &task {
                Some(key) => format!("/v1/jobs/{job_id}/tasks/{key}/retry"),
                None => format!("/v1/jobs/{job_id}/retry"),
            };
            let job: wire::JobView = send(&api, reqwest::Method::POST, &path, json!({})).await?;
            answer_job(&job, json)?;
        }
        JobsCommand::Cancel { job_id, json, api } => {
            let path = format!("/v1/jobs/{job_id}/cancel");
            let job: wire::JobView = send(&api, reqwest::Method::POST, &path, json!({})).await?;
            answer_job(&job, json)?;
        }
        JobsCommand::Bulk {
            action,
            filter,
            dry_run,
            json,
            api,
        } => bulk(&api, &action, &filter, dry_run, json).await?,
        JobsCommand::Actions { json, api } => {
            let list: wire::JobActionList = get(&api, "/v1/job-actions", &[]).await?;
            if json {
                return print_json(&list);
            }
            if list.actions.is_empty() {
                eprintln!("no bulk actions recorded");
            }
            for a in list.actions {
                println!(
                    "{}  {:<6}  {:>6} jobs {:>7} tasks  by {}  {}",
                    when(Some(a.created_at)),
                    a.action.as_str(),
                    a.jobs,
                    a.tasks,
                    a.user_id
                        .map(|u| u.to_string())
                        .unwrap_or_else(|| "-".into()),
                    a.target
                );
            }
        }
    }
    Ok(())
}

/// A bulk action, call after call while the API says it capped one; a
/// progress line after each.
async fn bulk(
    api: &ApiArgs,
    action: &str,
    filter: &FilterArgs,
    dry_run: bool,
    json: bool,
) -> Result<()> {
    let body = json!({"action": action, "filter": filter.as_json(), "dry_run": dry_run});
    let (mut jobs, mut tasks, mut calls) = (0u64, 0u64, Vec::new());
    loop {
        let r: wire::JobActionResponse =
            send(api, reqwest::Method::POST, "/v1/job-actions", body.clone()).await?;
        jobs += u64::from(r.jobs);
        tasks += u64::from(r.tasks);
        let done = dry_run || !r.capped || r.jobs == 0;
        if !json {
            let verb = if dry_run { "would" } else { "did" };
            eprintln!("{action}: {verb} act on {jobs} jobs, {tasks} tasks so far");
        }
        calls.push(r);
        if done {
            break;
        }
    }
    if json {
        print_json(&json!({"jobs": jobs, "tasks": tasks, "calls": calls}))?;
    } else {
        println!(
            "{action}{}: {jobs} jobs, {tasks} tasks",
            if dry_run { " (dry run)" } else { "" }
        );
    }
    Ok(())
}

pub(crate) async fn tasks(cmd: TasksCommand) -> Result<()> {
    match cmd {
        TasksCommand::Show {
            job_id,
            key,
            json,
            api,
        } => {
            let t: wire::TaskDetail =
                get(&api, &format!("/v1/jobs/{job_id}/tasks/{key}"), &[]).await?;
            if json {
                return print_json(&t);
            }
            println!(
                "task {} ({})  {}  attempt {}/{}  runtime {}  bundle {}",
                t.spec.key,
                t.task_id,
                t.state.as_str(),
                t.attempt,
                t.max_attempts,
                t.spec.runtime.as_str(),
                t.spec.bundle
            );
            if !t.depends_on.is_empty() {
                println!("depends on: {}", t.depends_on.join(", "));
            }
            for a in &t.attempts {
                println!(
                    "  attempt {}  {}  worker {}  claimed {}  {}",
                    a.attempt,
                    a.outcome.as_deref().unwrap_or("running"),
                    a.worker_id,
                    when(Some(a.claimed_at)),
                    a.duration_ms.map(|d| format!("{d} ms")).unwrap_or_default()
                );
                if let Some(e) = &a.error {
                    println!(
                        "    error {}: {} (retryable: {})",
                        e.code, e.message, e.retryable
                    );
                }
                if let Some(o) = &a.output {
                    println!("    output {o}");
                }
                for v in &a.dataset_versions {
                    println!(
                        "    committed {} version {} ({} rows)",
                        v.dataset, v.version, v.rows
                    );
                }
                for b in &a.buffer_batches {
                    println!(
                        "    published batch {} to {} ({} rows, {})",
                        b.batch_id, b.dataset, b.rows, b.state
                    );
                }
                if let Some(log) = &a.log {
                    let cut = match log.dropped_bytes {
                        0 => String::new(),
                        n => format!(", {n} bytes dropped"),
                    };
                    println!(
                        "    log {} bytes{cut} (dispatcher tasks logs {job_id} {key} --attempt {})",
                        log.bytes, a.attempt
                    );
                }
            }
        }
        TasksCommand::Logs {
            job_id,
            key,
            attempt,
            json,
            api,
        } => {
            let attempt = match attempt {
                Some(n) => n,
                None => {
                    let t: wire::TaskDetail =
                        get(&api, &format!("/v1/jobs/{job_id}/tasks/{key}"), &[]).await?;
                    t.attempts
                        .iter()
                        .rev()
                        .find(|a| a.log.is_some())
                        .map(|a| a.attempt)
                        .ok_or_else(|| {
                            anyhow::anyhow!(
                                "no attempt of task {key:?} has a log ({} attempts; a log is \
                                 stored when an attempt that printed something ends)",
                                t.attempts.len()
                            )
                        })?
                }
            };
            let log: wire::AttemptLog = get(
                &api,
                &format!("/v1/jobs/{job_id}/tasks/{key}/attempts/{attempt}/logs"),
                &[],
            )
            .await?;
            if json {
                return print_json(&log);
            }
            eprintln!(
                "attempt {attempt} of {key}: {} bytes{}",
                log.bytes,
                match log.dropped_bytes {
                    0 => String::new(),
                    n => format!(", {n} bytes dropped from the middle"),
                }
            );
            print!("{}", log.log);
        }
        TasksCommand::Events {
            job_id,
            key,
            json,
            api,
        } => {
            let path = format!("/v1/jobs/{job_id}/tasks/{key}/events");
            let mut after: Option<String> = None;
            let mut all = Vec::new();
            loop {
                let q: Vec<(&str, String)> = after.iter().map(|a| ("after", a.clone())).collect();
                let page: wire::EventPage = get(&api, &path, &q).await?;
                all.extend(page.events);
                match page.next_cursor {
                    Some(c) => after = Some(c),
                    None => break,
                }
            }
            if json {
                return print_json(&all);
            }
            if all.is_empty() {
                eprintln!("no events");
            }
            for e in all {
                println!(
                    "{}  attempt {}  #{}  {}  {}",
                    when(Some(e.created_at)),
                    e.attempt,
                    e.seq,
                    e.kind,
                    e.payload
                );
            }
        }
    }
    Ok(())
}

fn print_pauses(list: &wire::PauseList) {
    if list.paused.is_empty() {
        println!("no runtime is paused");
    }
    for p in &list.paused {
        println!(
            "{:<7} paused {}  {} tasks waiting",
            p.runtime.as_str(),
            when(Some(p.paused_at)),
            p.ready_tasks
        );
    }
}

/// `pause` (true) or `resume` (false) a runtime.
pub(crate) async fn pause(args: PauseArgs, pause: bool) -> Result<()> {
    let method = if pause {
        reqwest::Method::PUT
    } else {
        reqwest::Method::DELETE
    };
    let path = format!("/v1/pauses/{}", args.runtime);
    let list: wire::PauseList = if pause {
        send(&args.api, method, &path, json!({})).await?
    } else {
        api_call(&args.api, method, &path, None).await?
    };
    if args.json {
        print_json(&list)
    } else {
        print_pauses(&list);
        Ok(())
    }
}

pub(crate) async fn pauses(args: PausesArgs) -> Result<()> {
    let list: wire::PauseList = get(&args.api, "/v1/pauses", &[]).await?;
    if args.json {
        print_json(&list)
    } else {
        print_pauses(&list);
        Ok(())
    }
}

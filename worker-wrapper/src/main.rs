//! The worker wrapper: receives wake-ups, claims leases, runs tasks,
//! heartbeats, completes. Holds a worker credential; the tasks it runs see
//! only their own capability token (`sandbox`, ADR 0010).

mod batch;
mod capture;
mod client;
mod ecs;
mod invoke_server;
mod lambda;
mod metrics;
mod runner;
mod runners;
mod runtime_api;
mod sample;
mod sandbox;
mod wakeups;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use clap::{Args, Parser, Subcommand};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use client::Client;
use runner::{Handled, WorkerConfig};
use sandbox::{Sandbox, UidRange};
use wakeups::{ReceiveError, Wakeups};

#[derive(Parser)]
#[command(
    name = "worker-wrapper",
    version,
    about = "Runs dispatcher tasks on this machine"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Consume wake-ups and run tasks until SIGTERM / Ctrl-C.
    Run(Box<RunArgs>),
    /// A demonstration task (reads inputs on stdin; see `sample.rs`).
    SampleTask,
    /// Serve the Lambda Invoke API on this machine, running each function's
    /// runner here: to try and test the Lambda path without AWS (ADR 0026).
    InvokeServer(invoke_server::Args),
}

#[derive(Args)]
struct RunArgs {
    #[arg(long, env = "DISPATCHER_URL", default_value = "http://127.0.0.1:8080")]
    dispatcher_url: String,
    /// File holding the worker credential (a `dispatcher token worker`
    /// JWT); it must be readable by its owner only (0600 or 0400). Without
    /// it the credential is read from `WORKER_CREDENTIAL` (weaker: see
    /// ADR 0010). Never on the command line, which every process can read.
    #[arg(long, env = "WORKER_CREDENTIAL_FILE")]
    credential_file: Option<std::path::PathBuf>,
    /// Run as root, each running task gets a uid (and gid) of its own from
    /// this range, which must hold no real accounts.
    #[arg(long, env = "WORKER_UDF_UIDS", default_value = "1900000000-1900004095")]
    udf_uids: UidRange,
    /// Where a root wrapper locks the task uids it uses (a root-only
    /// directory shared by every wrapper of the machine).
    #[arg(
        long,
        env = "WORKER_UDF_LOCK_DIR",
        default_value = "/run/worker-wrapper/uids"
    )]
    udf_lock_dir: std::path::PathBuf,
    /// Where task scratch directories are made (default: the system's
    /// temporary directory).
    #[arg(long, env = "WORKER_SCRATCH_DIR")]
    scratch_dir: Option<std::path::PathBuf>,
    /// This worker's id in claims and logs.
    #[arg(long, env = "WORKER_ID")]
    worker_id: Option<String>,
    /// Tasks run at once.
    #[arg(long, env = "WORKER_CONCURRENCY", default_value_t = 4)]
    concurrency: usize,
    /// The wake-up queue (the `queue` wake-up mode).
    #[arg(long, env = "WORKER_QUEUE", default_value = "wakeups")]
    queue: String,
    /// Lease to ask for (the dispatcher clamps it; default: its default).
    #[arg(long, env = "WORKER_LEASE_SECONDS")]
    lease_seconds: Option<u32>,
    /// Long-poll wait of one receive or claim of ready work (an idle
    /// worker logs nothing between them).
    #[arg(long, env = "WORKER_WAIT_SECONDS", default_value_t = 10)]
    wait_seconds: u32,
    /// Serve Prometheus metrics at `/metrics` on this address (off by
    /// default; `docs/standards/metrics.md`).
    #[arg(long, env = "WORKER_METRICS_BIND")]
    metrics_bind: Option<std::net::SocketAddr>,
    /// On ECS: protect this task from scale-in while any slot runs a task
    /// (through the ECS agent at `ECS_AGENT_URI`), so the autoscaler stops
    /// idle workers first.
    #[arg(long, env = "WORKER_ECS_TASK_PROTECTION")]
    ecs_task_protection: bool,
    /// Visibility timeout of received wake-ups (heartbeats extend it).
    #[arg(long, default_value_t = 30)]
    visibility_seconds: u32,
    /// The Python interpreter of Python bundles.
    #[arg(long, env = "WORKER_PYTHON", default_value = "python3")]
    python: String,
    /// Node.js, for Node bundles (20 or later).
    #[arg(long, env = "WORKER_NODE", default_value = "node")]
    node: String,
    /// A warm runner idle this long is stopped.
    #[arg(long, env = "WORKER_RUNNER_IDLE_SECONDS", default_value_t = 300)]
    runner_idle_seconds: u64,
    /// A runner's init (loading its handler) may take this long.
    #[arg(long, env = "WORKER_RUNNER_INIT_SECONDS", default_value_t = 10)]
    runner_init_seconds: u64,
    /// A task's run bound when its claim names none.
    #[arg(long, env = "WORKER_TASK_TIMEOUT_SECONDS", default_value_t = 900)]
    task_timeout_seconds: u64,
    /// Heartbeats and completions of running tasks within this many
    /// milliseconds go as one batched call, and the wake-ups of one receive
    /// are claimed with one call; 0 sends every call alone.
    #[arg(long, env = "WORKER_BATCH_WINDOW_MS", default_value_t = 5)]
    batch_window_ms: u64,
    /// Run tasks under this wrapper's own uid when it is not root (local
    /// development only): tasks of every org then share one uid, can read
    /// each other's files and reach each other's runners. Without it a
    /// wrapper that cannot give each task a uid of its own refuses to
    /// start; the aws profile refuses it always (ADR 0010 §8).
    #[arg(long, env = "WORKER_INSECURE_SHARED_UID")]
    insecure_shared_uid: bool,
    /// Seconds between re-reads of the credential file (it is also read
    /// again whenever the dispatcher refuses the credential).
    #[arg(long, env = "WORKER_CREDENTIAL_RELOAD_SECONDS", default_value_t = 60)]
    credential_reload_seconds: u64,
    /// Which host programs `exec` tasks may start: `off` (exec tasks are
    /// not claimed), `any`, or a comma-separated list of programs, each as
    /// tasks name it. Default: `off` on the aws profile, `any` on local.
    #[arg(long, env = "WORKER_EXEC")]
    exec: Option<String>,
    /// Bytes of each attempt's output kept for its log (an exec task's
    /// stderr, a bundle's stdout and stderr; past it the head and the tail
    /// are kept and the cut is marked); 0 stores no logs. The dispatcher
    /// refuses a log past its own bound (1 MiB by default).
    #[arg(long, env = "WORKER_LOG_MAX_BYTES", default_value_t = 1024 * 1024)]
    log_max_bytes: usize,
    /// On SIGTERM, how long running tasks may finish; then those still
    /// running are stopped and handed back to the dispatcher (ready for
    /// another worker at once; within 5 s more), and the worker exits with
    /// status 75. The default, with those 5 s, ends within the 30 s that
    /// Kubernetes and ECS wait after SIGTERM by default.
    #[arg(long, env = "WORKER_DRAIN_SECONDS", default_value_t = 20)]
    drain_seconds: u64,
    /// Run bundle tasks as Lambda functions (ADR 0026): the function of a
    /// task, named from this template with `{org}` (the org id, 32 hex
    /// digits), `{bundle}` (12 hex digits of its bundle's digest) and
    /// `{runtime}`, is invoked with the attempt's capability token.
    #[arg(long, env = "WORKER_LAMBDA_FUNCTION")]
    lambda_function: Option<String>,
    /// The runtimes run as Lambda functions when --lambda-function is set.
    #[arg(
        long,
        env = "WORKER_LAMBDA_RUNTIMES",
        default_value = "python,node,rust"
    )]
    lambda_runtimes: String,
    /// A Lambda-compatible endpoint instead of AWS (`invoke-server`);
    /// by default AWS_ENDPOINT_URL's.
    #[arg(long, env = "WORKER_LAMBDA_ENDPOINT_URL")]
    lambda_endpoint_url: Option<String>,
    #[command(flatten)]
    profile: dispatcher::profile::QueueProfileArgs,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    // Before any secret is read: nothing of this process may be read
    // through /proc by the tasks it starts. Then the credential, read (and
    // scrubbed from the environment) before the runtime starts threads.
    let credential = match &cli.command {
        Command::Run(args) => {
            sandbox::harden_self()?;
            Some(credential(args)?)
        }
        Command::SampleTask | Command::InvokeServer(_) => None,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::Run(args) => {
            let format = match std::env::var("LOG_FORMAT") {
                Ok(f) => f.parse().map_err(anyhow::Error::msg)?,
                Err(_) => dispatcher_telemetry::LogFormat::Json,
            };
            let telemetry = {
                let _in_runtime = rt.enter();
                dispatcher_telemetry::init("worker-wrapper", "info", format)?
            };
            let stopped = rt.block_on(run(*args, credential.unwrap_or_default()));
            // What is buffered goes out while the runtime still runs.
            drop(telemetry);
            match stopped? {
                Stopped::Drained => Ok(()),
                Stopped::HandedBack => std::process::exit(HANDED_BACK_EXIT),
            }
        }
        Command::SampleTask => rt.block_on(sample::main()),
        Command::InvokeServer(args) => {
            let _telemetry = {
                let _in_runtime = rt.enter();
                dispatcher_telemetry::init(
                    "invoke-server",
                    "info",
                    dispatcher_telemetry::LogFormat::Json,
                )?
            };
            rt.block_on(invoke_server::main(args))
        }
    }
}

/// Reports the worker's slots, busy slots and runtimes every 10 s (and at
/// once), for the dispatcher's backlog per slot. A failed report is
/// logged at debug: the claim loop already says when the dispatcher is
/// unreachable.
async fn report_presence(
    cfg: Arc<runner::WorkerConfig>,
    busy: Arc<std::sync::atomic::AtomicUsize>,
    total: usize,
    shutdown: CancellationToken,
) {
    let mut every = tokio::time::interval(Duration::from_secs(10));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = every.tick() => {}
        }
        let report = dispatcher_wire::WorkerPresence {
            worker_id: cfg.worker_id.clone(),
            slots: u32::try_from(total).unwrap_or(u32::MAX),
            busy: u32::try_from(busy.load(std::sync::atomic::Ordering::Relaxed).min(total))
                .unwrap_or(0),
            runtimes: cfg.runners.runtimes().to_vec(),
        };
        if let Err(e) = cfg.calls.client().presence(&report).await {
            tracing::debug!(error = %e, "reporting this worker's slots failed");
        }
    }
}

/// The worker credential: from the file if given, else from
/// `WORKER_CREDENTIAL`, which is then removed from this process's
/// environment.
fn credential(args: &RunArgs) -> Result<String> {
    if let Some(path) = &args.credential_file {
        return sandbox::read_credential_file(path);
    }
    match std::env::var("WORKER_CREDENTIAL") {
        Ok(c) if !c.trim().is_empty() => {
            // Before the runtime starts any other thread (see `main`).
            std::env::remove_var("WORKER_CREDENTIAL");
            Ok(c.trim().to_owned())
        }
        _ => bail!(
            "no worker credential: set WORKER_CREDENTIAL_FILE (a 0600 file) or WORKER_CREDENTIAL"
        ),
    }
}

async fn run(args: RunArgs, credential: String) -> Result<Stopped> {
    let worker_id = args
        .worker_id
        .clone()
        .unwrap_or_else(|| format!("worker-{}", std::process::id()));
    // A uid per running task and per warm runner (at most one each per slot).
    if args.udf_uids.len() < 2 * args.concurrency as u64 {
        bail!(
            "--udf-uids holds fewer than twice --concurrency {} uids",
            args.concurrency
        );
    }
    let parent = args.scratch_dir.clone().unwrap_or_else(std::env::temp_dir);
    let sandbox = Sandbox::new(&parent, args.udf_uids, &args.udf_lock_dir)?;
    if !sandbox.is_isolated() {
        // Fail closed (review H7): untrusted tasks of different orgs must
        // not share a uid unless the operator said so, for development.
        if args.profile.profile == "aws" {
            bail!(
                "not running as root: the aws profile runs untrusted tasks, each under a uid of \
                 its own, which needs root (--insecure-shared-uid is refused on this profile)"
            );
        }
        if !args.insecure_shared_uid {
            bail!(
                "not running as root: tasks could not get a uid of their own and would share \
                 this user's files and credential; run as root, or pass --insecure-shared-uid \
                 (WORKER_INSECURE_SHARED_UID=true) for local development only"
            );
        }
    }
    let client = Arc::new(Client::new(
        &args.dispatcher_url,
        &credential,
        args.credential_file.clone(),
    )?);
    drop(credential);
    client.reload_periodically(Duration::from_secs(args.credential_reload_seconds.max(1)));
    let default_timeout = Duration::from_secs(args.task_timeout_seconds.max(1));
    let exec = runner::ExecPolicy::parse(args.exec.as_deref(), &args.profile.profile)
        .map_err(anyhow::Error::msg)?;
    let runners = runners::Runners::new(
        runners::RunnerConfig {
            python: args.python.clone(),
            node: args.node.clone(),
            max_idle: args.concurrency.max(1),
            idle_ttl: Duration::from_secs(args.runner_idle_seconds),
            init_timeout: Duration::from_secs(args.runner_init_seconds.max(1)),
            default_timeout,
            worker_id: worker_id.clone(),
            max_unpacked: dispatcher::settings::Settings::default().bundle_max_unpacked_bytes,
            claim_exec: exec.claims_exec(),
        },
        sandbox.clone(),
    )?;
    {
        let runners = Arc::downgrade(&runners);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                match runners.upgrade() {
                    Some(r) => r.sweep().await,
                    None => break,
                }
            }
        });
    }
    let lambda = match &args.lambda_function {
        None => None,
        Some(template) => {
            let runtimes = args
                .lambda_runtimes
                .split(',')
                .map(str::trim)
                .filter(|r| !r.is_empty())
                .map(|r| match dispatcher_wire::Runtime::parse(r) {
                    Some(dispatcher_wire::Runtime::Exec) | None => bail!(
                        "--lambda-runtimes {r:?}: expected python, node or rust (comma-separated)"
                    ),
                    Some(rt) => Ok(rt),
                })
                .collect::<Result<Vec<_>>>()?;
            let endpoint = args
                .lambda_endpoint_url
                .as_deref()
                .or(args.profile.aws_endpoint_url.as_deref());
            let l =
                lambda::Lambda::new(template, runtimes, &args.profile.aws_region, endpoint).await?;
            tracing::info!(
                template,
                runtimes = args.lambda_runtimes,
                "bundle tasks run as Lambda functions"
            );
            Some(Arc::new(l))
        }
    };
    let wakeups = Wakeups::open(&args.profile, client.clone(), &args.queue).await?;
    let source = wakeups.describe();
    let cfg = Arc::new(WorkerConfig {
        dispatcher_url: args.dispatcher_url.clone(),
        worker_id: worker_id.clone(),
        wakeups,
        lease_seconds: args.lease_seconds,
        sandbox: sandbox.clone(),
        runners: runners.clone(),
        lambda,
        default_timeout,
        exec,
        calls: batch::Calls::new(
            client.clone(),
            (args.batch_window_ms > 0).then(|| Duration::from_millis(args.batch_window_ms)),
        ),
        log_max_bytes: args.log_max_bytes,
        hand_back: CancellationToken::new(),
    });
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    if let Some(addr) = args.metrics_bind {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the metrics listener {addr}"))?;
        let (slots, stop) = (args.concurrency.max(1), shutdown.clone());
        tokio::spawn(async move {
            if let Err(e) = crate::metrics::serve(listener, slots, stop).await {
                tracing::error!(error = %e, "the metrics listener stopped");
            }
        });
        tracing::info!(%addr, "serving metrics");
    }
    let slots = Arc::new(Semaphore::new(args.concurrency.max(1)));
    // Slots running a task (not those waiting in a claim for one).
    let busy = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    tokio::spawn(report_presence(
        cfg.clone(),
        busy.clone(),
        args.concurrency.max(1),
        shutdown.clone(),
    ));
    if args.ecs_task_protection {
        let agent = std::env::var("ECS_AGENT_URI").map_err(|_| {
            anyhow::anyhow!(
                "--ecs-task-protection needs ECS_AGENT_URI (ECS sets it in a task's containers)"
            )
        })?;
        tokio::spawn(ecs::protect_while_busy(
            ecs::Protection::new(&agent),
            busy.clone(),
            Duration::from_secs(1),
            shutdown.clone(),
        ));
    }
    let mut running: JoinSet<Handled> = JoinSet::new();
    if !sandbox.is_isolated() {
        tracing::warn!("--insecure-shared-uid: tasks run as this user and are not isolated from each other or from this user's files");
    }
    tracing::info!(
        worker_id,
        url = args.dispatcher_url,
        concurrency = args.concurrency,
        source,
        tasks_run_as = sandbox.describe(),
        "worker started"
    );

    // Set when the dispatcher refuses the credential: stop and fail.
    let mut refused: Option<String> = None;
    // How long to wait after a failed claim or receive: doubling from 1 s
    // to 30 s while the dispatcher (or queue) stays unreachable, back to
    // 1 s after a call that works.
    let mut backoff = Backoff::default();
    while !shutdown.is_cancelled() {
        while let Some(done) = running.try_join_next() {
            if let Ok(Handled::CredentialRefused(why)) = done {
                refused.get_or_insert(why);
            }
        }
        if refused.is_some() {
            break;
        }
        // Wait for a free slot before asking for work.
        let first = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = slots.clone().acquire_owned() => p?,
        };
        let free = slots.available_permits() + 1;
        let work = if matches!(cfg.wakeups, Wakeups::Claims) {
            // Not interrupted by SIGTERM: what it claims is run (and
            // drained), rather than left leased until its lease expires.
            let claimed = cfg
                .calls
                .client()
                .claim_ready(
                    free.min(100) as u32,
                    &cfg.worker_id,
                    cfg.lease_seconds,
                    args.wait_seconds,
                    cfg.runners.runtimes(),
                )
                .await;
            match claimed {
                Ok(claims) => {
                    backoff.reset();
                    claims
                        .into_iter()
                        .map(|c| (None, c.task_id, Ok(c)))
                        .collect()
                }
                Err(e) if e.is_credential_refusal() => {
                    refused = Some(e.to_string());
                    break;
                }
                Err(e) => {
                    let wait = backoff.failed("claiming ready work", &e.to_string());
                    drop(first);
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(wait) => continue,
                    }
                }
            }
        } else {
            let received = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = cfg.wakeups.receive(free.min(10) as u32, args.wait_seconds, args.visibility_seconds) => r,
            };
            let messages = match received {
                Ok(m) => {
                    backoff.reset();
                    m
                }
                Err(ReceiveError::CredentialRefused(why)) => {
                    refused = Some(why);
                    break;
                }
                Err(ReceiveError::Other(e)) => {
                    let wait = backoff.failed("receiving wake-ups", &e.to_string());
                    drop(first);
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(wait) => continue,
                    }
                }
            };
            // The wake-ups' tasks, claimed together (one call when batching).
            let mut targets = Vec::with_capacity(messages.len());
            for msg in messages {
                if let Some(task_id) = runner::wake_target(&cfg, &msg).await {
                    targets.push((msg, task_id));
                }
            }
            let ids: Vec<uuid::Uuid> = targets.iter().map(|(_, id)| *id).collect();
            let claims = cfg
                .calls
                .claim_all(&ids, &cfg.worker_id, cfg.lease_seconds)
                .await;
            targets
                .into_iter()
                .zip(claims)
                .map(|((msg, task_id), claimed)| (Some(msg), task_id, claimed))
                .collect::<Vec<_>>()
        };
        let mut first = Some(first);
        for (msg, task_id, claimed) in work {
            let permit = match first.take() {
                Some(p) => p,
                None => slots.clone().acquire_owned().await?,
            };
            let cfg = cfg.clone();
            ::metrics::gauge!(crate::metrics::SLOTS_BUSY).increment(1.0);
            busy.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let busy = busy.clone();
            running.spawn(async move {
                let handled = runner::handle(cfg, msg, task_id, claimed).await;
                drop(permit);
                busy.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                ::metrics::gauge!(crate::metrics::SLOTS_BUSY).decrement(1.0);
                handled
            });
        }
    }

    tracing::info!(
        running = running.len(),
        drain_seconds = args.drain_seconds,
        "draining"
    );
    let mut handed_back = 0usize;
    let mut note = |done: Result<Handled, tokio::task::JoinError>| match done {
        Ok(Handled::CredentialRefused(why)) => {
            refused.get_or_insert(why);
        }
        Ok(Handled::HandedBack) => handed_back += 1,
        _ => {}
    };
    let drained = tokio::time::timeout(Duration::from_secs(args.drain_seconds), async {
        while let Some(done) = running.join_next().await {
            note(done);
        }
    })
    .await;
    if drained.is_err() {
        // The rest are stopped and handed back: ready for another worker
        // now, not when their leases would expire.
        tracing::warn!(
            left = running.len(),
            "drain bound reached; stopping the remaining tasks and handing them back"
        );
        cfg.hand_back.cancel();
        let handed = tokio::time::timeout(HAND_BACK_BOUND, async {
            while let Some(done) = running.join_next().await {
                note(done);
            }
        })
        .await;
        if handed.is_err() {
            tracing::warn!(
                left = running.len(),
                "tasks not handed back in time; their leases will expire"
            );
            running.shutdown().await;
        }
    }
    runners.stop_all().await;
    sandbox.remove();
    if let Some(why) = refused {
        tracing::error!(
            error = why,
            "the dispatcher refused the worker credential; stopping"
        );
        bail!(
            "the dispatcher refused the worker credential ({why}): it is wrong, expired or \
             signed by a key the dispatcher does not trust; mint a new one with \
             `dispatcher token worker` and check WORKER_CREDENTIAL_FILE"
        );
    }
    if handed_back > 0 {
        tracing::warn!(
            handed_back,
            "worker stopped; tasks it was running were handed back (exit status {HANDED_BACK_EXIT})"
        );
        return Ok(Stopped::HandedBack);
    }
    tracing::info!("worker stopped");
    Ok(Stopped::Drained)
}

/// The wait after failed claims or receives: tries 1, 2, 4 … then 30 s
/// apart, each with one warning (so at most one every 30 s while the
/// dispatcher stays away, not one a second); an info line when calls work
/// again.
#[derive(Default)]
struct Backoff {
    failures: u32,
}

impl Backoff {
    const FIRST: Duration = Duration::from_secs(1);
    const MAX: Duration = Duration::from_secs(30);

    fn failed(&mut self, doing: &str, error: &str) -> Duration {
        self.failures += 1;
        let wait = Self::FIRST
            .saturating_mul(1 << (self.failures - 1).min(5))
            .min(Self::MAX);
        tracing::warn!(
            error,
            failures = self.failures,
            retry_in_seconds = wait.as_secs(),
            "{doing} failed; backing off"
        );
        wait
    }

    fn reset(&mut self) {
        if self.failures > 0 {
            tracing::info!(failures = self.failures, "the dispatcher answers again");
            self.failures = 0;
        }
    }
}

/// How long stopping and handing back the tasks still running after the
/// drain may take (killing each, storing its log, one call).
const HAND_BACK_BOUND: Duration = Duration::from_secs(5);

/// The exit status of a worker that handed unfinished tasks back (EX_TEMPFAIL).
const HANDED_BACK_EXIT: i32 = 75;

/// How a worker's run ended.
enum Stopped {
    /// Every task it claimed ended.
    Drained,
    /// Some tasks were stopped and handed back.
    HandedBack,
}

async fn stop_on_signal(shutdown: CancellationToken) {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    shutdown.cancel();
}

#[cfg(test)]
mod tests {
    use super::Backoff;
    use std::time::Duration;

    #[test]
    fn an_unreachable_dispatcher_is_retried_ever_less_often_up_to_30_s_and_from_1_s_once_it_answers(
    ) {
        let mut b = Backoff::default();
        let waits: Vec<u64> = (0..8)
            .map(|_| b.failed("claiming", "down").as_secs())
            .collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30, 30]);
        b.reset();
        assert_eq!(b.failed("claiming", "down"), Duration::from_secs(1));
    }
}

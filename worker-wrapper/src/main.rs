//! The worker wrapper: receives wake-ups, claims leases, runs tasks,
//! heartbeats, completes. Holds a worker credential; the tasks it runs see
//! only their own capability token.

mod client;
mod runner;
mod sample;
mod wakeups;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use client::Client;
use runner::WorkerConfig;
use wakeups::Wakeups;

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
}

#[derive(Args)]
struct RunArgs {
    #[arg(long, env = "DISPATCHER_URL", default_value = "http://127.0.0.1:8080")]
    dispatcher_url: String,
    /// Worker credential (a `dispatcher token worker` JWT).
    #[arg(long, env = "WORKER_CREDENTIAL", hide_env_values = true)]
    credential: String,
    /// This worker's id in claims and logs.
    #[arg(long, env = "WORKER_ID")]
    worker_id: Option<String>,
    /// Tasks run at once.
    #[arg(long, env = "WORKER_CONCURRENCY", default_value_t = 4)]
    concurrency: usize,
    /// The wake-up queue.
    #[arg(long, env = "WORKER_QUEUE", default_value = "wakeups")]
    queue: String,
    /// Lease to ask for (the dispatcher clamps it; default: its default).
    #[arg(long, env = "WORKER_LEASE_SECONDS")]
    lease_seconds: Option<u32>,
    /// Long-poll wait of one receive.
    #[arg(long, default_value_t = 10)]
    wait_seconds: u32,
    /// Visibility timeout of received wake-ups (heartbeats extend it).
    #[arg(long, default_value_t = 30)]
    visibility_seconds: u32,
    /// On SIGTERM, how long running tasks may finish before they are killed.
    #[arg(long, env = "WORKER_DRAIN_SECONDS", default_value_t = 30)]
    drain_seconds: u64,
    #[command(flatten)]
    profile: dispatcher::profile::QueueProfileArgs,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::Run(args) => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| "info".into()),
                )
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .init();
            rt.block_on(run(*args))
        }
        Command::SampleTask => rt.block_on(sample::main()),
    }
}

async fn run(args: RunArgs) -> Result<()> {
    let worker_id = args
        .worker_id
        .clone()
        .unwrap_or_else(|| format!("worker-{}", std::process::id()));
    let scratch = std::env::temp_dir().join(format!("worker-wrapper-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    let client = Arc::new(Client::new(&args.dispatcher_url, &args.credential)?);
    let wakeups = Wakeups::open(&args.profile, client.clone(), &args.queue).await?;
    let source = wakeups.describe();
    let cfg = Arc::new(WorkerConfig {
        dispatcher_url: args.dispatcher_url.clone(),
        worker_id: worker_id.clone(),
        wakeups,
        lease_seconds: args.lease_seconds,
        scratch: scratch.clone(),
    });
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    let slots = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let mut running = JoinSet::new();
    tracing::info!(
        worker_id,
        url = args.dispatcher_url,
        concurrency = args.concurrency,
        source,
        "worker started"
    );

    while !shutdown.is_cancelled() {
        while running.try_join_next().is_some() {}
        // Wait for a free slot before asking for work.
        let first = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = slots.clone().acquire_owned() => p?,
        };
        let free = (slots.available_permits() + 1).min(10) as u32;
        let received = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = cfg.wakeups.receive(free, args.wait_seconds, args.visibility_seconds) => r,
        };
        let messages = match received {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "receive failed; backing off");
                drop(first);
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        let mut first = Some(first);
        for msg in messages {
            let permit = match first.take() {
                Some(p) => p,
                None => slots.clone().acquire_owned().await?,
            };
            let (client, cfg) = (client.clone(), cfg.clone());
            running.spawn(async move {
                runner::handle(client, cfg, msg).await;
                drop(permit);
            });
        }
    }

    tracing::info!(
        running = running.len(),
        drain_seconds = args.drain_seconds,
        "draining"
    );
    let drained = tokio::time::timeout(Duration::from_secs(args.drain_seconds), async {
        while running.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            left = running.len(),
            "drain bound reached; stopping the remaining tasks (their leases will expire)"
        );
        running.shutdown().await;
    }
    let _ = std::fs::remove_dir_all(&scratch);
    tracing::info!("worker stopped");
    Ok(())
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

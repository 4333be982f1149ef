//! `dispatcher admin sink`: the buffer sink's dead batches.

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use dispatcher::settings::Settings;
use std::sync::Arc;
use uuid::Uuid;

use super::*;

/// Which dead batches a command acts on; every flag narrows.
#[derive(Args)]
pub(crate) struct DeadFilterArgs {
    /// Only this org's batches.
    #[arg(long)]
    org_id: Option<Uuid>,
    /// Only this dataset's batches.
    #[arg(long)]
    dataset: Option<String>,
    /// Only these batches (repeatable).
    #[arg(long = "batch")]
    batch_ids: Vec<Uuid>,
}

impl DeadFilterArgs {
    fn filter(&self) -> dispatcher::store::DeadFilter {
        dispatcher::store::DeadFilter {
            org_id: self.org_id,
            dataset: self.dataset.clone(),
            batch_ids: self.batch_ids.clone(),
        }
    }

    fn is_empty(&self) -> bool {
        self.org_id.is_none() && self.dataset.is_none() && self.batch_ids.is_empty()
    }
}

#[derive(Subcommand)]
pub(crate) enum SinkCommand {
    /// Buffer batches the sink refused (malformed): list, replay, purge.
    #[command(subcommand)]
    Dead(Box<DeadCommand>),
    /// Batches still pending a while after their publish, with the
    /// transient failures the sink met (is the sink running? behind?).
    Pending {
        #[command(flatten)]
        db: DbArgs,
        /// Only batches published longer ago than this.
        #[arg(long, default_value_t = 5)]
        older_than_minutes: u64,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
}

#[derive(Subcommand)]
pub(crate) enum DeadCommand {
    /// Dead batches with their reason code, line and message.
    List {
        #[command(flatten)]
        db: DbArgs,
        #[command(flatten)]
        filter: DeadFilterArgs,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Send dead batches back to the sink, which checks them again and
    /// ingests each at most once.
    Replay {
        #[command(flatten)]
        db: DbArgs,
        #[command(flatten)]
        profile: dispatcher::profile::ProfileArgs,
        #[command(flatten)]
        filter: DeadFilterArgs,
        /// Take the object's current checksum and row count (after you
        /// fixed its content) instead of the published ones.
        #[arg(long)]
        accept_current_object: bool,
        /// Only list what would be replayed.
        #[arg(long)]
        dry_run: bool,
    },
    /// Delete the records of dead batches: they are never ingested, and
    /// retention later removes their objects. Needs a filter or --all.
    Purge {
        #[command(flatten)]
        db: DbArgs,
        #[command(flatten)]
        filter: DeadFilterArgs,
        /// Every dead batch of every org.
        #[arg(long)]
        all: bool,
        /// Only list what would be purged.
        #[arg(long)]
        dry_run: bool,
    },
}

pub(crate) fn print_dead(b: &dispatcher::store::DeadBatch) {
    println!(
        "{}  org {}  dataset {}  task {} attempt {}  {} rows  {}{}: {}  (object {}, replays {})",
        b.batch_id,
        b.org_id,
        b.dataset,
        b.task_id,
        b.attempt,
        b.rows,
        b.reason_code,
        b.reason_line
            .map(|l| format!(" at line {l}"))
            .unwrap_or_default(),
        b.reason_message.as_deref().unwrap_or(""),
        b.object_key,
        b.replays
    );
}

pub(crate) async fn sink_dead(cmd: DeadCommand, settings: Arc<Settings>) -> Result<()> {
    match cmd {
        DeadCommand::List { db, filter, limit } => {
            let store = connect(&db, settings, 2).await?;
            let dead = store.dead_batches(&filter.filter(), limit).await?;
            for b in &dead {
                print_dead(b);
            }
            eprintln!("{} dead batch(es) shown (at most {limit})", dead.len());
        }
        DeadCommand::Replay {
            db,
            profile,
            filter,
            accept_current_object,
            dry_run,
        } => {
            let store = connect(&db, settings, 2).await?;
            let objects = operator_objects(&profile).await?;
            let done = dispatcher::services::sink::replay_dead(
                &store,
                objects.as_ref(),
                &filter.filter(),
                accept_current_object,
                dry_run,
            )
            .await?;
            for r in &done {
                let accepted = match &r.accepted {
                    Some((sha, rows)) => format!(" (accepting sha256 {sha}, {rows} rows)"),
                    None => String::new(),
                };
                let verb = match (dry_run, r.replayed) {
                    (true, _) => "would replay",
                    (false, true) => "replayed",
                    (false, false) => "not dead any more",
                };
                println!("{verb} {}{accepted}", r.batch.batch_id);
            }
            let n = done.iter().filter(|r| r.replayed || dry_run).count();
            eprintln!(
                "{} {n} dead batch(es); the sink ingests each at most once",
                if dry_run { "would replay" } else { "replayed" }
            );
        }
        DeadCommand::Purge {
            db,
            filter,
            all,
            dry_run,
        } => {
            if filter.is_empty() && !all {
                bail!("name the batches to purge (--org-id, --dataset, --batch) or pass --all");
            }
            let store = connect(&db, settings, 2).await?;
            let f = filter.filter();
            if dry_run {
                let dead = store
                    .dead_batches(&f, dispatcher::services::sink::ADMIN_BATCH_LIMIT)
                    .await?;
                for b in &dead {
                    print!("would purge ");
                    print_dead(b);
                }
                eprintln!("would purge {} dead batch(es)", dead.len());
            } else {
                let n = store.purge_dead_batches(&f).await?;
                eprintln!("purged {n} dead batch(es); retention removes their objects later");
            }
        }
    }
    Ok(())
}

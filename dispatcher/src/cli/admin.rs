//! `dispatcher admin`: orgs, members, queues, the outbox, retention; it
//! dispatches to the alerts and sink commands.

use anyhow::{bail, Result};
use clap::Subcommand;
use dispatcher::domain::Role;
use dispatcher::profile::QueueProfileArgs as QueueArgs;
use dispatcher::queue::SqsQueue;
use dispatcher::settings::Settings;
use std::sync::Arc;
use uuid::Uuid;

use super::*;

#[derive(Subcommand)]
pub(crate) enum DlqCommand {
    /// Send the wake-ups of tasks that can still run from wakeups-dlq back
    /// to wakeups; drop those of finished or unknown tasks.
    Replay {
        #[command(flatten)]
        db: DbArgs,
        #[command(flatten)]
        queues: QueueArgs,
        /// Only count; send and delete nothing.
        #[arg(long)]
        dry_run: bool,
        /// Seconds each received message stays hidden during the run.
        #[arg(long, default_value_t = 60)]
        hold_seconds: u64,
    },
}

#[derive(Subcommand)]
pub(crate) enum SqsCommand {
    /// Create every SQS queue and its DLQ with a redrive policy
    /// (idempotent; aws profile only: the local queues are tables).
    CreateQueues {
        #[command(flatten)]
        queues: QueueArgs,
        /// Receives before a message moves to the DLQ.
        #[arg(long, default_value_t = 5)]
        max_receives: u32,
    },
}

#[derive(Subcommand)]
pub(crate) enum OutboxCommand {
    /// Counts by state, and the dead rows with their last error.
    Status {
        #[command(flatten)]
        db: DbArgs,
        /// Dead rows to list.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Put dead rows back to pending so the relay publishes them again.
    Requeue {
        #[command(flatten)]
        db: DbArgs,
        /// Only these rows (repeatable); all dead rows when omitted.
        #[arg(long = "id")]
        ids: Vec<i64>,
    },
}

#[derive(Subcommand)]
pub(crate) enum RetentionCommand {
    /// Delete dataset objects no version can reference: staged parts and
    /// uploads of attempts that ended without committing, and orphan
    /// manifests, once their attempt ended longer ago than the cutoff.
    Run {
        #[command(flatten)]
        db: DbArgs,
        #[command(flatten)]
        profile: dispatcher::profile::ProfileArgs,
        /// Only list what would be deleted.
        #[arg(long)]
        dry_run: bool,
        /// The cutoff: attempts that ended longer ago than this. Refused
        /// below the floor (longest lease + token grace + 1 h).
        #[arg(long, default_value_t = 24)]
        older_than_hours: u64,
    },
}

#[derive(Subcommand)]
pub(crate) enum AdminCommand {
    /// Alert destinations, routes, and dead deliveries (ADR 0014):
    /// add-destination, add-route, list, dead.
    #[command(subcommand)]
    Alerts(Box<AlertsCommand>),
    /// The buffer sink's batches: dead ones (list, replay, purge) and
    /// pending ones.
    #[command(subcommand)]
    Sink(SinkCommand),
    /// Dataset object retention: run it (or a dry run).
    #[command(subcommand)]
    Retention(RetentionCommand),
    /// Dead-letter queues: replay the wake-ups DLQ.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// SQS set-up (aws profile): create-queues.
    #[command(subcommand)]
    Sqs(SqsCommand),
    /// Outbox rows the relay dead-lettered: status, requeue.
    #[command(subcommand)]
    Outbox(OutboxCommand),
    /// The workers that reported in the last `--within-seconds`: id,
    /// credential, slots, busy slots, runtimes, when first and last seen.
    Workers {
        #[command(flatten)]
        db: DbArgs,
        #[arg(long, default_value_t = 60)]
        within_seconds: u64,
    },
    /// Create an org (or find it by name); prints its id.
    CreateOrg {
        #[command(flatten)]
        db: DbArgs,
        #[arg(long)]
        name: String,
    },
    /// Create a user (or find it by e-mail), grant a role in an org; prints the user id.
    AddMember {
        #[command(flatten)]
        db: DbArgs,
        #[arg(long)]
        org_id: Uuid,
        #[arg(long)]
        email: String,
        /// owner, admin, member or viewer. Changing an existing member's
        /// role keeps at least one admin in the org.
        #[arg(long, default_value = "member")]
        role: String,
        /// Link the user to its identity at the identity provider (only a
        /// user with no identity yet; users are otherwise bound at their
        /// first sign-in from the token's verified e-mail): the provider's
        /// issuer (`--idp-issuer` of `serve`) ...
        #[arg(long, requires = "idp_subject")]
        idp_issuer: Option<String>,
        /// ... and the user's subject there.
        #[arg(long, requires = "idp_issuer")]
        idp_subject: Option<String>,
    },
    /// Remove the IdP identity bound to a user (its next sign-in binds
    /// again, from a verified e-mail): for a user whose IdP account was
    /// replaced. No API call can do this (ADR 0012).
    UnbindIdentity {
        #[command(flatten)]
        db: DbArgs,
        #[arg(long)]
        email: String,
    },
    /// Remove a member (never the org's last admin).
    RemoveMember {
        #[command(flatten)]
        db: DbArgs,
        #[arg(long)]
        org_id: Uuid,
        #[arg(long)]
        email: String,
    },
    /// List an org's members and their roles.
    ListMembers {
        #[command(flatten)]
        db: DbArgs,
        #[arg(long)]
        org_id: Uuid,
    },
}

/// The profile's object store for operator commands, which read, list and
/// delete but never presign.
pub(crate) async fn operator_objects(
    profile: &dispatcher::profile::ProfileArgs,
) -> Result<Arc<dyn dispatcher::objects::ObjectStore>> {
    Ok(match profile.objects(Default::default()).await? {
        dispatcher::profile::Objects::Store(s) => s,
        dispatcher::profile::Objects::LocalDir { dir, .. } => Arc::new(
            // No URL is presigned here, so any secret does; a random one.
            dispatcher::objects::LocalDirStore::new(
                dir,
                "http://127.0.0.1",
                rand::random::<[u8; 32]>().to_vec(),
            )?,
        ),
    })
}

pub(crate) async fn admin(cmd: AdminCommand) -> Result<()> {
    let settings = Arc::new(Settings::default());
    match cmd {
        AdminCommand::Dlq(DlqCommand::Replay {
            db,
            queues,
            dry_run,
            hold_seconds,
        }) => {
            let store = connect(&db, settings.clone(), 4).await?;
            let queue = queues.open(&store, &settings).await?;
            let mut every = Every::second();
            let r = dispatcher::services::dlq::replay_wakeups_reporting(
                queue.as_ref(),
                &store,
                dry_run,
                std::time::Duration::from_secs(hold_seconds),
                |r| {
                    every.say(|| {
                        format!(
                            "… {} {}, {} skipped, {} malformed so far",
                            r.replayed,
                            if dry_run { "to replay" } else { "replayed" },
                            r.skipped_finished + r.skipped_unknown,
                            r.malformed
                        )
                    })
                },
            )
            .await?;
            let verb = if dry_run { "would replay" } else { "replayed" };
            println!(
                "{verb} {}; skipped {} finished and {} unknown tasks; {} malformed left in the DLQ",
                r.replayed, r.skipped_finished, r.skipped_unknown, r.malformed
            );
        }
        AdminCommand::Sqs(SqsCommand::CreateQueues {
            queues,
            max_receives,
        }) => {
            if !queues.is_aws() {
                bail!(
                    "create-queues makes SQS queues, and the profile is local (its queues are                      tables `dispatcher migrate` makes): pass --profile aws (or                      DISPATCHER_PROFILE=aws) to create them in SQS"
                );
            }
            SqsQueue::create_queues(&queues.sqs(), max_receives).await?;
            SqsQueue::connect(&queues.sqs()).await?;
            println!("queues ready (prefix {:?})", queues.sqs_queue_prefix);
        }
        AdminCommand::Alerts(cmd) => alerts(*cmd, settings).await?,
        AdminCommand::Sink(SinkCommand::Dead(cmd)) => sink_dead(*cmd, settings).await?,
        AdminCommand::Sink(SinkCommand::Pending {
            db,
            older_than_minutes,
            limit,
        }) => {
            let store = connect(&db, settings, 2).await?;
            let older = std::time::Duration::from_secs(older_than_minutes.saturating_mul(60));
            let pending = store.pending_batches(older, limit).await?;
            for b in &pending {
                println!(
                    "{}  org {}  dataset {}  published {}  last pointer {}  transient failures {}{}",
                    b.batch_id,
                    b.org_id,
                    b.dataset,
                    b.created_at.to_rfc3339(),
                    b.pointer_at.to_rfc3339(),
                    b.transient_failures,
                    b.last_error
                        .as_deref()
                        .map(|e| format!("  last error: {e}"))
                        .unwrap_or_default()
                );
            }
            eprintln!(
                "{} batch(es) pending for more than {older_than_minutes} min (at most {limit} shown)",
                pending.len()
            );
        }
        AdminCommand::Retention(RetentionCommand::Run {
            db,
            profile,
            dry_run,
            older_than_hours,
        }) => {
            let store = connect(&db, settings, 2).await?;
            let objects = operator_objects(&profile).await?;
            let cutoff = std::time::Duration::from_secs(older_than_hours.saturating_mul(3600));
            let report = dispatcher::services::retention::run(
                &store,
                objects.as_ref(),
                cutoff,
                dry_run,
                |line| eprintln!("{line}"),
            )
            .await?;
            for key in &report.deleted {
                println!("{} {key}", if dry_run { "would delete" } else { "deleted" });
            }
            eprintln!(
                "{} {} of {} objects ({} bytes); {} scanned",
                if dry_run { "would delete" } else { "deleted" },
                report.deleted.len(),
                report.candidates,
                report.deleted_bytes,
                report.scanned
            );
        }
        AdminCommand::Outbox(OutboxCommand::Status { db, limit }) => {
            let store = connect(&db, settings, 2).await?;
            let c = store.outbox_counts().await?;
            println!("pending {}  sent {}  dead {}", c.pending, c.sent, c.dead);
            for row in store.outbox_dead(limit).await? {
                println!(
                    "dead #{} {} {} tries={} created={} error={}",
                    row.id,
                    row.topic,
                    row.payload,
                    row.tries,
                    row.created_at.to_rfc3339(),
                    row.last_error.unwrap_or_default()
                );
            }
        }
        AdminCommand::Workers { db, within_seconds } => {
            let store = connect(&db, settings, 2).await?;
            let workers = store.workers_seen(within_seconds as f64).await?;
            if workers.is_empty() {
                eprintln!("no worker reported in the last {within_seconds} s");
            }
            let now = chrono::Utc::now();
            for w in workers {
                println!(
                    "{}  credential={}  slots={}  busy={}  runtimes={}  seen {:.0} s ago  since {}",
                    w.worker_id,
                    w.credential,
                    w.slots,
                    w.busy,
                    w.runtimes.join(","),
                    (now - w.seen_at).num_milliseconds() as f64 / 1000.0,
                    w.started_at.to_rfc3339(),
                );
            }
        }
        AdminCommand::Outbox(OutboxCommand::Requeue { db, ids }) => {
            let store = connect(&db, settings, 2).await?;
            let only = (!ids.is_empty()).then_some(ids.as_slice());
            println!("requeued {}", store.outbox_requeue_dead(only).await?);
        }
        AdminCommand::CreateOrg { db, name } => {
            let name = name.trim();
            if name.is_empty() || name.len() > 200 {
                bail!("--name must be 1 to 200 bytes");
            }
            let store = connect(&db, settings, 2).await?;
            println!("{}", store.ensure_org(name).await?);
        }
        AdminCommand::AddMember {
            db,
            org_id,
            email,
            role,
            idp_issuer,
            idp_subject,
        } => {
            let Some(role) = Role::parse(&role) else {
                bail!("--role must be owner, admin, member or viewer");
            };
            if !email.contains('@') {
                bail!("--email must be an e-mail address");
            }
            let store = connect(&db, settings, 2).await?;
            let user = store.ensure_user(&email).await?;
            if let (Some(issuer), Some(subject)) = (&idp_issuer, &idp_subject) {
                store.set_user_subject(user, issuer, subject).await?;
            }
            if store.change_membership(org_id, user, Some(role)).await? {
                store.accept_membership(org_id, user).await?;
            } else {
                store.set_membership(org_id, user, role).await?;
            }
            println!("{user}");
        }
        AdminCommand::UnbindIdentity { db, email } => {
            let store = connect(&db, settings, 2).await?;
            match store.unbind_identity(&email).await? {
                Some(user) => eprintln!("user {user} ({email}) has no identity bound now"),
                None => bail!("no user has the e-mail {email}, or it has no identity bound"),
            }
        }
        AdminCommand::RemoveMember { db, org_id, email } => {
            let store = connect(&db, settings, 2).await?;
            let user = store.ensure_user(&email).await?;
            if store.remove_membership(org_id, user).await? {
                eprintln!("removed {email} from org {org_id}");
            } else {
                bail!("{email} is not a member of org {org_id}");
            }
        }
        AdminCommand::ListMembers { db, org_id } => {
            let store = connect(&db, settings, 2).await?;
            let members = store.list_members(org_id).await?;
            if members.is_empty() {
                eprintln!("org {org_id} has no members");
            }
            for m in members {
                println!(
                    "{}  {:<7} {}{}{}",
                    m.user_id,
                    m.role,
                    m.email,
                    if m.accepted { "" } else { "  (invited)" },
                    m.idp_subject
                        .map(|s| format!("  (idp subject {s})"))
                        .unwrap_or_default()
                );
            }
        }
    }
    Ok(())
}

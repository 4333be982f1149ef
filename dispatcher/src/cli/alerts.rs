//! `dispatcher admin alerts`: destinations, routes and dead deliveries (ADR 0014).

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use dispatcher::settings::Settings;
use std::sync::Arc;

use super::*;

#[derive(Subcommand)]
pub(crate) enum AlertsCommand {
    /// Make a webhook destination of an org; prints its id and secret.
    AddDestination {
        #[command(flatten)]
        db: DbArgs,
        #[arg(long)]
        org_id: uuid::Uuid,
        #[arg(long)]
        name: String,
        #[arg(long)]
        url: String,
        /// `whsec_…` (default: a new random one).
        #[arg(long, env = "DISPATCHER_WEBHOOK_SECRET", hide_env_values = true)]
        secret: Option<String>,
    },
    /// Route the events of a stream dataset that match a `where` map to a
    /// destination.
    AddRoute {
        #[command(flatten)]
        db: DbArgs,
        #[arg(long)]
        org_id: uuid::Uuid,
        #[arg(long)]
        name: String,
        #[arg(long, default_value = "alert_events")]
        dataset: String,
        /// The destination's name.
        #[arg(long)]
        destination: String,
        /// A `where` map, e.g. '{"severity": {"eq": "critical"}}' (default:
        /// every event).
        #[arg(long = "match")]
        matcher: Option<String>,
    },
    /// An org's destinations and routes.
    List {
        #[command(flatten)]
        db: DbArgs,
        #[arg(long)]
        org_id: uuid::Uuid,
    },
    /// Deliveries that ran out of tries: list, replay.
    #[command(subcommand)]
    Dead(DeadDeliveriesCommand),
}

#[derive(Subcommand)]
pub(crate) enum DeadDeliveriesCommand {
    /// Dead deliveries with their last status and error, oldest first.
    List {
        #[command(flatten)]
        db: DbArgs,
        #[arg(long)]
        org_id: Option<uuid::Uuid>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Make dead deliveries pending again with fresh tries (same
    /// `webhook-id`): those named by `--id`, else every dead one (of
    /// `--org-id`).
    Replay {
        #[command(flatten)]
        db: DbArgs,
        #[arg(long)]
        org_id: Option<uuid::Uuid>,
        #[arg(long = "id")]
        ids: Vec<uuid::Uuid>,
        #[arg(long)]
        dry_run: bool,
    },
}

pub(crate) async fn alerts(cmd: AlertsCommand, settings: Arc<Settings>) -> Result<()> {
    match cmd {
        AlertsCommand::AddDestination {
            db,
            org_id,
            name,
            url,
            secret,
        } => {
            let store = connect(&db, settings, 2).await?;
            let secret = secret.unwrap_or_else(dispatcher::services::alerts::new_secret);
            if dispatcher::services::alerts::secret_key(&secret).is_none() {
                bail!("--secret must be whsec_ followed by base64 of 24 to 64 bytes");
            }
            let parsed = reqwest::Url::parse(&url).context("--url")?;
            if !matches!(parsed.scheme(), "http" | "https") {
                bail!("--url must be http or https");
            }
            let d = store
                .create_alert_destination(org_id, &name, parsed.as_str(), &secret)
                .await?;
            println!("{}", d.id);
            println!("{secret}");
        }
        AlertsCommand::AddRoute {
            db,
            org_id,
            name,
            dataset,
            destination,
            matcher,
        } => {
            let store = connect(&db, settings, 2).await?;
            let matcher: Option<serde_json::Value> = matcher
                .map(|m| serde_json::from_str(&m))
                .transpose()
                .context("--match is not JSON")?;
            let (dataset_id, mode, columns, _) = store.dataset_for_query(org_id, &dataset).await?;
            if mode != dispatcher_wire::DatasetMode::Stream {
                bail!("{dataset} is not a stream dataset");
            }
            dispatcher::services::alerts::matcher_plan(&dataset, &columns, matcher.as_ref())
                .map_err(|e| anyhow::anyhow!("{}: {}", e.field, e.message))?;
            let id = store
                .create_alert_route(org_id, &name, dataset_id, &destination, matcher.as_ref())
                .await?;
            println!("{id}");
        }
        AlertsCommand::List { db, org_id } => {
            let store = connect(&db, settings, 2).await?;
            let (destinations, routes) = (
                store.alert_destinations(org_id).await?,
                store.alert_route_views(org_id).await?,
            );
            if destinations.is_empty() && routes.is_empty() {
                eprintln!(
                    "org {org_id} has no alert destinations and no routes                      (`dispatcher admin alerts add-destination`)"
                );
            }
            for d in destinations {
                println!("destination {} {} {}", d.id, d.name, d.url);
            }
            for r in routes {
                let m = r
                    .matcher
                    .map(|m| m.to_string())
                    .unwrap_or_else(|| "(every event)".into());
                println!(
                    "route {} {}: {} -> {} where {m}",
                    r.id, r.name, r.dataset, r.destination
                );
            }
        }
        AlertsCommand::Dead(DeadDeliveriesCommand::List { db, org_id, limit }) => {
            let store = connect(&db, settings, 2).await?;
            let data = data_pool(&db).await?;
            let dead =
                dispatcher::services::alerts::dead_deliveries(&store, &data, org_id, limit).await?;
            for d in &dead {
                println!(
                    "{} event {} -> {} (route {}): {} tries, last {} {}",
                    d.delivery_id,
                    d.event_id,
                    d.destination,
                    d.route,
                    d.tries,
                    d.last_status
                        .map(|s| s.to_string())
                        .unwrap_or_else(|| "-".into()),
                    d.last_error.as_deref().unwrap_or("")
                );
            }
            eprintln!("{} dead delivery(ies) shown (at most {limit})", dead.len());
        }
        AlertsCommand::Dead(DeadDeliveriesCommand::Replay {
            db,
            org_id,
            ids,
            dry_run,
        }) => {
            let data = data_pool(&db).await?;
            let n = if dry_run {
                dispatcher::services::alerts::replay_dead(&data, org_id, &ids, true).await?
            } else {
                let mut every = super::Every::second();
                dispatcher::services::alerts::replay_dead_reporting(&data, org_id, &ids, |n| {
                    every.say(|| format!("… {n} dead delivery(ies) replayed so far"))
                })
                .await?
            };
            let verb = if dry_run { "would replay" } else { "replayed" };
            println!("{verb} {n} dead delivery(ies)");
        }
    }
    Ok(())
}

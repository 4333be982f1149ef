//! Runs the dispatcher's roles — the HTTP API, the outbox relay, the lease
//! reaper, the buffer sink, alert routing and delivery — over one store, one queue and one object
//! store, with one shutdown token.
//! Every role drains on shutdown; nothing is global, so several dispatchers
//! can run in one process (tests do).

pub mod pruner;
pub mod reaper;
pub mod relay;
pub mod replicas;

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::http::{self, AppState};
use crate::objects::LocalDirStore;
use crate::profile::Objects;
use crate::queue::{PgQueue, Queue};
use crate::roles::reaper::Reaper;
use crate::roles::relay::Relay;
use crate::services::sink::Sink;
use crate::settings::Settings;
use crate::store::Store;
use crate::tokens::Keyring;

/// Which roles this process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Roles {
    pub api: bool,
    pub relay: bool,
    pub reaper: bool,
    pub sink: bool,
    /// Alert routing (needs the data database).
    pub router: bool,
    /// Alert delivery (webhooks; needs the data database).
    pub delivery: bool,
    /// Deletes finished jobs past their retention.
    pub pruner: bool,
}

impl Roles {
    pub const NONE: Roles = Roles {
        api: false,
        relay: false,
        reaper: false,
        sink: false,
        router: false,
        delivery: false,
        pruner: false,
    };
    pub const ALL: Roles = Roles {
        api: true,
        relay: true,
        reaper: true,
        sink: true,
        router: true,
        delivery: true,
        pruner: true,
    };
    pub const API: Roles = Roles {
        api: true,
        ..Roles::NONE
    };

    /// Whether any role needs the data database.
    pub fn need_data(self) -> bool {
        self.api || self.sink || self.router || self.delivery
    }

    /// Parses `api,relay,reaper,sink,router,delivery,pruner` (any subset,
    /// or `all`).
    pub fn parse(s: &str) -> Result<Roles, String> {
        let mut roles = Roles::NONE;
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part {
                "all" => roles = Roles::ALL,
                "api" => roles.api = true,
                "relay" => roles.relay = true,
                "reaper" => roles.reaper = true,
                "sink" => roles.sink = true,
                "router" => roles.router = true,
                "delivery" => roles.delivery = true,
                "pruner" => roles.pruner = true,
                other => {
                    return Err(format!(
                        "unknown role {other:?} (api, relay, reaper, sink, router, delivery, pruner, all)"
                    ))
                }
            }
        }
        if roles == Roles::NONE {
            return Err("no role given".into());
        }
        Ok(roles)
    }
}

/// The profile's queue and object store, and the data database.
pub struct Adapters {
    /// SQS on the aws profile; `None` is the local Postgres queue.
    pub queue: Option<Arc<dyn Queue>>,
    pub objects: Objects,
    /// The data database (`crate::datadb`); the sink role needs it, and
    /// the API reads stream datasets from it.
    pub data: Option<sqlx::PgPool>,
    /// The identity provider whose user tokens the API accepts (ADR 0012).
    pub idp: Option<Arc<crate::idp::Idp>>,
    /// STS for scoped task credentials (aws profile with a role).
    pub sts: Option<Arc<crate::objects::sts::StsIssuer>>,
}

/// Runs the given roles until `shutdown` is cancelled, then drains them.
/// `listener` is required when `roles.api` is set. `queue` is the profile's
/// queue (SQS on the aws profile); `None` is the local Postgres queue. The
/// relay publishes to it and `/internal/queues/wakeups/*` serves its wake-up
/// queue to workers, so local workers hold no queue or database
/// credentials; aws workers receive from SQS with credentials for the
/// wake-up queue alone (ADR 0009).
pub async fn run(
    listener: Option<TcpListener>,
    store: Store,
    keys: Arc<Keyring>,
    settings: Arc<Settings>,
    roles: Roles,
    adapters: Adapters,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let Adapters {
        queue,
        objects,
        data,
        idp,
        sts,
    } = adapters;
    let mut tasks = JoinSet::new();
    // Before anything runs: a replica whose tokens its peers would refuse
    // (or whose peers' it would) does not start.
    if roles.api {
        let addr = listener.as_ref().and_then(|l| l.local_addr().ok());
        let membership = replicas::join(&store, &keys, replicas::replica_name(addr)).await?;
        tasks.spawn(membership.run(shutdown.clone()));
    }
    let queue = match queue {
        Some(q) => q,
        None => {
            let (local, arrivals) = crate::profile::local_queue(&store, &settings);
            tasks.spawn(PgQueue::listen(
                store.pool().clone(),
                arrivals,
                shutdown.clone(),
            ));
            local
        }
    };
    let (objects, local) = match objects {
        Objects::Store(s) => (s, None),
        Objects::LocalDir { dir, public_url } => {
            // The base URL only matters to presigned URLs, which the API
            // serves; a process without the API never hands one out.
            let base = match (public_url, &listener) {
                (Some(url), _) => url,
                (None, Some(l)) => format!("http://{}", l.local_addr()?),
                (None, None) => "http://127.0.0.1".to_owned(),
            };
            let local = Arc::new(
                LocalDirStore::new(dir, &base, keys.presign_secret())
                    .map_err(std::io::Error::other)?,
            );
            (
                local.clone() as Arc<dyn crate::objects::ObjectStore>,
                Some(local),
            )
        }
    };
    if roles.relay {
        let relay = Relay::new(store.clone(), queue.clone(), settings.clone());
        tasks.spawn(relay.run(shutdown.clone()));
    }
    if roles.reaper {
        let reaper = Reaper::new(store.clone(), settings.clone());
        tasks.spawn(reaper.run(shutdown.clone()));
    }
    if roles.pruner {
        let pruner = pruner::Pruner::new(store.clone(), objects.clone(), settings.clone());
        tasks.spawn(pruner.run(shutdown.clone()));
    }
    if roles.sink {
        let data = data.as_ref().ok_or_else(|| {
            std::io::Error::other("the sink role needs the data database (DATA_DATABASE_URL)")
        })?;
        let sink = Sink::new(
            store.clone(),
            data.clone(),
            queue.clone(),
            objects.clone(),
            settings.clone(),
        );
        tasks.spawn(sink.run(shutdown.clone()));
    }
    if roles.router || roles.delivery {
        let data = data.as_ref().ok_or_else(|| {
            std::io::Error::other("the router and delivery roles need the data database")
        })?;
        if roles.router {
            let router = crate::services::alerts::AlertRouter::new(
                store.clone(),
                data.clone(),
                settings.clone(),
            );
            tasks.spawn(router.run(shutdown.clone()));
        }
        if roles.delivery {
            let delivery = crate::services::alerts::AlertDelivery::new(
                store.clone(),
                data.clone(),
                settings.clone(),
            );
            tasks.spawn(delivery.run(shutdown.clone()));
        }
    }
    let served = match (roles.api, listener) {
        (true, Some(listener)) => {
            let ready = crate::store::ready::ReadySignal::default();
            if settings.wakeups == crate::settings::Wakeups::Notify {
                tasks.spawn(ready.clone().listen(store.clone(), shutdown.clone()));
            }
            let state = AppState::new(store, keys, settings, queue, objects, local)
                .with_ready(ready)
                .with_data(data)
                .with_idp(idp)
                .with_sts(sts);
            http::serve(listener, state, shutdown.clone()).await
        }
        (true, None) => Err(std::io::Error::other("the api role needs a listener")),
        (false, _) => {
            shutdown.cancelled().await;
            Ok(())
        }
    };
    shutdown.cancel();
    while tasks.join_next().await.is_some() {}
    served
}

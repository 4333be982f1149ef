//! Runs the dispatcher's roles — the HTTP API, the outbox relay, the lease
//! reaper — over one store and one local queue, with one shutdown token.
//! Every role drains on shutdown; nothing is global, so several dispatchers
//! can run in one process (tests do).

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::http::{self, AppState};
use crate::objects::LocalDirStore;
use crate::profile::Objects;
use crate::queue::{PgQueue, Queue};
use crate::reaper::Reaper;
use crate::relay::Relay;
use crate::settings::Settings;
use crate::store::Store;
use crate::tokens::Keyring;

/// Which roles this process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Roles {
    pub api: bool,
    pub relay: bool,
    pub reaper: bool,
}

impl Roles {
    pub const ALL: Roles = Roles {
        api: true,
        relay: true,
        reaper: true,
    };
    pub const API: Roles = Roles {
        api: true,
        relay: false,
        reaper: false,
    };

    /// Parses `api,relay,reaper` (any subset, or `all`).
    pub fn parse(s: &str) -> Result<Roles, String> {
        let mut roles = Roles {
            api: false,
            relay: false,
            reaper: false,
        };
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part {
                "all" => roles = Roles::ALL,
                "api" => roles.api = true,
                "relay" => roles.relay = true,
                "reaper" => roles.reaper = true,
                other => return Err(format!("unknown role {other:?} (api, relay, reaper, all)")),
            }
        }
        if roles
            == (Roles {
                api: false,
                relay: false,
                reaper: false,
            })
        {
            return Err("no role given".into());
        }
        Ok(roles)
    }
}

/// The local profile's queue over the store's database, and the task that
/// forwards its arrival notifications (run it in the same shutdown scope).
pub fn local_queue(store: &Store, settings: &Settings) -> (Arc<PgQueue>, Arc<Notify>) {
    let arrivals = Arc::new(Notify::new());
    let queue = Arc::new(PgQueue::new(
        store.pool().clone(),
        settings.queue_max_receives,
        arrivals.clone(),
    ));
    (queue, arrivals)
}

/// The profile's queue and object store.
pub struct Adapters {
    /// SQS on the aws profile; `None` is the local Postgres queue.
    pub queue: Option<Arc<dyn Queue>>,
    pub objects: Objects,
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
    let Adapters { queue, objects } = adapters;
    let mut tasks = JoinSet::new();
    let queue = match queue {
        Some(q) => q,
        None => {
            let (local, arrivals) = local_queue(&store, &settings);
            tasks.spawn(PgQueue::listen(
                store.pool().clone(),
                arrivals,
                shutdown.clone(),
            ));
            local
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
    let served = match (roles.api, listener) {
        (true, Some(listener)) => {
            let (objects, local) = match objects {
                Objects::Store(s) => (s, None),
                Objects::LocalDir { dir, public_url } => {
                    let base = match public_url {
                        Some(url) => url,
                        None => format!("http://{}", listener.local_addr()?),
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
            let state = AppState::new(store, keys, settings, queue, objects, local);
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

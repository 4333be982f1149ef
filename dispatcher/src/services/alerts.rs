//! Alert routing and delivery (issue 13, milestone 6; ADR 0014).
//!
//! * The **router** role takes each ingested batch of a stream dataset that
//!   has routes, once: in one data-database transaction it records the
//!   batch in `alert_routed_batches` (its key makes a second router, or a
//!   second pass, skip it) and writes one `alert_deliveries` row per
//!   (event, destination) whose route's filter matches the event. An event
//!   is one row of the batch, `<batch id>-<line>`.
//! * The **delivery** role posts due deliveries to their webhook by the
//!   Standard Webhooks spec: `webhook-id` (the delivery's id, the same on
//!   every try and replay), `webhook-timestamp`, and `webhook-signature`
//!   (`v1,` + base64 HMAC-SHA256 of `id.timestamp.body` under the
//!   destination's secret). A delivery is leased while in flight, so one
//!   whose worker died is tried again once the lease passes (at least
//!   once). Failures retry with exponential backoff and jitter, or after
//!   the receiver's `Retry-After`; past the last try the delivery is
//!   `dead`, until `dispatcher admin alerts dead replay`.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use chrono::Utc;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::breaker::Breaker;
use crate::error::StoreError;
use crate::services::query::{self, Scalar};
use crate::settings::{backoff, Settings};
use crate::store::{RouteSpec, Store};

/// Builds `whsec_…`: 24 random bytes, base64.
pub fn new_secret() -> String {
    let bytes: [u8; 24] = rand::random();
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

/// The key of a `whsec_` secret, if it is one (24 to 64 bytes).
pub fn secret_key(secret: &str) -> Option<Vec<u8>> {
    let key = base64::engine::general_purpose::STANDARD
        .decode(secret.strip_prefix("whsec_")?)
        .ok()?;
    (24..=64).contains(&key.len()).then_some(key)
}

/// `webhook-signature` of a message: `v1,<base64 HMAC-SHA256>` over
/// `{id}.{timestamp}.{body}`.
pub fn sign(secret: &str, id: &str, timestamp: i64, body: &[u8]) -> Option<String> {
    let key = secret_key(secret)?;
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&key).ok()?;
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    Some(format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    ))
}

/// Checks a route's filter against its dataset's schema; the plan that
/// evaluates it.
pub fn matcher_plan(
    route_dataset: &str,
    columns: &[dispatcher_wire::Column],
    matcher: Option<&Value>,
) -> Result<query::Plan, crate::domain::Invalid> {
    let req = dispatcher_wire::QueryRequest {
        dataset: route_dataset.to_owned(),
        version: None,
        select: None,
        filter: matcher.cloned(),
        order_by: Vec::new(),
        limit: None,
    };
    let limits = query::QueryLimits {
        default_rows: 1,
        max_rows: 1,
        max_in: 1_000,
    };
    query::plan(&req, columns, &limits).map_err(|mut e| {
        e.field = e.field.replacen("where", "match", 1);
        e
    })
}

pub struct AlertRouter {
    store: Store,
    data: PgPool,
    settings: Arc<Settings>,
}

impl AlertRouter {
    pub fn new(store: Store, data: PgPool, settings: Arc<Settings>) -> Self {
        AlertRouter {
            store,
            data,
            settings,
        }
    }

    /// Routes every ingested batch not routed yet (up to a bound); how
    /// many batches it routed.
    pub async fn route_once(&self) -> Result<usize, StoreError> {
        let routes = self.store.alert_routes(None).await?;
        if routes.is_empty() {
            return Ok(0);
        }
        // Per dataset, its first route's creation: no batch ingested before
        // a route exists is ever routed to it (review M3), so the scan
        // starts there (index sink_batches_ingested_idx).
        let mut since: std::collections::BTreeMap<Uuid, chrono::DateTime<Utc>> = Default::default();
        for r in &routes {
            since
                .entry(r.dataset_id)
                .and_modify(|t| *t = (*t).min(r.created_at))
                .or_insert(r.created_at);
        }
        let (datasets, starts): (Vec<Uuid>, Vec<chrono::DateTime<Utc>>) = since.into_iter().unzip();
        let batches: Vec<(Uuid, Uuid, Uuid, chrono::DateTime<Utc>)> = sqlx::query!(
            "SELECT b.org_id, b.batch_id, b.dataset_id, b.ingested_at
               FROM unnest($1::uuid[], $3::timestamptz[]) AS s(dataset_id, since)
               JOIN sink_batches b ON b.dataset_id = s.dataset_id AND b.ingested_at >= s.since
              WHERE NOT EXISTS (SELECT 1 FROM alert_routed_batches r
                                 WHERE r.org_id = b.org_id AND r.batch_id = b.batch_id)
              ORDER BY b.ingested_at LIMIT $2",
            &datasets,
            i64::from(self.settings.reaper_batch),
            &starts,
        )
        .fetch_all(&self.data)
        .await?
        .into_iter()
        .map(|r| (r.org_id, r.batch_id, r.dataset_id, r.ingested_at))
        .collect();
        let mut routed = 0;
        for (org, batch, dataset, ingested_at) in batches {
            // A route sees the batches ingested after it was created.
            let mine: Vec<&RouteSpec> = routes
                .iter()
                .filter(|r| {
                    r.org_id == org && r.dataset_id == dataset && r.created_at <= ingested_at
                })
                .collect();
            if self.route_batch(org, batch, dataset, &mine).await? {
                routed += 1;
            }
        }
        Ok(routed)
    }

    /// One batch, in one transaction: the routed mark and its deliveries.
    async fn route_batch(
        &self,
        org: Uuid,
        batch: Uuid,
        dataset: Uuid,
        routes: &[&RouteSpec],
    ) -> Result<bool, StoreError> {
        let mut tx = self.data.begin().await?;
        // First the mark: a concurrent router waits here, then skips.
        let marked = sqlx::query!(
            "INSERT INTO alert_routed_batches (org_id, batch_id, events, deliveries)
             VALUES ($1, $2, 0, 0) ON CONFLICT DO NOTHING",
            org,
            batch,
        )
        .execute(&mut *tx)
        .await?;
        if marked.rows_affected() == 0 {
            return Ok(false);
        }
        let table = crate::services::sink::Sink::table_name(dataset);
        let rows: Vec<(i32, Value)> = sqlx::query_as(&format!(
            "SELECT _line, to_jsonb(t) - '_batch_id' - '_line' FROM {table} t
              WHERE _batch_id = $1 ORDER BY _line"
        ))
        .bind(batch)
        .fetch_all(&mut *tx)
        .await?;
        let plans: Vec<(&RouteSpec, Option<query::Plan>)> = routes
            .iter()
            .map(|r| {
                let plan = matcher_plan(&r.dataset, &r.columns, r.matcher.as_ref());
                if let Err(e) = &plan {
                    // The schema is fixed at creation, so this is not
                    // expected; the route is skipped, not the batch.
                    tracing::warn!(route = %r.id, error = %e, "a route's filter no longer fits its dataset");
                }
                (*r, plan.ok())
            })
            .collect();
        let mut deliveries = 0;
        let now = Utc::now();
        for (line, row) in &rows {
            let event_id = format!("{batch}-{line}");
            let mut sent_to: Vec<Uuid> = Vec::new();
            for (route, plan) in &plans {
                let Some(plan) = plan else { continue };
                let typed: Vec<Option<Scalar>> = plan
                    .columns
                    .iter()
                    .map(|c| Scalar::from_row(c.kind, &row[&c.name]))
                    .collect();
                if !plan.keeps(&typed) || sent_to.contains(&route.destination_id) {
                    continue;
                }
                sent_to.push(route.destination_id);
                let payload = json!({
                    "type": "alert.event",
                    "timestamp": now,
                    "data": {"event_id": event_id, "dataset": route.dataset,
                             "route": route.name, "event": row},
                });
                let done = sqlx::query!(
                    "INSERT INTO alert_deliveries (id, org_id, event_id, dataset_id, route_id,
                                                   destination_id, payload)
                     VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
                    Uuid::now_v7(),
                    org,
                    &event_id,
                    dataset,
                    route.id,
                    route.destination_id,
                    &payload,
                )
                .execute(&mut *tx)
                .await?;
                deliveries += done.rows_affected();
            }
        }
        sqlx::query!(
            "UPDATE alert_routed_batches SET events = $3, deliveries = $4
              WHERE org_id = $1 AND batch_id = $2",
            org,
            batch,
            i32::try_from(rows.len()).unwrap_or(i32::MAX),
            i32::try_from(deliveries).unwrap_or(i32::MAX),
        )
        .execute(&mut *tx)
        .await?;
        self.settings.failpoint("router_before_commit");
        tx.commit().await?;
        tracing::info!(%org, %batch, events = rows.len(), deliveries, "alert batch routed");
        Ok(true)
    }

    pub async fn run(self, shutdown: CancellationToken) {
        tracing::info!("alert router started");
        let mut tick = tokio::time::interval(self.settings.alert_poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {
                    let pass = self.route_once().await;
                    crate::metrics::role_pass("alert_router", &pass);
                    if let Err(e) = pass {
                        tracing::warn!(error = %e, "alert routing pass failed");
                    }
                }
            }
        }
        tracing::info!("alert router stopped");
    }
}

/// A delivery in hand.
struct Due {
    id: Uuid,
    destination_id: Uuid,
    payload: Value,
    tries: i32,
}

/// How one try ended.
enum Tried {
    Delivered(u16),
    Failed {
        status: Option<u16>,
        error: String,
        retry_after: Option<Duration>,
    },
    /// Retrying cannot help (the destination is gone or not allowed).
    Fatal(String),
    /// Not tried, or tried as the probe of an open breaker: the destination
    /// is down, which is no fault of this delivery, so the try is not spent.
    Deferred {
        retry_after: Duration,
        why: String,
    },
}

impl Tried {
    /// What the try says about the destination: `Some(why)` it is failing
    /// (unreachable, timed out, 5xx or 429), `None` it answered.
    fn destination_failure(&self) -> Option<String> {
        match self {
            Tried::Failed { status, error, .. } if status.is_none_or(|s| s >= 500 || s == 429) => {
                Some(error.clone())
            }
            _ => None,
        }
    }
}

pub struct AlertDelivery {
    store: Store,
    data: PgPool,
    settings: Arc<Settings>,
    /// Resolves through `guard` only, no proxy, no redirect.
    http: reqwest::Client,
    guard: crate::egress::Guard,
    /// One circuit breaker per destination, made on its first delivery.
    breakers: std::sync::Mutex<std::collections::HashMap<Uuid, Arc<Breaker>>>,
}

/// `Retry-After`: seconds, or an HTTP date.
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let v = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = chrono::DateTime::parse_from_rfc2822(v).ok()?;
    (at.with_timezone(&Utc) - Utc::now()).to_std().ok()
}

impl AlertDelivery {
    pub fn new(store: Store, data: PgPool, settings: Arc<Settings>) -> Self {
        let guard = crate::egress::Guard::new(&settings.alert_allow_hosts);
        let http = guard.client(settings.alert_delivery_timeout);
        AlertDelivery {
            store,
            data,
            settings,
            http,
            guard,
            breakers: Default::default(),
        }
    }

    fn breaker(&self, destination: Uuid) -> Arc<Breaker> {
        let mut all = self.breakers.lock().unwrap_or_else(|p| p.into_inner());
        all.entry(destination)
            .or_insert_with(|| {
                Breaker::new(
                    "webhook",
                    format!("webhook:{destination}"),
                    self.settings.breaker,
                )
            })
            .clone()
    }

    /// Destinations whose breaker is open and not yet due for its probe:
    /// their deliveries are not taken at all.
    fn refusing(&self) -> Vec<Uuid> {
        let all = self.breakers.lock().unwrap_or_else(|p| p.into_inner());
        all.iter()
            .filter(|(_, b)| b.refusing())
            .map(|(id, _)| *id)
            .collect()
    }

    /// Takes due deliveries (leasing them) and tries each once, through
    /// its destination's breaker; how many were taken.
    pub async fn deliver_once(&self) -> Result<usize, StoreError> {
        let lease = self.settings.alert_delivery_lease.as_secs_f64();
        let refusing = self.refusing();
        let due: Vec<Due> = sqlx::query_as!(
            Due,
            "UPDATE alert_deliveries d
                SET lease_until = now() + $1 * interval '1 second', tries = d.tries + 1
               FROM (SELECT id FROM alert_deliveries
                      WHERE state = 'pending' AND next_attempt_at <= now()
                        AND (lease_until IS NULL OR lease_until <= now())
                        AND NOT (destination_id = ANY($3))
                      ORDER BY next_attempt_at LIMIT $2
                      FOR UPDATE SKIP LOCKED) due
              WHERE d.id = due.id
             RETURNING d.id, d.destination_id, d.payload, d.tries",
            lease,
            i64::try_from(self.settings.alert_delivery_concurrency).unwrap_or(8),
            &refusing,
        )
        .fetch_all(&self.data)
        .await?;
        let n = due.len();
        let mut running = tokio::task::JoinSet::new();
        for d in due {
            let (store, http, guard) = (self.store.clone(), self.http.clone(), self.guard.clone());
            let breaker = self.breaker(d.destination_id);
            running.spawn(async move {
                let tried = through(&breaker, try_once(&store, &http, &guard, &d)).await;
                (d, tried)
            });
        }
        while let Some(done) = running.join_next().await {
            let Ok((d, tried)) = done else { continue };
            self.record(&d, tried).await?;
        }
        Ok(n)
    }

    async fn record(&self, d: &Due, tried: Tried) -> Result<(), StoreError> {
        match tried {
            Tried::Delivered(status) => {
                sqlx::query!(
                    "UPDATE alert_deliveries SET state = 'delivered', delivered_at = now(),
                            last_status = $2, last_error = NULL, lease_until = NULL
                      WHERE id = $1 AND state = 'pending'",
                    d.id,
                    i32::from(status),
                )
                .execute(&self.data)
                .await?;
                metrics::counter!(crate::metrics::ALERT_DELIVERIES, "result" => "delivered")
                    .increment(1);
                tracing::info!(delivery = %d.id, tries = d.tries, "alert delivered");
            }
            Tried::Failed {
                status,
                error,
                retry_after,
            } => {
                let tries = u32::try_from(d.tries).unwrap_or(u32::MAX);
                let dead = tries >= self.settings.alert_delivery_max_tries;
                let delay = retry_after
                    .map(|r| r.min(self.settings.alert_retry_cap))
                    .unwrap_or_else(|| {
                        backoff(
                            self.settings.alert_retry_base,
                            self.settings.alert_retry_cap,
                            tries,
                            rand::random::<f64>(),
                        )
                    });
                sqlx::query!(
                    "UPDATE alert_deliveries
                        SET state = CASE WHEN $5 THEN 'dead' ELSE 'pending' END,
                            next_attempt_at = now() + $4 * interval '1 second',
                            last_status = $2, last_error = $3, lease_until = NULL
                      WHERE id = $1 AND state = 'pending'",
                    d.id,
                    status.map(i32::from),
                    &error,
                    delay.as_secs_f64(),
                    dead,
                )
                .execute(&self.data)
                .await?;
                let result = if dead { "dead" } else { "retry" };
                metrics::counter!(crate::metrics::ALERT_DELIVERIES, "result" => result)
                    .increment(1);
                tracing::warn!(delivery = %d.id, tries, ?status, error, dead, "alert delivery failed");
            }
            Tried::Deferred { retry_after, why } => {
                sqlx::query!(
                    "UPDATE alert_deliveries
                        SET tries = greatest(tries - 1, 0), lease_until = NULL, last_error = $2,
                            next_attempt_at = now() + $3 * interval '1 second'
                      WHERE id = $1 AND state = 'pending'",
                    d.id,
                    &why,
                    retry_after.as_secs_f64(),
                )
                .execute(&self.data)
                .await?;
                metrics::counter!(crate::metrics::ALERT_DELIVERIES, "result" => "deferred")
                    .increment(1);
                tracing::debug!(delivery = %d.id, why, "alert delivery deferred");
            }
            Tried::Fatal(error) => {
                sqlx::query!(
                    "UPDATE alert_deliveries SET state = 'dead', last_error = $2, lease_until = NULL
                      WHERE id = $1 AND state = 'pending'",
                    d.id,
                    &error,
                )
                .execute(&self.data)
                .await?;
                metrics::counter!(crate::metrics::ALERT_DELIVERIES, "result" => "dead")
                    .increment(1);
                tracing::warn!(delivery = %d.id, error, "alert delivery dead");
            }
        }
        Ok(())
    }

    pub async fn run(self, shutdown: CancellationToken) {
        tracing::info!("alert delivery started");
        loop {
            let worked = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = self.deliver_once() => {
                    crate::metrics::role_pass("alert_delivery", &r);
                    match r {
                        Ok(n) => n > 0,
                        Err(e) => {
                            tracing::warn!(error = %e, "alert delivery pass failed");
                            false
                        }
                    }
                }
            };
            if !worked {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(self.settings.alert_poll) => {}
                }
            }
        }
        tracing::info!("alert delivery stopped");
    }
}

/// One try through the destination's breaker: not made while it is open;
/// a failed probe is deferred, not spent.
async fn through(breaker: &Breaker, attempt: impl std::future::Future<Output = Tried>) -> Tried {
    let permit = match breaker.admit() {
        Ok(p) => p,
        Err(open) => {
            return Tried::Deferred {
                retry_after: open.retry_after,
                why: open.to_string(),
            }
        }
    };
    let probe = permit.is_probe();
    let tried = attempt.await;
    if let Tried::Fatal(_) | Tried::Deferred { .. } = tried {
        permit.neutral();
        return tried;
    }
    match tried.destination_failure() {
        None => {
            permit.success();
            tried
        }
        Some(why) => {
            permit.failure(why.clone());
            match probe {
                true => Tried::Deferred {
                    retry_after: breaker.retry_after(),
                    why: format!("the destination's breaker probe failed: {why}"),
                },
                false => tried,
            }
        }
    }
}

async fn try_once(
    store: &Store,
    http: &reqwest::Client,
    guard: &crate::egress::Guard,
    d: &Due,
) -> Tried {
    let dest = match store.alert_destination(d.destination_id).await {
        Ok(Some(dest)) => dest,
        Ok(None) => return Tried::Fatal("the destination was deleted".into()),
        // Our database, not the receiver: nothing was sent, so no try is
        // spent and the destination's breaker learns nothing.
        Err(e) => {
            return Tried::Deferred {
                retry_after: Duration::from_secs(1),
                why: format!("reading the destination: {e}"),
            }
        }
    };
    let url = match reqwest::Url::parse(&dest.url) {
        Ok(u) => u,
        Err(_) => return Tried::Fatal(format!("{:?} is not a URL", dest.url)),
    };
    // An IP literal is vetted here; a name is vetted by the client's
    // resolver, on the addresses it then connects to.
    if let Err(refused) = guard.check_url(&url) {
        return Tried::Fatal(refused.to_string());
    }
    let body = serde_json::to_vec(&d.payload).unwrap_or_default();
    let id = d.id.to_string();
    let ts = Utc::now().timestamp();
    let Some(signature) = sign(&dest.secret, &id, ts, &body) else {
        return Tried::Fatal("the destination's secret is not a whsec_ key".into());
    };
    let sent = http
        .post(url)
        .header("content-type", "application/json")
        .header("webhook-id", &id)
        .header("webhook-timestamp", ts.to_string())
        .header("webhook-signature", signature)
        .body(body)
        .send()
        .await;
    match sent {
        Ok(r) if r.status().is_success() => Tried::Delivered(r.status().as_u16()),
        Ok(r) => Tried::Failed {
            status: Some(r.status().as_u16()),
            error: format!("the receiver answered {}", r.status()),
            retry_after: retry_after(r.headers()),
        },
        Err(e) => match crate::egress::Guard::refusal(&e) {
            Some(refused) => Tried::Fatal(refused.to_string()),
            None => Tried::Failed {
                status: None,
                error: sending_error(e),
                retry_after: None,
            },
        },
    }
}

/// Why a send failed, without the URL (its path often holds a token, and
/// members read `last_error`; review M11), with the causes below it.
fn sending_error(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut out = format!("sending: {e}");
    let mut cause = std::error::Error::source(&e);
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

struct DeliveryRow {
    id: Uuid,
    org_id: Uuid,
    event_id: String,
    route_id: Uuid,
    destination_id: Uuid,
    state: String,
    tries: i32,
    next_attempt_at: chrono::DateTime<Utc>,
    last_status: Option<i32>,
    last_error: Option<String>,
    delivered_at: Option<chrono::DateTime<Utc>>,
}

async fn views(
    store: &Store,
    rows: Vec<DeliveryRow>,
) -> Result<Vec<dispatcher_wire::DeliveryView>, StoreError> {
    let mut orgs: Vec<Uuid> = rows.iter().map(|r| r.org_id).collect();
    orgs.sort();
    orgs.dedup();
    let mut routes = std::collections::HashMap::new();
    let mut destinations = std::collections::HashMap::new();
    for org in orgs {
        for r in store.alert_routes(Some(org)).await? {
            routes.insert(r.id, r.name);
        }
        for d in store.alert_destinations(org).await? {
            destinations.insert(d.id, d.name);
        }
    }
    let gone = || "(deleted)".to_owned();
    Ok(rows
        .into_iter()
        .map(|r| dispatcher_wire::DeliveryView {
            delivery_id: r.id,
            event_id: r.event_id,
            route: routes.get(&r.route_id).cloned().unwrap_or_else(gone),
            destination: destinations
                .get(&r.destination_id)
                .cloned()
                .unwrap_or_else(gone),
            next_attempt_at: (r.state == "pending").then_some(r.next_attempt_at),
            state: r.state,
            tries: u32::try_from(r.tries).unwrap_or(0),
            last_status: r.last_status.and_then(|s| u16::try_from(s).ok()),
            last_error: r.last_error,
            delivered_at: r.delivered_at,
        })
        .collect())
}

/// The deliveries of one event of the org.
pub async fn event_deliveries(
    store: &Store,
    data: &PgPool,
    org: Uuid,
    event_id: &str,
) -> Result<Vec<dispatcher_wire::DeliveryView>, StoreError> {
    let rows = sqlx::query_as!(
        DeliveryRow,
        "SELECT id, org_id, event_id, route_id, destination_id, state, tries,
                next_attempt_at, last_status, last_error, delivered_at
           FROM alert_deliveries
          WHERE org_id = $1 AND event_id = $2 ORDER BY created_at",
        org,
        event_id,
    )
    .fetch_all(data)
    .await?;
    views(store, rows).await
}

/// Dead deliveries, oldest first (of one org, or of all).
pub async fn dead_deliveries(
    store: &Store,
    data: &PgPool,
    org: Option<Uuid>,
    limit: u32,
) -> Result<Vec<dispatcher_wire::DeliveryView>, StoreError> {
    let rows = sqlx::query_as!(
        DeliveryRow,
        "SELECT id, org_id, event_id, route_id, destination_id, state, tries,
                next_attempt_at, last_status, last_error, delivered_at
           FROM alert_deliveries
          WHERE state = 'dead' AND ($1::uuid IS NULL OR org_id = $1)
          ORDER BY created_at LIMIT $2",
        org,
        i64::from(limit),
    )
    .fetch_all(data)
    .await?;
    views(store, rows).await
}

/// Makes dead deliveries (the given ones, or all of the org's, or all)
/// pending again with fresh tries; they keep their id, so the receiver
/// sees the same `webhook-id`. How many (with `dry_run`, how many would).
pub async fn replay_dead(
    data: &PgPool,
    org: Option<Uuid>,
    ids: &[Uuid],
    dry_run: bool,
) -> Result<u64, StoreError> {
    if dry_run {
        let n = sqlx::query_scalar!(
            r#"SELECT count(*) AS "n!" FROM alert_deliveries
                WHERE state = 'dead' AND ($1::uuid IS NULL OR org_id = $1)
                  AND (cardinality($2::uuid[]) = 0 OR id = ANY($2))"#,
            org,
            ids,
        )
        .fetch_one(data)
        .await?;
        return Ok(u64::try_from(n).unwrap_or(0));
    }
    replay_dead_reporting(data, org, ids, |_| {}).await
}

/// Replays in batches of `REPLAY_BATCH`, each its own short transaction
/// (a million dead deliveries hold no lock for minutes), showing
/// `progress` the count so far after each.
pub async fn replay_dead_reporting(
    data: &PgPool,
    org: Option<Uuid>,
    ids: &[Uuid],
    mut progress: impl FnMut(u64),
) -> Result<u64, StoreError> {
    const REPLAY_BATCH: i64 = 1_000;
    let mut total = 0u64;
    loop {
        let done = sqlx::query!(
            "UPDATE alert_deliveries
                SET state = 'pending', tries = 0, next_attempt_at = now(), lease_until = NULL
              WHERE id IN (SELECT id FROM alert_deliveries
                            WHERE state = 'dead' AND ($1::uuid IS NULL OR org_id = $1)
                              AND (cardinality($2::uuid[]) = 0 OR id = ANY($2))
                            LIMIT $3
                            FOR UPDATE SKIP LOCKED)",
            org,
            ids,
            REPLAY_BATCH,
        )
        .execute(data)
        .await?
        .rows_affected();
        total += done;
        if done == 0 {
            return Ok(total);
        }
        progress(total);
        if done < REPLAY_BATCH as u64 {
            return Ok(total);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_follow_standard_webhooks() {
        // The example of the Standard Webhooks specification.
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let body = br#"{"test": 2432232314}"#;
        let sig = sign(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body).unwrap();
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        assert!(sign("nope", "x", 1, b"").is_none());
        assert!(secret_key(&new_secret()).is_some());
    }
}

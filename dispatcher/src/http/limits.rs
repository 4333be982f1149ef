//! Resource limits of the API (OWASP API4, invariant 12): request rates per
//! credential and per org (`governor`'s GCRA limiters, keyed), a bound on
//! requests served at once and on queue long-polls held at once, and a
//! timeout on every request. Past a limit the caller gets the contract's
//! error with `Retry-After`; nothing is written.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use uuid::Uuid;

use super::error::ApiError;
use super::AppState;
use crate::settings::{Rate, Settings};

pub struct Limits {
    worker: DefaultKeyedRateLimiter<String>,
    task: DefaultKeyedRateLimiter<Uuid>,
    user: DefaultKeyedRateLimiter<Uuid>,
    org: DefaultKeyedRateLimiter<Uuid>,
    clock: DefaultClock,
    requests: Arc<Semaphore>,
    long_polls: Arc<Semaphore>,
    bundle_pushes: Arc<Semaphore>,
    queries: Arc<Semaphore>,
    /// Query slots per org, made on first use and forgotten when idle.
    org_queries: std::sync::Mutex<HashMap<Uuid, Arc<Semaphore>>>,
    org_query_slots: usize,
    timeout: Duration,
}

/// The slots one running query holds: its org's and the global one.
pub struct QuerySlot {
    _org: OwnedSemaphorePermit,
    _all: OwnedSemaphorePermit,
}

fn quota(rate: Rate) -> Quota {
    let per_second = NonZeroU32::new(rate.per_second).unwrap_or(NonZeroU32::MIN);
    let burst = NonZeroU32::new(rate.burst.max(rate.per_second)).unwrap_or(per_second);
    Quota::per_second(per_second).allow_burst(burst)
}

impl Limits {
    pub fn new(settings: &Settings) -> Self {
        Limits {
            worker: RateLimiter::keyed(quota(settings.rate_per_worker)),
            task: RateLimiter::keyed(quota(settings.rate_per_task)),
            user: RateLimiter::keyed(quota(settings.rate_per_user)),
            org: RateLimiter::keyed(quota(settings.rate_per_org)),
            clock: DefaultClock::default(),
            requests: Arc::new(Semaphore::new(settings.max_concurrent_requests.max(1))),
            long_polls: Arc::new(Semaphore::new(settings.max_concurrent_long_polls.max(1))),
            bundle_pushes: Arc::new(Semaphore::new(settings.bundle_max_concurrent_pushes.max(1))),
            queries: Arc::new(Semaphore::new(settings.query_max_concurrent.max(1))),
            org_queries: std::sync::Mutex::new(HashMap::new()),
            org_query_slots: settings.query_max_concurrent_per_org.max(1),
            timeout: settings.request_timeout,
        }
    }

    fn check<K: std::hash::Hash + Eq + Clone>(
        &self,
        limiter: &DefaultKeyedRateLimiter<K>,
        key: &K,
        what: &'static str,
    ) -> Result<(), ApiError> {
        limiter.check_key(key).map_err(|not_until| {
            let scope = match what {
                "worker credential" => "worker",
                other => other,
            };
            metrics::counter!(crate::metrics::RATE_LIMITED, "scope" => scope).increment(1);
            let wait = not_until.wait_time_from(self.clock.now());
            ApiError::rate_limited(
                "rate_limited",
                format!("too many requests for this {what}; retry later"),
                wait,
            )
        })
    }

    /// Admits a request made with a worker credential.
    pub fn admit_worker(&self, worker: &str) -> Result<(), ApiError> {
        self.check(&self.worker, &worker.to_owned(), "worker credential")
    }

    /// Admits a request made with a capability token of `task` in `org`.
    pub fn admit_task(&self, task: Uuid, org: Uuid) -> Result<(), ApiError> {
        self.check(&self.task, &task, "task")?;
        self.check(&self.org, &org, "org")
    }

    /// Admits a request made with a user token acting in `org`.
    pub fn admit_user(&self, user: Uuid, org: Uuid) -> Result<(), ApiError> {
        self.check(&self.user, &user, "user")?;
        self.check(&self.org, &org, "org")
    }

    /// A long-poll's `wait_seconds` (absent: no wait), or `400` past the
    /// longest wait `settings` allow.
    pub fn long_poll_wait(
        settings: &crate::settings::Settings,
        wait_seconds: Option<u32>,
    ) -> Result<Duration, ApiError> {
        let wait = Duration::from_secs(u64::from(wait_seconds.unwrap_or(0)));
        if wait > settings.queue_max_wait {
            return Err(ApiError::invalid(
                "wait_seconds",
                format!("must be at most {}", settings.queue_max_wait.as_secs()),
            ));
        }
        Ok(wait)
    }

    /// A slot for one queue long-poll, or `429 overloaded`.
    pub fn long_poll(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        self.long_polls.clone().try_acquire_owned().map_err(|_| {
            ApiError::rate_limited(
                "overloaded",
                "too many long-polls are waiting; retry later",
                Duration::from_secs(1),
            )
        })
    }

    /// A slot for one bundle upload (its body in memory and its check), or
    /// `429 overloaded`: what bundle pushes hold at once is this many
    /// archives of at most `bundle_max_bytes`.
    pub fn bundle_push(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        self.bundle_pushes.clone().try_acquire_owned().map_err(|_| {
            ApiError::rate_limited(
                "overloaded",
                "too many bundle uploads are in progress; retry later",
                Duration::from_secs(1),
            )
        })
    }

    /// A slot for one query of `org`, or `429 overloaded` when the org
    /// already runs its share (review M4: a few viewers, or a task with
    /// `reads`, must not take every core, the memory or the data database).
    pub fn query(&self, org: Uuid) -> Result<QuerySlot, ApiError> {
        let busy = |what: &str| {
            ApiError::rate_limited(
                "overloaded",
                format!("{what}; retry later"),
                Duration::from_secs(1),
            )
        };
        let org_slots = {
            let mut map = self.org_queries.lock().unwrap_or_else(|p| p.into_inner());
            map.entry(org)
                .or_insert_with(|| Arc::new(Semaphore::new(self.org_query_slots)))
                .clone()
        };
        let own = org_slots
            .try_acquire_owned()
            .map_err(|_| busy("this org already runs as many queries as it may at once"))?;
        let all = self
            .queries
            .clone()
            .try_acquire_owned()
            .map_err(|_| busy("too many queries are running"))?;
        Ok(QuerySlot {
            _org: own,
            _all: all,
        })
    }

    /// Forgets keys that have not been limited lately (their state is
    /// back to full), so the maps do not grow with every task ever seen.
    pub fn prune(&self) {
        for l in [&self.task, &self.user, &self.org] {
            l.retain_recent();
            l.shrink_to_fit();
        }
        self.worker.retain_recent();
        self.worker.shrink_to_fit();
        // An org's query slots are forgotten when none is held.
        let mut map = self.org_queries.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, s| Arc::strong_count(s) > 1 || s.available_permits() < self.org_query_slots);
    }
}

/// Middleware on every route but health: a bound on requests served at
/// once (`429 overloaded` past it) and a timeout (`503 unavailable`).
pub async fn bound(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let limits = &state.limits;
    let Ok(_permit) = limits.requests.clone().try_acquire_owned() else {
        return ApiError::rate_limited(
            "overloaded",
            "the dispatcher is serving as many requests as it may; retry later",
            Duration::from_secs(1),
        )
        .into_response();
    };
    match tokio::time::timeout(limits.timeout, next.run(req)).await {
        Ok(response) => response,
        Err(_) => ApiError::unavailable(format!(
            "the request did not finish within {} s; it may or may not have taken effect \
             (worker calls are safe to replay)",
            limits.timeout.as_secs()
        ))
        .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_are_bounded_per_org_and_in_all_and_one_orgs_share_leaves_room_for_another() {
        let limits = Limits::new(&Settings {
            query_max_concurrent_per_org: 2,
            query_max_concurrent: 3,
            ..Settings::default()
        });
        let (a, b, c) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let a1 = limits.query(a).unwrap();
        let _a2 = limits.query(a).unwrap();
        let refused = limits.query(a).err().expect("a third query of one org");
        assert_eq!(refused.status, axum::http::StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(refused.code, "overloaded");
        assert_eq!(refused.retry_after_secs, Some(1));
        // Another org still runs one; then the global bound holds.
        let _b1 = limits.query(b).unwrap();
        assert_eq!(
            limits.query(c).err().expect("past the global bound").code,
            "overloaded"
        );
        // A finished query gives its slot back.
        drop(a1);
        let _a3 = limits.query(a).unwrap();
        drop(_b1);
        limits.prune();
        assert!(limits.org_queries.lock().unwrap().contains_key(&a));
        assert!(
            !limits.org_queries.lock().unwrap().contains_key(&b),
            "an idle org is forgotten"
        );
    }
}

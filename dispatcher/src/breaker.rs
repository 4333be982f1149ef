//! Circuit breakers around what the dispatcher calls over the network and
//! can do nothing about: SQS, S3, and each webhook destination (issue 26,
//! ADR 0024).
//!
//! A breaker is **closed** while calls work. After
//! [`BreakerConfig::failures`] failures in a row it **opens**: for
//! [`BreakerConfig::open_for`] every call fails at once with [`Open`]
//! (which says how long is left), without touching the network. Then it
//! is **half-open**: one call, the probe, goes through; its success closes
//! the breaker, its failure opens it again for another `open_for`. Calls
//! that arrive while the probe is out fail fast too.
//!
//! Only the dependency's own failures count (unreachable, timed out, a
//! 5xx): an answer such as "no such key" is the dependency working. What
//! fails fast decides what to do: an HTTP caller answers `503` with
//! `Retry-After`, a background role defers its work without spending its
//! tries.
//!
//! Each breaker belongs to the adapter that owns it (two dispatchers in one
//! test process never share one). Every live breaker is also listed in a
//! process-wide registry of weak references, which the health detail and
//! the scrape read (`crate::metrics`; this module records nothing itself,
//! so it sits in the base layer and settings can name its config).

use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

/// When a breaker opens and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Failures in a row that open the breaker.
    pub failures: u32,
    /// How long an open breaker fails calls fast before its probe.
    pub open_for: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            failures: 5,
            open_for: Duration::from_secs(30),
        }
    }
}

/// A call refused because the breaker is open.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{name} is failing ({failures} failures in a row, last: {last_error}); its circuit is open, retry in {} s", retry_after.as_secs_f64().ceil())]
pub struct Open {
    pub name: String,
    pub failures: u32,
    pub last_error: String,
    /// Until the next probe may go through.
    pub retry_after: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed,
    Open,
    HalfOpen,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half_open",
        }
    }
}

#[derive(Debug)]
struct Inner {
    state: State,
    /// Failures in a row (reset by a success).
    failures: u32,
    /// While open: when the probe may go.
    until: Option<Instant>,
    opened_at: Option<chrono::DateTime<chrono::Utc>>,
    last_error: Option<String>,
    /// Times it opened (a failed probe counts again).
    opened: u64,
    /// Calls it failed fast.
    rejected: u64,
}

#[derive(Debug)]
pub struct Breaker {
    name: String,
    kind: &'static str,
    cfg: BreakerConfig,
    inner: Mutex<Inner>,
}

/// The right to make one call; say how it went with [`Permit::record`].
/// A probe's permit dropped unrecorded (its call was cancelled) lets the
/// next call probe.
#[must_use]
pub struct Permit<'a> {
    breaker: &'a Breaker,
    probe: bool,
    recorded: bool,
}

/// What the health detail shows of one breaker.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BreakerView {
    pub name: String,
    pub kind: &'static str,
    pub state: &'static str,
    pub failures_in_a_row: u32,
    pub opened_at: Option<chrono::DateTime<chrono::Utc>>,
    pub retry_after_seconds: Option<f64>,
    pub last_error: Option<String>,
    pub times_opened: u64,
    pub calls_failed_fast: u64,
}

static REGISTRY: Mutex<Vec<Weak<Breaker>>> = Mutex::new(Vec::new());

impl Breaker {
    /// A closed breaker, listed in the registry. `kind` is the metric
    /// label (`sqs`, `s3`, `webhook`); `name` says which one.
    pub fn new(kind: &'static str, name: impl Into<String>, cfg: BreakerConfig) -> Arc<Self> {
        let b = Arc::new(Breaker {
            name: name.into(),
            kind,
            cfg: BreakerConfig {
                failures: cfg.failures.max(1),
                open_for: cfg.open_for,
            },
            inner: Mutex::new(Inner {
                state: State::Closed,
                failures: 0,
                until: None,
                opened_at: None,
                last_error: None,
                opened: 0,
                rejected: 0,
            }),
        });
        let mut all = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
        all.retain(|w| w.strong_count() > 0);
        all.push(Arc::downgrade(&b));
        b
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn state(&self) -> State {
        self.lock().state
    }

    /// Whether calls now fail fast (open, and the probe not yet due).
    pub fn refusing(&self) -> bool {
        let s = self.lock();
        s.state == State::Open && s.until.is_some_and(|u| Instant::now() < u)
    }

    /// Until the next probe (zero unless open).
    pub fn retry_after(&self) -> Duration {
        let s = self.lock();
        match (s.state, s.until) {
            (State::Open, Some(u)) => u.saturating_duration_since(Instant::now()),
            _ => Duration::ZERO,
        }
    }

    /// Whether a call may go now; if not, how long until one may.
    pub fn admit(&self) -> Result<Permit<'_>, Open> {
        let mut s = self.lock();
        let now = Instant::now();
        let wait = match s.state {
            State::Closed => None,
            State::Open if s.until.is_some_and(|u| now >= u) => {
                s.state = State::HalfOpen;
                return Ok(Permit {
                    breaker: self,
                    probe: true,
                    recorded: false,
                });
            }
            State::Open => Some(s.until.map_or(Duration::ZERO, |u| u - now)),
            // The probe is out: its answer comes within a call's timeout.
            State::HalfOpen => Some(Duration::from_secs(1)),
        };
        match wait {
            None => Ok(Permit {
                breaker: self,
                probe: false,
                recorded: false,
            }),
            Some(retry_after) => {
                s.rejected += 1;
                Err(Open {
                    name: self.name.clone(),
                    failures: s.failures,
                    last_error: s.last_error.clone().unwrap_or_default(),
                    retry_after,
                })
            }
        }
    }

    /// Runs `call` through the breaker: refused at once while open; its
    /// result counts as a failure when `failed` says so.
    pub async fn call<T, E, F>(
        &self,
        call: F,
        failed: impl Fn(&E) -> Option<String>,
    ) -> Result<Result<T, E>, Open>
    where
        F: std::future::Future<Output = Result<T, E>>,
    {
        let permit = self.admit()?;
        let out = call.await;
        match out.as_ref().err().and_then(&failed) {
            Some(why) => permit.failure(why),
            None => permit.success(),
        }
        Ok(out)
    }

    fn on_success(&self) {
        let mut s = self.lock();
        if s.state != State::Closed {
            tracing::info!(
                breaker = self.name,
                "circuit closed: the dependency answers again"
            );
        }
        s.state = State::Closed;
        s.failures = 0;
        s.until = None;
        s.opened_at = None;
    }

    fn on_failure(&self, why: String, probe: bool) {
        let mut s = self.lock();
        s.failures = s.failures.saturating_add(1);
        s.last_error = Some(why);
        let open = probe || (s.state == State::Closed && s.failures >= self.cfg.failures);
        if open {
            s.state = State::Open;
            s.until = Some(Instant::now() + self.cfg.open_for);
            s.opened_at.get_or_insert_with(chrono::Utc::now);
            s.opened += 1;
            tracing::warn!(
                breaker = self.name,
                failures = s.failures,
                open_for_seconds = self.cfg.open_for.as_secs_f64(),
                last_error = s.last_error.as_deref().unwrap_or_default(),
                "circuit open: calls fail fast until the probe"
            );
        }
    }

    fn view(&self) -> BreakerView {
        let s = self.lock();
        let now = Instant::now();
        BreakerView {
            name: self.name.clone(),
            kind: self.kind,
            state: s.state.as_str(),
            failures_in_a_row: s.failures,
            opened_at: s.opened_at,
            retry_after_seconds: (s.state == State::Open)
                .then(|| s.until.map_or(0.0, |u| (u.max(now) - now).as_secs_f64())),
            last_error: s.last_error.clone(),
            times_opened: s.opened,
            calls_failed_fast: s.rejected,
        }
    }
}

impl Permit<'_> {
    /// Whether this call is the probe of a half-open breaker.
    pub fn is_probe(&self) -> bool {
        self.probe
    }

    pub fn success(mut self) {
        self.recorded = true;
        self.breaker.on_success();
    }

    pub fn failure(mut self, why: impl Into<String>) {
        self.recorded = true;
        self.breaker.on_failure(why.into(), self.probe);
    }

    /// Records the call as neither (it was refused for a reason that says
    /// nothing about the dependency).
    pub fn neutral(mut self) {
        self.recorded = true;
        if self.probe {
            self.reopen_now();
        }
    }

    fn reopen_now(&self) {
        let mut s = self.breaker.lock();
        if s.state == State::HalfOpen {
            s.state = State::Open;
            s.until = Some(Instant::now());
        }
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if self.probe && !self.recorded {
            self.reopen_now();
        }
    }
}

/// Every live breaker of this process, by name.
pub fn all() -> Vec<BreakerView> {
    let live: Vec<Arc<Breaker>> = REGISTRY
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter_map(Weak::upgrade)
        .collect();
    let mut views: Vec<BreakerView> = live.iter().map(|b| b.view()).collect();
    views.sort_by(|a, b| a.name.cmp(&b.name));
    views
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(open_ms: u64) -> BreakerConfig {
        BreakerConfig {
            failures: 3,
            open_for: Duration::from_millis(open_ms),
        }
    }

    #[test]
    fn a_breaker_opens_after_its_failures_in_a_row_and_a_success_between_resets_the_count() {
        let b = Breaker::new("s3", "unit-count", cfg(60_000));
        b.admit().unwrap().failure("a");
        b.admit().unwrap().failure("b");
        b.admit().unwrap().success();
        b.admit().unwrap().failure("c");
        b.admit().unwrap().failure("d");
        assert_eq!(b.state(), State::Closed);
        b.admit().unwrap().failure("e");
        assert_eq!(b.state(), State::Open);
        let open = b.admit().err().unwrap();
        assert_eq!(open.failures, 3);
        assert_eq!(open.last_error, "e");
        assert!(open.retry_after > Duration::from_secs(59));
        assert!(open.to_string().contains("circuit is open"), "{open}");
        let view = all().into_iter().find(|v| v.name == "unit-count").unwrap();
        assert_eq!(
            (view.state, view.times_opened, view.calls_failed_fast),
            ("open", 1, 1)
        );
    }

    #[test]
    fn after_its_open_time_one_probe_goes_and_its_answer_closes_or_reopens_the_breaker() {
        let b = Breaker::new("webhook", "unit-probe", cfg(30));
        for _ in 0..3 {
            b.admit().unwrap().failure("down");
        }
        assert!(b.admit().is_err());
        std::thread::sleep(Duration::from_millis(40));
        let probe = b.admit().unwrap();
        assert_eq!(b.state(), State::HalfOpen);
        assert!(b.admit().is_err(), "a second call waits for the probe");
        probe.failure("still down");
        assert_eq!(b.state(), State::Open);
        assert!(b.admit().is_err());
        std::thread::sleep(Duration::from_millis(40));
        b.admit().unwrap().success();
        assert_eq!(b.state(), State::Closed);
        b.admit().unwrap().failure("once");
        assert_eq!(b.state(), State::Closed, "the count starts again");
    }

    #[test]
    fn a_probe_whose_call_is_cancelled_lets_the_next_call_probe() {
        let b = Breaker::new("sqs", "unit-cancel", cfg(10));
        for _ in 0..3 {
            b.admit().unwrap().failure("down");
        }
        std::thread::sleep(Duration::from_millis(20));
        drop(b.admit().unwrap());
        assert_eq!(b.state(), State::Open);
        b.admit().unwrap().success();
        assert_eq!(b.state(), State::Closed);
    }
}

//! Every tunable number of the dispatcher, with its default, in one place.
//!
//! `docs/standards/operations.md` explains each default; keep the two in step.

use std::time::Duration;

/// A request rate: a sustained number per second and the burst allowed
/// above it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub per_second: u32,
    pub burst: u32,
}

impl std::str::FromStr for Rate {
    type Err = String;

    /// `PER_SECOND` or `PER_SECOND,BURST` (the burst defaults to twice the
    /// rate).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (rate, burst) = match s.split_once(',') {
            Some((r, b)) => (r, Some(b)),
            None => (s, None),
        };
        let per_second: u32 = rate
            .trim()
            .parse()
            .map_err(|e| format!("{rate:?}: {e} (expected PER_SECOND[,BURST])"))?;
        let burst = match burst {
            Some(b) => b.trim().parse().map_err(|e| format!("{b:?}: {e}"))?,
            None => per_second.saturating_mul(2),
        };
        if per_second == 0 || burst < per_second {
            return Err(format!(
                "{s:?}: the rate must be at least 1 and the burst at least the rate"
            ));
        }
        Ok(Rate { per_second, burst })
    }
}

/// How workers learn that a task became ready (ADR 0017).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wakeups {
    /// The local profile's default: no wake-up messages. A transaction that
    /// makes tasks ready sends `NOTIFY tasks_ready`; workers long-poll
    /// `task-claim-batch` with `max_tasks`, and the dispatcher answers the
    /// poll when a notification (or a retry's backoff) says work is due.
    Notify,
    /// One `{"task_id"}` message per ready task, written to the outbox and
    /// published by the relay (SQS on the aws profile; the Postgres queue
    /// served at `/internal/queues/wakeups/*` on the local one).
    Queue,
}

impl std::str::FromStr for Wakeups {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "notify" => Ok(Wakeups::Notify),
            "queue" => Ok(Wakeups::Queue),
            other => Err(format!("{other:?}: expected notify or queue")),
        }
    }
}

/// Runtime settings, read once at start and passed down (no globals).
#[derive(Debug, Clone)]
pub struct Settings {
    /// `iss` of every token this dispatcher signs, and the issuer it accepts.
    pub issuer: String,
    /// Lease granted when a claim names none.
    pub lease_default: Duration,
    /// Smallest lease a claim may ask for (the contract requires <= 1 s).
    pub lease_min: Duration,
    /// Largest lease a claim may ask for.
    pub lease_max: Duration,
    /// A capability token lives until its lease ends plus this grace, so a
    /// heartbeat sent just before expiry still authenticates. The database
    /// lease, not the token, decides whether a write is accepted.
    pub token_grace: Duration,
    /// Clock leeway allowed when checking `exp` of any token.
    pub token_leeway: Duration,
    /// First retry delay after a retryable failure; doubles per attempt.
    pub retry_base: Duration,
    /// Upper bound of the retry delay.
    pub retry_cap: Duration,
    /// Largest request body accepted.
    pub max_body_bytes: usize,
    /// Largest number of tasks in one job.
    pub max_tasks_per_job: usize,
    /// Largest number of events in one `/v1/task/events` call.
    pub max_events_per_call: usize,
    /// Largest number of events one attempt may store, in all its calls.
    pub max_events_per_attempt: u32,
    /// Largest total size (bytes of JSON payload) of one attempt's events.
    pub max_event_bytes_per_attempt: u64,
    /// Largest attempt log (`POST /internal/task-logs`), in bytes of text.
    pub max_log_bytes: usize,
    /// Largest number of dependencies of one task.
    pub max_deps_per_task: usize,
    /// Tasks per page of `GET /v1/jobs/{id}` (default and largest).
    pub job_page_size: u32,
    /// Jobs per page of `GET /v1/jobs` (default and largest).
    pub job_list_page_size: u32,
    /// Events per page of `GET /v1/jobs/{id}/tasks/{key}/events` (default
    /// and largest).
    pub event_page_size: u32,
    /// Jobs one bulk action (`POST /v1/job-actions`) acts on at most.
    pub job_action_max: u32,
    /// Finished jobs older than this (by `finished_at`) are pruned with
    /// their tasks, attempts, events and publishes (the `pruner` role).
    pub job_retention: Duration,
    /// Jobs one pruning statement deletes at most.
    pub job_prune_batch: u32,
    /// How often the pruner looks for expired jobs.
    pub job_prune_interval: Duration,
    /// The pruner's pause between two batches of one pass.
    pub job_prune_pause: Duration,
    /// Requests per worker credential (a pool of workers shares one).
    pub rate_per_worker: Rate,
    /// Requests per capability token's task (all its attempts).
    pub rate_per_task: Rate,
    /// Requests per user.
    pub rate_per_user: Rate,
    /// Requests per org: its users' and its tasks' together.
    pub rate_per_org: Rate,
    /// Requests served at once; past it new ones get `429 overloaded`.
    pub max_concurrent_requests: usize,
    /// Queue long-polls (`wait_seconds` > 0) held at once; past it `429
    /// overloaded`.
    pub max_concurrent_long_polls: usize,
    /// A request that has not answered after this gets `503 unavailable`.
    pub request_timeout: Duration,
    /// On SIGTERM `/readyz` answers `503 draining` this long while the
    /// listener still accepts, so load balancers stop routing here first.
    pub drain_not_ready: Duration,
    /// After the listener closes, requests in flight get this long to
    /// answer; the rest are cut (long-polls answer at once when it closes).
    pub drain_timeout: Duration,
    /// Keys per `POST /v1/task/objects` call.
    pub max_object_keys_per_call: usize,
    /// Presigned URLs live this long (never past the token's expiry).
    pub object_url_ttl: Duration,
    /// Largest object `PUT` through the local store's presigned URLs.
    pub max_object_bytes: usize,
    /// Parts per `POST /v1/task/dataset-stage` call.
    pub max_parts_per_stage: usize,
    /// Largest part staging reads and checks (bytes).
    pub max_part_bytes: u64,
    /// Largest row of a part or batch (bytes of its line).
    pub max_row_bytes: usize,
    /// `max_attempts` of a task that names none.
    pub default_max_attempts: u32,
    /// Largest `max_attempts` a task may ask for.
    pub max_attempts_limit: u32,
    /// Outbox rows the relay takes per transaction.
    pub relay_batch: u32,
    /// How often the relay looks for due rows when no notification came
    /// (rows whose `available_at` is in the future, lost notifications).
    pub relay_poll: Duration,
    /// Rows a relay has taken are hidden from other relays this long while
    /// it publishes them; a relay that dies before marking them is replaced
    /// after it (a duplicate publish, never a loss).
    pub relay_hold: Duration,
    /// How ready tasks reach workers: NOTIFY and long-polled claims, or
    /// wake-up messages through the outbox and a queue.
    pub wakeups: Wakeups,
    /// A long-polled claim (`wait_seconds`) that was not woken looks again
    /// after this long: the bound on what a lost notification costs.
    pub claim_poll: Duration,
    /// Publish tries before an outbox row is marked `dead`.
    pub relay_max_tries: u32,
    /// First delay after a failed publish; doubles per try, with jitter.
    pub relay_retry_base: Duration,
    /// Upper bound of the publish retry delay.
    pub relay_retry_cap: Duration,
    /// How often the lease reaper runs.
    pub reaper_period: Duration,
    /// Expired leases handled per reaper pass.
    pub reaper_batch: u32,
    /// A ready task not claimed for this long is woken again (its wake-up
    /// may have been lost or dead-lettered).
    pub rewake_after: Duration,
    /// Sent outbox rows are deleted after this long.
    pub outbox_retention: Duration,
    /// Receives of one message before the queue moves it to its DLQ.
    pub queue_max_receives: u32,
    /// Longest queue long-poll a worker may ask for (SQS: 20 s).
    pub queue_max_wait: Duration,
    /// A buffer pointer the sink received stays hidden from other sinks
    /// this long, extended every third of it while the batch is in hand;
    /// a sink that dies is replaced after it.
    pub sink_visibility: Duration,
    /// Batches one sink ingests at once.
    pub sink_concurrency: usize,
    /// First delay before a batch is tried again after a transient failure
    /// (store or data database down); doubles per failure, with jitter.
    pub sink_retry_base: Duration,
    /// Upper bound of that delay (SQS allows at most 15 minutes).
    pub sink_retry_cap: Duration,
    /// A batch still pending this long after its latest pointer gets a new
    /// one from the reaper (the pointer was lost or dead-lettered).
    pub batch_repoint_after: Duration,
    /// Rows a query answers when it names no `limit`.
    pub query_default_rows: u32,
    /// Largest `limit` of a query.
    pub query_max_rows: u32,
    /// Values of one `in` list of a query's `where`.
    pub query_max_in: usize,
    /// Bytes of JSON one answer may hold; past it, `truncated: true`.
    pub query_max_answer_bytes: usize,
    /// Sum of a version's part sizes one query may read; past it `413`.
    pub query_max_scan_bytes: u64,
    /// Longest a query may run (a statement timeout on streams); past it
    /// `503`.
    pub query_timeout: Duration,
    /// Largest bundle archive `POST /v1/bundles` takes (bytes, gzipped).
    pub bundle_max_bytes: usize,
    /// Largest sum of a bundle's unpacked files (bytes).
    pub bundle_max_unpacked_bytes: u64,
    /// Bundle uploads held and checked at once (more answer `429`).
    pub bundle_max_concurrent_pushes: usize,
    /// Queries run at once by one org (more answer `429 overloaded`).
    pub query_max_concurrent_per_org: usize,
    /// Queries run at once in all (more answer `429 overloaded`): with the
    /// largest part each one holds, this bounds what queries take of the
    /// dispatcher's memory and of the data database.
    pub query_max_concurrent: usize,
    /// A task's run bound when neither it nor its bundle names one.
    pub task_timeout_default: Duration,
    /// Largest `timeout_seconds` a task may name.
    pub task_timeout_max: Duration,
    /// Largest `deadline_seconds` a job may name.
    pub job_deadline_max: Duration,
    /// How often the alert router looks for new batches, and the delivery
    /// role for due deliveries when it found none.
    pub alert_poll: Duration,
    /// One webhook try may take this long.
    pub alert_delivery_timeout: Duration,
    /// A delivery in flight is held this long; past it (its worker died),
    /// another takes it.
    pub alert_delivery_lease: Duration,
    /// Deliveries tried at once per delivery role.
    pub alert_delivery_concurrency: usize,
    /// Tries before a delivery is dead.
    pub alert_delivery_max_tries: u32,
    /// First retry delay of a failed delivery; doubles per try, with jitter.
    pub alert_retry_base: Duration,
    /// Longest retry delay (also the bound of a `Retry-After`).
    pub alert_retry_cap: Duration,
    /// Hosts (names or IP literals, as written in destination URLs) that
    /// alerts may reach although they are internal; every other host must
    /// resolve only to public addresses (see `egress`).
    pub alert_allow_hosts: Vec<String>,
    /// When the circuit breakers around SQS, S3 and each webhook
    /// destination open, and for how long (`crate::breaker`).
    pub breaker: crate::breaker::BreakerConfig,
    /// Named crash points (debug builds only; see `failpoint`).
    pub failpoints: Vec<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            issuer: "dispatcher".to_owned(),
            lease_default: Duration::from_secs(60),
            lease_min: Duration::from_secs(1),
            lease_max: Duration::from_secs(3600),
            token_grace: Duration::from_secs(60),
            token_leeway: Duration::from_secs(5),
            retry_base: Duration::from_secs(2),
            retry_cap: Duration::from_secs(300),
            max_body_bytes: 1024 * 1024,
            max_tasks_per_job: 10_000,
            max_events_per_call: 1_000,
            max_events_per_attempt: 10_000,
            max_event_bytes_per_attempt: 16 * 1024 * 1024,
            max_log_bytes: 1024 * 1024,
            max_deps_per_task: 1_000,
            job_page_size: 1_000,
            job_list_page_size: 100,
            event_page_size: 500,
            job_action_max: 1_000,
            job_retention: Duration::from_secs(7 * 24 * 3600),
            job_prune_batch: 200,
            job_prune_interval: Duration::from_secs(60),
            job_prune_pause: Duration::from_millis(100),
            rate_per_worker: Rate {
                per_second: 5_000,
                burst: 10_000,
            },
            rate_per_task: Rate {
                per_second: 100,
                burst: 200,
            },
            rate_per_user: Rate {
                per_second: 50,
                burst: 100,
            },
            rate_per_org: Rate {
                per_second: 3_000,
                burst: 6_000,
            },
            max_concurrent_requests: 1_024,
            max_concurrent_long_polls: 512,
            request_timeout: Duration::from_secs(30),
            drain_not_ready: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(10),
            max_object_keys_per_call: 100,
            object_url_ttl: Duration::from_secs(15 * 60),
            max_object_bytes: 256 * 1024 * 1024,
            max_parts_per_stage: 100,
            max_part_bytes: 256 * 1024 * 1024,
            max_row_bytes: 1024 * 1024,
            default_max_attempts: 3,
            max_attempts_limit: 100,
            relay_batch: 100,
            relay_poll: Duration::from_millis(500),
            relay_hold: Duration::from_secs(10),
            wakeups: Wakeups::Notify,
            claim_poll: Duration::from_secs(5),
            relay_max_tries: 10,
            relay_retry_base: Duration::from_secs(1),
            relay_retry_cap: Duration::from_secs(300),
            reaper_period: Duration::from_secs(1),
            reaper_batch: 100,
            rewake_after: Duration::from_secs(60),
            outbox_retention: Duration::from_secs(24 * 3600),
            queue_max_receives: 5,
            queue_max_wait: Duration::from_secs(20),
            sink_visibility: Duration::from_secs(60),
            sink_concurrency: 4,
            sink_retry_base: Duration::from_secs(1),
            sink_retry_cap: Duration::from_secs(300),
            batch_repoint_after: Duration::from_secs(15 * 60),
            query_default_rows: 100,
            query_max_rows: 10_000,
            query_max_in: 1_000,
            query_max_answer_bytes: 8 * 1024 * 1024,
            query_max_scan_bytes: 1024 * 1024 * 1024,
            query_timeout: Duration::from_secs(10),
            bundle_max_bytes: 64 * 1024 * 1024,
            bundle_max_unpacked_bytes: 512 * 1024 * 1024,
            bundle_max_concurrent_pushes: 2,
            query_max_concurrent_per_org: 2,
            query_max_concurrent: 8,
            task_timeout_default: Duration::from_secs(15 * 60),
            alert_poll: Duration::from_millis(500),
            alert_delivery_timeout: Duration::from_secs(10),
            alert_delivery_lease: Duration::from_secs(30),
            alert_delivery_concurrency: 8,
            alert_delivery_max_tries: 8,
            alert_retry_base: Duration::from_secs(1),
            alert_retry_cap: Duration::from_secs(300),
            alert_allow_hosts: Vec::new(),
            breaker: crate::breaker::BreakerConfig::default(),
            task_timeout_max: Duration::from_secs(24 * 3600),
            job_deadline_max: Duration::from_secs(7 * 24 * 3600),
            failpoints: Vec::new(),
        }
    }
}

/// `base × 2^(n−1)`, capped, with equal jitter: half fixed, half scaled by
/// `unit_random` in `[0, 1]`.
pub fn backoff(base: Duration, cap: Duration, n: u32, unit_random: f64) -> Duration {
    let exp = n.saturating_sub(1).min(30);
    let full = base.saturating_mul(1u32 << exp).min(cap);
    let half = full / 2;
    half + half.mul_f64(unit_random.clamp(0.0, 1.0))
}

/// Bounds of one query (defaults in `Settings`).
#[derive(Debug, Clone, Copy)]
pub struct QueryLimits {
    /// `limit` when the request names none.
    pub default_rows: u32,
    /// Largest `limit`.
    pub max_rows: u32,
    /// Values of one `in` list.
    pub max_in: usize,
}

/// Bounds of reading, besides the plan's row limit.
#[derive(Debug, Clone, Copy)]
pub struct ReadLimits {
    /// Sum of a version's part sizes one query may read.
    pub max_scan_bytes: u64,
    /// Bytes of JSON an answer may hold; past it, `truncated`.
    pub max_answer_bytes: usize,
    pub max_row_bytes: usize,
    pub timeout: std::time::Duration,
}

impl Settings {
    /// The lease actually granted for a requested number of seconds.
    pub fn clamp_lease(&self, requested: Option<u32>) -> Duration {
        match requested {
            None => self.lease_default,
            Some(s) => Duration::from_secs(u64::from(s)).clamp(self.lease_min, self.lease_max),
        }
    }

    /// Workers heartbeat every third of the lease, so two heartbeats can be
    /// lost before the lease runs out.
    pub fn heartbeat_interval(lease: Duration) -> Duration {
        (lease / 3).max(Duration::from_secs(1)).min(lease)
    }

    /// Delay before attempt `failed_attempt + 1` may be claimed: exponential
    /// in the attempt number, capped, with "equal jitter" (half fixed, half
    /// random) so that retries of a burst of failures spread out.
    pub fn retry_delay(&self, failed_attempt: u32, unit_random: f64) -> Duration {
        backoff(self.retry_base, self.retry_cap, failed_attempt, unit_random)
    }
}

impl Settings {
    /// Delay before publish try `tries + 1` of an outbox row.
    pub fn relay_retry_delay(&self, tries: u32, unit_random: f64) -> Duration {
        backoff(
            self.relay_retry_base,
            self.relay_retry_cap,
            tries,
            unit_random,
        )
    }

    pub fn query_limits(&self) -> QueryLimits {
        QueryLimits {
            default_rows: self.query_default_rows,
            max_rows: self.query_max_rows,
            max_in: self.query_max_in,
        }
    }

    pub fn read_limits(&self) -> ReadLimits {
        ReadLimits {
            max_scan_bytes: self.query_max_scan_bytes,
            max_answer_bytes: self.query_max_answer_bytes,
            max_row_bytes: self.max_row_bytes,
            timeout: self.query_timeout,
        }
    }

    /// Delay before a batch is tried again after its `n`th transient
    /// failure.
    pub fn sink_retry_delay(&self, n: u32, unit_random: f64) -> Duration {
        backoff(self.sink_retry_base, self.sink_retry_cap, n, unit_random)
    }

    /// Crashes the process (`abort`, like SIGKILL: no cleanup, no answer)
    /// when the named failpoint is armed. Only debug builds have failpoints;
    /// in release builds this is a no-op. Armed from `DISPATCHER_FAILPOINTS`.
    pub fn failpoint(&self, name: &str) {
        #[cfg(debug_assertions)]
        if self.failpoints.iter().any(|f| f == name) {
            eprintln!("failpoint {name}: aborting");
            std::process::abort();
        }
        #[cfg(not(debug_assertions))]
        let _ = name;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_is_clamped_to_bounds() {
        let s = Settings::default();
        assert_eq!(s.clamp_lease(None), Duration::from_secs(60));
        assert_eq!(s.clamp_lease(Some(0)), Duration::from_secs(1));
        assert_eq!(s.clamp_lease(Some(5)), Duration::from_secs(5));
        assert_eq!(s.clamp_lease(Some(1_000_000)), Duration::from_secs(3600));
    }

    #[test]
    fn retry_delay_grows_exponentially_with_jitter_and_cap() {
        let s = Settings::default();
        assert_eq!(s.retry_delay(1, 0.0), Duration::from_secs(1));
        assert_eq!(s.retry_delay(1, 1.0), Duration::from_secs(2));
        assert_eq!(s.retry_delay(3, 1.0), Duration::from_secs(8));
        assert_eq!(s.retry_delay(3, 0.0), Duration::from_secs(4));
        assert_eq!(s.retry_delay(40, 1.0), Duration::from_secs(300));
    }

    #[test]
    fn rates_parse_with_and_without_a_burst() {
        assert_eq!(
            "10".parse::<Rate>(),
            Ok(Rate {
                per_second: 10,
                burst: 20
            })
        );
        assert_eq!(
            "10,15".parse::<Rate>(),
            Ok(Rate {
                per_second: 10,
                burst: 15
            })
        );
        for bad in ["0", "10,5", "x", "1,y"] {
            assert!(bad.parse::<Rate>().is_err(), "{bad}");
        }
    }

    #[test]
    fn heartbeat_interval_is_a_third_of_the_lease() {
        assert_eq!(
            Settings::heartbeat_interval(Duration::from_secs(60)),
            Duration::from_secs(20)
        );
        assert_eq!(
            Settings::heartbeat_interval(Duration::from_secs(1)),
            Duration::from_secs(1)
        );
    }
}

//! Runner processes for bundle tasks (Node, Python, Rust), each behind its
//! own loopback Runtime API host (`runtime_api`), inside the task sandbox.
//!
//! * A bundle is fetched once per wrapper from the claim's presigned URL,
//!   checked against the task's digest, and cached (root-only directory).
//! * A runner starts cold in a sandbox attempt of its own (uid, scratch
//!   directory), with the bundle unpacked into `<scratch>/task` and an
//!   environment that is exactly [`runner_env`]'s allowlist.
//! * After an answer (response or handler error) the runner waits, warm,
//!   for the next task of the **same org and bundle**; runners idle past
//!   `idle_ttl`, or beyond `max_idle`, are stopped.
//! * A timeout, a crash, an init failure, a cancel or a lost lease kills
//!   the runner's process group and sweeps its uid; the next task of that
//!   bundle starts a fresh one.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use dispatcher_wire as wire;
use serde_json::json;
use sha2::Digest as _;
use tokio::io::{AsyncRead, AsyncReadExt as _};
use uuid::Uuid;

use crate::capture::Shared;
use crate::runtime_api::{Answer, Host, InitError, Invocation};
use crate::sandbox::{Attempt, Sandbox};

const PY_BOOTSTRAP: &str = include_str!("../../runners/python/bootstrap.py");
const PY_CLIENT: &str = include_str!("../../runners/python/dispatcher_task.py");
const NODE_BOOTSTRAP: &str = include_str!("../../runners/node/bootstrap.mjs");
const NODE_CLIENT: &str = include_str!("../../runners/node/dispatcher-task.mjs");

/// Bytes of a runner's stderr kept to explain a crash or init failure.
const TAIL_BYTES: usize = 4096;

/// How runners are started and kept.
pub struct RunnerConfig {
    pub python: String,
    pub node: String,
    pub max_idle: usize,
    pub idle_ttl: Duration,
    pub init_timeout: Duration,
    pub default_timeout: Duration,
    pub worker_id: String,
    pub max_unpacked: u64,
    /// Whether `exec` tasks are claimed (`--exec` is not `off`).
    pub claim_exec: bool,
}

/// How one invocation ended.
pub enum Invoked {
    Answered(Answer),
    TimedOut {
        seconds: u64,
    },
    /// The runner exited while the invocation was in flight.
    Exited {
        request_id: String,
        status: String,
        tail: String,
    },
    InitFailed {
        error_type: String,
        message: String,
    },
    /// The bundle could not be fetched or the runner not started.
    Unavailable(String),
}

struct Runner {
    org: Uuid,
    digest: String,
    child: tokio::process::Child,
    pgid: Option<u32>,
    host: Host,
    attempt: Option<Attempt>,
    tail: Arc<Mutex<VecDeque<u8>>>,
    /// The log of the attempt the runner serves now: its output goes there.
    capture: Slot,
    /// Copies of the read ends of its stdout and stderr, to see what is
    /// still unread when an invocation ends.
    pipes: Vec<std::os::fd::OwnedFd>,
    idle_since: Instant,
}

/// Where a runner's output goes: the log of the attempt it serves, if any.
type Slot = Arc<Mutex<Option<Shared>>>;

impl Runner {
    /// Waits (briefly) until what the runner wrote before its answer has
    /// been read into the log: the pipes are empty, and the readers have
    /// had a moment to file what they took.
    async fn settle(&self) {
        for _ in 0..50 {
            if self.pipes.iter().all(|fd| unread(fd) == 0) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }

    fn tail(&self) -> String {
        let t = self.tail.lock().unwrap_or_else(|p| p.into_inner());
        let (a, b) = t.as_slices();
        String::from_utf8_lossy(&[a, b].concat()).trim().to_owned()
    }

    /// Kills the process group and sweeps the uid, then removes the
    /// scratch directory.
    async fn stop(mut self) {
        let pgid = self.pgid.take();
        if let Some(attempt) = self.attempt.take() {
            attempt.finish(pgid).await;
        }
        let _ = self.child.wait().await;
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        // Dropped without `stop` (a cancelled future): the group goes now;
        // the attempt's own drop then sweeps its uid and removes its
        // directory.
        if let Some(pgid) = self.pgid.and_then(|p| i32::try_from(p).ok()) {
            // SAFETY: killpg takes plain integers; a gone group is ESRCH.
            unsafe { libc::killpg(pgid, libc::SIGKILL) };
        }
    }
}

pub struct Runners {
    cfg: RunnerConfig,
    sandbox: Arc<Sandbox>,
    /// Where the runners' own code is (root's, readable by all).
    runtime_dir: PathBuf,
    /// Checked archives by digest (root's, `0700`).
    cache_dir: PathBuf,
    idle: Mutex<Vec<Runner>>,
    http: reqwest::Client,
    /// One lock per digest being fetched, so two cold starts of one bundle
    /// download it once and a slow download stalls no other bundle
    /// (review M10).
    fetching: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// The runtimes this machine can run (its claims name them).
    runtimes: Vec<dispatcher_wire::Runtime>,
}

/// The body at a presigned URL; no error names the URL.
async fn download(http: &reqwest::Client, url: &str) -> Result<Vec<u8>> {
    let resp = http
        .get(url)
        .send()
        .await
        .map_err(reqwest::Error::without_url)
        .context("fetching the bundle")?;
    if !resp.status().is_success() {
        bail!("fetching the bundle answered {}", resp.status());
    }
    Ok(resp
        .bytes()
        .await
        .map_err(reqwest::Error::without_url)
        .context("fetching the bundle")?
        .to_vec())
}

/// The runtime files, written where runners can read them.
pub fn write_runtime(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    for (sub, files) in [
        (
            "python",
            [
                ("bootstrap.py", PY_BOOTSTRAP),
                ("dispatcher_task.py", PY_CLIENT),
            ],
        ),
        (
            "node",
            [
                ("bootstrap.mjs", NODE_BOOTSTRAP),
                ("dispatcher-task.mjs", NODE_CLIENT),
            ],
        ),
    ] {
        let d = dir.join(sub);
        std::fs::create_dir_all(&d)?;
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755))?;
        for (name, text) in files {
            std::fs::write(d.join(name), text)?;
            std::fs::set_permissions(d.join(name), std::fs::Permissions::from_mode(0o644))?;
        }
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// Whether anyone (a task's uid) may run `path`: the file, after links,
/// is executable by others, and every directory above it traversable.
fn runnable_by_others(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    let Ok(real) = std::fs::canonicalize(path) else {
        return false;
    };
    let others_x = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| m.permissions().mode() & 0o001 != 0)
            .unwrap_or(false)
    };
    others_x(&real) && real.ancestors().skip(1).all(others_x)
}

/// The program a runner runs as `name`: itself if it holds a `/`, else the
/// first of `PATH` that a task may run (root's own tools, such as a pyenv
/// shim under `/root`, are skipped when tasks run under uids of their own).
pub(crate) fn program_for_tasks(name: &str, isolated: bool) -> Option<String> {
    let ok = |p: &Path| p.is_file() && (!isolated || runnable_by_others(p));
    if name.contains('/') {
        return ok(Path::new(name)).then(|| name.to_owned());
    }
    let path = std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| ok(p))
        .map(|p| p.display().to_string())
}

impl Runners {
    /// The runtimes this worker can run.
    pub fn runtimes(&self) -> &[dispatcher_wire::Runtime] {
        &self.runtimes
    }

    pub fn new(mut cfg: RunnerConfig, sandbox: Arc<Sandbox>) -> Result<Arc<Runners>> {
        use std::os::unix::fs::DirBuilderExt as _;
        // Found once; a runtime whose program is missing is not claimed.
        use dispatcher_wire::Runtime;
        let mut runtimes = vec![Runtime::Rust];
        if cfg.claim_exec {
            runtimes.push(Runtime::Exec);
        }
        for (runtime, program) in [
            (Runtime::Python, &mut cfg.python),
            (Runtime::Node, &mut cfg.node),
        ] {
            match program_for_tasks(program, sandbox.is_isolated()) {
                Some(found) => {
                    *program = found;
                    runtimes.push(runtime);
                }
                None => tracing::warn!(
                    program = %program,
                    runtime = runtime.as_str(),
                    "not found on PATH, or not runnable by task uids: this worker claims no task of its runtime"
                ),
            }
        }
        let runtime_dir = sandbox.root().join("runtime");
        let cache_dir = sandbox.root().join("bundles");
        std::fs::DirBuilder::new()
            .mode(0o755)
            .create(&runtime_dir)?;
        std::fs::DirBuilder::new().mode(0o700).create(&cache_dir)?;
        write_runtime(&runtime_dir).context("writing the runners' code")?;
        Ok(Arc::new(Runners {
            cfg,
            sandbox,
            runtime_dir,
            cache_dir,
            idle: Mutex::new(Vec::new()),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(300))
                .build()?,
            fetching: Mutex::new(HashMap::new()),
            runtimes,
        }))
    }

    /// Stops runners idle past their time; call now and then.
    pub async fn sweep(&self) {
        let stale: Vec<Runner> = {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            let (stale, keep) = std::mem::take(&mut *idle)
                .into_iter()
                .partition(|r| r.idle_since.elapsed() >= self.cfg.idle_ttl);
            *idle = keep;
            stale
        };
        for r in stale {
            tracing::debug!(digest = r.digest, "stopping an idle runner");
            r.stop().await;
        }
    }

    /// Stops every idle runner (at exit).
    pub async fn stop_all(&self) {
        let all = std::mem::take(&mut *self.idle.lock().unwrap_or_else(|p| p.into_inner()));
        for r in all {
            r.stop().await;
        }
    }

    /// The archive of `digest`: from the cache, else fetched and checked.
    async fn archive(&self, digest: &str, url: Option<&str>) -> Result<Vec<u8>> {
        let hex = digest
            .strip_prefix("sha256:")
            .filter(|_| dispatcher::bundles::is_digest(digest))
            .with_context(|| format!("{digest:?} is not a bundle digest"))?;
        let path = self.cache_dir.join(format!("{hex}.tar.gz"));
        if let Ok(bytes) = tokio::fs::read(&path).await {
            return Ok(bytes);
        }
        let lock = {
            let mut fetching = self.fetching.lock().unwrap_or_else(|p| p.into_inner());
            fetching.entry(digest.to_owned()).or_default().clone()
        };
        let fetched = async {
            let _one = lock.lock().await;
            // Another cold start of this bundle may have fetched it meanwhile.
            if let Ok(bytes) = tokio::fs::read(&path).await {
                return Ok(bytes);
            }
            self.fetch(digest, hex, &path, url).await
        }
        .await;
        let mut fetching = self.fetching.lock().unwrap_or_else(|p| p.into_inner());
        if fetching.get(digest).is_some_and(|l| Arc::ptr_eq(l, &lock))
            && Arc::strong_count(&lock) == 2
        {
            fetching.remove(digest);
        }
        fetched
    }

    /// Downloads, checks and caches one archive. Errors never carry the
    /// URL: it is presigned, and the message reaches the task's failure
    /// and the logs (review M11).
    async fn fetch(
        &self,
        digest: &str,
        hex: &str,
        path: &Path,
        url: Option<&str>,
    ) -> Result<Vec<u8>> {
        let url = url.context("the claim carries no bundle URL")?;
        let bytes = download(&self.http, url).await?;
        let got = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&bytes)));
        if got != digest {
            bail!("the fetched bundle is {got}, not {digest}: refused");
        }
        let tmp = self
            .cache_dir
            .join(format!(".{hex}.{}", Uuid::new_v4().simple()));
        tokio::fs::write(&tmp, &bytes).await?;
        tokio::fs::rename(&tmp, path).await?;
        Ok(bytes)
    }

    /// A warm runner of this org and bundle, if one is idle and alive.
    fn take_warm(&self, org: Uuid, digest: &str) -> Option<Runner> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(i) = idle.iter().position(|r| r.org == org && r.digest == digest) {
            let mut r = idle.swap_remove(i);
            if matches!(r.child.try_wait(), Ok(None)) {
                return Some(r);
            }
            // Exited while idle (a Node uncaught exception, say): dropped,
            // which kills what is left of its group.
        }
        None
    }

    /// Puts a runner back for the next task of its bundle.
    async fn keep(&self, r: Runner) {
        let mut r = r;
        r.idle_since = Instant::now();
        let evicted = {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            idle.push(r);
            if idle.len() > self.cfg.max_idle {
                let oldest = idle
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, r)| r.idle_since)
                    .map(|(i, _)| i)
                    .unwrap_or(0);
                Some(idle.swap_remove(oldest))
            } else {
                None
            }
        };
        if let Some(old) = evicted {
            old.stop().await;
        }
    }

    /// Starts a runner of this bundle and waits for its init to end.
    async fn start(&self, claim: &wire::ClaimResponse, log: &Shared) -> Result<Runner, Invoked> {
        let digest = &claim.task.bundle;
        let archive = self
            .archive(digest, claim.bundle_url.as_deref())
            .await
            .map_err(|e| Invoked::Unavailable(format!("{e:#}")))?;
        let attempt = self.sandbox.enter().await.map_err(|e| {
            Invoked::Unavailable(format!("the worker could not prepare the runner: {e:#}"))
        })?;
        let root = attempt.dir().join("task");
        let uid = attempt.uid();
        let max = self.cfg.max_unpacked;
        let (root2, bytes) = (root.clone(), archive);
        let manifest = tokio::task::spawn_blocking(move || {
            std::fs::create_dir(&root2)?;
            if let Some(uid) = uid {
                std::os::unix::fs::chown(&root2, Some(uid), Some(uid))?;
            }
            dispatcher::bundles::unpack(&bytes, &root2, max, uid)
                .map_err(|e| std::io::Error::other(e.to_string()))
        })
        .await
        .map_err(|e| Invoked::Unavailable(e.to_string()))?
        .map_err(|e| Invoked::Unavailable(format!("unpacking the bundle: {e}")))?;
        if manifest.runtime != claim.task.runtime {
            return Err(Invoked::Unavailable(format!(
                "the bundle is {}, the task {}",
                manifest.runtime.as_str(),
                claim.task.runtime.as_str()
            )));
        }
        tracing::info!(digest = %digest, runtime = manifest.runtime.as_str(), "runner starting (cold)");
        metrics::counter!(crate::metrics::COLD_STARTS, "runtime" => manifest.runtime.as_str())
            .increment(1);
        let host = Host::start(Some(uid.unwrap_or_else(own_uid)))
            .await
            .map_err(|e| Invoked::Unavailable(format!("cannot listen for the runner: {e}")))?;
        let env = runner_env(&RunnerEnv {
            api: host.address(),
            manifest: &manifest,
            task_root: &root,
            runtime_dir: &self.runtime_dir,
            home: attempt.dir(),
            digest,
            org: claim.org_id,
            worker_id: &self.cfg.worker_id,
        });
        let (program, args): (String, Vec<String>) = match manifest.runtime {
            wire::Runtime::Python => (
                self.cfg.python.clone(),
                vec![self
                    .runtime_dir
                    .join("python/bootstrap.py")
                    .display()
                    .to_string()],
            ),
            wire::Runtime::Node => (
                self.cfg.node.clone(),
                vec![self
                    .runtime_dir
                    .join("node/bootstrap.mjs")
                    .display()
                    .to_string()],
            ),
            _ => {
                // A custom runtime: the bundle's own program.
                let program = root.join(&manifest.handler);
                if !program.is_file() {
                    attempt.finish(None).await;
                    return Err(Invoked::InitFailed {
                        error_type: "Runtime.InvalidEntrypoint".into(),
                        message: format!("the bundle has no program {:?}", manifest.handler),
                    });
                }
                (program.display().to_string(), vec![])
            }
        };
        let mut cmd = attempt.exact_command(&program, &env);
        cmd.args(&args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                attempt.finish(None).await;
                return Err(Invoked::Unavailable(format!(
                    "cannot start {program:?}: {e}"
                )));
            }
        };
        let tail = Arc::new(Mutex::new(VecDeque::with_capacity(TAIL_BYTES)));
        // The cold start's init output is the first attempt's.
        let capture: Slot = Arc::new(Mutex::new(Some(log.clone())));
        let short = digest.get(7..19).unwrap_or(digest).to_owned();
        let mut pipes = Vec::new();
        if let Some(out) = child.stdout.take() {
            pipes.extend(std::os::fd::AsFd::as_fd(&out).try_clone_to_owned());
            tokio::spawn(log_lines(out, short.clone(), None, capture.clone()));
        }
        if let Some(err) = child.stderr.take() {
            pipes.extend(std::os::fd::AsFd::as_fd(&err).try_clone_to_owned());
            tokio::spawn(log_lines(
                err,
                short.clone(),
                Some(tail.clone()),
                capture.clone(),
            ));
        }
        let mut runner = Runner {
            org: claim.org_id,
            digest: digest.clone(),
            pgid: child.id(),
            child,
            host,
            attempt: Some(attempt),
            tail,
            capture,
            pipes,
            idle_since: Instant::now(),
        };
        let started = tokio::select! {
            s = runner.host.started() => s.map_err(|InitError { error_type, message }| {
                Invoked::InitFailed { error_type, message }
            }),
            status = runner.child.wait() => {
                // Give the stderr reader a moment to take the last lines.
                tokio::time::sleep(Duration::from_millis(50)).await;
                Err(match runner.host.init_error() {
                    Some(InitError { error_type, message }) => Invoked::InitFailed { error_type, message },
                    None => Invoked::InitFailed {
                        error_type: "Runtime.ExitError".into(),
                        message: format!(
                            "Runtime exited during init: {}; {}",
                            status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string()),
                            runner.tail()
                        ),
                    },
                })
            }
            _ = tokio::time::sleep(self.cfg.init_timeout) => Err(Invoked::InitFailed {
                error_type: "Runtime.InitTimeout".into(),
                message: format!("init did not finish within {} s", self.cfg.init_timeout.as_secs()),
            }),
        };
        match started {
            Ok(()) => Ok(runner),
            Err(e) => {
                runner.stop().await;
                Err(e)
            }
        }
    }

    /// Runs one invocation of the claimed task: on a warm runner of its
    /// bundle if one is idle, else on a new one. What the runner prints
    /// meanwhile goes to `log`.
    pub async fn invoke(
        &self,
        claim: &wire::ClaimResponse,
        dispatcher_url: &str,
        token: Arc<Mutex<String>>,
        log: Shared,
    ) -> Invoked {
        let began = Instant::now();
        let warm = self.take_warm(claim.org_id, &claim.task.bundle);
        let cold = warm.is_none();
        let mut runner = match warm {
            Some(r) => {
                tracing::info!(digest = %claim.task.bundle, "runner reused (warm)");
                *r.capture.lock().unwrap_or_else(|p| p.into_inner()) = Some(log.clone());
                r
            }
            None => match self.start(claim, &log).await {
                Ok(r) => r,
                Err(e) => return e,
            },
        };
        let secs = match claim.task.timeout_seconds {
            0 => self.cfg.default_timeout.as_secs(),
            s => u64::from(s),
        };
        let request_id = format!("{}-{}", claim.task_id, claim.attempt);
        let deadline = Instant::now() + Duration::from_secs(secs);
        let deadline_ms =
            chrono::Utc::now().timestamp_millis() + i64::try_from(secs * 1000).unwrap_or(i64::MAX);
        let current = token.lock().map(|t| t.clone()).unwrap_or_default();
        let token_url = format!(
            "http://{}/2018-06-01/dispatcher/invocation/{request_id}/token",
            runner.host.address()
        );
        let envelope = envelope(claim, dispatcher_url, &current, Some(&token_url));
        let rx = runner.host.invoke(Invocation {
            request_id: request_id.clone(),
            event: serde_json::to_vec(&envelope).unwrap_or_default(),
            deadline_ms,
            function_arn: format!(
                "arn:aws:lambda:local:000000000000:function:{}",
                function_name(&claim.task.bundle)
            ),
            token,
            traceparent: crate::runner::udf_traceparent(claim),
        });
        let ended = tokio::select! {
            answer = rx => match answer {
                Ok(a) => Invoked::Answered(a),
                // The host dropped the invocation (past its deadline).
                Err(_) => Invoked::TimedOut { seconds: secs },
            },
            status = runner.child.wait() => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                Invoked::Exited {
                    request_id: request_id.clone(),
                    status: status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string()),
                    tail: runner.tail(),
                }
            }
            _ = tokio::time::sleep_until(deadline.into()) => {
                runner.host.expire(&request_id);
                Invoked::TimedOut { seconds: secs }
            }
        };
        // Cold: fetching (once per wrapper) and unpacking the bundle,
        // starting the runner and its init, then the invocation.
        tracing::info!(
            digest = %claim.task.bundle,
            runtime = claim.task.runtime.as_str(),
            cold,
            ms = began.elapsed().as_secs_f64() * 1000.0,
            "invocation ended"
        );
        let runtime = claim.task.runtime.as_str();
        metrics::histogram!(
            crate::metrics::INVOKE_DURATION,
            "runtime" => runtime,
            "start" => if cold { "cold" } else { "warm" }
        )
        .record(began.elapsed().as_secs_f64());
        runner.settle().await;
        // Output between invocations is no attempt's.
        runner
            .capture
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        match &ended {
            Invoked::Answered(_) => self.keep(runner).await,
            _ => runner.stop().await,
        }
        ended
    }
}

/// The event an invocation gets (ADR 0013): the task's inputs, what the
/// task is, and how to reach the task API with the attempt's capability
/// token — nothing else. With `token_url` (the local host) the runner asks
/// it for the token the wrapper's heartbeats refreshed; without it (a
/// Lambda function, ADR 0026) the runner's client refreshes the token
/// itself every `refresh_seconds` with a heartbeat of its own.
pub fn envelope(
    claim: &wire::ClaimResponse,
    dispatcher_url: &str,
    token: &str,
    token_url: Option<&str>,
) -> serde_json::Value {
    let mut dispatcher = json!({"url": dispatcher_url, "token": token});
    match token_url {
        Some(url) => dispatcher["token_url"] = json!(url),
        None => dispatcher["refresh_seconds"] = json!(claim.heartbeat_interval_seconds.max(1)),
    }
    json!({
        "inputs": claim.task.inputs,
        "task": {
            "task_id": claim.task_id, "job_id": claim.job_id, "key": claim.task.key,
            "attempt": claim.attempt, "object_prefix": claim.object_prefix,
            "outputs": claim.task.outputs, "reads": claim.task.reads,
        },
        "dispatcher": dispatcher,
    })
}

fn own_uid() -> u32 {
    // SAFETY: getuid has no preconditions.
    unsafe { libc::getuid() }
}

/// What a runner's environment is made of.
pub struct RunnerEnv<'a> {
    pub api: String,
    pub manifest: &'a wire::BundleManifest,
    pub task_root: &'a Path,
    pub runtime_dir: &'a Path,
    pub home: &'a Path,
    pub digest: &'a str,
    pub org: Uuid,
    pub worker_id: &'a str,
}

fn function_name(digest: &str) -> String {
    format!("udf-{}", digest.get(7..19).unwrap_or("bundle"))
}

/// The runner's whole environment: the Lambda variables a runtime needs,
/// `PATH`, `HOME`/`TMPDIR` (its scratch directory), and nothing of the
/// wrapper's (no credential, no database URL).
pub fn runner_env(e: &RunnerEnv<'_>) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = vec![
        ("AWS_LAMBDA_RUNTIME_API", e.api.clone()),
        ("_HANDLER", e.manifest.handler.clone()),
        ("LAMBDA_TASK_ROOT", e.task_root.display().to_string()),
        ("LAMBDA_RUNTIME_DIR", e.runtime_dir.display().to_string()),
        ("AWS_LAMBDA_FUNCTION_NAME", function_name(e.digest)),
        ("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST".into()),
        (
            "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
            e.manifest.memory_mb.unwrap_or(1024).to_string(),
        ),
        (
            "AWS_LAMBDA_LOG_GROUP_NAME",
            format!("/dispatcher/{}", e.org),
        ),
        ("AWS_LAMBDA_LOG_STREAM_NAME", e.worker_id.to_owned()),
        ("AWS_LAMBDA_INITIALIZATION_TYPE", "on-demand".into()),
        (
            "AWS_REGION",
            std::env::var("AWS_REGION").unwrap_or_else(|_| "us-east-1".into()),
        ),
        ("TZ", "UTC".into()),
        ("LANG", "C.UTF-8".into()),
        (
            "PATH",
            std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into()),
        ),
        ("HOME", e.home.display().to_string()),
        ("TMPDIR", e.home.display().to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    if e.manifest.runtime == wire::Runtime::Python {
        env.push(("PYTHONUNBUFFERED".into(), "1".into()));
        env.push(("PYTHONDONTWRITEBYTECODE".into(), "1".into()));
    }
    env
}

/// Bytes waiting unread in a pipe.
fn unread(fd: &std::os::fd::OwnedFd) -> i32 {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int through the pointer; the descriptor
    // is ours (a duplicate) and open while `fd` lives.
    let rc = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(fd),
            libc::FIONREAD,
            &mut n as *mut libc::c_int,
        )
    };
    if rc == 0 {
        n
    } else {
        0
    }
}

/// Longest line of a runner's output logged whole; a longer one is split.
const MAX_LINE: usize = 16 * 1024;

/// Copies a runner's output into the log of the attempt it serves as it
/// arrives, logs it line by line (bytes that are not UTF-8 shown replaced;
/// a line past [`MAX_LINE`] split), and keeps the end of stderr.
async fn log_lines<R: AsyncRead + Unpin>(
    mut r: R,
    bundle: String,
    tail: Option<Arc<Mutex<VecDeque<u8>>>>,
    capture: Slot,
) {
    let mut buf = [0u8; 8192];
    let mut pending: Vec<u8> = Vec::new();
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let chunk = &buf[..n];
        if let Some(log) = capture.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            log.lock().unwrap_or_else(|p| p.into_inner()).push(chunk);
        }
        if let Some(tail) = &tail {
            let mut t = tail.lock().unwrap_or_else(|p| p.into_inner());
            for &b in chunk {
                if t.len() == TAIL_BYTES {
                    t.pop_front();
                }
                t.push_back(b);
            }
        }
        pending.extend_from_slice(chunk);
        while let Some(i) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=i).collect();
            trace_line(&bundle, &line[..i]);
        }
        if pending.len() > MAX_LINE {
            trace_line(&bundle, &pending);
            pending.clear();
        }
    }
    if !pending.is_empty() {
        trace_line(&bundle, &pending);
    }
}

fn trace_line(bundle: &str, line: &[u8]) {
    tracing::info!(target: "udf", bundle, "{}", String::from_utf8_lossy(line));
}

#[cfg(test)]
mod tests {
    /// Review M11: a bundle fetch that fails names neither the presigned
    /// URL nor its signature, since the message becomes the task's failure.
    #[tokio::test]
    async fn a_failed_bundle_fetch_error_does_not_carry_the_presigned_url() {
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let url = format!("http://127.0.0.1:{closed}/b.tar.gz?X-Amz-Signature=SIGSECRET");
        let err = super::download(&reqwest::Client::new(), &url)
            .await
            .unwrap_err();
        let shown = format!("{err:#}");
        assert!(shown.starts_with("fetching the bundle"), "{shown}");
        assert!(!shown.contains("SIGSECRET"), "{shown}");
        assert!(!shown.contains("b.tar.gz"), "{shown}");
    }
}

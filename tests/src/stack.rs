//! End-to-end harness: the real `dispatcher` and `worker-wrapper` binaries
//! as child processes against a test database. The dispatcher can be killed
//! (SIGKILL or an armed failpoint) and restarted on the same port; workers
//! run in their own process groups so a signal reaches their tasks too.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use chrono::Utc;
use dispatcher::tokens::Keyring;
use serde_json::Value;
use uuid::Uuid;

use crate::{free_port, TestDb};

/// `target/debug` (or wherever this test binary was built).
/// The cargo profile directory (`target/debug`, `target/release`) holding the
/// binaries: test executables live one level down in `deps/`, while a binary
/// of this crate (the benchmark) lives in the profile directory itself.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("exe dir");
    if dir.file_name().is_some_and(|name| name == "deps") {
        dir.parent().expect("target dir").to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

pub fn binary(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (`cargo build --workspace --bins`; scripts/test does)",
        path.display()
    );
    path
}

/// Options of a worker process.
#[derive(Debug, Clone)]
pub struct WorkerOpts {
    pub id: String,
    pub concurrency: usize,
    pub lease_seconds: u32,
    pub visibility_seconds: u32,
    /// The credential to give it; by default a valid one for `id`.
    pub credential: Option<String>,
    /// Run the wrapper itself under this (unprivileged) uid and gid.
    pub run_as: Option<u32>,
    /// Pass `--insecure-shared-uid` (a non-root wrapper refuses to start
    /// without it).
    pub insecure_shared_uid: bool,
    /// The dispatcher it talks to; by default the stack's first one.
    pub dispatcher_url: Option<String>,
    /// `WORKER_EXEC` (`off`, `any` or a list of programs); by default
    /// `any`, on either profile, since most tests run exec tasks.
    pub exec: Option<String>,
    /// More environment of the worker process.
    pub env: Vec<(String, String)>,
}

impl WorkerOpts {
    pub fn new(id: &str) -> Self {
        WorkerOpts {
            id: id.into(),
            concurrency: 8,
            lease_seconds: 2,
            visibility_seconds: 5,
            credential: None,
            run_as: None,
            insecure_shared_uid: false,
            dispatcher_url: None,
            exec: None,
            env: Vec::new(),
        }
    }
}

/// Writes `text` to a new file readable by its owner only (0600), as a
/// key or credential file must be.
pub fn write_secret(path: &std::path::Path, text: &str) {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
    f.write_all(text.as_bytes()).expect("writing a secret file");
}

pub struct Worker {
    pub child: Child,
    pub log: PathBuf,
}

impl Worker {
    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("pid")
    }

    /// Sends `signal` to the worker's whole process group (it and its tasks).
    pub fn signal_group(&self, signal: i32) {
        // SAFETY: kill(2) with a negative pid signals a process group; no
        // memory is shared with the callee.
        let rc = unsafe { libc::kill(-self.pid(), signal) };
        assert_eq!(rc, 0, "kill(-{}, {signal}) failed", self.pid());
    }

    /// Sends `signal` to the wrapper process alone (not its tasks).
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on a child pid we own; no memory is shared.
        let rc = unsafe { libc::kill(self.pid(), signal) };
        assert_eq!(rc, 0, "kill({}, {signal}) failed", self.pid());
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe {
            libc::kill(-self.pid(), libc::SIGCONT);
            libc::kill(-self.pid(), libc::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

/// End-to-end stacks run one at a time: each spawns hundreds of processes,
/// and timing figures (recovery) should not measure another stack's load.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub struct Stack {
    _turn: tokio::sync::MutexGuard<'static, ()>,
    pub db: TestDb,
    pub port: u16,
    pub keys: Keyring,
    pub dir: PathBuf,
    key_file: PathBuf,
    pub dispatcher: Option<Child>,
    restarts: u32,
    pub org_id: Uuid,
    /// A member of the org (bundles are pushed as this user).
    pub user_id: Uuid,
    /// Extra environment of the dispatcher and worker processes (the aws
    /// profile's).
    pub profile_env: Vec<(String, String)>,
}

/// A further dispatcher replica of a stack (`Stack::start_replica`).
pub struct Replica {
    pub child: Child,
    pub url: String,
    pub port: u16,
}

impl Replica {
    /// SIGKILL: no cleanup, no answer to calls in flight.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if let Some(mut d) = self.dispatcher.take() {
            let _ = d.kill();
            let _ = d.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Stack {
    pub async fn new() -> Stack {
        let turn = ONE_AT_A_TIME.lock().await;
        let db = TestDb::new().await;
        let dir = std::env::temp_dir().join(format!("e2e-{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("tmp dir");
        // Tasks run under uids of their own: they must reach the programs
        // in here (whatever the umask), but not the secrets (0600).
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod tmp dir");
        for name in ["worker-wrapper", "udf-probe"] {
            let to = dir.join(name);
            std::fs::copy(binary(name), &to).expect("copying a task program");
            std::fs::set_permissions(&to, std::os::unix::fs::PermissionsExt::from_mode(0o755))
                .expect("chmod task program");
        }
        let (pem, _) = dispatcher::tokens::generate_key_pem();
        let key_file = dir.join("signing.pem");
        write_secret(&key_file, &pem);
        let keys = Keyring::from_pem("dispatcher", &pem, &[], 5).expect("keyring");
        let store = dispatcher::store::Store::new(db.pool.clone(), Default::default());
        let org_id = store.ensure_org("e2e").await.expect("org");
        // The sample task publishes to `sample_events`; the dispatcher's
        // sink ingests into the data database `migrate` would create.
        let user = store.ensure_user("e2e@test").await.expect("user");
        let stream = dispatcher::domain::new_dataset(dispatcher_wire::CreateDatasetRequest {
            name: "sample_events".into(),
            mode: dispatcher_wire::DatasetMode::Stream,
            columns: dispatcher_wire::sample_columns(),
        })
        .expect("dataset");
        store
            .create_dataset(org_id, user, &stream)
            .await
            .expect("sample_events");
        store
            .set_membership(org_id, user, dispatcher::domain::Role::Member)
            .await
            .expect("membership");
        db.data().await.close().await;
        Stack {
            _turn: turn,
            db,
            port: free_port(),
            keys,
            dir,
            key_file,
            dispatcher: None,
            restarts: 0,
            org_id,
            user_id: user,
            profile_env: Vec::new(),
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Starts the dispatcher (all roles) with the given failpoints armed,
    /// and waits until it answers `/healthz` (or a failpoint has fired).
    pub async fn start_dispatcher(&mut self, failpoints: &str) {
        assert!(self.dispatcher.is_none(), "dispatcher already running");
        let log = std::fs::File::create(self.dir.join(format!("dispatcher-{}.log", self.restarts)))
            .expect("log");
        self.restarts += 1;
        let child = self.spawn_dispatcher(self.port, failpoints, log);
        self.dispatcher = Some(child);
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(status) = self
                .dispatcher
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                // An armed failpoint may fire before the server answers (the
                // relay publishes at once): that exit is the one the caller
                // waits for. Any other exit during start is a failure.
                let log = std::fs::read_to_string(
                    self.dir
                        .join(format!("dispatcher-{}.log", self.restarts - 1)),
                )
                .unwrap_or_default();
                if !failpoints.is_empty() && log.contains("failpoint ") {
                    return;
                }
                panic!("dispatcher exited during start: {status}\n{log}");
            }
            if client
                .get(format!("{}/healthz", self.url()))
                .send()
                .await
                .is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("dispatcher did not answer within 20 s");
    }

    fn spawn_dispatcher(&self, port: u16, failpoints: &str, log: std::fs::File) -> Child {
        self.dispatcher_command(port, failpoints, log)
            .spawn()
            .expect("start dispatcher")
    }

    fn dispatcher_command(&self, port: u16, failpoints: &str, log: std::fs::File) -> Command {
        let mut cmd = Command::new(binary("dispatcher"));
        cmd.arg("serve")
            .env("DATABASE_URL", self.db.url())
            .env("DISPATCHER_SIGNING_KEY_FILE", &self.key_file)
            .env("DISPATCHER_BIND", format!("127.0.0.1:{port}"))
            .env("DISPATCHER_FAILPOINTS", failpoints)
            .env("DISPATCHER_OBJECTS_DIR", self.dir.join("objects"))
            // Crash tests kill the dispatcher while its sink may hold
            // pointers: they come back after this, not after the default
            // 60 s (as leases here are short too).
            .env("DISPATCHER_SINK_VISIBILITY_SECONDS", "2")
            .env("RUST_LOG", "info,sqlx=warn")
            .envs(self.profile_env.iter().map(|(k, v)| (k, v)))
            .stdout(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.dir.join("dispatcher.stdout"))
                    .expect("dispatcher stdout"),
            )
            .stderr(log);
        cmd
    }

    /// What the dispatchers of this stack printed on stdout (their logs are
    /// on stderr).
    pub fn dispatcher_stdout(&self) -> String {
        std::fs::read_to_string(self.dir.join("dispatcher.stdout")).unwrap_or_default()
    }

    /// Starts another `dispatcher serve` (all roles) on the same database,
    /// keys and objects, on `port` or a free one, and waits until it answers.
    /// It is killed when the returned replica is dropped.
    pub async fn start_replica(&self, name: &str, port: Option<u16>) -> Replica {
        let mut replica = self.spawn_replica(name, port, &[]);
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = replica.child.try_wait().expect("try_wait") {
                panic!("replica {name} exited during start: {status}");
            }
            if client
                .get(format!("{}/healthz", replica.url))
                .send()
                .await
                .is_ok()
            {
                return replica;
            }
            assert!(Instant::now() < deadline, "replica {name} did not answer");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Spawns another `dispatcher serve` like `start_replica`, with `env`
    /// on top of the stack's, without waiting for it; its stderr goes to
    /// `dispatcher-{name}.log` in the stack's directory.
    pub fn spawn_replica(&self, name: &str, port: Option<u16>, env: &[(&str, &str)]) -> Replica {
        let port = port.unwrap_or_else(free_port);
        let log =
            std::fs::File::create(self.dir.join(format!("dispatcher-{name}.log"))).expect("log");
        let mut cmd = self.dispatcher_command(port, "", log);
        cmd.envs(env.iter().copied());
        Replica {
            child: cmd.spawn().expect("start dispatcher replica"),
            url: format!("http://127.0.0.1:{port}"),
            port,
        }
    }

    /// Waits until the dispatcher process has exited (a failpoint fired);
    /// returns false on timeout.
    pub async fn wait_dispatcher_exit(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(c) = self.dispatcher.as_mut() {
                if c.try_wait().expect("try_wait").is_some() {
                    self.dispatcher = None;
                    return true;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    pub fn kill_dispatcher(&mut self) {
        if let Some(mut c) = self.dispatcher.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Runs the dispatcher and the workers on the aws profile against
    /// `moto` (workers then receive from SQS directly): creates the
    /// queues (with redrive policies) and the bucket under a fresh prefix.
    pub async fn use_aws_profile(&mut self, moto: &crate::moto::Moto) {
        let sqs = moto.sqs();
        dispatcher::queue::SqsQueue::create_queues(&sqs, 5)
            .await
            .expect("queues");
        let bucket = format!("b{}", sqs.queue_prefix.trim_end_matches('-'));
        let s3 = dispatcher::objects::S3Config {
            region: sqs.region.clone(),
            endpoint_url: sqs.endpoint_url.clone(),
            bucket: bucket.clone(),
            static_credentials: sqs.static_credentials.clone(),
        };
        dispatcher::objects::S3Store::create_bucket(&s3)
            .await
            .expect("bucket");
        let (id, secret) = sqs.static_credentials.clone().expect("credentials");
        self.profile_env = vec![
            ("DISPATCHER_PROFILE".into(), "aws".into()),
            ("AWS_ENDPOINT_URL".into(), moto.url()),
            ("AWS_REGION".into(), sqs.region.clone()),
            ("AWS_ACCESS_KEY_ID".into(), id),
            ("AWS_SECRET_ACCESS_KEY".into(), secret),
            (
                "DISPATCHER_SQS_QUEUE_PREFIX".into(),
                sqs.queue_prefix.clone(),
            ),
            ("DISPATCHER_S3_BUCKET".into(), bucket),
        ];
    }

    /// The path of a worker's credential file (0600), as `start_worker`
    /// writes it.
    pub fn credential_file(&self, worker_id: &str) -> PathBuf {
        self.dir.join(format!("{worker_id}.credential"))
    }

    /// Starts a worker-wrapper with its credential in a 0600 file
    /// (`WORKER_CREDENTIAL_FILE`), in a process group of its own.
    pub fn start_worker(&self, opts: &WorkerOpts) -> Worker {
        use std::os::unix::process::CommandExt;
        let log = self.dir.join(format!("{}.log", opts.id));
        let credential = opts.credential.clone().unwrap_or_else(|| {
            self.keys
                .mint_worker(&opts.id, Utc::now() + chrono::Duration::hours(1))
        });
        let credential_file = self.credential_file(&opts.id);
        let _ = std::fs::remove_file(&credential_file);
        write_secret(&credential_file, &credential);
        let mut cmd = Command::new(binary("worker-wrapper"));
        if let Some(uid) = opts.run_as {
            std::os::unix::fs::chown(&credential_file, Some(uid), Some(uid))
                .expect("chown credential");
            cmd.uid(uid).gid(uid);
        }
        if opts.insecure_shared_uid {
            cmd.env("WORKER_INSECURE_SHARED_UID", "true");
        }
        cmd.env("WORKER_EXEC", opts.exec.as_deref().unwrap_or("any"));
        let child = cmd
            .arg("run")
            .arg("--wait-seconds")
            .arg("1")
            .arg("--visibility-seconds")
            .arg(opts.visibility_seconds.to_string())
            .env(
                "DISPATCHER_URL",
                opts.dispatcher_url.clone().unwrap_or_else(|| self.url()),
            )
            .env("WORKER_CREDENTIAL_FILE", &credential_file)
            .env("WORKER_ID", &opts.id)
            .env("WORKER_CONCURRENCY", opts.concurrency.to_string())
            .env("WORKER_LEASE_SECONDS", opts.lease_seconds.to_string())
            .env("RUST_LOG", "info")
            .envs(self.profile_env.iter().map(|(k, v)| (k, v)))
            .envs(opts.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .process_group(0)
            .spawn()
            .expect("start worker");
        Worker { child, log }
    }

    /// A user token of the org's member.
    pub fn user_token(&self) -> String {
        self.keys.mint_user(
            self.user_id,
            self.org_id,
            Utc::now() + chrono::Duration::hours(1),
        )
    }

    /// Pushes the bundle directory `dir` with the real CLI
    /// (`dispatcher bundle push`), tagging it `tag` if given; its digest.
    pub fn push_bundle(&self, dir: &std::path::Path, tag: Option<&str>) -> String {
        let mut cmd = Command::new(binary("dispatcher"));
        cmd.arg("bundle").arg("push").arg(dir);
        if let Some(tag) = tag {
            cmd.arg("--tag").arg(tag);
        }
        let out = cmd
            .env("DISPATCHER_URL", self.url())
            .env("DISPATCHER_TOKEN", self.user_token())
            .output()
            .expect("running dispatcher bundle push");
        assert!(
            out.status.success(),
            "bundle push failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let digest = String::from_utf8(out.stdout)
            .expect("utf-8")
            .trim()
            .to_owned();
        assert!(dispatcher::bundles::is_digest(&digest), "{digest:?}");
        digest
    }

    /// The `sample-task` bundle (a copy of the binary that any uid may run).
    pub fn sample_bundle(&self) -> String {
        format!("{} sample-task", self.dir.join("worker-wrapper").display())
    }

    /// The `udf-probe` program (a copy that any uid may run).
    pub fn probe_bundle(&self) -> String {
        self.dir.join("udf-probe").display().to_string()
    }

    /// The wake-up mode the stack's processes run with (ADR 0017): what
    /// `profile_env` asks for, else the profile's default.
    pub fn wakeups(&self) -> dispatcher::settings::Wakeups {
        let env = |k: &str| {
            self.profile_env
                .iter()
                .rev()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
        };
        match (env("DISPATCHER_WAKEUPS"), env("DISPATCHER_PROFILE")) {
            (Some("queue"), _) | (None, Some("aws")) => dispatcher::settings::Wakeups::Queue,
            _ => dispatcher::settings::Wakeups::Notify,
        }
    }

    /// Submits a job straight into the store (the jobs API is tested
    /// elsewhere); returns its task ids in submission order.
    pub async fn submit(&self, job: Value) -> (Uuid, Vec<Uuid>) {
        let settings = dispatcher::settings::Settings {
            wakeups: self.wakeups(),
            ..Default::default()
        };
        let store = dispatcher::store::Store::new(
            self.db.pool.clone(),
            std::sync::Arc::new(settings.clone()),
        );
        let job = dispatcher::domain::new_job(serde_json::from_value(job).expect("job"), &settings)
            .expect("valid job");
        let view = store
            .submit_job(self.org_id, None, &job)
            .await
            .expect("submit");
        (view.job_id, view.tasks.iter().map(|t| t.task_id).collect())
    }

    /// `n` independent sample tasks, each with one event and one publish.
    pub fn flat_job(&self, n: usize, inputs: Value) -> Value {
        let tasks: Vec<Value> = (0..n)
            .map(|i| {
                serde_json::json!({"key": format!("t{i}"), "runtime": "exec", "bundle": self.sample_bundle(),
                                   "inputs": inputs, "outputs": ["sample_events"], "max_attempts": 10})
            })
            .collect();
        serde_json::json!({"name": "e2e", "tasks": tasks})
    }

    /// Waits until no task of the database is unfinished; panics with the
    /// counts on timeout.
    /// Waits (at most `timeout`, then panics) for job `job` to leave
    /// `running`; its state then.
    pub async fn job_ended(&self, job: Uuid, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let state: String = sqlx::query_scalar("SELECT state FROM jobs WHERE id = $1")
                .bind(job)
                .fetch_one(&self.db.pool)
                .await
                .expect("the job's state");
            if state != "running" {
                return state;
            }
            assert!(
                Instant::now() < deadline,
                "job {job} still running after {timeout:?}; logs in {}",
                self.dir.display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn wait_all_finished(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            // A job ends after its last task (by the completion, or the
            // reaper when a crash came between): wait for both.
            let open: i64 = sqlx::query_scalar(
                "SELECT (SELECT count(*) FROM tasks WHERE state NOT IN ('succeeded', 'failed', 'cancelled'))
                      + (SELECT count(*) FROM jobs WHERE state = 'running')",
            )
                .fetch_one(&self.db.pool)
                .await
                .expect("count");
            if open == 0 {
                return;
            }
            if Instant::now() > deadline {
                let states: Vec<(String, i64)> =
                    sqlx::query_as("SELECT state, count(*) FROM tasks GROUP BY state")
                        .fetch_all(&self.db.pool)
                        .await
                        .unwrap();
                panic!(
                    "{open} tasks unfinished after {timeout:?}: {states:?}; logs in {}",
                    self.dir.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Writes (events, publishes, completions) accepted from an attempt
    /// after its successor was claimed: zero, or fencing failed.
    pub async fn stale_writes_accepted(&self) -> i64 {
        sqlx::query_scalar(
            "SELECT (SELECT count(*) FROM task_events e JOIN attempts n
                       ON n.task_id = e.task_id AND n.attempt = e.attempt + 1 WHERE e.created_at >= n.claimed_at)
                  + (SELECT count(*) FROM buffer_publishes b JOIN attempts n
                       ON n.task_id = b.task_id AND n.attempt = b.attempt + 1 WHERE b.created_at >= n.claimed_at)
                  + (SELECT count(*) FROM attempts a JOIN attempts n
                       ON n.task_id = a.task_id AND n.attempt = a.attempt + 1
                      WHERE a.completion IS NOT NULL AND a.finished_at >= n.claimed_at)",
        )
        .fetch_one(&self.db.pool)
        .await
        .expect("stale writes")
    }

    /// The invariants every scenario ends with: every task succeeded with
    /// exactly one committed success; no write of an attempt was accepted
    /// after the next attempt was claimed; every outbox row was published.
    pub async fn assert_clean(&self, expected_tasks: i64) {
        self.assert_clean_after_pruning(expected_tasks, false).await
    }

    /// [`Stack::assert_clean`] when the pruner may have deleted finished
    /// jobs (`pruned`): the tasks still there and those deleted
    /// (`pg_stat_user_tables.n_tup_del`, which may lag a moment) make
    /// `expected_tasks`, and every task still there succeeded exactly once.
    pub async fn assert_clean_after_pruning(&self, expected_tasks: i64, pruned: bool) {
        let pool = &self.db.pool;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (tasks, succeeded, deleted): (i64, i64, i64) = sqlx::query_as(
                "SELECT count(*), count(*) FILTER (WHERE state = 'succeeded'),
                        (SELECT n_tup_del FROM pg_stat_user_tables WHERE relname = 'tasks')
                   FROM tasks",
            )
            .fetch_one(pool)
            .await
            .unwrap();
            let deleted = if pruned { deleted } else { 0 };
            if !pruned || tasks + deleted == expected_tasks || Instant::now() > deadline {
                assert_eq!(
                    (tasks + deleted, succeeded),
                    (expected_tasks, tasks),
                    "every task succeeded ({deleted} pruned)"
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let not_once: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM (SELECT t.id FROM tasks t LEFT JOIN attempts a
                 ON a.task_id = t.id AND a.response->>'state' = 'succeeded'
               GROUP BY t.id HAVING count(a.attempt) <> 1) x",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        assert_eq!(not_once, 0, "tasks without exactly one committed success");
        let jobs_not_succeeded: i64 =
            sqlx::query_scalar("SELECT count(*) FROM jobs WHERE state <> 'succeeded'")
                .fetch_one(pool)
                .await
                .unwrap();
        assert_eq!(jobs_not_succeeded, 0, "every job succeeded");
        let stale = self.stale_writes_accepted().await;
        assert_eq!(
            stale, 0,
            "writes accepted from an attempt after its successor was claimed"
        );
        // The relay may still be publishing the last rows: wait for it.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (pending, dead): (i64, i64) = sqlx::query_as(
                "SELECT count(*) FILTER (WHERE state = 'pending'), count(*) FILTER (WHERE state = 'dead') FROM outbox",
            )
            .fetch_one(pool)
            .await
            .unwrap();
            assert_eq!(dead, 0, "dead outbox rows");
            if pending == 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{pending} outbox rows never published"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Every published batch reaches the data database, once.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (pending, dead): (i64, i64) = sqlx::query_as(
                "SELECT count(*) FILTER (WHERE state = 'pending'), count(*) FILTER (WHERE state = 'dead')
                   FROM buffer_publishes",
            )
            .fetch_one(pool)
            .await
            .unwrap();
            assert_eq!(dead, 0, "dead buffer batches");
            if pending == 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{pending} buffer batches never ingested"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Queue mode: every task had its wake-up message. Notify mode (the
        // local default): none was ever written.
        let (unwoken, messages): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM tasks t WHERE NOT EXISTS (
                        SELECT 1 FROM outbox o
                         WHERE o.topic = 'wakeup' AND o.payload->>'task_id' = t.id::text)),
                    (SELECT count(*) FROM outbox WHERE topic = 'wakeup')
                  + (SELECT count(*) FROM queue_messages WHERE queue LIKE 'wakeups%')",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        match self.wakeups() {
            dispatcher::settings::Wakeups::Queue => {
                assert_eq!(unwoken, 0, "a task never had a wake-up in the outbox")
            }
            dispatcher::settings::Wakeups::Notify => {
                assert_eq!(messages, 0, "wake-up messages written in notify mode")
            }
        }
    }
}

/// Calls a `Stack`'s dispatcher over HTTP as a worker and its tasks would,
/// tolerating a dispatcher that is down (crash tests).
pub struct Caller {
    pub http: reqwest::Client,
    pub base: String,
}

impl Caller {
    pub fn new(stack: &Stack) -> Caller {
        Caller {
            http: reqwest::Client::new(),
            base: stack.url(),
        }
    }

    /// A POST; the status and JSON body, or the transport error.
    pub async fn post(
        &self,
        path: &str,
        token: &str,
        body: Value,
    ) -> Result<(u16, Value), reqwest::Error> {
        let resp = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(token)
            .json(&body)
            .send()
            .await?;
        let status = resp.status().as_u16();
        Ok((status, resp.json().await.unwrap_or(Value::Null)))
    }

    /// Claims (retrying while the task is not claimable yet); the claim.
    pub async fn claim(&self, worker: &str, task: Uuid, lease_seconds: u32) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let body = serde_json::json!({"task_id": task, "worker_id": "e2e",
                                          "lease_seconds": lease_seconds});
            if let Ok((200, claim)) = self.post("/internal/task-claim", worker, body).await {
                return claim;
            }
            assert!(Instant::now() < deadline, "the task never became claimable");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Uploads `body` at `name` under the claim's prefix through a
    /// presigned URL; the absolute key.
    pub async fn upload(&self, claim: &Value, name: &str, body: &[u8]) -> String {
        let token = claim["capability_token"].as_str().expect("token");
        let (status, urls) = self
            .post(
                "/v1/task/objects",
                token,
                serde_json::json!({"method": "PUT", "keys": [name]}),
            )
            .await
            .expect("objects");
        assert_eq!(status, 200, "{urls}");
        let put = self
            .http
            .put(urls["urls"][0]["url"].as_str().expect("url"))
            .body(body.to_vec())
            .send()
            .await
            .expect("PUT");
        assert!(put.status().is_success(), "{}", put.status());
        urls["urls"][0]["key"].as_str().expect("key").to_owned()
    }
}

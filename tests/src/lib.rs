//! Test harness: a real Postgres database per test (created from
//! `DATABASE_URL`, dropped when the test ends), and the real HTTP server on a
//! free loopback port.
//!
//! Tests never sleep to move time: they move the lease clock in the database
//! (`expire_lease`, `skip_backoff`), which is the only clock leases obey.

use std::net::SocketAddr;
use std::sync::Arc;

use chrono::Utc;
use dispatcher::roles::{self, Roles};
use dispatcher::settings::Settings;
use dispatcher::store::Store;
use dispatcher::tokens::Keyring;
use dispatcher_wire as wire;
use reqwest::StatusCode;
use serde_json::{json, Value};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgPool};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The admin connection URL: `DATABASE_URL`, or the local default.
pub fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

pub mod invoke;
pub mod moto;
pub mod s3s;
pub mod stack;

/// The property tests' runner settings: `PROPTEST_CASES` cases (default 64).
pub fn proptest_config() -> proptest::test_runner::Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(64);
    proptest::test_runner::Config {
        cases,
        ..Default::default()
    }
}

/// A free loopback port for a server a test starts.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// A loopback TCP forwarder to `target` that a test can cut: while down,
/// it takes each connection and drops it at once, so the dependency
/// behind it is unreachable to the code under test; up again, it forwards.
pub struct Switch {
    pub port: u16,
    up: Arc<std::sync::atomic::AtomicBool>,
    /// Connections it took while down.
    pub refused: Arc<std::sync::atomic::AtomicUsize>,
}

impl Switch {
    pub async fn start(target: std::net::SocketAddr) -> Switch {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = Arc::new(AtomicBool::new(true));
        let refused = Arc::new(AtomicUsize::new(0));
        let (flag, count) = (up.clone(), refused.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !flag.load(Ordering::SeqCst) {
                    count.fetch_add(1, Ordering::SeqCst);
                    drop(inbound);
                    continue;
                }
                tokio::spawn(async move {
                    if let Ok(mut out) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                });
            }
        });
        Switch { port, up, refused }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Cuts (false) or restores (true) the dependency. Connections already
    /// forwarded stay; new ones are dropped while down.
    pub fn set_up(&self, up: bool) {
        self.up.store(up, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn refused(&self) -> usize {
        self.refused.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Waits until `ready` answers true for a server process the harness
/// started; panics if the process exits first (saying `if_exits`) or after
/// `timeout`.
pub async fn wait_ready<F, Fut>(
    child: &mut std::process::Child,
    name: &str,
    if_exits: &str,
    timeout: std::time::Duration,
    mut ready: F,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            panic!("{name} exited at once ({status}){if_exits}");
        }
        if ready().await {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{name} did not answer within {timeout:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Default settings without request rates worth the name, for tests that
/// drive many calls through one user or task (the rate limits have tests
/// of their own).
pub fn unthrottled() -> Settings {
    let high = dispatcher::settings::Rate {
        per_second: 1_000_000,
        burst: 1_000_000,
    };
    Settings {
        rate_per_org: high,
        rate_per_user: high,
        rate_per_task: high,
        rate_per_worker: high,
        ..Settings::default()
    }
}

/// The benchmarks' command line: `--name N` pairs of positive numbers,
/// each setting the flag of that name; anything else panics with `usage`.
pub fn numeric_flags(usage: &str, flags: &mut [(&str, &mut usize)]) {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut it = argv.iter();
    while let Some(flag) = it.next() {
        let value = it
            .next()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|v| *v > 0)
            .unwrap_or_else(|| panic!("{flag} needs a positive number"));
        let slot = flags
            .iter_mut()
            .find(|(name, _)| flag.strip_prefix("--") == Some(*name))
            .unwrap_or_else(|| panic!("unknown flag {flag}; usage: {usage}"));
        *slot.1 = value;
    }
}

/// A database of its own, migrated, dropped (with its connections) on drop.
/// It is a copy of a template migrated once per set of migrations (named
/// by their checksums), so a test pays for `CREATE DATABASE … TEMPLATE`,
/// not for every migration.
pub struct TestDb {
    pub pool: PgPool,
    name: String,
    admin: PgConnectOptions,
}

/// The migrated template of this process's tests, made once (across
/// processes too: an advisory lock guards the making).
static TEMPLATE: tokio::sync::OnceCell<String> = tokio::sync::OnceCell::const_new();

async fn template(admin: &PgConnectOptions) -> String {
    use sha2::Digest;
    let mut sum = sha2::Sha256::new();
    for m in dispatcher::store::MIGRATOR.iter() {
        sum.update(m.version.to_le_bytes());
        sum.update(&*m.checksum);
    }
    let digest = sum.finalize();
    let name = format!("test_tmpl_{}", hex::encode(&digest[..8]));
    let lock = i64::from_le_bytes(digest[..8].try_into().expect("8 bytes"));
    let mut conn = admin
        .connect()
        .await
        .expect("connecting to make the template");
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(lock)
        .execute(&mut conn)
        .await
        .expect("the template lock");
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&name)
            .fetch_one(&mut conn)
            .await
            .expect("looking for the template");
    if !exists {
        // Built under another name and renamed: a run killed mid-way
        // leaves no half-migrated template behind.
        let building = format!("{name}_building");
        for sql in [
            format!("DROP DATABASE IF EXISTS {building} WITH (FORCE)"),
            format!("CREATE DATABASE {building}"),
        ] {
            sqlx::query(&sql).execute(&mut conn).await.expect(&sql);
        }
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .connect_with(admin.clone().database(&building))
            .await
            .expect("connecting to the template");
        dispatcher::store::MIGRATOR
            .run(&pool)
            .await
            .expect("applying migrations to the template");
        pool.close().await;
        // A closed pool's sessions end asynchronously, and an autovacuum
        // worker may be in the new database; a rename (and a copy) needs it
        // to have no session, so the stragglers are ended and the rename
        // tried again until it lands.
        let rename = format!("ALTER DATABASE {building} RENAME TO {name}");
        let mut tries = 0;
        loop {
            sqlx::query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE datname = $1 AND pid <> pg_backend_pid()",
            )
            .bind(&building)
            .execute(&mut conn)
            .await
            .expect("ending the template's sessions");
            match sqlx::query(&rename).execute(&mut conn).await {
                Ok(_) => break,
                Err(e) if tries < 100 => {
                    tries += 1;
                    eprintln!("naming the template, try {tries}: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                Err(e) => panic!("naming the template: {e}"),
            }
        }
        // Templates of other migrations are stale.
        let stale: Vec<String> = sqlx::query_scalar(
            "SELECT datname FROM pg_database WHERE datname LIKE 'test\\_tmpl\\_%' AND datname <> $1",
        )
        .bind(&name)
        .fetch_all(&mut conn)
        .await
        .unwrap_or_default();
        for db in stale {
            sqlx::query(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
                .execute(&mut conn)
                .await
                .ok();
        }
    }
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(lock)
        .execute(&mut conn)
        .await
        .ok();
    conn.close().await.ok();
    name
}

impl TestDb {
    pub async fn new() -> TestDb {
        let url = database_url();
        let admin: PgConnectOptions = dispatcher::store::parse_url(&url)
            .unwrap_or_else(|e| panic!("DATABASE_URL {url:?} is not a Postgres URL: {e}"));
        let name = format!("test_{}", Uuid::new_v4().simple());
        let mut conn = admin.connect().await.unwrap_or_else(|e| {
            panic!(
                "these tests need a running Postgres; could not connect with DATABASE_URL={url:?}: {e}. \
                 Start Postgres or point DATABASE_URL at one."
            )
        });
        let template = TEMPLATE.get_or_init(|| template(&admin)).await;
        sqlx::query(&format!("CREATE DATABASE {name} TEMPLATE {template}"))
            .execute(&mut conn)
            .await
            .expect("CREATE DATABASE");
        conn.close().await.ok();
        let pool = PgPoolOptions::new()
            .max_connections(20)
            .connect_with(admin.clone().database(&name))
            .await
            .expect("connecting to the test database");
        TestDb { pool, name, admin }
    }

    /// The connection options of this test's data database.
    pub fn data_options(&self) -> PgConnectOptions {
        self.admin.clone().database(&format!("{}_data", self.name))
    }

    /// This test's data database (`<name>_data`, as `migrate` names it),
    /// created and migrated on first use, dropped with the test database.
    pub async fn data(&self) -> PgPool {
        let data = self.data_options();
        dispatcher::datadb::ensure(&self.admin, &data)
            .await
            .expect("creating the data database");
        PgPoolOptions::new()
            .max_connections(20)
            .connect_with(data)
            .await
            .expect("connecting to the data database")
    }

    /// The data database's URL, for child processes.
    pub fn data_url(&self) -> String {
        self.url()
            .replacen(&self.name, &format!("{}_data", self.name), 1)
    }

    /// A URL of this database, for child processes: `DATABASE_URL` with
    /// its database name replaced.
    pub fn url(&self) -> String {
        let base = database_url();
        let (head, query) = match base.split_once('?') {
            Some((h, q)) => (h.to_owned(), format!("?{q}")),
            None => (base.clone(), String::new()),
        };
        let scheme_end = head.find("://").map(|i| i + 3).unwrap_or(0);
        let root = match head[scheme_end..].find('/') {
            Some(i) => head[..scheme_end + i].to_owned(),
            None => head.clone(),
        };
        format!("{root}/{}{query}", self.name)
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        let admin = self.admin.clone();
        // Drop runs inside the test's runtime; use a runtime of our own. The
        // pool is not closed first: connections held by server tasks of the
        // (now blocked) test runtime would never be returned. FORCE ends them.
        let dropped = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let mut conn = admin.connect().await?;
                for db in [format!("{name}_data"), name] {
                    sqlx::query(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
                        .execute(&mut conn)
                        .await?;
                }
                Ok::<_, sqlx::Error>(())
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("warning: could not drop test database {}", self.name);
        }
    }
}

/// A running dispatcher with one org, one member, and credentials.
pub struct TestApp {
    pub addr: SocketAddr,
    pub client: reqwest::Client,
    pub keys: Arc<Keyring>,
    /// The PKCS#8 PEM of the signing key, so tests can sign arbitrary claims
    /// with the genuine key.
    pub signing_pem: String,
    pub settings: Arc<Settings>,
    pub store: Store,
    pub org_id: Uuid,
    pub user_id: Uuid,
    pub user_token: String,
    pub worker_token: String,
    /// The local object store's directory (removed on drop).
    pub objects_dir: std::path::PathBuf,
    /// The object store the API uses (the local directory's, or the one
    /// passed to `spawn_with_objects`).
    pub objects: Arc<dyn dispatcher::objects::ObjectStore>,
    shutdown: CancellationToken,
    // Last: dropped after the server is told to stop.
    pub db: TestDb,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
        let _ = std::fs::remove_dir_all(&self.objects_dir);
    }
}

pub struct Response {
    pub status: StatusCode,
    pub body: Value,
}

impl Response {
    /// The contract's error code, if this is an error body.
    pub fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }
}

impl TestApp {
    pub async fn spawn() -> TestApp {
        Self::spawn_with(Settings::default()).await
    }

    /// Default settings but the `queue` wake-up mode (the aws profile's):
    /// tests of wake-up messages, the outbox and the relay.
    pub async fn spawn_queued() -> TestApp {
        Self::spawn_with(Settings {
            wakeups: dispatcher::settings::Wakeups::Queue,
            ..Settings::default()
        })
        .await
    }

    pub async fn spawn_with(settings: Settings) -> TestApp {
        Self::spawn_with_objects(settings, None).await
    }

    /// A dispatcher whose objects live in `objects` (default: a local
    /// directory of its own, served by the API).
    pub async fn spawn_with_objects(
        settings: Settings,
        objects: Option<Arc<dyn dispatcher::objects::ObjectStore>>,
    ) -> TestApp {
        Self::spawn_full(settings, objects, None, None).await
    }

    /// A dispatcher that also accepts user tokens of `idp`.
    pub async fn spawn_with_idp(idp: dispatcher::idp::Idp) -> TestApp {
        Self::spawn_full(Settings::default(), None, Some(idp), None).await
    }

    /// A dispatcher on an S3 store that mints STS credentials for tasks.
    pub async fn spawn_with_sts(
        objects: Arc<dyn dispatcher::objects::ObjectStore>,
        sts: dispatcher::objects::sts::StsIssuer,
    ) -> TestApp {
        Self::spawn_full(
            Settings::default(),
            Some(objects),
            None,
            Some(Arc::new(sts)),
        )
        .await
    }

    async fn spawn_full(
        settings: Settings,
        objects: Option<Arc<dyn dispatcher::objects::ObjectStore>>,
        idp: Option<dispatcher::idp::Idp>,
        sts: Option<Arc<dispatcher::objects::sts::StsIssuer>>,
    ) -> TestApp {
        let db = TestDb::new().await;
        let settings = Arc::new(settings);
        let (signing_pem, _) = dispatcher::tokens::generate_key_pem();
        let keys = Arc::new(
            Keyring::from_pem(
                &settings.issuer,
                &signing_pem,
                &[],
                settings.token_leeway.as_secs(),
            )
            .expect("keyring"),
        );
        let store = Store::new(db.pool.clone(), settings.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shutdown = CancellationToken::new();
        let objects_dir = std::env::temp_dir().join(format!("objects-{}", Uuid::new_v4().simple()));
        let handle: Arc<dyn dispatcher::objects::ObjectStore> = match &objects {
            Some(s) => s.clone(),
            None => Arc::new(
                dispatcher::objects::LocalDirStore::new(
                    objects_dir.clone(),
                    "http://127.0.0.1",
                    keys.presign_secret(),
                )
                .expect("local object store"),
            ),
        };
        // The API only: tests of the relay, reaper and sink drive those by
        // hand.
        tokio::spawn(roles::run(
            Some(listener),
            store.clone(),
            keys.clone(),
            settings.clone(),
            Roles::API,
            roles::Adapters {
                queue: None,
                // Lazy: only tests that read streams create it (`db.data()`).
                data: Some(dispatcher::datadb::lazy_pool(db.data_options(), 4)),
                idp: idp.map(Arc::new),
                sts,
                objects: match objects {
                    Some(store) => dispatcher::profile::Objects::Store(store),
                    None => dispatcher::profile::Objects::LocalDir {
                        dir: objects_dir.clone(),
                        public_url: None,
                    },
                },
            },
            shutdown.clone(),
        ));
        let org_id = store.ensure_org("acme").await.expect("org");
        let user_id = store.ensure_user("ada@acme.test").await.expect("user");
        store
            .set_membership(org_id, user_id, dispatcher::domain::Role::Member)
            .await
            .expect("membership");
        let exp = Utc::now() + chrono::Duration::hours(1);
        let user_token = keys.mint_user(user_id, org_id, exp);
        let worker_token = keys.mint_worker("test-worker", exp);
        TestApp {
            addr,
            client: reqwest::Client::new(),
            keys,
            signing_pem,
            settings,
            store,
            org_id,
            user_id,
            user_token,
            worker_token,
            objects_dir,
            objects: handle,
            shutdown,
            db,
        }
    }

    /// Signs arbitrary claims with the genuine signing key and `kid`, under
    /// the given `typ` header.
    pub fn sign_raw(&self, typ: &str, claims: &Value) -> String {
        let key = jsonwebtoken::EncodingKey::from_ed_pem(self.signing_pem.as_bytes()).expect("key");
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
        header.typ = Some(typ.to_owned());
        header.kid = Some(self.keys.signing_kid().to_owned());
        jsonwebtoken::encode(&header, claims, &key).expect("sign")
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// POSTs JSON with a bearer token.
    pub async fn post(&self, path: &str, token: &str, body: &Value) -> Response {
        let resp = self
            .client
            .post(self.url(path))
            .bearer_auth(token)
            .json(body)
            .send()
            .await
            .expect("request");
        Self::read(resp).await
    }

    /// Stores an attempt's log as its worker does (`POST
    /// /internal/task-logs`: the worker credential, the attempt by its
    /// capability token in the body beside `log`'s fields).
    pub async fn upload_log(&self, capability_token: &str, mut log: Value) -> Response {
        log["capability_token"] = Value::String(capability_token.to_owned());
        self.post("/internal/task-logs", &self.worker_token, &log)
            .await
    }

    pub async fn get(&self, path: &str, token: &str) -> Response {
        let resp = self
            .client
            .get(self.url(path))
            .bearer_auth(token)
            .send()
            .await
            .expect("request");
        Self::read(resp).await
    }

    /// PUTs an empty JSON object with a bearer token.
    pub async fn put_json(&self, path: &str, token: &str) -> Response {
        let resp = self
            .client
            .put(self.url(path))
            .bearer_auth(token)
            .json(&json!({}))
            .send()
            .await
            .expect("request");
        Self::read(resp).await
    }

    pub async fn delete(&self, path: &str, token: &str) -> Response {
        let resp = self
            .client
            .delete(self.url(path))
            .bearer_auth(token)
            .send()
            .await
            .expect("request");
        Self::read(resp).await
    }

    pub async fn read(resp: reqwest::Response) -> Response {
        let status = resp.status();
        let text = resp.text().await.expect("body");
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Response { status, body }
    }

    /// Submits a job as the test user; panics unless it is created.
    pub async fn submit(&self, job: &Value) -> wire::JobView {
        let r = self.post("/v1/jobs", &self.user_token, job).await;
        assert_eq!(r.status, StatusCode::CREATED, "submit failed: {}", r.body);
        serde_json::from_value(r.body).expect("job view")
    }

    /// Creates a dataset through the API (`201` asserted).
    pub async fn create_dataset(&self, name: &str, mode: &str, columns: Value) {
        let r = self
            .post(
                "/v1/datasets",
                &self.user_token,
                &json!({"name": name, "mode": mode, "columns": columns}),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    }

    /// Creates a `stream` dataset (if it does not exist yet) with columns
    /// `ts timestamp`, `user_id string`, `value float64 null`.
    pub async fn ensure_stream(&self, name: &str) {
        let r = self
            .post(
                "/v1/datasets",
                &self.user_token,
                &json!({"name": name, "mode": "stream", "columns": [
                    {"name": "ts", "type": "timestamp", "nullable": false},
                    {"name": "user_id", "type": "string", "nullable": false},
                    {"name": "value", "type": "float64", "nullable": true}]}),
            )
            .await;
        assert!(
            r.status == StatusCode::CREATED || r.code() == "conflict",
            "{}",
            r.body
        );
    }

    /// A buffer sink over this app's store, queue and objects, and the
    /// test's data database; tests drive it with `poll` or `ingest`.
    pub async fn sink(&self) -> Arc<dispatcher::services::sink::Sink> {
        let (queue, _) = dispatcher::profile::local_queue(&self.store, &self.settings);
        dispatcher::services::sink::Sink::new(
            self.store.clone(),
            self.db.data().await,
            queue,
            self.objects.clone(),
            self.settings.clone(),
        )
    }

    /// Ends the current attempt's lease and claims the next attempt at once
    /// (no backoff): the earlier attempt's token is stale from here on.
    pub async fn supersede(&self, task_id: Uuid) -> wire::ClaimResponse {
        self.expire_lease(task_id).await;
        self.skip_backoff(task_id).await;
        self.claim(task_id).await
    }

    /// A claimed one-task job whose task may read `reads` (three
    /// attempts); the task id and the claim.
    pub async fn claimed_reader(&self, reads: &[&str]) -> (Uuid, wire::ClaimResponse) {
        let job = self
            .submit(
                &json!({"name": "r", "tasks": [{"key": "r", "runtime": "exec", "bundle": "x",
                                                     "reads": reads, "max_attempts": 3}]}),
            )
            .await;
        let task = job.tasks[0].task_id;
        (task, self.claim(task).await)
    }

    /// A one-task job whose task may publish to the `alert_events` stream;
    /// returns the task id.
    pub async fn single_task(&self, max_attempts: u32) -> Uuid {
        self.ensure_stream("alert_events").await;
        let job = self
            .submit(&json!({"name": "single", "tasks": [
                {"key": "only", "runtime": "exec", "bundle": "/bin/true",
                 "max_attempts": max_attempts, "outputs": ["alert_events"]}
            ]}))
            .await;
        job.tasks[0].task_id
    }

    pub async fn job(&self, job_id: Uuid) -> wire::JobView {
        let r = self
            .get(&format!("/v1/jobs/{job_id}"), &self.user_token)
            .await;
        assert_eq!(r.status, StatusCode::OK, "get job failed: {}", r.body);
        serde_json::from_value(r.body).expect("job view")
    }

    pub async fn try_claim(&self, task_id: Uuid, worker: &str) -> Response {
        self.post(
            "/internal/task-claim",
            &self.worker_token,
            &json!({"task_id": task_id, "worker_id": worker}),
        )
        .await
    }

    /// Claims a task; panics unless the claim is granted.
    pub async fn claim(&self, task_id: Uuid) -> wire::ClaimResponse {
        let r = self.try_claim(task_id, "test-worker").await;
        assert_eq!(r.status, StatusCode::OK, "claim failed: {}", r.body);
        serde_json::from_value(r.body).expect("claim response")
    }

    pub async fn complete_ok(&self, token: &str, output: Value) -> Response {
        self.post(
            "/v1/task/complete",
            token,
            &json!({"outcome": "succeeded", "output": output}),
        )
        .await
    }

    /// Completes with a failure.
    pub async fn complete_failed(&self, token: &str, message: &str, retryable: bool) -> Response {
        self.post(
            "/v1/task/complete",
            token,
            &json!({"outcome": "failed", "error": {"message": message, "retryable": retryable}}),
        )
        .await
    }

    /// Claims and completes a task successfully.
    pub async fn run_ok(&self, task_id: Uuid) {
        let c = self.claim(task_id).await;
        let r = self
            .complete_ok(&c.capability_token, json!({"ok": true}))
            .await;
        assert_eq!(r.status, StatusCode::OK, "complete failed: {}", r.body);
    }

    /// Moves the task's lease into the past, in the database.
    pub async fn expire_lease(&self, task_id: Uuid) {
        let n = sqlx::query(
            "UPDATE tasks SET lease_expires_at = now() - interval '1 second'
              WHERE id = $1 AND state = 'leased'",
        )
        .bind(task_id)
        .execute(&self.db.pool)
        .await
        .expect("expire lease")
        .rows_affected();
        assert_eq!(n, 1, "task {task_id} was not leased");
    }

    /// Ends the retry backoff of a ready task, in the database.
    pub async fn skip_backoff(&self, task_id: Uuid) {
        sqlx::query("UPDATE tasks SET not_before = now() WHERE id = $1 AND state = 'ready'")
            .bind(task_id)
            .execute(&self.db.pool)
            .await
            .expect("skip backoff");
    }

    /// Everything the store holds about a task, to prove a refused call
    /// changed nothing.
    pub async fn snapshot(&self, task_id: Uuid) -> Value {
        sqlx::query_scalar(
            "SELECT jsonb_build_object(
                'task', (SELECT to_jsonb(t) FROM tasks t WHERE t.id = $1),
                'attempts', (SELECT coalesce(jsonb_agg(to_jsonb(a) ORDER BY a.attempt), '[]')
                               FROM attempts a WHERE a.task_id = $1),
                'events', (SELECT coalesce(jsonb_agg(to_jsonb(e) ORDER BY e.attempt, e.seq), '[]')
                             FROM task_events e WHERE e.task_id = $1),
                'publishes', (SELECT coalesce(jsonb_agg(to_jsonb(b) ORDER BY b.batch_id), '[]')
                                FROM buffer_publishes b WHERE b.task_id = $1),
                'jobs', (SELECT coalesce(jsonb_agg(to_jsonb(j)), '[]') FROM jobs j),
                'outbox', (SELECT coalesce(jsonb_agg(to_jsonb(o) ORDER BY o.id), '[]') FROM outbox o))",
        )
        .bind(task_id)
        .fetch_one(&self.db.pool)
        .await
        .expect("snapshot")
    }

    /// Row counts of every table, to prove a refused request wrote nothing.
    pub async fn table_counts(&self) -> Value {
        sqlx::query_scalar(
            "SELECT jsonb_build_object(
                'jobs', (SELECT count(*) FROM jobs), 'tasks', (SELECT count(*) FROM tasks),
                'task_specs', (SELECT count(*) FROM task_specs), 'task_deps', (SELECT count(*) FROM task_deps),
                'attempts', (SELECT count(*) FROM attempts), 'task_events', (SELECT count(*) FROM task_events),
                'buffer_publishes', (SELECT count(*) FROM buffer_publishes), 'outbox', (SELECT count(*) FROM outbox))",
        )
        .fetch_one(&self.db.pool)
        .await
        .expect("counts")
    }

    /// Number of outbox wake-ups for a task.
    pub async fn wakeups(&self, task_id: Uuid) -> i64 {
        sqlx::query_scalar(
            "SELECT count(*) FROM outbox WHERE topic = 'wakeup' AND payload->>'task_id' = $1::text",
        )
        .bind(task_id)
        .fetch_one(&self.db.pool)
        .await
        .expect("wakeups")
    }

    /// Committed completions of a task (attempt rows carrying a completion).
    pub async fn committed_completions(&self, task_id: Uuid) -> i64 {
        sqlx::query_scalar(
            "SELECT count(*) FROM attempts WHERE task_id = $1 AND completion IS NOT NULL",
        )
        .bind(task_id)
        .fetch_one(&self.db.pool)
        .await
        .expect("completions")
    }
}

/// A valid buffer-publish body for the attempt a claim answered.
pub fn batch_body(claim: &wire::ClaimResponse, batch_id: Uuid, rows: u64) -> Value {
    let claims = decode_claims(&claim.capability_token);
    let prefix = claims["prefixes"][0].as_str().expect("prefix").to_owned();
    json!({
        "batch_id": batch_id,
        "dataset": "alert_events",
        "object_key": format!("{prefix}buffers/{batch_id}.jsonl"),
        "rows": rows,
        "sha256": "a".repeat(64),
    })
}

/// The claims of a JWT, unverified (for tests that inspect or forge tokens).
pub fn decode_claims(token: &str) -> Value {
    use base64::Engine as _;
    let payload = token.split('.').nth(1).expect("JWT payload");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .expect("base64url payload");
    serde_json::from_slice(&bytes).expect("JSON claims")
}

/// A bundle archive of `runtime` whose handler returns its inputs; `n`
/// varies its content (and so its digest).
pub fn bundle_archive(runtime: &str, n: usize) -> Vec<u8> {
    let dir = std::env::temp_dir().join(format!("bundle-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("bundle dir");
    let (file, code) = match runtime {
        "node" => (
            "main.mjs",
            format!("export const handler = async (e) => e; // {n}\n"),
        ),
        _ => (
            "main.py",
            format!("def handler(e, c):  # {n}\n    return e\n"),
        ),
    };
    std::fs::write(dir.join(file), code).expect("bundle code");
    std::fs::write(
        dir.join("bundle.json"),
        format!(r#"{{"runtime": "{runtime}", "handler": "main.handler"}}"#),
    )
    .expect("bundle.json");
    let (bytes, _) = dispatcher::bundles::pack(&dir).expect("pack");
    let _ = std::fs::remove_dir_all(&dir);
    bytes
}

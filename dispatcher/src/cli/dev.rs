//! `dispatcher dev`: the whole local stack in one command, with zero
//! configuration. Creates its database if needed, migrates, keeps a dev
//! signing key in `.dev/`, runs every role and a pool of worker-wrapper
//! processes, submits a sample DAG, shows it run, and keeps serving.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use chrono::Utc;
use dispatcher::domain::{self, Role};
use dispatcher::roles::{self, Roles};
use dispatcher::settings::Settings;
use dispatcher::store::Store;
use dispatcher::tokens::{self, Keyring};
use dispatcher_wire::{JobState, TaskState};
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection};
use tokio_util::sync::CancellationToken;

#[derive(clap::Args)]
pub struct DevArgs {
    /// Postgres URL; by default the local server's `dispatcher_dev` database,
    /// created if missing.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    #[arg(long, env = "DISPATCHER_BIND", default_value = "127.0.0.1:8080")]
    bind: String,
    /// Worker-wrapper processes to start.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Tasks each worker runs at once.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Where the dev signing key is kept.
    #[arg(long, default_value = ".dev")]
    state_dir: PathBuf,
    /// Start the stack without submitting the sample job.
    #[arg(long)]
    no_sample: bool,
    /// Stop after the sample job finishes instead of serving on.
    #[arg(long)]
    exit_after_sample: bool,
    /// Run this example instead of the sample job: a JSON file with the
    /// `datasets` to create, the `bundles` to push (tag → directory,
    /// relative to the file) and the `job` to submit
    /// (`examples/mixed-language/example.json`).
    #[arg(long)]
    example: Option<PathBuf>,
    /// `--profile aws` runs on SQS and S3 (e.g. `--aws-endpoint-url` of a
    /// local moto server); their queues and bucket are created if missing.
    #[command(flatten)]
    profile: dispatcher::profile::ProfileArgs,
}

const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/dispatcher_dev";

/// Creates the database named in `url` if it does not exist.
async fn ensure_database(url: &str) -> Result<()> {
    let opts: PgConnectOptions =
        dispatcher::store::parse_url(url).context("DATABASE_URL is not a Postgres URL")?;
    let name = opts.get_database().unwrap_or("postgres").to_owned();
    let mut conn = opts
        .clone()
        .database("postgres")
        .connect()
        .await
        .with_context(|| {
            format!(
                "connecting to Postgres at {} (is it running? scripts/ensure-postgres starts one)",
                dispatcher::redact_url(url)
            )
        })?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&name)
            .fetch_one(&mut conn)
            .await?;
    if !exists {
        if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            bail!("will not create database {name:?}: use letters, digits and _");
        }
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await?;
        eprintln!("created database {name}");
    }
    conn.close().await.ok();
    Ok(())
}

fn dev_key(dir: &Path) -> Result<String> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("signing.pem");
    if !path.exists() {
        let (private, public) = tokens::generate_key_pem();
        // Created 0600 from the start, as `dispatcher token keygen` does.
        super::write_private(&path, &private)?;
        std::fs::write(dir.join("signing.pem.pub"), public)?;
    }
    std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
}

/// Writes the dev workers' credential to `.dev/worker.credential`, 0600
/// (worker-wrapper refuses a credential file others can read).
fn credential_file(dir: &Path, credential: &str) -> Result<PathBuf> {
    let path = dir.join("worker.credential");
    let _ = std::fs::remove_file(&path);
    super::write_private(&path, credential)?;
    Ok(path)
}

/// A copy of the worker binary that any user may run, for the sample
/// job's tasks: a root worker runs each task under a uid of its own, which
/// may not reach a checkout in a private home directory. Removed on exit.
struct TaskBinary {
    dir: PathBuf,
    path: PathBuf,
}

impl TaskBinary {
    fn copy(worker_bin: &Path) -> Result<TaskBinary> {
        use std::os::unix::fs::PermissionsExt as _;
        let dir =
            std::env::temp_dir().join(format!("dispatcher-dev-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
        let path = dir.join("worker-wrapper");
        std::fs::copy(worker_bin, &path)
            .with_context(|| format!("copying {} to {}", worker_bin.display(), path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
        Ok(TaskBinary { dir, path })
    }
}

impl Drop for TaskBinary {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn worker_binary() -> Result<PathBuf> {
    let me = std::env::current_exe()?;
    let path = me.with_file_name("worker-wrapper");
    if !path.exists() {
        bail!(
            "{} is missing: build it with `cargo build -p worker-wrapper` (scripts/dev does)",
            path.display()
        );
    }
    Ok(path)
}

pub async fn run(args: DevArgs) -> Result<()> {
    let url = args
        .database_url
        .clone()
        .unwrap_or_else(|| DEFAULT_URL.to_owned());
    ensure_database(&url).await?;
    // Local webhook receivers are the norm on a dev machine.
    let settings = Arc::new(Settings {
        alert_allow_hosts: ["localhost", "127.0.0.1", "::1"].map(String::from).to_vec(),
        wakeups: args.profile.queues.wakeups()?,
        // No load balancer routes here: close at once on Ctrl-C.
        drain_not_ready: Duration::ZERO,
        ..Settings::default()
    });
    let store = Store::connect(&url, 16, settings.clone()).await?;
    store.migrate().await.context("applying migrations")?;
    let server = dispatcher::store::parse_url(&url)?;
    let data_options = dispatcher::datadb::options(&url, None)?;
    dispatcher::datadb::ensure(&server, &data_options)
        .await
        .context("creating the data database")?;
    let data = dispatcher::datadb::lazy_pool(data_options, 8);
    let pem = dev_key(&args.state_dir)?;
    let keys = Arc::new(Keyring::from_pem(
        &settings.issuer,
        &pem,
        &[],
        settings.token_leeway.as_secs(),
    )?);
    let org = store.ensure_org("dev").await?;
    let user = store.ensure_user("dev@localhost").await?;
    store.set_membership(org, user, Role::Owner).await?;
    let expires = Utc::now() + chrono::Duration::hours(12);
    let user_token = keys.mint_user(user, org, expires);
    let worker_token = keys.mint_worker("dev-pool", expires);
    let worker_bin = worker_binary()?;
    let task_bin = TaskBinary::copy(&worker_bin)?;
    let credential = credential_file(&args.state_dir, &worker_token)?;
    if args.profile.is_aws() {
        args.profile
            .create_aws_resources(settings.queue_max_receives)
            .await?;
    }
    let queue = args.profile.services_queue(settings.breaker).await?;
    let objects = match args.profile.is_aws() {
        true => args.profile.objects(settings.breaker).await?,
        false => dispatcher::profile::Objects::LocalDir {
            dir: args.state_dir.join("objects"),
            public_url: None,
        },
    };

    let listener = tokio::net::TcpListener::bind(&args.bind)
        .await
        .with_context(|| {
            format!(
                "binding {} (set DISPATCHER_BIND to use another address)",
                args.bind
            )
        })?;
    let url_http = format!("http://{}", listener.local_addr()?);
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(roles::run(
        Some(listener),
        store.clone(),
        keys.clone(),
        settings.clone(),
        Roles::ALL,
        roles::Adapters {
            queue,
            objects,
            data: Some(data.clone()),
            idp: None,
            sts: None,
        },
        shutdown.clone(),
    ));
    eprintln!(
        "dispatcher serving at {url_http} (api, relay, reaper, sink, router, delivery, pruner; {} profile)",
        args.profile.queues.profile
    );

    let mut workers = Vec::new();
    for i in 0..args.workers {
        let child = tokio::process::Command::new(&worker_bin)
            .arg("run")
            .env("DISPATCHER_URL", &url_http)
            .env("WORKER_CREDENTIAL_FILE", &credential)
            .env("WORKER_ID", format!("dev-worker-{i}"))
            // A dev machine's user is rarely root: tasks then share its
            // uid (the flag changes nothing for a root wrapper).
            .env("WORKER_INSECURE_SHARED_UID", "true")
            .env("WORKER_CONCURRENCY", args.concurrency.to_string())
            .env("RUST_LOG", "warn")
            .envs(args.profile.queues.worker_env())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", worker_bin.display()))?;
        workers.push(child);
    }
    eprintln!(
        "started {} worker-wrapper processes × {} slots",
        args.workers, args.concurrency
    );

    let mut job_id = None;
    let mut user_token = user_token;
    if let Some(file) = &args.example {
        // An org of the example's own: its datasets never meet another
        // schema of the same name in the dev org.
        let example = read_example(file)?;
        let org = store
            .ensure_org(&format!("example-{}", example.job.name))
            .await?;
        store.set_membership(org, user, Role::Owner).await?;
        user_token = keys.mint_user(user, org, expires);
        let api = super::ApiArgs {
            url: url_http.clone(),
            token: user_token.clone(),
            org: None,
        };
        let base = file.parent().unwrap_or(Path::new("."));
        let id = example_job(&store, org, user, example, base, &api, &settings).await?;
        job_id = Some(id);
        let state = watch(&store, org, id).await?;
        show_outputs(&store, id).await?;
        if state != JobState::Succeeded && args.exit_after_sample {
            bail!("the example job ended {}", state.as_str());
        }
        for (dataset, batches) in ingested_batches(&store, id).await? {
            println!("stream {dataset}: {batches} batch(es) ingested");
        }
    } else if !args.no_sample {
        let id = sample_job(&store, org, user, &task_bin.path, &settings).await?;
        job_id = Some(id);
        watch(&store, org, id).await?;
        show_sample_data(&store, &data, org, id).await?;
    }

    println!();
    println!("The local stack is running at {url_http}. Ctrl-C stops it.");
    println!("  export USER_TOKEN={user_token}");
    if let Some(id) = job_id {
        println!("  curl -s {url_http}/v1/jobs/{id} -H \"authorization: Bearer $USER_TOKEN\"");
    }
    println!(
        "  curl -s -X POST {url_http}/v1/jobs -H \"authorization: Bearer $USER_TOKEN\" -H 'content-type: application/json' \\\n       -d '{{\"name\": \"mine\", \"tasks\": [{{\"key\": \"a\", \"runtime\": \"exec\", \"bundle\": \"{} sample-task\"}}]}}'",
        task_bin.path.display()
    );
    println!("  curl -s {url_http}/.well-known/jwks.json");

    if !args.exit_after_sample {
        let _ = tokio::signal::ctrl_c().await;
    }
    eprintln!("stopping: workers drain, then the dispatcher");
    for w in &mut workers {
        if let Some(pid) = w.id() {
            // SIGTERM lets the worker drain; it was also sent SIGINT with the
            // terminal's process group when Ctrl-C was pressed.
            let _ = std::process::Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status();
        }
    }
    for mut w in workers {
        if tokio::time::timeout(Duration::from_secs(35), w.wait())
            .await
            .is_err()
        {
            let _ = w.kill().await;
        }
    }
    shutdown.cancel();
    server.await??;
    Ok(())
}

async fn sample_job(
    store: &Store,
    org: uuid::Uuid,
    user: uuid::Uuid,
    worker_bin: &Path,
    settings: &Settings,
) -> Result<uuid::Uuid> {
    // The sample's datasets (kept across runs of `dev`): a `replace`
    // dataset the first task stages a part into, and the `stream` it
    // publishes a buffer batch to.
    for (name, mode) in [
        (SAMPLE_DATASET, dispatcher_wire::DatasetMode::Replace),
        (SAMPLE_STREAM, dispatcher_wire::DatasetMode::Stream),
    ] {
        let ds = domain::new_dataset(dispatcher_wire::CreateDatasetRequest {
            name: name.into(),
            mode,
            columns: dispatcher_wire::sample_columns(),
        })?;
        match store.create_dataset(org, user, &ds).await {
            Ok(_) | Err(dispatcher::error::StoreError::Conflict(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let bundle = format!("{} sample-task", worker_bin.display());
    let req = serde_json::json!({"name": "sample", "tasks": [
        {"key": "extract", "runtime": "exec", "bundle": bundle,
         "outputs": [SAMPLE_STREAM, SAMPLE_DATASET],
         "inputs": {"sleep_ms": 300, "stage": [SAMPLE_DATASET], "rows": 5}},
        {"key": "clean_a", "runtime": "exec", "bundle": bundle, "depends_on": ["extract"], "inputs": {"sleep_ms": 300}},
        {"key": "clean_b", "runtime": "exec", "bundle": bundle, "depends_on": ["extract"],
         "inputs": {"sleep_ms": 300, "fail_attempts": 1}},
        {"key": "report", "runtime": "exec", "bundle": bundle, "depends_on": ["clean_a", "clean_b"]}
    ]});
    let job = domain::new_job(serde_json::from_value(req)?, settings)?;
    let view = store.submit_job(org, Some(user), &job).await?;
    println!(
        "submitted job {} \"sample\": extract (stages {SAMPLE_DATASET}, publishes to {SAMPLE_STREAM}) -> (clean_a, clean_b [fails once]) -> report",
        view.job_id
    );
    Ok(view.job_id)
}

const SAMPLE_DATASET: &str = "sample_rows";
const SAMPLE_STREAM: &str = "sample_events";

/// Prints the version the sample job committed and, once the sink has
/// ingested the job's buffer batches, the rows that reached the data
/// database.
async fn show_sample_data(
    store: &Store,
    data: &sqlx::PgPool,
    org: uuid::Uuid,
    job_id: uuid::Uuid,
) -> Result<()> {
    let ds = store.get_dataset(org, SAMPLE_DATASET).await?;
    match ds.versions.first() {
        Some(v) => println!(
            "dataset {SAMPLE_DATASET}: version {} committed by task {} attempt {} ({} rows)",
            v.version, v.task_id, v.attempt, v.rows
        ),
        None => bail!("the sample job committed no version of {SAMPLE_DATASET}"),
    }
    let started = tokio::time::Instant::now();
    let batches: Vec<(uuid::Uuid, String)> = loop {
        let rows: Vec<(uuid::Uuid, String)> = sqlx::query!(
            "SELECT b.batch_id, b.state FROM buffer_publishes b JOIN tasks t ON t.id = b.task_id
              WHERE t.job_id = $1",
            job_id,
        )
        .fetch_all(store.pool())
        .await?
        .into_iter()
        .map(|r| (r.batch_id, r.state))
        .collect();
        if rows.iter().all(|(_, s)| s != "pending") {
            break rows;
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!("the sink did not ingest the sample's buffer batches within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    if let Some((id, state)) = batches.iter().find(|(_, s)| s != "ingested") {
        bail!("sample buffer batch {id} is {state}");
    }
    let stream = sqlx::query_scalar!(
        "SELECT id FROM datasets WHERE org_id = $1 AND name = $2",
        org,
        SAMPLE_STREAM,
    )
    .fetch_one(store.pool())
    .await?;
    let ids: Vec<uuid::Uuid> = batches.iter().map(|(id, _)| *id).collect();
    let ingested: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {} WHERE _batch_id = ANY($1)",
        dispatcher::services::sink::Sink::table_name(stream)
    ))
    .bind(&ids)
    .fetch_one(data)
    .await?;
    println!(
        "stream {SAMPLE_STREAM}: {} batch(es) ingested, {ingested} rows in the data database",
        batches.len()
    );
    Ok(())
}

/// A job with the datasets and bundles it needs (`--example`).
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Example {
    #[serde(default)]
    datasets: Vec<dispatcher_wire::CreateDatasetRequest>,
    /// Tag → bundle directory, relative to the example file.
    #[serde(default)]
    bundles: std::collections::BTreeMap<String, PathBuf>,
    job: dispatcher_wire::SubmitJobRequest,
}

/// Creates the example's datasets (kept if they exist), pushes and tags
/// its bundles through the API, and submits its job.
fn read_example(file: &Path) -> Result<Example> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", file.display()))
}

/// Waits (up to 60 s) until the sink has taken every buffer batch the job
/// published; the count of ingested batches per stream. A batch that
/// ended `dead` is an error.
async fn ingested_batches(store: &Store, job_id: uuid::Uuid) -> Result<Vec<(String, i64)>> {
    let started = tokio::time::Instant::now();
    loop {
        let rows: Vec<(String, String, i64)> = sqlx::query!(
            r#"SELECT b.dataset, b.state, count(*) AS "n!" FROM buffer_publishes b
               JOIN tasks t ON t.id = b.task_id
              WHERE t.job_id = $1 GROUP BY b.dataset, b.state ORDER BY b.dataset"#,
            job_id,
        )
        .fetch_all(store.pool())
        .await?
        .into_iter()
        .map(|r| (r.dataset, r.state, r.n))
        .collect();
        if let Some((name, _, n)) = rows.iter().find(|(_, s, _)| s == "dead") {
            bail!("{n} buffer batch(es) of {name} are dead (dispatcher admin sink dead list)");
        }
        if rows.iter().all(|(_, s, _)| s != "pending") {
            return Ok(rows.into_iter().map(|(d, _, n)| (d, n)).collect());
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!("the sink did not ingest the job's buffer batches within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn example_job(
    store: &Store,
    org: uuid::Uuid,
    user: uuid::Uuid,
    example: Example,
    base: &Path,
    api: &super::ApiArgs,
    settings: &Settings,
) -> Result<uuid::Uuid> {
    for req in example.datasets {
        let ds = domain::new_dataset(req)?;
        match store.create_dataset(org, user, &ds).await {
            Ok(_) | Err(dispatcher::error::StoreError::Conflict(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    for (tag, dir) in &example.bundles {
        let view = super::push_bundle(api, &base.join(dir), Some(tag))
            .await
            .with_context(|| format!("pushing bundle {tag} ({})", dir.display()))?;
        println!(
            "bundle {tag}: {} ({}, {} bytes)",
            view.digest,
            view.runtime.as_str(),
            view.size_bytes
        );
    }
    let job = domain::new_job(example.job, settings)?;
    let view = store.submit_job(org, Some(user), &job).await?;
    println!("submitted job {} \"{}\"", view.job_id, job.name);
    Ok(view.job_id)
}

/// Prints each succeeded task's output.
async fn show_outputs(store: &Store, job_id: uuid::Uuid) -> Result<()> {
    let outputs: Vec<(String, Option<serde_json::Value>)> = sqlx::query!(
        "SELECT s.key, a.completion -> 'output' AS output
           FROM attempts a JOIN task_specs s ON s.task_id = a.task_id
          WHERE s.job_id = $1 AND a.outcome = 'succeeded'
          ORDER BY s.ord",
        job_id,
    )
    .fetch_all(store.pool())
    .await?
    .into_iter()
    .map(|r| (r.key, r.output))
    .collect();
    for (key, output) in outputs {
        println!(
            "output of {key}: {}",
            serde_json::to_string_pretty(&output.unwrap_or_default())?
        );
    }
    Ok(())
}

/// Prints each task's state changes until the job ends (or 120 s pass);
/// the job's end state.
async fn watch(store: &Store, org: uuid::Uuid, job_id: uuid::Uuid) -> Result<JobState> {
    let mut seen: Vec<(TaskState, u32)> = Vec::new();
    let started = tokio::time::Instant::now();
    loop {
        let view = store
            .get_job(org, job_id, dispatcher::store::TaskPage::FIRST)
            .await?;
        if seen.is_empty() {
            seen = vec![(TaskState::Blocked, u32::MAX); view.tasks.len()];
        }
        for (t, s) in view.tasks.iter().zip(seen.iter_mut()) {
            if (t.state, t.attempt) != *s {
                println!(
                    "  {:<8} {:<9} attempt {}",
                    t.key,
                    t.state.as_str(),
                    t.attempt
                );
                *s = (t.state, t.attempt);
            }
        }
        if view.state != JobState::Running {
            println!(
                "job {} {} in {:.1} s",
                job_id,
                view.state.as_str(),
                started.elapsed().as_secs_f64()
            );
            for t in &view.tasks {
                println!(
                    "  {:<8} {:<9} after {} attempt(s)",
                    t.key,
                    t.state.as_str(),
                    t.attempt
                );
            }
            return Ok(view.state);
        }
        if started.elapsed() > Duration::from_secs(120) {
            bail!("the sample job did not finish within 120 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

//! Bundles through the API: push (content-addressed, checked, bounded),
//! tags resolved at submission, bad input refused with nothing stored, and
//! the claim's bundle URL serving exactly the digest's bytes.

use dispatcher_tests::{bundle_archive, unthrottled, Response, TestApp};
use reqwest::StatusCode;
use serde_json::{json, Value};
use sha2::Digest;

async fn push(app: &TestApp, body: Vec<u8>) -> Response {
    let resp = app
        .client
        .post(app.url("/v1/bundles"))
        .bearer_auth(&app.user_token)
        .header("content-type", "application/gzip")
        .body(body)
        .send()
        .await
        .unwrap();
    TestApp::read(resp).await
}

async fn tag(app: &TestApp, name: &str, digest: &str) -> Response {
    let resp = app
        .client
        .put(app.url(&format!("/v1/bundles/tags/{name}")))
        .bearer_auth(&app.user_token)
        .json(&json!({"digest": digest}))
        .send()
        .await
        .unwrap();
    TestApp::read(resp).await
}

async fn bundles_stored(app: &TestApp) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM bundles")
        .fetch_one(&app.db.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_pushed_bundle_is_named_by_its_content_and_pushing_it_again_changes_nothing() {
    let app = TestApp::spawn_with(unthrottled()).await;
    let archive = bundle_archive("python", 1);
    let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&archive)));
    let r = push(&app, archive.clone()).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    assert_eq!(r.body["digest"], digest.as_str());
    assert_eq!(r.body["runtime"], "python");
    assert_eq!(r.body["handler"], "main.handler");
    let again = push(&app, archive).await;
    assert_eq!(again.body["digest"], digest.as_str());
    assert_eq!(again.body["created_at"], r.body["created_at"]);
    assert_eq!(bundles_stored(&app).await, 1);
    let got = app
        .get(&format!("/v1/bundles/{digest}"), &app.user_token)
        .await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(tag(&app, "etl", &digest).await.status, StatusCode::OK);
    let by_tag = app.get("/v1/bundles/etl", &app.user_token).await;
    assert_eq!(by_tag.body["digest"], digest.as_str());
    assert_eq!(by_tag.body["tags"], json!(["etl"]));
}

#[tokio::test]
async fn bad_bundles_are_refused_with_a_reason_and_nothing_is_stored() {
    let mut settings = unthrottled();
    settings.bundle_max_bytes = 64 * 1024;
    let app = TestApp::spawn_with(settings).await;
    let not_gzip = push(&app, b"hello".to_vec()).await;
    assert_eq!(not_gzip.status, StatusCode::BAD_REQUEST);
    assert_eq!(not_gzip.body["error"]["code"], "invalid_request");
    assert!(
        not_gzip.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not a valid bundle"),
        "{}",
        not_gzip.body
    );
    // Over the size bound.
    let big = vec![0u8; 65 * 1024];
    let r = push(&app, big).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", r.body);
    assert_eq!(r.body["error"]["code"], "payload_too_large");
    assert_eq!(bundles_stored(&app).await, 0);
    // Names that are neither a digest nor a tag; a tag of no bundle.
    let r = app.get("/v1/bundles/a%20b", &app.user_token).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let nothing = format!("sha256:{}", "0".repeat(64));
    assert_eq!(tag(&app, "x", &nothing).await.status, StatusCode::NOT_FOUND);
    assert_eq!(
        tag(&app, "x", "sha256:zz").await.status,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        tag(&app, "sha256:x", &nothing).await.status,
        StatusCode::BAD_REQUEST
    );
}

#[tokio::test]
async fn a_task_names_its_bundle_by_digest_or_tag_resolved_when_the_job_is_submitted() {
    let app = TestApp::spawn_with(unthrottled()).await;
    let py = push(&app, bundle_archive("python", 1)).await.body["digest"]
        .as_str()
        .unwrap()
        .to_owned();
    let node = push(&app, bundle_archive("node", 1)).await.body["digest"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(tag(&app, "etl", &py).await.status, StatusCode::OK);
    let bad = |task: Value| json!({"name": "j", "tasks": [task]});
    for (task, field) in [
        (
            json!({"key": "a", "runtime": "python", "bundle": format!("sha256:{}", "1".repeat(64))}),
            "tasks[0].bundle",
        ),
        (
            json!({"key": "a", "runtime": "python", "bundle": node}),
            "tasks[0].bundle",
        ),
        (
            json!({"key": "a", "runtime": "python", "bundle": "no such tag"}),
            "tasks[0].bundle",
        ),
        (
            json!({"key": "a", "runtime": "python", "bundle": "etl", "timeout_seconds": 0}),
            "tasks[0].timeout_seconds",
        ),
    ] {
        let r = app.post("/v1/jobs", &app.user_token, &bad(task)).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
        assert!(
            r.body["error"]["message"]
                .as_str()
                .unwrap()
                .starts_with(field),
            "{}",
            r.body
        );
    }
    let r = app
        .post(
            "/v1/jobs",
            &app.user_token,
            &json!({"name": "j", "deadline_seconds": 0,
                    "tasks": [{"key": "a", "runtime": "exec", "bundle": "x"}]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(jobs, 0, "nothing was written");

    // By tag: the task runs the digest the tag named at submission, even
    // after the tag moves.
    let job = app
        .submit(
            &json!({"name": "j", "tasks": [{"key": "a", "runtime": "python", "bundle": "etl"}]}),
        )
        .await;
    let py2 = push(&app, bundle_archive("python", 2)).await.body["digest"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(tag(&app, "etl", &py2).await.status, StatusCode::OK);
    let claim = app.claim(job.tasks[0].task_id).await;
    assert_eq!(claim.task.bundle, py);
    assert_eq!(claim.org_id, app.org_id);
    assert_eq!(claim.task.timeout_seconds, 900, "the default");
    // The claim's URL serves exactly the digest's bytes.
    let url = claim.bundle_url.expect("a bundle URL");
    let bytes = reqwest::get(&url).await.unwrap().bytes().await.unwrap();
    assert_eq!(
        format!("sha256:{}", hex::encode(sha2::Sha256::digest(&bytes))),
        py
    );
    // An exec task gets no bundle URL; its own timeout is kept.
    let job = app
        .submit(
            &json!({"name": "e", "tasks": [{"key": "a", "runtime": "exec", "bundle": "x",
                                               "timeout_seconds": 7}]}),
        )
        .await;
    let claim = app.claim(job.tasks[0].task_id).await;
    assert!(claim.bundle_url.is_none());
    assert_eq!(claim.task.timeout_seconds, 7);
    // A job's deadline is answered with it.
    let job = app
        .submit(&json!({"name": "d", "deadline_seconds": 60,
                        "tasks": [{"key": "a", "runtime": "exec", "bundle": "x"}]}))
        .await;
    let deadline = job.deadline_at.expect("deadline_at");
    assert_eq!((deadline - job.created_at).num_seconds(), 60);
    assert_eq!(app.job(job.job_id).await.deadline_at, Some(deadline));
}

/// A gzipped tar of raw 512-byte headers and data: `(type, path, declared
/// size, bytes of zeros written)`; the manifest first.
fn raw_archive(entries: &[(u8, &str, u64, u64)]) -> Vec<u8> {
    use std::io::Write as _;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let zeros = vec![0u8; 1 << 20];
    let manifest = br#"{"runtime": "python", "handler": "main.handler"}"#;
    let mut put = |kind: u8, path: &str, size: u64, data: &[u8], pad_to: u64| {
        let mut h = tar::Header::new_ustar();
        h.as_mut_bytes()[156] = kind;
        h.as_mut_bytes()[..path.len()].copy_from_slice(path.as_bytes());
        h.set_size(size);
        h.set_mode(0o644);
        h.set_cksum();
        gz.write_all(h.as_bytes()).unwrap();
        gz.write_all(data).unwrap();
        let mut left = pad_to;
        while left > 0 {
            let n = left.min(zeros.len() as u64);
            gz.write_all(&zeros[..n as usize]).unwrap();
            left -= n;
        }
        let written = data.len() as u64 + pad_to;
        let pad = (512 - written % 512) % 512;
        gz.write_all(&zeros[..pad as usize]).unwrap();
    };
    put(b'0', "bundle.json", manifest.len() as u64, manifest, 0);
    for (kind, path, size, written) in entries {
        put(*kind, path, *size, &[], *written);
    }
    gz.write_all(&[0u8; 1024]).unwrap();
    gz.finish().unwrap()
}

/// The peak resident memory (VmHWM) of a process, in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundle_bombs_are_refused_with_4xx_and_the_dispatchers_memory_stays_bounded() {
    const MIB: u64 = 1 << 20;
    let mut stack = dispatcher_tests::stack::Stack::new().await;
    stack.start_dispatcher("").await;
    let pid = stack.dispatcher.as_ref().unwrap().id();
    let many: Vec<(u8, String, u64, u64)> = (0..100_000)
        .map(|i| (b'0', format!("f/{i}"), 0, 0))
        .collect();
    let many: Vec<(u8, &str, u64, u64)> = many
        .iter()
        .map(|(k, p, s, w)| (*k, p.as_str(), *s, *w))
        .collect();
    let bombs: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        // A PAX record and GNU long-name/long-link records the tar reader
        // would buffer whole: 256 MiB each.
        (
            "pax",
            raw_archive(&[(b'x', "pax", 256 * MIB, 256 * MIB)]),
            413,
            "XHeader record",
        ),
        (
            "pax-global",
            raw_archive(&[(b'g', "g", 256 * MIB, 256 * MIB)]),
            413,
            "XGlobalHeader record",
        ),
        (
            "gnu-long-name",
            raw_archive(&[(b'L', "././@LongLink", 256 * MIB, 256 * MIB)]),
            413,
            "GNULongName record",
        ),
        (
            "gnu-long-link",
            raw_archive(&[(b'K', "././@LongLink", 256 * MIB, 256 * MIB)]),
            413,
            "GNULongLink record",
        ),
        // A gzip bomb under the unpacked bound (400 MiB of zeros in a
        // file): the ratio stops it.
        (
            "gzip-bomb",
            raw_archive(&[(b'0', "zeros", 400 * MIB, 400 * MIB)]),
            413,
            "gzip bomb",
        ),
        // Over the unpacked bound (512 MiB) by its declared size.
        (
            "over-unpacked",
            raw_archive(&[(b'0', "big", 600 * MIB, 600 * MIB)]),
            413,
            "over",
        ),
        ("100k-entries", raw_archive(&many), 413, "entries"),
        // A path past PATH_MAX through a (small) PAX record.
        (
            "long-path",
            {
                let path = "d/".repeat(2100);
                let rest = format!(" path={path}\n");
                let record = format!("{}{rest}", rest.len() + 4);
                let mut a = Vec::new();
                {
                    let mut b = tar::Builder::new(flate2::write::GzEncoder::new(
                        &mut a,
                        flate2::Compression::fast(),
                    ));
                    let manifest = br#"{"runtime": "python", "handler": "main.handler"}"#;
                    let mut h = tar::Header::new_ustar();
                    h.set_size(manifest.len() as u64);
                    h.set_mode(0o644);
                    b.append_data(&mut h, "bundle.json", &manifest[..]).unwrap();
                    let mut x = tar::Header::new_ustar();
                    x.set_entry_type(tar::EntryType::XHeader);
                    x.set_size(record.len() as u64);
                    x.set_mode(0o644);
                    b.append_data(&mut x, "pax", record.as_bytes()).unwrap();
                    let mut f = tar::Header::new_ustar();
                    f.set_size(0);
                    f.set_mode(0o644);
                    b.append_data(&mut f, "short", &[][..]).unwrap();
                    b.into_inner().unwrap().finish().unwrap();
                }
                a
            },
            400,
            "over 4096 bytes",
        ),
    ];
    let client = reqwest::Client::new();
    let token = stack.user_token();
    for (name, body, status, reason) in &bombs {
        let r = client
            .post(format!("{}/v1/bundles", stack.url()))
            .bearer_auth(&token)
            .header("content-type", "application/gzip")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        let got = r.status().as_u16();
        let text = r.text().await.unwrap();
        assert_eq!(got, *status, "{name} ({} bytes): {text}", body.len());
        let code = if *status == 413 {
            "payload_too_large"
        } else {
            "invalid_request"
        };
        assert!(text.contains(code), "{name}: {text}");
        assert!(text.contains(reason), "{name}: {text}");
        println!("{name}: {} compressed bytes -> {got}", body.len());
    }
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM bundles")
        .fetch_one(&stack.db.pool)
        .await
        .unwrap();
    assert_eq!(stored, 0, "no bomb is stored");
    // The bound (docs/security-model.md): a push holds its body and about
    // 1 MiB; these bodies are a few MiB, the bombs 256 MiB to 600 MiB.
    let peak = peak_rss(pid);
    println!("dispatcher peak RSS after the bombs: {} MiB", peak / MIB);
    assert!(peak < 160 * MIB, "peak RSS {} MiB", peak / MIB);
}

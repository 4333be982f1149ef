//! `udf-probe`: a hostile task for the isolation tests (invariant 11). Run
//! by the worker wrapper like any `exec` task, it tries to read what a task
//! must never reach and prints, as its JSON output, what each try got.
//!
//! Input (stdin): `{"targets": "<path of a JSON file the test writes>"}`;
//! the file names `credential_file`, `peer_pid`, `peer_home` and
//! `peer_token_file` (another running task's). The probe waits for it.
//! Output: `{"tries": [{"what", "path", "ok", "bytes", "text"}], "env": {…},
//! "uid", "gid", "groups", "home_mode", "token_file_mode"}`: `text` is
//! what a successful read returned (lossy UTF-8, at most 64 KiB).

use std::io::Read as _;
use std::os::unix::fs::MetadataExt as _;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

fn try_read(what: &str, path: &str) -> Value {
    let got = std::fs::File::open(path).and_then(|mut f| {
        let mut buf = Vec::new();
        f.by_ref().take(64 * 1024).read_to_end(&mut buf)?;
        Ok(buf)
    });
    match got {
        Ok(bytes) => json!({"what": what, "path": path, "ok": true, "bytes": bytes.len(),
                            "text": String::from_utf8_lossy(&bytes).replace('\0', " ")}),
        Err(e) => json!({"what": what, "path": path, "ok": false, "error": e.to_string()}),
    }
}

fn try_list(what: &str, path: &str) -> Value {
    match std::fs::read_dir(path) {
        Ok(entries) => {
            let names: Vec<String> = entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            json!({"what": what, "path": path, "ok": true, "bytes": names.len(),
                   "text": names.join("\n")})
        }
        Err(e) => json!({"what": what, "path": path, "ok": false, "error": e.to_string()}),
    }
}

/// `/proc/<pid>/mem` holds nothing at offset 0; the point is whether it can
/// be opened at all (it needs ptrace access).
fn try_mem(pid: u32) -> Value {
    let path = format!("/proc/{pid}/mem");
    match std::fs::File::open(&path) {
        Ok(_) => json!({"what": "parent mem", "path": path, "ok": true, "bytes": 0, "text": ""}),
        Err(e) => json!({"what": "parent mem", "path": path, "ok": false, "error": e.to_string()}),
    }
}

fn status_line(key: &str) -> String {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_owned()))
        .unwrap_or_default()
}

fn main() {
    let mut raw = String::new();
    std::io::stdin().read_to_string(&mut raw).expect("stdin");
    let inputs: Value = serde_json::from_str(&raw).expect("inputs");
    let targets_path = inputs["targets"].as_str().expect("inputs.targets");
    let deadline = Instant::now() + Duration::from_secs(30);
    let targets: Value = loop {
        if let Ok(text) = std::fs::read_to_string(targets_path) {
            if let Ok(v) = serde_json::from_str(&text) {
                break v;
            }
        }
        assert!(Instant::now() < deadline, "no targets file");
        std::thread::sleep(Duration::from_millis(50));
    };
    let ppid = std::os::unix::process::parent_id();
    let s = |k: &str| targets[k].as_str().unwrap_or("").to_owned();
    let peer_pid = targets["peer_pid"].as_u64().unwrap_or(0);
    let tries = vec![
        try_read("parent environ", &format!("/proc/{ppid}/environ")),
        try_mem(ppid),
        try_read("parent cmdline", &format!("/proc/{ppid}/cmdline")),
        try_read("credential file", &s("credential_file")),
        try_list("peer scratch directory", &s("peer_home")),
        try_read("peer token file", &s("peer_token_file")),
        try_read("peer environ", &format!("/proc/{peer_pid}/environ")),
    ];
    let env: serde_json::Map<String, Value> = std::env::vars()
        .map(|(k, v)| (k, Value::String(v)))
        .collect();
    let home = std::env::var("HOME").unwrap_or_default();
    let token_file = std::env::var("DISPATCHER_TASK_TOKEN_FILE").unwrap_or_default();
    let mode = |p: &str| std::fs::metadata(p).map(|m| m.mode() & 0o7777).ok();
    let owner = |p: &str| std::fs::metadata(p).map(|m| m.uid()).ok();
    println!(
        "{}",
        json!({
            "tries": tries,
            "env": env,
            "uid": status_line("Uid:"),
            "gid": status_line("Gid:"),
            "groups": status_line("Groups:"),
            "pgid_is_own_pid": leads_own_process_group(),
            "home_mode": mode(&home),
            "home_owner": owner(&home),
            "token_file_mode": mode(&token_file),
            "token_file_owner": owner(&token_file),
        })
    );
}

/// Whether this process leads its own process group (field 5 of
/// `/proc/self/stat` is the pgid; field 1 the pid).
fn leads_own_process_group() -> bool {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The command name (field 2) is in parentheses and may hold spaces.
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let pid = stat.split_whitespace().next().unwrap_or("");
    // after ")" : state ppid pgrp …
    fields.get(2).is_some_and(|pgrp| *pgrp == pid)
}

//! Docs that name tests name tests that exist: the security model's
//! boundaries each cite the test that proves them.

use std::path::Path;

fn root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// Whether `file` defines a function `name`.
fn defines(file: &Path, name: &str) -> bool {
    std::fs::read_to_string(file)
        .unwrap_or_else(|e| panic!("{}: {e}", file.display()))
        .contains(&format!("fn {name}("))
}

#[test]
fn every_test_the_security_model_cites_exists() {
    let doc = std::fs::read_to_string(root().join("docs/security-model.md")).unwrap();
    let spans: Vec<&str> = doc.split('`').skip(1).step_by(2).collect();
    let mut cited = 0;
    for (i, span) in spans.iter().enumerate() {
        let ident = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        };
        if let Some((module, name)) = span.split_once("::") {
            if ident(module) && ident(name) && name.len() > 20 {
                let file = root().join(format!("tests/tests/it/{module}.rs"));
                assert!(
                    defines(&file, name),
                    "security-model.md cites {span}, which does not exist"
                );
                cited += 1;
            }
        } else if span.ends_with(".rs") && span.contains('/') && !span.contains('<') {
            // `path/to/file.rs` `test_name`
            let name = spans.get(i + 1).expect("a test name after a path");
            assert!(
                defines(&root().join(span), name),
                "security-model.md cites {name} in {span}, which does not exist"
            );
            cited += 1;
        }
    }
    assert!(
        cited >= 30,
        "only {cited} citations found: the parser is broken"
    );
}

/// `scripts/check-layers <tree>`: its exit status and what it printed.
fn check_layers(files: &[(&str, &str)]) -> (bool, String) {
    let dir = std::env::temp_dir().join(format!("layers-{}", uuid::Uuid::new_v4().simple()));
    for (path, text) in files {
        let file = dir.join(path);
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(file, text).unwrap();
    }
    let out = std::process::Command::new("python3")
        .arg(root().join("scripts/check-layers"))
        .arg("--root")
        .arg(&dir)
        .output()
        .expect("python3 runs scripts/check-layers");
    std::fs::remove_dir_all(&dir).ok();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// Issue 24: the house rule fails CI on an upward import, on a circle, on
/// a module with no layer and on a long handler, and passes the real tree.
#[test]
fn the_layer_check_fails_on_an_upward_import_a_circle_and_a_long_handler() {
    let (ok, text) = check_layers(&[
        ("lib.rs", "pub mod domain;\npub mod http;\n"),
        ("domain.rs", "use crate::http::error::ApiError;\n"),
        ("http/mod.rs", "pub mod error;\n"),
        ("http/error.rs", "pub struct ApiError;\n"),
    ]);
    assert!(
        !ok && text.contains("imports `http` (roles), a higher layer"),
        "{text}"
    );

    let (ok, text) = check_layers(&[
        ("store/mod.rs", "use crate::objects::ObjectStore;\n"),
        ("objects/mod.rs", "fn f() { crate::store::Store::new(); }\n"),
    ]);
    assert!(!ok && text.contains("import circle"), "{text}");

    let (ok, text) = check_layers(&[("newroom.rs", "")]);
    assert!(!ok && text.contains("`newroom` is in no layer"), "{text}");

    let long = format!(
        "pub async fn handler() {{\n{}}}\n",
        "    let _ = 1;\n".repeat(61)
    );
    let (ok, text) = check_layers(&[("http/jobs.rs", &long)]);
    assert!(!ok && text.contains("is 62 lines"), "{text}");

    // Below the fence line: tests may import anything.
    let (ok, text) = check_layers(&[(
        "domain.rs",
        "fn f() {}\n#[cfg(test)]\nmod tests {\n    use crate::http::X;\n}\n",
    )]);
    assert!(ok, "{text}");

    let real = std::process::Command::new("python3")
        .arg(root().join("scripts/check-layers"))
        .output()
        .unwrap();
    assert!(
        real.status.success(),
        "{}",
        String::from_utf8_lossy(&real.stderr)
    );
}

/// Every route the router serves is in `docs/openapi.yaml`, with its
/// method.
#[test]
fn every_route_is_in_the_openapi_document_with_its_method() {
    let api = std::fs::read_to_string(root().join("docs/openapi.yaml")).unwrap();
    let mut missing = Vec::new();
    for spec in dispatcher::http::ROUTES {
        let head = format!("\n  {}:\n", spec.path);
        let found = api.find(&head).is_some_and(|at| {
            let block = &api[at + head.len()..];
            let end = block.find("\n  /").unwrap_or(block.len());
            block[..end].contains(&format!("    {}:", spec.method.to_lowercase()))
        });
        if !found {
            missing.push(format!("{} {}", spec.method, spec.path));
        }
    }
    assert!(missing.is_empty(), "not in docs/openapi.yaml: {missing:?}");
}

/// The IAM actions an SDK call needs, for every call the AWS adapters make;
/// `None` for the set-up calls only `admin sqs create-queues` and test
/// servers make (production creates queues and buckets with Terraform).
fn iam_action(sdk_call: &str) -> Option<Option<&'static str>> {
    Some(match sdk_call {
        "send_message" | "send_message_batch" => Some("sqs:SendMessage"),
        "receive_message" => Some("sqs:ReceiveMessage"),
        "delete_message" | "delete_message_batch" => Some("sqs:DeleteMessage"),
        "change_message_visibility" | "change_message_visibility_batch" => {
            Some("sqs:ChangeMessageVisibility")
        }
        "get_queue_url" => Some("sqs:GetQueueUrl"),
        "get_object" | "head_object" => Some("s3:GetObject"),
        "put_object" => Some("s3:PutObject"),
        "delete_object" => Some("s3:DeleteObject"),
        "list_objects_v2" | "head_bucket" => Some("s3:ListBucket"),
        "assume_role" => Some("sts:AssumeRole"),
        "create_queue" | "get_queue_attributes" | "create_bucket" => None,
        _ => return None,
    })
}

/// The quoted `service:Action` strings of one `aws_iam_policy_document`.
fn policy_actions(tf: &str, document: &str) -> std::collections::BTreeSet<String> {
    let start = tf
        .find(&format!(
            "data \"aws_iam_policy_document\" \"{document}\" {{"
        ))
        .unwrap_or_else(|| panic!("no policy document {document}"));
    let block = &tf[start..];
    let block = &block[..block.find("\n}\n").expect("the block ends")];
    block
        .split('"')
        .filter(|s| {
            s.split_once(':').is_some_and(|(svc, a)| {
                ["sqs", "s3", "kms", "sts", "secretsmanager", "ecs", "lambda"].contains(&svc)
                    && a.chars().all(|c| c.is_ascii_alphanumeric())
                    && !a.is_empty()
            })
        })
        .map(str::to_owned)
        .collect()
}

#[test]
fn terraform_iam_grants_exactly_the_calls_the_code_makes() {
    let mut needed = std::collections::BTreeSet::new();
    let mut unknown = Vec::new();
    for file in [
        "dispatcher/src/queue/sqs.rs",
        "dispatcher/src/objects/s3.rs",
        "dispatcher/src/objects/sts.rs",
    ] {
        let text = std::fs::read_to_string(root().join(file)).unwrap();
        let flat: String = text.split_whitespace().collect::<Vec<_>>().join("");
        for (i, _) in flat.match_indices("client.") {
            let call: String = flat[i + "client.".len()..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            if !flat[i + "client.".len() + call.len()..].starts_with("()") {
                continue;
            }
            match iam_action(&call) {
                Some(Some(action)) => {
                    needed.insert(action.to_owned());
                }
                Some(None) => {}
                None => unknown.push(format!("{file}: {call}")),
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "SDK calls without their IAM action here: {unknown:?}"
    );
    // SSE-KMS: S3 uses the key on the caller's behalf.
    needed.extend(["kms:GenerateDataKey".to_owned(), "kms:Decrypt".to_owned()]);
    let tf = std::fs::read_to_string(root().join("terraform/modules/iam/main.tf")).unwrap();
    assert_eq!(policy_actions(&tf, "dispatcher"), needed);
    // A worker receives its wake-ups through the same SQS adapter (receive,
    // delete, visibility, and the URL at connect), from one queue.
    let wakeups = std::fs::read_to_string(root().join("worker-wrapper/src/wakeups.rs")).unwrap();
    for call in [".receive(", ".delete(", ".change_visibility("] {
        assert!(wakeups.contains(call), "the worker no longer calls {call}");
    }
    let worker: std::collections::BTreeSet<String> = [
        "sqs:ReceiveMessage",
        "sqs:DeleteMessage",
        "sqs:ChangeMessageVisibility",
        "sqs:GetQueueUrl",
        "ecs:UpdateTaskProtection",
        "lambda:InvokeFunction",
    ]
    .map(String::from)
    .into();
    assert_eq!(policy_actions(&tf, "worker"), worker);
    // The runner functions are invoked by lambda.rs (ADR 0026), and by
    // nothing else of the worker's.
    let lambda = std::fs::read_to_string(root().join("worker-wrapper/src/lambda.rs")).unwrap();
    assert!(lambda.contains(".invoke()"));
    // The protection goes through the ECS agent, asked for by ecs.rs.
    let ecs = std::fs::read_to_string(root().join("worker-wrapper/src/ecs.rs")).unwrap();
    assert!(ecs.contains("/task-protection/v1/state"));
}

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
